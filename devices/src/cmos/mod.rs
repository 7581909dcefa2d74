//! The MC146818-style RTC and CMOS NVRAM at ports 0x70 (index) / 0x71 (data).
//!
//! - Index port: bits 0..=6 select one of 128 registers; bit 7 (NMI disable) is masked off.
//! - Time registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 weekday, 0x07 day, 0x08 month,
//!   0x09 year, 0x32 century) are computed on every read from the host's wall clock (UTC) plus a
//!   guest offset, in BCD or binary per status register B's DM bit, and 24h or 12h (bit 7 = PM)
//!   per its 24/12 bit.
//! - Writing time registers moves the guest's offset (the host clock is never touched). While
//!   B's SET bit is on, the clock is frozen and writes edit the frozen copy, which becomes the new
//!   guest time when SET is cleared, as Linux's `mc146818_set_time` expects. The weekday is always
//!   derived from the date; writes to it are ignored.
//! - Status A's UIP bit is set only during the last 244 µs before each second boundary (as on
//!   real hardware, where the update follows UIP), so it never sticks. Status C reads and clears
//!   the interrupt flags; status D always reports valid RAM (VRT).
//! - Memory-size registers are filled from the constructor arguments, as QEMU and Cloud
//!   Hypervisor do for firmware: 0x15/0x16 base memory (KiB), 0x17/0x18 and 0x30/0x31 memory
//!   above 1 MiB (KiB, capped), 0x34/0x35 memory between 16 MiB and 4 GiB (64 KiB units),
//!   0x5b..=0x5d memory above 4 GiB (64 KiB units); with the standard checksum at 0x2e/0x2f.
//! - Interrupts (IRQ 8) are optional: after [`Cmos::enable_interrupts`], the update-ended (UIE)
//!   and alarm (AIE) interrupts are driven by a timerfd the VMM's event loop polls
//!   ([`Cmos::timer_fd`], [`Cmos::handle_timer`]). Linux emulates `RTC_UIE_ON` (used by
//!   util-linux `hwclock`) with the alarm. The periodic interrupt (PIE) is not emulated.
//! - State ([`Persist`]): the index, the 128 bytes of NVRAM (status registers included), the
//!   guest's offset from the host clock and the frozen time while SET is on. The guest clock
//!   keeps running from the host's wall clock across a snapshot, as it does across a host
//!   suspend. Restore re-arms the update/alarm timer from register B.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

mod datetime;

use datetime::DateTime;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use crate::persist::{Persist, RestoreError};

/// The index port.
pub const CMOS_PORT_BASE: u64 = 0x70;
/// Length of the RTC's bus range (index and data ports).
pub const CMOS_PORT_LEN: u64 = 2;

const INDEX: u64 = 0;
const DATA: u64 = 1;
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_BASE_MEM_LO: u8 = 0x15;
const REG_EXT_MEM_LO: u8 = 0x17;
const REG_CHECKSUM_HI: u8 = 0x2e;
const REG_EXT_MEM2_LO: u8 = 0x30;
const REG_CENTURY: u8 = 0x32;
const REG_MEM_16M_LO: u8 = 0x34;
const REG_MEM_4G_LO: u8 = 0x5b;

const A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const B_DEFAULT: u8 = B_24H;
const C_IRQF: u8 = 0x80;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;
/// Alarm register values with both top bits set match any value.
const ALARM_DONT_CARE: u8 = 0xc0;

/// UIP is high this long before each second boundary.
const UIP_WINDOW_NS: u32 = 244_000;
/// How far past a second boundary the update timer fires, so the new second is visible.
const TIMER_SLACK: Duration = Duration::from_millis(1);

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Bytes of CMOS NVRAM (registers included).
pub const CMOS_NVRAM_LEN: usize = 128;
/// Largest guest clock offset a state may carry (about 1.1 million years): far beyond the 0..=9999
/// years a guest can set, and small enough that no date computation overflows.
const MAX_OFFSET_SECS: u64 = 1 << 45;
/// Largest (absolute) year of a saved frozen time.
const MAX_FROZEN_YEAR: u64 = 1_000_000;

/// Errors setting up the RTC.
#[derive(Debug, thiserror::Error)]
pub enum CmosError {
    /// The update/alarm timer could not be created.
    #[error("cannot create the RTC timer: {0}")]
    Timer(#[source] io::Error),
}

/// The host's wall clock, as time since the Unix epoch.
fn host_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The update/alarm interrupt machinery, present once interrupts are enabled.
struct RtcIrq {
    line: Arc<dyn InterruptLine>,
    timer: TimerFd,
}

/// The RTC/CMOS device; see the module documentation.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset_secs: i64,
    /// The time being edited while status B's SET bit is on.
    frozen: Option<DateTime>,
    irq: Option<RtcIrq>,
    clock: fn() -> Duration,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("index", &self.index)
            .field("offset_secs", &self.offset_secs)
            .field("frozen", &self.frozen)
            .finish_non_exhaustive()
    }
}

fn put_u16(nvram: &mut [u8; 128], reg: u8, value: u64) {
    let v = value.min(0xffff);
    nvram[usize::from(reg)] = (v & 0xff) as u8;
    nvram[usize::from(reg) + 1] = (v >> 8) as u8;
}

impl Cmos {
    /// Creates the RTC for a guest with `mem_below_4g` bytes of RAM starting at 0 (below the
    /// 32-bit MMIO hole) and `mem_above_4g` bytes starting at 4 GiB.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Cmos {
        let mut nvram = [0u8; 128];
        nvram[usize::from(REG_A)] = A_DEFAULT;
        nvram[usize::from(REG_B)] = B_DEFAULT;
        nvram[usize::from(REG_D)] = D_VRT;

        put_u16(&mut nvram, REG_BASE_MEM_LO, 640);
        let ext_kib = mem_below_4g.saturating_sub(MIB) / KIB;
        put_u16(&mut nvram, REG_EXT_MEM_LO, ext_kib);
        put_u16(&mut nvram, REG_EXT_MEM2_LO, ext_kib);
        put_u16(
            &mut nvram,
            REG_MEM_16M_LO,
            mem_below_4g.saturating_sub(16 * MIB) / (64 * KIB),
        );
        let high = (mem_above_4g / (64 * KIB)).min(0xff_ffff);
        for i in 0..3u8 {
            nvram[usize::from(REG_MEM_4G_LO + i)] = (high >> (8 * i)) as u8;
        }
        // Checksum of 0x10..=0x2d, big-endian at 0x2e/0x2f.
        let sum: u16 = nvram[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
        nvram[usize::from(REG_CHECKSUM_HI)] = (sum >> 8) as u8;
        nvram[usize::from(REG_CHECKSUM_HI) + 1] = (sum & 0xff) as u8;

        Cmos {
            index: 0,
            nvram,
            offset_secs: 0,
            frozen: None,
            irq: None,
            clock: host_clock,
        }
    }

    /// Enables the update-ended and alarm interrupts on `line` (IRQ 8). The VMM must then poll
    /// [`Cmos::timer_fd`] and call [`Cmos::handle_timer`] when it is readable.
    pub fn enable_interrupts(&mut self, line: Arc<dyn InterruptLine>) -> Result<(), CmosError> {
        let timer = TimerFd::new().map_err(|e| CmosError::Timer(e.into()))?;
        // SAFETY: F_SETFL on the timerfd we just created and own; no memory is involved.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(CmosError::Timer(io::Error::last_os_error()));
        }
        self.irq = Some(RtcIrq { line, timer });
        self.rearm_timer();
        Ok(())
    }

    /// The timerfd to poll for readability, once interrupts are enabled.
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.irq.as_ref().map(|irq| irq.timer.as_raw_fd())
    }

    /// Runs the once-a-second update: sets the update-ended flag, the alarm flag when the alarm
    /// registers match, and raises IRQ 8 when an enabled flag is set. Harmless if called early.
    pub fn handle_timer(&mut self) {
        let Some(irq) = &mut self.irq else {
            return;
        };
        match irq.timer.wait() {
            Ok(_) => {}
            Err(e) if e.errno() == libc::EAGAIN => return,
            Err(e) => {
                log::warn!("rtc: timer read failed: {e}");
                return;
            }
        }
        let b = self.reg(REG_B);
        if b & B_SET == 0 {
            let mut flags = C_UF;
            if self.alarm_matches(self.now()) {
                flags |= C_AF;
            }
            // Flag bits line up with their enable bits in register B.
            if flags & b & (B_UIE | B_AIE) != 0 {
                flags |= C_IRQF;
                if let Some(irq) = &self.irq {
                    if let Err(e) = irq.line.trigger() {
                        log::warn!("rtc: cannot raise the interrupt: {e}");
                    }
                }
            }
            self.nvram[usize::from(REG_C)] |= flags;
        }
        self.rearm_timer();
    }

    /// Arms the timer for just after the next second boundary while UIE or AIE is on.
    fn rearm_timer(&mut self) {
        let b = self.reg(REG_B);
        let wanted = b & (B_UIE | B_AIE) != 0 && b & B_SET == 0;
        let nanos = (self.clock)().subsec_nanos();
        let Some(irq) = &mut self.irq else {
            return;
        };
        let result = if wanted {
            let until_tick = Duration::from_nanos(u64::from(1_000_000_000 - nanos));
            irq.timer.reset(until_tick + TIMER_SLACK, None)
        } else {
            irq.timer.clear()
        };
        if let Err(e) = result {
            log::warn!("rtc: cannot program the timer: {e}");
        }
    }

    fn reg(&self, reg: u8) -> u8 {
        self.nvram[usize::from(reg & INDEX_MASK)]
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_BINARY != 0
    }

    fn hours_24(&self) -> bool {
        self.reg(REG_B) & B_24H != 0
    }

    /// The guest's current time (the frozen copy while SET is on).
    fn now(&self) -> DateTime {
        if let Some(frozen) = self.frozen {
            return frozen;
        }
        let host = i64::try_from((self.clock)().as_secs()).unwrap_or(i64::MAX);
        DateTime::from_epoch(host.saturating_add(self.offset_secs))
    }

    fn uip(&self) -> u8 {
        if self.reg(REG_B) & B_SET != 0 {
            return 0;
        }
        if (self.clock)().subsec_nanos() >= 1_000_000_000 - UIP_WINDOW_NS {
            A_UIP
        } else {
            0
        }
    }

    /// Encodes `v` (< 100) in the current data mode.
    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.binary() {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    /// Decodes a register value in the current data mode; `None` for invalid BCD.
    fn decode(&self, v: u8) -> Option<u32> {
        if self.binary() {
            return Some(u32::from(v));
        }
        let (hi, lo) = (v >> 4, v & 0x0f);
        (hi <= 9 && lo <= 9).then(|| u32::from(hi * 10 + lo))
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.hours_24() {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> Option<u32> {
        if self.hours_24() {
            return self.decode(v).filter(|&h| h < 24);
        }
        let h12 = self.decode(v & !HOUR_PM).filter(|h| (1..=12).contains(h))?;
        let pm = if v & HOUR_PM != 0 { 12 } else { 0 };
        Some(h12 % 12 + pm)
    }

    fn read_time(&self, reg: u8) -> u8 {
        let now = self.now();
        match reg {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS => self.encode_hour(now.hour),
            REG_WEEKDAY => self.encode(now.weekday()),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode(now.year.rem_euclid(100) as u32),
            // The century of years 0..=9999; out-of-range years wrap.
            _ => self.encode(now.year.div_euclid(100).rem_euclid(100) as u32),
        }
    }

    fn write_time(&mut self, reg: u8, value: u8) {
        let mut t = self.now();
        let ok = match reg {
            REG_SECONDS => self.decode(value).filter(|&v| v < 60).map(|v| t.second = v),
            REG_MINUTES => self.decode(value).filter(|&v| v < 60).map(|v| t.minute = v),
            REG_HOURS => self.decode_hour(value).map(|v| t.hour = v),
            REG_DAY => self
                .decode(value)
                .filter(|v| (1..=31).contains(v))
                .map(|v| t.day = v),
            REG_MONTH => self
                .decode(value)
                .filter(|v| (1..=12).contains(v))
                .map(|v| t.month = v),
            REG_YEAR => self
                .decode(value)
                .filter(|&v| v < 100)
                .map(|v| t.year = t.year.div_euclid(100) * 100 + i64::from(v)),
            REG_CENTURY => self
                .decode(value)
                .filter(|&v| v < 100)
                .map(|v| t.year = i64::from(v) * 100 + t.year.rem_euclid(100)),
            // The weekday follows from the date.
            _ => Some(()),
        };
        if ok.is_none() {
            log::debug!("rtc: ignored invalid value {value:#x} for register {reg:#x}");
            return;
        }
        if self.frozen.is_some() {
            self.frozen = Some(t);
        } else {
            self.set_guest_time(t);
        }
    }

    fn set_guest_time(&mut self, t: DateTime) {
        let host = i64::try_from((self.clock)().as_secs()).unwrap_or(i64::MAX);
        self.offset_secs = t.to_epoch().saturating_sub(host);
    }

    fn write_b(&mut self, mut value: u8) {
        let old = self.reg(REG_B);
        if value & B_SET != 0 {
            // Setting SET disables the update-ended interrupt, per the MC146818 datasheet.
            value &= !B_UIE;
            if old & B_SET == 0 {
                self.frozen = Some(self.now());
            }
        } else if let Some(t) = self.frozen.take() {
            self.set_guest_time(t);
        }
        self.nvram[usize::from(REG_B)] = value;
        self.rearm_timer();
    }

    fn alarm_matches(&self, now: DateTime) -> bool {
        let field = |alarm_reg: u8, current: u8| {
            let alarm = self.reg(alarm_reg);
            alarm & ALARM_DONT_CARE == ALARM_DONT_CARE || alarm == current
        };
        field(REG_SECONDS_ALARM, self.encode(now.second))
            && field(REG_MINUTES_ALARM, self.encode(now.minute))
            && field(REG_HOURS_ALARM, self.encode_hour(now.hour))
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => self.read_time(reg),
            REG_A => (self.reg(REG_A) & !A_UIP) | self.uip(),
            REG_C => std::mem::take(&mut self.nvram[usize::from(REG_C)]),
            REG_D => D_VRT,
            _ => self.reg(reg),
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => self.write_time(reg, value),
            REG_A => self.nvram[usize::from(REG_A)] = value & !A_UIP,
            REG_B => self.write_b(value),
            REG_C | REG_D => log::debug!("rtc: ignored write to read-only register {reg:#x}"),
            REG_SECONDS_ALARM | REG_MINUTES_ALARM | REG_HOURS_ALARM => {
                self.nvram[usize::from(reg)] = value;
            }
            _ => self.nvram[usize::from(reg & INDEX_MASK)] = value,
        }
    }
}

/// A broken-down UTC time, as saved while the clock is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosTime {
    /// Year (proleptic Gregorian).
    pub year: i64,
    /// Month, 1..=12.
    pub month: u32,
    /// Day of the month, 1..=31.
    pub day: u32,
    /// Hour, 0..=23.
    pub hour: u32,
    /// Minute, 0..=59.
    pub minute: u32,
    /// Second, 0..=59.
    pub second: u32,
}

/// The saved state of a [`Cmos`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register (0..128).
    pub index: u8,
    /// The NVRAM, [`CMOS_NVRAM_LEN`] bytes (status registers A..D included).
    pub nvram: Vec<u8>,
    /// Guest time minus host time, in seconds.
    pub offset_secs: i64,
    /// The time being edited while status B's SET bit is on (present exactly then).
    pub frozen: Option<CmosTime>,
}

impl CmosTime {
    fn validate(&self) -> Result<(), RestoreError> {
        let bad = |what: &str, v: String| Err(RestoreError::invalid(format!("frozen.{what}"), v));
        if self.year.unsigned_abs() > MAX_FROZEN_YEAR {
            return bad("year", format!("{} is out of range", self.year));
        }
        if !(1..=12).contains(&self.month) {
            return bad("month", format!("{} is not 1..=12", self.month));
        }
        if !(1..=31).contains(&self.day) {
            return bad("day", format!("{} is not 1..=31", self.day));
        }
        if self.hour > 23 || self.minute > 59 || self.second > 59 {
            return bad(
                "time",
                format!(
                    "{}:{}:{} is not a time of day",
                    self.hour, self.minute, self.second
                ),
            );
        }
        Ok(())
    }
}

impl From<DateTime> for CmosTime {
    fn from(t: DateTime) -> Self {
        CmosTime {
            year: t.year,
            month: t.month,
            day: t.day,
            hour: t.hour,
            minute: t.minute,
            second: t.second,
        }
    }
}

impl From<CmosTime> for DateTime {
    fn from(t: CmosTime) -> Self {
        DateTime {
            year: t.year,
            month: t.month,
            day: t.day,
            hour: t.hour,
            minute: t.minute,
            second: t.second,
        }
    }
}

impl Persist for Cmos {
    type State = CmosState;

    fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
            offset_secs: self.offset_secs,
            frozen: self.frozen.map(CmosTime::from),
        }
    }

    fn restore(&mut self, state: &CmosState) -> Result<(), RestoreError> {
        if state.index & !INDEX_MASK != 0 {
            return Err(RestoreError::invalid(
                "index",
                format!("{:#x} is not a register", state.index),
            ));
        }
        let nvram: [u8; CMOS_NVRAM_LEN] = state.nvram.as_slice().try_into().map_err(|_| {
            RestoreError::invalid(
                "nvram",
                format!("{} bytes, expected {CMOS_NVRAM_LEN}", state.nvram.len()),
            )
        })?;
        if state.offset_secs.unsigned_abs() > MAX_OFFSET_SECS {
            return Err(RestoreError::invalid(
                "offset_secs",
                format!("{} is out of range", state.offset_secs),
            ));
        }
        if let Some(t) = &state.frozen {
            t.validate()?;
        }
        let set = nvram[usize::from(REG_B)] & B_SET != 0;
        if set != state.frozen.is_some() {
            return Err(RestoreError::invalid(
                "frozen",
                format!(
                    "a frozen time must be saved exactly while register B's SET bit is on (B = {:#04x})",
                    nvram[usize::from(REG_B)]
                ),
            ));
        }
        self.index = state.index;
        self.nvram = nvram;
        self.offset_secs = state.offset_secs;
        self.frozen = state.frozen.map(DateTime::from);
        self.rearm_timer();
        Ok(())
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            // The index port is write-only; reads float high.
            INDEX => 0xff,
            DATA => self.read_register(self.index),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        match offset {
            INDEX => self.index = value & INDEX_MASK,
            DATA => self.write_register(self.index, *value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
