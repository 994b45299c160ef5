//! Telemetry conservation: every acknowledged sample is counted exactly once
//! in the hub's rollups.
//!
//! # What counts and sums can prove
//!
//! A rollup carries only `count`, `sum`, `min`, `max` and the first and last
//! sample (value and timestamp) of its window, never sample identities. For
//! one key `(hub, site, device, metric, window)` let
//!
//! - `E` be the acknowledged samples (deduplicated by `(edge, device,
//!   metric, seq)`), `n_e = |E|`, `s_e = sum(E)`;
//! - `U` the samples whose write had an unknown outcome (the edge died
//!   mid-write): each may legitimately be counted once or not at all;
//! - `n_o`, `s_o`, `min_o`, `max_o`, `first_ts_o`, `last_ts_o` the hub's
//!   rollup (several rollups for one key are merged first; a missing rollup
//!   is `n_o = 0`).
//!
//! Then, exactly:
//!
//! 1. **Lost, at least `n_e - n_o`** when `n_o < n_e`: duplicates and extra
//!    samples only add to the count, so at least that many acknowledged
//!    samples are missing.
//! 2. **Double-counted (or spurious), at least `n_o - n_e - |U|`** when
//!    positive: even counting every unknown-outcome sample, the count is too
//!    high.
//! 3. **Identified losses**: an acknowledged sample with a value below
//!    `min_o` or above `max_o`, or a timestamp before `first_ts_o` or after
//!    `last_ts_o`, is certainly not in the rollup. These are named.
//! 4. **Foreign values**: `min_o`/`max_o` outside the range of `E ∪ U`
//!    means a value no recorded sample had (corruption or a spurious
//!    sample): at least one extra.
//! 5. **Substitution**: counts consistent but the sum matches no choice of
//!    unknown-outcome samples (checked exactly when `|U| <= 12`, by trying
//!    every subset of the right size): at least one sample lost *and* one
//!    extra (a duplicate of a different value, or a corrupted value).
//! 6. When the count excess is exactly one and `U` is empty, the duplicated
//!    sample's value is `s_o - s_e`: the acknowledged samples with that
//!    value are named as suspects (equal values cannot be told apart).
//!
//! What cannot be proven from summaries: a loss and a duplicate of an
//! *equal* value in the same window cancel in count, sum, min and max, and
//! look like exactly-once. Catching that needs per-sample identities in the
//! rollups (e.g. a per-window sequence range or a hash of the seqs), which
//! `schemas::metrics::Rollup` does not carry.
//!
//! Sums are compared with a tolerance of `1e-9 * (1 + sum |v|)`, far above
//! f64 rounding for any realistic window and far below any sample value a
//! device reports.
//!
//! Which hub must hold a site's telemetry: every regional hub whose regions
//! include the site's tenant's region (from [`Observations::nodes`] and
//! [`Observations::tenants`]).
//!
//! # Samples taken under an implausible clock
//!
//! An edge whose wall clock is before `PLAUSIBLE_EPOCH` (a box that booted
//! in 1970) must not file rollups under a calendar day: it keeps them in
//! its local bucket, flagged `clock_unsynced`
//! ([`Observations::edge_local_rollups`]). Such samples (timestamp not
//! plausible) are therefore expected **on their edge, not in any hub**,
//! and checked there with the same arithmetic, window by window. The
//! verdict names how many samples (and windows) are held that way: they
//! are not lost, but no hub counts them yet. A sample in neither place is
//! lost; a hub rollup with an implausible window is a rollup that should
//! never have left its edge (reported as extra).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use schemas::ids::{DeviceId, SiteId};
use schemas::metrics::Rollup;
use schemas::policy::HubTier;
use schemas::time::Timestamp;

use super::{Evidence, Observations, SampleObs, Verdict};
use crate::scenario::NodeRole;

/// The summary of a set of samples or of a rollup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Earliest timestamp.
    pub first_ts: Timestamp,
    /// Latest timestamp.
    pub last_ts: Timestamp,
}

impl Summary {
    fn of(samples: &[&SampleObs]) -> Option<Summary> {
        let first = samples.first()?;
        let mut s = Summary {
            count: 0,
            sum: 0.0,
            min: first.value,
            max: first.value,
            first_ts: first.ts,
            last_ts: first.ts,
        };
        for x in samples {
            s.count += 1;
            s.sum += x.value;
            s.min = s.min.min(x.value);
            s.max = s.max.max(x.value);
            s.first_ts = s.first_ts.min(x.ts);
            s.last_ts = s.last_ts.max(x.ts);
        }
        Some(s)
    }

    fn of_rollup(r: &Rollup) -> Summary {
        Summary {
            count: r.count,
            sum: r.sum,
            min: r.min,
            max: r.max,
            first_ts: r.first_ts,
            last_ts: r.last_ts,
        }
    }
}

/// A window whose rollup does not account for its acknowledged samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowMismatch {
    /// The hub.
    pub hub: String,
    /// The site.
    pub site: SiteId,
    /// The device.
    pub device: DeviceId,
    /// The metric.
    pub metric: String,
    /// Start of the window.
    pub window_start: Timestamp,
    /// Summary of the acknowledged samples (`None`: none).
    pub expected: Option<Summary>,
    /// Summary of the hub's rollup (`None`: the hub has no rollup).
    pub observed: Option<Summary>,
    /// Number of unknown-outcome samples in the window.
    pub indeterminate: u64,
    /// Proven lower bound of lost acknowledged samples.
    pub lost_at_least: u64,
    /// Proven lower bound of samples counted twice or not recorded at all.
    pub extra_at_least: u64,
    /// Acknowledged samples certainly missing from the rollup.
    pub identified_lost: Vec<SampleObs>,
    /// Acknowledged samples one of which was probably counted twice.
    pub suspected_duplicates: Vec<SampleObs>,
    /// The reasoning, in words.
    pub explanation: String,
}

impl WindowMismatch {
    /// One line for humans.
    pub fn describe(&self) -> String {
        let seqs = |v: &[SampleObs]| {
            v.iter()
                .map(|s| format!("{}#{}={}", s.edge, s.seq, s.value))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = format!(
            "{} {}/{}/{} window {}: expected {} observed {}: lost>={} extra>={}",
            self.hub,
            self.site,
            self.device,
            self.metric,
            self.window_start,
            self.expected.as_ref().map_or(0, |e| e.count),
            self.observed.as_ref().map_or(0, |e| e.count),
            self.lost_at_least,
            self.extra_at_least
        );
        if !self.identified_lost.is_empty() {
            s.push_str(&format!("; lost: {}", seqs(&self.identified_lost)));
        }
        if !self.suspected_duplicates.is_empty() {
            s.push_str(&format!(
                "; duplicate suspects: {}",
                seqs(&self.suspected_duplicates)
            ));
        }
        s.push_str(&format!(" ({})", self.explanation));
        s
    }
}

type Key = (SiteId, DeviceId, String, Timestamp);

fn tol(samples: &[&SampleObs]) -> f64 {
    1e-9 * (1.0 + samples.iter().map(|s| s.value.abs()).sum::<f64>())
}

/// Whether some `k`-subset of `u` sums to `target` (within `eps`).
fn subset_sum(u: &[f64], k: usize, target: f64, eps: f64) -> bool {
    fn go(u: &[f64], k: usize, target: f64, eps: f64) -> bool {
        if k == 0 {
            return target.abs() <= eps;
        }
        if u.len() < k {
            return false;
        }
        go(&u[1..], k - 1, target - u[0], eps) || go(&u[1..], k, target, eps)
    }
    go(u, k, target, eps)
}

const MAX_EXACT_UNKNOWN: usize = 12;

/// Compare one window. `None` when it is consistent with exactly-once.
fn judge(
    hub: &str,
    key: &Key,
    acked: &[&SampleObs],
    unknown: &[&SampleObs],
    observed: Option<&Rollup>,
) -> Option<WindowMismatch> {
    let expected = Summary::of(acked);
    let obs = observed.map(Summary::of_rollup);
    let n_e = acked.len() as u64;
    let n_u = unknown.len() as u64;
    let n_o = obs.as_ref().map_or(0, |o| o.count);
    let all: Vec<&SampleObs> = acked.iter().chain(unknown).copied().collect();
    let eps = tol(&all);
    let mut why = Vec::new();
    let mut lost = n_e.saturating_sub(n_o);
    let mut extra = n_o.saturating_sub(n_e + n_u);
    if lost > 0 {
        why.push(format!(
            "the rollup counts {n_o} of {n_e} acknowledged samples"
        ));
    }
    if extra > 0 {
        why.push(format!(
            "the rollup counts {n_o}, more than {n_e} acknowledged + {n_u} unknown-outcome samples"
        ));
    }
    let mut identified = Vec::new();
    if let Some(o) = &obs {
        for s in acked {
            let outside = s.value < o.min - eps
                || s.value > o.max + eps
                || s.ts < o.first_ts
                || s.ts > o.last_ts;
            if outside {
                identified.push((*s).clone());
            }
        }
        if !identified.is_empty() {
            why.push(format!(
                "{} acknowledged samples lie outside the rollup's min/max or first/last timestamps",
                identified.len()
            ));
        }
        let lo = all.iter().map(|s| s.value).fold(f64::INFINITY, f64::min);
        let hi = all
            .iter()
            .map(|s| s.value)
            .fold(f64::NEG_INFINITY, f64::max);
        if o.count > 0 && (o.min < lo - eps || o.max > hi + eps) {
            extra = extra.max(1);
            why.push(format!(
                "the rollup's range [{}, {}] holds a value no recorded sample had (recorded range [{lo}, {hi}])",
                o.min, o.max
            ));
        }
    } else if n_e > 0 {
        identified = acked.iter().map(|s| (*s).clone()).collect();
        why.push("the hub has no rollup for this window".into());
    }
    lost = lost.max(identified.len() as u64);
    // Counts consistent: does the sum fit some choice of unknown samples?
    if let Some(o) = &obs
        && lost == 0
        && extra == 0
        && n_o >= n_e
    {
        let k = (n_o - n_e) as usize;
        let target = o.sum - expected.as_ref().map_or(0.0, |e| e.sum);
        if unknown.len() <= MAX_EXACT_UNKNOWN {
            let u: Vec<f64> = unknown.iter().map(|s| s.value).collect();
            if !subset_sum(&u, k, target, eps) {
                lost = 1;
                extra = 1;
                why.push(format!(
                    "counts match but the sum is off by {target} with {k} unknown-outcome samples counted: a sample was replaced by another value"
                ));
            }
        }
    }
    let mut suspects = Vec::new();
    if n_u == 0
        && n_o == n_e + 1
        && let Some(o) = &obs
    {
        let d = o.sum - expected.as_ref().map_or(0.0, |e| e.sum);
        suspects = acked
            .iter()
            .filter(|s| (s.value - d).abs() <= eps)
            .map(|s| (*s).clone())
            .collect();
        if !suspects.is_empty() {
            why.push(format!("the surplus sum {d} matches these samples' value"));
        }
    }
    if lost == 0 && extra == 0 {
        return None;
    }
    Some(WindowMismatch {
        hub: hub.to_string(),
        site: key.0.clone(),
        device: key.1.clone(),
        metric: key.2.clone(),
        window_start: key.3,
        expected,
        observed: obs,
        indeterminate: n_u,
        lost_at_least: lost,
        extra_at_least: extra,
        identified_lost: identified,
        suspected_duplicates: suspects,
        explanation: why.join("; "),
    })
}

/// Check telemetry conservation on every regional hub.
pub fn check(o: &Observations) -> Verdict {
    let name = "telemetry";
    if o.acked_samples.is_empty() && o.hub_rollups.is_empty() && o.edge_local_rollups.is_empty() {
        return Verdict::unknown(name, "no samples were acknowledged and no rollups observed");
    }
    let window = o.rollup_window_ms;
    if window <= 0 {
        return Verdict::new(
            name,
            vec![Evidence::Malformed {
                detail: format!(
                    "rollup_window_ms is {window}; the checker needs the edges' rollup window"
                ),
            }],
            String::new(),
            "cannot check telemetry without the rollup window".into(),
        );
    }
    // Which tenant owns each site, from the edges' roles.
    let mut site_tenant = BTreeMap::new();
    for n in &o.nodes {
        if let NodeRole::Edge { tenant, site } = &n.role {
            site_tenant.insert(site.clone(), tenant.clone());
        }
    }
    let region_of = |site: &SiteId| {
        let t = site_tenant.get(site)?;
        o.tenants
            .iter()
            .find(|x| &x.id == t)
            .map(|x| x.region.clone())
    };
    let hubs: Vec<(&str, &Vec<schemas::policy::Region>)> = o
        .nodes
        .iter()
        .filter_map(|n| match &n.role {
            NodeRole::Hub {
                tier: HubTier::Regional,
                regions,
            } => Some((n.name.as_str(), regions)),
            _ => None,
        })
        .collect();
    if hubs.is_empty() {
        return Verdict::unknown(name, "no regional hub in the fleet to hold rollups");
    }
    let mut evidence = Vec::new();
    // Deduplicate acknowledged samples by identity.
    let mut seen = BTreeSet::new();
    let acked: Vec<&SampleObs> = o
        .acked_samples
        .iter()
        .filter(|s| seen.insert((s.edge.clone(), s.device.clone(), s.metric.clone(), s.seq)))
        .collect();
    // Samples taken under an implausible clock belong to their edge's
    // unsynced lane, not to any hub.
    let (acked, held): (Vec<&SampleObs>, Vec<&SampleObs>) =
        acked.into_iter().partition(|s| s.ts.is_plausible());
    let (unknown, held_unknown): (Vec<&SampleObs>, Vec<&SampleObs>) = o
        .indeterminate_samples
        .iter()
        .partition(|s| s.ts.is_plausible());
    let key_of = |s: &SampleObs| -> Key {
        (
            s.site.clone(),
            s.device.clone(),
            s.metric.clone(),
            s.ts.window_start(window),
        )
    };
    let mut windows = 0usize;
    for (hub, regions) in hubs {
        let serves = |site: &SiteId| region_of(site).is_some_and(|r| regions.contains(&r));
        let mut exp: BTreeMap<Key, (Vec<&SampleObs>, Vec<&SampleObs>)> = BTreeMap::new();
        for s in acked.iter().filter(|s| serves(&s.site)) {
            exp.entry(key_of(s)).or_default().0.push(s);
        }
        for s in unknown.iter().filter(|s| serves(&s.site)) {
            exp.entry(key_of(s)).or_default().1.push(s);
        }
        let mut got: BTreeMap<Key, Rollup> = BTreeMap::new();
        for r in o.hub_rollups.iter().filter(|r| r.hub == hub) {
            if r.rollup.window_ms != window {
                evidence.push(Evidence::Malformed {
                    detail: format!(
                        "{hub} holds a rollup of {}/{}/{} with window {} ms, expected {window} ms",
                        r.site, r.rollup.device, r.rollup.metric, r.rollup.window_ms
                    ),
                });
                continue;
            }
            let key = (
                r.site.clone(),
                r.rollup.device.clone(),
                r.rollup.metric.clone(),
                r.rollup.window_start,
            );
            match got.get_mut(&key) {
                Some(acc) => acc.merge(&r.rollup),
                None => {
                    got.insert(key, r.rollup.clone());
                }
            }
        }
        let keys: BTreeSet<&Key> = exp.keys().chain(got.keys()).collect();
        for key in keys {
            windows += 1;
            let (a, u) = exp
                .get(key)
                .map_or((&[][..], &[][..]), |(a, u)| (&a[..], &u[..]));
            if let Some(mut m) = judge(hub, key, a, u, got.get(key)) {
                if !key.3.is_plausible() {
                    m.explanation.push_str(
                        "; the window is before the plausible epoch: a rollup taken under an implausible clock reached the hub",
                    );
                }
                evidence.push(Evidence::Telemetry(Box::new(m)));
            }
        }
    }
    let held = check_held(o, window, &held, &held_unknown, &mut evidence);
    let held_text = held.describe();
    Verdict::new(
        name,
        evidence,
        format!(
            "{} acknowledged samples counted exactly once over {windows} hub windows (as far as counts and sums can tell); {held_text}",
            acked.len()
        ),
        format!("acknowledged samples lost or counted twice; {held_text}"),
    )
}

/// Acknowledged samples an edge holds in its unsynced lane (taken under an
/// implausible clock): not lost, not in any hub.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldUnsynced {
    /// Acknowledged samples with an implausible timestamp.
    pub samples: u64,
    /// Of those, in windows whose local rollup accounts for them exactly.
    pub accounted: u64,
    /// Windows (edge, device, metric, window) of the unsynced lane.
    pub windows: u64,
    /// Per edge: samples held and local unsynced windows.
    pub per_edge: BTreeMap<String, (u64, u64)>,
}

impl HeldUnsynced {
    /// The named quantity, in words, with its evidence per edge.
    pub fn describe(&self) -> String {
        if self.samples == 0 && self.windows == 0 {
            return "no samples held in an unsynced-clock lane".into();
        }
        let edges: Vec<String> = self
            .per_edge
            .iter()
            .map(|(e, (n, w))| format!("{e}: {n} samples in {w} local windows"))
            .collect();
        format!(
            "held on edges in the unsynced-clock lane (not lost, not in any hub): {} acknowledged samples, {} accounted for exactly by {} local clock_unsynced rollup windows ({})",
            self.samples,
            self.accounted,
            self.windows,
            edges.join("; ")
        )
    }
}

/// Check implausible-clock samples against their edge's local unsynced
/// rollups, pushing mismatches (as for a hub, named `{edge} (unsynced
/// lane)`) into `evidence`.
fn check_held(
    o: &Observations,
    window: i64,
    held: &[&SampleObs],
    held_unknown: &[&SampleObs],
    evidence: &mut Vec<Evidence>,
) -> HeldUnsynced {
    let mut out = HeldUnsynced::default();
    type EdgeKey = (String, Key);
    let key_of = |s: &SampleObs| -> EdgeKey {
        (
            s.edge.clone(),
            (
                s.site.clone(),
                s.device.clone(),
                s.metric.clone(),
                s.ts.window_start(window),
            ),
        )
    };
    let mut exp: BTreeMap<EdgeKey, (Vec<&SampleObs>, Vec<&SampleObs>)> = BTreeMap::new();
    for s in held {
        exp.entry(key_of(s)).or_default().0.push(s);
    }
    for s in held_unknown {
        exp.entry(key_of(s)).or_default().1.push(s);
    }
    let mut got: BTreeMap<EdgeKey, Rollup> = BTreeMap::new();
    for r in o
        .edge_local_rollups
        .iter()
        .filter(|r| r.rollup.clock_unsynced)
    {
        if r.rollup.window_ms != window {
            evidence.push(Evidence::Malformed {
                detail: format!(
                    "{} holds a local rollup {} with window {} ms, expected {window} ms",
                    r.edge, r.key, r.rollup.window_ms
                ),
            });
            continue;
        }
        let key = (
            r.edge.clone(),
            (
                r.site.clone(),
                r.rollup.device.clone(),
                r.rollup.metric.clone(),
                r.rollup.window_start,
            ),
        );
        match got.get_mut(&key) {
            Some(acc) => acc.merge(&r.rollup),
            None => {
                got.insert(key, r.rollup.clone());
            }
        }
    }
    out.samples = held.len() as u64;
    let keys: BTreeSet<&EdgeKey> = exp.keys().chain(got.keys()).collect();
    for key in keys {
        let (a, u) = exp
            .get(key)
            .map_or((&[][..], &[][..]), |(a, u)| (&a[..], &u[..]));
        let entry = out.per_edge.entry(key.0.clone()).or_default();
        entry.0 += a.len() as u64;
        if got.contains_key(key) {
            out.windows += 1;
            entry.1 += 1;
        }
        let holder = format!("{} (unsynced lane)", key.0);
        match judge(&holder, &key.1, a, u, got.get(key)) {
            Some(m) => evidence.push(Evidence::Telemetry(Box::new(m))),
            None => out.accounted += a.len() as u64,
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // fixtures are built up field by field
mod tests {
    use super::*;
    use crate::check::{HubRollup, NodeInfo, Status};
    use crate::scenario::TenantSpec;
    use schemas::TenantId;
    use schemas::policy::Region;

    const W: i64 = 60_000;
    const T0: i64 = 1_700_000_040_000; // a window start

    fn obs() -> Observations {
        let eu = Region::new("eu").unwrap();
        let mut o = Observations::default();
        o.rollup_window_ms = W;
        o.tenants = vec![TenantSpec {
            id: TenantId::new("acme").unwrap(),
            region: eu.clone(),
        }];
        o.nodes = vec![
            NodeInfo {
                name: "hub-eu".into(),
                role: NodeRole::Hub {
                    tier: HubTier::Regional,
                    regions: vec![eu],
                },
            },
            NodeInfo {
                name: "s1/edge-1".into(),
                role: NodeRole::Edge {
                    tenant: TenantId::new("acme").unwrap(),
                    site: SiteId::new("s1").unwrap(),
                },
            },
        ];
        o
    }

    fn sample(seq: u64, ts_off: i64, value: f64) -> SampleObs {
        SampleObs {
            edge: "s1/edge-1".into(),
            site: SiteId::new("s1").unwrap(),
            device: DeviceId::new("d1").unwrap(),
            metric: "temp".into(),
            seq,
            ts: Timestamp(T0 + ts_off),
            value,
        }
    }

    /// The hub's rollups, computed honestly from `samples`.
    fn rollups(samples: &[SampleObs]) -> Vec<HubRollup> {
        let mut by: BTreeMap<i64, Rollup> = BTreeMap::new();
        for s in samples {
            let sm = schemas::metrics::Sample {
                schema_version: Default::default(),
                device: s.device.clone(),
                metric: s.metric.clone(),
                ts: s.ts,
                value: s.value,
                unit: Default::default(),
            };
            let r = Rollup::of_sample(&sm, W);
            by.entry(r.window_start.0)
                .and_modify(|x| x.merge(&r))
                .or_insert(r);
        }
        by.into_values()
            .map(|rollup| HubRollup {
                hub: "hub-eu".into(),
                tenant: TenantId::new("acme").unwrap(),
                site: SiteId::new("s1").unwrap(),
                rollup,
            })
            .collect()
    }

    fn samples() -> Vec<SampleObs> {
        // Two windows of five samples each.
        (0..10)
            .map(|i| sample(i, (i as i64) * 12_000 + 1, 2.0 + i as f64))
            .collect()
    }

    fn mismatch(v: &Verdict) -> Vec<&WindowMismatch> {
        v.evidence
            .iter()
            .map(|e| match e {
                Evidence::Telemetry(m) => &**m,
                e => panic!("unexpected evidence {e:?}"),
            })
            .collect()
    }

    #[test]
    fn clean_run_passes() {
        let mut o = obs();
        o.acked_samples = samples();
        o.hub_rollups = rollups(&o.acked_samples);
        let v = check(&o);
        assert_eq!(v.status, Status::Pass, "{v:?}");
    }

    #[test]
    fn lost_sample_is_reported_and_identified() {
        let mut o = obs();
        o.acked_samples = samples();
        // The hub never got seq 4 (the largest value of window 0) .
        let delivered: Vec<SampleObs> = samples().into_iter().filter(|s| s.seq != 4).collect();
        o.hub_rollups = rollups(&delivered);
        let v = check(&o);
        assert_eq!(v.status, Status::Fail);
        let m = mismatch(&v);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].lost_at_least, m[0].extra_at_least), (1, 0));
        assert_eq!(
            m[0].identified_lost
                .iter()
                .map(|s| s.seq)
                .collect::<Vec<_>>(),
            [4]
        );
        assert!(
            m[0].describe().contains("s1/edge-1#4"),
            "{}",
            m[0].describe()
        );
    }

    #[test]
    fn lost_middle_sample_is_counted_even_when_not_identifiable() {
        let mut o = obs();
        o.acked_samples = samples();
        let delivered: Vec<SampleObs> = samples().into_iter().filter(|s| s.seq != 2).collect();
        o.hub_rollups = rollups(&delivered);
        let m = check(&o);
        let m = mismatch(&m);
        assert_eq!((m[0].lost_at_least, m[0].identified_lost.len()), (1, 0));
    }

    #[test]
    fn double_counted_sample_is_reported_with_suspects() {
        let mut o = obs();
        o.acked_samples = samples();
        let mut delivered = samples();
        delivered.push(sample(7, 7 * 12_000 + 1, 9.0)); // seq 7 again
        o.hub_rollups = rollups(&delivered);
        let v = check(&o);
        assert_eq!(v.status, Status::Fail);
        let m = mismatch(&v);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].lost_at_least, m[0].extra_at_least), (0, 1));
        assert_eq!(
            m[0].suspected_duplicates
                .iter()
                .map(|s| s.seq)
                .collect::<Vec<_>>(),
            [7]
        );
        // The same surplus is legal if seq 10 had an unknown outcome with that value.
        let mut o2 = o.clone();
        o2.indeterminate_samples = vec![sample(10, 7 * 12_000 + 2, 9.0)];
        assert_eq!(check(&o2).status, Status::Pass);
    }

    #[test]
    fn substitution_and_missing_window_are_reported() {
        let mut o = obs();
        o.acked_samples = samples();
        let mut delivered: Vec<SampleObs> = samples().into_iter().filter(|s| s.seq != 1).collect();
        delivered.push(sample(3, 3 * 12_000 + 1, 5.0)); // seq 3 twice, seq 1 lost
        // Window 1 never reached the hub.
        delivered.retain(|s| s.seq < 5);
        o.hub_rollups = rollups(&delivered);
        let v = check(&o);
        let m = mismatch(&v);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!((m[0].lost_at_least, m[0].extra_at_least), (1, 1));
        assert!(m[1].observed.is_none());
        assert_eq!(m[1].identified_lost.len(), 5);
    }

    /// Seeded random windows: dropping `k` samples is reported as exactly
    /// `k` lost, duplicating `k` as exactly `k` extra, and an untouched
    /// delivery always passes.
    #[test]
    fn seeded_losses_and_duplicates_are_counted_exactly() {
        use rand::rngs::StdRng;
        use rand::{RngExt, SeedableRng};
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = rng.random_range(1..40u64);
            let all: Vec<SampleObs> = (0..n)
                .map(|i| {
                    sample(
                        i,
                        rng.random_range(0..3 * W),
                        (rng.random_range(-500..500) as f64) / 8.0,
                    )
                })
                .collect();
            let mut o = obs();
            o.acked_samples = all.clone();
            o.hub_rollups = rollups(&all);
            assert_eq!(
                check(&o).status,
                Status::Pass,
                "seed {seed}: clean delivery"
            );

            let k = rng.random_range(1..=n.min(5)) as usize;
            let dropped: BTreeSet<u64> = (0..k).map(|_| rng.random_range(0..n)).collect();
            let delivered: Vec<SampleObs> = all
                .iter()
                .filter(|s| !dropped.contains(&s.seq))
                .cloned()
                .collect();
            o.hub_rollups = rollups(&delivered);
            let v = check(&o);
            let lost: u64 = mismatch(&v).iter().map(|m| m.lost_at_least).sum();
            let extra: u64 = mismatch(&v).iter().map(|m| m.extra_at_least).sum();
            assert_eq!(
                (lost, extra),
                (dropped.len() as u64, 0),
                "seed {seed}: dropped {dropped:?}"
            );

            let mut doubled = all.clone();
            for _ in 0..k {
                doubled.push(all[rng.random_range(0..all.len())].clone());
            }
            o.hub_rollups = rollups(&doubled);
            let v = check(&o);
            let lost: u64 = mismatch(&v).iter().map(|m| m.lost_at_least).sum();
            let extra: u64 = mismatch(&v).iter().map(|m| m.extra_at_least).sum();
            assert_eq!((lost, extra), (0, k as u64), "seed {seed}");
        }
    }

    #[test]
    fn wrong_window_or_missing_window_size_is_malformed() {
        let mut o = obs();
        o.acked_samples = samples();
        o.rollup_window_ms = 0;
        let v = check(&o);
        assert_eq!(v.status, Status::Unknown);
        assert!(v.evidence[0].describe().contains("rollup_window_ms"));
        assert_eq!(check(&obs()).status, Status::Unknown);
    }
    fn local(samples: &[SampleObs]) -> Vec<crate::check::LocalRollup> {
        rollups(samples)
            .into_iter()
            .map(|h| {
                let mut rollup = h.rollup;
                rollup.clock_unsynced = true;
                crate::check::LocalRollup {
                    edge: "s1/edge-1".into(),
                    site: h.site,
                    key: format!("d1/temp@{}~unsynced", rollup.window_start.0),
                    rollup,
                }
            })
            .collect()
    }

    /// Samples of an edge that booted in 1970: timestamps from 0.
    fn samples_1970() -> Vec<SampleObs> {
        (100..106)
            .map(|i| {
                let mut s = sample(i, 0, 1.0 + i as f64);
                s.ts = Timestamp((i as i64 - 100) * 15_000 + 3);
                s
            })
            .collect()
    }

    #[test]
    fn samples_held_in_the_unsynced_lane_are_named_not_lost() {
        let mut o = obs();
        o.acked_samples = samples();
        o.hub_rollups = rollups(&o.acked_samples);
        o.acked_samples.extend(samples_1970());
        o.edge_local_rollups = local(&samples_1970());
        let v = check(&o);
        assert_eq!(v.status, Status::Pass, "{v:?}");
        assert!(
            v.summary
                .contains("10 acknowledged samples counted exactly once"),
            "{}",
            v.summary
        );
        assert!(
            v.summary.contains("unsynced-clock lane (not lost, not in any hub): 6 acknowledged samples, 6 accounted for exactly by 2 local clock_unsynced rollup windows (s1/edge-1: 6 samples in 2 local windows)"),
            "{}",
            v.summary
        );
    }

    #[test]
    fn a_sample_in_neither_the_hub_nor_the_unsynced_lane_is_lost() {
        let mut o = obs();
        o.acked_samples = samples();
        o.hub_rollups = rollups(&o.acked_samples);
        // The edge's bucket lacks seq 103 (its window's largest value).
        let kept: Vec<SampleObs> = samples_1970()
            .into_iter()
            .filter(|s| s.seq != 103)
            .collect();
        o.edge_local_rollups = local(&kept);
        o.acked_samples.extend(samples_1970());
        let v = check(&o);
        assert_eq!(v.status, Status::Fail, "{v:?}");
        let m = mismatch(&v);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[0].hub, "s1/edge-1 (unsynced lane)");
        assert_eq!(m[0].lost_at_least, 1);
        assert_eq!(
            m[0].identified_lost
                .iter()
                .map(|s| s.seq)
                .collect::<Vec<_>>(),
            [103]
        );
        // And with no bucket at all, every 1970 sample is lost.
        o.edge_local_rollups.clear();
        let v = check(&o);
        let lost: u64 = mismatch(&v).iter().map(|m| m.lost_at_least).sum();
        assert_eq!(lost, 6);
    }

    #[test]
    fn a_1970_rollup_on_the_hub_is_reported() {
        let mut o = obs();
        o.acked_samples = samples();
        o.acked_samples.extend(samples_1970());
        o.edge_local_rollups = local(&samples_1970());
        // The hub counts the 1970 windows too.
        let mut on_hub = samples();
        on_hub.extend(samples_1970());
        o.hub_rollups = rollups(&on_hub);
        let v = check(&o);
        assert_eq!(v.status, Status::Fail);
        let m = mismatch(&v);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m.iter().all(|m| m.hub == "hub-eu" && m.extra_at_least > 0));
        assert!(
            m[0].explanation.contains("plausible epoch"),
            "{}",
            m[0].explanation
        );
    }
}
