//! Config rollout engine: a sans-IO state machine that changes desired config
//! on a cohort of devices, canary first, behind a health gate, with automatic
//! rollback, pause, resume and abort.
//!
//! The engine never reads a clock and never writes anything: every input
//! carries `now`, and every output is an [`Effect`] the caller carries out
//! (write a desired field, write an audit record, call [`Rollout::handle_tick`]
//! again at a time). A [`Rollout`] is plain serde data, so a hub that restarts
//! mid-rollout reloads it and continues with the same outcome.
//!
//! Life cycle:
//! 1. [`Rollout::start`] selects the cohort ([`CohortSelector`]), picks the
//!    canary devices (a share of the cohort, at least one, chosen by a stable
//!    hash of rollout id and device), remembers each device's previous values
//!    and sets the new ones on the canaries. State: [`RolloutState::Canary`].
//! 2. During the gate, [`Rollout::handle_tick`] gets what the hub observes of
//!    the cohort. A new alarm raised after the change on any cohort device, a
//!    canary loop in fail-safe or an unreachable canary fails the gate at once. At the end of the gate
//!    every canary must have reported since the change with health `ok`.
//! 3. A passing gate sets the values on the rest of the cohort:
//!    [`RolloutState::Completed`]. A failing gate puts the previous values back
//!    on every changed device: [`RolloutState::RolledBack`].
//!
//! [`Rollout::pause`] freezes the gate clock, [`Rollout::resume`] restarts it
//! with the time that was left, and [`Rollout::abort`] reverts like a rollback.

use std::collections::BTreeMap;

use schemas::alarm::Severity;
use schemas::device::{FieldValue, HealthStatus, field_spec};
use schemas::time::Timestamp;
use schemas::{SiteId, TenantId};
use serde::{Deserialize, Serialize};

use crate::analytics::DeviceKey;

/// Actor named in audit events for steps the engine takes on its own.
pub const ENGINE_ACTOR: &str = "hub:rollout-engine";

/// Which devices a rollout targets. Every given criterion must match; tags
/// must all be present on the device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CohortSelector {
    #[serde(default)]
    pub tenant: Option<TenantId>,
    #[serde(default)]
    pub site: Option<SiteId>,
    #[serde(default)]
    pub device_type: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl CohortSelector {
    /// Whether `c` belongs to the cohort.
    pub fn matches(&self, c: &Candidate) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == c.key.tenant)
            && self.site.as_ref().is_none_or(|s| *s == c.key.site)
            && self
                .device_type
                .as_ref()
                .is_none_or(|t| *t == c.device_type)
            && self.tags.iter().all(|t| c.tags.contains(t))
    }
}

/// A device the rollout may target, with its current desired config.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub key: DeviceKey,
    pub device_type: String,
    pub tags: Vec<String>,
    pub desired: BTreeMap<String, FieldValue>,
}

/// What to roll out, to whom, and how carefully.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// Unique id; also seeds the canary choice.
    pub id: String,
    pub selector: CohortSelector,
    /// Desired-config fields to set (standard field names, checked values).
    pub changes: BTreeMap<String, FieldValue>,
    /// Share of the cohort in the canary stage, 1..=100 (at least one device).
    pub canary_percent: u8,
    /// How long the health gate watches the canaries, in milliseconds.
    pub gate_ms: i64,
    /// Who asked for it.
    pub created_by: String,
    /// Why.
    pub reason: String,
}

/// One device of the cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub device: DeviceKey,
    pub canary: bool,
    /// Values of the changed fields before the rollout (`None`: unset).
    pub previous: BTreeMap<String, Option<FieldValue>>,
    /// Whether the device currently carries the rollout's values.
    pub applied: bool,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Canaries carry the new values since `applied_at`; the gate ends at
    /// `gate_until`.
    Canary {
        applied_at: Timestamp,
        gate_until: Timestamp,
    },
    /// Paused during the gate with `remaining_ms` of gate time left.
    Paused {
        applied_at: Timestamp,
        remaining_ms: i64,
    },
    /// Every cohort device carries the new values.
    Completed { at: Timestamp },
    /// The gate failed; previous values were put back.
    RolledBack { at: Timestamp, cause: String },
    /// Aborted by a person; previous values were put back.
    Aborted { at: Timestamp },
}

impl RolloutState {
    /// Short name: `canary`, `paused`, `completed`, `rolled_back`, `aborted`.
    pub fn name(&self) -> &'static str {
        match self {
            RolloutState::Canary { .. } => "canary",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Completed { .. } => "completed",
            RolloutState::RolledBack { .. } => "rolled_back",
            RolloutState::Aborted { .. } => "aborted",
        }
    }

    /// True once nothing more will happen.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RolloutState::Completed { .. }
                | RolloutState::RolledBack { .. }
                | RolloutState::Aborted { .. }
        )
    }
}

/// An audit event the caller must write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutAudit {
    pub at: Timestamp,
    pub rollout: String,
    /// Who did it (a person's principal, or [`ENGINE_ACTOR`]).
    pub actor: String,
    /// `rollout.started`, `rollout.canary_applied`, `rollout.gate_passed`,
    /// `rollout.gate_failed`, `rollout.applied_rest`, `rollout.completed`,
    /// `rollout.rolled_back`, `rollout.paused`, `rollout.resumed`,
    /// `rollout.aborted`.
    pub action: String,
    pub reason: String,
    pub details: serde_json::Value,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Write one desired-config field of a device.
    SetDesired {
        device: DeviceKey,
        field: String,
        value: FieldValue,
    },
    /// Remove one desired-config field of a device (it was unset before).
    ClearDesired { device: DeviceKey, field: String },
    /// Write this audit event.
    Audit(RolloutAudit),
    /// Call [`Rollout::handle_tick`] at (or after) this time.
    Wake { at: Timestamp },
}

/// A new alarm seen on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmSeen {
    pub id: String,
    pub raised_at: Timestamp,
    pub severity: Severity,
}

/// What the hub currently observes of one cohort device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceObservation {
    pub device: DeviceKey,
    /// When the device's reported state last changed at the hub.
    pub last_report: Option<Timestamp>,
    pub health: HealthStatus,
    /// Names of control loops in fail-safe.
    pub loops_in_fail_safe: Vec<String>,
    /// Alarms raised on the device (the engine keeps those raised since the
    /// change).
    pub alarms: Vec<AlarmSeen>,
}

/// Why a rollout request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RolloutError {
    /// No device matches the selector.
    #[error("no device matches the cohort selector")]
    EmptyCohort,
    /// The rollout changes nothing.
    #[error("changes must name at least one field")]
    NoChanges,
    /// A change names a field that is not a standard desired-config field.
    #[error("changes.{0}: unknown desired-config field")]
    UnknownField(String),
    /// A change's value is refused by the field's spec.
    #[error("changes.{field}: {reason}")]
    InvalidValue { field: String, reason: String },
    /// `canary_percent` is outside 1..=100.
    #[error("canary_percent: {0} is not within 1..=100")]
    CanaryPercent(u8),
    /// `gate_ms` is not positive.
    #[error("gate_ms: {0} must be > 0")]
    GateMs(i64),
    /// The id is empty or too long.
    #[error("id: {0}")]
    Id(String),
    /// The request does not apply in the current state.
    #[error("cannot {action} a rollout that is {state}")]
    InvalidTransition {
        action: &'static str,
        state: &'static str,
    },
}

/// A rollout and everything needed to continue it after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub spec: RolloutSpec,
    pub created_at: Timestamp,
    /// Cohort in canary-choice order (canaries first).
    pub members: Vec<Member>,
    pub state: RolloutState,
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Rollout {
    /// Validate `spec`, select the cohort among `candidates`, apply the new
    /// values to the canaries.
    pub fn start(
        spec: RolloutSpec,
        candidates: &[Candidate],
        now: Timestamp,
    ) -> Result<(Rollout, Vec<Effect>), RolloutError> {
        if spec.id.is_empty() || spec.id.len() > 128 {
            return Err(RolloutError::Id("must be 1..=128 characters".into()));
        }
        if spec.changes.is_empty() {
            return Err(RolloutError::NoChanges);
        }
        for (field, value) in &spec.changes {
            let fs = field_spec(field).ok_or_else(|| RolloutError::UnknownField(field.clone()))?;
            fs.check(value)
                .map_err(|reason| RolloutError::InvalidValue {
                    field: field.clone(),
                    reason,
                })?;
        }
        if !(1..=100).contains(&spec.canary_percent) {
            return Err(RolloutError::CanaryPercent(spec.canary_percent));
        }
        if spec.gate_ms <= 0 {
            return Err(RolloutError::GateMs(spec.gate_ms));
        }
        let mut cohort: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| spec.selector.matches(c))
            .collect();
        if cohort.is_empty() {
            return Err(RolloutError::EmptyCohort);
        }
        cohort.sort_by_key(|c| {
            (
                fnv1a(&[
                    &spec.id,
                    c.key.tenant.as_str(),
                    c.key.site.as_str(),
                    c.key.device.as_str(),
                ]),
                c.key.clone(),
            )
        });
        cohort.dedup_by(|a, b| a.key == b.key);
        let n = cohort.len();
        let canaries = (n * usize::from(spec.canary_percent)).div_ceil(100).max(1);
        let members: Vec<Member> = cohort
            .iter()
            .enumerate()
            .map(|(i, c)| Member {
                device: c.key.clone(),
                canary: i < canaries,
                previous: spec
                    .changes
                    .keys()
                    .map(|f| (f.clone(), c.desired.get(f).cloned()))
                    .collect(),
                applied: false,
            })
            .collect();
        let gate_until = now.saturating_add_ms(spec.gate_ms);
        let mut r = Rollout {
            created_at: now,
            members,
            state: RolloutState::Canary {
                applied_at: now,
                gate_until,
            },
            spec,
        };
        let mut fx = vec![r.audit(
            now,
            &r.spec.created_by.clone(),
            "rollout.started",
            &r.spec.reason.clone(),
            serde_json::json!({
                "cohort": n,
                "canaries": canaries,
                "changes": r.spec.changes,
                "selector": r.spec.selector,
            }),
        )];
        let devices = r.apply(|m| m.canary, &mut fx);
        fx.push(r.engine_audit(
            now,
            "rollout.canary_applied",
            "canary stage",
            serde_json::json!({ "devices": devices, "gate_until": gate_until }),
        ));
        fx.push(Effect::Wake { at: gate_until });
        Ok((r, fx))
    }

    /// Whether both rollouts are still active and change a common field of a
    /// common device: running both would let one's rollback undo the other.
    pub fn conflicts_with(&self, other: &Rollout) -> bool {
        if self.state.is_final() || other.state.is_final() {
            return false;
        }
        let shared_field = self
            .spec
            .changes
            .keys()
            .any(|f| other.spec.changes.contains_key(f));
        shared_field
            && self
                .members
                .iter()
                .any(|m| other.members.iter().any(|o| o.device == m.device))
    }

    /// When the caller should call [`Rollout::handle_tick`] next, if ever.
    pub fn next_wake(&self) -> Option<Timestamp> {
        match self.state {
            RolloutState::Canary { gate_until, .. } => Some(gate_until),
            _ => None,
        }
    }

    /// Feed what the hub observes of the cohort at `now`. Fails the gate on
    /// a bad sign at once; at the end of the gate, passes or fails it.
    /// Does nothing unless the rollout is in its canary stage.
    pub fn handle_tick(&mut self, now: Timestamp, obs: &[DeviceObservation]) -> Vec<Effect> {
        let RolloutState::Canary {
            applied_at,
            gate_until,
        } = self.state
        else {
            return Vec::new();
        };
        let find = |d: &DeviceKey| obs.iter().find(|o| o.device == *d);
        let mut failure: Option<(String, serde_json::Value)> = None;
        // New alarms count on any cohort device (a canary's change can upset
        // its neighbours); loop and reachability checks apply to canaries.
        for m in &self.members {
            let Some(o) = find(&m.device) else {
                continue;
            };
            if let Some(a) = o.alarms.iter().find(|a| a.raised_at >= applied_at) {
                let role = if m.canary { "canary" } else { "cohort device" };
                failure = Some((
                    format!("new alarm {} on {role} {}", a.id, m.device),
                    serde_json::json!({ "device": m.device, "alarm": a }),
                ));
                break;
            }
            if !m.canary {
                continue;
            }
            if let Some(l) = o.loops_in_fail_safe.first() {
                failure = Some((
                    format!("loop {l} of canary {} is in fail-safe", m.device),
                    serde_json::json!({ "device": m.device, "loop": l }),
                ));
                break;
            }
            if o.health == HealthStatus::Unreachable {
                failure = Some((
                    format!("canary {} is unreachable", m.device),
                    serde_json::json!({ "device": m.device }),
                ));
                break;
            }
        }
        if failure.is_none() && now >= gate_until {
            for m in self.members.iter().filter(|m| m.canary) {
                let o = find(&m.device);
                let reported = o
                    .and_then(|o| o.last_report)
                    .is_some_and(|t| t >= applied_at);
                let healthy = o.is_some_and(|o| o.health == HealthStatus::Ok);
                if !reported || !healthy {
                    failure = Some((
                        format!(
                            "canary {} did not report healthy during the gate (reported: {reported}, healthy: {healthy})",
                            m.device
                        ),
                        serde_json::json!({ "device": m.device, "reported": reported, "healthy": healthy }),
                    ));
                    break;
                }
            }
        }
        let mut fx = Vec::new();
        if let Some((cause, details)) = failure {
            fx.push(self.engine_audit(now, "rollout.gate_failed", &cause, details));
            let devices = self.revert(&mut fx);
            fx.push(self.engine_audit(
                now,
                "rollout.rolled_back",
                &cause,
                serde_json::json!({ "devices": devices }),
            ));
            self.state = RolloutState::RolledBack { at: now, cause };
        } else if now >= gate_until {
            fx.push(self.engine_audit(
                now,
                "rollout.gate_passed",
                "every canary reported healthy with no new alarm",
                serde_json::json!({ "canaries": self.members.iter().filter(|m| m.canary).count() }),
            ));
            let devices = self.apply(|m| !m.canary, &mut fx);
            fx.push(self.engine_audit(
                now,
                "rollout.applied_rest",
                "gate passed",
                serde_json::json!({ "devices": devices }),
            ));
            fx.push(self.engine_audit(
                now,
                "rollout.completed",
                "every cohort device carries the new values",
                serde_json::json!({ "cohort": self.members.len() }),
            ));
            self.state = RolloutState::Completed { at: now };
        }
        fx
    }

    /// Freeze the gate clock.
    pub fn pause(
        &mut self,
        now: Timestamp,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<Effect>, RolloutError> {
        let RolloutState::Canary {
            applied_at,
            gate_until,
        } = self.state
        else {
            return Err(self.invalid("pause"));
        };
        let remaining_ms = (gate_until.0 - now.0).max(0);
        self.state = RolloutState::Paused {
            applied_at,
            remaining_ms,
        };
        Ok(vec![self.audit(
            now,
            actor,
            "rollout.paused",
            reason,
            serde_json::json!({ "remaining_ms": remaining_ms }),
        )])
    }

    /// Restart the gate clock with the time that was left.
    pub fn resume(
        &mut self,
        now: Timestamp,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<Effect>, RolloutError> {
        let RolloutState::Paused {
            applied_at,
            remaining_ms,
        } = self.state
        else {
            return Err(self.invalid("resume"));
        };
        let gate_until = now.saturating_add_ms(remaining_ms);
        self.state = RolloutState::Canary {
            applied_at,
            gate_until,
        };
        Ok(vec![
            self.audit(
                now,
                actor,
                "rollout.resumed",
                reason,
                serde_json::json!({ "gate_until": gate_until }),
            ),
            Effect::Wake { at: gate_until },
        ])
    }

    /// Stop the rollout and put the previous values back.
    pub fn abort(
        &mut self,
        now: Timestamp,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<Effect>, RolloutError> {
        if self.state.is_final() {
            return Err(self.invalid("abort"));
        }
        let mut fx = Vec::new();
        let devices = self.revert(&mut fx);
        fx.push(self.audit(
            now,
            actor,
            "rollout.aborted",
            reason,
            serde_json::json!({ "reverted": devices }),
        ));
        self.state = RolloutState::Aborted { at: now };
        Ok(fx)
    }

    fn invalid(&self, action: &'static str) -> RolloutError {
        RolloutError::InvalidTransition {
            action,
            state: self.state.name(),
        }
    }

    /// Set the new values on members selected by `which`; returns them.
    fn apply(&mut self, which: impl Fn(&Member) -> bool, fx: &mut Vec<Effect>) -> Vec<DeviceKey> {
        let mut done = Vec::new();
        for m in self.members.iter_mut().filter(|m| which(m)) {
            for (field, value) in &self.spec.changes {
                fx.push(Effect::SetDesired {
                    device: m.device.clone(),
                    field: field.clone(),
                    value: value.clone(),
                });
            }
            m.applied = true;
            done.push(m.device.clone());
        }
        done
    }

    /// Put the previous values back on every member that carries the new
    /// ones; returns them.
    fn revert(&mut self, fx: &mut Vec<Effect>) -> Vec<DeviceKey> {
        let mut done = Vec::new();
        for m in self.members.iter_mut().filter(|m| m.applied) {
            for (field, prev) in &m.previous {
                fx.push(match prev {
                    Some(value) => Effect::SetDesired {
                        device: m.device.clone(),
                        field: field.clone(),
                        value: value.clone(),
                    },
                    None => Effect::ClearDesired {
                        device: m.device.clone(),
                        field: field.clone(),
                    },
                });
            }
            m.applied = false;
            done.push(m.device.clone());
        }
        done
    }

    fn audit(
        &self,
        at: Timestamp,
        actor: &str,
        action: &str,
        reason: &str,
        details: serde_json::Value,
    ) -> Effect {
        Effect::Audit(RolloutAudit {
            at,
            rollout: self.spec.id.clone(),
            actor: actor.to_string(),
            action: action.to_string(),
            reason: reason.to_string(),
            details,
        })
    }

    fn engine_audit(
        &self,
        at: Timestamp,
        action: &str,
        reason: &str,
        details: serde_json::Value,
    ) -> Effect {
        self.audit(at, ENGINE_ACTOR, action, reason, details)
    }
}
