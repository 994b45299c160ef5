//! Device documents: desired config (written by the hub and operators),
//! reported state (written only by the owning edge), and the merge policy
//! that decides concurrent values of one field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::version::SchemaVersion;

/// How concurrent values of one field are resolved. Automerge keeps every
/// concurrent value (`get_all`); the policy picks the effective one, and the
/// others stay visible as a conflict until someone writes over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergePolicy {
    /// The smallest value wins (a safety upper limit: the conservative one).
    MinWins,
    /// The largest value wins (a safety lower limit).
    MaxWins,
    /// Automerge's deterministic winner (highest op id): for labels, modes.
    LastWriter,
}

/// A desired-config value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum FieldValue {
    Bool(bool),
    Number(f64),
    Text(String),
}

impl FieldValue {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            FieldValue::Number(n) => Some(*n),
            FieldValue::Bool(b) => Some(f64::from(u8::from(*b))),
            FieldValue::Text(_) => None,
        }
    }
}

/// The kind of value a field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    Bool,
    Number,
    Text,
}

/// Declaration of one desired-config field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FieldSpec {
    pub name: String,
    pub kind: FieldKind,
    pub policy: MergePolicy,
    /// Inclusive bounds for numbers; writes outside are refused.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// The desired-config fields every device understands. Loops and rollouts
/// address fields by these names.
pub fn standard_fields() -> Vec<FieldSpec> {
    let num = |name: &str, policy, min, max| FieldSpec {
        name: name.into(),
        kind: FieldKind::Number,
        policy,
        min: Some(min),
        max: Some(max),
    };
    vec![
        num("setpoint", MergePolicy::LastWriter, -100.0, 1000.0),
        num("hysteresis", MergePolicy::LastWriter, 0.0, 100.0),
        num("high_limit", MergePolicy::MinWins, -100.0, 10_000.0),
        num("low_limit", MergePolicy::MaxWins, -100.0, 10_000.0),
        num("min_on_s", MergePolicy::MaxWins, 0.0, 86_400.0),
        num("min_off_s", MergePolicy::MaxWins, 0.0, 86_400.0),
        FieldSpec {
            name: "enabled".into(),
            kind: FieldKind::Bool,
            policy: MergePolicy::MinWins,
            min: None,
            max: None,
        },
        FieldSpec {
            name: "label".into(),
            kind: FieldKind::Text,
            policy: MergePolicy::LastWriter,
            min: None,
            max: None,
        },
        FieldSpec {
            name: "mode".into(),
            kind: FieldKind::Text,
            policy: MergePolicy::LastWriter,
            min: None,
            max: None,
        },
    ]
}

/// Look up a standard field.
pub fn field_spec(name: &str) -> Option<FieldSpec> {
    standard_fields().into_iter().find(|f| f.name == name)
}

impl FieldSpec {
    /// Check a value before it is written.
    pub fn check(&self, v: &FieldValue) -> Result<(), String> {
        match (self.kind, v) {
            (FieldKind::Bool, FieldValue::Bool(_)) | (FieldKind::Text, FieldValue::Text(_)) => {
                Ok(())
            }
            (FieldKind::Number, FieldValue::Number(n)) => {
                if !n.is_finite() {
                    return Err(format!("{}: {n} is not a finite number", self.name));
                }
                if let Some(min) = self.min.filter(|m| n < m) {
                    return Err(format!("{}: {n} is below the minimum {min}", self.name));
                }
                if let Some(max) = self.max.filter(|m| n > m) {
                    return Err(format!("{}: {n} is above the maximum {max}", self.name));
                }
                Ok(())
            }
            (k, v) => Err(format!("{}: expected a {k:?} value, got {v:?}", self.name)),
        }
    }
}

impl MergePolicy {
    /// Pick the effective value among concurrent ones. `values` must be in
    /// automerge's order (`get_all`: ascending op id, so the last is
    /// automerge's own winner). Returns the index of the winner.
    pub fn resolve(self, values: &[FieldValue]) -> Option<usize> {
        if values.is_empty() {
            return None;
        }
        let last = values.len() - 1;
        let pick = |better: fn(f64, f64) -> bool| {
            let mut best: Option<(usize, f64)> = None;
            for (i, v) in values.iter().enumerate() {
                if let Some(x) = v.as_f64()
                    && best.is_none_or(|(_, b)| better(x, b))
                {
                    best = Some((i, x));
                }
            }
            best.map(|(i, _)| i).unwrap_or(last)
        };
        Some(match self {
            MergePolicy::LastWriter => last,
            MergePolicy::MinWins => pick(|x, b| x < b),
            MergePolicy::MaxWins => pick(|x, b| x > b),
        })
    }
}

/// Desired config of a device, as the hub and operators want it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DesiredConfig {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub fields: BTreeMap<String, FieldValue>,
}

/// Health of a device as its edge sees it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    #[default]
    Unknown,
    Ok,
    /// Answers, but some reads fail or values are suspect.
    Degraded,
    /// Does not answer.
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceHealth {
    pub status: HealthStatus,
    pub last_error: Option<String>,
    pub since: Option<Timestamp>,
    pub last_ok: Option<Timestamp>,
}

/// The latest value of a metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Reading {
    pub value: f64,
    pub ts: Timestamp,
}

/// State of a control loop as reported by its edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LoopState {
    /// Output currently commanded (on/off).
    pub output: bool,
    /// Effective setpoint after merge policy.
    pub setpoint: Option<f64>,
    /// True while the loop is in its fail-safe state because of a sensor fault.
    pub fail_safe: bool,
    pub last_actuation: Option<Timestamp>,
    /// Period jitter, 99th percentile, in microseconds.
    pub jitter_p99_us: Option<u64>,
}

/// Reported state of a device, written only by its owning edge.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ReportedState {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub values: BTreeMap<String, Reading>,
    pub health: DeviceHealth,
    pub loops: BTreeMap<String, LoopState>,
    pub software_version: Option<String>,
    /// Endpoint id (hex) of the edge that owns this device.
    pub owner: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_pick_the_declared_winner() {
        let vals = [
            FieldValue::Number(8.0),
            FieldValue::Number(5.0),
            FieldValue::Number(6.0),
        ];
        assert_eq!(MergePolicy::MinWins.resolve(&vals), Some(1));
        assert_eq!(MergePolicy::MaxWins.resolve(&vals), Some(0));
        assert_eq!(MergePolicy::LastWriter.resolve(&vals), Some(2));
        assert_eq!(MergePolicy::MinWins.resolve(&[]), None);
        let b = [FieldValue::Bool(true), FieldValue::Bool(false)];
        assert_eq!(
            MergePolicy::MinWins.resolve(&b),
            Some(1),
            "disable wins for enabled"
        );
    }

    #[test]
    fn field_checks() {
        let hl = field_spec("high_limit").unwrap();
        assert!(hl.check(&FieldValue::Number(5.0)).is_ok());
        assert!(
            hl.check(&FieldValue::Number(f64::NAN))
                .unwrap_err()
                .contains("finite")
        );
        assert!(
            hl.check(&FieldValue::Number(1e9))
                .unwrap_err()
                .contains("maximum")
        );
        assert!(
            hl.check(&FieldValue::Text("x".into()))
                .unwrap_err()
                .contains("expected")
        );
        assert!(field_spec("nope").is_none());
    }

    #[test]
    fn reported_roundtrip() {
        let mut r = ReportedState::default();
        r.values.insert(
            "temp".into(),
            Reading {
                value: 3.5,
                ts: Timestamp(5),
            },
        );
        r.health.status = HealthStatus::Degraded;
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ReportedState>(&json).unwrap(), r);
    }
}
