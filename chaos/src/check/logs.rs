//! No panic: no node's log contains a Rust panic or a fatal runtime error.

use super::{Evidence, Observations, Verdict};

/// Substrings that mark a panic or an abort in a Rust process's output.
pub const PANIC_MARKERS: [&str; 2] = ["panicked at", "fatal runtime error"];

/// Check that no log line shows a panic.
pub fn check(o: &Observations) -> Verdict {
    if o.logs.is_empty() {
        return Verdict::unknown("no-panic", "no log lines were collected");
    }
    let evidence: Vec<Evidence> = o
        .logs
        .iter()
        .filter(|l| PANIC_MARKERS.iter().any(|m| l.text.contains(m)))
        .map(|l| Evidence::Panic { line: l.clone() })
        .collect();
    let n = o.logs.len();
    Verdict::new(
        "no-panic",
        evidence,
        format!("no panic in {n} log lines"),
        "a node panicked".into(),
    )
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // fixtures are built up field by field
mod tests {
    use super::*;
    use crate::check::{LogLine, Status};

    fn line(node: &str, n: usize, text: &str) -> LogLine {
        LogLine {
            node: node.into(),
            line_no: n,
            text: text.into(),
        }
    }

    #[test]
    fn panic_line_is_reported_and_clean_logs_pass() {
        let mut o = Observations::default();
        o.logs = vec![
            line("hub", 1, "INFO sync: peer connected"),
            line(
                "s/edge-1",
                7,
                "thread 'tokio-runtime-worker' panicked at sync-core/src/session.rs:42:9:",
            ),
        ];
        let v = check(&o);
        assert_eq!(v.status, Status::Fail);
        match &v.evidence[..] {
            [Evidence::Panic { line }] => {
                assert_eq!((line.node.as_str(), line.line_no), ("s/edge-1", 7))
            }
            e => panic!("{e:?}"),
        }
        o.logs.truncate(1);
        assert_eq!(check(&o).status, Status::Pass);
    }
}
