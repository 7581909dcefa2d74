//! HMP's whole-VM snapshots (QEMU 10's `hmp_savevm`, `hmp_loadvm`, `hmp_delvm`): `savevm [TAG]`
//! replaces a snapshot of the same name (QMP's `snapshot-save` refuses), and without a tag
//! names a new one `vm-%Y%m%d%H%M%S`; `loadvm TAG`, `delvm TAG`. Each runs on every writable
//! disk, the VM state in the first one, and prints nothing, or `Error: ` and QEMU's text. `info
//! snapshots` is [`crate::snapshots::info_text`].

use std::time::{SystemTime, UNIX_EPOCH};

use super::{bad_args, HmpCommand};
use crate::action::VmmAction;
use crate::snapshots::{auto_tag, VmSnapshotRequest};

/// `savevm [TAG]` (QEMU's `name:s?`).
pub(super) fn parse_savevm(line: &str, rest: &[&str]) -> HmpCommand {
    let tag = match rest {
        [] => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            auto_tag(i64::try_from(now).unwrap_or(i64::MAX))
        }
        [tag] => tag.to_string(),
        _ => return extraneous("savevm", line),
    };
    HmpCommand::Action(VmmAction::SaveVm(VmSnapshotRequest {
        overwrite: true,
        ..VmSnapshotRequest::tag(tag)
    }))
}

/// `loadvm TAG` (QEMU's `name:s`).
pub(super) fn parse_loadvm(line: &str, rest: &[&str]) -> HmpCommand {
    match rest {
        [] => bad_args("loadvm: string expected", line, 1),
        [tag] => HmpCommand::Action(VmmAction::LoadVm(VmSnapshotRequest::tag(*tag))),
        _ => extraneous("loadvm", line),
    }
}

/// `delvm TAG` (QEMU's `name:s`).
pub(super) fn parse_delvm(line: &str, rest: &[&str]) -> HmpCommand {
    match rest {
        [] => bad_args("delvm: string expected", line, 1),
        [tag] => HmpCommand::Action(VmmAction::DelVm(VmSnapshotRequest::tag(*tag))),
        _ => extraneous("delvm", line),
    }
}

fn extraneous(name: &str, line: &str) -> HmpCommand {
    bad_args(
        &format!("{name}: extraneous characters at the end of line"),
        line,
        1,
    )
}

#[cfg(test)]
mod tests;
