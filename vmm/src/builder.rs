//! The builder: turns a validated `VmConfig` into a running VM incarnation (memory, kernel,
//! initrd, ACPI tables, platform devices, vCPU threads). It is the one place where user
//! configuration becomes device constructor arguments.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;

use api::{DiskFormat, VmConfig};
use boot::acpi::AcpiConfig;
use boot::zeropage::BootParamsConfig;
use devices::block::ImageFormat;
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use std::sync::Mutex;
use virtio::block::Block;
use virtio::VirtioPciDevice;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::console::SerialBackend;
use crate::device_manager::{create_platform_devices, DeviceError, PlatformDevices, PowerEvents};
use crate::kvm::Hypervisor;
use crate::net::{IdentifiedDevice, NetBackends, NetSetupError, NicHandle};
use crate::pci::{create_pci, PciWiringError};
use crate::registry::{DeviceRegistry, RegistryError};
use crate::snapshot::cpu::{restore_vm, CpuStateError};
use crate::snapshot::memory::{map_private, MemoryError};
use crate::snapshot::{Loaded, SavedMemory};
use crate::vconsole::{AgentHandle, ConsoleBackends, VconsoleError};
use crate::vcpu::{Vcpu, VcpuControl, VcpuError, VcpuEvent, VcpuShared};
use crate::vm::{Vm, VmError};

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// VM or memory setup.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A boot file could not be opened.
    #[error("{field}: cannot open {path}: {source}")]
    Open {
        /// Config field.
        field: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel could not be loaded.
    #[error("boot.kernel: {0}")]
    Kernel(#[source] boot::loader::LoaderError),
    /// The initrd could not be loaded.
    #[error("boot.initrd: {0}")]
    Initrd(#[source] boot::loader::LoaderError),
    /// The command line does not fit.
    #[error("boot.cmdline: {0}")]
    Cmdline(#[source] boot::loader::LoaderError),
    /// The reset vector could not be written.
    #[error("cannot set up the reset vector: {0}")]
    ResetStub(#[source] boot::regs::RegsError),
    /// ACPI tables could not be written.
    #[error("cannot create the ACPI tables: {0}")]
    Acpi(#[source] boot::acpi::AcpiError),
    /// The zero page could not be written.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(#[source] boot::zeropage::ZeroPageError),
    /// Platform devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An EventFd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A disk image could not be opened.
    #[error("disks: disk `{id}`: {source}")]
    Disk {
        /// The disk's id.
        id: String,
        /// Why.
        source: devices::block::Error,
    },
    /// A virtio device could not be created.
    #[error("disks: disk `{id}`: {source}")]
    BlockDevice {
        /// The disk's id.
        id: String,
        /// Why.
        source: virtio::block::BlockError,
    },
    /// PCI wiring failed.
    #[error(transparent)]
    Pci(#[from] PciWiringError),
    /// Devices could not be registered, or did not take their saved state.
    #[error("cannot restore the VM: {0}")]
    Registry(#[from] RegistryError),
    /// The saved memory could not be mapped.
    #[error("cannot restore the VM: {0}")]
    Memory(#[from] MemoryError),
    /// The saved in-kernel VM state was refused.
    #[error("cannot restore the VM: {0}")]
    VmState(#[from] CpuStateError),
    /// A NIC's device could not be made.
    #[error(transparent)]
    Net(#[from] NetSetupError),
    /// The console's device could not be made.
    #[error(transparent)]
    Vconsole(#[from] VconsoleError),
}

impl BuildError {
    /// Whether the error comes from what the user gave (a saved state that does not fit or is
    /// malformed) rather than from the host: such errors end the VMM with status 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            BuildError::Registry(_)
                | BuildError::Pci(PciWiringError::Restore(_))
                | BuildError::Memory(_)
                | BuildError::VmState(_)
                | BuildError::Vcpu(VcpuError::Restore { .. })
                | BuildError::Net(_)
                | BuildError::Vconsole(_)
        )
    }
}

/// Opens every configured disk and wraps it in a virtio-blk device model, with its id.
fn open_disks(
    cfg: &VmConfig,
    stats: &[Arc<virtio::block::BlockStats>],
) -> Result<Vec<IdentifiedDevice>, BuildError> {
    let mut out: Vec<IdentifiedDevice> = Vec::with_capacity(cfg.disks.len());
    for (i, d) in cfg.disks.iter().enumerate() {
        let id = cfg.disk_id(i);
        let format = match d.format {
            DiskFormat::Raw => ImageFormat::Raw,
            DiskFormat::Qcow2 => ImageFormat::Qcow2,
        };
        let cache = match d.cache {
            api::CacheMode::Writeback => devices::block::CacheMode::Writeback,
            api::CacheMode::None => devices::block::CacheMode::None,
            api::CacheMode::Unsafe => devices::block::CacheMode::Unsafe,
        };
        let opts = devices::block::OpenOptions {
            read_only: d.read_only,
            backing: devices::block::BackingPolicy::strict(),
            cache,
            ..Default::default()
        };
        let image = devices::block::open(&d.path, Some(format), &opts).map_err(|source| {
            BuildError::Disk {
                id: id.clone(),
                source,
            }
        })?;
        let mut block =
            Block::new(image, d.serial.as_deref()).map_err(|source| BuildError::BlockDevice {
                id: id.clone(),
                source,
            })?;
        if let Some(s) = stats.get(i) {
            block = block.with_stats(s.clone());
        }
        out.push((id, Box::new(block)));
    }
    Ok(out)
}

/// A VM that is running: its vCPU threads, devices and the channels they report on.
pub struct RunningVm {
    /// Kept alive for the vCPUs' and devices' sake.
    pub vm: Vm,
    /// Platform devices.
    pub devices: PlatformDevices,
    /// virtio-pci devices, driven by the event loop.
    pub virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// Power-off / reset requests from devices.
    pub power: PowerEvents,
    /// vCPU run state.
    pub control: Arc<VcpuControl>,
    /// vCPU threads.
    pub threads: Vec<JoinHandle<()>>,
    /// Every device by id.
    pub registry: DeviceRegistry,
    /// vCPU exit reports.
    pub vcpu_events: Receiver<VcpuEvent>,
    /// Written with each vCPU exit report.
    pub vcpu_evt: Arc<EventFd>,
    /// The NICs, for the control plane.
    pub nics: Vec<NicHandle>,
    /// The built-in guest agent channel, if any.
    pub agent: Option<AgentHandle>,
    /// The balloon's control-plane half, if any.
    pub balloon: Option<Arc<virtio::balloon::BalloonShared>>,
}

/// The balloon's device id (its QOM path is /machine/peripheral/balloon0, as libvirt names it).
pub const BALLOON_ID: &str = "balloon0";

fn open(field: &'static str, path: &Path) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::Open {
        field,
        path: path.display().to_string(),
        source,
    })
}

/// The host ends of the devices, opened once per VMM process and used by every incarnation.
pub struct HostBackends<'a> {
    /// The serial console's.
    pub serial: &'a SerialBackend,
    /// The NICs' taps.
    pub nets: &'a NetBackends,
    /// The virtio console's and channels' (None without any).
    pub consoles: Option<&'a ConsoleBackends>,
    /// Each disk's I/O counters, in slot order (they outlive the devices).
    pub disk_stats: &'a [Arc<virtio::block::BlockStats>],
    /// The balloon's control-plane half and what it offers, if the VM has one.
    pub balloon: Option<(
        &'a Arc<virtio::balloon::BalloonShared>,
        virtio::balloon::BalloonOptions,
    )>,
}

/// Builds and starts one incarnation of the VM `cfg` describes, booting its kernel, or (with
/// `restore`) putting a saved state back; its vCPUs wait for a resume first when
/// `start_paused` is set.
pub fn build_vm(
    hv: &Hypervisor,
    cpuid: &CpuId,
    cfg: &VmConfig,
    host: &HostBackends<'_>,
    start_paused: bool,
    restore: Option<&Loaded>,
) -> Result<RunningVm, BuildError> {
    let memory_bytes = cfg.machine.memory_mib << 20;
    let taken = |what| BuildError::Memory(MemoryError::Map(format!("the {what} was used already")));
    // vCPUs created before their state arrived, by id.
    let mut early_vcpus: Vec<Option<VcpuFd>> = Vec::new();
    let mut vm = match restore.map(|l| &l.memory) {
        Some(SavedMemory::File { file, layout }) => {
            Vm::with_memory(hv, map_private(file, layout)?)?
        }
        Some(SavedMemory::Received(ram)) => Vm::with_ram(hv, ram.take().ok_or(taken("RAM"))?)?,
        Some(SavedMemory::Prebuilt(p)) => {
            let p = p.take().ok_or(taken("prebuilt VM"))?;
            early_vcpus = p.vcpus.into_iter().map(Some).collect();
            p.vm
        }
        None => Vm::new(hv, cfg.machine.memory_mib)?,
    };
    let mem = vm.memory();
    if let Some(l) = restore {
        restore_vm(vm.fd(), &l.state.vm)?;
    }

    // A restored VM's vCPUs (their local APICs) come back before any device runs: a device
    // that signals as soon as it is activated (vhost-net, through its irqfd) must not have its
    // interrupt overwritten by the restored APIC state.
    let restored_vcpus = match restore {
        Some(l) => Some(
            (0..cfg.machine.vcpus)
                .map(|id| match l.state.vcpus.get(usize::from(id)) {
                    Some(state) => {
                        let early = early_vcpus
                            .get_mut(usize::from(state.id))
                            .and_then(Option::take);
                        match early {
                            Some(fd) => Vcpu::restore_into(fd, state),
                            None => Vcpu::restore(vm.fd(), state),
                        }
                        .map_err(BuildError::from)
                    }
                    None => Err(RegistryError::Missing(format!("vcpu{id}")).into()),
                })
                .collect::<Result<Vec<_>, BuildError>>()?,
        ),
        None => None,
    };

    let power = PowerEvents::new()?;
    let devices = create_platform_devices(&vm, memory_bytes, host.serial.output(), &power)?;
    let mut registry = DeviceRegistry::new();
    devices.register(&mut registry)?;
    // PCI slot order: the disks, then the NICs, then the console.
    let mut virtio_devices = open_disks(cfg, host.disk_stats)?;
    virtio_devices.extend(host.nets.devices()?);
    if let Some(c) = host.consoles {
        virtio_devices.push(c.device()?);
    }
    if let Some((shared, options)) = host.balloon {
        let dev =
            virtio::balloon::Balloon::new(shared.clone(), options).map_err(BuildError::EventFd)?;
        virtio_devices.push((BALLOON_ID.to_string(), Box::new(dev)));
    }
    let saved = restore.map(|l| &l.state.devices);
    let pci = match virtio_devices.is_empty() {
        true => None,
        false => Some(create_pci(
            vm.fd(),
            mem,
            memory_bytes,
            &devices.pio,
            &devices.mmio,
            virtio_devices,
            saved,
        )?),
    };
    if let Some(p) = &pci {
        p.register(&mut registry)?;
    }
    if let Some(states) = saved {
        registry.check_ids(states)?;
        registry.restore_platform(states)?;
    }

    let entry = match restore {
        Some(_) => GuestAddress(0),
        None => boot_guest(cfg, mem, memory_bytes, pci.as_ref().map(|p| p.host))?,
    };

    let vcpus = match restored_vcpus {
        Some(v) => v,
        None => (0..cfg.machine.vcpus)
            .map(|id| {
                Vcpu::new(
                    vm.fd(),
                    mem,
                    cpuid,
                    hv.tsc_deadline(),
                    id,
                    cfg.machine.vcpus,
                    entry,
                )
            })
            .collect::<Result<Vec<_>, _>>()?,
    };

    if restore.is_some() {
        // A notification that arrived while the state was taken is replayed now that the
        // vCPUs its interrupts go to exist.
        for (_, dev) in registry.virtio() {
            crate::lock(dev).kick_queues();
        }
    }

    let control = Arc::new(VcpuControl::new(cfg.machine.vcpus, start_paused));
    let (tx, vcpu_events) = std::sync::mpsc::channel();
    let vcpu_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?);
    let shared = VcpuShared {
        pio: devices.pio.clone(),
        mmio: devices.mmio.clone(),
        control: control.clone(),
        events: tx,
        events_evt: vcpu_evt.clone(),
    };
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        match vcpu.start(shared.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                vm.stop_vcpus(&control, threads, crate::VCPU_STOP_TIMEOUT);
                return Err(e.into());
            }
        }
    }
    Ok(RunningVm {
        virtio: pci
            .map(|p| p.devices.into_iter().map(|(_, d)| d).collect())
            .unwrap_or_default(),
        registry,
        vm,
        devices,
        power,
        control,
        threads,
        vcpu_events,
        vcpu_evt,
        nics: host.nets.handles(),
        agent: host.consoles.and_then(ConsoleBackends::agent),
        balloon: host.balloon.map(|(s, _)| s.clone()),
    })
}

/// Loads the kernel, initrd and command line, and writes the reset stub, the ACPI tables and
/// the zero page: everything a fresh boot needs in guest memory. Returns the kernel entry.
fn boot_guest(
    cfg: &VmConfig,
    mem: &virtio::GuestMemoryMmap,
    memory_bytes: u64,
    pci: Option<boot::acpi::PciHostConfig>,
) -> Result<GuestAddress, BuildError> {
    // Validation made sure a kernel is configured.
    let kernel_path = cfg.boot.kernel.as_deref().unwrap_or(Path::new(""));
    let mut kernel_file = open("boot.kernel", kernel_path)?;
    let extracted = match cfg.boot.decompress_kernel {
        true => load_extracted_kernel(mem, kernel_path, &mut kernel_file),
        false => None,
    };
    let kernel = match extracted {
        Some(k) => k,
        None => boot::loader::load_kernel(mem, &mut kernel_file).map_err(BuildError::Kernel)?,
    };
    let initrd = match &cfg.boot.initrd {
        Some(path) => {
            let mut f = open("boot.initrd", path)?;
            Some(
                boot::loader::load_initrd(
                    mem,
                    &mut f,
                    kernel.kernel_end,
                    kernel.setup_header.as_ref(),
                )
                .map_err(BuildError::Initrd)?,
            )
        }
        None => None,
    };
    boot::regs::write_reset_stub(mem).map_err(BuildError::ResetStub)?;
    let cmdline = boot::loader::load_cmdline(mem, cfg.boot.cmdline(), kernel.setup_header.as_ref())
        .map_err(BuildError::Cmdline)?;
    let acpi = AcpiConfig {
        // The i8042 is there for `reboot=k`; describing it lets Linux use it too.
        i8042: true,
        pci,
        ..AcpiConfig::new(cfg.machine.vcpus)
    };
    let rsdp = boot::acpi::create_acpi_tables(mem, &acpi).map_err(BuildError::Acpi)?;
    boot::zeropage::configure_boot_params(
        mem,
        &BootParamsConfig {
            cmdline,
            initrd,
            setup_header: kernel.setup_header,
            rsdp_addr: Some(rsdp),
            mem_size: memory_bytes,
        },
    )
    .map_err(BuildError::BootParams)?;
    Ok(kernel.entry)
}

/// The fast way to boot a bzImage: its vmlinux, extracted on the host (or taken from the
/// [`crate::kernel_cache`]), loaded as ELF and entered at its 64-bit entry, so the guest skips
/// decompressing itself; the zero page still carries the bzImage's setup header.
///
/// `None` when `kernel` is not a bzImage, or (after one warning line saying why) when its
/// payload cannot be extracted or the result cannot be loaded: the caller then loads the file
/// as it is. A cached kernel that does not load is discarded and extracted afresh once.
fn load_extracted_kernel(
    mem: &virtio::GuestMemoryMmap,
    path: &Path,
    kernel: &mut File,
) -> Option<boot::loader::KernelInfo> {
    use crate::kernel_cache::{self, Extracted, KernelCache};

    // Not a bzImage, or a header the bzImage path refuses too (it reports that, without a
    // warning first): no extraction.
    let header = boot::loader::bzimage_header(kernel)
        .ok()
        .flatten()
        .filter(|h| boot::loader::check_bzimage_header(h).is_ok())?;
    let fall_back = |why: &dyn std::fmt::Display| {
        eprintln!(
            "vmm: {}: booting the bzImage as it is (the guest decompresses itself): {why}",
            path.display()
        );
        None
    };
    let cache = KernelCache::from_env();
    let loaded = match kernel_cache::extract(kernel, cache.as_ref()) {
        Ok(Extracted::Cache { mut file, key }) => {
            match boot::loader::load_extracted_vmlinux(mem, &mut file, header) {
                Ok(info) => return Some(info),
                Err(e) => {
                    eprintln!(
                        "vmm: {}: the cached kernel does not load ({e}); extracting it afresh",
                        path.display()
                    );
                    if let Some(c) = &cache {
                        c.discard(&key);
                    }
                }
            }
            match kernel_cache::extract(kernel, None) {
                Ok(Extracted::Decompressed(image)) => load_vmlinux_image(mem, image, header),
                Ok(Extracted::Cache { .. }) => unreachable!("no cache was given"),
                Err(e) => return fall_back(&e),
            }
        }
        Ok(Extracted::Decompressed(image)) => load_vmlinux_image(mem, image, header),
        Err(e) => return fall_back(&e),
    };
    match loaded {
        Ok(info) => Some(info),
        Err(e) => fall_back(&format_args!("the extracted vmlinux does not load: {e}")),
    }
}

fn load_vmlinux_image(
    mem: &virtio::GuestMemoryMmap,
    image: Vec<u8>,
    header: linux_loader::bootparam::setup_header,
) -> Result<boot::loader::KernelInfo, boot::loader::LoaderError> {
    boot::loader::load_extracted_vmlinux(mem, &mut std::io::Cursor::new(image), header)
}
