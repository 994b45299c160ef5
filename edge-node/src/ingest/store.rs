//! The ingest's own small files under `{data_dir}/ingest/`: the dedupe window
//! (`dedupe.jsonl`) and the quarantine (`quarantine.jsonl`). Both are
//! bounded in memory, appended one JSON line per entry, compacted by rewrite
//! (temp file + rename) when the file holds twice the live entries, and
//! tolerate a torn last line after a crash.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use schemas::ids::DeviceId;
use schemas::ingest::QuarantineEntry;
use schemas::time::Timestamp;
use serde_json::Value;

use super::IngestError;
use super::perimeter::{DedupeKey, KeyRef};

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IngestError + 'a {
    move |source| IngestError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Read the JSON lines of `path` (missing file: none). A line that does not
/// parse is skipped and counted (a torn tail after a crash).
fn read_lines(path: &Path) -> Result<(Vec<Value>, usize), IngestError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io("open", path)(e)),
    };
    let mut out = Vec::new();
    let mut bad = 0;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io("read", path))?;
        match serde_json::from_str::<Value>(&line) {
            Ok(v) => out.push(v),
            Err(_) => bad += 1,
        }
    }
    Ok((out, bad))
}

/// Replace `path` with `lines`, atomically.
fn rewrite(path: &Path, lines: impl Iterator<Item = String>) -> Result<File, IngestError> {
    let tmp = path.with_extension("jsonl.tmp");
    {
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        let mut buf = String::new();
        for l in lines {
            buf.push_str(&l);
            buf.push('\n');
        }
        f.write_all(buf.as_bytes()).map_err(io("write", &tmp))?;
        f.sync_data().map_err(io("fsync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io("open", path))
}

fn key_json(recv: Timestamp, k: &DedupeKey) -> String {
    let at = match &k.at {
        KeyRef::Ts(t) => Value::from(*t),
        KeyRef::Id(s) => Value::from(s.as_str()),
    };
    Value::from(vec![
        Value::from(recv.0),
        Value::from(k.device.as_str()),
        Value::from(k.metric.as_str()),
        at,
    ])
    .to_string()
}

fn key_of(v: &Value) -> Option<(Timestamp, DedupeKey)> {
    let a = v.as_array()?;
    let recv = Timestamp(a.first()?.as_i64()?);
    let device = DeviceId::new(a.get(1)?.as_str()?).ok()?;
    let metric = a.get(2)?.as_str()?.to_string();
    let at = match a.get(3)? {
        Value::Number(n) => KeyRef::Ts(n.as_i64()?),
        Value::String(s) => KeyRef::Id(s.clone()),
        _ => return None,
    };
    Some((recv, DedupeKey { device, metric, at }))
}

/// Keys of samples already accepted, within a window of receipt time and a
/// bound on the count; persisted so a replay after a restart is recognised.
#[derive(Debug)]
pub(crate) struct Dedupe {
    path: PathBuf,
    file: File,
    lines_in_file: usize,
    order: VecDeque<(Timestamp, DedupeKey)>,
    set: HashSet<DedupeKey>,
    window_ms: i64,
    max: usize,
}

impl Dedupe {
    pub(crate) fn open(
        dir: &Path,
        window_ms: i64,
        max: usize,
        now: Timestamp,
    ) -> Result<Dedupe, IngestError> {
        let path = dir.join("dedupe.jsonl");
        let (lines, _torn) = read_lines(&path)?;
        let mut d = Dedupe {
            path: path.clone(),
            file: File::open("/dev/null").map_err(io("open", Path::new("/dev/null")))?,
            lines_in_file: 0,
            order: VecDeque::new(),
            set: HashSet::new(),
            window_ms,
            max: max.max(1),
        };
        for v in &lines {
            if let Some((recv, k)) = key_of(v)
                && d.set.insert(k.clone())
            {
                d.order.push_back((recv, k));
            }
        }
        d.evict(now);
        d.compact()?;
        Ok(d)
    }

    fn evict(&mut self, now: Timestamp) {
        while let Some((recv, _)) = self.order.front() {
            let expired = recv.0 < now.0.saturating_sub(self.window_ms);
            if !(expired || self.order.len() > self.max) {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.set.remove(&k);
            }
        }
    }

    fn compact(&mut self) -> Result<(), IngestError> {
        self.file = rewrite(&self.path, self.order.iter().map(|(r, k)| key_json(*r, k)))?;
        self.lines_in_file = self.order.len();
        Ok(())
    }

    pub(crate) fn contains(&self, k: &DedupeKey) -> bool {
        self.set.contains(k)
    }

    /// Number of keys remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }

    /// Remember keys of samples the sink accepted.
    pub(crate) fn record<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a DedupeKey>,
        now: Timestamp,
    ) -> Result<(), IngestError> {
        let mut buf = String::new();
        for k in keys {
            if self.set.insert(k.clone()) {
                buf.push_str(&key_json(now, k));
                buf.push('\n');
                self.order.push_back((now, k.clone()));
                self.lines_in_file += 1;
            }
        }
        self.evict(now);
        if self.lines_in_file > 2 * self.max.max(1024) {
            return self.compact();
        }
        // Not fsynced: the raw zone holds the samples durably; losing the
        // last keys in a power cut can only let one replay through twice.
        self.file
            .write_all(buf.as_bytes())
            .map_err(io("append", &self.path))
    }
}

/// Refused payloads, newest last, bounded; persisted.
#[derive(Debug)]
pub(crate) struct Quarantine {
    path: PathBuf,
    file: File,
    lines_in_file: usize,
    entries: VecDeque<QuarantineEntry>,
    max: usize,
    next_id: u64,
    /// Entries evicted (oldest first) to respect the bound, since start.
    pub(crate) evicted: u64,
}

impl Quarantine {
    pub(crate) fn open(dir: &Path, max: usize) -> Result<Quarantine, IngestError> {
        let path = dir.join("quarantine.jsonl");
        let (lines, _torn) = read_lines(&path)?;
        let mut entries: VecDeque<QuarantineEntry> = lines
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let max = max.max(1);
        while entries.len() > max {
            entries.pop_front();
        }
        let next_id = entries.iter().map(|e| e.id + 1).max().unwrap_or(0);
        let mut q = Quarantine {
            path: path.clone(),
            file: File::open("/dev/null").map_err(io("open", Path::new("/dev/null")))?,
            lines_in_file: 0,
            entries,
            max,
            next_id,
            evicted: 0,
        };
        q.compact()?;
        Ok(q)
    }

    fn compact(&mut self) -> Result<(), IngestError> {
        self.file = rewrite(
            &self.path,
            self.entries
                .iter()
                .filter_map(|e| serde_json::to_string(e).ok()),
        )?;
        self.lines_in_file = self.entries.len();
        Ok(())
    }

    /// Add an entry (its `id` is assigned here) and persist it.
    pub(crate) fn push(&mut self, mut e: QuarantineEntry) -> Result<QuarantineEntry, IngestError> {
        e.id = self.next_id;
        self.next_id += 1;
        self.entries.push_back(e.clone());
        while self.entries.len() > self.max {
            self.entries.pop_front();
            self.evicted += 1;
        }
        self.lines_in_file += 1;
        if self.lines_in_file > 2 * self.max {
            self.compact()?;
        } else {
            let line = serde_json::to_string(&e).map_err(|e| IngestError::Io {
                op: "encode",
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?;
            self.file
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| self.file.sync_data())
                .map_err(io("append", &self.path))?;
        }
        Ok(e)
    }

    pub(crate) fn entries(&self) -> Vec<QuarantineEntry> {
        self.entries.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::ingest::IngestSource;

    fn k(m: &str, t: i64) -> DedupeKey {
        DedupeKey {
            device: DeviceId::new("d-1").unwrap(),
            metric: m.into(),
            at: KeyRef::Ts(t),
        }
    }

    #[test]
    fn dedupe_survives_reopen_and_forgets_after_window() {
        let dir = tempfile::tempdir().unwrap();
        let now = Timestamp(1_000_000);
        {
            let mut d = Dedupe::open(dir.path(), 60_000, 100, now).unwrap();
            d.record([&k("t", 1), &k("t", 2)], now).unwrap();
            assert!(d.contains(&k("t", 1)));
        }
        // Torn tail: garbage appended after the last full line.
        let p = dir.path().join("dedupe.jsonl");
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"[1000000,\"d-1\",\"t").unwrap();
        let d = Dedupe::open(dir.path(), 60_000, 100, now).unwrap();
        assert!(d.contains(&k("t", 1)) && d.contains(&k("t", 2)));
        assert!(!d.contains(&k("t", 3)));
        let d = Dedupe::open(dir.path(), 60_000, 100, Timestamp(now.0 + 60_001)).unwrap();
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn dedupe_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let now = Timestamp(0);
        let mut d = Dedupe::open(dir.path(), 60_000, 3, now).unwrap();
        for t in 0..5 {
            d.record([&k("t", t)], now).unwrap();
        }
        assert_eq!(d.len(), 3);
        assert!(!d.contains(&k("t", 0)) && d.contains(&k("t", 4)));
    }

    #[test]
    fn quarantine_is_bounded_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let e = |r: &str| QuarantineEntry {
            id: 0,
            at: Timestamp(5),
            source: IngestSource::Mqtt,
            origin: "a/b".into(),
            device: None,
            field: None,
            reason: r.into(),
            payload: "x".into(),
            payload_len: 1,
        };
        {
            let mut q = Quarantine::open(dir.path(), 3).unwrap();
            for i in 0..10 {
                q.push(e(&format!("r{i}"))).unwrap();
            }
            assert_eq!(q.evicted, 7);
        }
        let q = Quarantine::open(dir.path(), 3).unwrap();
        let got: Vec<_> = q
            .entries()
            .iter()
            .map(|e| (e.id, e.reason.clone()))
            .collect();
        assert_eq!(
            got,
            vec![(7, "r7".into()), (8, "r8".into()), (9, "r9".into())]
        );
    }
}
