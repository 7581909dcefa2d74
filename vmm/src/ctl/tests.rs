//! `vmm ctl` against a real API server, response parsing, command names and state paths.

use super::*;
use api::controller::action_channel;
use api::http::ApiServer;
use api::{
    MigrationInfo, MigrationStatus, VersionInfo, VmConfig, VmInfo, VmState, VmmAction, VmmResponse,
};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A fresh scratch directory for one test (also the savevm and migrate tests').
pub(super) fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-ctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn commands_against_a_real_api_server() {
    let sock = tmp("real").join("api.sock");
    let (handle, inbox) = action_channel().unwrap();
    let server = ApiServer::start(&sock, handle).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let paths = Arc::new(std::sync::Mutex::new(Vec::<PathBuf>::new()));
    let seen_paths = paths.clone();
    let vmm = std::thread::spawn(move || {
        let mut state = VmState::Running;
        let mut last = MigrationInfo::default();
        while !s.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: inbox.waker().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            for req in inbox.drain() {
                let reply = state.check(&req.action).map(|next| {
                    state = next;
                    match req.action {
                        VmmAction::GetVmInfo => VmmResponse::VmInfo(Box::new(VmInfo {
                            nics: Vec::new(),
                            agent: None,
                            state,
                            config: VmConfig::default(),
                            vcpus: vec![],
                        })),
                        VmmAction::GetVersion => VmmResponse::Version(VersionInfo::current()),
                        VmmAction::Snapshot { ref path } | VmmAction::Restore { ref path } => {
                            seen_paths.lock().unwrap().push(path.clone());
                            last.status = MigrationStatus::Completed;
                            VmmResponse::Done
                        }
                        VmmAction::QueryMigrate => VmmResponse::Migration(Box::new(last.clone())),
                        _ => VmmResponse::Done,
                    }
                });
                (req.reply)(reply);
            }
        }
    });
    let info = execute(&sock, &CtlCommand::Info).unwrap();
    assert!(info.contains("\"state\": \"running\""), "{info}");
    assert!(info.contains('\n'), "pretty-printed");
    let v = execute(&sock, &CtlCommand::Version).unwrap();
    assert!(v.contains(env!("CARGO_PKG_VERSION")));
    assert_eq!(execute(&sock, &CtlCommand::Pause).unwrap(), "");
    let e = execute(&sock, &CtlCommand::Pause).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot pause while the VM is paused (HTTP 409)"
    );
    assert_eq!(execute(&sock, &CtlCommand::Resume).unwrap(), "");
    assert_eq!(execute(&sock, &CtlCommand::PowerButton).unwrap(), "");
    assert_eq!(execute(&sock, &CtlCommand::Reset).unwrap(), "");
    let m = execute(&sock, &CtlCommand::Migration).unwrap();
    assert!(m.contains("\"status\": \"none\""), "{m}");
    let file = sock.parent().unwrap().join("vm.state");
    let snap = CtlCommand::Snapshot { path: file.clone() };
    assert_eq!(execute(&sock, &snap).unwrap(), "");
    let m = execute(&sock, &CtlCommand::Migration).unwrap();
    assert!(m.contains("\"status\": \"completed\""), "{m}");
    let info = execute(&sock, &CtlCommand::Info).unwrap();
    assert!(info.contains("\"state\": \"post_migrate\""), "{info}");
    let e = execute(&sock, &snap).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot snapshot while the VM is post_migrate (HTTP 409)"
    );
    let e = execute(&sock, &CtlCommand::Restore { path: file.clone() }).unwrap_err();
    assert!(matches!(e, CtlError::Http { status: 409, .. }), "{e}");
    assert_eq!(execute(&sock, &CtlCommand::Resume).unwrap(), "");
    // A relative path reaches the VMM absolute.
    let rel = CtlCommand::Snapshot {
        path: "vm-rel.state".into(),
    };
    assert_eq!(execute(&sock, &rel).unwrap(), "");
    let got = paths.lock().unwrap().clone();
    assert_eq!(
        got[0],
        file.parent()
            .unwrap()
            .canonicalize()
            .unwrap()
            .join("vm.state")
    );
    assert_eq!(
        got[1],
        std::env::current_dir()
            .unwrap()
            .canonicalize()
            .unwrap()
            .join("vm-rel.state")
    );
    assert_eq!(execute(&sock, &CtlCommand::Resume).unwrap(), "");
    assert_eq!(execute(&sock, &CtlCommand::Shutdown).unwrap(), "");
    stop.store(true, Ordering::Relaxed);
    vmm.join().unwrap();
    // The VMM thread is gone: the server answers 503.
    let e = execute(&sock, &CtlCommand::Info).unwrap_err();
    assert!(matches!(e, CtlError::Http { status: 503, .. }), "{e}");
    server.shutdown();
    let e = execute(&sock, &CtlCommand::Info).unwrap_err();
    assert!(matches!(e, CtlError::NoSocket(_)), "{e}");
    assert!(e.to_string().contains("--api-socket"));
}

#[test]
fn stale_socket_is_connection_refused() {
    let sock = tmp("stale").join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let e = execute(&sock, &CtlCommand::Pause).unwrap_err();
    assert!(matches!(e, CtlError::Refused(_)), "{e}");
}

#[test]
fn responses_are_parsed_with_interim_and_partial() {
    assert_eq!(parse_response(b"HTTP/1.1 204 No").unwrap(), None);
    let r = parse_response(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"{}");
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}").unwrap(),
        None
    );
    assert!(parse_response(b"garbage\r\n\r\n").is_err());
}

#[test]
fn command_names_are_kebab_case() {
    use clap::CommandFactory;
    let cmd = crate::cli::Cli::command();
    let ctl = cmd.find_subcommand("ctl").unwrap();
    let names: Vec<&str> = ctl.get_subcommands().map(|c| c.get_name()).collect();
    assert_eq!(
        names,
        [
            "pause",
            "resume",
            "power-button",
            "reset",
            "shutdown",
            "info",
            "version",
            "snapshot",
            "restore",
            "migration",
            "migrate",
            "migrate-cancel",
            "migrate-params",
            "migrate-incoming",
            "savevm",
            "loadvm",
            "delvm",
            "snapshots",
            "nics",
            "rate-limit",
            "agent",
            "metrics",
            "domifaddr",
            "fsinfo",
            "osinfo",
            "fsfreeze",
            "fsthaw",
            "set-time",
            "guest-shutdown",
            "balloon",
            "set-link"
        ]
    );
    for c in ctl.get_subcommands() {
        assert!(c.get_about().is_some(), "{} has help", c.get_name());
    }
}

#[test]
fn state_file_paths_are_made_absolute() {
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    assert_eq!(absolute(Path::new("x.state")).unwrap(), cwd.join("x.state"));
    let dir = tmp("abs");
    std::fs::create_dir(dir.join("sub")).unwrap();
    let real = dir.canonicalize().unwrap();
    assert_eq!(
        absolute(&dir.join("sub/../y.state")).unwrap_or_default(),
        real.join("y.state")
    );
    // A missing directory is left for the VMM to report.
    let missing = dir.join("no/such/z.state");
    assert_eq!(absolute(&missing).unwrap(), missing);
    assert!(matches!(
        absolute(Path::new("/")),
        Err(CtlError::BadPath { .. })
    ));
    assert!(matches!(
        absolute(Path::new("a/..")),
        Err(CtlError::BadPath { .. })
    ));
    let body = CtlCommand::Restore {
        path: "r.state".into(),
    }
    .body()
    .unwrap()
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["path"], cwd.join("r.state").to_str().unwrap());
    assert_eq!(CtlCommand::Info.body().unwrap(), None);
}

/// A fake VMM for the migration commands: a migration stays active for `rounds` queries, then
/// completes (or fails, for a destination whose host is `fail`); cancel cancels it.
fn migration_vmm(
    sock: &Path,
    rounds: u32,
) -> (
    ApiServer,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Vec<VmmAction>>,
) {
    use api::{MigrationAddress, MigrationParameters, RamStats};
    let (handle, inbox) = action_channel().unwrap();
    let server = ApiServer::start(sock, handle).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let vmm = std::thread::spawn(move || {
        let mut state = VmState::Running;
        let mut info = MigrationInfo::default();
        let mut params = MigrationParameters::default();
        let (mut left, mut fail) = (0, false);
        let mut seen = Vec::new();
        while !s.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: inbox.waker().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            for req in inbox.drain() {
                seen.push(req.action.clone());
                let reply = state.check(&req.action).map(|next| {
                    state = next;
                    match &req.action {
                        VmmAction::Migrate { to } => {
                            fail =
                                matches!(to, MigrationAddress::Tcp { host, .. } if host == "fail");
                            left = rounds;
                            info = MigrationInfo {
                                status: MigrationStatus::Active,
                                ..MigrationInfo::default()
                            };
                            VmmResponse::Done
                        }
                        VmmAction::QueryMigrate => {
                            if info.status == MigrationStatus::Active {
                                if left == 0 && fail {
                                    info.status = MigrationStatus::Failed;
                                    info.error_desc = Some("Connection refused".into());
                                } else if left == 0 {
                                    state = VmState::PostMigrate;
                                    info = MigrationInfo {
                                        status: MigrationStatus::Completed,
                                        total_time_ms: Some(1500),
                                        downtime_ms: Some(40),
                                        ram: Some(RamStats {
                                            transferred: 300 << 20,
                                            ..RamStats::default()
                                        }),
                                        ..MigrationInfo::default()
                                    };
                                }
                                left = left.saturating_sub(1);
                            }
                            VmmResponse::Migration(Box::new(info.clone()))
                        }
                        VmmAction::MigrateCancel => {
                            if info.status == MigrationStatus::Active {
                                info.status = MigrationStatus::Cancelled;
                            }
                            VmmResponse::Done
                        }
                        VmmAction::SetMigrationParameters(u) => {
                            u.apply(&mut params);
                            VmmResponse::Done
                        }
                        VmmAction::GetMigrationParameters => {
                            VmmResponse::MigrationParameters(params)
                        }
                        _ => VmmResponse::Done,
                    }
                });
                (req.reply)(reply);
            }
        }
        seen
    });
    (server, stop, vmm)
}

#[test]
fn live_migration_commands() {
    let dir = tmp("live");
    let sock = dir.join("api.sock");
    let (server, stop, vmm) = migration_vmm(&sock, 3);
    let params = CtlCommand::MigrateParams {
        downtime_limit: None,
        max_bandwidth: None,
    };
    assert_eq!(
        execute(&sock, &params).unwrap(),
        "downtime-limit: 300 ms\nmax-bandwidth: 134217728 bytes/second (128 MiB/s)"
    );
    let set = CtlCommand::MigrateParams {
        downtime_limit: Some(50),
        max_bandwidth: Some(0),
    };
    assert_eq!(execute(&sock, &set).unwrap(), "");
    assert_eq!(
        execute(&sock, &params).unwrap(),
        "downtime-limit: 50 ms\nmax-bandwidth: 0 bytes/second (no limit)"
    );
    let e = execute(
        &sock,
        &CtlCommand::MigrateParams {
            downtime_limit: Some(5_000_000),
            max_bandwidth: None,
        },
    )
    .unwrap_err();
    assert!(matches!(e, CtlError::Http { status: 400, .. }), "{e}");

    // Without --wait: it started.
    let go = |uri: &str, wait: bool| CtlCommand::Migrate {
        uri: uri.into(),
        wait,
    };
    let out = execute(&sock, &go("tcp:fail:4446", false)).unwrap();
    assert!(
        out.starts_with("Migration to tcp:fail:4446 started"),
        "{out}"
    );
    assert_eq!(execute(&sock, &CtlCommand::MigrateCancel).unwrap(), "");
    let m = execute(&sock, &CtlCommand::Migration).unwrap();
    assert!(m.contains("\"status\": \"cancelled\""), "{m}");
    // --wait: failed and cancelled are errors, completed is the outcome.
    let e = execute(&sock, &go("tcp:fail:4446", true)).unwrap_err();
    assert_eq!(e.to_string(), "the migration failed: Connection refused");
    let out = execute(&sock, &go("tcp:10.0.0.2:4446", true)).unwrap();
    assert_eq!(
        out,
        "Migration to tcp:10.0.0.2:4446 completed in 1500 ms (downtime 40 ms, 300.0 MiB sent); \
         the VM stays paused here (post_migrate)"
    );
    // Paused by the migration: another one is refused until the VM is resumed.
    let e = execute(&sock, &go("tcp:10.0.0.2:4446", true)).unwrap_err();
    assert!(matches!(e, CtlError::Http { status: 409, .. }), "{e}");
    // The VMM checks URIs.
    let e = execute(&sock, &go("exec:cat", false)).unwrap_err();
    assert!(matches!(e, CtlError::Http { status: 400, .. }), "{e}");
    let e = execute(
        &sock,
        &CtlCommand::MigrateIncoming {
            uri: "tcp:0:4446".into(),
        },
    )
    .unwrap_err();
    assert!(matches!(e, CtlError::Http { status: 409, .. }), "{e}");
    stop.store(true, Ordering::Relaxed);
    let seen = vmm.join().unwrap();
    assert!(seen.contains(&VmmAction::MigrateCancel));
    server.shutdown();
}

#[test]
fn a_cancelled_wait_is_an_error() {
    let sock = tmp("cancelwait").join("api.sock");
    let (server, stop, vmm) = migration_vmm(&sock, u32::MAX);
    let s2 = sock.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        execute(&s2, &CtlCommand::MigrateCancel).unwrap();
    });
    let e = execute(
        &sock,
        &CtlCommand::Migrate {
            uri: "unix:/run/dst.sock".into(),
            wait: true,
        },
    )
    .unwrap_err();
    assert!(matches!(e, CtlError::MigrationCancelled), "{e}");
    canceller.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    vmm.join().unwrap();
    server.shutdown();
}

#[test]
fn migration_routes_and_bodies() {
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    let body = |c: CtlCommand| {
        let b: serde_json::Value = serde_json::from_str(&c.body().unwrap().unwrap()).unwrap();
        (c.route(), b)
    };
    assert_eq!(
        body(CtlCommand::Migrate {
            uri: "tcp:[::1]:4446".into(),
            wait: true
        }),
        (
            ("PUT", "/vm/migrate"),
            serde_json::json!({"uri": "tcp:[::1]:4446"})
        )
    );
    // A unix socket is made absolute, as a state file is.
    assert_eq!(
        body(CtlCommand::MigrateIncoming {
            uri: "unix:mig.sock".into()
        }),
        (
            ("PUT", "/vm/migrate/incoming"),
            serde_json::json!({ "uri": format!("unix:{}", cwd.join("mig.sock").display()) })
        )
    );
    assert_eq!(
        body(CtlCommand::MigrateParams {
            downtime_limit: None,
            max_bandwidth: Some(1 << 30)
        }),
        (
            ("PUT", "/vm/migrate/parameters"),
            serde_json::json!({"max_bandwidth": 1_073_741_824u64})
        )
    );
    let get = CtlCommand::MigrateParams {
        downtime_limit: None,
        max_bandwidth: None,
    };
    assert_eq!(get.route(), ("GET", "/vm/migrate/parameters"));
    assert_eq!(get.body().unwrap(), None);
    assert_eq!(
        CtlCommand::MigrateCancel.route(),
        ("PUT", "/vm/migrate/cancel")
    );

    use clap::Parser;
    let parse = |args: &[&str]| {
        let mut all = vec!["vmm", "ctl", "--api-socket", "/run/a.sock"];
        all.extend_from_slice(args);
        match crate::cli::Cli::try_parse_from(all).map(|c| c.command) {
            Ok(Some(crate::cli::Command::Ctl(a))) => Ok(a.command),
            Ok(_) => panic!("not ctl"),
            Err(e) => Err(e.kind()),
        }
    };
    assert_eq!(
        parse(&["migrate", "tcp:h:1", "--wait"]),
        Ok(CtlCommand::Migrate {
            uri: "tcp:h:1".into(),
            wait: true
        })
    );
    assert_eq!(
        parse(&["migrate-params", "--downtime-limit", "100"]),
        Ok(CtlCommand::MigrateParams {
            downtime_limit: Some(100),
            max_bandwidth: None
        })
    );
    assert!(parse(&["migrate"]).is_err());
    assert!(parse(&["migrate-params", "--max-bandwidth", "-1"]).is_err());
    assert!(parse(&["migrate-cancel", "now"]).is_err());
}
