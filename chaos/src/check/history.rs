//! A Jepsen-style history: operations a run's clients invoked and how each
//! completed (`ok`, `fail`, or `info` when the outcome is unknown, e.g. the
//! node was killed mid-request).

use serde::{Deserialize, Serialize};

/// What an entry of the history records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpType {
    /// A client started an operation.
    Invoke,
    /// It completed and took effect.
    Ok,
    /// It completed and certainly did not take effect.
    Fail,
    /// Its outcome is unknown (may or may not have taken effect).
    Info,
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The client (a logical process: `hub-eu/api`, `coldstore-1/edge-1/operator`).
    pub process: String,
    /// Invoke or completion.
    #[serde(rename = "type")]
    pub kind: OpType,
    /// The operation (`command`, `edit-config`, `write-sample`).
    pub f: String,
    /// Its argument or result.
    #[serde(default)]
    pub value: serde_json::Value,
    /// Milliseconds since the run started.
    pub time_ms: i64,
}

/// Problems with a recorded history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// A process completed an operation it had not invoked.
    #[error("op {index}: {process} completed {f} without invoking it")]
    CompletionWithoutInvoke {
        /// Index in the history.
        index: usize,
        /// The process.
        process: String,
        /// The operation.
        f: String,
    },
    /// A process invoked while another of its operations was open.
    #[error("op {index}: {process} invoked {f} while an operation was still open")]
    DoubleInvoke {
        /// Index in the history.
        index: usize,
        /// The process.
        process: String,
        /// The operation.
        f: String,
    },
    /// Time went backwards.
    #[error("op {index}: time {time_ms} ms is before the previous op's {prev_ms} ms")]
    TimeBackwards {
        /// Index in the history.
        index: usize,
        /// This op's time.
        time_ms: i64,
        /// The previous op's time.
        prev_ms: i64,
    },
}

/// A recorded history, in the order events happened.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The entries.
    pub ops: Vec<Op>,
}

impl History {
    /// Append an entry.
    pub fn push(
        &mut self,
        process: &str,
        kind: OpType,
        f: &str,
        value: serde_json::Value,
        time_ms: i64,
    ) {
        self.ops.push(Op {
            process: process.to_string(),
            kind,
            f: f.to_string(),
            value,
            time_ms,
        });
    }

    /// Check well-formedness: one open operation per process, completions
    /// match invocations, time never goes backwards.
    pub fn validate(&self) -> Result<(), HistoryError> {
        let mut open: std::collections::BTreeMap<&str, &str> = Default::default();
        let mut prev = i64::MIN;
        for (index, op) in self.ops.iter().enumerate() {
            if op.time_ms < prev {
                return Err(HistoryError::TimeBackwards {
                    index,
                    time_ms: op.time_ms,
                    prev_ms: prev,
                });
            }
            prev = op.time_ms;
            match op.kind {
                OpType::Invoke => {
                    if open.insert(&op.process, &op.f).is_some() {
                        return Err(HistoryError::DoubleInvoke {
                            index,
                            process: op.process.clone(),
                            f: op.f.clone(),
                        });
                    }
                }
                _ => {
                    if open.remove(op.process.as_str()) != Some(op.f.as_str()) {
                        return Err(HistoryError::CompletionWithoutInvoke {
                            index,
                            process: op.process.clone(),
                            f: op.f.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Invocations of `f` with the completion each got (`None`: none was
    /// recorded, which counts as unknown).
    pub fn invocations<'a>(&'a self, f: &'a str) -> Vec<(&'a Op, Option<&'a Op>)> {
        let mut out = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            if op.kind == OpType::Invoke && op.f == f {
                let done = self.ops[i + 1..]
                    .iter()
                    .find(|c| c.process == op.process && c.kind != OpType::Invoke);
                out.push((op, done));
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // fixtures are built up field by field
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_and_pairs() {
        let mut h = History::default();
        h.push("p1", OpType::Invoke, "command", json!({"id": "c1"}), 1);
        h.push("p2", OpType::Invoke, "command", json!({"id": "c2"}), 2);
        h.push("p1", OpType::Ok, "command", json!(null), 3);
        assert_eq!(h.validate(), Ok(()));
        let inv = h.invocations("command");
        assert_eq!(inv.len(), 2);
        assert_eq!(inv[0].1.map(|o| o.kind), Some(OpType::Ok));
        assert!(inv[1].1.is_none());

        h.push("p3", OpType::Ok, "command", json!(null), 4);
        assert!(matches!(
            h.validate(),
            Err(HistoryError::CompletionWithoutInvoke { index: 3, .. })
        ));
        let mut h2 = History::default();
        h2.push("p1", OpType::Invoke, "x", json!(null), 5);
        h2.push("p1", OpType::Invoke, "x", json!(null), 6);
        assert!(matches!(
            h2.validate(),
            Err(HistoryError::DoubleInvoke { .. })
        ));
        let mut h3 = History::default();
        h3.push("p1", OpType::Invoke, "x", json!(null), 5);
        h3.push("p1", OpType::Ok, "x", json!(null), 4);
        assert!(matches!(
            h3.validate(),
            Err(HistoryError::TimeBackwards { .. })
        ));
    }
}
