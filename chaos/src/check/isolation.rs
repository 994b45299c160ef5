//! Isolation: while a relay direction is partitioned, it delivers nothing.
//! The evidence is the relay's own counters for that window, so a
//! partition scenario proves that the pair exchanged zero datagrams (and
//! how many were sent into the cut).

use super::{Evidence, RelayWindow, Verdict};

/// Check every partition window forwarded zero datagrams.
pub fn check(windows: &[RelayWindow]) -> Verdict {
    let cuts: Vec<&RelayWindow> = windows.iter().filter(|w| w.faults == "partition").collect();
    if cuts.is_empty() {
        return Verdict::unknown("isolation", "no partition windows were measured");
    }
    let evidence: Vec<Evidence> = cuts
        .iter()
        .filter(|w| w.forwarded > 0)
        .map(|w| Evidence::Leak {
            window: (*w).clone(),
        })
        .collect();
    let sent: u64 = cuts.iter().map(|w| w.packets_in).sum();
    if sent == 0 {
        // Nothing tried to cross: the cut was not exercised, and silence
        // could also mean the pair talked by another path.
        return Verdict::unknown(
            "isolation",
            "no datagram was sent into any partition: the cut was not exercised",
        );
    }
    Verdict::new(
        "isolation",
        evidence,
        format!(
            "{} partition windows forwarded 0 datagrams ({sent} sent into the cut, all dropped)",
            cuts.len()
        ),
        "a partitioned direction delivered datagrams".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Status;

    fn w(faults: &str, forwarded: u64) -> RelayWindow {
        RelayWindow {
            link: "e1 <-> hub".into(),
            direction: "a-to-b".into(),
            faults: faults.into(),
            from_ms: 1000,
            to_ms: 5000,
            packets_in: 40,
            forwarded,
            dropped_partition: 40 - forwarded,
            dropped_other: 0,
        }
    }

    #[test]
    fn a_leaking_partition_fails_with_its_window_and_a_clean_one_passes() {
        let v = check(&[w("partition", 0), w("partition", 3), w("loss", 30)]);
        assert_eq!(v.status, Status::Fail);
        assert_eq!(v.evidence.len(), 1);
        assert!(v.evidence[0].describe().contains("forwarded 3 of 40"));
        let ok = check(&[w("partition", 0)]);
        assert_eq!(ok.status, Status::Pass);
        assert!(ok.summary.contains("40 sent"));
        assert_eq!(check(&[w("loss", 5)]).status, Status::Unknown);
        let mut silent = w("partition", 0);
        silent.packets_in = 0;
        silent.dropped_partition = 0;
        assert_eq!(check(&[silent]).status, Status::Unknown);
    }
}
