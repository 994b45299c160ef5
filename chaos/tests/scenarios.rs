//! Every file of the scenario library parses and validates, and the library
//! holds the scenarios the chaos suite promises.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use chaos::scenario::{Action, Scenario, load_dir};

fn library() -> Vec<Scenario> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let all = load_dir(&dir).unwrap();
    assert!(!all.is_empty(), "no scenario files in {}", dir.display());
    all.into_iter()
        .map(|(p, r)| r.unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

#[test]
fn every_scenario_file_parses() {
    let names: Vec<String> = library().into_iter().map(|s| s.name).collect();
    for want in [
        "partition-heal-concurrent-setpoints",
        "flapping-link",
        "hub-kill-under-load",
        "edge-kill-mid-write",
        "asymmetric-partition",
        "clock-skew-and-1970-boot",
        "reconnect-storm",
        "lossy-dup-reorder-30pct",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing scenario {want}: {names:?}"
        );
    }
}

#[test]
fn scenarios_exercise_what_their_names_say() {
    for s in library() {
        let has = |f: &dyn Fn(&Action) -> bool| s.timeline.iter().any(|t| f(&t.action));
        match s.name.as_str() {
            "partition-heal-concurrent-setpoints" => {
                assert!(has(&|a| matches!(a, Action::Partition { .. })));
                let edits = s
                    .timeline
                    .iter()
                    .filter(|t| matches!(t.action, Action::EditConfig { .. }))
                    .count();
                assert!(edits >= 2);
            }
            "flapping-link" => assert!(s.fault_spans().len() >= 10, "{:?}", s.fault_spans()),
            "hub-kill-under-load" | "edge-kill-mid-write" => {
                assert!(!s.downtime().is_empty());
                assert!(has(
                    &|a| matches!(a, Action::Command { deliveries, .. } if *deliveries > 1)
                ));
            }
            "asymmetric-partition" => assert!(
                s.fault_spans().iter().all(|f| f.kind == "partition") && s.fault_spans().len() == 2
            ),
            "clock-skew-and-1970-boot" => assert!(has(&|a| matches!(a, Action::ClockSkew { .. }))),
            "reconnect-storm" => assert!(has(&|a| matches!(a, Action::Flood { .. }))),
            "lossy-dup-reorder-30pct" => {
                let kinds: std::collections::BTreeSet<String> =
                    s.fault_spans().into_iter().map(|f| f.kind).collect();
                for k in ["loss", "duplicate", "reorder", "delay", "bandwidth"] {
                    assert!(kinds.contains(k), "{k} missing: {kinds:?}");
                }
            }
            _ => {}
        }
    }
}

#[test]
fn a_run_record_starts_from_the_scenario() {
    use chaos::check::{RunRecord, Status};
    let s = library()
        .into_iter()
        .find(|s| s.name == "hub-kill-under-load")
        .unwrap();
    let rec = RunRecord::from_scenario(&s);
    assert_eq!(rec.links.len(), s.fleet.links().len());
    assert_eq!(rec.observations.nodes.len(), 4); // hub + 2 + 1 edges
    assert_eq!(rec.observations.downtime.len(), 2);
    // Nothing observed yet: the report cannot pass, it is undecided.
    let r = chaos::report::build(&rec);
    assert_eq!((r.overall, r.exit_code), (Status::Unknown, 2));
    assert!(
        r.connectivity
            .iter()
            .any(|c| c.link.b == "hub-eu" && c.state == chaos::report::Connectivity::Down)
    );
}
