//! Whole-VM snapshots inside the VM's qcow2 disks, as QEMU's `savevm`/`loadvm`/`delvm`: the VM
//! state (the state stream of `docs/state-format.md`) goes into one disk's VM-state area, past
//! the end of the virtual disk, and every disk gets an internal snapshot of that name, so that
//! `qemu-img snapshot -l` lists it with its VM SIZE. `loadvm` reverts every disk and rebuilds
//! the VM from the state, in the same process.

use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use api::{DiskSnapshots, VmEvent, VmSnapshotInfo, VmSnapshotRequest, VmState};
use devices::block::qcow2::Qcow2Image;
use virtio::VirtioPciDevice;
use vm_memory::GuestAddress;

use super::{Control, Outcome};
use crate::cli::Constraints;
use crate::lock;
use crate::snapshot::{self, format, Loaded, SavedMemory};
use crate::vm::GuestRam;

/// A disk taking part, by id.
type Disk = (String, Arc<Mutex<VirtioPciDevice>>);

/// Why a savevm/loadvm/delvm did not happen: a request that cannot be carried out as asked
/// (nothing changed), or a failure while carrying it out.
pub(super) enum SnapError {
    /// Refused before anything changed (QEMU's texts).
    Refused(String),
    /// Failed on the way.
    Failed(String),
}

impl From<String> for SnapError {
    fn from(e: String) -> Self {
        SnapError::Failed(e)
    }
}

impl SnapError {
    /// As the control plane's error for `action`.
    pub(super) fn into_action_error(self, action: &'static str) -> api::ActionError {
        match self {
            SnapError::Refused(reason) => api::ActionError::Refused {
                action,
                reason,
                kind: api::Refusal::BadArgument,
            },
            SnapError::Failed(reason) => api::ActionError::Failed { action, reason },
        }
    }
}

fn refused(reason: String) -> SnapError {
    SnapError::Refused(reason)
}

/// Room cleared for a new VM state beyond the RAM: the stream's metadata (an older state of the
/// same VM may still be in the area after a `loadvm`).
const STATE_SLACK: u64 = 64 << 20;

/// Writes the state stream into a qcow2 image's VM-state area.
struct VmStateWriter<'a> {
    img: &'a mut Qcow2Image,
    pos: u64,
    end: u64,
}

impl Write for VmStateWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.img
            .write_vm_state(self.pos, buf)
            .map_err(io::Error::other)?;
        self.pos += buf.len() as u64;
        self.end = self.end.max(self.pos);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for VmStateWriter<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_to(self.pos, self.end, to)?;
        Ok(self.pos)
    }
}

/// Reads the state stream back from a VM-state area of `len` bytes.
struct VmStateReader<'a> {
    img: &'a mut Qcow2Image,
    pos: u64,
    len: u64,
}

impl Read for VmStateReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.img
            .read_vm_state(self.pos, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for VmStateReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_to(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

fn seek_to(pos: u64, end: u64, to: SeekFrom) -> io::Result<u64> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "seek out of range");
    match to {
        SeekFrom::Start(p) => Some(p),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
        SeekFrom::End(d) => end.checked_add_signed(d),
    }
    .ok_or_else(bad)
}

/// Runs `f` on a disk's qcow2 engine.
fn with_qcow2<T>(
    disk: &Disk,
    f: impl FnOnce(&mut Qcow2Image) -> Result<T, String>,
) -> Result<T, String> {
    let mut dev = lock(&disk.1);
    match dev.disk().and_then(|d| d.as_qcow2()) {
        Some(img) => f(img),
        None => Err(format!(
            "Device '{}' is writable but does not support snapshots",
            disk.0
        )),
    }
}

impl Control {
    /// The disks a snapshot covers: `devices`, or every writable disk; each must be qcow2.
    fn snapshot_disks(&self, devices: Option<&[String]>) -> Result<Vec<Disk>, SnapError> {
        let cfg = &self.config;
        let ids: Vec<String> = match devices {
            Some([]) => {
                return Err(refused(
                    "At least one device is required for snapshot".into(),
                ))
            }
            Some(list) => {
                for id in list {
                    if !(0..cfg.disks.len()).any(|i| cfg.disk_id(i) == *id) {
                        return Err(refused(format!("No block device node '{id}'")));
                    }
                }
                list.to_vec()
            }
            None => (0..cfg.disks.len())
                .filter(|&i| !cfg.disks[i].read_only)
                .map(|i| cfg.disk_id(i))
                .collect(),
        };
        let mut out = Vec::new();
        for id in ids {
            let dev = self
                .vm
                .registry
                .virtio()
                .find(|(d, _)| *d == id)
                .map(|(_, dev)| dev.clone())
                .ok_or_else(|| refused(format!("No block device node '{id}'")))?;
            let disk = (id, dev);
            with_qcow2(&disk, |_| Ok(())).map_err(refused)?;
            out.push(disk);
        }
        Ok(out)
    }

    /// The disk that holds the VM state: `vmstate`, or the first one.
    fn vmstate_disk(disks: &[Disk], vmstate: Option<&str>) -> Result<usize, SnapError> {
        match vmstate {
            Some(id) => disks
                .iter()
                .position(|d| d.0 == id)
                .ok_or_else(|| refused(format!("vmstate block device '{id}' does not exist"))),
            None if disks.is_empty() => Err(refused(api::snapshots::NO_VMSTATE_DISK.into())),
            None => Ok(0),
        }
    }

    /// `savevm`: stops the VM, writes its state into the VM-state disk, snapshots every disk,
    /// and lets the VM go on as it was.
    pub(super) fn savevm(
        &mut self,
        req: &VmSnapshotRequest,
        state: VmState,
    ) -> Result<(), SnapError> {
        let disks = self.snapshot_disks(req.devices.as_deref())?;
        let tag = req.tag.as_str();
        let exists: Vec<&Disk> = disks
            .iter()
            .filter(|d| with_qcow2(d, |img| Ok(img.snapshot(tag).is_ok())).unwrap_or(false))
            .collect();
        if !exists.is_empty() {
            if !req.overwrite {
                return Err(refused(format!(
                    "Snapshot '{tag}' already exists in one or more devices"
                )));
            }
            for d in exists {
                with_qcow2(d, |img| {
                    img.delete_snapshot(tag).map_err(|e| {
                        format!("Error while deleting snapshot on device '{}': {e}", d.0)
                    })
                })?;
            }
        }
        // QEMU's order: the devices, an existing snapshot, then the VM-state disk.
        let vs = Self::vmstate_disk(&disks, req.vmstate.as_deref())?;
        let was_running = state == VmState::Running;
        let result = self.write_savevm(&disks, vs, tag, was_running);
        for (_, dev) in self.vm.registry.virtio() {
            lock(dev).resume();
        }
        self.run_again(was_running);
        Ok(result?)
    }

    fn write_savevm(
        &mut self,
        disks: &[Disk],
        vs: usize,
        tag: &str,
        was_running: bool,
    ) -> Result<(), String> {
        let machine = self.take_state(was_running)?;
        let clock_ns = machine.vm.clock.clock;
        let config = serde_json::to_vec(&*self.config).map_err(|e| e.to_string())?;
        let state = serde_json::to_vec(&machine).map_err(|e| e.to_string())?;
        let mem = self.vm.vm.memory().clone();
        let ram = self.config.machine.memory_mib << 20;
        with_qcow2(&disks[vs], |img| {
            let fail = |e: &dyn std::fmt::Display| {
                format!("Error while writing VM state to '{}': {e}", disks[vs].0)
            };
            // An older state may still be here (after a loadvm): zero pages are not written.
            img.discard_vm_state(ram + STATE_SLACK)
                .map_err(|e| fail(&e))?;
            let mut w = VmStateWriter {
                img,
                pos: 0,
                end: 0,
            };
            {
                let mut b = BufWriter::with_capacity(1 << 20, &mut w);
                format::write_stream(&mut b, &config, &state, &mem).map_err(|e| fail(&e))?;
                b.flush().map_err(|e| fail(&e))?;
            }
            let size = w.end;
            w.img
                .create_snapshot_with_state(tag, size, clock_ns)
                .map_err(|e| fail(&e))
        })?;
        for (i, d) in disks.iter().enumerate() {
            if i == vs {
                continue;
            }
            let created = with_qcow2(d, |img| {
                img.create_snapshot_with_state(tag, 0, clock_ns)
                    .map_err(|e| format!("Error while creating snapshot on '{}': {e}", d.0))
            });
            if let Err(e) = created {
                // No half snapshot: take it off the disks that got it.
                for (j, other) in disks.iter().enumerate() {
                    if j == vs || j < i {
                        let _ = with_qcow2(other, |img| {
                            img.delete_snapshot(tag).map_err(|e| e.to_string())
                        });
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// `loadvm`: reverts every disk to the snapshot and rebuilds the VM from its state. On a
    /// failure after the disks were reverted the VM stays stopped, as QEMU's does.
    pub(super) fn loadvm(
        &mut self,
        req: &VmSnapshotRequest,
        state: VmState,
    ) -> Result<(), SnapError> {
        let disks = self.snapshot_disks(req.devices.as_deref())?;
        let tag = req.tag.as_str();
        for d in &disks {
            with_qcow2(d, |img| match img.snapshot(tag) {
                Ok(_) => Ok(()),
                Err(_) => Err(format!(
                    "Snapshot '{tag}' does not exist in one or more devices"
                )),
            })
            .map_err(refused)?;
        }
        let vs = Self::vmstate_disk(&disks, req.vmstate.as_deref())?;
        with_qcow2(&disks[vs], |img| {
            img.snapshot_with_state(tag)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .map_err(refused)?;
        let was_running = state == VmState::Running;
        if let Err(e) = self.stop_and_flush(was_running) {
            for (_, dev) in self.vm.registry.virtio() {
                lock(dev).resume();
            }
            self.run_again(was_running);
            return Err(e.into());
        }
        match self.revert_and_read(&disks, vs, tag) {
            Ok(loaded) => {
                self.state.set(match was_running {
                    true => VmState::Running,
                    false => VmState::Paused,
                });
                if was_running {
                    self.bus.publish(VmEvent::Resume);
                }
                self.finish(Ok(Outcome::Load(Box::new(loaded))));
                Ok(())
            }
            Err(e) => {
                // The disks may be reverted already: running the old state on them would
                // corrupt them. The VM stays stopped.
                if was_running {
                    self.state.set(VmState::Paused);
                }
                Err(e.into())
            }
        }
    }

    fn revert_and_read(&mut self, disks: &[Disk], vs: usize, tag: &str) -> Result<Loaded, String> {
        for (i, d) in disks.iter().enumerate() {
            if i != vs {
                with_qcow2(d, |img| {
                    img.apply_snapshot(tag).map_err(|e| {
                        format!("Error while activating snapshot '{tag}' on '{}': {e}", d.0)
                    })
                })?;
            }
        }
        let cfg = self.config.clone();
        with_qcow2(&disks[vs], |img| {
            let snap = img.load_snapshot(tag).map_err(|e| {
                format!(
                    "Error while activating snapshot '{tag}' on '{}': {e}",
                    disks[vs].0
                )
            })?;
            let fail = |e: &dyn std::fmt::Display| format!("Error while loading VM state: {e}");
            let mut r = VmStateReader {
                img,
                pos: 0,
                len: snap.vm_state_size,
            };
            let name = std::path::Path::new("<savevm state>");
            let parsed = format::parse(&mut r, snap.vm_state_size).map_err(|e| fail(&e))?;
            let (saved, machine) =
                snapshot::decode(name, &parsed.config, &parsed.state).map_err(|e| fail(&e))?;
            snapshot::memory::check_layout(&parsed.memory, saved.machine.memory_mib)
                .map_err(|e| fail(&e))?;
            // The snapshot must be of this machine.
            let constraints = Constraints {
                vcpus: Some(cfg.machine.vcpus),
                memory_mib: Some(cfg.machine.memory_mib),
                disks: Some(cfg.disks.clone()),
                nets: Some(cfg.net.clone()),
            };
            snapshot::merge_config(&saved, &cfg, &constraints, false).map_err(|e| fail(&e))?;
            let ranges: Vec<(GuestAddress, usize)> = parsed
                .memory
                .regions
                .iter()
                .map(|m| (GuestAddress(m.gpa), m.len as usize))
                .collect();
            let ram = GuestRam::take(&ranges).map_err(|e| fail(&e))?;
            let filled = (|| {
                let mem = ram.guest_memory().map_err(|e| fail(&e))?;
                r.seek(SeekFrom::Start(parsed.memory.data_offset))
                    .map_err(|e| fail(&e))?;
                format::read_memory(&mut r, &parsed.memory, &mem).map_err(|e| fail(&e))
            })();
            if let Err(e) = filled {
                ram.give_back();
                return Err(e);
            }
            Ok(Loaded {
                config: saved,
                state: machine,
                memory: SavedMemory::Received(std::cell::Cell::new(Some(ram))),
                peer: None,
            })
        })
    }

    /// `delvm`: deletes the snapshot from every disk that has it (none having it is not an
    /// error, as in QEMU).
    pub(super) fn delvm(&mut self, req: &VmSnapshotRequest) -> Result<(), SnapError> {
        let disks = self.snapshot_disks(req.devices.as_deref())?;
        let tag = req.tag.as_str();
        for d in &disks {
            with_qcow2(d, |img| {
                if img.snapshot(tag).is_err() {
                    return Ok(());
                }
                img.delete_snapshot(tag)
                    .map_err(|e| format!("Could not delete snapshot '{tag}' on '{}': {e}", d.0))
            })?;
        }
        Ok(())
    }

    /// Every writable qcow2 disk with its snapshots (the disks `info snapshots` looks at).
    pub(super) fn list_snapshots(&self) -> Vec<DiskSnapshots> {
        let cfg = &self.config;
        let writable: Vec<String> = (0..cfg.disks.len())
            .filter(|&i| !cfg.disks[i].read_only)
            .map(|i| cfg.disk_id(i))
            .collect();
        self.vm
            .registry
            .virtio()
            .filter(|(id, _)| writable.iter().any(|w| w == id))
            .filter_map(|(id, dev)| {
                with_qcow2(&(id.to_string(), dev.clone()), |img| {
                    Ok(DiskSnapshots {
                        disk: id.to_string(),
                        snapshots: img
                            .snapshots()
                            .iter()
                            .map(|s| VmSnapshotInfo {
                                id: s.id.clone(),
                                tag: s.name.clone(),
                                vm_state_size: s.vm_state_size,
                                date_sec: u64::from(s.date_sec),
                                date_nsec: s.date_nsec,
                                vm_clock_nsec: s.vm_clock_nsec,
                            })
                            .collect(),
                    })
                })
                .ok()
            })
            .collect()
    }
}
