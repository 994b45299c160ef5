//! The UDP relay with real loopback sockets: forwarding both ways,
//! partitions (full and one-way) with exact counters, loss, and refusals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use chaos::link::{Direction, LinkError, LinkFaults, Relay, RelayConfig, RelayHandle};
use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout};

const DEADLINE: Duration = Duration::from_secs(10);

async fn sock() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Poll `cond` until it holds, failing the test after [`DEADLINE`].
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Receive exactly `n` datagrams (each within the deadline).
async fn recv_n(s: &UdpSocket, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..n {
        let (len, from) = timeout(DEADLINE, s.recv_from(&mut buf))
            .await
            .expect("datagram did not arrive")
            .unwrap();
        out.push((buf[..len].to_vec(), from));
    }
    out
}

fn assert_nothing_pending(s: &UdpSocket, who: &str) {
    let mut buf = [0u8; 2048];
    match s.try_recv_from(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("{who} received something: {other:?}"),
    }
}

async fn pair() -> (UdpSocket, UdpSocket, Relay, RelayHandle) {
    let a = sock().await;
    let b = sock().await;
    let mut cfg = RelayConfig::proxy("127.0.0.1:0".parse().unwrap(), b.local_addr().unwrap(), 99);
    cfg.a_peer = Some(a.local_addr().unwrap());
    let relay = Relay::spawn(cfg).await.unwrap();
    let h = relay.handle();
    (a, b, relay, h)
}

#[tokio::test]
async fn forwards_both_ways_and_peers_see_only_the_relay() {
    let (a, b, relay, h) = pair().await;
    for i in 0..20u8 {
        a.send_to(&[i; 100], relay.a_side()).await.unwrap();
    }
    let got = recv_n(&b, 20).await;
    for (i, (d, from)) in got.iter().enumerate() {
        assert_eq!(d[0], i as u8);
        assert_eq!(*from, relay.b_side(), "B must see A at the relay's b side");
    }
    b.send_to(b"pong", relay.b_side()).await.unwrap();
    let back = recv_n(&a, 1).await;
    assert_eq!(back[0], (b"pong".to_vec(), relay.a_side()));
    wait_for("counters", || h.counters(Direction::BToA).forwarded == 1).await;
    let c = h.counters(Direction::AToB);
    assert_eq!(
        (c.packets_in, c.forwarded, c.bytes_forwarded, c.dropped()),
        (20, 20, 2000, 0)
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn partition_exchanges_zero_packets_then_heals() {
    let (a, b, relay, h) = pair().await;
    h.partition_both().unwrap();
    for i in 0..50u8 {
        a.send_to(&[i], relay.a_side()).await.unwrap();
        b.send_to(&[i], relay.b_side()).await.unwrap();
    }
    wait_for("relay to see 50 datagrams each way", || {
        h.counters(Direction::AToB).packets_in == 50 && h.counters(Direction::BToA).packets_in == 50
    })
    .await;
    for d in Direction::BOTH {
        let c = h.counters(d);
        assert_eq!((c.forwarded, c.dropped_partition), (0, 50), "{d:?}: {c:?}");
    }
    assert_nothing_pending(&a, "A");
    assert_nothing_pending(&b, "B");

    h.heal().unwrap();
    a.send_to(b"after", relay.a_side()).await.unwrap();
    assert_eq!(recv_n(&b, 1).await[0].0, b"after");
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_way_partition_cuts_only_one_direction() {
    let (a, b, relay, h) = pair().await;
    h.partition(Direction::AToB).unwrap();
    // B can reach A first, because A's address was configured.
    b.send_to(b"b-to-a", relay.b_side()).await.unwrap();
    assert_eq!(recv_n(&a, 1).await[0].0, b"b-to-a");
    for _ in 0..10 {
        a.send_to(b"a-to-b", relay.a_side()).await.unwrap();
    }
    wait_for("relay to see A's datagrams", || {
        h.counters(Direction::AToB).packets_in == 10
    })
    .await;
    assert_eq!(h.counters(Direction::AToB).forwarded, 0);
    assert_nothing_pending(&b, "B");
    assert_eq!(h.counters(Direction::BToA).forwarded, 1);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn loss_and_duplication_account_for_every_datagram() {
    let (a, b, relay, h) = pair().await;
    h.set_faults(
        Direction::AToB,
        LinkFaults {
            loss: 0.3,
            duplicate: 0.1,
            ..LinkFaults::default()
        },
    )
    .unwrap();
    let n = 400u64;
    // B reads concurrently: a socket buffer holds only a few hundred datagrams.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            let (len, _) = b.recv_from(&mut buf).await.unwrap();
            if tx.send(buf[..len].to_vec()).is_err() {
                return b;
            }
        }
    });
    for i in 0..n {
        a.send_to(&i.to_be_bytes(), relay.a_side()).await.unwrap();
        if i % 10 == 0 {
            tokio::task::yield_now().await;
        }
    }
    wait_for("relay to take and flush all datagrams", || {
        let c = h.counters(Direction::AToB);
        c.packets_in == n && c.forwarded == n - c.dropped_loss + c.duplicated
    })
    .await;
    let c = h.counters(Direction::AToB);
    assert!((80..160).contains(&c.dropped_loss), "{c:?}");
    assert!((10..70).contains(&c.duplicated), "{c:?}");
    let mut ids = Vec::new();
    for _ in 0..c.forwarded {
        let d = timeout(DEADLINE, rx.recv())
            .await
            .expect("datagram did not arrive")
            .unwrap();
        ids.push(u64::from_be_bytes(d[..8].try_into().unwrap()));
    }
    ids.sort_unstable();
    let dups = ids.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    assert_eq!(dups, c.duplicated);
    assert_eq!(ids.len() as u64 - dups, n - c.dropped_loss);
    assert!(rx.try_recv().is_err(), "more datagrams than forwarded");
    reader.abort();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn delay_is_applied_on_the_wire() {
    let (a, b, relay, h) = pair().await;
    h.set_faults(
        Direction::AToB,
        LinkFaults {
            delay: Duration::from_millis(80),
            ..LinkFaults::default()
        },
    )
    .unwrap();
    let t0 = Instant::now();
    a.send_to(b"slow", relay.a_side()).await.unwrap();
    recv_n(&b, 1).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(80),
        "{:?}",
        t0.elapsed()
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn refuses_non_loopback_and_bad_faults() {
    let cfg = RelayConfig::proxy(
        "0.0.0.0:0".parse().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
        1,
    );
    match Relay::spawn(cfg).await {
        Err(LinkError::NotLoopback { which, .. }) => assert_eq!(which, "a_side"),
        other => panic!("expected NotLoopback, got {other:?}"),
    }
    let cfg = RelayConfig::proxy(
        "127.0.0.1:0".parse().unwrap(),
        "10.0.0.1:9".parse().unwrap(),
        1,
    );
    assert!(matches!(
        Relay::spawn(cfg).await,
        Err(LinkError::NotLoopback {
            which: "b_peer",
            ..
        })
    ));
    let (_a, _b, relay, h) = pair().await;
    let e = h
        .set_faults(
            Direction::BToA,
            LinkFaults {
                reorder: -0.1,
                ..LinkFaults::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("reorder"), "{e}");
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn learns_the_client_address_in_proxy_mode_and_drops_strays() {
    let a = sock().await;
    let b = sock().await;
    let stranger = sock().await;
    let relay = Relay::spawn(RelayConfig::proxy(
        "127.0.0.1:0".parse().unwrap(),
        b.local_addr().unwrap(),
        5,
    ))
    .await
    .unwrap();
    let h = relay.handle();
    // Before A spoke, B's datagrams have nowhere to go.
    b.send_to(b"early", relay.b_side()).await.unwrap();
    wait_for("no_peer drop", || h.counters(Direction::BToA).no_peer == 1).await;
    a.send_to(b"hi", relay.a_side()).await.unwrap();
    recv_n(&b, 1).await;
    b.send_to(b"back", relay.b_side()).await.unwrap();
    assert_eq!(recv_n(&a, 1).await[0].0, b"back");
    // A stranger writing to side b is not B: dropped, not forwarded to A.
    stranger.send_to(b"spoof", relay.b_side()).await.unwrap();
    b.send_to(b"marker", relay.b_side()).await.unwrap();
    assert_eq!(recv_n(&a, 1).await[0].0, b"marker");
    assert_eq!(h.counters(Direction::BToA).packets_in, 3);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn mesh_wires_a_scenario_fleet_and_applies_its_link_changes() {
    use chaos::mesh::RelayMesh;
    use chaos::scenario::Scenario;
    use std::collections::BTreeMap;

    let s = Scenario::parse(
        std::path::Path::new("mesh.toml"),
        r#"
duration = "10s"
[[fleet.hubs]]
name = "hub"
regions = ["eu"]
[[fleet.tenants]]
id = "acme"
region = "eu"
[[fleet.sites]]
tenant = "acme"
id = "s1"
edges = 2
[[timeline]]
at = "1s"
action = "partition"
a = "hub"
b = "s1/edge-1"
direction = "b-to-a"
"#,
    )
    .unwrap();
    let mut socks = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for (name, _) in s.fleet.nodes() {
        let sk = sock().await;
        addrs.insert(name.clone(), sk.local_addr().unwrap());
        socks.insert(name, sk);
    }
    let mesh = RelayMesh::spawn(&s.fleet.links(), &addrs, s.seed)
        .await
        .unwrap();
    assert_eq!(mesh.links().count(), 3);
    let (e1, e2, hub) = (&socks["s1/edge-1"], &socks["s1/edge-2"], &socks["hub"]);

    // Every node reaches every peer through a relay, and sees the peer at
    // the very address it would dial.
    for (from, to, fs, ts) in [
        ("s1/edge-1", "hub", e1, hub),
        ("hub", "s1/edge-2", hub, e2),
        ("s1/edge-2", "s1/edge-1", e2, e1),
    ] {
        let dial = mesh.dial_addr(from, to).unwrap();
        assert_ne!(dial, addrs[to], "{from} must not dial {to} directly");
        fs.send_to(from.as_bytes(), dial).await.unwrap();
        let (d, seen_from) = recv_n(ts, 1).await.remove(0);
        assert_eq!(d, from.as_bytes());
        assert_eq!(
            Some(seen_from),
            mesh.dial_addr(to, from),
            "{to} sees {from} at its dial address"
        );
    }

    // The scenario cuts edge-1 -> hub only.
    for change in s.link_changes() {
        mesh.apply(&change).unwrap();
    }
    let before = mesh.counters("s1/edge-1", "hub").unwrap();
    for _ in 0..5 {
        e1.send_to(b"cut", mesh.dial_addr("s1/edge-1", "hub").unwrap())
            .await
            .unwrap();
    }
    wait_for("the cut datagrams to reach the relay", || {
        mesh.counters("s1/edge-1", "hub").unwrap().packets_in == before.packets_in + 5
    })
    .await;
    assert_eq!(
        mesh.counters("s1/edge-1", "hub").unwrap().forwarded,
        before.forwarded
    );
    assert_nothing_pending(hub, "hub");
    hub.send_to(b"still-up", mesh.dial_addr("hub", "s1/edge-1").unwrap())
        .await
        .unwrap();
    assert_eq!(recv_n(e1, 1).await[0].0, b"still-up");
    mesh.shutdown().await.unwrap();
}
