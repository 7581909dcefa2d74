//! The VM state area on its own, and against QEMU: `qemu-img` reads the snapshot table and
//! checks the images, and `qemu-system-x86_64 -machine none` writes a state we load and loads
//! a state we wrote. The QEMU parts are skipped when the tools are not installed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::super::check::{check, Repair};
use super::super::create::{create, CreateOptions};
use super::super::{Error, Mapping, Qcow2Image};
use super::MAX_VM_STATE_BYTES;
use crate::block::cache::test_dir;
use crate::block::{DiskImage, OpenOptions};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    let d = test_dir().join(format!("qcow2-vmstate-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Incompressible bytes, different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn open_rw(path: &Path) -> Qcow2Image {
    Qcow2Image::open(path, &OpenOptions::default()).unwrap()
}

fn new_image(path: &Path, opts: &CreateOptions) -> Qcow2Image {
    create(path, opts).unwrap();
    open_rw(path)
}

/// Writes `state` from position 0 in `chunk`-byte pieces, as a buffered savevm stream does.
fn write_state(img: &mut Qcow2Image, state: &[u8], chunk: usize) {
    for (i, c) in state.chunks(chunk).enumerate() {
        img.write_vm_state((i * chunk) as u64, c).unwrap();
    }
}

fn read_state(img: &mut Qcow2Image, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_vm_state(0, &mut b).unwrap();
    b
}

fn assert_clean(img: &mut Qcow2Image) {
    let r = check(img, Repair::None, &mut |_, _| {}).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

/// Host clusters holding the first `len` bytes of the active VM state area.
fn state_clusters(img: &mut Qcow2Image, len: usize) -> Vec<u64> {
    let cs = img.cs;
    let start = img.vm_state_offset();
    (0..(len as u64).div_ceil(cs))
        .map(|k| match img.mapping(start + k * cs).unwrap() {
            Mapping::Normal { host, .. } => host,
            m => panic!("VM state cluster {k} is {m:?}"),
        })
        .collect()
}

fn refcount(img: &mut Qcow2Image, host: u64) -> u64 {
    let fe = img.file_end();
    img.rc
        .get(&img.file, host >> img.header.cluster_bits, fe)
        .unwrap()
}

fn has_tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `qemu-img args...`, which must succeed; `None` without qemu-img.
fn qemu_img(args: &[&str]) -> Option<String> {
    if !has_tool("qemu-img") {
        eprintln!("qemu-img not installed; skipping its part");
        return None;
    }
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

/// `qemu-img check` finds nothing wrong (it exits non-zero on leaks and corruptions).
fn qemu_check(path: &Path) {
    if let Some(out) = qemu_img(&["check", path.to_str().unwrap()]) {
        assert!(out.contains("No errors were found"), "{out}");
    }
}

/// The snapshot list of `qemu-img info --output=json`.
fn qemu_snapshots(path: &Path) -> Option<Vec<serde_json::Value>> {
    let out = qemu_img(&["info", "--output=json", path.to_str().unwrap()])?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    Some(v["snapshots"].as_array().cloned().unwrap_or_default())
}

fn qemu_snapshot<'a>(list: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    list.iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {name} in {list:?}"))
}

#[test]
fn the_area_starts_at_the_first_l1_entry_past_the_disk() {
    let dir = scratch("offset");
    let path = dir.join("a.qcow2");
    // 64 KiB clusters: one L2 table maps 512 MiB.
    let mut img = new_image(&path, &CreateOptions::new(64 << 20));
    assert_eq!(img.vm_state_offset(), 512 << 20);
    img.resize(512 << 20).unwrap();
    assert_eq!(img.vm_state_offset(), 512 << 20);
    img.resize((512 << 20) + 512).unwrap();
    assert_eq!(img.vm_state_offset(), 1 << 30);
    drop(img);
    // 512-byte clusters: one L2 table maps 32 KiB.
    let o = CreateOptions {
        cluster_bits: 9,
        ..CreateOptions::new((1 << 20) + 1536)
    };
    let img = new_image(&dir.join("b.qcow2"), &o);
    assert_eq!(img.vm_state_offset(), (1 << 20) + (32 << 10));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The whole cycle: savevm (state, snapshot, state dropped from the active disk), qemu-img
/// sees the snapshot and its VM size and finds the image clean, the disk moves on, loadvm
/// brings disk and state back, delvm and the clean-up give the space back.
#[test]
fn savevm_loadvm_delvm() {
    let dir = scratch("cycle");
    let path = dir.join("a.qcow2");
    let mut img = new_image(&path, &CreateOptions::new(64 << 20));
    let disk1 = pattern(1, 300 * KIB);
    img.write_at(&disk1, 1 << 20).unwrap();
    let state = pattern(2, 5 * MIB + 1234);
    write_state(&mut img, &state, 32 * KIB);
    // The write path grew the L1 table by one entry, as QEMU's does (1 -> 2).
    assert_eq!(img.l1.len(), 2);
    assert_eq!(img.header.l1_size, 2);
    assert_eq!(read_state(&mut img, state.len()), state);
    let hosts = state_clusters(&mut img, state.len());

    img.create_snapshot_with_state("s1", state.len() as u64, 123_456_789)
        .unwrap();
    let sn = img.snapshot("s1").unwrap().clone();
    assert_eq!(
        (sn.vm_state_size, sn.vm_clock_nsec),
        (state.len() as u64, 123_456_789)
    );
    // The active disk no longer holds the state: zero clusters (v3), as QEMU leaves them.
    let start = img.vm_state_offset();
    assert_eq!(img.mapping(start).unwrap(), Mapping::Zero { host: 0 });
    assert!(read_state(&mut img, 64 * KIB).iter().all(|&b| b == 0));
    for &h in &hosts {
        assert_eq!(refcount(&mut img, h), 1, "held by the snapshot alone");
    }
    assert_clean(&mut img);
    drop(img);

    if let Some(list) = qemu_snapshots(&path) {
        let s = qemu_snapshot(&list, "s1");
        assert_eq!(s["vm-state-size"], state.len() as u64);
        assert_eq!(s["vm-clock-nsec"], 123_456_789);
        let text = qemu_img(&["snapshot", "-l", path.to_str().unwrap()]).unwrap();
        let line = text.lines().find(|l| l.contains(" s1 ")).unwrap();
        assert!(line.contains(" 5 MiB "), "{text}");
    }
    qemu_check(&path);

    let mut img = open_rw(&path);
    img.write_at(&pattern(3, 300 * KIB), 1 << 20).unwrap();
    let sn = img.load_snapshot("s1").unwrap();
    assert_eq!(sn.vm_state_size, state.len() as u64);
    assert_eq!(read_state(&mut img, sn.vm_state_size as usize), state);
    let mut disk = vec![0u8; disk1.len()];
    img.read_at(&mut disk, 1 << 20).unwrap();
    assert_eq!(disk, disk1);
    // Past the state: zeros, in its last cluster and after it.
    let mut past = vec![1u8; 200 * KIB];
    img.read_vm_state(sn.vm_state_size, &mut past).unwrap();
    assert!(past.iter().all(|&b| b == 0));
    // Shared by the snapshot and the active disk now.
    assert_eq!(state_clusters(&mut img, state.len()), hosts);
    assert!(hosts.iter().all(|&h| refcount(&mut img, h) == 2));

    img.delete_snapshot("s1").unwrap();
    assert!(img.snapshots().is_empty());
    // As in QEMU, the loaded state stays in the active disk until overwritten or discarded.
    assert!(hosts.iter().all(|&h| refcount(&mut img, h) == 1));
    assert_eq!(read_state(&mut img, state.len()), state);
    assert_clean(&mut img);
    img.discard_vm_state(state.len() as u64).unwrap();
    img.flush().unwrap();
    assert!(hosts.iter().all(|&h| refcount(&mut img, h) == 0));
    assert_clean(&mut img);
    drop(img);
    qemu_check(&path);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn deleting_the_snapshot_frees_its_state() {
    let dir = scratch("delete");
    let path = dir.join("a.qcow2");
    let mut img = new_image(&path, &CreateOptions::new(16 << 20));
    let state = pattern(4, 3 * MIB + 5);
    write_state(&mut img, &state, 64 * KIB);
    let hosts = state_clusters(&mut img, state.len());
    img.create_snapshot_with_state("s1", state.len() as u64, 0)
        .unwrap();
    let len = img.file_length();
    img.delete_snapshot("s1").unwrap();
    assert!(hosts.iter().all(|&h| refcount(&mut img, h) == 0));
    assert_clean(&mut img);
    // The space is reused by the next state.
    write_state(&mut img, &pattern(5, state.len()), 64 * KIB);
    img.create_snapshot_with_state("s2", state.len() as u64, 0)
        .unwrap();
    assert!(img.file_length() <= len, "{} > {len}", img.file_length());
    assert_clean(&mut img);
    drop(img);
    qemu_check(&path);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Small clusters (an L2 table maps 2 MiB), a disk size that is not a multiple of that, a state
/// over several L2 tables written in one call; v2 and v3.
#[test]
fn state_over_several_l2_tables_after_an_odd_disk_size() {
    for version in [2, 3] {
        let dir = scratch(&format!("span-v{version}"));
        let path = dir.join("a.qcow2");
        let size = (3 << 20) + 512;
        let o = CreateOptions {
            cluster_bits: 12,
            version,
            ..CreateOptions::new(size)
        };
        let mut img = new_image(&path, &o);
        assert_eq!(img.vm_state_offset(), 4 << 20);
        assert_eq!(img.l1.len(), 2);
        let tail = pattern(6, 512);
        img.write_at(&tail, size - 512).unwrap();
        let state = pattern(7, 5 * MIB + 123);
        img.write_vm_state(0, &state).unwrap();
        // Entries 2, 3 and 4; grown as QEMU grows it, 2 -> 3 -> 5.
        assert_eq!(img.l1.len(), 5);
        img.create_snapshot_with_state("s1", state.len() as u64, 1)
            .unwrap();
        let start = img.vm_state_offset();
        let want = if version == 3 {
            Mapping::Zero { host: 0 }
        } else {
            Mapping::Unallocated
        };
        assert_eq!(img.mapping(start).unwrap(), want);
        assert_eq!(img.mapping(start + (5 << 20)).unwrap(), want);
        assert_clean(&mut img);
        drop(img);
        qemu_check(&path);

        // A read-only view of the snapshot reads its state without reverting anything.
        let mut view = Qcow2Image::open_snapshot(&path, "s1", &OpenOptions::default()).unwrap();
        assert_eq!(read_state(&mut view, state.len()), state);
        drop(view);

        let mut img = open_rw(&path);
        img.write_at(&pattern(8, 512), size - 512).unwrap();
        img.load_snapshot("1").unwrap();
        assert_eq!(read_state(&mut img, state.len()), state);
        let mut b = vec![0u8; 512];
        img.read_at(&mut b, size - 512).unwrap();
        assert_eq!(b, tail);
        assert_clean(&mut img);
        drop(img);
        qemu_check(&path);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Two savevms, each loadable any number of times, and a third taken after loading the first
/// (its writes copy the clusters the first one shares instead of changing them).
#[test]
fn each_snapshot_keeps_its_own_state() {
    let dir = scratch("two");
    let path = dir.join("a.qcow2");
    let mut img = new_image(&path, &CreateOptions::new(32 << 20));
    let a = pattern(10, 700 * KIB + 5);
    let b = pattern(11, 2 * MIB + 77);
    let c = pattern(12, MIB);
    write_state(&mut img, &a, 32 * KIB);
    img.create_snapshot_with_state("s1", a.len() as u64, 1)
        .unwrap();
    write_state(&mut img, &b, 32 * KIB);
    img.create_snapshot_with_state("s2", b.len() as u64, 2)
        .unwrap();
    for (name, want) in [("s1", &a), ("s2", &b), ("s1", &a)] {
        let sn = img.load_snapshot(name).unwrap();
        assert_eq!(&read_state(&mut img, sn.vm_state_size as usize), want);
    }
    // savevm right after loadvm of s1.
    write_state(&mut img, &c, 32 * KIB);
    img.create_snapshot_with_state("s3", c.len() as u64, 3)
        .unwrap();
    assert_clean(&mut img);
    drop(img);
    if let Some(list) = qemu_snapshots(&path) {
        for (name, len) in [("s1", a.len()), ("s2", b.len()), ("s3", c.len())] {
            assert_eq!(qemu_snapshot(&list, name)["vm-state-size"], len as u64);
        }
    }
    qemu_check(&path);

    let mut img = open_rw(&path);
    for (name, want) in [("s1", &a), ("s3", &c), ("s2", &b)] {
        let sn = img.load_snapshot(name).unwrap();
        assert_eq!(&read_state(&mut img, sn.vm_state_size as usize), want);
    }
    img.delete_snapshot("s1").unwrap();
    assert_clean(&mut img);
    for (name, want) in [("s3", &c), ("s2", &b)] {
        let sn = img.load_snapshot(name).unwrap();
        assert_eq!(&read_state(&mut img, sn.vm_state_size as usize), want);
    }
    img.delete_snapshot("s2").unwrap();
    img.delete_snapshot("s3").unwrap();
    img.discard_vm_state(c.len().max(b.len()) as u64).unwrap();
    assert_clean(&mut img);
    drop(img);
    qemu_check(&path);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Over a backing file, the area reads as a disk read would (QEMU's load is a plain driver
/// read): unallocated clusters from the backing file at the same offset, zeros past its end.
/// The discard after savevm leaves zero clusters, so the backing file shows through no more.
#[test]
fn state_over_a_backing_file() {
    let dir = scratch("backing");
    let base_data = pattern(20, 8 * MIB);
    std::fs::write(dir.join("base.raw"), &base_data).unwrap();
    let path = dir.join("top.qcow2");
    let o = CreateOptions {
        cluster_bits: 12,
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::new(1 << 20)
    };
    let mut img = new_image(&path, &o);
    let start = img.vm_state_offset() as usize;
    assert_eq!(start, 2 << 20);
    let mut b = vec![0u8; 8 * KIB];
    img.read_vm_state(0, &mut b).unwrap();
    assert_eq!(b, base_data[start..start + 8 * KIB]);
    let mut far = vec![1u8; 4 * KIB];
    img.read_vm_state((8 * MIB - start) as u64, &mut far)
        .unwrap();
    assert!(far.iter().all(|&x| x == 0), "zeros past the backing file");
    // A partial cluster is completed from the backing file.
    img.write_vm_state(100, b"state").unwrap();
    let mut cl = vec![0u8; 4 * KIB];
    img.read_vm_state(0, &mut cl).unwrap();
    let mut want = base_data[start..start + 4 * KIB].to_vec();
    want[100..105].copy_from_slice(b"state");
    assert_eq!(cl, want);

    let state = pattern(21, 100 * KIB + 3);
    write_state(&mut img, &state, 32 * KIB);
    img.create_snapshot_with_state("s1", state.len() as u64, 0)
        .unwrap();
    let rounded = state.len().next_multiple_of(4 * KIB);
    assert!(read_state(&mut img, rounded).iter().all(|&x| x == 0));
    let mut after = vec![0u8; 4 * KIB];
    img.read_vm_state(rounded as u64, &mut after).unwrap();
    assert_eq!(after, base_data[start + rounded..start + rounded + 4 * KIB]);
    assert_clean(&mut img);
    drop(img);
    qemu_check(&path);

    let mut img = open_rw(&path);
    img.load_snapshot("s1").unwrap();
    assert_eq!(read_state(&mut img, state.len()), state);
    img.delete_snapshot("s1").unwrap();
    assert_clean(&mut img);
    drop(img);
    qemu_check(&path);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn limits_and_refusals() {
    let dir = scratch("limits");
    let path = dir.join("a.qcow2");
    let mut img = new_image(&path, &CreateOptions::new(1 << 20));
    let big = |r: Result<(), Error>| matches!(r, Err(Error::VmStateTooLarge { .. }));
    assert!(big(img.write_vm_state(MAX_VM_STATE_BYTES - 1, b"ab")));
    assert!(big(img.write_vm_state(u64::MAX, b"a")));
    assert!(big(img.read_vm_state(u64::MAX - 1, &mut [0u8; 4])));
    assert!(big(img.discard_vm_state(MAX_VM_STATE_BYTES + 1)));
    assert!(big(img.create_snapshot_with_state(
        "x",
        MAX_VM_STATE_BYTES + 1,
        0
    )));
    assert!(img.snapshots().is_empty());
    img.write_vm_state(MAX_VM_STATE_BYTES - 1, b"").unwrap();
    img.read_vm_state(MAX_VM_STATE_BYTES - 1, &mut [0u8; 1])
        .unwrap();

    // Disk-only snapshots: `loadvm` refuses them with QEMU's words, `snapshot -a` doesn't.
    img.create_snapshot("d").unwrap();
    let e = img.load_snapshot("d").unwrap_err();
    assert!(matches!(e, Error::DiskOnlySnapshot(_)));
    assert_eq!(
        e.to_string(),
        // QEMU 10's text, double space included.
        "This is a disk-only snapshot. Revert to it  offline using qemu-img"
    );
    img.apply_snapshot("d").unwrap();
    assert!(matches!(
        img.snapshot("nope"),
        Err(Error::SnapshotNotFound(_))
    ));
    // A size past 32 bits goes in the extra data only (the old field says 0), as QEMU writes it.
    img.create_snapshot_with_state("big", 5 << 30, 7).unwrap();
    assert_clean(&mut img);
    drop(img);
    let img = open_rw(&path);
    assert_eq!(img.snapshot("big").unwrap().vm_state_size, 5 << 30);
    drop(img);
    if let Some(list) = qemu_snapshots(&path) {
        assert_eq!(qemu_snapshot(&list, "big")["vm-state-size"], 5u64 << 30);
        assert_eq!(qemu_snapshot(&list, "d")["vm-state-size"], 0);
    }

    // An area the L1 table cannot reach (512-byte clusters map 32 KiB per entry: 2^39 needs
    // 128 MiB of L1 table) is refused before anything is allocated.
    let p2 = dir.join("tiny.qcow2");
    let o = CreateOptions {
        cluster_bits: 9,
        ..CreateOptions::new(1 << 20)
    };
    let mut img = new_image(&p2, &o);
    let (l1, len) = (img.l1.len(), img.file_length());
    assert!(matches!(
        img.write_vm_state(1 << 39, b"x"),
        Err(Error::TableTooLarge("L1", _))
    ));
    assert_eq!((img.l1.len(), img.file_length()), (l1, len));
    assert_clean(&mut img);
    drop(img);

    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut img = Qcow2Image::open(&p2, &ro).unwrap();
    assert!(matches!(img.write_vm_state(0, b"x"), Err(Error::ReadOnly)));
    assert!(matches!(img.discard_vm_state(1), Err(Error::ReadOnly)));
    img.read_vm_state(0, &mut [0u8; 16]).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `qemu-system-x86_64 -machine none` on `image` with HMP `commands` (then `quit`), and
/// returns what the monitor and stderr said.
fn qemu_hmp(image: &Path, commands: &[&str]) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-accel", "tcg", "-nodefaults"])
        .args(["-display", "none", "-monitor", "stdio", "-drive"])
        .arg(format!(
            "file={},if=none,id=disk0,format=qcow2",
            image.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = commands.join("\n");
    input.push_str("\nquit\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-system-x86_64 {commands:?} did not quit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// QEMU's savevm writes a state we load and read; a state we write, QEMU's loadvm loads (and a
/// garbage one it rejects, so the success means it parsed ours).
#[test]
fn states_cross_with_qemu() {
    if !has_tool("qemu-system-x86_64") || !has_tool("qemu-img") {
        eprintln!("qemu-system-x86_64 or qemu-img not installed; skipping");
        return;
    }
    let dir = scratch("qemu");
    let theirs = dir.join("theirs.qcow2");
    qemu_img(&["create", "-f", "qcow2", theirs.to_str().unwrap(), "64M"]).unwrap();
    let out = qemu_hmp(&theirs, &["savevm q1"]);
    assert!(!out.contains("rror"), "{out}");
    let mut img = open_rw(&theirs);
    assert_clean(&mut img);
    let sn = img.load_snapshot("q1").unwrap();
    let stream = read_state(&mut img, sn.vm_state_size as usize);
    // QEMU_VM_FILE_MAGIC and QEMU_VM_FILE_VERSION.
    assert_eq!(stream[..8], *b"QEVM\0\0\0\x03");
    assert_clean(&mut img);
    drop(img);
    qemu_check(&theirs);

    // Ours: tiny clusters and an odd disk size, so the stream spans clusters and L2 tables.
    let ours = dir.join("ours.qcow2");
    let o = CreateOptions {
        cluster_bits: 9,
        ..CreateOptions::new((1 << 20) + 1536)
    };
    let mut img = new_image(&ours, &o);
    write_state(&mut img, &stream, 100);
    img.create_snapshot_with_state("good", stream.len() as u64, 5_000_000_000)
        .unwrap();
    write_state(&mut img, &pattern(30, stream.len()), 100);
    img.create_snapshot_with_state("garbage", stream.len() as u64, 0)
        .unwrap();
    img.create_snapshot("disk").unwrap();
    drop(img);
    qemu_check(&ours);

    let out = qemu_hmp(&ours, &["loadvm garbage"]);
    assert!(out.contains("rror"), "QEMU loaded garbage: {out}");
    let out = qemu_hmp(&ours, &["loadvm disk"]);
    assert!(out.contains("disk-only"), "{out}");
    let out = qemu_hmp(&ours, &["loadvm good", "info snapshots"]);
    assert!(!out.contains("rror"), "{out}");
    assert!(out.contains("good"), "{out}");
    // QEMU's loadvm reverted the disk with our tables: the state is in the active disk now.
    let mut img = open_rw(&ours);
    assert_eq!(read_state(&mut img, stream.len()), stream);
    assert_clean(&mut img);
    drop(img);
    qemu_check(&ours);
    std::fs::remove_dir_all(&dir).unwrap();
}
