//! Perimeter rules, sans-IO: payload bytes of a known device in, normalised
//! samples (with their deduplication keys) or a rejection naming the field out.
//!
//! A payload is accepted whole or refused whole: one bad field refuses the
//! message, so a device never has half a message stored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use schemas::ids::DeviceId;
use schemas::ingest::{
    IngestDevice, IngestProfile, IngestSection, MetricRule, PayloadFormat, TimestampFormat,
    ValueKind,
};
use schemas::metrics::Sample;
use schemas::time::{Day, MS_PER_DAY, Timestamp};
use schemas::version::SchemaVersion;
use serde_json::Value;

/// Why a payload was refused: the field at fault (when there is one) and a
/// sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reject {
    pub(crate) field: Option<String>,
    pub(crate) reason: String,
}

impl Reject {
    pub(crate) fn at(field: impl Into<String>, reason: impl Into<String>) -> Reject {
        Reject {
            field: Some(field.into()),
            reason: reason.into(),
        }
    }
    pub(crate) fn whole(reason: impl Into<String>) -> Reject {
        Reject {
            field: None,
            reason: reason.into(),
        }
    }
}

/// What makes two samples "the same" for deduplication.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum KeyRef {
    /// The sample's own timestamp (ms).
    Ts(i64),
    /// A message id from the payload.
    Id(String),
}

/// Dedupe key: `(device, metric, timestamp or message id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DedupeKey {
    pub(crate) device: DeviceId,
    pub(crate) metric: String,
    pub(crate) at: KeyRef,
}

/// A normalised sample and its dedupe key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Keyed {
    pub(crate) sample: Sample,
    pub(crate) key: DedupeKey,
}

/// A profile compiled for lookups.
#[derive(Debug)]
pub(crate) struct ProfileRules {
    pub(crate) profile: IngestProfile,
    /// Payload field name or alias -> metric index.
    by_field: HashMap<String, usize>,
    /// Metric name, field or alias -> metric index (HTTP batches name metrics).
    by_name: HashMap<String, usize>,
    ignore: HashSet<String>,
}

impl ProfileRules {
    pub(crate) fn new(p: &IngestProfile) -> ProfileRules {
        let mut by_field = HashMap::new();
        let mut by_name = HashMap::new();
        for (i, m) in p.metrics.iter().enumerate() {
            let field = m.field.clone().unwrap_or_else(|| m.name.clone());
            by_field.insert(field.clone(), i);
            by_name.insert(field, i);
            for a in &m.aliases {
                by_field.insert(a.clone(), i);
                by_name.insert(a.clone(), i);
            }
            by_name.insert(m.name.clone(), i);
        }
        ProfileRules {
            profile: p.clone(),
            by_field,
            by_name,
            ignore: p.ignore_fields.iter().cloned().collect(),
        }
    }
}

/// A pushing device's rules.
#[derive(Debug, Clone)]
pub(crate) struct DeviceRules {
    pub(crate) cfg: IngestDevice,
    pub(crate) rules: Arc<ProfileRules>,
}

/// Every pushing device's rules, built from a validated `[ingest]` section.
#[derive(Debug)]
pub(crate) struct Perimeter {
    pub(crate) devices: HashMap<DeviceId, DeviceRules>,
    /// SHA-256 (lowercase hex) of a token -> its device.
    pub(crate) tokens: HashMap<String, DeviceId>,
    pub(crate) max_future_ms: i64,
}

impl Perimeter {
    pub(crate) fn new(cfg: &IngestSection) -> Perimeter {
        let profiles: HashMap<&str, Arc<ProfileRules>> = cfg
            .profiles
            .iter()
            .map(|p| (p.name.as_str(), Arc::new(ProfileRules::new(p))))
            .collect();
        let mut devices = HashMap::new();
        let mut tokens = HashMap::new();
        for d in &cfg.devices {
            // validate() guarantees the profile exists; a device without one
            // is simply not a pushing device.
            if let Some(rules) = profiles.get(d.profile.as_str()) {
                devices.insert(
                    d.id.clone(),
                    DeviceRules {
                        cfg: d.clone(),
                        rules: rules.clone(),
                    },
                );
                if let Some(h) = &d.token_sha256 {
                    tokens.insert(h.to_ascii_lowercase(), d.id.clone());
                }
            }
        }
        Perimeter {
            devices,
            tokens,
            max_future_ms: i64::try_from(cfg.max_future_s.saturating_mul(1000)).unwrap_or(i64::MAX),
        }
    }
}

fn check_future(
    ts: Timestamp,
    now: Timestamp,
    max_future_ms: i64,
    field: &str,
) -> Result<(), Reject> {
    if now.is_plausible() && ts.0 > now.0.saturating_add(max_future_ms) {
        return Err(Reject::at(
            field,
            format!(
                "timestamp {ts} is more than {} s ahead of the edge clock ({now})",
                max_future_ms / 1000
            ),
        ));
    }
    Ok(())
}

/// Check one value against its rule and normalise it to the canonical unit.
fn value_of(
    m: &MetricRule,
    v: &Value,
    field: &str,
) -> Result<(f64, schemas::metrics::Unit), Reject> {
    let x = match (m.kind, v) {
        (ValueKind::Boolean, Value::Bool(b)) => f64::from(u8::from(*b)),
        (ValueKind::Boolean, _) => {
            return Err(Reject::at(
                field,
                format!("expected true or false, got {}", short(v)),
            ));
        }
        (ValueKind::Number | ValueKind::Integer, Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() => x,
            _ => return Err(Reject::at(field, format!("{n} is not a finite number"))),
        },
        (ValueKind::Number | ValueKind::Integer, _) => {
            return Err(Reject::at(
                field,
                format!("expected a number, got {}", short(v)),
            ));
        }
    };
    number_ok(m, x, field)
}

fn number_ok(m: &MetricRule, x: f64, field: &str) -> Result<(f64, schemas::metrics::Unit), Reject> {
    if !x.is_finite() {
        return Err(Reject::at(field, format!("{x} is not a finite number")));
    }
    if m.kind == ValueKind::Integer && x.fract() != 0.0 {
        return Err(Reject::at(field, format!("{x} is not an integer")));
    }
    if let Some(lo) = m.min
        && x < lo
    {
        return Err(Reject::at(field, format!("{x} is below the minimum {lo}")));
    }
    if let Some(hi) = m.max
        && x > hi
    {
        return Err(Reject::at(field, format!("{x} is above the maximum {hi}")));
    }
    let (u, y) = m.unit.to_canonical(x);
    Ok((y, u))
}

fn short(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 40 {
        let mut cut = 40;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Parse a timestamp value in `format`.
pub(crate) fn parse_ts(
    v: &Value,
    format: TimestampFormat,
    field: &str,
) -> Result<Timestamp, Reject> {
    match (format, v) {
        (TimestampFormat::UnixMs, Value::Number(n)) => match n.as_i64() {
            Some(ms) => Ok(Timestamp(ms)),
            None => match n.as_f64() {
                Some(f) if f.is_finite() && f.abs() < 1e17 => Ok(Timestamp(f.round() as i64)),
                _ => Err(Reject::at(field, format!("{n} is not a unix time in ms"))),
            },
        },
        (TimestampFormat::UnixS, Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() && f.abs() < 1e14 => {
                Ok(Timestamp((f * 1000.0).round() as i64))
            }
            _ => Err(Reject::at(field, format!("{n} is not a unix time in s"))),
        },
        (TimestampFormat::Rfc3339, Value::String(s)) => parse_rfc3339(s)
            .map_err(|why| Reject::at(field, format!("{s:?} is not RFC 3339: {why}"))),
        (TimestampFormat::Rfc3339, _) => Err(Reject::at(
            field,
            format!("expected an RFC 3339 string, got {}", short(v)),
        )),
        (_, _) => Err(Reject::at(
            field,
            format!("expected a number ({format:?}), got {}", short(v)),
        )),
    }
}

/// Parse `YYYY-MM-DD(T| )HH:MM:SS(.fraction)?(Z|±HH:MM)` into ms since the epoch.
pub(crate) fn parse_rfc3339(s: &str) -> Result<Timestamp, &'static str> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err("too short");
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, &'static str> {
        let t = s.get(r).ok_or("bad field")?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return Err("expected digits");
        }
        t.parse::<i64>().map_err(|_| "expected digits")
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err("expected yyyy-mm-ddThh:mm:ss");
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let day = Day::new(
        i32::try_from(y).map_err(|_| "bad year")?,
        u8::try_from(mo).map_err(|_| "bad month")?,
        u8::try_from(d).map_err(|_| "bad day")?,
    )
    .ok_or("no such date")?;
    if h > 23 || mi > 59 || sec > 60 {
        return Err("time out of range");
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                ms = ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err("empty fraction");
        }
        for _ in (i - start)..3 {
            ms *= 10;
        }
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return Err("offset out of range");
            }
            let o = oh * 60 + om;
            if sign == b'-' { -o } else { o }
        }
        _ => return Err("expected Z or an offset like +01:00"),
    };
    let secs = h * 3600 + mi * 60 + sec.min(59);
    Ok(Timestamp(
        day.days_since_epoch() * MS_PER_DAY + secs * 1000 + ms - offset_min * 60_000,
    ))
}

/// Map one JSON object (one reading of several metrics) of `device`.
fn map_object(
    dev: &DeviceRules,
    obj: &serde_json::Map<String, Value>,
    prefix: &str,
    now: Timestamp,
    max_future_ms: i64,
    out: &mut Vec<Keyed>,
) -> Result<(), Reject> {
    let p = &dev.rules.profile;
    let path = |k: &str| format!("{prefix}{k}");
    let ts = match &p.timestamp.field {
        None => now,
        Some(f) => match obj.get(f) {
            Some(v) => {
                let ts = parse_ts(v, p.timestamp.format, &path(f))?;
                check_future(ts, now, max_future_ms, &path(f))?;
                ts
            }
            None => return Err(Reject::at(path(f), "required timestamp field is missing")),
        },
    };
    let msg_id = match &p.message_id_field {
        None => None,
        Some(f) => match obj.get(f) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(v) => {
                return Err(Reject::at(
                    path(f),
                    format!("expected a message id, got {}", short(v)),
                ));
            }
            None => return Err(Reject::at(path(f), "required message id field is missing")),
        },
    };
    let mut seen = vec![false; p.metrics.len()];
    let start = out.len();
    for (k, v) in obj {
        if p.timestamp.field.as_deref() == Some(k.as_str())
            || p.message_id_field.as_deref() == Some(k.as_str())
            || dev.rules.ignore.contains(k)
        {
            continue;
        }
        let Some(&i) = dev.rules.by_field.get(k) else {
            return Err(Reject::at(
                path(k),
                "unknown field: not in the device's profile",
            ));
        };
        let m = &p.metrics[i];
        if std::mem::replace(&mut seen[i], true) {
            return Err(Reject::at(
                path(k),
                format!("metric {:?} given twice (field and alias)", m.name),
            ));
        }
        if v.is_null() {
            return Err(Reject::at(path(k), "value is null"));
        }
        let (value, unit) = value_of(m, v, &path(k))?;
        out.push(Keyed {
            sample: Sample {
                schema_version: SchemaVersion::default(),
                device: dev.cfg.id.clone(),
                metric: m.name.clone(),
                ts,
                value,
                unit,
            },
            key: DedupeKey {
                device: dev.cfg.id.clone(),
                metric: m.name.clone(),
                at: msg_id.clone().map_or(KeyRef::Ts(ts.0), KeyRef::Id),
            },
        });
    }
    for (i, m) in p.metrics.iter().enumerate() {
        if m.required && !seen[i] {
            let f = m.field.as_deref().unwrap_or(&m.name);
            return Err(Reject::at(path(f), "required field is missing"));
        }
    }
    if out.len() == start {
        return Err(Reject::whole(format!(
            "{}no metric field: expected one of {:?}",
            if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}: ")
            },
            p.metrics
                .iter()
                .map(|m| m.field.as_deref().unwrap_or(&m.name))
                .collect::<Vec<_>>()
        )));
    }
    Ok(())
}

/// Map an MQTT payload of `device` (JSON object, array of objects, or a
/// plain number) to samples.
pub(crate) fn map_payload(
    dev: &DeviceRules,
    payload: &[u8],
    now: Timestamp,
    max_future_ms: i64,
) -> Result<Vec<Keyed>, Reject> {
    let p = &dev.rules.profile;
    let mut out = Vec::new();
    match p.format {
        PayloadFormat::Number => {
            let m = p
                .metrics
                .first()
                .ok_or_else(|| Reject::whole("profile has no metric"))?;
            let text = std::str::from_utf8(payload)
                .map_err(|_| Reject::whole("payload is not UTF-8 text"))?
                .trim();
            let x = match (m.kind, text) {
                (ValueKind::Boolean, "true" | "1") => 1.0,
                (ValueKind::Boolean, "false" | "0") => 0.0,
                (ValueKind::Boolean, _) => {
                    return Err(Reject::at(
                        &m.name,
                        format!("{text:?} is not true or false"),
                    ));
                }
                _ => text
                    .parse::<f64>()
                    .map_err(|_| Reject::at(&m.name, format!("{text:?} is not a number")))?,
            };
            let (value, unit) = number_ok(m, x, &m.name)?;
            out.push(Keyed {
                sample: Sample {
                    schema_version: SchemaVersion::default(),
                    device: dev.cfg.id.clone(),
                    metric: m.name.clone(),
                    ts: now,
                    value,
                    unit,
                },
                key: DedupeKey {
                    device: dev.cfg.id.clone(),
                    metric: m.name.clone(),
                    at: KeyRef::Ts(now.0),
                },
            });
        }
        PayloadFormat::Json => {
            let v: Value = serde_json::from_slice(payload)
                .map_err(|e| Reject::whole(format!("payload is not JSON: {e}")))?;
            match v {
                Value::Object(o) => map_object(dev, &o, "", now, max_future_ms, &mut out)?,
                Value::Array(items) => {
                    if items.is_empty() {
                        return Err(Reject::whole("empty array: no readings"));
                    }
                    for (i, it) in items.iter().enumerate() {
                        let Value::Object(o) = it else {
                            return Err(Reject::at(format!("[{i}]"), "expected a JSON object"));
                        };
                        map_object(dev, o, &format!("[{i}]."), now, max_future_ms, &mut out)?;
                    }
                }
                other => {
                    return Err(Reject::whole(format!(
                        "expected a JSON object or array of objects, got {}",
                        short(&other)
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// Map an HTTP batch body (`{"samples": [{"metric", "value", "ts"?, "id"?}]}`)
/// of `device` to samples. Field paths are `samples[i].value` and so on.
pub(crate) fn map_batch(
    dev: &DeviceRules,
    body: &[u8],
    now: Timestamp,
    max_future_ms: i64,
) -> Result<Vec<Keyed>, Reject> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Reject::whole(format!("body is not JSON: {e}")))?;
    let Value::Object(top) = v else {
        return Err(Reject::whole("expected a JSON object {\"samples\": [...]}"));
    };
    if let Some(k) = top.keys().find(|k| *k != "samples") {
        return Err(Reject::at(
            k.clone(),
            "unknown field: expected only \"samples\"",
        ));
    }
    let Some(samples) = top.get("samples") else {
        return Err(Reject::at("samples", "required field is missing"));
    };
    let Value::Array(items) = samples else {
        return Err(Reject::at("samples", "expected an array"));
    };
    if items.is_empty() {
        return Err(Reject::at("samples", "empty batch"));
    }
    let p = &dev.rules.profile;
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let at = |k: &str| format!("samples[{i}].{k}");
        let Value::Object(o) = it else {
            return Err(Reject::at(format!("samples[{i}]"), "expected an object"));
        };
        if let Some(k) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "metric" | "value" | "ts" | "id"))
        {
            return Err(Reject::at(
                at(k),
                "unknown field: expected metric, value, ts, id",
            ));
        }
        let metric = match o.get("metric") {
            Some(Value::String(s)) => s,
            Some(v) => {
                return Err(Reject::at(
                    at("metric"),
                    format!("expected a string, got {}", short(v)),
                ));
            }
            None => return Err(Reject::at(at("metric"), "required field is missing")),
        };
        let Some(&mi) = dev.rules.by_name.get(metric) else {
            return Err(Reject::at(
                at("metric"),
                format!("unknown metric {metric:?}: not in the device's profile"),
            ));
        };
        let m = &p.metrics[mi];
        let value = o
            .get("value")
            .ok_or_else(|| Reject::at(at("value"), "required field is missing"))?;
        let (value, unit) = value_of(m, value, &at("value"))?;
        let ts = match o.get("ts") {
            None | Some(Value::Null) => now,
            Some(v @ Value::String(_)) => parse_ts(v, TimestampFormat::Rfc3339, &at("ts"))?,
            Some(v) => {
                let f = match p.timestamp.format {
                    TimestampFormat::UnixS => TimestampFormat::UnixS,
                    _ => TimestampFormat::UnixMs,
                };
                parse_ts(v, f, &at("ts"))?
            }
        };
        check_future(ts, now, max_future_ms, &at("ts"))?;
        let key_at = match o.get("id") {
            None | Some(Value::Null) => KeyRef::Ts(ts.0),
            Some(Value::String(s)) if !s.is_empty() => KeyRef::Id(s.clone()),
            Some(v) => {
                return Err(Reject::at(
                    at("id"),
                    format!("expected a non-empty string, got {}", short(v)),
                ));
            }
        };
        out.push(Keyed {
            sample: Sample {
                schema_version: SchemaVersion::default(),
                device: dev.cfg.id.clone(),
                metric: m.name.clone(),
                ts,
                value,
                unit,
            },
            key: DedupeKey {
                device: dev.cfg.id.clone(),
                metric: m.name.clone(),
                at: key_at,
            },
        });
    }
    for m in &p.metrics {
        if m.required && !out.iter().any(|k| k.sample.metric == m.name) {
            return Err(Reject::at(
                "samples",
                format!("required metric {:?} is missing from the batch", m.name),
            ));
        }
    }
    Ok(out)
}

/// Token bucket: `rate` samples per second sustained, `burst` at once.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Take `n` tokens, or say how long until they would be there.
    pub(crate) fn try_take(&mut self, n: usize, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        let n = n as f64;
        if n <= self.tokens {
            self.tokens -= n;
            return Ok(());
        }
        let missing = n - self.tokens;
        Err(Duration::from_secs_f64(
            (missing / self.rate).clamp(0.001, 86_400.0),
        ))
    }
}

/// Whether an MQTT topic matches a filter (`+` one level, `#` the rest).
pub(crate) fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$'),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::metrics::Unit;

    fn section() -> IngestSection {
        toml::from_str(
            r#"
[[profiles]]
name = "room"
timestamp = { field = "ts", format = "unix_ms" }
ignore_fields = ["rssi"]
metrics = [
  { name = "temperature", aliases = ["temp_f"], unit = "fahrenheit", min = -40.0, max = 250.0, required = true },
  { name = "door", kind = "boolean" },
]
[[profiles]]
name = "plain"
format = "number"
metrics = [ { name = "level", unit = "percent", min = 0.0, max = 100.0 } ]
[[devices]]
id = "room-9"
profile = "room"
[[devices]]
id = "tank-1"
profile = "plain"
"#,
        )
        .unwrap()
    }

    fn dev(p: &Perimeter, id: &str) -> DeviceRules {
        p.devices[&DeviceId::new(id).unwrap()].clone()
    }

    const NOW: Timestamp = Timestamp(1_800_000_000_000);

    #[test]
    fn json_object_maps_aliases_units_and_timestamps() {
        let p = Perimeter::new(&section());
        let d = dev(&p, "room-9");
        let out = map_payload(
            &d,
            br#"{"temp_f": 212, "door": true, "rssi": -70, "ts": 1799999999000}"#,
            NOW,
            300_000,
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        let t = out
            .iter()
            .find(|k| k.sample.metric == "temperature")
            .unwrap();
        assert_eq!(t.sample.unit, Unit::Celsius);
        assert!((t.sample.value - 100.0).abs() < 1e-9);
        assert_eq!(t.sample.ts, Timestamp(1_799_999_999_000));
        assert_eq!(t.key.at, KeyRef::Ts(1_799_999_999_000));
        let door = out.iter().find(|k| k.sample.metric == "door").unwrap();
        assert_eq!(door.sample.value, 1.0);
    }

    #[test]
    fn rejections_name_the_field() {
        let p = Perimeter::new(&section());
        let d = dev(&p, "room-9");
        let f = |b: &[u8]| map_payload(&d, b, NOW, 300_000).unwrap_err();
        assert_eq!(
            f(br#"{"temperature": 500, "ts": 1}"#).field.as_deref(),
            Some("temperature")
        );
        assert!(
            f(br#"{"temperature": 500, "ts": 1}"#)
                .reason
                .contains("above the maximum")
        );
        assert_eq!(
            f(br#"{"temperature": "hot", "ts": 1}"#).field.as_deref(),
            Some("temperature")
        );
        assert_eq!(
            f(br#"{"door": true, "ts": 1}"#).field.as_deref(),
            Some("temperature")
        );
        assert_eq!(f(br#"{"temperature": 5}"#).field.as_deref(), Some("ts"));
        assert_eq!(
            f(br#"{"temperature": 5, "ts": 1, "humidity": 3}"#)
                .field
                .as_deref(),
            Some("humidity")
        );
        assert!(
            f(br#"{"temperature": 5, "temp_f": 5, "ts": 1}"#)
                .reason
                .contains("twice")
        );
        assert_eq!(
            f(br#"[{"temperature": 5, "ts": 1}, {"temperature": 5}]"#)
                .field
                .as_deref(),
            Some("[1].ts")
        );
        assert!(f(b"{not json").reason.contains("not JSON"));
        // Too far in the future.
        let e = f(format!(r#"{{"temperature": 5, "ts": {}}}"#, NOW.0 + 3_600_000).as_bytes());
        assert_eq!(e.field.as_deref(), Some("ts"));
    }

    #[test]
    fn plain_numbers_use_receipt_time() {
        let p = Perimeter::new(&section());
        let d = dev(&p, "tank-1");
        let out = map_payload(&d, b" 42.5\n", NOW, 300_000).unwrap();
        assert_eq!((out[0].sample.value, out[0].sample.ts), (42.5, NOW));
        assert_eq!(
            map_payload(&d, b"101", NOW, 0)
                .unwrap_err()
                .field
                .as_deref(),
            Some("level")
        );
        assert!(map_payload(&d, b"abc", NOW, 0).is_err());
    }

    #[test]
    fn http_batches_name_the_bad_field() {
        let p = Perimeter::new(&section());
        let d = dev(&p, "room-9");
        let ok = map_batch(
            &d,
            br#"{"samples":[{"metric":"temperature","value":32,"ts":"2027-01-15T08:00:00Z"},{"metric":"temp_f","value":50,"ts":1799999999000,"id":"m1"}]}"#,
            NOW,
            300_000,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert!(ok[0].sample.value.abs() < 1e-9);
        assert_eq!(ok[1].key.at, KeyRef::Id("m1".into()));
        let e = |b: &[u8]| map_batch(&d, b, NOW, 300_000).unwrap_err().field;
        assert_eq!(e(br#"{"samples":[{"metric":"temperature","value":32},{"metric":"temperature","value":"x"}]}"#).as_deref(), Some("samples[1].value"));
        assert_eq!(
            e(br#"{"samples":[{"metric":"nope","value":32}]}"#).as_deref(),
            Some("samples[0].metric")
        );
        assert_eq!(
            e(br#"{"samples":[{"metric":"temperature","valu":32}]}"#).as_deref(),
            Some("samples[0].valu")
        );
        assert_eq!(e(br#"{"sample":[]}"#).as_deref(), Some("sample"));
        assert_eq!(
            e(br#"{"samples":[{"metric":"temperature","value":1,"ts":"yesterday"}]}"#).as_deref(),
            Some("samples[0].ts")
        );
    }

    #[test]
    fn rfc3339_parses_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(Timestamp(0)));
        assert_eq!(
            parse_rfc3339("1970-01-01T01:00:00.5+01:00"),
            Ok(Timestamp(500))
        );
        assert_eq!(
            parse_rfc3339("2020-01-01T00:00:00.123456Z"),
            Ok(Timestamp(1_577_836_800_123))
        );
        assert_eq!(
            parse_rfc3339("2019-12-31T19:00:00-05:00"),
            Ok(Timestamp(1_577_836_800_000))
        );
        assert!(parse_rfc3339("2020-02-30T00:00:00Z").is_err());
        assert!(parse_rfc3339("2020-01-01T00:00:00").is_err());
        assert!(parse_rfc3339("2020-01-01T25:00:00Z").is_err());
    }

    #[test]
    fn token_bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 20.0, t0);
        assert!(b.try_take(20, t0).is_ok());
        let wait = b.try_take(5, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(b.try_take(5, t0 + Duration::from_millis(500)).is_ok());
        assert!(b.try_take(1, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn topic_filters_match() {
        assert!(topic_matches("plant/+/telemetry", "plant/room-9/telemetry"));
        assert!(!topic_matches("plant/+/telemetry", "plant/room-9/x"));
        assert!(topic_matches("plant/#", "plant/a/b/c"));
        assert!(topic_matches("plant/#", "plant"));
        assert!(!topic_matches("plant/+", "plant/a/b"));
        assert!(!topic_matches("#", "$SYS/x"));
    }
}
