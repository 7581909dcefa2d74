//! Snapshot and restore through QEMU's migration commands (qapi/migration.json): the `migrate`
//! and `migrate-incoming` arguments and URIs, the migration capabilities, `query-migrate`'s
//! shape, and QEMU's texts for a migration refused in the VM's current state. Shared by the QMP
//! commands and their HMP forms.
//!
//! Only the `file:` transport exists: a snapshot is a migration to a file. The others QEMU knows
//! (`tcp:`, `unix:`, `vsock:`, `fd:`, `exec:`, `rdma:`) are refused with a clear error until live
//! migration lands.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::commands::CommandError;
use crate::action::{
    ActionError, MigrationCapability, MigrationCapabilityState, MigrationInfo, MigrationStatus,
    RamStats, VmState, VmmAction,
};

/// QEMU 10's `MigrationCapability` names, in its order (what `query-migrate-capabilities`
/// lists). Only `events` is implemented; the others are always off.
pub(crate) const QEMU_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// Guest page size of x86 (QEMU's `page-size`).
const PAGE_SIZE: u64 = 4096;

/// The transports QEMU parses (migration.c `migrate_uri_parse`) that we do not offer yet.
const LIVE_SCHEMES: &[&str] = &["tcp", "unix", "vsock", "fd", "exec", "rdma"];

/// The file a migration URI names. `file:PATH[,offset=N]` is the one transport; QEMU's other
/// schemes get a clear "not yet", anything else QEMU's own error.
pub(crate) fn parse_uri(uri: &str) -> Result<PathBuf, CommandError> {
    if let Some(spec) = uri.strip_prefix("file:") {
        // QEMU cuts the path at the first ",offset=" (migration/file.c `file_parse_offset`).
        let (path, offset) = match spec.find(",offset=") {
            Some(i) => (&spec[..i], Some(&spec[i + ",offset=".len()..])),
            None => (spec, None),
        };
        if let Some(offset) = offset {
            match parse_size(offset) {
                None => {
                    return Err(CommandError::generic(format!(
                        "file URI has bad offset {offset}: Invalid argument"
                    )))
                }
                Some(0) => {}
                Some(_) => {
                    return Err(CommandError::generic(
                        "a file URI offset is not supported: the state is written from the \
                         start of the file",
                    ))
                }
            }
        }
        if path.is_empty() {
            // What QEMU's open of "" says.
            return Err(CommandError::generic(
                "Unable to open : No such file or directory",
            ));
        }
        if path.contains('\0') {
            return Err(CommandError::generic("a file path cannot contain NUL"));
        }
        return Ok(PathBuf::from(path));
    }
    if let Some(scheme) = LIVE_SCHEMES
        .iter()
        .find(|s| uri.strip_prefix(**s).is_some_and(|r| r.starts_with(':')))
    {
        return Err(CommandError::generic(format!(
            "the '{scheme}:' migration transport is not supported yet (live migration comes \
             later); use 'file:PATH' to save the VM to a file"
        )));
    }
    Err(CommandError::generic(format!(
        "unknown migration protocol: {uri}"
    )))
}

/// QEMU's `qemu_strtosz` for the offset: `0x` hex, or decimal with an optional B/K/M/G/T/P/E
/// suffix. `None` if it does not parse or overflows.
fn parse_size(text: &str) -> Option<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16)
            .ok()
            .filter(|_| !hex.is_empty());
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        "E" => 60,
        _ => return None,
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

/// `migrate`'s arguments (already type-checked) as the snapshot to take, in QEMU's order of
/// checks: `uri` xor `channels`, the URI, then `resume`.
pub(crate) fn migrate_action(args: &Map<String, Value>) -> Result<VmmAction, CommandError> {
    let path = uri_or_channels(args)?;
    // `detach` is accepted and ignored, as QEMU does. A paused postcopy migration is the only
    // thing `resume` continues, and there never is one here.
    if args.get("resume").and_then(Value::as_bool) == Some(true) {
        return Err(CommandError::generic(
            "Cannot resume if there is no paused migration",
        ));
    }
    Ok(VmmAction::Snapshot { path })
}

/// `migrate-incoming`'s arguments (already type-checked) as the file to restore from.
/// `exit-on-error` is accepted: a failed restore is reported and the VMM's policy applies.
pub(crate) fn incoming_path(args: &Map<String, Value>) -> Result<PathBuf, CommandError> {
    uri_or_channels(args)
}

fn uri_or_channels(args: &Map<String, Value>) -> Result<PathBuf, CommandError> {
    match (
        args.get("uri").and_then(Value::as_str),
        args.get("channels"),
    ) {
        (Some(uri), None) => parse_uri(uri),
        (None, Some(_)) => Err(CommandError::generic(
            "channels are not supported; use 'uri'",
        )),
        _ => Err(CommandError::generic(
            "need either 'uri' or 'channels' argument",
        )),
    }
}

/// Argument check of `migrate-set-capabilities`' `capabilities`: a list of
/// `{"capability": NAME, "state": BOOL}`, with QEMU's texts (each element in turn: object,
/// `capability`, `state`, unexpected members).
pub(crate) fn check_capability_list(name: &str, v: &Value) -> Result<(), CommandError> {
    let type_err = |what: String, expected: &str| {
        CommandError::generic(format!(
            "Invalid parameter type for '{what}', expected: {expected}"
        ))
    };
    let Some(items) = v.as_array() else {
        return Err(type_err(name.to_string(), "array"));
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("{name}[{i}]");
        let Some(obj) = item.as_object() else {
            return Err(type_err(at, "object"));
        };
        match obj.get("capability") {
            None => {
                return Err(CommandError::generic(format!(
                    "Parameter '{at}.capability' is missing"
                )))
            }
            Some(Value::String(cap)) => {
                if !QEMU_CAPABILITIES.contains(&cap.as_str()) {
                    // QEMU's enum visitor names the bare member here.
                    return Err(CommandError::generic(format!(
                        "Parameter 'capability' does not accept value '{cap}'"
                    )));
                }
            }
            Some(_) => return Err(type_err(format!("{at}.capability"), "string")),
        }
        match obj.get("state") {
            None => {
                return Err(CommandError::generic(format!(
                    "Parameter '{at}.state' is missing"
                )))
            }
            Some(Value::Bool(_)) => {}
            Some(_) => return Err(type_err(format!("{at}.state"), "boolean")),
        }
        if let Some(extra) = obj.keys().find(|k| *k != "capability" && *k != "state") {
            return Err(CommandError::generic(format!(
                "Parameter '{at}.{extra}' is unexpected"
            )));
        }
    }
    Ok(())
}

/// The capabilities to set, from `(name, state)` pairs whose names QEMU knows: those we do
/// not implement may be switched off (they are off) but not on.
pub(crate) fn capability_changes<'a>(
    pairs: impl IntoIterator<Item = (&'a str, bool)>,
) -> Result<Vec<MigrationCapabilityState>, CommandError> {
    let mut out = Vec::new();
    for (name, state) in pairs {
        match name {
            "events" => out.push(MigrationCapabilityState {
                capability: MigrationCapability::Events,
                state,
            }),
            _ if state => {
                return Err(CommandError::generic(format!(
                    "capability '{name}' is not supported by this VMM"
                )))
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `migrate-set-capabilities`' list (checked by [`check_capability_list`]) as the action.
pub(crate) fn set_capabilities_action(
    args: &Map<String, Value>,
) -> Result<VmmAction, CommandError> {
    let items = args
        .get("capabilities")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let pairs = items.iter().filter_map(|item| {
        Some((
            item.get("capability")?.as_str()?,
            item.get("state")?.as_bool()?,
        ))
    });
    capability_changes(pairs).map(VmmAction::SetMigrationCapabilities)
}

/// Every capability QEMU knows with its state: ours as the VMM reports them, the rest off.
pub(crate) fn capability_states(ours: &[MigrationCapabilityState]) -> Vec<(&'static str, bool)> {
    QEMU_CAPABILITIES
        .iter()
        .map(|name| {
            let state = ours
                .iter()
                .rev()
                .find(|c| c.capability.as_str() == *name)
                .is_some_and(|c| c.state);
            (*name, state)
        })
        .collect()
}

/// `query-migrate-capabilities`' answer.
pub(crate) fn capabilities_json(ours: &[MigrationCapabilityState]) -> Value {
    Value::Array(
        capability_states(ours)
            .into_iter()
            .map(|(capability, state)| json!({"capability": capability, "state": state}))
            .collect(),
    )
}

/// `query-migrate`'s answer: QEMU's `MigrationInfo`, `{}` before the first migration, absent
/// members left out.
pub(crate) fn migration_json(info: &MigrationInfo) -> Value {
    let mut m = Map::new();
    if info.status == MigrationStatus::None {
        return Value::Object(m);
    }
    m.insert("status".into(), info.status.as_str().into());
    let times = [
        ("total-time", info.total_time_ms),
        ("setup-time", info.setup_time_ms),
        ("downtime", info.downtime_ms),
    ];
    for (name, v) in times {
        if let Some(v) = v {
            m.insert(name.into(), v.into());
        }
    }
    if let Some(ram) = &info.ram {
        m.insert("ram".into(), ram_json(ram));
    }
    if let Some(e) = &info.error_desc {
        m.insert("error-desc".into(), e.as_str().into());
    }
    Value::Object(m)
}

/// QEMU's `MigrationStats`: every member is mandatory there. The VM is stopped while its state
/// is written, so there is one dirty sync and every byte is downtime (QEMU counts bytes sent
/// while the VM is stopped as `downtime-bytes`); multifd, postcopy and zero-copy do not exist.
pub(crate) fn ram_json(ram: &RamStats) -> Value {
    json!({
        "transferred": ram.transferred,
        "remaining": ram.remaining,
        "total": ram.total,
        "duplicate": ram.duplicate,
        "normal": ram.normal,
        "normal-bytes": ram.normal_bytes,
        "dirty-pages-rate": 0,
        "mbps": ram.mbps,
        "dirty-sync-count": 1,
        "postcopy-requests": 0,
        "page-size": PAGE_SIZE,
        "multifd-bytes": 0,
        "pages-per-second": ram.pages_per_second,
        "precopy-bytes": 0,
        "downtime-bytes": ram.transferred,
        "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    })
}

/// The text of an action's error as QEMU words it where QEMU has words for it: a migration
/// refused in the VM's state. `restore_started` tells a second restore (QEMU: "already
/// started") from a VMM that never waited for one.
pub(crate) fn action_error_text(
    action: &VmmAction,
    e: &ActionError,
    restore_started: bool,
) -> String {
    let ActionError::InvalidState { state, .. } = e else {
        return e.to_string();
    };
    match (action, state) {
        (VmmAction::Snapshot { .. }, VmState::Incoming) => {
            "Guest is waiting for an incoming migration".into()
        }
        (VmmAction::Snapshot { .. }, VmState::PostMigrate) => {
            "Can't migrate the vm that was paused due to previous migration".into()
        }
        (VmmAction::Restore { .. }, VmState::ShuttingDown) => e.to_string(),
        (VmmAction::Restore { .. }, _) => incoming_refusal(restore_started).into(),
        _ => e.to_string(),
    }
}

/// Why `migrate-incoming` is refused outside [`VmState::Incoming`], in QEMU's words.
pub(crate) fn incoming_refusal(restore_started: bool) -> &'static str {
    if restore_started {
        "The incoming migration has already been started"
    } else {
        "'-incoming' was not specified on the command line"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(r: Result<impl std::fmt::Debug, CommandError>) -> String {
        r.unwrap_err().desc
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn file_uris() {
        assert_eq!(
            parse_uri("file:/tmp/a b").unwrap(),
            PathBuf::from("/tmp/a b")
        );
        assert_eq!(parse_uri("file:rel/x").unwrap(), PathBuf::from("rel/x"));
        assert_eq!(
            parse_uri("file:/tmp/x,offset=0").unwrap(),
            PathBuf::from("/tmp/x")
        );
        assert_eq!(
            parse_uri("file:/tmp/x,offset=0x0").unwrap(),
            PathBuf::from("/tmp/x")
        );
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
    fn other_schemes() {
        for uri in [
            "tcp:0:4446",
            "unix:/tmp/m.sock",
            "exec:cat > /tmp/x",
            "fd:3",
            "rdma:1.2.3.4:5",
            "vsock:3:1234",
        ] {
            let d = desc(parse_uri(uri));
            assert!(d.contains("not supported yet"), "{uri}: {d}");
            assert!(d.contains(&uri[..uri.find(':').unwrap() + 1]), "{d}");
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
    fn sizes_parse_like_qemu_strtosz() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("0x"), None);
        assert_eq!(parse_size("1q"), None);
    }

    #[test]
    fn migrate_arguments_in_qemu_order() {
        assert_eq!(
            migrate_action(&args(json!({"uri": "file:/s", "detach": true}))).unwrap(),
            VmmAction::Snapshot { path: "/s".into() }
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
        assert_eq!(
            desc(migrate_action(&args(
                json!({"uri": "file:/s", "resume": true})
            ))),
            "Cannot resume if there is no paused migration"
        );
        assert!(migrate_action(&args(json!({"uri": "file:/s", "resume": false}))).is_ok());
        assert_eq!(
            incoming_path(&args(json!({"uri": "file:/s", "exit-on-error": false}))).unwrap(),
            PathBuf::from("/s")
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
            }),
            error_desc: None,
        };
        let v = migration_json(&done);
        assert_eq!(v["status"], "completed");
        assert_eq!(v["total-time"], 120);
        assert_eq!(v["setup-time"], 2);
        assert_eq!(v["downtime"], 118);
        assert!(v.get("error-desc").is_none());
        let ram = &v["ram"];
        assert_eq!(ram["normal-bytes"], 236 * 4096);
        assert_eq!(ram["mbps"], 71.5);
        assert_eq!(ram["dirty-sync-count"], 1);
        assert_eq!(ram["page-size"], 4096);
        assert_eq!(ram["downtime-bytes"], 1 << 20);
        assert_eq!(
            ram.as_object().unwrap().len(),
            17,
            "every MigrationStats member"
        );
    }

    #[test]
    fn refusals_in_qemu_words() {
        let snap = VmmAction::Snapshot { path: "/s".into() };
        let rest = VmmAction::Restore { path: "/s".into() };
        let refused = |state| ActionError::InvalidState { action: "x", state };
        assert_eq!(
            action_error_text(&snap, &refused(VmState::Incoming), false),
            "Guest is waiting for an incoming migration"
        );
        assert_eq!(
            action_error_text(&snap, &refused(VmState::PostMigrate), false),
            "Can't migrate the vm that was paused due to previous migration"
        );
        assert_eq!(
            action_error_text(&rest, &refused(VmState::Running), false),
            "'-incoming' was not specified on the command line"
        );
        assert_eq!(
            action_error_text(&rest, &refused(VmState::Paused), true),
            "The incoming migration has already been started"
        );
        assert_eq!(
            action_error_text(&snap, &refused(VmState::ShuttingDown), false),
            "cannot x while the VM is shutting_down"
        );
        let failed = ActionError::Failed {
            action: "snapshot",
            reason: "disk full".into(),
        };
        assert_eq!(
            action_error_text(&snap, &failed, false),
            "snapshot failed: disk full"
        );
    }
}
