//! KVM's coalesced I/O ring: guest writes to a registered zone are queued by KVM in a page shared
//! with the VMM instead of each causing an exit to user space; the VMM replays them on the buses,
//! in order, before it handles any exit of any vCPU.
//!
//! Used for the serial port's transmit holding register while a write to it has no effect besides
//! the output ([`devices::serial::PlainTxHook`]): the kernel's console prints each byte as one read
//! of the line status register and one write of the THR, both exits; with the write queued, a
//! byte costs one exit instead of two, which is most of what a verbose boot log costs a nested
//! guest. The zone is dropped as soon as the guest enables the transmit interrupt (a queued
//! write would raise it late) or loopback, and added back when they are off again.
//!
//! A guest that writes and then idles (a `hlt` KVM handles in the kernel) makes no exit that
//! would drain the ring, so [`spawn_drainer`] also drains it every [`DRAIN_PERIOD`] from a
//! thread of its own: output is late by at most that much, never stuck.
//!
//! Ordering: every exit drains the ring first, so a register access that is an exit (the status
//! read, an IER or LCR write) sees all earlier queued writes applied, as on hardware. An exit of
//! vCPU A drains what vCPU B queued too; the drain holds a lock, so entries are applied once and
//! in ring order. A paused or stopped vCPU leaves `KVM_RUN` through an exit, so nothing stays
//! queued while the VM is stopped (a snapshot sees all output written).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use devices::bus::Bus;
use devices::serial::PlainTxHook;
use kvm_bindings::{kvm_coalesced_mmio, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};

/// Size of the ring's header: `first` and `last`, both u32.
const HEADER: usize = 8;

/// The ring page of a VM, mapped through one of its vCPU fds (every vCPU maps the same page).
pub struct CoalescedRing {
    page: NonNull<u8>,
    page_size: usize,
    /// Number of entries (`KVM_COALESCED_MMIO_MAX`).
    entries: u32,
    /// Held while draining: one consumer at a time.
    drain: Mutex<()>,
}

// SAFETY: the mapping is shared memory owned by this value for its whole life; the consumer
// index is only written under `drain`, and the producer (KVM) synchronises through the indices.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring page of `vcpu`'s VM.
    pub fn map(vcpu: &VcpuFd) -> io::Result<CoalescedRing> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(io::Error::last_os_error()),
        };
        let offset = page_size * KVM_COALESCED_MMIO_PAGE_OFFSET as usize;
        // SAFETY: a new shared mapping of one page of the vCPU fd, at an address the kernel
        // picks; nothing else is affected. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::other("null map"))?;
        let entries = ((page_size - HEADER) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(CoalescedRing {
            page,
            page_size,
            entries,
            drain: Mutex::new(()),
        })
    }

    fn index(&self, which: usize) -> &AtomicU32 {
        // SAFETY: `first` (0) and `last` (4) are aligned u32s at the start of the live page,
        // which KVM and we access only as whole u32s.
        unsafe { &*self.page.as_ptr().add(which * 4).cast::<AtomicU32>() }
    }

    /// Whether KVM has queued anything since the last drain.
    pub fn is_empty(&self) -> bool {
        self.index(0).load(Ordering::Acquire) == self.index(1).load(Ordering::Acquire)
    }

    /// Applies every queued write, in order, to `pio` or `mmio`.
    pub fn drain(&self, pio: &Bus, mmio: &Bus) {
        if self.is_empty() {
            return;
        }
        let _consumer = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        let (first, last) = (self.index(0), self.index(1));
        let mut at = first.load(Ordering::Relaxed);
        // KVM publishes an entry by advancing `last` after writing it (Acquire pairs with that).
        while at != last.load(Ordering::Acquire) {
            if at >= self.entries {
                // Only KVM writes `last` and it keeps it in range; never read out of the page.
                log::error!("coalesced I/O ring index {at} out of range; ring reset");
                first.store(last.load(Ordering::Acquire), Ordering::Release);
                return;
            }
            let offset = HEADER + at as usize * std::mem::size_of::<kvm_coalesced_mmio>();
            // SAFETY: `at < entries`, so the entry lies inside the page; KVM does not touch a
            // published entry until we advance `first` past it.
            let entry = unsafe {
                std::ptr::read_volatile(self.page.as_ptr().add(offset).cast::<kvm_coalesced_mmio>())
            };
            let len = (entry.len as usize).min(entry.data.len());
            // SAFETY: both union members are plain u32s.
            let is_pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            match is_pio {
                true => pio.write(entry.phys_addr, &entry.data[..len]),
                false => mmio.write(entry.phys_addr, &entry.data[..len]),
            };
            at = (at + 1) % self.entries;
            // The entry is consumed: KVM may reuse its slot.
            first.store(at, Ordering::Release);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page `map` mapped; no reference into it outlives `self`.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}

/// A [`PlainTxHook`] that queues the guest's writes to `port` (a one-byte register) in the
/// coalesced ring while they are plain and makes them exits again when not.
pub fn plain_tx_hook(vm: Arc<VmFd>, port: u16) -> PlainTxHook {
    let mut registered = false;
    Box::new(move |plain| {
        let addr = IoEventAddress::Pio(u64::from(port));
        let result = match (plain, registered) {
            (true, false) => vm.register_coalesced_mmio(addr, 1),
            (false, true) => vm.unregister_coalesced_mmio(addr, 1),
            _ => return,
        };
        match result {
            Ok(()) => registered = plain,
            // Not queuing is always correct (every write stays an exit); failing to stop
            // queuing is not, and cannot happen for a zone KVM accepted: say so loudly.
            Err(e) => log::error!(
                "cannot {} coalesced writes to port {port:#x}: {e}",
                if plain { "start" } else { "stop" }
            ),
        }
    })
}

/// How often [`spawn_drainer`] drains the ring.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(10);

/// Starts a thread that drains `ring` into the buses every [`DRAIN_PERIOD`] for as long as the
/// ring lives (it holds only weak references: it ends within a period of the VM's teardown).
pub fn spawn_drainer(ring: &Arc<CoalescedRing>, pio: &Arc<Bus>, mmio: &Arc<Bus>) -> io::Result<()> {
    let (ring, pio, mmio): (Weak<CoalescedRing>, Weak<Bus>, Weak<Bus>) = (
        Arc::downgrade(ring),
        Arc::downgrade(pio),
        Arc::downgrade(mmio),
    );
    std::thread::Builder::new()
        .name("coalesced-io".into())
        .stack_size(64 << 10)
        .spawn(move || loop {
            std::thread::sleep(DRAIN_PERIOD);
            let (Some(ring), Some(pio), Some(mmio)) =
                (ring.upgrade(), pio.upgrade(), mmio.upgrade())
            else {
                return;
            };
            ring.drain(&pio, &mmio);
        })
        .map(drop)
}
