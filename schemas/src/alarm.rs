//! Alarm rules and alarms.

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::time::Timestamp;
use crate::version::SchemaVersion;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Raise when the value goes above `threshold`, clear below `threshold - hysteresis`.
    Above,
    /// Raise when the value goes below `threshold`, clear above `threshold + hysteresis`.
    Below,
}

/// A threshold rule, evaluated at the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlarmRule {
    pub name: String,
    pub device: DeviceId,
    pub metric: String,
    pub condition: Condition,
    pub threshold: f64,
    #[serde(default)]
    pub hysteresis: f64,
    /// The condition must hold this long before the alarm is raised.
    #[serde(default)]
    pub delay_ms: u64,
    pub severity: Severity,
}

impl AlarmRule {
    pub fn validate(&self, at: &str) -> Result<(), (String, String)> {
        if self.name.is_empty() {
            return Err((format!("{at}.name"), "must not be empty".into()));
        }
        if !self.threshold.is_finite() {
            return Err((
                format!("{at}.threshold"),
                format!("{} is not finite", self.threshold),
            ));
        }
        if !self.hysteresis.is_finite() || self.hysteresis < 0.0 {
            return Err((
                format!("{at}.hysteresis"),
                format!("{} must be a finite number >= 0", self.hysteresis),
            ));
        }
        Ok(())
    }
}

/// One raised alarm (possibly cleared and acknowledged since).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Alarm {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    /// Unique within the day's alarm document: `{rule}:{device}:{raised_at}`.
    pub id: String,
    pub rule: String,
    pub device: DeviceId,
    pub metric: String,
    pub severity: Severity,
    pub raised_at: Timestamp,
    pub value: f64,
    pub message: String,
    pub cleared_at: Option<Timestamp>,
    pub acked_by: Option<String>,
    pub acked_at: Option<Timestamp>,
}

impl Alarm {
    pub fn is_active(&self) -> bool {
        self.cleared_at.is_none()
    }
}
