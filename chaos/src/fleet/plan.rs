//! The plan of a fleet run, without IO: node directories, fixed sync
//! ports, device ids, and every node's config wired through the relays.
//!
//! The real sync addresses are allocated once ([`FleetPlan::new`] takes the
//! allocator, so tests inject one) and reused on restart: a relay forwards
//! to a fixed address. The configs only ever name relay addresses for
//! other nodes; [`check_routing`] proves it for a finished set of configs.
//!
//! Two ways to place nodes: all on 127.0.0.1 ([`loopback_addrs`]: iroh
//! can route around the relays), or one network namespace per node
//! ([`netns_addrs`]): the node binds its inside address, its relays and
//! devices listen on its gateway (the root side of its veth), the only
//! address it can reach.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use schemas::config::{EdgeConfig, HubConfig, HubLink, PeerConfig, TenantConfig};
use schemas::identity::EndpointKey;
use schemas::ids::DeviceId;
use schemas::policy::HubTier;
use testbed::physics::DeviceKind;

use super::FleetError;
use crate::scenario::{Link, NodeRole, Scenario};

/// The edges' summariser window in a chaos run, seconds.
pub const SUMMARY_WINDOW_S: u64 = 10;

/// A simulated device an edge polls.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedDevice {
    /// The scenario's path (`site/edge-n/dev-k`).
    pub path: String,
    /// Its device id, unique in the site (`edge-n-dev-k`).
    pub id: DeviceId,
    /// What it simulates (cold room, pump, meter in turn).
    pub kind: DeviceKind,
}

/// One node of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    /// Scenario name (`hub-eu`, `coldstore-1/edge-2`).
    pub name: String,
    /// Hub or edge.
    pub role: NodeRole,
    /// Its own directory (config, data, log).
    pub dir: PathBuf,
    /// Its real QUIC address: fixed for the run, known only to relays.
    pub sync: SocketAddr,
    /// Where its relays and devices listen: the root side of its veth
    /// (127.0.0.1 on loopback).
    pub gateway: IpAddr,
    /// Its HTTP bind (its own address, any port: the `ready` line says).
    pub http: SocketAddr,
    /// Its network namespace, if it has one.
    pub netns: Option<String>,
    /// Devices (edges only).
    pub devices: Vec<PlannedDevice>,
}

impl NodePlan {
    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(if self.is_hub() {
            "hub.toml"
        } else {
            "edge.toml"
        })
    }
    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// The process log (stdout and stderr, every incarnation).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }
    /// The identity key file.
    pub fn key_path(&self) -> PathBuf {
        self.data_dir()
            .join(if self.is_hub() { "hub.key" } else { "node.key" })
    }
    /// Whether the node is a hub.
    pub fn is_hub(&self) -> bool {
        matches!(self.role, NodeRole::Hub { .. })
    }
}

/// Where one node lives on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Its real sync address.
    pub sync: SocketAddr,
    /// Its gateway (relays and devices bind here).
    pub gateway: IpAddr,
    /// Its network namespace, if any.
    pub netns: Option<String>,
}

/// The sync port of every node in its own namespace (the namespace is
/// empty, so any port is free).
pub const NETNS_SYNC_PORT: u16 = 4700;

/// Node placement on 127.0.0.1: a free UDP port each, no namespace.
pub fn loopback_addrs(_index: usize) -> Result<NodeAddrs, FleetError> {
    Ok(NodeAddrs {
        sync: SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
        gateway: IpAddr::V4(Ipv4Addr::LOCALHOST),
        netns: None,
    })
}

/// Node placement in namespaces: node `i` binds `ip(i):NETNS_SYNC_PORT`
/// inside namespace `i`, its gateway is the root side of its veth.
pub fn netns_addrs(
    set: &crate::netns::NetnsSet,
) -> impl FnMut(usize) -> Result<NodeAddrs, FleetError> + '_ {
    move |i| {
        let n = set.node(i).ok_or_else(|| {
            FleetError::Plan(format!(
                "node {i} has no namespace ({} created)",
                set.nodes().len()
            ))
        })?;
        Ok(NodeAddrs {
            sync: SocketAddr::from((n.ip, NETNS_SYNC_PORT)),
            gateway: IpAddr::V4(n.gateway),
            netns: Some(n.ns.clone()),
        })
    }
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetPlan {
    /// Root directory of the run.
    pub root: PathBuf,
    /// Nodes, hubs first.
    pub nodes: Vec<NodePlan>,
    /// The node pairs that talk, one relay each.
    pub links: Vec<Link>,
}

/// A directory name for a node name (`coldstore-1/edge-2` ->
/// `coldstore-1--edge-2`).
pub fn slug(node: &str) -> String {
    node.replace('/', "--")
}

/// The device id of a scenario device path: `site/edge-n/dev-k` ->
/// `edge-n-dev-k` (unique within the site, since device documents are
/// per site).
pub fn device_id(path: &str) -> Result<DeviceId, FleetError> {
    let parts: Vec<&str> = path.split('/').collect();
    let [_site, edge, dev] = parts.as_slice() else {
        return Err(FleetError::Plan(format!(
            "device {path:?}: expected site/edge-n/dev-k"
        )));
    };
    DeviceId::new(format!("{edge}-{dev}"))
        .map_err(|e| FleetError::Plan(format!("device {path:?}: {e}")))
}

impl FleetPlan {
    /// Plan a scenario's fleet under `root`; `place(i)` gives node `i`'s
    /// sync address, gateway and namespace ([`loopback_addrs`],
    /// [`netns_addrs`]).
    pub fn new(
        s: &Scenario,
        root: &Path,
        place: &mut dyn FnMut(usize) -> Result<NodeAddrs, FleetError>,
    ) -> Result<FleetPlan, FleetError> {
        let mut nodes = Vec::new();
        let devices = s.fleet.devices();
        for (i, (name, role)) in s.fleet.nodes().into_iter().enumerate() {
            let prefix = format!("{name}/");
            let mine = devices
                .iter()
                .filter(|d| d.starts_with(&prefix))
                .enumerate()
                .map(|(i, p)| {
                    Ok(PlannedDevice {
                        path: p.clone(),
                        id: device_id(p)?,
                        kind: DeviceKind::ALL[i % DeviceKind::ALL.len()],
                    })
                })
                .collect::<Result<Vec<_>, FleetError>>()?;
            let at = place(i)?;
            nodes.push(NodePlan {
                dir: root.join(slug(&name)),
                sync: at.sync,
                gateway: at.gateway,
                http: SocketAddr::new(at.sync.ip(), 0),
                netns: at.netns,
                name,
                role,
                devices: mine,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for n in &nodes {
            if !seen.insert(n.sync) {
                return Err(FleetError::Plan(format!(
                    "port allocator gave {} twice",
                    n.sync
                )));
            }
        }
        Ok(FleetPlan {
            root: root.to_path_buf(),
            nodes,
            links: s.fleet.links(),
        })
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every node's real sync address (the relays' targets).
    pub fn real_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.sync))
            .collect()
    }

    /// Every node's gateway (where the relay sides it talks to bind).
    pub fn gateways(&self) -> BTreeMap<String, IpAddr> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.gateway))
            .collect()
    }

    /// The node a device path belongs to, and the device.
    pub fn device(&self, path: &str) -> Option<(&NodePlan, &PlannedDevice)> {
        self.nodes
            .iter()
            .find_map(|n| n.devices.iter().find(|d| d.path == path).map(|d| (n, d)))
    }

    /// The peers a node dials: every link it is on, the other end.
    pub fn neighbours(&self, node: &str) -> Vec<&str> {
        self.links
            .iter()
            .filter_map(|l| {
                if l.a == node {
                    Some(l.b.as_str())
                } else if l.b == node {
                    Some(l.a.as_str())
                } else {
                    None
                }
            })
            .collect()
    }

    /// The config of a hub. `upstream` is the global hub it forwards to, as
    /// `(endpoint id, relay address)`.
    pub fn hub_config(
        &self,
        node: &NodePlan,
        s: &Scenario,
        upstream: Option<(EndpointKey, SocketAddr)>,
    ) -> Result<HubConfig, FleetError> {
        let NodeRole::Hub { tier, regions } = &node.role else {
            return Err(FleetError::Plan(format!("{} is not a hub", node.name)));
        };
        let tenants = s
            .fleet
            .tenants
            .iter()
            .filter(|t| *tier == HubTier::Global || regions.contains(&t.region))
            .map(|t| TenantConfig {
                id: t.id.clone(),
                region: t.region.clone(),
            })
            .collect();
        // A global hub serves every region (it only ever receives
        // aggregates); a hub config must name at least one.
        let regions = if *tier == HubTier::Global && regions.is_empty() {
            let all: std::collections::BTreeSet<_> =
                s.fleet.tenants.iter().map(|t| t.region.clone()).collect();
            all.into_iter().collect()
        } else {
            regions.clone()
        };
        Ok(HubConfig {
            data_dir: node.data_dir(),
            key_path: Some(node.key_path()),
            regions,
            tier: *tier,
            tenants,
            sync_listen: node.sync,
            http_listen: node.http,
            upstream: upstream.map(|(endpoint_id, addr)| PeerConfig { endpoint_id, addr }),
            ..HubConfig::default()
        })
    }

    /// The config of an edge: its hub and site peers at their relay
    /// addresses (`dial(from, to)`), its devices at `device_addrs`, the
    /// loops and alarms testbed suggests for them.
    pub fn edge_config(
        &self,
        node: &NodePlan,
        keys: &BTreeMap<String, EndpointKey>,
        dial: &dyn Fn(&str, &str) -> Option<SocketAddr>,
        join_token: Option<String>,
        device_addrs: &BTreeMap<String, SocketAddr>,
    ) -> Result<EdgeConfig, FleetError> {
        let NodeRole::Edge { tenant, site } = &node.role else {
            return Err(FleetError::Plan(format!("{} is not an edge", node.name)));
        };
        let key = |n: &str| {
            keys.get(n)
                .cloned()
                .ok_or_else(|| FleetError::Plan(format!("no endpoint id for {n}")))
        };
        let via = |to: &str| {
            dial(&node.name, to).ok_or_else(|| {
                FleetError::Routing(format!("no relay between {} and {to}", node.name))
            })
        };
        let mut cfg = EdgeConfig::default();
        cfg.node.tenant = tenant.clone();
        cfg.node.site = site.clone();
        cfg.node.name = Some(node.name.clone());
        cfg.node.data_dir = node.data_dir();
        cfg.node.key_path = Some(node.key_path());
        cfg.listen.sync = node.sync;
        cfg.listen.http = node.http;
        let mut hubs = Vec::new();
        for peer in self.neighbours(&node.name) {
            let Some(p) = self.node(peer) else {
                return Err(FleetError::Plan(format!("link to unknown node {peer}")));
            };
            if p.is_hub() {
                hubs.push(peer);
            } else {
                cfg.peers.push(PeerConfig {
                    endpoint_id: key(peer)?,
                    addr: via(peer)?,
                });
            }
        }
        match hubs.as_slice() {
            [] => {}
            [hub] => {
                cfg.hub = Some(HubLink {
                    endpoint_id: key(hub)?,
                    addr: via(hub)?,
                    join_token,
                })
            }
            more => {
                return Err(FleetError::Unsupported(format!(
                    "{} talks to {} hubs ({}); an edge config has one [hub]",
                    node.name,
                    more.len(),
                    more.join(", ")
                )));
            }
        }
        for d in &node.devices {
            let addr = device_addrs
                .get(&d.path)
                .copied()
                .ok_or_else(|| FleetError::Plan(format!("device {} has no address", d.path)))?;
            cfg.devices
                .push(testbed::maps::device_config(d.kind, d.id.clone(), addr));
            cfg.loops
                .extend(testbed::maps::suggested_loops(d.kind, &d.id));
            cfg.alarms
                .extend(testbed::maps::suggested_alarms(d.kind, &d.id));
        }
        // Short windows, so that once writers stop every window closes and
        // syncs well within a quiescence timeout.
        cfg.summariser.window_s = SUMMARY_WINDOW_S;
        cfg.control.tick_journal = true; // loop liveness: every tick, see fleet::observe
        cfg.validate().map_err(|(field, reason)| {
            FleetError::Plan(format!(
                "{}: generated config: {field}: {reason}",
                node.name
            ))
        })?;
        Ok(cfg)
    }
}

/// Every address a node config gives for another node must be a relay
/// address, never any node's real sync address, and must be on the node's
/// own gateway (where its relays listen; 127.0.0.1 on loopback), as must
/// its devices; each node must bind its planned sync address, and its
/// HTTP API on its own address. Returns the first leak found.
pub fn check_routing(
    plan: &FleetPlan,
    edges: &[(String, EdgeConfig)],
    hubs: &[(String, HubConfig)],
) -> Result<(), FleetError> {
    let real = plan.real_addrs();
    let node = |name: &str| {
        plan.node(name)
            .ok_or_else(|| FleetError::Routing(format!("{name}: not a node of the plan")))
    };
    let leak = |who: &NodePlan, what: &str, addr: SocketAddr| -> Result<(), FleetError> {
        if let Some((owner, _)) = real.iter().find(|(_, a)| **a == addr) {
            return Err(FleetError::Routing(format!(
                "{}: {what} is {addr}, the real sync address of {owner}: it would bypass the relay",
                who.name
            )));
        }
        if addr.ip() != who.gateway {
            return Err(FleetError::Routing(format!(
                "{}: {what} is {addr}, not on its gateway {} (where its relays and devices listen)",
                who.name, who.gateway
            )));
        }
        Ok(())
    };
    let binds = |who: &NodePlan, sync: SocketAddr, http: SocketAddr| {
        if sync != who.sync {
            return Err(FleetError::Routing(format!(
                "{}: binds {sync} but the relays expect {}",
                who.name, who.sync
            )));
        }
        if http.ip() != who.sync.ip() {
            return Err(FleetError::Routing(format!(
                "{}: serves HTTP on {http}, not on its own address {}",
                who.name,
                who.sync.ip()
            )));
        }
        Ok(())
    };
    for (name, c) in edges {
        let n = node(name)?;
        binds(n, c.listen.sync, c.listen.http)?;
        if let Some(h) = &c.hub {
            leak(n, "[hub].addr", h.addr)?;
        }
        for (i, p) in c.peers.iter().enumerate() {
            leak(n, &format!("peers[{i}].addr"), p.addr)?;
        }
        for d in &c.devices {
            leak(n, &format!("device {}", d.id), d.addr)?;
        }
    }
    for (name, c) in hubs {
        let n = node(name)?;
        binds(n, c.sync_listen, c.http_listen)?;
        if let Some(u) = &c.upstream {
            leak(n, "upstream.addr", u.addr)?;
        }
    }
    Ok(())
}

/// A free UDP port on 127.0.0.1 (bound, read, released). Another process
/// could take it before the node binds it; the node then fails to start
/// with a clear error, and the run says so.
pub fn free_udp_port() -> Result<u16, FleetError> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|source| FleetError::Io {
        path: PathBuf::from("udp 127.0.0.1:0"),
        source,
    })?;
    s.local_addr()
        .map(|a| a.port())
        .map_err(|source| FleetError::Io {
            path: PathBuf::from("udp 127.0.0.1:0"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCENARIO: &str = r#"
name = "t"
seed = 1
duration = "10s"
[[fleet.hubs]]
name = "hub-eu"
regions = ["eu"]
[[fleet.tenants]]
id = "acme"
region = "eu"
[[fleet.sites]]
tenant = "acme"
id = "s1"
edges = 3
devices_per_edge = 2
"#;

    fn scenario() -> Scenario {
        Scenario::parse(Path::new("t.toml"), SCENARIO).unwrap()
    }

    fn plan() -> FleetPlan {
        let mut p = 40000;
        FleetPlan::new(&scenario(), Path::new("/tmp/run"), &mut |_| {
            p += 1;
            Ok(NodeAddrs {
                sync: SocketAddr::from(([127, 0, 0, 1], p)),
                gateway: IpAddr::from([127, 0, 0, 1]),
                netns: None,
            })
        })
        .unwrap()
    }

    /// Node i in namespace `ns-i` at 10.200.i.2, gateway 10.200.i.1.
    fn netns_plan() -> FleetPlan {
        FleetPlan::new(&scenario(), Path::new("/tmp/run"), &mut |i| {
            Ok(NodeAddrs {
                sync: SocketAddr::from(([10, 200, i as u8, 2], NETNS_SYNC_PORT)),
                gateway: IpAddr::from([10, 200, i as u8, 1]),
                netns: Some(format!("ns-{i}")),
            })
        })
        .unwrap()
    }

    fn key(i: u8) -> EndpointKey {
        EndpointKey([i; 32])
    }

    /// A stand-in relay mesh: the relay of link i has sides 50000+2i (on
    /// a's gateway) and 50000+2i+1 (on b's).
    fn dial(plan: &FleetPlan) -> impl Fn(&str, &str) -> Option<SocketAddr> + '_ {
        move |from, to| {
            let gw = plan.node(from)?.gateway;
            plan.links.iter().enumerate().find_map(|(i, l)| {
                let base = 50000 + 2 * i as u16;
                if l.a == from && l.b == to {
                    Some(SocketAddr::new(gw, base))
                } else if l.b == from && l.a == to {
                    Some(SocketAddr::new(gw, base + 1))
                } else {
                    None
                }
            })
        }
    }

    fn keys(plan: &FleetPlan) -> BTreeMap<String, EndpointKey> {
        plan.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), key(i as u8 + 1)))
            .collect()
    }

    fn device_addrs(plan: &FleetPlan) -> BTreeMap<String, SocketAddr> {
        let mut port = 6000;
        let mut m = BTreeMap::new();
        for n in &plan.nodes {
            for d in &n.devices {
                port += 1;
                m.insert(d.path.clone(), SocketAddr::new(n.gateway, port));
            }
        }
        m
    }

    #[test]
    fn every_library_scenario_plans_hub_configs_that_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let loaded = crate::scenario::load_dir(&dir).unwrap();
        assert!(loaded.len() >= 8, "{}", loaded.len());
        for (file, s) in loaded {
            let s = s.unwrap();
            let mut p = 40000;
            let plan = FleetPlan::new(&s, Path::new("/tmp/run"), &mut |_| {
                p += 1;
                Ok(NodeAddrs {
                    sync: SocketAddr::from(([127, 0, 0, 1], p)),
                    gateway: IpAddr::from([127, 0, 0, 1]),
                    netns: None,
                })
            })
            .unwrap();
            for n in plan.nodes.iter().filter(|n| n.is_hub()) {
                let cfg = plan.hub_config(n, &s, None).unwrap();
                if let Err((field, why)) = cfg.validate() {
                    panic!("{}: {}: {field}: {why}", file.display(), n.name);
                }
            }
            // A command must name a writable holding register of the
            // simulated device it targets, or the edge refuses it and
            // at-most-once is never exercised.
            for ta in &s.timeline {
                let crate::scenario::Action::Command {
                    device, register, ..
                } = &ta.action
                else {
                    continue;
                };
                let (_, d) = plan.device(device).unwrap();
                let map = testbed::maps::register_map(d.kind);
                let spec = map.registers.iter().find(|r| &r.name == register);
                assert!(
                    spec.is_some_and(
                        |r| r.function == schemas::registers::RegisterFunction::Holding
                    ),
                    "{}: command on {device} ({:?}): {register:?} is not a holding register of it; it has {:?}",
                    file.display(),
                    d.kind,
                    map.registers
                        .iter()
                        .map(|r| (&r.name, r.function))
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn nodes_get_fixed_distinct_ports_and_site_unique_device_ids() {
        let p = plan();
        assert_eq!(p.nodes.len(), 4);
        assert_eq!(p.nodes[0].name, "hub-eu");
        assert_eq!(p.nodes[0].sync.port(), 40001);
        let e2 = p.node("s1/edge-2").unwrap();
        assert_eq!(e2.dir, Path::new("/tmp/run/s1--edge-2"));
        let ids: Vec<&str> = e2.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["edge-2-dev-1", "edge-2-dev-2"]);
        assert_eq!(p.device("s1/edge-3/dev-2").unwrap().0.name, "s1/edge-3");
        assert!(device_id("nope").is_err());
        // An allocator that repeats itself is caught.
        let r = FleetPlan::new(&scenario(), Path::new("/x"), &mut |_| {
            Ok(NodeAddrs {
                sync: SocketAddr::from(([127, 0, 0, 1], 7)),
                gateway: IpAddr::from([127, 0, 0, 1]),
                netns: None,
            })
        });
        assert!(matches!(r, Err(FleetError::Plan(m)) if m.contains("twice")));
    }

    #[test]
    fn edge_configs_name_only_relay_addresses_and_pass_the_routing_check() {
        let p = plan();
        let keys = keys(&p);
        let d = dial(&p);
        let devs = device_addrs(&p);
        let mut edges = Vec::new();
        for n in p.nodes.iter().filter(|n| !n.is_hub()) {
            let c = p
                .edge_config(n, &keys, &d, Some("fsj1.tok".into()), &devs)
                .unwrap();
            let hub = c.hub.as_ref().unwrap();
            assert_eq!(hub.endpoint_id, keys["hub-eu"]);
            assert_eq!(Some(hub.addr), d(&n.name, "hub-eu"));
            assert_eq!(hub.join_token.as_deref(), Some("fsj1.tok"));
            assert_eq!(c.peers.len(), 2, "two site peers");
            assert_eq!(c.listen.sync, n.sync);
            assert_eq!(c.devices.len(), 2);
            assert!(!c.loops.is_empty(), "a cold room gets a thermostat");
            edges.push((n.name.clone(), c));
        }
        let hub = &p.nodes[0];
        let hc = p.hub_config(hub, &scenario(), None).unwrap();
        assert_eq!(hc.sync_listen, hub.sync);
        assert_eq!(hc.tenants.len(), 1);
        check_routing(&p, &edges, &[(hub.name.clone(), hc.clone())]).unwrap();

        // A config that names a peer's real address is refused.
        let mut bad = edges.clone();
        bad[0].1.peers[0].addr = p.node("s1/edge-2").unwrap().sync;
        let e = check_routing(&p, &bad, &[]).unwrap_err().to_string();
        assert!(
            e.contains("bypass the relay") && e.contains("s1/edge-2"),
            "{e}"
        );
        // So is a node binding somewhere the relays do not expect.
        let mut moved = edges.clone();
        moved[1].1.listen.sync = SocketAddr::from(([127, 0, 0, 1], 1));
        assert!(check_routing(&p, &moved, &[]).is_err());
    }

    type Configs = (Vec<(String, EdgeConfig)>, Vec<(String, HubConfig)>);

    fn configs(p: &FleetPlan) -> Configs {
        let keys = keys(p);
        let d = dial(p);
        let devs = device_addrs(p);
        let edges = p
            .nodes
            .iter()
            .filter(|n| !n.is_hub())
            .map(|n| {
                let c = p.edge_config(n, &keys, &d, None, &devs).unwrap();
                (n.name.clone(), c)
            })
            .collect();
        let hub = &p.nodes[0];
        let hc = p.hub_config(hub, &scenario(), None).unwrap();
        (edges, vec![(hub.name.clone(), hc)])
    }

    #[test]
    fn in_namespaces_nodes_bind_inside_and_name_only_their_gateway() {
        let p = netns_plan();
        let e1 = p.node("s1/edge-1").unwrap();
        assert_eq!(e1.sync, "10.200.1.2:4700".parse().unwrap());
        assert_eq!(e1.gateway, IpAddr::from([10, 200, 1, 1]));
        assert_eq!(e1.netns.as_deref(), Some("ns-1"));
        let (edges, hubs) = configs(&p);
        check_routing(&p, &edges, &hubs).unwrap();
        let c1 = &edges[0].1;
        assert_eq!(
            c1.listen.http.ip(),
            e1.sync.ip(),
            "HTTP reachable from root"
        );
        assert_eq!(hubs[0].1.http_listen.ip(), p.nodes[0].sync.ip());
        assert!(c1.devices.iter().all(|d| d.addr.ip() == e1.gateway));
        assert_eq!(c1.hub.as_ref().unwrap().addr.ip(), e1.gateway);

        // A relay address on another node's gateway is unreachable from
        // inside: refused.
        let mut bad = edges.clone();
        bad[0].1.peers[0].addr = SocketAddr::from(([10, 200, 2, 1], 50001));
        let e = check_routing(&p, &bad, &hubs).unwrap_err().to_string();
        assert!(e.contains("not on its gateway 10.200.1.1"), "{e}");
        // So is loopback (the root namespace's loopback is not the node's).
        let mut lo = edges.clone();
        lo[1].1.devices[0].addr = SocketAddr::from(([127, 0, 0, 1], 6001));
        let e = check_routing(&p, &lo, &hubs).unwrap_err().to_string();
        assert!(e.contains("device edge-2-dev-1"), "{e}");
        // And an HTTP API the runner cannot reach.
        let mut http = hubs.clone();
        http[0].1.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let e = check_routing(&p, &edges, &http).unwrap_err().to_string();
        assert!(e.contains("serves HTTP"), "{e}");
    }

    #[test]
    fn an_edge_without_a_relay_to_its_hub_is_a_routing_error() {
        let p = plan();
        let none = |_: &str, _: &str| None;
        let e = p
            .edge_config(&p.nodes[1], &keys(&p), &none, None, &device_addrs(&p))
            .unwrap_err();
        assert!(matches!(e, FleetError::Routing(_)), "{e}");
    }
}
