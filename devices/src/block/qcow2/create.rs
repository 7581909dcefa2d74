//! Creating images: a skeleton (header, refcount table, one refcount block) written directly,
//! then grown to the requested size by the engine's own resize, which lays out the L1 table.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{
    feature_table, CompressionType, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
};
use super::refcount::set_entry;
use super::{Error, Qcow2Image, Result};
use crate::block::OpenOptions;

/// Parameters of a new image (qemu-img's `-o` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (multiple of 512).
    pub size: u64,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// 2 or 3 (qemu-img's compat=0.10 / 1.1).
    pub version: u32,
    /// refcount_bits = 1 << refcount_order (v2: 4 only).
    pub refcount_order: u32,
    /// Set the lazy refcounts compatible feature (v3).
    pub lazy_refcounts: bool,
    /// Compression type for compressed clusters.
    pub compression_type: CompressionType,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
}

impl CreateOptions {
    /// qemu-img's defaults: v3, 64 KiB clusters, 16-bit refcounts, zlib.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Header of the skeleton image (size 0, no L1 table yet).
pub fn blank_header(o: &CreateOptions) -> Header {
    let cs = 1u64 << o.cluster_bits;
    let mut h = Header {
        version: o.version,
        cluster_bits: o.cluster_bits,
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: o.refcount_order,
        compression_type: o.compression_type,
        unknown_fields: Vec::new(),
        extensions: Vec::new(),
        backing_file: o.backing_file.clone(),
    };
    if o.compression_type != CompressionType::Zlib {
        h.incompatible_features |= INCOMPAT_COMPRESSION;
    }
    if o.version >= 3 {
        h.set_backing_format(o.backing_format.as_deref());
    }
    h
}

/// Creates a qcow2 image at `path` (overwriting it).
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    if !(9..=21).contains(&o.cluster_bits) {
        return Err(Error::BadCreateOption(
            "cluster size must be a power of two from 512 to 2M",
        ));
    }
    if o.refcount_order > 6 {
        return Err(Error::BadCreateOption(
            "refcount_bits must be 1, 2, 4, 8, 16, 32 or 64",
        ));
    }
    if o.version != 2 && o.version != 3 {
        return Err(Error::BadCreateOption("compat must be 0.10 or 1.1"));
    }
    if o.version == 2
        && (o.refcount_order != 4
            || o.lazy_refcounts
            || o.compression_type != CompressionType::Zlib)
    {
        return Err(Error::BadCreateOption(
            "compat=0.10 supports only refcount_bits=16, no lazy refcounts and zlib",
        ));
    }
    if !o.size.is_multiple_of(512) {
        return Err(Error::UnalignedSize(o.size));
    }
    if o.backing_format.is_some() && o.backing_file.is_none() {
        return Err(Error::BadCreateOption(
            "backing format given without a backing file",
        ));
    }
    let cs = 1u64 << o.cluster_bits;
    let mut h = blank_header(o);
    if o.version >= 3 {
        // QEMU adds a feature name table; keep it when it fits.
        let mut with_table = h.clone();
        with_table.extensions.push(feature_table());
        if with_table.encode().is_ok() {
            h = with_table;
        }
    }
    let hdr = h.encode()?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut buf = vec![0u8; (3 * cs) as usize];
    buf[..hdr.len()].copy_from_slice(&hdr);
    // Refcount table: one block at cluster 2.
    buf[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    // The block: clusters 0, 1 and 2 are in use.
    let block = &mut buf[2 * cs as usize..];
    for i in 0..3 {
        set_entry(block, o.refcount_order, i, 1);
    }
    file.write_all_at(&buf, 0)?;
    file.sync_all()?;
    drop(file);
    if o.size > 0 {
        let opts = OpenOptions {
            no_backing: true,
            ..Default::default()
        };
        let mut img = Qcow2Image::open(path, &opts).map_err(|e| match e {
            crate::block::Error::Qcow2(q) => *q,
            _ => Error::Internal("reopening the new image failed"),
        })?;
        img.resize(o.size)?;
        img.flush_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::DiskImage;

    #[test]
    fn every_cluster_size_and_refcount_width() {
        let dir = std::env::temp_dir().join(format!("qcow2-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for cb in [9, 12, 16, 21] {
            for order in [0, 4, 6] {
                let path = dir.join(format!("c{cb}-{order}.qcow2"));
                let o = CreateOptions {
                    cluster_bits: cb,
                    refcount_order: order,
                    ..CreateOptions::new(10 << 20)
                };
                create(&path, &o).unwrap();
                let mut img = Qcow2Image::open(&path, &OpenOptions::default()).unwrap();
                assert_eq!(img.size(), 10 << 20);
                assert_eq!(img.header().refcount_order, order);
                img.write_at(&[1u8; 3000], 5 << 20).unwrap();
                let r = super::super::check::check(
                    &mut img,
                    super::super::check::Repair::None,
                    &mut |_, _| {},
                )
                .unwrap();
                assert_eq!(
                    (r.corruptions, r.leaks),
                    (0, 0),
                    "cb {cb} order {order}: {r:?}"
                );
            }
        }
        let bad = CreateOptions {
            version: 2,
            refcount_order: 6,
            ..CreateOptions::new(1 << 20)
        };
        assert!(create(&dir.join("bad"), &bad).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
