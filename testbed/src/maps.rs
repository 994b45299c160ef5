//! Register maps of the simulated devices, and the edge config that reads them.
//!
//! The maps are `schemas::registers::RegisterMap`s: the simulator encodes
//! with [`RegisterSpec::encode`] and the edge decodes with
//! [`RegisterSpec::decode`] from the very same specs, so the two agree by
//! construction. Between them the three maps use every table (holding,
//! input, coil, discrete) and every value type (bool, u16, i16, u32, i32,
//! f32), with a non-default word order on the meter's 32-bit values.

use std::net::SocketAddr;

use schemas::alarm::{AlarmRule, Condition, Severity};
use schemas::config::{DeviceConfig, EdgeConfig, FailSafe, LoopConfig};
use schemas::ids::DeviceId;
use schemas::metrics::Unit;
use schemas::registers::{
    ByteOrder, RegisterFunction, RegisterMap, RegisterSpec, RegisterType, WordOrder,
};

use crate::physics::DeviceKind;

/// Unit id every simulated device answers on.
pub const UNIT_ID: u8 = 1;

#[allow(clippy::too_many_arguments)]
fn spec(
    name: &str,
    function: RegisterFunction,
    address: u16,
    data_type: RegisterType,
    scale: f64,
    unit: Unit,
    word_order: WordOrder,
    poll_ms: u64,
) -> RegisterSpec {
    RegisterSpec {
        name: name.into(),
        unit_id: UNIT_ID,
        function,
        address,
        data_type,
        word_order,
        byte_order: ByteOrder::BigEndian,
        scale,
        offset: 0.0,
        unit,
        poll_ms,
    }
}

/// The register map of a simulated device of `kind`. Names are the model's
/// signal names.
pub fn register_map(kind: DeviceKind) -> RegisterMap {
    use RegisterFunction::{Coil, Discrete, Holding, Input};
    use RegisterType::{Bool, F32, I16, I32, U16, U32};
    let be = WordOrder::BigEndian;
    let le = WordOrder::LittleEndian;
    let registers = match kind {
        DeviceKind::ColdRoom => vec![
            spec("temperature", Input, 0, I16, 0.1, Unit::Celsius, be, 1000),
            spec("ambient", Input, 1, I16, 0.1, Unit::Celsius, be, 10_000),
            spec(
                "compressor_starts",
                Input,
                2,
                U16,
                1.0,
                Unit::Count,
                be,
                10_000,
            ),
            spec(
                "compressor_runtime_s",
                Input,
                3,
                U32,
                1.0,
                Unit::Count,
                be,
                10_000,
            ),
            spec(
                "evaporator_setpoint",
                Holding,
                0,
                I16,
                0.1,
                Unit::Celsius,
                be,
                10_000,
            ),
            spec("compressor", Coil, 0, Bool, 1.0, Unit::Boolean, be, 1000),
            spec("door_open", Discrete, 0, Bool, 1.0, Unit::Boolean, be, 1000),
        ],
        DeviceKind::Pump => vec![
            spec("pressure", Input, 0, U16, 0.01, Unit::Bar, be, 500),
            spec("flow", Input, 1, F32, 1.0, Unit::LitersPerMinute, be, 500),
            spec("demand_pct", Input, 3, U16, 0.1, Unit::Percent, be, 5000),
            spec("run_seconds", Input, 4, U32, 1.0, Unit::Count, be, 10_000),
            spec("speed_pct", Holding, 0, U16, 1.0, Unit::Percent, be, 5000),
            spec("pump_run", Coil, 0, Bool, 1.0, Unit::Boolean, be, 500),
            spec("running", Discrete, 0, Bool, 1.0, Unit::Boolean, be, 500),
        ],
        DeviceKind::Meter => vec![
            spec("power", Input, 0, F32, 1.0, Unit::Kilowatt, le, 1000),
            spec(
                "energy",
                Input,
                2,
                U32,
                0.01,
                Unit::KilowattHour,
                le,
                10_000,
            ),
            spec("voltage", Input, 4, U16, 0.1, Unit::Volt, be, 5000),
            spec("current", Input, 5, U16, 0.1, Unit::Ampere, be, 1000),
            spec("reactive_power", Input, 6, I32, 1.0, Unit::None, le, 5000),
        ],
    };
    RegisterMap { registers }
}

/// The `[[devices]]` entry an edge needs to poll a simulated device of
/// `kind` listening on `addr`.
pub fn device_config(kind: DeviceKind, id: DeviceId, addr: SocketAddr) -> DeviceConfig {
    DeviceConfig {
        id,
        device_type: kind.as_str().to_string(),
        addr,
        timeout_ms: 1000,
        tags: vec!["simulated".to_string()],
        registers: register_map(kind).registers,
    }
}

/// Control loops that suit a simulated device: a thermostat on a cold room's
/// compressor (+4 C, fail-safe on: keep cooling), a high-pressure interlock
/// on a pump (fail-safe off). Meters have none.
///
/// Loop periods and minimum on/off times are real time on the edge while
/// the devices may run faster: 30 s minimum on is 5 simulated minutes at a
/// time scale of 10, but 30 at 60 (the room then undercools).
pub fn suggested_loops(kind: DeviceKind, id: &DeviceId) -> Vec<LoopConfig> {
    match kind {
        DeviceKind::ColdRoom => vec![LoopConfig::Thermostat {
            name: format!("{id}-thermostat"),
            device: id.clone(),
            sensor: "temperature".into(),
            output: "compressor".into(),
            period_ms: 1000,
            fail_safe: FailSafe::On,
            default_setpoint: 4.0,
            default_hysteresis: 2.0,
            min_on_s: 30,
            min_off_s: 60,
        }],
        DeviceKind::Pump => vec![LoopConfig::Interlock {
            name: format!("{id}-overpressure"),
            device: id.clone(),
            sensor: "pressure".into(),
            output: "pump_run".into(),
            period_ms: 500,
            fail_safe: FailSafe::Off,
            default_limit: 6.2,
        }],
        DeviceKind::Meter => Vec::new(),
    }
}

/// Alarm rules that suit a simulated device.
pub fn suggested_alarms(kind: DeviceKind, id: &DeviceId) -> Vec<AlarmRule> {
    let rule = |name: &str, metric: &str, condition, threshold, hysteresis, delay_ms, severity| {
        AlarmRule {
            name: format!("{id}-{name}"),
            device: id.clone(),
            metric: metric.into(),
            condition,
            threshold,
            hysteresis,
            delay_ms,
            severity,
        }
    };
    match kind {
        DeviceKind::ColdRoom => vec![
            rule(
                "too-warm",
                "temperature",
                Condition::Above,
                8.0,
                1.0,
                600_000,
                Severity::Critical,
            ),
            rule(
                "too-cold",
                "temperature",
                Condition::Below,
                0.0,
                1.0,
                600_000,
                Severity::Warning,
            ),
        ],
        DeviceKind::Pump => vec![rule(
            "high-pressure",
            "pressure",
            Condition::Above,
            6.0,
            0.3,
            5_000,
            Severity::Warning,
        )],
        DeviceKind::Meter => vec![rule(
            "high-load",
            "power",
            Condition::Above,
            45.0,
            5.0,
            60_000,
            Severity::Warning,
        )],
    }
}

/// One simulated device of a fleet: its id, kind and Modbus address.
#[derive(Debug, Clone, PartialEq)]
pub struct SimDeviceSpec {
    /// Device id (`cold-room-1`, ...).
    pub id: DeviceId,
    /// What it simulates.
    pub kind: DeviceKind,
    /// Where its Modbus server listens.
    pub addr: SocketAddr,
}

/// `n` devices cycling cold room, pump, meter, on consecutive ports from
/// `base_port` on 127.0.0.1 (port 0 everywhere if `base_port` is 0).
pub fn fleet(n: usize, base_port: u16) -> Result<Vec<SimDeviceSpec>, schemas::ids::IdError> {
    let mut counts = [0usize; 3];
    (0..n)
        .map(|i| {
            let k = i % DeviceKind::ALL.len();
            counts[k] += 1;
            let kind = DeviceKind::ALL[k];
            let port = if base_port == 0 {
                0
            } else {
                base_port.saturating_add(i as u16)
            };
            Ok(SimDeviceSpec {
                id: DeviceId::new(format!("{}-{}", kind.as_str(), counts[k]))?,
                kind,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            })
        })
        .collect()
}

/// A complete edge config (devices, loops, alarms; defaults elsewhere) for
/// the given simulated devices.
pub fn edge_config(devices: &[SimDeviceSpec]) -> EdgeConfig {
    let mut cfg = EdgeConfig::default();
    for d in devices {
        cfg.devices
            .push(device_config(d.kind, d.id.clone(), d.addr));
        cfg.loops.extend(suggested_loops(d.kind, &d.id));
        cfg.alarms.extend(suggested_alarms(d.kind, &d.id));
    }
    cfg
}

/// [`edge_config`] as TOML text with a header comment.
pub fn edge_config_toml(devices: &[SimDeviceSpec]) -> Result<String, toml::ser::Error> {
    let body = toml::to_string(&edge_config(devices))?;
    Ok(format!(
        "# fieldsync edge config for {} simulated device(s).\n\
         # Start the devices:  testbed devices --config <this file>\n\
         # Then point an edge node at the same file.\n\n{body}",
        devices.len()
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::physics::DeviceKind;

    #[test]
    fn maps_are_valid_and_name_model_signals() {
        for kind in DeviceKind::ALL {
            let map = register_map(kind);
            map.validate().unwrap();
            let model = kind.model(1, 0.0);
            for r in &map.registers {
                assert!(model.signal(&r.name).is_some(), "{kind}: {}", r.name);
            }
        }
    }

    #[test]
    fn maps_use_every_table_and_type_and_a_swapped_word_order() {
        let all: Vec<RegisterSpec> = DeviceKind::ALL
            .into_iter()
            .flat_map(|k| register_map(k).registers)
            .collect();
        for f in [
            RegisterFunction::Holding,
            RegisterFunction::Input,
            RegisterFunction::Coil,
            RegisterFunction::Discrete,
        ] {
            assert!(all.iter().any(|r| r.function == f), "{f:?}");
        }
        use RegisterType::*;
        for t in [Bool, U16, I16, U32, I32, F32] {
            assert!(all.iter().any(|r| r.data_type == t), "{t:?}");
        }
        let meter = register_map(DeviceKind::Meter);
        assert!(
            meter
                .registers
                .iter()
                .any(|r| r.data_type.words() == 2 && r.word_order == WordOrder::LittleEndian)
        );
    }

    #[test]
    fn example_config_parses_and_validates_as_an_edge_config() {
        let devs = fleet(5, 15020).unwrap();
        let ids: Vec<&str> = devs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            ["cold-room-1", "pump-1", "meter-1", "cold-room-2", "pump-2"]
        );
        assert_eq!(devs[4].addr.port(), 15024);
        let text = edge_config_toml(&devs).unwrap();
        let cfg = EdgeConfig::parse(Path::new("example.toml"), &text).unwrap();
        assert_eq!(cfg.devices.len(), 5);
        assert_eq!(cfg.loops.len(), 4);
        assert_eq!(cfg, edge_config(&devs));
    }

    /// The suggested thermostat, run as the edge would (on above setpoint +
    /// hysteresis/2, off below setpoint - hysteresis/2, minimum on/off
    /// times) against devices at a time scale of 10, keeps the room clear of
    /// the suggested alarm thresholds for a simulated day.
    #[test]
    fn suggested_thermostat_at_10x_stays_clear_of_suggested_alarms() {
        use crate::physics::{ColdRoom, Model};
        let id = DeviceId::new("cold-room-1").unwrap();
        let Some(LoopConfig::Thermostat {
            period_ms,
            default_setpoint: sp,
            default_hysteresis: h,
            min_on_s,
            min_off_s,
            ..
        }) = suggested_loops(DeviceKind::ColdRoom, &id)
            .into_iter()
            .next()
        else {
            panic!("a cold room gets a thermostat");
        };
        let alarms = suggested_alarms(DeviceKind::ColdRoom, &id);
        let limit = |c: Condition| alarms.iter().find(|a| a.condition == c).unwrap().threshold;
        let (too_warm, too_cold) = (limit(Condition::Above), limit(Condition::Below));
        let scale = 10.0;
        let period = period_ms as f64 / 1000.0 * scale;
        for seed in 0..10 {
            let mut room = ColdRoom::new(seed, 0.0);
            let (mut on, mut since) = (false, f64::MAX);
            let (mut lo, mut hi) = (f64::MAX, f64::MIN);
            for _ in 0..((86_400.0 / period) as usize) {
                let t = room.signal("temperature").unwrap();
                if !on && t > sp + h / 2.0 && since >= min_off_s as f64 * scale {
                    on = true;
                    since = 0.0;
                } else if on && t < sp - h / 2.0 && since >= min_on_s as f64 * scale {
                    on = false;
                    since = 0.0;
                }
                room.set("compressor", f64::from(u8::from(on))).unwrap();
                room.step(period);
                since += period;
                lo = lo.min(room.air_c);
                hi = hi.max(room.air_c);
            }
            assert!(
                lo > too_cold && hi < too_warm,
                "seed {seed}: {lo:.1}..{hi:.1} C crosses the alarms {too_cold}..{too_warm}"
            );
        }
    }
}
