//! [`StoreFleet`]: the API's [`FleetData`] over the hub's document replicas
//! (a sync-core [`DocStore`] kept up to date by edges).
//!
//! What lives where:
//!
//! | API data | source |
//! |---|---|
//! | sites | site documents, plus every site that has a document at all |
//! | devices | device documents (`desired` with conflicts, `reported`, `meta`) |
//! | telemetry | telemetry documents, folded into an in-memory [`RollupIndex`] kept up to date from [`DocStore::subscribe`] |
//! | alarms | alarm documents (acks written into them) |
//! | commands | command documents (requests written by the hub, results by edges); the API's idempotency key and reason in `{data_dir}/command-meta.jsonl` |
//! | rollouts | one JSON file per rollout in `{data_dir}/rollouts/`, replaced atomically |
//! | audit | written through the injected closure; read back from the signed audit log file |
//! | edges | the injected closure (the sync node's status) |
//!
//! Only the rollup index, device types, command metadata and rollouts are
//! held in memory; documents are read through the store, which loads them
//! lazily within its memory budget.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::transaction::Transactable as _;
use automerge::{AutoCommit, ObjType, ROOT, ReadDoc as _, Value};
use schemas::command::{CommandResult, CommandStatus};
use schemas::device::{DesiredConfig, FieldValue};
use schemas::identity::EndpointKey;
use schemas::ids::{DocId, DocKind};
use schemas::time::Timestamp;
use schemas::{SiteId, TenantId};
use serde::{Deserialize, Serialize};
use sync_core::docs::{self, DocError};
use sync_core::store::{Changed, DocStore, StoreError};
use tokio::sync::broadcast::{self, error::TryRecvError};

use crate::analytics::{
    DeviceKey, DeviceStat, EdgeStatus, RollupIndex, Series, Stat, TelemetryQuery,
};
use crate::api::data::{
    AuditEntry, AuditRecord, CommandRecord, DataError, DeviceRecord, FieldConflict, FleetAlarm,
    FleetData, SiteRecord, device_id,
};
use crate::api::{Clock, SystemClock};
use crate::rollout::Rollout;

/// Edge sync status, supplied by the hub's sync node.
pub type EdgesFn = Arc<dyn Fn() -> Vec<EdgeStatus> + Send + Sync>;
/// Writes one audit entry to the hub's signed audit log.
pub type AuditFn = Arc<dyn Fn(&AuditEntry) -> Result<(), String> + Send + Sync>;

/// Sub-directory of the data directory holding one JSON file per rollout.
pub const ROLLOUTS_DIR: &str = "rollouts";
/// File of the data directory holding the API metadata of commands.
pub const COMMAND_META_FILE: &str = "command-meta.jsonl";

/// Why the fleet store's own files could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetStoreError {
    /// A file operation failed.
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A file did not parse.
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> FleetStoreError {
    let path = path.to_path_buf();
    move |source| FleetStoreError::Io {
        path,
        action,
        source,
    }
}

/// API metadata of one command that the command document does not carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CommandMeta {
    id: String,
    idempotency_key: Option<String>,
    reason: String,
}

#[derive(Default)]
struct Index {
    /// Whether the initial scan ran.
    primed: bool,
    rollups: RollupIndex,
    device_types: BTreeMap<DeviceKey, String>,
}

/// Fleet data read from and written to the hub's Automerge replicas.
pub struct StoreFleet {
    store: Arc<DocStore>,
    edges: EdgesFn,
    audit: AuditFn,
    clock: Arc<dyn Clock>,
    data_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    changes: Mutex<broadcast::Receiver<Changed>>,
    index: Mutex<Index>,
    rollouts: Mutex<BTreeMap<String, Rollout>>,
    command_meta: Mutex<BTreeMap<String, CommandMeta>>,
    /// Audit records when no audit log file is configured.
    audit_mem: Mutex<Vec<AuditRecord>>,
    /// Serialises command creation (check-then-insert of idempotency).
    command_lock: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before it can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn store_err(e: StoreError) -> DataError {
    match e {
        StoreError::Sealed { .. } => DataError::Conflict(e.to_string()),
        StoreError::Doc {
            source: DocError::Invalid(_),
            ..
        } => DataError::Conflict(e.to_string()),
        other => DataError::Store(other.to_string()),
    }
}

/// Write `bytes` to `path` atomically: a temporary file, fsync, rename,
/// fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn rollout_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(ROLLOUTS_DIR)
        .join(format!("{}.json", hex::encode(id.as_bytes())))
}

impl StoreFleet {
    /// Fleet data over `store`; `edges` reports edge sync state, `audit`
    /// appends to the audit log. Without [`StoreFleet::with_data_dir`],
    /// rollouts and command metadata live in memory only; without
    /// [`StoreFleet::with_audit_log`], audit listing shows what this
    /// process appended.
    pub fn new(store: Arc<DocStore>, edges: EdgesFn, audit: AuditFn) -> StoreFleet {
        let changes = Mutex::new(store.subscribe());
        StoreFleet {
            store,
            edges,
            audit,
            clock: Arc::new(SystemClock::default()),
            data_dir: None,
            audit_log: None,
            changes,
            index: Mutex::new(Index::default()),
            rollouts: Mutex::new(BTreeMap::new()),
            command_meta: Mutex::new(BTreeMap::new()),
            audit_mem: Mutex::new(Vec::new()),
            command_lock: Mutex::new(()),
        }
    }

    /// Use `clock` for write times and command expiry.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> StoreFleet {
        self.clock = clock;
        self
    }

    /// Persist rollouts and command metadata under `dir`, loading what an
    /// earlier process left there (a restart mid-rollout resumes it).
    pub fn with_data_dir(mut self, dir: &Path) -> Result<StoreFleet, FleetStoreError> {
        let rdir = dir.join(ROLLOUTS_DIR);
        fs::create_dir_all(&rdir).map_err(io_err(&rdir, "create directory"))?;
        let mut rollouts = BTreeMap::new();
        for ent in fs::read_dir(&rdir).map_err(io_err(&rdir, "list"))? {
            let ent = ent.map_err(io_err(&rdir, "list"))?;
            let path = ent.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue; // temporary files of an interrupted write
            }
            let text = fs::read_to_string(&path).map_err(io_err(&path, "read"))?;
            let r: Rollout = serde_json::from_str(&text).map_err(|e| FleetStoreError::Corrupt {
                path: path.clone(),
                reason: format!("not a rollout: {e}"),
            })?;
            rollouts.insert(r.spec.id.clone(), r);
        }
        let meta_path = dir.join(COMMAND_META_FILE);
        let mut meta = BTreeMap::new();
        match File::open(&meta_path) {
            Ok(f) => {
                let lines: Vec<String> = BufReader::new(f)
                    .lines()
                    .collect::<Result<_, _>>()
                    .map_err(io_err(&meta_path, "read"))?;
                let n = lines.len();
                for (i, line) in lines.into_iter().enumerate() {
                    match serde_json::from_str::<CommandMeta>(&line) {
                        Ok(m) => {
                            meta.insert(m.id.clone(), m);
                        }
                        // A crash mid-append can leave a torn last line: the
                        // command itself is in its document, only the key
                        // and reason are lost.
                        Err(_) if i + 1 == n => {}
                        Err(e) => {
                            return Err(FleetStoreError::Corrupt {
                                path: meta_path,
                                reason: format!("line {}: {e}", i + 1),
                            });
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&meta_path, "open")(e)),
        }
        self.rollouts = Mutex::new(rollouts);
        self.command_meta = Mutex::new(meta);
        self.data_dir = Some(dir.to_path_buf());
        Ok(self)
    }

    /// List audit entries from the signed audit log at `path` (the file the
    /// audit closure appends to).
    pub fn with_audit_log(mut self, path: &Path) -> StoreFleet {
        self.audit_log = Some(path.to_path_buf());
        self
    }

    /// Fold document changes announced since the last call into the rollup
    /// index (a full rescan on first use and after missed notifications).
    /// Queries call it; the hub may also call it periodically so that
    /// notifications never pile up.
    pub fn refresh(&self) {
        let mut idx = lock(&self.index);
        let mut rx = lock(&self.changes);
        if !idx.primed {
            // Notifications queued before the scan are covered by it.
            while !matches!(
                rx.try_recv(),
                Err(TryRecvError::Empty | TryRecvError::Closed)
            ) {}
            self.rescan(&mut idx);
            return;
        }
        let mut ids = BTreeSet::new();
        loop {
            match rx.try_recv() {
                Ok(c) => {
                    ids.insert(c.id);
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                Err(TryRecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "fleet index missed notifications; rescanning");
                    while !matches!(
                        rx.try_recv(),
                        Err(TryRecvError::Empty | TryRecvError::Closed)
                    ) {}
                    self.rescan(&mut idx);
                    return;
                }
            }
        }
        for id in ids {
            self.index_doc(&mut idx, &id);
        }
    }

    /// Number of distinct rollup windows indexed.
    pub fn indexed_windows(&self) -> usize {
        self.refresh();
        lock(&self.index).rollups.len()
    }

    fn rescan(&self, idx: &mut Index) {
        idx.rollups = RollupIndex::default();
        idx.device_types.clear();
        for id in self.store.list() {
            self.index_doc(idx, &id);
        }
        idx.primed = true;
    }

    fn index_doc(&self, idx: &mut Index, id: &DocId) {
        match id {
            DocId::Telemetry { tenant, site, .. } => {
                match self.store.read(id, docs::telemetry::rollups_with_late) {
                    Ok(Some(Ok((rollups, bad)))) => {
                        for e in bad {
                            tracing::warn!(doc = %id, error = %e, "undecodable rollup skipped");
                        }
                        for r in rollups {
                            idx.rollups.insert(tenant, site, r);
                        }
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!(doc = %id, error = %e, "telemetry document unreadable")
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(doc = %id, error = %e, "telemetry document did not load")
                    }
                }
            }
            DocId::Device {
                tenant,
                site,
                device,
            } => {
                if let Ok(Some(Ok((Some(t), _)))) = self.store.read(id, docs::device::meta) {
                    idx.device_types.insert(
                        DeviceKey {
                            tenant: tenant.clone(),
                            site: site.clone(),
                            device: device.clone(),
                        },
                        t,
                    );
                }
            }
            _ => {}
        }
    }

    fn docs_of(&self, kind: DocKind) -> Vec<DocId> {
        self.store
            .list()
            .into_iter()
            .filter(|id| id.kind() == kind)
            .collect()
    }

    fn site_docs(&self, kind: DocKind, tenant: &TenantId, site: &SiteId) -> Vec<DocId> {
        self.docs_of(kind)
            .into_iter()
            .filter(|id| id.tenant() == Some(tenant) && id.site() == Some(site))
            .collect()
    }

    fn read_device(&self, key: &DeviceKey) -> Option<DeviceRecord> {
        let id = DocId::device_doc(&key.tenant, &key.site, &key.device);
        let read = self.store.read(&id, |doc| -> Result<_, DocError> {
            Ok((
                docs::device::desired(doc)?,
                docs::device::reported(doc)?,
                docs::device::meta(doc)?,
            ))
        });
        let (desired, reported, (device_type, tags)) = match read {
            Ok(Some(Ok(v))) => v,
            Ok(None) => return None,
            Ok(Some(Err(e))) => {
                tracing::warn!(doc = %id, error = %e, "device document unreadable");
                return None;
            }
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "device document did not load");
                return None;
            }
        };
        let mut rec = DeviceRecord::new(
            key.clone(),
            device_type.as_deref().unwrap_or("unknown"),
            &[],
        );
        rec.tags = tags;
        rec.desired = DesiredConfig {
            schema_version: Default::default(),
            fields: desired
                .iter()
                .map(|(k, f)| (k.clone(), f.effective.clone()))
                .collect(),
        };
        rec.conflicts = desired
            .into_iter()
            .filter(|(_, f)| f.in_conflict())
            .map(|(field, f)| FieldConflict {
                field,
                values: f.values,
                policy: f.policy,
                effective: Some(f.effective),
            })
            .collect();
        if let Some(rep) = reported {
            rec.reported_at = rep
                .values
                .values()
                .map(|r| r.ts)
                .chain(rep.health.last_ok)
                .max();
            rec.reported = rep;
        }
        Some(rec)
    }

    /// Alarms of one alarm document.
    fn doc_alarms(&self, id: &DocId) -> Vec<FleetAlarm> {
        let (Some(tenant), Some(site)) = (id.tenant(), id.site()) else {
            return Vec::new();
        };
        match self.store.read(id, docs::alarms::alarms) {
            Ok(Some(Ok(list))) => list
                .into_iter()
                .map(|a| FleetAlarm::new(tenant.clone(), site.clone(), a))
                .collect(),
            Ok(None) => Vec::new(),
            Ok(Some(Err(e))) => {
                tracing::warn!(doc = %id, error = %e, "alarm document unreadable");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "alarm document did not load");
                Vec::new()
            }
        }
    }

    /// Edges of a site, as store keys.
    fn site_edges(
        &self,
        edges: &[EdgeStatus],
        tenant: &TenantId,
        site: &SiteId,
    ) -> Vec<EndpointKey> {
        edges
            .iter()
            .filter(|e| e.tenant == *tenant && e.site == *site)
            .filter_map(|e| e.endpoint.parse::<EndpointKey>().ok())
            .collect()
    }

    /// Command records of one command document.
    fn doc_commands(&self, id: &DocId, edges: &[EdgeStatus], now: Timestamp) -> Vec<CommandRecord> {
        let (Some(tenant), Some(site)) = (id.tenant(), id.site()) else {
            return Vec::new();
        };
        let peers: Vec<(EndpointKey, Vec<automerge::ChangeHash>)> = self
            .site_edges(edges, tenant, site)
            .into_iter()
            .map(|k| {
                let heads = self.store.sync_state(&k, id).shared_heads;
                (k, heads)
            })
            .collect();
        let read = self.store.read(id, |doc| -> Result<_, DocError> {
            let (reqs, bad) = docs::commands::requests(doc)?;
            for e in bad {
                tracing::warn!(doc = %id, error = %e, "undecodable command request skipped");
            }
            let results = docs::commands::results(doc)?;
            let delivered: BTreeSet<String> = reqs
                .iter()
                .filter(|c| peers.iter().any(|(_, h)| peer_has_request(doc, h, &c.id)))
                .map(|c| c.id.clone())
                .collect();
            Ok((reqs, results, delivered))
        });
        let (reqs, mut results, delivered) = match read {
            Ok(Some(Ok(v))) => v,
            Ok(None) => return Vec::new(),
            Ok(Some(Err(e))) => {
                tracing::warn!(doc = %id, error = %e, "command document unreadable");
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "command document did not load");
                return Vec::new();
            }
        };
        let meta = lock(&self.command_meta);
        reqs.into_iter()
            .map(|c| {
                let result = results.remove(&c.id);
                let status = command_status(&c, result.as_ref(), delivered.contains(&c.id), now);
                let m = meta.get(&c.id);
                CommandRecord {
                    tenant: tenant.clone(),
                    site: site.clone(),
                    status,
                    result,
                    idempotency_key: m.and_then(|m| m.idempotency_key.clone()),
                    reason: m.map(|m| m.reason.clone()).unwrap_or_default(),
                    command: c,
                }
            })
            .collect()
    }

    fn find_command(&self, tenant: &TenantId, site: &SiteId, id: &str) -> Option<CommandRecord> {
        let edges = (self.edges)();
        let now = self.clock.now();
        self.site_docs(DocKind::Commands, tenant, site)
            .into_iter()
            .rev()
            .find_map(|d| {
                self.doc_commands(&d, &edges, now)
                    .into_iter()
                    .find(|c| c.command.id == id)
            })
    }

    fn append_command_meta(&self, m: &CommandMeta) -> Result<(), DataError> {
        if let Some(dir) = &self.data_dir {
            let path = dir.join(COMMAND_META_FILE);
            let line = serde_json::to_string(m).map_err(|e| DataError::Store(e.to_string()))?;
            let write = || -> std::io::Result<()> {
                let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_data()
            };
            write().map_err(|e| DataError::Store(format!("{}: append: {e}", path.display())))?;
        }
        lock(&self.command_meta).insert(m.id.clone(), m.clone());
        Ok(())
    }

    fn read_audit_log(path: &Path) -> Vec<AuditRecord> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "audit log unreadable");
                }
                return Vec::new();
            }
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str::<crate::audit::AuditEntry>(&line).ok())
            .map(audit_from_log)
            .collect()
    }
}

/// Whether a peer whose shared heads are `heads` has request `id`.
fn peer_has_request(doc: &AutoCommit, heads: &[automerge::ChangeHash], id: &str) -> bool {
    if heads.is_empty() {
        return false;
    }
    match doc.get_at(ROOT, "requests", heads) {
        Ok(Some((Value::Object(ObjType::Map), m))) => {
            matches!(doc.get_at(&m, id, heads), Ok(Some(_)))
        }
        _ => false,
    }
}

/// A command's status from its result, delivery and expiry.
pub(crate) fn command_status(
    c: &schemas::command::Command,
    result: Option<&CommandResult>,
    delivered: bool,
    now: Timestamp,
) -> CommandStatus {
    match result {
        Some(r) if r.status.is_final() => r.status,
        _ if c.is_expired(now) => CommandStatus::Expired,
        Some(r) => r.status,
        None if delivered => CommandStatus::Delivered,
        None => CommandStatus::Pending,
    }
}

/// An API audit record from a line of the signed audit log (tenant, site
/// and details travel in the line's `details` as JSON).
fn audit_from_log(e: crate::audit::AuditEntry) -> AuditRecord {
    let parsed: Option<serde_json::Value> = serde_json::from_str(&e.details).ok();
    let field = |k: &str| parsed.as_ref().and_then(|v| v.get(k)).cloned();
    let tenant = field("tenant").and_then(|v| serde_json::from_value(v).ok());
    let site = field("site").and_then(|v| serde_json::from_value(v).ok());
    let details = match (&parsed, field("details")) {
        (Some(serde_json::Value::Object(o)), Some(d)) if o.contains_key("tenant") => d,
        (Some(v), _) => v.clone(),
        (None, _) if e.details.is_empty() => serde_json::Value::Null,
        (None, _) => serde_json::Value::String(e.details.clone()),
    };
    AuditRecord {
        seq: e.seq,
        entry: AuditEntry {
            at: e.time,
            actor: e.actor,
            action: e.action,
            target: e.target,
            tenant,
            site,
            reason: e.reason,
            details,
        },
    }
}

impl FleetData for StoreFleet {
    fn doc_heads(&self) -> Vec<crate::api::data::DocHeads> {
        self.store
            .heads_hex()
            .into_iter()
            .map(|(id, heads)| crate::api::data::DocHeads {
                doc: id.to_string(),
                heads,
            })
            .collect()
    }

    fn sites(&self) -> Vec<SiteRecord> {
        let mut out: BTreeMap<(TenantId, SiteId), SiteRecord> = BTreeMap::new();
        for id in self.store.list() {
            let (Some(t), Some(s)) = (id.tenant(), id.site()) else {
                continue;
            };
            let key = (t.clone(), s.clone());
            if id.kind() == DocKind::Site {
                let name = self
                    .store
                    .read(&id, site_name)
                    .ok()
                    .flatten()
                    .flatten()
                    .unwrap_or_else(|| s.to_string());
                out.insert(key, SiteRecord::new(t.clone(), s.clone(), &name));
            } else {
                out.entry(key)
                    .or_insert_with(|| SiteRecord::new(t.clone(), s.clone(), s.as_str()));
            }
        }
        out.into_values().collect()
    }

    fn edges(&self) -> Vec<EdgeStatus> {
        (self.edges)()
    }

    fn devices(&self) -> Vec<DeviceRecord> {
        self.docs_of(DocKind::Device)
            .into_iter()
            .filter_map(|id| match id {
                DocId::Device {
                    tenant,
                    site,
                    device,
                } => self.read_device(&DeviceKey {
                    tenant,
                    site,
                    device,
                }),
                _ => None,
            })
            .collect()
    }

    fn device(&self, key: &DeviceKey) -> Option<DeviceRecord> {
        self.read_device(key)
    }

    fn set_desired(
        &self,
        key: &DeviceKey,
        field: &str,
        value: Option<FieldValue>,
    ) -> Result<(), DataError> {
        let id = DocId::device_doc(&key.tenant, &key.site, &key.device);
        if !self.store.contains(&id) {
            return Err(DataError::NotFound {
                kind: "device",
                id: device_id(key),
            });
        }
        self.store
            .change(&id, self.clock.now(), |doc| match &value {
                Some(v) => docs::device::set_desired(doc, field, v),
                None => {
                    let m = match doc.get(ROOT, "desired")? {
                        Some((Value::Object(ObjType::Map), m)) => m,
                        _ => return Err(DocError::MissingMap("desired")),
                    };
                    if doc.get(&m, field)?.is_some() {
                        doc.delete(&m, field)?;
                    }
                    Ok(())
                }
            })
            .map_err(store_err)
    }

    fn telemetry(&self, q: &TelemetryQuery) -> Vec<Series> {
        self.refresh();
        let idx = lock(&self.index);
        idx.rollups.query(q, &|k| idx.device_types.get(k).cloned())
    }

    fn top_devices(
        &self,
        q: &TelemetryQuery,
        metric: &str,
        stat: Stat,
        n: usize,
    ) -> Vec<DeviceStat> {
        self.refresh();
        lock(&self.index).rollups.top_devices(q, metric, stat, n)
    }

    fn alarms(&self) -> Vec<FleetAlarm> {
        self.docs_of(DocKind::Alarms)
            .iter()
            .flat_map(|id| self.doc_alarms(id))
            .collect()
    }

    fn ack_alarm(&self, id: &str, by: &str, at: Timestamp) -> Result<FleetAlarm, DataError> {
        let not_found = || DataError::NotFound {
            kind: "alarm",
            id: id.to_string(),
        };
        let mut parts = id.splitn(3, ':');
        let (Some(t), Some(s), Some(alarm_id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(not_found());
        };
        let (Ok(tenant), Ok(site)) = (TenantId::new(t), SiteId::new(s)) else {
            return Err(not_found());
        };
        for doc_id in self
            .site_docs(DocKind::Alarms, &tenant, &site)
            .into_iter()
            .rev()
        {
            let Some(found) = self
                .doc_alarms(&doc_id)
                .into_iter()
                .find(|a| a.alarm.id == alarm_id)
            else {
                continue;
            };
            if found.alarm.acked_by.is_some() {
                return Ok(found);
            }
            self.store
                .change(&doc_id, self.clock.now(), |doc| {
                    docs::alarms::ack(doc, alarm_id, by, at)
                })
                .map_err(store_err)?;
            return self
                .doc_alarms(&doc_id)
                .into_iter()
                .find(|a| a.alarm.id == alarm_id)
                .ok_or_else(not_found);
        }
        Err(not_found())
    }

    fn insert_command(&self, rec: CommandRecord) -> Result<(CommandRecord, bool), DataError> {
        let _guard = lock(&self.command_lock);
        // The API derives the id of a keyed command from (issuer, key), so
        // a stored command with the same id is the earlier request.
        if let Some(existing) = self.find_command(&rec.tenant, &rec.site, &rec.command.id) {
            if rec.idempotency_key.is_some() {
                return Ok((existing, false));
            }
            return Err(DataError::Conflict(format!(
                "command id {:?} exists",
                rec.command.id
            )));
        }
        let doc_id = DocId::commands(&rec.tenant, &rec.site, rec.command.issued_at.day());
        // Metadata first: a crash between the two leaves metadata without a
        // command (harmless), never a command whose key is forgotten.
        self.append_command_meta(&CommandMeta {
            id: rec.command.id.clone(),
            idempotency_key: rec.idempotency_key.clone(),
            reason: rec.reason.clone(),
        })?;
        self.store
            .change(&doc_id, self.clock.now(), |doc| {
                docs::commands::put_request(doc, &rec.command)
            })
            .map_err(store_err)?;
        let stored = self
            .find_command(&rec.tenant, &rec.site, &rec.command.id)
            .ok_or_else(|| {
                DataError::Store(format!(
                    "command {} written to {doc_id} but not found there",
                    rec.command.id
                ))
            })?;
        Ok((stored, true))
    }

    fn commands(&self) -> Vec<CommandRecord> {
        let edges = (self.edges)();
        let now = self.clock.now();
        self.docs_of(DocKind::Commands)
            .iter()
            .flat_map(|id| self.doc_commands(id, &edges, now))
            .collect()
    }

    fn rollouts(&self) -> Vec<Rollout> {
        lock(&self.rollouts).values().cloned().collect()
    }

    fn put_rollout(&self, r: &Rollout) -> Result<(), DataError> {
        let mut g = lock(&self.rollouts);
        if let Some(dir) = &self.data_dir {
            let path = rollout_file(dir, &r.spec.id);
            let bytes =
                serde_json::to_vec_pretty(r).map_err(|e| DataError::Store(e.to_string()))?;
            write_atomic(&path, &bytes)
                .map_err(|e| DataError::Store(format!("{}: write: {e}", path.display())))?;
        }
        g.insert(r.spec.id.clone(), r.clone());
        Ok(())
    }

    fn append_audit(&self, e: AuditEntry) -> Result<AuditRecord, DataError> {
        let mut mem = lock(&self.audit_mem);
        (self.audit)(&e).map_err(DataError::Store)?;
        let seq = match &self.audit_log {
            Some(path) => Self::read_audit_log(path).last().map_or(0, |r| r.seq),
            None => mem.len() as u64 + 1,
        };
        let rec = AuditRecord { seq, entry: e };
        if self.audit_log.is_none() {
            mem.push(rec.clone());
        }
        Ok(rec)
    }

    fn audit(&self) -> Vec<AuditRecord> {
        match &self.audit_log {
            Some(path) => Self::read_audit_log(path),
            None => lock(&self.audit_mem).clone(),
        }
    }
}

/// The `name` of a site document's `info` map, if it has one.
fn site_name(doc: &AutoCommit) -> Option<String> {
    let m = match doc.get(ROOT, "info") {
        Ok(Some((Value::Object(ObjType::Map), m))) => m,
        _ => return None,
    };
    match doc.get(&m, "name") {
        Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
            automerge::ScalarValue::Str(t) => {
                let t = t.to_string();
                // Written either as plain text or as a JSON string.
                Some(serde_json::from_str::<String>(&t).unwrap_or(t))
            }
            _ => None,
        },
        _ => None,
    }
}
