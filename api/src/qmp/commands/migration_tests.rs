//! QMP's live-migration commands: `migrate` and `migrate-incoming` with `tcp:`/`unix:`,
//! `migrate_cancel`, the migration parameters, and `query-migrate` during a live migration.

use super::*;
use crate::action::{
    MigrationAddress, MigrationInfo, MigrationParameters, MigrationParametersUpdate,
    MigrationStatus, RamStats, Refusal,
};

fn answer(step: Step) -> Value {
    match step {
        Step::Answer(v) => v,
        other => panic!("unexpected {other:?}"),
    }
}

fn negotiated() -> Monitor {
    let mut m = Monitor::default();
    answer(m.request(json!({"execute": "qmp_capabilities"})));
    m
}

fn desc(v: &Value) -> &str {
    v["error"]["desc"].as_str().unwrap()
}

fn tcp(host: &str, port: u16) -> MigrationAddress {
    MigrationAddress::Tcp {
        host: host.into(),
        port,
    }
}

#[test]
fn the_new_commands_are_listed() {
    let mut m = negotiated();
    let r = answer(m.request(json!({"execute": "query-commands"})));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for name in [
        "migrate",
        "migrate-incoming",
        "migrate_cancel",
        "migrate-cancel",
        "migrate-set-parameters",
        "query-migrate-parameters",
    ] {
        assert!(names.contains(&name), "{name}");
    }
}

#[test]
fn migrate_to_tcp_and_unix() {
    let mut m = negotiated();
    let live = VmmAction::Migrate {
        to: tcp("10.0.0.2", 4446),
    };
    assert_eq!(
        m.request(
            json!({"execute": "migrate", "arguments": {"uri": "tcp:10.0.0.2:4446"}, "id": 7})
        ),
        Step::Submit(live.clone())
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}, "id": 7})
    );
    assert_eq!(
        m.request(json!({"execute": "migrate",
                         "arguments": {"uri": "unix:/run/m.sock", "detach": true}})),
        Step::Submit(VmmAction::Migrate {
            to: MigrationAddress::Unix("/run/m.sock".into())
        })
    );
    // Refusals in QEMU's words: the run state, or the VMM's own (QEMU's) text.
    let r = answer(m.reply(Err(ActionError::InvalidState {
        action: "migrate",
        state: VmState::PostMigrate,
    })));
    assert_eq!(
        desc(&r),
        "Can't migrate the vm that was paused due to previous migration"
    );
    m.request(json!({"execute": "migrate", "arguments": {"uri": "tcp:[::1]:4446"}}));
    let r = answer(m.reply(Err(ActionError::Refused {
        action: "migrate",
        reason: "There's a migration process in progress".into(),
        kind: Refusal::NotNow,
    })));
    assert_eq!(desc(&r), "There's a migration process in progress");
    assert_eq!(r["error"]["class"], "GenericError");
    // Bad addresses and transports are answered at once.
    for (uri, want) in [
        ("tcp:h:p", "error parsing port in address 'h:p'"),
        ("tcp:[::1", "error parsing IPv6 address '[::1'"),
        ("unix:", "unix: needs a socket path"),
    ] {
        let r = answer(m.request(json!({"execute": "migrate", "arguments": {"uri": uri}})));
        assert_eq!(desc(&r), want, "{uri}");
    }
    for uri in ["exec:cat", "fd:3", "rdma:h:1", "vsock:3:4"] {
        let r = answer(m.request(json!({"execute": "migrate", "arguments": {"uri": uri}})));
        assert!(desc(&r).contains("not supported by this VMM"), "{uri}");
    }
    assert!(!m.busy());
}

#[test]
fn migrate_incoming_over_tcp() {
    let mut m = negotiated();
    let inc = VmmAction::MigrateIncoming {
        from: tcp("0", 4446),
    };
    assert_eq!(
        m.request(json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:0:4446"}})),
        Step::Submit(inc.clone())
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}})
    );
    let refused = || {
        Err(ActionError::InvalidState {
            action: "migrate-incoming",
            state: VmState::Running,
        })
    };
    m.request(json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:0:4446"}}));
    assert_eq!(
        desc(&answer(m.reply(refused()))),
        "'-incoming' was not specified on the command line"
    );
    m.set_restore_started(true);
    m.request(json!({"execute": "migrate-incoming", "arguments": {"uri": "unix:/m"}}));
    assert_eq!(
        desc(&answer(m.reply(refused()))),
        "The incoming migration has already been started"
    );
}

#[test]
fn both_cancel_spellings() {
    let mut m = negotiated();
    for name in ["migrate_cancel", "migrate-cancel"] {
        assert_eq!(
            m.request(json!({"execute": name})),
            Step::Submit(VmmAction::MigrateCancel)
        );
        assert_eq!(
            answer(m.reply(Ok(VmmResponse::Done))),
            json!({"return": {}})
        );
        let r = answer(m.request(json!({"execute": name, "arguments": {"now": true}})));
        assert_eq!(desc(&r), "Parameter 'now' is unexpected");
    }
}

#[test]
fn set_parameters_in_qemus_words() {
    let mut m = negotiated();
    let set = |a: Value| json!({"execute": "migrate-set-parameters", "arguments": a});
    assert_eq!(
        m.request(set(
            json!({"downtime-limit": 100, "max-bandwidth": 1_000_000_000u64})
        )),
        Step::Submit(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate {
                downtime_limit_ms: Some(100),
                max_bandwidth: Some(1_000_000_000),
            }
        ))
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": {}})
    );
    // libvirt's reset of TLS on a QEMU without it.
    assert_eq!(
        m.request(set(json!({"tls-creds": "", "tls-hostname": ""}))),
        Step::Submit(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate::default()
        ))
    );
    answer(m.reply(Ok(VmmResponse::Done)));
    let cases = [
        (
            json!({"downtime-limit": "1s"}),
            "Parameter 'downtime-limit' expects uint64",
        ),
        (
            json!({"max-bandwidth": true}),
            "Parameter 'max-bandwidth' expects uint64",
        ),
        (
            json!({"downtime-limit": 2_000_001}),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
        ),
        (
            json!({"max-cpu-throttle": 300}),
            "Parameter 'max-cpu-throttle' expects uint8",
        ),
        (
            json!({"multifd-compression": "lz4"}),
            "Parameter 'multifd-compression' does not accept value 'lz4'",
        ),
        (json!({"bogus": 1}), "Parameter 'bogus' is unexpected"),
        // Type errors come first, in member order, then unexpected members.
        (
            json!({"bogus": 1, "direct-io": 1}),
            "Invalid parameter type for 'direct-io', expected: boolean",
        ),
        (
            json!({"xbzrle-cache-size": 1024}),
            "migration parameter 'xbzrle-cache-size' is not supported by this VMM (it \
             implements downtime-limit and max-bandwidth)",
        ),
    ];
    for (args, want) in cases {
        let r = answer(m.request(set(args.clone())));
        assert_eq!(
            (r["error"]["class"].as_str(), desc(&r)),
            (Some("GenericError"), want),
            "{args}"
        );
        assert!(!m.busy());
    }
}

#[test]
fn query_parameters_in_qemus_shape() {
    let mut m = negotiated();
    assert_eq!(
        m.request(json!({"execute": "query-migrate-parameters"})),
        Step::Submit(VmmAction::GetMigrationParameters)
    );
    let r = answer(
        m.reply(Ok(VmmResponse::MigrationParameters(MigrationParameters {
            downtime_limit_ms: 50,
            max_bandwidth: 0,
        }))),
    );
    let p = &r["return"];
    assert_eq!(p["downtime-limit"], 50);
    assert_eq!(p["max-bandwidth"], 0);
    assert_eq!(p["multifd-channels"], 2);
    assert_eq!(p["tls-creds"], "");
    assert_eq!(p.as_object().unwrap().len(), 28);
    m.request(json!({"execute": "query-migrate-parameters"}));
    assert!(answer(m.reply(Ok(VmmResponse::Done)))["error"].is_object());
}

#[test]
fn query_migrate_while_live() {
    let mut m = negotiated();
    m.request(json!({"execute": "query-migrate"}));
    let info = MigrationInfo {
        status: MigrationStatus::Active,
        total_time_ms: Some(900),
        setup_time_ms: Some(3),
        expected_downtime_ms: Some(12),
        ram: Some(RamStats {
            transferred: 4096,
            dirty_pages_rate: 10,
            dirty_sync_count: 2,
            ..RamStats::default()
        }),
        ..MigrationInfo::default()
    };
    let r = answer(m.reply(Ok(VmmResponse::Migration(Box::new(info)))));
    assert_eq!(r["return"]["expected-downtime"], 12);
    assert_eq!(r["return"]["ram"]["dirty-sync-count"], 2);
    assert_eq!(r["return"]["ram"]["precopy-bytes"], 4096);
}

#[test]
fn hmp_live_migration_through_qmp() {
    let mut m = negotiated();
    let hmp = |line: &str| json!({"execute": "human-monitor-command", "arguments": {"command-line": line}});
    let live = VmmAction::Migrate { to: tcp("h", 1) };
    assert_eq!(
        m.request(hmp("migrate tcp:h:1")),
        Step::Submit(live.clone())
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": "terminal does not allow synchronous migration, continuing detached\r\n"})
    );
    assert_eq!(m.request(hmp("migrate -d tcp:h:1")), Step::Submit(live));
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": ""})
    );
    // With cpu-index: the CPU is checked first, then the migration starts.
    let mut req = hmp("migrate tcp:h:1");
    req["arguments"]["cpu-index"] = json!(0);
    assert_eq!(m.request(req), Step::Submit(VmmAction::GetVmInfo));
    let vm = VmInfo {
        state: VmState::Running,
        config: crate::config::VmConfig::default(),
        vcpus: vec![crate::action::VcpuInfo {
            index: 0,
            thread_id: None,
        }],
        nics: Vec::new(),
        agent: None,
    };
    assert!(matches!(
        m.reply(Ok(VmmResponse::VmInfo(Box::new(vm)))),
        Step::Submit(VmmAction::Migrate { .. })
    ));
    assert!(answer(m.reply(Ok(VmmResponse::Done)))["return"]
        .as_str()
        .unwrap()
        .contains("continuing detached"));
    assert_eq!(
        m.request(hmp("migrate_cancel")),
        Step::Submit(VmmAction::MigrateCancel)
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": ""})
    );
    assert_eq!(
        m.request(hmp("info migrate_parameters")),
        Step::Submit(VmmAction::GetMigrationParameters)
    );
    let r = answer(m.reply(Ok(VmmResponse::MigrationParameters(
        MigrationParameters::default(),
    ))));
    assert!(r["return"]
        .as_str()
        .unwrap()
        .contains("\r\ndowntime-limit: 300 ms\r\n"));
    assert_eq!(
        m.request(hmp("migrate_set_parameter downtime-limit 50")),
        Step::Submit(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate {
                downtime_limit_ms: Some(50),
                max_bandwidth: None,
            }
        ))
    );
    assert_eq!(
        answer(m.reply(Ok(VmmResponse::Done))),
        json!({"return": ""})
    );
}
