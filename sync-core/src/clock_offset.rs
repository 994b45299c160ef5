//! **Test only**: a wall-clock offset read from a file, so a harness (the
//! chaos runner's `clock-skew` scenarios) can skew a running node's wall
//! clock. Both binaries wrap it in their own clock type
//! (`edge_node::clock::OffsetFileClock`, `cloud_hub::offset_clock`).
//!
//! `FIELDSYNC_CLOCK_OFFSET_FILE=<path>`: the file holds one integer,
//! milliseconds (may be negative); wall time = system time + offset.
//! Monotonic time is never shifted. The file is re-read every 200 ms; a
//! missing file is offset 0; an unparsable or unreadable one keeps the last
//! good offset and is warned about once (until it parses again).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// The environment variable naming the offset file.
pub const CLOCK_OFFSET_ENV: &str = "FIELDSYNC_CLOCK_OFFSET_FILE";

/// How often [`OffsetFile::spawn_refresher`] re-reads the file.
pub const OFFSET_REREAD: Duration = Duration::from_millis(200);

/// The offset in force, and the file it comes from.
#[derive(Debug)]
pub struct OffsetFile {
    path: PathBuf,
    offset_ms: AtomicI64,
    warned: AtomicBool,
}

impl OffsetFile {
    /// The offset in `path`, read once now (not logged as a change: the
    /// caller logs the first reading as "active").
    pub fn new(path: impl Into<PathBuf>) -> OffsetFile {
        let f = OffsetFile {
            path: path.into(),
            offset_ms: AtomicI64::new(0),
            warned: AtomicBool::new(false),
        };
        f.reload(false);
        f
    }

    /// The file named by [`CLOCK_OFFSET_ENV`], if set and not empty.
    pub fn from_env() -> Option<OffsetFile> {
        match std::env::var_os(CLOCK_OFFSET_ENV) {
            Some(p) if !p.is_empty() => Some(OffsetFile::new(p)),
            _ => None,
        }
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

    /// Log loudly that the offset is in force (once, at start).
    pub fn log_active(&self) {
        tracing::warn!(
            env = CLOCK_OFFSET_ENV,
            path = %self.path.display(),
            offset_ms = self.offset_ms(),
            "TEST-ONLY clock offset active: wall clock = system clock + offset from file (monotonic time unaffected)"
        );
    }

    /// Re-read the file every [`OFFSET_REREAD`] until every other holder
    /// has dropped it. Call inside a tokio runtime.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OFFSET_REREAD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(f) = weak.upgrade() else { break };
                f.refresh();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_zero_and_garbage_keeps_the_last_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let f = OffsetFile::new(&path);
        assert_eq!(f.offset_ms(), 0);
        std::fs::write(&path, " -7200000\n").unwrap();
        assert_eq!(f.refresh(), -7_200_000);
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(f.refresh(), -7_200_000);
        std::fs::write(&path, "5").unwrap();
        assert_eq!(f.refresh(), 5);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(f.refresh(), 0);
    }
}
