//! Compliance partitioning: per-document policy over random nodes and documents, an EU hub
//! refusing a US tenant's edge, and a global hub that receives only fleet aggregates from
//! two regional hubs (three hubs over real iroh on loopback).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable as _;
use cloud_hub::api::{Clock, ManualClock};
use cloud_hub::hub::{Hub, ServeOptions};
use cloud_hub::keys;
use cloud_hub::registry::{JsonFileStore, Registry};
use cloud_hub::tokens::{self, TokenRequest};
use proptest::prelude::*;
use schemas::config::{HubConfig, PeerConfig, TenantConfig};
use schemas::identity::EndpointKey;
use schemas::ids::{DocId, DocKind, Role};
use schemas::policy::{HubTier, Region};
use sync_core::authz::{Authz, HubScope, PeerInfo, StaticDirectory};
use sync_core::driver::{DriverConfig, NodeEvent, SyncNode};
use sync_core::identity::NodeKey;
use sync_core::registry::RegistryDirectory;
use sync_core::store::DocStore;
use tokio::time::Instant;

const T0: i64 = 1_800_000_000_000; // 2027-01-15
const DAY: &str = "2027-01-15";

fn region(r: &str) -> Region {
    Region::new(r).unwrap()
}

fn cfg(dir: &Path, tier: HubTier, regions: &[&str], tenants: &[(&str, &str)]) -> HubConfig {
    HubConfig {
        data_dir: dir.to_path_buf(),
        tier,
        regions: regions.iter().map(|r| region(r)).collect(),
        tenants: tenants
            .iter()
            .map(|(t, r)| TenantConfig {
                id: t.parse().unwrap(),
                region: region(r),
            })
            .collect(),
        sync_listen: "127.0.0.1:0".parse().unwrap(),
        ..HubConfig::default()
    }
}

async fn start(c: HubConfig, clock: &Arc<ManualClock>) -> Hub {
    let mut o = ServeOptions::new(c);
    o.http = false;
    Hub::start(o, clock.clone() as Arc<dyn Clock>)
        .await
        .unwrap()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eu_hub_refuses_us_tenant_edge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sk = keys::create(&dir.join("hub.key")).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    // An operator enrols a US-tenant edge offline by mistake; the hub must still refuse it.
    let us_key = NodeKey::from_bytes([50; 32]);
    let req = TokenRequest {
        tenant: "yankee".parse().unwrap(),
        site: "s1".parse().unwrap(),
        role: Role::Edge,
        ttl_ms: 60_000,
    };
    let (tok, _) = tokens::issue(&sk, &req, clock.now()).unwrap();
    Registry::open(JsonFileStore::new(dir.join("registry.json")), sk.clone())
        .unwrap()
        .enrol(&tok, us_key.public(), clock.now())
        .unwrap();
    let hub = start(
        cfg(
            dir,
            HubTier::Regional,
            &["eu"],
            &[("acme", "eu"), ("yankee", "us")],
        ),
        &clock,
    )
    .await;
    let mut events = hub.node().subscribe();
    let store = Arc::new(DocStore::in_memory(us_key.clone()));
    let info = PeerInfo {
        key: us_key.public(),
        role: Role::Edge,
        tenant: "yankee".parse().ok(),
        site: "s1".parse().ok(),
    };
    let dirx = Arc::new(RegistryDirectory::new(hub.endpoint_id()).unwrap());
    let edge = SyncNode::spawn(
        &us_key,
        store.clone(),
        Arc::new(Authz::new(info, None)),
        dirx,
        DriverConfig::default(),
    )
    .await
    .unwrap();
    edge.dial(hub.endpoint_id(), hub.sync_addr().unwrap())
        .unwrap();
    let mut reason = None;
    wait_for("the EU hub refuses the US edge", || {
        while let Ok(e) = events.try_recv() {
            if let NodeEvent::Refused { peer, reason: r } = e
                && peer == us_key.public()
            {
                reason = Some(r);
            }
        }
        reason.is_some()
    })
    .await;
    let reason = reason.unwrap();
    assert!(reason.contains("not served"), "{reason}");
    assert!(store.list().is_empty(), "the US edge received documents");
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_hub_receives_only_aggregates_from_two_regional_hubs() {
    let clock = Arc::new(ManualClock::new(T0));
    let (g_dir, eu_dir, us_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let g_sk = keys::create(&g_dir.path().join("hub.key")).unwrap();
    let eu_id = keys::endpoint_key(&keys::create(&eu_dir.path().join("hub.key")).unwrap());
    let us_id = keys::endpoint_key(&keys::create(&us_dir.path().join("hub.key")).unwrap());
    // `cloud-hub node add-hub` for both regional hubs on the global hub.
    let mut reg = Registry::open(
        JsonFileStore::new(g_dir.path().join("registry.json")),
        g_sk.clone(),
    )
    .unwrap();
    reg.add_hub(eu_id, clock.now()).unwrap();
    reg.add_hub(us_id, clock.now()).unwrap();
    let global = start(
        cfg(g_dir.path(), HubTier::Global, &["eu", "us"], &[]),
        &clock,
    )
    .await;
    let upstream = PeerConfig {
        endpoint_id: global.endpoint_id(),
        addr: global.sync_addr().unwrap(),
    };
    let mut eu_cfg = cfg(eu_dir.path(), HubTier::Regional, &["eu"], &[("acme", "eu")]);
    eu_cfg.upstream = Some(upstream.clone());
    let mut us_cfg = cfg(
        us_dir.path(),
        HubTier::Regional,
        &["us"],
        &[("yankee", "us")],
    );
    us_cfg.upstream = Some(upstream);
    let eu = start(eu_cfg, &clock).await;
    let us = start(us_cfg, &clock).await;

    // Each regional hub holds site documents and one aggregate.
    let mut aggs = Vec::new();
    for (hub, tenant) in [(&eu, "acme"), (&us, "yankee")] {
        let agg: DocId = format!("t/{tenant}/agg/{DAY}").parse().unwrap();
        let dev: DocId = format!("t/{tenant}/s/s1/dev/pump").parse().unwrap();
        for id in [&agg, &dev] {
            hub.store()
                .change(id, clock.now(), |d| {
                    sync_core::docs::put_root_json(d, "note", &format!("{id}"))
                })
                .unwrap();
        }
        aggs.push(agg);
    }
    wait_for("the global hub holds both aggregates", || {
        aggs.iter().all(|a| global.store().contains(a))
    })
    .await;
    // Out-of-scope documents are never offered (authz on both ends), so once the
    // aggregates are there, nothing else may be.
    for id in global.store().list() {
        assert!(
            id.kind() == DocKind::Aggregate || id == DocId::Identity,
            "global hub holds {id}"
        );
    }
    // Its fleet/identity is its own registry, not a regional hub's.
    let own = global.directory().seq();
    let d = RegistryDirectory::new(global.endpoint_id()).unwrap();
    assert_eq!(d.load_from_store(global.store()).unwrap(), own);
    for h in [us, eu, global] {
        h.shutdown().await;
    }
}

fn doc_ids() -> Vec<DocId> {
    let mut v: Vec<DocId> = vec![DocId::Identity];
    for t in ["acme", "beta"] {
        v.push(format!("t/{t}/policy").parse().unwrap());
        v.push(format!("t/{t}/agg/{DAY}").parse().unwrap());
        for s in ["s1", "s2"] {
            for k in [
                "dev/pump".to_string(),
                format!("tel/pump/{DAY}"),
                format!("cmd/{DAY}"),
                format!("alarms/{DAY}"),
                "site".to_string(),
            ] {
                if let Ok(id) = format!("t/{t}/s/{s}/{k}").parse() {
                    v.push(id);
                }
            }
        }
    }
    v
}

fn node(seed: u8, role: Role, tenant: &str, site: &str) -> (NodeKey, PeerInfo) {
    let key = NodeKey::from_bytes([seed; 32]);
    let edge = role == Role::Edge;
    let info = PeerInfo {
        key: key.public(),
        role,
        tenant: edge.then(|| tenant.parse().unwrap()),
        site: edge.then(|| site.parse().unwrap()),
    };
    (key, info)
}

/// What `who` may hold, from the policy in words (DESIGN.md), independent of authz's code.
fn allowed(who: &PeerInfo, scope: Option<&HubScope>, doc: &DocId) -> bool {
    match who.role {
        Role::Edge => match doc {
            DocId::Identity => true,
            DocId::Policy { tenant } => Some(tenant) == who.tenant.as_ref(),
            _ if doc.kind() == DocKind::Aggregate => false,
            _ => doc.tenant() == who.tenant.as_ref() && doc.site() == who.site.as_ref(),
        },
        Role::Hub => match scope {
            None => true,
            Some(s) if s.tier == HubTier::Global => doc.kind() == DocKind::Aggregate,
            Some(s) => doc.tenant().is_none_or(|t| s.serves(t)),
        },
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No node ever receives (in scope) or writes (check_change accepts) a document its
    /// policy forbids, for random local/peer roles, tenants, sites, hub scopes and docs.
    #[test]
    fn no_node_receives_or_writes_a_forbidden_document(
        local_role in prop::sample::select(vec![Role::Edge, Role::Hub]),
        peer_role in prop::sample::select(vec![Role::Edge, Role::Hub, Role::Operator]),
        lt in prop::sample::select(vec!["acme", "beta"]),
        pt in prop::sample::select(vec!["acme", "beta"]),
        ls in prop::sample::select(vec!["s1", "s2"]),
        ps in prop::sample::select(vec!["s1", "s2"]),
        global in any::<bool>(),
        regions in prop::sample::subsequence(vec!["eu", "us"], 0..=2),
        doc_ix in 0usize..64,
    ) {
        let docs = doc_ids();
        let doc = docs[doc_ix % docs.len()].clone();
        let (_, local) = node(1, local_role, lt, ls);
        let (pkey, peer) = node(2, peer_role, pt, ps);
        let scope = (local_role == Role::Hub).then(|| HubScope {
            tier: if global { HubTier::Global } else { HubTier::Regional },
            regions: regions.iter().map(|r| region(r)).collect(),
            tenant_regions: [("acme".parse().unwrap(), region("eu")), ("beta".parse().unwrap(), region("us"))].into(),
        });
        let authz = Authz::new(local.clone(), scope.clone());
        let in_scope = authz.in_scope(&peer, &doc);
        if in_scope {
            prop_assert!(allowed(&local, scope.as_ref(), &doc), "local may not hold {doc}");
            prop_assert!(allowed(&peer, None, &doc), "peer may not hold {doc}");
            if local.role == Role::Hub && peer.role == Role::Hub {
                prop_assert_eq!(doc.kind(), DocKind::Aggregate);
            }
        }
        // A change to `doc` authored and signed by the peer itself.
        let mut d = automerge::AutoCommit::new().with_actor(pkey.new_actor());
        d.put(automerge::ROOT, "x", 1).unwrap();
        d.commit();
        let change = d.get_last_local_change().unwrap().clone();
        let sig = pkey.sign(&sync_core::store::change_sign_payload(&change.hash()));
        let ok = authz.check_change(&peer, &doc, &change, &sig, &StaticDirectory::default()).is_ok();
        if ok {
            prop_assert!(in_scope, "accepted a change to {doc} outside the scope");
            prop_assert!(doc.kind().may_write(peer.role), "a {} wrote {doc}", peer.role);
        }
        // A forged signature is never accepted.
        let mut bad = sig;
        bad[0] ^= 1;
        prop_assert!(authz.check_change(&peer, &doc, &change, &bad, &StaticDirectory::default()).is_err());
        // A change by an unknown third key is never accepted.
        let stranger = NodeKey::from_bytes([3; 32]);
        let mut d3 = automerge::AutoCommit::new().with_actor(stranger.new_actor());
        d3.put(automerge::ROOT, "x", 2).unwrap();
        d3.commit();
        let c3 = d3.get_last_local_change().unwrap().clone();
        let s3 = stranger.sign(&sync_core::store::change_sign_payload(&c3.hash()));
        prop_assert!(authz.check_change(&peer, &doc, &c3, &s3, &StaticDirectory::default()).is_err());
        let _: EndpointKey = peer.key;
    }
}
