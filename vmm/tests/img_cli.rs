//! `vmm img` against the real qemu-img: images we create, convert, snapshot and resize are
//! accepted by qemu-img; our info/check read qemu-img's images; check exit codes match
//! qemu-img's on clean, leaking and corrupt images.

mod img_support;

use std::path::Path;
use std::process::Command;

use img_support::*;

fn vmm_img(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("img")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (c, out, err) = vmm_img(args);
    assert_eq!(c, 0, "vmm img {args:?}: {out}{err}");
    out
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Adds `delta` to the refcount of host cluster `cluster` (16-bit refcounts, first block).
fn poke_refcount(p: &Path, cluster: u64, value: u16) {
    let mut b = std::fs::read(p).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let rt = be64(&b, 48) as usize;
    let block = (be64(&b, rt) & !511) as usize;
    let at = block + 2 * cluster as usize;
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
    std::fs::write(p, &b).unwrap();
}

#[test]
fn create_info_check_resize() {
    let dir = tmpdir("cli-create");
    let p = dir.join("a.qcow2");
    let ps = p.to_str().unwrap();
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=16",
        ps,
        "64M",
    ]);
    let q = json(&qemu_img(&["info", "--output", "json", ps]));
    assert_eq!(q["virtual-size"], 64 << 20);
    assert_eq!(q["cluster-size"], 4096);
    assert_clean(&p);
    let ours = json(&ok(&["info", "--output", "json", ps]));
    for k in ["virtual-size", "cluster-size", "format"] {
        assert_eq!(ours[k], q[k], "{k}");
    }
    for k in [
        "compat",
        "refcount-bits",
        "lazy-refcounts",
        "compression-type",
        "corrupt",
    ] {
        assert_eq!(
            ours["format-specific"]["data"][k], q["format-specific"]["data"][k],
            "{k}"
        );
    }
    assert!(ok(&["info", ps]).contains("virtual size: 64 MiB (67108864 bytes)"));
    // Backing file with format; size taken from it.
    let top = dir.join("top.qcow2");
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let q = json(&qemu_img(&[
        "info",
        "--output",
        "json",
        top.to_str().unwrap(),
    ]));
    assert_eq!(q["backing-filename"], "a.qcow2");
    assert_eq!(q["backing-filename-format"], "qcow2");
    assert_eq!(q["virtual-size"], 64 << 20);
    let ours = json(&ok(&["info", "--output", "json", top.to_str().unwrap()]));
    assert_eq!(ours["backing-filename"], q["backing-filename"]);
    // Resize, relative and absolute; shrink refused like qemu-img.
    ok(&["resize", "-q", ps, "+10M"]);
    ok(&["resize", "-q", ps, "1G"]);
    assert_eq!(
        json(&qemu_img(&["info", "--output", "json", ps]))["virtual-size"],
        1u64 << 30
    );
    let (c, _, err) = vmm_img(&["resize", ps, "1M"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("--shrink"), "{err}");
    assert_clean(&p);
    // Errors exit with 1 and one clear line.
    let (c, _, err) = vmm_img(&["info", dir.join("missing").to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    let (c, _, _) = vmm_img(&["create", "-f", "qcow2", "-o", "cluster_size=3000", ps, "1M"]);
    assert_eq!(c, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_exit_codes_match_qemu_img() {
    let dir = tmpdir("cli-check");
    let p = dir.join("c.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 200k"]);
    let (c, out, _) = vmm_img(&["check", ps]);
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("No errors were found on the image."), "{out}");
    // A leak: an extra cluster at the end with refcount 1.
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len.next_multiple_of(65536) + 65536).unwrap();
    drop(f);
    poke_refcount(&p, len.div_ceil(65536), 1);
    assert_eq!(qemu_check(&p).0, 3);
    let (c, out, _) = vmm_img(&["check", ps]);
    assert_eq!(c, 3, "{out}");
    assert!(out.contains("1 leaked clusters were found"), "{out}");
    let j = json(&vmm_img(&["check", "--output", "json", ps]).1);
    assert_eq!(j["leaks"], 1);
    let (c, out, _) = vmm_img(&["check", "-r", "leaks", ps]);
    assert_eq!(c, 0, "{out}");
    assert_clean(&p);
    // A corruption: the L1 table's refcount dropped to 0.
    let l1 = u64::from_be_bytes(std::fs::read(&p).unwrap()[40..48].try_into().unwrap());
    poke_refcount(&p, l1 / 65536, 0);
    assert_eq!(qemu_check(&p).0, 2);
    let (c, out, _) = vmm_img(&["check", ps]);
    assert_eq!(c, 2, "{out}");
    let (c, out, _) = vmm_img(&["check", "-r", "all", ps]);
    assert_eq!(c, 0, "{out}");
    assert_clean(&p);
    // Raw images cannot be checked (qemu-img exits 63).
    let r = dir.join("r.raw");
    std::fs::write(&r, [0u8; 512]).unwrap();
    assert_eq!(vmm_img(&["check", r.to_str().unwrap()]).0, 63);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn convert_and_snapshot_verbs() {
    let dir = tmpdir("cli-convert");
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; 6 << 20];
    Rng(77).fill(&mut data[..2 << 20]);
    Rng(78).fill(&mut data[4 << 20..]);
    std::fs::write(&raw, &data).unwrap();
    let rs = raw.to_str().unwrap();
    for (extra, name) in [
        (vec!["-c"], "c.qcow2"),
        (vec![], "p.qcow2"),
        (
            vec!["-c", "-o", "compression_type=zstd,cluster_size=4k"],
            "z.qcow2",
        ),
    ] {
        let out = dir.join(name);
        let mut args = vec!["convert", "-q"];
        args.extend(extra.iter().copied());
        args.extend(["-f", "raw", "-O", "qcow2", rs, out.to_str().unwrap()]);
        ok(&args);
        assert_clean(&out);
        qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            rs,
            out.to_str().unwrap(),
        ]);
        if extra.contains(&"-c") {
            let j = json(&ok(&["check", "--output", "json", out.to_str().unwrap()]));
            assert!(j["compressed-clusters"].as_u64().unwrap() > 0, "{j}");
        }
        // And back to raw through us.
        let back = dir.join(format!("{name}.raw"));
        ok(&[
            "convert",
            "-q",
            "-O",
            "raw",
            out.to_str().unwrap(),
            back.to_str().unwrap(),
        ]);
        assert_same(name, &std::fs::read(&back).unwrap(), &data);
    }
    // Snapshots: made by us, seen by qemu-img, and the other way round.
    let p = dir.join("p.qcow2");
    let ps = p.to_str().unwrap();
    ok(&["snapshot", "-c", "first", ps]);
    qemu_io(&p, "qcow2", &["write -P 9 0 1M"]);
    qemu_img(&["snapshot", "-c", "second", ps]);
    let ql = qemu_img(&["snapshot", "-l", ps]);
    let ours = ok(&["snapshot", "-l", ps]);
    for name in ["first", "second"] {
        assert!(ql.contains(name) && ours.contains(name), "{ql}\n{ours}");
    }
    ok(&["snapshot", "-a", "first", ps]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", rs, ps]);
    ok(&["snapshot", "-d", "second", ps]);
    assert!(!qemu_img(&["snapshot", "-l", ps]).contains("second"));
    assert_clean(&p);
    let (c, _, err) = vmm_img(&["snapshot", "-a", "nope", ps]);
    assert_eq!(c, 1);
    assert!(err.contains("not found"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
