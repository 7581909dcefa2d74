//! The DSDT's AML: the platform devices of our hardware-reduced ACPI machine.
//!
//! Equivalent ASL (devices in brackets depend on the configuration):
//!
//! ```text
//! Name (\_S5, Package () { 5, 0, 0, 0 })
//! Scope (\_SB) {
//!     Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, 0) }
//!     Device (GED_) {
//!         Name (_HID, "ACPI0013")  Name (_UID, 0)
//!         Name (_CRS, ResourceTemplate () {
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GED_IRQ } })
//!         OperationRegion (GDST, SystemIO, GED_PORT, 1)
//!         Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }
//!         Method (_EVT, 1, Serialized) {
//!             Local0 = GDAT
//!             If ((Local0 & 1) == 1) { Notify (PWRB, 0x80) }
//!         }
//!     }
//!     Device (COM1) { PNP0501, IO 0x3f8/8, IRQNoFlags {4} }
//!     Device (RTC_) { PNP0B00, IO 0x70/2, IRQNoFlags {8} }
//!     [Device (PS2K) { PNP0303, IO 0x60/1, IO 0x64/1, IRQNoFlags {1} }]
//!     Device (MBRD) { PNP0C02, IO ACPI PM block [, Memory32Fixed ECAM] }
//!     [Device (PCI0) { PNP0A08/PNP0A03, _SEG, _BBN, _UID, _CRS (bus, [io], mmio32, [mmio64]),
//!                      _OSC granting everything the OS asks for }]
//! }
//! ```

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Arg, CreateDWordField, Device, EISAName, Else, Equal,
    Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local,
    Memory32Fixed, Method, Name, NotEqual, Notify, OpRegion, OpRegionSpace, Or, Package, Path,
    ResourceTemplate, Return, Scope, Store, Uuid, IO, ONE, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use super::{AcpiConfig, PciHostConfig};
use crate::layout::{
    ACPI_PM_BLOCK_LEN, ACPI_PM_BLOCK_START, ACPI_S5_SLP_TYP, CMOS_PORT, CMOS_PORT_LEN, COM1_IRQ,
    COM1_PORT, COM1_PORT_LEN, GED_EVENT_POWER_BUTTON, GED_IRQ, GED_PORT, I8042_COMMAND_PORT,
    I8042_DATA_PORT, I8042_KBD_IRQ, RTC_IRQ,
};

/// `Notify` value for a power-button press ("Device-specific: power button pressed").
const NOTIFY_POWER_BUTTON: u8 = 0x80;
/// UUID of the PCI host bridge `_OSC` (PCI Firmware Specification).
const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// `_OSC` CDW1 "unrecognized UUID" error bit.
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
/// `_OSC` CDW1 "unrecognized revision" error bit.
const OSC_UNRECOGNIZED_REVISION: u8 = 1 << 3;

/// A legacy "IRQNoFlags" small resource descriptor (edge triggered, active high, exclusive),
/// which acpi_tables does not provide.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource, type 0x4 (IRQ), length 2: a 16-bit mask of ISA IRQs.
        sink.byte(0x22);
        sink.word(1u16 << self.0);
    }
}

/// Builds the AML body of the DSDT (without the table header).
pub(super) fn dsdt_aml(cfg: &AcpiConfig) -> Vec<u8> {
    let mut aml = Vec::new();

    Name::new(
        Path::new("\\_S5_"),
        &Package::new(vec![&ACPI_S5_SLP_TYP, &ZERO, &ZERO, &ZERO]),
    )
    .to_aml_bytes(&mut aml);

    let pwrb = power_button();
    let ged = generic_event_device();
    let com1 = legacy_device("COM1", "PNP0501", &[(COM1_PORT, COM1_PORT_LEN)], COM1_IRQ);
    let rtc = legacy_device("RTC_", "PNP0B00", &[(CMOS_PORT, CMOS_PORT_LEN)], RTC_IRQ);
    let mut devices: Vec<Vec<u8>> = vec![pwrb, ged, com1, rtc];
    if cfg.i8042 {
        devices.push(legacy_device(
            "PS2K",
            "PNP0303",
            &[(I8042_DATA_PORT, 1), (I8042_COMMAND_PORT, 1)],
            I8042_KBD_IRQ,
        ));
    }
    devices.push(motherboard_resources(cfg.pci.as_ref()));
    if let Some(pci) = &cfg.pci {
        devices.push(pci_host_bridge(pci));
    }

    let children: Vec<RawAml> = devices.into_iter().map(RawAml).collect();
    let children: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut aml);
    aml
}

/// Already-encoded AML, so that devices can be built by separate functions.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn encode(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn power_button() -> Vec<u8> {
    encode(&Device::new(
        Path::new("PWRB"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C")),
            &Name::new(Path::new("_UID"), &ZERO),
        ],
    ))
}

fn generic_event_device() -> Vec<u8> {
    // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GED_IRQ }
    let irq = Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = ResourceTemplate::new(vec![&irq]);
    let region = OpRegion::new(Path::new("GDST"), OpRegionSpace::SystemIO, &GED_PORT, &ONE);
    let field = Field::new(
        Path::new("GDST"),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = Path::new("GDAT");
    let read = Store::new(&Local(0), &gdat);
    let pressed_bit = And::new(&ZERO, &Local(0), &GED_EVENT_POWER_BUTTON);
    let pressed = Equal::new(&pressed_bit, &GED_EVENT_POWER_BUTTON);
    let pwrb = Path::new("PWRB");
    let notify = Notify::new(&pwrb, &NOTIFY_POWER_BUTTON);
    let on_press = If::new(&pressed, vec![&notify]);
    let evt = Method::new(Path::new("_EVT"), 1, true, vec![&read, &on_press]);
    encode(&Device::new(
        Path::new("GED_"),
        vec![
            &Name::new(Path::new("_HID"), &"ACPI0013"),
            &Name::new(Path::new("_UID"), &ZERO),
            &Name::new(Path::new("_CRS"), &crs),
            &region,
            &field,
            &evt,
        ],
    ))
}

/// An ISA-style device: fixed I/O ranges and one legacy IRQ.
fn legacy_device(name: &str, hid: &str, ports: &[(u16, u16)], irq: u32) -> Vec<u8> {
    let ios: Vec<IO> = ports
        .iter()
        .map(|&(base, len)| IO::new(base, base, 1, len as u8))
        .collect();
    let irq = IrqNoFlags(irq as u8);
    let mut resources: Vec<&dyn Aml> = ios.iter().map(|io| io as &dyn Aml).collect();
    resources.push(&irq);
    let crs = ResourceTemplate::new(resources);
    encode(&Device::new(
        Path::new(name),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new(hid)),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ))
}

/// Motherboard resources (PNP0C02): ranges the OS must not hand out to PCI devices. Linux
/// also requires the ECAM area to be listed here (or in e820 with type-1 config access) before
/// it trusts the MCFG.
fn motherboard_resources(pci: Option<&PciHostConfig>) -> Vec<u8> {
    let pm = IO::new(
        ACPI_PM_BLOCK_START,
        ACPI_PM_BLOCK_START,
        1,
        ACPI_PM_BLOCK_LEN as u8,
    );
    let ecam = pci.map(|p| {
        let (base, len) = p.ecam_range();
        Memory32Fixed::new(true, base.0 as u32, len as u32)
    });
    let mut resources: Vec<&dyn Aml> = vec![&pm];
    if let Some(ecam) = &ecam {
        resources.push(ecam);
    }
    let crs = ResourceTemplate::new(resources);
    encode(&Device::new(
        Path::new("MBRD"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C02")),
            &Name::new(Path::new("_UID"), &ZERO),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ))
}

/// The PCI Express host bridge of segment `pci.segment`.
fn pci_host_bridge(pci: &PciHostConfig) -> Vec<u8> {
    let buses = AddressSpace::new_bus_number(u16::from(pci.bus_start), u16::from(pci.bus_end));
    let io = pci
        .io
        .map(|(base, size)| AddressSpace::new_io(base, base + (size - 1), None));
    let (m32_base, m32_size) = pci.mmio32;
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m32_base.0 as u32,
        (m32_base.0 + m32_size - 1) as u32,
        None,
    );
    let mmio64 = pci.mmio64.map(|(base, size)| {
        AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            base.0,
            base.0 + (size - 1),
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&buses];
    if let Some(io) = &io {
        resources.push(io);
    }
    resources.push(&mmio32);
    if let Some(mmio64) = &mmio64 {
        resources.push(mmio64);
    }
    let crs = ResourceTemplate::new(resources);

    // _OSC: grant every control the OS requests (returning Arg3 unchanged); flag unknown
    // UUIDs and revisions as the PCI Firmware Specification requires.
    let cdw1 = Path::new("CDW1");
    let create_cdw1 = CreateDWordField::new(&cdw1, &Arg(3), &ZERO);
    let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci_uuid = Equal::new(&Arg(0), &uuid);
    let bad_revision = NotEqual::new(&Arg(1), &ONE);
    let flag_revision = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let check_revision = If::new(&bad_revision, vec![&flag_revision]);
    let if_pci = If::new(&is_pci_uuid, vec![&check_revision]);
    let flag_uuid = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let else_other = Else::new(vec![&flag_uuid]);
    let ret = Return::new(&Arg(3));
    let osc = Method::new(
        Path::new("_OSC"),
        4,
        true,
        vec![&create_cdw1, &if_pci, &else_other, &ret],
    );

    let segment = u32::from(pci.segment);
    let bbn = u32::from(pci.bus_start);
    encode(&Device::new(
        Path::new("PCI0"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0A08")),
            &Name::new(Path::new("_CID"), &EISAName::new("PNP0A03")),
            &Name::new(Path::new("_SEG"), &segment),
            &Name::new(Path::new("_BBN"), &bbn),
            &Name::new(Path::new("_UID"), &segment),
            &Name::new(Path::new("_CRS"), &crs),
            &osc,
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn irq_no_flags_encoding() {
        assert_eq!(encode(&IrqNoFlags(4)), [0x22, 0x10, 0x00]);
        assert_eq!(encode(&IrqNoFlags(8)), [0x22, 0x00, 0x01]);
    }

    #[test]
    fn s5_package() {
        let aml = dsdt_aml(&AcpiConfig::new(1));
        // NameOp \_S5_ PackageOp len=7 count=4 BytePrefix 5 Zero Zero Zero
        let expected = [
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00,
        ];
        assert!(aml.starts_with(&expected), "{:02x?}", &aml[..16]);
    }

    #[test]
    fn devices_present() {
        let aml = dsdt_aml(&AcpiConfig::new(2));
        for name in [
            b"PWRB", b"GED_", b"COM1", b"RTC_", b"MBRD", b"_EVT", b"GDAT",
        ] {
            assert!(contains(&aml, name), "{}", String::from_utf8_lossy(name));
        }
        assert!(contains(&aml, b"ACPI0013\0"));
        assert!(!contains(&aml, b"PS2K"));
        assert!(!contains(&aml, b"PCI0"));
        // GED interrupt: extended IRQ descriptor, consumer|edge, GSI 5.
        assert!(contains(
            &aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0, 0, 0]
        ));
        // GED register: OperationRegion (GDST, SystemIO, 0x0608, One)
        assert!(contains(
            &aml,
            &[0x5b, 0x80, b'G', b'D', b'S', b'T', 0x01, 0x0b, 0x08, 0x06, 0x01]
        ));
        // COM1 resources: IO (Decode16, 0x3f8, 0x3f8, 1, 8), IRQNoFlags {4}
        assert!(contains(
            &aml,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00]
        ));
        // Notify (PWRB, 0x80)
        assert!(contains(&aml, &[0x86, b'P', b'W', b'R', b'B', 0x0a, 0x80]));
    }

    #[test]
    fn optional_devices() {
        let mut cfg = AcpiConfig::new(2);
        cfg.i8042 = true;
        cfg.pci = Some(PciHostConfig::new(1 << 30, 1 << 36));
        let aml = dsdt_aml(&cfg);
        assert!(contains(&aml, b"PS2K"));
        assert!(contains(&aml, b"PCI0"));
        assert!(contains(&aml, b"_OSC"));
        // ECAM reserved by MBRD: Memory32Fixed (ReadWrite, 0xe0000000, 0x10000000)
        assert!(contains(
            &aml,
            &[0x86, 0x09, 0x00, 0x01, 0, 0, 0, 0xe0, 0, 0, 0, 0x10]
        ));
    }
}
