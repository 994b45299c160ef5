//! Scenario files: a fleet shape, a timeline of faults and operations at
//! offsets, and checker settings, parsed from TOML and validated.
//!
//! ```toml
//! name = "asymmetric-partition"
//! duration = "60s"
//! seed = 7
//!
//! [[fleet.hubs]]
//! name = "hub-eu"
//! regions = ["eu"]            # tier = "regional" is the default
//!
//! [[fleet.tenants]]
//! id = "acme"
//! region = "eu"
//!
//! [[fleet.sites]]
//! tenant = "acme"
//! id = "coldstore-1"
//! edges = 2
//! devices_per_edge = 2
//!
//! [checks]
//! quiescence_timeout = "30s"
//! loop_period_tolerance = 3.0
//!
//! [[timeline]]
//! at = "5s"
//! action = "partition"
//! a = "coldstore-1/edge-1"
//! b = "hub-eu"
//! direction = "a-to-b"        # or "b-to-a"; default "both"
//! ```
//!
//! Node names: a hub is named by its `name`; the edges of site `s` are
//! `s/edge-1` .. `s/edge-N`; device `k` of an edge is `s/edge-n/dev-k`. Site
//! ids are unique across the fleet so these names are too.
//!
//! Links (the node pairs that talk, each to get its own relay): the edges of
//! one site pairwise, every edge with every regional hub serving its
//! tenant's region, and every regional hub with every global hub. A fault
//! action must name a link ([`Fleet::links`]).
//!
//! Every error names the file, the place (`timeline[3].probability`) and the
//! reason. Validation is semantic as well as syntactic: unknown nodes,
//! killing a node that is down, restarting one that runs, probabilities out
//! of `[0, 1]`, a timeline out of order, an action after the end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemas::TenantId;
use schemas::device::FieldValue;
use schemas::ids::SiteId;
use schemas::policy::{HubTier, Region};
use schemas::time::Timestamp;
use serde::{Deserialize, Serialize};

/// A scenario file that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{file}: not valid TOML: {reason}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A value is missing, of the wrong type, or inconsistent.
    #[error("{file}: {location}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Where: `timeline[3].probability`, `fleet.sites[0].tenant`.
        location: String,
        /// What is wrong and what was expected.
        reason: String,
    },
}

impl ScenarioError {
    /// The location (`timeline[3].probability`) of an invalid value.
    pub fn location(&self) -> Option<&str> {
        match self {
            ScenarioError::Invalid { location, .. } => Some(location),
            _ => None,
        }
    }
}

/// A hub of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubSpec {
    /// Node name.
    pub name: String,
    /// Regional or global.
    pub tier: HubTier,
    /// Regions a regional hub serves (empty for a global hub).
    pub regions: Vec<Region>,
}

/// A tenant and its compliance region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSpec {
    /// Tenant id.
    pub id: TenantId,
    /// Region its data stays in.
    pub region: Region,
}

/// A site: its edges and devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteSpec {
    /// Owning tenant.
    pub tenant: TenantId,
    /// Site id, unique across the fleet.
    pub id: SiteId,
    /// Number of edge nodes (`>= 1`).
    pub edges: u32,
    /// Devices polled by each edge.
    pub devices_per_edge: u32,
}

/// The fleet a scenario runs against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fleet {
    /// Hubs.
    pub hubs: Vec<HubSpec>,
    /// Tenants.
    pub tenants: Vec<TenantSpec>,
    /// Sites.
    pub sites: Vec<SiteSpec>,
}

/// What kind of node a name refers to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeRole {
    /// A hub.
    Hub {
        /// Its tier.
        tier: HubTier,
        /// Regions it serves.
        regions: Vec<Region>,
    },
    /// An edge of a site.
    Edge {
        /// Tenant of the site.
        tenant: TenantId,
        /// The site.
        site: SiteId,
    },
}

/// A node pair that talks, in canonical orientation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Link {
    /// First node.
    pub a: String,
    /// Second node.
    pub b: String,
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} <-> {}", self.a, self.b)
    }
}

impl Fleet {
    /// Every node name with its role, hubs first.
    pub fn nodes(&self) -> Vec<(String, NodeRole)> {
        let mut out: Vec<(String, NodeRole)> = self
            .hubs
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    NodeRole::Hub {
                        tier: h.tier,
                        regions: h.regions.clone(),
                    },
                )
            })
            .collect();
        for s in &self.sites {
            for n in 1..=s.edges {
                out.push((
                    format!("{}/edge-{n}", s.id),
                    NodeRole::Edge {
                        tenant: s.tenant.clone(),
                        site: s.id.clone(),
                    },
                ));
            }
        }
        out
    }

    /// The role of a node name.
    pub fn role(&self, node: &str) -> Option<NodeRole> {
        self.nodes()
            .into_iter()
            .find(|(n, _)| n == node)
            .map(|(_, r)| r)
    }

    /// Every device path (`site/edge-n/dev-k`).
    pub fn devices(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.sites {
            for n in 1..=s.edges {
                for k in 1..=s.devices_per_edge {
                    out.push(format!("{}/edge-{n}/dev-{k}", s.id));
                }
            }
        }
        out
    }

    fn region_of(&self, tenant: &TenantId) -> Option<&Region> {
        self.tenants
            .iter()
            .find(|t| &t.id == tenant)
            .map(|t| &t.region)
    }

    /// The node pairs that talk (see the module docs).
    pub fn links(&self) -> Vec<Link> {
        let mut out = Vec::new();
        let regional: Vec<&HubSpec> = self
            .hubs
            .iter()
            .filter(|h| h.tier == HubTier::Regional)
            .collect();
        for s in &self.sites {
            let edges: Vec<String> = (1..=s.edges)
                .map(|n| format!("{}/edge-{n}", s.id))
                .collect();
            for (i, a) in edges.iter().enumerate() {
                for b in &edges[i + 1..] {
                    out.push(Link {
                        a: a.clone(),
                        b: b.clone(),
                    });
                }
            }
            let region = self.region_of(&s.tenant);
            for h in &regional {
                if region.is_some_and(|r| h.regions.contains(r)) {
                    for e in &edges {
                        out.push(Link {
                            a: e.clone(),
                            b: h.name.clone(),
                        });
                    }
                }
            }
        }
        for r in &regional {
            for g in self.hubs.iter().filter(|h| h.tier == HubTier::Global) {
                out.push(Link {
                    a: r.name.clone(),
                    b: g.name.clone(),
                });
            }
        }
        out
    }

    /// The link between two nodes and whether `a`/`b` are in its canonical
    /// order (`true`) or swapped.
    pub fn link_between(&self, a: &str, b: &str) -> Option<(Link, bool)> {
        self.links().into_iter().find_map(|l| {
            if l.a == a && l.b == b {
                Some((l, true))
            } else if l.a == b && l.b == a {
                Some((l, false))
            } else {
                None
            }
        })
    }
}

/// Which way a link fault applies, relative to the action's `a` and `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirSpec {
    /// Both directions.
    Both,
    /// Only datagrams from `a` to `b`.
    AToB,
    /// Only datagrams from `b` to `a`.
    BToA,
}

/// A link named by an action: the two nodes in the action's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRef {
    /// First node as written.
    pub a: String,
    /// Second node as written.
    pub b: String,
    /// Direction the fault applies to.
    pub direction: DirSpec,
}

/// How a node's clock is disturbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockChange {
    /// Shift by a signed number of milliseconds.
    OffsetMs(i64),
    /// Set to an absolute time (0: a box that booted in 1970).
    SetTo(Timestamp),
}

/// Kinds of request flood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FloodKind {
    /// HTTP API requests.
    Http,
    /// Sync connections opened and dropped (a reconnect storm).
    Reconnect,
    /// Commands.
    Commands,
}

/// Device faults the simulated devices can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceFault {
    /// Requests time out.
    Timeout,
    /// Requests get a Modbus exception.
    Exception,
    /// The TCP connection is refused/dropped.
    Disconnect,
    /// The sensor value freezes.
    Stuck,
    /// The sensor reports values out of its physical range.
    OutOfRange,
    /// Remove any device fault.
    Clear,
}

/// One action of a timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Drop everything on a link (one direction or both).
    Partition {
        /// The link.
        link: LinkRef,
    },
    /// Lift partitions (of one link, or of all links when `None`).
    Heal {
        /// The link, or all.
        link: Option<(String, String)>,
    },
    /// Lose datagrams with a probability.
    Loss {
        /// The link.
        link: LinkRef,
        /// In `[0, 1]`; 0 removes the fault.
        probability: f64,
    },
    /// Delay datagrams.
    Delay {
        /// The link.
        link: LinkRef,
        /// Fixed delay.
        delay: Duration,
        /// Uniform jitter.
        jitter: Duration,
    },
    /// Duplicate datagrams with a probability.
    Duplicate {
        /// The link.
        link: LinkRef,
        /// In `[0, 1]`.
        probability: f64,
    },
    /// Hold datagrams back with a probability.
    Reorder {
        /// The link.
        link: LinkRef,
        /// In `[0, 1]`.
        probability: f64,
        /// How long a held datagram waits.
        gap: Duration,
    },
    /// Cap a link's bandwidth.
    Bandwidth {
        /// The link.
        link: LinkRef,
        /// Bytes per second (`>= 1`).
        bytes_per_sec: u64,
    },
    /// Remove every fault (of one link, or of all links).
    ClearFaults {
        /// The link, or all.
        link: Option<(String, String)>,
    },
    /// `kill -9` a node.
    Kill {
        /// The node.
        node: String,
    },
    /// Start a killed node again on its data directory.
    Restart {
        /// The node.
        node: String,
    },
    /// Disturb a node's clock.
    ClockSkew {
        /// The node.
        node: String,
        /// The change.
        change: ClockChange,
    },
    /// Edit a desired-config field of a device from a node (concurrent edits
    /// are two actions at the same `at`).
    EditConfig {
        /// The node the edit is made on (an edge of the site or its hub).
        node: String,
        /// The device path.
        device: String,
        /// A standard field (`schemas::device::field_spec`).
        field: String,
        /// The value.
        value: FieldValue,
    },
    /// Issue a command, delivered `deliveries` times with the same id.
    Command {
        /// The issuing node.
        from: String,
        /// The device path.
        device: String,
        /// The idempotency key.
        id: String,
        /// Register to write.
        register: String,
        /// Value to write.
        value: f64,
        /// How often the same command is delivered (`>= 1`).
        deliveries: u32,
    },
    /// Flood a node with requests.
    Flood {
        /// The target node.
        node: String,
        /// What kind of requests.
        kind: FloodKind,
        /// Requests per second.
        rate_per_sec: u32,
        /// How long.
        duration: Duration,
    },
    /// Make a simulated device misbehave.
    DeviceFault {
        /// The device path.
        device: String,
        /// The fault.
        fault: DeviceFault,
        /// How long (`None`: until a `clear`).
        duration: Option<Duration>,
    },
}

impl Action {
    /// The action's name as written in the file.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Partition { .. } => "partition",
            Action::Heal { .. } => "heal",
            Action::Loss { .. } => "loss",
            Action::Delay { .. } => "delay",
            Action::Duplicate { .. } => "duplicate",
            Action::Reorder { .. } => "reorder",
            Action::Bandwidth { .. } => "bandwidth",
            Action::ClearFaults { .. } => "clear-faults",
            Action::Kill { .. } => "kill",
            Action::Restart { .. } => "restart",
            Action::ClockSkew { .. } => "clock-skew",
            Action::EditConfig { .. } => "edit-config",
            Action::Command { .. } => "command",
            Action::Flood { .. } => "flood",
            Action::DeviceFault { .. } => "device-fault",
        }
    }
}

/// An action at an offset from the start of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedAction {
    /// Offset from the start.
    pub at: Duration,
    /// What happens.
    pub action: Action,
}

/// Names of the checkers a scenario can ask for.
pub const CHECKERS: [&str; 6] = [
    "convergence",
    "telemetry",
    "commands",
    "liveness",
    "compliance",
    "no-panic",
];

/// Checker settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckSettings {
    /// How long after the last heal the fleet has to converge.
    pub quiescence_timeout: Duration,
    /// A control-loop gap longer than `period * tolerance` is a stall.
    pub loop_period_tolerance: f64,
    /// Checkers to run (default: all of [`CHECKERS`]).
    pub checkers: Vec<String>,
}

/// A parsed, validated scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Name (defaults to the file stem).
    pub name: String,
    /// What it exercises.
    pub description: String,
    /// Seed of every random decision (relays, floods).
    pub seed: u64,
    /// How long the fault phase runs (then: heal all, quiesce, check).
    pub duration: Duration,
    /// The fleet.
    pub fleet: Fleet,
    /// Checker settings.
    pub checks: CheckSettings,
    /// Actions in time order.
    pub timeline: Vec<TimedAction>,
}

/// Parse a duration: a number and a unit `ms`, `s`, `m` or `h` (`250ms`,
/// `5s`, `1.5m`), optionally signed when `signed`.
pub fn parse_duration_ms(s: &str, signed: bool) -> Result<i64, String> {
    let t = s.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if (neg || t.starts_with('+')) && !signed {
        return Err(format!("{s:?}: a duration here cannot be signed"));
    }
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| {
            format!("{s:?} has no unit; write e.g. \"5s\", \"250ms\", \"2m\", \"1h\"")
        })?;
    let (num, unit) = body.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: {num:?} is not a number"))?;
    let factor = match unit {
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => {
            return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h"));
        }
    };
    let ms = n * factor;
    if !ms.is_finite() || ms > 1e15 {
        return Err(format!("{s:?} is too large"));
    }
    let ms = ms.round() as i64;
    Ok(if neg { -ms } else { ms })
}

/// Reads keys of one TOML table, remembering which were used so unknown
/// keys can be refused with their location.
struct Fields<'a> {
    file: &'a Path,
    ctx: String,
    t: &'a toml::Table,
    used: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(file: &'a Path, ctx: impl Into<String>, t: &'a toml::Table) -> Self {
        Fields {
            file,
            ctx: ctx.into(),
            t,
            used: BTreeSet::new(),
        }
    }

    fn loc(&self, key: &str) -> String {
        if self.ctx.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.ctx)
        }
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> ScenarioError {
        ScenarioError::Invalid {
            file: self.file.to_path_buf(),
            location: self.loc(key),
            reason: reason.into(),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a toml::Value> {
        self.used.insert(key);
        self.t.get(key)
    }

    fn type_err(&self, key: &str, want: &str, v: &toml::Value) -> ScenarioError {
        self.err(key, format!("expected {want}, found {} {v}", v.type_str()))
    }

    fn opt_str(&mut self, key: &'static str) -> Result<Option<&'a str>, ScenarioError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_err(key, "a string", v)),
        }
    }

    fn str(&mut self, key: &'static str) -> Result<&'a str, ScenarioError> {
        self.opt_str(key)?
            .ok_or_else(|| self.err(key, "is missing"))
    }

    fn opt_f64(&mut self, key: &'static str) -> Result<Option<f64>, ScenarioError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Float(f)) => Ok(Some(*f)),
            Some(toml::Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(v) => Err(self.type_err(key, "a number", v)),
        }
    }

    fn f64(&mut self, key: &'static str) -> Result<f64, ScenarioError> {
        self.opt_f64(key)?
            .ok_or_else(|| self.err(key, "is missing"))
    }

    fn probability(&mut self, key: &'static str) -> Result<f64, ScenarioError> {
        let p = self.f64(key)?;
        if !(0.0..=1.0).contains(&p) {
            return Err(self.err(key, format!("{p} is not a probability in [0, 1]")));
        }
        Ok(p)
    }

    fn opt_u64(&mut self, key: &'static str) -> Result<Option<u64>, ScenarioError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(v) => Err(self.type_err(key, "a non-negative integer", v)),
        }
    }

    fn opt_u32_min(&mut self, key: &'static str, min: u32) -> Result<Option<u32>, ScenarioError> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(n) => {
                let n = u32::try_from(n).map_err(|_| self.err(key, format!("{n} is too large")))?;
                if n < min {
                    return Err(self.err(key, format!("{n} is below the minimum {min}")));
                }
                Ok(Some(n))
            }
        }
    }

    fn opt_duration(&mut self, key: &'static str) -> Result<Option<Duration>, ScenarioError> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) => {
                let ms = parse_duration_ms(s, false).map_err(|r| self.err(key, r))?;
                Ok(Some(Duration::from_millis(ms as u64)))
            }
        }
    }

    fn duration(&mut self, key: &'static str) -> Result<Duration, ScenarioError> {
        self.opt_duration(key)?
            .ok_or_else(|| self.err(key, "is missing (e.g. \"5s\")"))
    }

    fn opt_array(
        &mut self,
        key: &'static str,
    ) -> Result<Option<&'a Vec<toml::Value>>, ScenarioError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.type_err(key, "an array", v)),
        }
    }

    fn tables(
        &mut self,
        key: &'static str,
    ) -> Result<Vec<(String, &'a toml::Table)>, ScenarioError> {
        let Some(arr) = self.opt_array(key)? else {
            return Ok(Vec::new());
        };
        let base = self.loc(key);
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                toml::Value::Table(t) => Ok((format!("{base}[{i}]"), t)),
                v => Err(ScenarioError::Invalid {
                    file: self.file.to_path_buf(),
                    location: format!("{base}[{i}]"),
                    reason: format!("expected a table, found {} {v}", v.type_str()),
                }),
            })
            .collect()
    }

    fn opt_table(&mut self, key: &'static str) -> Result<Option<&'a toml::Table>, ScenarioError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t)),
            Some(v) => Err(self.type_err(key, "a table", v)),
        }
    }

    fn parse<T: std::str::FromStr>(&mut self, key: &'static str) -> Result<T, ScenarioError>
    where
        T::Err: fmt::Display,
    {
        let s = self.str(key)?;
        s.parse().map_err(|e: T::Err| self.err(key, e.to_string()))
    }

    /// Refuse keys that were never asked for.
    fn finish(self) -> Result<(), ScenarioError> {
        match self.t.keys().find(|k| !self.used.contains(k.as_str())) {
            None => Ok(()),
            Some(k) => {
                let known: Vec<&str> = self.used.iter().copied().collect();
                Err(self.err(
                    k,
                    format!("unknown key; expected one of: {}", known.join(", ")),
                ))
            }
        }
    }
}

fn invalid(file: &Path, location: impl Into<String>, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        file: file.to_path_buf(),
        location: location.into(),
        reason: reason.into(),
    }
}

impl Scenario {
    /// Read, parse and validate a scenario file.
    pub fn load(file: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(file).map_err(|source| ScenarioError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Scenario::parse(file, &text)
    }

    /// Parse and validate scenario text; `file` names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        let root: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ScenarioError::Syntax {
                    file: file.to_path_buf(),
                    reason: e.to_string().trim().replace('\n', " "),
                })?;
        let mut f = Fields::new(file, "", &root);
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".into());
        let name = f.opt_str("name")?.map_or(stem, str::to_string);
        let description = f.opt_str("description")?.unwrap_or("").to_string();
        let seed = f.opt_u64("seed")?.unwrap_or(0);
        let duration = f.duration("duration")?;
        if duration.is_zero() {
            return Err(f.err("duration", "must be longer than 0"));
        }
        let fleet_t = f.opt_table("fleet")?.ok_or_else(|| {
            invalid(
                file,
                "fleet",
                "is missing: describe hubs, tenants and sites",
            )
        })?;
        let fleet = parse_fleet(file, fleet_t)?;
        let checks = match f.opt_table("checks")? {
            Some(t) => parse_checks(file, t)?,
            None => CheckSettings {
                quiescence_timeout: Duration::from_secs(30),
                loop_period_tolerance: 3.0,
                checkers: CHECKERS.iter().map(|s| s.to_string()).collect(),
            },
        };
        let entries = f.tables("timeline")?;
        f.finish()?;
        let mut timeline = Vec::with_capacity(entries.len());
        let mut state = TimelineState::new(&fleet);
        for (ctx, t) in entries {
            let mut af = Fields::new(file, ctx.clone(), t);
            let at = af.duration("at")?;
            if at > duration {
                return Err(af.err(
                    "at",
                    format!(
                        "{}ms is after the end of the scenario ({}ms)",
                        at.as_millis(),
                        duration.as_millis()
                    ),
                ));
            }
            if let Some(prev) = timeline.last().map(|p: &TimedAction| p.at)
                && at < prev
            {
                return Err(af.err("at", format!(
                    "{}ms is before the previous action's {}ms; keep the timeline in time order",
                    at.as_millis(),
                    prev.as_millis()
                )));
            }
            let action = parse_action(&mut af, &fleet, &mut state)?;
            af.finish()?;
            timeline.push(TimedAction { at, action });
        }
        Ok(Scenario {
            name,
            description,
            seed,
            duration,
            fleet,
            checks,
            timeline,
        })
    }

    /// The spans during which each link fault was in force, for reports.
    /// A fault still in force at the end lasts until [`Scenario::duration`].
    pub fn fault_spans(&self) -> Vec<FaultSpan> {
        let end = self.duration.as_millis() as i64;
        let mut open: BTreeMap<SpanKey, (i64, String)> = BTreeMap::new();
        let mut out = Vec::new();
        for ta in &self.timeline {
            let at = ta.at.as_millis() as i64;
            let pct = |p: f64| format!("{:.0}%", p * 100.0);
            let (link, kind, label) = match &ta.action {
                Action::Partition { link } => (link, "partition", Some("partition".to_string())),
                Action::Loss {
                    link,
                    probability: p,
                } => (
                    link,
                    "loss",
                    (*p > 0.0).then(|| format!("loss {}", pct(*p))),
                ),
                Action::Duplicate {
                    link,
                    probability: p,
                } => (
                    link,
                    "duplicate",
                    (*p > 0.0).then(|| format!("dup {}", pct(*p))),
                ),
                Action::Reorder {
                    link,
                    probability: p,
                    gap,
                } => (
                    link,
                    "reorder",
                    (*p > 0.0).then(|| format!("reorder {} +{}ms", pct(*p), gap.as_millis())),
                ),
                Action::Delay {
                    link,
                    delay,
                    jitter,
                } => (
                    link,
                    "delay",
                    (!(delay.is_zero() && jitter.is_zero()))
                        .then(|| format!("delay {}±{}ms", delay.as_millis(), jitter.as_millis())),
                ),
                Action::Bandwidth {
                    link,
                    bytes_per_sec,
                } => (link, "bandwidth", Some(format!("cap {bytes_per_sec} B/s"))),
                Action::Heal { link } | Action::ClearFaults { link } => {
                    let only_partition = matches!(ta.action, Action::Heal { .. });
                    let target = link
                        .as_ref()
                        .and_then(|(a, b)| self.fleet.link_between(a, b))
                        .map(|(l, _)| l);
                    let keys: Vec<SpanKey> = open
                        .keys()
                        .filter(|(l, _, k)| {
                            (!only_partition || *k == "partition")
                                && target.as_ref().is_none_or(|t| t == l)
                        })
                        .cloned()
                        .collect();
                    for k in keys {
                        close_span(&mut open, k, at, &mut out);
                    }
                    continue;
                }
                _ => continue,
            };
            for (l, dir) in self.directions(link) {
                let key = (l, dir, kind);
                close_span(&mut open, key.clone(), at, &mut out);
                if let Some(label) = &label {
                    open.insert(key, (at, label.clone()));
                }
            }
        }
        let keys: Vec<SpanKey> = open.keys().cloned().collect();
        for k in keys {
            close_span(&mut open, k, end, &mut out);
        }
        out.sort_by(|x, y| {
            (x.from_ms, &x.link, &x.direction).cmp(&(y.from_ms, &y.link, &y.direction))
        });
        out
    }

    /// The canonical link and directions (`a-to-b`, `b-to-a`) an action's
    /// link reference covers.
    pub fn directions(&self, link: &LinkRef) -> Vec<(Link, &'static str)> {
        let Some((l, ordered)) = self.fleet.link_between(&link.a, &link.b) else {
            return Vec::new();
        };
        let dirs: &[&'static str] = match (link.direction, ordered) {
            (DirSpec::Both, _) => &["a-to-b", "b-to-a"],
            (DirSpec::AToB, true) | (DirSpec::BToA, false) => &["a-to-b"],
            (DirSpec::BToA, true) | (DirSpec::AToB, false) => &["b-to-a"],
        };
        dirs.iter().map(|d| (l.clone(), *d)).collect()
    }

    /// What a runner must tell the relays, in order: after each link action,
    /// the complete faults of every direction it changed. Link `a` is the
    /// relay's A side, so `a-to-b` is [`crate::link::Direction::AToB`].
    /// `heal` lifts partitions and keeps other faults; `clear-faults` resets
    /// to a clean link; without `a`/`b` both apply to every link.
    pub fn link_changes(&self) -> Vec<LinkChange> {
        use crate::link::{Direction, LinkFaults};
        let mut state: BTreeMap<(Link, bool), LinkFaults> = BTreeMap::new();
        let mut out = Vec::new();
        let dir_of = |d: &str| {
            if d == "a-to-b" {
                Direction::AToB
            } else {
                Direction::BToA
            }
        };
        for ta in &self.timeline {
            let targets: Vec<(Link, &'static str)> = match &ta.action {
                Action::Partition { link }
                | Action::Loss { link, .. }
                | Action::Delay { link, .. }
                | Action::Duplicate { link, .. }
                | Action::Reorder { link, .. }
                | Action::Bandwidth { link, .. } => self.directions(link),
                Action::Heal { link } | Action::ClearFaults { link } => match link {
                    Some((a, b)) => self.directions(&LinkRef {
                        a: a.clone(),
                        b: b.clone(),
                        direction: DirSpec::Both,
                    }),
                    None => self
                        .fleet
                        .links()
                        .into_iter()
                        .flat_map(|l| [(l.clone(), "a-to-b"), (l, "b-to-a")])
                        .collect(),
                },
                _ => continue,
            };
            for (l, d) in targets {
                let key = (l.clone(), d == "a-to-b");
                let before = state.get(&key).cloned().unwrap_or_default();
                let mut f = before.clone();
                match &ta.action {
                    Action::Partition { .. } => f.partitioned = true,
                    Action::Loss { probability, .. } => f.loss = *probability,
                    Action::Delay { delay, jitter, .. } => {
                        f.delay = *delay;
                        f.jitter = *jitter;
                    }
                    Action::Duplicate { probability, .. } => f.duplicate = *probability,
                    Action::Reorder {
                        probability, gap, ..
                    } => {
                        f.reorder = *probability;
                        f.reorder_gap = *gap;
                    }
                    Action::Bandwidth { bytes_per_sec, .. } => f.bandwidth = Some(*bytes_per_sec),
                    Action::Heal { .. } => f.partitioned = false,
                    Action::ClearFaults { .. } => f = LinkFaults::clean(),
                    _ => {}
                }
                if f != before {
                    state.insert(key, f.clone());
                    out.push(LinkChange {
                        at: ta.at,
                        link: l,
                        direction: dir_of(d),
                        faults: f,
                    });
                }
            }
        }
        out
    }

    /// Spans during which nodes were down (killed, not yet restarted).
    pub fn downtime(&self) -> Vec<NodeSpan> {
        let end = self.duration.as_millis() as i64;
        let mut down: BTreeMap<&str, i64> = BTreeMap::new();
        let mut out = Vec::new();
        for ta in &self.timeline {
            let at = ta.at.as_millis() as i64;
            match &ta.action {
                Action::Kill { node } => {
                    down.insert(node, at);
                }
                Action::Restart { node } => {
                    if let Some(from) = down.remove(node.as_str()) {
                        out.push(NodeSpan {
                            node: node.clone(),
                            from_ms: from,
                            to_ms: at,
                        });
                    }
                }
                _ => {}
            }
        }
        for (node, from) in down {
            out.push(NodeSpan {
                node: node.to_string(),
                from_ms: from,
                to_ms: end,
            });
        }
        out
    }
}

type SpanKey = (Link, &'static str, &'static str);

fn close_span(
    open: &mut BTreeMap<SpanKey, (i64, String)>,
    key: SpanKey,
    at: i64,
    out: &mut Vec<FaultSpan>,
) {
    if let Some((from, label)) = open.remove(&key) {
        let (link, direction, kind) = key;
        out.push(FaultSpan {
            link,
            direction: direction.to_string(),
            kind: kind.to_string(),
            label,
            from_ms: from,
            to_ms: at,
        });
    }
}

/// The faults one direction of one relay must have from `at` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkChange {
    /// Offset from the start of the run.
    pub at: Duration,
    /// The link (its `a` is the relay's A side).
    pub link: Link,
    /// The direction.
    pub direction: crate::link::Direction,
    /// The complete faults of that direction.
    pub faults: crate::link::LinkFaults,
}

/// A link fault in force over a span of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSpan {
    /// The link (canonical orientation).
    pub link: Link,
    /// `a-to-b` or `b-to-a` relative to the link's orientation.
    pub direction: String,
    /// `partition`, `loss`, `delay`, `duplicate`, `reorder`, `bandwidth`.
    pub kind: String,
    /// Human label with the parameters (`loss 30%`).
    pub label: String,
    /// Start, ms from the run's start.
    pub from_ms: i64,
    /// End, ms from the run's start.
    pub to_ms: i64,
}

/// A node down over a span of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpan {
    /// The node.
    pub node: String,
    /// Start, ms from the run's start.
    pub from_ms: i64,
    /// End, ms from the run's start.
    pub to_ms: i64,
}

fn parse_fleet(file: &Path, t: &toml::Table) -> Result<Fleet, ScenarioError> {
    let mut f = Fields::new(file, "fleet", t);
    let hub_ts = f.tables("hubs")?;
    let tenant_ts = f.tables("tenants")?;
    let site_ts = f.tables("sites")?;
    f.finish()?;
    let mut hubs = Vec::new();
    for (ctx, t) in hub_ts {
        let mut h = Fields::new(file, ctx, t);
        let name = h.str("name")?.to_string();
        SiteId::new(name.clone()).map_err(|e| h.err("name", format!("{name:?}: {}", e.reason)))?;
        let tier = match h.opt_str("tier")?.unwrap_or("regional") {
            "regional" => HubTier::Regional,
            "global" => HubTier::Global,
            other => {
                return Err(h.err(
                    "tier",
                    format!("{other:?}: expected \"regional\" or \"global\""),
                ));
            }
        };
        let mut regions = Vec::new();
        if let Some(arr) = h.opt_array("regions")? {
            for (i, v) in arr.iter().enumerate() {
                let r = v
                    .as_str()
                    .ok_or_else(|| h.err(&format!("regions[{i}]"), "expected a string"))?;
                regions
                    .push(Region::new(r).map_err(|e| h.err(&format!("regions[{i}]"), e.reason))?);
            }
        }
        match (tier, regions.is_empty()) {
            (HubTier::Regional, true) => {
                return Err(h.err("regions", "a regional hub must serve at least one region"));
            }
            (HubTier::Global, false) => {
                return Err(h.err("regions", "a global hub serves no region; remove the list"));
            }
            _ => {}
        }
        if hubs.iter().any(|x: &HubSpec| x.name == name) {
            return Err(h.err("name", format!("hub {name:?} is defined twice")));
        }
        h.finish()?;
        hubs.push(HubSpec {
            name,
            tier,
            regions,
        });
    }
    if hubs.is_empty() {
        return Err(invalid(
            file,
            "fleet.hubs",
            "a fleet needs at least one hub",
        ));
    }
    let mut tenants = Vec::new();
    for (ctx, t) in tenant_ts {
        let mut tf = Fields::new(file, ctx, t);
        let id: TenantId = tf.parse("id")?;
        let region: Region = tf.parse("region")?;
        if !hubs.iter().any(|h| h.regions.contains(&region)) {
            return Err(tf.err("region", format!("no regional hub serves region {region}")));
        }
        if tenants.iter().any(|x: &TenantSpec| x.id == id) {
            return Err(tf.err("id", format!("tenant {id} is defined twice")));
        }
        tf.finish()?;
        tenants.push(TenantSpec { id, region });
    }
    let mut sites = Vec::new();
    for (ctx, t) in site_ts {
        let mut sf = Fields::new(file, ctx, t);
        let tenant: TenantId = sf.parse("tenant")?;
        if !tenants.iter().any(|x| x.id == tenant) {
            return Err(sf.err(
                "tenant",
                format!("unknown tenant {tenant}; define it under [[fleet.tenants]]"),
            ));
        }
        let id: SiteId = sf.parse("id")?;
        if sites.iter().any(|x: &SiteSpec| x.id == id) || hubs.iter().any(|h| h.name == id.as_str())
        {
            return Err(sf.err(
                "id",
                format!("{id} is already used; site ids and hub names are unique across the fleet"),
            ));
        }
        let edges = sf.opt_u32_min("edges", 1)?.unwrap_or(1);
        let devices_per_edge = sf.opt_u32_min("devices_per_edge", 0)?.unwrap_or(1);
        if edges > 64 || devices_per_edge > 1000 {
            return Err(sf.err(
                "edges",
                "at most 64 edges per site and 1000 devices per edge on one machine",
            ));
        }
        sf.finish()?;
        sites.push(SiteSpec {
            tenant,
            id,
            edges,
            devices_per_edge,
        });
    }
    if sites.is_empty() {
        return Err(invalid(
            file,
            "fleet.sites",
            "a fleet needs at least one site",
        ));
    }
    Ok(Fleet {
        hubs,
        tenants,
        sites,
    })
}

fn parse_checks(file: &Path, t: &toml::Table) -> Result<CheckSettings, ScenarioError> {
    let mut f = Fields::new(file, "checks", t);
    let quiescence_timeout = f
        .opt_duration("quiescence_timeout")?
        .unwrap_or(Duration::from_secs(30));
    let loop_period_tolerance = f.opt_f64("loop_period_tolerance")?.unwrap_or(3.0);
    if !(loop_period_tolerance >= 1.0 && loop_period_tolerance.is_finite()) {
        return Err(f.err(
            "loop_period_tolerance",
            format!(
                "{loop_period_tolerance} must be a number >= 1 (a multiple of the loop period)"
            ),
        ));
    }
    let checkers = match f.opt_array("checkers")? {
        None => CHECKERS.iter().map(|s| s.to_string()).collect(),
        Some(arr) => {
            let mut out = Vec::new();
            for (i, v) in arr.iter().enumerate() {
                let s = v
                    .as_str()
                    .ok_or_else(|| f.err(&format!("checkers[{i}]"), "expected a string"))?;
                if !CHECKERS.contains(&s) {
                    return Err(f.err(
                        &format!("checkers[{i}]"),
                        format!(
                            "unknown checker {s:?}; expected one of {}",
                            CHECKERS.join(", ")
                        ),
                    ));
                }
                out.push(s.to_string());
            }
            out
        }
    };
    f.finish()?;
    Ok(CheckSettings {
        quiescence_timeout,
        loop_period_tolerance,
        checkers,
    })
}

/// Node liveness while walking the timeline.
struct TimelineState {
    down: BTreeSet<String>,
}

impl TimelineState {
    fn new(_fleet: &Fleet) -> Self {
        TimelineState {
            down: BTreeSet::new(),
        }
    }
}

fn node_ref(f: &mut Fields<'_>, key: &'static str, fleet: &Fleet) -> Result<String, ScenarioError> {
    let n = f.str(key)?;
    if fleet.role(n).is_none() {
        let names: Vec<String> = fleet.nodes().into_iter().map(|(n, _)| n).collect();
        return Err(f.err(
            key,
            format!("unknown node {n:?}; nodes are: {}", names.join(", ")),
        ));
    }
    Ok(n.to_string())
}

fn device_ref(
    f: &mut Fields<'_>,
    key: &'static str,
    fleet: &Fleet,
) -> Result<String, ScenarioError> {
    let d = f.str(key)?;
    if !fleet.devices().iter().any(|x| x == d) {
        return Err(f.err(
            key,
            format!(
                "unknown device {d:?}; devices are named site/edge-N/dev-K, e.g. {:?}",
                fleet.devices().first().cloned().unwrap_or_default()
            ),
        ));
    }
    Ok(d.to_string())
}

fn link_ref(f: &mut Fields<'_>, fleet: &Fleet) -> Result<LinkRef, ScenarioError> {
    let a = node_ref(f, "a", fleet)?;
    let b = node_ref(f, "b", fleet)?;
    if fleet.link_between(&a, &b).is_none() {
        return Err(f.err("b", format!("{a} and {b} do not talk to each other, so there is no link to disturb; links are edges of one site, an edge and its regional hub, a regional and a global hub")));
    }
    let direction = match f.opt_str("direction")?.unwrap_or("both") {
        "both" => DirSpec::Both,
        "a-to-b" => DirSpec::AToB,
        "b-to-a" => DirSpec::BToA,
        other => {
            return Err(f.err(
                "direction",
                format!("{other:?}: expected \"both\", \"a-to-b\" or \"b-to-a\""),
            ));
        }
    };
    Ok(LinkRef { a, b, direction })
}

fn opt_pair(f: &mut Fields<'_>, fleet: &Fleet) -> Result<Option<(String, String)>, ScenarioError> {
    let has_a = f.t.contains_key("a");
    let has_b = f.t.contains_key("b");
    if !has_a && !has_b {
        f.used.insert("a");
        f.used.insert("b");
        return Ok(None);
    }
    let l = link_ref(f, fleet)?;
    Ok(Some((l.a, l.b)))
}

fn parse_action(
    f: &mut Fields<'_>,
    fleet: &Fleet,
    st: &mut TimelineState,
) -> Result<Action, ScenarioError> {
    let name = f.str("action")?;
    let action = match name {
        "partition" => Action::Partition {
            link: link_ref(f, fleet)?,
        },
        "heal" => Action::Heal {
            link: opt_pair(f, fleet)?,
        },
        "clear-faults" => Action::ClearFaults {
            link: opt_pair(f, fleet)?,
        },
        "loss" => Action::Loss {
            link: link_ref(f, fleet)?,
            probability: f.probability("probability")?,
        },
        "duplicate" => Action::Duplicate {
            link: link_ref(f, fleet)?,
            probability: f.probability("probability")?,
        },
        "reorder" => Action::Reorder {
            link: link_ref(f, fleet)?,
            probability: f.probability("probability")?,
            gap: f.opt_duration("gap")?.unwrap_or(Duration::from_millis(20)),
        },
        "delay" => Action::Delay {
            link: link_ref(f, fleet)?,
            delay: f.duration("delay")?,
            jitter: f.opt_duration("jitter")?.unwrap_or(Duration::ZERO),
        },
        "bandwidth" => {
            let link = link_ref(f, fleet)?;
            let bytes_per_sec = f
                .opt_u64("bytes_per_sec")?
                .ok_or_else(|| f.err("bytes_per_sec", "is missing"))?;
            if bytes_per_sec == 0 {
                return Err(f.err("bytes_per_sec", "0 would carry nothing; use a partition"));
            }
            Action::Bandwidth {
                link,
                bytes_per_sec,
            }
        }
        "kill" => {
            let node = node_ref(f, "node", fleet)?;
            if !st.down.insert(node.clone()) {
                return Err(f.err(
                    "node",
                    format!("{node} is already down (killed earlier and not restarted)"),
                ));
            }
            Action::Kill { node }
        }
        "restart" => {
            let node = node_ref(f, "node", fleet)?;
            if !st.down.remove(&node) {
                return Err(f.err(
                    "node",
                    format!("{node} is running; only a killed node can be restarted"),
                ));
            }
            Action::Restart { node }
        }
        "clock-skew" => {
            let node = node_ref(f, "node", fleet)?;
            let offset = f.opt_str("offset")?;
            let set_to = f.opt_i64("set_to_ms")?;
            let change =
                match (offset, set_to) {
                    (Some(o), None) => ClockChange::OffsetMs(
                        parse_duration_ms(o, true).map_err(|r| f.err("offset", r))?,
                    ),
                    (None, Some(ms)) => ClockChange::SetTo(Timestamp(ms)),
                    _ => return Err(f.err(
                        "offset",
                        "give exactly one of offset (\"-2h\") or set_to_ms (0 = booted in 1970)",
                    )),
                };
            Action::ClockSkew { node, change }
        }
        "edit-config" => {
            let node = node_ref(f, "node", fleet)?;
            let device = device_ref(f, "device", fleet)?;
            check_may_reach(f, fleet, &node, &device, "node")?;
            let field = f.str("field")?.to_string();
            let spec = schemas::device::field_spec(&field).ok_or_else(|| {
                let names: Vec<String> = schemas::device::standard_fields()
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
                f.err(
                    "field",
                    format!(
                        "unknown field {field:?}; standard fields are {}",
                        names.join(", ")
                    ),
                )
            })?;
            let value = match f.get("value") {
                Some(toml::Value::Boolean(b)) => FieldValue::Bool(*b),
                Some(toml::Value::Integer(i)) => FieldValue::Number(*i as f64),
                Some(toml::Value::Float(x)) => FieldValue::Number(*x),
                Some(toml::Value::String(s)) => FieldValue::Text(s.clone()),
                Some(v) => return Err(f.type_err("value", "a boolean, number or string", v)),
                None => return Err(f.err("value", "is missing")),
            };
            spec.check(&value).map_err(|r| f.err("value", r))?;
            Action::EditConfig {
                node,
                device,
                field,
                value,
            }
        }
        "command" => {
            let from = node_ref(f, "from", fleet)?;
            let device = device_ref(f, "device", fleet)?;
            check_may_reach(f, fleet, &from, &device, "from")?;
            let id = f.str("id")?.to_string();
            schemas::command::validate_command_id(&id).map_err(|r| f.err("id", r))?;
            let register = f.str("register")?.to_string();
            let value = f.f64("value")?;
            if !value.is_finite() {
                return Err(f.err("value", "must be finite"));
            }
            let deliveries = f.opt_u32_min("deliveries", 1)?.unwrap_or(1);
            Action::Command {
                from,
                device,
                id,
                register,
                value,
                deliveries,
            }
        }
        "flood" => {
            let node = node_ref(f, "node", fleet)?;
            let kind = match f.str("kind")? {
                "http" => FloodKind::Http,
                "reconnect" => FloodKind::Reconnect,
                "commands" => FloodKind::Commands,
                other => {
                    return Err(f.err(
                        "kind",
                        format!("{other:?}: expected \"http\", \"reconnect\" or \"commands\""),
                    ));
                }
            };
            let rate_per_sec = f
                .opt_u32_min("rate_per_sec", 1)?
                .ok_or_else(|| f.err("rate_per_sec", "is missing"))?;
            let duration = f.duration("duration")?;
            Action::Flood {
                node,
                kind,
                rate_per_sec,
                duration,
            }
        }
        "device-fault" => {
            let device = device_ref(f, "device", fleet)?;
            let fault = match f.str("fault")? {
                "timeout" => DeviceFault::Timeout,
                "exception" => DeviceFault::Exception,
                "disconnect" => DeviceFault::Disconnect,
                "stuck" => DeviceFault::Stuck,
                "out-of-range" => DeviceFault::OutOfRange,
                "clear" => DeviceFault::Clear,
                other => return Err(f.err("fault", format!("{other:?}: expected timeout, exception, disconnect, stuck, out-of-range or clear"))),
            };
            let duration = f.opt_duration("duration")?;
            Action::DeviceFault {
                device,
                fault,
                duration,
            }
        }
        other => {
            return Err(f.err("action", format!(
                "unknown action {other:?}; expected one of partition, heal, loss, delay, duplicate, reorder, bandwidth, clear-faults, kill, restart, clock-skew, edit-config, command, flood, device-fault"
            )));
        }
    };
    Ok(action)
}

impl Fields<'_> {
    fn opt_i64(&mut self, key: &'static str) -> Result<Option<i64>, ScenarioError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => Ok(Some(*i)),
            Some(v) => Err(self.type_err(key, "an integer", v)),
        }
    }
}

/// An edit or command for `device` must come from an edge of its site or a
/// hub that serves its tenant's region.
fn check_may_reach(
    f: &Fields<'_>,
    fleet: &Fleet,
    node: &str,
    device: &str,
    key: &str,
) -> Result<(), ScenarioError> {
    let site = device.split('/').next().unwrap_or("");
    let site_spec = fleet.sites.iter().find(|s| s.id.as_str() == site);
    let ok = match (fleet.role(node), site_spec) {
        (Some(NodeRole::Edge { site: s, .. }), _) => s.as_str() == site,
        (
            Some(NodeRole::Hub {
                tier: HubTier::Regional,
                regions,
            }),
            Some(spec),
        ) => fleet
            .region_of(&spec.tenant)
            .is_some_and(|r| regions.contains(r)),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(f.err(key, format!("{node} cannot reach {device}: use an edge of its site or the regional hub of its tenant")))
    }
}

/// One file of a directory and what became of it.
pub type LoadedScenario = (PathBuf, Result<Scenario, ScenarioError>);

/// Load every `*.toml` file of a directory, sorted by name. Returns each
/// file with its result, so one bad file does not hide the others.
pub fn load_dir(dir: &Path) -> Result<Vec<LoadedScenario>, ScenarioError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ScenarioError::Read {
        file: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for e in rd {
        let e = e.map_err(|source| ScenarioError::Read {
            file: dir.to_path_buf(),
            source,
        })?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files
        .into_iter()
        .map(|p| {
            let r = Scenario::load(&p);
            (p, r)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = r#"
name = "t"
duration = "60s"
[[fleet.hubs]]
name = "hub-eu"
regions = ["eu"]
[[fleet.hubs]]
name = "hub-global"
tier = "global"
[[fleet.tenants]]
id = "acme"
region = "eu"
[[fleet.sites]]
tenant = "acme"
id = "site-1"
edges = 2
devices_per_edge = 2
"#;

    fn parse(extra: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(Path::new("x.toml"), &format!("{FLEET}{extra}"))
    }

    fn loc(extra: &str) -> String {
        match parse(extra) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(e) => {
                let s = e.to_string();
                assert!(s.starts_with("x.toml: "), "{s}");
                e.location().map(str::to_string).unwrap_or(s)
            }
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("5s", false), Ok(5000));
        assert_eq!(parse_duration_ms("250ms", false), Ok(250));
        assert_eq!(parse_duration_ms("1.5m", false), Ok(90_000));
        assert_eq!(parse_duration_ms("-2h", true), Ok(-7_200_000));
        assert!(parse_duration_ms("-2h", false).is_err());
        assert!(
            parse_duration_ms("5", false)
                .unwrap_err()
                .contains("no unit")
        );
        assert!(
            parse_duration_ms("5d", false)
                .unwrap_err()
                .contains("unknown unit")
        );
    }

    #[test]
    fn fleet_nodes_and_links() {
        let s = parse("").unwrap();
        let names: Vec<String> = s.fleet.nodes().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["hub-eu", "hub-global", "site-1/edge-1", "site-1/edge-2"]
        );
        let links: Vec<String> = s.fleet.links().iter().map(|l| l.to_string()).collect();
        assert_eq!(
            links,
            [
                "site-1/edge-1 <-> site-1/edge-2",
                "site-1/edge-1 <-> hub-eu",
                "site-1/edge-2 <-> hub-eu",
                "hub-eu <-> hub-global",
            ]
        );
        assert_eq!(s.fleet.devices().len(), 4);
    }

    #[test]
    fn errors_name_the_action_and_field() {
        let act = |body: &str| {
            format!(
                "[[timeline]]\nat = \"1s\"\naction = \"kill\"\nnode = \"hub-eu\"\n[[timeline]]\nat = \"2s\"\n{body}\n"
            )
        };
        assert_eq!(
            loc(&act(
                "action = \"loss\"\na = \"site-1/edge-1\"\nb = \"hub-eu\"\nprobability = 1.5"
            )),
            "timeline[1].probability"
        );
        assert_eq!(
            loc(&act(
                "action = \"loss\"\na = \"site-1/edge-1\"\nb = \"hub-eu\""
            )),
            "timeline[1].probability"
        );
        assert_eq!(
            loc(&act(
                "action = \"partition\"\na = \"site-1/edge-9\"\nb = \"hub-eu\""
            )),
            "timeline[1].a"
        );
        assert_eq!(
            loc(&act(
                "action = \"partition\"\na = \"site-1/edge-1\"\nb = \"hub-global\""
            )),
            "timeline[1].b"
        );
        assert_eq!(
            loc(&act(
                "action = \"partition\"\na = \"site-1/edge-1\"\nb = \"hub-eu\"\ndirection = \"up\""
            )),
            "timeline[1].direction"
        );
        assert_eq!(
            loc(&act("action = \"kill\"\nnode = \"hub-eu\"")),
            "timeline[1].node"
        );
        assert_eq!(loc(&act("action = \"explode\"")), "timeline[1].action");
        assert_eq!(
            loc(&act(
                "action = \"restart\"\nnode = \"hub-eu\"\ncolour = \"red\""
            )),
            "timeline[1].colour"
        );
        assert_eq!(
            loc(&act(
                "action = \"edit-config\"\nnode = \"hub-eu\"\ndevice = \"site-1/edge-1/dev-1\"\nfield = \"setpoint\"\nvalue = 5000"
            )),
            "timeline[1].value"
        );
        assert_eq!(
            loc(&act(
                "action = \"edit-config\"\nnode = \"hub-global\"\ndevice = \"site-1/edge-1/dev-1\"\nfield = \"setpoint\"\nvalue = 5"
            )),
            "timeline[1].node"
        );
        assert_eq!(
            loc(&act(
                "action = \"command\"\nfrom = \"hub-eu\"\ndevice = \"site-1/edge-1/dev-1\"\nid = \"bad id\"\nregister = \"r\"\nvalue = 1"
            )),
            "timeline[1].id"
        );
        assert_eq!(
            loc(&act("action = \"clock-skew\"\nnode = \"hub-eu\"")),
            "timeline[1].offset"
        );
        assert_eq!(
            loc(
                "[[timeline]]\nat = \"5s\"\naction = \"heal\"\n[[timeline]]\nat = \"4s\"\naction = \"heal\""
            ),
            "timeline[1].at"
        );
        assert_eq!(
            loc("[[timeline]]\nat = \"61s\"\naction = \"heal\""),
            "timeline[0].at"
        );
        assert_eq!(
            loc("[[timeline]]\nat = 5\naction = \"heal\""),
            "timeline[0].at"
        );
        assert_eq!(
            loc("[checks]\nloop_period_tolerance = 0.5"),
            "checks.loop_period_tolerance"
        );
        assert_eq!(
            loc("[checks]\ncheckers = [\"vibes\"]"),
            "checks.checkers[0]"
        );
        assert_eq!(loc("bogus = 1"), "fleet.sites[0].bogus");
        let e = Scenario::parse(Path::new("x.toml"), &format!("bogus = 1\n{FLEET}")).unwrap_err();
        assert_eq!(e.location(), Some("bogus"), "{e}");
        let e = Scenario::parse(Path::new("y.toml"), "duration = \"1s\"\n[[fleet.hubs]]\nname = \"h\"\nregions = [\"eu\"]\n[[fleet.sites]]\ntenant = \"nope\"\nid = \"s\"").unwrap_err();
        assert_eq!(e.location(), Some("fleet.sites[0].tenant"), "{e}");
        let e = Scenario::parse(Path::new("z.toml"), "duration = ").unwrap_err();
        assert!(
            matches!(e, ScenarioError::Syntax { .. }) && e.to_string().starts_with("z.toml"),
            "{e}"
        );
    }

    #[test]
    fn spans_follow_the_timeline() {
        let s = parse(
            r#"
[[timeline]]
at = "5s"
action = "partition"
a = "hub-eu"
b = "site-1/edge-1"
direction = "a-to-b"
[[timeline]]
at = "6s"
action = "loss"
a = "site-1/edge-1"
b = "site-1/edge-2"
probability = 0.3
[[timeline]]
at = "10s"
action = "kill"
node = "site-1/edge-2"
[[timeline]]
at = "20s"
action = "heal"
[[timeline]]
at = "25s"
action = "restart"
node = "site-1/edge-2"
"#,
        )
        .unwrap();
        let spans = s.fault_spans();
        assert_eq!(spans.len(), 3, "{spans:?}");
        // hub-eu -> edge-1 is b-to-a on the canonical link edge-1 <-> hub-eu.
        assert_eq!(
            (
                spans[0].kind.as_str(),
                spans[0].direction.as_str(),
                spans[0].from_ms,
                spans[0].to_ms
            ),
            ("partition", "b-to-a", 5000, 20_000)
        );
        assert_eq!(
            (spans[1].label.as_str(), spans[1].from_ms, spans[1].to_ms),
            ("loss 30%", 6000, 60_000)
        );
        assert_eq!(
            (spans[2].direction.as_str(), spans[2].to_ms),
            ("b-to-a", 60_000)
        );
        let ch = s.link_changes();
        let got: Vec<(u128, String, crate::link::Direction, bool, f64)> = ch
            .iter()
            .map(|c| {
                (
                    c.at.as_millis(),
                    c.link.to_string(),
                    c.direction,
                    c.faults.partitioned,
                    c.faults.loss,
                )
            })
            .collect();
        use crate::link::Direction::{AToB, BToA};
        assert_eq!(
            got,
            [
                (
                    5000,
                    "site-1/edge-1 <-> hub-eu".to_string(),
                    BToA,
                    true,
                    0.0
                ),
                (
                    6000,
                    "site-1/edge-1 <-> site-1/edge-2".into(),
                    AToB,
                    false,
                    0.3
                ),
                (
                    6000,
                    "site-1/edge-1 <-> site-1/edge-2".into(),
                    BToA,
                    false,
                    0.3
                ),
                // heal (all links) changes only the partitioned direction; the loss stays.
                (20_000, "site-1/edge-1 <-> hub-eu".into(), BToA, false, 0.0),
            ]
        );
        assert_eq!(
            s.downtime(),
            vec![NodeSpan {
                node: "site-1/edge-2".into(),
                from_ms: 10_000,
                to_ms: 25_000
            }]
        );
    }
}
