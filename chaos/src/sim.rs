//! Many seeds of sync-core's deterministic simulator
//! ([`sync_core::test_utils::Sim`]) in parallel threads, with progress, a
//! seed rate, and failing seeds that replay exactly.
//!
//! Each seed is independent and fully determined by its number and the
//! [`SimConfig`], so the seed range is split dynamically between threads (an
//! atomic counter) and the outcome of a seed does not depend on the thread
//! count. A seed fails when the simulator returns a violation or panics
//! (the panic message becomes the violation). A passing seed's
//! [`SeedReport::trace`] digests the whole run (every fault, edit and frame,
//! and the final heads), so "replays identically" is checked byte for byte.
//!
//! # Throughput
//!
//! CI (`.ci/extra`) runs 10,000 seeds at `--steps 60` in the dev profile,
//! two threads. 60 steps (600 ms of virtual faults) still exercises every
//! fault: over the first 200 seeds, 9156 edits and 315 crashes (each
//! followed by a restart); by the default rates, about 3.6 partitions per
//! seed (3 links x 60 steps x 0.02), 5% of sync frames duplicated, delays
//! of 0-30 ms reordering frames across planes; the slowest liveness phase
//! converged 210 ms of virtual time after healing. Measured on the 2-core development machine, shared with
//! other builds (median of 3 runs of `chaos sim --seeds 200 --steps 60`):
//! 35 seeds/s before, 60 seeds/s after these changes:
//!
//! - the hot crates are optimised in the dev profile too (root
//!   `Cargo.toml`: sync-core, where automerge's and std's generic code is
//!   instantiated, was the largest single gain; ed25519/curve25519, sha2,
//!   automerge's hexane codec and deflate);
//! - a change's signature is verified once per thread instead of once per
//!   receiving node (`sync_core::authz`, keyed by author, change hash and
//!   signature);
//! - the acknowledged-change check looks hashes up in the change graph
//!   instead of rebuilding each change.
//!
//! What remains is mostly sync-core's store and automerge: decoding every
//! change of a sync message (whole documents for small documents) to show
//! them to the guard, `save_after` with deflate per persisted change, and
//! generating sync messages. The nightly mode (`--nightly`: 4 edges, 400
//! steps) costs about 1 CPU-second per seed in the dev profile; run it with
//! `--release`.
//!
//! ```no_run
//! use chaos::sim::{SimPlan, run_one, run_seeds};
//! use std::time::Duration;
//!
//! let plan = SimPlan { from: 0, seeds: 100, threads: 2, ..SimPlan::default() };
//! let summary = run_seeds(&plan, Duration::from_secs(5), &mut |p| eprintln!("{} done", p.done));
//! assert!(summary.failures.is_empty());
//! // Any seed replays on its own with the same outcome.
//! assert_eq!(run_one(7, &plan.cfg), run_one(7, &plan.cfg));
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::check::{self, Evidence, LogLine, Observations, ReplicaHeads, Verdict};
pub use sync_core::test_utils::SimConfig;
use sync_core::test_utils::{Sim, SimReport};

/// The outcome of one passing seed: [`SimReport`]'s fields, comparable and
/// serialisable (a replay must produce an equal value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Virtual time at which every replica agreed, ms.
    pub converged_at_ms: Option<u64>,
    /// Local edits made.
    pub edits: usize,
    /// Node crashes.
    pub crashes: usize,
    /// Frames sent.
    pub frames: u64,
    /// Changes refused by authorisation.
    pub refused: u64,
    /// Hex BLAKE3 digest of the run's trace (faults, edits, every frame,
    /// final heads): a replay must reproduce it exactly.
    pub trace: String,
}

impl From<SimReport> for SeedReport {
    fn from(r: SimReport) -> Self {
        SeedReport {
            seed: r.seed,
            converged_at_ms: r.converged_at_ms,
            edits: r.edits,
            crashes: r.crashes,
            frames: r.frames,
            refused: r.refused,
            trace: r.trace.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// A failing seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedFailure {
    /// The seed.
    pub seed: u64,
    /// What went wrong, as the simulator said it (or the panic message).
    pub violation: String,
    /// Whether the simulator panicked rather than reporting a violation.
    pub panicked: bool,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SimPlan {
    /// First seed.
    pub from: u64,
    /// How many consecutive seeds.
    pub seeds: u64,
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Stop starting new seeds after the first failure.
    pub stop_on_failure: bool,
    /// The simulator's configuration, the same for every seed.
    pub cfg: SimConfig,
}

impl Default for SimPlan {
    fn default() -> Self {
        SimPlan {
            from: 0,
            seeds: 10_000,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            stop_on_failure: true,
            cfg: SimConfig::default(),
        }
    }
}

/// The configuration of `chaos sim --nightly`: more edges, a longer safety
/// phase, otherwise the default fault rates.
pub fn nightly_config() -> SimConfig {
    SimConfig {
        edges: 4,
        steps: 400,
        ..SimConfig::default()
    }
}

/// Progress of a run, reported periodically.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Seeds finished.
    pub done: u64,
    /// Seeds failed so far.
    pub failed: u64,
    /// Seeds planned.
    pub total: u64,
    /// Wall time since the start.
    pub elapsed: Duration,
}

impl Progress {
    /// Seeds per second so far.
    pub fn rate(&self) -> f64 {
        per_sec(self.done, self.elapsed)
    }
}

fn per_sec(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

/// The result of [`run_seeds`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Seeds planned.
    pub planned: u64,
    /// Seeds that ran to an outcome.
    pub run: u64,
    /// Failing seeds, in seed order.
    pub failures: Vec<SeedFailure>,
    /// Wall time.
    pub elapsed: Duration,
    /// Totals over the passing seeds.
    pub edits: u64,
    /// Crashes over the passing seeds.
    pub crashes: u64,
    /// Frames over the passing seeds.
    pub frames: u64,
    /// Largest virtual convergence time among passing seeds, ms.
    pub max_converged_at_ms: u64,
}

impl Summary {
    /// Seeds per second of wall time.
    pub fn seeds_per_sec(&self) -> f64 {
        per_sec(self.run, self.elapsed)
    }
}

/// Run one seed, turning a panic into a failure.
pub fn run_one(seed: u64, cfg: &SimConfig) -> Result<SeedReport, SeedFailure> {
    let cfg = cfg.clone();
    match catch_unwind(AssertUnwindSafe(move || Sim::new(seed, cfg).run(seed))) {
        Ok(Ok(r)) => Ok(r.into()),
        Ok(Err(violation)) => Err(SeedFailure {
            seed,
            violation,
            panicked: false,
        }),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-text payload".to_string());
            Err(SeedFailure {
                seed,
                violation: format!("simulator panicked: {msg}"),
                panicked: true,
            })
        }
    }
}

/// The command line that replays one seed with the same configuration.
pub fn replay_command(seed: u64, cfg: &SimConfig, nightly: bool) -> String {
    let base = if nightly {
        nightly_config()
    } else {
        SimConfig::default()
    };
    let mut cmd = format!("chaos sim --from {seed} --seeds 1");
    if nightly {
        cmd.push_str(" --nightly");
    }
    if cfg.edges != base.edges {
        cmd.push_str(&format!(" --edges {}", cfg.edges));
    }
    if cfg.steps != base.steps {
        cmd.push_str(&format!(" --steps {}", cfg.steps));
    }
    if cfg.liveness_deadline_ms != base.liveness_deadline_ms {
        cmd.push_str(&format!(
            " --liveness-deadline-ms {}",
            cfg.liveness_deadline_ms
        ));
    }
    cmd
}

enum Msg {
    Done(Result<SeedReport, Box<SeedFailure>>),
    Exit,
}

/// Run `plan.seeds` seeds from `plan.from` on `plan.threads` threads,
/// calling `progress` about every `every` (and once at the end).
pub fn run_seeds(plan: &SimPlan, every: Duration, progress: &mut dyn FnMut(&Progress)) -> Summary {
    let start = Instant::now();
    let end = plan.from.saturating_add(plan.seeds);
    let next = AtomicU64::new(plan.from);
    let stop = AtomicBool::new(false);
    let threads = plan.threads.max(1);
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut summary = Summary {
        planned: plan.seeds,
        ..Summary::default()
    };
    let mut failures: Vec<SeedFailure> = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, stop, cfg) = (&next, &stop, &plan.cfg);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let r = run_one(seed, cfg).map_err(Box::new);
                    if r.is_err() && plan.stop_on_failure {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if tx.send(Msg::Done(r)).is_err() {
                        break;
                    }
                }
                let _ = tx.send(Msg::Exit);
            });
        }
        drop(tx);
        let mut exited = 0;
        let mut last = Instant::now();
        while exited < threads {
            let wait = every.saturating_sub(last.elapsed());
            match rx.recv_timeout(wait) {
                Ok(Msg::Done(Ok(r))) => {
                    summary.run += 1;
                    summary.edits += r.edits as u64;
                    summary.crashes += r.crashes as u64;
                    summary.frames += r.frames;
                    summary.max_converged_at_ms = summary
                        .max_converged_at_ms
                        .max(r.converged_at_ms.unwrap_or(0));
                }
                Ok(Msg::Done(Err(f))) => {
                    summary.run += 1;
                    failures.push(*f);
                }
                Ok(Msg::Exit) => exited += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last.elapsed() >= every {
                last = Instant::now();
                let failed = failures.len() as u64;
                progress(&Progress {
                    done: summary.run,
                    failed,
                    total: plan.seeds,
                    elapsed: start.elapsed(),
                });
            }
        }
    });
    summary.elapsed = start.elapsed();
    failures.sort_by_key(|f| f.seed);
    summary.failures = failures;
    progress(&Progress {
        done: summary.run,
        failed: summary.failures.len() as u64,
        total: plan.seeds,
        elapsed: summary.elapsed,
    });
    summary
}

/// The name the evidence uses for simulator node `i` (0 is the hub).
pub fn node_name(i: usize) -> String {
    if i == 0 {
        "hub".to_string()
    } else {
        format!("edge-{i}")
    }
}

/// Turn a failing seed into checker verdicts with the same evidence format
/// as a fleet run: a divergence becomes a failed `convergence` verdict with
/// [`Evidence::Diverged`] (the two replicas the simulator named), a lost
/// acknowledged change [`Evidence::LostChange`], a panic a failed
/// `no-panic` verdict, anything else a failed `sim` verdict quoting the
/// message.
///
/// The simulator only reports its first violation as text
/// (`Sim::run` consumes the `Sim`, and it has no accessor for per-node
/// heads), so this parses that text; the raw message is kept in
/// [`SeedFailure::violation`].
pub fn failure_verdicts(f: &SeedFailure) -> Vec<Verdict> {
    if f.panicked {
        let o = Observations {
            logs: vec![LogLine {
                node: "sim".into(),
                line_no: 1,
                text: format!("seed {} panicked at: {}", f.seed, f.violation),
            }],
            ..Observations::default()
        };
        return vec![check::logs::check(&o)];
    }
    let inner = violation_body(&f.violation);
    if let Some(replicas) = parse_divergence(inner) {
        let o = Observations {
            replicas,
            ..Observations::default()
        };
        return vec![check::convergence::check(&o)];
    }
    if let Some(lost) = parse_lost(inner) {
        return vec![Verdict::new(
            "convergence",
            vec![lost],
            String::new(),
            "an acknowledged change is missing at a replica".into(),
        )];
    }
    vec![Verdict::new(
        "sim",
        vec![Evidence::Violation {
            detail: f.violation.clone(),
        }],
        String::new(),
        format!("seed {} violated an invariant", f.seed),
    )]
}

/// The first violation inside a "no convergence within ..." message.
fn violation_body(v: &str) -> &str {
    let v = match v.find(" of healing: ") {
        Some(i) => &v[i + " of healing: ".len()..],
        None => v,
    };
    match v.rfind("; limit errors: ") {
        Some(i) => &v[..i],
        None => v,
    }
}

fn hashes(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = list;
    while let Some(i) = rest.find("ChangeHash(\"") {
        rest = &rest[i + "ChangeHash(\"".len()..];
        match rest.find('"') {
            Some(j) => {
                out.push(rest[..j].to_string());
                rest = &rest[j..];
            }
            None => break,
        }
    }
    out
}

/// `{doc}: node {j} heads [..] != node {i} heads [..]`
fn parse_divergence(v: &str) -> Option<Vec<ReplicaHeads>> {
    let (doc, rest) = v.split_once(": node ")?;
    let (left, right) = rest.split_once(" != node ")?;
    let side = |s: &str| -> Option<ReplicaHeads> {
        let (idx, list) = s.split_once(" heads ")?;
        let i: usize = idx.trim().parse().ok()?;
        Some(ReplicaHeads {
            node: node_name(i),
            doc: doc.to_string(),
            heads: hashes(list),
        })
    };
    Some(vec![side(left)?, side(right)?])
}

/// `{doc}: change {h} acknowledged by node {i} is missing at node {key}`
fn parse_lost(v: &str) -> Option<Evidence> {
    let (doc, rest) = v.split_once(": change ")?;
    let (change, rest) = rest.split_once(" acknowledged by node ")?;
    let (by, at) = rest.split_once(" is missing at node ")?;
    let by: usize = by.trim().parse().ok()?;
    Some(Evidence::LostChange {
        doc: doc.to_string(),
        change: change.to_string(),
        acked_by: node_name(by),
        missing_at: format!("node {}", at.trim()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            steps: 40,
            ..SimConfig::default()
        }
    }

    #[test]
    fn every_seed_of_a_range_is_run_once() {
        let plan = SimPlan {
            from: 100,
            seeds: 6,
            threads: 3,
            stop_on_failure: false,
            cfg: small(),
        };
        let mut calls = 0;
        let s = run_seeds(&plan, Duration::from_secs(60), &mut |_| calls += 1);
        assert_eq!(s.run, 6);
        assert!(s.failures.is_empty(), "{:?}", s.failures);
        assert!(s.frames > 0);
        assert_eq!(calls, 1, "only the final progress report in a short run");
    }

    #[test]
    fn replay_command_names_non_default_settings() {
        let mut cfg = SimConfig::default();
        assert_eq!(
            replay_command(5, &cfg, false),
            "chaos sim --from 5 --seeds 1"
        );
        cfg.edges = 7;
        assert_eq!(
            replay_command(5, &cfg, false),
            "chaos sim --from 5 --seeds 1 --edges 7"
        );
        assert_eq!(
            replay_command(9, &nightly_config(), true),
            "chaos sim --from 9 --seeds 1 --nightly"
        );
    }

    fn failure(v: &str) -> SeedFailure {
        SeedFailure {
            seed: 3,
            violation: v.into(),
            panicked: false,
        }
    }

    #[test]
    fn a_divergence_becomes_diverged_evidence_with_both_replicas() {
        let f = failure(
            "seed 3: no convergence within 60000 ms of healing: t/acme/s/s1/dev/pump-1: node 0 heads [ChangeHash(\"aa11\"), ChangeHash(\"bb22\")] != node 2 heads [ChangeHash(\"cc33\")]; limit errors: []",
        );
        let vs = failure_verdicts(&f);
        assert_eq!(vs.len(), 1);
        assert_eq!(vs[0].checker, "convergence");
        assert_eq!(vs[0].status, check::Status::Fail);
        match &vs[0].evidence[..] {
            [Evidence::Diverged { doc, replicas }] => {
                assert_eq!(doc, "t/acme/s/s1/dev/pump-1");
                assert_eq!(replicas[0].node, "edge-2");
                assert_eq!(replicas[0].heads, ["cc33"]);
                assert_eq!(replicas[1].node, "hub");
                assert_eq!(replicas[1].heads, ["aa11", "bb22"]);
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_lost_change_a_panic_and_an_unknown_message_all_fail() {
        let lost = failure_verdicts(&failure(
            "seed 3: no convergence within 10 ms of healing: t/acme/s/s1/cmd/2027-01-15: change ab12cd34ef acknowledged by node 1 is missing at node 5f3a; limit errors: []",
        ));
        assert_eq!(lost[0].status, check::Status::Fail);
        assert!(matches!(
            &lost[0].evidence[..],
            [Evidence::LostChange { acked_by, missing_at, change, .. }]
                if acked_by == "edge-1" && missing_at == "node 5f3a" && change == "ab12cd34ef"
        ));
        let p = failure_verdicts(&SeedFailure {
            seed: 4,
            violation: "simulator panicked: edit failed".into(),
            panicked: true,
        });
        assert_eq!(
            (p[0].checker.as_str(), p[0].status),
            ("no-panic", check::Status::Fail)
        );
        let other = failure_verdicts(&failure(
            "seed 3: no convergence within 10 ms of healing: ; limit errors: []",
        ));
        assert_eq!(
            (other[0].checker.as_str(), other[0].status),
            ("sim", check::Status::Fail)
        );
        assert!(other[0].evidence[0].describe().contains("no convergence"));
    }
}
