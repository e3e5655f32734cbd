//! Billing periods: calendar months in the plan's time zone.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// The key of a calendar month, `YYYY-MM` (`2026-11`), independent of any time zone.
///
/// A key names a period; the instants it spans depend on the plan's zone (see [`Period`]).
///
/// # Example
/// ```
/// use token_billing::PeriodKey;
///
/// let key: PeriodKey = "2026-11".parse()?;
/// assert_eq!((key.year(), key.month()), (2026, 11));
/// assert_eq!(key.next().to_string(), "2026-12");
/// assert_eq!(key.next().next().to_string(), "2027-01");
/// assert!("2026-13".parse::<PeriodKey>().is_err());
/// # Ok::<(), token_billing::PeriodError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeriodKey {
    year: i32,
    month: u32,
}

/// Why a period could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeriodError {
    /// The text is not a `YYYY-MM` month between years 1 and 9999.
    #[error("invalid period {0:?}: expected YYYY-MM")]
    Invalid(String),
}

impl PeriodKey {
    /// A stand-in until an event is placed in its period.
    pub(crate) const UNPLACED: PeriodKey = PeriodKey { year: 1970, month: 1 };

    /// The month `month` (1 to 12) of `year` (1 to 9999).
    ///
    /// # Errors
    /// [`PeriodError::Invalid`] when either is out of range.
    pub fn new(year: i32, month: u32) -> Result<PeriodKey, PeriodError> {
        if !(1..=9999).contains(&year) || !(1..=12).contains(&month) {
            return Err(PeriodError::Invalid(format!("{year}-{month}")));
        }
        Ok(PeriodKey { year, month })
    }

    /// The year.
    pub const fn year(&self) -> i32 {
        self.year
    }

    /// The month, 1 to 12.
    pub const fn month(&self) -> u32 {
        self.month
    }

    /// The following month.
    pub const fn next(&self) -> PeriodKey {
        if self.month == 12 {
            PeriodKey {
                year: self.year + 1,
                month: 1,
            }
        } else {
            PeriodKey {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The preceding month.
    pub const fn previous(&self) -> PeriodKey {
        if self.month == 1 {
            PeriodKey {
                year: self.year - 1,
                month: 12,
            }
        } else {
            PeriodKey {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    fn first_day(&self) -> NaiveDate {
        // Year and month are validated on construction.
        NaiveDate::from_ymd_opt(self.year, self.month, 1).unwrap_or(NaiveDate::MIN)
    }
}

impl PeriodKey {
    /// The key as `YYYY-MM`, written without the formatting machinery: it is part of every
    /// charge key.
    pub(crate) fn text(&self) -> [u8; 7] {
        let digit = |n: u32| b'0' + u8::try_from(n % 10).unwrap_or(0);
        // Years are 1 to 9999 and months 1 to 12 by construction.
        let year = self.year.unsigned_abs();
        [
            digit(year / 1000),
            digit(year / 100),
            digit(year / 10),
            digit(year),
            b'-',
            digit(self.month / 10),
            digit(self.month),
        ]
    }
}

impl fmt::Display for PeriodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Digits and a dash: each byte is its own character.
        let text = self.text();
        f.pad(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for PeriodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeriodKey({self})")
    }
}

impl FromStr for PeriodKey {
    type Err = PeriodError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || PeriodError::Invalid(s.chars().take(32).collect());
        let bytes = s.as_bytes();
        if bytes.len() != 7 || bytes[4] != b'-' || !s[..4].bytes().chain(s[5..].bytes()).all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let year = s[..4].parse().map_err(|_| invalid())?;
        let month = s[5..].parse().map_err(|_| invalid())?;
        PeriodKey::new(year, month).map_err(|_| invalid())
    }
}

impl TryFrom<String> for PeriodKey {
    type Error = PeriodError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PeriodKey> for String {
    fn from(k: PeriodKey) -> String {
        k.to_string()
    }
}

/// A billing period: one calendar month in a time zone, as the half-open instant range
/// `[start, end)`.
///
/// # Properties
/// For every instant `t` and zone `z`, `Period::containing(t, z).contains(t)`; consecutive periods
/// touch: `p.next().start() == p.end()`.
///
/// # Example
/// ```
/// use chrono::{TimeZone, Utc};
/// use token_billing::Period;
///
/// let zone = chrono_tz::America::Sao_Paulo; // UTC-03:00
/// // 02:00 UTC on 1 December is still 23:00 on 30 November in São Paulo.
/// let p = Period::containing(Utc.with_ymd_and_hms(2026, 12, 1, 2, 0, 0).unwrap(), zone);
/// assert_eq!(p.key().to_string(), "2026-11");
/// assert_eq!(p.start(), Utc.with_ymd_and_hms(2026, 11, 1, 3, 0, 0).unwrap());
/// assert_eq!(p.end(), Utc.with_ymd_and_hms(2026, 12, 1, 3, 0, 0).unwrap());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    key: PeriodKey,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
}

impl Period {
    /// The period named `key` in `zone`.
    pub fn new(key: PeriodKey, zone: Tz) -> Period {
        Period {
            key,
            start: month_start(key, zone),
            end: month_start(key.next(), zone),
        }
    }

    /// The period named `key` from `start` to `end`: a month whose two ends are drawn in
    /// different zones, the first period under a plan whose zone is not the one before's.
    pub(crate) fn from_bounds(key: PeriodKey, start: DateTime<Utc>, end: DateTime<Utc>) -> Period {
        Period { key, start, end }
    }

    /// The period that contains `instant` in `zone`.
    pub fn containing(instant: DateTime<Utc>, zone: Tz) -> Period {
        let local = instant.with_timezone(&zone);
        let key = PeriodKey {
            year: local.year(),
            month: local.month(),
        };
        let period = Period::new(key, zone);
        // A month that starts inside a daylight-saving gap starts at the first valid instant, so the
        // instant may belong to the month before: step back once in that case.
        if instant < period.start {
            Period::new(key.previous(), zone)
        } else {
            period
        }
    }

    /// The period's key, `YYYY-MM`.
    pub const fn key(&self) -> PeriodKey {
        self.key
    }

    /// The first instant of the period.
    pub const fn start(&self) -> DateTime<Utc> {
        self.start
    }

    /// The first instant after the period.
    pub const fn end(&self) -> DateTime<Utc> {
        self.end
    }

    /// Whether `instant` falls in `[start, end)`.
    pub fn contains(&self, instant: DateTime<Utc>) -> bool {
        self.start <= instant && instant < self.end
    }
}

impl fmt::Debug for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Period({} [{}, {}))", self.key, self.start, self.end)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.key, f)
    }
}

/// Local midnight of the month's first day, as an instant. Where midnight is ambiguous (clocks
/// turned back) the earlier instant; where it does not exist (clocks turned forward, as Brazil did
/// at midnight until 2019) the first local time that exists.
fn month_start(key: PeriodKey, zone: Tz) -> DateTime<Utc> {
    let midnight = key.first_day().and_hms_opt(0, 0, 0).unwrap_or(NaiveDateTime::MIN);
    let mut local = midnight;
    // No zone has a gap longer than a day; probing minute by minute up to that finds the end of it.
    for _ in 0..=24 * 60 {
        match zone.from_local_datetime(&local) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(earliest, _) => return earliest.with_timezone(&Utc),
            LocalResult::None => local += chrono::Duration::minutes(1),
        }
    }
    midnight.and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn sao_paulo_months_are_utc_minus_three() {
        let zone = chrono_tz::America::Sao_Paulo;
        let p = Period::new(PeriodKey::new(2026, 2).expect("valid"), zone);
        assert_eq!(p.start(), Utc.with_ymd_and_hms(2026, 2, 1, 3, 0, 0).unwrap());
        assert_eq!(p.end(), Utc.with_ymd_and_hms(2026, 3, 1, 3, 0, 0).unwrap());
        assert!(p.contains(p.start()));
        assert!(!p.contains(p.end()));
        assert!(p.contains(p.end() - Duration::nanoseconds(1)));
    }

    #[test]
    fn periods_tile_time_across_daylight_saving_changes() {
        // Brazil still moved its clocks in 2013 (at local midnight); London moves them every year.
        for zone in [
            chrono_tz::America::Sao_Paulo,
            chrono_tz::Europe::London,
            chrono_tz::Australia::Lord_Howe,
        ] {
            let mut key = PeriodKey::new(2012, 1).unwrap();
            for _ in 0..36 {
                let p = Period::new(key, zone);
                assert!(p.start() < p.end());
                assert_eq!(Period::new(key.next(), zone).start(), p.end());
                assert_eq!(Period::containing(p.start(), zone), p);
                assert_eq!(Period::containing(p.end() - Duration::nanoseconds(1), zone), p);
                key = key.next();
            }
        }
    }

    #[test]
    fn keys_parse_strictly() {
        for bad in [
            "2026-1", "2026-00", "0000-01", "2026/11", "202a-11", "+2026-11", "2026-11 ",
        ] {
            assert!(bad.parse::<PeriodKey>().is_err(), "{bad}");
        }
    }
}
