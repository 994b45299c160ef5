//! The layout of a local fleet (tenants, regions, sites, edges, devices) and
//! the config files written for it: pure, no IO, so it is unit-tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use schemas::config::{EdgeConfig, HubConfig, HubLink, ListenSection, NodeSection, TenantConfig};
use schemas::identity::EndpointKey;
use schemas::ids::{IdError, SiteId, TenantId};
use schemas::policy::Region;

use crate::maps::{SimDeviceSpec, edge_config, fleet};

/// The two demo tenants and their regions; sites are dealt to them in turn.
pub const TENANTS: [(&str, &str); 2] = [("acme", "eu"), ("globex", "us")];

/// How big a fleet to lay out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Number of sites (dealt round-robin to the tenants).
    pub sites: usize,
    /// Edge nodes per site.
    pub edges_per_site: usize,
    /// Simulated devices per edge.
    pub devices_per_edge: usize,
    /// Number of tenants used, 1..=2 (each in its own region).
    pub tenants: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            sites: 3,
            edges_per_site: 1,
            devices_per_edge: 10,
            tenants: 2,
        }
    }
}

/// A shape that cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A count is out of its range.
    #[error("{what} = {got}: must be {min}..={max}")]
    OutOfRange {
        /// Which flag.
        what: &'static str,
        /// The value given.
        got: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A generated id was refused by `schemas` (a bug here).
    #[error("generated id: {0}")]
    Id(#[from] IdError),
}

/// One edge node of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgePlan {
    /// Tenant the edge belongs to.
    pub tenant: TenantId,
    /// Its site.
    pub site: SiteId,
    /// Short name, `edge-1`, unique within the site.
    pub name: String,
    /// The simulated devices it polls (addresses on port 0 until started).
    pub devices: Vec<SimDeviceSpec>,
}

impl EdgePlan {
    /// `site-2/edge-1`: how the edge is named in progress lines.
    pub fn label(&self) -> String {
        format!("{}/{}", self.site, self.name)
    }

    /// `site-2-edge-1`: used for its directory, config and log file.
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.site, self.name)
    }
}

/// The whole fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetPlan {
    /// Tenants with their regions.
    pub tenants: Vec<(TenantId, Region)>,
    /// Edges, site by site.
    pub edges: Vec<EdgePlan>,
}

fn check(what: &'static str, got: usize, min: usize, max: usize) -> Result<(), ShapeError> {
    if (min..=max).contains(&got) {
        Ok(())
    } else {
        Err(ShapeError::OutOfRange {
            what,
            got,
            min,
            max,
        })
    }
}

impl FleetPlan {
    /// Lay out a fleet. Device ids are unique within a site (edges of a site
    /// share its documents), `cold-room-1`, `pump-1`, `meter-1`, ...
    pub fn new(shape: &Shape) -> Result<FleetPlan, ShapeError> {
        check("--sites", shape.sites, 1, 50)?;
        check("--edges", shape.edges_per_site, 1, 10)?;
        check("--devices", shape.devices_per_edge, 1, 200)?;
        check("tenants", shape.tenants, 1, TENANTS.len())?;
        let tenants = TENANTS[..shape.tenants]
            .iter()
            .map(|(t, r)| Ok((TenantId::new(*t)?, Region::new(*r)?)))
            .collect::<Result<Vec<_>, IdError>>()?;
        let mut edges = Vec::new();
        for s in 0..shape.sites {
            let tenant = tenants[s % tenants.len()].0.clone();
            let site = SiteId::new(format!("site-{}", s + 1))?;
            let all = fleet(shape.devices_per_edge * shape.edges_per_site, 0)?;
            for (e, devices) in all.chunks(shape.devices_per_edge).enumerate() {
                edges.push(EdgePlan {
                    tenant: tenant.clone(),
                    site: site.clone(),
                    name: format!("edge-{}", e + 1),
                    devices: devices.to_vec(),
                });
            }
        }
        Ok(FleetPlan { tenants, edges })
    }

    /// Number of sites.
    pub fn sites(&self) -> usize {
        let mut s: Vec<&SiteId> = self.edges.iter().map(|e| &e.site).collect();
        s.dedup();
        s.len()
    }

    /// The hub config: every tenant in its region, one hub serving them all.
    pub fn hub_config(&self, data_dir: &Path, http: SocketAddr) -> HubConfig {
        let mut regions: Vec<Region> = Vec::new();
        for (_, r) in &self.tenants {
            if !regions.contains(r) {
                regions.push(r.clone());
            }
        }
        HubConfig {
            data_dir: data_dir.to_path_buf(),
            regions,
            tenants: self
                .tenants
                .iter()
                .map(|(id, region)| TenantConfig {
                    id: id.clone(),
                    region: region.clone(),
                })
                .collect(),
            sync_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: http,
            ..HubConfig::default()
        }
    }
}

/// Where the edge is told its hub is and how to join it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubContact {
    /// The hub's endpoint id (from `cloud-hub init`).
    pub endpoint_id: EndpointKey,
    /// Its sync (QUIC) address, from its ready line.
    pub addr: SocketAddr,
}

/// The edge config for one edge whose devices are started (real addresses
/// in `devices`), with its data directory, HTTP port and join token.
pub fn edge_node_config(
    edge: &EdgePlan,
    devices: &[SimDeviceSpec],
    data_dir: PathBuf,
    http: SocketAddr,
    hub: &HubContact,
    join_token: String,
    summary_window_s: u64,
) -> EdgeConfig {
    let mut cfg = edge_config(devices);
    cfg.node = NodeSection {
        tenant: edge.tenant.clone(),
        site: edge.site.clone(),
        name: Some(edge.label()),
        data_dir,
        key_path: None,
    };
    cfg.hub = Some(HubLink {
        endpoint_id: hub.endpoint_id,
        addr: hub.addr,
        join_token: Some(join_token),
    });
    cfg.listen = ListenSection {
        sync: SocketAddr::from(([127, 0, 0, 1], 0)),
        http,
    };
    cfg.summariser.window_s = summary_window_s;
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_shape_two_tenants_two_regions_three_sites_ten_devices() {
        let p = FleetPlan::new(&Shape::default()).unwrap();
        assert_eq!(p.sites(), 3);
        assert_eq!(p.edges.len(), 3);
        let tenants: Vec<&str> = p.edges.iter().map(|e| e.tenant.as_str()).collect();
        assert_eq!(tenants, ["acme", "globex", "acme"]);
        assert!(p.edges.iter().all(|e| e.devices.len() == 10));
        let hub = p.hub_config(Path::new("/d"), "127.0.0.1:1".parse().unwrap());
        let regions: Vec<&str> = hub.regions.iter().map(Region::as_str).collect();
        assert_eq!(regions, ["eu", "us"]);
        hub.validate().unwrap();
    }

    #[test]
    fn edges_of_a_site_get_distinct_devices() {
        let p = FleetPlan::new(&Shape {
            sites: 2,
            edges_per_site: 2,
            devices_per_edge: 4,
            tenants: 1,
        })
        .unwrap();
        assert_eq!(p.edges.len(), 4);
        assert_eq!(p.edges[1].label(), "site-1/edge-2");
        let mut site1: Vec<&str> = p.edges[..2]
            .iter()
            .flat_map(|e| e.devices.iter().map(|d| d.id.as_str()))
            .collect();
        let n = site1.len();
        site1.sort();
        site1.dedup();
        assert_eq!(site1.len(), n, "device ids repeat within a site");
        assert!(p.edges.iter().all(|e| e.tenant.as_str() == "acme"));
    }

    #[test]
    fn bad_shapes_are_refused_with_the_flag_name() {
        let e = FleetPlan::new(&Shape {
            sites: 0,
            ..Shape::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "--sites = 0: must be 1..=50");
        let e = FleetPlan::new(&Shape {
            devices_per_edge: 1000,
            ..Shape::default()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("--devices = 1000"), "{e}");
    }

    #[test]
    fn edge_config_validates_and_names_the_hub() {
        let p = FleetPlan::new(&Shape::default()).unwrap();
        let hub = HubContact {
            endpoint_id: EndpointKey([7; 32]),
            addr: "127.0.0.1:4000".parse().unwrap(),
        };
        let cfg = edge_node_config(
            &p.edges[1],
            &p.edges[1].devices,
            "/d/edges/x".into(),
            "127.0.0.1:4001".parse().unwrap(),
            &hub,
            "fsj1.tok".into(),
            10,
        );
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        let back = EdgeConfig::parse(Path::new("e.toml"), &text).unwrap();
        assert_eq!(back.node.tenant.as_str(), "globex");
        assert_eq!(back.node.site.as_str(), "site-2");
        assert_eq!(back.hub.unwrap().join_token.as_deref(), Some("fsj1.tok"));
        assert_eq!(back.summariser.window_s, 10);
        assert_eq!(back.devices.len(), 10);
    }
}
