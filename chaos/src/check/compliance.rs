//! Compliance partitioning, checked on what each node holds at the end:
//!
//! - a regional hub holds only documents of tenants whose region it serves;
//! - a global hub holds only `fleet-aggregate` documents;
//! - raw data is held only on its own site (never by a hub, never by an
//!   edge of another site);
//! - site data of one site is not held by an edge of another site, and an
//!   edge holds no other tenant's tenant-scoped data.
//!
//! A document's region is the region the node labelled it with, else the
//! region of its tenant in the fleet's tenant list. A document whose
//! tenant's region cannot be found on a regional hub is a violation too
//! (the hub cannot show it is allowed to hold it).

use super::{Evidence, HeldDoc, Observations, Verdict};
use crate::scenario::NodeRole;
use schemas::ids::DataClass;
use schemas::policy::HubTier;

fn violation(doc: &HeldDoc, role: &NodeRole, o: &Observations) -> Option<String> {
    let region = doc.region.clone().or_else(|| {
        let t = doc.tenant.as_ref()?;
        o.tenants
            .iter()
            .find(|x| &x.id == t)
            .map(|x| x.region.clone())
    });
    match role {
        NodeRole::Hub {
            tier: HubTier::Global,
            ..
        } => (doc.class != DataClass::FleetAggregate).then(|| {
            format!(
                "a global hub may hold only fleet aggregates, this is {:?} data",
                doc.class
            )
        }),
        NodeRole::Hub {
            tier: HubTier::Regional,
            regions,
        } => {
            if doc.class == DataClass::Raw {
                return Some("raw data left its site".into());
            }
            if doc.class == DataClass::FleetAggregate && doc.tenant.is_none() {
                return None;
            }
            match region {
                Some(r) if regions.contains(&r) => None,
                Some(r) => Some(format!(
                    "tenant {} is in region {r}, this hub serves only {}",
                    doc.tenant.as_ref().map_or("?", |t| t.as_str()),
                    regions
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                None => Some("no region is known for this document's tenant".into()),
            }
        }
        NodeRole::Edge { tenant, site } => {
            let other_site = doc.site.as_ref().is_some_and(|s| s != site);
            let other_tenant = doc.tenant.as_ref().is_some_and(|t| t != tenant);
            match doc.class {
                DataClass::Raw if other_site || other_tenant => Some(format!(
                    "raw data of site {} left its site for {site}",
                    doc.site.as_ref().map_or("?", |s| s.as_str())
                )),
                DataClass::Site if other_site || other_tenant => Some(format!(
                    "site data of {} is on an edge of {site}",
                    doc.site.as_ref().map_or("?", |s| s.as_str())
                )),
                DataClass::Tenant if other_tenant => Some(format!(
                    "tenant data of {} is on an edge of tenant {tenant}",
                    doc.tenant.as_ref().map_or("?", |t| t.as_str())
                )),
                _ => None,
            }
        }
    }
}

/// Check that no document crossed a compliance boundary.
pub fn check(o: &Observations) -> Verdict {
    if o.holdings.is_empty() {
        return Verdict::unknown("compliance", "no node reported what it holds");
    }
    let mut evidence = Vec::new();
    let mut n = 0;
    for h in &o.holdings {
        let Some(node) = o.nodes.iter().find(|x| x.name == h.node) else {
            evidence.push(Evidence::Malformed {
                detail: format!("holdings of unknown node {}", h.node),
            });
            continue;
        };
        for d in &h.docs {
            n += 1;
            if let Some(rule) = violation(d, &node.role, o) {
                evidence.push(Evidence::Compliance {
                    node: h.node.clone(),
                    doc: d.clone(),
                    rule,
                });
            }
        }
    }
    Verdict::new(
        "compliance",
        evidence,
        format!("{n} held documents are all on the right side of every boundary"),
        "documents crossed a compliance boundary".into(),
    )
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // fixtures are built up field by field
mod tests {
    use super::*;
    use crate::check::{Holding, NodeInfo, Status};
    use crate::scenario::TenantSpec;
    use schemas::TenantId;
    use schemas::ids::SiteId;
    use schemas::policy::Region;

    fn fleet() -> Observations {
        let eu = Region::new("eu").unwrap();
        let us = Region::new("us").unwrap();
        let mut o = Observations::default();
        o.tenants = vec![
            TenantSpec {
                id: TenantId::new("acme").unwrap(),
                region: eu.clone(),
            },
            TenantSpec {
                id: TenantId::new("globex").unwrap(),
                region: us,
            },
        ];
        o.nodes = vec![
            NodeInfo {
                name: "hub-eu".into(),
                role: NodeRole::Hub {
                    tier: HubTier::Regional,
                    regions: vec![eu],
                },
            },
            NodeInfo {
                name: "hub-global".into(),
                role: NodeRole::Hub {
                    tier: HubTier::Global,
                    regions: vec![],
                },
            },
            NodeInfo {
                name: "s1/edge-1".into(),
                role: NodeRole::Edge {
                    tenant: TenantId::new("acme").unwrap(),
                    site: SiteId::new("s1").unwrap(),
                },
            },
        ];
        o
    }

    fn doc(id: &str, class: DataClass, tenant: &str, site: Option<&str>) -> HeldDoc {
        HeldDoc {
            doc: id.into(),
            class,
            tenant: Some(TenantId::new(tenant).unwrap()),
            site: site.map(|s| SiteId::new(s).unwrap()),
            region: None,
        }
    }

    fn hold(node: &str, docs: Vec<HeldDoc>) -> Holding {
        Holding {
            node: node.into(),
            docs,
        }
    }

    #[test]
    fn documents_across_boundaries_are_reported() {
        let mut o = fleet();
        o.holdings = vec![
            hold(
                "hub-eu",
                vec![
                    doc("t/acme/s/s1/dev/d1", DataClass::Site, "acme", Some("s1")),
                    doc(
                        "t/globex/s/p7/dev/d1",
                        DataClass::Site,
                        "globex",
                        Some("p7"),
                    ),
                    doc("raw/s1/edge-1/seg-0", DataClass::Raw, "acme", Some("s1")),
                ],
            ),
            hold(
                "hub-global",
                vec![
                    doc(
                        "t/acme/agg/2026-11-23",
                        DataClass::FleetAggregate,
                        "acme",
                        None,
                    ),
                    doc(
                        "t/acme/s/s1/tel/d1/2026-11-23",
                        DataClass::Site,
                        "acme",
                        Some("s1"),
                    ),
                ],
            ),
            hold(
                "s1/edge-1",
                vec![
                    doc("raw/s1/edge-1/seg-0", DataClass::Raw, "acme", Some("s1")),
                    doc("t/acme/s/s2/site", DataClass::Site, "acme", Some("s2")),
                ],
            ),
        ];
        let v = check(&o);
        assert_eq!(v.status, Status::Fail);
        let found: Vec<(String, String)> = v
            .evidence
            .iter()
            .map(|e| match e {
                Evidence::Compliance { node, doc, .. } => (node.clone(), doc.doc.clone()),
                e => panic!("{e:?}"),
            })
            .collect();
        assert_eq!(
            found,
            [
                ("hub-eu".to_string(), "t/globex/s/p7/dev/d1".to_string()),
                ("hub-eu".into(), "raw/s1/edge-1/seg-0".into()),
                ("hub-global".into(), "t/acme/s/s1/tel/d1/2026-11-23".into()),
                ("s1/edge-1".into(), "t/acme/s/s2/site".into()),
            ]
        );
        assert!(
            v.evidence[0].describe().contains("region us"),
            "{}",
            v.evidence[0].describe()
        );
    }

    #[test]
    fn compliant_holdings_pass() {
        let mut o = fleet();
        assert_eq!(check(&o).status, Status::Unknown);
        o.holdings = vec![
            hold(
                "hub-eu",
                vec![doc(
                    "t/acme/s/s1/dev/d1",
                    DataClass::Site,
                    "acme",
                    Some("s1"),
                )],
            ),
            hold(
                "hub-global",
                vec![doc(
                    "t/acme/agg/2026-11-23",
                    DataClass::FleetAggregate,
                    "acme",
                    None,
                )],
            ),
            hold(
                "s1/edge-1",
                vec![doc(
                    "raw/s1/edge-1/seg-0",
                    DataClass::Raw,
                    "acme",
                    Some("s1"),
                )],
            ),
        ];
        assert_eq!(check(&o).status, Status::Pass);
    }
}
