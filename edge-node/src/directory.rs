//! The edge's view of who may sync with it.
//!
//! With a hub configured, the directory is the hub-signed registry replica
//! ([`RegistryDirectory`]): it follows the `fleet/identity` document (which
//! the store persists, so it survives restarts and keeps refusing a revoked
//! site peer while the hub is unreachable), and the snapshot received at
//! enrolment is also kept in `{data_dir}/registry.json` so a node enrolled
//! just before losing its uplink still knows its fleet after a restart.
//!
//! Until the replica holds a snapshot (never enrolled, hub never reached),
//! the config file is trusted instead: the hub as `Role::Hub` and every
//! `[[peers]]` entry as an edge of this site. Invariant: once a snapshot is
//! held, the config's peers are no longer consulted, so a revocation wins
//! over the config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemas::config::EdgeConfig;
use schemas::identity::EndpointKey;
use schemas::ids::Role;
use sync_core::authz::{Directory, PeerInfo};
use sync_core::registry::{RegistryDirectory, SignedRegistry};

/// Where the directory's answers come from right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectorySource {
    /// The edge config file (hub and `[[peers]]`): no registry snapshot yet.
    Config,
    /// The hub's signed registry.
    Registry,
}

/// Why the persisted enrolment snapshot could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The hub's endpoint id is not an ed25519 key.
    #[error("hub.endpoint_id {0} is not a valid ed25519 public key")]
    BadHubKey(EndpointKey),
    /// The file could not be read or written.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// The directory the config file implies.
#[derive(Debug, Clone, Default)]
pub struct ConfigDirectory {
    nodes: BTreeMap<EndpointKey, PeerInfo>,
}

impl ConfigDirectory {
    /// The hub (if any) as a hub and every `[[peers]]` entry as an edge of
    /// this node's tenant and site.
    pub fn from_config(cfg: &EdgeConfig) -> ConfigDirectory {
        let mut nodes = BTreeMap::new();
        if let Some(h) = &cfg.hub {
            nodes.insert(
                h.endpoint_id,
                PeerInfo {
                    key: h.endpoint_id,
                    role: Role::Hub,
                    tenant: None,
                    site: None,
                },
            );
        }
        for p in &cfg.peers {
            nodes.insert(
                p.endpoint_id,
                PeerInfo {
                    key: p.endpoint_id,
                    role: Role::Edge,
                    tenant: Some(cfg.node.tenant.clone()),
                    site: Some(cfg.node.site.clone()),
                },
            );
        }
        ConfigDirectory { nodes }
    }
}

impl Directory for ConfigDirectory {
    fn lookup(&self, key: &EndpointKey) -> Option<PeerInfo> {
        self.nodes.get(key).cloned()
    }
}

/// The edge's directory: the registry replica once it holds a snapshot,
/// the config file before.
#[derive(Debug)]
pub struct EdgeDirectory {
    config: ConfigDirectory,
    registry: Option<Arc<RegistryDirectory>>,
    snapshot_file: PathBuf,
}

impl EdgeDirectory {
    /// The directory for `cfg`; loads `{data_dir}/registry.json` if present.
    pub fn new(cfg: &EdgeConfig) -> Result<EdgeDirectory, DirectoryError> {
        let registry = match &cfg.hub {
            Some(h) => Some(Arc::new(
                RegistryDirectory::new(h.endpoint_id)
                    .ok_or(DirectoryError::BadHubKey(h.endpoint_id))?,
            )),
            None => None,
        };
        let d = EdgeDirectory {
            config: ConfigDirectory::from_config(cfg),
            registry,
            snapshot_file: cfg.node.data_dir.join("registry.json"),
        };
        if let Some(signed) = read_snapshot(&d.snapshot_file)?
            && let Some(r) = &d.registry
            && let Err(e) = r.apply(&signed)
        {
            tracing::warn!(file = %d.snapshot_file.display(), error = %e, "saved registry snapshot refused");
        }
        Ok(d)
    }

    /// The registry replica, when a hub is configured.
    pub fn registry(&self) -> Option<&Arc<RegistryDirectory>> {
        self.registry.as_ref()
    }

    /// Where answers come from now.
    pub fn source(&self) -> DirectorySource {
        match &self.registry {
            Some(r) if r.seq().is_some() => DirectorySource::Registry,
            _ => DirectorySource::Config,
        }
    }

    /// The held registry snapshot's sequence number.
    pub fn registry_seq(&self) -> Option<u64> {
        self.registry.as_ref().and_then(|r| r.seq())
    }

    /// Adopt the registry received at enrolment and keep it on disk.
    pub fn adopt_enrolment(&self, signed: &SignedRegistry) -> Result<u64, String> {
        let r = self
            .registry
            .as_ref()
            .ok_or("no hub configured: nothing to enrol with")?;
        let seq = r.apply(signed).map_err(|e| e.to_string())?;
        write_snapshot(&self.snapshot_file, signed).map_err(|e| e.to_string())?;
        Ok(seq)
    }

    /// The role of `key` if it is known (for status pages).
    pub fn lookup_role(&self, key: &EndpointKey) -> Option<Role> {
        self.lookup(key).map(|p| p.role)
    }
}

fn read_snapshot(path: &Path) -> Result<Option<SignedRegistry>, DirectoryError> {
    let err = |reason: String| DirectoryError::File {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| err(format!("not a signed registry: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(format!("read: {e}"))),
    }
}

fn write_snapshot(path: &Path, s: &SignedRegistry) -> Result<(), DirectoryError> {
    let err = |reason: String| DirectoryError::File {
        path: path.to_path_buf(),
        reason,
    };
    let json = serde_json::to_vec(s).map_err(|e| err(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| err(e.to_string()))
}

impl Directory for EdgeDirectory {
    fn lookup(&self, key: &EndpointKey) -> Option<PeerInfo> {
        match &self.registry {
            Some(r) if r.seq().is_some() => r.lookup(key),
            _ => self.config.lookup(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::identity::IdentityRecord;
    use schemas::time::Timestamp;
    use sync_core::identity::NodeKey;
    use sync_core::registry::RegistrySnapshot;

    fn record(k: EndpointKey, revoked: bool) -> IdentityRecord {
        IdentityRecord {
            schema_version: Default::default(),
            endpoint_id: k,
            tenant: "demo".parse().ok(),
            site: "site-1".parse().ok(),
            role: Role::Edge,
            enrolled_at: Timestamp(1_800_000_000_000),
            revoked_at: revoked.then_some(Timestamp(1_800_000_100_000)),
            revoked_reason: revoked.then(|| "stolen".to_string()),
        }
    }

    #[test]
    fn config_until_a_snapshot_then_the_registry_wins_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let hub = NodeKey::from_bytes([1; 32]);
        let peer = EndpointKey([2; 32]);
        let text = format!(
            "[node]\ndata_dir = \"{}\"\n[hub]\nendpoint_id = \"{}\"\naddr = \"127.0.0.1:9\"\n[[peers]]\nendpoint_id = \"{peer}\"\naddr = \"127.0.0.1:10\"\n",
            dir.path().display(),
            hub.public()
        );
        let cfg = EdgeConfig::parse(Path::new("edge.toml"), &text).unwrap();
        let d = EdgeDirectory::new(&cfg).unwrap();
        assert_eq!(d.source(), DirectorySource::Config);
        assert_eq!(d.lookup(&hub.public()).unwrap().role, Role::Hub);
        assert_eq!(d.lookup(&peer).unwrap().role, Role::Edge);
        assert!(d.lookup(&EndpointKey([9; 32])).is_none());

        // The hub revokes the peer; its signed registry is adopted.
        let snap = RegistrySnapshot {
            schema_version: Default::default(),
            issuer: hub.public(),
            seq: 3,
            records: vec![record(peer, true)],
        }
        .sign(hub.signing_key());
        assert_eq!(d.adopt_enrolment(&snap).unwrap(), 3);
        assert_eq!(d.source(), DirectorySource::Registry);
        assert!(
            d.lookup(&peer).is_none(),
            "a revoked peer is refused despite the config"
        );
        assert_eq!(d.lookup(&hub.public()).unwrap().role, Role::Hub);

        // After a restart, without the hub, the snapshot is still there.
        let d2 = EdgeDirectory::new(&cfg).unwrap();
        assert_eq!(d2.registry_seq(), Some(3));
        assert!(d2.lookup(&peer).is_none());

        // A snapshot signed by someone else is refused.
        let forged = RegistrySnapshot {
            schema_version: Default::default(),
            issuer: hub.public(),
            seq: 4,
            records: vec![record(peer, false)],
        }
        .sign(NodeKey::from_bytes([5; 32]).signing_key());
        assert!(d2.adopt_enrolment(&forged).is_err());
        assert!(d2.lookup(&peer).is_none());
    }
}
