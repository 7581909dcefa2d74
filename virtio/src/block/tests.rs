//! virtio-blk tests driven through `virtio_queue::mock::MockSplitQueue`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::block::{check_range, DiskImage, Error as DiskError};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::request::*;
use super::*;
use crate::device::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const DISK_SIZE: usize = 64 * 1024;

/// An in-memory disk whose state the test can inspect.
#[derive(Default)]
struct DiskState {
    data: Vec<u8>,
    flushes: usize,
    discards: Vec<(u64, u64)>,
    zeroes: Vec<(u64, u64)>,
}

struct MemDisk(Arc<Mutex<DiskState>>, bool);

impl DiskImage for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> devices::block::Result<()> {
        let s = self.0.lock().unwrap();
        check_range(offset, buf.len() as u64, s.data.len() as u64)?;
        buf.copy_from_slice(&s.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> devices::block::Result<()> {
        if self.1 {
            return Err(DiskError::ReadOnly);
        }
        let mut s = self.0.lock().unwrap();
        check_range(offset, buf.len() as u64, s.data.len() as u64)?;
        s.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> devices::block::Result<()> {
        self.0.lock().unwrap().flushes += 1;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> devices::block::Result<()> {
        self.0.lock().unwrap().discards.push((offset, len));
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> devices::block::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.data[offset as usize..(offset + len) as usize].fill(0);
        s.zeroes.push((offset, len));
        Ok(())
    }
}

#[derive(Default)]
struct CountingInterrupt(AtomicUsize);
impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        assert_eq!(t, VirtioInterruptType::Queue(0));
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn all_features() -> u64 {
    crate::device::feature(VIRTIO_BLK_F_FLUSH)
        | crate::device::feature(VIRTIO_BLK_F_DISCARD)
        | crate::device::feature(VIRTIO_BLK_F_WRITE_ZEROES)
}

struct Setup {
    mem: GuestMemoryMmap,
    disk: Arc<Mutex<DiskState>>,
    read_only: bool,
    features: u64,
    limits: BlockLimits,
    stats: Arc<BlockStats>,
}

/// Addresses used by the tests (the mock queue lives at 0).
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const OUTSIDE: u64 = 0x200_0000;

impl Setup {
    fn new() -> Self {
        let data = (0..DISK_SIZE).map(|i| (i / 512) as u8).collect();
        Setup {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
            disk: Arc::new(Mutex::new(DiskState {
                data,
                ..Default::default()
            })),
            read_only: false,
            features: all_features(),
            limits: BlockLimits::for_queue_size(16),
            stats: Arc::new(BlockStats::new()),
        }
    }

    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain of `(addr, len, flags)` descriptors; returns (used len, status byte,
    /// interrupts).
    fn run(&self, descs: &[(u64, u32, u16)]) -> (u32, u8, usize) {
        let mock = MockSplitQueue::new(&self.mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i as u16 + 1))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        self.run_mock(&mock)
    }

    fn run_mock(&self, mock: &MockSplitQueue<GuestMemoryMmap>) -> (u32, u8, usize) {
        let queue: Queue = mock.create_queue().unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let disk = Box::new(MemDisk(self.disk.clone(), self.read_only));
        let exec = RequestExecutor::new(
            disk,
            self.limits,
            self.features,
            *b"serial-0123456789abc",
            self.stats.clone(),
        );
        let mut h = BlockQueueHandler::new(self.mem.clone(), queue, 0, exec, irq.clone());
        assert_eq!(h.process_queue().unwrap(), 1);
        let used = mock.used_addr();
        let used_len: u32 = self.mem.read_obj(used.unchecked_add(8)).unwrap();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used_len, status, irq.0.load(Ordering::SeqCst))
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }
}

use vm_memory::Address;

#[test]
fn read_request() {
    let s = Setup::new();
    s.header(VIRTIO_BLK_T_IN, 3);
    let (len, status, irqs) = s.run(&[(HDR, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!((len, status, irqs), (1025, VIRTIO_BLK_S_OK, 1));
    let d = s.data(1024);
    assert!(d[..512].iter().all(|&b| b == 3) && d[512..].iter().all(|&b| b == 4));
    let st = s.stats.snapshot();
    assert_eq!(
        (st.rd_operations, st.rd_bytes, st.wr_operations),
        (1, 1024, 0)
    );
}

#[test]
fn read_with_status_in_the_data_descriptor() {
    // ANY_LAYOUT: data and status share one writable descriptor.
    let s = Setup::new();
    s.header(VIRTIO_BLK_T_IN, 1);
    s.mem.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    let (len, _, _) = s.run(&[(HDR, 16, 0), (DATA, 513, WRITE)]);
    assert_eq!(len, 513);
    assert_eq!(
        s.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert!(s.data(512).iter().all(|&b| b == 1));
}

#[test]
fn write_request() {
    let s = Setup::new();
    s.header(VIRTIO_BLK_T_OUT, 2);
    s.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    let (len, status, _) = s.run(&[
        (HDR, 16, 0),
        (DATA, 512, 0),
        (DATA + 512, 512, 0),
        (STATUS, 1, WRITE),
    ]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
    let d = s.disk.lock().unwrap();
    assert!(d.data[1024..2048].iter().all(|&b| b == 0xab));
    assert_eq!(d.data[1023], 1);
    assert_eq!(d.data[2048], 4);
    let st = s.stats.snapshot();
    assert_eq!(
        (st.wr_operations, st.wr_bytes, st.wr_highest_offset),
        (1, 1024, 2048)
    );
}

#[test]
fn flush_get_id_and_unknown() {
    let mut s = Setup::new();
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        s.run(&[(HDR, 16, 0), (STATUS, 1, WRITE)]),
        (1, VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(s.disk.lock().unwrap().flushes, 1);

    s.header(VIRTIO_BLK_T_GET_ID, 0);
    let (len, status, _) = s.run(&[(HDR, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
    assert_eq!(&s.data(20), b"serial-0123456789abc");

    s.header(99, 0);
    assert_eq!(
        s.run(&[(HDR, 16, 0), (STATUS, 1, WRITE)]).1,
        VIRTIO_BLK_S_UNSUPP
    );

    // FLUSH, DISCARD and WRITE_ZEROES need their features.
    s.features = 0;
    for t in [
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        s.header(t, 0);
        assert_eq!(
            s.run(&[(HDR, 16, 0), (STATUS, 1, WRITE)]),
            (1, VIRTIO_BLK_S_UNSUPP, 1)
        );
    }
    assert_eq!(s.disk.lock().unwrap().flushes, 1);
    // GET_ID and unknown types are not I/O; unnegotiated ones are refused requests.
    let st = s.stats.snapshot();
    assert_eq!((st.flush_operations, st.invalid_flush_operations), (1, 1));
    assert_eq!(
        (st.invalid_unmap_operations, st.invalid_wr_operations),
        (1, 1)
    );
    assert_eq!(st.rd_operations + st.wr_operations, 0);
}

fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    b
}

#[test]
fn discard_and_write_zeroes() {
    let s = Setup::new();
    s.header(VIRTIO_BLK_T_DISCARD, 0);
    let mut segs = segment(4, 2, 0).to_vec();
    segs.extend_from_slice(&segment(10, 1, 0));
    s.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, WRITE)]).1,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        s.disk.lock().unwrap().discards,
        vec![(2048, 1024), (5120, 512)]
    );

    s.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    s.mem
        .write_slice(&segment(1, 1, 1), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)]).1,
        VIRTIO_BLK_S_OK
    );
    assert!(s.disk.lock().unwrap().data[512..1024]
        .iter()
        .all(|&b| b == 0));

    // Unknown flags (and UNMAP on a discard) are unsupported; nothing runs.
    for (t, flags) in [(VIRTIO_BLK_T_DISCARD, 1), (VIRTIO_BLK_T_WRITE_ZEROES, 2)] {
        s.header(t, 0);
        s.mem
            .write_slice(&segment(1, 1, flags), GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            s.run(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)]).1,
            VIRTIO_BLK_S_UNSUPP
        );
    }
    // Past the end, too many sectors, a partial segment, too many segments: IOERR, and no
    // segment of a rejected request runs.
    let end = (DISK_SIZE / 512) as u64;
    let cases: Vec<(Vec<u8>, u32)> = vec![
        ([segment(0, 1, 0), segment(end, 1, 0)].concat(), 32),
        (segment(0, u32::MAX, 0).to_vec(), 16),
        (segment(0, 1, 0).to_vec(), 12),
        (vec![0u8; 33 * 16], 33 * 16),
    ];
    for (bytes, len) in cases {
        s.header(VIRTIO_BLK_T_DISCARD, 0);
        s.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        assert_eq!(
            s.run(&[(HDR, 16, 0), (DATA, len, 0), (STATUS, 1, WRITE)]),
            (1, VIRTIO_BLK_S_IOERR, 1)
        );
    }
    assert_eq!(s.disk.lock().unwrap().discards.len(), 2);
    let st = s.stats.snapshot();
    assert_eq!((st.unmap_operations, st.unmap_bytes), (1, 1536));
    assert_eq!((st.wr_operations, st.wr_bytes), (1, 512));
    assert_eq!(
        (st.invalid_unmap_operations, st.invalid_wr_operations),
        (5, 1)
    );
}

#[test]
fn out_of_range_requests() {
    let s = Setup::new();
    let last = (DISK_SIZE / 512) as u64 - 1;
    for (t, sector) in [
        (VIRTIO_BLK_T_IN, last),
        (VIRTIO_BLK_T_OUT, last),
        (VIRTIO_BLK_T_IN, u64::MAX / 256),
    ] {
        s.header(t, sector);
        let dir = if t == VIRTIO_BLK_T_IN { WRITE } else { 0 };
        let (len, status, _) = s.run(&[(HDR, 16, 0), (DATA, 1024, dir), (STATUS, 1, WRITE)]);
        assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
    }
    // Not a multiple of the sector size.
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 100, WRITE), (STATUS, 1, WRITE)])
            .1,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(s.disk.lock().unwrap().data[DISK_SIZE - 1], 127);
    let st = s.stats.snapshot();
    assert_eq!((st.invalid_rd_operations, st.invalid_wr_operations), (3, 1));
    assert_eq!(
        st.rd_operations + st.wr_operations + st.failed_rd_operations,
        0
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut s = Setup::new();
    s.read_only = true;
    s.header(VIRTIO_BLK_T_OUT, 0);
    s.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]),
        (1, VIRTIO_BLK_S_IOERR, 1)
    );
    s.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    s.mem
        .write_slice(&segment(0, 1, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)]).1,
        VIRTIO_BLK_S_IOERR
    );
    assert!(s.disk.lock().unwrap().data[..512].iter().all(|&b| b == 0));
    // Reads and flushes still work.
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        s.run(&[(HDR, 16, 0), (STATUS, 1, WRITE)]).1,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn malformed_chains() {
    let mut s = Setup::new();
    // Header too short.
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[(HDR, 8, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)])
            .1,
        VIRTIO_BLK_S_IOERR
    );
    // No writable descriptor at all: nothing can be reported.
    assert_eq!(s.run(&[(HDR, 16, 0), (DATA, 512, 0)]).0, 0);
    // Wrong direction: IN data readable, OUT data writable. The data buffer is left alone.
    s.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]).1,
        VIRTIO_BLK_S_IOERR
    );
    assert!(s.data(512).iter().all(|&b| b == 0x5a));
    s.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]),
        (1, VIRTIO_BLK_S_IOERR, 1)
    );
    assert!(s.data(512).iter().all(|&b| b == 0x5a));
    // A readable descriptor after a writable one.
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[
            (HDR, 16, 0),
            (DATA, 512, WRITE),
            (DATA + 512, 16, 0),
            (STATUS, 1, WRITE)
        ])
        .1,
        VIRTIO_BLK_S_IOERR
    );
    // Outside guest memory: data, header; a status byte outside memory means used len 0.
    assert_eq!(
        s.run(&[(HDR, 16, 0), (OUTSIDE, 512, WRITE), (STATUS, 1, WRITE)])
            .1,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        s.run(&[(OUTSIDE, 16, 0), (STATUS, 1, WRITE)]),
        (1, VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(
        s.run(&[(HDR, 16, 0), (DATA, 512, WRITE), (OUTSIDE, 1, WRITE)])
            .0,
        0
    );
    assert_eq!(
        s.run(&[(HDR, 16, 0), (u64::MAX - 4, 512, WRITE), (STATUS, 1, WRITE)])
            .1,
        VIRTIO_BLK_S_IOERR
    );
    // Oversized descriptor (size_max is 1 MiB).
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[
            (HDR, 16, 0),
            (DATA, (1 << 20) + 512, WRITE),
            (STATUS, 1, WRITE)
        ])
        .1,
        VIRTIO_BLK_S_IOERR
    );
    // Too many descriptors for seg_max.
    s.limits.seg_max = 2;
    let many = [
        (HDR, 16, 0),
        (DATA, 512, WRITE),
        (DATA + 512, 512, WRITE),
        (DATA + 1024, 512, WRITE),
        (STATUS, 1, WRITE),
    ];
    assert_eq!(s.run(&many).1, VIRTIO_BLK_S_IOERR);
    s.limits.seg_max = 3;
    assert_eq!(s.run(&many), (1537, VIRTIO_BLK_S_OK, 1));
}

#[test]
fn looping_and_broken_chains() {
    let s = Setup::new();
    s.header(VIRTIO_BLK_T_IN, 0);
    // The status descriptor chains to itself.
    let mock = MockSplitQueue::new(&s.mem, 16);
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE | NEXT, 1)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    assert_eq!(s.run_mock(&mock).1, VIRTIO_BLK_S_IOERR);
    // A next index past the queue.
    let mock = MockSplitQueue::new(&s.mem, 16);
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE | NEXT, 100)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    assert_eq!(s.run_mock(&mock), (1, VIRTIO_BLK_S_IOERR, 1));
}

#[test]
fn bogus_avail_index_does_not_hang() {
    let s = Setup::new();
    let mock = MockSplitQueue::new(&s.mem, 16);
    mock.avail().idx().store(100);
    let queue: Queue = mock.create_queue().unwrap();
    let exec = RequestExecutor::new(
        Box::new(MemDisk(s.disk.clone(), false)),
        s.limits,
        0,
        [0; 20],
        Arc::default(),
    );
    let mut h = BlockQueueHandler::new(
        s.mem.clone(),
        queue,
        0,
        exec,
        Arc::new(CountingInterrupt::default()),
    );
    assert!(h.process_queue().is_err());
}

#[test]
fn device_config_and_features() {
    let disk = Arc::new(Mutex::new(DiskState {
        data: vec![0; 4096 + 100],
        ..Default::default()
    }));
    let blk = Block::new(Box::new(MemDisk(disk.clone(), false)), Some("abc")).unwrap();
    assert_eq!(blk.capacity(), 8);
    assert_eq!(blk.device_type(), VIRTIO_ID_BLOCK);
    let f = blk.avail_features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let mut b = [0u8; 4];
    blk.read_config(20, &mut b);
    assert_eq!(u32::from_le_bytes(b), 512);
    blk.read_config(12, &mut b);
    assert_eq!(u32::from_le_bytes(b), 254);
    blk.read_config(58, &mut b);
    assert_eq!(b, [0; 4], "reads past the structure are zero");
    blk.read_config(u64::MAX, &mut b);

    let ro = Block::new(Box::new(MemDisk(disk.clone(), true)), None).unwrap();
    let f = ro.avail_features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(
        Block::new(
            Box::new(MemDisk(disk, false)),
            Some("012345678901234567890")
        )
        .err(),
        Some(BlockError::SerialTooLong("012345678901234567890".into()))
    );
}
