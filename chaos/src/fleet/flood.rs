//! Reconnect flood: open `fieldsync/1` QUIC connections to a node's real
//! sync address at a fixed rate, each from a fresh, never-enrolled key,
//! say Hello, and drop them; count what the node did with each.
//!
//! Each attempt binds its own offline iroh endpoint (the same settings as
//! `sync_core::driver::SyncNode`: `Minimal` preset, so no relay and no
//! address lookup, one IP transport on an explicit bind address, portmapper
//! off), because an iroh endpoint's key is its identity: a fresh key per
//! attempt is a fresh endpoint.
//!
//! Outcome of one attempt:
//! - **refused**: the node closed the connection with
//!   [`CLOSE_UNAUTHORISED`] (the driver's answer to an unknown key, sent
//!   before any stream is read);
//! - **accepted**: the connection was still open after
//!   [`FloodSpec::hold`] (a node that keeps a stranger's connection is a
//!   finding), or closed with another code after the Hello got through;
//! - **error**: the endpoint could not bind, the handshake failed or
//!   timed out, or the connection ended some other way;
//! - **skipped**: the attempt was due while [`FloodSpec::max_in_flight`]
//!   attempts were still open (the flood reports the rate it really made).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh::endpoint::{ConnectionError, PortmapperConfig, VarInt, presets};
use schemas::identity::EndpointKey;
use serde::Serialize;
use sync_core::driver::CLOSE_UNAUTHORISED;
use sync_core::identity::NodeKey;
use sync_core::protocol::{ALPN, Frame, VERSION};
use tokio::time::Instant;

/// What to flood and how hard.
#[derive(Debug, Clone)]
pub struct FloodSpec {
    /// The target's endpoint id.
    pub target: EndpointKey,
    /// The target's real sync address.
    pub addr: SocketAddr,
    /// Attempts started per second.
    pub rate_per_sec: u32,
    /// How long to keep starting attempts.
    pub duration: Duration,
    /// Attempts open at once, at most.
    pub max_in_flight: usize,
    /// How long a connection must stay open to count as accepted (also the
    /// handshake deadline).
    pub hold: Duration,
}

impl FloodSpec {
    /// A flood of `target` at `addr`: 256 attempts in flight at most, 3 s
    /// to be refused.
    pub fn new(
        target: EndpointKey,
        addr: SocketAddr,
        rate_per_sec: u32,
        duration: Duration,
    ) -> Self {
        FloodSpec {
            target,
            addr,
            rate_per_sec,
            duration,
            max_in_flight: 256,
            hold: Duration::from_secs(3),
        }
    }
}

/// The result of a flood.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FloodCounts {
    /// Attempts due by the schedule (`rate * duration`).
    pub scheduled: u64,
    /// Attempts started.
    pub attempts: u64,
    /// Closed by the target as unauthorised.
    pub refused: u64,
    /// Kept open by the target (or closed only after the Hello with
    /// another code).
    pub accepted: u64,
    /// Bind, handshake or transport errors.
    pub errors: u64,
    /// Not started: too many attempts were still open.
    pub skipped: u64,
    /// Time from dialling to the target's refusal, ms: median.
    pub refuse_ms_p50: Option<f64>,
    /// 99th percentile.
    pub refuse_ms_p99: Option<f64>,
    /// Slowest.
    pub refuse_ms_max: Option<f64>,
    /// Up to five distinct error messages, with how often each was seen.
    pub error_samples: Vec<(String, u64)>,
    /// Wall time the flood took, ms (attempts still open at the end are
    /// awaited).
    pub elapsed_ms: u64,
}

impl FloodCounts {
    /// Whether the target did what it must: refused every stranger that
    /// reached it, accepted none.
    pub fn target_held(&self) -> bool {
        self.accepted == 0 && self.refused > 0
    }
}

#[derive(Debug)]
enum Outcome {
    Refused(Duration),
    Accepted,
    Error(String),
}

/// The local address to bind for reaching `target`: loopback for a
/// loopback target, else any address (a node in a network namespace is
/// reached through the host's route to it).
fn bind_for(target: SocketAddr) -> SocketAddr {
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(ip) if ip.is_loopback() => SocketAddr::from((ip, 0)),
        IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    }
}

async fn attempt(target: iroh::EndpointId, addr: SocketAddr, hold: Duration) -> Outcome {
    let key = NodeKey::generate();
    let started = Instant::now();
    let ep = match iroh::Endpoint::builder(presets::Minimal)
        .secret_key(key.iroh_secret().clone())
        .clear_ip_transports()
        .bind_addr(bind_for(addr))
    {
        Ok(b) => b.portmapper_config(PortmapperConfig::Disabled).bind().await,
        Err(e) => return Outcome::Error(format!("bind: {e}")),
    };
    let ep = match ep {
        Ok(ep) => ep,
        Err(e) => return Outcome::Error(format!("bind: {e}")),
    };
    let dest = iroh::EndpointAddr::new(target).with_ip_addr(addr);
    let outcome = match tokio::time::timeout(hold, ep.connect(dest, ALPN)).await {
        Err(_) => Outcome::Error("handshake timed out".into()),
        Ok(Err(e)) => Outcome::Error(format!("connect: {e}")),
        Ok(Ok(conn)) => {
            // Open the command plane and say Hello, as a real dialer
            // would; a node that refuses closes before reading it.
            let hello = async {
                let (mut s, _r) = conn.open_bi().await.ok()?;
                s.write_all(&[0]).await.ok()?;
                let f = Frame::Hello {
                    version: VERSION,
                    max_frame: 1 << 20,
                };
                s.write_all(&f.encode()).await.ok()
            };
            let waited = tokio::time::timeout(hold, async {
                let said_hello = hello.await.is_some();
                (said_hello, conn.closed().await)
            })
            .await;
            let out = match waited {
                Err(_) => Outcome::Accepted,
                Ok((_, ConnectionError::ApplicationClosed(c)))
                    if c.error_code == VarInt::from_u32(CLOSE_UNAUTHORISED) =>
                {
                    Outcome::Refused(started.elapsed())
                }
                Ok((true, ConnectionError::ApplicationClosed(c))) => {
                    // The node read past the point where strangers are cut off.
                    tracing::warn!(code = %c.error_code, "flood: stranger closed with another code after Hello");
                    Outcome::Accepted
                }
                Ok((_, e)) => Outcome::Error(format!("closed: {e}")),
            };
            conn.close(VarInt::from_u32(0), b"chaos reconnect flood");
            out
        }
    };
    // Bounded: a graceful close waits for the peer's acknowledgement.
    let _ = tokio::time::timeout(Duration::from_secs(1), ep.close()).await;
    outcome
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

#[derive(Default)]
struct Tally {
    refused: u64,
    accepted: u64,
    errors: u64,
    latencies: Vec<f64>,
    error_kinds: Vec<(String, u64)>,
}

/// Run a flood to its end and count. Never fails: every problem is an
/// error count with its message.
pub async fn reconnect_flood(spec: &FloodSpec) -> FloodCounts {
    let started = Instant::now();
    let Some(target) = sync_core::identity::to_iroh(&spec.target) else {
        return FloodCounts {
            errors: 1,
            error_samples: vec![(format!("{} is not an endpoint id", spec.target), 1)],
            ..FloodCounts::default()
        };
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(spec.max_in_flight.max(1)));
    let gap = Duration::from_secs_f64(1.0 / f64::from(spec.rate_per_sec.max(1)));
    let scheduled = (spec.duration.as_secs_f64() * f64::from(spec.rate_per_sec)).round() as u64;
    let mut tick = tokio::time::interval(gap);
    // A late tick is not made up with a burst: the flood's real rate is
    // what `attempts` says.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = started + spec.duration;
    let (mut attempts, mut skipped, mut due) = (0u64, 0u64, 0u64);
    let mut tasks = tokio::task::JoinSet::new();
    while due < scheduled {
        let now = tick.tick().await;
        if now >= end {
            break;
        }
        // Ticks skipped by a slow scheduler count as due and skipped.
        let should = ((now - started).as_secs_f64() * f64::from(spec.rate_per_sec)) as u64 + 1;
        let behind = should.min(scheduled).saturating_sub(due + 1);
        skipped += behind;
        due += behind + 1;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        attempts += 1;
        let (tally, addr, hold) = (tally.clone(), spec.addr, spec.hold);
        tasks.spawn(async move {
            let out = attempt(target, addr, hold).await;
            drop(permit);
            let mut t = tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match out {
                Outcome::Refused(d) => {
                    t.refused += 1;
                    t.latencies.push(d.as_secs_f64() * 1000.0);
                }
                Outcome::Accepted => t.accepted += 1,
                Outcome::Error(e) => {
                    t.errors += 1;
                    if let Some((_, n)) = t.error_kinds.iter_mut().find(|(k, _)| *k == e) {
                        *n += 1;
                    } else if t.error_kinds.len() < 5 {
                        t.error_kinds.push((e, 1));
                    }
                }
            }
        });
        // Reap finished attempts so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    skipped += scheduled.saturating_sub(due);
    while tasks.join_next().await.is_some() {}
    let t = std::mem::take(
        &mut *tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut lat = t.latencies;
    lat.sort_by(f64::total_cmp);
    FloodCounts {
        scheduled,
        attempts,
        refused: t.refused,
        accepted: t.accepted,
        errors: t.errors,
        skipped,
        refuse_ms_p50: percentile(&lat, 0.5),
        refuse_ms_p99: percentile(&lat, 0.99),
        refuse_ms_max: lat.last().copied(),
        error_samples: t.error_kinds,
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::ids::Role;
    use sync_core::authz::{Authz, PeerInfo, StaticDirectory};
    use sync_core::driver::{DriverConfig, NodeEvent, SyncNode};
    use sync_core::store::DocStore;

    /// A hub-like `SyncNode` on 127.0.0.1 that knows one enrolled edge.
    async fn hub() -> (SyncNode, SocketAddr) {
        let k = NodeKey::from_bytes([7; 32]);
        let info = PeerInfo {
            key: k.public(),
            role: Role::Hub,
            tenant: None,
            site: None,
        };
        let mut d = StaticDirectory::default();
        d.insert(PeerInfo {
            key: NodeKey::from_bytes([8; 32]).public(),
            role: Role::Edge,
            tenant: "acme".parse().ok(),
            site: "s1".parse().ok(),
        });
        let store = Arc::new(DocStore::in_memory(k.clone()));
        let node = SyncNode::spawn(
            &k,
            store,
            Arc::new(Authz::new(info, None)),
            Arc::new(d),
            DriverConfig::default(),
        )
        .await
        .unwrap();
        let addr = node
            .local_addrs()
            .into_iter()
            .find(|a| a.is_ipv4())
            .unwrap();
        (node, addr)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strangers_are_counted_as_refused_and_the_node_saw_each() {
        let (node, addr) = hub().await;
        let mut events = node.subscribe();
        let spec = FloodSpec::new(node.endpoint_id(), addr, 40, Duration::from_millis(500));
        let c = reconnect_flood(&spec).await;
        assert_eq!(c.scheduled, 20, "{c:?}");
        assert_eq!(c.attempts + c.skipped, c.scheduled, "{c:?}");
        assert!(c.attempts >= 10, "too few attempts made: {c:?}");
        assert_eq!(
            c.refused + c.accepted + c.errors,
            c.attempts,
            "every attempt has one outcome: {c:?}"
        );
        assert_eq!(c.accepted, 0, "{c:?}");
        assert_eq!(c.refused, c.attempts, "{c:?}");
        assert!(c.target_held());
        assert!(c.refuse_ms_p50.is_some_and(|p| p < 3000.0), "{c:?}");
        // The node's own view: one refusal event per attempt, each from a
        // different key.
        let mut peers = std::collections::BTreeSet::new();
        while let Ok(ev) = events.try_recv() {
            if let NodeEvent::Refused { peer, .. } = ev {
                peers.insert(peer);
            }
        }
        assert_eq!(peers.len() as u64, c.refused, "{c:?}");
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_admits_strangers_is_counted_accepted_and_a_dead_one_as_errors() {
        // A node whose directory admits everyone (a broken hub).
        struct Everyone;
        impl sync_core::authz::Directory for Everyone {
            fn lookup(&self, key: &EndpointKey) -> Option<PeerInfo> {
                Some(PeerInfo {
                    key: *key,
                    role: Role::Edge,
                    tenant: "acme".parse().ok(),
                    site: "s1".parse().ok(),
                })
            }
        }
        let k = NodeKey::from_bytes([9; 32]);
        let info = PeerInfo {
            key: k.public(),
            role: Role::Hub,
            tenant: None,
            site: None,
        };
        let node = SyncNode::spawn(
            &k,
            Arc::new(DocStore::in_memory(k.clone())),
            Arc::new(Authz::new(info, None)),
            Arc::new(Everyone),
            DriverConfig::default(),
        )
        .await
        .unwrap();
        let addr = node
            .local_addrs()
            .into_iter()
            .find(|a| a.is_ipv4())
            .unwrap();
        let mut spec = FloodSpec::new(node.endpoint_id(), addr, 10, Duration::from_millis(300));
        spec.hold = Duration::from_millis(800);
        let c = reconnect_flood(&spec).await;
        assert!(c.attempts > 0, "{c:?}");
        assert_eq!(c.refused, 0, "{c:?}");
        assert!(c.accepted > 0, "{c:?}");
        assert!(!c.target_held());
        let port = addr.port();
        node.shutdown().await;

        // Nothing listening: every attempt is an error, none refused.
        let dead = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut spec = FloodSpec::new(k.public(), dead, 10, Duration::from_millis(200));
        spec.hold = Duration::from_millis(500);
        let c = reconnect_flood(&spec).await;
        assert!(c.attempts > 0, "{c:?}");
        assert_eq!((c.refused, c.accepted), (0, 0), "{c:?}");
        assert_eq!(c.errors, c.attempts, "{c:?}");
        assert!(!c.error_samples.is_empty());
        assert!(!c.target_held());
    }
}
