//! The L2 slice cache: L2 tables are cached in slices (4 KiB, or the whole table when clusters
//! are smaller), as QEMU does, so a small cache covers a large disk. Least recently used slices
//! are evicted; the engine writes dirty victims back (after its refcount barrier).

use std::collections::HashMap;

/// Entries in one slice: 512 (4 KiB), or the whole table for smaller clusters.
pub fn slice_entries(cluster_bits: u32) -> u64 {
    (1u64 << (cluster_bits - 3)).min(512)
}

/// A cached slice of an L2 table.
#[derive(Debug)]
pub struct Slice {
    /// Host offset of the slice.
    pub offset: u64,
    /// Decoded entries (host byte order).
    pub entries: Vec<u64>,
    /// Changed since it was read or written.
    pub dirty: bool,
    used: u64,
}

impl Slice {
    /// Big-endian on-disk form.
    pub fn encode(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_be_bytes()).collect()
    }
}

/// A bounded LRU cache of L2 slices keyed by host offset.
#[derive(Debug)]
pub struct L2Cache {
    capacity: usize,
    map: HashMap<u64, usize>,
    slots: Vec<Slice>,
    tick: u64,
}

impl L2Cache {
    /// A cache holding up to `capacity` slices (at least 4).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            capacity: capacity.max(4),
            map: HashMap::new(),
            slots: Vec::new(),
            tick: 0,
        }
    }

    /// Index of the cached slice at `offset`, marking it used.
    pub fn lookup(&mut self, offset: u64) -> Option<usize> {
        let i = *self.map.get(&offset)?;
        self.tick += 1;
        self.slots[i].used = self.tick;
        Some(i)
    }

    /// True when inserting needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// Removes the least recently used slice and returns it (the caller writes it back if dirty).
    pub fn evict_lru(&mut self) -> Option<Slice> {
        let (i, _) = self.slots.iter().enumerate().min_by_key(|(_, s)| s.used)?;
        let victim = self.slots.swap_remove(i);
        self.map.remove(&victim.offset);
        if i < self.slots.len() {
            let moved = self.slots[i].offset;
            self.map.insert(moved, i);
        }
        Some(victim)
    }

    /// Inserts a slice (the caller made room) and returns its index.
    pub fn insert(&mut self, offset: u64, entries: Vec<u64>, dirty: bool) -> usize {
        self.tick += 1;
        if let Some(&i) = self.map.get(&offset) {
            let s = &mut self.slots[i];
            s.entries = entries;
            s.dirty |= dirty;
            s.used = self.tick;
            return i;
        }
        self.slots.push(Slice {
            offset,
            entries,
            dirty,
            used: self.tick,
        });
        let i = self.slots.len() - 1;
        self.map.insert(offset, i);
        i
    }

    /// Entry `idx` of slice `slot`.
    pub fn get(&self, slot: usize, idx: usize) -> u64 {
        self.slots[slot].entries[idx]
    }

    /// Sets entry `idx` of slice `slot` and marks it dirty.
    pub fn set(&mut self, slot: usize, idx: usize, value: u64) {
        let s = &mut self.slots[slot];
        s.entries[idx] = value;
        s.dirty = true;
    }

    /// Dirty slices, for write-back.
    pub fn dirty_slices(&mut self) -> impl Iterator<Item = &mut Slice> {
        self.slots.iter_mut().filter(|s| s.dirty)
    }

    /// True if some slice needs writing.
    pub fn has_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }

    /// Drops every cached slice of the table at `table_offset` (`table_bytes` long), e.g. when
    /// the table is freed. Dirty contents are discarded.
    pub fn forget_table(&mut self, table_offset: u64, table_bytes: u64) {
        let doomed: Vec<u64> = self
            .map
            .keys()
            .copied()
            .filter(|&o| o >= table_offset && o < table_offset + table_bytes)
            .collect();
        for o in doomed {
            if let Some(i) = self.map.remove(&o) {
                self.slots.swap_remove(i);
                if i < self.slots.len() {
                    let moved = self.slots[i].offset;
                    self.map.insert(moved, i);
                }
            }
        }
    }

    /// Drops everything (after a snapshot switch rewrote the tables underneath).
    pub fn clear(&mut self) {
        self.map.clear();
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_eviction_and_dirty_tracking() {
        let mut c = L2Cache::new(4);
        for i in 0..4u64 {
            assert!(!c.is_full());
            c.insert(i * 4096, vec![i; 512], false);
        }
        assert!(c.is_full());
        let s = c.lookup(0).unwrap();
        c.set(s, 3, 99);
        let v = c.evict_lru().unwrap();
        assert_eq!(v.offset, 4096);
        assert!(!v.dirty);
        let s = c.lookup(0).unwrap();
        assert_eq!(c.get(s, 3), 99);
        assert!(c.has_dirty());
        assert_eq!(c.dirty_slices().count(), 1);
        c.forget_table(0, 4096);
        assert!(c.lookup(0).is_none());
        assert!(!c.has_dirty());
        assert_eq!(slice_entries(9), 64);
        assert_eq!(slice_entries(16), 512);
    }
}
