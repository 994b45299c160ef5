//! A simulated device: a physics model behind a register map, with faults.
//!
//! [`SimDevice`] is sans-IO: it turns one Modbus request into an [`Answer`]
//! (a response or an exception, plus what the transport must do: wait,
//! stay silent, drop the connection). The server in [`crate::server`] only
//! carries that answer out. [`DeviceHandle`] shares a device between its
//! server, the clock that advances it, and whoever injects faults.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use schemas::registers::{RegisterFunction, RegisterMap, RegisterMapError, RegisterSpec};
use tokio_modbus::{ExceptionCode, Request, Response};

use crate::physics::{DeviceKind, Model, ModelError};
use crate::rng::SimRng;

/// Most registers one read may ask for (Modbus limit).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most bits one read may ask for (Modbus limit).
pub const MAX_READ_BITS: u16 = 2000;

/// A device fault, observable by a Modbus client.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Reads of `signal` (every signal if `None`) return the value it had
    /// when the fault was injected.
    Stuck {
        /// Signal frozen, or all of them.
        signal: Option<String>,
    },
    /// Each read of `signal` (every numeric signal if `None`) is off by
    /// `magnitude` (random sign) with probability `probability`.
    Spikes {
        /// Signal disturbed, or all numeric ones.
        signal: Option<String>,
        /// Chance per read, 0..=1.
        probability: f64,
        /// Size of a spike, in the signal's unit.
        magnitude: f64,
    },
    /// Every answer is sent this late.
    Slow {
        /// Extra delay before answering.
        delay: Duration,
    },
    /// Requests are read and never answered.
    Missing,
    /// Every request is answered with this exception.
    Exception(ExceptionCode),
    /// Each request closes its connection without an answer.
    DropConnection,
}

/// A fault description that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fault {input:?}: {reason} (expected stuck[:signal], spikes:signal|*:probability:magnitude, slow:ms, missing, exception:code, drop)"
)]
pub struct FaultParseError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

const EXCEPTION_NAMES: [(&str, ExceptionCode); 9] = [
    ("illegal-function", ExceptionCode::IllegalFunction),
    ("illegal-data-address", ExceptionCode::IllegalDataAddress),
    ("illegal-data-value", ExceptionCode::IllegalDataValue),
    ("server-device-failure", ExceptionCode::ServerDeviceFailure),
    ("acknowledge", ExceptionCode::Acknowledge),
    ("server-device-busy", ExceptionCode::ServerDeviceBusy),
    ("memory-parity-error", ExceptionCode::MemoryParityError),
    (
        "gateway-path-unavailable",
        ExceptionCode::GatewayPathUnavailable,
    ),
    ("gateway-target-device", ExceptionCode::GatewayTargetDevice),
];

impl std::str::FromStr for Fault {
    type Err = FaultParseError;

    /// Parse the compact form used on the command line and in scenario
    /// files: `stuck`, `stuck:temperature`, `spikes:voltage:0.2:15`,
    /// `spikes:*:1:5`, `slow:500`, `missing`,
    /// `exception:server-device-failure` (or a number), `drop`.
    fn from_str(s: &str) -> Result<Fault, FaultParseError> {
        let err = |reason: &str| FaultParseError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let num = |x: &str, what: &str| -> Result<f64, FaultParseError> {
            x.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(&format!("{what} {x:?} is not a finite number")))
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        match parts.as_slice() {
            ["stuck"] => Ok(Fault::Stuck { signal: None }),
            ["stuck", sig] if !sig.is_empty() => Ok(Fault::Stuck {
                signal: Some((*sig).to_string()),
            }),
            ["spikes", sig, p, m] if !sig.is_empty() => {
                let probability = num(p, "probability")?;
                if !(0.0..=1.0).contains(&probability) {
                    return Err(err("probability must be within 0..=1"));
                }
                Ok(Fault::Spikes {
                    signal: (*sig != "*").then(|| (*sig).to_string()),
                    probability,
                    magnitude: num(m, "magnitude")?,
                })
            }
            ["slow", ms] => {
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| err("slow needs a whole number of milliseconds"))?;
                Ok(Fault::Slow {
                    delay: Duration::from_millis(ms),
                })
            }
            ["missing"] => Ok(Fault::Missing),
            ["drop"] => Ok(Fault::DropConnection),
            ["exception", code] => {
                if let Some((_, c)) = EXCEPTION_NAMES.iter().find(|(n, _)| n == code) {
                    return Ok(Fault::Exception(*c));
                }
                match code.parse::<u8>() {
                    Ok(n) if n > 0 && n < 0x80 => Ok(Fault::Exception(ExceptionCode::new(n))),
                    _ => Err(err("unknown exception code")),
                }
            }
            _ => Err(err("unknown fault")),
        }
    }
}

/// The faults active on a device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Frozen values by signal.
    pub stuck: BTreeMap<String, f64>,
    /// Spikes: `(signal or all, probability, magnitude)`.
    pub spikes: Vec<(Option<String>, f64, f64)>,
    /// Delay before answering.
    pub delay: Option<Duration>,
    /// Never answer.
    pub missing: bool,
    /// Answer with this exception.
    pub exception: Option<ExceptionCode>,
    /// Close the connection on each request.
    pub drop_connection: bool,
}

/// What the transport must do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Send this response.
    Reply(Response),
    /// Send this exception.
    Exception(ExceptionCode),
    /// Send nothing; keep the connection.
    NoAnswer,
    /// Send nothing; close the connection.
    Drop,
}

/// An [`Outcome`] and how long to wait before carrying it out.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// What to do.
    pub outcome: Outcome,
    /// Wait this long first.
    pub delay: Option<Duration>,
}

/// Why a device could not be built from a register map.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The register map itself is invalid.
    #[error("register map: {0}")]
    InvalidMap(#[from] RegisterMapError),
    /// A register names a signal the model does not have.
    #[error("register {register:?} is not a signal of a simulated {kind} (it has: {known})")]
    UnknownSignal {
        /// Register name.
        register: String,
        /// Simulated kind.
        kind: DeviceKind,
        /// The signals it does have, comma-separated.
        known: String,
    },
}

/// A physics model served through a register map, with injectable faults.
#[derive(Debug)]
pub struct SimDevice {
    model: Box<dyn Model>,
    map: RegisterMap,
    faults: Faults,
    fault_rng: SimRng,
}

impl SimDevice {
    /// Serve `model` through `map`; every register must name a signal of
    /// the model.
    pub fn new(
        model: Box<dyn Model>,
        map: RegisterMap,
        seed: u64,
    ) -> Result<SimDevice, DeviceError> {
        map.validate()?;
        for r in &map.registers {
            if model.signal(&r.name).is_none() {
                return Err(DeviceError::UnknownSignal {
                    register: r.name.clone(),
                    kind: model.kind(),
                    known: model.signals().join(", "),
                });
            }
        }
        Ok(SimDevice {
            model,
            map,
            faults: Faults::default(),
            fault_rng: SimRng::seed_from_u64(seed ^ 0xFA17_FA17_FA17_FA17),
        })
    }

    /// The model (read-only).
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The register map served.
    pub fn map(&self) -> &RegisterMap {
        &self.map
    }

    /// Advance the physics by `dt` of simulated time.
    pub fn advance(&mut self, dt: Duration) {
        self.model.step(dt.as_secs_f64());
    }

    /// Command a writable signal directly (as a write over Modbus would).
    pub fn set(&mut self, signal: &str, value: f64) -> Result<(), ModelError> {
        self.model.set(signal, value)
    }

    /// Activate a fault (adds to those already active).
    pub fn inject(&mut self, fault: Fault) {
        let f = &mut self.faults;
        match fault {
            Fault::Stuck { signal: Some(s) } => {
                if let Some(v) = self.model.signal(&s) {
                    f.stuck.insert(s, v);
                }
            }
            Fault::Stuck { signal: None } => {
                for s in self.model.signals() {
                    if let Some(v) = self.model.signal(s) {
                        f.stuck.insert((*s).to_string(), v);
                    }
                }
            }
            Fault::Spikes {
                signal,
                probability,
                magnitude,
            } => f.spikes.push((signal, probability, magnitude)),
            Fault::Slow { delay } => f.delay = Some(delay),
            Fault::Missing => f.missing = true,
            Fault::Exception(code) => f.exception = Some(code),
            Fault::DropConnection => f.drop_connection = true,
        }
    }

    /// Remove every fault.
    pub fn clear_faults(&mut self) {
        self.faults = Faults::default();
    }

    /// The faults now active.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The value a client would read now for `signal`, faults applied
    /// (without drawing spikes).
    pub fn reported(&self, signal: &str) -> Option<f64> {
        self.faults
            .stuck
            .get(signal)
            .copied()
            .or_else(|| self.model.signal(signal))
    }

    fn read_value(&mut self, spec: &RegisterSpec) -> f64 {
        let mut v = self.reported(&spec.name).unwrap_or(0.0);
        if spec.function.is_bit() {
            return v;
        }
        for (sig, p, mag) in &self.faults.spikes {
            if sig.as_ref().is_none_or(|s| s == &spec.name) && self.fault_rng.chance(*p) {
                v += if self.fault_rng.chance(0.5) {
                    *mag
                } else {
                    -*mag
                };
            }
        }
        v
    }

    fn spec_at(&self, unit: u8, function: RegisterFunction, addr: u16) -> Option<usize> {
        self.map.registers.iter().position(|r| {
            r.unit_id == unit
                && r.function == function
                && u32::from(r.address) <= u32::from(addr)
                && u32::from(addr) < u32::from(r.address) + u32::from(r.data_type.words())
        })
    }

    fn read_words(
        &mut self,
        unit: u8,
        function: RegisterFunction,
        addr: u16,
        qty: u16,
    ) -> Result<Vec<u16>, ExceptionCode> {
        let max = if function.is_bit() {
            MAX_READ_BITS
        } else {
            MAX_READ_REGISTERS
        };
        if qty == 0 || qty > max {
            return Err(ExceptionCode::IllegalDataValue);
        }
        if u32::from(addr) + u32::from(qty) > 65_536 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let mut cache: Vec<(usize, Vec<u16>)> = Vec::new();
        let mut out = Vec::with_capacity(usize::from(qty));
        for a in addr..=addr + (qty - 1) {
            let i = self
                .spec_at(unit, function, a)
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            let words = match cache.iter().find(|(j, _)| *j == i) {
                Some((_, w)) => w.clone(),
                None => {
                    let spec = self.map.registers[i].clone();
                    let w = spec.encode(self.read_value(&spec));
                    cache.push((i, w.clone()));
                    w
                }
            };
            let off = usize::from(a - self.map.registers[i].address);
            out.push(words.get(off).copied().unwrap_or(0));
        }
        Ok(out)
    }

    fn write_value(&mut self, i: usize, value: f64) -> Result<(), ExceptionCode> {
        let name = self.map.registers[i].name.clone();
        self.model.set(&name, value).map_err(|e| match e {
            ModelError::OutOfRange { .. } => ExceptionCode::IllegalDataValue,
            _ => ExceptionCode::IllegalDataAddress,
        })
    }

    fn write_words(&mut self, unit: u8, addr: u16, words: &[u16]) -> Result<(), ExceptionCode> {
        if words.is_empty() || words.len() > 123 {
            return Err(ExceptionCode::IllegalDataValue);
        }
        // Decode everything first: a write that does not cover whole values
        // changes nothing.
        let mut writes = Vec::new();
        let mut pos = 0usize;
        while pos < words.len() {
            let a = u16::try_from(usize::from(addr) + pos)
                .map_err(|_| ExceptionCode::IllegalDataAddress)?;
            let i = self
                .spec_at(unit, RegisterFunction::Holding, a)
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            let spec = &self.map.registers[i];
            let n = usize::from(spec.data_type.words());
            if spec.address != a || pos + n > words.len() {
                return Err(ExceptionCode::IllegalDataAddress);
            }
            let v = spec
                .decode(&words[pos..pos + n])
                .map_err(|_| ExceptionCode::IllegalDataValue)?;
            writes.push((i, v));
            pos += n;
        }
        for (i, v) in writes {
            self.write_value(i, v)?;
        }
        Ok(())
    }

    fn write_bits(&mut self, unit: u8, addr: u16, bits: &[bool]) -> Result<(), ExceptionCode> {
        if bits.is_empty() || bits.len() > 1968 {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let mut writes = Vec::new();
        for (k, b) in bits.iter().enumerate() {
            let a = u16::try_from(usize::from(addr) + k)
                .map_err(|_| ExceptionCode::IllegalDataAddress)?;
            let i = self
                .spec_at(unit, RegisterFunction::Coil, a)
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            writes.push((i, f64::from(u8::from(*b))));
        }
        for (i, v) in writes {
            self.write_value(i, v)?;
        }
        Ok(())
    }

    fn serve(&mut self, unit: u8, req: &Request<'_>) -> Result<Response, ExceptionCode> {
        use RegisterFunction::{Coil, Discrete, Holding, Input};
        let bits = |w: Vec<u16>| w.into_iter().map(|x| x != 0).collect::<Vec<bool>>();
        Ok(match req {
            Request::ReadCoils(a, n) => {
                Response::ReadCoils(bits(self.read_words(unit, Coil, *a, *n)?))
            }
            Request::ReadDiscreteInputs(a, n) => {
                Response::ReadDiscreteInputs(bits(self.read_words(unit, Discrete, *a, *n)?))
            }
            Request::ReadHoldingRegisters(a, n) => {
                Response::ReadHoldingRegisters(self.read_words(unit, Holding, *a, *n)?)
            }
            Request::ReadInputRegisters(a, n) => {
                Response::ReadInputRegisters(self.read_words(unit, Input, *a, *n)?)
            }
            Request::WriteSingleCoil(a, b) => {
                self.write_bits(unit, *a, &[*b])?;
                Response::WriteSingleCoil(*a, *b)
            }
            Request::WriteMultipleCoils(a, bs) => {
                self.write_bits(unit, *a, bs)?;
                Response::WriteMultipleCoils(*a, bs.len() as u16)
            }
            Request::WriteSingleRegister(a, w) => {
                self.write_words(unit, *a, &[*w])?;
                Response::WriteSingleRegister(*a, *w)
            }
            Request::WriteMultipleRegisters(a, ws) => {
                self.write_words(unit, *a, ws)?;
                Response::WriteMultipleRegisters(*a, ws.len() as u16)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        })
    }

    /// Answer one request addressed to `unit`, faults applied.
    pub fn handle(&mut self, unit: u8, req: &Request<'_>) -> Answer {
        let delay = self.faults.delay;
        let outcome = if self.faults.drop_connection {
            Outcome::Drop
        } else if self.faults.missing {
            Outcome::NoAnswer
        } else if let Some(code) = self.faults.exception {
            Outcome::Exception(code)
        } else {
            match self.serve(unit, req) {
                Ok(r) => Outcome::Reply(r),
                Err(code) => Outcome::Exception(code),
            }
        };
        Answer { outcome, delay }
    }
}

/// A shared [`SimDevice`]: cheap to clone, every clone is the same device.
#[derive(Debug, Clone)]
pub struct DeviceHandle(Arc<Mutex<SimDevice>>);

impl DeviceHandle {
    /// Share `device`.
    pub fn new(device: SimDevice) -> DeviceHandle {
        DeviceHandle(Arc::new(Mutex::new(device)))
    }

    /// A device of `kind` with its standard register map, seeded by `seed`,
    /// whose simulated day starts at `start_of_day_s` seconds after midnight.
    pub fn simulated(kind: DeviceKind, seed: u64, start_of_day_s: f64) -> DeviceHandle {
        let map = crate::maps::register_map(kind);
        let model = kind.model(seed, start_of_day_s);
        match SimDevice::new(model, map, seed) {
            Ok(d) => DeviceHandle::new(d),
            // The standard maps are checked against the models by tests.
            Err(e) => unreachable!("standard map of {kind} is invalid: {e}"),
        }
    }

    /// Lock the device (a poisoned lock is recovered: the device state is
    /// plain data and stays usable).
    pub fn lock(&self) -> MutexGuard<'_, SimDevice> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advance the physics by `dt` of simulated time.
    pub fn advance(&self, dt: Duration) {
        self.lock().advance(dt);
    }

    /// Activate a fault.
    pub fn inject(&self, fault: Fault) {
        self.lock().inject(fault);
    }

    /// Remove every fault.
    pub fn clear_faults(&self) {
        self.lock().clear_faults();
    }

    /// The true value of a signal (no faults).
    pub fn signal(&self, name: &str) -> Option<f64> {
        self.lock().model().signal(name)
    }

    /// Simulated seconds elapsed.
    pub fn elapsed_s(&self) -> f64 {
        self.lock().model().elapsed_s()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn room() -> SimDevice {
        let kind = DeviceKind::ColdRoom;
        SimDevice::new(kind.model(1, 0.0), crate::maps::register_map(kind), 1).unwrap()
    }

    fn reply(a: Answer) -> Response {
        match a.outcome {
            Outcome::Reply(r) => r,
            o => panic!("expected a reply, got {o:?}"),
        }
    }

    #[test]
    fn reads_decode_to_the_model_value() {
        let mut d = room();
        let spec = d.map().get("temperature").unwrap().clone();
        let Response::ReadInputRegisters(w) =
            reply(d.handle(1, &Request::ReadInputRegisters(0, 1)))
        else {
            panic!()
        };
        let v = spec.decode(&w).unwrap();
        let truth = d.model().signal("temperature").unwrap();
        assert!((v - truth).abs() <= 0.05 + 1e-9, "{v} vs {truth}");
    }

    #[test]
    fn illegal_addresses_functions_and_quantities() {
        let mut d = room();
        let exc = |a: Answer| match a.outcome {
            Outcome::Exception(c) => c,
            o => panic!("expected an exception, got {o:?}"),
        };
        assert_eq!(
            exc(d.handle(1, &Request::ReadInputRegisters(100, 1))),
            ExceptionCode::IllegalDataAddress
        );
        // 0..=4 are mapped (u32 at 3..=4), 5 is not.
        assert!(matches!(
            d.handle(1, &Request::ReadInputRegisters(0, 5)).outcome,
            Outcome::Reply(_)
        ));
        assert_eq!(
            exc(d.handle(1, &Request::ReadInputRegisters(0, 6))),
            ExceptionCode::IllegalDataAddress
        );
        assert_eq!(
            exc(d.handle(1, &Request::ReadInputRegisters(0, 0))),
            ExceptionCode::IllegalDataValue
        );
        assert_eq!(
            exc(d.handle(2, &Request::ReadInputRegisters(0, 1))),
            ExceptionCode::IllegalDataAddress,
            "other unit ids have no registers"
        );
        assert_eq!(
            exc(d.handle(1, &Request::WriteSingleCoil(5, true))),
            ExceptionCode::IllegalDataAddress
        );
        assert_eq!(
            exc(d.handle(1, &Request::ReportServerId)),
            ExceptionCode::IllegalFunction
        );
        // -50.0 C is outside the evaporator's range -40..=0.
        assert_eq!(
            exc(d.handle(1, &Request::WriteSingleRegister(0, (-500i16) as u16))),
            ExceptionCode::IllegalDataValue
        );
    }

    #[test]
    fn writes_drive_the_model() {
        let mut d = room();
        reply(d.handle(1, &Request::WriteSingleCoil(0, true)));
        assert_eq!(d.model().signal("compressor"), Some(1.0));
        reply(d.handle(
            1,
            &Request::WriteMultipleRegisters(0, Cow::Owned(vec![(-250i16) as u16])),
        ));
        assert_eq!(d.model().signal("evaporator_setpoint"), Some(-25.0));
        reply(d.handle(1, &Request::WriteMultipleCoils(0, Cow::Owned(vec![false]))));
        assert_eq!(d.model().signal("compressor"), Some(0.0));
    }

    #[test]
    fn faults_change_answers_and_clear() {
        let mut d = room();
        let r = Request::ReadInputRegisters(0, 1);
        d.inject(Fault::Exception(ExceptionCode::ServerDeviceFailure));
        assert_eq!(
            d.handle(1, &r).outcome,
            Outcome::Exception(ExceptionCode::ServerDeviceFailure)
        );
        d.inject(Fault::Missing);
        assert_eq!(d.handle(1, &r).outcome, Outcome::NoAnswer);
        d.inject(Fault::DropConnection);
        d.inject(Fault::Slow {
            delay: Duration::from_millis(5),
        });
        let a = d.handle(1, &r);
        assert_eq!(a.outcome, Outcome::Drop);
        assert_eq!(a.delay, Some(Duration::from_millis(5)));
        d.clear_faults();
        assert!(matches!(d.handle(1, &r).outcome, Outcome::Reply(_)));
    }

    #[test]
    fn stuck_freezes_while_the_model_moves() {
        let mut d = room();
        d.inject(Fault::Stuck {
            signal: Some("temperature".into()),
        });
        let frozen = d.reported("temperature").unwrap();
        d.advance(Duration::from_secs(6 * 3600));
        assert_eq!(d.reported("temperature"), Some(frozen));
        assert!(d.model().signal("temperature").unwrap() > frozen + 3.0);
    }

    #[test]
    fn unknown_register_names_are_refused() {
        let mut map = crate::maps::register_map(DeviceKind::Meter);
        map.registers[0].name = "flux".into();
        let e = SimDevice::new(DeviceKind::Meter.model(1, 0.0), map, 1).unwrap_err();
        assert!(e.to_string().contains("\"flux\""), "{e}");
    }

    #[test]
    fn faults_parse_from_their_compact_form() {
        let ok = |s: &str| s.parse::<Fault>().unwrap();
        assert_eq!(ok("stuck"), Fault::Stuck { signal: None });
        assert_eq!(
            ok("stuck:temperature"),
            Fault::Stuck {
                signal: Some("temperature".into())
            }
        );
        assert_eq!(
            ok("spikes:*:0.5:20"),
            Fault::Spikes {
                signal: None,
                probability: 0.5,
                magnitude: 20.0
            }
        );
        assert_eq!(
            ok("slow:250"),
            Fault::Slow {
                delay: Duration::from_millis(250)
            }
        );
        assert_eq!(ok("missing"), Fault::Missing);
        assert_eq!(ok("drop"), Fault::DropConnection);
        assert_eq!(
            ok("exception:server-device-failure"),
            Fault::Exception(ExceptionCode::ServerDeviceFailure)
        );
        assert_eq!(
            ok("exception:6"),
            Fault::Exception(ExceptionCode::ServerDeviceBusy)
        );
        for bad in [
            "",
            "melt",
            "slow:soon",
            "spikes:x:2:1",
            "spikes:x:0.5:nan",
            "exception:nope",
            "stuck:",
        ] {
            let e = bad.parse::<Fault>().unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("expected stuck"), "{e}");
        }
    }
}
