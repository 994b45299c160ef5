//! StoreFleet over a real sync-core DocStore: conflicts, telemetry through
//! the router, commands landing in command documents, order-independent
//! analytics, and rollouts surviving a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cloud_hub::analytics::{DeviceKey, Level, TelemetryQuery};
use cloud_hub::api::{self, ApiState, FleetData, ManualClock, RateLimit, Scope};
use cloud_hub::fleet_store::StoreFleet;
use cloud_hub::rollout::{Candidate, CohortSelector, Rollout, RolloutSpec};
use http_body_util::BodyExt;
use schemas::device::FieldValue;
use schemas::ids::DocId;
use schemas::metrics::{Rollup, Unit};
use schemas::time::Timestamp;
use schemas::{DeviceId, SiteId, TenantId};
use serde_json::{Value, json};
use sync_core::docs;
use sync_core::identity::NodeKey;
use sync_core::store::DocStore;
use tower::ServiceExt;

const T0: i64 = 1_790_000_000_000;

fn ids() -> (TenantId, SiteId) {
    (
        TenantId::new("acme").unwrap(),
        SiteId::new("plant-1").unwrap(),
    )
}

fn fleet(store: Arc<DocStore>) -> StoreFleet {
    StoreFleet::new(store, Arc::new(Vec::new), Arc::new(|_| Ok(())))
        .with_clock(Arc::new(ManualClock::new(T0)))
}

fn add_device(store: &DocStore, dev: &str) {
    let (t, s) = ids();
    let id = DocId::device_doc(&t, &s, &DeviceId::new(dev).unwrap());
    store
        .change(&id, Timestamp(T0), |d| {
            docs::device::set_meta(d, "thermostat", &["a".into()])
        })
        .unwrap();
}

fn rollup(dev: &str, minute: i64, count: u64, v: f64) -> Rollup {
    let start = T0 - T0 % 3_600_000 + minute * 60_000;
    Rollup {
        schema_version: Default::default(),
        device: DeviceId::new(dev).unwrap(),
        metric: "temperature".into(),
        unit: Unit::Celsius,
        window_start: Timestamp(start),
        window_ms: 60_000,
        count,
        min: v,
        max: v + count as f64,
        sum: v * count as f64,
        first: v,
        first_ts: Timestamp(start),
        last: v,
        last_ts: Timestamp(start + count as i64),
        clock_unsynced: false,
    }
}

fn put_rollups(store: &DocStore, rs: &[Rollup]) {
    let (t, s) = ids();
    for r in rs {
        let id = DocId::telemetry(&t, &s, &r.device, Timestamp(T0).day());
        store
            .change(&id, Timestamp(T0), |d| {
                docs::telemetry::put_rollup(d, r).map(|_| ())
            })
            .unwrap();
    }
}

#[test]
fn concurrent_desired_values_show_as_a_conflict() {
    let store = Arc::new(DocStore::in_memory(NodeKey::generate()));
    add_device(&store, "pump-1");
    let (t, s) = ids();
    let id = DocId::device_doc(&t, &s, &DeviceId::new("pump-1").unwrap());
    store
        .change(&id, Timestamp(T0), |d| {
            let mut other = d.fork().with_actor(automerge::ActorId::from(vec![7u8; 40]));
            docs::device::set_desired(&mut other, "high_limit", &FieldValue::Number(6.0))?;
            other.commit();
            docs::device::set_desired(d, "high_limit", &FieldValue::Number(8.0))?;
            d.merge(&mut other)?;
            Ok(())
        })
        .unwrap();
    let f = fleet(store);
    let key = DeviceKey::parse("acme", "plant-1", "pump-1").unwrap();
    let dev = f.device(&key).unwrap();
    assert_eq!(dev.device_type, "thermostat");
    assert_eq!(dev.conflicts.len(), 1, "{dev:?}");
    let c = &dev.conflicts[0];
    assert_eq!(c.field, "high_limit");
    let mut vals: Vec<f64> = c.values.iter().filter_map(FieldValue::as_f64).collect();
    vals.sort_by(f64::total_cmp);
    assert_eq!(vals, vec![6.0, 8.0]);
    // Writing through the fleet resolves it.
    f.set_desired(&key, "high_limit", Some(FieldValue::Number(7.0)))
        .unwrap();
    let dev = f.device(&key).unwrap();
    assert!(dev.conflicts.is_empty());
    assert_eq!(dev.desired.fields["high_limit"], FieldValue::Number(7.0));
    assert_eq!(f.devices().len(), 1);
    assert_eq!(f.sites().len(), 1);
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, Value) {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"));
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let req = match body {
        Some(v) => b
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let res = app.clone().oneshot(req).await.unwrap();
    let st = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn telemetry_and_commands_through_the_router() {
    let store = Arc::new(DocStore::in_memory(NodeKey::generate()));
    add_device(&store, "pump-1");
    let f = Arc::new(fleet(store.clone()));
    let state = ApiState::new(
        f.clone(),
        Arc::new(ManualClock::new(T0)),
        RateLimit::default(),
    );
    let token = state
        .tokens
        .create_user_token("alice", Scope::Admin)
        .unwrap();
    let app = api::router(state);

    // Rollups written after the fleet was created are picked up incrementally.
    assert_eq!(f.indexed_windows(), 0);
    put_rollups(
        &store,
        &[rollup("pump-1", 0, 3, 20.0), rollup("pump-1", 1, 3, 21.0)],
    );
    let (st, v) = call(
        &app,
        "GET",
        "/api/v1/telemetry?device=pump-1&level=minute",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pts = v["items"][0]["points"].as_array().unwrap();
    assert_eq!(pts.len(), 2, "{v}");
    assert_eq!(pts[1]["sum"], json!(63.0));

    let body = json!({"tenant":"acme","site":"plant-1","target":"pump-1","action":"write_coil","register":"run","value":true,"reason":"test"});
    let (st, v) = call(
        &app,
        "POST",
        "/api/v1/commands",
        &token,
        Some(body.clone()),
        Some("k-1"),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let cid = v["command"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["idempotency_key"], json!("k-1"));
    let (t, s) = ids();
    let doc = DocId::commands(&t, &s, Timestamp(T0).day());
    let reqs = store
        .read(&doc, |d| docs::commands::requests(d).unwrap().0)
        .unwrap()
        .unwrap();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].id, cid);
    // The same key again: the stored command, no second request.
    let (st, v) = call(
        &app,
        "POST",
        "/api/v1/commands",
        &token,
        Some(body),
        Some("k-1"),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["command"]["id"], json!(cid));
    let n = store
        .read(&doc, |d| docs::commands::requests(d).unwrap().0.len())
        .unwrap()
        .unwrap();
    assert_eq!(n, 1);
    let (_, v) = call(
        &app,
        "GET",
        &format!("/api/v1/commands/{cid}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(v["status"], json!("pending"), "{v}");
    // A result written by the edge shows up as the status.
    store
        .change(&doc, Timestamp(T0), |d| {
            docs::commands::put_result(
                d,
                &schemas::command::CommandResult {
                    schema_version: Default::default(),
                    command_id: cid.clone(),
                    status: schemas::command::CommandStatus::Succeeded,
                    reason: String::new(),
                    executed_at: Timestamp(T0),
                    executed_by: "edge".into(),
                },
            )
        })
        .unwrap();
    let (_, v) = call(
        &app,
        "GET",
        &format!("/api/v1/commands/{cid}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(v["status"], json!("succeeded"), "{v}");
}

#[test]
fn analytics_do_not_depend_on_arrival_order() {
    // Each window is written first partially, later in full (as an edge's
    // summariser does); the shuffled replica gets windows in another order,
    // devices interleaved, with the index refreshed half way.
    let (mut partial, mut full) = (Vec::new(), Vec::new());
    for dev in ["pump-1", "pump-2"] {
        for m in 0..20 {
            partial.push(rollup(dev, m, 2, 10.0 + m as f64));
            full.push(rollup(dev, m, 5, 11.0 + m as f64));
        }
    }
    let in_order = Arc::new(DocStore::in_memory(NodeKey::generate()));
    put_rollups(&in_order, &partial);
    put_rollups(&in_order, &full);
    let shuffled = Arc::new(DocStore::in_memory(NodeKey::generate()));
    let f2 = fleet(shuffled.clone());
    let (mut p2, mut f2s) = (partial.clone(), full.clone());
    p2.reverse();
    p2.rotate_left(7);
    f2s.rotate_left(13);
    put_rollups(&shuffled, &p2[..25]);
    assert!(f2.indexed_windows() > 0);
    put_rollups(&shuffled, &f2s[..10]);
    put_rollups(&shuffled, &p2[25..]);
    assert!(f2.indexed_windows() > 0);
    put_rollups(&shuffled, &f2s[10..]);
    let f1 = fleet(in_order);
    for level in [Level::Minute, Level::Hour] {
        let q = TelemetryQuery {
            level,
            ..Default::default()
        };
        let (a, b) = (f1.telemetry(&q), f2.telemetry(&q));
        assert!(!a.is_empty());
        assert_eq!(a, b, "{level:?}");
    }
}

#[test]
fn rollouts_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DocStore::in_memory(NodeKey::generate()));
    add_device(&store, "pump-1");
    let f = fleet(store.clone()).with_data_dir(dir.path()).unwrap();
    let spec = RolloutSpec {
        id: "ro-1/with:odd chars".into(),
        selector: CohortSelector::default(),
        changes: BTreeMap::from([("high_limit".into(), FieldValue::Number(9.0))]),
        canary_percent: 50,
        gate_ms: 60_000,
        created_by: "admin:alice".into(),
        reason: "test".into(),
    };
    let cand = Candidate {
        key: DeviceKey::parse("acme", "plant-1", "pump-1").unwrap(),
        device_type: "thermostat".into(),
        tags: vec![],
        desired: BTreeMap::new(),
    };
    let (r, _) = Rollout::start(spec, &[cand], Timestamp(T0)).unwrap();
    f.put_rollout(&r).unwrap();
    drop(f);
    let f = fleet(store).with_data_dir(dir.path()).unwrap();
    assert_eq!(f.rollouts(), vec![r]);
}

#[test]
fn doc_heads_are_the_stores_heads_for_every_document() {
    let store = Arc::new(DocStore::in_memory(NodeKey::from_bytes([5; 32])));
    add_device(&store, "pump-1");
    add_device(&store, "pump-2");
    let f = fleet(store.clone());
    let heads = f.doc_heads();
    assert_eq!(heads.len(), store.list().len());
    for h in &heads {
        let id: DocId = h.doc.parse().unwrap();
        let mut want: Vec<String> = store
            .heads(&id)
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect();
        want.sort();
        assert!(!want.is_empty(), "{}", h.doc);
        assert_eq!(h.heads, want, "{}", h.doc);
    }
}

#[test]
fn late_parts_count_in_the_fleet_analytics() {
    let store = Arc::new(DocStore::in_memory(NodeKey::from_bytes([6; 32])));
    let f = fleet(store.clone());
    put_rollups(&store, &[rollup("pump-1", 3, 4, 10.0)]);
    let count = |f: &StoreFleet| -> u64 {
        f.telemetry(&TelemetryQuery {
            level: Level::Minute,
            ..Default::default()
        })
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.count))
        .sum()
    };
    assert_eq!(count(&f), 4);
    // Two samples of the same window arrive after its rollup was written:
    // the edge keeps them in a late part beside it.
    let late = rollup("pump-1", 3, 2, 20.0);
    let (t, s) = ids();
    let id = DocId::telemetry(&t, &s, &late.device, Timestamp(T0).day());
    let key = format!("late:temperature@{}#0", late.window_start.as_millis());
    store
        .change(&id, Timestamp(T0), |d| docs::put_root_json(d, &key, &late))
        .unwrap();
    assert_eq!(count(&f), 6, "the late part is counted in its window");
    assert_eq!(count(&fleet(store)), 6, "and by a fresh index");
}
