//! Images made by the real qemu-img / qemu-io read identically through our engine and through
//! `qemu-img convert -O raw`: every cluster size, v2 and v3, backing chains (qcow2 and raw),
//! internal snapshots (active layer and each snapshot), compressed (zlib and zstd) and zero
//! clusters.

mod img_support;

use img_support::*;

fn fill_with_qemu_io(path: &std::path::Path, size: u64, cs: u64, v3: bool, seed: u8) {
    let mut cmds = vec![
        format!("write -P {} 0 {}", 0x11 ^ seed, cs),
        format!("write -P {} {} 1000", 0x22 ^ seed, cs + 300),
        format!(
            "write -P {} {} {}",
            0x33 ^ seed,
            size / 2 - 777,
            3 * cs + 1234
        ),
        format!("write -P {} {} 512", 0x44 ^ seed, size - 512),
        format!("write -P {} {} {}", 0x55 ^ seed, size / 4, 4 * cs),
    ];
    if v3 {
        cmds.push(format!("write -z {} {}", size / 4 + cs, cs)); // zero cluster
    }
    cmds.push(format!("discard {} {}", size / 4 + 2 * cs, cs));
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(path, "qcow2", &c);
}

#[test]
fn every_cluster_size_and_version_reads_like_qemu() {
    let dir = tmpdir("read-sizes");
    for (cs, compat) in [
        (512u64, "1.1"),
        (512, "0.10"),
        (4096, "1.1"),
        (65536, "0.10"),
        (65536, "1.1"),
        (2 << 20, "1.1"),
    ] {
        for refbits in [1, 16, 64] {
            if compat == "0.10" && refbits != 16 {
                continue;
            }
            let size = if cs == 2 << 20 { 24 << 20 } else { 6 << 20 };
            let p = dir.join(format!("c{cs}-{compat}-{refbits}.qcow2"));
            let opts = format!("cluster_size={cs},compat={compat},refcount_bits={refbits}");
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                p.to_str().unwrap(),
                &size.to_string(),
            ]);
            fill_with_qemu_io(&p, size, cs, compat == "1.1", refbits as u8);
            assert_same(&opts, &our_raw(&p, None), &qemu_raw(&p, None));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snapshots_made_by_qemu_read_like_qemu() {
    let dir = tmpdir("read-snap");
    for compat in ["0.10", "1.1"] {
        let p = dir.join(format!("s-{compat}.qcow2"));
        let ps = p.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size=4096"),
            ps,
            "4M",
        ]);
        fill_with_qemu_io(&p, 4 << 20, 4096, compat == "1.1", 1);
        qemu_img(&["snapshot", "-c", "one", ps]);
        qemu_io(
            &p,
            "qcow2",
            &["write -P 0x77 0 10000", "discard 1048576 65536"],
        );
        qemu_img(&["snapshot", "-c", "two", ps]);
        fill_with_qemu_io(&p, 4 << 20, 4096, compat == "1.1", 9);
        assert_same("active", &our_raw(&p, None), &qemu_raw(&p, None));
        for s in ["one", "two"] {
            assert_same(s, &our_raw(&p, Some(s)), &qemu_raw(&p, Some(s)));
        }
        // The id works as well as the name.
        assert_same("id 1", &our_raw(&p, Some("1")), &qemu_raw(&p, Some("one")));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn backing_chains_read_like_qemu() {
    let dir = tmpdir("read-backing");
    let raw = dir.join("base.raw");
    let mut data = vec![0u8; 3 << 20];
    Rng(7).fill(&mut data);
    std::fs::write(&raw, &data).unwrap();
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    // mid: qcow2 over raw (smaller than mid), top: qcow2 over qcow2.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        "cluster_size=4096",
        mid.to_str().unwrap(),
        "4M",
    ]);
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0xa1 4096 100",
            "write -P 0xa2 3145000 20000",
            "write -z 8192 4096",
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=65536",
        top.to_str().unwrap(),
        "5M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0xb1 70000 3000",
            "discard 0 65536",
            "write -P 0xb2 4194000 4000",
        ],
    );
    assert_same("mid", &our_raw(&mid, None), &qemu_raw(&mid, None));
    assert_same("top", &our_raw(&top, None), &qemu_raw(&top, None));
    // Without backing_fmt the format is probed.
    let probe = dir.join("probe.qcow2");
    let opts = devices::block::qcow2::CreateOptions {
        backing_file: Some("top.qcow2".into()),
        ..devices::block::qcow2::CreateOptions::new(5 << 20)
    };
    devices::block::qcow2::create(&probe, &opts).unwrap();
    assert_same("probed", &our_raw(&probe, None), &qemu_raw(&probe, None));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compressed_images_read_like_qemu() {
    let dir = tmpdir("read-compressed");
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; 5 << 20];
    Rng(3).fill(&mut data);
    data[1 << 20..2 << 20].fill(0);
    let mut r = Rng(99);
    for b in data[3 << 20..(3 << 20) + 100_000].iter_mut() {
        *b = r.next() as u8; // incompressible stretch
    }
    std::fs::write(&raw, &data).unwrap();
    for (ct, cs) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "512"),
        ("zstd", "2M"),
    ] {
        let p = dir.join(format!("c-{ct}-{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct},cluster_size={cs}"),
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        let ours = our_raw(&p, None);
        assert_same(ct, &ours, &qemu_raw(&p, None));
        assert_same(ct, &ours, &data);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
