//! The balloon at the QMP door, as QEMU has it and libvirt drives it: `balloon` (the guest's
//! target RAM in bytes), `query-balloon` (`actual`), and the QOM properties libvirt reads and
//! sets on the balloon's path, `/machine/peripheral/balloon0`: `guest-stats` and
//! `guest-stats-polling-interval` (found through `qom-list`, which lists only the containers on
//! the way to the balloon).

use serde_json::{json, Map, Value};

use super::commands::{CommandError, ErrorClass};
use crate::action::{ActionError, VmmAction};
use crate::controller::Reply;
use crate::VmmResponse;

/// The balloon's QOM path (libvirt looks for `balloon0` under `/machine/peripheral`).
pub const BALLOON_PATH: &str = "/machine/peripheral/balloon0";
/// Its QOM type.
const BALLOON_TYPE: &str = "virtio-balloon-pci";

/// What a QOM or balloon command does with the VMM's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BalloonThen {
    /// `balloon`: nothing to return.
    Set,
    /// `query-balloon`.
    Query,
    /// `qom-list` of `/machine/peripheral`: the balloon if there is one.
    ListPeripherals,
    /// `qom-list` of the balloon.
    ListBalloon,
    /// `qom-get` of a balloon property.
    Get(String),
    /// `qom-set` of the polling interval.
    SetInterval,
}

fn no_balloon() -> CommandError {
    CommandError {
        class: ErrorClass::DeviceNotActive,
        desc: ActionError::NoBalloon.to_string(),
    }
}

fn not_found(path: &str) -> CommandError {
    CommandError {
        class: ErrorClass::DeviceNotFound,
        desc: format!("Device '{path}' not found"),
    }
}

/// `balloon {"value": BYTES}`: QEMU refuses a value that is not a size above zero, and takes
/// one above the VM's memory as all of it.
pub(crate) fn balloon_action(args: &Map<String, Value>) -> Result<VmmAction, CommandError> {
    match args.get("value").and_then(Value::as_i64) {
        Some(v) if v > 0 => Ok(VmmAction::SetBalloon {
            target: v as u64,
            clamp: true,
        }),
        _ => Err(CommandError::generic("Parameter 'value' expects a size")),
    }
}

/// `qom-list`, `qom-get` and `qom-set`: answered at once for the containers, or by the VMM.
#[allow(clippy::type_complexity)]
pub(crate) fn qom(
    command: &str,
    args: &Map<String, Value>,
) -> Result<Result<Value, (VmmAction, BalloonThen)>, CommandError> {
    let path = args.get("path").and_then(Value::as_str).unwrap_or_default();
    let path = path.trim_end_matches('/');
    let property = args
        .get("property")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match (command, path) {
        ("qom-list", "") => Ok(Ok(json!([{"name": "machine", "type": "child<container>"}]))),
        ("qom-list", "/machine") => Ok(Ok(json!([
            {"name": "type", "type": "string"},
            {"name": "peripheral", "type": "child<container>"}
        ]))),
        ("qom-list", "/machine/peripheral") => {
            Ok(Err((VmmAction::GetBalloon, BalloonThen::ListPeripherals)))
        }
        ("qom-list", BALLOON_PATH) => Ok(Err((VmmAction::GetBalloon, BalloonThen::ListBalloon))),
        ("qom-get", BALLOON_PATH) => match property {
            "type" | "guest-stats" | "guest-stats-polling-interval" => Ok(Err((
                VmmAction::GetBalloon,
                BalloonThen::Get(property.to_string()),
            ))),
            other => Err(property_not_found(other)),
        },
        ("qom-set", BALLOON_PATH) => match property {
            "guest-stats-polling-interval" => {
                let v = args.get("value").cloned().unwrap_or(Value::Null);
                let seconds = match v.as_i64() {
                    Some(s) if s < 0 => {
                        return Err(CommandError::generic(
                            "timer value must be greater than zero",
                        ))
                    }
                    Some(s) if s > i64::from(u32::MAX) => {
                        return Err(CommandError::generic("timer value is too big"))
                    }
                    Some(s) => s as u32,
                    None => {
                        return Err(CommandError::generic(
                            "Invalid parameter type for 'value', expected: integer",
                        ))
                    }
                };
                Ok(Err((
                    VmmAction::SetBalloonStatsInterval(seconds),
                    BalloonThen::SetInterval,
                )))
            }
            "guest-stats" | "type" => Err(CommandError::generic(format!(
                "Property '{BALLOON_TYPE}.{property}' is not writable"
            ))),
            other => Err(property_not_found(other)),
        },
        (_, p) => Err(not_found(p)),
    }
}

fn property_not_found(name: &str) -> CommandError {
    CommandError::generic(format!("Property '{BALLOON_TYPE}.{name}' not found"))
}

/// The answer to a balloon or QOM command from the VMM's reply.
pub(crate) fn reply(then: BalloonThen, reply: Reply) -> Result<Value, CommandError> {
    let info = match reply {
        Err(ActionError::NoBalloon) => {
            return match then {
                BalloonThen::ListPeripherals => Ok(json!([])),
                BalloonThen::ListBalloon | BalloonThen::Get(_) => Err(not_found(BALLOON_PATH)),
                _ => Err(no_balloon()),
            }
        }
        Err(e) => return Err(e.into()),
        Ok(VmmResponse::Balloon(info)) => Some(info),
        Ok(_) => None,
    };
    match (then, info) {
        (BalloonThen::Set | BalloonThen::SetInterval, _) => Ok(json!({})),
        (BalloonThen::Query, Some(i)) => Ok(json!({ "actual": i.actual_bytes })),
        (BalloonThen::ListPeripherals, Some(_)) => {
            Ok(json!([{"name": "balloon0", "type": format!("child<{BALLOON_TYPE}>")}]))
        }
        (BalloonThen::ListBalloon, Some(_)) => Ok(json!([
            {"name": "type", "type": "string"},
            {"name": "guest-stats", "type": "guest statistics"},
            {"name": "guest-stats-polling-interval", "type": "int"}
        ])),
        (BalloonThen::Get(p), Some(i)) => Ok(match p.as_str() {
            "guest-stats" => i.qom_guest_stats(),
            "guest-stats-polling-interval" => json!(i.stats_interval_s),
            _ => json!(BALLOON_TYPE),
        }),
        (_, None) => Err(CommandError::generic("unexpected answer from the VMM")),
    }
}
