//! Raw zone: the edge's durable append log of raw samples.
//!
//! Raw samples never enter a CRDT; they live here, on the edge's disk, and the
//! summariser turns them into rollups.
//!
//! # On disk
//!
//! A directory of segment files named `{first_seq:020}.seg`. Each segment
//! starts with an 8-byte header (`FSRZ`, format version, 3 zero bytes) and
//! holds records `len: u32 LE | crc32(payload): u32 LE | payload`. The
//! payload (format version 1) is
//! `seq u64 | ts i64 | value f64 | schema_version u32 | unit u8 |
//! device_len u8 | device | metric_len u16 | metric`, little endian.
//! Sequence numbers are assigned by the writer, start at 0, and increase by
//! one per sample across segments; a segment's name is the seq of its first
//! record, so the next seq survives even when every record was deleted.
//!
//! # Invariants
//!
//! - **Acknowledged means durable**: an append's future resolves `Ok(seq)`
//!   only after the bytes were written and `fsync`ed. One `fsync` covers every
//!   sample queued at that moment (group commit).
//! - The writer runs on its own OS thread fed by a bounded channel; callers
//!   never do file IO. [`RawZone::try_append`] never waits at all (a control
//!   loop can use it); [`RawZone::append`] waits for queue space.
//! - A write error is returned to every caller of the failed batch and the
//!   file is rolled back to its last durable length; an `fsync` error poisons
//!   the zone (the kernel may have dropped the dirty pages, so nothing written
//!   since the last good `fsync` can be trusted) and every later append fails
//!   until the zone is reopened. Nothing is silently dropped.
//! - Recovery ([`RawZone::open`]) keeps every record up to the first torn or
//!   corrupt one of a segment and truncates the rest; a torn tail can only
//!   contain unacknowledged records.
//! - Readers see only durable records, in seq order, each once.
//! - Retention deletes whole segments from the oldest, never the active one,
//!   and never a segment holding a seq at or after the caller's `keep_from`
//!   (the summariser's replay point), so recomputing rollups never meets a
//!   hole it made itself.
//!
//! Only one [`RawZone`] may have a directory open at a time: `open` takes an
//! exclusive lock on `{dir}/LOCK`, released when the last handle, reader and
//! the writer thread are gone (or the process dies).

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use schemas::config::RawSection;
use schemas::ids::DeviceId;
use schemas::metrics::{Sample, Unit};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;
use tokio::sync::{mpsc, oneshot};

/// Magic bytes at the start of every segment.
const MAGIC: &[u8; 4] = b"FSRZ";
/// Segment (and record payload) format version this build writes.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 8;
const FRAME_LEN: usize = 8;
/// Largest record payload accepted; anything larger in a file is corruption.
pub const MAX_RECORD: usize = 64 * 1024;
const SEGMENT_SUFFIX: &str = ".seg";
/// Bytes between sparse index entries of a segment.
const INDEX_EVERY: u64 = 64 * 1024;

/// Sequence number of a sample in the raw zone.
pub type Seq = u64;

/// Why a raw-zone operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RawZoneError {
    /// A file or directory operation failed (`kind` says which, e.g.
    /// `StorageFull` on a full disk).
    #[error("raw zone: {op} {path}: {message} ({kind:?})")]
    Io {
        op: &'static str,
        path: PathBuf,
        kind: std::io::ErrorKind,
        message: String,
    },
    /// A write or fsync failed earlier; the zone refuses appends until it is
    /// reopened (which recovers the durable prefix).
    #[error("raw zone is poisoned by an earlier write failure ({0}); reopen it to recover")]
    Poisoned(String),
    /// The sample cannot be stored (bad value or over-long names).
    #[error("sample refused: {0}")]
    InvalidSample(String),
    /// The append queue is full; the sample was not taken (it is returned).
    #[error("raw zone append queue is full ({capacity} samples waiting)")]
    QueueFull {
        capacity: usize,
        sample: Box<Sample>,
    },
    /// The writer thread is gone (the zone was closed or the thread died).
    #[error("raw zone writer has stopped")]
    WriterGone,
    /// A segment is unreadable in a way recovery must not paper over.
    #[error("raw zone: segment {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Another open raw zone (in this or another process) holds the
    /// directory.
    #[error("raw zone {0} is already open (its LOCK is held)")]
    Locked(PathBuf),
    /// Bad options.
    #[error("raw zone options: {0}")]
    Options(String),
}

fn io_err(op: &'static str, path: &Path, e: &std::io::Error) -> RawZoneError {
    RawZoneError::Io {
        op,
        path: path.to_path_buf(),
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// Tuning of a raw zone.
#[derive(Debug, Clone)]
pub struct RawZoneOptions {
    /// Start a new segment once the active one reaches this size.
    pub segment_bytes: u64,
    /// Appends waiting for the writer before `try_append` refuses.
    pub queue_capacity: usize,
    /// Most samples written under one fsync.
    pub max_batch: usize,
    /// Delete segments whose newest plausible sample is older than this.
    pub retention_ms: i64,
    /// Keep the zone's total size under this many bytes.
    pub retention_bytes: u64,
}

impl Default for RawZoneOptions {
    fn default() -> Self {
        RawZoneOptions::from_config(&RawSection::default())
    }
}

impl RawZoneOptions {
    /// Options from the edge config's `[raw]` section.
    pub fn from_config(raw: &RawSection) -> Self {
        RawZoneOptions {
            segment_bytes: 8 << 20,
            queue_capacity: 8192,
            max_batch: 4096,
            retention_ms: i64::try_from(raw.retention_hours.saturating_mul(3_600_000))
                .unwrap_or(i64::MAX),
            retention_bytes: raw.retention_bytes,
        }
    }

    fn validate(&self) -> Result<(), RawZoneError> {
        if self.segment_bytes < 1024 {
            return Err(RawZoneError::Options(format!(
                "segment_bytes {} is below the minimum 1024",
                self.segment_bytes
            )));
        }
        if self.queue_capacity == 0 || self.max_batch == 0 {
            return Err(RawZoneError::Options(
                "queue_capacity and max_batch must be at least 1".into(),
            ));
        }
        if self.retention_ms <= 0 {
            return Err(RawZoneError::Options("retention must be positive".into()));
        }
        Ok(())
    }
}

/// What recovery found when the zone was opened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Segments found.
    pub segments: usize,
    /// Records kept.
    pub records: u64,
    /// Bytes cut off torn or corrupt tails.
    pub truncated_bytes: u64,
    /// Segments whose tail was cut.
    pub truncated_segments: Vec<PathBuf>,
    /// The seq the next append gets.
    pub next_seq: Seq,
}

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionReport {
    pub deleted_segments: usize,
    pub deleted_bytes: u64,
    /// Size of the zone after the pass.
    pub total_bytes: u64,
    /// True when the zone is still over its size budget because the oldest
    /// segment holds samples at or after `keep_from`.
    pub blocked_by_keep_from: bool,
}

#[derive(Debug, Clone)]
struct SegmentMeta {
    first_seq: Seq,
    /// One past the last record's seq.
    next_seq: Seq,
    path: PathBuf,
    len: u64,
    max_plausible_ts: Option<i64>,
    /// Sparse index `(seq, byte offset of its record)`, one entry about
    /// every [`INDEX_EVERY`] bytes, so readers seek instead of scanning.
    index: Vec<(Seq, u64)>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    segments: Mutex<Vec<SegmentMeta>>,
    /// Every seq below this is durable.
    durable_next: AtomicU64,
    poisoned: Mutex<Option<String>>,
    is_poisoned: AtomicBool,
    /// Holds the directory's exclusive lock while the zone is open.
    _lock: File,
    /// Test hook: fail this many upcoming write batches with `StorageFull`.
    inject_failures: AtomicU32,
}

impl Shared {
    fn segments(&self) -> MutexGuard<'_, Vec<SegmentMeta>> {
        // The list is only mutated in whole steps; a panic elsewhere leaves
        // it consistent.
        self.segments.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn poison(&self, why: String) {
        *self.poisoned.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
        self.is_poisoned.store(true, Ordering::SeqCst);
    }
    fn poisoned(&self) -> Option<String> {
        if !self.is_poisoned.load(Ordering::SeqCst) {
            return None;
        }
        self.poisoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

struct AppendReq {
    sample: Sample,
    ack: oneshot::Sender<Result<Seq, RawZoneError>>,
}

/// A handle to an open raw zone. Cheap to clone; the writer thread stops
/// when every handle is dropped (after writing what was queued).
#[derive(Clone)]
pub struct RawZone {
    tx: mpsc::Sender<AppendReq>,
    shared: Arc<Shared>,
    capacity: usize,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    retention_ms: i64,
    retention_bytes: u64,
}

impl std::fmt::Debug for RawZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawZone")
            .field("dir", &self.shared.dir)
            .field("durable_next", &self.durable_next())
            .finish()
    }
}

/// Resolves to the seq of an appended sample once it is durable, or to the
/// reason it was not stored.
#[derive(Debug)]
pub struct AppendAck {
    rx: oneshot::Receiver<Result<Seq, RawZoneError>>,
}

impl Future for AppendAck {
    type Output = Result<Seq, RawZoneError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(RawZoneError::WriterGone)))
    }
}

impl AppendAck {
    /// Wait on a plain thread (not inside an async runtime).
    pub fn blocking_wait(self) -> Result<Seq, RawZoneError> {
        self.rx
            .blocking_recv()
            .unwrap_or(Err(RawZoneError::WriterGone))
    }
}

fn check_sample(s: &Sample) -> Result<(), RawZoneError> {
    if !s.value.is_finite() {
        return Err(RawZoneError::InvalidSample(format!(
            "{}/{}: value {} is not finite",
            s.device, s.metric, s.value
        )));
    }
    if s.metric.is_empty() || s.metric.len() > 1024 {
        return Err(RawZoneError::InvalidSample(format!(
            "{}: metric name must be 1..=1024 bytes, got {}",
            s.device,
            s.metric.len()
        )));
    }
    if s.device.as_str().len() > 255 {
        return Err(RawZoneError::InvalidSample(format!(
            "device id {} is longer than 255 bytes",
            s.device
        )));
    }
    Ok(())
}

impl RawZone {
    /// Open (or create) the zone in `dir`, recovering from a crash: torn or
    /// corrupt record tails are truncated, everything before them is kept.
    pub fn open(
        dir: impl AsRef<Path>,
        opts: RawZoneOptions,
    ) -> Result<(RawZone, RecoveryReport), RawZoneError> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_err("create dir", &dir, &e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err("open lock file", &lock_path, &e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(RawZoneError::Locked(dir));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_err("lock", &lock_path, &e));
            }
        }
        let (segments, report) = recover(&dir)?;
        let durable_next = report.next_seq;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            segments: Mutex::new(segments),
            durable_next: AtomicU64::new(durable_next),
            poisoned: Mutex::new(None),
            is_poisoned: AtomicBool::new(false),
            inject_failures: AtomicU32::new(0),
            _lock: lock,
        });
        let (tx, rx) = mpsc::channel(opts.queue_capacity);
        let writer = Writer::new(shared.clone(), &opts)?;
        let handle = std::thread::Builder::new()
            .name("raw-zone-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err("spawn writer thread", &dir, &e))?;
        Ok((
            RawZone {
                tx,
                shared,
                capacity: opts.queue_capacity,
                writer: Arc::new(Mutex::new(Some(handle))),
                retention_ms: opts.retention_ms,
                retention_bytes: opts.retention_bytes,
            },
            report,
        ))
    }

    /// Append a sample, waiting for queue space if the writer is behind.
    /// Resolves once the sample is durable.
    pub async fn append(&self, sample: Sample) -> Result<Seq, RawZoneError> {
        check_sample(&sample)?;
        if let Some(why) = self.shared.poisoned() {
            return Err(RawZoneError::Poisoned(why));
        }
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(AppendReq { sample, ack })
            .await
            .map_err(|_| RawZoneError::WriterGone)?;
        AppendAck { rx }.await
    }

    /// Queue a sample without waiting: never blocks, so a control loop may
    /// call it. The returned [`AppendAck`] resolves once it is durable.
    pub fn try_append(&self, sample: Sample) -> Result<AppendAck, RawZoneError> {
        check_sample(&sample)?;
        if let Some(why) = self.shared.poisoned() {
            return Err(RawZoneError::Poisoned(why));
        }
        let (ack, rx) = oneshot::channel();
        match self.tx.try_send(AppendReq { sample, ack }) {
            Ok(()) => Ok(AppendAck { rx }),
            Err(mpsc::error::TrySendError::Full(req)) => Err(RawZoneError::QueueFull {
                capacity: self.capacity,
                sample: Box::new(req.sample),
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(RawZoneError::WriterGone),
        }
    }

    /// Every seq below this is durable (and readable).
    pub fn durable_next(&self) -> Seq {
        self.shared.durable_next.load(Ordering::SeqCst)
    }

    /// The oldest seq still stored (retention deletes from the front).
    pub fn first_seq(&self) -> Seq {
        self.shared
            .segments()
            .iter()
            .find(|s| s.next_seq > s.first_seq)
            .map_or_else(|| self.durable_next(), |s| s.first_seq)
    }

    /// Total bytes of all segments.
    pub fn total_bytes(&self) -> u64 {
        self.shared.segments().iter().map(|s| s.len).sum()
    }

    /// Iterate durable samples from `from` (inclusive) up to the durable end
    /// at the time of this call. Seqs deleted by retention are skipped.
    pub fn read_from(&self, from: Seq) -> RawReader {
        RawReader {
            shared: self.shared.clone(),
            next: from,
            limit: self.durable_next(),
            buf: Vec::new(),
            pos: 0,
            seg_first: None,
            base: 0,
            path: PathBuf::new(),
            failed: false,
        }
    }

    /// Delete whole old segments: those whose newest plausible sample is
    /// older than the retention age, then the oldest while the zone is over
    /// its size budget. Never deletes the active segment or a segment holding
    /// any seq `>= keep_from` (pass the summariser's replay point).
    /// Segments holding only implausible timestamps age out by size only.
    pub fn enforce_retention(
        &self,
        now: Timestamp,
        keep_from: Seq,
    ) -> Result<RetentionReport, RawZoneError> {
        let mut segs = self.shared.segments();
        let mut report = RetentionReport {
            total_bytes: segs.iter().map(|s| s.len).sum(),
            ..RetentionReport::default()
        };
        let cutoff = now.as_millis().saturating_sub(self.retention_ms);
        while segs.len() > 1 {
            let s = &segs[0];
            let too_old = s.max_plausible_ts.is_some_and(|t| t < cutoff);
            let too_big = report.total_bytes > self.retention_bytes;
            if !(too_old || too_big) {
                break;
            }
            if s.next_seq > keep_from {
                report.blocked_by_keep_from = too_big;
                break;
            }
            match fs::remove_file(&s.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete segment", &s.path, &e)),
            }
            report.deleted_segments += 1;
            report.deleted_bytes += s.len;
            report.total_bytes -= s.len;
            segs.remove(0);
        }
        if report.deleted_segments > 0 {
            sync_dir(&self.shared.dir)?;
        }
        Ok(report)
    }

    /// Stop accepting appends from this handle and, if it is the last one,
    /// wait for the writer to finish what was queued.
    pub fn close(self) {
        let RawZone { tx, writer, .. } = self;
        drop(tx);
        if let Ok(m) = Arc::try_unwrap(writer) {
            let h = m.into_inner().unwrap_or_else(PoisonError::into_inner);
            if let Some(h) = h {
                // A panicking writer already failed every waiting append.
                let _ = h.join();
            }
        }
    }

    /// Test hook: make the next `n` write batches fail as if the disk were
    /// full.
    #[doc(hidden)]
    pub fn inject_write_failures(&self, n: u32) {
        self.shared.inject_failures.store(n, Ordering::SeqCst);
    }
}

fn sync_dir(dir: &Path) -> Result<(), RawZoneError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("fsync dir", dir, &e))
}

fn segment_path(dir: &Path, first_seq: Seq) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = FORMAT_VERSION;
    h
}

// ------------------------------------------------------------------ codec

fn unit_code(u: Unit) -> u8 {
    match u {
        Unit::None => 0,
        Unit::Celsius => 1,
        Unit::Fahrenheit => 2,
        Unit::Kelvin => 3,
        Unit::Bar => 4,
        Unit::Kilopascal => 5,
        Unit::Psi => 6,
        Unit::LitersPerMinute => 7,
        Unit::CubicMetersPerHour => 8,
        Unit::Watt => 9,
        Unit::Kilowatt => 10,
        Unit::KilowattHour => 11,
        Unit::Volt => 12,
        Unit::Ampere => 13,
        Unit::Hertz => 14,
        Unit::Percent => 15,
        Unit::Rpm => 16,
        Unit::Count => 17,
        Unit::Boolean => 18,
    }
}

fn unit_from_code(c: u8) -> Option<Unit> {
    const ALL: [Unit; 19] = [
        Unit::None,
        Unit::Celsius,
        Unit::Fahrenheit,
        Unit::Kelvin,
        Unit::Bar,
        Unit::Kilopascal,
        Unit::Psi,
        Unit::LitersPerMinute,
        Unit::CubicMetersPerHour,
        Unit::Watt,
        Unit::Kilowatt,
        Unit::KilowattHour,
        Unit::Volt,
        Unit::Ampere,
        Unit::Hertz,
        Unit::Percent,
        Unit::Rpm,
        Unit::Count,
        Unit::Boolean,
    ];
    ALL.get(usize::from(c)).copied()
}

/// Append one framed record to `out`.
fn encode_record(out: &mut Vec<u8>, seq: Seq, s: &Sample) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_LEN]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&s.ts.as_millis().to_le_bytes());
    out.extend_from_slice(&s.value.to_bits().to_le_bytes());
    out.extend_from_slice(&s.schema_version.0.to_le_bytes());
    out.push(unit_code(s.unit));
    let dev = s.device.as_str().as_bytes();
    // Lengths were checked by `check_sample`.
    out.push(u8::try_from(dev.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(dev);
    let metric = s.metric.as_bytes();
    out.extend_from_slice(
        &u16::try_from(metric.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(metric);
    let payload_len = out.len() - start - FRAME_LEN;
    let crc = crc32fast::hash(&out[start + FRAME_LEN..]);
    out[start..start + 4].copy_from_slice(&u32::try_from(payload_len).unwrap_or(0).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Outcome of decoding the record at the start of `buf`.
enum Decoded {
    Record {
        seq: Seq,
        sample: Sample,
        len: usize,
    },
    /// Not enough bytes: a torn tail.
    Torn,
    /// Bytes present but wrong.
    Bad(String),
}

fn decode_record(buf: &[u8]) -> Decoded {
    if buf.len() < FRAME_LEN {
        return Decoded::Torn;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_RECORD {
        return Decoded::Bad(format!("record length {len} exceeds {MAX_RECORD}"));
    }
    if buf.len() < FRAME_LEN + len {
        return Decoded::Torn;
    }
    let p = &buf[FRAME_LEN..FRAME_LEN + len];
    if crc32fast::hash(p) != crc {
        return Decoded::Bad("crc mismatch".into());
    }
    match decode_payload(p) {
        Ok((seq, sample)) => Decoded::Record {
            seq,
            sample,
            len: FRAME_LEN + len,
        },
        Err(e) => Decoded::Bad(e),
    }
}

fn decode_payload(p: &[u8]) -> Result<(Seq, Sample), String> {
    let mut r = p;
    let mut take = |n: usize| -> Result<&[u8], String> {
        if r.len() < n {
            return Err("payload too short".into());
        }
        let (a, b) = r.split_at(n);
        r = b;
        Ok(a)
    };
    let u64_of = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        a
    };
    let seq = u64::from_le_bytes(u64_of(take(8)?));
    let ts = i64::from_le_bytes(u64_of(take(8)?));
    let value = f64::from_bits(u64::from_le_bytes(u64_of(take(8)?)));
    let v = take(4)?;
    let version = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    let unit_c = take(1)?[0];
    let unit = unit_from_code(unit_c).ok_or_else(|| format!("unknown unit code {unit_c}"))?;
    let dev_len = usize::from(take(1)?[0]);
    let dev = std::str::from_utf8(take(dev_len)?).map_err(|e| format!("device id: {e}"))?;
    let device = DeviceId::new(dev).map_err(|e| e.to_string())?;
    let m = take(2)?;
    let m_len = usize::from(u16::from_le_bytes([m[0], m[1]]));
    let metric = std::str::from_utf8(take(m_len)?)
        .map_err(|e| format!("metric: {e}"))?
        .to_string();
    if !r.is_empty() {
        return Err(format!("{} trailing bytes", r.len()));
    }
    if version == 0 || version > schemas::version::CURRENT {
        return Err(format!("unsupported sample schema_version {version}"));
    }
    Ok((
        seq,
        Sample {
            schema_version: SchemaVersion(version),
            device,
            metric,
            ts: Timestamp(ts),
            value,
            unit,
        },
    ))
}

// --------------------------------------------------------------- recovery

fn recover(dir: &Path) -> Result<(Vec<SegmentMeta>, RecoveryReport), RawZoneError> {
    let mut names = Vec::new();
    let rd = fs::read_dir(dir).map_err(|e| io_err("list", dir, &e))?;
    for entry in rd {
        let entry = entry.map_err(|e| io_err("list", dir, &e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            names.push(first);
        }
    }
    names.sort_unstable();
    let mut report = RecoveryReport::default();
    let mut segments = Vec::with_capacity(names.len());
    let last = names.len().saturating_sub(1);
    for (i, first_seq) in names.iter().copied().enumerate() {
        let path = segment_path(dir, first_seq);
        if let Some(prev) = segments.last().map(|s: &SegmentMeta| s.next_seq)
            && first_seq < prev
        {
            return Err(RawZoneError::Corrupt {
                path,
                offset: 0,
                reason: format!(
                    "segment starts at seq {first_seq} but the previous one ends at {prev}"
                ),
            });
        }
        let bytes = fs::read(&path).map_err(|e| io_err("read segment", &path, &e))?;
        if bytes.len() < HEADER_LEN {
            if i == last && (bytes.is_empty() || bytes[..] == header()[..bytes.len()]) {
                // Torn while the segment was being created: rewrite it.
                rewrite_header(&path)?;
                report.truncated_bytes += bytes.len() as u64;
                segments.push(SegmentMeta {
                    first_seq,
                    next_seq: first_seq,
                    path,
                    len: HEADER_LEN as u64,
                    max_plausible_ts: None,
                    index: Vec::new(),
                });
                continue;
            }
            return Err(RawZoneError::Corrupt {
                path,
                offset: 0,
                reason: "segment shorter than its header".into(),
            });
        }
        if &bytes[..4] != MAGIC {
            return Err(RawZoneError::Corrupt {
                path,
                offset: 0,
                reason: "not a raw-zone segment (bad magic)".into(),
            });
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(RawZoneError::Corrupt {
                path,
                offset: 4,
                reason: format!(
                    "segment format version {} is not supported by this build (supports {FORMAT_VERSION})",
                    bytes[4]
                ),
            });
        }
        let mut off = HEADER_LEN;
        let mut next = first_seq;
        let mut max_ts = None::<i64>;
        let mut index: Vec<(Seq, u64)> = Vec::new();
        let mut problem = None;
        while off < bytes.len() {
            match decode_record(&bytes[off..]) {
                Decoded::Record { seq, sample, len } => {
                    if seq != next {
                        problem = Some(format!("seq {seq} where {next} was expected"));
                        break;
                    }
                    if sample.ts.is_plausible() {
                        max_ts = Some(max_ts.map_or(sample.ts.0, |m| m.max(sample.ts.0)));
                    }
                    let last_indexed = index.last().map_or(HEADER_LEN as u64, |e| e.1);
                    if off as u64 - last_indexed >= INDEX_EVERY {
                        index.push((seq, off as u64));
                    }
                    next += 1;
                    off += len;
                }
                Decoded::Torn => {
                    problem = Some("torn record".into());
                    break;
                }
                Decoded::Bad(why) => {
                    problem = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = problem {
            let cut = bytes.len() - off;
            tracing::warn!(segment = %path.display(), offset = off, bytes = cut, reason = %why, "raw zone truncating tail");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_err("open segment", &path, &e))?;
            f.set_len(off as u64)
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err("truncate segment", &path, &e))?;
            report.truncated_bytes += cut as u64;
            report.truncated_segments.push(path.clone());
        }
        report.records += next - first_seq;
        segments.push(SegmentMeta {
            first_seq,
            next_seq: next,
            path,
            len: off as u64,
            max_plausible_ts: max_ts,
            index,
        });
    }
    report.segments = segments.len();
    if segments.is_empty() {
        let path = segment_path(dir, 0);
        rewrite_header(&path)?;
        segments.push(SegmentMeta {
            first_seq: 0,
            next_seq: 0,
            path,
            len: HEADER_LEN as u64,
            max_plausible_ts: None,
            index: Vec::new(),
        });
    }
    sync_dir(dir)?;
    report.next_seq = segments.last().map_or(0, |s| s.next_seq);
    Ok((segments, report))
}

fn rewrite_header(path: &Path) -> Result<(), RawZoneError> {
    let mut f = File::create(path).map_err(|e| io_err("create segment", path, &e))?;
    f.write_all(&header())
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err("write segment header", path, &e))
}

// ------------------------------------------------------------------ writer

struct Writer {
    shared: Arc<Shared>,
    file: File,
    path: PathBuf,
    len: u64,
    next_seq: Seq,
    segment_bytes: u64,
    max_batch: usize,
}

impl Writer {
    fn new(shared: Arc<Shared>, opts: &RawZoneOptions) -> Result<Writer, RawZoneError> {
        let (path, len, next_seq) = {
            let segs = shared.segments();
            let last = segs.last().ok_or_else(|| RawZoneError::Corrupt {
                path: shared.dir.clone(),
                offset: 0,
                reason: "no active segment".into(),
            })?;
            (last.path.clone(), last.len, last.next_seq)
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err("open segment", &path, &e))?;
        Ok(Writer {
            shared,
            file,
            path,
            len,
            next_seq,
            segment_bytes: opts.segment_bytes,
            max_batch: opts.max_batch,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<AppendReq>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let result = self.write_batch(&batch, &mut buf);
            match result {
                Ok(first_seq) => {
                    for (i, req) in batch.drain(..).enumerate() {
                        // A caller that stopped waiting still got its sample stored.
                        let _ = req.ack.send(Ok(first_seq + i as u64));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, samples = batch.len(), "raw zone write failed");
                    for req in batch.drain(..) {
                        let _ = req.ack.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Write and fsync one batch; returns the seq of its first sample.
    fn write_batch(&mut self, batch: &[AppendReq], buf: &mut Vec<u8>) -> Result<Seq, RawZoneError> {
        if let Some(why) = self.shared.poisoned() {
            return Err(RawZoneError::Poisoned(why));
        }
        if self.len >= self.segment_bytes && self.len > HEADER_LEN as u64 {
            self.rotate()?;
        }
        buf.clear();
        let first_seq = self.next_seq;
        let mut max_ts = None::<i64>;
        for (i, req) in batch.iter().enumerate() {
            encode_record(buf, first_seq + i as u64, &req.sample);
            if req.sample.ts.is_plausible() {
                max_ts = Some(max_ts.map_or(req.sample.ts.0, |m| m.max(req.sample.ts.0)));
            }
        }
        let injected = self
            .shared
            .inject_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let write = if injected {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            ))
        } else {
            self.file.write_all(buf)
        };
        if let Err(e) = write {
            let err = io_err("append", &self.path, &e);
            // Roll back whatever part of the batch reached the file, so the
            // next batch starts on a record boundary.
            if let Err(e2) = self.file.set_len(self.len) {
                self.shared
                    .poison(format!("rollback after failed append: {e2}"));
            }
            return Err(err);
        }
        if let Err(e) = self.file.sync_data() {
            let err = io_err("fsync", &self.path, &e);
            self.shared.poison(err.to_string());
            return Err(err);
        }
        self.len += buf.len() as u64;
        self.next_seq += batch.len() as u64;
        {
            let mut segs = self.shared.segments();
            if let Some(last) = segs.last_mut() {
                let last_indexed = last.index.last().map_or(HEADER_LEN as u64, |e| e.1);
                let batch_start = self.len - buf.len() as u64;
                if batch_start - last_indexed >= INDEX_EVERY {
                    last.index.push((first_seq, batch_start));
                }
                last.len = self.len;
                last.next_seq = self.next_seq;
                if let Some(t) = max_ts {
                    last.max_plausible_ts = Some(last.max_plausible_ts.map_or(t, |m| m.max(t)));
                }
            }
        }
        self.shared
            .durable_next
            .store(self.next_seq, Ordering::SeqCst);
        Ok(first_seq)
    }

    fn rotate(&mut self) -> Result<(), RawZoneError> {
        let path = segment_path(&self.shared.dir, self.next_seq);
        rewrite_header(&path)?;
        sync_dir(&self.shared.dir)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err("open segment", &path, &e))?;
        self.shared.segments().push(SegmentMeta {
            first_seq: self.next_seq,
            next_seq: self.next_seq,
            path: path.clone(),
            len: HEADER_LEN as u64,
            max_plausible_ts: None,
            index: Vec::new(),
        });
        self.file = file;
        self.path = path;
        self.len = HEADER_LEN as u64;
        Ok(())
    }
}

// ------------------------------------------------------------------ reader

/// Iterator over durable samples `(seq, sample)` in seq order; see
/// [`RawZone::read_from`]. Yields an error (and then stops) on corruption
/// inside the durable region.
#[derive(Debug)]
pub struct RawReader {
    shared: Arc<Shared>,
    next: Seq,
    limit: Seq,
    buf: Vec<u8>,
    pos: usize,
    /// First seq of the loaded segment, if one is loaded.
    seg_first: Option<Seq>,
    /// File offset of `buf[0]`.
    base: u64,
    path: PathBuf,
    failed: bool,
}

impl RawReader {
    /// The seq the next item will have at least (where to resume).
    pub fn position(&self) -> Seq {
        self.next
    }

    /// Load the segment that holds `self.next`, or the first one after it.
    /// `after` skips segments starting at or before it (the one just read).
    fn load(&mut self, after: Option<Seq>) -> Result<bool, RawZoneError> {
        loop {
            let (path, first_seq, seg_next, offset, len) = {
                let segs = self.shared.segments();
                let cand = segs
                    .iter()
                    .filter(|s| after.is_none_or(|a| s.first_seq > a))
                    .find(|s| s.next_seq > self.next || s.first_seq >= self.next);
                let Some(s) = cand else { return Ok(false) };
                let i = s.index.partition_point(|e| e.0 <= self.next);
                let offset = if i == 0 {
                    HEADER_LEN as u64
                } else {
                    s.index[i - 1].1
                };
                (s.path.clone(), s.first_seq, s.next_seq, offset, s.len)
            };
            match read_range(&path, offset, len) {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                    self.base = offset;
                    self.path = path;
                    self.seg_first = Some(first_seq);
                    // Seqs before the segment were deleted by retention.
                    self.next = self.next.max(first_seq);
                    return Ok(true);
                }
                // Deleted by retention after we looked: move past it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.next = self.next.max(seg_next);
                }
                Err(e) => return Err(io_err("read segment", &path, &e)),
            }
        }
    }
}

/// The bytes `[offset, len)` of a file (less if it is shorter).
fn read_range(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(usize::try_from(len.saturating_sub(offset)).unwrap_or(0));
    f.take(len.saturating_sub(offset)).read_to_end(&mut buf)?;
    Ok(buf)
}

impl Iterator for RawReader {
    type Item = Result<(Seq, Sample), RawZoneError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if self.next >= self.limit {
                return None;
            }
            if self.seg_first.is_none() || self.pos >= self.buf.len() {
                // Nothing loaded yet, or the loaded segment is used up
                // (everything below `limit` was complete when it was read,
                // so the rest is in later segments).
                let after = self.seg_first;
                match self.load(after) {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
            }
            match decode_record(&self.buf[self.pos..]) {
                Decoded::Record { seq, sample, len } => {
                    self.pos += len;
                    if seq < self.next {
                        continue;
                    }
                    if seq >= self.limit {
                        return None;
                    }
                    self.next = seq + 1;
                    return Some(Ok((seq, sample)));
                }
                // A record being written when we read the file: beyond
                // `limit`, so this segment is done.
                Decoded::Torn => self.pos = self.buf.len(),
                Decoded::Bad(reason) => {
                    self.failed = true;
                    return Some(Err(RawZoneError::Corrupt {
                        path: self.path.clone(),
                        offset: self.base + self.pos as u64,
                        reason,
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_crc() {
        let s = Sample {
            schema_version: SchemaVersion::default(),
            device: DeviceId::new("pump-1").unwrap(),
            metric: "temperature".into(),
            ts: Timestamp(1_700_000_000_123),
            value: -3.25,
            unit: Unit::Celsius,
        };
        let mut buf = Vec::new();
        encode_record(&mut buf, 42, &s);
        match decode_record(&buf) {
            Decoded::Record { seq, sample, len } => {
                assert_eq!((seq, len), (42, buf.len()));
                assert_eq!(sample, s);
            }
            _ => panic!("did not decode"),
        }
        assert!(matches!(
            decode_record(&buf[..buf.len() - 1]),
            Decoded::Torn
        ));
        let mut bad = buf.clone();
        let n = bad.len();
        bad[n - 1] ^= 0x40;
        assert!(matches!(decode_record(&bad), Decoded::Bad(_)));
    }

    #[test]
    fn every_unit_has_a_code() {
        for c in 0..=u8::MAX {
            if let Some(u) = unit_from_code(c) {
                assert_eq!(unit_code(u), c);
            }
        }
        assert!(unit_from_code(19).is_none());
    }
}
