//! Control-loop liveness: a loop ticks at least every `period * tolerance`
//! from its first tick to the end of observation. A gap that overlaps a
//! span when the node was down (killed, not yet restarted) is excused; a
//! loop with no tick at all on a node that was up is a stall over the
//! whole observation.

use super::{Evidence, Observations, Verdict};

/// Check that no control loop stalled.
pub fn check(o: &Observations, tolerance: f64) -> Verdict {
    if o.loop_ticks.is_empty() {
        return Verdict::unknown("liveness", "no control-loop ticks were observed");
    }
    let mut evidence = Vec::new();
    for l in &o.loop_ticks {
        let allowed = (l.period_ms as f64 * tolerance).ceil() as i64;
        let excused = |from: i64, to: i64| {
            o.downtime
                .iter()
                .any(|d| d.node == l.node && d.from_ms < to && from < d.to_ms)
        };
        let mut ticks = l.ticks_ms.clone();
        ticks.sort_unstable();
        let mut points = ticks.clone();
        if ticks.is_empty() {
            points.push(0);
        }
        if o.end_ms > 0 && points.last().is_some_and(|&t| t < o.end_ms) {
            points.push(o.end_ms);
        }
        for w in points.windows(2) {
            let (from, to) = (w[0], w[1]);
            if to - from > allowed && !excused(from, to) {
                evidence.push(Evidence::LoopStall {
                    node: l.node.clone(),
                    loop_name: l.loop_name.clone(),
                    period_ms: l.period_ms,
                    from_ms: from,
                    to_ms: to,
                    allowed_ms: allowed,
                });
            }
        }
    }
    let n = o.loop_ticks.len();
    Verdict::new(
        "liveness",
        evidence,
        format!("{n} loops never went more than period x {tolerance} without a tick"),
        "control loops stalled".into(),
    )
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // fixtures are built up field by field
mod tests {
    use super::*;
    use crate::check::{LoopTicks, Status};
    use crate::scenario::NodeSpan;

    fn lt(node: &str, ticks: Vec<i64>) -> LoopTicks {
        LoopTicks {
            node: node.into(),
            loop_name: "cold-room".into(),
            period_ms: 1000,
            ticks_ms: ticks,
        }
    }

    #[test]
    fn a_stall_is_reported_with_its_gap() {
        let mut o = Observations::default();
        o.end_ms = 10_000;
        let mut ticks: Vec<i64> = (0..=10).map(|i| i * 1000).collect();
        ticks.retain(|t| !(3000..8000).contains(t));
        o.loop_ticks = vec![lt("s/edge-1", ticks)];
        let v = check(&o, 3.0);
        assert_eq!(v.status, Status::Fail);
        match &v.evidence[..] {
            [
                Evidence::LoopStall {
                    from_ms,
                    to_ms,
                    allowed_ms,
                    ..
                },
            ] => {
                assert_eq!((*from_ms, *to_ms, *allowed_ms), (2000, 8000, 3000));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn regular_ticks_pass_and_downtime_excuses() {
        let mut o = Observations::default();
        o.end_ms = 10_000;
        o.loop_ticks = vec![lt("e", (0..=10).map(|i| i * 1000 + 50 * (i % 2)).collect())];
        assert_eq!(check(&o, 1.5).status, Status::Pass);
        o.loop_ticks = vec![lt("e", vec![0, 1000, 9000, 10_000])];
        assert_eq!(check(&o, 3.0).status, Status::Fail);
        o.downtime = vec![NodeSpan {
            node: "e".into(),
            from_ms: 1500,
            to_ms: 8000,
        }];
        assert_eq!(check(&o, 3.0).status, Status::Pass);
        // A loop that stopped ticking before the end is a stall too.
        o.loop_ticks = vec![lt("e", vec![0, 1000, 9000])];
        o.end_ms = 20_000;
        assert_eq!(check(&o, 3.0).status, Status::Fail);
        assert_eq!(check(&Observations::default(), 3.0).status, Status::Unknown);
    }
}
