//! virtio-blk: a block device over a `devices::block::DiskImage` (raw or qcow2 image, or a
//! host block device). One device per disk, one request queue.
//!
//! Offered features: FLUSH, BLK_SIZE (512), SEG_MAX, SIZE_MAX, RO (for read-only disks),
//! DISCARD and WRITE_ZEROES (writable disks), INDIRECT_DESC and EVENT_IDX; GET_ID needs no
//! feature bit. Cache behaviour (writeback / none / unsafe) belongs to the disk backend; this
//! device forwards every FLUSH to it.
//!
//! [`request`] validates and executes a chain, [`handler`] runs a queue; [`Block`] is the
//! [`VirtioDevice`] that owns the disk while inactive and hands it to a handler on activation.
//! [`persist`] holds its snapshot state ([`BlockState`]); quiescing flushes the disk.

pub mod handler;
pub mod persist;
pub mod request;
pub mod stats;

use std::io;
use std::sync::Arc;

use devices::block::DiskImage;
use devices::persist::RestoreError;
use virtio_queue::QueueState;

pub use handler::{BlockQueueHandler, HandlerError};
pub use persist::BlockState;
pub use request::{BlockLimits, RequestError, RequestExecutor, SECTOR_SIZE};
pub use stats::{BlockStats, BlockStatsSnapshot};

use crate::device::{
    feature, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// virtio device type of block devices.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Feature bit: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature bit: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit: FLUSH requests.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature bit: DISCARD requests.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Feature bit: WRITE_ZEROES requests.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Length of the GET_ID string.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Default (and maximum offered) queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` + padding.
const CONFIG_LEN: usize = 60;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    /// The serial is longer than 20 bytes.
    #[error("serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
}

/// A virtio-blk device.
pub struct Block {
    disk: Option<Box<dyn DiskImage>>,
    handler: Option<BlockQueueHandler>,
    queue_sizes: [u16; 1],
    avail_features: u64,
    limits: BlockLimits,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    config: [u8; CONFIG_LEN],
    stats: Arc<BlockStats>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("active", &self.handler.is_some())
            .field("features", &format_args!("{:#x}", self.avail_features))
            .finish()
    }
}

impl Block {
    /// The image, wherever it is now (with the request handler while the device is active).
    fn image(&mut self) -> Option<&mut dyn DiskImage> {
        match (self.handler.as_mut(), self.disk.as_mut()) {
            (Some(h), _) => Some(h.executor_mut().disk_mut()),
            (None, Some(d)) => Some(d.as_mut()),
            (None, None) => None,
        }
    }

    /// A block device over `disk`, with an optional serial (GET_ID, at most 20 bytes).
    /// A read-only disk gets VIRTIO_BLK_F_RO and no DISCARD / WRITE_ZEROES.
    pub fn new(disk: Box<dyn DiskImage>, serial: Option<&str>) -> Result<Self, BlockError> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(s) = serial {
            if s.len() > VIRTIO_BLK_ID_BYTES {
                return Err(BlockError::SerialTooLong(s.to_string()));
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let read_only = disk.read_only();
        let limits = BlockLimits::for_queue_size(QUEUE_SIZE);
        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= feature(VIRTIO_BLK_F_RO);
        } else {
            features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = build_config(disk.size() / SECTOR_SIZE, &limits);
        Ok(Block {
            disk: Some(disk),
            handler: None,
            queue_sizes: [QUEUE_SIZE],
            avail_features: features,
            limits,
            serial: id,
            config,
            stats: Arc::new(BlockStats::new()),
        })
    }

    /// Accounts this disk's requests in `stats` (counters that outlive the device, e.g. across
    /// a VM reset, which rebuilds the devices but not the VMM process).
    pub fn with_stats(mut self, stats: Arc<BlockStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The disk's I/O counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// Capacity in 512-byte sectors (a trailing partial sector is not exposed).
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config[0..8].try_into().unwrap_or([0; 8]))
    }
}

/// Lays out `struct virtio_blk_config`.
fn build_config(capacity: u64, limits: &BlockLimits) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &limits.size_max.to_le_bytes());
    put(12, &limits.seg_max.to_le_bytes());
    // 16..20: geometry (not offered).
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    // 24..32: topology (not offered); 32: writeback (no CONFIG_WCE); 34: num_queues (no MQ).
    put(34, &1u16.to_le_bytes());
    put(36, &limits.max_discard_sectors.to_le_bytes());
    put(40, &limits.max_discard_seg.to_le_bytes());
    // discard_sector_alignment: one sector.
    put(44, &1u32.to_le_bytes());
    put(48, &limits.max_write_zeroes_sectors.to_le_bytes());
    put(52, &limits.max_write_zeroes_seg.to_le_bytes());
    // write_zeroes_may_unmap: the backend may punch holes for zeroed ranges.
    put(56, &[1]);
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let idx = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(v) = idx.and_then(|i| self.config.get(i)) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Every field we offer is read-only (no CONFIG_WCE).
        log::debug!("virtio-blk: ignoring config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.handler.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some(q) = ctx.queues.into_iter().find(|q| q.index == 0) else {
            return Err(ActivateError::MissingQueue(0));
        };
        let disk = self.disk.take().ok_or(ActivateError::NoBackend)?;
        let executor = RequestExecutor::new(
            disk,
            self.limits,
            ctx.acked_features,
            self.serial,
            self.stats.clone(),
        );
        // The transport drives this queue from its own EventFd; the duplicate `q.notify` is
        // dropped here.
        self.handler = Some(BlockQueueHandler::new(
            ctx.mem,
            q.queue,
            0,
            executor,
            ctx.interrupt,
        ));
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(h) = self.handler.take() {
            self.disk = Some(h.into_executor().into_disk());
        }
    }

    fn is_active(&self) -> bool {
        self.handler.is_some()
    }

    fn process_queue(&mut self, index: u16) {
        if index != 0 {
            return;
        }
        if let Some(h) = self.handler.as_mut() {
            if let Err(e) = h.process_queue() {
                log::error!("virtio-blk: processing the queue failed: {e}");
            }
        }
    }

    fn active_queue_states(&self) -> Vec<(u16, QueueState)> {
        self.handler
            .iter()
            .map(|h| (0, h.queue().state()))
            .collect()
    }

    /// Requests complete synchronously, so only the image needs flushing.
    fn quiesce(&mut self) -> io::Result<()> {
        match self.image() {
            Some(disk) => disk.flush().map_err(io::Error::other),
            None => Ok(()),
        }
    }

    fn disk(&mut self) -> Option<&mut dyn DiskImage> {
        self.image()
    }

    fn hand_over_storage(&mut self) -> io::Result<()> {
        match self.image() {
            Some(disk) => disk.hand_over().map_err(io::Error::other),
            None => Ok(()),
        }
    }

    fn take_back_storage(&mut self) -> io::Result<()> {
        match self.image() {
            Some(disk) => disk.take_back().map_err(io::Error::other),
            None => Ok(()),
        }
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.block_state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        self.check_state(state)
    }
}

#[cfg(test)]
mod tests;
