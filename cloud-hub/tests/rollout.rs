//! Tests of the rollout engine: canary rollback on a new alarm, healthy
//! completion, pause/resume/abort, restart from serialised state, cohort
//! selection and validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cloud_hub::analytics::DeviceKey;
use cloud_hub::rollout::{
    AlarmSeen, Candidate, CohortSelector, DeviceObservation, Effect, Rollout, RolloutError,
    RolloutSpec, RolloutState,
};
use schemas::alarm::Severity;
use schemas::device::{FieldValue, HealthStatus};
use schemas::time::Timestamp;
use schemas::{SiteId, TenantId};

const T0: i64 = 1_700_000_000_000;
const GATE: i64 = 10_000;

fn key(i: usize) -> DeviceKey {
    DeviceKey::parse("acme", "s1", &format!("d{i:02}")).unwrap()
}

/// 20 cold rooms with setpoint 4.0 (d19 has none); even ones tagged zone-a.
fn candidates() -> Vec<Candidate> {
    (0..20)
        .map(|i| {
            let mut desired = BTreeMap::new();
            if i != 19 {
                desired.insert("setpoint".to_string(), FieldValue::Number(4.0));
            }
            Candidate {
                key: key(i),
                device_type: "cold-room".into(),
                tags: if i % 2 == 0 {
                    vec!["zone-a".into()]
                } else {
                    vec![]
                },
                desired,
            }
        })
        .collect()
}

fn spec(id: &str) -> RolloutSpec {
    RolloutSpec {
        id: id.into(),
        selector: CohortSelector {
            tenant: Some(TenantId::new("acme").unwrap()),
            ..Default::default()
        },
        changes: [("setpoint".to_string(), FieldValue::Number(2.5))].into(),
        canary_percent: 10,
        gate_ms: GATE,
        created_by: "admin:alice".into(),
        reason: "colder storage for fish".into(),
    }
}

/// The world the effects act on: desired config per device, audit actions.
#[derive(Debug, Default, PartialEq)]
struct World {
    desired: BTreeMap<DeviceKey, BTreeMap<String, FieldValue>>,
    audit: Vec<String>,
    touched: Vec<DeviceKey>,
    wakes: Vec<Timestamp>,
}

impl World {
    fn new(c: &[Candidate]) -> World {
        World {
            desired: c
                .iter()
                .map(|c| (c.key.clone(), c.desired.clone()))
                .collect(),
            ..Default::default()
        }
    }
    fn apply(&mut self, fx: &[Effect]) {
        for e in fx {
            match e {
                Effect::SetDesired {
                    device,
                    field,
                    value,
                } => {
                    self.desired
                        .get_mut(device)
                        .unwrap()
                        .insert(field.clone(), value.clone());
                    self.touched.push(device.clone());
                }
                Effect::ClearDesired { device, field } => {
                    self.desired.get_mut(device).unwrap().remove(field);
                    self.touched.push(device.clone());
                }
                Effect::Audit(a) => {
                    assert_eq!(a.rollout, "r1");
                    self.audit.push(a.action.clone());
                }
                Effect::Wake { at } => self.wakes.push(*at),
            }
        }
    }
}

fn healthy(r: &Rollout, at: i64) -> Vec<DeviceObservation> {
    r.members
        .iter()
        .map(|m| DeviceObservation {
            device: m.device.clone(),
            last_report: Some(Timestamp(at)),
            health: HealthStatus::Ok,
            loops_in_fail_safe: vec![],
            alarms: vec![],
        })
        .collect()
}

fn canaries(r: &Rollout) -> Vec<DeviceKey> {
    r.members
        .iter()
        .filter(|m| m.canary)
        .map(|m| m.device.clone())
        .collect()
}

#[test]
fn a_new_alarm_on_a_canary_rolls_back_automatically() {
    let c = candidates();
    let mut w = World::new(&c);
    let before = w.desired.clone();
    let (mut r, fx) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
    w.apply(&fx);
    let can = canaries(&r);
    assert_eq!(can.len(), 2, "10% of 20");
    assert_eq!(w.wakes, vec![Timestamp(T0 + GATE)]);
    for k in &can {
        assert_eq!(w.desired[k]["setpoint"], FieldValue::Number(2.5));
    }
    // Healthy first tick: nothing happens.
    assert!(
        r.handle_tick(Timestamp(T0 + 1_000), &healthy(&r, T0 + 900))
            .is_empty()
    );
    // An alarm raised before the change does not count; one after does.
    let mut obs = healthy(&r, T0 + 2_000);
    for o in obs.iter_mut() {
        if o.device == can[1] {
            o.alarms.push(AlarmSeen {
                id: "old".into(),
                raised_at: Timestamp(T0 - 5),
                severity: Severity::Warning,
            });
        }
    }
    assert!(r.handle_tick(Timestamp(T0 + 2_000), &obs).is_empty());
    for o in obs.iter_mut() {
        if o.device == can[0] {
            o.alarms.push(AlarmSeen {
                id: "high-temp".into(),
                raised_at: Timestamp(T0 + 2_500),
                severity: Severity::Critical,
            });
        }
    }
    let fx = r.handle_tick(Timestamp(T0 + 3_000), &obs);
    w.apply(&fx);
    assert!(
        matches!(&r.state, RolloutState::RolledBack { cause, .. } if cause.contains("high-temp"))
    );
    assert_eq!(w.desired, before, "previous values are back");
    assert_eq!(
        w.audit,
        vec![
            "rollout.started",
            "rollout.canary_applied",
            "rollout.gate_failed",
            "rollout.rolled_back"
        ]
    );
    assert!(
        w.touched.iter().all(|k| can.contains(k)),
        "only canaries were touched"
    );
    assert!(r.next_wake().is_none());
    assert!(
        r.handle_tick(Timestamp(T0 + GATE), &healthy(&r, T0 + GATE))
            .is_empty()
    );
}

#[test]
fn a_healthy_rollout_completes_after_the_gate() {
    let c = candidates();
    let mut w = World::new(&c);
    let (mut r, fx) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
    w.apply(&fx);
    assert!(
        r.handle_tick(Timestamp(T0 + GATE - 1), &healthy(&r, T0 + 5))
            .is_empty()
    );
    let fx = r.handle_tick(Timestamp(T0 + GATE), &healthy(&r, T0 + 5));
    w.apply(&fx);
    assert_eq!(
        r.state,
        RolloutState::Completed {
            at: Timestamp(T0 + GATE)
        }
    );
    for v in w.desired.values() {
        assert_eq!(v["setpoint"], FieldValue::Number(2.5));
    }
    assert_eq!(
        w.audit,
        vec![
            "rollout.started",
            "rollout.canary_applied",
            "rollout.gate_passed",
            "rollout.applied_rest",
            "rollout.completed"
        ]
    );
}

#[test]
fn canaries_that_do_not_report_fail_the_gate() {
    let c = candidates();
    let mut w = World::new(&c);
    let before = w.desired.clone();
    let (mut r, fx) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
    w.apply(&fx);
    // Last report predates the change.
    let fx = r.handle_tick(Timestamp(T0 + GATE), &healthy(&r, T0 - 1));
    w.apply(&fx);
    assert_eq!(r.state.name(), "rolled_back");
    assert_eq!(w.desired, before);
    // A loop in fail-safe also fails it, before the gate ends.
    let (mut r, _) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
    let mut obs = healthy(&r, T0 + 1);
    let can = canaries(&r);
    for o in obs.iter_mut().filter(|o| o.device == can[0]) {
        o.loops_in_fail_safe.push("thermostat".into());
    }
    r.handle_tick(Timestamp(T0 + 1), &obs);
    assert!(
        matches!(&r.state, RolloutState::RolledBack { cause, .. } if cause.contains("thermostat"))
    );
}

#[test]
fn pause_resume_abort() {
    let c = candidates();
    let mut w = World::new(&c);
    let before = w.desired.clone();
    let (mut r, fx) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
    w.apply(&fx);
    w.apply(
        &r.pause(Timestamp(T0 + 1_000), "admin:bob", "night shift")
            .unwrap(),
    );
    assert_eq!(r.state.name(), "paused");
    assert!(
        r.pause(Timestamp(T0 + 1_001), "admin:bob", "again")
            .is_err()
    );
    // Paused: the gate does not end, even long after.
    assert!(
        r.handle_tick(Timestamp(T0 + 50_000), &healthy(&r, T0 + 50_000))
            .is_empty()
    );
    w.apply(
        &r.resume(Timestamp(T0 + 60_000), "admin:bob", "morning")
            .unwrap(),
    );
    assert_eq!(
        r.next_wake(),
        Some(Timestamp(T0 + 69_000)),
        "9 s of gate were left"
    );
    assert!(
        r.handle_tick(Timestamp(T0 + 68_999), &healthy(&r, T0 + 61_000))
            .is_empty()
    );
    w.apply(
        &r.abort(Timestamp(T0 + 68_999), "admin:bob", "customer asked")
            .unwrap(),
    );
    assert_eq!(r.state.name(), "aborted");
    assert_eq!(w.desired, before, "abort reverts the canaries");
    assert!(matches!(
        r.abort(Timestamp(T0 + 70_000), "admin:bob", "x"),
        Err(RolloutError::InvalidTransition {
            action: "abort",
            state: "aborted"
        })
    ));
    assert!(r.resume(Timestamp(T0 + 70_000), "admin:bob", "x").is_err());
    assert_eq!(
        w.audit,
        vec![
            "rollout.started",
            "rollout.canary_applied",
            "rollout.paused",
            "rollout.resumed",
            "rollout.aborted"
        ]
    );
}

/// One scripted input to a rollout.
enum Step {
    Tick(i64, bool),
    Pause(i64),
    Resume(i64),
}

fn run(script: &[Step], restart_between: bool) -> (Rollout, Vec<Effect>) {
    let c = candidates();
    let (mut r, mut all) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
    for s in script {
        if restart_between {
            let saved = serde_json::to_string(&r).unwrap();
            r = serde_json::from_str(&saved).unwrap();
        }
        let fx = match *s {
            Step::Tick(at, alarm) => {
                let mut obs = healthy(&r, at);
                if alarm {
                    let first = canaries(&r)[0].clone();
                    for o in obs.iter_mut().filter(|o| o.device == first) {
                        o.alarms.push(AlarmSeen {
                            id: "a1".into(),
                            raised_at: Timestamp(at),
                            severity: Severity::Warning,
                        });
                    }
                }
                r.handle_tick(Timestamp(at), &obs)
            }
            Step::Pause(at) => r.pause(Timestamp(at), "admin:a", "p").unwrap(),
            Step::Resume(at) => r.resume(Timestamp(at), "admin:a", "r").unwrap(),
        };
        all.extend(fx);
    }
    (r, all)
}

#[test]
fn restart_mid_rollout_gives_the_same_outcome() {
    let scripts = [
        vec![
            Step::Tick(T0 + 100, false),
            Step::Pause(T0 + 200),
            Step::Tick(T0 + 300, false),
            Step::Resume(T0 + 5_000),
            Step::Tick(T0 + 14_000, false),
            Step::Tick(T0 + 14_900, false),
        ],
        vec![
            Step::Tick(T0 + 100, false),
            Step::Tick(T0 + 200, true),
            Step::Tick(T0 + 20_000, false),
        ],
    ];
    let mut outcomes = Vec::new();
    for script in &scripts {
        let straight = run(script, false);
        let restarted = run(script, true);
        assert_eq!(straight, restarted);
        outcomes.push(straight.0.state.name());
    }
    assert_eq!(outcomes, vec!["completed", "rolled_back"]);
}

#[test]
fn cohort_selection_is_deterministic_and_has_a_canary() {
    let c = candidates();
    let mut s = spec("r1");
    s.selector.tags = vec!["zone-a".into()];
    s.selector.site = Some(SiteId::new("s1").unwrap());
    s.selector.device_type = Some("cold-room".into());
    let (a, _) = Rollout::start(s.clone(), &c, Timestamp(T0)).unwrap();
    let (b, _) = Rollout::start(s.clone(), &c, Timestamp(T0 + 7)).unwrap();
    assert_eq!(a.members.len(), 10, "the even devices");
    assert!(a.members.iter().all(|m| m.device.device.as_str() < "d19"));
    assert_eq!(canaries(&a), canaries(&b));
    assert_eq!(canaries(&a).len(), 1, "10% of 10, at least one");
    s.canary_percent = 1;
    s.selector.tags = vec![];
    let (d, _) = Rollout::start(s.clone(), &c, Timestamp(T0)).unwrap();
    assert_eq!(canaries(&d).len(), 1, "1% of 20 rounds up to one");
    s.canary_percent = 100;
    let (e, _) = Rollout::start(s, &c, Timestamp(T0)).unwrap();
    assert_eq!(canaries(&e).len(), 20);
}

#[test]
fn bad_specs_are_refused_naming_the_problem() {
    let c = candidates();
    let mut s = spec("r1");
    s.changes = [("setpiont".to_string(), FieldValue::Number(1.0))].into();
    assert_eq!(
        Rollout::start(s, &c, Timestamp(T0)).unwrap_err(),
        RolloutError::UnknownField("setpiont".into())
    );
    let mut s = spec("r1");
    s.changes = [("setpoint".to_string(), FieldValue::Number(5000.0))].into();
    let e = Rollout::start(s, &c, Timestamp(T0)).unwrap_err();
    assert!(e.to_string().contains("changes.setpoint") && e.to_string().contains("maximum"));
    let mut s = spec("r1");
    s.selector.tenant = Some(TenantId::new("other").unwrap());
    assert_eq!(
        Rollout::start(s, &c, Timestamp(T0)).unwrap_err(),
        RolloutError::EmptyCohort
    );
    let mut s = spec("r1");
    s.canary_percent = 0;
    assert_eq!(
        Rollout::start(s, &c, Timestamp(T0)).unwrap_err(),
        RolloutError::CanaryPercent(0)
    );
    let mut s = spec("r1");
    s.gate_ms = 0;
    assert_eq!(
        Rollout::start(s, &c, Timestamp(T0)).unwrap_err(),
        RolloutError::GateMs(0)
    );
}

#[test]
fn new_alarms_anywhere_in_the_cohort_fail_the_gate_but_not_outside_it() {
    let c = candidates();
    let mut s = spec("r1");
    s.selector.tags = vec!["zone-a".into()];
    let (mut r, _) = Rollout::start(s.clone(), &c, Timestamp(T0)).unwrap();
    let non_canary = r.members.iter().find(|m| !m.canary).unwrap().device.clone();
    let outsider = key(1); // odd: not tagged zone-a
    assert!(r.members.iter().all(|m| m.device != outsider));
    let new_alarm = |d: &DeviceKey| DeviceObservation {
        device: d.clone(),
        last_report: Some(Timestamp(T0 + 1)),
        health: HealthStatus::Ok,
        loops_in_fail_safe: vec![],
        alarms: vec![AlarmSeen {
            id: "x".into(),
            raised_at: Timestamp(T0 + 1),
            severity: Severity::Info,
        }],
    };
    let mut obs = healthy(&r, T0 + 1);
    obs.push(new_alarm(&outsider));
    assert!(
        r.handle_tick(Timestamp(T0 + 2), &obs).is_empty(),
        "outsider ignored"
    );
    obs.retain(|o| o.device != non_canary);
    obs.push(new_alarm(&non_canary));
    r.handle_tick(Timestamp(T0 + 3), &obs);
    assert!(
        matches!(&r.state, RolloutState::RolledBack { cause, .. } if cause.contains("cohort device"))
    );
}

#[test]
fn active_rollouts_on_the_same_device_and_field_conflict() {
    let c = candidates();
    let (a, _) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
    let (mut b, _) = Rollout::start(spec("r2"), &c, Timestamp(T0)).unwrap();
    assert!(a.conflicts_with(&b) && b.conflicts_with(&a));
    let mut other_field = spec("r3");
    other_field.changes = [("hysteresis".to_string(), FieldValue::Number(1.0))].into();
    let (d, _) = Rollout::start(other_field, &c, Timestamp(T0)).unwrap();
    assert!(!a.conflicts_with(&d));
    let mut other_devices = spec("r4");
    other_devices.selector.tags = vec!["zone-a".into()];
    let (e, _) = Rollout::start(other_devices.clone(), &c, Timestamp(T0)).unwrap();
    assert!(a.conflicts_with(&e), "zone-a is inside the whole tenant");
    b.abort(Timestamp(T0 + 1), "admin:a", "x").unwrap();
    assert!(
        !a.conflicts_with(&b),
        "a finished rollout no longer conflicts"
    );
}

mod random_schedules {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Input {
        /// Advance by ms, then tick; maybe with a new alarm on member `i`,
        /// maybe with a canary that has not reported.
        Tick {
            advance: i64,
            alarm_on: Option<usize>,
            silent: bool,
        },
        Pause,
        Resume,
        Abort,
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            6 => (0i64..6_000, proptest::option::weighted(0.15, 0usize..20), proptest::bool::weighted(0.1))
                .prop_map(|(advance, alarm_on, silent)| Input::Tick { advance, alarm_on, silent }),
            1 => Just(Input::Pause),
            1 => Just(Input::Resume),
            1 => Just(Input::Abort),
        ]
    }

    fn drive(inputs: &[Input], restart: bool) -> (Rollout, World, Vec<Effect>) {
        let c = candidates();
        let mut w = World::new(&c);
        let (mut r, fx) = Rollout::start(spec("r1"), &c, Timestamp(T0)).unwrap();
        w.apply(&fx);
        let mut all = fx;
        let mut now = T0;
        for i in inputs {
            if restart {
                r = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            }
            let fx = match i {
                Input::Tick {
                    advance,
                    alarm_on,
                    silent,
                } => {
                    now += advance;
                    let mut obs = healthy(&r, now);
                    if let Some(m) = alarm_on
                        && let Some(o) = obs.get_mut(*m % 20)
                    {
                        o.alarms.push(AlarmSeen {
                            id: "a".into(),
                            raised_at: Timestamp(now),
                            severity: Severity::Warning,
                        });
                    }
                    if *silent {
                        let first = canaries(&r)[0].clone();
                        obs.retain(|o| o.device != first);
                    }
                    r.handle_tick(Timestamp(now), &obs)
                }
                Input::Pause => r.pause(Timestamp(now), "admin:a", "p").unwrap_or_default(),
                Input::Resume => r.resume(Timestamp(now), "admin:a", "r").unwrap_or_default(),
                Input::Abort => r.abort(Timestamp(now), "admin:a", "x").unwrap_or_default(),
            };
            w.apply(&fx);
            all.extend(fx);
        }
        (r, w, all)
    }

    proptest! {
        /// Whatever the schedule: a restart before every input changes
        /// nothing; a rolled-back or aborted rollout leaves every device as
        /// it was; a completed one leaves every device with the new value;
        /// the rest of the cohort is never touched before the gate passed.
        #[test]
        fn invariants_hold_over_random_schedules(inputs in proptest::collection::vec(input(), 0..25)) {
            let (r, w, fx) = drive(&inputs, false);
            let (r2, w2, fx2) = drive(&inputs, true);
            prop_assert_eq!(&r, &r2);
            prop_assert_eq!(&fx, &fx2);
            prop_assert_eq!(&w, &w2);
            let original = World::new(&candidates()).desired;
            match &r.state {
                RolloutState::RolledBack { .. } | RolloutState::Aborted { .. } => {
                    prop_assert_eq!(&w.desired, &original);
                    prop_assert!(w.touched.iter().all(|k| canaries(&r).contains(k)));
                }
                RolloutState::Completed { .. } => {
                    for v in w.desired.values() {
                        prop_assert_eq!(&v["setpoint"], &FieldValue::Number(2.5));
                    }
                    prop_assert_eq!(w.audit.last().map(String::as_str), Some("rollout.completed"));
                }
                RolloutState::Canary { .. } | RolloutState::Paused { .. } => {
                    prop_assert!(w.touched.iter().all(|k| canaries(&r).contains(k)));
                }
            }
            prop_assert_eq!(w.audit.first().map(String::as_str), Some("rollout.started"));
        }
    }
}
