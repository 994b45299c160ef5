//! Authorisation: which documents a pair of nodes shares, who may write
//! what, and which authors a peer may introduce.
//!
//! A document is in the *scope* of a connection when both ends may hold it.
//! Both ends compute the same scope from the same rules, so their manifests
//! compare like with like. Both ends enforce it: a node never offers a
//! document outside the scope and refuses changes to one.

use std::collections::BTreeMap;

use automerge::Change;
use schemas::identity::EndpointKey;
use schemas::ids::{DocId, DocKind, Role, SiteId, TenantId};
use schemas::policy::{HubTier, Region};

use crate::docs::{genesis_actor, genesis_hash};
use crate::identity::key_of_actor;

/// What a node is, as the registry (not the node itself) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub key: EndpointKey,
    pub role: Role,
    pub tenant: Option<TenantId>,
    pub site: Option<SiteId>,
}

/// What a hub serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubScope {
    pub tier: HubTier,
    pub regions: Vec<Region>,
    /// Region of each tenant the hub knows.
    pub tenant_regions: BTreeMap<TenantId, Region>,
}

impl HubScope {
    /// Whether this hub may hold documents of `tenant`.
    pub fn serves(&self, tenant: &TenantId) -> bool {
        self.tenant_regions
            .get(tenant)
            .is_some_and(|r| self.regions.contains(r))
    }
}

/// Looks up nodes by key (the identity registry).
pub trait Directory: Send + Sync {
    /// The node with this key, if it is enrolled and not revoked.
    fn lookup(&self, key: &EndpointKey) -> Option<PeerInfo>;

    /// The node that authored a change. By default only active nodes: the
    /// changes of a revoked node are no longer accepted from anyone.
    fn author(&self, key: &EndpointKey) -> Option<PeerInfo> {
        self.lookup(key)
    }
}

/// A fixed directory (tests, simulations, small static fleets).
#[derive(Debug, Clone, Default)]
pub struct StaticDirectory {
    pub nodes: BTreeMap<EndpointKey, PeerInfo>,
}

impl StaticDirectory {
    pub fn insert(&mut self, p: PeerInfo) {
        self.nodes.insert(p.key, p);
    }
}

impl Directory for StaticDirectory {
    fn lookup(&self, key: &EndpointKey) -> Option<PeerInfo> {
        self.nodes.get(key).cloned()
    }
}

/// The local node's view: who it is, and (for hubs) what it serves.
#[derive(Debug, Clone)]
pub struct Authz {
    pub local: PeerInfo,
    /// Set on hubs.
    pub hub: Option<HubScope>,
}

impl Authz {
    pub fn new(local: PeerInfo, hub: Option<HubScope>) -> Authz {
        Authz { local, hub }
    }

    /// May `node` hold `doc`? For the local hub, `scope` is its own; for a
    /// remote hub the local node cannot see its configuration and trusts the
    /// registry's word that it is a hub (the hub enforces its own side).
    fn may_hold_as(node: &PeerInfo, scope: Option<&HubScope>, doc: &DocId) -> bool {
        match node.role {
            Role::Edge => match (doc, &node.tenant, &node.site) {
                (DocId::Identity, _, _) => true,
                (DocId::Policy { tenant }, Some(t), _) => tenant == t,
                (DocId::Aggregate { .. }, _, _) => false,
                (d, Some(t), Some(s)) => d.tenant() == Some(t) && d.site() == Some(s),
                _ => false,
            },
            Role::Hub => match scope {
                None => true,
                Some(h) => match h.tier {
                    HubTier::Global => doc.kind() == DocKind::Aggregate,
                    HubTier::Regional => match doc.tenant() {
                        Some(t) => h.serves(t),
                        None => true,
                    },
                },
            },
            // People use APIs; they never hold replicas.
            Role::Admin | Role::Analyst | Role::Operator => false,
        }
    }

    /// May this node hold `doc` at all?
    pub fn may_hold(&self, doc: &DocId) -> bool {
        Self::may_hold_as(&self.local, self.hub.as_ref(), doc)
    }

    /// Is `doc` shared between this node and `peer`?
    pub fn in_scope(&self, peer: &PeerInfo, doc: &DocId) -> bool {
        let both_hubs = self.local.role == Role::Hub && peer.role == Role::Hub;
        if both_hubs {
            // Hubs exchange only fleet aggregates (regional -> global).
            return doc.kind() == DocKind::Aggregate
                && Self::may_hold_as(&self.local, self.hub.as_ref(), doc)
                && Self::may_hold_as(peer, None, doc);
        }
        Self::may_hold_as(&self.local, self.hub.as_ref(), doc) && Self::may_hold_as(peer, None, doc)
    }

    /// May the connection with `peer` exist at all? A hub refuses edges of
    /// tenants outside its regions (compliance) and people's roles.
    pub fn may_connect(&self, peer: &PeerInfo) -> Result<(), String> {
        match peer.role {
            Role::Admin | Role::Analyst | Role::Operator => {
                return Err(format!("role {} does not sync", peer.role));
            }
            Role::Hub | Role::Edge => {}
        }
        if let (Some(h), Some(t)) = (&self.hub, &peer.tenant)
            && h.tier == HubTier::Regional
            && !h.serves(t)
        {
            return Err(format!("tenant {t} is not served by this hub's regions"));
        }
        if let (Some(h), Role::Edge) = (&self.hub, peer.role)
            && h.tier == HubTier::Global
        {
            return Err("a global hub accepts only regional hubs".into());
        }
        Ok(())
    }

    /// May `peer` introduce `change` to `doc`? The change's author key (from
    /// its actor id) must belong to an enrolled node whose role may write the
    /// document's kind, and `sig` must be that key's signature of the change
    /// hash. So any peer may relay changes of others (edges of a site keep
    /// syncing while the hub is away) but none can forge one.
    pub fn check_change(
        &self,
        peer: &PeerInfo,
        doc: &DocId,
        change: &Change,
        sig: &[u8; 64],
        directory: &dyn Directory,
    ) -> Result<(), String> {
        if !self.in_scope(peer, doc) {
            return Err(format!(
                "{doc} is outside what {} may send",
                peer.key.short()
            ));
        }
        let actor = change.actor_id();
        if *actor == genesis_actor(doc) {
            return if Some(change.hash()) == genesis_hash(doc) {
                Ok(())
            } else {
                Err("change claims the genesis actor but is not the genesis".into())
            };
        }
        let Some(author) = key_of_actor(actor) else {
            return Err(format!("actor {actor} is not bound to a node key"));
        };
        if !verified_signature(&author, &change.hash(), sig) {
            return Err(format!(
                "signature of change by {} does not verify: forged or corrupted",
                author.short()
            ));
        }
        let author_info = if author == peer.key {
            Some(peer.clone())
        } else if author == self.local.key {
            Some(self.local.clone())
        } else {
            directory.author(&author)
        };
        let Some(author_info) = author_info else {
            return Err(format!(
                "author {} is not an enrolled node (forged or revoked)",
                author.short()
            ));
        };
        if !doc.kind().may_write(author_info.role) {
            return Err(format!(
                "a {} may not write {} documents",
                author_info.role,
                doc.kind()
            ));
        }
        if author_info.role == Role::Edge && !Self::may_hold_as(&author_info, None, doc) {
            return Err(format!("edge {} may not write {doc}", author.short()));
        }
        Ok(())
    }
}

/// Signatures verified on this thread, by (author key, change hash,
/// signature). Only successes are kept, and a hit requires the identical
/// triple, so a hit proves exactly what a fresh verification would: the
/// hash is computed by automerge from the change's bytes when they are
/// decoded (never taken from the wire), the author is read off the actor id
/// inside those bytes, and a different signature misses. In one process
/// holding many nodes (the simulator: every change verified by each other
/// node) this turns N-1 verifications of a change into one; a single node
/// mostly misses, at the cost of one set lookup.
const VERIFIED_CAPACITY: usize = 16_384;

type VerifiedKey = ([u8; 32], [u8; 32], [u8; 64]);

thread_local! {
    static VERIFIED: std::cell::RefCell<std::collections::HashSet<VerifiedKey>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// Whether `sig` is `author`'s signature of the change `hash`
/// ([`crate::store::change_sign_payload`]), verified at most once per
/// thread for the same triple.
fn verified_signature(author: &EndpointKey, hash: &automerge::ChangeHash, sig: &[u8; 64]) -> bool {
    let key: VerifiedKey = (author.0, hash.0, *sig);
    if VERIFIED.with(|c| c.borrow().contains(&key)) {
        return true;
    }
    if !crate::identity::verify(author, &crate::store::change_sign_payload(hash), sig) {
        return false;
    }
    VERIFIED.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= VERIFIED_CAPACITY {
            // Bounded memory; entries are only a shortcut, so dropping
            // them all costs re-verification, never a wrong answer.
            c.clear();
        }
        c.insert(key);
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(k: u8, t: &str, s: &str) -> PeerInfo {
        PeerInfo {
            key: EndpointKey([k; 32]),
            role: Role::Edge,
            tenant: t.parse().ok(),
            site: s.parse().ok(),
        }
    }

    fn hub(k: u8) -> PeerInfo {
        PeerInfo {
            key: EndpointKey([k; 32]),
            role: Role::Hub,
            tenant: None,
            site: None,
        }
    }

    fn scope(regions: &[&str], tenants: &[(&str, &str)], tier: HubTier) -> HubScope {
        HubScope {
            tier,
            regions: regions.iter().map(|r| Region::new(*r).unwrap()).collect(),
            tenant_regions: tenants
                .iter()
                .map(|(t, r)| (t.parse().unwrap(), Region::new(*r).unwrap()))
                .collect(),
        }
    }

    fn d(s: &str) -> DocId {
        s.parse().unwrap()
    }

    #[test]
    fn scopes_are_symmetric_between_hub_and_edge() {
        let h = Authz::new(
            hub(1),
            Some(scope(
                &["eu"],
                &[("acme", "eu"), ("other", "us")],
                HubTier::Regional,
            )),
        );
        let e = Authz::new(edge(2, "acme", "s1"), None);
        for doc in [
            "t/acme/s/s1/dev/p",
            "t/acme/s/s2/dev/p",
            "t/acme/policy",
            "t/acme/agg/2026-01-01",
            "fleet/identity",
            "t/other/s/s1/dev/p",
        ] {
            assert_eq!(
                h.in_scope(&e.local, &d(doc)),
                e.in_scope(&h.local, &d(doc)),
                "{doc}"
            );
        }
        assert!(h.in_scope(&e.local, &d("t/acme/s/s1/tel/p/2026-01-01")));
        assert!(!h.in_scope(&e.local, &d("t/acme/s/s2/dev/p")));
        assert!(h.may_connect(&edge(3, "other", "s1")).is_err());
        assert!(h.may_connect(&e.local).is_ok());
    }

    #[test]
    fn global_hub_only_sees_aggregates() {
        let g = Authz::new(hub(9), Some(scope(&["eu", "us"], &[], HubTier::Global)));
        let r = Authz::new(
            hub(1),
            Some(scope(&["eu"], &[("acme", "eu")], HubTier::Regional)),
        );
        assert!(r.in_scope(&g.local, &d("t/acme/agg/2026-01-01")));
        assert!(!r.in_scope(&g.local, &d("t/acme/s/s1/dev/p")));
        assert!(!r.in_scope(&g.local, &d("fleet/identity")));
        assert!(g.may_connect(&edge(2, "acme", "s1")).is_err());
    }

    #[test]
    fn the_verification_cache_reuses_only_the_identical_triple() {
        let k1 = crate::identity::NodeKey::from_bytes([7; 32]);
        let k2 = crate::identity::NodeKey::from_bytes([8; 32]);
        let (a1, a2) = (k1.public(), k2.public());
        let h = automerge::ChangeHash([3; 32]);
        let good = k1.sign(&crate::store::change_sign_payload(&h));
        assert!(verified_signature(&a1, &h, &good));
        // Now cached: a hit for the same triple, misses (and fresh, failing
        // verifications) for anything else.
        assert!(verified_signature(&a1, &h, &good));
        let mut forged = good;
        forged[0] ^= 1;
        assert!(!verified_signature(&a1, &h, &forged));
        assert!(!verified_signature(&a2, &h, &good), "another author");
        let other = automerge::ChangeHash([4; 32]);
        assert!(!verified_signature(&a1, &other, &good), "another change");
        // Failures are not cached.
        assert!(!verified_signature(&a1, &h, &forged));
    }
}
