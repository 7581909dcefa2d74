//! Loading the guest kernel, initrd and command line into guest memory.
//!
//! Kernels are either a bzImage (64-bit boot protocol, entered at load address + 0x200) or an
//! uncompressed ELF `vmlinux` (entered at its ELF entry point). Both are loaded by
//! linux-loader at [`HIMEM_START`]-based addresses; this module detects the format, checks the
//! image against guest memory first so that mistakes produce a clear message instead of a
//! triple fault, and reports what the zero page needs.

use std::io::{self, Read, Seek, SeekFrom};

use linux_loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, EM_X86_64, PT_LOAD};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, ReadVolatile,
};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the 64-bit entry point from the bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// "HdrS": the setup header magic.
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.12: the first with `xloadflags` (and so with `XLF_KERNEL_64`).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Boot protocol 2.06: the first with `cmdline_size`.
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;
/// Boot protocol 2.10: the first with `pref_address` and `init_size`.
const BOOT_PROTOCOL_INIT_SIZE: u16 = 0x020a;
/// `initrd_addr_max` assumed when the kernel does not say (protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// The initrd is placed on a page boundary.
const INITRD_ALIGN: u64 = 0x1000;

pub(crate) const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const EI_CLASS: usize = 4;
const ELFCLASS32: u8 = 1;
pub(crate) const ELFCLASS64: u8 = 2;

/// Errors while loading the kernel, the initrd or the command line.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file could not be read.
    #[error("failed to read the kernel image: {0}")]
    ReadKernel(#[source] io::Error),
    /// Neither a bzImage nor an ELF file.
    #[error("not a Linux kernel image (no bzImage header and no ELF magic)")]
    NotLinuxKernel,
    /// A bzImage whose boot protocol predates 64-bit entry.
    #[error(
        "the bzImage uses boot protocol {}.{:02}; 2.12 or newer (Linux 3.8+) is required",
        .0 >> 8,
        .0 & 0xff
    )]
    BootProtocolTooOld(u16),
    /// A bzImage without the 64-bit entry point.
    #[error(
        "the bzImage is a 32-bit-only kernel (XLF_KERNEL_64 not set); an x86_64 kernel is required"
    )]
    BzImageNot64Bit,
    /// An old "zImage" that loads below 1 MiB.
    #[error("the kernel is a zImage (not loaded high); a bzImage is required")]
    ZImage,
    /// An ELF image for 32-bit x86.
    #[error("the kernel is a 32-bit ELF image; an x86_64 (ELF64) vmlinux is required")]
    Elf32Bit,
    /// An ELF image for another architecture.
    #[error("the ELF kernel is for machine type {0}, not x86_64 ({EM_X86_64})")]
    ElfWrongMachine(u16),
    /// An ELF image with a malformed header.
    #[error("the ELF kernel image is malformed: {0}")]
    ElfMalformed(&'static str),
    /// The ELF image is linked below 1 MiB.
    #[error("the ELF kernel is linked at {0:#x}, below the 1 MiB where kernels are loaded")]
    ElfBelowHimem(u64),
    /// Guest memory does not have RAM at [`HIMEM_START`].
    #[error("guest memory has no RAM at 1 MiB, where the kernel is loaded")]
    NoHighMemory,
    /// The kernel (or the memory it needs to decompress) does not fit in low RAM.
    #[error(
        "the kernel does not fit in guest memory: it needs RAM up to {needed:#x}, but RAM below \
         the 3 GiB MMIO hole ends at {available:#x}; give the VM more memory"
    )]
    KernelTooBig {
        /// End (exclusive) of what the kernel needs.
        needed: u64,
        /// End (exclusive) of usable low RAM.
        available: u64,
    },
    /// linux-loader failed.
    #[error("failed to load the kernel: {0}")]
    Load(#[source] loader::Error),
    /// The initrd file could not be read.
    #[error("failed to read the initrd: {0}")]
    ReadInitrd(#[source] io::Error),
    /// The initrd file is empty.
    #[error("the initrd file is empty")]
    InitrdEmpty,
    /// The initrd does not fit between the kernel and the highest address it may occupy.
    #[error(
        "the initrd ({size} bytes) does not fit in guest memory between the end of the kernel \
         ({kernel_end:#x}) and {limit:#x}; give the VM more memory or use a smaller initrd"
    )]
    InitrdTooBig {
        /// Size of the initrd.
        size: u64,
        /// Lowest address the initrd may use.
        kernel_end: u64,
        /// End (exclusive) of where the initrd may be.
        limit: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("failed to copy the initrd into guest memory: {0}")]
    WriteInitrd(#[source] GuestMemoryError),
    /// The command line is longer than the kernel or our layout allows.
    #[error("the kernel command line is {len} bytes long; at most {max} bytes are allowed")]
    CmdlineTooLong {
        /// Length of the command line.
        len: usize,
        /// Maximum length (without the terminating NUL).
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// Writing the command line to guest memory failed.
    #[error("failed to write the kernel command line to guest memory: {0}")]
    WriteCmdline(#[source] GuestMemoryError),
}

/// The format of a loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage, entered through its 64-bit entry point.
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
    /// The vmlinux extracted from a bzImage on the host ([`crate::decompress`]), loaded as ELF
    /// and entered at its 64-bit entry, with the bzImage's setup header in the zero page.
    ExtractedVmlinux,
}

/// What [`load_kernel`] loaded.
#[derive(Debug, Clone, Copy)]
pub struct KernelInfo {
    /// Format of the kernel image.
    pub format: KernelFormat,
    /// 64-bit entry point (`rip` of the boot vCPU).
    pub entry: GuestAddress,
    /// Address the image was loaded at.
    pub load_addr: GuestAddress,
    /// End (exclusive) of the memory the kernel occupies or needs at boot: for a bzImage this
    /// includes the area it decompresses into (`pref_address + init_size`), so anything placed
    /// above it (the initrd) is safe.
    pub kernel_end: GuestAddress,
    /// The bzImage setup header, to be copied into the zero page; `None` for a plain ELF.
    pub setup_header: Option<setup_header>,
    /// PVH entry point of an ELF kernel that advertises one (for a future PVH boot path).
    pub pvh_entry: Option<GuestAddress>,
}

/// Where [`load_initrd`] put the initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdInfo {
    /// Guest address of the initrd (page aligned).
    pub addr: GuestAddress,
    /// Size of the initrd in bytes.
    pub size: usize,
}

/// Where [`load_cmdline`] put the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdlineInfo {
    /// Guest address of the command line.
    pub addr: GuestAddress,
    /// Size in bytes including the terminating NUL.
    pub size: usize,
}

/// End (exclusive) of the RAM region that contains [`HIMEM_START`], capped at the MMIO hole.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> Result<u64, LoaderError> {
    let region = mem
        .find_region(HIMEM_START)
        .ok_or(LoaderError::NoHighMemory)?;
    let end = region.start_addr().0.saturating_add(region.len());
    Ok(end.min(MMIO_HOLE_START.0))
}

/// Reads as many bytes as are available, up to `buf.len()`.
fn read_up_to<F: Read>(file: &mut F, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The first bytes of a kernel file and what they say it is.
struct KernelHead {
    buf: [u8; SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()],
    len: usize,
    file_len: u64,
    kind: Option<(KernelFormat, Option<setup_header>)>,
}

fn read_head<F: Read + Seek>(kernel: &mut F) -> Result<KernelHead, LoaderError> {
    let file_len = kernel
        .seek(SeekFrom::End(0))
        .map_err(LoaderError::ReadKernel)?;
    kernel.rewind().map_err(LoaderError::ReadKernel)?;
    let mut buf = [0u8; SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()];
    let len = read_up_to(kernel, &mut buf).map_err(LoaderError::ReadKernel)?;
    let kind = if buf[..len].starts_with(&ELF_MAGIC) {
        Some((KernelFormat::Elf, None))
    } else if len == buf.len() {
        let mut hdr = setup_header::default();
        hdr.as_mut_slice()
            .copy_from_slice(&buf[SETUP_HEADER_OFFSET..]);
        (hdr.header == BZIMAGE_MAGIC).then_some((KernelFormat::BzImage, Some(hdr)))
    } else {
        None
    };
    Ok(KernelHead {
        buf,
        len,
        file_len,
        kind,
    })
}

/// Tells whether `kernel` looks like a bzImage or an ELF vmlinux, without loading it: lets the
/// VMM reject a wrong file before it sets anything up. Full checks happen in [`load_kernel`].
pub fn probe_kernel<F: Read + Seek>(kernel: &mut F) -> Result<KernelFormat, LoaderError> {
    match read_head(kernel)?.kind {
        Some((format, _)) => Ok(format),
        None => Err(LoaderError::NotLinuxKernel),
    }
}

/// Loads a bzImage or ELF vmlinux kernel from `kernel` into `mem`.
///
/// `kernel` is usually a `std::fs::File`; any seekable reader works.
pub fn load_kernel<M, F>(mem: &M, kernel: &mut F) -> Result<KernelInfo, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let head = read_head(kernel)?;
    match head.kind {
        Some((KernelFormat::Elf, _)) => load_elf(mem, kernel, &head.buf[..head.len]),
        Some((KernelFormat::BzImage, Some(hdr))) => load_bzimage(mem, kernel, hdr, head.file_len),
        _ => Err(LoaderError::NotLinuxKernel),
    }
}

/// The setup header of `kernel` if it is a bzImage (`None` for anything else), read the way
/// [`probe_kernel`] reads it.
pub fn bzimage_header<F: Read + Seek>(kernel: &mut F) -> Result<Option<setup_header>, LoaderError> {
    Ok(match read_head(kernel)?.kind {
        Some((KernelFormat::BzImage, hdr)) => hdr,
        _ => None,
    })
}

/// Checks that a bzImage header describes a kernel we can enter at its 64-bit entry
/// (boot protocol 2.12+, loaded high, `XLF_KERNEL_64`).
pub fn check_bzimage_header(hdr: &setup_header) -> Result<(), LoaderError> {
    let version = hdr.version;
    if version < MIN_BOOT_PROTOCOL {
        return Err(LoaderError::BootProtocolTooOld(version));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(LoaderError::ZImage);
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::BzImageNot64Bit);
    }
    Ok(())
}

/// Loads `vmlinux` (read straight into guest memory, segment by segment), the ELF kernel
/// extracted from a bzImage whose setup header is `bzimage_header`
/// ([`crate::decompress::extract_vmlinux`]), as an ELF kernel: entered at its
/// ELF entry (`startup_64`, the 64-bit entry the bzImage's decompressor would jump to once
/// done), with the bzImage's setup header kept in [`KernelInfo::setup_header`] so that the zero
/// page carries the kernel's own header (its `cmdline_size`, `initrd_addr_max`, protocol
/// version) exactly as when the bzImage itself is booted.
pub fn load_extracted_vmlinux<M, F>(
    mem: &M,
    vmlinux: &mut F,
    bzimage_header: setup_header,
) -> Result<KernelInfo, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    check_bzimage_header(&bzimage_header)?;
    let head = read_head(vmlinux)?;
    if !matches!(head.kind, Some((KernelFormat::Elf, _))) {
        return Err(LoaderError::ElfMalformed("no ELF magic"));
    }
    let info = load_elf(mem, vmlinux, &head.buf[..head.len])?;
    Ok(KernelInfo {
        format: KernelFormat::ExtractedVmlinux,
        setup_header: Some(bzimage_header),
        ..info
    })
}

fn load_bzimage<M, F>(
    mem: &M,
    kernel: &mut F,
    hdr: setup_header,
    file_len: u64,
) -> Result<KernelInfo, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    check_bzimage_header(&hdr)?;
    let version = hdr.version;

    // Check the fit before copying anything: both the image itself and the area the
    // decompressor works in (pref_address + init_size) must be RAM.
    let available = low_ram_end(mem)?;
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let payload = file_len.saturating_sub((setup_sects + 1) * 512);
    let image_end = HIMEM_START.0.saturating_add(payload);
    let runtime_end = if version >= BOOT_PROTOCOL_INIT_SIZE {
        let pref_address = hdr.pref_address;
        pref_address.saturating_add(u64::from(hdr.init_size))
    } else {
        0
    };
    let needed = image_end.max(runtime_end);
    if needed > available {
        return Err(LoaderError::KernelTooBig { needed, available });
    }

    let result = BzImage::load(mem, Some(HIMEM_START), kernel, Some(HIMEM_START))
        .map_err(LoaderError::Load)?;
    Ok(KernelInfo {
        format: KernelFormat::BzImage,
        entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        load_addr: result.kernel_load,
        kernel_end: GuestAddress(result.kernel_end.max(runtime_end)),
        setup_header: result.setup_header,
        pvh_entry: None,
    })
}

fn load_elf<M, F>(mem: &M, kernel: &mut F, head: &[u8]) -> Result<KernelInfo, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    if head.len() > EI_CLASS && head[EI_CLASS] == ELFCLASS32 {
        return Err(LoaderError::Elf32Bit);
    }
    let ehdr_len = std::mem::size_of::<Elf64_Ehdr>();
    if head.len() < ehdr_len || head[EI_CLASS] != ELFCLASS64 {
        return Err(LoaderError::ElfMalformed(
            "truncated or unknown-class ELF header",
        ));
    }
    let mut ehdr = Elf64_Ehdr::default();
    ehdr.as_mut_slice().copy_from_slice(&head[..ehdr_len]);
    if ehdr.e_machine != EM_X86_64 {
        return Err(LoaderError::ElfWrongMachine(ehdr.e_machine));
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() {
        return Err(LoaderError::ElfMalformed("unexpected program header size"));
    }
    if ehdr.e_entry < HIMEM_START.0 {
        return Err(LoaderError::ElfBelowHimem(ehdr.e_entry));
    }

    // Find the extent of the loadable segments and check it against RAM before loading.
    kernel
        .seek(SeekFrom::Start(ehdr.e_phoff))
        .map_err(LoaderError::ReadKernel)?;
    let mut needed = 0u64;
    for _ in 0..ehdr.e_phnum {
        let mut phdr = Elf64_Phdr::default();
        kernel
            .read_exact(phdr.as_mut_slice())
            .map_err(LoaderError::ReadKernel)?;
        if phdr.p_type != PT_LOAD || phdr.p_filesz == 0 {
            continue;
        }
        if phdr.p_paddr < HIMEM_START.0 {
            return Err(LoaderError::ElfBelowHimem(phdr.p_paddr));
        }
        let end = phdr
            .p_paddr
            .checked_add(phdr.p_memsz.max(phdr.p_filesz))
            .ok_or(LoaderError::ElfMalformed("segment end overflows"))?;
        needed = needed.max(end);
    }
    if needed == 0 {
        return Err(LoaderError::ElfMalformed("no loadable segment"));
    }
    let available = low_ram_end(mem)?;
    if needed > available {
        return Err(LoaderError::KernelTooBig { needed, available });
    }

    let result = Elf::load(mem, None, kernel, Some(HIMEM_START)).map_err(LoaderError::Load)?;
    let pvh_entry = match result.pvh_boot_cap {
        linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
        _ => None,
    };
    Ok(KernelInfo {
        format: KernelFormat::Elf,
        entry: GuestAddress(ehdr.e_entry),
        load_addr: result.kernel_load,
        kernel_end: GuestAddress(result.kernel_end),
        setup_header: None,
        pvh_entry,
    })
}

/// Loads the initrd from `initrd` page-aligned and as high as possible below
/// min(end of low RAM, `initrd_addr_max` + 1 of the kernel (0x37ff_ffff + 1 if unknown)), and
/// above `kernel_end`.
pub fn load_initrd<M, F>(
    mem: &M,
    initrd: &mut F,
    kernel_end: GuestAddress,
    setup_header: Option<&setup_header>,
) -> Result<InitrdInfo, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(LoaderError::ReadInitrd)?;
    initrd.rewind().map_err(LoaderError::ReadInitrd)?;
    if size == 0 {
        return Err(LoaderError::InitrdEmpty);
    }

    let addr_max = setup_header
        .map(|h| h.initrd_addr_max)
        .filter(|&max| max != 0)
        .map_or(DEFAULT_INITRD_ADDR_MAX, u64::from);
    let limit = low_ram_end(mem)?.min(addr_max.saturating_add(1));
    let lowest = kernel_end
        .0
        .max(HIMEM_START.0)
        .checked_next_multiple_of(INITRD_ALIGN)
        .unwrap_or(u64::MAX);
    let too_big = || LoaderError::InitrdTooBig {
        size,
        kernel_end: kernel_end.0,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)?;
    let addr = addr - addr % INITRD_ALIGN;
    if addr < lowest {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|e| match e {
            GuestMemoryError::IOError(io) => LoaderError::ReadInitrd(io),
            other => LoaderError::WriteInitrd(other),
        })?;
    Ok(InitrdInfo {
        addr: GuestAddress(addr),
        size: len,
    })
}

/// Largest command line (without the NUL) the kernel described by `setup_header` accepts and
/// that fits at [`CMDLINE_START`]: min([`CMDLINE_MAX_SIZE`] - 1, the header's `cmdline_size`).
pub fn max_cmdline_len(setup_header: Option<&setup_header>) -> usize {
    let ours = CMDLINE_MAX_SIZE - 1;
    match setup_header {
        Some(h) if h.version >= BOOT_PROTOCOL_CMDLINE_SIZE => {
            usize::try_from(h.cmdline_size).map_or(ours, |k| k.min(ours))
        }
        _ => ours,
    }
}

/// Writes `cmdline` (plus a NUL) at [`CMDLINE_START`], after checking it against
/// [`max_cmdline_len`].
pub fn load_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    setup_header: Option<&setup_header>,
) -> Result<CmdlineInfo, LoaderError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(LoaderError::CmdlineHasNul);
    }
    let max = max_cmdline_len(setup_header);
    if cmdline.len() > max {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, CMDLINE_START)
        .map_err(LoaderError::WriteCmdline)?;
    Ok(CmdlineInfo {
        addr: CMDLINE_START,
        size: bytes.len(),
    })
}

#[cfg(test)]
mod tests;
