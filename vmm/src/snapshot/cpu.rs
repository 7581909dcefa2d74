//! vCPU and VM (in-kernel irqchip, PIT, clock) state: taken from KVM on a paused VM and put
//! back into a freshly created one, in the order KVM needs.
//!
//! Save order (Firecracker documents the same constraints): MP state first (`KVM_GET_MP_STATE`
//! runs the LAPIC's pending INIT/SIPI processing), then registers, XSAVE, XCRs, debug
//! registers, the LAPIC, MSRs (after the LAPIC: the TSC-deadline MSR reads through it) and the
//! vCPU events last. Restore: CPUID, MP state, registers, special registers, XSAVE, XCRs, debug
//! registers, LAPIC (after sregs: the APIC base MSR lives there), MSRs (after the LAPIC), events
//! last; then the guest's kvmclock is told it was paused.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors reading or writing KVM state.
#[derive(Debug, thiserror::Error)]
pub enum CpuStateError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// KVM refused one of the saved MSRs.
    #[error("KVM refused saved MSR {index:#x} ({set} of {total} restored)")]
    Msr {
        /// The MSR's index.
        index: u32,
        /// How many were set before it.
        set: usize,
        /// How many were saved.
        total: usize,
    },
    /// The saved state is malformed.
    #[error("{0}")]
    Invalid(String),
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> CpuStateError {
    move |source| CpuStateError::Kvm { what, source }
}

/// One vCPU's architectural state.
#[derive(Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (APIC id).
    pub id: u8,
    /// CPUID as set on the vCPU.
    #[serde(with = "super::hex::vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI...).
    #[serde(with = "super::hex")]
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    #[serde(with = "super::hex")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    #[serde(with = "super::hex")]
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    #[serde(with = "super::hex")]
    pub xsave: kvm_xsave,
    /// Extended control registers.
    #[serde(with = "super::hex")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(with = "super::hex")]
    pub debug_regs: kvm_debugregs,
    /// The local APIC.
    #[serde(with = "super::hex")]
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable and could read.
    #[serde(with = "super::hex::vec")]
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    #[serde(with = "super::hex")]
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// How many MSRs one KVM_GET_MSRS / KVM_SET_MSRS call carries.
const MSR_CHUNK: usize = 64;

/// Reads the state of a vCPU whose thread is parked outside `KVM_RUN`.
pub fn save_vcpu(fd: &VcpuFd, id: u8, msr_index: &[u32]) -> Result<VcpuState, CpuStateError> {
    let mp_state = fd.get_mp_state().map_err(kvm("MP state"))?;
    let regs = fd.get_regs().map_err(kvm("registers"))?;
    let sregs = fd.get_sregs().map_err(kvm("special registers"))?;
    let xsave = fd.get_xsave().map_err(kvm("XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("XCRs"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm("debug registers"))?;
    let lapic = fd.get_lapic().map_err(kvm("LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("CPUID"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, msr_index)?;
    let events = fd.get_vcpu_events().map_err(kvm("vCPU events"))?;
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Reads every MSR of `index`, skipping the ones KVM lists but cannot read on this vCPU (KVM
/// stops at the first failing entry and reports how many it read).
fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, CpuStateError> {
    let mut out = Vec::with_capacity(index.len());
    let mut pos = 0;
    while pos < index.len() {
        let end = (pos + MSR_CHUNK).min(index.len());
        let chunk = &index[pos..end];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| CpuStateError::Invalid("too many MSRs".into()))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm("MSRs"))?
            .min(chunk.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read on this vCPU: skip that one.
        pos += if n < chunk.len() { n + 1 } else { n };
    }
    Ok(out)
}

/// The MSRs KVM can save and restore on this host (KVM_GET_MSR_INDEX_LIST), in ascending order
/// so the TSC is written before the TSC-deadline timer that depends on it.
pub fn saveable_msrs(kvm_fd: &kvm_ioctls::Kvm) -> Result<Vec<u32>, CpuStateError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("the MSR index list"))?;
    let mut v = list.as_slice().to_vec();
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Checks what a snapshot says about a vCPU before anything is set: a hostile file must fail
/// here with a message, not halfway through KVM calls.
pub fn validate_vcpu(state: &VcpuState, expected_id: u8) -> Result<(), CpuStateError> {
    if state.id != expected_id {
        return Err(CpuStateError::Invalid(format!(
            "vCPU {expected_id}: the state is for vCPU {}",
            state.id
        )));
    }
    if state.cpuid.is_empty() || state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(CpuStateError::Invalid(format!(
            "vCPU {expected_id}: {} CPUID entries (1..={KVM_MAX_CPUID_ENTRIES} allowed)",
            state.cpuid.len()
        )));
    }
    if state.msrs.len() > kvm_bindings::KVM_MAX_MSR_ENTRIES {
        return Err(CpuStateError::Invalid(format!(
            "vCPU {expected_id}: {} MSRs",
            state.msrs.len()
        )));
    }
    Ok(())
}

/// Puts a saved state into a freshly created vCPU (see the module docs for the order).
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), CpuStateError> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| CpuStateError::Invalid("too many CPUID entries".into()))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            // Without TSC scaling the guest sees the host's rate; say so once per vCPU.
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vCPU {}: cannot set the TSC to {khz} kHz: {e}", state.id);
            }
        }
    }
    fd.set_mp_state(state.mp_state).map_err(kvm("MP state"))?;
    fd.set_regs(&state.regs).map_err(kvm("registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm("special registers"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB, the legacy size): KVM reads no more
    // than that through KVM_SET_XSAVE, since this VMM never enables the larger XSAVE2 layout.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("LAPIC"))?;
    for (i, chunk) in state.msrs.chunks(MSR_CHUNK).enumerate() {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|_| CpuStateError::Invalid("too many MSRs".into()))?;
        let n = fd.set_msrs(&msrs).map_err(kvm("MSRs"))?;
        if n != chunk.len() {
            return Err(CpuStateError::Msr {
                index: chunk[n].index,
                set: i * MSR_CHUNK + n,
                total: state.msrs.len(),
            });
        }
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("vCPU events"))?;
    Ok(())
}

/// Tells the guest's kvmclock that the vCPU was stopped, so its watchdogs do not take the pause
/// for a lockup. Fails harmlessly when the guest has not enabled kvmclock.
pub fn notify_paused(fd: &VcpuFd) {
    let _ = fd.kvmclock_ctrl();
}

/// The VM-wide in-kernel state.
#[derive(Default, Serialize, Deserialize)]
pub struct VmKvmState {
    /// The master PIC.
    #[serde(with = "super::hex")]
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    #[serde(with = "super::hex")]
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    #[serde(with = "super::hex")]
    pub ioapic: kvm_irqchip,
    /// The PIT.
    #[serde(with = "super::hex")]
    pub pit: kvm_pit_state2,
    /// The KVM clock (the guest's notion of elapsed time).
    #[serde(with = "super::hex")]
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmKvmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmKvmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, CpuStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("the irqchip"))?;
    Ok(chip)
}

/// Reads the in-kernel PICs, IOAPIC, PIT and clock of a paused VM.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, CpuStateError> {
    let mut clock = vm.get_clock().map_err(kvm("the KVM clock"))?;
    // KVM_SET_CLOCK accepts no flags but REALTIME; TSC_STABLE is informational.
    clock.flags = 0;
    Ok(VmKvmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("the PIT"))?,
        clock,
    })
}

/// Puts saved VM-wide state into a VM whose irqchip and PIT exist.
pub fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<(), CpuStateError> {
    let chips = [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ];
    for (chip, id) in chips {
        if chip.chip_id != id {
            return Err(CpuStateError::Invalid(format!(
                "irqchip state for chip {} found where chip {id} belongs",
                chip.chip_id
            )));
        }
    }
    vm.set_pit2(&state.pit).map_err(kvm("the PIT"))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("the KVM clock"))?;
    for (chip, _) in chips {
        vm.set_irqchip(chip).map_err(kvm("the irqchip"))?;
    }
    Ok(())
}
