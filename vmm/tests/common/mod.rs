//! Shared helpers for the vmm binary's integration tests: scratch directories, running the
//! binary with a deadline, and tiny hand-assembled guests packaged as ELF "kernels".

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test (`VMM_BIN` overrides, for the benchmark example).
pub fn vmm_bin() -> String {
    std::env::var("VMM_BIN")
        .ok()
        .or_else(|| option_env!("CARGO_BIN_EXE_vmm").map(String::from))
        .expect("set VMM_BIN to the vmm binary")
}

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vmm-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished run of the binary produced.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `vmm ARGS` with `stdin` as input, killing it after `timeout`.
pub fn run_vmm(args: &[&str], stdin: &[u8], timeout: Duration) -> Run {
    let mut child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    wait_with_deadline(child, timeout)
}

/// Starts `vmm ARGS` with stdin closed and stdout/stderr piped.
pub fn spawn_vmm(args: &[&str]) -> Child {
    Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

/// Reads `child`'s stdout until `pattern` has appeared `count` times, EOF, or `timeout`;
/// returns what was read (the stdout pipe is put back for `wait_with_deadline`).
pub fn read_stdout_until(
    child: &mut Child,
    pattern: &str,
    count: usize,
    timeout: Duration,
) -> String {
    let mut out = child.stdout.take().expect("stdout piped");
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while seen.matches(pattern).count() < count && Instant::now() < deadline {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    child.stdout = Some(out);
    seen
}

/// Waits for `child`, killing it (and failing the test) after `timeout`.
pub fn wait_with_deadline(mut child: Child, timeout: Duration) -> Run {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let st = child.wait().unwrap();
            let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!(
                "vmm did not exit within {timeout:?} ({st}); stdout: {stdout:?} stderr: {stderr:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
    }
}

/// True when /dev/kvm can be opened; tests that need it say so and return early otherwise.
pub fn have_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("note: /dev/kvm is not usable here; this test checked nothing");
    }
    ok
}

/// Physical address where tiny guests are loaded (the kernel load address, 1 MiB).
pub const GUEST_LOAD: u64 = 0x10_0000;

/// Wraps 64-bit machine code in a minimal ELF64 executable whose single PT_LOAD segment is
/// loaded at `GUEST_LOAD`, with the entry point at the code. Our loader boots it like a vmlinux
/// (long mode, paging on, identity-mapped), so the code runs as the very first guest instructions.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code_off = (EHDR + PHDR) as u64;
    let total = code_off + code.len() as u64;
    let mut v = Vec::with_capacity(total as usize);
    // e_ident: magic, ELFCLASS64, little endian, version 1, System V ABI
    v.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    v.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    v.extend_from_slice(&1u32.to_le_bytes()); // e_version
    v.extend_from_slice(&(GUEST_LOAD + code_off).to_le_bytes()); // e_entry
    v.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    v.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    v.extend_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    v.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    v.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    v.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    v.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // program header: PT_LOAD, R+X, whole file at GUEST_LOAD
    v.extend_from_slice(&1u32.to_le_bytes()); // p_type
    v.extend_from_slice(&5u32.to_le_bytes()); // p_flags
    v.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    v.extend_from_slice(&GUEST_LOAD.to_le_bytes()); // p_vaddr
    v.extend_from_slice(&GUEST_LOAD.to_le_bytes()); // p_paddr
    v.extend_from_slice(&total.to_le_bytes()); // p_filesz
    v.extend_from_slice(&total.to_le_bytes()); // p_memsz
    v.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    assert_eq!(v.len() as u64, code_off);
    v.extend_from_slice(code);
    v
}

/// A tiny x86-64 assembler for the handful of instructions the test guests use.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self
    }
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.code.extend_from_slice(&[0xb0, v]);
        self
    }
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.code.push(0xee);
        self
    }
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.code.push(0xec);
        self
    }
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.code.push(0xb8);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn out_dx_eax(&mut self) -> &mut Self {
        self.code.push(0xef);
        self
    }
    pub fn in_eax_dx(&mut self) -> &mut Self {
        self.code.push(0xed);
        self
    }
    pub fn cmp_eax(&mut self, v: u32) -> &mut Self {
        self.code.push(0x3d);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Reads PCI config register 0 of 00:`slot`.0 through 0xCF8/0xCFC into eax.
    pub fn pci_id(&mut self, slot: u8) -> &mut Self {
        self.mov_dx(0xcf8)
            .mov_eax(0x8000_0000 | (u32::from(slot) << 11))
            .out_dx_eax()
            .mov_dx(0xcfc)
            .in_eax_dx()
    }
    pub fn test_al(&mut self, v: u8) -> &mut Self {
        self.code.extend_from_slice(&[0xa8, v]);
        self
    }
    pub fn cmp_al(&mut self, v: u8) -> &mut Self {
        self.code.extend_from_slice(&[0x3c, v]);
        self
    }
    /// Current position, a jump target.
    pub fn here(&self) -> usize {
        self.code.len()
    }
    fn jcc(&mut self, op: u8, target: usize) -> &mut Self {
        let rel = target as isize - (self.code.len() as isize + 2);
        let rel = i8::try_from(rel).expect("short jump out of range");
        self.code.extend_from_slice(&[op, rel as u8]);
        self
    }
    pub fn jz(&mut self, target: usize) -> &mut Self {
        self.jcc(0x74, target)
    }
    pub fn jnz(&mut self, target: usize) -> &mut Self {
        self.jcc(0x75, target)
    }
    pub fn jmp(&mut self, target: usize) -> &mut Self {
        self.jcc(0xeb, target)
    }
    /// Writes the bytes of `s` to COM1.
    pub fn print(&mut self, s: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in s.bytes() {
            self.mov_al(b).out_dx_al();
        }
        self
    }
    /// ACPI S5 through the sleep control register: the VMM powers off.
    pub fn poweroff(&mut self) -> &mut Self {
        self.mov_dx(0x600).mov_al(0x34).out_dx_al().halt_forever()
    }
    /// The ACPI reset register: the VMM reboots (or exits, per on_reboot).
    pub fn reset(&mut self) -> &mut Self {
        self.mov_dx(0x602).mov_al(0x01).out_dx_al().halt_forever()
    }
    pub fn halt_forever(&mut self) -> &mut Self {
        let l = self.here();
        self.code.push(0xf4); // hlt
        self.jmp(l)
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
}
