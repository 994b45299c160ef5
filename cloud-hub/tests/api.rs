//! Tests of the `/api/v1` router through `tower::ServiceExt::oneshot`:
//! happy paths, 401/403/404/415/422/429, pagination, OpenAPI/route
//! consistency, idempotent commands, audit, rollouts and server-sent events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use cloud_hub::analytics::{DeviceKey, EdgeStatus};
use cloud_hub::api::data::{DeviceRecord, FleetAlarm, MemoryFleet, SiteRecord};
use cloud_hub::api::{
    self, ApiState, FleetData, ManualClock, OPENAPI_JSON, RateLimit, Scope, drive_rollouts,
};
use http_body_util::BodyExt;
use schemas::alarm::{Alarm, Severity};
use schemas::device::{FieldValue, HealthStatus, ReportedState};
use schemas::metrics::{Rollup, Unit};
use schemas::time::Timestamp;
use schemas::{DeviceId, SiteId, TenantId};
use serde_json::{Value, json};
use tower::ServiceExt;

const T0: i64 = 1_700_000_000_000;

struct Fx {
    app: Router,
    state: ApiState,
    fleet: Arc<MemoryFleet>,
    clock: Arc<ManualClock>,
    admin: String,
    analyst: String,
    operator: String,
}

fn dk(t: &str, s: &str, d: &str) -> DeviceKey {
    DeviceKey::parse(t, s, d).unwrap()
}

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

fn alarm(t: &str, s: &str, d: &str, id: &str, raised: i64) -> FleetAlarm {
    FleetAlarm::new(
        tenant(t),
        site(s),
        Alarm {
            schema_version: Default::default(),
            id: id.into(),
            rule: "high".into(),
            device: DeviceId::new(d).unwrap(),
            metric: "temp".into(),
            severity: Severity::Critical,
            raised_at: Timestamp(raised),
            value: 9.0,
            message: "too warm".into(),
            cleared_at: None,
            acked_by: None,
            acked_at: None,
        },
    )
}

fn fixture(rate: RateLimit) -> Fx {
    let fleet = Arc::new(MemoryFleet::default());
    for (t, s) in [("acme", "s1"), ("acme", "s2"), ("beta", "s1")] {
        fleet.put_site(SiteRecord::new(tenant(t), site(s), &format!("{t} {s}")));
        fleet.put_edge(EdgeStatus {
            endpoint: format!("{t}{s}edge"),
            tenant: tenant(t),
            site: site(s),
            last_seen: Some(Timestamp(if s == "s2" {
                T0 - 3_600_000
            } else {
                T0 - 1_000
            })),
            lag_ms: Some(250),
            docs_behind: 2,
            bytes_queued: 1024,
        });
        for d in ["pump-1", "room-1"] {
            let mut rec = DeviceRecord::new(dk(t, s, d), d.split('-').next().unwrap(), &["zone-a"]);
            rec.desired
                .fields
                .insert("setpoint".into(), FieldValue::Number(4.0));
            fleet.put_device(rec);
            for m in 0..3 {
                let ws = T0 - T0 % 3_600_000 + m * 60_000;
                fleet.put_rollup(
                    &tenant(t),
                    &site(s),
                    Rollup {
                        schema_version: Default::default(),
                        device: DeviceId::new(d).unwrap(),
                        metric: "temp".into(),
                        unit: Unit::Celsius,
                        window_start: Timestamp(ws),
                        window_ms: 60_000,
                        count: 2,
                        min: 1.0,
                        max: 3.0,
                        sum: 4.0,
                        first: 1.0,
                        first_ts: Timestamp(ws),
                        last: 3.0,
                        last_ts: Timestamp(ws + 1),
                        clock_unsynced: false,
                    },
                );
            }
        }
        fleet.put_alarm(alarm(t, s, "room-1", "high:room-1:1", T0 - 10));
    }
    let clock = Arc::new(ManualClock::new(T0));
    let state = ApiState::new(fleet.clone(), clock.clone(), rate);
    let admin = state
        .tokens
        .create_user_token("alice", Scope::Admin)
        .unwrap();
    let analyst = state
        .tokens
        .create_user_token(
            "bob",
            Scope::Analyst {
                tenant: tenant("acme"),
            },
        )
        .unwrap();
    let operator = state
        .tokens
        .create_user_token(
            "carol",
            Scope::Operator {
                tenant: tenant("acme"),
                site: site("s1"),
            },
        )
        .unwrap();
    Fx {
        app: api::router(state.clone()),
        state,
        fleet,
        clock,
        admin,
        analyst,
        operator,
    }
}

fn fx() -> Fx {
    fixture(RateLimit {
        burst: 10_000,
        per_second: 10_000.0,
    })
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = match body {
        Some(v) => b
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, headers, v)
}

async fn get(app: &Router, uri: &str, token: &str) -> (StatusCode, Value) {
    let (s, _, v) = call(app, Method::GET, uri, Some(token), None, &[]).await;
    (s, v)
}

async fn post(app: &Router, uri: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let (s, _, v) = call(app, Method::POST, uri, Some(token), Some(body), &[]).await;
    (s, v)
}

/// Every error answer has exactly the `{code, message, details}` shape.
fn assert_error(v: &Value, code: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["code", "message", "details"]), "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(!v["message"].as_str().unwrap().is_empty());
}

fn ids(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn read_routes_happy_paths() {
    let f = fx();
    let (s, v) = get(&f.app, "/api/v1/sites", &f.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ids(&v), vec!["acme:s1", "acme:s2", "beta:s1"]);
    assert!(v["next_cursor"].is_null());

    let (s, v) = get(&f.app, "/api/v1/edges?tenant=acme&online=false", &f.admin).await;
    assert_eq!(s, StatusCode::OK);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["site"], "s2");
    assert_eq!(items[0]["docs_behind"], 2);

    let (s, v) = get(&f.app, "/api/v1/health", &f.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (v["online"].as_u64(), v["offline"].as_u64()),
        (Some(2), Some(1))
    );

    let (s, v) = get(
        &f.app,
        "/api/v1/devices?tenant=acme&device_type=pump",
        &f.admin,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ids(&v), vec!["acme:s1:pump-1", "acme:s2:pump-1"]);

    let (s, v) = get(&f.app, "/api/v1/devices/acme:s1:room-1", &f.operator).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["desired"]["fields"]["setpoint"], 4.0);
    assert!(v["reported"].is_object() && v["conflicts"].is_array());

    let (s, v) = get(
        &f.app,
        "/api/v1/telemetry?tenant=acme&metric=temp&level=hour&group_by=site",
        &f.analyst,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let series = v["items"].as_array().unwrap();
    assert_eq!(series.len(), 2, "{v}");
    assert_eq!(series[0]["group"]["site"], "s1");
    assert_eq!(
        series[0]["points"][0]["count"], 12,
        "2 devices x 3 minutes x 2"
    );
    assert_eq!(series[0]["points"][0]["window_ms"], 3_600_000);

    let (s, v) = get(
        &f.app,
        "/api/v1/telemetry?group_by=device_type&level=day",
        &f.admin,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let types: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["group"]["device_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["pump", "room"]);

    let (s, v) = get(
        &f.app,
        "/api/v1/telemetry/top?metric=temp&stat=max&n=2",
        &f.admin,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 2);

    let (s, v) = get(&f.app, "/api/v1/alarms?active=true", &f.analyst).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        ids(&v),
        vec!["acme:s1:high:room-1:1", "acme:s2:high:room-1:1"]
    );

    let (s, v) = get(&f.app, "/api/v1/openapi.json", &f.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["openapi"], "3.1.0");

    for uri in ["/api/v1/commands", "/api/v1/rollouts", "/api/v1/audit"] {
        let (s, v) = get(&f.app, uri, &f.admin).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        assert!(v["items"].as_array().unwrap().is_empty(), "{uri}");
    }
}

#[tokio::test]
async fn scopes_narrow_lists_and_refuse_outside_data() {
    let f = fx();
    // Lists are narrowed to the scope without asking.
    let (_, v) = get(&f.app, "/api/v1/sites", &f.analyst).await;
    assert_eq!(ids(&v), vec!["acme:s1", "acme:s2"]);
    let (_, v) = get(&f.app, "/api/v1/devices", &f.operator).await;
    assert_eq!(ids(&v), vec!["acme:s1:pump-1", "acme:s1:room-1"]);
    // Asking outside the scope is 403.
    for (uri, tok) in [
        ("/api/v1/sites?tenant=beta", &f.analyst),
        ("/api/v1/telemetry?tenant=beta", &f.analyst),
        ("/api/v1/devices?site=s2", &f.operator),
        ("/api/v1/devices/acme:s2:pump-1", &f.operator),
        ("/api/v1/devices/beta:s1:pump-1", &f.analyst),
        ("/api/v1/alarms?tenant=beta", &f.operator),
        ("/api/v1/audit?tenant=beta", &f.analyst),
        ("/api/v1/events?tenant=beta", &f.analyst),
    ] {
        let (s, v) = get(&f.app, uri, tok).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{uri}");
        assert_error(&v, "forbidden");
    }
    // Analysts do not mutate; operators only their own site.
    let (s, v) = post(
        &f.app,
        "/api/v1/alarms/acme:s1:high:room-1:1/ack",
        &f.analyst,
        json!({"reason": "seen"}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_error(&v, "forbidden");
    let (s, _) = post(
        &f.app,
        "/api/v1/alarms/acme:s2:high:room-1:1/ack",
        &f.operator,
        json!({"reason": "seen"}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let cmd = json!({"tenant": "acme", "site": "s2", "target": "pump-1",
        "action": "write_coil", "register": "run", "value": true, "reason": "test"});
    let (s, _) = post(&f.app, "/api/v1/commands", &f.operator, cmd.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = post(&f.app, "/api/v1/commands", &f.analyst, cmd).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = post(
        &f.app,
        "/api/v1/rollouts",
        &f.operator,
        json!({"selector": {"tenant": "acme"}, "changes": {"setpoint": 3.0}, "gate_ms": 1000, "reason": "x"}),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "operator rollout must name its own site"
    );
}

#[tokio::test]
async fn missing_or_bad_tokens_are_401() {
    let f = fx();
    for (uri, hdr) in [
        ("/api/v1/sites", None),
        ("/api/v1/devices", Some("Bearer fsu_0000")),
        ("/api/v1/alarms", Some("Basic YWxpY2U6eA==")),
        ("/api/v1/events", Some("Bearer nope")),
        ("/api/v1/health", Some("Bearer")),
    ] {
        let headers: Vec<(&str, &str)> = hdr.map(|h| ("authorization", h)).into_iter().collect();
        let (s, h, v) = call(&f.app, Method::GET, uri, None, None, &headers).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
        assert_error(&v, "unauthorized");
        assert!(
            h.get("www-authenticate")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
    }
    // A revoked token stops working.
    assert!(f.state.tokens.revoke(&f.analyst));
    let (s, v) = get(&f.app, "/api/v1/sites", &f.analyst).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthorized");
}

#[tokio::test]
async fn not_found_answers_in_the_error_shape() {
    let f = fx();
    for (uri, code) in [
        ("/api/v1/devices/acme:s1:nope", "not_found"),
        ("/api/v1/devices/garbage", "not_found"),
        ("/api/v1/commands/cmd-nope", "not_found"),
        ("/api/v1/rollouts/ro-nope", "not_found"),
        ("/api/v1/nothing-here", "route_not_found"),
    ] {
        let (s, v) = get(&f.app, uri, &f.admin).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        assert_error(&v, code);
    }
    let (s, v) = post(
        &f.app,
        "/api/v1/alarms/acme:s1:nope/ack",
        &f.admin,
        json!({"reason": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    let (s, _, v) = call(
        &f.app,
        Method::DELETE,
        "/api/v1/sites",
        Some(&f.admin),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&v, "method_not_allowed");
}

#[tokio::test]
async fn bad_queries_and_bodies_are_422_naming_the_field() {
    let f = fx();
    for (uri, field) in [
        ("/api/v1/sites?limit=0", "limit"),
        ("/api/v1/sites?limit=100000", "limit"),
        ("/api/v1/sites?limit=ten", "limit"),
        ("/api/v1/sites?cursor=zz", "cursor"),
        ("/api/v1/sites?colour=red", "colour"),
        ("/api/v1/sites?tenant=Bad%20Name", "tenant"),
        ("/api/v1/telemetry?level=week", "level"),
        ("/api/v1/telemetry?group_by=planet", "group_by"),
        ("/api/v1/telemetry?from=10&to=5", "to"),
        ("/api/v1/telemetry/top", "metric"),
        ("/api/v1/alarms?severity=huge", "severity"),
        ("/api/v1/alarms?active=maybe", "active"),
        ("/api/v1/commands?status=lost", "status"),
        ("/api/v1/rollouts?state=sideways", "state"),
        ("/api/v1/edges?tenant=acme&tenant=beta", "tenant"),
    ] {
        let (s, v) = get(&f.app, uri, &f.admin).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {v}");
        assert_error(&v, "invalid_input");
        assert_eq!(v["details"]["field"], field, "{uri}: {v}");
    }
    let base = json!({"tenant": "acme", "site": "s1", "target": "pump-1",
        "action": "write_register", "register": "sp", "value": 3.0, "reason": "tune"});
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut no_target = base.clone();
    no_target.as_object_mut().unwrap().remove("target");
    cases.push((no_target, "target"));
    let mut bad_ttl = base.clone();
    bad_ttl["ttl_ms"] = json!("soon");
    cases.push((bad_ttl.clone(), "ttl_ms"));
    let mut neg_ttl = base.clone();
    neg_ttl["ttl_ms"] = json!(-5);
    cases.push((neg_ttl, "ttl_ms"));
    let mut unknown_dev = base.clone();
    unknown_dev["target"] = json!("ghost");
    cases.push((unknown_dev, "target"));
    let mut bad_tenant = base.clone();
    bad_tenant["tenant"] = json!("Not Valid");
    cases.push((bad_tenant, "tenant"));
    let mut no_reason = base.clone();
    no_reason.as_object_mut().unwrap().remove("reason");
    cases.push((no_reason, "reason"));
    let set_desired = json!({"tenant": "acme", "site": "s1", "target": "pump-1",
        "action": "set_desired", "field": "setpoint", "value": 99999.0, "reason": "x"});
    cases.push((set_desired, "value"));
    for (body, field) in cases {
        let (s, v) = post(&f.app, "/api/v1/commands", &f.admin, body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_error(&v, "invalid_input");
        assert!(
            v["details"]["field"].as_str().unwrap().contains(field),
            "{body}: wanted {field}, got {v}"
        );
    }
    for (body, field) in [
        (
            json!({"changes": {"setpoint": 3.0}, "reason": "x"}),
            "gate_ms",
        ),
        (
            json!({"changes": {"setpoint": "warm"}, "gate_ms": 5, "reason": "x"}),
            "changes.setpoint",
        ),
        (
            json!({"changes": {"nope": 1.0}, "gate_ms": 5, "reason": "x"}),
            "changes.nope",
        ),
        (
            json!({"changes": {"setpoint": 3.0}, "gate_ms": 5, "canary_percent": 0, "reason": "x"}),
            "canary_percent",
        ),
        (
            json!({"selector": {"site": "zz"}, "changes": {"setpoint": 3.0}, "gate_ms": 5, "reason": "x"}),
            "selector",
        ),
        (
            json!({"changes": {"setpoint": 3.0}, "gate_ms": 5, "reason": "x", "extra": 1}),
            "extra",
        ),
    ] {
        let (s, v) = post(&f.app, "/api/v1/rollouts", &f.admin, body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_error(&v, "invalid_input");
        let got = v["details"]["field"].as_str().unwrap();
        assert!(got.contains(field), "{body}: wanted {field}, got {v}");
    }
    // Not JSON at all: 415 without the content type, 400 for broken JSON.
    let (s, _, v) = call(
        &f.app,
        Method::POST,
        "/api/v1/commands",
        Some(&f.admin),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error(&v, "unsupported_media_type");
    let req = Request::post("/api/v1/commands")
        .header("authorization", format!("Bearer {}", f.admin))
        .header("content-type", "application/json")
        .body(Body::from("{\"tenant\": "))
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_error(&v, "invalid_json");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let f = fixture(RateLimit {
        burst: 3,
        per_second: 1.0,
    });
    for _ in 0..3 {
        let (s, _) = get(&f.app, "/api/v1/sites", &f.admin).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, h, v) = call(
        &f.app,
        Method::GET,
        "/api/v1/sites",
        Some(&f.admin),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_error(&v, "rate_limited");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    // Another token has its own bucket.
    let (s, _) = get(&f.app, "/api/v1/sites", &f.analyst).await;
    assert_eq!(s, StatusCode::OK);
    // After the advertised wait, the token works again.
    f.clock.advance(1_000);
    let (s, _) = get(&f.app, "/api/v1/sites", &f.admin).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get(&f.app, "/api/v1/sites", &f.admin).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn pagination_loses_and_repeats_nothing() {
    let f = fx();
    for i in 0..117 {
        f.fleet.put_device(DeviceRecord::new(
            dk("acme", "s3", &format!("d{i}")),
            "meter",
            &[],
        ));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let uri = match &cursor {
            None => "/api/v1/devices?site=s3&limit=50".to_string(),
            Some(c) => format!("/api/v1/devices?site=s3&limit=50&cursor={c}"),
        };
        let (s, v) = get(&f.app, &uri, &f.admin).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        pages += 1;
        let page = ids(&v);
        assert!(page.len() <= 50);
        seen.extend(page);
        // A device added mid-walk after the cursor is still seen; none is repeated.
        if pages == 1 {
            f.fleet
                .put_device(DeviceRecord::new(dk("acme", "s3", "zz-late"), "meter", &[]));
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 10, "runaway pagination");
    }
    assert_eq!(pages, 3);
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no repeats");
    assert_eq!(seen.len(), 118, "117 + the late one");
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "stable order");
}

#[tokio::test]
async fn openapi_document_and_router_list_the_same_routes() {
    let f = fx();
    let (_, routes) = api::router_with_routes(f.state.clone());
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = routes
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served);
    assert!(served.len() >= 20);
    // And every documented route is really answered by the router.
    for (method, path) in &documented {
        let uri = path.replace("{id}", "x");
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let body = (m == Method::POST).then(|| json!({}));
        let req_uri = if path.ends_with("/events") {
            // Do not hold an SSE stream open: a bad parameter answers at once.
            format!("{uri}?bogus=1")
        } else {
            uri
        };
        let (s, _, v) = call(&f.app, m, &req_uri, Some(&f.admin), body, &[]).await;
        assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_ne!(v["code"], "route_not_found", "{method} {path}");
    }
}

#[tokio::test]
async fn commands_are_idempotent_per_key_and_audited() {
    let f = fx();
    let body = json!({"tenant": "acme", "site": "s1", "target": "pump-1",
        "action": "write_coil", "register": "run", "value": true, "reason": "start pump"});
    let key = [("idempotency-key", "k-123")];
    let (s1, _, v1) = call(
        &f.app,
        Method::POST,
        "/api/v1/commands",
        Some(&f.operator),
        Some(body.clone()),
        &key,
    )
    .await;
    assert_eq!(s1, StatusCode::CREATED, "{v1}");
    f.clock.advance(5_000);
    let (s2, _, v2) = call(
        &f.app,
        Method::POST,
        "/api/v1/commands",
        Some(&f.operator),
        Some(body.clone()),
        &key,
    )
    .await;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(v1, v2, "the same command, not a new one");
    assert_eq!(v1["command"]["issued_by"], "operator:acme:s1:carol");
    assert_eq!(v1["status"], "pending");
    // Another principal with the same key gets its own command.
    let (s3, _, v3) = call(
        &f.app,
        Method::POST,
        "/api/v1/commands",
        Some(&f.admin),
        Some(body.clone()),
        &key,
    )
    .await;
    assert_eq!(s3, StatusCode::CREATED);
    assert_ne!(v3["command"]["id"], v1["command"]["id"]);
    // Same key, different command: refused.
    let mut other = body.clone();
    other["value"] = json!(false);
    let (s4, _, v4) = call(
        &f.app,
        Method::POST,
        "/api/v1/commands",
        Some(&f.operator),
        Some(other),
        &key,
    )
    .await;
    assert_eq!(s4, StatusCode::CONFLICT);
    assert_error(&v4, "conflict");
    // Without a key, each call is a new command.
    let (s5, v5) = post(&f.app, "/api/v1/commands", &f.operator, body.clone()).await;
    assert_eq!(s5, StatusCode::CREATED);
    assert_ne!(v5["command"]["id"], v1["command"]["id"]);

    let id = v1["command"]["id"].as_str().unwrap();
    let (s, v) = get(&f.app, &format!("/api/v1/commands/{id}"), &f.analyst).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, v1);
    let (_, v) = get(&f.app, "/api/v1/commands?device=pump-1", &f.operator).await;
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        3,
        "all three target its site"
    );
    let (_, v) = get(&f.app, "/api/v1/commands?site=s2", &f.admin).await;
    assert!(v["items"].as_array().unwrap().is_empty());
    let (_, audit) = get(&f.app, "/api/v1/audit?action=command.create", &f.admin).await;
    let entries = audit["items"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "one record per created command: {audit}");
    assert_eq!(entries[0]["actor"], "operator:acme:s1:carol");
    assert_eq!(entries[0]["reason"], "start pump");
    // The operator sees audit of its site only; the analyst of its tenant.
    let (_, a) = get(&f.app, "/api/v1/audit", &f.operator).await;
    assert_eq!(a["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn alarm_ack_is_audited_with_who_and_why() {
    let f = fx();
    let id = "acme:s1:high:room-1:1";
    let (s, v) = post(
        &f.app,
        &format!("/api/v1/alarms/{id}/ack"),
        &f.operator,
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["details"]["field"], "reason");
    let (s, _, v) = call(
        &f.app,
        Method::POST,
        &format!("/api/v1/alarms/{id}/ack"),
        Some(&f.operator),
        Some(json!({})),
        &[("x-fieldsync-reason", "checked the door")],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["alarm"]["acked_by"], "operator:acme:s1:carol");
    assert_eq!(v["alarm"]["acked_at"], T0);
    let (_, v) = get(&f.app, "/api/v1/alarms?acked=true", &f.admin).await;
    assert_eq!(ids(&v), vec![id]);
    let (_, a) = get(&f.app, "/api/v1/audit?action=alarm.ack", &f.analyst).await;
    let e = &a["items"][0];
    assert_eq!(e["actor"], "operator:acme:s1:carol");
    assert_eq!(e["reason"], "checked the door");
    assert_eq!(e["target"], format!("alarm:{id}"));
    // beta's analyst would not see it; acme's admin does.
    let (_, a) = get(&f.app, "/api/v1/audit?tenant=acme&site=s1", &f.admin).await;
    assert_eq!(a["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn rollout_through_the_api_rolls_back_on_a_canary_alarm() {
    let f = fx();
    let (s, r) = post(
        &f.app,
        "/api/v1/rollouts",
        &f.admin,
        json!({"selector": {"tenant": "acme", "device_type": "room"},
               "changes": {"setpoint": 2.5}, "canary_percent": 50, "gate_ms": 60000,
               "reason": "colder"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let id = r["spec"]["id"].as_str().unwrap().to_string();
    assert_eq!(r["state"]["state"], "canary");
    let members = r["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    let canary = members.iter().find(|m| m["canary"] == true).unwrap();
    let ck = DeviceKey::parse(
        canary["device"]["tenant"].as_str().unwrap(),
        canary["device"]["site"].as_str().unwrap(),
        canary["device"]["device"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        f.fleet.device(&ck).unwrap().desired.fields["setpoint"],
        FieldValue::Number(2.5)
    );
    // Pause and resume through the API.
    f.clock.advance(1_000);
    let (s, v) = post(
        &f.app,
        &format!("/api/v1/rollouts/{id}/pause"),
        &f.admin,
        json!({"reason": "lunch"}),
    )
    .await;
    assert_eq!(
        (s, v["state"]["state"].as_str()),
        (StatusCode::OK, Some("paused"))
    );
    let (s, v) = post(
        &f.app,
        &format!("/api/v1/rollouts/{id}/pause"),
        &f.admin,
        json!({"reason": "again"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&v, "conflict");
    let (s, _) = post(
        &f.app,
        &format!("/api/v1/rollouts/{id}/resume"),
        &f.admin,
        json!({"reason": "back"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // The canary raises an alarm after the change; the driver rolls back.
    f.clock.advance(1_000);
    f.fleet.put_alarm(alarm(
        ck.tenant.as_str(),
        ck.site.as_str(),
        ck.device.as_str(),
        "high:new:1",
        T0 + 1_500,
    ));
    assert_eq!(drive_rollouts(&f.state).await.unwrap(), 1);
    let (_, v) = get(&f.app, &format!("/api/v1/rollouts/{id}"), &f.analyst).await;
    assert_eq!(v["state"]["state"], "rolled_back", "{v}");
    assert_eq!(
        f.fleet.device(&ck).unwrap().desired.fields["setpoint"],
        FieldValue::Number(4.0)
    );
    let (_, a) = get(&f.app, "/api/v1/audit?tenant=acme", &f.analyst).await;
    let actions: Vec<&str> = a["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec![
            "rollout.started",
            "rollout.canary_applied",
            "rollout.paused",
            "rollout.resumed",
            "rollout.gate_failed",
            "rollout.rolled_back"
        ]
    );
    let (_, v) = get(&f.app, "/api/v1/rollouts?state=rolled_back", &f.admin).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (s, _) = post(
        &f.app,
        &format!("/api/v1/rollouts/{id}/abort"),
        &f.admin,
        json!({"reason": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn healthy_rollout_completes_and_abort_reverts() {
    let f = fx();
    let (s, r) = post(
        &f.app,
        "/api/v1/rollouts",
        &f.operator,
        json!({"selector": {"tenant": "acme", "site": "s1"},
               "changes": {"setpoint": 3.0}, "gate_ms": 10000, "reason": "tune"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let id = r["spec"]["id"].as_str().unwrap().to_string();
    let healthy = ReportedState {
        health: schemas::device::DeviceHealth {
            status: HealthStatus::Ok,
            ..Default::default()
        },
        ..Default::default()
    };
    for d in ["pump-1", "room-1"] {
        f.fleet
            .report(&dk("acme", "s1", d), healthy.clone(), Timestamp(T0 + 5_000));
    }
    f.clock.advance(9_999);
    assert_eq!(
        drive_rollouts(&f.state).await.unwrap(),
        0,
        "gate still running"
    );
    f.clock.advance(1);
    assert_eq!(drive_rollouts(&f.state).await.unwrap(), 1);
    let (_, v) = get(&f.app, &format!("/api/v1/rollouts/{id}"), &f.operator).await;
    assert_eq!(v["state"]["state"], "completed");
    for d in ["pump-1", "room-1"] {
        assert_eq!(
            f.fleet.device(&dk("acme", "s1", d)).unwrap().desired.fields["setpoint"],
            FieldValue::Number(3.0)
        );
    }
    // A second rollout, aborted during its canary stage, reverts.
    let (_, r2) = post(
        &f.app,
        "/api/v1/rollouts",
        &f.admin,
        json!({"selector": {"tenant": "beta"}, "changes": {"setpoint": 1.0},
               "canary_percent": 100, "gate_ms": 10000, "reason": "try"}),
    )
    .await;
    let id2 = r2["spec"]["id"].as_str().unwrap();
    assert_eq!(
        f.fleet
            .device(&dk("beta", "s1", "pump-1"))
            .unwrap()
            .desired
            .fields["setpoint"],
        FieldValue::Number(1.0)
    );
    let (s, v) = post(
        &f.app,
        &format!("/api/v1/rollouts/{id2}/abort"),
        &f.admin,
        json!({"reason": "wrong tenant"}),
    )
    .await;
    assert_eq!(
        (s, v["state"]["state"].as_str()),
        (StatusCode::OK, Some("aborted"))
    );
    assert_eq!(
        f.fleet
            .device(&dk("beta", "s1", "pump-1"))
            .unwrap()
            .desired
            .fields["setpoint"],
        FieldValue::Number(4.0)
    );
    // The analyst of acme does not see beta's rollout.
    let (s, _) = get(&f.app, &format!("/api/v1/rollouts/{id2}"), &f.analyst).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// Read SSE frames until one contains `needle`, or fail at the deadline.
async fn read_until(body: &mut Body, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while !text.contains(needle) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} before the deadline; got {text:?}"))
            .expect("stream ended")
            .unwrap();
        if let Some(d) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
        }
    }
    text
}

#[tokio::test]
async fn events_stream_sends_scoped_filtered_changes() {
    let f = fx();
    let req = Request::get("/api/v1/events?kind=alarm")
        .header("authorization", format!("Bearer {}", f.operator))
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // Out of scope (beta) and wrong kind (command): not delivered.
    let (s, _) = post(
        &f.app,
        "/api/v1/alarms/beta:s1:high:room-1:1/ack",
        &f.admin,
        json!({"reason": "r"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = post(
        &f.app,
        "/api/v1/commands",
        &f.admin,
        json!({"tenant": "acme", "site": "s1", "target": "pump-1",
               "action": "write_coil", "register": "run", "value": true, "reason": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = post(
        &f.app,
        "/api/v1/alarms/acme:s1:high:room-1:1/ack",
        &f.admin,
        json!({"reason": "r"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let text = read_until(&mut body, "acme:s1:high:room-1:1").await;
    assert!(text.contains("event: alarm"), "{text}");
    assert!(!text.contains("beta"), "out-of-scope event leaked: {text}");
    assert!(
        !text.contains("event: command"),
        "filtered kind leaked: {text}"
    );
    drop(body);
}

#[tokio::test]
async fn overlapping_active_rollouts_are_refused() {
    let f = fx();
    let body = |field: &str| {
        json!({"selector": {"tenant": "acme"}, "changes": {field: 3.0},
               "gate_ms": 10000, "reason": "tune"})
    };
    let (s, first) = post(&f.app, "/api/v1/rollouts", &f.admin, body("setpoint")).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = post(&f.app, "/api/v1/rollouts", &f.admin, body("setpoint")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "conflict");
    assert_eq!(v["details"]["rollout"], first["spec"]["id"]);
    let (s, _) = post(&f.app, "/api/v1/rollouts", &f.admin, body("hysteresis")).await;
    assert_eq!(s, StatusCode::CREATED, "another field does not conflict");
    let id = first["spec"]["id"].as_str().unwrap();
    let (s, _) = post(
        &f.app,
        &format!("/api/v1/rollouts/{id}/abort"),
        &f.admin,
        json!({"reason": "make room"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = post(&f.app, "/api/v1/rollouts", &f.admin, body("setpoint")).await;
    assert_eq!(s, StatusCode::CREATED, "after abort the field is free");
}

#[tokio::test]
async fn the_rollout_driver_task_completes_a_gate_and_stops_on_shutdown() {
    let f = fx();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let driver = tokio::spawn(api::run_rollout_driver(
        f.state.clone(),
        Duration::from_millis(5),
        rx,
    ));
    let (s, r) = post(
        &f.app,
        "/api/v1/rollouts",
        &f.admin,
        json!({"selector": {"tenant": "beta"}, "changes": {"mode": "eco"},
               "gate_ms": 10000, "reason": "save energy"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let id = r["spec"]["id"].as_str().unwrap().to_string();
    let ok = ReportedState {
        health: schemas::device::DeviceHealth {
            status: HealthStatus::Ok,
            ..Default::default()
        },
        ..Default::default()
    };
    for d in ["pump-1", "room-1"] {
        f.fleet
            .report(&dk("beta", "s1", d), ok.clone(), Timestamp(T0 + 1));
    }
    f.clock.advance(10_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, v) = get(&f.app, &format!("/api/v1/rollouts/{id}"), &f.admin).await;
        if v["state"]["state"] == "completed" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "driver did not complete the rollout: {v}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        f.fleet
            .device(&dk("beta", "s1", "pump-1"))
            .unwrap()
            .desired
            .fields["mode"],
        FieldValue::Text("eco".into())
    );
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("driver stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_idempotency_key_create_one_command() {
    let f = fx();
    let body = json!({"tenant": "acme", "site": "s1", "target": "room-1",
        "action": "set_desired", "field": "setpoint", "value": 3.5, "reason": "race"});
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let app = f.app.clone();
        let tok = f.operator.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            call(
                &app,
                Method::POST,
                "/api/v1/commands",
                Some(&tok),
                Some(body),
                &[("idempotency-key", "race-1")],
            )
            .await
        }));
    }
    let mut created = 0;
    let mut ids = BTreeSet::new();
    for t in tasks {
        let (s, _, v) = t.await.unwrap();
        assert!(s == StatusCode::CREATED || s == StatusCode::OK, "{s}: {v}");
        created += usize::from(s == StatusCode::CREATED);
        ids.insert(v["command"]["id"].as_str().unwrap().to_string());
    }
    assert_eq!((created, ids.len()), (1, 1));
    assert_eq!(f.fleet.commands().len(), 1);
    let (_, a) = get(&f.app, "/api/v1/audit?action=command.create", &f.admin).await;
    assert_eq!(a["items"].as_array().unwrap().len(), 1, "audited once");
}

#[test]
fn api_audit_entries_map_onto_the_signed_audit_log() {
    let e = cloud_hub::api::data::AuditEntry {
        at: Timestamp(T0),
        actor: "operator:acme:s1:carol".into(),
        action: "alarm.ack".into(),
        target: "alarm:acme:s1:x".into(),
        tenant: Some(tenant("acme")),
        site: Some(site("s1")),
        reason: "checked".into(),
        details: json!({"acked_by": "carol"}),
    };
    let rec = cloud_hub::audit::AuditRecord::from(&e);
    assert_eq!(
        (
            rec.actor.as_str(),
            rec.action.as_str(),
            rec.target.as_str(),
            rec.reason.as_str()
        ),
        (
            "operator:acme:s1:carol",
            "alarm.ack",
            "alarm:acme:s1:x",
            "checked"
        )
    );
    let d: Value = serde_json::from_str(&rec.details).unwrap();
    assert_eq!(
        d,
        json!({"tenant": "acme", "site": "s1", "details": {"acked_by": "carol"}})
    );
}

#[tokio::test]
async fn document_heads_are_for_admins_only() {
    let f = fx();
    let (s, v) = get(&f.app, "/api/v1/sync/heads", &f.admin).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 0, "the memory fleet holds no documents");
    assert!(v["documents"].as_array().is_some(), "{v}");
    for token in [&f.analyst, &f.operator] {
        let (s, v) = get(&f.app, "/api/v1/sync/heads", token).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    }
    let (s, _) = get(&f.app, "/api/v1/sync/heads?x=1", &f.admin).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}
