//! PCI wiring for one VM incarnation: the root complex on the buses, virtio-pci devices with
//! their BARs placed in the MMIO hole, one KVM ioeventfd per virtio queue, and MSI-X vectors
//! delivered through irqfds on GSIs that this module routes with `KVM_SET_GSI_ROUTING`.
//!
//! Only this module (with `vm`) talks to KVM for PCI: devices see an `MsiInterruptGroup` and a
//! `BarMoveHandler`, never the VmFd.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, Weak};

use boot::acpi::PciHostConfig;
use boot::layout;
use devices::bus::Bus;
use devices::pci::{
    BarMoveHandler, BarReprogram, MsiInterruptGroup, MsiMessage, PciBarAllocator, PciBdf,
    PciConfigIo, PciConfigMmio, PciDevice, PciError, PciRoot,
};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio::transport::VirtioPciDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::lock;
use crate::registry::{self, Device, DeviceRegistry, DeviceState, RegistryError};
use devices::pci::{PciConfigIoState, PciRootState};
use devices::persist::{Persist, RestoreError};

/// GSIs below this belong to the IOAPIC pins; MSI vectors get the ones above.
const FIRST_MSI_GSI: u32 = 24;
/// Number of IOAPIC pins (GSIs routed to the in-kernel irqchip).
const IOAPIC_PINS: u32 = 24;

/// Errors wiring PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciWiringError {
    /// The root complex or allocator refused.
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    /// A bus range clashed.
    #[error("PCI: cannot map a BAR: {0}")]
    Bus(#[from] devices::bus::BusError),
    /// A KVM or eventfd call failed.
    #[error("PCI: {what}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The virtio transport refused the device.
    #[error("PCI: {0}")]
    Virtio(#[from] virtio::transport::VirtioPciError),
    /// The KVM GSI space is exhausted.
    #[error("PCI: out of interrupt GSIs")]
    OutOfGsis,
    /// A device did not take its saved state.
    #[error("cannot restore the VM: {0}")]
    Restore(#[source] RegistryError),
}

fn kvm_io(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> PciWiringError {
    move |e| PciWiringError::Io {
        what,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// The VM's GSI routing table: the default irqchip routes plus one MSI route per vector.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
    max_gsi: u32,
}

impl GsiRouter {
    /// A router for `vm`, whose in-kernel irqchip exists already.
    pub fn new(vm: Arc<VmFd>, max_gsi: u32) -> GsiRouter {
        GsiRouter {
            vm,
            msi: BTreeMap::new(),
            next_gsi: FIRST_MSI_GSI,
            max_gsi,
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        let gsi = self.next_gsi;
        if gsi >= self.max_gsi {
            return None;
        }
        self.next_gsi += 1;
        Some(gsi)
    }

    /// Points `gsi` at the MSI message `msg` and pushes the whole table to KVM.
    fn set_msi(&mut self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        self.msi.insert(gsi, msg);
        self.commit()
    }

    fn commit(&self) -> io::Result<()> {
        let mut entries = Vec::with_capacity(IOAPIC_PINS as usize + 16 + self.msi.len());
        for pin in 0..IOAPIC_PINS {
            let mut e = kvm_irq_routing_entry {
                gsi: pin,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = pin;
            entries.push(e);
            // KVM's default table also routes the 16 legacy GSIs to the PICs; keep it so.
            if pin < 16 {
                let mut p = e;
                p.u.irqchip.irqchip = if pin < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                p.u.irqchip.pin = pin % 8;
                entries.push(p);
            }
        }
        for (&gsi, msg) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// MSI-X vectors of one device: each is a GSI with an irqfd. An irqfd is attached to KVM only
/// while its vector is unmasked: a backend that writes it directly (vhost-net) is then held
/// back while the guest masks the vector, and the signal it left in the EventFd is delivered
/// when the irqfd is attached again (KVM injects at once for a signalled EventFd).
struct KvmMsiGroup {
    router: Arc<Mutex<GsiRouter>>,
    vm: Arc<VmFd>,
    vectors: Vec<(u32, EventFd)>,
    attached: Mutex<Vec<bool>>,
}

impl KvmMsiGroup {
    fn new(
        router: &Arc<Mutex<GsiRouter>>,
        vm: &Arc<VmFd>,
        count: u16,
    ) -> Result<KvmMsiGroup, PciWiringError> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let gsi = lock(router).allocate().ok_or(PciWiringError::OutOfGsis)?;
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| PciWiringError::Io {
                what: "eventfd",
                source,
            })?;
            vm.register_irqfd(&evt, gsi)
                .map_err(kvm_io("cannot register an MSI irqfd"))?;
            vectors.push((gsi, evt));
        }
        Ok(KvmMsiGroup {
            router: router.clone(),
            vm: vm.clone(),
            attached: Mutex::new(vec![true; vectors.len()]),
            vectors,
        })
    }

    fn vector(&self, v: u16) -> io::Result<&(u32, EventFd)> {
        self.vectors
            .get(usize::from(v))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl MsiInterruptGroup for KvmMsiGroup {
    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
        let (gsi, evt) = self.vector(vector)?;
        lock(&self.router).set_msi(*gsi, msg)?;
        // Attached again after the route is right: a held signal goes to the new message.
        let mut attached = lock(&self.attached);
        let slot = &mut attached[usize::from(vector)];
        let errno = |e: kvm_ioctls::Error| io::Error::from_raw_os_error(e.errno());
        if masked && *slot {
            self.vm.unregister_irqfd(evt, *gsi).map_err(errno)?;
            *slot = false;
        } else if !masked && !*slot {
            self.vm.register_irqfd(evt, *gsi).map_err(errno)?;
            *slot = true;
        }
        Ok(())
    }

    fn irqfd(&self, vector: u16) -> Option<EventFd> {
        self.vector(vector).ok()?.1.try_clone().ok()
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.vector(vector)?.1.write(1)
    }
}

/// Moves a BAR's bus mapping and ioeventfds when the guest reprograms it.
struct BarMover {
    mmio: Weak<Bus>,
    vm: Arc<VmFd>,
    devices: Mutex<HashMap<PciBdf, Arc<Mutex<VirtioPciDevice>>>>,
}

impl BarMoveHandler for BarMover {
    fn bar_moved(&self, bdf: PciBdf, mv: &BarReprogram) -> io::Result<()> {
        let Some(dev) = lock(&self.devices).get(&bdf).cloned() else {
            return Ok(());
        };
        let Some(mmio) = self.mmio.upgrade() else {
            return Ok(());
        };
        let errno = |e: kvm_ioctls::Error| io::Error::from_raw_os_error(e.errno());
        mmio.remove(mv.old_base)
            .map_err(|e| io::Error::other(e.to_string()))?;
        mmio.insert(dev.clone(), mv.new_base, mv.len)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let dev = lock(&dev);
        for (addr, _, evt) in dev.ioeventfds(mv.old_base) {
            self.vm
                .unregister_ioevent(evt, &IoEventAddress::Mmio(addr.0), NoDatamatch)
                .map_err(errno)?;
        }
        for (addr, _, evt) in dev.ioeventfds(mv.new_base) {
            self.vm
                .register_ioevent(evt, &IoEventAddress::Mmio(addr.0), NoDatamatch)
                .map_err(errno)?;
        }
        Ok(())
    }
}

/// The PCI side of a VM incarnation.
pub struct PciSystem {
    /// The virtio-pci devices by id, to be driven by the event loop.
    pub devices: Vec<(String, Arc<Mutex<VirtioPciDevice>>)>,
    /// The root complex.
    pub root: PciSystemRoot,
    /// What the ACPI tables must describe.
    pub host: PciHostConfig,
}

impl PciSystem {
    /// Registers the root complex and every virtio device under its id.
    pub fn register(&self, registry: &mut DeviceRegistry) -> Result<(), RegistryError> {
        registry.insert(registry::PCI_ROOT, Device::PciRoot(self.root.clone()))?;
        for (id, dev) in &self.devices {
            registry.insert(id.clone(), Device::Virtio(dev.clone()))?;
        }
        Ok(())
    }
}

/// The root complex and the port-I/O configuration mechanism in front of it.
#[derive(Clone)]
pub struct PciSystemRoot {
    root: Arc<Mutex<PciRoot>>,
    config_io: Arc<Mutex<PciConfigIo>>,
}

/// The saved state of the root complex.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciRootComplexState {
    /// The host bridge.
    pub root: PciRootState,
    /// The 0xCF8 address register.
    pub config_io: PciConfigIoState,
}

impl PciSystemRoot {
    /// The root's state.
    pub fn save(&self) -> PciRootComplexState {
        PciRootComplexState {
            root: lock(&self.root).save(),
            config_io: lock(&self.config_io).save(),
        }
    }

    /// Puts a saved state back.
    pub fn restore(&self, state: &PciRootComplexState) -> Result<(), RestoreError> {
        lock(&self.root)
            .restore(&state.root)
            .map_err(|e| e.within("root"))?;
        lock(&self.config_io)
            .restore(&state.config_io)
            .map_err(|e| e.within("config_io"))
    }
}

/// Puts the root complex on the buses and plugs each virtio device into it. With `saved`
/// (a restore), each virtio device takes its saved state, found by id, before its BARs are
/// mapped where the state says.
pub fn create_pci(
    vm: &Arc<VmFd>,
    mem: &virtio::GuestMemoryMmap,
    memory_bytes: u64,
    pio: &Bus,
    mmio: &Arc<Bus>,
    virtio_devices: Vec<(String, Box<dyn virtio::VirtioDevice>)>,
    saved: Option<&BTreeMap<String, DeviceState>>,
) -> Result<PciSystem, PciWiringError> {
    let host = PciHostConfig::new(memory_bytes, 1 << 36);
    let mover = Arc::new(BarMover {
        mmio: Arc::downgrade(mmio),
        vm: vm.clone(),
        devices: Mutex::new(HashMap::new()),
    });
    let root = Arc::new(Mutex::new(PciRoot::new(Some(mover.clone()))));
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    pio.insert(
        config_io.clone(),
        u64::from(devices::pci::root::PCI_CONFIG_IO_PORT),
        u64::from(devices::pci::root::PCI_CONFIG_IO_LEN),
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        layout::PCI_ECAM_START.0,
        layout::PCI_ECAM_SIZE,
    )?;
    let mut alloc = PciBarAllocator::new(
        (layout::PCI_MMIO32_START.0, layout::PCI_MMIO32_SIZE),
        host.mmio64.map(|(base, size)| (base.0, size)),
    )?;
    let router = Arc::new(Mutex::new(GsiRouter::new(vm.clone(), 1024)));
    let mut out = Vec::with_capacity(virtio_devices.len());
    for (id, device) in virtio_devices {
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX);
        let msi = Arc::new(KvmMsiGroup::new(&router, vm, vectors)?);
        let dev = Arc::new(Mutex::new(VirtioPciDevice::new(device, mem.clone(), msi)?));
        lock(&dev).allocate_bars(&mut alloc)?;
        if let Some(states) = saved {
            let state = match states.get(&id) {
                Some(DeviceState::Virtio(st)) => st,
                Some(_) | None => return Err(PciWiringError::Restore(RegistryError::Missing(id))),
            };
            lock(&dev).restore(state).map_err(|source| {
                PciWiringError::Restore(RegistryError::Restore {
                    id: id.clone(),
                    source,
                })
            })?;
        }
        let bars = lock(&dev).bar_regions();
        for bar in &bars {
            mmio.insert(dev.clone(), bar.base, bar.size)?;
            for (addr, _, evt) in lock(&dev).ioeventfds(bar.base) {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(addr.0), NoDatamatch)
                    .map_err(kvm_io("cannot register a queue ioeventfd"))?;
            }
        }
        let bdf = lock(&root).add_device(dev.clone())?;
        lock(&mover.devices).insert(bdf, dev.clone());
        out.push((id, dev));
    }
    Ok(PciSystem {
        devices: out,
        root: PciSystemRoot { root, config_io },
        host,
    })
}
