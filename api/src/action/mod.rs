//! The control plane's one vocabulary: every request from the REST API or from QMP becomes a
//! [`VmmAction`], executed on the VMM thread, answered with a typed [`VmmResponse`] or an
//! [`ActionError`]; what happens to the VM is broadcast as [`VmEvent`]s.
//!
//! The VM's state follows explicit transitions ([`VmState::check`]): an action that is illegal in
//! the current state gets [`ActionError::InvalidState`] and changes nothing.
//!
//! Snapshot and restore use QEMU's migration vocabulary (qapi/migration.json): a snapshot is a
//! migration to a file, after which the VM stays paused in [`VmState::PostMigrate`]; a VMM
//! started to receive a state stream waits in [`VmState::Incoming`] until [`VmmAction::Restore`].

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{RateLimiterConfig, VmConfig};

mod migration;
pub use crate::snapshots::{DiskSnapshots, VmSnapshotInfo, VmSnapshotRequest};
pub use migration::*;

/// The VM's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Built, vCPUs not started yet.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs stopped by a pause request.
    Paused,
    /// The VM is going away; no further action is accepted.
    ShuttingDown,
    /// Waiting for an incoming state stream (`--incoming defer`): there is no VM yet, only
    /// [`VmmAction::Restore`] builds one. QEMU's `inmigrate`.
    Incoming,
    /// Paused after its state was saved by a migration or snapshot; [`VmmAction::Resume`]
    /// continues it. QEMU's `postmigrate`.
    PostMigrate,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting_down",
            VmState::Incoming => "incoming",
            VmState::PostMigrate => "post_migrate",
        })
    }
}

/// Something a client asks the VMM to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmAction {
    /// State, configuration and vCPUs.
    GetVmInfo,
    /// The VMM's version.
    GetVersion,
    /// Stop the vCPUs (QMP `stop`).
    Pause,
    /// Restart the vCPUs (QMP `cont`).
    Resume,
    /// Press the ACPI power button: the guest shuts down cleanly if it listens.
    PowerButton,
    /// Reset the VM now, as a hardware reset (QMP `system_reset`).
    Reset,
    /// Stop the VM now and exit the VMM process (QMP `quit`).
    Shutdown,
    /// Save the VM's state to a file (QMP `migrate {"uri": "file:PATH"}`, REST
    /// `PUT /vm/snapshot`, HMP `migrate`). The VM is paused for it and stays paused afterwards
    /// ([`VmState::PostMigrate`]).
    Snapshot {
        /// The file to write (REST and `vmm ctl` send absolute paths; QMP passes the client's
        /// path through, relative to the VMM's working directory, as QEMU does).
        path: PathBuf,
    },
    /// Restore the VM from a state file; only while [`VmState::Incoming`] (QMP
    /// `migrate-incoming`, REST `PUT /vm/restore`, HMP `migrate_incoming`).
    Restore {
        /// The file to read.
        path: PathBuf,
    },
    /// Move the running VM live to a destination VMM listening at `to` (QMP `migrate` with a
    /// `tcp:` or `unix:` URI, HMP `migrate`, REST `PUT /vm/migrate`, `vmm ctl migrate`). The
    /// action answers once the migration has started; `QueryMigrate` follows it. On success the
    /// VM stays paused here ([`VmState::PostMigrate`]); on failure or cancel it goes on.
    Migrate {
        /// The destination.
        to: MigrationAddress,
    },
    /// Cancel the migration in progress, if any (QMP `migrate_cancel` / `migrate-cancel`, HMP
    /// `migrate_cancel`, REST `PUT /vm/migrate/cancel`); the VM goes on as before.
    MigrateCancel,
    /// Receive a live migration on `from` (QMP `migrate-incoming` with a `tcp:` or `unix:`
    /// URI, HMP `migrate_incoming`); only while [`VmState::Incoming`]. Answers once listening.
    MigrateIncoming {
        /// Where to listen.
        from: MigrationAddress,
    },
    /// Change migration parameters (QMP `migrate-set-parameters`, HMP
    /// `migrate_set_parameter`, REST `PUT /vm/migrate/parameters`); members left out keep
    /// their values. Takes effect at once, also on a migration in progress.
    SetMigrationParameters(MigrationParametersUpdate),
    /// The migration parameters (QMP `query-migrate-parameters`, HMP
    /// `info migrate_parameters`, REST `GET /vm/migrate/parameters`); answered with
    /// [`VmmResponse::MigrationParameters`].
    GetMigrationParameters,
    /// Take a whole-VM snapshot inside the VM's qcow2 disks: the VM state into one disk's
    /// VM-state area, an internal snapshot of every disk (HMP `savevm`, QMP `snapshot-save`,
    /// REST `PUT /vm/savevm`, `vmm ctl savevm`). The VM is stopped for it and goes on after.
    SaveVm(VmSnapshotRequest),
    /// Go back to a whole-VM snapshot: every disk reverts to it and the VM continues from its
    /// state (HMP `loadvm`, QMP `snapshot-load`, REST `PUT /vm/loadvm`, `vmm ctl loadvm`).
    LoadVm(VmSnapshotRequest),
    /// Delete a snapshot from every disk (HMP `delvm`, QMP `snapshot-delete`, REST
    /// `PUT /vm/delvm`, `vmm ctl delvm`).
    DelVm(VmSnapshotRequest),
    /// The internal snapshots of the VM's disks (HMP `info snapshots`, REST
    /// `GET /vm/snapshots`, `vmm ctl snapshots`); answered with [`VmmResponse::VmSnapshots`].
    ListVmSnapshots,
    /// The state of the last migration or snapshot (QMP `query-migrate`, REST
    /// `GET /vm/migration`, HMP `info migrate`); answered with [`VmmResponse::Migration`].
    QueryMigrate,
    /// Set migration capabilities (QMP `migrate-set-capabilities`, HMP
    /// `migrate_set_capability`). The doors have already refused the capabilities this VMM
    /// does not implement; entries are applied in order (the last one for a capability wins).
    SetMigrationCapabilities(Vec<MigrationCapabilityState>),
    /// The migration capabilities and their states (QMP `query-migrate-capabilities`);
    /// answered with [`VmmResponse::MigrationCapabilities`].
    GetMigrationCapabilities,
    /// Set a NIC's link up or down (QMP `set_link`, HMP `set_link`, REST
    /// `PUT /vm/nics/{id}/link`): the guest sees carrier come and go; frames are dropped both
    /// ways while it is down.
    SetLink {
        /// The NIC's id.
        id: String,
        /// Up (true) or down.
        up: bool,
    },
    /// Change a NIC's rate limits while it runs (REST `PUT /vm/net-rate-limit`, `vmm ctl
    /// rate-limit`; QEMU has no such command). A direction given replaces that direction's
    /// limiter (an empty one removes the limit); a direction left out is kept.
    SetNetRateLimit {
        /// The NIC's id.
        id: String,
        /// What the guest receives.
        rx: Option<RateLimiterConfig>,
        /// What the guest sends.
        tx: Option<RateLimiterConfig>,
    },
    /// Run a command of the QEMU guest agent in the guest and return its answer (REST
    /// `PUT /vm/agent`, `vmm ctl agent`; what `virsh qemu-agent-command` does); answered with
    /// [`VmmResponse::Agent`]. Needs the VM's built-in agent channel (`"agent": true`).
    AgentCommand {
        /// The agent command (`guest-ping`, `guest-network-get-interfaces`, ...).
        execute: String,
        /// Its arguments (an object), if any.
        arguments: Option<serde_json::Value>,
        /// Seconds to wait for the answer (10 when absent).
        timeout: Option<u64>,
    },
    /// A typed guest-agent operation (REST `/vm/agent/...`, `vmm ctl domifaddr|fsinfo|...`),
    /// answered with [`VmmResponse::Agent`] in this VMM's own shape (snake_case members).
    AgentVerb(AgentVerb),
    /// The VM's figures (REST `GET /vm/metrics` and `GET /metrics`, `vmm ctl metrics`);
    /// answered with [`VmmResponse::Metrics`], within a second even when the agent is silent.
    GetMetrics,
    /// Every disk's counters (QMP `query-blockstats`, HMP `info blockstats`); answered with
    /// [`VmmResponse::BlockStats`].
    QueryBlockStats,
    /// Ask the guest to keep `target` bytes of RAM through the balloon (QMP `balloon`, HMP
    /// `balloon`, REST `PUT /vm/balloon`, `vmm ctl balloon N`). With `clamp` (QEMU's QMP) a
    /// target above the VM's memory means all of it; otherwise it is refused.
    SetBalloon {
        /// Bytes of RAM the guest should keep.
        target: u64,
        /// Take a target above the VM's memory as all of it.
        clamp: bool,
    },
    /// The balloon and the guest's statistics (QMP `query-balloon` and QOM `guest-stats`, HMP
    /// `info balloon`, REST `GET /vm/balloon`); answered with [`VmmResponse::Balloon`].
    GetBalloon,
    /// Seconds between two requests for the guest's statistics, 0 for none (QOM
    /// `guest-stats-polling-interval`, REST `PUT /vm/balloon`).
    SetBalloonStatsInterval(u32),
}

/// The guest-agent operations operators use daily, each one agent command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentVerb {
    /// The guest's network interfaces and addresses (`virsh domifaddr --source agent`).
    Interfaces,
    /// Mounted filesystems with used and total bytes (`virsh domfsinfo`).
    Filesystems,
    /// The guest's OS (`virsh guestinfo --os`).
    OsInfo,
    /// Freeze the guest's filesystems (before a disk snapshot); answers how many.
    FsFreeze,
    /// Thaw them; answers how many.
    FsThaw,
    /// Set the guest's clock: to `time_ns` (ns since the Unix epoch), or the host's clock now
    /// (after a restore, `virsh domtime --sync`).
    SetTime {
        /// The time to set; the host's now when absent.
        time_ns: Option<i64>,
    },
    /// Shut the guest down through the agent (`virsh shutdown --mode agent`); a powered-off
    /// guest ends the VMM with status 0.
    Shutdown {
        /// `powerdown`, `reboot` or `halt` (qemu-ga's modes).
        mode: GuestShutdownMode,
    },
}

/// How `guest-shutdown` shuts the guest down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestShutdownMode {
    /// Power off (the VMM exits 0).
    #[default]
    Powerdown,
    /// Reboot.
    Reboot,
    /// Halt.
    Halt,
}

impl GuestShutdownMode {
    /// qemu-ga's name.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestShutdownMode::Powerdown => "powerdown",
            GuestShutdownMode::Reboot => "reboot",
            GuestShutdownMode::Halt => "halt",
        }
    }
}

impl VmmAction {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            VmmAction::GetVmInfo => "get-vm-info",
            VmmAction::GetVersion => "get-version",
            VmmAction::Pause => "pause",
            VmmAction::Resume => "resume",
            VmmAction::PowerButton => "power-button",
            VmmAction::Reset => "reset",
            VmmAction::Shutdown => "shutdown",
            VmmAction::Snapshot { .. } => "snapshot",
            VmmAction::Restore { .. } => "restore",
            VmmAction::Migrate { .. } => "migrate",
            VmmAction::MigrateCancel => "migrate-cancel",
            VmmAction::MigrateIncoming { .. } => "migrate-incoming",
            VmmAction::SetMigrationParameters(_) => "migrate-set-parameters",
            VmmAction::GetMigrationParameters => "query-migrate-parameters",
            VmmAction::SaveVm(_) => "savevm",
            VmmAction::LoadVm(_) => "loadvm",
            VmmAction::DelVm(_) => "delvm",
            VmmAction::ListVmSnapshots => "info-snapshots",
            VmmAction::QueryMigrate => "query-migrate",
            VmmAction::SetMigrationCapabilities(_) => "set-migration-capabilities",
            VmmAction::GetMigrationCapabilities => "get-migration-capabilities",
            VmmAction::SetLink { .. } => "set-link",
            VmmAction::SetNetRateLimit { .. } => "set-net-rate-limit",
            VmmAction::AgentCommand { .. } => "agent",
            VmmAction::AgentVerb(_) => "agent",
            VmmAction::GetMetrics => "metrics",
            VmmAction::QueryBlockStats => "query-blockstats",
            VmmAction::SetBalloon { .. } => "balloon",
            VmmAction::GetBalloon => "query-balloon",
            VmmAction::SetBalloonStatsInterval(_) => "balloon-stats-interval",
        }
    }
}

/// A vCPU as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuInfo {
    /// vCPU index (also its APIC id).
    pub index: u8,
    /// Host thread id of the vCPU thread (QMP `thread-id`), if running.
    pub thread_id: Option<i32>,
}

/// What `GetVmInfo` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    /// Run state.
    pub state: VmState,
    /// The configuration the VM was started with.
    pub config: VmConfig,
    /// The vCPUs.
    pub vcpus: Vec<VcpuInfo>,
    /// The network cards (like `virsh domiflist`, with link state and counters).
    pub nics: Vec<NicInfo>,
    /// The built-in guest agent channel, if the VM has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
}

/// The built-in guest agent channel as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AgentInfo {
    /// Whether the guest has its end open (qemu-ga runs on it).
    pub connected: bool,
}

/// A network card as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicInfo {
    /// Its id.
    pub id: String,
    /// The host tap.
    pub tap: String,
    /// MAC address.
    pub mac: String,
    /// Device model, as QEMU names it.
    pub model: String,
    /// Whether vhost-net carries its data.
    pub vhost: bool,
    /// Queue pairs.
    pub queues: u16,
    /// Whether the link is up.
    pub link_up: bool,
    /// The limits on what the guest receives, as set now.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// The limits on what the guest sends, as set now.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Counters since the VMM started.
    pub counters: NicCounters,
}

/// A NIC's counters: frames and bytes each way, drops and errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NicCounters {
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Frames for the guest that were dropped.
    pub rx_dropped: u64,
    /// Failed reads from the tap.
    pub rx_errors: u64,
    /// Bytes the guest sent.
    pub tx_bytes: u64,
    /// Frames the guest sent.
    pub tx_packets: u64,
    /// Guest frames dropped.
    pub tx_dropped: u64,
    /// Guest frames the tap refused.
    pub tx_errors: u64,
}

/// The VMM's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Package version, `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// Major, minor, micro as numbers (for QMP's `query-version`).
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl VersionInfo {
    /// This build's version.
    pub fn current() -> VersionInfo {
        let v = env!("CARGO_PKG_VERSION");
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        VersionInfo {
            version: v.to_string(),
            major: parts.next().unwrap_or(0),
            minor: parts.next().unwrap_or(0),
            micro: parts.next().unwrap_or(0),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmResponse {
    /// The action was carried out; nothing to return.
    Done,
    /// Answer to `GetVmInfo`.
    VmInfo(Box<VmInfo>),
    /// Answer to `GetVersion`.
    Version(VersionInfo),
    /// Answer to `QueryMigrate`.
    Migration(Box<MigrationInfo>),
    /// Answer to `GetMigrationCapabilities`: the capabilities this VMM implements.
    MigrationCapabilities(Vec<MigrationCapabilityState>),
    /// Answer to `GetMigrationParameters`.
    MigrationParameters(MigrationParameters),
    /// Answer to `ListVmSnapshots`: every writable disk that can hold snapshots (qcow2), in
    /// PCI slot order.
    VmSnapshots(Vec<DiskSnapshots>),
    /// Answer to `AgentCommand`: the agent's `return` value; to `AgentVerb`: its typed answer.
    Agent(serde_json::Value),
    /// Answer to `GetMetrics`.
    Metrics(Box<crate::metrics::VmMetrics>),
    /// Answer to `QueryBlockStats`: every disk, in PCI slot order.
    BlockStats(Vec<crate::metrics::DiskStats>),
    /// Answer to `GetBalloon`.
    Balloon(Box<crate::balloon::BalloonInfo>),
}

/// Why an action was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Not allowed in the current state; nothing changed.
    #[error("cannot {action} while the VM is {state}")]
    InvalidState {
        /// The action's name.
        action: &'static str,
        /// The state it was refused in.
        state: VmState,
    },
    /// The VMM tried and failed.
    #[error("{action} failed: {reason}")]
    Failed {
        /// The action's name.
        action: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The request cannot be carried out as asked; nothing changed (QEMU's `GenericError`).
    #[error("{action} failed: {reason}")]
    Refused {
        /// The action's name.
        action: &'static str,
        /// Why.
        reason: String,
        /// Whose side the trouble is on.
        kind: Refusal,
    },
    /// The VMM thread is gone (the VM is shutting down).
    #[error("the VMM is shutting down")]
    Unavailable,
    /// No device has this id (QEMU's `DeviceNotFound`).
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// The VM has no balloon (QEMU's `DeviceNotActive`, with its text).
    #[error("No balloon device has been activated")]
    NoBalloon,
}

/// Why a request was refused (REST gives each its own status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An argument is out of range or malformed (400).
    BadArgument,
    /// What the request needs is not there now: no guest agent channel, or its client is
    /// gone (409, like a request refused in the VM's state).
    NotNow,
    /// The guest did not answer in time (504).
    GuestTimeout,
    /// The guest answered with an error or with garbage (502).
    GuestError,
}

impl VmState {
    /// Checks that `action` is legal in this state and returns the state it leads to
    /// (the state stays the same for queries and for actions that do not change it).
    pub fn check(self, action: &VmmAction) -> Result<VmState, ActionError> {
        use VmState::*;
        use VmmAction::*;
        let refuse = || ActionError::InvalidState {
            action: action.name(),
            state: self,
        };
        match (self, action) {
            (
                _,
                GetVmInfo
                | GetVersion
                | QueryMigrate
                | GetMigrationCapabilities
                | GetMigrationParameters,
            ) => Ok(self),
            // A link can be set whenever the VM exists, stopped or not (QEMU too).
            (Created | Running | Paused | PostMigrate, SetLink { .. } | SetNetRateLimit { .. }) => {
                Ok(self)
            }
            // The agent answers while the guest runs; a paused guest's agent cannot (the
            // command would only time out).
            (Running, AgentCommand { .. } | AgentVerb(_)) => Ok(self),
            (Created | Paused | PostMigrate | Incoming, AgentCommand { .. } | AgentVerb(_)) => {
                Err(refuse())
            }
            // Whole-VM snapshots need a VM; a VM paused by a completed migration has handed its
            // disks over (QEMU refuses savevm there too).
            (Running | Paused, SaveVm(_) | LoadVm(_)) => Ok(self),
            (Running | Paused | PostMigrate, DelVm(_) | ListVmSnapshots) => Ok(self),
            (Created | PostMigrate, SaveVm(_) | LoadVm(_))
            | (Created, DelVm(_) | ListVmSnapshots) => Err(refuse()),
            // Figures exist whenever the VM does; the balloon can be set whenever it exists
            // (a stopped guest acts on it when it runs again, as under QEMU).
            (
                Created | Running | Paused | PostMigrate,
                GetMetrics
                | QueryBlockStats
                | SetBalloon { .. }
                | GetBalloon
                | SetBalloonStatsInterval(_),
            ) => Ok(self),
            (ShuttingDown, _) => Err(refuse()),
            // Capabilities are set before a migration, on either side (libvirt sets `events`
            // before `migrate-incoming`).
            (_, SetMigrationCapabilities(_) | SetMigrationParameters(_)) => Ok(self),
            // Cancelling when nothing is in progress does nothing, as in QEMU.
            (_, MigrateCancel) => Ok(self),
            // The VMM sets Paused itself afterwards when it was started with --paused.
            (Incoming, Restore { .. } | MigrateIncoming { .. }) => Ok(Running),
            (_, Restore { .. } | MigrateIncoming { .. }) => Err(refuse()),
            (Incoming, Shutdown) => Ok(ShuttingDown),
            // No VM yet.
            (Incoming, _) => Err(refuse()),
            (Running | Paused, Snapshot { .. }) => Ok(PostMigrate),
            // A live migration leaves the state as it is until it completes; the VMM then
            // sets PostMigrate itself.
            (Running | Paused, Migrate { .. }) => Ok(self),
            // QEMU refuses to migrate a VM paused by a previous migration (its disks may be
            // in use by the destination now); `cont` first.
            (Created | PostMigrate, Snapshot { .. } | Migrate { .. }) => Err(refuse()),
            (Running, Pause) => Ok(Paused),
            (Paused | PostMigrate, Resume) => Ok(Running),
            (Created | Paused | PostMigrate, Pause) | (Created | Running, Resume) => Err(refuse()),
            // A reset restarts the guest and keeps the run state, as QEMU does: a paused VM
            // comes back paused. The power button is pressed even if the guest is stopped; it
            // sees the event when it runs again (QEMU allows both in `postmigrate` too).
            (Running | Paused | PostMigrate, Reset | PowerButton) => Ok(self),
            (Created, Reset | PowerButton) => Err(refuse()),
            (_, Shutdown) => Ok(ShuttingDown),
        }
    }
}

/// Why the guest reset or shut down, with QEMU's `ShutdownCause` names (qapi/run-state.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ShutdownCause {
    /// `quit` / API shutdown.
    #[serde(rename = "host-qmp-quit")]
    HostQmpQuit,
    /// `system_reset` / API reset.
    #[serde(rename = "host-qmp-system-reset")]
    HostQmpSystemReset,
    /// A signal to the VMM (SIGTERM, SIGINT).
    #[serde(rename = "host-signal")]
    HostSignal,
    /// The guest powered off (ACPI S5).
    #[serde(rename = "guest-shutdown")]
    GuestShutdown,
    /// The guest asked for a reset.
    #[serde(rename = "guest-reset")]
    GuestReset,
    /// The guest triple-faulted or a vCPU failed.
    #[serde(rename = "guest-panic")]
    GuestPanic,
}

impl ShutdownCause {
    /// Whether the guest (rather than the host) caused it: QMP's `guest` member.
    pub fn by_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// Something that happened to the VM, broadcast to every control client that listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The vCPUs stopped (pause).
    Stop,
    /// The vCPUs run again.
    Resume,
    /// The power button was pressed.
    Powerdown,
    /// The VM was reset.
    Reset(ShutdownCause),
    /// The VM shut down; the process is about to exit.
    Shutdown(ShutdownCause),
    /// A migration (snapshot, restore) changed status. The VMM publishes it only while the
    /// `events` capability is on; the doors forward it as it comes.
    Migration(MigrationStatus),
    /// A live migration started its `pass`-th round of sending guest memory (QMP
    /// `MIGRATION_PASS`); published, like [`VmEvent::Migration`], only while `events` is on.
    MigrationPass(u64),
    /// The guest opened (`open`) or closed its end of the virtio-console port `id` (QMP
    /// `VSERPORT_CHANGE`).
    VserportChange {
        /// The port's id (a channel's id, or `console0`).
        id: String,
        /// Whether the guest has it open now.
        open: bool,
    },
    /// The balloon's size changed: the guest's RAM is now `actual` bytes (QMP
    /// `BALLOON_CHANGE`, at most once a second).
    BalloonChange {
        /// The RAM the guest has, bytes.
        actual: u64,
    },
}

#[cfg(test)]
mod tests;
