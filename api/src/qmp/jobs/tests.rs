//! The snapshot jobs through the monitor: QEMU's argument checks, the job life and its events,
//! `query-jobs` and `job-dismiss`, and the list shared by the clients of one server.

use serde_json::json;

use super::*;
use crate::action::{ActionError, Refusal, VmState, VmmAction, VmmResponse};
use crate::qmp::commands::{Monitor, Step};
use crate::snapshots::VmSnapshotRequest;

fn negotiated(jobs: &Jobs) -> Monitor {
    let mut m = Monitor::with_jobs(jobs.clone());
    assert_eq!(
        m.request(json!({"execute": "qmp_capabilities"})),
        Step::Answer(json!({"return": {}}))
    );
    m
}

fn answer(step: Step) -> Value {
    match step {
        Step::Answer(v) => v,
        other => panic!("not an answer: {other:?}"),
    }
}

fn desc(step: Step) -> String {
    answer(step)["error"]["desc"].as_str().unwrap().to_string()
}

/// The (id, status) of JOB_STATUS_CHANGE events, checking their shape.
fn statuses(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e["event"], "JOB_STATUS_CHANGE", "{e}");
            assert!(e["timestamp"]["seconds"].as_i64().unwrap() > 0, "{e}");
            assert!(e["timestamp"]["microseconds"].is_i64(), "{e}");
            let data = e["data"].as_object().unwrap();
            assert_eq!(data.len(), 2, "{e}");
            (
                data["id"].as_str().unwrap().to_string(),
                data["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(id: &str, list: &[&str]) -> Vec<(String, String)> {
    list.iter()
        .map(|s| (id.to_string(), s.to_string()))
        .collect()
}

fn save(id: &str, tag: &str) -> Value {
    json!({"execute": "snapshot-save",
           "arguments": {"job-id": id, "tag": tag, "vmstate": "disk0", "devices": ["disk0", "disk1"]}})
}

#[test]
fn snapshot_save_is_a_job_that_waits_to_be_dismissed() {
    let jobs = Jobs::default();
    let mut m = negotiated(&jobs);
    let mut req = save("save0", "s1");
    req["id"] = json!(7);
    let Step::Announce {
        events,
        answer: ret,
        job,
    } = m.request(req)
    else {
        panic!("no job")
    };
    // QEMU emits `created` and `running` while the command runs: before its return.
    assert_eq!(statuses(&events), pairs("save0", &["created", "running"]));
    assert_eq!(ret, json!({"return": {}, "id": 7}));
    let expected = VmSnapshotRequest {
        tag: "s1".into(),
        vmstate: Some("disk0".into()),
        devices: Some(vec!["disk0".into(), "disk1".into()]),
        overwrite: false,
    };
    assert_eq!(job, Some(("save0".into(), VmmAction::SaveVm(expected))));
    assert!(!m.busy(), "the client goes on while the job runs");

    let running = json!({"return": [{"id": "save0", "type": "snapshot-save", "status": "running",
                                     "current-progress": 0, "total-progress": 0}]});
    assert_eq!(answer(m.request(json!({"execute": "query-jobs"}))), running);
    assert_eq!(
        desc(m.request(json!({"execute": "job-dismiss", "arguments": {"id": "save0"}}))),
        "Job 'save0' in state 'running' cannot accept command verb 'dismiss'"
    );

    let done = snapshot::conclude(&jobs, "save0", Ok(VmmResponse::Done));
    assert_eq!(
        statuses(&done),
        pairs("save0", &["waiting", "pending", "concluded"])
    );
    assert!(snapshot::conclude(&jobs, "save0", Ok(VmmResponse::Done)).is_empty());
    assert_eq!(
        answer(m.request(json!({"execute": "query-jobs", "id": "q"}))),
        json!({"return": [{"id": "save0", "type": "snapshot-save", "status": "concluded",
                           "current-progress": 1, "total-progress": 1}], "id": "q"})
    );
    assert_eq!(
        desc(m.request(save("save0", "s2"))),
        "Job ID 'save0' already in use",
        "a concluded job keeps its id until dismissed"
    );

    let Step::Announce {
        events,
        answer: ret,
        job: None,
    } = m.request(json!({"execute": "job-dismiss", "arguments": {"id": "save0"}, "id": 8}))
    else {
        panic!("dismiss")
    };
    assert_eq!(statuses(&events), pairs("save0", &["null"]));
    assert_eq!(ret, json!({"return": {}, "id": 8}));
    assert_eq!(
        answer(m.request(json!({"execute": "query-jobs"}))),
        json!({"return": []})
    );
    assert_eq!(
        desc(m.request(json!({"execute": "job-dismiss", "arguments": {"id": "save0"}}))),
        "Job not found"
    );
}

#[test]
fn a_failed_job_aborts_and_keeps_its_error() {
    let jobs = Jobs::default();
    let mut m = negotiated(&jobs);
    let Step::Announce { .. } = m.request(save("dup", "s1")) else {
        panic!("no job")
    };
    let reason = "Snapshot 's1' already exists in one or more devices";
    let events = snapshot::conclude(
        &jobs,
        "dup",
        Err(ActionError::Failed {
            action: "savevm",
            reason: reason.into(),
        }),
    );
    assert_eq!(statuses(&events), pairs("dup", &["aborting", "concluded"]));
    assert_eq!(
        answer(m.request(json!({"execute": "query-jobs"}))),
        json!({"return": [{"id": "dup", "type": "snapshot-save", "status": "concluded",
                           "current-progress": 1, "total-progress": 1, "error": reason}]})
    );
    let Step::Announce { events, .. } =
        m.request(json!({"execute": "job-dismiss", "arguments": {"id": "dup"}}))
    else {
        panic!("dismiss")
    };
    assert_eq!(statuses(&events), pairs("dup", &["null"]));
}

#[test]
fn load_and_delete_are_jobs_of_their_own_type() {
    let jobs = Jobs::default();
    let mut m = negotiated(&jobs);
    let Step::Announce { job, .. } = m.request(json!({"execute": "snapshot-load",
        "arguments": {"job-id": "load0", "tag": "s1", "vmstate": "d", "devices": ["d"]}}))
    else {
        panic!("no job")
    };
    let req = VmSnapshotRequest {
        tag: "s1".into(),
        vmstate: Some("d".into()),
        devices: Some(vec!["d".into()]),
        overwrite: false,
    };
    assert_eq!(job, Some(("load0".into(), VmmAction::LoadVm(req))));
    let Step::Announce { job, .. } = m.request(json!({"execute": "snapshot-delete",
        "arguments": {"job-id": "del0", "tag": "s1", "devices": []}}))
    else {
        panic!("no job")
    };
    // An empty list goes to the VMM, which says what QEMU says.
    let req = VmSnapshotRequest {
        tag: "s1".into(),
        vmstate: None,
        devices: Some(vec![]),
        overwrite: false,
    };
    assert_eq!(job, Some(("del0".into(), VmmAction::DelVm(req))));
    // Newest first, as QEMU lists its jobs.
    let r = answer(m.request(json!({"execute": "query-jobs"})));
    let listed: Vec<(&str, &str)> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [("del0", "snapshot-delete"), ("load0", "snapshot-load")]
    );
}

#[test]
fn arguments_are_checked_as_qemu_checks_them() {
    let jobs = Jobs::default();
    let mut m = negotiated(&jobs);
    let mut run =
        |args: Value| desc(m.request(json!({"execute": "snapshot-save", "arguments": args})));
    assert_eq!(run(json!({})), "Parameter 'job-id' is missing");
    assert_eq!(run(json!({"job-id": "j"})), "Parameter 'tag' is missing");
    assert_eq!(
        run(json!({"job-id": "j", "tag": "t"})),
        "Parameter 'vmstate' is missing"
    );
    assert_eq!(
        run(json!({"job-id": "j", "tag": "t", "vmstate": "d"})),
        "Parameter 'devices' is missing"
    );
    assert_eq!(
        run(json!({"job-id": 1, "tag": "t", "vmstate": "d", "devices": []})),
        "Invalid parameter type for 'job-id', expected: string"
    );
    assert_eq!(
        run(json!({"job-id": "j", "tag": "t", "vmstate": "d", "devices": "d"})),
        "Invalid parameter type for 'devices', expected: array"
    );
    assert_eq!(
        run(json!({"job-id": "j", "tag": "t", "vmstate": "d", "devices": ["d", 2]})),
        "Invalid parameter type for 'devices[1]', expected: string"
    );
    assert_eq!(
        run(json!({"job-id": "j", "tag": "t", "vmstate": "d", "devices": [], "overwrite": true})),
        "Parameter 'overwrite' is unexpected"
    );
    for bad in ["", "0abc", "-x", "a b", "a/b", "é"] {
        assert_eq!(
            run(json!({"job-id": bad, "tag": "t", "vmstate": "d", "devices": []})),
            format!("Invalid job ID '{bad}'")
        );
    }
    let d = desc(m.request(json!({"execute": "snapshot-delete",
        "arguments": {"job-id": "j", "tag": "t", "vmstate": "d", "devices": []}})));
    assert_eq!(d, "Parameter 'vmstate' is unexpected");
    assert_eq!(
        desc(m.request(json!({"execute": "job-dismiss"}))),
        "Parameter 'id' is missing"
    );
    assert_eq!(
        desc(m.request(json!({"execute": "query-jobs", "arguments": {"x": 1}}))),
        "Parameter 'x' is unexpected"
    );
    // Nothing was created by the refused requests; a well-formed id of every kind is fine.
    assert_eq!(
        answer(m.request(json!({"execute": "query-jobs"}))),
        json!({"return": []})
    );
    let Step::Announce { .. } = m.request(save("A-1.b_2", "t")) else {
        panic!("no job")
    };
}

#[test]
fn the_list_is_shared_by_the_clients_of_a_server() {
    let jobs = Jobs::default();
    let mut a = negotiated(&jobs);
    let mut b = negotiated(&jobs);
    let Step::Announce { .. } = a.request(save("shared", "s1")) else {
        panic!("no job")
    };
    assert_eq!(
        desc(b.request(save("shared", "s2"))),
        "Job ID 'shared' already in use"
    );
    snapshot::conclude(&jobs, "shared", Ok(VmmResponse::Done));
    let r = answer(b.request(json!({"execute": "query-jobs"})));
    assert_eq!(r["return"][0]["status"], "concluded");
    let Step::Announce { .. } =
        b.request(json!({"execute": "job-dismiss", "arguments": {"id": "shared"}}))
    else {
        panic!("dismiss")
    };
    assert_eq!(
        answer(a.request(json!({"execute": "query-jobs"}))),
        json!({"return": []})
    );
    // Another server's list is its own.
    let mut c = negotiated(&Jobs::default());
    let Step::Announce { .. } = c.request(save("shared", "s1")) else {
        panic!("no job")
    };
}

#[test]
fn jobs_are_bounded() {
    let jobs = Jobs::default();
    for i in 0..MAX_JOBS {
        jobs.start(&format!("j{i}"), JobType::SnapshotDelete)
            .unwrap();
    }
    let e = jobs.start("one-more", JobType::SnapshotDelete).unwrap_err();
    assert!(e.desc.contains("job-dismiss"), "{}", e.desc);
    jobs.finish("j0", Ok(()));
    jobs.dismiss("j0").unwrap();
    jobs.start("one-more", JobType::SnapshotDelete).unwrap();
}

#[test]
fn failed_actions_read_as_qemu_words_them() {
    let failed = |reason: &str| ActionError::Failed {
        action: "loadvm",
        reason: reason.into(),
    };
    assert_eq!(
        snapshot::error_text(&failed(
            "Snapshot 's9' does not exist in one or more devices"
        )),
        "Snapshot 's9' does not exist in one or more devices"
    );
    assert_eq!(
        snapshot::error_text(&ActionError::Refused {
            action: "savevm",
            reason: "At least one device is required for snapshot".into(),
            kind: Refusal::BadArgument,
        }),
        "At least one device is required for snapshot"
    );
    assert_eq!(
        snapshot::error_text(&ActionError::DeviceNotFound("nope".into())),
        "No block device node 'nope'"
    );
    assert_eq!(
        snapshot::error_text(&ActionError::InvalidState {
            action: "savevm",
            state: VmState::PostMigrate,
        }),
        "cannot savevm while the VM is post_migrate"
    );
    let events = snapshot::conclude(&Jobs::default(), "nobody", Err(ActionError::Unavailable));
    assert!(events.is_empty(), "an unknown job has no events");
}
