//! The VM configuration: the JSON schema of `vmm --config FILE`, the command-line overrides, and
//! the validation that turns user input into one clear error line naming the offending field.
//!
//! Every struct rejects unknown fields, so a typo in a config file is an error and never silently
//! ignored. Field names are snake_case.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod balloon;
mod console;
mod disk;
mod net;

pub use balloon::{BalloonConfig, MAX_STATS_INTERVAL_S};
pub use console::{ChannelConfig, AGENT_PORT_NAME, CHANNEL_NAME_MAX, MAX_CHANNELS};
pub use disk::{CacheMode, DiskConfig, DiskFormat, DISK_SERIAL_MAX};
pub use net::{parse_mac, NetConfig, RateLimiterConfig, TokenBucketConfig, NET_MAX_QUEUES};

/// Highest vCPU count the configuration accepts. APIC ids are 8-bit in our MADT, and 255 is the
/// broadcast id; KVM's own limit (`KVM_CAP_MAX_VCPUS`) is checked again when the VM is built.
pub const MAX_VCPUS: u8 = 254;

/// Smallest guest memory the configuration accepts, in MiB. A Linux kernel with a small
/// initramfs does not get to userspace with less.
pub const MIN_MEMORY_MIB: u64 = 32;

/// Largest guest memory the configuration accepts, in MiB (1 TiB): beyond the guest physical
/// address width we describe in CPUID on common hosts.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1";

/// The whole VM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs and memory.
    #[serde(default)]
    pub machine: MachineConfig,
    /// What to boot.
    #[serde(default)]
    pub boot: BootConfig,
    /// Where the 8250 serial port (COM1) is connected.
    #[serde(default)]
    pub serial: SerialConfig,
    /// What a guest reboot does.
    #[serde(default)]
    pub on_reboot: OnReboot,
    /// Unix socket path of the REST API.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// QMP monitor endpoints.
    #[serde(default)]
    pub qmp: Vec<QmpEndpoint>,
    /// virtio-blk disks, in PCI slot order (the first is vda).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards, in PCI slot order after the disks (the first is eth0).
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// The virtio console (port 0 of a virtio-console, `hvc0`): the serial port's modes.
    /// Absent or `off`: no virtio console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<SerialConfig>,
    /// Named virtio-console ports on unix sockets (in port order from 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<ChannelConfig>,
    /// The QEMU guest agent's port (`org.qemu.guest_agent.0`), with the VMM as its client
    /// (REST `PUT /vm/agent`, `vmm ctl agent`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent: bool,
    /// The memory balloon (virtio-balloon), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// How the VMM samples the VM's figures (`GET /vm/metrics`, `GET /metrics`).
    #[serde(default, skip_serializing_if = "MetricsConfig::is_default")]
    pub metrics: MetricsConfig,
}

/// The metrics sampler: rates are computed over the interval between the VMM's own samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Seconds between two samples (1..=3600); the guest agent is asked as often while someone
    /// reads the metrics.
    #[serde(default = "default_metrics_interval")]
    pub interval_s: u64,
}

fn default_metrics_interval() -> u64 {
    5
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            interval_s: default_metrics_interval(),
        }
    }
}

impl MetricsConfig {
    fn is_default(&self) -> bool {
        *self == MetricsConfig::default()
    }
}

/// Where a QMP monitor listens: `{"unix": "PATH"}` or `{"tcp": "HOST:PORT"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QmpEndpoint {
    /// A unix socket (created owner-only).
    Unix(PathBuf),
    /// A TCP listener, `HOST:PORT`.
    Tcp(String),
}

impl fmt::Display for QmpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpEndpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            QmpEndpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for QmpEndpoint {
    type Err = ConfigError;

    /// Parses the `--qmp` flag: `unix:PATH` or `tcp:HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let ep = match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => QmpEndpoint::Unix(p.into()),
            Some(("tcp", a)) => QmpEndpoint::Tcp(a.to_string()),
            _ => {
                return Err(ConfigError::Invalid {
                    field: "qmp",
                    reason: format!("`{s}` is not unix:PATH or tcp:HOST:PORT"),
                })
            }
        };
        ep.validate()?;
        Ok(ep)
    }
}

impl QmpEndpoint {
    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            QmpEndpoint::Unix(p) if p.as_os_str().is_empty() => Err(ConfigError::Invalid {
                field: "qmp",
                reason: "empty unix socket path".into(),
            }),
            QmpEndpoint::Tcp(a) => match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
                _ => Err(ConfigError::Invalid {
                    field: "qmp",
                    reason: format!("`{a}` is not HOST:PORT"),
                }),
            },
            QmpEndpoint::Unix(_) => Ok(()),
        }
    }
}

/// vCPU count and guest memory size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1..=MAX_VCPUS.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    256
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
        }
    }
}

/// Direct kernel boot: kernel image, optional initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// bzImage or ELF vmlinux. Required (from the file or `--kernel`).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio, optionally compressed).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `DEFAULT_CMDLINE` when absent.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Boot a bzImage through its extracted vmlinux (decompressed on the host, cached under
    /// `$XDG_CACHE_HOME/vmm/kernels/`) instead of letting the guest decompress itself, which
    /// reaches userspace faster. Default true; kernels that cannot be extracted boot as
    /// bzImage either way. `false` always boots the bzImage as it is.
    #[serde(default = "default_true")]
    pub decompress_kernel: bool,
}

fn default_true() -> bool {
    true
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            kernel: None,
            initrd: None,
            cmdline: None,
            decompress_kernel: true,
        }
    }
}

impl BootConfig {
    /// The command line the guest gets.
    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case", try_from = "RawSerialConfig")]
pub enum SerialConfig {
    /// Guest output to our stdout, our stdin to the guest (raw mode on a terminal).
    #[default]
    Stdio,
    /// Guest output appended to a file; no input.
    File {
        /// The file (created if missing).
        path: PathBuf,
    },
    /// A unix socket we listen on; one client at a time gets the console both ways.
    Socket {
        /// The socket path.
        path: PathBuf,
    },
    /// No serial port backend: output is dropped.
    Off,
}

/// The on-disk shape of `serial`, checked field by field before it becomes a `SerialConfig`
/// (serde's internally tagged enums would silently accept a `path` on `stdio`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSerialConfig {
    mode: SerialMode,
    #[serde(default)]
    path: Option<PathBuf>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum SerialMode {
    Stdio,
    File,
    Socket,
    Off,
}

impl TryFrom<RawSerialConfig> for SerialConfig {
    type Error = String;

    fn try_from(raw: RawSerialConfig) -> Result<Self, String> {
        match (raw.mode, raw.path) {
            (SerialMode::Stdio, None) => Ok(SerialConfig::Stdio),
            (SerialMode::Off, None) => Ok(SerialConfig::Off),
            (SerialMode::File, Some(path)) => Ok(SerialConfig::File { path }),
            (SerialMode::Socket, Some(path)) => Ok(SerialConfig::Socket { path }),
            (SerialMode::Stdio | SerialMode::Off, Some(_)) => {
                Err("`path` is only allowed with mode `file` or `socket`".into())
            }
            (SerialMode::File | SerialMode::Socket, None) => {
                Err("mode `file` and `socket` need a `path`".into())
            }
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => write!(f, "stdio"),
            SerialConfig::File { path } => write!(f, "file:{}", path.display()),
            SerialConfig::Socket { path } => write!(f, "socket:{}", path.display()),
            SerialConfig::Off => write!(f, "off"),
        }
    }
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;

    /// Parses the `--serial` flag: `stdio`, `off`, `file:PATH`, `socket:PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Invalid {
            field: "serial",
            reason: format!("`{s}` is not one of stdio, off, file:PATH, socket:PATH"),
        };
        match s.split_once(':') {
            None if s == "stdio" => Ok(SerialConfig::Stdio),
            None if s == "off" => Ok(SerialConfig::Off),
            Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File { path: p.into() }),
            Some(("socket", p)) if !p.is_empty() => Ok(SerialConfig::Socket { path: p.into() }),
            _ => Err(bad()),
        }
    }
}

/// What a guest-initiated reboot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnReboot {
    /// The VMM exits with status 0, as if the guest powered off.
    #[default]
    Exit,
    /// The VM is reset and boots again.
    Restart,
}

impl std::str::FromStr for OnReboot {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "exit" => Ok(OnReboot::Exit),
            "restart" => Ok(OnReboot::Restart),
            _ => Err(ConfigError::Invalid {
                field: "on_reboot",
                reason: format!("`{s}` is not one of exit, restart"),
            }),
        }
    }
}

/// Errors from reading or validating a configuration. Each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON is malformed, has an unknown field, or a value of the wrong type.
    #[error("config file {path}: {field}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Dotted path of the field at fault (`.` for the top level).
        field: String,
        /// serde's description, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{field}: {reason}")]
    Invalid {
        /// Dotted path of the field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The ids of the platform devices (the serial port, the i8042, the RTC, the ACPI blocks, the
/// PCI root): a user's device may not take one of them.
pub const RESERVED_DEVICE_IDS: &[&str] = &["com1", "i8042", "rtc", "acpi-pm", "ged", "pci-root"];

impl VmConfig {
    /// Parses a JSON document. `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<VmConfig, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: VmConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Parse {
                path: path.to_path_buf(),
                field,
                message: e.into_inner().to_string(),
            }
        })?;
        Ok(cfg)
    }

    /// Reads and parses a JSON config file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Checks value ranges and that the files named exist and are readable.
    ///
    /// `host_memory_mib` is the host's physical memory (None when unknown); a guest larger than
    /// that is refused here rather than failing later with an opaque mmap error.
    pub fn validate(&self, host_memory_mib: Option<u64>) -> Result<(), ConfigError> {
        self.validate_inner(host_memory_mib, true)
    }

    /// Like [`VmConfig::validate`] for a configuration that came with a saved VM state: the
    /// kernel and initrd are already in the saved memory, so their files need not exist (they
    /// are read again only if the restored guest reboots), and the disk images are checked by
    /// the restore itself, which says that a restored VM needs its images.
    pub fn validate_restored(&self, host_memory_mib: Option<u64>) -> Result<(), ConfigError> {
        self.validate_inner(host_memory_mib, false)
    }

    fn validate_inner(
        &self,
        host_memory_mib: Option<u64>,
        check_boot_files: bool,
    ) -> Result<(), ConfigError> {
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > MAX_VCPUS {
            return Err(ConfigError::Invalid {
                field: "machine.vcpus",
                reason: format!("{} is out of range (1..={MAX_VCPUS})", m.vcpus),
            });
        }
        if m.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::Invalid {
                field: "machine.memory_mib",
                reason: format!(
                    "{} MiB is too small: a Linux guest needs at least {MIN_MEMORY_MIB} MiB",
                    m.memory_mib
                ),
            });
        }
        let limit = host_memory_mib.map_or(MAX_MEMORY_MIB, |h| h.min(MAX_MEMORY_MIB));
        if m.memory_mib > limit {
            return Err(ConfigError::Invalid {
                field: "machine.memory_mib",
                reason: format!(
                    "{} MiB is larger than the host can map ({limit} MiB)",
                    m.memory_mib
                ),
            });
        }
        if check_boot_files {
            let kernel = self.boot.kernel.as_ref().ok_or(ConfigError::Invalid {
                field: "boot.kernel",
                reason: "no kernel given (set boot.kernel or pass --kernel)".into(),
            })?;
            check_readable_file("boot.kernel", kernel)?;
            if let Some(initrd) = &self.boot.initrd {
                check_readable_file("boot.initrd", initrd)?;
            }
        }
        if self.boot.cmdline().contains('\0') {
            return Err(ConfigError::Invalid {
                field: "boot.cmdline",
                reason: "contains a NUL byte".into(),
            });
        }
        if let SerialConfig::File { path } | SerialConfig::Socket { path } = &self.serial {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid {
                    field: "serial.path",
                    reason: "is empty".into(),
                });
            }
        }
        if let Some(p) = &self.api_socket {
            if p.as_os_str().is_empty() {
                return Err(ConfigError::Invalid {
                    field: "api_socket",
                    reason: "is empty".into(),
                });
            }
        }
        for ep in &self.qmp {
            ep.validate()?;
        }
        if !(1..=3600).contains(&self.metrics.interval_s) {
            return Err(ConfigError::Invalid {
                field: "metrics.interval_s",
                reason: format!("{} is out of range (1..=3600)", self.metrics.interval_s),
            });
        }
        if let Some(b) = &self.balloon {
            b.validate()?;
        }
        self.validate_disks(check_boot_files)?;
        self.validate_nets()?;
        self.validate_console()
    }

    /// The id of NIC `i`: its own, or `net<i>`.
    pub fn net_id(&self, i: usize) -> String {
        self.net[i].id.clone().unwrap_or_else(|| format!("net{i}"))
    }

    /// Gives every NIC without a MAC address one under QEMU's prefix 52:54:00, distinct from
    /// the others. Done once when the configuration is made, so the guest keeps its address
    /// across reboots, and a snapshot (which carries the configuration) across restores.
    pub fn assign_macs(&mut self) {
        let mut taken: Vec<[u8; 6]> = self
            .net
            .iter()
            .filter_map(|n| n.mac.as_deref().and_then(parse_mac))
            .collect();
        let mut seed = random_u64();
        for n in self.net.iter_mut().filter(|n| n.mac.is_none()) {
            let mac = loop {
                // splitmix64: a new candidate per try, from one random seed.
                seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = seed;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let b = z.to_le_bytes();
                let m = [0x52, 0x54, 0x00, b[0], b[1], b[2]];
                if !taken.contains(&m) {
                    break m;
                }
            };
            taken.push(mac);
            n.mac = Some(
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            );
        }
    }

    /// Checks each NIC, and that ids are unique among disks and NICs and MACs among NICs.
    fn validate_nets(&self) -> Result<(), ConfigError> {
        let mut ids: std::collections::HashSet<String> =
            (0..self.disks.len()).map(|i| self.disk_id(i)).collect();
        let mut macs = Vec::new();
        let mut taps = Vec::new();
        for (i, n) in self.net.iter().enumerate() {
            let id = self.net_id(i);
            let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
                field,
                reason: format!("NIC `{id}`: {reason}"),
            };
            if RESERVED_DEVICE_IDS.contains(&id.as_str()) {
                return Err(invalid(
                    "net.id",
                    "this id belongs to a platform device; choose another".into(),
                ));
            }
            if !ids.insert(id.clone()) {
                return Err(invalid(
                    "net.id",
                    "the id is already used by another disk or NIC".into(),
                ));
            }
            n.validate(&id)?;
            if let Some(m) = n.mac.as_deref().and_then(parse_mac) {
                if macs.contains(&m) {
                    return Err(invalid(
                        "net.mac",
                        "two NICs have the same MAC address".into(),
                    ));
                }
                macs.push(m);
            }
            if let Some(t) = &n.tap {
                if taps.contains(t) {
                    return Err(invalid(
                        "net.tap",
                        format!("tap `{t}` is given to two NICs"),
                    ));
                }
                taps.push(t.clone());
            }
        }
        Ok(())
    }

    /// The id of disk `i`: its own, or `disk<i>`.
    pub fn disk_id(&self, i: usize) -> String {
        self.disks[i]
            .id
            .clone()
            .unwrap_or_else(|| format!("disk{i}"))
    }

    /// Checks the disks' ids and serials, and (with `check_files`) that their images exist.
    fn validate_disks(&self, check_files: bool) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let id = self.disk_id(i);
            let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
                field,
                reason: format!("disk `{id}`: {reason}"),
            };
            if RESERVED_DEVICE_IDS.contains(&id.as_str()) {
                return Err(invalid(
                    "disks.id",
                    "this id belongs to a platform device; choose another".into(),
                ));
            }
            if !ids.insert(id.clone()) {
                return Err(invalid("disks.id", "the id is used twice".into()));
            }
            if let Some(serial) = &d.serial {
                if serial.len() > DISK_SERIAL_MAX {
                    return Err(invalid(
                        "disks.serial",
                        format!("`{serial}` is longer than {DISK_SERIAL_MAX} bytes"),
                    ));
                }
            }
            if !check_files {
                continue;
            }
            let meta = std::fs::metadata(&d.path).map_err(|e| {
                invalid(
                    "disks.path",
                    format!("cannot open {}: {e}", d.path.display()),
                )
            })?;
            if meta.is_dir() {
                return Err(invalid(
                    "disks.path",
                    format!("{} is a directory", d.path.display()),
                ));
            }
        }
        Ok(())
    }
}

fn check_readable_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { field, reason };
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(invalid(format!("{} is not a regular file", path.display())));
    }
    std::fs::File::open(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    Ok(())
}

/// 64 random bits from the kernel (getrandom(2)); the clock if it fails.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`, which is valid for writes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        return u64::from_le_bytes(b);
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
