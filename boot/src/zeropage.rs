//! The Linux x86 "zero page" (`struct boot_params`) and the e820 memory map in it.
//!
//! The zero page is what a 64-bit-boot-protocol kernel reads first (pointed to by `rsi`): the
//! setup header (command line, initrd), the e820 map of RAM and reserved ranges, and the ACPI
//! RSDP address. See the kernel's `Documentation/arch/x86/boot.rst`.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{
    ram_regions, EBDA_START, HIMEM_START, PCI_ECAM_SIZE, PCI_ECAM_START, ZERO_PAGE_START,
};
use crate::loader::{CmdlineInfo, InitrdInfo};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved, not usable by the OS.
pub const E820_RESERVED: u32 = 2;

/// "HdrS": magic of the setup header.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature expected in `boot_flag`.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a boot loader without an assigned id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment advertised for an ELF kernel (the x86_64 default `CONFIG_PHYSICAL_ALIGN`).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// End of the (virtual) setup heap, relative to the real-mode code, minus 0x200. Only the
/// 16-bit setup code uses it; 64-bit entry skips that code, so this is the conventional value.
const HEAP_END_PTR: u16 = 0xfe00;

/// Errors while building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// The guest does not even have RAM up to the kernel load address.
    #[error("guest RAM ({0} bytes) is too small: more than 1 MiB is required")]
    RamTooSmall(u64),
    /// More e820 entries than the zero page holds (cannot happen with our layout).
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
    /// Writing the zero page failed.
    #[error("failed to write the zero page to guest memory: {0}")]
    WriteZeroPage(#[source] GuestMemoryError),
}

/// Inputs of [`configure_boot_params`].
#[derive(Debug, Clone, Copy)]
pub struct BootParamsConfig {
    /// Where the command line was written ([`crate::loader::load_cmdline`]).
    pub cmdline: CmdlineInfo,
    /// Where the initrd was loaded, if any ([`crate::loader::load_initrd`]).
    pub initrd: Option<InitrdInfo>,
    /// The bzImage setup header ([`crate::loader::KernelInfo::setup_header`]); `None` for ELF.
    pub setup_header: Option<setup_header>,
    /// Address of the ACPI RSDP ([`crate::acpi::create_acpi_tables`]), if ACPI is used.
    pub rsdp_addr: Option<GuestAddress>,
    /// Guest RAM size in bytes (laid out by [`crate::layout::ram_regions`]).
    pub mem_size: u64,
}

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Builds the e820 map for `mem_size` bytes of RAM, in address order:
/// RAM [0, EBDA), reserved [EBDA, 1 MiB), RAM [1 MiB, end of low RAM), reserved ECAM,
/// RAM above 4 GiB if any.
pub fn e820_entries(mem_size: u64) -> Result<Vec<E820Entry>, ZeroPageError> {
    let regions = ram_regions(mem_size);
    let low_end = regions
        .first()
        .map(|(start, len)| start.0 + *len as u64)
        .unwrap_or(0);
    if low_end <= HIMEM_START.0 {
        return Err(ZeroPageError::RamTooSmall(mem_size));
    }
    let mut entries = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START.0,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START.0,
            size: HIMEM_START.0 - EBDA_START.0,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START.0,
            size: low_end - HIMEM_START.0,
            kind: E820_RAM,
        },
        // Linux only uses MMCONFIG areas that firmware reserved.
        E820Entry {
            addr: PCI_ECAM_START.0,
            size: PCI_ECAM_SIZE,
            kind: E820_RESERVED,
        },
    ];
    entries.extend(regions.iter().skip(1).map(|(start, len)| E820Entry {
        addr: start.0,
        size: *len as u64,
        kind: E820_RAM,
    }));
    Ok(entries)
}

/// Splits a 64-bit address into the low 32 bits and the `ext_*` high 32 bits.
fn split(addr: u64) -> (u32, u32) {
    (addr as u32, (addr >> 32) as u32)
}

/// Builds `boot_params` from `cfg` (without writing it).
pub fn build_boot_params(cfg: &BootParamsConfig) -> Result<boot_params, ZeroPageError> {
    let mut params = boot_params::default();

    match cfg.setup_header {
        Some(hdr) => {
            // Copy the kernel's header, then fill in the fields the loader owns.
            params.hdr = hdr;
            params.hdr.loadflags |= CAN_USE_HEAP;
            params.hdr.heap_end_ptr = HEAP_END_PTR;
        }
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.cmdline_size = cfg.cmdline.size.saturating_sub(1) as u32;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    let (lo, hi) = split(cfg.cmdline.addr.0);
    params.hdr.cmd_line_ptr = lo;
    params.ext_cmd_line_ptr = hi;

    if let Some(initrd) = cfg.initrd {
        let (lo, hi) = split(initrd.addr.0);
        params.hdr.ramdisk_image = lo;
        params.ext_ramdisk_image = hi;
        let (lo, hi) = split(initrd.size as u64);
        params.hdr.ramdisk_size = lo;
        params.ext_ramdisk_size = hi;
    }

    if let Some(rsdp) = cfg.rsdp_addr {
        params.acpi_rsdp_addr = rsdp.0;
    }

    let entries = e820_entries(cfg.mem_size)?;
    let mut table = params.e820_table;
    if entries.len() > table.len() {
        return Err(ZeroPageError::TooManyE820Entries(entries.len()));
    }
    for (slot, e) in table.iter_mut().zip(&entries) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_table = table;
    params.e820_entries = entries.len() as u8;
    Ok(params)
}

/// Builds `boot_params` from `cfg` and writes it at [`ZERO_PAGE_START`].
pub fn configure_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &BootParamsConfig,
) -> Result<(), ZeroPageError> {
    let params = build_boot_params(cfg)?;
    mem.write_obj(params, ZERO_PAGE_START)
        .map_err(ZeroPageError::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::CMDLINE_START;
    use linux_loader::bootparam::{LOADED_HIGH, XLF_KERNEL_64};
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn cfg(mem_size: u64) -> BootParamsConfig {
        BootParamsConfig {
            cmdline: CmdlineInfo {
                addr: CMDLINE_START,
                size: 14,
            },
            initrd: None,
            setup_header: None,
            rsdp_addr: None,
            mem_size,
        }
    }

    fn entry(addr: u64, size: u64, kind: u32) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn e820_small_vm() {
        assert_eq!(
            e820_entries(256 * MIB).unwrap(),
            vec![
                entry(0, 0x9fc00, E820_RAM),
                entry(0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                entry(0x100000, 255 * MIB, E820_RAM),
                entry(0xe000_0000, 0x1000_0000, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn e820_large_vm() {
        let entries = e820_entries(6 * GIB).unwrap();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[2], entry(MIB, 3 * GIB - MIB, E820_RAM));
        assert_eq!(entries[4], entry(4 * GIB, 3 * GIB, E820_RAM));
        // Sorted and not overlapping.
        for pair in entries.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr);
        }
    }

    #[test]
    fn e820_too_small() {
        assert!(matches!(
            e820_entries(MIB),
            Err(ZeroPageError::RamTooSmall(_))
        ));
        assert!(e820_entries(0).is_err());
    }

    #[test]
    fn elf_boot_params() {
        let mut c = cfg(512 * MIB);
        c.initrd = Some(InitrdInfo {
            addr: GuestAddress(0x1f00_0000),
            size: 0x12345,
        });
        c.rsdp_addr = Some(GuestAddress(0xe0000));
        let p = build_boot_params(&c).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 13);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!({ p.hdr.ramdisk_image }, 0x1f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 4);
        let third = p.e820_table[2];
        assert_eq!(
            ({ third.addr }, { third.size }, { third.r#type }),
            (MIB, 511 * MIB, 1)
        );
    }

    #[test]
    fn bzimage_header_is_copied() {
        let hdr = setup_header {
            header: KERNEL_HDR_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            code32_start: 0x100000,
            init_size: 0x1234_5678,
            ..Default::default()
        };
        let mut c = cfg(512 * MIB);
        c.setup_header = Some(hdr);
        let p = build_boot_params(&c).unwrap();
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.init_size }, 0x1234_5678);
        assert_eq!({ p.hdr.cmdline_size }, 2047, "kernel's own limit kept");
        assert_eq!({ p.hdr.loadflags }, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ p.hdr.heap_end_ptr }, HEAP_END_PTR);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0);
    }

    #[test]
    fn high_addresses_use_ext_fields() {
        let mut c = cfg(512 * MIB);
        c.initrd = Some(InitrdInfo {
            addr: GuestAddress(0x1_2345_6000),
            size: 0x1000,
        });
        let p = build_boot_params(&c).unwrap();
        assert_eq!({ p.hdr.ramdisk_image }, 0x2345_6000);
        assert_eq!({ p.ext_ramdisk_image }, 1);
    }

    #[test]
    fn writes_the_zero_page() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        configure_boot_params(&mem, &cfg(64 * MIB)).unwrap();
        // e820_entries at 0x1e8, the setup header magic at 0x202.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7000 + 0x1e8)).unwrap(), 4);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x7000 + 0x202)).unwrap(),
            KERNEL_HDR_MAGIC
        );
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
    }
}
