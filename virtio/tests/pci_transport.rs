//! virtio-pci transport tests without KVM: enumeration through the PCI root, capability walk,
//! BAR sizing and relocation, feature negotiation, queue setup, MSI-X, activation through the
//! event loop, and reset / re-activation cycles that must not leak fds or threads.

use std::sync::{Arc, Mutex};

use devices::block::{check_range, DiskImage};
use devices::bus::BusDevice;
use devices::pci::msix::test_utils::RecordingMsiGroup;
use devices::pci::{
    BarMoveHandler, BarReprogram, PciBarAllocator, PciBdf, PciConfigMmio, PciDevice, PciRoot,
};
use event_manager::{EventManager, SubscriberOps};
use virtio::block::Block;
use virtio::transport::*;
use virtio::{GuestMemoryMmap, VirtioPciDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

struct VecDisk(Vec<u8>);
impl DiskImage for VecDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> devices::block::Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        buf.copy_from_slice(&self.0[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> devices::block::Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        self.0[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> devices::block::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> devices::block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> devices::block::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Moves(Mutex<Vec<(PciBdf, BarReprogram)>>);
impl BarMoveHandler for Moves {
    fn bar_moved(&self, bdf: PciBdf, mv: &BarReprogram) -> std::io::Result<()> {
        self.0.lock().unwrap().push((bdf, *mv));
        Ok(())
    }
}

struct Fixture {
    _serial: std::sync::MutexGuard<'static, ()>,
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<VirtioPciDevice>>,
    msi: Arc<RecordingMsiGroup>,
    ecam: PciConfigMmio,
    moves: Arc<Moves>,
    slot: u64,
}

/// Serializes the tests of this file, so the fd/thread accounting of the reset test does not
/// see other tests' EventFds.
static SERIAL: Mutex<()> = Mutex::new(());

fn fixture() -> Fixture {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let disk: Vec<u8> = (0..8192).map(|i| (i / 512) as u8).collect();
    let blk = Block::new(Box::new(VecDisk(disk)), Some("disk0")).unwrap();
    let msi = Arc::new(RecordingMsiGroup::default());
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(Box::new(blk), mem.clone(), msi.clone()).unwrap(),
    ));
    let mut alloc = PciBarAllocator::new((0xc000_0000, 0x2000_0000), None).unwrap();
    let bars = dev.lock().unwrap().allocate_bars(&mut alloc).unwrap();
    assert_eq!(bars.len(), 1);
    assert_eq!((bars[0].base, bars[0].size), (0xc000_0000, BAR_SIZE));
    let moves = Arc::new(Moves::default());
    let root = Arc::new(Mutex::new(PciRoot::new(Some(moves.clone()))));
    let bdf = root.lock().unwrap().add_device(dev.clone()).unwrap();
    Fixture {
        _serial: serial,
        mem,
        dev,
        msi,
        ecam: PciConfigMmio::new(root),
        moves,
        slot: u64::from(bdf.device) << 15,
    }
}

impl Fixture {
    fn cfg_read(&mut self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.ecam.read(self.slot + off, &mut d);
        u32::from_le_bytes(d)
    }
    fn cfg_write(&mut self, off: u64, data: &[u8]) {
        self.ecam.write(self.slot + off, data);
    }
    fn bar_write(&self, off: u64, data: &[u8]) {
        self.dev.lock().unwrap().write(off, data);
    }
    fn bar_read32(&self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.dev.lock().unwrap().read(off, &mut d);
        u32::from_le_bytes(d)
    }
    fn status(&self) -> u8 {
        let mut d = [0u8; 1];
        self.dev.lock().unwrap().read(0x14, &mut d);
        d[0]
    }

    /// Capabilities as (offset, id, cfg_type for vendor caps).
    fn caps(&mut self) -> Vec<(u64, u8, u8)> {
        let mut out = Vec::new();
        let mut ptr = u64::from(self.cfg_read(0x34) & 0xff);
        while ptr != 0 && out.len() < 16 {
            let head = self.cfg_read(ptr);
            out.push((ptr, head as u8, (head >> 24) as u8));
            ptr = u64::from((head >> 8) & 0xff);
        }
        out
    }

    /// The Linux driver's sequence up to (not including) DRIVER_OK, with queue 0 at the mock.
    fn negotiate(&self, mock: &MockSplitQueue<GuestMemoryMmap>) {
        self.bar_write(0x14, &[1]);
        self.bar_write(0x14, &[1 | 2]);
        self.bar_write(0x00, &1u32.to_le_bytes());
        let hi = self.bar_read32(0x04);
        self.bar_write(0x00, &0u32.to_le_bytes());
        let lo = self.bar_read32(0x04);
        self.bar_write(0x08, &0u32.to_le_bytes());
        self.bar_write(0x0c, &lo.to_le_bytes());
        self.bar_write(0x08, &1u32.to_le_bytes());
        self.bar_write(0x0c, &hi.to_le_bytes());
        self.bar_write(0x14, &[1 | 2 | 8]);
        assert_eq!(self.status(), 1 | 2 | 8);
        self.bar_write(0x10, &0u16.to_le_bytes());
        self.bar_write(0x16, &0u16.to_le_bytes());
        self.bar_write(0x18, &16u16.to_le_bytes());
        self.bar_write(0x1a, &1u16.to_le_bytes());
        self.bar_write(0x20, &(mock.desc_table_addr().0 as u32).to_le_bytes());
        self.bar_write(0x24, &0u32.to_le_bytes());
        self.bar_write(0x28, &mock.avail_addr().0.to_le_bytes());
        self.bar_write(0x30, &(mock.used_addr().0 as u32).to_le_bytes());
        self.bar_write(0x34, &0u32.to_le_bytes());
        self.bar_write(0x1c, &1u16.to_le_bytes());
    }
}

#[test]
fn enumeration_and_capabilities() {
    let mut f = fixture();
    assert_eq!(f.cfg_read(0), 0x1042_1af4);
    assert_eq!(f.cfg_read(8) >> 8, 0x01_00_00);
    assert_eq!(f.cfg_read(0x2c), 0x1100_1af4);
    assert_ne!(f.cfg_read(4) & (1 << 20), 0, "capability list bit");
    let caps = f.caps();
    assert_eq!(caps[0].1, 0x11, "MSI-X first");
    let types: Vec<u8> = caps[1..].iter().map(|c| c.2).collect();
    assert_eq!(types, vec![1, 2, 3, 4, 5]);
    // MSI-X: 2 vectors, table and PBA in BAR 0.
    let msix = caps[0].0;
    assert_eq!(f.cfg_read(msix) >> 16, 1);
    assert_eq!(f.cfg_read(msix + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(f.cfg_read(msix + 8), MSIX_PBA_OFFSET as u32);
    // Notify capability: BAR 0, offset, multiplier.
    let notify = caps[2].0;
    assert_eq!(f.cfg_read(notify + 4) & 0xff, 0);
    assert_eq!(f.cfg_read(notify + 8), NOTIFY_OFFSET as u32);
    assert_eq!(f.cfg_read(notify + 16), NOTIFY_OFF_MULTIPLIER);
    // ioeventfd addresses follow the BAR.
    let dev = f.dev.lock().unwrap();
    let ev = dev.ioeventfds(0xc000_0000);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, GuestAddress(0xc000_0000 + NOTIFY_OFFSET));
}

#[test]
fn bar_sizing_and_relocation() {
    let mut f = fixture();
    assert_eq!(f.cfg_read(0x10), 0xc000_0004);
    f.cfg_write(0x10, &[0xff; 4]);
    f.cfg_write(0x14, &[0xff; 4]);
    assert_eq!(f.cfg_read(0x10), !(BAR_SIZE as u32 - 1) | 4);
    assert_eq!(f.cfg_read(0x14), 0xffff_ffff);
    f.cfg_write(0x10, &0xd000_0000u32.to_le_bytes());
    f.cfg_write(0x14, &0u32.to_le_bytes());
    assert!(f.moves.0.lock().unwrap().is_empty(), "decoding is off");
    f.cfg_write(0x4, &[0x06, 0x00]);
    let moves = f.moves.0.lock().unwrap().clone();
    assert_eq!(moves.len(), 1);
    assert_eq!(
        (moves[0].1.old_base, moves[0].1.new_base, moves[0].1.len),
        (0xc000_0000, 0xd000_0000, BAR_SIZE)
    );
    assert_eq!(f.dev.lock().unwrap().bar_base(), Some(0xd000_0000));
}

#[test]
fn feature_negotiation_refuses_unknown_features() {
    let f = fixture();
    f.bar_write(0x14, &[1 | 2]);
    // Without VERSION_1.
    f.bar_write(0x08, &0u32.to_le_bytes());
    f.bar_write(0x0c, &(1u32 << 9).to_le_bytes());
    f.bar_write(0x14, &[1 | 2 | 8]);
    assert_eq!(f.status() & 8, 0);
    // With a feature the device does not offer.
    f.bar_write(0x08, &1u32.to_le_bytes());
    f.bar_write(0x0c, &(1u32 | 1 << 20).to_le_bytes());
    f.bar_write(0x14, &[1 | 2 | 8]);
    assert_eq!(f.status() & 8, 0);
    // DRIVER_OK without FEATURES_OK does nothing.
    f.bar_write(0x14, &[1 | 2 | 4]);
    assert_eq!(f.status() & 4, 0);
    assert!(!f.dev.lock().unwrap().device().is_active());
    // Reset clears everything.
    f.bar_write(0x14, &[0]);
    assert_eq!(f.status(), 0);
    f.bar_write(0x08, &1u32.to_le_bytes());
    assert_eq!(f.bar_read32(0x0c), 0);
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Threads of this process other than the test harness's own (named after the tests, which
/// may start while this one runs and wait for the lock).
fn thread_count() -> usize {
    const TESTS: [&str; 5] = [
        "enumeration_and_capabilities",
        "bar_sizing_and_relocation",
        "feature_negotiation_refuses_unknown_features",
        "activation_msix_and_reset_cycles",
        "pci_cfg_capability_window",
    ];
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| {
            let comm = comm.trim_end();
            !TESTS.iter().any(|t| t.starts_with(comm) && comm.len() >= 8)
        })
        .count()
}

#[test]
fn activation_msix_and_reset_cycles() {
    let mut f = fixture();
    let mut em: EventManager<Arc<Mutex<VirtioPciDevice>>> = EventManager::new().unwrap();
    em.add_subscriber(f.dev.clone());
    let msix = f.caps()[0].0;
    // Enable MSI-X with the function masked; program and unmask vector 1.
    f.cfg_write(msix + 2, &0xc000u16.to_le_bytes());
    assert_eq!(f.cfg_read(msix) >> 16, 0xc001);
    f.bar_write(MSIX_TABLE_OFFSET + 16, &0xfee0_0000u32.to_le_bytes());
    f.bar_write(MSIX_TABLE_OFFSET + 24, &0x31u32.to_le_bytes());
    f.bar_write(MSIX_TABLE_OFFSET + 28, &0u32.to_le_bytes());

    let (fds, threads) = (fd_count(), thread_count());
    for round in 0..5u8 {
        let mem = f.mem.clone();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
        f.negotiate(&mock);
        assert_eq!(f.bar_read32(0x18) & 0xffff, 16);
        f.bar_write(0x14, &[1 | 2 | 8 | 4]);
        assert_eq!(f.status(), 0xf);
        assert!(f.dev.lock().unwrap().device().is_active());
        em.run_with_timeout(100).unwrap();
        assert_eq!(f.dev.lock().unwrap().watched_fds(), 1);

        // One read request: header at 0x20_0000, data at 0x20_1000, status at 0x20_2000.
        let mut hdr = [0u8; 16];
        hdr[8] = round;
        mem.write_slice(&hdr, GuestAddress(0x20_0000)).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x20_0000, 16, 1, 1)),
            RawDescriptor::from(Descriptor::new(0x20_1000, 512, 1 | 2, 2)),
            RawDescriptor::from(Descriptor::new(0x20_2000, 1, 2, 0)),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        // Notify through the BAR (as if no ioeventfd were registered).
        f.bar_write(NOTIFY_OFFSET, &0u16.to_le_bytes());
        em.run_with_timeout(100).unwrap();
        let used_idx: u16 = f.mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 1);
        assert_eq!(
            f.mem.read_obj::<u8>(GuestAddress(0x20_1000)).unwrap(),
            round
        );
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(0x20_2000)).unwrap(), 0);
        // Vector 1 is masked by the function mask: pending, not delivered.
        assert!(f.msi.take_triggered().is_empty());
        let mut pba = [0u8; 8];
        f.dev.lock().unwrap().read(MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Clearing the function mask delivers it.
        f.cfg_write(msix + 2, &0x8000u16.to_le_bytes());
        assert_eq!(f.msi.take_triggered(), vec![1]);
        f.cfg_write(msix + 2, &0xc000u16.to_le_bytes());

        // Reset: the device stops and the event loop unwatches the queue.
        f.bar_write(0x14, &[0]);
        assert!(!f.dev.lock().unwrap().device().is_active());
        em.run_with_timeout(100).unwrap();
        assert_eq!(f.dev.lock().unwrap().watched_fds(), 0);
        assert_eq!(fd_count(), fds, "round {round} leaked fds");
        assert!(thread_count() <= threads, "round {round} leaked threads");
    }
}

#[test]
fn pci_cfg_capability_window() {
    let mut f = fixture();
    let cap = f.caps()[5].0;
    // Read the device feature select register (BAR offset 0) through the window.
    f.bar_write(0x00, &1u32.to_le_bytes());
    f.cfg_write(cap + 4, &[0]);
    f.cfg_write(cap + 8, &0u32.to_le_bytes());
    f.cfg_write(cap + 12, &4u32.to_le_bytes());
    assert_eq!(f.cfg_read(cap + 16), 1);
    // Write the status through it.
    f.cfg_write(cap + 8, &0x14u32.to_le_bytes());
    f.cfg_write(cap + 12, &1u32.to_le_bytes());
    f.cfg_write(cap + 16, &[1, 0, 0, 0]);
    assert_eq!(f.status(), 1);
}
