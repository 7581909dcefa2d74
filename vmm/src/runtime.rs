//! The VMM thread at run time: the event loop of one VM incarnation, and the controller that
//! executes `VmmAction`s from the control plane against it.
//!
//! Everything that can end an incarnation — the guest powering off or resetting (through ACPI,
//! the i8042, or KVM system events), a vCPU failing, a control action, a signal, `Ctrl-A x` —
//! arrives here as an fd event and becomes one [`Outcome`].

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::action::{
    MigrationCapability, MigrationCapabilityState, MigrationInfo, MigrationParameters,
    MigrationStatus,
};
use api::controller::{ControllerInbox, EventBus};
use api::{
    ActionError, Refusal, ShutdownCause, VcpuInfo, VersionInfo, VmConfig, VmEvent, VmInfo, VmState,
    VmmAction, VmmResponse,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::RunningVm;
use crate::console::SerialBackend;
use crate::metrics::Meter;
use crate::vcpu::VcpuExitReason;
use crate::{lock, VmmError, VCPU_STOP_TIMEOUT};

mod migrate;
mod savevm;

/// How long a pause request waits for the vCPUs to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How one VM incarnation ended.
pub enum Outcome {
    /// The VM must go away and the process exit.
    Shutdown(ShutdownCause),
    /// The VM must be reset (rebuilt), or exit if the guest asked and on_reboot says so.
    Reset(ShutdownCause),
    /// The VM must be rebuilt from this state (`loadvm`): its disks were reverted already.
    Load(Box<crate::snapshot::Loaded>),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Shutdown(c) => write!(f, "Shutdown({c:?})"),
            Outcome::Reset(c) => write!(f, "Reset({c:?})"),
            Outcome::Load(_) => f.write_str("Load"),
        }
    }
}

/// Process-wide state the incarnations share.
pub struct Shared {
    /// The configuration.
    pub config: Arc<VmConfig>,
    /// Control-plane requests.
    pub inbox: Rc<ControllerInbox>,
    /// Control-plane events.
    pub bus: EventBus,
    /// The VM's run state, kept across resets.
    pub state: Rc<Cell<VmState>>,
    /// Written by the termination signal handler.
    pub signal: Arc<EventFd>,
    /// The last migration or snapshot, and the migration capabilities.
    pub migration: Rc<Migration>,
    /// The MSRs KVM can save on this host.
    pub msr_index: Arc<Vec<u32>>,
}

/// The last migration or snapshot (for `query-migrate`) and the migration capabilities; kept
/// for the process's life, across VM resets.
pub struct Migration {
    info: RefCell<MigrationInfo>,
    events: Cell<bool>,
    bus: EventBus,
    /// Shared with a running migration's worker, which reads them at every step.
    params: Arc<Mutex<MigrationParameters>>,
}

impl Migration {
    /// No migration yet, events off, QEMU's default parameters.
    pub fn new(bus: EventBus) -> Migration {
        Migration {
            info: RefCell::new(MigrationInfo::default()),
            events: Cell::new(false),
            bus,
            params: Arc::new(Mutex::new(MigrationParameters::default())),
        }
    }

    /// Records where the migration stands; a change of status is published when the
    /// `events` capability is on.
    pub fn set(&self, info: MigrationInfo) {
        let status = info.status;
        let before = std::mem::replace(&mut *self.info.borrow_mut(), info).status;
        if self.events.get() && status != before {
            self.bus.publish(VmEvent::Migration(status));
        }
    }

    /// The status now.
    pub fn status(&self) -> MigrationStatus {
        self.info.borrow().status
    }

    /// A round of a live migration began (QMP `MIGRATION_PASS`, with `events` on).
    pub fn pass(&self, pass: u64) {
        // query-migrate agrees with the event from the moment it is sent (the worker's next
        // progress report comes a little later).
        if let Some(ram) = self.info.borrow_mut().ram.as_mut() {
            ram.dirty_sync_count = ram.dirty_sync_count.max(pass);
        }
        if self.events.get() {
            self.bus.publish(VmEvent::MigrationPass(pass));
        }
    }

    /// The parameters, as a running migration sees them.
    pub fn params(&self) -> Arc<Mutex<MigrationParameters>> {
        self.params.clone()
    }

    /// Answers the migration queries and capability settings, the same in every state.
    pub fn action(&self, action: &VmmAction) -> Option<VmmResponse> {
        match action {
            VmmAction::QueryMigrate => {
                Some(VmmResponse::Migration(Box::new(self.info.borrow().clone())))
            }
            VmmAction::SetMigrationCapabilities(caps) => {
                for c in caps {
                    match c.capability {
                        MigrationCapability::Events => self.events.set(c.state),
                    }
                }
                Some(VmmResponse::Done)
            }
            VmmAction::GetMigrationParameters => {
                Some(VmmResponse::MigrationParameters(*lock(&self.params)))
            }
            VmmAction::SetMigrationParameters(update) => {
                update.apply(&mut lock(&self.params));
                Some(VmmResponse::Done)
            }
            VmmAction::GetMigrationCapabilities => Some(VmmResponse::MigrationCapabilities(vec![
                MigrationCapabilityState {
                    capability: MigrationCapability::Events,
                    state: self.events.get(),
                },
            ])),
            _ => None,
        }
    }
}

/// Runs the event loop of one VM incarnation until it ends, then stops its vCPUs.
pub fn run_incarnation(
    vm: RunningVm,
    serial: &SerialBackend,
    shared: &Shared,
    meter: &Rc<RefCell<Meter>>,
) -> Result<Outcome, VmmError> {
    let result = Rc::new(Cell::new(None));
    let quit = Arc::new(
        EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::EventLoop(format!("cannot create an eventfd: {e}")))?,
    );
    let mut em: EventManager<Box<dyn MutEventSubscriber>> =
        EventManager::new().map_err(|e| VmmError::EventLoop(e.to_string()))?;
    let serial_dev = vm.devices.serial.clone();
    let rtc = RtcTimer(vm.devices.cmos.clone());
    let virtio = vm.virtio.clone();
    let sampler = MetricsTimer::new(meter.clone(), vm.control.clone())?;
    let control = Control {
        vm,
        quit: quit.clone(),
        result: result.clone(),
        config: shared.config.clone(),
        inbox: shared.inbox.clone(),
        bus: shared.bus.clone(),
        state: shared.state.clone(),
        signal: shared.signal.clone(),
        migration: shared.migration.clone(),
        msr_index: shared.msr_index.clone(),
        meter: meter.clone(),
        outgoing: migrate::OutgoingState::new()?,
    };
    let control_id = em.add_subscriber(Box::new(control));
    em.add_subscriber(Box::new(rtc));
    em.add_subscriber(Box::new(sampler));
    for dev in virtio {
        em.add_subscriber(Box::new(dev));
    }
    if let Some(input) = serial.input_subscriber(serial_dev, quit) {
        em.add_subscriber(input);
    }
    let outcome = loop {
        if let Some(done) = result.take() {
            break done;
        }
        if let Err(e) = em.run() {
            // EINTR from a signal is not an error.
            if e != event_manager::Error::Epoll(vmm_sys_util::errno::Error::new(libc::EINTR)) {
                break Err(VmmError::EventLoop(e.to_string()));
            }
        }
    };
    // Dropping the controller stops the vCPUs.
    let control = em
        .remove_subscriber(control_id)
        .map_err(|e| VmmError::EventLoop(e.to_string()))?;
    drop(control);
    outcome
}

/// A NIC as the control plane reports it.
fn nic_info(n: &crate::net::NicHandle) -> api::action::NicInfo {
    let c = n.shared.counters.snapshot();
    let (rx_rate_limiter, tx_rate_limiter) = *lock(&n.limits);
    api::action::NicInfo {
        id: n.id.clone(),
        tap: n.tap.clone(),
        mac: virtio::net::format_mac(&n.mac),
        model: "virtio-net-pci".into(),
        vhost: n.vhost,
        queues: n.queues,
        link_up: n.shared.link_up(),
        rx_rate_limiter,
        tx_rate_limiter,
        counters: api::action::NicCounters {
            rx_bytes: c.rx_bytes,
            rx_packets: c.rx_packets,
            rx_dropped: c.rx_dropped,
            rx_errors: c.rx_errors,
            tx_bytes: c.tx_bytes,
            tx_packets: c.tx_packets,
            tx_dropped: c.tx_dropped,
            tx_errors: c.tx_errors,
        },
    }
}

/// The balloon as the control plane reports it.
fn balloon_info(b: &virtio::balloon::BalloonShared) -> api::balloon::BalloonInfo {
    let stats = b.stats();
    let c = b.counters();
    api::balloon::BalloonInfo {
        memory_bytes: b.memory_bytes(),
        target_bytes: b.target(),
        actual_bytes: b.actual(),
        stats_interval_s: b.stats_interval(),
        stats: api::balloon::QEMU_STAT_NAMES
            .iter()
            .enumerate()
            .filter_map(|(tag, n)| stats.get(tag).map(|v| (n.to_string(), v)))
            .collect(),
        last_update: stats.last_update,
        counters: api::balloon::BalloonCounters {
            inflated_pages: c.inflated_pages,
            deflated_pages: c.deflated_pages,
            reported_bytes: c.reported_bytes,
            invalid_pages: c.invalid_pages,
            duplicate_pages: c.duplicate_pages,
            bad_requests: c.bad_requests,
        },
    }
}

/// Subscriber for the VM's own events and the control plane. Dropping it stops the vCPUs.
struct Control {
    vm: RunningVm,
    quit: Arc<EventFd>,
    result: Rc<Cell<Option<Result<Outcome, VmmError>>>>,
    config: Arc<VmConfig>,
    inbox: Rc<ControllerInbox>,
    bus: EventBus,
    state: Rc<Cell<VmState>>,
    signal: Arc<EventFd>,
    migration: Rc<Migration>,
    msr_index: Arc<Vec<u32>>,
    meter: Rc<RefCell<Meter>>,
    /// A live migration from here, and where its switchover stands.
    outgoing: migrate::OutgoingState,
}

const EV_EXIT: u32 = 0;
const EV_RESET: u32 = 1;
const EV_VCPU: u32 = 2;
const EV_QUIT: u32 = 3;
const EV_ACTION: u32 = 4;
const EV_SIGNAL: u32 = 5;
const EV_MIGRATION: u32 = 6;

impl Control {
    fn finish(&self, outcome: Result<Outcome, VmmError>) {
        // The first reason wins; later ones (e.g. vCPUs reporting they stopped) are noise.
        let prev = self.result.take();
        self.result.set(Some(prev.unwrap_or(outcome)));
    }

    fn on_vcpu_events(&mut self) {
        let _ = self.vm.vcpu_evt.read();
        // Several vCPUs may have reported; the first real reason wins.
        let mut first = None;
        while let Ok(ev) = self.vm.vcpu_events.try_recv() {
            if first.is_none() && ev.reason != VcpuExitReason::Stopped {
                first = Some(ev);
            }
        }
        let Some(ev) = first else { return };
        let outcome = match ev.reason {
            VcpuExitReason::Stopped | VcpuExitReason::PowerOff => {
                Ok(Outcome::Shutdown(ShutdownCause::GuestShutdown))
            }
            VcpuExitReason::Reset => Ok(Outcome::Reset(ShutdownCause::GuestReset)),
            VcpuExitReason::TripleFault(state) => Err(VmmError::TripleFault { id: ev.id, state }),
            VcpuExitReason::Failed(reason) => Err(VmmError::VcpuFailed { id: ev.id, reason }),
        };
        self.finish(outcome);
    }

    /// Hands an agent command (raw or typed) to the agent's worker thread, which replies when
    /// the guest answers or the command times out: the event loop never waits on the guest.
    fn agent_command(&mut self, req: api::controller::ActionRequest) {
        if let Err(e) = self.state.get().check(&req.action) {
            return (req.reply)(Err(e));
        }
        let refused = |kind: Refusal, reason: String| ActionError::Refused {
            action: "agent",
            reason,
            kind,
        };
        let Some(agent) = &self.vm.agent else {
            return (req.reply)(Err(refused(
                Refusal::NotNow,
                "the VM has no guest agent channel (start it with --agent or \"agent\": true)"
                    .into(),
            )));
        };
        let (command, arguments, timeout, verb) = match req.action {
            VmmAction::AgentCommand {
                execute,
                arguments,
                timeout,
            } => (execute, arguments, timeout, None),
            VmmAction::AgentVerb(verb) => {
                let (command, arguments) = crate::agent_verbs::command(verb);
                (command.to_string(), arguments, None, Some(verb))
            }
            _ => return,
        };
        let reply = req.reply;
        let sent = arguments.clone();
        agent.worker.submit(crate::agent::AgentJob {
            command,
            arguments,
            timeout: timeout.map_or(
                crate::agent::DEFAULT_TIMEOUT,
                std::time::Duration::from_secs,
            ),
            reply: Box::new(move |r| {
                let r = r
                    .map_err(|e| refused(agent_refusal(&e), e.to_string()))
                    .and_then(|v| match verb {
                        None => Ok(VmmResponse::Agent(v)),
                        Some(api::AgentVerb::Shutdown { .. }) => Ok(VmmResponse::Done),
                        Some(verb) => crate::agent_verbs::answer(verb, sent.as_ref(), v)
                            .map(VmmResponse::Agent)
                            .map_err(|reason| refused(Refusal::GuestError, reason)),
                    });
                reply(r)
            }),
        });
    }

    /// Answers a metrics request: the host's figures at once, the guest's within a second.
    fn metrics(&mut self, req: api::controller::ActionRequest) {
        if let Err(e) = self.state.get().check(&req.action) {
            return (req.reply)(Err(e));
        }
        let tids = vcpu_tids(&self.vm.control);
        let reply = req.reply;
        self.meter.borrow_mut().request(
            &tids,
            Box::new(move |m| reply(Ok(VmmResponse::Metrics(Box::new(m))))),
        );
    }

    /// The NIC with this id (QEMU's DeviceNotFound otherwise).
    fn nic(&self, id: &str) -> Result<&crate::net::NicHandle, ActionError> {
        self.vm
            .nics
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ActionError::DeviceNotFound(id.to_string()))
    }

    /// Executes one control-plane action against this incarnation.
    fn execute(&mut self, action: &VmmAction) -> Result<VmmResponse, ActionError> {
        let state = self.state.get();
        let next = state.check(action)?;
        let failed = |reason: String| ActionError::Failed {
            action: action.name(),
            reason,
        };
        match action {
            VmmAction::GetVmInfo => {
                let vcpus = self
                    .vm
                    .control
                    .thread_ids()
                    .into_iter()
                    .enumerate()
                    .map(|(i, thread_id)| VcpuInfo {
                        index: i as u8,
                        thread_id,
                    })
                    .collect();
                return Ok(VmmResponse::VmInfo(Box::new(VmInfo {
                    state,
                    config: (*self.config).clone(),
                    vcpus,
                    nics: self.vm.nics.iter().map(nic_info).collect(),
                    agent: self.vm.agent.as_ref().map(|a| api::AgentInfo {
                        connected: a.connected.load(std::sync::atomic::Ordering::SeqCst),
                    }),
                })));
            }
            VmmAction::GetVersion => return Ok(VmmResponse::Version(VersionInfo::current())),
            VmmAction::Pause => {
                if !self.vm.control.pause(&self.vm.threads, PAUSE_TIMEOUT) {
                    self.vm.control.resume();
                    return Err(failed("the vCPUs did not stop in time".into()));
                }
                self.state.set(next);
                self.bus.publish(VmEvent::Stop);
            }
            VmmAction::Resume => {
                // After a completed migration the disks were handed over: take them back
                // first (refused when the destination holds them).
                self.take_back_storage().map_err(failed)?;
                self.vm.control.resume();
                self.state.set(next);
                self.bus.publish(VmEvent::Resume);
            }
            VmmAction::PowerButton => {
                lock(&self.vm.devices.ged)
                    .notify_power_button()
                    .map_err(|e| failed(e.to_string()))?;
                self.bus.publish(VmEvent::Powerdown);
            }
            VmmAction::Reset => {
                self.finish(Ok(Outcome::Reset(ShutdownCause::HostQmpSystemReset)));
            }
            VmmAction::Shutdown => {
                self.state.set(next);
                self.finish(Ok(Outcome::Shutdown(ShutdownCause::HostQmpQuit)));
            }
            VmmAction::Snapshot { path } => {
                self.refuse_during_migration()?;
                self.snapshot(path, state).map_err(failed)?;
                self.state.set(next);
            }
            VmmAction::Migrate { to } => {
                self.refuse_during_migration()?;
                self.start_migration(to).map_err(failed)?;
            }
            VmmAction::MigrateCancel => self.cancel_migration(),
            VmmAction::SaveVm(req) => {
                self.refuse_during_migration()?;
                self.savevm(req, state)
                    .map_err(|e| e.into_action_error(action.name()))?;
            }
            VmmAction::LoadVm(req) => {
                self.refuse_during_migration()?;
                self.loadvm(req, state)
                    .map_err(|e| e.into_action_error(action.name()))?;
            }
            VmmAction::DelVm(req) => {
                self.refuse_during_migration()?;
                self.delvm(req)
                    .map_err(|e| e.into_action_error(action.name()))?;
            }
            VmmAction::ListVmSnapshots => {
                return Ok(VmmResponse::VmSnapshots(self.list_snapshots()));
            }
            VmmAction::QueryMigrate
            | VmmAction::SetMigrationCapabilities(_)
            | VmmAction::GetMigrationCapabilities
            | VmmAction::GetMigrationParameters
            | VmmAction::SetMigrationParameters(_) => {
                return self
                    .migration
                    .action(action)
                    .ok_or_else(|| failed("unknown migration action".into()));
            }
            VmmAction::SetLink { id, up } => {
                self.nic(id)?.shared.set_link(*up);
            }
            VmmAction::SetNetRateLimit { id, rx, tx } => {
                self.nic(id)?.set_rate_limits(*rx, *tx);
            }
            VmmAction::QueryBlockStats => {
                return Ok(VmmResponse::BlockStats(self.meter.borrow().block_stats()))
            }
            VmmAction::SetBalloon { target, clamp } => {
                let b = self.vm.balloon.as_ref().ok_or(ActionError::NoBalloon)?;
                let target = match clamp {
                    true => (*target).min(b.memory_bytes()),
                    false => *target,
                };
                b.set_target(target).map_err(|e| ActionError::Refused {
                    action: "balloon",
                    reason: e.to_string(),
                    kind: Refusal::BadArgument,
                })?;
            }
            VmmAction::GetBalloon => {
                let b = self.vm.balloon.as_ref().ok_or(ActionError::NoBalloon)?;
                return Ok(VmmResponse::Balloon(Box::new(balloon_info(b))));
            }
            VmmAction::SetBalloonStatsInterval(seconds) => {
                let b = self.vm.balloon.as_ref().ok_or(ActionError::NoBalloon)?;
                b.set_stats_interval(*seconds);
            }
            // Answered by the agent worker or the meter (see `process`), never here.
            VmmAction::AgentCommand { .. } | VmmAction::AgentVerb(_) | VmmAction::GetMetrics => {
                return Err(failed("the request was not dispatched".into()))
            }
            // Only a VMM waiting for a state (`--incoming defer`) restores; `check` refuses it
            // here, and this arm keeps it so.
            VmmAction::Restore { .. } | VmmAction::MigrateIncoming { .. } => {
                return Err(ActionError::InvalidState {
                    action: action.name(),
                    state,
                })
            }
        }
        Ok(VmmResponse::Done)
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            (&self.vm.power.exit, EV_EXIT),
            (&self.vm.power.reset, EV_RESET),
            (&*self.vm.vcpu_evt, EV_VCPU),
            (&*self.quit, EV_QUIT),
            (self.inbox.waker(), EV_ACTION),
            (&*self.signal, EV_SIGNAL),
            (&*self.outgoing.wake, EV_MIGRATION),
        ];
        for (fd, tag) in fds {
            if let Err(e) = ops.add(Events::with_data(fd, tag, EventSet::IN)) {
                self.finish(Err(VmmError::EventLoop(format!(
                    "cannot watch a VM event: {e}"
                ))));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EV_EXIT => {
                let _ = self.vm.power.exit.read();
                self.finish(Ok(Outcome::Shutdown(ShutdownCause::GuestShutdown)));
            }
            EV_RESET => {
                let _ = self.vm.power.reset.read();
                self.finish(Ok(Outcome::Reset(ShutdownCause::GuestReset)));
            }
            EV_QUIT => {
                let _ = self.quit.read();
                self.finish(Ok(Outcome::Shutdown(ShutdownCause::HostSignal)));
            }
            EV_SIGNAL => {
                let _ = self.signal.read();
                self.finish(Ok(Outcome::Shutdown(ShutdownCause::HostSignal)));
            }
            EV_MIGRATION => self.on_migration_events(),
            EV_ACTION => {
                for req in self.inbox.drain() {
                    match req.action {
                        VmmAction::AgentCommand { .. } | VmmAction::AgentVerb(_) => {
                            self.agent_command(req);
                            continue;
                        }
                        VmmAction::GetMetrics => {
                            self.metrics(req);
                            continue;
                        }
                        _ => {}
                    }
                    let result = self.execute(&req.action);
                    (req.reply)(result);
                }
            }
            _ => self.on_vcpu_events(),
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.abandon_migration();
        let threads = std::mem::take(&mut self.vm.threads);
        self.vm
            .vm
            .stop_vcpus(&self.vm.control, threads, VCPU_STOP_TIMEOUT);
    }
}

/// Whose side an agent failure is on: a command the agent refused or one that was malformed
/// is the client's (400), a channel with nobody on it is "not now" (409), silence and garbage
/// are the guest's (504, 502).
fn agent_refusal(e: &crate::agent::AgentError) -> Refusal {
    use crate::agent::AgentError::*;
    match e {
        Refused { .. } | BadCommand(_) => Refusal::BadArgument,
        Closed => Refusal::NotNow,
        Timeout(_) => Refusal::GuestTimeout,
        Garbage(_) => Refusal::GuestError,
    }
}

/// The vCPU threads' ids now (0 for one not started).
fn vcpu_tids(control: &crate::vcpu::VcpuControl) -> Vec<i32> {
    control
        .thread_ids()
        .into_iter()
        .map(|t| t.unwrap_or(0))
        .collect()
}

/// Takes the meter's periodic sample from a timerfd on the VMM thread.
struct MetricsTimer {
    meter: Rc<RefCell<Meter>>,
    control: Arc<crate::vcpu::VcpuControl>,
    timer: vmm_sys_util::timerfd::TimerFd,
}

impl MetricsTimer {
    fn new(
        meter: Rc<RefCell<Meter>>,
        control: Arc<crate::vcpu::VcpuControl>,
    ) -> Result<MetricsTimer, VmmError> {
        let fail =
            |e: vmm_sys_util::errno::Error| VmmError::EventLoop(format!("metrics timer: {e}"));
        let mut timer = vmm_sys_util::timerfd::TimerFd::new().map_err(fail)?;
        let period = meter.borrow().period();
        timer.reset(period, Some(period)).map_err(fail)?;
        Ok(MetricsTimer {
            meter,
            control,
            timer,
        })
    }
}

impl MutEventSubscriber for MetricsTimer {
    fn init(&mut self, ops: &mut EventOps) {
        // The incarnation's first sample: rates are computed against it until the next.
        self.meter.borrow_mut().tick(&vcpu_tids(&self.control));
        if let Err(e) = ops.add(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN)) {
            eprintln!("vmm: cannot watch the metrics timer, rates will be unavailable: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.meter.borrow_mut().tick(&vcpu_tids(&self.control));
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

/// The fd the termination-signal handler writes to (-1 until installed).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

/// Routes SIGTERM, SIGINT and SIGHUP to `evt`, so they end the VM cleanly (SHUTDOWN event,
/// sockets removed, terminal restored) instead of killing the process mid-flight.
pub fn install_termination_handler(evt: &EventFd) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;
    extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let fd = SIGNAL_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; the buffer is a live 8-byte local and the
            // fd is an eventfd that lives for the whole process (leaked by the installer).
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| VmmError::EventLoop(format!("cannot install a signal handler: {e}")))?;
    }
    Ok(())
}
