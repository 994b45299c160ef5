//! The simulator runner: a bounded range of seeds passes, a pinned seed
//! replays to the same report, a failing seed is reported with its
//! evidence and replays to the same failure, and the CLI exits 1 with the
//! replay command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chaos::check::Status;
use chaos::sim::{self, SimConfig, SimPlan};

fn quick() -> SimConfig {
    SimConfig {
        steps: 60,
        ..SimConfig::default()
    }
}

#[test]
fn a_bounded_range_of_seeds_passes() {
    let plan = SimPlan {
        from: 1000,
        seeds: 12,
        threads: 2,
        stop_on_failure: false,
        cfg: quick(),
    };
    let s = sim::run_seeds(&plan, Duration::from_secs(30), &mut |_| {});
    assert!(s.failures.is_empty(), "failing seeds: {:?}", s.failures);
    assert_eq!(s.run, 12);
    assert!(s.edits > 0 && s.frames > 0, "the runs did something: {s:?}");
    assert!(s.seeds_per_sec() > 0.0);
}

/// Pinned seed: guards that a seed is a full description of a run (the
/// replay command printed for a failure must reproduce it).
#[test]
fn a_pinned_seed_replays_identically() {
    let cfg = SimConfig::default();
    let a = sim::run_one(424242, &cfg).expect("pinned seed passes");
    let b = sim::run_one(424242, &cfg).expect("pinned seed passes again");
    // Equal reports include equal trace digests: the same faults, edits,
    // frames (byte for byte) and final heads.
    assert_eq!(a, b);
    assert_eq!(a.trace.len(), 64, "hex BLAKE3: {}", a.trace);
    assert_eq!(a.seed, 424242);
    assert!(a.converged_at_ms.is_some());
    assert!(a.edits > 0 && a.frames > 0);
    // Another seed is another run.
    let c = sim::run_one(424243, &cfg).expect("neighbour seed passes");
    assert_ne!((a.edits, a.frames), (c.edits, c.frames));
    assert_ne!(a.trace, c.trace);
}

/// A liveness deadline of one step cannot be met by a run with pending
/// edits: the failure path must report the seed, evidence that fails, and
/// replay to the same violation.
fn impossible() -> SimConfig {
    SimConfig {
        steps: 30,
        liveness_deadline_ms: 10,
        ..SimConfig::default()
    }
}

#[test]
fn a_failing_seed_is_reported_with_evidence_and_replays() {
    let plan = SimPlan {
        from: 0,
        seeds: 20,
        threads: 2,
        stop_on_failure: false,
        cfg: impossible(),
    };
    let s = sim::run_seeds(&plan, Duration::from_secs(30), &mut |_| {});
    let f = s
        .failures
        .first()
        .expect("some seed misses a 10 ms deadline");
    assert!(s.failures.windows(2).all(|w| w[0].seed < w[1].seed));
    let again = sim::run_one(f.seed, &plan.cfg).expect_err("replay fails too");
    assert_eq!(&again, f);
    let vs = sim::failure_verdicts(f);
    assert!(vs.iter().any(|v| v.status == Status::Fail), "{vs:?}");
    assert!(vs.iter().all(|v| !v.evidence.is_empty()));
}

#[test]
fn the_cli_exits_1_and_prints_the_replay_command() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args([
            "sim",
            "--seeds",
            "20",
            "--threads",
            "2",
            "--steps",
            "30",
            "--liveness-deadline-ms",
            "10",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL seed "), "{stdout}");
    let replay = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("replay: "))
        .expect("a replay line");
    assert!(
        replay.starts_with("chaos sim --from ")
            && replay.ends_with("--seeds 1 --steps 30 --liveness-deadline-ms 10"),
        "{replay}"
    );
    assert!(stdout.contains("seeds/s"), "{stdout}");
    // The replay command itself reproduces the failure.
    let args: Vec<&str> = replay.split_whitespace().skip(1).collect();
    let rerun = std::process::Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(rerun.status.code(), Some(1));
    let seed_line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("FAIL seed "))
            .map(str::to_string)
    };
    assert_eq!(
        seed_line(&String::from_utf8_lossy(&rerun.stdout)),
        seed_line(&stdout)
    );
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["sim", "--seeds", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seeds 0"));
}
