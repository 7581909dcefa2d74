//! The control plane's one vocabulary: every request from the REST API or from QMP becomes a
//! [`VmmAction`], executed on the VMM thread, answered with a typed [`VmmResponse`] or an
//! [`ActionError`]; what happens to the VM is broadcast as [`VmEvent`]s.
//!
//! The VM's state follows explicit transitions ([`VmState::check`]): an action that is illegal in
//! the current state gets [`ActionError::InvalidState`] and changes nothing.

use std::fmt;

use serde::Serialize;

use crate::config::VmConfig;

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
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting_down",
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmResponse {
    /// The action was carried out; nothing to return.
    Done,
    /// Answer to `GetVmInfo`.
    VmInfo(Box<VmInfo>),
    /// Answer to `GetVersion`.
    Version(VersionInfo),
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
    /// The VMM thread is gone (the VM is shutting down).
    #[error("the VMM is shutting down")]
    Unavailable,
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
            (_, GetVmInfo | GetVersion) => Ok(self),
            (ShuttingDown, _) => Err(refuse()),
            (Running, Pause) => Ok(Paused),
            (Paused, Resume) => Ok(Running),
            (Created | Paused, Pause) | (Created | Running, Resume) => Err(refuse()),
            // A reset restarts the guest and keeps the run state, as QEMU does: a paused VM
            // comes back paused.
            (Running | Paused, Reset) => Ok(self),
            (Running | Paused, PowerButton) => Ok(self),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_resume_transitions() {
        assert_eq!(
            VmState::Running.check(&VmmAction::Pause),
            Ok(VmState::Paused)
        );
        assert_eq!(
            VmState::Paused.check(&VmmAction::Resume),
            Ok(VmState::Running)
        );
        assert!(matches!(
            VmState::Paused.check(&VmmAction::Pause),
            Err(ActionError::InvalidState { .. })
        ));
        assert!(VmState::Running.check(&VmmAction::Resume).is_err());
    }

    #[test]
    fn shutting_down_refuses_all_but_queries() {
        for a in [
            VmmAction::Pause,
            VmmAction::Resume,
            VmmAction::PowerButton,
            VmmAction::Reset,
            VmmAction::Shutdown,
        ] {
            assert!(VmState::ShuttingDown.check(&a).is_err(), "{a:?}");
        }
        assert_eq!(
            VmState::ShuttingDown.check(&VmmAction::GetVmInfo),
            Ok(VmState::ShuttingDown)
        );
    }

    #[test]
    fn error_messages_name_action_and_state() {
        let e = VmState::Paused.check(&VmmAction::Pause).unwrap_err();
        assert_eq!(e.to_string(), "cannot pause while the VM is paused");
    }

    #[test]
    fn shutdown_cause_names_match_qemu() {
        assert_eq!(
            serde_json::to_string(&ShutdownCause::GuestShutdown).unwrap(),
            "\"guest-shutdown\""
        );
        assert!(ShutdownCause::GuestReset.by_guest());
        assert!(!ShutdownCause::HostQmpQuit.by_guest());
    }

    #[test]
    fn version_is_parsed() {
        let v = VersionInfo::current();
        assert_eq!(v.version, env!("CARGO_PKG_VERSION"));
    }
}
