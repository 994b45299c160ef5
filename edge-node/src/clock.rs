//! Injected clock: wall time (`Timestamp`) and monotonic time (`Instant`), so
//! pure logic and tests never read the operating system's clock directly.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use schemas::time::Timestamp;

/// A source of time. Code that needs "now" takes a `&dyn Clock` (or an
/// `Arc<dyn Clock>`) instead of reading the system clock.
pub trait Clock: Send + Sync {
    /// Wall-clock time, milliseconds since the Unix epoch.
    fn now(&self) -> Timestamp;
    /// Monotonic time, for durations and deadlines.
    fn monotonic(&self) -> Instant;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    // The one place in the crate that reads the system's wall clock: every
    // other reader of time goes through `Clock`.
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Timestamp {
        let ms = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // A clock before 1970: report it as negative, the raw zone and
            // rollups flag it as not plausible.
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        Timestamp(ms)
    }

    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to; for tests.
///
/// Wall time and monotonic time advance together through [`ManualClock::advance`];
/// [`ManualClock::set_wall`] jumps wall time alone (a clock step or skew).
#[derive(Debug)]
pub struct ManualClock {
    inner: Mutex<ManualInner>,
}

#[derive(Debug, Clone, Copy)]
struct ManualInner {
    wall: Timestamp,
    mono: Instant,
}

impl ManualClock {
    /// A clock at wall time `start`; its monotonic origin is an arbitrary
    /// fixed instant taken at construction.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            inner: Mutex::new(ManualInner {
                wall: start,
                mono: Instant::now(),
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut ManualInner) -> R) -> R {
        // A poisoned lock only means another test thread panicked while
        // holding it; the two fields are still consistent.
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g)
    }

    /// Move both wall and monotonic time forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.with(|i| {
            i.wall = i
                .wall
                .saturating_add_ms(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            i.mono += d;
        });
    }

    /// Set wall time only (monotonic time does not go backwards).
    pub fn set_wall(&self, t: Timestamp) {
        self.with(|i| i.wall = t);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.with(|i| i.wall)
    }
    fn monotonic(&self) -> Instant {
        self.with(|i| i.mono)
    }
}

/// A clock that follows tokio's timer: under `tokio::time::pause()` it is
/// virtual and advances with the runtime's auto-advance, so simulations of
/// days run in seconds. Wall time is `start` plus the elapsed tokio time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start_wall: Timestamp,
    start_mono: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `start` now.
    pub fn new(start: Timestamp) -> Self {
        TokioClock {
            start_wall: start,
            start_mono: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.start_mono);
        self.start_wall
            .saturating_add_ms(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
    }
    fn monotonic(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp(1_000));
        let m0 = c.monotonic();
        assert_eq!(c.now(), Timestamp(1_000));
        c.advance(Duration::from_millis(250));
        assert_eq!(c.now(), Timestamp(1_250));
        assert_eq!(c.monotonic() - m0, Duration::from_millis(250));
        c.set_wall(Timestamp(5));
        assert_eq!(c.now(), Timestamp(5));
        assert_eq!(c.monotonic() - m0, Duration::from_millis(250));
    }

    #[test]
    fn system_clock_is_plausible() {
        assert!(SystemClock.now().is_plausible());
    }
}
