//! The VM state area, where QEMU's `savevm` puts the VM state of an internal snapshot.
//!
//! It is a range of guest offsets past the disk: it starts at the first L1 entry that maps no
//! part of the virtual disk (`qcow2_vm_state_offset`) and goes through the ordinary cluster
//! paths, so the active L1 table grows to reach it, writes allocate clusters, and reads of
//! unallocated clusters fall through to the backing file (zeros past its end) exactly as a
//! disk read would: QEMU's `qcow2_co_load_vmstate` is a plain driver read at that offset.
//!
//! The life of a state: `savevm` writes it into the active disk ([`Qcow2Image::write_vm_state`]),
//! [`Qcow2Image::create_snapshot_with_state`] copies the active L1 table (state included) into
//! the snapshot, records the size, and discards the state from the active disk. `loadvm` is
//! [`Qcow2Image::load_snapshot`] (the active L1 table becomes a copy of the snapshot's, state
//! included) and then [`Qcow2Image::read_vm_state`]. Deleting the snapshot drops its references
//! like any other cluster of its tree.

use super::engine::MAX_PENDING_FREES;
use super::header::Header;
use super::snapshot::Snapshot;
use super::{Error, Mapping, Qcow2Image, Result, L1E_OFFSET_MASK, OFLAG_ZERO};

/// Largest VM state we read or write (positions `0..MAX_VM_STATE_BYTES`).
pub const MAX_VM_STATE_BYTES: u64 = 1 << 40;

impl Qcow2Image {
    /// Guest offset where the VM state area starts: the first L1 entry past those that map the
    /// virtual disk (QEMU's `l1_vm_state_index << (cluster_bits + l2_bits)`). It follows the disk
    /// size, so it moves with a resize and comes back with a snapshot's disk size on apply.
    pub fn vm_state_offset(&self) -> u64 {
        Header::l1_entries_for(self.header.size, self.header.cluster_bits) << self.l1_shift()
    }

    /// Guest offset of position `pos` of the VM state, for a request of `len` bytes.
    pub(crate) fn vm_state_start(&self, pos: u64, len: u64) -> Result<u64> {
        let too_large = Error::VmStateTooLarge { pos, len };
        match pos.checked_add(len) {
            Some(end) if end <= MAX_VM_STATE_BYTES => {}
            _ => return Err(too_large),
        }
        self.vm_state_offset()
            .checked_add(pos)
            .filter(|s| s.checked_add(len).is_some())
            .ok_or(too_large)
    }

    /// Writes `buf` at position `pos` of the VM state area (QEMU's `qcow2_co_save_vmstate`):
    /// clusters are allocated (or copied on write) like disk writes, and the active L1 table
    /// grows as QEMU's write path grows it (by half again each time an entry past its end is
    /// needed). Nothing is flushed here; [`create_snapshot_with_state`] flushes.
    ///
    /// [`create_snapshot_with_state`]: Self::create_snapshot_with_state
    pub fn write_vm_state(&mut self, pos: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let start = self.vm_state_start(pos, buf.len() as u64)?;
        let shift = self.l1_shift();
        let mut done = 0usize;
        while done < buf.len() {
            let goff = start + done as u64;
            let l1i = goff >> shift;
            let span_end = (l1i + 1) << shift;
            let n = ((span_end - goff) as usize).min(buf.len() - done);
            self.grow_l1(l1i + 1, false)?;
            self.write_guest(&buf[done..done + n], goff)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at position `pos` of the VM state area (QEMU's
    /// `qcow2_co_load_vmstate`). Unallocated clusters read like unallocated disk clusters:
    /// from the backing file at the same offset, zeros past its end or without one. Reading
    /// past the state's size is allowed (QEMU's loader reads ahead) and gives what is there.
    pub fn read_vm_state(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let start = self.vm_state_start(pos, buf.len() as u64)?;
        self.read_guest(buf, start)
    }

    /// Drops the first `size` bytes (rounded up to whole clusters) of the VM state area from
    /// the active disk, as `qcow2_snapshot_create` does with `qcow2_cluster_discard(...,
    /// QCOW2_DISCARD_NEVER, full_discard = false)`: an entry that is allocated, or any entry
    /// over a backing file, becomes a zero cluster on v3 and unallocated on v2; the L2 tables
    /// touched are made the active disk's own first (copy-on-write of a table shared with a
    /// snapshot). Also usable to clean up after a `savevm` that failed before its snapshot.
    pub fn discard_vm_state(&mut self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let start = self.vm_state_start(0, size)?;
        if size == 0 {
            return Ok(());
        }
        self.mark_dirty_if_lazy()?;
        let cs = self.cs;
        let shift = self.l1_shift();
        let end = start + size.next_multiple_of(cs);
        let zero = if self.header.version >= 3 {
            OFLAG_ZERO
        } else {
            0
        };
        let has_backing = self.backing.is_some();
        let mut goff = start;
        while goff < end {
            let l1i = goff >> shift;
            match self.l1.get(l1i as usize) {
                None => break,
                Some(e) if e & L1E_OFFSET_MASK == 0 => {
                    // Nothing was ever written under this entry. (QEMU would give it an empty
                    // L2 table; leaving it empty reads the same.)
                    goff = (l1i + 1) << shift;
                    continue;
                }
                Some(_) => {}
            }
            let (slot, idx) = self.l2_for_write(goff)?;
            let old = self.l2.get(slot, idx);
            let allocated = match self.decode_entry(old) {
                Mapping::Unallocated => false,
                Mapping::Zero { host } => host != 0,
                Mapping::Normal { .. } | Mapping::Compressed { .. } => true,
            };
            if (has_backing || allocated) && old != zero {
                self.l2.set(slot, idx, zero);
                self.free_entry_later(old);
            }
            goff += cs;
            if self.pending_free.len() > MAX_PENDING_FREES {
                self.flush_all()?;
            }
        }
        Ok(())
    }

    /// The snapshot `id_or_name` if it carries a VM state; QEMU's `loadvm` refusal otherwise.
    pub fn snapshot_with_state(&self, id_or_name: &str) -> Result<&Snapshot> {
        let sn = self.snapshot(id_or_name)?;
        if sn.vm_state_size == 0 {
            return Err(Error::DiskOnlySnapshot(id_or_name.to_string()));
        }
        Ok(sn)
    }

    /// The disk half of `loadvm`: refuses a disk-only snapshot, reverts the active disk to the
    /// snapshot (VM state area included) and returns its entry. The state is then read with
    /// [`read_vm_state`](Self::read_vm_state), `vm_state_size` bytes from position 0.
    pub fn load_snapshot(&mut self, id_or_name: &str) -> Result<Snapshot> {
        let sn = self.snapshot_with_state(id_or_name)?.clone();
        self.apply_snapshot(&sn.id)?;
        Ok(sn)
    }
}

#[cfg(test)]
mod tests;
