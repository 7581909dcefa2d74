//! The command line: `vmm --config FILE` plus flags that override the file, for quick use
//! without one. Flags and file are merged into one `VmConfig`, then validated.

use std::path::PathBuf;

use api::{
    ChannelConfig, ConfigError, DiskConfig, NetConfig, OnReboot, QmpEndpoint, SerialConfig,
    VmConfig,
};
use clap::Parser;

/// A KVM virtual machine monitor for small Linux VMs.
///
/// Boots a Linux kernel directly (bzImage or ELF vmlinux, with an optional initrd) with a serial
/// console. Settings come from a JSON file (--config) and/or the flags below; flags win.
///
/// Example: vmm --kernel vmlinuz --initrd initrd.gz --cpus 2 --memory 256
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about,
    long_about,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A tool instead of running a VM (`vmm ctl ...`, `vmm img ...`).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// JSON configuration file (see resources/examples/).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Kernel image to boot (bzImage or ELF vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    pub cmdline: Option<String>,

    /// Boot a bzImage as it is, letting the guest decompress itself, instead of through its
    /// vmlinux extracted (and cached) on the host ("boot": {"decompress_kernel": false}).
    #[arg(long)]
    pub no_decompress: bool,

    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u8>,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,

    /// Serial console: stdio, off, file:PATH or socket:PATH.
    #[arg(long, value_name = "MODE")]
    pub serial: Option<SerialConfig>,

    /// The virtio console (the guest's hvc0): stdio, off, file:PATH or socket:PATH
    /// ("console": {"mode": ...}). stdio needs the serial port elsewhere (--serial off).
    #[arg(long, value_name = "MODE")]
    pub console: Option<SerialConfig>,

    /// Add a named virtio-console port on a unix socket we listen on (repeatable; adds to the
    /// file's): name=NAME,socket=PATH[,id=ID]. The guest sees /dev/virtio-ports/NAME.
    #[arg(long, value_name = "SPEC")]
    pub channel: Vec<ChannelConfig>,

    /// Give the guest the QEMU guest agent's port (org.qemu.guest_agent.0) with the VMM as
    /// its client ("agent": true): `vmm ctl agent`, REST `PUT /vm/agent`.
    #[arg(long)]
    pub agent: bool,

    /// Add a memory balloon (virtio-balloon): on, or
    /// deflate_on_oom=on,free_page_reporting=on,stats_interval_s=2 ("balloon": {...}).
    #[arg(long, value_name = "SPEC")]
    pub balloon: Option<api::BalloonConfig>,

    /// What a guest reboot does: exit (the default) or restart.
    #[arg(long, value_name = "ACTION")]
    pub on_reboot: Option<OnReboot>,

    /// Serve the REST API on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Serve a QMP monitor: unix:PATH or tcp:HOST:PORT (repeatable; adds to the file's).
    #[arg(long, value_name = "ENDPOINT")]
    pub qmp: Vec<QmpEndpoint>,

    /// Add a virtio-blk disk (repeatable; adds to the file's):
    /// path=P[,format=raw|qcow2][,readonly=on][,cache=writeback|none|unsafe][,serial=S][,id=I]
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<DiskConfig>,

    /// Add a virtio-net card on a host tap (repeatable; adds to the file's):
    /// [tap=NAME][,mac=MAC][,queues=N][,mtu=N][,script=PATH|no][,downscript=PATH|no][,id=I]
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<NetConfig>,

    /// Restore a saved VM instead of booting one: tcp:HOST:PORT or unix:PATH to receive a
    /// live migration (QEMU's `-incoming tcp:0:4444`), file:PATH (a state file written by QMP
    /// `migrate "file:PATH"` or `PUT /vm/snapshot`), or `defer` to wait for QMP
    /// `migrate-incoming` / `PUT /vm/restore`. The VM's configuration comes from the state;
    /// pass only --qmp, --api-socket, --serial and --on-reboot (anything else must agree).
    #[arg(long, value_name = "URI")]
    pub incoming: Option<Incoming>,

    /// Keep the vCPUs stopped after the VM is built or restored, until a QMP `cont` or
    /// `PUT /vm/resume` (QEMU's -S).
    #[arg(long, short = 'S')]
    pub paused: bool,

    /// Log records at this level and above: error, warn (the default), info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = parse_log_level)]
    pub log_level: log::LevelFilter,

    /// Append log lines to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
}

fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a log level (off, error, warn, info, debug, trace)"))
}

/// Where an incoming VM state comes from (`--incoming`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A state file.
    File(PathBuf),
    /// Wait for the control plane to name one.
    Defer,
    /// Receive a live migration there.
    Listen(api::MigrationAddress),
}

impl std::str::FromStr for Incoming {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "defer" {
            return Ok(Incoming::Defer);
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() || path.contains(",offset=") {
                return Err(format!("'{s}': expected file:PATH"));
            }
            return Ok(Incoming::File(PathBuf::from(path)));
        }
        if let Some(addr) = api::MigrationAddress::parse(s) {
            return addr
                .map(Incoming::Listen)
                .map_err(|e| format!("'{s}': {e}"));
        }
        let scheme = s.split(':').next().unwrap_or(s);
        if ["exec", "fd", "rdma", "vsock"].contains(&scheme) {
            return Err(format!(
                "'{s}': incoming migration over {scheme}: is not supported; \
                 use tcp:HOST:PORT, unix:PATH, file:PATH or defer"
            ));
        }
        Err(format!(
            "'{s}': expected tcp:HOST:PORT, unix:PATH, file:PATH or defer"
        ))
    }
}

/// What the user said about the machine beside `--incoming`: each part given must agree with
/// the saved VM's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// vCPUs, from the config file or --cpus.
    pub vcpus: Option<u8>,
    /// Memory, from the config file or --memory.
    pub memory_mib: Option<u64>,
    /// Disks, from the config file and --disk.
    pub disks: Option<Vec<DiskConfig>>,
    /// NICs, from the config file and --net: what the guest sees must agree; the host side
    /// (tap, vhost, scripts, rate limits) is this process's, as QEMU's destination takes its
    /// own -netdev (a migration within one host needs another tap).
    pub nets: Option<Vec<NetConfig>>,
}

/// What to run: a VM to boot, or one to restore.
#[derive(Debug)]
pub struct Launch {
    /// The configuration to boot, or (when restoring) the front doors of this process:
    /// serial, api_socket, qmp, on_reboot.
    pub config: VmConfig,
    /// Where the state comes from, when restoring.
    pub incoming: Option<Incoming>,
    /// What the user said about the machine beside --incoming.
    pub constraints: Constraints,
    /// Keep the vCPUs stopped until resumed.
    pub paused: bool,
    /// --on-reboot was given (it then overrides the saved VM's).
    pub on_reboot_given: bool,
}

/// Subcommands: tools that do not run a VM.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Control a running VMM through its API socket.
    Ctl(crate::ctl::CtlArgs),
    /// Disk image tool with qemu-img's verbs, flags and exit codes
    /// (create, info, check, convert, snapshot, resize).
    Img(crate::img::ImgArgs),
}

const AFTER_HELP: &str = "\
Config file schema (all fields optional except a kernel somewhere):
  {\"machine\": {\"vcpus\": 2, \"memory_mib\": 256},
   \"boot\": {\"kernel\": \"vmlinuz\", \"initrd\": \"initrd.gz\", \"cmdline\": \"console=ttyS0\",
            \"decompress_kernel\": true},   (false: boot a bzImage without host-side extraction)
   \"serial\": {\"mode\": \"stdio\"},          (or file/socket with \"path\", or off)
   \"console\": {\"mode\": \"socket\", \"path\": \"/run/hvc0.sock\"},   (virtio console, hvc0)
   \"channels\": [{\"name\": \"org.qemu.guest_agent.0\", \"socket\": \"/run/qga.sock\"}],
   \"on_reboot\": \"exit\"}                    (or restart)

On a terminal, Ctrl-A x quits. The guest powering off ends vmm with status 0.";

impl Cli {
    /// Reads the config file (if any) and applies the flags: a VM to boot (validated), or with
    /// --incoming the front doors to restore a VM behind and the constraints it must meet.
    pub fn into_launch(self, host_memory_mib: Option<u64>) -> Result<Launch, ConfigError> {
        let paused = self.paused;
        let on_reboot_given = self.on_reboot.is_some();
        let Some(incoming) = self.incoming.clone() else {
            return Ok(Launch {
                config: self.into_config(host_memory_mib)?,
                incoming: None,
                constraints: Constraints::default(),
                paused,
                on_reboot_given,
            });
        };
        if self.kernel.is_some() || self.initrd.is_some() || self.cmdline.is_some() {
            return Err(ConfigError::Invalid {
                field: "boot",
                reason: "--kernel, --initrd and --cmdline cannot be given with --incoming: the \
                         saved VM's memory holds its running kernel"
                    .into(),
            });
        }
        if self.console.is_some()
            || !self.channel.is_empty()
            || self.agent
            || self.balloon.is_some()
        {
            return Err(ConfigError::Invalid {
                field: "console",
                reason: "--console, --channel, --agent and --balloon cannot be given with \
                         --incoming: the saved VM brings its own devices"
                    .into(),
            });
        }
        let file = match &self.config {
            Some(path) => Some(VmConfig::from_file(path)?),
            None => None,
        };
        let mut constraints = Constraints {
            vcpus: file.as_ref().map(|c| c.machine.vcpus),
            memory_mib: file.as_ref().map(|c| c.machine.memory_mib),
            disks: file.as_ref().map(|c| c.disks.clone()),
            nets: file
                .as_ref()
                .map(|c| c.net.clone())
                .filter(|n| !n.is_empty()),
        };
        if let Some(n) = self.cpus {
            constraints.vcpus = Some(n);
        }
        if let Some(m) = self.memory {
            constraints.memory_mib = Some(m);
        }
        if !self.disk.is_empty() {
            constraints
                .disks
                .get_or_insert_with(Vec::new)
                .extend(self.disk.iter().cloned());
        }
        if !self.net.is_empty() {
            constraints
                .nets
                .get_or_insert_with(Vec::new)
                .extend(self.net.iter().cloned());
        }
        if let Some(nets) = &constraints.nets {
            // Checked as they would be for a boot (names, queue counts, rate limits).
            let only_nets = VmConfig {
                net: nets.clone(),
                ..VmConfig::default()
            };
            only_nets.validate_restored(host_memory_mib)?;
        }
        let mut doors = file.unwrap_or_default();
        if let Some(s) = self.serial {
            doors.serial = s;
        }
        if let Some(r) = self.on_reboot {
            doors.on_reboot = r;
        }
        if let Some(p) = self.api_socket {
            doors.api_socket = Some(p);
        }
        doors.qmp.extend(self.qmp);
        Ok(Launch {
            config: doors,
            incoming: Some(incoming),
            constraints,
            paused,
            on_reboot_given,
        })
    }

    /// Reads the config file (if any), applies the flags and validates the result.
    pub fn into_config(self, host_memory_mib: Option<u64>) -> Result<VmConfig, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => VmConfig::default(),
        };
        if let Some(k) = self.kernel {
            cfg.boot.kernel = Some(k);
        }
        if let Some(i) = self.initrd {
            cfg.boot.initrd = Some(i);
        }
        if let Some(c) = self.cmdline {
            cfg.boot.cmdline = Some(c);
        }
        if self.no_decompress {
            cfg.boot.decompress_kernel = false;
        }
        if let Some(n) = self.cpus {
            cfg.machine.vcpus = n;
        }
        if let Some(m) = self.memory {
            cfg.machine.memory_mib = m;
        }
        if let Some(s) = self.serial {
            cfg.serial = s;
        }
        if let Some(r) = self.on_reboot {
            cfg.on_reboot = r;
        }
        if let Some(p) = self.api_socket {
            cfg.api_socket = Some(p);
        }
        cfg.qmp.extend(self.qmp);
        cfg.disks.extend(self.disk);
        cfg.net.extend(self.net);
        if let Some(c) = self.console {
            cfg.console = Some(c);
        }
        cfg.channels.extend(self.channel);
        cfg.agent |= self.agent;
        if let Some(b) = self.balloon {
            cfg.balloon = Some(b);
        }
        cfg.assign_macs();
        cfg.validate(host_memory_mib)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("vmm-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"x").unwrap();
        let cfg_path = dir.join("vm.json");
        std::fs::write(
            &cfg_path,
            format!(
                r#"{{"machine": {{"vcpus": 2, "memory_mib": 256}},
                    "boot": {{"kernel": "{}"}}, "on_reboot": "restart"}}"#,
                kernel.display()
            ),
        )
        .unwrap();
        let cfg = cli(&[
            "--config",
            cfg_path.to_str().unwrap(),
            "--cpus",
            "3",
            "--serial",
            "file:/tmp/out",
            "--cmdline",
            "-- quiet",
        ])
        .into_config(None)
        .unwrap();
        assert_eq!(cfg.machine.vcpus, 3);
        assert_eq!(cfg.machine.memory_mib, 256);
        assert_eq!(cfg.on_reboot, OnReboot::Restart);
        assert_eq!(cfg.boot.cmdline(), "-- quiet");
        assert_eq!(
            cfg.serial,
            SerialConfig::File {
                path: "/tmp/out".into()
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn incoming_takes_nics_as_constraints_and_refuses_a_kernel() {
        let launch = cli(&[
            "--incoming",
            "tcp:0:4444",
            "--net",
            "id=net0,tap=tapb,vhost=on,script=no",
        ])
        .into_launch(None)
        .unwrap();
        let nets = launch.constraints.nets.unwrap();
        assert_eq!(nets.len(), 1);
        assert_eq!(
            (nets[0].tap.as_deref(), nets[0].vhost),
            (Some("tapb"), true)
        );
        assert!(cli(&["--incoming", "defer"])
            .into_launch(None)
            .unwrap()
            .constraints
            .nets
            .is_none());
        for flag in ["--kernel", "--initrd", "--cmdline"] {
            let e = cli(&["--incoming", "defer", flag, "x"])
                .into_launch(None)
                .unwrap_err();
            assert!(e.to_string().contains("--incoming"), "{flag}: {e}");
        }
        // A --net that would not boot is refused here too.
        let e = cli(&["--incoming", "defer", "--net", "tap=t,queues=99"])
            .into_launch(None)
            .unwrap_err();
        assert!(e.to_string().contains("queue"), "{e}");
    }

    #[test]
    fn bad_serial_flag_is_rejected_by_the_parser() {
        let r = Cli::try_parse_from(["vmm", "--serial", "pty"]);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("not one of stdio"), "{msg}");
    }
}
