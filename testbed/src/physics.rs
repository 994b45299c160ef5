//! Physics of the simulated devices: pure state machines stepped by `dt`.
//!
//! Nothing here reads a clock or does IO. A model knows the simulated time
//! of day because it counts the seconds it has been stepped through, starting
//! from `start_of_day_s`; its randomness comes from a [`SimRng`] it owns, so
//! the same seed and the same sequence of steps and writes give the same
//! trajectory. Values are exposed as named *signals* (`temperature`,
//! `compressor`, ...); register maps bind signals to Modbus addresses.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use crate::rng::SimRng;

/// Longest single integration step; larger `dt` is split into sub-steps.
pub const MAX_STEP_S: f64 = 1.0;
const DAY_S: f64 = 86_400.0;

/// The kinds of simulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A refrigerated room with a compressor (`cold-room`).
    ColdRoom,
    /// A pump station (`pump`).
    Pump,
    /// A three-phase energy meter (`meter`).
    Meter,
}

impl DeviceKind {
    /// Every kind, in the order fleets cycle through them.
    pub const ALL: [DeviceKind; 3] = [DeviceKind::ColdRoom, DeviceKind::Pump, DeviceKind::Meter];

    /// The `device_type` string used in edge configs.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::ColdRoom => "cold-room",
            DeviceKind::Pump => "pump",
            DeviceKind::Meter => "meter",
        }
    }

    /// A fresh model of this kind.
    pub fn model(self, seed: u64, start_of_day_s: f64) -> Box<dyn Model> {
        match self {
            DeviceKind::ColdRoom => Box::new(ColdRoom::new(seed, start_of_day_s)),
            DeviceKind::Pump => Box::new(PumpStation::new(seed, start_of_day_s)),
            DeviceKind::Meter => Box::new(EnergyMeter::new(seed, start_of_day_s)),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `device_type` that names no simulated device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device type {0:?}: expected one of cold-room, pump, meter")]
pub struct UnknownKind(pub String);

impl FromStr for DeviceKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// Why a model refused a write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The model has no signal of that name.
    #[error("no signal {0:?}")]
    UnknownSignal(String),
    /// The signal exists but is measured, not commanded.
    #[error("signal {0:?} is read-only")]
    ReadOnly(String),
    /// The value is outside what the device accepts.
    #[error("{signal}: {value} is outside {min}..={max}")]
    OutOfRange {
        /// Signal written.
        signal: String,
        /// Value refused.
        value: f64,
        /// Lowest accepted value.
        min: f64,
        /// Highest accepted value.
        max: f64,
    },
}

/// A simulated device's physics.
pub trait Model: Send + fmt::Debug {
    /// Which kind of device this is.
    fn kind(&self) -> DeviceKind;
    /// Advance by `dt_s` simulated seconds (split into steps of at most
    /// [`MAX_STEP_S`]).
    fn step(&mut self, dt_s: f64);
    /// Current value of a signal (bits are 0.0 or 1.0).
    fn signal(&self, name: &str) -> Option<f64>;
    /// Command a writable signal (a coil or a holding register).
    fn set(&mut self, name: &str, value: f64) -> Result<(), ModelError>;
    /// Names of every signal, readable ones and writable ones.
    fn signals(&self) -> &'static [&'static str];
    /// Simulated seconds stepped since creation.
    fn elapsed_s(&self) -> f64;
}

fn lag(value: f64, target: f64, dt: f64, tau: f64) -> f64 {
    value + (target - value) * (1.0 - (-dt / tau).exp())
}

fn check_range(signal: &str, value: f64, min: f64, max: f64) -> Result<f64, ModelError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ModelError::OutOfRange {
            signal: signal.to_string(),
            value,
            min,
            max,
        })
    }
}

fn bit(b: bool) -> f64 {
    f64::from(u8::from(b))
}

/// Run `f(dt)` over `dt_s` in sub-steps of at most [`MAX_STEP_S`].
fn substeps(dt_s: f64, mut f: impl FnMut(f64)) {
    if !(dt_s.is_finite() && dt_s > 0.0) {
        return;
    }
    let n = (dt_s / MAX_STEP_S).ceil().max(1.0);
    let h = dt_s / n;
    for _ in 0..(n as u64) {
        f(h);
    }
}

// ------------------------------------------------------------------ cold room

/// A cold room: air temperature drifts toward the ambient through the walls,
/// is pulled toward the evaporator temperature while the compressor runs, and
/// door openings (random, more frequent in working hours) let warm air in.
///
/// Signals: `temperature` (C, with sensor noise), `ambient` (C), `compressor`
/// (coil, writable), `door_open` (switch), `evaporator_setpoint` (C,
/// writable, -40..=0), `compressor_starts` (count), `compressor_runtime_s`.
#[derive(Debug, Clone)]
pub struct ColdRoom {
    rng: SimRng,
    t_s: f64,
    start_of_day_s: f64,
    /// True air temperature.
    pub air_c: f64,
    noise_c: f64,
    ambient_walk_c: f64,
    compressor: bool,
    door_left_s: f64,
    evaporator_c: f64,
    starts: u64,
    runtime_s: f64,
}

impl ColdRoom {
    /// Wall losses: 1 / time constant toward ambient (about 3 h).
    const K_WALL: f64 = 1.0 / 10_800.0;
    /// Evaporator coupling while the compressor runs (about 30 min).
    const K_EVAP: f64 = 1.0 / 1_800.0;
    /// Extra coupling to ambient while the door is open (about 25 min).
    const K_DOOR: f64 = 1.0 / 1_500.0;

    /// A room at about +4 C, compressor off, door closed.
    pub fn new(seed: u64, start_of_day_s: f64) -> ColdRoom {
        let mut rng = SimRng::seed_from_u64(seed);
        let air_c = rng.range(3.0, 5.0);
        ColdRoom {
            rng,
            t_s: 0.0,
            start_of_day_s,
            air_c,
            noise_c: 0.0,
            ambient_walk_c: 0.0,
            compressor: false,
            door_left_s: 0.0,
            evaporator_c: -10.0,
            starts: 0,
            runtime_s: 0.0,
        }
    }

    fn time_of_day_s(&self) -> f64 {
        (self.start_of_day_s + self.t_s).rem_euclid(DAY_S)
    }

    /// Ambient: 20 C, +-3 C over the day (warmest at 15:00), plus a slow
    /// bounded random walk.
    pub fn ambient_c(&self) -> f64 {
        let phase = 2.0 * PI * (self.time_of_day_s() - 9.0 * 3600.0) / DAY_S;
        20.0 + 3.0 * phase.sin() + self.ambient_walk_c
    }

    fn step_once(&mut self, dt: f64) {
        let tod_h = self.time_of_day_s() / 3600.0;
        // Doors open ~6 times an hour in working hours, rarely at night.
        let per_hour = if (6.0..20.0).contains(&tod_h) {
            6.0
        } else {
            0.5
        };
        if self.door_left_s <= 0.0 && self.rng.chance(per_hour * dt / 3600.0) {
            self.door_left_s = self.rng.range(15.0, 90.0);
        }
        let ambient = self.ambient_c();
        let mut dtemp = Self::K_WALL * (ambient - self.air_c);
        if self.compressor {
            dtemp += Self::K_EVAP * (self.evaporator_c - self.air_c);
            self.runtime_s += dt;
        }
        if self.door_left_s > 0.0 {
            dtemp += Self::K_DOOR * (ambient - self.air_c);
            self.door_left_s -= dt;
        }
        self.air_c += dtemp * dt;
        self.ambient_walk_c =
            (self.ambient_walk_c + self.rng.normal() * 0.01 * dt.sqrt()).clamp(-1.0, 1.0);
        self.noise_c = self.rng.normal() * 0.03;
        self.t_s += dt;
    }
}

impl Model for ColdRoom {
    fn kind(&self) -> DeviceKind {
        DeviceKind::ColdRoom
    }
    fn step(&mut self, dt_s: f64) {
        substeps(dt_s, |h| self.step_once(h));
    }
    fn signal(&self, name: &str) -> Option<f64> {
        Some(match name {
            "temperature" => self.air_c + self.noise_c,
            "ambient" => self.ambient_c(),
            "compressor" => bit(self.compressor),
            "door_open" => bit(self.door_left_s > 0.0),
            "evaporator_setpoint" => self.evaporator_c,
            "compressor_starts" => self.starts as f64,
            "compressor_runtime_s" => self.runtime_s.floor(),
            _ => return None,
        })
    }
    fn set(&mut self, name: &str, value: f64) -> Result<(), ModelError> {
        match name {
            "compressor" => {
                let on = value != 0.0;
                if on && !self.compressor {
                    self.starts += 1;
                }
                self.compressor = on;
                Ok(())
            }
            "evaporator_setpoint" => {
                self.evaporator_c = check_range(name, value, -40.0, 0.0)?;
                Ok(())
            }
            _ if self.signal(name).is_some() => Err(ModelError::ReadOnly(name.into())),
            _ => Err(ModelError::UnknownSignal(name.into())),
        }
    }
    fn signals(&self) -> &'static [&'static str] {
        &[
            "temperature",
            "ambient",
            "compressor",
            "door_open",
            "evaporator_setpoint",
            "compressor_starts",
            "compressor_runtime_s",
        ]
    }
    fn elapsed_s(&self) -> f64 {
        self.t_s
    }
}

// --------------------------------------------------------------- pump station

/// A pump station: pressure and flow follow the pump coil and speed with a
/// first-order lag; demand (the share of consumers' valves open) follows a
/// daily pattern plus a random walk.
///
/// Signals: `pump_run` (coil, writable), `speed_pct` (writable, 0..=100),
/// `running` (feedback, true 2 s after start), `pressure` (bar), `flow`
/// (l/min), `demand_pct`, `run_seconds`.
#[derive(Debug, Clone)]
pub struct PumpStation {
    rng: SimRng,
    t_s: f64,
    start_of_day_s: f64,
    run: bool,
    run_for_s: f64,
    speed: f64,
    pressure_bar: f64,
    flow_lpm: f64,
    demand_walk: f64,
    run_seconds: f64,
}

impl PumpStation {
    const SHUTOFF_BAR: f64 = 6.0;
    const STATIC_BAR: f64 = 0.5;
    const MAX_FLOW_LPM: f64 = 200.0;
    const TAU_PRESSURE_S: f64 = 4.0;
    const TAU_FLOW_S: f64 = 2.0;

    /// A stopped pump at static pressure, speed 100 %.
    pub fn new(seed: u64, start_of_day_s: f64) -> PumpStation {
        let mut rng = SimRng::seed_from_u64(seed);
        let demand_walk = rng.range(-0.1, 0.1);
        PumpStation {
            rng,
            t_s: 0.0,
            start_of_day_s,
            run: false,
            run_for_s: 0.0,
            speed: 1.0,
            pressure_bar: Self::STATIC_BAR,
            flow_lpm: 0.0,
            demand_walk,
            run_seconds: 0.0,
        }
    }

    /// Demand in `[0.1, 1.0]`: low at night, peaks in the morning and evening.
    pub fn demand(&self) -> f64 {
        let h = (self.start_of_day_s + self.t_s).rem_euclid(DAY_S) / 3600.0;
        let bump = |centre: f64, width: f64| (-((h - centre) / width).powi(2)).exp();
        (0.25 + 0.5 * bump(7.5, 1.5) + 0.4 * bump(19.0, 2.0) + self.demand_walk).clamp(0.1, 1.0)
    }

    fn step_once(&mut self, dt: f64) {
        self.demand_walk =
            (self.demand_walk + self.rng.normal() * 0.002 * dt.sqrt()).clamp(-0.15, 0.15);
        let d = self.demand();
        let running = self.run && self.run_for_s >= 2.0;
        let (p_target, q_target) = if running {
            let s = self.speed;
            (
                Self::STATIC_BAR + Self::SHUTOFF_BAR * s * s * (1.0 - 0.6 * d),
                Self::MAX_FLOW_LPM * s * d,
            )
        } else {
            (Self::STATIC_BAR, 0.0)
        };
        self.pressure_bar = lag(self.pressure_bar, p_target, dt, Self::TAU_PRESSURE_S);
        self.flow_lpm = lag(self.flow_lpm, q_target, dt, Self::TAU_FLOW_S);
        if self.run {
            self.run_for_s += dt;
            self.run_seconds += dt;
        }
        self.t_s += dt;
    }
}

impl Model for PumpStation {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Pump
    }
    fn step(&mut self, dt_s: f64) {
        substeps(dt_s, |h| self.step_once(h));
    }
    fn signal(&self, name: &str) -> Option<f64> {
        Some(match name {
            "pump_run" => bit(self.run),
            "speed_pct" => (self.speed * 100.0).round(),
            "running" => bit(self.run && self.run_for_s >= 2.0),
            "pressure" => self.pressure_bar,
            "flow" => self.flow_lpm,
            "demand_pct" => self.demand() * 100.0,
            "run_seconds" => self.run_seconds.floor(),
            _ => return None,
        })
    }
    fn set(&mut self, name: &str, value: f64) -> Result<(), ModelError> {
        match name {
            "pump_run" => {
                let on = value != 0.0;
                if !on {
                    self.run_for_s = 0.0;
                }
                self.run = on;
                Ok(())
            }
            "speed_pct" => {
                self.speed = check_range(name, value, 0.0, 100.0)? / 100.0;
                Ok(())
            }
            _ if self.signal(name).is_some() => Err(ModelError::ReadOnly(name.into())),
            _ => Err(ModelError::UnknownSignal(name.into())),
        }
    }
    fn signals(&self) -> &'static [&'static str] {
        &[
            "pump_run",
            "speed_pct",
            "running",
            "pressure",
            "flow",
            "demand_pct",
            "run_seconds",
        ]
    }
    fn elapsed_s(&self) -> f64 {
        self.t_s
    }
}

// --------------------------------------------------------------- energy meter

/// A three-phase energy meter on a small site: power follows a load profile
/// (base load, working-hours hump, random motor starts), the energy counter
/// only increases.
///
/// Signals: `power` (kW), `energy` (kWh), `voltage` (V, line to neutral),
/// `current` (A per phase), `reactive_power` (var, negative when
/// capacitive at night).
#[derive(Debug, Clone)]
pub struct EnergyMeter {
    rng: SimRng,
    t_s: f64,
    start_of_day_s: f64,
    power_kw: f64,
    energy_kwh: f64,
    voltage_v: f64,
    motor_left_s: f64,
}

impl EnergyMeter {
    /// A meter with a counter somewhere in its first years of service.
    pub fn new(seed: u64, start_of_day_s: f64) -> EnergyMeter {
        let mut rng = SimRng::seed_from_u64(seed);
        let energy_kwh = rng.range(10_000.0, 50_000.0).round();
        let mut m = EnergyMeter {
            rng,
            t_s: 0.0,
            start_of_day_s,
            power_kw: 0.0,
            energy_kwh,
            voltage_v: 230.0,
            motor_left_s: 0.0,
        };
        m.power_kw = m.profile_kw();
        m
    }

    fn hour(&self) -> f64 {
        (self.start_of_day_s + self.t_s).rem_euclid(DAY_S) / 3600.0
    }

    /// Expected load without noise: 12 kW base, up to +18 kW in working hours.
    pub fn profile_kw(&self) -> f64 {
        let h = self.hour();
        let hump = (-((h - 13.0) / 4.0).powi(2)).exp();
        12.0 + 18.0 * hump
    }

    fn step_once(&mut self, dt: f64) {
        if self.motor_left_s <= 0.0 && self.rng.chance(4.0 * dt / 3600.0) {
            self.motor_left_s = self.rng.range(10.0, 60.0);
        }
        let motor = if self.motor_left_s > 0.0 { 20.0 } else { 0.0 };
        self.motor_left_s -= dt;
        let target = self.profile_kw() + motor;
        self.power_kw = (lag(self.power_kw, target, dt, 3.0) + self.rng.normal() * 0.2).max(0.0);
        self.energy_kwh += self.power_kw * dt / 3600.0;
        self.voltage_v =
            lag(self.voltage_v, 230.0 - 0.05 * self.power_kw, dt, 10.0) + self.rng.normal() * 0.2;
        self.t_s += dt;
    }
}

impl Model for EnergyMeter {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Meter
    }
    fn step(&mut self, dt_s: f64) {
        substeps(dt_s, |h| self.step_once(h));
    }
    fn signal(&self, name: &str) -> Option<f64> {
        Some(match name {
            "power" => self.power_kw,
            "energy" => self.energy_kwh,
            "voltage" => self.voltage_v,
            // P = 3 V I cos(phi), cos(phi) 0.9.
            "current" => self.power_kw * 1000.0 / (3.0 * self.voltage_v * 0.9),
            // Inductive by day, a little capacitive at night.
            "reactive_power" => (self.power_kw - 14.0) * 480.0,
            _ => return None,
        })
    }
    fn set(&mut self, name: &str, _value: f64) -> Result<(), ModelError> {
        if self.signal(name).is_some() {
            Err(ModelError::ReadOnly(name.into()))
        } else {
            Err(ModelError::UnknownSignal(name.into()))
        }
    }
    fn signals(&self) -> &'static [&'static str] {
        &["power", "energy", "voltage", "current", "reactive_power"]
    }
    fn elapsed_s(&self) -> f64 {
        self.t_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trajectory(kind: DeviceKind, seed: u64) -> Vec<Vec<f64>> {
        let mut m = kind.model(seed, 8.0 * 3600.0);
        let names = m.signals();
        let mut out = Vec::new();
        for i in 0..2_000 {
            if kind == DeviceKind::ColdRoom && i % 300 == 0 {
                let on = m.signal("compressor") == Some(0.0);
                m.set("compressor", bit(on)).unwrap();
            }
            if kind == DeviceKind::Pump && i == 10 {
                m.set("pump_run", 1.0).unwrap();
            }
            m.step(7.0);
            out.push(names.iter().map(|n| m.signal(n).unwrap()).collect());
        }
        out
    }

    #[test]
    fn same_seed_same_trajectory_other_seed_differs() {
        for kind in DeviceKind::ALL {
            assert_eq!(trajectory(kind, 11), trajectory(kind, 11), "{kind}");
            assert_ne!(trajectory(kind, 11), trajectory(kind, 12), "{kind}");
        }
    }

    /// A bang-bang thermostat (on above 5 C, off below 3 C, checked every
    /// 30 s) holds the room in a band for a whole simulated day.
    #[test]
    fn cold_room_with_bang_bang_stays_in_band_for_a_day() {
        for seed in 0..20 {
            let mut room = ColdRoom::new(seed, 0.0);
            let (mut lo, mut hi) = (f64::MAX, f64::MIN);
            let mut door_seen = false;
            for _ in 0..(86_400 / 30) {
                let t = room.signal("temperature").unwrap();
                if t > 5.0 {
                    room.set("compressor", 1.0).unwrap();
                } else if t < 3.0 {
                    room.set("compressor", 0.0).unwrap();
                }
                room.step(30.0);
                door_seen |= room.signal("door_open") == Some(1.0);
                lo = lo.min(room.air_c);
                hi = hi.max(room.air_c);
            }
            assert!(lo > 2.0 && hi < 7.0, "seed {seed}: band {lo:.2}..{hi:.2}");
            assert!(door_seen, "seed {seed}: no door event in a day");
            assert!(room.signal("compressor_starts").unwrap() > 10.0);
            assert!(room.signal("compressor_runtime_s").unwrap() > 3600.0);
        }
    }

    #[test]
    fn cold_room_warms_toward_ambient_without_compressor() {
        let mut room = ColdRoom::new(3, 0.0);
        let start = room.air_c;
        room.step(86_400.0);
        assert!(room.air_c > start + 10.0, "{start} -> {}", room.air_c);
        let amb = room.signal("ambient").unwrap();
        assert!((16.0..24.0).contains(&amb), "ambient {amb}");
        assert!(room.air_c < amb + 4.0);
    }

    #[test]
    fn pump_pressure_and_flow_follow_the_coil_with_lag() {
        let mut p = PumpStation::new(1, 12.0 * 3600.0);
        p.step(60.0);
        assert!(p.signal("flow").unwrap() < 0.01);
        p.set("pump_run", 1.0).unwrap();
        p.step(1.0);
        assert_eq!(p.signal("running"), Some(0.0), "not running before 2 s");
        p.step(3.0);
        let early = p.signal("pressure").unwrap();
        p.step(60.0);
        let settled = p.signal("pressure").unwrap();
        assert!(early < settled && settled > 2.0, "{early} {settled}");
        assert!(p.signal("flow").unwrap() > 10.0);
        p.set("speed_pct", 50.0).unwrap();
        p.step(60.0);
        assert!(p.signal("pressure").unwrap() < settled);
        p.set("pump_run", 0.0).unwrap();
        p.step(60.0);
        assert!(p.signal("pressure").unwrap() < 0.6);
        assert!(p.signal("flow").unwrap() < 1.0);
        assert!(matches!(
            p.set("speed_pct", 150.0),
            Err(ModelError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.set("pressure", 1.0),
            Err(ModelError::ReadOnly(_))
        ));
        assert!(matches!(p.set("x", 1.0), Err(ModelError::UnknownSignal(_))));
    }

    #[test]
    fn meter_energy_only_increases_and_power_is_realistic() {
        let mut m = EnergyMeter::new(5, 0.0);
        let mut last = m.signal("energy").unwrap();
        let (mut pmin, mut pmax) = (f64::MAX, f64::MIN);
        for _ in 0..(86_400 / 60) {
            m.step(60.0);
            let e = m.signal("energy").unwrap();
            assert!(e >= last);
            last = e;
            let p = m.signal("power").unwrap();
            pmin = pmin.min(p);
            pmax = pmax.max(p);
        }
        assert!(pmin > 5.0 && pmax < 60.0 && pmax > 25.0, "{pmin} {pmax}");
        let day_kwh = last - EnergyMeter::new(5, 0.0).signal("energy").unwrap();
        assert!((250.0..700.0).contains(&day_kwh), "{day_kwh} kWh/day");
    }

    #[test]
    fn kinds_parse_and_name_the_bad_one() {
        assert_eq!("pump".parse::<DeviceKind>(), Ok(DeviceKind::Pump));
        let e = "boiler".parse::<DeviceKind>().unwrap_err();
        assert!(e.to_string().contains("\"boiler\""));
    }
}
