//! A driver's side of virtio queues for device tests: guest memory, `MockSplitQueue`s at fixed
//! places, buffers posted and used entries read back, activation as a driver would do it.

use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    ActivateContext, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};

pub const WRITE: u16 = 2;
pub const QSIZE: u16 = 256;
pub const QSTRIDE: u64 = 0x4000;
/// Where each queue's used ring is, from the queue's start. Not the mock's: virtio-queue 0.18's
/// `MockSplitQueue` places its used ring right after `avail + QSIZE` bytes (the ring's length
/// in entries, not bytes), over the second half of the avail ring, so that a device's used
/// entries overwrote the heads of chains 128 and up.
const USED_AT: u64 = 0x2000;
pub const BUF: u64 = 0x10_0000;

#[derive(Default)]
pub struct Irqs(pub Mutex<Vec<VirtioInterruptType>>);
impl VirtioInterrupt for Irqs {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        self.0.lock().unwrap().push(t);
        Ok(())
    }
}

pub struct Rig {
    /// Leaked: the mock queues borrow it for the whole test (creating a mock again would
    /// reset its ring indices).
    pub mem: &'static GuestMemoryMmap,
    pub mocks: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    /// Next free descriptor slot and next free buffer address, per queue.
    pub slots: Vec<u16>,
    pub next_buf: u64,
    /// Used entries already read, per queue.
    pub seen: Vec<u16>,
    /// Buffer address by (queue, descriptor slot).
    pub addrs: std::collections::HashMap<(usize, u16), u64>,
}

impl Rig {
    pub fn new(queues: usize) -> Rig {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap(),
        ));
        Rig {
            mem,
            mocks: (0..queues)
                .map(|q| MockSplitQueue::create(mem, GuestAddress(q as u64 * QSTRIDE), QSIZE))
                .collect(),
            slots: vec![0; queues],
            next_buf: BUF,
            seen: vec![0; queues],
            addrs: Default::default(),
        }
    }

    /// Queue `q`'s used ring (see [`USED_AT`]).
    pub fn used_addr(&self, q: usize) -> GuestAddress {
        GuestAddress(q as u64 * QSTRIDE + USED_AT)
    }

    pub fn mock(&self, q: usize) -> &MockSplitQueue<'static, GuestMemoryMmap> {
        &self.mocks[q]
    }

    pub fn activate(&self, dev: &mut dyn VirtioDevice) {
        let features = dev.avail_features();
        self.activate_with(dev, features);
    }

    /// Activates `dev` as a driver accepting `acked_features` would.
    pub fn activate_with(&self, dev: &mut dyn VirtioDevice, acked_features: u64) {
        let n = dev.queue_max_sizes().len();
        let mut queues = Vec::new();
        for q in 0..n {
            let m = self.mock(q);
            // As Linux negotiates it: the driver notifies only past the device's avail_event.
            let mut queue: Queue = m.create_queue().unwrap();
            let used = self.used_addr(q);
            queue.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
            queue.set_event_idx(true);
            queues.push(ActiveQueue {
                index: q as u16,
                queue,
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            });
        }
        dev.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: Arc::new(Irqs::default()),
            acked_features,
        })
        .unwrap();
    }

    pub fn buf(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(0x1000);
        a
    }

    /// Posts a chain of one descriptor on queue `q`: readable with `data`, or writable of `len`.
    pub fn post(&mut self, q: usize, data: Option<&[u8]>, len: u32) -> u64 {
        let len = data.map_or(len, |d| d.len() as u32);
        let addr = self.buf(len);
        let flags = match data {
            Some(d) => {
                self.mem.write_slice(d, GuestAddress(addr)).unwrap();
                0
            }
            None => WRITE,
        };
        let slot = self.slots[q];
        self.slots[q] += 1;
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
        self.mock(q).add_desc_chains(&[d], slot).unwrap();
        addr
    }

    /// Posts a chain of one device-writable descriptor at `addr` (a buffer the test placed).
    pub fn post_writable_at(&mut self, q: usize, addr: u64, len: u32) {
        let slot = self.slots[q];
        self.slots[q] += 1;
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, WRITE, 0));
        self.mock(q).add_desc_chains(&[d], slot).unwrap();
    }

    /// New used entries of queue `q`: (descriptor id, length).
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let base = self.used_addr(q);
        let idx: u16 = self.mem.read_obj(base.unchecked_add(2)).unwrap();
        let from = self.seen[q];
        self.seen[q] = idx;
        (from..idx)
            .map(|i| {
                let e = base.unchecked_add(4 + 8 * u64::from(i));
                (
                    self.mem.read_obj(e).unwrap(),
                    self.mem.read_obj(e.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }

    /// The avail_event the device published for queue `q` (after the used ring).
    pub fn avail_event(&self, q: usize) -> u16 {
        let at = self.used_addr(q).unchecked_add(4 + 8 * u64::from(QSIZE));
        self.mem.read_obj(at).unwrap()
    }

    /// `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
