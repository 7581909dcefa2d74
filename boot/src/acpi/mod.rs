//! ACPI tables for a hardware-reduced ACPI x86_64 machine.
//!
//! The tables live in the BIOS area [`ACPI_START`]..1 MiB, with the RSDP at [`RSDP_START`]
//! where Linux also finds it by scanning. They describe:
//!
//! - FADT (rev 6.5): `HW_REDUCED_ACPI`; power off through the sleep control/status registers
//!   at [`ACPI_SLEEP_CONTROL_PORT`]/[`ACPI_SLEEP_STATUS_PORT`] with `\_S5` SLP_TYP
//!   [`crate::layout::ACPI_S5_SLP_TYP`]; reset by writing [`ACPI_RESET_VALUE`] to
//!   [`ACPI_RESET_PORT`]; no fixed-feature buttons (the power button is a GED-driven device).
//! - DSDT: see the `dsdt` submodule (power button, GED, COM1, RTC, optional i8042, motherboard resources,
//!   optional PCIe host bridge).
//! - MADT: one local APIC per vCPU (APIC id = ACPI processor uid = vCPU index), the IOAPIC,
//!   IRQ0 -> GSI2, LINT1 = NMI on all processors.
//! - MCFG: when a PCI host bridge is configured.
//! - XSDT, referenced by a revision-2 RSDP.

mod dsdt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{
    pci_mmio64_start, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SIZE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_START, APIC_START, IOAPIC_START, MMIO_HOLE_END, PCI_ECAM_SIZE,
    PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START, RSDP_START,
};

/// OEM id written into every table.
pub const OEM_ID: [u8; 6] = *b"RVMM  ";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity".
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"RVMMKVM ";
/// MADT revision (ACPI 6.2+).
const MADT_REVISION: u8 = 5;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// IOAPIC id in the MADT; matches the reset value of KVM's in-kernel IOAPIC id register.
pub const IOAPIC_ID: u8 = 0;
/// Tables are placed on this alignment.
const TABLE_ALIGN: u64 = 16;

// IA-PC boot architecture flags (FADT IAPC_BOOT_ARCH).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;

// MADT.
const MADT_FLAG_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_ENABLED: u32 = 1;
/// ACPI processor uid meaning "all processors" in a Local APIC NMI entry.
const MADT_ALL_PROCESSORS: u8 = 0xff;

/// Errors while building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A VM needs at least one vCPU.
    #[error("ACPI tables need at least one vCPU")]
    NoVcpus,
    /// The PCI host bridge description is inconsistent.
    #[error("invalid PCI host bridge configuration: {0}")]
    InvalidPci(&'static str),
    /// The tables do not fit in the ACPI region.
    #[error("the ACPI tables need {needed} bytes but only {available} are reserved for them")]
    TablesTooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("failed to write the ACPI {table} table to guest memory: {source}")]
    WriteTable {
        /// Signature of the table.
        table: &'static str,
        /// The memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// A PCI Express host bridge (one segment), described by MCFG and a `PCI0` device in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHostConfig {
    /// PCI segment group number.
    pub segment: u16,
    /// ECAM base address: the configuration space of bus 0 (even if `bus_start` > 0).
    /// The ECAM area must lie below 4 GiB.
    pub ecam_base: GuestAddress,
    /// First bus number decoded by the bridge.
    pub bus_start: u8,
    /// Last bus number decoded by the bridge.
    pub bus_end: u8,
    /// Window for 32-bit memory BARs: (start, size); must lie below 4 GiB.
    pub mmio32: (GuestAddress, u64),
    /// Window for 64-bit memory BARs: (start, size).
    pub mmio64: Option<(GuestAddress, u64)>,
    /// I/O port window forwarded to PCI: (first port, number of ports).
    pub io: Option<(u16, u16)>,
}

impl PciHostConfig {
    /// The layout's default host bridge for `mem_size` bytes of RAM: segment 0, buses 0..=255,
    /// ECAM at [`PCI_ECAM_START`], the 32-bit window of [`crate::layout`], a 64-bit window of
    /// `mmio64_size` bytes after RAM (none if 0), and no I/O window.
    pub fn new(mem_size: u64, mmio64_size: u64) -> Self {
        let mmio64 = match pci_mmio64_start(mem_size) {
            Some(start) if mmio64_size > 0 => Some((start, mmio64_size)),
            _ => None,
        };
        PciHostConfig {
            segment: 0,
            ecam_base: PCI_ECAM_START,
            bus_start: 0,
            bus_end: ((PCI_ECAM_SIZE >> 20) - 1) as u8,
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            mmio64,
            io: None,
        }
    }

    /// The part of the ECAM area the bridge's buses use: (start, size).
    pub fn ecam_range(&self) -> (GuestAddress, u64) {
        let start = self.ecam_base.0 + (u64::from(self.bus_start) << 20);
        let buses = u64::from(self.bus_end.saturating_sub(self.bus_start)) + 1;
        (GuestAddress(start), buses << 20)
    }

    fn validate(&self) -> Result<(), AcpiError> {
        let err = |what| Err(AcpiError::InvalidPci(what));
        if self.bus_end < self.bus_start {
            return err("bus_end is below bus_start");
        }
        if self.ecam_base.0 & ((1 << 20) - 1) != 0 {
            return err("the ECAM base is not 1 MiB aligned");
        }
        let (ecam, len) = self.ecam_range();
        if ecam.0 + len > MMIO_HOLE_END.0 {
            return err("the ECAM area must lie below 4 GiB");
        }
        let (m32, m32_len) = self.mmio32;
        let m32_end = m32.0.saturating_add(m32_len);
        if m32_len == 0 || m32_end > MMIO_HOLE_END.0 {
            return err("the 32-bit MMIO window must be non-empty and below 4 GiB");
        }
        if let Some((m64, m64_len)) = self.mmio64 {
            if m64_len == 0 || m64.0.checked_add(m64_len).is_none() {
                return err("the 64-bit MMIO window is empty or overflows");
            }
        }
        if let Some((base, len)) = self.io {
            if len == 0 || u32::from(base) + u32::from(len) > 0x1_0000 {
                return err("the I/O window is empty or beyond port 0xffff");
            }
        }
        Ok(())
    }
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..vcpu_count); 1..=255.
    pub vcpu_count: u8,
    /// Describe an i8042 keyboard controller (PNP0303 at 0x60/0x64, IRQ 1) and set the FADT
    /// "8042 present" flag. Without it Linux does not probe the i8042 at all (faster boot);
    /// reset still works through the FADT reset register.
    pub i8042: bool,
    /// The PCIe host bridge, if the VM has PCI devices: adds MCFG and `\_SB.PCI0`.
    pub pci: Option<PciHostConfig>,
}

impl AcpiConfig {
    /// A configuration with `vcpu_count` vCPUs, no i8042 and no PCI.
    pub fn new(vcpu_count: u8) -> Self {
        AcpiConfig {
            vcpu_count,
            i8042: false,
            pci: None,
        }
    }
}

fn table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"RVMM    ";
    id[4..].copy_from_slice(signature);
    id
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        table_id(b"DSDT"),
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt::dsdt_aml(cfg));
    dsdt.as_slice().to_vec()
}

fn build_fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION);
    let mut boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS;
    if cfg.i8042 {
        boot_arch |= IAPC_BOOT_ARCH_8042;
    }
    fadt.iapc_boot_arch = boot_arch.into();
    fadt.reset_reg = io_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    let fadt = fadt
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Set = the buttons are not fixed-feature hardware (none exists on HW-reduced ACPI);
        // the power button is the PNP0C0C device notified by the GED.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr)
        .finalize();
    to_bytes(&fadt)
}

fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_START.0 as u32);
    madt.write_u32(40, MADT_FLAG_PCAT_COMPAT);

    let mut entries = Vec::new();
    for id in 0..cfg.vcpu_count {
        // Processor Local APIC: type, length, ACPI processor uid, APIC id, flags.
        entries.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        entries.extend_from_slice(&MADT_LOCAL_APIC_ENABLED.to_le_bytes());
    }
    // I/O APIC: type, length, id, reserved, address, GSI base.
    entries.extend_from_slice(&[MADT_IO_APIC, 12, IOAPIC_ID, 0]);
    entries.extend_from_slice(&(IOAPIC_START.0 as u32).to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt Source Override: type, length, bus (ISA), source IRQ 0, GSI 2, flags
    // (conforms to the bus: edge, active high).
    entries.extend_from_slice(&[MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0]);
    entries.extend_from_slice(&2u32.to_le_bytes());
    entries.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: type, length, processor uid (all), flags (conforming), LINT1.
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS]);
    entries.extend_from_slice(&0u16.to_le_bytes());
    entries.push(1);

    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

fn build_mcfg(pci: &PciHostConfig) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base.0, pci.segment, pci.bus_start, pci.bus_end);
    to_bytes(&mcfg)
}

fn build_xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    for &addr in tables {
        xsdt.add_entry(addr);
    }
    to_bytes(&xsdt)
}

/// Lays out tables one after the other (aligned) in the ACPI region.
struct Placer {
    next: u64,
    placed: Vec<(&'static str, u64, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, name: &'static str, bytes: Vec<u8>) -> u64 {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        self.next = addr + bytes.len() as u64;
        self.placed.push((name, addr, bytes));
        addr
    }
}

/// Builds the ACPI tables described by `cfg`, writes them to the ACPI region of `mem` and
/// returns the address of the RSDP (for `boot_params.acpi_rsdp_addr`).
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if cfg.vcpu_count == 0 {
        return Err(AcpiError::NoVcpus);
    }
    if let Some(pci) = &cfg.pci {
        pci.validate()?;
    }

    let mut placer = Placer {
        next: RSDP_START.0 + Rsdp::len() as u64,
        placed: Vec::new(),
    };
    let dsdt_addr = placer.place("DSDT", build_dsdt(cfg));
    let mut xsdt_entries = vec![
        placer.place("FACP", build_fadt(cfg, dsdt_addr)),
        placer.place("APIC", build_madt(cfg)),
    ];
    if let Some(pci) = &cfg.pci {
        xsdt_entries.push(placer.place("MCFG", build_mcfg(pci)));
    }
    let xsdt_addr = placer.place("XSDT", build_xsdt(&xsdt_entries));

    let available = ACPI_SIZE;
    let needed = placer.next - ACPI_START.0;
    if needed > available {
        return Err(AcpiError::TablesTooLarge { needed, available });
    }

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, RSDP_START)
        .map_err(|source| AcpiError::WriteTable {
            table: "RSDP",
            source,
        })?;
    for (table, addr, bytes) in &placer.placed {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|source| AcpiError::WriteTable { table, source })?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x)) == 0
    }

    /// Reads a whole table (header + body) at `addr` and checks its checksum.
    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert!(sums_to_zero(&table), "bad checksum in {:?}", &table[..4]);
        assert_eq!(&table[10..16], &OEM_ID);
        table
    }

    /// Follows RSDP -> XSDT and returns the tables it lists, by signature.
    fn tables(mem: &GuestMemoryMmap) -> Vec<(u64, Vec<u8>)> {
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, RSDP_START).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]), "RSDP v1 checksum");
        assert!(sums_to_zero(&rsdp), "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "length");
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_table(mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        (36..xsdt.len())
            .step_by(8)
            .map(|off| {
                let addr = u64_at(&xsdt, off);
                (addr, read_table(mem, addr))
            })
            .collect()
    }

    fn find<'a>(tables: &'a [(u64, Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
        &tables.iter().find(|(_, t)| &t[..4] == sig).unwrap().1
    }

    fn all_in_region(tables: &[(u64, Vec<u8>)]) {
        for (addr, t) in tables {
            assert!(*addr >= ACPI_START.0 + 36);
            assert!(addr + t.len() as u64 <= ACPI_START.0 + ACPI_SIZE);
        }
    }

    #[test]
    fn rsdp_points_to_xsdt_listing_fadt_and_madt() {
        let mem = mem();
        let rsdp = create_acpi_tables(&mem, &AcpiConfig::new(4)).unwrap();
        assert_eq!(rsdp, GuestAddress(0xe0000));
        let tables = tables(&mem);
        let sigs: Vec<&[u8]> = tables.iter().map(|(_, t)| &t[..4]).collect();
        assert_eq!(sigs, vec![b"FACP", b"APIC"]);
        all_in_region(&tables);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_reset_and_sleep_registers() {
        let mem = mem();
        create_acpi_tables(&mem, &AcpiConfig::new(1)).unwrap();
        let tables = tables(&mem);
        let fadt = find(&tables, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "major revision");
        assert_eq!(fadt[131], 5, "minor revision");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON (control method)");
        assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON (control method)");
        assert_eq!(u16_at(fadt, 109), 0x14, "IAPC_BOOT_ARCH: no VGA, no ASPM");
        // GAS: SystemIO, 8 bits, offset 0, byte access, port.
        let gas = |port: u16| {
            let mut g = vec![1u8, 8, 0, 1];
            g.extend_from_slice(&u64::from(port).to_le_bytes());
            g
        };
        assert_eq!(&fadt[116..128], gas(0x602).as_slice(), "RESET_REG");
        assert_eq!(fadt[128], 1, "RESET_VALUE");
        assert_eq!(&fadt[244..256], gas(0x600).as_slice(), "SLEEP_CONTROL_REG");
        assert_eq!(&fadt[256..268], gas(0x601).as_slice(), "SLEEP_STATUS_REG");
        assert_eq!(&fadt[268..276], b"RVMMKVM ");
        assert_eq!(u32_at(fadt, 40), 0, "no 32-bit DSDT pointer");
        let dsdt = read_table(&mem, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(dsdt[8], 2);
    }

    #[test]
    fn fadt_8042_flag_follows_config() {
        let mem = mem();
        let mut cfg = AcpiConfig::new(1);
        cfg.i8042 = true;
        create_acpi_tables(&mem, &cfg).unwrap();
        let tables = tables(&mem);
        assert_eq!(u16_at(find(&tables, b"FACP"), 109), 0x16);
    }

    #[test]
    fn madt_lists_every_vcpu() {
        for n in [1u8, 3, 255] {
            let mem = mem();
            create_acpi_tables(&mem, &AcpiConfig::new(n)).unwrap();
            let tables = tables(&mem);
            let madt = find(&tables, b"APIC");
            assert_eq!(u32_at(madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
            let mut lapics = Vec::new();
            let mut others = Vec::new();
            let mut off = 44;
            while off < madt.len() {
                let (kind, len) = (madt[off], madt[off + 1] as usize);
                assert!(len >= 2 && off + len <= madt.len());
                let entry = &madt[off..off + len];
                if kind == 0 {
                    assert_eq!(len, 8);
                    lapics.push((entry[2], entry[3], u32_at(entry, 4)));
                } else {
                    others.push(entry.to_vec());
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            let expected: Vec<_> = (0..n).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, expected);
            assert_eq!(
                others,
                vec![
                    vec![1, 12, 0, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0],
                    vec![2, 10, 0, 0, 2, 0, 0, 0, 0, 0],
                    vec![4, 6, 0xff, 0, 0, 1],
                ]
            );
            all_in_region(&tables);
        }
    }

    #[test]
    fn pci_adds_mcfg() {
        let mem = mem();
        let mut cfg = AcpiConfig::new(2);
        cfg.pci = Some(PciHostConfig::new(1 << 30, 1 << 34));
        create_acpi_tables(&mem, &cfg).unwrap();
        let tables = tables(&mem);
        let sigs: Vec<&[u8]> = tables.iter().map(|(_, t)| &t[..4]).collect();
        assert_eq!(sigs, vec![b"FACP", b"APIC", b"MCFG"]);
        let mcfg = find(&tables, b"MCFG");
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(u64_at(mcfg, 44), 0xe000_0000);
        assert_eq!(u16_at(mcfg, 52), 0, "segment");
        assert_eq!((mcfg[54], mcfg[55]), (0, 255), "bus range");
    }

    #[test]
    fn pci_defaults() {
        let pci = PciHostConfig::new(8 << 30, 1 << 36);
        assert_eq!(pci.ecam_range(), (GuestAddress(0xe000_0000), 0x1000_0000));
        assert_eq!(pci.mmio32, (GuestAddress(0xc000_0000), 0x2000_0000));
        assert_eq!(pci.mmio64, Some((GuestAddress(9 << 30), 1 << 36)));
        assert!(pci.validate().is_ok());
        assert_eq!(PciHostConfig::new(1 << 30, 0).mmio64, None);
    }

    #[test]
    fn invalid_configs() {
        let mem = mem();
        assert!(matches!(
            create_acpi_tables(&mem, &AcpiConfig::new(0)),
            Err(AcpiError::NoVcpus)
        ));
        let base = PciHostConfig::new(1 << 30, 1 << 30);
        let bad = [
            PciHostConfig {
                bus_start: 5,
                bus_end: 4,
                ..base
            },
            PciHostConfig {
                ecam_base: GuestAddress(0xe000_1000),
                ..base
            },
            PciHostConfig {
                ecam_base: GuestAddress(0xff00_0000),
                ..base
            },
            PciHostConfig {
                mmio32: (GuestAddress(0xc000_0000), 0),
                ..base
            },
            PciHostConfig {
                mmio32: (GuestAddress(0xf000_0000), 0x2000_0000),
                ..base
            },
            PciHostConfig {
                mmio64: Some((GuestAddress(u64::MAX - 10), 100)),
                ..base
            },
            PciHostConfig {
                io: Some((0xf000, 0x2000)),
                ..base
            },
        ];
        for pci in bad {
            let mut cfg = AcpiConfig::new(1);
            cfg.pci = Some(pci);
            let err = create_acpi_tables(&mem, &cfg).unwrap_err();
            assert!(matches!(err, AcpiError::InvalidPci(_)), "{pci:?}");
        }
    }

    #[test]
    fn memory_without_bios_area() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9_f000)]).unwrap();
        let err = create_acpi_tables(&mem, &AcpiConfig::new(1)).unwrap_err();
        assert!(matches!(err, AcpiError::WriteTable { table: "RSDP", .. }));
    }

    /// Disassembles (and for the DSDT recompiles) every table with ACPICA's `iasl`, when it is
    /// installed (Debian: acpica-tools), and fails on any error it reports.
    #[test]
    fn iasl_accepts_the_tables() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("note: iasl not installed (apt-get install acpica-tools); skipping");
            return;
        }
        let mem = mem();
        let mut cfg = AcpiConfig::new(4);
        cfg.i8042 = true;
        cfg.pci = Some(PciHostConfig {
            io: Some((0x1000, 0x1000)),
            ..PciHostConfig::new(6 << 30, 1 << 36)
        });
        create_acpi_tables(&mem, &cfg).unwrap();
        let mut all = tables(&mem);
        let dsdt_addr = u64_at(find(&all, b"FACP"), 140);
        all.push((dsdt_addr, read_table(&mem, dsdt_addr)));

        let dir = std::env::temp_dir().join(format!("boot-acpi-iasl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (_, table) in &all {
            let sig = String::from_utf8_lossy(&table[..4]).to_lowercase();
            std::fs::write(dir.join(format!("{sig}.dat")), table).unwrap();
            let out = std::process::Command::new("iasl")
                .current_dir(&dir)
                .args(["-d", &format!("{sig}.dat")])
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl -d {sig}: {text}");
            let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).unwrap();
            for bad in ["Error", "**** Unknown", "Invalid", "Incorrect checksum"] {
                assert!(!text.contains(bad), "iasl -d {sig}: {text}");
                assert!(!dsl.contains(bad), "{sig}.dsl contains {bad:?}:\n{dsl}");
            }
            if sig == "dsdt" {
                // Recompile the disassembly: catches malformed AML the disassembler tolerates.
                let out = std::process::Command::new("iasl")
                    .current_dir(&dir)
                    .args(["-p", "recompiled", "dsdt.dsl"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "iasl dsdt.dsl:\n{text}\n{dsl}");
                assert!(text.contains(" 0 Errors"), "iasl dsdt.dsl:\n{text}\n{dsl}");
                for name in ["PWRB", "GED", "COM1", "RTC", "PS2K", "MBRD", "PCI0", "_S5"] {
                    assert!(dsl.contains(name), "{name} missing from:\n{dsl}");
                }
            }
        }
        if std::env::var_os("BOOT_KEEP_IASL").is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
