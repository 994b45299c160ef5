//! Integration tests of the summariser: exactly-once rollups under random
//! arrival orders, late samples, unsynced clocks, crashes and restarts, and a
//! real kill -9 of a process running raw zone + summariser + checkpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edge_node::raw_zone::{RawZone, RawZoneOptions};
use edge_node::summariser::{
    Checkpoint, MemoryRollupStore, RollupKey, RollupSink, Summariser, SummariserConfig,
    merge_parts, summarise_all,
};
use proptest::prelude::*;
use schemas::ids::DeviceId;
use schemas::metrics::{Rollup, Sample, Unit};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;

const T0: i64 = 1_700_000_040_000;

fn cfg() -> SummariserConfig {
    SummariserConfig {
        window_ms: 60_000,
        flush_interval_ms: 10_000,
        late_horizon_ms: 300_000,
        // Small, so the tests freeze windows often.
        max_replay_samples: 40,
    }
}

fn mk(dev: u8, metric: u8, ts: i64, v: i64) -> Sample {
    Sample {
        schema_version: SchemaVersion::default(),
        device: DeviceId::new(format!("d{dev}")).unwrap(),
        metric: format!("m{metric}"),
        ts: Timestamp(ts),
        value: v as f64,
        unit: Unit::Bar,
    }
}

/// What happens after a sample is handled.
#[derive(Debug, Clone, Copy)]
enum Step {
    Nothing,
    /// Poll for a flush and complete it.
    Flush,
    /// Crash with no flush in progress.
    Crash,
    /// Poll for a flush, write only the first `k` rollups, crash before the
    /// checkpoint is persisted.
    CrashMidWrite(usize),
    /// Poll for a flush, write it all, crash before persisting the checkpoint.
    CrashBeforeCheckpoint,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => Just(Step::Nothing),
        4 => Just(Step::Flush),
        1 => Just(Step::Crash),
        1 => (0usize..5).prop_map(Step::CrashMidWrite),
        1 => Just(Step::CrashBeforeCheckpoint),
    ]
}

/// One arriving sample: device, metric, gap since the previous arrival,
/// lateness of its timestamp, value, and whether the clock was unsynced.
fn arrival() -> impl Strategy<Value = (u8, u8, i64, i64, i64, bool)> {
    (
        0u8..2,
        0u8..2,
        0i64..20_000,
        prop_oneof![
            8 => 0i64..5_000,
            2 => 0i64..200_000,
            1 => 0i64..1_000_000, // beyond the late horizon
            1 => -100_000_000i64..-1_000_000, // stamped in the future
        ],
        -50i64..50,
        prop::bool::weighted(0.1),
    )
}

/// Run the summariser over `samples` (seq = index) with the given steps,
/// crashing and restarting where told, and return the written rollups.
fn run(samples: &[Sample], nows: &[i64], steps: &[Step]) -> MemoryRollupStore {
    let mut store = MemoryRollupStore::default();
    let mut persisted = Checkpoint::default();
    let mut sm = Summariser::new(cfg()).unwrap();
    for (i, s) in samples.iter().enumerate() {
        sm.handle_sample(i as u64, s).unwrap();
        let now = Timestamp(nows[i]);
        let crash = match steps[i] {
            Step::Nothing => false,
            Step::Crash => true,
            Step::Flush => {
                if let Some(f) = sm.poll_flush(now) {
                    store.write_rollups(&f.writes).unwrap();
                    persisted = f.checkpoint;
                    sm.handle_flushed();
                }
                false
            }
            Step::CrashMidWrite(k) => {
                if let Some(f) = sm.poll_flush(now) {
                    let k = k.min(f.writes.len());
                    store.write_rollups(&f.writes[..k]).unwrap();
                }
                true
            }
            Step::CrashBeforeCheckpoint => {
                if let Some(f) = sm.poll_flush(now) {
                    store.write_rollups(&f.writes).unwrap();
                }
                true
            }
        };
        if crash {
            sm = Summariser::resume(cfg(), persisted.clone()).unwrap();
            let from = sm.replay_from() as usize;
            for (j, s) in samples.iter().enumerate().take(i + 1).skip(from) {
                sm.handle_sample(j as u64, s).unwrap();
            }
        }
    }
    let end = Timestamp(nows.last().copied().unwrap_or(T0) + 10 * 86_400_000);
    if let Some(f) = sm.force_flush(end) {
        store.write_rollups(&f.writes).unwrap();
        sm.handle_flushed();
    }
    store
}

fn build(arrivals: &[(u8, u8, i64, i64, i64, bool)]) -> (Vec<Sample>, Vec<i64>) {
    let mut now = T0;
    let mut samples = Vec::new();
    let mut nows = Vec::new();
    for (i, &(d, m, gap, late, v, unsynced)) in arrivals.iter().enumerate() {
        now += gap;
        let ts = if unsynced {
            // A box that booted in 1970: its own clock, also moving forward.
            10_000 + i as i64 * 1_500 - late / 100
        } else {
            now - late
        };
        samples.push(mk(d, m, ts, v));
        nows.push(now);
    }
    (samples, nows)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    /// Whatever the arrival order, lateness, flush times, crash points and
    /// restarts, the written rollups (parts merged) equal a one-pass
    /// summary: no sample lost, none counted twice.
    #[test]
    fn crashes_and_restarts_give_the_one_pass_rollups(
        (arrivals, steps) in prop::collection::vec((arrival(), step()), 0..250)
            .prop_map(|v| v.into_iter().unzip::<_, _, Vec<_>, Vec<_>>())
    ) {
        let (samples, nows) = build(&arrivals);
        let store = run(&samples, &nows, &steps);
        let got = merge_parts(&store.rollups);
        let want = summarise_all(&samples, cfg().window_ms);
        prop_assert_eq!(got.len(), want.len());
        for (k, w) in &want {
            let g = got.get(k);
            prop_assert_eq!(g, Some(w), "window {:?}", k);
        }
        // Unsynced rollups are marked and never filed under a day.
        for (k, r) in &store.rollups {
            prop_assert_eq!(r.clock_unsynced, !r.window_start.is_plausible());
            prop_assert_eq!(k.day().is_none(), k.clock_unsynced);
        }
    }
}

#[test]
fn replay_from_covers_open_windows_and_late_samples_land_in_their_window() {
    // Pinned scenario: a window still in memory at a checkpoint gets a late
    // sample after a restart; its rewrite must include the pre-crash samples.
    let samples = vec![
        mk(0, 0, T0 + 1_000, 1),
        mk(0, 0, T0 + 61_000, 2),
        mk(0, 0, T0 + 2_000, 4), // late: window T0 again
    ];
    let nows = vec![T0 + 1_000, T0 + 70_000, T0 + 80_000];
    let steps = vec![Step::Flush, Step::Flush, Step::Crash];
    let store = run(&samples, &nows, &steps);
    let got = merge_parts(&store.rollups);
    let w0 = got
        .get(&(
            DeviceId::new("d0").unwrap(),
            "m0".to_string(),
            Timestamp(T0),
            false,
        ))
        .unwrap();
    assert_eq!((w0.count, w0.sum, w0.first, w0.last), (2, 5.0, 1.0, 4.0));
    // The main rollup was overwritten whole, not as an extra part.
    assert_eq!(
        store
            .rollups
            .keys()
            .filter(|k| k.late_seq.is_some())
            .count(),
        0
    );
}

// ------------------------------------------------------------ kill -9 test

const CHILD_ENV: &str = "FIELDSYNC_SUMMARISER_CHILD_DIR";

fn sample_of(i: u64) -> Sample {
    // Pseudo-random lateness, some beyond the horizon; integer values.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    let late = match h % 10 {
        0 => (h % 1_000) as i64 * 1_000, // up to ~17 min
        1 | 2 => (h % 120) as i64 * 1_000,
        _ => (h % 3) as i64 * 100,
    };
    mk(
        (i % 2) as u8,
        ((i / 2) % 2) as u8,
        now_of(i) - late,
        (i % 97) as i64,
    )
}

fn now_of(i: u64) -> i64 {
    T0 + i as i64 * 100
}

fn store_path(dir: &Path) -> std::path::PathBuf {
    dir.join("rollups.json")
}

fn load_store(dir: &Path) -> MemoryRollupStore {
    let mut store = MemoryRollupStore::default();
    if let Ok(b) = std::fs::read(store_path(dir)) {
        let v: Vec<(Option<u64>, Rollup)> = serde_json::from_slice(&b).unwrap();
        for (late_seq, r) in v {
            let key = RollupKey {
                device: r.device.clone(),
                metric: r.metric.clone(),
                window_start: r.window_start,
                clock_unsynced: r.clock_unsynced,
                late_seq,
            };
            store.rollups.insert(key, r);
        }
    }
    store
}

/// Persist the whole store atomically (the stand-in for the telemetry doc).
fn save_store(dir: &Path, store: &MemoryRollupStore) {
    let v: Vec<(Option<u64>, &Rollup)> =
        store.rollups.iter().map(|(k, r)| (k.late_seq, r)).collect();
    let tmp = dir.join("rollups.tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(&serde_json::to_vec(&v).unwrap()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, store_path(dir)).unwrap();
}

fn resume(dir: &Path, z: &RawZone) -> Summariser {
    let ck = Checkpoint::load(&dir.join("ck.json"))
        .unwrap()
        .unwrap_or_default();
    let mut sm = Summariser::resume(cfg(), ck).unwrap();
    for r in z.read_from(sm.replay_from()) {
        let (seq, s) = r.unwrap();
        sm.handle_sample(seq, &s).unwrap();
    }
    sm
}

fn flush(
    dir: &Path,
    sm: &mut Summariser,
    store: &mut MemoryRollupStore,
    f: edge_node::summariser::Flush,
) {
    store.write_rollups(&f.writes).unwrap();
    save_store(dir, store);
    f.checkpoint.save(&dir.join("ck.json")).unwrap();
    sm.handle_flushed();
}

fn child_main(dir: &Path) {
    let (z, _) = RawZone::open(dir.join("raw"), RawZoneOptions::default()).unwrap();
    let mut store = load_store(dir);
    let mut sm = resume(dir, &z);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = z.durable_next();
    let mut out = std::io::stdout();
    while Instant::now() < deadline {
        let seq = rt.block_on(z.append(sample_of(i))).unwrap();
        writeln!(out, "ACK {seq} {i}").unwrap();
        out.flush().unwrap();
        for r in z.read_from(sm.next_seq()) {
            let (seq, s) = r.unwrap();
            sm.handle_sample(seq, &s).unwrap();
        }
        if let Some(f) = sm.poll_flush(Timestamp(now_of(i))) {
            flush(dir, &mut sm, &mut store, f);
        }
        i += 1;
    }
}

fn run_child_until_killed(dir: &Path, min_acks: usize) -> Vec<(u64, u64)> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "kill9_summariser_counts_every_acknowledged_sample_once",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ACK ") {
                let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
                if tx.send((it.next().unwrap(), it.next().unwrap())).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acks = Vec::new();
    while acks.len() < min_acks {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(a) => acks.push(a),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child produced only {} acks: {e}", acks.len());
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    acks.extend(rx.try_iter());
    acks
}

#[test]
fn kill9_summariser_counts_every_acknowledged_sample_once() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child_main(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acked = BTreeMap::new();
    for _round in 0..3 {
        for (seq, i) in run_child_until_killed(dir.path(), 400) {
            assert!(acked.insert(seq, i).is_none(), "seq {seq} acked twice");
        }
    }
    // Final restart in process: recover, replay, flush everything.
    let (z, _) = RawZone::open(dir.path().join("raw"), RawZoneOptions::default()).unwrap();
    let mut store = load_store(dir.path());
    let had_rollups = !store.rollups.is_empty();
    let mut sm = resume(dir.path(), &z);
    if let Some(f) = sm.force_flush(Timestamp(T0 + 365 * 86_400_000)) {
        flush(dir.path(), &mut sm, &mut store, f);
    }
    let raw: Vec<(u64, Sample)> = z.read_from(0).collect::<Result<_, _>>().unwrap();
    for (seq, i) in &acked {
        assert_eq!(
            raw.get(*seq as usize).map(|r| &r.1),
            Some(&sample_of(*i)),
            "acked seq {seq}"
        );
    }
    let got = merge_parts(&store.rollups);
    let want = summarise_all(raw.iter().map(|r| &r.1), cfg().window_ms);
    let count: u64 = got.values().map(|r| r.count).sum();
    assert_eq!(count, raw.len() as u64, "every stored sample counted once");
    assert_eq!(got, want);
    assert!(had_rollups, "the children flushed before being killed");
    assert!(
        store.rollups.keys().any(|k| k.late_seq.is_some()),
        "the scenario exercises too-late samples"
    );
    z.close();
}

/// A sink that refuses the next `fail` batches.
struct FlakySink {
    store: MemoryRollupStore,
    fail: usize,
}

impl RollupSink for FlakySink {
    type Error = std::io::Error;
    fn write_rollups(
        &mut self,
        writes: &[edge_node::summariser::RollupWrite],
    ) -> Result<(), std::io::Error> {
        if self.fail > 0 {
            self.fail -= 1;
            return Err(std::io::Error::other("document store unavailable"));
        }
        let _ = self.store.write_rollups(writes);
        Ok(())
    }
}

#[test]
fn pipeline_survives_sink_failures_and_restarts() {
    use edge_node::summariser::pipeline::{Pipeline, PipelineError};
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let ck = dir.path().join("ck.json");
    let opts = RawZoneOptions {
        segment_bytes: 4096,
        ..RawZoneOptions::default()
    };
    let (z, _) = RawZone::open(&raw, opts.clone()).unwrap();
    let mut p = Pipeline::open(
        z.clone(),
        &ck,
        cfg(),
        FlakySink {
            store: MemoryRollupStore::default(),
            fail: 0,
        },
    )
    .unwrap();
    let mut failures = 0;
    let mut i = 0u64;
    for round in 0..2 {
        for _ in 0..40 {
            for _ in 0..50 {
                z.try_append(sample_of(i)).unwrap().blocking_wait().unwrap();
                i += 1;
            }
            if i.is_multiple_of(700) {
                // The document store goes away for two steps.
                let (zz, mut sink) = p.into_parts();
                sink.fail = 2;
                p = Pipeline::open(zz, &ck, cfg(), sink).unwrap();
            }
            match p.step(Timestamp(now_of(i))) {
                Ok(_) => {}
                Err(PipelineError::Sink(e)) => {
                    assert!(e.to_string().contains("unavailable"));
                    failures += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        // Retention never removes what a restart would replay.
        let rep = p
            .enforce_retention(Timestamp(now_of(i) + 30 * 86_400_000))
            .unwrap();
        let replay_from = Checkpoint::load(&ck).unwrap().unwrap().replay_from;
        assert!(z.first_seq() <= replay_from, "{rep:?}");
        if round == 0 {
            // Crash: drop everything without a final flush, restart.
            let (zz, sink) = p.into_parts();
            drop(zz);
            p = Pipeline::open(z.clone(), &ck, cfg(), sink).unwrap();
        }
    }
    assert!(failures >= 2, "the sink failed and was retried");
    p.flush_all(Timestamp(now_of(i) + 86_400_000)).unwrap();
    // Retention deleted old raw segments; the rollups still count every
    // sample ever appended (seq j is sample j), once.
    let first = z.first_seq();
    assert!(first > 0, "retention ran");
    let stored: Vec<(u64, Sample)> = z.read_from(0).map(|r| r.unwrap()).collect();
    assert_eq!(stored.first().map(|r| r.0), Some(first));
    let all: Vec<Sample> = (0..i).map(sample_of).collect();
    let got = merge_parts(&p.sink().store.rollups);
    let want = summarise_all(&all, cfg().window_ms);
    assert_eq!(got, want);
}
