//! Time, injected: the service asks a [`Clock`], never the operating system directly, so tests
//! can drive a simulated month with a [`ManualClock`].

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};

/// The instant `by` after `instant`, or the last instant there is when that is later still
/// (a grace window or a lease configured to last for ever).
pub(crate) fn later(instant: DateTime<Utc>, by: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(by)
        .ok()
        .and_then(|by| instant.checked_add_signed(by))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A source of the current instant.
///
/// # Contract
/// - `now` MUST NOT go backwards between two calls on the same clock. The service tolerates a
///   clock that does (a wall clock stepped back by NTP), but leases and retry schedules are only
///   as good as the clock.
pub trait Clock: Send + Sync + Debug {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

/// The operating system's wall clock.
///
/// # Example
/// ```
/// use token_billing::{Clock, SystemClock};
///
/// let before = chrono::Utc::now();
/// assert!(SystemClock.now() >= before);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told, for tests and simulations. Clones share the same time.
///
/// # Example
/// ```
/// use chrono::{TimeZone, Utc};
/// use token_billing::{Clock, ManualClock};
///
/// let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap());
/// let shared = clock.clone();
/// clock.advance(chrono::Duration::days(1));
/// assert_eq!(shared.now(), Utc.with_ymd_and_hms(2026, 11, 2, 12, 0, 0).unwrap());
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock stopped at `now`.
    pub fn new(now: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Arc::new(Mutex::new(now)),
        }
    }

    /// Moves the clock to `now` (backwards too, to test how callers cope).
    pub fn set(&self, now: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod later_tests {
    use super::later;
    use chrono::{DateTime, Utc};
    use std::time::Duration;

    #[test]
    fn later_adds_and_saturates_at_the_last_instant() {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        assert_eq!(later(now, Duration::from_secs(90)), now + chrono::Duration::seconds(90));
        assert_eq!(later(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            later(DateTime::<Utc>::MAX_UTC, Duration::from_secs(1)),
            DateTime::<Utc>::MAX_UTC
        );
    }
}
