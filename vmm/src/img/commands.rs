//! The img verbs themselves: output texts and exit codes follow qemu-img's.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use devices::block::qcow2::check::{self, CheckReport, Repair};
use devices::block::qcow2::{self, CreateOptions, Qcow2Image};
use devices::block::{self, DiskImage, ImageFormat, OpenOptions};
use serde_json::json;

use super::{apply_options, parse_size, Fmt, ImgCommand, ImgError, OutputFormat, RepairMode};

/// Prints "(NN.NN/100%)" progress on a terminal, like `qemu-img -p`.
struct Progress {
    on: bool,
    last: f64,
}

impl Progress {
    fn new(flag: bool, quiet: bool) -> Self {
        Progress {
            on: !quiet && (flag || std::io::stdout().is_terminal()),
            last: -1.0,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.on {
            return;
        }
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        if pct - self.last >= 1.0 || (pct >= 100.0 && self.last < 100.0) {
            self.last = pct;
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }

    fn finish(&mut self) {
        if self.on {
            self.update(1, 1);
            println!();
        }
    }
}

fn probe(path: &Path, fmt: Option<Fmt>) -> Result<ImageFormat, ImgError> {
    Ok(match fmt {
        Some(f) => f.into(),
        None => ImageFormat::probe(path)?,
    })
}

fn open_qcow2(path: &Path, read_only: bool) -> Result<Qcow2Image, ImgError> {
    let o = OpenOptions {
        read_only,
        ..Default::default()
    };
    Ok(Qcow2Image::open(path, &o)?)
}

/// Human size like qemu-img ("64 MiB", "1.5 GiB").
fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", units[u])
    } else {
        let t = format!("{v:.3}");
        format!(
            "{} {}",
            t.trim_end_matches('0').trim_end_matches('.'),
            units[u]
        )
    }
}

pub(super) fn run(cmd: ImgCommand) -> Result<u8, ImgError> {
    match cmd {
        ImgCommand::Create {
            fmt,
            backing,
            backing_fmt,
            options,
            quiet,
            file,
            size,
        } => create(
            fmt,
            backing,
            backing_fmt,
            &options,
            quiet,
            &file,
            size.as_deref(),
        ),
        ImgCommand::Info {
            fmt, output, file, ..
        } => info(&file, fmt, output),
        ImgCommand::Check {
            fmt,
            repair,
            output,
            quiet,
            file,
            ..
        } => check_cmd(&file, fmt, repair, output, quiet),
        ImgCommand::Convert {
            compress,
            fmt,
            out_fmt,
            options,
            progress,
            quiet,
            src,
            dst,
            ..
        } => convert(
            &src,
            fmt,
            &dst,
            out_fmt,
            compress,
            &options,
            Progress::new(progress, quiet),
        ),
        ImgCommand::Snapshot {
            list,
            create,
            apply,
            delete,
            file,
            ..
        } => {
            if list || (create.is_none() && apply.is_none() && delete.is_none()) {
                let img = open_qcow2(&file, true)?;
                print!("{}", snapshot_table(&img));
                return Ok(0);
            }
            let mut img = open_qcow2(&file, false)?;
            if let Some(n) = create {
                img.create_snapshot(&n)?;
            } else if let Some(n) = apply {
                img.apply_snapshot(&n)?;
            } else if let Some(n) = delete {
                img.delete_snapshot(&n)?;
            }
            img.flush()?;
            Ok(0)
        }
        ImgCommand::Resize {
            fmt,
            shrink,
            quiet,
            file,
            size,
        } => resize(&file, fmt, shrink, quiet, &size),
    }
}

fn create(
    fmt: Fmt,
    backing: Option<String>,
    backing_fmt: Option<Fmt>,
    options: &[String],
    quiet: bool,
    file: &Path,
    size: Option<&str>,
) -> Result<u8, ImgError> {
    let mut o = CreateOptions::new(0);
    if let Some(s) = size {
        o.size = parse_size(s)?;
    }
    apply_options(&mut o, options)?;
    if backing.is_some() {
        o.backing_file = backing;
    }
    if let Some(f) = backing_fmt {
        o.backing_format = Some(ImageFormat::from(f).name().to_string());
    }
    match fmt {
        Fmt::Raw => {
            if o.backing_file.is_some() {
                return Err(ImgError::Usage("raw images cannot have a backing file"));
            }
            let f = std::fs::File::create(file)?;
            f.set_len(o.size)?;
        }
        Fmt::Qcow2 => {
            if let Some(b) = o.backing_file.clone() {
                let bpath = qcow2_backing_path(file, &b);
                let bfmt = match &o.backing_format {
                    Some(f) => f.parse()?,
                    None => ImageFormat::probe(&bpath)?,
                };
                o.backing_format = Some(bfmt.name().to_string());
                if size.is_none() && !options.iter().any(|s| s.contains("size=")) {
                    let ro = OpenOptions {
                        read_only: true,
                        ..Default::default()
                    };
                    o.size = block::open(&bpath, Some(bfmt), &ro)?.size();
                }
            } else if size.is_none() && !options.iter().any(|s| s.contains("size=")) {
                return Err(ImgError::Usage("Image creation needs a size parameter"));
            }
            qcow2::create(file, &o)?;
        }
    }
    if !quiet {
        println!(
            "Formatting '{}', fmt={} size={}",
            file.display(),
            ImageFormat::from(fmt).name(),
            o.size
        );
    }
    Ok(0)
}

fn qcow2_backing_path(image: &Path, name: &str) -> std::path::PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn snapshot_table(img: &Qcow2Image) -> String {
    let snaps = img.snapshots();
    if snaps.is_empty() {
        return String::new();
    }
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    ));
    for sn in snaps {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        s.push_str(&format!(
            "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
            sn.id,
            sn.name,
            human(sn.vm_state_size),
            format_date(u64::from(sn.date_sec)),
            clock,
            ""
        ));
    }
    s
}

/// UTC "YYYY-MM-DD HH:MM:SS" without a date crate.
fn format_date(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = crate::logger::utc_civil(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

fn info(file: &Path, fmt: Option<Fmt>, output: OutputFormat) -> Result<u8, ImgError> {
    let f = probe(file, fmt)?;
    let meta = std::fs::metadata(file)?;
    let actual = meta.blocks() * 512;
    let name = file.display().to_string();
    let mut j =
        json!({"filename": name, "format": f.name(), "actual-size": actual, "dirty-flag": false});
    let mut text = format!("image: {name}\nfile format: {}\n", f.name());
    let size;
    match f {
        ImageFormat::Raw => {
            size = meta.len();
        }
        ImageFormat::Qcow2 => {
            let o = OpenOptions {
                read_only: true,
                no_backing: true,
                ..Default::default()
            };
            let img = Qcow2Image::open(file, &o)?;
            let h = img.header().clone();
            size = h.size;
            let compat = if h.version >= 3 { "1.1" } else { "0.10" };
            j["cluster-size"] = json!(h.cluster_size());
            j["dirty-flag"] = json!(h.incompatible_features & 1 != 0);
            let mut data = json!({
                "compat": compat,
                "compression-type": h.compression_type.name(),
                "lazy-refcounts": h.compatible_features & 1 != 0,
                "refcount-bits": 1u32 << h.refcount_order,
                "corrupt": h.incompatible_features & 2 != 0,
                "extended-l2": false,
            });
            if h.version < 3 {
                data = json!({"compat": compat, "compression-type": h.compression_type.name(), "extended-l2": false});
            }
            j["format-specific"] = json!({"type": "qcow2", "data": data.clone()});
            if let Some(b) = &h.backing_file {
                j["backing-filename"] = json!(b);
                j["full-backing-filename"] =
                    json!(qcow2_backing_path(file, b).display().to_string());
                if let Some(bf) = h.backing_format() {
                    j["backing-filename-format"] = json!(bf);
                }
            }
            if !img.snapshots().is_empty() {
                j["snapshots"] = json!(img
                    .snapshots()
                    .iter()
                    .map(
                        |s| json!({"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                        "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000})
                    )
                    .collect::<Vec<_>>());
            }
            text.push_str(&format!(
                "virtual size: {} ({size} bytes)\ndisk size: {}\ncluster_size: {}\n",
                human(size),
                human(actual),
                h.cluster_size()
            ));
            if let Some(b) = &h.backing_file {
                text.push_str(&format!("backing file: {b}\n"));
                if let Some(bf) = h.backing_format() {
                    text.push_str(&format!("backing file format: {bf}\n"));
                }
            }
            text.push_str(&snapshot_table(&img));
            text.push_str("Format specific information:\n");
            for (k, v) in data.as_object().into_iter().flatten() {
                text.push_str(&format!(
                    "    {}: {}\n",
                    k.replace('-', " "),
                    v.as_str().map(str::to_string).unwrap_or(v.to_string())
                ));
            }
        }
    }
    j["virtual-size"] = json!(size);
    if f == ImageFormat::Raw {
        text.push_str(&format!(
            "virtual size: {} ({size} bytes)\ndisk size: {}\n",
            human(size),
            human(actual)
        ));
    }
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default()),
        OutputFormat::Human => print!("{text}"),
    }
    Ok(0)
}

fn check_cmd(
    file: &Path,
    fmt: Option<Fmt>,
    repair: Option<RepairMode>,
    output: OutputFormat,
    quiet: bool,
) -> Result<u8, ImgError> {
    if probe(file, fmt)? != ImageFormat::Qcow2 {
        eprintln!("vmm img: This image format does not support checks");
        return Ok(63);
    }
    let mode = match repair {
        None => Repair::None,
        Some(RepairMode::Leaks) => Repair::Leaks,
        Some(RepairMode::All) => Repair::All,
    };
    let o = OpenOptions {
        read_only: mode == Repair::None,
        no_backing: true,
        ..Default::default()
    };
    let mut img = match Qcow2Image::open(file, &o) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("vmm img: Could not open '{}': {e}", file.display());
            return Ok(1);
        }
    };
    let mut progress = Progress::new(false, quiet || output == OutputFormat::Json);
    let r = match check::check(&mut img, mode, &mut |d, t| progress.update(d, t)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm img: Check failed: {e}");
            return Ok(1);
        }
    };
    if progress.on {
        progress.finish();
    }
    drop(img);
    match output {
        OutputFormat::Json => println!("{}", check_json(file, &r)),
        OutputFormat::Human if !quiet => print!("{}", check_text(&r)),
        OutputFormat::Human => {}
    }
    Ok(if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}

fn check_json(file: &Path, r: &CheckReport) -> String {
    let j = json!({
        "image-end-offset": r.image_end_offset,
        "total-clusters": r.total_clusters,
        "check-errors": 0,
        "leaks": r.leaks,
        "corruptions": r.corruptions,
        "leaks-fixed": r.leaks_fixed,
        "corruptions-fixed": r.corruptions_fixed,
        "allocated-clusters": r.allocated_clusters,
        "filename": file.display().to_string(),
        "format": "qcow2",
        "fragmented-clusters": r.fragmented_clusters,
        "compressed-clusters": r.compressed_clusters,
    });
    serde_json::to_string_pretty(&j).unwrap_or_default()
}

fn check_text(r: &CheckReport) -> String {
    let mut s = String::new();
    for m in &r.messages {
        s.push_str(m);
        s.push('\n');
    }
    if r.leaks_fixed + r.corruptions_fixed > 0 {
        s.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    if r.corruptions == 0 && r.leaks == 0 {
        s.push_str("No errors were found on the image.\n");
    }
    if r.corruptions > 0 {
        s.push_str(&format!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", r.corruptions));
    }
    if r.leaks > 0 {
        s.push_str(&format!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", r.leaks));
    }
    let pct = |n: u64| {
        if r.total_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.total_clusters as f64
        }
    };
    let of_alloc = |n: u64| {
        if r.allocated_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.allocated_clusters as f64
        }
    };
    s.push_str(&format!(
        "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\nImage end offset: {}\n",
        r.allocated_clusters,
        r.total_clusters,
        pct(r.allocated_clusters),
        of_alloc(r.fragmented_clusters),
        of_alloc(r.compressed_clusters),
        r.image_end_offset
    ));
    s
}

/// Where convert writes.
enum Sink {
    Plain(Box<dyn DiskImage>),
    Compressed(Box<Qcow2Image>),
}

fn convert(
    src: &Path,
    fmt: Option<Fmt>,
    dst: &Path,
    out_fmt: Fmt,
    compress: bool,
    options: &[String],
    mut progress: Progress,
) -> Result<u8, ImgError> {
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut input = block::open(src, Some(probe(src, fmt)?), &ro)?;
    let size = input.size();
    if compress && out_fmt != Fmt::Qcow2 {
        return Err(ImgError::Usage(
            "Compression not supported for this file format",
        ));
    }
    let chunk: u64 = match out_fmt {
        Fmt::Raw => {
            let f = std::fs::File::create(dst)?;
            f.set_len(size)?;
            1 << 20
        }
        Fmt::Qcow2 => {
            let mut o = CreateOptions::new(size);
            apply_options(&mut o, options)?;
            o.size = size.next_multiple_of(512);
            qcow2::create(dst, &o)?;
            (1u64 << o.cluster_bits).max(1 << 20)
        }
    };
    let rw = OpenOptions::default();
    let mut sink = match (out_fmt, compress) {
        (Fmt::Raw, _) => Sink::Plain(Box::new(block::raw::RawImage::open(dst, false)?)),
        (Fmt::Qcow2, false) => Sink::Plain(Box::new(Qcow2Image::open(dst, &rw)?)),
        (Fmt::Qcow2, true) => Sink::Compressed(Box::new(Qcow2Image::open(dst, &rw)?)),
    };
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos) as usize;
        input.read_at(&mut buf[..n], pos)?;
        match &mut sink {
            Sink::Compressed(q) => {
                let cs = q.header().cluster_size() as usize;
                for (i, c) in buf[..n].chunks(cs).enumerate() {
                    if c.iter().any(|&b| b != 0) {
                        q.write_compressed(c, pos + (i * cs) as u64)?;
                    }
                }
            }
            // The new image reads as zeros already: skip zero chunks (sparse output).
            Sink::Plain(out) if buf[..n].iter().any(|&b| b != 0) => out.write_at(&buf[..n], pos)?,
            Sink::Plain(_) => {}
        }
        pos += n as u64;
        progress.update(pos, size);
    }
    match &mut sink {
        Sink::Compressed(q) => q.flush()?,
        Sink::Plain(out) => out.flush()?,
    }
    progress.finish();
    Ok(0)
}

fn resize(
    file: &Path,
    fmt: Option<Fmt>,
    shrink: bool,
    quiet: bool,
    size: &str,
) -> Result<u8, ImgError> {
    let f = probe(file, fmt)?;
    let current = match f {
        ImageFormat::Raw => std::fs::metadata(file)?.len(),
        ImageFormat::Qcow2 => open_qcow2(file, true)?.size(),
    };
    let new = if let Some(d) = size.strip_prefix('+') {
        current
            .checked_add(parse_size(d)?)
            .ok_or_else(|| ImgError::BadSize(size.into()))?
    } else if let Some(d) = size.strip_prefix('-') {
        current
            .checked_sub(parse_size(d)?)
            .ok_or_else(|| ImgError::BadSize(size.into()))?
    } else {
        parse_size(size)?
    };
    if new < current && !shrink {
        return Err(ImgError::Usage(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    match f {
        ImageFormat::Raw => std::fs::OpenOptions::new()
            .write(true)
            .open(file)?
            .set_len(new)?,
        ImageFormat::Qcow2 => {
            let mut img = open_qcow2(file, false)?;
            img.resize(new)?;
            img.flush()?;
        }
    }
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_and_dates() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_700_000_000), "2023-11-14 22:13:20");
    }
}
