//! Tests of the bzImage payload extraction. The vectors under boot/tests/data are described in
//! the README there.

use super::*;

const VMLINUX: &[u8] = include_bytes!("../../tests/data/vmlinux.elf");
const GZ: &[u8] = include_bytes!("../../tests/data/vmlinux.gz");
const XZ: &[u8] = include_bytes!("../../tests/data/vmlinux.xz");
const ZST: &[u8] = include_bytes!("../../tests/data/vmlinux.zst");
const LZ4: &[u8] = include_bytes!("../../tests/data/vmlinux.lz4");
const ENTRY: u64 = 0x100_0000;

/// A bzImage (protocol `version`) around `payload`, placed at `payload_offset` 0x80 after the
/// setup code, with some bytes after it as a real image has.
fn bzimage_version(payload: &[u8], version: u16) -> Vec<u8> {
    let hdr = setup_header {
        setup_sects: 4,
        boot_flag: 0xaa55,
        header: BZIMAGE_MAGIC,
        version,
        payload_offset: 0x80,
        payload_length: payload.len() as u32,
        ..Default::default()
    };
    let mut image = vec![0u8; 5 * 512 + 0x80];
    image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()]
        .copy_from_slice(hdr.as_slice());
    image.extend_from_slice(payload);
    image.extend_from_slice(&[0xcc; 64]);
    image
}

fn bzimage(payload: &[u8]) -> Vec<u8> {
    bzimage_version(payload, 0x020f)
}

/// A gzip member of `data`, made here with miniz_oxide (header and trailer by hand).
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 2, 3];
    out.extend_from_slice(b"vmlinux.bin\0");
    out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 6));
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn all_vectors() -> [(Compression, &'static [u8]); 4] {
    [
        (Compression::Gzip, GZ),
        (Compression::Xz, XZ),
        (Compression::Zstd, ZST),
        (Compression::Lz4, LZ4),
    ]
}

#[test]
fn detects_formats() {
    for (format, data) in all_vectors() {
        assert_eq!(Compression::detect(data), Some(format));
    }
    assert_eq!(Compression::detect(b"BZh91AY&SY"), Some(Compression::Bzip2));
    assert_eq!(
        Compression::detect(&[0x5d, 0, 0, 0x80, 0]),
        Some(Compression::Lzma)
    );
    assert_eq!(
        Compression::detect(b"\x89LZO\0\r\n\x1a\n"),
        Some(Compression::Lzo)
    );
    assert_eq!(Compression::detect(b"\x7fELF"), None);
    assert_eq!(Compression::detect(&[]), None);
}

#[test]
fn extracts_every_supported_format() {
    for (format, data) in all_vectors() {
        let image = bzimage(data);
        let payload = find_payload(&image).unwrap();
        assert_eq!(payload.compression, format);
        assert_eq!(payload.data, data);
        let vmlinux = extract_vmlinux(&image).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert!(vmlinux == VMLINUX, "{format}: wrong output");
        assert_eq!(check_vmlinux(&vmlinux).unwrap(), ENTRY);
    }
}

#[test]
fn extracts_gzip_made_in_process() {
    let image = bzimage(&gzip(VMLINUX));
    assert_eq!(extract_vmlinux(&image).unwrap(), VMLINUX);
}

#[test]
fn truncated_payloads_are_errors() {
    for (format, data) in all_vectors() {
        for keep in [0, 3, 10, data.len() / 2, data.len() - 1] {
            let mut cut = data[..keep].to_vec();
            // Keep the size trailer, as a truncation inside the image would.
            if format != Compression::Gzip && keep >= 4 {
                cut.extend_from_slice(&data[data.len() - 4..]);
            }
            let result = extract_vmlinux(&bzimage(&cut));
            assert!(result.is_err(), "{format} cut at {keep} was accepted");
        }
    }
}

#[test]
fn corrupt_payloads_are_errors() {
    // Formats with an integrity check: any flipped byte of the compressed data is caught.
    for (format, data) in [
        (Compression::Gzip, GZ),
        (Compression::Xz, XZ),
        (Compression::Zstd, ZST),
    ] {
        for at in [data.len() / 3, data.len() / 2, data.len() - 9] {
            let mut bad = data.to_vec();
            bad[at] ^= 0x55;
            let result = extract_vmlinux(&bzimage(&bad));
            assert!(result.is_err(), "{format}: flipped byte at {at} accepted");
        }
    }
    // lz4 legacy frames carry no checksum; a broken block or size trailer is still caught.
    let mut bad = LZ4.to_vec();
    bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        extract_vmlinux(&bzimage(&bad)),
        Err(DecompressError::Corrupt { .. })
    ));
    let mut bad = LZ4.to_vec();
    let n = bad.len();
    bad[n - 4] ^= 1;
    assert!(matches!(
        extract_vmlinux(&bzimage(&bad)),
        Err(DecompressError::Corrupt { .. })
    ));
    // A wrong gzip size or CRC.
    let mut bad = gzip(VMLINUX);
    let n = bad.len();
    bad[n - 8] ^= 1;
    assert!(matches!(
        extract_vmlinux(&bzimage(&bad)),
        Err(DecompressError::Corrupt { .. })
    ));
}

#[test]
fn unknown_and_unsupported_formats() {
    assert!(matches!(
        extract_vmlinux(&bzimage(b"\x7fELF not compressed")),
        Err(DecompressError::UnknownCompression(head)) if head == "7f 45 4c 46 20 6e"
    ));
    for (magic, format) in [
        (&b"BZh91AY&SY...."[..], Compression::Bzip2),
        (&[0x5d, 0, 0, 0x80, 0, 1, 2, 3][..], Compression::Lzma),
        (&b"\x89LZO\0\r\n\x1a\n...."[..], Compression::Lzo),
    ] {
        match extract_vmlinux(&bzimage(magic)) {
            Err(DecompressError::Unsupported(f)) => assert_eq!(f, format),
            other => panic!("{format}: {other:?}"),
        }
        assert!(!format.is_supported());
    }
}

#[test]
fn output_that_is_not_a_vmlinux() {
    let not_elf = vec![0x42u8; 4096];
    assert!(matches!(
        extract_vmlinux(&bzimage(&gzip(&not_elf))),
        Err(DecompressError::NotVmlinux(_))
    ));
    // An ELF for another machine.
    let mut arm = VMLINUX.to_vec();
    arm[18] = 183; // EM_AARCH64
    assert!(matches!(
        extract_vmlinux(&bzimage(&gzip(&arm))),
        Err(DecompressError::NotVmlinux(_))
    ));
    // A segment past the end of the file.
    let truncated = &VMLINUX[..VMLINUX.len() - 100];
    assert!(matches!(
        check_vmlinux(truncated),
        Err(DecompressError::NotVmlinux(_))
    ));
    assert!(check_vmlinux(&VMLINUX[..40]).is_err());
}

#[test]
fn size_cap() {
    for (format, data) in all_vectors() {
        let image = bzimage(data);
        match extract_vmlinux_with_limit(&image, 1000) {
            Err(DecompressError::TooLarge { limit: 1000 }) => {}
            other => panic!("{format}: {other:?}"),
        }
        // Exactly at the limit is fine.
        assert!(extract_vmlinux_with_limit(&image, VMLINUX.len()).is_ok());
    }
    // A size trailer claiming 4 GiB is refused before anything is decoded.
    let mut huge = ZST.to_vec();
    let n = huge.len();
    huge[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        extract_vmlinux_with_limit(&bzimage(&huge), 1 << 20),
        Err(DecompressError::TooLarge { .. })
    ));
    // Lots of zeros in a small gzip: stopped at the cap.
    let bomb = gzip(&vec![0u8; 4 << 20]);
    assert!(bomb.len() < 64 << 10);
    assert!(matches!(
        extract_vmlinux_with_limit(&bzimage(&bomb), 1 << 20),
        Err(DecompressError::TooLarge { .. })
    ));
}

#[test]
fn header_problems() {
    assert!(matches!(
        extract_vmlinux(&[0u8; 4096]),
        Err(DecompressError::NotBzImage)
    ));
    assert!(matches!(
        extract_vmlinux(&[0u8; 16]),
        Err(DecompressError::NotBzImage)
    ));
    assert!(matches!(
        extract_vmlinux(&bzimage_version(GZ, 0x0207)),
        Err(DecompressError::NoPayloadInfo(0x0207))
    ));
    // payload_length beyond the end of the file.
    let mut image = bzimage(GZ);
    image.truncate(image.len() - 100);
    assert!(matches!(
        extract_vmlinux(&image),
        Err(DecompressError::PayloadOutOfBounds { .. })
    ));
    assert!(is_bzimage(&bzimage(GZ)));
    assert!(!is_bzimage(VMLINUX));
}

/// The guest kernel the test box boots (a Debian cloud bzImage), when it has been built
/// (`bash resources/guest/build.sh`).
#[test]
fn real_guest_kernel() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest/vmlinuz");
    let Ok(image) = std::fs::read(&path) else {
        eprintln!(
            "note: {} not found, real-kernel extraction not checked (run resources/guest/build.sh)",
            path.display()
        );
        return;
    };
    let payload = find_payload(&image).unwrap();
    eprintln!(
        "{}: {} payload, {} bytes",
        path.display(),
        payload.compression,
        payload.data.len()
    );
    let vmlinux = extract_vmlinux(&image).unwrap();
    let entry = check_vmlinux(&vmlinux).unwrap();
    // x86-64 kernels are entered at startup_64, at the physical load address (16 MiB unless
    // CONFIG_PHYSICAL_START says otherwise), never below 1 MiB.
    assert!(entry >= 0x10_0000, "entry {entry:#x}");
    assert_eq!(entry % 0x1000, 0, "entry {entry:#x}");
}
