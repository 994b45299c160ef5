//! The running edge node: config, identity, document store, sync, devices,
//! raw zone, summariser, control loops, alarms, commands and the local HTTP
//! API wired into one process that runs a site offline.
//!
//! ```text
//!  devices (modbus tasks) ──DeviceEvent──> event pump ──try_append──> raw zone ──ack──> counters
//!        │ LatestValues                      │ alarm engine ──put_alarm──> alarm day doc
//!        v                                   v
//!  control loops (own tasks, never await the network)      summariser pipeline (blocking thread)
//!        ^ params watch                                      raw zone -> rollups -> telemetry day doc
//!  desired watcher <── store change feed ──> command task ──ledger──> device writes / set_desired
//!  reported task ──set_reported (throttled)──> device doc          sync node (iroh) <──> hub, site peers
//! ```
//!
//! Architecture invariants:
//! - control loops read only [`LatestValues`] and a `watch` of parameters,
//!   and actuate with non-blocking writes: nothing they do awaits the
//!   network, the store or the raw zone;
//! - a sample is counted as acknowledged only once the raw zone says it is
//!   durable; rollups are overwritten by key and the summariser checkpoint
//!   is saved only after the store flush, so a crash anywhere loses no
//!   acknowledged sample and counts none twice;
//! - rollups of samples taken with an implausible wall clock never go into a
//!   calendar-day document (see [`sink`]);
//! - every task started here is stopped by [`EdgeNode::shutdown`].

pub mod loop_runtime;
pub mod sink;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::alarm::Alarm;
use schemas::command::CommandResult;
use schemas::config::{EdgeConfig, LoopConfig};
use schemas::device::{FieldSpec, FieldValue, LoopState, Reading, ReportedState};
use schemas::identity::EndpointKey;
use schemas::ids::{DeviceId, DocId, DocKind, Role};
use schemas::metrics::Sample;
use schemas::registers::RegisterSpec;
use schemas::time::Timestamp;
use sync_core::authz::{Authz, PeerInfo};
use sync_core::docs;
use sync_core::driver::{DriverConfig, PeerStatus, SyncNode};
use sync_core::identity::NodeKey;
use sync_core::storage::SledStorage;
use sync_core::store::{DocStore, StoreConfig};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::alarms::{AlarmEngine, AlarmTransition, UnreachableRule};
use crate::clock::Clock;
use crate::commands::{ActuatorError, CommandExecutor, CommandLedger};
use crate::control::{CoilActuator, JitterStats, LoopEvent, LoopOptions, LoopParams, LoopRunner};
use crate::directory::EdgeDirectory;
use crate::metrics::Counters;
use crate::modbus::{AdapterOptions, DeviceEvent, DeviceHandle, DeviceRunner, LatestValues};
use crate::raw_zone::{RawZone, RawZoneError, RawZoneOptions};
use crate::summariser::SummariserConfig;
use crate::summariser::pipeline::Pipeline;

use sink::{LocalBucket, StoreSink};

/// Why the node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The identity key could not be loaded or created.
    #[error("identity key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// The data directory could not be created.
    #[error("data directory {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    /// The document store could not be opened or written.
    #[error("document store: {0}")]
    Store(String),
    /// The raw zone could not be opened.
    #[error("raw zone: {0}")]
    RawZone(#[from] RawZoneError),
    /// The summariser pipeline could not start or flush.
    #[error("summariser: {0}")]
    Summariser(String),
    /// The command ledger could not be opened.
    #[error("command ledger: {0}")]
    Ledger(String),
    /// A device, loop or alarm rule from the config could not start.
    #[error("{0}")]
    Config(String),
    /// The sync endpoint could not start.
    #[error("sync: {0}")]
    Sync(String),
    /// The HTTP listener could not bind.
    #[error("http listen {addr}: {reason}")]
    Http { addr: SocketAddr, reason: String },
}

/// Tuning of a node; defaults suit a real site, tests shorten the periods.
#[derive(Clone)]
pub struct NodeOptions {
    /// The node's clock (wall and monotonic).
    pub clock: Arc<dyn Clock>,
    /// Device adapter tuning.
    pub adapter: AdapterOptions,
    /// Control loop runner tuning.
    pub loops: LoopOptions,
    /// How often the summariser pipeline runs.
    pub pipeline_every: Duration,
    /// Summariser flush interval for open windows (ms); `None`: default.
    pub summariser_flush_ms: Option<i64>,
    /// Reported values are rewritten at most this often (health and loop
    /// changes are written at once).
    pub reported_every: Duration,
    /// Raise an alarm when a device is unreachable for this long.
    pub unreachable_alarm_ms: u64,
    /// Serve the local HTTP API.
    pub http: bool,
    /// Start the sync endpoint.
    pub sync: bool,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("pipeline_every", &self.pipeline_every)
            .field("reported_every", &self.reported_every)
            .finish_non_exhaustive()
    }
}

impl NodeOptions {
    /// Defaults with the given clock.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        NodeOptions {
            clock,
            adapter: AdapterOptions::default(),
            loops: LoopOptions::default(),
            pipeline_every: Duration::from_secs(1),
            summariser_flush_ms: None,
            reported_every: Duration::from_secs(30),
            unreachable_alarm_ms: UnreachableRule::default().delay_ms,
            http: true,
            sync: true,
        }
    }
}

/// Static description of a loop, for the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoopInfo {
    pub name: String,
    pub device: DeviceId,
    pub kind: &'static str,
    pub sensor: String,
    pub output: String,
    pub period_ms: u64,
}

/// What the HTTP API and the node's tasks share.
pub struct NodeState {
    pub cfg: EdgeConfig,
    pub key: EndpointKey,
    pub store: Arc<DocStore>,
    pub clock: Arc<dyn Clock>,
    pub values: LatestValues,
    pub counters: Arc<Counters>,
    pub directory: Arc<EdgeDirectory>,
    pub local_rollups: Arc<LocalBucket>,
    pub(crate) devices: BTreeMap<DeviceId, DeviceHandle>,
    pub(crate) loops: Mutex<Vec<LoopRunner>>,
    pub(crate) loop_info: Vec<LoopInfo>,
    pub(crate) loop_events: Mutex<VecDeque<LoopEvent>>,
    pub(crate) alarms: Mutex<AlarmEngine>,
    pub(crate) sync: Mutex<Option<SyncNode>>,
    pub(crate) raw: RawZone,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("key", &self.key.short())
            .finish_non_exhaustive()
    }
}

/// Most recent loop events kept for the API.
const LOOP_EVENTS_KEPT: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NodeState {
    /// The handle of a configured device.
    pub fn device(&self, id: &DeviceId) -> Option<&DeviceHandle> {
        self.devices.get(id)
    }

    /// Per-peer sync status (empty when sync is off).
    pub fn sync_status(&self) -> BTreeMap<EndpointKey, PeerStatus> {
        lock(&self.sync)
            .as_ref()
            .map(SyncNode::status)
            .unwrap_or_default()
    }

    /// Static loop descriptions.
    pub fn loop_info(&self) -> &[LoopInfo] {
        &self.loop_info
    }

    /// `(name, state, jitter)` of every running loop.
    pub fn loop_states(&self) -> Vec<(String, LoopState, Option<JitterStats>)> {
        lock(&self.loops)
            .iter()
            .map(|r| (r.name().to_string(), r.state(), r.jitter()))
            .collect()
    }

    /// Recent loop events, oldest first.
    pub fn loop_events(&self) -> Vec<LoopEvent> {
        lock(&self.loop_events).iter().cloned().collect()
    }

    /// Alarms the engine holds (raised since start), newest first.
    pub fn engine_alarms(&self) -> Vec<Alarm> {
        let g = lock(&self.alarms);
        let mut v: Vec<Alarm> = g.active().into_iter().cloned().collect();
        v.reverse();
        v
    }

    /// Acknowledge an alarm in its day document (and in the engine if it
    /// holds it). `Ok(None)`: no such alarm.
    pub fn ack_alarm(&self, id: &str, by: &str) -> Result<Option<Alarm>, AckFailure> {
        let now = self.clock.now();
        let raised = {
            let g = lock(&self.alarms);
            g.get(id).map(|a| a.raised_at)
        };
        let raised = match raised {
            Some(t) => t,
            None => match id.rsplit(':').next().and_then(|ms| ms.parse::<i64>().ok()) {
                Some(ms) => Timestamp(ms),
                None => return Ok(None),
            },
        };
        let doc = DocId::alarms(&self.cfg.node.tenant, &self.cfg.node.site, raised.day());
        let existing = self
            .store
            .read(&doc, docs::alarms::alarms)
            .map_err(|e| AckFailure::Store(e.to_string()))?;
        let Some(Ok(list)) = existing else {
            return Ok(None);
        };
        let Some(alarm) = list.into_iter().find(|a| a.id == id) else {
            return Ok(None);
        };
        if let (Some(by), Some(at)) = (&alarm.acked_by, alarm.acked_at) {
            return Err(AckFailure::Already { by: by.clone(), at });
        }
        self.store
            .change(&doc, now, |d| docs::alarms::ack(d, id, by, now))
            .map_err(|e| AckFailure::Store(e.to_string()))?;
        let _ = lock(&self.alarms).acknowledge(id, by, now);
        let mut a = alarm;
        a.acked_by = Some(by.to_string());
        a.acked_at = Some(now);
        Ok(Some(a))
    }
}

/// Why an acknowledgement failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AckFailure {
    /// Someone acknowledged it first.
    #[error("already acknowledged by {by} at {at}")]
    Already { by: String, at: Timestamp },
    /// The alarm document could not be read or written.
    #[error("alarm document: {0}")]
    Store(String),
}

/// A running edge node.
pub struct EdgeNode {
    state: Arc<NodeState>,
    shutdown: watch::Sender<bool>,
    device_runners: Vec<DeviceRunner>,
    tasks: Vec<JoinHandle<()>>,
    pump: Option<JoinHandle<()>>,
    loop_rt: Option<loop_runtime::LoopRuntime>,
    ingest: Option<crate::ingest::IngestHandle>,
    acker: Option<JoinHandle<()>>,
    pipeline: Option<JoinHandle<Result<(), String>>>,
    http: Option<(SocketAddr, JoinHandle<()>)>,
    sync_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for EdgeNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeNode")
            .field("key", &self.state.key.short())
            .finish_non_exhaustive()
    }
}

fn loop_info(l: &LoopConfig) -> LoopInfo {
    match l {
        LoopConfig::Thermostat {
            name,
            device,
            sensor,
            output,
            period_ms,
            ..
        } => LoopInfo {
            name: name.clone(),
            device: device.clone(),
            kind: "thermostat",
            sensor: sensor.clone(),
            output: output.clone(),
            period_ms: *period_ms,
        },
        LoopConfig::Interlock {
            name,
            device,
            sensor,
            output,
            period_ms,
            ..
        } => LoopInfo {
            name: name.clone(),
            device: device.clone(),
            kind: "interlock",
            sensor: sensor.clone(),
            output: output.clone(),
            period_ms: *period_ms,
        },
    }
}

impl EdgeNode {
    /// Start everything `cfg` describes. Returns once the node is serving;
    /// [`EdgeNode::ready_line`] says where.
    pub async fn start(cfg: EdgeConfig, opts: NodeOptions) -> Result<EdgeNode, NodeError> {
        let data = cfg.node.data_dir.clone();
        std::fs::create_dir_all(&data).map_err(|e| NodeError::DataDir {
            path: data.clone(),
            reason: e.to_string(),
        })?;
        let key_path = cfg.key_path();
        let node_key = NodeKey::load_or_create(&key_path).map_err(|e| NodeError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let key = node_key.public();
        let clock = opts.clock.clone();
        let storage = SledStorage::open(&data.join("docs"))
            .map_err(|e| NodeError::Store(format!("open {}: {e}", data.join("docs").display())))?;
        let store = Arc::new(
            DocStore::open(
                Arc::new(storage),
                node_key.clone(),
                node_key.new_actor(),
                StoreConfig::default(),
            )
            .map_err(|e| NodeError::Store(e.to_string()))?,
        );
        let counters = Arc::new(Counters::default());
        let (raw, recovery) =
            RawZone::open(data.join("raw"), RawZoneOptions::from_config(&cfg.raw))?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                "raw zone: cut a torn tail after a crash"
            );
        }
        let local = Arc::new(
            LocalBucket::open(&data.join("local-rollups.json"))
                .map_err(|e| NodeError::Summariser(e.to_string()))?,
        );
        let mut scfg = SummariserConfig::from_config(&cfg.summariser);
        if let Some(ms) = opts.summariser_flush_ms {
            scfg.flush_interval_ms = ms;
        }
        let sink = StoreSink::new(
            store.clone(),
            clock.clone(),
            cfg.node.tenant.clone(),
            cfg.node.site.clone(),
            local.clone(),
            counters.clone(),
        );
        let ck_path = data.join("summariser.checkpoint");
        let pipeline = tokio::task::spawn_blocking({
            let raw = raw.clone();
            move || Pipeline::open(raw, ck_path, scfg, sink).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| NodeError::Summariser(e.to_string()))?
        .map_err(NodeError::Summariser)?;

        let directory =
            Arc::new(EdgeDirectory::new(&cfg).map_err(|e| NodeError::Config(e.to_string()))?);

        // Devices.
        let (ev_tx, ev_rx) = mpsc::channel::<DeviceEvent>(8192);
        let values = LatestValues::new();
        let mut device_runners = Vec::new();
        let mut devices = BTreeMap::new();
        for d in &cfg.devices {
            let r = crate::modbus::spawn_device(
                d.clone(),
                opts.adapter.clone(),
                clock.clone(),
                values.clone(),
                ev_tx.clone(),
            )
            .map_err(|e| NodeError::Config(e.to_string()))?;
            devices.insert(d.id.clone(), r.handle());
            device_runners.push(r);
        }
        let now = clock.now();
        for d in &cfg.devices {
            let id = DocId::device_doc(&cfg.node.tenant, &cfg.node.site, &d.id);
            if let Err(e) = store.change(&id, now, |doc| {
                docs::device::set_meta(doc, &d.device_type, &d.tags)
            }) {
                tracing::error!(device = %d.id, error = %e, "writing device metadata failed");
            }
        }

        // Control loops.
        let (loop_ev_tx, loop_ev_rx) = mpsc::channel::<LoopEvent>(1024);
        let mut loop_rt = loop_runtime::LoopRuntime::start()
            .map_err(|e| NodeError::Config(format!("start the control loop thread: {e}")))?;
        let journal = if cfg.control.tick_journal {
            let j = crate::control::TickJournal::open(
                &data.join(crate::control::TICK_JOURNAL_FILE),
                cfg.control.tick_journal_capacity,
                clock.clone(),
            )
            .map_err(|e| NodeError::Config(e.to_string()))?;
            let h = j.handle();
            loop_rt.attach_journal(j);
            Some(h)
        } else {
            None
        };
        let mut loops = Vec::new();
        let mut params_tx: Vec<(LoopConfig, LoopParams, watch::Sender<LoopParams>)> = Vec::new();
        for l in &cfg.loops {
            let base = LoopParams::from_config(l);
            let initial = effective_params(&store, &cfg, l, &base);
            let (tx, rx) = watch::channel(initial);
            let Some(handle) = devices.get(l.device()) else {
                return Err(NodeError::Config(format!(
                    "loop {}: device {} is not configured",
                    l.name(),
                    l.device()
                )));
            };
            let output = match l {
                LoopConfig::Thermostat { output, .. } | LoopConfig::Interlock { output, .. } => {
                    output.clone()
                }
            };
            // Spawned on the loops' own runtime thread.
            let _guard = loop_rt.handle().enter();
            let runner = crate::control::spawn_loop_journaled(
                l,
                rx,
                values.clone(),
                Arc::new(CoilActuator::new(handle.clone(), output)),
                clock.clone(),
                loop_ev_tx.clone(),
                opts.loops.clone(),
                journal.as_ref(),
            )
            .map_err(|e| NodeError::Config(e.to_string()))?;
            loops.push(runner);
            params_tx.push((l.clone(), base, tx));
        }
        drop(loop_ev_tx);

        let engine = AlarmEngine::new(
            cfg.alarms.clone(),
            Some(UnreachableRule {
                delay_ms: opts.unreachable_alarm_ms,
                ..UnreachableRule::default()
            }),
        )
        .map_err(|e| NodeError::Config(e.to_string()))?;

        let (ledger, interrupted) =
            CommandLedger::open(data.join("commands.ledger"), now, &key.to_string())
                .map_err(|e| NodeError::Ledger(e.to_string()))?;
        let executor = CommandExecutor::new(ledger, cfg.node.site.clone(), key.to_string());

        let state = Arc::new(NodeState {
            loop_info: cfg.loops.iter().map(loop_info).collect(),
            cfg: cfg.clone(),
            key,
            store: store.clone(),
            clock: clock.clone(),
            values: values.clone(),
            counters: counters.clone(),
            directory: directory.clone(),
            local_rollups: local,
            devices,
            loops: Mutex::new(loops),
            loop_events: Mutex::new(VecDeque::new()),
            alarms: Mutex::new(engine),
            sync: Mutex::new(None),
            raw: raw.clone(),
        });
        // The devices hold the other senders: the pump ends when they stop.
        drop(ev_tx);

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Event pump: samples -> raw zone (+ alarm engine).
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(event_pump(state.clone(), ev_rx, ack_tx));
        let acker = tokio::spawn(ack_counter(state.clone(), ack_rx));
        tasks.push(tokio::spawn(loop_event_recorder(state.clone(), loop_ev_rx)));
        tasks.push(tokio::spawn(alarm_ticker(
            state.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(desired_watcher(
            state.clone(),
            params_tx,
            store.subscribe(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(reported_writer(
            state.clone(),
            opts.reported_every,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(command_task(
            state.clone(),
            executor,
            interrupted,
            store.subscribe(),
            shutdown_rx.clone(),
        )));
        let pipeline = tokio::spawn(pipeline_task(
            state.clone(),
            pipeline,
            opts.pipeline_every,
            shutdown_rx.clone(),
        ));

        // Push ingest (MQTT, HTTP): samples enter like polled ones.
        let ingest = crate::ingest::start(
            &cfg,
            Arc::new(NodeSink {
                state: state.clone(),
            }),
            clock.clone(),
        )
        .await
        .map_err(|e| NodeError::Config(e.to_string()))?;

        // Sync.
        let mut sync_addr = None;
        if opts.sync {
            let authz = Arc::new(Authz::new(
                PeerInfo {
                    key,
                    role: Role::Edge,
                    tenant: Some(cfg.node.tenant.clone()),
                    site: Some(cfg.node.site.clone()),
                },
                None,
            ));
            let node = SyncNode::spawn(
                &node_key,
                store.clone(),
                authz,
                directory.clone(),
                DriverConfig {
                    bind: cfg.listen.sync,
                    ..DriverConfig::default()
                },
            )
            .await
            .map_err(|e| NodeError::Sync(e.to_string()))?;
            sync_addr = node.local_addrs().into_iter().find(SocketAddr::is_ipv4);
            if let Some(h) = &cfg.hub {
                node.dial(h.endpoint_id, h.addr)
                    .map_err(|e| NodeError::Sync(format!("hub: {e}")))?;
            }
            for p in &cfg.peers {
                node.dial(p.endpoint_id, p.addr)
                    .map_err(|e| NodeError::Sync(format!("peer {}: {e}", p.endpoint_id.short())))?;
            }
            if let Some(r) = directory.registry() {
                tasks.push(r.clone().follow(store.clone()));
            }
            if let Some(h) = &cfg.hub
                && let Some(token) = &h.join_token
                && directory.registry_seq().is_none()
            {
                tasks.push(tokio::spawn(enrol_task(
                    directory.clone(),
                    node.endpoint().clone(),
                    h.endpoint_id,
                    h.addr,
                    token.clone(),
                    shutdown_rx.clone(),
                )));
            }
            *lock(&state.sync) = Some(node);
        }

        // HTTP.
        let mut http = None;
        if opts.http {
            let listener = tokio::net::TcpListener::bind(cfg.listen.http)
                .await
                .map_err(|e| NodeError::Http {
                    addr: cfg.listen.http,
                    reason: e.to_string(),
                })?;
            let addr = listener.local_addr().map_err(|e| NodeError::Http {
                addr: cfg.listen.http,
                reason: e.to_string(),
            })?;
            let app = crate::http::router(state.clone(), Some(crate::ingest::router(&ingest)));
            let mut rx = shutdown_rx.clone();
            let task = tokio::spawn(async move {
                let r = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "http server failed");
                }
            });
            http = Some((addr, task));
        }

        Ok(EdgeNode {
            state,
            shutdown,
            device_runners,
            tasks,
            pump: Some(pump),
            loop_rt: Some(loop_rt),
            ingest: Some(ingest),
            acker: Some(acker),
            pipeline: Some(pipeline),
            http,
            sync_addr,
        })
    }

    /// Shared state (for in-process callers and tests).
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// The node's endpoint id.
    pub fn endpoint_id(&self) -> EndpointKey {
        self.state.key
    }

    /// The bound sync (QUIC) address.
    pub fn sync_addr(&self) -> Option<SocketAddr> {
        self.sync_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(a, _)| *a)
    }

    /// The line printed when the node is ready (a fleet runner waits for it).
    pub fn ready_line(&self) -> String {
        let sync = self
            .sync_addr
            .map_or_else(|| "off".to_string(), |a| a.to_string());
        let http = self
            .http_addr()
            .map_or_else(|| "off".to_string(), |a| format!("http://{a}"));
        format!("ready edge={} sync={sync} http={http}", self.state.key)
    }

    /// Stop loops, devices, sync; summarise and flush everything.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        if let Some(i) = self.ingest.take() {
            i.stop().await;
        }
        let loops = std::mem::take(&mut *lock(&self.state.loops));
        for l in loops {
            l.stop().await;
        }
        if let Some(rt) = self.loop_rt.take() {
            rt.shutdown().await;
        }
        for d in self.device_runners.drain(..) {
            d.stop().await;
        }
        // The pump ends once the device tasks (its only senders) are gone,
        // after appending what they queued; then wait for the
        // acknowledgements in flight.
        if let Some(p) = self.pump.take() {
            let _ = p.await;
        }
        if let Some(a) = self.acker.take() {
            let _ = a.await;
        }
        // Now the pipeline sees every durable sample: its final flush_all
        // summarises them all.
        let _ = self.shutdown.send(true);
        let mut result = Ok(());
        if let Some(p) = self.pipeline.take() {
            match p.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(NodeError::Summariser(e)),
                Err(e) => result = Err(NodeError::Summariser(e.to_string())),
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        let sync = lock(&self.state.sync).take();
        if let Some(s) = sync {
            s.shutdown().await;
        }
        if let Some((_, h)) = self.http.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        if let Err(e) = self.state.store.flush() {
            result = Err(NodeError::Store(e.to_string()));
        }
        result
    }
}

/// The ingest sink: pushed samples go where polled ones go (latest
/// values for the loops, alarm engine, raw zone, hence the summariser), and
/// are accepted only once the raw zone says they are durable.
struct NodeSink {
    state: Arc<NodeState>,
}

impl crate::ingest::SampleSink for NodeSink {
    fn accept(
        &self,
        samples: Vec<Sample>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let st = &self.state;
            let mut acks = Vec::with_capacity(samples.len());
            let mut durable = 0u64;
            for s in samples {
                let now = st.clock.now();
                st.values.set(
                    &s.device,
                    &s.metric,
                    crate::modbus::Latest {
                        reading: Reading {
                            value: s.value,
                            ts: s.ts,
                        },
                        received: st.clock.monotonic(),
                    },
                );
                let t = lock(&st.alarms).observe(&s.device, &s.metric, s.value, now);
                write_alarms(st, &t);
                Counters::add(&st.counters.samples_polled, 1);
                match st.raw.try_append(s) {
                    Ok(ack) => acks.push(ack),
                    Err(RawZoneError::QueueFull { sample, .. }) => {
                        st.raw.append(*sample).await.map_err(|e| {
                            Counters::add(&st.counters.samples_refused, 1);
                            format!("raw zone: {e}")
                        })?;
                        durable += 1;
                    }
                    Err(e) => {
                        Counters::add(&st.counters.samples_refused, 1);
                        return Err(format!("raw zone: {e}"));
                    }
                }
            }
            for a in acks {
                a.await.map_err(|e| {
                    Counters::add(&st.counters.samples_refused, 1);
                    format!("raw zone: {e}")
                })?;
                durable += 1;
            }
            Counters::add(&st.counters.samples_acknowledged, durable);
            Ok(())
        })
    }
}

/// First start with a join token: enrol with the hub, retrying with
/// backoff (1 s doubling to 60 s) while it is unreachable; stop on a
/// refusal (the token will not get better). The registry that comes back
/// is adopted and saved, and from then on the directory follows it.
async fn enrol_task(
    directory: Arc<EdgeDirectory>,
    endpoint: iroh::Endpoint,
    hub: EndpointKey,
    addr: SocketAddr,
    token: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if directory.registry_seq().is_some() {
            // The registry reached us by sync first.
            return;
        }
        tracing::info!(hub = %hub.short(), %addr, "enrolling with the hub");
        match sync_core::enrol::enrol(&endpoint, hub, addr, &token).await {
            Ok(signed) => match directory.adopt_enrolment(&signed) {
                Ok(seq) => {
                    tracing::info!(seq, "enrolled; registry adopted");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "enrolled, but the registry could not be adopted")
                }
            },
            Err(
                e @ (sync_core::enrol::EnrolError::Transport { .. }
                | sync_core::enrol::EnrolError::Timeout(_)),
            ) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "hub unreachable for enrolment; retrying");
            }
            Err(e) => {
                tracing::error!(error = %e, "enrolment refused; fix hub.join_token and restart");
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// The loop's parameters from its config defaults plus the device
/// document's effective desired fields; the defaults if they do not fit.
fn effective_params(
    store: &DocStore,
    cfg: &EdgeConfig,
    l: &LoopConfig,
    base: &LoopParams,
) -> LoopParams {
    let id = DocId::device_doc(&cfg.node.tenant, &cfg.node.site, l.device());
    let fields: BTreeMap<String, FieldValue> = match store.read(&id, docs::device::desired) {
        Ok(Some(Ok(d))) => d.into_iter().map(|(k, f)| (k, f.effective)).collect(),
        Ok(None) => BTreeMap::new(),
        Ok(Some(Err(e))) => {
            tracing::warn!(doc = %id, error = %e, "desired config unreadable; using loop defaults");
            BTreeMap::new()
        }
        Err(e) => {
            tracing::warn!(doc = %id, error = %e, "device document unreadable; using loop defaults");
            BTreeMap::new()
        }
    };
    match base.with_fields(l.name(), &fields) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "desired config does not fit the loop; using its defaults");
            base.clone()
        }
    }
}

async fn event_pump(
    state: Arc<NodeState>,
    mut rx: mpsc::Receiver<DeviceEvent>,
    acks: mpsc::UnboundedSender<crate::raw_zone::AppendAck>,
) {
    while let Some(ev) = rx.recv().await {
        let now = state.clock.now();
        if let DeviceEvent::Sample(s) = &ev {
            Counters::add(&state.counters.samples_polled, 1);
            match state.raw.try_append(s.clone()) {
                Ok(ack) => {
                    let _ = acks.send(ack);
                }
                Err(RawZoneError::QueueFull { sample, .. }) => {
                    // Backpressure: wait for the writer (this task only; the
                    // loops read the latest-values cell, not this queue).
                    match state.raw.append(*sample).await {
                        Ok(_) => Counters::add(&state.counters.samples_acknowledged, 1),
                        Err(e) => {
                            Counters::add(&state.counters.samples_refused, 1);
                            tracing::error!(error = %e, "raw zone refused a sample");
                        }
                    }
                }
                Err(e) => {
                    Counters::add(&state.counters.samples_refused, 1);
                    tracing::error!(error = %e, "raw zone refused a sample");
                }
            }
        }
        let transitions = lock(&state.alarms).observe_event(&ev, now);
        write_alarms(&state, &transitions);
    }
}

async fn ack_counter(
    state: Arc<NodeState>,
    mut rx: mpsc::UnboundedReceiver<crate::raw_zone::AppendAck>,
) {
    while let Some(ack) = rx.recv().await {
        match ack.await {
            Ok(_) => Counters::add(&state.counters.samples_acknowledged, 1),
            Err(e) => {
                Counters::add(&state.counters.samples_refused, 1);
                tracing::error!(error = %e, "raw zone did not store a sample");
            }
        }
    }
}

async fn loop_event_recorder(state: Arc<NodeState>, mut rx: mpsc::Receiver<LoopEvent>) {
    while let Some(ev) = rx.recv().await {
        tracing::info!(loop_name = %ev.loop_name, output = ev.output, reason = %ev.reason, "loop event");
        Counters::add(&state.counters.loop_events, 1);
        let mut g = lock(&state.loop_events);
        if g.len() >= LOOP_EVENTS_KEPT {
            g.pop_front();
        }
        g.push_back(ev);
    }
}

/// Write alarm transitions into their day's alarm document. Alarms raised
/// while the wall clock is implausible are kept in the engine (and the
/// API) only: their day would be 1970.
fn write_alarms(state: &NodeState, transitions: &[AlarmTransition]) {
    let now = state.clock.now();
    for t in transitions {
        let a = t.alarm();
        tracing::info!(alarm = %a.id, active = a.is_active(), message = %a.message, "alarm transition");
        if !a.raised_at.is_plausible() {
            tracing::warn!(alarm = %a.id, "wall clock not set; alarm kept locally, not filed under a day");
            continue;
        }
        let id = DocId::alarms(
            &state.cfg.node.tenant,
            &state.cfg.node.site,
            a.raised_at.day(),
        );
        match state
            .store
            .change(&id, now, |d| docs::alarms::put_alarm(d, a))
        {
            Ok(()) => Counters::add(&state.counters.alarm_transitions, 1),
            Err(e) => {
                Counters::add(&state.counters.store_errors, 1);
                tracing::error!(alarm = %a.id, error = %e, "writing alarm failed");
            }
        }
    }
}

async fn alarm_ticker(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = state.clock.now();
        let t = {
            let mut g = lock(&state.alarms);
            g.prune(now.saturating_add_ms(-schemas::time::MS_PER_DAY));
            g.tick(now)
        };
        write_alarms(&state, &t);
    }
}

async fn desired_watcher(
    state: Arc<NodeState>,
    loops: Vec<(LoopConfig, LoopParams, watch::Sender<LoopParams>)>,
    mut changes: broadcast::Receiver<sync_core::store::Changed>,
    mut stop: watch::Receiver<bool>,
) {
    let refresh = |device: Option<&DeviceId>| {
        for (l, base, tx) in &loops {
            if device.is_some_and(|d| d != l.device()) {
                continue;
            }
            let p = effective_params(&state.store, &state.cfg, l, base);
            tx.send_if_modified(|cur| {
                if *cur == p {
                    false
                } else {
                    tracing::info!(loop_name = l.name(), params = ?p, "loop parameters changed");
                    *cur = p;
                    true
                }
            });
        }
    };
    // The document may have changed between start and subscription.
    refresh(None);
    loop {
        let ev = tokio::select! {
            ev = changes.recv() => ev,
            _ = stop.wait_for(|s| *s) => return,
        };
        match ev {
            Ok(c) if c.id.kind() == DocKind::Device => refresh(c.id.device()),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => refresh(None),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn loop_states_by_device(state: &NodeState) -> BTreeMap<DeviceId, BTreeMap<String, LoopState>> {
    let mut out: BTreeMap<DeviceId, BTreeMap<String, LoopState>> = BTreeMap::new();
    for (name, st, _) in state.loop_states() {
        if let Some(info) = state.loop_info.iter().find(|i| i.name == name) {
            out.entry(info.device.clone()).or_default().insert(name, st);
        }
    }
    out
}

/// The reported state of a device now.
pub(crate) fn reported_now(
    state: &NodeState,
    device: &DeviceId,
    loops: BTreeMap<String, LoopState>,
) -> ReportedState {
    let mut values = BTreeMap::new();
    if let Some(d) = state.cfg.device(device) {
        for r in &d.registers {
            if let Some(l) = state.values.get(device, &r.name) {
                values.insert(r.name.clone(), l.reading);
            }
        }
    }
    ReportedState {
        schema_version: Default::default(),
        values,
        health: state
            .devices
            .get(device)
            .map(DeviceHandle::health)
            .unwrap_or_default(),
        loops,
        software_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        owner: Some(state.key.to_string()),
    }
}

/// Throttled writer of reported state: health or loop changes at once (on
/// the next 250 ms check), values at most every `every`.
async fn reported_writer(state: Arc<NodeState>, every: Duration, mut stop: watch::Receiver<bool>) {
    type Essence = (
        schemas::device::HealthStatus,
        Vec<(String, bool, Option<u64>, bool)>,
    );
    let essence = |r: &ReportedState| -> Essence {
        (
            r.health.status,
            r.loops
                .iter()
                .map(|(n, l)| {
                    (
                        n.clone(),
                        l.output,
                        l.setpoint.map(f64::to_bits),
                        l.fail_safe,
                    )
                })
                .collect(),
        )
    };
    let mut last: BTreeMap<DeviceId, (Essence, BTreeMap<String, Reading>, tokio::time::Instant)> =
        BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(every));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut by_dev = loop_states_by_device(&state);
        let now = state.clock.now();
        let mono = tokio::time::Instant::now();
        for d in &state.cfg.devices {
            let r = reported_now(&state, &d.id, by_dev.remove(&d.id).unwrap_or_default());
            let e = essence(&r);
            let due = match last.get(&d.id) {
                None => true,
                Some((le, lv, at)) => *le != e || (*lv != r.values && mono - *at >= every),
            };
            if !due {
                continue;
            }
            let id = DocId::device_doc(&state.cfg.node.tenant, &state.cfg.node.site, &d.id);
            match state
                .store
                .change(&id, now, |doc| docs::device::set_reported(doc, &r))
            {
                Ok(()) => {
                    Counters::add(&state.counters.reported_writes, 1);
                    last.insert(d.id.clone(), (e, r.values, mono));
                }
                Err(e) => {
                    Counters::add(&state.counters.store_errors, 1);
                    tracing::error!(device = %d.id, error = %e, "writing reported state failed");
                }
            }
        }
    }
}

/// The executor's effects: Modbus writes through the device task, desired
/// config through the device document.
struct NodeActuator {
    state: Arc<NodeState>,
}

impl crate::commands::Actuator for NodeActuator {
    fn write_coil(
        &self,
        device: &DeviceId,
        register: &RegisterSpec,
        value: bool,
    ) -> impl std::future::Future<Output = Result<(), ActuatorError>> + Send {
        let h = self.state.devices.get(device).cloned();
        let name = register.name.clone();
        let device = device.clone();
        async move {
            let h = h.ok_or_else(|| ActuatorError(format!("device {device} is not running")))?;
            h.write_coil(&name, value)
                .await
                .map_err(|e| ActuatorError(e.to_string()))
        }
    }

    fn write_register(
        &self,
        device: &DeviceId,
        register: &RegisterSpec,
        value: f64,
    ) -> impl std::future::Future<Output = Result<(), ActuatorError>> + Send {
        let h = self.state.devices.get(device).cloned();
        let name = register.name.clone();
        let device = device.clone();
        async move {
            let h = h.ok_or_else(|| ActuatorError(format!("device {device} is not running")))?;
            h.write_register(&name, value)
                .await
                .map_err(|e| ActuatorError(e.to_string()))
        }
    }

    fn set_desired(
        &self,
        device: &DeviceId,
        field: &FieldSpec,
        value: &FieldValue,
    ) -> impl std::future::Future<Output = Result<(), ActuatorError>> + Send {
        let state = self.state.clone();
        let id = DocId::device_doc(&state.cfg.node.tenant, &state.cfg.node.site, device);
        let r = state.store.change(&id, state.clock.now(), |doc| {
            docs::device::set_desired(doc, &field.name, value)
        });
        std::future::ready(r.map_err(|e| ActuatorError(e.to_string())))
    }
}

fn write_result(state: &NodeState, doc: &DocId, r: &CommandResult) {
    Counters::add(&state.counters.commands_handled, 1);
    tracing::info!(command = %r.command_id, status = ?r.status, reason = %r.reason, "command result");
    if let Err(e) = state
        .store
        .change(doc, state.clock.now(), |d| docs::commands::put_result(d, r))
    {
        Counters::add(&state.counters.store_errors, 1);
        tracing::error!(command = %r.command_id, error = %e, "writing command result failed");
    }
}

async fn handle_command_doc(state: &Arc<NodeState>, exec: &mut CommandExecutor, doc: &DocId) {
    let read = state.store.read(doc, |d| {
        let reqs = docs::commands::requests(d).map(|(r, _bad)| r);
        let done = docs::commands::results(d);
        (reqs, done)
    });
    let (reqs, done) = match read {
        Ok(Some((Ok(r), Ok(d)))) => (r, d),
        Ok(None) => return,
        Ok(Some((Err(e), _) | (_, Err(e)))) => {
            tracing::error!(doc = %doc, error = %e, "command document unreadable");
            return;
        }
        Err(e) => {
            tracing::error!(doc = %doc, error = %e, "command document unreadable");
            return;
        }
    };
    let actuator = NodeActuator {
        state: state.clone(),
    };
    for cmd in reqs {
        if done.contains_key(&cmd.id) || !state.devices.contains_key(&cmd.target) {
            continue;
        }
        let r = exec
            .handle(&cmd, state.clock.now(), &state.cfg, &actuator)
            .await;
        write_result(state, doc, &r);
    }
}

async fn command_task(
    state: Arc<NodeState>,
    mut exec: CommandExecutor,
    interrupted: Vec<CommandResult>,
    mut changes: broadcast::Receiver<sync_core::store::Changed>,
    mut stop: watch::Receiver<bool>,
) {
    let (t, s) = (&state.cfg.node.tenant, &state.cfg.node.site);
    let ours = |id: &DocId| {
        id.kind() == DocKind::Commands && id.tenant() == Some(t) && id.site() == Some(s)
    };
    let today = state.clock.now().day();
    let mut recent: Vec<DocId> = state
        .store
        .list()
        .into_iter()
        .filter(|id| ours(id))
        .collect();
    recent.retain(|id| {
        id.day()
            .is_some_and(|d| d.days_since_epoch() + 2 >= today.days_since_epoch())
    });
    // Results of commands cut short by the last crash go to whichever
    // recent document holds their request.
    for r in &interrupted {
        for id in &recent {
            let has = state
                .store
                .read(id, |d| {
                    docs::commands::requests(d)
                        .map(|(v, _)| v.iter().any(|c| c.id == r.command_id))
                        .unwrap_or(false)
                })
                .ok()
                .flatten()
                .unwrap_or(false);
            if has {
                write_result(&state, id, r);
            }
        }
    }
    for id in &recent {
        handle_command_doc(&state, &mut exec, id).await;
    }
    loop {
        let ev = tokio::select! {
            ev = changes.recv() => ev,
            _ = stop.wait_for(|s| *s) => return,
        };
        match ev {
            Ok(c) if ours(&c.id) => handle_command_doc(&state, &mut exec, &c.id).await,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let ids: Vec<DocId> = state
                    .store
                    .list()
                    .into_iter()
                    .filter(|id| ours(id))
                    .collect();
                for id in ids {
                    handle_command_doc(&state, &mut exec, &id).await;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn pipeline_task(
    state: Arc<NodeState>,
    pipeline: Pipeline<StoreSink>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut p = Some(pipeline);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut steps: u64 = 0;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let Some(mut pl) = p.take() else {
            return Err("pipeline lost".into());
        };
        let now = state.clock.now();
        let retention = steps.is_multiple_of(60);
        steps += 1;
        let (pl, r) = tokio::task::spawn_blocking(move || {
            let r = if stopping {
                pl.flush_all(now)
            } else {
                pl.step(now)
            };
            if retention && let Err(e) = pl.enforce_retention(now) {
                tracing::warn!(error = %e, "raw zone retention failed");
            }
            (pl, r)
        })
        .await
        .map_err(|e| format!("summariser thread: {e}"))?;
        match r {
            Ok(_) => {}
            Err(e) => {
                Counters::add(&state.counters.pipeline_errors, 1);
                tracing::error!(error = %e, "summariser step failed; retrying");
                if stopping {
                    return Err(e.to_string());
                }
            }
        }
        if stopping {
            return Ok(());
        }
        p = Some(pl);
    }
}
