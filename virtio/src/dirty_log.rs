//! The dirty log vhost writes while a live migration runs: one bit per 4 KiB guest page,
//! indexed by guest physical address (`log_base + page / 8`, bit `page % 8`, as the kernel's
//! `log_write` sets it). The kernel's vhost workers write guest memory without KVM or
//! `vm-memory` seeing it; the migration ORs this log with theirs.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::device::GuestMemoryMmap;

const PAGE: u64 = 4096;

/// A bitmap vhost sets bits in; zeroed as it is harvested.
pub struct VhostLog {
    base: *mut AtomicU64,
    words: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through atomics.
unsafe impl Send for VhostLog {}
// SAFETY: as above.
unsafe impl Sync for VhostLog {}

impl VhostLog {
    /// A log covering every page of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> io::Result<VhostLog> {
        let end = mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        let pages = end.div_ceil(PAGE);
        let words = pages.div_ceil(64).max(1) as usize;
        let len = words * 8;
        // SAFETY: a new private anonymous mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(VhostLog {
            base: p.cast(),
            words,
        })
    }

    /// The address to give vhost (`VHOST_SET_LOG_BASE`).
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.words);
        // SAFETY: `i` is below `words`; the mapping holds `words` aligned u64s for as long as
        // `self` lives.
        unsafe { &*self.base.add(i) }
    }

    /// Marks the pages of `[gpa, gpa + len)` (what a test of the harvest needs).
    pub fn mark(&self, gpa: u64, len: u64) {
        let mut p = gpa / PAGE;
        while p * PAGE < gpa + len {
            if (p / 64) < self.words as u64 {
                self.word((p / 64) as usize)
                    .fetch_or(1 << (p % 64), Ordering::SeqCst);
            }
            p += 1;
        }
    }

    /// The pages written since the last harvest, one bitmap per region of `mem` (bit `i` of
    /// a region's bitmap is its page `i`); clears them.
    pub fn harvest(&self, mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
        let all: Vec<u64> = (0..self.words)
            .map(|i| self.word(i).swap(0, Ordering::SeqCst))
            .collect();
        mem.iter()
            .map(|r| {
                let first = r.start_addr().0 / PAGE;
                let pages = r.len() / PAGE;
                let mut out = vec![0u64; pages.div_ceil(64) as usize];
                if first.is_multiple_of(64) {
                    let w0 = (first / 64) as usize;
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = all.get(w0 + i).copied().unwrap_or(0);
                    }
                    // Bits past the region's end belong to what follows it.
                    if !pages.is_multiple_of(64) {
                        if let Some(last) = out.last_mut() {
                            *last &= (1u64 << (pages % 64)) - 1;
                        }
                    }
                } else {
                    for i in 0..pages {
                        let p = first + i;
                        let set = all
                            .get((p / 64) as usize)
                            .is_some_and(|w| w & (1 << (p % 64)) != 0);
                        if set {
                            out[(i / 64) as usize] |= 1 << (i % 64);
                        }
                    }
                }
                out
            })
            .collect()
    }
}

impl Drop for VhostLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, which nothing uses any more (vhost was told to
        // stop logging before the last reference went).
        unsafe { libc::munmap(self.base.cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn harvest_maps_pages_to_regions_and_clears() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x50_000),
            (GuestAddress(0x100_000), 0x100_000),
            (GuestAddress(0x300_1000), 0x10_000),
        ])
        .unwrap();
        let log = VhostLog::new(&mem).unwrap();
        log.mark(0x1000, 2);
        log.mark(0x4f_fff, 2); // the last page of region 0 and the first page after it
        log.mark(0x100_000 + 65 * 4096, 4096);
        log.mark(0x300_1000 + 3 * 4096, 1);
        let got = log.harvest(&mem);
        // Page 80 lies between regions 0 and 1: in none.
        assert_eq!(got[0], vec![1 << 1, 1 << (79 - 64)]);
        assert_eq!(got[1][1], 1 << 1);
        assert_eq!(got[2], vec![1 << 3]);
        assert!(
            log.harvest(&mem).iter().flatten().all(|&w| w == 0),
            "harvest clears"
        );
    }
}
