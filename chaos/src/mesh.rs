//! One relay per node pair: the wiring a fleet runner puts between its
//! nodes so that every datagram between two nodes crosses that pair's
//! [`Relay`], and the scenario's [`LinkChange`]s can be applied to it.
//!
//! For a link `a <-> b` the relay's A side is the address `a` dials to reach
//! `b` ([`RelayMesh::dial_addr`]`(a, b)`), its B side the address `b` dials
//! to reach `a`. Both real node addresses are given up front, so either
//! side may speak first, and each node only ever sees relay addresses for
//! its peers (see the [`crate::link`] module docs for the iroh settings
//! that keep it that way). With one network namespace per node
//! ([`crate::netns`], [`RelayMesh::spawn_on`]) each relay side binds on the
//! gateway of the node that talks to it, so a node can reach its relays
//! and nothing else.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::link::{Direction, DirectionCounters, LinkError, Relay, RelayConfig};
use crate::scenario::{Link, LinkChange};

/// Errors of the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// A link names a node whose address was not given.
    #[error("link {link}: no address for node {node}")]
    UnknownNode {
        /// The link.
        link: Link,
        /// The node without an address.
        node: String,
    },
    /// A change or query names a link the mesh does not have.
    #[error("no relay for link {0}")]
    UnknownLink(Link),
    /// A relay failed.
    #[error("relay of link {link}: {source}")]
    Relay {
        /// The link.
        link: Link,
        /// The relay's error.
        #[source]
        source: LinkError,
    },
}

/// The relays of a fleet, one per link.
#[derive(Debug)]
pub struct RelayMesh {
    relays: BTreeMap<Link, Relay>,
}

impl RelayMesh {
    /// Start one relay per link between the nodes' real addresses, every
    /// side on 127.0.0.1. The relay of link `i` uses seed `seed + i`.
    pub async fn spawn(
        links: &[Link],
        addrs: &BTreeMap<String, SocketAddr>,
        seed: u64,
    ) -> Result<RelayMesh, MeshError> {
        RelayMesh::spawn_on(links, addrs, &BTreeMap::new(), seed).await
    }

    /// Like [`RelayMesh::spawn`], but the side of a relay that node `n`
    /// talks to binds on `gateways[n]` (its namespace's root-side address,
    /// the only address it can reach); nodes without a gateway get
    /// 127.0.0.1. So for link `a <-> b` the A side is on `gw(a)` and the B
    /// side on `gw(b)`.
    pub async fn spawn_on(
        links: &[Link],
        addrs: &BTreeMap<String, SocketAddr>,
        gateways: &BTreeMap<String, IpAddr>,
        seed: u64,
    ) -> Result<RelayMesh, MeshError> {
        let side = |node: &String| {
            SocketAddr::new(
                gateways
                    .get(node)
                    .copied()
                    .unwrap_or(IpAddr::from([127, 0, 0, 1])),
                0,
            )
        };
        let mut relays = BTreeMap::new();
        for (i, link) in links.iter().enumerate() {
            let addr = |node: &String| {
                addrs
                    .get(node)
                    .copied()
                    .ok_or_else(|| MeshError::UnknownNode {
                        link: link.clone(),
                        node: node.clone(),
                    })
            };
            let (a, b) = (addr(&link.a)?, addr(&link.b)?);
            let cfg = RelayConfig {
                a_side: side(&link.a),
                b_side: side(&link.b),
                b_peer: b,
                a_peer: Some(a),
                seed: seed.wrapping_add(i as u64),
                faults: Default::default(),
            };
            let relay = Relay::spawn(cfg).await.map_err(|source| MeshError::Relay {
                link: link.clone(),
                source,
            })?;
            relays.insert(link.clone(), relay);
        }
        Ok(RelayMesh { relays })
    }

    fn find(&self, from: &str, to: &str) -> Option<(&Relay, bool)> {
        self.relays.iter().find_map(|(l, r)| {
            if l.a == from && l.b == to {
                Some((r, true))
            } else if l.a == to && l.b == from {
                Some((r, false))
            } else {
                None
            }
        })
    }

    /// The address `from` must dial to reach `to`.
    pub fn dial_addr(&self, from: &str, to: &str) -> Option<SocketAddr> {
        self.find(from, to)
            .map(|(r, forward)| if forward { r.a_side() } else { r.b_side() })
    }

    /// Apply one change of the scenario.
    pub fn apply(&self, change: &LinkChange) -> Result<(), MeshError> {
        let relay = self
            .relays
            .get(&change.link)
            .ok_or_else(|| MeshError::UnknownLink(change.link.clone()))?;
        relay
            .handle()
            .set_faults(change.direction, change.faults.clone())
            .map_err(|source| MeshError::Relay {
                link: change.link.clone(),
                source,
            })
    }

    /// Counters of the datagrams `from` sent to `to`.
    pub fn counters(&self, from: &str, to: &str) -> Option<DirectionCounters> {
        self.find(from, to).map(|(r, forward)| {
            r.handle().counters(if forward {
                Direction::AToB
            } else {
                Direction::BToA
            })
        })
    }

    /// The links, in order.
    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.relays.keys()
    }

    /// Stop every relay and wait for them.
    pub async fn shutdown(self) -> Result<(), MeshError> {
        for (link, relay) in self.relays {
            relay
                .shutdown()
                .await
                .map_err(|source| MeshError::Relay { link, source })?;
        }
        Ok(())
    }
}
