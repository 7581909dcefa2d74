//! Growing resize: a bigger virtual size, and a bigger L1 table (moved, copied, switched in the
//! header, old one freed) when the new size needs more L2 tables than the L1 table can name.

use std::os::unix::fs::FileExt;

use super::header::{Header, MAX_L1_BYTES};
use super::{Error, Qcow2Image, Result};

impl Qcow2Image {
    /// Grows the virtual disk to `new_size` bytes (a multiple of 512). Shrinking is refused.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::UnalignedSize(new_size));
        }
        if new_size < self.header.size {
            return Err(Error::Shrink {
                from: self.header.size,
                to: new_size,
            });
        }
        if new_size > (1u64 << 61) {
            return Err(Error::SizeTooLarge(new_size));
        }
        let needed = Header::l1_entries_for(new_size, self.header.cluster_bits);
        self.grow_l1(needed, true)?;
        self.header.size = new_size;
        self.write_header()?;
        Ok(())
    }

    /// Makes the active L1 table hold at least `min_entries` entries, as QEMU's
    /// `qcow2_grow_l1_table`: exactly that many when `exact`, otherwise by steps of 1.5 times
    /// (so a VM state written chunk by chunk doesn't move the table at every new L2 table). The
    /// new table is written and synced, the header switched to it, and the old one freed.
    pub(crate) fn grow_l1(&mut self, min_entries: u64, exact: bool) -> Result<()> {
        let cur = self.l1.len() as u64;
        if min_entries <= cur {
            return Ok(());
        }
        let entries = if exact {
            min_entries
        } else {
            let mut n = cur.max(1);
            while n < min_entries {
                n = (n * 3).div_ceil(2);
            }
            n
        };
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::TableTooLarge("L1", entries * 8));
        }
        self.flush_all()?;
        let n = (entries * 8).div_ceil(self.cs);
        let off = self.alloc_clusters(n)?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut b = super::encode_table(&l1);
        b.resize((n * self.cs) as usize, 0);
        self.refcount_barrier()?;
        self.file.write_all_at(&b, off)?;
        self.note_written(off, n * self.cs);
        self.file.sync_data()?;
        let old_off = self.header.l1_table_offset;
        let old_bytes = self.l1.len() as u64 * 8;
        self.header.l1_table_offset = off;
        self.header.l1_size = entries as u32;
        self.write_header()?;
        self.l1 = l1;
        self.l1_dirty = false;
        if old_off != 0 && old_bytes > 0 {
            self.free_later(old_off, old_bytes.div_ceil(self.cs));
        }
        self.flush_all()?;
        self.rebuild_metadata_set();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::create::{create, CreateOptions};
    use super::*;
    use crate::block::{DiskImage, OpenOptions};

    #[test]
    fn grow_keeps_data_and_moves_l1() {
        let dir = std::env::temp_dir().join(format!("qcow2-resize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.qcow2");
        let o = CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(1 << 20)
        };
        create(&path, &o).unwrap();
        let mut img = Qcow2Image::open(&path, &OpenOptions::default()).unwrap();
        img.write_at(b"abc", 1000).unwrap();
        let l1_before = img.header.l1_table_offset;
        img.resize(64 << 20).unwrap();
        assert_ne!(img.header.l1_table_offset, l1_before);
        img.write_at(b"xyz", (64 << 20) - 3).unwrap();
        assert!(matches!(img.resize(1 << 20), Err(Error::Shrink { .. })));
        assert!(matches!(
            img.resize((64 << 20) + 1),
            Err(Error::UnalignedSize(_))
        ));
        drop(img);
        let mut img = Qcow2Image::open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(img.size(), 64 << 20);
        let mut b = [0u8; 3];
        img.read_at(&mut b, 1000).unwrap();
        assert_eq!(&b, b"abc");
        img.read_at(&mut b, (64 << 20) - 3).unwrap();
        assert_eq!(&b, b"xyz");
        let r =
            super::super::check::check(&mut img, super::super::check::Repair::None, &mut |_, _| {})
                .unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
