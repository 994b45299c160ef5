//! Metrics, units, samples and telemetry rollups.

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::time::Timestamp;
use crate::version::SchemaVersion;

/// Units a metric can be measured in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    #[default]
    None,
    Celsius,
    Fahrenheit,
    Kelvin,
    Bar,
    Kilopascal,
    Psi,
    LitersPerMinute,
    CubicMetersPerHour,
    Watt,
    Kilowatt,
    KilowattHour,
    Volt,
    Ampere,
    Hertz,
    Percent,
    Rpm,
    Count,
    Boolean,
}

impl Unit {
    /// The canonical unit of this unit's quantity, and the factor and offset
    /// that convert a value to it (`canonical = value * factor + offset`).
    /// Ingestion normalises to canonical units.
    pub fn canonical(self) -> (Unit, f64, f64) {
        match self {
            Unit::Fahrenheit => (Unit::Celsius, 5.0 / 9.0, -32.0 * 5.0 / 9.0),
            Unit::Kelvin => (Unit::Celsius, 1.0, -273.15),
            Unit::Kilopascal => (Unit::Bar, 0.01, 0.0),
            Unit::Psi => (Unit::Bar, 0.068_947_572_9, 0.0),
            Unit::CubicMetersPerHour => (Unit::LitersPerMinute, 1000.0 / 60.0, 0.0),
            Unit::Watt => (Unit::Kilowatt, 0.001, 0.0),
            u => (u, 1.0, 0.0),
        }
    }

    /// Convert `value` in this unit to its canonical unit.
    pub fn to_canonical(self, value: f64) -> (Unit, f64) {
        let (u, f, o) = self.canonical();
        (u, value * f + o)
    }
}

/// One raw sample. Raw samples live in the edge's raw zone and never in a
/// CRDT document, and never leave the site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Sample {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub device: DeviceId,
    pub metric: String,
    pub ts: Timestamp,
    pub value: f64,
    #[serde(default)]
    pub unit: Unit,
}

/// Summary of one metric of one device over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Rollup {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub device: DeviceId,
    pub metric: String,
    #[serde(default)]
    pub unit: Unit,
    pub window_start: Timestamp,
    pub window_ms: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    /// Value of the sample with the smallest timestamp in the window.
    pub first: f64,
    pub first_ts: Timestamp,
    /// Value of the sample with the largest timestamp in the window.
    pub last: f64,
    pub last_ts: Timestamp,
    /// True when the samples were taken while the node's clock was not yet
    /// plausible (see [`crate::time::PLAUSIBLE_EPOCH`]): the window is in
    /// node-local time, not wall time.
    #[serde(default)]
    pub clock_unsynced: bool,
}

impl Rollup {
    /// A rollup of a single sample.
    pub fn of_sample(s: &Sample, window_ms: i64) -> Rollup {
        Rollup {
            schema_version: SchemaVersion::default(),
            device: s.device.clone(),
            metric: s.metric.clone(),
            unit: s.unit,
            window_start: s.ts.window_start(window_ms),
            window_ms,
            count: 1,
            min: s.value,
            max: s.value,
            sum: s.value,
            first: s.value,
            first_ts: s.ts,
            last: s.value,
            last_ts: s.ts,
            clock_unsynced: !s.ts.is_plausible(),
        }
    }

    /// Fold another rollup of the same device, metric and window into this
    /// one. Merging is associative and commutative (ties on timestamps are
    /// broken by value), so rollups delivered late or out of order give the
    /// same answer.
    pub fn merge(&mut self, o: &Rollup) {
        self.count += o.count;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.sum += o.sum;
        if (o.first_ts, o.first) < (self.first_ts, self.first) {
            self.first = o.first;
            self.first_ts = o.first_ts;
        }
        if (o.last_ts, o.last) > (self.last_ts, self.last) {
            self.last = o.last;
            self.last_ts = o.last_ts;
        }
        self.clock_unsynced |= o.clock_unsynced;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ts: i64, v: f64) -> Sample {
        Sample {
            schema_version: SchemaVersion::default(),
            device: DeviceId::new("d").unwrap(),
            metric: "t".into(),
            ts: Timestamp(1_700_000_000_000 + ts),
            value: v,
            unit: Unit::Celsius,
        }
    }

    #[test]
    fn merge_is_order_independent() {
        let samples = [s(5, 3.0), s(1, 7.0), s(9, -2.0), s(3, 4.0)];
        let fold = |order: &[usize]| {
            let mut r = Rollup::of_sample(&samples[order[0]], 60_000);
            for &i in &order[1..] {
                r.merge(&Rollup::of_sample(&samples[i], 60_000));
            }
            r
        };
        let a = fold(&[0, 1, 2, 3]);
        let b = fold(&[3, 2, 1, 0]);
        assert_eq!(a, b);
        assert_eq!(
            (a.count, a.min, a.max, a.sum, a.first, a.last),
            (4, -2.0, 7.0, 12.0, 7.0, -2.0)
        );
    }

    #[test]
    fn units_normalise() {
        let (u, v) = Unit::Fahrenheit.to_canonical(212.0);
        assert_eq!(u, Unit::Celsius);
        assert!((v - 100.0).abs() < 1e-9);
        assert_eq!(Unit::Kilopascal.to_canonical(250.0), (Unit::Bar, 2.5));
    }
}
