//! The meter's parsing, rates and guest-figure handling, and reading a thread's CPU time.

use super::*;

#[test]
fn base64_decodes_what_qemu_ga_sends() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(
        base64_decode("TWVtVG90YWw6ICA0MDk2IGtC\n"),
        b"MemTotal:  4096 kB"
    );
    assert_eq!(base64_decode(""), b"");
}

#[test]
fn guest_files_are_parsed() {
    let mi = "MemTotal:         243216 kB\nMemFree:  1 kB\nMemAvailable:     200000 kB\n";
    assert_eq!(parse_meminfo(mi), Ok((243216, 200000)));
    assert!(parse_meminfo("MemTotal: 5 kB\n").is_err());
    assert_eq!(parse_loadavg("0.10 0.25 0.30 1/80 123\n"), Ok(0.25));
    assert!(parse_loadavg("garbage").is_err());
    let fs = json!([
        {"name": "vdb", "mountpoint": "/mnt", "type": "ext4",
         "used-bytes": 1048576u64, "total-bytes": 4194304u64, "disk": []},
        {"name": "vdc", "mountpoint": "/x", "type": "ext4", "disk": []}
    ]);
    let p = parse_fsinfo(&fs).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].used_mb, p[0].total_mb, p[0].usage_percent),
        (1.0, 4.0, 25.0)
    );
    assert!(parse_fsinfo(&json!({})).is_err());
}

#[test]
fn guest_figures_fill_or_say_why_not() {
    let mut m = VmMetrics::default();
    fill_guest(
        &mut m,
        Ok(GuestFigures {
            mem: Ok((1024 * 100, 1024 * 40)),
            load5: Err("no loadavg".into()),
            filesystems: Ok(vec![]),
        }),
    );
    assert_eq!((m.mem_usage, m.mem_usage_rate), (Some(60.0), Some(60.0)));
    assert_eq!(m.loadavg_5, None);
    assert_eq!(m.unavailable["loadavg_5"], "no loadavg");
    assert_eq!(m.disk_usage, Some(0.0));
    let mut m = VmMetrics::default();
    fill_guest(&mut m, Err("not connected".into()));
    assert!(GUEST_FIGURES
        .iter()
        .all(|f| m.unavailable[*f] == "not connected"));
}

#[test]
fn rates_come_from_two_samples() {
    let prev = [(10, Some(1_000_000_000u64)), (11, Some(0))];
    let cur = [(10, Some(1_500_000_000u64)), (12, Some(5))];
    // vCPU 1 changed threads (a reset): only vCPU 0 counts, 0.5 s of 1 s.
    assert_eq!(cpu_usage(&prev, &cur, 1.0), Some(50.0));
    assert_eq!(cpu_usage(&[(10, None)], &[(10, Some(1))], 1.0), None);
    let p = BlockStatsSnapshot {
        wr_operations: 10,
        wr_bytes: 1 << 20,
        wr_total_time_ns: 10_000_000,
        ..Default::default()
    };
    let c = BlockStatsSnapshot {
        wr_operations: 30,
        wr_bytes: 3 << 20,
        wr_total_time_ns: 50_000_000,
        ..Default::default()
    };
    let r = disk_rates("d", &c, Some(&p), 2.0);
    assert_eq!((r.write_requests, r.write_rate), (10.0, 1024.0));
    assert_eq!((r.write_delay, r.read_delay), (Some(2.0), None));
}

#[test]
fn this_threads_cpu_time_is_readable() {
    // SAFETY: gettid has no memory effects.
    let tid = unsafe { libc::gettid() };
    assert!(thread_cpu_ns(tid).is_some());
    assert_eq!(thread_cpu_ns(0), None);
}
