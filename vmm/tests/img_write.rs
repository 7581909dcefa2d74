//! Images written by our engine pass `qemu-img check` with no errors and no leaks, and read
//! identically through qemu-img: random writes, overwrites, discards, write-zeroes, snapshots
//! created / applied / deleted, resize, compressed writes and writes over a backing file.

mod img_support;

use devices::block::qcow2::{create, CreateOptions, Qcow2Image};
use devices::block::DiskImage;
use img_support::*;

/// Random mixed I/O against `img` and a byte model.
fn churn(img: &mut dyn DiskImage, model: &mut [u8], rng: &mut Rng, ops: usize, cs: u64) {
    let size = model.len() as u64;
    for i in 0..ops {
        let kind = rng.below(10);
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 => cs,
            2 => 1 + rng.below(3 * cs),
            _ => 1 + rng.below(70_000),
        }
        .min(size);
        let mut off = rng.below(size - len + 1);
        if rng.below(3) == 0 {
            off -= off % cs;
        }
        let (o, l) = (off as usize, len as usize);
        match kind {
            0..=5 => {
                let mut d = vec![0u8; l];
                rng.fill(&mut d);
                img.write_at(&d, off).unwrap();
                model[o..o + l].copy_from_slice(&d);
            }
            6 => {
                img.write_zeroes(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            7 => {
                // Discard only whole clusters: they read as zeros afterwards.
                let start = off.next_multiple_of(cs);
                let end = (off + len) / cs * cs;
                if start < end {
                    img.discard(start, end - start).unwrap();
                    model[start as usize..end as usize].fill(0);
                }
            }
            8 => {
                let mut got = vec![0u8; l];
                img.read_at(&mut got, off).unwrap();
                assert!(
                    got == model[o..o + l],
                    "read mismatch at op {i} off {off} len {len}"
                );
            }
            _ => img.flush().unwrap(),
        }
    }
}

#[test]
fn random_writes_pass_qemu_check_in_every_geometry() {
    let dir = tmpdir("write-geom");
    for (cb, order, version) in [
        (9u32, 0u32, 3u32),
        (9, 6, 3),
        (12, 4, 2),
        (16, 4, 3),
        (16, 4, 2),
        (21, 5, 3),
    ] {
        let cs = 1u64 << cb;
        let size = if cb == 21 { 40 << 20 } else { 8 << 20 };
        let p = dir.join(format!("w{cb}-{order}-{version}.qcow2"));
        let o = CreateOptions {
            cluster_bits: cb,
            refcount_order: order,
            version,
            ..CreateOptions::new(size)
        };
        create(&p, &o).unwrap();
        assert_clean(&p);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(u64::from(cb) * 1000 + u64::from(order));
        {
            let mut img = open_rw(&p);
            churn(&mut img, &mut model, &mut rng, 300, cs);
            img.flush().unwrap();
        }
        assert_clean(&p);
        assert_same(
            &format!("cb {cb} order {order} v{version}"),
            &qemu_raw(&p, None),
            &model,
        );
    }
    // An image qemu-img made, written by us.
    let p = dir.join("qemu-made.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,refcount_bits=2",
        p.to_str().unwrap(),
        "8M",
    ]);
    let mut model = vec![0u8; 8 << 20];
    {
        let mut img = open_rw(&p);
        churn(&mut img, &mut model, &mut Rng(5), 300, 4096);
    }
    assert_clean(&p);
    assert_same("qemu-made", &qemu_raw(&p, None), &model);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snapshots_created_applied_and_deleted_by_us() {
    let dir = tmpdir("write-snap");
    for version in [2u32, 3] {
        let p = dir.join(format!("s{version}.qcow2"));
        let size = 6u64 << 20;
        create(
            &p,
            &CreateOptions {
                cluster_bits: 12,
                version,
                ..CreateOptions::new(size)
            },
        )
        .unwrap();
        let mut rng = Rng(11 + u64::from(version));
        let mut model = vec![0u8; size as usize];
        let (snap_a, snap_b);
        {
            let mut img = open_rw(&p);
            churn(&mut img, &mut model, &mut rng, 150, 4096);
            img.create_snapshot("a").unwrap();
            snap_a = model.clone();
            churn(&mut img, &mut model, &mut rng, 150, 4096);
            img.create_snapshot("b").unwrap();
            snap_b = model.clone();
            churn(&mut img, &mut model, &mut rng, 150, 4096);
            assert!(img.create_snapshot("a").is_err());
        }
        assert_clean(&p);
        assert_same("active", &qemu_raw(&p, None), &model);
        assert_same("a", &qemu_raw(&p, Some("a")), &snap_a);
        assert_same("b", &qemu_raw(&p, Some("b")), &snap_b);
        {
            let mut img = open_rw(&p);
            img.delete_snapshot("a").unwrap();
            img.apply_snapshot("b").unwrap();
            let mut got = vec![0u8; size as usize];
            img.read_at(&mut got, 0).unwrap();
            assert!(got == snap_b);
            model = snap_b.clone();
            churn(&mut img, &mut model, &mut rng, 150, 4096);
        }
        assert_clean(&p);
        let list = qemu_img(&["snapshot", "-l", p.to_str().unwrap()]);
        assert!(list.contains(" b ") && !list.contains(" a "), "{list}");
        assert_same("after apply", &qemu_raw(&p, None), &model);
        assert_same("b kept", &qemu_raw(&p, Some("b")), &snap_b);
        {
            let mut img = open_rw(&p);
            img.delete_snapshot("b").unwrap();
        }
        assert_clean(&p);
        assert_same("after delete", &qemu_raw(&p, None), &model);
    }
    // A snapshot qemu-img made, deleted by us.
    let p = dir.join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "2M"]);
    qemu_io(&p, "qcow2", &["write -P 0x5a 0 100000"]);
    qemu_img(&["snapshot", "-c", "qs", p.to_str().unwrap()]);
    qemu_io(&p, "qcow2", &["write -P 0x6b 5000 100000"]);
    let before = qemu_raw(&p, None);
    open_rw(&p).delete_snapshot("qs").unwrap();
    assert_clean(&p);
    assert_same("qemu snapshot deleted", &qemu_raw(&p, None), &before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resize_compressed_writes_and_backing_writes() {
    let dir = tmpdir("write-misc");
    // Resize: the L1 table has to move for 512-byte clusters.
    let p = dir.join("r.qcow2");
    create(
        &p,
        &CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(1 << 20)
        },
    )
    .unwrap();
    let mut model = vec![0u8; 1 << 20];
    {
        let mut img = open_rw(&p);
        churn(&mut img, &mut model, &mut Rng(1), 100, 512);
        img.resize(40 << 20).unwrap();
        model.resize(40 << 20, 0);
        churn(&mut img, &mut model, &mut Rng(2), 100, 512);
    }
    assert_clean(&p);
    assert_same("resized", &qemu_raw(&p, None), &model);
    let info = qemu_img(&["info", "--output", "json", p.to_str().unwrap()]);
    assert!(info.contains("\"virtual-size\": 41943040"), "{info}");

    // Compressed writes (zlib and zstd), then overwrites of compressed clusters.
    for ct in [
        devices::block::qcow2::CompressionType::Zlib,
        devices::block::qcow2::CompressionType::Zstd,
    ] {
        let p = dir.join(format!("c-{}.qcow2", ct.name()));
        create(
            &p,
            &CreateOptions {
                compression_type: ct,
                ..CreateOptions::new(4 << 20)
            },
        )
        .unwrap();
        let mut model = vec![0u8; 4 << 20];
        Rng(4).fill(&mut model);
        {
            let mut img = open_rw(&p);
            for c in 0..64u64 {
                let s = (c * 65536) as usize;
                img.write_compressed(&model[s..s + 65536], c * 65536)
                    .unwrap();
            }
            churn(&mut img, &mut model, &mut Rng(6), 100, 65536);
        }
        assert_clean(&p);
        assert_same(ct.name(), &qemu_raw(&p, None), &model);
    }

    // Writes over a qcow2 backing file made by qemu-img (partial clusters copy from it).
    let base = dir.join("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        base.to_str().unwrap(),
        "3M",
    ]);
    qemu_io(&base, "qcow2", &["write -P 0x31 0 3M"]);
    let top = dir.join("top.qcow2");
    let o = CreateOptions {
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..CreateOptions::new(4 << 20)
    };
    create(&top, &o).unwrap();
    let mut model = vec![0u8; 4 << 20];
    model[..3 << 20].fill(0x31);
    {
        let mut img = open_rw(&top);
        churn(&mut img, &mut model, &mut Rng(8), 300, 65536);
    }
    assert_clean(&top);
    assert_same("over backing", &qemu_raw(&top, None), &model);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lazy_refcounts_dirty_image_is_repaired_on_open() {
    let dir = tmpdir("write-lazy");
    let p = dir.join("l.qcow2");
    create(
        &p,
        &CreateOptions {
            lazy_refcounts: true,
            cluster_bits: 12,
            ..CreateOptions::new(4 << 20)
        },
    )
    .unwrap();
    let mut model = vec![0u8; 4 << 20];
    {
        let mut img = open_rw(&p);
        churn(&mut img, &mut model, &mut Rng(21), 200, 4096);
        img.flush().unwrap();
        assert!(
            img.header().incompatible_features & 1 != 0,
            "dirty while open"
        );
        std::mem::forget(img); // "crash": no clean close
    }
    let info = qemu_img(&["info", "-U", "--output", "json", p.to_str().unwrap()]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    {
        let img = open_rw(&p); // repairs and clears the dirty bit
        assert_eq!(img.header().incompatible_features & 1, 0);
    }
    assert_clean(&p);
    assert_same("lazy", &qemu_raw(&p, None), &model);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_bit_forces_read_only() {
    let dir = tmpdir("write-corrupt");
    let p = dir.join("c.qcow2");
    create(&p, &CreateOptions::new(1 << 20)).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    b[79] |= 2;
    std::fs::write(&p, &b).unwrap();
    let e = Qcow2Image::open(&p, &devices::block::OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    let ro = devices::block::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut img = Qcow2Image::open(&p, &ro).unwrap();
    assert!(img.write_at(b"x", 0).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
