//! The balloon as clients see it ([`BalloonInfo`]): REST `GET /vm/balloon`, QMP `query-balloon`
//! and the QOM `guest-stats` property as libvirt reads them, HMP `info balloon`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

/// QEMU's names of the guest's statistics, in tag order (`guest-stats`'s `stats`).
pub const QEMU_STAT_NAMES: [&str; 16] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
    "stat-oom-kills",
    "stat-alloc-stalls",
    "stat-async-scans",
    "stat-direct-scans",
    "stat-async-reclaims",
    "stat-direct-reclaims",
];

/// What the balloon counted: work done, and the guest's mistakes (ignored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonCounters {
    /// 4 KiB pages the guest put in the balloon.
    pub inflated_pages: u64,
    /// 4 KiB pages it took back.
    pub deflated_pages: u64,
    /// Bytes of free memory the guest reported (and the host took back).
    pub reported_bytes: u64,
    /// Page numbers outside guest RAM.
    pub invalid_pages: u64,
    /// Pages put in twice, or taken out without being in.
    pub duplicate_pages: u64,
    /// Malformed requests.
    pub bad_requests: u64,
}

/// The balloon now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalloonInfo {
    /// The VM's memory, bytes.
    pub memory_bytes: u64,
    /// The RAM the guest is asked to keep, bytes.
    pub target_bytes: u64,
    /// The RAM the guest has, as its driver says (QEMU's `actual`), bytes.
    pub actual_bytes: u64,
    /// Seconds between two statistics requests (0: none).
    pub stats_interval_s: u32,
    /// The guest's statistics by QEMU's names (bytes or counts), those it sent.
    pub stats: BTreeMap<String, u64>,
    /// When they came, seconds since the Unix epoch (0: never).
    pub last_update: u64,
    /// What the balloon counted.
    pub counters: BalloonCounters,
}

impl BalloonInfo {
    /// QOM `guest-stats` as QEMU gives it: every statistic, 2^64-1 for one never received.
    pub fn qom_guest_stats(&self) -> Value {
        let stats: serde_json::Map<String, Value> = QEMU_STAT_NAMES
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    json!(self.stats.get(*n).copied().unwrap_or(u64::MAX)),
                )
            })
            .collect();
        json!({ "stats": stats, "last-update": self.last_update })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_stats_as_libvirt_reads_them() {
        let info = BalloonInfo {
            memory_bytes: 1 << 30,
            target_bytes: 1 << 29,
            actual_bytes: 1 << 29,
            stats_interval_s: 2,
            stats: [("stat-free-memory".to_string(), 4096u64)].into(),
            last_update: 1_700_000_000,
            counters: BalloonCounters::default(),
        };
        let v = info.qom_guest_stats();
        assert_eq!(v["last-update"], 1_700_000_000u64);
        assert_eq!(v["stats"]["stat-free-memory"], 4096);
        assert_eq!(v["stats"]["stat-swap-in"], u64::MAX);
        assert_eq!(v["stats"].as_object().unwrap().len(), 16);
    }
}
