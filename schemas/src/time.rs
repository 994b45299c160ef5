//! Timestamps and calendar days, without a calendar dependency.
//!
//! Time in fieldsync is milliseconds since the Unix epoch, UTC. Day buckets of
//! documents are UTC calendar days.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

pub const MS_PER_DAY: i64 = 86_400_000;

/// Wall-clock readings before this instant (2020-01-01) are treated as
/// "clock not set": a box without a real-time clock that booted in 1970.
pub const PLAUSIBLE_EPOCH: Timestamp = Timestamp(1_577_836_800_000);

impl Timestamp {
    pub fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }
    pub fn as_millis(self) -> i64 {
        self.0
    }
    pub fn day(self) -> Day {
        Day::from_days_since_epoch(self.0.div_euclid(MS_PER_DAY))
    }
    /// Whether this reading can be a real wall-clock time (see [`PLAUSIBLE_EPOCH`]).
    pub fn is_plausible(self) -> bool {
        self >= PLAUSIBLE_EPOCH
    }
    pub fn saturating_add_ms(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }
    /// Start of the window of `window_ms` that contains this instant.
    pub fn window_start(self, window_ms: i64) -> Self {
        Timestamp(self.0 - self.0.rem_euclid(window_ms.max(1)))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let day = self.day();
        let ms = self.0.rem_euclid(MS_PER_DAY);
        let (h, m, s, milli) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        write!(f, "{day}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
    }
}

/// A UTC calendar day, printed `yyyy-mm-dd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day {
    pub year: i32,
    pub month: u8,
    pub day: u8,
}

/// Why a day string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid day {input:?}: expected yyyy-mm-dd ({reason})")]
pub struct DayError {
    pub input: String,
    pub reason: &'static str,
}

impl Day {
    pub fn new(year: i32, month: u8, day: u8) -> Option<Day> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(Day { year, month, day })
    }

    /// Howard Hinnant's `civil_from_days`.
    pub fn from_days_since_epoch(z: i64) -> Day {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = if m <= 2 { y + 1 } else { y };
        Day {
            year: y as i32,
            month: m as u8,
            day: d as u8,
        }
    }

    /// Howard Hinnant's `days_from_civil`.
    pub fn days_since_epoch(self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let m = i64::from(self.month);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    pub fn start(self) -> Timestamp {
        Timestamp(self.days_since_epoch() * MS_PER_DAY)
    }
    pub fn end(self) -> Timestamp {
        Timestamp((self.days_since_epoch() + 1) * MS_PER_DAY)
    }
    pub fn next(self) -> Day {
        Day::from_days_since_epoch(self.days_since_epoch() + 1)
    }
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl FromStr for Day {
    type Err = DayError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| DayError {
            input: s.to_string(),
            reason,
        };
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(err("wrong shape"));
        }
        let digits = |r: std::ops::Range<usize>| -> Result<u32, DayError> {
            let part = &s[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err("not a number"));
            }
            part.parse().map_err(|_| err("not a number"))
        };
        let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        Day::new(y as i32, m as u8, d as u8).ok_or_else(|| err("no such date"))
    }
}

impl Serialize for Day {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Day {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Day {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Day".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
            "description": "UTC calendar day, yyyy-mm-dd"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_days() {
        assert_eq!(Timestamp(0).day().to_string(), "1970-01-01");
        assert_eq!(Timestamp(1_700_000_000_000).day().to_string(), "2023-11-14");
        assert_eq!(Timestamp(-1).day().to_string(), "1969-12-31");
        assert_eq!(
            "2024-02-29".parse::<Day>().map(|d| d.to_string()).ok(),
            Some("2024-02-29".into())
        );
        assert!("2023-02-29".parse::<Day>().is_err());
        assert!("2023-2-01".parse::<Day>().is_err());
        assert!("2023-+2-01".parse::<Day>().is_err());
        assert_eq!(
            Timestamp(1_700_000_000_123).to_string(),
            "2023-11-14T22:13:20.123Z"
        );
    }

    proptest! {
        #[test]
        fn day_roundtrip(days in -1_000_000i64..1_000_000) {
            let d = Day::from_days_since_epoch(days);
            prop_assert_eq!(d.days_since_epoch(), days);
            let parsed: Day = d.to_string().parse().unwrap_or(Day { year: 0, month: 0, day: 0 });
            if (0..=9999).contains(&d.year) {
                prop_assert_eq!(parsed, d);
            }
        }

        #[test]
        fn window_contains_instant(t in -10_000_000_000i64..10_000_000_000, w in 1i64..10_000_000) {
            let s = Timestamp(t).window_start(w);
            prop_assert!(s.0 <= t && t < s.0 + w);
        }
    }
}
