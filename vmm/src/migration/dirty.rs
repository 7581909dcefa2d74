//! Which guest pages changed since the last look: KVM's dirty log (what the vCPUs wrote) ORed
//! with the bitmaps `vm-memory` keeps of what the VMM itself wrote (a disk read, a received
//! frame, a used ring), and with vhost's log (what the kernel's vhost workers wrote). A page
//! only one of them saw is still dirty: a page the VMM wrote behind KVM's back would otherwise
//! arrive stale at the destination.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use virtio::{GuestMemoryMmap, GuestRegionMmap};

/// The bitmap of what the VMM wrote to a region.
fn written(region: &GuestRegionMmap) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// One bit per 4 KiB page of a RAM region, in 64-bit words (bit `i % 64` of word `i / 64`).
pub type PageBitmap = Vec<u64>;

/// KVM dirty logging switched on for every RAM slot; switched off again when dropped.
pub struct DirtyLog {
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    on: bool,
}

fn set_logging(fd: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), String> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| e.to_string())?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the same slot, range and host mapping the VM registered at creation (slot
        // numbers are region indices, see `Vm::with_memory`); only the flags change. The
        // mapping outlives the VM.
        unsafe { fd.set_user_memory_region(r) }
            .map_err(|e| format!("cannot switch KVM dirty logging on slot {slot}: {e}"))?;
    }
    Ok(())
}

impl DirtyLog {
    /// Switches dirty logging on and forgets what the VMM wrote before: from now on every
    /// write is seen.
    pub fn start(fd: Arc<VmFd>, mem: GuestMemoryMmap) -> Result<DirtyLog, String> {
        for region in mem.iter() {
            written(region).reset();
        }
        set_logging(&fd, &mem, true)?;
        Ok(DirtyLog { fd, mem, on: true })
    }

    /// The pages written since `start` or the previous call, one bitmap per region, and
    /// clears them: KVM's log and the VMM's bitmaps.
    pub fn harvest(&self) -> Result<Vec<PageBitmap>, String> {
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut bits = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| format!("cannot read KVM's dirty log of slot {slot}: {e}"))?;
            let ours = written(region).get_and_reset();
            for (w, o) in bits.iter_mut().zip(ours) {
                *w |= o;
            }
            out.push(bits);
        }
        Ok(out)
    }

    /// Switches logging off now (also done when dropped).
    pub fn stop(mut self) -> Result<(), String> {
        self.on = false;
        set_logging(&self.fd, &self.mem, false)
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if self.on {
            if let Err(e) = set_logging(&self.fd, &self.mem, false) {
                log::warn!("migration: {e}");
            }
        }
    }
}

/// How many pages a set of bitmaps marks.
pub fn count(bitmaps: &[PageBitmap]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// ORs `more` into `into` (same layout).
pub fn merge(into: &mut [PageBitmap], more: &[PageBitmap]) {
    for (a, b) in into.iter_mut().zip(more) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// The runs of set bits in `bits` (pages `[start, start + len)`), each at most `max` long,
/// limited to `pages` pages.
pub fn runs(bits: &[u64], pages: u64, max: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut p = 0u64;
    std::iter::from_fn(move || {
        let set = |i: u64| {
            bits.get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        };
        // Skip clear bits a word at a time where the word is empty.
        while p < pages && !set(p) {
            if p.is_multiple_of(64) && bits.get((p / 64) as usize) == Some(&0) {
                p += 64;
            } else {
                p += 1;
            }
        }
        if p >= pages {
            return None;
        }
        let start = p;
        while p < pages && set(p) && p - start < max {
            p += 1;
        }
        Some((start, p - start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn runs_split_at_gaps_and_at_the_maximum() {
        let mut bits = vec![0u64; 3];
        for p in [0, 1, 2, 63, 64, 65, 130] {
            bits[p / 64] |= 1 << (p % 64);
        }
        let r: Vec<_> = runs(&bits, 192, 2).collect();
        assert_eq!(r, vec![(0, 2), (2, 1), (63, 2), (65, 1), (130, 1)]);
        let r: Vec<_> = runs(&bits, 130, 256).collect();
        assert_eq!(r, vec![(0, 3), (63, 3)], "limited to the region's pages");
        assert_eq!(runs(&[0, 0], 128, 8).count(), 0);
        assert_eq!(
            runs(&[u64::MAX], 64, 256).collect::<Vec<_>>(),
            vec![(0, 64)]
        );
    }

    #[test]
    fn what_the_vmm_writes_is_in_the_bitmap() {
        // The device side of the contract: every write through vm-memory marks its pages, so
        // a page the VMM wrote behind KVM's back is sent again.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        mem.write_obj(7u32, GuestAddress(0x3ffe)).unwrap(); // crosses pages 3 and 4
        mem.write_slice(&[1u8; 10], GuestAddress(0x20_5000))
            .unwrap();
        let got: Vec<PageBitmap> = mem.iter().map(|r| written(r).get_and_reset()).collect();
        assert_eq!(got[0][0], 0b11000);
        assert_eq!(got[1][0], 1 << 5);
        assert_eq!(count(&got), 3);
        let again: Vec<PageBitmap> = mem.iter().map(|r| written(r).get_and_reset()).collect();
        assert_eq!(count(&again), 0, "harvesting clears");
        let mut a = got.clone();
        merge(&mut a, &[vec![1], vec![0]]);
        assert_eq!(a[0][0], 0b11001);
    }
}
