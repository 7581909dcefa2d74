//! The data paths: guest reads, writes (allocation and copy-on-write of clusters and L2 tables),
//! discard / write-zeroes, and the flush that orders metadata writes for crash safety.

use std::os::unix::fs::FileExt;

use super::l2cache::slice_entries;
use super::{
    read_meta, Error, Mapping, Qcow2Image, Result, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
    OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::block::raw::read_zero_fill;

/// Flush on our own once this many deferred frees pile up, so discards without guest flushes
/// still give space back.
pub(crate) const MAX_PENDING_FREES: usize = 4096;

impl Qcow2Image {
    pub(crate) fn l1_shift(&self) -> u32 {
        2 * self.header.cluster_bits - 3
    }

    /// Decodes an L2 entry (no validation of the offsets).
    pub(crate) fn decode_entry(&self, e: u64) -> Mapping {
        let cb = self.header.cluster_bits;
        if e & OFLAG_COMPRESSED != 0 {
            let x = 62 - (cb - 8);
            let offset = e & ((1u64 << x) - 1);
            let nsec = (e >> x) & ((1u64 << (cb - 8)) - 1);
            let len = (nsec + 1) * 512 - (offset & 511);
            return Mapping::Compressed { offset, len };
        }
        let host = e & L2E_OFFSET_MASK;
        if self.header.version >= 3 && e & OFLAG_ZERO != 0 {
            Mapping::Zero { host }
        } else if host == 0 {
            Mapping::Unallocated
        } else {
            Mapping::Normal {
                host,
                copied: e & OFLAG_COPIED != 0,
            }
        }
    }

    /// Checks that a data cluster offset is usable for guest offset `guest`.
    fn check_data_cluster(&self, guest: u64, host: u64) -> Result<()> {
        let cb = self.header.cluster_bits;
        if !host.is_multiple_of(self.cs) || host == 0 || host >= self.file_end() {
            return Err(Error::BadClusterOffset { guest, host });
        }
        if self.metadata.contains(&(host >> cb)) {
            return Err(Error::MetadataOverlap { guest, host });
        }
        Ok(())
    }

    fn check_l2_offset(&self, off: u64) -> Result<()> {
        if !off.is_multiple_of(self.cs)
            || off == 0
            || off.checked_add(self.cs).is_none_or(|e| e > self.file_end())
        {
            return Err(Error::BadL2Offset(off));
        }
        Ok(())
    }

    /// Cache slot of the L2 slice holding the entry for guest offset `goff` in the table at
    /// `l2_off`, loading (and evicting) as needed. Returns (slot, index in slice).
    fn l2_slot(&mut self, l2_off: u64, goff: u64) -> Result<(usize, usize)> {
        let cb = self.header.cluster_bits;
        let per = slice_entries(cb);
        let l2_index = (goff >> cb) & (self.header.l2_entries() - 1);
        let slice_off = l2_off + (l2_index / per) * per * 8;
        let idx = (l2_index % per) as usize;
        if let Some(s) = self.l2.lookup(slice_off) {
            return Ok((s, idx));
        }
        if self.l2.is_full() {
            if let Some(victim) = self.l2.evict_lru() {
                if victim.dirty {
                    self.refcount_barrier()?;
                    self.file.write_all_at(&victim.encode(), victim.offset)?;
                }
            }
        }
        let mut buf = vec![0u8; (per * 8) as usize];
        read_meta(&self.file, &mut buf, slice_off)?;
        let s = self.l2.insert(slice_off, super::decode_table(&buf), false);
        Ok((s, idx))
    }

    /// The mapping of the guest cluster containing `goff`, validated.
    pub(crate) fn mapping(&mut self, goff: u64) -> Result<Mapping> {
        let l1i = (goff >> self.l1_shift()) as usize;
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok(Mapping::Unallocated);
        };
        let l2_off = l1e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.check_l2_offset(l2_off)?;
        let (s, i) = self.l2_slot(l2_off, goff)?;
        let m = self.decode_entry(self.l2.get(s, i));
        match m {
            Mapping::Normal { host, .. } => self.check_data_cluster(goff, host)?,
            Mapping::Compressed { offset, .. } if offset >= self.file_end() || offset < self.cs => {
                return Err(Error::BadClusterOffset {
                    guest: goff,
                    host: offset,
                })
            }
            _ => {}
        }
        Ok(m)
    }

    pub(crate) fn read_guest(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cs;
        let mut pos = 0usize;
        // A run of guest bytes that are contiguous on the host: (buf start, host offset, len).
        let mut run: Option<(usize, u64, usize)> = None;
        while pos < buf.len() {
            let goff = offset + pos as u64;
            let in_off = goff & (cs - 1);
            let n = ((cs - in_off) as usize).min(buf.len() - pos);
            let m = self.mapping(goff)?;
            if let Mapping::Normal { host, .. } = m {
                let h = host + in_off;
                match &mut run {
                    Some((_, hs, l)) if *hs + *l as u64 == h => *l += n,
                    _ => {
                        if let Some((bs, hs, l)) = run.take() {
                            read_zero_fill(&self.file, &mut buf[bs..bs + l], hs)?;
                        }
                        run = Some((pos, h, n));
                    }
                }
            } else {
                // End the run first: the next data cluster is not guest-contiguous with it.
                if let Some((bs, hs, l)) = run.take() {
                    read_zero_fill(&self.file, &mut buf[bs..bs + l], hs)?;
                }
                self.read_unmapped(m, goff, &mut buf[pos..pos + n])?;
            }
            pos += n;
        }
        if let Some((bs, hs, l)) = run {
            read_zero_fill(&self.file, &mut buf[bs..bs + l], hs)?;
        }
        Ok(())
    }

    /// Reads the part of one guest cluster that is not a plain data cluster.
    fn read_unmapped(&mut self, m: Mapping, goff: u64, out: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Zero { .. } => out.fill(0),
            Mapping::Unallocated => self.read_backing(goff, out)?,
            Mapping::Compressed { offset, len } => {
                let in_off = (goff & (self.cs - 1)) as usize;
                let data = self.read_compressed(offset, len)?;
                out.copy_from_slice(&data[in_off..in_off + out.len()]);
            }
            Mapping::Normal { host, .. } => {
                read_zero_fill(&self.file, out, host + (goff & (self.cs - 1)))?
            }
        }
        Ok(())
    }

    /// Reads from the backing file, with zeros past its end (or without one).
    pub(crate) fn read_backing(&mut self, goff: u64, out: &mut [u8]) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            out.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let k = if goff < bsize {
            ((bsize - goff) as usize).min(out.len())
        } else {
            0
        };
        if k > 0 {
            b.read_at(&mut out[..k], goff).map_err(|e| {
                Error::Backing(
                    self.header.backing_file.clone().unwrap_or_default().into(),
                    Box::new(e),
                )
            })?;
        }
        out[k..].fill(0);
        Ok(())
    }

    /// True if the backing file has no data for guest cluster at `goff`.
    fn backing_is_empty_at(&self, goff: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| goff >= b.size())
    }

    /// Sets the dirty bit before the first write when lazy refcounts are on.
    pub(crate) fn mark_dirty_if_lazy(&mut self) -> Result<()> {
        if self.lazy && !self.marked_dirty {
            self.header.incompatible_features |= super::header::INCOMPAT_DIRTY;
            self.file.write_all_at(
                &self.header.incompatible_features.to_be_bytes(),
                super::header::INCOMPAT_OFFSET,
            )?;
            self.file.sync_data()?;
            self.marked_dirty = true;
        }
        Ok(())
    }

    /// Clears the dirty bit after a full flush.
    pub(crate) fn mark_clean(&mut self) -> Result<()> {
        self.header.incompatible_features &= !super::header::INCOMPAT_DIRTY;
        self.file.write_all_at(
            &self.header.incompatible_features.to_be_bytes(),
            super::header::INCOMPAT_OFFSET,
        )?;
        self.file.sync_data()?;
        self.marked_dirty = false;
        Ok(())
    }

    /// Slot of the L2 entry for `goff`, with an L2 table that exists and that only the active
    /// L1 references (allocating or copying one as needed).
    pub(crate) fn l2_for_write(&mut self, goff: u64) -> Result<(usize, usize)> {
        let l1i = (goff >> self.l1_shift()) as usize;
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or(Error::Internal("write past the L1 table"))?;
        let old = l1e & L1E_OFFSET_MASK;
        let cb = self.header.cluster_bits;
        if old == 0 || l1e & OFLAG_COPIED == 0 {
            let mut table = vec![0u8; self.cs as usize];
            if old != 0 {
                self.check_l2_offset(old)?;
                self.write_dirty_slices()?;
                read_meta(&self.file, &mut table, old)?;
            }
            let new = self.alloc_clusters(1)?;
            self.file.write_all_at(&table, new)?;
            self.note_written(new, self.cs);
            self.metadata.insert(new >> cb);
            self.l1[l1i] = new | OFLAG_COPIED;
            self.l1_dirty = true;
            if old != 0 {
                self.free_later(old, 1);
            }
            return self.l2_slot(new, goff);
        }
        self.check_l2_offset(old)?;
        self.l2_slot(old, goff)
    }

    pub(crate) fn note_written(&mut self, host: u64, len: u64) {
        self.written_end = self.written_end.max(host + len);
        self.file_len = self.file_len.max(host + len);
    }

    pub(crate) fn write_guest(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.mark_dirty_if_lazy()?;
        let cs = self.cs;
        let per = slice_entries(self.header.cluster_bits) as usize;
        let mut pos = 0usize;
        while pos < buf.len() {
            let goff = offset + pos as u64;
            let in_off = goff & (cs - 1);
            let n = ((cs - in_off) as usize).min(buf.len() - pos);
            let (slot, idx) = self.l2_for_write(goff)?;
            let e = self.l2.get(slot, idx);
            let m = self.decode_entry(e);
            if let Mapping::Normal { host, copied: true } = m {
                self.check_data_cluster(goff, host)?;
                // Extend over following clusters that are contiguous on the host.
                let mut len = n;
                let mut k = 1;
                while pos + len < buf.len() && idx + k < per {
                    match self.decode_entry(self.l2.get(slot, idx + k)) {
                        Mapping::Normal {
                            host: h,
                            copied: true,
                        } if h == host + k as u64 * cs => {
                            self.check_data_cluster(goff + k as u64 * cs, h)?;
                            len += (cs as usize).min(buf.len() - pos - len);
                            k += 1;
                        }
                        _ => break,
                    }
                }
                self.file
                    .write_all_at(&buf[pos..pos + len], host + in_off)?;
                self.note_written(host + in_off, len as u64);
                pos += len;
                continue;
            }
            if in_off == 0 && n as u64 == cs {
                // Whole clusters: no copy-on-write, allocate a contiguous run.
                let mut k = 1;
                while idx + k < per && pos + (k + 1) * cs as usize <= buf.len() {
                    match self.decode_entry(self.l2.get(slot, idx + k)) {
                        Mapping::Normal { copied: true, .. } => break,
                        _ => k += 1,
                    }
                }
                let host = self.alloc_clusters(k as u64)?;
                let len = k * cs as usize;
                self.file.write_all_at(&buf[pos..pos + len], host)?;
                self.note_written(host, len as u64);
                for j in 0..k {
                    let old = self.l2.get(slot, idx + j);
                    self.l2
                        .set(slot, idx + j, (host + j as u64 * cs) | OFLAG_COPIED);
                    self.free_entry_later(old);
                }
                pos += len;
            } else {
                self.cow_write(slot, idx, e, m, goff, &buf[pos..pos + n])?;
                pos += n;
            }
        }
        if self.pending_free.len() > MAX_PENDING_FREES {
            self.flush_all()?;
        }
        Ok(())
    }

    /// Writes part of a cluster that needs a new host cluster: old contents (from the old
    /// cluster, a compressed one, the backing file or zeros) plus the new bytes.
    fn cow_write(
        &mut self,
        slot: usize,
        idx: usize,
        e: u64,
        m: Mapping,
        goff: u64,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.cs;
        let in_off = (goff & (cs - 1)) as usize;
        let cluster_start = goff - in_off as u64;
        let zero_source = match m {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing_is_empty_at(cluster_start),
            _ => false,
        };
        let mut cbuf = vec![0u8; cs as usize];
        if !zero_source {
            // Reading may touch the L2 cache (not for these mappings) or the backing file only.
            // Clusters of the VM state area lie past the disk end: those take a whole cluster.
            let limit = match self.header.size.checked_sub(cluster_start) {
                Some(left) if left > 0 => left.min(cs) as usize,
                _ => cs as usize,
            };
            match m {
                Mapping::Normal { host, .. } => {
                    self.check_data_cluster(cluster_start, host)?;
                    read_zero_fill(&self.file, &mut cbuf, host)?;
                }
                other => self.read_unmapped(other, cluster_start, &mut cbuf[..limit])?,
            }
        }
        cbuf[in_off..in_off + data.len()].copy_from_slice(data);
        let host = self.alloc_clusters(1)?;
        if zero_source && host >= self.written_end {
            self.file.write_all_at(data, host + in_off as u64)?;
            self.note_written(host + in_off as u64, data.len() as u64);
        } else {
            self.file.write_all_at(&cbuf, host)?;
            self.note_written(host, cs);
        }
        self.l2.set(slot, idx, host | OFLAG_COPIED);
        self.free_entry_later(e);
        Ok(())
    }

    /// Discard (`zero == false`) or write-zeroes (`zero == true`) a guest range.
    pub(crate) fn discard_range(&mut self, offset: u64, len: u64, zero: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.mark_dirty_if_lazy()?;
        let cs = self.cs;
        let end = offset + len;
        let first_full = offset.next_multiple_of(cs);
        // A tail cluster that ends at the disk end counts as whole.
        let last_full = if end == self.header.size {
            end
        } else {
            end & !(cs - 1)
        };
        if first_full >= last_full {
            if zero {
                self.write_zero_bytes(offset, len)?;
            }
            return Ok(());
        }
        if zero && offset < first_full {
            self.write_zero_bytes(offset, first_full - offset)?;
        }
        let has_backing = self.backing.is_some();
        let v3 = self.header.version >= 3;
        let mut goff = first_full;
        while goff < last_full {
            let desired = match (has_backing, v3, zero) {
                (false, _, _) => 0,
                (true, true, _) => OFLAG_ZERO,
                (true, false, false) => 0,
                (true, false, true) => {
                    // v2 cannot say "zero" over a backing file: write real zeros.
                    let n = cs.min(last_full - goff);
                    self.write_zero_bytes(goff, n)?;
                    goff += n;
                    continue;
                }
            };
            let l1i = (goff >> self.l1_shift()) as usize;
            if desired == 0 && self.l1.get(l1i).is_none_or(|e| e & L1E_OFFSET_MASK == 0) {
                // Whole L2 table unallocated: skip to the next one.
                let span = 1u64 << self.l1_shift();
                goff = ((goff / span) + 1) * span;
                continue;
            }
            let (slot, idx) = self.l2_for_write(goff)?;
            let old = self.l2.get(slot, idx);
            if old != desired {
                self.l2.set(slot, idx, desired);
                self.free_entry_later(old);
            }
            goff += cs;
        }
        if zero && last_full < end {
            self.write_zero_bytes(last_full, end - last_full)?;
        }
        if self.pending_free.len() > MAX_PENDING_FREES {
            self.flush_all()?;
        }
        Ok(())
    }

    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write_guest(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn write_dirty_slices(&mut self) -> Result<()> {
        if !self.l2.has_dirty() {
            return Ok(());
        }
        self.refcount_barrier()?;
        for s in self.l2.dirty_slices() {
            self.file.write_all_at(&s.encode(), s.offset)?;
            s.dirty = false;
        }
        Ok(())
    }

    /// Writes the L1 table if it changed.
    pub(crate) fn write_l1(&mut self) -> Result<()> {
        if self.l1_dirty {
            self.refcount_barrier()?;
            let b = super::encode_table(&self.l1);
            self.file.write_all_at(&b, self.header.l1_table_offset)?;
            self.l1_dirty = false;
        }
        Ok(())
    }

    /// Flush: refcounts, then mappings, then deferred frees; everything synced.
    pub(crate) fn flush_all(&mut self) -> Result<()> {
        self.refcount_barrier()?;
        self.write_dirty_slices()?;
        self.write_l1()?;
        self.file.sync_data()?;
        if !self.pending_free.is_empty() {
            self.zcache = None;
            self.apply_pending_frees()?;
            self.rc.write_dirty(&self.file)?;
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::create::{create, CreateOptions};
    use super::super::Qcow2Image;
    use crate::block::{DiskImage, OpenOptions};

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("qcow2-engine-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("img.qcow2")
    }

    #[test]
    fn write_read_discard_with_small_cache() {
        let path = tmp("small-cache");
        let opts = CreateOptions {
            cluster_bits: 12,
            ..CreateOptions::new(64 << 20)
        };
        create(&path, &opts).unwrap();
        let o = OpenOptions {
            l2_cache_bytes: Some(4096 * 4),
            ..Default::default()
        };
        let mut img = Qcow2Image::open(&path, &o).unwrap();
        let mut model = vec![0u8; 64 << 20];
        let mut seed = 1u64;
        for i in 0..400u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (seed >> 20) % ((64 << 20) - 20000);
            let len = 1 + (seed >> 5) as usize % 20000;
            let data: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            img.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            if i.is_multiple_of(50) {
                img.discard(off & !4095, 8192).unwrap();
                model[(off & !4095) as usize..(off & !4095) as usize + 8192].fill(0);
            }
        }
        img.flush().unwrap();
        let mut got = vec![0u8; 64 << 20];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == model);
        drop(img);
        let mut img = Qcow2Image::open(&path, &OpenOptions::default()).unwrap();
        let r =
            super::super::check::check(&mut img, super::super::check::Repair::None, &mut |_, _| {})
                .unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
