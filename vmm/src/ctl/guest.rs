//! `vmm ctl`'s tables for the guest: the metrics, and the typed agent operations' answers,
//! laid out as virsh lays out `domifaddr`, `domfsinfo` and `guestinfo`.

use serde_json::Value;

use super::CtlCommand;

/// The text to print for `cmd`'s answer `v`, or None when the answer is printed as JSON.
pub(super) fn table(cmd: &CtlCommand, v: &Value) -> Option<String> {
    Some(match cmd {
        CtlCommand::Metrics { json: false, .. } => metrics(v),
        CtlCommand::Domifaddr => interfaces(v),
        CtlCommand::Fsinfo => filesystems(v),
        CtlCommand::Osinfo => osinfo(v),
        CtlCommand::Fsfreeze => format!("Froze {} filesystem(s)", v["frozen"]),
        CtlCommand::Fsthaw => format!("Thawed {} filesystem(s)", v["thawed"]),
        CtlCommand::SetTime { .. } => format!("Guest clock set to {} ns", v["time_ns"]),
        CtlCommand::Balloon { json: false, .. } => balloon(v),
        _ => return None,
    })
}

/// One figure: its value with the unit, or `n/a (reason)`.
fn figure(v: &Value, name: &str, unit: &str) -> String {
    match v.get(name).and_then(Value::as_f64) {
        Some(x) => format!("{x:.2} {unit}").trim_end().to_string(),
        None => {
            let why = v["unavailable"][name].as_str().unwrap_or("unknown");
            format!("n/a ({why})")
        }
    }
}

fn metrics(v: &Value) -> String {
    let rows = [
        ("cpuUsage", "%"),
        ("memUsage", "MB"),
        ("memUsageRate", "%"),
        ("loadavg_5", ""),
        ("networkReceive", "KB/s"),
        ("networkTransfer", "KB/s"),
        ("diskUsage", "MB"),
        ("diskReadRequest", "req/s"),
        ("diskWriteRequest", "req/s"),
        ("diskReadRate", "KB/s"),
        ("diskWriteRate", "KB/s"),
        ("diskReadDelay", "ms"),
        ("diskWriteDelay", "ms"),
    ];
    let mut out = format!("{:<18} {}\n", "Interval", figure(v, "interval_s", "s"));
    for (name, unit) in rows {
        out.push_str(&format!("{name:<18} {}\n", figure(v, name, unit)));
    }
    match v["diskPartition"].as_array() {
        Some(parts) if !parts.is_empty() => {
            out.push_str(&format!(
                "\n{:<20} {:<10} {:<8} {:>10} {:>10} {:>6}\n{}",
                "Mountpoint",
                "Device",
                "Type",
                "Used MB",
                "Size MB",
                "Use%",
                "-".repeat(69)
            ));
            for p in parts {
                out.push_str(&format!(
                    "\n{:<20} {:<10} {:<8} {:>10.1} {:>10.1} {:>5.1}%",
                    p["mountpoint"].as_str().unwrap_or("-"),
                    p["device"].as_str().unwrap_or("-"),
                    p["type"].as_str().unwrap_or("-"),
                    p["used_mb"].as_f64().unwrap_or(0.0),
                    p["total_mb"].as_f64().unwrap_or(0.0),
                    p["usage_percent"].as_f64().unwrap_or(0.0),
                ));
            }
        }
        _ => {
            out.pop();
        }
    }
    out
}

fn interfaces(v: &Value) -> String {
    let mut out = format!(
        " {:<10} {:<20} {:<12} {}\n{}",
        "Name",
        "MAC address",
        "Protocol",
        "Address",
        "-".repeat(79)
    );
    for i in v.as_array().into_iter().flatten() {
        let name = i["name"].as_str().unwrap_or("-");
        let mac = i["mac"].as_str().unwrap_or("-");
        let addrs = i["addresses"].as_array().cloned().unwrap_or_default();
        if addrs.is_empty() {
            out.push_str(&format!("\n {name:<10} {mac:<20} {:<12} -", "N/A"));
        }
        // virsh names the interface on its first line only.
        for (n, a) in addrs.iter().enumerate() {
            let (name, mac) = if n == 0 { (name, mac) } else { ("-", "-") };
            out.push_str(&format!(
                "\n {name:<10} {mac:<20} {:<12} {}/{}",
                a["type"].as_str().unwrap_or("-"),
                a["address"].as_str().unwrap_or("-"),
                a["prefix"],
            ));
        }
    }
    out
}

fn filesystems(v: &Value) -> String {
    let mut out = format!(
        " {:<20} {:<8} {:<8} {:<14} {:>14} {:>14}\n{}",
        "Mountpoint",
        "Name",
        "Type",
        "Target",
        "Used bytes",
        "Total bytes",
        "-".repeat(84)
    );
    for f in v.as_array().into_iter().flatten() {
        let bytes = |k: &str| f[k].as_u64().map_or("-".to_string(), |b| b.to_string());
        let disks: Vec<&str> = f["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out.push_str(&format!(
            "\n {:<20} {:<8} {:<8} {:<14} {:>14} {:>14}",
            f["mountpoint"].as_str().unwrap_or("-"),
            f["device"].as_str().unwrap_or("-"),
            f["type"].as_str().unwrap_or("-"),
            if disks.is_empty() {
                "-".to_string()
            } else {
                disks.join(",")
            },
            bytes("used_bytes"),
            bytes("total_bytes"),
        ));
    }
    out
}

/// The balloon, as `info balloon` and `virsh dommemstat` show it (MiB).
fn balloon(v: &Value) -> String {
    let mib = |k: &str| {
        v[k].as_u64()
            .map_or("-".to_string(), |b| format!("{} MiB", b >> 20))
    };
    let mut out = format!(
        "{:<24} {}\n{:<24} {}\n{:<24} {}\n{:<24} {}",
        "Memory",
        mib("memory_bytes"),
        "Target",
        mib("target_bytes"),
        "Actual",
        mib("actual_bytes"),
        "Statistics every",
        match v["stats_interval_s"].as_u64() {
            Some(0) | None => "never".to_string(),
            Some(s) => format!("{s} s"),
        },
    );
    if let Some(stats) = v["stats"].as_object() {
        for (name, value) in stats {
            let value = value.as_u64().unwrap_or(0);
            // Sizes in MiB; counts as they are.
            let text =
                if name.ends_with("memory") || name.ends_with("caches") || name.contains("swap") {
                    format!("{:.1} MiB", value as f64 / 1048576.0)
                } else {
                    value.to_string()
                };
            out.push_str(&format!("\n{name:<24} {text}"));
        }
    }
    out
}

/// `os.KEY : VALUE` lines, as `virsh guestinfo --os`.
fn osinfo(v: &Value) -> String {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, val)| {
            let text = val.as_str().map_or_else(|| val.to_string(), str::to_string);
            format!("os.{k:<16}: {text}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_read_like_virsh() {
        let ifaces = json!([{"name": "eth0", "mac": "52:54:00:00:00:01", "addresses": [
            {"type": "ipv4", "address": "10.0.0.2", "prefix": 24},
            {"type": "ipv6", "address": "fe80::1", "prefix": 64}]}]);
        let t = table(&CtlCommand::Domifaddr, &ifaces).unwrap();
        assert!(
            t.contains("eth0       52:54:00:00:00:01    ipv4         10.0.0.2/24"),
            "{t}"
        );
        assert!(
            t.contains(" -          -                    ipv6         fe80::1/64"),
            "{t}"
        );
        let fs = json!([{"mountpoint": "/mnt", "device": "vdb", "type": "ext4",
            "used_bytes": 1024, "total_bytes": null, "disks": ["/dev/vdb"]}]);
        let t = table(&CtlCommand::Fsinfo, &fs).unwrap();
        assert!(
            t.contains("/mnt") && t.contains("/dev/vdb") && t.contains("1024"),
            "{t}"
        );
        let m = json!({"interval_s": 5.0, "cpuUsage": 12.345, "memUsage": null,
            "unavailable": {"memUsage": "the guest agent is not connected"},
            "diskPartition": null});
        let t = table(
            &CtlCommand::Metrics {
                json: false,
                prometheus: false,
            },
            &m,
        )
        .unwrap();
        assert!(t.contains("cpuUsage           12.35 %"), "{t}");
        assert!(
            t.contains("memUsage           n/a (the guest agent is not connected)"),
            "{t}"
        );
        assert!(table(
            &CtlCommand::Metrics {
                json: true,
                prometheus: false
            },
            &m
        )
        .is_none());
        let t = table(
            &CtlCommand::Osinfo,
            &json!({"id": "debian", "kernel_release": "6.1"}),
        );
        assert_eq!(
            t.unwrap(),
            "os.id              : debian\nos.kernel_release  : 6.1"
        );
    }
}
