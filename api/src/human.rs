//! QEMU's human-readable numbers and dates, for the texts printed as QEMU prints them (HMP's
//! `info migrate` and `info snapshots`, `vmm ctl snapshots`): `size_to_str` (util/cutils.c) and
//! the `%Y-%m-%d %H:%M:%S` dates of `bdrv_snapshot_dump` (block/qapi.c).

/// QEMU's `size_to_str`: IEC units, switching up once the number reaches 1000, printed `%0.3g`.
pub(crate) fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: x = m * 2^e with m in [0.5, 1).
    let e = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g`: three significant digits, trailing zeros dropped, exponent form outside
/// 1e-4..1e3.
pub(crate) fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if (-4..3).contains(&exp) {
        trim(&format!("{v:.*}", (2 - exp) as usize))
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    }
}

/// The power of 1024 a size suffix stands for (B, K, M, G, T, P, E, either case).
pub fn suffix_shift(c: Option<char>) -> Option<u32> {
    Some(match c?.to_ascii_uppercase() {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        'P' => 50,
        'E' => 60,
        _ => return None,
    })
}

/// Which clock a date is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zone {
    /// The host's local time (what QEMU prints).
    Local,
    /// UTC (tests: the same text on every host).
    #[cfg_attr(not(test), allow(dead_code))]
    Utc,
}

/// The broken-down time of `secs` (seconds since the epoch): year, month, day, hour, minute,
/// second; `None` if the C library cannot represent it.
pub(crate) fn civil(secs: i64, zone: Zone) -> Option<(i64, u32, u32, u32, u32, u32)> {
    let t = libc::time_t::try_from(secs).ok()?;
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call; the `_r` variants write
    // only into `tm` (no shared static buffer).
    let ok = unsafe {
        match zone {
            Zone::Local => !libc::localtime_r(&t, &mut tm).is_null(),
            Zone::Utc => !libc::gmtime_r(&t, &mut tm).is_null(),
        }
    };
    ok.then(|| {
        (
            i64::from(tm.tm_year) + 1900,
            (tm.tm_mon + 1) as u32,
            tm.tm_mday as u32,
            tm.tm_hour as u32,
            tm.tm_min as u32,
            tm.tm_sec as u32,
        )
    })
}

/// `%Y-%m-%d %H:%M:%S` of `secs` (what `bdrv_snapshot_dump` prints).
pub(crate) fn date_time(secs: i64, zone: Zone) -> String {
    match civil(secs, zone) {
        Some((y, mo, d, h, mi, s)) => format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}"),
        None => "????-??-?? ??:??:??".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(268_435_456), "256 MiB");
        assert_eq!(size_to_str(1_023_487), "999 KiB");
        assert_eq!(size_to_str(1_048_000), "0.999 MiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
        assert_eq!(fmt_g3(999.6), "1e+03");
        assert_eq!(fmt_g3(0.000_123_4), "0.000123");
        assert_eq!(fmt_g3(12.34), "12.3");
    }

    #[test]
    fn dates_print_like_strftime() {
        assert_eq!(date_time(0, Zone::Utc), "1970-01-01 00:00:00");
        assert_eq!(date_time(1_700_000_000, Zone::Utc), "2023-11-14 22:13:20");
        assert_eq!(date_time(951_782_400, Zone::Utc), "2000-02-29 00:00:00");
        // Local time has the same shape whatever the host's zone.
        let local = date_time(1_700_000_000, Zone::Local);
        assert_eq!(local.len(), 19, "{local}");
        assert_eq!(&local[4..5], "-");
        assert_eq!(&local[10..11], " ");
    }
}
