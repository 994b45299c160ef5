//! Enrolment over real iroh on loopback: a token works once, refusals carry
//! their reason, the registry binds the key that presented the token, and a
//! site peer's `RegistryDirectory` follows the synced `fleet/identity` doc.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use schemas::identity::{EndpointKey, IdentityRecord};
use schemas::ids::{DocId, Role};
use schemas::policy::{HubTier, Region};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;
use sync_core::authz::{Authz, Directory, HubScope, PeerInfo};
use sync_core::driver::{DriverConfig, SyncNode};
use sync_core::enrol::{ENROL_ALPN, EnrolError, EnrolHandler, Enroller, enrol};
use sync_core::identity::NodeKey;
use sync_core::registry::{IDENTITY_DOC_KEY, RegistryDirectory, RegistrySnapshot, SignedRegistry};
use sync_core::store::DocStore;
use tokio::time::Instant;

const NOW: Timestamp = Timestamp(1_800_000_000_000);

/// A toy hub: tokens are plain strings naming a site; each works once.
struct ToyHub {
    key: SigningKey,
    valid: BTreeMap<String, &'static str>,
    used: Mutex<BTreeSet<String>>,
    records: Mutex<Vec<IdentityRecord>>,
    store: Arc<DocStore>,
    dir: Arc<RegistryDirectory>,
}

impl Enroller for ToyHub {
    fn enrol(&self, token: &str, endpoint: EndpointKey) -> Result<SignedRegistry, String> {
        let Some(site) = self.valid.get(token) else {
            return Err("forged token: signature does not verify".into());
        };
        if !self.used.lock().unwrap().insert(token.to_string()) {
            return Err("token already used".into());
        }
        let mut recs = self.records.lock().unwrap();
        recs.push(IdentityRecord {
            schema_version: SchemaVersion::default(),
            endpoint_id: endpoint,
            tenant: "acme".parse().ok(),
            site: site.parse().ok(),
            role: Role::Edge,
            enrolled_at: NOW,
            revoked_at: None,
            revoked_reason: None,
        });
        let signed = RegistrySnapshot {
            schema_version: SchemaVersion::default(),
            issuer: EndpointKey(self.key.verifying_key().to_bytes()),
            seq: recs.len() as u64,
            records: recs.clone(),
        }
        .sign(&self.key);
        self.dir.apply(&signed).map_err(|e| e.to_string())?;
        self.store
            .change(&DocId::Identity, NOW, |doc| {
                sync_core::docs::put_root_json(doc, IDENTITY_DOC_KEY, &signed)
            })
            .map_err(|e| e.to_string())?;
        Ok(signed)
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

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn addr(n: &SyncNode) -> std::net::SocketAddr {
    n.local_addrs().into_iter().find(|a| a.is_ipv4()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_enrols_once_binds_the_presenting_key_and_reaches_site_peers() {
    let hub_key = NodeKey::from_bytes([1; 32]);
    let hub_store = Arc::new(DocStore::in_memory(hub_key.clone()));
    let hub_dir = Arc::new(RegistryDirectory::new(hub_key.public()).unwrap());
    let toy = Arc::new(ToyHub {
        key: hub_key.signing_key().clone(),
        valid: [("tok-a".to_string(), "s1"), ("tok-b".to_string(), "s1")].into(),
        used: Mutex::default(),
        records: Mutex::default(),
        store: hub_store.clone(),
        dir: hub_dir.clone(),
    });
    let hub_authz = Arc::new(Authz::new(
        PeerInfo {
            key: hub_key.public(),
            role: Role::Hub,
            tenant: None,
            site: None,
        },
        Some(hub_scope()),
    ));
    let handler = EnrolHandler::new(toy.clone());
    let hub = SyncNode::spawn_with(
        &hub_key,
        hub_store.clone(),
        hub_authz,
        hub_dir.clone(),
        DriverConfig::default(),
        &[ENROL_ALPN],
        |b| b.accept(ENROL_ALPN, handler),
    )
    .await
    .unwrap();

    // Two edges of site s1, each with a RegistryDirectory fed from its store.
    let mut edges = Vec::new();
    for n in [2u8, 3] {
        let k = NodeKey::from_bytes([n; 32]);
        let store = Arc::new(DocStore::in_memory(k.clone()));
        let dir = Arc::new(RegistryDirectory::new(hub_key.public()).unwrap());
        let follow = dir.clone().follow(store.clone());
        let info = PeerInfo {
            key: k.public(),
            role: Role::Edge,
            tenant: "acme".parse().ok(),
            site: "s1".parse().ok(),
        };
        let node = SyncNode::spawn(
            &k,
            store,
            Arc::new(Authz::new(info, None)),
            dir.clone(),
            DriverConfig::default(),
        )
        .await
        .unwrap();
        edges.push((k, node, dir, follow));
    }

    // Edge 2 enrols; the answer verifies and lists exactly the presenting key.
    let signed = enrol(edges[0].1.endpoint(), hub_key.public(), addr(&hub), "tok-a")
        .await
        .unwrap();
    let snap = signed
        .verify(&ed25519_dalek::VerifyingKey::from_bytes(&hub_key.public().0).unwrap())
        .unwrap();
    assert_eq!(snap.records.len(), 1);
    assert_eq!(snap.records[0].endpoint_id, edges[0].0.public());

    // The same token again, from another key: refused with the reason.
    match enrol(edges[1].1.endpoint(), hub_key.public(), addr(&hub), "tok-a").await {
        Err(EnrolError::Refused(r)) => assert!(r.contains("already used"), "{r}"),
        other => panic!("reused token accepted: {other:?}"),
    }
    match enrol(
        edges[1].1.endpoint(),
        hub_key.public(),
        addr(&hub),
        "tok-forged",
    )
    .await
    {
        Err(EnrolError::Refused(r)) => assert!(r.contains("forged"), "{r}"),
        other => panic!("forged token accepted: {other:?}"),
    }
    // An oversized token never leaves the client.
    let big = "x".repeat(5000);
    assert!(matches!(
        enrol(edges[1].1.endpoint(), hub_key.public(), addr(&hub), &big).await,
        Err(EnrolError::TokenSize { len: 5000 })
    ));
    // Edge 3 enrols with its own token.
    enrol(edges[1].1.endpoint(), hub_key.public(), addr(&hub), "tok-b")
        .await
        .unwrap();

    // Both edges dial the hub; each learns the registry through fleet/identity.
    for (_, node, _, _) in &edges {
        node.dial(hub_key.public(), addr(&hub)).unwrap();
    }
    let (k2, k3) = (edges[0].0.public(), edges[1].0.public());
    wait_for("edges adopt registry seq 2", || {
        edges.iter().all(|(_, _, d, _)| d.seq() == Some(2))
    })
    .await;
    assert_eq!(edges[0].2.lookup(&k3).map(|p| p.role), Some(Role::Edge));
    assert_eq!(edges[1].2.lookup(&k2).map(|p| p.role), Some(Role::Edge));
    assert!(
        edges[0]
            .2
            .lookup(&NodeKey::from_bytes([7; 32]).public())
            .is_none()
    );

    for (_, node, _, follow) in edges {
        follow.abort();
        node.shutdown().await;
    }
    hub.shutdown().await;
}
