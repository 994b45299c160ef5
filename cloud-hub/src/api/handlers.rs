//! Route handlers of `/api/v1`, and [`drive_rollouts`], which runs the
//! rollout engine against the store.

use std::convert::Infallible;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use schemas::alarm::Severity;
use schemas::command::{Command, CommandAction, CommandStatus, validate_command_id};
use schemas::device::{FieldValue, field_spec};
use schemas::time::Timestamp;
use schemas::{DeviceId, SiteId, TenantId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::auth::{Caller, Scope};
use super::data::{AuditEntry, CommandRecord, DataError, parse_device_id};
use super::error::{ApiError, ApiJson, Params};
use super::{ApiConfig, ApiState, HubEvent, OPENAPI_JSON};
use crate::analytics::{GroupBy, Level, Stat, TelemetryQuery, fleet_health as compute_health};
use crate::rollout::{
    AlarmSeen, Candidate, CohortSelector, DeviceObservation, Effect, Rollout, RolloutError,
    RolloutSpec,
};

/// Header that may carry the reason of a mutating call.
const REASON_HEADER: &str = "x-fieldsync-reason";
/// Header that carries an idempotency key.
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

impl From<DataError> for ApiError {
    fn from(e: DataError) -> ApiError {
        match e {
            DataError::NotFound { kind, id } => ApiError::not_found(kind, &id),
            DataError::Conflict(m) => ApiError::conflict(m),
            DataError::Store(m) => ApiError::internal(format!("store: {m}")),
        }
    }
}

/// One path segment, with failures in the API's error shape.
pub(crate) struct ApiPath(String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(s)| ApiPath(s))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.body_text()))
    }
}

// ---------- shared helpers ----------

/// One page of a list.
#[derive(Debug, Serialize)]
pub(crate) struct Page<T> {
    items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    next_cursor: Option<String>,
}

struct PageReq {
    limit: usize,
    after: Option<String>,
}

impl PageReq {
    fn take(p: &mut Params, cfg: &ApiConfig) -> Result<PageReq, ApiError> {
        let limit = p.take::<usize>("limit")?.unwrap_or(cfg.default_limit);
        if limit == 0 || limit > cfg.max_limit {
            return Err(ApiError::invalid(
                "limit",
                format!("{limit} is not within 1..={}", cfg.max_limit),
            ));
        }
        let after =
            match p.take::<String>("cursor")? {
                None => None,
                Some(c) => Some(decode_cursor(&c).ok_or_else(|| {
                    ApiError::invalid("cursor", "not a cursor returned by this API")
                })?),
            };
        Ok(PageReq { limit, after })
    }

    /// Items keyed by a unique, stable sort key.
    fn apply<T>(self, mut items: Vec<(String, T)>) -> Page<T> {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rest = items
            .into_iter()
            .filter(|(k, _)| self.after.as_ref().is_none_or(|a| k > a))
            .peekable();
        let mut page = Vec::new();
        let mut last = None;
        while page.len() < self.limit {
            match rest.next() {
                Some((k, v)) => {
                    last = Some(k);
                    page.push(v);
                }
                None => break,
            }
        }
        let next_cursor = if rest.peek().is_some() {
            last.map(|k| encode_cursor(&k))
        } else {
            None
        };
        Page {
            items: page,
            next_cursor,
        }
    }
}

fn encode_cursor(key: &str) -> String {
    hex::encode(format!("c1:{key}"))
}

fn decode_cursor(c: &str) -> Option<String> {
    let bytes = hex::decode(c).ok()?;
    let s = String::from_utf8(bytes).ok()?;
    s.strip_prefix("c1:").map(str::to_string)
}

/// Tenant and site filters, checked against and narrowed to the scope.
fn scoped(caller: &Caller, p: &mut Params) -> Result<(Option<TenantId>, Option<SiteId>), ApiError> {
    let tenant: Option<TenantId> = p.take("tenant")?;
    let site: Option<SiteId> = p.take("site")?;
    narrow(&caller.scope, tenant, site)
}

fn narrow(
    scope: &Scope,
    tenant: Option<TenantId>,
    site: Option<SiteId>,
) -> Result<(Option<TenantId>, Option<SiteId>), ApiError> {
    let tenant = match (scope.tenant(), tenant) {
        (Some(st), Some(t)) if *st != t => return Err(ApiError::forbidden(format!("tenant {t}"))),
        (Some(st), _) => Some(st.clone()),
        (None, t) => t,
    };
    let site = match (scope.site(), site) {
        (Some(ss), Some(s)) if *ss != s => return Err(ApiError::forbidden(format!("site {s}"))),
        (Some(ss), _) => Some(ss.clone()),
        (None, s) => s,
    };
    Ok((tenant, site))
}

fn matches_ts(
    tenant: &Option<TenantId>,
    site: &Option<SiteId>,
    t: &TenantId,
    s: Option<&SiteId>,
) -> bool {
    tenant.as_ref().is_none_or(|x| x == t) && site.as_ref().is_none_or(|x| Some(x) == s)
}

fn parse_enum<T: DeserializeOwned>(field: &str, v: Option<String>) -> Result<Option<T>, ApiError> {
    v.map(|s| {
        serde_json::from_value(serde_json::Value::String(s.clone()))
            .map_err(|e| ApiError::invalid(field, format!("{s:?}: {e}")))
    })
    .transpose()
}

fn time_range(p: &mut Params) -> Result<(Option<Timestamp>, Option<Timestamp>), ApiError> {
    let from = p.take::<i64>("from")?.map(Timestamp);
    let to = p.take::<i64>("to")?.map(Timestamp);
    if let (Some(f), Some(t)) = (from, to)
        && t <= f
    {
        return Err(ApiError::invalid(
            "to",
            format!("{} is not after from ({})", t.0, f.0),
        ));
    }
    Ok((from, to))
}

/// The reason of a mutating call: the body's `reason`, else the
/// `X-Fieldsync-Reason` header.
fn reason(headers: &HeaderMap, body: Option<String>) -> Result<String, ApiError> {
    let r = body.filter(|r| !r.trim().is_empty()).or_else(|| {
        headers
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .filter(|r| !r.trim().is_empty())
    });
    match r {
        None => Err(ApiError::invalid(
            "reason",
            "is required (body field `reason` or header X-Fieldsync-Reason)",
        )),
        Some(r) if r.len() > 1000 => Err(ApiError::invalid("reason", "is longer than 1000 bytes")),
        Some(r) => Ok(r),
    }
}

#[allow(clippy::too_many_arguments)]
fn audit(
    st: &ApiState,
    actor: String,
    action: &str,
    target: String,
    tenant: Option<TenantId>,
    site: Option<SiteId>,
    reason: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    st.data.append_audit(AuditEntry {
        at: st.clock.now(),
        actor,
        action: action.to_string(),
        target,
        tenant,
        site,
        reason: reason.to_string(),
        details,
    })?;
    Ok(())
}

fn publish<T: Serialize>(
    st: &ApiState,
    kind: &str,
    tenant: Option<TenantId>,
    site: Option<SiteId>,
    data: &T,
) {
    st.publish(HubEvent {
        kind: kind.to_string(),
        tenant,
        site,
        at: st.clock.now(),
        data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
    });
}

// ---------- routes ----------

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// Every document's heads; admin only (ids span every tenant).
pub(crate) async fn sync_heads(
    State(st): State<ApiState>,
    caller: Caller,
    p: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    p.finish()?;
    if !matches!(caller.scope, Scope::Admin) {
        return Err(ApiError::forbidden("document heads (admin only)"));
    }
    let docs = st.data.doc_heads();
    Ok(Json(
        serde_json::json!({ "count": docs.len(), "documents": docs }),
    ))
}

pub(crate) async fn list_sites(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<super::data::SiteRecord>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let items = st
        .data
        .sites()
        .into_iter()
        .filter(|s| caller.scope.can_read(&s.tenant, Some(&s.site)))
        .filter(|s| matches_ts(&tenant, &site, &s.tenant, Some(&s.site)))
        .map(|s| (s.id.clone(), s))
        .collect();
    Ok(Json(page.apply(items)))
}

pub(crate) async fn list_edges(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<crate::analytics::EdgeHealth>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let online: Option<bool> = p.take("online")?;
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let edges: Vec<_> = st
        .data
        .edges()
        .into_iter()
        .filter(|e| caller.scope.can_read(&e.tenant, Some(&e.site)))
        .filter(|e| matches_ts(&tenant, &site, &e.tenant, Some(&e.site)))
        .collect();
    let health = compute_health(&edges, st.clock.now(), st.config.offline_after_ms);
    let items = health
        .edges
        .into_iter()
        .filter(|e| online.is_none_or(|o| o == e.online))
        .map(|e| {
            (
                format!(
                    "{}:{}:{}",
                    e.status.tenant, e.status.site, e.status.endpoint
                ),
                e,
            )
        })
        .collect();
    Ok(Json(page.apply(items)))
}

pub(crate) async fn fleet_health(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<crate::analytics::FleetHealth>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    p.finish()?;
    let edges: Vec<_> = st
        .data
        .edges()
        .into_iter()
        .filter(|e| caller.scope.can_read(&e.tenant, Some(&e.site)))
        .filter(|e| matches_ts(&tenant, &site, &e.tenant, Some(&e.site)))
        .collect();
    Ok(Json(compute_health(
        &edges,
        st.clock.now(),
        st.config.offline_after_ms,
    )))
}

pub(crate) async fn list_devices(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<super::data::DeviceRecord>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let device_type: Option<String> = p.take("device_type")?;
    let tag: Option<String> = p.take("tag")?;
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let items = st
        .data
        .devices()
        .into_iter()
        .filter(|d| caller.scope.can_read(&d.key.tenant, Some(&d.key.site)))
        .filter(|d| matches_ts(&tenant, &site, &d.key.tenant, Some(&d.key.site)))
        .filter(|d| device_type.as_ref().is_none_or(|t| *t == d.device_type))
        .filter(|d| tag.as_ref().is_none_or(|t| d.tags.contains(t)))
        .map(|d| (d.id.clone(), d))
        .collect();
    Ok(Json(page.apply(items)))
}

pub(crate) async fn get_device(
    State(st): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<Json<super::data::DeviceRecord>, ApiError> {
    let key = parse_device_id(&id).ok_or_else(|| ApiError::not_found("device", &id))?;
    if !caller.scope.can_read(&key.tenant, Some(&key.site)) {
        return Err(ApiError::forbidden(format!("device {id}")));
    }
    st.data
        .device(&key)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("device", &id))
}

pub(crate) async fn telemetry(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<crate::analytics::Series>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let device: Option<DeviceId> = p.take("device")?;
    let metric: Option<String> = p.take("metric")?;
    let (from, to) = time_range(&mut p)?;
    let level: Level = p.take("level")?.unwrap_or_default();
    let group_by: GroupBy = p.take("group_by")?.unwrap_or_default();
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let q = TelemetryQuery {
        tenant,
        site,
        device,
        metric,
        from,
        to,
        level,
        group_by,
    };
    let opt = |o: Option<String>| o.unwrap_or_default();
    let items = st
        .data
        .telemetry(&q)
        .into_iter()
        .map(|s| {
            let g = &s.group;
            let key = format!(
                "{}|{}|{}|{}|{}",
                opt(g.tenant.as_ref().map(|x| x.to_string())),
                opt(g.site.as_ref().map(|x| x.to_string())),
                opt(g.device.as_ref().map(|x| x.to_string())),
                opt(g.device_type.clone()),
                s.metric
            );
            (key, s)
        })
        .collect();
    Ok(Json(page.apply(items)))
}

#[derive(Serialize)]
pub(crate) struct TopAnswer {
    metric: String,
    stat: Stat,
    items: Vec<crate::analytics::DeviceStat>,
}

pub(crate) async fn telemetry_top(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<TopAnswer>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let metric: String = p.require("metric")?;
    let stat: Stat = p.take("stat")?.unwrap_or(Stat::Mean);
    let n: usize = p.take("n")?.unwrap_or(10);
    if n == 0 || n > 1000 {
        return Err(ApiError::invalid(
            "n",
            format!("{n} is not within 1..=1000"),
        ));
    }
    let (from, to) = time_range(&mut p)?;
    p.finish()?;
    let q = TelemetryQuery {
        tenant,
        site,
        from,
        to,
        ..TelemetryQuery::default()
    };
    let items = st.data.top_devices(&q, &metric, stat, n);
    Ok(Json(TopAnswer {
        metric,
        stat,
        items,
    }))
}

pub(crate) async fn list_alarms(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<super::data::FleetAlarm>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let device: Option<DeviceId> = p.take("device")?;
    let active: Option<bool> = p.take("active")?;
    let acked: Option<bool> = p.take("acked")?;
    let severity: Option<Severity> = parse_enum("severity", p.take("severity")?)?;
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let items = st
        .data
        .alarms()
        .into_iter()
        .filter(|a| caller.scope.can_read(&a.tenant, Some(&a.site)))
        .filter(|a| matches_ts(&tenant, &site, &a.tenant, Some(&a.site)))
        .filter(|a| device.as_ref().is_none_or(|d| *d == a.alarm.device))
        .filter(|a| active.is_none_or(|x| x == a.alarm.is_active()))
        .filter(|a| acked.is_none_or(|x| x == a.alarm.acked_by.is_some()))
        .filter(|a| severity.is_none_or(|s| s == a.alarm.severity))
        .map(|a| (a.id.clone(), a))
        .collect();
    Ok(Json(page.apply(items)))
}

/// Body of calls whose only input is why.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

pub(crate) async fn ack_alarm(
    State(st): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<super::data::FleetAlarm>, ApiError> {
    let alarm = st
        .data
        .alarms()
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| ApiError::not_found("alarm", &id))?;
    if !caller.scope.can_operate(&alarm.tenant, &alarm.site) {
        return Err(ApiError::forbidden(format!("acknowledging alarm {id}")));
    }
    let why = reason(&headers, body.reason)?;
    let acked = st
        .data
        .ack_alarm(&id, &caller.principal(), st.clock.now())?;
    audit(
        &st,
        caller.principal(),
        "alarm.ack",
        format!("alarm:{id}"),
        Some(acked.tenant.clone()),
        Some(acked.site.clone()),
        &why,
        serde_json::json!({ "acked_by": acked.alarm.acked_by }),
    )?;
    publish(
        &st,
        "alarm",
        Some(acked.tenant.clone()),
        Some(acked.site.clone()),
        &acked,
    );
    Ok(Json(acked))
}

/// Body of `POST /api/v1/commands`.
#[derive(Debug, Deserialize)]
pub(crate) struct CreateCommand {
    tenant: TenantId,
    site: SiteId,
    target: DeviceId,
    #[serde(flatten)]
    action: CommandAction,
    #[serde(default)]
    ttl_ms: Option<i64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

pub(crate) async fn create_command(
    State(st): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateCommand>,
) -> Result<Response, ApiError> {
    if !caller.scope.can_operate(&body.tenant, &body.site) {
        return Err(ApiError::forbidden(format!(
            "commands to site {}/{}",
            body.tenant, body.site
        )));
    }
    let why = reason(&headers, body.reason.clone())?;
    let header_key = match headers.get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid("idempotency_key", "header is not ascii"))?
                .to_string(),
        ),
    };
    let key = match (header_key, body.idempotency_key.clone()) {
        (Some(h), Some(b)) if h != b => {
            return Err(ApiError::invalid(
                "idempotency_key",
                "body and Idempotency-Key header differ",
            ));
        }
        (h, b) => h.or(b),
    };
    if let Some(k) = &key {
        validate_command_id(k).map_err(|e| ApiError::invalid("idempotency_key", e))?;
    }
    let dkey = crate::analytics::DeviceKey {
        tenant: body.tenant.clone(),
        site: body.site.clone(),
        device: body.target.clone(),
    };
    if st.data.device(&dkey).is_none() {
        return Err(ApiError::invalid(
            "target",
            format!(
                "no device {} at site {}/{}",
                body.target, body.tenant, body.site
            ),
        ));
    }
    if let CommandAction::SetDesired { field, value } = &body.action {
        let spec = field_spec(field).ok_or_else(|| {
            ApiError::invalid("field", format!("unknown desired field {field:?}"))
        })?;
        spec.check(value)
            .map_err(|e| ApiError::invalid("value", e))?;
    }
    let ttl = body.ttl_ms.unwrap_or(st.config.command_ttl_ms);
    if !(1..=7 * 86_400_000).contains(&ttl) {
        return Err(ApiError::invalid(
            "ttl_ms",
            format!("{ttl} is not within 1..=604800000"),
        ));
    }
    let principal = caller.principal();
    let id = match &key {
        Some(k) => {
            let h = blake3::hash(format!("{principal}\0{k}").as_bytes());
            format!("cmd-{}", &h.to_hex()[..24])
        }
        None => {
            let mut raw = [0u8; 12];
            getrandom::fill(&mut raw)
                .map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
            format!("cmd-{}", hex::encode(raw))
        }
    };
    let now = st.clock.now();
    let command = Command {
        schema_version: Default::default(),
        id,
        target: body.target.clone(),
        action: body.action.clone(),
        issued_by: principal.clone(),
        issued_at: now,
        expires_at: now.saturating_add_ms(ttl),
    };
    command
        .validate()
        .map_err(|e| ApiError::invalid("body", e))?;
    let rec = CommandRecord {
        tenant: body.tenant.clone(),
        site: body.site.clone(),
        command,
        status: CommandStatus::Pending,
        result: None,
        idempotency_key: key,
        reason: why.clone(),
    };
    let (stored, created) = st.data.insert_command(rec)?;
    if !created {
        let same = stored.tenant == body.tenant
            && stored.site == body.site
            && stored.command.target == body.target
            && stored.command.action == body.action;
        if !same {
            return Err(
                ApiError::conflict("idempotency key already used for a different command")
                    .with_details(serde_json::json!({ "command_id": stored.command.id })),
            );
        }
        return Ok((StatusCode::OK, Json(stored)).into_response());
    }
    audit(
        &st,
        principal,
        "command.create",
        format!("command:{}", stored.command.id),
        Some(stored.tenant.clone()),
        Some(stored.site.clone()),
        &why,
        serde_json::to_value(&stored.command).unwrap_or_default(),
    )?;
    publish(
        &st,
        "command",
        Some(stored.tenant.clone()),
        Some(stored.site.clone()),
        &stored,
    );
    Ok((StatusCode::CREATED, Json(stored)).into_response())
}

pub(crate) async fn list_commands(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<CommandRecord>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let device: Option<DeviceId> = p.take("device")?;
    let status: Option<CommandStatus> = parse_enum("status", p.take("status")?)?;
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let items = st
        .data
        .commands()
        .into_iter()
        .filter(|c| caller.scope.can_read(&c.tenant, Some(&c.site)))
        .filter(|c| matches_ts(&tenant, &site, &c.tenant, Some(&c.site)))
        .filter(|c| device.as_ref().is_none_or(|d| *d == c.command.target))
        .filter(|c| status.is_none_or(|s| s == c.status))
        .map(|c| (c.command.id.clone(), c))
        .collect();
    Ok(Json(page.apply(items)))
}

pub(crate) async fn get_command(
    State(st): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<Json<CommandRecord>, ApiError> {
    let c = st
        .data
        .commands()
        .into_iter()
        .find(|c| c.command.id == id)
        .ok_or_else(|| ApiError::not_found("command", &id))?;
    if !caller.scope.can_read(&c.tenant, Some(&c.site)) {
        return Err(ApiError::forbidden(format!("command {id}")));
    }
    Ok(Json(c))
}

fn rollout_visible(scope: &Scope, sel: &CohortSelector) -> bool {
    match scope {
        Scope::Admin => true,
        Scope::Analyst { tenant } => sel.tenant.as_ref() == Some(tenant),
        Scope::Operator { tenant, site } => {
            sel.tenant.as_ref() == Some(tenant) && sel.site.as_ref() == Some(site)
        }
    }
}

fn rollout_manageable(scope: &Scope, sel: &CohortSelector) -> bool {
    match scope {
        Scope::Admin => true,
        Scope::Analyst { .. } => false,
        Scope::Operator { .. } => rollout_visible(scope, sel),
    }
}

pub(crate) async fn list_rollouts(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<Rollout>>, ApiError> {
    let state: Option<String> = p.take("state")?;
    if let Some(s) = &state
        && !["canary", "paused", "completed", "rolled_back", "aborted"].contains(&s.as_str())
    {
        return Err(ApiError::invalid(
            "state",
            format!("{s:?} is not one of canary, paused, completed, rolled_back, aborted"),
        ));
    }
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let items = st
        .data
        .rollouts()
        .into_iter()
        .filter(|r| rollout_visible(&caller.scope, &r.spec.selector))
        .filter(|r| state.as_ref().is_none_or(|s| s == r.state.name()))
        .map(|r| (r.spec.id.clone(), r))
        .collect();
    Ok(Json(page.apply(items)))
}

pub(crate) async fn get_rollout(
    State(st): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<Json<Rollout>, ApiError> {
    let r = find_rollout(&st, &id)?;
    if !rollout_visible(&caller.scope, &r.spec.selector) {
        return Err(ApiError::forbidden(format!("rollout {id}")));
    }
    Ok(Json(r))
}

fn find_rollout(st: &ApiState, id: &str) -> Result<Rollout, ApiError> {
    st.data
        .rollouts()
        .into_iter()
        .find(|r| r.spec.id == id)
        .ok_or_else(|| ApiError::not_found("rollout", id))
}

/// Body of `POST /api/v1/rollouts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRollout {
    #[serde(default)]
    selector: CohortSelector,
    changes: std::collections::BTreeMap<String, FieldValue>,
    #[serde(default = "default_canary")]
    canary_percent: u8,
    gate_ms: i64,
    #[serde(default)]
    reason: Option<String>,
}

fn default_canary() -> u8 {
    10
}

fn rollout_error(e: RolloutError) -> ApiError {
    let field = match &e {
        RolloutError::EmptyCohort => "selector".to_string(),
        RolloutError::NoChanges => "changes".to_string(),
        RolloutError::UnknownField(f) => format!("changes.{f}"),
        RolloutError::InvalidValue { field, .. } => format!("changes.{field}"),
        RolloutError::CanaryPercent(_) => "canary_percent".to_string(),
        RolloutError::GateMs(_) => "gate_ms".to_string(),
        RolloutError::Id(_) => "id".to_string(),
        RolloutError::InvalidTransition { .. } => return ApiError::conflict(e.to_string()),
    };
    ApiError::invalid(&field, e)
}

/// Carry out a rollout's effects: desired writes and audit records. Wakes
/// need no action: [`Rollout::next_wake`] is part of the stored state.
fn apply_effects(st: &ApiState, r: &Rollout, fx: Vec<Effect>) -> Result<(), ApiError> {
    for e in fx {
        match e {
            Effect::SetDesired {
                device,
                field,
                value,
            } => st.data.set_desired(&device, &field, Some(value))?,
            Effect::ClearDesired { device, field } => st.data.set_desired(&device, &field, None)?,
            Effect::Audit(a) => audit(
                st,
                a.actor,
                &a.action,
                format!("rollout:{}", a.rollout),
                r.spec.selector.tenant.clone(),
                r.spec.selector.site.clone(),
                &a.reason,
                a.details,
            )?,
            Effect::Wake { .. } => {}
        }
    }
    st.data.put_rollout(r)?;
    publish(
        st,
        "rollout",
        r.spec.selector.tenant.clone(),
        r.spec.selector.site.clone(),
        r,
    );
    Ok(())
}

pub(crate) async fn create_rollout(
    State(st): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateRollout>,
) -> Result<Response, ApiError> {
    if !rollout_manageable(&caller.scope, &body.selector) {
        return Err(ApiError::forbidden(
            "this rollout (operators must select their own tenant and site; analysts cannot roll out)",
        ));
    }
    let why = reason(&headers, body.reason)?;
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    let spec = RolloutSpec {
        id: format!("ro-{}", hex::encode(raw)),
        selector: body.selector,
        changes: body.changes,
        canary_percent: body.canary_percent,
        gate_ms: body.gate_ms,
        created_by: caller.principal(),
        reason: why,
    };
    let candidates: Vec<Candidate> = st
        .data
        .devices()
        .into_iter()
        .filter(|d| caller.scope.can_operate(&d.key.tenant, &d.key.site))
        .map(|d| Candidate {
            key: d.key,
            device_type: d.device_type,
            tags: d.tags,
            desired: d.desired.fields,
        })
        .collect();
    let _guard = st.rollout_lock.lock().await;
    let (r, fx) = Rollout::start(spec, &candidates, st.clock.now()).map_err(rollout_error)?;
    if let Some(other) = st.data.rollouts().iter().find(|o| r.conflicts_with(o)) {
        return Err(ApiError::conflict(format!(
            "rollout {} is still active on some of these devices and fields; finish or abort it first",
            other.spec.id
        ))
        .with_details(serde_json::json!({ "rollout": other.spec.id })));
    }
    apply_effects(&st, &r, fx)?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

async fn transition(
    st: ApiState,
    caller: Caller,
    id: String,
    headers: HeaderMap,
    body: ReasonBody,
    action: &'static str,
) -> Result<Json<Rollout>, ApiError> {
    let _guard = st.rollout_lock.lock().await;
    let mut r = find_rollout(&st, &id)?;
    if !rollout_manageable(&caller.scope, &r.spec.selector) {
        return Err(ApiError::forbidden(format!("rollout {id}")));
    }
    let why = reason(&headers, body.reason)?;
    let now = st.clock.now();
    let who = caller.principal();
    let fx = match action {
        "pause" => r.pause(now, &who, &why),
        "resume" => r.resume(now, &who, &why),
        _ => r.abort(now, &who, &why),
    }
    .map_err(rollout_error)?;
    apply_effects(&st, &r, fx)?;
    Ok(Json(r))
}

pub(crate) async fn pause_rollout(
    State(st): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Rollout>, ApiError> {
    transition(st, caller, id, headers, body, "pause").await
}

pub(crate) async fn resume_rollout(
    State(st): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Rollout>, ApiError> {
    transition(st, caller, id, headers, body, "resume").await
}

pub(crate) async fn abort_rollout(
    State(st): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Rollout>, ApiError> {
    transition(st, caller, id, headers, body, "abort").await
}

/// Run every active rollout's gate against what the store shows now:
/// observations of the cohort devices go in, effects are carried out.
/// Returns how many rollouts changed state. The hub calls this on a timer
/// (and at each rollout's [`Rollout::next_wake`]).
pub async fn drive_rollouts(st: &ApiState) -> Result<usize, ApiError> {
    let _guard = st.rollout_lock.lock().await;
    let now = st.clock.now();
    let alarms = st.data.alarms();
    let mut changed = 0;
    for mut r in st.data.rollouts() {
        if r.state.is_final() {
            continue;
        }
        let obs: Vec<DeviceObservation> = r
            .members
            .iter()
            .filter_map(|m| {
                let d = st.data.device(&m.device)?;
                Some(DeviceObservation {
                    device: m.device.clone(),
                    last_report: d.reported_at,
                    health: d.reported.health.status,
                    loops_in_fail_safe: d
                        .reported
                        .loops
                        .iter()
                        .filter(|(_, l)| l.fail_safe)
                        .map(|(n, _)| n.clone())
                        .collect(),
                    alarms: alarms
                        .iter()
                        .filter(|a| {
                            a.tenant == m.device.tenant
                                && a.site == m.device.site
                                && a.alarm.device == m.device.device
                        })
                        .map(|a| AlarmSeen {
                            id: a.id.clone(),
                            raised_at: a.alarm.raised_at,
                            severity: a.alarm.severity,
                        })
                        .collect(),
                })
            })
            .collect();
        let before = r.state.name();
        let fx = r.handle_tick(now, &obs);
        if !fx.is_empty() {
            apply_effects(st, &r, fx)?;
        }
        if r.state.name() != before {
            changed += 1;
        }
    }
    Ok(changed)
}

pub(crate) async fn list_audit(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Json<Page<super::data::AuditRecord>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let actor: Option<String> = p.take("actor")?;
    let action: Option<String> = p.take("action")?;
    let (from, to) = time_range(&mut p)?;
    let page = PageReq::take(&mut p, &st.config)?;
    p.finish()?;
    let visible = |e: &AuditEntry| match (&caller.scope, &e.tenant) {
        (Scope::Admin, _) => true,
        (_, None) => false,
        (s, Some(t)) => s.can_read(t, e.site.as_ref()),
    };
    let items = st
        .data
        .audit()
        .into_iter()
        .filter(|r| visible(&r.entry))
        .filter(|r| {
            tenant
                .as_ref()
                .is_none_or(|t| r.entry.tenant.as_ref() == Some(t))
        })
        .filter(|r| {
            site.as_ref()
                .is_none_or(|s| r.entry.site.as_ref() == Some(s))
        })
        .filter(|r| actor.as_ref().is_none_or(|a| *a == r.entry.actor))
        .filter(|r| action.as_ref().is_none_or(|a| *a == r.entry.action))
        .filter(|r| from.is_none_or(|f| r.entry.at >= f) && to.is_none_or(|t| r.entry.at < t))
        .map(|r| (format!("{:020}", r.seq), r))
        .collect();
    Ok(Json(page.apply(items)))
}

pub(crate) async fn events(
    State(st): State<ApiState>,
    caller: Caller,
    mut p: Params,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (tenant, site) = scoped(&caller, &mut p)?;
    let kind: Option<String> = p.take("kind")?;
    // Already used by the `Caller` extractor when no header was sent.
    let _access_token: Option<String> = p.take("access_token")?;
    p.finish()?;
    let scope = caller.scope.clone();
    let stream = BroadcastStream::new(st.events.subscribe()).filter_map(move |item| {
        let out = match item {
            Ok(ev) => {
                let readable = match (&scope, &ev.tenant) {
                    (Scope::Admin, _) => true,
                    (_, None) => false,
                    (s, Some(t)) => s.can_read(t, ev.site.as_ref()),
                };
                let wanted = kind.as_ref().is_none_or(|k| *k == ev.kind)
                    && tenant
                        .as_ref()
                        .is_none_or(|t| ev.tenant.as_ref() == Some(t))
                    && site.as_ref().is_none_or(|s| ev.site.as_ref() == Some(s));
                if readable && wanted {
                    Event::default().event(ev.kind.clone()).json_data(&ev).ok()
                } else {
                    None
                }
            }
            // Tell the client it missed events so it can re-read the lists.
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Some(Event::default().event("lagged").data(n.to_string()))
            }
        };
        std::future::ready(out.map(Ok))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new()))
}

/// Call [`drive_rollouts`] every `period` until `shutdown` becomes true or
/// its sender is dropped. A failed step is logged and retried next period.
pub async fn run_rollout_driver(
    st: ApiState,
    period: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = drive_rollouts(&st).await {
                    tracing::warn!(code = e.code, message = %e.message, "rollout driver step failed");
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
}
