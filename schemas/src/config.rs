//! TOML configuration of `edge-node` and `cloud-hub`.
//!
//! Two stages (as in neon's pageserver): serde parses the file into the
//! config types, with defaults that work on a laptop, then `validate` checks
//! what serde cannot. Every error names the file, the field and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::alarm::AlarmRule;
use crate::identity::EndpointKey;
use crate::ids::{DeviceId, SiteId, TenantId};
use crate::policy::{HubTier, Region};
use crate::registers::{RegisterFunction, RegisterSpec};

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: PathBuf,
        field: String,
        reason: String,
    },
}

impl ConfigError {
    /// The field path the error is about (`devices[1].registers[0].address`).
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Read { .. } => None,
        }
    }
}

/// Map a `toml` deserialisation error to one naming the field and the line.
fn parse_error(file: &Path, text: &str, e: toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
    let msg = e.message().trim().to_string();
    // The toml crate names the offending key in the message for unknown or
    // missing fields; the span points at the value. Name the key we can see.
    let field = e
        .span()
        .and_then(|s| key_at(text, s.start))
        .unwrap_or_else(|| "(document)".to_string());
    ConfigError::Invalid {
        file: file.to_path_buf(),
        field,
        reason: match line {
            Some(l) => format!("{msg} (line {l})"),
            None => msg,
        },
    }
}

/// The `key` of the `key = value` line containing byte offset `at`, with the
/// enclosing `[table]` or `[[array]]` header.
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let header = text[..line_start]
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .map(|l| l.trim().trim_matches(|c| c == '[' || c == ']').to_string());
    let key = line.split_once('=').map(|(k, _)| k.trim().to_string());
    match (header, key) {
        (Some(h), Some(k)) => Some(format!("{h}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(h), None) => Some(h),
        (None, None) => None,
    }
}

fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })
}

/// A peer to dial: its endpoint id and a socket address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub endpoint_id: EndpointKey,
    #[schemars(with = "String")]
    pub addr: SocketAddr,
}

// ---------------------------------------------------------------- edge node

fn default_data_dir() -> PathBuf {
    PathBuf::from("./fieldsync-edge-data")
}
fn default_sync_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_edge_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_tenant() -> TenantId {
    TenantId::new("demo").unwrap_or_else(|_| unreachable!("static id is valid"))
}
fn default_site() -> SiteId {
    SiteId::new("site-1").unwrap_or_else(|_| unreachable!("static id is valid"))
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_retention_hours() -> u64 {
    24 * 7
}
fn default_retention_bytes() -> u64 {
    1 << 30
}
fn default_window_s() -> u64 {
    60
}
fn default_period_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    #[serde(default = "default_tenant")]
    pub tenant: TenantId,
    #[serde(default = "default_site")]
    pub site: SiteId,
    /// Human name shown in UIs.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Identity key file; created with mode 0600 on first start. Defaults to
    /// `{data_dir}/node.key`.
    #[serde(default)]
    pub key_path: Option<PathBuf>,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            tenant: default_tenant(),
            site: default_site(),
            name: None,
            data_dir: default_data_dir(),
            key_path: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HubLink {
    pub endpoint_id: EndpointKey,
    #[schemars(with = "String")]
    pub addr: SocketAddr,
    /// Join token presented on first connection (from `cloud-hub token create`).
    #[serde(default)]
    pub join_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// QUIC (iroh) bind address. Port 0 picks a free port.
    #[serde(default = "default_sync_bind")]
    #[schemars(with = "String")]
    pub sync: SocketAddr,
    /// Local HTTP API and UI.
    #[serde(default = "default_edge_http")]
    #[schemars(with = "String")]
    pub http: SocketAddr,
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            sync: default_sync_bind(),
            http: default_edge_http(),
        }
    }
}

/// One polled Modbus TCP device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub id: DeviceId,
    /// Device model, for fleet grouping (`cold-room`, `pump`, `meter`).
    #[serde(default)]
    pub device_type: String,
    /// Modbus TCP address.
    #[schemars(with = "String")]
    pub addr: SocketAddr,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub tags: Vec<String>,
    pub registers: Vec<RegisterSpec>,
}

/// What a control loop's output does on a sensor fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailSafe {
    Off,
    On,
    /// Keep the last output.
    Hold,
}

/// A local control loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LoopConfig {
    /// Cooling thermostat: output on above setpoint + hysteresis/2, off below
    /// setpoint - hysteresis/2, with minimum on and off times.
    Thermostat {
        name: String,
        device: DeviceId,
        /// Register read as the process value.
        sensor: String,
        /// Coil driven.
        output: String,
        #[serde(default = "default_period_ms")]
        period_ms: u64,
        fail_safe: FailSafe,
        /// Used until the device document has a `setpoint`.
        default_setpoint: f64,
        #[serde(default = "default_hysteresis")]
        default_hysteresis: f64,
        #[serde(default)]
        min_on_s: u64,
        #[serde(default)]
        min_off_s: u64,
    },
    /// Interlock: output forced off while the sensor is above the limit.
    Interlock {
        name: String,
        device: DeviceId,
        sensor: String,
        output: String,
        #[serde(default = "default_period_ms")]
        period_ms: u64,
        fail_safe: FailSafe,
        /// Used until the device document has a `high_limit`.
        default_limit: f64,
    },
}

fn default_hysteresis() -> f64 {
    2.0
}

impl LoopConfig {
    pub fn name(&self) -> &str {
        match self {
            LoopConfig::Thermostat { name, .. } | LoopConfig::Interlock { name, .. } => name,
        }
    }
    pub fn device(&self) -> &DeviceId {
        match self {
            LoopConfig::Thermostat { device, .. } | LoopConfig::Interlock { device, .. } => device,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSection {
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    #[serde(default = "default_retention_bytes")]
    pub retention_bytes: u64,
}

impl Default for RawSection {
    fn default() -> Self {
        RawSection {
            retention_hours: default_retention_hours(),
            retention_bytes: default_retention_bytes(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SummariserSection {
    #[serde(default = "default_window_s")]
    pub window_s: u64,
}

impl Default for SummariserSection {
    fn default() -> Self {
        SummariserSection {
            window_s: default_window_s(),
        }
    }
}

fn default_tick_journal_capacity() -> usize {
    4096
}

/// `[control]`: settings shared by the control loops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Append every tick of every loop (loop name, monotonic ms since the
    /// process started, wall ms) to `{data_dir}/loop-ticks.log`, through a
    /// bounded queue to a writer thread: a tick never waits on the file;
    /// ticks that find the queue full are dropped and counted in the file.
    /// Off by default (it grows with every tick); the chaos runner turns it
    /// on to check loop liveness.
    #[serde(default)]
    pub tick_journal: bool,
    /// Ticks the journal queue holds before it drops.
    #[serde(default = "default_tick_journal_capacity")]
    pub tick_journal_capacity: usize,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            tick_journal: false,
            tick_journal_capacity: default_tick_journal_capacity(),
        }
    }
}

/// `edge-node` configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub hub: Option<HubLink>,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub listen: ListenSection,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    #[serde(default)]
    pub loops: Vec<LoopConfig>,
    #[serde(default)]
    pub alarms: Vec<AlarmRule>,
    /// Settings shared by the control loops.
    #[serde(default)]
    pub control: ControlSection,
    #[serde(default)]
    pub raw: RawSection,
    #[serde(default)]
    pub summariser: SummariserSection,
    /// Devices that push over MQTT or HTTP.
    #[serde(default)]
    pub ingest: crate::ingest::IngestSection,
}

impl EdgeConfig {
    /// Read, parse and validate a config file.
    pub fn load(file: &Path) -> Result<EdgeConfig, ConfigError> {
        let text = read(file)?;
        Self::parse(file, &text)
    }

    /// Parse and validate config text; `file` is only used in errors.
    pub fn parse(file: &Path, text: &str) -> Result<EdgeConfig, ConfigError> {
        let cfg: EdgeConfig = toml::from_str(text).map_err(|e| parse_error(file, text, e))?;
        cfg.validate()
            .map_err(|(field, reason)| ConfigError::Invalid {
                file: file.to_path_buf(),
                field,
                reason,
            })?;
        Ok(cfg)
    }

    pub fn key_path(&self) -> PathBuf {
        self.node
            .key_path
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("node.key"))
    }

    pub fn device(&self, id: &DeviceId) -> Option<&DeviceConfig> {
        self.devices.iter().find(|d| &d.id == id)
    }

    /// Checks serde cannot make. Returns `(field, reason)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let EdgeConfig {
            node: _,
            hub: _,
            peers,
            listen: _,
            devices,
            loops,
            alarms,
            control,
            raw,
            summariser,
            ingest,
        } = self;
        for (i, p) in peers.iter().enumerate() {
            if peers[..i].iter().any(|q| q.endpoint_id == p.endpoint_id) {
                return Err((
                    format!("peers[{i}].endpoint_id"),
                    format!("{} is listed twice", p.endpoint_id.short()),
                ));
            }
        }
        for (i, d) in devices.iter().enumerate() {
            let at = format!("devices[{i}]");
            if devices[..i].iter().any(|o| o.id == d.id) {
                return Err((
                    format!("{at}.id"),
                    format!("device {:?} is defined twice", d.id.as_str()),
                ));
            }
            if d.timeout_ms == 0 || d.timeout_ms > 60_000 {
                return Err((
                    format!("{at}.timeout_ms"),
                    format!("{} must be 1..=60000", d.timeout_ms),
                ));
            }
            let map = crate::registers::RegisterMap {
                registers: d.registers.clone(),
            };
            map.validate()
                .map_err(|e| (format!("{at}.{}", e.field), e.reason))?;
        }
        for (i, l) in loops.iter().enumerate() {
            let at = format!("loops[{i}]");
            if loops[..i].iter().any(|o| o.name() == l.name()) {
                return Err((
                    format!("{at}.name"),
                    format!("loop {:?} is defined twice", l.name()),
                ));
            }
            let Some(dev) = self.device(l.device()) else {
                return Err((
                    format!("{at}.device"),
                    format!(
                        "unknown device {:?}: not in [[devices]]",
                        l.device().as_str()
                    ),
                ));
            };
            let (sensor, output, period_ms) = match l {
                LoopConfig::Thermostat {
                    sensor,
                    output,
                    period_ms,
                    default_hysteresis,
                    default_setpoint,
                    ..
                } => {
                    if !default_hysteresis.is_finite() || *default_hysteresis < 0.0 {
                        return Err((
                            format!("{at}.default_hysteresis"),
                            "must be a finite number >= 0".into(),
                        ));
                    }
                    if !default_setpoint.is_finite() {
                        return Err((format!("{at}.default_setpoint"), "must be finite".into()));
                    }
                    (sensor, output, period_ms)
                }
                LoopConfig::Interlock {
                    sensor,
                    output,
                    period_ms,
                    default_limit,
                    ..
                } => {
                    if !default_limit.is_finite() {
                        return Err((format!("{at}.default_limit"), "must be finite".into()));
                    }
                    (sensor, output, period_ms)
                }
            };
            if dev.registers.iter().all(|r| &r.name != sensor) {
                return Err((
                    format!("{at}.sensor"),
                    format!("device {:?} has no register {sensor:?}", dev.id.as_str()),
                ));
            }
            match dev.registers.iter().find(|r| &r.name == output) {
                None => {
                    return Err((
                        format!("{at}.output"),
                        format!("device {:?} has no register {output:?}", dev.id.as_str()),
                    ));
                }
                Some(r) if r.function != RegisterFunction::Coil => {
                    return Err((
                        format!("{at}.output"),
                        format!(
                            "{output:?} is a {:?}, a loop output must be a coil",
                            r.function
                        ),
                    ));
                }
                Some(_) => {}
            }
            if *period_ms < 10 || *period_ms > 3_600_000 {
                return Err((
                    format!("{at}.period_ms"),
                    format!("{period_ms} must be 10..=3600000"),
                ));
            }
        }
        for (i, a) in alarms.iter().enumerate() {
            let at = format!("alarms[{i}]");
            a.validate(&at)?;
            let Some(dev) = self.device(&a.device) else {
                return Err((
                    format!("{at}.device"),
                    format!("unknown device {:?}: not in [[devices]]", a.device.as_str()),
                ));
            };
            if dev.registers.iter().all(|r| r.name != a.metric) {
                return Err((
                    format!("{at}.metric"),
                    format!(
                        "device {:?} has no register {:?}",
                        dev.id.as_str(),
                        a.metric
                    ),
                ));
            }
        }
        if raw.retention_hours == 0 {
            return Err(("raw.retention_hours".into(), "must be at least 1".into()));
        }
        if raw.retention_bytes < 1 << 20 {
            return Err((
                "raw.retention_bytes".into(),
                "must be at least 1 MiB".into(),
            ));
        }
        if summariser.window_s == 0 || 86_400 % summariser.window_s != 0 {
            return Err((
                "summariser.window_s".into(),
                format!(
                    "{} must divide a day (e.g. 10, 60, 300, 3600)",
                    summariser.window_s
                ),
            ));
        }
        if control.tick_journal_capacity == 0 || control.tick_journal_capacity > 1_000_000 {
            return Err((
                "control.tick_journal_capacity".into(),
                format!(
                    "{} must be between 1 and 1000000",
                    control.tick_journal_capacity
                ),
            ));
        }
        ingest.validate()?;
        Ok(())
    }
}

// ---------------------------------------------------------------- cloud hub

fn default_hub_data_dir() -> PathBuf {
    PathBuf::from("./fieldsync-hub-data")
}
fn default_hub_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_regions() -> Vec<Region> {
    vec![Region::new("local").unwrap_or_else(|_| unreachable!("static region is valid"))]
}
fn default_tier() -> HubTier {
    HubTier::Regional
}
fn default_memory_mb() -> u64 {
    512
}

/// A tenant the hub serves, with its region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: TenantId,
    pub region: Region,
}

/// `cloud-hub` configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    #[serde(default = "default_hub_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub key_path: Option<PathBuf>,
    /// Regions this hub serves. It refuses documents of tenants elsewhere.
    #[serde(default = "default_regions")]
    pub regions: Vec<Region>,
    #[serde(default = "default_tier")]
    pub tier: HubTier,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// QUIC (iroh) bind address.
    #[serde(default = "default_sync_bind")]
    #[schemars(with = "String")]
    pub sync_listen: SocketAddr,
    /// HTTP API and dashboard.
    #[serde(default = "default_hub_http")]
    #[schemars(with = "String")]
    pub http_listen: SocketAddr,
    /// A global hub to forward fleet aggregates to.
    #[serde(default)]
    pub upstream: Option<PeerConfig>,
    /// Memory budget for loaded replicas.
    #[serde(default = "default_memory_mb")]
    pub replica_memory_mb: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data_dir: default_hub_data_dir(),
            key_path: None,
            regions: default_regions(),
            tier: default_tier(),
            tenants: Vec::new(),
            sync_listen: default_sync_bind(),
            http_listen: default_hub_http(),
            upstream: None,
            replica_memory_mb: default_memory_mb(),
        }
    }
}

impl HubConfig {
    pub fn load(file: &Path) -> Result<HubConfig, ConfigError> {
        let text = read(file)?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<HubConfig, ConfigError> {
        let cfg: HubConfig = toml::from_str(text).map_err(|e| parse_error(file, text, e))?;
        cfg.validate()
            .map_err(|(field, reason)| ConfigError::Invalid {
                file: file.to_path_buf(),
                field,
                reason,
            })?;
        Ok(cfg)
    }

    pub fn key_path(&self) -> PathBuf {
        self.key_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("hub.key"))
    }

    pub fn region_of(&self, tenant: &TenantId) -> Option<&Region> {
        self.tenants
            .iter()
            .find(|t| &t.id == tenant)
            .map(|t| &t.region)
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.regions.is_empty() {
            return Err((
                "regions".into(),
                "a hub must serve at least one region".into(),
            ));
        }
        for (i, t) in self.tenants.iter().enumerate() {
            if self.tenants[..i].iter().any(|o| o.id == t.id) {
                return Err((
                    format!("tenants[{i}].id"),
                    format!("tenant {:?} is listed twice", t.id.as_str()),
                ));
            }
            if self.tier == HubTier::Regional && !self.regions.contains(&t.region) {
                return Err((
                    format!("tenants[{i}].region"),
                    format!(
                        "{:?} is not one of this hub's regions {:?}",
                        t.region.as_str(),
                        self.regions.iter().map(Region::as_str).collect::<Vec<_>>()
                    ),
                ));
            }
        }
        if self.replica_memory_mb < 16 {
            return Err((
                "replica_memory_mb".into(),
                format!("{} is too small; at least 16", self.replica_memory_mb),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
tenant = "acme"
site = "store-1"

[[devices]]
id = "room-1"
addr = "127.0.0.1:5020"
registers = [
  { name = "temperature", function = "input", address = 0, type = "i16", scale = 0.1, unit = "celsius" },
  { name = "compressor", function = "coil", address = 0, type = "bool" },
]

[[loops]]
kind = "thermostat"
name = "room-1-cooling"
device = "room-1"
sensor = "temperature"
output = "compressor"
fail_safe = "on"
default_setpoint = 4.0
"#;

    fn p(text: &str) -> Result<EdgeConfig, ConfigError> {
        EdgeConfig::parse(Path::new("edge.toml"), text)
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = p("").unwrap();
        assert_eq!(c.node.tenant.as_str(), "demo");
        assert_eq!(c.summariser.window_s, 60);
        assert_eq!(
            c.key_path(),
            PathBuf::from("./fieldsync-edge-data/node.key")
        );
        let h = HubConfig::parse(Path::new("hub.toml"), "").unwrap();
        assert_eq!(h.regions[0].as_str(), "local");
    }

    #[test]
    fn good_config_parses() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.devices[0].registers.len(), 2);
        assert_eq!(c.loops[0].name(), "room-1-cooling");
        // Round trip through TOML.
        let text = toml::to_string(&c).unwrap();
        assert_eq!(p(&text).unwrap(), c);
    }

    fn err_of(text: &str) -> String {
        match p(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = err_of(&GOOD.replace("address = 0, type = \"i16\"", "address = 0, type = \"i17\""));
        assert!(e.starts_with("edge.toml: devices"), "{e}");
        assert!(e.contains("i17"), "{e}");

        let e = err_of(&GOOD.replace("sensor = \"temperature\"", "sensor = \"temp\""));
        assert_eq!(
            e,
            "edge.toml: loops[0].sensor: device \"room-1\" has no register \"temp\""
        );

        let e = err_of(&GOOD.replace("output = \"compressor\"", "output = \"temperature\""));
        assert!(e.contains("loops[0].output") && e.contains("coil"), "{e}");

        let e = err_of(&GOOD.replace("device = \"room-1\"", "device = \"room-9\""));
        assert!(
            e.contains("loops[0].device: unknown device \"room-9\""),
            "{e}"
        );

        let e = err_of(&GOOD.replace("scale = 0.1", "scale = 0.0"));
        assert!(e.contains("devices[0].registers[0].scale"), "{e}");

        let e = err_of(&GOOD.replace("tenant = \"acme\"", "tenant = \"ACME\""));
        assert!(e.contains("node.tenant") && e.contains("ACME"), "{e}");

        let e = err_of(&format!("{GOOD}\n[summariser]\nwindow_s = 7\n"));
        assert!(e.contains("summariser.window_s"), "{e}");

        let e = err_of(&format!("{GOOD}\n[control]\ntick_journal_capacity = 0\n"));
        assert!(e.contains("control.tick_journal_capacity"), "{e}");
        let c = p(&format!("{GOOD}\n[control]\ntick_journal = true\n")).unwrap();
        assert!(c.control.tick_journal);
        assert!(!p(GOOD).unwrap().control.tick_journal);

        let e = err_of("[node]\ntennant = \"x\"\n");
        assert!(e.contains("tennant"), "{e}");

        let e = err_of(&GOOD.replace("addr = \"127.0.0.1:5020\"", "addr = \"not-an-addr\""));
        assert!(e.contains("devices.addr") && e.contains("line"), "{e}");
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = EdgeConfig::load(Path::new("/nonexistent/edge.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(
            e.to_string()
                .starts_with("/nonexistent/edge.toml: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn hub_config_errors() {
        let e = HubConfig::parse(
            Path::new("hub.toml"),
            "regions = [\"eu\"]\n[[tenants]]\nid = \"acme\"\nregion = \"us\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("tenants[0].region"));
        let e = HubConfig::parse(Path::new("hub.toml"), "regions = []").unwrap_err();
        assert_eq!(e.field(), Some("regions"));
    }
}
