//! `cloud-hub serve` over real iroh on loopback: unknown keys refused, enrolment once per
//! token with reasons, live revocation (disconnect within 5 s, reconnect refused, a site
//! peer refuses without the hub), refusal audit, `audit verify`; and the binary end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cloud_hub::api::{Clock, ManualClock};
use cloud_hub::audit::{self, AuditLog, AuditRecord};
use cloud_hub::hub::{Hub, ServeOptions};
use cloud_hub::keys;
use cloud_hub::registry::{JsonFileStore, Registry};
use cloud_hub::tokens::{self, TokenRequest};
use ed25519_dalek::SigningKey;
use schemas::config::{HubConfig, TenantConfig};
use schemas::device::FieldValue;
use schemas::identity::EndpointKey;
use schemas::ids::{DocId, Role};
use schemas::policy::Region;
use schemas::time::Timestamp;
use sync_core::authz::{Authz, Directory, PeerInfo};
use sync_core::driver::{DriverConfig, NodeEvent, SyncNode};
use sync_core::enrol::{EnrolError, enrol};
use sync_core::identity::NodeKey;
use sync_core::registry::RegistryDirectory;
use sync_core::store::DocStore;
use tokio::time::Instant;

const T0: i64 = 1_800_000_000_000;

fn hub_config(dir: &Path) -> HubConfig {
    HubConfig {
        data_dir: dir.to_path_buf(),
        regions: vec![Region::new("eu").unwrap()],
        tenants: vec![
            TenantConfig {
                id: "acme".parse().unwrap(),
                region: Region::new("eu").unwrap(),
            },
            TenantConfig {
                id: "yankee".parse().unwrap(),
                region: Region::new("us").unwrap(),
            },
        ],
        sync_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        ..HubConfig::default()
    }
}

fn token(key: &SigningKey, tenant: &str, site: &str, ttl_ms: i64, now: Timestamp) -> String {
    let req = TokenRequest {
        tenant: tenant.parse().unwrap(),
        site: site.parse().unwrap(),
        role: Role::Edge,
        ttl_ms,
    };
    tokens::issue(key, &req, now).unwrap().0
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

struct Edge {
    key: NodeKey,
    node: SyncNode,
    dir: Arc<RegistryDirectory>,
    follow: tokio::task::JoinHandle<()>,
}

impl Edge {
    async fn start(key: NodeKey, hub: EndpointKey, tenant: &str, site: &str) -> Edge {
        let store = Arc::new(DocStore::in_memory(key.clone()));
        let dir = Arc::new(RegistryDirectory::new(hub).unwrap());
        let follow = dir.clone().follow(store.clone());
        let info = PeerInfo {
            key: key.public(),
            role: Role::Edge,
            tenant: tenant.parse().ok(),
            site: site.parse().ok(),
        };
        let node = SyncNode::spawn(
            &key,
            store,
            Arc::new(Authz::new(info, None)),
            dir.clone(),
            DriverConfig::default(),
        )
        .await
        .unwrap();
        Edge {
            key,
            node,
            dir,
            follow,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.node
            .local_addrs()
            .into_iter()
            .find(|a| a.is_ipv4())
            .unwrap()
    }

    async fn stop(self) {
        self.follow.abort();
        self.node.shutdown().await;
    }
}

fn refused_by(events: &mut tokio::sync::broadcast::Receiver<NodeEvent>, who: EndpointKey) -> bool {
    while let Ok(e) = events.try_recv() {
        if let NodeEvent::Refused { peer, .. } = e
            && peer == who
        {
            return true;
        }
    }
    false
}

/// What the CLI's `node revoke` does: lock the audit log, edit the registry file, audit.
fn revoke_offline(dir: &Path, key: &SigningKey, id: EndpointKey, now: Timestamp) {
    let (mut log, _) = AuditLog::open_wait(&dir.join("audit.log"), key.clone(), now).unwrap();
    let mut reg =
        Registry::open(JsonFileStore::new(dir.join("registry.json")), key.clone()).unwrap();
    reg.revoke(&id, "stolen laptop", now).unwrap();
    log.append(
        &AuditRecord {
            actor: "test".into(),
            action: "node.revoke".into(),
            target: id.to_string(),
            reason: "stolen laptop".into(),
            details: String::new(),
        },
        now,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_sync_revoke_refuse_and_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let hub_sk = keys::create(&dir.join("hub.key")).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let mut opts = ServeOptions::new(hub_config(dir));
    opts.http = false;
    let hub = Hub::start(opts, clock.clone() as Arc<dyn Clock>)
        .await
        .unwrap();
    let hub_id = hub.endpoint_id();
    let hub_addr = hub.sync_addr().unwrap();
    let mut hub_events = hub.node().subscribe();

    // An unknown key is refused and receives no document bytes.
    let stranger = Edge::start(NodeKey::from_bytes([30; 32]), hub_id, "acme", "s1").await;
    stranger.node.dial(hub_id, hub_addr).unwrap();
    wait_for("hub refuses the stranger", 10, || {
        refused_by(&mut hub_events, stranger.key.public())
    })
    .await;
    assert!(
        stranger.node.store().list().is_empty(),
        "stranger received documents"
    );
    // The dialer may count itself connected for the moment between its
    // handshake and the hub's close: wait for the close, then check that
    // not one byte arrived.
    wait_for("the stranger's connection is closed", 10, || {
        stranger.node.status().values().all(|s| !s.connected)
    })
    .await;
    assert!(
        stranger
            .node
            .status()
            .values()
            .all(|s| s.stats.bytes_received == 0)
    );

    // Enrolment: good token once; reused, expired, forged, out-of-region refused.
    let a = Edge::start(NodeKey::from_bytes([31; 32]), hub_id, "acme", "s1").await;
    let b = Edge::start(NodeKey::from_bytes([32; 32]), hub_id, "acme", "s1").await;
    let now = clock.now();
    let tok_a = token(&hub_sk, "acme", "s1", 3_600_000, now);
    enrol(a.node.endpoint(), hub_id, hub_addr, &tok_a)
        .await
        .unwrap();
    let refusal = |r: Result<_, EnrolError>| match r {
        Err(EnrolError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let r = refusal(enrol(b.node.endpoint(), hub_id, hub_addr, &tok_a).await);
    assert!(r.starts_with("reused"), "{r}");
    let short = token(&hub_sk, "acme", "s1", 60_000, now);
    clock.advance(120_000);
    let r = refusal(enrol(b.node.endpoint(), hub_id, hub_addr, &short).await);
    assert!(r.starts_with("expired"), "{r}");
    let forged = token(
        &SigningKey::from_bytes(&[99; 32]),
        "acme",
        "s1",
        3_600_000,
        clock.now(),
    );
    let r = refusal(enrol(b.node.endpoint(), hub_id, hub_addr, &forged).await);
    assert!(r.starts_with("forged"), "{r}");
    let r = refusal(enrol(b.node.endpoint(), hub_id, hub_addr, "fsj1.garbage").await);
    assert!(r.starts_with("malformed"), "{r}");
    let us = token(&hub_sk, "yankee", "s9", 3_600_000, clock.now());
    let r = refusal(enrol(b.node.endpoint(), hub_id, hub_addr, &us).await);
    assert!(r.starts_with("compliance"), "{r}");
    enrol(
        b.node.endpoint(),
        hub_id,
        hub_addr,
        &token(&hub_sk, "acme", "s1", 3_600_000, clock.now()),
    )
    .await
    .unwrap();
    assert!(hub.directory().lookup(&b.key.public()).is_some());

    // Both edges sync with the hub and learn the registry through fleet/identity.
    a.node.dial(hub_id, hub_addr).unwrap();
    b.node.dial(hub_id, hub_addr).unwrap();
    let seq = hub.directory().seq();
    wait_for("edges adopt the registry", 10, || {
        a.dir.seq() == seq && b.dir.seq() == seq
    })
    .await;
    assert!(a.dir.lookup(&b.key.public()).is_some());
    let dev: DocId = "t/acme/s/s1/dev/pump".parse().unwrap();
    a.node
        .store()
        .change(&dev, clock.now(), |d| {
            sync_core::docs::device::set_desired(d, "setpoint", &FieldValue::Number(21.0))
        })
        .unwrap();
    wait_for("hub and b receive a's device doc", 10, || {
        hub.store().contains(&dev) && b.node.store().contains(&dev)
    })
    .await;

    // Revoke b the way the CLI does, while the hub serves.
    let b_key = b.key.public();
    wait_for("b connected", 10, || {
        hub.node().status().get(&b_key).is_some_and(|s| s.connected)
    })
    .await;
    let mut hub_events = hub.node().subscribe();
    revoke_offline(dir, &hub_sk, b_key, clock.now());
    let took = wait_for("b disconnected", 5, || {
        !hub.node().status().get(&b_key).is_some_and(|s| s.connected)
    })
    .await;
    eprintln!("revoked node disconnected after {took:?}");
    wait_for("b's reconnect refused", 10, || {
        refused_by(&mut hub_events, b_key)
    })
    .await;
    assert!(!hub.node().status().get(&b_key).is_some_and(|s| s.connected));
    // The revocation reaches the site peer.
    wait_for("a learns the revocation", 10, || {
        a.dir.lookup(&b_key).is_none()
    })
    .await;
    b.stop().await;

    // With the hub stopped, a restarted b is refused by its site peer a.
    hub.shutdown().await;
    let mut a_events = a.node.subscribe();
    let b2 = Edge::start(NodeKey::from_bytes([32; 32]), hub_id, "acme", "s1").await;
    // b2 has no registry; give it one that still lists b as active (the old one it had).
    b2.dir
        .apply(&{
            let reg = Registry::open(
                JsonFileStore::new(dir.join("registry.json")),
                hub_sk.clone(),
            )
            .unwrap();
            let mut snap = reg
                .signed_snapshot()
                .verify(&hub_sk.verifying_key())
                .unwrap();
            for r in &mut snap.records {
                r.revoked_at = None;
            }
            snap.seq -= 1;
            snap.sign(&hub_sk)
        })
        .unwrap();
    b2.node.dial(a.key.public(), a.addr()).unwrap();
    wait_for("site peer a refuses revoked b", 10, || {
        refused_by(&mut a_events, b_key)
    })
    .await;
    assert!(
        !b2.node.store().contains(&dev),
        "revoked node received a site document"
    );
    b2.stop().await;
    a.stop().await;
    stranger.stop().await;

    // The audit log tells the story and verifies; tampering is detected.
    let log = dir.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    for action in [
        "\"hub.serve\"",
        "\"node.enrol\"",
        "\"enrol.refused\"",
        "\"sync.refused_connection\"",
        "\"node.revoke\"",
        "\"node.disconnect\"",
        "\"hub.stop\"",
    ] {
        assert!(text.contains(action), "audit log lacks {action}:\n{text}");
    }
    let vk = hub_sk.verifying_key();
    let report = audit::verify(&log, &vk).unwrap();
    assert!(report.finding.is_none(), "{:?}", report.finding);
    assert!(report.verified >= 8, "{}", report.verified);
    std::fs::write(&log, text.replacen("stolen laptop", "stolen laptoP", 1)).unwrap();
    let report = audit::verify(&log, &vk).unwrap();
    assert!(
        report.finding.is_some_and(|f| f.is_tampering()),
        "tampering not detected"
    );
}

/// Kills the child hub if the test panics before it exits (a no-op once it has exited).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// Read stdout lines of `child` until one starts with `ready`, bounded.
fn ready_line(child: &mut std::process::Child) -> String {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ready ") {
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("no ready line within 30 s")
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binary_ready_enrol_revoke_sigterm() {
    let bin = env!("CARGO_BIN_EXE_cloud-hub");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = dir.join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nregions = [\"eu\"]\nsync_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
             [[tenants]]\nid = \"acme\"\nregion = \"eu\"\n",
            dir.display().to_string()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let hub_id: EndpointKey = run(&["init"]).trim().parse().unwrap();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let _guard = KillOnDrop(child.id());
    let line = ready_line(&mut child);
    assert_eq!(field(&line, "hub"), hub_id.to_string(), "{line}");
    let sync: SocketAddr = field(&line, "sync").parse().unwrap();
    let http = field(&line, "http");
    assert!(http.starts_with("http://127.0.0.1:"), "{line}");

    let tok = run(&[
        "token", "create", "--tenant", "acme", "--site", "s1", "--ttl", "10m",
    ]);
    let edge = Edge::start(NodeKey::from_bytes([40; 32]), hub_id, "acme", "s1").await;
    let reg = enrol(edge.node.endpoint(), hub_id, sync, tok.trim())
        .await
        .unwrap();
    assert!(reg.payload.contains(&edge.key.public().to_string()));
    edge.node.dial(hub_id, sync).unwrap();
    wait_for("edge gets fleet/identity from the child hub", 15, || {
        edge.dir.seq() == Some(1)
    })
    .await;
    // Revocation through the CLI while serve runs cuts the edge off within 5 s.
    run(&[
        "node",
        "revoke",
        &edge.key.public().to_string(),
        "--reason",
        "decommissioned",
    ]);
    wait_for("the hub closes the revoked edge's connection", 5, || {
        edge.node
            .status()
            .get(&hub_id)
            .and_then(|s| s.last_error.clone())
            .is_some_and(|e| e.contains("revoked"))
    })
    .await;
    edge.stop().await;

    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("serve did not exit within 20 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "serve exit status {status:?}");
    let verify = run(&["audit", "verify"]);
    assert!(verify.starts_with("ok:"), "{verify}");
}

/// A flood of unknown keys: every refusal the node reports is in the audit
/// log, as its own entry or inside a pooled entry's count, and the pooled
/// table keeps the number of fsynced entries far below the number of peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_is_audited_in_full_with_few_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    keys::create(&dir.join("hub.key")).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let mut opts = ServeOptions::new(hub_config(dir));
    opts.http = false;
    opts.refusal_peers = 3;
    let hub = Hub::start(opts, clock.clone() as Arc<dyn Clock>)
        .await
        .unwrap();
    let hub_id = hub.endpoint_id();
    let hub_addr = hub.sync_addr().unwrap();
    let mut hub_events = hub.node().subscribe();

    const STRANGERS: u8 = 12;
    let mut strangers = Vec::new();
    for i in 0..STRANGERS {
        let s = Edge::start(NodeKey::from_bytes([60 + i; 32]), hub_id, "acme", "s1").await;
        s.node.dial(hub_id, hub_addr).unwrap();
        strangers.push(s);
    }
    let mut refused = 0u64;
    let mut who = std::collections::BTreeSet::new();
    wait_for("every stranger refused", 20, || {
        while let Ok(e) = hub_events.try_recv() {
            if let NodeEvent::Refused { peer, .. } = e {
                refused += 1;
                who.insert(peer);
            }
        }
        who.len() == usize::from(STRANGERS)
    })
    .await;
    for s in strangers {
        s.stop().await;
    }
    hub.shutdown().await;
    // Everything the node reported, to the end (the channel closes with the node).
    loop {
        match hub_events.try_recv() {
            Ok(NodeEvent::Refused { .. }) => refused += 1,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                panic!("the test's own receiver lagged by {n}")
            }
            Err(_) => break,
        }
    }

    let text = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let mut entries = 0u64;
    let mut counted = 0u64;
    for line in text.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_ne!(e["action"], "sync.refusal_audit_gap", "{line}");
        if e["action"] == "sync.refused_connection" {
            entries += 1;
            let details = e["details"].as_str().unwrap();
            let n: u64 = details
                .trim_start_matches("count=")
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            counted += n;
        }
    }
    assert_eq!(
        counted, refused,
        "refusals reported by the node vs counted in the audit log"
    );
    assert!(
        entries < u64::from(STRANGERS),
        "{entries} entries for {STRANGERS} peers: the peer table did not pool"
    );
}
