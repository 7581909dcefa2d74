//! Per-disk I/O accounting, kept the way QEMU's block layer keeps it (`BlockDeviceStats` in
//! qapi/block-core.json): operations, bytes and summed service times per request kind, failed
//! (the backend said no) and invalid (the request was refused before reaching the backend)
//! operations, the highest offset written and the time of the last request.
//!
//! The counters are atomics behind an `Arc` shared between the request executor (which only
//! adds) and the control plane (which only reads), so reading them never takes the device lock
//! and never waits on a disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The kinds of request QEMU accounts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// IN.
    Read,
    /// OUT and WRITE_ZEROES (QEMU accounts write-zeroes as writes).
    Write,
    /// FLUSH.
    Flush,
    /// DISCARD (QEMU's "unmap").
    Discard,
}

/// One kind's counters.
#[derive(Debug, Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// A disk's counters since the VMM process started.
#[derive(Debug)]
pub struct BlockStats {
    kinds: [KindCounters; 4],
    wr_highest_offset: AtomicU64,
    /// Nanoseconds from `epoch` to the end of the last request, plus one (0: none yet).
    last_ns: AtomicU64,
    epoch: Instant,
}

impl Default for BlockStats {
    fn default() -> Self {
        BlockStats {
            kinds: Default::default(),
            wr_highest_offset: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// How a request ended, for the accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOutcome {
    /// Done: `bytes` moved (or discarded).
    Done {
        /// Payload bytes.
        bytes: u64,
    },
    /// The backend failed it.
    Failed,
    /// Refused before it reached the backend (out of range, badly shaped, read-only).
    Invalid,
}

/// A copy of the counters at one instant, in QEMU's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStatsSnapshot {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written (write-zeroes included).
    pub wr_bytes: u64,
    /// Bytes discarded.
    pub unmap_bytes: u64,
    /// Reads completed.
    pub rd_operations: u64,
    /// Writes completed.
    pub wr_operations: u64,
    /// Flushes completed.
    pub flush_operations: u64,
    /// Discards completed.
    pub unmap_operations: u64,
    /// Summed service time of the reads.
    pub rd_total_time_ns: u64,
    /// Summed service time of the writes.
    pub wr_total_time_ns: u64,
    /// Summed service time of the flushes.
    pub flush_total_time_ns: u64,
    /// Summed service time of the discards.
    pub unmap_total_time_ns: u64,
    /// Reads the backend failed.
    pub failed_rd_operations: u64,
    /// Writes the backend failed.
    pub failed_wr_operations: u64,
    /// Flushes the backend failed.
    pub failed_flush_operations: u64,
    /// Discards the backend failed.
    pub failed_unmap_operations: u64,
    /// Reads refused.
    pub invalid_rd_operations: u64,
    /// Writes refused.
    pub invalid_wr_operations: u64,
    /// Flushes refused.
    pub invalid_flush_operations: u64,
    /// Discards refused.
    pub invalid_unmap_operations: u64,
    /// The end of the furthest write, in bytes.
    pub wr_highest_offset: u64,
    /// Time since the last request ended (None before the first).
    pub idle_time_ns: Option<u64>,
}

impl BlockStats {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts one request of `kind` that took `took` and ended as `outcome`; `end` is the
    /// byte offset just past a write, for `wr_highest_offset`.
    pub fn account(&self, kind: IoKind, outcome: IoOutcome, took: Duration, end: Option<u64>) {
        let k = &self.kinds[kind as usize];
        match outcome {
            IoOutcome::Done { bytes } => {
                k.ops.fetch_add(1, Ordering::Relaxed);
                k.bytes.fetch_add(bytes, Ordering::Relaxed);
                let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
                k.time_ns.fetch_add(ns, Ordering::Relaxed);
                if let (IoKind::Write, Some(end)) = (kind, end) {
                    self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
                }
            }
            IoOutcome::Failed => {
                k.failed.fetch_add(1, Ordering::Relaxed);
            }
            IoOutcome::Invalid => {
                k.invalid.fetch_add(1, Ordering::Relaxed);
            }
        }
        let since = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_ns.store(since + 1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> BlockStatsSnapshot {
        let get = |kind: IoKind| {
            let k = &self.kinds[kind as usize];
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            (
                l(&k.ops),
                l(&k.bytes),
                l(&k.time_ns),
                l(&k.failed),
                l(&k.invalid),
            )
        };
        let (rd_ops, rd_bytes, rd_ns, rd_failed, rd_invalid) = get(IoKind::Read);
        let (wr_ops, wr_bytes, wr_ns, wr_failed, wr_invalid) = get(IoKind::Write);
        let (fl_ops, _, fl_ns, fl_failed, fl_invalid) = get(IoKind::Flush);
        let (un_ops, un_bytes, un_ns, un_failed, un_invalid) = get(IoKind::Discard);
        let last = self.last_ns.load(Ordering::Relaxed);
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        BlockStatsSnapshot {
            rd_bytes,
            wr_bytes,
            unmap_bytes: un_bytes,
            rd_operations: rd_ops,
            wr_operations: wr_ops,
            flush_operations: fl_ops,
            unmap_operations: un_ops,
            rd_total_time_ns: rd_ns,
            wr_total_time_ns: wr_ns,
            flush_total_time_ns: fl_ns,
            unmap_total_time_ns: un_ns,
            failed_rd_operations: rd_failed,
            failed_wr_operations: wr_failed,
            failed_flush_operations: fl_failed,
            failed_unmap_operations: un_failed,
            invalid_rd_operations: rd_invalid,
            invalid_wr_operations: wr_invalid,
            invalid_flush_operations: fl_invalid,
            invalid_unmap_operations: un_invalid,
            wr_highest_offset: self.wr_highest_offset.load(Ordering::Relaxed),
            idle_time_ns: (last > 0).then(|| now.saturating_sub(last - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_kind_and_outcome_apart() {
        let s = BlockStats::new();
        assert_eq!(s.snapshot().idle_time_ns, None);
        let ms = Duration::from_millis(1);
        s.account(IoKind::Read, IoOutcome::Done { bytes: 4096 }, ms, None);
        s.account(
            IoKind::Write,
            IoOutcome::Done { bytes: 512 },
            ms * 2,
            Some(1024),
        );
        s.account(IoKind::Write, IoOutcome::Done { bytes: 512 }, ms, Some(512));
        s.account(IoKind::Write, IoOutcome::Failed, ms, Some(1 << 30));
        s.account(IoKind::Flush, IoOutcome::Invalid, ms, None);
        s.account(IoKind::Discard, IoOutcome::Done { bytes: 8192 }, ms, None);
        let v = s.snapshot();
        assert_eq!(
            (v.rd_operations, v.rd_bytes, v.rd_total_time_ns),
            (1, 4096, 1_000_000)
        );
        assert_eq!(
            (v.wr_operations, v.wr_bytes, v.wr_total_time_ns),
            (2, 1024, 3_000_000)
        );
        assert_eq!((v.failed_wr_operations, v.invalid_flush_operations), (1, 1));
        assert_eq!(
            (v.flush_operations, v.unmap_operations, v.unmap_bytes),
            (0, 1, 8192)
        );
        // A failed write does not move the high-water mark.
        assert_eq!(v.wr_highest_offset, 1024);
        assert!(v.idle_time_ns.is_some());
    }
}
