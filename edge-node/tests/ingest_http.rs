//! HTTP ingestion (`POST /api/ingest/{device}`): tokens are per device (401
//! without one, 403 for another device's data), a malformed batch is refused
//! with a JSON error naming the field (and quarantined), an oversized body
//! is refused (413), the rate limit answers 429 with Retry-After, and a
//! replayed batch is counted once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use edge_node::clock::{Clock, ManualClock};
use edge_node::ingest::{self, IngestHandle, SampleSink};
use schemas::config::EdgeConfig;
use schemas::metrics::{Sample, Unit};
use schemas::time::Timestamp;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

const NOW: Timestamp = Timestamp(1_800_000_000_000);
const TOKEN_A: &str = "tok-room-9-5f2b8c1e0d";
const TOKEN_B: &str = "tok-room-10-a91c77e2";

#[derive(Default)]
struct RecordingSink(Mutex<Vec<Sample>>);

impl SampleSink for RecordingSink {
    fn accept(
        &self,
        samples: Vec<Sample>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.0.lock().unwrap().extend(samples);
            Ok(())
        })
    }
}

fn sha(t: &str) -> String {
    hex::encode(Sha256::digest(t.as_bytes()))
}

fn config(dir: &Path) -> EdgeConfig {
    let text = format!(
        r#"
[node]
data_dir = "{}"

[ingest]
max_body_bytes = 2048

[[ingest.profiles]]
name = "room"
timestamp = {{ field = "ts", format = "unix_ms" }}
metrics = [
  {{ name = "temperature", aliases = ["temp_f"], unit = "fahrenheit", min = -40.0, max = 250.0 }},
  {{ name = "door", kind = "boolean" }},
]

[[ingest.devices]]
id = "room-9"
profile = "room"
token_sha256 = "{}"
rate_per_s = 1.0
burst = 20.0

[[ingest.devices]]
id = "room-10"
profile = "room"
token_sha256 = "{}"
"#,
        dir.display(),
        sha(TOKEN_A),
        sha(TOKEN_B)
    );
    EdgeConfig::parse(Path::new("edge.toml"), &text).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    sink: Arc<RecordingSink>,
    clock: Arc<ManualClock>,
    handle: IngestHandle,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let clock = Arc::new(ManualClock::new(NOW));
    let c: Arc<dyn Clock> = clock.clone();
    let handle = ingest::start(&config(dir.path()), sink.clone(), c)
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        sink,
        clock,
        handle,
    }
}

async fn post(
    h: &IngestHandle,
    device: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Option<String>, Value) {
    let mut req = Request::post(format!("/api/ingest/{device}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = ingest::router(h)
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, retry, json)
}

fn batch(items: &[(&str, &str, i64)]) -> String {
    let s: Vec<String> = items
        .iter()
        .map(|(m, v, ts)| format!(r#"{{"metric":"{m}","value":{v},"ts":{ts}}}"#))
        .collect();
    format!(r#"{{"samples":[{}]}}"#, s.join(","))
}

#[tokio::test]
async fn a_device_token_writes_only_its_own_device() {
    let f = fixture().await;
    let body = batch(&[("temperature", "50", NOW.0 - 1000)]);
    // Token of room-10 writing room-9's data.
    let (st, _, json) = post(&f.handle, "room-9", Some(TOKEN_B), &body).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("room-10"),
        "{json}"
    );
    // No token, or an unknown one.
    let (st, _, _) = post(&f.handle, "room-9", None, &body).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = post(&f.handle, "room-9", Some("guess"), &body).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(f.sink.0.lock().unwrap().is_empty());
    // Its own token.
    let (st, _, json) = post(&f.handle, "room-9", Some(TOKEN_A), &body).await;
    assert_eq!(st, StatusCode::OK, "{json}");
    assert_eq!(json["accepted"], 1);
    let s = f.sink.0.lock().unwrap().clone();
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].device.as_str(), s[0].unit), ("room-9", Unit::Celsius));
    assert!((s[0].value - 10.0).abs() < 1e-9);
    f.handle.stop().await;
}

#[tokio::test]
async fn a_malformed_batch_is_refused_naming_the_field() {
    let f = fixture().await;
    let cases = [
        (
            r#"{"samples":[{"metric":"temperature","value":50},{"metric":"temperature","value":"warm"}]}"#,
            "samples[1].value",
        ),
        (
            r#"{"samples":[{"metric":"humidity","value":50}]}"#,
            "samples[0].metric",
        ),
        (
            r#"{"samples":[{"metric":"temperature","value":900}]}"#,
            "samples[0].value",
        ),
        (
            r#"{"samples":[{"metric":"door","value":1}]}"#,
            "samples[0].value",
        ),
        (
            r#"{"samples":[{"metric":"temperature","value":5,"ts":"noon"}]}"#,
            "samples[0].ts",
        ),
        (r#"{"readings":[]}"#, "readings"),
    ];
    for (body, field) in cases {
        let (st, _, json) = post(&f.handle, "room-9", Some(TOKEN_A), body).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {json}");
        assert_eq!(json["field"], field, "{body}: {json}");
        assert!(json["error"].as_str().unwrap().starts_with(field), "{json}");
    }
    let (st, _, json) = post(&f.handle, "room-9", Some(TOKEN_A), "{oops").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        json["error"].as_str().unwrap().contains("not JSON"),
        "{json}"
    );
    // Nothing half-stored, everything quarantined with its reason.
    assert!(f.sink.0.lock().unwrap().is_empty());
    let q = f.handle.quarantine();
    assert_eq!(q.len(), cases.len() + 1);
    assert_eq!(q[0].field.as_deref(), Some("samples[1].value"));
    assert_eq!(q[0].origin, "/api/ingest/room-9");
    f.handle.stop().await;
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let f = fixture().await;
    let items: Vec<(&str, &str, i64)> = (0..100)
        .map(|i| ("temperature", "50", NOW.0 - 100_000 + i))
        .collect();
    let body = batch(&items);
    assert!(body.len() > 2048);
    let (st, _, json) = post(&f.handle, "room-9", Some(TOKEN_A), &body).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert!(json["error"].as_str().unwrap().contains("2048"), "{json}");
    assert!(f.sink.0.lock().unwrap().is_empty());
    f.handle.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_replays_count_once() {
    let f = fixture().await;
    // burst 20, 1 sample/s.
    let items: Vec<(&str, &str, i64)> = (0..15)
        .map(|i| ("temperature", "50", NOW.0 - 100_000 + i))
        .collect();
    let body = batch(&items);
    let (st, _, json) = post(&f.handle, "room-9", Some(TOKEN_A), &body).await;
    assert_eq!((st, json["accepted"].as_u64()), (StatusCode::OK, Some(15)));
    let (st, retry, _) = post(&f.handle, "room-9", Some(TOKEN_A), &body).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry.as_deref(), Some("10"));
    // After the wait, the same batch again is a replay: nothing new stored.
    f.clock.advance(Duration::from_secs(10));
    let (st, _, json) = post(&f.handle, "room-9", Some(TOKEN_A), &body).await;
    assert_eq!(st, StatusCode::OK, "{json}");
    assert_eq!(
        (json["accepted"].as_u64(), json["duplicates"].as_u64()),
        (Some(0), Some(15))
    );
    assert_eq!(f.sink.0.lock().unwrap().len(), 15);
    // Other devices have their own bucket.
    let (st, _, _) = post(&f.handle, "room-10", Some(TOKEN_B), &body).await;
    assert_eq!(st, StatusCode::OK);
    f.handle.stop().await;
}
