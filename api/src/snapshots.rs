//! Whole-VM snapshots inside the VM's qcow2 disks, QEMU's `savevm`/`loadvm`/`delvm`: what a
//! client asks for ([`VmSnapshotRequest`]), what the disks hold ([`DiskSnapshots`]), and HMP's
//! `info snapshots` text ([`info_text`], QEMU 10's `hmp_info_snapshots` and
//! `bdrv_snapshot_dump`), which `vmm ctl snapshots` prints too.

use serde::{Deserialize, Serialize};

use crate::human::{date_time, size_to_str, Zone};

/// Which snapshot, and where (QEMU's `snapshot-save`/`-load`/`-delete` arguments; HMP's
/// `savevm`/`loadvm`/`delvm` leave `vmstate` and `devices` to the defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotRequest {
    /// The snapshot's name (QEMU's tag). QEMU 10 finds snapshots by name only
    /// (`bdrv_snapshot_find`), never by id.
    pub tag: String,
    /// The disk (its id) that keeps the VM state; the first writable qcow2 disk when absent.
    #[serde(default)]
    pub vmstate: Option<String>,
    /// The disks (ids) to act on; every writable disk when absent. QMP always names them (an
    /// empty list is QEMU's "At least one device is required for snapshot").
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// `savevm` only: replace a snapshot of the same name (HMP's `savevm` does; QMP's
    /// `snapshot-save` refuses).
    #[serde(default)]
    pub overwrite: bool,
}

impl VmSnapshotRequest {
    /// A request for `tag` with the defaults: every writable disk, the VM state in the first.
    pub fn tag(tag: impl Into<String>) -> VmSnapshotRequest {
        VmSnapshotRequest {
            tag: tag.into(),
            vmstate: None,
            devices: None,
            overwrite: false,
        }
    }
}

/// One internal snapshot of a disk (a row of `info snapshots` / `qemu-img snapshot -l`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotInfo {
    /// Its id ("1", "2", ...).
    pub id: String,
    /// Its name.
    pub tag: String,
    /// Bytes of VM state it holds (0: a disk-only snapshot).
    pub vm_state_size: u64,
    /// When it was taken: seconds since the epoch.
    pub date_sec: u64,
    /// ... and nanoseconds.
    pub date_nsec: u32,
    /// The guest's clock then, ns.
    pub vm_clock_nsec: u64,
}

/// A disk and its internal snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshots {
    /// The disk's id.
    pub disk: String,
    /// Its snapshots, in the image's order.
    pub snapshots: Vec<VmSnapshotInfo>,
}

/// What QEMU 10 says when no disk can hold a VM state (`bdrv_all_find_vmstate_bs`); `info
/// snapshots` prints it as it is, `savevm` and `loadvm` as their error.
pub const NO_VMSTATE_DISK: &str = "no block device can store vmstate for snapshot";

/// The name `savevm` without a tag gives its snapshot: `vm-%Y%m%d%H%M%S` of `secs` (seconds
/// since the epoch) in the host's local time, as QEMU's `save_snapshot` names it.
pub fn auto_tag(secs: i64) -> String {
    auto_tag_in(secs, Zone::Local)
}

pub(crate) fn auto_tag_in(secs: i64, zone: Zone) -> String {
    match crate::human::civil(secs, zone) {
        Some((y, mo, d, h, mi, s)) => format!("vm-{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}"),
        None => format!("vm-{secs}"),
    }
}

/// HMP's `info snapshots` from the VMM's answer to `ListVmSnapshots` (every disk that can hold
/// snapshots, the VM-state disk first), with `\n` line ends and dates in the host's local
/// time: the snapshots of the VM-state disk that every disk has (loadable, their ids shown as
/// `--` since they differ between images), then, per disk, the ones only some disks have.
pub fn info_text(disks: &[DiskSnapshots]) -> String {
    info_text_in(disks, Zone::Local)
}

pub(crate) fn info_text_in(disks: &[DiskSnapshots], zone: Zone) -> String {
    let Some(vmstate) = disks.first() else {
        return format!("{NO_VMSTATE_DISK}\n");
    };
    if disks.iter().all(|d| d.snapshots.is_empty()) {
        return "There is no snapshot available.\n".into();
    }
    let on_all = |tag: &str| {
        disks
            .iter()
            .all(|d| d.snapshots.iter().any(|s| s.tag == tag))
    };
    let global: Vec<&VmSnapshotInfo> = vmstate
        .snapshots
        .iter()
        .filter(|s| on_all(&s.tag))
        .collect();
    let mut out = String::from("List of snapshots present on all disks:\n");
    if global.is_empty() {
        out.push_str("None\n");
    } else {
        out.push_str(&dump_header());
        out.push('\n');
        for sn in &global {
            out.push_str(&dump(sn, Some("--"), zone));
            out.push('\n');
        }
    }
    for d in disks {
        let partial: Vec<&VmSnapshotInfo> = d
            .snapshots
            .iter()
            .filter(|s| !global.iter().any(|g| g.tag == s.tag))
            .collect();
        if partial.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\nList of partial (non-loadable) snapshots on '{}':\n",
            d.disk
        ));
        out.push_str(&dump_header());
        out.push('\n');
        for sn in partial {
            out.push_str(&dump(sn, None, zone));
            out.push('\n');
        }
    }
    out
}

/// `bdrv_snapshot_dump(NULL)`: the header, without its newline.
fn dump_header() -> String {
    row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
}

/// `bdrv_snapshot_dump(sn)`: one snapshot, without its newline (`id` replaces its id). There
/// is no record/replay here, so the instruction count is always `--`.
fn dump(sn: &VmSnapshotInfo, id: Option<&str>, zone: Zone) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    // QEMU casts each part to int.
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        (secs / 3600) as i32,
        ((secs / 60) % 60) as i32,
        (secs % 60) as i32,
        ((sn.vm_clock_nsec / 1_000_000) % 1000) as i32
    );
    row(
        id.unwrap_or(&sn.id),
        &sn.tag,
        &size_to_str(sn.vm_state_size),
        &date_time(i64::try_from(sn.date_sec).unwrap_or(i64::MAX), zone),
        &clock,
        "--",
    )
}

/// `"%-7s %-16s %8s %19s %15s %10s"`, padded by bytes as C pads.
fn row(id: &str, tag: &str, size: &str, date: &str, clock: &str, icount: &str) -> String {
    let pad = |s: &str, w: usize| " ".repeat(w.saturating_sub(s.len()));
    format!(
        "{id}{} {tag}{} {}{size} {}{date} {}{clock} {}{icount}",
        pad(id, 7),
        pad(tag, 16),
        pad(size, 8),
        pad(date, 19),
        pad(clock, 15),
        pad(icount, 10),
    )
}

#[cfg(test)]
mod tests;
