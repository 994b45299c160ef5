//! Reports from fabricated run records: every kind of violation shows up as
//! a failed verdict with its evidence in the JSON, the text and the SVG; a
//! clean record passes; and the `chaos` binary's subcommands work end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use chaos::check::{RunRecord, Status};
use chaos::report;
use serde_json::{Value, json};

const T0: i64 = 1_700_000_040_000;

/// A run record in the JSON shape a runner writes. `bad` injects one
/// violation of every invariant.
fn record(bad: bool) -> Value {
    let sample = |seq: u64, v: f64| {
        json!({
            "edge": "s1/edge-1", "site": "s1", "device": "d1", "metric": "temp",
            "seq": seq, "ts": T0 + seq as i64 * 1000, "value": v
        })
    };
    let acked: Vec<Value> = (0..4).map(|i| sample(i, 1.0 + i as f64)).collect();
    // Honest rollup of 1+2+3+4; the bad one lost seq 3 (value 4).
    let (count, sum, max, last_ts) = if bad {
        (3, 6.0, 3.0, T0 + 2000)
    } else {
        (4, 10.0, 4.0, T0 + 3000)
    };
    let rollup = json!({
        "device": "d1", "metric": "temp", "window_start": T0, "window_ms": 60000,
        "count": count, "min": 1.0, "max": max, "sum": sum,
        "first": 1.0, "first_ts": T0, "last": max, "last_ts": last_ts
    });
    let heads_e1 = if bad {
        json!(["bbbb"])
    } else {
        json!(["aaaa"])
    };
    let mut execs = vec![json!({"edge": "s1/edge-1", "command_id": "c1", "at_ms": 5000})];
    if bad {
        execs.push(json!({"edge": "s1/edge-1", "command_id": "c1", "at_ms": 9000}));
    }
    let ticks: Vec<i64> = (0..=30)
        .map(|i| i * 1000)
        .filter(|t| !bad || !(10_000..20_000).contains(t))
        .collect();
    let mut hub_docs =
        vec![json!({"doc": "t/acme/s/s1/dev/d1", "class": "site", "tenant": "acme", "site": "s1"})];
    if bad {
        hub_docs.push(json!({"doc": "t/globex/s/p7/dev/d9", "class": "site", "tenant": "globex", "site": "p7"}));
    }
    let mut logs = vec![json!({"node": "hub-eu", "line_no": 1, "text": "INFO started"})];
    if bad {
        logs.push(json!({"node": "s1/edge-1", "line_no": 42, "text": "thread 'main' panicked at edge-node/src/raw.rs:10:5:"}));
    }
    json!({
        "scenario": "fabricated",
        "seed": 9,
        "duration_ms": 30000,
        "links": [{"a": "s1/edge-1", "b": "hub-eu"}],
        "faults": [{"link": {"a": "s1/edge-1", "b": "hub-eu"}, "direction": "a-to-b", "kind": "partition",
                    "label": "partition", "from_ms": 5000, "to_ms": 15000}],
        "history": {"ops": [
            {"process": "hub-eu/api", "type": "invoke", "f": "command", "value": {"id": "c1"}, "time_ms": 1000},
            {"process": "hub-eu/api", "type": "ok", "f": "command", "value": null, "time_ms": 1010}
        ]},
        "observations": {
            "nodes": [
                {"name": "hub-eu", "role": {"kind": "hub", "tier": "regional", "regions": ["eu"]}},
                {"name": "s1/edge-1", "role": {"kind": "edge", "tenant": "acme", "site": "s1"}}
            ],
            "tenants": [{"id": "acme", "region": "eu"}, {"id": "globex", "region": "us"}],
            "replicas": [
                {"node": "hub-eu", "doc": "t/acme/s/s1/dev/d1", "heads": ["aaaa"]},
                {"node": "s1/edge-1", "doc": "t/acme/s/s1/dev/d1", "heads": heads_e1}
            ],
            "rollup_window_ms": 60000,
            "hub_rollups": [{"hub": "hub-eu", "tenant": "acme", "site": "s1", "rollup": rollup}],
            "acked_samples": acked,
            "command_executions": execs,
            "loop_ticks": [{"node": "s1/edge-1", "loop_name": "cold-room", "period_ms": 1000, "ticks_ms": ticks}],
            "holdings": [{"node": "hub-eu", "docs": hub_docs}],
            "logs": logs,
            "end_ms": 30000,
            "converged_at_ms": if bad { Value::Null } else { json!(21000) }
        }
    })
}

#[test]
fn every_violation_fails_its_checker_with_evidence() {
    let rec: RunRecord = serde_json::from_value(record(true)).unwrap();
    rec.history.validate().unwrap();
    let r = report::build(&rec);
    assert_eq!(r.overall, Status::Fail);
    assert_eq!(r.exit_code, 1);
    let by = |name: &str| r.verdicts.iter().find(|v| v.checker == name).unwrap();
    for name in [
        "convergence",
        "telemetry",
        "commands",
        "liveness",
        "compliance",
        "no-panic",
    ] {
        let v = by(name);
        assert_eq!(v.status, Status::Fail, "{name}: {v:?}");
        assert!(!v.evidence.is_empty(), "{name} has no evidence");
    }
    let text = report::render_text(&r);
    for needle in [
        "t/acme/s/s1/dev/d1 diverged",
        "s1/edge-1#3=4",
        "command c1 executed 2 times",
        "did not tick from 9000ms to 20000ms",
        "t/globex/s/p7/dev/d9",
        "log line 42",
    ] {
        assert!(text.contains(needle), "summary lacks {needle:?}:\n{text}");
    }
    let json: Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["overall"], "fail");
    assert_eq!(json["verdicts"][1]["evidence"][0]["kind"], "telemetry");
    assert_eq!(
        json["verdicts"][1]["evidence"][0]["identified_lost"][0]["seq"],
        3
    );
}

#[test]
fn clean_record_passes_and_renders_a_timeline() {
    let rec: RunRecord = serde_json::from_value(record(false)).unwrap();
    let r = report::build(&rec);
    for v in &r.verdicts {
        assert_eq!(v.status, Status::Pass, "{}: {}", v.checker, v.summary);
    }
    assert_eq!((r.overall, r.exit_code), (Status::Pass, 0));
    let svg = report::render_svg(&r);
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("class=\"verdict\"").count(), 6);
    assert!(svg.contains(r#"data-checker="telemetry" data-status="pass""#));
    assert!(svg.contains("id=\"converged\""));
    assert!(svg.contains("class=\"fault\""));
    // The one-way partition shows as a one-way span on the connectivity row.
    assert!(svg.contains("one-way b-&gt;a 5000..15000 ms"), "{svg}");
    // Balanced tags, and no stray ampersands.
    // Every opened rect is closed, inline or by a closing tag.
    let rects = svg.matches("<rect").count();
    let closed = svg.matches("</rect>").count() + svg.matches("\"/>").count();
    assert!(closed >= rects, "{rects} rects, {closed} closed");
    assert!(
        !svg.replace("&amp;", "")
            .replace("&lt;", "")
            .replace("&gt;", "")
            .replace("&quot;", "")
            .contains('&')
    );
}

fn chaos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chaos"))
}

#[test]
fn binary_report_writes_files_and_exits_by_verdict() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, code) in [(true, 1), (false, 0)] {
        let input = dir.path().join(format!("run-{bad}.json"));
        std::fs::write(&input, serde_json::to_string(&record(bad)).unwrap()).unwrap();
        let out = dir.path().join(format!("out-{bad}"));
        let o = chaos()
            .args(["report", "--input"])
            .arg(&input)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        for f in ["report.json", "summary.txt", "timeline.svg"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(j["exit_code"], code);
    }
    // Bad input is an error (2) with a message naming the file.
    let bad = dir.path().join("broken.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let o = chaos()
        .args(["report", "--input"])
        .arg(&bad)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("broken.json"));
}

#[test]
fn binary_check_scenarios_accepts_the_library_and_rejects_a_bad_file() {
    let o = chaos()
        .arg("check-scenarios")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("8 scenario files, 0 invalid"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "duration = \"10s\"\n[[fleet.hubs]]\nname = \"h\"\nregions = [\"eu\"]\n[[fleet.tenants]]\nid = \"a\"\nregion = \"eu\"\n[[fleet.sites]]\ntenant = \"a\"\nid = \"s\"\n[[timeline]]\nat = \"1s\"\naction = \"loss\"\na = \"s/edge-1\"\nb = \"h\"\nprobability = 2\n").unwrap();
    let o = chaos()
        .arg("check-scenarios")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("bad.toml: timeline[0].probability: 2 is not a probability"),
        "{out}"
    );
}

#[test]
fn binary_relay_forwards_datagrams() {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = chaos()
        .args([
            "relay",
            "--listen",
            &listen.to_string(),
            "--target",
            &target.local_addr().unwrap().to_string(),
            "--stats-every",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    target
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 64];
    let got = loop {
        // The relay may not be listening yet: resend until it forwards.
        client.send_to(b"ping", listen).unwrap();
        if let Ok((n, _)) = target.recv_from(&mut buf) {
            break buf[..n].to_vec();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("relay never forwarded");
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(got, b"ping");
}
