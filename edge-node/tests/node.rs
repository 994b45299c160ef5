//! The whole edge node: in process against an in-process Modbus plant and a
//! hub played by a second sync node, and as a real process killed with
//! SIGKILL and restarted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_node::clock::SystemClock;
use edge_node::node::{EdgeNode, NodeOptions};
use edge_node::raw_zone::{RawZone, RawZoneOptions};
use schemas::command::{Command, CommandAction, CommandStatus};
use schemas::config::EdgeConfig;
use schemas::device::FieldValue;
use schemas::ids::{DeviceId, DocId, Role};
use schemas::policy::{HubTier, Region};
use schemas::time::Timestamp;
use sync_core::authz::{Authz, HubScope, PeerInfo, StaticDirectory};
use sync_core::docs;
use sync_core::driver::{DriverConfig, SyncNode};
use sync_core::identity::NodeKey;
use sync_core::storage::SledStorage;
use sync_core::store::{DocStore, StoreConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

// ------------------------------------------------------------------ plant

/// A cold room: temperature (input register 0, tenths of a degree) rises
/// while the compressor (coil 0) is off and falls while it is on. Coil 1 is
/// a light, counted on every write.
#[derive(Clone)]
struct Plant {
    temp_tenths: Arc<Mutex<f64>>,
    coils: Arc<Mutex<[bool; 2]>>,
    light_writes: Arc<AtomicU64>,
}

impl Plant {
    fn new(temp: f64) -> Plant {
        Plant {
            temp_tenths: Arc::new(Mutex::new(temp * 10.0)),
            coils: Arc::new(Mutex::new([false; 2])),
            light_writes: Arc::new(AtomicU64::new(0)),
        }
    }
    fn temp(&self) -> f64 {
        *self.temp_tenths.lock().unwrap() / 10.0
    }
    /// One physics step of `dt`: +2 C/s off, -4 C/s on.
    fn step(&self, dt: Duration) {
        let on = self.coils.lock().unwrap()[0];
        let rate = if on { -40.0 } else { 20.0 };
        *self.temp_tenths.lock().unwrap() += rate * dt.as_secs_f64();
    }
}

impl tokio_modbus::server::Service for Plant {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let r = match req {
            Request::ReadInputRegisters(0, 1) => {
                let t = self.temp_tenths.lock().unwrap().round() as i16;
                Ok(Response::ReadInputRegisters(vec![t as u16]))
            }
            Request::ReadCoils(a, n) if a + n <= 2 => {
                let c = self.coils.lock().unwrap();
                Ok(Response::ReadCoils(
                    c[a as usize..(a + n) as usize].to_vec(),
                ))
            }
            Request::WriteSingleCoil(a, v) if a < 2 => {
                self.coils.lock().unwrap()[a as usize] = v;
                if a == 1 {
                    self.light_writes.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Response::WriteSingleCoil(a, v))
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        };
        Box::pin(std::future::ready(r))
    }
}

async fn serve(plant: Plant) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = move |stream, socket_addr| {
            let plant = plant.clone();
            async move { accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(plant.clone()))) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    (addr, task)
}

// ------------------------------------------------------------------ config

fn config_text(
    data: &Path,
    plant: SocketAddr,
    hub: Option<(NodeKey, SocketAddr)>,
    period_ms: u64,
) -> String {
    let hub = hub
        .map(|(k, a)| format!("[hub]\nendpoint_id = \"{}\"\naddr = \"{a}\"\n", k.public()))
        .unwrap_or_default();
    format!(
        r#"
[node]
tenant = "demo"
site = "site-1"
data_dir = "{data}"

{hub}
[listen]
http = "127.0.0.1:0"
sync = "127.0.0.1:0"

[summariser]
window_s = 10

[[devices]]
id = "room-1"
device_type = "cold-room"
addr = "{plant}"
timeout_ms = 500
registers = [
  {{ name = "temperature", function = "input", address = 0, type = "i16", scale = 0.1, unit = "celsius", poll_ms = 20 }},
  {{ name = "compressor", function = "coil", address = 0, type = "bool", poll_ms = 200 }},
  {{ name = "light", function = "coil", address = 1, type = "bool", poll_ms = 1000 }},
]

[[loops]]
kind = "thermostat"
name = "room-1-cooling"
device = "room-1"
sensor = "temperature"
output = "compressor"
period_ms = {period_ms}
fail_safe = "on"
default_setpoint = 4.0
default_hysteresis = 2.0
"#,
        data = data.display()
    )
}

fn config(
    data: &Path,
    plant: SocketAddr,
    hub: Option<(NodeKey, SocketAddr)>,
    period_ms: u64,
) -> EdgeConfig {
    EdgeConfig::parse(
        Path::new("edge.toml"),
        &config_text(data, plant, hub, period_ms),
    )
    .unwrap()
}

fn fast_opts() -> NodeOptions {
    let mut o = NodeOptions::new(Arc::new(SystemClock));
    o.pipeline_every = Duration::from_millis(100);
    o.summariser_flush_ms = Some(200);
    o.reported_every = Duration::from_millis(200);
    o
}

fn room() -> DeviceId {
    DeviceId::new("room-1").unwrap()
}

fn now() -> Timestamp {
    use edge_node::clock::Clock;
    SystemClock.now()
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rollup_count(store: &DocStore, id: &DocId) -> u64 {
    store
        .read(id, |d| {
            docs::telemetry::rollups(d)
                .unwrap()
                .0
                .iter()
                .map(|r| r.count)
                .sum()
        })
        .unwrap()
        .unwrap_or(0)
}

// ------------------------------------------------------------------ tests

/// Samples become rollups in the day's telemetry document; a setpoint the
/// hub writes reaches the loop through sync; the reported state reaches the
/// hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_become_rollups_and_a_hub_setpoint_reaches_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let plant = Plant::new(4.0);
    let (plant_addr, plant_task) = serve(plant.clone()).await;

    // The edge's key exists before start so the hub's directory can know it.
    let edge_key = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
    let hub_key = NodeKey::from_bytes([7; 32]);
    let mut hub_dir = StaticDirectory::default();
    hub_dir.insert(PeerInfo {
        key: edge_key.public(),
        role: Role::Edge,
        tenant: "demo".parse().ok(),
        site: "site-1".parse().ok(),
    });
    let local = Region::new("local").unwrap();
    let hub_store = Arc::new(DocStore::in_memory(hub_key.clone()));
    let hub = SyncNode::spawn(
        &hub_key,
        hub_store.clone(),
        Arc::new(Authz::new(
            PeerInfo {
                key: hub_key.public(),
                role: Role::Hub,
                tenant: None,
                site: None,
            },
            Some(HubScope {
                tier: HubTier::Regional,
                regions: vec![local.clone()],
                tenant_regions: [("demo".parse().unwrap(), local)].into(),
            }),
        )),
        Arc::new(hub_dir),
        DriverConfig::default(),
    )
    .await
    .unwrap();
    let hub_addr = hub
        .local_addrs()
        .into_iter()
        .find(SocketAddr::is_ipv4)
        .unwrap();

    let cfg = config(
        dir.path(),
        plant_addr,
        Some((hub_key.clone(), hub_addr)),
        100,
    );
    let node = EdgeNode::start(cfg.clone(), fast_opts()).await.unwrap();
    assert!(
        node.ready_line()
            .starts_with(&format!("ready edge={} sync=127.0.0.1:", edge_key.public()))
    );

    let tel = DocId::telemetry(&cfg.node.tenant, &cfg.node.site, &room(), now().day());
    let store = node.state().store.clone();
    wait_for("rollups in the telemetry document", 20, || {
        rollup_count(&store, &tel) >= 20
    })
    .await;
    let (rollups, bad) = store
        .read(&tel, |d| docs::telemetry::rollups(d).unwrap())
        .unwrap()
        .unwrap();
    assert!(bad.is_empty());
    let temp: Vec<_> = rollups
        .iter()
        .filter(|r| r.metric == "temperature")
        .collect();
    assert!(!temp.is_empty(), "no temperature rollup in {rollups:?}");
    for r in &temp {
        assert_eq!(r.window_ms, 10_000);
        assert!(!r.clock_unsynced);
        assert!(r.min <= r.max && r.min > -20.0 && r.max < 30.0, "{r:?}");
    }

    // The hub writes a setpoint; the loop picks it up through sync.
    let dev_doc = DocId::device_doc(&cfg.node.tenant, &cfg.node.site, &room());
    hub_store
        .change(&dev_doc, now(), |d| {
            docs::device::set_desired(d, "setpoint", &FieldValue::Number(7.0))
        })
        .unwrap();
    let state = node.state().clone();
    wait_for("setpoint 7 in the loop", 20, || {
        state
            .loop_states()
            .iter()
            .any(|(_, s, _)| s.setpoint == Some(7.0))
    })
    .await;
    // And the edge's reported state reaches the hub.
    wait_for("reported state at the hub", 20, || {
        hub_store
            .read(&dev_doc, |d| docs::device::reported(d).unwrap())
            .unwrap()
            .flatten()
            .is_some_and(|r| {
                r.values.contains_key("temperature") && r.loops.contains_key("room-1-cooling")
            })
    })
    .await;

    node.shutdown().await.unwrap();
    hub.shutdown().await;
    plant_task.abort();
}

/// The thermostat keeps the room in band with the hub configured but dead,
/// and its period jitter is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_keeps_the_room_in_band_with_the_hub_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let plant = Plant::new(4.0);
    let (plant_addr, plant_task) = serve(plant.clone()).await;
    // A hub key nobody holds, at a port nobody serves.
    let dead_hub = (NodeKey::from_bytes([9; 32]), "127.0.0.1:9".parse().unwrap());
    let node = EdgeNode::start(
        config(dir.path(), plant_addr, Some(dead_hub), 50),
        fast_opts(),
    )
    .await
    .unwrap();

    // Physics in its own task, 10 ms steps, recording every temperature.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let physics = {
        let (plant, seen) = (plant.clone(), seen.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut last = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let t = tokio::time::Instant::now();
                plant.step(t - last);
                last = t;
                seen.lock().unwrap().push(plant.temp());
            }
        })
    };
    let state = node.state().clone();
    // Run until the loop has made 60 decisions (3 s at 50 ms).
    wait_for("60 loop ticks", 30, || {
        state
            .loop_states()
            .iter()
            .any(|(_, _, j)| j.is_some_and(|j| j.count >= 60))
    })
    .await;
    physics.abort();
    let temps = seen.lock().unwrap().clone();
    let (lo, hi) = temps
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), t| (a.min(*t), b.max(*t)));
    // Band [3, 5]; allow for poll, loop period and write latency.
    assert!(
        lo > 1.5 && hi < 6.5,
        "temperature left the band: min {lo}, max {hi}"
    );
    // It really cycled the compressor.
    assert!(
        state.loop_events().len() >= 2,
        "events: {:?}",
        state.loop_events()
    );
    let (_, st, j) = state.loop_states().into_iter().next().unwrap();
    let j = j.unwrap();
    assert!(j.count >= 60 && j.p99_us >= j.p50_us, "{j:?}");
    assert!(!st.fail_safe);
    // The hub was never reached.
    assert!(state.sync_status().values().all(|s| !s.connected));
    println!(
        "loop jitter with hub unreachable: p50 {} us, p99 {} us, max {} us",
        j.p50_us, j.p99_us, j.max_us
    );

    node.shutdown().await.unwrap();
    plant_task.abort();
}

fn command(id: &str, action: CommandAction, expires_at: Timestamp) -> Command {
    Command {
        schema_version: Default::default(),
        id: id.into(),
        target: room(),
        action,
        issued_by: "hub".into(),
        issued_at: now(),
        expires_at,
    }
}

/// A command delivered twice (in two command documents) writes the device
/// once and both deliveries get the same result; an expired one is refused
/// with its reason; a SetDesired command changes the loop's setpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_execute_once_and_expired_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plant = Plant::new(4.0);
    let (plant_addr, plant_task) = serve(plant.clone()).await;
    let mut opts = fast_opts();
    opts.sync = false;
    let cfg = config(dir.path(), plant_addr, None, 100);
    let node = EdgeNode::start(cfg.clone(), opts).await.unwrap();
    let state = node.state().clone();
    wait_for("device connected", 20, || {
        state.device(&room()).unwrap().health().status == schemas::device::HealthStatus::Ok
    })
    .await;

    let today = DocId::commands(&cfg.node.tenant, &cfg.node.site, now().day());
    let yesterday_day =
        schemas::time::Day::from_days_since_epoch(now().day().days_since_epoch() - 1);
    let yesterday = DocId::commands(&cfg.node.tenant, &cfg.node.site, yesterday_day);
    let later = now().saturating_add_ms(600_000);
    let light = command(
        "light-on-1",
        CommandAction::WriteCoil {
            register: "light".into(),
            value: true,
        },
        later,
    );
    let mut expired = command(
        "light-off-old",
        CommandAction::WriteCoil {
            register: "light".into(),
            value: false,
        },
        now().saturating_add_ms(-1_000),
    );
    expired.issued_at = now().saturating_add_ms(-10_000);
    let setpoint = command(
        "setpoint-6",
        CommandAction::SetDesired {
            field: "setpoint".into(),
            value: FieldValue::Number(6.0),
        },
        later,
    );
    let store = state.store.clone();
    store
        .change(&today, now(), |d| {
            docs::commands::put_request(d, &light)?;
            docs::commands::put_request(d, &expired)?;
            docs::commands::put_request(d, &setpoint)
        })
        .unwrap();
    let results = |doc: &DocId| {
        store
            .read(doc, |d| docs::commands::results(d).unwrap())
            .unwrap()
            .unwrap_or_default()
    };
    wait_for("three results", 20, || results(&today).len() == 3).await;
    let r = results(&today);
    assert_eq!(r["light-on-1"].status, CommandStatus::Succeeded, "{r:?}");
    assert_eq!(r["light-off-old"].status, CommandStatus::Expired);
    assert!(
        r["light-off-old"].reason.contains("expired"),
        "{}",
        r["light-off-old"].reason
    );
    assert_eq!(r["setpoint-6"].status, CommandStatus::Succeeded);
    wait_for("setpoint 6 in the loop", 20, || {
        state
            .loop_states()
            .iter()
            .any(|(_, s, _)| s.setpoint == Some(6.0))
    })
    .await;
    assert_eq!(plant.light_writes.load(Ordering::SeqCst), 1);
    assert!(plant.coils.lock().unwrap()[1], "the light is on");

    // The same command delivered again, in another document.
    store
        .change(&yesterday, now(), |d| {
            docs::commands::put_request(d, &light)
        })
        .unwrap();
    wait_for("result of the second delivery", 20, || {
        results(&yesterday).contains_key("light-on-1")
    })
    .await;
    assert_eq!(
        results(&yesterday)["light-on-1"],
        r["light-on-1"],
        "a redelivery gets the stored result"
    );
    assert_eq!(
        plant.light_writes.load(Ordering::SeqCst),
        1,
        "executed once"
    );

    // Let go of the node's store before restarting on the same directory.
    drop((store, state));
    node.shutdown().await.unwrap();

    // And again after a restart: the ledger remembers.
    let mut opts = fast_opts();
    opts.sync = false;
    let node = EdgeNode::start(cfg.clone(), opts).await.unwrap();
    let store = node.state().store.clone();
    let day_after = schemas::time::Day::from_days_since_epoch(now().day().days_since_epoch() + 1);
    let tomorrow = DocId::commands(&cfg.node.tenant, &cfg.node.site, day_after);
    store
        .change(&tomorrow, now(), |d| docs::commands::put_request(d, &light))
        .unwrap();
    let results = |doc: &DocId| {
        store
            .read(doc, |d| docs::commands::results(d).unwrap())
            .unwrap()
            .unwrap_or_default()
    };
    wait_for("result after restart", 20, || {
        results(&tomorrow).contains_key("light-on-1")
    })
    .await;
    assert_eq!(
        results(&tomorrow)["light-on-1"].status,
        CommandStatus::Succeeded
    );
    assert_eq!(
        plant.light_writes.load(Ordering::SeqCst),
        1,
        "executed once across a restart"
    );
    node.shutdown().await.unwrap();
    plant_task.abort();
}

// ------------------------------------------------------------------ kill -9

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn acknowledged(addr: SocketAddr) -> Option<u64> {
    let body = http_get(addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("edge_samples_acknowledged_total "))
        .and_then(|v| v.trim().parse().ok())
}

struct Proc {
    child: std::process::Child,
    http: SocketAddr,
}

/// Start the binary and wait for its ready line.
fn spawn_node(cfg_path: &Path) -> Proc {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(["run", "--config"])
        .arg(cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("ready line");
    assert!(line.starts_with("ready edge="), "{line}");
    let http = line
        .split("http=http://")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Proc { child, http }
}

async fn wait_acknowledged(p: &Proc, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let http = p.http;
        let got = tokio::task::spawn_blocking(move || acknowledged(http))
            .await
            .unwrap();
        if let Some(g) = got.filter(|g| *g >= n) {
            return g;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {got:?} samples acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_lose_no_acknowledged_sample_and_count_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let plant = Plant::new(4.0);
    let (plant_addr, plant_task) = serve(plant.clone()).await;
    let cfg_path = dir.path().join("edge.toml");
    std::fs::write(
        &cfg_path,
        config_text(&dir.path().join("data"), plant_addr, None, 100),
    )
    .unwrap();

    let mut acked = 0;
    for round in 0..2 {
        let mut p = spawn_node(&cfg_path);
        let before = wait_acknowledged(&p, 100).await;
        // The last figure read before the kill is a lower bound of what
        // was acknowledged.
        let _ = round;
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        acked += before;
    }
    // A third run ends cleanly (SIGTERM), summarising everything.
    let mut p = spawn_node(&cfg_path);
    acked += wait_acknowledged(&p, 50).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = p.child.wait().unwrap();
    assert!(code.success(), "edge-node exited with {code}");
    plant_task.abort();

    // Raw zone: every acknowledged sample is there.
    let data = dir.path().join("data");
    let (zone, _) = RawZone::open(data.join("raw"), RawZoneOptions::default()).unwrap();
    let mut raw: BTreeMap<(String, i64), u64> = BTreeMap::new();
    let mut total = 0u64;
    for r in zone.read_from(0) {
        let (_, s) = r.unwrap();
        *raw.entry((s.metric.clone(), s.ts.window_start(10_000).as_millis()))
            .or_default() += 1;
        total += 1;
    }
    zone.close();
    assert!(
        total >= acked,
        "raw zone holds {total} samples, {acked} were acknowledged"
    );

    // Rollups: every raw sample counted exactly once.
    let key = NodeKey::load_or_create(&data.join("node.key")).unwrap();
    let store = DocStore::open(
        Arc::new(SledStorage::open(&data.join("docs")).unwrap()),
        key.clone(),
        key.new_actor(),
        StoreConfig::default(),
    )
    .unwrap();
    let mut rolled: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for id in store.list() {
        if id.kind() != schemas::ids::DocKind::Telemetry {
            continue;
        }
        store
            .read(&id, |d| {
                for r in docs::telemetry::rollups(d).unwrap().0 {
                    *rolled
                        .entry((r.metric.clone(), r.window_start.as_millis()))
                        .or_default() += r.count;
                }
            })
            .unwrap();
    }
    assert_eq!(
        rolled, raw,
        "rollup counts per window differ from the raw zone"
    );
}

// ------------------------------------------------------------------ wrong clocks

/// Wall time = real time minus an offset that the test can change: a box
/// that booted in 1970 and later got its clock set.
struct SkewedClock {
    offset_ms: std::sync::atomic::AtomicI64,
}

impl edge_node::clock::Clock for SkewedClock {
    fn now(&self) -> Timestamp {
        let real = SystemClock.now();
        Timestamp(real.0 - self.offset_ms.load(Ordering::SeqCst))
    }
    fn monotonic(&self) -> std::time::Instant {
        edge_node::clock::Clock::monotonic(&SystemClock)
    }
}

/// Booted in 1970: the loop runs, rollups are marked `clock_unsynced` and
/// kept on the edge (no 1970 telemetry document); once the clock is set,
/// new rollups go to today's document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_booted_in_1970_controls_and_never_files_rollups_under_a_wrong_day() {
    let dir = tempfile::tempdir().unwrap();
    let plant = Plant::new(4.0);
    let (plant_addr, plant_task) = serve(plant.clone()).await;
    // Wall clock reads 1970-01-02 plus real elapsed time.
    let clock = Arc::new(SkewedClock {
        offset_ms: std::sync::atomic::AtomicI64::new(now().0 - schemas::time::MS_PER_DAY),
    });
    let mut opts = fast_opts();
    opts.clock = clock.clone();
    opts.sync = false;
    let cfg = config(dir.path(), plant_addr, None, 50);
    let node = EdgeNode::start(cfg.clone(), opts).await.unwrap();
    let state = node.state().clone();

    wait_for("unsynced rollups in the local bucket", 20, || {
        state
            .local_rollups
            .snapshot()
            .values()
            .any(|r| r.clock_unsynced && r.count > 0)
    })
    .await;
    let telemetry = |state: &edge_node::node::NodeState| {
        state
            .store
            .list()
            .into_iter()
            .filter(|id| id.kind() == schemas::ids::DocKind::Telemetry)
            .collect::<Vec<_>>()
    };
    assert!(
        telemetry(&state).is_empty(),
        "filed under a day: {:?}",
        telemetry(&state)
    );
    assert!(
        state
            .local_rollups
            .snapshot()
            .values()
            .all(|r| r.clock_unsynced)
    );
    wait_for("the loop ticking with a wrong clock", 20, || {
        state
            .loop_states()
            .iter()
            .any(|(_, _, j)| j.is_some_and(|j| j.count >= 10))
    })
    .await;
    assert!(
        telemetry(&state).is_empty(),
        "filed under a day: {:?}",
        telemetry(&state)
    );

    // The clock gets set (NTP, an operator): wall time jumps to today.
    clock.offset_ms.store(0, Ordering::SeqCst);
    let today = DocId::telemetry(&cfg.node.tenant, &cfg.node.site, &room(), now().day());
    let store = state.store.clone();
    wait_for("rollups in today's document", 20, || {
        rollup_count(&store, &today) > 0
    })
    .await;
    assert_eq!(telemetry(&state), vec![today.clone()]);
    let (rollups, _) = store
        .read(&today, |d| docs::telemetry::rollups(d).unwrap())
        .unwrap()
        .unwrap();
    assert!(
        rollups
            .iter()
            .all(|r| !r.clock_unsynced && r.window_start.is_plausible())
    );
    drop((store, state));
    node.shutdown().await.unwrap();
    plant_task.abort();
}

// ------------------------------------------------------------------ enrolment

/// A hub that redeems one token and signs registries listing the edge and
/// a second site peer, active or revoked.
struct ToyHub {
    key: NodeKey,
    peer: schemas::identity::EndpointKey,
    used: Mutex<bool>,
}

impl ToyHub {
    fn registry(
        &self,
        edge: schemas::identity::EndpointKey,
        seq: u64,
        peer_revoked: bool,
    ) -> sync_core::registry::SignedRegistry {
        let rec = |k, revoked: bool| schemas::identity::IdentityRecord {
            schema_version: Default::default(),
            endpoint_id: k,
            tenant: "demo".parse().ok(),
            site: "site-1".parse().ok(),
            role: Role::Edge,
            enrolled_at: now(),
            revoked_at: revoked.then(now),
            revoked_reason: revoked.then(|| "box stolen".to_string()),
        };
        let mut records = vec![rec(edge, false), rec(self.peer, peer_revoked)];
        records.sort_by_key(|r| r.endpoint_id);
        sync_core::registry::RegistrySnapshot {
            schema_version: Default::default(),
            issuer: self.key.public(),
            seq,
            records,
        }
        .sign(self.key.signing_key())
    }
}

impl sync_core::enrol::Enroller for ToyHub {
    fn enrol(
        &self,
        token: &str,
        endpoint: schemas::identity::EndpointKey,
    ) -> Result<sync_core::registry::SignedRegistry, String> {
        if token != "tok-1" {
            return Err("forged token".into());
        }
        let mut used = self.used.lock().unwrap();
        if *used {
            return Err("token already used".into());
        }
        *used = true;
        Ok(self.registry(endpoint, 1, false))
    }
}

/// First start with a join token enrols; the registry then replaces the
/// config's trust; a revocation the hub publishes in `fleet/identity`
/// reaches the edge and still holds after a restart with the hub gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrols_with_a_join_token_and_keeps_refusing_a_revoked_peer_without_the_hub() {
    use edge_node::directory::DirectorySource;
    use sync_core::authz::Directory;

    let dir = tempfile::tempdir().unwrap();
    let plant = Plant::new(4.0);
    let (plant_addr, plant_task) = serve(plant.clone()).await;
    let edge_key = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
    let peer = NodeKey::from_bytes([21; 32]).public();
    let hub_key = NodeKey::from_bytes([20; 32]);
    let toy = Arc::new(ToyHub {
        key: hub_key.clone(),
        peer,
        used: Mutex::new(false),
    });
    let mut hub_dir = StaticDirectory::default();
    hub_dir.insert(PeerInfo {
        key: edge_key.public(),
        role: Role::Edge,
        tenant: "demo".parse().ok(),
        site: "site-1".parse().ok(),
    });
    let local = Region::new("local").unwrap();
    let hub_store = Arc::new(DocStore::in_memory(hub_key.clone()));
    let handler = sync_core::enrol::EnrolHandler::new(toy.clone());
    let hub = SyncNode::spawn_with(
        &hub_key,
        hub_store.clone(),
        Arc::new(Authz::new(
            PeerInfo {
                key: hub_key.public(),
                role: Role::Hub,
                tenant: None,
                site: None,
            },
            Some(HubScope {
                tier: HubTier::Regional,
                regions: vec![local.clone()],
                tenant_regions: [("demo".parse().unwrap(), local)].into(),
            }),
        )),
        Arc::new(hub_dir),
        DriverConfig::default(),
        &[sync_core::enrol::ENROL_ALPN],
        |b| b.accept(sync_core::enrol::ENROL_ALPN, handler),
    )
    .await
    .unwrap();
    let hub_addr = hub
        .local_addrs()
        .into_iter()
        .find(SocketAddr::is_ipv4)
        .unwrap();

    let text = config_text(dir.path(), plant_addr, Some((hub_key.clone(), hub_addr)), 100).replace(
        "[listen]",
        &format!("join_token = \"tok-1\"\n\n[[peers]]\nendpoint_id = \"{peer}\"\naddr = \"127.0.0.1:9\"\n\n[listen]"),
    );
    let cfg = EdgeConfig::parse(Path::new("edge.toml"), &text).unwrap();
    let mut opts = fast_opts();
    opts.http = false;
    let node = EdgeNode::start(cfg.clone(), opts.clone()).await.unwrap();
    let d = node.state().directory.clone();
    wait_for("enrolment", 20, || d.source() == DirectorySource::Registry).await;
    assert_eq!(d.registry_seq(), Some(1));
    assert_eq!(d.lookup(&peer).unwrap().role, Role::Edge);

    // The hub revokes the peer and publishes the registry by sync.
    let signed = toy.registry(edge_key.public(), 2, true);
    hub_store
        .change(&DocId::Identity, now(), |doc| {
            docs::put_root_json(doc, sync_core::registry::IDENTITY_DOC_KEY, &signed)
        })
        .unwrap();
    wait_for("revocation at the edge", 20, || d.registry_seq() == Some(2)).await;
    assert!(d.lookup(&peer).is_none(), "a revoked peer is refused");
    drop(d);
    node.shutdown().await.unwrap();
    hub.shutdown().await;

    // Restart with the hub gone: still enrolled, still refusing the peer.
    let node = EdgeNode::start(cfg, opts).await.unwrap();
    let d = node.state().directory.clone();
    wait_for("registry loaded from the store", 20, || {
        d.registry_seq() == Some(2)
    })
    .await;
    assert!(d.lookup(&peer).is_none());
    assert_eq!(d.lookup(&hub_key.public()).unwrap().role, Role::Hub);
    drop(d);
    node.shutdown().await.unwrap();
    plant_task.abort();
}

// ------------------------------------------------------------------ CLI

/// `check-config` prints the validated config, or names file, field and
/// reason and exits 2; `run` on a bad config exits 2 too.
#[test]
fn check_config_names_file_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        config_text(
            &dir.path().join("data"),
            "127.0.0.1:502".parse().unwrap(),
            None,
            100,
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("retention_hours = 168"),
        "defaults filled in: {printed}"
    );
    // What it prints is itself a valid config.
    EdgeConfig::parse(Path::new("printed.toml"), &printed).unwrap();

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("sensor = \"temperature\"", "sensor = \"temp\""),
    )
    .unwrap();
    for args in [
        vec!["check-config".to_string()],
        vec!["run".into(), "--config".into()],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-node"))
            .args(&args)
            .arg(&bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains("bad.toml: loops[0].sensor: device \"room-1\" has no register \"temp\""),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
