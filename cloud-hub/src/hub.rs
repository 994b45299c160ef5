//! `cloud-hub serve`: the sync endpoint, enrolment over iroh, live revocation,
//! refusal audit and the HTTP API, wired around one [`SyncNode`].
//!
//! - **Registry**: the JSON file (`registry.json`) stays the source of truth,
//!   shared with the offline CLI. Every mutation (enrolment here, `node
//!   revoke`/`node add-hub` in the CLI) first takes the audit log's file lock
//!   ([`AuditLog::open_wait`]), so registry read-modify-writes of the two
//!   processes are serialised. `serve` polls the file (every
//!   [`ServeOptions::registry_poll`]); when its seq is newer than the one the
//!   hub's [`RegistryDirectory`] holds, the hub adopts the new signed
//!   snapshot, republishes it into `fleet/identity` (which syncs read-only to
//!   the edges), and closes the live connections of every revoked key.
//!   Reconnects are refused by the directory (active records only).
//! - **Enrolment**: [`HubEnroller`] redeems a join token for the
//!   TLS-authenticated key that presents it, refuses tenants outside the
//!   hub's regions (compliance), audits the outcome and republishes.
//! - **Refusals**: connection and document refusals from the node's event
//!   stream go to the audit log through a [`RefusalLimiter`] (one entry per
//!   peer and kind per window, later ones counted), so a flood cannot fill
//!   the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use schemas::config::HubConfig;
use schemas::identity::EndpointKey;
use schemas::ids::{DocId, Role};
use schemas::time::Timestamp;
use sync_core::authz::{Authz, HubScope, PeerInfo};
use sync_core::driver::{DriverConfig, NodeEvent, PeerStatus, SyncNode};
use sync_core::enrol::{ENROL_ALPN, EnrolHandler, Enroller};
use sync_core::identity::NodeKey;
use sync_core::registry::{IDENTITY_DOC_KEY, RegistryDirectory, RegistrySnapshot, SignedRegistry};
use sync_core::session::Event;
use sync_core::storage::SledStorage;
use sync_core::store::{DocStore, StoreConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Clock;
use crate::audit::{AuditError, AuditLog, AuditRecord};
use crate::registry::{JsonFileStore, Registry, RegistryError};
use crate::tokens::{self, TokenError};

/// Where a hub keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubPaths {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The hub secret key file.
    pub key: PathBuf,
    /// The registry file.
    pub registry: PathBuf,
    /// The audit log.
    pub audit: PathBuf,
}

impl HubPaths {
    /// The standard layout for `cfg` (key at `cfg.key_path()`, the rest in `data_dir`).
    pub fn from_config(cfg: &HubConfig) -> HubPaths {
        HubPaths {
            data_dir: cfg.data_dir.clone(),
            key: cfg.key_path(),
            registry: cfg.data_dir.join("registry.json"),
            audit: cfg.data_dir.join("audit.log"),
        }
    }

    /// The document store's directory.
    pub fn docs(&self) -> PathBuf {
        self.data_dir.join("docs")
    }
}

/// How to run a hub.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The configuration (regions, tenants, tier, listen addresses, upstream).
    pub cfg: HubConfig,
    /// The files.
    pub paths: HubPaths,
    /// Serve the HTTP API and dashboard on `cfg.http_listen`.
    pub http: bool,
    /// How often the registry file is checked for changes (revocations by the CLI).
    pub registry_poll: Duration,
    /// Window of the refusal audit rate limit.
    pub refusal_window: Duration,
    /// Refusing peers with their own audit entries per window; more are
    /// pooled into one entry with a count.
    pub refusal_peers: usize,
}

impl ServeOptions {
    /// Options for `cfg` with the standard file layout, HTTP on, 250 ms registry polling and
    /// a one-minute refusal window.
    pub fn new(cfg: HubConfig) -> ServeOptions {
        ServeOptions {
            paths: HubPaths::from_config(&cfg),
            cfg,
            http: true,
            registry_poll: Duration::from_millis(250),
            refusal_window: Duration::from_secs(60),
            refusal_peers: REFUSAL_PEERS_TRACKED,
        }
    }
}

/// Why the hub could not start or act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// No key file, or it is unusable.
    #[error("hub key {path}: {reason} (run `cloud-hub init` first)")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The audit log could not be opened or appended to.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The registry could not be read or written.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The document store failed.
    #[error("document store {path}: {reason}")]
    Store {
        /// The store directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The sync endpoint could not start.
    #[error("sync endpoint: {0}")]
    Driver(#[from] sync_core::driver::DriverError),
    /// The HTTP listener or API state could not start.
    #[error("http on {addr}: {reason}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// A configuration problem found at start-up.
    #[error("config: {0}")]
    Config(String),
}

/// One audit entry a [`RefusalLimiter`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalEntry {
    /// The refused peer (all-zero key: "many peers", once the table is full).
    pub peer: EndpointKey,
    /// `sync.refused_connection`, `sync.refused_document` or `enrol.refused`.
    pub kind: &'static str,
    /// The latest reason.
    pub reason: String,
    /// Refusals this entry stands for.
    pub count: u64,
}

#[derive(Debug)]
struct Slot {
    start: Timestamp,
    suppressed: u64,
    last_reason: String,
}

/// Rate limit for refusal audit entries: per peer and kind, the first refusal
/// in a window is written at once; later ones in the same window are counted
/// and written as one summary when the window ends. Pure: time is passed in.
#[derive(Debug)]
pub struct RefusalLimiter {
    window_ms: i64,
    cap: usize,
    slots: BTreeMap<(EndpointKey, &'static str), Slot>,
}

impl RefusalLimiter {
    /// A limiter with `window` per peer and kind, tracking at most `cap` peers (more are
    /// pooled under the all-zero key).
    pub fn new(window: Duration, cap: usize) -> RefusalLimiter {
        RefusalLimiter {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            cap: cap.max(1),
            slots: BTreeMap::new(),
        }
    }

    /// A refusal happened at `now`; returns the entry to write now, if any.
    pub fn handle(
        &mut self,
        peer: EndpointKey,
        kind: &'static str,
        reason: &str,
        now: Timestamp,
    ) -> Option<RefusalEntry> {
        let mut key = (peer, kind);
        if !self.slots.contains_key(&key) && self.slots.len() >= self.cap {
            key = (EndpointKey([0; 32]), kind);
        }
        match self.slots.get_mut(&key) {
            Some(slot) if now.0 - slot.start.0 < self.window_ms => {
                slot.suppressed += 1;
                slot.last_reason = reason.to_string();
                None
            }
            Some(slot) => {
                let count = slot.suppressed + 1;
                *slot = Slot {
                    start: now,
                    suppressed: 0,
                    last_reason: reason.to_string(),
                };
                Some(RefusalEntry {
                    peer: key.0,
                    kind,
                    reason: reason.to_string(),
                    count,
                })
            }
            None => {
                self.slots.insert(
                    key,
                    Slot {
                        start: now,
                        suppressed: 0,
                        last_reason: reason.to_string(),
                    },
                );
                Some(RefusalEntry {
                    peer: key.0,
                    kind,
                    reason: reason.to_string(),
                    count: 1,
                })
            }
        }
    }

    /// Summaries of windows that ended by `now` (or all, if `all`), and forget them.
    pub fn poll(&mut self, now: Timestamp, all: bool) -> Vec<RefusalEntry> {
        let mut out = Vec::new();
        let window = self.window_ms;
        self.slots.retain(|(peer, kind), slot| {
            let ended = all || now.0 - slot.start.0 >= window;
            if ended && slot.suppressed > 0 {
                out.push(RefusalEntry {
                    peer: *peer,
                    kind,
                    reason: slot.last_reason.clone(),
                    count: slot.suppressed,
                });
            }
            !ended
        });
        out
    }

    /// Peers tracked.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// What the hub's tasks share.
struct Core {
    key: NodeKey,
    paths: HubPaths,
    scope: HubScope,
    clock: Arc<dyn Clock>,
    dir: Arc<RegistryDirectory>,
    store: Arc<DocStore>,
    limiter: Mutex<RefusalLimiter>,
    /// Connected edges as last seen, for the API's fleet health.
    seen: Mutex<BTreeMap<EndpointKey, (PeerStatus, Option<Timestamp>)>>,
}

impl Core {
    fn signing(&self) -> SigningKey {
        self.key.signing_key().clone()
    }

    /// Append one record, waiting for the CLI if it holds the log.
    fn audit(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let now = self.clock.now();
        let (mut log, _) = AuditLog::open_wait(&self.paths.audit, self.signing(), now)?;
        log.append(rec, now)?;
        Ok(())
    }

    fn audit_logged(&self, rec: &AuditRecord) {
        if let Err(e) = self.audit(rec) {
            tracing::error!(error = %e, action = %rec.action, "could not write audit entry");
        }
    }

    fn open_registry(&self) -> Result<Registry<JsonFileStore>, RegistryError> {
        Registry::open(JsonFileStore::new(&self.paths.registry), self.signing())
    }

    /// Adopt the registry file if it is newer than what the directory holds:
    /// apply its signed snapshot and republish it into `fleet/identity`.
    /// Returns the adopted snapshot.
    fn publish(&self) -> Result<Option<RegistrySnapshot>, HubError> {
        let reg = self.open_registry()?;
        if self.dir.seq().is_some_and(|s| s >= reg.seq()) {
            return Ok(None);
        }
        let signed = reg.signed_snapshot();
        let snap = signed
            .verify(&self.signing().verifying_key())
            .map_err(|e| HubError::Config(format!("own registry snapshot does not verify: {e}")))?;
        self.write_identity_doc(&signed)?;
        if let Err(e) = self.dir.apply(&signed) {
            tracing::warn!(error = %e, "registry snapshot not adopted");
        }
        tracing::info!(
            seq = snap.seq,
            records = snap.records.len(),
            "registry published"
        );
        Ok(Some(snap))
    }

    fn write_identity_doc(&self, signed: &SignedRegistry) -> Result<(), HubError> {
        self.store
            .change(&DocId::Identity, self.clock.now(), |doc| {
                sync_core::docs::put_root_json(doc, IDENTITY_DOC_KEY, signed)
            })
            .map_err(|e| HubError::Store {
                path: self.paths.docs(),
                reason: format!("write fleet/identity: {e}"),
            })
    }

    /// Record a refusal through the rate limiter.
    fn refused(&self, peer: EndpointKey, kind: &'static str, reason: &str) {
        if let Some(e) = self.refusal_entry(peer, kind, reason) {
            self.write_refusals(&[(e, false)], 0);
        }
    }

    /// Run one refusal through the limiter; the entry to write now, if any.
    fn refusal_entry(
        &self,
        peer: EndpointKey,
        kind: &'static str,
        reason: &str,
    ) -> Option<RefusalEntry> {
        match self.limiter.lock() {
            Ok(mut l) => l.handle(peer, kind, reason, self.clock.now()),
            Err(_) => None,
        }
    }

    fn flush_refusals(&self, all: bool) {
        let entries = match self.limiter.lock() {
            Ok(mut l) => l.poll(self.clock.now(), all),
            Err(_) => Vec::new(),
        };
        let entries: Vec<_> = entries.into_iter().map(|e| (e, true)).collect();
        self.write_refusals(&entries, 0);
    }

    /// Write refusal entries (`true`: a window's summary) and, if the audit
    /// task missed node events, one `sync.refusal_audit_gap` entry saying how
    /// many: refusals among them were not counted, and the log says so.
    /// One open of the log for the whole batch.
    fn write_refusals(&self, entries: &[(RefusalEntry, bool)], missed_events: u64) {
        let mut recs: Vec<AuditRecord> = entries
            .iter()
            .map(|(e, summary)| AuditRecord {
                actor: "hub".into(),
                action: e.kind.into(),
                target: e.peer.to_string(),
                reason: e.reason.clone(),
                details: if *summary {
                    format!("count={} (refusals suppressed in the last window)", e.count)
                } else {
                    format!("count={}", e.count)
                },
            })
            .collect();
        if missed_events > 0 {
            recs.push(AuditRecord {
                actor: "hub".into(),
                action: "sync.refusal_audit_gap".into(),
                target: "hub".into(),
                reason: "the refusal audit fell behind the node's events".into(),
                details: format!(
                    "missed_events={missed_events} (refusals among them are not counted above)"
                ),
            });
        }
        if recs.is_empty() {
            return;
        }
        let now = self.clock.now();
        let res =
            AuditLog::open_wait(&self.paths.audit, self.signing(), now).and_then(|(mut log, _)| {
                for r in &recs {
                    log.append(r, now)?;
                }
                Ok(())
            });
        if let Err(e) = res {
            tracing::error!(error = %e, entries = recs.len(), "could not write refusal audit entries");
        }
    }
}

/// Redeems join tokens presented over `fieldsync-enrol/1`.
pub struct HubEnroller {
    core: Arc<Core>,
}

impl std::fmt::Debug for HubEnroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubEnroller")
    }
}

/// The refusal reason for a token error: starts with `reused`, `expired`, `forged` or
/// `malformed` so clients and tests can tell them apart.
pub fn refusal_reason(e: &RegistryError) -> String {
    match e {
        RegistryError::Token(t) => {
            let kind = match t {
                TokenError::AlreadyUsed { .. } => "reused",
                TokenError::Expired { .. } | TokenError::NotYetValid { .. } => "expired",
                TokenError::BadSignature { .. } => "forged",
                TokenError::Malformed { .. } => "malformed",
                _ => "refused",
            };
            format!("{kind}: {t}")
        }
        RegistryError::Revoked { .. } => format!("revoked: {e}"),
        other => format!("refused: {other}"),
    }
}

impl HubEnroller {
    fn try_enrol(&self, token: &str, endpoint: EndpointKey) -> Result<SignedRegistry, String> {
        let core = &self.core;
        let now = core.clock.now();
        let claims = tokens::verify(token, &core.signing().verifying_key(), now)
            .map_err(|e| refusal_reason(&RegistryError::Token(e)))?;
        if !core.scope.serves(&claims.tenant) {
            let region = core
                .scope
                .tenant_regions
                .get(&claims.tenant)
                .map(|r| r.to_string())
                .unwrap_or_else(|| "unknown".into());
            let regions: Vec<String> = core.scope.regions.iter().map(|r| r.to_string()).collect();
            return Err(format!(
                "compliance: tenant {} is in region {region}; this hub serves {}",
                claims.tenant,
                regions.join(", ")
            ));
        }
        // The audit lock serialises registry edits with the CLI.
        let (mut log, _) = AuditLog::open_wait(&core.paths.audit, core.signing(), now)
            .map_err(|e| format!("hub error: audit log: {e}"))?;
        let mut reg = core
            .open_registry()
            .map_err(|e| format!("hub error: {e}"))?;
        let rec = reg
            .enrol(token, endpoint, now)
            .map_err(|e| refusal_reason(&e))?;
        let seq = reg.seq();
        if let Err(e) = log.append(
            &AuditRecord {
                actor: format!("node:{endpoint}"),
                action: "node.enrol".into(),
                target: endpoint.to_string(),
                reason: "join token redeemed over fieldsync-enrol/1".into(),
                details: format!(
                    "tenant={} site={} role={} token={} registry_seq={seq}",
                    claims.tenant, claims.site, rec.role, claims.nonce
                ),
            },
            now,
        ) {
            tracing::error!(error = %e, "node enrolled but the audit entry failed");
        }
        drop(log);
        core.publish().map_err(|e| format!("hub error: {e}"))?;
        Ok(reg.signed_snapshot())
    }
}

impl Enroller for HubEnroller {
    fn enrol(&self, token: &str, endpoint: EndpointKey) -> Result<SignedRegistry, String> {
        let out = self.try_enrol(token, endpoint);
        if let Err(reason) = &out {
            self.core.refused(endpoint, "enrol.refused", reason);
        }
        out
    }
}

/// A running hub.
pub struct Hub {
    node: Arc<SyncNode>,
    core: Arc<Core>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Ends when the node's event channel closes, after the node's shutdown,
    /// so every refusal the node reported is audited.
    refusals: JoinHandle<()>,
    http_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("id", &self.core.key.public().short())
            .finish()
    }
}

/// The scope a hub config describes.
pub fn hub_scope(cfg: &HubConfig) -> HubScope {
    HubScope {
        tier: cfg.tier,
        regions: cfg.regions.clone(),
        tenant_regions: cfg
            .tenants
            .iter()
            .map(|t| (t.id.clone(), t.region.clone()))
            .collect(),
    }
}

impl Hub {
    /// Open everything and start serving: sync + enrolment on `cfg.sync_listen`, HTTP on
    /// `cfg.http_listen` if `opts.http`. `clock` stamps records (time is injected).
    pub async fn start(opts: ServeOptions, clock: Arc<dyn Clock>) -> Result<Hub, HubError> {
        let paths = opts.paths.clone();
        let cfg = opts.cfg.clone();
        if !paths.key.exists() {
            return Err(HubError::Key {
                path: paths.key.clone(),
                reason: "no such file".into(),
            });
        }
        let signing = crate::keys::load(&paths.key).map_err(|e| HubError::Key {
            path: paths.key.clone(),
            reason: e.to_string(),
        })?;
        let key = NodeKey::from_bytes(signing.to_bytes());
        let hub_id = key.public();
        // Verify (and repair a torn tail of) the audit log before anything else.
        let (mut log, outcome) = AuditLog::open_wait(&paths.audit, signing.clone(), clock.now())?;
        if let Some((finding, saved)) = outcome.repaired {
            tracing::warn!(%finding, saved = %saved.display(), "repaired the audit log");
        }
        log.append(
            &AuditRecord {
                actor: "hub".into(),
                action: "hub.serve".into(),
                target: hub_id.to_string(),
                reason: "cloud-hub serve started".into(),
                details: format!(
                    "tier={} regions={:?} sync={} http={}",
                    format!("{:?}", cfg.tier).to_lowercase(),
                    cfg.regions
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>(),
                    cfg.sync_listen,
                    if opts.http {
                        cfg.http_listen.to_string()
                    } else {
                        "off".into()
                    }
                ),
            },
            clock.now(),
        )?;
        drop(log);
        let docs = paths.docs();
        let storage = SledStorage::open(&docs).map_err(|e| HubError::Store {
            path: docs.clone(),
            reason: e.to_string(),
        })?;
        let store_cfg = StoreConfig {
            memory_budget_bytes: cfg.replica_memory_mb.saturating_mul(1 << 20),
            ..StoreConfig::default()
        };
        let store = Arc::new(
            DocStore::open(Arc::new(storage), key.clone(), key.new_actor(), store_cfg).map_err(
                |e| HubError::Store {
                    path: docs.clone(),
                    reason: e.to_string(),
                },
            )?,
        );
        let scope = hub_scope(&cfg);
        let mut dir = RegistryDirectory::new(hub_id)
            .ok_or_else(|| HubError::Config("hub key is not a valid ed25519 key".into()))?;
        if let Some(up) = &cfg.upstream {
            dir = dir.with_peer(PeerInfo {
                key: up.endpoint_id,
                role: Role::Hub,
                tenant: None,
                site: None,
            });
        }
        let dir = Arc::new(dir);
        let core = Arc::new(Core {
            key: key.clone(),
            paths: paths.clone(),
            scope: scope.clone(),
            clock: clock.clone(),
            dir: dir.clone(),
            store: store.clone(),
            limiter: Mutex::new(RefusalLimiter::new(opts.refusal_window, opts.refusal_peers)),
            seen: Mutex::new(BTreeMap::new()),
        });
        core.publish()?;
        let authz = Arc::new(Authz::new(
            PeerInfo {
                key: hub_id,
                role: Role::Hub,
                tenant: None,
                site: None,
            },
            Some(scope),
        ));
        let handler = EnrolHandler::new(Arc::new(HubEnroller { core: core.clone() }));
        let node = SyncNode::spawn_with(
            &key,
            store.clone(),
            authz,
            dir.clone(),
            DriverConfig {
                bind: cfg.sync_listen,
                ..DriverConfig::default()
            },
            &[ENROL_ALPN],
            |b| b.accept(ENROL_ALPN, handler),
        )
        .await?;
        let node = Arc::new(node);
        if let Some(up) = &cfg.upstream {
            node.dial(up.endpoint_id, up.addr)?;
        }
        let (stop, _) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(registry_watch(
            core.clone(),
            node.clone(),
            opts.registry_poll,
            stop.subscribe(),
        ))];
        let refusals = tokio::spawn(refusal_audit(core.clone(), node.subscribe()));
        if cfg.upstream.is_some() && cfg.tier == schemas::policy::HubTier::Regional {
            // Fleet aggregates are what the global hub receives.
            tasks.push(tokio::spawn(crate::aggregate::run(
                store.clone(),
                clock.clone(),
                Duration::from_secs(10),
                stop.subscribe(),
            )));
        }
        let mut http_addr = None;
        if opts.http {
            let (addr, task) = start_http(&core, &cfg, stop.subscribe()).await?;
            http_addr = Some(addr);
            tasks.extend(task);
        }
        Ok(Hub {
            node,
            core,
            stop,
            tasks,
            refusals,
            http_addr,
        })
    }

    /// The hub's endpoint id.
    pub fn endpoint_id(&self) -> EndpointKey {
        self.core.key.public()
    }

    /// The bound sync (QUIC) address, IPv4 preferred.
    pub fn sync_addr(&self) -> Option<SocketAddr> {
        let addrs = self.node.local_addrs();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
    }

    /// The bound HTTP address, if HTTP is served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The sync node (status, events).
    pub fn node(&self) -> &SyncNode {
        &self.node
    }

    /// The hub's directory (active registry records, the hub, the upstream).
    pub fn directory(&self) -> &Arc<RegistryDirectory> {
        &self.core.dir
    }

    /// The hub's document store.
    pub fn store(&self) -> &Arc<DocStore> {
        &self.core.store
    }

    /// Stop HTTP and the background tasks, shut the sync node down (closing
    /// connections), let the refusal audit take the node's last events and
    /// flush pending refusal summaries, then flush the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("a hub task did not stop within 5 s");
            }
        }
        match Arc::try_unwrap(self.node) {
            Ok(node) => node.shutdown().await,
            Err(_) => tracing::error!("sync node still shared at shutdown; not shut down cleanly"),
        }
        if tokio::time::timeout(Duration::from_secs(5), self.refusals)
            .await
            .is_err()
        {
            tracing::warn!("the refusal audit did not finish within 5 s of the node's shutdown");
        }
        let core = self.core.clone();
        let _ = tokio::task::spawn_blocking(move || core.flush_refusals(true)).await;
        let core = self.core;
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = core.store.flush() {
                tracing::error!(error = %e, "final store flush failed");
            }
            core.audit_logged(&AuditRecord {
                actor: "hub".into(),
                action: "hub.stop".into(),
                target: core.key.public().to_string(),
                reason: "cloud-hub serve stopped".into(),
                details: String::new(),
            });
        })
        .await;
    }
}

/// Resolves once the stop flag is set.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Poll the registry file; adopt, republish, disconnect revoked keys.
async fn registry_watch(
    core: Arc<Core>,
    node: Arc<SyncNode>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut disconnected: BTreeSet<EndpointKey> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => break,
        }
        let c = core.clone();
        let adopted = match tokio::task::spawn_blocking(move || c.publish()).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "registry reload failed");
                None
            }
            Err(_) => None,
        };
        if let Some(snap) = adopted {
            for r in snap.records.iter().filter(|r| r.revoked_at.is_some()) {
                let n = node.disconnect(&r.endpoint_id, "revoked");
                if n > 0 || !disconnected.contains(&r.endpoint_id) {
                    disconnected.insert(r.endpoint_id);
                    if n > 0 {
                        tracing::info!(peer = %r.endpoint_id.short(), connections = n, "revoked node disconnected");
                        let c = core.clone();
                        let rec = AuditRecord {
                            actor: "hub".into(),
                            action: "node.disconnect".into(),
                            target: r.endpoint_id.to_string(),
                            reason: r.revoked_reason.clone().unwrap_or_else(|| "revoked".into()),
                            details: format!("connections={n} registry_seq={}", snap.seq),
                        };
                        let _ = tokio::task::spawn_blocking(move || c.audit_logged(&rec)).await;
                    }
                }
            }
        }
        // Fleet health for the API.
        let now = core.clock.now();
        let status = node.status();
        if let Ok(mut g) = core.seen.lock() {
            for (k, s) in status {
                let last = g.get(&k).and_then(|(_, t)| *t);
                let seen = if s.connected { Some(now) } else { last };
                g.insert(k, (s, seen));
            }
        }
    }
}

/// At most this many refusing peers get their own audit entries per window;
/// more are pooled under the all-zero key with a count. A flood of fresh
/// keys then costs a handful of fsynced entries, not one per attempt, and
/// the audit log never becomes the flood's amplifier.
pub const REFUSAL_PEERS_TRACKED: usize = 256;

/// Refusals read from the node's events before one batched write.
const REFUSAL_BATCH: usize = 512;

fn refusal_of(ev: NodeEvent) -> Option<(EndpointKey, &'static str, String)> {
    match ev {
        NodeEvent::Refused { peer, reason } => Some((peer, "sync.refused_connection", reason)),
        NodeEvent::Session {
            peer,
            event: Event::Refused { doc, reason },
        } => {
            let reason = match doc {
                Some(d) => format!("{d}: {reason}"),
                None => reason,
            };
            Some((peer, "sync.refused_document", reason))
        }
        _ => None,
    }
}

/// Audit refused connections and documents, rate-limited. Events are run
/// through the limiter as fast as they come (no disk wait per event) and
/// the resulting entries are written in batches; if the task still falls
/// behind, the number of missed events is itself audited. It runs until the
/// node's event channel closes (the node shut down), so no refusal the node
/// reported goes unaccounted.
async fn refusal_audit(core: Arc<Core>, mut events: tokio::sync::broadcast::Receiver<NodeEvent>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed = false;
    while !closed {
        let mut entries = Vec::new();
        let mut missed = 0u64;
        let on_event = |ev: NodeEvent, entries: &mut Vec<(RefusalEntry, bool)>| {
            if let Some((peer, kind, reason)) = refusal_of(ev)
                && let Some(e) = core.refusal_entry(peer, kind, &reason)
            {
                entries.push((e, false));
            }
        };
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => on_event(ev, &mut entries),
                Err(RecvError::Lagged(n)) => missed += n,
                Err(RecvError::Closed) => closed = true,
            },
            _ = tick.tick() => {
                let c = core.clone();
                let _ = tokio::task::spawn_blocking(move || c.flush_refusals(false)).await;
            }
        }
        // Take whatever else is already queued before touching the disk.
        for _ in 0..REFUSAL_BATCH {
            match events.try_recv() {
                Ok(ev) => on_event(ev, &mut entries),
                Err(TryRecvError::Lagged(n)) => missed += n,
                Err(TryRecvError::Closed) => {
                    closed = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if missed > 0 {
            tracing::warn!(missed, "refusal audit lagged behind node events");
        }
        if !entries.is_empty() || missed > 0 {
            let c = core.clone();
            let _ = tokio::task::spawn_blocking(move || c.write_refusals(&entries, missed)).await;
        }
    }
}

/// Bind the HTTP API + dashboard; returns the bound address and its tasks.
async fn start_http(
    core: &Arc<Core>,
    cfg: &HubConfig,
    stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, Vec<JoinHandle<()>>), HubError> {
    use crate::analytics::EdgeStatus;
    use crate::api::{self, ApiState, RateLimit};
    use crate::fleet_store::StoreFleet;
    let addr = cfg.http_listen;
    let http_err = |reason: String| HubError::Http { addr, reason };
    let edges = {
        let core = core.clone();
        Arc::new(move || {
            let seen = core.seen.lock().map(|g| g.clone()).unwrap_or_default();
            core.dir.with(|r| {
                r.snapshot()
                    .map(|s| {
                        s.records
                            .iter()
                            .filter(|r| r.role == Role::Edge && r.revoked_at.is_none())
                            .filter_map(|r| {
                                let (st, last) =
                                    seen.get(&r.endpoint_id).cloned().unwrap_or_default();
                                Some(EdgeStatus {
                                    endpoint: r.endpoint_id.to_string(),
                                    tenant: r.tenant.clone()?,
                                    site: r.site.clone()?,
                                    last_seen: last,
                                    lag_ms: None,
                                    docs_behind: st.docs_behind as u64,
                                    bytes_queued: st.bytes_queued as u64,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
        }) as Arc<dyn Fn() -> Vec<EdgeStatus> + Send + Sync>
    };
    let audit = {
        let core = core.clone();
        Arc::new(move |e: &api::data::AuditEntry| {
            core.audit(&AuditRecord::from(e)).map_err(|e| e.to_string())
        }) as Arc<dyn Fn(&api::data::AuditEntry) -> Result<(), String> + Send + Sync>
    };
    let fleet = StoreFleet::new(core.store.clone(), edges, audit)
        .with_clock(core.clock.clone())
        .with_data_dir(&core.paths.data_dir)
        .map_err(|e| http_err(format!("fleet data: {e}")))?
        .with_audit_log(&core.paths.audit);
    let tokens = crate::users::load_token_store(&core.paths.data_dir)
        .map_err(|e| http_err(format!("user tokens: {e}")))?;
    let mut st = ApiState::new(Arc::new(fleet), core.clock.clone(), RateLimit::default());
    st.tokens = Arc::new(tokens);
    let app = api::router(st.clone()).merge(crate::dashboard::router());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| http_err(format!("bind: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| http_err(format!("local address: {e}")))?;
    let mut stop_http = stop.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_http.wait_for(|v| *v).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "http server failed");
        }
    });
    let driver = tokio::spawn(api::run_rollout_driver(st, Duration::from_secs(5), stop));
    Ok((bound, vec![server, driver]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_writes_first_refusal_then_one_summary_per_window() {
        let mut l = RefusalLimiter::new(Duration::from_secs(60), 3);
        let p = EndpointKey([7; 32]);
        let t = |s: i64| Timestamp(1_000_000 + s * 1000);
        assert_eq!(l.handle(p, "k", "a", t(0)).map(|e| e.count), Some(1));
        for i in 1..=100 {
            assert!(l.handle(p, "k", "b", t(i % 59)).is_none());
        }
        assert!(l.poll(t(30), false).is_empty(), "window still open");
        let s = l.poll(t(60), false);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].count, s[0].reason.as_str()), (100, "b"));
        assert!(l.is_empty());
        // Another kind of the same peer is its own slot.
        assert!(l.handle(p, "k", "a", t(61)).is_some());
        assert!(l.handle(p, "other", "a", t(61)).is_some());
    }

    #[test]
    fn limiter_pools_peers_beyond_its_cap() {
        let mut l = RefusalLimiter::new(Duration::from_secs(60), 2);
        let mut written = 0;
        for k in 0..1000u32 {
            let mut b = [1u8; 32];
            b[..4].copy_from_slice(&k.to_be_bytes());
            if l.handle(EndpointKey(b), "k", "x", Timestamp(0)).is_some() {
                written += 1;
            }
        }
        assert!(l.len() <= 3, "{}", l.len());
        assert_eq!(written, 3, "two peers plus one pooled entry");
        let s = l.poll(Timestamp(60_000), false);
        assert_eq!(s.iter().map(|e| e.count).sum::<u64>(), 997);
    }
}
