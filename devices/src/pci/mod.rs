//! The PCI root complex: the [`PciDevice`] trait every PCI function implements, a type-0
//! configuration-space helper ([`config`]), MSI-X tables and their interrupt interface
//! ([`msix`]), the BAR allocator for the MMIO windows ([`allocator`]) and the root bus with its
//! two configuration access mechanisms, type-1 ports 0xCF8/0xCFC and ECAM ([`root`]).
//!
//! Every piece keeps its state through [`crate::persist::Persist`]: configuration space
//! ([`PciConfigurationState`]), MSI-X ([`MsixState`]), the host bridge ([`PciRootState`]) and the
//! type-1 address register ([`PciConfigIoState`]).
//!
//! Like the rest of this crate it knows nothing of KVM: BAR moves are reported to the VMM through
//! a [`BarMoveHandler`] trait object, and MSI-X messages through [`msix::MsiInterruptGroup`].

pub mod allocator;
pub mod config;
pub mod msix;
pub mod root;

use std::fmt;
use std::io;

pub use allocator::PciBarAllocator;
pub use config::{PciConfiguration, PciConfigurationState, PciHeader};
pub use msix::{MsiInterruptGroup, MsiMessage, MsixConfig, MsixState};
pub use root::{PciConfigIo, PciConfigIoState, PciConfigMmio, PciRoot, PciRootState};

/// Errors of the PCI layer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Every device number on bus 0 is taken.
    #[error("no free device slot on PCI bus 0")]
    NoFreeSlot,
    /// The BAR index is out of range, already used, or a 64-bit BAR would not fit.
    #[error("BAR {0} is out of range or already defined")]
    InvalidBar(u8),
    /// BAR sizes are powers of two, at least 16 bytes (memory) or 4 bytes (I/O).
    #[error("BAR size {0:#x} is not a valid power of two")]
    BarSize(u64),
    /// The BAR address is not aligned to its size, or does not fit its type.
    #[error("BAR address {addr:#x} does not suit a {size:#x}-byte BAR")]
    BarAddress {
        /// Requested address.
        addr: u64,
        /// BAR size.
        size: u64,
    },
    /// The allocator has no room left for a BAR.
    #[error("no room for a {size:#x}-byte BAR in the {window} window")]
    BarAllocation {
        /// Requested size.
        size: u64,
        /// Which window ("32-bit" or "64-bit").
        window: &'static str,
    },
    /// A window given to the allocator is empty or overflows.
    #[error("invalid PCI MMIO window {base:#x}+{size:#x}")]
    InvalidWindow {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// The capability list has no room for another capability.
    #[error("no room in configuration space for a {0}-byte capability")]
    CapabilitySpace(usize),
    /// An MSI-X table size outside 1..=2048.
    #[error("invalid MSI-X vector count {0}")]
    MsixVectors(u16),
}

/// A bus/device/function address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl PciBdf {
    /// Builds a BDF, masking the device to 5 bits and the function to 3 bits.
    pub fn new(bus: u8, device: u8, function: u8) -> Self {
        PciBdf {
            bus,
            device: device & 0x1f,
            function: function & 0x7,
        }
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// What kind of address space a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PciBarRegionType {
    /// A 32-bit memory BAR (one register).
    Memory32,
    /// A 64-bit memory BAR (two registers).
    Memory64,
    /// An I/O-port BAR.
    Io,
}

/// One BAR of a device: where it is and what it decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBarRegion {
    /// BAR index (0..6); a 64-bit BAR also occupies `index + 1`.
    pub index: u8,
    /// Guest-physical (or port) address.
    pub base: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Address space type.
    pub region_type: PciBarRegionType,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A BAR the guest moved: the VMM must move the device's bus mapping from `old_base` to
/// `new_base` (and anything keyed by address, such as KVM ioeventfds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarReprogram {
    /// BAR index.
    pub index: u8,
    /// Where the BAR was mapped.
    pub old_base: u64,
    /// Where the guest put it.
    pub new_base: u64,
    /// BAR size.
    pub len: u64,
    /// Address space type.
    pub region_type: PciBarRegionType,
}

/// Implemented by the VMM: called (on the vCPU thread doing the configuration write, after the
/// device's own lock has been released and after [`PciDevice::move_bar`]) for every BAR move.
///
/// The PCI root's lock is held during the call, so the handler must not access PCI
/// configuration space; it may lock the device and change the MMIO/PIO buses.
pub trait BarMoveHandler: Send + Sync {
    /// Moves the mapping of BAR `mv.index` of device `bdf`.
    fn bar_moved(&self, bdf: PciBdf, mv: &BarReprogram) -> io::Result<()>;
}

/// A PCI function on the root bus.
///
/// Configuration space is accessed as 32-bit registers (`reg_idx` = byte offset / 4, up to 1024
/// registers for ECAM's 4 KiB); writes carry the byte offset inside the register and 1, 2 or 4
/// bytes that do not cross it.
pub trait PciDevice: Send {
    /// Reads configuration register `reg_idx`.
    fn read_config_register(&mut self, reg_idx: usize) -> u32;
    /// Writes `data` at byte `offset` of register `reg_idx`; returns the BARs this write moved.
    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogram>;
    /// Tells the device that a BAR it reported as moved now lives at `new_base`.
    fn move_bar(&mut self, _old_base: u64, _new_base: u64) -> Result<(), PciError> {
        Ok(())
    }
    /// Places the device's BARs with `allocator` and returns them (once, before the device is
    /// added to the root). Devices without BARs return an empty list.
    fn allocate_bars(
        &mut self,
        _allocator: &mut PciBarAllocator,
    ) -> Result<Vec<PciBarRegion>, PciError> {
        Ok(Vec::new())
    }
}
