//! Consistency check and repair, as `qemu-img check` does it: count every reference to every
//! host cluster (header, L1 tables of the active disk and each snapshot, L2 tables, data and
//! compressed clusters, the snapshot table, the refcount table and blocks), compare with the
//! stored refcounts, and verify the COPIED flags of the active tables.

use super::{Error, Mapping, Qcow2Image, Result, L1E_OFFSET_MASK, OFLAG_COPIED};

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    None,
    /// Fix refcounts that are too high.
    Leaks,
    /// Fix everything we can.
    All,
}

/// Result of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that can lose data.
    pub corruptions: u64,
    /// Clusters with a refcount higher than their references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters allocated in the active disk.
    pub allocated_clusters: u64,
    /// Guest clusters of the disk.
    pub total_clusters: u64,
    /// Allocated clusters that are compressed.
    pub compressed_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// End of the last used host cluster.
    pub image_end_offset: u64,
    /// One line per problem (capped).
    pub messages: Vec<String>,
}

const MAX_MESSAGES: usize = 1000;

struct Counter {
    refs: Vec<u32>,
    cb: u32,
    report: CheckReport,
}

impl Counter {
    fn note(&mut self, msg: String) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(msg);
        }
    }

    fn inc(&mut self, what: &str, off: u64, bytes: u64) {
        let first = off >> self.cb;
        // A hostile entry can name a range that wraps around the address space.
        let Some(end) = off.checked_add(bytes.max(1) - 1) else {
            self.report.corruptions += 1;
            self.note(format!(
                "ERROR {what} at {off:#x} (+{bytes:#x} bytes) lies past the end of the image"
            ));
            return;
        };
        let last = end >> self.cb;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    self.report.corruptions += 1;
                    self.note(format!(
                        "ERROR {what} at {off:#x} lies past the end of the image"
                    ));
                    return;
                }
            }
        }
    }
}

/// Walks an L1 table, counting references; records active-table entries for the flag check.
fn walk_l1(
    img: &mut Qcow2Image,
    cnt: &mut Counter,
    l1: &[u64],
    active: bool,
    flags: &mut Vec<(Option<usize>, u64, u64)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let cs = img.cs;
    let mut last_host = 0u64;
    for (i, &l1e) in l1.iter().enumerate() {
        if active {
            progress(i as u64, l1.len() as u64);
        }
        let l2 = l1e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) {
            cnt.report.corruptions += 1;
            cnt.note(format!(
                "ERROR L2 table offset {l2:#x} is not cluster aligned"
            ));
            continue;
        }
        cnt.inc("L2 table", l2, cs);
        if active {
            flags.push((Some(i), l2, l1e));
        }
        let table = match img.read_l2_table(l2) {
            Ok(t) => t,
            Err(e) => {
                cnt.report.corruptions += 1;
                cnt.note(format!("ERROR cannot read L2 table at {l2:#x}: {e}"));
                continue;
            }
        };
        for (j, &e) in table.iter().enumerate() {
            let m = img.decode_entry(e);
            match m {
                Mapping::Normal { host, .. } | Mapping::Zero { host } if host != 0 => {
                    if !host.is_multiple_of(cs) {
                        cnt.report.corruptions += 1;
                        cnt.note(format!(
                            "ERROR data cluster offset {host:#x} is not cluster aligned"
                        ));
                        continue;
                    }
                    cnt.inc("data cluster", host, cs);
                    if active {
                        flags.push((None, l2 + j as u64 * 8, e));
                        if matches!(m, Mapping::Normal { .. }) {
                            cnt.report.allocated_clusters += 1;
                            if last_host != 0 && host != last_host + cs {
                                cnt.report.fragmented_clusters += 1;
                            }
                            last_host = host;
                        }
                    }
                }
                Mapping::Compressed { offset, len } => {
                    if e & OFLAG_COPIED != 0 && active {
                        cnt.report.corruptions += 1;
                        cnt.note(format!(
                            "ERROR compressed cluster entry {e:#x} has the COPIED flag"
                        ));
                    }
                    cnt.inc("compressed cluster", offset, len);
                    if active {
                        cnt.report.allocated_clusters += 1;
                        cnt.report.compressed_clusters += 1;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Checks (and optionally repairs) the image. `progress(done, total)` is called as it goes.
pub fn check(
    img: &mut Qcow2Image,
    repair: Repair,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport> {
    if repair != Repair::None && img.read_only {
        return Err(Error::ReadOnly);
    }
    if !img.read_only {
        img.flush_all()?;
    }
    let first = run(img, progress)?;
    if repair == Repair::None || (first.report.leaks == 0 && first.report.corruptions == 0) {
        return Ok(first.report);
    }
    fix(img, &first, repair)?;
    img.flush_all()?;
    let mut after = run(img, &mut |_, _| {})?.report;
    after.leaks_fixed = first.report.leaks.saturating_sub(after.leaks);
    after.corruptions_fixed = first.report.corruptions.saturating_sub(after.corruptions);
    Ok(after)
}

struct Scan {
    report: CheckReport,
    refs: Vec<u32>,
    /// (cluster, stored refcount, references) where they differ.
    diffs: Vec<(u64, u64, u64)>,
}

fn run(img: &mut Qcow2Image, progress: &mut dyn FnMut(u64, u64)) -> Result<Scan> {
    let cs = img.cs;
    let cb = img.header.cluster_bits;
    let nb = img.file_end().div_ceil(cs);
    let mut cnt = Counter {
        refs: vec![0; nb as usize],
        cb,
        report: CheckReport::default(),
    };
    cnt.report.total_clusters = img.header.size.div_ceil(cs);
    cnt.inc("header", 0, cs);
    let l1 = img.l1.clone();
    cnt.inc("L1 table", img.header.l1_table_offset, l1.len() as u64 * 8);
    let mut flags = Vec::new();
    walk_l1(img, &mut cnt, &l1, true, &mut flags, progress)?;
    let snaps = img.snapshots.clone();
    if !snaps.is_empty() {
        cnt.inc(
            "snapshot table",
            img.header.snapshots_offset,
            super::snapshot::table_bytes(&snaps),
        );
    }
    for s in &snaps {
        let mut b = vec![0u8; s.l1_size as usize * 8];
        super::read_meta(&img.file, &mut b, s.l1_offset)?;
        cnt.inc("snapshot L1 table", s.l1_offset, b.len() as u64);
        walk_l1(
            img,
            &mut cnt,
            &super::decode_table(&b),
            false,
            &mut Vec::new(),
            &mut |_, _| {},
        )?;
    }
    cnt.inc(
        "refcount table",
        img.header.refcount_table_offset,
        u64::from(img.header.refcount_table_clusters) * cs,
    );
    let table = img.rc.table.clone();
    for (t, &e) in table.iter().enumerate() {
        let off = e & super::refcount::REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) || off >= img.file_end() {
            cnt.report.corruptions += 1;
            cnt.note(format!("ERROR refcount block {t} at {off:#x} is invalid"));
            continue;
        }
        cnt.inc("refcount block", off, cs);
    }
    // Compare stored refcounts with the references found.
    let shift = img.rc.block_shift();
    let mut diffs = Vec::new();
    let fe = img.file_end();
    let mut covered_end = 0u64;
    for (t, &e) in table.iter().enumerate() {
        if e & super::refcount::REFT_OFFSET_MASK == 0 {
            continue;
        }
        let start = (t as u64) << shift;
        covered_end = covered_end.max(start + (1 << shift));
        for c in start..start + (1 << shift) {
            let stored = match img.rc.get(&img.file, c, fe) {
                Ok(v) => v,
                Err(_) => break, // block already reported as invalid
            };
            let refs = u64::from(cnt.refs.get(c as usize).copied().unwrap_or(0));
            if stored != refs {
                diffs.push((c, stored, refs));
            }
        }
    }
    for c in 0..nb {
        let in_block = img.rc.block_offset(c >> shift).is_some();
        if !in_block && cnt.refs[c as usize] > 0 {
            diffs.push((c, 0, u64::from(cnt.refs[c as usize])));
        }
    }
    for &(c, stored, refs) in &diffs {
        if stored < refs {
            cnt.report.corruptions += 1;
            cnt.note(format!(
                "ERROR cluster {c} refcount={stored} reference={refs}"
            ));
        } else {
            cnt.report.leaks += 1;
            cnt.note(format!(
                "Leaked cluster {c} refcount={stored} reference={refs}"
            ));
        }
    }
    // COPIED flags of the active tables.
    for (l1i, at, e) in flags {
        let host = match l1i {
            Some(_) => e & L1E_OFFSET_MASK,
            None => e & super::L2E_OFFSET_MASK,
        };
        let stored = img.rc.get(&img.file, host >> cb, fe).unwrap_or(0);
        if (stored == 1) != (e & OFLAG_COPIED != 0) {
            cnt.report.corruptions += 1;
            let what = if l1i.is_some() {
                "L2 table"
            } else {
                "data cluster"
            };
            cnt.note(format!(
                "ERROR OFLAG_COPIED {what}: entry at {at:#x}={e:#x} refcount={stored}"
            ));
        }
    }
    let last_used = cnt
        .refs
        .iter()
        .rposition(|&r| r > 0)
        .map_or(0, |i| i as u64 + 1);
    cnt.report.image_end_offset = last_used * cs;
    let _ = covered_end;
    Ok(Scan {
        report: cnt.report,
        refs: cnt.refs,
        diffs,
    })
}

fn fix(img: &mut Qcow2Image, scan: &Scan, repair: Repair) -> Result<()> {
    let fe = img.file_end();
    // Clusters in use must never host a new refcount block.
    let saved = img.metadata.clone();
    for (c, &r) in scan.refs.iter().enumerate() {
        if r > 0 {
            img.metadata.insert(c as u64);
        }
    }
    img.rc.free_hint = scan.refs.len() as u64;
    let mut result = Ok(());
    for &(c, stored, refs) in &scan.diffs {
        if stored > refs {
            result = img.rc.set(&img.file, c, refs, fe);
        } else if repair == Repair::All {
            result = if img.rc.block_offset(c >> img.rc.block_shift()).is_some() {
                img.rc.set(&img.file, c, refs, fe)
            } else {
                img.change_refcount(c, refs as i64)
            };
        }
        if result.is_err() {
            break;
        }
    }
    img.metadata = saved;
    result?;
    img.rc.free_hint = 0;
    img.refcount_barrier()?;
    if repair == Repair::All {
        img.flush_all()?;
        img.l2.clear();
        img.fix_copied_flags()?;
    }
    img.rebuild_metadata_set();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer: an entry whose range wraps past u64::MAX is a corruption, not a
    /// panic.
    #[test]
    fn wrapping_range_is_reported_not_panicking() {
        let mut c = Counter {
            refs: vec![0; 16],
            cb: 16,
            report: CheckReport::default(),
        };
        c.inc("L2 table", u64::MAX - 10, 1 << 16);
        assert_eq!(c.report.corruptions, 1);
        assert!(c.report.messages[0].contains("past the end"));
    }
    use crate::block::qcow2::create::{create, CreateOptions};
    use crate::block::{DiskImage, OpenOptions};

    #[test]
    fn finds_and_repairs_leaks_and_bad_refcounts() {
        let dir = std::env::temp_dir().join(format!("qcow2-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.qcow2");
        create(&path, &CreateOptions::new(16 << 20)).unwrap();
        let mut img = Qcow2Image::open(&path, &OpenOptions::default()).unwrap();
        img.write_at(&[7u8; 70000], 12345).unwrap();
        img.alloc_clusters(3).unwrap(); // leaked
        let r = check(&mut img, Repair::None, &mut |_, _| {}).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 3));
        let r = check(&mut img, Repair::Leaks, &mut |_, _| {}).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.leaks_fixed), (0, 0, 3));
        // Drop a data cluster's refcount to 0: a corruption that only "all" repairs.
        let host = match img.mapping(12345).unwrap() {
            Mapping::Normal { host, .. } => host,
            m => panic!("{m:?}"),
        };
        img.change_refcount(host >> img.header.cluster_bits, -1)
            .unwrap();
        let r = check(&mut img, Repair::None, &mut |_, _| {}).unwrap();
        assert!(r.corruptions >= 1, "{r:?}");
        let r = check(&mut img, Repair::All, &mut |_, _| {}).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
