//! virtio-balloon's own part of a snapshot: what identifies it (the memory size and the offered
//! features: a restore onto a balloon configured differently is refused), the target and the
//! driver's `actual`, the pages in the balloon (as runs of page numbers), the statistics and
//! their polling interval, and the statistics buffer the device holds.

use devices::persist::RestoreError;
use serde::{Deserialize, Serialize};

use super::{Balloon, GuestStats, NR_STATS};
use crate::device::VirtioDeviceState;

/// The saved state of a [`Balloon`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// The VM's memory in bytes.
    pub memory_bytes: u64,
    /// Features the device offered.
    pub avail_features: u64,
    /// The balloon's target, in 4 KiB pages (`num_pages`).
    pub target_pages: u32,
    /// The driver's `actual`, in 4 KiB pages.
    pub actual_pages: u32,
    /// Pages in the balloon: `(first page number, count)` runs.
    pub ballooned: Vec<(u64, u64)>,
    /// Seconds between statistics requests (0: none).
    pub stats_interval_s: u32,
    /// The statistics the guest last sent.
    pub stats: GuestStats,
    /// The head of the statistics buffer the device holds, if any.
    pub stats_head: Option<u16>,
}

impl Balloon {
    pub(super) fn balloon_state(&self) -> BalloonState {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in self.ballooned.iter().enumerate() {
            if word == 0 {
                continue;
            }
            for bit in 0..64 {
                if word & (1 << bit) == 0 {
                    continue;
                }
                let pfn = w as u64 * 64 + bit;
                match runs.last_mut() {
                    Some((start, n)) if *start + *n == pfn => *n += 1,
                    _ => runs.push((pfn, 1)),
                }
            }
        }
        BalloonState {
            memory_bytes: self.shared.memory_bytes(),
            avail_features: self.avail_features,
            target_pages: self.shared.target_pages(),
            actual_pages: self.shared.actual_pages(),
            ballooned: runs,
            stats_interval_s: self.shared.stats_interval(),
            stats: self.shared.stats(),
            stats_head: self.stats_head,
        }
    }

    /// Checks that `state` describes this balloon, then takes it.
    pub(super) fn apply_balloon_state(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), RestoreError> {
        let s = match state {
            VirtioDeviceState::Balloon(s) => s,
            other => {
                return Err(RestoreError::mismatch(format!(
                    "a {} device's state cannot be restored into a balloon",
                    other.kind()
                )))
            }
        };
        if s.memory_bytes != self.shared.memory_bytes() {
            return Err(RestoreError::mismatch(format!(
                "the balloon was saved for {} bytes of memory, this VM has {}",
                s.memory_bytes,
                self.shared.memory_bytes()
            )));
        }
        if s.avail_features != self.avail_features {
            return Err(RestoreError::mismatch(format!(
                "the balloon was saved with features {:#x}, this one offers {:#x}",
                s.avail_features, self.avail_features
            )));
        }
        let pages = self.ballooned.len() as u64 * 64;
        let mut total = 0u64;
        for &(start, n) in &s.ballooned {
            if start.checked_add(n).is_none_or(|end| end > pages) {
                return Err(RestoreError::invalid(
                    "ballooned",
                    format!("pages {start}+{n} lie outside guest memory"),
                ));
            }
            total += n;
        }
        if total > pages || s.stats.values.len() > NR_STATS {
            return Err(RestoreError::invalid(
                "ballooned",
                "more entries than the device keeps",
            ));
        }
        if u64::from(s.target_pages) > pages || u64::from(s.actual_pages) > pages {
            return Err(RestoreError::invalid(
                "target_pages",
                "a balloon larger than guest memory",
            ));
        }
        // Nothing below fails.
        self.ballooned.fill(0);
        for &(start, n) in &s.ballooned {
            for pfn in start..start + n {
                self.set_ballooned(pfn, true);
            }
        }
        self.shared.set_target_pages(s.target_pages);
        self.shared.set_actual_pages(s.actual_pages);
        self.shared.set_stats_interval(s.stats_interval_s);
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = s.stats.clone();
        self.stats_head = s.stats_head;
        Ok(())
    }
}
