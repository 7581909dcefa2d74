//! `--incoming defer`: the VMM is up with its control doors open but has no VM yet (QEMU's
//! `inmigrate` state). It answers queries, takes migration capabilities, and waits for QMP
//! `migrate-incoming` (or REST `PUT /vm/restore`) to name the state to restore, or for `quit`.

use std::os::fd::AsRawFd;
use std::time::Instant;

use api::action::{MigrationInfo, MigrationStatus};
use api::{
    ActionError, ShutdownCause, VersionInfo, VmConfig, VmEvent, VmInfo, VmState, VmmAction,
    VmmResponse,
};

use crate::cli::Constraints;
use crate::runtime::Shared;
use crate::snapshot::{self, Loaded};
use crate::VmmError;

/// Waits for a state to restore. Returns it with the configuration to run it with, or None
/// when the VMM must exit (`quit`, a termination signal).
pub fn wait(
    shared: &Shared,
    constraints: &Constraints,
    on_reboot_given: bool,
    paused: bool,
) -> Result<Option<(Box<Loaded>, VmConfig)>, VmmError> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: shared.inbox.waker().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shared.signal.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfds and its length is passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VmmError::EventLoop(format!("poll: {e}")));
        }
        if fds[1].revents != 0 {
            let _ = shared.signal.read();
            eprintln!("vmm: terminating on request (signal)");
            shared.state.set(VmState::ShuttingDown);
            shared
                .bus
                .publish(VmEvent::Shutdown(ShutdownCause::HostSignal));
            return Ok(None);
        }
        for req in shared.inbox.drain() {
            let state = shared.state.get();
            let next = match state.check(&req.action) {
                Ok(next) => next,
                Err(e) => {
                    (req.reply)(Err(e));
                    continue;
                }
            };
            if let Some(resp) = shared.migration.action(&req.action) {
                (req.reply)(Ok(resp));
                continue;
            }
            match &req.action {
                VmmAction::GetVmInfo => (req.reply)(Ok(VmmResponse::VmInfo(Box::new(VmInfo {
                    state,
                    config: (*shared.config).clone(),
                    vcpus: Vec::new(),
                    nics: Vec::new(),
                    agent: None,
                })))),
                VmmAction::GetVersion => {
                    (req.reply)(Ok(VmmResponse::Version(VersionInfo::current())))
                }
                VmmAction::Shutdown => {
                    shared.state.set(VmState::ShuttingDown);
                    (req.reply)(Ok(VmmResponse::Done));
                    shared
                        .bus
                        .publish(VmEvent::Shutdown(ShutdownCause::HostQmpQuit));
                    return Ok(None);
                }
                VmmAction::Restore { path } => {
                    let started = Instant::now();
                    shared.migration.set(MigrationInfo {
                        status: MigrationStatus::Active,
                        ..Default::default()
                    });
                    match prepare(shared, path, constraints, on_reboot_given) {
                        Ok((loaded, cfg)) => {
                            shared
                                .state
                                .set(if paused { VmState::Paused } else { next });
                            shared.migration.set(MigrationInfo {
                                status: MigrationStatus::Completed,
                                total_time_ms: Some(started.elapsed().as_millis() as u64),
                                ..Default::default()
                            });
                            (req.reply)(Ok(VmmResponse::Done));
                            return Ok(Some((loaded, cfg)));
                        }
                        Err(e) => {
                            shared.migration.set(MigrationInfo {
                                status: MigrationStatus::Failed,
                                error_desc: Some(e.to_string()),
                                ..Default::default()
                            });
                            (req.reply)(Err(ActionError::Failed {
                                action: req.action.name(),
                                reason: e.to_string(),
                            }));
                        }
                    }
                }
                other => (req.reply)(Err(ActionError::InvalidState {
                    action: other.name(),
                    state,
                })),
            }
        }
    }
}

/// Reads and checks the state file and the configuration it will run with.
fn prepare(
    shared: &Shared,
    path: &std::path::Path,
    constraints: &Constraints,
    on_reboot_given: bool,
) -> Result<(Box<Loaded>, VmConfig), snapshot::SnapshotError> {
    let loaded = snapshot::load(path)?;
    let cfg = snapshot::merge_config(&loaded.config, &shared.config, constraints, on_reboot_given)?;
    snapshot::check_disks(&cfg)?;
    Ok((Box::new(loaded), cfg))
}
