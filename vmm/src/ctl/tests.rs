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

fn tmp(name: &str) -> PathBuf {
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
