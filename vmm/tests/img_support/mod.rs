//! Shared helpers for the `img_*` integration tests: the real qemu-img / qemu-io (installed with
//! apt-get when missing; a test fails loudly if they still cannot be found), temp dirs, reading
//! whole disks through our engine and through qemu-img, and a small deterministic RNG.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use devices::block::{self, DiskImage, ImageFormat, OpenOptions};

/// Makes sure qemu-img and qemu-io exist, installing qemu-utils if needed; panics if impossible.
pub fn ensure_qemu() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let have = || Command::new("sh").args(["-c", "command -v qemu-img && command -v qemu-io"]).output().map(|o| o.status.success()).unwrap_or(false);
        if !have() {
            let _ = Command::new("sh")
                .args(["-c", "(apt-get install -y qemu-utils || (apt-get update && apt-get install -y qemu-utils)) >/dev/null 2>&1"])
                .status();
        }
        assert!(have(), "qemu-img/qemu-io not found and `apt-get install -y qemu-utils` failed: these tests need the real qemu-img");
    });
}

/// Runs qemu-img with `args`, returning the output (no status check).
pub fn qemu_img_raw(args: &[&str]) -> Output {
    ensure_qemu();
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img")
}

/// Runs qemu-img and asserts success.
pub fn qemu_img(args: &[&str]) -> String {
    let o = qemu_img_raw(args);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs qemu-io commands on an image (format given) and asserts success.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    ensure_qemu();
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(path);
    let o = c.output().expect("run qemu-io");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A fresh temp dir for one test.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-img-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `qemu-img convert -O raw` of the image (or of one of its snapshots), read back.
pub fn qemu_raw(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = path.with_extension(format!("raw-{}", snapshot.unwrap_or("active")));
    let p = path.to_str().unwrap();
    let o = out.to_str().unwrap();
    let snap_arg = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-U", "-O", "raw"];
    if let Some(s) = &snap_arg {
        args.extend(["-l", s.as_str()]);
    }
    args.extend([p, o]);
    qemu_img(&args);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Reads the whole disk through our engine (read-only).
pub fn our_raw(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut img: Box<dyn DiskImage> = match snapshot {
        Some(s) => Box::new(block::qcow2::Qcow2Image::open_snapshot(path, s, &opts).unwrap()),
        None => block::open(path, None, &opts).unwrap(),
    };
    let mut buf = vec![0u8; img.size() as usize];
    // Read in odd-sized pieces to cross cluster boundaries in every way.
    let mut pos = 0;
    let mut step = 4096 + 512 * 7 + 3;
    while pos < buf.len() {
        let n = step.min(buf.len() - pos);
        img.read_at(&mut buf[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = (step * 3 + 1) % 300_000 + 1;
    }
    buf
}

/// Asserts two disks are equal, naming the first differing offset.
pub fn assert_same(what: &str, ours: &[u8], theirs: &[u8]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: sizes differ");
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: ours {:#x}, qemu {:#x}",
            ours[i], theirs[i]
        );
    }
}

/// `qemu-img check --output json`: (exit code, corruptions, leaks).
pub fn qemu_check(path: &Path) -> (i32, u64, u64, String) {
    let o = qemu_img_raw(&["check", "-U", "--output", "json", path.to_str().unwrap()]);
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_else(|e| {
        panic!(
            "qemu-img check output {s:?}: {e} / {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (
        o.status.code().unwrap_or(-1),
        num("corruptions"),
        num("leaks"),
        s,
    )
}

/// Asserts `qemu-img check` finds no corruption and no leak.
pub fn assert_clean(path: &Path) {
    let (code, c, l, s) = qemu_check(path);
    assert!(
        code == 0 && c == 0 && l == 0,
        "qemu-img check {}: exit {code}: {s}",
        path.display()
    );
}

/// Opens an image of ours for writing.
pub fn open_rw(path: &Path) -> block::qcow2::Qcow2Image {
    block::qcow2::Qcow2Image::open(path, &OpenOptions::default()).unwrap()
}

/// Probe helper.
pub fn fmt_of(path: &Path) -> ImageFormat {
    ImageFormat::probe(path).unwrap()
}

/// xorshift64*: deterministic and dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        // Compressible-ish but position dependent data.
        let seed = self.next();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 8) * 8)) as u8 ^ (i / 64) as u8;
        }
    }
}
