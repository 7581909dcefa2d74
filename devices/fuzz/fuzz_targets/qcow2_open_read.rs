//! Fuzz target: open arbitrary bytes as a qcow2 image (read-only, backing files forbidden
//! except next to the image), read the whole disk in odd-sized pieces, view each snapshot,
//! and run the consistency check. Any panic, hang or runaway allocation is a bug.
//! Run: cd devices/fuzz && cargo +nightly fuzz run qcow2_open_read -- -rss_limit_mb=1024

#![no_main]

use devices::block::qcow2::{check, Qcow2Image};
use devices::block::{BackingPolicy, DiskImage, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("qcow2-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("img.qcow2");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let opts = OpenOptions {
        read_only: true,
        backing: BackingPolicy::strict(),
        l2_cache_bytes: Some(64 << 10),
        ..Default::default()
    };
    let Ok(mut img) = Qcow2Image::open(&path, &opts) else {
        return;
    };
    // Bound the work on images that claim huge sizes: read at most 8 MiB spread over the disk.
    let size = img.size();
    let mut buf = vec![0u8; 65536 + 1234];
    let mut off = 0u64;
    for _ in 0..128 {
        if size == 0 {
            break;
        }
        let n = (buf.len() as u64).min(size - off.min(size)) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        off = (off + size / 97 + 4093) % size;
    }
    let names: Vec<String> = img
        .snapshots()
        .iter()
        .map(|s| s.id.clone())
        .take(4)
        .collect();
    let _ = check::check(&mut img, check::Repair::None, &mut |_, _| {});
    drop(img);
    for n in names {
        if let Ok(mut s) = Qcow2Image::open_snapshot(&path, &n, &opts) {
            let mut b = vec![0u8; 4096];
            let _ = s.read_at(&mut b, 0);
        }
    }
});
