//! The qcow2 header (v2 and v3), its extensions and the backing file name: parsing with every
//! bound checked against the file, and encoding that keeps unknown fields and extensions intact.

use super::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression_type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;
/// Byte offset of the incompatible feature bits (for updating the dirty bit alone).
pub const INCOMPAT_OFFSET: u64 = 72;
/// QEMU's limit on the L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most snapshots an image may have.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Compressed cluster encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (window 4 KiB..32 KiB), the default.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// qemu-img's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension kept as raw bytes (known ones are also decoded into [`Header`] fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type magic.
    pub kind: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

/// A decoded qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the active L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table starts.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order.
    pub refcount_order: u32,
    /// How compressed clusters are encoded.
    pub compression_type: CompressionType,
    /// Header bytes past the fields we know (v3, up to header_length), kept verbatim.
    pub unknown_fields: Vec<u8>,
    /// Header extensions in file order (without the end marker).
    pub extensions: Vec<Extension>,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Names of the incompatible bits we don't know, using the image's feature name table.
fn unknown_feature_names(bits: u64, exts: &[Extension]) -> String {
    let mut names = Vec::new();
    for bit in 0..64 {
        if bits & (1 << bit) == 0 {
            continue;
        }
        let mut name = format!("bit {bit}");
        for e in exts.iter().filter(|e| e.kind == EXT_FEATURE_TABLE) {
            for entry in e.data.chunks_exact(48) {
                if entry[0] == 0 && u32::from(entry[1]) == bit {
                    let raw = &entry[2..48];
                    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                    name = format!("{} (bit {bit})", String::from_utf8_lossy(&raw[..end]));
                }
            }
        }
        names.push(name);
    }
    names.join(", ")
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Backing file format from the header extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// Sets or removes the backing file format extension.
    pub fn set_backing_format(&mut self, fmt: Option<&str>) {
        self.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
        if let Some(f) = fmt {
            self.extensions.insert(
                0,
                Extension {
                    kind: EXT_BACKING_FORMAT,
                    data: f.as_bytes().to_vec(),
                },
            );
        }
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let per_l1 = 1u64 << (cluster_bits * 2 - 3);
        size.div_ceil(per_l1)
    }

    /// Parses and validates the header in `buf` (the first cluster, or as much of it as the file
    /// has) for a file of `file_len` bytes.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::Truncated("header"));
        }
        if buf[0..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::BadClusterBits(cluster_bits));
        }
        let cs = 1u64 << cluster_bits;
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let size = be64(buf, 24);
        let crypt_method = be32(buf, 32);
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let nb_snapshots = be32(buf, 60);
        let snapshots_offset = be64(buf, 64);
        let (mut incompat, mut compat, mut autoclear, mut refcount_order, mut header_length) =
            (0, 0, 0, 4, V2_HEADER_LEN);
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(Error::Truncated("v3 header"));
            }
            incompat = be64(buf, 72);
            compat = be64(buf, 80);
            autoclear = be64(buf, 88);
            refcount_order = be32(buf, 96);
            header_length = be32(buf, 100);
            if header_length < V3_HEADER_LEN
                || !header_length.is_multiple_of(8)
                || u64::from(header_length) > cs
                || header_length as usize > buf.len()
            {
                return Err(Error::BadHeaderLength(header_length));
            }
        }
        if crypt_method != 0 {
            return Err(Error::Unsupported("encrypted images"));
        }
        if refcount_order > 6 {
            return Err(Error::BadRefcountOrder(refcount_order));
        }
        let hl = header_length as usize;
        let mut compression_type = CompressionType::Zlib;
        let mut unknown_fields = Vec::new();
        if hl > 104 {
            let ct = buf[104];
            compression_type = match ct {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                _ => return Err(Error::BadCompressionType(ct)),
            };
            unknown_fields = buf[105..hl].to_vec();
        }
        if (incompat & INCOMPAT_COMPRESSION != 0) != (compression_type != CompressionType::Zlib) {
            return Err(Error::BadCompressionType(compression_type as u8));
        }

        // Extensions: from the end of the header to the end marker, inside the first cluster
        // (and before the backing file name when there is one).
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset.min(cs)
        } else {
            cs
        }
        .min(buf.len() as u64) as usize;
        let mut extensions = Vec::new();
        let mut pos = hl;
        if version == 3 {
            loop {
                if pos + 8 > ext_end {
                    // No end marker before the end of the area; QEMU tolerates this too.
                    break;
                }
                let kind = be32(buf, pos);
                let len = be32(buf, pos + 4) as usize;
                if kind == 0 {
                    break;
                }
                let data_start = pos + 8;
                let Some(data_end) = data_start.checked_add(len).filter(|&e| e <= ext_end) else {
                    return Err(Error::BadExtension(kind));
                };
                extensions.push(Extension {
                    kind,
                    data: buf[data_start..data_end].to_vec(),
                });
                pos = data_start + len.next_multiple_of(8);
            }
        }

        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if incompat & !known != 0 {
            return Err(Error::UnknownIncompatibleFeatures(unknown_feature_names(
                incompat & !known,
                &extensions,
            )));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported("external data files"));
        }
        if incompat & INCOMPAT_EXTL2 != 0 {
            return Err(Error::Unsupported("extended L2 entries (subclusters)"));
        }
        if version == 2 {
            // v2 has none of these; keep the in-memory form consistent.
            compat = 0;
            autoclear = 0;
        }

        let backing_file = if backing_file_offset != 0 {
            if backing_file_size > 1023 {
                return Err(Error::BadBackingName("longer than 1023 bytes"));
            }
            let start = backing_file_offset;
            let end = start + u64::from(backing_file_size);
            if end > cs || end as usize > buf.len() || start < u64::from(header_length) {
                return Err(Error::BadBackingName("outside the first cluster"));
            }
            let raw = &buf[start as usize..end as usize];
            Some(String::from_utf8(raw.to_vec()).map_err(|_| Error::BadBackingName("not UTF-8"))?)
        } else {
            None
        };

        // Table bounds against the file.
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::TableTooLarge("L1", l1_bytes));
        }
        if size > (1u64 << 61) {
            return Err(Error::SizeTooLarge(size));
        }
        if Self::l1_entries_for(size, cluster_bits) > u64::from(l1_size) {
            return Err(Error::L1TooSmall { l1_size, size });
        }
        check_table("L1", l1_table_offset, l1_bytes, cs, file_len)?;
        if refcount_table_clusters == 0 {
            return Err(Error::EmptyRefcountTable);
        }
        let rt_bytes = u64::from(refcount_table_clusters) << cluster_bits;
        if rt_bytes > MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::TableTooLarge("refcount", rt_bytes));
        }
        check_table("refcount", refcount_table_offset, rt_bytes, cs, file_len)?;
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::TooManySnapshots(nb_snapshots));
        }
        if nb_snapshots > 0 {
            // Each entry is at least 40 bytes.
            check_table(
                "snapshot",
                snapshots_offset,
                u64::from(nb_snapshots) * 40,
                cs,
                file_len,
            )?;
        }

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features: incompat,
            compatible_features: compat,
            autoclear_features: autoclear,
            refcount_order,
            compression_type,
            unknown_fields,
            extensions,
            backing_file,
        })
    }

    /// Encodes the header, extensions and backing name; fails if they don't fit in cluster 0.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut b = Vec::with_capacity(1024);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            let has_ct =
                self.compression_type != CompressionType::Zlib || !self.unknown_fields.is_empty();
            let len = if has_ct {
                (105 + self.unknown_fields.len()).next_multiple_of(8) as u32
            } else {
                V3_HEADER_LEN
            };
            b.extend_from_slice(&len.to_be_bytes());
            if has_ct {
                b.push(self.compression_type as u8);
                b.extend_from_slice(&self.unknown_fields);
                b.resize(len as usize, 0);
            }
            for e in &self.extensions {
                b.extend_from_slice(&e.kind.to_be_bytes());
                b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
                b.extend_from_slice(&e.data);
                b.resize(b.len().next_multiple_of(8), 0);
            }
            b.extend_from_slice(&[0u8; 8]); // end of extensions
        }
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::HeaderTooLarge);
        }
        Ok(b)
    }
}

/// A table must be cluster aligned, outside the header cluster and inside the file.
fn check_table(what: &'static str, offset: u64, bytes: u64, cs: u64, file_len: u64) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cs) || offset == 0 {
        return Err(Error::BadTableOffset(what, offset));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::TablePastEof(what, offset)),
    }
}

/// A feature name table for the features we know (QEMU writes one into v3 images).
pub fn feature_table() -> Extension {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut data = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&e);
    }
    Extension {
        kind: EXT_FEATURE_TABLE,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            compression_type: CompressionType::Zlib,
            unknown_fields: Vec::new(),
            extensions: vec![
                Extension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
                feature_table(),
            ],
            backing_file: Some("base.img".into()),
        }
    }

    #[test]
    fn encode_parse_roundtrip_keeps_unknown_extensions() {
        let mut h = sample();
        h.set_backing_format(Some("raw"));
        let b = h.encode().unwrap();
        let p = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.backing_format().as_deref(), Some("raw"));
    }

    #[test]
    fn rejects_bad_headers() {
        let good = sample().encode().unwrap();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(Header::parse(&b, 1 << 20), Err(Error::BadMagic)));
        assert!(matches!(
            Header::parse(&good[..50], 1 << 20),
            Err(Error::Truncated(_))
        ));
        let mut b = good.clone();
        b[79] = 0x80; // unknown incompatible bit 7
        let e = Header::parse(&b, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("bit 7"), "{e}");
        let mut b = good.clone();
        b[56..60].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 1 << 20),
            Err(Error::EmptyRefcountTable)
        ));
        let mut b = good.clone();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 1 << 20),
            Err(Error::TableTooLarge(..))
        ));
        let mut b = good.clone();
        b[40..48].copy_from_slice(&100u64.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 1 << 20),
            Err(Error::BadTableOffset(..))
        ));
        // Tables past the end of a truncated file.
        assert!(matches!(
            Header::parse(&good, 1 << 17),
            Err(Error::TablePastEof(..))
        ));
        let mut b = good.clone();
        b[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 1 << 20),
            Err(Error::BadClusterBits(30))
        ));
        let mut b = good;
        b[79] = 4; // external data file
        assert!(matches!(
            Header::parse(&b, 1 << 20),
            Err(Error::Unsupported(_))
        ));
    }
}
