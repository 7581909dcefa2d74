//! vCPUs: per-vCPU register/CPUID/MSR/LAPIC setup for a 64-bit Linux boot, and the `KVM_RUN`
//! loop each vCPU thread runs, dispatching port and MMIO exits to the buses.
//!
//! Pausing and stopping: the VMM thread sets a request in the shared [`VcpuControl`] and kicks
//! each thread with [`VCPU_KICK_SIGNAL`] until it has left `KVM_RUN`; the thread checks the
//! request before every entry (parking on a condition variable while paused), so a kick that
//! lands just before `KVM_RUN` is retried, never lost.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use virtio::GuestMemoryMmap;
use vm_memory::GuestAddress;

use crate::snapshot::cpu::{CpuStateError, VcpuState};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

/// Stack of a vCPU thread: exit handlers and the device work they do need a few tens of KiB.
/// Below 2 MiB on purpose: a 2 MiB stack that happens to be 2 MiB-aligned is backed by one
/// transparent huge page on hosts with THP "always", 2 MiB of RSS for a thread that uses 20 KiB
/// (seen in the boot benchmark once guest RAM became huge-page aligned).
pub const VCPU_STACK_SIZE: usize = 1 << 20;

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
    /// A saved state could not be put into the vCPU.
    #[error("cannot restore vCPU {id}: {source}")]
    Restore {
        /// vCPU index.
        id: u8,
        /// Why.
        source: CpuStateError,
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
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN); the text is the vCPU state at the time.
    TripleFault(String),
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

/// What the VMM wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct ControlState {
    request: Request,
    /// vCPU threads currently parked by a pause request.
    parked: usize,
    /// A state collection in progress: parked vCPUs each fill their slot.
    save: Option<SaveJob>,
}

/// Parked vCPU threads read their own state (KVM wants vCPU ioctls from a thread that is not
/// in `KVM_RUN`; the owning thread is the simplest such thread).
#[derive(Debug)]
struct SaveJob {
    msr_index: Arc<Vec<u32>>,
    results: Vec<Option<Result<VcpuState, String>>>,
}

/// Run state shared by the VMM thread and all vCPU threads of one VM: the VMM sets a request,
/// kicks the threads out of `KVM_RUN`, and they obey it before entering the guest again.
#[derive(Debug)]
pub struct VcpuControl {
    /// Fast path for the vCPU loop: true whenever the request is not `Run`.
    attention: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Host thread ids of the vCPU threads (0 until a thread has started).
    thread_ids: Vec<AtomicI32>,
}

impl VcpuControl {
    /// Control for `count` vCPUs, which start paused when `paused` is set.
    pub fn new(count: u8, paused: bool) -> VcpuControl {
        VcpuControl {
            attention: AtomicBool::new(paused),
            state: Mutex::new(ControlState {
                request: if paused { Request::Pause } else { Request::Run },
                parked: 0,
                save: None,
            }),
            changed: Condvar::new(),
            thread_ids: (0..count).map(|_| AtomicI32::new(0)).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, request: Request) {
        let mut st = self.lock();
        st.request = request;
        self.attention
            .store(request != Request::Run, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Asks every vCPU to leave its run loop at the next opportunity.
    pub fn request_stop(&self) {
        self.set(Request::Stop);
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.set(Request::Run);
    }

    /// Host thread id of each vCPU thread (None before it started).
    pub fn thread_ids(&self) -> Vec<Option<i32>> {
        self.thread_ids
            .iter()
            .map(|t| Some(t.load(Ordering::SeqCst)).filter(|&id| id != 0))
            .collect()
    }

    /// Asks the vCPUs to pause and waits (kicking them out of `KVM_RUN`) until every one of
    /// `threads` is parked or has exited, or `timeout` passes. Returns whether all are parked.
    pub fn pause(&self, threads: &[JoinHandle<()>], timeout: Duration) -> bool {
        self.set(Request::Pause);
        let deadline = Instant::now() + timeout;
        loop {
            let live = threads.iter().filter(|t| !t.is_finished()).count();
            if self.lock().parked >= live {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(VCPU_KICK_SIGNAL());
            }
            let st = self.lock();
            let _ = self
                .changed
                .wait_timeout(st, Duration::from_millis(2))
                .map_err(|_| ());
        }
    }

    /// Reads the state of every vCPU of a paused VM (see [`VcpuControl::pause`]): each parked
    /// thread reads its own. Fails if a vCPU thread is gone or does not answer in `timeout`.
    pub fn collect_states(
        &self,
        msr_index: Arc<Vec<u32>>,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, String> {
        let n = self.thread_ids.len();
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        if st.request != Request::Pause {
            return Err("the vCPUs are not paused".into());
        }
        st.save = Some(SaveJob {
            msr_index,
            results: (0..n).map(|_| None).collect(),
        });
        self.changed.notify_all();
        loop {
            let done = st
                .save
                .as_ref()
                .is_some_and(|j| j.results.iter().all(Option::is_some));
            if done {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                st.save = None;
                return Err("a vCPU did not report its state in time".into());
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let job = st.save.take().ok_or("the state collection was cancelled")?;
        job.results
            .into_iter()
            .enumerate()
            .map(|(i, r)| match r {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(format!("vCPU {i}: {e}")),
                None => Err(format!("vCPU {i} did not report")),
            })
            .collect()
    }

    /// Called by a vCPU thread before each guest entry: parks while paused (reading its state
    /// when asked), and says whether to keep running (false: stop).
    fn obey(&self, id: u8, fd: &VcpuFd) -> bool {
        if !self.attention.load(Ordering::SeqCst) {
            return true;
        }
        let mut st = self.lock();
        if st.request == Request::Pause {
            st.parked += 1;
            self.changed.notify_all();
            while st.request == Request::Pause {
                let slot = usize::from(id);
                if let Some(job) = st.save.as_mut() {
                    if job.results.get(slot).is_some_and(Option::is_none) {
                        let state = crate::snapshot::cpu::save_vcpu(fd, id, &job.msr_index)
                            .map_err(|e| e.to_string());
                        job.results[slot] = Some(state);
                        self.changed.notify_all();
                        continue;
                    }
                }
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.parked -= 1;
        }
        st.request == Request::Run
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

    /// Creates vCPU `id` with nothing set up in it (for [`Vcpu::restore_into`]).
    pub fn create(vm: &VmFd, id: u8) -> Result<VcpuFd, VcpuError> {
        vm.create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })
    }

    /// Creates vCPU `state.id` and puts a saved state into it (instead of a boot setup).
    pub fn restore(vm: &VmFd, state: &VcpuState) -> Result<Vcpu, VcpuError> {
        Self::restore_into(Self::create(vm, state.id)?, state)
    }

    /// Puts a saved state into `fd`, vCPU `state.id` created earlier ([`Vcpu::create`]).
    pub fn restore_into(fd: VcpuFd, state: &VcpuState) -> Result<Vcpu, VcpuError> {
        let id = state.id;
        crate::snapshot::cpu::restore_vcpu(&fd, state)
            .map_err(|source| VcpuError::Restore { id, source })?;
        crate::snapshot::cpu::notify_paused(&fd);
        Ok(Vcpu { id, fd })
    }

    /// Starts the vCPU's thread.
    pub fn start(self, shared: VcpuShared) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(VCPU_STACK_SIZE)
            .spawn(move || {
                if let Some(slot) = shared.control.thread_ids.get(usize::from(id)) {
                    // SAFETY: gettid has no preconditions and cannot fail.
                    slot.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                }
                let reason = self.run(&shared);
                // The VMM thread may already be gone when the whole process is exiting.
                let _ = shared.events.send(VcpuEvent { id, reason });
                let _ = shared.events_evt.write(1);
            })
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn run(mut self, shared: &VcpuShared) -> VcpuExitReason {
        loop {
            if !shared.control.obey(self.id, &self.fd) {
                return VcpuExitReason::Stopped;
            }
            match self.fd.run() {
                Ok(exit) => {
                    if let Some(reason) = handle_exit(exit, shared) {
                        return match reason {
                            VcpuExitReason::TripleFault(_) => {
                                VcpuExitReason::TripleFault(self.state_summary())
                            }
                            other => other,
                        };
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

impl Vcpu {
    /// The registers that tell where a guest died, for the error message.
    fn state_summary(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
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
        VcpuExit::Shutdown => Some(VcpuExitReason::TripleFault(String::new())),
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
/// Returns whether every thread ended.
pub fn stop_all(control: &VcpuControl, threads: Vec<JoinHandle<()>>, timeout: Duration) -> bool {
    control.request_stop();
    let deadline = Instant::now() + timeout;
    let mut all = true;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            let _ = t.kill(VCPU_KICK_SIGNAL());
            std::thread::sleep(Duration::from_millis(2));
        }
        match t.is_finished() {
            true => drop(t.join()),
            false => all = false,
        }
    }
    all
}
