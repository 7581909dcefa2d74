//! virtio devices and their transport.
//!
//! - [`device`]: the [`VirtioDevice`] trait every device model implements (features, config
//!   space, activate/reset), the interrupt trait object devices signal through, and the
//!   feature and status constants.
//! - [`transport`]: the virtio-pci modern (1.x only) transport, a `devices::pci::PciDevice`
//!   with MSI-X that wraps any [`VirtioDevice`], and the event-manager glue that dispatches
//!   queue notifications and backend fds to it. Its [`VirtioPciState`] is a device's whole
//!   snapshot: what every virtio device shares plus the device's own [`VirtioDeviceState`].
//! - [`block`]: virtio-blk over a `devices::block::DiskImage`.
//! - [`net`]: virtio-net over a `devices::net::Tap`.
//! - [`console`]: virtio-console with MULTIPORT: a console port and named channels over
//!   `devices::chardev` backends.
//!
//! Queue logic (e.g. [`block::BlockQueueHandler`]) is kept apart from the event glue so it can be
//! driven without KVM through `virtio_queue::mock::MockSplitQueue`.

pub mod balloon;
pub mod block;
pub mod console;
pub mod device;
pub mod dirty_log;
pub mod net;
#[cfg(test)]
mod test_rig;
pub mod transport;

pub use device::{
    ActivateContext, ActivateError, ActiveQueue, GuestMemoryMmap, GuestRegionMmap, VirtioDevice,
    VirtioDeviceState, VirtioInterrupt, VirtioInterruptType,
};
pub use transport::{VirtioPciDevice, VirtioPciError, VirtioPciState};
