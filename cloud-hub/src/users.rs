//! API user tokens persisted in `{data_dir}/api-tokens.json`: only BLAKE3
//! hashes of the tokens are stored, the file is replaced atomically, and
//! read-modify-write cycles hold `{data_dir}/api-tokens.lock`.
//!
//! File format (version 1):
//!
//! ```json
//! {"version":1,"tokens":[{"name":"alice","scope":{"role":"admin"},"hash":"<64 hex>"}]}
//! ```

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use schemas::{SiteId, TenantId};
use serde::{Deserialize, Serialize};

use crate::api::auth::{
    Scope, TokenError, TokenStore, check_user_name, generate_token, token_hash,
};
use crate::fleet_store::write_atomic;

/// File name of the token store inside the hub's data directory.
pub const TOKENS_FILE: &str = "api-tokens.json";
/// Lock file serialising changes to the token file.
pub const TOKENS_LOCK: &str = "api-tokens.lock";

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
    /// The token could not be created (bad name, no randomness).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A user of that name already has a token.
    #[error(
        "user {0:?} already has a token (revoke it first with `cloud-hub user token revoke {0}`)"
    )]
    Exists(String),
    /// No user of that name.
    #[error("no token for user {0:?} (see `cloud-hub user token list`)")]
    NotFound(String),
    /// A scope string did not parse.
    #[error(
        "bad scope {input:?}: {reason} (expected admin, analyst:TENANT or operator:TENANT:SITE)"
    )]
    BadScope { input: String, reason: String },
    /// The hub key could not be loaded (run `cloud-hub init` first).
    #[error("hub key: {0}")]
    Key(#[from] crate::keys::KeyError),
    /// The audit log could not be opened or appended to.
    #[error("{context}: {source}")]
    Audit {
        context: &'static str,
        #[source]
        source: crate::audit::AuditError,
    },
}

/// `cloud-hub user ...`: API user tokens.
#[derive(Debug, clap::Subcommand)]
pub enum UserCmd {
    /// API bearer tokens of users.
    #[command(subcommand)]
    Token(UserTokenCmd),
}

/// `cloud-hub user token ...`.
#[derive(Debug, clap::Subcommand)]
pub enum UserTokenCmd {
    /// Create a token; prints the plaintext once on stdout (only its hash is stored).
    Create {
        /// admin, analyst:TENANT or operator:TENANT:SITE.
        #[arg(long)]
        scope: String,
        /// User name (A-Z a-z 0-9 . _ -); defaults to the acting user.
        #[arg(long)]
        name: Option<String>,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List users with a token and their scopes.
    List {
        /// Print JSON records instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a user's token.
    Revoke {
        /// User name.
        name: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Run a `cloud-hub user` command against `data_dir`, auditing changes in
/// the log at `audit_path` signed with the key at `key_path`. A running hub
/// holds the audit log: like the other offline commands, create and revoke
/// need the hub stopped (or its `reload_token_store` to pick them up).
pub fn run_cli(
    cmd: UserCmd,
    data_dir: &Path,
    audit_path: &Path,
    key_path: &Path,
    actor: &str,
    now: schemas::time::Timestamp,
) -> Result<(), UsersError> {
    let UserCmd::Token(cmd) = cmd;
    let open_log = || -> Result<crate::audit::AuditLog, UsersError> {
        let key = crate::keys::load(key_path)?;
        let (log, outcome) =
            crate::audit::AuditLog::open(audit_path, key, now).map_err(|source| {
                UsersError::Audit {
                    context: "open the audit log",
                    source,
                }
            })?;
        if let Some((finding, saved)) = outcome.repaired {
            eprintln!(
                "note: repaired the audit log: {finding}; torn bytes saved to {}",
                saved.display()
            );
        }
        Ok(log)
    };
    let after_change = |source| UsersError::Audit {
        context: "the token file WAS changed, but recording it in the audit log failed; add the entry by hand",
        source,
    };
    match cmd {
        UserTokenCmd::Create {
            scope,
            name,
            reason,
        } => {
            let scope = parse_scope(&scope)?;
            let name =
                name.unwrap_or_else(|| actor.rsplit(':').next().unwrap_or(actor).to_string());
            let mut log = open_log()?;
            let token = create_user_token(data_dir, &name, scope.clone())?;
            log.append(
                &crate::audit::AuditRecord {
                    actor: actor.to_string(),
                    action: "user.token.create".into(),
                    target: format!("user:{name}"),
                    reason: reason.trim().to_string(),
                    details: serde_json::json!({ "scope": format_scope(&scope) }).to_string(),
                },
                now,
            )
            .map_err(after_change)?;
            eprintln!(
                "created a token for {name} ({}); it is shown once, store it now",
                format_scope(&scope)
            );
            println!("{token}");
        }
        UserTokenCmd::List { json } => {
            let tokens = list_user_tokens(data_dir)?;
            if json {
                for t in &tokens {
                    println!(
                        "{}",
                        serde_json::json!({ "name": t.name, "scope": format_scope(&t.scope) })
                    );
                }
            } else {
                println!("{:<24} SCOPE", "NAME");
                for t in &tokens {
                    println!("{:<24} {}", t.name, format_scope(&t.scope));
                }
            }
        }
        UserTokenCmd::Revoke { name, reason } => {
            let mut log = open_log()?;
            let gone = revoke_user_token(data_dir, &name)?;
            log.append(
                &crate::audit::AuditRecord {
                    actor: actor.to_string(),
                    action: "user.token.revoke".into(),
                    target: format!("user:{name}"),
                    reason: reason.trim().to_string(),
                    details: serde_json::json!({ "scope": format_scope(&gone.scope) }).to_string(),
                },
                now,
            )
            .map_err(after_change)?;
            eprintln!("revoked the token of {name}");
        }
    }
    Ok(())
}

/// One stored token: its user, scope and hash (never the plaintext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserToken {
    pub name: String,
    pub scope: Scope,
    /// Hex BLAKE3 hash of the token.
    pub hash: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    version: u32,
    tokens: Vec<UserToken>,
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> UsersError {
    let path = path.to_path_buf();
    move |source| UsersError::Io {
        path,
        action,
        source,
    }
}

/// Parse `admin`, `analyst:TENANT` or `operator:TENANT:SITE`.
pub fn parse_scope(s: &str) -> Result<Scope, UsersError> {
    let bad = |reason: String| UsersError::BadScope {
        input: s.to_string(),
        reason,
    };
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        ["admin"] => Ok(Scope::Admin),
        ["analyst", t] => Ok(Scope::Analyst {
            tenant: TenantId::new(*t).map_err(|e| bad(e.to_string()))?,
        }),
        ["operator", t, site] => Ok(Scope::Operator {
            tenant: TenantId::new(*t).map_err(|e| bad(e.to_string()))?,
            site: SiteId::new(*site).map_err(|e| bad(e.to_string()))?,
        }),
        [role, ..] if !matches!(*role, "admin" | "analyst" | "operator") => {
            Err(bad(format!("unknown role {role:?}")))
        }
        _ => Err(bad("wrong number of ':'-separated parts".into())),
    }
}

/// The scope as `parse_scope` reads it.
pub fn format_scope(s: &Scope) -> String {
    match s {
        Scope::Admin => "admin".into(),
        Scope::Analyst { tenant } => format!("analyst:{tenant}"),
        Scope::Operator { tenant, site } => format!("operator:{tenant}:{site}"),
    }
}

/// Every stored token (empty if the file is absent).
pub fn list_user_tokens(data_dir: &Path) -> Result<Vec<UserToken>, UsersError> {
    let path = data_dir.join(TOKENS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&path, "read")(e)),
    };
    let file: TokenFile = serde_json::from_str(&text).map_err(|e| UsersError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if file.version != 1 {
        return Err(UsersError::Corrupt {
            path,
            reason: format!("version {} is not supported (expected 1)", file.version),
        });
    }
    for t in &file.tokens {
        if decode_hash(&t.hash).is_none() {
            return Err(UsersError::Corrupt {
                path,
                reason: format!("token of {:?}: hash is not 64 hex digits", t.name),
            });
        }
    }
    Ok(file.tokens)
}

fn decode_hash(h: &str) -> Option<[u8; 32]> {
    hex::decode(h).ok()?.try_into().ok()
}

fn entries(tokens: Vec<UserToken>) -> Vec<([u8; 32], String, Scope)> {
    tokens
        .into_iter()
        .filter_map(|t| decode_hash(&t.hash).map(|h| (h, t.name, t.scope)))
        .collect()
}

/// The token store as persisted in `data_dir` (empty if the file is absent).
pub fn load_token_store(data_dir: &Path) -> Result<TokenStore, UsersError> {
    let store = TokenStore::default();
    store.replace_all(entries(list_user_tokens(data_dir)?));
    Ok(store)
}

/// Re-read the token file into a running hub's `store` (new tokens start
/// working, revoked ones stop). On error the store is left as it was.
pub fn reload_token_store(store: &TokenStore, data_dir: &Path) -> Result<(), UsersError> {
    store.replace_all(entries(list_user_tokens(data_dir)?));
    Ok(())
}

/// Hold the lock file for a read-modify-write of the token file.
fn lock_dir(data_dir: &Path) -> Result<File, UsersError> {
    let path = data_dir.join(TOKENS_LOCK);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open lock file"))?;
    f.lock().map_err(io_err(&path, "lock"))?;
    Ok(f)
}

fn save(data_dir: &Path, tokens: Vec<UserToken>) -> Result<(), UsersError> {
    let path = data_dir.join(TOKENS_FILE);
    let file = TokenFile { version: 1, tokens };
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| UsersError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(&path, &bytes).map_err(io_err(&path, "write"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// Create a token for user `name` with `scope`, persist its hash, and
/// return the plaintext (shown once). One token per user name.
pub fn create_user_token(data_dir: &Path, name: &str, scope: Scope) -> Result<String, UsersError> {
    check_user_name(name)?;
    fs::create_dir_all(data_dir).map_err(io_err(data_dir, "create directory"))?;
    let _lock = lock_dir(data_dir)?;
    let mut tokens = list_user_tokens(data_dir)?;
    if tokens.iter().any(|t| t.name == name) {
        return Err(UsersError::Exists(name.to_string()));
    }
    let token = generate_token()?;
    tokens.push(UserToken {
        name: name.to_string(),
        scope,
        hash: hex::encode(token_hash(&token)),
    });
    save(data_dir, tokens)?;
    Ok(token)
}

/// Remove user `name`'s token; returns what was removed.
pub fn revoke_user_token(data_dir: &Path, name: &str) -> Result<UserToken, UsersError> {
    let _lock = lock_dir(data_dir)?;
    let mut tokens = list_user_tokens(data_dir)?;
    let i = tokens
        .iter()
        .position(|t| t.name == name)
        .ok_or_else(|| UsersError::NotFound(name.to_string()))?;
    let gone = tokens.remove(i);
    save(data_dir, tokens)?;
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_list_load_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let tok = create_user_token(dir.path(), "alice", Scope::Admin).unwrap();
        let op = parse_scope("operator:acme:site-1").unwrap();
        let tok2 = create_user_token(dir.path(), "bob", op.clone()).unwrap();
        let text = fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(
            !text.contains(&tok) && !text.contains(&tok2),
            "plaintext stored"
        );
        assert!(matches!(
            create_user_token(dir.path(), "alice", Scope::Admin),
            Err(UsersError::Exists(_))
        ));
        let store = load_token_store(dir.path()).unwrap();
        assert_eq!(store.lookup(&tok), Some(("alice".into(), Scope::Admin)));
        assert_eq!(store.lookup(&tok2), Some(("bob".into(), op)));
        assert_eq!(list_user_tokens(dir.path()).unwrap().len(), 2);
        revoke_user_token(dir.path(), "alice").unwrap();
        reload_token_store(&store, dir.path()).unwrap();
        assert_eq!(store.lookup(&tok), None);
        assert!(store.lookup(&tok2).is_some());
        assert!(matches!(
            revoke_user_token(dir.path(), "alice"),
            Err(UsersError::NotFound(_))
        ));
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = create_user_token(dir.path(), "bad name", Scope::Admin).unwrap_err();
        assert!(e.to_string().contains("bad name"), "{e}");
        let e = parse_scope("operator:acme").unwrap_err().to_string();
        assert!(e.contains("operator:TENANT:SITE"), "{e}");
        let e = parse_scope("root").unwrap_err().to_string();
        assert!(e.contains("unknown role"), "{e}");
        assert!(parse_scope("analyst:Acme").is_err());
        for s in ["admin", "analyst:acme", "operator:acme:s-1"] {
            assert_eq!(format_scope(&parse_scope(s).unwrap()), s);
        }
        fs::write(dir.path().join(TOKENS_FILE), "{not json").unwrap();
        let e = load_token_store(dir.path()).unwrap_err();
        assert!(matches!(e, UsersError::Corrupt { .. }), "{e}");
    }
}
