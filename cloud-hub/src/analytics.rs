//! Fleet analytics over telemetry rollups: de-duplication of late, repeated
//! and re-sent rollups, re-bucketing to hour/day, grouping by site or device
//! type, top-N devices, and fleet health. Pure: no IO, no clock reads.
//!
//! Rollups of one `(device, metric, window)` are written whole by the owning
//! edge, so a re-sent window *replaces* the earlier version instead of being
//! added to it. [`RollupIndex`] keeps exactly one version per key, chosen by a
//! total order ([`version_order`]) that does not depend on arrival order, and
//! every aggregate is folded in key order, so the answer to a query is the
//! same whatever order, delay or duplication the rollups arrived with.
//!
//! ```
//! use cloud_hub::analytics::{DeviceKey, Level, RollupIndex, TelemetryQuery};
//! use schemas::metrics::{Rollup, Sample};
//! use schemas::time::Timestamp;
//!
//! let key = DeviceKey::parse("acme", "site-1", "pump-1").unwrap();
//! let sample = Sample {
//!     schema_version: Default::default(),
//!     device: key.device.clone(),
//!     metric: "temp".into(),
//!     ts: Timestamp(1_700_000_030_000),
//!     value: 4.0,
//!     unit: Default::default(),
//! };
//! let mut idx = RollupIndex::default();
//! idx.insert(&key.tenant, &key.site, Rollup::of_sample(&sample, 60_000));
//! let q = TelemetryQuery { level: Level::Hour, ..TelemetryQuery::default() };
//! let series = idx.query(&q, &|_| None);
//! assert_eq!(series[0].points[0].count, 1);
//! ```

use std::cmp::Ordering;
use std::collections::BTreeMap;

use schemas::ids::IdError;
use schemas::metrics::{Rollup, Unit};
use schemas::time::Timestamp;
use schemas::{DeviceId, SiteId, TenantId};
use serde::{Deserialize, Serialize};

/// A device named across the fleet (device ids are unique within a site).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceKey {
    pub tenant: TenantId,
    pub site: SiteId,
    pub device: DeviceId,
}

impl DeviceKey {
    /// Build a key from three names, validating each.
    pub fn parse(tenant: &str, site: &str, device: &str) -> Result<DeviceKey, IdError> {
        Ok(DeviceKey {
            tenant: TenantId::new(tenant)?,
            site: SiteId::new(site)?,
            device: DeviceId::new(device)?,
        })
    }
}

impl std::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.site, self.device)
    }
}

/// Time resolution of a telemetry answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    #[default]
    Minute,
    Hour,
    Day,
}

impl Level {
    /// Bucket width in milliseconds.
    pub fn window_ms(self) -> i64 {
        match self {
            Level::Minute => 60_000,
            Level::Hour => 3_600_000,
            Level::Day => 86_400_000,
        }
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minute" => Ok(Level::Minute),
            "hour" => Ok(Level::Hour),
            "day" => Ok(Level::Day),
            _ => Err(format!("{s:?} is not one of minute, hour, day")),
        }
    }
}

/// How series are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// One series per device and metric.
    #[default]
    Device,
    /// One series per (tenant, site) and metric.
    Site,
    /// One series per device type and metric, across the selected fleet.
    DeviceType,
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "device" => Ok(GroupBy::Device),
            "site" => Ok(GroupBy::Site),
            "device_type" => Ok(GroupBy::DeviceType),
            _ => Err(format!("{s:?} is not one of device, site, device_type")),
        }
    }
}

/// A telemetry query. `None` filters match everything; the time range is
/// half-open `[from, to)` on the source rollups' `window_start`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TelemetryQuery {
    pub tenant: Option<TenantId>,
    pub site: Option<SiteId>,
    pub device: Option<DeviceId>,
    pub metric: Option<String>,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    pub level: Level,
    pub group_by: GroupBy,
}

impl TelemetryQuery {
    fn matches(&self, key: &RollupKey) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == key.device.tenant)
            && self.site.as_ref().is_none_or(|s| *s == key.device.site)
            && self.device.as_ref().is_none_or(|d| *d == key.device.device)
            && self.metric.as_ref().is_none_or(|m| *m == key.metric)
            && self.from.is_none_or(|f| key.window_start >= f)
            && self.to.is_none_or(|t| key.window_start < t)
    }
}

/// What a series is about. Fields that the grouping does not use are `None`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
}

/// One bucket of a series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub window_start: Timestamp,
    pub window_ms: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub mean: Option<f64>,
    pub first: f64,
    pub last: f64,
    /// Some source window was measured with an unsynchronised clock.
    pub clock_unsynced: bool,
}

impl Point {
    fn of(r: &Rollup) -> Point {
        Point {
            window_start: r.window_start,
            window_ms: r.window_ms,
            count: r.count,
            min: r.min,
            max: r.max,
            sum: r.sum,
            mean: r.mean(),
            first: r.first,
            last: r.last,
            clock_unsynced: r.clock_unsynced,
        }
    }
}

/// A time series for one group and metric, points ascending by time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub group: GroupKey,
    pub metric: String,
    pub unit: Unit,
    pub points: Vec<Point>,
}

/// The identity of one rollup window.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RollupKey {
    device: DeviceKey,
    metric: String,
    window_start: Timestamp,
    window_ms: i64,
}

/// What [`RollupIndex::insert`] did with a rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// First version of this window.
    New,
    /// Replaced an older version of the window.
    Replaced,
    /// The same or an older version was already held: nothing changed.
    Ignored,
}

/// The total order that decides which of two versions of one window is the
/// newer: more samples first (windows only grow), then later last sample,
/// then a tie-break on the bits of every value so that two conflicting
/// versions are always resolved the same way.
pub fn version_order(a: &Rollup, b: &Rollup) -> Ordering {
    let k = |r: &Rollup| {
        (
            r.count,
            r.last_ts,
            std::cmp::Reverse(r.first_ts),
            r.sum.to_bits(),
            r.min.to_bits(),
            r.max.to_bits(),
            r.first.to_bits(),
            r.last.to_bits(),
            r.clock_unsynced,
        )
    };
    k(a).cmp(&k(b))
}

/// One version per `(device, metric, window)`, whatever the arrival order.
#[derive(Debug, Clone, Default)]
pub struct RollupIndex {
    windows: BTreeMap<RollupKey, Rollup>,
}

impl RollupIndex {
    /// Add one rollup from a site's telemetry; a newer version of a held
    /// window replaces it, an older or identical one is ignored.
    pub fn insert(&mut self, tenant: &TenantId, site: &SiteId, rollup: Rollup) -> InsertOutcome {
        let key = RollupKey {
            device: DeviceKey {
                tenant: tenant.clone(),
                site: site.clone(),
                device: rollup.device.clone(),
            },
            metric: rollup.metric.clone(),
            window_start: rollup.window_start,
            window_ms: rollup.window_ms,
        };
        match self.windows.get_mut(&key) {
            None => {
                self.windows.insert(key, rollup);
                InsertOutcome::New
            }
            Some(held) if version_order(&rollup, held) == Ordering::Greater => {
                *held = rollup;
                InsertOutcome::Replaced
            }
            Some(_) => InsertOutcome::Ignored,
        }
    }

    /// Number of distinct windows held.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Series matching `q`, re-bucketed to `q.level` and grouped by
    /// `q.group_by`. `device_type` names a device's type (for grouping by
    /// type; unknown devices group under `"unknown"`). Output is sorted by
    /// group, then metric; points ascend by time.
    pub fn query(
        &self,
        q: &TelemetryQuery,
        device_type: &dyn Fn(&DeviceKey) -> Option<String>,
    ) -> Vec<Series> {
        let width = q.level.window_ms();
        // One accumulator per (group, metric): bucket start -> merged rollup.
        // Folding happens in key order of `self.windows`, so float sums are
        // bit-identical whatever order the rollups arrived in. Windows come
        // sorted by (device, metric, start), so the group is worked out once
        // per run of one device's metric, not once per window.
        let mut index: BTreeMap<(GroupKey, String), usize> = BTreeMap::new();
        let mut series: Vec<(Unit, BTreeMap<Timestamp, Rollup>)> = Vec::new();
        let mut current: Option<(&DeviceKey, &str, usize)> = None;
        for (key, r) in self.scan(q) {
            let slot = match current {
                Some((d, m, i)) if d == &key.device && m == key.metric => i,
                _ => {
                    let group = self.group_of(q.group_by, &key.device, device_type);
                    let next = series.len();
                    let i = *index.entry((group, key.metric.clone())).or_insert(next);
                    if i == next {
                        series.push((r.unit, BTreeMap::new()));
                    }
                    current = Some((&key.device, key.metric.as_str(), i));
                    i
                }
            };
            let bucket = key.window_start.window_start(width);
            let buckets = &mut series[slot].1;
            match buckets.get_mut(&bucket) {
                Some(b) => b.merge(r),
                None => {
                    let mut b = r.clone();
                    b.window_start = bucket;
                    b.window_ms = width.max(r.window_ms);
                    buckets.insert(bucket, b);
                }
            }
        }
        index
            .into_iter()
            .map(|((group, metric), i)| {
                let (unit, buckets) = std::mem::take(&mut series[i]);
                Series {
                    group,
                    metric,
                    unit,
                    points: buckets.values().map(Point::of).collect(),
                }
            })
            .collect()
    }

    /// Windows matching `q`, in key order; a range scan when `q` names one
    /// device.
    fn scan<'a>(
        &'a self,
        q: &'a TelemetryQuery,
    ) -> Box<dyn Iterator<Item = (&'a RollupKey, &'a Rollup)> + 'a> {
        match (&q.tenant, &q.site, &q.device) {
            (Some(t), Some(s), Some(d)) => {
                let device = DeviceKey {
                    tenant: t.clone(),
                    site: s.clone(),
                    device: d.clone(),
                };
                let from = RollupKey {
                    device: device.clone(),
                    metric: String::new(),
                    window_start: Timestamp(i64::MIN),
                    window_ms: i64::MIN,
                };
                Box::new(
                    self.windows
                        .range(from..)
                        .take_while(move |(k, _)| k.device == device)
                        .filter(|(k, _)| q.matches(k)),
                )
            }
            _ => Box::new(self.windows.iter().filter(|(k, _)| q.matches(k))),
        }
    }

    fn group_of(
        &self,
        by: GroupBy,
        key: &DeviceKey,
        device_type: &dyn Fn(&DeviceKey) -> Option<String>,
    ) -> GroupKey {
        match by {
            GroupBy::Device => GroupKey {
                tenant: Some(key.tenant.clone()),
                site: Some(key.site.clone()),
                device: Some(key.device.clone()),
                device_type: None,
            },
            GroupBy::Site => GroupKey {
                tenant: Some(key.tenant.clone()),
                site: Some(key.site.clone()),
                device: None,
                device_type: None,
            },
            GroupBy::DeviceType => GroupKey {
                tenant: None,
                site: None,
                device: None,
                device_type: Some(device_type(key).unwrap_or_else(|| "unknown".to_string())),
            },
        }
    }

    /// The `n` devices with the largest `stat` of `metric` over the windows
    /// matching `q` (its `metric`, `level` and `group_by` are ignored).
    /// Ties are broken by device key, so the answer is deterministic.
    pub fn top_devices(
        &self,
        q: &TelemetryQuery,
        metric: &str,
        stat: Stat,
        n: usize,
    ) -> Vec<DeviceStat> {
        // Windows come sorted by device, so each device's windows are one run.
        let mut per: Vec<(&DeviceKey, Rollup)> = Vec::new();
        let q = TelemetryQuery {
            metric: Some(metric.to_string()),
            ..q.clone()
        };
        for (key, r) in self.scan(&q) {
            match per.last_mut() {
                Some((d, acc)) if *d == &key.device => acc.merge(r),
                _ => per.push((&key.device, r.clone())),
            }
        }
        let mut out: Vec<DeviceStat> = per
            .into_iter()
            .filter_map(|(k, r)| {
                stat.of(&r).map(|value| DeviceStat {
                    device: k.clone(),
                    value,
                    count: r.count,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.value
                .total_cmp(&a.value)
                .then_with(|| a.device.cmp(&b.device))
        });
        out.truncate(n);
        out
    }
}

/// A statistic of a merged rollup, for ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    Mean,
    Min,
    Max,
    Sum,
    Count,
    Last,
}

impl Stat {
    fn of(self, r: &Rollup) -> Option<f64> {
        match self {
            Stat::Mean => r.mean(),
            Stat::Min => Some(r.min),
            Stat::Max => Some(r.max),
            Stat::Sum => Some(r.sum),
            Stat::Count => Some(r.count as f64),
            Stat::Last => Some(r.last),
        }
    }
}

impl std::str::FromStr for Stat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "mean" => Stat::Mean,
            "min" => Stat::Min,
            "max" => Stat::Max,
            "sum" => Stat::Sum,
            "count" => Stat::Count,
            "last" => Stat::Last,
            _ => {
                return Err(format!(
                    "{s:?} is not one of mean, min, max, sum, count, last"
                ));
            }
        })
    }
}

/// One device's statistic in a top-N answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStat {
    pub device: DeviceKey,
    pub value: f64,
    /// Samples behind the value.
    pub count: u64,
}

/// What the hub knows about one edge's sync state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeStatus {
    /// Endpoint id (hex) of the edge.
    pub endpoint: String,
    pub tenant: TenantId,
    pub site: SiteId,
    /// Last time the hub heard from it.
    pub last_seen: Option<Timestamp>,
    /// Replication lag reported by the sync layer: age of the newest change
    /// the hub has applied from this edge, in milliseconds.
    pub lag_ms: Option<i64>,
    /// Documents whose heads differ between the edge and the hub.
    pub docs_behind: u64,
    /// Bytes queued for this edge.
    pub bytes_queued: u64,
}

/// One edge's health at a point in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeHealth {
    #[serde(flatten)]
    pub status: EdgeStatus,
    pub online: bool,
    /// Milliseconds since it was last seen (`None`: never).
    pub seen_ago_ms: Option<i64>,
}

/// Fleet health summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetHealth {
    pub online: usize,
    pub offline: usize,
    pub docs_behind: u64,
    pub bytes_queued: u64,
    /// Per edge, sorted by (tenant, site, endpoint).
    pub edges: Vec<EdgeHealth>,
}

/// Fleet health at `now`: an edge is online when it was seen less than
/// `offline_after_ms` ago (a clock that runs backwards counts as seen now).
pub fn fleet_health(edges: &[EdgeStatus], now: Timestamp, offline_after_ms: i64) -> FleetHealth {
    let mut out: Vec<EdgeHealth> = edges
        .iter()
        .map(|e| {
            let ago = e.last_seen.map(|t| (now.0 - t.0).max(0));
            EdgeHealth {
                status: e.clone(),
                online: ago.is_some_and(|a| a < offline_after_ms),
                seen_ago_ms: ago,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.status.tenant, &a.status.site, &a.status.endpoint).cmp(&(
            &b.status.tenant,
            &b.status.site,
            &b.status.endpoint,
        ))
    });
    let online = out.iter().filter(|e| e.online).count();
    FleetHealth {
        online,
        offline: out.len() - online,
        docs_behind: out.iter().map(|e| e.status.docs_behind).sum(),
        bytes_queued: out.iter().map(|e| e.status.bytes_queued).sum(),
        edges: out,
    }
}
