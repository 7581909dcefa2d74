//! Hostile images: each malformed image gets a clear error, never a panic, a hang or an
//! unbounded allocation. Images are made by us or qemu-img and then damaged byte by byte.

mod img_support;

use std::path::{Path, PathBuf};

use devices::block::qcow2::{create, CreateOptions, Qcow2Image};
use devices::block::{BackingPolicy, DiskImage, OpenOptions};
use img_support::*;

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// A 1 MiB image with 64 KiB clusters and one written cluster: header, refcount table at 64K,
/// refcount block at 128K, L1 at 192K, L2 at 256K, data at 320K.
fn base_image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    create(&p, &CreateOptions::new(1 << 20)).unwrap();
    let mut img = open_rw(&p);
    img.write_at(&[0xaa; 65536], 0).unwrap();
    drop(img);
    let b = std::fs::read(&p).unwrap();
    assert_eq!(be64(&b, 40), 3 << 16, "L1 location");
    assert_eq!(
        be64(&b, 3 << 16) & 0x00ff_ffff_ffff_fe00,
        4 << 16,
        "L2 location"
    );
    p
}

fn damaged(dir: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let p = base_image(dir, name);
    let mut b = std::fs::read(&p).unwrap();
    f(&mut b);
    std::fs::write(&p, &b).unwrap();
    p
}

fn open_err(p: &Path, opts: &OpenOptions) -> String {
    match Qcow2Image::open(p, opts) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => format!("{e}"),
    }
}

fn read_err(p: &Path) -> String {
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut img = Qcow2Image::open(p, &ro).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    match img.read_at(&mut buf, 0) {
        Ok(()) => panic!("read of {} succeeded", p.display()),
        Err(e) => e.to_string(),
    }
}

fn expect(msg: &str, what: &str) {
    assert!(msg.contains(what), "expected {what:?} in {msg:?}");
}

#[test]
fn malformed_headers_are_refused() {
    let d = tmpdir("hostile-hdr");
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let p = damaged(&d, "trunc-hdr", |b| b.truncate(50));
    expect(&open_err(&p, &ro), "truncated");
    let p = damaged(&d, "trunc-l1", |b| b.truncate((3 << 16) + 4));
    expect(&open_err(&p, &ro), "past the end of the file");
    let p = damaged(&d, "huge-l1", |b| {
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "L1 table too large");
    let p = damaged(&d, "l1-past-eof", |b| {
        b[36..40].copy_from_slice(&100_000u32.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "past the end of the file");
    let p = damaged(&d, "misaligned-l1", |b| {
        b[40..48].copy_from_slice(&((3u64 << 16) + 8).to_be_bytes())
    });
    expect(&open_err(&p, &ro), "not cluster aligned");
    let p = damaged(&d, "l1-in-header", |b| {
        b[40..48].copy_from_slice(&0u64.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "overlaps the header");
    let p = damaged(&d, "rt-zero", |b| {
        b[56..60].copy_from_slice(&0u32.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "refcount_table_clusters = 0");
    let p = damaged(&d, "rt-huge", |b| {
        b[56..60].copy_from_slice(&u32::MAX.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "refcount table too large");
    let p = damaged(&d, "rt-past-eof", |b| {
        b[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes())
    });
    expect(&open_err(&p, &ro), "past the end of the file");
    let p = damaged(&d, "rt-in-header", |b| {
        b[48..56].copy_from_slice(&0u64.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "overlaps the header");
    let p = damaged(&d, "size-too-big", |b| {
        b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes())
    });
    expect(&open_err(&p, &ro), "too small");
    let p = damaged(&d, "cluster-bits", |b| {
        b[20..24].copy_from_slice(&40u32.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "cluster_bits 40");
    let p = damaged(&d, "unknown-incompat", |b| {
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())
    });
    expect(&open_err(&p, &ro), "unknown incompatible features: bit 40");
    let p = damaged(&d, "data-file", |b| b[79] |= 4);
    expect(&open_err(&p, &ro), "external data files");
    let p = damaged(&d, "snapshots-many", |b| {
        b[60..64].copy_from_slice(&u32::MAX.to_be_bytes())
    });
    expect(&open_err(&p, &ro), "too many snapshots");
    let p = damaged(&d, "snapshots-past-eof", |b| {
        b[60..64].copy_from_slice(&10_000u32.to_be_bytes());
        b[64..72].copy_from_slice(&(1u64 << 16).to_be_bytes());
    });
    expect(&open_err(&p, &ro), "past the end of the file");
    let p = damaged(&d, "ext-overflow", |b| {
        // An extension claiming to be longer than the header cluster.
        b[104..108].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
    });
    expect(&open_err(&p, &ro), "header extension");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn malformed_tables_fail_the_request_not_the_process() {
    let d = tmpdir("hostile-tables");
    let p = damaged(&d, "l2-past-eof", |b| {
        b[3 << 16..(3 << 16) + 8].copy_from_slice(&((1u64 << 40) | (1 << 63)).to_be_bytes())
    });
    expect(&read_err(&p), "invalid L2 table");
    let p = damaged(&d, "l2-misaligned", |b| {
        b[3 << 16..(3 << 16) + 8].copy_from_slice(&((4u64 << 16) + 512).to_be_bytes())
    });
    expect(&read_err(&p), "invalid L2 table");
    let p = damaged(&d, "data-past-eof", |b| {
        b[4 << 16..(4 << 16) + 8].copy_from_slice(&((1u64 << 40) | (1 << 63)).to_be_bytes())
    });
    expect(&read_err(&p), "invalid host offset");
    // An L2 entry pointing at the refcount table: reads and writes are refused.
    let p = damaged(&d, "data-on-metadata", |b| {
        b[4 << 16..(4 << 16) + 8].copy_from_slice(&((1u64 << 16) | (1 << 63)).to_be_bytes())
    });
    expect(&read_err(&p), "holds image metadata");
    let mut img = open_rw(&p);
    expect(
        &img.write_at(b"boom", 10).unwrap_err().to_string(),
        "holds image metadata",
    );
    drop(img);
    let p = damaged(&d, "data-on-header", |b| {
        b[4 << 16..(4 << 16) + 8].copy_from_slice(&(512u64 | (1 << 63)).to_be_bytes())
    });
    expect(&read_err(&p), "invalid host offset");
    // A compressed entry with garbage data.
    let p = damaged(&d, "bad-compressed", |b| {
        b[4 << 16..(4 << 16) + 8]
            .copy_from_slice(&((1u64 << 62) | (5 << 16) | (3u64 << 54)).to_be_bytes());
        b[5 << 16..(5 << 16) + 64].fill(0xff);
    });
    expect(&read_err(&p), "compressed cluster");
    // A refcount block past the end of the file: writes that allocate fail cleanly.
    let p = damaged(&d, "refblock-past-eof", |b| {
        b[1 << 16..(1 << 16) + 8].copy_from_slice(&(1u64 << 40).to_be_bytes())
    });
    let mut img = open_rw(&p);
    expect(
        &img.write_at(&[1; 100], 512 << 10).unwrap_err().to_string(),
        "refcount block offset",
    );
    std::fs::remove_dir_all(&d).unwrap();
}

fn with_backing(dir: &Path, name: &str, backing: &str, fmt: Option<&str>) -> PathBuf {
    let p = dir.join(name);
    let o = CreateOptions {
        backing_file: Some(backing.into()),
        backing_format: fmt.map(str::to_string),
        ..CreateOptions::new(1 << 20)
    };
    create(&p, &o).unwrap();
    p
}

#[test]
fn hostile_backing_chains() {
    let d = tmpdir("hostile-backing");
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let strict = OpenOptions {
        read_only: true,
        backing: BackingPolicy::strict(),
        ..Default::default()
    };
    // Names itself.
    let p = with_backing(&d, "self.qcow2", "self.qcow2", Some("qcow2"));
    expect(&open_err(&p, &ro), "loops back");
    // a -> b -> a.
    let a = with_backing(&d, "a.qcow2", "b.qcow2", Some("qcow2"));
    with_backing(&d, "b.qcow2", "a.qcow2", None);
    expect(&open_err(&a, &ro), "loops back");
    // A long chain: fine by default, refused past the strict depth.
    std::fs::write(d.join("c0.raw"), vec![1u8; 1 << 20]).unwrap();
    for i in 1..=20 {
        with_backing(
            &d,
            &format!("c{i}.qcow2"),
            &format!("c{}.{}", i - 1, if i == 1 { "raw" } else { "qcow2" }),
            None,
        );
    }
    let mut img = Qcow2Image::open(&d.join("c20.qcow2"), &ro).unwrap();
    let mut b = [0u8; 4];
    img.read_at(&mut b, 1000).unwrap();
    assert_eq!(b, [1; 4]);
    expect(&open_err(&d.join("c20.qcow2"), &strict), "deeper than 16");
    // '..' and device nodes, when the policy forbids them.
    std::fs::create_dir_all(d.join("sub")).unwrap();
    let p = with_backing(&d.join("sub"), "dotdot.qcow2", "../c0.raw", Some("raw"));
    Qcow2Image::open(&p, &ro).unwrap();
    expect(&open_err(&p, &strict), "'..' is not allowed");
    let p = with_backing(&d, "dev.qcow2", "/dev/null", Some("raw"));
    let strict_abs = OpenOptions {
        backing: BackingPolicy {
            allow_absolute: true,
            ..BackingPolicy::strict()
        },
        ..strict.clone()
    };
    expect(&open_err(&p, &strict_abs), "device nodes are not allowed");
    expect(&open_err(&p, &strict), "absolute paths are not allowed");
    // Missing backing file and bad backing format.
    let p = with_backing(&d, "missing.qcow2", "nothere.raw", Some("raw"));
    expect(&open_err(&p, &ro), "nothere.raw");
    let p = with_backing(&d, "badfmt.qcow2", "c0.raw", Some("vmdk"));
    expect(&open_err(&p, &ro), "vmdk");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn random_corruption_never_panics() {
    // Flip bytes in the metadata of a real image and make sure open/read/write/check return.
    let d = tmpdir("hostile-fuzz");
    let src = d.join("src.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        src.to_str().unwrap(),
        "1M",
    ]);
    qemu_io(&src, "qcow2", &["write -P 3 0 300k", "write -z 400k 8k"]);
    qemu_img(&["snapshot", "-c", "s", src.to_str().unwrap()]);
    let orig = std::fs::read(&src).unwrap();
    let mut rng = Rng(1234);
    let p = d.join("f.qcow2");
    for _ in 0..300 {
        let mut b = orig.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(6 * 4096) as usize % b.len();
            b[at] = rng.next() as u8;
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok(mut img) = Qcow2Image::open(&p, &OpenOptions::default()) {
            let mut buf = vec![0u8; 1 << 20];
            let _ = img.read_at(&mut buf, 0);
            let _ = img.write_at(&[9u8; 5000], rng.below(1 << 19));
            let _ = img.flush();
            let _ = devices::block::qcow2::check::check(
                &mut img,
                devices::block::qcow2::check::Repair::None,
                &mut |_, _| {},
            );
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}
