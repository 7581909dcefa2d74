//! virtio-net tests: the data path and the control queue driven through
//! `virtio_queue::mock::MockSplitQueue` with an in-memory tap, and the device's state contract.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::net::TapError;
use devices::rate_limiter::{BucketConfig, RateLimiter};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device::{ActiveQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// What the fake tap has seen and will hand out.
#[derive(Default)]
struct TapLog {
    /// Frames waiting to be read by the device.
    incoming: VecDeque<Vec<u8>>,
    /// Frames the device wrote.
    written: Vec<Vec<u8>>,
    /// Reads attempted.
    reads: usize,
    /// Refuse writes with WouldBlock.
    full: bool,
    offload: Option<u32>,
    enabled: Option<bool>,
}

struct FakeTap {
    log: Arc<Mutex<TapLog>>,
    fd: EventFd,
}

impl FakeTap {
    fn new() -> (FakeTap, Arc<Mutex<TapLog>>) {
        let log = Arc::new(Mutex::new(TapLog::default()));
        (
            FakeTap {
                log: log.clone(),
                fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            },
            log,
        )
    }
}

impl FrameBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut l = self.log.lock().unwrap();
        l.reads += 1;
        match l.incoming.pop_front() {
            Some(f) => {
                buf[..f.len()].copy_from_slice(&f);
                Ok(f.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        let mut l = self.log.lock().unwrap();
        if l.full {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        l.written.push(frame.to_vec());
        Ok(frame.len())
    }

    unsafe fn write_frame_iov(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let frame = Self::gathered(iov);
        self.write_frame(&frame)
    }
}

impl FakeTap {
    fn gathered(iov: &[libc::iovec]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in iov {
            // SAFETY: the caller of write_frame_iov vouches that each iovec is readable.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        out
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapQueue for FakeTap {
    fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.log.lock().unwrap().offload = Some(flags);
        Ok(())
    }

    fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        self.log.lock().unwrap().enabled = Some(enabled);
        Ok(())
    }
}

#[derive(Default)]
struct Irqs(Mutex<Vec<VirtioInterruptType>>, AtomicUsize);
impl VirtioInterrupt for Irqs {
    fn trigger(&self, t: VirtioInterruptType) -> io::Result<()> {
        self.0.lock().unwrap().push(t);
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A frame of `len` payload bytes after a virtio-net header whose `num_buffers` is garbage.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 1; // NEEDS_CSUM: the header goes through untouched
    f[10] = 0xee;
    f[11] = 0xee;
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn chain(descs: &[(u64, u32, u16)], first_index: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = if i + 1 < descs.len() { NEXT } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                flags | next,
                first_index + i as u16 + 1,
            ))
        })
        .collect()
}

struct Rig {
    mem: GuestMemoryMmap,
    counters: NetCounters,
    irq: Arc<dyn VirtioInterrupt>,
    irqs: Arc<Irqs>,
}

const RXQ: u64 = 0x0;
const TXQ: u64 = 0x1_0000;
const BUF: u64 = 0x10_0000;

impl Rig {
    fn new() -> Rig {
        let irqs = Arc::new(Irqs::default());
        Rig {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
            counters: NetCounters::default(),
            irq: irqs.clone(),
            irqs,
        }
    }

    fn ctx(&self, mergeable: bool, link_up: bool) -> PairContext<'_> {
        PairContext {
            mem: &self.mem,
            interrupt: &self.irq,
            counters: &self.counters,
            mergeable,
            link_up,
        }
    }

    fn queues(
        &self,
    ) -> (
        MockSplitQueue<'_, GuestMemoryMmap>,
        MockSplitQueue<'_, GuestMemoryMmap>,
    ) {
        (
            MockSplitQueue::create(&self.mem, GuestAddress(RXQ), 16),
            MockSplitQueue::create(&self.mem, GuestAddress(TXQ), 16),
        )
    }

    fn used(&self, q: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let base = q.used_addr();
        let idx: u16 = self.mem.read_obj(base.unchecked_add(2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let e = base.unchecked_add(4 + 8 * i);
                (
                    self.mem.read_obj(e).unwrap(),
                    self.mem.read_obj(e.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn pair<'a>(
    rx: &MockSplitQueue<'a, GuestMemoryMmap>,
    tx: &MockSplitQueue<'a, GuestMemoryMmap>,
) -> (QueuePair<FakeTap>, Arc<Mutex<TapLog>>) {
    let (tap, log) = FakeTap::new();
    let rxq: Queue = rx.create_queue().unwrap();
    let txq: Queue = tx.create_queue().unwrap();
    (QueuePair::new(0, rxq, txq, tap), log)
}

#[test]
fn rx_one_frame_in_one_buffer() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    rxm.add_desc_chains(&chain(&[(BUF, 4096, WRITE)], 0), 0)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    let f = frame(1000, 3);
    log.lock().unwrap().incoming.push_back(f.clone());
    assert_eq!(
        p.process_rx(&r.ctx(false, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(r.used(&rxm), vec![(0, f.len() as u32)]);
    let mut want = f.clone();
    want[10..12].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(r.read(BUF, f.len()), want);
    let s = r.counters.snapshot();
    assert_eq!((s.rx_packets, s.rx_bytes), (1, 1000));
    assert_eq!(r.irqs.1.load(Ordering::SeqCst), 1);
}

#[test]
fn rx_mergeable_spans_buffers_and_counts_them() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    // Three chains of 1500 bytes, the header split over two descriptors in the first.
    let mut d = chain(&[(BUF, 6, WRITE), (BUF + 6, 1494, WRITE)], 0);
    d.extend(chain(&[(BUF + 0x1000, 1500, WRITE)], 2));
    d.extend(chain(&[(BUF + 0x2000, 1500, WRITE)], 3));
    rxm.add_desc_chains(&d, 0).unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    let f = frame(3500, 9);
    log.lock().unwrap().incoming.push_back(f.clone());
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(r.used(&rxm), vec![(0, 1500), (2, 1500), (3, 512)]);
    let mut got = r.read(BUF, 1500);
    got.extend(r.read(BUF + 0x1000, 1500));
    got.extend(r.read(BUF + 0x2000, 512));
    let mut want = f;
    want[10..12].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(got, want);
}

#[test]
fn rx_without_buffers_keeps_the_frame_and_stops_reading() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    let (mut p, log) = pair(&rxm, &txm);
    for i in 0..3 {
        log.lock().unwrap().incoming.push_back(frame(100, i));
    }
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert!(p.has_pending());
    assert_eq!(
        log.lock().unwrap().reads,
        1,
        "read on with nowhere to put frames"
    );
    assert_eq!(log.lock().unwrap().incoming.len(), 2);
    // Again (a spurious wakeup): still nothing read.
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert_eq!(log.lock().unwrap().reads, 1);
    // The guest posts buffers: every frame arrives, in order, none lost.
    let mut d = Vec::new();
    for i in 0..3u16 {
        d.extend(chain(&[(BUF + u64::from(i) * 0x1000, 2048, WRITE)], i));
    }
    rxm.add_desc_chains(&d, 0).unwrap();
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        3
    );
    for i in 0..3u64 {
        assert_eq!(
            r.read(BUF + i * 0x1000 + 12, 100),
            frame(100, i as u8)[12..]
        );
    }
    assert_eq!(r.counters.snapshot().rx_dropped, 0);
}

#[test]
fn rx_mergeable_with_too_few_buffers_waits_without_consuming() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    rxm.add_desc_chains(&chain(&[(BUF, 1500, WRITE)], 0), 0)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    log.lock().unwrap().incoming.push_back(frame(3000, 1));
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert!(r.used(&rxm).is_empty());
    assert_eq!(
        p.rx_queue().next_avail(),
        0,
        "a chain was taken and not returned"
    );
    // avail_event (after the used ring) asks for a notification at the next buffer.
    rxm.add_desc_chains(&chain(&[(BUF + 0x1000, 1500, WRITE)], 1), 1)
        .unwrap();
    rxm.add_desc_chains(&chain(&[(BUF + 0x2000, 1500, WRITE)], 2), 2)
        .unwrap();
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(r.used(&rxm).len(), 3);
}

#[test]
fn rx_frame_too_big_for_a_plain_buffer_is_dropped() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    rxm.add_desc_chains(&chain(&[(BUF, 1526, WRITE)], 0), 0)
        .unwrap();
    rxm.add_desc_chains(&chain(&[(BUF + 0x1000, 1526, WRITE)], 1), 1)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    log.lock().unwrap().incoming.push_back(frame(4000, 1));
    log.lock().unwrap().incoming.push_back(frame(100, 2));
    assert_eq!(
        p.process_rx(&r.ctx(false, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(r.used(&rxm), vec![(0, 0), (1, 112)]);
    assert_eq!(r.counters.snapshot().rx_dropped, 1);
}

#[test]
fn rx_malformed_chains_are_returned_empty() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    // A readable descriptor, then one outside guest memory, then a good one.
    rxm.add_desc_chains(&chain(&[(BUF, 2048, 0)], 0), 0)
        .unwrap();
    rxm.add_desc_chains(&chain(&[(0x4000_0000, 2048, WRITE)], 1), 1)
        .unwrap();
    rxm.add_desc_chains(&chain(&[(BUF + 0x1000, 2048, WRITE)], 2), 2)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    for i in 0..3 {
        log.lock().unwrap().incoming.push_back(frame(64, i));
    }
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(r.used(&rxm), vec![(0, 0), (1, 0), (2, 76)]);
    assert_eq!(r.counters.snapshot().rx_dropped, 2);
}

#[test]
fn rx_with_the_link_down_drains_and_drops() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    rxm.add_desc_chains(&chain(&[(BUF, 2048, WRITE)], 0), 0)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    log.lock().unwrap().incoming.push_back(frame(64, 0));
    assert_eq!(
        p.process_rx(&r.ctx(true, false), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert!(log.lock().unwrap().incoming.is_empty());
    assert!(r.used(&rxm).is_empty());
    assert_eq!(r.counters.snapshot().rx_dropped, 1);
}

#[test]
fn tx_gathers_descriptors_into_one_frame() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    let f = frame(2000, 5);
    r.mem.write_slice(&f[..12], GuestAddress(BUF)).unwrap();
    r.mem
        .write_slice(&f[12..], GuestAddress(BUF + 0x1000))
        .unwrap();
    txm.add_desc_chains(&chain(&[(BUF, 12, 0), (BUF + 0x1000, 2000, 0)], 0), 0)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    assert_eq!(
        p.process_tx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(log.lock().unwrap().written, vec![f]);
    assert_eq!(r.used(&txm), vec![(0, 0)]);
    let s = r.counters.snapshot();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, 2000));
    assert_eq!(
        *r.irqs.0.lock().unwrap(),
        vec![VirtioInterruptType::Queue(1)]
    );
}

#[test]
fn tx_waits_for_a_full_tap_without_losing_the_frame() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    let f = frame(100, 1);
    r.mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    txm.add_desc_chains(&chain(&[(BUF, f.len() as u32, 0)], 0), 0)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    log.lock().unwrap().full = true;
    assert_eq!(
        p.process_tx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert!(p.tx_blocked());
    assert!(r.used(&txm).is_empty());
    assert_eq!(p.tx_queue().next_avail(), 0);
    log.lock().unwrap().full = false;
    assert_eq!(
        p.process_tx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert!(!p.tx_blocked());
    assert_eq!(log.lock().unwrap().written, vec![f]);
}

#[test]
fn tx_malformed_and_link_down_are_dropped_and_counted() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    // A writable descriptor, a chain shorter than the header, one past guest memory.
    txm.add_desc_chains(&chain(&[(BUF, 64, WRITE)], 0), 0)
        .unwrap();
    txm.add_desc_chains(&chain(&[(BUF, 8, 0)], 1), 1).unwrap();
    txm.add_desc_chains(&chain(&[(0x4000_0000, 64, 0)], 2), 2)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    assert_eq!(
        p.process_tx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert_eq!(r.used(&txm).len(), 3);
    assert_eq!(r.counters.snapshot().tx_dropped, 3);
    txm.add_desc_chains(&chain(&[(BUF, 64, 0)], 3), 3).unwrap();
    assert_eq!(
        p.process_tx(&r.ctx(true, false), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert_eq!(r.counters.snapshot().tx_dropped, 4);
    assert!(log.lock().unwrap().written.is_empty());
}

#[test]
fn tx_oversized_chain_is_refused() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    txm.add_desc_chains(&chain(&[(BUF, 60_000, 0), (BUF + 60_000, 60_000, 0)], 0), 0)
        .unwrap();
    let (mut p, log) = pair(&rxm, &txm);
    assert_eq!(
        p.process_tx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        0
    );
    assert!(log.lock().unwrap().written.is_empty());
    assert_eq!(r.counters.snapshot().tx_dropped, 1);
}

/// A whole device: activation with a given set of acked features, its queues on mock rings.
struct DeviceRig {
    rig: Rig,
    net: Net<FakeTap>,
    logs: Vec<Arc<Mutex<TapLog>>>,
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

impl DeviceRig {
    fn new(pairs: usize) -> DeviceRig {
        let mut taps = Vec::new();
        let mut logs = Vec::new();
        for _ in 0..pairs {
            let (t, l) = FakeTap::new();
            taps.push(t);
            logs.push(l);
        }
        let net = Net::new(
            taps,
            NetOptions {
                mac: MAC,
                mtu: Some(1400),
                vhost: false,
            },
        )
        .unwrap();
        DeviceRig {
            rig: Rig::new(),
            net,
            logs,
        }
    }

    /// Activates with every queue on its own mock ring (at 0x10000 * index).
    fn activate(&mut self, acked: u64) {
        let n = self.net.queue_max_sizes().len();
        let mut queues = Vec::new();
        for i in 0..n {
            let m = MockSplitQueue::create(&self.rig.mem, GuestAddress(0x1_0000 * i as u64), 16);
            queues.push(ActiveQueue {
                index: i as u16,
                queue: m.create_queue().unwrap(),
                notify: EventFd::new(0).unwrap(),
            });
        }
        self.net
            .activate(ActivateContext {
                mem: self.rig.mem.clone(),
                queues,
                interrupt: self.rig.irq.clone(),
                acked_features: acked,
            })
            .unwrap();
    }

    /// Completed chains of queue `index` (the used ring's index).
    fn used_count(&self, index: u16) -> u16 {
        // Where MockSplitQueue puts the used ring of a 16-entry queue (its avail "end" counts
        // elements, not bytes: 256 + 4 + 16).
        let used = 0x1_0000 * u64::from(index) + 276;
        self.rig.mem.read_obj(GuestAddress(used + 2)).unwrap()
    }

    /// Sends one control command on queue `index`; returns the ack byte.
    fn command(&mut self, index: u16, bytes: &[u8], slot: u16) -> u8 {
        let cmd = BUF + 0x10_0000 + u64::from(slot) * 0x100;
        self.rig.mem.write_slice(bytes, GuestAddress(cmd)).unwrap();
        self.rig
            .mem
            .write_obj(0xffu8, GuestAddress(cmd + 0x80))
            .unwrap();
        // Appended by hand: a MockSplitQueue made again over the same ring would reset it.
        let base = GuestAddress(0x1_0000 * u64::from(index));
        let first = slot * 2;
        for (i, d) in chain(
            &[(cmd, bytes.len() as u32, 0), (cmd + 0x80, 1, WRITE)],
            first,
        )
        .into_iter()
        .enumerate()
        {
            let at = base.unchecked_add(16 * u64::from(first + i as u16));
            self.rig.mem.write_obj(d, at).unwrap();
        }
        let avail = base.unchecked_add(16 * 16);
        let idx: u16 = self.rig.mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot_at = avail.unchecked_add(4 + 2 * u64::from(idx % 16));
        self.rig.mem.write_obj(first, slot_at).unwrap();
        self.rig
            .mem
            .write_obj(idx + 1, avail.unchecked_add(2))
            .unwrap();
        self.net.process_queue(index);
        self.rig.mem.read_obj(GuestAddress(cmd + 0x80)).unwrap()
    }
}

fn features(bits: &[u32]) -> u64 {
    bits.iter().map(|&b| feature(b)).sum::<u64>() | feature(crate::device::VIRTIO_F_VERSION_1)
}

#[test]
fn config_space_has_mac_status_pairs_and_mtu() {
    let d = DeviceRig::new(2);
    let mut c = [0u8; 12];
    d.net.read_config(0, &mut c);
    assert_eq!(&c[0..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1400);
    let f = d.net.avail_features();
    for b in [
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
    ] {
        assert!(f & feature(b) != 0, "feature {b} not offered");
    }
    assert_eq!(d.net.queue_max_sizes().len(), 5);
    assert!(DeviceRig::new(1).net.avail_features() & feature(VIRTIO_NET_F_MQ) == 0);
}

#[test]
fn link_changes_raise_a_config_interrupt_once_status_is_negotiated() {
    let mut d = DeviceRig::new(1);
    let shared = d.net.shared();
    assert!(shared.set_link(false));
    assert!(d.rig.irqs.0.lock().unwrap().is_empty(), "no driver yet");
    d.activate(features(&[VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ]));
    assert!(!shared.set_link(false), "no change");
    assert!(shared.set_link(true));
    assert_eq!(
        *d.rig.irqs.0.lock().unwrap(),
        vec![VirtioInterruptType::Config]
    );
    let mut c = [0u8; 2];
    d.net.read_config(6, &mut c);
    assert_eq!(u16::from_le_bytes(c), 1);
    shared.set_link(false);
    d.net.read_config(6, &mut c);
    assert_eq!(u16::from_le_bytes(c), 0);
}

#[test]
fn control_queue_sets_pairs_and_offloads_and_refuses_the_rest() {
    let mut d = DeviceRig::new(2);
    let acked = features(&[
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
    ]);
    d.activate(acked);
    // The acked receive offloads are on the tap from the start; only pair 0 is attached.
    assert_eq!(
        d.logs[0].lock().unwrap().offload,
        Some(offload::CSUM | offload::TSO4)
    );
    assert_eq!(d.logs[1].lock().unwrap().enabled, Some(false));
    let ctrl = 4;
    assert_eq!(d.command(ctrl, &[4, 0, 2, 0], 0), VIRTIO_NET_OK as u8);
    assert_eq!(d.logs[1].lock().unwrap().enabled, Some(true));
    assert_eq!(
        d.command(ctrl, &[4, 0, 3, 0], 1),
        VIRTIO_NET_ERR as u8,
        "3 > 2 pairs"
    );
    assert_eq!(d.command(ctrl, &[4, 0, 0, 0], 2), VIRTIO_NET_ERR as u8);
    // Offloads: checksums only, then something never negotiated.
    let csum_only = feature(VIRTIO_NET_F_GUEST_CSUM).to_le_bytes();
    let mut cmd = vec![5, 0];
    cmd.extend_from_slice(&csum_only);
    assert_eq!(d.command(ctrl, &cmd, 3), VIRTIO_NET_OK as u8);
    assert_eq!(d.logs[0].lock().unwrap().offload, Some(offload::CSUM));
    let mut cmd = vec![5, 0];
    cmd.extend_from_slice(&feature(VIRTIO_NET_F_GUEST_TSO6).to_le_bytes());
    assert_eq!(d.command(ctrl, &cmd, 4), VIRTIO_NET_ERR as u8);
    // RX mode (CTRL_RX not offered), garbage.
    assert_eq!(d.command(ctrl, &[0, 0, 1], 5), VIRTIO_NET_ERR as u8);
    assert_eq!(d.command(ctrl, &[77], 6), VIRTIO_NET_ERR as u8);
    // Every command completed with its ack byte.
    assert_eq!(d.used_count(ctrl), 7);
}

#[test]
fn without_mq_the_control_queue_is_queue_2() {
    let mut d = DeviceRig::new(2);
    d.activate(features(&[
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
    ]));
    assert_eq!(d.command(2, &[3, 0], 0), VIRTIO_NET_OK as u8);
    assert_eq!(
        d.command(2, &[4, 0, 1, 0], 1),
        VIRTIO_NET_ERR as u8,
        "MQ not acked"
    );
    // One tap, the rate limiter's timer, the limits-changed EventFd.
    assert_eq!(d.net.backend_fds().len(), 3);
}

#[test]
fn reset_gives_the_taps_back_and_activation_works_again() {
    let mut d = DeviceRig::new(2);
    let acked = features(&[VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ]);
    d.activate(acked);
    assert_eq!(d.net.backend_fds().len(), 4);
    d.net.reset();
    assert!(!d.net.is_active());
    assert!(d.net.backend_fds().is_empty());
    d.activate(acked);
    assert!(d.net.is_active());
}

#[test]
fn state_round_trips_and_a_restore_announces() {
    let mut src = DeviceRig::new(2);
    let acked = features(&[
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        VIRTIO_NET_F_GUEST_CSUM,
    ]);
    src.activate(acked);
    assert_eq!(src.command(4, &[4, 0, 2, 0], 0), VIRTIO_NET_OK as u8);
    src.net.shared().set_link(false);
    let saved = src.net.save_state();
    let VirtioDeviceState::Net(s) = &saved else {
        panic!("not a net state")
    };
    assert_eq!((s.active_queue_pairs, s.link_up), (2, false));
    // save -> restore -> save gives equal state, through serde as a snapshot does.
    let json = serde_json::to_string(&saved).unwrap();
    let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
    let mut dst = DeviceRig::new(2);
    dst.net.restore_state(&back).unwrap();
    assert_eq!(dst.net.save_state(), saved);
    // The restored driver's settings reach the taps; the guest is asked to announce itself.
    dst.rig.irqs.0.lock().unwrap().clear();
    dst.net.shared().set_link(true);
    dst.activate(acked);
    assert_eq!(dst.logs[1].lock().unwrap().enabled, Some(true));
    assert_eq!(dst.logs[0].lock().unwrap().offload, Some(offload::CSUM));
    assert_eq!(
        *dst.rig.irqs.0.lock().unwrap(),
        vec![VirtioInterruptType::Config]
    );
    let mut c = [0u8; 2];
    dst.net.read_config(6, &mut c);
    assert_eq!(u16::from_le_bytes(c), 3, "link up + announce");
    assert_eq!(dst.command(4, &[3, 0], 0), VIRTIO_NET_OK as u8);
    dst.net.read_config(6, &mut c);
    assert_eq!(u16::from_le_bytes(c), 1);
}

#[test]
fn restore_refuses_another_nic() {
    let src = DeviceRig::new(2);
    let saved = src.net.save_state();
    let mut other = DeviceRig::new(1);
    let e = other.net.restore_state(&saved).unwrap_err().to_string();
    assert!(e.contains("queue pairs"), "{e}");
    let mut tampered = saved.clone();
    if let VirtioDeviceState::Net(s) = &mut tampered {
        s.active_queue_pairs = 9;
    }
    let mut same = DeviceRig::new(2);
    assert!(same.net.restore_state(&tampered).is_err());
    assert_eq!(same.net.save_state(), DeviceRig::new(2).net.save_state());
    let mut mac = saved;
    if let VirtioDeviceState::Net(s) = &mut mac {
        s.mac = "52:54:00:00:00:01".into();
    }
    assert!(same
        .net
        .restore_state(&mac)
        .unwrap_err()
        .to_string()
        .contains("MAC"));
}

#[test]
fn tx_and_rx_wait_for_the_rate_limiter_without_losing_frames() {
    let r = Rig::new();
    let (rxm, txm) = r.queues();
    let one_per_second = BucketConfig {
        size: 1,
        one_time_burst: 0,
        refill_time: std::time::Duration::from_secs(1),
    };
    let mut tx_limit = RateLimiter::new(None, Some(one_per_second), std::time::Instant::now());
    let mut rx_limit = RateLimiter::new(None, Some(one_per_second), std::time::Instant::now());
    for i in 0..2u16 {
        let at = BUF + u64::from(i) * 0x1000;
        r.mem
            .write_slice(&frame(100, i as u8), GuestAddress(at))
            .unwrap();
        txm.add_desc_chains(&chain(&[(at, 112, 0)], i), i).unwrap();
        rxm.add_desc_chains(
            &chain(&[(BUF + 0x10_000 + u64::from(i) * 0x1000, 2048, WRITE)], i),
            i,
        )
        .unwrap();
    }
    let (mut p, log) = pair(&rxm, &txm);
    log.lock()
        .unwrap()
        .incoming
        .extend([frame(64, 1), frame(64, 2)]);
    assert_eq!(p.process_tx(&r.ctx(true, true), &mut tx_limit).unwrap(), 1);
    assert_eq!(p.process_rx(&r.ctx(true, true), &mut rx_limit).unwrap(), 1);
    let wait = p.throttled_for().expect("throttled");
    assert!(wait > std::time::Duration::from_millis(900), "{wait:?}");
    // The second chain is back on the ring, the second frame held: nothing lost.
    assert_eq!(p.tx_queue().next_avail(), 1);
    assert_eq!(r.used(&txm).len(), 1);
    assert!(p.has_pending());
    // Unlimited again: both go.
    assert_eq!(
        p.process_tx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(
        p.process_rx(&r.ctx(true, true), &mut RateLimiter::default())
            .unwrap(),
        1
    );
    assert_eq!(p.throttled_for(), None);
    assert_eq!(log.lock().unwrap().written.len(), 2);
    assert_eq!(r.counters.snapshot().rx_packets, 2);
}

#[test]
fn new_limits_reach_a_running_device_at_once() {
    let mut d = DeviceRig::new(1);
    d.activate(features(&[]));
    let shared = d.net.shared();
    let one_per_second = BucketConfig {
        size: 1,
        one_time_burst: 0,
        refill_time: std::time::Duration::from_secs(1),
    };
    shared.set_rate_limits(NetRateLimits {
        rx: DirectionLimit::default(),
        tx: DirectionLimit {
            bandwidth: None,
            ops: Some(one_per_second),
        },
    });
    // The limits-changed EventFd is the last backend fd.
    let wake = d.net.backend_fds().len() - 1;
    d.net.process_backend(wake, EventSet::IN);
    let txm = MockSplitQueue::create(&d.rig.mem, GuestAddress(0x1_0000), 16);
    for i in 0..2u16 {
        let at = BUF + u64::from(i) * 0x1000;
        d.rig
            .mem
            .write_slice(&frame(100, i as u8), GuestAddress(at))
            .unwrap();
        txm.add_desc_chains(&chain(&[(at, 112, 0)], i), i).unwrap();
    }
    d.net.process_queue(1);
    assert_eq!(
        d.logs[0].lock().unwrap().written.len(),
        1,
        "the limit was not applied"
    );
    // Lifted at run time: the held frame goes out on the wakeup, without a guest notification.
    shared.set_rate_limits(NetRateLimits::default());
    d.net.process_backend(wake, EventSet::IN);
    assert_eq!(d.logs[0].lock().unwrap().written.len(), 2);
}
