//! Every bad-input case gets one clear line naming the field, and a non-zero exit, never a panic.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// Runs vmm and checks it failed with exit code `code` and one `vmm: error:` line containing
/// every string in `needles`.
fn expect_error(args: &[&str], code: i32, needles: &[&str]) {
    let run = run_vmm(args, b"", T);
    assert_eq!(
        run.code(),
        Some(code),
        "args {args:?}: stderr {}",
        run.stderr
    );
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmm: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "args {args:?}: stderr {}", run.stderr);
    for n in needles {
        assert!(
            errors[0].contains(n),
            "args {args:?}: {:?} lacks {n:?}",
            errors[0]
        );
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

fn kernel(dir: &Scratch) -> String {
    // A valid tiny guest: the file checks pass and only the tested field is wrong.
    let code = Asm::default().poweroff().code.clone();
    dir.write("k.elf", &tiny_elf(&code)).display().to_string()
}

#[test]
fn missing_kernel_file() {
    expect_error(
        &["--kernel", "/nonexistent/vmlinuz"],
        2,
        &["boot.kernel", "/nonexistent/vmlinuz"],
    );
}

#[test]
fn no_kernel_at_all() {
    expect_error(&["--cpus", "1"], 2, &["boot.kernel", "no kernel"]);
}

#[test]
fn kernel_is_a_directory() {
    expect_error(
        &["--kernel", "/"],
        2,
        &["boot.kernel", "not a regular file"],
    );
}

#[test]
fn kernel_is_not_a_kernel() {
    let d = Scratch::new("notkernel");
    let junk = d.write("junk", &[0x42; 8192]);
    expect_error(
        &["--kernel", junk.to_str().unwrap()],
        2,
        &["boot.kernel", "not a Linux kernel"],
    );
}

#[test]
fn missing_initrd() {
    let d = Scratch::new("noinitrd");
    let k = kernel(&d);
    expect_error(
        &["--kernel", &k, "--initrd", "/nonexistent/initrd"],
        2,
        &["boot.initrd"],
    );
}

#[test]
fn zero_vcpus() {
    let d = Scratch::new("zerocpu");
    let k = kernel(&d);
    expect_error(
        &["--kernel", &k, "--cpus", "0"],
        2,
        &["machine.vcpus", "out of range"],
    );
}

#[test]
fn too_many_vcpus() {
    let d = Scratch::new("manycpu");
    let k = kernel(&d);
    expect_error(&["--kernel", &k, "--cpus", "255"], 2, &["machine.vcpus"]);
}

#[test]
fn memory_too_small() {
    let d = Scratch::new("smallmem");
    let k = kernel(&d);
    expect_error(
        &["--kernel", &k, "--memory", "4"],
        2,
        &["machine.memory_mib", "too small"],
    );
}

#[test]
fn memory_larger_than_host() {
    let d = Scratch::new("bigmem");
    let k = kernel(&d);
    expect_error(
        &["--kernel", &k, "--memory", "900000000"],
        2,
        &["machine.memory_mib", "larger than the host"],
    );
}

#[test]
fn unknown_field_in_config() {
    let d = Scratch::new("unknownfield");
    let k = kernel(&d);
    let cfg = d.write(
        "vm.json",
        format!(r#"{{"machine": {{"vcpu": 2}}, "boot": {{"kernel": "{k}"}}}}"#).as_bytes(),
    );
    expect_error(
        &["--config", cfg.to_str().unwrap()],
        2,
        &["machine", "unknown field `vcpu`"],
    );
}

#[test]
fn malformed_json_config() {
    let d = Scratch::new("badjson");
    let cfg = d.write("vm.json", br#"{"machine": {"vcpus": 2,"#);
    expect_error(
        &["--config", cfg.to_str().unwrap()],
        2,
        &["vm.json", "line 1"],
    );
}

#[test]
fn missing_config_file() {
    expect_error(
        &["--config", "/nonexistent/vm.json"],
        2,
        &["cannot read config file"],
    );
}

#[test]
fn help_reads_well() {
    let run = run_vmm(&["--help"], b"", T);
    assert_eq!(run.code(), Some(0));
    for flag in [
        "--config",
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
    ] {
        assert!(run.stdout.contains(flag), "--help lacks {flag}");
    }
}
