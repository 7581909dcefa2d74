//! The running VM's devices, keyed by their stable ids: the user's id from the configuration
//! (disks), a fixed one for each platform device ([`api::config::RESERVED_DEVICE_IDS`]). State,
//! control actions and metrics find a device here, never by its position in a list.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::acpi_pm::{AcpiPmDevice, AcpiPmState};
use devices::cmos::{Cmos, CmosState};
use devices::ged::{Ged, GedState};
use devices::i8042::{I8042State, I8042};
use devices::persist::{Persist, RestoreError};
use devices::serial::{Serial, SerialState};
use serde::{Deserialize, Serialize};
use virtio::transport::VirtioPciState;
use virtio::VirtioPciDevice;

use crate::lock;
use crate::pci::{PciRootComplexState, PciSystemRoot};

/// Id of COM1.
pub const COM1: &str = "com1";
/// Id of the i8042 controller.
pub const I8042_ID: &str = "i8042";
/// Id of the CMOS RTC.
pub const RTC: &str = "rtc";
/// Id of the ACPI PM block.
pub const ACPI_PM: &str = "acpi-pm";
/// Id of the ACPI generic event device.
pub const GED: &str = "ged";
/// Id of the PCI root complex.
pub const PCI_ROOT: &str = "pci-root";

/// One registered device.
#[derive(Clone)]
pub enum Device {
    /// The 8250 UART.
    Serial(Arc<Mutex<Serial>>),
    /// The i8042 controller.
    I8042(Arc<Mutex<I8042>>),
    /// The CMOS RTC.
    Rtc(Arc<Mutex<Cmos>>),
    /// The ACPI PM block.
    AcpiPm(Arc<Mutex<AcpiPmDevice>>),
    /// The ACPI GED.
    Ged(Arc<Mutex<Ged>>),
    /// The PCI root complex and its config-space access ports.
    PciRoot(PciSystemRoot),
    /// A virtio device on PCI.
    Virtio(Arc<Mutex<VirtioPciDevice>>),
}

/// A device's saved state, tagged with its kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "state", rename_all = "kebab-case")]
pub enum DeviceState {
    /// The 8250 UART.
    Serial(SerialState),
    /// The i8042 controller.
    I8042(I8042State),
    /// The CMOS RTC.
    Rtc(CmosState),
    /// The ACPI PM block.
    AcpiPm(AcpiPmState),
    /// The ACPI GED.
    Ged(GedState),
    /// The PCI root complex.
    PciRoot(PciRootComplexState),
    /// A virtio device (transport and device parts).
    Virtio(Box<VirtioPciState>),
}

impl DeviceState {
    fn kind(&self) -> &'static str {
        match self {
            DeviceState::Serial(_) => "serial",
            DeviceState::I8042(_) => "i8042",
            DeviceState::Rtc(_) => "rtc",
            DeviceState::AcpiPm(_) => "acpi-pm",
            DeviceState::Ged(_) => "ged",
            DeviceState::PciRoot(_) => "pci-root",
            DeviceState::Virtio(_) => "virtio",
        }
    }
}

/// Errors registering or restoring devices.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Two devices want one id.
    #[error("two devices have the id `{0}`")]
    Duplicate(String),
    /// A device has no saved state.
    #[error("the saved state has no device `{0}`")]
    Missing(String),
    /// The saved state has a device this VM lacks.
    #[error("the saved state has a device `{0}` that this VM does not have")]
    Unknown(String),
    /// The saved state is of another kind of device.
    #[error("device `{id}`: the saved state is for a {found} device")]
    Kind {
        /// The device id.
        id: String,
        /// The kind the state is for.
        found: &'static str,
    },
    /// A device refused its state.
    #[error("device `{id}`: {source}")]
    Restore {
        /// The device id.
        id: String,
        /// Why.
        source: RestoreError,
    },
}

/// The VM's devices by id.
#[derive(Default, Clone)]
pub struct DeviceRegistry {
    devices: BTreeMap<String, Device>,
}

impl DeviceRegistry {
    /// An empty registry.
    pub fn new() -> DeviceRegistry {
        DeviceRegistry::default()
    }

    /// Adds a device under `id`.
    pub fn insert(&mut self, id: impl Into<String>, dev: Device) -> Result<(), RegistryError> {
        let id = id.into();
        if self.devices.contains_key(&id) {
            return Err(RegistryError::Duplicate(id));
        }
        self.devices.insert(id, dev);
        Ok(())
    }

    /// A device by id.
    pub fn get(&self, id: &str) -> Option<&Device> {
        self.devices.get(id)
    }

    /// The virtio devices, by id.
    pub fn virtio(&self) -> impl Iterator<Item = (&str, &Arc<Mutex<VirtioPciDevice>>)> {
        self.devices.iter().filter_map(|(id, d)| match d {
            Device::Virtio(v) => Some((id.as_str(), v)),
            _ => None,
        })
    }

    /// Every device's state, by id. The VM must be paused and its devices quiesced.
    pub fn save(&self) -> BTreeMap<String, DeviceState> {
        self.devices
            .iter()
            .map(|(id, d)| {
                let st = match d {
                    Device::Serial(x) => DeviceState::Serial(lock(x).save()),
                    Device::I8042(x) => DeviceState::I8042(lock(x).save()),
                    Device::Rtc(x) => DeviceState::Rtc(lock(x).save()),
                    Device::AcpiPm(x) => DeviceState::AcpiPm(lock(x).save()),
                    Device::Ged(x) => DeviceState::Ged(lock(x).save()),
                    Device::PciRoot(r) => DeviceState::PciRoot(r.save()),
                    Device::Virtio(x) => DeviceState::Virtio(Box::new(lock(x).save())),
                };
                (id.clone(), st)
            })
            .collect()
    }

    /// Checks that `states` has exactly this registry's ids, each of the right kind.
    pub fn check_ids(&self, states: &BTreeMap<String, DeviceState>) -> Result<(), RegistryError> {
        if let Some(id) = states.keys().find(|id| !self.devices.contains_key(*id)) {
            return Err(RegistryError::Unknown(id.clone()));
        }
        for (id, dev) in &self.devices {
            let st = states
                .get(id)
                .ok_or_else(|| RegistryError::Missing(id.clone()))?;
            let fits = matches!(
                (dev, st),
                (Device::Serial(_), DeviceState::Serial(_))
                    | (Device::I8042(_), DeviceState::I8042(_))
                    | (Device::Rtc(_), DeviceState::Rtc(_))
                    | (Device::AcpiPm(_), DeviceState::AcpiPm(_))
                    | (Device::Ged(_), DeviceState::Ged(_))
                    | (Device::PciRoot(_), DeviceState::PciRoot(_))
                    | (Device::Virtio(_), DeviceState::Virtio(_))
            );
            if !fits {
                return Err(RegistryError::Kind {
                    id: id.clone(),
                    found: st.kind(),
                });
            }
        }
        Ok(())
    }

    /// Restores every device but the virtio ones (restored as they are plugged, before their
    /// BARs are mapped) from `states`; [`DeviceRegistry::check_ids`] must have passed.
    pub fn restore_platform(
        &self,
        states: &BTreeMap<String, DeviceState>,
    ) -> Result<(), RegistryError> {
        for (id, dev) in &self.devices {
            let Some(st) = states.get(id) else {
                return Err(RegistryError::Missing(id.clone()));
            };
            let r = match (dev, st) {
                (Device::Serial(x), DeviceState::Serial(s)) => lock(x).restore(s),
                (Device::I8042(x), DeviceState::I8042(s)) => lock(x).restore(s),
                (Device::Rtc(x), DeviceState::Rtc(s)) => lock(x).restore(s),
                (Device::AcpiPm(x), DeviceState::AcpiPm(s)) => lock(x).restore(s),
                (Device::Ged(x), DeviceState::Ged(s)) => lock(x).restore(s),
                (Device::PciRoot(r), DeviceState::PciRoot(s)) => r.restore(s),
                (Device::Virtio(_), DeviceState::Virtio(_)) => Ok(()),
                _ => {
                    return Err(RegistryError::Kind {
                        id: id.clone(),
                        found: st.kind(),
                    })
                }
            };
            r.map_err(|source| RegistryError::Restore {
                id: id.clone(),
                source,
            })?;
        }
        Ok(())
    }
}
