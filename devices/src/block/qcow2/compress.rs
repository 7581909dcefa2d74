//! Compressed clusters: raw deflate (qcow2's "zlib") and zstd, decoding with the output capped at
//! one cluster, and packing newly compressed clusters byte by byte into shared host clusters
//! (for `convert -c`).

use std::io::Read;
use std::os::unix::fs::FileExt;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::header::CompressionType;
use super::{Error, Qcow2Image, Result, OFLAG_COMPRESSED};
use crate::block::raw::read_zero_fill;

/// Decodes one cluster into `out` (exactly `out.len()` bytes must come out).
pub fn decompress_cluster(ct: CompressionType, input: &[u8], out: &mut [u8]) -> bool {
    match ct {
        CompressionType::Zlib => {
            let mut d = DecompressorOxide::new();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (status, _, produced) = decompress(&mut d, input, out, 0, flags);
            // Like QEMU: a full output buffer is success even if the stream goes on.
            produced == out.len()
                && matches!(
                    status,
                    TINFLStatus::Done | TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput
                )
        }
        CompressionType::Zstd => {
            let Ok(mut dec) = ruzstd::decoding::StreamingDecoder::new(input) else {
                return false;
            };
            dec.read_exact(out).is_ok()
        }
    }
}

/// Compresses one cluster; `None` if that doesn't save space.
pub fn compress_cluster(ct: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let out = match ct {
        CompressionType::Zlib => miniz_oxide::deflate::compress_to_vec(input, 6),
        CompressionType::Zstd => {
            ruzstd::encoding::compress_to_vec(input, ruzstd::encoding::CompressionLevel::Fastest)
        }
    };
    (out.len() < input.len()).then_some(out)
}

impl Qcow2Image {
    /// The decompressed cluster whose data starts at host `offset` (at most `len` bytes).
    pub(crate) fn read_compressed(&mut self, offset: u64, len: u64) -> Result<&[u8]> {
        let cached = matches!(&self.zcache, Some((o, _)) if *o == offset);
        if !cached {
            let mut input = vec![0u8; len as usize];
            read_zero_fill(&self.file, &mut input, offset)?;
            let mut out = vec![0u8; self.cs as usize];
            if !decompress_cluster(self.header.compression_type, &input, &mut out) {
                return Err(Error::Decompress(offset));
            }
            self.zcache = Some((offset, out));
        }
        match &self.zcache {
            Some((_, d)) => Ok(d),
            None => Err(Error::Internal("compressed cache empty")),
        }
    }

    /// Writes guest cluster at `goff` (cluster aligned; `data` is at most one cluster)
    /// compressed, or plainly if it doesn't compress.
    pub fn write_compressed(&mut self, data: &[u8], goff: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let cs = self.cs;
        if !goff.is_multiple_of(cs)
            || data.len() as u64 > cs
            || goff + data.len() as u64 > self.header.size
        {
            return Err(Error::Internal("compressed write must cover one cluster"));
        }
        let mut full = vec![0u8; cs as usize];
        full[..data.len()].copy_from_slice(data);
        let Some(z) = compress_cluster(self.header.compression_type, &full) else {
            return self.write_guest(data, goff);
        };
        self.zcache = None;
        let cb = self.header.cluster_bits;
        let len = z.len() as u64;
        let cur = self.compress_cursor;
        let off = if cur != 0 && (cur & (cs - 1)) + len <= cs {
            self.change_refcount(cur >> cb, 1)?;
            cur
        } else {
            self.alloc_clusters(1)?
        };
        self.file.write_all_at(&z, off)?;
        self.note_written(off, len);
        let end = off + len;
        self.compress_cursor = if end & (cs - 1) == 0 { 0 } else { end };
        let x = 62 - (cb - 8);
        let nsec = ((end - 1) >> 9) - (off >> 9);
        let entry = OFLAG_COMPRESSED | (nsec << x) | off;
        let (slot, idx) = self.l2_for_write(goff)?;
        let old = self.l2.get(slot, idx);
        self.l2.set(slot, idx, entry);
        self.free_entry_later(old);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_types_and_reject_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for ct in [CompressionType::Zlib, CompressionType::Zstd] {
            let z = compress_cluster(ct, &data).unwrap();
            let mut input = z.clone();
            input.extend_from_slice(&[0xff; 300]); // trailing bytes of the last sector
            let mut out = vec![0u8; 65536];
            assert!(decompress_cluster(ct, &input, &mut out));
            assert_eq!(out, data);
            let mut short = vec![0u8; 65536];
            assert!(!decompress_cluster(ct, &z[..z.len() / 2], &mut short));
            assert!(!decompress_cluster(
                ct,
                &[0xde, 0xad, 0xbe, 0xef],
                &mut short
            ));
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress_cluster(CompressionType::Zlib, &random).is_none());
    }
}
