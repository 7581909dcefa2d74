//! The guest physical-address and I/O-port map of an x86_64 VM.
//!
//! Every fixed address the VMM and the guest agree on lives here, so that the boot code, the ACPI
//! tables, the e820 map and the device manager can never disagree about where something is.
//!
//! Low memory (below 1 MiB) follows the PC conventions Linux expects; RAM then runs from
//! [`HIMEM_START`] up to the 32-bit MMIO hole at [`MMIO_HOLE_START`] and continues above 4 GiB
//! at [`RAM_64BIT_START`].

use vm_memory::GuestAddress;

// ---------------------------------------------------------------------------------------------
// Low memory: boot structures.
// ---------------------------------------------------------------------------------------------

/// Global Descriptor Table used to enter the kernel in long mode.
pub const GDT_START: GuestAddress = GuestAddress(0x500);
/// Interrupt Descriptor Table (empty: the kernel installs its own before enabling interrupts).
pub const IDT_START: GuestAddress = GuestAddress(0x520);
/// The Linux "zero page" (`struct boot_params`), passed to the kernel in `rsi`.
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer (and frame pointer) of the boot vCPU.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);
/// Page-map level 4 table of the boot identity mapping (loaded into CR3).
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
/// Page directory of the boot identity mapping (512 x 2 MiB pages = the first 1 GiB).
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Room reserved for the command line, including its terminating NUL byte.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area: the end of usable conventional memory.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// Start of the ACPI tables region (inside the BIOS area Linux scans for the RSDP).
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
/// Size of the ACPI tables region: it ends where high memory starts.
pub const ACPI_SIZE: u64 = HIMEM_START.0 - ACPI_START.0;
/// Root System Description Pointer (16-byte aligned, in the 0xe0000..0x100000 scan range).
pub const RSDP_START: GuestAddress = ACPI_START;
/// Start of high memory: where the kernel is loaded.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

// ---------------------------------------------------------------------------------------------
// The 32-bit MMIO hole (3 GiB .. 4 GiB) and what lives in it.
// ---------------------------------------------------------------------------------------------

/// Start of the 32-bit MMIO hole: no RAM between here and 4 GiB.
pub const MMIO_HOLE_START: GuestAddress = GuestAddress(0xc000_0000);
/// First address above the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: GuestAddress = GuestAddress(0x1_0000_0000);
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = MMIO_HOLE_END.0 - MMIO_HOLE_START.0;
/// Start of the window for 32-bit PCI BARs.
pub const PCI_MMIO32_START: GuestAddress = MMIO_HOLE_START;
/// Size of the window for 32-bit PCI BARs (up to the ECAM area).
pub const PCI_MMIO32_SIZE: u64 = PCI_ECAM_START.0 - PCI_MMIO32_START.0;
/// PCI Express enhanced configuration space (ECAM / MMCONFIG), segment 0.
pub const PCI_ECAM_START: GuestAddress = GuestAddress(0xe000_0000);
/// Size of the ECAM area: 256 buses x 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// The IOAPIC's MMIO registers.
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
/// The local APICs' MMIO registers (same address on every vCPU).
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);
/// Where guest RAM continues above the MMIO hole.
pub const RAM_64BIT_START: GuestAddress = MMIO_HOLE_END;
/// The 64-bit PCI MMIO window starts at a multiple of this after the end of RAM.
pub const PCI_MMIO64_ALIGNMENT: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Legacy I/O ports and IRQs (GSIs on the IOAPIC) of the platform devices.
// ---------------------------------------------------------------------------------------------

/// First I/O port of the COM1 8250 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of I/O ports of the COM1 UART.
pub const COM1_PORT_LEN: u16 = 8;
/// IRQ of the COM1 UART.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port (writing 0xfe here resets the machine).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// IRQ of the i8042 keyboard port.
pub const I8042_KBD_IRQ: u32 = 1;
/// First I/O port of the CMOS/RTC (index register; the data register follows).
pub const CMOS_PORT: u16 = 0x70;
/// Number of I/O ports of the CMOS/RTC.
pub const CMOS_PORT_LEN: u16 = 2;
/// IRQ of the RTC.
pub const RTC_IRQ: u32 = 8;

/// Start of the ACPI power-management I/O block (hardware-reduced ACPI registers).
pub const ACPI_PM_BLOCK_START: u16 = 0x600;
/// Length of the ACPI power-management I/O block (sleep control/status, reset, GED).
pub const ACPI_PM_BLOCK_LEN: u16 = 0x10;
/// FADT `SLEEP_CONTROL_REG` (8-bit): the guest writes `(SLP_TYP << 2) | SLP_EN` here.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// FADT `SLEEP_STATUS_REG` (8-bit): bit 7 is WAK_STS.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// FADT `RESET_REG` (8-bit).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to [`ACPI_RESET_PORT`] to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The `SLP_TYP` value of the S5 (soft-off) state, as declared by `\_S5_` in the DSDT.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// Bit position of `SLP_TYP` in the sleep control register.
pub const ACPI_SLEEP_TYPE_SHIFT: u8 = 2;
/// `SLP_EN` bit of the sleep control register.
pub const ACPI_SLEEP_ENABLE: u8 = 1 << 5;
/// The value written to [`ACPI_SLEEP_CONTROL_PORT`] to power off (0x34).
pub const ACPI_S5_SLEEP_CONTROL_VALUE: u8 =
    (ACPI_S5_SLP_TYP << ACPI_SLEEP_TYPE_SHIFT) | ACPI_SLEEP_ENABLE;
/// ACPI Generic Event Device event register (1 byte). Reading it returns the pending event
/// bits and clears them.
pub const GED_PORT: u16 = 0x608;
/// Bit of [`GED_PORT`] signalling a power-button press.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Interrupt (GSI) of the Generic Event Device: edge triggered, active high.
pub const GED_IRQ: u32 = 5;

// Compile-time sanity checks of the map.
const _: () = {
    assert!(ACPI_S5_SLEEP_CONTROL_VALUE == 0x34);
    assert!(PCI_ECAM_START.0 + PCI_ECAM_SIZE == 0xf000_0000);
    assert!(PCI_ECAM_START.0 + PCI_ECAM_SIZE <= IOAPIC_START.0);
    assert!(PCI_MMIO32_START.0 + PCI_MMIO32_SIZE == PCI_ECAM_START.0);
    assert!(GED_PORT >= ACPI_PM_BLOCK_START && GED_PORT < ACPI_PM_BLOCK_START + ACPI_PM_BLOCK_LEN);
    assert!(ACPI_RESET_PORT < ACPI_PM_BLOCK_START + ACPI_PM_BLOCK_LEN);
    assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE as u64 <= EBDA_START.0);
    assert!(PDE_START.0 + 0x1000 <= CMDLINE_START.0);
    assert!(ZERO_PAGE_START.0 + 0x1000 <= BOOT_STACK_POINTER.0);
    assert!(RSDP_START.0 & 0xf == 0);
};

/// Returns the guest RAM regions for `mem_size` bytes of RAM: one region below the 32-bit MMIO
/// hole and, when RAM does not fit there, a second one starting at 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_HOLE_START.0);
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push((GuestAddress(0), low as usize));
    }
    let high = mem_size - low;
    if high > 0 {
        regions.push((RAM_64BIT_START, high as usize));
    }
    regions
}

/// Returns the end (exclusive) of RAM below the 32-bit MMIO hole for `mem_size` bytes of RAM.
pub fn low_ram_end(mem_size: u64) -> GuestAddress {
    GuestAddress(mem_size.min(MMIO_HOLE_START.0))
}

/// Returns the end (exclusive) of guest RAM for `mem_size` bytes of RAM (saturating at 2^64 - 1
/// for absurd sizes).
pub fn ram_end(mem_size: u64) -> GuestAddress {
    if mem_size > MMIO_HOLE_START.0 {
        GuestAddress(
            RAM_64BIT_START
                .0
                .saturating_add(mem_size - MMIO_HOLE_START.0),
        )
    } else {
        GuestAddress(mem_size)
    }
}

/// Returns the start of the 64-bit PCI MMIO window: the end of RAM (and never below 4 GiB),
/// rounded up to [`PCI_MMIO64_ALIGNMENT`].
///
/// Returns `None` only if `mem_size` is so large that the window would start past 2^64.
pub fn pci_mmio64_start(mem_size: u64) -> Option<GuestAddress> {
    let end = ram_end(mem_size).0.max(MMIO_HOLE_END.0);
    end.checked_next_multiple_of(PCI_MMIO64_ALIGNMENT)
        .map(GuestAddress)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_ram_is_one_region() {
        assert_eq!(
            ram_regions(512 * MIB),
            vec![(GuestAddress(0), (512 * MIB) as usize)]
        );
        assert_eq!(low_ram_end(512 * MIB), GuestAddress(512 * MIB));
        assert_eq!(ram_end(512 * MIB), GuestAddress(512 * MIB));
    }

    #[test]
    fn ram_exactly_up_to_the_hole_is_one_region() {
        assert_eq!(
            ram_regions(3 * GIB),
            vec![(GuestAddress(0), (3 * GIB) as usize)]
        );
        assert_eq!(ram_end(3 * GIB), GuestAddress(3 * GIB));
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        assert_eq!(
            ram_regions(8 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (5 * GIB) as usize)
            ]
        );
        assert_eq!(low_ram_end(8 * GIB), MMIO_HOLE_START);
        assert_eq!(ram_end(8 * GIB), GuestAddress(9 * GIB));
    }

    #[test]
    fn zero_ram_has_no_regions() {
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn mmio64_window_is_above_ram_and_aligned() {
        assert_eq!(pci_mmio64_start(512 * MIB), Some(GuestAddress(4 * GIB)));
        assert_eq!(pci_mmio64_start(8 * GIB), Some(GuestAddress(9 * GIB)));
        assert_eq!(pci_mmio64_start(8 * GIB + 1), Some(GuestAddress(10 * GIB)));
        assert_eq!(pci_mmio64_start(u64::MAX), None);
    }
}
