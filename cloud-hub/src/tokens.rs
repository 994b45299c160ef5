//! Join tokens: hub-signed, expiring, single-use permissions to enrol one node.
//!
//! A token is one copy-pasteable string `fsj1.<claims>.<signature>`, both parts base64url
//! without padding. `<claims>` is the JSON of [`JoinTokenClaims`]; the signature is the hub's
//! ed25519 signature over `"fieldsync join token v1\0"` followed by exactly those JSON
//! bytes, so verification never depends on re-serialising the claims.
//!
//! This module is pure: time comes in as `now`. Single use is enforced by the registry
//! ([`crate::registry::Registry::enrol`]), which records the nonce in the same atomic write
//! that records the node.
//!
//! ```
//! use cloud_hub::tokens::{issue, verify, TokenRequest};
//! use schemas::{identity::JoinTokenClaims, ids::Role, time::Timestamp};
//!
//! let hub = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
//! let now = Timestamp(1_700_000_000_000);
//! let req = TokenRequest {
//!     tenant: "acme".parse().unwrap(),
//!     site: "store-1".parse().unwrap(),
//!     role: Role::Edge,
//!     ttl_ms: 3_600_000,
//! };
//! let (token, claims) = issue(&hub, &req, now).unwrap();
//! assert!(token.starts_with("fsj1."));
//! assert_eq!(verify(&token, &hub.verifying_key(), now).unwrap(), claims);
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::RngExt as _;
use schemas::identity::{EndpointKey, JoinTokenClaims};
use schemas::ids::{Role, SiteId, TenantId};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;

use crate::keys::endpoint_key;

/// The version prefix of every token string.
pub const TOKEN_PREFIX: &str = "fsj1";
/// Domain separation for token signatures.
const SIGNING_CONTEXT: &[u8] = b"fieldsync join token v1\0";
/// Longest token string accepted (a real one is ~400 characters).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest time-to-live a token may be issued with: 30 days.
pub const MAX_TTL_MS: i64 = 30 * 86_400_000;
/// How far in the future `issued_at` may be before the token is refused (clock skew).
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60_000;
/// Roles a join token may grant.
pub const ENROLLABLE_ROLES: [Role; 2] = [Role::Edge, Role::Operator];

/// Why a token was not issued or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The string is not a well-formed token.
    #[error("malformed token: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// The signature is not this hub's over these claims.
    #[error(
        "signature does not verify: forged or from another hub (token names issuer {claimed_issuer}, this hub is {hub})"
    )]
    BadSignature {
        /// The issuer the token claims.
        claimed_issuer: EndpointKey,
        /// This hub's key.
        hub: EndpointKey,
    },
    /// The token has expired.
    #[error("token expired at {expires_at} (now {now})")]
    Expired {
        /// When it expired.
        expires_at: Timestamp,
        /// The time it was presented.
        now: Timestamp,
    },
    /// The token was issued in the future by more than the allowed clock skew.
    #[error("token not valid yet: issued at {issued_at}, now {now} (check the clocks)")]
    NotYetValid {
        /// When the token says it was issued.
        issued_at: Timestamp,
        /// The time it was presented.
        now: Timestamp,
    },
    /// The token was already redeemed.
    #[error("token already used by {endpoint} at {at}")]
    AlreadyUsed {
        /// The node that redeemed it.
        endpoint: EndpointKey,
        /// When.
        at: Timestamp,
    },
    /// The role cannot be granted by a join token.
    #[error("role {role} cannot be granted by a join token; allowed: edge, operator")]
    RoleNotAllowed {
        /// The requested role.
        role: Role,
    },
    /// The time-to-live is out of range or unparseable.
    #[error("invalid ttl {input:?}: {reason}")]
    BadTtl {
        /// The ttl as given.
        input: String,
        /// Why it was refused.
        reason: String,
    },
}

fn malformed(reason: impl Into<String>) -> TokenError {
    TokenError::Malformed {
        reason: reason.into(),
    }
}

/// What an admin asks for when creating a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Tenant the node will belong to.
    pub tenant: TenantId,
    /// Site the node will belong to.
    pub site: SiteId,
    /// Role it will have (edge or operator).
    pub role: Role,
    /// Time to live in milliseconds, at most [`MAX_TTL_MS`].
    pub ttl_ms: i64,
}

/// A parsed token whose signature has not been checked yet.
#[derive(Debug, Clone)]
pub struct ParsedToken {
    /// The claims as decoded.
    pub claims: JoinTokenClaims,
    payload: Vec<u8>,
    signature: Signature,
}

/// Issue a token for `req`, signed by `hub`, valid from `now` for `req.ttl_ms`.
/// Returns the token string and its claims.
pub fn issue(
    hub: &SigningKey,
    req: &TokenRequest,
    now: Timestamp,
) -> Result<(String, JoinTokenClaims), TokenError> {
    if !ENROLLABLE_ROLES.contains(&req.role) {
        return Err(TokenError::RoleNotAllowed { role: req.role });
    }
    check_ttl(req.ttl_ms, &format!("{}ms", req.ttl_ms))?;
    let nonce: [u8; 16] = rand::rng().random();
    let claims = JoinTokenClaims {
        schema_version: SchemaVersion::default(),
        nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        tenant: req.tenant.clone(),
        site: req.site.clone(),
        role: req.role,
        issued_at: now,
        expires_at: now.saturating_add_ms(req.ttl_ms),
        issuer: endpoint_key(hub),
    };
    let payload = serde_json::to_vec(&claims).map_err(|e| malformed(e.to_string()))?;
    let signature = hub.sign(&signing_input(&payload));
    let token = format!(
        "{TOKEN_PREFIX}.{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    );
    Ok((token, claims))
}

fn signing_input(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    v.extend_from_slice(SIGNING_CONTEXT);
    v.extend_from_slice(payload);
    v
}

/// Parse a token string (surrounding whitespace ignored) without checking its signature.
pub fn parse(token: &str) -> Result<ParsedToken, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(malformed("empty"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed(format!(
            "{} characters, longer than the {MAX_TOKEN_LEN} a token can be",
            token.len()
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts[0] != TOKEN_PREFIX {
        return Err(malformed(format!(
            "does not start with {TOKEN_PREFIX:?} (is it a fieldsync join token, copied whole?)"
        )));
    }
    if parts.len() != 3 {
        return Err(malformed(format!(
            "expected 3 dot-separated parts ({TOKEN_PREFIX}.<claims>.<signature>), found {}",
            parts.len()
        )));
    }
    let payload = URL_SAFE_NO_PAD
        .decode(parts[1])
        .map_err(|e| malformed(format!("claims are not base64url: {e}")))?;
    let sig_bytes = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|e| malformed(format!("signature is not base64url: {e}")))?;
    let sig_arr: [u8; 64] = sig_bytes.as_slice().try_into().map_err(|_| {
        malformed(format!(
            "signature is {} bytes, expected 64 (truncated copy?)",
            sig_bytes.len()
        ))
    })?;
    let claims: JoinTokenClaims = serde_json::from_slice(&payload)
        .map_err(|e| malformed(format!("claims do not decode: {e}")))?;
    Ok(ParsedToken {
        claims,
        payload,
        signature: Signature::from_bytes(&sig_arr),
    })
}

impl ParsedToken {
    /// Check the signature against `hub`, the role, and the validity window at `now`.
    /// Does not check single use (the registry does).
    pub fn verify(self, hub: &VerifyingKey, now: Timestamp) -> Result<JoinTokenClaims, TokenError> {
        let hub_key = EndpointKey(hub.to_bytes());
        let sig_ok = hub
            .verify_strict(&signing_input(&self.payload), &self.signature)
            .is_ok();
        if !sig_ok || self.claims.issuer != hub_key {
            return Err(TokenError::BadSignature {
                claimed_issuer: self.claims.issuer,
                hub: hub_key,
            });
        }
        let c = self.claims;
        if !ENROLLABLE_ROLES.contains(&c.role) {
            return Err(TokenError::RoleNotAllowed { role: c.role });
        }
        if now >= c.expires_at {
            return Err(TokenError::Expired {
                expires_at: c.expires_at,
                now,
            });
        }
        if c.issued_at > now.saturating_add_ms(MAX_CLOCK_SKEW_MS) {
            return Err(TokenError::NotYetValid {
                issued_at: c.issued_at,
                now,
            });
        }
        Ok(c)
    }
}

/// Parse and verify `token` in one step (see [`ParsedToken::verify`]).
pub fn verify(
    token: &str,
    hub: &VerifyingKey,
    now: Timestamp,
) -> Result<JoinTokenClaims, TokenError> {
    parse(token)?.verify(hub, now)
}

/// Parse a time-to-live such as `90s`, `30m`, `1h`, `7d` (at most 30 days) into milliseconds.
pub fn parse_ttl(input: &str) -> Result<i64, TokenError> {
    let bad = |reason: &str| TokenError::BadTtl {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad("expected a number followed by s, m, h or d (e.g. 1h)"));
    }
    let n: i64 = num.parse().map_err(|_| bad("number too large"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(bad("missing unit: use s, m, h or d (e.g. 1h)")),
        _ => return Err(bad("unknown unit: use s, m, h or d (e.g. 1h)")),
    };
    let ms = n
        .checked_mul(unit_ms)
        .ok_or_else(|| bad("number too large"))?;
    check_ttl(ms, input)?;
    Ok(ms)
}

fn check_ttl(ms: i64, input: &str) -> Result<(), TokenError> {
    let bad = |reason: &str| TokenError::BadTtl {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    if ms <= 0 {
        return Err(bad("must be positive"));
    }
    if ms > MAX_TTL_MS {
        return Err(bad("longer than the 30 day maximum"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h").unwrap(), 3_600_000);
        assert_eq!(parse_ttl("90s").unwrap(), 90_000);
        assert_eq!(parse_ttl("7d").unwrap(), 7 * 86_400_000);
        for bad in [
            "",
            "h",
            "1",
            "1y",
            "0m",
            "31d",
            "-1h",
            "99999999999999999999h",
        ] {
            assert!(
                matches!(parse_ttl(bad), Err(TokenError::BadTtl { .. })),
                "{bad}"
            );
        }
    }
}
