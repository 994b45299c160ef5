//! Device health as a pure state machine driven by request outcomes and `now`.

use std::collections::BTreeSet;

use schemas::device::{DeviceHealth, HealthStatus};
use schemas::time::Timestamp;

/// What happened to one request to a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A read request (`group` of the read plan) was answered and decoded.
    ReadOk { group: usize },
    /// A read was answered with a Modbus exception, or its words did not
    /// decode: the device talks, this part of it is wrong.
    ReadFailed { group: usize, error: String },
    /// A write was answered (successfully or with an exception): the device
    /// talks.
    WriteAnswered { error: Option<String> },
    /// Connect failure, timeout, disconnect or protocol error: the device
    /// does not talk.
    Transport { error: String },
}

/// Health of one device.
///
/// - `Unreachable` after `unreachable_after` transport failures in a row;
/// - `Degraded` after fewer transport failures, or while some read group's
///   latest outcome is a failure (exceptions, undecodable words);
/// - `Ok` when the device answers and every group's latest read succeeded.
///
/// `since` is when the status last changed, `last_ok` the last successful
/// read, `last_error` the latest failure's message (kept after recovery).
#[derive(Debug, Clone)]
pub struct HealthTracker {
    health: DeviceHealth,
    consecutive_transport: u32,
    failing_groups: BTreeSet<usize>,
    unreachable_after: u32,
}

impl HealthTracker {
    /// A tracker in status `Unknown`; `unreachable_after` is clamped to >= 1.
    pub fn new(unreachable_after: u32) -> Self {
        HealthTracker {
            health: DeviceHealth::default(),
            consecutive_transport: 0,
            failing_groups: BTreeSet::new(),
            unreachable_after: unreachable_after.max(1),
        }
    }

    /// Current health.
    pub fn health(&self) -> &DeviceHealth {
        &self.health
    }

    /// Feed one outcome; returns true when the status changed.
    pub fn handle_outcome(&mut self, outcome: Outcome, now: Timestamp) -> bool {
        match outcome {
            Outcome::ReadOk { group } => {
                self.consecutive_transport = 0;
                self.failing_groups.remove(&group);
                self.health.last_ok = Some(now);
            }
            Outcome::ReadFailed { group, error } => {
                self.consecutive_transport = 0;
                self.failing_groups.insert(group);
                self.health.last_error = Some(error);
            }
            Outcome::WriteAnswered { error } => {
                self.consecutive_transport = 0;
                if let Some(e) = error {
                    self.health.last_error = Some(e);
                }
            }
            Outcome::Transport { error } => {
                self.consecutive_transport = self.consecutive_transport.saturating_add(1);
                self.health.last_error = Some(error);
            }
        }
        let status = if self.consecutive_transport >= self.unreachable_after {
            HealthStatus::Unreachable
        } else if self.consecutive_transport > 0 || !self.failing_groups.is_empty() {
            HealthStatus::Degraded
        } else if self.health.last_ok.is_some() {
            HealthStatus::Ok
        } else {
            // Only writes answered so far: it talks, nothing read yet.
            self.health.status
        };
        if status != self.health.status {
            self.health.status = status;
            self.health.since = Some(now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    #[test]
    fn transport_failures_degrade_then_make_unreachable_and_a_read_recovers() {
        let mut h = HealthTracker::new(3);
        assert_eq!(h.health().status, HealthStatus::Unknown);
        assert!(h.handle_outcome(Outcome::ReadOk { group: 0 }, t(1)));
        assert_eq!(h.health().status, HealthStatus::Ok);
        assert_eq!(h.health().last_ok, Some(t(1)));
        let fail = || Outcome::Transport {
            error: "timeout".into(),
        };
        assert!(h.handle_outcome(fail(), t(2)));
        assert_eq!(h.health().status, HealthStatus::Degraded);
        assert!(!h.handle_outcome(fail(), t(3)));
        assert!(h.handle_outcome(fail(), t(4)));
        assert_eq!(h.health().status, HealthStatus::Unreachable);
        assert_eq!(h.health().since, Some(t(4)));
        assert_eq!(h.health().last_error.as_deref(), Some("timeout"));
        assert_eq!(h.health().last_ok, Some(t(1)));
        assert!(h.handle_outcome(Outcome::ReadOk { group: 0 }, t(9)));
        assert_eq!(h.health().status, HealthStatus::Ok);
        assert_eq!(h.health().since, Some(t(9)));
    }

    #[test]
    fn a_failing_group_degrades_until_it_reads_again() {
        let mut h = HealthTracker::new(3);
        h.handle_outcome(Outcome::ReadOk { group: 0 }, t(1));
        h.handle_outcome(
            Outcome::ReadFailed {
                group: 1,
                error: "exception IllegalDataAddress".into(),
            },
            t(2),
        );
        assert_eq!(h.health().status, HealthStatus::Degraded);
        // other groups reading fine do not hide the failing one
        assert!(!h.handle_outcome(Outcome::ReadOk { group: 0 }, t(3)));
        assert_eq!(h.health().status, HealthStatus::Degraded);
        assert!(h.handle_outcome(Outcome::ReadOk { group: 1 }, t(4)));
        assert_eq!(h.health().status, HealthStatus::Ok);
    }

    #[test]
    fn an_answered_write_resets_the_transport_count() {
        let mut h = HealthTracker::new(2);
        h.handle_outcome(Outcome::ReadOk { group: 0 }, t(1));
        h.handle_outcome(Outcome::Transport { error: "x".into() }, t(2));
        h.handle_outcome(Outcome::WriteAnswered { error: None }, t(3));
        h.handle_outcome(Outcome::Transport { error: "x".into() }, t(4));
        assert_eq!(h.health().status, HealthStatus::Degraded);
    }
}
