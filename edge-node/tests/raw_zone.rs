//! Integration tests of the raw zone: durability, recovery after kill -9 and
//! torn tails, write errors, retention, readers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_node::raw_zone::{RawZone, RawZoneError, RawZoneOptions};
use schemas::ids::DeviceId;
use schemas::metrics::{Sample, Unit};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;

const T0: i64 = 1_700_000_000_000;

fn sample(i: u64) -> Sample {
    Sample {
        schema_version: SchemaVersion::default(),
        device: DeviceId::new(format!("dev-{}", i % 3)).unwrap(),
        metric: "temperature".into(),
        ts: Timestamp(T0 + i as i64),
        value: i as f64,
        unit: Unit::Celsius,
    }
}

fn small_opts() -> RawZoneOptions {
    RawZoneOptions {
        segment_bytes: 2048,
        ..RawZoneOptions::default()
    }
}

fn read_all(z: &RawZone, from: u64) -> Vec<(u64, Sample)> {
    z.read_from(from).collect::<Result<Vec<_>, _>>().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn concurrent_appends_are_durable_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (z, rep) = RawZone::open(dir.path(), small_opts()).unwrap();
    assert_eq!(rep.next_seq, 0);
    let acks = rt().block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let z = z.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for k in 0..100u64 {
                    let i = t * 1000 + k;
                    got.push((z.append(sample(i)).await.unwrap(), i));
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert_eq!(acks.len(), 800);
    assert_eq!(z.durable_next(), 800);
    let segs = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(segs > 3, "small segments should rotate, got {segs}");
    let read = read_all(&z, 0);
    let seqs: Vec<u64> = read.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..800).collect::<Vec<_>>());
    for (seq, i) in &acks {
        assert_eq!(read[*seq as usize].1, sample(*i));
    }
    // Reading from the middle starts there.
    let mid = read_all(&z, 431);
    assert_eq!(mid.first().map(|r| r.0), Some(431));
    assert_eq!(mid.len(), 800 - 431);
    // A second open of the same directory is refused while this one lives.
    let e = RawZone::open(dir.path(), small_opts()).unwrap_err();
    assert!(matches!(e, RawZoneError::Locked(_)), "{e}");
    z.close();

    // Reopen: everything is there and seqs continue.
    let (z, rep) = RawZone::open(dir.path(), small_opts()).unwrap();
    assert_eq!(
        (rep.next_seq, rep.records, rep.truncated_bytes),
        (800, 800, 0)
    );
    let seq = rt().block_on(z.append(sample(5))).unwrap();
    assert_eq!(seq, 800);
    z.close();
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

#[test]
fn torn_and_corrupt_tails_are_truncated_and_the_log_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (z, _) = RawZone::open(dir.path(), RawZoneOptions::default()).unwrap();
    let r = rt();
    for i in 0..10 {
        r.block_on(z.append(sample(i))).unwrap();
    }
    z.close();
    let seg = last_segment(dir.path());
    let full = std::fs::read(&seg).unwrap();

    // Torn: half a record appended (a crash mid-write).
    let mut torn = full.clone();
    torn.extend_from_slice(&full[8..8 + 20]);
    std::fs::write(&seg, &torn).unwrap();
    let (z, rep) = RawZone::open(dir.path(), RawZoneOptions::default()).unwrap();
    assert_eq!((rep.records, rep.truncated_bytes), (10, 20));
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), full.len() as u64);
    assert_eq!(r.block_on(z.append(sample(10))).unwrap(), 10);
    z.close();

    // Corrupt: flip a bit in the last record's payload.
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let (z, rep) = RawZone::open(dir.path(), RawZoneOptions::default()).unwrap();
    assert_eq!(rep.records, 10, "the corrupt record is dropped");
    assert!(rep.truncated_bytes > 0);
    let read = read_all(&z, 0);
    assert_eq!(read.len(), 10);
    assert_eq!(read[9].1, sample(9));
    // The corrupt record's seq is reused by the next append: it was never
    // acknowledged as durable in a readable form.
    assert_eq!(r.block_on(z.append(sample(11))).unwrap(), 10);
    z.close();
}

#[test]
fn unknown_segment_format_is_refused_not_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join(format!("{:020}.seg", 0));
    std::fs::write(&seg, b"FSRZ\x09\0\0\0garbage").unwrap();
    let e = RawZone::open(dir.path(), RawZoneOptions::default()).unwrap_err();
    assert!(e.to_string().contains("format version 9"), "{e}");
    assert_eq!(std::fs::read(&seg).unwrap().len(), 15, "file untouched");
}

#[test]
fn write_failure_is_reported_and_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (z, _) = RawZone::open(dir.path(), RawZoneOptions::default()).unwrap();
    let r = rt();
    assert_eq!(r.block_on(z.append(sample(0))).unwrap(), 0);
    z.inject_write_failures(1);
    let e = r.block_on(z.append(sample(1))).unwrap_err();
    match &e {
        RawZoneError::Io { kind, .. } => assert_eq!(*kind, std::io::ErrorKind::StorageFull),
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains("no space"), "{e}");
    // The next append works and takes the next seq: no hole, no ghost.
    assert_eq!(r.block_on(z.append(sample(2))).unwrap(), 1);
    let read = read_all(&z, 0);
    assert_eq!(
        read.iter().map(|(_, s)| s.value).collect::<Vec<_>>(),
        vec![0.0, 2.0]
    );
    // Bad samples are refused with a reason.
    let mut bad = sample(3);
    bad.value = f64::NAN;
    let e = r.block_on(z.append(bad)).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
    z.close();
}

#[test]
fn retention_deletes_old_segments_but_not_unsummarised_ones() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RawZoneOptions {
        segment_bytes: 1024,
        retention_ms: 3_600_000,
        retention_bytes: 1 << 30,
        ..RawZoneOptions::default()
    };
    let (z, _) = RawZone::open(dir.path(), opts.clone()).unwrap();
    let r = rt();
    for i in 0..200 {
        r.block_on(z.append(sample(i))).unwrap();
    }
    let before = z.total_bytes();
    // Nothing is old yet.
    let rep = z.enforce_retention(Timestamp(T0 + 1000), u64::MAX).unwrap();
    assert_eq!(rep.deleted_segments, 0);
    // Two hours later everything but the active segment is old, but the
    // summariser still needs seq 100 onwards.
    let later = Timestamp(T0 + 2 * 3_600_000);
    let rep = z.enforce_retention(later, 100).unwrap();
    assert!(rep.deleted_segments > 0);
    let first = z.first_seq();
    assert!(first > 0 && first <= 100, "first_seq {first}");
    let read = read_all(&z, 0);
    assert_eq!(
        read.first().map(|r| r.0),
        Some(first),
        "reader skips the hole"
    );
    assert_eq!(read.last().map(|r| r.0), Some(199));
    let rep = z.enforce_retention(later, u64::MAX).unwrap();
    assert!(rep.deleted_segments > 0);
    assert!(z.total_bytes() < before / 4);
    z.close();

    // Size budget: keeps at most about the budget.
    let dir = tempfile::tempdir().unwrap();
    let opts = RawZoneOptions {
        segment_bytes: 1024,
        retention_bytes: 4096,
        ..RawZoneOptions::default()
    };
    let (z, _) = RawZone::open(dir.path(), opts.clone()).unwrap();
    for i in 0..300 {
        r.block_on(z.append(sample(i))).unwrap();
    }
    let rep = z.enforce_retention(Timestamp(T0), 0).unwrap();
    assert!(rep.blocked_by_keep_from && rep.deleted_segments == 0);
    let rep = z.enforce_retention(Timestamp(T0), u64::MAX).unwrap();
    assert!(rep.total_bytes <= 4096, "{rep:?}");
    z.close();
    // Seqs survive a reopen even after deletion.
    let (z, rep) = RawZone::open(dir.path(), opts).unwrap();
    assert_eq!(rep.next_seq, 300);
    z.close();
}

#[test]
fn try_append_never_waits() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RawZoneOptions {
        queue_capacity: 4,
        ..RawZoneOptions::default()
    };
    let (z, _) = RawZone::open(dir.path(), opts).unwrap();
    let mut acks = Vec::new();
    let mut full = 0;
    for i in 0..2000 {
        match z.try_append(sample(i)) {
            Ok(a) => acks.push(a),
            Err(RawZoneError::QueueFull { sample, .. }) => {
                assert_eq!(sample.value, i as f64, "refused sample handed back");
                full += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let seqs: Vec<u64> = acks
        .into_iter()
        .map(|a| a.blocking_wait().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(seqs.len() + full, 2000);
    z.close();
}

const CHILD_ENV: &str = "FIELDSYNC_RAW_ZONE_CHILD_DIR";
const CHILD_BASE_ENV: &str = "FIELDSYNC_RAW_ZONE_CHILD_BASE";

/// Child mode: append forever from many tasks, printing `ACK seq i` for each
/// acknowledged sample, until killed (or a safety deadline).
fn child_main(dir: &str, base: u64) {
    let (z, _) = RawZone::open(dir, small_opts()).unwrap();
    let counter = Arc::new(AtomicU64::new(base));
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    rt().block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (z, counter, out) = (z.clone(), counter.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let i = counter.fetch_add(1, Ordering::SeqCst);
                    let seq = z.append(sample(i)).await.unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ACK {seq} {i}").unwrap();
                    o.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Spawn this test binary in child mode, let it acknowledge at least
/// `min_acks` samples, SIGKILL it, and return every ack it printed.
fn run_child_until_killed(test: &str, envs: &[(&str, String)], min_acks: usize) -> Vec<(u64, u64)> {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ACK ") {
                let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
                let (seq, i) = (it.next().unwrap(), it.next().unwrap());
                if tx.send((seq, i)).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acks = Vec::new();
    while acks.len() < min_acks {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(a) => acks.push(a),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child produced only {} acks: {e}", acks.len());
            }
        }
    }
    child.kill().unwrap(); // SIGKILL on unix: mid-write, no cleanup
    child.wait().unwrap();
    reader.join().unwrap();
    acks.extend(rx.try_iter());
    acks
}

#[test]
fn kill9_loses_no_acknowledged_sample() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let base = std::env::var(CHILD_BASE_ENV).unwrap().parse().unwrap();
        child_main(&dir, base);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..3u64 {
        let acks = run_child_until_killed(
            "kill9_loses_no_acknowledged_sample",
            &[
                (CHILD_ENV, dir.path().display().to_string()),
                (CHILD_BASE_ENV, (round * 1_000_000).to_string()),
            ],
            1500,
        );
        for (seq, i) in acks {
            assert!(acked.insert(seq, i).is_none(), "seq {seq} acked twice");
        }
        let (z, rep) = RawZone::open(dir.path(), small_opts()).unwrap();
        let read = read_all(&z, 0);
        eprintln!(
            "round {round}: {} acked, {} stored, {} torn bytes cut",
            acked.len(),
            read.len(),
            rep.truncated_bytes
        );
        // In order, each seq once, contiguous.
        let seqs: Vec<u64> = read.iter().map(|r| r.0).collect();
        assert_eq!(seqs, (0..rep.next_seq).collect::<Vec<_>>(), "round {round}");
        // Every acknowledged sample is present with its content.
        for (seq, i) in &acked {
            let got = read.get(*seq as usize).map(|r| &r.1);
            assert_eq!(
                got,
                Some(&sample(*i)),
                "acked seq {seq} (sample {i}) round {round}"
            );
        }
        // No sample stored twice.
        let mut values = HashSet::new();
        for (_, s) in &read {
            assert!(
                values.insert(s.value.to_bits()),
                "sample {} stored twice",
                s.value
            );
        }
        z.close();
    }
    assert!(acked.len() >= 4500);
}

#[test]
fn readers_seek_through_the_sparse_index_before_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (z, _) = RawZone::open(dir.path(), RawZoneOptions::default()).unwrap();
    // ~70 bytes a record: 6000 records span several 64 KiB index steps.
    let acks: Vec<_> = (0..6000)
        .map(|i| z.try_append(sample(i)).unwrap())
        .collect();
    for (i, a) in acks.into_iter().enumerate() {
        assert_eq!(a.blocking_wait().unwrap(), i as u64);
    }
    let check = |z: &RawZone| {
        for from in [0u64, 1, 937, 2500, 3333, 5999] {
            let got = read_all(z, from);
            assert_eq!(got.len() as u64, 6000 - from, "from {from}");
            assert_eq!(got[0], (from, sample(from)));
            assert_eq!(got.last().unwrap(), &(5999, sample(5999)));
        }
        assert!(read_all(z, 6000).is_empty());
    };
    check(&z);
    z.close();
    let (z, rep) = RawZone::open(dir.path(), RawZoneOptions::default()).unwrap();
    assert_eq!(rep.records, 6000);
    check(&z);
    z.close();
}
