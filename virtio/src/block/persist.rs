//! virtio-blk's own part of a snapshot: what identifies the disk, so a restore onto another
//! image (resized, opened read-only instead of read-write, another serial) is refused with a
//! clear message instead of showing the guest a different disk under its feet. Requests run
//! synchronously on the event loop, so there are never requests in flight to save; the queue
//! positions are saved by the transport.

use devices::persist::RestoreError;
use serde::{Deserialize, Serialize};

use super::{Block, VIRTIO_BLK_F_RO};
use crate::device::{feature, VirtioDeviceState};

/// The saved state of a [`Block`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Disk capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether the disk is read-only.
    pub read_only: bool,
    /// Features the device offered.
    pub avail_features: u64,
    /// The GET_ID serial (empty when none).
    pub serial: String,
}

impl Block {
    pub(super) fn block_state(&self) -> BlockState {
        let len = self
            .serial
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.serial.len());
        BlockState {
            capacity_sectors: self.capacity(),
            read_only: self.avail_features & feature(VIRTIO_BLK_F_RO) != 0,
            avail_features: self.avail_features,
            serial: String::from_utf8_lossy(&self.serial[..len]).into_owned(),
        }
    }

    /// Checks that `state` describes this device's disk; nothing else is restored.
    pub(super) fn check_state(&self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        #[allow(unreachable_patterns)] // other device types join the enum
        let saved = match state {
            VirtioDeviceState::Block(s) => s,
            other => {
                return Err(RestoreError::mismatch(format!(
                    "a {} device's state cannot be restored into a block device",
                    other.kind()
                )))
            }
        };
        let ours = self.block_state();
        if saved.capacity_sectors != ours.capacity_sectors {
            return Err(RestoreError::mismatch(format!(
                "disk size changed: the snapshot has {} sectors, the image has {}",
                saved.capacity_sectors, ours.capacity_sectors
            )));
        }
        if saved.read_only != ours.read_only {
            let mode = |ro: bool| if ro { "read-only" } else { "read-write" };
            return Err(RestoreError::mismatch(format!(
                "the snapshot's disk is {}, the image is opened {}",
                mode(saved.read_only),
                mode(ours.read_only)
            )));
        }
        if saved.serial != ours.serial {
            return Err(RestoreError::mismatch(format!(
                "disk serial changed: the snapshot has {:?}, the device {:?}",
                saved.serial, ours.serial
            )));
        }
        if saved.avail_features != ours.avail_features {
            return Err(RestoreError::mismatch(format!(
                "the snapshot's disk offered features {:#x}, this one offers {:#x}",
                saved.avail_features, ours.avail_features
            )));
        }
        Ok(())
    }
}
