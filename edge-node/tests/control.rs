//! Control loops: the pure thermostat and interlock with a manual clock, and
//! the real runner under paused tokio time keeping a simulated cold room in
//! its band for a day.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_node::clock::{Clock, ManualClock, TokioClock};
use edge_node::control::{
    Actuator, ControlLoop, LoopEvent, LoopOptions, LoopParams, LoopReason, SensorInput, spawn_loop,
};
use edge_node::modbus::{Latest, LatestValues, WriteError, WriteReply};
use schemas::config::{FailSafe, LoopConfig};
use schemas::device::Reading;
use schemas::ids::DeviceId;
use schemas::time::Timestamp;
use tokio::sync::{mpsc, oneshot, watch};

const T0: Timestamp = Timestamp(1_764_000_000_000);

fn dev() -> DeviceId {
    DeviceId::new("cold-room-1").unwrap()
}

fn thermostat(fail_safe: FailSafe, min_on_s: u64, min_off_s: u64) -> LoopConfig {
    LoopConfig::Thermostat {
        name: "room".into(),
        device: dev(),
        sensor: "temp".into(),
        output: "compressor".into(),
        period_ms: 1000,
        fail_safe,
        default_setpoint: 4.0,
        default_hysteresis: 2.0,
        min_on_s,
        min_off_s,
    }
}

fn interlock(fail_safe: FailSafe) -> LoopConfig {
    LoopConfig::Interlock {
        name: "pump-guard".into(),
        device: dev(),
        sensor: "pressure".into(),
        output: "pump".into(),
        period_ms: 1000,
        fail_safe,
        default_limit: 10.0,
    }
}

fn fresh(value: f64) -> Option<SensorInput> {
    Some(SensorInput {
        value,
        age: Duration::ZERO,
    })
}

/// Step a pure loop at the manual clock's time.
struct Bench {
    clock: ManualClock,
    ctl: ControlLoop,
    params: LoopParams,
}

impl Bench {
    fn new(cfg: &LoopConfig) -> Bench {
        Bench {
            clock: ManualClock::new(T0),
            ctl: ControlLoop::new(cfg, Duration::from_secs(3)),
            params: LoopParams::from_config(cfg),
        }
    }
    fn at(&mut self, secs: u64, sensor: Option<SensorInput>) -> (bool, Option<LoopEvent>) {
        let now = self.clock.now();
        let target = T0.saturating_add_ms(secs as i64 * 1000);
        self.clock
            .advance(Duration::from_millis((target.0 - now.0) as u64));
        let d = self.ctl.step(
            self.clock.monotonic(),
            self.clock.now(),
            sensor,
            &self.params,
        );
        (d.output, d.event)
    }
}

#[test]
fn thermostat_switches_at_the_band_edges_only() {
    let mut b = Bench::new(&thermostat(FailSafe::Off, 0, 0));
    // band is 3..5
    let (out, ev) = b.at(0, fresh(4.5));
    assert!(!out);
    assert!(matches!(ev.unwrap().reason, LoopReason::Initial { .. }));
    assert_eq!(b.at(1, fresh(5.0)), (false, None), "at the edge: no change");
    let (out, ev) = b.at(2, fresh(5.1));
    assert!(out);
    let ev = ev.unwrap();
    assert_eq!(ev.at, T0.saturating_add_ms(2000));
    assert_eq!(
        ev.reason,
        LoopReason::AboveBand {
            value: 5.1,
            high: 5.0
        }
    );
    assert_eq!(
        b.at(3, fresh(4.0)),
        (true, None),
        "inside the band: stays on"
    );
    assert_eq!(b.at(4, fresh(3.0)), (true, None));
    let (out, ev) = b.at(5, fresh(2.9));
    assert!(!out);
    assert_eq!(
        ev.unwrap().reason,
        LoopReason::BelowBand {
            value: 2.9,
            low: 3.0
        }
    );
    assert_eq!(b.at(6, fresh(4.9)), (false, None));
}

#[test]
fn thermostat_respects_minimum_on_and_off_times() {
    let mut b = Bench::new(&thermostat(FailSafe::Off, 60, 120));
    let (out, _) = b.at(0, fresh(6.0));
    assert!(out, "starts on when warm");
    assert_eq!(b.at(10, fresh(2.0)), (true, None), "min on not yet over");
    assert_eq!(b.at(59, fresh(2.0)), (true, None));
    let (out, ev) = b.at(60, fresh(2.0));
    assert!(!out && ev.is_some(), "off once min on has passed");
    assert_eq!(b.at(70, fresh(6.0)), (false, None), "min off not yet over");
    assert_eq!(b.at(179, fresh(6.0)), (false, None));
    let (out, ev) = b.at(180, fresh(6.0));
    assert!(out && ev.is_some(), "on once min off has passed");
    assert_eq!(b.ctl.last_change_at(), Some(T0.saturating_add_ms(180_000)));
}

#[test]
fn sensor_faults_go_to_the_declared_fail_safe_and_recover() {
    for (fs, expect_during_fault) in [
        (FailSafe::Off, false),
        (FailSafe::On, true),
        (FailSafe::Hold, true),
    ] {
        let mut b = Bench::new(&thermostat(fs, 0, 0));
        assert!(b.at(0, fresh(6.0)).0, "{fs:?}: on while warm");
        // A value older than the staleness bound (3 s) is a fault.
        let stale = Some(SensorInput {
            value: 6.0,
            age: Duration::from_secs(4),
        });
        let (out, ev) = b.at(1, stale);
        assert_eq!(out, expect_during_fault, "{fs:?}");
        let ev = ev.unwrap();
        assert!(
            matches!(&ev.reason, LoopReason::SensorFault { detail } if detail.contains("4000 ms old")),
            "{fs:?}: {ev:?}"
        );
        // Still faulty (now no value at all): no new event, same output.
        assert_eq!(b.at(2, None), (expect_during_fault, None), "{fs:?}");
        // A fresh cold value: recovered, normal control turns it off.
        let (out, ev) = b.at(3, fresh(2.0));
        assert!(!out, "{fs:?}");
        assert_eq!(
            ev.unwrap().reason,
            LoopReason::SensorRecovered { value: 2.0 }
        );
    }
    // Hold keeps an off output off.
    let mut b = Bench::new(&thermostat(FailSafe::Hold, 0, 0));
    assert!(!b.at(0, fresh(2.0)).0);
    assert!(!b.at(1, None).0);
    // A fault before any value: the fail-safe is the first decision.
    let mut b = Bench::new(&thermostat(FailSafe::On, 0, 0));
    let (out, ev) = b.at(0, None);
    assert!(out);
    assert!(matches!(ev.unwrap().reason, LoopReason::SensorFault { .. }));
    // A non-finite value is a fault too.
    let mut b = Bench::new(&thermostat(FailSafe::Off, 0, 0));
    b.at(0, fresh(6.0));
    assert!(!b.at(1, fresh(f64::NAN)).0);
}

#[test]
fn fail_safe_overrides_the_minimum_on_time() {
    let mut b = Bench::new(&thermostat(FailSafe::Off, 600, 600));
    assert!(b.at(0, fresh(6.0)).0);
    assert!(!b.at(5, None).0, "safety wins over compressor protection");
}

#[test]
fn interlock_trips_above_the_limit_and_releases_below_the_margin() {
    let mut b = Bench::new(&interlock(FailSafe::Off));
    b.params = LoopParams::Interlock {
        limit: 10.0,
        margin: 0.5,
    };
    let (out, ev) = b.at(0, fresh(9.0));
    assert!(out);
    assert!(matches!(ev.unwrap().reason, LoopReason::Initial { .. }));
    assert_eq!(b.at(1, fresh(10.0)), (true, None), "at the limit: still on");
    let (out, ev) = b.at(2, fresh(10.2));
    assert!(!out);
    assert_eq!(
        ev.unwrap().reason,
        LoopReason::Tripped {
            value: 10.2,
            limit: 10.0
        }
    );
    assert_eq!(
        b.at(3, fresh(9.8)),
        (false, None),
        "below limit, above margin"
    );
    assert_eq!(b.at(4, fresh(9.5)), (false, None), "at limit - margin");
    let (out, ev) = b.at(5, fresh(9.4));
    assert!(out);
    assert_eq!(
        ev.unwrap().reason,
        LoopReason::Released {
            value: 9.4,
            resume_below: 9.5
        }
    );
    // Sensor fault: declared fail-safe Off.
    assert!(!b.at(6, None).0);
    // Starting above the limit trips at once.
    let mut b = Bench::new(&interlock(FailSafe::Off));
    let (out, ev) = b.at(0, fresh(12.0));
    assert!(!out);
    assert!(matches!(ev.unwrap().reason, LoopReason::Tripped { .. }));
}

#[test]
fn device_document_fields_override_the_config_defaults() {
    use schemas::device::FieldValue;
    use std::collections::BTreeMap;
    let base = LoopParams::from_config(&thermostat(FailSafe::Off, 0, 0));
    let mut f = BTreeMap::new();
    f.insert("setpoint".to_string(), FieldValue::Number(-18.0));
    f.insert("min_on_s".to_string(), FieldValue::Number(90.0));
    f.insert("label".to_string(), FieldValue::Text("freezer".into()));
    assert_eq!(
        base.with_fields("room", &f).unwrap(),
        LoopParams::Thermostat {
            setpoint: -18.0,
            hysteresis: 2.0,
            min_on: Duration::from_secs(90),
            min_off: Duration::ZERO,
        }
    );
    f.insert("hysteresis".to_string(), FieldValue::Text("wide".into()));
    let e = base.with_fields("room", &f).unwrap_err();
    assert!(e.to_string().contains("hysteresis"), "{e}");
    f.insert("hysteresis".to_string(), FieldValue::Number(1.0));
    f.insert("min_off_s".to_string(), FieldValue::Number(-5.0));
    let e = base.with_fields("room", &f).unwrap_err();
    assert!(e.to_string().contains("min_off_s"), "{e}");

    let guard = LoopParams::from_config(&interlock(FailSafe::Off));
    let mut f = BTreeMap::new();
    f.insert("high_limit".to_string(), FieldValue::Number(6.0));
    assert_eq!(
        guard.with_fields("pump-guard", &f).unwrap(),
        LoopParams::Interlock {
            limit: 6.0,
            margin: 0.12
        }
    );
}

#[test]
fn parameters_of_the_wrong_kind_or_invalid_are_refused() {
    let ctl = ControlLoop::new(&thermostat(FailSafe::Off, 0, 0), Duration::from_secs(3));
    let e = ctl
        .check_params(&LoopParams::Interlock {
            limit: 1.0,
            margin: 0.1,
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("interlock parameters for a thermostat"),
        "{e}"
    );
    let e = ctl
        .check_params(&LoopParams::Thermostat {
            setpoint: 4.0,
            hysteresis: -1.0,
            min_on: Duration::ZERO,
            min_off: Duration::ZERO,
        })
        .unwrap_err();
    assert!(e.to_string().contains("hysteresis"), "{e}");
}

// ------------------------------------------------------------ runner

/// A compressor relay: records every actuation with its (virtual) time and
/// confirms at once.
#[derive(Clone, Default)]
struct Relay {
    on: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(tokio::time::Instant, bool)>>>,
}

impl Actuator for Relay {
    fn try_actuate(&self, on: bool) -> Result<WriteReply, WriteError> {
        self.on.store(on, Ordering::SeqCst);
        self.log
            .lock()
            .unwrap()
            .push((tokio::time::Instant::now(), on));
        let (tx, rx) = oneshot::channel();
        tx.send(Ok(())).unwrap();
        Ok(rx)
    }
}

/// A cold room: warms toward ambient, cools when the compressor runs.
struct Room {
    temp: f64,
}

const AMBIENT: f64 = 20.0;
const WARM_TAU_S: f64 = 3600.0;
const COOL_PER_S: f64 = 0.02;

impl Room {
    fn step(&mut self, dt_s: f64, compressor: bool) {
        let cooling = if compressor { COOL_PER_S } else { 0.0 };
        self.temp += dt_s * ((AMBIENT - self.temp) / WARM_TAU_S - cooling);
    }
}

fn publish(values: &LatestValues, clock: &dyn Clock, metric: &str, value: f64) {
    values.set(
        &dev(),
        metric,
        Latest {
            reading: Reading {
                value,
                ts: clock.now(),
            },
            received: clock.monotonic(),
        },
    );
}

#[tokio::test(start_paused = true)]
async fn thermostat_keeps_a_cold_room_in_its_band_for_a_simulated_day() {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
    let cfg = thermostat(FailSafe::On, 60, 60);
    let values = LatestValues::new();
    let relay = Relay::default();
    let (params_tx, params_rx) = watch::channel(LoopParams::from_config(&cfg));
    let (ev_tx, mut ev_rx) = mpsc::channel(100_000);
    let runner = spawn_loop(
        &cfg,
        params_rx,
        values.clone(),
        Arc::new(relay.clone()),
        clock.clone(),
        ev_tx,
        LoopOptions::default(),
    )
    .unwrap();

    // The room, simulated in 1 s steps for a day.
    let day_s = 86_400u64;
    let start = tokio::time::Instant::now();
    let mut room = Room { temp: 4.0 };
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..day_s {
        tick.tick().await;
        room.step(1.0, relay.on.load(Ordering::SeqCst));
        publish(&values, clock.as_ref(), "temp", room.temp);
        lo = lo.min(room.temp);
        hi = hi.max(room.temp);
    }
    let elapsed = start.elapsed();
    let jitter = runner.jitter().unwrap();
    let state = runner.state();
    runner.stop().await;
    drop(params_tx);

    let log = relay.log.lock().unwrap().clone();
    let cycles = log.iter().filter(|(_, on)| *on).count();
    eprintln!(
        "cold room over a simulated day: {lo:.3}..{hi:.3} C, {cycles} compressor starts, jitter {jitter:?}"
    );
    assert!(elapsed >= Duration::from_secs(day_s - 1), "{elapsed:?}");
    // Band 3..5; one period of lag may overshoot by a few hundredths.
    assert!(lo > 2.9 && hi < 5.1, "room left its band: {lo:.3}..{hi:.3}");
    assert!(
        cycles > 20,
        "the compressor should cycle over a day: {cycles}"
    );
    for w in log.windows(2) {
        let held = w[1].0 - w[0].0;
        assert!(
            held >= Duration::from_secs(60),
            "output {} held only {held:?}",
            w[0].1
        );
    }
    // One event per actuation, in order, with wall times from the clock.
    let mut events = Vec::new();
    while let Ok(e) = ev_rx.try_recv() {
        events.push(e);
    }
    assert_eq!(events.len(), log.len());
    assert!(events.iter().zip(&log).all(|(e, (_, on))| e.output == *on));
    assert!(events.windows(2).all(|w| w[0].at < w[1].at));
    assert!(events.iter().all(|e| e.loop_name == "room"));
    // Jitter is measured on every tick; under paused time it is zero.
    assert!(jitter.count >= day_s - 1, "{jitter:?}");
    assert!(jitter.p99_us < 1000, "{jitter:?}");
    assert_eq!(state.jitter_p99_us, Some(jitter.p99_us));
    assert_eq!(state.setpoint, Some(4.0));
    assert!(!state.fail_safe);
}

#[tokio::test(start_paused = true)]
async fn runner_goes_fail_safe_on_a_silent_sensor_and_follows_new_parameters() {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
    let cfg = thermostat(FailSafe::On, 0, 0);
    let values = LatestValues::new();
    let relay = Relay::default();
    let (params_tx, params_rx) = watch::channel(LoopParams::from_config(&cfg));
    let (ev_tx, mut ev_rx) = mpsc::channel(1000);
    let runner = spawn_loop(
        &cfg,
        params_rx,
        values.clone(),
        Arc::new(relay.clone()),
        clock.clone(),
        ev_tx,
        LoopOptions::default(),
    )
    .unwrap();
    let mut state = runner.watch_state();

    // Cold: off.
    publish(&values, clock.as_ref(), "temp", 2.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!runner.state().output);
    assert!(!relay.on.load(Ordering::SeqCst));

    // The sensor goes quiet: after 3 periods the loop goes to fail-safe On.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = runner.state();
    assert!(s.fail_safe && s.output, "{s:?}");
    assert!(
        relay.on.load(Ordering::SeqCst),
        "fail-safe reached the relay"
    );

    // It comes back, warm: normal control, stays on; then a new setpoint
    // from the document makes the same temperature cold enough to stop.
    publish(&values, clock.as_ref(), "temp", 4.5);
    state.changed().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!runner.state().fail_safe);
    assert!(runner.state().output, "4.5 is inside 3..5: stays on");
    params_tx
        .send(LoopParams::Thermostat {
            setpoint: 8.0,
            hysteresis: 2.0,
            min_on: Duration::ZERO,
            min_off: Duration::ZERO,
        })
        .unwrap();
    publish(&values, clock.as_ref(), "temp", 4.5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = runner.state();
    assert_eq!(s.setpoint, Some(8.0));
    assert!(!s.output, "4.5 is below 7..9: off");
    // Invalid parameters are ignored; the loop keeps the last good ones.
    params_tx
        .send(LoopParams::Interlock {
            limit: 1.0,
            margin: 0.1,
        })
        .unwrap();
    publish(&values, clock.as_ref(), "temp", 4.5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runner.state().setpoint, Some(8.0));
    runner.stop().await;

    let mut reasons = Vec::new();
    while let Ok(e) = ev_rx.try_recv() {
        reasons.push(e.reason);
    }
    assert!(
        matches!(reasons[0], LoopReason::Initial { .. }),
        "{reasons:?}"
    );
    assert!(
        matches!(reasons[1], LoopReason::SensorFault { .. }),
        "{reasons:?}"
    );
    assert!(
        matches!(reasons[2], LoopReason::SensorRecovered { .. }),
        "{reasons:?}"
    );
    assert!(
        matches!(reasons[3], LoopReason::BelowBand { .. }),
        "{reasons:?}"
    );
    assert_eq!(reasons.len(), 4, "{reasons:?}");
}

/// An actuator whose device never answers and whose queue is often full.
struct Stuck {
    held: Mutex<Vec<oneshot::Sender<Result<(), WriteError>>>>,
    calls: Mutex<u32>,
}

impl Actuator for Stuck {
    fn try_actuate(&self, _on: bool) -> Result<WriteReply, WriteError> {
        let mut calls = self.calls.lock().unwrap();
        *calls += 1;
        if (*calls).is_multiple_of(2) {
            return Err(WriteError::Busy { device: dev() });
        }
        let (tx, rx) = oneshot::channel();
        self.held.lock().unwrap().push(tx);
        Ok(rx)
    }
}

#[tokio::test(start_paused = true)]
async fn a_stuck_device_never_stops_the_loop_ticking() {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
    let cfg = interlock(FailSafe::Off);
    let values = LatestValues::new();
    let stuck = Arc::new(Stuck {
        held: Mutex::new(Vec::new()),
        calls: Mutex::new(0),
    });
    let (_params_tx, params_rx) = watch::channel(LoopParams::from_config(&cfg));
    let (ev_tx, _ev_rx) = mpsc::channel(1000);
    let runner = spawn_loop(
        &cfg,
        params_rx,
        values.clone(),
        stuck.clone(),
        clock.clone(),
        ev_tx,
        LoopOptions::default(),
    )
    .unwrap();
    // Alternate the pressure across the limit so the loop keeps wanting
    // to change its output while no write ever completes.
    for i in 0..100u32 {
        let p = if (i / 5) % 2 == 0 { 5.0 } else { 15.0 };
        publish(&values, clock.as_ref(), "pressure", p);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let j = runner.jitter().unwrap();
    assert!(j.count >= 99, "the loop ticked on its period: {j:?}");
    assert!(*stuck.calls.lock().unwrap() >= 10, "outputs were queued");
    runner.stop().await;
}

// ------------------------------------------------------------ end to end

mod wire {
    //! A minimal Modbus TCP device on loopback: holding registers and coils.
    use std::collections::HashMap;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
    use tokio_modbus::{ExceptionCode, Request, Response};

    #[derive(Clone, Default)]
    pub(crate) struct Plant {
        pub(crate) holding: Arc<Mutex<HashMap<u16, u16>>>,
        pub(crate) coils: Arc<Mutex<HashMap<u16, bool>>>,
    }

    fn get<T: Copy>(m: &Mutex<HashMap<u16, T>>, a: u16, n: u16) -> Result<Vec<T>, ExceptionCode> {
        let m = m.lock().unwrap();
        (a..a + n)
            .map(|i| m.get(&i).copied().ok_or(ExceptionCode::IllegalDataAddress))
            .collect()
    }

    impl tokio_modbus::server::Service for Plant {
        type Request = Request<'static>;
        type Response = Response;
        type Exception = ExceptionCode;
        type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

        fn call(&self, req: Self::Request) -> Self::Future {
            let r = match req {
                Request::ReadHoldingRegisters(a, n) => {
                    get(&self.holding, a, n).map(Response::ReadHoldingRegisters)
                }
                Request::ReadCoils(a, n) => get(&self.coils, a, n).map(Response::ReadCoils),
                Request::WriteSingleCoil(a, v) => {
                    self.coils.lock().unwrap().insert(a, v);
                    Ok(Response::WriteSingleCoil(a, v))
                }
                _ => Err(ExceptionCode::IllegalFunction),
            };
            Box::pin(std::future::ready(r))
        }
    }

    pub(crate) async fn serve(plant: Plant) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::new(listener);
        let task = tokio::spawn(async move {
            let on_connected = move |stream, socket_addr| {
                let plant = plant.clone();
                async move {
                    accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(plant.clone())))
                }
            };
            let _ = server.serve(&on_connected, |_| {}).await;
        });
        (addr, task)
    }
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interlock_drives_a_real_modbus_pump_and_fails_safe_when_it_goes_away() {
    use edge_node::clock::SystemClock;
    use edge_node::control::CoilActuator;
    use edge_node::modbus::{AdapterOptions, spawn_device};
    use schemas::config::DeviceConfig;
    use schemas::metrics::Unit;
    use schemas::registers::{RegisterFunction, RegisterSpec, RegisterType};

    let plant = wire::Plant::default();
    let set_pressure = |bar: f64| {
        plant
            .holding
            .lock()
            .unwrap()
            .insert(0, (bar * 10.0).round() as u16);
    };
    set_pressure(5.0);
    plant.coils.lock().unwrap().insert(0, false);
    let pump_on = || plant.coils.lock().unwrap()[&0];
    let (addr, server) = wire::serve(plant.clone()).await;

    let reg = |name: &str, function, data_type, scale| RegisterSpec {
        name: name.into(),
        unit_id: 1,
        function,
        address: 0,
        data_type,
        word_order: Default::default(),
        byte_order: Default::default(),
        scale,
        offset: 0.0,
        unit: Unit::Bar,
        poll_ms: 20,
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let values = LatestValues::new();
    let (dev_tx, mut dev_rx) = mpsc::channel(10_000);
    let drain = tokio::spawn(async move { while dev_rx.recv().await.is_some() {} });
    let device = spawn_device(
        DeviceConfig {
            id: dev(),
            device_type: "pump".into(),
            addr,
            timeout_ms: 500,
            tags: vec![],
            registers: vec![
                reg(
                    "pressure",
                    RegisterFunction::Holding,
                    RegisterType::U16,
                    0.1,
                ),
                reg("pump", RegisterFunction::Coil, RegisterType::Bool, 1.0),
            ],
        },
        AdapterOptions::default(),
        clock.clone(),
        values.clone(),
        dev_tx,
    )
    .unwrap();

    let cfg = LoopConfig::Interlock {
        name: "pump-guard".into(),
        device: dev(),
        sensor: "pressure".into(),
        output: "pump".into(),
        period_ms: 50,
        fail_safe: FailSafe::Off,
        default_limit: 10.0,
    };
    let (_params_tx, params_rx) = watch::channel(LoopParams::from_config(&cfg));
    let (ev_tx, mut ev_rx) = mpsc::channel(1000);
    let runner = spawn_loop(
        &cfg,
        params_rx,
        values.clone(),
        Arc::new(CoilActuator::new(device.handle(), "pump")),
        clock.clone(),
        ev_tx,
        LoopOptions::default(),
    )
    .unwrap();

    wait_for("pump started", 10, pump_on).await;
    set_pressure(12.0);
    wait_for("pump stopped by the interlock", 10, || !pump_on()).await;
    set_pressure(9.0);
    wait_for("pump released", 10, pump_on).await;
    // The device restarts and forgets its coil: the loop reads it back and
    // writes it again.
    plant.coils.lock().unwrap().insert(0, false);
    wait_for("pump re-asserted after read-back", 10, pump_on).await;

    // The device goes away: the value goes stale, the loop fails safe
    // (Off) and keeps ticking although its writes cannot be delivered.
    server.abort();
    let _ = server.await;
    wait_for("loop in fail-safe", 10, || {
        let s = runner.state();
        s.fail_safe && !s.output
    })
    .await;
    let ticks = runner.jitter().unwrap().count;
    wait_for("loop still ticking", 10, || {
        runner.jitter().unwrap().count >= ticks + 10
    })
    .await;

    let jitter = runner.jitter().unwrap();
    eprintln!("interlock on a real device, 50 ms period: {jitter:?}");
    runner.stop().await;
    device.stop().await;
    drain.await.unwrap();

    let mut reasons = Vec::new();
    while let Ok(e) = ev_rx.try_recv() {
        reasons.push(e.reason);
    }
    let has = |f: fn(&LoopReason) -> bool| reasons.iter().any(f);
    assert!(
        has(|r| matches!(r, LoopReason::Tripped { .. })),
        "{reasons:?}"
    );
    assert!(
        has(|r| matches!(r, LoopReason::Released { .. })),
        "{reasons:?}"
    );
    assert!(
        has(|r| matches!(r, LoopReason::SensorFault { .. })),
        "{reasons:?}"
    );
}
