//! The fast boot path on the host's KVM, with tiny hand-made bzImages: a bzImage whose payload
//! we can extract boots its vmlinux (and caches it); one whose payload is in an unsupported
//! format or corrupt boots as the bzImage, after one warning line. The two kernels inside each
//! image print different words, so the test sees which one ran.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{have_kvm, tiny_elf, wait_with_deadline, Asm, Run, Scratch};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Where the protected-mode part of the bzImage starts in the file (4 setup sectors + boot sector).
const SETUP_LEN: usize = 5 * 512;
/// Offset of the 64-bit entry in the protected-mode part (boot protocol).
const ENTRY_64: usize = 0x200;
/// Offset of the payload in the protected-mode part.
const PAYLOAD_AT: usize = 0x400;

fn put(image: &mut [u8], at: usize, bytes: &[u8]) {
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A bzImage (boot protocol 2.15, 64-bit, loaded high) whose own 64-bit entry prints
/// "BZIMAGE" and powers off, carrying `payload` as its compressed kernel.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let own = Asm::default().print("BZIMAGE\n").poweroff().code.clone();
    let mut image = vec![0u8; SETUP_LEN + PAYLOAD_AT + payload.len()];
    image[0x1f1] = 4; // setup_sects
    put(&mut image, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut image, 0x202, b"HdrS");
    put(&mut image, 0x206, &0x020fu16.to_le_bytes()); // version
    image[0x211] = 0x01; // loadflags: LOADED_HIGH
    put(&mut image, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut image, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut image, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut image, 0x236, &0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut image, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut image, 0x248, &(PAYLOAD_AT as u32).to_le_bytes()); // payload_offset
    put(&mut image, 0x24c, &(payload.len() as u32).to_le_bytes()); // payload_length
    put(&mut image, 0x258, &0x10_0000u64.to_le_bytes()); // pref_address
    put(&mut image, 0x260, &0x20_0000u32.to_le_bytes()); // init_size
    put(&mut image, SETUP_LEN + ENTRY_64, &own);
    put(&mut image, SETUP_LEN + PAYLOAD_AT, payload);
    image
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// `data` as a gzip stream of stored deflate blocks, as the kernel build appends it.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    let mut chunks = data.chunks(0xffff).peekable();
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none())); // BFINAL, BTYPE 00 (stored)
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// The vmlinux inside the good bzImage: prints "EXTRACTED" and powers off.
fn vmlinux() -> Vec<u8> {
    tiny_elf(&Asm::default().print("EXTRACTED\n").poweroff().code)
}

fn boot(kernel: &Path, cache: &Path, extra: &[&str]) -> Run {
    let child = Command::new(common::vmm_bin())
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64"])
        .args(extra)
        .env("XDG_CACHE_HOME", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    wait_with_deadline(child, TIMEOUT)
}

#[test]
fn an_extractable_bzimage_boots_its_vmlinux_from_the_cache() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("fast-boot");
    let kernel = dir.write("bzImage", &bzimage(&gzip(&vmlinux())));
    let cache = dir.path("cache");
    for round in ["first", "cached"] {
        let run = boot(&kernel, &cache, &[]);
        assert_eq!(run.code(), Some(0), "{round}: {}", run.stderr);
        assert_eq!(run.stdout, "EXTRACTED\n", "{round}: stderr {}", run.stderr);
        assert!(
            !run.stderr.contains("booting the bzImage"),
            "{}",
            run.stderr
        );
    }
    let entries = std::fs::read_dir(cache.join("vmm/kernels"))
        .unwrap()
        .count();
    assert_eq!(entries, 3, "the vmlinux, its stamp and the index");

    let run = boot(&kernel, &cache, &["--no-decompress"]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout, "BZIMAGE\n",
        "--no-decompress boots the bzImage as it is"
    );
}

#[test]
fn an_unsupported_or_corrupt_payload_boots_the_bzimage_after_a_warning() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("fast-boot-fallback");
    let cache = dir.path("cache");
    let mut corrupt = gzip(&vmlinux());
    let crc_at = corrupt.len() - 8;
    corrupt[crc_at] ^= 0xff;
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "bzip2",
            b"BZh91AY&SY not really".to_vec(),
            "bzip2-compressed",
        ),
        ("corrupt", corrupt, "corrupt"),
        (
            "not-a-kernel",
            gzip(b"plain text, not an ELF"),
            "bzImage as it is",
        ),
    ];
    for (name, payload, why) in cases {
        let kernel = dir.write(name, &bzimage(&payload));
        let run = boot(&kernel, &cache, &[]);
        assert_eq!(run.code(), Some(0), "{name}: {}", run.stderr);
        assert_eq!(run.stdout, "BZIMAGE\n", "{name}: stderr {}", run.stderr);
        assert!(
            run.stderr.contains("booting the bzImage as it is") && run.stderr.contains(why),
            "{name}: one clear warning line, got {}",
            run.stderr
        );
        let warnings = run.stderr.matches("booting the bzImage").count();
        assert_eq!(warnings, 1, "{name}: {}", run.stderr);
    }
    assert!(
        !cache.join("vmm/kernels").exists()
            || std::fs::read_dir(cache.join("vmm/kernels"))
                .unwrap()
                .all(|e| !e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".vmlinux")),
        "nothing that failed was cached"
    );
}
