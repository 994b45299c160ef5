//! Node keys and actor ids.
//!
//! Every node has one ed25519 key. It is the node's iroh `EndpointId` and it
//! signs. Automerge actor ids are bound to it: an actor id is the 32 bytes of
//! the node's public key followed by 8 bytes chosen at random per process, so
//! one key never reuses an actor in two processes, and anyone can read the
//! authoring key of a change off its actor id.

use std::io::Write;
use std::path::Path;

use automerge::ActorId;
use schemas::identity::EndpointKey;

/// Length of an actor id: key bytes plus the per-process part.
pub const ACTOR_LEN: usize = 40;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read, created or written.
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a 32-byte key.
    #[error(
        "key file {path}: expected 32 bytes (an ed25519 secret key), found {len}; restore it from backup or remove it to create a new identity (a new identity must be enrolled again)"
    )]
    Corrupt { path: String, len: usize },
    /// The file is readable by others.
    #[error(
        "key file {path} has mode {mode:o}: readable by group or others; fix with `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
}

/// A node's secret key.
#[derive(Clone)]
pub struct NodeKey {
    secret: iroh::SecretKey,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.public().short())
    }
}

impl NodeKey {
    /// A fresh random key.
    pub fn generate() -> NodeKey {
        NodeKey {
            secret: iroh::SecretKey::generate(),
        }
    }

    /// A key from 32 secret bytes (deterministic: tests and simulations).
    pub fn from_bytes(bytes: [u8; 32]) -> NodeKey {
        NodeKey {
            secret: iroh::SecretKey::from_bytes(&bytes),
        }
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// Load the key at `path`, or create it (mode 0600, parent folders
    /// created) if there is none. Refuses a key readable by others.
    pub fn load_or_create(path: &Path) -> Result<NodeKey, KeyError> {
        let p = path.display().to_string();
        let io = |source| KeyError::Io {
            path: p.clone(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
                    if mode & 0o077 != 0 {
                        return Err(KeyError::Permissions { path: p, mode });
                    }
                }
                let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Corrupt {
                    path: p.clone(),
                    len: bytes.len(),
                })?;
                Ok(NodeKey::from_bytes(arr))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let key = NodeKey::generate();
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut f = opts.open(path).map_err(io)?;
                f.write_all(&key.to_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn public(&self) -> EndpointKey {
        EndpointKey(*self.secret.public().as_bytes())
    }

    pub fn iroh_secret(&self) -> &iroh::SecretKey {
        &self.secret
    }

    pub fn signing_key(&self) -> &ed25519_dalek::SigningKey {
        self.secret.as_signing_key()
    }

    /// Sign `msg` (64-byte ed25519 signature).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.secret.sign(msg).to_bytes()
    }

    /// A new actor id for this process: the public key plus 8 random bytes.
    pub fn new_actor(&self) -> ActorId {
        actor_for(&self.public(), rand::random::<[u8; 8]>())
    }
}

/// Verify an ed25519 signature by `key` over `msg`.
pub fn verify(key: &EndpointKey, msg: &[u8], sig: &[u8; 64]) -> bool {
    let Ok(pk) = iroh::PublicKey::from_bytes(&key.0) else {
        return false;
    };
    pk.verify(msg, &iroh::Signature::from_bytes(sig)).is_ok()
}

/// The actor id for `key` with a chosen per-process part.
pub fn actor_for(key: &EndpointKey, process: [u8; 8]) -> ActorId {
    let mut bytes = Vec::with_capacity(ACTOR_LEN);
    bytes.extend_from_slice(&key.0);
    bytes.extend_from_slice(&process);
    ActorId::from(bytes)
}

/// The key an actor id belongs to, if it is a node actor.
pub fn key_of_actor(actor: &ActorId) -> Option<EndpointKey> {
    let b = actor.to_bytes();
    if b.len() != ACTOR_LEN {
        return None;
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&b[..32]);
    Some(EndpointKey(k))
}

pub fn to_iroh(key: &EndpointKey) -> Option<iroh::EndpointId> {
    iroh::PublicKey::from_bytes(&key.0).ok()
}

pub fn from_iroh(id: &iroh::EndpointId) -> EndpointKey {
    EndpointKey(*id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let a = NodeKey::load_or_create(&path).unwrap();
        let b = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = NodeKey::load_or_create(&path).unwrap_err();
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }

    #[test]
    fn corrupt_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::fs::write(&path, b"short").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(matches!(
            NodeKey::load_or_create(&path),
            Err(KeyError::Corrupt { len: 5, .. })
        ));
    }

    #[test]
    fn actors_carry_their_key_and_differ_per_process() {
        let k = NodeKey::from_bytes([7; 32]);
        let a1 = k.new_actor();
        let a2 = k.new_actor();
        assert_ne!(a1, a2);
        assert_eq!(key_of_actor(&a1), Some(k.public()));
        assert_eq!(key_of_actor(&ActorId::from(vec![1u8, 2, 3])), None);
        let sig = k.sign(b"hello");
        assert!(verify(&k.public(), b"hello", &sig));
        assert!(!verify(&k.public(), b"hellO", &sig));
    }
}
