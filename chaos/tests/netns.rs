//! Proof that one network namespace per node closes the relay bypass
//! (`chaos/notes/bypass-finding.md`): from inside a node's namespace the
//! other node's real address has no route, while the relay path (on the
//! node's gateway) carries datagrams, and a partition of that relay cuts
//! the pair completely. Then the fleet runner in `netns` mode: nodes start
//! inside their namespaces, the direct-path probes are recorded, and every
//! namespace is gone after the run.
//!
//! Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN). Without it these tests
//! fail, unless `FIELDSYNC_NO_NETNS=1` says to skip them knowingly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chaos::fleet::Isolation;
use chaos::fleet::process::{LogBuffer, NodeProcess};
use chaos::fleet::run::{Fleet, RunOptions};
use chaos::link::{Direction, Relay, RelayConfig};
use chaos::netns::{self, NetnsSet};
use chaos::scenario::Scenario;
use schemas::config::{EdgeConfig, HubConfig};

const CHAOS: &str = env!("CARGO_BIN_EXE_chaos");

/// Whether to run: true if namespaces work; false (skipped, said so) if
/// they do not and `FIELDSYNC_NO_NETNS=1`; a failure otherwise.
fn netns_or_skip(test: &str) -> bool {
    match netns::available() {
        Ok(()) => true,
        Err(e) if std::env::var("FIELDSYNC_NO_NETNS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED {test}: FIELDSYNC_NO_NETNS=1 and no network namespaces here ({e})");
            false
        }
        Err(e) => panic!(
            "{test}: network namespaces are not available ({e}). This test proves that \
             `chaos run` isolates nodes; it needs root or CAP_NET_ADMIN + CAP_SYS_ADMIN. \
             Set FIELDSYNC_NO_NETNS=1 to skip it knowingly."
        ),
    }
}

/// The (dev, inode) of a network namespace handle.
fn ns_id(path: &str) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_relay_connects_two_namespaces_and_a_cut_relay_cuts_them() {
    if !netns_or_skip("only_the_relay_connects_two_namespaces") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A namespace left by a dead run (its pid is in the name) is removed.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = format!("fsc-{dead}-0-0");
    netns::ip(&["netns", "add", &stale]).unwrap();

    let set = NetnsSet::create(2).unwrap();
    assert!(
        !netns::list().unwrap().contains(&stale),
        "stale namespace of dead pid {dead} was not removed"
    );
    let (n0, n1) = (set.node(0).unwrap().clone(), set.node(1).unwrap().clone());
    assert_ne!(n0.gateway, n1.gateway);
    assert!(n0.host_if.len() <= 15, "{}", n0.host_if);

    // An echo server inside node 1's namespace, at node 1's real address.
    let real1 = SocketAddr::from((n1.ip, 4700));
    let server = NodeProcess::start(
        "echo",
        Path::new(CHAOS),
        &[
            "netns-probe".into(),
            "--serve-udp".into(),
            real1.to_string(),
            "--timeout-ms".into(),
            "60000".into(),
        ],
        Some(&n1.ns),
        &dir.path().join("echo.log"),
        LogBuffer::default(),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    // `ip netns exec` execs the program: the child pid is the server
    // itself, inside node 1's namespace (not the root's).
    let pid = server.pid().unwrap();
    let inside = ns_id(&format!("/proc/{pid}/ns/net"));
    assert_eq!(inside, ns_id(&format!("/run/netns/{}", n1.ns)));
    assert_ne!(inside, ns_id("/proc/self/ns/net"));

    // The relay of the pair: its A side on node 0's gateway, B side on
    // node 1's, forwarding to node 1's real address.
    let relay = Relay::spawn(RelayConfig {
        a_side: SocketAddr::from((n0.gateway, 0)),
        b_side: SocketAddr::from((n1.gateway, 0)),
        b_peer: real1,
        a_peer: None,
        seed: 7,
        faults: Default::default(),
    })
    .await
    .unwrap();
    let via = relay.a_side();
    let within = Duration::from_secs(2);

    // From inside node 0: the direct path has no route, the relay works.
    let found = netns::probe_from(
        &n0.ns,
        Path::new(CHAOS),
        &[real1],
        &[real1],
        &[real1, via],
        within,
    )
    .await
    .unwrap();
    let by = |proto: &str, target: SocketAddr| {
        found
            .iter()
            .find(|o| o.proto == proto && o.target == target)
            .unwrap_or_else(|| panic!("no {proto} probe of {target}: {found:?}"))
    };
    for proto in ["udp", "tcp", "udp-roundtrip"] {
        let o = by(proto, real1);
        assert!(
            o.unreachable(),
            "direct {proto} from node 0 to node 1: {o:?}"
        );
        assert!(o.detail.contains("unreachable"), "{o:?}");
    }
    let o = by("udp-roundtrip", via);
    assert_eq!(o.outcome, "replied", "through the relay: {o:?}");
    let c = relay.handle().counters(Direction::AToB);
    assert_eq!((c.packets_in, c.forwarded), (1, 1), "{c:?}");

    relay.shutdown().await.unwrap();

    // A cut relay: nothing crosses, by any path. (A fresh relay, since a
    // relay learns its A peer from the first sender and each probe is a
    // new process with a new port.)
    let relay = Relay::spawn(RelayConfig {
        a_side: SocketAddr::from((n0.gateway, 0)),
        b_side: SocketAddr::from((n1.gateway, 0)),
        b_peer: real1,
        a_peer: None,
        seed: 8,
        faults: Default::default(),
    })
    .await
    .unwrap();
    relay.handle().partition_both().unwrap();
    let via = relay.a_side();
    let cut = netns::probe_from(&n0.ns, Path::new(CHAOS), &[], &[], &[real1, via], within)
        .await
        .unwrap();
    assert!(cut[0].unreachable(), "{:?}", cut[0]);
    assert_eq!(cut[1].outcome, "timeout", "{:?}", cut[1]);
    let c = relay.handle().counters(Direction::AToB);
    assert_eq!(c.packets_in, 1, "{c:?}");
    assert_eq!(c.forwarded, 0, "nothing forwarded during the cut: {c:?}");
    assert_eq!(c.dropped_partition, 1, "{c:?}");
    relay.shutdown().await.unwrap();

    // kill -9 reaches the server.
    server.kill9().await.unwrap();
    assert!(!alive(pid), "echo server {pid} survived kill -9");

    // Dropping the set removes the namespaces and the veth pairs.
    let names = [n0.ns.clone(), n1.ns.clone()];
    let ifs = [n0.host_if.clone(), n1.host_if.clone()];
    drop(set);
    let left = netns::list().unwrap();
    for n in &names {
        assert!(!left.contains(n), "{n} still exists: {left:?}");
    }
    for i in &ifs {
        assert!(netns::ip(&["link", "show", i]).is_err(), "{i} still exists");
    }
    // And the relay no longer accepts those addresses.
    assert!(!netns::is_own_address(n0.gateway.into()));
}

const HUB: &str = r#"#!/bin/sh
# Stand-in cloud-hub: --config FILE <command...>
cfg="$2"; shift 2
case "$1" in
  init) echo 1111111111111111111111111111111111111111111111111111111111111111 ;;
  token) echo "fsj1.stand-in-join-token" ;;
  user) echo "admin-token" ;;
  serve) echo "ready hub=1111"; exec sleep 60 ;;
  *) echo "unknown command $1" >&2; exit 2 ;;
esac
"#;

const EDGE: &str = r#"#!/bin/sh
# Stand-in edge-node: run --config FILE; says which namespace it is in.
echo "netns $(readlink /proc/self/ns/net)"
echo "ready edge=2222"
exec sleep 60
"#;

const SCENARIO: &str = r#"
name = "netns-stand-in"
seed = 5
duration = "1s"
[[fleet.hubs]]
name = "hub-eu"
regions = ["eu"]
[[fleet.tenants]]
id = "acme"
region = "eu"
[[fleet.sites]]
tenant = "acme"
id = "s1"
edges = 2
devices_per_edge = 1
[[timeline]]
at = "100ms"
action = "partition"
a = "s1/edge-1"
b = "hub-eu"
[[timeline]]
at = "600ms"
action = "heal"
"#;

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_puts_each_node_in_its_namespace_and_records_the_probes() {
    if !netns_or_skip("the_runner_puts_each_node_in_its_namespace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Scenario::parse(Path::new("netns.toml"), SCENARIO).unwrap();
    let mut opts = RunOptions::new(dir.path().join("fleet"));
    opts.hub_bin = script(dir.path(), "cloud-hub", HUB);
    opts.edge_bin = script(dir.path(), "edge-node", EDGE);
    opts.ready_timeout = Duration::from_secs(20);
    opts.isolation = Isolation::Netns;
    opts.probe_bin = PathBuf::from(CHAOS);
    let mut fleet = Fleet::start(&s, opts).await.unwrap();
    let set = fleet.netns().unwrap();
    let names: Vec<String> = set.nodes().iter().map(|n| n.ns.clone()).collect();
    assert_eq!(names.len(), 3);
    let gw = |i: usize| set.node(i).unwrap().gateway;
    let ip = |i: usize| set.node(i).unwrap().ip;

    // Nodes bind inside; they name only relays on their own gateway, and
    // devices there too.
    let root = dir.path().join("fleet");
    let hub = HubConfig::load(&root.join("hub-eu/hub.toml")).unwrap();
    let e1 = EdgeConfig::load(&root.join("s1--edge-1/edge.toml")).unwrap();
    assert_eq!(hub.sync_listen.ip(), ip(0));
    assert_eq!(hub.http_listen.ip(), ip(0));
    assert_eq!(e1.listen.sync.ip(), ip(1));
    assert_eq!(e1.hub.as_ref().unwrap().addr.ip(), gw(1));
    assert_eq!(e1.peers[0].addr.ip(), gw(1));
    assert_eq!(e1.devices[0].addr.ip(), gw(1));

    // Every direct path was probed from inside and found no route; each
    // namespace reached its own gateway.
    let iso = fleet.isolation().unwrap().clone();
    assert_eq!(iso.mode, "netns");
    let direct: Vec<_> = iso.probes.iter().filter(|p| p.to != "gateway").collect();
    assert_eq!(
        direct.len(),
        3 * 2 * 2,
        "3 nodes x 2 others x udp+tcp: {iso:?}"
    );
    assert!(direct.iter().all(|p| p.outcome == "unreachable"), "{iso:?}");
    let controls: Vec<_> = iso.probes.iter().filter(|p| p.to == "gateway").collect();
    assert_eq!(controls.len(), 3);
    assert!(controls.iter().all(|p| p.outcome == "refused"), "{iso:?}");

    fleet.play(&s).await.unwrap();
    let record = fleet.finish(None).await.unwrap();
    // Each edge said it ran in a namespace other than ours.
    let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
    let seen: Vec<_> = record
        .observations
        .logs
        .iter()
        .filter(|l| l.text.starts_with("netns "))
        .map(|l| l.text.clone())
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter().all(|l| !l.contains(&*mine.to_string_lossy())),
        "{seen:?} vs ours {mine:?}"
    );
    assert_eq!(record.isolation, Some(iso));
    // The run's namespaces are gone.
    let left = netns::list().unwrap();
    assert!(names.iter().all(|n| !left.contains(n)), "{left:?}");
}
