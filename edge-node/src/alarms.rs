//! Alarm evaluation: a pure engine turning (value, now) observations into
//! raise/clear transitions of [`Alarm`] records, with hysteresis, delay and
//! acknowledgement, plus a built-in rule raising an alarm when a device is
//! unreachable.
//!
//! Semantics of one rule (`Above`; `Below` mirrors it):
//! - the condition holds while `value > threshold`;
//! - it must hold continuously for `delay_ms` before the alarm is raised
//!   (a value back at or under the threshold while waiting cancels it);
//!   [`AlarmEngine::tick`] raises delayed alarms even when no new value comes;
//! - an active alarm clears when `value < threshold - hysteresis`, at once;
//! - an alarm id is `{rule}:{device}:{raised_at ms}`, unique per day document.
//!
//! The engine holds alarms raised since it started (active, and cleared ones
//! until [`AlarmEngine::prune`]); the caller persists transitions.

use std::collections::{BTreeMap, HashMap};

use schemas::alarm::{Alarm, AlarmRule, Condition, Severity};
use schemas::device::{DeviceHealth, HealthStatus};
use schemas::ids::DeviceId;
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;

use crate::modbus::DeviceEvent;

/// Name of the built-in rule for unreachable devices.
pub const UNREACHABLE_RULE: &str = "device-unreachable";
/// Metric name the built-in unreachable rule reports.
pub const HEALTH_METRIC: &str = "health";

/// The built-in rule: raise when a device has been `Unreachable` for
/// `delay_ms`, clear when it answers again.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreachableRule {
    pub delay_ms: u64,
    pub severity: Severity,
}

impl Default for UnreachableRule {
    fn default() -> Self {
        UnreachableRule {
            delay_ms: 60_000,
            severity: Severity::Critical,
        }
    }
}

/// A raise or a clear.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmTransition {
    Raised(Alarm),
    Cleared(Alarm),
}

impl AlarmTransition {
    /// The alarm record after the transition.
    pub fn alarm(&self) -> &Alarm {
        match self {
            AlarmTransition::Raised(a) | AlarmTransition::Cleared(a) => a,
        }
    }
}

/// Rules that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AlarmConfigError {
    /// A rule failed [`AlarmRule::validate`]; `field` is like `alarms[2].threshold`.
    #[error("{field}: {reason}")]
    InvalidRule { field: String, reason: String },
    /// Two rules share a name on one device (alarm ids would collide).
    #[error("alarms[{index}].name: rule {name:?} is defined twice for device {device}")]
    Duplicate {
        index: usize,
        name: String,
        device: DeviceId,
    },
}

/// An acknowledgement that was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// No alarm with that id (never raised, or pruned).
    #[error("no alarm with id {0:?}")]
    UnknownAlarm(String),
    /// Already acknowledged; the first acknowledgement stands.
    #[error("alarm {id:?} was already acknowledged by {by} at {at}")]
    AlreadyAcknowledged {
        id: String,
        by: String,
        at: Timestamp,
    },
    /// `who` is empty.
    #[error("an acknowledgement must say who acknowledges")]
    NoWho,
}

#[derive(Debug, Clone, PartialEq)]
enum RuleState {
    Normal,
    Pending { since: Timestamp, value: f64 },
    Active { id: String },
}

/// One rule's evaluator (pure).
#[derive(Debug, Clone)]
struct Evaluator {
    rule: AlarmRule,
    state: RuleState,
}

impl Evaluator {
    fn new(rule: AlarmRule) -> Self {
        Evaluator {
            rule,
            state: RuleState::Normal,
        }
    }

    fn holds(&self, v: f64) -> bool {
        match self.rule.condition {
            Condition::Above => v > self.rule.threshold,
            Condition::Below => v < self.rule.threshold,
        }
    }

    fn cleared(&self, v: f64) -> bool {
        match self.rule.condition {
            Condition::Above => v < self.rule.threshold - self.rule.hysteresis,
            Condition::Below => v > self.rule.threshold + self.rule.hysteresis,
        }
    }

    /// What to do with a value at `now`: `Some(Ok(value))` to raise with
    /// that value, `Some(Err(id))` to clear alarm `id`.
    fn observe(&mut self, v: f64, now: Timestamp) -> Option<Result<f64, String>> {
        if !v.is_finite() {
            return None;
        }
        match &self.state {
            RuleState::Normal if self.holds(v) => {
                if self.rule.delay_ms == 0 {
                    return Some(Ok(v));
                }
                self.state = RuleState::Pending {
                    since: now,
                    value: v,
                };
                None
            }
            RuleState::Normal => None,
            RuleState::Pending { since, .. } => {
                if !self.holds(v) {
                    self.state = RuleState::Normal;
                    return None;
                }
                let since = *since;
                self.state = RuleState::Pending { since, value: v };
                self.due(now)
            }
            RuleState::Active { id } if self.cleared(v) => {
                let id = id.clone();
                self.state = RuleState::Normal;
                Some(Err(id))
            }
            RuleState::Active { .. } => None,
        }
    }

    /// Raise if the pending delay has run out.
    fn due(&self, now: Timestamp) -> Option<Result<f64, String>> {
        match self.state {
            RuleState::Pending { since, value }
                if now.as_millis().saturating_sub(since.as_millis())
                    >= i64::try_from(self.rule.delay_ms).unwrap_or(i64::MAX) =>
            {
                Some(Ok(value))
            }
            _ => None,
        }
    }
}

/// Evaluates every configured rule plus the built-in unreachable rule, and
/// keeps the alarms it raised.
#[derive(Debug, Clone)]
pub struct AlarmEngine {
    rules: Vec<Evaluator>,
    unreachable: Option<UnreachableRule>,
    health: HashMap<DeviceId, (Evaluator, Option<String>)>,
    alarms: BTreeMap<String, Alarm>,
}

impl AlarmEngine {
    /// An engine for `rules` (validated); `unreachable` enables the built-in
    /// rule for every device whose health is observed.
    pub fn new(
        rules: Vec<AlarmRule>,
        unreachable: Option<UnreachableRule>,
    ) -> Result<Self, AlarmConfigError> {
        for (i, r) in rules.iter().enumerate() {
            r.validate(&format!("alarms[{i}]"))
                .map_err(|(field, reason)| AlarmConfigError::InvalidRule { field, reason })?;
            if rules[..i]
                .iter()
                .any(|o| o.name == r.name && o.device == r.device)
            {
                return Err(AlarmConfigError::Duplicate {
                    index: i,
                    name: r.name.clone(),
                    device: r.device.clone(),
                });
            }
        }
        Ok(AlarmEngine {
            rules: rules.into_iter().map(Evaluator::new).collect(),
            unreachable,
            health: HashMap::new(),
            alarms: BTreeMap::new(),
        })
    }

    fn apply(
        alarms: &mut BTreeMap<String, Alarm>,
        ev: &mut Evaluator,
        action: Result<f64, String>,
        now: Timestamp,
        detail: Option<&str>,
    ) -> Option<AlarmTransition> {
        match action {
            Ok(value) => {
                let r = &ev.rule;
                let id = format!("{}:{}:{}", r.name, r.device, now.as_millis());
                let cmp = match r.condition {
                    Condition::Above => "above",
                    Condition::Below => "below",
                };
                let message = match detail {
                    Some(d) => format!("device {} unreachable: {d}", r.device),
                    None if r.delay_ms > 0 => format!(
                        "{} {value} {cmp} {} for {} s",
                        r.metric,
                        r.threshold,
                        r.delay_ms as f64 / 1000.0
                    ),
                    None => format!("{} {value} {cmp} {}", r.metric, r.threshold),
                };
                let alarm = Alarm {
                    schema_version: SchemaVersion::default(),
                    id: id.clone(),
                    rule: r.name.clone(),
                    device: r.device.clone(),
                    metric: r.metric.clone(),
                    severity: r.severity,
                    raised_at: now,
                    value,
                    message,
                    cleared_at: None,
                    acked_by: None,
                    acked_at: None,
                };
                ev.state = RuleState::Active { id: id.clone() };
                alarms.insert(id, alarm.clone());
                Some(AlarmTransition::Raised(alarm))
            }
            Err(id) => {
                let a = alarms.get_mut(&id)?;
                a.cleared_at = Some(now);
                Some(AlarmTransition::Cleared(a.clone()))
            }
        }
    }

    /// A new value of `metric` of `device`.
    pub fn observe(
        &mut self,
        device: &DeviceId,
        metric: &str,
        value: f64,
        now: Timestamp,
    ) -> Vec<AlarmTransition> {
        let mut out = Vec::new();
        for ev in self
            .rules
            .iter_mut()
            .filter(|e| &e.rule.device == device && e.rule.metric == metric)
        {
            if let Some(action) = ev.observe(value, now)
                && let Some(t) = Self::apply(&mut self.alarms, ev, action, now, None)
            {
                out.push(t);
            }
        }
        out
    }

    /// A device's health changed (or is re-reported).
    pub fn observe_health(
        &mut self,
        device: &DeviceId,
        health: &DeviceHealth,
        now: Timestamp,
    ) -> Vec<AlarmTransition> {
        let Some(rule) = &self.unreachable else {
            return Vec::new();
        };
        let (ev, detail) = self.health.entry(device.clone()).or_insert_with(|| {
            (
                Evaluator::new(AlarmRule {
                    name: UNREACHABLE_RULE.into(),
                    device: device.clone(),
                    metric: HEALTH_METRIC.into(),
                    condition: Condition::Above,
                    threshold: 0.5,
                    hysteresis: 0.0,
                    delay_ms: rule.delay_ms,
                    severity: rule.severity,
                }),
                None,
            )
        });
        *detail = health.last_error.clone();
        let v = if health.status == HealthStatus::Unreachable {
            1.0
        } else {
            0.0
        };
        let detail = detail.clone().unwrap_or_else(|| "no answer".into());
        ev.observe(v, now)
            .and_then(|a| Self::apply(&mut self.alarms, ev, a, now, Some(&detail)))
            .into_iter()
            .collect()
    }

    /// Feed one event of a device adapter (a sample or a health change).
    pub fn observe_event(&mut self, event: &DeviceEvent, now: Timestamp) -> Vec<AlarmTransition> {
        match event {
            DeviceEvent::Sample(s) => self.observe(&s.device, &s.metric, s.value, now),
            DeviceEvent::Health { device, health } => self.observe_health(device, health, now),
        }
    }

    /// Raise alarms whose delay has run out without a new value.
    pub fn tick(&mut self, now: Timestamp) -> Vec<AlarmTransition> {
        let mut out = Vec::new();
        for ev in self.rules.iter_mut() {
            if let Some(a) = ev.due(now)
                && let Some(t) = Self::apply(&mut self.alarms, ev, a, now, None)
            {
                out.push(t);
            }
        }
        for (ev, detail) in self.health.values_mut() {
            let d = detail.clone().unwrap_or_else(|| "no answer".into());
            if let Some(a) = ev.due(now)
                && let Some(t) = Self::apply(&mut self.alarms, ev, a, now, Some(&d))
            {
                out.push(t);
            }
        }
        out
    }

    /// Acknowledge an alarm (active or cleared). The first acknowledgement
    /// stands; a second is refused.
    pub fn acknowledge(&mut self, id: &str, who: &str, now: Timestamp) -> Result<Alarm, AckError> {
        if who.trim().is_empty() {
            return Err(AckError::NoWho);
        }
        let a = self
            .alarms
            .get_mut(id)
            .ok_or_else(|| AckError::UnknownAlarm(id.to_string()))?;
        if let (Some(by), Some(at)) = (&a.acked_by, a.acked_at) {
            return Err(AckError::AlreadyAcknowledged {
                id: id.to_string(),
                by: by.clone(),
                at,
            });
        }
        a.acked_by = Some(who.to_string());
        a.acked_at = Some(now);
        Ok(a.clone())
    }

    /// An alarm by id.
    pub fn get(&self, id: &str) -> Option<&Alarm> {
        self.alarms.get(id)
    }

    /// Alarms not yet cleared, oldest first.
    pub fn active(&self) -> Vec<&Alarm> {
        let mut v: Vec<&Alarm> = self.alarms.values().filter(|a| a.is_active()).collect();
        v.sort_by_key(|a| a.raised_at);
        v
    }

    /// Forget cleared alarms cleared before `before` (after they have been
    /// persisted). Active alarms are kept.
    pub fn prune(&mut self, before: Timestamp) {
        self.alarms
            .retain(|_, a| a.cleared_at.is_none_or(|c| c >= before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn rule(cond: Condition, threshold: f64, hysteresis: f64, delay_ms: u64) -> AlarmRule {
        AlarmRule {
            name: "hot".into(),
            device: dev("room"),
            metric: "temp".into(),
            condition: cond,
            threshold,
            hysteresis,
            delay_ms,
            severity: Severity::Warning,
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp(1_764_000_000_000 + s * 1000)
    }

    fn kinds(v: &[AlarmTransition]) -> Vec<&'static str> {
        v.iter()
            .map(|t| match t {
                AlarmTransition::Raised(_) => "raised",
                AlarmTransition::Cleared(_) => "cleared",
            })
            .collect()
    }

    #[test]
    fn raises_above_and_clears_only_below_the_hysteresis() {
        let mut e = AlarmEngine::new(vec![rule(Condition::Above, 8.0, 1.0, 0)], None).unwrap();
        let d = dev("room");
        assert!(e.observe(&d, "temp", 8.0, t(0)).is_empty(), "at threshold");
        let r = e.observe(&d, "temp", 8.5, t(1));
        assert_eq!(kinds(&r), ["raised"]);
        let a = r[0].alarm().clone();
        assert_eq!(a.id, format!("hot:room:{}", t(1).as_millis()));
        assert_eq!(
            (a.value, a.raised_at, a.severity),
            (8.5, t(1), Severity::Warning)
        );
        assert!(a.message.contains("8.5 above 8"), "{}", a.message);
        assert!(
            e.observe(&d, "temp", 9.5, t(2)).is_empty(),
            "already active"
        );
        assert!(
            e.observe(&d, "temp", 7.5, t(3)).is_empty(),
            "inside hysteresis"
        );
        assert!(e.observe(&d, "temp", 7.0, t(4)).is_empty(), "at clear edge");
        let c = e.observe(&d, "temp", 6.9, t(5));
        assert_eq!(kinds(&c), ["cleared"]);
        assert_eq!(c[0].alarm().cleared_at, Some(t(5)));
        assert_eq!(c[0].alarm().id, a.id);
        assert!(e.active().is_empty());
        // Other devices and metrics are not this rule's business.
        assert!(e.observe(&dev("other"), "temp", 99.0, t(6)).is_empty());
        assert!(e.observe(&d, "humidity", 99.0, t(6)).is_empty());
        // It can raise again, with a new id.
        let r2 = e.observe(&d, "temp", 9.0, t(7));
        assert_ne!(r2[0].alarm().id, a.id);
    }

    #[test]
    fn below_rules_mirror_above_rules() {
        let mut e = AlarmEngine::new(vec![rule(Condition::Below, 2.0, 0.5, 0)], None).unwrap();
        let d = dev("room");
        assert_eq!(kinds(&e.observe(&d, "temp", 1.9, t(0))), ["raised"]);
        assert!(e.observe(&d, "temp", 2.4, t(1)).is_empty());
        assert_eq!(kinds(&e.observe(&d, "temp", 2.6, t(2))), ["cleared"]);
    }

    #[test]
    fn the_condition_must_hold_for_the_delay() {
        let mut e = AlarmEngine::new(vec![rule(Condition::Above, 8.0, 0.0, 60_000)], None).unwrap();
        let d = dev("room");
        assert!(e.observe(&d, "temp", 9.0, t(0)).is_empty());
        assert!(e.observe(&d, "temp", 9.0, t(59)).is_empty());
        // A dip cancels the wait...
        assert!(e.observe(&d, "temp", 7.9, t(60)).is_empty());
        assert!(e.observe(&d, "temp", 9.0, t(61)).is_empty());
        assert!(e.tick(t(120)).is_empty(), "...and it starts over");
        // ...and without new values, tick raises when the delay has run out.
        let r = e.tick(t(121));
        assert_eq!(kinds(&r), ["raised"]);
        assert_eq!(r[0].alarm().raised_at, t(121));
        assert!(
            r[0].alarm().message.contains("for 60 s"),
            "{}",
            r[0].alarm().message
        );
        assert!(e.tick(t(500)).is_empty(), "raised once");
        assert_eq!(e.active().len(), 1);
    }

    #[test]
    fn acknowledgement_is_recorded_once_and_names_who() {
        let mut e = AlarmEngine::new(vec![rule(Condition::Above, 8.0, 0.0, 0)], None).unwrap();
        let r = e.observe(&dev("room"), "temp", 9.0, t(0));
        let id = r[0].alarm().id.clone();
        assert_eq!(e.acknowledge(&id, " ", t(1)), Err(AckError::NoWho));
        let a = e.acknowledge(&id, "operator:ana", t(2)).unwrap();
        assert_eq!(
            (a.acked_by.as_deref(), a.acked_at),
            (Some("operator:ana"), Some(t(2)))
        );
        assert!(a.is_active(), "acknowledged is not cleared");
        let err = e.acknowledge(&id, "operator:bo", t(3)).unwrap_err();
        assert!(err.to_string().contains("operator:ana"), "{err}");
        assert!(matches!(
            e.acknowledge("nope", "x", t(3)),
            Err(AckError::UnknownAlarm(_))
        ));
        // Cleared and pruned alarms are forgotten; active ones are kept.
        e.observe(&dev("room"), "temp", 1.0, t(4));
        e.prune(t(5));
        assert!(e.get(&id).is_none());
    }

    #[test]
    fn an_unreachable_device_raises_the_built_in_alarm_after_its_delay() {
        let mut e = AlarmEngine::new(
            vec![],
            Some(UnreachableRule {
                delay_ms: 30_000,
                severity: Severity::Critical,
            }),
        )
        .unwrap();
        let d = dev("pump-7");
        let mut h = DeviceHealth {
            status: HealthStatus::Degraded,
            last_error: Some("read holding 0..1 unit 1: no answer within 1000 ms".into()),
            since: Some(t(0)),
            last_ok: None,
        };
        assert!(
            e.observe_health(&d, &h, t(0)).is_empty(),
            "degraded is not unreachable"
        );
        h.status = HealthStatus::Unreachable;
        assert!(e.observe_health(&d, &h, t(1)).is_empty(), "delay");
        assert!(e.tick(t(30)).is_empty());
        let r = e.tick(t(31));
        assert_eq!(kinds(&r), ["raised"]);
        let a = r[0].alarm();
        assert_eq!(
            (a.rule.as_str(), a.metric.as_str()),
            (UNREACHABLE_RULE, HEALTH_METRIC)
        );
        assert_eq!(a.severity, Severity::Critical);
        assert!(
            a.message.contains("no answer within 1000 ms"),
            "{}",
            a.message
        );
        h.status = HealthStatus::Ok;
        assert_eq!(kinds(&e.observe_health(&d, &h, t(40))), ["cleared"]);
        // A short outage (shorter than the delay) raises nothing.
        h.status = HealthStatus::Unreachable;
        e.observe_health(&d, &h, t(50));
        h.status = HealthStatus::Ok;
        assert!(e.observe_health(&d, &h, t(60)).is_empty());
        assert!(e.tick(t(200)).is_empty());
        // Without the built-in rule, health never raises.
        let mut off = AlarmEngine::new(vec![], None).unwrap();
        h.status = HealthStatus::Unreachable;
        assert!(off.observe_health(&d, &h, t(0)).is_empty());
        assert!(off.tick(t(1_000)).is_empty());
    }

    #[test]
    fn adapter_events_feed_the_engine() {
        use schemas::metrics::{Sample, Unit};
        let mut e = AlarmEngine::new(
            vec![rule(Condition::Above, 8.0, 0.0, 0)],
            Some(UnreachableRule {
                delay_ms: 0,
                severity: Severity::Critical,
            }),
        )
        .unwrap();
        let sample = DeviceEvent::Sample(Sample {
            schema_version: SchemaVersion::default(),
            device: dev("room"),
            metric: "temp".into(),
            ts: t(0),
            value: 9.0,
            unit: Unit::Celsius,
        });
        assert_eq!(kinds(&e.observe_event(&sample, t(0))), ["raised"]);
        let health = DeviceEvent::Health {
            device: dev("room"),
            health: DeviceHealth {
                status: HealthStatus::Unreachable,
                ..DeviceHealth::default()
            },
        };
        let r = e.observe_event(&health, t(1));
        assert_eq!(r[0].alarm().rule, UNREACHABLE_RULE);
        assert_eq!(e.active().len(), 2);
    }

    #[test]
    fn bad_rules_are_refused_with_the_field() {
        let mut r = rule(Condition::Above, f64::NAN, 0.0, 0);
        let e = AlarmEngine::new(vec![r.clone()], None).unwrap_err();
        assert_eq!(e.to_string(), "alarms[0].threshold: NaN is not finite");
        r.threshold = 1.0;
        let e = AlarmEngine::new(vec![r.clone(), r], None).unwrap_err();
        assert!(e.to_string().contains("alarms[1].name"), "{e}");
    }
}
