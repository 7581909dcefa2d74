//! The device manager: creates the platform devices of one VM incarnation, places them on the
//! port-I/O bus at the addresses `boot::layout` describes (and the ACPI tables advertise), and
//! connects their interrupt lines to GSIs of the in-kernel irqchip through irqfds.

use std::io::Write;
use std::sync::{Arc, Mutex};

use boot::layout;
use devices::acpi_pm::AcpiPmDevice;
use devices::bus::{Bus, BusDevice, BusError};
use devices::cmos::Cmos;
use devices::ged::Ged;
use devices::i8042::I8042;
use devices::interrupt::EventFdLine;
use devices::serial::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::registry::{self, Device, DeviceRegistry, RegistryError};
use crate::vm::{Vm, VmError};

/// Errors creating the platform devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An EventFd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A device range clashes with another.
    #[error("cannot place {name} on the I/O bus: {source}")]
    Bus {
        /// Device name.
        name: &'static str,
        /// Why.
        source: BusError,
    },
    /// The RTC's update timer could not be set up.
    #[error("cannot set up the RTC: {0}")]
    Rtc(#[source] devices::cmos::CmosError),
    /// An interrupt could not be wired.
    #[error(transparent)]
    Irq(#[from] VmError),
}

/// EventFds through which platform devices ask the VMM to end or reset the VM.
pub struct PowerEvents {
    /// Written on guest power-off (ACPI S5).
    pub exit: EventFd,
    /// Written on a guest reset request (ACPI reset register, i8042 pulse).
    pub reset: EventFd,
}

impl PowerEvents {
    /// Creates the two (non-blocking) EventFds.
    pub fn new() -> Result<Self, DeviceError> {
        let new = || EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd);
        Ok(PowerEvents {
            exit: new()?,
            reset: new()?,
        })
    }
}

/// The platform devices of a VM and the buses they sit on.
pub struct PlatformDevices {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus (empty until PCI devices arrive).
    pub mmio: Arc<Bus>,
    /// COM1, shared with the console input subscriber.
    pub serial: Arc<Mutex<Serial>>,
    /// The ACPI generic event device, for power-button presses.
    pub ged: Arc<Mutex<Ged>>,
    /// The RTC, whose update timer the event loop drives.
    pub cmos: Arc<Mutex<Cmos>>,
    /// The i8042 controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI PM block.
    pub acpi_pm: Arc<Mutex<AcpiPmDevice>>,
}

impl PlatformDevices {
    /// Registers every platform device under its fixed id.
    pub fn register(&self, registry: &mut DeviceRegistry) -> Result<(), RegistryError> {
        registry.insert(registry::COM1, Device::Serial(self.serial.clone()))?;
        registry.insert(registry::I8042_ID, Device::I8042(self.i8042.clone()))?;
        registry.insert(registry::RTC, Device::Rtc(self.cmos.clone()))?;
        registry.insert(registry::ACPI_PM, Device::AcpiPm(self.acpi_pm.clone()))?;
        registry.insert(registry::GED, Device::Ged(self.ged.clone()))
    }
}

/// Builds COM1, the i8042, CMOS, the ACPI PM block and the GED for `vm`.
pub fn create_platform_devices(
    vm: &Vm,
    memory_bytes: u64,
    serial_out: Box<dyn Write + Send>,
    power: &PowerEvents,
) -> Result<PlatformDevices, DeviceError> {
    let pio = Bus::new();
    let clone = |e: &EventFd| e.try_clone().map_err(DeviceError::EventFd);

    let serial_irq = irq_line(vm, layout::COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
    insert(&pio, "COM1", serial.clone(), layout::COM1_PORT, 8)?;

    let mut i8042 = I8042::new(clone(&power.reset)?);
    i8042.set_kbd_interrupt(irq_line(vm, layout::I8042_KBD_IRQ)?);
    let i8042 = Arc::new(Mutex::new(i8042));
    insert(
        &pio,
        "the i8042 controller",
        i8042.clone(),
        layout::I8042_DATA_PORT,
        5,
    )?;

    let below_4g = memory_bytes.min(layout::MMIO_HOLE_START.0);
    let mut cmos = Cmos::new(below_4g, memory_bytes - below_4g);
    cmos.enable_interrupts(irq_line(vm, layout::RTC_IRQ)?)
        .map_err(DeviceError::Rtc)?;
    let cmos = Arc::new(Mutex::new(cmos));
    insert(&pio, "the CMOS RTC", cmos.clone(), layout::CMOS_PORT, 2)?;

    let pm = Arc::new(Mutex::new(AcpiPmDevice::new(
        clone(&power.exit)?,
        clone(&power.reset)?,
    )));
    insert(
        &pio,
        "the ACPI PM block",
        pm.clone(),
        u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
        3,
    )?;

    let ged_irq = irq_line(vm, layout::GED_IRQ)?;
    let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
    insert(
        &pio,
        "the ACPI GED",
        ged.clone(),
        u64::from(layout::GED_PORT),
        1,
    )?;

    Ok(PlatformDevices {
        pio: Arc::new(pio),
        mmio: Arc::new(Bus::new()),
        serial,
        ged,
        cmos,
        i8042,
        acpi_pm: pm,
    })
}

fn irq_line(vm: &Vm, gsi: u32) -> Result<Arc<EventFdLine>, DeviceError> {
    let line = EventFdLine::new().map_err(DeviceError::EventFd)?;
    vm.register_irqfd(line.eventfd(), gsi)?;
    Ok(Arc::new(line))
}

fn insert<D: BusDevice + 'static>(
    bus: &Bus,
    name: &'static str,
    dev: Arc<Mutex<D>>,
    base: impl Into<u64>,
    len: u64,
) -> Result<(), DeviceError> {
    bus.insert(dev, base.into(), len)
        .map_err(|source| DeviceError::Bus { name, source })
}
