//! kill -9 of a process writing to the sled-backed store loses no
//! acknowledged (flushed) change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use schemas::ids::DocId;
use schemas::metrics::{Rollup, Sample};
use schemas::time::Timestamp;
use sync_core::docs::telemetry;
use sync_core::identity::NodeKey;
use sync_core::storage::SledStorage;
use sync_core::store::{DocStore, StoreConfig};

const CHILD_ENV: &str = "FIELDSYNC_RESTART_CHILD_DIR";
const NOW: Timestamp = Timestamp(1_800_000_000_000);

fn doc() -> DocId {
    DocId::telemetry(
        &"acme".parse().unwrap(),
        &"s1".parse().unwrap(),
        &"d1".parse().unwrap(),
        NOW.day(),
    )
}

fn rollup(i: u64) -> Rollup {
    let s = Sample {
        schema_version: Default::default(),
        device: "d1".parse().unwrap(),
        metric: format!("m{i}"),
        ts: NOW,
        value: i as f64,
        unit: Default::default(),
    };
    Rollup::of_sample(&s, 60_000)
}

fn open(dir: &std::path::Path) -> DocStore {
    let key = NodeKey::from_bytes([5; 32]);
    let cfg = StoreConfig {
        compact_after_chunks: 16,
        ..StoreConfig::default()
    };
    DocStore::open(
        Arc::new(SledStorage::open(dir).unwrap()),
        key.clone(),
        key.new_actor(),
        cfg,
    )
    .unwrap()
}

/// In the child: write forever, print each index once it is durable.
fn child(dir: &str) {
    let store = open(std::path::Path::new(dir));
    for i in 0.. {
        store
            .change(&doc(), NOW, |d| {
                telemetry::put_rollup(d, &rollup(i)).map(|_| ())
            })
            .unwrap();
        // Every third change is acknowledged; the others may be lost.
        if i % 3 == 0 {
            store.flush().unwrap();
            println!("acked {i}");
        }
    }
}

#[test]
fn kill_minus_nine_loses_no_acknowledged_change() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut c = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kill_minus_nine_loses_no_acknowledged_change",
                "--nocapture",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = c.stdout.take().unwrap();
        let mut last = None;
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("acked ") {
                last = Some(n.parse::<u64>().unwrap());
                if last >= Some(60) {
                    break;
                }
            }
        }
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        let last = last.expect("child acknowledged nothing");
        let store = open(dir.path());
        let (rollups, bad) = store
            .read(&doc(), telemetry::rollups)
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(bad.is_empty(), "undecodable entries after kill -9: {bad:?}");
        let have: std::collections::BTreeSet<String> =
            rollups.iter().map(|r| r.metric.clone()).collect();
        for i in (0..=last).step_by(3) {
            assert!(
                have.contains(&format!("m{i}")),
                "round {round}: acknowledged change m{i} lost (last acked {last})"
            );
        }
        drop(store);
    }
}
