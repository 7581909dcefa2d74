use super::*;
use crate::block::cache::test_dir;
use crate::block::{open, ImageFormat, OpenOptions};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let p = test_dir().join(format!("lock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

fn raw(path: &Path, read_only: bool) -> crate::block::Result<Box<dyn DiskImage>> {
    let o = OpenOptions {
        read_only,
        ..Default::default()
    };
    open(path, Some(ImageFormat::Raw), &o)
}

fn held(path: &Path) -> Vec<u64> {
    let f = File::open(path).unwrap();
    (PERM_BASE..PERM_BASE + 4)
        .chain(SHARED_BASE..SHARED_BASE + 4)
        .filter(|&b| test_lock(f.as_raw_fd(), b).unwrap())
        .collect()
}

fn has_tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn bytes_match_qemu() {
    assert_eq!(Perms::WRITE | Perms::RESIZE, Perms(0b1010));
    assert_eq!((Perms::WRITE | Perms::RESIZE).to_string(), "write, resize");
    let bytes = |a: Access| a.lock_bytes().collect::<Vec<_>>();
    assert_eq!(bytes(Access::raw_drive(false)), [100, 101, 201]);
    assert_eq!(bytes(Access::raw_drive(true)), [100, 201]);
    assert_eq!(bytes(Access::qcow2_file(false)), [100, 101, 103, 201, 203]);
    assert_eq!(bytes(Access::qcow2_file(true)), [100, 201, 203]);
}

#[test]
fn rw_excludes_everyone_and_readers_share() {
    let p = scratch("rw");
    let a = raw(&p, false).unwrap();
    assert_eq!(held(&p), [100, 101, 201]);
    for ro in [false, true] {
        let msg = raw(&p, ro).err().unwrap().to_string();
        assert!(
            msg.contains(&*p.to_string_lossy())
                && msg.contains("is in use by another process (locked: write)"),
            "{msg}"
        );
    }
    drop(a);
    assert!(held(&p).is_empty(), "locks outlived the image");

    let r1 = raw(&p, true).unwrap();
    let r2 = raw(&p, true).unwrap();
    assert!(raw(&p, false).is_err(), "a reader does not share write");
    drop(r1);
    assert!(raw(&p, false).is_err());
    drop(r2);
    let mut w = raw(&p, false).unwrap();
    w.write_at(b"ok", 0).unwrap();
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn qcow2_is_locked_too() {
    let p = test_dir().join(format!("lock-q-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    crate::block::qcow2::create::create(
        &p,
        &crate::block::qcow2::create::CreateOptions::new(1 << 20),
    )
    .unwrap();
    let o = OpenOptions::default();
    let mut a = open(&p, None, &o).unwrap();
    a.write_at(b"q", 0).unwrap();
    assert_eq!(held(&p), [100, 101, 103, 201, 203]);
    let msg = open(&p, None, &o).err().unwrap().to_string();
    assert!(msg.contains("locked: write, resize"), "{msg}");
    // Our raw reader would see the qcow2 writer too.
    assert!(raw(&p, true).is_err());
    drop(a);
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let _r1 = open(&p, None, &ro).unwrap();
    let _r2 = open(&p, None, &ro).unwrap();
    assert!(open(&p, None, &o).is_err());
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn images_are_handed_over_and_taken_back() {
    // A live migration's switchover: the source lets go, the destination takes the image;
    // the source cannot take it back while the destination holds it.
    for fmt in ["raw", "qcow2"] {
        let p = test_dir().join(format!("lock-hand-{fmt}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let o = OpenOptions::default();
        let open_it = || match fmt {
            "raw" => raw(&p, false),
            _ => open(&p, None, &o),
        };
        if fmt == "raw" {
            std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        } else {
            crate::block::qcow2::create::create(
                &p,
                &crate::block::qcow2::create::CreateOptions::new(1 << 20),
            )
            .unwrap();
        }
        let mut src = open_it().unwrap();
        src.write_at(b"from the source", 0).unwrap();
        assert!(open_it().is_err());
        src.hand_over().unwrap();
        assert!(held(&p).is_empty(), "{fmt}: locks left after the hand-over");
        let mut dst = open_it().unwrap();
        let mut buf = [0u8; 15];
        dst.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf, b"from the source",
            "{fmt}: the source's write was flushed"
        );
        dst.write_at(b"from the destin", 0).unwrap();
        dst.flush().unwrap();
        let msg = src.take_back().err().unwrap().to_string();
        assert!(msg.contains("in use by another process"), "{fmt}: {msg}");
        drop(dst);
        src.take_back().unwrap();
        assert!(
            open_it().is_err(),
            "{fmt}: the source holds its locks again"
        );
        // What the destination wrote is seen: metadata is read afresh.
        src.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"from the destin", "{fmt}");
        drop(src);
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn unwritable_qcow2_refused_for_rw() {
    let p = test_dir().join(format!("lock-qro-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    crate::block::qcow2::create::create(
        &p,
        &crate::block::qcow2::create::CreateOptions::new(1 << 20),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
    let msg = open(&p, None, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("no write permission bits"), "{msg}");
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    assert!(open(&p, None, &ro).is_ok());
    std::fs::remove_file(&p).unwrap();
}

/// qemu-img sees our locks. On raw it refuses to read an image we hold read-write
/// (`convert` does not share write; `info` on raw asks for no permission at all, so it
/// runs); on qcow2 even `info` refuses, since qcow2 metadata must not change under it.
/// `-U` overrides, and our read-only holds let qemu-img in.
#[test]
fn qemu_img_sees_our_locks() {
    if !has_tool("qemu-img") {
        eprintln!("qemu-img not installed; skipping");
        return;
    }
    let run = |args: &[&str], img: &Path| {
        let out = Command::new("qemu-img")
            .args(args)
            .arg(img)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let p = scratch("qemu-img");
    let dst = p.with_extension("out");
    let dst = dst.to_str().unwrap();
    let convert = |img: &Path, u: bool| {
        let mut a = vec!["convert", "-f", "raw", "-O", "raw"];
        if u {
            a.push("-U");
        }
        let out = Command::new("qemu-img")
            .args(&a)
            .arg(img)
            .arg(dst)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let w = raw(&p, false).unwrap();
    let (ok, err) = convert(&p, false);
    assert!(
        !ok && err.contains("Failed to get shared \"write\" lock"),
        "{err}"
    );
    assert!(convert(&p, true).0);
    drop(w);
    let r = raw(&p, true).unwrap();
    let (ok, err) = convert(&p, false);
    assert!(ok, "{err}");
    drop(r);
    let _ = std::fs::remove_file(dst);
    std::fs::remove_file(&p).unwrap();

    let q = test_dir().join(format!("lock-qemu-img-q-{}", std::process::id()));
    let _ = std::fs::remove_file(&q);
    crate::block::qcow2::create::create(
        &q,
        &crate::block::qcow2::create::CreateOptions::new(1 << 20),
    )
    .unwrap();
    let w = open(&q, None, &OpenOptions::default()).unwrap();
    let (ok, err) = run(&["info"], &q);
    assert!(!ok && err.contains("lock"), "{err}");
    assert!(run(&["info", "-U"], &q).0);
    drop(w);
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let _r = open(&q, None, &ro).unwrap();
    let (ok, err) = run(&["info"], &q);
    assert!(ok, "{err}");
    std::fs::remove_file(&q).unwrap();
}

/// We see QEMU's locks: while qemu-io holds the image read-write, we open it neither way.
#[test]
fn we_see_qemu_io_locks() {
    if !has_tool("qemu-io") {
        eprintln!("qemu-io not installed; skipping");
        return;
    }
    let p = scratch("qemu-io");
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 20000"])
        .arg(&p)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !held(&p).contains(&101) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "qemu-io never locked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rw = raw(&p, false).err().map(|e| e.to_string());
    let ro = raw(&p, true).err().map(|e| e.to_string());
    let _ = child.kill();
    let _ = child.wait();
    let rw = rw.expect("opened read-write next to qemu-io");
    assert!(
        rw.contains("in use by another process (locked: write"),
        "{rw}"
    );
    assert!(ro.is_some(), "opened read-only next to a qemu-io writer");
    assert!(raw(&p, false).is_ok(), "lock outlived qemu-io");
    std::fs::remove_file(&p).unwrap();
}
