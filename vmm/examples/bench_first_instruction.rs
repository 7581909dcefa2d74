//! Benchmark: time from `vmm` process start to the guest's first instruction, on this host.
//!
//! The guest is a tiny ELF whose first instruction writes one byte to COM1 and then powers off;
//! the time to the first byte on vmm's stdout is the time to the first guest instruction (plus
//! one port exit). Run: `VMM_BIN=target/release/vmm cargo run --release --example
//! bench_first_instruction [RUNS]`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = common::Scratch::new("bench-first-insn");
    let code = common::Asm::default()
        .mov_dx(0x3f8)
        .mov_al(b'!')
        .out_dx_al()
        .poweroff()
        .code
        .clone();
    let kernel = dir.write("first.elf", &common::tiny_elf(&code));
    let mut first_byte = Vec::new();
    let mut total = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(common::vmm_bin())
            .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmm");
        let mut out = child.stdout.take().unwrap();
        let mut b = [0u8; 1];
        let n = out.read(&mut b).unwrap_or(0);
        let t_first = start.elapsed();
        let status = child.wait().expect("wait");
        let t_total = start.elapsed();
        assert!(
            n == 1 && b[0] == b'!' && status.success(),
            "guest did not run"
        );
        first_byte.push(t_first);
        total.push(t_total);
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let pvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        " (host KVM is PVM: guest instructions are emulated)"
    } else {
        ""
    };
    println!("first guest instruction, {runs} runs{pvm}:");
    println!(
        "  process start -> first guest byte on COM1: median {:.2} ms (min {:.2} ms)",
        med(&mut first_byte).as_secs_f64() * 1e3,
        first_byte[0].as_secs_f64() * 1e3
    );
    println!(
        "  process start -> exit after guest power-off: median {:.2} ms",
        med(&mut total).as_secs_f64() * 1e3
    );
}
