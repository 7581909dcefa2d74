//! The vmm: the glue between KVM, the boot code and the devices, and the loop that runs a VM
//! from its configuration until the guest powers off.
//!
//! Threads: one thread per vCPU (`vcpu`), and the VMM thread, which runs the event loop
//! (host console input, power and reset requests from devices, vCPU exit reports).

pub mod builder;
pub mod cli;
pub mod console;
pub mod device_manager;
pub mod kvm;
pub mod vcpu;
pub mod vm;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use api::{OnReboot, VmConfig};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{build_vm, BuildError, RunningVm};
use crate::console::{ConsoleError, SerialBackend};
use crate::kvm::{Hypervisor, KvmError};
use crate::vcpu::VcpuExitReason;

/// How long to wait for vCPU threads to leave `KVM_RUN` when stopping a VM.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Locks a mutex, recovering the data if a thread panicked while holding it: device state is
/// still the best we have, and the VMM must keep serving the guest.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors that end the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// More vCPUs than KVM allows.
    #[error("machine.vcpus: {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// The console backend could not be opened.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// The guest triple-faulted.
    #[error("the guest triple-faulted (vCPU {0}); the VM was stopped")]
    TripleFault(u8),
    /// A vCPU failed.
    #[error("vCPU {id} failed: {reason}")]
    VcpuFailed {
        /// Which vCPU.
        id: u8,
        /// What happened.
        reason: String,
    },
    /// The kick signal could not be installed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
}

/// How one VM incarnation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    PowerOff,
    Reboot,
    Quit,
}

/// Checks that the configured kernel is a bzImage or ELF vmlinux before anything is set up, so
/// a wrong file is reported as bad input rather than as a VM failure.
pub fn probe_kernel(cfg: &VmConfig) -> Result<(), BuildError> {
    let path = cfg
        .boot
        .kernel
        .as_deref()
        .unwrap_or(std::path::Path::new(""));
    let mut f = std::fs::File::open(path).map_err(|source| BuildError::Open {
        field: "boot.kernel",
        path: path.display().to_string(),
        source,
    })?;
    boot::loader::probe_kernel(&mut f).map_err(BuildError::Kernel)?;
    Ok(())
}

/// Runs the VM `cfg` describes until the guest powers off (Ok) or something fails (Err).
/// `cfg` must have passed `VmConfig::validate`.
pub fn run(cfg: &VmConfig) -> Result<(), VmmError> {
    let hv = Hypervisor::open()?;
    if usize::from(cfg.machine.vcpus) > hv.max_vcpus() {
        return Err(VmmError::TooManyVcpus {
            requested: cfg.machine.vcpus,
            max: hv.max_vcpus(),
        });
    }
    if kvm::host_is_pvm() {
        eprintln!("vmm: {}", kvm::PVM_WARNING);
    }
    let cpuid = hv.supported_cpuid()?;
    vcpu::install_kick_handler()?;
    let serial = SerialBackend::open(&cfg.serial)?;
    loop {
        let running = build_vm(&hv, &cpuid, cfg, &serial)?;
        match run_until_done(running, &serial)? {
            Outcome::PowerOff | Outcome::Quit => return Ok(()),
            Outcome::Reboot if cfg.on_reboot == OnReboot::Restart => {
                eprintln!("vmm: guest rebooted; restarting it");
            }
            Outcome::Reboot => return Ok(()),
        }
    }
}

/// Runs the event loop of one VM incarnation and tears it down when it ends.
fn run_until_done(vm: RunningVm, serial: &SerialBackend) -> Result<Outcome, VmmError> {
    let result = Rc::new(Cell::new(None));
    let quit = Arc::new(
        EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::EventLoop(format!("cannot create an eventfd: {e}")))?,
    );
    let mut em: EventManager<Box<dyn MutEventSubscriber>> =
        EventManager::new().map_err(|e| VmmError::EventLoop(e.to_string()))?;
    let control = Control {
        vm,
        quit: quit.clone(),
        result: result.clone(),
    };
    let serial_dev = control.vm.devices.serial.clone();
    let rtc = RtcTimer(control.vm.devices.cmos.clone());
    let control_id = em.add_subscriber(Box::new(control));
    em.add_subscriber(Box::new(rtc));
    if let Some(input) = serial.input_subscriber(serial_dev, quit) {
        em.add_subscriber(input);
    }
    let outcome = loop {
        if let Some(done) = result.take() {
            break done;
        }
        if let Err(e) = em.run() {
            // EINTR from the kick signal or a terminal resize is not an error.
            if e != event_manager::Error::Epoll(vmm_sys_util::errno::Error::new(libc::EINTR)) {
                break Err(VmmError::EventLoop(e.to_string()));
            }
        }
    };
    let control = em
        .remove_subscriber(control_id)
        .map_err(|e| VmmError::EventLoop(e.to_string()))?;
    drop(control);
    outcome
}

/// Subscriber for the VM's own events: power-off and reset requests, vCPU exits, and quit.
/// Dropping it stops the vCPUs.
struct Control {
    vm: RunningVm,
    quit: Arc<EventFd>,
    result: Rc<Cell<Option<Result<Outcome, VmmError>>>>,
}

const EV_EXIT: u32 = 0;
const EV_RESET: u32 = 1;
const EV_VCPU: u32 = 2;
const EV_QUIT: u32 = 3;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            (&self.vm.power.exit, EV_EXIT),
            (&self.vm.power.reset, EV_RESET),
            (&*self.vm.vcpu_evt, EV_VCPU),
            (&*self.quit, EV_QUIT),
        ];
        for (fd, tag) in fds {
            if let Err(e) = ops.add(Events::with_data(fd, tag, EventSet::IN)) {
                self.result.set(Some(Err(VmmError::EventLoop(format!(
                    "cannot watch a VM event: {e}"
                )))));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let outcome = match events.data() {
            EV_EXIT => {
                let _ = self.vm.power.exit.read();
                Ok(Outcome::PowerOff)
            }
            EV_RESET => {
                let _ = self.vm.power.reset.read();
                Ok(Outcome::Reboot)
            }
            EV_QUIT => {
                let _ = self.quit.read();
                Ok(Outcome::Quit)
            }
            _ => {
                let _ = self.vm.vcpu_evt.read();
                // Several vCPUs may have reported; the first real reason wins.
                let mut first = None;
                while let Ok(ev) = self.vm.vcpu_events.try_recv() {
                    if first.is_none() && ev.reason != VcpuExitReason::Stopped {
                        first = Some(ev);
                    }
                }
                let Some(ev) = first else { return };
                match ev.reason {
                    VcpuExitReason::Stopped | VcpuExitReason::PowerOff => Ok(Outcome::PowerOff),
                    VcpuExitReason::Reset => Ok(Outcome::Reboot),
                    VcpuExitReason::TripleFault => Err(VmmError::TripleFault(ev.id)),
                    VcpuExitReason::Failed(reason) => {
                        Err(VmmError::VcpuFailed { id: ev.id, reason })
                    }
                }
            }
        };
        self.result.set(Some(outcome));
    }
}

/// Drives the RTC's once-a-second update (and its interrupts) from the RTC's timerfd.
struct RtcTimer(Arc<Mutex<devices::cmos::Cmos>>);

impl MutEventSubscriber for RtcTimer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(fd) = lock(&self.0).timer_fd() {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                eprintln!("vmm: cannot watch the RTC timer, RTC interrupts disabled: {e}");
            }
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        lock(&self.0).handle_timer();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let threads = std::mem::take(&mut self.vm.threads);
        vcpu::stop_all(&self.vm.control, threads, VCPU_STOP_TIMEOUT);
    }
}
