//! Host page-cache policy for disk images, named as QEMU names it (`cache=writeback|none|unsafe`),
//! and the aligned I/O that `cache=none` needs: O_DIRECT only accepts buffers, offsets and
//! lengths aligned to the device's logical block size, so requests go through a reusable,
//! page-aligned bounce buffer with read-modify-write of unaligned heads and tails.

use std::alloc::{self, Layout};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::ptr::NonNull;

/// What can go wrong when choosing or applying a cache mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cache mode name is not one we know.
    #[error("unknown cache mode {0:?} (expected writeback, none or unsafe)")]
    UnknownMode(String),
    /// The file system refuses O_DIRECT (open fails with EINVAL, or no alignment works).
    #[error(
        "cache=none needs O_DIRECT, which the filesystem of {} does not support (tmpfs?); \
         use cache=writeback",
        path.display()
    )]
    NoDirectIo {
        /// The image.
        path: PathBuf,
    },
}

/// How an image uses the host page cache. Guest-visible durability is the same for `Writeback`
/// and `None` (a guest flush becomes `fdatasync`); `Unsafe` drops guest flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CacheMode {
    /// Normal page-cache I/O; flush is `fdatasync`.
    #[default]
    Writeback,
    /// O_DIRECT: reads and writes bypass the host page cache; flush still runs `fdatasync` so
    /// that file system metadata and the device's volatile write cache reach stable storage.
    None,
    /// Page-cache I/O and flush is a no-op: fast, and a host crash loses data.
    Unsafe,
}

impl CacheMode {
    /// The name QEMU uses for `cache=`.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// Whether the file is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        self == CacheMode::None
    }

    /// Whether a guest flush reaches the host file system (`fdatasync`).
    pub fn syncs(self) -> bool {
        self != CacheMode::Unsafe
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(Error::UnknownMode(other.to_string())),
        }
    }
}

/// Memory alignment of every bounce buffer: a page, which satisfies any logical block size we
/// accept, so only the request alignment has to be probed.
pub const BUF_ALIGN: usize = 4096;
/// Request alignments tried, smallest first.
pub const ALIGNMENTS: [usize; 4] = [512, 1024, 2048, 4096];
/// Size of the bounce buffer: large requests are split into chunks of this size.
pub const BOUNCE_BYTES: usize = 1 << 20;

/// A zeroed, page-aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`BUF_ALIGN`]; `len` must be a non-zero multiple
    /// of it.
    pub fn new(len: usize) -> Self {
        assert!(
            len > 0 && len.is_multiple_of(BUF_ALIGN),
            "bad bounce buffer size {len}"
        );
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        // A multiple of a power-of-two alignment never overflows isize here (checked by callers
        // through `new`'s assertion and the small constants used).
        Layout::from_size_align(len, BUF_ALIGN).expect("valid bounce buffer layout")
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// Logical block size of a block device (`BLKSSZGET`).
pub fn logical_block_size(file: &File) -> io::Result<usize> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which points to a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Finds the smallest request alignment that O_DIRECT reads on `file` accept, as QEMU's
/// `raw_probe_alignment` does: an aligned read of the first `align` bytes for each candidate.
/// A file shorter than the candidate cannot tell (reads past EOF succeed unchecked), so an
/// empty file gets the largest alignment. `None` means nothing worked.
pub fn probe_alignment(file: &File, size: u64) -> io::Result<Option<usize>> {
    if size == 0 {
        return Ok(Some(BUF_ALIGN));
    }
    let mut buf = AlignedBuf::new(BUF_ALIGN);
    for align in ALIGNMENTS {
        match file.read_at(&mut buf.as_mut_slice()[..align], 0) {
            Ok(_) => return Ok(Some(align)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn align_down(x: u64, align: usize) -> u64 {
    x & !(align as u64 - 1)
}

fn is_aligned(x: u64, align: usize) -> bool {
    x & (align as u64 - 1) == 0
}

/// I/O on an O_DIRECT file through a bounce buffer. Requests may have any offset and length;
/// they must lie below the file's last whole aligned block (writes would otherwise extend the
/// file to the next multiple of the alignment).
#[derive(Debug)]
pub struct DirectIo {
    align: usize,
    buf: AlignedBuf,
}

impl DirectIo {
    /// Aligned I/O with request alignment `align` (a power of two up to [`BUF_ALIGN`]).
    pub fn new(align: usize) -> Self {
        assert!(align.is_power_of_two() && align <= BUF_ALIGN);
        DirectIo {
            align,
            buf: AlignedBuf::new(BOUNCE_BYTES),
        }
    }

    /// The request alignment in use.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Reads `out.len()` bytes at `offset`; bytes past the end of the file read as zeros.
    pub fn read_at(&mut self, file: &File, out: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + out.len() as u64;
        let mut pos = offset;
        while pos < end {
            let start = align_down(pos, self.align);
            let stop = (end.next_multiple_of(self.align as u64)).min(start + BOUNCE_BYTES as u64);
            let n = (stop - start) as usize;
            self.fill(file, start, n)?;
            let take = (end.min(stop) - pos) as usize;
            let from = (pos - start) as usize;
            let at = (pos - offset) as usize;
            out[at..at + take].copy_from_slice(&self.buf.as_slice()[from..from + take]);
            pos += take as u64;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, reading back unaligned head and tail blocks first.
    pub fn write_at(&mut self, file: &File, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let align = self.align as u64;
        let mut pos = offset;
        while pos < end {
            let start = align_down(pos, self.align);
            let stop = end.next_multiple_of(align).min(start + BOUNCE_BYTES as u64);
            let upto = end.min(stop);
            let n = (stop - start) as usize;
            // Read-modify-write the blocks the data covers only partly.
            let tail_block = align_down(upto, self.align);
            if pos != start {
                self.fill_at(file, 0, start, self.align)?;
            }
            if !is_aligned(upto, self.align) && (tail_block != start || pos == start) {
                self.fill_at(file, (tail_block - start) as usize, tail_block, self.align)?;
            }
            let take = (upto - pos) as usize;
            let from = (pos - start) as usize;
            let at = (pos - offset) as usize;
            self.buf.as_mut_slice()[from..from + take].copy_from_slice(&data[at..at + take]);
            file.write_all_at(&self.buf.as_slice()[..n], start)?;
            pos = upto;
        }
        Ok(())
    }

    /// Fills the first `n` bytes of the bounce buffer from `offset`.
    fn fill(&mut self, file: &File, offset: u64, n: usize) -> io::Result<()> {
        self.fill_at(file, 0, offset, n)
    }

    /// Fills `buf[at..at + n]` from the file at `offset`, zero-filling past the end of file.
    fn fill_at(&mut self, file: &File, at: usize, offset: u64, n: usize) -> io::Result<()> {
        let buf = &mut self.buf.as_mut_slice()[at..at + n];
        let mut done = 0;
        while done < n {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(k) => {
                    done += k;
                    // A short read that ends unaligned can only be the end of the file; asking
                    // again from there would be an unaligned (refused) O_DIRECT read.
                    if done % self.align != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }
}

/// A scratch directory for tests on a disk file system (not /tmp, which may be tmpfs).
#[cfg(test)]
pub(crate) fn test_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/block-tests");
    let d = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| PathBuf::from(t).join("block-tests"))
        .unwrap_or(d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn names_roundtrip() {
        for m in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe] {
            assert_eq!(m.name().parse::<CacheMode>().unwrap(), m);
            assert_eq!(m.to_string(), m.name());
        }
        assert_eq!(CacheMode::default(), CacheMode::Writeback);
        let e = "directsync".parse::<CacheMode>().unwrap_err().to_string();
        assert!(e.contains("directsync") && e.contains("writeback"), "{e}");
        assert!(CacheMode::None.direct() && !CacheMode::Writeback.direct());
        assert!(!CacheMode::Unsafe.syncs() && CacheMode::None.syncs());
    }

    #[test]
    fn aligned_buffer_is_page_aligned() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[8191] = 7;
        assert_eq!(b.as_slice()[8191], 7);
    }

    /// Direct I/O at every awkward offset/length against a model, across chunk boundaries.
    #[test]
    fn direct_io_unaligned_matches_model() {
        let path = test_dir().join(format!("direct-model-{}", std::process::id()));
        let size = 3 * BOUNCE_BYTES + 8192;
        let mut model: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &model).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let align = probe_alignment(&file, size as u64).unwrap().unwrap();
        let mut io = DirectIo::new(align);
        let cases: &[(usize, usize)] = &[
            (0, 1),
            (1, 1),
            (511, 2),
            (100, 5000),
            (4095, 4097),
            (BOUNCE_BYTES - 3, 10),
            (BOUNCE_BYTES - 4096, BOUNCE_BYTES + 8192 + 1),
            (7, 2 * BOUNCE_BYTES + 13),
            (size - 1, 1),
            (size - 700, 700),
            (4096, 4096),
        ];
        for (n, &(off, len)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|i| (i + n * 31) as u8 ^ 0x5a).collect();
            io.write_at(&file, &data, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&data);
            let mut back = vec![0u8; len + 9];
            let roff = off.saturating_sub(4);
            let rlen = (len + 9).min(size - roff);
            io.read_at(&file, &mut back[..rlen], roff as u64).unwrap();
            assert_eq!(&back[..rlen], &model[roff..roff + rlen], "case {n}");
        }
        drop(file);
        assert!(std::fs::read(&path).unwrap() == model);
        std::fs::remove_file(&path).unwrap();
    }
}
