//! `sync-bench`: figures of the sync stack over iroh on loopback, printed as
//! a table. Run with `cargo run --release -p sync-core --bin sync-bench`.
//!
//! Every figure is a median (or p99) of repeated measurements, and each has
//! a baseline measured in the same run: automerge's own sync between two
//! in-memory documents (no store, no signatures, no network).

use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync::SyncDoc;
use schemas::device::FieldValue;
use schemas::ids::{DocId, Role};
use schemas::policy::{HubTier, Region};
use schemas::time::Timestamp;
use sync_core::authz::{Authz, HubScope, PeerInfo, StaticDirectory};
use sync_core::docs::{self, device};
use sync_core::driver::{DriverConfig, SyncNode};
use sync_core::identity::NodeKey;
use sync_core::store::DocStore;

const NOW: Timestamp = Timestamp(1_800_000_000_000);

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Fleet {
    hub: SyncNode,
    dir: Arc<StaticDirectory>,
    infos: [PeerInfo; 2],
}

fn key(n: u8) -> NodeKey {
    NodeKey::from_bytes([n; 32])
}

async fn fleet() -> anyhow::Result<Fleet> {
    let hub_i = PeerInfo {
        key: key(1).public(),
        role: Role::Hub,
        tenant: None,
        site: None,
    };
    let edge_i = PeerInfo {
        key: key(2).public(),
        role: Role::Edge,
        tenant: "acme".parse().ok(),
        site: "s1".parse().ok(),
    };
    let mut d = StaticDirectory::default();
    d.insert(hub_i.clone());
    d.insert(edge_i.clone());
    let dir = Arc::new(d);
    let eu = Region::new("eu")?;
    let scope = HubScope {
        tier: HubTier::Regional,
        regions: vec![eu.clone()],
        tenant_regions: [("acme".parse()?, eu)].into(),
    };
    let hub = SyncNode::spawn(
        &key(1),
        Arc::new(DocStore::in_memory(key(1))),
        Arc::new(Authz::new(hub_i.clone(), Some(scope))),
        dir.clone(),
        DriverConfig::default(),
    )
    .await?;
    Ok(Fleet {
        hub,
        dir,
        infos: [hub_i, edge_i],
    })
}

async fn edge(f: &Fleet, store: Arc<DocStore>) -> anyhow::Result<SyncNode> {
    let n = SyncNode::spawn(
        &key(2),
        store,
        Arc::new(Authz::new(f.infos[1].clone(), None)),
        f.dir.clone(),
        DriverConfig::default(),
    )
    .await?;
    let addr = f
        .hub
        .local_addrs()
        .into_iter()
        .find(|a| a.is_ipv4())
        .ok_or_else(|| anyhow::anyhow!("hub has no ipv4 address"))?;
    n.dial(f.hub.endpoint_id(), addr)?;
    Ok(n)
}

async fn wait(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

fn dev(i: usize) -> DocId {
    format!("t/acme/s/s1/dev/d{i:05}")
        .parse()
        .unwrap_or(DocId::Identity)
}

/// Baseline: edit-to-apply latency and bytes of automerge's own sync,
/// in memory.
fn baseline(edits: usize) -> (Vec<f64>, f64, f64) {
    let id = dev(0);
    let mut a = docs::genesis(&id).with_actor(automerge::ActorId::from(vec![1u8; 40]));
    let mut b = docs::genesis(&id).with_actor(automerge::ActorId::from(vec![2u8; 40]));
    let (mut sa, mut sb) = (automerge::sync::State::new(), automerge::sync::State::new());
    let mut lat = Vec::new();
    let mut bytes = 0usize;
    let mut change_bytes = 0usize;
    for i in 0..edits {
        let t = Instant::now();
        let _ = device::set_desired(&mut a, "setpoint", &FieldValue::Number(i as f64));
        a.commit();
        if let Some(c) = a.get_changes(&[]).last() {
            change_bytes += c.raw_bytes().len();
        }
        for _ in 0..4 {
            let m1 = a.sync().generate_sync_message(&mut sa);
            if let Some(m) = m1.clone() {
                let e = m.encode();
                bytes += e.len();
                if let Ok(m) = automerge::sync::Message::decode(&e) {
                    let _ = b.sync().receive_sync_message(&mut sb, m);
                }
            }
            let m2 = b.sync().generate_sync_message(&mut sb);
            if let Some(m) = m2.clone() {
                let e = m.encode();
                if let Ok(m) = automerge::sync::Message::decode(&e) {
                    let _ = a.sync().receive_sync_message(&mut sa, m);
                }
            }
            if m1.is_none() && m2.is_none() {
                break;
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (
        lat,
        bytes as f64 / edits as f64,
        change_bytes as f64 / edits as f64,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let edits: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let docs_n: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    eprintln!("sync-bench: {edits} edits, {docs_n} documents (args: [edits] [docs])");

    let (mut base_lat, base_bytes, change_bytes) = baseline(edits);

    let f = fleet().await?;
    let e_store = Arc::new(DocStore::in_memory(key(2)));
    let hub_key = key(1).public();

    // Initial sync throughput: the hub holds docs_n documents of 10 changes.
    for i in 0..docs_n {
        for j in 0..10 {
            f.hub.store().change(&dev(i), NOW, |d| {
                device::set_desired(d, "setpoint", &FieldValue::Number(j as f64))
            })?;
        }
    }
    let t = Instant::now();
    let e = edge(&f, e_store.clone()).await?;
    wait("initial sync", || {
        (0..docs_n).all(|i| {
            e_store.heads(&dev(i)).is_some()
                && e_store.heads(&dev(i)) == f.hub.store().heads(&dev(i))
        })
    })
    .await?;
    let init_secs = t.elapsed().as_secs_f64();
    let init_bytes = e
        .status()
        .get(&hub_key)
        .map_or(0, |s| s.stats.bytes_received + s.stats.bytes_sent);

    // Edit-to-remote-apply latency and bytes per small change.
    let id = dev(0);
    let mut lat = Vec::new();
    let before = e
        .status()
        .get(&hub_key)
        .map_or(0, |s| s.stats.bytes_received + s.stats.bytes_sent);
    for i in 0..edits {
        let t = Instant::now();
        f.hub.store().change(&id, NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(100.0 + (i % 500) as f64))
        })?;
        let want = f.hub.store().heads(&id);
        wait("edit", || e_store.heads(&id) == want).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Let the last acknowledgements settle before reading counters.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = e
        .status()
        .get(&hub_key)
        .map_or(0, |s| s.stats.bytes_received + s.stats.bytes_sent);
    let wire_per_edit = (after - before) as f64 / edits as f64;
    e.shutdown().await;

    // Reconnect with nothing changed.
    let e = edge(&f, e_store.clone()).await?;
    wait("reconnect", || {
        e.status()
            .get(&hub_key)
            .is_some_and(|s| s.last_sync.is_some())
    })
    .await?;
    let s = e
        .status()
        .get(&hub_key)
        .map(|s| s.stats)
        .unwrap_or_default();
    let reconnect = (s.bytes_sent + s.bytes_received) as f64;
    e.shutdown().await;

    // Memory per loaded document: load every document of a fresh store.
    let rss0 = rss_kb();
    let mem_store = DocStore::in_memory(key(3));
    for i in 0..docs_n {
        mem_store.change(&dev(i), NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(i as f64))
        })?;
    }
    let rss1 = rss_kb();
    let per_doc_kb = (rss1.saturating_sub(rss0)) as f64 / docs_n as f64;

    println!("| figure | fieldsync over iroh | baseline (automerge in memory) | ratio |");
    println!("|---|---|---|---|");
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let (b50, b99) = (pct(&mut base_lat, 0.5), pct(&mut base_lat, 0.99));
    println!(
        "| edit-to-remote-apply p50 | {:.0} us | {b50:.0} us | {:.1}x |",
        p50,
        p50 / b50
    );
    println!(
        "| edit-to-remote-apply p99 | {:.0} us | {b99:.0} us | {:.1}x |",
        p99,
        p99 / b99
    );
    println!(
        "| bytes on the wire per small change (both directions) | {wire_per_edit:.0} B | {base_bytes:.0} B (sync message) | {:.1}x |",
        wire_per_edit / base_bytes
    );
    println!(
        "| automerge change size | {change_bytes:.0} B | | wire/change {:.1}x |",
        wire_per_edit / change_bytes
    );
    println!(
        "| reconnect, {docs_n} unchanged documents | {reconnect:.0} B ({:.2} B/doc) | | |",
        reconnect / docs_n as f64
    );
    println!(
        "| initial sync, {docs_n} docs x 10 changes | {:.0} docs/s, {:.2} MB/s ({init_bytes} B in {init_secs:.2} s) | | |",
        docs_n as f64 / init_secs,
        init_bytes as f64 / init_secs / 1e6
    );
    println!("| memory per loaded document (RSS delta) | {per_doc_kb:.1} KiB | | |");
    f.hub.shutdown().await;
    Ok(())
}
