//! Speed figures of the simulated devices, printed as a table of medians:
//! physics step cost, a simulated day, Modbus TCP round trips on loopback,
//! and the cost of starting many device servers.
//!
//! Run: `cargo bench -p testbed` (release profile).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use testbed::device::DeviceHandle;
use testbed::physics::DeviceKind;
use testbed::server::DeviceServer;
use tokio_modbus::client::Reader;
use tokio_modbus::prelude::Slave;

const RUNS: usize = 7;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn row(what: &str, value: f64, unit: &str) {
    println!("| {what:<60} | {value:>12.2} | {unit:<10} |");
}

fn physics() {
    for kind in DeviceKind::ALL {
        let samples = (0..RUNS)
            .map(|i| {
                let mut m = kind.model(i as u64, 0.0);
                let t = Instant::now();
                for _ in 0..100_000 {
                    m.step(1.0);
                }
                std::hint::black_box(m.signal("power"));
                t.elapsed().as_nanos() as f64 / 100_000.0
            })
            .collect();
        row(
            &format!("{kind}: one 1 s physics step"),
            median(samples),
            "ns",
        );
        let samples = (0..RUNS)
            .map(|i| {
                let mut m = kind.model(i as u64, 0.0);
                let t = Instant::now();
                m.step(86_400.0);
                std::hint::black_box(m.signal("temperature"));
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        row(
            &format!("{kind}: one simulated day (86 400 steps)"),
            median(samples),
            "ms",
        );
    }
}

async fn round_trips(label: &str) {
    let dev = DeviceHandle::simulated(DeviceKind::ColdRoom, 1, 0.0);
    let server = DeviceServer::start(dev, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut ctx = tokio_modbus::client::tcp::connect_slave(server.addr(), Slave(1))
        .await
        .unwrap();
    let n = 2_000;
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        for _ in 0..n {
            ctx.read_input_registers(0, 5).await.unwrap().unwrap();
        }
        samples.push(n as f64 / t.elapsed().as_secs_f64());
    }
    row(
        &format!("read 5 input regs, one client ({label})"),
        median(samples),
        "req/s",
    );
    drop(ctx);
    server.stop().await.unwrap();
}

async fn many_servers() {
    let n = 200;
    let mut samples = Vec::new();
    let mut ticks: Vec<f64> = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let mut servers = Vec::new();
        for i in 0..n {
            let dev = DeviceHandle::simulated(DeviceKind::ALL[i % 3], i as u64, 0.0);
            let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let server = DeviceServer::start(dev.clone(), addr).await.unwrap();
            servers.push((dev, server));
        }
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        // Advancing the whole fleet by one tick of a 60x clock (6 s).
        let t = Instant::now();
        for (d, _) in &servers {
            d.advance(Duration::from_secs(6));
        }
        ticks.push(t.elapsed().as_secs_f64() * 1e6);
        for (_, s) in servers {
            s.stop().await.unwrap();
        }
    }
    row(
        &format!("advance {n} devices by one 60x tick (6 s sim)"),
        median(ticks),
        "us",
    );
    row(&format!("start {n} device servers"), median(samples), "ms");
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
    {
        println!(
            "peak RSS of the bench process: {}",
            rss.trim_start_matches("VmHWM:").trim()
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "| {:<60} | {:>12} | {:<10} |",
        "measure (median)", "value", "unit"
    );
    println!("|{}|{}|{}|", "-".repeat(62), "-".repeat(14), "-".repeat(12));
    physics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(round_trips("current_thread"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(round_trips("multi_thread, 2 workers"));
    rt.block_on(many_servers());
}
