//! The request bodies of the whole-VM snapshot routes (QEMU's `savevm`, `loadvm`, `delvm`):
//! `{"tag": "s1"}` with optionally the disk for the VM state (`vmstate`, a disk id), the disks
//! to act on (`devices`; every writable disk when absent) and, for `PUT /vm/savevm`,
//! `overwrite` (replace a snapshot of the same name, as HMP's `savevm` does; false by default,
//! as QMP's `snapshot-save`).

use serde::Deserialize;

use super::Response;
use crate::snapshots::VmSnapshotRequest;

/// The longest tag: QEMU keeps 255 bytes of a snapshot's name (`QEMUSnapshotInfo.name`).
const MAX_TAG: usize = 255;

/// `PUT /vm/savevm`'s body.
pub(super) fn save_body(body: &[u8]) -> Result<VmSnapshotRequest, Response> {
    let req: VmSnapshotRequest = parse(body)?;
    check(req)
}

/// `PUT /vm/loadvm`'s body: no `overwrite`.
pub(super) fn load_body(body: &[u8]) -> Result<VmSnapshotRequest, Response> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        tag: String,
        #[serde(default)]
        vmstate: Option<String>,
        #[serde(default)]
        devices: Option<Vec<String>>,
    }
    let b: Body = parse(body)?;
    check(VmSnapshotRequest {
        vmstate: b.vmstate,
        devices: b.devices,
        ..VmSnapshotRequest::tag(b.tag)
    })
}

/// `PUT /vm/delvm`'s body: `tag` and `devices` (QEMU's `snapshot-delete` has no `vmstate`).
pub(super) fn delete_body(body: &[u8]) -> Result<VmSnapshotRequest, Response> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        tag: String,
        #[serde(default)]
        devices: Option<Vec<String>>,
    }
    let b: Body = parse(body)?;
    check(VmSnapshotRequest {
        devices: b.devices,
        ..VmSnapshotRequest::tag(b.tag)
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::error(
            400,
            "this request needs a JSON body: {\"tag\": \"NAME\"}",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))
}

/// What the schema says of the names: a tag of 1 to 255 bytes, disk ids not empty, no NUL.
fn check(req: VmSnapshotRequest) -> Result<VmSnapshotRequest, Response> {
    let bad = |msg: String| Err(Response::error(400, msg));
    if req.tag.is_empty() || req.tag.len() > MAX_TAG {
        return bad(format!("`tag` must be 1 to {MAX_TAG} bytes long"));
    }
    let names = std::iter::once(&req.tag)
        .chain(req.vmstate.iter())
        .chain(req.devices.iter().flatten());
    for name in names {
        if name.contains('\0') {
            return bad("names must not contain NUL".into());
        }
    }
    if req.vmstate.as_ref().is_some_and(String::is_empty)
        || req.devices.iter().flatten().any(String::is_empty)
    {
        return bad("a disk id must not be empty".into());
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::super::{action, respond, route, Route};
    use super::*;
    use crate::action::{ActionError, Refusal, VmmAction, VmmResponse};
    use crate::snapshots::{DiskSnapshots, VmSnapshotInfo};
    use serde_json::json;

    fn err(route: Route, body: &[u8]) -> String {
        let r = action(route, body).unwrap_err();
        assert_eq!(r.status, 400);
        r.body.unwrap()["error"].as_str().unwrap().to_string()
    }

    #[test]
    fn routes() {
        assert_eq!(route("PUT", "/vm/savevm"), Ok(Route::SaveVm));
        assert_eq!(route("PUT", "/vm/loadvm"), Ok(Route::LoadVm));
        assert_eq!(route("PUT", "/vm/delvm"), Ok(Route::DelVm));
        assert_eq!(route("GET", "/vm/snapshots"), Ok(Route::ListVmSnapshots));
        let r = route("GET", "/vm/savevm").unwrap_err();
        assert_eq!((r.status, r.allow.as_deref()), (405, Some("PUT")));
        let r = route("DELETE", "/vm/snapshots").unwrap_err();
        assert_eq!((r.status, r.allow.as_deref()), (405, Some("GET")));
    }

    #[test]
    fn savevm_bodies() {
        assert_eq!(
            action(Route::SaveVm, br#"{"tag": "s1"}"#),
            Ok(VmmAction::SaveVm(VmSnapshotRequest::tag("s1")))
        );
        let full = br#"{"tag": "s1", "vmstate": "d0", "devices": ["d0", "d1"], "overwrite": true}"#;
        assert_eq!(
            action(Route::SaveVm, full),
            Ok(VmmAction::SaveVm(VmSnapshotRequest {
                tag: "s1".into(),
                vmstate: Some("d0".into()),
                devices: Some(vec!["d0".into(), "d1".into()]),
                overwrite: true,
            }))
        );
        assert!(err(Route::SaveVm, b"").contains("needs a JSON body"));
        assert!(err(Route::SaveVm, b"{}").contains("missing field `tag`"));
        assert!(err(Route::SaveVm, br#"{"tag": 1}"#).contains("invalid type"));
        assert!(err(Route::SaveVm, br#"{"tag": ""}"#).contains("1 to 255 bytes"));
        let long = format!(r#"{{"tag": "{}"}}"#, "x".repeat(256));
        assert!(err(Route::SaveVm, long.as_bytes()).contains("1 to 255 bytes"));
        let max = format!(r#"{{"tag": "{}"}}"#, "x".repeat(255));
        assert!(action(Route::SaveVm, max.as_bytes()).is_ok());
        assert!(err(Route::SaveVm, br#"{"tag": "a\u0000b"}"#).contains("NUL"));
        assert!(err(Route::SaveVm, br#"{"tag": "a", "vmstate": ""}"#).contains("disk id"));
        assert!(err(Route::SaveVm, br#"{"tag": "a", "devices": [""]}"#).contains("disk id"));
        assert!(err(Route::SaveVm, br#"{"tag": "a", "devices": "d0"}"#).contains("invalid type"));
        assert!(err(Route::SaveVm, br#"{"tag": "a", "force": true}"#).contains("`force`"));
        assert!(err(Route::SaveVm, b"[]").contains("invalid"));
        // An empty list is passed on: the VMM refuses it in QEMU's words.
        assert_eq!(
            action(Route::SaveVm, br#"{"tag": "a", "devices": []}"#),
            Ok(VmmAction::SaveVm(VmSnapshotRequest {
                devices: Some(vec![]),
                ..VmSnapshotRequest::tag("a")
            }))
        );
    }

    #[test]
    fn loadvm_and_delvm_bodies() {
        assert_eq!(
            action(
                Route::LoadVm,
                br#"{"tag": "s1", "vmstate": "d0", "devices": ["d0"]}"#
            ),
            Ok(VmmAction::LoadVm(VmSnapshotRequest {
                vmstate: Some("d0".into()),
                devices: Some(vec!["d0".into()]),
                ..VmSnapshotRequest::tag("s1")
            }))
        );
        assert_eq!(
            action(Route::DelVm, br#" {"tag": "s1", "devices": ["d1"]} "#),
            Ok(VmmAction::DelVm(VmSnapshotRequest {
                devices: Some(vec!["d1".into()]),
                ..VmSnapshotRequest::tag("s1")
            }))
        );
        assert!(err(Route::LoadVm, br#"{"tag": "s1", "overwrite": true}"#).contains("overwrite"));
        assert!(err(Route::DelVm, br#"{"tag": "s1", "vmstate": "d0"}"#).contains("vmstate"));
        assert!(err(Route::LoadVm, b"").contains("needs a JSON body"));
        assert!(err(Route::DelVm, br#"{"tag": ""}"#).contains("1 to 255"));
        assert_eq!(
            action(Route::ListVmSnapshots, b"ignored"),
            Ok(VmmAction::ListVmSnapshots)
        );
    }

    #[test]
    fn answers_and_statuses() {
        assert_eq!(respond(Route::SaveVm, Ok(VmmResponse::Done)).status, 204);
        assert_eq!(respond(Route::LoadVm, Ok(VmmResponse::Done)).status, 204);
        assert_eq!(respond(Route::DelVm, Ok(VmmResponse::Done)).status, 204);
        let disks = vec![DiskSnapshots {
            disk: "disk0".into(),
            snapshots: vec![VmSnapshotInfo {
                id: "1".into(),
                tag: "s1".into(),
                vm_state_size: 4096,
                date_sec: 1_700_000_000,
                date_nsec: 7,
                vm_clock_nsec: 42,
            }],
        }];
        let r = respond(Route::ListVmSnapshots, Ok(VmmResponse::VmSnapshots(disks)));
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body.unwrap(),
            json!([{"disk": "disk0", "snapshots": [{"id": "1", "tag": "s1",
                    "vm_state_size": 4096, "date_sec": 1_700_000_000u64, "date_nsec": 7,
                    "vm_clock_nsec": 42}]}])
        );
        let failed = ActionError::Failed {
            action: "loadvm",
            reason: "Snapshot 's9' does not exist in one or more devices".into(),
        };
        let r = respond(Route::LoadVm, Err(failed));
        assert_eq!(r.status, 500);
        assert_eq!(
            r.body.unwrap()["error"],
            "loadvm failed: Snapshot 's9' does not exist in one or more devices"
        );
        let refused = ActionError::Refused {
            action: "savevm",
            reason: "Snapshot 's1' already exists in one or more devices".into(),
            kind: Refusal::NotNow,
        };
        assert_eq!(respond(Route::SaveVm, Err(refused)).status, 409);
        let missing = ActionError::DeviceNotFound("nope".into());
        assert_eq!(respond(Route::DelVm, Err(missing)).status, 404);
        assert_eq!(
            respond(Route::ListVmSnapshots, Ok(VmmResponse::Done)).status,
            500
        );
    }
}
