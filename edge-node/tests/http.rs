//! The local HTTP API: clear JSON errors for bad input, Prometheus text,
//! health, desired config with concurrent values, alarm acknowledgement.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edge_node::clock::{Clock, SystemClock};
use edge_node::node::{EdgeNode, NodeOptions};
use schemas::alarm::{Alarm, Severity};
use schemas::config::EdgeConfig;
use schemas::device::FieldValue;
use schemas::ids::{DeviceId, DocId};
use serde_json::Value;
use sync_core::docs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request over a fresh connection; returns (status, body).
async fn req(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some((ctype, b)) = body {
        r.push_str(&format!(
            "Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        r.push_str("\r\n");
    }
    s.write_all(r.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// One sync message from `from` to `to` (no authorisation: a test relay).
fn relay(
    from: &sync_core::store::DocStore,
    to: &sync_core::store::DocStore,
    doc: &DocId,
    s_from: &mut automerge::sync::State,
    s_to: &mut automerge::sync::State,
) {
    if let Some(m) = from.generate_sync_message(doc, s_from).unwrap() {
        let hashes: Vec<_> = sync_core::store::message_changes(&m)
            .unwrap()
            .iter()
            .map(|c| c.hash())
            .collect();
        let sigs = from.signatures(&hashes).unwrap();
        to.receive_sync_message(doc, from.key().public(), s_to, m, &sigs, &|_, _| Ok(()))
            .unwrap();
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn start(dir: &Path) -> EdgeNode {
    // A device at a port nothing listens on: the API must work regardless.
    let text = format!(
        r#"
[node]
data_dir = "{}"
[listen]
http = "127.0.0.1:0"
[[devices]]
id = "pump-1"
addr = "127.0.0.1:9"
timeout_ms = 100
registers = [ {{ name = "pressure", function = "holding", address = 0, type = "u16", scale = 0.1, unit = "bar" }} ]
"#,
        dir.display()
    );
    let cfg = EdgeConfig::parse(Path::new("edge.toml"), &text).unwrap();
    let mut o = NodeOptions::new(Arc::new(SystemClock));
    o.sync = false;
    EdgeNode::start(cfg, o).await.unwrap()
}

fn assert_error(status: u16, body: &str, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    let v = json(body);
    assert_eq!(v["code"], want_code, "{body}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(v.get("details").is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let a = node.http_addr().unwrap();
    let ct = "application/json";
    let put = "/api/devices/pump-1/desired/high_limit";

    let (s, b) = req(a, "PUT", put, Some((ct, "{\"value\": 5"))).await;
    assert_error(s, &b, 400, "invalid_json");
    let (s, b) = req(a, "PUT", put, Some((ct, "{\"value\": 5, \"colour\": 1}"))).await;
    assert_error(s, &b, 422, "invalid_body");
    assert!(b.contains("colour"), "{b}");
    let (s, b) = req(a, "PUT", put, Some(("text/plain", "{\"value\": 5}"))).await;
    assert_error(s, &b, 415, "unsupported_media_type");
    let (s, b) = req(
        a,
        "PUT",
        "/api/devices/pump-1/desired/colour",
        Some((ct, "{\"value\": 5}")),
    )
    .await;
    assert_error(s, &b, 404, "unknown_field");
    let (s, b) = req(a, "PUT", put, Some((ct, "{\"value\": 99999}"))).await;
    assert_error(s, &b, 422, "invalid_value");
    assert!(b.contains("above the maximum"), "{b}");
    let (s, b) = req(a, "PUT", put, Some((ct, "{\"value\": \"high\"}"))).await;
    assert_error(s, &b, 422, "invalid_value");
    let (s, b) = req(
        a,
        "PUT",
        "/api/devices/pump-9/desired/high_limit",
        Some((ct, "{\"value\": 5}")),
    )
    .await;
    assert_error(s, &b, 404, "unknown_device");
    let (s, b) = req(a, "GET", "/api/devices/pump-9", None).await;
    assert_error(s, &b, 404, "unknown_device");
    // A device of another edge of the same site (its document is here):
    // its desired config may be edited from this edge.
    let cfg = &node.state().cfg;
    let other = DocId::device_doc(
        &cfg.node.tenant,
        &cfg.node.site,
        &DeviceId::new("pump-9").unwrap(),
    );
    node.state()
        .store
        .change(&other, schemas::time::Timestamp(1_800_000_000_000), |d| {
            sync_core::docs::device::set_desired(d, "setpoint", &FieldValue::Number(3.0))
        })
        .unwrap();
    let (s, b) = req(
        a,
        "PUT",
        "/api/devices/pump-9/desired/high_limit",
        Some((ct, "{\"value\": 5}")),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["desired"]["effective"], 5.0, "{b}");
    let (s, b) = req(a, "GET", "/api/devices/NOT%20AN%20ID", None).await;
    assert_error(s, &b, 400, "invalid_device_id");
    let (s, b) = req(
        a,
        "POST",
        "/api/alarms/nope:pump-1:123/ack",
        Some((ct, "{\"by\": \"ann\"}")),
    )
    .await;
    assert_error(s, &b, 404, "unknown_alarm");
    let (s, b) = req(
        a,
        "POST",
        "/api/alarms/x/ack",
        Some((ct, "{\"by\": \"  \"}")),
    )
    .await;
    assert_error(s, &b, 422, "invalid_body");
    let (s, b) = req(a, "GET", "/api/nothing", None).await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = req(a, "DELETE", "/api/devices", None).await;
    assert_error(s, &b, 405, "method_not_allowed");

    // A good write; nothing above left a trace in the document.
    let (s, b) = req(
        a,
        "PUT",
        put,
        Some((ct, "{\"value\": 8.5, \"by\": \"ann\"}")),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["desired"]["effective"], 8.5);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_ui_conflicts_and_acks() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let a = node.http_addr().unwrap();
    let state = node.state().clone();

    let (s, b) = req(a, "GET", "/healthz", None).await;
    assert_eq!(s, 200);
    assert_eq!(json(&b)["status"], "ok");
    let (s, b) = req(a, "GET", "/", None).await;
    assert_eq!(s, 200);
    assert!(b.contains("<html") && b.contains("/api/devices"));

    // Prometheus text: every non-comment line is `name{labels} value`, and
    // every sample's family is declared with HELP and TYPE.
    let (s, b) = req(a, "GET", "/metrics", None).await;
    assert_eq!(s, 200);
    let mut typed = std::collections::BTreeSet::new();
    for line in b.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            typed.insert(it.next().unwrap().to_string());
            assert!(matches!(it.next(), Some("counter" | "gauge")), "{line}");
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap();
        let name = name_labels.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        assert!(typed.contains(name), "sample before its TYPE: {line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    for want in [
        "edge_samples_polled_total",
        "edge_rollups_written_total",
        "edge_alarms_active",
        "edge_loop_jitter_p99_seconds",
    ] {
        assert!(typed.contains(want), "missing {want}");
    }

    // Concurrent desired values show as a conflict: write one value as this
    // node and merge a concurrent one from another actor.
    let dev = DeviceId::new("pump-1").unwrap();
    let doc = DocId::device_doc(&state.cfg.node.tenant, &state.cfg.node.site, &dev);
    let now = SystemClock.now();
    state
        .store
        .change(&doc, now, |d| {
            docs::device::set_desired(d, "high_limit", &FieldValue::Number(9.0))
        })
        .unwrap();
    let other =
        sync_core::store::DocStore::in_memory(sync_core::identity::NodeKey::from_bytes([5; 32]));
    other
        .change(&doc, now, |d| {
            docs::device::set_desired(d, "high_limit", &FieldValue::Number(6.0))
        })
        .unwrap();
    // Move the other's change over with the sync protocol, both ways.
    let (mut s_other, mut s_edge) = (automerge::sync::State::new(), automerge::sync::State::new());
    for _ in 0..6 {
        relay(&other, &state.store, &doc, &mut s_other, &mut s_edge);
        relay(&state.store, &other, &doc, &mut s_edge, &mut s_other);
    }
    let (s, b) = req(a, "GET", "/api/devices/pump-1", None).await;
    assert_eq!(s, 200, "{b}");
    let v = json(&b);
    assert_eq!(
        v["desired"]["high_limit"]["values"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{b}"
    );
    assert_eq!(
        v["desired"]["high_limit"]["effective"], 6.0,
        "min wins: {b}"
    );
    assert_eq!(v["conflicts"][0], "high_limit");

    // An alarm in today's document can be acknowledged once.
    let alarm_doc = DocId::alarms(&state.cfg.node.tenant, &state.cfg.node.site, now.day());
    let id = format!("high:pump-1:{}", now.as_millis());
    let alarm = Alarm {
        schema_version: Default::default(),
        id: id.clone(),
        rule: "high".into(),
        device: dev.clone(),
        metric: "pressure".into(),
        severity: Severity::Warning,
        raised_at: now,
        value: 12.0,
        message: "pressure 12 above 10".into(),
        cleared_at: None,
        acked_by: None,
        acked_at: None,
    };
    state
        .store
        .change(&alarm_doc, now, |d| docs::alarms::put_alarm(d, &alarm))
        .unwrap();
    let (s, b) = req(a, "GET", "/api/alarms", None).await;
    assert_eq!(s, 200);
    assert_eq!(json(&b)["active"], 1);
    let path = format!("/api/alarms/{id}/ack");
    let (s, b) = req(
        a,
        "POST",
        &path,
        Some(("application/json", "{\"by\": \"ann\"}")),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["acked_by"], "ann");
    let (s, b) = req(
        a,
        "POST",
        &path,
        Some(("application/json", "{\"by\": \"bob\"}")),
    )
    .await;
    assert_error(s, &b, 409, "already_acknowledged");
    let (_, b) = req(a, "GET", "/api/alarms", None).await;
    assert_eq!(json(&b)["alarms"][0]["acked_by"], "ann");

    let (s, b) = req(a, "GET", "/api/sync", None).await;
    assert_eq!(s, 200);
    assert_eq!(json(&b)["peers"].as_array().unwrap().len(), 0);
    let (s, b) = req(a, "GET", "/api/sync/heads", None).await;
    assert_eq!(s, 200, "{b}");
    let heads = json(&b);
    let docs = heads["documents"].as_array().unwrap();
    assert_eq!(heads["count"].as_u64().unwrap() as usize, docs.len());
    assert!(
        docs.iter()
            .any(|d| d["doc"].as_str().unwrap().contains("/dev/")
                && !d["heads"].as_array().unwrap().is_empty()),
        "the edge's device documents with their heads: {b}"
    );
    let (s, _) = req(a, "GET", "/api/loops", None).await;
    assert_eq!(s, 200);
    let (s, _) = req(a, "GET", "/api/commands", None).await;
    assert_eq!(s, 200);
    node.shutdown().await.unwrap();
}
