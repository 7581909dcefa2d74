//! The transport's [`VirtioInterrupt`]: maps "config changed" / "queue n used" to the MSI-X
//! vector the driver chose and signals it through the device's MSI-X state (which pends it
//! while masked). The ISR bits are kept for the ISR register.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devices::pci::MsixConfig;

use super::VIRTIO_MSI_NO_VECTOR;
use crate::device::{VirtioInterrupt, VirtioInterruptType};

/// ISR bit: a queue interrupt.
pub(crate) const ISR_QUEUE: u8 = 1;
/// ISR bit: a configuration change.
pub(crate) const ISR_CONFIG: u8 = 2;

/// Interrupt state shared between the transport (vCPU side) and the device (event loop).
pub(crate) struct PciInterrupt {
    pub(crate) msix: Arc<Mutex<MsixConfig>>,
    pub(crate) config_vector: AtomicU16,
    pub(crate) queue_vectors: Vec<AtomicU16>,
    pub(crate) isr: AtomicU8,
}

impl PciInterrupt {
    pub(crate) fn new(msix: Arc<Mutex<MsixConfig>>, num_queues: usize) -> Self {
        PciInterrupt {
            msix,
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            isr: AtomicU8::new(0),
        }
    }

    /// Forgets every vector choice and the ISR (device reset).
    pub(crate) fn reset(&self) {
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        self.isr.store(0, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        let (vector, bit) = match int_type {
            VirtioInterruptType::Config => (self.config_vector.load(Ordering::SeqCst), ISR_CONFIG),
            VirtioInterruptType::Queue(q) => match self.queue_vectors.get(usize::from(q)) {
                Some(v) => (v.load(Ordering::SeqCst), ISR_QUEUE),
                None => return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such queue")),
            },
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if vector == VIRTIO_MSI_NO_VECTOR {
            return Ok(());
        }
        self.msix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .trigger(vector)
    }

    fn notifier(&self, int_type: VirtioInterruptType) -> Option<vmm_sys_util::eventfd::EventFd> {
        let vector = match int_type {
            VirtioInterruptType::Config => self.config_vector.load(Ordering::SeqCst),
            VirtioInterruptType::Queue(q) => self
                .queue_vectors
                .get(usize::from(q))?
                .load(Ordering::SeqCst),
        };
        if vector == VIRTIO_MSI_NO_VECTOR {
            return None;
        }
        self.msix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .irqfd(vector)
    }
}

/// Keeps `Arc<PciInterrupt>` usable as `Arc<dyn VirtioInterrupt>`.
pub(crate) fn as_dyn(i: &Arc<PciInterrupt>) -> Arc<dyn VirtioInterrupt> {
    i.clone()
}
