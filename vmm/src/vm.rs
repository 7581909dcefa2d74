//! The KVM VM: its file descriptor, guest memory and the in-kernel interrupt controllers.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
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
        source: vm_memory::mmap::FromRangesError,
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
}

impl Vm {
    /// Creates the VM, maps `memory_mib` of guest RAM laid out around the 32-bit MMIO hole, and
    /// creates the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub fn new(hv: &Hypervisor, memory_mib: u64) -> Result<Vm, VmError> {
        let regions = boot::layout::ram_regions(memory_mib << 20);
        let memory = GuestMemoryMmap::from_ranges(&regions).map_err(|source| VmError::Memory {
            mib: memory_mib,
            source,
        })?;
        Self::with_memory(hv, memory)
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

    /// Connects an EventFd to a GSI of the in-kernel irqchip: writing the fd raises the line.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}
