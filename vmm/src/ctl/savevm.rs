//! `vmm ctl savevm TAG [--overwrite] [--vmstate ID] [--devices ID,ID]`, `loadvm TAG`, `delvm
//! TAG` and `snapshots [--json]`: whole-VM snapshots inside the VM's qcow2 disks (QEMU's
//! `savevm`, `loadvm`, `delvm`), their request bodies, and the list printed as QEMU's `info
//! snapshots` prints it.

use std::time::Duration;

use api::DiskSnapshots;
use serde_json::{json, Value};

use super::CtlError;

/// How long `savevm` and `loadvm` may take: the VMM answers once the whole VM state is in (or
/// back from) the disk, which for a large guest is much longer than a plain request.
pub(super) const SAVEVM_TIMEOUT: Duration = Duration::from_secs(600);

/// The body of `savevm`, `loadvm` and `delvm`: the tag, and the options given.
pub(super) fn body(
    tag: &str,
    vmstate: Option<&str>,
    devices: Option<&[String]>,
    overwrite: bool,
) -> String {
    let mut body = json!({ "tag": tag });
    if let Some(v) = vmstate {
        body["vmstate"] = v.into();
    }
    if let Some(d) = devices {
        body["devices"] = d.into();
    }
    if overwrite {
        body["overwrite"] = true.into();
    }
    body.to_string()
}

/// `GET /vm/snapshots`' answer as `info snapshots` prints it (dates in local time), or the JSON.
pub(super) fn snapshots_text(v: &Value, as_json: bool) -> Result<String, CtlError> {
    if as_json {
        return Ok(serde_json::to_string_pretty(v).unwrap_or_default());
    }
    let disks: Vec<DiskSnapshots> = serde_json::from_value(v.clone())
        .map_err(|e| CtlError::BadResponse(format!("GET /vm/snapshots: {e}")))?;
    Ok(api::snapshots::info_text(&disks).trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use api::controller::action_channel;
    use api::http::ApiServer;
    use api::{ActionError, VmSnapshotInfo, VmSnapshotRequest, VmState, VmmAction, VmmResponse};

    use super::super::{execute, CtlCommand};
    use super::*;

    /// A VMM with one disk whose snapshots the actions change; every action is recorded.
    fn snapshot_vmm(sock: &Path) -> (ApiServer, Arc<AtomicBool>, Arc<Mutex<Vec<VmmAction>>>) {
        let (handle, inbox) = action_channel().unwrap();
        let server = ApiServer::start(sock, handle).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, log) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut snaps: Vec<VmSnapshotInfo> = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: inbox.waker().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                for req in inbox.drain() {
                    log.lock().unwrap().push(req.action.clone());
                    let failed = |reason: String| ActionError::Failed {
                        action: req.action.name(),
                        reason,
                    };
                    let has =
                        |snaps: &[VmSnapshotInfo], tag: &str| snaps.iter().any(|s| s.tag == tag);
                    let reply =
                        VmState::Running
                            .check(&req.action)
                            .and_then(|_| match &req.action {
                                VmmAction::SaveVm(r) => {
                                    snaps.retain(|s| s.tag != r.tag);
                                    snaps.push(VmSnapshotInfo {
                                        id: (snaps.len() + 1).to_string(),
                                        tag: r.tag.clone(),
                                        vm_state_size: 3 << 20,
                                        date_sec: 1_700_000_000,
                                        date_nsec: 0,
                                        vm_clock_nsec: 2_000_000_000,
                                    });
                                    Ok(VmmResponse::Done)
                                }
                                VmmAction::LoadVm(r) if !has(&snaps, &r.tag) => {
                                    Err(failed(format!(
                                        "Snapshot '{}' does not exist in one or more devices",
                                        r.tag
                                    )))
                                }
                                VmmAction::DelVm(r) => {
                                    snaps.retain(|s| s.tag != r.tag);
                                    Ok(VmmResponse::Done)
                                }
                                VmmAction::ListVmSnapshots => {
                                    Ok(VmmResponse::VmSnapshots(vec![DiskSnapshots {
                                        disk: "disk0".into(),
                                        snapshots: snaps.clone(),
                                    }]))
                                }
                                _ => Ok(VmmResponse::Done),
                            });
                    (req.reply)(reply);
                }
            }
        });
        (server, stop, seen)
    }

    use super::super::tests::tmp;

    #[test]
    fn savevm_loadvm_delvm_and_the_table() {
        let sock = tmp("real").join("api.sock");
        let (_server, stop, seen) = snapshot_vmm(&sock);
        let save = CtlCommand::Savevm {
            tag: "s1".into(),
            overwrite: true,
            vmstate: Some("disk0".into()),
            devices: Some(vec!["disk0".into()]),
        };
        assert_eq!(execute(&sock, &save).unwrap(), "");
        assert_eq!(
            seen.lock().unwrap().last(),
            Some(&VmmAction::SaveVm(VmSnapshotRequest {
                tag: "s1".into(),
                vmstate: Some("disk0".into()),
                devices: Some(vec!["disk0".into()]),
                overwrite: true,
            }))
        );
        let table = execute(&sock, &CtlCommand::Snapshots { json: false }).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert_eq!(lines[0], "List of snapshots present on all disks:");
        assert_eq!(
            lines[1],
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        assert!(
            lines[2].starts_with("--      s1                  3 MiB 20"),
            "{table}"
        );
        assert!(lines[2].ends_with(" 0000:00:02.000         --"), "{table}");
        let json = execute(&sock, &CtlCommand::Snapshots { json: true }).unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["snapshots"][0]["tag"], "s1");

        let load = |tag: &str| CtlCommand::Loadvm {
            tag: tag.into(),
            vmstate: None,
            devices: None,
        };
        assert_eq!(execute(&sock, &load("s1")).unwrap(), "");
        let e = execute(&sock, &load("s9")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "loadvm failed: Snapshot 's9' does not exist in one or more devices (HTTP 500)"
        );
        let del = CtlCommand::Delvm {
            tag: "s1".into(),
            devices: None,
        };
        assert_eq!(execute(&sock, &del).unwrap(), "");
        assert_eq!(
            execute(&sock, &CtlCommand::Snapshots { json: false }).unwrap(),
            "There is no snapshot available."
        );
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn arguments_routes_and_bodies() {
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
        let save = parse(&[
            "savevm",
            "s1",
            "--overwrite",
            "--vmstate",
            "d0",
            "--devices",
            "d0,d1",
        ])
        .unwrap();
        assert_eq!(
            save,
            CtlCommand::Savevm {
                tag: "s1".into(),
                overwrite: true,
                vmstate: Some("d0".into()),
                devices: Some(vec!["d0".into(), "d1".into()]),
            }
        );
        assert_eq!(save.route(), ("PUT", "/vm/savevm"));
        let body: Value = serde_json::from_str(&save.body().unwrap().unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"tag": "s1", "vmstate": "d0", "devices": ["d0", "d1"], "overwrite": true})
        );
        let plain = parse(&["savevm", "s2"]).unwrap();
        let body: Value = serde_json::from_str(&plain.body().unwrap().unwrap()).unwrap();
        assert_eq!(body, json!({"tag": "s2"}));
        let load = parse(&["loadvm", "s1", "--devices", "d1"]).unwrap();
        assert_eq!(load.route(), ("PUT", "/vm/loadvm"));
        let body: Value = serde_json::from_str(&load.body().unwrap().unwrap()).unwrap();
        assert_eq!(body, json!({"tag": "s1", "devices": ["d1"]}));
        let del = parse(&["delvm", "s1"]).unwrap();
        assert_eq!(del.route(), ("PUT", "/vm/delvm"));
        let body: Value = serde_json::from_str(&del.body().unwrap().unwrap()).unwrap();
        assert_eq!(body, json!({"tag": "s1"}));
        let list = parse(&["snapshots", "--json"]).unwrap();
        assert_eq!(list, CtlCommand::Snapshots { json: true });
        assert_eq!(list.route(), ("GET", "/vm/snapshots"));
        assert_eq!(list.body().unwrap(), None);
        assert!(parse(&["savevm"]).is_err());
        assert!(parse(&["loadvm"]).is_err());
        assert!(parse(&["delvm", "a", "b"]).is_err());
        assert!(parse(&["delvm", "a", "--overwrite"]).is_err());
        assert!(parse(&["loadvm", "a", "--overwrite"]).is_err());
        assert!(parse(&["snapshots", "extra"]).is_err());
    }

    #[test]
    fn a_bad_list_is_a_clear_error() {
        let e = snapshots_text(&json!({"disk": 1}), false).unwrap_err();
        assert!(e.to_string().contains("GET /vm/snapshots"), "{e}");
        assert_eq!(
            snapshots_text(&json!([]), false).unwrap(),
            "no block device can store vmstate for snapshot"
        );
    }
}
