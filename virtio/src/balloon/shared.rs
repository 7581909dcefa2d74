//! What the control plane holds of a balloon ([`BalloonShared`]): the target, the size the
//! driver reports, the statistics and their polling interval, and what the device counted of
//! the guest's mistakes. It outlives the device (a VM reset keeps the target, as QEMU does).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::PAGE_SIZE;
use crate::device::{VirtioInterrupt, VirtioInterruptType};

/// The statistics' tags this VMM knows (Linux 6.12 sends 16: swap in and out, major and minor
/// faults, free, total and available memory, disk caches, huge page allocations and failures,
/// OOM kills, allocation stalls, async and direct scans and reclaims); a newer guest's are
/// ignored.
pub const NR_STATS: usize = 16;

/// The statistics the guest last sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// By tag (at most [`NR_STATS`]); None for a tag the guest did not send.
    pub values: Vec<Option<u64>>,
    /// When they came (seconds since the Unix epoch; 0: never).
    pub last_update: u64,
}

impl GuestStats {
    /// The value of the statistic with this tag, if the guest sent it.
    pub fn get(&self, tag: usize) -> Option<u64> {
        self.values.get(tag).copied().flatten()
    }
}

/// What the device counted: work done, and the guest's mistakes (ignored).
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// 4 KiB pages put in the balloon.
    pub inflated_pages: AtomicU64,
    /// 4 KiB pages taken out of it.
    pub deflated_pages: AtomicU64,
    /// Bytes of free memory the guest reported (and the host took back).
    pub reported_bytes: AtomicU64,
    /// Page numbers outside guest RAM.
    pub invalid_pages: AtomicU64,
    /// Pages put in twice, or taken out without being in.
    pub duplicate_pages: AtomicU64,
    /// Requests too short, too long or malformed.
    pub bad_requests: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonCountersSnapshot {
    /// 4 KiB pages put in the balloon.
    pub inflated_pages: u64,
    /// 4 KiB pages taken out of it.
    pub deflated_pages: u64,
    /// Bytes of free memory the guest reported.
    pub reported_bytes: u64,
    /// Page numbers outside guest RAM (ignored).
    pub invalid_pages: u64,
    /// Pages put in twice or taken out without being in (ignored).
    pub duplicate_pages: u64,
    /// Malformed requests (ignored).
    pub bad_requests: u64,
}

/// Called with the balloon's new `actual` (the guest's RAM size in bytes, as QEMU's
/// BALLOON_CHANGE says it), at most once a second.
pub type ChangeListener = Box<dyn Fn(u64) + Send + Sync>;

/// The balloon as the control plane sees it.
pub struct BalloonShared {
    memory_bytes: u64,
    /// The balloon's target size in 4 KiB pages (`num_pages`).
    target_pages: AtomicU32,
    /// The size the driver says it has (`actual`), in 4 KiB pages.
    actual_pages: AtomicU32,
    stats_interval_s: AtomicU32,
    pub(super) stats: Mutex<GuestStats>,
    /// Written when the target or the interval changes: the device acts on it.
    pub(super) wake: EventFd,
    pub(super) interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    pub(super) listener: Mutex<Option<ChangeListener>>,
    /// The counters.
    pub counters: BalloonCounters,
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Zero (QEMU: "Parameter 'value' expects a size").
    #[error("the target must be a size above zero")]
    Zero,
    /// More than the VM has.
    #[error("the target ({target} bytes) is more than the VM's memory ({memory} bytes)")]
    TooLarge {
        /// The target asked for.
        target: u64,
        /// The VM's memory.
        memory: u64,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BalloonShared {
    /// A balloon for a VM of `memory_bytes`, empty, polling statistics every
    /// `stats_interval_s` seconds (0: not).
    pub fn new(memory_bytes: u64, stats_interval_s: u32) -> std::io::Result<Arc<BalloonShared>> {
        Ok(Arc::new(BalloonShared {
            memory_bytes,
            target_pages: AtomicU32::new(0),
            actual_pages: AtomicU32::new(0),
            stats_interval_s: AtomicU32::new(stats_interval_s),
            stats: Mutex::new(GuestStats::default()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            interrupt: Mutex::new(None),
            listener: Mutex::new(None),
            counters: BalloonCounters::default(),
        }))
    }

    /// The VM's memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Asks the guest to keep `target` bytes of RAM: the balloon's target becomes the rest
    /// (QMP `balloon`). The driver hears of it through a configuration interrupt.
    pub fn set_target(&self, target: u64) -> Result<(), TargetError> {
        if target == 0 {
            return Err(TargetError::Zero);
        }
        if target > self.memory_bytes {
            return Err(TargetError::TooLarge {
                target,
                memory: self.memory_bytes,
            });
        }
        let pages = (self.memory_bytes - target) / PAGE_SIZE;
        self.target_pages
            .store(u32::try_from(pages).unwrap_or(u32::MAX), Ordering::SeqCst);
        if let Some(irq) = lock(&self.interrupt).as_ref() {
            if let Err(e) = irq.trigger(VirtioInterruptType::Config) {
                log::warn!("virtio-balloon: config interrupt failed: {e}");
            }
        }
        Ok(())
    }

    /// The RAM the guest is asked to keep, in bytes.
    pub fn target(&self) -> u64 {
        self.memory_bytes
            .saturating_sub(u64::from(self.target_pages.load(Ordering::SeqCst)) * PAGE_SIZE)
    }

    /// The RAM the guest has, as its driver says (QMP `query-balloon`'s `actual`).
    pub fn actual(&self) -> u64 {
        self.memory_bytes
            .saturating_sub(u64::from(self.actual_pages.load(Ordering::SeqCst)) * PAGE_SIZE)
    }

    pub(super) fn target_pages(&self) -> u32 {
        self.target_pages.load(Ordering::SeqCst)
    }

    pub(super) fn set_target_pages(&self, pages: u32) {
        self.target_pages.store(pages, Ordering::SeqCst);
    }

    pub(super) fn actual_pages(&self) -> u32 {
        self.actual_pages.load(Ordering::SeqCst)
    }

    /// Records the driver's `actual`; true when it changed.
    pub(super) fn set_actual_pages(&self, pages: u32) -> bool {
        self.actual_pages.swap(pages, Ordering::SeqCst) != pages
    }

    /// Seconds between two statistics requests (0: none).
    pub fn stats_interval(&self) -> u32 {
        self.stats_interval_s.load(Ordering::SeqCst)
    }

    /// Changes the statistics' polling interval (QOM `guest-stats-polling-interval`).
    pub fn set_stats_interval(&self, seconds: u32) {
        self.stats_interval_s.store(seconds, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// The statistics the guest last sent.
    pub fn stats(&self) -> GuestStats {
        lock(&self.stats).clone()
    }

    /// Who hears of `actual` changing.
    pub fn set_listener(&self, listener: ChangeListener) {
        *lock(&self.listener) = Some(listener);
    }

    pub(super) fn notify_change(&self) {
        let actual = self.actual();
        if let Some(l) = lock(&self.listener).as_ref() {
            l(actual);
        }
    }

    /// The counters now.
    pub fn counters(&self) -> BalloonCountersSnapshot {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BalloonCountersSnapshot {
            inflated_pages: g(&c.inflated_pages),
            deflated_pages: g(&c.deflated_pages),
            reported_bytes: g(&c.reported_bytes),
            invalid_pages: g(&c.invalid_pages),
            duplicate_pages: g(&c.duplicate_pages),
            bad_requests: g(&c.bad_requests),
        }
    }
}
