//! The KVM VM: its file descriptor, guest memory and the in-kernel interrupt controllers.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use virtio::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::Hypervisor;

/// Where KVM puts the real-mode TSS (three pages) on Intel hosts: just below the BIOS area at the
/// top of the 32-bit space, inside the MMIO hole where no RAM or device lives.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The EPT identity-map page KVM needs on Intel, right below the TSS.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors creating or setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("cannot create the KVM VM: {0}")]
    Create(#[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Memory {
        /// Requested size.
        mib: u64,
        /// Why.
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("cannot register guest memory with KVM: {0}")]
    MemorySlot(#[source] kvm_ioctls::Error),
    /// TSS / identity map / irqchip / PIT setup failed.
    #[error("cannot set up {what}: {source}")]
    Setup {
        /// Which step.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// Registering an irqfd failed.
    #[error("cannot connect interrupt GSI {gsi}: {source}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

/// A created VM with its memory registered and its interrupt controllers in the kernel.
pub struct Vm {
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    /// The anonymous RAM behind `memory` (`None` for a restored VM's file mapping), handed back
    /// to the pool when the VM goes.
    ram: Option<GuestRam>,
}

impl Vm {
    /// Creates the VM, maps `memory_mib` of guest RAM laid out around the 32-bit MMIO hole, and
    /// creates the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub fn new(hv: &Hypervisor, memory_mib: u64) -> Result<Vm, VmError> {
        let regions = boot::layout::ram_regions(memory_mib << 20);
        let memory_error = |source| VmError::Memory {
            mib: memory_mib,
            source,
        };
        let ram = GuestRam::take(&regions).map_err(memory_error)?;
        Self::with_ram(hv, ram)
    }

    /// Creates the VM around `ram` (taken for its layout, perhaps already filled: a live
    /// migration's), which goes back to the pool with the VM.
    pub fn with_ram(hv: &Hypervisor, ram: GuestRam) -> Result<Vm, VmError> {
        let mib = ram.ranges.iter().map(|r| r.1 as u64).sum::<u64>() >> 20;
        let memory = match ram.guest_memory() {
            Ok(m) => m,
            Err(source) => {
                ram.give_back();
                return Err(VmError::Memory { mib, source });
            }
        };
        let mut vm = match Self::with_memory(hv, memory) {
            Ok(vm) => vm,
            Err(e) => {
                ram.give_back();
                return Err(e);
            }
        };
        vm.ram = Some(ram);
        Ok(vm)
    }

    /// Creates the VM around guest RAM that is already mapped (a restored VM's), and creates
    /// the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub fn with_memory(hv: &Hypervisor, memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        let fd = hv.kvm().create_vm().map_err(VmError::Create)?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MemorySlot(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // The host range is a live mapping owned by `memory`, kept for the Vm's whole life;
            // vCPU threads are joined before a Vm is dropped and `fd` drops before `memory`.
            // SAFETY: so the slot is never used after the mapping goes away.
            unsafe { fd.set_user_memory_region(mem_region) }.map_err(VmError::MemorySlot)?;
        }
        let setup = |what, r: Result<(), kvm_ioctls::Error>| {
            r.map_err(|source| VmError::Setup { what, source })
        };
        setup("the TSS address", fd.set_tss_address(KVM_TSS_ADDRESS))?;
        setup(
            "the identity map address",
            fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS),
        )?;
        setup("the in-kernel irqchip", fd.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        setup("the in-kernel PIT", fd.create_pit2(pit))?;
        Ok(Vm {
            fd: Arc::new(fd),
            memory,
            ram: None,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Stops this VM's vCPU threads ([`crate::vcpu::stop_all`]). If one cannot be stopped, the
    /// VM's RAM stays out of the pool for good: that thread may still run guest code in it.
    pub fn stop_vcpus(
        &mut self,
        control: &crate::vcpu::VcpuControl,
        threads: Vec<std::thread::JoinHandle<()>>,
        timeout: std::time::Duration,
    ) {
        if !crate::vcpu::stop_all(control, threads, timeout) {
            if let Some(ram) = self.ram.take() {
                std::mem::forget(ram);
            }
        }
    }

    /// Connects an EventFd to a GSI of the in-kernel irqchip: writing the fd raises the line.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(ram) = self.ram.take() {
            ram.give_back();
        }
    }
}

/// A VM made ready before its state is known: the KVM VM with its RAM registered and its
/// interrupt controllers, and its vCPUs created with nothing set in them. A live migration's
/// destination builds it while the pages arrive: on a nested host these ioctls are most of
/// the cost of building a VM, and done early they are off the downtime.
pub struct Prebuilt {
    /// The vCPUs, by id (declared first: they go before the VM).
    pub vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// The VM.
    pub vm: Vm,
}

impl Prebuilt {
    /// Creates the VM around `ram` and its `vcpus` vCPUs. On failure the RAM goes back to the
    /// pool.
    pub fn new(hv: &Hypervisor, ram: GuestRam, vcpus: u8) -> Result<Prebuilt, VmError> {
        let vm = Vm::with_ram(hv, ram)?;
        let vcpus = (0..vcpus)
            .map(|id| crate::vcpu::Vcpu::create(vm.fd(), id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prebuilt { vcpus, vm })
    }
}

/// Huge page size, and the alignment of guest RAM in the host.
const HUGE_PAGE: usize = 2 << 20;

/// Anonymous guest RAM whose host addresses are aligned like its guest addresses to 2 MiB, so
/// that KVM can back the guest with 2 MiB pages where the host has transparent huge pages:
/// a guest then takes one nested page fault per 2 MiB it touches instead of 512. For a nested
/// guest each such fault is a round trip through two hypervisors; the kernel's boot touches
/// some 100 MiB. (QEMU aligns its RAM the same way.)
///
/// `vm-memory` maps with no alignment, so this maps the RAM itself and lends it to
/// `GuestMemoryMmap` as raw regions. Mappings are never unmapped: a VM gives its RAM back to a
/// process-wide pool when it goes, and the next VM of the same layout (a rebooted guest) takes
/// it, emptied with `MADV_DONTNEED` (it reads as zeros again), so a reboot loop maps nothing
/// new. A VM whose vCPU threads could not be stopped keeps its RAM ([`Vm::abandon_ram`]).
pub struct GuestRam {
    /// Guest address, length and host address of each range.
    ranges: Vec<(vm_memory::GuestAddress, usize, usize)>,
}

static RAM_POOL: std::sync::Mutex<Vec<GuestRam>> = std::sync::Mutex::new(Vec::new());

impl GuestRam {
    /// RAM for `layout` (guest address, length): a pooled one of that layout, emptied, else a
    /// new mapping.
    pub fn take(layout: &[(vm_memory::GuestAddress, usize)]) -> std::io::Result<GuestRam> {
        let pooled = {
            let mut pool = RAM_POOL.lock().unwrap_or_else(|e| e.into_inner());
            let same = |r: &GuestRam| {
                r.ranges.len() == layout.len()
                    && r.ranges
                        .iter()
                        .zip(layout)
                        .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            };
            pool.iter().position(same).map(|i| pool.swap_remove(i))
        };
        if let Some(ram) = pooled {
            for &(_, len, host) in &ram.ranges {
                let addr = host as *mut libc::c_void;
                // SAFETY: the range is a private anonymous mapping this pool owns and no VM uses
                // (its last VM is gone); dropping its pages makes it read as zeros.
                let r = unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) };
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            return Ok(ram);
        }
        let mut ranges = Vec::with_capacity(layout.len());
        for &(gpa, len) in layout {
            match map_aligned(len, gpa.0 as usize % HUGE_PAGE) {
                Ok(host) => ranges.push((gpa, len, host)),
                Err(e) => {
                    GuestRam { ranges }.unmap();
                    return Err(e);
                }
            }
        }
        Ok(GuestRam { ranges })
    }

    /// The ranges as guest memory (regions borrowing the mappings).
    pub fn guest_memory(&self) -> std::io::Result<GuestMemoryMmap> {
        use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
        use vm_memory::mmap::MmapRegionBuilder;
        let invalid = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let mut regions = Vec::with_capacity(self.ranges.len());
        for &(gpa, len, host) in &self.ranges {
            let builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len));
            // SAFETY: [host, host + len) is a live mapping owned by this `GuestRam`, which
            // outlives every VM using it (it is pooled or leaked, never unmapped while in use).
            let builder = unsafe { builder.with_raw_mmap_pointer(host as *mut u8) };
            let region = builder
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| invalid(&e))?;
            regions.push(
                virtio::GuestRegionMmap::new(region, gpa)
                    .ok_or_else(|| invalid(&"a RAM range wraps around"))?,
            );
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| invalid(&e))
    }

    /// Returns the RAM to the pool (when no VM was built on it).
    pub fn give_back(self) {
        RAM_POOL
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self);
    }

    /// Unmaps the ranges (only for RAM no VM has used).
    fn unmap(self) {
        for (_, len, host) in self.ranges {
            // SAFETY: a mapping made by `map_aligned` that nothing references.
            unsafe { libc::munmap(host as *mut libc::c_void, len) };
        }
    }
}

/// Maps `len` bytes of private anonymous memory at a host address whose offset in a 2 MiB page
/// is `phase`, asking for transparent huge pages.
fn map_aligned(len: usize, phase: usize) -> std::io::Result<usize> {
    let span = len + HUGE_PAGE;
    // SAFETY: a new reservation at an address the kernel picks; nothing else is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let start = (base - phase).next_multiple_of(HUGE_PAGE) + phase;
    // SAFETY: [start, start + len) lies inside the reservation made above, which this function
    // owns; MAP_FIXED replaces that part of it and nothing else.
    let addr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        // SAFETY: the whole reservation is ours and unused.
        unsafe { libc::munmap(base as *mut libc::c_void, span) };
        return Err(err);
    }
    let end = start + len;
    // SAFETY: the parts of the reservation before and after the mapping are ours and unused.
    unsafe {
        if start > base {
            libc::munmap(base as *mut libc::c_void, start - base);
        }
        if base + span > end {
            libc::munmap(end as *mut libc::c_void, base + span - end);
        }
    }
    // SAFETY: advice on the mapping just made. Failure (no THP in this kernel) is harmless.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn guest_ram_is_aligned_like_guest_addresses_and_comes_back_zeroed() {
        // A layout no other test uses, so the pool cannot hand this test another test's RAM.
        let layout = [
            (GuestAddress(0), 6 << 20),
            (GuestAddress(0x1_0010_0000), 3 << 20),
        ];
        let a = GuestRam::take(&layout).unwrap();
        for &(gpa, _, host) in &a.ranges {
            assert_eq!(host % HUGE_PAGE, gpa.0 as usize % HUGE_PAGE);
        }
        let mem = a.guest_memory().unwrap();
        mem.write_obj(0xabcd_u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x1234_u32, GuestAddress(0x1_0010_0000))
            .unwrap();

        // Two live VMs never share RAM.
        let b = GuestRam::take(&layout).unwrap();
        assert_ne!(a.ranges[0].2, b.ranges[0].2);
        assert_eq!(
            b.guest_memory()
                .unwrap()
                .read_obj::<u32>(GuestAddress(0x1000))
                .unwrap(),
            0
        );

        // A VM's RAM goes back to the pool and the next VM of that layout gets it empty.
        let host = a.ranges[0].2;
        drop(mem);
        a.give_back();
        let c = GuestRam::take(&layout).unwrap();
        assert_eq!(c.ranges[0].2, host, "pooled RAM is reused");
        let mem = c.guest_memory().unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1_0010_0000)).unwrap(), 0);
        drop(mem);
        b.unmap();
        c.unmap();
    }
}
