//! The typed guest-agent operations ([`AgentVerb`]): which qemu-ga command each one is, and its
//! answer in this VMM's own shape (snake_case members, byte counts as numbers), so that a
//! client need not know qemu-ga's schema (qga/qapi-schema.json).

use std::time::{SystemTime, UNIX_EPOCH};

use api::AgentVerb;
use serde_json::{json, Map, Value};

/// The agent command and arguments of `verb`.
pub fn command(verb: AgentVerb) -> (&'static str, Option<Value>) {
    match verb {
        AgentVerb::Interfaces => ("guest-network-get-interfaces", None),
        AgentVerb::Filesystems => ("guest-get-fsinfo", None),
        AgentVerb::OsInfo => ("guest-get-osinfo", None),
        AgentVerb::FsFreeze => ("guest-fsfreeze-freeze", None),
        AgentVerb::FsThaw => ("guest-fsfreeze-thaw", None),
        AgentVerb::SetTime { time_ns } => {
            let ns = time_ns.unwrap_or_else(host_now_ns);
            ("guest-set-time", Some(json!({ "time": ns })))
        }
        AgentVerb::Shutdown { mode } => ("guest-shutdown", Some(json!({"mode": mode.as_str()}))),
    }
}

/// The host's clock, ns since the Unix epoch.
fn host_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The answer to `verb` from the agent's `return` value (`arguments` are the ones sent).
pub fn answer(verb: AgentVerb, arguments: Option<&Value>, ret: Value) -> Result<Value, String> {
    let garbage = |what: &str| format!("the guest agent answered {what} unexpectedly: {ret}");
    match verb {
        AgentVerb::Interfaces => {
            let list = ret.as_array().ok_or_else(|| garbage("the interfaces"))?;
            Ok(Value::Array(list.iter().map(interface).collect()))
        }
        AgentVerb::Filesystems => {
            let list = ret.as_array().ok_or_else(|| garbage("the filesystems"))?;
            Ok(Value::Array(list.iter().map(filesystem).collect()))
        }
        AgentVerb::OsInfo => {
            let o = ret.as_object().ok_or_else(|| garbage("the OS info"))?;
            Ok(Value::Object(snake_keys(o)))
        }
        AgentVerb::FsFreeze => {
            let n = ret.as_u64().ok_or_else(|| garbage("the freeze"))?;
            Ok(json!({ "frozen": n }))
        }
        AgentVerb::FsThaw => {
            let n = ret.as_u64().ok_or_else(|| garbage("the thaw"))?;
            Ok(json!({ "thawed": n }))
        }
        AgentVerb::SetTime { .. } => {
            let ns = arguments
                .and_then(|a| a.get("time"))
                .cloned()
                .unwrap_or(Value::Null);
            Ok(json!({ "time_ns": ns }))
        }
        AgentVerb::Shutdown { .. } => Ok(Value::Null),
    }
}

/// `{"name", "mac", "addresses": [{"type", "address", "prefix"}]}`.
fn interface(i: &Value) -> Value {
    let addresses: Vec<Value> = i
        .get("ip-addresses")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|a| {
                    json!({
                        "type": a.get("ip-address-type").cloned().unwrap_or(Value::Null),
                        "address": a.get("ip-address").cloned().unwrap_or(Value::Null),
                        "prefix": a.get("prefix").cloned().unwrap_or(Value::Null),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "name": i.get("name").cloned().unwrap_or(Value::Null),
        "mac": i.get("hardware-address").cloned().unwrap_or(Value::Null),
        "addresses": addresses,
    })
}

/// `{"mountpoint", "device", "type", "used_bytes", "total_bytes", "disks": ["/dev/vdb"]}`.
fn filesystem(f: &Value) -> Value {
    let disks: Vec<Value> = f
        .get("disk")
        .and_then(Value::as_array)
        .map(|l| l.iter().filter_map(|d| d.get("dev").cloned()).collect())
        .unwrap_or_default();
    json!({
        "mountpoint": f.get("mountpoint").cloned().unwrap_or(Value::Null),
        "device": f.get("name").cloned().unwrap_or(Value::Null),
        "type": f.get("type").cloned().unwrap_or(Value::Null),
        "used_bytes": f.get("used-bytes").cloned().unwrap_or(Value::Null),
        "total_bytes": f.get("total-bytes").cloned().unwrap_or(Value::Null),
        "disks": disks,
    })
}

/// The object with `-` in its keys turned into `_`.
fn snake_keys(o: &Map<String, Value>) -> Map<String, Value> {
    o.iter()
        .map(|(k, v)| (k.replace('-', "_"), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::GuestShutdownMode;

    #[test]
    fn interfaces_and_filesystems_get_our_shape() {
        let ret = json!([{
            "name": "eth0", "hardware-address": "52:54:00:12:34:56",
            "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}],
            "statistics": {"rx-bytes": 1}
        }, {"name": "lo"}]);
        let v = answer(AgentVerb::Interfaces, None, ret).unwrap();
        assert_eq!(v[0]["mac"], "52:54:00:12:34:56");
        assert_eq!(
            v[0]["addresses"][0],
            json!({"type": "ipv4", "address": "10.0.2.15", "prefix": 24})
        );
        assert_eq!(v[1]["addresses"], json!([]));
        let ret = json!([{"name": "vdb", "mountpoint": "/mnt", "type": "ext4",
            "used-bytes": 5, "total-bytes": 10, "disk": [{"dev": "/dev/vdb", "bus-type": "virtio"}]}]);
        let v = answer(AgentVerb::Filesystems, None, ret).unwrap();
        assert_eq!(
            v,
            json!([{"mountpoint": "/mnt", "device": "vdb", "type": "ext4",
                "used_bytes": 5, "total_bytes": 10, "disks": ["/dev/vdb"]}])
        );
    }

    #[test]
    fn small_answers_and_garbage() {
        let os = json!({"kernel-release": "6.1", "pretty-name": "Debian"});
        assert_eq!(
            answer(AgentVerb::OsInfo, None, os).unwrap(),
            json!({"kernel_release": "6.1", "pretty_name": "Debian"})
        );
        assert_eq!(
            answer(AgentVerb::FsFreeze, None, json!(2)).unwrap(),
            json!({"frozen": 2})
        );
        assert!(answer(AgentVerb::FsThaw, None, json!("x")).is_err());
        assert!(answer(AgentVerb::Interfaces, None, json!({})).is_err());
        let verb = AgentVerb::SetTime { time_ns: Some(42) };
        let (cmd, args) = command(verb);
        assert_eq!(
            (cmd, args.clone()),
            ("guest-set-time", Some(json!({"time": 42})))
        );
        assert_eq!(
            answer(verb, args.as_ref(), json!({})).unwrap(),
            json!({"time_ns": 42})
        );
        let (_, args) = command(AgentVerb::SetTime { time_ns: None });
        assert!(args.unwrap()["time"].as_i64().unwrap() > 1_600_000_000_000_000_000);
        let verb = AgentVerb::Shutdown {
            mode: GuestShutdownMode::Reboot,
        };
        assert_eq!(
            command(verb),
            ("guest-shutdown", Some(json!({"mode": "reboot"})))
        );
    }
}
