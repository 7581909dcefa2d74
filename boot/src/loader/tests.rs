//! Tests of the kernel, initrd and command-line loaders.

use super::*;
use std::io::Cursor;
use vm_memory::GuestMemoryMmap;

const MIB: usize = 1 << 20;

fn mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

fn header(version: u16, loadflags: u8, xloadflags: u16) -> setup_header {
    setup_header {
        setup_sects: 4,
        boot_flag: 0xaa55,
        header: BZIMAGE_MAGIC,
        version,
        loadflags,
        xloadflags,
        code32_start: 0x10_0000,
        initrd_addr_max: 0x7fff_ffff,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        cmdline_size: 2047,
        pref_address: 0x100_0000,
        init_size: 0x40_0000,
        ..Default::default()
    }
}

fn bzimage(hdr: setup_header, payload_len: usize) -> Vec<u8> {
    let setup_len = (usize::from(hdr.setup_sects) + 1) * 512;
    let mut image = vec![0u8; setup_len + payload_len];
    image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()]
        .copy_from_slice(hdr.as_slice());
    for (i, b) in image[setup_len..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    image
}

fn good_bzimage() -> Vec<u8> {
    bzimage(header(0x020f, LOADED_HIGH, XLF_KERNEL_64), 0x1234)
}

fn elf(class: u8, machine: u16, paddr: u64, memsz: u64) -> Vec<u8> {
    let mut ehdr = Elf64_Ehdr::default();
    ehdr.e_ident[..4].copy_from_slice(&ELF_MAGIC);
    ehdr.e_ident[EI_CLASS] = class;
    ehdr.e_ident[5] = 1; // little endian
    ehdr.e_ident[6] = 1; // version
    ehdr.e_type = 2;
    ehdr.e_machine = machine;
    ehdr.e_version = 1;
    ehdr.e_entry = paddr;
    ehdr.e_phoff = 64;
    ehdr.e_ehsize = 64;
    ehdr.e_phentsize = 56;
    ehdr.e_phnum = 1;
    let phdr = Elf64_Phdr {
        p_type: PT_LOAD,
        p_flags: 5,
        p_offset: 0x1000,
        p_vaddr: 0xffff_ffff_8000_0000 + paddr,
        p_paddr: paddr,
        p_filesz: 0x100,
        p_memsz: memsz,
        p_align: 0x1000,
    };
    let mut image = vec![0u8; 0x1100];
    image[..64].copy_from_slice(ehdr.as_slice());
    image[64..120].copy_from_slice(phdr.as_slice());
    image[0x1000..].fill(0x90);
    image
}

#[test]
fn loads_bzimage() {
    let mem = mem(64 * MIB);
    let image = good_bzimage();
    let info = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
    assert_eq!(info.format, KernelFormat::BzImage);
    assert_eq!(info.load_addr, HIMEM_START);
    assert_eq!(info.entry, GuestAddress(0x10_0200));
    // The decompression area (16 MiB + 4 MiB) is beyond the image itself.
    assert_eq!(info.kernel_end, GuestAddress(0x140_0000));
    let hdr = info.setup_header.unwrap();
    assert_eq!({ hdr.version }, 0x020f);
    let mut payload = vec![0u8; 0x1234];
    mem.read_slice(&mut payload, HIMEM_START).unwrap();
    assert_eq!(payload, image[5 * 512..]);
    assert!(info.pvh_entry.is_none());
}

#[test]
fn rejects_garbage() {
    let mem = mem(64 * MIB);
    for image in [
        vec![],
        vec![0u8; 10],
        vec![0u8; 0x200],
        vec![0x55u8; 0x1000],
    ] {
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(matches!(err, LoaderError::NotLinuxKernel), "{err:?}");
        assert_eq!(
            err.to_string(),
            "not a Linux kernel image (no bzImage header and no ELF magic)"
        );
    }
}

#[test]
fn rejects_unsuitable_bzimages() {
    let mem = mem(64 * MIB);
    let old = bzimage(header(0x0206, LOADED_HIGH, 0), 16);
    let err = load_kernel(&mem, &mut Cursor::new(&old)).unwrap_err();
    assert!(matches!(err, LoaderError::BootProtocolTooOld(0x0206)));
    assert!(err.to_string().contains("2.06"), "{err}");

    let only32 = bzimage(header(0x020f, LOADED_HIGH, 0), 16);
    let err = load_kernel(&mem, &mut Cursor::new(&only32)).unwrap_err();
    assert!(matches!(err, LoaderError::BzImageNot64Bit));
    assert!(err.to_string().contains("32-bit"));

    let zimage = bzimage(header(0x020f, 0, XLF_KERNEL_64), 16);
    let err = load_kernel(&mem, &mut Cursor::new(&zimage)).unwrap_err();
    assert!(matches!(err, LoaderError::ZImage));
}

#[test]
fn bzimage_too_big_for_memory() {
    // 16 MiB of RAM cannot hold a kernel that decompresses at 16 MiB.
    let small = mem(16 * MIB);
    let err = load_kernel(&small, &mut Cursor::new(good_bzimage())).unwrap_err();
    assert!(matches!(
        err,
        LoaderError::KernelTooBig {
            needed: 0x140_0000,
            available: 0x100_0000
        }
    ));
    assert!(err.to_string().contains("more memory"));

    // The image itself larger than RAM.
    let mut hdr = header(0x020f, LOADED_HIGH, XLF_KERNEL_64);
    hdr.init_size = 0;
    hdr.pref_address = 0;
    let image = bzimage(hdr, 2 * MIB);
    let err = load_kernel(&mem(2 * MIB), &mut Cursor::new(image)).unwrap_err();
    assert!(matches!(err, LoaderError::KernelTooBig { .. }));
}

#[test]
fn no_ram_at_1mib() {
    let err = load_kernel(&mem(MIB), &mut Cursor::new(good_bzimage())).unwrap_err();
    assert!(matches!(err, LoaderError::NoHighMemory));
}

#[test]
fn loads_elf() {
    let mem = mem(64 * MIB);
    let image = elf(ELFCLASS64, EM_X86_64, 0x100_0000, 0x2000);
    let info = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
    assert_eq!(info.format, KernelFormat::Elf);
    assert_eq!(info.entry, GuestAddress(0x100_0000));
    assert_eq!(info.kernel_end, GuestAddress(0x100_2000));
    assert!(info.setup_header.is_none());
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100_00ff)).unwrap(), 0x90);
}

#[test]
fn rejects_unsuitable_elves() {
    let mem = mem(64 * MIB);
    let err = load_kernel(
        &mem,
        &mut Cursor::new(elf(ELFCLASS32, 3, 0x100_0000, 0x100)),
    )
    .unwrap_err();
    assert!(matches!(err, LoaderError::Elf32Bit));
    assert!(err.to_string().contains("32-bit ELF"));

    let err = load_kernel(
        &mem,
        &mut Cursor::new(elf(ELFCLASS64, 183, 0x100_0000, 0x100)),
    )
    .unwrap_err();
    assert!(matches!(err, LoaderError::ElfWrongMachine(183)));

    let err = load_kernel(
        &mem,
        &mut Cursor::new(elf(ELFCLASS64, EM_X86_64, 0x8000, 0x100)),
    )
    .unwrap_err();
    assert!(matches!(err, LoaderError::ElfBelowHimem(0x8000)));

    let err = load_kernel(&mem, &mut Cursor::new(&ELF_MAGIC[..])).unwrap_err();
    assert!(matches!(err, LoaderError::ElfMalformed(_)));

    let big = elf(ELFCLASS64, EM_X86_64, 0x100_0000, 64 * MIB as u64);
    let err = load_kernel(&mem, &mut Cursor::new(big)).unwrap_err();
    assert!(matches!(err, LoaderError::KernelTooBig { .. }));
}

#[test]
fn initrd_goes_high_and_aligned() {
    let mem = mem(64 * MIB);
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let hdr = header(0x020f, LOADED_HIGH, XLF_KERNEL_64);
    let info = load_initrd(
        &mem,
        &mut Cursor::new(&data),
        GuestAddress(0x140_0000),
        Some(&hdr),
    )
    .unwrap();
    assert_eq!(info.size, 10_000);
    assert_eq!(info.addr.0 % 4096, 0);
    assert!(info.addr.0 + 10_000 <= 64 * MIB as u64);
    assert!(info.addr.0 + 10_000 + 4096 > 64 * MIB as u64);
    let mut back = vec![0u8; 10_000];
    mem.read_slice(&mut back, info.addr).unwrap();
    assert_eq!(back, data);
}

#[test]
fn initrd_respects_initrd_addr_max() {
    let mem = mem(64 * MIB);
    let mut hdr = header(0x020f, LOADED_HIGH, XLF_KERNEL_64);
    hdr.initrd_addr_max = 0x1ff_ffff; // 32 MiB - 1
    let data = vec![7u8; 5000];
    let info = load_initrd(
        &mem,
        &mut Cursor::new(&data),
        GuestAddress(0x140_0000),
        Some(&hdr),
    )
    .unwrap();
    assert_eq!(info.addr, GuestAddress(0x200_0000 - 0x2000));
}

#[test]
fn initrd_default_max_without_header() {
    let mem = mem(1024 * MIB);
    let info = load_initrd(
        &mem,
        &mut Cursor::new(vec![1u8; 4096]),
        GuestAddress(0x140_0000),
        None,
    )
    .unwrap();
    assert_eq!(info.addr, GuestAddress(0x3800_0000 - 0x1000));
}

#[test]
fn initrd_errors() {
    let mem = mem(32 * MIB);
    let err = load_initrd(&mem, &mut Cursor::new(Vec::new()), HIMEM_START, None).unwrap_err();
    assert!(matches!(err, LoaderError::InitrdEmpty));

    let data = vec![0u8; 16 * MIB];
    let err = load_initrd(
        &mem,
        &mut Cursor::new(&data),
        GuestAddress(0x140_0000),
        None,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        LoaderError::InitrdTooBig {
            limit: 0x200_0000,
            ..
        }
    ));
    assert!(err.to_string().contains("does not fit"), "{err}");

    let huge = vec![0u8; 40 * MIB];
    let err = load_initrd(&mem, &mut Cursor::new(&huge), HIMEM_START, None).unwrap_err();
    assert!(matches!(err, LoaderError::InitrdTooBig { .. }));
}

#[test]
fn cmdline() {
    let mem = mem(MIB);
    let info = load_cmdline(&mem, "console=ttyS0 reboot=k", None).unwrap();
    assert_eq!(info.addr, CMDLINE_START);
    assert_eq!(info.size, 23);
    let mut back = [0u8; 23];
    mem.read_slice(&mut back, CMDLINE_START).unwrap();
    assert_eq!(&back, b"console=ttyS0 reboot=k\0");
}

#[test]
fn cmdline_limits() {
    let mem = mem(MIB);
    assert_eq!(max_cmdline_len(None), 4095);
    let hdr = header(0x020f, LOADED_HIGH, XLF_KERNEL_64);
    assert_eq!(max_cmdline_len(Some(&hdr)), 2047);
    let mut old = hdr;
    old.version = 0x0205;
    assert_eq!(max_cmdline_len(Some(&old)), 4095);

    let long = "x".repeat(2048);
    let err = load_cmdline(&mem, &long, Some(&hdr)).unwrap_err();
    assert!(matches!(
        err,
        LoaderError::CmdlineTooLong {
            len: 2048,
            max: 2047
        }
    ));
    assert!(load_cmdline(&mem, &long, None).is_ok());
    assert!(load_cmdline(&mem, &"x".repeat(4096), None).is_err());
    assert!(matches!(
        load_cmdline(&mem, "a\0b", None),
        Err(LoaderError::CmdlineHasNul)
    ));
}

/// Loads the real guest kernel and initramfs built by `resources/` when they are present.
#[test]
fn real_guest_kernel_if_present() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest");
    let (Ok(mut kernel), Ok(mut initrd)) = (
        std::fs::File::open(dir.join("vmlinuz")),
        std::fs::File::open(dir.join("initramfs.cpio.gz")),
    ) else {
        eprintln!("note: no guest kernel in {}, skipping", dir.display());
        return;
    };
    let mem = mem(512 * MIB);
    let info = load_kernel(&mem, &mut kernel).unwrap();
    assert_eq!(info.format, KernelFormat::BzImage);
    assert_eq!(info.entry, GuestAddress(0x10_0200));
    let hdr = info.setup_header.unwrap();
    assert!({ hdr.version } >= MIN_BOOT_PROTOCOL);
    assert!(info.kernel_end.0 > 0x100_0000);
    let initrd_info = load_initrd(&mem, &mut initrd, info.kernel_end, Some(&hdr)).unwrap();
    assert_eq!(initrd_info.addr.0 % 4096, 0);
    assert!(initrd_info.addr >= info.kernel_end);
    assert!(initrd_info.addr.0 + initrd_info.size as u64 <= 512 * MIB as u64);
    // A gzip stream starts with 1f 8b.
    let magic: [u8; 2] = mem.read_obj(initrd_info.addr).unwrap();
    assert_eq!(magic, [0x1f, 0x8b]);
}

#[test]
fn loads_extracted_vmlinux_with_the_bzimage_header() {
    let mem = mem(64 * MIB);
    let hdr = header(0x020f, LOADED_HIGH, XLF_KERNEL_64);
    let image = elf(ELFCLASS64, EM_X86_64, 0x100_0000, 0x2000);
    let info = load_extracted_vmlinux(&mem, &mut Cursor::new(&image[..]), hdr).unwrap();
    assert_eq!(info.format, KernelFormat::ExtractedVmlinux);
    assert_eq!(info.entry, GuestAddress(0x100_0000));
    assert_eq!(info.kernel_end, GuestAddress(0x100_2000));
    let kept = info.setup_header.expect("the bzImage header is kept");
    assert_eq!({ kept.cmdline_size }, 2047);
    assert_eq!({ kept.initrd_addr_max }, 0x7fff_ffff);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100_0000)).unwrap(), 0x90);
    assert_eq!(max_cmdline_len(info.setup_header.as_ref()), 2047);
}

#[test]
fn extracted_vmlinux_is_checked() {
    let mem = mem(64 * MIB);
    let good = elf(ELFCLASS64, EM_X86_64, 0x100_0000, 0x2000);
    let old = header(0x020b, LOADED_HIGH, XLF_KERNEL_64);
    assert!(matches!(
        load_extracted_vmlinux(&mem, &mut Cursor::new(&good[..]), old),
        Err(LoaderError::BootProtocolTooOld(0x020b))
    ));
    let hdr = header(0x020f, LOADED_HIGH, XLF_KERNEL_64);
    assert!(matches!(
        load_extracted_vmlinux(&mem, &mut Cursor::new(&b"not an elf"[..]), hdr),
        Err(LoaderError::ElfMalformed(_))
    ));
    let arm = elf(ELFCLASS64, 183, 0x100_0000, 0x2000);
    assert!(matches!(
        load_extracted_vmlinux(&mem, &mut Cursor::new(&arm[..]), hdr),
        Err(LoaderError::ElfWrongMachine(183))
    ));
    let huge = elf(ELFCLASS64, EM_X86_64, 0x100_0000, 128 << 20);
    assert!(matches!(
        load_extracted_vmlinux(&mem, &mut Cursor::new(&huge[..]), hdr),
        Err(LoaderError::KernelTooBig { .. })
    ));
}

#[test]
fn bzimage_header_is_read_only_from_bzimages() {
    let hdr = bzimage_header(&mut Cursor::new(good_bzimage()))
        .unwrap()
        .expect("a bzImage");
    assert_eq!({ hdr.header }, BZIMAGE_MAGIC);
    let elf = elf(ELFCLASS64, EM_X86_64, 0x100_0000, 0x2000);
    assert!(bzimage_header(&mut Cursor::new(elf)).unwrap().is_none());
    assert!(bzimage_header(&mut Cursor::new(b"junk".to_vec()))
        .unwrap()
        .is_none());
}
