//! Bench: control-loop period jitter (alone, with many loops, with Modbus
//! polling load), the cost of one loop decision, and the write round trip
//! through a device task. Prints a table of medians.
//!
//! `cargo run --release -p edge-node --bin edge-bench-loops -- --seconds 3`

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use edge_node::clock::{Clock, SystemClock};
use edge_node::control::{Actuator, ControlLoop, LoopOptions, LoopParams, SensorInput, spawn_loop};
use edge_node::modbus::{
    AdapterOptions, DeviceEvent, Latest, LatestValues, WriteError, WriteReply, spawn_device,
};
use schemas::config::{DeviceConfig, FailSafe, LoopConfig};
use schemas::device::Reading;
use schemas::ids::DeviceId;
use schemas::metrics::Unit;
use schemas::registers::{RegisterFunction, RegisterSpec, RegisterType};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

#[derive(Parser)]
#[command(about = "control loop and device adapter timing")]
struct Args {
    /// Seconds each jitter scenario runs.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Loop period in milliseconds.
    #[arg(long, default_value_t = 10)]
    period_ms: u64,
    /// Loops in the "many loops" scenarios.
    #[arg(long, default_value_t = 100)]
    loops: usize,
    /// Polled devices in the "with polling" scenario.
    #[arg(long, default_value_t = 20)]
    devices: usize,
}

/// A device that answers every read with zeros and accepts every write.
#[derive(Clone)]
struct Zeros;

impl tokio_modbus::server::Service for Zeros {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let r = match req {
            Request::ReadHoldingRegisters(_, n) => {
                Ok(Response::ReadHoldingRegisters(vec![0; usize::from(n)]))
            }
            Request::ReadCoils(_, n) => Ok(Response::ReadCoils(vec![false; usize::from(n)])),
            Request::WriteSingleCoil(a, v) => Ok(Response::WriteSingleCoil(a, v)),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(r))
    }
}

async fn serve_zeros() -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind bench device")?;
    let addr = listener.local_addr().context("bench device address")?;
    let server = Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = |stream, socket_addr| async move {
            accept_tcp_connection(stream, socket_addr, |_| Ok(Some(Zeros)))
        };
        if let Err(e) = server.serve(&on_connected, |_| {}).await {
            eprintln!("bench device stopped: {e:#}");
        }
    });
    Ok((addr, task))
}

fn device_config(id: &str, addr: SocketAddr, poll_ms: u64) -> anyhow::Result<DeviceConfig> {
    let reg = |name: &str, function, data_type| RegisterSpec {
        name: name.into(),
        unit_id: 1,
        function,
        address: 0,
        data_type,
        word_order: Default::default(),
        byte_order: Default::default(),
        scale: 1.0,
        offset: 0.0,
        unit: Unit::None,
        poll_ms,
    };
    Ok(DeviceConfig {
        id: DeviceId::new(id)?,
        device_type: "bench".into(),
        addr,
        timeout_ms: 1000,
        tags: vec![],
        registers: vec![
            reg("temp", RegisterFunction::Holding, RegisterType::U16),
            reg("out", RegisterFunction::Coil, RegisterType::Bool),
        ],
    })
}

/// Confirms every actuation at once.
struct Nop;

impl Actuator for Nop {
    fn try_actuate(&self, _on: bool) -> Result<WriteReply, WriteError> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(()));
        Ok(rx)
    }
}

fn median(v: &mut [u64]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

struct Row {
    scenario: String,
    loops: usize,
    ticks: u64,
    p50: u64,
    p99: u64,
    max: u64,
}

/// Run `n` loops for `secs` while `values` is fed; medians across loops of
/// each loop's p50/p99, and the largest max.
async fn jitter_scenario(
    name: &str,
    n: usize,
    period_ms: u64,
    secs: u64,
    values: LatestValues,
    sensor_device: &DeviceId,
) -> anyhow::Result<Row> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (ev_tx, mut ev_rx) = mpsc::channel(100_000);
    let drain = tokio::spawn(async move { while ev_rx.recv().await.is_some() {} });
    let mut runners = Vec::new();
    let mut params = Vec::new();
    for i in 0..n {
        let cfg = LoopConfig::Thermostat {
            name: format!("loop-{i}"),
            device: sensor_device.clone(),
            sensor: "temp".into(),
            output: "out".into(),
            period_ms,
            fail_safe: FailSafe::Hold,
            default_setpoint: 4.0,
            default_hysteresis: 2.0,
            min_on_s: 0,
            min_off_s: 0,
        };
        let (tx, rx) = watch::channel(LoopParams::from_config(&cfg));
        params.push(tx);
        runners.push(spawn_loop(
            &cfg,
            rx,
            values.clone(),
            Arc::new(Nop),
            clock.clone(),
            ev_tx.clone(),
            LoopOptions {
                stale_periods: 1000,
                jitter_window: 100_000,
            },
        )?);
    }
    drop(ev_tx);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (mut p50s, mut p99s, mut max, mut ticks) = (Vec::new(), Vec::new(), 0, 0);
    for r in runners {
        if let Some(s) = r.jitter() {
            p50s.push(s.p50_us);
            p99s.push(s.p99_us);
            max = max.max(s.max_us);
            ticks += s.count;
        }
        r.stop().await;
    }
    drop(params);
    drain.await.context("event drain")?;
    Ok(Row {
        scenario: name.to_string(),
        loops: n,
        ticks,
        p50: median(&mut p50s),
        p99: median(&mut p99s),
        max,
    })
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("edge-bench-loops: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let sensor_dev = DeviceId::new("bench-sensor")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    // A sensor value that stays fresh.
    let values = LatestValues::new();
    let feed = {
        let values = values.clone();
        let dev = sensor_dev.clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(10));
            let mut x = 0u64;
            loop {
                t.tick().await;
                x += 1;
                let value = if (x / 100).is_multiple_of(2) {
                    2.0
                } else {
                    6.0
                };
                values.set(
                    &dev,
                    "temp",
                    Latest {
                        reading: Reading {
                            value,
                            ts: clock.now(),
                        },
                        received: clock.monotonic(),
                    },
                );
            }
        })
    };

    let mut rows = Vec::new();
    rows.push(
        jitter_scenario(
            "one loop",
            1,
            args.period_ms,
            args.seconds,
            values.clone(),
            &sensor_dev,
        )
        .await?,
    );
    rows.push(
        jitter_scenario(
            "many loops",
            args.loops,
            args.period_ms,
            args.seconds,
            values.clone(),
            &sensor_dev,
        )
        .await?,
    );

    // Polling load: devices on loopback polled every 10 ms.
    let (dev_tx, mut dev_rx) = mpsc::channel::<DeviceEvent>(100_000);
    let drain = tokio::spawn(async move {
        let mut n = 0u64;
        while dev_rx.recv().await.is_some() {
            n += 1;
        }
        n
    });
    let mut servers = Vec::new();
    let mut devices = Vec::new();
    for i in 0..args.devices {
        let (addr, server) = serve_zeros().await?;
        servers.push(server);
        devices.push(spawn_device(
            device_config(&format!("load-{i}"), addr, 10)?,
            AdapterOptions::default(),
            clock.clone(),
            LatestValues::new(),
            dev_tx.clone(),
        )?);
    }
    let row = jitter_scenario(
        &format!("many loops + {} devices polled at 10 ms", args.devices),
        args.loops,
        args.period_ms,
        args.seconds,
        values.clone(),
        &sensor_dev,
    )
    .await?;
    rows.push(row);

    // Write round trip through a device task (same loaded runtime).
    let handle = devices
        .first()
        .map(|d| d.handle())
        .context("at least one device is needed (--devices)")?;
    let mut rtts = Vec::new();
    for i in 0..1000u32 {
        let t0 = Instant::now();
        handle.write_coil("out", i.is_multiple_of(2)).await?;
        rtts.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    let write_rtt = median(&mut rtts);
    for d in devices {
        d.stop().await;
    }
    drop(dev_tx);
    let samples = drain.await.context("device drain")?;
    for s in servers {
        s.abort();
    }
    feed.abort();

    // Cost of one decision (pure step), median of 21 runs of 100k steps.
    let cfg = LoopConfig::Thermostat {
        name: "step".into(),
        device: sensor_dev.clone(),
        sensor: "temp".into(),
        output: "out".into(),
        period_ms: 1000,
        fail_safe: FailSafe::Off,
        default_setpoint: 4.0,
        default_hysteresis: 2.0,
        min_on_s: 0,
        min_off_s: 0,
    };
    let params = LoopParams::from_config(&cfg);
    let mut runs = Vec::new();
    let mut flips = 0u64;
    for _ in 0..21 {
        let mut ctl = ControlLoop::new(&cfg, Duration::from_secs(3));
        let now = Instant::now();
        let at = clock.now();
        let t0 = Instant::now();
        for i in 0..100_000u64 {
            let value = if (i / 50).is_multiple_of(2) { 2.0 } else { 6.0 };
            let d = ctl.step(
                now,
                at,
                Some(SensorInput {
                    value,
                    age: Duration::ZERO,
                }),
                &params,
            );
            flips += u64::from(d.event.is_some());
        }
        runs.push(u64::try_from(t0.elapsed().as_nanos() / 100_000).unwrap_or(u64::MAX));
    }
    let step_ns = median(&mut runs);

    println!(
        "control loop jitter (lateness of each tick), period {} ms, {} s per scenario",
        args.period_ms, args.seconds
    );
    println!(
        "| scenario | loops | ticks | p50 us (median of loops) | p99 us (median of loops) | max us |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.scenario, r.loops, r.ticks, r.p50, r.p99, r.max
        );
    }
    println!();
    println!("| operation | median |");
    println!("|---|---|");
    println!("| ControlLoop::step (thermostat) | {step_ns} ns |");
    println!("| write_coil round trip via device task, loopback | {write_rtt} us |");
    println!("| samples received from polled devices | {samples} |");
    if flips == 0 {
        println!("warning: the step bench made no decisions; the figure is meaningless");
    }
    Ok(())
}
