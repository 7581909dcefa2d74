//! MSI-X: the capability's message-control register, the vector table and the pending-bit
//! array (PBA) a device exposes in one of its BARs, and [`MsiInterruptGroup`], the trait
//! object through which the VMM turns vectors into guest interrupts (KVM GSI routes + irqfds).
//!
//! Masking is done here, on the device side: a vector that is masked (per vector, by the
//! function mask, or because MSI-X is disabled) records a pending bit instead of firing, and the
//! message is sent when the vector is unmasked, as the PCI specification requires. The VMM only
//! sees route updates ([`MsiInterruptGroup::update`]) and deliveries of unmasked vectors
//! ([`MsiInterruptGroup::trigger`]).
//!
//! State ([`Persist`]): the table, the PBA, the enable and function-mask bits. Restore pushes
//! every vector's route to the interrupt group again, so the VMM's routes match the table.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::PciError;
use crate::persist::{Persist, RestoreError};

/// PCI capability id of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Size of one MSI-X table entry in bytes.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Largest table the capability can describe.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Vector control: per-vector mask bit.
const VECTOR_MASKED: u32 = 1;

/// An MSI message as programmed in a table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low 32 bits at table offset 0, high 32 bits at offset 4).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Implemented by the VMM for each MSI-X capable device: one KVM GSI route (and irqfd) per
/// vector.
///
/// Both methods may be called from vCPU threads (table or capability writes) and from the
/// event-loop thread (device interrupts) while the device's MSI-X state is locked, so they must
/// not call back into the device.
pub trait MsiInterruptGroup: Send + Sync {
    /// The guest changed vector `vector`'s message or its effective mask (`masked` is true when
    /// the vector, the function or MSI-X as a whole is masked/disabled). The VMM updates the GSI
    /// route; while masked, [`MsiInterruptGroup::trigger`] is never called for the vector.
    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()>;
    /// Delivers vector `vector` (e.g. writes its irqfd).
    fn trigger(&self, vector: u16) -> io::Result<()>;
    /// An EventFd that delivers vector `vector` when written, for a backend that signals on
    /// its own (vhost-net): the VMM keeps it from delivering while the vector is masked, and
    /// delivers what it held once unmasked. None when the group has no such fd.
    fn irqfd(&self, _vector: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
        None
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TableEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl TableEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// The MSI-X state of one function.
pub struct MsixConfig {
    table: Vec<TableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    group: Arc<dyn MsiInterruptGroup>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl MsixConfig {
    /// A table of `num_vectors` entries (1..=2048), every vector masked, MSI-X disabled.
    pub fn new(num_vectors: u16, group: Arc<dyn MsiInterruptGroup>) -> Result<Self, PciError> {
        if num_vectors == 0 || num_vectors > MSIX_MAX_VECTORS {
            return Err(PciError::MsixVectors(num_vectors));
        }
        let entry = TableEntry {
            control: VECTOR_MASKED,
            ..Default::default()
        };
        Ok(MsixConfig {
            table: vec![entry; usize::from(num_vectors)],
            pba: vec![0; usize::from(num_vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
            group,
        })
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Bytes of the table in its BAR.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes of the PBA in its BAR.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The capability body (after id and next pointer): message control, table offset/BIR, PBA
    /// offset/BIR. Offsets must be 8-byte aligned.
    pub fn capability_body(
        &self,
        table_bar: u8,
        table_off: u32,
        pba_bar: u8,
        pba_off: u32,
    ) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&self.message_control().to_le_bytes());
        body[2..6].copy_from_slice(&((table_off & !7) | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&((pba_off & !7) | u32::from(pba_bar & 7)).to_le_bytes());
        body
    }

    /// The message-control register.
    pub fn message_control(&self) -> u16 {
        let mut ctl = self.num_vectors() - 1;
        if self.enabled {
            ctl |= MSIX_ENABLE;
        }
        if self.function_masked {
            ctl |= MSIX_FUNCTION_MASK;
        }
        ctl
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Handles a guest write of the message-control register (only enable and function mask are
    /// writable). Routes are refreshed and pending vectors that became unmasked are delivered.
    pub fn set_message_control(&mut self, value: u16) {
        let enabled = value & MSIX_ENABLE != 0;
        let masked = value & MSIX_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.num_vectors() {
            self.push_route(v);
            self.deliver_if_pending(v);
        }
    }

    /// Whether vector `v` is effectively masked (out-of-range vectors count as masked).
    pub fn is_masked(&self, v: u16) -> bool {
        match self.table.get(usize::from(v)) {
            Some(e) => !self.enabled || self.function_masked || e.control & VECTOR_MASKED != 0,
            None => true,
        }
    }

    /// Whether vector `v`'s pending bit is set.
    pub fn is_pending(&self, v: u16) -> bool {
        let v = usize::from(v);
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    /// The message programmed in vector `v`.
    pub fn message(&self, v: u16) -> Option<MsiMessage> {
        self.table.get(usize::from(v)).map(TableEntry::message)
    }

    fn set_pending(&mut self, v: u16, pending: bool) {
        let v = usize::from(v);
        if let Some(w) = self.pba.get_mut(v / 64) {
            if pending {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn push_route(&self, v: u16) {
        if let Some(e) = self.table.get(usize::from(v)) {
            if let Err(err) = self.group.update(v, e.message(), self.is_masked(v)) {
                log::warn!("msix: updating the route of vector {v} failed: {err}");
            }
        }
    }

    fn deliver_if_pending(&mut self, v: u16) {
        if self.is_pending(v) && !self.is_masked(v) {
            self.set_pending(v, false);
            if let Err(err) = self.group.trigger(v) {
                log::warn!("msix: delivering pending vector {v} failed: {err}");
            }
        }
    }

    /// The EventFd that delivers vector `v` directly ([`MsiInterruptGroup::irqfd`]).
    pub fn irqfd(&self, v: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
        if usize::from(v) >= self.table.len() {
            return None;
        }
        self.group.irqfd(v)
    }

    /// Signals vector `v`: delivered now if unmasked, otherwise its pending bit is set.
    pub fn trigger(&mut self, v: u16) -> io::Result<()> {
        if usize::from(v) >= self.table.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {v} out of range"),
            ));
        }
        if self.is_masked(v) {
            self.set_pending(v, true);
            return Ok(());
        }
        self.group.trigger(v)
    }

    /// Guest read of the table at byte `offset` (4- or 8-byte accesses; others read all-ones).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let read_dword = |off: u64| -> Option<u32> {
            let e = self
                .table
                .get(usize::try_from(off / MSIX_TABLE_ENTRY_SIZE).ok()?)?;
            Some(match off % MSIX_TABLE_ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.control,
            })
        };
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                if let Some(v) = read_dword(offset) {
                    data.copy_from_slice(&v.to_le_bytes());
                }
            }
            8 if offset.is_multiple_of(8) => {
                if let (Some(lo), Some(hi)) = (read_dword(offset), read_dword(offset + 4)) {
                    data[..4].copy_from_slice(&lo.to_le_bytes());
                    data[4..].copy_from_slice(&hi.to_le_bytes());
                }
            }
            _ => {}
        }
    }

    /// Guest write of the table at byte `offset` (4- or 8-byte aligned accesses; others are
    /// ignored). Updates the route, and delivers a pending message when a vector is unmasked.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let dwords: Vec<(u64, u32)> = match data.len() {
            4 if offset.is_multiple_of(4) => vec![(offset, le32(data))],
            8 if offset.is_multiple_of(8) => {
                vec![(offset, le32(&data[..4])), (offset + 4, le32(&data[4..]))]
            }
            _ => return,
        };
        for (off, value) in dwords {
            let Ok(idx) = usize::try_from(off / MSIX_TABLE_ENTRY_SIZE) else {
                return;
            };
            let Some(e) = self.table.get_mut(idx) else {
                return;
            };
            let before = *e;
            match off % MSIX_TABLE_ENTRY_SIZE {
                0 => e.addr_lo = value,
                4 => e.addr_hi = value,
                8 => e.data = value,
                _ => e.control = value & VECTOR_MASKED,
            }
            if *e != before {
                let v = idx as u16;
                self.push_route(v);
                self.deliver_if_pending(v);
            }
        }
    }

    /// Guest read of the PBA at byte `offset`; the PBA is read-only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let Some(byte_off) = offset.checked_add(i as u64) else {
                break;
            };
            let Ok(word) = usize::try_from(byte_off / 8) else {
                break;
            };
            if let Some(w) = self.pba.get(word) {
                *b = (w >> ((byte_off % 8) * 8)) as u8;
            }
        }
    }
}

/// One vector of a saved [`MsixState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixVectorState {
    /// Message address (both halves of the table entry).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// The per-vector mask bit.
    pub masked: bool,
}

/// The saved state of an [`MsixConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table, one entry per vector.
    pub table: Vec<MsixVectorState>,
    /// The pending-bit array, 64 vectors per word.
    pub pba: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

impl MsixConfig {
    /// Checks that `state` fits this function (same vector count) and is coherent (a pending
    /// bit only for a vector that exists and is masked), without applying it.
    pub fn check_state(&self, state: &MsixState) -> Result<(), RestoreError> {
        if state.table.len() != self.table.len() || state.pba.len() != self.pba.len() {
            return Err(RestoreError::mismatch(format!(
                "the snapshot has {} MSI-X vectors ({} PBA words), this device {} ({})",
                state.table.len(),
                state.pba.len(),
                self.table.len(),
                self.pba.len()
            )));
        }
        for (word, bits) in state.pba.iter().enumerate() {
            for bit in 0..64 {
                if bits & (1 << bit) == 0 {
                    continue;
                }
                let v = word * 64 + bit;
                let masked = match state.table.get(v) {
                    None => {
                        return Err(RestoreError::invalid(
                            "pba",
                            format!("pending bit of vector {v}, past the table"),
                        ))
                    }
                    Some(e) => !state.enabled || state.function_masked || e.masked,
                };
                if !masked {
                    // It would have been delivered when it was unmasked.
                    return Err(RestoreError::invalid(
                        "pba",
                        format!("vector {v} is pending but not masked"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Persist for MsixConfig {
    type State = MsixState;

    fn save(&self) -> MsixState {
        MsixState {
            table: self
                .table
                .iter()
                .map(|e| MsixVectorState {
                    address: e.message().address,
                    data: e.data,
                    masked: e.control & VECTOR_MASKED != 0,
                })
                .collect(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Applies the table and pushes every vector's route (message and effective mask) to the
    /// interrupt group.
    fn restore(&mut self, state: &MsixState) -> Result<(), RestoreError> {
        self.check_state(state)?;
        for (e, s) in self.table.iter_mut().zip(&state.table) {
            *e = TableEntry {
                addr_lo: s.address as u32,
                addr_hi: (s.address >> 32) as u32,
                data: s.data,
                control: if s.masked { VECTOR_MASKED } else { 0 },
            };
        }
        self.pba.copy_from_slice(&state.pba);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for v in 0..self.num_vectors() {
            self.push_route(v);
        }
        Ok(())
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// A recording [`MsiInterruptGroup`] for tests of this crate and of device crates.
pub mod test_utils {
    use std::sync::Mutex;

    use super::*;

    /// Records every route update and delivery.
    #[derive(Debug, Default)]
    pub struct RecordingMsiGroup {
        /// `(vector, message, masked)` per update, in order.
        pub updates: Mutex<Vec<(u16, MsiMessage, bool)>>,
        /// Vectors delivered, in order.
        pub triggered: Mutex<Vec<u16>>,
    }

    impl RecordingMsiGroup {
        /// Vectors delivered so far (and clears the record).
        pub fn take_triggered(&self) -> Vec<u16> {
            std::mem::take(&mut *self.triggered.lock().unwrap_or_else(|e| e.into_inner()))
        }
    }

    impl MsiInterruptGroup for RecordingMsiGroup {
        fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
            self.updates
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((vector, msg, masked));
            Ok(())
        }
        fn trigger(&self, vector: u16) -> io::Result<()> {
            self.triggered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(vector);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::RecordingMsiGroup;
    use super::*;

    fn setup(n: u16) -> (Arc<RecordingMsiGroup>, MsixConfig) {
        let g = Arc::new(RecordingMsiGroup::default());
        let m = MsixConfig::new(n, g.clone()).unwrap();
        (g, m)
    }

    #[test]
    fn vector_count_limits() {
        let g = Arc::new(RecordingMsiGroup::default());
        assert!(MsixConfig::new(0, g.clone()).is_err());
        assert!(MsixConfig::new(2049, g.clone()).is_err());
        let m = MsixConfig::new(65, g).unwrap();
        assert_eq!(m.pba_size(), 16);
        assert_eq!(m.table_size(), 65 * 16);
        assert_eq!(m.message_control(), 64);
        let body = m.capability_body(0, 0x4000, 0, 0x6000);
        assert_eq!(body, [64, 0, 0, 0x40, 0, 0, 0, 0x60, 0, 0]);
    }

    #[test]
    fn table_programming_and_routes() {
        let (g, mut m) = setup(2);
        m.write_table(16, &0xfee0_1000u32.to_le_bytes());
        m.write_table(24, &0x41u32.to_le_bytes());
        let mut d = [0u8; 4];
        m.read_table(16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_1000);
        m.read_table(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "vectors start masked");
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        // Odd sizes and offsets past the table read all-ones and are ignored on write.
        m.read_table(17, &mut d);
        assert_eq!(d, [0xff; 4]);
        m.read_table(32, &mut d);
        assert_eq!(d, [0xff; 4]);
        m.write_table(32, &[0; 4]);
        m.write_table(16, &[0; 2]);
        let updates = g.updates.lock().unwrap().clone();
        assert_eq!(updates.len(), 2);
        assert_eq!(updates[1].0, 1);
        assert_eq!(
            updates[1].1,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x41
            }
        );
        assert!(updates[1].2);
    }

    #[test]
    fn state_round_trip_pushes_routes_and_keeps_pending_vectors() {
        let (_, mut src) = setup(3);
        src.set_message_control(MSIX_ENABLE);
        for v in 0..3u64 {
            src.write_table(v * 16, &(0xfee0_0000u32 + v as u32 * 0x1000).to_le_bytes());
            src.write_table(v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
        }
        // Vectors 0 and 1 unmasked; vector 2 masked with an interrupt pending.
        src.write_table(12, &0u32.to_le_bytes());
        src.write_table(16 + 12, &0u32.to_le_bytes());
        src.trigger(2).unwrap();
        assert!(src.is_pending(2));

        let (g, mut dst) = setup(3);
        let state = crate::persist::assert_round_trip(&src, &mut dst);
        assert!(state.enabled && !state.function_masked);
        // One route per vector with the restored message and effective mask.
        let updates = g.updates.lock().unwrap().clone();
        assert_eq!(updates.len(), 3);
        for (v, msg, masked) in updates {
            assert_eq!(msg, src.message(v).unwrap());
            assert_eq!(masked, v == 2);
        }
        assert!(g.take_triggered().is_empty());
        // Same registers through the BAR interface; unmasking vector 2 delivers it.
        for off in (0..48).step_by(4) {
            let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
            src.read_table(off, &mut a);
            dst.read_table(off, &mut b);
            assert_eq!(a, b, "table offset {off}");
        }
        assert_eq!(dst.message_control(), src.message_control());
        dst.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(g.take_triggered(), vec![2]);
        dst.trigger(0).unwrap();
        assert_eq!(g.take_triggered(), vec![0]);
    }

    #[test]
    fn restore_refuses_foreign_or_incoherent_tables() {
        let (_, src) = setup(3);
        let good = src.save();
        let (g, mut dst) = setup(3);
        let mut bigger = setup(4).1.save();
        bigger.pba = good.pba.clone();
        let mut past_table = good.clone();
        past_table.pba[0] = 1 << 3;
        let mut unmasked_pending = good.clone();
        unmasked_pending.enabled = true;
        unmasked_pending.table[1].masked = false;
        unmasked_pending.pba[0] = 1 << 1;
        for bad in [bigger, past_table, unmasked_pending] {
            assert!(dst.restore(&bad).is_err(), "{bad:?}");
        }
        assert!(g.updates.lock().unwrap().is_empty(), "no route pushed");
        assert_eq!(dst.save(), good);
    }

    #[test]
    fn masked_vectors_become_pending_and_fire_on_unmask() {
        let (g, mut m) = setup(3);
        // Disabled: everything pends.
        m.trigger(2).unwrap();
        assert!(m.is_pending(2));
        assert!(g.take_triggered().is_empty());
        assert!(m.trigger(3).is_err());
        // Enable with the function masked, unmask the vector: still pending.
        m.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        m.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert!(m.is_pending(2));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b100);
        // Clearing the function mask delivers it and clears the bit.
        m.set_message_control(MSIX_ENABLE);
        assert_eq!(g.take_triggered(), vec![2]);
        assert!(!m.is_pending(2));
        // Unmasked: direct delivery.
        m.trigger(2).unwrap();
        assert_eq!(g.take_triggered(), vec![2]);
        // Per-vector mask, then unmask through a 64-bit write of data + control.
        m.write_table(2 * 16 + 12, &1u32.to_le_bytes());
        m.trigger(2).unwrap();
        assert!(g.take_triggered().is_empty());
        let mut q = [0u8; 8];
        q[..4].copy_from_slice(&0x42u32.to_le_bytes());
        m.write_table(2 * 16 + 8, &q);
        assert_eq!(g.take_triggered(), vec![2]);
        assert_eq!(m.message(2).unwrap().data, 0x42);
        assert!(!m.is_masked(2));
        assert!(m.is_masked(0));
    }
}
