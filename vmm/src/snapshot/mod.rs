//! VM state: saving a paused VM (configuration, vCPUs, in-kernel VM state, every device by id,
//! guest RAM) into one versioned stream ([`format`]), and loading it back, checked like any
//! guest input, into a new process.
//!
//! A snapshot file is written next to its destination and renamed into place when complete, so
//! a reader never sees half a file, and a VM restored from an earlier file at the same path
//! (whose memory maps that file) keeps its own copy.

pub mod cpu;
pub mod format;
mod hex;
pub mod memory;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek};
use std::path::{Path, PathBuf};

use api::VmConfig;
use serde::{Deserialize, Serialize};
use virtio::GuestMemoryMmap;

use crate::cli::Constraints;
use crate::registry::DeviceState;
use cpu::{VcpuState, VmKvmState};
use format::{FormatError, MemStats, MemoryLayout};

/// Everything about a VM that is not its configuration or its RAM.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip, PIT and clock.
    pub vm: VmKvmState,
    /// Every device's state, by device id.
    pub devices: BTreeMap<String, DeviceState>,
}

/// Errors saving or loading VM state.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be opened.
    #[error("{path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The stream is not valid.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
    /// The saved configuration is not valid.
    #[error("{path}: the saved VM configuration is invalid: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The saved machine state is not valid.
    #[error("{path}: the saved VM state is invalid: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state does not fit what this process was told.
    #[error("--incoming: {0}")]
    Mismatch(String),
    /// A disk image of the saved VM is not there.
    #[error(
        "disk `{id}`: cannot open {}: {source} (a restored VM opens the images it had)",
        path.display()
    )]
    Disk {
        /// The disk's id.
        id: String,
        /// Its image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Writing the state failed.
    #[error("cannot write the VM state to {path}: {reason}")]
    Write {
        /// The destination.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A saved VM that was read and checked, ready to be restored: from a state file, or
/// received from a live migration's source.
pub struct Loaded {
    /// The saved VM's configuration.
    pub config: VmConfig,
    /// vCPU, VM and device state.
    pub state: MachineState,
    /// Guest RAM.
    pub memory: SavedMemory,
    /// The source of a live migration, waiting to hear that the VM runs here.
    pub peer: Option<crate::migration::dest::Peer>,
}

/// Where a saved VM's RAM is.
pub enum SavedMemory {
    /// In a state file, to be mapped.
    File {
        /// The open file.
        file: File,
        /// Where guest RAM is in it.
        layout: MemoryLayout,
    },
    /// Already in guest RAM (`loadvm` read it there); taken by the VM that is built.
    Received(std::cell::Cell<Option<crate::vm::GuestRam>>),
    /// In the RAM of a VM built while it arrived (a live migration's); taken whole.
    Prebuilt(std::cell::Cell<Option<crate::vm::Prebuilt>>),
}

/// Reads and checks a state file: header, checksums, configuration, state, memory layout and
/// length. Guest RAM itself is left in the file, to be mapped.
pub fn load(path: &Path) -> Result<Loaded, SnapshotError> {
    let open_err = |source| SnapshotError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(open_err(std::io::Error::other("not a regular file")));
    }
    let (config, state, layout) = check_stream(path, &mut file, meta.len())?;
    Ok(Loaded {
        config,
        state,
        memory: SavedMemory::File { file, layout },
        peer: None,
    })
}

/// Runs every check [`load`] makes on a stream held in memory (the fuzz target's entry).
pub fn check_bytes(bytes: &[u8]) -> Result<(VmConfig, MachineState), SnapshotError> {
    let mut cursor = std::io::Cursor::new(bytes);
    let (config, state, _) = check_stream(Path::new("<memory>"), &mut cursor, bytes.len() as u64)?;
    Ok((config, state))
}

/// Checks the metadata at the head of a stream (everything up to guest RAM) as [`load`] does:
/// the fuzz target's way past the length check to the configuration and state parsers.
pub fn check_metadata(bytes: &[u8]) -> Result<(VmConfig, MachineState), SnapshotError> {
    let path = Path::new("<memory>");
    let (config, state, layout) =
        format::parse_metadata(&mut &bytes[..]).map_err(|source| SnapshotError::Format {
            path: path.to_path_buf(),
            source,
        })?;
    let (config, state, _) = check_sections(path, &config, &state, layout)?;
    Ok((config, state))
}

/// Parses a stream of `len` bytes and checks its metadata, configuration, state and memory
/// layout; `path` names it in errors.
fn check_stream<R: std::io::Read + Seek>(
    path: &Path,
    r: &mut R,
    len: u64,
) -> Result<(VmConfig, MachineState, MemoryLayout), SnapshotError> {
    let parsed = format::parse(r, len).map_err(|source| SnapshotError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    check_sections(path, &parsed.config, &parsed.state, parsed.memory)
}

/// Decodes the configuration and state sections and checks the memory layout against the
/// configured RAM size.
fn check_sections(
    path: &Path,
    config: &[u8],
    state: &[u8],
    layout: MemoryLayout,
) -> Result<(VmConfig, MachineState, MemoryLayout), SnapshotError> {
    let (config, state) = decode(path, config, state)?;
    memory::check_layout(&layout, config.machine.memory_mib).map_err(|e| SnapshotError::State {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((config, state, layout))
}

/// Parses and cross-checks the configuration and state sections.
pub fn decode(
    path: &Path,
    config: &[u8],
    state: &[u8],
) -> Result<(VmConfig, MachineState), SnapshotError> {
    let config = decode_config(path, config)?;
    let state = decode_state(path, &config, state)?;
    Ok((config, state))
}

/// Parses and checks the configuration section (as `vm.json` is checked, less the boot files).
pub fn decode_config(path: &Path, config: &[u8]) -> Result<VmConfig, SnapshotError> {
    let invalid = |reason: String| SnapshotError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(config).map_err(|_| invalid("not UTF-8".into()))?;
    let config = VmConfig::from_json(text, path).map_err(|e| invalid(e.to_string()))?;
    config
        .validate_restored(None)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(config)
}

/// Parses the state section and checks it against its (decoded) configuration.
pub fn decode_state(
    path: &Path,
    config: &VmConfig,
    state: &[u8],
) -> Result<MachineState, SnapshotError> {
    let bad = |reason: String| SnapshotError::State {
        path: path.to_path_buf(),
        reason,
    };
    let state: MachineState = serde_json::from_slice(state).map_err(|e| bad(e.to_string()))?;
    if state.vcpus.len() != usize::from(config.machine.vcpus) {
        return Err(bad(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            config.machine.vcpus
        )));
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        cpu::validate_vcpu(v, i as u8).map_err(|e| bad(e.to_string()))?;
    }
    Ok(state)
}

/// Runs the state decoder once, on a synthetic state of `vcpus` vCPUs. A live migration's
/// destination calls it while the pages arrive, so that the decoder's first run (its code
/// paged in; under an emulated CPU, translated: 40 ms of a 100 ms downtime in the test box)
/// is not inside the downtime. The result is dropped.
pub fn warm_up_decoder(vcpus: u8) {
    let state = MachineState {
        vcpus: (0..vcpus)
            .map(|id| VcpuState {
                id,
                cpuid: vec![Default::default(); 64],
                msrs: vec![Default::default(); 64],
                tsc_khz: Some(1),
                ..Default::default()
            })
            .collect(),
        vm: VmKvmState::default(),
        devices: BTreeMap::new(),
    };
    if let Ok(bytes) = serde_json::to_vec(&state) {
        let decoded = serde_json::from_slice::<MachineState>(&bytes);
        std::hint::black_box(decoded.is_ok());
    }
}

/// The configuration a restored VM runs with: the saved one, with this process's front doors
/// (serial, API socket, QMP, and on_reboot when given), after checking that whatever the user
/// said about the machine agrees with it.
pub fn merge_config(
    saved: &VmConfig,
    doors: &VmConfig,
    constraints: &Constraints,
    on_reboot_given: bool,
) -> Result<VmConfig, SnapshotError> {
    if let Some(n) = constraints.vcpus {
        if n != saved.machine.vcpus {
            return Err(SnapshotError::Mismatch(format!(
                "the saved VM has {} vCPUs, the configuration says {n}",
                saved.machine.vcpus
            )));
        }
    }
    if let Some(m) = constraints.memory_mib {
        if m != saved.machine.memory_mib {
            return Err(SnapshotError::Mismatch(format!(
                "the saved VM has {} MiB of memory, the configuration says {m} MiB",
                saved.machine.memory_mib
            )));
        }
    }
    if let Some(disks) = &constraints.disks {
        if disks.len() != saved.disks.len() {
            return Err(SnapshotError::Mismatch(format!(
                "the saved VM has {} disks, the configuration has {}",
                saved.disks.len(),
                disks.len()
            )));
        }
        for (i, (a, b)) in saved.disks.iter().zip(disks).enumerate() {
            if a.path != b.path || a.format != b.format || a.read_only != b.read_only {
                return Err(SnapshotError::Mismatch(format!(
                    "disk {i}: the saved VM has {} ({:?}{}), the configuration has {} ({:?}{})",
                    a.path.display(),
                    a.format,
                    if a.read_only { ", read-only" } else { "" },
                    b.path.display(),
                    b.format,
                    if b.read_only { ", read-only" } else { "" },
                )));
            }
        }
    }
    let mut cfg = saved.clone();
    if let Some(nets) = &constraints.nets {
        take_host_nics(&mut cfg, nets)?;
    }
    cfg.serial = doors.serial.clone();
    cfg.api_socket = doors.api_socket.clone();
    cfg.qmp = doors.qmp.clone();
    if on_reboot_given {
        cfg.on_reboot = doors.on_reboot;
    }
    Ok(cfg)
}

/// The NICs `given` for a restored VM (the destination's --net or config): what the guest
/// sees (id, MAC, queue pairs, MTU) must be the saved VM's where it is given; the host side
/// (tap, vhost, scripts, rate limits) replaces the saved one.
fn take_host_nics(cfg: &mut VmConfig, given: &[api::NetConfig]) -> Result<(), SnapshotError> {
    if given.len() != cfg.net.len() {
        return Err(SnapshotError::Mismatch(format!(
            "the saved VM has {} NICs, the configuration has {}",
            cfg.net.len(),
            given.len()
        )));
    }
    for (i, g) in given.iter().enumerate() {
        let id = cfg.net_id(i);
        let saved = &mut cfg.net[i];
        let differs = |what: &str, saved: &dyn std::fmt::Debug, given: &dyn std::fmt::Debug| {
            SnapshotError::Mismatch(format!(
                "NIC {i} (`{id}`): the saved VM's {what} is {saved:?}, the configuration says \
                 {given:?}"
            ))
        };
        if let Some(gid) = &g.id {
            if *gid != id {
                return Err(differs("id", &id, gid));
            }
        }
        if let (Some(gm), Some(sm)) = (&g.mac, &saved.mac) {
            if !gm.eq_ignore_ascii_case(sm) {
                return Err(differs("MAC address", sm, gm));
            }
        }
        if g.queues != saved.queues {
            return Err(differs("queue pair count", &saved.queues, &g.queues));
        }
        if g.mtu.is_some() && g.mtu != saved.mtu {
            return Err(differs("MTU", &saved.mtu, &g.mtu));
        }
        saved.tap = g.tap.clone();
        saved.vhost = g.vhost;
        saved.script = g.script.clone();
        saved.downscript = g.downscript.clone();
        saved.rx_rate_limiter = g.rx_rate_limiter;
        saved.tx_rate_limiter = g.tx_rate_limiter;
    }
    Ok(())
}

/// Checks that every disk image of a restored VM is there, before anything is started.
pub fn check_disks(cfg: &VmConfig) -> Result<(), SnapshotError> {
    for (i, d) in cfg.disks.iter().enumerate() {
        let found = std::fs::metadata(&d.path).and_then(|m| match m.is_dir() {
            true => Err(std::io::Error::other("it is a directory")),
            false => Ok(()),
        });
        if let Err(e) = found {
            return Err(SnapshotError::Disk {
                id: cfg.disk_id(i),
                path: d.path.clone(),
                source: e,
            });
        }
    }
    Ok(())
}

/// Writes a complete state file at `path` (through a temporary file in the same directory,
/// renamed into place when complete).
pub fn save_to_file(
    path: &Path,
    config: &VmConfig,
    state: &MachineState,
    mem: &GuestMemoryMmap,
) -> Result<MemStats, SnapshotError> {
    let err = |reason: String| SnapshotError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let config = serde_json::to_vec(config).map_err(|e| err(e.to_string()))?;
    let state = serde_json::to_vec(state).map_err(|e| err(e.to_string()))?;
    let name = path
        .file_name()
        .ok_or_else(|| err("the path names no file".into()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| err(e.to_string()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let stats =
            format::write_stream(&mut w, &config, &state, mem).map_err(|e| err(e.to_string()))?;
        let end = w.stream_position().map_err(|e| err(e.to_string()))?;
        let file = w.into_inner().map_err(|e| err(e.error().to_string()))?;
        // Zero pages at the very end were skipped: give the file its whole length.
        file.set_len(end).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
        Ok(stats)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> VmConfig {
        VmConfig {
            net: vec![
                "id=lan,tap=tap0,mac=52:54:00:00:00:01,vhost=on,queues=2,script=no"
                    .parse()
                    .unwrap(),
                "tap=tap9,mac=52:54:00:00:00:02".parse().unwrap(),
            ],
            ..VmConfig::default()
        }
    }

    fn merged(nets: &[&str]) -> Result<VmConfig, SnapshotError> {
        let constraints = Constraints {
            nets: Some(nets.iter().map(|n| n.parse().unwrap()).collect()),
            ..Default::default()
        };
        merge_config(&saved(), &VmConfig::default(), &constraints, false)
    }

    #[test]
    fn the_destination_gives_the_nics_their_host_side() {
        let c = merged(&[
            "tap=tapx,queues=2",
            "id=net1,tap=tapy,mac=52:54:00:00:00:02,vhost=on",
        ])
        .unwrap();
        // What the guest sees is the saved VM's; the taps and vhost are ours.
        assert_eq!(c.net_id(0), "lan");
        assert_eq!(c.net[0].mac.as_deref(), Some("52:54:00:00:00:01"));
        assert_eq!(
            (c.net[0].tap.as_deref(), c.net[0].vhost),
            (Some("tapx"), false)
        );
        assert_eq!(c.net[0].queues, 2);
        assert_eq!(
            (c.net[1].tap.as_deref(), c.net[1].vhost),
            (Some("tapy"), true)
        );
        // Without --net the saved host side stays.
        let c = merge_config(
            &saved(),
            &VmConfig::default(),
            &Constraints::default(),
            false,
        )
        .unwrap();
        assert_eq!(c.net[1].tap.as_deref(), Some("tap9"));
    }

    #[test]
    fn nics_the_guest_would_see_differently_are_refused() {
        for (nets, want) in [
            (&["tap=a,queues=2"][..], "2 NICs"),
            (&["id=wan,tap=a,queues=2", "tap=b"][..], "id"),
            (
                &["tap=a,queues=2,mac=52:54:00:00:00:09", "tap=b"][..],
                "MAC",
            ),
            (&["tap=a", "tap=b"][..], "queue"),
            (&["tap=a,queues=2,mtu=9000", "tap=b"][..], "MTU"),
        ] {
            let e = merged(nets).unwrap_err().to_string();
            assert!(e.contains(want), "{nets:?}: {e}");
        }
    }
}
