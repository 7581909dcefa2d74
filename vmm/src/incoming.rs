//! `--incoming`: the VMM is up with its control doors open but has no VM yet (QEMU's
//! `inmigrate` state). It answers queries, takes migration capabilities and parameters, and
//! waits for a VM: a live migration on the address `--incoming tcp:...|unix:...` or QMP
//! `migrate-incoming` gave, or a state file QMP `migrate-incoming "file:..."` (REST
//! `PUT /vm/restore`) names; or for `quit`.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::time::Instant;

use api::action::{MigrationInfo, MigrationStatus};
use api::{
    ActionError, MigrationAddress, ShutdownCause, VersionInfo, VmConfig, VmEvent, VmInfo, VmState,
    VmmAction, VmmResponse,
};

use crate::cli::Constraints;
use crate::migration::dest::{FromReceiver, Incoming, Received};
use crate::migration::Listener;
use crate::runtime::Shared;
use crate::snapshot::{self, Loaded, SavedMemory};
use crate::VmmError;

/// Starts listening for a live migration.
fn listen(shared: &Shared, on: &MigrationAddress) -> Result<Incoming, String> {
    let listener = Listener::bind(on)?;
    let incoming = Incoming::start(listener)?;
    shared.migration.set(MigrationInfo {
        status: MigrationStatus::Setup,
        ..Default::default()
    });
    match incoming.port() {
        Some(port) => log::info!("migration: waiting for the source on port {port}"),
        None => log::info!("migration: waiting for the source on {on}"),
    }
    Ok(incoming)
}

/// Waits for a state to restore. Returns it with the configuration to run it with, or None
/// when the VMM must exit (`quit`, a termination signal).
pub fn wait(
    shared: &Shared,
    constraints: &Constraints,
    on_reboot_given: bool,
    paused: bool,
    listen_on: Option<MigrationAddress>,
) -> Result<Option<(Box<Loaded>, VmConfig)>, VmmError> {
    let mut receiving = match &listen_on {
        Some(on) => Some(listen(shared, on).map_err(VmmError::Incoming)?),
        None => None,
    };
    let started = Cell::new(Instant::now());
    loop {
        let mut fds = vec![
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
        if let Some(r) = &receiving {
            fds.push(libc::pollfd {
                fd: r.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a live array of initialised pollfds and its length is passed.
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
        if let Some(r) = &receiving {
            let _ = r.wake.read();
            while let Ok(msg) = r.rx.try_recv() {
                match msg {
                    FromReceiver::Connected => {
                        started.set(Instant::now());
                        shared.migration.set(MigrationInfo {
                            status: MigrationStatus::Active,
                            ..Default::default()
                        });
                    }
                    FromReceiver::Done(Ok(received)) => {
                        let ready =
                            arrived(shared, *received, constraints, on_reboot_given, &started)?;
                        shared.state.set(if paused {
                            VmState::Paused
                        } else {
                            VmState::Running
                        });
                        return Ok(Some(ready));
                    }
                    FromReceiver::Done(Err(e)) => {
                        shared.migration.set(MigrationInfo {
                            status: MigrationStatus::Failed,
                            error_desc: Some(e.clone()),
                            ..Default::default()
                        });
                        return Err(VmmError::Incoming(e));
                    }
                }
            }
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
            let already = || ActionError::Failed {
                action: req.action.name(),
                reason: "The incoming migration has already been started".into(),
            };
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
                // Nothing is being sent from here.
                VmmAction::MigrateCancel => (req.reply)(Ok(VmmResponse::Done)),
                VmmAction::MigrateIncoming { .. } | VmmAction::Restore { .. }
                    if receiving.is_some() =>
                {
                    (req.reply)(Err(already()))
                }
                VmmAction::MigrateIncoming { from } => match listen(shared, from) {
                    Ok(r) => {
                        receiving = Some(r);
                        (req.reply)(Ok(VmmResponse::Done));
                    }
                    Err(reason) => {
                        shared.migration.set(MigrationInfo {
                            status: MigrationStatus::Failed,
                            error_desc: Some(reason.clone()),
                            ..Default::default()
                        });
                        (req.reply)(Err(ActionError::Failed {
                            action: req.action.name(),
                            reason,
                        }))
                    }
                },
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

/// A live migration arrived whole: checks it against what this process was told and makes it
/// the VM to build. A VM that does not fit is refused to the source (which keeps running it)
/// and ends this process.
fn arrived(
    shared: &Shared,
    received: Received,
    constraints: &Constraints,
    on_reboot_given: bool,
    started: &Cell<Instant>,
) -> Result<(Box<Loaded>, VmConfig), VmmError> {
    let Received {
        config,
        state,
        prebuilt,
        peer,
        bytes,
    } = received;
    let checked = snapshot::merge_config(&config, &shared.config, constraints, on_reboot_given)
        .and_then(|cfg| snapshot::check_disks(&cfg).map(|()| cfg));
    let cfg = match checked {
        Ok(cfg) => cfg,
        Err(e) => {
            drop(prebuilt);
            peer.refuse(&e.to_string());
            shared.migration.set(MigrationInfo {
                status: MigrationStatus::Failed,
                error_desc: Some(e.to_string()),
                ..Default::default()
            });
            return Err(e.into());
        }
    };
    shared.migration.set(MigrationInfo {
        status: MigrationStatus::Completed,
        total_time_ms: Some(started.get().elapsed().as_millis() as u64),
        ram: Some(api::RamStats {
            transferred: bytes,
            total: config.machine.memory_mib << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let loaded = Loaded {
        config,
        state,
        memory: SavedMemory::Prebuilt(Cell::new(Some(prebuilt))),
        peer: Some(peer),
    };
    Ok((Box::new(loaded), cfg))
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
