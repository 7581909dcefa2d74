//! virtio-net over a tap: one device per NIC, one receive/transmit queue pair per tap queue,
//! and a control queue.
//!
//! Offered features: CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO, HOST_TSO4/6,
//! HOST_ECN, HOST_UFO, MRG_RXBUF, STATUS, MAC, MTU (when configured), CTRL_VQ,
//! CTRL_GUEST_OFFLOADS, GUEST_ANNOUNCE, MQ (with more than one pair), EVENT_IDX and
//! INDIRECT_DESC. Frames keep their 12-byte virtio-net header on the tap, so offloads pass
//! through untouched; the tap's receive offloads (`TUNSETOFFLOAD`) follow what the driver acked,
//! and later what it sets through the control queue.
//!
//! Queue layout: receive *n* at `2n`, transmit *n* at `2n + 1`, the control queue after the
//! last pair (at 2 when the driver did not negotiate MQ). Pairs beyond the number the driver
//! asked for are detached from the multiqueue tap, so the kernel steers nothing to them.
//!
//! [`queue`] moves frames, [`ctrl`] runs the control queue, [`persist`] holds the device's
//! own snapshot state, [`shared`] what the rest of the VMM holds on to ([`NetShared`]) while the device
//! is inside the transport: the link state (QMP `set_link`), and the counters.

pub mod ctrl;
pub mod persist;
pub mod queue;
pub mod shared;
pub mod vhost;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use vmm_sys_util::eventfd::EventFd;

use devices::net::tap::offload;
use devices::net::Tap;
use devices::persist::RestoreError;
use devices::rate_limiter::RateLimiter;
use event_manager::EventSet;
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueState, QueueT};

pub use ctrl::CtrlCommand;
pub use persist::NetState;
pub use queue::{FrameBackend, PairContext, QueueError, QueuePair, TapQueue, MAX_FRAME};
pub use shared::{DirectionLimit, NetCounters, NetRateLimits, NetShared, NetStats};
use vhost::VhostPair;

use crate::device::{
    feature, ActivateContext, ActivateError, GuestMemoryMmap, VirtioDevice, VirtioDeviceState,
    VirtioInterrupt, VirtioInterruptType, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// virtio device type of network cards.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Length of the virtio-net header (`virtio_net_hdr_v1`) on every frame.
pub const VNET_HDR_LEN: usize = devices::net::VNET_HDR_LEN;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// Most queue pairs a NIC may have.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Size of `struct virtio_net_config` through `mtu`.
const CONFIG_LEN: usize = 12;

/// The GUEST_* feature bits that map to tap receive offloads.
const GUEST_OFFLOAD_FEATURES: [u32; 5] = [
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
];

/// The tap offload flags for a set of GUEST_* feature bits (TSO and UFO need checksums).
pub fn tap_offload_flags(guest_features: u64) -> u32 {
    let has = |bit: u32| guest_features & feature(bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut f = offload::CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        f |= offload::TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        f |= offload::TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) {
        f |= offload::TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        f |= offload::UFO;
    }
    f
}

fn guest_offload_mask() -> u64 {
    GUEST_OFFLOAD_FEATURES.iter().map(|&b| feature(b)).sum()
}

/// How a NIC looks to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetOptions {
    /// The MAC address.
    pub mac: [u8; 6],
    /// The MTU the guest is told (VIRTIO_NET_F_MTU), if any.
    pub mtu: Option<u16>,
    /// Hand the queue pairs to vhost-net.
    pub vhost: bool,
}

/// Errors creating a network device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    /// No tap queue, or more than [`MAX_QUEUE_PAIRS`].
    #[error("a NIC has 1 to {MAX_QUEUE_PAIRS} queue pairs, not {0}")]
    QueuePairs(usize),
    /// The MTU is outside what Ethernet over virtio can carry.
    #[error("MTU {0} is outside 68..=65535")]
    Mtu(u16),
    /// The rate limiter's timer could not be made.
    #[error("cannot create a timerfd: {0}")]
    Timer(String),
}

/// The runtime control settings the driver chose (and a snapshot keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CtrlSettings {
    active_pairs: u16,
    guest_offloads: u64,
}

struct Active<T> {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    acked: u64,
    /// Pair *i* on our data path (`None` when the driver did not enable its queues, or when
    /// vhost-net runs it).
    pairs: Vec<Option<QueuePair<T>>>,
    /// Pair *i* on vhost-net (empty without vhost).
    vhost: Vec<Option<VhostPair<T>>>,
    ctrl: Option<(u16, Queue)>,
    settings: CtrlSettings,
}

/// What one of the device's backend fds is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Pair *i*'s tap (our data path).
    Tap(usize),
    /// Pair *i*'s vhost call EventFd for ring 0 (receive) or 1 (transmit).
    Call(usize, usize),
    /// The rate limiter's timer.
    Timer,
    /// The limits-or-link-changed EventFd.
    Wake,
}

impl<T: TapQueue> Active<T> {
    /// Every tap queue in use, with its pair index.
    fn taps(&self) -> Vec<(usize, &T)> {
        let ours = self
            .pairs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.backend())));
        let vhost = self
            .vhost
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.tap())));
        ours.chain(vhost).collect()
    }
}

/// A virtio-net device over the queues of a tap (`T` is a test double in unit tests).
pub struct Net<T = Tap> {
    options: NetOptions,
    /// The tap queues while inactive (one per pair); taken by the active pairs.
    taps: Vec<Option<T>>,
    active: Option<Active<T>>,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    shared: Arc<NetShared>,
    /// Control settings from a restored snapshot, applied by the next activation.
    restored: Option<CtrlSettings>,
    limiters: Limiters,
    /// vhost's dirty log while a live migration runs (applied to pairs started meanwhile).
    dirty_log: Option<Arc<crate::dirty_log::VhostLog>>,
}

/// The device's rate limiters, the limits generation they were built from, and the timer that
/// wakes the device when a throttled direction may go on.
struct Limiters {
    generation: u64,
    rx: RateLimiter,
    tx: RateLimiter,
    timer: TimerFd,
}

/// A one-shot, non-blocking CLOCK_MONOTONIC timerfd.
struct TimerFd(std::os::fd::OwnedFd);

impl TimerFd {
    fn new() -> std::io::Result<TimerFd> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh fd nobody else owns.
        Ok(TimerFd(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// Fires once after `after` (replacing an earlier setting).
    fn arm(&self, after: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos().max(1)),
            },
        };
        // SAFETY: `spec` is a valid itimerspec for the call; the old value is not asked for.
        unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Consumes an expiry, if any.
    fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`; EAGAIN when not expired is fine.
        unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

fn limiter(d: &DirectionLimit) -> RateLimiter {
    RateLimiter::new(d.bandwidth, d.ops, Instant::now())
}

impl<T> std::fmt::Debug for Net<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &format_mac(&self.options.mac))
            .field("pairs", &self.taps.len())
            .field("active", &self.active.is_some())
            .finish()
    }
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl<T: TapQueue> Net<T> {
    /// A NIC over `taps` (one queue of the tap per queue pair).
    pub fn new(taps: Vec<T>, options: NetOptions) -> Result<Self, NetError> {
        Self::with_shared(taps, options, Arc::new(NetShared::new()))
    }

    /// A NIC whose link state and counters live in `shared`, which outlives the device (the
    /// VMM builds a new device for each boot of the same VM).
    pub fn with_shared(
        taps: Vec<T>,
        options: NetOptions,
        shared: Arc<NetShared>,
    ) -> Result<Self, NetError> {
        let pairs = taps.len();
        if pairs == 0 || pairs > usize::from(MAX_QUEUE_PAIRS) {
            return Err(NetError::QueuePairs(pairs));
        }
        if let Some(m) = options.mtu {
            if m < 68 {
                return Err(NetError::Mtu(m));
            }
        }
        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_NET_F_CSUM)
            | feature(VIRTIO_NET_F_HOST_TSO4)
            | feature(VIRTIO_NET_F_HOST_TSO6)
            | feature(VIRTIO_NET_F_HOST_ECN)
            | feature(VIRTIO_NET_F_HOST_UFO)
            | feature(VIRTIO_NET_F_MRG_RXBUF)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_CTRL_VQ)
            | feature(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
            | feature(VIRTIO_NET_F_GUEST_ANNOUNCE)
            | guest_offload_mask();
        if options.mtu.is_some() {
            features |= feature(VIRTIO_NET_F_MTU);
        }
        if pairs > 1 {
            features |= feature(VIRTIO_NET_F_MQ);
        }
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs];
        queue_sizes.push(CTRL_QUEUE_SIZE);
        Ok(Net {
            options,
            taps: taps.into_iter().map(Some).collect(),
            active: None,
            queue_sizes,
            avail_features: features,
            limiters: Limiters {
                generation: 0,
                rx: limiter(&shared.rate_limits().rx),
                tx: limiter(&shared.rate_limits().tx),
                timer: TimerFd::new().map_err(|e| NetError::Timer(e.to_string()))?,
            },
            shared,
            restored: None,
            dirty_log: None,
        })
    }

    /// The handle the VMM keeps: link state and counters.
    pub fn shared(&self) -> Arc<NetShared> {
        self.shared.clone()
    }

    /// Number of queue pairs.
    pub fn max_pairs(&self) -> u16 {
        self.taps.len() as u16
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.options.mac);
        c[6..8].copy_from_slice(&self.shared.status().to_le_bytes());
        c[8..10].copy_from_slice(&self.max_pairs().to_le_bytes());
        c[10..12].copy_from_slice(&self.options.mtu.unwrap_or(0).to_le_bytes());
        c
    }

    fn settings(&self) -> CtrlSettings {
        match (&self.active, &self.restored) {
            (Some(a), _) => a.settings,
            (None, Some(r)) => *r,
            (None, None) => CtrlSettings {
                active_pairs: 1,
                guest_offloads: 0,
            },
        }
    }

    /// Applies the number of active pairs and the receive offloads to the tap queues.
    fn apply_settings(a: &Active<T>) {
        let flags = tap_offload_flags(a.settings.guest_offloads);
        let taps = a.taps();
        let multi = a.pairs.len() > 1;
        for (i, tap) in taps {
            if let Err(e) = tap.set_offload(flags) {
                log::warn!("virtio-net: {e}");
            }
            if multi {
                let on = i < usize::from(a.settings.active_pairs);
                if let Err(e) = tap.set_queue_enabled(on) {
                    log::warn!("virtio-net: {e}");
                }
            }
        }
    }

    fn run_pair(&mut self, pair: usize, rx: bool, tx: bool) {
        self.take_new_limits();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let ctx = Self::pair_context_parts(&a.mem, &a.interrupt, a.acked, &self.shared);
        let Some(Some(p)) = a.pairs.get_mut(pair) else {
            return;
        };
        if tx {
            if let Err(e) = p.process_tx(&ctx, &mut self.limiters.tx) {
                log::error!("virtio-net: transmit queue {}: {e}", p.rx_index + 1);
            }
        }
        if rx {
            if let Err(e) = p.process_rx(&ctx, &mut self.limiters.rx) {
                log::error!("virtio-net: receive queue {}: {e}", p.rx_index);
            }
        }
        if let Some(wait) = p.throttled_for() {
            self.limiters.timer.arm(wait);
        }
    }

    /// The backend fds and what each is, in a fixed order.
    fn slots(&self) -> Vec<(RawFd, Slot)> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, p) in a.pairs.iter().enumerate() {
            if let Some(p) = p {
                out.push((p.backend().as_raw_fd(), Slot::Tap(i)));
            }
        }
        for (i, p) in a.vhost.iter().enumerate() {
            if let Some(p) = p {
                let [rx, tx] = p.calls();
                out.push((rx.as_raw_fd(), Slot::Call(i, 0)));
                out.push((tx.as_raw_fd(), Slot::Call(i, 1)));
            }
        }
        out.push((self.limiters.timer.0.as_raw_fd(), Slot::Timer));
        out.push((self.shared.wake.as_raw_fd(), Slot::Wake));
        out
    }

    /// Every running pair, both ways (the rate limiter's timer fired, or its limits changed).
    fn run_all(&mut self) {
        self.take_new_limits();
        let link_up = self.shared.link_up();
        if let Some(a) = self.active.as_mut() {
            for p in a.vhost.iter_mut().flatten() {
                // Link down: vhost lets go of the tap, as QEMU stops vhost then.
                if let Err(e) = p.set_attached(link_up) {
                    log::error!("virtio-net: {e}");
                }
            }
        }
        let n = self.active.as_ref().map_or(0, |a| a.pairs.len());
        let mut wait: Option<Duration> = None;
        for i in 0..n {
            self.run_pair(i, true, true);
            let w = self
                .active
                .as_ref()
                .and_then(|a| a.pairs[i].as_ref())
                .and_then(QueuePair::throttled_for);
            wait = match (wait, w) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if let Some(w) = wait {
            self.limiters.timer.arm(w);
        }
    }

    /// Rebuilds the limiters if the VMM changed the limits.
    fn take_new_limits(&mut self) {
        if let Some((generation, limits)) = self.shared.limits_since(self.limiters.generation) {
            self.limiters.generation = generation;
            self.limiters.rx = limiter(&limits.rx);
            self.limiters.tx = limiter(&limits.tx);
        }
    }

    fn pair_context_parts<'a>(
        mem: &'a GuestMemoryMmap,
        interrupt: &'a Arc<dyn VirtioInterrupt>,
        acked: u64,
        shared: &'a NetShared,
    ) -> PairContext<'a> {
        PairContext {
            mem,
            interrupt,
            counters: &shared.counters,
            mergeable: acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
            link_up: shared.link_up(),
        }
    }

    fn run_ctrl(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some((index, queue)) = a.ctrl.as_mut() else {
            return;
        };
        let index = *index;
        let acked = a.acked;
        let max_pairs = a.pairs.len() as u16;
        let mut settings = a.settings;
        let shared = &self.shared;
        let mem = &a.mem;
        let r = ctrl::process(queue, mem, |cmd| match cmd {
            CtrlCommand::SetQueuePairs(n) => {
                let ok = acked & feature(VIRTIO_NET_F_MQ) != 0 && (1..=max_pairs).contains(&n);
                if ok {
                    settings.active_pairs = n;
                }
                ok
            }
            CtrlCommand::SetGuestOffloads(f) => {
                // Only GUEST_* offloads the driver negotiated may be switched on.
                let ok = acked & feature(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) != 0
                    && f & !(acked & guest_offload_mask()) == 0;
                if ok {
                    settings.guest_offloads = f;
                }
                ok
            }
            CtrlCommand::AnnounceAck => {
                let ok = acked & feature(VIRTIO_NET_F_GUEST_ANNOUNCE) != 0;
                if ok {
                    shared.announce.store(false, Ordering::SeqCst);
                }
                ok
            }
            CtrlCommand::Unsupported(..) | CtrlCommand::Malformed(..) => false,
        });
        let notify = match r {
            Ok(true) => matches!(queue.needs_notification(mem), Ok(true)),
            Ok(false) => false,
            Err(e) => {
                log::error!("virtio-net: control queue: {e}");
                false
            }
        };
        let changed = settings != a.settings;
        a.settings = settings;
        if changed {
            Self::apply_settings(a);
        }
        if notify {
            if let Err(e) = a.interrupt.trigger(VirtioInterruptType::Queue(index)) {
                log::warn!("virtio-net: control queue interrupt failed: {e}");
            }
        }
    }
}

impl<T: TapQueue + 'static> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let idx = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(v) = idx.and_then(|i| cfg.get(i)) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only in legacy devices; every field is read-only here.
        log::debug!("virtio-net: ignoring config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let acked = ctx.acked_features;
        let mq = acked & feature(VIRTIO_NET_F_MQ) != 0;
        let pairs = if mq { self.taps.len() } else { 1 };
        let ctrl_index = (2 * pairs) as u16;
        let mut queues: Vec<Option<Queue>> = (0..self.queue_sizes.len()).map(|_| None).collect();
        let mut kicks: Vec<Option<EventFd>> = (0..self.queue_sizes.len()).map(|_| None).collect();
        for q in ctx.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q.queue);
                kicks[usize::from(q.index)] = Some(q.notify);
            }
        }
        if self.taps.iter().any(Option::is_none) {
            return Err(ActivateError::NoBackend);
        }
        if queues[0].is_none() || queues[1].is_none() {
            return Err(ActivateError::MissingQueue(if queues[0].is_none() {
                0
            } else {
                1
            }));
        }
        let mut built = Vec::with_capacity(self.taps.len());
        let mut vhost: Vec<Option<VhostPair<T>>> = Vec::new();
        for i in 0..self.taps.len() {
            let (rx, tx) = if i < pairs {
                (queues[2 * i].take(), queues[2 * i + 1].take())
            } else {
                (None, None)
            };
            let (Some(rx), Some(tx)) = (rx, tx) else {
                built.push(None);
                vhost.push(None);
                continue;
            };
            let tap = self.taps[i].take().ok_or(ActivateError::NoBackend)?;
            if !self.options.vhost {
                built.push(Some(QueuePair::new((2 * i) as u16, rx, tx, tap)));
                continue;
            }
            built.push(None);
            let (Some(rxk), Some(txk)) = (kicks[2 * i].take(), kicks[2 * i + 1].take()) else {
                self.taps[i] = Some(tap);
                return Err(ActivateError::MissingQueue((2 * i) as u16));
            };
            match VhostPair::start(
                &ctx.mem,
                acked,
                (2 * i) as u16,
                (rx, rxk),
                (tx, txk),
                tap,
                self.shared.link_up(),
                &ctx.interrupt,
            ) {
                Ok(mut p) => {
                    if let Some(log) = &self.dirty_log {
                        if let Err(e) = p.set_dirty_log(Some(log)) {
                            self.taps[i] = Some(p.into_tap());
                            for (j, q) in vhost.into_iter().enumerate() {
                                if let Some(q) = q {
                                    self.taps[j] = Some(q.into_tap());
                                }
                            }
                            return Err(e);
                        }
                    }
                    vhost.push(Some(p))
                }
                Err((e, tap)) => {
                    // Give every tap back: the device stays inactive and can try again.
                    self.taps[i] = Some(tap);
                    for (j, p) in vhost.into_iter().enumerate() {
                        if let Some(p) = p {
                            self.taps[j] = Some(p.into_tap());
                        }
                    }
                    return Err(e);
                }
            }
        }
        let ctrl = if acked & feature(VIRTIO_NET_F_CTRL_VQ) != 0 {
            queues
                .get_mut(usize::from(ctrl_index))
                .and_then(Option::take)
                .map(|q| (ctrl_index, q))
        } else {
            None
        };
        // A restored device goes on with what its driver had chosen; a fresh driver starts
        // with one pair and every receive offload it negotiated.
        let restored = self.restored.take();
        let settings = restored.unwrap_or(CtrlSettings {
            active_pairs: 1,
            guest_offloads: acked & guest_offload_mask(),
        });
        let active = Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt.clone(),
            acked,
            pairs: built,
            vhost,
            ctrl,
            settings,
        };
        Self::apply_settings(&active);
        self.active = Some(active);
        self.shared.acked.store(acked, Ordering::SeqCst);
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(ctx.interrupt);
        if restored.is_some() {
            // The VM may be somewhere else on the network now: the guest tells the switches.
            self.shared.request_announce();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.restored = None;
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.shared.acked.store(0, Ordering::SeqCst);
        self.shared.announce.store(false, Ordering::SeqCst);
        if let Some(a) = self.active.take() {
            let ours = a
                .pairs
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| p.map(|p| (i, p.into_backend())));
            // Dropping a vhost pair closes its vhost fd: the kernel stops the rings.
            let vhost = a
                .vhost
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| p.map(|p| (i, p.into_tap())));
            for (i, tap) in ours.chain(vhost) {
                // A fresh driver starts with every queue of the tap attached.
                let _ = tap.set_queue_enabled(true);
                self.taps[i] = Some(tap);
            }
        }
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: u16) {
        let ctrl = self
            .active
            .as_ref()
            .and_then(|a| a.ctrl.as_ref().map(|c| c.0));
        if Some(index) == ctrl {
            self.run_ctrl();
            return;
        }
        let pair = usize::from(index / 2);
        if index.is_multiple_of(2) {
            // The guest posted receive buffers.
            self.run_pair(pair, true, false);
        } else {
            self.run_pair(pair, false, true);
        }
    }

    /// The running pairs' tap fds (our data path) or vhost call EventFds, then the rate
    /// limiter's timer, then the limits-or-link-changed EventFd.
    fn backend_fds(&self) -> Vec<RawFd> {
        self.slots().into_iter().map(|(fd, _)| fd).collect()
    }

    fn backend_events(&self) -> EventSet {
        EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED
    }

    fn offloaded_queues(&self) -> Vec<u16> {
        self.active.as_ref().map_or(Vec::new(), |a| {
            a.vhost
                .iter()
                .flatten()
                .flat_map(|p| [p.rx_index, p.rx_index + 1])
                .collect()
        })
    }

    fn process_backend(&mut self, index: usize, events: EventSet) {
        let Some((_, slot)) = self.slots().get(index).copied() else {
            return;
        };
        match slot {
            Slot::Timer | Slot::Wake => {
                self.limiters.timer.clear();
                let _ = self.shared.wake.read();
                self.run_all();
            }
            Slot::Call(pair, ring) => {
                if let Some(a) = &self.active {
                    if let Some(Some(p)) = a.vhost.get(pair) {
                        p.relay(ring, &a.interrupt);
                    }
                }
            }
            Slot::Tap(pair) => {
                let rx = events.contains(EventSet::IN);
                let tx = events.contains(EventSet::OUT)
                    && self
                        .active
                        .as_ref()
                        .and_then(|a| a.pairs[pair].as_ref())
                        .is_some_and(|p| p.tx_blocked());
                self.run_pair(pair, rx, tx);
            }
        }
    }

    /// vhost-net keeps the rings' positions in the kernel, and writes guest memory while the
    /// vCPUs are stopped: its rings are stopped and their positions read back, until
    /// [`VirtioDevice::resume`]. (Our own data path runs on the event loop, which takes the
    /// snapshot: it is still until then.)
    fn quiesce(&mut self) -> std::io::Result<()> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        for p in a.vhost.iter_mut().flatten() {
            // On error the snapshot is refused, and resume() restarts what did stop.
            p.stop(&a.mem)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(())
    }

    fn set_dirty_log(
        &mut self,
        log: Option<Arc<crate::dirty_log::VhostLog>>,
    ) -> std::io::Result<()> {
        if let Some(a) = self.active.as_mut() {
            for p in a.vhost.iter_mut().flatten() {
                p.set_dirty_log(log.as_deref())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
        }
        self.dirty_log = log;
        Ok(())
    }

    fn resume(&mut self) {
        let link_up = self.shared.link_up();
        if let Some(a) = self.active.as_mut() {
            for p in a.vhost.iter_mut().flatten() {
                if let Err(e) = p.set_attached(link_up) {
                    log::error!("virtio-net: restarting vhost-net after a snapshot: {e}");
                }
            }
        }
    }

    fn active_queue_states(&self) -> Vec<(u16, QueueState)> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in a.pairs.iter().flatten() {
            out.push((p.rx_index, p.rx_queue().state()));
            out.push((p.rx_index + 1, p.tx_queue().state()));
        }
        for p in a.vhost.iter().flatten() {
            out.extend(p.queue_states());
        }
        if let Some((i, q)) = &a.ctrl {
            out.push((*i, q.state()));
        }
        out
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.net_state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        self.apply_net_state(state)
    }
}

#[cfg(test)]
mod tests;
