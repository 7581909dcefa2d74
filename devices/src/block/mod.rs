//! Host-side disk images: the [`DiskImage`] trait that virtio-blk drives, a [`raw`] backend and
//! the [`qcow2`] engine, plus [`open`], which picks the backend from a format name or by probing.
//!
//! The trait takes `&mut self`: virtio-blk calls it from the one event-loop thread, and the qcow2
//! engine keeps metadata caches that every request may change. If worker threads come later,
//! each image goes behind a `Mutex` (the trait is `Send` for that reason).

pub mod cache;
pub mod lock;
pub mod qcow2;
pub mod raw;

pub use cache::CacheMode;
pub use lock::Locking;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What can go wrong on a disk request or when opening an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A request reaches past the end of the disk.
    #[error("request at offset {offset} for {len} bytes is past the end of the {size}-byte disk")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk size.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("the image is read-only")]
    ReadOnly,
    /// The qcow2 engine refused or failed.
    #[error(transparent)]
    Qcow2(#[from] Box<qcow2::Error>),
    /// Another user holds the image, or a read-write disk's file is not writable.
    #[error(transparent)]
    Lock(#[from] lock::Error),
    /// The cache mode cannot be honoured.
    #[error(transparent)]
    Cache(#[from] cache::Error),
    /// The format name is not one we know.
    #[error("unknown image format {0:?} (expected raw or qcow2)")]
    UnknownFormat(String),
    /// Opening `path` failed.
    #[error("{path}: {source}")]
    Open {
        /// The image that failed to open.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<Error>,
    },
}

impl From<qcow2::Error> for Error {
    fn from(e: qcow2::Error) -> Self {
        Error::Qcow2(Box::new(e))
    }
}

/// Result of disk operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A virtual disk backed by a host file, as seen by a block device: a flat array of bytes.
pub trait DiskImage: Send {
    /// Virtual size of the disk in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from the disk at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` to the disk at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<()>;
    /// Tells the image that a range is no longer needed. Whole clusters read as zeros afterwards
    /// (unless a v2 qcow2 has a backing file); partial clusters are left as they were.
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Makes a range read as zeros, cheaply where the format allows it.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Flushes and lets the image's locks go, so that another process (a live migration's
    /// destination) may take it over; nothing may be written until [`DiskImage::take_back`].
    fn hand_over(&mut self) -> Result<()> {
        self.flush()
    }
    /// Takes the image back after [`DiskImage::hand_over`]: its locks again (refused if
    /// someone else holds the image now), and fresh metadata.
    fn take_back(&mut self) -> Result<()> {
        Ok(())
    }
    /// The qcow2 engine under this image, for internal snapshots and the VM-state area
    /// (savevm); `None` for formats without them.
    fn as_qcow2(&mut self) -> Option<&mut qcow2::Qcow2Image> {
        None
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// On-disk image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A flat file.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Guesses the format from the first bytes of a file (qcow2 magic, else raw).
    pub fn probe(path: &Path) -> Result<ImageFormat> {
        let mut magic = [0u8; 4];
        let mut f = File::open(path)?;
        let mut got = 0;
        while got < 4 {
            let n = f.read(&mut magic[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(if got == 4 && magic == qcow2::header::MAGIC {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        })
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::UnknownFormat(other.to_string())),
        }
    }
}

/// Which backing files an image may name. The defaults are qemu-img's (anything goes); a VM
/// config that serves untrusted images should use [`BackingPolicy::strict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingPolicy {
    /// Allow `..` components in a backing file name.
    pub allow_parent_dirs: bool,
    /// Allow a backing file that is a device node.
    pub allow_devices: bool,
    /// Allow absolute backing file names.
    pub allow_absolute: bool,
    /// Longest backing chain (images below the top one).
    pub max_depth: u32,
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy {
            allow_parent_dirs: true,
            allow_devices: true,
            allow_absolute: true,
            max_depth: 64,
        }
    }
}

impl BackingPolicy {
    /// Backing files must be regular files named relative to the image, without `..`.
    pub fn strict() -> Self {
        BackingPolicy {
            allow_parent_dirs: false,
            allow_devices: false,
            allow_absolute: false,
            max_depth: 16,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Refuse writes (backing files are always opened read-only).
    pub read_only: bool,
    /// What backing files may be.
    pub backing: BackingPolicy,
    /// qcow2 L2 cache size in bytes; `None` for the default (covers at least 8 GiB of disk).
    pub l2_cache_bytes: Option<u64>,
    /// Skip the backing file entirely (for metadata-only work such as `check`).
    pub no_backing: bool,
    /// Host page cache use (QEMU's `cache=`); qcow2 images always use writeback for now.
    pub cache: CacheMode,
    /// QEMU-compatible image locks on the top image (see [`lock`]); [`open`] only.
    pub locking: Locking,
}

/// Opens an image of a known format, or probes it when `format` is `None`.
pub fn open(
    path: &Path,
    format: Option<ImageFormat>,
    opts: &OpenOptions,
) -> Result<Box<dyn DiskImage>> {
    let fmt = match format {
        Some(f) => f,
        None => ImageFormat::probe(path).map_err(|e| wrap(path, e))?,
    };
    match fmt {
        ImageFormat::Raw => Ok(Box::new(
            raw::RawImage::open_with(path, opts).map_err(|e| wrap(path, e))?,
        )),
        ImageFormat::Qcow2 => {
            let access = lock::Access::qcow2_file(opts.read_only);
            let lock = lock::ImageLock::acquire_path(path, access, opts.locking)
                .map_err(|e| wrap(path, e))?;
            if opts.cache != CacheMode::Writeback {
                log::warn!(
                    "{}: qcow2 supports only cache=writeback for now",
                    path.display()
                );
            }
            let img = qcow2::Qcow2Image::open(path, opts).map_err(|e| wrap(path, e))?;
            let (again, again_opts) = (path.to_path_buf(), opts.clone());
            let reopen = Box::new(move || {
                qcow2::Qcow2Image::open(&again, &again_opts).map_err(|e| wrap(&again, e))
            });
            Ok(Box::new(lock::Locked::new(img, lock).with_reopen(reopen)))
        }
    }
}

fn wrap(path: &Path, e: Error) -> Error {
    match e {
        // These already name the path.
        Error::Open { .. } | Error::Lock(_) | Error::Cache(_) => e,
        other => Error::Open {
            path: path.to_path_buf(),
            source: Box::new(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
        assert!(check_range(u64::MAX, 2, 10).is_err());
    }

    #[test]
    fn format_names() {
        assert_eq!("qcow2".parse::<ImageFormat>().unwrap(), ImageFormat::Qcow2);
        assert!("vmdk".parse::<ImageFormat>().is_err());
    }
}
