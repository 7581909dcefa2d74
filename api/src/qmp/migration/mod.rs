//! Snapshot, restore and live migration through QEMU's migration commands
//! (qapi/migration.json): the `migrate` and `migrate-incoming` arguments and URIs, the migration
//! capabilities, `query-migrate`'s shape, and QEMU's texts for a migration refused in the VM's
//! current state; the migration parameters are in [`params`]. Shared by the QMP commands and
//! their HMP forms.
//!
//! `file:PATH` is a snapshot to a file (a restore from one, incoming); `tcp:HOST:PORT` and
//! `unix:PATH` are live migrations ([`MigrationAddress`]). The other transports QEMU knows
//! (`vsock:`, `fd:`, `exec:`, `rdma:`) are refused with a clear error.

pub(crate) mod params;

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::commands::CommandError;
use crate::action::{
    ActionError, MigrationAddress, MigrationCapability, MigrationCapabilityState, MigrationInfo,
    MigrationStatus, RamStats, VmState, VmmAction,
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

/// The transports QEMU parses (migration.c `migrate_uri_parse`) that this VMM does not offer.
const REFUSED_SCHEMES: &[&str] = &["vsock", "fd", "exec", "rdma"];

/// Where a migration URI leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// `file:PATH`: a snapshot to the file, or a restore from it.
    File(PathBuf),
    /// `tcp:` or `unix:`: a live migration.
    Live(MigrationAddress),
}

impl Target {
    /// What `migrate` does with it.
    pub(crate) fn outgoing(self) -> VmmAction {
        match self {
            Target::File(path) => VmmAction::Snapshot { path },
            Target::Live(to) => VmmAction::Migrate { to },
        }
    }

    /// What `migrate-incoming` does with it.
    pub(crate) fn incoming(self) -> VmmAction {
        match self {
            Target::File(path) => VmmAction::Restore { path },
            Target::Live(from) => VmmAction::MigrateIncoming { from },
        }
    }
}

/// Where a migration URI leads: `file:PATH[,offset=N]`, `tcp:HOST:PORT`, `tcp:[V6]:PORT` or
/// `unix:PATH`. QEMU's other schemes get a clear refusal, anything else QEMU's own error.
pub(crate) fn parse_uri(uri: &str) -> Result<Target, CommandError> {
    if let Some(spec) = uri.strip_prefix("file:") {
        return parse_file(spec).map(Target::File);
    }
    if let Some(addr) = MigrationAddress::parse(uri) {
        return addr.map(Target::Live).map_err(CommandError::generic);
    }
    if let Some(scheme) = REFUSED_SCHEMES
        .iter()
        .find(|s| uri.strip_prefix(**s).is_some_and(|r| r.starts_with(':')))
    {
        return Err(CommandError::generic(format!(
            "the '{scheme}:' migration transport is not supported by this VMM; use \
             'tcp:HOST:PORT' or 'unix:PATH' to migrate, 'file:PATH' to save the VM to a file"
        )));
    }
    Err(CommandError::generic(format!(
        "unknown migration protocol: {uri}"
    )))
}

/// The file of a `file:` URI (what follows `file:`).
fn parse_file(spec: &str) -> Result<PathBuf, CommandError> {
    // QEMU cuts the path at the first ",offset=" (migration/file.c `file_parse_offset`).
    let (path, offset) = match spec.find(",offset=") {
        Some(i) => (&spec[..i], Some(&spec[i + ",offset=".len()..])),
        None => (spec, None),
    };
    if let Some(offset) = offset {
        match params::strtosz(offset, 'B') {
            Err(_) => {
                return Err(CommandError::generic(format!(
                    "file URI has bad offset {offset}: Invalid argument"
                )))
            }
            Ok(0) => {}
            Ok(_) => {
                return Err(CommandError::generic(
                    "a file URI offset is not supported: the state is written from the start \
                     of the file",
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
    Ok(PathBuf::from(path))
}

/// `migrate`'s arguments (already type-checked) as the snapshot to take or the live migration
/// to start, in QEMU's order of checks: `uri` xor `channels`, the URI, then `resume`.
pub(crate) fn migrate_action(args: &Map<String, Value>) -> Result<VmmAction, CommandError> {
    let target = uri_or_channels(args)?;
    // `detach` is accepted and ignored, as QEMU does. A paused postcopy migration is the only
    // thing `resume` continues, and there never is one here.
    if args.get("resume").and_then(Value::as_bool) == Some(true) {
        return Err(CommandError::generic(
            "Cannot resume if there is no paused migration",
        ));
    }
    Ok(target.outgoing())
}

/// `migrate-incoming`'s arguments (already type-checked) as the restore or the live migration
/// to receive. `exit-on-error` is accepted: a failure is reported and the VMM's policy applies.
pub(crate) fn incoming_action(args: &Map<String, Value>) -> Result<VmmAction, CommandError> {
    uri_or_channels(args).map(Target::incoming)
}

fn uri_or_channels(args: &Map<String, Value>) -> Result<Target, CommandError> {
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
        ("expected-downtime", info.expected_downtime_ms),
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

/// QEMU's `MigrationStats`: every member is mandatory there. Bytes sent while the guest ran are
/// `precopy-bytes`, the rest `downtime-bytes` (a snapshot stops the VM first: all of it);
/// multifd, postcopy and zero-copy do not exist here.
pub(crate) fn ram_json(ram: &RamStats) -> Value {
    json!({
        "transferred": ram.transferred,
        "remaining": ram.remaining,
        "total": ram.total,
        "duplicate": ram.duplicate,
        "normal": ram.normal,
        "normal-bytes": ram.normal_bytes,
        "dirty-pages-rate": ram.dirty_pages_rate,
        "mbps": ram.mbps,
        "dirty-sync-count": ram.dirty_sync_count,
        "postcopy-requests": 0,
        "page-size": PAGE_SIZE,
        "multifd-bytes": 0,
        "pages-per-second": ram.pages_per_second,
        "precopy-bytes": precopy_bytes(ram),
        "downtime-bytes": ram.downtime_bytes,
        "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    })
}

/// Bytes sent while the guest ran.
pub(crate) fn precopy_bytes(ram: &RamStats) -> u64 {
    ram.transferred.saturating_sub(ram.downtime_bytes)
}

/// The text of an action's error as QEMU words it where QEMU has words for it: a migration
/// refused in the VM's state, or one the VMM refused with QEMU's text (the reason of an
/// [`ActionError::Refused`] of a live-migration action is shown alone), and a whole-VM
/// snapshot's failure ([`super::jobs::snapshot::error_text`]). `restore_started` tells a second
/// `migrate-incoming` (QEMU: "already started") from a VMM that never waited for one.
pub(crate) fn action_error_text(
    action: &VmmAction,
    e: &ActionError,
    restore_started: bool,
) -> String {
    use VmmAction::{
        DelVm, LoadVm, Migrate, MigrateCancel, MigrateIncoming, Restore, SaveVm,
        SetMigrationParameters, Snapshot,
    };
    if matches!(action, SaveVm(_) | LoadVm(_) | DelVm(_)) {
        return super::jobs::snapshot::error_text(e);
    }
    match e {
        ActionError::InvalidState { state, .. } => match (action, state) {
            (Snapshot { .. } | Migrate { .. }, VmState::Incoming) => {
                "Guest is waiting for an incoming migration".into()
            }
            (Snapshot { .. } | Migrate { .. }, VmState::PostMigrate) => {
                "Can't migrate the vm that was paused due to previous migration".into()
            }
            (Restore { .. } | MigrateIncoming { .. }, VmState::ShuttingDown) => e.to_string(),
            (Restore { .. } | MigrateIncoming { .. }, _) => {
                incoming_refusal(restore_started).into()
            }
            _ => e.to_string(),
        },
        ActionError::Refused { reason, .. }
            if matches!(
                action,
                Migrate { .. } | MigrateIncoming { .. } | MigrateCancel | SetMigrationParameters(_)
            ) =>
        {
            reason.clone()
        }
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
#[cfg(test)]
mod tests;
