//! Convergence: after quiescence, every replica of a document has the same
//! heads (automerge change hashes). Heads are compared as sets.

use std::collections::{BTreeMap, BTreeSet};

use super::{Evidence, Observations, ReplicaHeads, Verdict};

/// Check that all replicas of each document have identical heads.
pub fn check(o: &Observations) -> Verdict {
    if o.replicas.is_empty() {
        return Verdict::unknown("convergence", "no replica heads were observed");
    }
    let mut by_doc: BTreeMap<&str, Vec<&ReplicaHeads>> = BTreeMap::new();
    for r in &o.replicas {
        by_doc.entry(&r.doc).or_default().push(r);
    }
    let mut evidence = Vec::new();
    for (doc, reps) in &by_doc {
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
    let n = by_doc.len();
    let bad = evidence.len();
    Verdict::new(
        "convergence",
        evidence,
        format!("all replicas of {n} documents have identical heads"),
        format!("{bad} of {n} documents diverged"),
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
}
