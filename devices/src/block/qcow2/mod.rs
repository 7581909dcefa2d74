//! The qcow2 engine: QEMU's copy-on-write image format, v2 and v3, read and write.
//!
//! Layout of this module: [`header`] (header and extensions), [`l2cache`] (L2 slice cache),
//! [`refcount`] (refcount blocks), `alloc` (cluster allocation, refcount table growth, deferred
//! frees), `backing` (backing chains and their policy), `compress` (zlib/zstd clusters),
//! `engine` (the read/write/discard paths and the flush ordering), [`snapshot`] (internal
//! snapshots), [`vmstate`] (the VM state area of `savevm` snapshots), [`check`] (consistency
//! check and repair), `resize` and [`create`](mod@create).
//!
//! Crash safety rests on two rules, applied by `engine::flush` and the eviction paths:
//! refcount increments reach the disk (and are synced) before any L1/L2 entry that uses the
//! cluster; refcount decrements are applied only after the L1/L2 entries that dropped the
//! reference are on disk. So a crash at any point leaves on-disk refcounts >= references:
//! at worst leaked clusters, never a cluster in use with a too-low refcount.

mod alloc;
mod backing;
pub mod check;
mod compress;
pub mod create;
mod engine;
pub mod header;
pub mod l2cache;
pub mod refcount;
mod resize;
pub mod snapshot;
pub mod vmstate;

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{DiskImage, OpenOptions};
use header::Header;
use l2cache::L2Cache;
use refcount::Refcounts;
use snapshot::Snapshot;

pub use create::{create, CreateOptions};
pub use header::CompressionType;

/// What can go wrong inside the qcow2 engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The file ends inside a structure.
    #[error("image is truncated: the {0} ends past the end of the file")]
    Truncated(&'static str),
    /// Not a qcow2 file.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// Version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// Cluster size out of range.
    #[error("unsupported cluster_bits {0} (cluster size must be 512 B to 2 MiB)")]
    BadClusterBits(u32),
    /// Bad v3 header_length.
    #[error("invalid header_length {0}")]
    BadHeaderLength(u32),
    /// A feature we deliberately do not implement.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(&'static str),
    /// refcount_order above 6 (or not 4 in v2).
    #[error("invalid refcount_order {0}")]
    BadRefcountOrder(u32),
    /// Unknown or inconsistent compression type.
    #[error("invalid compression type {0}")]
    BadCompressionType(u8),
    /// A header extension runs past the header area.
    #[error("header extension 0x{0:08x} runs past the end of the header cluster")]
    BadExtension(u32),
    /// Incompatible feature bits we don't know.
    #[error("image uses unknown incompatible features: {0}")]
    UnknownIncompatibleFeatures(String),
    /// Backing file name field is unusable.
    #[error("invalid backing file name: {0}")]
    BadBackingName(&'static str),
    /// A table is larger than QEMU allows.
    #[error("{0} table too large ({1} bytes)")]
    TableTooLarge(&'static str, u64),
    /// Virtual size beyond the format's reach.
    #[error("virtual size {0} is too large")]
    SizeTooLarge(u64),
    /// L1 table cannot map the whole virtual size.
    #[error("L1 table with {l1_size} entries is too small for a {size}-byte disk")]
    L1TooSmall {
        /// Entries in the L1 table.
        l1_size: u32,
        /// Virtual size.
        size: u64,
    },
    /// A table offset is misaligned or inside the header.
    #[error("{0} table offset {1:#x} is not cluster aligned or overlaps the header")]
    BadTableOffset(&'static str, u64),
    /// A table lies past the end of the file.
    #[error("{0} table at {1:#x} lies past the end of the file")]
    TablePastEof(&'static str, u64),
    /// refcount_table_clusters is 0.
    #[error("refcount table is empty (refcount_table_clusters = 0)")]
    EmptyRefcountTable,
    /// Too many snapshots.
    #[error("too many snapshots ({0})")]
    TooManySnapshots(u32),
    /// Header, extensions and backing name don't fit in the first cluster.
    #[error("header, extensions and backing file name do not fit in the first cluster")]
    HeaderTooLarge,
    /// A refcount block offset is invalid.
    #[error("refcount block offset {0:#x} is misaligned or past the end of the file")]
    BadRefblockOffset(u64),
    /// A refcount would exceed refcount_bits.
    #[error("refcount of host cluster {0} would overflow")]
    RefcountOverflow(u64),
    /// A refcount would go below zero.
    #[error("refcount of host cluster {0} would drop below zero (image is corrupt)")]
    RefcountUnderflow(u64),
    /// An L1 entry names an invalid L2 table.
    #[error("L1 entry points to an invalid L2 table offset {0:#x}")]
    BadL2Offset(u64),
    /// An L2 entry names an invalid data cluster.
    #[error("guest offset {guest:#x} maps to invalid host offset {host:#x}")]
    BadClusterOffset {
        /// Guest offset of the cluster.
        guest: u64,
        /// Host offset in the L2 entry.
        host: u64,
    },
    /// An L2 entry points at metadata.
    #[error("guest offset {guest:#x} maps to host offset {host:#x}, which holds image metadata")]
    MetadataOverlap {
        /// Guest offset of the cluster.
        guest: u64,
        /// Host offset in the L2 entry.
        host: u64,
    },
    /// A compressed cluster could not be decoded.
    #[error("compressed cluster at host offset {0:#x} is invalid")]
    Decompress(u64),
    /// The image has the corrupt bit set and was opened for writing.
    #[error("image is marked corrupt; open it read-only or repair it")]
    Corrupt,
    /// A write to a read-only image.
    #[error("image is opened read-only")]
    ReadOnly,
    /// Backing chain loops.
    #[error("backing chain loops back to {0}")]
    BackingLoop(PathBuf),
    /// Backing chain too deep.
    #[error("backing chain is deeper than {0} images")]
    BackingTooDeep(u32),
    /// Backing name refused by policy.
    #[error("backing file {name:?} refused: {why}")]
    BackingRefused {
        /// The backing file name.
        name: String,
        /// The policy it broke.
        why: &'static str,
    },
    /// The backing file failed to open.
    #[error("backing file {0}: {1}")]
    Backing(PathBuf, Box<super::Error>),
    /// Bad backing format name.
    #[error("backing format {0:?} is not raw or qcow2")]
    BadBackingFormat(String),
    /// Malformed snapshot table.
    #[error("invalid snapshot table: {0}")]
    BadSnapshotTable(&'static str),
    /// No snapshot with that id or name.
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    /// Snapshot name taken.
    #[error("a snapshot named {0:?} already exists")]
    SnapshotExists(String),
    /// A VM state request beyond [`vmstate::MAX_VM_STATE_BYTES`].
    #[error("VM state request of {len} bytes at position {pos} is beyond the VM state limit")]
    VmStateTooLarge {
        /// Position in the VM state.
        pos: u64,
        /// Bytes requested.
        len: u64,
    },
    /// `loadvm` of a snapshot that has no VM state (QEMU's words).
    #[error("This is a disk-only snapshot. Revert to it  offline using qemu-img")]
    DiskOnlySnapshot(String),
    /// Shrinking is not supported.
    #[error("shrinking from {from} to {to} bytes is not supported")]
    Shrink {
        /// Current size.
        from: u64,
        /// Requested size.
        to: u64,
    },
    /// Size not a multiple of 512.
    #[error("size {0} is not a multiple of 512")]
    UnalignedSize(u64),
    /// Invalid creation parameters.
    #[error("invalid create option: {0}")]
    BadCreateOption(&'static str),
    /// A bug or an impossible state, reported instead of panicking.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Result of qcow2 operations.
pub type Result<T> = std::result::Result<T, Error>;

/// L1 entry: L2 table offset bits.
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry: standard cluster offset bits.
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Entry refers to a cluster with refcount exactly one.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry is compressed.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry reads as zeros (v3).
pub(crate) const OFLAG_ZERO: u64 = 1;

/// Reads exactly `buf.len()` bytes of metadata, failing on a short file.
pub(crate) fn read_meta(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Truncated("metadata")
        } else {
            Error::Io(e)
        }
    })
}

pub(crate) fn decode_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

pub(crate) fn encode_table(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here: backing file or zeros.
    Unallocated,
    /// Reads as zeros; `host` may hold a preallocated cluster (0 if none).
    Zero { host: u64 },
    /// Data at `host`; `copied` when its refcount is one.
    Normal { host: u64, copied: bool },
    /// Compressed bytes at `offset`, at most `len` long.
    Compressed { offset: u64, len: u64 },
}

/// An open qcow2 image.
pub struct Qcow2Image {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) header: Header,
    pub(crate) cs: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_dirty: bool,
    pub(crate) l2: L2Cache,
    pub(crate) rc: Refcounts,
    pub(crate) backing: Option<Box<dyn DiskImage>>,
    pub(crate) read_only: bool,
    /// Physical length of the file as far as we know.
    pub(crate) file_len: u64,
    /// End of the allocated area (may exceed `file_len` until the next flush).
    pub(crate) alloc_end: u64,
    /// Nothing was ever written at or past this offset: fresh clusters there read as zeros.
    pub(crate) written_end: u64,
    /// Host ranges (offset, clusters) whose refcount drops at the next flush.
    pub(crate) pending_free: Vec<(u64, u64)>,
    /// Refcount increments not yet synced to disk.
    pub(crate) rc_unsynced: bool,
    /// Clusters being allocated right now (never used for new refcount blocks).
    pub(crate) alloc_run: (u64, u64),
    /// Host cluster indexes holding metadata (header, tables, refcount blocks, L2 tables).
    pub(crate) metadata: HashSet<u64>,
    pub(crate) snapshots: Vec<Snapshot>,
    /// Last decompressed cluster (L2 entry, data).
    pub(crate) zcache: Option<(u64, Vec<u8>)>,
    /// Next free byte in the cluster that compressed writes are packing, 0 if none.
    pub(crate) compress_cursor: u64,
    /// Lazy refcounts in use: the dirty bit is set while we write.
    pub(crate) lazy: bool,
    pub(crate) marked_dirty: bool,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("size", &self.header.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Default L2 cache: enough to map the whole disk up to 32 MiB of cache, and never less than
/// what maps 8 GiB (QEMU's default coverage).
fn default_l2_cache_bytes(size: u64, cluster_bits: u32) -> u64 {
    let bytes_for = |disk: u64| (disk >> cluster_bits).max(1) * 8;
    bytes_for(8 << 30).max(bytes_for(size).min(32 << 20))
}

impl Qcow2Image {
    /// Opens a qcow2 image.
    pub fn open(path: &Path, opts: &OpenOptions) -> super::Result<Self> {
        Ok(Self::open_chain(path, opts, &mut Vec::new())?)
    }

    pub(crate) fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)?;
        let file_len = file.metadata()?.len();
        let mut first = vec![0u8; file_len.min(2 << 20) as usize];
        read_meta(&file, &mut first, 0)?;
        let header = Header::parse(&first, file_len)?;
        drop(first);
        let read_only = opts.read_only;
        if !read_only && header.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
            return Err(Error::Corrupt);
        }
        if !read_only
            && header
                .extensions
                .iter()
                .any(|e| e.kind == header::EXT_BITMAPS)
        {
            return Err(Error::Unsupported(
                "writing to images with persistent bitmaps",
            ));
        }
        let cs = header.cluster_size();
        let mut l1_buf = vec![0u8; header.l1_size as usize * 8];
        read_meta(&file, &mut l1_buf, header.l1_table_offset)?;
        let l1 = decode_table(&l1_buf);
        let mut rt_buf = vec![0u8; (u64::from(header.refcount_table_clusters) * cs) as usize];
        read_meta(&file, &mut rt_buf, header.refcount_table_offset)?;
        let rtable = decode_table(&rt_buf);
        let snapshots = snapshot::read_table(&file, &header, file_len)?;

        let l2_bytes = opts
            .l2_cache_bytes
            .unwrap_or_else(|| default_l2_cache_bytes(header.size, header.cluster_bits));
        let slice_bytes = l2cache::slice_entries(header.cluster_bits) * 8;
        let rc_blocks = ((256u64 << 10) / cs).max(4) as usize;
        let alloc_end = file_len.next_multiple_of(cs);
        let mut img = Qcow2Image {
            rc: Refcounts::new(
                header.refcount_order,
                header.cluster_bits,
                rtable,
                rc_blocks,
            ),
            l2: L2Cache::new((l2_bytes / slice_bytes) as usize),
            file,
            path: path.to_path_buf(),
            cs,
            l1,
            l1_dirty: false,
            backing: None,
            read_only,
            file_len,
            alloc_end,
            written_end: alloc_end,
            pending_free: Vec::new(),
            rc_unsynced: false,
            alloc_run: (0, 0),
            metadata: HashSet::new(),
            snapshots,
            zcache: None,
            compress_cursor: 0,
            lazy: !read_only && header.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            marked_dirty: false,
            header,
        };
        img.rebuild_metadata_set();
        if !opts.no_backing {
            img.backing = backing::open_backing(&img, opts, chain)?;
        }
        if !read_only {
            if img.header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
                // Refcounts may be stale after a crash with lazy refcounts: rebuild them.
                check::check(&mut img, check::Repair::All, &mut |_, _| {})?;
                img.header.incompatible_features &= !header::INCOMPAT_DIRTY;
                img.write_header()?;
            }
            if img.header.autoclear_features != 0 {
                img.header.autoclear_features = 0;
                img.write_header()?;
            }
        }
        Ok(img)
    }

    /// Opens `path` read-only with snapshot `name` (id or name) as the visible disk.
    pub fn open_snapshot(path: &Path, name: &str, opts: &OpenOptions) -> super::Result<Self> {
        let mut o = opts.clone();
        o.read_only = true;
        let mut img = Self::open(path, &o)?;
        img.view_snapshot(name)?;
        Ok(img)
    }

    /// The header as read (or last written).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Path of the image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Physical size of the image file.
    pub fn file_length(&self) -> u64 {
        self.file_len.max(self.alloc_end)
    }

    /// Recomputes the set of host clusters that hold metadata.
    pub(crate) fn rebuild_metadata_set(&mut self) {
        let cs = self.cs;
        let cb = self.header.cluster_bits;
        let mut m = HashSet::new();
        m.insert(0);
        let add_range = |m: &mut HashSet<u64>, off: u64, bytes: u64| {
            let first = off >> cb;
            let n = bytes.div_ceil(cs).min(1 << 24);
            for c in first..first + n {
                m.insert(c);
            }
        };
        add_range(
            &mut m,
            self.header.l1_table_offset,
            self.l1.len() as u64 * 8,
        );
        add_range(
            &mut m,
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
        );
        for e in &self.rc.table {
            let o = e & refcount::REFT_OFFSET_MASK;
            if o != 0 {
                m.insert(o >> cb);
            }
        }
        for e in &self.l1 {
            let o = e & L1E_OFFSET_MASK;
            if o != 0 {
                m.insert(o >> cb);
            }
        }
        if !self.snapshots.is_empty() {
            add_range(
                &mut m,
                self.header.snapshots_offset,
                snapshot::table_bytes(&self.snapshots),
            );
        }
        for s in &self.snapshots {
            add_range(&mut m, s.l1_offset, u64::from(s.l1_size) * 8);
        }
        self.metadata = m;
    }

    /// Writes the whole header (and extensions) to cluster 0.
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let b = self.header.encode()?;
        self.file.write_all_at(&b, 0)?;
        self.file.sync_data()?;
        Ok(())
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.header.size
    }
    fn as_qcow2(&mut self) -> Option<&mut Qcow2Image> {
        Some(self)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> super::Result<()> {
        super::check_range(offset, buf.len() as u64, self.header.size)?;
        Ok(self.read_guest(buf, offset)?)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> super::Result<()> {
        if self.read_only {
            return Err(super::Error::ReadOnly);
        }
        super::check_range(offset, buf.len() as u64, self.header.size)?;
        Ok(self.write_guest(buf, offset)?)
    }

    fn flush(&mut self) -> super::Result<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.flush_all()?)
    }

    fn discard(&mut self, offset: u64, len: u64) -> super::Result<()> {
        if self.read_only {
            return Err(super::Error::ReadOnly);
        }
        super::check_range(offset, len, self.header.size)?;
        Ok(self.discard_range(offset, len, false)?)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> super::Result<()> {
        if self.read_only {
            return Err(super::Error::ReadOnly);
        }
        super::check_range(offset, len, self.header.size)?;
        Ok(self.discard_range(offset, len, true)?)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if !self.read_only {
            // Best effort: a failed flush here leaves at worst leaked clusters.
            if self.flush_all().is_ok() && self.marked_dirty {
                let _ = self.mark_clean();
            }
        }
    }
}
