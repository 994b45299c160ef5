//! The hub-signed identity registry as the edges see it: snapshots, their
//! verification, a read-only replica and a [`Directory`] built on it.
//!
//! The hub owns the registry (cloud-hub's `Registry`); it ships a
//! [`SignedRegistry`]: the exact JSON bytes of a [`RegistrySnapshot`] plus an
//! ed25519 signature (base64url, no padding) over
//! `"fieldsync registry snapshot v1\0" || payload`. Verification never
//! re-serialises, so the format is byte-stable. A [`RegistryReplica`] keeps
//! the newest verified snapshot and refuses forged, foreign and older ones
//! (no rollback). [`RegistryDirectory`] answers the driver's "who is this
//! key?" from the replica: the hub itself, any fixed peers (an upstream hub),
//! and active (never revoked) records only. Edges feed it from the
//! `fleet/identity` document ([`RegistryDirectory::load_from_store`],
//! [`RegistryDirectory::follow`]), so a site keeps refusing a revoked node
//! while the hub is unreachable.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use schemas::identity::{EndpointKey, IdentityRecord};
use schemas::ids::{DocId, Role};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;
use serde::{Deserialize, Serialize};

use crate::authz::{Directory, PeerInfo};
use crate::store::DocStore;

/// Domain separation for snapshot signatures.
const SNAPSHOT_CONTEXT: &[u8] = b"fieldsync registry snapshot v1\0";

/// The root key of the `fleet/identity` document that holds the snapshot.
pub const IDENTITY_DOC_KEY: &str = "registry";

/// The content of a registry snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrySnapshot {
    /// Schema version of this record.
    #[serde(default)]
    pub schema_version: SchemaVersion,
    /// The hub that signed it.
    pub issuer: EndpointKey,
    /// The registry's sequence number; a replica accepts only increasing numbers.
    pub seq: u64,
    /// Every record, revoked ones included, ordered by endpoint key.
    pub records: Vec<IdentityRecord>,
}

impl RegistrySnapshot {
    /// The record of `endpoint`, if any.
    pub fn lookup(&self, endpoint: &EndpointKey) -> Option<&IdentityRecord> {
        self.records.iter().find(|r| &r.endpoint_id == endpoint)
    }

    /// Sign this snapshot with the hub key `hub` (which should be `issuer`).
    pub fn sign(&self, hub: &SigningKey) -> SignedRegistry {
        // Serialising plain data (strings, numbers, fixed arrays) cannot fail.
        let payload = serde_json::to_string(self).unwrap_or_default();
        let sig = hub.sign(&signing_input(payload.as_bytes()));
        SignedRegistry {
            payload,
            signature: b64url_encode(&sig.to_bytes()),
        }
    }
}

fn signing_input(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SNAPSHOT_CONTEXT.len() + payload.len());
    v.extend_from_slice(SNAPSHOT_CONTEXT);
    v.extend_from_slice(payload);
    v
}

/// A registry snapshot as shipped to edges: the exact JSON bytes that were
/// signed, plus the signature (base64url), so verification never depends on
/// re-serialising.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRegistry {
    /// JSON of a [`RegistrySnapshot`].
    pub payload: String,
    /// base64url ed25519 signature by the hub over the payload.
    pub signature: String,
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The signature is not the expected hub's over this payload.
    #[error("registry snapshot signature does not verify: forged, altered or from another hub")]
    BadSignature,
    /// The signature or payload does not decode.
    #[error("malformed registry snapshot: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// The snapshot names a different issuer than the hub that signed it.
    #[error("registry snapshot names issuer {claimed}, but was signed by {hub}")]
    WrongIssuer {
        /// The issuer in the payload.
        claimed: EndpointKey,
        /// The hub whose key verified it.
        hub: EndpointKey,
    },
    /// Older than (or as old as, but different from) the snapshot already held.
    #[error(
        "registry snapshot seq {got} is not newer than the held seq {held}; refusing a rollback"
    )]
    Stale {
        /// The held sequence number.
        held: u64,
        /// The offered one.
        got: u64,
    },
}

impl SignedRegistry {
    /// Verify the hub's signature and decode the snapshot.
    pub fn verify(&self, hub: &VerifyingKey) -> Result<RegistrySnapshot, SnapshotError> {
        let sig_bytes =
            b64url_decode(&self.signature).map_err(|reason| SnapshotError::Malformed {
                reason: format!("signature is not base64url: {reason}"),
            })?;
        let sig: [u8; 64] =
            sig_bytes
                .as_slice()
                .try_into()
                .map_err(|_| SnapshotError::Malformed {
                    reason: format!("signature is {} bytes, expected 64", sig_bytes.len()),
                })?;
        hub.verify_strict(
            &signing_input(self.payload.as_bytes()),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| SnapshotError::BadSignature)?;
        let snap: RegistrySnapshot =
            serde_json::from_str(&self.payload).map_err(|e| SnapshotError::Malformed {
                reason: format!("payload does not decode: {e}"),
            })?;
        let hub_key = EndpointKey(hub.to_bytes());
        if snap.issuer != hub_key {
            return Err(SnapshotError::WrongIssuer {
                claimed: snap.issuer,
                hub: hub_key,
            });
        }
        Ok(snap)
    }
}

/// Why a peer is refused by a [`RegistryReplica`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerRefused {
    /// The replica holds no snapshot yet.
    #[error("no registry snapshot from the hub yet; refusing {endpoint}")]
    NoSnapshot {
        /// The peer.
        endpoint: EndpointKey,
    },
    /// The key is not in the registry.
    #[error("endpoint {endpoint} is not enrolled (registry seq {seq})")]
    Unknown {
        /// The peer.
        endpoint: EndpointKey,
        /// The snapshot consulted.
        seq: u64,
    },
    /// The key was revoked.
    #[error("endpoint {endpoint} was revoked at {at}: {reason}")]
    Revoked {
        /// The peer.
        endpoint: EndpointKey,
        /// When.
        at: Timestamp,
        /// Why.
        reason: String,
    },
}

/// A read-only copy of the registry: the newest snapshot verified against the hub key.
#[derive(Debug, Clone)]
pub struct RegistryReplica {
    hub: VerifyingKey,
    current: Option<RegistrySnapshot>,
}

impl RegistryReplica {
    /// An empty replica trusting snapshots signed by `hub`.
    pub fn new(hub: VerifyingKey) -> Self {
        RegistryReplica { hub, current: None }
    }

    /// The hub key this replica trusts.
    pub fn hub(&self) -> EndpointKey {
        EndpointKey(self.hub.to_bytes())
    }

    /// Verify `snap` and adopt it if it is newer than the one held. Returns
    /// the new seq. The same snapshot again is accepted as a no-op.
    pub fn apply(&mut self, snap: &SignedRegistry) -> Result<u64, SnapshotError> {
        let new = snap.verify(&self.hub)?;
        if let Some(cur) = &self.current
            && (new.seq < cur.seq || (new.seq == cur.seq && new != *cur))
        {
            return Err(SnapshotError::Stale {
                held: cur.seq,
                got: new.seq,
            });
        }
        let seq = new.seq;
        self.current = Some(new);
        Ok(seq)
    }

    /// The held snapshot's sequence number.
    pub fn seq(&self) -> Option<u64> {
        self.current.as_ref().map(|s| s.seq)
    }

    /// The held snapshot.
    pub fn snapshot(&self) -> Option<&RegistrySnapshot> {
        self.current.as_ref()
    }

    /// Whether `endpoint` may speak: enrolled and not revoked. Returns its record.
    pub fn check_peer(&self, endpoint: &EndpointKey) -> Result<&IdentityRecord, PeerRefused> {
        let Some(snap) = &self.current else {
            return Err(PeerRefused::NoSnapshot {
                endpoint: *endpoint,
            });
        };
        check_record(snap.lookup(endpoint), endpoint, snap.seq)
    }
}

/// Whether a record (looked up in a registry of sequence `seq`) may speak.
pub fn check_record<'a>(
    rec: Option<&'a IdentityRecord>,
    endpoint: &EndpointKey,
    seq: u64,
) -> Result<&'a IdentityRecord, PeerRefused> {
    let rec = rec.ok_or(PeerRefused::Unknown {
        endpoint: *endpoint,
        seq,
    })?;
    if let Some(at) = rec.revoked_at {
        return Err(PeerRefused::Revoked {
            endpoint: *endpoint,
            at,
            reason: rec.revoked_reason.clone().unwrap_or_default(),
        });
    }
    Ok(rec)
}

/// The [`PeerInfo`] the registry gives a record.
pub fn peer_info(rec: &IdentityRecord) -> PeerInfo {
    PeerInfo {
        key: rec.endpoint_id,
        role: rec.role,
        tenant: rec.tenant.clone(),
        site: rec.site.clone(),
    }
}

/// Why a snapshot could not be read from a document store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The store failed.
    #[error("read fleet/identity: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The document's `registry` key does not decode.
    #[error("fleet/identity holds no readable registry: {0}")]
    Doc(String),
    /// The snapshot was refused.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// A [`Directory`] over a [`RegistryReplica`]: the hub itself, fixed peers
/// (e.g. an upstream hub), and the replica's active records.
#[derive(Debug)]
pub struct RegistryDirectory {
    hub: EndpointKey,
    fixed: BTreeMap<EndpointKey, PeerInfo>,
    replica: RwLock<RegistryReplica>,
}

impl RegistryDirectory {
    /// A directory trusting snapshots signed by `hub`, holding none yet.
    /// Returns `None` if `hub` is not a valid ed25519 public key.
    pub fn new(hub: EndpointKey) -> Option<RegistryDirectory> {
        let vk = VerifyingKey::from_bytes(&hub.0).ok()?;
        Some(RegistryDirectory {
            hub,
            fixed: BTreeMap::new(),
            replica: RwLock::new(RegistryReplica::new(vk)),
        })
    }

    /// Also know `peer` regardless of the registry (an upstream hub).
    pub fn with_peer(mut self, peer: PeerInfo) -> RegistryDirectory {
        self.fixed.insert(peer.key, peer);
        self
    }

    /// The hub whose snapshots this directory trusts.
    pub fn hub(&self) -> EndpointKey {
        self.hub
    }

    /// Verify and adopt `snap` (see [`RegistryReplica::apply`]).
    pub fn apply(&self, snap: &SignedRegistry) -> Result<u64, SnapshotError> {
        match self.replica.write() {
            Ok(mut r) => r.apply(snap),
            Err(p) => p.into_inner().apply(snap),
        }
    }

    /// The held snapshot's sequence number.
    pub fn seq(&self) -> Option<u64> {
        self.with(|r| r.seq())
    }

    /// Run `f` on the replica.
    pub fn with<R>(&self, f: impl FnOnce(&RegistryReplica) -> R) -> R {
        match self.replica.read() {
            Ok(r) => f(&r),
            Err(p) => f(&p.into_inner()),
        }
    }

    /// Adopt the snapshot held in `store`'s `fleet/identity` document, if
    /// any. `Ok(None)`: no snapshot there yet.
    pub fn load_from_store(&self, store: &DocStore) -> Result<Option<u64>, LoadError> {
        let got = store.read(&DocId::Identity, |doc| {
            crate::docs::get_root_json::<SignedRegistry>(doc, IDENTITY_DOC_KEY)
        })?;
        let signed = match got {
            None | Some(Ok(None)) => return Ok(None),
            Some(Err(e)) => return Err(LoadError::Doc(e.to_string())),
            Some(Ok(Some(s))) => s,
        };
        Ok(Some(self.apply(&signed)?))
    }

    /// Keep this directory fed from `store`: load now, then reload whenever
    /// `fleet/identity` changes (locally or from a peer). The task ends when
    /// the store's change channel closes; abort it to stop sooner.
    pub fn follow(self: Arc<Self>, store: Arc<DocStore>) -> tokio::task::JoinHandle<()> {
        let mut changes = store.subscribe();
        tokio::spawn(async move {
            let load = |dir: &RegistryDirectory| match dir.load_from_store(&store) {
                Ok(Some(seq)) => tracing::debug!(seq, "registry snapshot adopted"),
                Ok(None) => {}
                Err(LoadError::Snapshot(SnapshotError::Stale { .. })) => {}
                Err(e) => tracing::warn!(error = %e, "registry snapshot refused"),
            };
            load(&self);
            loop {
                match changes.recv().await {
                    Ok(c) if c.id == DocId::Identity => load(&self),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => load(&self),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    }
}

impl Directory for RegistryDirectory {
    fn lookup(&self, key: &EndpointKey) -> Option<PeerInfo> {
        if *key == self.hub {
            return Some(PeerInfo {
                key: self.hub,
                role: Role::Hub,
                tenant: None,
                site: None,
            });
        }
        if let Some(p) = self.fixed.get(key) {
            return Some(p.clone());
        }
        self.with(|r| r.check_peer(key).ok().map(peer_info))
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 4648 §5), the signature encoding.
pub(crate) fn b64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decode base64url without padding; refuses padding, other alphabets and
/// non-canonical trailing bits.
pub(crate) fn b64url_decode(s: &str) -> Result<Vec<u8>, String> {
    let val = |c: u8| -> Result<u32, String> {
        B64.iter()
            .position(|&x| x == c)
            .map(|p| p as u32)
            .ok_or_else(|| format!("invalid character {:?}", c as char))
    };
    let bytes = s.as_bytes();
    if bytes.len() % 4 == 1 {
        return Err(format!("invalid length {}", bytes.len()));
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        let all = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        // Bits beyond the produced bytes must be zero (canonical encoding).
        let mask: u32 = match produced {
            1 => 0xFFFF,
            2 => 0xFF,
            _ => 0,
        };
        if n & mask != 0 {
            return Err("non-canonical trailing bits".into());
        }
        out.extend_from_slice(&all[..produced]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(k: u8, revoked: bool) -> IdentityRecord {
        IdentityRecord {
            schema_version: SchemaVersion::default(),
            endpoint_id: EndpointKey(*SigningKey::from_bytes(&[k; 32]).verifying_key().as_bytes()),
            tenant: "acme".parse().ok(),
            site: "s1".parse().ok(),
            role: Role::Edge,
            enrolled_at: Timestamp(1),
            revoked_at: revoked.then_some(Timestamp(2)),
            revoked_reason: revoked.then(|| "stolen".to_string()),
        }
    }

    fn snap(hub: &SigningKey, seq: u64, recs: Vec<IdentityRecord>) -> SignedRegistry {
        RegistrySnapshot {
            schema_version: SchemaVersion::default(),
            issuer: EndpointKey(hub.verifying_key().to_bytes()),
            seq,
            records: recs,
        }
        .sign(hub)
    }

    #[test]
    fn base64url_round_trips_and_refuses_garbage() {
        for n in 0..70usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let enc = b64url_encode(&data);
            assert!(!enc.contains('='));
            assert_eq!(b64url_decode(&enc).unwrap(), data, "n={n}");
        }
        assert_eq!(b64url_encode(b"\xfb\xff"), "-_8");
        assert!(b64url_decode("ab+c").is_err());
        assert!(b64url_decode("abcde").is_err());
        assert!(b64url_decode("-_9").is_err(), "non-canonical");
    }

    #[test]
    fn directory_knows_hub_and_active_records_only() {
        let hub = SigningKey::from_bytes(&[9; 32]);
        let hub_key = EndpointKey(hub.verifying_key().to_bytes());
        let dir = RegistryDirectory::new(hub_key).unwrap();
        let active = rec(1, false);
        let revoked = rec(2, true);
        assert_eq!(dir.lookup(&hub_key).map(|p| p.role), Some(Role::Hub));
        assert!(dir.lookup(&active.endpoint_id).is_none(), "no snapshot yet");
        dir.apply(&snap(&hub, 3, vec![active.clone(), revoked.clone()]))
            .unwrap();
        assert_eq!(dir.lookup(&active.endpoint_id), Some(peer_info(&active)));
        assert!(dir.lookup(&revoked.endpoint_id).is_none());
        // Rollback and forgery are refused; the held snapshot stays.
        assert!(matches!(
            dir.apply(&snap(&hub, 2, vec![active.clone()])),
            Err(SnapshotError::Stale { .. })
        ));
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            dir.apply(&snap(&other, 4, vec![])),
            Err(SnapshotError::BadSignature)
        );
        let mut tampered = snap(&hub, 5, vec![active.clone()]);
        tampered.payload = tampered.payload.replace("acme", "evil");
        assert_eq!(dir.apply(&tampered), Err(SnapshotError::BadSignature));
        assert_eq!(dir.seq(), Some(3));
    }
}
