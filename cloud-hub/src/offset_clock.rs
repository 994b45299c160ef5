//! **Test only**: a hub wall clock shifted by an offset read from a file,
//! so the chaos runner can skew a running hub (`clock-skew` scenarios).
//!
//! `FIELDSYNC_CLOCK_OFFSET_FILE=<path>`: the file holds one integer,
//! milliseconds (may be negative); wall time = system time + offset.
//! Monotonic time (rate limits, timeouts) is not shifted. The file is
//! re-read every 200 ms; a missing file is offset 0; an unparsable one
//! keeps the last good offset and is warned about once. The edge has the
//! same mechanism in `edge_node::clock` (the crates share no clock type).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use schemas::time::Timestamp;

use crate::api::{Clock, SystemClock};

/// The environment variable naming the offset file.
pub const CLOCK_OFFSET_ENV: &str = "FIELDSYNC_CLOCK_OFFSET_FILE";

/// How often the refresher re-reads the file.
pub const OFFSET_REREAD: Duration = Duration::from_millis(200);

/// A clock over `inner` whose wall time is shifted by the file's offset.
#[derive(Debug)]
pub struct OffsetFileClock<C> {
    inner: C,
    path: PathBuf,
    offset_ms: AtomicI64,
    warned: AtomicBool,
}

impl<C: Clock> OffsetFileClock<C> {
    /// A clock over `inner` with the offset in `path`, read once now.
    pub fn new(inner: C, path: impl Into<PathBuf>) -> Self {
        let c = OffsetFileClock {
            inner,
            path: path.into(),
            offset_ms: AtomicI64::new(0),
            warned: AtomicBool::new(false),
        };
        // The first reading is logged by the caller ("active"), not as a change.
        c.reload(false);
        c
    }

    /// The offset file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The offset in force, milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Re-read the file; returns the offset in force afterwards.
    pub fn refresh(&self) -> i64 {
        self.reload(true)
    }

    fn reload(&self, log_change: bool) -> i64 {
        let next = match std::fs::read_to_string(&self.path) {
            Ok(text) => match text.trim().parse::<i64>() {
                Ok(v) => {
                    self.warned.store(false, Ordering::Relaxed);
                    Some(v)
                }
                Err(e) => {
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            path = %self.path.display(),
                            content = %text.trim(),
                            error = %e,
                            kept_ms = self.offset_ms(),
                            "clock offset file is not an integer of milliseconds; keeping the last offset"
                        );
                    }
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "clock offset file unreadable; keeping the last offset");
                }
                None
            }
        };
        if let Some(v) = next {
            let old = self.offset_ms.swap(v, Ordering::Relaxed);
            if old != v && log_change {
                tracing::warn!(
                    offset_ms = v,
                    previous_ms = old,
                    "TEST-ONLY clock offset changed"
                );
            }
        }
        self.offset_ms()
    }

    /// Re-read the file every [`OFFSET_REREAD`] until every other holder
    /// of the clock has dropped it.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OFFSET_REREAD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(c) = weak.upgrade() else { break };
                c.refresh();
            }
        })
    }
}

impl<C: Clock> Clock for OffsetFileClock<C> {
    fn now(&self) -> Timestamp {
        self.inner.now().saturating_add_ms(self.offset_ms())
    }
    fn monotonic(&self) -> Duration {
        self.inner.monotonic()
    }
}

/// The hub's clock: [`SystemClock`], or, when [`CLOCK_OFFSET_ENV`] is set,
/// an [`OffsetFileClock`] over it with its refresher running (logged
/// loudly). Call inside a tokio runtime.
pub fn from_env() -> Arc<dyn Clock> {
    match std::env::var_os(CLOCK_OFFSET_ENV) {
        Some(path) if !path.is_empty() => {
            let c = Arc::new(OffsetFileClock::new(SystemClock::default(), path));
            tracing::warn!(
                env = CLOCK_OFFSET_ENV,
                path = %c.path().display(),
                offset_ms = c.offset_ms(),
                "TEST-ONLY clock offset active: wall clock = system clock + offset from file (monotonic time unaffected)"
            );
            drop(c.spawn_refresher());
            c
        }
        _ => Arc::new(SystemClock::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ManualClock;

    #[test]
    fn offset_file_moves_wall_time_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let c = OffsetFileClock::new(ManualClock::new(1_700_000_000_000), &path);
        let m0 = c.monotonic();
        assert_eq!(c.now(), Timestamp(1_700_000_000_000));
        std::fs::write(&path, "-7200000").unwrap();
        assert_eq!(c.refresh(), -7_200_000);
        assert_eq!(c.now(), Timestamp(1_699_992_800_000));
        assert_eq!(c.monotonic(), m0);
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(c.refresh(), -7_200_000, "unparsable keeps the last offset");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.refresh(), 0, "missing file is no offset");
    }

    #[tokio::test]
    async fn the_refresher_follows_the_file_and_stops_with_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let c = Arc::new(OffsetFileClock::new(ManualClock::new(10_000), &path));
        let task = c.spawn_refresher();
        std::fs::write(&path, "-10000").unwrap();
        // Wait on the condition, with a deadline far above the 200 ms period.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while c.now() != Timestamp(0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "offset not picked up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("refresher outlived its clock")
            .unwrap();
    }
}
