use super::*;
use crate::interrupt::tests::CountingLine;

fn read_reg(c: &mut Cmos, reg: u8) -> u8 {
    c.write(INDEX, &[reg]);
    let mut d = [0u8];
    c.read(DATA, &mut d);
    d[0]
}

fn write_reg(c: &mut Cmos, reg: u8, v: u8) {
    c.write(INDEX, &[reg]);
    c.write(DATA, &[v]);
}

fn bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

/// Reads the clock the way Linux does: wait for UIP clear, read, re-check seconds.
fn read_clock(c: &mut Cmos) -> DateTime {
    loop {
        while read_reg(c, REG_A) & A_UIP != 0 {}
        let regs: Vec<u8> = [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ]
        .iter()
        .map(|&r| read_reg(c, r))
        .collect();
        if read_reg(c, REG_SECONDS) != regs[0] {
            continue;
        }
        let binary = read_reg(c, REG_B) & B_BINARY != 0;
        let dec = |v: u8| {
            if binary {
                u32::from(v)
            } else {
                bcd(v)
            }
        };
        return DateTime {
            second: dec(regs[0]),
            minute: dec(regs[1]),
            hour: dec(regs[2]),
            day: dec(regs[3]),
            month: dec(regs[4]),
            year: i64::from(dec(regs[6]) * 100 + dec(regs[5])),
        };
    }
}

fn host_now() -> i64 {
    host_clock().as_secs() as i64
}

#[test]
fn bcd_time_matches_host_clock() {
    let mut c = Cmos::new(0, 0);
    assert_eq!(read_reg(&mut c, REG_B) & B_BINARY, 0, "BCD by default");
    let before = host_now();
    let t = read_clock(&mut c).to_epoch();
    let after = host_now();
    assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
}

#[test]
fn binary_time_matches_host_clock() {
    let mut c = Cmos::new(0, 0);
    write_reg(&mut c, REG_B, B_24H | B_BINARY);
    let before = host_now();
    let t = read_clock(&mut c).to_epoch();
    let after = host_now();
    assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
}

#[test]
fn twelve_hour_mode_and_weekday() {
    let mut c = Cmos::new(0, 0);
    // 2024-02-29 13:05:07 UTC, a Thursday.
    c.clock = || Duration::from_secs(1_709_164_800 + 13 * 3600 + 5 * 60 + 7);
    assert_eq!(read_reg(&mut c, REG_HOURS), 0x13);
    assert_eq!(read_reg(&mut c, REG_WEEKDAY), 5);
    assert_eq!(read_reg(&mut c, REG_CENTURY), 0x20);
    assert_eq!(read_reg(&mut c, REG_YEAR), 0x24);
    write_reg(&mut c, REG_B, 0); // 12h, BCD
    assert_eq!(read_reg(&mut c, REG_HOURS), HOUR_PM | 0x01);
    write_reg(&mut c, REG_B, B_BINARY); // 12h, binary
    assert_eq!(read_reg(&mut c, REG_HOURS), HOUR_PM | 1);
    c.clock = || Duration::from_secs(1_709_164_800 + 30 * 60); // 00:30
    assert_eq!(read_reg(&mut c, REG_HOURS), 12);
}

#[test]
fn uip_is_not_stuck() {
    let mut c = Cmos::new(0, 0);
    c.clock = || Duration::new(100, 999_900_000);
    assert_ne!(read_reg(&mut c, REG_A) & A_UIP, 0);
    c.clock = || Duration::new(101, 1_000);
    assert_eq!(read_reg(&mut c, REG_A), A_DEFAULT);

    // With the real clock, UIP is clear nearly always and always clears again.
    let mut c = Cmos::new(0, 0);
    let clear = (0..2000)
        .filter(|_| read_reg(&mut c, REG_A) & A_UIP == 0)
        .count();
    assert!(clear > 1900, "UIP clear only {clear}/2000 times");
    // Writes cannot set UIP.
    write_reg(&mut c, REG_A, 0xa6);
    c.clock = || Duration::new(5, 0);
    assert_eq!(read_reg(&mut c, REG_A), 0x26);
}

#[test]
fn guest_time_writes_move_an_offset() {
    let mut c = Cmos::new(0, 0);
    c.clock = || Duration::from_secs(1_700_000_000);
    // Linux's mc146818_set_time: SET, write fields, clear SET. Set 1999-12-31 23:59:58.
    write_reg(&mut c, REG_B, B_24H | B_SET);
    for (reg, v) in [
        (REG_SECONDS, 0x58),
        (REG_MINUTES, 0x59),
        (REG_HOURS, 0x23),
        (REG_DAY, 0x31),
        (REG_MONTH, 0x12),
        (REG_YEAR, 0x99),
        (REG_CENTURY, 0x19),
    ] {
        write_reg(&mut c, reg, v);
    }
    // Frozen while SET: reads return the edited time, UIP stays clear.
    assert_eq!(read_reg(&mut c, REG_YEAR), 0x99);
    assert_eq!(read_reg(&mut c, REG_A) & A_UIP, 0);
    write_reg(&mut c, REG_B, B_24H);
    assert_eq!(c.offset_secs, 946_684_798 - 1_700_000_000);

    // The clock runs on from there.
    c.clock = || Duration::from_secs(1_700_000_003);
    assert_eq!(read_reg(&mut c, REG_SECONDS), 0x01);
    assert_eq!(read_reg(&mut c, REG_YEAR), 0x00);
    assert_eq!(read_reg(&mut c, REG_CENTURY), 0x20);
    assert_eq!(read_reg(&mut c, REG_MONTH), 0x01);

    // A single write without SET applies immediately; invalid BCD is ignored.
    write_reg(&mut c, REG_MINUTES, 0x30);
    assert_eq!(read_reg(&mut c, REG_MINUTES), 0x30);
    write_reg(&mut c, REG_MINUTES, 0x7a);
    write_reg(&mut c, REG_MONTH, 0x13);
    assert_eq!(read_reg(&mut c, REG_MINUTES), 0x30);
    assert_eq!(read_reg(&mut c, REG_MONTH), 0x01);
}

#[test]
fn registers_nvram_and_nmi_bit() {
    let mut c = Cmos::new(0, 0);
    assert_eq!(read_reg(&mut c, REG_D), D_VRT);
    write_reg(&mut c, REG_D, 0);
    assert_eq!(read_reg(&mut c, REG_D), D_VRT);
    assert_eq!(read_reg(&mut c, REG_C), 0);
    // NVRAM through an index with the NMI-disable bit set.
    write_reg(&mut c, 0x80 | 0x40, 0xab);
    assert_eq!(read_reg(&mut c, 0x40), 0xab);
    assert_eq!(read_reg(&mut c, 0xc0), 0xab);
    // Odd accesses.
    let mut wide = [0u8; 2];
    c.read(DATA, &mut wide);
    assert_eq!(wide, [0xff, 0xff]);
    c.write(DATA, &[1, 2]);
    c.write(7, &[1]);
    let mut d = [0u8];
    c.read(INDEX, &mut d);
    assert_eq!(d, [0xff]);
}

#[test]
fn memory_size_registers() {
    let gib = 1u64 << 30;
    let c = Cmos::new(3 * gib, 5 * gib);
    let word = |lo: u8| u16::from_le_bytes([c.reg(lo), c.reg(lo + 1)]);
    assert_eq!(word(REG_BASE_MEM_LO), 640);
    assert_eq!(word(REG_EXT_MEM_LO), 0xffff);
    assert_eq!(word(REG_EXT_MEM2_LO), 0xffff);
    assert_eq!(
        u64::from(word(REG_MEM_16M_LO)),
        (3 * gib - 16 * MIB) / (64 * KIB)
    );
    let high = u32::from_le_bytes([
        c.reg(REG_MEM_4G_LO),
        c.reg(REG_MEM_4G_LO + 1),
        c.reg(REG_MEM_4G_LO + 2),
        0,
    ]);
    assert_eq!(u64::from(high), 5 * gib / (64 * KIB));
    let sum: u16 = (0x10..=0x2d).map(|r| u16::from(c.reg(r))).sum();
    assert_eq!(
        u16::from_be_bytes([c.reg(REG_CHECKSUM_HI), c.reg(REG_CHECKSUM_HI + 1)]),
        sum
    );

    let small = Cmos::new(8 * MIB, 0);
    assert_eq!(small.reg(REG_MEM_16M_LO), 0);
    assert_eq!(
        u16::from_le_bytes([small.reg(REG_EXT_MEM_LO), small.reg(REG_EXT_MEM_LO + 1)]),
        7 * 1024
    );
}

#[test]
fn state_round_trip_keeps_time_nvram_and_timer() {
    let mut src = Cmos::new(512 * MIB, 0);
    src.clock = || Duration::from_secs(1_700_000_000);
    // Guest time one hour ahead, an NVRAM byte, alarm registers, binary mode.
    let hours = read_reg(&mut src, REG_HOURS);
    write_reg(&mut src, REG_HOURS, hours + 1);
    write_reg(&mut src, 0x40, 0xab);
    write_reg(&mut src, REG_HOURS_ALARM, 0xff);
    write_reg(&mut src, REG_B, B_24H | B_BINARY | B_AIE);
    src.write(INDEX, &[0x41]);

    let mut dst = Cmos::new(512 * MIB, 0);
    dst.clock = src.clock;
    let line = Arc::new(CountingLine::default());
    dst.enable_interrupts(line).unwrap();
    let state = crate::persist::assert_round_trip(&src, &mut dst);
    assert_eq!(state.offset_secs, 3600);
    // The timer follows register B's AIE bit.
    assert!(dst.irq.as_ref().unwrap().timer.is_armed().unwrap());

    // Same selected register, same NVRAM, same time, same modes.
    let mut d = [0u8];
    dst.read(DATA, &mut d);
    assert_eq!(d[0], read_reg(&mut src, 0x41));
    for reg in [
        0x40,
        REG_HOURS_ALARM,
        REG_B,
        REG_SECONDS,
        REG_HOURS,
        REG_YEAR,
    ] {
        assert_eq!(read_reg(&mut dst, reg), read_reg(&mut src, reg), "{reg:#x}");
    }

    // A clock frozen by SET stays frozen with the edited value.
    write_reg(&mut src, REG_B, B_24H | B_SET);
    write_reg(&mut src, REG_YEAR, 0x99);
    let state = crate::persist::assert_round_trip(&src, &mut dst);
    assert!(state.frozen.is_some());
    assert!(!dst.irq.as_ref().unwrap().timer.is_armed().unwrap());
    assert_eq!(read_reg(&mut dst, REG_YEAR), 0x99);
    write_reg(&mut dst, REG_B, B_24H);
    assert_eq!(read_reg(&mut dst, REG_YEAR), 0x99);
}

#[test]
fn restore_refuses_invalid_states() {
    let c = Cmos::new(0, 0);
    let good = c.save();
    let frozen = CmosTime {
        year: 2024,
        month: 2,
        day: 29,
        hour: 1,
        minute: 2,
        second: 3,
    };
    let mut frozen_b = good.nvram.clone();
    frozen_b[usize::from(REG_B)] |= B_SET;
    let bad_states = [
        CmosState {
            index: 0x80,
            ..good.clone()
        },
        CmosState {
            nvram: vec![0; 129],
            ..good.clone()
        },
        CmosState {
            offset_secs: i64::MIN,
            ..good.clone()
        },
        // Frozen without SET, SET without a frozen time.
        CmosState {
            frozen: Some(frozen),
            ..good.clone()
        },
        CmosState {
            nvram: frozen_b.clone(),
            ..good.clone()
        },
        CmosState {
            nvram: frozen_b.clone(),
            frozen: Some(CmosTime {
                month: 13,
                ..frozen
            }),
            ..good.clone()
        },
        CmosState {
            nvram: frozen_b.clone(),
            frozen: Some(CmosTime {
                year: i64::MAX,
                ..frozen
            }),
            ..good.clone()
        },
    ];
    let mut dst = Cmos::new(0, 0);
    for bad in &bad_states {
        assert!(
            matches!(dst.restore(bad), Err(RestoreError::Invalid { .. })),
            "{bad:?}"
        );
        assert_eq!(dst.save(), good);
    }
    let ok = CmosState {
        nvram: frozen_b,
        frozen: Some(frozen),
        ..good
    };
    dst.restore(&ok).unwrap();
    assert_eq!(read_reg(&mut dst, REG_YEAR), 0x24);
}

#[test]
fn update_and_alarm_interrupts() {
    let mut c = Cmos::new(0, 0);
    let line = Arc::new(CountingLine::default());
    c.enable_interrupts(line.clone()).unwrap();
    let fd = c.timer_fd().unwrap();
    // Not armed while UIE/AIE are off; an early call is a no-op.
    c.handle_timer();
    assert_eq!(line.count(), 0);

    write_reg(&mut c, REG_B, B_24H | B_UIE);
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; waits at most 2.5 s for the next second boundary.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 2500) }, 1);
    c.handle_timer();
    assert_eq!(line.count(), 1);
    assert_eq!(read_reg(&mut c, REG_C), C_IRQF | C_UF);
    assert_eq!(read_reg(&mut c, REG_C), 0);

    // An alarm for "any time" fires with AF; UIE off so only the alarm counts.
    for reg in [REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM] {
        write_reg(&mut c, reg, 0xff);
    }
    write_reg(&mut c, REG_B, B_24H | B_AIE);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 2500) }, 1);
    c.handle_timer();
    assert_eq!(line.count(), 2);
    assert_eq!(read_reg(&mut c, REG_C), C_IRQF | C_AF | C_UF);

    // An alarm that does not match sets nothing but UF, and raises nothing.
    write_reg(&mut c, REG_HOURS_ALARM, 0x99);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 2500) }, 1);
    c.handle_timer();
    assert_eq!(line.count(), 2);
    assert_eq!(read_reg(&mut c, REG_C), C_UF);

    // Disabling both stops the timer.
    write_reg(&mut c, REG_B, B_24H);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1200) }, 0);
}
