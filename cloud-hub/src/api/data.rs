//! The hub's data as the API sees it: the [`FleetData`] trait (to be backed
//! by sync-core's document replicas) and [`MemoryFleet`], its in-memory twin
//! for tests and demos.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use schemas::alarm::Alarm;
use schemas::command::{Command, CommandResult, CommandStatus};
use schemas::device::{DesiredConfig, FieldValue, MergePolicy, ReportedState};
use schemas::metrics::Rollup;
use schemas::time::Timestamp;
use schemas::{SiteId, TenantId};
use serde::{Deserialize, Serialize};

use crate::analytics::{
    DeviceKey, DeviceStat, EdgeStatus, RollupIndex, Series, Stat, TelemetryQuery,
};
use crate::rollout::Rollout;

/// Why a data operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The named thing does not exist.
    #[error("no {kind} {id:?}")]
    NotFound { kind: &'static str, id: String },
    /// The write conflicts with what is stored (e.g. a duplicate id).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backing store failed.
    #[error("store: {0}")]
    Store(String),
}

/// A site of a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// `tenant:site`.
    pub id: String,
    pub tenant: TenantId,
    pub site: SiteId,
    pub name: String,
}

impl SiteRecord {
    /// A site record with its id derived.
    pub fn new(tenant: TenantId, site: SiteId, name: &str) -> SiteRecord {
        SiteRecord {
            id: format!("{tenant}:{site}"),
            tenant,
            site,
            name: name.to_string(),
        }
    }
}

/// Concurrent values of one desired field, resolved by its policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldConflict {
    pub field: String,
    /// All concurrent values, in automerge order.
    pub values: Vec<FieldValue>,
    pub policy: MergePolicy,
    /// The value the policy picks.
    pub effective: Option<FieldValue>,
}

/// A device with its desired and reported state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// `tenant:site:device`.
    pub id: String,
    pub key: DeviceKey,
    pub device_type: String,
    pub tags: Vec<String>,
    pub desired: DesiredConfig,
    pub reported: ReportedState,
    /// When the reported state last changed at the hub.
    pub reported_at: Option<Timestamp>,
    /// Open conflicts on desired fields.
    pub conflicts: Vec<FieldConflict>,
}

impl DeviceRecord {
    /// A device with empty state.
    pub fn new(key: DeviceKey, device_type: &str, tags: &[&str]) -> DeviceRecord {
        DeviceRecord {
            id: device_id(&key),
            key,
            device_type: device_type.to_string(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            desired: DesiredConfig::default(),
            reported: ReportedState::default(),
            reported_at: None,
            conflicts: Vec::new(),
        }
    }
}

/// The API id of a device: `tenant:site:device`.
pub fn device_id(key: &DeviceKey) -> String {
    format!("{}:{}:{}", key.tenant, key.site, key.device)
}

/// Parse a device API id.
pub fn parse_device_id(id: &str) -> Option<DeviceKey> {
    let mut it = id.splitn(3, ':');
    let (t, s, d) = (it.next()?, it.next()?, it.next()?);
    DeviceKey::parse(t, s, d).ok()
}

/// An alarm with the site it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetAlarm {
    /// `tenant:site:{alarm id}`, unique across the fleet.
    pub id: String,
    pub tenant: TenantId,
    pub site: SiteId,
    pub alarm: Alarm,
}

impl FleetAlarm {
    /// Wrap a site's alarm with its fleet-wide id.
    pub fn new(tenant: TenantId, site: SiteId, alarm: Alarm) -> FleetAlarm {
        FleetAlarm {
            id: format!("{tenant}:{site}:{}", alarm.id),
            tenant,
            site,
            alarm,
        }
    }
}

/// A command with its life cycle as the hub tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub tenant: TenantId,
    pub site: SiteId,
    pub command: Command,
    pub status: CommandStatus,
    pub result: Option<CommandResult>,
    /// Client idempotency key, scoped to the issuing principal.
    pub idempotency_key: Option<String>,
    pub reason: String,
}

/// An audit entry to write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: Timestamp,
    /// Principal (`admin:alice`) or engine (`hub:rollout-engine`).
    pub actor: String,
    /// What was done, dotted (`alarm.ack`, `command.create`, `rollout.paused`).
    pub action: String,
    /// What it was done to (an API id).
    pub target: String,
    pub tenant: Option<TenantId>,
    pub site: Option<SiteId>,
    /// Why, as given by the caller.
    pub reason: String,
    pub details: serde_json::Value,
}

/// A written audit entry with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// Everything the API reads and writes. Implementations must be safe to
/// call from many requests at once; each method is atomic on its own.
pub trait FleetData: Send + Sync + 'static {
    /// All sites.
    fn sites(&self) -> Vec<SiteRecord>;
    /// Sync state of every edge.
    fn edges(&self) -> Vec<EdgeStatus>;
    /// All devices.
    fn devices(&self) -> Vec<DeviceRecord>;
    /// One device.
    fn device(&self, key: &DeviceKey) -> Option<DeviceRecord> {
        self.devices().into_iter().find(|d| d.key == *key)
    }
    /// Write (`Some`) or remove (`None`) one desired field of a device.
    fn set_desired(
        &self,
        key: &DeviceKey,
        field: &str,
        value: Option<FieldValue>,
    ) -> Result<(), DataError>;
    /// Telemetry series (see [`RollupIndex::query`]).
    fn telemetry(&self, q: &TelemetryQuery) -> Vec<Series>;
    /// Top devices (see [`RollupIndex::top_devices`]).
    fn top_devices(
        &self,
        q: &TelemetryQuery,
        metric: &str,
        stat: Stat,
        n: usize,
    ) -> Vec<DeviceStat>;
    /// All alarms.
    fn alarms(&self) -> Vec<FleetAlarm>;
    /// Acknowledge an alarm (again: keeps the first acknowledgement).
    fn ack_alarm(&self, id: &str, by: &str, at: Timestamp) -> Result<FleetAlarm, DataError>;
    /// Store a command unless `(issued_by, idempotency_key)` was seen: then
    /// return the stored one. The bool says whether it was created now.
    fn insert_command(&self, rec: CommandRecord) -> Result<(CommandRecord, bool), DataError>;
    /// All commands.
    fn commands(&self) -> Vec<CommandRecord>;
    /// All rollouts.
    fn rollouts(&self) -> Vec<Rollout>;
    /// Store a rollout (insert or replace by id).
    fn put_rollout(&self, r: &Rollout) -> Result<(), DataError>;
    /// Append an audit entry.
    fn append_audit(&self, e: AuditEntry) -> Result<AuditRecord, DataError>;
    /// All audit records, ascending by `seq`.
    fn audit(&self) -> Vec<AuditRecord>;
    /// The heads of every document this hub holds, by id (for convergence
    /// checks). An implementation without documents has none.
    fn doc_heads(&self) -> Vec<DocHeads> {
        Vec::new()
    }
}

/// One document's heads (automerge change hashes, hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocHeads {
    /// Document id.
    pub doc: String,
    /// Its heads, sorted.
    pub heads: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    sites: BTreeMap<String, SiteRecord>,
    edges: BTreeMap<String, EdgeStatus>,
    devices: BTreeMap<DeviceKey, DeviceRecord>,
    rollups: RollupIndex,
    alarms: BTreeMap<String, FleetAlarm>,
    commands: BTreeMap<String, CommandRecord>,
    idempotency: BTreeMap<(String, String), String>,
    rollouts: BTreeMap<String, Rollout>,
    audit: Vec<AuditRecord>,
}

/// In-memory [`FleetData`], with setters for tests and demos.
#[derive(Debug, Default)]
pub struct MemoryFleet {
    inner: Mutex<Inner>,
}

impl MemoryFleet {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every method leaves `Inner` consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add or replace a site.
    pub fn put_site(&self, s: SiteRecord) {
        self.lock().sites.insert(s.id.clone(), s);
    }
    /// Add or replace an edge's status.
    pub fn put_edge(&self, e: EdgeStatus) {
        self.lock().edges.insert(e.endpoint.clone(), e);
    }
    /// Add or replace a device.
    pub fn put_device(&self, d: DeviceRecord) {
        self.lock().devices.insert(d.key.clone(), d);
    }
    /// Replace a device's reported state as its edge would.
    pub fn report(&self, key: &DeviceKey, reported: ReportedState, at: Timestamp) -> bool {
        let mut g = self.lock();
        match g.devices.get_mut(key) {
            Some(d) => {
                d.reported = reported;
                d.reported_at = Some(at);
                true
            }
            None => false,
        }
    }
    /// Ingest a rollup from a site.
    pub fn put_rollup(&self, tenant: &TenantId, site: &SiteId, r: Rollup) {
        self.lock().rollups.insert(tenant, site, r);
    }
    /// Add or replace an alarm.
    pub fn put_alarm(&self, a: FleetAlarm) {
        self.lock().alarms.insert(a.id.clone(), a);
    }
}

impl FleetData for MemoryFleet {
    fn sites(&self) -> Vec<SiteRecord> {
        self.lock().sites.values().cloned().collect()
    }
    fn edges(&self) -> Vec<EdgeStatus> {
        self.lock().edges.values().cloned().collect()
    }
    fn devices(&self) -> Vec<DeviceRecord> {
        self.lock().devices.values().cloned().collect()
    }
    fn device(&self, key: &DeviceKey) -> Option<DeviceRecord> {
        self.lock().devices.get(key).cloned()
    }
    fn set_desired(
        &self,
        key: &DeviceKey,
        field: &str,
        value: Option<FieldValue>,
    ) -> Result<(), DataError> {
        let mut g = self.lock();
        let d = g.devices.get_mut(key).ok_or_else(|| DataError::NotFound {
            kind: "device",
            id: device_id(key),
        })?;
        match value {
            Some(v) => d.desired.fields.insert(field.to_string(), v),
            None => d.desired.fields.remove(field),
        };
        // A write over a field resolves its conflict.
        d.conflicts.retain(|c| c.field != field);
        Ok(())
    }
    fn telemetry(&self, q: &TelemetryQuery) -> Vec<Series> {
        let g = self.lock();
        let types: BTreeMap<&DeviceKey, &str> = g
            .devices
            .iter()
            .map(|(k, d)| (k, d.device_type.as_str()))
            .collect();
        g.rollups
            .query(q, &|k| types.get(k).map(|t| (*t).to_string()))
    }
    fn top_devices(
        &self,
        q: &TelemetryQuery,
        metric: &str,
        stat: Stat,
        n: usize,
    ) -> Vec<DeviceStat> {
        self.lock().rollups.top_devices(q, metric, stat, n)
    }
    fn alarms(&self) -> Vec<FleetAlarm> {
        self.lock().alarms.values().cloned().collect()
    }
    fn ack_alarm(&self, id: &str, by: &str, at: Timestamp) -> Result<FleetAlarm, DataError> {
        let mut g = self.lock();
        let a = g.alarms.get_mut(id).ok_or_else(|| DataError::NotFound {
            kind: "alarm",
            id: id.to_string(),
        })?;
        if a.alarm.acked_by.is_none() {
            a.alarm.acked_by = Some(by.to_string());
            a.alarm.acked_at = Some(at);
        }
        Ok(a.clone())
    }
    fn insert_command(&self, rec: CommandRecord) -> Result<(CommandRecord, bool), DataError> {
        let mut g = self.lock();
        let idem = rec
            .idempotency_key
            .as_ref()
            .map(|k| (rec.command.issued_by.clone(), k.clone()));
        if let Some(existing) = idem.as_ref().and_then(|k| g.idempotency.get(k))
            && let Some(c) = g.commands.get(existing)
        {
            return Ok((c.clone(), false));
        }
        if g.commands.contains_key(&rec.command.id) {
            return Err(DataError::Conflict(format!(
                "command id {:?} exists",
                rec.command.id
            )));
        }
        if let Some(k) = idem {
            g.idempotency.insert(k, rec.command.id.clone());
        }
        g.commands.insert(rec.command.id.clone(), rec.clone());
        Ok((rec, true))
    }
    fn commands(&self) -> Vec<CommandRecord> {
        self.lock().commands.values().cloned().collect()
    }
    fn rollouts(&self) -> Vec<Rollout> {
        self.lock().rollouts.values().cloned().collect()
    }
    fn put_rollout(&self, r: &Rollout) -> Result<(), DataError> {
        self.lock().rollouts.insert(r.spec.id.clone(), r.clone());
        Ok(())
    }
    fn append_audit(&self, e: AuditEntry) -> Result<AuditRecord, DataError> {
        let mut g = self.lock();
        let rec = AuditRecord {
            seq: g.audit.len() as u64 + 1,
            entry: e,
        };
        g.audit.push(rec.clone());
        Ok(rec)
    }
    fn audit(&self) -> Vec<AuditRecord> {
        self.lock().audit.clone()
    }
}

impl From<&AuditEntry> for crate::audit::AuditRecord {
    /// The line to append to the hub's signed audit log for an API audit
    /// entry: tenant, site and details travel in `details` as JSON (the log
    /// adds its own time, so `at` is not repeated).
    fn from(e: &AuditEntry) -> crate::audit::AuditRecord {
        crate::audit::AuditRecord {
            actor: e.actor.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            reason: e.reason.clone(),
            details: serde_json::json!({
                "tenant": e.tenant,
                "site": e.site,
                "details": e.details,
            })
            .to_string(),
        }
    }
}
