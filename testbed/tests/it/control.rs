//! The edge's real thermostat (`edge_node::control::ControlLoop`, the pure
//! step function its runner calls) holds a simulated cold room in its band
//! for a simulated day, run as fast as the CPU goes.
//!
//! The edge runs its loop on real time while the devices run `scale` times
//! faster, so one loop period of real time is `scale` periods of simulated
//! time and the minimum on/off times stretch the same way. Scale 1 and 10
//! (the `testbed up` default) must hold the band.

use std::time::{Duration, Instant};

use edge_node::control::{ControlLoop, LoopParams, SensorInput};
use schemas::config::LoopConfig;
use schemas::ids::DeviceId;
use schemas::time::Timestamp;
use testbed::device::DeviceHandle;
use testbed::maps::{suggested_alarms, suggested_loops};
use testbed::physics::DeviceKind;

struct DayStats {
    lo: f64,
    hi: f64,
    in_band: f64,
    starts: u32,
}

/// One simulated day of `room` under the edge thermostat `cfg`, the loop
/// stepping every `period_ms` of real time, devices at `scale`. The first
/// `settle_s` simulated seconds are not counted (the loop takes over a room
/// at a random temperature).
fn simulated_day(room: &DeviceHandle, cfg: &LoopConfig, scale: f64, settle_s: f64) -> DayStats {
    let LoopConfig::Thermostat {
        period_ms,
        default_setpoint: sp,
        default_hysteresis: h,
        ..
    } = cfg
    else {
        panic!("not a thermostat: {cfg:?}");
    };
    let mut lp = ControlLoop::new(cfg, Duration::from_secs(5));
    let params = LoopParams::from_config(cfg);
    let t0 = Instant::now();
    let real_period = Duration::from_millis(*period_ms);
    let sim_period = real_period.mul_f64(scale);
    let (band_lo, band_hi) = (sp - h / 2.0 - 0.5, sp + h / 2.0 + 0.5);
    let steps = (86_400.0 / sim_period.as_secs_f64()) as u32;
    let mut st = DayStats {
        lo: f64::MAX,
        hi: f64::MIN,
        in_band: 0.0,
        starts: 0,
    };
    let mut counted = 0u32;
    let mut last = None;
    for i in 0..steps {
        let real = real_period * i;
        // What the edge reads over Modbus: the 0.1 C register value.
        let reading = room.lock().reported("temperature").unwrap();
        let value = (reading * 10.0).round() / 10.0;
        let d = lp.step(
            t0 + real,
            Timestamp(i64::try_from(real.as_millis()).unwrap()),
            Some(SensorInput {
                value,
                age: Duration::from_millis(50),
            }),
            &params,
        );
        assert!(
            !d.fail_safe,
            "step {i}: fresh sensor value counted as a fault"
        );
        if d.output && last == Some(false) {
            st.starts += 1;
        }
        last = Some(d.output);
        room.lock()
            .set("compressor", f64::from(u8::from(d.output)))
            .unwrap();
        room.advance(sim_period);
        if f64::from(i) * sim_period.as_secs_f64() >= settle_s {
            let t = room.signal("temperature").unwrap();
            st.lo = st.lo.min(t);
            st.hi = st.hi.max(t);
            counted += 1;
            if (band_lo..=band_hi).contains(&t) {
                st.in_band += 1.0;
            }
        }
    }
    st.in_band /= f64::from(counted);
    st
}

#[test]
fn edge_thermostat_holds_the_cold_room_band_for_a_simulated_day() {
    let id = DeviceId::new("cold-room-1").unwrap();
    let cfg = suggested_loops(DeviceKind::ColdRoom, &id).remove(0);
    let alarms = suggested_alarms(DeviceKind::ColdRoom, &id);
    let limit = |above: bool| {
        alarms
            .iter()
            .find(|a| (a.condition == schemas::alarm::Condition::Above) == above)
            .unwrap()
            .threshold
    };
    let (too_cold, too_warm) = (limit(false), limit(true));
    for scale in [1.0, 10.0] {
        for seed in 0..8 {
            let room = DeviceHandle::simulated(DeviceKind::ColdRoom, seed, 0.0);
            let st = simulated_day(&room, &cfg, scale, 1800.0);
            assert!(
                st.lo > too_cold && st.hi < too_warm,
                "scale {scale} seed {seed}: {:.2}..{:.2} C crosses the alarms {too_cold}..{too_warm}",
                st.lo,
                st.hi
            );
            // Door openings push the room out of the band for a while; most
            // of the day it must be in it.
            assert!(
                st.in_band >= 0.9,
                "scale {scale} seed {seed}: in band only {:.1} % of the day ({:.2}..{:.2} C)",
                st.in_band * 100.0,
                st.lo,
                st.hi
            );
            // It cycles (a stuck-on or stuck-off loop would not).
            assert!(
                st.starts >= 3,
                "scale {scale} seed {seed}: {} starts",
                st.starts
            );
        }
    }
}

/// A compressor left off (what a loop in the wrong fail-safe would do)
/// leaves the band within the day: the test above can fail.
#[test]
fn without_the_loop_the_room_leaves_the_band() {
    let room = DeviceHandle::simulated(DeviceKind::ColdRoom, 3, 0.0);
    room.advance(Duration::from_secs(6 * 3600));
    let t = room.signal("temperature").unwrap();
    assert!(t > 6.0, "room at {t:.2} C after 6 h without cooling");
}
