//! Tick journal: an opt-in record of every control-loop tick
//! (`[control] tick_journal = true`), so an outside checker (the chaos
//! runner) can prove that no loop missed its period, instead of trusting
//! the jitter ring, which keeps only recent lateness.
//!
//! # The loop never waits on the file
//!
//! A tick is handed to a [`TickSender`] with a non-blocking `try_send` on a
//! bounded channel; a writer thread owns the file. When the channel is full
//! (the disk stalls), the tick is dropped and counted per loop. The writer
//! writes the running drop total of each loop into the file as soon as it
//! gets to run, so a reader knows that loop's record has holes (and must
//! not call a gap a stall, nor a pass).
//!
//! # File
//!
//! `{data_dir}/loop-ticks.log`, JSON lines ([`JournalLine`]), appended by
//! every incarnation of the process:
//!
//! - `{"kind":"start","wall_ms":W,"boot_ms":B}`: one per incarnation,
//!   first; monotonic times of the lines after it count from this moment
//!   (`mono_ms = 0`). `boot_ms` is the host's time since boot then
//!   (`/proc/uptime`, 10 ms resolution; absent where unreadable): unlike
//!   the node's wall clock it cannot be skewed or set to 1970, so an
//!   observer on the same host can place the incarnation on its own
//!   timeline ([`uptime_ms`]);
//! - `{"kind":"tick","loop":"room","mono_ms":M,"wall_ms":W}`: one per tick;
//! - `{"kind":"dropped","loop":"room","total":N,"mono_ms":M}`: ticks of
//!   that loop dropped so far in this incarnation.
//!
//! Each line is one `write` of the whole line, so a kill -9 can tear at most
//! the last line of an incarnation. Opening an existing file that does not
//! end in a newline starts with one, so the torn line stays on its own; the
//! reader ([`read_journal`]) skips a bad line directly before a `start`
//! line or the end of the file and counts it, and refuses any other bad
//! line. Lines reach the OS as they are written (no user-space buffer
//! survives a tick batch), but are not fsynced: a host crash may lose the
//! tail, a process kill does not.
//!
//! A write error is logged and counted ([`TickJournal::write_errors`]) and
//! the journal stops writing ticks; the loops are unaffected.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// The host's time since boot, ms, from `/proc/uptime` (`None` where that
/// cannot be read). Every process on a host sees the same value, and no
/// clock offset or wall-clock step moves it: the anchor that lets an
/// observer map one process's monotonic times onto another's.
pub fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs = text.split_whitespace().next()?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
    let whole: u64 = whole.parse().ok()?;
    let frac_ms: u64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    whole.checked_mul(1000)?.checked_add(frac_ms)
}

/// The journal's file name inside the data directory.
pub const TICK_JOURNAL_FILE: &str = "loop-ticks.log";

/// One line of the journal file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JournalLine {
    /// A process (incarnation) opened the journal.
    Start {
        /// Its wall clock then (the node's clock, ms since the epoch).
        wall_ms: i64,
        /// The host's time since boot then, ms (see [`uptime_ms`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_ms: Option<u64>,
    },
    /// One tick of one loop.
    Tick {
        /// The loop.
        #[serde(rename = "loop")]
        loop_name: String,
        /// Monotonic ms since this incarnation's `start` line.
        mono_ms: u64,
        /// The node's wall clock at the tick.
        wall_ms: i64,
    },
    /// Ticks of a loop dropped so far in this incarnation (queue full).
    Dropped {
        /// The loop.
        #[serde(rename = "loop")]
        loop_name: String,
        /// Running total in this incarnation.
        total: u64,
        /// Monotonic ms since `start` when the writer noticed.
        mono_ms: u64,
    },
}

/// Why the journal could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A file operation failed.
    #[error("tick journal {path}: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not a torn tail does not parse.
    #[error("tick journal {path}: line {line} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
    /// Bad capacity.
    #[error("tick journal: capacity must be at least 1")]
    Capacity,
}

struct Tick {
    name: Arc<str>,
    mono_ms: u64,
    wall_ms: i64,
}

type Registry = Arc<Mutex<Vec<(Arc<str>, Arc<AtomicU64>)>>>;

/// The writer side: owns the thread. Hand [`TickJournal::handle`] to the
/// loops; [`TickJournal::close`] after the loops stopped.
#[derive(Debug)]
pub struct TickJournal {
    handle: JournalHandle,
    stop: Arc<AtomicBool>,
    write_errors: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Creates per-loop [`TickSender`]s. Cheap to clone.
#[derive(Clone)]
pub struct JournalHandle {
    tx: SyncSender<Tick>,
    origin: Instant,
    registry: Registry,
}

impl std::fmt::Debug for JournalHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalHandle").finish_non_exhaustive()
    }
}

/// One loop's way into the journal: [`TickSender::record`] never blocks.
#[derive(Clone)]
pub struct TickSender {
    name: Arc<str>,
    tx: SyncSender<Tick>,
    origin: Instant,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for TickSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TickSender")
            .field("loop", &self.name)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl JournalHandle {
    /// A sender for loop `name` (its drops are counted separately).
    pub fn sender(&self, name: &str) -> TickSender {
        let dropped = Arc::new(AtomicU64::new(0));
        let name: Arc<str> = Arc::from(name);
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.clone(), dropped.clone()));
        TickSender {
            name,
            tx: self.tx.clone(),
            origin: self.origin,
            dropped,
        }
    }
}

impl TickSender {
    /// Queue one tick, taken at monotonic `mono` and wall `wall_ms`. Never
    /// waits: a full queue drops the tick and counts it.
    pub fn record(&self, mono: Instant, wall_ms: i64) {
        let mono_ms =
            u64::try_from(mono.saturating_duration_since(self.origin).as_millis()).unwrap_or(0);
        let t = Tick {
            name: self.name.clone(),
            mono_ms,
            wall_ms,
        };
        match self.tx.try_send(t) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Ticks of this loop dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl TickJournal {
    /// Open `path` for appending (creating it) and start the writer with a
    /// queue of `capacity` ticks. Writes this incarnation's `start` line.
    pub fn open(
        path: &Path,
        capacity: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<TickJournal, JournalError> {
        let io = |op, source| JournalError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| io("open", e))?;
        let len = f.metadata().map_err(|e| io("stat", e))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::Start(len - 1))
                .and_then(|_| f.read_exact(&mut last))
                .map_err(|e| io("read last byte", e))?;
            if last[0] != b'\n' {
                // A torn line from a killed incarnation: keep it on its own.
                f.write_all(b"\n").map_err(|e| io("write", e))?;
            }
        }
        Self::start(Box::new(f), capacity, clock, true)
    }

    /// Start a journal over any writer (tests inject a slow or failing
    /// one). Writes the `start` line first.
    pub fn with_writer(
        writer: Box<dyn Write + Send>,
        capacity: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<TickJournal, JournalError> {
        Self::start(writer, capacity, clock, false)
    }

    fn start(
        writer: Box<dyn Write + Send>,
        capacity: usize,
        clock: Arc<dyn Clock>,
        with_uptime: bool,
    ) -> Result<TickJournal, JournalError> {
        if capacity == 0 {
            return Err(JournalError::Capacity);
        }
        let (tx, rx) = sync_channel::<Tick>(capacity);
        let origin = clock.monotonic();
        let boot_ms = if with_uptime { uptime_ms() } else { None };
        let start_wall = clock.now().as_millis();
        let registry: Registry = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let write_errors = Arc::new(AtomicU64::new(0));
        let w = Writer {
            out: writer,
            rx,
            registry: registry.clone(),
            reported: BTreeMap::new(),
            clock,
            origin,
            stop: stop.clone(),
            write_errors: write_errors.clone(),
            failed: false,
        };
        let thread = std::thread::Builder::new()
            .name("tick-journal".into())
            .spawn(move || w.run(start_wall, boot_ms))
            .map_err(|source| JournalError::Io {
                op: "spawn writer thread",
                path: PathBuf::new(),
                source,
            })?;
        Ok(TickJournal {
            handle: JournalHandle {
                tx,
                origin,
                registry,
            },
            stop,
            write_errors,
            thread: Some(thread),
        })
    }

    /// Where loops get their senders.
    pub fn handle(&self) -> JournalHandle {
        self.handle.clone()
    }

    /// Write errors so far (the journal stops writing after the first).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// Ticks dropped so far, per loop.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (n, d) in self
            .handle
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            *out.entry(n.to_string()).or_insert(0) += d.load(Ordering::Relaxed);
        }
        out
    }

    /// Write what is queued (and the final drop totals) and stop the
    /// writer thread. Blocking; call it after the loops stopped.
    pub fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TickJournal {
    fn drop(&mut self) {
        // Not joined: the thread drains and ends on its own.
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Writer {
    out: Box<dyn Write + Send>,
    rx: Receiver<Tick>,
    registry: Registry,
    reported: BTreeMap<usize, u64>,
    clock: Arc<dyn Clock>,
    origin: Instant,
    stop: Arc<AtomicBool>,
    write_errors: Arc<AtomicU64>,
    failed: bool,
}

impl Writer {
    fn line(&mut self, l: &JournalLine) {
        if self.failed {
            return;
        }
        let mut text = serde_json::to_string(l).unwrap_or_default();
        text.push('\n');
        if let Err(e) = self.out.write_all(text.as_bytes()) {
            self.failed = true;
            self.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "tick journal write failed; no more ticks are journaled");
        }
    }

    fn report_drops(&mut self) {
        let now = u64::try_from(
            self.clock
                .monotonic()
                .saturating_duration_since(self.origin)
                .as_millis(),
        )
        .unwrap_or(0);
        let snapshot: Vec<(String, u64)> = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(n, d)| (n.to_string(), d.load(Ordering::Relaxed)))
            .collect();
        for (i, (name, total)) in snapshot.into_iter().enumerate() {
            if total > self.reported.get(&i).copied().unwrap_or(0) {
                self.reported.insert(i, total);
                self.line(&JournalLine::Dropped {
                    loop_name: name,
                    total,
                    mono_ms: now,
                });
            }
        }
    }

    fn tick(&mut self, t: Tick) {
        self.line(&JournalLine::Tick {
            loop_name: t.name.to_string(),
            mono_ms: t.mono_ms,
            wall_ms: t.wall_ms,
        });
    }

    fn run(mut self, start_wall: i64, boot_ms: Option<u64>) {
        self.line(&JournalLine::Start {
            wall_ms: start_wall,
            boot_ms,
        });
        let _ = self.out.flush();
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(t) => {
                    self.tick(t);
                    while let Ok(t) = self.rx.try_recv() {
                        self.tick(t);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.report_drops();
            let _ = self.out.flush();
            if self.stop.load(Ordering::SeqCst) {
                while let Ok(t) = self.rx.try_recv() {
                    self.tick(t);
                }
                break;
            }
        }
        self.report_drops();
        let _ = self.out.flush();
    }
}

/// One loop's record in the journal, over all incarnations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopJournal {
    /// Every tick: (incarnation index, monotonic ms since that
    /// incarnation's start, wall ms).
    pub ticks: Vec<(usize, u64, i64)>,
    /// Ticks dropped, summed over incarnations.
    pub dropped: u64,
}

/// One incarnation's `start` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalStart {
    /// The node's wall clock then.
    pub wall_ms: i64,
    /// The host's time since boot then, if recorded.
    pub boot_ms: Option<u64>,
}

/// Everything a journal file holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalContents {
    /// Each incarnation's start, in file order.
    pub starts: Vec<JournalStart>,
    /// Per loop.
    pub loops: BTreeMap<String, LoopJournal>,
    /// Torn lines skipped (a killed incarnation's last line).
    pub torn_lines: usize,
}

/// Read a journal file (of a stopped node, or a running one: a partial last
/// line is skipped as torn).
pub fn read_journal(path: &Path) -> Result<JournalContents, JournalError> {
    let bytes = std::fs::read(path).map_err(|source| JournalError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = JournalContents::default();
    // Drop totals are running per incarnation: keep the largest of each.
    let mut drops: BTreeMap<(String, usize), u64> = BTreeMap::new();
    for (i, raw) in lines.iter().enumerate() {
        if raw.is_empty() {
            continue;
        }
        let parsed: Result<JournalLine, _> = serde_json::from_str(raw);
        let line = match parsed {
            Ok(l) => l,
            Err(e) => {
                let next = lines[i + 1..].iter().find(|l| !l.is_empty());
                let before_start = next.is_none_or(|n| {
                    matches!(
                        serde_json::from_str::<JournalLine>(n),
                        Ok(JournalLine::Start { .. })
                    )
                });
                if before_start {
                    out.torn_lines += 1;
                    continue;
                }
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: e.to_string(),
                });
            }
        };
        match line {
            JournalLine::Start { wall_ms, boot_ms } => {
                out.starts.push(JournalStart { wall_ms, boot_ms })
            }
            JournalLine::Tick {
                loop_name,
                mono_ms,
                wall_ms,
            } => {
                let Some(inc) = out.starts.len().checked_sub(1) else {
                    return Err(JournalError::Corrupt {
                        path: path.to_path_buf(),
                        line: i + 1,
                        reason: "a tick before any start line".into(),
                    });
                };
                out.loops
                    .entry(loop_name)
                    .or_default()
                    .ticks
                    .push((inc, mono_ms, wall_ms));
            }
            JournalLine::Dropped {
                loop_name, total, ..
            } => {
                let inc = out.starts.len().saturating_sub(1);
                let e = drops.entry((loop_name.clone(), inc)).or_insert(0);
                *e = (*e).max(total);
                out.loops.entry(loop_name).or_default();
            }
        }
    }
    for ((name, _), n) in drops {
        if let Some(l) = out.loops.get_mut(&name) {
            l.dropped += n;
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use schemas::time::Timestamp;

    const T0: Timestamp = Timestamp(1_764_000_000_000);

    #[test]
    fn ticks_are_written_per_incarnation_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TICK_JOURNAL_FILE);
        let clock = Arc::new(ManualClock::new(T0));
        let j = TickJournal::open(&path, 16, clock.clone()).unwrap();
        let s = j.handle().sender("room");
        for _ in 0..5 {
            clock.advance(Duration::from_millis(1000));
            s.record(clock.monotonic(), clock.now().as_millis());
        }
        drop(s);
        j.close();
        // A killed incarnation's torn last line, then a second incarnation.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"kind\":\"tick\",\"lo")
            .unwrap();
        clock.advance(Duration::from_secs(60));
        let j = TickJournal::open(&path, 16, clock.clone()).unwrap();
        let s = j.handle().sender("room");
        clock.advance(Duration::from_millis(500));
        s.record(clock.monotonic(), clock.now().as_millis());
        drop(s);
        j.close();

        let c = read_journal(&path).unwrap();
        let walls: Vec<i64> = c.starts.iter().map(|s| s.wall_ms).collect();
        assert_eq!(walls, vec![T0.as_millis(), T0.as_millis() + 65_000]);
        // Opened on a real file: the host's uptime anchors each incarnation.
        let boots: Vec<u64> = c.starts.iter().map(|s| s.boot_ms.unwrap()).collect();
        assert!(boots[0] > 0 && boots[1] >= boots[0], "{boots:?}");
        let now = uptime_ms().unwrap();
        assert!(
            now >= boots[1] && now - boots[1] < 60_000,
            "{now} {boots:?}"
        );
        assert_eq!(c.torn_lines, 1);
        let room = &c.loops["room"];
        assert_eq!(room.dropped, 0);
        let monos: Vec<(usize, u64)> = room.ticks.iter().map(|t| (t.0, t.1)).collect();
        assert_eq!(
            monos,
            vec![
                (0, 1000),
                (0, 2000),
                (0, 3000),
                (0, 4000),
                (0, 5000),
                (1, 500)
            ]
        );
        assert_eq!(room.ticks[5].2, T0.as_millis() + 65_500);
    }

    #[test]
    fn a_corrupt_line_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TICK_JOURNAL_FILE);
        std::fs::write(
            &path,
            "{\"kind\":\"start\",\"wall_ms\":1}\ngarbage\n{\"kind\":\"tick\",\"loop\":\"a\",\"mono_ms\":1,\"wall_ms\":2}\n",
        )
        .unwrap();
        let e = read_journal(&path).unwrap_err();
        assert!(matches!(e, JournalError::Corrupt { line: 2, .. }), "{e}");
    }

    /// A writer that blocks every write until released.
    #[derive(Clone)]
    struct Stalled {
        gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
        buf: Arc<Mutex<Vec<u8>>>,
    }

    impl Stalled {
        fn new() -> Self {
            Stalled {
                gate: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
                buf: Arc::default(),
            }
        }
        fn release(&self) {
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut open = self.gate.0.lock().unwrap();
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
            self.buf.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_without_blocking_the_sender() {
        let clock = Arc::new(ManualClock::new(T0));
        let w = Stalled::new();
        let j = TickJournal::with_writer(Box::new(w.clone()), 4, clock.clone()).unwrap();
        let s = j.handle().sender("room");
        // The writer is stuck on the start line: 4 ticks fit, the rest drop,
        // and recording returns at once every time.
        for _ in 0..100 {
            clock.advance(Duration::from_millis(10));
            s.record(clock.monotonic(), clock.now().as_millis());
        }
        assert_eq!(s.dropped(), 96);
        assert_eq!(j.dropped()["room"], 96);
        w.release();
        drop(s);
        j.close();
        let text = String::from_utf8(w.buf.lock().unwrap().clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.log");
        std::fs::write(&path, text).unwrap();
        let c = read_journal(&path).unwrap();
        let room = &c.loops["room"];
        assert_eq!((room.ticks.len(), room.dropped), (4, 96));
    }

    struct NullActuator;

    impl crate::control::Actuator for NullActuator {
        fn try_actuate(
            &self,
            _on: bool,
        ) -> Result<crate::modbus::WriteReply, crate::modbus::WriteError> {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(Ok(()));
            Ok(rx)
        }
    }

    fn room_loop() -> schemas::config::LoopConfig {
        schemas::config::LoopConfig::Thermostat {
            name: "room".into(),
            device: schemas::ids::DeviceId::new("cold-room-1").unwrap(),
            sensor: "temp".into(),
            output: "compressor".into(),
            period_ms: 100,
            fail_safe: schemas::config::FailSafe::On,
            default_setpoint: 4.0,
            default_hysteresis: 2.0,
            min_on_s: 0,
            min_off_s: 0,
        }
    }

    /// The real runner under paused tokio time, its journal's writer stuck:
    /// the loop keeps its period (one state update per tick), the journal
    /// takes what fits and counts the rest; once the writer moves, every
    /// tick is either in the file or counted as dropped there.
    #[tokio::test(start_paused = true)]
    async fn a_loop_keeps_ticking_while_its_journal_writer_is_stalled() {
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::TokioClock::new(T0));
        let w = Stalled::new();
        let j = TickJournal::with_writer(Box::new(w.clone()), 8, clock.clone()).unwrap();
        let cfg = room_loop();
        let (_params_tx, params_rx) =
            tokio::sync::watch::channel(crate::control::LoopParams::from_config(&cfg));
        let (ev_tx, _ev_rx) = tokio::sync::mpsc::channel(1000);
        let runner = crate::control::spawn_loop_journaled(
            &cfg,
            params_rx,
            crate::modbus::LatestValues::new(),
            Arc::new(NullActuator),
            clock.clone(),
            ev_tx,
            crate::control::LoopOptions::default(),
            Some(&j.handle()),
        )
        .unwrap();
        // 50 periods of virtual time.
        tokio::time::sleep(Duration::from_millis(4_950)).await;
        let ticks = runner.jitter().unwrap().count;
        assert_eq!(
            ticks, 50,
            "the loop missed ticks while the journal was stalled"
        );
        let dropped = runner.journal_dropped().unwrap();
        assert_eq!(dropped, ticks - 8);
        runner.stop().await;
        w.release();
        tokio::task::spawn_blocking(move || j.close())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.log");
        std::fs::write(&path, w.buf.lock().unwrap().clone()).unwrap();
        let c = read_journal(&path).unwrap();
        let room = &c.loops["room"];
        assert_eq!(room.ticks.len() as u64 + room.dropped, ticks);
        // Journaled ticks are one period apart on the monotonic clock.
        assert!(room.ticks.windows(2).all(|w| w[1].1 - w[0].1 == 100));
    }
}
