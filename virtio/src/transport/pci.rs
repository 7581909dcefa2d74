//! [`VirtioPciDevice`]: configuration space, BAR 0 register dispatch, and the device status
//! state machine of the modern virtio-pci transport.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devices::bus::BusDevice;
use devices::pci::config::{PciConfiguration, PciHeader};
use devices::pci::msix::MSIX_CAP_ID;
use devices::pci::{
    BarReprogram, MsiInterruptGroup, MsixConfig, PciBarAllocator, PciBarRegion, PciBarRegionType,
    PciDevice, PciError,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::common_cfg::CommonConfig;
use super::interrupt::{as_dyn, PciInterrupt};
use super::*;
use crate::device::{
    feature, ActivateContext, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Vendor-specific capability id used by virtio.
const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Index of the one BAR.
pub(super) const BAR_INDEX: u8 = 0;

/// The body of a `virtio_pci_cap` (after id and next pointer), plus `extra` trailing bytes.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, cfg_type, BAR_INDEX, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// PCI class (class, subclass) for a virtio device type, as QEMU reports them.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // net: ethernet
        2 => (0x01, 0x00), // block: mass storage (SCSI)
        3 => (0x07, 0x80), // console: other communication
        _ => (0xff, 0x00), // balloon, rng, ...: unclassified
    }
}

pub(super) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A virtio device on PCI (modern interface only).
pub struct VirtioPciDevice {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) config: PciConfiguration,
    pub(super) common: CommonConfig,
    pub(super) interrupt: Arc<PciInterrupt>,
    pub(super) msix: Arc<Mutex<MsixConfig>>,
    pub(super) msix_cap: usize,
    pub(super) pci_cfg_cap: usize,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) state_evt: EventFd,
    pub(super) mem: GuestMemoryMmap,
    pub(super) bar_base: Option<u64>,
    /// (fd, token) pairs currently registered with the event manager.
    pub(super) registered: Vec<(RawFd, u32)>,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("type", &self.device.device_type())
            .field("status", &self.common.status)
            .field("bar_base", &self.bar_base)
            .finish()
    }
}

impl VirtioPciDevice {
    /// Wraps `device`. It gets one MSI-X vector per queue plus one for configuration changes,
    /// signalled through `msi` (the VMM's GSI routes / irqfds for this device).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiInterruptGroup>,
    ) -> Result<Self, VirtioPciError> {
        let sizes = device.queue_max_sizes().to_vec();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::Queues("a device needs 1..=1024 queues"));
        }
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|_| VirtioPciError::Queues("bad queue size")))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..sizes.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(VirtioPciError::EventFd)?;
        let state_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?;
        let num_vectors = sizes.len() as u16 + 1;
        let msix = MsixConfig::new(num_vectors, msi)?;

        let device_type = device.device_type();
        let (class, subclass) = class_of(device_type);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            revision_id: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x1100,
        });
        let msix_body = msix.capability_body(
            BAR_INDEX,
            MSIX_TABLE_OFFSET as u32,
            BAR_INDEX,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(MSIX_CAP_ID, &msix_body)?;
        let caps = [
            virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE,
                &[],
            ),
            virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                sizes.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
            virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE,
                &[],
            ),
        ];
        for cap in &caps {
            config.add_capability(PCI_CAP_ID_VNDR, cap)?;
        }
        let pci_cfg_cap = config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]),
        )?;
        // The window's bar, offset and length fields are the guest's (see
        // `write_config_register`), written with `write_raw`.
        config.mark_emulated(pci_cfg_cap + 4, 1);
        config.mark_emulated(pci_cfg_cap + 8, 8);

        let device_features = device.avail_features() | feature(VIRTIO_F_VERSION_1);
        let msix = Arc::new(Mutex::new(msix));
        Ok(VirtioPciDevice {
            interrupt: Arc::new(PciInterrupt::new(msix.clone(), sizes.len())),
            device,
            config,
            common: CommonConfig::new(device_features, queues),
            msix,
            msix_cap,
            pci_cfg_cap,
            queue_evts,
            state_evt,
            mem,
            bar_base: None,
            registered: Vec::new(),
        })
    }

    /// Number of MSI-X vectors (queues + 1); the VMM sizes its interrupt group with it.
    pub fn msix_vectors(&self) -> u16 {
        self.common.queues.len() as u16 + 1
    }

    /// Where BAR 0 is mapped, once allocated.
    pub fn bar_base(&self) -> Option<u64> {
        self.bar_base
    }

    /// The BAR regions to put on the MMIO bus (this device as the `BusDevice`).
    pub fn bar_regions(&self) -> Vec<PciBarRegion> {
        self.config.bars()
    }

    /// The notification addresses for BAR 0 at `bar_base`: one `(address, queue, EventFd)` per
    /// queue, to register as KVM ioeventfds (any access length, no datamatch). The EventFds live
    /// as long as this device, across resets.
    pub fn ioeventfds(&self, bar_base: u64) -> Vec<(GuestAddress, u16, &EventFd)> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(i, evt)| {
                let off = NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                (GuestAddress(bar_base + off), i as u16, evt)
            })
            .collect()
    }

    /// Signals every ready queue's notification EventFd, as if the driver had notified it:
    /// after a restore, a notification that arrived while the state was taken is replayed
    /// (processing a queue with nothing new is harmless).
    pub fn kick_queues(&self) {
        for (q, evt) in self.common.queues.iter().zip(&self.queue_evts) {
            if q.ready() && self.device.is_active() {
                let _ = evt.write(1);
            }
        }
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.status
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Signals a configuration change to the driver (e.g. after a disk resize).
    pub fn notify_config_change(&mut self) -> io::Result<()> {
        self.common.config_generation = self.common.config_generation.wrapping_add(1);
        self.interrupt.trigger(VirtioInterruptType::Config)
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.common.status;
        // Bits are only ever added until a reset.
        let mut new = old | value;
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let drv = self.common.driver_features;
            let unknown = drv & !self.common.device_features;
            if unknown != 0 || drv & feature(VIRTIO_F_VERSION_1) == 0 {
                log::warn!("virtio-pci: refusing features {drv:#x} (unknown {unknown:#x})");
                new &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 {
                new &= !STATUS_DRIVER_OK;
            } else {
                self.common.status = new;
                if let Err(e) = self.activate() {
                    log::error!("virtio-pci: activating the device failed: {e}");
                    self.common.status |= STATUS_DEVICE_NEEDS_RESET;
                    let _ = self.notify_config_change();
                }
                return;
            }
        }
        self.common.status = new;
    }

    /// Starts the device from the queues as configured in the common configuration (with the
    /// positions a restore put there): the DRIVER_OK path and the restore path share it.
    pub(super) fn activate(&mut self) -> Result<(), crate::ActivateError> {
        let acked = self.common.driver_features;
        let mut queues = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let mut queue = Queue::try_from(q.state())
                .map_err(|_| crate::ActivateError::InvalidQueue(i as u16))?;
            queue.set_event_idx(acked & feature(VIRTIO_RING_F_EVENT_IDX) != 0);
            if !queue.is_valid(&self.mem) {
                return Err(crate::ActivateError::InvalidQueue(i as u16));
            }
            queues.push(ActiveQueue {
                index: i as u16,
                queue,
                notify: self.queue_evts[i].try_clone()?,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = as_dyn(&self.interrupt);
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt,
            acked_features: acked,
        })?;
        // Tell the event loop to start watching the queues.
        self.state_evt.write(1)?;
        Ok(())
    }

    /// Completes the device's in-flight work and flushes its backends, before the VM's state is
    /// taken ([`VirtioDevice::quiesce`]).
    pub fn quiesce(&mut self) -> io::Result<()> {
        self.device.quiesce()
    }

    /// See [`VirtioDevice::resume`].
    pub fn resume(&mut self) {
        self.device.resume()
    }

    /// See [`VirtioDevice::hand_over_storage`].
    pub fn hand_over_storage(&mut self) -> io::Result<()> {
        self.device.hand_over_storage()
    }

    /// See [`VirtioDevice::disk`].
    pub fn disk(&mut self) -> Option<&mut dyn devices::block::DiskImage> {
        self.device.disk()
    }

    /// See [`VirtioDevice::set_dirty_log`].
    pub fn set_dirty_log(
        &mut self,
        log: Option<std::sync::Arc<crate::dirty_log::VhostLog>>,
    ) -> io::Result<()> {
        self.device.set_dirty_log(log)
    }

    /// See [`VirtioDevice::take_back_storage`].
    pub fn take_back_storage(&mut self) -> io::Result<()> {
        self.device.take_back_storage()
    }

    fn reset(&mut self) {
        self.device.reset();
        self.common.reset();
        self.interrupt.reset();
        for evt in &self.queue_evts {
            // Drop stale notifications; "nothing pending" is the expected error.
            let _ = evt.read();
        }
        if let Err(e) = self.state_evt.write(1) {
            log::error!("virtio-pci: signalling the reset to the event loop failed: {e}");
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => {
                self.common
                    .read(o - COMMON_CFG_OFFSET, data, &self.interrupt)
            }
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                if let Some(b) = data.first_mut() {
                    *b = self
                        .interrupt
                        .isr
                        .swap(0, std::sync::atomic::Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => {
                let vectors = self.msix_vectors();
                if let Some(status) =
                    self.common
                        .write(o - COMMON_CFG_OFFSET, data, &self.interrupt, vectors)
                {
                    self.set_status(status);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Only reached when the VMM did not register the ioeventfd (or in tests).
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(evt) = usize::try_from(q).ok().and_then(|q| self.queue_evts.get(q)) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("virtio-pci: queue {q} notification failed: {e}");
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    /// The `VIRTIO_PCI_CAP_PCI_CFG` window: `(bar, offset, length)` as programmed.
    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let cap = self.pci_cfg_cap;
        let bar = (self.config.read_reg(cap / 4 + 1) & 0xff) as u8;
        let offset = u64::from(self.config.read_reg(cap / 4 + 2));
        let length = self.config.read_reg(cap / 4 + 3) as usize;
        (bar, offset, length)
    }

    fn pci_cfg_access_ok(&self) -> Option<(u64, usize)> {
        let (bar, offset, length) = self.pci_cfg_window();
        let ok = bar == BAR_INDEX
            && matches!(length, 1 | 2 | 4)
            && offset % length as u64 == 0
            && offset + length as u64 <= BAR_SIZE;
        ok.then_some((offset, length))
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        let mut value = self.config.read_reg(reg_idx);
        if reg_idx == self.msix_cap / 4 {
            let ctl = lock(&self.msix).message_control();
            value = (value & 0xffff) | (u32::from(ctl) << 16);
        } else if reg_idx == self.pci_cfg_cap / 4 + 4 {
            if let Some((offset, length)) = self.pci_cfg_access_ok() {
                let mut buf = [0u8; 4];
                self.bar_read(offset, &mut buf[..length]);
                value = u32::from_le_bytes(buf);
            }
        }
        value
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogram> {
        let cfg_cap = self.pci_cfg_cap / 4;
        if reg_idx == self.msix_cap / 4 {
            // Only the message control half is writable.
            let mut reg = (u32::from(lock(&self.msix).message_control()) << 16).to_le_bytes();
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = reg.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
            if offset as usize + data.len() > 2 {
                lock(&self.msix).set_message_control(u16::from_le_bytes([reg[2], reg[3]]));
            }
            Vec::new()
        } else if reg_idx == cfg_cap + 1 && offset == 0 && data.len() == 1 {
            // cap.bar
            self.config.write_raw(self.pci_cfg_cap + 4, data);
            Vec::new()
        } else if (reg_idx == cfg_cap + 2 || reg_idx == cfg_cap + 3)
            && offset == 0
            && data.len() == 4
        {
            // cap.offset, cap.length
            self.config.write_raw(reg_idx * 4, data);
            Vec::new()
        } else if reg_idx == cfg_cap + 4 {
            if let Some((bar_off, length)) = self.pci_cfg_access_ok() {
                if offset == 0 && data.len() >= length {
                    self.bar_write(bar_off, &data[..length]);
                }
            }
            Vec::new()
        } else {
            self.config.write_reg(reg_idx, offset, data)
        }
    }

    fn move_bar(&mut self, old_base: u64, new_base: u64) -> Result<(), PciError> {
        if self.bar_base == Some(old_base) {
            self.bar_base = Some(new_base);
        }
        Ok(())
    }

    fn allocate_bars(
        &mut self,
        allocator: &mut PciBarAllocator,
    ) -> Result<Vec<PciBarRegion>, PciError> {
        if self.bar_base.is_none() {
            let base = allocator.allocate(BAR_SIZE, PciBarRegionType::Memory64)?;
            self.config.add_bar(&PciBarRegion {
                index: BAR_INDEX,
                base,
                size: BAR_SIZE,
                region_type: PciBarRegionType::Memory64,
                prefetchable: false,
            })?;
            self.bar_base = Some(base);
        }
        Ok(self.config.bars())
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write(offset, data)
    }
}
