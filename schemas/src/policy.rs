//! Tenant policy: region, and which data classes may leave a site for which hubs.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{DataClass, DocKind, IdError, TenantId};
use crate::version::SchemaVersion;

/// A compliance region (`eu`, `us`, ...): lowercase letters, digits and `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region(String);

impl Region {
    pub fn new(s: impl Into<String>) -> Result<Region, IdError> {
        let s = s.into();
        if s.is_empty()
            || s.len() > 32
            || !s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(IdError {
                input: s.clone(),
                segment: "region",
                reason: format!("{s:?} must be 1..=32 lowercase letters, digits or '-'"),
            });
        }
        Ok(Region(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Region {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Region::new(s)
    }
}

impl Serialize for Region {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Region::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Region {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Region".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^[a-z0-9-]{1,32}$" })
    }
}

/// Where a hub sits in the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HubTier {
    /// Serves tenants of its regions; receives site data.
    Regional,
    /// Receives only fleet aggregates from regional hubs.
    Global,
}

/// Tenant policy document content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TenantPolicy {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub tenant: TenantId,
    pub region: Region,
    /// Document kinds that may leave a site for the tenant's regional hub.
    /// Defaults to every non-raw kind.
    #[serde(default = "default_egress")]
    pub site_egress: Vec<DocKind>,
    /// Whether the tenant's fleet aggregates may go to a global hub.
    #[serde(default = "yes")]
    pub global_aggregates: bool,
}

fn yes() -> bool {
    true
}

fn default_egress() -> Vec<DocKind> {
    DocKind::ALL.to_vec()
}

impl TenantPolicy {
    pub fn new(tenant: TenantId, region: Region) -> TenantPolicy {
        TenantPolicy {
            schema_version: SchemaVersion::default(),
            tenant,
            region,
            site_egress: default_egress(),
            global_aggregates: true,
        }
    }

    /// May a document of `kind` go to a hub of `tier` in `hub_regions`?
    /// Raw data never leaves; a regional hub must serve the tenant's region;
    /// a global hub gets fleet aggregates only.
    pub fn may_send_to_hub(&self, kind: DocKind, tier: HubTier, hub_regions: &[Region]) -> bool {
        let class = kind.data_class();
        if class == DataClass::Raw {
            return false;
        }
        match tier {
            HubTier::Regional => {
                hub_regions.contains(&self.region) && self.site_egress.contains(&kind)
            }
            HubTier::Global => class == DataClass::FleetAggregate && self.global_aggregates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compliance_rules() {
        let eu = Region::new("eu").unwrap();
        let us = Region::new("us").unwrap();
        let p = TenantPolicy::new(TenantId::new("acme").unwrap(), eu.clone());
        assert!(p.may_send_to_hub(
            DocKind::Telemetry,
            HubTier::Regional,
            std::slice::from_ref(&eu)
        ));
        assert!(!p.may_send_to_hub(
            DocKind::Telemetry,
            HubTier::Regional,
            std::slice::from_ref(&us)
        ));
        assert!(!p.may_send_to_hub(DocKind::Telemetry, HubTier::Global, &[]));
        assert!(p.may_send_to_hub(DocKind::Aggregate, HubTier::Global, &[]));
        let mut q = p.clone();
        q.site_egress = vec![DocKind::Device];
        assert!(!q.may_send_to_hub(DocKind::Telemetry, HubTier::Regional, &[eu]));
        assert!(Region::new("EU").is_err());
    }
}
