//! Local control loops: pure decision state machines (thermostat, interlock)
//! driven by an injected `now`, and a runner task that executes them on a
//! fixed period whatever the network does.
//!
//! The decision logic ([`ControlLoop::step`]) takes the latest sensor value
//! and its age, the effective parameters and the time, and returns the
//! output to command plus an event when something changed. It does no IO.
//! The runner ([`spawn_loop`]) reads the sensor from [`LatestValues`],
//! never awaits the network or the device, and hands the output to the
//! device task with a non-blocking [`Actuator`].

mod jitter;
pub mod journal;
mod runner;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use schemas::config::{FailSafe, LoopConfig};
use schemas::device::FieldValue;
use schemas::time::Timestamp;
use serde::Serialize;

pub use jitter::{JitterStats, JitterWindow};
pub use journal::{
    JournalError, JournalHandle, JournalStart, TICK_JOURNAL_FILE, TickJournal, TickSender,
    read_journal, uptime_ms,
};
pub use runner::{
    Actuator, CoilActuator, LoopOptions, LoopRunner, spawn_loop, spawn_loop_journaled,
};

#[cfg(doc)]
use crate::modbus::LatestValues;

/// Effective parameters of a loop: from [`LoopConfig`] defaults now, later
/// from the device document after its merge policy.
#[derive(Debug, Clone, PartialEq)]
pub enum LoopParams {
    /// Cooling thermostat.
    Thermostat {
        setpoint: f64,
        /// Width of the dead band around the setpoint.
        hysteresis: f64,
        min_on: Duration,
        min_off: Duration,
    },
    /// Output forced off above `limit`, released below `limit - margin`.
    Interlock { limit: f64, margin: f64 },
}

/// Parameters that cannot be used; the runner keeps the previous ones.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    /// A number is NaN/infinite or negative where it must not be.
    #[error("loop {loop_name}: {field} = {value} {reason}")]
    Invalid {
        loop_name: String,
        field: &'static str,
        value: f64,
        reason: &'static str,
    },
    /// Thermostat parameters given to an interlock or the reverse.
    #[error("loop {loop_name}: got {got} parameters for a {want} loop")]
    WrongKind {
        loop_name: String,
        got: &'static str,
        want: &'static str,
    },
}

/// Default interlock release margin: 2 % of the limit, at least 0.1.
pub fn default_margin(limit: f64) -> f64 {
    (limit.abs() * 0.02).max(0.1)
}

impl LoopParams {
    /// The parameters a loop starts with, from its config.
    pub fn from_config(cfg: &LoopConfig) -> LoopParams {
        match cfg {
            LoopConfig::Thermostat {
                default_setpoint,
                default_hysteresis,
                min_on_s,
                min_off_s,
                ..
            } => LoopParams::Thermostat {
                setpoint: *default_setpoint,
                hysteresis: *default_hysteresis,
                min_on: Duration::from_secs(*min_on_s),
                min_off: Duration::from_secs(*min_off_s),
            },
            LoopConfig::Interlock { default_limit, .. } => LoopParams::Interlock {
                limit: *default_limit,
                margin: default_margin(*default_limit),
            },
        }
    }

    /// These parameters with the device document's effective desired
    /// fields applied (values already resolved by their merge policy):
    /// `setpoint`, `hysteresis`, `min_on_s`, `min_off_s` for a thermostat,
    /// `high_limit` for an interlock. Other fields are ignored; a field of
    /// the wrong type or an unusable number is refused, naming the field.
    pub fn with_fields(
        &self,
        loop_name: &str,
        fields: &BTreeMap<String, FieldValue>,
    ) -> Result<LoopParams, ParamError> {
        let num = |field: &'static str| -> Result<Option<f64>, ParamError> {
            match fields.get(field) {
                None => Ok(None),
                Some(FieldValue::Number(n)) => Ok(Some(*n)),
                Some(_) => Err(ParamError::Invalid {
                    loop_name: loop_name.to_string(),
                    field,
                    value: f64::NAN,
                    reason: "is not a number",
                }),
            }
        };
        let secs = |field: &'static str, v: f64| -> Result<Duration, ParamError> {
            Duration::try_from_secs_f64(v).map_err(|_| ParamError::Invalid {
                loop_name: loop_name.to_string(),
                field,
                value: v,
                reason: "must be a finite number of seconds >= 0",
            })
        };
        let mut p = self.clone();
        match &mut p {
            LoopParams::Thermostat {
                setpoint,
                hysteresis,
                min_on,
                min_off,
            } => {
                if let Some(v) = num("setpoint")? {
                    *setpoint = v;
                }
                if let Some(v) = num("hysteresis")? {
                    *hysteresis = v;
                }
                if let Some(v) = num("min_on_s")? {
                    *min_on = secs("min_on_s", v)?;
                }
                if let Some(v) = num("min_off_s")? {
                    *min_off = secs("min_off_s", v)?;
                }
            }
            LoopParams::Interlock { limit, margin } => {
                if let Some(v) = num("high_limit")? {
                    *limit = v;
                    *margin = default_margin(v);
                }
            }
        }
        p.validate(loop_name)?;
        Ok(p)
    }

    fn kind(&self) -> &'static str {
        match self {
            LoopParams::Thermostat { .. } => "thermostat",
            LoopParams::Interlock { .. } => "interlock",
        }
    }

    /// The value reported as `LoopState.setpoint` (setpoint or limit).
    pub fn target(&self) -> f64 {
        match self {
            LoopParams::Thermostat { setpoint, .. } => *setpoint,
            LoopParams::Interlock { limit, .. } => *limit,
        }
    }

    /// Check the numbers (finite, non-negative widths).
    pub fn validate(&self, loop_name: &str) -> Result<(), ParamError> {
        let bad = |field, value, reason| {
            Err(ParamError::Invalid {
                loop_name: loop_name.to_string(),
                field,
                value,
                reason,
            })
        };
        match *self {
            LoopParams::Thermostat {
                setpoint,
                hysteresis,
                ..
            } => {
                if !setpoint.is_finite() {
                    return bad("setpoint", setpoint, "is not finite");
                }
                if !hysteresis.is_finite() || hysteresis < 0.0 {
                    return bad("hysteresis", hysteresis, "must be finite and >= 0");
                }
            }
            LoopParams::Interlock { limit, margin } => {
                if !limit.is_finite() {
                    return bad("limit", limit, "is not finite");
                }
                if !margin.is_finite() || margin < 0.0 {
                    return bad("margin", margin, "must be finite and >= 0");
                }
            }
        }
        Ok(())
    }
}

/// The process value as the loop sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SensorInput {
    pub value: f64,
    /// Time since it was read from the device.
    pub age: Duration,
}

/// Why a loop's output is what it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LoopReason {
    /// First decision after start (the output is asserted once).
    Initial { value: f64 },
    /// Thermostat: above the band, cooling on.
    AboveBand { value: f64, high: f64 },
    /// Thermostat: below the band, cooling off.
    BelowBand { value: f64, low: f64 },
    /// Interlock: above the limit, output forced off.
    Tripped { value: f64, limit: f64 },
    /// Interlock: back below `limit - margin`, output released.
    Released { value: f64, resume_below: f64 },
    /// No value, or a value older than the loop's staleness bound: the
    /// output goes to the declared fail-safe.
    SensorFault { detail: String },
    /// A fresh value again after a fault; normal control resumes.
    SensorRecovered { value: f64 },
}

impl fmt::Display for LoopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoopReason::Initial { value } => write!(f, "initial decision at {value}"),
            LoopReason::AboveBand { value, high } => write!(f, "{value} above {high}"),
            LoopReason::BelowBand { value, low } => write!(f, "{value} below {low}"),
            LoopReason::Tripped { value, limit } => {
                write!(f, "interlock tripped: {value} above limit {limit}")
            }
            LoopReason::Released {
                value,
                resume_below,
            } => {
                write!(f, "interlock released: {value} below {resume_below}")
            }
            LoopReason::SensorFault { detail } => write!(f, "sensor fault: {detail}"),
            LoopReason::SensorRecovered { value } => write!(f, "sensor recovered at {value}"),
        }
    }
}

/// One decision worth recording: an actuation, or entering/leaving the
/// fail-safe state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoopEvent {
    #[serde(rename = "loop")]
    pub loop_name: String,
    pub at: Timestamp,
    pub output: bool,
    pub reason: LoopReason,
}

/// What one step decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The output that should be on the device now.
    pub output: bool,
    /// True while the sensor is faulty.
    pub fail_safe: bool,
    pub event: Option<LoopEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Thermostat,
    Interlock,
}

/// A control loop's decision state machine.
///
/// Thermostat (cooling): turns on above `setpoint + hysteresis/2`, off below
/// `setpoint - hysteresis/2`, and never turns on before `min_off` has passed
/// since it turned off, nor off before `min_on` since it turned on.
///
/// Interlock: output on, forced off while the value is above `limit`, and
/// released only when it is back below `limit - margin`.
///
/// Both: a missing value, or one older than `stale_after`, is a sensor
/// fault; the output goes to the declared [`FailSafe`] at once (safety wins
/// over the minimum on/off times), and normal control resumes with the next
/// fresh value.
#[derive(Debug, Clone)]
pub struct ControlLoop {
    name: String,
    kind: Kind,
    fail_safe: FailSafe,
    stale_after: Duration,
    output: Option<bool>,
    last_change: Option<Instant>,
    last_change_at: Option<Timestamp>,
    in_fault: bool,
    tripped: bool,
}

impl ControlLoop {
    /// A loop from its config; a value older than `stale_after` is a fault.
    pub fn new(cfg: &LoopConfig, stale_after: Duration) -> Self {
        let (kind, fail_safe) = match cfg {
            LoopConfig::Thermostat { fail_safe, .. } => (Kind::Thermostat, *fail_safe),
            LoopConfig::Interlock { fail_safe, .. } => (Kind::Interlock, *fail_safe),
        };
        ControlLoop {
            name: cfg.name().to_string(),
            kind,
            fail_safe,
            stale_after,
            output: None,
            last_change: None,
            last_change_at: None,
            in_fault: false,
            tripped: false,
        }
    }

    /// The loop's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The output decided last, `None` before the first step.
    pub fn output(&self) -> Option<bool> {
        self.output
    }

    /// When the output last changed (wall time).
    pub fn last_change_at(&self) -> Option<Timestamp> {
        self.last_change_at
    }

    /// Whether the parameters fit this loop (kind and numbers).
    pub fn check_params(&self, p: &LoopParams) -> Result<(), ParamError> {
        let want = match self.kind {
            Kind::Thermostat => "thermostat",
            Kind::Interlock => "interlock",
        };
        if p.kind() != want {
            return Err(ParamError::WrongKind {
                loop_name: self.name.clone(),
                got: p.kind(),
                want,
            });
        }
        p.validate(&self.name)
    }

    /// Decide the output at `now` (monotonic, for durations) / `at` (wall
    /// time, for the record). Parameters that do not fit the loop are
    /// treated like a sensor fault: the loop goes to its fail-safe.
    pub fn step(
        &mut self,
        now: Instant,
        at: Timestamp,
        sensor: Option<SensorInput>,
        params: &LoopParams,
    ) -> Decision {
        let input: Result<SensorInput, String> = match sensor {
            None => Err("no value read yet".to_string()),
            Some(s) if s.age > self.stale_after => Err(format!(
                "last value is {} ms old (limit {} ms)",
                s.age.as_millis(),
                self.stale_after.as_millis()
            )),
            Some(s) if !s.value.is_finite() => Err(format!("value {} is not finite", s.value)),
            Some(s) => Ok(s),
        }
        .and_then(|s| {
            self.check_params(params)
                .map(|()| s)
                .map_err(|e| e.to_string())
        });
        let (want, reason) = match input {
            Err(detail) => {
                let out = match self.fail_safe {
                    FailSafe::Off => false,
                    FailSafe::On => true,
                    FailSafe::Hold => self.output.unwrap_or(false),
                };
                let entering = !self.in_fault;
                self.in_fault = true;
                (out, entering.then_some(LoopReason::SensorFault { detail }))
            }
            Ok(s) => {
                let recovered = self.in_fault;
                self.in_fault = false;
                let (out, reason) = self.decide(now, s.value, params);
                if recovered {
                    (out, Some(LoopReason::SensorRecovered { value: s.value }))
                } else {
                    (out, reason)
                }
            }
        };
        let changed = self.output != Some(want);
        let reason = match (self.output, reason) {
            (None, None) => Some(LoopReason::Initial {
                value: sensor.map_or(f64::NAN, |s| s.value),
            }),
            (_, r) => r,
        };
        if changed {
            self.output = Some(want);
            self.last_change = Some(now);
            self.last_change_at = Some(at);
        }
        // An event for every output change and every fault transition; a
        // reason without a change (e.g. min-on still running) is not one.
        let event = reason
            .filter(|r| {
                changed
                    || matches!(
                        r,
                        LoopReason::SensorFault { .. } | LoopReason::SensorRecovered { .. }
                    )
            })
            .map(|reason| LoopEvent {
                loop_name: self.name.clone(),
                at,
                output: want,
                reason,
            });
        Decision {
            output: want,
            fail_safe: self.in_fault,
            event,
        }
    }

    /// Normal control (fresh, valid value): the wanted output and why.
    fn decide(&mut self, now: Instant, v: f64, params: &LoopParams) -> (bool, Option<LoopReason>) {
        let cur = self.output;
        match (self.kind, params) {
            (
                Kind::Thermostat,
                LoopParams::Thermostat {
                    setpoint,
                    hysteresis,
                    min_on,
                    min_off,
                },
            ) => {
                let high = setpoint + hysteresis / 2.0;
                let low = setpoint - hysteresis / 2.0;
                let held_for = self.last_change.map(|t| now.saturating_duration_since(t));
                let may = |min: &Duration| held_for.is_none_or(|d| d >= *min);
                match cur {
                    Some(true) if v < low && may(min_on) => {
                        (false, Some(LoopReason::BelowBand { value: v, low }))
                    }
                    Some(false) if v > high && may(min_off) => {
                        (true, Some(LoopReason::AboveBand { value: v, high }))
                    }
                    Some(c) => (c, None),
                    None => (v > high, None),
                }
            }
            (Kind::Interlock, LoopParams::Interlock { limit, margin }) => {
                let resume_below = limit - margin;
                if !self.tripped && v > *limit {
                    self.tripped = true;
                    return (
                        false,
                        Some(LoopReason::Tripped {
                            value: v,
                            limit: *limit,
                        }),
                    );
                }
                if self.tripped && v < resume_below {
                    self.tripped = false;
                    return (
                        true,
                        Some(LoopReason::Released {
                            value: v,
                            resume_below,
                        }),
                    );
                }
                (!self.tripped, None)
            }
            // check_params made this a fault before we get here.
            _ => (self.output.unwrap_or(false), None),
        }
    }
}
