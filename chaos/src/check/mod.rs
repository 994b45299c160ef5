//! Invariant checkers over a recorded run: pure functions from a
//! [`RunRecord`] (history plus end-of-run observations) to [`Verdict`]s with
//! evidence (the exact documents, samples, commands, ticks and log lines
//! involved, never only a count).
//!
//! | checker | invariant |
//! |---|---|
//! | `convergence` | all replicas of each document have identical heads |
//! | `telemetry` | every acknowledged sample is counted exactly once in the hub's rollups (see [`telemetry`] for what counts and sums can prove) |
//! | `commands` | each command id executed at most once, and only if issued |
//! | `liveness` | no gap between control-loop ticks beyond `period * tolerance`, except while the node was down |
//! | `compliance` | no tenant document on a hub outside its region; no raw data off its site; a global hub holds only fleet aggregates; no site data on another site's edge |
//! | `no-panic` | no panic line in any node's log |
//! | `isolation` | a partitioned relay direction forwarded zero datagrams, and the relay was the only path (one network namespace per node, probes; fleet runs) |
//!
//! A checker with nothing to look at, or whose input is inconsistent (only
//! [`Evidence::Malformed`]), says [`Status::Unknown`] rather than passing: a
//! run that recorded no ticks has not shown that loops never stalled.

pub mod commands;
pub mod compliance;
pub mod convergence;
pub mod history;
pub mod isolation;
pub mod liveness;
pub mod logs;
pub mod telemetry;

use serde::{Deserialize, Serialize};

use schemas::TenantId;
use schemas::ids::{DataClass, DeviceId, SiteId};
use schemas::metrics::Rollup;
use schemas::policy::Region;
use schemas::time::Timestamp;

use crate::scenario::{FaultSpan, Link, NodeRole, NodeSpan, Scenario, TenantSpec};
pub use history::{History, Op, OpType};

/// The outcome of one checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The invariant held.
    Pass,
    /// There was nothing to check (or not enough data to decide).
    Unknown,
    /// The invariant was violated; the evidence says where.
    Fail,
}

impl Status {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Unknown => "unknown",
            Status::Fail => "fail",
        }
    }
}

/// A node of the run and its role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name (as in the scenario).
    pub name: String,
    /// Hub or edge, with region/site.
    pub role: NodeRole,
}

/// The heads of one replica of one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHeads {
    /// The node holding the replica.
    pub node: String,
    /// The document id.
    pub doc: String,
    /// Its heads (change hashes, hex), in any order.
    pub heads: Vec<String>,
}

/// A rollup as held by a hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubRollup {
    /// The hub.
    pub hub: String,
    /// Tenant of the site.
    pub tenant: TenantId,
    /// The site the rollup came from.
    pub site: SiteId,
    /// The rollup.
    pub rollup: Rollup,
}

/// A rollup an edge keeps locally (`local-rollups.json`), not in a
/// document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalRollup {
    /// The edge holding it.
    pub edge: String,
    /// Its site.
    pub site: SiteId,
    /// The bucket's key (`device/metric@window[~unsynced][#late]`).
    pub key: String,
    /// The rollup.
    pub rollup: Rollup,
}

/// A sample an edge recorded (acknowledged, or of unknown outcome).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleObs {
    /// The edge that took it.
    pub edge: String,
    /// Its site.
    pub site: SiteId,
    /// The device.
    pub device: DeviceId,
    /// The metric.
    pub metric: String,
    /// Per (edge, device, metric) sequence number: the sample's identity.
    pub seq: u64,
    /// Timestamp.
    pub ts: Timestamp,
    /// Value.
    pub value: f64,
}

/// One execution of a command by an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandExecution {
    /// The edge that executed it.
    pub edge: String,
    /// The command id.
    pub command_id: String,
    /// When, ms since the run started.
    pub at_ms: i64,
}

/// The tick times of one control loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopTicks {
    /// The node running the loop.
    pub node: String,
    /// The loop's name.
    pub loop_name: String,
    /// Its configured period.
    pub period_ms: i64,
    /// Tick times, ms since the run started.
    pub ticks_ms: Vec<i64>,
}

/// A document (or raw-zone item) a node holds, with its compliance labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDoc {
    /// Document id (or a raw-zone name).
    pub doc: String,
    /// Its data class.
    pub class: DataClass,
    /// Owning tenant, if any.
    #[serde(default)]
    pub tenant: Option<TenantId>,
    /// Originating site, if any.
    #[serde(default)]
    pub site: Option<SiteId>,
    /// The tenant's region as the node labelled it (if absent, taken from
    /// the fleet's tenant list).
    #[serde(default)]
    pub region: Option<Region>,
}

/// What one node holds at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// The node.
    pub node: String,
    /// Its documents.
    pub docs: Vec<HeldDoc>,
}

/// One log line of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The node.
    pub node: String,
    /// 1-based line number in that node's log.
    pub line_no: usize,
    /// The text.
    pub text: String,
}

/// Everything observed at the end of a run (and during it, for ticks and
/// logs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Observations {
    /// The fleet's nodes and roles.
    pub nodes: Vec<NodeInfo>,
    /// Tenants and their regions.
    pub tenants: Vec<TenantSpec>,
    /// Heads of every replica of every document: what convergence judges.
    /// A fleet runner takes them from the live nodes once the fleet is
    /// quiet ([`crate::fleet::run::Fleet::wait_quiescent`]).
    pub replicas: Vec<ReplicaHeads>,
    /// Heads read from each store after the nodes stopped, for the record:
    /// a write during a staggered shutdown (an alarm, a last state report)
    /// may reach some peers and not others, so these can differ from
    /// `replicas` without any sync fault.
    pub stored_replicas: Vec<ReplicaHeads>,
    /// Rollup window the edges used.
    pub rollup_window_ms: i64,
    /// Every hub's telemetry rollups.
    pub hub_rollups: Vec<HubRollup>,
    /// Samples the edges acknowledged as durably stored.
    pub acked_samples: Vec<SampleObs>,
    /// Samples whose write had an unknown outcome (the edge died mid-write):
    /// they may or may not be counted.
    pub indeterminate_samples: Vec<SampleObs>,
    /// Rollups each edge keeps in its local bucket instead of a day
    /// document: windows taken while its clock was implausible
    /// (`clock_unsynced`) and writes to sealed days. Held on the edge: not
    /// lost, and not in any hub.
    pub edge_local_rollups: Vec<LocalRollup>,
    /// Every command execution by every edge.
    pub command_executions: Vec<CommandExecution>,
    /// Control-loop ticks.
    pub loop_ticks: Vec<LoopTicks>,
    /// Documents held per node.
    pub holdings: Vec<Holding>,
    /// Log lines of every node.
    pub logs: Vec<LogLine>,
    /// When nodes were down (killed until restarted).
    pub downtime: Vec<NodeSpan>,
    /// End of the observation window, ms since the run started.
    pub end_ms: i64,
    /// When all replicas first had identical heads after the last heal.
    pub converged_at_ms: Option<i64>,
    /// What the runner could not observe: the named checker says Unknown
    /// (with these reasons) rather than passing on partial data.
    pub unobserved: Vec<Unobserved>,
}

/// Data of one node one checker needs that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unobserved {
    /// The checker that needed it.
    pub checker: String,
    /// The node (`*`: the fleet).
    pub node: String,
    /// What could not be read, and why.
    pub detail: String,
}

/// A checker's verdict given what could not be observed for it. Evidence
/// about a node whose input is missing is set aside (a hub whose store
/// could not be read is not a hub that lost every sample); what remains
/// decides: a failure shown by data that was read stands, otherwise the
/// verdict is Unknown with the reasons as evidence, never a pass.
fn with_unobserved(mut v: Verdict, o: &Observations) -> Verdict {
    let blind: Vec<&Unobserved> = o
        .unobserved
        .iter()
        .filter(|u| u.checker == v.checker)
        .collect();
    if blind.is_empty() {
        return v;
    }
    let about = |e: &Evidence| -> Option<String> {
        match e {
            Evidence::Telemetry(m) => Some(m.hub.clone()),
            Evidence::LoopStall { node, .. } | Evidence::Compliance { node, .. } => {
                Some(node.clone())
            }
            _ => None,
        }
    };
    let before = v.evidence.len();
    v.evidence
        .retain(|e| about(e).is_none_or(|n| !blind.iter().any(|u| u.node == n)));
    let set_aside = before - v.evidence.len();
    let proven = v
        .evidence
        .iter()
        .any(|e| !matches!(e, Evidence::Malformed { .. }));
    v.evidence.extend(blind.iter().map(|u| Evidence::Malformed {
        detail: format!("not observed on {}: {}", u.node, u.detail),
    }));
    if !proven {
        v.status = Status::Unknown;
        v.summary = format!(
            "{} input(s) could not be observed{}",
            blind.len(),
            if set_aside > 0 {
                format!(" ({set_aside} finding(s) about them set aside)")
            } else {
                String::new()
            }
        );
    }
    v
}

/// Everything a run produced: the input of the checkers and the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    /// Scenario name.
    pub scenario: String,
    /// Seed of the run.
    pub seed: u64,
    /// Length of the fault phase.
    pub duration_ms: i64,
    /// Every node pair that talks (each had its own relay).
    pub links: Vec<Link>,
    /// Link faults over time.
    pub faults: Vec<FaultSpan>,
    /// Loop period tolerance (default 3).
    pub loop_period_tolerance: Option<f64>,
    /// Checkers to run (empty: all).
    pub checkers: Vec<String>,
    /// The history of client operations.
    pub history: History,
    /// End-of-run observations.
    pub observations: Observations,
    /// Relay counters per fault window (fleet runs): the measured traffic
    /// of each direction while it had faults.
    pub relay_windows: Vec<RelayWindow>,
    /// How the fleet's nodes were isolated from each other, with the
    /// direct-path probes that show it (fleet runs).
    pub isolation: Option<isolation::IsolationSetup>,
}

/// What one relay direction carried while a fault was set on it, from
/// the relay's own counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayWindow {
    /// The link (`a <-> b`).
    pub link: String,
    /// `a-to-b` or `b-to-a`.
    pub direction: String,
    /// The faults (`partition`, or their description).
    pub faults: String,
    /// Start, ms since the run started.
    pub from_ms: i64,
    /// End.
    pub to_ms: i64,
    /// Datagrams the sender sent into the relay.
    pub packets_in: u64,
    /// Datagrams delivered to the receiver: zero for a partition.
    pub forwarded: u64,
    /// Dropped by the partition.
    pub dropped_partition: u64,
    /// Dropped otherwise (loss, queue, unknown peer).
    pub dropped_other: u64,
}

impl RunRecord {
    /// A record pre-filled from a scenario: name, seed, duration, links,
    /// fault spans, nodes, tenants, downtime, checker settings. A runner
    /// adds the history and the rest of the observations.
    pub fn from_scenario(s: &Scenario) -> RunRecord {
        let duration_ms = s.duration.as_millis() as i64;
        RunRecord {
            scenario: s.name.clone(),
            seed: s.seed,
            duration_ms,
            links: s.fleet.links(),
            faults: s.fault_spans(),
            loop_period_tolerance: Some(s.checks.loop_period_tolerance),
            checkers: s.checks.checkers.clone(),
            history: History::default(),
            relay_windows: Vec::new(),
            isolation: None,
            observations: Observations {
                nodes: s
                    .fleet
                    .nodes()
                    .into_iter()
                    .map(|(name, role)| NodeInfo { name, role })
                    .collect(),
                tenants: s.fleet.tenants.clone(),
                downtime: s.downtime(),
                end_ms: duration_ms,
                ..Observations::default()
            },
        }
    }
}

/// A piece of evidence for a verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// Replicas of one document disagree.
    Diverged {
        /// The document.
        doc: String,
        /// Every replica and its heads.
        replicas: Vec<ReplicaHeads>,
    },
    /// A telemetry window whose rollup does not account for its samples.
    Telemetry(Box<telemetry::WindowMismatch>),
    /// A command id executed more than once.
    CommandRepeated {
        /// The command id.
        command_id: String,
        /// Every execution of it.
        executions: Vec<CommandExecution>,
    },
    /// A command executed that no client issued.
    CommandNotIssued {
        /// The command id.
        command_id: String,
        /// Its executions.
        executions: Vec<CommandExecution>,
    },
    /// A control loop did not tick for too long.
    LoopStall {
        /// The node.
        node: String,
        /// The loop.
        loop_name: String,
        /// Its period.
        period_ms: i64,
        /// Last tick before the gap (or the start of observation).
        from_ms: i64,
        /// First tick after the gap (or the end of observation).
        to_ms: i64,
        /// Longest gap allowed.
        allowed_ms: i64,
    },
    /// A document on the wrong side of a compliance boundary.
    Compliance {
        /// The node holding it.
        node: String,
        /// The document.
        doc: HeldDoc,
        /// The rule broken.
        rule: String,
    },
    /// A panic in a log.
    Panic {
        /// The log line.
        line: LogLine,
    },
    /// A change a node acknowledged (flushed) is missing at a replica.
    LostChange {
        /// The document.
        doc: String,
        /// The change hash (hex).
        change: String,
        /// The node that acknowledged it.
        acked_by: String,
        /// The replica that lacks it.
        missing_at: String,
    },
    /// A violation reported in words only (a simulator message that has no
    /// structured form).
    Violation {
        /// What was reported.
        detail: String,
    },
    /// A partitioned relay direction delivered datagrams.
    Leak {
        /// The window.
        window: RelayWindow,
    },
    /// The input itself is inconsistent.
    Malformed {
        /// What is wrong.
        detail: String,
    },
}

impl Evidence {
    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            Evidence::Diverged { doc, replicas } => {
                let parts: Vec<String> = replicas
                    .iter()
                    .map(|r| format!("{}=[{}]", r.node, short_heads(&r.heads)))
                    .collect();
                format!("{doc} diverged: {}", parts.join(" "))
            }
            Evidence::Telemetry(m) => m.describe(),
            Evidence::CommandRepeated {
                command_id,
                executions,
            } => {
                let parts: Vec<String> = executions
                    .iter()
                    .map(|e| format!("{}@{}ms", e.edge, e.at_ms))
                    .collect();
                format!(
                    "command {command_id} executed {} times: {}",
                    executions.len(),
                    parts.join(", ")
                )
            }
            Evidence::CommandNotIssued {
                command_id,
                executions,
            } => format!(
                "command {command_id} executed {} time(s) but never issued",
                executions.len()
            ),
            Evidence::LoopStall {
                node,
                loop_name,
                period_ms,
                from_ms,
                to_ms,
                allowed_ms,
            } => format!(
                "{node} loop {loop_name} (period {period_ms}ms) did not tick from {from_ms}ms to {to_ms}ms: gap {}ms > allowed {allowed_ms}ms",
                to_ms - from_ms
            ),
            Evidence::Compliance { node, doc, rule } => {
                format!("{node} holds {} ({:?}): {rule}", doc.doc, doc.class)
            }
            Evidence::Panic { line } => {
                format!("{} log line {}: {}", line.node, line.line_no, line.text)
            }
            Evidence::LostChange {
                doc,
                change,
                acked_by,
                missing_at,
            } => format!(
                "{doc}: change {} acknowledged by {acked_by} is missing at {missing_at}",
                change.chars().take(8).collect::<String>()
            ),
            Evidence::Violation { detail } => detail.clone(),
            Evidence::Leak { window: w } => format!(
                "{} {} partitioned from {}ms to {}ms forwarded {} of {} datagrams",
                w.link, w.direction, w.from_ms, w.to_ms, w.forwarded, w.packets_in
            ),
            Evidence::Malformed { detail } => format!("malformed input: {detail}"),
        }
    }
}

fn short_heads(h: &[String]) -> String {
    h.iter()
        .map(|x| x.chars().take(8).collect::<String>())
        .collect::<Vec<_>>()
        .join(",")
}

/// The outcome of one checker with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Checker name (see [`crate::scenario::CHECKERS`]).
    pub checker: String,
    /// Pass, fail or unknown.
    pub status: Status,
    /// One sentence.
    pub summary: String,
    /// What was found (empty on pass).
    pub evidence: Vec<Evidence>,
}

impl Verdict {
    pub(crate) fn new(checker: &str, evidence: Vec<Evidence>, pass: String, fail: String) -> Self {
        // Evidence that only says the input is inconsistent cannot convict
        // the system: the run is undecided, not failed.
        let only_malformed = evidence
            .iter()
            .all(|e| matches!(e, Evidence::Malformed { .. }));
        let status = if evidence.is_empty() {
            Status::Pass
        } else if only_malformed {
            Status::Unknown
        } else {
            Status::Fail
        };
        Verdict {
            checker: checker.to_string(),
            status,
            summary: if evidence.is_empty() { pass } else { fail },
            evidence,
        }
    }

    pub(crate) fn unknown(checker: &str, why: &str) -> Self {
        Verdict {
            checker: checker.to_string(),
            status: Status::Unknown,
            summary: why.to_string(),
            evidence: Vec::new(),
        }
    }
}

impl Verdict {
    /// A vacuous pass: the invariant holds because the run gave it nothing
    /// to hold for (no partition to leak through, no command to repeat).
    /// The summary says so; this is not "could not observe" ([`Status::Unknown`]).
    pub(crate) fn vacuous(checker: &str, why: &str) -> Self {
        Verdict {
            checker: checker.to_string(),
            status: Status::Pass,
            summary: format!("vacuous: {why}"),
            evidence: Vec::new(),
        }
    }
}

/// Run the requested checkers (all when `record.checkers` is empty).
pub fn run_checks(record: &RunRecord) -> Vec<Verdict> {
    let o = &record.observations;
    let tol = record.loop_period_tolerance.unwrap_or(3.0);
    let all = record.checkers.is_empty();
    let want = |n: &str| all || record.checkers.iter().any(|c| c == n);
    let mut out = Vec::new();
    if want("convergence") {
        out.push(convergence::check_linked(o, &record.links));
    }
    if want("telemetry") {
        out.push(with_unobserved(telemetry::check(o), o));
    }
    if want("commands") {
        out.push(with_unobserved(commands::check(&record.history, o), o));
    }
    if want("liveness") {
        out.push(with_unobserved(liveness::check(o, tol), o));
    }
    if want("compliance") {
        out.push(with_unobserved(compliance::check(o), o));
    }
    if want("no-panic") {
        out.push(logs::check(o));
    }
    // Only fleet runs measure relays; a record without windows has nothing
    // to say here (not even unknown).
    let cuts = record.faults.iter().any(|f| f.kind == "partition");
    if !record.relay_windows.is_empty() && !cuts {
        out.push(Verdict::vacuous(
            "isolation",
            "the scenario cuts no link, so there is no partition to leak through",
        ));
    } else if !record.relay_windows.is_empty() {
        out.push(isolation::check(
            &record.relay_windows,
            record.isolation.as_ref(),
        ));
    }
    out
}

/// The overall status: fail if any checker failed, else unknown if any was
/// unknown, else pass.
pub fn overall(verdicts: &[Verdict]) -> Status {
    verdicts
        .iter()
        .map(|v| v.status)
        .max()
        .unwrap_or(Status::Unknown)
}

/// Exit code convention of `chaos`: 0 pass, 1 fail, 2 error (including a
/// run that could not be judged: an overall unknown).
pub fn exit_code(status: Status) -> i32 {
    match status {
        Status::Pass => 0,
        Status::Fail => 1,
        Status::Unknown => 2,
    }
}

#[cfg(test)]
mod run_checks_tests {
    use super::*;

    fn window(faults: &str) -> RelayWindow {
        RelayWindow {
            link: "a<->b".into(),
            direction: "a-to-b".into(),
            faults: faults.into(),
            from_ms: 0,
            to_ms: 10,
            packets_in: 5,
            forwarded: 5,
            dropped_partition: 0,
            dropped_other: 0,
        }
    }

    fn verdict<'a>(vs: &'a [Verdict], name: &str) -> &'a Verdict {
        vs.iter().find(|v| v.checker == name).unwrap()
    }

    #[test]
    fn isolation_and_commands_are_vacuous_only_when_nothing_could_violate_them() {
        let mut r = RunRecord {
            relay_windows: vec![window("total")],
            ..RunRecord::default()
        };
        let vs = run_checks(&r);
        for name in ["isolation", "commands"] {
            let v = verdict(&vs, name);
            assert_eq!(v.status, Status::Pass, "{v:?}");
            assert!(v.summary.starts_with("vacuous"), "{v:?}");
        }
        // A partition in the scenario: isolation must be judged (here it
        // has no probes, so it cannot pass).
        r.faults.push(crate::scenario::FaultSpan {
            link: crate::scenario::Link {
                a: "a".into(),
                b: "b".into(),
            },
            direction: "a-to-b".into(),
            kind: "partition".into(),
            label: "partition".into(),
            from_ms: 0,
            to_ms: 10,
        });
        // A command execution nobody issued is no longer vacuous either.
        r.observations.command_executions.push(CommandExecution {
            edge: "e".into(),
            command_id: "c1".into(),
            at_ms: 1,
        });
        let vs = run_checks(&r);
        assert_ne!(verdict(&vs, "isolation").status, Status::Pass);
        assert!(!verdict(&vs, "isolation").summary.starts_with("vacuous"));
        assert!(!verdict(&vs, "commands").summary.starts_with("vacuous"));
    }
}
