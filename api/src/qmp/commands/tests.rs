use super::*;
use crate::action::VcpuInfo;
use crate::action::VmEvent;
use crate::config::VmConfig;
use std::time::SystemTime;

fn answer(step: Step) -> Value {
    match step {
        Step::Answer(v) => v,
        other => panic!("unexpected {other:?}"),
    }
}

fn negotiated() -> Monitor {
    let mut m = Monitor::default();
    let r = answer(m.request(json!({"execute": "qmp_capabilities"})));
    assert_eq!(r, json!({"return": {}}));
    assert!(m.gets_events());
    m
}

fn vm(state: VmState) -> Reply {
    Ok(VmmResponse::VmInfo(Box::new(VmInfo {
        state,
        nics: Vec::new(),
        agent: None,
        config: VmConfig::default(),
        vcpus: vec![
            VcpuInfo {
                index: 0,
                thread_id: Some(77),
            },
            VcpuInfo {
                index: 1,
                thread_id: None,
            },
        ],
    })))
}

fn error(v: &Value) -> (&str, &str) {
    (
        v["error"]["class"].as_str().unwrap(),
        v["error"]["desc"].as_str().unwrap(),
    )
}

#[test]
fn negotiation_mode_refuses_other_commands() {
    let mut m = Monitor::default();
    let r = answer(m.request(json!({"execute": "query-status", "id": [1, "x"]})));
    assert_eq!(
        error(&r),
        (
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    assert_eq!(r["id"], json!([1, "x"]));
    let r = answer(m.request(json!({"execute": "no-such"})));
    assert_eq!(error(&r).0, "CommandNotFound");
    assert!(!m.gets_events());
    // No events before negotiation.
    let ev = TimedEvent {
        event: VmEvent::Stop,
        at: SystemTime::now(),
    };
    assert!(m.event(&ev).is_none());
    let m = negotiated();
    assert!(m.event(&ev).is_some());
}

#[test]
fn capabilities_arguments() {
    let mut m = Monitor::default();
    let r =
        answer(m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})));
    assert_eq!(
        error(&r),
        ("GenericError", "Capability 'oob' not available")
    );
    let r =
        answer(m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}})));
    assert_eq!(
        error(&r).1,
        "Parameter 'enable[0]' does not accept value 'x'"
    );
    let r = answer(m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": [1]}})));
    assert_eq!(
        error(&r).1,
        "Invalid parameter type for 'enable[0]', expected: string"
    );
    let r = answer(m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}})));
    assert_eq!(r, json!({"return": {}}));
    let r = answer(m.request(json!({"execute": "qmp_capabilities"})));
    assert_eq!(
        error(&r),
        (
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
}

#[test]
fn request_shape_errors() {
    let mut m = negotiated();
    let cases = [
        (json!([1]), "QMP input must be a JSON object"),
        (
            json!({"execute": 1}),
            "QMP input member 'execute' must be a string",
        ),
        (
            json!({"execute": "stop", "arguments": []}),
            "QMP input member 'arguments' must be an object",
        ),
        (json!({"id": 3}), "QMP input lacks member 'execute'"),
        (
            json!({"execute": "stop", "foo": 1}),
            "QMP input member 'foo' is unexpected",
        ),
        (
            json!({"exec-oob": "stop", "id": 1}),
            "QMP input member 'exec-oob' is unexpected",
        ),
    ];
    for (req, desc) in cases {
        let r = answer(m.request(req.clone()));
        assert_eq!(error(&r), ("GenericError", desc), "{req}");
    }
    let r = answer(m.request(json!({"execute": "frobnicate", "id": "a"})));
    assert_eq!(
        r,
        json!({"error": {"class": "CommandNotFound",
            "desc": "The command frobnicate has not been found"}, "id": "a"})
    );
}

#[test]
fn argument_validation() {
    let mut m = negotiated();
    let cases = [
        (
            json!({"execute": "stop", "arguments": {"now": true}}),
            "Parameter 'now' is unexpected",
        ),
        (
            json!({"execute": "human-monitor-command"}),
            "Parameter 'command-line' is missing",
        ),
        (
            json!({"execute": "human-monitor-command", "arguments": {"command-line": 5}}),
            "Invalid parameter type for 'command-line', expected: string",
        ),
        (
            json!({"execute": "human-monitor-command",
                   "arguments": {"command-line": "info status", "cpu-index": "0"}}),
            "Invalid parameter type for 'cpu-index', expected: integer",
        ),
        (
            json!({"execute": "human-monitor-command",
                   "arguments": {"command-line": "info status", "x": 1}}),
            "Parameter 'x' is unexpected",
        ),
    ];
    for (req, desc) in cases {
        let r = answer(m.request(req.clone()));
        assert_eq!(error(&r), ("GenericError", desc), "{req}");
        assert!(!m.busy());
    }
}

#[test]
fn greeting_and_local_queries() {
    let g = greeting();
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    assert_eq!(g["QMP"]["version"]["package"], "");
    assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
    let mut m = negotiated();
    let r = answer(m.request(json!({"execute": "query-kvm", "id": 7})));
    assert_eq!(
        r,
        json!({"return": {"enabled": true, "present": true}, "id": 7})
    );
    let r = answer(m.request(json!({"execute": "query-name"})));
    assert_eq!(r, json!({"return": {}}));
    let r = answer(m.request(json!({"execute": "query-version"})));
    assert_eq!(r["return"], version_json());
    let r = answer(m.request(json!({"execute": "query-commands"})));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"human-monitor-command"));
    assert_eq!(names.len(), COMMANDS.len());
}

#[test]
fn status_and_cpus_via_the_vmm() {
    let mut m = negotiated();
    assert_eq!(
        m.request(json!({"execute": "query-status", "id": 1})),
        Step::Submit(VmmAction::GetVmInfo)
    );
    assert!(m.busy());
    let r = answer(m.reply(vm(VmState::Paused)));
    assert_eq!(
        r,
        json!({"return": {"running": false, "singlestep": false, "status": "paused"}, "id": 1})
    );
    assert!(!m.busy());
    m.request(json!({"execute": "query-cpus-fast"}));
    let r = answer(m.reply(vm(VmState::Running)));
    assert_eq!(
        r["return"][0],
        json!({"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
               "thread-id": 77, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
               "target": "x86_64"})
    );
    assert_eq!(r["return"][1]["qom-path"], "/machine/unattached/device[1]");
}

#[test]
fn actions_and_their_errors() {
    let mut m = negotiated();
    assert_eq!(
        m.request(json!({"execute": "stop"})),
        Step::Submit(VmmAction::Pause)
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}})
    );
    // stop on a paused VM is a no-op in QEMU.
    m.request(json!({"execute": "stop"}));
    let noop = ActionError::InvalidState {
        action: "pause",
        state: VmState::Paused,
    };
    assert_eq!(answer(m.reply(Err(noop))), json!({"return": {}}));
    m.request(json!({"execute": "system_reset", "id": 2}));
    let r = answer(m.reply(Err(ActionError::Unavailable)));
    assert_eq!(error(&r), ("GenericError", "the VMM is shutting down"));
    assert_eq!(r["id"], 2);
    assert_eq!(
        m.request(json!({"execute": "quit"})),
        Step::Submit(VmmAction::Shutdown)
    );
    assert_eq!(
        m.request(json!({"execute": "query-kvm"})),
        Step::Answer(json!({"return": {"enabled": true, "present": true}})),
        "local answers do not disturb the pending one"
    );
}

#[test]
fn hmp_through_qmp() {
    let mut m = negotiated();
    let hmp = |line: &str| json!({"execute": "human-monitor-command", "arguments": {"command-line": line}});
    let r = answer(m.request(hmp("foo")));
    assert_eq!(r, json!({"return": "unknown command: 'foo'\r\n"}));
    assert_eq!(
        m.request(hmp("info status")),
        Step::Submit(VmmAction::GetVmInfo)
    );
    assert_eq!(
        answer(m.reply(vm(VmState::Running))),
        json!({"return": "VM status: running\r\n"})
    );
    assert_eq!(
        m.request(hmp("info cpus")),
        Step::Submit(VmmAction::GetVmInfo)
    );
    assert_eq!(
        answer(m.reply(vm(VmState::Running))),
        json!({"return": "* CPU #0: thread_id=77\r\n  CPU #1: thread_id=0\r\n"})
    );
    assert_eq!(
        m.request(hmp("system_powerdown")),
        Step::Submit(VmmAction::PowerButton)
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": ""})
    );
    // cpu-index: checked against the VM's vCPUs first.
    let mut req = hmp("info cpus");
    req["arguments"]["cpu-index"] = json!(1);
    assert_eq!(m.request(req), Step::Submit(VmmAction::GetVmInfo));
    assert_eq!(
        answer(m.reply(vm(VmState::Running))),
        json!({"return": "  CPU #0: thread_id=77\r\n* CPU #1: thread_id=0\r\n"})
    );
    let mut req = hmp("stop");
    req["arguments"]["cpu-index"] = json!(5);
    m.request(req);
    let r = answer(m.reply(vm(VmState::Running)));
    assert_eq!(error(&r).1, "Parameter 'cpu-index' expects a CPU number");
    let mut req = hmp("stop");
    req["arguments"]["cpu-index"] = json!(0);
    m.request(req);
    assert_eq!(
        m.reply(vm(VmState::Running)),
        Step::Submit(VmmAction::Pause)
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": ""})
    );
}

fn migration_done() -> Reply {
    use crate::action::{MigrationInfo, MigrationStatus};
    Ok(VmmResponse::Migration(Box::new(MigrationInfo {
        status: MigrationStatus::Completed,
        total_time_ms: Some(10),
        ..MigrationInfo::default()
    })))
}

#[test]
fn migrate_to_a_file() {
    let mut m = negotiated();
    let snap = VmmAction::Snapshot {
        path: "/tmp/vm.state".into(),
    };
    assert_eq!(
        m.request(
            json!({"execute": "migrate", "arguments": {"uri": "file:/tmp/vm.state"}, "id": 1})
        ),
        Step::Submit(snap.clone())
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}, "id": 1})
    );
    // Refusals in QEMU's words.
    m.request(json!({"execute": "migrate", "arguments": {"uri": "file:/tmp/vm.state"}}));
    let r = answer(m.reply(Err(ActionError::InvalidState {
        action: "snapshot",
        state: VmState::PostMigrate,
    })));
    assert_eq!(
        error(&r),
        (
            "GenericError",
            "Can't migrate the vm that was paused due to previous migration"
        )
    );
    m.request(json!({"execute": "migrate", "arguments": {"uri": "file:/x"}}));
    let r = answer(m.reply(Err(ActionError::Failed {
        action: "snapshot",
        reason: "No space left on device".into(),
    })));
    assert_eq!(error(&r).1, "snapshot failed: No space left on device");
    // `detach` is accepted (and ignored).
    assert_eq!(
        m.request(json!({"execute": "migrate", "arguments": {"uri": "file:/tmp/vm.state", "detach": true}})),
        Step::Submit(snap)
    );
}

#[test]
fn migrate_argument_errors_are_answered_at_once() {
    let mut m = negotiated();
    let mig = |a: Value| json!({"execute": "migrate", "arguments": a});
    let cases = [
        (
            mig(json!({"uri": 1})),
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            mig(json!({"uri": "file:/x", "resume": "yes"})),
            "Invalid parameter type for 'resume', expected: boolean",
        ),
        (
            mig(json!({"channels": {}})),
            "Invalid parameter type for 'channels', expected: array",
        ),
        (
            mig(json!({"uri": "file:/x", "blk": true})),
            "Parameter 'blk' is unexpected",
        ),
        (mig(json!({})), "need either 'uri' or 'channels' argument"),
        (
            mig(json!({"channels": []})),
            "channels are not supported; use 'uri'",
        ),
        (
            mig(json!({"uri": "file:/x", "resume": true})),
            "Cannot resume if there is no paused migration",
        ),
        (
            mig(json!({"uri": "ftp://x"})),
            "unknown migration protocol: ftp://x",
        ),
        (
            json!({"execute": "migrate-set-capabilities"}),
            "Parameter 'capabilities' is missing",
        ),
        (
            json!({"execute": "migrate-set-capabilities",
                   "arguments": {"capabilities": [{"capability": "bogus", "state": true}]}}),
            "Parameter 'capability' does not accept value 'bogus'",
        ),
        (
            json!({"execute": "migrate-set-capabilities",
                   "arguments": {"capabilities": [{"capability": "multifd", "state": true}]}}),
            "capability 'multifd' is not supported by this VMM",
        ),
        (
            json!({"execute": "query-migrate", "arguments": {"x": 1}}),
            "Parameter 'x' is unexpected",
        ),
    ];
    for (req, desc) in cases {
        let r = answer(m.request(req.clone()));
        assert_eq!(error(&r), ("GenericError", desc), "{req}");
        assert!(!m.busy());
    }
    let r = answer(m.request(mig(json!({"uri": "exec:nc host 4444"}))));
    assert!(error(&r)
        .1
        .contains("'exec:' migration transport is not supported by this VMM"));
    let r = answer(m.request(mig(json!({"uri": "tcp:host"}))));
    assert_eq!(error(&r), ("GenericError", "error parsing address 'host'"));
}

#[test]
fn migrate_incoming_checks_the_run_state_first() {
    let mut m = negotiated();
    let restore = VmmAction::Restore {
        path: "/tmp/vm.state".into(),
    };
    let inc = |a: Value| json!({"execute": "migrate-incoming", "arguments": a});
    assert_eq!(
        m.request(inc(
            json!({"uri": "file:/tmp/vm.state", "exit-on-error": false})
        )),
        Step::Submit(restore.clone())
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}})
    );
    m.request(inc(json!({"uri": "file:/tmp/vm.state"})));
    let refused = || {
        Err(ActionError::InvalidState {
            action: "restore",
            state: VmState::Running,
        })
    };
    let r = answer(m.reply(refused()));
    assert_eq!(
        error(&r).1,
        "'-incoming' was not specified on the command line"
    );
    m.set_restore_started(true);
    m.request(inc(json!({"uri": "file:/tmp/vm.state"})));
    let r = answer(m.reply(refused()));
    assert_eq!(
        error(&r).1,
        "The incoming migration has already been started"
    );
    m.set_restore_started(false);
    // Bad arguments: the state decides which error QEMU gives.
    assert_eq!(
        m.request(inc(json!({"uri": "exec:cat"}))),
        Step::Submit(VmmAction::GetVmInfo)
    );
    let r = answer(m.reply(vm(VmState::Running)));
    assert_eq!(
        error(&r).1,
        "'-incoming' was not specified on the command line"
    );
    m.request(inc(json!({"uri": "exec:cat"})));
    let r = answer(m.reply(vm(VmState::Incoming)));
    assert!(error(&r)
        .1
        .contains("'exec:' migration transport is not supported by this VMM"));
    m.request(inc(json!({})));
    let r = answer(m.reply(vm(VmState::Incoming)));
    assert_eq!(error(&r).1, "need either 'uri' or 'channels' argument");
    // Type errors come before everything.
    let r = answer(m.request(inc(json!({"uri": "file:/x", "exit-on-error": 1}))));
    assert_eq!(
        error(&r).1,
        "Invalid parameter type for 'exit-on-error', expected: boolean"
    );
}

#[test]
fn query_migrate_and_capabilities() {
    use crate::action::{MigrationCapability, MigrationCapabilityState};
    let mut m = negotiated();
    assert_eq!(
        m.request(json!({"execute": "query-migrate"})),
        Step::Submit(VmmAction::QueryMigrate)
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Migration(Box::default())))),
        json!({"return": {}})
    );
    m.request(json!({"execute": "query-migrate"}));
    assert_eq!(
        answer(m.reply(migration_done())),
        json!({"return": {"status": "completed", "total-time": 10}})
    );
    let events_on = MigrationCapabilityState {
        capability: MigrationCapability::Events,
        state: true,
    };
    assert_eq!(
        m.request(
            json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "xbzrle", "state": false}]}})
        ),
        Step::Submit(VmmAction::SetMigrationCapabilities(vec![events_on]))
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}})
    );
    assert_eq!(
        m.request(json!({"execute": "query-migrate-capabilities"})),
        Step::Submit(VmmAction::GetMigrationCapabilities)
    );
    let r = answer(m.reply(Ok(VmmResponse::MigrationCapabilities(vec![events_on]))));
    let list = r["return"].as_array().unwrap();
    assert_eq!(list.len(), 22);
    assert!(list.contains(&json!({"capability": "events", "state": true})));
    assert!(list.contains(&json!({"capability": "postcopy-ram", "state": false})));
    // A wrong answer is an error, not a panic.
    m.request(json!({"execute": "query-migrate"}));
    assert!(answer(m.reply(Ok(VmmResponse::Done)))["error"].is_object());
}

#[test]
fn post_migrate_and_incoming_run_states() {
    let mut m = negotiated();
    m.request(json!({"execute": "query-status"}));
    assert_eq!(
        answer(m.reply(vm(VmState::PostMigrate)))["return"],
        json!({"running": false, "singlestep": false, "status": "postmigrate"})
    );
    m.request(json!({"execute": "query-status"}));
    assert_eq!(
        answer(m.reply(vm(VmState::Incoming)))["return"]["status"],
        "inmigrate"
    );
    // `stop` after a migration is a no-op success, as in QEMU.
    m.request(json!({"execute": "stop"}));
    let r = answer(m.reply(Err(ActionError::InvalidState {
        action: "pause",
        state: VmState::PostMigrate,
    })));
    assert_eq!(r, json!({"return": {}}));
}

#[test]
fn hmp_migration_commands_through_qmp() {
    let mut m = negotiated();
    let hmp = |line: &str| json!({"execute": "human-monitor-command", "arguments": {"command-line": line}});
    assert_eq!(
        m.request(hmp("migrate -d file:/tmp/s")),
        Step::Submit(VmmAction::Snapshot {
            path: "/tmp/s".into()
        })
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": ""})
    );
    m.request(hmp("migrate file:/tmp/s"));
    let r = answer(m.reply(Err(ActionError::InvalidState {
        action: "snapshot",
        state: VmState::Incoming,
    })));
    assert_eq!(
        r,
        json!({"return": "Error: Guest is waiting for an incoming migration\r\n"})
    );
    assert_eq!(
        m.request(hmp("info migrate")),
        Step::Submit(VmmAction::QueryMigrate)
    );
    assert_eq!(
        answer(m.reply(migration_done())),
        json!({"return": "Status: \t\tcompleted\r\nTime (ms): \t\ttotal=10\r\n"})
    );
    // With cpu-index: the CPU is checked first, then the query runs.
    let mut req = hmp("info migrate");
    req["arguments"]["cpu-index"] = json!(1);
    assert_eq!(m.request(req), Step::Submit(VmmAction::GetVmInfo));
    assert_eq!(
        m.reply(vm(VmState::Running)),
        Step::Submit(VmmAction::QueryMigrate)
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Migration(Box::default())))),
        json!({"return": ""})
    );
    assert_eq!(
        m.request(hmp("info migrate_capabilities")),
        Step::Submit(VmmAction::GetMigrationCapabilities)
    );
    let r = answer(m.reply(Ok(VmmResponse::MigrationCapabilities(vec![]))));
    assert!(r["return"].as_str().unwrap().contains("events: off\r\n"));
}

#[test]
fn blockstats_in_qemus_shape() {
    use crate::metrics::{BlockDeviceStats, DiskStats};
    let disks = || {
        Ok(VmmResponse::BlockStats(vec![DiskStats {
            id: "disk0".into(),
            stats: BlockDeviceStats {
                rd_bytes: 4096,
                wr_operations: 3,
                account_invalid: true,
                account_failed: true,
                ..Default::default()
            },
        }]))
    };
    let mut m = negotiated();
    let req = json!({"execute": "query-blockstats", "arguments": {"query-nodes": false}});
    assert_eq!(m.request(req), Step::Submit(VmmAction::QueryBlockStats));
    let r = answer(m.reply(disks()));
    let d = &r["return"][0];
    assert_eq!(d["device"], "disk0");
    assert_eq!(d["qdev"], "/machine/peripheral/disk0/virtio-backend");
    assert_eq!(
        (
            d["stats"]["rd_bytes"].as_u64(),
            d["stats"]["wr_operations"].as_u64()
        ),
        (Some(4096), Some(3))
    );
    assert_eq!(d["stats"]["account_failed"], true);
    // Before the first request QEMU leaves idle_time_ns out.
    assert!(d["stats"].get("idle_time_ns").is_none());
    let bad =
        answer(m.request(json!({"execute": "query-blockstats", "arguments": {"query-nodes": 1}})));
    assert_eq!(error(&bad).0, "GenericError");

    let hmp = json!({"execute": "human-monitor-command", "arguments": {"command-line": "info blockstats"}});
    assert_eq!(m.request(hmp), Step::Submit(VmmAction::QueryBlockStats));
    assert_eq!(
        answer(m.reply(disks())),
        json!({"return": "disk0: rd_bytes=4096 wr_bytes=0 rd_operations=0 wr_operations=3 \
                flush_operations=0 wr_total_time_ns=0 rd_total_time_ns=0 flush_total_time_ns=0 \
                rd_merged=0 wr_merged=0 idle_time_ns=0\r\n"})
    );
}

#[test]
fn balloon_and_its_qom_properties_as_libvirt_uses_them() {
    use crate::balloon::{BalloonCounters, BalloonInfo};
    let info = || {
        Ok(VmmResponse::Balloon(Box::new(BalloonInfo {
            memory_bytes: 512 << 20,
            target_bytes: 256 << 20,
            actual_bytes: 300 << 20,
            stats_interval_s: 2,
            stats: [("stat-free-memory".to_string(), 1234u64)].into(),
            last_update: 99,
            counters: BalloonCounters::default(),
        })))
    };
    let mut m = negotiated();
    let req = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    assert_eq!(
        m.request(req("balloon", json!({"value": 256 << 20}))),
        Step::Submit(VmmAction::SetBalloon {
            target: 256 << 20,
            clamp: true
        })
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}})
    );
    let r = answer(m.request(req("balloon", json!({"value": 0}))));
    assert_eq!(
        error(&r),
        ("GenericError", "Parameter 'value' expects a size")
    );
    // No balloon: QEMU's class and text.
    m.request(json!({"execute": "query-balloon"}));
    let r = answer(m.reply(Err(ActionError::NoBalloon)));
    assert_eq!(
        error(&r),
        ("DeviceNotActive", "No balloon device has been activated")
    );
    m.request(json!({"execute": "query-balloon"}));
    assert_eq!(
        answer(m.reply(info())),
        json!({"return": {"actual": 300 << 20}})
    );

    // libvirt finds the balloon, checks for the polling property, sets it, reads the stats.
    m.request(req("qom-list", json!({"path": "/machine/peripheral"})));
    let r = answer(m.reply(info()));
    assert_eq!(
        r["return"][0],
        json!({"name": "balloon0", "type": "child<virtio-balloon-pci>"})
    );
    m.request(req("qom-list", json!({"path": "/machine/peripheral"})));
    assert_eq!(
        answer(m.reply(Err(ActionError::NoBalloon))),
        json!({"return": []})
    );
    m.request(req(
        "qom-list",
        json!({"path": "/machine/peripheral/balloon0"}),
    ));
    let r = answer(m.reply(info()));
    assert!(r["return"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "guest-stats-polling-interval"));
    assert_eq!(
        m.request(req(
            "qom-set",
            json!({"path": "/machine/peripheral/balloon0",
                   "property": "guest-stats-polling-interval", "value": 5})
        )),
        Step::Submit(VmmAction::SetBalloonStatsInterval(5))
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}})
    );
    let r = answer(m.request(req(
        "qom-set",
        json!({"path": "/machine/peripheral/balloon0",
               "property": "guest-stats-polling-interval", "value": -1}),
    )));
    assert_eq!(error(&r).1, "timer value must be greater than zero");
    m.request(req(
        "qom-get",
        json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats"}),
    ));
    let r = answer(m.reply(info()));
    assert_eq!(r["return"]["last-update"], 99);
    assert_eq!(r["return"]["stats"]["stat-free-memory"], 1234);
    assert_eq!(r["return"]["stats"]["stat-swap-in"], u64::MAX);
    let r = answer(m.request(req("qom-get", json!({"path": "/nowhere", "property": "x"}))));
    assert_eq!(error(&r).0, "DeviceNotFound");

    // HMP.
    let hmp = |line: &str| req("human-monitor-command", json!({"command-line": line}));
    assert_eq!(
        m.request(hmp("balloon 256")),
        Step::Submit(VmmAction::SetBalloon {
            target: 256 << 20,
            clamp: true
        })
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": ""})
    );
    m.request(hmp("balloon 1G"));
    m.reply(Err(ActionError::NoBalloon));
    m.request(hmp("info balloon"));
    assert_eq!(
        answer(m.reply(info())),
        json!({"return": "balloon: actual=300\r\n"})
    );
}
