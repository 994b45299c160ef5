//! The fault-injecting UDP link: a user-space relay between two nodes that
//! partitions, loses, delays, jitters, duplicates, reorders and rate-limits
//! datagrams, per direction, from a seeded RNG.
//!
//! This machine has no `netem` qdisc and no iptables, so faults are injected
//! here, in user space. QUIC (and so iroh) runs over UDP, so the relay
//! carries iroh traffic unchanged; it never looks inside a datagram.
//!
//! # Shape
//!
//! A relay has two sockets, both on 127.0.0.1. Side A ([`Relay::a_side`]) is
//! the address node A dials *as if it were B*; side B ([`Relay::b_side`]) is
//! the address node B sees A at (and may dial, if A's address is known in
//! advance, see [`RelayConfig::a_peer`]). Datagrams arriving on side A from
//! A go out of side B to B ([`Direction::AToB`]); datagrams arriving on side
//! B from B go out of side A to A ([`Direction::BToA`]). Datagrams from any
//! other source are counted as `stray` and dropped.
//!
//! The fault logic is the sans-IO [`Shaper`] (one per direction): packets and
//! `now` in, packets due at `now` out, no sockets, no clock. The tokio driver
//! ([`Relay::spawn`]) only moves bytes and sleeps until the next departure.
//!
//! Order of faults for one datagram: partition, loss, bandwidth (token bucket
//! with a bounded queue: a datagram that would wait longer than
//! `queue_limit` is dropped), delay with uniform jitter (jitter alone
//! reorders), explicit reordering (hold the datagram back by
//! `reorder_gap`), duplication (a second copy leaves 1 ms later). A partition
//! is checked again at departure, so datagrams queued when a partition starts
//! are dropped too: "during a partition the pair exchanged zero packets" is
//! exact ([`DirectionCounters::forwarded`] does not move).
//!
//! # Configuring a fleet so that all traffic crosses its relays
//!
//! iroh can route around a relay if it learns a direct address of its peer.
//! A fleet runner must therefore:
//! - build every endpoint with `presets::Minimal` (no iroh relay servers, no
//!   address lookup / discovery, no portmapper), and bind it to
//!   `127.0.0.1:0` with `clear_ip_transports().bind_addr(..)`, never to all
//!   interfaces;
//! - give every node the *relay's* address of a peer, never the peer's own
//!   socket address: dial `EndpointAddr::new(peer_id).with_ip_addr(relay)`;
//! - give each peer pair its own relay (one relay per unordered pair): A
//!   dials B at `relay_ab.a_side()`, B dials A at `relay_ab.b_side()`, with
//!   `a_peer` set so B can dial first. One relay per pair is what makes a
//!   one-way or per-pair partition possible, and keeps counters per pair;
//! - not share a node's UDP socket between pairs in a way that exposes its
//!   real address: a node only ever receives from relay addresses, so the
//!   address QUIC observes for a peer is always a relay address.
//!
//! These are assertions the runner should check (a node's connection info
//! showing a non-relay remote address is a broken run, not a passing one).
//! The relay itself is tested with plain UDP sockets.

use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Largest datagram the relay carries (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

/// A direction of travel through a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From node A (which dialled side A) to node B.
    AToB,
    /// From node B back to node A.
    BToA,
}

impl Direction {
    /// Both directions, A to B first.
    pub const BOTH: [Direction; 2] = [Direction::AToB, Direction::BToA];

    fn index(self) -> usize {
        match self {
            Direction::AToB => 0,
            Direction::BToA => 1,
        }
    }
}

/// The faults applied to one direction of a link. `Default` is a clean link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkFaults {
    /// Drop everything (including datagrams already queued).
    pub partitioned: bool,
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Uniform jitter added to the delay, in `[-jitter, +jitter]` (the total
    /// never goes below zero).
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability in `[0, 1]` that a datagram is held back by
    /// [`LinkFaults::reorder_gap`] so that later ones overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_gap: Duration,
    /// Bandwidth cap in bytes per second (`None`: unlimited).
    pub bandwidth: Option<u64>,
    /// Token bucket depth in bytes (burst allowed at full speed).
    pub burst: u64,
    /// Longest a datagram may wait for bandwidth before being dropped.
    pub queue_limit: Duration,
}

impl Default for LinkFaults {
    fn default() -> Self {
        LinkFaults {
            partitioned: false,
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_gap: Duration::from_millis(20),
            bandwidth: None,
            burst: 16 * 1024,
            queue_limit: Duration::from_millis(500),
        }
    }
}

impl LinkFaults {
    /// A clean link (no fault at all).
    pub fn clean() -> Self {
        Self::default()
    }

    /// A link that drops everything.
    pub fn partitioned() -> Self {
        LinkFaults {
            partitioned: true,
            ..Self::default()
        }
    }

    /// Check probabilities and the bandwidth figure.
    pub fn validate(&self) -> Result<(), LinkError> {
        for (name, p) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(LinkError::InvalidFault {
                    field: name,
                    reason: format!("{p} is not a probability in [0, 1]"),
                });
            }
        }
        if self.bandwidth == Some(0) {
            return Err(LinkError::InvalidFault {
                field: "bandwidth",
                reason: "0 bytes/s would carry nothing; use a partition instead".into(),
            });
        }
        Ok(())
    }
}

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The relay binds only to loopback (or to the veth addresses of this
    /// process's own fleet namespaces, see [`crate::netns`]); another
    /// address was given.
    #[error(
        "{which}: {addr} is not a 127.0.0.1 address (nor one of this run's namespaces); the relay binds only to loopback"
    )]
    NotLoopback {
        /// Which address was refused (`a_side`, `b_side`, `b_peer`, `a_peer`).
        which: &'static str,
        /// The refused address.
        addr: SocketAddr,
    },
    /// A socket could not be bound.
    #[error("cannot bind {which} on {addr}: {source}")]
    Bind {
        /// Which side.
        which: &'static str,
        /// The requested address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A fault setting is out of range.
    #[error("invalid fault {field}: {reason}")]
    InvalidFault {
        /// The offending field of [`LinkFaults`].
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The relay task panicked or was aborted.
    #[error("relay task ended abnormally: {0}")]
    Task(String),
}

/// Counters of one direction, readable while the relay runs.
#[derive(Debug, Default)]
struct AtomicCounters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    dropped_partition: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    send_errors: AtomicU64,
    no_peer: AtomicU64,
}

/// A snapshot of one direction's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionCounters {
    /// Datagrams received from the sending node.
    pub packets_in: u64,
    /// Bytes received from the sending node.
    pub bytes_in: u64,
    /// Datagrams sent on to the receiving node (duplicates included).
    pub forwarded: u64,
    /// Bytes sent on to the receiving node.
    pub bytes_forwarded: u64,
    /// Dropped because the direction was partitioned (on arrival or while
    /// queued).
    pub dropped_partition: u64,
    /// Dropped by the loss probability.
    pub dropped_loss: u64,
    /// Dropped because the bandwidth queue was full.
    pub dropped_queue: u64,
    /// Extra copies scheduled by the duplication probability.
    pub duplicated: u64,
    /// Datagrams held back to be overtaken.
    pub reordered: u64,
    /// Sends that failed at the OS level.
    pub send_errors: u64,
    /// Dropped because the receiving node's address is not known yet.
    pub no_peer: u64,
}

impl DirectionCounters {
    /// All drops together.
    pub fn dropped(&self) -> u64 {
        self.dropped_partition + self.dropped_loss + self.dropped_queue + self.no_peer
    }
}

impl AtomicCounters {
    fn snapshot(&self) -> DirectionCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirectionCounters {
            packets_in: g(&self.packets_in),
            bytes_in: g(&self.bytes_in),
            forwarded: g(&self.forwarded),
            bytes_forwarded: g(&self.bytes_forwarded),
            dropped_partition: g(&self.dropped_partition),
            dropped_loss: g(&self.dropped_loss),
            dropped_queue: g(&self.dropped_queue),
            duplicated: g(&self.duplicated),
            reordered: g(&self.reordered),
            send_errors: g(&self.send_errors),
            no_peer: g(&self.no_peer),
        }
    }

    fn add(&self, c: &DirectionCounters) {
        let a = |x: &AtomicU64, v: u64| {
            if v > 0 {
                x.fetch_add(v, Ordering::Relaxed);
            }
        };
        a(&self.packets_in, c.packets_in);
        a(&self.bytes_in, c.bytes_in);
        a(&self.forwarded, c.forwarded);
        a(&self.bytes_forwarded, c.bytes_forwarded);
        a(&self.dropped_partition, c.dropped_partition);
        a(&self.dropped_loss, c.dropped_loss);
        a(&self.dropped_queue, c.dropped_queue);
        a(&self.duplicated, c.duplicated);
        a(&self.reordered, c.reordered);
        a(&self.send_errors, c.send_errors);
        a(&self.no_peer, c.no_peer);
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Queued {
    due: Instant,
    seq: u64,
    data: Vec<u8>,
}

impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: earliest due (then lowest seq) first.
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// The sans-IO fault logic of one direction: `handle_datagram` with `now`,
/// then `poll_transmit(now)` until it returns `None`, and sleep until
/// `poll_timeout()`.
#[derive(Debug)]
pub struct Shaper {
    faults: LinkFaults,
    rng: StdRng,
    queue: BinaryHeap<Queued>,
    seq: u64,
    tokens: f64,
    tokens_at: Option<Instant>,
    counters: DirectionCounters,
}

impl Shaper {
    /// A clean shaper whose random decisions come from `seed`.
    pub fn new(seed: u64) -> Shaper {
        Shaper {
            faults: LinkFaults::default(),
            rng: StdRng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            seq: 0,
            tokens: 0.0,
            tokens_at: None,
            counters: DirectionCounters::default(),
        }
    }

    /// Replace the faults. The token bucket restarts full when the
    /// bandwidth changes; queued datagrams keep their departure time.
    pub fn set_faults(&mut self, faults: LinkFaults) {
        if faults.bandwidth != self.faults.bandwidth || faults.burst != self.faults.burst {
            self.tokens_at = None;
        }
        self.faults = faults;
    }

    /// The faults in force.
    pub fn faults(&self) -> &LinkFaults {
        &self.faults
    }

    /// Counters since creation.
    pub fn counters(&self) -> DirectionCounters {
        self.counters
    }

    /// Datagrams waiting for their departure time.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    fn push(&mut self, due: Instant, data: Vec<u8>) {
        self.seq += 1;
        self.queue.push(Queued {
            due,
            seq: self.seq,
            data,
        });
    }

    /// Take in one datagram that arrived at `now`.
    pub fn handle_datagram(&mut self, now: Instant, data: &[u8]) {
        let f = &self.faults;
        self.counters.packets_in += 1;
        self.counters.bytes_in += data.len() as u64;
        // Draw every random number for every datagram so that the decision
        // stream depends only on the datagram's position, not on the faults.
        let r_loss: f64 = self.rng.random();
        let r_jitter: f64 = self.rng.random();
        let r_reorder: f64 = self.rng.random();
        let r_dup: f64 = self.rng.random();
        if f.partitioned {
            self.counters.dropped_partition += 1;
            return;
        }
        if r_loss < f.loss {
            self.counters.dropped_loss += 1;
            return;
        }
        let mut depart = now;
        if let Some(rate) = f.bandwidth {
            let rate = rate as f64;
            let burst = f.burst.max(1) as f64;
            let (tokens, at) = match self.tokens_at {
                None => (burst, now),
                Some(at) => (self.tokens, at),
            };
            let refilled =
                (tokens + rate * now.saturating_duration_since(at).as_secs_f64()).min(burst);
            let after = refilled - data.len() as f64;
            let wait = if after >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-after / rate)
            };
            if wait > f.queue_limit {
                self.tokens = refilled;
                self.tokens_at = Some(now);
                self.counters.dropped_queue += 1;
                return;
            }
            self.tokens = after;
            self.tokens_at = Some(now);
            depart += wait;
        }
        let jitter = f.jitter.as_secs_f64() * (2.0 * r_jitter - 1.0);
        let delay = (f.delay.as_secs_f64() + jitter).max(0.0);
        depart += Duration::from_secs_f64(delay);
        if r_reorder < f.reorder {
            self.counters.reordered += 1;
            depart += f.reorder_gap;
        }
        let dup = r_dup < f.duplicate;
        if dup {
            self.counters.duplicated += 1;
            self.push(depart + Duration::from_millis(1), data.to_vec());
        }
        self.push(depart, data.to_vec());
    }

    /// The next datagram due at `now`, if any. Datagrams due while the
    /// direction is partitioned are dropped here.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        loop {
            if self.queue.peek().is_none_or(|q| q.due > now) {
                return None;
            }
            let q = self.queue.pop()?;
            if self.faults.partitioned {
                self.counters.dropped_partition += 1;
                continue;
            }
            self.counters.forwarded += 1;
            self.counters.bytes_forwarded += q.data.len() as u64;
            return Some(q.data);
        }
    }

    /// When the next datagram is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|q| q.due)
    }

    /// Undo the accounting of a datagram `poll_transmit` returned that could
    /// not be delivered (the driver's destination is unknown or the send
    /// failed).
    fn undeliverable(&mut self, len: usize, send_error: bool) {
        self.counters.forwarded -= 1;
        self.counters.bytes_forwarded -= len as u64;
        if send_error {
            self.counters.send_errors += 1;
        } else {
            self.counters.no_peer += 1;
        }
    }
}

/// Where a relay listens and whom it connects.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Address node A dials to reach B (port 0: any free port).
    pub a_side: SocketAddr,
    /// Address B sees A at (port 0: any free port).
    pub b_side: SocketAddr,
    /// Node B's real address.
    pub b_peer: SocketAddr,
    /// Node A's real address, if known in advance; otherwise it is learned
    /// from the latest datagram arriving on side A, and B-to-A datagrams
    /// before that are dropped (`no_peer`).
    pub a_peer: Option<SocketAddr>,
    /// Seed of the random decisions (each direction derives its own).
    pub seed: u64,
    /// Initial faults per direction (`[AToB, BToA]`).
    pub faults: [LinkFaults; 2],
}

impl RelayConfig {
    /// A relay in front of `target`, listening on `listen`, clean both ways.
    pub fn proxy(listen: SocketAddr, target: SocketAddr, seed: u64) -> RelayConfig {
        RelayConfig {
            a_side: listen,
            b_side: SocketAddr::from(([127, 0, 0, 1], 0)),
            b_peer: target,
            a_peer: None,
            seed,
            faults: [LinkFaults::default(), LinkFaults::default()],
        }
    }
}

#[derive(Debug, Default)]
struct Control {
    faults: Mutex<[LinkFaults; 2]>,
    generation: AtomicU64,
    counters: [AtomicCounters; 2],
    shutdown: Notify,
    wake: Notify,
}

/// A cloneable handle to change a running relay's faults and read its
/// counters.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    control: Arc<Control>,
}

impl RelayHandle {
    /// Replace the faults of one direction. Takes effect for every datagram
    /// the relay handles after this returns, and for queued ones at their
    /// departure if it is a partition.
    pub fn set_faults(&self, dir: Direction, faults: LinkFaults) -> Result<(), LinkError> {
        faults.validate()?;
        {
            let mut g = self
                .control
                .faults
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            g[dir.index()] = faults;
        }
        self.control.generation.fetch_add(1, Ordering::SeqCst);
        self.control.wake.notify_one();
        Ok(())
    }

    /// Change one direction's faults in place.
    pub fn update(&self, dir: Direction, f: impl FnOnce(&mut LinkFaults)) -> Result<(), LinkError> {
        let mut faults = self.faults(dir);
        f(&mut faults);
        self.set_faults(dir, faults)
    }

    /// The faults of one direction.
    pub fn faults(&self, dir: Direction) -> LinkFaults {
        let g = self
            .control
            .faults
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        g[dir.index()].clone()
    }

    /// Cut one direction (a one-way partition) without touching its other
    /// faults.
    pub fn partition(&self, dir: Direction) -> Result<(), LinkError> {
        self.update(dir, |f| f.partitioned = true)
    }

    /// Cut both directions.
    pub fn partition_both(&self) -> Result<(), LinkError> {
        for d in Direction::BOTH {
            self.partition(d)?;
        }
        Ok(())
    }

    /// Lift the partition of both directions, keeping other faults.
    pub fn heal(&self) -> Result<(), LinkError> {
        for d in Direction::BOTH {
            self.update(d, |f| f.partitioned = false)?;
        }
        Ok(())
    }

    /// Remove every fault in both directions.
    pub fn clear(&self) -> Result<(), LinkError> {
        for d in Direction::BOTH {
            self.set_faults(d, LinkFaults::clean())?;
        }
        Ok(())
    }

    /// Counters of one direction.
    pub fn counters(&self, dir: Direction) -> DirectionCounters {
        self.control.counters[dir.index()].snapshot()
    }
}

/// A running relay. Dropping it stops the relay task; [`Relay::shutdown`]
/// stops it and waits.
#[derive(Debug)]
pub struct Relay {
    a_side: SocketAddr,
    b_side: SocketAddr,
    handle: RelayHandle,
    task: Option<JoinHandle<()>>,
}

fn check_loopback(which: &'static str, addr: SocketAddr) -> Result<(), LinkError> {
    match addr {
        SocketAddr::V4(v4) if *v4.ip() == std::net::Ipv4Addr::LOCALHOST => Ok(()),
        // The veth addresses of this process's own fleet namespaces.
        _ if crate::netns::is_own_address(addr.ip()) => Ok(()),
        _ => Err(LinkError::NotLoopback { which, addr }),
    }
}

async fn bind(which: &'static str, addr: SocketAddr) -> Result<UdpSocket, LinkError> {
    check_loopback(which, addr)?;
    UdpSocket::bind(addr)
        .await
        .map_err(|source| LinkError::Bind {
            which,
            addr,
            source,
        })
}

impl Relay {
    /// Bind both sides and start relaying on the current tokio runtime.
    pub async fn spawn(config: RelayConfig) -> Result<Relay, LinkError> {
        check_loopback("b_peer", config.b_peer)?;
        if let Some(a) = config.a_peer {
            check_loopback("a_peer", a)?;
        }
        for f in &config.faults {
            f.validate()?;
        }
        let sock_a = bind("a_side", config.a_side).await?;
        let sock_b = bind("b_side", config.b_side).await?;
        let local = |s: &UdpSocket, which, addr| {
            s.local_addr().map_err(|source| LinkError::Bind {
                which,
                addr,
                source,
            })
        };
        let a_side = local(&sock_a, "a_side", config.a_side)?;
        let b_side = local(&sock_b, "b_side", config.b_side)?;
        let control = Arc::new(Control {
            faults: Mutex::new(config.faults.clone()),
            ..Control::default()
        });
        let handle = RelayHandle {
            control: control.clone(),
        };
        let driver = Driver {
            sock_a,
            sock_b,
            b_peer: config.b_peer,
            a_peer: config.a_peer,
            shapers: [
                Shaper::new(config.seed ^ 0xA2B_0000_0000_0001),
                Shaper::new(config.seed ^ 0xB2A_0000_0000_0002),
            ],
            reported: [DirectionCounters::default(); 2],
            generation: u64::MAX,
            control,
        };
        let task = tokio::spawn(driver.run());
        tracing::debug!(%a_side, %b_side, b_peer = %config.b_peer, "relay started");
        Ok(Relay {
            a_side,
            b_side,
            handle,
            task: Some(task),
        })
    }

    /// The address node A dials to reach B.
    pub fn a_side(&self) -> SocketAddr {
        self.a_side
    }

    /// The address B sees A at.
    pub fn b_side(&self) -> SocketAddr {
        self.b_side
    }

    /// A handle to change faults and read counters.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// Stop the relay and wait for its task to end. Queued datagrams are
    /// discarded.
    pub async fn shutdown(mut self) -> Result<(), LinkError> {
        self.handle.control.shutdown.notify_one();
        match self.task.take() {
            Some(t) => t.await.map_err(|e| LinkError::Task(e.to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct Driver {
    sock_a: UdpSocket,
    sock_b: UdpSocket,
    b_peer: SocketAddr,
    a_peer: Option<SocketAddr>,
    shapers: [Shaper; 2],
    reported: [DirectionCounters; 2],
    generation: u64,
    control: Arc<Control>,
}

impl Driver {
    fn refresh_faults(&mut self) {
        let generation = self.control.generation.load(Ordering::SeqCst);
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let faults = self
            .control
            .faults
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone();
        for (s, f) in self.shapers.iter_mut().zip(faults) {
            s.set_faults(f);
        }
    }

    fn publish(&mut self) {
        for i in 0..2 {
            let now = self.shapers[i].counters();
            let prev = self.reported[i];
            let delta = DirectionCounters {
                packets_in: now.packets_in - prev.packets_in,
                bytes_in: now.bytes_in - prev.bytes_in,
                forwarded: now.forwarded - prev.forwarded,
                bytes_forwarded: now.bytes_forwarded - prev.bytes_forwarded,
                dropped_partition: now.dropped_partition - prev.dropped_partition,
                dropped_loss: now.dropped_loss - prev.dropped_loss,
                dropped_queue: now.dropped_queue - prev.dropped_queue,
                duplicated: now.duplicated - prev.duplicated,
                reordered: now.reordered - prev.reordered,
                send_errors: now.send_errors - prev.send_errors,
                no_peer: now.no_peer - prev.no_peer,
            };
            self.control.counters[i].add(&delta);
            self.reported[i] = now;
        }
    }

    async fn flush(&mut self, now: Instant) {
        for dir in Direction::BOTH {
            let (dest, sock) = match dir {
                Direction::AToB => (Some(self.b_peer), &self.sock_b),
                Direction::BToA => (self.a_peer, &self.sock_a),
            };
            let shaper = &mut self.shapers[dir.index()];
            while let Some(data) = shaper.poll_transmit(now) {
                match dest {
                    None => shaper.undeliverable(data.len(), false),
                    Some(to) => {
                        if let Err(e) = sock.send_to(&data, to).await {
                            tracing::debug!(error = %e, %to, "relay send failed");
                            shaper.undeliverable(data.len(), true);
                        }
                    }
                }
            }
        }
    }

    async fn run(mut self) {
        let mut buf_a = vec![0u8; MAX_DATAGRAM];
        let mut buf_b = vec![0u8; MAX_DATAGRAM];
        let control = self.control.clone();
        let mut stray: u64 = 0;
        loop {
            self.refresh_faults();
            let now = Instant::now();
            self.flush(now).await;
            self.publish();
            let next = [
                self.shapers[0].poll_timeout(),
                self.shapers[1].poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep_until = tokio::time::Instant::from_std(
                next.unwrap_or_else(|| now + Duration::from_secs(3600)),
            );
            tokio::select! {
                _ = control.shutdown.notified() => break,
                _ = control.wake.notified() => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
                r = self.sock_a.recv_from(&mut buf_a) => match r {
                    Ok((n, from)) => {
                        let expected = self.a_peer.is_none_or(|a| a == from);
                        if expected && from != self.b_peer {
                            self.a_peer = Some(from);
                            self.refresh_faults();
                            self.shapers[0].handle_datagram(Instant::now(), &buf_a[..n]);
                        } else {
                            stray += 1;
                            tracing::debug!(%from, stray, "relay dropped a datagram from an unknown source on side a");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "relay receive on side a failed"),
                },
                r = self.sock_b.recv_from(&mut buf_b) => match r {
                    Ok((n, from)) => {
                        if from == self.b_peer {
                            self.refresh_faults();
                            self.shapers[1].handle_datagram(Instant::now(), &buf_b[..n]);
                        } else {
                            stray += 1;
                            tracing::debug!(%from, stray, "relay dropped a datagram from an unknown source on side b");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "relay receive on side b failed"),
                },
            }
        }
        tracing::debug!(stray, "relay stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_shaper(
        s: &mut Shaper,
        t0: Instant,
        n: usize,
        spacing: Duration,
    ) -> Vec<(Duration, Vec<u8>)> {
        let mut out = Vec::new();
        let end = t0 + spacing * (n as u32) + Duration::from_secs(10);
        let mut now = t0;
        let mut i = 0;
        while now <= end {
            if i < n && t0 + spacing * (i as u32) <= now {
                s.handle_datagram(now, &(i as u32).to_be_bytes());
                i += 1;
            }
            while let Some(d) = s.poll_transmit(now) {
                out.push((now - t0, d));
            }
            now += Duration::from_millis(1);
        }
        out
    }

    fn id(d: &[u8]) -> u32 {
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    #[test]
    fn clean_link_forwards_in_order_without_delay() {
        let mut s = Shaper::new(1);
        let t0 = Instant::now();
        let out = run_shaper(&mut s, t0, 50, Duration::from_millis(2));
        assert_eq!(out.len(), 50);
        for (i, (at, d)) in out.iter().enumerate() {
            assert_eq!(id(d), i as u32);
            assert_eq!(*at, Duration::from_millis(2) * i as u32);
        }
    }

    #[test]
    fn loss_is_seeded_and_near_its_probability() {
        let run = |seed| {
            let mut s = Shaper::new(seed);
            s.set_faults(LinkFaults {
                loss: 0.3,
                ..LinkFaults::default()
            });
            let out = run_shaper(&mut s, Instant::now(), 2000, Duration::from_millis(1));
            (
                out.into_iter().map(|(_, d)| id(&d)).collect::<Vec<_>>(),
                s.counters(),
            )
        };
        let (a, ca) = run(7);
        let (b, _) = run(7);
        let (c, _) = run(8);
        assert_eq!(a, b, "same seed, same decisions");
        assert_ne!(a, c, "another seed, other decisions");
        assert_eq!(ca.dropped_loss + ca.forwarded, 2000);
        assert!((500..700).contains(&ca.dropped_loss), "{ca:?}");
    }

    #[test]
    fn partition_drops_queued_datagrams_too() {
        let mut s = Shaper::new(1);
        s.set_faults(LinkFaults {
            delay: Duration::from_millis(100),
            ..LinkFaults::default()
        });
        let t0 = Instant::now();
        for i in 0..10u32 {
            s.handle_datagram(t0, &i.to_be_bytes());
        }
        s.set_faults(LinkFaults {
            partitioned: true,
            delay: Duration::from_millis(100),
            ..LinkFaults::default()
        });
        s.handle_datagram(t0, &[0; 4]);
        assert!(s.poll_transmit(t0 + Duration::from_secs(1)).is_none());
        let c = s.counters();
        assert_eq!(
            (c.forwarded, c.dropped_partition, c.packets_in),
            (0, 11, 11)
        );
    }

    #[test]
    fn delay_jitter_reorder_and_duplicates() {
        let mut s = Shaper::new(3);
        s.set_faults(LinkFaults {
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(20),
            duplicate: 0.2,
            reorder: 0.1,
            reorder_gap: Duration::from_millis(40),
            ..LinkFaults::default()
        });
        let out = run_shaper(&mut s, Instant::now(), 500, Duration::from_millis(1));
        let c = s.counters();
        assert_eq!(out.len() as u64, 500 + c.duplicated);
        assert!(c.duplicated > 50 && c.duplicated < 150, "{c:?}");
        assert!(c.reordered > 20 && c.reordered < 90, "{c:?}");
        // Every datagram left no earlier than 30 ms after it arrived.
        for (at, d) in &out {
            assert!(
                *at >= Duration::from_millis(30 + u64::from(id(d))),
                "{} at {at:?}",
                id(d)
            );
        }
        let ids: Vec<u32> = out.iter().map(|(_, d)| id(d)).collect();
        assert!(ids.windows(2).any(|w| w[0] > w[1]), "no reordering seen");
    }

    #[test]
    fn bandwidth_cap_paces_and_drops_over_the_queue_limit() {
        let mut s = Shaper::new(1);
        s.set_faults(LinkFaults {
            bandwidth: Some(100_000),
            burst: 1000,
            queue_limit: Duration::from_millis(200),
            ..LinkFaults::default()
        });
        let t0 = Instant::now();
        // 100 datagrams of 1000 bytes at once: 1 s of traffic at 100 kB/s.
        for _ in 0..100 {
            s.handle_datagram(t0, &[0u8; 1000]);
        }
        let c = s.counters();
        // The burst plus 200 ms of queue: 1 + 20 datagrams fit.
        assert_eq!(c.dropped_queue, 79, "{c:?}");
        let mut last = t0;
        let mut n = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            while s.poll_transmit(now).is_some() {
                n += 1;
                last = now;
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(n, 21);
        let took = last - t0;
        assert!(
            took >= Duration::from_millis(199) && took <= Duration::from_millis(202),
            "{took:?}"
        );
    }

    /// Over many seeds and random fault mixes: every datagram is accounted
    /// for, none is delivered more than twice, none before its minimum delay,
    /// and nothing is delivered while partitioned.
    #[test]
    fn seeded_schedules_conserve_datagrams() {
        for seed in 0..200u64 {
            let mut pick = StdRng::seed_from_u64(seed);
            let faults = LinkFaults {
                loss: pick.random_range(0.0..0.5),
                delay: Duration::from_millis(pick.random_range(0..30)),
                jitter: Duration::from_millis(pick.random_range(0..10)),
                duplicate: pick.random_range(0.0..0.5),
                reorder: pick.random_range(0.0..0.5),
                reorder_gap: Duration::from_millis(pick.random_range(1..40)),
                bandwidth: pick
                    .random_bool(0.5)
                    .then(|| pick.random_range(10_000..1_000_000)),
                burst: pick.random_range(100..10_000),
                queue_limit: Duration::from_millis(pick.random_range(1..200)),
                partitioned: false,
            };
            let min_delay = faults.delay.saturating_sub(faults.jitter);
            let mut s = Shaper::new(seed);
            s.set_faults(faults);
            let t0 = Instant::now();
            let mut sent_at = Vec::new();
            let mut delivered = vec![0u32; 300];
            let mut now = t0;
            let mut i = 0u32;
            while now < t0 + Duration::from_secs(5) {
                if i < 300 && pick.random_bool(0.5) {
                    s.handle_datagram(now, &i.to_be_bytes());
                    sent_at.push(now);
                    i += 1;
                }
                if seed % 3 == 0 && i == 150 && !s.faults().partitioned {
                    let mut f = s.faults().clone();
                    f.partitioned = true;
                    s.set_faults(f);
                }
                while let Some(d) = s.poll_transmit(now) {
                    assert!(
                        !s.faults().partitioned,
                        "seed {seed}: delivered while partitioned"
                    );
                    let k = id(&d) as usize;
                    delivered[k] += 1;
                    assert!(
                        now >= sent_at[k] + min_delay,
                        "seed {seed}: datagram {k} too early"
                    );
                }
                now += Duration::from_millis(1);
            }
            let c = s.counters();
            assert_eq!(s.queued(), 0, "seed {seed}");
            assert!(delivered.iter().all(|&n| n <= 2), "seed {seed}");
            assert_eq!(
                c.packets_in + c.duplicated,
                c.forwarded + c.dropped_loss + c.dropped_queue + c.dropped_partition,
                "seed {seed}: {c:?}"
            );
            assert_eq!(
                delivered.iter().map(|&n| u64::from(n)).sum::<u64>(),
                c.forwarded,
                "seed {seed}"
            );
            if seed % 3 == 0 {
                assert!(
                    c.dropped_partition > 0,
                    "seed {seed}: the partition dropped nothing"
                );
            }
        }
    }

    #[test]
    fn invalid_faults_are_refused() {
        let e = LinkFaults {
            loss: 1.5,
            ..LinkFaults::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("loss"), "{e}");
        let e = LinkFaults {
            bandwidth: Some(0),
            ..LinkFaults::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("bandwidth"), "{e}");
    }
}
