//! A type-0 configuration space: the standard header, the BARs with the sizing protocol (the
//! guest writes all-ones and reads back the size mask), the command register, and a
//! capabilities list. Devices keep one [`PciConfiguration`] and forward their register
//! accesses to it, intercepting only the registers they emulate themselves.
//!
//! BAR moves are detected here: a BAR whose decoded address differs from where it is mapped
//! is reported as a [`BarReprogram`] once the matching decode bit (memory or I/O) of the
//! command register is set and the value is not a sizing pattern. Linux disables decoding while
//! it rewrites a 64-bit BAR, so the intermediate half-written address is never reported.
//!
//! State ([`Persist`]): every register and where each BAR is mapped. What the device's
//! constructor and BAR allocation define (ids, class, capability bodies, BAR types and sizes:
//! every bit outside the writable mask and the device-emulated bytes) must be the same in the
//! state and in the device it is restored into.

use serde::{Deserialize, Serialize};

use super::{BarReprogram, PciBarRegion, PciBarRegionType, PciError};
use crate::persist::{Persist, RestoreError};

/// Number of 32-bit registers in a (PCI Express sized) configuration space.
pub const NUM_CONFIG_REGISTERS: usize = 1024;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// Register index of BAR 0.
pub const BAR0_REG: usize = 4;
/// Register index of the command (low 16 bits) and status (high 16 bits) registers.
pub const COMMAND_REG: usize = 1;
/// Command register: I/O space decoding.
pub const COMMAND_IO_SPACE: u32 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY_SPACE: u32 = 1 << 1;
/// Command register: bus mastering (DMA, MSI).
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u32 = 1 << 10;
/// Status register bit (in the high half of register 1): the capabilities list exists.
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// Register holding the capabilities pointer.
const CAP_POINTER_REG: usize = 0x34 / 4;
/// First byte offset usable for capabilities.
const FIRST_CAP_OFFSET: usize = 0x40;
/// End of the legacy (256-byte) configuration space, where capabilities must fit.
const LEGACY_CONFIG_END: usize = 0x100;

/// What identifies a function: the fields of the type-0 header the guest matches drivers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision_id: u8,
    /// Base class code.
    pub class: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
}

#[derive(Debug, Clone, Copy)]
struct BarState {
    region: PciBarRegion,
    /// Where the bus mapping currently is.
    mapped: u64,
}

/// The configuration space of one type-0 function.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    regs: Vec<u32>,
    writable: Vec<u32>,
    /// Bits the owning device writes itself ([`PciConfiguration::mark_emulated`]).
    emulated: Vec<u32>,
    bars: [Option<BarState>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    /// A configuration space with `header` and no BARs or capabilities. The command register
    /// starts at 0 (no decoding): the guest enables it when its driver binds.
    pub fn new(header: &PciHeader) -> Self {
        let mut regs = vec![0u32; NUM_CONFIG_REGISTERS];
        let mut writable = vec![0u32; NUM_CONFIG_REGISTERS];
        regs[0] = u32::from(header.vendor_id) | (u32::from(header.device_id) << 16);
        writable[COMMAND_REG] = COMMAND_IO_SPACE
            | COMMAND_MEMORY_SPACE
            | COMMAND_BUS_MASTER
            | (1 << 6) // parity error response
            | (1 << 8) // SERR#
            | COMMAND_INTX_DISABLE;
        regs[2] = u32::from(header.revision_id)
            | (u32::from(header.prog_if) << 8)
            | (u32::from(header.subclass) << 16)
            | (u32::from(header.class) << 24);
        // Cache line size and latency timer are plain storage; header type 0, single function.
        writable[3] = 0x0000_ffff;
        regs[11] = u32::from(header.subsystem_vendor_id) | (u32::from(header.subsystem_id) << 16);
        // Interrupt line is storage for the OS; interrupt pin 0 (no INTx).
        writable[15] = 0x0000_00ff;
        PciConfiguration {
            regs,
            writable,
            emulated: vec![0u32; NUM_CONFIG_REGISTERS],
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Defines a BAR at its initial address. The address must be aligned to the size.
    pub fn add_bar(&mut self, bar: &PciBarRegion) -> Result<(), PciError> {
        let idx = usize::from(bar.index);
        let regs_needed = if bar.region_type == PciBarRegionType::Memory64 {
            2
        } else {
            1
        };
        if idx + regs_needed > NUM_BARS || self.bar_slot_used(idx, regs_needed) {
            return Err(PciError::InvalidBar(bar.index));
        }
        let min = if bar.region_type == PciBarRegionType::Io {
            4
        } else {
            16
        };
        if !bar.size.is_power_of_two() || bar.size < min {
            return Err(PciError::BarSize(bar.size));
        }
        if !bar_address_ok(bar.region_type, bar.base, bar.size) {
            return Err(PciError::BarAddress {
                addr: bar.base,
                size: bar.size,
            });
        }
        let mask = !(bar.size - 1);
        let reg = BAR0_REG + idx;
        match bar.region_type {
            PciBarRegionType::Io => {
                self.regs[reg] = (bar.base as u32 & !0x3) | 0x1;
                self.writable[reg] = mask as u32 & !0x3;
            }
            PciBarRegionType::Memory32 | PciBarRegionType::Memory64 => {
                let mut flags = if bar.prefetchable { 0x8 } else { 0 };
                if bar.region_type == PciBarRegionType::Memory64 {
                    flags |= 0x4;
                    self.regs[reg + 1] = (bar.base >> 32) as u32;
                    self.writable[reg + 1] = (mask >> 32) as u32;
                }
                self.regs[reg] = (bar.base as u32 & !0xf) | flags;
                self.writable[reg] = mask as u32 & !0xf;
            }
        }
        self.bars[idx] = Some(BarState {
            region: *bar,
            mapped: bar.base,
        });
        Ok(())
    }

    /// Declares `len` bytes at `offset` as emulated by the owning device: it writes them itself
    /// with [`PciConfiguration::write_raw`] (e.g. a capability's guest-programmable fields), so a
    /// restored state may differ there from a fresh device. Out-of-range bytes are ignored.
    pub fn mark_emulated(&mut self, offset: usize, len: usize) {
        for byte in offset..offset.saturating_add(len).min(NUM_CONFIG_REGISTERS * 4) {
            self.emulated[byte / 4] |= 0xff << ((byte % 4) * 8);
        }
    }

    fn bar_slot_used(&self, idx: usize, count: usize) -> bool {
        (0..NUM_BARS).any(|i| {
            self.bars[i].is_some_and(|b| {
                let n = if b.region.region_type == PciBarRegionType::Memory64 {
                    2
                } else {
                    1
                };
                i < idx + count && idx < i + n
            })
        })
    }

    /// The BARs as currently mapped (base = last reported address).
    pub fn bars(&self) -> Vec<PciBarRegion> {
        self.bars
            .iter()
            .flatten()
            .map(|b| PciBarRegion {
                base: b.mapped,
                ..b.region
            })
            .collect()
    }

    /// Appends a capability with id `cap_id`; `body` is everything after the id and next-pointer
    /// bytes. Returns the capability's byte offset. Capabilities are read-only to the guest
    /// unless the device intercepts writes to them.
    pub fn add_capability(&mut self, cap_id: u8, body: &[u8]) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let offset = self.next_cap;
        if offset + len > LEGACY_CONFIG_END {
            return Err(PciError::CapabilitySpace(len));
        }
        self.set_byte(offset, cap_id);
        self.set_byte(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *b);
        }
        match self.last_cap {
            None => {
                self.regs[CAP_POINTER_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
            Some(prev) => self.set_byte(prev + 1, offset as u8),
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + len + 3) & !3;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Overwrites bytes of configuration space without the writable mask (for device-emulated
    /// registers). Out-of-range bytes are ignored.
    pub fn write_raw(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if offset + i < NUM_CONFIG_REGISTERS * 4 {
                self.set_byte(offset + i, *b);
            }
        }
    }

    /// Reads register `reg_idx`; all-ones past the end of configuration space.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        self.regs.get(reg_idx).copied().unwrap_or(0xffff_ffff)
    }

    /// The command register.
    pub fn command(&self) -> u32 {
        self.regs[COMMAND_REG] & 0xffff
    }

    /// Writes `data` (1, 2 or 4 bytes, within the register) at byte `offset` of `reg_idx`
    /// through the writable mask; returns the BAR moves the write caused.
    pub fn write_reg(&mut self, reg_idx: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        let Ok(offset) = usize::try_from(offset) else {
            return Vec::new();
        };
        if reg_idx >= NUM_CONFIG_REGISTERS
            || !matches!(data.len(), 1 | 2 | 4)
            || offset + data.len() > 4
        {
            return Vec::new();
        }
        let mut value = 0u32;
        let mut byte_mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            value |= u32::from(*b) << shift;
            byte_mask |= 0xff << shift;
        }
        let mask = self.writable[reg_idx] & byte_mask;
        self.regs[reg_idx] = (self.regs[reg_idx] & !mask) | (value & mask);
        let is_bar = (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg_idx);
        if is_bar || reg_idx == COMMAND_REG {
            self.detect_moves()
        } else {
            Vec::new()
        }
    }

    /// The address a BAR currently decodes, or `None` while it holds a sizing pattern (all
    /// writable address bits set, in either half of a 64-bit BAR) or would wrap.
    fn decoded_address(&self, idx: usize, bar: &BarState) -> Option<u64> {
        let reg = BAR0_REG + idx;
        let (lo, lo_mask) = (self.regs[reg], self.writable[reg]);
        let sizing_lo = lo & lo_mask == lo_mask;
        let addr = match bar.region.region_type {
            PciBarRegionType::Io => {
                if sizing_lo {
                    return None;
                }
                u64::from(lo & !0x3)
            }
            PciBarRegionType::Memory32 => {
                if sizing_lo {
                    return None;
                }
                u64::from(lo & !0xf)
            }
            PciBarRegionType::Memory64 => {
                let (hi, hi_mask) = (self.regs[reg + 1], self.writable[reg + 1]);
                if sizing_lo || (hi_mask != 0 && hi & hi_mask == hi_mask) {
                    return None;
                }
                (u64::from(hi) << 32) | u64::from(lo & !0xf)
            }
        };
        addr.checked_add(bar.region.size - 1).map(|_| addr)
    }

    fn detect_moves(&mut self) -> Vec<BarReprogram> {
        let command = self.command();
        let mut moves = Vec::new();
        for idx in 0..NUM_BARS {
            let Some(bar) = self.bars[idx] else { continue };
            let decode = match bar.region.region_type {
                PciBarRegionType::Io => command & COMMAND_IO_SPACE != 0,
                _ => command & COMMAND_MEMORY_SPACE != 0,
            };
            if !decode {
                continue;
            }
            let Some(addr) = self.decoded_address(idx, &bar) else {
                continue;
            };
            if addr != bar.mapped {
                moves.push(BarReprogram {
                    index: bar.region.index,
                    old_base: bar.mapped,
                    new_base: addr,
                    len: bar.region.size,
                    region_type: bar.region.region_type,
                });
                if let Some(b) = self.bars[idx].as_mut() {
                    b.mapped = addr;
                }
            }
        }
        moves
    }
}

/// Whether `base` suits a BAR of `region_type` and `size` (a power of two): aligned to the size
/// and, with the size, inside the BAR type's address space.
fn bar_address_ok(region_type: PciBarRegionType, base: u64, size: u64) -> bool {
    let limit = match region_type {
        PciBarRegionType::Memory32 => 1u64 << 32,
        PciBarRegionType::Io => 1 << 16,
        PciBarRegionType::Memory64 => u64::MAX,
    };
    let fits = size
        .checked_sub(1)
        .and_then(|last| base.checked_add(last))
        .is_some_and(|end| end < limit);
    size.is_power_of_two() && base.is_multiple_of(size) && fits
}

/// One BAR in a saved [`PciConfigurationState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBarState {
    /// BAR index (0..6).
    pub index: u8,
    /// Address space type.
    pub region_type: PciBarRegionType,
    /// Size in bytes.
    pub size: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Where the VMM maps the BAR (the last address reported as a move; may differ from the
    /// register contents while the guest is in the middle of reprogramming it).
    pub mapped: u64,
}

/// The saved state of a [`PciConfiguration`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    /// Every register ([`NUM_CONFIG_REGISTERS`] dwords).
    pub registers: Vec<u32>,
    /// The defined BARs, by index.
    pub bars: Vec<PciBarState>,
}

impl Persist for PciConfiguration {
    type State = PciConfigurationState;

    fn save(&self) -> PciConfigurationState {
        PciConfigurationState {
            registers: self.regs.clone(),
            bars: self
                .bars
                .iter()
                .flatten()
                .map(|b| PciBarState {
                    index: b.region.index,
                    region_type: b.region.region_type,
                    size: b.region.size,
                    prefetchable: b.region.prefetchable,
                    mapped: b.mapped,
                })
                .collect(),
        }
    }

    /// Needs the device's BARs defined as when the state was saved (allocate them first).
    fn restore(&mut self, state: &PciConfigurationState) -> Result<(), RestoreError> {
        if state.registers.len() != NUM_CONFIG_REGISTERS {
            return Err(RestoreError::invalid(
                "registers",
                format!(
                    "{} registers, expected {NUM_CONFIG_REGISTERS}",
                    state.registers.len()
                ),
            ));
        }
        let ours: Vec<PciBarState> = self.save().bars;
        let same_bar = |a: &PciBarState, b: &PciBarState| {
            PciBarState { mapped: 0, ..*a } == PciBarState { mapped: 0, ..*b }
        };
        if ours.len() != state.bars.len()
            || !ours.iter().zip(&state.bars).all(|(a, b)| same_bar(a, b))
        {
            let show = |bars: &[PciBarState]| {
                bars.iter()
                    .map(|b| format!("{}: {:?} {:#x}", b.index, b.region_type, b.size))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(RestoreError::mismatch(format!(
                "the snapshot's BARs [{}] differ from this device's [{}]",
                show(&state.bars),
                show(&ours)
            )));
        }
        for (i, bar) in state.bars.iter().enumerate() {
            if !bar_address_ok(bar.region_type, bar.mapped, bar.size) {
                return Err(RestoreError::invalid(
                    format!("bars[{i}].mapped"),
                    format!(
                        "{:#x} does not suit a {:?} BAR of {:#x} bytes",
                        bar.mapped, bar.region_type, bar.size
                    ),
                ));
            }
        }
        for (i, (&saved, &fresh)) in state.registers.iter().zip(&self.regs).enumerate() {
            let read_only = !(self.writable[i] | self.emulated[i]);
            if (saved ^ fresh) & read_only != 0 {
                return Err(RestoreError::mismatch(format!(
                    "configuration register {:#x}: the snapshot has {saved:#010x}, this device \
                     {fresh:#010x} in read-only bits {read_only:#010x}",
                    i * 4
                )));
            }
        }
        self.regs.copy_from_slice(&state.registers);
        for bar in &state.bars {
            if let Some(b) = self.bars[usize::from(bar.index)].as_mut() {
                b.mapped = bar.mapped;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn bar64(base: u64) -> PciBarRegion {
        PciBarRegion {
            index: 0,
            base,
            size: 0x8000,
            region_type: PciBarRegionType::Memory64,
            prefetchable: false,
        }
    }

    #[test]
    fn header_fields() {
        let cfg = PciConfiguration::new(&header());
        assert_eq!(cfg.read_reg(0), 0x1042_1af4);
        assert_eq!(cfg.read_reg(2), 0x0100_0001);
        assert_eq!(cfg.read_reg(11), 0x0040_1af4);
        assert_eq!(cfg.read_reg(3) >> 16 & 0xff, 0, "header type 0");
        assert_eq!(cfg.read_reg(NUM_CONFIG_REGISTERS), 0xffff_ffff);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.write_reg(0, 0, &[0, 0, 0, 0]);
        cfg.write_reg(2, 0, &[0xff; 4]);
        assert_eq!(cfg.read_reg(0), 0x1042_1af4);
        assert_eq!(cfg.read_reg(2), 0x0100_0001);
        // Misaligned or odd-sized writes are dropped.
        cfg.write_reg(1, 3, &[0xff, 0xff]);
        cfg.write_reg(1, 0, &[0xff, 0xff, 0xff]);
        assert_eq!(cfg.command(), 0);
        cfg.write_reg(1, 0, &[0xff, 0xff]);
        assert_eq!(cfg.command(), 0x547);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_bar(&bar64(0xc000_0000)).unwrap();
        assert_eq!(cfg.read_reg(4), 0xc000_0004);
        assert_eq!(cfg.read_reg(5), 0);
        assert!(cfg.write_reg(4, 0, &[0xff; 4]).is_empty());
        assert!(cfg.write_reg(5, 0, &[0xff; 4]).is_empty());
        assert_eq!(cfg.read_reg(4), 0xffff_8004);
        assert_eq!(cfg.read_reg(5), 0xffff_ffff);
        // Restoring the original value moves nothing, even with decoding on.
        cfg.write_reg(4, 0, &0xc000_0000u32.to_le_bytes());
        cfg.write_reg(5, 0, &[0; 4]);
        assert!(cfg.write_reg(1, 0, &[0x2, 0]).is_empty());
        assert_eq!(cfg.bars()[0].base, 0xc000_0000);
    }

    #[test]
    fn io_and_32bit_bars() {
        let mut cfg = PciConfiguration::new(&header());
        let io = PciBarRegion {
            index: 2,
            base: 0x1000,
            size: 0x20,
            region_type: PciBarRegionType::Io,
            prefetchable: false,
        };
        cfg.add_bar(&io).unwrap();
        assert_eq!(cfg.read_reg(6), 0x1001);
        cfg.write_reg(6, 0, &[0xff; 4]);
        assert_eq!(cfg.read_reg(6), 0xffff_ffe1);
        let m32 = PciBarRegion {
            index: 1,
            base: 0xd000_0000,
            size: 0x1000,
            region_type: PciBarRegionType::Memory32,
            prefetchable: true,
        };
        cfg.add_bar(&m32).unwrap();
        assert_eq!(cfg.read_reg(5), 0xd000_0008);
        // Overlapping, out-of-range, misaligned and badly sized BARs are refused.
        assert_eq!(cfg.add_bar(&m32), Err(PciError::InvalidBar(1)));
        let bad64 = PciBarRegion {
            index: 5,
            ..bar64(0)
        };
        assert_eq!(cfg.add_bar(&bad64), Err(PciError::InvalidBar(5)));
        let clash = PciBarRegion {
            index: 0,
            ..bar64(0)
        };
        assert_eq!(cfg.add_bar(&clash), Err(PciError::InvalidBar(0)));
        let unaligned = PciBarRegion {
            index: 3,
            base: 0x10,
            ..m32
        };
        assert!(matches!(
            cfg.add_bar(&unaligned),
            Err(PciError::BarAddress { .. })
        ));
        let odd = PciBarRegion {
            index: 3,
            size: 0x30,
            ..m32
        };
        assert_eq!(cfg.add_bar(&odd), Err(PciError::BarSize(0x30)));
    }

    #[test]
    fn bar_move_is_reported_once_decoding_is_on() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_bar(&bar64(0xc000_0000)).unwrap();
        // Decoding off: the low half alone moves nothing.
        assert!(cfg
            .write_reg(4, 0, &0xd000_0000u32.to_le_bytes())
            .is_empty());
        assert!(cfg.write_reg(5, 0, &1u32.to_le_bytes()).is_empty());
        let moves = cfg.write_reg(1, 0, &[0x6, 0]);
        assert_eq!(
            moves,
            vec![BarReprogram {
                index: 0,
                old_base: 0xc000_0000,
                new_base: 0x1_d000_0000,
                len: 0x8000,
                region_type: PciBarRegionType::Memory64,
            }]
        );
        assert_eq!(cfg.bars()[0].base, 0x1_d000_0000);
        // With decoding on, a direct write is reported immediately.
        let moves = cfg.write_reg(5, 0, &[0; 4]);
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].old_base, 0x1_d000_0000);
        assert_eq!(moves[0].new_base, 0xd000_0000);
        // Sizing with decoding on reports nothing.
        assert!(cfg.write_reg(4, 0, &[0xff; 4]).is_empty());
    }

    #[test]
    fn state_round_trip_keeps_moved_bars_and_command() {
        let build = || {
            let mut cfg = PciConfiguration::new(&header());
            cfg.add_capability(0x09, &[0; 6]).unwrap();
            cfg.mark_emulated(0x44, 2);
            cfg.add_bar(&bar64(0xc000_0000)).unwrap();
            cfg
        };
        let mut src = build();
        src.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        src.write_reg(5, 0, &1u32.to_le_bytes());
        assert_eq!(src.write_reg(1, 0, &[0x06, 0x04]).len(), 1);
        src.write_reg(15, 0, &[11]);
        src.write_raw(0x44, &[0xab, 0xcd]);
        // A sizing probe in flight: the registers hold the mask, the mapping stays.
        src.write_reg(4, 0, &[0xff; 4]);

        let mut dst = build();
        let state = crate::persist::assert_round_trip(&src, &mut dst);
        assert_eq!(state.bars[0].mapped, 0x1_d000_0000);
        assert_eq!(dst.bars()[0].base, 0x1_d000_0000);
        for reg in [0, 1, 2, 4, 5, 11, 15, 0x44 / 4] {
            assert_eq!(dst.read_reg(reg), src.read_reg(reg), "register {reg}");
        }
        assert_eq!(dst.command(), 0x406);
        // The restored space keeps its masks: finishing the probe moves nothing, a new address
        // is reported against the restored mapping, the ids stay read-only.
        assert!(dst
            .write_reg(4, 0, &0xd000_0000u32.to_le_bytes())
            .is_empty());
        let moves = dst.write_reg(5, 0, &0u32.to_le_bytes());
        assert_eq!(moves[0].old_base, 0x1_d000_0000);
        dst.write_reg(0, 0, &[0; 4]);
        assert_eq!(dst.read_reg(0), 0x1042_1af4);
    }

    #[test]
    fn restore_refuses_foreign_or_misplaced_state() {
        let mut with_bar = PciConfiguration::new(&header());
        with_bar.add_bar(&bar64(0xc000_0000)).unwrap();
        let good = with_bar.save();

        // Another device id, a capability the target does not have, a BAR flag changed.
        for (reg, value) in [(0, 0x1041_1af4), (0x40 / 4, 1), (4, 0xc000_000c)] {
            let mut bad = good.clone();
            bad.registers[reg] = value;
            assert!(
                matches!(with_bar.restore(&bad), Err(RestoreError::Mismatch(_))),
                "register {reg}"
            );
        }
        // BARs: none defined on the target, another size, a misaligned or wrapping mapping.
        let mut fresh = PciConfiguration::new(&header());
        assert!(matches!(
            fresh.restore(&good),
            Err(RestoreError::Mismatch(_))
        ));
        let mut bad = good.clone();
        bad.bars[0].size = 0x4000;
        assert!(matches!(
            with_bar.restore(&bad),
            Err(RestoreError::Mismatch(_))
        ));
        for mapped in [0xc000_0010, u64::MAX - 0x7fff] {
            let mut bad = good.clone();
            bad.bars[0].mapped = mapped;
            assert!(matches!(
                with_bar.restore(&bad),
                Err(RestoreError::Invalid { .. })
            ));
        }
        let mut bad = good.clone();
        bad.registers.pop();
        assert!(with_bar.restore(&bad).is_err());
        assert_eq!(with_bar.save(), good, "refused states change nothing");
    }

    #[test]
    fn capability_list_is_linked() {
        let mut cfg = PciConfiguration::new(&header());
        let a = cfg
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            .unwrap();
        let b = cfg.add_capability(0x09, &[0xaa; 14]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c);
        assert_ne!(cfg.read_reg(1) & STATUS_CAP_LIST, 0);
        assert_eq!(cfg.read_reg(0x34 / 4) & 0xff, 0x40);
        assert_eq!(cfg.read_reg(0x40 / 4) & 0xffff, 0x4c11);
        assert_eq!(cfg.read_reg(0x4c / 4) & 0xffff, 0x0009);
        assert_eq!(
            cfg.add_capability(0x09, &[0; 200]),
            Err(PciError::CapabilitySpace(202))
        );
    }
}
