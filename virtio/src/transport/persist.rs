//! Snapshot state of a [`VirtioPciDevice`]: [`VirtioPciState`] is everything the guest can see
//! of one virtio-pci function, saved once here for every device type, plus the device's own part
//! ([`VirtioDeviceState`]).
//!
//! Restore is for a device freshly built from the same configuration whose BAR is allocated
//! (`allocate_bars`) and which has not been activated. Everything the guest controlled is checked
//! like guest input first (features, status coherence, queue sizes and ring alignment, rings of a
//! running device inside guest memory, MSI-X vectors, ISR bits), together with the fit to this
//! device (queue count and sizes, offered features, PCI identity and BARs, vector count, the
//! device's backend); only then is anything applied. A device that was running is activated
//! again through the same path as the driver's DRIVER_OK, with queues that continue from the
//! saved `next_avail` / `next_used`. A notification lost while the snapshot was taken is
//! replayed by the VMM with [`VirtioPciDevice::kick_queues`] once the vCPUs exist (restore
//! itself processes nothing, so no interrupt is raised before there is a LAPIC to take it).
//! Guest memory must hold the snapshot's contents before restore.

use std::sync::atomic::Ordering;

use devices::pci::config::PciConfigurationState;
use devices::pci::msix::MsixState;
use devices::persist::{Persist, RestoreError};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::interrupt::{ISR_CONFIG, ISR_QUEUE};
use super::pci::{lock, VirtioPciDevice, BAR_INDEX};
use super::VIRTIO_MSI_NO_VECTOR;
use crate::device::{
    feature, VirtioDeviceState, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};

/// One virtqueue as the driver configured it and as far as the device got in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioQueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose (a power of two, at most `max_size`).
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Guest address of the descriptor table (16-byte aligned).
    pub desc_table: u64,
    /// Guest address of the available ring (2-byte aligned).
    pub avail_ring: u64,
    /// Guest address of the used ring (4-byte aligned).
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use on the queue.
    pub event_idx: bool,
}

impl From<QueueState> for VirtioQueueState {
    fn from(q: QueueState) -> Self {
        VirtioQueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<VirtioQueueState> for QueueState {
    fn from(q: VirtioQueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The `virtio_pci_common_cfg` registers that are not per queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonCfgState {
    /// Features the device offers (`VIRTIO_F_VERSION_1` included).
    pub device_features: u64,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// Device status.
    pub status: u8,
    /// `config_generation`.
    pub config_generation: u8,
    /// `queue_select` (any value the driver wrote).
    pub queue_select: u16,
}

/// The saved state of a [`VirtioPciDevice`]; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// PCI configuration space (BAR placement included).
    pub pci: PciConfigurationState,
    /// MSI-X table, PBA and control bits.
    pub msix: MsixState,
    /// Feature negotiation and status.
    pub common: CommonCfgState,
    /// Every queue of the device, by index.
    pub queues: Vec<VirtioQueueState>,
    /// MSI-X vector for configuration changes, or `VIRTIO_MSI_NO_VECTOR`.
    pub config_vector: u16,
    /// MSI-X vector of each queue, or `VIRTIO_MSI_NO_VECTOR`.
    pub queue_vectors: Vec<u16>,
    /// ISR status bits not yet read by the driver.
    pub isr: u8,
    /// Whether the device was running (activated after DRIVER_OK).
    pub active: bool,
    /// The device's own part.
    pub device: VirtioDeviceState,
}

/// Shorthand for an invalid field.
fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RestoreError {
    RestoreError::invalid(field, reason)
}

impl VirtioPciDevice {
    /// Checks the transport's own part of `state` (everything but PCI config, MSI-X and the
    /// device) and builds the queues it describes.
    fn check_transport(&self, state: &VirtioPciState) -> Result<Vec<Queue>, RestoreError> {
        let ours = &self.common;
        let c = &state.common;
        if c.device_features != ours.device_features {
            return Err(RestoreError::mismatch(format!(
                "the snapshot's device offered features {:#x}, this one offers {:#x}",
                c.device_features, ours.device_features
            )));
        }
        let unknown = c.driver_features & !c.device_features;
        if unknown != 0 {
            return Err(invalid(
                "common.driver_features",
                format!("bits {unknown:#x} were never offered"),
            ));
        }
        if c.status & STATUS_FEATURES_OK != 0
            && c.driver_features & feature(VIRTIO_F_VERSION_1) == 0
        {
            return Err(invalid(
                "common.status",
                "FEATURES_OK without VIRTIO_F_VERSION_1 accepted",
            ));
        }
        if c.status & STATUS_DRIVER_OK != 0 && c.status & STATUS_FEATURES_OK == 0 {
            return Err(invalid("common.status", "DRIVER_OK without FEATURES_OK"));
        }
        let running_status = c.status & STATUS_DRIVER_OK != 0;
        if state.active && !running_status {
            return Err(invalid("active", "a running device must have DRIVER_OK"));
        }
        if !state.active && running_status && c.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            return Err(invalid(
                "active",
                "DRIVER_OK without DEVICE_NEEDS_RESET means the device was running",
            ));
        }
        if state.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(invalid(
                "isr",
                format!("unknown bits in {:#04x}", state.isr),
            ));
        }

        if state.queues.len() != ours.queues.len() {
            return Err(RestoreError::mismatch(format!(
                "the snapshot has {} queues, this device {}",
                state.queues.len(),
                ours.queues.len()
            )));
        }
        if state.queue_vectors.len() != state.queues.len() {
            return Err(invalid(
                "queue_vectors",
                format!(
                    "{} vectors for {} queues",
                    state.queue_vectors.len(),
                    state.queues.len()
                ),
            ));
        }
        let num_vectors = self.msix_vectors();
        let vector_ok = |v: u16| v < num_vectors || v == VIRTIO_MSI_NO_VECTOR;
        if !vector_ok(state.config_vector) {
            return Err(invalid(
                "config_vector",
                format!(
                    "{} is not one of the {num_vectors} vectors",
                    state.config_vector
                ),
            ));
        }
        if let Some((i, v)) = state
            .queue_vectors
            .iter()
            .enumerate()
            .find(|(_, &v)| !vector_ok(v))
        {
            return Err(invalid(
                format!("queue_vectors[{i}]"),
                format!("{v} is not one of the {num_vectors} vectors"),
            ));
        }

        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (q, fresh)) in state.queues.iter().zip(&ours.queues).enumerate() {
            queues.push(self.check_queue(i, q, fresh.max_size(), state.active)?);
        }
        Ok(queues)
    }

    fn check_queue(
        &self,
        i: usize,
        q: &VirtioQueueState,
        max_size: u16,
        active: bool,
    ) -> Result<Queue, RestoreError> {
        let field = |f: &str| format!("queues[{i}].{f}");
        if q.max_size != max_size {
            return Err(RestoreError::mismatch(format!(
                "queue {i} holds {} entries in the snapshot, {max_size} on this device",
                q.max_size
            )));
        }
        if !q.size.is_power_of_two() || q.size > max_size {
            return Err(invalid(
                field("size"),
                format!("{} is not a power of two up to {max_size}", q.size),
            ));
        }
        for (name, addr, align) in [
            ("desc_table", q.desc_table, 16),
            ("avail_ring", q.avail_ring, 2),
            ("used_ring", q.used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(invalid(
                    field(name),
                    format!("{addr:#x} is not {align}-byte aligned"),
                ));
            }
        }
        let queue = Queue::try_from(QueueState::from(*q))
            .map_err(|e| invalid(format!("queues[{i}]"), e.to_string()))?;
        // A running device uses its rings right away; a queue set up before DRIVER_OK is
        // checked when the driver activates the device, as without a snapshot.
        if active && q.ready && !queue.is_valid(&self.mem) {
            return Err(invalid(
                format!("queues[{i}]"),
                "the rings do not lie in guest memory",
            ));
        }
        Ok(queue)
    }

    /// Validates all of `state`, then applies it without activating the device. On error
    /// nothing is changed.
    fn apply_state(&mut self, state: &VirtioPciState) -> Result<(), RestoreError> {
        let queues = self.check_transport(state)?;
        let mut config = self.config.clone();
        config.restore(&state.pci).map_err(|e| e.within("pci"))?;
        lock(&self.msix)
            .check_state(&state.msix)
            .map_err(|e| e.within("msix"))?;
        // Last of the checks: it applies the device's part when it succeeds.
        self.device
            .restore_state(&state.device)
            .map_err(|e| e.within("device"))?;

        // Nothing below fails.
        self.config = config;
        self.bar_base = self
            .config
            .bars()
            .iter()
            .find(|b| b.index == BAR_INDEX)
            .map(|b| b.base);
        if let Err(e) = lock(&self.msix).restore(&state.msix) {
            log::error!("virtio-pci: MSI-X state refused after its check: {e}");
        }
        let c = &state.common;
        let common = &mut self.common;
        common.driver_features = c.driver_features;
        common.device_feature_select = c.device_feature_select;
        common.driver_feature_select = c.driver_feature_select;
        common.status = c.status;
        common.config_generation = c.config_generation;
        common.queue_select = c.queue_select;
        common.queues = queues;
        let irq = &self.interrupt;
        irq.config_vector
            .store(state.config_vector, Ordering::SeqCst);
        for (v, &saved) in irq.queue_vectors.iter().zip(&state.queue_vectors) {
            v.store(saved, Ordering::SeqCst);
        }
        irq.isr.store(state.isr, Ordering::SeqCst);
        Ok(())
    }
}

impl Persist for VirtioPciDevice {
    type State = VirtioPciState;

    /// Captures the device; call [`VirtioPciDevice::quiesce`] first and keep the vCPUs paused.
    fn save(&self) -> VirtioPciState {
        let mut queues: Vec<VirtioQueueState> = self
            .common
            .queues
            .iter()
            .map(|q| VirtioQueueState::from(q.state()))
            .collect();
        // The device's copies of the queues it runs know how far it got.
        for (index, live) in self.device.active_queue_states() {
            if let Some(q) = queues.get_mut(usize::from(index)) {
                q.next_avail = live.next_avail;
                q.next_used = live.next_used;
                q.event_idx = live.event_idx_enabled;
            }
        }
        let irq = &self.interrupt;
        VirtioPciState {
            pci: self.config.save(),
            msix: lock(&self.msix).save(),
            common: CommonCfgState {
                device_features: self.common.device_features,
                driver_features: self.common.driver_features,
                device_feature_select: self.common.device_feature_select,
                driver_feature_select: self.common.driver_feature_select,
                status: self.common.status,
                config_generation: self.common.config_generation,
                queue_select: self.common.queue_select,
            },
            queues,
            config_vector: irq.config_vector.load(Ordering::SeqCst),
            queue_vectors: irq
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            isr: irq.isr.load(Ordering::SeqCst),
            active: self.device.is_active(),
            device: self.device.save_state(),
        }
    }

    /// Restores a device built with [`VirtioPciDevice::new`] whose BARs are allocated and that
    /// was never activated; see the module documentation. MSI-X routes are pushed to the
    /// interrupt group, and a device that was running is activated again (its queues are not
    /// processed: see [`VirtioPciDevice::kick_queues`]).
    fn restore(&mut self, state: &VirtioPciState) -> Result<(), RestoreError> {
        if self.device.is_active() {
            return Err(RestoreError::mismatch(
                "state can only be restored into a device that is not running",
            ));
        }
        let before = self.save();
        self.apply_state(state)?;
        if !state.active {
            return Ok(());
        }
        if let Err(e) = self.activate() {
            // Back to how the device was; its own earlier state always applies.
            self.device.reset();
            if let Err(e) = self.apply_state(&before) {
                log::error!("virtio-pci: rolling back a failed restore failed: {e}");
            }
            return Err(invalid(
                "active",
                format!("the device could not be activated again: {e}"),
            ));
        }
        // Queues are not processed here: a notification lost in the snapshot window is
        // replayed by the VMM through the queue's ioeventfd once the vCPUs exist, so that the
        // interrupts it may raise have a LAPIC to land on.
        Ok(())
    }
}

#[cfg(test)]
mod tests;
