//! The REST API over a real unix socket against a fake VMM thread: the lifecycle, statuses,
//! keep-alive and pipelining, and every robustness case.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use api::controller::action_channel;
use api::http::ApiServer;
use api::server::{Limits, ServerError};
use api::{VmState, VmmAction};
use common::{tmpdir, FakeVmm, Http};
use serde_json::json;

fn start(name: &str, limits: Limits) -> (FakeVmm, ApiServer, std::path::PathBuf) {
    let sock = tmpdir(name).join("api.sock");
    let (vmm, handle) = FakeVmm::start();
    let server = ApiServer::start_with_limits(&sock, handle, limits).unwrap();
    (vmm, server, sock)
}

fn alive(path: &std::path::Path) {
    let mut c = Http::connect(path);
    let r = c.request("GET", "/version");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn lifecycle_and_statuses() {
    let (vmm, server, sock) = start("life", Limits::http());
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut c = Http::connect(&sock);
    let r = c.request("GET", "/vm");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let info = r.json();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"][1], json!({"index": 1, "thread_id": 4243}));
    assert_eq!(info["config"]["machine"]["vcpus"], 1);

    assert_eq!(c.request("PUT", "/vm/pause").status, 204);
    assert_eq!(vmm.state(), VmState::Paused);
    let r = c.request("PUT", "/vm/pause");
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json(),
        json!({"error": "cannot pause while the VM is paused"})
    );
    assert_eq!(c.request("PUT", "/vm/resume").status, 204);
    assert_eq!(c.request("PUT", "/vm/power-button").status, 204);
    assert_eq!(c.request("PUT", "/vm/reset").status, 204);

    let r = c.request("GET", "/nope");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("/nope"));
    let r = c.request("POST", "/vm/reset");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("PUT"));

    // A body: `{}` is fine, anything else is a 400.
    c.send_raw(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    assert_eq!(c.response().unwrap().status, 204);
    c.send_raw(b"PUT /vm/resume HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"a\": 1}\n")
        .unwrap();
    assert_eq!(c.response().unwrap().status, 400);
    c.send_raw(b"PUT /vm/resume HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz")
        .unwrap();
    assert_eq!(c.response().unwrap().status, 400);
    // Expect: 100-continue gets the interim response.
    c.send_raw(b"PUT /vm/resume HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    assert_eq!(c.response().unwrap().status, 100);
    c.send_raw(b"{}").unwrap();
    assert_eq!(c.response().unwrap().status, 204);

    assert_eq!(c.request("PUT", "/vm/shutdown").status, 204);
    assert_eq!(vmm.state(), VmState::ShuttingDown);
    assert_eq!(c.request("PUT", "/vm/reset").status, 409);
    server.shutdown();
    assert!(c.response().is_none());
    assert!(!sock.exists());
}

#[test]
fn keep_alive_pipelining_and_close() {
    let (_vmm, server, sock) = start("pipe", Limits::http());
    let mut c = Http::connect(&sock);
    c.send_raw(
        b"GET /version HTTP/1.1\r\n\r\nPUT /vm/pause HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\r\n\r\n",
    )
    .unwrap();
    assert_eq!(c.response().unwrap().status, 200);
    assert_eq!(c.response().unwrap().status, 204);
    let r = c.response().unwrap();
    assert_eq!(r.json()["state"], "paused");
    // Connection: close is honoured (even with a request pipelined behind it).
    c.send_raw(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\nGET /vm HTTP/1.1\r\n\r\n")
        .unwrap();
    let r = c.response().unwrap();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.response().is_none());
    // HTTP/1.0 closes by default.
    let mut c = Http::connect(&sock);
    c.send_raw(b"GET /version HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(c.response().unwrap().status, 200);
    assert!(c.response().is_none());
    drop(server);
}

#[test]
fn bad_requests_are_answered_then_dropped() {
    let limits = Limits {
        stall_timeout: Duration::from_millis(400),
        ..Limits::http()
    };
    let (_vmm, server, sock) = start("bad", limits);
    let cases: [(&[u8], u16); 5] = [
        (b"\x01\x02 garbage\r\n\r\n", 400),
        (
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
            400,
        ),
        (
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
            413,
        ),
        (
            b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (b"GET /vm HTTP/1.1\r\nX-Big: ", 431),
    ];
    for (raw, status) in cases {
        let mut c = Http::connect(&sock);
        let mut raw = raw.to_vec();
        if status == 431 {
            raw.extend(std::iter::repeat_n(b'a', 20 << 10));
        }
        c.send_raw(&raw).unwrap();
        let r = c.response().unwrap();
        assert_eq!(
            r.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&raw[..20])
        );
        assert!(r.json()["error"].is_string());
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed());
        alive(&sock);
    }
    // Half a request, then silence: dropped after the stall timeout.
    let mut half = Http::connect(&sock);
    half.send_raw(b"GET /vm HTTP/1.1\r\nHo").unwrap();
    alive(&sock);
    assert!(half.closed());
    // Leaves mid-request: the reply is discarded, the server carries on.
    {
        let mut gone = Http::connect(&sock);
        gone.send_raw(b"PUT /vm/pause HTTP/1.1\r\n\r\n").unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    alive(&sock);
    // Never reads: pipelined responses pile up past the output bound, and it is dropped.
    let mut hog = Http::connect(&sock);
    hog.stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let burst = b"GET /version HTTP/1.1\r\n\r\n".repeat(500);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut dropped = false;
    while std::time::Instant::now() < deadline {
        if hog.stream.write_all(&burst).is_err() {
            dropped = true;
            break;
        }
    }
    assert!(dropped);
    alive(&sock);
    drop(server);
}

#[test]
fn connection_cap_and_vmm_gone() {
    let dir = tmpdir("cap");
    let sock = dir.join("api.sock");
    let (handle, inbox) = action_channel().unwrap();
    drop(inbox);
    let limits = Limits {
        max_clients: 1,
        ..Limits::http()
    };
    let server = ApiServer::start_with_limits(&sock, handle, limits).unwrap();
    let mut first = Http::connect(&sock);
    let r = first.request("GET", "/vm");
    assert_eq!(r.status, 503);
    assert_eq!(r.json(), json!({"error": "the VMM is shutting down"}));
    let mut second = Http::connect(&sock);
    let r = second.response().unwrap();
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].as_str().unwrap().contains("too many"));
    assert!(second.closed());
    assert_eq!(first.request("PUT", "/vm/pause").status, 503);
    server.shutdown();
}

#[test]
fn binding_errors() {
    let dir = tmpdir("bindh");
    let sock = dir.join("api.sock");
    let (_vmm, handle) = FakeVmm::start();
    let s = ApiServer::start(&sock, handle.clone()).unwrap();
    let e = ApiServer::start(&sock, handle.clone()).err().unwrap();
    assert!(matches!(e, ServerError::SocketInUse(_)), "{e}");
    let e = ApiServer::start(&dir.join("no/such/dir/x.sock"), handle.clone())
        .err()
        .unwrap();
    assert!(matches!(e, ServerError::BindUnix { .. }), "{e}");
    let e = ApiServer::start(&dir.join("x".repeat(200)), handle)
        .err()
        .unwrap();
    assert!(matches!(e, ServerError::BadUnixPath { .. }), "{e}");
    drop(s);
    assert!(!sock.exists());
}

#[test]
fn snapshot_and_migration_info() {
    let (vmm, server, sock) = start("snap", Limits::http());
    let dir = sock.parent().unwrap().to_path_buf();
    let mut c = Http::connect(&sock);
    let r = c.request("GET", "/vm/migration");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"status": "none", "total_time_ms": null, "setup_time_ms": null,
               "downtime_ms": null, "expected_downtime_ms": null, "ram": null,
               "error_desc": null})
    );

    // Body validation: nothing reaches the VMM.
    let bad = [
        "",
        "{}",
        r#"{"path": 5}"#,
        r#"{"path": "relative/vm.state"}"#,
        r#"{"path": "/x", "live": true}"#,
        "[]",
        "{",
    ];
    for body in bad {
        let r = c.request_body("PUT", "/vm/snapshot", body);
        assert_eq!(r.status, 400, "{body:?}");
        assert!(r.json()["error"].is_string());
    }
    assert!(vmm
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|a| !matches!(a, VmmAction::Snapshot { .. })));

    let file = dir.join("vm.state");
    let body = json!({ "path": file }).to_string();
    assert_eq!(c.request_body("PUT", "/vm/snapshot", &body).status, 204);
    assert_eq!(std::fs::read(&file).unwrap(), common::FAKE_STATE);
    assert_eq!(vmm.state(), VmState::PostMigrate);
    assert_eq!(c.request("GET", "/vm").json()["state"], "post_migrate");
    let info = c.request("GET", "/vm/migration").json();
    assert_eq!(info["status"], "completed");
    assert_eq!(info["total_time_ms"], 12);
    assert_eq!(info["ram"]["transferred"], common::FAKE_STATE.len());
    assert_eq!(info["ram"]["mbps"], 1.25);

    // Paused by the snapshot: another one or a restore is a conflict; resume continues.
    let r = c.request_body("PUT", "/vm/snapshot", &body);
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["error"],
        "cannot snapshot while the VM is post_migrate"
    );
    assert_eq!(c.request_body("PUT", "/vm/restore", &body).status, 409);
    assert_eq!(c.request("PUT", "/vm/pause").status, 409);
    assert_eq!(c.request("PUT", "/vm/resume").status, 204);
    assert_eq!(vmm.state(), VmState::Running);

    // A file the VMM cannot write: 500 with the reason, and the failure is reported.
    let body = json!({ "path": dir.join("no/such/dir/x") }).to_string();
    let r = c.request_body("PUT", "/vm/snapshot", &body);
    assert_eq!(r.status, 500);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("snapshot failed: cannot write"));
    let info = c.request("GET", "/vm/migration").json();
    assert_eq!(info["status"], "failed");
    assert!(info["error_desc"].is_string());
    assert_eq!(c.request("POST", "/vm/migration").status, 405);
    assert_eq!(
        c.request("GET", "/vm/snapshot").header("allow"),
        Some("PUT")
    );
    drop(server);
}

#[test]
fn restore_into_a_waiting_vmm() {
    let sock = tmpdir("restore").join("api.sock");
    let dir = sock.parent().unwrap().to_path_buf();
    let (vmm, handle) = FakeVmm::start_in(VmState::Incoming);
    let server = ApiServer::start(&sock, handle).unwrap();
    let mut c = Http::connect(&sock);
    assert_eq!(c.request("GET", "/vm").json()["state"], "incoming");
    assert_eq!(c.request("PUT", "/vm/resume").status, 409);
    let file = dir.join("vm.state");
    let body = json!({ "path": file }).to_string();
    assert_eq!(c.request_body("PUT", "/vm/snapshot", &body).status, 409);
    // No file yet: the VMM fails and keeps waiting.
    let r = c.request_body("PUT", "/vm/restore", &body);
    assert_eq!(r.status, 500);
    assert_eq!(vmm.state(), VmState::Incoming);
    assert_eq!(c.request_body("PUT", "/vm/restore", "{}").status, 400);
    std::fs::write(&file, common::FAKE_STATE).unwrap();
    assert_eq!(c.request_body("PUT", "/vm/restore", &body).status, 204);
    assert_eq!(vmm.state(), VmState::Running);
    assert_eq!(
        c.request("GET", "/vm/migration").json()["status"],
        "completed"
    );
    assert_eq!(c.request_body("PUT", "/vm/restore", &body).status, 409);
    drop(server);
}

#[test]
fn live_migration_over_rest() {
    let (vmm, server, sock) = start("live", Limits::http());
    let mut c = Http::connect(&sock);
    assert_eq!(
        c.request("GET", "/vm/migrate").json(),
        c.request("GET", "/vm/migration").json()
    );
    let p = c.request("GET", "/vm/migrate/parameters");
    assert_eq!(p.status, 200);
    assert_eq!(
        p.json(),
        json!({"downtime_limit_ms": 300, "max_bandwidth": 134_217_728})
    );
    let r = c.request_body(
        "PUT",
        "/vm/migrate/parameters",
        r#"{"downtime_limit_ms": 100}"#,
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        c.request("GET", "/vm/migrate/parameters").json(),
        json!({"downtime_limit_ms": 100, "max_bandwidth": 134_217_728})
    );
    for body in [r#"{"downtime_limit_ms": 9999999}"#, r#"{"max": 1}"#, "[]"] {
        assert_eq!(
            c.request_body("PUT", "/vm/migrate/parameters", body).status,
            400,
            "{body}"
        );
    }

    // Bad URIs never reach the VMM.
    for body in [
        "",
        r#"{"uri": "file:/tmp/x"}"#,
        r#"{"uri": "exec:cat"}"#,
        r#"{"uri": "tcp:nohost"}"#,
        r#"{"uri": "unix:relative.sock"}"#,
    ] {
        let r = c.request_body("PUT", "/vm/migrate", body);
        assert_eq!(r.status, 400, "{body}");
    }
    assert!(vmm
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|a| !matches!(a, VmmAction::Migrate { .. })));

    let r = c.request_body("PUT", "/vm/migrate", r#"{"uri": "tcp:127.0.0.1:4446"}"#);
    assert_eq!(r.status, 204);
    let info = c.request("GET", "/vm/migrate").json();
    assert_eq!(info["status"], "active");
    assert_eq!(info["expected_downtime_ms"], 50);
    assert_eq!(info["ram"]["dirty_sync_count"], 1);
    // One at a time.
    let r = c.request_body("PUT", "/vm/migrate", r#"{"uri": "unix:/run/m.sock"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(c.request("PUT", "/vm/migrate/cancel").status, 204);
    assert_eq!(
        c.request("GET", "/vm/migrate").json()["status"],
        "cancelled"
    );
    assert_eq!(vmm.state(), VmState::Running);
    // Nothing to cancel is not an error.
    assert_eq!(c.request("PUT", "/vm/migrate/cancel").status, 204);
    // Incoming needs a VMM that waits for it.
    let r = c.request_body("PUT", "/vm/migrate/incoming", r#"{"uri": "tcp:0:4446"}"#);
    assert_eq!(r.status, 409);
    drop(server);
}
