//! Tests of fleet analytics: re-bucketing, grouping, version replacement,
//! top-N, fleet health, and order/duplication independence (property test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cloud_hub::analytics::{
    DeviceKey, EdgeStatus, GroupBy, InsertOutcome, Level, RollupIndex, Series, Stat,
    TelemetryQuery, fleet_health,
};
use proptest::prelude::*;
use schemas::metrics::{Rollup, Unit};
use schemas::time::Timestamp;
use schemas::{SiteId, TenantId};

const T0: i64 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000; // a UTC midnight

fn key(t: &str, s: &str, d: &str) -> DeviceKey {
    DeviceKey::parse(t, s, d).unwrap()
}

/// A minute rollup of `count` samples whose values are `base, base+1, ...`.
fn roll(k: &DeviceKey, metric: &str, minute: i64, count: u64, base: f64) -> Rollup {
    let start = T0 + minute * 60_000;
    let n = count as f64;
    Rollup {
        schema_version: Default::default(),
        device: k.device.clone(),
        metric: metric.into(),
        unit: Unit::Celsius,
        window_start: Timestamp(start),
        window_ms: 60_000,
        count,
        min: base,
        max: base + n - 1.0,
        sum: n * base + n * (n - 1.0) / 2.0,
        first: base,
        first_ts: Timestamp(start),
        last: base + n - 1.0,
        last_ts: Timestamp(start + count as i64 * 100),
        clock_unsynced: false,
    }
}

fn insert(idx: &mut RollupIndex, k: &DeviceKey, r: Rollup) -> InsertOutcome {
    idx.insert(&k.tenant, &k.site, r)
}

fn types(k: &DeviceKey) -> Option<String> {
    Some(
        if k.device.as_str().starts_with("pump") {
            "pump"
        } else {
            "cold-room"
        }
        .to_string(),
    )
}

#[test]
fn minute_rollups_rebucket_to_hours_and_days() {
    let a = key("acme", "s1", "pump-1");
    let mut idx = RollupIndex::default();
    // 90 minutes: 60 in the first hour, 30 in the second.
    for m in 0..90 {
        insert(&mut idx, &a, roll(&a, "temp", m, 2, m as f64));
    }
    let hour = idx.query(
        &TelemetryQuery {
            level: Level::Hour,
            ..Default::default()
        },
        &types,
    );
    assert_eq!(hour.len(), 1);
    let p = &hour[0].points;
    assert_eq!(p.len(), 2);
    assert_eq!((p[0].count, p[1].count), (120, 60));
    assert_eq!(p[0].window_start, Timestamp(T0));
    assert_eq!(p[0].window_ms, 3_600_000);
    assert_eq!((p[0].min, p[0].max), (0.0, 60.0));
    assert_eq!((p[1].first, p[1].last), (60.0, 90.0));
    let day = idx.query(
        &TelemetryQuery {
            level: Level::Day,
            ..Default::default()
        },
        &types,
    );
    assert_eq!(day[0].points.len(), 1);
    assert_eq!(day[0].points[0].count, 180);
    let total: f64 = (0..90).map(|m| 2.0 * m as f64 + 1.0).sum();
    assert_eq!(day[0].points[0].sum, total);
    // Time range is half-open on window start.
    let ranged = idx.query(
        &TelemetryQuery {
            level: Level::Day,
            from: Some(Timestamp(T0 + 10 * 60_000)),
            to: Some(Timestamp(T0 + 20 * 60_000)),
            ..Default::default()
        },
        &types,
    );
    assert_eq!(ranged[0].points[0].count, 20);
}

#[test]
fn grouping_by_site_and_device_type() {
    let devs = [
        key("acme", "s1", "pump-1"),
        key("acme", "s1", "room-1"),
        key("acme", "s2", "pump-1"),
        key("beta", "s1", "room-9"),
    ];
    let mut idx = RollupIndex::default();
    for (i, d) in devs.iter().enumerate() {
        insert(
            &mut idx,
            d,
            roll(d, "temp", 0, 1 + i as u64, 10.0 * i as f64),
        );
    }
    let by_site = idx.query(
        &TelemetryQuery {
            group_by: GroupBy::Site,
            ..Default::default()
        },
        &types,
    );
    let counts: Vec<(String, u64)> = by_site
        .iter()
        .map(|s| {
            (
                format!(
                    "{}/{}",
                    s.group.tenant.as_ref().unwrap(),
                    s.group.site.as_ref().unwrap()
                ),
                s.points[0].count,
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("acme/s1".into(), 3),
            ("acme/s2".into(), 3),
            ("beta/s1".into(), 4)
        ]
    );
    let by_type = idx.query(
        &TelemetryQuery {
            group_by: GroupBy::DeviceType,
            tenant: Some(TenantId::new("acme").unwrap()),
            ..Default::default()
        },
        &types,
    );
    let counts: Vec<(String, u64)> = by_type
        .iter()
        .map(|s| (s.group.device_type.clone().unwrap(), s.points[0].count))
        .collect();
    assert_eq!(counts, vec![("cold-room".into(), 2), ("pump".into(), 4)]);
}

#[test]
fn newer_version_of_a_window_replaces_older_in_either_order() {
    let a = key("acme", "s1", "pump-1");
    let old = roll(&a, "temp", 5, 3, 1.0);
    let new = roll(&a, "temp", 5, 7, 1.0);
    for order in [[&old, &new], [&new, &old]] {
        let mut idx = RollupIndex::default();
        let first = insert(&mut idx, &a, order[0].clone());
        let second = insert(&mut idx, &a, order[1].clone());
        assert_eq!(first, InsertOutcome::New);
        let expect = if order[1].count > order[0].count {
            InsertOutcome::Replaced
        } else {
            InsertOutcome::Ignored
        };
        assert_eq!(second, expect);
        assert_eq!(insert(&mut idx, &a, new.clone()), InsertOutcome::Ignored);
        let s = idx.query(&TelemetryQuery::default(), &types);
        assert_eq!(s[0].points[0].count, 7, "replaced, not added");
        assert_eq!(idx.len(), 1);
    }
}

#[test]
fn top_devices_ranks_by_statistic_with_stable_ties() {
    let mut idx = RollupIndex::default();
    let devs: Vec<DeviceKey> = (0..5)
        .map(|i| key("acme", "s1", &format!("d{i}")))
        .collect();
    let maxes = [5.0, 9.0, 9.0, 1.0, 7.0];
    for (d, m) in devs.iter().zip(maxes) {
        insert(&mut idx, d, roll(d, "temp", 0, 1, m));
        insert(&mut idx, d, roll(d, "hum", 0, 1, 100.0 - m));
    }
    let top = idx.top_devices(&TelemetryQuery::default(), "temp", Stat::Max, 3);
    let names: Vec<&str> = top.iter().map(|s| s.device.device.as_str()).collect();
    assert_eq!(names, vec!["d1", "d2", "d4"]);
    assert_eq!(top[0].value, 9.0);
    let top_site2 = idx.top_devices(
        &TelemetryQuery {
            site: Some(SiteId::new("s2").unwrap()),
            ..Default::default()
        },
        "temp",
        Stat::Max,
        3,
    );
    assert!(top_site2.is_empty());
}

#[test]
fn fleet_health_counts_online_and_offline() {
    let e = |ep: &str, seen: Option<i64>, behind: u64| EdgeStatus {
        endpoint: ep.into(),
        tenant: TenantId::new("acme").unwrap(),
        site: SiteId::new("s1").unwrap(),
        last_seen: seen.map(Timestamp),
        lag_ms: Some(10),
        docs_behind: behind,
        bytes_queued: 100,
    };
    let now = Timestamp(1_000_000);
    let h = fleet_health(
        &[
            e("c", Some(999_000), 1),
            e("a", Some(900_000), 2),
            e("b", None, 3),
        ],
        now,
        60_000,
    );
    assert_eq!((h.online, h.offline), (1, 2));
    assert_eq!((h.docs_behind, h.bytes_queued), (6, 300));
    let eps: Vec<&str> = h.edges.iter().map(|e| e.status.endpoint.as_str()).collect();
    assert_eq!(eps, vec!["a", "b", "c"]);
    assert_eq!(h.edges[0].seen_ago_ms, Some(100_000));
    assert!(h.edges[2].online);
}

fn all_answers(idx: &RollupIndex) -> Vec<Vec<Series>> {
    let mut out = Vec::new();
    for level in [Level::Minute, Level::Hour, Level::Day] {
        for group_by in [GroupBy::Device, GroupBy::Site, GroupBy::DeviceType] {
            out.push(idx.query(
                &TelemetryQuery {
                    level,
                    group_by,
                    ..Default::default()
                },
                &types,
            ));
        }
    }
    // One named device (the range-scan path) and one tenant.
    let one = key("acme", "s1", "pump-1");
    out.push(idx.query(
        &TelemetryQuery {
            tenant: Some(one.tenant.clone()),
            site: Some(one.site.clone()),
            device: Some(one.device.clone()),
            level: Level::Hour,
            ..Default::default()
        },
        &types,
    ));
    out.push(idx.query(
        &TelemetryQuery {
            tenant: Some(one.tenant),
            metric: Some("temp".into()),
            group_by: GroupBy::Site,
            ..Default::default()
        },
        &types,
    ));
    out
}

#[test]
fn a_named_device_query_equals_the_filtered_fleet_query() {
    let mut idx = RollupIndex::default();
    let devs = [
        key("acme", "s1", "a"),
        key("acme", "s1", "b"),
        key("acme", "s2", "a"),
    ];
    for (i, d) in devs.iter().enumerate() {
        for m in 0..5 {
            insert(&mut idx, d, roll(d, "temp", m, 1 + i as u64, m as f64));
            insert(&mut idx, d, roll(d, "power", m, 2, 1.0));
        }
    }
    let all = idx.query(&TelemetryQuery::default(), &types);
    let one = idx.query(
        &TelemetryQuery {
            tenant: Some(devs[1].tenant.clone()),
            site: Some(devs[1].site.clone()),
            device: Some(devs[1].device.clone()),
            ..Default::default()
        },
        &types,
    );
    let expect: Vec<Series> = all
        .into_iter()
        .filter(|s| {
            s.group.site == Some(devs[1].site.clone())
                && s.group.device == Some(devs[1].device.clone())
        })
        .collect();
    assert_eq!(one.len(), 2);
    assert_eq!(one, expect);
}

proptest! {
    /// A query over rollups delivered late, out of order, duplicated and
    /// interleaved with older versions of their windows answers exactly as
    /// over the final versions delivered in order once.
    #[test]
    fn delivery_order_and_duplicates_do_not_change_answers(
        windows in proptest::collection::btree_map(
            (0usize..4, 0usize..2, 0i64..200),
            (1u64..50, -50.0f64..50.0, 0u64..49),
            1..60,
        ),
        dup_mask in proptest::collection::vec(0u8..3, 60),
        seed in any::<u64>(),
    ) {
        let devs = [
            key("acme", "s1", "pump-1"),
            key("acme", "s1", "room-1"),
            key("acme", "s2", "pump-1"),
            key("beta", "s1", "room-9"),
        ];
        let metrics = ["temp", "power"];
        // The final versions, in order.
        let finals: Vec<(DeviceKey, Rollup)> = windows
            .iter()
            .map(|(&(d, m, minute), &(count, base, _))| {
                (devs[d].clone(), roll(&devs[d], metrics[m], minute, count, base))
            })
            .collect();
        let mut once = RollupIndex::default();
        for (k, r) in &finals {
            insert(&mut once, k, r.clone());
        }
        // Messy delivery: each final plus, per the mask, a duplicate and an
        // older (smaller) version of the same window; then shuffled.
        let mut messy: Vec<(DeviceKey, Rollup)> = Vec::new();
        for (i, ((k, r), (_, &(count, base, older)))) in finals.iter().zip(windows.iter()).enumerate() {
            messy.push((k.clone(), r.clone()));
            let mask = dup_mask[i % dup_mask.len()];
            if mask >= 1 {
                messy.push((k.clone(), r.clone()));
            }
            if mask >= 1 && older >= 1 && older < count {
                let minute = (r.window_start.0 - T0) / 60_000;
                messy.push((k.clone(), roll(k, &r.metric, minute, older, base + 0.5)));
            }
        }
        // Deterministic shuffle from the seed (xorshift).
        let mut s = seed | 1;
        for i in (1..messy.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let j = (s % (i as u64 + 1)) as usize;
            messy.swap(i, j);
        }
        let mut late = RollupIndex::default();
        for (k, r) in messy {
            insert(&mut late, &k, r);
        }
        prop_assert_eq!(late.len(), once.len());
        prop_assert_eq!(all_answers(&late), all_answers(&once));
        prop_assert_eq!(
            late.top_devices(&TelemetryQuery::default(), "temp", Stat::Sum, 10),
            once.top_devices(&TelemetryQuery::default(), "temp", Stat::Sum, 10)
        );
    }
}
