//! Identifiers: tenants, sites, devices and document ids.
//!
//! A document id names the unit of sync and of authorisation. Its shape says
//! its kind, and the kind says who may write it, which data class it carries
//! and how long it lives:
//!
//! | kind | id |
//! |---|---|
//! | site manifest | `t/{tenant}/s/{site}/site` |
//! | device | `t/{tenant}/s/{site}/dev/{device}` |
//! | telemetry rollups | `t/{tenant}/s/{site}/tel/{device}/{yyyy-mm-dd}` |
//! | commands | `t/{tenant}/s/{site}/cmd/{yyyy-mm-dd}` |
//! | alarms | `t/{tenant}/s/{site}/alarm/{yyyy-mm-dd}` |
//! | tenant aggregates | `t/{tenant}/agg/{yyyy-mm-dd}` |
//! | policy | `t/{tenant}/policy` |
//! | identity registry | `fleet/identity` |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::time::Day;

/// Longest tenant, site or device name.
pub const MAX_NAME_LEN: usize = 63;

/// Why an id was refused. `segment` names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {input:?}: {segment} {reason}")]
pub struct IdError {
    pub input: String,
    /// Which part of the id is wrong, e.g. `tenant`, `device`, `day`, `kind`.
    pub segment: &'static str,
    pub reason: String,
}

fn check_name(input: &str, segment: &'static str, name: &str) -> Result<(), IdError> {
    let err = |reason: String| IdError {
        input: input.to_string(),
        segment,
        reason,
    };
    if name.is_empty() {
        return Err(err("is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(err(format!("is longer than {MAX_NAME_LEN} characters")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(err(format!(
            "{name:?} has {c:?}; only lowercase ascii letters, digits, '-' and '_' are allowed"
        )));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(err(format!("{name:?} must start with a letter or digit")));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $segment:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_name(&s, $segment, &s)?;
                Ok($name(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $name::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"
                })
            }
        }
    };
}

name_type!(
    /// A tenant: one customer organisation.
    TenantId,
    "tenant"
);
name_type!(
    /// A site of a tenant: one physical place with its own edge nodes.
    SiteId,
    "site"
);
name_type!(
    /// A device at a site.
    DeviceId,
    "device"
);

/// The kinds of document. See the module docs for their id shapes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DocKind {
    Site,
    Device,
    Telemetry,
    Commands,
    Alarms,
    Aggregate,
    Policy,
    Identity,
}

/// Who a principal is. Hub and edge are node roles (they hold keys and
/// sync); admin, analyst and operator are people using an API.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A cloud hub node.
    Hub,
    /// An edge node of one site.
    Edge,
    /// A fleet administrator (hub API).
    Admin,
    /// An analyst of one tenant (hub API, read-mostly).
    Analyst,
    /// An operator of one site (edge local API or hub API).
    Operator,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Hub,
        Role::Edge,
        Role::Admin,
        Role::Analyst,
        Role::Operator,
    ];
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Hub => "hub",
            Role::Edge => "edge",
            Role::Admin => "admin",
            Role::Analyst => "analyst",
            Role::Operator => "operator",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.to_string() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}; expected one of hub, edge, admin, analyst, operator")
            })
    }
}

/// How far data may travel. Ordered from most local to most shareable.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum DataClass {
    /// Raw samples: never leave the edge that took them.
    Raw,
    /// Site data: the site's nodes and the tenant's regional hub.
    Site,
    /// Tenant-wide data: the tenant's regional hub and its sites.
    Tenant,
    /// Aggregates that may go to a global hub.
    FleetAggregate,
}

/// How long a document lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifetime {
    /// Lives as long as its subject.
    LongLived,
    /// One UTC day; sealed read-only after the day plus a grace period.
    DayBucket,
}

impl DocKind {
    pub const ALL: [DocKind; 8] = [
        DocKind::Site,
        DocKind::Device,
        DocKind::Telemetry,
        DocKind::Commands,
        DocKind::Alarms,
        DocKind::Aggregate,
        DocKind::Policy,
        DocKind::Identity,
    ];

    /// Roles whose actors may author changes to documents of this kind.
    /// Field-level rules (e.g. only the owning edge writes `reported`) are
    /// enforced by the writers on top of this.
    pub fn writers(self) -> &'static [Role] {
        match self {
            DocKind::Site => &[Role::Hub, Role::Admin, Role::Operator],
            DocKind::Device => &[Role::Hub, Role::Admin, Role::Operator, Role::Edge],
            DocKind::Telemetry => &[Role::Edge],
            DocKind::Commands => &[Role::Hub, Role::Admin, Role::Operator, Role::Edge],
            DocKind::Alarms => &[Role::Edge, Role::Operator, Role::Admin, Role::Hub],
            DocKind::Aggregate => &[Role::Hub],
            DocKind::Policy => &[Role::Hub, Role::Admin],
            DocKind::Identity => &[Role::Hub],
        }
    }

    pub fn may_write(self, role: Role) -> bool {
        self.writers().contains(&role)
    }

    pub fn data_class(self) -> DataClass {
        match self {
            DocKind::Site
            | DocKind::Device
            | DocKind::Telemetry
            | DocKind::Commands
            | DocKind::Alarms => DataClass::Site,
            DocKind::Policy => DataClass::Tenant,
            DocKind::Aggregate | DocKind::Identity => DataClass::FleetAggregate,
        }
    }

    pub fn lifetime(self) -> Lifetime {
        match self {
            DocKind::Telemetry | DocKind::Commands | DocKind::Alarms | DocKind::Aggregate => {
                Lifetime::DayBucket
            }
            DocKind::Site | DocKind::Device | DocKind::Policy | DocKind::Identity => {
                Lifetime::LongLived
            }
        }
    }

    /// Whether documents of this kind belong to the command plane, which is
    /// never queued behind telemetry.
    pub fn is_command_plane(self) -> bool {
        matches!(
            self,
            DocKind::Commands | DocKind::Device | DocKind::Identity | DocKind::Policy
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Site => "site",
            DocKind::Device => "device",
            DocKind::Telemetry => "telemetry",
            DocKind::Commands => "commands",
            DocKind::Alarms => "alarms",
            DocKind::Aggregate => "aggregate",
            DocKind::Policy => "policy",
            DocKind::Identity => "identity",
        }
    }
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed document id. Parsing and printing are inverse.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DocId {
    Site {
        tenant: TenantId,
        site: SiteId,
    },
    Device {
        tenant: TenantId,
        site: SiteId,
        device: DeviceId,
    },
    Telemetry {
        tenant: TenantId,
        site: SiteId,
        device: DeviceId,
        day: Day,
    },
    Commands {
        tenant: TenantId,
        site: SiteId,
        day: Day,
    },
    Alarms {
        tenant: TenantId,
        site: SiteId,
        day: Day,
    },
    Aggregate {
        tenant: TenantId,
        day: Day,
    },
    Policy {
        tenant: TenantId,
    },
    Identity,
}

impl DocId {
    pub fn kind(&self) -> DocKind {
        match self {
            DocId::Site { .. } => DocKind::Site,
            DocId::Device { .. } => DocKind::Device,
            DocId::Telemetry { .. } => DocKind::Telemetry,
            DocId::Commands { .. } => DocKind::Commands,
            DocId::Alarms { .. } => DocKind::Alarms,
            DocId::Aggregate { .. } => DocKind::Aggregate,
            DocId::Policy { .. } => DocKind::Policy,
            DocId::Identity => DocKind::Identity,
        }
    }

    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            DocId::Site { tenant, .. }
            | DocId::Device { tenant, .. }
            | DocId::Telemetry { tenant, .. }
            | DocId::Commands { tenant, .. }
            | DocId::Alarms { tenant, .. }
            | DocId::Aggregate { tenant, .. }
            | DocId::Policy { tenant } => Some(tenant),
            DocId::Identity => None,
        }
    }

    pub fn site(&self) -> Option<&SiteId> {
        match self {
            DocId::Site { site, .. }
            | DocId::Device { site, .. }
            | DocId::Telemetry { site, .. }
            | DocId::Commands { site, .. }
            | DocId::Alarms { site, .. } => Some(site),
            DocId::Aggregate { .. } | DocId::Policy { .. } | DocId::Identity => None,
        }
    }

    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            DocId::Device { device, .. } | DocId::Telemetry { device, .. } => Some(device),
            _ => None,
        }
    }

    /// The day of a day-bucket document.
    pub fn day(&self) -> Option<Day> {
        match self {
            DocId::Telemetry { day, .. }
            | DocId::Commands { day, .. }
            | DocId::Alarms { day, .. }
            | DocId::Aggregate { day, .. } => Some(*day),
            _ => None,
        }
    }

    pub fn site_doc(tenant: &TenantId, site: &SiteId) -> DocId {
        DocId::Site {
            tenant: tenant.clone(),
            site: site.clone(),
        }
    }
    pub fn device_doc(tenant: &TenantId, site: &SiteId, device: &DeviceId) -> DocId {
        DocId::Device {
            tenant: tenant.clone(),
            site: site.clone(),
            device: device.clone(),
        }
    }
    pub fn telemetry(tenant: &TenantId, site: &SiteId, device: &DeviceId, day: Day) -> DocId {
        DocId::Telemetry {
            tenant: tenant.clone(),
            site: site.clone(),
            device: device.clone(),
            day,
        }
    }
    pub fn commands(tenant: &TenantId, site: &SiteId, day: Day) -> DocId {
        DocId::Commands {
            tenant: tenant.clone(),
            site: site.clone(),
            day,
        }
    }
    pub fn alarms(tenant: &TenantId, site: &SiteId, day: Day) -> DocId {
        DocId::Alarms {
            tenant: tenant.clone(),
            site: site.clone(),
            day,
        }
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DocId::Site { tenant, site } => write!(f, "t/{tenant}/s/{site}/site"),
            DocId::Device {
                tenant,
                site,
                device,
            } => write!(f, "t/{tenant}/s/{site}/dev/{device}"),
            DocId::Telemetry {
                tenant,
                site,
                device,
                day,
            } => {
                write!(f, "t/{tenant}/s/{site}/tel/{device}/{day}")
            }
            DocId::Commands { tenant, site, day } => write!(f, "t/{tenant}/s/{site}/cmd/{day}"),
            DocId::Alarms { tenant, site, day } => write!(f, "t/{tenant}/s/{site}/alarm/{day}"),
            DocId::Aggregate { tenant, day } => write!(f, "t/{tenant}/agg/{day}"),
            DocId::Policy { tenant } => write!(f, "t/{tenant}/policy"),
            DocId::Identity => f.write_str("fleet/identity"),
        }
    }
}

impl FromStr for DocId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = |segment: &'static str, reason: &str| IdError {
            input: s.to_string(),
            segment,
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        let tenant = |i: usize| -> Result<TenantId, IdError> {
            check_name(s, "tenant", parts[i])?;
            Ok(TenantId(parts[i].to_string()))
        };
        let site = |i: usize| -> Result<SiteId, IdError> {
            check_name(s, "site", parts[i])?;
            Ok(SiteId(parts[i].to_string()))
        };
        let device = |i: usize| -> Result<DeviceId, IdError> {
            check_name(s, "device", parts[i])?;
            Ok(DeviceId(parts[i].to_string()))
        };
        let day = |i: usize| -> Result<Day, IdError> {
            parts[i].parse::<Day>().map_err(|e| {
                err(
                    "day",
                    &format!(
                        "{:?} is not a valid yyyy-mm-dd date ({})",
                        parts[i], e.reason
                    ),
                )
            })
        };
        match parts.as_slice() {
            ["fleet", "identity"] => Ok(DocId::Identity),
            ["fleet", other] => Err(err(
                "kind",
                &format!("{other:?} is not a fleet document (expected \"identity\")"),
            )),
            ["t", _, "policy"] => Ok(DocId::Policy { tenant: tenant(1)? }),
            ["t", _, "agg", _] => Ok(DocId::Aggregate {
                tenant: tenant(1)?,
                day: day(3)?,
            }),
            ["t", _, "s", _, "site"] => Ok(DocId::Site {
                tenant: tenant(1)?,
                site: site(3)?,
            }),
            ["t", _, "s", _, "dev", _] => Ok(DocId::Device {
                tenant: tenant(1)?,
                site: site(3)?,
                device: device(5)?,
            }),
            ["t", _, "s", _, "tel", _, _] => Ok(DocId::Telemetry {
                tenant: tenant(1)?,
                site: site(3)?,
                device: device(5)?,
                day: day(6)?,
            }),
            ["t", _, "s", _, "cmd", _] => Ok(DocId::Commands {
                tenant: tenant(1)?,
                site: site(3)?,
                day: day(5)?,
            }),
            ["t", _, "s", _, "alarm", _] => Ok(DocId::Alarms {
                tenant: tenant(1)?,
                site: site(3)?,
                day: day(5)?,
            }),
            ["t", _, "s", _, kind, ..]
                if !matches!(*kind, "site" | "dev" | "tel" | "cmd" | "alarm") =>
            {
                tenant(1)?;
                site(3)?;
                Err(err(
                    "kind",
                    &format!("{kind:?} is not a site document kind (site, dev, tel, cmd, alarm)"),
                ))
            }
            ["t", _, "s", _, kind, ..] => {
                tenant(1)?;
                site(3)?;
                Err(err(
                    "kind",
                    &format!("{kind:?} has the wrong number of segments"),
                ))
            }
            ["t", _, kind, ..] => {
                tenant(1)?;
                Err(err(
                    "kind",
                    &format!("{kind:?} is not a tenant document kind (s, policy, agg)"),
                ))
            }
            ["t"] | [""] => Err(err("tenant", "is missing")),
            [first, ..] => Err(err(
                "prefix",
                &format!("{first:?}: ids start with \"t/\" or \"fleet/\""),
            )),
            [] => Err(err("prefix", "is missing")),
        }
    }
}

impl Serialize for DocId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for DocId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DocId".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "fieldsync document id, e.g. t/acme/s/site-1/dev/pump-7",
            "pattern": "^(fleet/identity|t/[a-z0-9][a-z0-9_-]{0,62}/(policy|agg/[0-9]{4}-[0-9]{2}-[0-9]{2}|s/[a-z0-9][a-z0-9_-]{0,62}/(site|dev/[a-z0-9][a-z0-9_-]{0,62}|tel/[a-z0-9][a-z0-9_-]{0,62}/[0-9]{4}-[0-9]{2}-[0-9]{2}|cmd/[0-9]{4}-[0-9]{2}-[0-9]{2}|alarm/[0-9]{4}-[0-9]{2}-[0-9]{2})))$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9_-]{0,20}"
    }

    fn day() -> impl Strategy<Value = Day> {
        (0i64..40_000).prop_map(Day::from_days_since_epoch)
    }

    fn doc_id() -> impl Strategy<Value = DocId> {
        let t = || name().prop_map(TenantId);
        let st = || name().prop_map(SiteId);
        let d = || name().prop_map(DeviceId);
        prop_oneof![
            (t(), st()).prop_map(|(tenant, site)| DocId::Site { tenant, site }),
            (t(), st(), d()).prop_map(|(tenant, site, device)| DocId::Device {
                tenant,
                site,
                device
            }),
            (t(), st(), d(), day()).prop_map(|(tenant, site, device, day)| DocId::Telemetry {
                tenant,
                site,
                device,
                day
            }),
            (t(), st(), day()).prop_map(|(tenant, site, day)| DocId::Commands {
                tenant,
                site,
                day
            }),
            (t(), st(), day()).prop_map(|(tenant, site, day)| DocId::Alarms { tenant, site, day }),
            (t(), day()).prop_map(|(tenant, day)| DocId::Aggregate { tenant, day }),
            t().prop_map(|tenant| DocId::Policy { tenant }),
            Just(DocId::Identity),
        ]
    }

    proptest! {
        #[test]
        fn print_then_parse_is_identity(id in doc_id()) {
            let printed = id.to_string();
            let parsed: DocId = printed.parse().map_err(|e: IdError| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&parsed, &id);
            prop_assert_eq!(parsed.to_string(), printed);
        }

        #[test]
        fn parse_then_print_is_identity(s in "[a-z/0-9-]{0,40}") {
            if let Ok(id) = s.parse::<DocId>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn serde_roundtrip(id in doc_id()) {
            let json = serde_json::to_string(&id).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back: DocId = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, id);
        }
    }

    fn segment_of(s: &str) -> &'static str {
        match s.parse::<DocId>() {
            Ok(id) => panic!("{s} parsed as {id:?}"),
            Err(e) => e.segment,
        }
    }

    #[test]
    fn bad_ids_name_the_bad_segment() {
        assert_eq!(segment_of("t/Acme/s/x/site"), "tenant");
        assert_eq!(segment_of("t/acme/s/x y/site"), "site");
        assert_eq!(segment_of("t/acme/s/x/dev/"), "device");
        assert_eq!(segment_of("t/acme/s/x/tel/pump/2024-13-01"), "day");
        assert_eq!(segment_of("t/acme/s/x/cmd/yesterday"), "day");
        assert_eq!(segment_of("t/acme/s/x/door/1"), "kind");
        assert_eq!(segment_of("t/acme/bogus"), "kind");
        assert_eq!(segment_of("x/acme"), "prefix");
        assert_eq!(segment_of(""), "tenant");
        assert_eq!(segment_of("fleet/secrets"), "kind");
        assert_eq!(segment_of("t/acme/s/x/dev/a/b"), "kind");
        assert_eq!(
            segment_of(&format!("t/{}/policy", "a".repeat(64))),
            "tenant"
        );
        assert_eq!(segment_of("t/-acme/policy"), "tenant");
        let e = "t/acme/s/Cold/site"
            .parse::<DocId>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("site") && e.contains("'C'"), "{e}");
    }

    #[test]
    fn kinds_have_consistent_properties() {
        for k in DocKind::ALL {
            assert!(!k.writers().is_empty(), "{k} has no writer");
        }
        assert!(!DocKind::Telemetry.may_write(Role::Operator));
        assert!(DocKind::Telemetry.may_write(Role::Edge));
        assert!(!DocKind::Identity.may_write(Role::Edge));
        assert_eq!(DocKind::Aggregate.data_class(), DataClass::FleetAggregate);
        assert_eq!(DocKind::Telemetry.lifetime(), Lifetime::DayBucket);
        assert!(DocKind::Commands.is_command_plane());
        assert!(!DocKind::Telemetry.is_command_plane());
    }
}
