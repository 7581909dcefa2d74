//! `info snapshots` against QEMU 10's layout (the expected text is C's printf of QEMU's formats,
//! checked by hand), and the request's JSON.

use super::*;

fn sn(id: &str, tag: &str, size: u64, date: u64, clock_ns: u64) -> VmSnapshotInfo {
    VmSnapshotInfo {
        id: id.into(),
        tag: tag.into(),
        vm_state_size: size,
        date_sec: date,
        date_nsec: 0,
        vm_clock_nsec: clock_ns,
    }
}

fn disk(id: &str, snapshots: Vec<VmSnapshotInfo>) -> DiskSnapshots {
    DiskSnapshots {
        disk: id.into(),
        snapshots,
    }
}

const HEADER: &str =
    "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n";

#[test]
fn info_snapshots_lists_the_loadable_then_the_partial_ones() {
    let disks = [
        disk(
            "disk0",
            vec![
                sn("1", "s1", 12_345_678, 1_700_000_000, 3_723_456_000_000),
                sn("2", "only0", 0, 1_700_000_100, 0),
            ],
        ),
        disk(
            "data-disk",
            vec![
                sn("1", "s1", 0, 1_700_000_000, 3_723_456_000_000),
                sn(
                    "3",
                    "a-very-long-snapshot-name",
                    0,
                    1_700_003_600,
                    90_061_001_000_000,
                ),
            ],
        ),
    ];
    let expected = format!(
        "List of snapshots present on all disks:\n{HEADER}\
         --      s1               11.8 MiB 2023-11-14 22:13:20  0001:02:03.456         --\n\
         \n\
         List of partial (non-loadable) snapshots on 'disk0':\n{HEADER}\
         2       only0                 0 B 2023-11-14 22:15:00  0000:00:00.000         --\n\
         \n\
         List of partial (non-loadable) snapshots on 'data-disk':\n{HEADER}\
         3       a-very-long-snapshot-name      0 B 2023-11-14 23:13:20  0025:01:01.001         \
         --\n"
    );
    assert_eq!(info_text_in(&disks, Zone::Utc), expected);
}

#[test]
fn info_snapshots_without_snapshots_or_disks() {
    assert_eq!(
        info_text_in(&[], Zone::Utc),
        "no block device can store vmstate for snapshot\n"
    );
    let empty = [disk("disk0", vec![]), disk("disk1", vec![])];
    assert_eq!(
        info_text_in(&empty, Zone::Utc),
        "There is no snapshot available.\n"
    );
    // Snapshots only on another disk: nothing is loadable.
    let other = [
        disk("disk0", vec![]),
        disk("disk1", vec![sn("1", "x", 0, 0, 0)]),
    ];
    assert_eq!(
        info_text_in(&other, Zone::Utc),
        format!(
            "List of snapshots present on all disks:\nNone\n\
             \nList of partial (non-loadable) snapshots on 'disk1':\n{HEADER}\
             1       x                     0 B 1970-01-01 00:00:00  0000:00:00.000         --\n"
        )
    );
}

#[test]
fn one_disk_with_two_snapshots() {
    let disks = [disk(
        "vda",
        vec![
            sn("1", "a", 1 << 30, 1_700_000_000, 1_500_000_000),
            sn("2", "b", 268_435_456, 1_700_000_001, 0),
        ],
    )];
    assert_eq!(
        info_text_in(&disks, Zone::Utc),
        format!(
            "List of snapshots present on all disks:\n{HEADER}\
             --      a                   1 GiB 2023-11-14 22:13:20  0000:00:01.500         --\n\
             --      b                 256 MiB 2023-11-14 22:13:21  0000:00:00.000         --\n"
        )
    );
    // The local-time variant differs only in its dates.
    let local = info_text(&disks);
    assert_eq!(local.lines().count(), 4);
    assert!(local.contains("1 GiB"));
}

#[test]
fn automatic_tags_are_dated() {
    assert_eq!(auto_tag_in(1_700_000_000, Zone::Utc), "vm-20231114221320");
    let t = auto_tag(1_700_000_000);
    assert!(t.starts_with("vm-2023111") && t.len() == 17, "{t}");
}

#[test]
fn requests_take_qemus_members() {
    let r: VmSnapshotRequest = serde_json::from_str(r#"{"tag": "s1"}"#).unwrap();
    assert_eq!(r, VmSnapshotRequest::tag("s1"));
    let r: VmSnapshotRequest = serde_json::from_str(
        r#"{"tag": "s1", "vmstate": "d0", "devices": ["d0", "d1"], "overwrite": true}"#,
    )
    .unwrap();
    assert_eq!(r.vmstate.as_deref(), Some("d0"));
    assert_eq!(r.devices, Some(vec!["d0".to_string(), "d1".to_string()]));
    assert!(r.overwrite);
    assert!(serde_json::from_str::<VmSnapshotRequest>(r#"{"tag": "s", "x": 1}"#).is_err());
}
