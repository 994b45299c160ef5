//! HTTP ingest: `POST /api/ingest/{device}` with a per-device bearer token,
//! and `GET /api/quarantine`. Every refusal is a JSON body
//! `{"error": "...", "field": "..."}` with the status saying which kind.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use schemas::ids::DeviceId;
use schemas::ingest::IngestSource;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::Shared;
use super::perimeter::{Reject, map_batch};

pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/api/ingest/{device}", post(ingest))
        .route("/api/quarantine", get(quarantine))
        .with_state(shared)
}

fn err(status: StatusCode, field: Option<&str>, msg: impl Into<String>) -> Response {
    let mut body = json!({ "error": msg.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, Json(body)).into_response()
}

fn token_hash(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return None;
    }
    Some(hex::encode(Sha256::digest(token.trim().as_bytes())))
}

async fn ingest(
    State(shared): State<Arc<Shared>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Who is calling: a known token, for this device.
    let Some(hash) = token_hash(&headers) else {
        let mut r = err(
            StatusCode::UNAUTHORIZED,
            None,
            "missing or malformed Authorization: Bearer <device token>",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    let Some(owner) = shared.perimeter.tokens.get(&hash) else {
        let mut r = err(StatusCode::UNAUTHORIZED, None, "unknown device token");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return r;
    };
    if owner.as_str() != device {
        return err(
            StatusCode::FORBIDDEN,
            None,
            format!(
                "this token belongs to device {:?} and may not write data of {device:?}",
                owner.as_str()
            ),
        );
    }
    let device: DeviceId = owner.clone();
    let Some(rules) = shared.perimeter.devices.get(&device) else {
        return err(
            StatusCode::FORBIDDEN,
            None,
            "device is not an ingest device",
        );
    };
    // Size: refuse by Content-Length before reading, and while reading.
    let limit = usize::try_from(shared.cfg.max_body_bytes).unwrap_or(usize::MAX);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_big = || {
        err(
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            format!("body is over max_body_bytes {limit}"),
        )
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return too_big();
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return too_big(),
    };
    let origin = format!("/api/ingest/{}", device.as_str());
    let keyed = match map_batch(
        rules,
        &bytes,
        shared.clock.now(),
        shared.perimeter.max_future_ms,
    ) {
        Ok(k) => k,
        Err(reject) => return refuse(&shared, &origin, &device, &reject, &bytes),
    };
    if keyed.len() as f64 > rules.cfg.burst {
        return err(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("samples"),
            format!(
                "batch of {} samples is larger than the device's burst {}: split it",
                keyed.len(),
                rules.cfg.burst
            ),
        );
    }
    if let Err(wait) = shared.take_rate(&device, keyed.len()) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut r = err(
            StatusCode::TOO_MANY_REQUESTS,
            None,
            format!(
                "rate limit: {} samples/s sustained, burst {}",
                rules.cfg.rate_per_s, rules.cfg.burst
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return r;
    }
    match shared.submit(keyed).await {
        Ok(s) => (StatusCode::OK, Json(s)).into_response(),
        Err(e) => err(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            format!("samples not stored, retry later: {e}"),
        ),
    }
}

/// 422 naming the field, after recording the payload in the quarantine.
fn refuse(
    shared: &Shared,
    origin: &str,
    device: &DeviceId,
    reject: &Reject,
    body: &[u8],
) -> Response {
    if let Err(e) = shared.quarantine(IngestSource::Http, origin, Some(device), reject, body) {
        tracing::error!(error = %e, "quarantine write failed");
    }
    err(
        StatusCode::UNPROCESSABLE_ENTITY,
        reject.field.as_deref(),
        match &reject.field {
            Some(f) => format!("{f}: {}", reject.reason),
            None => reject.reason.clone(),
        },
    )
}

async fn quarantine(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.quarantine_entries()).into_response()
}
