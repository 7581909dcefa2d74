//! `savevm`, `loadvm`, `delvm` and `info snapshots`: parsing, what they print, and the way
//! through QMP's `human-monitor-command`.

use serde_json::{json, Value};

use super::super::{action_text, info_reply, parse, InfoKind};
use super::*;
use crate::action::{ActionError, VmState, VmmResponse};
use crate::qmp::commands::{Monitor, Step};
use crate::snapshots::{DiskSnapshots, VmSnapshotInfo};

fn text(cmd: HmpCommand) -> String {
    match cmd {
        HmpCommand::Text(t) => t,
        other => panic!("not text: {other:?}"),
    }
}

fn action(cmd: HmpCommand) -> VmmAction {
    match cmd {
        HmpCommand::Action(a) => a,
        other => panic!("not an action: {other:?}"),
    }
}

fn tagged(tag: &str, overwrite: bool) -> VmSnapshotRequest {
    VmSnapshotRequest {
        overwrite,
        ..VmSnapshotRequest::tag(tag)
    }
}

#[test]
fn savevm_replaces_and_names_its_snapshot() {
    assert_eq!(
        action(parse("savevm s1")),
        VmmAction::SaveVm(tagged("s1", true))
    );
    let VmmAction::SaveVm(req) = action(parse("  savevm  ")) else {
        panic!("not savevm")
    };
    // vm-%Y%m%d%H%M%S in local time.
    assert!(req.tag.starts_with("vm-20"), "{}", req.tag);
    assert_eq!(req.tag.len(), 17, "{}", req.tag);
    assert!(
        req.tag[3..].bytes().all(|b| b.is_ascii_digit()),
        "{}",
        req.tag
    );
    assert!(req.overwrite && req.vmstate.is_none() && req.devices.is_none());
    assert_eq!(
        text(parse("savevm a b")),
        "savevm: extraneous characters at the end of line\r\n\
         Try \"help savevm\" for more information\r\n"
    );
}

#[test]
fn loadvm_and_delvm_take_a_tag() {
    assert_eq!(
        action(parse("loadvm s1")),
        VmmAction::LoadVm(tagged("s1", false))
    );
    assert_eq!(
        action(parse("delvm s1")),
        VmmAction::DelVm(tagged("s1", false))
    );
    assert_eq!(
        text(parse("loadvm")),
        "loadvm: string expected\r\nTry \"help loadvm\" for more information\r\n"
    );
    assert_eq!(
        text(parse("delvm")),
        "delvm: string expected\r\nTry \"help delvm\" for more information\r\n"
    );
    assert_eq!(
        text(parse("delvm a b")),
        "delvm: extraneous characters at the end of line\r\n\
         Try \"help delvm\" for more information\r\n"
    );
    assert_eq!(
        text(parse("loadvm a b")),
        "loadvm: extraneous characters at the end of line\r\n\
         Try \"help loadvm\" for more information\r\n"
    );
}

#[test]
fn they_print_nothing_or_qemus_error() {
    let load = VmmAction::LoadVm(tagged("d", false));
    assert_eq!(action_text(&load, Ok(()), false), "");
    let failed = |reason: &str| ActionError::Failed {
        action: "loadvm",
        reason: reason.into(),
    };
    assert_eq!(
        action_text(
            &load,
            Err(failed(
                "This is a disk-only snapshot. Revert to it  offline using qemu-img"
            )),
            false
        ),
        "Error: This is a disk-only snapshot. Revert to it  offline using qemu-img\r\n"
    );
    let del = VmmAction::DelVm(tagged("x", false));
    assert_eq!(
        action_text(
            &del,
            Err(failed(
                "Device 'd1' is writable but does not support snapshots"
            )),
            false
        ),
        "Error: Device 'd1' is writable but does not support snapshots\r\n"
    );
    let save = VmmAction::SaveVm(tagged("x", true));
    assert_eq!(
        action_text(
            &save,
            Err(ActionError::InvalidState {
                action: "savevm",
                state: VmState::PostMigrate
            }),
            false
        ),
        "Error: cannot savevm while the VM is post_migrate\r\n"
    );
}

fn one_disk() -> Vec<DiskSnapshots> {
    vec![DiskSnapshots {
        disk: "disk0".into(),
        snapshots: vec![VmSnapshotInfo {
            id: "1".into(),
            tag: "s1".into(),
            vm_state_size: 64 << 20,
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 61_000_000_000,
        }],
    }]
}

#[test]
fn info_snapshots_prints_qemus_table() {
    assert_eq!(
        parse("info snapshots"),
        HmpCommand::Info(InfoKind::Snapshots)
    );
    assert_eq!(InfoKind::Snapshots.action(), VmmAction::ListVmSnapshots);
    assert_eq!(
        text(parse("info snapshots all")),
        "snapshots: extraneous characters at the end of line\r\n\
         Try \"help info snapshots\" for more information\r\n"
    );
    let out = info_reply(
        InfoKind::Snapshots,
        Ok(VmmResponse::VmSnapshots(one_disk())),
        0,
    )
    .unwrap();
    let lines: Vec<&str> = out.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert_eq!(lines[0], "List of snapshots present on all disks:");
    assert_eq!(
        lines[1],
        "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
    );
    // The date is the host's local time; the rest is fixed.
    assert!(
        lines[2].starts_with("--      s1                 64 MiB 20"),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].ends_with("  0000:01:01.000         --"),
        "{}",
        lines[2]
    );
    assert!(out.ends_with("\r\n") && !out.replace("\r\n", "").contains('\n'));
    assert_eq!(
        info_reply(InfoKind::Snapshots, Ok(VmmResponse::VmSnapshots(vec![])), 0).unwrap(),
        "no block device can store vmstate for snapshot\r\n"
    );
    assert!(info_reply(InfoKind::Snapshots, Ok(VmmResponse::Done), 0).is_err());
}

#[test]
fn help_knows_them() {
    assert_eq!(
        text(parse("help savevm")),
        "savevm tag -- save a VM snapshot. If no tag is provided, a new snapshot is created\r\n"
    );
    assert_eq!(
        text(parse("help loadvm")),
        "loadvm tag -- restore a VM snapshot from its tag\r\n"
    );
    assert_eq!(
        text(parse("help delvm")),
        "delvm tag -- delete a VM snapshot from its tag\r\n"
    );
    assert_eq!(
        text(parse("help info snapshots")),
        "info snapshots  -- show the currently saved VM snapshots\r\n"
    );
}

fn hmp(m: &mut Monitor, line: &str) -> Step {
    m.request(json!({"execute": "human-monitor-command",
                     "arguments": {"command-line": line}, "id": line}))
}

fn answer(step: Step) -> Value {
    match step {
        Step::Answer(v) => v,
        other => panic!("not an answer: {other:?}"),
    }
}

#[test]
fn through_human_monitor_command() {
    let mut m = Monitor::default();
    answer(m.request(json!({"execute": "qmp_capabilities"})));
    assert_eq!(
        hmp(&mut m, "savevm s1"),
        Step::Submit(VmmAction::SaveVm(tagged("s1", true)))
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": "", "id": "savevm s1"})
    );
    assert_eq!(
        hmp(&mut m, "loadvm s9"),
        Step::Submit(VmmAction::LoadVm(tagged("s9", false)))
    );
    let err = ActionError::Failed {
        action: "loadvm",
        reason: "Snapshot 's9' does not exist in one or more devices".into(),
    };
    assert_eq!(
        answer(m.reply(Err(err))),
        json!({"return": "Error: Snapshot 's9' does not exist in one or more devices\r\n",
               "id": "loadvm s9"})
    );
    assert_eq!(
        hmp(&mut m, "info snapshots"),
        Step::Submit(VmmAction::ListVmSnapshots)
    );
    let r = answer(m.reply(Ok(VmmResponse::VmSnapshots(vec![DiskSnapshots {
        disk: "disk0".into(),
        snapshots: vec![],
    }]))));
    assert_eq!(
        r,
        json!({"return": "There is no snapshot available.\r\n", "id": "info snapshots"})
    );
    assert_eq!(
        answer(hmp(&mut m, "loadvm")),
        json!({"return": "loadvm: string expected\r\nTry \"help loadvm\" for more information\r\n",
               "id": "loadvm"})
    );
}
