//! Modbus adapter against in-process tokio-modbus TCP servers on 127.0.0.1:
//! decoding over the wire, writes, bad devices that must not stall good
//! ones, and reconnects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_node::clock::{Clock, SystemClock};
use edge_node::modbus::{
    AdapterOptions, DeviceEvent, DeviceRunner, LatestValues, WriteError, spawn_device,
};
use schemas::config::DeviceConfig;
use schemas::device::HealthStatus;
use schemas::ids::DeviceId;
use schemas::metrics::Unit;
use schemas::registers::{ByteOrder, RegisterFunction, RegisterSpec, RegisterType, WordOrder};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

// ------------------------------------------------------------ test server

const NORMAL: u8 = 0;
const SILENT: u8 = 1;
const EXCEPTION: u8 = 2;

#[derive(Default)]
struct Bank {
    holding: HashMap<u16, u16>,
    input: HashMap<u16, u16>,
    coils: HashMap<u16, bool>,
    discrete: HashMap<u16, bool>,
}

/// A simulated device: a register bank and a behaviour mode.
#[derive(Clone, Default)]
struct Sim {
    bank: Arc<Mutex<Bank>>,
    mode: Arc<AtomicU8>,
    requests: Arc<AtomicUsize>,
    /// Every request received, in order.
    seen: Arc<Mutex<Vec<Request<'static>>>>,
}

fn read<T: Copy>(m: &HashMap<u16, T>, a: u16, n: u16) -> Result<Vec<T>, ExceptionCode> {
    (a..a.checked_add(n).ok_or(ExceptionCode::IllegalDataAddress)?)
        .map(|i| m.get(&i).copied().ok_or(ExceptionCode::IllegalDataAddress))
        .collect()
}

impl Sim {
    fn handle(&self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        let mut b = self.bank.lock().unwrap();
        match req {
            Request::ReadHoldingRegisters(a, n) => {
                Ok(Response::ReadHoldingRegisters(read(&b.holding, a, n)?))
            }
            Request::ReadInputRegisters(a, n) => {
                Ok(Response::ReadInputRegisters(read(&b.input, a, n)?))
            }
            Request::ReadCoils(a, n) => Ok(Response::ReadCoils(read(&b.coils, a, n)?)),
            Request::ReadDiscreteInputs(a, n) => {
                Ok(Response::ReadDiscreteInputs(read(&b.discrete, a, n)?))
            }
            Request::WriteSingleCoil(a, v) => {
                if !b.coils.contains_key(&a) {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                b.coils.insert(a, v);
                Ok(Response::WriteSingleCoil(a, v))
            }
            Request::WriteSingleRegister(a, v) => {
                if !b.holding.contains_key(&a) {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                b.holding.insert(a, v);
                Ok(Response::WriteSingleRegister(a, v))
            }
            Request::WriteMultipleRegisters(a, ws) => {
                for (i, w) in ws.iter().enumerate() {
                    b.holding.insert(a + i as u16, *w);
                }
                Ok(Response::WriteMultipleRegisters(a, ws.len() as u16))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

impl tokio_modbus::server::Service for Sim {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.seen.lock().unwrap().push(req.clone());
        match self.mode.load(Ordering::Relaxed) {
            SILENT => Box::pin(std::future::pending()),
            EXCEPTION => Box::pin(std::future::ready(Err(ExceptionCode::ServerDeviceFailure))),
            _ => Box::pin(std::future::ready(self.handle(req))),
        }
    }
}

/// Serve `sim` on `addr` (port 0 picks one). Aborting the returned task
/// closes the listener and every connection.
async fn serve(sim: Sim, addr: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let server = Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = move |stream, socket_addr| {
            let sim = sim.clone();
            async move { accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(sim.clone()))) }
        };
        let _ = server.serve(&on_connected, |_err| {}).await;
    });
    (local, task)
}

async fn stop_server(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

// ------------------------------------------------------------ helpers

fn reg(name: &str, function: RegisterFunction, address: u16, t: RegisterType) -> RegisterSpec {
    RegisterSpec {
        name: name.into(),
        unit_id: 1,
        function,
        address,
        data_type: t,
        word_order: WordOrder::BigEndian,
        byte_order: ByteOrder::BigEndian,
        scale: 1.0,
        offset: 0.0,
        unit: Unit::None,
        poll_ms: 50,
    }
}

fn device(
    id: &str,
    addr: SocketAddr,
    timeout_ms: u64,
    registers: Vec<RegisterSpec>,
) -> DeviceConfig {
    DeviceConfig {
        id: DeviceId::new(id).unwrap(),
        device_type: "test".into(),
        addr,
        timeout_ms,
        tags: vec![],
        registers,
    }
}

fn fast_opts() -> AdapterOptions {
    AdapterOptions {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        unreachable_after: 2,
        command_queue: 8,
    }
}

/// Every event with its arrival time, collected by a task.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(Instant, DeviceEvent)>>>);

impl Log {
    fn start(mut rx: mpsc::Receiver<DeviceEvent>) -> (Log, JoinHandle<()>) {
        let log = Log::default();
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                l.0.lock().unwrap().push((Instant::now(), e));
            }
        });
        (log, task)
    }

    fn samples(&self, dev: &str, metric: &str) -> Vec<(Instant, f64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, e)| match e {
                DeviceEvent::Sample(s) if s.device.as_str() == dev && s.metric == metric => {
                    Some((*t, s.value))
                }
                _ => None,
            })
            .collect()
    }

    fn statuses(&self, dev: &str) -> Vec<HealthStatus> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, e)| match e {
                DeviceEvent::Health { device, health } if device.as_str() == dev => {
                    Some(health.status)
                }
                _ => None,
            })
            .collect()
    }
}

/// Poll `cond` every 10 ms until it holds or `secs` pass.
async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start(cfg: DeviceConfig, opts: AdapterOptions, tx: &mpsc::Sender<DeviceEvent>) -> DeviceRunner {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    spawn_device(cfg, opts, clock, LatestValues::new(), tx.clone()).unwrap()
}

// ------------------------------------------------------------ tests

#[tokio::test]
async fn decodes_every_register_type_and_word_and_byte_order_over_the_wire() {
    let sim = Sim::default();
    let mut regs = Vec::new();
    let mut expect: Vec<(&str, f64)> = Vec::new();
    {
        let mut b = sim.bank.lock().unwrap();
        // Words written by hand, not by RegisterSpec::encode, so the test
        // does not share a bug with the decoder.
        b.holding.insert(0, 1234); // u16
        regs.push(reg("u16", RegisterFunction::Holding, 0, RegisterType::U16));
        expect.push(("u16", 1234.0));
        b.holding.insert(1, 0xFFFE); // i16 -2
        regs.push(reg("i16", RegisterFunction::Holding, 1, RegisterType::I16));
        expect.push(("i16", -2.0));
        b.holding.insert(2, 0x0001); // u32 65536+3, big-endian words
        b.holding.insert(3, 0x0003);
        regs.push(reg("u32", RegisterFunction::Holding, 2, RegisterType::U32));
        expect.push(("u32", 65_539.0));
        b.holding.insert(4, 0xFFFF); // i32 -2 little-endian words: lo first
        b.holding.insert(5, 0xFFFF);
        b.holding.insert(4, 0xFFFE);
        let mut r = reg("i32_cdab", RegisterFunction::Holding, 4, RegisterType::I32);
        r.word_order = WordOrder::LittleEndian;
        regs.push(r);
        expect.push(("i32_cdab", -2.0));
        b.holding.insert(6, 0x3FC0); // f32 1.5 ABCD
        b.holding.insert(7, 0x0000);
        regs.push(reg(
            "f32_abcd",
            RegisterFunction::Holding,
            6,
            RegisterType::F32,
        ));
        expect.push(("f32_abcd", 1.5));
        b.holding.insert(8, 0x0000); // f32 1.5 CDAB
        b.holding.insert(9, 0x3FC0);
        let mut r = reg("f32_cdab", RegisterFunction::Holding, 8, RegisterType::F32);
        r.word_order = WordOrder::LittleEndian;
        regs.push(r);
        expect.push(("f32_cdab", 1.5));
        b.holding.insert(10, 0xC03F); // f32 1.5 BADC
        b.holding.insert(11, 0x0000);
        let mut r = reg("f32_badc", RegisterFunction::Holding, 10, RegisterType::F32);
        r.byte_order = ByteOrder::LittleEndian;
        regs.push(r);
        expect.push(("f32_badc", 1.5));
        b.holding.insert(12, 0x0000); // f32 -2.5 (0xC020_0000) DCBA
        b.holding.insert(13, 0x20C0);
        let mut r = reg("f32_dcba", RegisterFunction::Holding, 12, RegisterType::F32);
        r.byte_order = ByteOrder::LittleEndian;
        r.word_order = WordOrder::LittleEndian;
        regs.push(r);
        expect.push(("f32_dcba", -2.5));
        b.holding.insert(14, 0x3412); // u16 0x1234 byte-swapped
        let mut r = reg("u16_ba", RegisterFunction::Holding, 14, RegisterType::U16);
        r.byte_order = ByteOrder::LittleEndian;
        regs.push(r);
        expect.push(("u16_ba", 4660.0));
        // A gap at 15..20, then a scaled temperature in Fahrenheit tenths:
        // raw 320 * 0.1 + 0 = 32.0 F = 0 C after normalisation.
        b.holding.insert(20, 320);
        let mut r = reg("temp_f", RegisterFunction::Holding, 20, RegisterType::I16);
        r.scale = 0.1;
        r.unit = Unit::Fahrenheit;
        regs.push(r);
        expect.push(("temp_f", 0.0));
        // Input register with scale and offset: 625 * 0.1 - 40 = 22.5.
        b.input.insert(0, 625);
        let mut r = reg(
            "input_scaled",
            RegisterFunction::Input,
            0,
            RegisterType::U16,
        );
        r.scale = 0.1;
        r.offset = -40.0;
        regs.push(r);
        expect.push(("input_scaled", 22.5));
        b.coils.insert(0, true);
        regs.push(reg("coil", RegisterFunction::Coil, 0, RegisterType::Bool));
        expect.push(("coil", 1.0));
        b.discrete.insert(3, false);
        regs.push(reg(
            "discrete",
            RegisterFunction::Discrete,
            3,
            RegisterType::Bool,
        ));
        expect.push(("discrete", 0.0));
        // Another unit id behind the same connection (a gateway).
        b.holding.insert(100, 7);
        let mut r = reg("unit2", RegisterFunction::Holding, 100, RegisterType::U16);
        r.unit_id = 2;
        regs.push(r);
        expect.push(("unit2", 7.0));
    }
    let (addr, server) = serve(sim.clone(), loopback0()).await;
    let (tx, rx) = mpsc::channel(1024);
    let (log, log_task) = Log::start(rx);
    let values = LatestValues::new();
    let dev = spawn_device(
        device("wire", addr, 1000, regs),
        fast_opts(),
        Arc::new(SystemClock),
        values.clone(),
        tx.clone(),
    )
    .unwrap();
    wait_for("a sample of every register", 10, || {
        expect
            .iter()
            .all(|(n, _)| !log.samples("wire", n).is_empty())
    })
    .await;
    for (name, want) in &expect {
        let got = log.samples("wire", name)[0].1;
        assert!((got - want).abs() < 1e-6, "{name}: got {got}, want {want}");
        let latest = values.get(&DeviceId::new("wire").unwrap(), name).unwrap();
        assert!(
            (latest.reading.value - want).abs() < 1e-6,
            "{name} in LatestValues"
        );
    }
    assert_eq!(dev.handle().health().status, HealthStatus::Ok);
    assert!(log.statuses("wire").contains(&HealthStatus::Ok));
    // Contiguous holding registers 0..15 are read in one request; the gap
    // at 15..20 is never read; each table and unit gets its own request.
    let seen = sim.seen.lock().unwrap().clone();
    assert!(
        seen.contains(&Request::ReadHoldingRegisters(0, 15)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&Request::ReadHoldingRegisters(20, 1)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&Request::ReadInputRegisters(0, 1)),
        "{seen:?}"
    );
    assert!(seen.contains(&Request::ReadCoils(0, 1)), "{seen:?}");
    assert!(
        seen.contains(&Request::ReadDiscreteInputs(3, 1)),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|r| matches!(
            r,
            Request::ReadHoldingRegisters(0, 15)
                | Request::ReadHoldingRegisters(20, 1)
                | Request::ReadHoldingRegisters(100, 1)
                | Request::ReadInputRegisters(0, 1)
                | Request::ReadCoils(0, 1)
                | Request::ReadDiscreteInputs(3, 1)
        )),
        "unexpected request in {seen:?}"
    );
    dev.stop().await;
    drop(tx);
    log_task.await.unwrap();
    stop_server(server).await;
}

#[tokio::test]
async fn writes_reach_the_device_and_bad_writes_are_refused_clearly() {
    let sim = Sim::default();
    {
        let mut b = sim.bank.lock().unwrap();
        b.coils.insert(0, false);
        b.holding.insert(0, 0);
        b.holding.insert(1, 0);
        b.holding.insert(2, 0);
        b.input.insert(0, 0);
    }
    let mut setpoint = reg("setpoint", RegisterFunction::Holding, 0, RegisterType::I16);
    setpoint.scale = 0.1;
    let regs = vec![
        reg("pump", RegisterFunction::Coil, 0, RegisterType::Bool),
        setpoint,
        reg("total", RegisterFunction::Holding, 1, RegisterType::U32),
        reg("pressure", RegisterFunction::Input, 0, RegisterType::U16),
    ];
    let (addr, server) = serve(sim.clone(), loopback0()).await;
    let (tx, rx) = mpsc::channel(1024);
    let (_log, log_task) = Log::start(rx);
    let dev = start(device("w", addr, 1000, regs), fast_opts(), &tx);
    let h = dev.handle();

    h.write_coil("pump", true).await.unwrap();
    assert!(sim.bank.lock().unwrap().coils[&0]);
    h.write_register("setpoint", -18.5).await.unwrap();
    assert_eq!(sim.bank.lock().unwrap().holding[&0], (-185i16) as u16);
    h.write_register("total", 70_000.0).await.unwrap();
    {
        let b = sim.bank.lock().unwrap();
        assert_eq!((b.holding[&1], b.holding[&2]), (1, 4_464));
    }
    // A non-blocking write delivers its outcome on the receiver.
    let reply = h.try_write_coil("pump", false).unwrap();
    reply.await.unwrap().unwrap();
    assert!(!sim.bank.lock().unwrap().coils[&0]);

    let e = h.write_coil("pmup", true).await.unwrap_err();
    assert!(matches!(e, WriteError::UnknownRegister { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("\"pmup\"") && msg.contains("pump, setpoint"),
        "{msg}"
    );
    let e = h.write_register("pump", 1.0).await.unwrap_err();
    assert!(e.to_string().contains("write_coil"), "{e}");
    let e = h.write_register("pressure", 1.0).await.unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = h.write_coil("setpoint", true).await.unwrap_err();
    assert!(matches!(e, WriteError::WrongKind { .. }), "{e:?}");
    let e = h.write_register("setpoint", 5000.0).await.unwrap_err();
    assert!(matches!(e, WriteError::OutOfRange { .. }), "{e:?}");
    assert!(e.to_string().contains("-3276.8..=3276.7"), "{e}");

    // An exception from the device comes back as such.
    sim.mode.store(EXCEPTION, Ordering::Relaxed);
    let e = h.write_coil("pump", true).await.unwrap_err();
    assert!(
        matches!(&e, WriteError::Exception { code, .. } if code.contains("ServerDeviceFailure")),
        "{e:?}"
    );
    sim.mode.store(NORMAL, Ordering::Relaxed);

    // While the device is away, writes fail at once instead of waiting.
    stop_server(server).await;
    wait_for("device to notice the server is gone", 10, || {
        h.health().status == HealthStatus::Unreachable
    })
    .await;
    let t0 = Instant::now();
    let e = h.write_coil("pump", true).await.unwrap_err();
    assert!(matches!(e, WriteError::NotConnected { .. }), "{e:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );

    dev.stop().await;
    let e = h.write_coil("pump", true).await.unwrap_err();
    assert!(matches!(e, WriteError::Stopped { .. }), "{e:?}");
    drop(tx);
    log_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_devices_are_marked_and_never_stall_a_healthy_one() {
    let healthy = Sim::default();
    healthy.bank.lock().unwrap().holding.insert(0, 42);
    let silent = Sim::default();
    silent.mode.store(SILENT, Ordering::Relaxed);
    let failing = Sim::default();
    failing.mode.store(EXCEPTION, Ordering::Relaxed);
    let (a_ok, s1) = serve(healthy.clone(), loopback0()).await;
    let (a_silent, s2) = serve(silent.clone(), loopback0()).await;
    let (a_exc, s3) = serve(failing.clone(), loopback0()).await;
    // A port with nothing listening: connections are refused.
    let a_refused = {
        let l = TcpListener::bind(loopback0()).await.unwrap();
        l.local_addr().unwrap()
    };

    let (tx, rx) = mpsc::channel(4096);
    let (log, log_task) = Log::start(rx);
    let temp = || vec![reg("temp", RegisterFunction::Holding, 0, RegisterType::U16)];
    let silent_timeout_ms = 1000;
    let t0 = Instant::now();
    let devs = vec![
        start(device("healthy", a_ok, 1000, temp()), fast_opts(), &tx),
        start(
            device("silent", a_silent, silent_timeout_ms, temp()),
            fast_opts(),
            &tx,
        ),
        start(device("exceptions", a_exc, 1000, temp()), fast_opts(), &tx),
        start(device("refused", a_refused, 1000, temp()), fast_opts(), &tx),
    ];
    wait_for("every bad device to be marked", 20, || {
        let st = |d: &str| log.statuses(d).last().copied();
        st("silent") == Some(HealthStatus::Unreachable)
            && st("exceptions") == Some(HealthStatus::Degraded)
            && st("refused") == Some(HealthStatus::Unreachable)
    })
    .await;
    // Keep watching a bit past the silent device's second timeout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let span = t0.elapsed();

    assert!(
        log.statuses("silent").contains(&HealthStatus::Degraded),
        "one timeout degrades before unreachable: {:?}",
        log.statuses("silent")
    );
    assert!(
        devs[2]
            .handle()
            .health()
            .last_error
            .unwrap()
            .contains("ServerDeviceFailure")
    );
    assert!(
        devs[1]
            .handle()
            .health()
            .last_error
            .unwrap()
            .contains("no answer within")
    );
    assert!(
        devs[3]
            .handle()
            .health()
            .last_error
            .unwrap()
            .contains("connect")
    );

    let samples = log.samples("healthy", "temp");
    let expected = span.as_millis() as usize / 50;
    assert!(
        samples.len() * 2 >= expected,
        "healthy device: {} samples in {span:?}, expected about {expected}",
        samples.len()
    );
    let max_gap = samples.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    // Had the silent device's timeout blocked the healthy one, a gap would
    // be at least that timeout.
    assert!(
        max_gap < Duration::from_millis(silent_timeout_ms / 2),
        "healthy device stalled for {max_gap:?}"
    );
    assert_eq!(log.statuses("healthy"), vec![HealthStatus::Ok]);

    // Stopping never waits for a silent device's timeout.
    let mut devs = devs.into_iter();
    let first = devs.next().unwrap();
    let silent_dev = devs.next().unwrap();
    let t_stop = Instant::now();
    silent_dev.stop().await;
    assert!(
        t_stop.elapsed() < Duration::from_millis(silent_timeout_ms / 2),
        "stop took {:?}",
        t_stop.elapsed()
    );
    first.stop().await;
    for d in devs {
        d.stop().await;
    }
    drop(tx);
    log_task.await.unwrap();
    for s in [s1, s2, s3] {
        stop_server(s).await;
    }
}

#[tokio::test]
async fn reconnects_after_the_server_drops_the_connection() {
    let sim = Sim::default();
    sim.bank.lock().unwrap().holding.insert(0, 1);
    sim.bank.lock().unwrap().coils.insert(0, false);
    let (addr, server) = serve(sim.clone(), loopback0()).await;
    let (tx, rx) = mpsc::channel(4096);
    let (log, log_task) = Log::start(rx);
    let regs = vec![
        reg("level", RegisterFunction::Holding, 0, RegisterType::U16),
        reg("valve", RegisterFunction::Coil, 0, RegisterType::Bool),
    ];
    let dev = start(device("re", addr, 500, regs), fast_opts(), &tx);
    let h = dev.handle();
    wait_for("first sample", 10, || {
        !log.samples("re", "level").is_empty()
    })
    .await;
    assert_eq!(h.health().status, HealthStatus::Ok);

    // Drop every connection and stop listening.
    stop_server(server).await;
    wait_for("device marked unreachable", 10, || {
        h.health().status == HealthStatus::Unreachable
    })
    .await;

    // The device comes back on the same port with a new value.
    sim.bank.lock().unwrap().holding.insert(0, 2);
    let (_, server) = serve(sim.clone(), addr).await;
    wait_for("a sample after reconnecting", 10, || {
        log.samples("re", "level").iter().any(|(_, v)| *v == 2.0)
    })
    .await;
    wait_for("health back to ok", 10, || {
        h.health().status == HealthStatus::Ok
    })
    .await;
    let statuses = log.statuses("re");
    assert_eq!(statuses.first(), Some(&HealthStatus::Ok));
    assert!(
        statuses.contains(&HealthStatus::Unreachable),
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&HealthStatus::Ok));
    // Writes work on the new connection.
    h.write_coil("valve", true).await.unwrap();
    assert!(sim.bank.lock().unwrap().coils[&0]);

    dev.stop().await;
    drop(tx);
    log_task.await.unwrap();
    stop_server(server).await;
}

#[tokio::test]
async fn an_invalid_register_map_is_refused_with_the_field() {
    let mut r = reg("x", RegisterFunction::Coil, 0, RegisterType::U16);
    r.poll_ms = 100;
    let (tx, _rx) = mpsc::channel(1);
    let e = spawn_device(
        device("bad", loopback0(), 1000, vec![r]),
        fast_opts(),
        Arc::new(SystemClock),
        LatestValues::new(),
        tx,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("bad") && msg.contains("registers[0].type"),
        "{msg}"
    );
}
