//! The root bus (bus 0) with its host bridge at 00:00.0, and the two ways the guest reaches
//! configuration space: the type-1 mechanism on I/O ports 0xCF8 (address) / 0xCFC..0xCFF
//! (data), [`PciConfigIo`], and the memory-mapped ECAM window, [`PciConfigMmio`].
//!
//! Both access devices share one `Arc<Mutex<PciRoot>>`. A configuration write locks the root,
//! then the target device; BAR moves it causes are applied to the device and then reported to
//! the VMM's [`BarMoveHandler`] after the device lock is released.
//!
//! State ([`Persist`]): the root saves the host bridge's configuration space ([`PciRootState`]),
//! [`PciConfigIo`] its address register ([`PciConfigIoState`]). The devices in the slots save
//! themselves; the VMM plugs them back into the same slots.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::config::{PciConfiguration, PciConfigurationState, PciHeader};
use super::{BarMoveHandler, BarReprogram, PciBdf, PciDevice, PciError};
use crate::bus::BusDevice;
use crate::persist::{Persist, RestoreError};

/// First I/O port of the type-1 configuration mechanism.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Number of ports: the address register (0xCF8..0xCFB) and the data window (0xCFC..0xCFF).
pub const PCI_CONFIG_IO_LEN: u16 = 8;
/// Device numbers per bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Vendor id of the host bridge (Red Hat, as QEMU's generic PCIe host bridge).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// Device id of the host bridge (QEMU's generic PCIe host, which Linux has no quirks for).
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;

/// The host bridge function at 00:00.0: a header with class "host bridge" and no BARs.
#[derive(Debug)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    /// A host bridge header.
    pub fn new() -> Self {
        PciHostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision_id: 0,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                subsystem_vendor_id: HOST_BRIDGE_VENDOR_ID,
                subsystem_id: 0x1100,
            }),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl Persist for PciHostBridge {
    type State = PciConfigurationState;

    fn save(&self) -> PciConfigurationState {
        self.config.save()
    }

    fn restore(&mut self, state: &PciConfigurationState) -> Result<(), RestoreError> {
        self.config.restore(state)
    }
}

impl PciDevice for PciHostBridge {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }
    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogram> {
        self.config.write_reg(reg_idx, offset, data)
    }
}

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bus 0 of PCI segment 0: function 0 of up to 32 devices, device 0 being the host bridge.
pub struct PciRoot {
    devices: BTreeMap<u8, SharedPciDevice>,
    /// The same bridge as `devices[0]`, with its concrete type (for its state).
    host_bridge: Arc<Mutex<PciHostBridge>>,
    bar_handler: Option<Arc<dyn BarMoveHandler>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PciRoot {
    /// A root bus holding only the host bridge. `bar_handler` is told about BAR moves.
    pub fn new(bar_handler: Option<Arc<dyn BarMoveHandler>>) -> Self {
        let host_bridge = Arc::new(Mutex::new(PciHostBridge::new()));
        let mut devices: BTreeMap<u8, SharedPciDevice> = BTreeMap::new();
        devices.insert(0, host_bridge.clone());
        PciRoot {
            devices,
            host_bridge,
            bar_handler,
        }
    }

    /// Replaces the BAR move handler.
    pub fn set_bar_move_handler(&mut self, handler: Arc<dyn BarMoveHandler>) {
        self.bar_handler = Some(handler);
    }

    /// Adds `device` in the lowest free slot of bus 0 and returns its address.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<PciBdf, PciError> {
        let slot = (1..DEVICES_PER_BUS)
            .find(|d| !self.devices.contains_key(d))
            .ok_or(PciError::NoFreeSlot)?;
        self.devices.insert(slot, device);
        Ok(PciBdf::new(0, slot, 0))
    }

    /// Removes the device in `slot` (not the host bridge) and returns it.
    pub fn remove_device(&mut self, slot: u8) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        self.devices.remove(&slot)
    }

    fn device(&self, bus: u8, device: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(&device)
    }

    /// Reads register `reg_idx` of `bus:device.function`; all-ones when nothing is there.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, reg_idx: usize) -> u32 {
        match self.device(bus, device, function) {
            Some(d) => lock(d).read_config_register(reg_idx),
            None => 0xffff_ffff,
        }
    }

    /// Writes configuration space of `bus:device.function` and applies the BAR moves it causes.
    pub fn config_write(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) {
        let Some(dev) = self.device(bus, device, function) else {
            return;
        };
        let moves = {
            let mut d = lock(dev);
            let moves = d.write_config_register(reg_idx, offset, data);
            for mv in &moves {
                if let Err(e) = d.move_bar(mv.old_base, mv.new_base) {
                    log::warn!("pci: {bus:02x}:{device:02x}.{function} refused a BAR move: {e}");
                }
            }
            moves
        };
        let bdf = PciBdf::new(bus, device, function);
        for mv in &moves {
            match &self.bar_handler {
                Some(h) => {
                    if let Err(e) = h.bar_moved(bdf, mv) {
                        log::error!(
                            "pci: moving BAR {} of {bdf} from {:#x} to {:#x} failed: {e}",
                            mv.index,
                            mv.old_base,
                            mv.new_base
                        );
                    }
                }
                None => log::warn!("pci: BAR {} of {bdf} moved but nobody listens", mv.index),
            }
        }
    }
}

/// The saved state of a [`PciRoot`]: its host bridge (the devices in other slots save
/// themselves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    /// The host bridge's configuration space.
    pub host_bridge: PciConfigurationState,
}

impl Persist for PciRoot {
    type State = PciRootState;

    fn save(&self) -> PciRootState {
        PciRootState {
            host_bridge: lock(&self.host_bridge).save(),
        }
    }

    fn restore(&mut self, state: &PciRootState) -> Result<(), RestoreError> {
        lock(&self.host_bridge)
            .restore(&state.host_bridge)
            .map_err(|e| e.within("host_bridge"))
    }
}

/// Splits an access of `len` bytes at byte offset `offset` of configuration space into
/// (register, offset in register); `None` for sizes other than 1/2/4 or register-crossing access.
fn split_access(offset: u64, len: usize) -> Option<(usize, u64)> {
    if !matches!(len, 1 | 2 | 4) || (offset % 4) + len as u64 > 4 {
        return None;
    }
    Some((usize::try_from(offset / 4).ok()?, offset % 4))
}

fn extract(value: u32, byte_offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(byte_offset as usize + i).copied().unwrap_or(0xff);
    }
}

/// Type-1 configuration access through ports 0xCF8..0xCFF, for the PIO bus at
/// [`PCI_CONFIG_IO_PORT`] with length [`PCI_CONFIG_IO_LEN`].
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// Config-space ports over `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, device, function, register) selected by the address register, if enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (a >> 16) as u8;
        let device = ((a >> 11) & 0x1f) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        let reg = ((a >> 2) & 0x3f) as usize;
        Some((bus, device, function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0..=3 => extract(self.address, offset, data),
            4..=7 => {
                let byte = offset - 4;
                if !matches!(data.len(), 1 | 2 | 4) || byte + data.len() as u64 > 4 {
                    return;
                }
                if let Some((bus, dev, func, reg)) = self.target() {
                    let value = lock(&self.root).config_read(bus, dev, func, reg);
                    extract(value, byte, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only full 32-bit writes set the address; byte writes to 0xCFB etc. are the probes
            // of other mechanisms and are ignored, as on real chipsets.
            0 if data.len() == 4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(data);
                // Bits 1:0 are reserved and read as zero.
                self.address = u32::from_le_bytes(a) & !0x3;
            }
            4..=7 => {
                let byte = offset - 4;
                if !matches!(data.len(), 1 | 2 | 4) || byte + data.len() as u64 > 4 {
                    return;
                }
                if let Some((bus, dev, func, reg)) = self.target() {
                    lock(&self.root).config_write(bus, dev, func, reg, byte, data);
                }
            }
            _ => {}
        }
    }
}

/// The saved state of a [`PciConfigIo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    /// The address register at 0xCF8 (bits 1:0 are always clear).
    pub address: u32,
}

impl Persist for PciConfigIo {
    type State = PciConfigIoState;

    fn save(&self) -> PciConfigIoState {
        PciConfigIoState {
            address: self.address,
        }
    }

    fn restore(&mut self, state: &PciConfigIoState) -> Result<(), RestoreError> {
        if state.address & 0x3 != 0 {
            return Err(RestoreError::invalid(
                "address",
                format!("{:#010x} has reserved bits 1:0 set", state.address),
            ));
        }
        self.address = state.address;
        Ok(())
    }
}

/// ECAM (MMCONFIG) configuration access, for the MMIO bus at the ECAM base (segment 0, bus 0
/// at offset 0; 1 MiB per bus, 32 KiB per device, 4 KiB per function).
#[derive(Debug)]
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    /// ECAM window over `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn decode(offset: u64, len: usize) -> Option<(u8, u8, u8, usize, u64)> {
        let bus = u8::try_from(offset >> 20).ok()?;
        let device = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let (reg, byte) = split_access(offset & 0xfff, len)?;
        Some((bus, device, function, reg, byte))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some((bus, dev, func, reg, byte)) = Self::decode(offset, data.len()) {
            let value = lock(&self.root).config_read(bus, dev, func, reg);
            extract(value, byte, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, dev, func, reg, byte)) = Self::decode(offset, data.len()) {
            lock(&self.root).config_write(bus, dev, func, reg, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PciBarRegion, PciBarRegionType};
    use super::*;

    /// A device with one 32-bit BAR.
    struct TestDevice(PciConfiguration, Vec<(u64, u64)>);

    impl PciDevice for TestDevice {
        fn read_config_register(&mut self, reg_idx: usize) -> u32 {
            self.0.read_reg(reg_idx)
        }
        fn write_config_register(&mut self, r: usize, o: u64, d: &[u8]) -> Vec<BarReprogram> {
            self.0.write_reg(r, o, d)
        }
        fn move_bar(&mut self, old: u64, new: u64) -> Result<(), PciError> {
            self.1.push((old, new));
            Ok(())
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(PciBdf, BarReprogram)>>);
    impl BarMoveHandler for Recorder {
        fn bar_moved(&self, bdf: PciBdf, mv: &BarReprogram) -> std::io::Result<()> {
            self.0.lock().unwrap().push((bdf, *mv));
            Ok(())
        }
    }

    fn setup() -> (Arc<Mutex<PciRoot>>, Arc<Mutex<TestDevice>>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let root = Arc::new(Mutex::new(PciRoot::new(Some(rec.clone()))));
        let mut cfg = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: 1,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 2,
        });
        cfg.add_bar(&PciBarRegion {
            index: 0,
            base: 0xc000_0000,
            size: 0x1000,
            region_type: PciBarRegionType::Memory32,
            prefetchable: false,
        })
        .unwrap();
        let dev = Arc::new(Mutex::new(TestDevice(cfg, Vec::new())));
        let bdf = root.lock().unwrap().add_device(dev.clone()).unwrap();
        assert_eq!(bdf.to_string(), "00:01.0");
        (root, dev, rec)
    }

    fn io_read32(io: &mut PciConfigIo, bus: u32, dev: u32, reg: u32) -> u32 {
        io.write(
            0,
            &(0x8000_0000 | bus << 16 | dev << 11 | reg << 2).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn type1_enumeration() {
        let (root, _dev, _) = setup();
        let mut io = PciConfigIo::new(root);
        assert_eq!(io_read32(&mut io, 0, 0, 0), 0x0008_1b36);
        assert_eq!(io_read32(&mut io, 0, 0, 2) >> 16, 0x0600);
        assert_eq!(io_read32(&mut io, 0, 1, 0), 0x1042_1af4);
        // Empty slots, other buses and other functions read all-ones.
        assert_eq!(io_read32(&mut io, 0, 2, 0), 0xffff_ffff);
        assert_eq!(io_read32(&mut io, 1, 0, 0), 0xffff_ffff);
        io.write(0, &(0x8000_0100u32).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // The address register reads back; disabled addresses read all-ones.
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0100);
        io.write(0, &0x0000_0000u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Byte and word reads of the data window (device id high byte at 0xCFF).
        io.write(0, &(0x8000_0800u32).to_le_bytes());
        let mut b = [0u8; 1];
        io.read(7, &mut b);
        assert_eq!(b, [0x10]);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        // A byte write to 0xCFB does not change the address (Linux's type-1 probe).
        io.write(3, &[0x01]);
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0800);
        // Reads straddling the window are ignored (all-ones).
        io.read(6, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn ecam_enumeration_and_bar_move() {
        let (root, dev, rec) = setup();
        let mut ecam = PciConfigMmio::new(root);
        let mut d = [0u8; 4];
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        ecam.read(2 << 15, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read((1 << 20) | (1 << 15), &mut d);
        assert_eq!(d, [0xff; 4]);
        // Size BAR 0 through ECAM, then move it and enable decoding.
        let bar0 = (1 << 15) | 0x10;
        ecam.write(bar0, &[0xff; 4]);
        ecam.read(bar0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_f000);
        ecam.write(bar0, &0xd000_0000u32.to_le_bytes());
        assert!(rec.0.lock().unwrap().is_empty());
        ecam.write((1 << 15) | 0x4, &[0x02, 0x00]);
        let moves = rec.0.lock().unwrap().clone();
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].0, PciBdf::new(0, 1, 0));
        assert_eq!(moves[0].1.old_base, 0xc000_0000);
        assert_eq!(moves[0].1.new_base, 0xd000_0000);
        assert_eq!(dev.lock().unwrap().1, vec![(0xc000_0000, 0xd000_0000)]);
        // Bad sizes and straddling accesses are ignored.
        ecam.read(3, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut q = [0u8; 8];
        ecam.read(0, &mut q);
        assert_eq!(q, [0xff; 8]);
    }

    #[test]
    fn state_round_trip_of_root_and_config_ports() {
        let (root, _dev, _) = setup();
        let mut io = PciConfigIo::new(root.clone());
        // The guest programs the host bridge's command register and leaves an address selected.
        io.write(0, &0x8000_0004u32.to_le_bytes());
        io.write(4, &[0x07, 0x00]);
        io.write(0, &0x8000_0800u32.to_le_bytes());

        let (root2, _dev2, _) = setup();
        let mut io2 = PciConfigIo::new(root2.clone());
        crate::persist::assert_round_trip(&io, &mut io2);
        crate::persist::assert_round_trip(&*root.lock().unwrap(), &mut root2.lock().unwrap());
        // The selected address carries over: the data port reads device 1's id.
        let mut d = [0u8; 4];
        io2.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        assert_eq!(io_read32(&mut io2, 0, 0, 1) & 0xffff, 0x7);
        assert_eq!(io_read32(&mut io2, 0, 0, 0), 0x0008_1b36);

        assert!(io2
            .restore(&PciConfigIoState {
                address: 0x8000_0001
            })
            .is_err());
        let mut bad = root.lock().unwrap().save();
        bad.host_bridge.registers[0] = 0x1234_5678;
        let err = root2.lock().unwrap().restore(&bad).unwrap_err();
        assert!(err.to_string().starts_with("host_bridge: "), "{err}");
    }

    #[test]
    fn slots_fill_up() {
        let mut root = PciRoot::new(None);
        for i in 1..32u8 {
            let bdf = root
                .add_device(Arc::new(Mutex::new(PciHostBridge::new())))
                .unwrap();
            assert_eq!(bdf.device, i);
        }
        assert_eq!(
            root.add_device(Arc::new(Mutex::new(PciHostBridge::new())))
                .err(),
            Some(PciError::NoFreeSlot)
        );
        assert!(root.remove_device(0).is_none());
        assert!(root.remove_device(5).is_some());
        let bdf = root
            .add_device(Arc::new(Mutex::new(PciHostBridge::new())))
            .unwrap();
        assert_eq!(bdf.device, 5);
    }
}
