//! Host KVM tests: tiny hand-assembled guests booted by the real `vmm` binary through the real
//! boot path (ELF loader, long-mode setup, CPUID/MSR/LAPIC, serial port, ACPI power registers).
//! They run a few dozen guest instructions, so they stay fast even where KVM is emulated (PVM).

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn boot(tag: &str, code: &[u8], extra: &[&str], stdin: &[u8]) -> (Run, Scratch) {
    let dir = Scratch::new(tag);
    let kernel = dir.write("guest.elf", &tiny_elf(code));
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--memory", "64"];
    args.extend_from_slice(extra);
    (run_vmm(&args, stdin, TIMEOUT), dir)
}

#[test]
fn guest_prints_and_powers_off() {
    if !have_kvm() {
        return;
    }
    let code = Asm::default()
        .print("HELLO FROM GUEST\n")
        .poweroff()
        .code
        .clone();
    let (run, _d) = boot("hello", &code, &[], b"");
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(
        run.stdout.contains("HELLO FROM GUEST"),
        "stdout: {:?}",
        run.stdout
    );
}

#[test]
fn serial_input_reaches_the_guest() {
    if !have_kvm() {
        return;
    }
    // Echo every byte received on COM1 back; power off after 'q'.
    let mut a = Asm::default();
    a.print("READY\n");
    let top = a.here();
    a.mov_dx(0x3fd).in_al_dx().test_al(1).jz(top);
    a.mov_dx(0x3f8).in_al_dx().out_dx_al().cmp_al(b'q').jnz(top);
    a.poweroff();
    let (run, _d) = boot("echo", &a.code, &["--serial", "stdio"], b"ping-from-host q");
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(
        run.stdout.contains("READY\nping-from-host q"),
        "stdout: {:?}",
        run.stdout
    );
}

#[test]
fn two_vcpus_are_created() {
    if !have_kvm() {
        return;
    }
    let code = Asm::default().print("SMP OK\n").poweroff().code.clone();
    let (run, _d) = boot("smp", &code, &["--cpus", "2"], b"");
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains("SMP OK"));
}

#[test]
fn triple_fault_is_a_clear_error() {
    if !have_kvm() {
        return;
    }
    // ud2 with an empty IDT: #UD cannot be delivered -> #GP -> #DF -> triple fault.
    let code = Asm::default().print("X").bytes(&[0x0f, 0x0b]).code.clone();
    let (run, _d) = boot("triple", &code, &[], b"");
    assert_eq!(
        run.code(),
        Some(1),
        "stdout: {} stderr: {}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains("triple-faulted"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn reset_exits_by_default() {
    if !have_kvm() {
        return;
    }
    let code = Asm::default().print("BOOT\n").reset().code.clone();
    let (run, _d) = boot("reset-exit", &code, &[], b"");
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.stdout.matches("BOOT").count(), 1);
}

#[test]
fn reset_restarts_when_asked() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("reset-restart");
    let code = Asm::default().print("BOOT\n").reset().code.clone();
    let kernel = dir.write("guest.elf", &tiny_elf(&code));
    let mut child = spawn_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--on-reboot",
        "restart",
    ]);
    let seen = read_stdout_until(&mut child, "BOOT", 3, TIMEOUT);
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.matches("BOOT").count() >= 3, "stdout: {seen:?}");
    assert!(still_running, "vmm exited instead of restarting the guest");
}

#[test]
fn serial_to_file() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("serial-file");
    let log = dir.path("console.log");
    let spec = format!("file:{}", log.display());
    let code = Asm::default()
        .print("TO THE FILE\n")
        .poweroff()
        .code
        .clone();
    let (run, _d) = boot("serial-file-run", &code, &["--serial", &spec], b"");
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(!run.stdout.contains("TO THE FILE"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TO THE FILE"), "file: {text:?}");
}

#[test]
fn sigterm_ends_the_vm_cleanly() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("sigterm");
    let code = Asm::default()
        .print("WAITING\n")
        .halt_forever()
        .code
        .clone();
    let kernel = dir.write("guest.elf", &tiny_elf(&code));
    let mut child = spawn_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--cpus",
        "2",
    ]);
    let seen = read_stdout_until(&mut child, "WAITING", 1, TIMEOUT);
    assert!(seen.contains("WAITING"), "{seen:?}");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let run = wait_with_deadline(child, Duration::from_secs(10));
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("terminating"), "stderr: {}", run.stderr);
}

#[test]
fn pci_devices_enumerate_through_port_config_access() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("pci-enum");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // 00:00.0 is the host bridge (1b36:0008), 00:01.0 the virtio-blk disk (1af4:1042).
    let mut a = Asm::default();
    let mut fails = Vec::new();
    a.pci_id(0).cmp_eax(0x0008_1b36);
    fails.push(a.here());
    a.jnz(0); // patched below
    a.pci_id(1).cmp_eax(0x1042_1af4);
    fails.push(a.here());
    a.jnz(0);
    a.print("PCI OK\n").poweroff();
    let bad = a.here();
    a.print("PCI BAD\n").poweroff();
    for at in fails {
        a.code[at + 1] = (bad as isize - (at as isize + 2)) as i8 as u8;
    }
    let spec = format!("path={}", disk.display());
    let (run, _d) = boot("pci-enum-run", &a.code, &["--disk", &spec], b"");
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains("PCI OK"), "stdout: {:?}", run.stdout);
}
