//! Snapshot and restore through the real binary on the host's KVM, with a tiny guest whose
//! state lives in a register (a counter), in guest memory (its code) and in the UART: the
//! restored process must go on counting where the saved one stopped. Then every kind of bad
//! state file must be refused with exit status 2 and one clear line, before any guest runs.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Echoes each byte received on COM1 followed by a counter digit kept in `bl` ('1', '2', ...);
/// powers off on 'q'.
fn counter_guest() -> Vec<u8> {
    let mut a = Asm::default();
    a.bytes(&[0xb3, b'0']); // mov bl, '0'
    a.print("READY\n");
    let top = a.here();
    a.mov_dx(0x3fd).in_al_dx().test_al(1).jz(top);
    a.mov_dx(0x3f8).in_al_dx().cmp_al(b'q');
    a.bytes(&[0x75, 10]); // jnz over the 10-byte power-off sequence
    a.poweroff();
    a.bytes(&[0xfe, 0xc3]); // inc bl
    a.out_dx_al();
    a.bytes(&[0x88, 0xd8]); // mov al, bl
    a.out_dx_al();
    a.jmp(top);
    a.code
}

/// Kills the VMMs a test started if the test fails before they exit (their guest spins on the
/// serial port and would otherwise outlive the test).
#[derive(Default)]
struct Reaper(std::cell::RefCell<Vec<u32>>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in self.0.borrow().iter() {
            let pid = pid as libc::pid_t;
            // SAFETY: kill(2) with a pid this test spawned; at worst the process is gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn spawn(reaper: &Reaper, args: &[&str]) -> Child {
    let child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    reaper.0.borrow_mut().push(child.id());
    child
}

fn send(child: &mut Child, bytes: &[u8]) {
    let stdin = child.stdin.as_mut().expect("stdin piped");
    stdin.write_all(bytes).unwrap();
    stdin.flush().unwrap();
}

fn ctl(sock: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(vmm_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run vmm ctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn wait_for_socket(sock: &Path) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the counter guest (with a raw disk, so a virtio device is saved too), counts to 2,
/// snapshots it through the API socket and ends the process. Returns the state file.
fn make_snapshot(reaper: &Reaper, dir: &Scratch) -> Option<PathBuf> {
    let kernel = dir.write("guest.elf", &tiny_elf(&counter_guest()));
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path("api.sock");
    let snap = dir.path("vm.state");
    let disk_arg = format!("path={}", disk.display());
    let mut a = spawn(
        reaper,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--serial",
            "stdio",
            "--disk",
            &disk_arg,
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    let seen = read_stdout_until(&mut a, "READY", 1, TIMEOUT);
    assert!(seen.contains("READY"), "guest did not start: {seen:?}");
    send(&mut a, b"a");
    let seen = read_stdout_until(&mut a, "a1", 1, TIMEOUT);
    assert!(seen.contains("a1"), "{seen:?}");
    send(&mut a, b"b");
    let seen = read_stdout_until(&mut a, "b2", 1, TIMEOUT);
    assert!(seen.contains("b2"), "{seen:?}");
    wait_for_socket(&sock);
    let (rc, out) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(rc, 0, "snapshot failed: {out}");
    let (rc, out) = ctl(&sock, &["migration"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("completed"), "{out}");
    let (rc, out) = ctl(&sock, &["info"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("post_migrate"), "VM not left paused: {out}");
    let (rc, out) = ctl(&sock, &["shutdown"]);
    assert_eq!(rc, 0, "{out}");
    let run = wait_with_deadline(a, TIMEOUT);
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    Some(snap)
}

#[test]
fn restored_guest_goes_on_counting_and_bad_files_are_refused() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("snapshot");
    let reaper = Reaper::default();
    let Some(snap) = make_snapshot(&reaper, &dir) else {
        return;
    };
    let snap_str = snap.to_str().unwrap().to_string();
    let incoming = format!("file:{snap_str}");

    // Restore in a new process: the counter (a register) and the code (memory) carry on.
    let mut b = spawn(&reaper, &["--incoming", &incoming, "--serial", "stdio"]);
    send(&mut b, b"c");
    let seen = read_stdout_until(&mut b, "c3", 1, TIMEOUT);
    assert!(
        seen.contains("c3"),
        "restored guest did not count on: {seen:?}"
    );
    send(&mut b, b"q");
    let run = wait_with_deadline(b, TIMEOUT);
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);

    // A second restore from the same file works just as well (the file is never modified).
    let mut b = spawn(
        &reaper,
        &[
            "--incoming",
            &incoming,
            "--serial",
            "stdio",
            "--memory",
            "64",
        ],
    );
    send(&mut b, b"dq");
    let run = wait_with_deadline(b, TIMEOUT);
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains("d3"), "stdout: {:?}", run.stdout);

    let bytes = std::fs::read(&snap).unwrap();
    let refused = |name: &str, data: &[u8], extra: &[&str], want: &str| {
        let p = dir.write(name, data);
        let uri = format!("file:{}", p.display());
        let mut args = vec!["--incoming", uri.as_str(), "--serial", "off"];
        args.extend_from_slice(extra);
        let run = run_vmm(&args, b"", TIMEOUT);
        assert_eq!(run.code(), Some(2), "{name}: stderr: {}", run.stderr);
        assert!(
            run.stderr.starts_with("vmm: error: ") && run.stderr.lines().count() == 1,
            "{name}: want one error line, got {:?}",
            run.stderr
        );
        assert!(
            run.stderr.contains(want),
            "{name}: {want:?} not in {:?}",
            run.stderr
        );
    };
    for cut in [0, 10, 23, 100, 4096, bytes.len() / 2, bytes.len() - 1] {
        refused(&format!("cut{cut}"), &bytes[..cut], &[], "truncated");
    }
    let mut flipped = bytes.clone();
    flipped[200] ^= 0x01;
    refused("flipped", &flipped, &[], "checksum");
    let mut newer = bytes.clone();
    newer[12..16].copy_from_slice(&99u32.to_le_bytes());
    let crc = crc32fast::hash(&newer[..20]);
    newer[20..24].copy_from_slice(&crc.to_le_bytes());
    refused("newer", &newer, &[], "newer");
    refused(
        "qcow2",
        b"QFI\xfb\0\0\0\x03not a state file at all",
        &[],
        "not a vmm state",
    );
    refused("cpus", &bytes, &["--cpus", "2"], "vCPUs");
    refused("memory", &bytes, &["--memory", "128"], "memory");
    std::fs::remove_file(dir.path("disk.img")).unwrap();
    refused("nodisk", &bytes, &[], "disk.img");
}
