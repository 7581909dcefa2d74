//! The command line: `vmm --config FILE` plus flags that override the file, for quick use
//! without one. Flags and file are merged into one `VmConfig`, then validated.

use std::path::PathBuf;

use api::{ConfigError, DiskConfig, OnReboot, QmpEndpoint, SerialConfig, VmConfig};
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

    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u8>,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,

    /// Serial console: stdio, off, file:PATH or socket:PATH.
    #[arg(long, value_name = "MODE")]
    pub serial: Option<SerialConfig>,

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
   \"boot\": {\"kernel\": \"vmlinuz\", \"initrd\": \"initrd.gz\", \"cmdline\": \"console=ttyS0\"},
   \"serial\": {\"mode\": \"stdio\"},          (or file/socket with \"path\", or off)
   \"on_reboot\": \"exit\"}                    (or restart)

On a terminal, Ctrl-A x quits. The guest powering off ends vmm with status 0.";

impl Cli {
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
    fn bad_serial_flag_is_rejected_by_the_parser() {
        let r = Cli::try_parse_from(["vmm", "--serial", "pty"]);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("not one of stdio"), "{msg}");
    }
}
