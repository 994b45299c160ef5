//! The hub's ed25519 key file: load or create a 32-byte secret key with mode 0600.
//!
//! The file holds exactly the 32 secret bytes (the format `iroh::SecretKey::from_bytes`
//! takes), so the same key can serve as the hub's iroh `EndpointId` and as the signer of
//! join tokens, registry snapshots and audit entries. A new key is written to a temporary
//! file created with mode 0600, fsynced and renamed into place, so a crash never leaves a
//! truncated key behind. A key file readable by group or others is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use schemas::identity::EndpointKey;

/// Length of a secret key file in bytes.
pub const SECRET_KEY_LEN: usize = 32;

/// Why a key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read, created or written.
    #[error("key file {path}: {action}: {source}")]
    Io {
        /// The key file (or its parent directory).
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Group or others have some access to the file: the secret may have leaked.
    #[error(
        "key file {path} has mode {mode:04o}, open to group or others; \
         refusing to use it (fix: chmod 600 {path}, and consider the key compromised if others had access)"
    )]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold exactly 32 bytes.
    #[error(
        "key file {path} is {len} bytes, expected {SECRET_KEY_LEN}: truncated or not a fieldsync key \
         (restore it from backup; deleting it creates a new identity)"
    )]
    WrongLength {
        /// The key file.
        path: PathBuf,
        /// Its actual length.
        len: u64,
    },
    /// The file holds 32 zero bytes: a zeroed or sparse file, not a generated key.
    #[error("key file {path} is all zero bytes: corrupt (restore it from backup)")]
    AllZero {
        /// The key file.
        path: PathBuf,
    },
    /// `create` was asked to create a key that already exists.
    #[error("key file {path} already exists; refusing to overwrite an identity")]
    AlreadyExists {
        /// The key file.
        path: PathBuf,
    },
    /// 32 bytes that are not a valid ed25519 public key.
    #[error("{key} is not a valid ed25519 public key")]
    BadPublicKey {
        /// The offending key.
        key: EndpointKey,
    },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> KeyError + use<> {
    let path = path.to_path_buf();
    move |source| KeyError::Io {
        path,
        action,
        source,
    }
}

/// Load the key at `path`, or create a new random one there if the file does not exist.
/// Returns the key and whether it was created now.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), KeyError> {
    match load(path) {
        Ok(k) => Ok((k, false)),
        Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            match create(path) {
                Ok(k) => Ok((k, true)),
                // Lost a race with another process creating it: use theirs.
                Err(KeyError::AlreadyExists { .. }) => Ok((load(path)?, false)),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Load an existing key file, checking its permissions and length.
pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
    let mut file = File::open(path).map_err(io_err(path, "open"))?;
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() != SECRET_KEY_LEN as u64 {
        return Err(KeyError::WrongLength {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let mut bytes = [0u8; SECRET_KEY_LEN];
    file.read_exact(&mut bytes).map_err(io_err(path, "read"))?;
    if bytes == [0u8; SECRET_KEY_LEN] {
        return Err(KeyError::AllZero {
            path: path.to_path_buf(),
        });
    }
    Ok(SigningKey::from_bytes(&bytes))
}

/// Create a new random key at `path` (mode 0600, parent directories created with 0700).
/// Fails with [`KeyError::AlreadyExists`] if the file exists.
pub fn create(path: &Path) -> Result<SigningKey, KeyError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err(parent, "create parent directory"))?;
    }
    let key = SigningKey::generate(&mut rand::rng());
    let tmp = tmp_path(path);
    let _ = fs::remove_file(&tmp); // a leftover of a crashed create; never a live key
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(&key.to_bytes())
            .map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
    }
    // hard_link fails if the target exists, so a concurrent create never overwrites a key.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(KeyError::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(path, "link into place")(e)),
    }
    sync_parent(path).map_err(io_err(path, "fsync parent directory"))?;
    Ok(key)
}

/// The public key of `key` as an [`EndpointKey`] (the node's endpoint id).
pub fn endpoint_key(key: &SigningKey) -> EndpointKey {
    EndpointKey(key.verifying_key().to_bytes())
}

/// Turn an [`EndpointKey`] into an ed25519 verifying key.
pub fn verifying_key(key: &EndpointKey) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_bytes(&key.0).map_err(|_| KeyError::BadPublicKey { key: *key })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// fsync the directory holding `path`, so a rename or link into it is durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Write `bytes` to `path` atomically: a temporary sibling, fsync, rename, fsync the
/// directory. Readers see the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_is_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/hub.key");
        let (k1, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (k2, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        assert!(matches!(create(&path), Err(KeyError::AlreadyExists { .. })));
        let ek = endpoint_key(&k1);
        assert_eq!(verifying_key(&ek).unwrap(), k1.verifying_key());
    }
}
