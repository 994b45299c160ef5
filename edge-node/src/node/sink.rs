//! Where the node's summariser writes rollups: the day's telemetry document
//! through the document store (one `store.change` per document per flush,
//! then one `store.flush`), or a local bucket file for rollups that must not
//! be filed under a calendar day.
//!
//! Routing of one [`RollupWrite`]:
//! - `clock_unsynced` (taken while the wall clock was implausible): local
//!   bucket. Filing it under `window_start.day()` would put it in a 1970 day
//!   document; it stays on the edge, visible at `GET /api/rollups/local`.
//! - its day document is already sealed (a replay after days offline):
//!   local bucket, since the store refuses writes to sealed days and a
//!   retried write would block the pipeline for ever.
//! - a late part (`late_seq: Some`): the telemetry document under root key
//!   `late:{metric}@{window_ms}#{seq}`, because `docs::telemetry::put_rollup`
//!   keys by metric and window only and would overwrite the main rollup.
//!   Readers merge parts with `Rollup::merge`. (A `docs::telemetry` part
//!   accessor in sync-core would be the better home; noted in the report.)
//! - otherwise: `docs::telemetry::put_rollup` in the day's document.
//!
//! Every route overwrites by key, so writing a batch twice (a crash between
//! the store flush and the checkpoint) counts nothing twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use schemas::ids::{DocId, SiteId, TenantId};
use schemas::metrics::Rollup;
use sync_core::docs::{put_root_json, telemetry};
use sync_core::store::{DocStore, StoreError};

use crate::clock::Clock;
use crate::metrics::Counters;
use crate::summariser::{RollupKey, RollupSink, RollupWrite};

/// Why a batch of rollups was not written (the pipeline retries it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The document store refused or failed a write or flush.
    #[error("telemetry document store: {0}")]
    Store(#[from] StoreError),
    /// The local bucket file could not be written.
    #[error("local rollup bucket {path}: {reason}")]
    Local { path: PathBuf, reason: String },
}

/// Root key of a late part in a telemetry document.
pub fn late_part_key(k: &RollupKey) -> Option<String> {
    k.late_seq
        .map(|seq| format!("late:{}@{}#{seq}", k.metric, k.window_start.as_millis()))
}

/// Rollups kept on the edge only, persisted as one JSON file (atomic
/// replace). Small: only unsynced-clock windows and writes to sealed days.
#[derive(Debug)]
pub struct LocalBucket {
    path: PathBuf,
    rollups: Mutex<BTreeMap<String, Rollup>>,
}

impl LocalBucket {
    /// Open (or start) the bucket at `path`.
    pub fn open(path: &Path) -> Result<LocalBucket, SinkError> {
        let err = |reason: String| SinkError::Local {
            path: path.to_path_buf(),
            reason,
        };
        let rollups = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| err(format!("corrupt: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(err(format!("read: {e}"))),
        };
        Ok(LocalBucket {
            path: path.to_path_buf(),
            rollups: Mutex::new(rollups),
        })
    }

    fn key(k: &RollupKey) -> String {
        format!(
            "{}/{}@{}{}{}",
            k.device,
            k.metric,
            k.window_start.as_millis(),
            if k.clock_unsynced { "~unsynced" } else { "" },
            k.late_seq.map(|s| format!("#{s}")).unwrap_or_default()
        )
    }

    /// A copy of every rollup, by key.
    pub fn snapshot(&self) -> BTreeMap<String, Rollup> {
        self.rollups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn put_all(&self, writes: &[&RollupWrite]) -> Result<(), SinkError> {
        let err = |reason: String| SinkError::Local {
            path: self.path.clone(),
            reason,
        };
        let mut g = self
            .rollups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = g.clone();
        for w in writes {
            next.insert(Self::key(&w.key), w.rollup.clone());
        }
        let json = serde_json::to_vec(&next).map_err(|e| err(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| err(e.to_string()))?;
        *g = next;
        Ok(())
    }
}

/// The node's [`RollupSink`].
pub struct StoreSink {
    pub(crate) store: Arc<DocStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) tenant: TenantId,
    pub(crate) site: SiteId,
    pub(crate) local: Arc<LocalBucket>,
    pub(crate) counters: Arc<Counters>,
}

impl std::fmt::Debug for StoreSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSink")
            .field("site", &self.site)
            .finish()
    }
}

impl StoreSink {
    /// A sink writing into `store` for documents of `tenant`/`site`.
    pub fn new(
        store: Arc<DocStore>,
        clock: Arc<dyn Clock>,
        tenant: TenantId,
        site: SiteId,
        local: Arc<LocalBucket>,
        counters: Arc<Counters>,
    ) -> StoreSink {
        StoreSink {
            store,
            clock,
            tenant,
            site,
            local,
            counters,
        }
    }
}

impl RollupSink for StoreSink {
    type Error = SinkError;

    fn write_rollups(&mut self, writes: &[RollupWrite]) -> Result<(), SinkError> {
        let now = self.clock.now();
        let mut by_doc: BTreeMap<DocId, Vec<&RollupWrite>> = BTreeMap::new();
        let mut local: Vec<&RollupWrite> = Vec::new();
        for w in writes {
            match w.key.day() {
                None => local.push(w),
                Some(day) => {
                    let id = DocId::telemetry(&self.tenant, &self.site, &w.key.device, day);
                    if self.store.is_sealed(&id, now) {
                        tracing::warn!(doc = %id, "telemetry day is sealed; rollup kept in the local bucket");
                        local.push(w);
                    } else {
                        by_doc.entry(id).or_default().push(w);
                    }
                }
            }
        }
        for (id, ws) in &by_doc {
            self.store.change(id, now, |doc| {
                for w in ws {
                    match late_part_key(&w.key) {
                        Some(k) => put_root_json(doc, &k, &w.rollup)?,
                        None => {
                            telemetry::put_rollup(doc, &w.rollup)?;
                        }
                    }
                }
                Ok(())
            })?;
        }
        if !by_doc.is_empty() {
            self.store.flush()?;
        }
        if !local.is_empty() {
            self.local.put_all(&local)?;
        }
        let n_docs: usize = by_doc.values().map(Vec::len).sum();
        Counters::add(&self.counters.rollups_written, n_docs as u64);
        Counters::add(&self.counters.rollups_local, local.len() as u64);
        Ok(())
    }
}
