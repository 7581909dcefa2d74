//! The contract between a virtio device model and its transport: [`VirtioDevice`].
//!
//! Life cycle: the transport negotiates features with the driver, then calls
//! [`VirtioDevice::activate`] once the driver sets DRIVER_OK, handing over guest memory, the
//! enabled queues with duplicates of their notification EventFds, and an interrupt object.
//! [`VirtioDevice::reset`] (driver writes 0 to the status, unloads, or the guest reboots) must
//! drop everything activation gave the device, so any number of activate/reset cycles leaks no
//! file descriptors and no threads. The transport's event glue calls
//! [`VirtioDevice::process_queue`] when a queue is notified, and
//! [`VirtioDevice::process_backend`] when one of [`VirtioDevice::backend_fds`] is ready.
//!
//! Snapshots: what every device shares (status, features, queues, MSI-X, PCI config) is saved
//! by the transport. Before state is taken, [`VirtioDevice::quiesce`] completes in-flight work
//! and flushes backends; [`VirtioDevice::active_queue_states`] reports how far the device got in
//! each queue, and [`VirtioDevice::save_state`] / [`VirtioDevice::restore_state`] carry the
//! device's own part, one [`VirtioDeviceState`] variant per device type.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use devices::persist::RestoreError;
use event_manager::EventSet;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

/// The guest memory type devices work on. Each region carries a bitmap of the pages written
/// through it (every write through `vm-memory`: descriptors' buffers, used rings), which a live
/// migration ORs with KVM's dirty log: KVM sees only what the vCPUs write.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

/// Feature bit: the device complies with virtio 1.x (mandatory for the modern transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is ready; the device is live.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 0x80;

/// Bit mask of a feature bit number.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// What an interrupt is about; the transport maps it to an MSI-X vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration space changed.
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device signals the driver. Implemented by the transport; called from the event-loop
/// thread.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals the driver.
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()>;
    /// An EventFd that signals the driver when written, masking and all, for a backend that
    /// signals on its own (vhost-net's call); None when there is none (no MSI-X vector), and
    /// the device relays through [`VirtioInterrupt::trigger`] instead.
    fn notifier(&self, _int_type: VirtioInterruptType) -> Option<EventFd> {
        None
    }
}

/// One enabled queue handed to [`VirtioDevice::activate`].
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// Its state as configured by the driver (size, ring addresses, event-idx setting).
    pub queue: Queue,
    /// A duplicate of the queue's notification EventFd (the transport keeps the original and
    /// drives [`VirtioDevice::process_queue`] from it; devices offloading a queue, e.g. to
    /// vhost, use this one).
    pub notify: EventFd,
}

/// Everything a device needs to run.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The enabled queues.
    pub queues: Vec<ActiveQueue>,
    /// Where to send interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs was not enabled by the driver.
    #[error("queue {0} was not enabled by the driver")]
    MissingQueue(u16),
    /// A queue's configuration does not fit guest memory.
    #[error("queue {0} is not valid (size or ring addresses)")]
    InvalidQueue(u16),
    /// The device is already running.
    #[error("the device is already active")]
    AlreadyActive,
    /// The device's backend is gone (a previous failure consumed it).
    #[error("the device has no backend")]
    NoBackend,
    /// Creating a resource failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A device's own part of a snapshot (what the transport does not save), by device type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-blk.
    Block(crate::block::BlockState),
    /// virtio-net.
    Net(crate::net::NetState),
    /// virtio-console.
    Console(crate::console::ConsoleState),
    /// virtio-balloon.
    Balloon(crate::balloon::BalloonState),
}

impl VirtioDeviceState {
    /// The device type the state belongs to, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::Block(_) => "block",
            VirtioDeviceState::Net(_) => "net",
            VirtioDeviceState::Console(_) => "console",
            VirtioDeviceState::Balloon(_) => "balloon",
        }
    }
}

/// The `(index, state)` of each queue a device runs, for devices that keep their queues by
/// index ([`VirtioDevice::active_queue_states`]).
pub(crate) fn queue_states(queues: &[Option<Queue>]) -> Vec<(u16, QueueState)> {
    queues
        .iter()
        .enumerate()
        .filter_map(|(i, q)| q.as_ref().map(|q| (i as u16, q.state())))
        .collect()
}

/// Signals queue `index`'s driver about new used buffers, unless it asked not to be
/// (EVENT_IDX); an unreadable ring gets the interrupt.
pub(crate) fn notify_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
) {
    use virtio_queue::QueueT;
    if !matches!(q.needs_notification(mem), Ok(false)) {
        if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index)) {
            log::warn!("virtio: interrupt for queue {index} failed: {e}");
        }
    }
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// virtio device type (2 = block, 1 = net, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (the transport adds `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space at `offset` (out of range reads as zeros).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most fields are read-only: ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device and drops everything [`VirtioDevice::activate`] handed over; the device
    /// can be activated again afterwards.
    fn reset(&mut self);
    /// Whether the device is active.
    fn is_active(&self) -> bool;
    /// Processes queue `index` after its notification EventFd fired.
    fn process_queue(&mut self, index: u16);
    /// Host fds to watch while the device is active (e.g. a tap); none by default.
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// The readiness to watch [`VirtioDevice::backend_fds`] for: level-triggered input by
    /// default. A device that stops reading a backend while the guest has no room (a tap) asks
    /// for edge-triggered events and reads until `WouldBlock` otherwise.
    fn backend_events(&self) -> EventSet {
        EventSet::IN
    }
    /// Queues the device hands to someone else (vhost-net reads their notification EventFds):
    /// the transport must not watch them. None by default.
    fn offloaded_queues(&self) -> Vec<u16> {
        Vec::new()
    }
    /// Whether [`VirtioDevice::backend_fds`] changed since the last call (a peer came or
    /// went): the transport then watches the new set. Asked after every event.
    fn backend_fds_changed(&mut self) -> bool {
        false
    }
    /// One of [`VirtioDevice::backend_fds`] (by position) is ready.
    fn process_backend(&mut self, _index: usize, _events: EventSet) {}
    /// The queues an active device runs, as `(index, state)`: the transport's own copy of a
    /// queue stops at what the driver configured, while the device's copy moves `next_avail`
    /// and `next_used`. Empty while inactive.
    fn active_queue_states(&self) -> Vec<(u16, QueueState)>;
    /// Completes in-flight work and flushes backends (e.g. the disk image), before the VM's
    /// state is taken. The device stays usable.
    fn quiesce(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The state was taken (or taking it failed): a device that [`VirtioDevice::quiesce`]
    /// stopped runs again. Called for every device after every quiesce, even a failed one.
    fn resume(&mut self) {}
    /// After [`VirtioDevice::quiesce`], at a live migration's switchover: lets go of the
    /// host storage the device holds (a disk image's locks) so that the destination can take
    /// it; the device must not write it until [`VirtioDevice::take_back_storage`].
    fn hand_over_storage(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Takes the storage back after a hand-over (the migration failed, or the VM continues
    /// here): refused when someone else holds it now.
    fn take_back_storage(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The disk image a block device serves (savevm keeps snapshots in it); `None` for
    /// every other device.
    fn disk(&mut self) -> Option<&mut dyn devices::block::DiskImage> {
        None
    }
    /// Starts (`Some`) or stops the log of the guest pages written by something that neither
    /// KVM nor `vm-memory` sees (vhost's kernel workers), for a live migration. Devices whose
    /// writes all go through `vm-memory` have nothing to do.
    fn set_dirty_log(&mut self, _log: Option<Arc<crate::dirty_log::VhostLog>>) -> io::Result<()> {
        Ok(())
    }
    /// The device's own state (not what the transport saves).
    fn save_state(&self) -> VirtioDeviceState;
    /// Applies a state from [`VirtioDevice::save_state`] to this device, freshly built from
    /// the same configuration and not active; checks that it fits (same device type, same
    /// backend properties) first and changes nothing on error. The transport activates the
    /// device afterwards if it was running.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError>;
}
