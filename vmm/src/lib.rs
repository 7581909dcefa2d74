//! The vmm: the glue between KVM, the boot code and the devices, and the loop that runs a VM
//! from its configuration until the guest powers off.
//!
//! Threads: one thread per vCPU (`vcpu`), and the VMM thread, which runs the event loop
//! (`runtime`: host console input, power and reset requests from devices, vCPU exit reports,
//! control-plane actions).

pub mod agent;
pub mod agent_verbs;
pub mod builder;
pub mod cli;
pub mod console;
pub mod ctl;
pub mod device_manager;
pub mod img;
pub mod incoming;
pub mod kernel_cache;
pub mod kvm;
pub mod logger;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod pci;
pub mod registry;
pub mod runtime;
pub mod snapshot;
pub mod vconsole;
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
use crate::snapshot::Loaded;

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
    /// A saved state could not be read.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A NIC could not be set up.
    #[error(transparent)]
    Net(#[from] net::NetSetupError),
    /// The virtio console or a channel could not be set up.
    #[error(transparent)]
    Vconsole(#[from] vconsole::VconsoleError),
    /// An incoming live migration failed.
    #[error("incoming migration failed: {0}")]
    Incoming(String),
}

impl VmmError {
    /// Whether the error comes from what the user gave (a saved state that is malformed or
    /// does not fit): such errors end the VMM with status 2, before any guest code ran.
    pub fn is_bad_input(&self) -> bool {
        match self {
            VmmError::Build(b) => b.is_bad_input(),
            VmmError::Snapshot(_) | VmmError::Net(_) | VmmError::Vconsole(_) => true,
            _ => false,
        }
    }
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

/// How the VM comes to be.
pub enum Start {
    /// Boot the configured kernel.
    Boot,
    /// Put a saved state back (`--incoming file:`); the configuration was merged already.
    Restore(Box<Loaded>),
    /// Wait for the control plane to name a state file (`--incoming defer`), which must meet
    /// these constraints.
    Defer {
        /// What the user said about the machine.
        constraints: cli::Constraints,
        /// Whether --on-reboot was given.
        on_reboot_given: bool,
        /// Listen for a live migration there at once (`--incoming tcp:...`).
        listen: Option<api::MigrationAddress>,
    },
}

/// Runs a VM until the guest powers off (Ok) or something fails (Err). `cfg` must have passed
/// `VmConfig::validate` (booting) or be a restored VM's merged configuration; when deferring,
/// only its front doors are used until a state arrives. `paused` keeps the vCPUs stopped until
/// a resume.
pub fn run(cfg: &VmConfig, start: Start, paused: bool) -> Result<(), VmmError> {
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
    let msr_index = snapshot::cpu::saveable_msrs(hv.kvm()).unwrap_or_default();
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
    let initial = match (&start, paused) {
        (Start::Defer { .. }, _) => VmState::Incoming,
        (_, true) => VmState::Paused,
        (_, false) => VmState::Running,
    };
    let shared = Shared {
        config: Arc::new(cfg.clone()),
        inbox: Rc::new(inbox),
        migration: Rc::new(runtime::Migration::new(bus.clone())),
        bus,
        state: Rc::new(Cell::new(initial)),
        signal,
        msr_index: Arc::new(msr_index),
    };
    let serial = SerialBackend::open(&cfg.serial)?;
    let result = (|| {
        let (restore, shared) = match start {
            Start::Boot => (None, shared),
            Start::Restore(loaded) => (Some(loaded), shared),
            Start::Defer {
                constraints,
                on_reboot_given,
                listen,
            } => match incoming::wait(&shared, &constraints, on_reboot_given, paused, listen)? {
                Some((loaded, cfg)) => (
                    Some(loaded),
                    Shared {
                        config: Arc::new(cfg),
                        ..shared
                    },
                ),
                None => return Ok(()),
            },
        };
        let r = run_vm(&hv, &cpuid, &serial, &shared, restore);
        for req in shared.inbox.drain() {
            (req.reply)(Err(ActionError::Unavailable));
        }
        r
    })();
    // The doors flush what they have queued (the SHUTDOWN event above all), close, and remove
    // their socket files.
    if let Some(qmp) = qmp {
        qmp.shutdown();
    }
    if let Some(api) = api {
        api.shutdown();
    }
    result
}

/// Builds the VM (from `restore` the first time, if given) and runs incarnation after
/// incarnation (resets) until it shuts down.
fn run_vm(
    hv: &Hypervisor,
    cpuid: &kvm_bindings::CpuId,
    serial: &SerialBackend,
    shared: &Shared,
    mut restore: Option<Box<Loaded>>,
) -> Result<(), VmmError> {
    let cfg = shared.config.clone();
    // A live migration's source waits for our answer: a host backend that cannot be opened
    // here (a tap in use, a socket path taken) is a refusal it hears about, and it keeps the VM.
    let refuse = |restore: &mut Option<Box<Loaded>>, e: &VmmError| {
        if let Some(peer) = restore.as_mut().and_then(|l| l.peer.take()) {
            peer.refuse(&e.to_string());
        }
    };
    // The taps live as long as the VMM: every incarnation's NICs use them.
    let nets = match net::NetBackends::open(&cfg) {
        Ok(n) => n,
        Err(e) => {
            let e = e.into();
            refuse(&mut restore, &e);
            return Err(e);
        }
    };
    // The console's and the channels' sockets too: a client stays connected across reboots.
    let consoles =
        match vconsole::ConsoleBackends::open(&cfg, shared.signal.clone(), shared.bus.clone()) {
            Ok(c) => c,
            Err(e) => {
                let e = e.into();
                refuse(&mut restore, &e);
                return Err(e);
            }
        };
    // The balloon's target and statistics outlive resets, as QEMU's do.
    let balloon = match cfg.balloon {
        Some(b) => {
            let half = virtio::balloon::BalloonShared::new(
                cfg.machine.memory_mib << 20,
                b.stats_interval_s,
            )
            .map_err(|e| VmmError::EventLoop(format!("balloon: {e}")))?;
            let bus = shared.bus.clone();
            half.set_listener(Box::new(move |actual| {
                bus.publish(VmEvent::BalloonChange { actual })
            }));
            Some((
                half,
                virtio::balloon::BalloonOptions {
                    deflate_on_oom: b.deflate_on_oom,
                    free_page_reporting: b.free_page_reporting,
                },
            ))
        }
        None => None,
    };
    // The counters and samples outlive resets, as QEMU's do.
    let meter = Rc::new(std::cell::RefCell::new(metrics::Meter::new(
        std::time::Duration::from_secs(cfg.metrics.interval_s),
        (0..cfg.disks.len())
            .map(|i| (cfg.disk_id(i), Arc::new(virtio::block::BlockStats::new())))
            .collect(),
        nets.handles(),
        consoles.as_ref().and_then(vconsole::ConsoleBackends::agent),
        balloon.as_ref().map(|(b, _)| b.clone()),
    )));
    let disk_stats = meter.borrow().disk_stats();
    loop {
        // A reset keeps a stopped VM stopped (paused, or paused after a snapshot), as QEMU does.
        let paused = matches!(shared.state.get(), VmState::Paused | VmState::PostMigrate);
        let mut loaded = restore.take();
        // A live migration's source waits to hear that the VM runs here; the vCPUs start only
        // once it has been told.
        let peer = loaded.as_mut().and_then(|l| l.peer.take());
        let host = builder::HostBackends {
            serial,
            nets: &nets,
            consoles: consoles.as_ref(),
            disk_stats: &disk_stats,
            balloon: balloon.as_ref().map(|(s, o)| (s, *o)),
        };
        let build_started = std::time::Instant::now();
        let built = build_vm(
            hv,
            cpuid,
            &cfg,
            &host,
            paused || peer.is_some(),
            loaded.as_deref(),
        );
        let running = match (built, peer) {
            (Ok(running), Some(peer)) => {
                log::info!(
                    "migration: the VM was built in {:?}",
                    build_started.elapsed()
                );
                if let Err(e) = peer.confirm() {
                    // The VM is whole here and the source has let go of its disks: this is
                    // the VM now.
                    log::warn!("migration: cannot tell the source that the VM runs here: {e}");
                }
                if !paused {
                    running.control.resume();
                }
                running
            }
            (Err(e), Some(peer)) => {
                peer.refuse(&e.to_string());
                return Err(e.into());
            }
            (built, None) => built?,
        };
        // The restored VM's memory maps the file; `loaded` may go now (the mapping keeps its
        // own reference to the file).
        drop(loaded);
        let outcome = match run_incarnation(running, serial, shared, &meter) {
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
            Outcome::Load(loaded) => {
                // `loadvm`: the next incarnation is the saved VM (the run state was set).
                restore = Some(loaded);
            }
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
