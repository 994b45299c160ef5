//! Identity records and join-token claims. Signing and verification live in
//! `sync-core::identity`; these are the signed payloads.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{IdError, Role, SiteId, TenantId};
use crate::time::Timestamp;
use crate::version::SchemaVersion;

/// An ed25519 public key (an iroh `EndpointId`), printed as 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey(pub [u8; 32]);

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl EndpointKey {
    /// First 10 hex digits, for logs.
    pub fn short(&self) -> String {
        self.to_string()[..10].to_string()
    }
}

impl std::str::FromStr for EndpointKey {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = |reason: &str| IdError {
            input: s.to_string(),
            segment: "endpoint id",
            reason: reason.into(),
        };
        if s.len() != 64 {
            return Err(err("must be 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| err("must be hex"))?;
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| err("must be hex"))?;
        }
        Ok(EndpointKey(out))
    }
}

impl Serialize for EndpointKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EndpointKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for EndpointKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EndpointKey".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^[0-9a-f]{64}$" })
    }
}

/// What the hub knows about one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IdentityRecord {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub endpoint_id: EndpointKey,
    /// None for hubs and fleet-wide nodes.
    pub tenant: Option<TenantId>,
    /// None for hubs and tenant-wide nodes.
    pub site: Option<SiteId>,
    pub role: Role,
    pub enrolled_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    /// Free text: why it was revoked.
    #[serde(default)]
    pub revoked_reason: Option<String>,
}

impl IdentityRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// The payload of a join token: who may enrol as what, until when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JoinTokenClaims {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    /// Random, unique: the hub records used nonces so a token works once.
    pub nonce: String,
    pub tenant: TenantId,
    pub site: SiteId,
    pub role: Role,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// Hub that signed it.
    pub issuer: EndpointKey,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_key_roundtrip_and_errors() {
        let k = EndpointKey([0xab; 32]);
        let s = k.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<EndpointKey>().unwrap(), k);
        assert_eq!(
            "abc".parse::<EndpointKey>().unwrap_err().segment,
            "endpoint id"
        );
        assert!("zz".repeat(32).parse::<EndpointKey>().is_err());
        assert_eq!(k.short().len(), 10);
    }
}
