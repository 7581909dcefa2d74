//! URIs, capability lists, query-migrate's shape and refusals, against QEMU's texts.
use super::*;

fn desc(r: Result<impl std::fmt::Debug, CommandError>) -> String {
    r.unwrap_err().desc
}

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn file(p: &str) -> Target {
    Target::File(PathBuf::from(p))
}

fn tcp(host: &str, port: u16) -> Target {
    Target::Live(MigrationAddress::Tcp {
        host: host.into(),
        port,
    })
}

#[test]
fn file_uris() {
    assert_eq!(parse_uri("file:/tmp/a b").unwrap(), file("/tmp/a b"));
    assert_eq!(parse_uri("file:rel/x").unwrap(), file("rel/x"));
    assert_eq!(parse_uri("file:/tmp/x,offset=0").unwrap(), file("/tmp/x"));
    assert_eq!(parse_uri("file:/tmp/x,offset=0x0").unwrap(), file("/tmp/x"));
    assert!(desc(parse_uri("file:/tmp/x,offset=4096")).contains("offset is not supported"));
    assert!(desc(parse_uri("file:/tmp/x,offset=4k")).contains("offset is not supported"));
    assert_eq!(
        desc(parse_uri("file:/tmp/x,offset=abc")),
        "file URI has bad offset abc: Invalid argument"
    );
    assert_eq!(
        desc(parse_uri("file:")),
        "Unable to open : No such file or directory"
    );
}

#[test]
fn live_uris() {
    assert_eq!(parse_uri("tcp:0:4446").unwrap(), tcp("0", 4446));
    assert_eq!(
        parse_uri("tcp:10.0.0.2:49152").unwrap(),
        tcp("10.0.0.2", 49152)
    );
    assert_eq!(parse_uri("tcp:[::1]:4446").unwrap(), tcp("::1", 4446));
    assert_eq!(parse_uri("tcp::4446").unwrap(), tcp("", 4446));
    assert_eq!(
        parse_uri("unix:/run/mig.sock").unwrap(),
        Target::Live(MigrationAddress::Unix("/run/mig.sock".into()))
    );
    // A bad address gets the parser's text.
    for (uri, want) in [
        ("tcp:host", "error parsing address 'host'"),
        ("tcp:h:port", "error parsing port in address 'h:port'"),
        ("tcp:[::1]", "error parsing IPv6 address '[::1]'"),
        ("tcp:::1:4", "error parsing address '::1:4'"),
        ("unix:", "unix: needs a socket path"),
    ] {
        assert_eq!(desc(parse_uri(uri)), want, "{uri}");
    }
}

#[test]
fn other_schemes() {
    for uri in [
        "exec:cat > /tmp/x",
        "fd:3",
        "rdma:1.2.3.4:5",
        "vsock:3:1234",
    ] {
        let d = desc(parse_uri(uri));
        assert!(d.contains("not supported by this VMM"), "{uri}: {d}");
        assert!(
            d.contains(&format!("'{}'", &uri[..uri.find(':').unwrap() + 1])),
            "{d}"
        );
        assert!(d.contains("'tcp:HOST:PORT' or 'unix:PATH'"), "{d}");
    }
    assert_eq!(
        desc(parse_uri("http://x")),
        "unknown migration protocol: http://x"
    );
    assert_eq!(desc(parse_uri("")), "unknown migration protocol: ");
    assert_eq!(
        desc(parse_uri("tcpx:1")),
        "unknown migration protocol: tcpx:1"
    );
}

#[test]
fn migrate_arguments_in_qemu_order() {
    assert_eq!(
        migrate_action(&args(json!({"uri": "file:/s", "detach": true}))).unwrap(),
        VmmAction::Snapshot { path: "/s".into() }
    );
    assert_eq!(
        migrate_action(&args(json!({"uri": "unix:/m.sock", "detach": true}))).unwrap(),
        VmmAction::Migrate {
            to: MigrationAddress::Unix("/m.sock".into())
        }
    );
    assert_eq!(
        desc(migrate_action(&args(json!({})))),
        "need either 'uri' or 'channels' argument"
    );
    assert_eq!(
        desc(migrate_action(&args(
            json!({"uri": "file:/s", "channels": []})
        ))),
        "need either 'uri' or 'channels' argument"
    );
    assert_eq!(
        desc(migrate_action(&args(json!({"channels": []})))),
        "channels are not supported; use 'uri'"
    );
    // The URI is parsed before `resume` is looked at.
    assert_eq!(
        desc(migrate_action(&args(json!({"uri": "x:", "resume": true})))),
        "unknown migration protocol: x:"
    );
    for uri in ["file:/s", "tcp:h:1"] {
        assert_eq!(
            desc(migrate_action(&args(json!({"uri": uri, "resume": true})))),
            "Cannot resume if there is no paused migration"
        );
    }
    assert!(migrate_action(&args(json!({"uri": "file:/s", "resume": false}))).is_ok());
    assert_eq!(
        incoming_action(&args(json!({"uri": "file:/s", "exit-on-error": false}))).unwrap(),
        VmmAction::Restore { path: "/s".into() }
    );
    assert_eq!(
        incoming_action(&args(json!({"uri": "tcp:0:4446"}))).unwrap(),
        VmmAction::MigrateIncoming {
            from: MigrationAddress::Tcp {
                host: "0".into(),
                port: 4446
            }
        }
    );
}

#[test]
fn capability_lists() {
    let check = |v: Value| check_capability_list("capabilities", &v).map_err(|e| e.desc);
    assert_eq!(check(json!([])), Ok(()));
    assert_eq!(
        check(json!([{"capability": "events", "state": true},
                     {"capability": "xbzrle", "state": false}])),
        Ok(())
    );
    let cases = [
        (
            json!({}),
            "Invalid parameter type for 'capabilities', expected: array",
        ),
        (
            json!([1]),
            "Invalid parameter type for 'capabilities[0]', expected: object",
        ),
        (
            json!([{"state": true}]),
            "Parameter 'capabilities[0].capability' is missing",
        ),
        (
            json!([{"capability": 1, "state": true}]),
            "Invalid parameter type for 'capabilities[0].capability', expected: string",
        ),
        (
            json!([{"capability": "events", "state": true}, {"capability": "xyz"}]),
            "Parameter 'capability' does not accept value 'xyz'",
        ),
        (
            json!([{"capability": "events"}]),
            "Parameter 'capabilities[0].state' is missing",
        ),
        (
            json!([{"capability": "events", "state": "on"}]),
            "Invalid parameter type for 'capabilities[0].state', expected: boolean",
        ),
        (
            json!([{"capability": "events", "state": true, "x": 1}]),
            "Parameter 'capabilities[0].x' is unexpected",
        ),
    ];
    for (v, want) in cases {
        assert_eq!(check(v.clone()), Err(want.to_string()), "{v}");
    }
    // "compress" was removed in QEMU 9.1.
    assert!(check(json!([{"capability": "compress", "state": false}])).is_err());
}

#[test]
fn unsupported_capabilities_may_be_switched_off_only() {
    let set = |v: Value| set_capabilities_action(&args(json!({ "capabilities": v })));
    assert_eq!(
        set(json!([{"capability": "xbzrle", "state": false},
                   {"capability": "events", "state": true},
                   {"capability": "events", "state": false}]))
        .unwrap(),
        VmmAction::SetMigrationCapabilities(vec![
            MigrationCapabilityState {
                capability: MigrationCapability::Events,
                state: true
            },
            MigrationCapabilityState {
                capability: MigrationCapability::Events,
                state: false
            },
        ])
    );
    assert_eq!(
        desc(set(json!([{"capability": "events", "state": true},
                        {"capability": "postcopy-ram", "state": true}]))),
        "capability 'postcopy-ram' is not supported by this VMM"
    );
}

#[test]
fn capabilities_are_all_listed_in_qemu_order() {
    let ours = [MigrationCapabilityState {
        capability: MigrationCapability::Events,
        state: true,
    }];
    let v = capabilities_json(&ours);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), QEMU_CAPABILITIES.len());
    assert_eq!(list[0], json!({"capability": "xbzrle", "state": false}));
    assert_eq!(list[4], json!({"capability": "events", "state": true}));
    assert_eq!(
        list[21],
        json!({"capability": "mapped-ram", "state": false})
    );
    assert!(capability_states(&[]).iter().all(|(_, s)| !s));
}

#[test]
fn query_migrate_shapes() {
    assert_eq!(migration_json(&MigrationInfo::default()), json!({}));
    let failed = MigrationInfo {
        status: MigrationStatus::Failed,
        error_desc: Some("disk full".into()),
        ..MigrationInfo::default()
    };
    assert_eq!(
        migration_json(&failed),
        json!({"status": "failed", "error-desc": "disk full"})
    );
    for (status, name) in [
        (MigrationStatus::Cancelling, "cancelling"),
        (MigrationStatus::Cancelled, "cancelled"),
    ] {
        let info = MigrationInfo {
            status,
            ..MigrationInfo::default()
        };
        assert_eq!(migration_json(&info), json!({ "status": name }));
    }
    // A snapshot: the VM is stopped first, every byte is downtime.
    let done = MigrationInfo {
        status: MigrationStatus::Completed,
        total_time_ms: Some(120),
        setup_time_ms: Some(2),
        downtime_ms: Some(118),
        ram: Some(RamStats {
            transferred: 1 << 20,
            remaining: 0,
            total: 256 << 20,
            duplicate: 65_000,
            normal: 236,
            normal_bytes: 236 * 4096,
            mbps: 71.5,
            pages_per_second: 2000,
            dirty_pages_rate: 0,
            dirty_sync_count: 1,
            downtime_bytes: 1 << 20,
        }),
        ..MigrationInfo::default()
    };
    let v = migration_json(&done);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["total-time"], 120);
    assert_eq!(v["setup-time"], 2);
    assert_eq!(v["downtime"], 118);
    assert!(v.get("expected-downtime").is_none());
    assert!(v.get("error-desc").is_none());
    let ram = &v["ram"];
    assert_eq!(ram["normal-bytes"], 236 * 4096);
    assert_eq!(ram["mbps"], 71.5);
    assert_eq!(ram["dirty-sync-count"], 1);
    assert_eq!(ram["dirty-pages-rate"], 0);
    assert_eq!(ram["page-size"], 4096);
    assert_eq!(ram["downtime-bytes"], 1 << 20);
    assert_eq!(ram["precopy-bytes"], 0);
    assert_eq!(
        ram.as_object().unwrap().len(),
        17,
        "every MigrationStats member"
    );
    // A live migration in its third round.
    let active = MigrationInfo {
        status: MigrationStatus::Active,
        total_time_ms: Some(2500),
        setup_time_ms: Some(4),
        expected_downtime_ms: Some(35),
        ram: Some(RamStats {
            transferred: 300 << 20,
            remaining: 8 << 20,
            total: 1 << 30,
            dirty_pages_rate: 1200,
            dirty_sync_count: 3,
            ..RamStats::default()
        }),
        ..MigrationInfo::default()
    };
    let v = migration_json(&active);
    assert_eq!(v["status"], "active");
    assert_eq!(v["expected-downtime"], 35);
    assert!(v.get("downtime").is_none());
    assert_eq!(v["ram"]["dirty-pages-rate"], 1200);
    assert_eq!(v["ram"]["dirty-sync-count"], 3);
    assert_eq!(v["ram"]["precopy-bytes"], 300 << 20);
    assert_eq!(v["ram"]["downtime-bytes"], 0);
}

#[test]
fn refusals_in_qemu_words() {
    let snap = VmmAction::Snapshot { path: "/s".into() };
    let rest = VmmAction::Restore { path: "/s".into() };
    let addr = MigrationAddress::Tcp {
        host: "h".into(),
        port: 1,
    };
    let live = VmmAction::Migrate { to: addr.clone() };
    let incoming = VmmAction::MigrateIncoming { from: addr };
    let refused = |state| ActionError::InvalidState { action: "x", state };
    for out in [&snap, &live] {
        assert_eq!(
            action_error_text(out, &refused(VmState::Incoming), false),
            "Guest is waiting for an incoming migration"
        );
        assert_eq!(
            action_error_text(out, &refused(VmState::PostMigrate), false),
            "Can't migrate the vm that was paused due to previous migration"
        );
        assert_eq!(
            action_error_text(out, &refused(VmState::ShuttingDown), false),
            "cannot x while the VM is shutting_down"
        );
    }
    for inc in [&rest, &incoming] {
        assert_eq!(
            action_error_text(inc, &refused(VmState::Running), false),
            "'-incoming' was not specified on the command line"
        );
        assert_eq!(
            action_error_text(inc, &refused(VmState::Paused), true),
            "The incoming migration has already been started"
        );
        assert_eq!(
            action_error_text(inc, &refused(VmState::ShuttingDown), true),
            "cannot x while the VM is shutting_down"
        );
    }
    let failed = ActionError::Failed {
        action: "snapshot",
        reason: "disk full".into(),
    };
    assert_eq!(
        action_error_text(&snap, &failed, false),
        "snapshot failed: disk full"
    );
    // A live migration the VMM refuses in QEMU's words is shown in them.
    let busy = ActionError::Refused {
        action: "migrate",
        reason: "There's a migration process in progress".into(),
        kind: crate::action::Refusal::NotNow,
    };
    assert_eq!(
        action_error_text(&live, &busy, false),
        "There's a migration process in progress"
    );
    assert_eq!(
        action_error_text(&snap, &busy, false),
        "migrate failed: There's a migration process in progress"
    );
}
