//! Ingestion of devices that push: MQTT subscriptions and `POST
//! /api/ingest/{device}`, behind one perimeter (validation, normalisation,
//! deduplication, per-device rate limits, quarantine).
//!
//! ```text
//!   broker --QoS1--> mqtt driver --+
//!                                  +--> perimeter --> dedupe --> SampleSink (raw zone)
//!   HTTP POST -----> http router --+        |                         |
//!                                      quarantine            ack to broker / 200
//! ```
//!
//! # Invariants
//!
//! - **Acked means durable**: an MQTT message is acknowledged to the broker
//!   (PUBACK, manual acks) and an HTTP batch answered 200 only after
//!   [`SampleSink::accept`] returned `Ok` for its samples, or after the
//!   payload was written to the quarantine. A sink error leaves the message
//!   unacknowledged (the broker redelivers it) or answers 503.
//! - The MQTT session is persistent (`clean_session = false`, QoS 1), so
//!   messages published while the edge is down are delivered on reconnect.
//! - A payload is accepted whole or refused whole; a refused one lands in
//!   the quarantine with the reason and the field, never silently dropped.
//! - Deduplication keys are `(device, metric, timestamp)` or `(device,
//!   metric, message id)`; a key is recorded only after the sink accepted
//!   its sample, so a sink failure never makes a later retry look like a
//!   replay. Submissions are serialised, so two copies of one replay racing
//!   each other are still counted once.

mod http;
mod mqtt;
pub(crate) mod perimeter;
mod store;
pub mod test_broker;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use schemas::config::EdgeConfig;
use schemas::ids::DeviceId;
use schemas::ingest::{IngestSection, IngestSource, QuarantineEntry};
use schemas::metrics::Sample;
use serde::Serialize;

use crate::clock::Clock;
use perimeter::{Keyed, Perimeter, Reject, TokenBucket};

/// Where accepted samples go (the raw zone, in the node). Accepted means
/// durably acknowledged; an `Err` means not accepted, and the message must
/// not be acknowledged to the broker or HTTP client.
pub trait SampleSink: Send + Sync + 'static {
    /// Store `samples` durably, or say why not.
    fn accept(
        &self,
        samples: Vec<Sample>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Why ingestion could not start or a file of its own failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// A file under `{data_dir}/ingest/` could not be read or written.
    #[error("ingest {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The `[ingest]` section is invalid (field, reason).
    #[error("config: {0}: {1}")]
    Config(String, String),
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IngestStats {
    /// Samples the sink accepted.
    pub accepted: u64,
    /// Samples recognised as replays and skipped.
    pub duplicates: u64,
    /// Payloads sent to the quarantine.
    pub quarantined: u64,
    /// MQTT messages acknowledged to the broker.
    pub mqtt_acked: u64,
    /// MQTT (re)connections.
    pub mqtt_connects: u64,
    /// Sink refusals (the message was not acknowledged).
    pub sink_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    quarantined: AtomicU64,
    mqtt_acked: AtomicU64,
    mqtt_connects: AtomicU64,
    sink_errors: AtomicU64,
}

/// State shared by the MQTT driver and the HTTP handlers.
pub(crate) struct Shared {
    pub(crate) cfg: IngestSection,
    pub(crate) perimeter: Perimeter,
    dedupe: tokio::sync::Mutex<store::Dedupe>,
    quarantine: Mutex<store::Quarantine>,
    rates: Mutex<HashMap<DeviceId, TokenBucket>>,
    sink: Arc<dyn SampleSink>,
    pub(crate) clock: Arc<dyn Clock>,
    counters: Counters,
}

/// Result of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Submitted {
    pub(crate) accepted: usize,
    pub(crate) duplicates: usize,
}

impl Shared {
    /// Rate-limit check for `n` samples of `device`: `Err(retry_after)`.
    pub(crate) fn take_rate(&self, device: &DeviceId, n: usize) -> Result<(), std::time::Duration> {
        let Some(d) = self.perimeter.devices.get(device) else {
            return Ok(());
        };
        let now = self.clock.monotonic();
        let mut rates = self
            .rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rates
            .entry(device.clone())
            .or_insert_with(|| TokenBucket::new(d.cfg.rate_per_s, d.cfg.burst, now))
            .try_take(n, now)
    }

    /// Drop replays (against the window and within the batch), hand the rest
    /// to the sink, and remember their keys once accepted.
    pub(crate) async fn submit(&self, batch: Vec<Keyed>) -> Result<Submitted, String> {
        let mut dedupe = self.dedupe.lock().await;
        let mut fresh = Vec::with_capacity(batch.len());
        let mut in_batch = std::collections::HashSet::new();
        let mut duplicates = 0;
        for k in batch {
            if dedupe.contains(&k.key) || !in_batch.insert(k.key.clone()) {
                duplicates += 1;
            } else {
                fresh.push(k);
            }
        }
        let keys: Vec<_> = fresh.iter().map(|k| k.key.clone()).collect();
        let samples: Vec<Sample> = fresh.into_iter().map(|k| k.sample).collect();
        let accepted = samples.len();
        if accepted > 0 {
            if let Err(e) = self.sink.accept(samples).await {
                self.counters.sink_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            if let Err(e) = dedupe.record(keys.iter(), self.clock.now()) {
                // The samples are stored; only replay detection is weakened.
                tracing::warn!(error = %e, "ingest dedupe file not updated");
            }
        }
        self.counters
            .accepted
            .fetch_add(accepted as u64, Ordering::Relaxed);
        self.counters
            .duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
        Ok(Submitted {
            accepted,
            duplicates,
        })
    }

    /// Record a refused payload.
    pub(crate) fn quarantine(
        &self,
        source: IngestSource,
        origin: &str,
        device: Option<&DeviceId>,
        reject: &Reject,
        payload: &[u8],
    ) -> Result<QuarantineEntry, IngestError> {
        let keep = usize::try_from(self.cfg.quarantine_payload_bytes).unwrap_or(usize::MAX);
        let text = String::from_utf8_lossy(&payload[..payload.len().min(keep)]).into_owned();
        let e = QuarantineEntry {
            id: 0,
            at: self.clock.now(),
            source,
            origin: origin.to_string(),
            device: device.cloned(),
            field: reject.field.clone(),
            reason: reject.reason.clone(),
            payload: text,
            payload_len: payload.len() as u64,
        };
        tracing::info!(
            origin,
            device = device.map(DeviceId::as_str),
            field = reject.field.as_deref(),
            reason = %reject.reason,
            "ingest payload quarantined"
        );
        self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
        self.quarantine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(e)
    }

    fn stats(&self) -> IngestStats {
        let c = &self.counters;
        IngestStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            quarantined: c.quarantined.load(Ordering::Relaxed),
            mqtt_acked: c.mqtt_acked.load(Ordering::Relaxed),
            mqtt_connects: c.mqtt_connects.load(Ordering::Relaxed),
            sink_errors: c.sink_errors.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn quarantine_entries(&self) -> Vec<QuarantineEntry> {
        self.quarantine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entries()
    }
}

/// A running ingestion: the MQTT driver (if configured) and the state the
/// HTTP router serves.
pub struct IngestHandle {
    shared: Arc<Shared>,
    mqtt: Option<mqtt::MqttTask>,
}

impl std::fmt::Debug for IngestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestHandle")
            .field("mqtt", &self.mqtt.is_some())
            .field("stats", &self.shared.stats())
            .finish()
    }
}

impl IngestHandle {
    /// Stop the MQTT driver (unacknowledged messages stay with the broker's
    /// persistent session). The HTTP router keeps working until dropped.
    pub async fn stop(mut self) {
        if let Some(m) = self.mqtt.take() {
            m.stop().await;
        }
    }

    /// The quarantine, oldest first.
    pub fn quarantine(&self) -> Vec<QuarantineEntry> {
        self.shared.quarantine_entries()
    }

    /// Counters since start.
    pub fn stats(&self) -> IngestStats {
        self.shared.stats()
    }

    /// Whether the MQTT driver is connected to the broker now.
    pub fn mqtt_connected(&self) -> bool {
        self.mqtt.as_ref().is_some_and(mqtt::MqttTask::connected)
    }
}

/// Start ingestion: open the dedupe window and quarantine under
/// `{data_dir}/ingest/`, and subscribe to the broker if `[ingest.mqtt]` is
/// set. Returns at once; the MQTT driver connects (and reconnects with
/// backoff) in the background.
pub async fn start(
    cfg: &EdgeConfig,
    sink: Arc<dyn SampleSink>,
    clock: Arc<dyn Clock>,
) -> Result<IngestHandle, IngestError> {
    let ic = cfg.ingest.clone();
    ic.validate().map_err(|(f, r)| IngestError::Config(f, r))?;
    let dir = cfg.node.data_dir.join("ingest");
    std::fs::create_dir_all(&dir).map_err(|source| IngestError::Io {
        op: "create dir",
        path: dir.clone(),
        source,
    })?;
    let window_ms = i64::try_from(ic.dedupe_window_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let dedupe = store::Dedupe::open(
        &dir,
        window_ms,
        usize::try_from(ic.dedupe_max_entries).unwrap_or(usize::MAX),
        clock.now(),
    )?;
    let quarantine = store::Quarantine::open(
        &dir,
        usize::try_from(ic.quarantine_max_entries).unwrap_or(usize::MAX),
    )?;
    let shared = Arc::new(Shared {
        perimeter: Perimeter::new(&ic),
        cfg: ic,
        dedupe: tokio::sync::Mutex::new(dedupe),
        quarantine: Mutex::new(quarantine),
        rates: Mutex::new(HashMap::new()),
        sink,
        clock,
        counters: Counters::default(),
    });
    let mqtt = match &shared.cfg.mqtt {
        Some(m) => Some(mqtt::MqttTask::spawn(m.clone(), shared.clone())?),
        None => None,
    };
    Ok(IngestHandle { shared, mqtt })
}

/// The HTTP ingest endpoints: `POST /api/ingest/{device}` and
/// `GET /api/quarantine`. Merge into the node's router.
pub fn router(handle: &IngestHandle) -> axum::Router {
    http::router(handle.shared.clone())
}
