//! The `virtio_pci_common_cfg` structure: feature selection windows, device status, queue
//! selection and per-queue setup. Status writes are returned to the transport, which owns the
//! status state machine (FEATURES_OK check, DRIVER_OK activation, reset).

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};

use super::interrupt::PciInterrupt;
use super::{COMMON_CFG_SIZE, VIRTIO_MSI_NO_VECTOR};
use crate::device::{STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};

/// Common configuration state of one device.
pub(crate) struct CommonConfig {
    pub(crate) device_features: u64,
    pub(crate) driver_features: u64,
    pub(crate) device_feature_select: u32,
    pub(crate) driver_feature_select: u32,
    pub(crate) status: u8,
    pub(crate) config_generation: u8,
    pub(crate) queue_select: u16,
    pub(crate) queues: Vec<Queue>,
}

fn le_u32(d: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&d[..4]);
    u32::from_le_bytes(b)
}

fn le_u16(d: &[u8]) -> u16 {
    u16::from_le_bytes([d[0], d[1]])
}

fn half(value: u64, select: u32) -> u32 {
    match select {
        0 => value as u32,
        1 => (value >> 32) as u32,
        _ => 0,
    }
}

impl CommonConfig {
    pub(crate) fn new(device_features: u64, queues: Vec<Queue>) -> Self {
        CommonConfig {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
        }
    }

    /// Back to the power-on state (queues keep their maximum sizes).
    pub(crate) fn reset(&mut self) {
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The structure as the guest sees it.
    fn snapshot(&self, irq: &PciInterrupt) -> [u8; COMMON_CFG_SIZE as usize] {
        let mut c = [0u8; COMMON_CFG_SIZE as usize];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(
            0x04,
            &half(self.device_features, self.device_feature_select).to_le_bytes(),
        );
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(
            0x0c,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(
            0x10,
            &irq.config_vector.load(Ordering::SeqCst).to_le_bytes(),
        );
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status]);
        put(0x15, &[self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let qi = usize::from(self.queue_select);
            let vector = irq.queue_vectors[qi].load(Ordering::SeqCst);
            put(0x18, &q.size().to_le_bytes());
            put(0x1a, &vector.to_le_bytes());
            put(0x1c, &u16::from(q.ready()).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.desc_table().to_le_bytes());
            put(0x28, &q.avail_ring().to_le_bytes());
            put(0x30, &q.used_ring().to_le_bytes());
        }
        c
    }

    pub(crate) fn read(&self, offset: u64, data: &mut [u8], irq: &PciInterrupt) {
        data.fill(0);
        let snap = self.snapshot(irq);
        for (i, b) in data.iter_mut().enumerate() {
            let idx = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(v) = idx.and_then(|i| snap.get(i)) {
                *b = *v;
            }
        }
    }

    /// Handles a write; returns `Some(value)` for a write of the device status, which the
    /// transport applies.
    pub(crate) fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        irq: &PciInterrupt,
        num_vectors: u16,
    ) -> Option<u8> {
        let valid_vector = |v: u16| {
            if v < num_vectors {
                v
            } else {
                VIRTIO_MSI_NO_VECTOR
            }
        };
        let queue_locked = self.status & STATUS_DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = le_u32(data),
            (0x08, 4) => self.driver_feature_select = le_u32(data),
            (0x0c, 4) => {
                // Features may only change between DRIVER and FEATURES_OK.
                if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 {
                    let v = u64::from(le_u32(data));
                    match self.driver_feature_select {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                        1 => {
                            self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32)
                        }
                        _ => {}
                    }
                }
            }
            (0x10, 2) => irq
                .config_vector
                .store(valid_vector(le_u16(data)), Ordering::SeqCst),
            (0x14, 1) => return Some(data[0]),
            (0x16, 2) => self.queue_select = le_u16(data),
            (0x1a, 2) => {
                if let Some(v) = irq.queue_vectors.get(usize::from(self.queue_select)) {
                    v.store(valid_vector(le_u16(data)), Ordering::SeqCst);
                }
            }
            _ if queue_locked => {
                log::debug!("virtio-pci: queue setup write at {offset:#x} after DRIVER_OK ignored")
            }
            (off, len) => self.write_queue(off, len, data),
        }
        None
    }

    fn write_queue(&mut self, offset: u64, len: usize, data: &[u8]) {
        let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) else {
            return;
        };
        if q.ready() && offset != 0x1c {
            // The driver must not change an enabled queue.
            return;
        }
        match (offset, len) {
            (0x18, 2) => q.set_size(le_u16(data)),
            (0x1c, 2) => {
                if le_u16(data) == 1 {
                    q.set_ready(true);
                }
            }
            (0x20, 4) => q.set_desc_table_address(Some(le_u32(data)), None),
            (0x24, 4) => q.set_desc_table_address(None, Some(le_u32(data))),
            (0x20, 8) => q.set_desc_table_address(Some(le_u32(data)), Some(le_u32(&data[4..]))),
            (0x28, 4) => q.set_avail_ring_address(Some(le_u32(data)), None),
            (0x2c, 4) => q.set_avail_ring_address(None, Some(le_u32(data))),
            (0x28, 8) => q.set_avail_ring_address(Some(le_u32(data)), Some(le_u32(&data[4..]))),
            (0x30, 4) => q.set_used_ring_address(Some(le_u32(data)), None),
            (0x34, 4) => q.set_used_ring_address(None, Some(le_u32(data))),
            (0x30, 8) => q.set_used_ring_address(Some(le_u32(data)), Some(le_u32(&data[4..]))),
            _ => log::debug!("virtio-pci: ignoring common cfg write at {offset:#x}/{len}"),
        }
    }
}
