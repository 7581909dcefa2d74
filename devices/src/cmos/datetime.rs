//! Civil (proleptic Gregorian, UTC) date arithmetic for the RTC: conversions between seconds
//! since the Unix epoch and broken-down time, valid for any year (no table, no leap seconds).

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DateTime {
    pub(super) year: i64,
    pub(super) month: u32,
    pub(super) day: u32,
    pub(super) hour: u32,
    pub(super) minute: u32,
    pub(super) second: u32,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1..=12; any day count).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let month = i64::from(month);
    // Count years from March so the leap day is the last day of the year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date `days` days after 1970-01-01: (year, month 1..=12, day 1..=31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are small and positive by construction.
    (year, month as u32, day as u32)
}

impl DateTime {
    pub(super) fn from_epoch(secs: i64) -> DateTime {
        let days = secs.div_euclid(86_400);
        // In 0..86_400, so the casts below are lossless.
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
        }
    }

    pub(super) fn to_epoch(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
    }

    /// 1 = Sunday ... 7 = Saturday.
    pub(super) fn weekday(self) -> u32 {
        // 1970-01-01 was a Thursday (4 days after a Sunday); the result is in 1..=7.
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u32 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_conversions_round_trip() {
        for secs in [
            0,
            951_782_400,   // 2000-02-29
            1_709_164_800, // 2024-02-29
            4_102_444_799, // 2099-12-31 23:59:59
            -86_400,       // 1969-12-31
        ] {
            assert_eq!(DateTime::from_epoch(secs).to_epoch(), secs);
        }
        let t = DateTime::from_epoch(1_709_164_800 + 13 * 3600 + 5 * 60 + 7);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 2, 29, 13, 5, 7)
        );
        assert_eq!(t.weekday(), 5); // a Thursday
        assert_eq!(DateTime::from_epoch(0).weekday(), 5);
        // Day overflow normalises into the next month.
        let feb31 = DateTime {
            year: 2023,
            month: 2,
            day: 31,
            hour: 0,
            minute: 0,
            second: 0,
        };
        let t = DateTime::from_epoch(feb31.to_epoch());
        assert_eq!((t.month, t.day), (3, 3));
    }
}
