//! Host-only qcow2 benchmark with `qemu-img bench`'s access pattern, so the two can be compared
//! on the same file: requests of `-s` bytes starting at `-o`, each `-S` bytes after the last,
//! wrapping modulo (image size - request size), `-c` requests, reads or (`-w`) writes.
//! Prints "Run completed in N seconds." like qemu-img bench. Used by scripts/bench-qcow2.sh.
//!
//! Usage: bench_qcow2 [-w] -c COUNT -s SIZE -S STEP [-o OFFSET] [-d DEPTH] IMAGE
//! (DEPTH is accepted for symmetry: the engine is synchronous, so it does not change anything.)

use std::process::ExitCode;
use std::time::Instant;

use devices::block::{open, OpenOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut write, mut count, mut size, mut step, mut offset) = (false, 0u64, 4096u64, 0u64, 0u64);
    let mut path = None;
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match args[i].as_str() {
            "-w" => {
                write = true;
                i += 1;
                continue;
            }
            "-c" => count = val(i).unwrap_or(0),
            "-s" => size = val(i).unwrap_or(4096),
            "-S" => step = val(i).unwrap_or(0),
            "-o" => offset = val(i).unwrap_or(0),
            "-d" => {}
            p => {
                path = Some(p.to_string());
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    let Some(path) = path else {
        eprintln!("usage: bench_qcow2 [-w] -c COUNT -s SIZE -S STEP [-o OFFSET] IMAGE");
        return ExitCode::from(2);
    };
    let opts = OpenOptions {
        read_only: !write,
        ..Default::default()
    };
    let mut img = match open(std::path::Path::new(&path), None, &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("bench_qcow2: {e}");
            return ExitCode::from(1);
        }
    };
    let step = if step == 0 { size } else { step };
    let image_size = img.size();
    let mut buf = vec![0xa5u8; size as usize];
    let start = Instant::now();
    for _ in 0..count {
        let r = if write {
            img.write_at(&buf, offset)
        } else {
            img.read_at(&mut buf, offset)
        };
        if let Err(e) = r {
            eprintln!("bench_qcow2: request at {offset}: {e}");
            return ExitCode::from(1);
        }
        offset += step;
        offset = if image_size <= size {
            0
        } else {
            offset % (image_size - size)
        };
    }
    let secs = start.elapsed().as_secs_f64();
    if let Err(e) = img.flush() {
        eprintln!("bench_qcow2: flush: {e}");
        return ExitCode::from(1);
    }
    println!("Run completed in {secs:.3} seconds.");
    ExitCode::SUCCESS
}
