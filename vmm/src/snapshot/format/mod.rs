//! The VM state stream: one versioned format for snapshot files, live migration and savevm.
//! Documented in `docs/state-format.md`.
//!
//! ```text
//! header   magic "\x89VMSTATE\r\n\x1a\n" (12) | version u32 | flags u32 | crc32 of the above u32
//! section  tag [u8; 4] | payload length u64 | crc32 of the payload u32 | payload
//! ```
//!
//! Sections come in a fixed order: `CONF` (the VM configuration, JSON), `STAT` (vCPU, VM and
//! device state, JSON), `MEMD` (the memory layout), `PAD_` (zeros, so that the page data
//! starts on a page boundary and can be mapped), `MEMP` (guest RAM, region after region) and
//! `END_`. All numbers are little-endian. Every section but `MEMP` is checked against its crc
//! when read; `MEMP`'s crc is checked when memory is read eagerly (a stream), not when a file
//! is mapped lazily (that would read all of it before the guest runs).
//!
//! Everything read back is treated as hostile: lengths are bounded before anything is
//! allocated, and every failure is a [`FormatError`], never a panic.

use std::io::{self, Read, Seek, SeekFrom, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use virtio::GuestMemoryMmap;

/// The first bytes of every state stream. The high-bit byte and the CR LF / ^Z / LF catch
/// transfers that mangle binary data, as PNG's signature does.
pub const MAGIC: [u8; 12] = *b"\x89VMSTATE\r\n\x1a\n";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;
/// Guest pages as the stream stores them.
pub const PAGE_SIZE: u64 = 4096;
/// The largest `CONF`, `STAT`, `MEMD` or `PAD_` payload accepted (allocation bound).
pub(crate) const MAX_META_LEN: u64 = 64 << 20;
/// At most this many memory regions.
const MAX_REGIONS: u32 = 64;
const HEADER_LEN: u64 = 24;
/// Header flag of a live migration stream (`docs/state-format.md`, "Live migration").
pub(crate) const FLAG_LIVE: u32 = 1;
/// The `END_` payload: how many sections precede it.
const SECTIONS_BEFORE_END: u32 = 5;

pub(crate) const TAG_CONF: [u8; 4] = *b"CONF";
pub(crate) const TAG_STAT: [u8; 4] = *b"STAT";
pub(crate) const TAG_MEMD: [u8; 4] = *b"MEMD";
const TAG_PAD: [u8; 4] = *b"PAD_";
const TAG_MEMP: [u8; 4] = *b"MEMP";
pub(crate) const TAG_END: [u8; 4] = *b"END_";

/// Why a stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not a state stream at all.
    #[error("not a vmm state file (bad magic)")]
    BadMagic,
    /// Written by a newer vmm.
    #[error(
        "the state was written in format version {found}, newer than this vmm reads \
         (up to {FORMAT_VERSION}); use a newer vmm"
    )]
    NewerVersion {
        /// The stream's version.
        found: u32,
    },
    /// The stream ends early.
    #[error("the state is truncated (in {0})")]
    Truncated(String),
    /// A checksum does not match.
    #[error("the state is corrupted: the {0} checksum does not match")]
    Checksum(String),
    /// A structural rule is broken.
    #[error("the state is malformed: {0}")]
    Malformed(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One RAM region in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest physical start.
    pub gpa: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
}

/// Where guest RAM is in a stream that was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// The regions, in stream order.
    pub regions: Vec<MemRegion>,
    /// Absolute offset of the page data (a multiple of [`PAGE_SIZE`]).
    pub data_offset: u64,
    /// crc32 of the page data.
    pub data_crc: u32,
}

impl MemoryLayout {
    /// Total bytes of RAM.
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

/// A parsed stream: the metadata payloads (checked) and where memory is.
#[derive(Debug)]
pub struct Parsed {
    /// `CONF` payload.
    pub config: Vec<u8>,
    /// `STAT` payload.
    pub state: Vec<u8>,
    /// The memory layout.
    pub memory: MemoryLayout,
}

/// What writing memory did, for `query-migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    /// RAM bytes in all.
    pub total: u64,
    /// Pages that were all zeros (left as holes).
    pub zero_pages: u64,
    /// Pages with data.
    pub data_pages: u64,
}

pub(crate) fn crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

pub(crate) fn section_header(tag: [u8; 4], len: u64, crc: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&tag);
    h[4..12].copy_from_slice(&len.to_le_bytes());
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

pub(crate) fn write_section<W: Write>(w: &mut W, tag: [u8; 4], payload: &[u8]) -> io::Result<()> {
    w.write_all(&section_header(tag, payload.len() as u64, crc(payload)))?;
    w.write_all(payload)
}

/// The host bytes of every RAM region.
///
/// The caller guarantees nothing writes guest memory while the slices live (vCPUs paused,
/// devices quiesced on this thread).
fn region_slices(mem: &GuestMemoryMmap) -> Vec<(MemRegion, &[u8])> {
    mem.iter()
        .map(|r| {
            let len = r.len() as usize;
            // SAFETY: the region maps `len` bytes at `as_ptr()` for as long as `mem` lives,
            // which outlives the returned borrow; nothing writes it meanwhile (see above).
            let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr() as *const u8, len) };
            (
                MemRegion {
                    gpa: r.start_addr().0,
                    len: r.len(),
                },
                bytes,
            )
        })
        .collect()
}

/// The `MEMD` payload: region count, page size, each region's start and length, the crc of the
/// page data (0 in a live stream, whose pages are checked section by section).
pub(crate) fn encode_memd(regions: &[MemRegion], data_crc: u32) -> Vec<u8> {
    let mut memd = Vec::with_capacity(12 + regions.len() * 16);
    memd.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    memd.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    for r in regions {
        memd.extend_from_slice(&r.gpa.to_le_bytes());
        memd.extend_from_slice(&r.len.to_le_bytes());
    }
    memd.extend_from_slice(&data_crc.to_le_bytes());
    memd
}

/// Whether a page is all zeros.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The stream header with `flags` (0 for a state file, [`FLAG_LIVE`] for a live migration).
pub(crate) fn header(flags: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&flags.to_le_bytes());
    let hcrc = crc(&header);
    header.extend_from_slice(&hcrc.to_le_bytes());
    header
}

/// Reads and checks a stream header; returns its flags.
pub(crate) fn read_header<R: Read>(r: &mut R) -> Result<u32, FormatError> {
    let mut h = [0u8; HEADER_LEN as usize];
    read_exact(r, &mut h[..MAGIC.len()], "the header")?;
    if h[..MAGIC.len()] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    read_exact(r, &mut h[MAGIC.len()..], "the header")?;
    let version = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let flags = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    let hcrc = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
    if crc(&h[..20]) != hcrc {
        return Err(FormatError::Checksum("header".into()));
    }
    if version > FORMAT_VERSION {
        return Err(FormatError::NewerVersion { found: version });
    }
    if version == 0 {
        return Err(FormatError::Malformed(format!("version {version}")));
    }
    Ok(flags)
}

/// Writes a whole stream: configuration, state and guest RAM. Pages of zeros are skipped by
/// seeking (a hole in a file); `w` must start at offset 0 of the stream.
pub fn write_stream<W: Write + Seek>(
    w: &mut W,
    config: &[u8],
    state: &[u8],
    mem: &GuestMemoryMmap,
) -> Result<MemStats, FormatError> {
    w.write_all(&header(0))?;
    write_section(w, TAG_CONF, config)?;
    write_section(w, TAG_STAT, state)?;

    let regions = region_slices(mem);
    let mut stats = MemStats::default();
    let mut data_crc = crc32fast::Hasher::new();
    // The crc over the page data is computed up front: it goes in MEMD, before the data.
    for (_, bytes) in &regions {
        data_crc.update(bytes);
    }
    let data_crc = data_crc.finalize();
    let layout: Vec<MemRegion> = regions.iter().map(|(r, _)| *r).collect();
    write_section(w, TAG_MEMD, &encode_memd(&layout, data_crc))?;

    // PAD_ so that MEMP's payload starts on a page boundary.
    let here = w.stream_position()?;
    let after_two_headers = here + 32;
    let pad = (PAGE_SIZE - after_two_headers % PAGE_SIZE) % PAGE_SIZE;
    write_section(w, TAG_PAD, &vec![0u8; pad as usize])?;

    let total: u64 = regions.iter().map(|(r, _)| r.len).sum();
    w.write_all(&section_header(TAG_MEMP, total, data_crc))?;
    let data_start = w.stream_position()?;
    debug_assert_eq!(data_start % PAGE_SIZE, 0);
    let mut pos = data_start;
    for (_, bytes) in &regions {
        // Runs of non-zero pages are written in one call; zero pages are skipped.
        let mut run_start: Option<usize> = None;
        let pages = bytes.len() / PAGE_SIZE as usize;
        for p in 0..=pages {
            let zero = p == pages || {
                let page = &bytes[p * PAGE_SIZE as usize..(p + 1) * PAGE_SIZE as usize];
                is_zero(page)
            };
            match (zero, run_start) {
                (false, None) => run_start = Some(p),
                (true, Some(s)) => {
                    let off = pos + (s as u64) * PAGE_SIZE;
                    w.seek(SeekFrom::Start(off))?;
                    w.write_all(&bytes[s * PAGE_SIZE as usize..p * PAGE_SIZE as usize])?;
                    stats.data_pages += (p - s) as u64;
                    run_start = None;
                }
                _ => {}
            }
            if zero && p < pages {
                stats.zero_pages += 1;
            }
        }
        pos += bytes.len() as u64;
    }
    stats.total = total;
    w.seek(SeekFrom::Start(pos))?;
    write_section(w, TAG_END, &SECTIONS_BEFORE_END.to_le_bytes())?;
    w.flush()?;
    Ok(stats)
}

pub(crate) fn read_exact<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &str,
) -> Result<(), FormatError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FormatError::Truncated(what.to_string()),
        _ => FormatError::Io(e),
    })
}

pub(crate) fn tag_name(tag: [u8; 4]) -> String {
    tag.iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

/// Reads a section header and checks it is `want`.
pub(crate) fn section<R: Read>(r: &mut R, want: [u8; 4]) -> Result<(u64, u32), FormatError> {
    let name = tag_name(want);
    let mut h = [0u8; 16];
    read_exact(r, &mut h, &format!("the {name} section header"))?;
    let tag: [u8; 4] = [h[0], h[1], h[2], h[3]];
    if tag != want {
        return Err(FormatError::Malformed(format!(
            "expected section {name}, found {}",
            tag_name(tag)
        )));
    }
    let len = u64::from_le_bytes(h[4..12].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
    Ok((len, crc))
}

/// Reads a metadata section's payload and checks its crc.
pub(crate) fn meta_section<R: Read>(r: &mut R, want: [u8; 4]) -> Result<Vec<u8>, FormatError> {
    let name = tag_name(want);
    let (len, want_crc) = section(r, want)?;
    if len > MAX_META_LEN {
        return Err(FormatError::Malformed(format!(
            "section {name} claims {len} bytes (at most {MAX_META_LEN})"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact(r, &mut payload, &format!("section {name}"))?;
    if crc(&payload) != want_crc {
        return Err(FormatError::Checksum(format!("section {name}")));
    }
    Ok(payload)
}

pub(crate) fn parse_memd(p: &[u8]) -> Result<(Vec<MemRegion>, u32), FormatError> {
    let bad = |m: &str| FormatError::Malformed(format!("memory layout: {m}"));
    let u32_at = |o: usize| -> Result<u32, FormatError> {
        p.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| bad("too short"))
    };
    let u64_at = |o: usize| -> Result<u64, FormatError> {
        p.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .ok_or_else(|| bad("too short"))
    };
    let count = u32_at(0)?;
    if count == 0 || count > MAX_REGIONS {
        return Err(bad(&format!("{count} regions")));
    }
    if u64::from(u32_at(4)?) != PAGE_SIZE {
        return Err(bad("unsupported page size"));
    }
    let mut regions = Vec::with_capacity(count as usize);
    let mut end_prev = 0u64;
    for i in 0..count as usize {
        let gpa = u64_at(8 + i * 16)?;
        let len = u64_at(16 + i * 16)?;
        if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad("a region is empty or not page-aligned"));
        }
        let end = gpa
            .checked_add(len)
            .ok_or_else(|| bad("a region wraps around"))?;
        if gpa < end_prev {
            return Err(bad("regions overlap or are out of order"));
        }
        end_prev = end;
        regions.push(MemRegion { gpa, len });
    }
    let crc_off = 8 + count as usize * 16;
    let data_crc = u32_at(crc_off)?;
    if p.len() != crc_off + 4 {
        return Err(bad("trailing bytes"));
    }
    Ok((regions, data_crc))
}

/// Reads and checks a stream's header and metadata. Memory is skipped (its layout and offset
/// are returned); `len` is the stream's length, so a truncated file is refused here rather
/// than when the guest touches a page that is not there.
pub fn parse<R: Read + Seek>(r: &mut R, len: u64) -> Result<Parsed, FormatError> {
    let (config, state, memory) = parse_metadata(r)?;
    let total = memory.total();
    let end_of_data = memory
        .data_offset
        .checked_add(total)
        .ok_or_else(|| FormatError::Malformed("memory size overflows".into()))?;
    if end_of_data > len {
        return Err(FormatError::Truncated("guest memory".into()));
    }
    r.seek(SeekFrom::Start(end_of_data))?;
    read_end(r)?;
    Ok(Parsed {
        config,
        state,
        memory,
    })
}

/// Reads the header and the sections up to the start of the page data.
pub fn parse_metadata<R: Read>(r: &mut R) -> Result<(Vec<u8>, Vec<u8>, MemoryLayout), FormatError> {
    let flags = read_header(r)?;
    if flags == FLAG_LIVE {
        return Err(FormatError::Malformed(
            "this is a live migration stream, not a state file".into(),
        ));
    }
    if flags != 0 {
        return Err(FormatError::Malformed(format!("flags {flags:#x}")));
    }
    let config = meta_section(r, TAG_CONF)?;
    let state = meta_section(r, TAG_STAT)?;
    let memd = meta_section(r, TAG_MEMD)?;
    let (regions, data_crc) = parse_memd(&memd)?;
    let mut offset =
        HEADER_LEN + 3 * 16 + config.len() as u64 + state.len() as u64 + memd.len() as u64;
    let pad = meta_section(r, TAG_PAD)?;
    if pad.iter().any(|&b| b != 0) {
        return Err(FormatError::Malformed("padding is not zero".into()));
    }
    offset += 16 + pad.len() as u64;
    let (mem_len, mem_crc) = section(r, TAG_MEMP)?;
    offset += 16;
    let memory = MemoryLayout {
        regions,
        data_offset: offset,
        data_crc,
    };
    if mem_len != memory.total() || mem_crc != data_crc {
        return Err(FormatError::Malformed(
            "the memory section does not match the memory layout".into(),
        ));
    }
    if !offset.is_multiple_of(PAGE_SIZE) {
        return Err(FormatError::Malformed(
            "guest memory does not start on a page boundary".into(),
        ));
    }
    Ok((config, state, memory))
}

/// Reads the page data from a stream positioned at its start into `mem` (whose regions must
/// match `layout`), checking its crc, then the end marker.
pub fn read_memory<R: Read>(
    r: &mut R,
    layout: &MemoryLayout,
    mem: &GuestMemoryMmap,
) -> Result<(), FormatError> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in &layout.regions {
        let mut done = 0u64;
        while done < region.len {
            let n = (region.len - done).min(buf.len() as u64) as usize;
            read_exact(r, &mut buf[..n], "guest memory")?;
            hasher.update(&buf[..n]);
            mem.write_slice(&buf[..n], GuestAddress(region.gpa + done))
                .map_err(|e| FormatError::Malformed(format!("guest memory: {e}")))?;
            done += n as u64;
        }
    }
    if hasher.finalize() != layout.data_crc {
        return Err(FormatError::Checksum("guest memory".into()));
    }
    read_end(r)
}

/// Reads the `END_` section that closes every stream and checks its marker.
fn read_end<R: Read>(r: &mut R) -> Result<(), FormatError> {
    let end = meta_section(r, TAG_END)?;
    if end != SECTIONS_BEFORE_END.to_le_bytes() {
        return Err(FormatError::Malformed("bad end marker".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
