//! The QMP monitor over real unix and TCP sockets, driven against a fake VMM thread: the full
//! lifecycle, and every robustness case (each with another client that keeps working).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use api::controller::action_channel;
use api::qmp::QmpServer;
use api::server::{Limits, ServerError};
use api::{QmpEndpoint, ShutdownCause, VmEvent, VmState, VmmAction};
use common::{tmpdir, FakeVmm, Qmp};
use serde_json::json;

fn start(name: &str, limits: Limits) -> (FakeVmm, QmpServer, std::path::PathBuf) {
    let dir = tmpdir(name);
    let sock = dir.join("qmp.sock");
    let (vmm, handle) = FakeVmm::start();
    let eps = [
        QmpEndpoint::Unix(sock.clone()),
        QmpEndpoint::Tcp("127.0.0.1:0".into()),
    ];
    let server = QmpServer::start_with_limits(&eps, handle, vmm.events(), limits).unwrap();
    (vmm, server, sock)
}

fn quick() -> Limits {
    Limits {
        stall_timeout: Duration::from_millis(400),
        ..Limits::qmp()
    }
}

fn alive(c: &mut Qmp) {
    let r = c.cmd(&json!({"execute": "query-kvm", "id": "ping"}));
    assert_eq!(
        r,
        json!({"return": {"enabled": true, "present": true}, "id": "ping"})
    );
}

#[test]
fn full_lifecycle_ends_with_shutdown_before_eof() {
    let (vmm, server, sock) = start("lifecycle", Limits::qmp());
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut a = Qmp::unix(&sock).greeted(true);
    let mut b = Qmp::tcp(server.tcp_addrs()[0]).greeted(true);

    let status = a.cmd(&json!({"execute": "query-status", "id": 1}));
    assert_eq!(
        status,
        json!({"return": {"running": true, "singlestep": false, "status": "running"}, "id": 1})
    );
    assert_eq!(a.cmd(&json!({"execute": "stop"})), json!({"return": {}}));
    let stop = a.event("STOP");
    assert!(stop["timestamp"]["seconds"].as_i64().unwrap() > 0);
    assert!(stop["timestamp"]["microseconds"].is_i64());
    assert_eq!(b.event("STOP")["event"], "STOP");
    let status = b.cmd(&json!({"execute": "query-status"}));
    assert_eq!(status["return"]["status"], "paused");
    assert_eq!(status["return"]["running"], false);
    assert_eq!(vmm.state(), VmState::Paused);

    assert_eq!(a.cmd(&json!({"execute": "cont"})), json!({"return": {}}));
    a.event("RESUME");
    b.event("RESUME");
    let r = a.cmd(&json!({"execute": "system_reset"}));
    assert_eq!(r, json!({"return": {}}));
    let reset = a.event("RESET");
    assert_eq!(
        reset["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    let hmp = a.cmd(&json!({"execute": "human-monitor-command",
                            "arguments": {"command-line": "info cpus"}}));
    assert_eq!(
        hmp["return"],
        "* CPU #0: thread_id=4242\r\n  CPU #1: thread_id=4243\r\n"
    );
    assert_eq!(
        a.cmd(&json!({"execute": "system_powerdown", "id": "p"})),
        json!({"return": {}, "id": "p"})
    );
    a.event("POWERDOWN");
    b.event("POWERDOWN");

    // The guest powers off: the VMM publishes SHUTDOWN and stops the server right away.
    vmm.bus
        .publish(VmEvent::Shutdown(ShutdownCause::GuestShutdown));
    server.shutdown();
    for c in [&mut a, &mut b] {
        let s = c.event("SHUTDOWN");
        assert_eq!(
            s["data"],
            json!({"guest": true, "reason": "guest-shutdown"})
        );
        assert!(c.recv().is_none(), "EOF after SHUTDOWN");
    }
    assert!(!sock.exists(), "socket file removed");
}

#[test]
fn quit_answers_then_shutdown_event() {
    let (vmm, server, sock) = start("quit", Limits::qmp());
    let mut a = Qmp::unix(&sock).greeted(true);
    assert_eq!(
        a.cmd(&json!({"execute": "quit", "id": 9})),
        json!({"return": {}, "id": 9})
    );
    assert_eq!(vmm.state(), VmState::ShuttingDown);
    vmm.bus
        .publish(VmEvent::Shutdown(ShutdownCause::HostQmpQuit));
    drop(server);
    let s = a.event("SHUTDOWN");
    assert_eq!(
        s["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert!(a.recv().is_none());
}

#[test]
fn negotiation_and_errors_over_the_wire() {
    let (_vmm, server, _sock) = start("errors", Limits::qmp());
    let mut c = Qmp::tcp(server.tcp_addrs()[0]).greeted(false);
    let r = c.cmd(&json!({"execute": "query-status", "id": 1}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(
        r["error"]["desc"],
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    // Events are not delivered before negotiation.
    _vmm.bus.publish(VmEvent::Stop);
    assert_eq!(
        c.cmd(&json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    assert!(c.events.is_empty());

    // Malformed JSON: an error without id, then the stream goes on.
    c.send_raw(b"{ \"execute\": }").unwrap();
    let r = c.answer();
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error"));
    assert!(r.get("id").is_none());
    alive(&mut c);

    // Unknown command, extra / missing / mistyped arguments.
    let r = c.cmd(&json!({"execute": "frob", "id": {"deep": [1]}}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(r["id"], json!({"deep": [1]}));
    let r = c.cmd(&json!({"execute": "stop", "arguments": {"x": 1}}));
    assert_eq!(r["error"]["desc"], "Parameter 'x' is unexpected");
    let r = c.cmd(&json!({"execute": "human-monitor-command"}));
    assert_eq!(r["error"]["desc"], "Parameter 'command-line' is missing");
    let r = c.cmd(&json!({"execute": "human-monitor-command", "arguments": {"command-line": []}}));
    assert_eq!(
        r["error"]["desc"],
        "Invalid parameter type for 'command-line', expected: string"
    );
    let r = c.cmd(&json!({"exec-oob": "query-kvm", "id": 3}));
    assert_eq!(
        r["error"]["desc"],
        "QMP input member 'exec-oob' is unexpected"
    );
    let r =
        c.cmd(&json!({"execute": "human-monitor-command", "arguments": {"command-line": "foo"}}));
    assert_eq!(r, json!({"return": "unknown command: 'foo'\r\n"}));

    // Several objects in one packet, one object over several packets, single quotes.
    c.send_raw(b"{\"execute\": \"query-name\", \"id\": 1}{\"execute\": \"query-name\", \"id\": 2}")
        .unwrap();
    assert_eq!(c.answer()["id"], 1);
    assert_eq!(c.answer()["id"], 2);
    c.send_raw(b"{\"execute\":").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(b" 'query-name', 'id': 'q'}\r\n").unwrap();
    assert_eq!(c.answer(), json!({"return": {}, "id": "q"}));
    // A control character resynchronises the parser.
    c.send_raw(b"{\"execute\": \"query-n\x01").unwrap();
    assert!(c.answer()["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("stray"));
    alive(&mut c);
}

#[test]
fn bad_clients_are_dropped_and_others_carry_on() {
    let (vmm, server, sock) = start("robust", quick());
    let mut good = Qmp::unix(&sock).greeted(true);

    // Oversized message: an error, then disconnected.
    let mut big = Qmp::unix(&sock).greeted(true);
    let mut payload = b"{\"execute\": \"query-name\", \"arguments\": {\"x\": \"".to_vec();
    payload.extend(std::iter::repeat_n(b'a', 70 << 10));
    let _ = big.send_raw(&payload);
    let r = big.answer();
    assert_eq!(r["error"]["desc"], "JSON token size limit exceeded");
    assert!(big.closed());
    alive(&mut good);

    // Half a message, then silence: dropped after the stall timeout.
    let mut half = Qmp::tcp(server.tcp_addrs()[0]).greeted(true);
    half.send_raw(b"{\"execute\": \"query-").unwrap();
    alive(&mut good);
    assert!(half.closed());

    // Leaves in the middle of a command: the late reply is dropped, the VMM still acts.
    *vmm.delay.lock().unwrap() = Duration::from_millis(300);
    {
        let mut leaver = Qmp::unix(&sock).greeted(true);
        leaver.send_raw(b"{\"execute\": \"stop\"}").unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    *vmm.delay.lock().unwrap() = Duration::ZERO;
    good.event("STOP");
    let st = good.cmd(&json!({"execute": "query-status"}));
    assert_eq!(st["return"]["status"], "paused");

    // Never reads: replies pile up past the output bound, and it is dropped.
    let never = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut w = never.try_clone().unwrap();
    never
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let cmd = b"{\"execute\": \"qmp_capabilities\"}".to_vec();
    let _ = std::io::Write::write_all(&mut w, &cmd);
    let burst = b"{\"execute\":\"query-version\"}".repeat(1000);
    let mut dropped = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if std::io::Write::write_all(&mut w, &burst).is_err() {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "a client that never reads is disconnected");
    alive(&mut good);
    drop(server);
}

#[test]
fn connection_cap_refuses_clearly() {
    let limits = Limits {
        max_clients: 2,
        ..Limits::qmp()
    };
    let (_vmm, server, sock) = start("cap", limits);
    let mut a = Qmp::unix(&sock).greeted(true);
    let _b = Qmp::tcp(server.tcp_addrs()[0]).greeted(false);
    let mut c = Qmp::unix(&sock);
    let r = c.recv().unwrap();
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("too many QMP clients"));
    assert!(c.recv().is_none());
    alive(&mut a);
}

#[test]
fn binding_errors_are_synchronous_and_clear() {
    let dir = tmpdir("bind");
    let sock = dir.join("q.sock");
    let (vmm, handle) = FakeVmm::start();
    let s1 = QmpServer::start(
        &[QmpEndpoint::Unix(sock.clone())],
        handle.clone(),
        vmm.events(),
    )
    .unwrap();
    let e = QmpServer::start(
        &[QmpEndpoint::Unix(sock.clone())],
        handle.clone(),
        vmm.events(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, ServerError::SocketInUse(_)), "{e}");
    assert!(e.to_string().contains("already listening"));

    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    let e = QmpServer::start(
        &[QmpEndpoint::Unix(file.clone())],
        handle.clone(),
        vmm.events(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, ServerError::NotASocket(_)), "{e}");

    let e = QmpServer::start(
        &[QmpEndpoint::Tcp("nohost:99".into())],
        handle.clone(),
        vmm.events(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, ServerError::BadTcpAddress { .. }), "{e}");
    let tcp = QmpServer::start(
        &[QmpEndpoint::Tcp("127.0.0.1:0".into())],
        handle.clone(),
        vmm.events(),
    )
    .unwrap();
    let taken = tcp.tcp_addrs()[0].to_string();
    // The unix endpoint bound before the failing TCP one is cleaned up again.
    let other = dir.join("other.sock");
    let e = QmpServer::start(
        &[
            QmpEndpoint::Unix(other.clone()),
            QmpEndpoint::Tcp(taken.clone()),
        ],
        handle.clone(),
        vmm.events(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, ServerError::BindTcp { .. }), "{e}");
    assert!(e.to_string().contains(&taken));
    assert!(!other.exists());

    // Stale socket (its server died without cleaning up) is replaced.
    drop(s1);
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    let s2 = QmpServer::start(&[QmpEndpoint::Unix(sock.clone())], handle, vmm.events()).unwrap();
    let _ = Qmp::unix(&sock).greeted(true);
    s2.shutdown();
    assert!(!sock.exists());
}

#[test]
fn vmm_gone_is_an_error_not_a_hang() {
    let dir = tmpdir("gone");
    let sock = dir.join("q.sock");
    let (handle, inbox) = action_channel().unwrap();
    let bus = api::controller::EventBus::new();
    let server = QmpServer::start(
        &[QmpEndpoint::Unix(sock.clone())],
        handle,
        bus.subscribe().unwrap(),
    )
    .unwrap();
    drop(inbox);
    let mut c = Qmp::unix(&sock).greeted(true);
    let r = c.cmd(&json!({"execute": "stop", "id": 1}));
    assert_eq!(r["error"]["class"], "GenericError");
    assert_eq!(r["error"]["desc"], "the VMM is shutting down");
    alive(&mut c);
    server.shutdown();
}

fn start_in(name: &str, state: VmState) -> (FakeVmm, QmpServer, std::path::PathBuf) {
    let dir = tmpdir(name);
    let sock = dir.join("qmp.sock");
    let (vmm, handle) = FakeVmm::start_in(state);
    let server =
        QmpServer::start(&[QmpEndpoint::Unix(sock.clone())], handle, vmm.events()).unwrap();
    (vmm, server, dir)
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
fn snapshot_to_a_file_over_qmp() {
    let (vmm, _server, dir) = start_in("snapshot", VmState::Running);
    let mut c = Qmp::unix(&dir.join("qmp.sock")).greeted(true);
    let file = dir.join("vm.state");
    let uri = format!("file:{}", file.display());

    assert_eq!(
        c.cmd(&json!({"execute": "query-migrate"})),
        json!({"return": {}})
    );
    let caps = c.cmd(&json!({"execute": "query-migrate-capabilities"}));
    let caps = caps["return"].as_array().unwrap();
    assert_eq!(caps.len(), 22);
    assert!(caps.contains(&json!({"capability": "events", "state": false})));
    let r = c.cmd(
        &json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
        {"capability": "events", "state": true}, {"capability": "zero-blocks", "state": false}]}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let caps = c.cmd(&json!({"execute": "query-migrate-capabilities"}));
    assert!(caps["return"]
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "events", "state": true})));
    assert_eq!(
        hmp(&mut c, "info migrate_capabilities")
            .lines()
            .find(|l| l.starts_with("events:")),
        Some("events: on")
    );

    // Unsupported transports, before anything happens.
    for bad in ["exec:cat", "fd:3", "rdma:h:1", "vsock:3:4"] {
        let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": bad}}));
        assert_eq!(r["error"]["class"], "GenericError");
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("not supported by this VMM"),
            "{r}"
        );
    }
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": "gopher:x"}}));
    assert_eq!(r["error"]["desc"], "unknown migration protocol: gopher:x");
    assert_eq!(vmm.state(), VmState::Running);

    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": uri}, "id": "m"}));
    assert_eq!(r, json!({"return": {}, "id": "m"}));
    assert_eq!(std::fs::read(&file).unwrap(), common::FAKE_STATE);
    c.event("STOP");
    let statuses: Vec<String> = (0..3)
        .map(|_| {
            c.event("MIGRATION")["data"]["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(statuses, ["setup", "active", "completed"]);

    let st = c.cmd(&json!({"execute": "query-status"}));
    assert_eq!(
        st["return"],
        json!({"running": false, "singlestep": false, "status": "postmigrate"})
    );
    let info = c.cmd(&json!({"execute": "query-migrate"}))["return"].clone();
    assert_eq!(info["status"], "completed");
    assert_eq!(info["total-time"], 12);
    assert_eq!(info["downtime"], 11);
    assert_eq!(info["ram"]["transferred"], common::FAKE_STATE.len());
    assert_eq!(info["ram"]["remaining"], 0);
    assert_eq!(info["ram"]["page-size"], 4096);
    assert!(info.get("error-desc").is_none());
    let text = hmp(&mut c, "info migrate");
    assert!(
        text.starts_with(
            "Status: \t\tcompleted\r\nTime (ms): \t\ttotal=12, setup=1, down=11\r\nRAM info:\r\n"
        ),
        "{text:?}"
    );
    assert_eq!(
        hmp(&mut c, "info status"),
        "VM status: paused (postmigrate)\r\n"
    );

    // Paused by the migration: `stop` is a no-op, a second migrate is refused as in QEMU.
    assert_eq!(c.cmd(&json!({"execute": "stop"})), json!({"return": {}}));
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": uri}}));
    assert_eq!(
        r["error"]["desc"],
        "Can't migrate the vm that was paused due to previous migration"
    );
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": uri}}));
    assert_eq!(
        r["error"]["desc"],
        "'-incoming' was not specified on the command line"
    );
    // Also with arguments QEMU would refuse anyway: the run state comes first.
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:0:1"}}));
    assert_eq!(
        r["error"]["desc"],
        "'-incoming' was not specified on the command line"
    );
    assert_eq!(c.cmd(&json!({"execute": "cont"})), json!({"return": {}}));
    c.event("RESUME");
    assert_eq!(vmm.state(), VmState::Running);

    // HMP: a failing write is reported, and query-migrate shows the failure.
    c.events.clear();
    let out = hmp(
        &mut c,
        &format!("migrate -d file:{}", dir.join("no/such/dir").display()),
    );
    assert!(
        out.starts_with("Error: snapshot failed: cannot write"),
        "{out:?}"
    );
    assert_eq!(
        vmm.state(),
        VmState::Running,
        "a failed snapshot changes nothing"
    );
    let info = c.cmd(&json!({"execute": "query-migrate"}))["return"].clone();
    assert_eq!(info["status"], "failed");
    assert!(info["error-desc"]
        .as_str()
        .unwrap()
        .contains("cannot write"));
    assert!(hmp(&mut c, "info migrate").starts_with("Status: \t\tfailed (cannot write"));
    assert_eq!(
        hmp(&mut c, "migrate file:/x,offset=0x10").lines().count(),
        1
    );
    c.event("RESUME");
    assert_eq!(c.event("MIGRATION")["data"]["status"], "setup");
    assert_eq!(hmp(&mut c, "migrate_set_capability events off"), "");
    c.events.clear();
    assert_eq!(hmp(&mut c, &format!("migrate {uri}")), "");
    assert_eq!(vmm.state(), VmState::PostMigrate);
    // The events capability is off now: no MIGRATION event for that one.
    let st = c.cmd(&json!({"execute": "query-status"}));
    assert_eq!(st["return"]["status"], "postmigrate");
    assert!(
        c.events.iter().all(|e| e["event"] != "MIGRATION"),
        "{:?}",
        c.events
    );
}

#[test]
fn restore_into_a_waiting_vmm_over_qmp() {
    let (vmm, _server, dir) = start_in("restore", VmState::Incoming);
    let mut c = Qmp::unix(&dir.join("qmp.sock")).greeted(true);
    let file = dir.join("vm.state");
    std::fs::write(&file, common::FAKE_STATE).unwrap();
    let uri = format!("file:{}", file.display());

    let st = c.cmd(&json!({"execute": "query-status"}));
    assert_eq!(
        st["return"],
        json!({"running": false, "singlestep": false, "status": "inmigrate"})
    );
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": uri}}));
    assert_eq!(
        r["error"]["desc"],
        "Guest is waiting for an incoming migration"
    );
    let r = c.cmd(&json!({"execute": "system_reset"}));
    assert_eq!(r["error"]["desc"], "cannot reset while the VM is incoming");
    // Argument errors, now that the run state is right.
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": "exec:cat"}}));
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("'exec:' migration transport is not supported by this VMM"));
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:[::"}}));
    assert_eq!(r["error"]["desc"], "error parsing IPv6 address '[::'");
    let r = c.cmd(&json!({"execute": "migrate-incoming",
                          "arguments": {"channels": [{"channel-type": "main"}]}}));
    assert_eq!(r["error"]["desc"], "channels are not supported; use 'uri'");
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {}}));
    assert_eq!(
        r["error"]["desc"],
        "need either 'uri' or 'channels' argument"
    );
    // A missing file fails, and the VMM still waits.
    let missing = format!("file:{}", dir.join("missing").display());
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": missing}}));
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("restore failed: cannot read"));
    assert_eq!(vmm.state(), VmState::Incoming);

    let r = c.cmd(&json!({"execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "events", "state": true}]}}));
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd(&json!({"execute": "migrate-incoming",
                          "arguments": {"uri": uri, "exit-on-error": false}, "id": 5}));
    assert_eq!(r, json!({"return": {}, "id": 5}));
    let last = (0..3).map(|_| c.event("MIGRATION")).last().unwrap();
    assert_eq!(last["data"], json!({"status": "completed"}));
    c.event("RESUME");
    assert_eq!(vmm.state(), VmState::Running);
    assert_eq!(
        c.cmd(&json!({"execute": "query-migrate"}))["return"],
        json!({"status": "completed"})
    );
    // Only once, as in QEMU.
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": uri}}));
    assert_eq!(
        r["error"]["desc"],
        "The incoming migration has already been started"
    );
    assert_eq!(
        hmp(&mut c, &format!("migrate_incoming {uri}")),
        "Error: The incoming migration has already been started\r\n"
    );
    let r = c.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:0:4446"}}));
    assert_eq!(
        r["error"]["desc"],
        "The incoming migration has already been started"
    );
}

#[test]
fn live_migration_over_qmp() {
    let (vmm, _server, dir) = start_in("live", VmState::Running);
    let mut c = Qmp::unix(&dir.join("qmp.sock")).greeted(true);
    let r = c.cmd(&json!({"execute": "query-migrate-parameters"}));
    assert_eq!(r["return"]["downtime-limit"], 300);
    assert_eq!(r["return"]["multifd-channels"], 2);
    let r = c.cmd(&json!({"execute": "migrate-set-parameters",
                          "arguments": {"downtime-limit": 120, "max-bandwidth": 0,
                                        "tls-creds": ""}}));
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd(&json!({"execute": "query-migrate-parameters"}));
    assert_eq!(r["return"]["downtime-limit"], 120);
    assert_eq!(r["return"]["max-bandwidth"], 0);
    let r = c.cmd(&json!({"execute": "migrate-set-parameters",
                          "arguments": {"multifd-channels": 8}}));
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("'multifd-channels' is not supported by this VMM"));
    assert_eq!(hmp(&mut c, "migrate_set_parameter max-bandwidth 256"), "");
    assert!(hmp(&mut c, "info migrate_parameters")
        .contains("\r\nmax-bandwidth: 268435456 bytes/second\r\n"));

    let r = c.cmd(&json!({"execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "events", "state": true}]}}));
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4446"}}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(c.event("MIGRATION")["data"]["status"], "setup");
    assert_eq!(c.event("MIGRATION")["data"]["status"], "active");
    let info = c.cmd(&json!({"execute": "query-migrate"}))["return"].clone();
    assert_eq!(info["status"], "active");
    assert_eq!(info["expected-downtime"], 60);
    assert!(info.get("downtime").is_none());
    assert!(hmp(&mut c, "info migrate")
        .starts_with("Status: \t\tactive\r\nTime (ms): \t\ttotal=5, setup=1, exp_down=60\r\n"));
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": "unix:/run/m.sock"}}));
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("There's a migration process in progress"));
    assert_eq!(
        c.cmd(&json!({"execute": "migrate_cancel"})),
        json!({"return": {}})
    );
    assert_eq!(c.event("MIGRATION")["data"]["status"], "cancelling");
    assert_eq!(c.event("MIGRATION")["data"]["status"], "cancelled");
    assert_eq!(
        c.cmd(&json!({"execute": "query-migrate"}))["return"]["status"],
        "cancelled"
    );
    assert_eq!(
        c.cmd(&json!({"execute": "migrate-cancel"})),
        json!({"return": {}})
    );
    assert_eq!(vmm.state(), VmState::Running);
    // HMP's migrate cannot wait under human-monitor-command: QEMU says so and goes on.
    assert_eq!(
        hmp(&mut c, "migrate tcp:127.0.0.1:4446"),
        "terminal does not allow synchronous migration, continuing detached\r\n"
    );
    assert_eq!(hmp(&mut c, "migrate_cancel"), "");
    assert!(vmm.seen.lock().unwrap().contains(&VmmAction::Migrate {
        to: api::MigrationAddress::Tcp {
            host: "127.0.0.1".into(),
            port: 4446
        }
    }));
}
