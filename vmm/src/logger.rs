//! The process's logger: the `log` records of every crate, one line each, to stderr or a file.
//!
//! A line reads `2026-12-02T03:04:05.678Z WARN  [thread] target: message`. Lines at warning
//! level and above come from a budget (a burst of [`BURST`], then [`PER_SECOND`] a second), so
//! a guest that provokes an error in a loop cannot fill the host's disk through us; what the
//! budget holds back is counted and reported in one line once lines flow again.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines a burst may have before the budget applies.
pub const BURST: u32 = 200;
/// Lines a second once the burst is spent.
pub const PER_SECOND: u32 = 20;

/// Where lines go.
enum Sink {
    Stderr,
    File(File),
}

struct Budget {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Budget {
    /// Takes a token; false when the budget is spent (the line is counted as suppressed).
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(PER_SECOND)).min(f64::from(BURST));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

struct Logger {
    level: LevelFilter,
    state: Mutex<(Sink, Budget)>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = String::new();
        let thread = std::thread::current();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (sink, budget) = &mut *state;
        if record.level() <= Level::Warn {
            if !budget.take(Instant::now()) {
                return;
            }
            if budget.suppressed > 0 {
                line.push_str(&format_line(
                    Level::Warn,
                    thread.name(),
                    "vmm::logger",
                    &format!("{} log lines were held back (too many)", budget.suppressed),
                ));
                budget.suppressed = 0;
            }
        }
        line.push_str(&format_line(
            record.level(),
            thread.name(),
            record.target(),
            &record.args().to_string(),
        ));
        // A log line that cannot be written has nowhere else to go.
        let _ = match sink {
            Sink::Stderr => io::stderr().lock().write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = match &mut state.0 {
            Sink::Stderr => io::stderr().flush(),
            Sink::File(f) => f.flush(),
        };
    }
}

/// One line, newline included.
fn format_line(level: Level, thread: Option<&str>, target: &str, msg: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{} {:<5} [{}] {}: {}\n",
        utc_timestamp(now.as_secs(), now.subsec_millis()),
        level,
        thread.unwrap_or("-"),
        target,
        msg
    )
}

/// The UTC calendar date and time of `secs` since the Unix epoch: (year, month, day, hour,
/// minute, second), proleptic Gregorian (Howard Hinnant's days-to-civil algorithm).
pub fn utc_civil(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for `secs` since the epoch.
pub fn utc_timestamp(secs: u64, millis: u32) -> String {
    let (y, mo, d, h, mi, s) = utc_civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{millis:03}Z")
}

/// Installs the logger: records at `level` and above go to `file` (appended to), or stderr.
/// Only the first call in a process takes effect.
pub fn init(level: LevelFilter, file: Option<&Path>) -> io::Result<()> {
    let sink = match file {
        Some(p) => Sink::File(OpenOptions::new().create(true).append(true).open(p)?),
        None => Sink::Stderr,
    };
    let logger = Logger {
        level,
        state: Mutex::new((
            sink,
            Budget {
                tokens: f64::from(BURST),
                last: Instant::now(),
                suppressed: 0,
            },
        )),
    };
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(0, 0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        assert_eq!(utc_timestamp(951_827_696, 7), "2000-02-29T12:34:56.007Z");
        assert_eq!(
            utc_timestamp(1_796_180_645, 999),
            "2026-12-02T03:04:05.999Z"
        );
    }

    #[test]
    fn the_budget_holds_back_a_flood_and_refills_with_time() {
        let t0 = Instant::now();
        let mut b = Budget {
            tokens: f64::from(BURST),
            last: t0,
            suppressed: 0,
        };
        let passed = (0..BURST + 50).filter(|_| b.take(t0)).count();
        assert_eq!(passed, BURST as usize);
        assert_eq!(b.suppressed, 50);
        assert!(b.take(t0 + Duration::from_secs(1)));
        let more = (0..100)
            .filter(|_| b.take(t0 + Duration::from_secs(1)))
            .count();
        assert_eq!(more, PER_SECOND as usize - 1);
    }

    #[test]
    fn lines_name_level_thread_and_target() {
        let l = format_line(Level::Warn, Some("vmm"), "virtio::console", "port x: gone");
        assert!(
            l.ends_with(" WARN  [vmm] virtio::console: port x: gone\n"),
            "{l}"
        );
    }
}
