//! Isolation: while a relay direction is partitioned, the pair exchanges
//! nothing, by any path.
//!
//! Two pieces of evidence are needed, and a pass needs both:
//! - the relay's own counters for every partition window: datagrams were
//!   sent into the cut and zero were forwarded;
//! - proof that the relay was the only path: every node ran in its own
//!   network namespace ([`IsolationSetup::mode`] `netns`) and, for every
//!   partitioned pair, probes from inside each node to the other's real
//!   sync address (UDP send and TCP connect) found no route.
//!
//! Without the second (nodes sharing loopback), iroh can learn a peer's
//! real address inside the QUIC connection and route around the relay
//! (`chaos/notes/bypass-finding.md`): a relay that forwarded nothing then
//! proves nothing, so the verdict is unknown, never pass.

use serde::{Deserialize, Serialize};

use super::{Evidence, RelayWindow, Verdict};

/// How the run isolated its nodes, with the probes that show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IsolationSetup {
    /// `netns` (one network namespace per node) or `loopback` (all nodes
    /// share the host's loopback: the relay can be bypassed).
    pub mode: String,
    /// Direct-path probes between nodes, made at start-up.
    pub probes: Vec<DirectProbe>,
}

/// One probe from inside one node's namespace towards another node's real
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectProbe {
    /// The node the probe ran beside (inside its namespace).
    pub from: String,
    /// The node probed (`gateway` for the positive control).
    pub to: String,
    /// `udp` or `tcp`.
    pub proto: String,
    /// The address probed.
    pub target: String,
    /// `unreachable`, `sent`, `connected`, `refused`, `timeout`, `error`.
    pub outcome: String,
    /// The OS error or what came back.
    pub detail: String,
}

impl DirectProbe {
    fn describe(&self) -> String {
        format!(
            "{} -> {} {} {}: {} ({})",
            self.from, self.to, self.proto, self.target, self.outcome, self.detail
        )
    }
}

fn ends(link: &str) -> Option<(&str, &str)> {
    link.split_once(" <-> ")
}

/// Check every partition window forwarded zero datagrams, and that the
/// relay was the only path between the cut pairs.
pub fn check(windows: &[RelayWindow], setup: Option<&IsolationSetup>) -> Verdict {
    let cuts: Vec<&RelayWindow> = windows.iter().filter(|w| w.faults == "partition").collect();
    if cuts.is_empty() {
        return Verdict::unknown("isolation", "no partition windows were measured");
    }
    let leaks: Vec<Evidence> = cuts
        .iter()
        .filter(|w| w.forwarded > 0)
        .map(|w| Evidence::Leak {
            window: (*w).clone(),
        })
        .collect();
    if !leaks.is_empty() {
        return Verdict::new(
            "isolation",
            leaks,
            String::new(),
            "a partitioned direction delivered datagrams".into(),
        );
    }
    let Some(setup) = setup.filter(|s| s.mode == "netns") else {
        let mode = setup.map_or("unrecorded", |s| s.mode.as_str());
        return Verdict::unknown(
            "isolation",
            &format!(
                "nodes were not in their own network namespaces (isolation {mode}): iroh can route around a relay, so zero forwarded datagrams do not prove the pair was cut"
            ),
        );
    };
    // Every cut pair, both ways, UDP and TCP, must have found no route.
    let mut missing = Vec::new();
    let mut open = Vec::new();
    let mut checked = 0;
    for w in &cuts {
        let Some((a, b)) = ends(&w.link) else {
            return Verdict::new(
                "isolation",
                vec![Evidence::Malformed {
                    detail: format!("relay window link {:?} is not `a <-> b`", w.link),
                }],
                String::new(),
                String::new(),
            );
        };
        for (from, to) in [(a, b), (b, a)] {
            for proto in ["udp", "tcp"] {
                let found: Vec<&DirectProbe> = setup
                    .probes
                    .iter()
                    .filter(|p| p.from == from && p.to == to && p.proto == proto)
                    .collect();
                if found.is_empty() {
                    missing.push(format!("{from} -> {to} {proto}"));
                }
                for p in found {
                    checked += 1;
                    if p.outcome != "unreachable" {
                        open.push(Evidence::Violation {
                            detail: format!(
                                "direct path open during the run, the relay could be bypassed: {}",
                                p.describe()
                            ),
                        });
                    }
                }
            }
        }
    }
    if !open.is_empty() {
        return Verdict::new(
            "isolation",
            open,
            String::new(),
            "a cut pair could reach each other without the relay".into(),
        );
    }
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        return Verdict::unknown(
            "isolation",
            &format!(
                "no direct-path probe for {}: the relay may not have been the only path",
                missing.join(", ")
            ),
        );
    }
    let sent: u64 = cuts.iter().map(|w| w.packets_in).sum();
    if sent == 0 {
        // Nothing tried to cross: the cut was not exercised.
        return Verdict::unknown(
            "isolation",
            "no datagram was sent into any partition: the cut was not exercised",
        );
    }
    Verdict::new(
        "isolation",
        Vec::new(),
        format!(
            "{} partition windows forwarded 0 datagrams ({sent} sent into the cut, all dropped); every node in its own network namespace, {checked} direct-path probes between cut pairs found no route",
            cuts.len()
        ),
        String::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Status;

    fn w(faults: &str, forwarded: u64) -> RelayWindow {
        RelayWindow {
            link: "e1 <-> hub".into(),
            direction: "a-to-b".into(),
            faults: faults.into(),
            from_ms: 1000,
            to_ms: 5000,
            packets_in: 40,
            forwarded,
            dropped_partition: 40 - forwarded,
            dropped_other: 0,
        }
    }

    fn probe(from: &str, to: &str, proto: &str, outcome: &str) -> DirectProbe {
        DirectProbe {
            from: from.into(),
            to: to.into(),
            proto: proto.into(),
            target: "10.200.1.2:4700".into(),
            outcome: outcome.into(),
            detail: "Network is unreachable (os error 101)".into(),
        }
    }

    fn netns(outcome_e1_hub_udp: &str) -> IsolationSetup {
        IsolationSetup {
            mode: "netns".into(),
            probes: vec![
                probe("e1", "hub", "udp", outcome_e1_hub_udp),
                probe("e1", "hub", "tcp", "unreachable"),
                probe("hub", "e1", "udp", "unreachable"),
                probe("hub", "e1", "tcp", "unreachable"),
            ],
        }
    }

    #[test]
    fn a_leaking_partition_fails_with_its_window_and_a_clean_isolated_one_passes() {
        let iso = netns("unreachable");
        let v = check(
            &[w("partition", 0), w("partition", 3), w("loss", 30)],
            Some(&iso),
        );
        assert_eq!(v.status, Status::Fail);
        assert_eq!(v.evidence.len(), 1);
        assert!(v.evidence[0].describe().contains("forwarded 3 of 40"));
        let ok = check(&[w("partition", 0)], Some(&iso));
        assert_eq!(ok.status, Status::Pass, "{}", ok.summary);
        assert!(ok.summary.contains("40 sent") && ok.summary.contains("4 direct-path probes"));
        assert_eq!(check(&[w("loss", 5)], Some(&iso)).status, Status::Unknown);
        let mut silent = w("partition", 0);
        silent.packets_in = 0;
        silent.dropped_partition = 0;
        assert_eq!(check(&[silent], Some(&iso)).status, Status::Unknown);
    }

    #[test]
    fn without_namespaces_a_clean_cut_is_never_a_pass() {
        // The finding: the relay counted nothing while iroh used a direct
        // path. Shared loopback, or no record of the setup: unknown.
        let lo = IsolationSetup {
            mode: "loopback".into(),
            probes: Vec::new(),
        };
        let v = check(&[w("partition", 0)], Some(&lo));
        assert_eq!(v.status, Status::Unknown);
        assert!(v.summary.contains("route around"), "{}", v.summary);
        assert_eq!(check(&[w("partition", 0)], None).status, Status::Unknown);
        // A leak still fails, whatever the setup.
        assert_eq!(check(&[w("partition", 2)], None).status, Status::Fail);
    }

    #[test]
    fn an_open_direct_path_fails_and_a_missing_probe_is_unknown() {
        let v = check(&[w("partition", 0)], Some(&netns("sent")));
        assert_eq!(v.status, Status::Fail);
        assert!(
            v.evidence[0].describe().contains("e1 -> hub udp"),
            "{}",
            v.evidence[0].describe()
        );
        let mut partial = netns("unreachable");
        partial.probes.retain(|p| p.from != "hub");
        let v = check(&[w("partition", 0)], Some(&partial));
        assert_eq!(v.status, Status::Unknown);
        assert!(v.summary.contains("hub -> e1 tcp"), "{}", v.summary);
    }
}
