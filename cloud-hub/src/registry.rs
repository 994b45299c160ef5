//! The identity registry: which endpoint keys may speak, for which tenant, site and role.
//!
//! The hub's [`Registry`] maps [`EndpointKey`] to [`IdentityRecord`] and records the nonce of
//! every redeemed join token. Each mutation builds the next state, persists it through a
//! [`RegistryStore`] and only then replaces the in-memory state, so a failed write changes
//! nothing, and a token's nonce is marked used in the same write that records the node.
//! Every mutation bumps a sequence number.
//!
//! For the edges, [`Registry::signed_snapshot`] produces a [`SignedRegistry`]: the records and
//! the sequence number as JSON, signed by the hub. The snapshot types live in
//! `sync_core::registry` (re-exported here) so edges can verify them: a [`RegistryReplica`]
//! holds the newest verified snapshot read-only and answers "may this peer speak?" while the
//! hub is unreachable; it refuses forged snapshots and snapshots older than the one it holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ed25519_dalek::SigningKey;
use schemas::identity::{EndpointKey, IdentityRecord};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;
use serde::{Deserialize, Serialize};

use crate::keys::{endpoint_key, write_atomic};
use crate::tokens::{self, TokenError};

use sync_core::registry::check_record;
pub use sync_core::registry::{
    PeerRefused, RegistryReplica, RegistrySnapshot, SignedRegistry, SnapshotError,
};

/// A redeemed join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsedToken {
    /// The node that redeemed it.
    pub endpoint: EndpointKey,
    /// When.
    pub at: Timestamp,
}

/// Everything the registry persists.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RegistryState {
    /// Schema version of this record.
    #[serde(default)]
    pub schema_version: SchemaVersion,
    /// Bumped by every mutation; snapshots carry it so edges can refuse older ones.
    pub seq: u64,
    /// Enrolled nodes, revoked ones included.
    pub records: BTreeMap<EndpointKey, IdentityRecord>,
    /// Redeemed token nonces.
    pub used_tokens: BTreeMap<String, UsedToken>,
}

/// Why the registry storage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing the backing file failed.
    #[error("registry file {path}: {action}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The stored registry does not decode.
    #[error("registry file {path} is corrupt: {reason} (restore it from backup)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decode error.
        reason: String,
    },
}

/// Where the registry state lives. Small on purpose, so the registry can move into
/// sync-core's store later.
pub trait RegistryStore {
    /// The stored state, or `None` if nothing was ever saved.
    fn load(&self) -> Result<Option<RegistryState>, StoreError>;
    /// Replace the stored state durably and atomically.
    fn save(&self, state: &RegistryState) -> Result<(), StoreError>;
}

impl<T: RegistryStore + ?Sized> RegistryStore for std::sync::Arc<T> {
    fn load(&self) -> Result<Option<RegistryState>, StoreError> {
        (**self).load()
    }
    fn save(&self, state: &RegistryState) -> Result<(), StoreError> {
        (**self).save(state)
    }
}

/// A JSON file written atomically (temporary file, fsync, rename, fsync directory).
#[derive(Debug, Clone)]
pub struct JsonFileStore {
    path: PathBuf,
}

impl JsonFileStore {
    /// A store backed by the file at `path` (created on first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonFileStore { path: path.into() }
    }
    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl RegistryStore for JsonFileStore {
    fn load(&self) -> Result<Option<RegistryState>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    action: "read",
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    fn save(&self, state: &RegistryState) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            action: "write",
            source,
        })
    }
}

/// An in-memory store for tests; `fail_writes` makes every save fail.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<Option<RegistryState>>,
    /// When true, `save` fails (to test that a failed write changes nothing).
    pub fail_writes: std::sync::atomic::AtomicBool,
}

impl RegistryStore for MemoryStore {
    fn load(&self) -> Result<Option<RegistryState>, StoreError> {
        Ok(self.state.lock().map(|s| s.clone()).unwrap_or_default())
    }
    fn save(&self, state: &RegistryState) -> Result<(), StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io {
                path: PathBuf::from("<memory>"),
                action: "write",
                source: std::io::Error::other("injected write failure"),
            });
        }
        if let Ok(mut s) = self.state.lock() {
            *s = Some(state.clone());
        }
        Ok(())
    }
}

/// Why a registry operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The join token was refused.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The endpoint is already enrolled and not revoked.
    #[error("endpoint {endpoint} is already enrolled (tenant {tenant}, site {site}, role {role})")]
    AlreadyEnrolled {
        /// The endpoint.
        endpoint: EndpointKey,
        /// Its tenant.
        tenant: String,
        /// Its site.
        site: String,
        /// Its role.
        role: schemas::ids::Role,
    },
    /// The endpoint was revoked; a revoked key never comes back.
    #[error(
        "endpoint {endpoint} was revoked at {at} ({reason}); a revoked key cannot re-enrol, give the node a new key"
    )]
    Revoked {
        /// The endpoint.
        endpoint: EndpointKey,
        /// When it was revoked.
        at: Timestamp,
        /// Why.
        reason: String,
    },
    /// The endpoint is the hub's own key.
    #[error("endpoint {endpoint} is this hub's own key; it cannot enrol as a node")]
    HubKey {
        /// The endpoint.
        endpoint: EndpointKey,
    },
    /// No such endpoint in the registry.
    #[error("endpoint {endpoint} is not enrolled")]
    NotEnrolled {
        /// The endpoint.
        endpoint: EndpointKey,
    },
    /// A revocation needs a reason.
    #[error("a revocation needs a non-empty reason (say why, it goes to the audit log)")]
    MissingReason,
    /// The store failed; nothing was changed.
    #[error("registry storage failed, nothing was changed: {0}")]
    Store(#[from] StoreError),
}

/// The hub's registry: the state plus the key that signs its snapshots.
pub struct Registry<S: RegistryStore> {
    store: S,
    state: RegistryState,
    hub: SigningKey,
}

impl<S: RegistryStore> std::fmt::Debug for Registry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("hub", &endpoint_key(&self.hub))
            .field("seq", &self.state.seq)
            .field("records", &self.state.records.len())
            .finish()
    }
}

impl<S: RegistryStore> Registry<S> {
    /// Open the registry in `store` (empty if nothing was saved), owned by hub key `hub`.
    pub fn open(store: S, hub: SigningKey) -> Result<Self, RegistryError> {
        let state = store.load()?.unwrap_or_default();
        Ok(Registry { store, state, hub })
    }

    /// Redeem `token` for `endpoint`: verify it (this hub's signature, not expired, role
    /// allowed, never used), then record the node and mark the token used in one write.
    pub fn enrol(
        &mut self,
        token: &str,
        endpoint: EndpointKey,
        now: Timestamp,
    ) -> Result<IdentityRecord, RegistryError> {
        let claims = tokens::verify(token, &self.hub.verifying_key(), now)?;
        if let Some(used) = self.state.used_tokens.get(&claims.nonce) {
            return Err(TokenError::AlreadyUsed {
                endpoint: used.endpoint,
                at: used.at,
            }
            .into());
        }
        if endpoint == endpoint_key(&self.hub) {
            return Err(RegistryError::HubKey { endpoint });
        }
        if let Some(r) = self.state.records.get(&endpoint) {
            return Err(match r.revoked_at {
                Some(at) => RegistryError::Revoked {
                    endpoint,
                    at,
                    reason: r.revoked_reason.clone().unwrap_or_default(),
                },
                None => RegistryError::AlreadyEnrolled {
                    endpoint,
                    tenant: r.tenant.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                    site: r.site.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                    role: r.role,
                },
            });
        }
        let record = IdentityRecord {
            schema_version: SchemaVersion::default(),
            endpoint_id: endpoint,
            tenant: Some(claims.tenant),
            site: Some(claims.site),
            role: claims.role,
            enrolled_at: now,
            revoked_at: None,
            revoked_reason: None,
        };
        let mut next = self.state.clone();
        next.seq += 1;
        next.records.insert(endpoint, record.clone());
        next.used_tokens
            .insert(claims.nonce, UsedToken { endpoint, at: now });
        self.commit(next)?;
        Ok(record)
    }

    /// Record `endpoint` as a hub (a regional hub allowed to sync fleet aggregates into this
    /// global hub). No token: an admin adds it by hand. Refuses a key already known.
    pub fn add_hub(
        &mut self,
        endpoint: EndpointKey,
        now: Timestamp,
    ) -> Result<IdentityRecord, RegistryError> {
        if endpoint == endpoint_key(&self.hub) {
            return Err(RegistryError::HubKey { endpoint });
        }
        if let Some(r) = self.state.records.get(&endpoint) {
            return Err(match r.revoked_at {
                Some(at) => RegistryError::Revoked {
                    endpoint,
                    at,
                    reason: r.revoked_reason.clone().unwrap_or_default(),
                },
                None => RegistryError::AlreadyEnrolled {
                    endpoint,
                    tenant: r.tenant.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                    site: r.site.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                    role: r.role,
                },
            });
        }
        let record = IdentityRecord {
            schema_version: SchemaVersion::default(),
            endpoint_id: endpoint,
            tenant: None,
            site: None,
            role: schemas::ids::Role::Hub,
            enrolled_at: now,
            revoked_at: None,
            revoked_reason: None,
        };
        let mut next = self.state.clone();
        next.seq += 1;
        next.records.insert(endpoint, record.clone());
        self.commit(next)?;
        Ok(record)
    }

    /// Revoke `endpoint` for `reason` at `now`. Revoking twice is an error naming the
    /// first revocation.
    pub fn revoke(
        &mut self,
        endpoint: &EndpointKey,
        reason: &str,
        now: Timestamp,
    ) -> Result<IdentityRecord, RegistryError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(RegistryError::MissingReason);
        }
        let Some(current) = self.state.records.get(endpoint) else {
            return Err(RegistryError::NotEnrolled {
                endpoint: *endpoint,
            });
        };
        if let Some(at) = current.revoked_at {
            return Err(RegistryError::Revoked {
                endpoint: *endpoint,
                at,
                reason: current.revoked_reason.clone().unwrap_or_default(),
            });
        }
        let mut record = current.clone();
        record.revoked_at = Some(now);
        record.revoked_reason = Some(reason.to_string());
        let mut next = self.state.clone();
        next.seq += 1;
        next.records.insert(*endpoint, record.clone());
        self.commit(next)?;
        Ok(record)
    }

    fn commit(&mut self, next: RegistryState) -> Result<(), RegistryError> {
        self.store.save(&next)?;
        self.state = next;
        Ok(())
    }

    /// The record of `endpoint`, revoked or not.
    pub fn lookup(&self, endpoint: &EndpointKey) -> Option<&IdentityRecord> {
        self.state.records.get(endpoint)
    }

    /// Whether `endpoint` may connect now: enrolled and not revoked. The hub's
    /// connection check; edges use [`RegistryReplica::check_peer`].
    pub fn check_peer(&self, endpoint: &EndpointKey) -> Result<&IdentityRecord, PeerRefused> {
        check_record(self.state.records.get(endpoint), endpoint, self.state.seq)
    }

    /// All records, ordered by endpoint key.
    pub fn list(&self) -> impl Iterator<Item = &IdentityRecord> {
        self.state.records.values()
    }

    /// The current sequence number (0 for a registry never changed).
    pub fn seq(&self) -> u64 {
        self.state.seq
    }

    /// The hub key that owns this registry.
    pub fn hub_key(&self) -> EndpointKey {
        endpoint_key(&self.hub)
    }

    /// The whole registry as a hub-signed snapshot for the edges.
    pub fn signed_snapshot(&self) -> SignedRegistry {
        let snapshot = RegistrySnapshot {
            schema_version: SchemaVersion::default(),
            issuer: endpoint_key(&self.hub),
            seq: self.state.seq,
            records: self.state.records.values().cloned().collect(),
        };
        snapshot.sign(&self.hub)
    }
}
