//! Crash test: a writer process (this test binary re-executed in child mode) does random
//! writes, discards and flushes on a qcow2 image and is killed with SIGKILL at a random point,
//! many times. After each kill `qemu-img check` must report no corruption (leaks are allowed)
//! and every byte that was flushed, and not written again afterwards, must read back intact,
//! both through qemu-img and through our engine. `IMG_CRASH_ITERS` sets the number of kills.

mod img_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devices::block::qcow2::{create, CreateOptions};
use devices::block::DiskImage;
use img_support::*;

const SIZE: u64 = 8 << 20;

enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
    Flush,
}

fn gen_op(rng: &mut Rng, cs: u64) -> Op {
    let len = match rng.below(3) {
        0 => 1 + rng.below(2000),
        1 => cs,
        _ => 1 + rng.below(3 * cs),
    }
    .min(SIZE);
    let mut off = rng.below(SIZE - len + 1);
    if rng.below(2) == 0 {
        off -= off % cs;
    }
    match rng.below(20) {
        0..=12 => {
            let mut d = vec![0u8; len as usize];
            rng.fill(&mut d);
            Op::Write(off, d)
        }
        13 => Op::Zero(off, len),
        14 => {
            let start = off.next_multiple_of(cs);
            let end = ((off + len) / cs * cs).max(start);
            Op::Discard(start, end - start)
        }
        _ => Op::Flush,
    }
}

fn apply(model: &mut [u8], op: &Op) {
    match op {
        Op::Write(o, d) => model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Op::Zero(o, l) | Op::Discard(o, l) => model[*o as usize..(*o + *l) as usize].fill(0),
        Op::Flush => {}
    }
}

fn touched(op: &Op) -> Option<(u64, u64)> {
    match op {
        Op::Write(o, d) => Some((*o, d.len() as u64)),
        Op::Zero(o, l) | Op::Discard(o, l) => Some((*o, *l)),
        Op::Flush => None,
    }
}

/// Child mode: runs only when re-executed by the parent test.
#[test]
fn crash_writer_child() {
    let Ok(path) = std::env::var("IMG_CRASH_PATH") else {
        return;
    };
    let seed: u64 = std::env::var("IMG_CRASH_SEED").unwrap().parse().unwrap();
    let cs: u64 = std::env::var("IMG_CRASH_CS").unwrap().parse().unwrap();
    let mut img = open_rw(std::path::Path::new(&path));
    let mut rng = Rng(seed);
    let out = std::io::stdout();
    for i in 0u64.. {
        let op = gen_op(&mut rng, cs);
        writeln!(out.lock(), "B {i}").unwrap();
        match &op {
            Op::Write(o, d) => img.write_at(d, *o).unwrap(),
            Op::Zero(o, l) => img.write_zeroes(*o, *l).unwrap(),
            Op::Discard(o, l) => img.discard(*o, *l).unwrap(),
            Op::Flush => {
                img.flush().unwrap();
                writeln!(out.lock(), "F {i}").unwrap();
            }
        }
    }
}

#[test]
fn killed_writer_leaves_consistent_image_with_flushed_data() {
    ensure_qemu();
    let iters: u64 = std::env::var("IMG_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tmpdir("crash");
    let exe = std::env::current_exe().unwrap();
    let mut meta_rng = Rng(0x5eed);
    for iter in 0..iters {
        let cb = [9u32, 12, 16][(iter % 3) as usize];
        let cs = 1u64 << cb;
        let p = dir.join(format!("crash{iter}.qcow2"));
        create(
            &p,
            &CreateOptions {
                cluster_bits: cb,
                refcount_order: (iter % 7) as u32,
                ..CreateOptions::new(SIZE)
            },
        )
        .unwrap();
        let seed = meta_rng.next();
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("IMG_CRASH_PATH", &p)
            .env("IMG_CRASH_SEED", seed.to_string())
            .env("IMG_CRASH_CS", cs.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        // Let it run until a random number of operations began (or a time limit).
        let target = 5 + meta_rng.below(400) as usize;
        let start = Instant::now();
        while lines.lock().unwrap().len() < target && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_micros(200 + meta_rng.below(800)));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let lines = lines.lock().unwrap();
        let num = |prefix: &str| {
            lines
                .iter()
                .filter_map(|l| l.strip_prefix(prefix))
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .max()
        };
        let last_begun = num("B ");
        let last_flush = num("F ");

        // Replay: the model at the last completed flush, and what was touched after it.
        let mut rng = Rng(seed);
        let mut model = vec![0u8; SIZE as usize];
        let mut unsure = vec![false; SIZE as usize];
        if let Some(lb) = last_begun {
            for i in 0..=lb {
                let op = gen_op(&mut rng, cs);
                if last_flush.is_some_and(|f| i <= f) {
                    apply(&mut model, &op);
                } else if let Some((o, l)) = touched(&op) {
                    unsure[o as usize..(o + l) as usize].fill(true);
                }
            }
        }
        let (code, corruptions, _leaks, out) = qemu_check(&p);
        assert!(
            corruptions == 0 && (code == 0 || code == 3),
            "iteration {iter} (seed {seed}, cs {cs}): {out}"
        );
        for (who, data) in [("qemu", qemu_raw(&p, None)), ("ours", our_raw(&p, None))] {
            if let Some(i) = (0..SIZE as usize).find(|&i| !unsure[i] && data[i] != model[i]) {
                panic!("iteration {iter} (seed {seed}, cs {cs}, flushed up to op {last_flush:?}): {who} lost flushed byte {i:#x}");
            }
        }
        // Reopening for writing after the crash works and a repair leaves it clean.
        {
            let mut img = open_rw(&p);
            let r = devices::block::qcow2::check::check(
                &mut img,
                devices::block::qcow2::check::Repair::All,
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(r.corruptions, 0);
        }
        assert_clean(&p);
        std::fs::remove_file(&p).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
