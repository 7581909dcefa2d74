//! Backing files: resolving the name against the image's directory, enforcing the
//! [`BackingPolicy`](crate::block::BackingPolicy), detecting loops and depth, and opening the
//! backing image (qcow2 or raw, as `backing_fmt` says or as probed) read-only.

use std::path::{Component, Path, PathBuf};

use super::{Error, Qcow2Image, Result};
use crate::block::{raw::RawImage, DiskImage, ImageFormat, OpenOptions};

/// Resolves a backing file name relative to the directory of `image`.
pub fn resolve(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(p)
    }
}

/// Opens the backing file of `img`, if it has one. `chain` holds the canonical paths of the
/// images above it (the top image included).
pub(crate) fn open_backing(
    img: &Qcow2Image,
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Option<Box<dyn DiskImage>>> {
    let Some(name) = img.header.backing_file.clone() else {
        return Ok(None);
    };
    let policy = &opts.backing;
    let refuse = |why| Error::BackingRefused {
        name: name.clone(),
        why,
    };
    if name.is_empty() {
        return Err(refuse("empty name"));
    }
    if !policy.allow_absolute && Path::new(&name).is_absolute() {
        return Err(refuse("absolute paths are not allowed"));
    }
    if !policy.allow_parent_dirs
        && Path::new(&name)
            .components()
            .any(|c| c == Component::ParentDir)
    {
        return Err(refuse("'..' is not allowed"));
    }
    if chain.is_empty() {
        chain.push(std::fs::canonicalize(&img.path)?);
    }
    if chain.len() > policy.max_depth as usize {
        return Err(Error::BackingTooDeep(policy.max_depth));
    }
    let path = resolve(&img.path, &name);
    let canon = std::fs::canonicalize(&path)
        .map_err(|e| Error::Backing(path.clone(), Box::new(crate::block::Error::Io(e))))?;
    if chain.contains(&canon) {
        return Err(Error::BackingLoop(canon));
    }
    let meta = std::fs::metadata(&canon)?;
    if !meta.is_file() {
        if !policy.allow_devices {
            return Err(refuse("not a regular file (device nodes are not allowed)"));
        }
        if meta.is_dir() {
            return Err(refuse("is a directory"));
        }
    }
    let fmt = match img.header.backing_format() {
        Some(f) => f
            .parse::<ImageFormat>()
            .map_err(|_| Error::BadBackingFormat(f))?,
        None => {
            ImageFormat::probe(&canon).map_err(|e| Error::Backing(canon.clone(), Box::new(e)))?
        }
    };
    let mut bopts = opts.clone();
    bopts.read_only = true;
    chain.push(canon.clone());
    let wrap = |e: Error| match e {
        // Keep loop/depth errors at the top so the message names the real problem.
        Error::BackingLoop(_) | Error::BackingTooDeep(_) | Error::BackingRefused { .. } => e,
        other => Error::Backing(canon.clone(), Box::new(other.into())),
    };
    let disk: Box<dyn DiskImage> = match fmt {
        ImageFormat::Qcow2 => {
            Box::new(Qcow2Image::open_chain(&canon, &bopts, chain).map_err(wrap)?)
        }
        ImageFormat::Raw => Box::new(
            RawImage::open(&canon, true).map_err(|e| Error::Backing(canon.clone(), Box::new(e)))?,
        ),
    };
    Ok(Some(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_next_to_the_image() {
        assert_eq!(
            resolve(Path::new("/a/b/top.qcow2"), "base.raw"),
            PathBuf::from("/a/b/base.raw")
        );
        assert_eq!(
            resolve(Path::new("/a/b/top.qcow2"), "/x/y"),
            PathBuf::from("/x/y")
        );
        assert_eq!(resolve(Path::new("top.qcow2"), "b"), PathBuf::from("b"));
    }
}
