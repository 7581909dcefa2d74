//! Randomized differential test: thousands of mixed operations (writes, overwrites, zeroes,
//! discards, flushes, reopen, snapshot create/apply/delete, resize, compressed writes) against a
//! plain in-memory model, with a tiny L2 cache to force evictions. qemu-img checks the result.
//! `IMG_MODEL_OPS` raises the operation count.

mod img_support;

use devices::block::qcow2::{create, CreateOptions, Qcow2Image};
use devices::block::{DiskImage, OpenOptions};
use img_support::*;

fn open_small_cache(p: &std::path::Path) -> Qcow2Image {
    let o = OpenOptions {
        l2_cache_bytes: Some(2048),
        ..Default::default()
    };
    Qcow2Image::open(p, &o).unwrap()
}

fn run_model(seed: u64, cb: u32, version: u32, backing: bool, ops: usize) {
    let dir = tmpdir(&format!("model-{seed}"));
    let p = dir.join("m.qcow2");
    let cs = 1u64 << cb;
    let mut size = 3u64 << 20;
    let mut model = vec![0u8; size as usize];
    let mut o = CreateOptions {
        cluster_bits: cb,
        version,
        ..CreateOptions::new(size)
    };
    if backing {
        let b = dir.join("b.raw");
        let mut base = vec![0u8; 2 << 20];
        Rng(seed ^ 0xbad).fill(&mut base);
        std::fs::write(&b, &base).unwrap();
        model[..base.len()].copy_from_slice(&base);
        o.backing_file = Some("b.raw".into());
        o.backing_format = Some("raw".into());
    }
    create(&p, &o).unwrap();
    let mut img = open_small_cache(&p);
    let mut rng = Rng(seed);
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut next_snap = 0;
    for i in 0..ops {
        let len = match rng.below(3) {
            0 => 1 + rng.below(512),
            1 => 1 + rng.below(4 * cs),
            _ => cs,
        }
        .min(size);
        let mut off = rng.below(size - len + 1);
        if rng.below(2) == 0 {
            off -= off % cs;
        }
        let (o8, l8) = (off as usize, len as usize);
        match rng.below(100) {
            0..=49 => {
                let mut d = vec![0u8; l8];
                rng.fill(&mut d);
                img.write_at(&d, off).unwrap();
                model[o8..o8 + l8].copy_from_slice(&d);
            }
            50..=56 => {
                img.write_zeroes(off, len).unwrap();
                model[o8..o8 + l8].fill(0);
            }
            57..=62 => {
                let start = off.next_multiple_of(cs);
                let end = (off + len) / cs * cs;
                // v2 over a backing file: discarded clusters show the backing file again,
                // which the model does not track; skip those.
                if start < end && !(backing && version == 2) {
                    img.discard(start, end - start).unwrap();
                    model[start as usize..end as usize].fill(0);
                }
            }
            63..=79 => {
                let mut got = vec![0u8; l8];
                img.read_at(&mut got, off).unwrap();
                assert!(
                    got == model[o8..o8 + l8],
                    "seed {seed} op {i}: read mismatch at {off}+{len}"
                );
            }
            80..=84 => img.flush().unwrap(),
            85..=86 => {
                drop(img);
                img = open_small_cache(&p);
            }
            87..=89 => {
                let name = format!("s{next_snap}");
                next_snap += 1;
                img.create_snapshot(&name).unwrap();
                snaps.push((name, model.clone()));
            }
            90..=91 if !snaps.is_empty() => {
                let k = rng.below(snaps.len() as u64) as usize;
                img.apply_snapshot(&snaps[k].0).unwrap();
                model = snaps[k].1.clone();
                size = model.len() as u64;
            }
            92..=93 if !snaps.is_empty() => {
                let k = rng.below(snaps.len() as u64) as usize;
                let (name, _) = snaps.remove(k);
                img.delete_snapshot(&name).unwrap();
            }
            94 if size < (6 << 20) => {
                size += 512 * (1 + rng.below(2048));
                img.resize(size).unwrap();
                model.resize(size as usize, 0);
            }
            95..=97 if off.is_multiple_of(cs) && off + cs <= size => {
                let mut d = vec![0u8; cs as usize];
                rng.fill(&mut d);
                img.write_compressed(&d, off).unwrap();
                model[o8..o8 + cs as usize].copy_from_slice(&d);
            }
            _ => {}
        }
    }
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(all == model, "seed {seed}: final contents differ");
    drop(img);
    assert_clean(&p);
    assert_same("final via qemu", &qemu_raw(&p, None), &model);
    for (name, data) in &snaps {
        // qemu-img convert -l keeps the active disk's size for a snapshot taken when the disk
        // was smaller: compare the snapshot's own size; the rest reads as zeros.
        let q = qemu_raw(&p, Some(name));
        let n = data.len().min(q.len());
        assert_same(name, &q[..n], &data[..n]);
        assert!(q[n..].iter().all(|&b| b == 0), "{name}: tail not zero");
        assert_same(name, &our_raw(&p, Some(name)), data);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn ops() -> usize {
    std::env::var("IMG_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500)
}

#[test]
fn differential_v3_small_clusters() {
    run_model(1, 9, 3, false, ops());
}

#[test]
fn differential_v3_4k_over_backing() {
    run_model(2, 12, 3, true, ops());
}

#[test]
fn differential_v2_64k() {
    run_model(3, 16, 2, false, ops());
}

#[test]
fn differential_v2_over_backing() {
    run_model(4, 13, 2, true, ops());
}
