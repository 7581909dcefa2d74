//! The vmm: the glue between KVM, the boot code and the devices, and the loop that runs a VM
//! from its configuration until the guest powers off.
//!
//! Threads: one thread per vCPU (`vcpu`), and the VMM thread, which runs the event loop
//! (`runtime`: host console input, power and reset requests from devices, vCPU exit reports,
//! control-plane actions).

pub mod builder;
pub mod cli;
pub mod console;
pub mod ctl;
pub mod device_manager;
pub mod img;
pub mod kvm;
pub mod pci;
pub mod runtime;
pub mod vcpu;
pub mod vm;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use api::controller::{action_channel, EventBus};
use api::http::ApiServer;
use api::qmp::QmpServer;
use api::{ActionError, OnReboot, ShutdownCause, VmConfig, VmEvent, VmState};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{build_vm, BuildError};
use crate::console::{ConsoleError, SerialBackend};
use crate::kvm::{Hypervisor, KvmError};
use crate::runtime::{run_incarnation, Outcome, Shared};

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
    /// A control socket could not be opened.
    #[error(transparent)]
    Server(#[from] api::server::ServerError),
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
    #[error("the guest triple-faulted (vCPU {id}: {state}); the VM was stopped")]
    TripleFault {
        /// Which vCPU.
        id: u8,
        /// Its registers at the time.
        state: String,
    },
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
    let eventfd = || {
        EventFd::new(libc::EFD_NONBLOCK)
            .map(Arc::new)
            .map_err(|e| VmmError::EventLoop(format!("cannot create an eventfd: {e}")))
    };
    let signal = eventfd()?;
    runtime::install_termination_handler(&signal)?;
    let (controller, inbox) = action_channel()
        .map_err(|e| VmmError::EventLoop(format!("cannot create the action channel: {e}")))?;
    let bus = EventBus::new();
    let qmp = match cfg.qmp.is_empty() {
        true => None,
        false => {
            let events = bus
                .subscribe()
                .map_err(|e| VmmError::EventLoop(format!("cannot subscribe to VM events: {e}")))?;
            Some(QmpServer::start(&cfg.qmp, controller.clone(), events)?)
        }
    };
    let api = match &cfg.api_socket {
        Some(path) => Some(ApiServer::start(path, controller.clone())?),
        None => None,
    };
    let shared = Shared {
        config: Arc::new(cfg.clone()),
        inbox: Rc::new(inbox),
        bus,
        state: Rc::new(Cell::new(VmState::Running)),
        signal,
    };
    let serial = SerialBackend::open(&cfg.serial)?;
    let result = run_vm(&hv, &cpuid, cfg, &serial, &shared);
    // Whoever still waits for an answer gets one; then the doors flush what they have queued
    // (the SHUTDOWN event above all), close, and remove their socket files.
    for req in shared.inbox.drain() {
        (req.reply)(Err(ActionError::Unavailable));
    }
    if let Some(qmp) = qmp {
        qmp.shutdown();
    }
    if let Some(api) = api {
        api.shutdown();
    }
    result
}

/// Builds the VM and runs incarnation after incarnation (resets) until it shuts down.
fn run_vm(
    hv: &Hypervisor,
    cpuid: &kvm_bindings::CpuId,
    cfg: &VmConfig,
    serial: &SerialBackend,
    shared: &Shared,
) -> Result<(), VmmError> {
    loop {
        let paused = shared.state.get() == VmState::Paused;
        let running = build_vm(hv, cpuid, cfg, serial, paused)?;
        let outcome = match run_incarnation(running, serial, shared) {
            Ok(o) => o,
            Err(e) => {
                shared.state.set(VmState::ShuttingDown);
                shared
                    .bus
                    .publish(VmEvent::Shutdown(ShutdownCause::GuestPanic));
                return Err(e);
            }
        };
        match outcome {
            Outcome::Reset(cause)
                if cause != ShutdownCause::GuestReset || cfg.on_reboot == OnReboot::Restart =>
            {
                if cause == ShutdownCause::GuestReset {
                    eprintln!("vmm: guest rebooted; restarting it");
                }
                shared.bus.publish(VmEvent::Reset(cause));
            }
            Outcome::Reset(cause) | Outcome::Shutdown(cause) => {
                if cause == ShutdownCause::HostSignal {
                    eprintln!("vmm: terminating on request (signal or console escape)");
                }
                shared.state.set(VmState::ShuttingDown);
                shared.bus.publish(VmEvent::Shutdown(cause));
                return Ok(());
            }
        }
    }
}
