//! `snapshot-save`, `snapshot-load` and `snapshot-delete` (qapi/migration.json): their arguments
//! (type-checked by the command table; all of them mandatory, as in QEMU) as the VMM's action,
//! and the text of a failed one: the job's `error`, and what HMP's `savevm`, `loadvm` and
//! `delvm` print after `Error: `.
//!
//! QEMU's `vmstate` and `devices` are block node names; here they are disk ids. `snapshot-save`
//! never replaces a snapshot of the same name (HMP's `savevm` does).

use serde_json::{Map, Value};

use super::{JobType, Jobs};
use crate::action::{ActionError, VmmAction};
use crate::controller::Reply;
use crate::snapshots::VmSnapshotRequest;

/// The job a snapshot command starts: its type, its id and the action that does the work;
/// `None` for other commands.
pub(crate) fn job(
    command: &str,
    args: &Map<String, Value>,
) -> Option<(JobType, String, VmmAction)> {
    let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let devices = args.get("devices").and_then(Value::as_array).map(|list| {
        list.iter()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect()
    });
    let req = VmSnapshotRequest {
        tag: text("tag").unwrap_or_default(),
        vmstate: text("vmstate"),
        devices,
        overwrite: false,
    };
    let (kind, action) = match command {
        "snapshot-save" => (JobType::SnapshotSave, VmmAction::SaveVm(req)),
        "snapshot-load" => (JobType::SnapshotLoad, VmmAction::LoadVm(req)),
        "snapshot-delete" => (JobType::SnapshotDelete, VmmAction::DelVm(req)),
        _ => return None,
    };
    Some((kind, text("job-id").unwrap_or_default(), action))
}

/// What a failed snapshot action says, as QEMU words it: the VMM's reason alone (it uses
/// QEMU's texts), a disk that does not exist as QEMU's missing block node.
pub(crate) fn error_text(e: &ActionError) -> String {
    match e {
        ActionError::Failed { reason, .. } | ActionError::Refused { reason, .. } => reason.clone(),
        ActionError::DeviceNotFound(id) => format!("No block device node '{id}'"),
        e => e.to_string(),
    }
}

/// Concludes job `id` with the action's reply (on the door thread, when the reply arrives);
/// the events to send.
pub(crate) fn conclude(jobs: &Jobs, id: &str, reply: Reply) -> Vec<Value> {
    jobs.finish(id, reply.map(|_| ()).map_err(|e| error_text(&e)))
}
