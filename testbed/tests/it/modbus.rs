//! Simulated devices observed through a tokio-modbus client on loopback:
//! values decode with the edge's specs, writes drive the physics, and every
//! fault is visible to the client.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use schemas::registers::{RegisterFunction, RegisterSpec};
use testbed::device::{DeviceHandle, Fault};
use testbed::physics::DeviceKind;
use testbed::server::DeviceServer;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::{ExceptionCode, Slave};

/// Bound every network step so a broken server fails the test instead of
/// hanging it.
async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("step did not finish within 5 s")
}

async fn start(kind: DeviceKind, seed: u64) -> (DeviceHandle, DeviceServer) {
    let dev = DeviceHandle::simulated(kind, seed, 8.0 * 3600.0);
    let server = DeviceServer::start_local(dev.clone()).await.unwrap();
    assert!(server.addr().ip().is_loopback());
    assert_ne!(server.addr().port(), 0);
    (dev, server)
}

async fn connect(addr: SocketAddr) -> Context {
    bounded(tokio_modbus::client::tcp::connect_slave(addr, Slave(1)))
        .await
        .unwrap()
}

/// Read one register the way an edge would: by its spec, then decode.
async fn read_spec(ctx: &mut Context, spec: &RegisterSpec) -> tokio_modbus::Result<f64> {
    let n = spec.data_type.words();
    let words: tokio_modbus::Result<Vec<u16>> = match spec.function {
        RegisterFunction::Holding => ctx.read_holding_registers(spec.address, n).await,
        RegisterFunction::Input => ctx.read_input_registers(spec.address, n).await,
        RegisterFunction::Coil => ctx
            .read_coils(spec.address, 1)
            .await
            .map(|r| r.map(|b| b.into_iter().map(u16::from).collect())),
        RegisterFunction::Discrete => ctx
            .read_discrete_inputs(spec.address, 1)
            .await
            .map(|r| r.map(|b| b.into_iter().map(u16::from).collect())),
    };
    words.map(|r| r.map(|w| spec.decode(&w).unwrap()))
}

async fn read_named(
    ctx: &mut Context,
    dev: &DeviceHandle,
    name: &str,
) -> tokio_modbus::Result<f64> {
    let spec = dev.lock().map().get(name).unwrap().clone();
    read_spec(ctx, &spec).await
}

fn resolution(spec: &RegisterSpec) -> f64 {
    use schemas::registers::RegisterType::*;
    match spec.data_type {
        F32 => 1e-3,
        Bool => 0.0,
        _ => spec.scale.abs() / 2.0 + 1e-9,
    }
}

#[tokio::test]
async fn every_register_of_every_kind_decodes_to_the_model_value() {
    for kind in DeviceKind::ALL {
        let (dev, server) = start(kind, 3).await;
        dev.advance(Duration::from_secs(600));
        let mut ctx = connect(server.addr()).await;
        let specs = dev.lock().map().registers.clone();
        for spec in &specs {
            let got = bounded(read_spec(&mut ctx, spec)).await.unwrap().unwrap();
            let truth = dev.lock().reported(&spec.name).unwrap();
            assert!(
                (got - truth).abs() <= resolution(spec),
                "{kind} {}: read {got}, model {truth}",
                spec.name
            );
        }
        // Outside the map: a Modbus exception, not a transport error.
        let r = bounded(ctx.read_input_registers(500, 1)).await.unwrap();
        assert_eq!(r, Err(ExceptionCode::IllegalDataAddress), "{kind}");
        let r = bounded(ctx.read_coils(40, 2)).await.unwrap();
        assert_eq!(r, Err(ExceptionCode::IllegalDataAddress), "{kind}");
        drop(ctx);
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn coil_and_holding_writes_drive_the_physics() {
    let (room, server) = start(DeviceKind::ColdRoom, 5).await;
    let mut ctx = connect(server.addr()).await;
    let t0 = bounded(read_named(&mut ctx, &room, "temperature"))
        .await
        .unwrap()
        .unwrap();
    bounded(ctx.write_single_coil(0, true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        bounded(read_named(&mut ctx, &room, "compressor"))
            .await
            .unwrap(),
        Ok(1.0)
    );
    room.advance(Duration::from_secs(3600));
    let cooled = bounded(read_named(&mut ctx, &room, "temperature"))
        .await
        .unwrap()
        .unwrap();
    assert!(cooled < t0 - 3.0, "compressor on: {t0} -> {cooled}");
    bounded(ctx.write_single_coil(0, false))
        .await
        .unwrap()
        .unwrap();
    room.advance(Duration::from_secs(3 * 3600));
    let warmed = bounded(read_named(&mut ctx, &room, "temperature"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        warmed > cooled + 3.0,
        "compressor off: {cooled} -> {warmed}"
    );
    // A colder evaporator (holding register, i16 x0.1) cools faster.
    bounded(ctx.write_single_register(0, (-300i16) as u16))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(room.signal("evaporator_setpoint"), Some(-30.0));
    // Out of range: refused with IllegalDataValue, nothing changes.
    let r = bounded(ctx.write_single_register(0, (-900i16) as u16))
        .await
        .unwrap();
    assert_eq!(r, Err(ExceptionCode::IllegalDataValue));
    assert_eq!(room.signal("evaporator_setpoint"), Some(-30.0));
    // An unmapped coil is an illegal address.
    let r = bounded(ctx.write_single_coil(7, true)).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::IllegalDataAddress));
    drop(ctx);
    server.stop().await.unwrap();

    let (pump, server) = start(DeviceKind::Pump, 5).await;
    let mut ctx = connect(server.addr()).await;
    bounded(ctx.write_single_coil(0, true))
        .await
        .unwrap()
        .unwrap();
    pump.advance(Duration::from_secs(60));
    let full = bounded(read_named(&mut ctx, &pump, "pressure"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        bounded(read_named(&mut ctx, &pump, "running"))
            .await
            .unwrap(),
        Ok(1.0)
    );
    bounded(ctx.write_multiple_registers(0, &[40]))
        .await
        .unwrap()
        .unwrap();
    pump.advance(Duration::from_secs(60));
    let slow = bounded(read_named(&mut ctx, &pump, "pressure"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        full > 2.0 && slow < full - 1.0,
        "speed 100% {full} bar, 40% {slow} bar"
    );
    drop(ctx);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn stuck_sensor_reads_frozen_while_the_room_warms() {
    let (room, server) = start(DeviceKind::ColdRoom, 7).await;
    let mut ctx = connect(server.addr()).await;
    let before = bounded(read_named(&mut ctx, &room, "temperature"))
        .await
        .unwrap()
        .unwrap();
    room.inject(Fault::Stuck {
        signal: Some("temperature".into()),
    });
    room.advance(Duration::from_secs(4 * 3600));
    for _ in 0..3 {
        let v = bounded(read_named(&mut ctx, &room, "temperature"))
            .await
            .unwrap()
            .unwrap();
        assert!(
            (v - before).abs() <= 0.05 + 1e-9,
            "stuck value moved: {before} -> {v}"
        );
    }
    room.clear_faults();
    let after = bounded(read_named(&mut ctx, &room, "temperature"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        after > before + 3.0,
        "unstuck value {after} should show the warming"
    );
    drop(ctx);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn noise_spikes_are_visible_and_seeded() {
    let (meter, server) = start(DeviceKind::Meter, 9).await;
    let mut ctx = connect(server.addr()).await;
    let truth = meter.signal("voltage").unwrap();
    meter.inject(Fault::Spikes {
        signal: Some("voltage".into()),
        probability: 1.0,
        magnitude: 50.0,
    });
    let mut signs = (0, 0);
    for _ in 0..20 {
        let v = bounded(read_named(&mut ctx, &meter, "voltage"))
            .await
            .unwrap()
            .unwrap();
        let off = v - truth;
        assert!(
            (off.abs() - 50.0).abs() <= 0.06,
            "spike of {off} V, expected +-50"
        );
        if off > 0.0 {
            signs.0 += 1
        } else {
            signs.1 += 1
        }
    }
    assert!(signs.0 > 0 && signs.1 > 0, "spikes go both ways: {signs:?}");
    // Other registers are untouched.
    let p = bounded(read_named(&mut ctx, &meter, "power"))
        .await
        .unwrap()
        .unwrap();
    assert!((p - meter.signal("power").unwrap()).abs() < 1e-3);
    drop(ctx);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn slow_answers_time_out_a_short_client_deadline() {
    let (pump, server) = start(DeviceKind::Pump, 1).await;
    pump.inject(Fault::Slow {
        delay: Duration::from_millis(400),
    });
    let mut ctx = connect(server.addr()).await;
    let r = tokio::time::timeout(Duration::from_millis(100), ctx.read_input_registers(0, 1)).await;
    assert!(
        r.is_err(),
        "a 400 ms answer must miss a 100 ms deadline: {r:?}"
    );
    // A patient client gets the answer, no earlier than the delay.
    let mut ctx = connect(server.addr()).await;
    let t = Instant::now();
    let r = bounded(ctx.read_input_registers(0, 1)).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    drop(ctx);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn missing_answers_leave_the_client_waiting_then_recover() {
    let (room, server) = start(DeviceKind::ColdRoom, 1).await;
    room.inject(Fault::Missing);
    let mut ctx = connect(server.addr()).await;
    let r = tokio::time::timeout(Duration::from_millis(300), ctx.read_input_registers(0, 1)).await;
    assert!(r.is_err(), "no answer expected, got {r:?}");
    room.clear_faults();
    let mut ctx = connect(server.addr()).await;
    let r = bounded(ctx.read_input_registers(0, 1)).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    drop(ctx);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn injected_exceptions_reach_the_client() {
    let (meter, server) = start(DeviceKind::Meter, 1).await;
    let mut ctx = connect(server.addr()).await;
    meter.inject(Fault::Exception(ExceptionCode::ServerDeviceFailure));
    let r = bounded(ctx.read_input_registers(0, 2)).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::ServerDeviceFailure));
    meter.inject(Fault::Exception(ExceptionCode::ServerDeviceBusy));
    let r = bounded(ctx.read_input_registers(0, 2)).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::ServerDeviceBusy));
    meter.clear_faults();
    let r = bounded(ctx.read_input_registers(0, 2)).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    drop(ctx);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn dropped_connections_are_a_transport_error() {
    let (pump, server) = start(DeviceKind::Pump, 1).await;
    let mut ctx = connect(server.addr()).await;
    assert!(
        bounded(ctx.read_input_registers(0, 1))
            .await
            .unwrap()
            .is_ok()
    );
    pump.inject(Fault::DropConnection);
    let r = bounded(ctx.read_input_registers(0, 1)).await;
    assert!(
        r.is_err(),
        "the server closed the socket: transport error expected, got {r:?}"
    );
    // The same dead connection stays dead after the fault is cleared ...
    pump.clear_faults();
    let r = bounded(ctx.read_input_registers(0, 1)).await;
    assert!(r.is_err(), "{r:?}");
    // ... and a new one works.
    let mut ctx = connect(server.addr()).await;
    assert!(
        bounded(ctx.read_input_registers(0, 1))
            .await
            .unwrap()
            .is_ok()
    );
    drop(ctx);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn stop_closes_the_listener_and_open_connections() {
    let (_room, server) = start(DeviceKind::ColdRoom, 1).await;
    let addr = server.addr();
    let mut ctx = connect(addr).await;
    assert!(
        bounded(ctx.read_input_registers(0, 1))
            .await
            .unwrap()
            .is_ok()
    );
    server.stop().await.unwrap();
    let r = bounded(ctx.read_input_registers(0, 1)).await;
    assert!(r.is_err(), "open connection must be closed by stop: {r:?}");
    let c = bounded(tokio::net::TcpStream::connect(addr)).await;
    assert!(c.is_err(), "listener must be closed by stop");
}

/// The whole control path over Modbus: a bang-bang thermostat in the test
/// reads the temperature register and writes the compressor coil every 30
/// simulated seconds for a simulated day (the test steps the clock), and
/// the room stays in its band. The same room left alone warms up.
#[tokio::test]
async fn bang_bang_over_modbus_holds_a_day_and_the_room_warms_without_it() {
    let (room, server) = start(DeviceKind::ColdRoom, 21).await;
    let mut ctx = connect(server.addr()).await;
    let temp = room.lock().map().get("temperature").unwrap().clone();
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    let mut switches = 0;
    let mut on = false;
    for _ in 0..(86_400 / 30) {
        let t = bounded(read_spec(&mut ctx, &temp)).await.unwrap().unwrap();
        lo = lo.min(t);
        hi = hi.max(t);
        let want = if t > 5.0 {
            true
        } else if t < 3.0 {
            false
        } else {
            on
        };
        if want != on {
            bounded(ctx.write_single_coil(0, want))
                .await
                .unwrap()
                .unwrap();
            on = want;
            switches += 1;
        }
        room.advance(Duration::from_secs(30));
    }
    assert!(
        lo > 2.0 && hi < 7.0,
        "band over the day: {lo:.1}..{hi:.1} C"
    );
    assert!(switches > 20, "only {switches} switches in a day");
    let starts = bounded(read_named(&mut ctx, &room, "compressor_starts"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        (starts - f64::from(switches / 2)).abs() <= 1.0,
        "{starts} starts for {switches} switches"
    );

    // Left alone (compressor off) for a day, it drifts toward ambient.
    bounded(ctx.write_single_coil(0, false))
        .await
        .unwrap()
        .unwrap();
    room.advance(Duration::from_secs(86_400));
    let t = bounded(read_spec(&mut ctx, &temp)).await.unwrap().unwrap();
    assert!(t > 14.0, "no cooling for a day, still {t:.1} C");
    drop(ctx);
    server.stop().await.unwrap();
}

/// The clock driver at a high time scale moves a served device: at 36 000x
/// (ten simulated hours per real second) a room without cooling visibly
/// warms within a couple of real seconds. Waits on the condition, bounded.
#[tokio::test]
async fn clock_driver_at_high_time_scale_warms_a_served_room() {
    let (room, server) = start(DeviceKind::ColdRoom, 4).await;
    let mut ctx = connect(server.addr()).await;
    let t0 = bounded(read_named(&mut ctx, &room, "temperature"))
        .await
        .unwrap()
        .unwrap();
    let driver =
        testbed::clock::ClockDriver::spawn(vec![room.clone()], 36_000.0, Duration::from_millis(10))
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while room.elapsed_s() < 4.0 * 3600.0 {
        assert!(
            Instant::now() < deadline,
            "driver too slow: {} s simulated",
            room.elapsed_s()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    driver.stop().await;
    let t1 = bounded(read_named(&mut ctx, &room, "temperature"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        t1 > t0 + 3.0,
        "{t0:.1} -> {t1:.1} C after {} s",
        room.elapsed_s()
    );
    drop(ctx);
    server.stop().await.unwrap();
}
