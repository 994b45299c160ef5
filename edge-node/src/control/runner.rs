//! The control loop runner: one tokio task per loop on a fixed period.
//!
//! Each tick: record how late it ran (jitter), pick up new parameters from
//! the `watch`, read the sensor from [`LatestValues`], step the pure
//! [`ControlLoop`], queue the output with a non-blocking [`Actuator`]. Nothing
//! in a tick awaits the network or a device. A failed write is retried on
//! the next tick; if the device polls the output coil and reads back a
//! different value than the one confirmed, the output is written again.
//!
//! Missed ticks are skipped (`MissedTickBehavior::Skip`): after a stall the
//! loop runs once, on the original grid. Bursting would run several steps
//! back to back on the same sensor value (useless), and `Delay` would shift
//! the grid so that lateness after a stall is hidden from the jitter figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::config::LoopConfig;
use schemas::device::LoopState;
use schemas::ids::DeviceId;
use tokio::sync::oneshot::error::TryRecvError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::journal::{JournalHandle, TickSender};
use super::{
    ControlLoop, JitterStats, JitterWindow, LoopEvent, LoopParams, ParamError, SensorInput,
};
use crate::clock::Clock;
use crate::modbus::{DeviceHandle, LatestValues, WriteError, WriteReply};

/// Drives a loop's output without waiting.
pub trait Actuator: Send + Sync {
    /// Queue the output; must return at once. The outcome arrives on the
    /// returned receiver.
    fn try_actuate(&self, on: bool) -> Result<WriteReply, WriteError>;
}

/// An [`Actuator`] writing a coil through a device task.
#[derive(Debug, Clone)]
pub struct CoilActuator {
    handle: DeviceHandle,
    coil: String,
}

impl CoilActuator {
    /// Drive `coil` of the device behind `handle`.
    pub fn new(handle: DeviceHandle, coil: impl Into<String>) -> Self {
        CoilActuator {
            handle,
            coil: coil.into(),
        }
    }
}

impl Actuator for CoilActuator {
    fn try_actuate(&self, on: bool) -> Result<WriteReply, WriteError> {
        self.handle.try_write_coil(&self.coil, on)
    }
}

/// Runner tuning.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// A sensor value older than this many periods is a sensor fault.
    pub stale_periods: u32,
    /// Ticks kept for the jitter percentiles.
    pub jitter_window: usize,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            stale_periods: 3,
            jitter_window: 4096,
        }
    }
}

/// A running loop.
#[derive(Debug)]
pub struct LoopRunner {
    name: String,
    state: watch::Receiver<LoopState>,
    jitter: Arc<Mutex<JitterWindow>>,
    dropped_events: Arc<AtomicU64>,
    journal: Option<TickSender>,
    shutdown: watch::Sender<bool>,
    join: JoinHandle<()>,
}

impl LoopRunner {
    /// The loop's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loop's current state (output, setpoint, fail-safe, jitter p99).
    pub fn state(&self) -> LoopState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state update (one per tick).
    pub fn watch_state(&self) -> watch::Receiver<LoopState> {
        self.state.clone()
    }

    /// Period jitter percentiles; `None` before the first tick.
    pub fn jitter(&self) -> Option<JitterStats> {
        self.jitter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stats()
    }

    /// Events not delivered because the event channel was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
    }

    /// Ticks not journaled because the tick journal's queue was full
    /// (`None` without a journal).
    pub fn journal_dropped(&self) -> Option<u64> {
        self.journal.as_ref().map(TickSender::dropped)
    }

    /// Stop the loop; returns when its task has ended. The output stays as
    /// it was last commanded.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.join.await;
    }
}

/// Start a loop's task. `params` carries the effective parameters (initially
/// [`LoopParams::from_config`]); updates that do not fit the loop are
/// logged and ignored. Events are sent with `try_send` and counted when the
/// channel is full, never awaited.
pub fn spawn_loop(
    cfg: &LoopConfig,
    params: watch::Receiver<LoopParams>,
    values: LatestValues,
    actuator: Arc<dyn Actuator>,
    clock: Arc<dyn Clock>,
    events: mpsc::Sender<LoopEvent>,
    opts: LoopOptions,
) -> Result<LoopRunner, ParamError> {
    spawn_loop_journaled(cfg, params, values, actuator, clock, events, opts, None)
}

/// [`spawn_loop`], also recording every tick in a tick journal (see
/// [`super::journal`]) through a non-blocking sender.
#[allow(clippy::too_many_arguments)] // spawn_loop's arguments plus the journal
pub fn spawn_loop_journaled(
    cfg: &LoopConfig,
    params: watch::Receiver<LoopParams>,
    values: LatestValues,
    actuator: Arc<dyn Actuator>,
    clock: Arc<dyn Clock>,
    events: mpsc::Sender<LoopEvent>,
    opts: LoopOptions,
    journal: Option<&JournalHandle>,
) -> Result<LoopRunner, ParamError> {
    let journal = journal.map(|j| j.sender(cfg.name()));
    let (device, sensor, output, period_ms) = match cfg {
        LoopConfig::Thermostat {
            device,
            sensor,
            output,
            period_ms,
            ..
        }
        | LoopConfig::Interlock {
            device,
            sensor,
            output,
            period_ms,
            ..
        } => (device.clone(), sensor.clone(), output.clone(), *period_ms),
    };
    let period = Duration::from_millis(period_ms.max(1));
    let stale_after = period * opts.stale_periods.max(1);
    let ctl = ControlLoop::new(cfg, stale_after);
    let initial = params.borrow().clone();
    ctl.check_params(&initial)?;
    let (state_tx, state_rx) = watch::channel(LoopState {
        output: false,
        setpoint: Some(initial.target()),
        fail_safe: false,
        last_actuation: None,
        jitter_p99_us: None,
    });
    let jitter = Arc::new(Mutex::new(JitterWindow::new(opts.jitter_window)));
    let dropped_events = Arc::new(AtomicU64::new(0));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = LoopTask {
        ctl,
        period,
        device,
        sensor,
        output,
        params_rx: params,
        params: initial,
        values,
        actuator,
        clock,
        events,
        state: state_tx,
        jitter: jitter.clone(),
        dropped_events: dropped_events.clone(),
        journal: journal.clone(),
        shutdown: shutdown_rx,
    };
    let join = tokio::spawn(task.run());
    Ok(LoopRunner {
        name: cfg.name().to_string(),
        state: state_rx,
        jitter,
        dropped_events,
        journal,
        shutdown,
        join,
    })
}

struct LoopTask {
    ctl: ControlLoop,
    period: Duration,
    device: DeviceId,
    sensor: String,
    /// The output coil's name, for read-back.
    output: String,
    params_rx: watch::Receiver<LoopParams>,
    params: LoopParams,
    values: LatestValues,
    actuator: Arc<dyn Actuator>,
    clock: Arc<dyn Clock>,
    events: mpsc::Sender<LoopEvent>,
    state: watch::Sender<LoopState>,
    jitter: Arc<Mutex<JitterWindow>>,
    dropped_events: Arc<AtomicU64>,
    journal: Option<TickSender>,
    shutdown: watch::Receiver<bool>,
}

impl LoopTask {
    async fn run(mut self) {
        let mut interval = tokio::time::interval(self.period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        // The output the device confirmed, and a write in flight.
        let mut confirmed: Option<bool> = None;
        let mut confirmed_at: Option<std::time::Instant> = None;
        let mut pending: Option<(bool, WriteReply)> = None;
        let mut write_failing = false;
        let name = self.ctl.name().to_string();
        loop {
            let scheduled = tokio::select! {
                t = interval.tick() => t,
                _ = self.shutdown.changed() => return,
            };
            let late = tokio::time::Instant::now().saturating_duration_since(scheduled);
            let p99 = {
                let mut j = self
                    .jitter
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                j.record(late);
                j.stats().map(|s| s.p99_us)
            };
            if let Some(j) = &self.journal {
                // try_send: a stalled journal drops (and counts) the tick.
                j.record(self.clock.monotonic(), self.clock.now().as_millis());
            }

            if self.params_rx.has_changed().unwrap_or(false) {
                let p = self.params_rx.borrow_and_update().clone();
                match self.ctl.check_params(&p) {
                    Ok(()) => self.params = p,
                    Err(e) => {
                        tracing::warn!(loop_name = %name, error = %e, "loop parameters ignored")
                    }
                }
            }

            if let Some((value, rx)) = pending.as_mut() {
                match rx.try_recv() {
                    Ok(Ok(())) => {
                        confirmed = Some(*value);
                        confirmed_at = Some(self.clock.monotonic());
                        pending = None;
                        if write_failing {
                            tracing::info!(loop_name = %name, "loop output write works again");
                        }
                        write_failing = false;
                    }
                    Ok(Err(e)) => {
                        if !write_failing {
                            tracing::warn!(loop_name = %name, error = %e, "loop output write failed");
                        }
                        write_failing = true;
                        confirmed = None;
                        pending = None;
                    }
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Closed) => {
                        confirmed = None;
                        pending = None;
                    }
                }
            }

            // Read-back: if the device polls the output coil and a value
            // read after our write was confirmed disagrees (the device
            // restarted, someone switched it by hand), write it again. The
            // device task serialises polls and writes, so such a value was
            // read after the write took effect.
            if let (Some(c), Some(at)) = (confirmed, confirmed_at)
                && let Some(rb) = self.values.get(&self.device, &self.output)
                && rb.received > at
                && (rb.reading.value != 0.0) != c
            {
                tracing::warn!(loop_name = %name, expected = c, "loop output read back different; writing it again");
                confirmed = None;
                confirmed_at = None;
            }

            let now = self.clock.monotonic();
            let sensor = self
                .values
                .get(&self.device, &self.sensor)
                .map(|l| SensorInput {
                    value: l.reading.value,
                    age: now.saturating_duration_since(l.received),
                });
            let d = self.ctl.step(now, self.clock.now(), sensor, &self.params);
            if let Some(ev) = d.event {
                tracing::info!(loop_name = %name, output = ev.output, reason = %ev.reason, "loop event");
                if self.events.try_send(ev).is_err() {
                    self.dropped_events.fetch_add(1, Ordering::Relaxed);
                }
            }

            let in_flight = pending.as_ref().map(|(v, _)| *v);
            if confirmed != Some(d.output) && in_flight != Some(d.output) {
                // A write of the other value may still be in flight: the
                // device task executes writes in order, so this one wins.
                match self.actuator.try_actuate(d.output) {
                    Ok(rx) => pending = Some((d.output, rx)),
                    Err(e) => {
                        if !write_failing {
                            tracing::warn!(loop_name = %name, error = %e, "loop output not queued");
                        }
                        write_failing = true;
                        confirmed = None;
                    }
                }
            }

            self.state.send_replace(LoopState {
                output: d.output,
                setpoint: Some(self.params.target()),
                fail_safe: d.fail_safe,
                last_actuation: self.ctl.last_change_at(),
                jitter_p99_us: p99,
            });
        }
    }
}
