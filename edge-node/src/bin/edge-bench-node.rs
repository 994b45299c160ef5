//! Bench of the whole node: summariser throughput through the node's sink
//! (raw zone -> summariser -> telemetry documents in a sled store), control
//! loop period jitter while sync is busy (a second node receiving a flood
//! of document changes over iroh on loopback), and the node's RSS with 100
//! Modbus devices. Prints a table of medians.
//!
//! `cargo run --release -p edge-node --bin edge-bench-node -- --runs 3`

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use edge_node::clock::{Clock, SystemClock};
use edge_node::control::{Actuator, LoopOptions, LoopParams, spawn_loop};
use edge_node::metrics::Counters;
use edge_node::modbus::{Latest, LatestValues, WriteError, WriteReply};
use edge_node::node::sink::{LocalBucket, StoreSink};
use edge_node::node::{EdgeNode, NodeOptions};
use edge_node::raw_zone::{RawZone, RawZoneOptions};
use edge_node::summariser::SummariserConfig;
use edge_node::summariser::pipeline::Pipeline;
use schemas::config::{EdgeConfig, FailSafe, LoopConfig};
use schemas::device::{FieldValue, Reading};
use schemas::ids::{DeviceId, DocId, Role};
use schemas::metrics::{Sample, Unit};
use schemas::policy::{HubTier, Region};
use schemas::time::Timestamp;
use sync_core::authz::{Authz, HubScope, PeerInfo, StaticDirectory};
use sync_core::docs;
use sync_core::driver::{DriverConfig, SyncNode};
use sync_core::identity::NodeKey;
use sync_core::storage::SledStorage;
use sync_core::store::{DocStore, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

#[derive(Parser)]
#[command(about = "edge node throughput, loop jitter under sync load, RSS")]
struct Args {
    /// Repetitions of each measurement (the table shows medians).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Samples summarised per throughput run.
    #[arg(long, default_value_t = 200_000)]
    samples: u64,
    /// Seconds each jitter scenario runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Loop period in milliseconds for the jitter scenarios.
    #[arg(long, default_value_t = 10)]
    period_ms: u64,
    /// Devices for the RSS measurement.
    #[arg(long, default_value_t = 100)]
    devices: usize,
}

fn median_f(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median_u(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-bench-node: runtime: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("edge-bench-node: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut rows: Vec<(String, String)> = Vec::new();

    // 1. Summariser throughput through the node's sink.
    let (mut append, mut summarise) = (Vec::new(), Vec::new());
    let mut written = 0;
    for _ in 0..args.runs {
        let (a, s, w) = throughput(args.samples).await?;
        append.push(a);
        summarise.push(s);
        written = w;
    }
    rows.push((
        "raw zone append (group commit, fsync)".into(),
        format!("{:.0} samples/s", median_f(&mut append)),
    ));
    rows.push((
        format!(
            "summariser through the node ({} samples -> {written} rollups in sled docs, one core)",
            args.samples
        ),
        format!("{:.0} samples/s", median_f(&mut summarise)),
    ));

    // 2. Loop jitter, quiet and with sync busy.
    for busy in [false, true] {
        let (mut p50, mut p99, mut max, mut synced) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for _ in 0..args.runs {
            let (j, changes) = jitter(args.seconds, args.period_ms, busy).await?;
            p50.push(j.p50_us);
            p99.push(j.p99_us);
            max.push(j.max_us);
            synced = changes;
        }
        let label = if busy {
            format!(
                "loop jitter, {} ms period, sync flood ({synced} changes sent)",
                args.period_ms
            )
        } else {
            format!("loop jitter, {} ms period, sync idle", args.period_ms)
        };
        rows.push((
            label,
            format!(
                "p50 {} us, p99 {} us, max {} us",
                median_u(&mut p50),
                median_u(&mut p99),
                median_u(&mut max)
            ),
        ));
    }

    // 3. RSS with N devices.
    let (before, after, samples) = rss(args.devices).await?;
    rows.push((
        format!(
            "RSS, bench process before the node / with {} devices and loops running",
            args.devices
        ),
        format!(
            "{} MiB / {} MiB ({samples} samples polled)",
            before >> 10,
            after >> 10
        ),
    ));

    println!("| measurement | median of {} runs |", args.runs);
    println!("|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    Ok(())
}

/// Append `n` samples to a fresh raw zone, then summarise all of them into
/// telemetry documents of a sled store through the node's sink. Returns
/// (append samples/s, summarise samples/s, rollups written).
async fn throughput(n: u64) -> anyhow::Result<(f64, f64, u64)> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let (zone, _) = RawZone::open(dir.path().join("raw"), RawZoneOptions::default())?;
    let start_ts = SystemClock.now().0 - 3_600_000;
    let devices: Vec<DeviceId> = (0..10)
        .map(|i| DeviceId::new(format!("dev-{i}")))
        .collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let mut acks = Vec::with_capacity(4096);
    for i in 0..n {
        let s = Sample {
            schema_version: Default::default(),
            device: devices[(i % 10) as usize].clone(),
            metric: if i % 20 < 10 {
                "temperature"
            } else {
                "pressure"
            }
            .into(),
            // 20 series, one sample per series every 100 ms of an hour.
            ts: Timestamp(start_ts + (i / 20) as i64 * 100 % 3_600_000),
            value: (i % 97) as f64 * 0.5,
            unit: Unit::Celsius,
        };
        match zone.try_append(s) {
            Ok(a) => acks.push(a),
            Err(edge_node::raw_zone::RawZoneError::QueueFull { sample, .. }) => {
                for a in acks.drain(..) {
                    a.await?;
                }
                zone.append(*sample).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    for a in acks {
        a.await?;
    }
    let append = n as f64 / t0.elapsed().as_secs_f64();

    let key = NodeKey::from_bytes([3; 32]);
    let store = Arc::new(DocStore::open(
        Arc::new(SledStorage::open(&dir.path().join("docs"))?),
        key.clone(),
        key.new_actor(),
        StoreConfig::default(),
    )?);
    let counters = Arc::new(Counters::default());
    let sink = StoreSink::new(
        store,
        Arc::new(SystemClock),
        "demo".parse()?,
        "site-1".parse()?,
        Arc::new(LocalBucket::open(&dir.path().join("local.json"))?),
        counters.clone(),
    );
    let ck = dir.path().join("ck");
    let zone2 = zone.clone();
    let (secs, written) = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, u64)> {
        let t = Instant::now();
        let mut p = Pipeline::open(zone2, ck, SummariserConfig::default(), sink)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        p.flush_all(SystemClock.now())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((
            t.elapsed().as_secs_f64(),
            Counters::get(&counters.rollups_written),
        ))
    })
    .await??;
    zone.close();
    Ok((append, n as f64 / secs, written))
}

struct Instant0;

impl Actuator for Instant0 {
    fn try_actuate(&self, _on: bool) -> Result<WriteReply, WriteError> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(()));
        Ok(rx)
    }
}

fn hub_authz(k: &NodeKey) -> Authz {
    let local = Region::new("local").unwrap_or_else(|_| unreachable!("static region"));
    Authz::new(
        PeerInfo {
            key: k.public(),
            role: Role::Hub,
            tenant: None,
            site: None,
        },
        Some(HubScope {
            tier: HubTier::Regional,
            regions: vec![local.clone()],
            tenant_regions: [(
                "demo".parse().unwrap_or_else(|_| unreachable!("static id")),
                local,
            )]
            .into(),
        }),
    )
}

/// Run one thermostat loop (sensor fed by a task, instant actuator) for
/// `secs`; with `busy`, a hub node floods an edge node with document changes
/// over iroh on loopback meanwhile. Returns the jitter and changes sent.
async fn jitter(
    secs: u64,
    period_ms: u64,
    busy: bool,
) -> anyhow::Result<(edge_node::control::JitterStats, u64)> {
    let dev = DeviceId::new("room")?;
    let cfg = LoopConfig::Thermostat {
        name: "room".into(),
        device: dev.clone(),
        sensor: "temp".into(),
        output: "comp".into(),
        period_ms,
        fail_safe: FailSafe::On,
        default_setpoint: 4.0,
        default_hysteresis: 2.0,
        min_on_s: 0,
        min_off_s: 0,
    };
    let values = LatestValues::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (values, dev, clock, stop) = (values.clone(), dev.clone(), clock.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let v = 2.0 + (i % 60) as f64 * 0.1;
                values.set(
                    &dev,
                    "temp",
                    Latest {
                        reading: Reading {
                            value: v,
                            ts: clock.now(),
                        },
                        received: clock.monotonic(),
                    },
                );
                tokio::time::sleep(Duration::from_millis(period_ms.max(1))).await;
            }
        })
    };
    let (_ptx, prx) = watch::channel(LoopParams::from_config(&cfg));
    let (etx, mut erx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while erx.recv().await.is_some() {} });

    // Sync pair.
    let hub_key = NodeKey::from_bytes([11; 32]);
    let edge_key = NodeKey::from_bytes([12; 32]);
    let edge_info = PeerInfo {
        key: edge_key.public(),
        role: Role::Edge,
        tenant: Some("demo".parse()?),
        site: Some("site-1".parse()?),
    };
    let mut sync_nodes = Vec::new();
    let sent = Arc::new(AtomicU64::new(0));
    let mut flood = None;
    if busy {
        let mut hd = StaticDirectory::default();
        hd.insert(edge_info.clone());
        let mut ed = StaticDirectory::default();
        ed.insert(PeerInfo {
            key: hub_key.public(),
            role: Role::Hub,
            tenant: None,
            site: None,
        });
        let hub_store = Arc::new(DocStore::in_memory(hub_key.clone()));
        let hub = SyncNode::spawn(
            &hub_key,
            hub_store.clone(),
            Arc::new(hub_authz(&hub_key)),
            Arc::new(hd),
            DriverConfig::default(),
        )
        .await?;
        let edge = SyncNode::spawn(
            &edge_key,
            Arc::new(DocStore::in_memory(edge_key.clone())),
            Arc::new(Authz::new(edge_info, None)),
            Arc::new(ed),
            DriverConfig::default(),
        )
        .await?;
        let addr: SocketAddr = hub
            .local_addrs()
            .into_iter()
            .find(SocketAddr::is_ipv4)
            .context("hub has no ipv4 address")?;
        edge.dial(hub_key.public(), addr)?;
        let (stop, sent) = (stop.clone(), sent.clone());
        flood = Some(tokio::spawn(async move {
            let t: schemas::ids::TenantId = "demo".parse().unwrap_or_else(|_| unreachable!());
            let s: schemas::ids::SiteId = "site-1".parse().unwrap_or_else(|_| unreachable!());
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let d = DeviceId::new(format!("d{}", i % 50)).unwrap_or_else(|_| unreachable!());
                let id = DocId::device_doc(&t, &s, &d);
                let v = FieldValue::Number((i % 500) as f64);
                if hub_store
                    .change(&id, SystemClock.now(), |doc| {
                        docs::device::set_desired(doc, "setpoint", &v)
                    })
                    .is_ok()
                {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                if i.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
        }));
        sync_nodes.push(hub);
        sync_nodes.push(edge);
    }

    // As in the node: the loop runs on its own runtime thread.
    let loop_rt = edge_node::node::loop_runtime::LoopRuntime::start()?;
    let guard = loop_rt.handle().enter();
    let runner = spawn_loop(
        &cfg,
        prx,
        values,
        Arc::new(Instant0),
        clock,
        etx,
        LoopOptions::default(),
    )?;
    drop(guard);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let j = runner.jitter().unwrap_or_default();
    runner.stop().await;
    loop_rt.shutdown().await;
    stop.store(true, Ordering::Relaxed);
    if let Some(f) = flood {
        let _ = f.await;
    }
    let _ = feeder.await;
    drain.abort();
    for n in sync_nodes {
        n.shutdown().await;
    }
    Ok((j, sent.load(Ordering::Relaxed)))
}

/// A device answering every read with a fixed value and every write with ok.
#[derive(Clone)]
struct Fixed;

impl tokio_modbus::server::Service for Fixed {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let r = match req {
            Request::ReadInputRegisters(_, n) => {
                Ok(Response::ReadInputRegisters(vec![40; usize::from(n)]))
            }
            Request::ReadHoldingRegisters(_, n) => {
                Ok(Response::ReadHoldingRegisters(vec![7; usize::from(n)]))
            }
            Request::ReadCoils(_, n) => Ok(Response::ReadCoils(vec![false; usize::from(n)])),
            Request::WriteSingleCoil(a, v) => Ok(Response::WriteSingleCoil(a, v)),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(r))
    }
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Start a node with `n` devices (4 registers at 1 s, one thermostat each)
/// against one in-process Modbus server; RSS before and after 5 s.
async fn rss(n: usize) -> anyhow::Result<(u64, u64, u64)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Server::new(listener);
    let srv = tokio::spawn(async move {
        let on_connected = |stream, socket_addr| async move {
            accept_tcp_connection(stream, socket_addr, |_| Ok(Some(Fixed)))
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    let dir = tempfile::tempdir()?;
    let mut text = format!(
        "[node]\ndata_dir = \"{}\"\n[listen]\nhttp = \"127.0.0.1:0\"\n",
        dir.path().display()
    );
    for i in 0..n {
        text.push_str(&format!(
            r#"
[[devices]]
id = "dev-{i}"
device_type = "cold-room"
addr = "{addr}"
registers = [
  {{ name = "temperature", function = "input", address = 0, type = "i16", scale = 0.1, unit = "celsius" }},
  {{ name = "humidity", function = "input", address = 1, type = "u16", scale = 0.1, unit = "percent" }},
  {{ name = "power", function = "holding", address = 0, type = "u16", unit = "watt" }},
  {{ name = "compressor", function = "coil", address = 0, type = "bool" }},
]
[[loops]]
kind = "thermostat"
name = "loop-{i}"
device = "dev-{i}"
sensor = "temperature"
output = "compressor"
fail_safe = "on"
default_setpoint = 4.0
"#
        ));
    }
    let cfg = EdgeConfig::parse(Path::new("bench.toml"), &text)?;
    let before = vm_rss_kib();
    let node = EdgeNode::start(cfg, NodeOptions::new(Arc::new(SystemClock))).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = vm_rss_kib();
    let samples = Counters::get(&node.state().counters.samples_acknowledged);
    node.shutdown().await?;
    srv.abort();
    Ok((before, after, samples))
}
