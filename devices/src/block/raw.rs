//! Raw images: the file (or host block device) is the disk.
//!
//! Discard punches holes and write-zeroes uses `fallocate(ZERO_RANGE)` (on block devices the
//! kernel turns both into zeroing commands, with `BLKZEROOUT` as the next step), falling back to
//! writing zeros. The cache mode picks page-cache I/O or O_DIRECT through a bounce buffer; the
//! disk's last partial block, if the file size is not a multiple of the O_DIRECT alignment, goes
//! through a second, buffered descriptor, because an aligned direct write there would grow the
//! file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::cache::{self, CacheMode, DirectIo};
use super::lock::{self, Access, ImageLock};
use super::{check_range, DiskImage, Error, Result};

/// A raw disk image file (or block device).
#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    read_only: bool,
    cache: CacheMode,
    block_device: bool,
    /// Present with `cache=none`.
    direct: Option<Direct>,
    /// `fdatasync` calls issued (flushes that reached the host).
    syncs: u64,
    lock: Option<ImageLock>,
}

/// O_DIRECT state: aligned I/O below `end`, buffered I/O through `tail` above it.
#[derive(Debug)]
struct Direct {
    io: DirectIo,
    /// Size rounded down to the alignment.
    end: u64,
    /// A page-cache descriptor of the same file for `[end, size)`, when that is not empty.
    tail: Option<File>,
}

impl RawImage {
    /// Opens `path` with page-cache I/O and no locks; its length is the disk size. Used for
    /// backing files and tools; a VM's disks go through [`RawImage::open_with`].
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, read_only)
    }

    /// Opens `path` as a VM disk: refuses unwritable files for read-write disks, applies
    /// `opts.cache`, and takes QEMU-compatible locks unless `opts.locking` is off.
    pub fn open_with(path: &Path, opts: &super::OpenOptions) -> Result<Self> {
        let direct_flag = if opts.cache.direct() {
            libc::O_DIRECT
        } else {
            0
        };
        let file = lock::open_checked(path, opts.read_only, direct_flag).map_err(|e| match e {
            Error::Io(io) if opts.cache.direct() && io.raw_os_error() == Some(libc::EINVAL) => {
                no_direct(path)
            }
            other => other,
        })?;
        let lock =
            ImageLock::acquire(&file, path, Access::raw_drive(opts.read_only), opts.locking)?;
        let mut img = Self::from_file(file, opts.read_only)?;
        img.lock = lock;
        img.cache = opts.cache;
        if opts.cache.direct() {
            img.direct = Some(img.setup_direct(path)?);
        }
        Ok(img)
    }

    /// Wraps an already open file (page-cache I/O, no locks).
    pub fn from_file(file: File, read_only: bool) -> Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        let size = file_size(&file, block_device)?;
        Ok(RawImage {
            file,
            size,
            read_only,
            cache: CacheMode::Writeback,
            block_device,
            direct: None,
            syncs: 0,
            lock: None,
        })
    }

    /// The cache mode in use.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// The O_DIRECT request alignment, with `cache=none`.
    pub fn direct_alignment(&self) -> Option<usize> {
        self.direct.as_ref().map(|d| d.io.align())
    }

    /// Flushes that reached the host (`fdatasync` calls); `cache=unsafe` never adds to it.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    fn setup_direct(&self, path: &Path) -> Result<Direct> {
        let align = if self.block_device {
            cache::logical_block_size(&self.file).ok()
        } else {
            None
        };
        let align = match align {
            Some(a) if a <= cache::BUF_ALIGN => a,
            _ => cache::probe_alignment(&self.file, self.size)?.ok_or_else(|| no_direct(path))?,
        };
        let end = self.size & !(align as u64 - 1);
        let tail = if end < self.size {
            // A new open file description without O_DIRECT; check it is the same file.
            let t = OpenOptions::new()
                .read(true)
                .write(!self.read_only)
                .open(path)?;
            let (a, b) = (self.file.metadata()?, t.metadata()?);
            if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
                return Err(std::io::Error::other("image file replaced while opening it").into());
            }
            Some(t)
        } else {
            None
        };
        Ok(Direct {
            io: DirectIo::new(align),
            end,
            tail,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// `BLKZEROOUT` on a block device (512-byte aligned ranges only).
    fn blk_zeroout(&self, offset: u64, len: u64) -> std::io::Result<()> {
        vmm_sys_util::ioctl_io_nr!(BLKZEROOUT, 0x12, 127);
        if !self.block_device || !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer, a live local.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT(), range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn write_zeros_slowly(&mut self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; cache::BOUNCE_BYTES];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

fn no_direct(path: &Path) -> Error {
    cache::Error::NoDirectIo {
        path: path.to_path_buf(),
    }
    .into()
}

/// Size of a regular file or a block device.
fn file_size(file: &File, block_device: bool) -> Result<u64> {
    if block_device {
        vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64(), &mut size) } == 0 {
            return Ok(size);
        }
    }
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    Ok(f.seek(SeekFrom::End(0))?)
}

/// Reads `buf` at `offset`, filling whatever lies past the end of the file with zeros.
pub(crate) fn read_zero_fill(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn hand_over(&mut self) -> Result<()> {
        self.flush()?;
        if let Some(l) = &mut self.lock {
            l.hand_over();
        }
        Ok(())
    }
    fn take_back(&mut self) -> Result<()> {
        // Raw data is not cached here (the page cache is coherent, O_DIRECT bypasses it).
        if let Some(l) = &mut self.lock {
            l.take_back()?;
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let Some(d) = self.direct.as_mut() else {
            return Ok(read_zero_fill(&self.file, buf, offset)?);
        };
        let split = (d.end.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let (head, rest) = buf.split_at_mut(split);
        if !head.is_empty() {
            d.io.read_at(&self.file, head, offset)?;
        }
        if !rest.is_empty() {
            let tail = d.tail.as_ref().unwrap_or(&self.file);
            read_zero_fill(tail, rest, offset + split as u64)?;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        let Some(d) = self.direct.as_mut() else {
            return Ok(self.file.write_all_at(buf, offset)?);
        };
        let split = (d.end.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let (head, rest) = buf.split_at(split);
        if !head.is_empty() {
            d.io.write_at(&self.file, head, offset)?;
        }
        if !rest.is_empty() {
            let tail = d.tail.as_ref().unwrap_or(&self.file);
            tail.write_all_at(rest, offset + split as u64)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only || !self.cache.syncs() {
            return Ok(());
        }
        // fdatasync works on the inode, so it also covers writes made through `tail`.
        self.file.sync_data()?;
        self.syncs += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        // Our contract says discarded ranges read as zeros, so no bare BLKDISCARD (which does
        // not promise that): a hole in a file; on a block device the kernel turns PUNCH_HOLE into
        // an unmapping write-zeroes. Where neither works, write zeros.
        if self
            .fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .is_err()
        {
            self.write_zeroes(offset, len)?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0
            || self
                .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                .is_ok()
            || self.blk_zeroout(offset, len).is_ok()
        {
            return Ok(());
        }
        self.write_zeros_slowly(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::cache::test_dir;
    use crate::block::Locking;
    use crate::block::OpenOptions as DiskOptions;
    use std::path::PathBuf;

    fn scratch(name: &str, data: &[u8]) -> PathBuf {
        let p = test_dir().join(format!("raw-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn opts(read_only: bool, cache: CacheMode) -> DiskOptions {
        DiskOptions {
            read_only,
            cache,
            ..Default::default()
        }
    }

    #[test]
    fn raw_roundtrip_discard_and_zeroes() {
        let path = scratch("roundtrip", &vec![0xaau8; 1 << 16]);
        let mut img = RawImage::open(&path, false).unwrap();
        assert_eq!(img.size(), 1 << 16);
        img.write_at(b"hello", 100).unwrap();
        let mut buf = [0u8; 5];
        img.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        img.discard(0, 8192).unwrap();
        img.write_zeroes(8192, 4096).unwrap();
        let mut big = vec![1u8; 12288];
        img.read_at(&mut big, 0).unwrap();
        assert!(big.iter().all(|&b| b == 0));
        assert!(img.read_at(&mut buf, (1 << 16) - 2).is_err());
        img.flush().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    fn is_o_direct(img: &RawImage) -> bool {
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let fl = unsafe { libc::fcntl(img.file.as_raw_fd(), libc::F_GETFL) };
        fl & libc::O_DIRECT != 0
    }

    /// Every cache mode: unaligned reads and writes agree with a model and with what a plain
    /// buffered read of the file sees afterwards; discard and write-zeroes still zero; flush
    /// syncs except with `unsafe`. The size is deliberately not a multiple of 4096, so O_DIRECT
    /// has a buffered tail.
    #[test]
    fn cache_modes_read_write_flush() {
        let size = (3 << 20) + 4096 + 1000;
        let init: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        for mode in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe] {
            let path = scratch(&format!("modes-{mode}"), &init);
            let mut model = init.clone();
            let mut img = RawImage::open_with(&path, &opts(false, mode)).unwrap();
            assert_eq!(img.size(), size as u64);
            assert_eq!(img.cache_mode(), mode);
            assert_eq!(is_o_direct(&img), mode == CacheMode::None, "{mode}");
            assert_eq!(img.direct_alignment().is_some(), mode == CacheMode::None);
            let writes: &[(usize, usize)] = &[
                (1, 3),
                (511, 1025),
                (4096, 8192),
                ((1 << 20) - 5, (1 << 20) + 11),
                (size - 1500, 1500), // crosses into the unaligned tail
                (size - 3, 3),
                (12345, 0),
            ];
            for (n, &(off, len)) in writes.iter().enumerate() {
                let data: Vec<u8> = (0..len).map(|i| (i * 13 + n) as u8).collect();
                img.write_at(&data, off as u64).unwrap();
                model[off..off + len].copy_from_slice(&data);
                let mut back = vec![0u8; len];
                img.read_at(&mut back, off as u64).unwrap();
                assert_eq!(back, data, "{mode} write {n}");
            }
            img.write_zeroes(3000, 5000).unwrap();
            model[3000..8000].fill(0);
            img.discard(1 << 20, 65536 + 7).unwrap();
            model[1 << 20..(1 << 20) + 65536 + 7].fill(0);
            let mut all = vec![0u8; size];
            img.read_at(&mut all, 0).unwrap();
            assert!(all == model, "{mode}: read back differs");
            assert!(img.read_at(&mut [0u8; 2], size as u64 - 1).is_err());

            assert_eq!(img.syncs(), 0);
            img.flush().unwrap();
            img.flush().unwrap();
            let expect = if mode == CacheMode::Unsafe { 0 } else { 2 };
            assert_eq!(img.syncs(), expect, "{mode}: flush");
            drop(img);
            assert!(
                std::fs::read(&path).unwrap() == model,
                "{mode}: file differs"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn read_only_disk_refuses_writes_and_flush_is_free() {
        let path = scratch("ro", &[7u8; 8192]);
        let mut img = RawImage::open_with(&path, &opts(true, CacheMode::None)).unwrap();
        let mut b = [0u8; 3];
        img.read_at(&mut b, 4095).unwrap();
        assert_eq!(b, [7, 7, 7]);
        assert!(matches!(img.write_at(b"x", 0), Err(Error::ReadOnly)));
        assert!(matches!(img.discard(0, 512), Err(Error::ReadOnly)));
        img.flush().unwrap();
        assert_eq!(img.syncs(), 0);
        drop(img);
        std::fs::remove_file(&path).unwrap();
    }

    /// A file without write bits is refused for a read-write disk even though we are root, and
    /// still opens read-only.
    #[test]
    fn read_only_file_refused_for_rw() {
        use std::os::unix::fs::PermissionsExt;
        let path = scratch("mode", &[0u8; 4096]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = RawImage::open_with(&path, &opts(false, CacheMode::Writeback)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("cannot be opened read-write") && msg.contains(&*path.to_string_lossy()),
            "{msg}"
        );
        assert!(RawImage::open_with(&path, &opts(true, CacheMode::Writeback)).is_ok());
        std::fs::remove_file(&path).unwrap();
    }

    /// cache=none where O_DIRECT is refused names the path and the fix. Older kernels refuse
    /// it on tmpfs; since Linux 6.6 tmpfs accepts it, and then the disk must simply work.
    /// `RAW_TEST_NO_ODIRECT_DIR` can point at a file system known to refuse it (e.g. ramfs).
    #[test]
    fn direct_io_refusal_is_clear() {
        let dir = std::env::var_os("RAW_TEST_NO_ODIRECT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm"));
        if !dir.is_dir() {
            return;
        }
        let path = dir.join(format!("raw-odirect-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        match RawImage::open_with(&path, &opts(false, CacheMode::None)) {
            Ok(mut img) => {
                img.write_at(b"abc", 4094).unwrap();
                let mut b = [0u8; 4];
                img.read_at(&mut b, 4093).unwrap();
                assert_eq!(&b, b"\x01abc");
            }
            Err(e) => {
                let msg = e.to_string();
                eprintln!("refused as expected: {msg}");
                assert!(
                    msg.contains("cache=none needs O_DIRECT")
                        && msg.contains(&*path.to_string_lossy())
                        && msg.contains("cache=writeback"),
                    "{msg}"
                );
            }
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn no_direct_message() {
        let msg = no_direct(Path::new("/dev/shm/d.img")).to_string();
        assert_eq!(
            msg,
            "cache=none needs O_DIRECT, which the filesystem of /dev/shm/d.img does not support \
             (tmpfs?); use cache=writeback"
        );
    }

    #[test]
    fn locking_off_allows_two_writers() {
        let path = scratch("nolock", &[0u8; 4096]);
        let o = DiskOptions {
            locking: Locking::Off,
            ..Default::default()
        };
        let _a = RawImage::open_with(&path, &o).unwrap();
        let _b = RawImage::open_with(&path, &o).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// A loop device whose detach is guaranteed.
    struct Loop(String);

    impl Loop {
        fn attach(file: &Path, read_only: bool) -> Option<Loop> {
            let mut cmd = std::process::Command::new("losetup");
            if read_only {
                cmd.arg("-r");
            }
            let out = cmd.args(["--find", "--show"]).arg(file).output().ok()?;
            out.status
                .success()
                .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    /// Host block devices: size from BLKGETSIZE64, O_DIRECT alignment from BLKSSZGET, zeroing
    /// through fallocate/BLKZEROOUT, and a read-only device refused for a read-write disk.
    #[test]
    #[ignore = "needs root and a free loop device (losetup)"]
    fn block_device_all_modes() {
        let size = 8usize << 20;
        let init: Vec<u8> = (0..size).map(|i| (i % 249) as u8).collect();
        let backing = scratch("loop", &init);
        let Some(dev) = Loop::attach(&backing, false) else {
            eprintln!("no loop device; skipping");
            return;
        };
        let mut model = init.clone();
        for (n, mode) in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe]
            .into_iter()
            .enumerate()
        {
            let mut img = RawImage::open_with(Path::new(&dev.0), &opts(false, mode)).unwrap();
            assert!(img.block_device);
            assert_eq!(img.size(), size as u64);
            if mode == CacheMode::None {
                assert_eq!(img.direct_alignment(), Some(512));
            }
            let data = vec![n as u8 + 1; 3000];
            img.write_at(&data, 777 + n as u64).unwrap();
            model[777 + n..3777 + n].copy_from_slice(&data);
            img.write_zeroes(1 << 20, 65536).unwrap();
            model[1 << 20..(1 << 20) + 65536].fill(0);
            img.write_zeroes(5000, 100).unwrap(); // unaligned: written zeros
            img.blk_zeroout(4 << 20, 8192).unwrap();
            model[4 << 20..(4 << 20) + 8192].fill(0);
            model[5000..5100].fill(0);
            img.discard(2 << 20, 1 << 20).unwrap();
            model[2 << 20..3 << 20].fill(0);
            img.flush().unwrap();
            let mut all = vec![0u8; size];
            img.read_at(&mut all, 0).unwrap();
            assert!(all == model, "{mode}: device contents differ");
        }
        drop(dev);
        assert!(std::fs::read(&backing).unwrap() == model);

        let ro = Loop::attach(&backing, true).expect("read-only loop device");
        let msg = RawImage::open_with(Path::new(&ro.0), &opts(false, CacheMode::Writeback))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("read-only"), "{msg}");
        assert!(RawImage::open_with(Path::new(&ro.0), &opts(true, CacheMode::None)).is_ok());
        drop(ro);
        std::fs::remove_file(&backing).unwrap();
    }
}
