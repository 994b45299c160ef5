//! The fleet runner's orchestration against stand-in binaries (shell
//! scripts that answer like `cloud-hub` and `edge-node`): configs wired
//! through relays, enrolment helpers called, ready lines awaited, kill -9
//! and restart recorded as downtime, partition windows measured, every
//! process stopped. Real nodes are exercised by `chaos run` itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chaos::fleet::run::{Fleet, RunOptions};
use chaos::scenario::Scenario;
use schemas::config::{EdgeConfig, HubConfig};

const HUB: &str = r#"#!/bin/sh
# Stand-in cloud-hub: --config FILE <command...>
cfg="$2"; shift 2
case "$1" in
  init) echo "initialised" >&2; echo 1111111111111111111111111111111111111111111111111111111111111111 ;;
  token) echo "fsj1.stand-in-join-token" ;;
  user) echo "admin-token" ;;
  serve) echo "ready hub=1111 http=http://127.0.0.1:9"; exec sleep 60 ;;
  *) echo "unknown command $1" >&2; exit 2 ;;
esac
"#;

const EDGE: &str = r#"#!/bin/sh
# Stand-in edge-node: run --config FILE
echo "starting with $3" >&2
echo "ready edge=2222 http=http://127.0.0.1:9"
exec sleep 60
"#;

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

const SCENARIO: &str = r#"
name = "stand-in"
seed = 5
duration = "2s"
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
[checks]
quiescence_timeout = "1s"
[[timeline]]
at = "200ms"
action = "partition"
a = "s1/edge-1"
b = "hub-eu"
[[timeline]]
at = "400ms"
action = "kill"
node = "s1/edge-2"
[[timeline]]
at = "900ms"
action = "restart"
node = "s1/edge-2"
[[timeline]]
at = "1200ms"
action = "heal"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_wires_starts_kills_restarts_and_stops_a_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scenario::parse(Path::new("stand-in.toml"), SCENARIO).unwrap();
    let mut opts = RunOptions::new(dir.path().join("fleet"));
    opts.hub_bin = script(dir.path(), "cloud-hub", HUB);
    opts.edge_bin = script(dir.path(), "edge-node", EDGE);
    opts.ready_timeout = Duration::from_secs(20);
    let mut fleet = Fleet::start(&s, opts).await.unwrap();

    // Configs were written, and every peer address is a relay, not a node.
    let root = dir.path().join("fleet");
    let hub = HubConfig::load(&root.join("hub-eu/hub.toml")).unwrap();
    let e1 = EdgeConfig::load(&root.join("s1--edge-1/edge.toml")).unwrap();
    let e2 = EdgeConfig::load(&root.join("s1--edge-2/edge.toml")).unwrap();
    let real = [hub.sync_listen, e1.listen.sync, e2.listen.sync];
    let h1 = e1.hub.as_ref().unwrap();
    assert_eq!(h1.join_token.as_deref(), Some("fsj1.stand-in-join-token"));
    assert_eq!(h1.endpoint_id.to_string(), "1".repeat(64));
    for a in [
        h1.addr,
        e1.peers[0].addr,
        e2.hub.as_ref().unwrap().addr,
        e2.peers[0].addr,
    ] {
        assert!(!real.contains(&a), "{a} is a node's own address");
    }
    assert_ne!(h1.addr, e2.hub.as_ref().unwrap().addr, "one relay per pair");
    // Each edge names the other by the key in the other's key file.
    let k2 = sync_core::identity::NodeKey::load_or_create(&e2.key_path()).unwrap();
    assert_eq!(e1.peers[0].endpoint_id, k2.public());
    assert_eq!(e1.devices.len(), 1);

    fleet.play(&s).await.unwrap();
    let record = fleet.finish(None).await.unwrap();

    // kill at 400 ms, restart at 900 ms: one downtime span of about that.
    let down = &record.observations.downtime;
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0].node, "s1/edge-2");
    assert!(down[0].from_ms >= 400 && down[0].to_ms >= 900, "{down:?}");
    // Both directions of the cut were measured from 200 ms to 1200 ms.
    let cuts: Vec<_> = record
        .relay_windows
        .iter()
        .filter(|w| w.faults == "partition")
        .collect();
    assert_eq!(cuts.len(), 2, "{:?}", record.relay_windows);
    assert!(
        cuts.iter()
            .all(|w| w.link == "s1/edge-1 <-> hub-eu" && w.forwarded == 0)
    );
    assert!(cuts.iter().all(|w| w.from_ms >= 200 && w.to_ms >= 1200));
    // Totals of every relay direction are recorded too.
    assert_eq!(
        record
            .relay_windows
            .iter()
            .filter(|w| w.faults == "total")
            .count(),
        6
    );
    // Logs of every incarnation were collected.
    let starts = record
        .observations
        .logs
        .iter()
        .filter(|l| l.node == "s1/edge-2" && l.text.starts_with("starting with"))
        .count();
    assert_eq!(starts, 2, "started, killed, restarted");
    record.history.validate().unwrap();
}

#[tokio::test]
async fn a_node_that_never_gets_ready_fails_the_start_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scenario::parse(Path::new("stand-in.toml"), SCENARIO).unwrap();
    let mut opts = RunOptions::new(dir.path().join("fleet"));
    opts.hub_bin = script(dir.path(), "cloud-hub", HUB);
    opts.edge_bin = script(
        dir.path(),
        "edge-node",
        "#!/bin/sh\necho 'error: cannot bind 127.0.0.1' >&2\nexit 1\n",
    );
    let e = Fleet::start(&s, opts).await.unwrap_err().to_string();
    assert!(e.contains("s1/edge-1") && e.contains("cannot bind"), "{e}");
}
