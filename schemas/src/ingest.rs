//! Ingestion contracts: the `[ingest]` section of the edge config (MQTT
//! subscriptions, HTTP ingest devices, payload profiles and perimeter rules),
//! the HTTP ingest batch body, and quarantine entries.
//!
//! A *profile* describes one device type's payload: which fields carry which
//! metrics, in which unit, with which type and range, and where the timestamp
//! is. A *device* (`[[ingest.devices]]`) binds a device id to a profile, a
//! rate limit and (for HTTP) the SHA-256 of its bearer token. MQTT topics
//! name the device, either fixed or taken from one level of the topic.
//!
//! ```toml
//! [ingest.mqtt]
//! broker = "127.0.0.1:1883"
//! client_id = "edge-site-1"
//! [[ingest.mqtt.topics]]
//! filter = "plant/+/telemetry"
//! device_level = 1          # "plant/{device}/telemetry"
//!
//! [[ingest.profiles]]
//! name = "cold-room"
//! timestamp = { field = "ts", format = "unix_ms" }
//! metrics = [ { name = "temperature", aliases = ["temp_f"], unit = "fahrenheit", min = -40.0, max = 140.0 } ]
//!
//! [[ingest.devices]]
//! id = "room-9"
//! profile = "cold-room"
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::metrics::Unit;
use crate::time::Timestamp;

fn default_max_body_bytes() -> u64 {
    256 * 1024
}
fn default_dedupe_window_s() -> u64 {
    24 * 3600
}
fn default_dedupe_max_entries() -> u64 {
    200_000
}
fn default_quarantine_max_entries() -> u64 {
    1000
}
fn default_quarantine_payload_bytes() -> u64 {
    1024
}
fn default_max_future_s() -> u64 {
    300
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_reconnect_min_ms() -> u64 {
    200
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_rate() -> f64 {
    100.0
}
fn default_burst() -> f64 {
    1000.0
}
fn default_true() -> bool {
    true
}

/// `[ingest]`: devices that push their data over MQTT or HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    /// Subscribe to a broker; absent: no MQTT.
    #[serde(default)]
    pub mqtt: Option<MqttSection>,
    /// Payload profiles (device types).
    #[serde(default)]
    pub profiles: Vec<IngestProfile>,
    /// Devices that push.
    #[serde(default)]
    pub devices: Vec<IngestDevice>,
    /// Largest HTTP body or MQTT payload accepted, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// A sample seen again within this many seconds (by its timestamp, or by
    /// its message id) is a replay and counted once.
    #[serde(default = "default_dedupe_window_s")]
    pub dedupe_window_s: u64,
    /// Bound on remembered sample keys; the oldest are forgotten first.
    #[serde(default = "default_dedupe_max_entries")]
    pub dedupe_max_entries: u64,
    /// Bound on kept quarantine entries; the oldest are evicted (and counted).
    #[serde(default = "default_quarantine_max_entries")]
    pub quarantine_max_entries: u64,
    /// Raw payload bytes kept per quarantine entry.
    #[serde(default = "default_quarantine_payload_bytes")]
    pub quarantine_payload_bytes: u64,
    /// Sample timestamps further than this ahead of the edge's clock are
    /// refused (only checked while the edge's clock is plausible).
    #[serde(default = "default_max_future_s")]
    pub max_future_s: u64,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            mqtt: None,
            profiles: Vec::new(),
            devices: Vec::new(),
            max_body_bytes: default_max_body_bytes(),
            dedupe_window_s: default_dedupe_window_s(),
            dedupe_max_entries: default_dedupe_max_entries(),
            quarantine_max_entries: default_quarantine_max_entries(),
            quarantine_payload_bytes: default_quarantine_payload_bytes(),
            max_future_s: default_max_future_s(),
        }
    }
}

/// `[ingest.mqtt]`: the site broker. The session is persistent
/// (`clean_session = false`) and subscriptions are QoS 1, so messages
/// published while the edge is down are delivered when it comes back; a
/// message is acknowledged to the broker only once its samples are durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `host:port` of the broker.
    pub broker: String,
    /// Client id; must be stable across restarts for the persistent session.
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Reconnect backoff: first delay, doubled up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    pub topics: Vec<MqttTopic>,
}

/// One subscription and how its messages map to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttTopic {
    /// MQTT topic filter (`+` and `#` wildcards).
    pub filter: String,
    /// Fixed device for every message on this filter.
    #[serde(default)]
    pub device: Option<DeviceId>,
    /// Or: the topic level (0-based) holding the device id. Exactly one of
    /// `device` and `device_level` is set.
    #[serde(default)]
    pub device_level: Option<u32>,
}

/// Where a payload's timestamp comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// Milliseconds since the Unix epoch (a number).
    UnixMs,
    /// Seconds since the Unix epoch (a number, fractions allowed).
    UnixS,
    /// An RFC 3339 string (`2026-11-23T11:50:00.250Z`, `...+01:00`).
    Rfc3339,
}

/// The timestamp of a payload: a field in a given format, or (no field) the
/// edge's receipt time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimestampSpec {
    /// Field name; `None` means receipt time.
    #[serde(default)]
    pub field: Option<String>,
    pub format: TimestampFormat,
}

impl Default for TimestampSpec {
    fn default() -> Self {
        TimestampSpec {
            field: None,
            format: TimestampFormat::UnixMs,
        }
    }
}

/// Payload encoding of a profile.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON object of fields, or an array of such objects (a device's
    /// buffered backlog).
    #[default]
    Json,
    /// A plain number as text; the profile must declare exactly one metric;
    /// the timestamp is the receipt time.
    Number,
}

/// JSON type a metric field must have.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// Any finite number.
    #[default]
    Number,
    /// A number without a fractional part.
    Integer,
    /// `true`/`false`, stored as 1.0/0.0.
    Boolean,
}

/// One metric of a profile, with its perimeter rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricRule {
    /// Metric name in fieldsync (the sample's `metric`).
    pub name: String,
    /// Payload field; defaults to `name`.
    #[serde(default)]
    pub field: Option<String>,
    /// Vendor field names also accepted for this metric.
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub kind: ValueKind,
    /// Unit the device sends; samples are stored in its canonical unit
    /// ([`Unit::to_canonical`]).
    #[serde(default)]
    pub unit: Unit,
    /// Range in the device's unit (before normalisation), inclusive.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// A payload without this field is refused.
    #[serde(default)]
    pub required: bool,
}

/// A device type: payload mapping and perimeter rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestProfile {
    pub name: String,
    #[serde(default)]
    pub format: PayloadFormat,
    #[serde(default)]
    pub timestamp: TimestampSpec,
    /// A field carrying a message id: replays are recognised by it instead
    /// of by `(metric, timestamp)`; needed when timestamps are receipt time.
    #[serde(default)]
    pub message_id_field: Option<String>,
    /// Fields that may appear and are ignored; any other unknown field makes
    /// the payload refused.
    #[serde(default)]
    pub ignore_fields: Vec<String>,
    pub metrics: Vec<MetricRule>,
}

/// A device that pushes data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestDevice {
    pub id: DeviceId,
    /// Name of an `[[ingest.profiles]]` entry.
    pub profile: String,
    /// Lowercase hex SHA-256 of the device's HTTP bearer token
    /// (`printf %s "$TOKEN" | sha256sum`); absent: no HTTP ingest for this
    /// device. The config holds a hash, not the token, so a config file that
    /// leaks (backups, support bundles, version control) grants no write
    /// access; tokens are random and long, so an unsalted hash suffices.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Sustained samples per second accepted from this device.
    #[serde(default = "default_rate")]
    pub rate_per_s: f64,
    /// Samples that may arrive at once above the sustained rate.
    #[serde(default = "default_burst")]
    pub burst: f64,
    /// Whether MQTT messages for this device are accepted.
    #[serde(default = "default_true")]
    pub mqtt: bool,
}

/// Body of `POST /api/ingest/{device}`: samples of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestBatch {
    pub samples: Vec<IngestSample>,
}

/// One pushed sample. `value` is a JSON number or boolean, checked against
/// the device profile's rule for `metric` (which may be a vendor alias).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestSample {
    pub metric: String,
    pub value: serde_json::Value,
    /// In the profile's timestamp format; absent: receipt time.
    #[serde(default)]
    pub ts: Option<serde_json::Value>,
    /// Optional message id for deduplication.
    #[serde(default)]
    pub id: Option<String>,
}

/// Where a quarantined payload came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IngestSource {
    Mqtt,
    Http,
}

/// A refused payload, kept for operators (`GET /api/quarantine`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QuarantineEntry {
    /// Increasing id, unique on this edge.
    pub id: u64,
    /// Edge time of receipt.
    pub at: Timestamp,
    pub source: IngestSource,
    /// MQTT topic or HTTP path.
    pub origin: String,
    /// Device, when it could be told.
    #[serde(default)]
    pub device: Option<DeviceId>,
    /// The field at fault, when there is one (`temperature`, `samples[2].value`).
    #[serde(default)]
    pub field: Option<String>,
    pub reason: String,
    /// The payload as text (lossy UTF-8), truncated.
    pub payload: String,
    /// Size of the whole payload in bytes.
    pub payload_len: u64,
}

fn field_err(at: String, reason: impl Into<String>) -> Result<(), (String, String)> {
    Err((at, reason.into()))
}

impl IngestSection {
    /// The profile named `name`.
    pub fn profile(&self, name: &str) -> Option<&IngestProfile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The ingest device `id`.
    pub fn device(&self, id: &DeviceId) -> Option<&IngestDevice> {
        self.devices.iter().find(|d| &d.id == id)
    }

    /// Checks serde cannot make; returns `(field, reason)` with field paths
    /// relative to the config root (`ingest.devices[0].profile`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let IngestSection {
            mqtt,
            profiles,
            devices,
            max_body_bytes,
            dedupe_window_s,
            dedupe_max_entries,
            quarantine_max_entries,
            quarantine_payload_bytes,
            max_future_s: _,
        } = self;
        if *max_body_bytes < 64 || *max_body_bytes > 64 << 20 {
            return field_err(
                "ingest.max_body_bytes".into(),
                format!("{max_body_bytes} must be 64..=67108864"),
            );
        }
        if *dedupe_window_s == 0 {
            return field_err("ingest.dedupe_window_s".into(), "must be at least 1");
        }
        if *dedupe_max_entries == 0 {
            return field_err("ingest.dedupe_max_entries".into(), "must be at least 1");
        }
        if *quarantine_max_entries == 0 {
            return field_err("ingest.quarantine_max_entries".into(), "must be at least 1");
        }
        if *quarantine_payload_bytes == 0 || *quarantine_payload_bytes > 1 << 20 {
            return field_err(
                "ingest.quarantine_payload_bytes".into(),
                "must be 1..=1048576",
            );
        }
        for (i, p) in profiles.iter().enumerate() {
            let at = format!("ingest.profiles[{i}]");
            if p.name.trim().is_empty() {
                return field_err(format!("{at}.name"), "must not be empty");
            }
            if profiles[..i].iter().any(|o| o.name == p.name) {
                return field_err(
                    format!("{at}.name"),
                    format!("profile {:?} is defined twice", p.name),
                );
            }
            if p.metrics.is_empty() {
                return field_err(
                    format!("{at}.metrics"),
                    "a profile needs at least one metric",
                );
            }
            if p.format == PayloadFormat::Number {
                if p.metrics.len() != 1 {
                    return field_err(
                        format!("{at}.metrics"),
                        "format \"number\" needs exactly one metric",
                    );
                }
                if p.timestamp.field.is_some() {
                    return field_err(
                        format!("{at}.timestamp.field"),
                        "format \"number\" payloads carry no timestamp: leave it out (receipt time)",
                    );
                }
            }
            let mut names: BTreeMap<&str, String> = BTreeMap::new();
            let reserved = p
                .timestamp
                .field
                .iter()
                .chain(p.message_id_field.iter())
                .chain(p.ignore_fields.iter());
            for r in reserved {
                names.insert(r.as_str(), "a timestamp, id or ignored field".into());
            }
            for (j, m) in p.metrics.iter().enumerate() {
                let mat = format!("{at}.metrics[{j}]");
                if m.name.is_empty()
                    || m.name.len() > 200
                    || m.name.chars().any(|c| c.is_control() || c == '\t')
                {
                    return field_err(
                        format!("{mat}.name"),
                        "must be 1..=200 characters, without control characters",
                    );
                }
                if p.metrics[..j].iter().any(|o| o.name == m.name) {
                    return field_err(
                        format!("{mat}.name"),
                        format!("metric {:?} is declared twice", m.name),
                    );
                }
                let field = m.field.as_deref().unwrap_or(&m.name);
                for f in std::iter::once(field).chain(m.aliases.iter().map(String::as_str)) {
                    if let Some(prev) = names.insert(f, m.name.clone()) {
                        return field_err(
                            format!("{mat}.aliases"),
                            format!("field {f:?} already maps to {prev}"),
                        );
                    }
                }
                for (k, v) in [("min", m.min), ("max", m.max)] {
                    if v.is_some_and(|v| !v.is_finite()) {
                        return field_err(format!("{mat}.{k}"), "must be finite");
                    }
                }
                if let (Some(lo), Some(hi)) = (m.min, m.max)
                    && lo > hi
                {
                    return field_err(format!("{mat}.min"), format!("{lo} is above max {hi}"));
                }
            }
        }
        for (i, d) in devices.iter().enumerate() {
            let at = format!("ingest.devices[{i}]");
            if devices[..i].iter().any(|o| o.id == d.id) {
                return field_err(
                    format!("{at}.id"),
                    format!("device {:?} is listed twice", d.id.as_str()),
                );
            }
            if self.profile(&d.profile).is_none() {
                return field_err(
                    format!("{at}.profile"),
                    format!(
                        "unknown profile {:?}: not in [[ingest.profiles]]",
                        d.profile
                    ),
                );
            }
            if let Some(h) = &d.token_sha256
                && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return field_err(
                    format!("{at}.token_sha256"),
                    "must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)",
                );
            }
            if !d.rate_per_s.is_finite() || d.rate_per_s <= 0.0 {
                return field_err(format!("{at}.rate_per_s"), "must be a number > 0");
            }
            if !d.burst.is_finite() || d.burst < 1.0 {
                return field_err(format!("{at}.burst"), "must be a number >= 1");
            }
        }
        if let Some(m) = mqtt {
            let MqttSection {
                broker,
                client_id,
                username,
                password,
                keep_alive_s,
                reconnect_min_ms,
                reconnect_max_ms,
                topics,
            } = m;
            let port_ok = broker
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return field_err(
                    "ingest.mqtt.broker".into(),
                    format!("{broker:?} is not host:port"),
                );
            }
            if client_id.is_empty() || client_id.len() > 128 {
                return field_err(
                    "ingest.mqtt.client_id".into(),
                    "must be 1..=128 characters and stable across restarts",
                );
            }
            if password.is_some() && username.is_none() {
                return field_err("ingest.mqtt.password".into(), "a password needs a username");
            }
            if *keep_alive_s < 5 || *keep_alive_s > 3600 {
                return field_err("ingest.mqtt.keep_alive_s".into(), "must be 5..=3600");
            }
            if *reconnect_min_ms == 0 || reconnect_min_ms > reconnect_max_ms {
                return field_err(
                    "ingest.mqtt.reconnect_min_ms".into(),
                    "must be at least 1 and at most reconnect_max_ms",
                );
            }
            if topics.is_empty() {
                return field_err(
                    "ingest.mqtt.topics".into(),
                    "subscribe to at least one topic",
                );
            }
            for (i, t) in topics.iter().enumerate() {
                let at = format!("ingest.mqtt.topics[{i}]");
                if t.filter.is_empty() || t.filter.contains('\0') {
                    return field_err(format!("{at}.filter"), "must be a non-empty topic filter");
                }
                let levels: Vec<&str> = t.filter.split('/').collect();
                for (k, l) in levels.iter().enumerate() {
                    let bad_hash = l.contains('#') && (*l != "#" || k + 1 != levels.len());
                    let bad_plus = l.contains('+') && *l != "+";
                    if bad_hash || bad_plus {
                        return field_err(
                            format!("{at}.filter"),
                            format!(
                                "{:?}: '+' must be a whole level, '#' the whole last level",
                                t.filter
                            ),
                        );
                    }
                }
                match (&t.device, t.device_level) {
                    (Some(d), None) => {
                        if self.device(d).is_none() {
                            return field_err(
                                format!("{at}.device"),
                                format!(
                                    "unknown device {:?}: not in [[ingest.devices]]",
                                    d.as_str()
                                ),
                            );
                        }
                    }
                    (None, Some(l)) => {
                        let l = l as usize;
                        let ok = levels.get(l).is_some_and(|s| *s != "#")
                            || levels.last() == Some(&"#") && l + 1 >= levels.len();
                        if !ok {
                            return field_err(
                                format!("{at}.device_level"),
                                format!("the filter {:?} has no level {l}", t.filter),
                            );
                        }
                    }
                    _ => {
                        return field_err(
                            format!("{at}.device"),
                            "set exactly one of device and device_level",
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> IngestSection {
        toml::from_str(text).unwrap()
    }

    const GOOD: &str = r#"
[mqtt]
broker = "127.0.0.1:1883"
client_id = "edge-1"
topics = [ { filter = "plant/+/telemetry", device_level = 1 } ]

[[profiles]]
name = "room"
timestamp = { field = "ts", format = "unix_ms" }
metrics = [ { name = "temperature", aliases = ["temp_f"], unit = "fahrenheit", min = -40.0, max = 140.0, required = true } ]

[[devices]]
id = "room-9"
profile = "room"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#;

    #[test]
    fn good_section_validates() {
        let s = parse(GOOD);
        s.validate().unwrap();
        assert_eq!(s.profile("room").unwrap().metrics[0].unit, Unit::Fahrenheit);
        assert_eq!(s.max_body_bytes, 256 * 1024);
    }

    fn field_of(text: &str) -> String {
        parse(text).validate().unwrap_err().0
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(&GOOD.replace("profile = \"room\"", "profile = \"rom\"")),
            "ingest.devices[0].profile"
        );
        assert_eq!(
            field_of(&GOOD.replace("0f00a08", "0f00a0")),
            "ingest.devices[0].token_sha256"
        );
        assert_eq!(
            field_of(&GOOD.replace("device_level = 1", "device_level = 5")),
            "ingest.mqtt.topics[0].device_level"
        );
        assert_eq!(
            field_of(&GOOD.replace("plant/+/telemetry", "plant/a+/telemetry")),
            "ingest.mqtt.topics[0].filter"
        );
        assert_eq!(
            field_of(&GOOD.replace("127.0.0.1:1883", "localhost")),
            "ingest.mqtt.broker"
        );
        assert_eq!(
            field_of(&GOOD.replace("min = -40.0", "min = 200.0")),
            "ingest.profiles[0].metrics[0].min"
        );
        assert_eq!(
            field_of(&GOOD.replace("aliases = [\"temp_f\"]", "aliases = [\"ts\"]")),
            "ingest.profiles[0].metrics[0].aliases"
        );
    }
}
