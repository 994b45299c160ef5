//! API access control: scoped bearer tokens stored hashed, a per-token
//! token-bucket rate limit on an injected clock, and the [`Caller`]
//! extractor that turns a request into an authenticated principal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use schemas::{SiteId, TenantId};
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::error::ApiError;

/// What a token may see and do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Scope {
    /// Everything.
    Admin,
    /// Read everything of one tenant; no mutation.
    Analyst { tenant: TenantId },
    /// Read and operate one site of one tenant.
    Operator { tenant: TenantId, site: SiteId },
}

impl Scope {
    /// Whether data of `tenant` (and `site`, when the data belongs to one)
    /// may be read. Operators see only their site's data.
    pub fn can_read(&self, tenant: &TenantId, site: Option<&SiteId>) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Analyst { tenant: t } => t == tenant,
            Scope::Operator { tenant: t, site: s } => t == tenant && site == Some(s),
        }
    }

    /// Whether the site's devices, alarms and commands may be operated.
    pub fn can_operate(&self, tenant: &TenantId, site: &SiteId) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Analyst { .. } => false,
            Scope::Operator { tenant: t, site: s } => t == tenant && s == site,
        }
    }

    /// The tenant the scope is limited to, if any.
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Scope::Admin => None,
            Scope::Analyst { tenant } | Scope::Operator { tenant, .. } => Some(tenant),
        }
    }

    /// The site the scope is limited to, if any.
    pub fn site(&self) -> Option<&SiteId> {
        match self {
            Scope::Operator { site, .. } => Some(site),
            _ => None,
        }
    }

    /// Principal string for audit records: `admin:alice`,
    /// `analyst:acme:bob`, `operator:acme:site-1:carol`.
    pub fn principal(&self, name: &str) -> String {
        match self {
            Scope::Admin => format!("admin:{name}"),
            Scope::Analyst { tenant } => format!("analyst:{tenant}:{name}"),
            Scope::Operator { tenant, site } => format!("operator:{tenant}:{site}:{name}"),
        }
    }
}

/// Why a token could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The user name is empty, too long or has characters outside
    /// `[A-Za-z0-9._-]`.
    #[error("user name {0:?} must be 1..=64 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// The operating system gave no randomness.
    #[error("no randomness for a new token: {0}")]
    Random(String),
}

/// One token as stored: only its hash is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenRecord {
    name: String,
    scope: Scope,
}

/// Tokens by BLAKE3 hash of the plaintext. The plaintext is shown once, at
/// creation, and never stored.
#[derive(Debug, Default)]
pub struct TokenStore {
    tokens: Mutex<HashMap<[u8; 32], TokenRecord>>,
}

/// Prefix of every user token, so leaked tokens are easy to grep for.
pub const TOKEN_PREFIX: &str = "fsu_";

fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// The BLAKE3 hash under which a token is stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    hash(token)
}

/// Check a user name: 1..=64 characters of `[A-Za-z0-9._-]`.
pub fn check_user_name(name: &str) -> Result<(), TokenError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(TokenError::BadName(name.to_string()));
    }
    Ok(())
}

/// A fresh random token (`fsu_` and 64 hex digits).
pub fn generate_token() -> Result<String, TokenError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(raw)))
}

impl TokenStore {
    /// Create a token for user `name` with `scope`; returns the plaintext.
    pub fn create_user_token(&self, name: &str, scope: Scope) -> Result<String, TokenError> {
        check_user_name(name)?;
        let token = generate_token()?;
        self.lock().insert(
            hash(&token),
            TokenRecord {
                name: name.to_string(),
                scope,
            },
        );
        Ok(token)
    }

    /// Add a token known only by its hash (loaded from the token file).
    pub fn insert_hashed(&self, hash: [u8; 32], name: &str, scope: Scope) {
        self.lock().insert(
            hash,
            TokenRecord {
                name: name.to_string(),
                scope,
            },
        );
    }

    /// Replace every token by `entries` (hash, user name, scope), e.g. after
    /// the token file changed.
    pub fn replace_all(&self, entries: Vec<([u8; 32], String, Scope)>) {
        let mut g = self.lock();
        g.clear();
        for (h, name, scope) in entries {
            g.insert(h, TokenRecord { name, scope });
        }
    }

    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no token is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forget a token. Returns whether it existed.
    pub fn revoke(&self, token: &str) -> bool {
        self.lock().remove(&hash(token)).is_some()
    }

    /// The user name and scope of a token, if it is known.
    pub fn lookup(&self, token: &str) -> Option<(String, Scope)> {
        self.lock()
            .get(&hash(token))
            .map(|r| (r.name.clone(), r.scope.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], TokenRecord>> {
        // A panic while holding the lock leaves the map consistent (every
        // operation is a single insert/remove/get), so poisoning is ignored.
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Rate limit per token: a bucket of `burst` requests refilled at
/// `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            burst: 60,
            per_second: 10.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Duration,
}

/// Token buckets keyed by token hash, driven by a monotonic `now`.
#[derive(Debug, Default)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<[u8; 32], Bucket>>,
}

impl RateLimiter {
    /// A limiter with `limit` for every token.
    pub fn new(limit: RateLimit) -> RateLimiter {
        RateLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request from `key`'s bucket at monotonic time `now`; on
    /// refusal, how long until one is available.
    pub fn check(&self, key: &[u8; 32], now: Duration) -> Result<(), Duration> {
        let RateLimit { burst, per_second } = self.limit;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(*key).or_insert(Bucket {
            tokens: f64::from(burst),
            last: now,
        });
        let elapsed = now.saturating_sub(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_second).min(f64::from(burst));
        b.last = now.max(b.last);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else if per_second > 0.0 {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_second))
        } else {
            Err(Duration::from_secs(3600))
        }
    }
}

/// The one route that accepts `?access_token=` instead of the header.
pub const EVENTS_PATH: &str = "/api/v1/events";

/// An authenticated caller. Extracting it answers 401 without a valid
/// bearer token and 429 (with `Retry-After`) over the rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// User name the token was created for.
    pub name: String,
    pub scope: Scope,
}

impl Caller {
    /// Principal string for audit records and commands.
    pub fn principal(&self) -> String {
        self.scope.principal(&self.name)
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let unauthorized = |m: &str| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.to_string())
                .with_details(serde_json::json!({ "scheme": "Bearer" }))
        };
        // Browsers' EventSource cannot send headers: the events stream (and
        // only it) also takes the token as `?access_token=`.
        let query_token = if parts.uri.path() == EVENTS_PATH {
            parts.uri.query().and_then(|q| {
                serde_urlencoded::from_str::<Vec<(String, String)>>(q)
                    .ok()?
                    .into_iter()
                    .find(|(k, _)| k == "access_token")
                    .map(|(_, v)| v)
            })
        } else {
            None
        };
        let token = match (parts.headers.get(header::AUTHORIZATION), &query_token) {
            (Some(value), _) => value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or_else(|| unauthorized("Authorization header is not 'Bearer <token>'"))?,
            (None, Some(t)) => t.as_str(),
            (None, None) => {
                return Err(unauthorized("missing Authorization: Bearer <token> header"));
            }
        };
        let (name, scope) = state
            .tokens
            .lookup(token)
            .ok_or_else(|| unauthorized("unknown or revoked token"))?;
        if let Err(wait) = state.limiter.check(&hash(token), state.clock.monotonic()) {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let secs = secs.max(1);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("rate limit exceeded; retry in {secs} s"),
            )
            .with_details(serde_json::json!({ "retry_after_s": secs }));
            e.retry_after_s = Some(secs);
            return Err(e);
        }
        Ok(Caller { name, scope })
    }
}
