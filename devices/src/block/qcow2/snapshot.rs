//! Internal snapshots: the snapshot table (parse with bounds, encode keeping unknown extra
//! data), and create / apply / delete with QEMU's refcount rules (each L1 table that reaches an
//! L2 table or a data cluster counts once), plus a read-only view of a snapshot.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::header::{Header, MAX_L1_BYTES, MAX_SNAPSHOTS};
use super::{read_meta, Error, Mapping, Qcow2Image, Result, L1E_OFFSET_MASK, OFLAG_COPIED};

/// QEMU's limit on snapshot extra data.
const MAX_EXTRA: u32 = 1024;
/// QEMU's limit on the whole snapshot table.
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Where its L1 table is.
    pub l1_offset: u64,
    /// Entries in its L1 table.
    pub l1_size: u32,
    /// Unique id ("1", "2", ...).
    pub id: String,
    /// Name given by the user.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Saved VM state size (0: disk-only snapshot).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Extra data past the fields we know, kept verbatim.
    pub extra_tail: Vec<u8>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}

/// Bytes the encoded table takes.
pub fn table_bytes(snaps: &[Snapshot]) -> u64 {
    encode_table(snaps).len() as u64
}

/// Reads and validates the snapshot table of an image.
pub fn read_table(file: &File, h: &Header, file_len: u64) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut pos = h.snapshots_offset;
    let cs = h.cluster_size();
    for _ in 0..h.nb_snapshots {
        if pos - h.snapshots_offset > MAX_TABLE_BYTES {
            return Err(Error::BadSnapshotTable("table too large"));
        }
        let mut fixed = [0u8; 40];
        read_meta(file, &mut fixed, pos)?;
        let l1_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = usize::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(Error::BadSnapshotTable("extra data too large"));
        }
        let var_len = extra_len as usize + id_len + name_len;
        let mut var = vec![0u8; var_len];
        read_meta(file, &mut var, pos + 40)?;
        let extra = &var[..extra_len as usize];
        let id = String::from_utf8_lossy(&var[extra_len as usize..extra_len as usize + id_len])
            .into_owned();
        let name = String::from_utf8_lossy(&var[extra_len as usize + id_len..]).into_owned();
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        let disk_size = if extra.len() >= 16 {
            be64(extra, 8)
        } else {
            h.size
        };
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::TableTooLarge("snapshot L1", l1_bytes));
        }
        if l1_size > 0
            && (!l1_offset.is_multiple_of(cs)
                || l1_offset == 0
                || l1_offset.checked_add(l1_bytes).is_none_or(|e| e > file_len))
        {
            return Err(Error::BadSnapshotTable(
                "L1 table offset invalid or past the end of the file",
            ));
        }
        if Header::l1_entries_for(disk_size, h.cluster_bits) > u64::from(l1_size)
            && vm_state_size == 0
        {
            return Err(Error::BadSnapshotTable(
                "L1 table too small for the snapshot's disk size",
            ));
        }
        out.push(Snapshot {
            l1_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size,
            extra_tail: extra.get(16..).map(<[u8]>::to_vec).unwrap_or_default(),
        });
        pos += (40 + var_len).next_multiple_of(8) as u64;
    }
    Ok(out)
}

/// Encodes the snapshot table.
pub fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let extra_len = 16 + s.extra_tail.len();
        b.extend_from_slice(&s.l1_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(u32::try_from(s.vm_state_size).unwrap_or(0)).to_be_bytes());
        b.extend_from_slice(&(extra_len as u32).to_be_bytes());
        b.extend_from_slice(&s.vm_state_size.to_be_bytes());
        b.extend_from_slice(&s.disk_size.to_be_bytes());
        b.extend_from_slice(&s.extra_tail);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b
}

impl Qcow2Image {
    /// The snapshot with id `id_or_name`, or else the first one named so (QEMU's
    /// `find_snapshot_by_id_or_name`).
    pub fn snapshot(&self, id_or_name: &str) -> Result<&Snapshot> {
        Ok(&self.snapshots[self.find_snapshot(id_or_name)?])
    }

    fn find_snapshot(&self, name: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == name))
            .ok_or_else(|| Error::SnapshotNotFound(name.to_string()))
    }

    fn read_l1_at(&self, off: u64, entries: u32) -> Result<Vec<u64>> {
        let mut b = vec![0u8; entries as usize * 8];
        read_meta(&self.file, &mut b, off)?;
        Ok(super::decode_table(&b))
    }

    /// Reads a whole L2 table from disk (the cache must be clean).
    pub(crate) fn read_l2_table(&self, off: u64) -> Result<Vec<u64>> {
        if !off.is_multiple_of(self.cs)
            || off == 0
            || off.checked_add(self.cs).is_none_or(|e| e > self.file_end())
        {
            return Err(Error::BadL2Offset(off));
        }
        let mut b = vec![0u8; self.cs as usize];
        read_meta(&self.file, &mut b, off)?;
        Ok(super::decode_table(&b))
    }

    /// Host clusters an L2 entry references: (first cluster offset, count).
    pub(crate) fn entry_clusters(&self, e: u64) -> Option<(u64, u64)> {
        let cb = self.header.cluster_bits;
        match self.decode_entry(e) {
            Mapping::Normal { host, .. } | Mapping::Zero { host } if host != 0 => Some((host, 1)),
            Mapping::Compressed { offset, len } => {
                let first = offset >> cb;
                let last = (offset + len - 1) >> cb;
                Some((first << cb, last - first + 1))
            }
            _ => None,
        }
    }

    /// Adds `delta` (+1 or -1, the latter deferred) to everything an L1 table reaches.
    fn ref_l1_tree(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        let cb = self.header.cluster_bits;
        for &l1e in l1 {
            let l2 = l1e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let table = self.read_l2_table(l2)?;
            for &e in &table {
                if let Some((host, n)) = self.entry_clusters(e) {
                    if delta > 0 {
                        for c in (host >> cb)..(host >> cb) + n {
                            self.change_refcount(c, 1)?;
                        }
                    } else {
                        self.free_later(host, n);
                    }
                }
            }
            if delta > 0 {
                self.change_refcount(l2 >> cb, 1)?;
            } else {
                self.free_later(l2, 1);
            }
        }
        Ok(())
    }

    /// Makes every COPIED flag in the active tables match the refcounts (the cache is clean).
    pub(crate) fn fix_copied_flags(&mut self) -> Result<()> {
        let cb = self.header.cluster_bits;
        let fe = self.file_end();
        for i in 0..self.l1.len() {
            let l2 = self.l1[i] & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let mut table = self.read_l2_table(l2)?;
            let mut changed = false;
            for e in table.iter_mut() {
                let host = match self.decode_entry(*e) {
                    Mapping::Normal { host, .. } | Mapping::Zero { host } if host != 0 => host,
                    _ => continue,
                };
                let want = if self.rc.get(&self.file, host >> cb, fe)? == 1 {
                    *e | OFLAG_COPIED
                } else {
                    *e & !OFLAG_COPIED
                };
                changed |= want != *e;
                *e = want;
            }
            if changed {
                self.file.write_all_at(&super::encode_table(&table), l2)?;
                self.l2.forget_table(l2, self.cs);
            }
            let want = if self.rc.get(&self.file, l2 >> cb, fe)? == 1 {
                l2 | OFLAG_COPIED
            } else {
                l2
            };
            if want != self.l1[i] {
                self.l1[i] = want;
                self.l1_dirty = true;
            }
        }
        self.write_l1()?;
        self.file.sync_data()?;
        Ok(())
    }

    /// Writes a new snapshot table, switches the header to it and frees the old one.
    fn store_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        let bytes = encode_table(&snaps);
        let old_off = self.header.snapshots_offset;
        let old_len = table_bytes(&self.snapshots);
        let new_off = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(self.cs);
            let off = self.alloc_clusters(n)?;
            let mut padded = bytes;
            padded.resize((n * self.cs) as usize, 0);
            self.file.write_all_at(&padded, off)?;
            self.note_written(off, n * self.cs);
            off
        };
        self.refcount_barrier()?;
        self.file.sync_data()?;
        self.header.nb_snapshots = snaps.len() as u32;
        self.header.snapshots_offset = new_off;
        self.write_header()?;
        if old_off != 0 && old_len > 0 {
            self.free_later(old_off, old_len.div_ceil(self.cs));
        }
        self.snapshots = snaps;
        Ok(())
    }

    /// Creates an internal snapshot of the active disk (like `qemu-img snapshot -c`): a
    /// disk-only snapshot.
    pub fn create_snapshot(&mut self, name: &str) -> Result<()> {
        self.create_snapshot_with_state(name, 0, 0)
    }

    /// Creates an internal snapshot that carries a VM state (QEMU's `savevm`): the caller has
    /// written `vm_state_size` bytes at position 0 of the VM state area
    /// ([`write_vm_state`](Self::write_vm_state)); `vm_clock_nsec` is the guest clock to record.
    ///
    /// As `qcow2_snapshot_create` does, the snapshot's L1 table is a copy of the whole active
    /// one, entries of the VM state area included, and once the snapshot is recorded the VM
    /// state clusters are discarded from the active disk (they would only cost copy-on-write at
    /// the next snapshot): the state then lives in the snapshot alone.
    pub fn create_snapshot_with_state(
        &mut self,
        name: &str,
        vm_state_size: u64,
        vm_clock_nsec: u64,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.vm_state_start(0, vm_state_size)?;
        if self.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::TooManySnapshots(self.snapshots.len() as u32 + 1));
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::SnapshotExists(name.to_string()));
        }
        self.flush_all()?;
        let l1 = self.l1.clone();
        self.ref_l1_tree(&l1, 1)?;
        self.refcount_barrier()?;
        // Copy of the active L1 for the snapshot.
        let l1_bytes = (l1.len() as u64 * 8).max(8);
        let n = l1_bytes.div_ceil(self.cs);
        let l1_off = self.alloc_clusters(n)?;
        let mut b = super::encode_table(&l1.iter().map(|e| e & !OFLAG_COPIED).collect::<Vec<_>>());
        b.resize((n * self.cs) as usize, 0);
        self.file.write_all_at(&b, l1_off)?;
        self.note_written(l1_off, n * self.cs);
        self.fix_copied_flags()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let mut snaps = self.snapshots.clone();
        snaps.push(Snapshot {
            l1_offset: l1_off,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec,
            vm_state_size,
            disk_size: self.header.size,
            extra_tail: u64::MAX.to_be_bytes().to_vec(), // icount: not recorded
        });
        self.store_snapshot_table(snaps)?;
        self.flush_all()?;
        self.rebuild_metadata_set();
        if vm_state_size > 0 {
            // The snapshot is complete and durable here. Like QEMU, a failure to drop the
            // state from the active disk does not undo it: the clusters stay referenced by
            // both tables (consistent, only bigger), and the error resurfaces at the next
            // flush if the file is failing.
            let _ = self
                .discard_vm_state(vm_state_size)
                .and_then(|()| self.flush_all());
        }
        Ok(())
    }

    /// Deletes a snapshot by id or name (like `qemu-img snapshot -d`).
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let i = self.find_snapshot(name)?;
        self.flush_all()?;
        let sn = self.snapshots[i].clone();
        let mut snaps = self.snapshots.clone();
        snaps.remove(i);
        self.store_snapshot_table(snaps)?;
        let l1 = self.read_l1_at(sn.l1_offset, sn.l1_size)?;
        self.ref_l1_tree(&l1, -1)?;
        self.free_later(
            sn.l1_offset,
            (u64::from(sn.l1_size) * 8).max(8).div_ceil(self.cs),
        );
        self.flush_all()?;
        self.l2.clear();
        self.fix_copied_flags()?;
        self.rebuild_metadata_set();
        Ok(())
    }

    /// Reverts the active disk to a snapshot (like `qemu-img snapshot -a`). The whole L1 table
    /// of the snapshot is copied, so the VM state area comes back with the disk (what `loadvm`
    /// then reads). As in `qcow2_snapshot_goto`, the active table keeps its size if it is the
    /// bigger one (padded with empty entries), and is never smaller than the disk needs.
    pub fn apply_snapshot(&mut self, name: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let i = self.find_snapshot(name)?;
        self.flush_all()?;
        let sn = self.snapshots[i].clone();
        let mut new_l1 = self.read_l1_at(sn.l1_offset, sn.l1_size)?;
        let disk_entries = Header::l1_entries_for(sn.disk_size, self.header.cluster_bits);
        let entries = (self.l1.len() as u64)
            .max(u64::from(sn.l1_size))
            .max(disk_entries);
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::TableTooLarge("L1", entries * 8));
        }
        new_l1.resize(entries as usize, 0);
        self.ref_l1_tree(&new_l1, 1)?;
        // A fresh active L1 table holding the snapshot's entries.
        let n = (new_l1.len() as u64 * 8).max(8).div_ceil(self.cs);
        let off = self.alloc_clusters(n)?;
        let mut b = super::encode_table(&new_l1);
        b.resize((n * self.cs) as usize, 0);
        self.refcount_barrier()?;
        self.file.write_all_at(&b, off)?;
        self.note_written(off, n * self.cs);
        self.file.sync_data()?;
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        let old_off = self.header.l1_table_offset;
        self.header.l1_table_offset = off;
        self.header.l1_size = entries as u32;
        self.header.size = sn.disk_size;
        self.write_header()?;
        self.ref_l1_tree(&old_l1, -1)?;
        self.free_later(old_off, (old_l1.len() as u64 * 8).max(8).div_ceil(self.cs));
        self.l2.clear();
        self.flush_all()?;
        self.l2.clear();
        self.fix_copied_flags()?;
        self.rebuild_metadata_set();
        Ok(())
    }

    /// Shows snapshot `name` instead of the active disk (read-only images only).
    pub(crate) fn view_snapshot(&mut self, name: &str) -> Result<()> {
        let i = self.find_snapshot(name)?;
        let sn = self.snapshots[i].clone();
        self.l1 = self.read_l1_at(sn.l1_offset, sn.l1_size)?;
        self.header.size = sn.disk_size;
        self.l2.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_roundtrip_keeps_unknown_extra() {
        let s = Snapshot {
            l1_offset: 0x30000,
            l1_size: 2,
            id: "1".into(),
            name: "first".into(),
            date_sec: 5,
            date_nsec: 6,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            disk_size: 1 << 20,
            extra_tail: vec![9; 8],
        };
        let b = encode_table(&[s.clone(), s.clone()]);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(table_bytes(std::slice::from_ref(&s)) * 2, b.len() as u64);
        let p = std::env::temp_dir().join(format!("snap-tbl-{}", std::process::id()));
        let mut data = vec![0u8; 0x40000];
        data[0x20000..0x20000 + b.len()].copy_from_slice(&b);
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let h = Header {
            nb_snapshots: 2,
            snapshots_offset: 0x20000,
            ..crate::block::qcow2::create::blank_header(&crate::block::qcow2::CreateOptions::new(
                1 << 20,
            ))
        };
        let got = read_table(&f, &h, data.len() as u64).unwrap();
        assert_eq!(got, vec![s.clone(), s]);
        // A table running past the end of the file is refused.
        assert!(read_table(&f, &h, 0x20010).is_err() || data.len() > 0x20010);
        std::fs::remove_file(&p).unwrap();
    }
}
