//! virtio-blk requests: walking a descriptor chain, validating it, and executing it against a
//! `DiskImage`.
//!
//! A request is a readable part (16-byte header, then OUT data or discard/write-zeroes segments)
//! followed by a writable part (IN data or the GET_ID string, then the status byte as the very
//! last writable byte). Framing is free (VIRTIO_F_ANY_LAYOUT is implied by version 1), so both
//! parts are handled as byte streams over their descriptors.
//!
//! Every check happens before any data moves: a chain that is truncated or looped, has a readable
//! descriptor after a writable one, points outside guest memory, has more descriptors than
//! `seg_max + 2` or a descriptor longer than `size_max`, or asks for bytes past the end of the
//! disk gets VIRTIO_BLK_S_IOERR; unknown or unnegotiated request types get
//! VIRTIO_BLK_S_UNSUPP. The used length is the number of bytes written to the writable part
//! (data + status on success, the status byte alone on failure, 0 when there is no valid status
//! byte to write).

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use devices::block::DiskImage;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::stats::{BlockStats, IoKind, IoOutcome};
use super::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use crate::device::feature;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush the write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: read the device id (serial).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: discard sectors.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header.
const HEADER_LEN: u64 = 16;
/// Size of a discard / write-zeroes segment.
const SEGMENT_LEN: u64 = 16;
/// Write-zeroes flag: the device may unmap the range.
const WZ_FLAG_UNMAP: u32 = 1;

/// Request limits, advertised in the config space and enforced here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// Most data descriptors in a request (`seg_max`).
    pub seg_max: u32,
    /// Longest descriptor in bytes (`size_max`).
    pub size_max: u32,
    /// Most sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_seg: u32,
    /// Most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

impl BlockLimits {
    /// The defaults for a queue of `queue_size` descriptors: `seg_max = queue_size - 2`,
    /// 1 MiB descriptors, 1 GiB per discard / write-zeroes segment, 32 segments.
    pub fn for_queue_size(queue_size: u16) -> Self {
        BlockLimits {
            seg_max: u32::from(queue_size.max(3)) - 2,
            size_max: 1 << 20,
            max_discard_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_discard_seg: 32,
            max_write_zeroes_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_write_zeroes_seg: 32,
        }
    }
}

/// Why a request failed; maps to a status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain ends early, loops, or is missing parts.
    #[error("malformed descriptor chain")]
    Malformed,
    /// A readable descriptor follows a writable one, or a part has the wrong length.
    #[error("descriptor with the wrong direction or length")]
    Layout,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// Too many descriptors, or one longer than `size_max`.
    #[error("request exceeds the advertised limits")]
    TooLarge,
    /// The request reaches past the end of the disk, or is not sector-aligned.
    #[error("request outside the disk")]
    OutOfRange,
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The backend failed.
    #[error("disk I/O failed")]
    Io,
    /// Unknown or unnegotiated request type, or unknown flags.
    #[error("unsupported request")]
    Unsupported,
}

impl RequestError {
    /// The status byte for this error.
    pub fn status(self) -> u8 {
        match self {
            RequestError::Unsupported => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A byte stream over a list of guest buffers.
#[derive(Debug, Default, Clone)]
struct Stream {
    segs: Vec<(GuestAddress, u64)>,
    len: u64,
}

impl Stream {
    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.segs.push((addr, u64::from(len)));
            self.len += u64::from(len);
        }
    }

    /// The guest pieces covering `[start, start + len)` of the stream.
    fn pieces(&self, start: u64, len: u64) -> Vec<(GuestAddress, usize)> {
        let mut out = Vec::new();
        let (mut pos, end) = (0u64, start.saturating_add(len));
        for &(addr, seg_len) in &self.segs {
            let (s, e) = (pos.max(start), (pos + seg_len).min(end));
            if s < e {
                // Addresses were validated against guest memory, so this cannot wrap.
                out.push((GuestAddress(addr.0 + (s - pos)), (e - s) as usize));
            }
            pos += seg_len;
            if pos >= end {
                break;
            }
        }
        out
    }

    fn gather<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut done = 0;
        for (addr, n) in self.pieces(start, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + n], addr)
                .map_err(|_| RequestError::BadAddress)?;
            done += n;
        }
        Ok(())
    }
}

/// The parsed shape of a chain.
struct Chain {
    readable: Stream,
    writable: Stream,
}

/// Executes requests for one disk.
pub struct RequestExecutor {
    disk: Box<dyn DiskImage>,
    limits: BlockLimits,
    acked_features: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    bounce: Vec<u8>,
    stats: Arc<BlockStats>,
}

impl RequestExecutor {
    /// An executor over `disk`; `acked_features` gates FLUSH, DISCARD and WRITE_ZEROES. Every
    /// data, flush and discard request is accounted in `stats`.
    pub fn new(
        disk: Box<dyn DiskImage>,
        limits: BlockLimits,
        acked_features: u64,
        serial: [u8; VIRTIO_BLK_ID_BYTES],
        stats: Arc<BlockStats>,
    ) -> Self {
        RequestExecutor {
            disk,
            limits,
            acked_features,
            serial,
            bounce: Vec::new(),
            stats,
        }
    }

    /// The disk (e.g. to flush it when the VM is quiesced).
    pub fn disk_mut(&mut self) -> &mut dyn DiskImage {
        self.disk.as_mut()
    }

    /// Gives the disk back (on reset).
    pub fn into_disk(self) -> Box<dyn DiskImage> {
        self.disk
    }

    /// Executes one chain and returns the used length to report. Never panics and never touches
    /// guest memory outside the chain's buffers.
    pub fn execute<T>(&mut self, mut chain: DescriptorChain<T>) -> u32
    where
        T: Deref,
        T::Target: GuestMemory,
    {
        let descs: Vec<Descriptor> = (&mut chain).take(self.max_descriptors() + 1).collect();
        let mem = chain.memory();
        let parsed = self.parse(mem, &descs);
        let chain_shape = match &parsed {
            Ok(c) => Some(c),
            Err((_, shape)) => shape.as_ref(),
        };
        // The status byte: the last byte of the writable part, if that part is valid memory.
        let Some(status_addr) = chain_shape.and_then(|c| status_address(mem, &c.writable)) else {
            log::warn!("virtio-blk: request without a usable status byte dropped");
            return 0;
        };
        let (status, written) = match parsed {
            Ok(c) => match self.run_accounted(mem, &c) {
                Ok(n) => (VIRTIO_BLK_S_OK, n),
                Err(e) => {
                    log::debug!("virtio-blk: request failed: {e}");
                    (e.status(), 0)
                }
            },
            Err((e, _)) => {
                log::warn!("virtio-blk: bad request: {e}");
                (e.status(), 0)
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    fn max_descriptors(&self) -> usize {
        self.limits.seg_max as usize + 2
    }

    /// Validates the chain's shape. On error, returns the shape when the writable part could
    /// still be determined, so the status can be reported.
    fn parse<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        descs: &[Descriptor],
    ) -> Result<Chain, (RequestError, Option<Chain>)> {
        let mut chain = Chain {
            readable: Stream::default(),
            writable: Stream::default(),
        };
        let mut error = None;
        for d in descs.iter().take(self.max_descriptors()) {
            if d.is_write_only() {
                chain.writable.push(d.addr(), d.len());
            } else if chain.writable.len > 0 {
                error.get_or_insert(RequestError::Layout);
            } else {
                chain.readable.push(d.addr(), d.len());
            }
            if !mem.check_range(d.addr(), d.len() as usize, Permissions::ReadWrite) {
                error.get_or_insert(RequestError::BadAddress);
            }
            if d.len() > self.limits.size_max {
                error.get_or_insert(RequestError::TooLarge);
            }
        }
        match descs.last() {
            None => return Err((RequestError::Malformed, None)),
            // More descriptors than allowed (the extra one was read to find out).
            _ if descs.len() > self.max_descriptors() => {
                return Err((RequestError::TooLarge, Some(chain)));
            }
            // The chain iterator stops early on a bad next index, an unreadable descriptor or a
            // loop (it is bounded by the queue size): the last descriptor still says "next".
            Some(last) if last.has_next() => error = Some(RequestError::Malformed),
            _ => {}
        }
        if chain.readable.len < HEADER_LEN {
            error.get_or_insert(RequestError::Malformed);
        }
        match error {
            None => Ok(chain),
            Some(e) => Err((e, Some(chain))),
        }
    }

    /// Runs a well-formed request and accounts it by kind (GET_ID and unknown types are not
    /// I/O and are not counted); returns the bytes written before the status byte.
    fn run_accounted<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        c: &Chain,
    ) -> Result<u32, RequestError> {
        let started = Instant::now();
        let mut header = [0u8; HEADER_LEN as usize];
        c.readable.gather(mem, 0, &mut header)?;
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let kind = match req_type {
            VIRTIO_BLK_T_IN => IoKind::Read,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_WRITE_ZEROES => IoKind::Write,
            VIRTIO_BLK_T_FLUSH => IoKind::Flush,
            VIRTIO_BLK_T_DISCARD => IoKind::Discard,
            _ => return self.run(mem, c, req_type, sector).map(|(n, _)| n),
        };
        let result = self.run(mem, c, req_type, sector);
        let outcome = match result {
            Ok((_, bytes)) => IoOutcome::Done { bytes },
            Err(RequestError::Io) => IoOutcome::Failed,
            Err(_) => IoOutcome::Invalid,
        };
        let end = match (req_type, outcome) {
            (VIRTIO_BLK_T_OUT, IoOutcome::Done { bytes }) => {
                sector.checked_mul(SECTOR_SIZE).map(|o| o + bytes)
            }
            _ => None,
        };
        self.stats.account(kind, outcome, started.elapsed(), end);
        result.map(|(n, _)| n)
    }

    fn has(&self, bit: u32) -> bool {
        self.acked_features & feature(bit) != 0
    }

    /// Runs a well-formed request of type `req_type` at `sector`; returns the bytes written
    /// before the status byte and the payload bytes the request moved (or discarded).
    fn run<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        c: &Chain,
        req_type: u32,
        sector: u64,
    ) -> Result<(u32, u64), RequestError> {
        // Payload lengths: what follows the header, and what precedes the status byte.
        let out_len = c.readable.len - HEADER_LEN;
        let in_len = c.writable.len.saturating_sub(1);
        match req_type {
            VIRTIO_BLK_T_IN => {
                require(out_len == 0)?;
                let offset = self.data_range(sector, in_len)?;
                self.read(mem, &c.writable, offset, in_len)?;
                Ok((in_len as u32, in_len))
            }
            VIRTIO_BLK_T_OUT => {
                require(in_len == 0)?;
                let offset = self.data_range(sector, out_len)?;
                if self.disk.read_only() {
                    return Err(RequestError::ReadOnly);
                }
                self.write(mem, &c.readable, offset, out_len)?;
                Ok((0, out_len))
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.has(VIRTIO_BLK_F_FLUSH) {
                    return Err(RequestError::Unsupported);
                }
                require(in_len == 0 && out_len == 0)?;
                self.disk.flush().map_err(|_| RequestError::Io)?;
                Ok((0, 0))
            }
            VIRTIO_BLK_T_GET_ID => {
                require(out_len == 0)?;
                let n = in_len.min(VIRTIO_BLK_ID_BYTES as u64) as usize;
                let mut done = 0;
                for (addr, len) in c.writable.pieces(0, n as u64) {
                    mem.write_slice(&self.serial[done..done + len], addr)
                        .map_err(|_| RequestError::BadAddress)?;
                    done += len;
                }
                Ok((n as u32, 0))
            }
            VIRTIO_BLK_T_DISCARD if self.has(VIRTIO_BLK_F_DISCARD) => {
                require(in_len == 0)?;
                let bytes = self.discard_or_zero(mem, &c.readable, out_len, false)?;
                Ok((0, bytes))
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.has(VIRTIO_BLK_F_WRITE_ZEROES) => {
                require(in_len == 0)?;
                let bytes = self.discard_or_zero(mem, &c.readable, out_len, true)?;
                Ok((0, bytes))
            }
            _ => Err(RequestError::Unsupported),
        }
    }

    /// Checks a data transfer of `len` bytes at `sector`; returns its byte offset.
    fn data_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Layout);
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.size() => Ok(offset),
            _ => Err(RequestError::OutOfRange),
        }
    }

    /// IN: reads the disk range in chunks of up to [`IO_CHUNK`] bytes, one backend call per
    /// chunk however scattered the guest buffer is, then scatters each chunk into guest memory.
    fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        to: &Stream,
        offset: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let mut pos = offset;
        let mut group: Vec<(GuestAddress, usize)> = Vec::new();
        let mut fill = 0usize;
        let mut pieces = to.pieces(0, len).into_iter().peekable();
        while let Some((addr, n)) = pieces.next() {
            group.push((addr, n));
            fill += n;
            let full = pieces
                .peek()
                .is_none_or(|&(_, next)| fill + next > IO_CHUNK);
            if !full {
                continue;
            }
            let buf = grow(&mut self.bounce, fill);
            self.disk.read_at(buf, pos).map_err(|_| RequestError::Io)?;
            let mut at = 0;
            for (addr, n) in group.drain(..) {
                mem.write_slice(&self.bounce[at..at + n], addr)
                    .map_err(|_| RequestError::BadAddress)?;
                at += n;
            }
            pos += fill as u64;
            fill = 0;
        }
        Ok(())
    }

    /// OUT: gathers the guest buffer into chunks of up to [`IO_CHUNK`] bytes and writes each
    /// with one backend call (a 1 MiB guest write is one host write, not one per segment).
    fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        from: &Stream,
        offset: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let mut pos = offset;
        let mut fill = 0usize;
        for (addr, n) in from.pieces(HEADER_LEN, len) {
            if fill > 0 && fill + n > IO_CHUNK {
                self.disk
                    .write_at(&self.bounce[..fill], pos)
                    .map_err(|_| RequestError::Io)?;
                pos += fill as u64;
                fill = 0;
            }
            let buf = grow(&mut self.bounce, fill + n);
            mem.read_slice(&mut buf[fill..], addr)
                .map_err(|_| RequestError::BadAddress)?;
            fill += n;
        }
        if fill > 0 {
            self.disk
                .write_at(&self.bounce[..fill], pos)
                .map_err(|_| RequestError::Io)?;
        }
        Ok(())
    }

    /// DISCARD (`zero == false`) or WRITE_ZEROES: every segment is validated before any runs.
    /// Returns the bytes the segments cover.
    fn discard_or_zero<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        from: &Stream,
        len: u64,
        zero: bool,
    ) -> Result<u64, RequestError> {
        let (max_seg, max_sectors) = if zero {
            (
                self.limits.max_write_zeroes_seg,
                self.limits.max_write_zeroes_sectors,
            )
        } else {
            (self.limits.max_discard_seg, self.limits.max_discard_sectors)
        };
        let count = len / SEGMENT_LEN;
        if !len.is_multiple_of(SEGMENT_LEN) || count == 0 {
            return Err(RequestError::Layout);
        }
        if count > u64::from(max_seg) {
            return Err(RequestError::TooLarge);
        }
        let mut raw = vec![0u8; len as usize];
        from.gather(mem, HEADER_LEN, &mut raw)?;
        let mut ranges = Vec::with_capacity(count as usize);
        for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(s);
            let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let allowed = if zero { WZ_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 {
                return Err(RequestError::Unsupported);
            }
            if num > max_sectors {
                return Err(RequestError::TooLarge);
            }
            let bytes = u64::from(num) * SECTOR_SIZE;
            ranges.push((self.data_range(sector, bytes)?, bytes));
        }
        if self.disk.read_only() {
            return Err(RequestError::ReadOnly);
        }
        let mut total = 0u64;
        for (offset, bytes) in ranges {
            let r = if zero {
                self.disk.write_zeroes(offset, bytes)
            } else {
                self.disk.discard(offset, bytes)
            };
            r.map_err(|_| RequestError::Io)?;
            total += bytes;
        }
        Ok(total)
    }
}

/// Most bytes moved by one backend call of a data request.
const IO_CHUNK: usize = 2 << 20;

/// The first `n` bytes of the bounce buffer, growing it as needed.
fn grow(bounce: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if bounce.len() < n {
        bounce.resize(n, 0);
    }
    &mut bounce[..n]
}

fn require(ok: bool) -> Result<(), RequestError> {
    if ok {
        Ok(())
    } else {
        Err(RequestError::Layout)
    }
}

/// The address of the last writable byte, if it lies in guest memory.
fn status_address<M: GuestMemory + ?Sized>(mem: &M, writable: &Stream) -> Option<GuestAddress> {
    let &(addr, len) = writable.segs.last()?;
    let status = addr.0.checked_add(len - 1).map(GuestAddress)?;
    mem.check_range(status, 1, Permissions::Write)
        .then_some(status)
}
