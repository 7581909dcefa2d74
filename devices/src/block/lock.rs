//! Who may open an image, and how: QEMU-compatible image locks and the write-permission check.
//!
//! The locks follow QEMU's `block/file-posix.c` byte for byte, so that this VMM, QEMU, qemu-img
//! and qemu-io see each other: open file description (OFD) locks on single bytes, shared
//! (`F_RDLCK`) only, on byte `100 + bit` for each permission held and on byte `200 + bit` for
//! each permission not shared with others. Before trusting its own locks an opener tests, with
//! `F_OFD_GETLK` and a write lock, that nobody else holds `200 + bit` for a permission it wants
//! or `100 + bit` for one it refuses to share. Locking first and testing second means two
//! openers racing both see each other and both fail, never both succeed.
//!
//! OFD locks belong to the open file description, so they live exactly as long as the open file,
//! and a second open of the same image in this process conflicts like another process would.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::DiskImage;

/// What can go wrong when claiming an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Someone else holds a conflicting lock.
    #[error(
        "{} is in use by another process (locked: {locked}); is QEMU, qemu-img or another VMM \
         (or another disk of this VM) using it? Stop that user first, or make every user \
         read-only",
        path.display()
    )]
    InUse {
        /// The image.
        path: PathBuf,
        /// The permissions that conflict.
        locked: Perms,
    },
    /// A read-write disk on a file that cannot be written.
    #[error(
        "{} cannot be opened read-write: {why}; make it writable or configure the disk read-only",
        path.display()
    )]
    ReadOnlyFile {
        /// The image.
        path: PathBuf,
        /// Why it is not writable.
        why: &'static str,
    },
    /// Locking itself failed (and locking was required).
    #[error("cannot lock {}: {source} (set locking off to run without image locks)", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// The fcntl failure.
        #[source]
        source: io::Error,
    },
}

/// Whether to take image locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Locking {
    /// Lock; if the file system does not support OFD locks, warn and go on unlocked (QEMU's
    /// `locking=auto`).
    #[default]
    Auto,
    /// Lock, and fail if the file system cannot.
    On,
    /// Take no locks and check none (for images that something else coordinates).
    Off,
}

/// A set of QEMU block permissions (`BLK_PERM_*` in `include/block/block-common.h`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms(u8);

impl Perms {
    /// `BLK_PERM_CONSISTENT_READ`: reads see a self-consistent disk.
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// `BLK_PERM_WRITE`: may change the visible contents.
    pub const WRITE: Perms = Perms(1 << 1);
    /// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the visible contents unchanged.
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// `BLK_PERM_RESIZE`: may change the size.
    pub const RESIZE: Perms = Perms(1 << 3);
    /// `BLK_PERM_ALL`.
    pub const ALL: Perms = Perms(0x0f);
    /// No permission.
    pub const NONE: Perms = Perms(0);
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Whether every permission of `other` is in `self`.
    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions not in `self`.
    pub fn complement(self) -> Perms {
        Perms(!self.0 & Self::ALL.0)
    }

    /// The bit numbers in the set, lowest first.
    fn bits(self) -> impl Iterator<Item = u32> {
        (0..4).filter(move |b| self.0 & (1 << b) != 0)
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        Perms(self.0 | rhs.0)
    }
}

impl fmt::Display for Perms {
    /// QEMU's `bdrv_perm_names` spelling: "write, resize".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for b in self.bits() {
            if !first {
                f.write_str(", ")?;
            }
            f.write_str(Self::NAMES[b as usize])?;
            first = false;
        }
        Ok(())
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perms({self})")
    }
}

/// Byte locked for each permission held.
pub const PERM_BASE: u64 = 100;
/// Byte locked for each permission not shared.
pub const SHARED_BASE: u64 = 200;

/// What an opener holds on the host file and what it lets others hold at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Permissions held.
    pub perm: Perms,
    /// Permissions others may hold too.
    pub shared: Perms,
}

impl Access {
    /// A virtio-blk drive on a raw image, as QEMU's `blkconf_apply_backend_options` sets it and
    /// the raw format passes it to the file: reads (and writes unless read-only), sharing
    /// everything but write. So read-only drives coexist, and any writer excludes everyone.
    pub fn raw_drive(read_only: bool) -> Access {
        let mut perm = Perms::CONSISTENT_READ;
        if !read_only {
            perm = perm | Perms::WRITE;
        }
        Access {
            perm,
            shared: Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED | Perms::RESIZE,
        }
    }

    /// The file under a qcow2 drive (QEMU's `bdrv_default_perms_for_storage`): metadata may be
    /// rewritten and the file grows, so a writer also holds resize, and nobody else may write
    /// or resize it, even while we only read.
    pub fn qcow2_file(read_only: bool) -> Access {
        let mut perm = Perms::CONSISTENT_READ;
        if !read_only {
            perm = perm | Perms::WRITE | Perms::RESIZE;
        }
        Access {
            perm,
            shared: Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED,
        }
    }

    /// Bytes this access locks.
    fn lock_bytes(self) -> impl Iterator<Item = u64> {
        let held = self.perm.bits().map(|b| PERM_BASE + u64::from(b));
        let unshared = self
            .shared
            .complement()
            .bits()
            .map(|b| SHARED_BASE + u64::from(b));
        held.chain(unshared)
    }
}

/// Locks held on an image; released when dropped (with the last descriptor of its open file).
#[derive(Debug)]
pub struct ImageLock {
    /// A descriptor of the open file description that owns the locks.
    file: File,
    access: Access,
    /// The image, for messages.
    path: PathBuf,
    /// Whether the locks are held now (they are let go while another process, the
    /// destination of a live migration, takes the image over).
    held: bool,
}

impl ImageLock {
    /// Takes `access`'s locks on `file` (its open file description) and checks that nobody
    /// else conflicts. Returns `None` when locking is off, or is `Auto` on a file system
    /// without OFD locks.
    pub fn acquire(
        file: &File,
        path: &Path,
        access: Access,
        mode: Locking,
    ) -> Result<Option<ImageLock>, Error> {
        if mode == Locking::Off {
            return Ok(None);
        }
        let fd = file.as_raw_fd();
        let unsupported = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
            )
        };
        let fail = |source: io::Error| Error::Lock {
            path: path.to_path_buf(),
            source,
        };
        for byte in access.lock_bytes() {
            if let Err(e) = set_lock(fd, byte, libc::F_RDLCK as libc::c_short) {
                unlock_all(fd);
                if mode == Locking::Auto && unsupported(&e) {
                    log::warn!(
                        "{}: image locking unavailable ({e}); continuing without it",
                        path.display()
                    );
                    return Ok(None);
                }
                // Someone holds an exclusive lock on one of QEMU's bytes: not QEMU (it only
                // takes shared ones), but still a user that does not want company.
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                    return Err(Error::InUse {
                        path: path.to_path_buf(),
                        locked: access.perm | access.shared.complement(),
                    });
                }
                return Err(fail(e));
            }
        }
        match conflicts(fd, access) {
            Ok(c) if c.is_empty() => {}
            Ok(locked) => {
                unlock_all(fd);
                return Err(Error::InUse {
                    path: path.to_path_buf(),
                    locked,
                });
            }
            Err(e) => {
                unlock_all(fd);
                return Err(fail(e));
            }
        }
        let file = file.try_clone().map_err(fail)?;
        Ok(Some(ImageLock {
            file,
            access,
            path: path.to_path_buf(),
            held: true,
        }))
    }

    /// Lets every lock go, so that another process may take the image over (QEMU inactivates
    /// its images the same way at a migration's switchover). The caller stops writing first.
    pub fn hand_over(&mut self) {
        unlock_all(self.file.as_raw_fd());
        self.held = false;
    }

    /// Takes the locks back after [`ImageLock::hand_over`]; fails, holding nothing, when
    /// someone else took the image meanwhile.
    pub fn take_back(&mut self) -> Result<(), Error> {
        if self.held {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let fail = |source: io::Error| Error::Lock {
            path: self.path.clone(),
            source,
        };
        for byte in self.access.lock_bytes() {
            if let Err(e) = set_lock(fd, byte, libc::F_RDLCK as libc::c_short) {
                unlock_all(fd);
                return Err(fail(e));
            }
        }
        match conflicts(fd, self.access) {
            Ok(c) if c.is_empty() => {
                self.held = true;
                Ok(())
            }
            Ok(locked) => {
                unlock_all(fd);
                Err(Error::InUse {
                    path: self.path.clone(),
                    locked,
                })
            }
            Err(e) => {
                unlock_all(fd);
                Err(fail(e))
            }
        }
    }

    /// Opens `path` only to hold locks on it (for images whose engine opens its own file):
    /// read-write when the image will be written, so that an unwritable file is refused here
    /// with a clear message.
    pub fn acquire_path(
        path: &Path,
        access: Access,
        mode: Locking,
    ) -> Result<Option<ImageLock>, super::Error> {
        let read_only = !access.perm.contains(Perms::WRITE);
        let file = open_checked(path, read_only, 0)?;
        Ok(Self::acquire(&file, path, access, mode)?)
    }

    /// What the lock holds and shares.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The descriptor holding the locks.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Permissions that other users of `file` hold in conflict with `access`: locks on
/// `200 + bit` for bits we want, on `100 + bit` for bits we do not share.
pub fn conflicts(fd: libc::c_int, access: Access) -> io::Result<Perms> {
    let mut found = Perms::NONE;
    for b in access.perm.bits() {
        if test_lock(fd, SHARED_BASE + u64::from(b))? {
            found = found | Perms(1 << b);
        }
    }
    for b in access.shared.complement().bits() {
        if test_lock(fd, PERM_BASE + u64::from(b))? {
            found = found | Perms(1 << b);
        }
    }
    Ok(found)
}

fn flock(l_type: libc::c_short, byte: u64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (and l_pid must be 0 for
    // F_OFD_* commands).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn set_lock(fd: libc::c_int, byte: u64, l_type: libc::c_short) -> io::Result<()> {
    let fl = flock(l_type, byte);
    // SAFETY: F_OFD_SETLK reads the flock struct, which lives across the call.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock that a write lock on `byte` would hit.
fn test_lock(fd: libc::c_int, byte: u64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: F_OFD_GETLK reads and rewrites the flock struct, which lives across the call.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn unlock_all(fd: libc::c_int) {
    for byte in Perms::ALL
        .bits()
        .flat_map(|b| [PERM_BASE + u64::from(b), SHARED_BASE + u64::from(b)])
    {
        // Unlocking cannot conflict; a failure leaves a lock that dies with the file anyway.
        let _ = set_lock(fd, byte, libc::F_UNLCK as libc::c_short);
    }
}

/// Refuses a read-write open of a file without write permission bits. We run as root, for whom
/// `open(O_RDWR)` ignores the mode, but a read-only mode is still the owner saying "do not
/// write": QEMU run as an ordinary user would be refused too.
pub fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), Error> {
    if meta.file_type().is_file() && meta.permissions().mode() & 0o222 == 0 {
        return Err(Error::ReadOnlyFile {
            path: path.to_path_buf(),
            why: "the file has no write permission bits",
        });
    }
    Ok(())
}

/// Refuses a read-write open of a block device that the kernel marks read-only (`BLKROGET`).
pub fn check_block_device_writable(path: &Path, file: &File) -> Result<(), Error> {
    vmm_sys_util::ioctl_io_nr!(BLKROGET, 0x12, 94);
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one c_int through the pointer, which points to a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET(), &mut ro) };
    if r == 0 && ro != 0 {
        return Err(Error::ReadOnlyFile {
            path: path.to_path_buf(),
            why: "the block device is read-only",
        });
    }
    Ok(())
}

/// Opens an image file read-only or read-write with extra `open(2)` flags, refusing files that
/// cannot be written (mode bits, read-only file systems, access denied, read-only devices)
/// with [`Error::ReadOnlyFile`].
pub fn open_checked(path: &Path, read_only: bool, flags: libc::c_int) -> super::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !read_only {
        // A missing file is reported by open() below.
        if let Ok(meta) = std::fs::metadata(path) {
            check_mode(path, &meta)?;
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            let why = match e.raw_os_error() {
                _ if read_only => None,
                Some(libc::EROFS) => Some("the file system is read-only"),
                Some(libc::EACCES | libc::EPERM) => Some("write access is denied"),
                Some(libc::ETXTBSY) => Some("the file is busy (an executable being run?)"),
                _ => None,
            };
            match why {
                Some(why) => super::Error::from(Error::ReadOnlyFile {
                    path: path.to_path_buf(),
                    why,
                }),
                None => super::Error::Io(e),
            }
        })?;
    if !read_only && file.metadata()?.file_type().is_block_device() {
        check_block_device_writable(path, &file)?;
    }
    Ok(file)
}

/// Opens an image again (after another process may have changed it).
pub type Reopen<T> = Box<dyn Fn() -> super::Result<T> + Send>;

/// An image whose engine owns its file, plus the locks that keep others off it.
pub struct Locked<T> {
    inner: T,
    lock: Option<ImageLock>,
    reopen: Option<Reopen<T>>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locked")
            .field("inner", &self.inner)
            .field("lock", &self.lock)
            .finish()
    }
}

impl<T: DiskImage> Locked<T> {
    /// Ties `lock` to `inner`'s lifetime.
    pub fn new(inner: T, lock: Option<ImageLock>) -> Self {
        Locked {
            inner,
            lock,
            reopen: None,
        }
    }

    /// How to open the image again when it is taken back after a hand-over: the engine's
    /// cached metadata may be stale by then.
    pub fn with_reopen(mut self, reopen: Reopen<T>) -> Self {
        self.reopen = Some(reopen);
        self
    }

    /// The image.
    pub fn inner(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: DiskImage> DiskImage for Locked<T> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> super::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> super::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> super::Result<()> {
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> super::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> super::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn as_qcow2(&mut self) -> Option<&mut super::qcow2::Qcow2Image> {
        self.inner.as_qcow2()
    }
    fn hand_over(&mut self) -> super::Result<()> {
        self.inner.flush()?;
        if let Some(l) = &mut self.lock {
            l.hand_over();
        }
        Ok(())
    }
    fn take_back(&mut self) -> super::Result<()> {
        if let Some(l) = &mut self.lock {
            l.take_back()?;
        }
        if let Some(reopen) = &self.reopen {
            self.inner = reopen()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
