//! The live migration stream (`docs/state-format.md`, "Live migration"): the state file's
//! header (with [`FLAG_LIVE`]) and section framing, guest RAM sent round after round in page
//! sections, the machine state last, and one answer back from the destination.
//!
//! ```text
//! source -> destination   header | CONF | MEMD | (PASS | PAGE | SYNC)* | STAT | END_
//! destination -> source   SYNC (one per SYNC received)* | OKAY | FAIL (a UTF-8 reason)
//! PAGE payload            gpa u64 | pages u32 | kind u32 (0 zeros, 1 data) | data (pages * 4 KiB)
//! PASS payload            pass number u64
//! ```
//!
//! Everything read is checked like a state file: lengths are bounded before anything is
//! allocated, every section's crc is checked, and every page run must lie inside one RAM
//! region of the announced layout.

use std::io::{self, Read, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::snapshot::format::{
    self, FormatError, MemRegion, FLAG_LIVE, MAX_META_LEN, PAGE_SIZE, TAG_CONF, TAG_END, TAG_MEMD,
    TAG_STAT,
};
use virtio::GuestMemoryMmap;

/// A run of pages.
pub const TAG_PAGE: [u8; 4] = *b"PAGE";
/// The start of a round.
pub const TAG_PASS: [u8; 4] = *b"PASS";
/// The source asks the destination to say when it has everything sent so far; the
/// destination answers with the same section (the same number).
pub const TAG_SYNC: [u8; 4] = *b"SYNC";
/// The destination has the VM and runs it.
pub const TAG_OKAY: [u8; 4] = *b"OKAY";
/// The destination refused the VM; the payload says why.
pub const TAG_FAIL: [u8; 4] = *b"FAIL";

/// The most pages a data section carries (1 MiB).
pub const MAX_DATA_PAGES: u32 = 256;
/// Bytes before a page section's data.
const PAGE_PREFIX: usize = 16;
/// The most a FAIL reason may be.
const MAX_REASON: u64 = 4096;

/// What a page section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Pages of zeros: no data follows.
    Zero,
    /// The pages' bytes follow.
    Data,
}

fn prefix(gpa: u64, pages: u32, kind: PageKind) -> [u8; PAGE_PREFIX] {
    let mut p = [0u8; PAGE_PREFIX];
    p[..8].copy_from_slice(&gpa.to_le_bytes());
    p[8..12].copy_from_slice(&pages.to_le_bytes());
    let k: u32 = match kind {
        PageKind::Zero => 0,
        PageKind::Data => 1,
    };
    p[12..].copy_from_slice(&k.to_le_bytes());
    p
}

/// Writes the source's side of the stream and counts what it wrote.
pub struct StreamWriter<W: Write> {
    w: W,
    /// Bytes written so far.
    pub bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Wraps `w`.
    pub fn new(w: W) -> Self {
        StreamWriter { w, bytes: 0 }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn section(&mut self, tag: [u8; 4], payload: &[u8]) -> io::Result<()> {
        self.put(&format::section_header(
            tag,
            payload.len() as u64,
            format::crc(payload),
        ))?;
        self.put(payload)
    }

    /// The header, the configuration and the memory layout.
    pub fn start(&mut self, config: &[u8], regions: &[MemRegion]) -> io::Result<()> {
        self.put(&format::header(FLAG_LIVE))?;
        self.section(TAG_CONF, config)?;
        self.section(TAG_MEMD, &format::encode_memd(regions, 0))
    }

    /// Marks the start of round `pass`.
    pub fn pass(&mut self, pass: u64) -> io::Result<()> {
        self.section(TAG_PASS, &pass.to_le_bytes())
    }

    /// Asks the destination to confirm that it processed everything up to here.
    pub fn sync(&mut self, seq: u64) -> io::Result<()> {
        self.section(TAG_SYNC, &seq.to_le_bytes())?;
        self.w.flush()
    }

    /// A run of `pages` pages of zeros at `gpa`.
    pub fn zero_pages(&mut self, gpa: u64, pages: u32) -> io::Result<()> {
        self.section(TAG_PAGE, &prefix(gpa, pages, PageKind::Zero))
    }

    /// A run of pages with their bytes (`data.len()` a multiple of the page size, at most
    /// [`MAX_DATA_PAGES`] pages).
    pub fn data_pages(&mut self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let pages = (data.len() as u64 / PAGE_SIZE) as u32;
        let p = prefix(gpa, pages, PageKind::Data);
        let mut h = crc32fast::Hasher::new();
        h.update(&p);
        h.update(data);
        let len = (PAGE_PREFIX + data.len()) as u64;
        self.put(&format::section_header(TAG_PAGE, len, h.finalize()))?;
        self.put(&p)?;
        self.put(data)
    }

    /// The machine state and the end marker; flushes.
    pub fn finish(&mut self, state: &[u8]) -> io::Result<()> {
        self.section(TAG_STAT, state)?;
        self.section(TAG_END, &0u32.to_le_bytes())?;
        self.w.flush()
    }

    /// Flushes what is buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// The writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// One item of the stream, as the destination reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// A round begins.
    Pass(u64),
    /// Pages were stored into guest memory.
    Pages {
        /// Guest address of the first.
        gpa: u64,
        /// How many.
        pages: u32,
        /// Zeros or data.
        kind: PageKind,
    },
    /// The source waits for this number to come back ([`send_sync`]).
    Sync(u64),
    /// The machine state (the payload, crc checked).
    State(Vec<u8>),
}

/// Reads the source's side of the stream, checking each section.
pub struct StreamReader<R: Read> {
    r: R,
    buf: Vec<u8>,
    regions: Vec<MemRegion>,
    state_seen: bool,
    /// Bytes read so far.
    pub bytes: u64,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header, the configuration and the memory layout; returns the
    /// reader and the configuration's payload.
    pub fn open(mut r: R) -> Result<(Self, Vec<u8>, Vec<MemRegion>), FormatError> {
        let flags = format::read_header(&mut r)?;
        if flags != FLAG_LIVE {
            return Err(FormatError::Malformed(
                "not a live migration stream (a state file?)".into(),
            ));
        }
        let config = format::meta_section(&mut r, TAG_CONF)?;
        let memd = format::meta_section(&mut r, TAG_MEMD)?;
        let (regions, _) = format::parse_memd(&memd)?;
        let bytes = 24 + 32 + config.len() as u64 + memd.len() as u64;
        Ok((
            StreamReader {
                r,
                buf: Vec::new(),
                regions: regions.clone(),
                state_seen: false,
                bytes,
            },
            config,
            regions,
        ))
    }

    fn read(&mut self, n: usize, what: &str) -> Result<(), FormatError> {
        self.buf.clear();
        self.buf.resize(n, 0);
        format::read_exact(&mut self.r, &mut self.buf, what)?;
        self.bytes += n as u64;
        Ok(())
    }

    fn region_of(&self, gpa: u64, len: u64) -> Option<MemRegion> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
            .copied()
    }

    /// Reads the next item, storing pages into `mem` (whose layout must be the stream's).
    /// Returns `None` at the end marker, which must follow the state.
    pub fn next(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Item>, FormatError> {
        let mut h = [0u8; 16];
        format::read_exact(&mut self.r, &mut h, "a section header")?;
        self.bytes += 16;
        let tag: [u8; 4] = [h[0], h[1], h[2], h[3]];
        let len = u64::from_le_bytes(h[4..12].try_into().unwrap_or_default());
        let want_crc = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
        let name = format::tag_name(tag);
        let max = match tag {
            TAG_PASS | TAG_SYNC => 8,
            TAG_PAGE => PAGE_PREFIX as u64 + u64::from(MAX_DATA_PAGES) * PAGE_SIZE,
            TAG_STAT => MAX_META_LEN,
            TAG_END => 4,
            _ => {
                return Err(FormatError::Malformed(format!(
                    "unexpected section {name} in a live migration stream"
                )))
            }
        };
        if len > max {
            return Err(FormatError::Malformed(format!(
                "section {name} claims {len} bytes (at most {max})"
            )));
        }
        if self.state_seen && tag != TAG_END {
            return Err(FormatError::Malformed(format!(
                "section {name} after the machine state"
            )));
        }
        if tag == TAG_PAGE {
            return self.pages(mem, len, want_crc).map(Some);
        }
        self.read(len as usize, &format!("section {name}"))?;
        if format::crc(&self.buf) != want_crc {
            return Err(FormatError::Checksum(format!("section {name}")));
        }
        let bad = |m: String| FormatError::Malformed(m);
        let number = |buf: &[u8]| -> Result<u64, FormatError> {
            buf.try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| bad(format!("a {name} section must hold 8 bytes")))
        };
        match tag {
            TAG_PASS => Ok(Some(Item::Pass(number(&self.buf)?))),
            TAG_SYNC => Ok(Some(Item::Sync(number(&self.buf)?))),
            TAG_STAT => {
                self.state_seen = true;
                Ok(Some(Item::State(std::mem::take(&mut self.buf))))
            }
            _ => {
                if !self.state_seen {
                    return Err(bad("the stream ends before the machine state".into()));
                }
                if self.buf != 0u32.to_le_bytes() {
                    return Err(bad("bad end marker".into()));
                }
                Ok(None)
            }
        }
    }

    /// A PAGE section of `len` bytes: its prefix is checked first, then the pages' bytes are
    /// read straight into guest RAM (which no vCPU runs on yet) and their crc checked there.
    fn pages(
        &mut self,
        mem: &GuestMemoryMmap,
        len: u64,
        want_crc: u32,
    ) -> Result<Item, FormatError> {
        let bad = |m: String| FormatError::Malformed(m);
        if len < PAGE_PREFIX as u64 {
            return Err(bad("a PAGE section is too short".into()));
        }
        let mut p = [0u8; PAGE_PREFIX];
        format::read_exact(&mut self.r, &mut p, "section PAGE")?;
        self.bytes += PAGE_PREFIX as u64;
        let gpa = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
        let pages = u32::from_le_bytes(p[8..12].try_into().unwrap_or_default());
        let kind = match u32::from_le_bytes(p[12..16].try_into().unwrap_or_default()) {
            0 => PageKind::Zero,
            1 => PageKind::Data,
            k => return Err(bad(format!("page kind {k}"))),
        };
        let bytes = u64::from(pages) * PAGE_SIZE;
        if pages == 0 || !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(bad(format!("a page run of {pages} pages at {gpa:#x}")));
        }
        if self.region_of(gpa, bytes).is_none() {
            return Err(bad(format!(
                "pages {gpa:#x}+{bytes:#x} lie outside guest RAM"
            )));
        }
        let data_len = len - PAGE_PREFIX as u64;
        let mut h = crc32fast::Hasher::new();
        h.update(&p);
        match kind {
            PageKind::Data if data_len == bytes => {
                let slice = mem
                    .get_slice(GuestAddress(gpa), bytes as usize)
                    .map_err(|e| bad(format!("guest memory: {e}")))?;
                // SAFETY: the slice is `bytes` of guest RAM that `get_slice` checked lies in one
                // mapped region; no vCPU of the VM that will use it runs yet and its devices
                // are not built, so nothing else reads or writes it while this reference lives.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(slice.ptr_guard_mut().as_ptr(), bytes as usize)
                };
                format::read_exact(&mut self.r, dst, "section PAGE")?;
                self.bytes += bytes;
                h.update(dst);
            }
            PageKind::Zero if data_len == 0 => {}
            _ => {
                return Err(bad(format!(
                    "a page run of {pages} pages carries {data_len} bytes"
                )))
            }
        }
        if h.finalize() != want_crc {
            return Err(FormatError::Checksum("section PAGE".into()));
        }
        if kind == PageKind::Zero {
            zero_range(mem, gpa, bytes)?;
        }
        Ok(Item::Pages { gpa, pages, kind })
    }
}

/// Makes `[gpa, gpa + len)` read as zeros, giving its pages back to the host.
fn zero_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), FormatError> {
    let bad = |m: String| FormatError::Malformed(m);
    let region = mem
        .find_region(GuestAddress(gpa))
        .ok_or_else(|| bad(format!("{gpa:#x} is not guest RAM")))?;
    let offset = gpa - region.start_addr().0;
    if offset + len > region.len() {
        return Err(bad(format!("pages {gpa:#x}+{len:#x} cross a region end")));
    }
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .map_err(|e| bad(format!("guest memory: {e}")))?;
    // SAFETY: [host, host + len) is guest RAM of a VM that does not run yet (the destination
    // fills it before any vCPU or device of the VM exists to use it); nothing holds a reference
    // into it. On private anonymous memory MADV_DONTNEED makes the range read as zeros (KVM,
    // which may already have it in a memory slot, follows through its MMU notifier).
    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if r != 0 {
        // Not anonymous memory after all: write the zeros.
        let zeros = vec![0u8; len as usize];
        mem.write_slice(&zeros, GuestAddress(gpa))
            .map_err(|e| bad(format!("guest memory: {e}")))?;
    }
    Ok(())
}

/// Sends the destination's answer: `Ok` when it runs the VM, `Err(reason)` when it refused it.
pub fn send_answer<W: Write>(w: &mut W, answer: Result<(), &str>) -> io::Result<()> {
    let (tag, payload) = match answer {
        Ok(()) => (TAG_OKAY, &[][..]),
        Err(reason) => {
            let cut = reason.len().min(MAX_REASON as usize);
            let mut end = cut;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            (TAG_FAIL, &reason.as_bytes()[..end])
        }
    };
    format::write_section(w, tag, payload)?;
    w.flush()
}

/// The destination's reply to a [`Item::Sync`].
pub fn send_sync<W: Write>(w: &mut W, seq: u64) -> io::Result<()> {
    format::write_section(w, TAG_SYNC, &seq.to_le_bytes())?;
    w.flush()
}

/// Waits for the destination's reply to the source's SYNC `seq`.
pub fn read_sync<R: Read>(r: &mut R, seq: u64) -> Result<(), FormatError> {
    let mut h = [0u8; 16];
    format::read_exact(r, &mut h, "the destination's sync")?;
    let tag: [u8; 4] = [h[0], h[1], h[2], h[3]];
    let len = u64::from_le_bytes(h[4..12].try_into().unwrap_or_default());
    if tag == TAG_FAIL && len <= MAX_REASON {
        let mut reason = vec![0u8; len as usize];
        format::read_exact(r, &mut reason, "the destination's answer")?;
        return Err(FormatError::Malformed(format!(
            "the destination gave up: {}",
            String::from_utf8_lossy(&reason)
        )));
    }
    let mut b = [0u8; 8];
    if tag != TAG_SYNC || len != 8 {
        return Err(FormatError::Malformed(format!(
            "the destination answered {} instead of SYNC",
            format::tag_name(tag)
        )));
    }
    format::read_exact(r, &mut b, "the destination's sync")?;
    if u64::from_le_bytes(b) != seq {
        return Err(FormatError::Malformed(
            "the destination's sync is out of step".into(),
        ));
    }
    Ok(())
}

/// Reads the destination's answer.
pub fn read_answer<R: Read>(r: &mut R) -> Result<Result<(), String>, FormatError> {
    let mut h = [0u8; 16];
    format::read_exact(r, &mut h, "the destination's answer")?;
    let tag: [u8; 4] = [h[0], h[1], h[2], h[3]];
    let len = u64::from_le_bytes(h[4..12].try_into().unwrap_or_default());
    let want_crc = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
    if (tag != TAG_OKAY && tag != TAG_FAIL) || len > MAX_REASON {
        return Err(FormatError::Malformed(format!(
            "the destination answered {} ({len} bytes)",
            format::tag_name(tag)
        )));
    }
    let mut payload = vec![0u8; len as usize];
    format::read_exact(r, &mut payload, "the destination's answer")?;
    if format::crc(&payload) != want_crc {
        return Err(FormatError::Checksum("the destination's answer".into()));
    }
    Ok(match tag {
        TAG_OKAY => Ok(()),
        _ => Err(String::from_utf8_lossy(&payload).into_owned()),
    })
}

/// The layout of `mem` as stream regions.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<MemRegion> {
    mem.iter()
        .map(|r| MemRegion {
            gpa: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
