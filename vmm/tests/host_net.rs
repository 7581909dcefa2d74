//! NICs on the host: a tiny guest finds the virtio-net function on PCI, the tap is created (and
//! gone after exit), `script` / `downscript` run with the tap's name, and every bad NIC setting
//! is one clear line with exit status 2. The guest's own network is tested in the test box.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Taps can be made here (root, /dev/net/tun); otherwise the test says so and returns.
fn can_make_taps(probe: &str) -> bool {
    let ok = have_kvm() && devices::net::Tap::open(probe, 1).is_ok();
    if !ok {
        eprintln!("skipped: no KVM, or this host cannot create taps");
    }
    ok
}

fn guest(dir: &Scratch, code: &[u8]) -> String {
    dir.write("guest.elf", &tiny_elf(code))
        .display()
        .to_string()
}

fn script(dir: &Scratch, name: &str, body: &str) -> String {
    let p = dir.write(name, format!("#!/bin/sh\n{body}\n").as_bytes());
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p.display().to_string()
}

fn expect_bad_input(args: &[&str], needles: &[&str]) {
    let run = run_vmm(args, b"", TIMEOUT);
    assert_eq!(run.code(), Some(2), "args {args:?}: stderr {}", run.stderr);
    let err: Vec<&str> = run
        .stderr
        .lines()
        // Our own errors, or clap's for a flag that does not parse.
        .filter(|l| l.starts_with("vmm: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(err.len(), 1, "stderr {}", run.stderr);
    for n in needles {
        assert!(err[0].contains(n), "{:?} lacks {n:?}", err[0]);
    }
}

#[test]
fn the_nic_is_on_pci_and_scripts_run_with_the_tap_name() {
    if !can_make_taps("vmmtst-hp0") {
        return;
    }
    let dir = Scratch::new("net-pci");
    // 00:01.0 is the NIC (1af4:1041): the only virtio device.
    let mut a = Asm::default();
    a.pci_id(1).cmp_eax(0x1041_1af4);
    let fail = a.here();
    a.jnz(0);
    a.print("NIC OK\n").poweroff();
    let bad = a.here();
    a.print("NIC BAD\n").poweroff();
    a.code[fail + 1] = (bad as isize - (fail as isize + 2)) as i8 as u8;
    let kernel = guest(&dir, &a.code);
    let up_log = dir.path("up.log");
    let down_log = dir.path("down.log");
    let up = script(
        &dir,
        "ifup",
        &format!(
            "echo \"$1 $(cat /sys/class/net/$1/operstate)\" > {}",
            up_log.display()
        ),
    );
    let down = script(
        &dir,
        "ifdown",
        &format!(
            "echo \"$1 $(test -e /sys/class/net/$1 && echo present)\" > {}",
            down_log.display()
        ),
    );
    let spec = format!("tap=vmmtst-n0,mac=52:54:00:aa:bb:01,script={up},downscript={down}");
    let run = run_vmm(
        &["--kernel", &kernel, "--memory", "64", "--net", &spec],
        b"",
        TIMEOUT,
    );
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains("NIC OK"), "stdout: {:?}", run.stdout);
    let up = std::fs::read_to_string(&up_log).unwrap();
    assert!(up.starts_with("vmmtst-n0 "), "{up}");
    // The downscript ran while the tap still existed; afterwards the tap we created is gone.
    assert_eq!(
        std::fs::read_to_string(&down_log).unwrap().trim(),
        "vmmtst-n0 present"
    );
    assert!(!Path::new("/sys/class/net/vmmtst-n0").exists());
}

#[test]
fn bad_nic_settings_are_one_line_and_status_2() {
    let dir = Scratch::new("net-bad");
    let kernel = guest(&dir, &Asm::default().poweroff().code.clone());
    let k = kernel.as_str();
    expect_bad_input(
        &["--kernel", k, "--net", "mac=52:54:00:zz:00:01"],
        &["net.mac"],
    );
    expect_bad_input(
        &["--kernel", k, "--net", "mac=01:00:5e:00:00:01"],
        &["net.mac", "multicast"],
    );
    expect_bad_input(&["--kernel", k, "--net", "queues=99"], &["net.queues"]);
    expect_bad_input(&["--kernel", k, "--net", "tap=a/b"], &["net.tap"]);
    expect_bad_input(&["--kernel", k, "--net", "colour=blue"], &["unknown key"]);
    expect_bad_input(
        &[
            "--kernel",
            k,
            "--net",
            "id=lan,tap=t1",
            "--net",
            "id=lan,tap=t2",
        ],
        &["net.id", "lan"],
    );
    expect_bad_input(
        &[
            "--kernel",
            k,
            "--net",
            "tap=t1,mac=52:54:00:00:00:01",
            "--net",
            "tap=t2,mac=52:54:00:00:00:01",
        ],
        &["net.mac", "same MAC"],
    );
    expect_bad_input(
        &["--kernel", k, "--net", "script=/nonexistent/qemu-ifup"],
        &["net.script"],
    );
    if !can_make_taps("vmmtst-hp1") {
        return;
    }
    expect_bad_input(
        &["--kernel", k, "--net", "tap=vmmtst-v0,vhost=on"],
        &["net.vhost"],
    );
    let fail = script(&dir, "fail", "echo 'bridge br9 does not exist' >&2; exit 3");
    expect_bad_input(
        &[
            "--kernel",
            k,
            "--net",
            &format!("tap=vmmtst-s0,script={fail}"),
        ],
        &["net.script", "vmmtst-s0", "status 3", "br9"],
    );
    assert!(
        !Path::new("/sys/class/net/vmmtst-s0").exists(),
        "the tap outlived a failed start"
    );
    // A single-queue tap another process holds is busy.
    let held = devices::net::Tap::open("vmmtst-busy1", 1).unwrap();
    expect_bad_input(
        &["--kernel", k, "--net", "tap=vmmtst-busy1"],
        &["vmmtst-busy1", "busy"],
    );
    // Two queues on a tap that is not multiqueue.
    expect_bad_input(
        &["--kernel", k, "--net", "tap=vmmtst-busy1,queues=2"],
        &["vmmtst-busy1", "multiqueue"],
    );
    drop(held);
}
