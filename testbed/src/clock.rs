//! The simulated clock: advances devices by real elapsed time times a scale.
//!
//! The physics never read a clock; this driver is the only place that
//! measures real time (tokio's monotonic `Instant`, so tests can pause and
//! advance it). Tests that want full control skip the driver and call
//! [`DeviceHandle::advance`] themselves.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::device::DeviceHandle;

/// Largest accepted time scale (one real second = about 28 simulated hours).
pub const MAX_TIME_SCALE: f64 = 100_000.0;

/// A time scale that is not a finite number in `(0, MAX_TIME_SCALE]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("time scale {0} must be a number greater than 0 and at most {MAX_TIME_SCALE}")]
pub struct BadTimeScale(pub f64);

/// Check a time scale.
pub fn check_time_scale(scale: f64) -> Result<f64, BadTimeScale> {
    if scale.is_finite() && scale > 0.0 && scale <= MAX_TIME_SCALE {
        Ok(scale)
    } else {
        Err(BadTimeScale(scale))
    }
}

/// A running clock driver. Dropping it stops it.
#[derive(Debug)]
pub struct ClockDriver {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ClockDriver {
    /// Every `tick` of real time, advance each device by the real time
    /// elapsed since the last tick times `scale`.
    pub fn spawn(
        devices: Vec<DeviceHandle>,
        scale: f64,
        tick: Duration,
    ) -> Result<ClockDriver, BadTimeScale> {
        let scale = check_time_scale(scale)?;
        let tick = tick.max(Duration::from_millis(1));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = interval.tick() => {
                        let now = Instant::now();
                        let sim = now.duration_since(last).mul_f64(scale);
                        last = now;
                        for d in &devices {
                            d.advance(sim);
                        }
                    }
                }
            }
        });
        Ok(ClockDriver {
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stop the driver and wait for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ClockDriver {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::physics::DeviceKind;

    #[tokio::test(start_paused = true)]
    async fn driver_advances_devices_at_the_time_scale() {
        let d = DeviceHandle::simulated(DeviceKind::Pump, 1, 0.0);
        let driver = ClockDriver::spawn(vec![d.clone()], 60.0, Duration::from_millis(100)).unwrap();
        let start = Instant::now();
        while Instant::now() - start < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver.stop().await;
        let sim = d.elapsed_s();
        // 10 s real at 60x is 600 s simulated, give or take a tick.
        assert!((590.0..=612.0).contains(&sim), "simulated {sim} s");
        let after = d.elapsed_s();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(d.elapsed_s(), after, "a stopped driver advances nothing");
    }

    #[test]
    fn time_scales_are_checked() {
        assert!(check_time_scale(60.0).is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert!(check_time_scale(bad).is_err(), "{bad}");
        }
    }
}
