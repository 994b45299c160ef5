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

impl<T: Clock + ?Sized> Clock for std::sync::Arc<T> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
    fn monotonic(&self) -> Instant {
        (**self).monotonic()
    }
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

use sync_core::clock_offset::OffsetFile;
pub use sync_core::clock_offset::{CLOCK_OFFSET_ENV, OFFSET_REREAD};

/// **Test only.** A wall clock shifted by an offset read from a file
/// ([`sync_core::clock_offset`]): `now() = inner.now() + offset_ms`.
/// Monotonic time is `inner`'s, untouched: control-loop periods and
/// timeouts never see the skew.
#[derive(Debug)]
pub struct OffsetFileClock<C> {
    inner: C,
    file: std::sync::Arc<OffsetFile>,
}

impl<C: Clock> OffsetFileClock<C> {
    /// A clock over `inner` with the offset in `path`, read once now.
    pub fn new(inner: C, path: impl Into<std::path::PathBuf>) -> Self {
        OffsetFileClock {
            inner,
            file: std::sync::Arc::new(OffsetFile::new(path)),
        }
    }

    /// The offset file.
    pub fn path(&self) -> &std::path::Path {
        self.file.path()
    }

    /// The offset in force, milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.file.offset_ms()
    }

    /// Re-read the file; returns the offset in force afterwards.
    pub fn refresh(&self) -> i64 {
        self.file.refresh()
    }

    /// Re-read the file every [`OFFSET_REREAD`] until the clock is dropped.
    pub fn spawn_refresher(&self) -> tokio::task::JoinHandle<()> {
        self.file.spawn_refresher()
    }
}

impl<C: Clock> Clock for OffsetFileClock<C> {
    fn now(&self) -> Timestamp {
        self.inner.now().saturating_add_ms(self.offset_ms())
    }
    fn monotonic(&self) -> Instant {
        self.inner.monotonic()
    }
}

/// The node's clock: [`SystemClock`], or, when [`CLOCK_OFFSET_ENV`] is set,
/// an [`OffsetFileClock`] over it with its refresher running (logged
/// loudly: a skewed clock is for chaos tests only). Call inside a tokio
/// runtime.
pub fn from_env() -> std::sync::Arc<dyn Clock> {
    match OffsetFile::from_env() {
        Some(file) => {
            let file = std::sync::Arc::new(file);
            file.log_active();
            drop(file.spawn_refresher());
            std::sync::Arc::new(OffsetFileClock {
                inner: SystemClock,
                file,
            })
        }
        None => std::sync::Arc::new(SystemClock),
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
    #[test]
    fn offset_file_moves_wall_time_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let inner = std::sync::Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
        let c = OffsetFileClock::new(inner.clone(), &path);
        let m0 = c.monotonic();
        // Missing file: no offset.
        assert_eq!(c.now(), Timestamp(1_700_000_000_000));
        std::fs::write(&path, "7200000\n").unwrap();
        assert_eq!(c.refresh(), 7_200_000);
        assert_eq!(c.now(), Timestamp(1_700_007_200_000));
        assert_eq!(
            c.monotonic(),
            m0,
            "monotonic time must not move with the offset"
        );
        // "Set to 1970": offset = 0 - real now.
        std::fs::write(&path, "-1700000000000").unwrap();
        c.refresh();
        assert_eq!(c.now(), Timestamp(0));
        assert!(!c.now().is_plausible());
        inner.advance(Duration::from_millis(500));
        assert_eq!(c.now(), Timestamp(500));
        assert_eq!(c.monotonic() - m0, Duration::from_millis(500));
        // Unparsable: keep the last value.
        std::fs::write(&path, "two hours").unwrap();
        assert_eq!(c.refresh(), -1_700_000_000_000);
        assert_eq!(c.now(), Timestamp(500));
        // Removed: back to 0.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.refresh(), 0);
        assert_eq!(c.now(), Timestamp(1_700_000_000_500));
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresher_picks_up_a_new_offset_within_its_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let c = std::sync::Arc::new(OffsetFileClock::new(
            ManualClock::new(Timestamp(10_000)),
            &path,
        ));
        let task = c.spawn_refresher();
        std::fs::write(&path, "-10000").unwrap();
        tokio::time::sleep(OFFSET_REREAD * 2).await;
        assert_eq!(c.now(), Timestamp(0));
        drop(c);
        tokio::time::sleep(OFFSET_REREAD * 2).await;
        assert!(task.is_finished(), "refresher outlived its clock");
    }
}
