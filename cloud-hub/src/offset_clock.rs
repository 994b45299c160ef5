//! **Test only**: a hub wall clock shifted by an offset read from a file
//! ([`sync_core::clock_offset`]), so the chaos runner can skew a running
//! hub (`clock-skew` scenarios). Monotonic time (rate limits, timeouts) is
//! not shifted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use schemas::time::Timestamp;
use sync_core::clock_offset::OffsetFile;
pub use sync_core::clock_offset::{CLOCK_OFFSET_ENV, OFFSET_REREAD};

use crate::api::{Clock, SystemClock};

/// A clock over `inner` whose wall time is shifted by the file's offset.
#[derive(Debug)]
pub struct OffsetFileClock<C> {
    inner: C,
    file: Arc<OffsetFile>,
}

impl<C: Clock> OffsetFileClock<C> {
    /// A clock over `inner` with the offset in `path`, read once now.
    pub fn new(inner: C, path: impl Into<PathBuf>) -> Self {
        OffsetFileClock {
            inner,
            file: Arc::new(OffsetFile::new(path)),
        }
    }

    /// The offset file.
    pub fn path(&self) -> &Path {
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
    fn monotonic(&self) -> Duration {
        self.inner.monotonic()
    }
}

/// The hub's clock: [`SystemClock`], or, when [`CLOCK_OFFSET_ENV`] is set,
/// an [`OffsetFileClock`] over it with its refresher running (logged
/// loudly). Call inside a tokio runtime.
pub fn from_env() -> Arc<dyn Clock> {
    match OffsetFile::from_env() {
        Some(file) => {
            let file = Arc::new(file);
            file.log_active();
            drop(file.spawn_refresher());
            Arc::new(OffsetFileClock {
                inner: SystemClock::default(),
                file,
            })
        }
        None => Arc::new(SystemClock::default()),
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
