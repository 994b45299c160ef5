//! End-of-run observations read from the stopped nodes' directories: what
//! the telemetry, commands, liveness and compliance checkers judge.
//!
//! Every reader works on a node that is no longer running, through the
//! nodes' own library code (no second parser of their formats):
//!
//! | observation | source | reader |
//! |---|---|---|
//! | `hub_rollups` | the hub's document store, every `t/../tel/..` document | `sync_core::docs::telemetry::rollups_with_late`: each window's rollup with its late parts (`late:{metric}@{window}#{seq}` root keys, written by the edge's `StoreSink`) merged in, as `cloud-hub`'s fleet store and aggregator read them |
//! | `acked_samples` | the edge's raw zone (`data/raw`) | `edge_node::raw_zone::RawZone::open` on a copy, `read_from(0)` |
//! | `command_executions` | the edge's ledger (`data/commands.ledger`) | `edge_node::commands::read_started`: one entry per "started" line |
//! | `loop_ticks` | the edge's tick journal (`data/loop-ticks.log`, `[control] tick_journal`) | `edge_node::control::read_journal` |
//! | `holdings` | every node's document store, plus the edge's raw zone | `DocStore::list`, `DocId` kinds' data classes |
//!
//! # Acknowledged = in the raw zone after restart
//!
//! The edge acknowledges a sample only once the raw zone has fsynced it, and
//! the summariser reads only fsynced records. Opening the zone runs the same
//! recovery the edge runs on restart: it keeps every record up to the first
//! torn one. So the samples the reopened zone yields are exactly
//! (a) every acknowledged sample (fsynced, so it survives kill -9), plus
//! (b) samples written but not yet fsynced when the node was killed that
//! happened to survive whole in the page cache. (b) were never
//! acknowledged, but the restarted node treats them as durable: it
//! summarises them, so they must be counted exactly once like the rest.
//! Samples cut off as a torn tail were never acknowledged and never
//! summarised (not durable, so not readable): they must not be counted.
//! Hence `acked_samples` = the reopened zone's samples, and the raw zone
//! leaves nothing whose outcome is unknown: `indeterminate_samples` stays
//! empty. The zone is opened on a copy, so its recovery never edits the
//! evidence, and a zone that cannot be opened is reported, not guessed.
//!
//! Samples with an implausible timestamp belong to the edge's unsynced
//! lane and never reach a hub; the telemetry checker sets them apart.
//!
//! # Times
//!
//! Record times are ms since the run started (`Fleet::start`). The runner
//! gives [`RunStart`]: the host's time since boot and its wall clock at
//! that moment, each taken when observing minus `Fleet::now_ms()` (the
//! run's monotonic elapsed time). The nodes run on the same host.
//!
//! - A tick at `mono_ms` in an incarnation whose journal `start` line says
//!   `boot_ms = B` is at `B - RunStart::boot_ms + mono_ms`: gaps within an
//!   incarnation are measured on its monotonic clock, and the incarnation
//!   is placed by the host's uptime, which no clock skew moves (a node
//!   booted "in 1970" still lands on the run's timeline). Only when either
//!   uptime is missing does the anchor fall back to wall time
//!   (`W - RunStart::wall_ms`), which a skewed node's clock would shift.
//! - A command start recorded at the node's wall time `at` is at
//!   `at - RunStart::wall_ms`: the ledger keeps only wall time, so on a
//!   node whose clock is skewed this is off by the skew (order and count,
//!   what the checker judges, are not).
//!
//! # What cannot be read
//!
//! A node whose data cannot be read yields an [`Unobserved`] entry naming
//! the checker, the node and the error, and the checker says Unknown with
//! that reason (see [`crate::check::run_checks`]): never a silent empty
//! list judged as a pass. Data of that node that would make other evidence
//! misleading is left out with it (a hub's rollups of an edge whose raw
//! zone is unreadable; a loop whose journal dropped ticks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemas::TenantId;
use schemas::config::EdgeConfig;
use schemas::ids::{DataClass, DocId, SiteId};
use schemas::metrics::Rollup;

use super::plan::NodePlan;
use crate::check::{
    CommandExecution, HeldDoc, Holding, HubRollup, LoopTicks, SampleObs, Unobserved,
};
use crate::scenario::{NodeRole, TenantSpec};

/// The raw zone's directory inside an edge's data directory.
pub const RAW_DIR: &str = "raw";
/// The command ledger's file inside an edge's data directory.
pub const LEDGER_FILE: &str = "commands.ledger";
/// The document store's directory inside a node's data directory.
pub const DOCS_DIR: &str = "docs";
/// The name a raw zone is held under in `holdings`.
pub const RAW_ZONE_DOC: &str = "raw-zone";

/// Why one node's data could not be observed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObserveError {
    /// The node has no such file or directory.
    #[error("{node}: no {what} at {}", path.display())]
    Missing {
        /// The node.
        node: String,
        /// What was looked for.
        what: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// A file or directory operation failed.
    #[error("{node}: {op} {}: {source}", path.display())]
    Io {
        /// The node.
        node: String,
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The document store could not be opened or read.
    #[error("{node}: document store: {detail}")]
    Store {
        /// The node.
        node: String,
        /// What failed.
        detail: String,
    },
    /// The raw zone could not be opened or read.
    #[error("{node}: {source}")]
    RawZone {
        /// The node.
        node: String,
        /// The error.
        #[source]
        source: edge_node::raw_zone::RawZoneError,
    },
    /// The command ledger could not be read.
    #[error("{node}: {source}")]
    Ledger {
        /// The node.
        node: String,
        /// The error.
        #[source]
        source: edge_node::commands::LedgerError,
    },
    /// The tick journal could not be read.
    #[error("{node}: {source}")]
    Journal {
        /// The node.
        node: String,
        /// The error.
        #[source]
        source: edge_node::control::JournalError,
    },
    /// The node's config could not be read.
    #[error("{node}: {detail}")]
    Config {
        /// The node.
        node: String,
        /// What failed.
        detail: String,
    },
}

/// The run's start on the host's clocks (see "Times" above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStart {
    /// The host's wall clock, ms since the epoch.
    pub wall_ms: i64,
    /// The host's time since boot, ms (`edge_node::control::uptime_ms`).
    pub boot_ms: Option<i64>,
}

impl RunStart {
    /// The run's start, given how long ago (ms) it was.
    pub fn elapsed_ms_ago(ms: i64) -> RunStart {
        use edge_node::clock::Clock as _;
        RunStart {
            wall_ms: edge_node::clock::SystemClock.now().as_millis() - ms,
            boot_ms: edge_node::control::uptime_ms()
                .and_then(|b| i64::try_from(b).ok())
                .map(|b| b - ms),
        }
    }
}

/// Where one node keeps its data: what the readers need of a
/// [`NodePlan`].
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFiles {
    /// Node name.
    pub name: String,
    /// Its role.
    pub role: NodeRole,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its identity key (to open its store).
    pub key_path: PathBuf,
    /// Its config file (edges: loop periods).
    pub config_path: PathBuf,
}

impl NodeFiles {
    /// The files of a planned node.
    pub fn of(n: &NodePlan) -> NodeFiles {
        NodeFiles {
            name: n.name.clone(),
            role: n.role.clone(),
            data_dir: n.data_dir(),
            key_path: n.key_path(),
            config_path: n.config_path(),
        }
    }
}

/// What [`observe_fleet`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Every regional hub's rollups.
    pub hub_rollups: Vec<HubRollup>,
    /// Every edge's durable samples.
    pub acked_samples: Vec<SampleObs>,
    /// Samples of unknown outcome (none: see the module docs).
    pub indeterminate_samples: Vec<SampleObs>,
    /// Every command start of every edge.
    pub command_executions: Vec<CommandExecution>,
    /// Every loop's ticks.
    pub loop_ticks: Vec<LoopTicks>,
    /// What each node holds.
    pub holdings: Vec<Holding>,
    /// The edges' summariser window, if the edge configs agree on one.
    pub rollup_window_ms: Option<i64>,
    /// What could not be observed, per checker and node.
    pub unobserved: Vec<Unobserved>,
}

fn unobserved(checker: &str, node: &str, e: &ObserveError) -> Unobserved {
    Unobserved {
        checker: checker.to_string(),
        node: node.to_string(),
        detail: e.to_string(),
    }
}

/// Open a stopped node's document store (sled, `{data_dir}/docs`).
pub fn open_store(n: &NodeFiles) -> Result<sync_core::store::DocStore, ObserveError> {
    let dir = n.data_dir.join(DOCS_DIR);
    if !dir.exists() {
        return Err(ObserveError::Missing {
            node: n.name.clone(),
            what: "document store",
            path: dir,
        });
    }
    let store_err = |detail: String| ObserveError::Store {
        node: n.name.clone(),
        detail,
    };
    let key = sync_core::identity::NodeKey::load_or_create(&n.key_path)
        .map_err(|e| store_err(format!("key {}: {e}", n.key_path.display())))?;
    let storage = sync_core::storage::SledStorage::open(&dir)
        .map_err(|e| store_err(format!("open {}: {e}", dir.display())))?;
    sync_core::store::DocStore::open(
        Arc::new(storage),
        key.clone(),
        key.new_actor(),
        sync_core::store::StoreConfig::default(),
    )
    .map_err(|e| store_err(format!("open: {e}")))
}

/// Every rollup in every telemetry document of a store: the main rollups
/// (as the hub's fleet store reads them) and the late parts.
pub fn read_rollups(
    hub: &str,
    store: &sync_core::store::DocStore,
) -> Result<Vec<HubRollup>, ObserveError> {
    let mut out = Vec::new();
    for id in store.list() {
        let DocId::Telemetry { tenant, site, .. } = &id else {
            continue;
        };
        let read = store
            .read(&id, |doc| -> Result<Vec<Rollup>, String> {
                let (rollups, bad) = sync_core::docs::telemetry::rollups_with_late(doc)
                    .map_err(|e| e.to_string())?;
                if let Some(e) = bad.first() {
                    return Err(format!("{} undecodable rollups, first: {e}", bad.len()));
                }
                Ok(rollups)
            })
            .map_err(|e| ObserveError::Store {
                node: hub.to_string(),
                detail: format!("{id}: {e}"),
            })?;
        let rollups = match read {
            None => continue,
            Some(r) => r.map_err(|detail| ObserveError::Store {
                node: hub.to_string(),
                detail: format!("{id}: {detail}"),
            })?,
        };
        out.extend(rollups.into_iter().map(|rollup| HubRollup {
            hub: hub.to_string(),
            tenant: tenant.clone(),
            site: site.clone(),
            rollup,
        }));
    }
    Ok(out)
}

/// What a store holds, labelled for the compliance checker: each
/// document's class, tenant, site and the tenant's region (from the
/// scenario's tenants).
pub fn read_holdings(store: &sync_core::store::DocStore, tenants: &[TenantSpec]) -> Vec<HeldDoc> {
    store
        .list()
        .into_iter()
        .map(|id| held(&id, tenants))
        .collect()
}

fn region_of(tenant: Option<&TenantId>, tenants: &[TenantSpec]) -> Option<schemas::policy::Region> {
    let t = tenant?;
    tenants
        .iter()
        .find(|x| &x.id == t)
        .map(|x| x.region.clone())
}

fn held(id: &DocId, tenants: &[TenantSpec]) -> HeldDoc {
    HeldDoc {
        doc: id.to_string(),
        class: id.kind().data_class(),
        tenant: id.tenant().cloned(),
        site: id.site().cloned(),
        region: region_of(id.tenant(), tenants),
    }
}

fn copy_dir(node: &str, from: &Path, to: &Path) -> Result<(), ObserveError> {
    let io = |op, path: &Path| {
        let node = node.to_string();
        let path = path.to_path_buf();
        move |source| ObserveError::Io {
            node,
            op,
            path,
            source,
        }
    };
    std::fs::create_dir_all(to).map_err(io("create", to))?;
    for e in std::fs::read_dir(from).map_err(io("list", from))? {
        let e = e.map_err(io("list", from))?;
        let name = e.file_name();
        if name == "LOCK" {
            continue;
        }
        let src = e.path();
        if src.is_file() {
            std::fs::copy(&src, to.join(&name)).map_err(io("copy", &src))?;
        }
    }
    Ok(())
}

/// Every sample a stopped edge's raw zone holds (see the module docs for
/// why that is the acknowledged set). The zone is copied to a temporary
/// directory first, so recovery never edits the node's files.
pub fn read_raw_zone(
    edge: &str,
    site: &SiteId,
    data_dir: &Path,
) -> Result<Vec<SampleObs>, ObserveError> {
    let dir = data_dir.join(RAW_DIR);
    if !dir.is_dir() {
        return Err(ObserveError::Missing {
            node: edge.to_string(),
            what: "raw zone",
            path: dir,
        });
    }
    let tmp = tempfile::tempdir().map_err(|source| ObserveError::Io {
        node: edge.to_string(),
        op: "create a temporary directory",
        path: std::env::temp_dir(),
        source,
    })?;
    let copy = tmp.path().join(RAW_DIR);
    copy_dir(edge, &dir, &copy)?;
    let rz = |source| ObserveError::RawZone {
        node: edge.to_string(),
        source,
    };
    let (zone, _recovery) =
        edge_node::raw_zone::RawZone::open(&copy, edge_node::raw_zone::RawZoneOptions::default())
            .map_err(rz)?;
    let mut out = Vec::new();
    let mut failed = None;
    for item in zone.read_from(0) {
        match item {
            Ok((seq, s)) => out.push(SampleObs {
                edge: edge.to_string(),
                site: site.clone(),
                device: s.device,
                metric: s.metric,
                seq,
                ts: s.ts,
                value: s.value,
            }),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    zone.close();
    match failed {
        Some(e) => Err(rz(e)),
        None => Ok(out),
    }
}

/// Every command execution (ledger "started" line) of a stopped edge, at
/// ms since the run started.
pub fn read_commands(
    edge: &str,
    data_dir: &Path,
    run: RunStart,
) -> Result<Vec<CommandExecution>, ObserveError> {
    let path = data_dir.join(LEDGER_FILE);
    let started =
        edge_node::commands::read_started(&path).map_err(|source| ObserveError::Ledger {
            node: edge.to_string(),
            source,
        })?;
    Ok(started
        .into_iter()
        .map(|s| CommandExecution {
            edge: edge.to_string(),
            command_id: s.id,
            at_ms: s.at.as_millis() - run.wall_ms,
        })
        .collect())
}

/// Loops with their ticks, and loops whose journal dropped ticks (name,
/// number dropped).
pub type TicksAndDrops = (Vec<LoopTicks>, Vec<(String, u64)>);

/// A stopped edge's loop ticks at ms since the run started, one entry per
/// configured loop (`periods`: name -> period ms). A loop the journal
/// dropped ticks of comes back in the second list, with the number
/// dropped, instead of with ticks that have holes.
pub fn read_loop_ticks(
    edge: &str,
    data_dir: &Path,
    periods: &BTreeMap<String, i64>,
    run: RunStart,
) -> Result<TicksAndDrops, ObserveError> {
    let path = data_dir.join(edge_node::control::TICK_JOURNAL_FILE);
    if !path.is_file() {
        return Err(ObserveError::Missing {
            node: edge.to_string(),
            what: "tick journal ([control] tick_journal = true)",
            path,
        });
    }
    let j = edge_node::control::read_journal(&path).map_err(|source| ObserveError::Journal {
        node: edge.to_string(),
        source,
    })?;
    let mut ticks = Vec::new();
    let mut dropped = Vec::new();
    for (name, period_ms) in periods {
        let l = j.loops.get(name).cloned().unwrap_or_default();
        if l.dropped > 0 {
            dropped.push((name.clone(), l.dropped));
            continue;
        }
        let mut ticks_ms: Vec<i64> = l
            .ticks
            .iter()
            .filter_map(|&(inc, mono, _wall)| {
                let start = j.starts.get(inc)?;
                let anchor = match (start.boot_ms, run.boot_ms) {
                    (Some(b), Some(r)) => i64::try_from(b).ok()? - r,
                    _ => start.wall_ms - run.wall_ms,
                };
                Some(anchor + i64::try_from(mono).ok()?)
            })
            .collect();
        ticks_ms.sort_unstable();
        ticks.push(LoopTicks {
            node: edge.to_string(),
            loop_name: name.clone(),
            period_ms: *period_ms,
            ticks_ms,
        });
    }
    Ok((ticks, dropped))
}

/// The loops of an edge config: name -> period, and its rollup window.
pub fn read_edge_config(n: &NodeFiles) -> Result<(BTreeMap<String, i64>, i64), ObserveError> {
    let cfg = EdgeConfig::load(&n.config_path).map_err(|e| ObserveError::Config {
        node: n.name.clone(),
        detail: e.to_string(),
    })?;
    let periods = cfg
        .loops
        .iter()
        .map(|l| {
            let p = match l {
                schemas::config::LoopConfig::Thermostat { period_ms, .. }
                | schemas::config::LoopConfig::Interlock { period_ms, .. } => *period_ms,
            };
            (l.name().to_string(), i64::try_from(p).unwrap_or(i64::MAX))
        })
        .collect();
    let window = i64::try_from(cfg.summariser.window_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    Ok((periods, window))
}

/// Observe every node of a stopped fleet. Never fails as a whole: what
/// cannot be read is listed in [`Observed::unobserved`].
pub fn observe_fleet(nodes: &[NodeFiles], tenants: &[TenantSpec], run: RunStart) -> Observed {
    let mut o = Observed::default();
    let mut windows = BTreeSet::new();
    // Edges whose samples could not be read: (site, devices) whose hub
    // rollups would otherwise look like extra samples.
    let mut blind: BTreeSet<(SiteId, String)> = BTreeSet::new();
    for n in nodes {
        // Holdings: the store, and an edge's raw zone.
        let mut docs = Vec::new();
        match open_store(n) {
            Ok(store) => {
                docs = read_holdings(&store, tenants);
                if matches!(n.role, NodeRole::Hub { .. }) {
                    match read_rollups(&n.name, &store) {
                        Ok(r) => o.hub_rollups.extend(r),
                        Err(e) => o.unobserved.push(unobserved("telemetry", &n.name, &e)),
                    }
                }
            }
            Err(e) => {
                o.unobserved.push(unobserved("compliance", &n.name, &e));
                if matches!(n.role, NodeRole::Hub { .. }) {
                    o.unobserved.push(unobserved("telemetry", &n.name, &e));
                }
            }
        }
        let NodeRole::Edge { tenant, site } = &n.role else {
            o.holdings.push(Holding {
                node: n.name.clone(),
                docs,
            });
            continue;
        };
        if n.data_dir.join(RAW_DIR).is_dir() {
            docs.push(HeldDoc {
                doc: RAW_ZONE_DOC.to_string(),
                class: DataClass::Raw,
                tenant: Some(tenant.clone()),
                site: Some(site.clone()),
                region: region_of(Some(tenant), tenants),
            });
        }
        o.holdings.push(Holding {
            node: n.name.clone(),
            docs,
        });
        let cfg = read_edge_config(n);
        let devices: Vec<String> = match EdgeConfig::load(&n.config_path) {
            Ok(c) => c.devices.iter().map(|d| d.id.to_string()).collect(),
            Err(_) => Vec::new(),
        };
        match read_raw_zone(&n.name, site, &n.data_dir) {
            Ok(s) => o.acked_samples.extend(s),
            Err(e) => {
                o.unobserved.push(unobserved("telemetry", &n.name, &e));
                for d in &devices {
                    blind.insert((site.clone(), d.clone()));
                }
            }
        }
        match read_commands(&n.name, &n.data_dir, run) {
            Ok(c) => o.command_executions.extend(c),
            Err(e) => o.unobserved.push(unobserved("commands", &n.name, &e)),
        }
        match cfg {
            Ok((periods, window)) => {
                windows.insert(window);
                match read_loop_ticks(&n.name, &n.data_dir, &periods, run) {
                    Ok((ticks, dropped)) => {
                        o.loop_ticks.extend(ticks);
                        for (name, count) in dropped {
                            o.unobserved.push(Unobserved {
                                checker: "liveness".into(),
                                node: n.name.clone(),
                                detail: format!(
                                    "loop {name}: the tick journal dropped {count} ticks (its queue was full), so its gaps cannot be judged"
                                ),
                            });
                        }
                    }
                    Err(e) => o.unobserved.push(unobserved("liveness", &n.name, &e)),
                }
            }
            Err(e) => o.unobserved.push(unobserved("liveness", &n.name, &e)),
        }
    }
    o.hub_rollups
        .retain(|r| !blind.contains(&(r.site.clone(), r.rollup.device.to_string())));
    match windows.len() {
        1 => o.rollup_window_ms = windows.into_iter().next(),
        0 => {}
        _ => o.unobserved.push(Unobserved {
            checker: "telemetry".into(),
            node: "*".into(),
            detail: format!("the edges use different rollup windows: {windows:?} ms"),
        }),
    }
    o
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::check::{Evidence, History, NodeInfo, Observations, Status};
    use edge_node::clock::{Clock as _, ManualClock};
    use schemas::ids::DeviceId;
    use schemas::metrics::Sample;
    use schemas::policy::{HubTier, Region};
    use schemas::time::Timestamp;
    use std::time::Duration;

    const T0: i64 = 1_764_000_000_000;
    const WINDOW_MS: i64 = 10_000;

    fn tenant() -> TenantId {
        TenantId::new("acme").unwrap()
    }
    fn site() -> SiteId {
        SiteId::new("s1").unwrap()
    }
    fn device() -> DeviceId {
        DeviceId::new("edge-1-dev-1").unwrap()
    }

    fn node(root: &Path, name: &str, role: NodeRole) -> NodeFiles {
        let dir = root.join(super::super::plan::slug(name));
        let hub = matches!(role, NodeRole::Hub { .. });
        NodeFiles {
            name: name.into(),
            role,
            data_dir: dir.join("data"),
            key_path: dir
                .join("data")
                .join(if hub { "hub.key" } else { "node.key" }),
            config_path: dir.join(if hub { "hub.toml" } else { "edge.toml" }),
        }
    }

    fn samples() -> Vec<Sample> {
        (0..6)
            .map(|i| Sample {
                schema_version: Default::default(),
                device: device(),
                metric: "temperature".into(),
                ts: Timestamp(T0 + i * 2000),
                value: 3.0 + i as f64 * 0.25,
                unit: Default::default(),
            })
            .collect()
    }

    fn rollup_of(s: &[Sample]) -> Rollup {
        let mut r = Rollup::of_sample(&s[0], WINDOW_MS);
        for x in &s[1..] {
            r.merge(&Rollup::of_sample(x, WINDOW_MS));
        }
        r
    }

    /// A hub and an edge of one site, written through the nodes' own
    /// APIs: the edge's raw zone (6 samples in two windows), ledger (one
    /// command), tick journal (10 s of a 1 s loop) and config; the hub's
    /// store with the first window's rollup and the second window's sample
    /// as a late part. `lose` drops that many samples from the hub's main
    /// rollup.
    fn fleet(root: &Path, lose: usize) -> (Vec<NodeFiles>, Vec<TenantSpec>) {
        let eu = Region::new("eu").unwrap();
        let hub = node(
            root,
            "hub-eu",
            NodeRole::Hub {
                tier: HubTier::Regional,
                regions: vec![eu.clone()],
            },
        );
        let edge = node(
            root,
            "s1/edge-1",
            NodeRole::Edge {
                tenant: tenant(),
                site: site(),
            },
        );
        let tenants = vec![TenantSpec {
            id: tenant(),
            region: eu,
        }];
        let s = samples();

        // Edge: config.
        std::fs::create_dir_all(&edge.data_dir).unwrap();
        let mut cfg = EdgeConfig::default();
        cfg.node.tenant = tenant();
        cfg.node.site = site();
        cfg.node.data_dir = edge.data_dir.clone();
        let kind = testbed::physics::DeviceKind::ColdRoom;
        cfg.devices.push(testbed::maps::device_config(
            kind,
            device(),
            "127.0.0.1:5020".parse().unwrap(),
        ));
        cfg.loops = testbed::maps::suggested_loops(kind, &device());
        cfg.summariser.window_s = (WINDOW_MS / 1000) as u64;
        cfg.control.tick_journal = true;
        cfg.validate().unwrap();
        std::fs::write(&edge.config_path, toml::to_string(&cfg).unwrap()).unwrap();
        // Raw zone.
        let (zone, _) = edge_node::raw_zone::RawZone::open(
            edge.data_dir.join(RAW_DIR),
            edge_node::raw_zone::RawZoneOptions::default(),
        )
        .unwrap();
        for x in &s {
            zone.try_append(x.clone()).unwrap().blocking_wait().unwrap();
        }
        zone.close();
        // Ledger: one command, started 3 s into the run.
        let (mut ledger, _) = edge_node::commands::CommandLedger::open(
            edge.data_dir.join(LEDGER_FILE),
            Timestamp(T0),
            "e",
        )
        .unwrap();
        ledger
            .record_started("c-1", Timestamp(T0 + 60_000), Timestamp(T0 + 3_000))
            .unwrap();
        drop(ledger);
        // Tick journal: the loop ticks every period for 10 s.
        let clock = Arc::new(ManualClock::new(Timestamp(T0)));
        let j = edge_node::control::TickJournal::open(
            &edge.data_dir.join(edge_node::control::TICK_JOURNAL_FILE),
            64,
            clock.clone(),
        )
        .unwrap();
        let sender = j.handle().sender(cfg.loops[0].name());
        for _ in 0..10 {
            clock.advance(Duration::from_millis(1000));
            sender.record(clock.monotonic(), clock.now().as_millis());
        }
        drop(sender);
        j.close();
        // Edge store (empty: it holds nothing but exists).
        drop(open_store_for_write(&edge));

        // Hub: rollups.
        std::fs::create_dir_all(&hub.data_dir).unwrap();
        let store = open_store_for_write(&hub);
        let id = DocId::telemetry(&tenant(), &site(), &device(), Timestamp(T0).day());
        let main = rollup_of(&s[lose..5]);
        let late = rollup_of(&s[5..]);
        store
            .change(&id, Timestamp(T0), |doc| {
                sync_core::docs::telemetry::put_rollup(doc, &main)?;
                sync_core::docs::put_root_json(
                    doc,
                    &format!("late:temperature@{}#5", late.window_start.as_millis()),
                    &late,
                )
            })
            .unwrap();
        store.flush().unwrap();
        (vec![hub, edge], tenants)
    }

    fn open_store_for_write(n: &NodeFiles) -> sync_core::store::DocStore {
        std::fs::create_dir_all(n.data_dir.join(DOCS_DIR)).unwrap();
        open_store(n).unwrap()
    }

    /// The run started when the edge's journal opened: wall `T0` on the
    /// manual clock, and the host's uptime its start line recorded.
    fn run_start(nodes: &[NodeFiles]) -> RunStart {
        let j = edge_node::control::read_journal(
            &nodes[1]
                .data_dir
                .join(edge_node::control::TICK_JOURNAL_FILE),
        )
        .unwrap();
        RunStart {
            wall_ms: T0,
            boot_ms: Some(j.starts[0].boot_ms.unwrap() as i64),
        }
    }

    fn observations(nodes: &[NodeFiles], tenants: &[TenantSpec]) -> Observations {
        let seen = observe_fleet(nodes, tenants, run_start(nodes));
        Observations {
            nodes: nodes
                .iter()
                .map(|n| NodeInfo {
                    name: n.name.clone(),
                    role: n.role.clone(),
                })
                .collect(),
            tenants: tenants.to_vec(),
            rollup_window_ms: seen.rollup_window_ms.unwrap_or(0),
            hub_rollups: seen.hub_rollups,
            acked_samples: seen.acked_samples,
            indeterminate_samples: seen.indeterminate_samples,
            command_executions: seen.command_executions,
            loop_ticks: seen.loop_ticks,
            holdings: seen.holdings,
            unobserved: seen.unobserved,
            end_ms: 10_000,
            ..Observations::default()
        }
    }

    fn record(o: Observations) -> crate::check::RunRecord {
        crate::check::RunRecord {
            observations: o,
            loop_period_tolerance: Some(3.0),
            ..Default::default()
        }
    }

    fn status(v: &[crate::check::Verdict], checker: &str) -> Status {
        v.iter().find(|v| v.checker == checker).unwrap().status
    }

    #[test]
    fn real_node_files_read_back_and_pass_every_checker() {
        let dir = tempfile::tempdir().unwrap();
        let (nodes, tenants) = fleet(dir.path(), 0);
        let o = observations(&nodes, &tenants);
        assert!(o.unobserved.is_empty(), "{:?}", o.unobserved);
        assert_eq!(o.rollup_window_ms, WINDOW_MS);
        assert_eq!(o.acked_samples.len(), 6);
        assert_eq!(
            o.acked_samples.iter().map(|s| s.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5]
        );
        // The main rollup and the late part.
        assert_eq!(o.hub_rollups.len(), 2);
        assert!(o.hub_rollups.iter().all(|r| r.hub == "hub-eu"));
        assert_eq!(
            o.command_executions,
            vec![CommandExecution {
                edge: "s1/edge-1".into(),
                command_id: "c-1".into(),
                at_ms: 3_000,
            }]
        );
        let ticks = &o.loop_ticks[0];
        assert_eq!(ticks.period_ms, 1000);
        assert_eq!(
            ticks.ticks_ms,
            (1..=10).map(|i| i * 1000).collect::<Vec<_>>()
        );
        let edge = o.holdings.iter().find(|h| h.node == "s1/edge-1").unwrap();
        assert!(edge.docs.iter().any(|d| d.class == DataClass::Raw));
        let hub = o.holdings.iter().find(|h| h.node == "hub-eu").unwrap();
        assert_eq!(hub.docs.len(), 1);
        assert_eq!(hub.docs[0].region, Some(Region::new("eu").unwrap()));

        let v = crate::check::run_checks(&record(o));
        for c in ["telemetry", "commands", "liveness", "compliance"] {
            assert_eq!(status(&v, c), Status::Pass, "{c}: {v:#?}");
        }
    }

    /// An incarnation booted with its clock in 1970 is placed on the run's
    /// timeline by the host's uptime, not by its wall clock.
    #[test]
    fn a_node_booted_in_1970_is_placed_by_uptime() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp(0)));
        let path = dir.path().join(edge_node::control::TICK_JOURNAL_FILE);
        let j = edge_node::control::TickJournal::open(&path, 64, clock.clone()).unwrap();
        let s = j.handle().sender("room");
        for _ in 0..3 {
            clock.advance(Duration::from_millis(1000));
            s.record(clock.monotonic(), clock.now().as_millis());
        }
        drop(s);
        j.close();
        let boot = edge_node::control::read_journal(&path).unwrap().starts[0]
            .boot_ms
            .unwrap() as i64;
        // The run started 5 s before this incarnation, at a real wall time.
        let run = RunStart {
            wall_ms: T0,
            boot_ms: Some(boot - 5_000),
        };
        let periods = BTreeMap::from([("room".to_string(), 1000)]);
        let (ticks, dropped) = read_loop_ticks("e", dir.path(), &periods, run).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(ticks[0].ticks_ms, vec![6_000, 7_000, 8_000]);
        // Without uptime the wall clock would have put it 55 years back.
        let run = RunStart {
            wall_ms: T0,
            boot_ms: None,
        };
        let (ticks, _) = read_loop_ticks("e", dir.path(), &periods, run).unwrap();
        assert_eq!(ticks[0].ticks_ms[0], 1_000 - T0);
    }

    #[test]
    fn a_sample_missing_from_the_hub_is_reported_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (nodes, tenants) = fleet(dir.path(), 1);
        let o = observations(&nodes, &tenants);
        let v = crate::check::telemetry::check(&o);
        assert_eq!(v.status, Status::Fail, "{v:#?}");
        match &v.evidence[..] {
            [Evidence::Telemetry(m)] => {
                assert_eq!(m.lost_at_least, 1);
                assert_eq!(m.identified_lost.len(), 1);
                assert_eq!(m.identified_lost[0].seq, 0);
            }
            e => panic!("{e:?}"),
        }
        // The commands checker still passes on the same files.
        assert_eq!(
            crate::check::commands::check(&History::default(), &o).status,
            Status::Pass
        );
    }

    #[test]
    fn unreadable_or_dropped_data_makes_the_verdict_unknown_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (nodes, tenants) = fleet(dir.path(), 0);
        // The edge's raw zone is gone; its journal reports dropped ticks.
        let edge = &nodes[1];
        std::fs::remove_dir_all(edge.data_dir.join(RAW_DIR)).unwrap();
        let journal = edge.data_dir.join(edge_node::control::TICK_JOURNAL_FILE);
        let mut text = std::fs::read_to_string(&journal).unwrap();
        text.push_str(
            "{\"kind\":\"dropped\",\"loop\":\"edge-1-dev-1-thermostat\",\"total\":3,\"mono_ms\":10000}\n",
        );
        std::fs::write(&journal, text).unwrap();
        let o = observations(&nodes, &tenants);
        // The hub's rollups of that edge's devices are set aside with it,
        // not judged as extra samples.
        assert!(o.hub_rollups.is_empty());
        assert!(o.loop_ticks.is_empty());
        let v = crate::check::run_checks(&record(o));
        for c in ["telemetry", "liveness"] {
            let x = v.iter().find(|x| x.checker == c).unwrap();
            assert_eq!(x.status, Status::Unknown, "{c}: {x:#?}");
            assert!(
                x.evidence
                    .iter()
                    .any(|e| e.describe().contains("s1/edge-1")),
                "{x:#?}"
            );
        }
        assert_eq!(status(&v, "commands"), Status::Pass);
    }
}
