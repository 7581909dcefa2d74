//! The VM's figures as an operator watches them: [`VmMetrics`] (`GET /vm/metrics`, `vmm ctl
//! metrics`), the same in Prometheus' text exposition format ([`VmMetrics::to_prometheus`],
//! `GET /metrics`), and the per-disk counters in QEMU's shape ([`BlockDeviceStats`],
//! `query-blockstats`, HMP `info blockstats`).
//!
//! The figure names and units are those operators of qemu-kvm fleets collect per VM:
//! percentages, MB (MiB), KB/s (KiB per second), requests per second, milliseconds per request.
//! A figure that cannot be had is `null`, and [`VmMetrics::unavailable`] says why.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// A disk's counters since the VMM started, with QEMU's `BlockDeviceStats` names (members
/// this VMM has no use for, zoned-device and merge counters, are there as 0, as QEMU reports
/// them for devices without them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockDeviceStats {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Bytes discarded.
    pub unmap_bytes: u64,
    /// Zone-append bytes (always 0: no zoned devices).
    pub zone_append_bytes: u64,
    /// Reads completed.
    pub rd_operations: u64,
    /// Writes completed.
    pub wr_operations: u64,
    /// Zone appends (always 0).
    pub zone_append_operations: u64,
    /// Flushes completed.
    pub flush_operations: u64,
    /// Discards completed.
    pub unmap_operations: u64,
    /// Summed read service time.
    pub rd_total_time_ns: u64,
    /// Summed write service time.
    pub wr_total_time_ns: u64,
    /// Summed zone-append time (always 0).
    pub zone_append_total_time_ns: u64,
    /// Summed flush service time.
    pub flush_total_time_ns: u64,
    /// Summed discard service time.
    pub unmap_total_time_ns: u64,
    /// The offset after the furthest byte written.
    pub wr_highest_offset: u64,
    /// Reads merged into others (always 0: requests are not merged).
    pub rd_merged: u64,
    /// Writes merged into others (always 0).
    pub wr_merged: u64,
    /// Zone appends merged (always 0).
    pub zone_append_merged: u64,
    /// Discards merged (always 0).
    pub unmap_merged: u64,
    /// Time since the last request ended; absent before the first, as in QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_time_ns: Option<u64>,
    /// Reads the backend failed.
    pub failed_rd_operations: u64,
    /// Writes the backend failed.
    pub failed_wr_operations: u64,
    /// Zone appends failed (always 0).
    pub failed_zone_append_operations: u64,
    /// Flushes the backend failed.
    pub failed_flush_operations: u64,
    /// Discards the backend failed.
    pub failed_unmap_operations: u64,
    /// Reads refused before reaching the backend.
    pub invalid_rd_operations: u64,
    /// Writes refused.
    pub invalid_wr_operations: u64,
    /// Zone appends refused (always 0).
    pub invalid_zone_append_operations: u64,
    /// Flushes refused.
    pub invalid_flush_operations: u64,
    /// Discards refused.
    pub invalid_unmap_operations: u64,
    /// Invalid operations are counted (always true).
    pub account_invalid: bool,
    /// Failed operations are counted (always true).
    pub account_failed: bool,
}

/// One disk's counters, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskStats {
    /// The disk's id.
    pub id: String,
    /// Its counters.
    pub stats: BlockDeviceStats,
}

/// A mounted filesystem as the guest agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Partition {
    /// Where it is mounted.
    pub mountpoint: String,
    /// The device (`vda`, `vdb1`, ...).
    pub device: String,
    /// Filesystem type.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Used MB.
    pub used_mb: f64,
    /// Size MB.
    pub total_mb: f64,
    /// Used, in percent of the size.
    pub usage_percent: f64,
}

/// One disk's rates over the interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskRates {
    /// The disk's id.
    pub id: String,
    /// Reads per second.
    pub read_requests: f64,
    /// Writes per second.
    pub write_requests: f64,
    /// KB read per second.
    pub read_rate: f64,
    /// KB written per second.
    pub write_rate: f64,
    /// Milliseconds per read (null without reads in the interval).
    pub read_delay: Option<f64>,
    /// Milliseconds per write (null without writes in the interval).
    pub write_delay: Option<f64>,
    /// The counters since the VMM started.
    pub counters: BlockDeviceStats,
}

/// One NIC's rates over the interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NicRates {
    /// The NIC's id.
    pub id: String,
    /// KB per second the guest received.
    pub receive: f64,
    /// KB per second the guest sent.
    pub transfer: f64,
    /// Bytes the guest received since the VMM started.
    pub rx_bytes: u64,
    /// Bytes the guest sent since the VMM started.
    pub tx_bytes: u64,
}

/// The VM's figures at one instant; rates cover the `interval_s` seconds before it.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct VmMetrics {
    /// When the figures were taken (seconds since the Unix epoch).
    pub timestamp: f64,
    /// The seconds the rates cover (between the VMM's previous sample and now).
    pub interval_s: f64,
    /// vCPU time over wall time, in percent of all vCPUs (host-measured).
    #[serde(rename = "cpuUsage")]
    pub cpu_usage: Option<f64>,
    /// Memory the guest uses, MB (MemTotal - MemAvailable; from the agent).
    #[serde(rename = "memUsage")]
    pub mem_usage: Option<f64>,
    /// Memory used in percent of the guest's total (from the agent).
    #[serde(rename = "memUsageRate")]
    pub mem_usage_rate: Option<f64>,
    /// The guest's 5-minute load average (from the agent).
    pub loadavg_5: Option<f64>,
    /// KB/s received by the guest, all NICs (host-measured).
    #[serde(rename = "networkReceive")]
    pub network_receive: Option<f64>,
    /// KB/s sent by the guest, all NICs (host-measured).
    #[serde(rename = "networkTransfer")]
    pub network_transfer: Option<f64>,
    /// MB used on the guest's mounted disk filesystems (from the agent).
    #[serde(rename = "diskUsage")]
    pub disk_usage: Option<f64>,
    /// Every mounted disk filesystem with its usage (from the agent).
    #[serde(rename = "diskPartition")]
    pub disk_partition: Option<Vec<Partition>>,
    /// Reads per second, all disks (host-measured).
    #[serde(rename = "diskReadRequest")]
    pub disk_read_request: Option<f64>,
    /// Writes per second, all disks.
    #[serde(rename = "diskWriteRequest")]
    pub disk_write_request: Option<f64>,
    /// KB/s read, all disks.
    #[serde(rename = "diskReadRate")]
    pub disk_read_rate: Option<f64>,
    /// KB/s written, all disks.
    #[serde(rename = "diskWriteRate")]
    pub disk_write_rate: Option<f64>,
    /// Milliseconds per read, all disks.
    #[serde(rename = "diskReadDelay")]
    pub disk_read_delay: Option<f64>,
    /// Milliseconds per write, all disks.
    #[serde(rename = "diskWriteDelay")]
    pub disk_write_delay: Option<f64>,
    /// Why each null figure is null, by figure name.
    pub unavailable: BTreeMap<String, String>,
    /// Per-disk rates and counters.
    pub disks: Vec<DiskRates>,
    /// Per-NIC rates.
    pub nics: Vec<NicRates>,
}

impl VmMetrics {
    /// Marks `figure` unavailable for `reason`.
    pub fn unavailable(&mut self, figure: &str, reason: impl Into<String>) {
        self.unavailable.insert(figure.to_string(), reason.into());
    }

    /// The figures in Prometheus' text exposition format (version 0.0.4). Unavailable figures
    /// are left out, and listed in `vmm_metric_unavailable` with their reason.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let gauges: [(&str, &str, Option<f64>); 14] = [
            (
                "vmm_cpu_usage_percent",
                "vCPU time over wall time, percent of all vCPUs",
                self.cpu_usage,
            ),
            (
                "vmm_memory_used_megabytes",
                "Memory the guest uses, MB (memUsage)",
                self.mem_usage,
            ),
            (
                "vmm_memory_used_percent",
                "Memory used, percent (memUsageRate)",
                self.mem_usage_rate,
            ),
            (
                "vmm_load5",
                "The guest's 5-minute load average (loadavg_5)",
                self.loadavg_5,
            ),
            (
                "vmm_network_receive_kilobytes_per_second",
                "KB/s received by the guest (networkReceive)",
                self.network_receive,
            ),
            (
                "vmm_network_transmit_kilobytes_per_second",
                "KB/s sent by the guest (networkTransfer)",
                self.network_transfer,
            ),
            (
                "vmm_disk_used_megabytes",
                "MB used on the guest's disk filesystems (diskUsage)",
                self.disk_usage,
            ),
            (
                "vmm_disk_read_requests_per_second",
                "Reads per second (diskReadRequest)",
                self.disk_read_request,
            ),
            (
                "vmm_disk_write_requests_per_second",
                "Writes per second (diskWriteRequest)",
                self.disk_write_request,
            ),
            (
                "vmm_disk_read_kilobytes_per_second",
                "KB/s read (diskReadRate)",
                self.disk_read_rate,
            ),
            (
                "vmm_disk_write_kilobytes_per_second",
                "KB/s written (diskWriteRate)",
                self.disk_write_rate,
            ),
            (
                "vmm_disk_read_delay_milliseconds",
                "Milliseconds per read (diskReadDelay)",
                self.disk_read_delay,
            ),
            (
                "vmm_disk_write_delay_milliseconds",
                "Milliseconds per write (diskWriteDelay)",
                self.disk_write_delay,
            ),
            (
                "vmm_metrics_interval_seconds",
                "Seconds the rates cover",
                Some(self.interval_s),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                header(&mut out, name, help, "gauge");
                let _ = writeln!(out, "{name} {}", number(v));
            }
        }
        if let Some(parts) = &self.disk_partition {
            for (name, help, get) in [
                (
                    "vmm_partition_used_megabytes",
                    "MB used per mounted filesystem (diskPartition)",
                    (|p: &Partition| p.used_mb) as fn(&Partition) -> f64,
                ),
                (
                    "vmm_partition_size_megabytes",
                    "Size in MB per mounted filesystem",
                    |p: &Partition| p.total_mb,
                ),
            ] {
                header(&mut out, name, help, "gauge");
                for p in parts {
                    let _ = writeln!(
                        out,
                        "{name}{{mountpoint=\"{}\",device=\"{}\",type=\"{}\"}} {}",
                        label(&p.mountpoint),
                        label(&p.device),
                        label(&p.fs_type),
                        number(get(p))
                    );
                }
            }
        }
        let disk_counters: [Series<BlockDeviceStats>; 6] = [
            ("vmm_disk_read_bytes_total", "Bytes read", |s| s.rd_bytes),
            ("vmm_disk_written_bytes_total", "Bytes written", |s| {
                s.wr_bytes
            }),
            ("vmm_disk_reads_total", "Reads completed", |s| {
                s.rd_operations
            }),
            ("vmm_disk_writes_total", "Writes completed", |s| {
                s.wr_operations
            }),
            ("vmm_disk_flushes_total", "Flushes completed", |s| {
                s.flush_operations
            }),
            (
                "vmm_disk_failed_operations_total",
                "Requests the backend failed",
                |s| {
                    s.failed_rd_operations
                        + s.failed_wr_operations
                        + s.failed_flush_operations
                        + s.failed_unmap_operations
                },
            ),
        ];
        if !self.disks.is_empty() {
            for (name, help, get) in disk_counters {
                header(&mut out, name, help, "counter");
                for d in &self.disks {
                    let _ = writeln!(
                        out,
                        "{name}{{disk=\"{}\"}} {}",
                        label(&d.id),
                        get(&d.counters)
                    );
                }
            }
        }
        if !self.nics.is_empty() {
            let nic_counters: [Series<NicRates>; 2] = [
                (
                    "vmm_nic_receive_bytes_total",
                    "Bytes the guest received",
                    |n| n.rx_bytes,
                ),
                (
                    "vmm_nic_transmit_bytes_total",
                    "Bytes the guest sent",
                    |n| n.tx_bytes,
                ),
            ];
            for (name, help, get) in nic_counters {
                header(&mut out, name, help, "counter");
                for n in &self.nics {
                    let _ = writeln!(out, "{name}{{nic=\"{}\"}} {}", label(&n.id), get(n));
                }
            }
        }
        if !self.unavailable.is_empty() {
            let name = "vmm_metric_unavailable";
            header(
                &mut out,
                name,
                "A figure that could not be had, with the reason",
                "gauge",
            );
            for (figure, reason) in &self.unavailable {
                let _ = writeln!(
                    out,
                    "{name}{{figure=\"{}\",reason=\"{}\"}} 1",
                    label(figure),
                    label(reason)
                );
            }
        }
        out
    }
}

/// A counter family: name, help, and how to read it from one device.
type Series<T> = (&'static str, &'static str, fn(&T) -> u64);

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped, as the format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value: finite numbers as they are, the rest as the format spells them.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_the_operators_names_and_null_with_a_reason() {
        let mut m = VmMetrics {
            cpu_usage: Some(12.5),
            disk_write_rate: Some(1024.0),
            ..Default::default()
        };
        m.unavailable("memUsage", "the guest agent is not connected");
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["cpuUsage"], 12.5);
        assert_eq!(v["diskWriteRate"], 1024.0);
        assert!(v["memUsage"].is_null() && v["loadavg_5"].is_null());
        assert_eq!(
            v["unavailable"]["memUsage"],
            "the guest agent is not connected"
        );
    }

    #[test]
    fn prometheus_text_leaves_out_what_is_unknown_and_escapes_labels() {
        let mut m = VmMetrics {
            cpu_usage: Some(99.0),
            disk_partition: Some(vec![Partition {
                mountpoint: "/mnt/\"x\"".into(),
                device: "vdb".into(),
                fs_type: "ext4".into(),
                used_mb: 1.5,
                total_mb: 10.0,
                usage_percent: 15.0,
            }]),
            disks: vec![DiskRates {
                id: "disk0".into(),
                read_requests: 0.0,
                write_requests: 0.0,
                read_rate: 0.0,
                write_rate: 0.0,
                read_delay: None,
                write_delay: None,
                counters: BlockDeviceStats {
                    wr_bytes: 4096,
                    ..Default::default()
                },
            }],
            ..Default::default()
        };
        m.unavailable("loadavg_5", "agent said \"no\"\nthen left");
        let text = m.to_prometheus();
        assert!(text.contains("# TYPE vmm_cpu_usage_percent gauge\nvmm_cpu_usage_percent 99\n"));
        assert!(!text.contains("vmm_load5 "));
        assert!(text.contains("vmm_partition_used_megabytes{mountpoint=\"/mnt/\\\"x\\\"\""));
        assert!(text.contains("vmm_disk_written_bytes_total{disk=\"disk0\"} 4096\n"));
        assert!(text.contains("reason=\"agent said \\\"no\\\"\\nthen left\"} 1\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
