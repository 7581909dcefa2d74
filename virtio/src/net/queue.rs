//! The data path of one queue pair: frames from the backend (a tap) into the guest's receive
//! buffers, and from the guest's transmit chains to the backend. Nothing here knows of EventFds
//! or the event loop, so tests drive it with `virtio_queue::mock::MockSplitQueue` and an
//! in-memory backend.
//!
//! Backpressure: a frame read from the backend that finds no receive buffer is kept (one per
//! pair) and the backend is not read again until the guest posts buffers (its notification
//! brings us back); a transmit chain the backend cannot take now (`WouldBlock`) is put back on
//! the ring and retried when the backend becomes writable. Neither spins, neither loses a frame
//! it took from a queue.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::rate_limiter::RateLimiter;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{NetCounters, VNET_HDR_LEN};
use crate::device::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Longest frame, virtio-net header included, that travels either way (a 64 KiB GSO frame
/// with its Ethernet and VLAN headers).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_535 + 14 + 4;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Most descriptors of a transmit chain sent straight from guest memory (Linux uses at most
/// MAX_SKB_FRAGS + 2); longer chains are gathered into a buffer first.
const MAX_TX_IOVECS: usize = 64;

/// Where frames come from and go to: a tap, or a test double.
pub trait FrameBackend: Send {
    /// Reads one frame (virtio-net header first); `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (virtio-net header first); `WouldBlock` when it cannot take it now.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Writes one frame gathered from `iov` (virtio-net header first), as `writev(2)`.
    ///
    /// # Safety
    /// Every iovec must point to memory readable for its whole length during the call (here:
    /// guest memory, which the device keeps mapped).
    unsafe fn write_frame_iov(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
}

/// A queue of a tap as the device drives it: frames, an fd to watch, and the controls the
/// driver's settings map to. Implemented by `devices::net::Tap`, and by test doubles.
pub trait TapQueue: FrameBackend + AsRawFd {
    /// Sets the receive offloads (`devices::net::tap::offload` flags).
    fn set_offload(&self, flags: u32) -> Result<(), devices::net::TapError>;
    /// Attaches or detaches the queue (multiqueue taps).
    fn set_queue_enabled(&self, enabled: bool) -> Result<(), devices::net::TapError>;
}

impl FrameBackend for devices::net::Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        devices::net::Tap::read_frame(self, buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        devices::net::Tap::write_frame(self, frame)
    }

    unsafe fn write_frame_iov(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller vouches for the iovecs; writev only reads through them.
        let n = unsafe { libc::writev(self.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl TapQueue for devices::net::Tap {
    fn set_offload(&self, flags: u32) -> Result<(), devices::net::TapError> {
        devices::net::Tap::set_offload(self, flags)
    }

    fn set_queue_enabled(&self, enabled: bool) -> Result<(), devices::net::TapError> {
        devices::net::Tap::set_queue_enabled(self, enabled)
    }
}

/// Errors of the queue pair that stop processing (ring access, interrupts); a malformed chain
/// is not one: it is returned to the guest and counted.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The rings could not be accessed.
    #[error("virtio queue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Signalling the driver failed.
    #[error("interrupt failed: {0}")]
    Interrupt(#[from] io::Error),
}

/// What happened to one frame offered to the receive queue.
enum Delivery {
    /// In the guest's buffers.
    Done,
    /// Not enough buffers posted: nothing was consumed.
    NoBuffers,
    /// A malformed chain or a frame too big for a non-mergeable buffer: dropped.
    Dropped,
}

/// One receive queue and one transmit queue with their backend.
pub struct QueuePair<B> {
    /// Index of the receive queue (the transmit queue is the next one).
    pub rx_index: u16,
    rx: Queue,
    tx: Queue,
    backend: B,
    /// A frame read from the backend that is waiting for receive buffers.
    pending: Option<usize>,
    /// The pending frame's tokens were taken from the receive rate limiter.
    pending_paid: bool,
    /// Receiving waits this long for the rate limiter.
    rx_wait: Option<Duration>,
    /// Transmitting waits this long for the rate limiter.
    tx_wait: Option<Duration>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// The descriptors of the transmit chain at hand.
    descs: Vec<Descriptor>,
    /// The backend refused a frame (`WouldBlock`): retry on writability.
    tx_blocked: bool,
    /// Popped receive chains of the frame being delivered: (head, bytes written).
    used: Vec<(u16, u32)>,
    /// Where the first [`VNET_HDR_LEN`] bytes of the frame being delivered went.
    hdr_segments: Vec<(GuestAddress, usize)>,
}

/// What the pair needs from its device at each call.
pub struct PairContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// Where to signal used buffers.
    pub interrupt: &'a Arc<dyn VirtioInterrupt>,
    /// Counters of the NIC.
    pub counters: &'a NetCounters,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub mergeable: bool,
    /// The link is up (down: frames are dropped both ways, as QEMU does).
    pub link_up: bool,
}

impl<B: FrameBackend> QueuePair<B> {
    /// A pair over `rx` (queue `rx_index`) and `tx` (queue `rx_index + 1`).
    pub fn new(rx_index: u16, rx: Queue, tx: Queue, backend: B) -> Self {
        QueuePair {
            rx_index,
            rx,
            tx,
            backend,
            pending: None,
            pending_paid: false,
            rx_wait: None,
            tx_wait: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            descs: Vec::with_capacity(MAX_TX_IOVECS),
            tx_blocked: false,
            used: Vec::new(),
            hdr_segments: Vec::new(),
        }
    }

    /// The receive queue (for snapshots and tests).
    pub fn rx_queue(&self) -> &Queue {
        &self.rx
    }

    /// The transmit queue (for snapshots and tests).
    pub fn tx_queue(&self) -> &Queue {
        &self.tx
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Tears the pair down and gives the backend back.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// Whether a received frame waits for buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// How long the rate limiter holds this pair back, if it does: the sooner of both ways.
    pub fn throttled_for(&self) -> Option<Duration> {
        match (self.rx_wait, self.tx_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves frames from the backend to the guest until the backend has none, the guest has no
    /// buffers left or `limiter` says wait. Returns the number of frames delivered.
    pub fn process_rx(
        &mut self,
        ctx: &PairContext,
        limiter: &mut RateLimiter,
    ) -> Result<usize, QueueError> {
        let mut delivered = 0;
        let mut returned = 0;
        self.rx_wait = None;
        let mut budget_errors = 64; // a backend failing at every read must not spin us
                                    // Without EVENT_IDX: no notifications while we have buffers (with it, avail_event stays
                                    // behind until we run out and move it).
        self.rx.disable_notification(ctx.mem)?;
        loop {
            let len = match self.pending {
                Some(n) => n,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        NetCounters::add(&ctx.counters.rx_errors, 1);
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        NetCounters::add(&ctx.counters.rx_errors, 1);
                        budget_errors -= 1;
                        if budget_errors == 0 {
                            log::warn!("virtio-net: reading the tap failed: {e}");
                            break;
                        }
                        continue;
                    }
                },
            };
            if self.pending.is_none() {
                self.pending_paid = false;
            }
            self.pending = Some(len);
            if !ctx.link_up {
                self.pending = None;
                NetCounters::add(&ctx.counters.rx_dropped, 1);
                continue;
            }
            if !self.pending_paid {
                match limiter.consume((len - VNET_HDR_LEN) as u64, Instant::now()) {
                    Ok(()) => self.pending_paid = true,
                    Err(wait) => {
                        // Hold the frame and stop reading the tap until the tokens are there.
                        self.rx_wait = Some(wait);
                        break;
                    }
                }
            }
            match self.deliver(ctx.mem, len, ctx.mergeable)? {
                Delivery::Done => {
                    self.pending = None;
                    delivered += 1;
                    NetCounters::add(&ctx.counters.rx_packets, 1);
                    NetCounters::add(&ctx.counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Delivery::Dropped => {
                    self.pending = None;
                    NetCounters::add(&ctx.counters.rx_dropped, 1);
                    // Its chains went back to the used ring (empty): the guest must hear of
                    // them too, or it never gets those buffers back.
                    returned += 1;
                }
                Delivery::NoBuffers => {
                    // Ask the guest to notify us when it posts another buffer (avail_event at
                    // the ring's current end, not at the chains too few for this frame), and go
                    // on if it already did.
                    let seen = self.rx.avail_idx(ctx.mem, Ordering::Acquire)?.0;
                    let start = self.rx.next_avail();
                    self.rx.set_next_avail(seen);
                    let more = self.rx.enable_notification(ctx.mem);
                    self.rx.set_next_avail(start);
                    if !more? {
                        break;
                    }
                }
            }
        }
        // needs_notification forgets what was added since its last call, so it is asked only
        // when something was.
        if delivered + returned > 0 && self.rx.needs_notification(ctx.mem)? {
            ctx.interrupt
                .trigger(VirtioInterruptType::Queue(self.rx_index))?;
        }
        Ok(delivered)
    }

    /// Writes the frame in `rx_buf[..len]` into receive chains: one chain, or (mergeable
    /// buffers) as many as it takes, with `num_buffers` set in its header.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        len: usize,
        mergeable: bool,
    ) -> Result<Delivery, QueueError> {
        let start = self.rx.next_avail();
        self.used.clear();
        self.hdr_segments.clear();
        let frame = &self.rx_buf[..len];
        let mut off = 0;
        let mut malformed = false;
        while off < len {
            let Some(chain) = self.rx.iter(mem)?.next() else {
                // Give back what was taken for this frame; the bytes written stay unseen.
                self.rx.set_next_avail(start);
                return Ok(Delivery::NoBuffers);
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if off == len {
                    break;
                }
                if !desc.is_write_only() {
                    malformed = true;
                    break;
                }
                let n = (desc.len() as usize).min(len - off);
                if mem.write_slice(&frame[off..off + n], desc.addr()).is_err() {
                    malformed = true;
                    break;
                }
                if off < VNET_HDR_LEN {
                    self.hdr_segments
                        .push((desc.addr(), n.min(VNET_HDR_LEN - off)));
                }
                off += n;
                written += n;
            }
            self.used.push((head, written as u32));
            if malformed || (!mergeable && off < len) {
                // Return every chain taken for this frame, empty: the guest counts a short
                // frame and reuses them.
                for &(h, _) in &self.used {
                    self.rx.add_used(mem, h, 0)?;
                }
                return Ok(Delivery::Dropped);
            }
        }
        if self.hdr_segments.iter().map(|s| s.1).sum::<usize>() < VNET_HDR_LEN {
            for &(h, _) in &self.used {
                self.rx.add_used(mem, h, 0)?;
            }
            return Ok(Delivery::Dropped);
        }
        // num_buffers: 1 without mergeable buffers (the header says so anyway).
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr.copy_from_slice(&frame[..VNET_HDR_LEN]);
        hdr[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&(self.used.len() as u16).to_le_bytes());
        let mut pos = 0;
        for &(addr, n) in &self.hdr_segments {
            // The segments were written above, so they are in guest memory.
            let _ = mem.write_slice(&hdr[pos..pos + n], addr);
            pos += n;
        }
        for &(h, n) in &self.used {
            self.rx.add_used(mem, h, n)?;
        }
        Ok(Delivery::Done)
    }

    /// Moves the guest's transmit chains to the backend until the ring is empty, the backend
    /// is full or `limiter` says wait. Returns the number of frames sent.
    pub fn process_tx(
        &mut self,
        ctx: &PairContext,
        limiter: &mut RateLimiter,
    ) -> Result<usize, QueueError> {
        let mut sent = 0;
        let mut completed = 0;
        self.tx_blocked = false;
        self.tx_wait = None;
        'outer: loop {
            self.tx.disable_notification(ctx.mem)?;
            let mut this_pass = 0;
            while let Some(chain) = self.tx.iter(ctx.mem)?.next() {
                let head = chain.head_index();
                // The frame goes to the tap straight from guest memory (writev) when every
                // descriptor maps to one host range, and through a buffer otherwise.
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_TX_IOVECS];
                let mut n_iov = 0;
                let mut direct = true;
                let mut total = 0usize;
                let mut ok = true;
                self.descs.clear();
                self.descs.extend(chain);
                for desc in &self.descs {
                    let n = desc.len() as usize;
                    if desc.is_write_only() || total + n > MAX_FRAME {
                        ok = false;
                        break;
                    }
                    total += n;
                    if !direct {
                        continue;
                    }
                    match ctx.mem.get_slice(desc.addr(), n) {
                        Ok(slice) if n_iov < MAX_TX_IOVECS => {
                            iov[n_iov] = libc::iovec {
                                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                                iov_len: n,
                            };
                            n_iov += 1;
                        }
                        _ => direct = false,
                    }
                }
                if ok && !direct {
                    self.tx_buf.clear();
                    for desc in &self.descs {
                        let at = self.tx_buf.len();
                        self.tx_buf.resize(at + desc.len() as usize, 0);
                        if ctx
                            .mem
                            .read_slice(&mut self.tx_buf[at..], desc.addr())
                            .is_err()
                        {
                            ok = false;
                            break;
                        }
                    }
                }
                this_pass += 1;
                let valid = ok && total >= VNET_HDR_LEN && ctx.link_up;
                if valid {
                    let bytes = (total - VNET_HDR_LEN) as u64;
                    if let Err(wait) = limiter.consume(bytes, Instant::now()) {
                        // Back on the ring; it goes out when the tokens are there. The guest's
                        // notifications stay off meanwhile.
                        self.tx.set_next_avail(self.tx.next_avail().wrapping_sub(1));
                        self.tx_wait = Some(wait);
                        break 'outer;
                    }
                }
                if !valid {
                    NetCounters::add(&ctx.counters.tx_dropped, 1);
                } else {
                    let written = if direct {
                        // SAFETY: each iovec is a guest memory slice `get_slice` checked, and
                        // guest memory stays mapped while the device runs.
                        unsafe { self.backend.write_frame_iov(&iov[..n_iov]) }
                    } else {
                        self.backend.write_frame(&self.tx_buf)
                    };
                    match written {
                        Ok(_) => {
                            sent += 1;
                            NetCounters::add(&ctx.counters.tx_packets, 1);
                            NetCounters::add(&ctx.counters.tx_bytes, (total - VNET_HDR_LEN) as u64);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // Put the chain back: it goes out when the backend drains.
                            self.tx.set_next_avail(self.tx.next_avail().wrapping_sub(1));
                            self.tx_blocked = true;
                            break 'outer;
                        }
                        Err(e) => {
                            // EIO: the tap is down; EINVAL: a header the kernel refuses.
                            let counter = match e.raw_os_error() {
                                Some(libc::EIO) => &ctx.counters.tx_dropped,
                                _ => &ctx.counters.tx_errors,
                            };
                            NetCounters::add(counter, 1);
                        }
                    }
                }
                self.tx.add_used(ctx.mem, head, 0)?;
                completed += 1;
            }
            if !self.tx.enable_notification(ctx.mem)? || this_pass == 0 {
                break;
            }
        }
        if completed > 0 && self.tx.needs_notification(ctx.mem)? {
            ctx.interrupt
                .trigger(VirtioInterruptType::Queue(self.rx_index + 1))?;
        }
        Ok(sent)
    }

    /// Whether transmission waits for the backend to become writable.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }
}
