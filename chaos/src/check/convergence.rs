//! Convergence: after quiescence, every replica of a document has the same
//! heads (automerge change hashes). Heads are compared as sets.
//!
//! # Which replicas must agree
//!
//! Replicas that can reach each other must agree: [`check_linked`] groups a
//! document's holders into the connected components of the run's links
//! over which that document may be exchanged, and compares heads within each
//! component. Two hubs exchange only fleet aggregates (`t/{tenant}/agg/..`,
//! the rule of `sync_core::authz::Authz::in_scope`), so each regional hub's
//! `fleet/identity` (its own signed registry, published to its own edges) is
//! a different document from another region's, though the id is the same:
//! they are reported as separate domains, never compared. Without link
//! information ([`check`]) every replica of an id is one group.

use std::collections::{BTreeMap, BTreeSet};

use super::{Evidence, Observations, ReplicaHeads, Verdict};
use crate::scenario::{Link, NodeRole};

/// Check that all replicas of each document have identical heads.
pub fn check(o: &Observations) -> Verdict {
    check_groups(o, None)
}

/// Check that replicas of each document that can reach each other over
/// `links` (see the module docs) have identical heads.
pub fn check_linked(o: &Observations, links: &[Link]) -> Verdict {
    check_groups(o, Some(links))
}

fn is_hub(o: &Observations, node: &str) -> bool {
    o.nodes
        .iter()
        .any(|n| n.name == node && matches!(n.role, NodeRole::Hub { .. }))
}

/// The replicas of one document split into the components of the links
/// that may carry it.
fn domains<'a>(
    o: &Observations,
    doc: &str,
    reps: &[&'a ReplicaHeads],
    links: &[Link],
) -> Vec<Vec<&'a ReplicaHeads>> {
    let aggregate = doc.split('/').nth(2) == Some("agg");
    let holders: BTreeSet<&str> = reps.iter().map(|r| r.node.as_str()).collect();
    // Union-find over holder names.
    let mut parent: BTreeMap<&str, &str> = holders.iter().map(|n| (*n, *n)).collect();
    fn root<'b>(parent: &BTreeMap<&'b str, &'b str>, mut n: &'b str) -> &'b str {
        while let Some(p) = parent.get(n).copied() {
            if p == n {
                break;
            }
            n = p;
        }
        n
    }
    for l in links {
        let (Some(a), Some(b)) = (holders.get(l.a.as_str()), holders.get(l.b.as_str())) else {
            continue;
        };
        if is_hub(o, a) && is_hub(o, b) && !aggregate {
            continue;
        }
        let (ra, rb) = (root(&parent, a), root(&parent, b));
        if ra != rb {
            parent.insert(ra, rb);
        }
    }
    let mut out: BTreeMap<&str, Vec<&'a ReplicaHeads>> = BTreeMap::new();
    for r in reps {
        out.entry(root(&parent, &r.node)).or_default().push(*r);
    }
    out.into_values().collect()
}

fn check_groups(o: &Observations, links: Option<&[Link]>) -> Verdict {
    if o.replicas.is_empty() {
        return Verdict::unknown("convergence", "no replica heads were observed");
    }
    let mut by_doc: BTreeMap<&str, Vec<&ReplicaHeads>> = BTreeMap::new();
    for r in &o.replicas {
        by_doc.entry(&r.doc).or_default().push(r);
    }
    let mut evidence = Vec::new();
    let mut groups = 0usize;
    for (doc, reps) in &by_doc {
        let split = match links {
            Some(links) => domains(o, doc, reps, links),
            None => vec![reps.clone()],
        };
        groups += split.len();
        for reps in split {
            let distinct: BTreeSet<BTreeSet<&String>> =
                reps.iter().map(|r| r.heads.iter().collect()).collect();
            if distinct.len() > 1 {
                let mut replicas: Vec<ReplicaHeads> = reps.iter().map(|r| (*r).clone()).collect();
                replicas.sort_by(|a, b| a.node.cmp(&b.node));
                evidence.push(Evidence::Diverged {
                    doc: doc.to_string(),
                    replicas,
                });
            }
        }
    }
    let n = by_doc.len();
    let bad = evidence.len();
    let apart = groups - n;
    let note = if apart > 0 {
        format!(
            " ({apart} more replication domains of ids held apart, e.g. each region's fleet/identity)"
        )
    } else {
        String::new()
    };
    Verdict::new(
        "convergence",
        evidence,
        format!("all replicas of {n} documents have identical heads{note}"),
        format!("{bad} of {n} documents diverged{note}"),
    )
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // fixtures are built up field by field
mod tests {
    use super::*;
    use crate::check::Status;

    fn rep(node: &str, doc: &str, heads: &[&str]) -> ReplicaHeads {
        ReplicaHeads {
            node: node.into(),
            doc: doc.into(),
            heads: heads.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn diverged_document_is_reported_with_every_replica() {
        let mut o = Observations::default();
        o.replicas = vec![
            rep("hub", "t/a/s/s1/dev/d1", &["aa", "bb"]),
            rep("e1", "t/a/s/s1/dev/d1", &["bb", "aa"]),
            rep("hub", "t/a/s/s1/dev/d2", &["cc"]),
            rep("e1", "t/a/s/s1/dev/d2", &["dd"]),
        ];
        let v = check(&o);
        assert_eq!(v.status, Status::Fail);
        assert_eq!(v.evidence.len(), 1);
        match &v.evidence[0] {
            Evidence::Diverged { doc, replicas } => {
                assert_eq!(doc, "t/a/s/s1/dev/d2");
                assert_eq!(replicas.len(), 2);
                assert_eq!(replicas[0].heads, ["dd"]);
            }
            e => panic!("{e:?}"),
        }
        assert!(v.evidence[0].describe().contains("t/a/s/s1/dev/d2"));
    }

    #[test]
    fn identical_heads_pass_and_nothing_is_unknown() {
        let mut o = Observations::default();
        assert_eq!(check(&o).status, Status::Unknown);
        o.replicas = vec![rep("hub", "x", &["a", "b"]), rep("e1", "x", &["b", "a"])];
        assert_eq!(check(&o).status, Status::Pass);
    }

    #[test]
    fn each_regions_identity_is_its_own_domain_but_a_split_inside_one_fails() {
        use crate::check::NodeInfo;
        let hub = |name: &str, r: &str| NodeInfo {
            name: name.into(),
            role: NodeRole::Hub {
                tier: schemas::policy::HubTier::Regional,
                regions: vec![schemas::policy::Region::new(r).unwrap()],
            },
        };
        let edge = |name: &str| NodeInfo {
            name: name.into(),
            role: NodeRole::Edge {
                tenant: "acme".parse().unwrap(),
                site: "s1".parse().unwrap(),
            },
        };
        let link = |a: &str, b: &str| Link {
            a: a.into(),
            b: b.into(),
        };
        let mut o = Observations::default();
        o.nodes = vec![
            hub("hub-eu", "eu"),
            hub("hub-us", "us"),
            edge("e1"),
            edge("u1"),
        ];
        let links = vec![
            link("e1", "hub-eu"),
            link("u1", "hub-us"),
            link("hub-eu", "hub-us"),
        ];
        o.replicas = vec![
            rep("hub-eu", "fleet/identity", &["a"]),
            rep("e1", "fleet/identity", &["a"]),
            rep("hub-us", "fleet/identity", &["b"]),
            rep("u1", "fleet/identity", &["b"]),
            rep("hub-eu", "t/acme/agg/2026-01-01", &["x"]),
            rep("hub-us", "t/acme/agg/2026-01-01", &["x"]),
        ];
        let v = check_linked(&o, &links);
        assert_eq!(v.status, Status::Pass, "{v:?}");
        // Without links, the same ids are one group: diverged.
        assert_eq!(check(&o).status, Status::Fail);
        // An aggregate the hubs do exchange must agree.
        o.replicas[5].heads = vec!["y".into()];
        let v = check_linked(&o, &links);
        assert_eq!(v.status, Status::Fail);
        // And inside one region, an edge behind its hub fails.
        o.replicas[5].heads = vec!["x".into()];
        o.replicas[1].heads = vec!["old".into()];
        let v = check_linked(&o, &links);
        assert_eq!(v.status, Status::Fail);
        match &v.evidence[0] {
            Evidence::Diverged { doc, replicas } => {
                assert_eq!(doc, "fleet/identity");
                assert_eq!(replicas.len(), 2, "only the eu domain: {replicas:?}");
            }
            e => panic!("{e:?}"),
        }
    }
}
