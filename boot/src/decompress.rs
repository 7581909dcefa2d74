//! Extracting the uncompressed kernel (`vmlinux`, an ELF64 x86-64 executable) from a bzImage.
//!
//! A bzImage is real-mode setup code, a small decompressor and the compressed `vmlinux`
//! ("payload"). Booting the bzImage makes the guest decompress itself on every boot; booting the
//! extracted vmlinux through its 64-bit entry skips that. This module finds the payload through
//! the setup header (`payload_offset`/`payload_length`, boot protocol 2.08+), detects its format
//! by magic, decompresses it with pure-Rust decoders under a hard size cap, and checks that the
//! result is an ELF64 x86-64 executable whose segments lie inside the file.
//!
//! Everything here works on byte slices and returns typed errors; a hostile or corrupt image is
//! an error, never a panic, and never yields bytes that were not verified: gzip is checked by its
//! CRC-32 and size, and every other format by the decompressed size the kernel build appends to
//! the payload (plus the format's own checks: xz CRC, zstd content checksum when present).

use std::io::Read;

use linux_loader::bootparam::setup_header;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, EM_X86_64, PT_LOAD};
use vm_memory::ByteValued;

/// Default cap on the size of an extracted vmlinux (real ones are 20-80 MiB).
pub const DEFAULT_MAX_VMLINUX_SIZE: usize = 512 << 20;

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Where the setup header ends: [`bzimage_header`] needs this many leading bytes.
const SETUP_HEADER_END: usize = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();
/// "HdrS": the setup header magic.
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.08: the first with `payload_offset` and `payload_length`.
const BOOT_PROTOCOL_PAYLOAD: u16 = 0x0208;
/// Uncompressed size of one lz4 legacy block (`LEGACY_BLOCKSIZE` in the lz4 sources).
const LZ4_LEGACY_BLOCK_SIZE: usize = 8 << 20;
/// Magic of an lz4 legacy frame, little endian.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Size of the gzip trailer (CRC-32 and ISIZE).
const GZIP_TRAILER: usize = 8;
/// Size of the uncompressed-size word the kernel build appends to non-gzip payloads.
const SIZE_TRAILER: usize = 4;

use crate::loader::{ELFCLASS64, ELF_MAGIC};
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;

/// The compression of a bzImage payload (`CONFIG_KERNEL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`1f 8b`).
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`), with the x86 BCJ filter the kernel uses.
    Xz,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// lz4 legacy frames (`02 21 4c 18`).
    Lz4,
    /// bzip2 (`BZh`): recognised, not supported.
    Bzip2,
    /// lzma "alone" (`5d 00 00`): recognised, not supported.
    Lzma,
    /// lzop (`89 LZO`): recognised, not supported.
    Lzo,
}

impl Compression {
    /// Detects the format from the first bytes of a payload.
    pub fn detect(data: &[u8]) -> Option<Compression> {
        const MAGICS: [(&[u8], Compression); 7] = [
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (&[0x89, b'L', b'Z', b'O', 0x00], Compression::Lzo),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| data.starts_with(magic))
            .map(|&(_, c)| c)
    }

    /// Whether [`decompress`] can decode this format.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Compression::Gzip | Compression::Xz | Compression::Zstd | Compression::Lz4
        )
    }

    /// The format's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a vmlinux could not be extracted from a bzImage.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// No setup header ("HdrS") where a bzImage has one.
    #[error("not a bzImage (no setup header)")]
    NotBzImage,
    /// The boot protocol predates `payload_offset`/`payload_length`.
    #[error(
        "the bzImage uses boot protocol {}.{:02}; 2.08 or newer is needed to find its payload",
        .0 >> 8,
        .0 & 0xff
    )]
    NoPayloadInfo(u16),
    /// The payload the header describes is not inside the file.
    #[error(
        "the bzImage payload ({length} bytes at offset {offset:#x}) lies outside the \
         {file_len}-byte file"
    )]
    PayloadOutOfBounds {
        /// File offset of the payload.
        offset: u64,
        /// Its length.
        length: u64,
        /// Length of the file.
        file_len: usize,
    },
    /// The payload starts with no known compression magic.
    #[error("the bzImage payload has an unknown compression format (starts with {0})")]
    UnknownCompression(String),
    /// A format that is recognised but not decoded here.
    #[error("the bzImage payload is {0}-compressed, which is not supported")]
    Unsupported(Compression),
    /// The decoder failed, or an integrity check did not match.
    #[error("the {format} payload is corrupt: {reason}")]
    Corrupt {
        /// Compression format.
        format: Compression,
        /// What was wrong.
        reason: String,
    },
    /// The decompressed kernel would exceed the size cap.
    #[error("the decompressed kernel exceeds the {limit}-byte limit")]
    TooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The decompressed data is not an ELF64 x86-64 executable.
    #[error("the decompressed payload is not an x86-64 vmlinux: {0}")]
    NotVmlinux(&'static str),
}

impl DecompressError {
    fn corrupt(format: Compression, reason: impl Into<String>) -> Self {
        DecompressError::Corrupt {
            format,
            reason: reason.into(),
        }
    }
}

/// The compressed kernel inside a bzImage.
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    /// Its format.
    pub compression: Compression,
    /// The payload bytes (`payload_length` bytes at `payload_offset`).
    pub data: &'a [u8],
}

/// The setup header of `image`, if it has the bzImage magic.
pub fn bzimage_header(image: &[u8]) -> Option<setup_header> {
    let bytes = image.get(SETUP_HEADER_OFFSET..SETUP_HEADER_END)?;
    let mut hdr = setup_header::default();
    hdr.as_mut_slice().copy_from_slice(bytes);
    (hdr.header == BZIMAGE_MAGIC).then_some(hdr)
}

/// Whether `image` starts like a bzImage.
pub fn is_bzimage(image: &[u8]) -> bool {
    bzimage_header(image).is_some()
}

/// Finds the compressed payload of a bzImage and detects its format.
pub fn find_payload(image: &[u8]) -> Result<Payload<'_>, DecompressError> {
    let hdr = bzimage_header(image).ok_or(DecompressError::NotBzImage)?;
    let version = hdr.version;
    if version < BOOT_PROTOCOL_PAYLOAD {
        return Err(DecompressError::NoPayloadInfo(version));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    // payload_offset counts from the protected-mode code, which follows the setup sectors.
    let offset = (setup_sects + 1) * 512 + u64::from(hdr.payload_offset);
    let length = u64::from(hdr.payload_length);
    let out_of_bounds = || DecompressError::PayloadOutOfBounds {
        offset,
        length,
        file_len: image.len(),
    };
    let start = usize::try_from(offset).map_err(|_| out_of_bounds())?;
    let end = usize::try_from(offset + length).map_err(|_| out_of_bounds())?;
    let data = image.get(start..end).ok_or_else(out_of_bounds)?;
    let compression = Compression::detect(data).ok_or_else(|| {
        let head: Vec<String> = data.iter().take(6).map(|b| format!("{b:02x}")).collect();
        DecompressError::UnknownCompression(head.join(" "))
    })?;
    Ok(Payload { compression, data })
}

/// Decompresses `payload`, refusing to produce more than `limit` bytes.
pub fn decompress(payload: Payload<'_>, limit: usize) -> Result<Vec<u8>, DecompressError> {
    let format = payload.compression;
    if !format.is_supported() {
        return Err(DecompressError::Unsupported(format));
    }
    if format == Compression::Gzip {
        return gunzip(payload.data, limit);
    }
    // The kernel build appends the uncompressed size (le32) to every non-gzip payload.
    let split = payload
        .data
        .len()
        .checked_sub(SIZE_TRAILER)
        .ok_or_else(|| DecompressError::corrupt(format, "shorter than its size trailer"))?;
    let (data, trailer) = payload.data.split_at(split);
    let expected = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if usize::try_from(expected).map_or(true, |e| e > limit) {
        return Err(DecompressError::TooLarge { limit });
    }
    let hint = expected as usize;
    let out = match format {
        Compression::Xz => unxz(data, hint, limit)?,
        Compression::Zstd => unzstd(data, hint, limit)?,
        Compression::Lz4 => unlz4(data, hint, limit)?,
        _ => return Err(DecompressError::Unsupported(format)),
    };
    if out.len() as u32 != expected {
        return Err(DecompressError::corrupt(
            format,
            format!(
                "decompressed to {} bytes, the payload says {expected}",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Extracts and checks the vmlinux of a bzImage, with the default size cap.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, DecompressError> {
    extract_vmlinux_with_limit(image, DEFAULT_MAX_VMLINUX_SIZE)
}

/// Extracts the vmlinux of a bzImage, refusing more than `limit` bytes of output, and checks
/// that it is an ELF64 x86-64 executable ([`check_vmlinux`]).
pub fn extract_vmlinux_with_limit(image: &[u8], limit: usize) -> Result<Vec<u8>, DecompressError> {
    let payload = find_payload(image)?;
    let vmlinux = decompress(payload, limit)?;
    check_vmlinux(&vmlinux)?;
    Ok(vmlinux)
}

/// Checks that `elf` is a little-endian ELF64 x86-64 executable with at least one loadable
/// segment, and that its program headers and segments lie inside the data. Returns the entry.
pub fn check_vmlinux(elf: &[u8]) -> Result<u64, DecompressError> {
    let bad = DecompressError::NotVmlinux;
    let ehdr_bytes = elf
        .get(..std::mem::size_of::<Elf64_Ehdr>())
        .ok_or(bad("shorter than an ELF header"))?;
    let mut ehdr = Elf64_Ehdr::default();
    ehdr.as_mut_slice().copy_from_slice(ehdr_bytes);
    if ehdr.e_ident[..4] != ELF_MAGIC {
        return Err(bad("no ELF magic"));
    }
    if ehdr.e_ident[4] != ELFCLASS64 || ehdr.e_ident[5] != ELFDATA2LSB {
        return Err(bad("not a little-endian ELF64 file"));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(bad("not an x86-64 ELF file"));
    }
    if ehdr.e_type != ET_EXEC {
        return Err(bad("not an executable"));
    }
    let phent = std::mem::size_of::<Elf64_Phdr>();
    if usize::from(ehdr.e_phentsize) != phent {
        return Err(bad("unexpected program header size"));
    }
    let phoff = usize::try_from(ehdr.e_phoff).map_err(|_| bad("program headers out of range"))?;
    let mut loadable = 0;
    for i in 0..usize::from(ehdr.e_phnum) {
        let start = phoff
            .checked_add(i * phent)
            .ok_or(bad("program headers out of range"))?;
        let bytes = elf
            .get(start..start.saturating_add(phent))
            .ok_or(bad("program headers out of range"))?;
        let mut phdr = Elf64_Phdr::default();
        phdr.as_mut_slice().copy_from_slice(bytes);
        if phdr.p_type != PT_LOAD {
            continue;
        }
        let end = phdr
            .p_offset
            .checked_add(phdr.p_filesz)
            .ok_or(bad("segment out of range"))?;
        if end > elf.len() as u64 {
            return Err(bad("a loadable segment lies past the end of the file"));
        }
        loadable += 1;
    }
    if loadable == 0 {
        return Err(bad("no loadable segment"));
    }
    Ok(ehdr.e_entry)
}

/// Reads all of `reader`, failing with `TooLarge` past `limit` bytes and with `Corrupt` when
/// the decoder reports an error.
fn read_capped<R: Read>(
    reader: R,
    format: Compression,
    hint: usize,
    limit: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::with_capacity(hint.min(limit));
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecompressError::corrupt(format, e.to_string()))?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge { limit });
    }
    Ok(out)
}

fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, DecompressError> {
    const FTEXT_MASK: u8 = 0x01;
    const FHCRC: u8 = 0x02;
    const FEXTRA: u8 = 0x04;
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    let format = Compression::Gzip;
    let truncated = || DecompressError::corrupt(format, "truncated header");
    let fixed = data.get(..10).ok_or_else(truncated)?;
    if fixed[2] != 8 {
        return Err(DecompressError::corrupt(format, "not deflate-compressed"));
    }
    let flags = fixed[3];
    if flags & !(FTEXT_MASK | FHCRC | FEXTRA | FNAME | FCOMMENT) != 0 {
        return Err(DecompressError::corrupt(
            format,
            "reserved header flags set",
        ));
    }
    let mut pos = 10;
    if flags & FEXTRA != 0 {
        let xlen = data.get(pos..pos + 2).ok_or_else(truncated)?;
        pos += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let rest = data.get(pos..).ok_or_else(truncated)?;
            let nul = rest.iter().position(|&b| b == 0).ok_or_else(truncated)?;
            pos += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        pos += 2;
    }
    let body_end = data
        .len()
        .checked_sub(GZIP_TRAILER)
        .filter(|&end| end >= pos)
        .ok_or_else(truncated)?;
    let trailer = &data[body_end..];
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let isize = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);

    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(&data[pos..body_end], limit)
        .map_err(|e| match e.status {
            miniz_oxide::inflate::TINFLStatus::HasMoreOutput => DecompressError::TooLarge { limit },
            status => DecompressError::corrupt(format, format!("deflate error: {status:?}")),
        })?;
    if out.len() as u32 != isize {
        return Err(DecompressError::corrupt(
            format,
            format!("size {} does not match the trailer's {isize}", out.len()),
        ));
    }
    if crc32fast::hash(&out) != crc {
        return Err(DecompressError::corrupt(format, "CRC-32 mismatch"));
    }
    Ok(out)
}

fn unxz(data: &[u8], hint: usize, limit: usize) -> Result<Vec<u8>, DecompressError> {
    // Multiple streams allowed, so that bytes after the stream must be stream padding or
    // another stream, not silently ignored.
    let reader = lzma_rust2::XzReader::new(data, true);
    read_capped(reader, Compression::Xz, hint, limit)
}

fn unzstd(data: &[u8], hint: usize, limit: usize) -> Result<Vec<u8>, DecompressError> {
    let format = Compression::Zstd;
    let mut input = data;
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut input)
        .map_err(|e| DecompressError::corrupt(format, e.to_string()))?;
    let out = read_capped(&mut decoder, format, hint, limit)?;
    let frame = decoder.into_frame_decoder();
    if !frame.is_finished() {
        return Err(DecompressError::corrupt(format, "truncated frame"));
    }
    if let (Some(stored), Some(computed)) = (
        frame.get_checksum_from_data(),
        frame.get_calculated_checksum(),
    ) {
        if stored != computed {
            return Err(DecompressError::corrupt(
                format,
                "content checksum mismatch",
            ));
        }
    }
    if !input.is_empty() {
        return Err(DecompressError::corrupt(
            format,
            format!("{} bytes after the frame", input.len()),
        ));
    }
    Ok(out)
}

/// lz4 "legacy" frames, as `lz4 -l` writes them: the magic, then blocks, each a le32
/// compressed size and an independent lz4 block of at most 8 MiB uncompressed. A repeated magic
/// starts another frame (concatenated files).
fn unlz4(data: &[u8], hint: usize, limit: usize) -> Result<Vec<u8>, DecompressError> {
    let format = Compression::Lz4;
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if data.len() < 4 || le32(data) != LZ4_LEGACY_MAGIC {
        return Err(DecompressError::corrupt(format, "no legacy frame magic"));
    }
    // LZ4_compressBound of a full block: the largest a block may be stored as.
    let max_block = LZ4_LEGACY_BLOCK_SIZE + LZ4_LEGACY_BLOCK_SIZE / 255 + 16;
    let mut out = Vec::with_capacity(hint.min(limit));
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK_SIZE];
    let mut pos = 4;
    while pos < data.len() {
        let size_bytes = data
            .get(pos..pos + 4)
            .ok_or_else(|| DecompressError::corrupt(format, "truncated block header"))?;
        pos += 4;
        let size = le32(size_bytes);
        if size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let size = size as usize;
        if size == 0 || size > max_block {
            return Err(DecompressError::corrupt(
                format,
                format!("invalid block size {size}"),
            ));
        }
        let compressed = data
            .get(pos..pos + size)
            .ok_or_else(|| DecompressError::corrupt(format, "truncated block"))?;
        pos += size;
        let n = lz4_flex::block::decompress_into(compressed, &mut block)
            .map_err(|e| DecompressError::corrupt(format, e.to_string()))?;
        if out.len() + n > limit {
            return Err(DecompressError::TooLarge { limit });
        }
        out.extend_from_slice(&block[..n]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
