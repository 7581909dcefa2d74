//! The extracted-kernel cache: the vmlinux of a bzImage ([`boot::decompress`]) kept on disk so
//! that a kernel is decompressed once, not at every boot, and a boot with a cached kernel
//! neither reads the whole bzImage nor hashes anything.
//!
//! Files live in `$XDG_CACHE_HOME/vmm/kernels/` (else `$HOME/.cache/vmm/kernels/`; with neither
//! set there is no cache):
//!
//! - `<K>.vmlinux`: the vmlinux of the bzImage whose SHA-256 is `K`. Written to a temporary name,
//!   synced, given the modification time [`SEALED_MTIME`] and renamed into place.
//! - `<K>.stamp`: the identity of that file once in place (device, inode, size, mtime, ctime).
//!   An entry is used only while its file still has exactly that identity: any write to it
//!   (tampering, a partial rewrite, truncation) moves its mtime off the sealed value and its
//!   ctime forward, a replacement changes its inode. Such an entry is deleted and the kernel
//!   decompressed afresh; it is never booted.
//! - `id-<H>`: `K` for the bzImage file whose identity hashes to `H`, so that a hit costs a few
//!   `stat` calls instead of hashing the bzImage (in the nested test box, hashing and reading
//!   the 14 + 50 MiB took 1.5 s of a 7 s boot). A bzImage changed in place gets a new identity,
//!   and so a lookup by content.
//!
//! What this guards against is corruption and modification of cached files; a user who can
//! write the cache can equally replace the bzImage itself. Cache failures (a read-only home, a
//! full disk) never fail a boot: the fresh extraction is used.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use boot::decompress::{self, DecompressError, DEFAULT_MAX_VMLINUX_SIZE};
use sha2::{Digest, Sha256};

/// The modification time every cache entry is given when written (1 s past the epoch): a
/// later write to the file sets it to the current time.
pub const SEALED_MTIME: Duration = Duration::from_secs(1);

/// Where an extracted vmlinux comes from.
#[derive(Debug)]
pub enum Extracted {
    /// A cache entry whose identity matches its stamp, opened.
    Cache {
        /// The entry, positioned anywhere (loaders seek).
        file: File,
        /// Its key, to [`KernelCache::discard`] it if it does not load.
        key: String,
    },
    /// Decompressed from the bzImage just now (and stored in the cache if there is one).
    Decompressed(Vec<u8>),
}

/// Why no vmlinux came out of a bzImage.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// Reading the bzImage failed.
    #[error("cannot read the bzImage: {0}")]
    Read(io::Error),
    /// Its payload is not a kernel we can extract.
    #[error(transparent)]
    Decompress(#[from] DecompressError),
}

/// A cache directory of extracted kernels.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

/// Lower-case hex SHA-256 of `data`.
fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut hex = String::with_capacity(64);
    for b in digest.iter() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What identifies a file's content without reading it: device, inode, size, mtime and ctime
/// (to the nanosecond).
fn identity(m: &fs::Metadata) -> String {
    format!(
        "{} {} {} {}.{:09} {}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

impl KernelCache {
    /// A cache in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KernelCache { dir: dir.into() }
    }

    /// The user's cache: `$XDG_CACHE_HOME/vmm/kernels`, else `$HOME/.cache/vmm/kernels`;
    /// `None` when neither is set to an absolute path.
    pub fn from_env() -> Option<Self> {
        Self::dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")).map(Self::new)
    }

    /// The cache directory for these values of `XDG_CACHE_HOME` and `HOME` (the XDG spec
    /// ignores relative paths).
    fn dir_from(
        xdg_cache_home: Option<std::ffi::OsString>,
        home: Option<std::ffi::OsString>,
    ) -> Option<PathBuf> {
        let absolute = |v: Option<std::ffi::OsString>| {
            v.map(PathBuf::from)
                .filter(|p| p.is_absolute() && p.as_os_str().len() > 1)
        };
        absolute(xdg_cache_home)
            .or_else(|| absolute(home).map(|h| h.join(".cache")))
            .map(|base| base.join("vmm").join("kernels"))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn vmlinux_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.vmlinux"))
    }

    fn stamp_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.stamp"))
    }

    fn index_path(&self, bzimage: &fs::Metadata) -> PathBuf {
        self.dir
            .join(format!("id-{}", sha256_hex(identity(bzimage).as_bytes())))
    }

    /// The entry for the bzImage file with metadata `bzimage`, found through its identity.
    fn lookup_by_identity(&self, bzimage: &fs::Metadata) -> Option<(File, String)> {
        let key = fs::read_to_string(self.index_path(bzimage)).ok()?;
        let key = key.trim();
        if !is_sha256_hex(key) {
            return None;
        }
        self.lookup(key).map(|f| (f, key.to_string()))
    }

    /// The entry for key `key` if its file still has the identity its stamp recorded; an entry
    /// that does not is deleted.
    fn lookup(&self, key: &str) -> Option<File> {
        let path = self.vmlinux_path(key);
        let meta = fs::symlink_metadata(&path).ok()?;
        let stamp = fs::read_to_string(self.stamp_path(key)).unwrap_or_default();
        let why = if !meta.file_type().is_file() {
            "not a regular file"
        } else if meta.modified().ok() != Some(SystemTime::UNIX_EPOCH + SEALED_MTIME)
            || stamp.trim() != identity(&meta)
        {
            "changed since it was written"
        } else {
            match File::open(&path) {
                Ok(f) => return Some(f),
                Err(_) => "unreadable",
            }
        };
        eprintln!(
            "vmm: discarding cached kernel {} ({why}); decompressing afresh",
            path.display()
        );
        self.discard(key);
        None
    }

    /// Deletes the entry for `key` (a cached kernel that turned out not to load).
    pub fn discard(&self, key: &str) {
        let _ = fs::remove_file(self.vmlinux_path(key));
        let _ = fs::remove_file(self.stamp_path(key));
    }

    /// Writes `data` to `path` through a temporary file in the cache directory, renamed into
    /// place; `seal` gives the file [`SEALED_MTIME`] before the rename.
    fn write_atomically(&self, path: &Path, data: &[u8], seal: bool) -> io::Result<fs::Metadata> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(data)?;
                if seal {
                    f.set_modified(SystemTime::UNIX_EPOCH + SEALED_MTIME)?;
                }
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, path))
            .and_then(|()| fs::symlink_metadata(path));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Stores `vmlinux` as the entry for key `key`, with its stamp.
    fn store(&self, key: &str, vmlinux: &[u8]) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let meta = self.write_atomically(&self.vmlinux_path(key), vmlinux, true)?;
        self.write_atomically(&self.stamp_path(key), identity(&meta).as_bytes(), false)
            .map(drop)
    }

    /// Records that the bzImage file with metadata `bzimage` has key `key`.
    fn remember(&self, bzimage: &fs::Metadata, key: &str) -> io::Result<()> {
        self.write_atomically(&self.index_path(bzimage), key.as_bytes(), false)
            .map(drop)
    }
}

/// The vmlinux of the bzImage `file`: from `cache` when it holds an intact entry for it (found
/// by the file's identity, else by the SHA-256 of its content), else decompressed (and stored
/// in `cache`, if any). The bzImage is read whole only when the identity lookup misses.
pub fn extract(file: &mut File, cache: Option<&KernelCache>) -> Result<Extracted, ExtractError> {
    let meta = file.metadata().map_err(ExtractError::Read)?;
    if let Some(hit) = cache.and_then(|c| c.lookup_by_identity(&meta)) {
        return Ok(Extracted::Cache {
            file: hit.0,
            key: hit.1,
        });
    }
    let mut image = Vec::new();
    file.rewind()
        .and_then(|()| {
            file.take(DEFAULT_MAX_VMLINUX_SIZE as u64)
                .read_to_end(&mut image)
        })
        .map_err(ExtractError::Read)?;
    let Some(cache) = cache else {
        return Ok(Extracted::Decompressed(decompress::extract_vmlinux(
            &image,
        )?));
    };
    let key = sha256_hex(&image);
    if let Some(file) = cache.lookup(&key) {
        let _ = cache.remember(&meta, &key);
        return Ok(Extracted::Cache { file, key });
    }
    let vmlinux = decompress::extract_vmlinux(&image)?;
    if let Err(e) = cache
        .store(&key, &vmlinux)
        .and_then(|()| cache.remember(&meta, &key))
    {
        log::warn!(
            "cannot cache the extracted kernel in {}: {e}",
            cache.dir().display()
        );
    }
    Ok(Extracted::Decompressed(vmlinux))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GZ: &[u8] = include_bytes!("../../boot/tests/data/vmlinux.gz");
    const VMLINUX: &[u8] = include_bytes!("../../boot/tests/data/vmlinux.elf");

    /// A minimal bzImage around the gzip test payload.
    fn bzimage() -> Vec<u8> {
        let mut image = vec![0u8; 5 * 512];
        image[0x1f1] = 4; // setup_sects
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(GZ.len() as u32).to_le_bytes());
        image.extend_from_slice(GZ);
        image
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vmm-kernel-cache-{name}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// Extracts `bzimage_path`; the vmlinux bytes and whether they came from the cache.
    fn run(bzimage_path: &Path, cache: Option<&KernelCache>) -> (Vec<u8>, bool) {
        let mut f = File::open(bzimage_path).unwrap();
        match extract(&mut f, cache).unwrap() {
            Extracted::Cache { mut file, .. } => {
                let mut v = Vec::new();
                file.read_to_end(&mut v).unwrap();
                (v, true)
            }
            Extracted::Decompressed(v) => (v, false),
        }
    }

    /// A scratch dir with the test bzImage in it and a cache below it.
    fn setup(name: &str) -> (PathBuf, PathBuf, KernelCache) {
        let dir = tempdir(name);
        let image = dir.join("bzImage");
        fs::write(&image, bzimage()).unwrap();
        let cache = KernelCache::new(dir.join("kernels"));
        (dir, image, cache)
    }

    #[test]
    fn miss_then_hit_by_identity_then_by_content() {
        let (dir, image, cache) = setup("hit");
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), false));
        let key = sha256_hex(&bzimage());
        let files = entries(cache.dir());
        assert_eq!(
            files.len(),
            3,
            "entry, stamp, index; no temporary: {files:?}"
        );
        assert!(files.contains(&format!("{key}.vmlinux")));
        assert!(files.contains(&format!("{key}.stamp")));
        let sealed = fs::metadata(cache.vmlinux_path(&key))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(sealed, SystemTime::UNIX_EPOCH + SEALED_MTIME);
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), true));

        // The same kernel under another name (another identity) is found by its content.
        let copy = dir.join("copy");
        fs::copy(&image, &copy).unwrap();
        assert_eq!(run(&copy, Some(&cache)), (VMLINUX.to_vec(), true));
        assert_eq!(entries(cache.dir()).len(), 4, "a second index file");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modified_entry_is_replaced() {
        let (dir, image, cache) = setup("tampered");
        run(&image, Some(&cache));
        let path = cache.vmlinux_path(&sha256_hex(&bzimage()));
        // Same length, one byte changed inside the code: still a valid-looking ELF.
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n - 10] ^= 0xff;
        fs::write(&path, &data).unwrap();
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), false));
        assert_eq!(fs::read(&path).unwrap(), VMLINUX, "rewritten");
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), true));

        // A modification that puts the sealed mtime back still changed the ctime.
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        f.set_modified(SystemTime::UNIX_EPOCH + SEALED_MTIME)
            .unwrap();
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), false));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_replaced_or_missing_stamp_entries_are_replaced() {
        let (dir, image, cache) = setup("truncated");
        let key = sha256_hex(&bzimage());
        run(&image, Some(&cache));
        fs::write(cache.vmlinux_path(&key), &VMLINUX[..1000]).unwrap();
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), false));

        // Replaced by another file with the same content and sealed mtime: a new inode.
        let other = dir.join("other");
        fs::write(&other, VMLINUX).unwrap();
        File::open(&other)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + SEALED_MTIME)
            .unwrap();
        fs::rename(&other, cache.vmlinux_path(&key)).unwrap();
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), false));

        fs::remove_file(cache.stamp_path(&key)).unwrap();
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), false));
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), true));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bzimage_changed_in_place_is_looked_up_by_its_new_content() {
        let (dir, image, cache) = setup("changed");
        run(&image, Some(&cache));
        // Another kernel written over the same file: same inode, new content.
        let mut other = bzimage();
        let n = other.len();
        other[n - 1] ^= 0xff; // corrupts the gzip trailer: no kernel comes out
        fs::write(&image, &other).unwrap();
        let mut f = File::open(&image).unwrap();
        assert!(matches!(
            extract(&mut f, Some(&cache)),
            Err(ExtractError::Decompress(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_index_is_ignored() {
        let (dir, image, cache) = setup("index");
        run(&image, Some(&cache));
        let index = cache.index_path(&fs::metadata(&image).unwrap());
        fs::write(&index, "not a key").unwrap();
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), true));
        assert_eq!(fs::read_to_string(&index).unwrap(), sha256_hex(&bzimage()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_cache_still_extracts() {
        let (dir, image, _) = setup("unwritable");
        fs::write(dir.join("file"), b"a file where the directory should be").unwrap();
        let cache = KernelCache::new(dir.join("file").join("kernels"));
        assert_eq!(run(&image, Some(&cache)), (VMLINUX.to_vec(), false));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_cache_and_bad_images() {
        let (dir, image, _) = setup("nocache");
        assert_eq!(run(&image, None), (VMLINUX.to_vec(), false));
        fs::write(&image, b"junk").unwrap();
        let mut f = File::open(&image).unwrap();
        assert!(extract(&mut f, None).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_dir_from_env() {
        let d = |x: Option<&str>, h: Option<&str>| {
            KernelCache::dir_from(x.map(Into::into), h.map(Into::into))
        };
        assert_eq!(
            d(Some("/x/cache"), Some("/home/u")),
            Some(PathBuf::from("/x/cache/vmm/kernels"))
        );
        assert_eq!(
            d(None, Some("/home/u")),
            Some(PathBuf::from("/home/u/.cache/vmm/kernels"))
        );
        assert_eq!(
            d(Some("relative"), Some("/home/u")),
            Some(PathBuf::from("/home/u/.cache/vmm/kernels"))
        );
        assert_eq!(d(Some(""), None), None);
        assert_eq!(d(None, Some("/")), None);
        assert_eq!(d(None, None), None);
    }
}
