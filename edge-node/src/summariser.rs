//! Summariser: turns raw-zone samples into per-window rollups, exactly once.
//!
//! A sans-IO state machine: samples go in with their raw-zone seq
//! ([`Summariser::handle_sample`]), batches of rollups to write come out
//! ([`Summariser::poll_flush`]), time is passed in as `now`. The caller
//! writes the batch (later: into the day's telemetry document through
//! sync-core; here through any [`RollupSink`]), persists the batch's
//! [`Checkpoint`], then calls [`Summariser::handle_flushed`].
//!
//! # Exactly once
//!
//! A rollup is never an increment. Each flush *overwrites* the whole rollup
//! of every dirty window, keyed by [`RollupKey`]
//! `(device, metric, window_start, clock_unsynced)`, and the rollup is a
//! deterministic function of the raw samples of that window (folded in seq
//! order). Writing it twice is harmless; re-summarising after a crash
//! rewrites the same value. So no sample is lost or counted twice, provided
//! the in-memory window is complete when it is written. That is what the
//! checkpoint guarantees:
//!
//! - Windows are kept in memory while they may still receive samples: until
//!   their start falls below the *eviction watermark* `evicted_below`
//!   (`now - late_horizon`, rounded to a window), advanced only at a flush,
//!   after which nothing is dirty. Eviction is by watermark, so "evicted" is
//!   one number, persisted in the checkpoint.
//! - A window still in memory whose first sample is more than
//!   `max_replay_samples` seqs old is *frozen* at a flush (evicted and listed
//!   in the checkpoint), so a window stamped far in the future cannot pin
//!   the replay point, and with it the raw zone's retention, for ever.
//! - A sample whose window is below the watermark (or frozen) is *too late* for its main
//!   rollup (the window is no longer in memory and rebuilding it would need
//!   samples we no longer hold). It still lands in its own window: it is
//!   written as a one-sample part keyed `(.., late_seq: Some(seq))`, which is
//!   again idempotent. Readers merge a window's parts with
//!   [`Rollup::merge`] (see [`merge_parts`]).
//! - After every flush nothing is dirty, so the checkpoint says: every seq
//!   `< flushed_before` is in a written rollup; and `replay_from` is the
//!   smallest seq of any window still in memory (or `flushed_before`).
//! - **Restart**: [`Summariser::resume`] with the last persisted checkpoint,
//!   then feed every raw sample from [`Summariser::replay_from`] on. A
//!   sample with seq `< flushed_before` rebuilds its window's state without
//!   dirtying it (or is skipped if its window is below the watermark: it is
//!   already written, as a main rollup or a late part). Every window above
//!   the watermark had all its samples at seqs `>= replay_from`, so it is
//!   rebuilt complete before anything new dirties it. Samples after
//!   `flushed_before` are classified against the same watermark as before
//!   the crash (the watermark only moves at flushes, and the checkpoint of a
//!   flush must be persisted before the next flush is taken; the state
//!   machine enforces this with [`Summariser::handle_flushed`]). No flush
//!   is taken while the replay is below `flushed_before`
//!   ([`Summariser::replaying`]), and `flushed_before` never goes back.
//! - Late samples (timestamps out of order relative to seq) are fine: the
//!   window is chosen by sample timestamp, whatever the seq.
//! - The raw zone must keep every seq `>= replay_from`: pass it as
//!   `keep_from` to `RawZone::enforce_retention`.
//!
//! # Wrong clocks
//!
//! A sample whose timestamp is not plausible (the box booted in 1970) goes to
//! a separate lane: its rollups carry `clock_unsynced = true`,
//! [`RollupKey::day`] is `None`, and the caller must not file them under a
//! calendar day (keep them in an "unsynced" bucket). The unsynced lane's
//! watermark follows the newest unsynced timestamp seen; once the clock is
//! plausible again and no unsynced sample arrived since the last flush, the
//! whole lane is evicted (watermark = +inf; stragglers become late parts).
//!
//! Correcting them (designed, not built): the clock module detects the step
//! (wall time jumps while monotonic time does not) and learns
//! `offset = wall_after - wall_before` at one monotonic instant, plus the
//! raw-zone seq range written under the bad clock. The caller then re-reads
//! that seq range, shifts each timestamp by the offset and feeds the
//! corrected samples to a second summariser instance whose rollups go to the
//! right days, and deletes the unsynced parts. This needs the offset (and
//! the boot it applies to) persisted with the seq range, which `schemas`
//! does not carry yet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use schemas::ids::DeviceId;
use schemas::metrics::{Rollup, Sample, Unit};
use schemas::time::{Day, Timestamp};
use schemas::version::SchemaVersion;
use serde::{Deserialize, Serialize};

use crate::raw_zone::Seq;

/// Why the summariser refused an input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SummariserError {
    /// Samples must be fed in increasing seq order, each once.
    #[error("sample seq {got} is not after the last one handled ({next} expected or later)")]
    SeqNotIncreasing { got: Seq, next: Seq },
    /// Bad configuration.
    #[error("summariser config: {0}")]
    Config(String),
}

/// Why a checkpoint file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("checkpoint {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a checkpoint this build understands.
    #[error("checkpoint {path}: {reason}")]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Tuning of the summariser.
#[derive(Debug, Clone, PartialEq)]
pub struct SummariserConfig {
    /// Window length (default 60 s).
    pub window_ms: i64,
    /// Flush dirty open windows at least this often.
    pub flush_interval_ms: i64,
    /// Keep windows in memory this long after `now` passed them; later
    /// samples become late parts. Restart replays about this much raw data.
    pub late_horizon_ms: i64,
    /// Freeze a window (write later samples of it as parts) once its first
    /// sample is this many seqs behind, so no window (one stamped far in
    /// the future by a clock that jumped back, say) pins the replay point
    /// and the raw zone's retention.
    pub max_replay_samples: u64,
}

impl Default for SummariserConfig {
    fn default() -> Self {
        SummariserConfig {
            window_ms: 60_000,
            flush_interval_ms: 10_000,
            late_horizon_ms: 3_600_000,
            max_replay_samples: 10_000_000,
        }
    }
}

impl SummariserConfig {
    /// From the edge config's `[summariser]` section, other fields default.
    pub fn from_config(s: &schemas::config::SummariserSection) -> Self {
        SummariserConfig {
            window_ms: i64::try_from(s.window_s.saturating_mul(1000)).unwrap_or(i64::MAX),
            ..SummariserConfig::default()
        }
    }

    fn validate(&self) -> Result<(), SummariserError> {
        if self.window_ms <= 0 {
            return Err(SummariserError::Config(format!(
                "window_ms must be positive, got {}",
                self.window_ms
            )));
        }
        if self.flush_interval_ms <= 0 || self.late_horizon_ms < 0 {
            return Err(SummariserError::Config(
                "flush_interval_ms must be positive and late_horizon_ms not negative".into(),
            ));
        }
        Ok(())
    }
}

/// What the caller persists after a flush is durably written, and resumes
/// from after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub schema_version: SchemaVersion,
    /// Every sample with a smaller seq is in a written rollup.
    pub flushed_before: Seq,
    /// Replay the raw zone from this seq on restart.
    pub replay_from: Seq,
    /// Windows starting before this (ms) are evicted (synced lane).
    pub evicted_below: i64,
    /// Same for the unsynced-clock lane.
    pub evicted_below_unsynced: i64,
    /// Windows above the watermarks that were evicted anyway (frozen, see
    /// [`SummariserConfig::max_replay_samples`]).
    #[serde(default)]
    pub frozen: Vec<FrozenWindow>,
}

/// A window evicted above its lane's watermark: its later samples are
/// written as parts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrozenWindow {
    pub device: DeviceId,
    pub metric: String,
    pub window_start: i64,
    pub clock_unsynced: bool,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            schema_version: SchemaVersion::default(),
            flushed_before: 0,
            replay_from: 0,
            evicted_below: i64::MIN,
            evicted_below_unsynced: i64::MIN,
            frozen: Vec::new(),
        }
    }
}

impl Checkpoint {
    /// Write atomically (temp file, fsync, rename, fsync dir).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        use std::io::Write;
        let io = |op, source| CheckpointError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let json = serde_json::to_vec(self).map_err(|e| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("create temp file", e))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write temp file", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("fsync dir", e))?;
        }
        Ok(())
    }

    /// Read a checkpoint; `None` if the file does not exist (a fresh node).
    pub fn load(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CheckpointError::Invalid {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Where a rollup is written. Writing the same key again overwrites.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey {
    pub device: DeviceId,
    pub metric: String,
    pub window_start: Timestamp,
    /// The window is in node-local time, not wall time.
    pub clock_unsynced: bool,
    /// `None` for a window's main rollup; `Some(seq)` for the one-sample
    /// part of a sample that arrived after its window was evicted.
    pub late_seq: Option<Seq>,
}

impl RollupKey {
    /// The UTC day whose telemetry document this rollup belongs to; `None`
    /// for unsynced-clock windows, which must not be filed under a day.
    pub fn day(&self) -> Option<Day> {
        (!self.clock_unsynced).then(|| self.window_start.day())
    }
}

/// One rollup to write (overwrite) at its key.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupWrite {
    pub key: RollupKey,
    pub rollup: Rollup,
}

/// A batch to write, then persist `checkpoint`, then call
/// [`Summariser::handle_flushed`].
#[derive(Debug, Clone, PartialEq)]
pub struct Flush {
    pub writes: Vec<RollupWrite>,
    pub checkpoint: Checkpoint,
}

/// Where rollups go (the telemetry documents, later through sync-core).
/// `write_rollups` returns once the batch is durable.
pub trait RollupSink {
    /// Why a batch could not be written.
    type Error;
    /// Overwrite each key with its rollup, durably.
    fn write_rollups(&mut self, writes: &[RollupWrite]) -> Result<(), Self::Error>;
}

/// An in-memory [`RollupSink`] keyed by [`RollupKey`], for tests and benches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryRollupStore {
    pub rollups: BTreeMap<RollupKey, Rollup>,
}

impl RollupSink for MemoryRollupStore {
    type Error = std::convert::Infallible;
    fn write_rollups(&mut self, writes: &[RollupWrite]) -> Result<(), Self::Error> {
        for w in writes {
            self.rollups.insert(w.key.clone(), w.rollup.clone());
        }
        Ok(())
    }
}

/// A window's identity without the part: `(device, metric, window_start,
/// clock_unsynced)`.
pub type WindowKey = (DeviceId, String, Timestamp, bool);

/// Merge a window's main rollup and late parts into one rollup per window.
pub fn merge_parts<'a>(
    rollups: impl IntoIterator<Item = (&'a RollupKey, &'a Rollup)>,
) -> BTreeMap<WindowKey, Rollup> {
    let mut out: BTreeMap<WindowKey, Rollup> = BTreeMap::new();
    for (k, r) in rollups {
        let wk = (
            k.device.clone(),
            k.metric.clone(),
            k.window_start,
            k.clock_unsynced,
        );
        match out.get_mut(&wk) {
            Some(acc) => acc.merge(r),
            None => {
                out.insert(wk, r.clone());
            }
        }
    }
    out
}

/// Reference: the rollups of `samples` computed in one pass, folded in the
/// order given (give them in seq order).
pub fn summarise_all<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
    window_ms: i64,
) -> BTreeMap<WindowKey, Rollup> {
    let mut out: BTreeMap<WindowKey, Agg> = BTreeMap::new();
    for s in samples {
        let unsynced = !s.ts.is_plausible();
        let ws = s.ts.window_start(window_ms);
        out.entry((s.device.clone(), s.metric.clone(), ws, unsynced))
            .and_modify(|a| a.add(s))
            .or_insert_with(|| Agg::new(s));
    }
    out.into_iter()
        .map(|(k, a)| {
            let r = a.rollup(&k.0, &k.1, k.2, window_ms, k.3);
            (k, r)
        })
        .collect()
}

/// Running aggregate of one window.
#[derive(Debug, Clone)]
struct Agg {
    unit: Unit,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    first: f64,
    first_ts: Timestamp,
    last: f64,
    last_ts: Timestamp,
}

impl Agg {
    fn new(s: &Sample) -> Agg {
        Agg {
            unit: s.unit,
            count: 1,
            min: s.value,
            max: s.value,
            sum: s.value,
            first: s.value,
            first_ts: s.ts,
            last: s.value,
            last_ts: s.ts,
        }
    }

    /// Same tie-breaks as [`Rollup::merge`].
    fn add(&mut self, s: &Sample) {
        self.count += 1;
        self.min = self.min.min(s.value);
        self.max = self.max.max(s.value);
        self.sum += s.value;
        if (s.ts, s.value) < (self.first_ts, self.first) {
            self.first = s.value;
            self.first_ts = s.ts;
        }
        if (s.ts, s.value) > (self.last_ts, self.last) {
            self.last = s.value;
            self.last_ts = s.ts;
        }
    }

    fn rollup(
        &self,
        device: &DeviceId,
        metric: &str,
        window_start: Timestamp,
        window_ms: i64,
        unsynced: bool,
    ) -> Rollup {
        Rollup {
            schema_version: SchemaVersion::default(),
            device: device.clone(),
            metric: metric.to_string(),
            unit: self.unit,
            window_start,
            window_ms,
            count: self.count,
            min: self.min,
            max: self.max,
            sum: self.sum,
            first: self.first,
            first_ts: self.first_ts,
            last: self.last,
            last_ts: self.last_ts,
            clock_unsynced: unsynced,
        }
    }
}

#[derive(Debug)]
struct Window {
    agg: Agg,
    first_seq: Seq,
    dirty: bool,
}

#[derive(Debug)]
struct Series {
    device: DeviceId,
    metric: String,
    /// Per lane (0 synced, 1 unsynced): windows by start ms.
    lanes: [BTreeMap<i64, Window>; 2],
}

/// The summariser state machine. See the module docs for the protocol.
#[derive(Debug)]
pub struct Summariser {
    cfg: SummariserConfig,
    index: HashMap<DeviceId, HashMap<String, usize>>,
    series: Vec<Series>,
    /// (series, lane, window start) of dirty windows.
    dirty: Vec<(usize, usize, i64)>,
    /// Late samples waiting for the next flush.
    late: Vec<(Seq, Sample)>,
    /// Next seq expected at least.
    next_seq: Seq,
    ck: Checkpoint,
    /// (series, lane, window start) of frozen windows (mirrors `ck.frozen`).
    frozen: HashSet<(usize, usize, i64)>,
    /// Newest unsynced timestamp seen (the unsynced lane's clock).
    max_unsynced_ts: Option<i64>,
    unsynced_since_flush: bool,
    last_flush: Option<Timestamp>,
    awaiting_ack: bool,
}

impl Summariser {
    /// A summariser for a node with nothing summarised yet.
    pub fn new(cfg: SummariserConfig) -> Result<Summariser, SummariserError> {
        Summariser::resume(cfg, Checkpoint::default())
    }

    /// Resume after a restart from the last persisted checkpoint. Feed it
    /// every raw sample from [`Summariser::replay_from`] on, in seq order.
    pub fn resume(cfg: SummariserConfig, ck: Checkpoint) -> Result<Summariser, SummariserError> {
        cfg.validate()?;
        let mut sm = Summariser {
            cfg,
            index: HashMap::new(),
            series: Vec::new(),
            dirty: Vec::new(),
            late: Vec::new(),
            next_seq: ck.replay_from,
            ck,
            frozen: HashSet::new(),
            max_unsynced_ts: None,
            unsynced_since_flush: false,
            last_flush: None,
            awaiting_ack: false,
        };
        for f in sm.ck.frozen.clone() {
            let idx = sm.series_index(&f.device, &f.metric);
            sm.frozen
                .insert((idx, usize::from(f.clock_unsynced), f.window_start));
        }
        Ok(sm)
    }

    /// The seq to start reading the raw zone from after [`Summariser::resume`].
    pub fn replay_from(&self) -> Seq {
        self.ck.replay_from
    }

    /// The smallest seq the next sample may have.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// The last checkpoint (persisted or about to be).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ck
    }

    /// Windows currently held in memory.
    pub fn windows_in_memory(&self) -> usize {
        self.series
            .iter()
            .map(|s| s.lanes[0].len() + s.lanes[1].len())
            .sum()
    }

    /// Take one raw sample. Samples must come in increasing seq order (gaps
    /// are fine).
    pub fn handle_sample(&mut self, seq: Seq, s: &Sample) -> Result<(), SummariserError> {
        if seq < self.next_seq {
            return Err(SummariserError::SeqNotIncreasing {
                got: seq,
                next: self.next_seq,
            });
        }
        self.next_seq = seq + 1;
        let replaying = seq < self.ck.flushed_before;
        let lane = usize::from(!s.ts.is_plausible());
        if lane == 1 {
            self.max_unsynced_ts = Some(self.max_unsynced_ts.map_or(s.ts.0, |m| m.max(s.ts.0)));
            if !replaying {
                self.unsynced_since_flush = true;
            }
        }
        let ws = s.ts.window_start(self.cfg.window_ms).0;
        let watermark = if lane == 0 {
            self.ck.evicted_below
        } else {
            self.ck.evicted_below_unsynced
        };
        let idx = self.series_index(&s.device, &s.metric);
        if ws < watermark || (!self.frozen.is_empty() && self.frozen.contains(&(idx, lane, ws))) {
            // Too late for the window's main rollup: already written (when
            // replaying) or to be written as its own part.
            if !replaying {
                self.late.push((seq, s.clone()));
            }
            return Ok(());
        }
        let windows = &mut self.series[idx].lanes[lane];
        let w = match windows.entry(ws) {
            std::collections::btree_map::Entry::Vacant(v) => v.insert(Window {
                agg: Agg::new(s),
                first_seq: seq,
                dirty: false,
            }),
            std::collections::btree_map::Entry::Occupied(o) => {
                let w = o.into_mut();
                w.agg.add(s);
                w
            }
        };
        if !replaying && !w.dirty {
            w.dirty = true;
            self.dirty.push((idx, lane, ws));
        }
        Ok(())
    }

    fn series_index(&mut self, device: &DeviceId, metric: &str) -> usize {
        if let Some(i) = self.index.get(device).and_then(|m| m.get(metric)) {
            return *i;
        }
        let i = self.series.len();
        self.series.push(Series {
            device: device.clone(),
            metric: metric.to_string(),
            lanes: [BTreeMap::new(), BTreeMap::new()],
        });
        self.index
            .entry(device.clone())
            .or_default()
            .insert(metric.to_string(), i);
        i
    }

    /// Rollups to write now, if any: when a dirty window has closed, a late
    /// sample is waiting, or `flush_interval_ms` passed since the last flush.
    /// Every dirty window is written in one batch. Returns `None` while the
    /// previous flush is not yet acknowledged with
    /// [`Summariser::handle_flushed`].
    pub fn poll_flush(&mut self, now: Timestamp) -> Option<Flush> {
        if self.awaiting_ack || self.replaying() {
            return None;
        }
        let w = self.cfg.window_ms;
        let lane_now = |lane: usize| {
            if lane == 0 {
                now.0
            } else {
                self.max_unsynced_ts.unwrap_or(i64::MIN)
            }
        };
        let closed = self
            .dirty
            .iter()
            .any(|&(_, lane, ws)| ws.saturating_add(w) <= lane_now(lane));
        let interval = self
            .last_flush
            .is_none_or(|t| now.0.saturating_sub(t.0) >= self.cfg.flush_interval_ms);
        let lane1_idle = now.is_plausible()
            && !self.unsynced_since_flush
            && self.ck.evicted_below_unsynced != i64::MAX
            && self.series.iter().any(|s| !s.lanes[1].is_empty());
        let something = !self.dirty.is_empty() || !self.late.is_empty();
        if !(something && (closed || interval || !self.late.is_empty()) || lane1_idle) {
            return None;
        }
        self.flush(now)
    }

    /// Write everything dirty now, whatever the time (e.g. at shutdown).
    /// `None` if nothing is dirty or a flush awaits its acknowledgement.
    pub fn force_flush(&mut self, now: Timestamp) -> Option<Flush> {
        if self.awaiting_ack || self.replaying() {
            return None;
        }
        if self.dirty.is_empty() && self.late.is_empty() {
            return None;
        }
        self.flush(now)
    }

    /// Still replaying samples that were already flushed before a restart:
    /// no flush may be taken until the replay has caught up, or the
    /// checkpoint would claim less than what is already written.
    pub fn replaying(&self) -> bool {
        self.next_seq < self.ck.flushed_before
    }

    fn flush(&mut self, now: Timestamp) -> Option<Flush> {
        let w = self.cfg.window_ms;
        let mut writes = Vec::with_capacity(self.dirty.len() + self.late.len());
        for (idx, lane, ws) in self.dirty.drain(..) {
            let s = &mut self.series[idx];
            if let Some(win) = s.lanes[lane].get_mut(&ws) {
                win.dirty = false;
                let key = RollupKey {
                    device: s.device.clone(),
                    metric: s.metric.clone(),
                    window_start: Timestamp(ws),
                    clock_unsynced: lane == 1,
                    late_seq: None,
                };
                let rollup = win
                    .agg
                    .rollup(&s.device, &s.metric, Timestamp(ws), w, lane == 1);
                writes.push(RollupWrite { key, rollup });
            }
        }
        for (seq, s) in self.late.drain(..) {
            let unsynced = !s.ts.is_plausible();
            let mut rollup = Rollup::of_sample(&s, w);
            rollup.clock_unsynced = unsynced;
            writes.push(RollupWrite {
                key: RollupKey {
                    device: s.device.clone(),
                    metric: s.metric.clone(),
                    window_start: rollup.window_start,
                    clock_unsynced: unsynced,
                    late_seq: Some(seq),
                },
                rollup,
            });
        }
        // Nothing is dirty now: advance the watermarks and evict.
        let horizon = self.cfg.late_horizon_ms;
        let e0 = Timestamp(now.0.saturating_sub(horizon)).window_start(w).0;
        self.ck.evicted_below = self.ck.evicted_below.max(e0);
        if now.is_plausible() && !self.unsynced_since_flush && self.max_unsynced_ts.is_some() {
            self.ck.evicted_below_unsynced = i64::MAX;
        } else if let Some(m) = self.max_unsynced_ts {
            let e1 = Timestamp(m.saturating_sub(horizon)).window_start(w).0;
            self.ck.evicted_below_unsynced = self.ck.evicted_below_unsynced.max(e1);
        }
        let marks = [self.ck.evicted_below, self.ck.evicted_below_unsynced];
        // Frozen windows below a watermark are covered by it now.
        self.frozen.retain(|&(_, lane, ws)| ws >= marks[lane]);
        let freeze_before = self.next_seq.saturating_sub(self.cfg.max_replay_samples);
        let mut replay_from = self.next_seq;
        for (idx, s) in self.series.iter_mut().enumerate() {
            for (lane, windows) in s.lanes.iter_mut().enumerate() {
                if marks[lane] == i64::MAX {
                    windows.clear();
                } else {
                    *windows = windows.split_off(&marks[lane]);
                }
                windows.retain(|&ws, win| {
                    if win.first_seq < freeze_before {
                        self.frozen.insert((idx, lane, ws));
                        false
                    } else {
                        true
                    }
                });
                for win in windows.values() {
                    replay_from = replay_from.min(win.first_seq);
                }
            }
        }
        let mut frozen: Vec<FrozenWindow> = self
            .frozen
            .iter()
            .map(|&(idx, lane, ws)| FrozenWindow {
                device: self.series[idx].device.clone(),
                metric: self.series[idx].metric.clone(),
                window_start: ws,
                clock_unsynced: lane == 1,
            })
            .collect();
        frozen.sort();
        self.ck.frozen = frozen;
        self.ck.flushed_before = self.ck.flushed_before.max(self.next_seq);
        self.ck.replay_from = replay_from;
        self.unsynced_since_flush = false;
        self.last_flush = Some(now);
        self.awaiting_ack = true;
        Some(Flush {
            writes,
            checkpoint: self.ck.clone(),
        })
    }

    /// The last flush's rollups are durably written and its checkpoint
    /// persisted: the next flush may be taken.
    pub fn handle_flushed(&mut self) {
        self.awaiting_ack = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_040_000; // a window boundary (multiple of 60 s)

    fn s(ts: i64, v: f64) -> Sample {
        Sample {
            schema_version: SchemaVersion::default(),
            device: DeviceId::new("d").unwrap(),
            metric: "m".into(),
            ts: Timestamp(ts),
            value: v,
            unit: Unit::None,
        }
    }

    #[test]
    fn closed_window_flushes_and_open_waits_for_interval() {
        let mut sm = Summariser::new(SummariserConfig::default()).unwrap();
        sm.handle_sample(0, &s(T0 + 1_000, 1.0)).unwrap();
        sm.handle_sample(1, &s(T0 + 2_000, 3.0)).unwrap();
        // First poll flushes (no previous flush), then the interval applies.
        let f = sm.poll_flush(Timestamp(T0 + 2_500)).unwrap();
        assert_eq!(f.writes.len(), 1);
        assert_eq!(f.checkpoint.flushed_before, 2);
        assert_eq!(f.checkpoint.replay_from, 0);
        assert!(sm.poll_flush(Timestamp(T0 + 2_600)).is_none(), "unacked");
        sm.handle_flushed();
        sm.handle_sample(2, &s(T0 + 3_000, 5.0)).unwrap();
        assert!(
            sm.poll_flush(Timestamp(T0 + 4_000)).is_none(),
            "open window, interval not up"
        );
        let f = sm.poll_flush(Timestamp(T0 + 60_000)).unwrap();
        assert_eq!(
            f.writes[0].rollup.count, 3,
            "whole window rewritten, not an increment"
        );
        assert_eq!(f.writes[0].rollup.sum, 9.0);
    }

    #[test]
    fn too_late_sample_becomes_its_own_part() {
        let cfg = SummariserConfig {
            late_horizon_ms: 120_000,
            ..SummariserConfig::default()
        };
        let mut sm = Summariser::new(cfg).unwrap();
        sm.handle_sample(0, &s(T0, 1.0)).unwrap();
        let _ = sm.poll_flush(Timestamp(T0 + 600_000)).unwrap();
        sm.handle_flushed();
        assert_eq!(sm.windows_in_memory(), 0);
        sm.handle_sample(1, &s(T0 + 5, 2.0)).unwrap();
        let f = sm.poll_flush(Timestamp(T0 + 600_001)).unwrap();
        assert_eq!(f.writes.len(), 1);
        assert_eq!(f.writes[0].key.late_seq, Some(1));
        assert_eq!(f.writes[0].key.window_start, Timestamp(T0));
    }

    #[test]
    fn unsynced_samples_are_marked_and_have_no_day() {
        let mut sm = Summariser::new(SummariserConfig::default()).unwrap();
        sm.handle_sample(0, &s(5_000, 1.0)).unwrap();
        let f = sm.poll_flush(Timestamp(10_000)).unwrap();
        assert!(f.writes[0].rollup.clock_unsynced);
        assert_eq!(f.writes[0].key.day(), None);
    }

    #[test]
    fn no_flush_until_replay_caught_up() {
        let mut sm = Summariser::new(SummariserConfig::default()).unwrap();
        for i in 0..3 {
            sm.handle_sample(i, &s(T0 + i as i64, 1.0)).unwrap();
        }
        let ck = sm.poll_flush(Timestamp(T0 + 120_000)).unwrap().checkpoint;
        assert_eq!((ck.flushed_before, ck.replay_from), (3, 0));
        let mut sm = Summariser::resume(SummariserConfig::default(), ck).unwrap();
        sm.handle_sample(0, &s(T0, 1.0)).unwrap();
        sm.handle_sample(1, &s(T0 + 1, 1.0)).unwrap();
        assert!(sm.replaying());
        assert!(sm.force_flush(Timestamp(T0 + 200_000)).is_none());
        sm.handle_sample(2, &s(T0 + 2, 1.0)).unwrap();
        sm.handle_sample(3, &s(T0 + 3, 1.0)).unwrap();
        let f = sm.force_flush(Timestamp(T0 + 200_000)).unwrap();
        assert_eq!(f.writes[0].rollup.count, 4);
    }

    #[test]
    fn a_future_window_does_not_pin_the_replay_point() {
        let cfg = SummariserConfig {
            max_replay_samples: 100,
            ..SummariserConfig::default()
        };
        let mut sm = Summariser::new(cfg.clone()).unwrap();
        // A clock that ran a year ahead, then was set right.
        let future = T0 + 365 * 86_400_000;
        sm.handle_sample(0, &s(future, 9.0)).unwrap();
        let mut now = T0;
        for seq in 1..1000 {
            now += 1000;
            sm.handle_sample(seq, &s(now, 1.0)).unwrap();
            if sm.poll_flush(Timestamp(now)).is_some() {
                sm.handle_flushed();
            }
        }
        let ck = sm.checkpoint().clone();
        assert!(
            ck.replay_from > 800,
            "replay point moved on: {}",
            ck.replay_from
        );
        // The future window is frozen (so are recent windows more than 100
        // seqs old, with this tiny limit); the frozen list stays bounded.
        let fw = Timestamp(future).window_start(60_000).0;
        assert!(ck.frozen.iter().any(|f| f.window_start == fw));
        assert!(ck.frozen.len() <= 62, "{}", ck.frozen.len());
        // After a restart, a new sample of the frozen window is a part.
        let mut sm = Summariser::resume(cfg, ck.clone()).unwrap();
        for seq in ck.replay_from..1000 {
            sm.handle_sample(seq, &s(T0 + seq as i64 * 1000, 1.0))
                .unwrap();
        }
        sm.handle_sample(1000, &s(future + 1, 2.0)).unwrap();
        let f = sm.force_flush(Timestamp(now)).unwrap();
        let part: Vec<_> = f
            .writes
            .iter()
            .filter(|w| w.key.late_seq.is_some())
            .collect();
        assert_eq!(part.len(), 1);
        assert_eq!(part[0].key.late_seq, Some(1000));
    }

    #[test]
    fn duplicate_seq_refused() {
        let mut sm = Summariser::new(SummariserConfig::default()).unwrap();
        sm.handle_sample(3, &s(T0, 1.0)).unwrap();
        assert!(matches!(
            sm.handle_sample(3, &s(T0, 1.0)),
            Err(SummariserError::SeqNotIncreasing { got: 3, next: 4 })
        ));
    }
}

pub mod pipeline {
    //! The IO driver around the [`Summariser`] state machine: reads durable
    //! samples from the [`RawZone`], writes flushes to a [`RollupSink`],
    //! persists the checkpoint, and keeps the raw zone's retention behind the
    //! replay point. Blocking (file IO and fsync): run it on a blocking
    //! thread (`spawn_blocking`), never on a control loop.

    use std::path::PathBuf;

    use schemas::time::Timestamp;

    use super::SummariserError;
    use super::{Checkpoint, CheckpointError, Flush, RollupSink, Summariser, SummariserConfig};
    use crate::raw_zone::{RawZone, RawZoneError, RetentionReport};

    /// Why a pipeline step failed. Nothing is lost: a failed write is
    /// retried by the next step.
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum PipelineError<E: std::error::Error + 'static> {
        /// Reading samples or enforcing retention failed.
        #[error("raw zone: {0}")]
        Raw(#[from] RawZoneError),
        /// The checkpoint could not be read or saved.
        #[error("summariser checkpoint: {0}")]
        Checkpoint(#[from] CheckpointError),
        /// The rollup sink refused a batch (it will be retried).
        #[error("writing rollups: {0}")]
        Sink(#[source] E),
        /// The summariser refused a sample (a bug: seqs out of order).
        #[error("summariser: {0}")]
        Summariser(#[from] SummariserError),
    }

    /// What one step did.
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct StepReport {
        /// Samples read from the raw zone and summarised.
        pub ingested: usize,
        /// Rollups written (overwritten) in the sink.
        pub written: usize,
        /// The checkpoint persisted by this step, if a flush completed.
        pub checkpoint: Option<Checkpoint>,
    }

    /// Raw zone -> summariser -> sink, with the checkpoint on disk.
    #[derive(Debug)]
    pub struct Pipeline<S> {
        zone: RawZone,
        sm: Summariser,
        sink: S,
        ck_path: PathBuf,
        persisted: Checkpoint,
        pending: Option<Flush>,
    }

    impl<S> Pipeline<S>
    where
        S: RollupSink,
        S::Error: std::error::Error + 'static,
    {
        /// Resume from the checkpoint at `ck_path` (none: a fresh node) and
        /// replay the raw zone from its replay point.
        pub fn open(
            zone: RawZone,
            ck_path: impl Into<PathBuf>,
            cfg: SummariserConfig,
            sink: S,
        ) -> Result<Self, PipelineError<S::Error>> {
            let ck_path = ck_path.into();
            let persisted = Checkpoint::load(&ck_path)?.unwrap_or_default();
            let sm = Summariser::resume(cfg, persisted.clone())?;
            let mut p = Pipeline {
                zone,
                sm,
                sink,
                ck_path,
                persisted: persisted.clone(),
                pending: None,
            };
            p.ingest()?;
            Ok(p)
        }

        fn ingest(&mut self) -> Result<usize, PipelineError<S::Error>> {
            let mut n = 0;
            for r in self.zone.read_from(self.sm.next_seq()) {
                let (seq, s) = r?;
                self.sm.handle_sample(seq, &s)?;
                n += 1;
            }
            Ok(n)
        }

        /// Summarise what is new and, when due, write and checkpoint a flush.
        pub fn step(&mut self, now: Timestamp) -> Result<StepReport, PipelineError<S::Error>> {
            let ingested = self.ingest()?;
            if self.pending.is_none() {
                self.pending = self.sm.poll_flush(now);
            }
            let mut report = StepReport {
                ingested,
                ..StepReport::default()
            };
            if let Some(f) = &self.pending {
                self.sink
                    .write_rollups(&f.writes)
                    .map_err(PipelineError::Sink)?;
                f.checkpoint.save(&self.ck_path)?;
                report.written = f.writes.len();
                report.checkpoint = Some(f.checkpoint.clone());
                self.persisted = f.checkpoint.clone();
                self.pending = None;
                self.sm.handle_flushed();
            }
            Ok(report)
        }

        /// Write everything dirty now (e.g. before shutdown).
        pub fn flush_all(&mut self, now: Timestamp) -> Result<StepReport, PipelineError<S::Error>> {
            let ingested = self.ingest()?;
            if self.pending.is_none() {
                self.pending = self.sm.force_flush(now);
            }
            let mut r = self.step(now)?;
            r.ingested += ingested;
            Ok(r)
        }

        /// Raw-zone retention that never deletes what a restart would need.
        pub fn enforce_retention(
            &self,
            now: Timestamp,
        ) -> Result<RetentionReport, PipelineError<S::Error>> {
            Ok(self
                .zone
                .enforce_retention(now, self.persisted.replay_from)?)
        }

        /// The sink (to read what was written).
        pub fn sink(&self) -> &S {
            &self.sink
        }

        /// The state machine (for status pages).
        pub fn summariser(&self) -> &Summariser {
            &self.sm
        }

        /// Stop, returning the raw zone and the sink.
        pub fn into_parts(self) -> (RawZone, S) {
            (self.zone, self.sink)
        }
    }
}
