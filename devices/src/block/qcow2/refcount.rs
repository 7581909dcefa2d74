//! Refcount table and refcount blocks: reading and changing single refcounts of any width
//! (refcount_order 0..6), with a small write-back cache of blocks. Creating blocks and growing
//! the table needs cluster allocation and lives in `alloc`.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{Error, Result};

/// Refcount table entries hold the block offset in bits 9-63.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// The refcount table and a cache of refcount blocks.
#[derive(Debug)]
pub struct Refcounts {
    order: u32,
    cluster_bits: u32,
    /// Refcount table entries (block offsets, 0 when absent).
    pub table: Vec<u64>,
    blocks: HashMap<u64, Block>,
    capacity: usize,
    tick: u64,
    /// No free cluster lies below this cluster index.
    pub free_hint: u64,
}

impl Refcounts {
    /// Wraps a loaded table; `capacity` is the number of blocks cached.
    pub fn new(order: u32, cluster_bits: u32, table: Vec<u64>, capacity: usize) -> Self {
        Refcounts {
            order,
            cluster_bits,
            table,
            blocks: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
            free_hint: 0,
        }
    }

    /// log2 of the clusters covered by one block.
    pub fn block_shift(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    /// Largest refcount an entry can hold.
    pub fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// Offset of block `t`, or `None` if it doesn't exist.
    pub fn block_offset(&self, t: u64) -> Option<u64> {
        let e = *self.table.get(usize::try_from(t).ok()?)?;
        let off = e & REFT_OFFSET_MASK;
        (off != 0).then_some(off)
    }

    fn load(&mut self, file: &File, t: u64, file_end: u64) -> Result<&mut Block> {
        self.tick += 1;
        let tick = self.tick;
        if !self.blocks.contains_key(&t) {
            let off = self
                .block_offset(t)
                .ok_or(Error::Internal("refcount block missing"))?;
            let cs = 1u64 << self.cluster_bits;
            if !off.is_multiple_of(cs) || off.checked_add(cs).is_none_or(|e| e > file_end) {
                return Err(Error::BadRefblockOffset(off));
            }
            if self.blocks.len() >= self.capacity {
                self.evict(file)?;
            }
            let mut data = vec![0u8; cs as usize];
            super::read_meta(file, &mut data, off)?;
            self.blocks.insert(
                t,
                Block {
                    data,
                    dirty: false,
                    used: tick,
                },
            );
        }
        let b = self
            .blocks
            .get_mut(&t)
            .ok_or(Error::Internal("refcount block vanished"))?;
        b.used = tick;
        Ok(b)
    }

    fn evict(&mut self, file: &File) -> Result<()> {
        let Some((&t, _)) = self.blocks.iter().min_by_key(|(_, b)| b.used) else {
            return Ok(());
        };
        if let Some(b) = self.blocks.remove(&t) {
            if b.dirty {
                let off = self
                    .block_offset(t)
                    .ok_or(Error::Internal("evicting unknown block"))?;
                file.write_all_at(&b.data, off)?;
            }
        }
        Ok(())
    }

    fn locate(&self, cluster: u64) -> (u64, usize) {
        let shift = self.block_shift();
        (cluster >> shift, (cluster & ((1 << shift) - 1)) as usize)
    }

    /// Refcount of host cluster `cluster` (0 where no block exists).
    pub fn get(&mut self, file: &File, cluster: u64, file_end: u64) -> Result<u64> {
        let (t, i) = self.locate(cluster);
        if self.block_offset(t).is_none() {
            return Ok(0);
        }
        let order = self.order;
        let b = self.load(file, t, file_end)?;
        Ok(get_entry(&b.data, order, i))
    }

    /// Sets the refcount of `cluster`; its block must exist.
    pub fn set(&mut self, file: &File, cluster: u64, value: u64, file_end: u64) -> Result<()> {
        if value > self.max_value() {
            return Err(Error::RefcountOverflow(cluster));
        }
        let (t, i) = self.locate(cluster);
        let order = self.order;
        let b = self.load(file, t, file_end)?;
        set_entry(&mut b.data, order, i, value);
        b.dirty = true;
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Installs a brand-new (zeroed) block `t` at `offset` in the cache, dirty.
    pub fn install_block(&mut self, t: u64, offset: u64) -> Result<()> {
        let t_us = usize::try_from(t).map_err(|_| Error::Internal("table index"))?;
        if t_us >= self.table.len() {
            return Err(Error::Internal("refcount table too small for new block"));
        }
        self.table[t_us] = offset;
        self.tick += 1;
        self.blocks.insert(
            t,
            Block {
                data: vec![0u8; 1 << self.cluster_bits],
                dirty: true,
                used: self.tick,
            },
        );
        Ok(())
    }

    /// True if a cached block waits to be written.
    pub fn has_dirty(&self) -> bool {
        self.blocks.values().any(|b| b.dirty)
    }

    /// Writes every dirty block; returns whether anything was written.
    pub fn write_dirty(&mut self, file: &File) -> Result<bool> {
        let mut wrote = false;
        let cs = 1u64 << self.cluster_bits;
        for (&t, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            let off = self
                .table
                .get(t as usize)
                .map(|e| e & REFT_OFFSET_MASK)
                .filter(|&o| o != 0 && o.is_multiple_of(cs))
                .ok_or(Error::Internal("dirty block without table entry"))?;
            file.write_all_at(&b.data, off)?;
            b.dirty = false;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Drops all cached blocks (after they were written).
    pub fn clear_cache(&mut self) {
        self.blocks.retain(|_, b| b.dirty);
    }

    /// Encoded table, padded to `clusters` clusters.
    pub fn encode_table(&self, clusters: u64) -> Vec<u8> {
        let mut v: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        v.resize((clusters << self.cluster_bits) as usize, 0);
        v
    }
}

/// Reads entry `i` of a refcount block with 2^order-bit entries.
pub fn get_entry(data: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let byte = data[bit / 8];
            u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(data[i]),
        4 => u64::from(u16::from_be_bytes([data[2 * i], data[2 * i + 1]])),
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&data[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(a))
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&data[8 * i..8 * i + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `i` of a refcount block (the value must fit).
pub fn set_entry(data: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut data[bit / 8];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => data[i] = v as u8,
        4 => data[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => data[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => data[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let mut data = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..n {
                set_entry(&mut data, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&data, order, i),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
            set_entry(&mut data, order, 1, max);
            assert_eq!(get_entry(&data, order, 1), max);
            assert_eq!(get_entry(&data, order, 0), 0);
            assert_eq!(get_entry(&data, order, 2), 14 & max);
        }
        // Sub-byte entries count from the least significant bit.
        let mut d = vec![0u8; 1];
        set_entry(&mut d, 0, 0, 1);
        assert_eq!(d[0], 1);
        set_entry(&mut d, 1, 3, 3);
        assert_eq!(d[0], 0b1100_0001);
    }

    #[test]
    fn missing_blocks_read_zero_and_overflow_is_refused() {
        let f = tempfile();
        let mut rc = Refcounts::new(0, 9, vec![0; 1], 4);
        assert_eq!(rc.get(&f, 5, 0).unwrap(), 0);
        assert_eq!(rc.max_value(), 1);
        rc.install_block(0, 512).unwrap();
        rc.set(&f, 5, 1, 1024).unwrap();
        assert!(matches!(
            rc.set(&f, 5, 2, 1024),
            Err(Error::RefcountOverflow(5))
        ));
        assert_eq!(rc.get(&f, 5, 1024).unwrap(), 1);
        assert!(rc.write_dirty(&f).unwrap());
        assert!(!rc.has_dirty());
    }

    fn tempfile() -> File {
        let p = std::env::temp_dir().join(format!("rc-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }
}
