//! Real iroh QUIC on loopback: convergence, authorisation, reconnect cost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use schemas::device::FieldValue;
use schemas::ids::{DocId, Role};
use schemas::policy::{HubTier, Region};
use schemas::time::Timestamp;
use sync_core::authz::{Authz, HubScope, PeerInfo, StaticDirectory};
use sync_core::docs::device;
use sync_core::driver::{DriverConfig, NodeEvent, SyncNode};
use sync_core::identity::{NodeKey, actor_for};
use sync_core::storage::MemStorage;
use sync_core::store::{DocStore, StoreConfig};
use tokio::time::Instant;

const NOW: Timestamp = Timestamp(1_800_000_000_000);

fn key(n: u8) -> NodeKey {
    NodeKey::from_bytes([n; 32])
}

fn hub_info(n: u8) -> PeerInfo {
    PeerInfo {
        key: key(n).public(),
        role: Role::Hub,
        tenant: None,
        site: None,
    }
}

fn edge_info(n: u8, site: &str) -> PeerInfo {
    PeerInfo {
        key: key(n).public(),
        role: Role::Edge,
        tenant: "acme".parse().ok(),
        site: site.parse().ok(),
    }
}

fn hub_scope() -> HubScope {
    let eu = Region::new("eu").unwrap();
    HubScope {
        tier: HubTier::Regional,
        regions: vec![eu.clone()],
        tenant_regions: [("acme".parse().unwrap(), eu)].into(),
    }
}

fn directory(infos: &[PeerInfo]) -> Arc<StaticDirectory> {
    let mut d = StaticDirectory::default();
    for i in infos {
        d.insert(i.clone());
    }
    Arc::new(d)
}

async fn start(
    n: u8,
    info: PeerInfo,
    dir: Arc<StaticDirectory>,
    store: Option<Arc<DocStore>>,
) -> SyncNode {
    let k = key(n);
    let store = store.unwrap_or_else(|| Arc::new(DocStore::in_memory(k.clone())));
    let scope = (info.role == Role::Hub).then(hub_scope);
    let authz = Arc::new(Authz::new(info, scope));
    SyncNode::spawn(&k, store, authz, dir, DriverConfig::default())
        .await
        .unwrap()
}

fn addr(n: &SyncNode) -> std::net::SocketAddr {
    n.local_addrs().into_iter().find(|a| a.is_ipv4()).unwrap()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn heads(n: &SyncNode, id: &DocId) -> Option<Vec<automerge::ChangeHash>> {
    n.store().heads(id).map(|mut h| {
        h.sort();
        h
    })
}

fn dev(name: &str) -> DocId {
    format!("t/acme/s/s1/dev/{name}").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_with_visible_conflicts() {
    let infos = [hub_info(1), edge_info(2, "s1"), edge_info(3, "s1")];
    let dir = directory(&infos);
    let hub = start(1, infos[0].clone(), dir.clone(), None).await;
    let e1 = start(2, infos[1].clone(), dir.clone(), None).await;
    let e2 = start(3, infos[2].clone(), dir.clone(), None).await;
    // Concurrent writes of one field on all three before they connect.
    let id = dev("pump-1");
    hub.store()
        .change(&id, NOW, |d| {
            device::set_desired(d, "high_limit", &FieldValue::Number(8.0))
        })
        .unwrap();
    e1.store()
        .change(&id, NOW, |d| {
            device::set_desired(d, "high_limit", &FieldValue::Number(6.0))
        })
        .unwrap();
    e2.store()
        .change(&id, NOW, |d| {
            device::set_desired(d, "label", &FieldValue::Text("north".into()))
        })
        .unwrap();
    e1.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    e2.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    e2.dial(e1.endpoint_id(), addr(&e1)).unwrap();
    wait_for("convergence", || {
        let h = heads(&hub, &id);
        h.is_some()
            && h == heads(&e1, &id)
            && h == heads(&e2, &id)
            && h.as_ref().is_some_and(|h| h.len() == 3)
    })
    .await;
    for n in [&hub, &e1, &e2] {
        let d = n
            .store()
            .read(&id, device::desired)
            .unwrap()
            .unwrap()
            .unwrap();
        let hl = &d["high_limit"];
        assert!(hl.in_conflict(), "both values visible: {hl:?}");
        assert_eq!(hl.values.len(), 2);
        assert_eq!(hl.effective, FieldValue::Number(6.0), "min_wins");
        assert_eq!(d["label"].effective, FieldValue::Text("north".into()));
    }
    // A live edit after the initial sync reaches everyone.
    e2.store()
        .change(&id, NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(3.5))
        })
        .unwrap();
    wait_for("live edit", || {
        [&hub, &e1].iter().all(|n| {
            n.store()
                .read(&id, |d| device::desired_number(d, "setpoint").unwrap())
                .unwrap()
                == Some(Some(3.5))
        })
    })
    .await;
    for n in [hub, e1, e2] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoint_is_refused_and_gets_no_document_bytes() {
    let infos = [hub_info(1), edge_info(2, "s1")];
    let dir = directory(&infos);
    let hub = start(1, infos[0].clone(), dir.clone(), None).await;
    hub.store()
        .change(&dev("secret"), NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(1.0))
        })
        .unwrap();
    // The stranger knows itself and the hub, but the hub does not know it.
    let stranger_info = edge_info(9, "s1");
    let stranger_dir = directory(&[infos[0].clone(), stranger_info.clone()]);
    let stranger = start(9, stranger_info, stranger_dir, None).await;
    let mut hub_events = hub.subscribe();
    stranger.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, hub_events.recv())
            .await
            .expect("no refusal seen")
            .unwrap();
        if let NodeEvent::Refused { peer, .. } = ev {
            assert_eq!(peer, key(9).public());
            break;
        }
    }
    assert!(!stranger.store().contains(&dev("secret")));
    let st = stranger.status();
    let s = st.get(&key(1).public()).cloned().unwrap_or_default();
    assert_eq!(s.stats.bytes_received, 0, "stranger received bytes: {s:?}");
    stranger.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_outside_policy_never_reach_a_peer() {
    let infos = [hub_info(1), edge_info(2, "s1")];
    let dir = directory(&infos);
    let hub = start(1, infos[0].clone(), dir.clone(), None).await;
    let other_site: DocId = "t/acme/s/s2/dev/x".parse().unwrap();
    let other_tenant: DocId = "t/globex/s/s1/dev/x".parse().unwrap();
    let mine = dev("y");
    for id in [&other_site, &other_tenant, &mine] {
        hub.store()
            .change(id, NOW, |d| {
                device::set_desired(d, "setpoint", &FieldValue::Number(1.0))
            })
            .unwrap();
    }
    let e = start(2, infos[1].clone(), dir.clone(), None).await;
    e.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    wait_for("own site doc", || e.store().contains(&mine)).await;
    // Give any stray traffic the chance to arrive: wait until the edge is in sync.
    wait_for("in sync", || {
        e.status()
            .get(&key(1).public())
            .is_some_and(|s| s.last_sync.is_some() && s.docs_behind == 0)
    })
    .await;
    assert!(!e.store().contains(&other_site));
    assert!(!e.store().contains(&other_tenant));
    e.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_actor_is_refused() {
    let infos = [hub_info(1), edge_info(2, "s1")];
    let dir = directory(&infos);
    let hub = start(1, infos[0].clone(), dir.clone(), None).await;
    // The edge writes changes whose actor claims to be the hub.
    let forger = Arc::new(
        DocStore::open(
            Arc::new(MemStorage::new()),
            key(2),
            actor_for(&key(1).public(), [7; 8]),
            StoreConfig::default(),
        )
        .unwrap(),
    );
    let id = dev("pump-1");
    forger
        .change(&id, NOW, |d| {
            device::set_desired(d, "high_limit", &FieldValue::Number(999.0))
        })
        .unwrap();
    let e = start(2, infos[1].clone(), dir.clone(), Some(forger)).await;
    let mut events = hub.subscribe();
    e.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no refusal")
            .unwrap();
        if let NodeEvent::Session {
            event: sync_core::session::Event::Refused { reason, .. },
            ..
        } = ev
        {
            break reason;
        }
    };
    assert!(reason.contains("signature"), "{reason}");
    let v = hub
        .store()
        .read(&id, |d| device::desired_number(d, "high_limit").unwrap())
        .unwrap()
        .flatten();
    assert_eq!(v, None, "forged value must not be applied");
    e.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_costs_bytes_proportional_to_what_changed() {
    let infos = [hub_info(1), edge_info(2, "s1")];
    let dir = directory(&infos);
    let hub = start(1, infos[0].clone(), dir.clone(), None).await;
    let ids: Vec<DocId> = (0..1000).map(|i| dev(&format!("d{i:04}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        hub.store()
            .change(id, NOW, |d| {
                device::set_desired(d, "setpoint", &FieldValue::Number(i as f64))
            })
            .unwrap();
    }
    let e_store = Arc::new(DocStore::in_memory(key(2)));
    let hub_key = key(1).public();
    let e = start(2, infos[1].clone(), dir.clone(), Some(e_store.clone())).await;
    e.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    wait_for("initial sync", || ids.iter().all(|id| e_store.contains(id))).await;
    wait_for("in sync", || {
        e.status()
            .get(&hub_key)
            .is_some_and(|s| s.last_sync.is_some() && s.docs_behind == 0)
    })
    .await;
    e.shutdown().await;

    // Reconnect with nothing changed.
    let e = start(2, infos[1].clone(), dir.clone(), Some(e_store.clone())).await;
    e.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    wait_for("resync", || {
        e.status()
            .get(&hub_key)
            .is_some_and(|s| s.last_sync.is_some())
    })
    .await;
    let s = e.status()[&hub_key].stats;
    let per_doc = (s.bytes_sent + s.bytes_received) as f64 / ids.len() as f64;
    eprintln!(
        "unchanged reconnect: {} bytes sent, {} received, {per_doc:.2} per doc",
        s.bytes_sent, s.bytes_received
    );
    assert!(
        per_doc < 64.0,
        "unchanged reconnect cost {per_doc} bytes per document"
    );
    e.shutdown().await;

    // One small change while apart.
    hub.store()
        .change(&ids[500], NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(-1.0))
        })
        .unwrap();
    let e = start(2, infos[1].clone(), dir.clone(), Some(e_store.clone())).await;
    e.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    wait_for("small change", || {
        e_store
            .read(&ids[500], |d| {
                device::desired_number(d, "setpoint").unwrap()
            })
            .unwrap()
            == Some(Some(-1.0))
    })
    .await;
    wait_for("in sync", || {
        e.status()
            .get(&hub_key)
            .is_some_and(|s| s.last_sync.is_some() && s.docs_behind == 0)
    })
    .await;
    let s = e.status()[&hub_key].stats;
    let total = s.bytes_sent + s.bytes_received;
    eprintln!("reconnect after one change: {total} bytes");
    assert!(total < 64 * 1000, "one small change cost {total} bytes");
    e.shutdown().await;
    hub.shutdown().await;
}

/// A directory whose entries a test can remove while sessions run.
struct MutableDirectory(std::sync::Mutex<StaticDirectory>);

impl sync_core::authz::Directory for MutableDirectory {
    fn lookup(&self, key: &schemas::identity::EndpointKey) -> Option<PeerInfo> {
        self.0.lock().unwrap().nodes.get(key).cloned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_revoked_mid_session_is_disconnected() {
    let infos = [hub_info(1), edge_info(2, "s1")];
    let hub_dir = Arc::new(MutableDirectory(std::sync::Mutex::new(
        (*directory(&infos)).clone(),
    )));
    let k = key(1);
    let hub = SyncNode::spawn(
        &k,
        Arc::new(DocStore::in_memory(k.clone())),
        Arc::new(Authz::new(infos[0].clone(), Some(hub_scope()))),
        hub_dir.clone(),
        DriverConfig::default(),
    )
    .await
    .unwrap();
    let e = start(2, infos[1].clone(), directory(&infos), None).await;
    e.dial(hub.endpoint_id(), addr(&hub)).unwrap();
    let edge_key = key(2).public();
    wait_for("connected", || {
        hub.status().get(&edge_key).is_some_and(|s| s.connected)
    })
    .await;
    let mut events = hub.subscribe();
    hub_dir.0.lock().unwrap().nodes.remove(&edge_key);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    let reason = loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("not disconnected within 5 s")
            .unwrap();
        if let NodeEvent::Disconnected { peer, reason } = ev
            && peer == edge_key
        {
            break reason;
        }
    };
    assert!(reason.contains("no longer admitted"), "{reason}");
    eprintln!("revoked peer disconnected after {:?}", started.elapsed());
    e.shutdown().await;
    hub.shutdown().await;
}
