//! Placement of BARs in the host bridge's MMIO windows: the 32-bit window below the ECAM area
//! and an optional 64-bit window above RAM, each managed by a `vm_allocator::AddressAllocator`.
//! BARs are naturally aligned (aligned to their size), as the PCI sizing protocol requires.

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::{PciBarRegionType, PciError};

/// Allocates BAR addresses in the PCI MMIO windows.
#[derive(Debug, Clone)]
pub struct PciBarAllocator {
    mmio32: AddressAllocator,
    mmio64: Option<AddressAllocator>,
}

fn window(base: u64, size: u64) -> Result<AddressAllocator, PciError> {
    AddressAllocator::new(base, size).map_err(|_| PciError::InvalidWindow { base, size })
}

impl PciBarAllocator {
    /// An allocator for the 32-bit window `mmio32 = (base, size)` (must end at or below 4 GiB)
    /// and the optional 64-bit window.
    pub fn new(mmio32: (u64, u64), mmio64: Option<(u64, u64)>) -> Result<Self, PciError> {
        let (base, size) = mmio32;
        if base.checked_add(size).is_none_or(|end| end > 1 << 32) {
            return Err(PciError::InvalidWindow { base, size });
        }
        Ok(PciBarAllocator {
            mmio32: window(base, size)?,
            mmio64: mmio64.map(|(b, s)| window(b, s)).transpose()?,
        })
    }

    /// Allocates a naturally aligned range of `size` bytes for a BAR of `region_type`.
    /// 64-bit BARs go to the 64-bit window when there is one and it has room, else to the 32-bit
    /// window (a 64-bit BAR may hold a 32-bit address). Returns the base address.
    pub fn allocate(&mut self, size: u64, region_type: PciBarRegionType) -> Result<u64, PciError> {
        if !size.is_power_of_two() || size < 16 {
            return Err(PciError::BarSize(size));
        }
        if region_type == PciBarRegionType::Memory64 {
            if let Some(m64) = self.mmio64.as_mut() {
                if let Ok(r) = m64.allocate(size, size, AllocPolicy::FirstMatch) {
                    return Ok(r.start());
                }
            }
        }
        if region_type == PciBarRegionType::Io {
            return Err(PciError::BarAllocation {
                size,
                window: "I/O",
            });
        }
        self.mmio32
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| PciError::BarAllocation {
                size,
                window: "32-bit",
            })
    }

    /// Allocates `size` bytes in the 32-bit window only (for 32-bit BARs, or 64-bit BARs the
    /// VMM wants below 4 GiB).
    pub fn allocate_32bit(&mut self, size: u64) -> Result<u64, PciError> {
        self.allocate(size, PciBarRegionType::Memory32)
    }

    /// Returns a range to whichever window holds it (e.g. after a device is removed).
    pub fn free(&mut self, base: u64, size: u64) -> Result<(), PciError> {
        let bad = PciError::InvalidWindow { base, size };
        let end = base
            .checked_add(size)
            .and_then(|e| e.checked_sub(1))
            .ok_or(bad.clone())?;
        let range = RangeInclusive::new(base, end).map_err(|_| bad.clone())?;
        if self.mmio32.free(&range).is_ok() {
            return Ok(());
        }
        match self.mmio64.as_mut().map(|m64| m64.free(&range)) {
            Some(Ok(())) => Ok(()),
            _ => Err(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_aligned_in_the_right_window() {
        let mut a =
            PciBarAllocator::new((0xc000_0000, 0x2000_0000), Some((1 << 36, 1 << 30))).unwrap();
        let x = a.allocate(0x8000, PciBarRegionType::Memory32).unwrap();
        let y = a.allocate(0x10_0000, PciBarRegionType::Memory32).unwrap();
        assert_eq!(x, 0xc000_0000);
        assert_eq!(y % 0x10_0000, 0);
        assert!(y >= x + 0x8000);
        let z = a.allocate(0x8000, PciBarRegionType::Memory64).unwrap();
        assert_eq!(z, 1 << 36);
        assert!(a.allocate(0x30, PciBarRegionType::Memory32).is_err());
        assert!(a.allocate(1 << 31, PciBarRegionType::Memory32).is_err());
        a.free(x, 0x8000).unwrap();
        assert_eq!(a.allocate_32bit(0x8000).unwrap(), x);
        a.free(z, 0x8000).unwrap();
        assert!(a.free(z, 0x8000).is_err());
    }

    #[test]
    fn memory64_falls_back_to_32bit() {
        let mut a = PciBarAllocator::new((0xc000_0000, 0x1000), None).unwrap();
        assert_eq!(
            a.allocate(0x1000, PciBarRegionType::Memory64).unwrap(),
            0xc000_0000
        );
        assert!(a.allocate(0x1000, PciBarRegionType::Memory64).is_err());
        assert!(PciBarAllocator::new((0xffff_f000, 0x2000), None).is_err());
    }
}
