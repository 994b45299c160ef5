//! The fleet runner behind `chaos run SCENARIO`: start a real local fleet
//! behind a relay mesh, play the scenario's timeline, wait for quiescence,
//! collect observations into a [`RunRecord`], and stop everything.
//!
//! Order of start-up (each step needs the one before):
//! 1. plan: directories and a fixed sync port per node ([`FleetPlan`]);
//! 2. identities: `cloud-hub init` per hub (prints its endpoint id), an
//!    edge key per edge (`NodeKey::load_or_create`, the same file the
//!    edge opens);
//! 0. with [`Isolation::Netns`], one network namespace per node
//!    ([`NetnsSet`]); nodes bind inside, relays and devices on each node's
//!    gateway;
//! 3. the relay mesh, one relay per linked pair, targets the fixed ports;
//! 4. simulated devices per edge (testbed, in process);
//! 5. join tokens (`cloud-hub token create`) and an admin API token
//!    (`cloud-hub user token create --scope admin`);
//! 6. configs, checked by [`super::plan::check_routing`], then the hubs
//!    (`cloud-hub --config hub.toml serve`) and the edges
//!    (`edge-node run --config edge.toml`), each awaited by its `ready`
//!    line (inside its namespace: `ip netns exec`);
//! 7. with namespaces, direct-path probes between every pair of nodes,
//!    recorded for the isolation checker.
//!
//! Relay counters are snapshotted at every link change, so the record
//! holds, per direction and per fault window, how many datagrams were
//! forwarded: for a partition window that number must be zero
//! ([`crate::check::isolation`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use schemas::identity::EndpointKey;
use serde_json::json;
use tokio::time::Instant;

use super::http;
use super::plan::{FleetPlan, NodePlan, check_routing, loopback_addrs, netns_addrs};
use super::process::{LogBuffer, NodeProcess, find_binary, run_helper};
use super::{FleetError, Isolation};
use crate::check::isolation::{DirectProbe, IsolationSetup};
use crate::check::{LogLine, OpType, RelayWindow, ReplicaHeads, RunRecord};
use crate::link::Direction;
use crate::mesh::RelayMesh;
use crate::netns::NetnsSet;
use crate::scenario::{Action, DeviceFault, FloodKind, LinkChange, NodeRole, Scenario};

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `cloud-hub` binary.
    pub hub_bin: PathBuf,
    /// The `edge-node` binary.
    pub edge_bin: PathBuf,
    /// Root directory of the run (configs, data, logs).
    pub root: PathBuf,
    /// How long a node may take to print `ready`.
    pub ready_timeout: Duration,
    /// How long a helper command or an HTTP call may take.
    pub call_timeout: Duration,
    /// Simulated device seconds per real second.
    pub device_time_scale: f64,
    /// Run even if the scenario has actions the runner cannot carry out
    /// (they are recorded as failed operations).
    pub allow_unsupported: bool,
    /// How the nodes are kept apart ([`Isolation::Netns`]: one network
    /// namespace per node, needs root; `chaos run` defaults to it).
    pub isolation: Isolation,
    /// The `chaos` binary, run inside each namespace for the direct-path
    /// probes (`chaos netns-probe`).
    pub probe_bin: PathBuf,
}

impl RunOptions {
    /// Defaults: binaries next to `chaos` (else on `PATH`), 30 s to get
    /// ready, 10 s per call, devices at real time, loopback isolation (so
    /// a library caller opts in to what needs root).
    pub fn new(root: PathBuf) -> RunOptions {
        RunOptions {
            hub_bin: find_binary("cloud-hub"),
            edge_bin: find_binary("edge-node"),
            root,
            ready_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(10),
            device_time_scale: 1.0,
            allow_unsupported: false,
            isolation: Isolation::Loopback,
            probe_bin: find_binary("chaos"),
        }
    }
}

/// One step of the timeline as the runner carries it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Set a relay direction's faults.
    Link(LinkChange),
    /// Any other action.
    Act(Action),
}

/// Create an admin API token for user `name` on a hub (before it runs:
/// `cloud-hub user token create`); a user has one token.
async fn admin_token(hub: &NodePlan, opts: &RunOptions, name: &str) -> Result<String, FleetError> {
    let out = run_helper(
        &hub.name,
        &opts.hub_bin,
        &[
            "--config".into(),
            hub.config_path().display().to_string(),
            "user".into(),
            "token".into(),
            "create".into(),
            "--scope".into(),
            "admin".into(),
            "--name".into(),
            name.into(),
        ],
        opts.call_timeout,
    )
    .await?;
    Ok(out.lines().last().unwrap_or("").trim().to_string())
}

/// What an HTTP request flood got back.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HttpFloodCounts {
    /// 2xx answers.
    pub ok: u64,
    /// 429 answers (the per-token rate limit working).
    pub rate_limited: u64,
    /// Any other status.
    pub other_status: u64,
    /// Transport errors and timeouts.
    pub errors: u64,
    /// Ticks skipped because 8 requests were already in flight.
    pub skipped: u64,
}

/// Why an action cannot be carried out by this runner, if so.
pub fn unsupported(a: &Action, s: &Scenario) -> Option<String> {
    let role = |n: &str| s.fleet.role(n);
    match a {
        Action::Command { from, .. } if !matches!(role(from), Some(NodeRole::Hub { .. })) => Some(
            format!("command from {from}: only the hub API can create commands"),
        ),
        _ => None,
    }
}

/// The timeline as steps, in time order (link changes from
/// [`Scenario::link_changes`], everything else as written).
pub fn schedule(s: &Scenario) -> Vec<(Duration, Step)> {
    let mut out: Vec<(Duration, Step)> = s
        .link_changes()
        .into_iter()
        .map(|c| (c.at, Step::Link(c)))
        .collect();
    for ta in &s.timeline {
        let is_link = matches!(
            ta.action,
            Action::Partition { .. }
                | Action::Heal { .. }
                | Action::Loss { .. }
                | Action::Delay { .. }
                | Action::Duplicate { .. }
                | Action::Reorder { .. }
                | Action::Bandwidth { .. }
                | Action::ClearFaults { .. }
        );
        if !is_link {
            out.push((ta.at, Step::Act(ta.action.clone())));
        }
    }
    out.sort_by_key(|(at, _)| *at);
    out
}

/// The testbed fault line of a scenario device fault.
pub fn device_fault_line(id: &str, f: DeviceFault) -> String {
    match f {
        DeviceFault::Timeout => format!("fault {id} slow:5000"),
        DeviceFault::Exception => format!("fault {id} exception:server-device-failure"),
        DeviceFault::Disconnect => format!("fault {id} drop"),
        DeviceFault::Stuck => format!("fault {id} stuck"),
        DeviceFault::OutOfRange => format!("fault {id} spikes:*:1:1000"),
        DeviceFault::Clear => format!("clear {id}"),
    }
}

/// A running fleet.
pub struct Fleet {
    plan: FleetPlan,
    opts: RunOptions,
    mesh: RelayMesh,
    procs: BTreeMap<String, NodeProcess>,
    logs: BTreeMap<String, LogBuffer>,
    http: BTreeMap<String, SocketAddr>,
    devices: BTreeMap<String, testbed::fleet::RunningFleet>,
    keys: BTreeMap<String, EndpointKey>,
    /// Every hub's admin token, by node name.
    admin_tokens: BTreeMap<String, String>,
    start: Instant,
    record: RunRecord,
    /// Open fault windows per (link, direction): since, counters then.
    windows: BTreeMap<(String, String), (i64, String, crate::link::DirectionCounters)>,
    /// Nodes started with a clock offset file (the scenario skews them).
    clock_skewed: std::collections::BTreeSet<String>,
    /// Reconnect floods running beside the timeline: process, handle.
    floods: Vec<(String, tokio::task::JoinHandle<super::flood::FloodCounts>)>,
    /// HTTP request floods running beside the timeline: process, handle.
    http_floods: Vec<(String, tokio::task::JoinHandle<HttpFloodCounts>)>,
    /// The first hub's second admin token, for HTTP floods.
    flood_token: Option<String>,
    /// Live heads of every node's documents from the last quiescence poll
    /// (convergence judges these, see [`Fleet::wait_quiescent`]).
    live_replicas: Option<Vec<ReplicaHeads>>,
    /// The nodes' network namespaces; declared last, so on drop the
    /// processes above are killed before the namespaces are deleted.
    netns: Option<NetnsSet>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("nodes", &self.procs.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |source| FleetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_toml(path: &std::path::Path, v: &impl serde::Serialize) -> Result<(), FleetError> {
    let text =
        toml::to_string(v).map_err(|e| FleetError::Plan(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(io(path))
}

impl Fleet {
    fn args(&self, n: &NodePlan) -> Vec<String> {
        let cfg = n.config_path().display().to_string();
        if n.is_hub() {
            vec!["--config".into(), cfg, "serve".into()]
        } else {
            vec!["run".into(), "--config".into(), cfg]
        }
    }

    fn bin(&self, n: &NodePlan) -> PathBuf {
        if n.is_hub() {
            self.opts.hub_bin.clone()
        } else {
            self.opts.edge_bin.clone()
        }
    }

    /// Milliseconds since the timeline started.
    pub fn now_ms(&self) -> i64 {
        self.start.elapsed().as_millis() as i64
    }

    /// Plan, wire and start a fleet for `s`. On error, whatever was
    /// started is stopped (processes are killed on drop).
    pub async fn start(s: &Scenario, opts: RunOptions) -> Result<Fleet, FleetError> {
        for ta in &s.timeline {
            if let Some(why) = unsupported(&ta.action, s)
                && !opts.allow_unsupported
            {
                return Err(FleetError::Unsupported(format!(
                    "{} at {} ms: {why} (--allow-unsupported records it as a failed operation)",
                    ta.action.name(),
                    ta.at.as_millis()
                )));
            }
        }
        std::fs::create_dir_all(&opts.root).map_err(io(&opts.root))?;
        // Namespaces first: the plan places nodes in them. Any error
        // below drops the set, which deletes them again.
        let netns = match opts.isolation {
            Isolation::Netns => Some(NetnsSet::create(s.fleet.nodes().len())?),
            Isolation::Loopback => None,
        };
        let plan = match &netns {
            Some(set) => FleetPlan::new(s, &opts.root, &mut netns_addrs(set))?,
            None => FleetPlan::new(s, &opts.root, &mut loopback_addrs)?,
        };
        for n in &plan.nodes {
            std::fs::create_dir_all(n.data_dir()).map_err(io(&n.dir))?;
        }
        // Identities.
        let mut keys = BTreeMap::new();
        for n in &plan.nodes {
            let key = if n.is_hub() {
                let cfg = plan.hub_config(n, s, None)?;
                write_toml(&n.config_path(), &cfg)?;
                let out = run_helper(
                    &n.name,
                    &opts.hub_bin,
                    &[
                        "--config".into(),
                        n.config_path().display().to_string(),
                        "init".into(),
                    ],
                    opts.call_timeout,
                )
                .await?;
                let line = out.lines().last().unwrap_or("").trim();
                line.parse::<EndpointKey>()
                    .map_err(|e| FleetError::Command {
                        node: n.name.clone(),
                        command: "cloud-hub init".into(),
                        detail: format!("printed {line:?}, not an endpoint id: {e}"),
                    })?
            } else {
                sync_core::identity::NodeKey::load_or_create(&n.key_path())
                    .map_err(|e| FleetError::Plan(format!("{}: key: {e}", n.name)))?
                    .public()
            };
            keys.insert(n.name.clone(), key);
        }
        // Relays between the fixed ports, each side on the gateway of the
        // node that talks to it.
        let mesh =
            RelayMesh::spawn_on(&plan.links, &plan.real_addrs(), &plan.gateways(), s.seed).await?;
        let dial = |from: &str, to: &str| mesh.dial_addr(from, to);
        // Hub configs, with the upstream global hub if any.
        let mut hub_cfgs = Vec::new();
        for n in plan.nodes.iter().filter(|n| n.is_hub()) {
            let up = plan
                .neighbours(&n.name)
                .into_iter()
                .filter(|p| {
                    matches!(
                        s.fleet.role(p),
                        Some(NodeRole::Hub {
                            tier: schemas::policy::HubTier::Global,
                            ..
                        })
                    )
                })
                .find_map(|p| Some((*keys.get(p)?, dial(&n.name, p)?)));
            let up = if matches!(
                n.role,
                NodeRole::Hub {
                    tier: schemas::policy::HubTier::Global,
                    ..
                }
            ) {
                None
            } else {
                up
            };
            let cfg = plan.hub_config(n, s, up)?;
            write_toml(&n.config_path(), &cfg)?;
            hub_cfgs.push((n.name.clone(), cfg));
        }
        // Devices, tokens, edge configs.
        let mut devices = BTreeMap::new();
        let mut edge_cfgs = Vec::new();
        let dev_opts = testbed::fleet::FleetOptions {
            seed: s.seed,
            time_scale: opts.device_time_scale,
            ..Default::default()
        };
        for n in plan.nodes.iter().filter(|n| !n.is_hub()) {
            // Devices listen on the edge's gateway: the edge reaches them,
            // no other node does.
            let any = SocketAddr::new(n.gateway, 0);
            let cfgs: Vec<_> = n
                .devices
                .iter()
                .map(|d| testbed::maps::device_config(d.kind, d.id.clone(), any))
                .collect();
            let running = testbed::fleet::start_fleet(&cfgs, &dev_opts)
                .await
                .map_err(|e| FleetError::Plan(format!("{}: devices: {e}", n.name)))?;
            let addrs: BTreeMap<String, SocketAddr> = n
                .devices
                .iter()
                .zip(&running.devices)
                .map(|(d, r)| (d.path.clone(), r.server.addr()))
                .collect();
            devices.insert(n.name.clone(), running);
            let NodeRole::Edge { tenant, site } = &n.role else {
                continue;
            };
            let hub = plan
                .neighbours(&n.name)
                .into_iter()
                .find(|p| plan.node(p).is_some_and(|p| p.is_hub()));
            let token = match hub.and_then(|h| plan.node(h)) {
                Some(h) => Some(
                    run_helper(
                        &h.name,
                        &opts.hub_bin,
                        &[
                            "--config".into(),
                            h.config_path().display().to_string(),
                            "token".into(),
                            "create".into(),
                            "--tenant".into(),
                            tenant.to_string(),
                            "--site".into(),
                            site.to_string(),
                            "--role".into(),
                            "edge".into(),
                            "--ttl".into(),
                            "1h".into(),
                            "--reason".into(),
                            format!("chaos run {}", s.name),
                        ],
                        opts.call_timeout,
                    )
                    .await?,
                ),
                None => None,
            };
            let cfg = plan.edge_config(n, &keys, &dial, token, &addrs)?;
            write_toml(&n.config_path(), &cfg)?;
            edge_cfgs.push((n.name.clone(), cfg));
        }
        check_routing(&plan, &edge_cfgs, &hub_cfgs)?;
        // An admin token for each hub's API (the scenario's hub steps, live
        // heads), and one for HTTP floods: another client, its own user.
        let mut admin_tokens = BTreeMap::new();
        let mut flood_token = None;
        for (i, h) in plan.nodes.iter().filter(|n| n.is_hub()).enumerate() {
            match admin_token(h, &opts, "chaos").await {
                Ok(t) => {
                    admin_tokens.insert(h.name.clone(), t);
                }
                Err(e) => {
                    tracing::warn!(hub = %h.name, error = %e, "no admin token: its API steps and live heads will fail")
                }
            }
            if i == 0 {
                flood_token = admin_token(h, &opts, "chaos-flood")
                    .await
                    .map_err(|e| tracing::warn!(error = %e, "no flood token: HTTP floods go unauthenticated"))
                    .ok();
            }
        }
        let mut record = RunRecord::from_scenario(s);
        record.observations.downtime.clear();
        let mut fleet = Fleet {
            plan,
            opts,
            mesh,
            procs: BTreeMap::new(),
            logs: BTreeMap::new(),
            http: BTreeMap::new(),
            devices,
            keys,
            admin_tokens,
            start: Instant::now(),
            record,
            windows: BTreeMap::new(),
            clock_skewed: super::clock::skewed_nodes(s),
            floods: Vec::new(),
            http_floods: Vec::new(),
            flood_token,
            live_replicas: None,
            netns,
        };
        let names: Vec<String> = fleet.plan.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            fleet.start_node(&name).await?;
        }
        fleet.record.isolation = Some(fleet.probe_direct_paths().await?);
        fleet.start = Instant::now();
        Ok(fleet)
    }

    /// The nodes' network namespaces, when isolated by namespaces.
    pub fn netns(&self) -> Option<&NetnsSet> {
        self.netns.as_ref()
    }

    /// The record's isolation setup so far (mode and direct-path probes).
    pub fn isolation(&self) -> Option<&IsolationSetup> {
        self.record.isolation.as_ref()
    }

    /// With namespaces: from inside every node's namespace, send a UDP
    /// datagram to and open a TCP connection to every other node's real
    /// sync address (all must find no route), and open a TCP connection to
    /// the node's own gateway, where nothing listens on that port: a
    /// `refused` answer shows the probe itself can reach what the node
    /// should reach. The record gets every result.
    async fn probe_direct_paths(&self) -> Result<IsolationSetup, FleetError> {
        let mut probes = Vec::new();
        let within = Duration::from_secs(2);
        for n in &self.plan.nodes {
            let Some(ns) = &n.netns else {
                continue;
            };
            let others: Vec<&NodePlan> = self
                .plan
                .nodes
                .iter()
                .filter(|o| o.name != n.name)
                .collect();
            let targets: Vec<SocketAddr> = others.iter().map(|o| o.sync).collect();
            let control = SocketAddr::new(n.gateway, 9);
            let mut tcp = targets.clone();
            tcp.push(control);
            let found =
                crate::netns::probe_from(ns, &self.opts.probe_bin, &targets, &tcp, &[], within)
                    .await?;
            for o in found {
                let to = if o.target == control {
                    if o.outcome != "refused" && o.outcome != "connected" {
                        return Err(FleetError::Process {
                            node: n.name.clone(),
                            detail: format!(
                                "from namespace {ns} its own gateway {control} is not reachable ({}: {}): the namespace is broken",
                                o.outcome, o.detail
                            ),
                        });
                    }
                    "gateway".to_string()
                } else {
                    others
                        .iter()
                        .find(|x| x.sync == o.target)
                        .map(|x| x.name.clone())
                        .unwrap_or_else(|| o.target.to_string())
                };
                probes.push(DirectProbe {
                    from: n.name.clone(),
                    to,
                    proto: o.proto,
                    target: o.target.to_string(),
                    outcome: o.outcome,
                    detail: o.detail,
                });
            }
        }
        Ok(IsolationSetup {
            mode: self.opts.isolation.as_str().to_string(),
            probes,
        })
    }

    async fn start_node(&mut self, name: &str) -> Result<(), FleetError> {
        let n = self
            .plan
            .node(name)
            .cloned()
            .ok_or_else(|| FleetError::Plan(format!("no node {name}")))?;
        let log = self.logs.entry(n.name.clone()).or_default().clone();
        let env = super::clock::node_env(&n, &self.clock_skewed);
        let (bin, args) = super::clock::with_env(self.bin(&n), self.args(&n), &env);
        let p = NodeProcess::start(
            &n.name,
            &bin,
            &args,
            n.netns.as_deref(),
            &n.log_path(),
            log,
            self.opts.ready_timeout,
        )
        .await?;
        if let Some(sync) = p.ready().sync
            && sync != n.sync
        {
            return Err(FleetError::Routing(format!(
                "{}: bound {sync}, the relays expect {}",
                n.name, n.sync
            )));
        }
        if let Some(h) = p.ready().http {
            self.http.insert(n.name.clone(), h);
        }
        self.procs.insert(n.name.clone(), p);
        Ok(())
    }

    fn history(&mut self, process: &str, kind: OpType, f: &str, value: serde_json::Value) {
        let t = self.now_ms();
        self.record.history.push(process, kind, f, value, t);
    }

    fn window_key(c: &LinkChange) -> (String, String) {
        (
            c.link.to_string(),
            match c.direction {
                Direction::AToB => "a-to-b".into(),
                Direction::BToA => "b-to-a".into(),
            },
        )
    }

    fn counters(&self, c: &LinkChange) -> Option<crate::link::DirectionCounters> {
        let (from, to) = match c.direction {
            Direction::AToB => (&c.link.a, &c.link.b),
            Direction::BToA => (&c.link.b, &c.link.a),
        };
        self.mesh.counters(from, to)
    }

    fn close_window(&mut self, key: &(String, String), now: crate::link::DirectionCounters) {
        if let Some((from_ms, label, before)) = self.windows.remove(key) {
            let to_ms = self.now_ms();
            self.record.relay_windows.push(RelayWindow {
                link: key.0.clone(),
                direction: key.1.clone(),
                faults: label,
                from_ms,
                to_ms,
                packets_in: now.packets_in - before.packets_in,
                forwarded: now.forwarded - before.forwarded,
                dropped_partition: now.dropped_partition - before.dropped_partition,
                dropped_other: now.dropped()
                    - before.dropped()
                    - (now.dropped_partition - before.dropped_partition),
            });
        }
    }

    fn apply_link(&mut self, c: &LinkChange) -> Result<(), FleetError> {
        let key = Self::window_key(c);
        let now = self.counters(c).unwrap_or_default();
        self.close_window(&key, now);
        self.mesh.apply(c)?;
        if c.faults != crate::link::LinkFaults::clean() {
            let label = if c.faults.partitioned {
                "partition".to_string()
            } else {
                format!("{:?}", c.faults)
            };
            self.windows.insert(key, (self.now_ms(), label, now));
        }
        Ok(())
    }

    async fn hub_api(
        &self,
        hub: &str,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<http::Response, String> {
        let addr = self
            .http
            .get(hub)
            .ok_or_else(|| format!("{hub} has no HTTP address (down?)"))?;
        http::request(
            method,
            *addr,
            path,
            self.admin_tokens.get(hub).map(String::as_str),
            Some(&body),
            self.opts.call_timeout,
        )
        .await
        .map_err(|e| e.to_string())
    }

    async fn act(&mut self, a: &Action, s: &Scenario) -> Result<(), FleetError> {
        if let Some(why) = unsupported(a, s) {
            self.history("chaos/runner", OpType::Invoke, a.name(), json!({}));
            self.history(
                "chaos/runner",
                OpType::Fail,
                a.name(),
                json!({"error": why}),
            );
            return Ok(());
        }
        match a {
            Action::Kill { node } => {
                if let Some(p) = self.procs.remove(node) {
                    p.kill9().await?;
                    self.http.remove(node);
                    let t = self.now_ms();
                    self.record
                        .observations
                        .downtime
                        .push(crate::scenario::NodeSpan {
                            node: node.clone(),
                            from_ms: t,
                            to_ms: i64::MAX,
                        });
                }
            }
            Action::Restart { node } => {
                self.start_node(node).await?;
                let t = self.now_ms();
                if let Some(span) = self
                    .record
                    .observations
                    .downtime
                    .iter_mut()
                    .rev()
                    .find(|d| &d.node == node && d.to_ms == i64::MAX)
                {
                    span.to_ms = t;
                }
            }
            Action::EditConfig {
                node,
                device,
                field,
                value,
            } => {
                let process = format!("{node}/operator");
                let id = super::plan::device_id(device)?;
                let v = json!({"device": device, "field": field, "value": value});
                self.history(&process, OpType::Invoke, "edit-config", v.clone());
                let is_hub = self.plan.node(node).is_some_and(|n| n.is_hub());
                let r = if is_hub {
                    // No hub endpoint edits desired config directly yet: send
                    // it as a set_desired command (executed by the edge).
                    let (tenant, site) = self.site_of(device)?;
                    self.hub_api(
                        node,
                        "POST",
                        "/api/v1/commands",
                        json!({"tenant": tenant, "site": site, "target": id, "action": "set_desired",
                               "field": field, "value": value, "reason": "chaos edit-config"}),
                    )
                    .await
                } else {
                    match self.http.get(node) {
                        Some(addr) => http::request(
                            "PUT",
                            *addr,
                            &format!("/api/devices/{id}/desired/{field}"),
                            None,
                            Some(&json!({"value": value, "by": "chaos"})),
                            self.opts.call_timeout,
                        )
                        .await
                        .map_err(|e| e.to_string()),
                        None => Err(format!("{node} is down")),
                    }
                };
                if is_hub {
                    self.complete_command(&process, "edit-config", r);
                } else {
                    self.complete(&process, "edit-config", r);
                }
            }
            Action::Command {
                from,
                device,
                id,
                register,
                value,
                deliveries,
            } => {
                let target = super::plan::device_id(device)?;
                let (tenant, site) = self.site_of(device)?;
                for _ in 0..*deliveries {
                    let process = format!("{from}/api");
                    self.history(
                        &process,
                        OpType::Invoke,
                        "command",
                        json!({"id": id, "device": device}),
                    );
                    let r = self
                        .hub_api(
                            from,
                            "POST",
                            "/api/v1/commands",
                            json!({"tenant": tenant, "site": site, "target": target, "action": "write_register",
                                   "register": register, "value": value, "idempotency_key": id,
                                   "reason": "chaos command"}),
                        )
                        .await;
                    self.complete_command(&process, "command", r);
                }
            }
            Action::DeviceFault { device, fault, .. } => {
                let (edge, d) = self
                    .plan
                    .device(device)
                    .map(|(n, d)| (n.name.clone(), d.id.to_string()))
                    .ok_or_else(|| FleetError::Plan(format!("no device {device}")))?;
                let line = device_fault_line(&d, *fault);
                let r = self
                    .devices
                    .get(&edge)
                    .ok_or_else(|| format!("no devices on {edge}"))
                    .and_then(|f| f.control(&line).map_err(|e| e.to_string()));
                self.history(
                    "chaos/devices",
                    OpType::Invoke,
                    "device-fault",
                    json!({"line": line}),
                );
                self.complete(
                    "chaos/devices",
                    "device-fault",
                    r.map(|m| http::Response {
                        status: 200,
                        body: m,
                    }),
                );
            }
            Action::ClockSkew { node, change } => {
                let process = format!("{node}/clock");
                let n = self
                    .plan
                    .node(node)
                    .cloned()
                    .ok_or_else(|| FleetError::Plan(format!("no node {node}")))?;
                let path = super::clock::offset_path(&n);
                self.history(
                    &process,
                    OpType::Invoke,
                    "clock-skew",
                    json!({"node": node, "change": change, "file": path}),
                );
                match super::clock::apply(&path, *change, super::clock::system_now_ms()) {
                    Ok(ms) => self.history(
                        &process,
                        OpType::Ok,
                        "clock-skew",
                        json!({"node": node, "offset_ms": ms, "running": self.procs.contains_key(node)}),
                    ),
                    Err(e) => self.history(
                        &process,
                        OpType::Fail,
                        "clock-skew",
                        json!({"node": node, "error": e.to_string()}),
                    ),
                }
            }
            Action::Flood {
                node,
                rate_per_sec,
                duration,
                kind: FloodKind::Reconnect,
            } => {
                let process = format!("chaos/reconnect-flood/{node}");
                let target = self.plan.node(node).map(|n| n.sync);
                let key = self.keys.get(node).copied();
                let (Some(addr), Some(key)) = (target, key) else {
                    self.history(
                        &process,
                        OpType::Invoke,
                        "reconnect-flood",
                        json!({"node": node}),
                    );
                    self.history(
                        &process,
                        OpType::Fail,
                        "reconnect-flood",
                        json!({"error": format!("no sync address or key for {node}")}),
                    );
                    return Ok(());
                };
                let spec = super::flood::FloodSpec::new(key, addr, *rate_per_sec, *duration);
                self.history(
                    &process,
                    OpType::Invoke,
                    "reconnect-flood",
                    json!({"node": node, "addr": addr.to_string(), "rate_per_sec": rate_per_sec,
                           "duration_ms": duration.as_millis() as u64}),
                );
                // Bounded by `duration` (plus the last attempts' hold); runs
                // beside the timeline, collected by `play`.
                let h = tokio::spawn(async move { super::flood::reconnect_flood(&spec).await });
                self.floods.push((process, h));
            }
            Action::Flood {
                node,
                rate_per_sec,
                duration,
                kind,
            } => {
                let Some(addr) = self.http.get(node).copied() else {
                    return Ok(());
                };
                let path = if self.plan.node(node).is_some_and(|n| n.is_hub()) {
                    "/api/v1/devices"
                } else {
                    "/api/devices"
                };
                // The flood is another client: its own token, so per-token
                // rate limits keep it from starving the scenario's operator.
                let token = self.flood_token.clone();
                let (rate, dur, kind) = (*rate_per_sec, *duration, *kind);
                let process = format!("{node}/flood");
                self.history(
                    &process,
                    OpType::Invoke,
                    "http-flood",
                    json!({"path": path, "rate_per_sec": rate, "duration_ms": dur.as_millis() as u64}),
                );
                // Bounded by `duration`; runs beside the timeline, a few
                // requests in flight at once.
                let h = tokio::spawn(async move {
                    let _ = kind;
                    let counts = Arc::new(std::sync::Mutex::new(HttpFloodCounts::default()));
                    let end = Instant::now() + dur;
                    let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
                    let mut tick = tokio::time::interval(gap);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    let inflight = Arc::new(tokio::sync::Semaphore::new(8));
                    let mut tasks = tokio::task::JoinSet::new();
                    while Instant::now() < end {
                        tick.tick().await;
                        let Ok(permit) = inflight.clone().try_acquire_owned() else {
                            if let Ok(mut c) = counts.lock() {
                                c.skipped += 1;
                            }
                            continue;
                        };
                        let (token, counts) = (token.clone(), counts.clone());
                        tasks.spawn(async move {
                            let r = http::request(
                                "GET",
                                addr,
                                path,
                                token.as_deref(),
                                None,
                                Duration::from_secs(2),
                            )
                            .await;
                            if let Ok(mut c) = counts.lock() {
                                match r {
                                    Ok(resp) if resp.ok() => c.ok += 1,
                                    Ok(resp) if resp.status == 429 => c.rate_limited += 1,
                                    Ok(_) => c.other_status += 1,
                                    Err(_) => c.errors += 1,
                                }
                            }
                            drop(permit);
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                    counts.lock().map(|c| c.clone()).unwrap_or_default()
                });
                self.http_floods.push((process, h));
            }
            _ => {}
        }
        Ok(())
    }

    /// Wait for the floods and record their counts. A reconnect flood is ok
    /// when the target refused every stranger that reached it and accepted
    /// none; an HTTP flood is ok when the node answered every request it
    /// was sent with a 2xx or a 429.
    async fn join_floods(&mut self) {
        for (process, h) in std::mem::take(&mut self.http_floods) {
            // A status other than 2xx/429 is the node failing under load;
            // transport errors may be the node being down (a kill in the
            // same scenario), so they leave it open.
            self.record_flood(&process, "http-flood", h.await, |c| {
                if c.other_status > 0 {
                    OpType::Fail
                } else if c.errors > 0 {
                    OpType::Info
                } else {
                    OpType::Ok
                }
            });
        }
        for (process, h) in std::mem::take(&mut self.floods) {
            self.record_flood(&process, "reconnect-flood", h.await, |c| {
                if c.target_held() {
                    OpType::Ok
                } else {
                    OpType::Fail
                }
            });
        }
    }

    /// Record a finished flood's counts, with the outcome `judge` gives them.
    fn record_flood<T: serde::Serialize>(
        &mut self,
        process: &str,
        f: &str,
        joined: Result<T, tokio::task::JoinError>,
        judge: impl FnOnce(&T) -> OpType,
    ) {
        match joined {
            Ok(c) => {
                let kind = judge(&c);
                let v = serde_json::to_value(&c).unwrap_or_default();
                self.history(process, kind, f, v);
            }
            Err(e) => self.history(
                process,
                OpType::Info,
                f,
                json!({"error": format!("flood task: {e}")}),
            ),
        }
    }

    /// Like [`Fleet::complete`] for a hub `POST /api/v1/commands`: an ok
    /// answer's `command.id` (the id the hub assigned, which the edges
    /// execute under) goes into the history as `command_id`, so the
    /// commands checker knows it was issued.
    fn complete_command(&mut self, process: &str, f: &str, r: Result<http::Response, String>) {
        if let Ok(resp) = &r
            && resp.ok()
        {
            let id = serde_json::from_str::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|v| {
                    v.pointer("/command/id")
                        .and_then(|i| i.as_str())
                        .map(str::to_string)
                });
            let v = match id {
                Some(id) => json!({"status": resp.status, "command_id": id}),
                None => json!({"status": resp.status, "body": resp.body}),
            };
            self.history(process, OpType::Ok, f, v);
            return;
        }
        self.complete(process, f, r);
    }

    fn complete(&mut self, process: &str, f: &str, r: Result<http::Response, String>) {
        match r {
            Ok(resp) if resp.ok() => {
                self.history(process, OpType::Ok, f, json!({"status": resp.status}))
            }
            Ok(resp) if resp.status >= 500 => self.history(
                process,
                OpType::Info,
                f,
                json!({"status": resp.status, "body": resp.body}),
            ),
            Ok(resp) => self.history(
                process,
                OpType::Fail,
                f,
                json!({"status": resp.status, "body": resp.body}),
            ),
            // A transport error after sending may or may not have taken effect.
            Err(e) => self.history(process, OpType::Info, f, json!({"error": e})),
        }
    }

    fn site_of(&self, device: &str) -> Result<(String, String), FleetError> {
        match self.plan.device(device).map(|(n, _)| &n.role) {
            Some(NodeRole::Edge { tenant, site }) => Ok((tenant.to_string(), site.to_string())),
            _ => Err(FleetError::Plan(format!("no device {device}"))),
        }
    }

    /// Play the timeline to its end (`s.duration`), then heal and clear
    /// every link and restart every node still down.
    pub async fn play(&mut self, s: &Scenario) -> Result<(), FleetError> {
        for (at, step) in schedule(s) {
            tokio::time::sleep_until(self.start + at).await;
            match step {
                Step::Link(c) => self.apply_link(&c)?,
                Step::Act(a) => self.act(&a, s).await?,
            }
        }
        tokio::time::sleep_until(self.start + s.duration).await;
        self.join_floods().await;
        let links: Vec<_> = self.mesh.links().cloned().collect();
        for l in links {
            for d in Direction::BOTH {
                let c = LinkChange {
                    at: s.duration,
                    link: l.clone(),
                    direction: d,
                    faults: crate::link::LinkFaults::clean(),
                };
                self.apply_link(&c)?;
            }
        }
        let down: Vec<String> = self
            .plan
            .nodes
            .iter()
            .filter(|n| !self.procs.contains_key(&n.name))
            .map(|n| n.name.clone())
            .collect();
        for n in down {
            self.act(&Action::Restart { node: n }, s).await?;
        }
        Ok(())
    }

    /// Poll every edge's `/api/sync` until all of them report every peer
    /// connected with nothing behind or queued, three polls in a row, or
    /// until `timeout`. Returns when it first became quiet (ms since the
    /// start), `None` on timeout.
    pub async fn wait_quiescent(&mut self, timeout: Duration) -> Option<i64> {
        let deadline = Instant::now() + timeout;
        let mut quiet_since = None;
        let mut streak = 0;
        while Instant::now() < deadline {
            let mut all = true;
            for n in self.plan.nodes.iter().filter(|n| !n.is_hub()) {
                let quiet = match self.http.get(&n.name) {
                    Some(addr) => match http::request(
                        "GET",
                        *addr,
                        "/api/sync",
                        None,
                        None,
                        self.opts.call_timeout,
                    )
                    .await
                    {
                        Ok(r) if r.ok() => {
                            serde_json::from_str(&r.body).is_ok_and(|v| sync_quiet(&v))
                        }
                        _ => false,
                    },
                    None => false,
                };
                all &= quiet;
            }
            // Quiet links are not enough: the replicas that can reach each
            // other must hold the same heads, read live from every node.
            if all {
                match self.live_heads().await {
                    Ok(reps) => {
                        let o = crate::check::Observations {
                            nodes: self.record.observations.nodes.clone(),
                            replicas: reps.clone(),
                            ..Default::default()
                        };
                        let v = crate::check::convergence::check_linked(&o, &self.record.links);
                        all = v.status == crate::check::Status::Pass;
                        self.live_replicas = Some(reps);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "live heads");
                        all = false;
                    }
                }
            }
            if all {
                streak += 1;
                quiet_since.get_or_insert(self.now_ms());
                if streak >= 3 {
                    return quiet_since;
                }
            } else {
                streak = 0;
                quiet_since = None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        None
    }

    /// Every running node's document heads, from its HTTP API (edges:
    /// `/api/sync/heads`; hubs: `/api/v1/sync/heads` with the admin token).
    pub async fn live_heads(&self) -> Result<Vec<ReplicaHeads>, String> {
        let mut out = Vec::new();
        for n in &self.plan.nodes {
            let addr = self
                .http
                .get(&n.name)
                .ok_or_else(|| format!("{}: no HTTP address", n.name))?;
            let (path, token) = if n.is_hub() {
                let t = self
                    .admin_tokens
                    .get(&n.name)
                    .map(String::as_str)
                    .ok_or_else(|| format!("{}: no admin token for the hub API", n.name))?;
                ("/api/v1/sync/heads", Some(t))
            } else {
                ("/api/sync/heads", None)
            };
            let r = http::request("GET", *addr, path, token, None, self.opts.call_timeout)
                .await
                .map_err(|e| format!("{}: {e}", n.name))?;
            if !r.ok() {
                return Err(format!("{}: {path}: HTTP {}: {}", n.name, r.status, r.body));
            }
            let v: serde_json::Value =
                serde_json::from_str(&r.body).map_err(|e| format!("{}: {path}: {e}", n.name))?;
            let docs = v
                .get("documents")
                .and_then(|d| d.as_array())
                .ok_or_else(|| format!("{}: {path}: no documents list", n.name))?;
            for d in docs {
                let doc = d.get("doc").and_then(|x| x.as_str());
                let heads = d.get("heads").and_then(|x| x.as_array());
                let (Some(doc), Some(heads)) = (doc, heads) else {
                    return Err(format!("{}: {path}: malformed entry {d}", n.name));
                };
                out.push(ReplicaHeads {
                    node: n.name.clone(),
                    doc: doc.to_string(),
                    heads: heads
                        .iter()
                        .filter_map(|h| h.as_str().map(str::to_string))
                        .collect(),
                });
            }
        }
        Ok(out)
    }

    /// Stop every simulated device server (the writers' source).
    pub async fn stop_devices(&mut self) {
        for (edge, d) in std::mem::take(&mut self.devices) {
            if let Err(e) = d.stop().await {
                tracing::warn!(edge = %edge, error = %e, "stop devices");
            }
        }
        let t = self.now_ms();
        self.history("chaos/runner", OpType::Invoke, "stop-devices", json!({}));
        self.record
            .history
            .push("chaos/runner", OpType::Ok, "stop-devices", json!({}), t);
    }

    /// Stop every node (SIGTERM, so stores flush), read every replica's
    /// heads from its store, and return the record.
    pub async fn finish(mut self, converged_at_ms: Option<i64>) -> Result<RunRecord, FleetError> {
        self.record.observations.converged_at_ms = converged_at_ms;
        let end_ms = self.now_ms();
        self.record.observations.end_ms = end_ms;
        for span in &mut self.record.observations.downtime {
            span.to_ms = span.to_ms.min(end_ms);
        }
        // The run's start on the host's uptime and wall clock: nodes
        // record those, the record wants ms since the start (see
        // fleet::observe, "Times").
        let run_start = super::observe::RunStart::elapsed_ms_ago(end_ms);
        // Whole-run totals per relay direction, beside the fault windows.
        let links: Vec<_> = self.mesh.links().cloned().collect();
        for l in links {
            for (d, from, to) in [("a-to-b", &l.a, &l.b), ("b-to-a", &l.b, &l.a)] {
                let c = self.mesh.counters(from, to).unwrap_or_default();
                self.record.relay_windows.push(RelayWindow {
                    link: l.to_string(),
                    direction: d.to_string(),
                    faults: "total".to_string(),
                    from_ms: 0,
                    to_ms: end_ms,
                    packets_in: c.packets_in,
                    forwarded: c.forwarded,
                    dropped_partition: c.dropped_partition,
                    dropped_other: c.dropped() - c.dropped_partition,
                });
            }
        }
        // Edges first, hubs last: an edge's final flush can still reach
        // a running hub.
        let mut procs: Vec<(String, NodeProcess)> =
            std::mem::take(&mut self.procs).into_iter().collect();
        procs.sort_by_key(|(n, _)| self.plan.node(n).is_some_and(|p| p.is_hub()));
        for (name, p) in procs {
            if let Err(e) = p.stop(Duration::from_secs(10)).await {
                tracing::warn!(node = %name, error = %e, "stop");
            }
        }
        for (name, log) in &self.logs {
            for (i, text) in log.lines().into_iter().enumerate() {
                self.record.observations.logs.push(LogLine {
                    node: name.clone(),
                    line_no: i + 1,
                    text,
                });
            }
        }
        for n in &self.plan.nodes {
            match super::clock::read_local_rollups(n) {
                Ok(r) => self.record.observations.edge_local_rollups.extend(r),
                Err(e) => tracing::warn!(node = %n.name, error = %e, "no local rollups"),
            }
            match read_heads(n) {
                Ok(reps) => self.record.observations.stored_replicas.extend(reps),
                Err(e) => tracing::warn!(node = %n.name, error = %e, "no replica heads"),
            }
        }
        // Convergence judges the live heads of the quiet fleet; the stores'
        // heads after the stop only if the live ones could not be read.
        self.record.observations.replicas = match self.live_replicas.take() {
            Some(live) => live,
            None => self.record.observations.stored_replicas.clone(),
        };
        // Rollups, acknowledged samples, command executions, loop ticks and
        // holdings, from the stopped nodes' files.
        let files: Vec<_> = self
            .plan
            .nodes
            .iter()
            .map(super::observe::NodeFiles::of)
            .collect();
        let tenants = self.record.observations.tenants.clone();
        let seen = tokio::task::spawn_blocking(move || {
            super::observe::observe_fleet(&files, &tenants, run_start)
        })
        .await;
        let ob = &mut self.record.observations;
        match seen {
            Ok(seen) => {
                ob.hub_rollups.extend(seen.hub_rollups);
                ob.acked_samples.extend(seen.acked_samples);
                ob.indeterminate_samples.extend(seen.indeterminate_samples);
                ob.command_executions.extend(seen.command_executions);
                ob.loop_ticks.extend(seen.loop_ticks);
                ob.holdings.extend(seen.holdings);
                ob.unobserved.extend(seen.unobserved);
                if let Some(w) = seen.rollup_window_ms {
                    ob.rollup_window_ms = w;
                }
            }
            Err(e) => {
                for c in ["telemetry", "commands", "liveness", "compliance"] {
                    ob.unobserved.push(crate::check::Unobserved {
                        checker: c.into(),
                        node: "*".into(),
                        detail: format!("the observer failed: {e}"),
                    });
                }
            }
        }
        for (_, d) in std::mem::take(&mut self.devices) {
            let _ = d.stop().await;
        }
        self.mesh.shutdown().await?;
        let _ = &self.keys;
        Ok(self.record)
    }
}

/// Whether an edge's `/api/sync` answer shows it caught up: at least one
/// peer, every peer connected, no document behind, no byte queued.
pub fn sync_quiet(v: &serde_json::Value) -> bool {
    let Some(peers) = v.get("peers").and_then(|p| p.as_array()) else {
        return false;
    };
    !peers.is_empty()
        && peers.iter().all(|p| {
            p.get("connected").and_then(|c| c.as_bool()) == Some(true)
                && p.get("docs_behind").and_then(|c| c.as_u64()) == Some(0)
                && p.get("bytes_queued").and_then(|c| c.as_u64()) == Some(0)
        })
}

/// Load a scenario's fleet, play it, wait for quiescence and collect the
/// record. Everything started is stopped, on success and on error.
pub async fn run_scenario(s: &Scenario, opts: RunOptions) -> Result<RunRecord, FleetError> {
    let mut fleet = Fleet::start(s, opts).await?;
    if let Err(e) = fleet.play(s).await {
        let _ = fleet.finish(None).await;
        return Err(e);
    }
    // Quiesce the writers: with the devices gone no new sample arrives, so
    // after one summariser window the last rollups are written and can
    // sync. Convergence is judged on what the stores hold once the fleet
    // is quiet.
    fleet.stop_devices().await;
    tokio::time::sleep(Duration::from_secs(super::plan::SUMMARY_WINDOW_S + 2)).await;
    let converged = fleet.wait_quiescent(s.checks.quiescence_timeout).await;
    fleet.finish(converged).await
}

/// Read every document's heads from a stopped node's store
/// (`{data_dir}/docs`, sled).
pub fn read_heads(n: &NodePlan) -> Result<Vec<ReplicaHeads>, FleetError> {
    let dir = n.data_dir().join("docs");
    if !dir.exists() {
        return Err(FleetError::Plan(format!(
            "{}: no document store at {}",
            n.name,
            dir.display()
        )));
    }
    let key = sync_core::identity::NodeKey::load_or_create(&n.key_path())
        .map_err(|e| FleetError::Plan(format!("{}: key: {e}", n.name)))?;
    let storage = sync_core::storage::SledStorage::open(&dir)
        .map_err(|e| FleetError::Plan(format!("{}: open {}: {e}", n.name, dir.display())))?;
    let store = sync_core::store::DocStore::open(
        Arc::new(storage),
        key.clone(),
        key.new_actor(),
        sync_core::store::StoreConfig::default(),
    )
    .map_err(|e| FleetError::Plan(format!("{}: open store: {e}", n.name)))?;
    Ok(store
        .heads_hex()
        .into_iter()
        .map(|(id, heads)| ReplicaHeads {
            node: n.name.clone(),
            doc: id.to_string(),
            heads,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const S: &str = r#"
name = "t"
seed = 3
duration = "20s"
[[fleet.hubs]]
name = "hub-eu"
regions = ["eu"]
[[fleet.tenants]]
id = "acme"
region = "eu"
[[fleet.sites]]
tenant = "acme"
id = "s1"
edges = 2
devices_per_edge = 1
[[timeline]]
at = "2s"
action = "partition"
a = "s1/edge-1"
b = "hub-eu"
[[timeline]]
at = "5s"
action = "kill"
node = "s1/edge-1"
[[timeline]]
at = "8s"
action = "restart"
node = "s1/edge-1"
[[timeline]]
at = "9s"
action = "heal"
"#;

    #[test]
    fn the_schedule_interleaves_link_changes_and_actions_in_time_order() {
        let s = Scenario::parse(Path::new("t.toml"), S).unwrap();
        let steps = schedule(&s);
        let times: Vec<u64> = steps.iter().map(|(t, _)| t.as_secs()).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        // Partition both directions at 2 s, kill, restart, heal both at 9 s.
        let kinds: Vec<String> = steps
            .iter()
            .map(|(t, st)| match st {
                Step::Link(c) => format!(
                    "{}:{}",
                    t.as_secs(),
                    if c.faults.partitioned { "cut" } else { "heal" }
                ),
                Step::Act(a) => format!("{}:{}", t.as_secs(), a.name()),
            })
            .collect();
        assert_eq!(
            kinds,
            ["2:cut", "2:cut", "5:kill", "8:restart", "9:heal", "9:heal"]
        );
        assert!(steps.iter().all(|(_, st)| {
            unsupported(
                match st {
                    Step::Act(a) => a,
                    Step::Link(_) => return true,
                },
                &s,
            )
            .is_none()
        }));
    }

    #[test]
    fn quiet_means_every_peer_connected_and_caught_up() {
        let p = |c: bool, behind: u64, queued: u64| json!({"peer": "x", "connected": c, "docs_behind": behind, "bytes_queued": queued});
        assert!(sync_quiet(
            &json!({"peers": [p(true, 0, 0), p(true, 0, 0)]})
        ));
        assert!(!sync_quiet(
            &json!({"peers": [p(true, 0, 0), p(false, 0, 0)]})
        ));
        assert!(!sync_quiet(&json!({"peers": [p(true, 2, 0)]})));
        assert!(!sync_quiet(&json!({"peers": [p(true, 0, 10)]})));
        assert!(
            !sync_quiet(&json!({"peers": []})),
            "no peer is not caught up"
        );
        assert!(!sync_quiet(&json!({"error": "x"})));
    }

    #[test]
    fn unsupported_actions_say_why() {
        let s = Scenario::parse(Path::new("t.toml"), S).unwrap();
        let skew = Action::ClockSkew {
            node: "s1/edge-1".into(),
            change: crate::scenario::ClockChange::OffsetMs(60_000),
        };
        assert_eq!(unsupported(&skew, &s), None, "clock-skew is carried out");
        let storm = Action::Flood {
            node: "hub-eu".into(),
            kind: FloodKind::Reconnect,
            rate_per_sec: 10,
            duration: Duration::from_secs(1),
        };
        assert_eq!(
            unsupported(&storm, &s),
            None,
            "reconnect floods are carried out"
        );
        let cmd = Action::Command {
            from: "s1/edge-2".into(),
            device: "s1/edge-1/dev-1".into(),
            id: "c1".into(),
            register: "setpoint".into(),
            value: 1.0,
            deliveries: 1,
        };
        assert!(unsupported(&cmd, &s).unwrap().contains("hub API"));
        assert_eq!(device_fault_line("d", DeviceFault::Clear), "clear d");
        assert_eq!(
            device_fault_line("d", DeviceFault::Disconnect),
            "fault d drop"
        );
    }
}
