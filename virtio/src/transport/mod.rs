//! The virtio-pci modern transport (virtio 1.x, no legacy interface).
//!
//! [`VirtioPciDevice`] wraps a [`crate::VirtioDevice`] and is at once a
//! `devices::pci::PciDevice` (configuration space with the virtio vendor capabilities and
//! MSI-X), a `devices::bus::BusDevice` for its single 64-bit memory BAR, and an event-manager
//! `MutEventSubscriber` that dispatches queue notifications and backend fds to the device.
//!
//! BAR 0 layout (32 KiB): common config at 0x0000, ISR at 0x1000, device config at 0x2000,
//! notify at 0x3000 (queue *n* at `0x3000 + 4 * n`, `notify_off_multiplier = 4`), MSI-X table at
//! 0x4000 and PBA at 0x6000.
//!
//! Snapshots: [`VirtioPciDevice`] implements `devices::persist::Persist` with
//! [`VirtioPciState`], which holds what every virtio device shares (PCI configuration, MSI-X,
//! feature negotiation, status, queues with their positions, vectors, ISR) plus the device's own
//! part.

mod common_cfg;
mod events;
mod interrupt;
mod pci;
mod persist;

pub use pci::VirtioPciDevice;
pub use persist::{CommonCfgState, VirtioPciState, VirtioQueueState};

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// "No vector" for `config_msix_vector` / `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Size of the common configuration structure (through `queue_device`).
pub const COMMON_CFG_SIZE: u64 = 0x38;
/// Offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Size of the device configuration window.
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Offset of the notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Most queues a device may have (the notify area is 4 KiB).
pub const MAX_QUEUES: usize = 1024;

/// Errors creating a virtio-pci device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device declares no queues, too many, or a queue size the ring code refuses.
    #[error("invalid queue configuration: {0}")]
    Queues(&'static str),
    /// Creating an EventFd failed.
    #[error("creating an EventFd failed: {0}")]
    EventFd(#[source] std::io::Error),
    /// The PCI layer refused a BAR or capability.
    #[error("PCI error: {0}")]
    Pci(#[from] devices::pci::PciError),
}
