//! Fleet aggregates: a regional hub folds the telemetry rollups of each
//! tenant's sites into one document per tenant and day
//! (`t/{tenant}/agg/{day}`), per site, metric and hour. Those documents are
//! the only ones a global hub receives (data class `fleet-aggregate`).
//!
//! The fold is pure ([`fold_site_hours`]); [`recompute`] reads the day's
//! telemetry documents from the store and rewrites the aggregate document
//! (unchanged entries are not rewritten, so a quiet fleet writes nothing);
//! [`run`] recomputes the days whose telemetry changed, every `period`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use schemas::ids::{DeviceId, DocId, DocKind, SiteId, TenantId};
use schemas::metrics::Rollup;
use schemas::time::{Day, Timestamp};
use sync_core::docs::telemetry;
use sync_core::store::{DocStore, StoreError};
use tokio::sync::{broadcast, watch};

/// One hour.
pub const HOUR_MS: i64 = 3_600_000;

/// Fold rollups of one site into per-metric hourly rollups. The result's
/// `device` is the site and its `metric` is `{site}:{metric}`, so entries of
/// different sites never share a key in the aggregate document.
pub fn fold_site_hours(site: &SiteId, rollups: &[Rollup]) -> Vec<Rollup> {
    let mut by_key: BTreeMap<(String, i64), Rollup> = BTreeMap::new();
    // Fold in a fixed order so floating-point sums do not depend on the
    // order documents were read.
    let mut sorted: Vec<&Rollup> = rollups.iter().collect();
    sorted.sort_by(|a, b| {
        (
            a.device.as_str(),
            a.metric.as_str(),
            a.window_start,
            a.count,
        )
            .cmp(&(
                b.device.as_str(),
                b.metric.as_str(),
                b.window_start,
                b.count,
            ))
    });
    let Ok(site_dev) = DeviceId::new(site.as_str()) else {
        return Vec::new();
    };
    for r in sorted {
        let hour = r.window_start.window_start(HOUR_MS);
        let mut h = r.clone();
        h.device = site_dev.clone();
        h.metric = format!("{site}:{}", r.metric);
        h.window_start = hour;
        h.window_ms = HOUR_MS;
        match by_key.get_mut(&(h.metric.clone(), hour.as_millis())) {
            Some(acc) => acc.merge(&h),
            None => {
                by_key.insert((h.metric.clone(), hour.as_millis()), h);
            }
        }
    }
    by_key.into_values().collect()
}

/// Rewrite the aggregate document of `tenant` and `day` from the telemetry
/// documents the store holds. Returns how many entries changed.
pub fn recompute(
    store: &DocStore,
    tenant: &TenantId,
    day: Day,
    now: Timestamp,
) -> Result<usize, StoreError> {
    let mut per_site: BTreeMap<SiteId, Vec<Rollup>> = BTreeMap::new();
    for id in store.list() {
        let DocId::Telemetry {
            tenant: t,
            site,
            day: d,
            ..
        } = &id
        else {
            continue;
        };
        if t != tenant || *d != day {
            continue;
        }
        if let Some(Ok((rollups, _bad))) = store.read(&id, telemetry::rollups_with_late)? {
            per_site.entry(site.clone()).or_default().extend(rollups);
        }
    }
    let folded: Vec<Rollup> = per_site
        .iter()
        .flat_map(|(site, rs)| fold_site_hours(site, rs))
        .collect();
    if folded.is_empty() {
        return Ok(0);
    }
    let agg = DocId::Aggregate {
        tenant: tenant.clone(),
        day,
    };
    store.change(&agg, now, |doc| {
        let mut changed = 0;
        for r in &folded {
            if telemetry::put_rollup(doc, r)? {
                changed += 1;
            }
        }
        Ok(changed)
    })
}

/// Recompute aggregates of every (tenant, day) whose telemetry changed, at
/// most once per `period`, until `stop`.
pub async fn run(
    store: Arc<DocStore>,
    clock: Arc<dyn crate::api::Clock>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut feed = store.subscribe();
    let mut dirty: BTreeSet<(TenantId, Day)> = BTreeSet::new();
    // Everything held at start may be newer than its aggregate.
    for id in store.list() {
        if let DocId::Telemetry { tenant, day, .. } = id {
            dirty.insert((tenant, day));
        }
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            c = feed.recv() => match c {
                Ok(c) if c.id.kind() == DocKind::Telemetry => {
                    if let (Some(t), Some(d)) = (c.id.tenant(), c.id.day()) {
                        dirty.insert((t.clone(), d));
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for id in store.list() {
                        if let DocId::Telemetry { tenant, day, .. } = id {
                            dirty.insert((tenant, day));
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                let work: Vec<(TenantId, Day)> = std::mem::take(&mut dirty).into_iter().collect();
                if work.is_empty() {
                    continue;
                }
                let store = store.clone();
                let now = clock.now();
                let res = tokio::task::spawn_blocking(move || {
                    for (tenant, day) in work {
                        match recompute(&store, &tenant, day, now) {
                            Ok(n) if n > 0 => tracing::debug!(%tenant, %day, changed = n, "aggregates updated"),
                            Ok(_) => {}
                            Err(StoreError::Sealed { id, .. }) => tracing::info!(doc = %id, "aggregate day sealed; not updated"),
                            Err(e) => tracing::error!(%tenant, %day, error = %e, "aggregate update failed"),
                        }
                    }
                })
                .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "aggregate task failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::metrics::Sample;
    use sync_core::identity::NodeKey;

    const NOW: Timestamp = Timestamp(1_800_000_000_000);

    fn rollup(dev: &str, metric: &str, offset_min: i64, v: f64) -> Rollup {
        let s = Sample {
            schema_version: Default::default(),
            device: DeviceId::new(dev).unwrap(),
            metric: metric.into(),
            ts: Timestamp(NOW.window_start(HOUR_MS).as_millis() + offset_min * 60_000),
            value: v,
            unit: Default::default(),
        };
        Rollup::of_sample(&s, 60_000)
    }

    #[test]
    fn fold_is_per_site_metric_and_hour_and_order_independent() {
        let site = SiteId::new("s1").unwrap();
        let rs = vec![
            rollup("a", "temp", 1, 2.0),
            rollup("b", "temp", 2, 6.0),
            rollup("a", "temp", 61, 10.0),
            rollup("a", "power", 3, 1.0),
        ];
        let f = fold_site_hours(&site, &rs);
        assert_eq!(f.len(), 3);
        let first = f
            .iter()
            .find(|r| r.metric == "s1:temp" && r.count == 2)
            .unwrap();
        assert_eq!(
            (first.min, first.max, first.sum, first.window_ms),
            (2.0, 6.0, 8.0, HOUR_MS)
        );
        let mut rev = rs.clone();
        rev.reverse();
        assert_eq!(fold_site_hours(&site, &rev), f);
    }

    #[test]
    fn recompute_writes_the_tenant_day_aggregate_from_every_site() {
        let store = DocStore::in_memory(NodeKey::from_bytes([1; 32]));
        let tenant = TenantId::new("acme").unwrap();
        for (site, dev, v) in [("s1", "a", 1.0), ("s1", "b", 3.0), ("s2", "c", 5.0)] {
            let id = DocId::telemetry(
                &tenant,
                &SiteId::new(site).unwrap(),
                &DeviceId::new(dev).unwrap(),
                NOW.day(),
            );
            store
                .change(&id, NOW, |d| {
                    telemetry::put_rollup(d, &rollup(dev, "temp", 5, v)).map(|_| ())
                })
                .unwrap();
        }
        // Another tenant's telemetry never enters acme's aggregate.
        let other = DocId::telemetry(
            &TenantId::new("globex").unwrap(),
            &SiteId::new("s1").unwrap(),
            &DeviceId::new("z").unwrap(),
            NOW.day(),
        );
        store
            .change(&other, NOW, |d| {
                telemetry::put_rollup(d, &rollup("z", "temp", 5, 100.0)).map(|_| ())
            })
            .unwrap();
        assert_eq!(recompute(&store, &tenant, NOW.day(), NOW).unwrap(), 2);
        let agg = DocId::Aggregate {
            tenant: tenant.clone(),
            day: NOW.day(),
        };
        let (rs, bad) = store
            .read(&agg, telemetry::rollups)
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(bad.is_empty());
        let s1 = rs.iter().find(|r| r.metric == "s1:temp").unwrap();
        assert_eq!((s1.count, s1.sum), (2, 4.0));
        let s2 = rs.iter().find(|r| r.metric == "s2:temp").unwrap();
        assert_eq!((s2.count, s2.sum), (1, 5.0));
        // Nothing changed: nothing rewritten.
        assert_eq!(recompute(&store, &tenant, NOW.day(), NOW).unwrap(), 0);
    }
}
