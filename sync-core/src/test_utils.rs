//! A deterministic simulator over the sans-IO [`Session`]: many nodes, each
//! with a real [`DocStore`] over [`MemStorage`], connected through a seeded
//! fake network with delays, cross-plane reordering, duplicated sync frames,
//! dropped connections, partitions, crashes (losing unflushed writes) and
//! restarts. A run has a safety phase with faults and concurrent edits, then a
//! liveness phase without faults that must converge by a deadline.
//!
//! Everything is driven by one seed: a failing seed replays exactly, and
//! [`SimReport::trace`] (a digest of every fault, edit, frame and the final
//! heads) shows that a replay is the same run, not merely the same counts.
//! Exported behind the `test-utils` feature for `chaos`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{ChangeHash, ReadDoc};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use schemas::device::FieldValue;
use schemas::ids::{DocId, Role};
use schemas::metrics::{Rollup, Sample};
use schemas::policy::{HubTier, Region};
use schemas::time::Timestamp;
use tokio::sync::broadcast;

use crate::authz::{Authz, HubScope, PeerInfo, StaticDirectory};
use crate::docs;
use crate::identity::{NodeKey, actor_for};
use crate::protocol::Plane;
use crate::session::{Session, SessionConfig};
use crate::storage::MemStorage;
use crate::store::{Changed, DocStore, StoreConfig};

/// Fault rates of a run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub edges: usize,
    pub steps: usize,
    pub step_ms: u64,
    pub max_delay_ms: u64,
    pub p_edit: f64,
    pub p_flush: f64,
    pub p_drop_conn: f64,
    pub p_partition: f64,
    pub p_heal: f64,
    pub p_crash: f64,
    pub p_restart: f64,
    pub p_dup: f64,
    /// Virtual time the liveness phase may take.
    pub liveness_deadline_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            edges: 2,
            steps: 150,
            step_ms: 10,
            max_delay_ms: 30,
            p_edit: 0.3,
            p_flush: 0.3,
            p_drop_conn: 0.02,
            p_partition: 0.02,
            p_heal: 0.05,
            p_crash: 0.01,
            p_restart: 0.1,
            p_dup: 0.05,
            liveness_deadline_ms: 60_000,
        }
    }
}

struct Node {
    info: PeerInfo,
    key: NodeKey,
    storage: MemStorage,
    store: Arc<DocStore>,
    authz: Arc<Authz>,
    feed: broadcast::Receiver<Changed>,
    alive: bool,
    /// Change hashes this node had when it last flushed: acknowledged.
    acked: BTreeMap<DocId, Vec<ChangeHash>>,
}

struct Link {
    a: usize,
    b: usize,
    /// Session at `a` for `b`, and at `b` for `a`.
    sessions: Option<(Session, Session)>,
    /// In flight: (deliver at ms, to index 0 = a / 1 = b, plane, bytes).
    wire: VecDeque<(u64, usize, Plane, Vec<u8>)>,
    last_due: [[u64; 2]; 2],
    partitioned: bool,
}

/// Outcome of one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub converged_at_ms: Option<u64>,
    pub edits: usize,
    pub crashes: usize,
    pub frames: u64,
    pub refused: u64,
    /// BLAKE3 of the run's trace: every fault and restart, every edit, every
    /// frame sent (time, link, side, plane, bytes) and the final heads of
    /// every replica. Equal digests mean the same run, byte for byte.
    pub trace: [u8; 32],
}

/// One simulated fleet: a hub and `edges` edges of one site.
pub struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    base: Instant,
    now_ms: u64,
    nodes: Vec<Node>,
    links: Vec<Link>,
    directory: Arc<StaticDirectory>,
    docs: Vec<DocId>,
    edits: usize,
    crashes: usize,
    frames: u64,
    refused: u64,
    limits: Vec<String>,
    trace: blake3::Hasher,
}

const EPOCH_MS: i64 = 1_800_000_000_000;

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let tenant: schemas::ids::TenantId = "acme".parse().unwrap_or_else(|_| unreachable!());
        let site: schemas::ids::SiteId = "s1".parse().unwrap_or_else(|_| unreachable!());
        let region = Region::new("eu").unwrap_or_else(|_| unreachable!());
        let mut directory = StaticDirectory::default();
        let mut infos = Vec::new();
        for i in 0..=cfg.edges {
            let node_key = NodeKey::from_bytes(rng.random::<[u8; 32]>());
            let key = node_key.public();
            let info = if i == 0 {
                PeerInfo {
                    key,
                    role: Role::Hub,
                    tenant: None,
                    site: None,
                }
            } else {
                PeerInfo {
                    key,
                    role: Role::Edge,
                    tenant: Some(tenant.clone()),
                    site: Some(site.clone()),
                }
            };
            directory.insert(info.clone());
            infos.push((info, node_key));
        }
        let hub_scope = HubScope {
            tier: HubTier::Regional,
            regions: vec![region.clone()],
            tenant_regions: [(tenant.clone(), region)].into_iter().collect(),
        };
        let day = Timestamp(EPOCH_MS).day();
        let docs: Vec<DocId> = vec![
            DocId::device_doc(
                &tenant,
                &site,
                &"pump-1".parse().unwrap_or_else(|_| unreachable!()),
            ),
            DocId::device_doc(
                &tenant,
                &site,
                &"room-1".parse().unwrap_or_else(|_| unreachable!()),
            ),
            DocId::telemetry(
                &tenant,
                &site,
                &"room-1".parse().unwrap_or_else(|_| unreachable!()),
                day,
            ),
            DocId::commands(&tenant, &site, day),
        ];
        let mut sim = Sim {
            rng,
            base: Instant::now(),
            now_ms: 0,
            nodes: Vec::new(),
            links: Vec::new(),
            directory: Arc::new(directory),
            docs,
            edits: 0,
            crashes: 0,
            frames: 0,
            refused: 0,
            limits: Vec::new(),
            trace: blake3::Hasher::new(),
            cfg,
        };
        for (i, (info, key)) in infos.into_iter().enumerate() {
            let scope = (i == 0).then(|| hub_scope.clone());
            let storage = MemStorage::new();
            let authz = Arc::new(Authz::new(info.clone(), scope));
            let store = sim.open_store(&storage, &key);
            let feed = store.subscribe();
            sim.nodes.push(Node {
                info,
                key,
                storage,
                store,
                authz,
                feed,
                alive: true,
                acked: BTreeMap::new(),
            });
        }
        for a in 0..sim.nodes.len() {
            for b in a + 1..sim.nodes.len() {
                sim.links.push(Link {
                    a,
                    b,
                    sessions: None,
                    wire: VecDeque::new(),
                    last_due: [[0; 2]; 2],
                    partitioned: false,
                });
            }
        }
        sim
    }

    fn open_store(&mut self, storage: &MemStorage, key: &NodeKey) -> Arc<DocStore> {
        let actor = actor_for(&key.public(), self.rng.random::<[u8; 8]>());
        match DocStore::open(
            Arc::new(storage.clone()),
            key.clone(),
            actor,
            StoreConfig::default(),
        ) {
            Ok(s) => Arc::new(s),
            Err(e) => panic!("simulated store failed to open: {e}"),
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    fn ts(&self) -> Timestamp {
        Timestamp(EPOCH_MS + self.now_ms as i64)
    }

    /// Record an event of the run in the trace digest: a tag, the virtual
    /// time, and the event's parts (each length-prefixed).
    fn trace(&mut self, tag: &[u8; 4], parts: &[&[u8]]) {
        self.trace.update(tag);
        self.trace.update(&self.now_ms.to_le_bytes());
        for p in parts {
            self.trace.update(&(p.len() as u64).to_le_bytes());
            self.trace.update(p);
        }
    }

    /// A random local edit at node `n`, as its role allows.
    fn edit(&mut self, n: usize) {
        let doc = self.docs[self.rng.random_range(0..self.docs.len())].clone();
        let role = self.nodes[n].info.role;
        if !doc.kind().may_write(role) {
            return;
        }
        let ts = self.ts();
        let v = f64::from(self.rng.random_range(0..100u32));
        let device = doc.device().cloned();
        let node = &self.nodes[n];
        let res = match doc.kind() {
            schemas::ids::DocKind::Device => {
                let field = ["setpoint", "high_limit", "label"][self.rng.random_range(0..3usize)];
                let value = if field == "label" {
                    FieldValue::Text(format!("v{v}"))
                } else {
                    FieldValue::Number(v)
                };
                node.store
                    .change(&doc, ts, |d| docs::device::set_desired(d, field, &value))
            }
            schemas::ids::DocKind::Telemetry => {
                let Some(device) = device else { return };
                let s = Sample {
                    schema_version: Default::default(),
                    device,
                    metric: "temp".into(),
                    ts,
                    value: v,
                    unit: Default::default(),
                };
                let r = Rollup::of_sample(&s, 60_000);
                node.store
                    .change(&doc, ts, |d| docs::telemetry::put_rollup(d, &r).map(|_| ()))
            }
            schemas::ids::DocKind::Commands => {
                let c = schemas::command::Command {
                    schema_version: Default::default(),
                    id: format!("c{}-{}", n, self.edits),
                    target: "pump-1".parse().unwrap_or_else(|_| unreachable!()),
                    action: schemas::command::CommandAction::WriteCoil {
                        register: "run".into(),
                        value: v > 50.0,
                    },
                    issued_by: "admin:sim".into(),
                    issued_at: ts,
                    expires_at: ts.saturating_add_ms(60_000),
                };
                node.store
                    .change(&doc, ts, |d| docs::commands::put_request(d, &c))
            }
            _ => return,
        };
        if let Err(e) = res {
            panic!("edit failed at node {n}: {e}");
        }
        let heads = self.nodes[n].store.heads(&doc).unwrap_or_default();
        let heads: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
        self.trace(b"edit", &[&[n as u8], doc.to_string().as_bytes(), &heads]);
        self.edits += 1;
    }

    fn flush(&mut self, n: usize) {
        self.trace(b"flsh", &[&[n as u8]]);
        let node = &mut self.nodes[n];
        if let Err(e) = node.store.flush() {
            panic!("flush failed: {e}");
        }
        for id in node.store.list() {
            if let Some(h) = node.store.heads(&id) {
                node.acked.insert(id, h);
            }
        }
    }

    fn crash(&mut self, n: usize) {
        self.trace(b"crsh", &[&[n as u8]]);
        self.nodes[n].storage.crash();
        self.nodes[n].alive = false;
        self.crashes += 1;
        for l in &mut self.links {
            if l.a == n || l.b == n {
                l.sessions = None;
                l.wire.clear();
            }
        }
    }

    fn restart(&mut self, n: usize) {
        self.trace(b"rstr", &[&[n as u8]]);
        let storage = self.nodes[n].storage.clone();
        let key = self.nodes[n].key.clone();
        let store = self.open_store(&storage, &key);
        let node = &mut self.nodes[n];
        node.feed = store.subscribe();
        node.store = store;
        node.alive = true;
    }

    fn connect(&mut self, li: usize) {
        let now = self.now();
        let (a, b) = (self.links[li].a, self.links[li].b);
        let cfg = SessionConfig {
            batch_delay: Duration::from_millis(5),
            ..SessionConfig::default()
        };
        let dir: Arc<dyn crate::authz::Directory> = self.directory.clone();
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        if na.authz.may_connect(&nb.info).is_err() || nb.authz.may_connect(&na.info).is_err() {
            return;
        }
        let sa = Session::new(
            cfg.clone(),
            na.authz.clone(),
            dir.clone(),
            nb.info.clone(),
            &na.store,
            now,
        );
        let sb = Session::new(cfg, nb.authz.clone(), dir, na.info.clone(), &nb.store, now);
        self.trace(b"conn", &[&[li as u8]]);
        let l = &mut self.links[li];
        l.sessions = Some((sa, sb));
        l.wire.clear();
        l.last_due = [[self.now_ms; 2]; 2];
    }

    fn drop_conn(&mut self, li: usize) {
        if self.links[li].sessions.is_some() {
            self.trace(b"drop", &[&[li as u8]]);
        }
        self.links[li].sessions = None;
        self.links[li].wire.clear();
    }

    /// Move bytes: feed change notifications, poll transmits, deliver due frames.
    fn pump(&mut self, faults: bool) {
        let now = self.now();
        // Change feeds.
        for n in 0..self.nodes.len() {
            let mut changed = Vec::new();
            let mut lagged = false;
            loop {
                match self.nodes[n].feed.try_recv() {
                    Ok(c) => changed.push(c.id),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                    Err(_) => break,
                }
            }
            for l in &mut self.links {
                let Some((sa, sb)) = &mut l.sessions else {
                    continue;
                };
                let s = if l.a == n {
                    sa
                } else if l.b == n {
                    sb
                } else {
                    continue;
                };
                if lagged {
                    s.handle_resync(&self.nodes[n].store);
                }
                for id in &changed {
                    s.handle_local_change(id, now);
                }
            }
        }
        for li in 0..self.links.len() {
            let (a, b) = (self.links[li].a, self.links[li].b);
            // Transmit from both sides.
            for side in 0..2 {
                let node = if side == 0 { a } else { b };
                loop {
                    let l = &mut self.links[li];
                    let Some((sa, sb)) = &mut l.sessions else {
                        break;
                    };
                    let s = if side == 0 { sa } else { sb };
                    let t = match s.poll_transmit(&self.nodes[node].store, now) {
                        Ok(Some(t)) => t,
                        Ok(None) => break,
                        Err(_) => {
                            self.drop_conn(li);
                            break;
                        }
                    };
                    self.frames += 1;
                    let delay = self.rng.random_range(0..=self.cfg.max_delay_ms);
                    let to = 1 - side;
                    let due = (self.now_ms + delay).max(l.last_due[side][t.plane as usize]);
                    l.last_due[side][t.plane as usize] = due;
                    let is_sync = t.bytes.get(4) == Some(&4);
                    let dup = faults && is_sync && self.rng.random_bool(self.cfg.p_dup);
                    self.trace.update(b"send");
                    self.trace.update(&due.to_le_bytes());
                    self.trace
                        .update(&[li as u8, side as u8, t.plane as u8, u8::from(dup)]);
                    self.trace.update(&(t.bytes.len() as u64).to_le_bytes());
                    self.trace.update(&t.bytes);
                    if dup {
                        l.wire.push_back((due, to, t.plane, t.bytes.clone()));
                    }
                    l.wire.push_back((due, to, t.plane, t.bytes));
                }
            }
            // Deliver what is due, in due order (stable: same due keeps send order).
            let l = &mut self.links[li];
            let mut due: Vec<(u64, usize, Plane, Vec<u8>)> = Vec::new();
            let mut keep = VecDeque::new();
            for m in l.wire.drain(..) {
                if m.0 <= self.now_ms {
                    due.push(m)
                } else {
                    keep.push_back(m)
                }
            }
            l.wire = keep;
            due.sort_by_key(|m| m.0);
            for (_, to, plane, bytes) in due {
                let node = if to == 0 { a } else { b };
                let l = &mut self.links[li];
                let Some((sa, sb)) = &mut l.sessions else {
                    break;
                };
                let s = if to == 0 { sa } else { sb };
                let r = s.handle_data(plane, &bytes, &self.nodes[node].store, now);
                while let Some(ev) = s.poll_event() {
                    match ev {
                        crate::session::Event::Refused { .. } => self.refused += 1,
                        crate::session::Event::Limit { message, .. }
                        | crate::session::Event::PeerError { message, .. } => {
                            self.limits.push(message)
                        }
                        _ => {}
                    }
                }
                if r.is_err() {
                    self.drop_conn(li);
                    break;
                }
            }
        }
    }

    fn ensure_connections(&mut self) {
        for li in 0..self.links.len() {
            let l = &self.links[li];
            let up = !l.partitioned && self.nodes[l.a].alive && self.nodes[l.b].alive;
            if up && l.sessions.is_none() {
                self.connect(li);
            } else if !up && l.sessions.is_some() {
                self.drop_conn(li);
            }
        }
    }

    /// Every document each node may hold, with its heads, must agree; every
    /// acknowledged change must be everywhere. Returns the first violation.
    pub fn check_converged(&mut self) -> Result<(), String> {
        for doc in &self.docs {
            let mut seen: Option<(usize, Vec<ChangeHash>)> = None;
            for (i, n) in self.nodes.iter().enumerate() {
                if !n.authz.may_hold(doc) {
                    continue;
                }
                let mut h = n.store.heads(doc).unwrap_or_default();
                h.sort();
                match &seen {
                    None => seen = Some((i, h)),
                    Some((j, other)) if *other != h => {
                        return Err(format!(
                            "{doc}: node {j} heads {other:?} != node {i} heads {h:?}"
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            for (doc, heads) in &n.acked {
                for m in &self.nodes {
                    if !m.authz.may_hold(doc) {
                        continue;
                    }
                    // Which of the acknowledged heads `m` lacks, by the change
                    // graph (a set lookup per hash) rather than rebuilding
                    // each change (`get_change_by_hash`). A hash that is only
                    // queued (waiting for dependencies) is not reported
                    // itself, but then its missing dependency is, so the
                    // list is empty exactly when every head is applied.
                    let missing = m
                        .store
                        .read(doc, |d| ReadDoc::get_missing_deps(d, heads))
                        .ok()
                        .flatten();
                    for h in heads {
                        let has = missing.as_ref().map(|missing| {
                            missing.is_empty()
                                || (!missing.contains(h)
                                    && m.store
                                        .read(doc, |d| ReadDoc::get_missing_deps(d, &[*h]))
                                        .ok()
                                        .flatten()
                                        .is_some_and(|v| v.is_empty()))
                        });
                        if has != Some(true) {
                            return Err(format!(
                                "{doc}: change {h} acknowledged by node {i} is missing at node {}",
                                m.info.key.short()
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Every replica's heads, per document a node may hold: `(node index
    /// (0 = hub), document, heads)`. For convergence evidence (chaos).
    pub fn replica_heads(&self) -> Vec<(usize, DocId, Vec<ChangeHash>)> {
        let mut out = Vec::new();
        for doc in &self.docs {
            for (i, n) in self.nodes.iter().enumerate() {
                if n.authz.may_hold(doc) {
                    let mut h = n.store.heads(doc).unwrap_or_default();
                    h.sort();
                    out.push((i, doc.clone(), h));
                }
            }
        }
        out
    }

    /// Run the safety phase then the liveness phase.
    pub fn run(mut self, seed: u64) -> Result<SimReport, String> {
        self.run_mut(seed)
    }

    /// [`Sim::run`] without consuming the simulator, so a failing (or
    /// passing) run can be inspected afterwards ([`Sim::replica_heads`]).
    pub fn run_mut(&mut self, seed: u64) -> Result<SimReport, String> {
        // Safety phase: faults and concurrent edits.
        for _ in 0..self.cfg.steps {
            self.now_ms += self.cfg.step_ms;
            for n in 0..self.nodes.len() {
                if !self.nodes[n].alive {
                    if self.rng.random_bool(self.cfg.p_restart) {
                        self.restart(n);
                    }
                    continue;
                }
                if self.rng.random_bool(self.cfg.p_edit) {
                    self.edit(n);
                }
                if self.rng.random_bool(self.cfg.p_flush) {
                    self.flush(n);
                }
                if self.rng.random_bool(self.cfg.p_crash) {
                    self.crash(n);
                }
            }
            for li in 0..self.links.len() {
                if self.links[li].partitioned {
                    if self.rng.random_bool(self.cfg.p_heal) {
                        self.links[li].partitioned = false;
                        self.trace(b"heal", &[&[li as u8]]);
                    }
                } else if self.rng.random_bool(self.cfg.p_partition) {
                    self.links[li].partitioned = true;
                    self.trace(b"part", &[&[li as u8]]);
                } else if self.rng.random_bool(self.cfg.p_drop_conn) {
                    self.drop_conn(li);
                }
            }
            self.ensure_connections();
            self.pump(true);
        }
        // Liveness phase: heal everything, restart everyone, no new faults.
        for l in &mut self.links {
            l.partitioned = false;
        }
        for n in 0..self.nodes.len() {
            if !self.nodes[n].alive {
                self.restart(n);
            }
        }
        let deadline = self.now_ms + self.cfg.liveness_deadline_ms;
        let mut last_err = String::new();
        while self.now_ms < deadline {
            self.now_ms += self.cfg.step_ms;
            self.ensure_connections();
            self.pump(false);
            let quiet = self.links.iter().all(|l| l.wire.is_empty());
            if quiet {
                match self.check_converged() {
                    Ok(()) => {
                        for doc in self.docs.clone() {
                            for n in 0..self.nodes.len() {
                                let heads = self.nodes[n].store.heads(&doc).unwrap_or_default();
                                let heads: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
                                self.trace(
                                    b"head",
                                    &[&[n as u8], doc.to_string().as_bytes(), &heads],
                                );
                            }
                        }
                        return Ok(SimReport {
                            seed,
                            converged_at_ms: Some(self.now_ms),
                            edits: self.edits,
                            crashes: self.crashes,
                            frames: self.frames,
                            refused: self.refused,
                            trace: *self.trace.finalize().as_bytes(),
                        });
                    }
                    Err(e) => last_err = e,
                }
            }
        }
        Err(format!(
            "seed {seed}: no convergence within {} ms of healing: {last_err}; limit errors: {:?}",
            self.cfg.liveness_deadline_ms,
            self.limits.iter().take(3).collect::<Vec<_>>()
        ))
    }
}

/// Run one seed with the default configuration.
pub fn run_seed(seed: u64) -> Result<SimReport, String> {
    Sim::new(seed, SimConfig::default()).run(seed)
}

/// Ids of documents touched by a set of nodes, for reports.
pub fn doc_set(ids: impl IntoIterator<Item = DocId>) -> BTreeSet<String> {
    ids.into_iter().map(|d| d.to_string()).collect()
}
