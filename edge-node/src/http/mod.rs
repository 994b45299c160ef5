//! The local HTTP API and web UI for the site operator; works with the
//! uplink cut, since it reads and writes only the node's own store.
//!
//! Every error is JSON `{code, message, details}` with a fitting status;
//! bad input (malformed JSON, unknown fields, out-of-range values, unknown
//! devices or alarms) never panics.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the UI (one static page) |
//! | `GET /healthz` | liveness |
//! | `GET /metrics` | Prometheus text |
//! | `GET /api/devices`, `GET /api/devices/{id}` | live values, health, desired (with conflicts), reported |
//! | `PUT /api/devices/{id}/desired/{field}` | body `{"value": .., "by": ".."}` |
//! | `GET /api/loops` | loop state, setpoint, last actuation, jitter, recent events |
//! | `GET /api/alarms`, `POST /api/alarms/{id}/ack` | body `{"by": ".."}` |
//! | `GET /api/commands` | requests and results of the last days |
//! | `GET /api/sync` | peers: connected, last sync age, docs behind, bytes queued |
//! | `GET /api/rollups/local` | rollups kept on the edge (clock unsynced, sealed days) |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use schemas::device::FieldValue;
use schemas::ids::{DeviceId, DocId, DocKind};
use serde::Deserialize;
use serde_json::{Value, json};
use sync_core::docs;

use crate::metrics::{Counters, PromText};
use crate::node::NodeState;

const UI: &str = include_str!("ui.html");

/// An API error: status plus `{code, message, details}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Value::Null,
        }
    }
    fn details(mut self, d: Value) -> ApiError {
        self.details = d;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code, "message": self.message, "details": self.details});
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let (status, code) = match &r {
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            _ => (StatusCode::BAD_REQUEST, "invalid_json"),
        };
        ApiError::new(status, code, r.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router over a running node's state, with `extra` routes (the
/// ingest endpoints) merged in before the JSON fallbacks.
pub fn router(state: Arc<NodeState>, extra: Option<Router>) -> Router {
    let api = Router::new()
        .route("/", get(|| async { Html(UI) }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}", get(device))
        .route("/api/devices/{id}/desired/{field}", put(put_desired))
        .route("/api/loops", get(loops))
        .route("/api/alarms", get(alarms))
        .route("/api/alarms/{id}/ack", post(ack))
        .route("/api/commands", get(commands))
        .route("/api/sync", get(sync))
        .route("/api/sync/heads", get(sync_heads))
        .route("/api/rollups/local", get(local_rollups))
        .with_state(state);
    let app = match extra {
        Some(e) => api.merge(e),
        None => api,
    };
    app.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
}

async fn healthz(State(s): State<Arc<NodeState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "edge": s.key.to_string(),
        "clock_plausible": s.clock.now().is_plausible(),
    }))
}

fn parse_device(s: &NodeState, id: &str) -> ApiResult<DeviceId> {
    let d = DeviceId::new(id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_device_id", e.to_string()))?;
    if s.cfg.device(&d).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_device",
            format!("device {id:?} is not configured on this edge"),
        )
        .details(
            json!({"known": s.cfg.devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>()}),
        ));
    }
    Ok(d)
}

/// A device of this edge, or of another edge of the same site whose device
/// document this edge holds: desired config is a site document, so an
/// operator at any edge of the site may edit it (the edge that polls the
/// device applies it once the edit syncs, even across a partition).
fn parse_site_device(s: &NodeState, id: &str) -> ApiResult<DeviceId> {
    let d = DeviceId::new(id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_device_id", e.to_string()))?;
    if s.cfg.device(&d).is_some()
        || s.store
            .contains(&DocId::device_doc(&s.cfg.node.tenant, &s.cfg.node.site, &d))
    {
        return Ok(d);
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_device",
        format!("device {id:?} is neither configured on this edge nor known in its site"),
    )
    .details(json!({"known": s.cfg.devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>()})))
}

fn device_json(s: &NodeState, id: &DeviceId) -> ApiResult<Value> {
    let cfg = s
        .cfg
        .device(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_device", "not configured"))?;
    let mut live = serde_json::Map::new();
    for r in &cfg.registers {
        if let Some(l) = s.values.get(id, &r.name) {
            live.insert(
                r.name.clone(),
                json!({"value": l.reading.value, "ts": l.reading.ts, "unit": r.unit}),
            );
        }
    }
    let doc = DocId::device_doc(&s.cfg.node.tenant, &s.cfg.node.site, id);
    let read = s
        .store
        .read(&doc, |d| {
            (
                docs::device::desired(d).map_err(|e| e.to_string()),
                docs::device::reported(d).map_err(|e| e.to_string()),
            )
        })
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()))?;
    let (desired, reported) = match read {
        Some((d, r)) => (
            d.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e))?,
            r.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e))?,
        ),
        None => (BTreeMap::new(), None),
    };
    let conflicts: Vec<&String> = desired
        .iter()
        .filter(|(_, f)| f.in_conflict())
        .map(|(k, _)| k)
        .collect();
    Ok(json!({
        "id": id,
        "device_type": cfg.device_type,
        "addr": cfg.addr.to_string(),
        "tags": cfg.tags,
        "health": s.device(id).map(|h| h.health()),
        "live": live,
        "desired": desired,
        "conflicts": conflicts,
        "reported": reported,
    }))
}

async fn devices(State(s): State<Arc<NodeState>>) -> ApiResult<Json<Value>> {
    let mut out = Vec::new();
    for d in &s.cfg.devices {
        out.push(device_json(&s, &d.id)?);
    }
    Ok(Json(Value::Array(out)))
}

async fn device(State(s): State<Arc<NodeState>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = parse_device(&s, &id)?;
    Ok(Json(device_json(&s, &id)?))
}

/// Body of `PUT /api/devices/{id}/desired/{field}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DesiredBody {
    value: FieldValue,
    /// Who makes the change (for logs); optional.
    #[serde(default)]
    by: Option<String>,
}

async fn put_desired(
    State(s): State<Arc<NodeState>>,
    Path((id, field)): Path<(String, String)>,
    body: Result<Json<DesiredBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let id = parse_site_device(&s, &id)?;
    let Some(spec) = schemas::device::field_spec(&field) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_field",
            format!("{field:?} is not a desired-config field"),
        )
        .details(json!({"known": schemas::device::standard_fields().iter().map(|f| f.name.clone()).collect::<Vec<_>>()})));
    };
    let Json(body) = body?;
    spec.check(&body.value).map_err(|reason| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", reason)
            .details(json!({"field": field, "min": spec.min, "max": spec.max, "kind": spec.kind}))
    })?;
    let doc = DocId::device_doc(&s.cfg.node.tenant, &s.cfg.node.site, &id);
    s.store
        .change(&doc, s.clock.now(), |d| {
            docs::device::set_desired(d, &field, &body.value)
        })
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()))?;
    tracing::info!(device = %id, field = %field, value = ?body.value, by = ?body.by, "desired config set by operator");
    let after = s
        .store
        .read(&doc, |d| {
            docs::device::desired(d).map(|m| m.get(&field).cloned())
        })
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()))?;
    let field_now = match after {
        Some(Ok(f)) => f,
        _ => None,
    };
    Ok(Json(
        json!({"device": id, "field": field, "desired": field_now}),
    ))
}

async fn loops(State(s): State<Arc<NodeState>>) -> Json<Value> {
    let states: BTreeMap<String, _> = s
        .loop_states()
        .into_iter()
        .map(|(n, st, j)| (n, (st, j)))
        .collect();
    let events = s.loop_events();
    let out: Vec<Value> = s
        .loop_info()
        .iter()
        .map(|info| {
            let (st, j) = states
                .get(&info.name)
                .cloned()
                .map_or((None, None), |(a, b)| (Some(a), b));
            let recent: Vec<_> = events
                .iter()
                .filter(|e| e.loop_name == info.name)
                .rev()
                .take(20)
                .collect();
            json!({
                "name": info.name,
                "device": info.device,
                "kind": info.kind,
                "sensor": info.sensor,
                "output": info.output,
                "period_ms": info.period_ms,
                "state": st,
                "jitter": j.map(|j| json!({"ticks": j.count, "p50_us": j.p50_us, "p99_us": j.p99_us, "max_us": j.max_us})),
                "recent_events": recent,
            })
        })
        .collect();
    Json(Value::Array(out))
}

/// Documents of `kind` of this site from the last three days.
fn recent_docs(s: &NodeState, kind: DocKind) -> Vec<DocId> {
    let today = s.clock.now().day().days_since_epoch();
    let mut v: Vec<DocId> = s
        .store
        .list()
        .into_iter()
        .filter(|id| {
            id.kind() == kind
                && id.tenant() == Some(&s.cfg.node.tenant)
                && id.site() == Some(&s.cfg.node.site)
                && id.day().is_some_and(|d| d.days_since_epoch() + 2 >= today)
        })
        .collect();
    v.sort();
    v
}

async fn alarms(State(s): State<Arc<NodeState>>) -> ApiResult<Json<Value>> {
    let mut all: BTreeMap<String, schemas::alarm::Alarm> = BTreeMap::new();
    for id in recent_docs(&s, DocKind::Alarms) {
        if let Ok(Some(Ok(list))) = s.store.read(&id, docs::alarms::alarms) {
            for a in list {
                all.insert(a.id.clone(), a);
            }
        }
    }
    // Alarms only the engine holds (raised with the clock unset).
    for a in s.engine_alarms() {
        all.entry(a.id.clone()).or_insert(a);
    }
    let mut v: Vec<_> = all.into_values().collect();
    v.sort_by_key(|a| std::cmp::Reverse(a.raised_at));
    let active = v.iter().filter(|a| a.is_active()).count();
    Ok(Json(json!({"active": active, "alarms": v})))
}

/// Body of `POST /api/alarms/{id}/ack`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    by: String,
}

async fn ack(
    State(s): State<Arc<NodeState>>,
    Path(id): Path<String>,
    body: Result<Json<AckBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    let by = body.by.trim();
    if by.is_empty() || by.len() > 128 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "by: must name who acknowledges (1..=128 characters)",
        ));
    }
    match s.ack_alarm(&id, by) {
        Ok(Some(a)) => Ok(Json(json!(a))),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_alarm",
            format!("no alarm {id:?} on this edge"),
        )),
        Err(crate::node::AckFailure::Already { by, at }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_acknowledged",
            format!("alarm {id:?} was already acknowledged by {by}"),
        )
        .details(json!({"by": by, "at": at}))),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store",
            e.to_string(),
        )),
    }
}

async fn commands(State(s): State<Arc<NodeState>>) -> Json<Value> {
    let mut out = Vec::new();
    for id in recent_docs(&s, DocKind::Commands) {
        let r = s.store.read(&id, |d| {
            (
                docs::commands::requests(d).map(|(r, _)| r),
                docs::commands::results(d),
            )
        });
        if let Ok(Some((Ok(reqs), Ok(results)))) = r {
            for c in reqs {
                let res = results.get(&c.id).cloned();
                out.push(json!({"doc": id.to_string(), "command": c, "result": res}));
            }
        }
    }
    Json(Value::Array(out))
}

/// The heads of every document this edge holds (sorted hex change hashes),
/// so a test harness can compare replicas while the fleet runs.
async fn sync_heads(State(s): State<Arc<NodeState>>) -> Json<Value> {
    let docs: Vec<Value> = s
        .store
        .heads_hex()
        .into_iter()
        .map(|(id, heads)| json!({ "doc": id.to_string(), "heads": heads }))
        .collect();
    Json(json!({ "count": docs.len(), "documents": docs }))
}

async fn sync(State(s): State<Arc<NodeState>>) -> Json<Value> {
    let peers: Vec<Value> = s
        .sync_status()
        .into_iter()
        .map(|(k, st)| {
            let role = s.directory.lookup_role(&k);
            json!({
                "peer": k.to_string(),
                "role": role,
                "connected": st.connected,
                "last_sync_age_ms": st.last_sync.map(|t| t.elapsed().as_millis() as u64),
                "docs_behind": st.docs_behind,
                "bytes_queued": st.bytes_queued,
                "connects": st.connects,
                "last_error": st.last_error,
                "stats": st.stats,
            })
        })
        .collect();
    Json(json!({
        "edge": s.key.to_string(),
        "directory": s.directory.source(),
        "documents": s.store.stats().documents,
        "peers": peers,
    }))
}

async fn local_rollups(State(s): State<Arc<NodeState>>) -> Json<Value> {
    Json(json!(s.local_rollups.snapshot()))
}

async fn metrics(State(s): State<Arc<NodeState>>) -> impl IntoResponse {
    let c = &s.counters;
    let mut p = PromText::new();
    let ctr = |p: &mut PromText, name: &str, help: &str, v: &std::sync::atomic::AtomicU64| {
        p.single(name, "counter", help, Counters::get(v) as f64);
    };
    ctr(
        &mut p,
        "edge_samples_polled_total",
        "samples decoded from devices",
        &c.samples_polled,
    );
    ctr(
        &mut p,
        "edge_samples_acknowledged_total",
        "samples durable in the raw zone",
        &c.samples_acknowledged,
    );
    ctr(
        &mut p,
        "edge_samples_refused_total",
        "samples the raw zone refused",
        &c.samples_refused,
    );
    ctr(
        &mut p,
        "edge_rollups_written_total",
        "rollups written into telemetry documents",
        &c.rollups_written,
    );
    ctr(
        &mut p,
        "edge_rollups_local_total",
        "rollups kept in the local bucket",
        &c.rollups_local,
    );
    ctr(
        &mut p,
        "edge_summariser_errors_total",
        "failed summariser steps (retried)",
        &c.pipeline_errors,
    );
    ctr(
        &mut p,
        "edge_reported_writes_total",
        "reported-state writes",
        &c.reported_writes,
    );
    ctr(
        &mut p,
        "edge_alarm_transitions_total",
        "alarm raises and clears written",
        &c.alarm_transitions,
    );
    ctr(
        &mut p,
        "edge_commands_handled_total",
        "commands handled",
        &c.commands_handled,
    );
    ctr(
        &mut p,
        "edge_loop_events_total",
        "loop actuations and fail-safe events",
        &c.loop_events,
    );
    ctr(
        &mut p,
        "edge_store_errors_total",
        "failed document writes",
        &c.store_errors,
    );
    p.single(
        "edge_raw_zone_bytes",
        "gauge",
        "bytes in the raw zone",
        s.raw.total_bytes() as f64,
    );
    let loops = s.loop_states();
    p.family("edge_loop_ticks_total", "counter", "control loop ticks");
    for (n, _, j) in &loops {
        p.sample(
            "edge_loop_ticks_total",
            &[("loop", n)],
            j.map_or(0, |j| j.count) as f64,
        );
    }
    p.family(
        "edge_loop_jitter_p99_seconds",
        "gauge",
        "loop period lateness, 99th percentile of recent ticks",
    );
    for (n, _, j) in &loops {
        p.sample(
            "edge_loop_jitter_p99_seconds",
            &[("loop", n)],
            j.map_or(0, |j| j.p99_us) as f64 / 1e6,
        );
    }
    p.family("edge_loop_output", "gauge", "loop output (1 on)");
    for (n, st, _) in &loops {
        p.sample(
            "edge_loop_output",
            &[("loop", n)],
            f64::from(u8::from(st.output)),
        );
    }
    let active = s.engine_alarms().len();
    p.single(
        "edge_alarms_active",
        "gauge",
        "alarms active (raised since start)",
        active as f64,
    );
    let peers = s.sync_status();
    p.family("edge_sync_connected", "gauge", "peer connected (1) or not");
    for (k, st) in &peers {
        p.sample(
            "edge_sync_connected",
            &[("peer", &k.short())],
            f64::from(u8::from(st.connected)),
        );
    }
    p.family(
        "edge_sync_bytes_sent_total",
        "counter",
        "sync bytes sent per peer",
    );
    for (k, st) in &peers {
        p.sample(
            "edge_sync_bytes_sent_total",
            &[("peer", &k.short())],
            st.stats.bytes_sent as f64,
        );
    }
    p.family(
        "edge_sync_bytes_received_total",
        "counter",
        "sync bytes received per peer",
    );
    for (k, st) in &peers {
        p.sample(
            "edge_sync_bytes_received_total",
            &[("peer", &k.short())],
            st.stats.bytes_received as f64,
        );
    }
    p.family(
        "edge_sync_refused_total",
        "counter",
        "changes or messages refused per peer",
    );
    for (k, st) in &peers {
        p.sample(
            "edge_sync_refused_total",
            &[("peer", &k.short())],
            st.stats.refused as f64,
        );
    }
    p.family(
        "edge_sync_docs_behind",
        "gauge",
        "documents not yet in sync per peer",
    );
    for (k, st) in &peers {
        p.sample(
            "edge_sync_docs_behind",
            &[("peer", &k.short())],
            st.docs_behind as f64,
        );
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        p.finish(),
    )
}
