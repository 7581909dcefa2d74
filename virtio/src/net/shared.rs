//! What outlives one virtio-net device and is shared with the rest of the VMM: the NIC's
//! counters, its rate limits and link state, and the interrupt object the link change signals
//! through ([`NetShared`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devices::rate_limiter::BucketConfig;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{feature, VirtioInterrupt, VirtioInterruptType};

/// Per-NIC counters, updated by the data path and read by metrics and the API.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Bytes delivered to the guest (frames, without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Frames from the tap that were dropped (link down, malformed receive chains).
    pub rx_dropped: AtomicU64,
    /// Failed reads from the tap.
    pub rx_errors: AtomicU64,
    /// Bytes the guest sent (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Frames the guest sent.
    pub tx_packets: AtomicU64,
    /// Guest frames dropped (link down, tap down, malformed chains).
    pub tx_dropped: AtomicU64,
    /// Frames the tap refused.
    pub tx_errors: AtomicU64,
}

impl NetCounters {
    /// Adds `n` to one counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> NetStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_bytes: g(&self.rx_bytes),
            rx_packets: g(&self.rx_packets),
            rx_dropped: g(&self.rx_dropped),
            rx_errors: g(&self.rx_errors),
            tx_bytes: g(&self.tx_bytes),
            tx_packets: g(&self.tx_packets),
            tx_dropped: g(&self.tx_dropped),
            tx_errors: g(&self.tx_errors),
        }
    }
}

/// A copy of a NIC's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Frames for the guest that were dropped.
    pub rx_dropped: u64,
    /// Failed reads from the tap.
    pub rx_errors: u64,
    /// Bytes the guest sent.
    pub tx_bytes: u64,
    /// Frames the guest sent.
    pub tx_packets: u64,
    /// Guest frames dropped.
    pub tx_dropped: u64,
    /// Guest frames the tap refused.
    pub tx_errors: u64,
}

/// One direction's rate limit: a bytes bucket and a frames bucket (either may be absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionLimit {
    /// Bytes per refill time.
    pub bandwidth: Option<BucketConfig>,
    /// Frames per refill time.
    pub ops: Option<BucketConfig>,
}

/// A NIC's rate limits; rx is towards the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetRateLimits {
    /// Frames delivered to the guest.
    pub rx: DirectionLimit,
    /// Frames the guest sends.
    pub tx: DirectionLimit,
}

/// What the VMM holds on to while the device lives inside its transport.
pub struct NetShared {
    pub(super) limits: Mutex<(u64, NetRateLimits)>,
    /// Written when the limits change: the device takes them at once.
    pub(super) wake: EventFd,
    pub(super) link_up: AtomicBool,
    pub(super) announce: AtomicBool,
    pub(super) acked: AtomicU64,
    pub(super) interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    /// The counters.
    pub counters: NetCounters,
}

impl Default for NetShared {
    fn default() -> Self {
        NetShared::new()
    }
}

impl NetShared {
    /// Link up, no driver, counters at zero.
    pub fn new() -> Self {
        NetShared {
            limits: Mutex::new((0, NetRateLimits::default())),
            // EFD_NONBLOCK: a spurious wakeup reads nothing. Creating an eventfd only fails
            // when the process is out of fds, and then nothing else works either.
            wake: EventFd::new(libc::EFD_NONBLOCK).expect("cannot create an eventfd"),
            link_up: AtomicBool::new(true),
            announce: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            interrupt: Mutex::new(None),
            counters: NetCounters::default(),
        }
    }

    /// Replaces the rate limits; a running device applies them at once (full buckets).
    pub fn set_rate_limits(&self, limits: NetRateLimits) {
        let mut l = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        l.0 += 1;
        l.1 = limits;
        drop(l);
        let _ = self.wake.write(1);
    }

    /// The rate limits.
    pub fn rate_limits(&self) -> NetRateLimits {
        self.limits.lock().unwrap_or_else(PoisonError::into_inner).1
    }

    pub(super) fn limits_since(&self, generation: u64) -> Option<(u64, NetRateLimits)> {
        let l = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        (l.0 != generation).then_some(*l)
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::SeqCst)
    }

    /// Sets the link state (QMP `set_link`); a running driver that negotiated STATUS gets a
    /// configuration interrupt and sees carrier change. Returns whether the state changed.
    pub fn set_link(&self, up: bool) -> bool {
        let changed = self.link_up.swap(up, Ordering::SeqCst) != up;
        if changed {
            self.config_changed();
            // vhost-net attaches or detaches the tap.
            let _ = self.wake.write(1);
        }
        changed
    }

    /// Asks the guest to announce itself (gratuitous ARP, after a restore or migration) if
    /// its driver negotiated GUEST_ANNOUNCE.
    pub(super) fn request_announce(&self) {
        let acked = self.acked.load(Ordering::SeqCst);
        if acked & feature(VIRTIO_NET_F_GUEST_ANNOUNCE) != 0 {
            self.announce.store(true, Ordering::SeqCst);
            self.config_changed();
        }
    }

    fn config_changed(&self) {
        if self.acked.load(Ordering::SeqCst) & feature(VIRTIO_NET_F_STATUS) == 0 {
            return;
        }
        let int = self
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(i) = int {
            if let Err(e) = i.trigger(VirtioInterruptType::Config) {
                log::warn!("virtio-net: configuration interrupt failed: {e}");
            }
        }
    }

    pub(super) fn status(&self) -> u16 {
        let mut s = 0;
        if self.link_up() {
            s |= VIRTIO_NET_S_LINK_UP as u16;
        }
        if self.announce.load(Ordering::SeqCst) {
            s |= VIRTIO_NET_S_ANNOUNCE as u16;
        }
        s
    }
}
