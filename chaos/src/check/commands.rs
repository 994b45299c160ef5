//! Commands at most once: each command id is executed at most once across
//! the whole fleet (its target device lives on one edge, so a second
//! execution, on the same edge after a restart or on another edge, is a
//! violation), and nothing is executed that no client issued.
//!
//! Issued ids are the `id` fields of `command` invocations in the history,
//! and the `command_id` of any completed operation (the id a hub assigned
//! when a client's key was only an idempotency key). When the history
//! records no command at all, the second rule is not applied (the run did
//! not record issuance).

use std::collections::{BTreeMap, BTreeSet};

use super::{CommandExecution, Evidence, History, Observations, OpType, Verdict};

/// Check at-most-once execution of commands.
pub fn check(history: &History, o: &Observations) -> Verdict {
    let issued: BTreeSet<String> = history
        .ops
        .iter()
        .filter(|op| op.kind == OpType::Invoke && op.f == "command")
        .filter_map(|op| {
            op.value
                .get("id")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .chain(history.ops.iter().filter_map(|op| {
            op.value
                .get("command_id")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        }))
        .collect();
    if issued.is_empty() && o.command_executions.is_empty() {
        return Verdict::vacuous(
            "commands",
            "the scenario issued no command and none was executed",
        );
    }
    let mut by_id: BTreeMap<&str, Vec<CommandExecution>> = BTreeMap::new();
    for e in &o.command_executions {
        by_id.entry(&e.command_id).or_default().push(e.clone());
    }
    let mut evidence = Vec::new();
    for (id, mut execs) in by_id.clone() {
        execs.sort_by_key(|e| e.at_ms);
        if execs.len() > 1 {
            evidence.push(Evidence::CommandRepeated {
                command_id: id.to_string(),
                executions: execs.clone(),
            });
        }
        if !issued.is_empty() && !issued.contains(id) {
            evidence.push(Evidence::CommandNotIssued {
                command_id: id.to_string(),
                executions: execs,
            });
        }
    }
    Verdict::new(
        "commands",
        evidence,
        format!(
            "{} issued, {} executed, none more than once",
            issued.len(),
            by_id.len()
        ),
        "commands executed more than once or without being issued".into(),
    )
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // fixtures are built up field by field
mod tests {
    use super::*;
    use crate::check::Status;
    use serde_json::json;

    fn ex(edge: &str, id: &str, at: i64) -> CommandExecution {
        CommandExecution {
            edge: edge.into(),
            command_id: id.into(),
            at_ms: at,
        }
    }

    fn issued(ids: &[&str]) -> History {
        let mut h = History::default();
        for (i, id) in ids.iter().enumerate() {
            h.push(
                "hub/api",
                OpType::Invoke,
                "command",
                json!({"id": id}),
                i as i64,
            );
            h.push("hub/api", OpType::Ok, "command", json!(null), i as i64);
        }
        h
    }

    #[test]
    fn command_executed_twice_is_reported_with_both_executions() {
        let mut o = Observations::default();
        o.command_executions = vec![
            ex("s/edge-1", "c1", 500),
            ex("s/edge-1", "c2", 10),
            ex("s/edge-1", "c1", 100),
        ];
        let v = check(&issued(&["c1", "c2"]), &o);
        assert_eq!(v.status, Status::Fail);
        assert_eq!(v.evidence.len(), 1);
        match &v.evidence[0] {
            Evidence::CommandRepeated {
                command_id,
                executions,
            } => {
                assert_eq!(command_id, "c1");
                assert_eq!(
                    executions.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
                    [100, 500]
                );
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn unissued_execution_fails_and_clean_passes() {
        let mut o = Observations::default();
        o.command_executions = vec![ex("e", "c9", 1)];
        let v = check(&issued(&["c1"]), &o);
        assert!(
            matches!(&v.evidence[..], [Evidence::CommandNotIssued { command_id, .. }] if command_id == "c9")
        );
        o.command_executions = vec![ex("e", "c1", 1)];
        assert_eq!(check(&issued(&["c1", "c2"]), &o).status, Status::Pass);
        let v = check(&History::default(), &Observations::default());
        assert_eq!(v.status, Status::Pass);
        assert!(v.summary.starts_with("vacuous"), "{v:?}");
    }

    #[test]
    fn a_hub_assigned_id_counts_as_issued() {
        let mut h = issued(&["key-1"]);
        h.push(
            "hub-eu/api",
            OpType::Ok,
            "command",
            json!({"status": 201, "command_id": "cmd-9f"}),
            5,
        );
        let mut o = Observations::default();
        o.command_executions = vec![ex("e", "cmd-9f", 7)];
        assert_eq!(check(&h, &o).status, Status::Pass);
        o.command_executions.push(ex("e", "cmd-other", 8));
        assert_eq!(check(&h, &o).status, Status::Fail);
    }
}
