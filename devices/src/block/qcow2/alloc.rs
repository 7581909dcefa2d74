//! Cluster allocation: finding free clusters, raising refcounts (creating refcount blocks and
//! growing the refcount table as the image grows), and freeing clusters, deferred until the
//! mappings that dropped them are on disk.

use std::os::unix::fs::FileExt;

use super::header::MAX_REFTABLE_BYTES;
use super::{Error, Qcow2Image, Result};

impl Qcow2Image {
    /// End of the file as far as metadata checks go.
    pub(crate) fn file_end(&self) -> u64 {
        self.file_len.max(self.alloc_end)
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host offset.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let cb = self.header.cluster_bits;
        let end_cluster = self.alloc_end >> cb;
        let mut start = self.rc.free_hint;
        let mut first_free_seen = None;
        let mut i = 0;
        while i < n {
            let c = start + i;
            if c >= end_cluster {
                break; // everything past the end is free
            }
            let fe = self.file_end();
            if self.rc.get(&self.file, c, fe)? != 0 || self.metadata.contains(&c) {
                start = c + 1;
                i = 0;
                continue;
            }
            first_free_seen.get_or_insert(c);
            i += 1;
        }
        self.alloc_run = (start, start + n);
        for c in start..start + n {
            self.change_refcount(c, 1)?;
        }
        self.alloc_run = (0, 0);
        // Nothing below `start` is free except a run too short for `n` that began at
        // `first_free_seen`.
        self.rc.free_hint = match first_free_seen {
            Some(f) if f < start => f,
            _ => start + n,
        };
        self.alloc_end = self.alloc_end.max((start + n) << cb);
        Ok(start << cb)
    }

    /// Adds `delta` to the refcount of host cluster `c`, creating its refcount block if needed.
    pub(crate) fn change_refcount(&mut self, c: u64, delta: i64) -> Result<()> {
        let t = c >> self.rc.block_shift();
        if self.rc.block_offset(t).is_none() {
            if delta < 0 {
                return Err(Error::RefcountUnderflow(c));
            }
            self.add_refblock(t)?;
        }
        let fe = self.file_end();
        let v = self.rc.get(&self.file, c, fe)?;
        let nv = if delta >= 0 {
            v.checked_add(delta as u64)
                .ok_or(Error::RefcountOverflow(c))?
        } else {
            v.checked_sub(delta.unsigned_abs())
                .ok_or(Error::RefcountUnderflow(c))?
        };
        self.rc.set(&self.file, c, nv, fe)?;
        if delta > 0 {
            self.rc_unsynced = true;
        }
        Ok(())
    }

    /// Creates refcount block `t`, growing the table first if `t` is past its end.
    fn add_refblock(&mut self, t: u64) -> Result<()> {
        if t as usize >= self.rc.table.len() {
            return self.grow_refcount_table(t);
        }
        // The new block describes clusters that all have refcount 0, so it can sit in the
        // first of them (describing itself), as long as that one isn't being allocated now.
        let shift = self.rc.block_shift();
        let cb = self.header.cluster_bits;
        let mut pos = t << shift;
        while (self.alloc_run.0..self.alloc_run.1).contains(&pos) || self.metadata.contains(&pos) {
            pos += 1;
        }
        if pos >> shift != t {
            return Err(Error::Internal("no room for a refcount block"));
        }
        let off = pos << cb;
        self.rc.install_block(t, off)?;
        let fe = self.file_end().max(off + self.cs);
        self.rc.set(&self.file, pos, 1, fe)?;
        self.alloc_end = self.alloc_end.max(off + self.cs);
        self.metadata.insert(pos);
        // Block contents first, then the table entry that makes them live.
        self.rc.write_dirty(&self.file)?;
        self.written_end = self.written_end.max(off + self.cs);
        self.file_len = self.file_len.max(off + self.cs);
        self.sync_unless_lazy()?;
        let entry_off = self.header.refcount_table_offset + t * 8;
        self.file.write_all_at(&off.to_be_bytes(), entry_off)?;
        self.rc_unsynced = true;
        Ok(())
    }

    /// Moves the refcount table to a bigger place at the end of the image, together with any
    /// new refcount blocks it needs (for block `need` and for the new clusters themselves).
    fn grow_refcount_table(&mut self, need: u64) -> Result<()> {
        let cs = self.cs;
        let cb = self.header.cluster_bits;
        let shift = self.rc.block_shift();
        let start = (self.alloc_end >> cb).max(self.alloc_run.1);
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let mut tclusters = old_clusters;
        let mut new_blocks: Vec<u64> = Vec::new();
        loop {
            let region_end = start + tclusters + new_blocks.len() as u64;
            let entries = (need + 1).max((region_end >> shift) + 1);
            let want_clusters = (entries * 8)
                .div_ceil(cs)
                .max(old_clusters + old_clusters / 2 + 1);
            let mut blocks: Vec<u64> = vec![need];
            let region_end = start + want_clusters + new_blocks.len() as u64;
            for c in start..region_end {
                let b = c >> shift;
                if self.rc.block_offset(b).is_none() && !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
            if want_clusters <= tclusters && blocks.len() == new_blocks.len() {
                break;
            }
            tclusters = tclusters.max(want_clusters);
            new_blocks = blocks;
        }
        if tclusters * cs > MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::TableTooLarge("refcount", tclusters * cs));
        }
        let table_off = start << cb;
        let old_off = self.header.refcount_table_offset;
        self.rc.table.resize((tclusters * cs / 8) as usize, 0);
        for (i, &b) in new_blocks.iter().enumerate() {
            let boff = (start + tclusters + i as u64) << cb;
            self.rc.install_block(b, boff)?;
        }
        let region_end = start + tclusters + new_blocks.len() as u64;
        self.alloc_end = self.alloc_end.max(region_end << cb);
        let fe = self.file_end();
        for c in start..region_end {
            let v = self.rc.get(&self.file, c, fe)?;
            self.rc.set(&self.file, c, v + 1, fe)?;
            self.metadata.insert(c);
        }
        // New blocks, then the new table, then the header that switches to it.
        self.rc.write_dirty(&self.file)?;
        let table = self.rc.encode_table(tclusters);
        self.file.write_all_at(&table, table_off)?;
        self.file_len = self.file_len.max(region_end << cb);
        self.written_end = self.written_end.max(region_end << cb);
        self.file.sync_data()?;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = u32::try_from(tclusters)
            .map_err(|_| Error::TableTooLarge("refcount", tclusters * cs))?;
        self.write_header()?;
        // The old table is unreachable now.
        for c in (old_off >> cb)..(old_off >> cb) + old_clusters {
            self.metadata.remove(&c);
            self.change_refcount(c, -1)?;
        }
        self.rc_unsynced = true;
        Ok(())
    }

    /// Drops one reference to `n` clusters at `host` once the current mappings are on disk.
    pub(crate) fn free_later(&mut self, host: u64, n: u64) {
        if n > 0 {
            self.pending_free.push((host, n));
        }
    }

    /// Drops the reference an L2 entry held (called after the entry was replaced).
    pub(crate) fn free_entry_later(&mut self, entry: u64) {
        use super::Mapping;
        match self.decode_entry(entry) {
            Mapping::Normal { host, .. } | Mapping::Zero { host } if host != 0 => {
                self.free_later(host, 1)
            }
            Mapping::Compressed { offset, len } => {
                let cb = self.header.cluster_bits;
                let first = offset >> cb;
                let last = (offset + len - 1) >> cb;
                self.free_later(first << cb, last - first + 1);
            }
            _ => {}
        }
    }

    /// Applies deferred frees. Only call when every mapping change is on disk.
    pub(crate) fn apply_pending_frees(&mut self) -> Result<()> {
        let cb = self.header.cluster_bits;
        let frees = std::mem::take(&mut self.pending_free);
        for (host, n) in frees {
            for c in (host >> cb)..(host >> cb) + n {
                self.change_refcount(c, -1)?;
                let fe = self.file_end();
                if self.rc.get(&self.file, c, fe)? == 0 {
                    if self.metadata.remove(&c) {
                        self.l2.forget_table(c << cb, self.cs);
                    }
                    if self.compress_cursor >> cb == c {
                        self.compress_cursor = 0;
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes refcount increments durable before a mapping write that relies on them.
    pub(crate) fn refcount_barrier(&mut self) -> Result<()> {
        if self.alloc_end > self.file_len {
            self.file.set_len(self.alloc_end)?;
            self.file_len = self.alloc_end;
        }
        let wrote = self.rc.write_dirty(&self.file)?;
        if wrote || self.rc_unsynced {
            self.sync_unless_lazy()?;
            self.rc_unsynced = false;
        }
        Ok(())
    }

    pub(crate) fn sync_unless_lazy(&mut self) -> Result<()> {
        if !self.lazy {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::create::{create, CreateOptions};
    use super::super::Qcow2Image;
    use crate::block::OpenOptions;

    #[test]
    fn refcount_table_grows_with_tiny_clusters() {
        let dir = std::env::temp_dir().join(format!("qcow2-alloc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.qcow2");
        let opts = CreateOptions {
            cluster_bits: 9,
            refcount_order: 6,
            ..CreateOptions::new(64 << 20)
        };
        create(&path, &opts).unwrap();
        let mut img = Qcow2Image::open(&path, &OpenOptions::default()).unwrap();
        let before = img.header.refcount_table_offset;
        // 64 refcounts per 512-byte block, 64 entries per table cluster: 2 MiB per table
        // cluster, so 3 MiB of allocations must move the table.
        for i in 0..6000u64 {
            img.alloc_clusters(1).unwrap();
            if i.is_multiple_of(1000) {
                img.flush_all().unwrap();
            }
        }
        img.flush_all().unwrap();
        assert_ne!(img.header.refcount_table_offset, before);
        let r =
            super::super::check::check(&mut img, super::super::check::Repair::None, &mut |_, _| {})
                .unwrap();
        assert_eq!(r.corruptions, 0);
        assert_eq!(r.leaks, 6000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
