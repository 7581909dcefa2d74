//! vCPUs: per-vCPU register/CPUID/MSR/LAPIC setup for a 64-bit Linux boot, and the `KVM_RUN`
//! loop each vCPU thread runs, dispatching port and MMIO exits to the buses.
//!
//! Stopping: the VMM thread sets the shared [`VcpuControl`] to `Stopping` and kicks each thread
//! with [`VCPU_KICK_SIGNAL`] until it has left `KVM_RUN`; the thread checks the control state
//! before every entry, so a kick that lands just before `KVM_RUN` is retried, never lost.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
#[allow(non_snake_case)]
pub fn VCPU_KICK_SIGNAL() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {id}: {source}")]
    Create {
        /// vCPU index.
        id: u8,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// A KVM setup ioctl failed.
    #[error("cannot set up vCPU {id} ({what}): {source}")]
    Setup {
        /// vCPU index.
        id: u8,
        /// Which step.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot set up vCPU {id}: {source}")]
    Boot {
        /// vCPU index.
        id: u8,
        /// Why.
        source: boot::regs::RegsError,
    },
    /// KVM accepted fewer MSRs than we set.
    #[error("vCPU {id}: KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many KVM took.
        set: usize,
        /// How many we gave.
        wanted: usize,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// Why.
        source: io::Error,
    },
}

/// Why a vCPU thread stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The VMM asked it to stop.
    Stopped,
    /// The guest asked KVM to power off (KVM_SYSTEM_EVENT_SHUTDOWN).
    PowerOff,
    /// The guest asked KVM to reset (KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// Something the VMM cannot continue from.
    Failed(String),
}

/// A message from a vCPU thread to the VMM thread.
#[derive(Debug)]
pub struct VcpuEvent {
    /// Which vCPU.
    pub id: u8,
    /// What happened.
    pub reason: VcpuExitReason,
}

const STATE_RUNNING: u8 = 0;
const STATE_STOPPING: u8 = 1;

/// Run state shared by the VMM thread and all vCPU threads of one VM.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: AtomicU8,
}

impl VcpuControl {
    /// Asks every vCPU to leave its run loop at the next opportunity.
    pub fn request_stop(&self) {
        self.state.store(STATE_STOPPING, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.state.load(Ordering::SeqCst) != STATE_RUNNING
    }
}

/// Installs the no-op handler for the kick signal: its only job is to interrupt `KVM_RUN`.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(VCPU_KICK_SIGNAL(), handle_kick).map_err(VcpuError::Signal)
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

/// What every vCPU of a VM shares while running.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Run state.
    pub control: Arc<VcpuControl>,
    /// Where exit reasons are reported.
    pub events: Sender<VcpuEvent>,
    /// Written after each report, to wake the VMM's event loop.
    pub events_evt: Arc<EventFd>,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets it up for a 64-bit Linux boot at `entry`
    /// (the BSP, id 0, starts there; APs wait for the guest's INIT/SIPI).
    pub fn new(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        tsc_deadline: bool,
        id: u8,
        count: u8,
        entry: GuestAddress,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let setup = |what, source| VcpuError::Setup { id, what, source };

        let mut cpuid = supported_cpuid.clone();
        boot::cpuid::normalize_cpuid(&mut cpuid, id, count);
        boot::cpuid::set_tsc_deadline(&mut cpuid, tsc_deadline);
        fd.set_cpuid2(&cpuid).map_err(|e| setup("CPUID", e))?;

        let entries = boot::regs::boot_msr_entries();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| setup("MSRs", kvm_ioctls::Error::new(libc::E2BIG)))?;
        let set = fd.set_msrs(&msrs).map_err(|e| setup("MSRs", e))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                wanted: entries.len(),
            });
        }

        let mut lapic = fd.get_lapic().map_err(|e| setup("LAPIC", e))?;
        boot::regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(|e| setup("LAPIC", e))?;

        if id == 0 {
            boot::regs::setup_page_tables_and_gdt(mem)
                .map_err(|source| VcpuError::Boot { id, source })?;
            let mut sregs = fd.get_sregs().map_err(|e| setup("special registers", e))?;
            boot::regs::long_mode_sregs(&mut sregs);
            fd.set_sregs(&sregs)
                .map_err(|e| setup("special registers", e))?;
            fd.set_regs(&boot::regs::boot_regs(entry))
                .map_err(|e| setup("registers", e))?;
        }
        fd.set_fpu(&boot::regs::boot_fpu())
            .map_err(|e| setup("FPU", e))?;
        Ok(Vcpu { id, fd })
    }

    /// Starts the vCPU's thread.
    pub fn start(self, shared: VcpuShared) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let reason = self.run(&shared);
                // The VMM thread may already be gone when the whole process is exiting.
                let _ = shared.events.send(VcpuEvent { id, reason });
                let _ = shared.events_evt.write(1);
            })
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn run(mut self, shared: &VcpuShared) -> VcpuExitReason {
        loop {
            if shared.control.stopping() {
                return VcpuExitReason::Stopped;
            }
            match self.fd.run() {
                Ok(exit) => {
                    if let Some(reason) = handle_exit(exit, shared) {
                        return reason;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return VcpuExitReason::Failed(format!("KVM_RUN failed: {e}")),
            }
        }
    }
}

/// Handles one exit; `Some` ends the run loop.
fn handle_exit(exit: VcpuExit<'_>, shared: &VcpuShared) -> Option<VcpuExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !shared.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            shared.pio.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !shared.mmio.read(addr, data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            shared.mmio.write(addr, data);
            None
        }
        VcpuExit::Shutdown => Some(VcpuExitReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(VcpuExitReason::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(VcpuExitReason::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                Some(VcpuExitReason::Failed("the guest crashed".into()))
            }
            other => Some(VcpuExitReason::Failed(format!(
                "unexpected KVM system event {other}"
            ))),
        },
        VcpuExit::Hlt => Some(VcpuExitReason::Failed(
            "the guest halted with interrupts off".into(),
        )),
        VcpuExit::FailEntry(reason, cpu) => Some(VcpuExitReason::Failed(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        ))),
        VcpuExit::InternalError => Some(VcpuExitReason::Failed(
            "KVM internal error (emulation failure)".into(),
        )),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        other => Some(VcpuExitReason::Failed(format!(
            "unhandled KVM exit {other:?}"
        ))),
    }
}

/// Stops every vCPU thread of a VM and waits for them, kicking each out of `KVM_RUN` until it
/// has left. Gives up on a thread after `timeout` (it is then left to die with the process).
pub fn stop_all(control: &VcpuControl, threads: Vec<JoinHandle<()>>, timeout: Duration) {
    control.request_stop();
    let deadline = Instant::now() + timeout;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            let _ = t.kill(VCPU_KICK_SIGNAL());
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}
