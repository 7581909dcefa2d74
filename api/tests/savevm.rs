//! Whole-VM snapshots through the real doors against the fake VMM: QMP's snapshot jobs with
//! their JOB_STATUS_CHANGE events reaching every client in QEMU's order, `query-jobs` and
//! `job-dismiss` shared by the clients, a job that outlives its client, HMP's `savevm`,
//! `loadvm`, `delvm` and `info snapshots`, and the REST routes.

mod common;

use std::time::Duration;

use api::http::ApiServer;
use api::qmp::QmpServer;
use api::server::Limits;
use api::{QmpEndpoint, VmmAction};
use common::{tmpdir, FakeVmm, Http, Qmp, FAKE_VM_STATE_SIZE};
use serde_json::{json, Value};

fn start(name: &str) -> (FakeVmm, QmpServer, std::path::PathBuf) {
    let sock = tmpdir(name).join("qmp.sock");
    let (vmm, handle) = FakeVmm::start();
    let eps = [QmpEndpoint::Unix(sock.clone())];
    let server = QmpServer::start_with_limits(&eps, handle, vmm.events(), Limits::qmp()).unwrap();
    (vmm, server, sock)
}

/// A line of the client's output as `"EVENT"`, `"EVENT id status"` for a job's, or `return`
/// / `error` for an answer.
fn describe(v: &Value) -> String {
    match v["event"].as_str() {
        Some("JOB_STATUS_CHANGE") => format!(
            "JOB_STATUS_CHANGE {} {}",
            v["data"]["id"].as_str().unwrap(),
            v["data"]["status"].as_str().unwrap()
        ),
        Some(name) => name.to_string(),
        None if v.get("return").is_some() => "return".into(),
        None => format!("error: {}", v["error"]["desc"]),
    }
}

/// Everything the client receives up to and including `last`.
fn until(c: &mut Qmp, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let v = c.recv().expect("more output");
        seen.push(describe(&v));
        if seen.last().map(String::as_str) == Some(last) {
            return seen;
        }
        assert!(seen.len() < 50, "never saw {last}: {seen:?}");
    }
}

fn job_lines(id: &str, statuses: &[&str]) -> Vec<String> {
    statuses
        .iter()
        .map(|s| format!("JOB_STATUS_CHANGE {id} {s}"))
        .collect()
}

fn save(id: &str, tag: &str) -> Value {
    json!({"execute": "snapshot-save", "arguments": {
        "job-id": id, "tag": tag, "vmstate": "disk0", "devices": ["disk0", "disk1"]}})
}

fn send(c: &mut Qmp, req: &Value) {
    c.send_raw(serde_json::to_string(req).unwrap().as_bytes())
        .unwrap();
}

#[test]
fn snapshot_jobs_reach_every_client_in_qemus_order() {
    let (vmm, _server, sock) = start("jobs");
    let mut a = Qmp::unix(&sock).greeted(true);
    let mut b = Qmp::unix(&sock).greeted(true);

    send(&mut a, &save("save0", "s1"));
    // The job's first two events come with the command, before its return; the VM's STOP and
    // RESUME while the VMM works; then the job concludes.
    let mut expected = job_lines("save0", &["created", "running"]);
    expected.push("return".into());
    expected.extend(["STOP".to_string(), "RESUME".to_string()]);
    expected.extend(job_lines("save0", &["waiting", "pending", "concluded"]));
    assert_eq!(until(&mut a, "JOB_STATUS_CHANGE save0 concluded"), expected);
    // The other client sees the same events, without the return.
    expected.retain(|l| l != "return");
    assert_eq!(until(&mut b, "JOB_STATUS_CHANGE save0 concluded"), expected);

    let jobs = b.cmd(&json!({"execute": "query-jobs"}));
    assert_eq!(
        jobs,
        json!({"return": [{"id": "save0", "type": "snapshot-save", "status": "concluded",
                           "current-progress": 1, "total-progress": 1}]})
    );
    assert!(vmm
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|a| matches!(a, VmmAction::SaveVm(r) if r.tag == "s1" && !r.overwrite)));

    // The same tag again: the job fails with QEMU's text.
    send(&mut a, &save("save1", "s1"));
    let mut expected = job_lines("save1", &["created", "running"]);
    expected.push("return".into());
    expected.extend(job_lines("save1", &["aborting", "concluded"]));
    assert_eq!(until(&mut a, "JOB_STATUS_CHANGE save1 concluded"), expected);
    let jobs = a.cmd(&json!({"execute": "query-jobs"}));
    assert_eq!(jobs["return"][0]["id"], "save1", "newest first");
    assert_eq!(
        jobs["return"][0]["error"],
        "Snapshot 's1' already exists in one or more devices"
    );
    assert!(jobs["return"][1].get("error").is_none());

    // Dismissing: the null event reaches both, the dismissing one before its return.
    send(
        &mut b,
        &json!({"execute": "job-dismiss", "arguments": {"id": "save0"}}),
    );
    let seen = until(&mut b, "return");
    assert_eq!(
        &seen[seen.len() - 2..],
        ["JOB_STATUS_CHANGE save0 null", "return"]
    );
    assert_eq!(
        until(&mut a, "JOB_STATUS_CHANGE save0 null")
            .last()
            .unwrap(),
        "JOB_STATUS_CHANGE save0 null"
    );
    let r = a.cmd(&json!({"execute": "job-dismiss", "arguments": {"id": "save0"}}));
    assert_eq!(r["error"]["desc"], "Job not found");
    let r = a.cmd(&json!({"execute": "snapshot-save", "arguments": {"job-id": "x", "tag": "t"}}));
    assert_eq!(r["error"]["desc"], "Parameter 'vmstate' is missing");

    // Load and delete, with their own types.
    send(
        &mut a,
        &json!({"execute": "snapshot-load", "arguments": {
        "job-id": "load0", "tag": "s1", "vmstate": "disk0", "devices": ["disk0", "disk1"]}}),
    );
    let seen = until(&mut a, "JOB_STATUS_CHANGE load0 concluded");
    assert!(
        seen.contains(&"JOB_STATUS_CHANGE load0 pending".to_string()),
        "{seen:?}"
    );
    send(
        &mut a,
        &json!({"execute": "snapshot-delete", "arguments": {
        "job-id": "del0", "tag": "s1", "devices": ["disk0", "disk1"]}}),
    );
    let seen = until(&mut a, "JOB_STATUS_CHANGE del0 concluded");
    assert!(
        !seen.contains(&"STOP".to_string()),
        "delete does not stop the VM: {seen:?}"
    );
    let jobs = a.cmd(&json!({"execute": "query-jobs"}));
    let types: Vec<&str> = jobs["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["snapshot-delete", "snapshot-load", "snapshot-save"]);
}

#[test]
fn a_job_outlives_the_client_that_started_it() {
    let (vmm, _server, sock) = start("orphan");
    let mut watcher = Qmp::unix(&sock).greeted(true);
    *vmm.delay.lock().unwrap() = Duration::from_millis(300);
    {
        let mut c = Qmp::unix(&sock).greeted(true);
        send(&mut c, &save("orphan", "s1"));
        assert_eq!(
            until(&mut c, "return"),
            [
                "JOB_STATUS_CHANGE orphan created",
                "JOB_STATUS_CHANGE orphan running",
                "return"
            ]
        );
        // The client goes away while the VMM works.
    }
    let seen = until(&mut watcher, "JOB_STATUS_CHANGE orphan concluded");
    assert_eq!(seen[..2], job_lines("orphan", &["created", "running"])[..]);
    *vmm.delay.lock().unwrap() = Duration::ZERO;
    let jobs = watcher.cmd(&json!({"execute": "query-jobs"}));
    assert_eq!(jobs["return"][0]["status"], "concluded");
    // A later client sees it, and may dismiss it.
    let mut later = Qmp::unix(&sock).greeted(true);
    let r = later.cmd(&json!({"execute": "job-dismiss", "arguments": {"id": "orphan"}}));
    assert_eq!(r, json!({"return": {}}));
}

#[test]
fn a_client_may_ask_while_the_job_runs() {
    let (vmm, _server, sock) = start("busy");
    let mut a = Qmp::unix(&sock).greeted(true);
    *vmm.delay.lock().unwrap() = Duration::from_millis(300);
    send(&mut a, &save("slow", "s1"));
    until(&mut a, "return");
    // Answered by the monitor while the VMM is still at work.
    let jobs = a.cmd(&json!({"execute": "query-jobs"}));
    assert_eq!(jobs["return"][0]["status"], "running");
    assert_eq!(jobs["return"][0]["current-progress"], 0);
    let r = a.cmd(&json!({"execute": "job-dismiss", "arguments": {"id": "slow"}}));
    assert_eq!(
        r["error"]["desc"],
        "Job 'slow' in state 'running' cannot accept command verb 'dismiss'"
    );
    // A request for the VMM waits behind the job's action: the job's events come first.
    let status = a.cmd(&json!({"execute": "query-status"}));
    assert_eq!(status["return"]["status"], "running");
    let names: Vec<String> = a.events.iter().map(describe).collect();
    assert_eq!(
        names.last().map(String::as_str),
        Some("JOB_STATUS_CHANGE slow concluded"),
        "{names:?}"
    );
}

fn hmp(c: &mut Qmp, line: &str) -> String {
    let r = c.cmd(&json!({"execute": "human-monitor-command",
                          "arguments": {"command-line": line}}));
    r["return"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

#[test]
fn hmp_savevm_loadvm_delvm_and_info_snapshots() {
    let (_vmm, _server, sock) = start("hmp");
    let mut c = Qmp::unix(&sock).greeted(true);
    assert_eq!(
        hmp(&mut c, "info snapshots"),
        "There is no snapshot available.\r\n"
    );
    assert_eq!(hmp(&mut c, "savevm s1"), "");
    assert_eq!(c.event("STOP")["event"], "STOP");
    assert_eq!(c.event("RESUME")["event"], "RESUME");
    // HMP's savevm replaces a snapshot of the same name.
    assert_eq!(hmp(&mut c, "savevm s1"), "");
    let info = hmp(&mut c, "info snapshots");
    let lines: Vec<&str> = info.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{info}");
    assert_eq!(lines[0], "List of snapshots present on all disks:");
    assert!(lines[1].starts_with("ID      TAG               VM_SIZE"));
    assert!(
        lines[2].starts_with("--      s1                 64 MiB "),
        "{info}"
    );
    assert_eq!(FAKE_VM_STATE_SIZE, 64 << 20);
    assert_eq!(hmp(&mut c, "loadvm s1"), "");
    assert_eq!(
        hmp(&mut c, "loadvm s2"),
        "Error: Snapshot 's2' does not exist in one or more devices\r\n"
    );
    assert_eq!(hmp(&mut c, "delvm s1"), "");
    assert_eq!(
        hmp(&mut c, "delvm s1"),
        "",
        "QEMU does not mind a missing snapshot"
    );
    assert_eq!(
        hmp(&mut c, "info snapshots"),
        "There is no snapshot available.\r\n"
    );
    assert_eq!(
        hmp(&mut c, "loadvm"),
        "loadvm: string expected\r\nTry \"help loadvm\" for more information\r\n"
    );
}

#[test]
fn rest_savevm_loadvm_delvm_and_snapshots() {
    let sock = tmpdir("rest").join("api.sock");
    let (vmm, handle) = FakeVmm::start();
    let _server = ApiServer::start(&sock, handle).unwrap();
    let mut c = Http::connect(&sock);
    let r = c.request("GET", "/vm/snapshots");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!([{"disk": "disk0", "snapshots": []}, {"disk": "disk1", "snapshots": []}])
    );
    let r = c.request_body("PUT", "/vm/savevm", r#"{"tag": "r1"}"#);
    assert_eq!(r.status, 204);
    let r = c.request("GET", "/vm/snapshots");
    let v = r.json();
    assert_eq!(v[0]["snapshots"][0]["tag"], "r1");
    assert_eq!(v[0]["snapshots"][0]["vm_state_size"], FAKE_VM_STATE_SIZE);
    assert_eq!(v[1]["snapshots"][0]["vm_state_size"], 0);
    assert_eq!(v[1]["snapshots"][0]["id"], "1");

    let r = c.request_body("PUT", "/vm/savevm", r#"{"tag": "r1"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(
        r.json()["error"],
        "savevm failed: Snapshot 'r1' already exists in one or more devices"
    );
    let r = c.request_body("PUT", "/vm/savevm", r#"{"tag": "r1", "overwrite": true}"#);
    assert_eq!(r.status, 204);
    let r = c.request_body(
        "PUT",
        "/vm/savevm",
        r#"{"tag": "r2", "devices": ["disk9"]}"#,
    );
    assert_eq!(r.status, 500);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("No block device node 'disk9'"));
    let r = c.request_body("PUT", "/vm/savevm", r#"{"tag": ""}"#);
    assert_eq!(r.status, 400);

    let r = c.request_body("PUT", "/vm/loadvm", r#"{"tag": "r1", "vmstate": "disk0"}"#);
    assert_eq!(r.status, 204);
    let r = c.request_body("PUT", "/vm/loadvm", r#"{"tag": "r1", "vmstate": "disk1"}"#);
    assert_eq!(r.status, 500);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("This is a disk-only snapshot"));
    let r = c.request_body("PUT", "/vm/delvm", r#"{"tag": "r1", "devices": ["disk1"]}"#);
    assert_eq!(r.status, 204);
    let v = c.request("GET", "/vm/snapshots").json();
    assert_eq!(v[0]["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(v[1]["snapshots"].as_array().unwrap().len(), 0);
    let r = c.request_body("PUT", "/vm/delvm", r#"{"tag": "r1"}"#);
    assert_eq!(r.status, 204);
    let seen = vmm.seen.lock().unwrap().clone();
    assert!(seen.contains(&VmmAction::ListVmSnapshots));
}
