//! Routing, request bodies and the mapping of the VMM's answers to HTTP statuses.

use super::*;
use crate::action::{VersionInfo, VmState};

#[test]
fn routes_404_405() {
    assert_eq!(route("GET", "/vm"), Ok(Route::GetVm));
    assert_eq!(route("PUT", "/vm/power-button"), Ok(Route::PowerButton));
    assert_eq!(route("GET", "/nope").unwrap_err().status, 404);
    let r = route("POST", "/vm/pause").unwrap_err();
    assert_eq!(r.status, 405);
    assert_eq!(r.allow.as_deref(), Some("PUT"));
    assert_eq!(
        route("DELETE", "/vm").unwrap_err().allow.as_deref(),
        Some("GET")
    );
}

#[test]
fn bodies() {
    assert!(check_body(Route::Pause, b"").is_ok());
    assert!(check_body(Route::Pause, b" {} \n").is_ok());
    assert!(check_body(Route::GetVm, b"junk").is_ok());
    assert_eq!(check_body(Route::Pause, b"{").unwrap_err().status, 400);
    assert_eq!(check_body(Route::Pause, b"[1]").unwrap_err().status, 400);
    let e = check_body(Route::Reset, br#"{"force": true}"#).unwrap_err();
    assert!(e.body.unwrap()["error"].as_str().unwrap().contains("force"));
}

#[test]
fn snapshot_and_restore_take_an_absolute_path() {
    assert_eq!(
        action(Route::Snapshot, br#"{"path": "/var/lib/vm.state"}"#),
        Ok(VmmAction::Snapshot {
            path: "/var/lib/vm.state".into()
        })
    );
    assert_eq!(
        action(Route::Restore, br#" {"path": "/a b/c"} "#),
        Ok(VmmAction::Restore {
            path: "/a b/c".into()
        })
    );
    let err = |body: &[u8]| {
        let r = action(Route::Snapshot, body).unwrap_err();
        assert_eq!(r.status, 400);
        r.body.unwrap()["error"].as_str().unwrap().to_string()
    };
    assert!(err(b"").contains("needs a JSON body"));
    assert!(err(b"{}").contains("missing field `path`"));
    assert!(err(b"{\"path\": 1}").contains("must be a string"));
    assert!(err(b"{\"path\": \"rel/x\"}").contains("absolute"));
    assert!(err(b"{\"path\": \"\"}").contains("absolute"));
    assert!(err(b"{\"path\": \"/x\\u0000y\"}").contains("NUL"));
    assert!(err(br#"{"path": "/x", "force": true}"#).contains("unexpected field `force`"));
    assert!(err(b"[\"/x\"]").contains("JSON object"));
    assert!(err(b"{\"path\"").contains("not valid JSON"));
    // The others keep their rules.
    assert_eq!(
        action(Route::GetMigration, b"junk"),
        Ok(VmmAction::QueryMigrate)
    );
    assert_eq!(action(Route::Pause, b"{}"), Ok(VmmAction::Pause));
    assert_eq!(
        action(Route::Pause, br#"{"path": "/x"}"#)
            .unwrap_err()
            .status,
        400
    );
}

#[test]
fn migration_info_is_served_as_json() {
    use crate::action::{MigrationInfo, MigrationStatus};
    let r = respond(
        Route::GetMigration,
        Ok(VmmResponse::Migration(Box::new(MigrationInfo {
            status: MigrationStatus::Completed,
            total_time_ms: Some(5),
            ..MigrationInfo::default()
        }))),
    );
    assert_eq!(r.status, 200);
    let body = r.body.unwrap();
    assert_eq!(body["status"], "completed");
    assert_eq!(body["total_time_ms"], 5);
    assert_eq!(body["ram"], Value::Null);
    assert_eq!(respond(Route::Snapshot, Ok(VmmResponse::Done)).status, 204);
    assert_eq!(
        respond(Route::GetMigration, Ok(VmmResponse::Done)).status,
        500
    );
}

#[test]
fn replies_map_to_statuses() {
    assert_eq!(respond(Route::Pause, Ok(VmmResponse::Done)).status, 204);
    let v = respond(
        Route::GetVersion,
        Ok(VmmResponse::Version(VersionInfo::current())),
    );
    assert_eq!(v.status, 200);
    assert_eq!(v.body.unwrap()["version"], env!("CARGO_PKG_VERSION"));
    let busy = ActionError::InvalidState {
        action: "pause",
        state: VmState::Paused,
    };
    assert_eq!(respond(Route::Pause, Err(busy)).status, 409);
    assert_eq!(
        respond(Route::Reset, Err(ActionError::Unavailable)).status,
        503
    );
    let failed = ActionError::Failed {
        action: "reset",
        reason: "x".into(),
    };
    assert_eq!(respond(Route::Reset, Err(failed)).status, 500);
    // A refusal is the client's (400), the moment's (409) or the guest's (502, 504).
    for (kind, status) in [
        (Refusal::BadArgument, 400),
        (Refusal::NotNow, 409),
        (Refusal::GuestError, 502),
        (Refusal::GuestTimeout, 504),
    ] {
        let refused = ActionError::Refused {
            action: "agent",
            reason: "x".into(),
            kind,
        };
        let r = respond(Route::Agent, Err(refused));
        assert_eq!(r.status, status, "{kind:?}");
        assert_eq!(r.body.unwrap()["error"], "agent failed: x");
    }
}

#[test]
fn response_bytes() {
    let mut out = Vec::new();
    Response::no_content().write(&mut out, false);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"));
    assert!(!text.contains("Content-Length"));
    let mut out = Vec::new();
    route("POST", "/vm").unwrap_err().write(&mut out, true);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("\r\nAllow: GET\r\n"));
    assert!(text.contains("\r\nConnection: close\r\n"));
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
}

#[test]
fn agent_verbs_and_metrics() {
    use crate::metrics::VmMetrics;
    let verb = |r: Route, body: &[u8]| action(r, body);
    assert_eq!(
        verb(Route::AgentInterfaces, b""),
        Ok(VmmAction::AgentVerb(AgentVerb::Interfaces))
    );
    assert_eq!(
        verb(Route::AgentSetTime, b""),
        Ok(VmmAction::AgentVerb(AgentVerb::SetTime { time_ns: None }))
    );
    assert_eq!(
        verb(Route::AgentSetTime, br#"{"time_ns": 5}"#),
        Ok(VmmAction::AgentVerb(AgentVerb::SetTime {
            time_ns: Some(5)
        }))
    );
    assert_eq!(
        verb(Route::AgentSetTime, br#"{"time_ns": -1}"#)
            .unwrap_err()
            .status,
        400
    );
    assert_eq!(
        verb(Route::AgentSetTime, br#"{"when": 1}"#)
            .unwrap_err()
            .status,
        400
    );
    assert_eq!(
        verb(Route::AgentShutdown, br#"{"mode": "reboot"}"#),
        Ok(VmmAction::AgentVerb(AgentVerb::Shutdown {
            mode: GuestShutdownMode::Reboot
        }))
    );
    assert_eq!(
        verb(Route::AgentShutdown, br#"{"mode": "off"}"#)
            .unwrap_err()
            .status,
        400
    );
    assert_eq!(
        verb(Route::AgentFsFreeze, br#"{"x": 1}"#)
            .unwrap_err()
            .status,
        400
    );
    // Typed answers are served as they are; the shutdown has none.
    let r = respond(
        Route::AgentFsFreeze,
        Ok(VmmResponse::Agent(json!({"frozen": 1}))),
    );
    assert_eq!((r.status, r.body), (200, Some(json!({"frozen": 1}))));
    assert_eq!(
        respond(Route::AgentShutdown, Ok(VmmResponse::Done)).status,
        204
    );
    // Metrics: JSON at /vm/metrics, Prometheus' text at /metrics.
    let m = || {
        Ok(VmmResponse::Metrics(Box::new(VmMetrics {
            cpu_usage: Some(1.0),
            ..Default::default()
        })))
    };
    assert_eq!(
        respond(Route::GetMetrics, m()).body.unwrap()["cpuUsage"],
        1.0
    );
    let mut out = Vec::new();
    respond(Route::Prometheus, m()).write(&mut out, false);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
    assert!(body.contains("vmm_cpu_usage_percent 1\n"));
}

#[test]
fn live_migration_routes() {
    use crate::action::{
        MigrationAddress, MigrationInfo, MigrationParameters, MigrationParametersUpdate,
        MigrationStatus,
    };
    assert_eq!(route("PUT", "/vm/migrate"), Ok(Route::Migrate));
    assert_eq!(route("GET", "/vm/migrate"), Ok(Route::GetMigrate));
    assert_eq!(route("PUT", "/vm/migrate/cancel"), Ok(Route::MigrateCancel));
    assert_eq!(
        route("PUT", "/vm/migrate/incoming"),
        Ok(Route::MigrateIncoming)
    );
    assert_eq!(
        route("GET", "/vm/migrate/parameters"),
        Ok(Route::GetMigrationParameters)
    );
    assert_eq!(
        route("PUT", "/vm/migrate/parameters"),
        Ok(Route::SetMigrationParameters)
    );
    let r = route("POST", "/vm/migrate").unwrap_err();
    assert_eq!((r.status, r.allow.as_deref()), (405, Some("PUT, GET")));
    assert_eq!(route("GET", "/vm/migrate/cancel").unwrap_err().status, 405);

    assert_eq!(
        action(Route::Migrate, br#"{"uri": "tcp:10.0.0.2:4446"}"#),
        Ok(VmmAction::Migrate {
            to: MigrationAddress::Tcp {
                host: "10.0.0.2".into(),
                port: 4446
            }
        })
    );
    assert_eq!(
        action(Route::MigrateIncoming, br#"{"uri": "unix:/run/m.sock"}"#),
        Ok(VmmAction::MigrateIncoming {
            from: MigrationAddress::Unix("/run/m.sock".into())
        })
    );
    assert_eq!(action(Route::GetMigrate, b""), Ok(VmmAction::QueryMigrate));
    assert_eq!(
        action(Route::MigrateCancel, b"{}"),
        Ok(VmmAction::MigrateCancel)
    );
    assert_eq!(
        action(Route::MigrateCancel, br#"{"x": 1}"#)
            .unwrap_err()
            .status,
        400
    );
    let err = |r: Route, body: &[u8]| {
        let resp = action(r, body).unwrap_err();
        assert_eq!(resp.status, 400);
        resp.body.unwrap()["error"].as_str().unwrap().to_string()
    };
    assert!(err(Route::Migrate, b"").contains("needs a JSON body"));
    assert!(err(Route::Migrate, b"{}").contains("missing field `uri`"));
    assert!(err(Route::Migrate, br#"{"uri": 1}"#).contains("must be a string"));
    assert!(err(Route::Migrate, br#"{"uri": "tcp:h:1", "x": 1}"#).contains("unexpected field `x`"));
    assert!(err(Route::Migrate, br#"{"uri": "file:/x"}"#).contains("PUT /vm/snapshot"));
    assert!(err(Route::MigrateIncoming, br#"{"uri": "file:/x"}"#).contains("PUT /vm/restore"));
    assert!(err(Route::Migrate, br#"{"uri": "exec:cat"}"#).contains("must be `tcp:HOST:PORT`"));
    assert_eq!(
        err(Route::Migrate, br#"{"uri": "tcp:nowhere"}"#),
        "invalid `uri`: error parsing address 'nowhere'"
    );
    assert!(err(Route::Migrate, br#"{"uri": "unix:rel.sock"}"#).contains("absolute path"));

    // Parameters: either, both or none.
    let set = |d, b| {
        Ok(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate {
                downtime_limit_ms: d,
                max_bandwidth: b,
            },
        ))
    };
    assert_eq!(
        action(
            Route::SetMigrationParameters,
            br#"{"downtime_limit_ms": 50}"#
        ),
        set(Some(50), None)
    );
    assert_eq!(
        action(
            Route::SetMigrationParameters,
            br#"{"downtime_limit_ms": 50, "max_bandwidth": 0}"#
        ),
        set(Some(50), Some(0))
    );
    assert_eq!(action(Route::SetMigrationParameters, b""), set(None, None));
    assert!(err(
        Route::SetMigrationParameters,
        br#"{"downtime_limit_ms": 2000001}"#
    )
    .contains("at most 2000000"));
    assert!(err(
        Route::SetMigrationParameters,
        br#"{"downtime_limit_ms": -1}"#
    )
    .contains("invalid request body"));
    assert!(
        err(Route::SetMigrationParameters, br#"{"downtime-limit": 5}"#).contains("unknown field")
    );

    // Answers: the status as GET /vm/migration has it, the parameters, 204 for the actions.
    let info = MigrationInfo {
        status: MigrationStatus::Active,
        expected_downtime_ms: Some(20),
        ..MigrationInfo::default()
    };
    let r = respond(
        Route::GetMigrate,
        Ok(VmmResponse::Migration(Box::new(info.clone()))),
    );
    assert_eq!(r.status, 200);
    let body = r.body.unwrap();
    assert_eq!(body["status"], "active");
    assert_eq!(body["expected_downtime_ms"], 20);
    assert_eq!(
        respond(
            Route::GetMigration,
            Ok(VmmResponse::Migration(Box::new(info)))
        )
        .body
        .unwrap(),
        body
    );
    let r = respond(
        Route::GetMigrationParameters,
        Ok(VmmResponse::MigrationParameters(
            MigrationParameters::default(),
        )),
    );
    assert_eq!(
        (r.status, r.body),
        (
            200,
            Some(json!({"downtime_limit_ms": 300, "max_bandwidth": 134_217_728}))
        )
    );
    for r in [
        Route::Migrate,
        Route::MigrateCancel,
        Route::MigrateIncoming,
        Route::SetMigrationParameters,
    ] {
        assert_eq!(respond(r, Ok(VmmResponse::Done)).status, 204, "{r:?}");
    }
    let refused = ActionError::InvalidState {
        action: "migrate",
        state: VmState::PostMigrate,
    };
    assert_eq!(respond(Route::Migrate, Err(refused)).status, 409);
    let busy = ActionError::Refused {
        action: "migrate",
        reason: "There's a migration process in progress".into(),
        kind: Refusal::NotNow,
    };
    assert_eq!(respond(Route::Migrate, Err(busy)).status, 409);
}
