//! Guest RAM of a restored VM: the snapshot file's page data mapped privately (copy-on-write),
//! so the guest runs at once and pages are read from the file only when first touched, as
//! Firecracker restores. Writes go to anonymous copies; the file is never modified. Pages that
//! were all zeros are holes in the file and cost nothing.

use std::fs::File;
use std::sync::Arc;

use virtio::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress};

use super::format::MemoryLayout;

/// Errors mapping a snapshot's memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The layout does not match the configured memory size.
    #[error("the snapshot's memory layout ({found}) does not match {mib} MiB of RAM ({expected})")]
    Layout {
        /// Configured size.
        mib: u64,
        /// What the configuration implies.
        expected: String,
        /// What the snapshot has.
        found: String,
    },
    /// mmap failed.
    #[error("cannot map the snapshot's memory: {0}")]
    Map(String),
}

fn describe(regions: &[(GuestAddress, usize)]) -> String {
    regions
        .iter()
        .map(|(a, l)| format!("{:#x}+{:#x}", a.0, l))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `layout` is exactly the RAM layout of a `memory_mib` VM.
pub fn check_layout(layout: &MemoryLayout, memory_mib: u64) -> Result<(), MemoryError> {
    let expected = boot::layout::ram_regions(memory_mib << 20);
    let found: Vec<(GuestAddress, usize)> = layout
        .regions
        .iter()
        .map(|r| (GuestAddress(r.gpa), r.len as usize))
        .collect();
    if expected != found {
        return Err(MemoryError::Layout {
            mib: memory_mib,
            expected: describe(&expected),
            found: describe(&found),
        });
    }
    Ok(())
}

/// Maps the page data of `file` as the guest's RAM, privately and lazily.
pub fn map_private(file: &File, layout: &MemoryLayout) -> Result<GuestMemoryMmap, MemoryError> {
    let file = Arc::new(
        file.try_clone()
            .map_err(|e| MemoryError::Map(e.to_string()))?,
    );
    let mut regions = Vec::with_capacity(layout.regions.len());
    let mut offset = layout.data_offset;
    for r in &layout.regions {
        let len = r.len as usize;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
            .ok_or_else(|| MemoryError::Map("a region wraps around".into()))?;
        regions.push(region);
        offset += r.len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))
}
