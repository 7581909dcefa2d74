//! Snapshot tests of the virtio-pci transport with a block device: a device driven through its
//! BAR and configuration space into a running state is saved, restored into a fresh device over
//! the same guest memory and disk (as a new process would see them after loading the memory),
//! and must carry on where it stopped; hostile states are refused without changing the device.

use std::sync::{Arc, Mutex};

use devices::block::{check_range, DiskImage};
use devices::bus::BusDevice;
use devices::pci::msix::test_utils::RecordingMsiGroup;
use devices::pci::{MsiMessage, PciBarAllocator, PciDevice};
use devices::persist::assert_round_trip;
use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::block::Block;
use crate::transport::{MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFFSET};
use crate::GuestMemoryMmap;

/// A disk whose bytes and flush count the test can see, shared by the saved and the restored
/// device.
#[derive(Default)]
struct DiskData {
    bytes: Vec<u8>,
    flushes: usize,
}

struct SharedDisk(Arc<Mutex<DiskData>>);

impl DiskImage for SharedDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().bytes.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> devices::block::Result<()> {
        let d = self.0.lock().unwrap();
        check_range(off, buf.len() as u64, d.bytes.len() as u64)?;
        buf.copy_from_slice(&d.bytes[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> devices::block::Result<()> {
        let mut d = self.0.lock().unwrap();
        check_range(off, buf.len() as u64, d.bytes.len() as u64)?;
        d.bytes[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> devices::block::Result<()> {
        self.0.lock().unwrap().flushes += 1;
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> devices::block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> devices::block::Result<()> {
        Ok(())
    }
}

const BAR_BASE: u64 = 0xc000_0000;
const MOVED_BAR: u64 = 0xd000_0000;
const QUEUE_BASE: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 16;
/// The used ring, apart from the mock's (which overlaps the end of its available ring, where
/// `used_event` lives).
const USED_RING: u64 = QUEUE_BASE + 0x1000;
const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x20_1000;
const STATUS: u64 = 0x20_2000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// A disk of `sectors` sectors, each filled with its own number.
fn disk(sectors: usize) -> Arc<Mutex<DiskData>> {
    Arc::new(Mutex::new(DiskData {
        bytes: (0..sectors * 512).map(|i| (i / 512) as u8).collect(),
        flushes: 0,
    }))
}

/// A block device on virtio-pci with its BAR allocated, as the VMM builds it.
fn new_device(
    mem: &GuestMemoryMmap,
    disk: &Arc<Mutex<DiskData>>,
) -> (VirtioPciDevice, Arc<RecordingMsiGroup>) {
    let blk = Block::new(Box::new(SharedDisk(disk.clone())), Some("disk0")).unwrap();
    let msi = Arc::new(RecordingMsiGroup::default());
    let mut dev = VirtioPciDevice::new(Box::new(blk), mem.clone(), msi.clone()).unwrap();
    let mut alloc = PciBarAllocator::new((BAR_BASE, 0x2000_0000), None).unwrap();
    dev.allocate_bars(&mut alloc).unwrap();
    (dev, msi)
}

fn read32(dev: &mut VirtioPciDevice, off: u64) -> u32 {
    let mut d = [0u8; 4];
    dev.read(off, &mut d);
    u32::from_le_bytes(d)
}

fn status(dev: &mut VirtioPciDevice) -> u8 {
    let mut d = [0u8];
    dev.read(0x14, &mut d);
    d[0]
}

/// A configuration-space write at byte `off`, applying the BAR moves as the PCI root does.
fn cfg_write(dev: &mut VirtioPciDevice, off: usize, data: &[u8]) {
    for mv in dev.write_config_register(off / 4, (off % 4) as u64, data) {
        dev.move_bar(mv.old_base, mv.new_base).unwrap();
    }
}

/// Enables MSI-X and programs both vectors; vector 0 (configuration) stays masked, vector 1
/// (queue 0) is unmasked.
fn set_up_msix(dev: &mut VirtioPciDevice) {
    let cap = dev.msix_cap;
    cfg_write(dev, cap + 2, &0x8000u16.to_le_bytes());
    for v in 0..2u64 {
        let entry = MSIX_TABLE_OFFSET + v * 16;
        dev.write(entry, &(0xfee0_0000 + v as u32 * 0x1000).to_le_bytes());
        dev.write(entry + 8, &(0x30 + v as u32).to_le_bytes());
    }
    dev.write(MSIX_TABLE_OFFSET + 16 + 12, &0u32.to_le_bytes());
}

/// Moves BAR 0 the way Linux reassigns it: decoding off, new address, decoding on.
fn move_bar(dev: &mut VirtioPciDevice) {
    cfg_write(dev, 0x10, &(MOVED_BAR as u32).to_le_bytes());
    cfg_write(dev, 0x14, &0u32.to_le_bytes());
    cfg_write(dev, 0x04, &[0x06, 0x00]);
    assert_eq!(dev.bar_base(), Some(MOVED_BAR));
}

/// Linux's driver sequence up to (not including) DRIVER_OK: every offered feature, queue 0 at
/// the mock with vector 1, configuration vector 0.
fn negotiate(dev: &mut VirtioPciDevice, mock: &MockSplitQueue<GuestMemoryMmap>) {
    dev.write(0x14, &[1]);
    dev.write(0x14, &[1 | 2]);
    for select in 0..2u32 {
        dev.write(0x00, &select.to_le_bytes());
        let offered = read32(dev, 0x04);
        dev.write(0x08, &select.to_le_bytes());
        dev.write(0x0c, &offered.to_le_bytes());
    }
    dev.write(0x14, &[1 | 2 | 8]);
    assert_eq!(status(dev), 1 | 2 | 8);
    dev.write(0x10, &0u16.to_le_bytes());
    dev.write(0x16, &0u16.to_le_bytes());
    dev.write(0x18, &QUEUE_SIZE.to_le_bytes());
    dev.write(0x1a, &1u16.to_le_bytes());
    dev.write(0x20, &mock.desc_table_addr().0.to_le_bytes());
    dev.write(0x28, &mock.avail_addr().0.to_le_bytes());
    dev.write(0x30, &USED_RING.to_le_bytes());
    dev.write(0x1c, &1u16.to_le_bytes());
}

/// Queues a one-sector read of `sector` with its descriptors from index `first` on.
fn submit_read(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
    sector: u8,
    first: u16,
) {
    let mut hdr = [0u8; 16];
    hdr[8] = sector;
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, NEXT, first + 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, NEXT | WRITE, first + 2)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
    ];
    mock.add_desc_chains(&descs, first).unwrap();
}

/// The driver's `used_event` (VIRTIO_RING_F_EVENT_IDX): interrupt once the used index passes it.
fn set_used_event(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, idx: u16) {
    let addr = mock
        .avail_addr()
        .unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
    mem.write_obj(idx, addr).unwrap();
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
}

/// What the guest can read of the device without side effects: configuration space, common
/// configuration, MSI-X table and PBA.
fn guest_view(dev: &mut VirtioPciDevice) -> Vec<u32> {
    let mut view: Vec<u32> = (0..64).map(|r| dev.read_config_register(r)).collect();
    view.extend((0..0x38).step_by(4).map(|o| read32(dev, o)));
    view.extend(
        (0..32)
            .step_by(4)
            .map(|o| read32(dev, MSIX_TABLE_OFFSET + o)),
    );
    view.push(read32(dev, MSIX_PBA_OFFSET));
    view
}

/// A running block device: MSI-X programmed, BAR moved, one request completed, a configuration
/// interrupt pending behind its masked vector.
struct Running {
    mem: GuestMemoryMmap,
    disk: Arc<Mutex<DiskData>>,
    dev: Arc<Mutex<VirtioPciDevice>>,
    msi: Arc<RecordingMsiGroup>,
    mock: MockSplitQueue<'static, GuestMemoryMmap>,
    _em: EventManager<Arc<Mutex<VirtioPciDevice>>>,
}

fn running() -> Running {
    // The mock borrows the memory for the whole test.
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory()));
    let disk = disk(16);
    let (dev, msi) = new_device(mem, &disk);
    let dev = Arc::new(Mutex::new(dev));
    let mut em = EventManager::new().unwrap();
    em.add_subscriber(dev.clone());
    let mock = MockSplitQueue::create(mem, GuestAddress(QUEUE_BASE), QUEUE_SIZE);
    {
        let mut d = dev.lock().unwrap();
        set_up_msix(&mut d);
        move_bar(&mut d);
        // The VIRTIO_PCI_CAP_PCI_CFG window, aimed at the device status (device-emulated
        // bytes of configuration space).
        let cap = d.pci_cfg_cap;
        cfg_write(&mut d, cap + 4, &[0]);
        cfg_write(&mut d, cap + 8, &0x14u32.to_le_bytes());
        cfg_write(&mut d, cap + 12, &1u32.to_le_bytes());
        negotiate(&mut d, &mock);
        d.write(0x14, &[1 | 2 | 8 | 4]);
        assert!(d.device().is_active());
        d.notify_config_change().unwrap();
    }
    em.run_with_timeout(100).unwrap();
    submit_read(mem, &mock, 3, 0);
    dev.lock()
        .unwrap()
        .write(NOTIFY_OFFSET, &0u16.to_le_bytes());
    em.run_with_timeout(100).unwrap();
    assert_eq!(used_idx(mem), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 3);
    assert_eq!(msi.take_triggered(), vec![1]);
    Running {
        mem: mem.clone(),
        disk,
        dev,
        msi,
        mock,
        _em: em,
    }
}

#[test]
fn running_device_round_trips_and_carries_on() {
    let src = running();
    src.dev.lock().unwrap().quiesce().unwrap();
    assert_eq!(
        src.disk.lock().unwrap().flushes,
        1,
        "quiesce flushes the image"
    );

    let (mut dst, msi) = new_device(&src.mem, &src.disk);
    let state = assert_round_trip(&*src.dev.lock().unwrap(), &mut dst);
    assert!(state.active);
    let q = state.queues[0];
    assert_eq!((q.next_avail, q.next_used, q.event_idx), (1, 1, true));
    assert_eq!(state.msix.pba[0], 1, "the configuration vector is pending");
    assert_eq!(state.isr, 3);

    // The guest sees the same device, at the address it moved the BAR to.
    assert!(dst.device().is_active());
    assert_eq!(dst.bar_base(), Some(MOVED_BAR));
    assert_eq!(dst.bar_regions()[0].base, MOVED_BAR);
    assert_eq!(
        dst.ioeventfds(MOVED_BAR)[0].0,
        GuestAddress(MOVED_BAR + NOTIFY_OFFSET)
    );
    assert_eq!(
        guest_view(&mut dst),
        guest_view(&mut src.dev.lock().unwrap())
    );
    assert_eq!(status(&mut dst), 0xf);
    let window = dst.pci_cfg_cap / 4 + 4;
    assert_eq!(dst.read_config_register(window) & 0xff, 0xf);
    // One route per vector, with the restored messages and masks.
    assert_eq!(
        msi.updates.lock().unwrap().clone(),
        vec![
            (
                0,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x30
                },
                true
            ),
            (
                1,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x31
                },
                false
            ),
        ]
    );
    assert!(msi.take_triggered().is_empty(), "the queue was empty");

    // The next request is taken from where the saved device stopped, and signalled.
    let dst = Arc::new(Mutex::new(dst));
    let mut em = EventManager::new().unwrap();
    em.add_subscriber(dst.clone());
    em.run_with_timeout(0).unwrap();
    set_used_event(&src.mem, &src.mock, 1);
    submit_read(&src.mem, &src.mock, 5, 3);
    dst.lock()
        .unwrap()
        .write(NOTIFY_OFFSET, &0u16.to_le_bytes());
    em.run_with_timeout(100).unwrap();
    assert_eq!(used_idx(&src.mem), 2);
    assert_eq!(src.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 5);
    assert_eq!(src.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(msi.take_triggered(), vec![1]);
    assert!(src.msi.take_triggered().is_empty());
    // The pending configuration interrupt fires when the driver unmasks its vector.
    dst.lock()
        .unwrap()
        .write(MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
    assert_eq!(msi.take_triggered(), vec![0]);
}

#[test]
fn a_request_left_in_the_queue_is_processed_after_the_restore_kick() {
    let src = running();
    // Queued after the snapshot was cut, with its notification lost.
    let state = src.dev.lock().unwrap().save();
    set_used_event(&src.mem, &src.mock, 1);
    submit_read(&src.mem, &src.mock, 7, 3);
    let (mut dst, msi) = new_device(&src.mem, &src.disk);
    dst.restore(&state).unwrap();
    // Restore itself processes nothing: the vCPUs that would take the interrupt do not exist
    // yet. The VMM kicks the queues once they do, and the event loop processes them.
    assert_eq!(used_idx(&src.mem), 1);
    assert!(msi.take_triggered().is_empty());
    dst.kick_queues();
    assert_eq!(dst.queue_evts[0].read().unwrap(), 1);
    dst.device.process_queue(0);
    assert_eq!(used_idx(&src.mem), 2);
    assert_eq!(src.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 7);
    assert_eq!(msi.take_triggered(), vec![1]);
    assert_eq!(dst.save().queues[0].next_used, 2);
}

#[test]
fn hostile_states_are_refused_and_change_nothing() {
    let src = running();
    let good = src.dev.lock().unwrap().save();
    let (mut dst, msi) = new_device(&src.mem, &src.disk);
    let fresh = dst.save();

    let mut cases: Vec<(&str, VirtioPciState)> = Vec::new();
    let mut add = |what, f: &dyn Fn(&mut VirtioPciState)| {
        let mut s = good.clone();
        f(&mut s);
        cases.push((what, s));
    };
    add("queue size 3", &|s| s.queues[0].size = 3);
    add("queue size 0", &|s| s.queues[0].size = 0);
    add("queue larger than offered", &|s| s.queues[0].size = 512);
    add("ring outside memory", &|s| {
        s.queues[0].desc_table = 0x1000_0000
    });
    add("ring across the end", &|s| {
        s.queues[0].used_ring = 0xff_fff0
    });
    add("misaligned ring", &|s| s.queues[0].avail_ring = 0x10_0001);
    add("config vector 999", &|s| s.config_vector = 999);
    add("queue vector 999", &|s| s.queue_vectors[0] = 999);
    add("unknown driver features", &|s| {
        s.common.driver_features |= 1 << 50
    });
    add("offered features differ", &|s| {
        s.common.device_features ^= 1 << 9
    });
    add("two queues", &|s| {
        s.queues.push(s.queues[0]);
        s.queue_vectors.push(1);
    });
    add("more vectors than queues", &|s| s.queue_vectors.push(1));
    add("other max size", &|s| s.queues[0].max_size = 128);
    add("unknown ISR bits", &|s| s.isr = 0x80);
    add("DRIVER_OK without FEATURES_OK", &|s| {
        s.common.status = 1 | 2 | 4
    });
    add("running without DRIVER_OK", &|s| {
        s.common.status = 1 | 2 | 8
    });
    add("DRIVER_OK but not running", &|s| s.active = false);
    add("other MSI-X table", &|s| {
        s.msix.table.pop();
    });
    add("unmasked pending vector", &|s| s.msix.pba[0] = 2);
    add("other PCI identity", &|s| s.pci.registers[0] = 0x1041_1af4);
    add("misaligned BAR", &|s| {
        s.pci.bars[0].mapped = MOVED_BAR + 0x1000
    });
    add("other disk", &|s| {
        if let VirtioDeviceState::Block(b) = &mut s.device {
            b.capacity_sectors += 1;
        }
    });
    for (what, bad) in &cases {
        let err = dst.restore(bad).expect_err(what);
        assert_eq!(dst.save(), fresh, "{what} ({err}) changed the device");
        assert!(!dst.device().is_active(), "{what}");
    }
    assert!(msi.updates.lock().unwrap().is_empty(), "no route pushed");

    // Passes the checks but the block device refuses to start without its queue: rolled back.
    let mut no_queue = good.clone();
    no_queue.queues[0].ready = false;
    let err = dst.restore(&no_queue).unwrap_err();
    assert!(err.to_string().contains("activated"), "{err}");
    assert_eq!(dst.save(), fresh);

    // A device that runs is not a restore target.
    dst.restore(&good).unwrap();
    assert!(matches!(dst.restore(&good), Err(RestoreError::Mismatch(_))));
}

#[test]
fn a_changed_disk_is_named_in_the_error() {
    let src = running();
    let state = src.dev.lock().unwrap().save();
    let (mut dst, _) = new_device(&src.mem, &disk(17));
    let err = dst.restore(&state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "device: disk size changed: the snapshot has 16 sectors, the image has 17"
    );
}

#[test]
fn a_device_without_driver_ok_is_not_activated() {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory()));
    let data = disk(16);
    let (mut src, _) = new_device(mem, &data);
    let mock = MockSplitQueue::create(mem, GuestAddress(QUEUE_BASE), QUEUE_SIZE);
    set_up_msix(&mut src);
    negotiate(&mut src, &mock);

    let (dst, msi) = new_device(mem, &data);
    let dst = Arc::new(Mutex::new(dst));
    let state = assert_round_trip(&src, &mut *dst.lock().unwrap());
    assert!(!state.active);
    assert!(!dst.lock().unwrap().device().is_active());
    assert_eq!(status(&mut dst.lock().unwrap()), 1 | 2 | 8);
    // Quiescing an idle device flushes its disk too.
    dst.lock().unwrap().quiesce().unwrap();
    assert_eq!(data.lock().unwrap().flushes, 1);

    // The driver finishes its setup on the restored device, which then works.
    let mut em = EventManager::new().unwrap();
    em.add_subscriber(dst.clone());
    dst.lock().unwrap().write(0x14, &[1 | 2 | 8 | 4]);
    assert!(dst.lock().unwrap().device().is_active());
    em.run_with_timeout(100).unwrap();
    submit_read(mem, &mock, 9, 0);
    dst.lock()
        .unwrap()
        .write(NOTIFY_OFFSET, &0u16.to_le_bytes());
    em.run_with_timeout(100).unwrap();
    assert_eq!(used_idx(mem), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 9);
    assert_eq!(msi.take_triggered(), vec![1]);
}
