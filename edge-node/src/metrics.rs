//! Counters of the running node and their Prometheus text rendering.
//!
//! Counters are plain atomics bumped by the node's tasks; gauges (loop
//! jitter, active alarms, sync peers) are sampled when `/metrics` is read.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of one node.
#[derive(Debug, Default)]
pub struct Counters {
    /// Samples decoded from devices (polled or ingested).
    pub samples_polled: AtomicU64,
    /// Samples acknowledged durable by the raw zone.
    pub samples_acknowledged: AtomicU64,
    /// Samples the raw zone refused (invalid, queue full, write error).
    pub samples_refused: AtomicU64,
    /// Rollups written into telemetry documents.
    pub rollups_written: AtomicU64,
    /// Rollups kept in the local bucket (clock unsynced or day sealed).
    pub rollups_local: AtomicU64,
    /// Summariser pipeline steps that failed (retried).
    pub pipeline_errors: AtomicU64,
    /// Reported-state writes into device documents.
    pub reported_writes: AtomicU64,
    /// Alarm transitions written.
    pub alarm_transitions: AtomicU64,
    /// Commands handled (any outcome).
    pub commands_handled: AtomicU64,
    /// Loop events (actuations, fail-safe entries) recorded.
    pub loop_events: AtomicU64,
    /// Failed document writes (store errors).
    pub store_errors: AtomicU64,
}

impl Counters {
    /// Add `n` to counter `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    /// Read counter `c`.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Builds a Prometheus text exposition (format 0.0.4).
#[derive(Debug, Default)]
pub struct PromText {
    out: String,
}

impl PromText {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// A metric family header.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample, labels as `(name, value)` pairs (values escaped).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        if value.is_finite() {
            let _ = writeln!(self.out, " {value}");
        } else if value.is_nan() {
            self.out.push_str(" NaN\n");
        } else if value > 0.0 {
            self.out.push_str(" +Inf\n");
        } else {
            self.out.push_str(" -Inf\n");
        }
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_and_escapes_labels() {
        let mut p = PromText::new();
        p.single("a_total", "counter", "things", 3.0);
        p.family("b", "gauge", "per peer")
            .sample("b", &[("peer", "x\"y")], 1.5);
        let t = p.finish();
        assert!(t.contains("# TYPE a_total counter\na_total 3\n"), "{t}");
        assert!(t.contains("b{peer=\"x\\\"y\"} 1.5\n"), "{t}");
    }
}
