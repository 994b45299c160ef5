//! The end-to-end check, with the real `cloud-hub` and `edge-node`
//! binaries: `testbed up` brings a small fleet up (2 tenants, 2 sites, 1
//! edge each, 2 devices each, 60x), telemetry rollups from every site reach
//! the hub's API, a setpoint set at the hub reaches the edge's control loop,
//! and SIGTERM stops everything with no process left behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use testbed::up::child::pid_alive;
use testbed::up::http;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::up::{procs_mentioning, read_until, signal, wait_exit};

/// `target/<profile>/` of this test binary (`.../deps/it-...`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

const BIN: &str = env!("CARGO_BIN_EXE_testbed");

/// The hub and edge binaries of this workspace, (re)built so they match the
/// sources (a no-op when they are fresh).
fn binaries() -> (PathBuf, PathBuf) {
    let dir = target_dir();
    let out = std::process::Command::new(env!("CARGO"))
        .args(["build", "-p", "cloud-hub", "-p", "edge-node", "--bins"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let (hub, edge) = (dir.join("cloud-hub"), dir.join("edge-node"));
    assert!(
        out.status.success() && hub.is_file() && edge.is_file(),
        "this test needs the cloud-hub and edge-node binaries in {}: \
         `cargo build -p cloud-hub -p edge-node --bins` failed or built no such binary:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (hub, edge)
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// Poll `check` every 200 ms until it returns `Some`, at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = e,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen within {limit:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_fleet_rollups_reach_the_hub_a_setpoint_reaches_the_loop_and_stop_is_clean() {
    let t0 = std::time::Instant::now();
    let (hub_bin, edge_bin) = binaries();
    eprintln!("binaries ready after {:?}", t0.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("run");
    let mut child = Command::new(BIN)
        .arg("up")
        .arg("--data-dir")
        .arg(&data)
        .arg("--hub-bin")
        .arg(&hub_bin)
        .arg("--edge-bin")
        .arg(&edge_bin)
        .args([
            "--sites",
            "2",
            "--edges",
            "1",
            "--devices",
            "2",
            "--tenants",
            "2",
        ])
        .args([
            "--time-scale",
            "60",
            "--window-s",
            "10",
            "--ready-timeout-s",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    read_until(&mut lines, "Ctrl-C to stop", Duration::from_secs(90)).await;
    eprintln!("fleet up after {:?}", t0.elapsed());
    // Keep draining its stdout so it never blocks on a full pipe.
    let drain = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            rest.push(l);
        }
        rest
    });

    let fleet: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("fleet.json")).unwrap()).unwrap();
    let hub = addr_of(fleet["hub"]["http"].as_str().unwrap());
    let token = fleet["hub"]["admin_token"].as_str().unwrap().to_string();
    let edges = fleet["edges"].as_array().unwrap().clone();
    assert_eq!(edges.len(), 2);
    let mut pids = vec![fleet["hub"]["pid"].as_u64().unwrap() as u32];
    let t = Duration::from_secs(5);

    // Rollups from every site at the hub.
    for e in &edges {
        pids.push(e["pid"].as_u64().unwrap() as u32);
        let (tenant, site) = (e["tenant"].as_str().unwrap(), e["site"].as_str().unwrap());
        let path = format!("/api/v1/telemetry?tenant={tenant}&site={site}&level=minute");
        eventually(
            &format!("rollups of {tenant}/{site} at the hub"),
            Duration::from_secs(60),
            || {
                let (path, token) = (path.clone(), token.clone());
                async move {
                    let r = http::get(hub, &path, Some(&token), t)
                        .await
                        .map_err(|e| e.to_string())?;
                    if !r.ok() {
                        return Err(format!("{}: {}", r.status, r.body));
                    }
                    let v: serde_json::Value =
                        serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
                    let points: usize = v["items"]
                        .as_array()
                        .map(|s| {
                            s.iter()
                                .map(|s| s["points"].as_array().map_or(0, Vec::len))
                                .sum()
                        })
                        .unwrap_or(0);
                    Ok((points > 0).then_some(()))
                }
            },
        )
        .await;
    }

    eprintln!("rollups of every site at the hub after {:?}", t0.elapsed());

    // A setpoint set at the hub reaches the edge's thermostat.
    let e = &edges[0];
    let (tenant, site) = (e["tenant"].as_str().unwrap(), e["site"].as_str().unwrap());
    let edge_http = addr_of(e["http"].as_str().unwrap());
    let body = serde_json::json!({
        "tenant": tenant, "site": site, "target": "cold-room-1",
        "action": "set_desired", "field": "setpoint", "value": 2.5,
        "reason": "testbed end-to-end test",
    })
    .to_string();
    eventually(
        "the hub accepts the setpoint command",
        Duration::from_secs(30),
        || {
            let (body, token) = (body.clone(), token.clone());
            async move {
                let r = http::post_json(hub, "/api/v1/commands", Some(&token), &body, t)
                    .await
                    .map_err(|e| e.to_string())?;
                if r.ok() {
                    Ok(Some(()))
                } else {
                    Err(format!("{}: {}", r.status, r.body))
                }
            }
        },
    )
    .await;
    eventually(
        "setpoint 2.5 in the edge's /api/loops",
        Duration::from_secs(30),
        || async move {
            let r = http::get(edge_http, "/api/loops", None, t)
                .await
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
            let loops = v
                .as_array()
                .cloned()
                .or_else(|| v["loops"].as_array().cloned())
                .unwrap_or_default();
            let sp = loops
                .iter()
                .find(|l| l["name"] == "cold-room-1-thermostat")
                .and_then(|l| l["state"]["setpoint"].as_f64());
            if sp == Some(2.5) {
                Ok(Some(()))
            } else {
                Err(format!("setpoint {sp:?} in {}", r.body))
            }
        },
    )
    .await;

    eprintln!("setpoint at the edge's loop after {:?}", t0.elapsed());

    // Clean stop, nothing left.
    assert!(pids.iter().all(|p| pid_alive(*p)), "{pids:?}");
    signal(child.id().unwrap(), "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let rest = drain.await.unwrap().join("\n");
    eprintln!("stopped after {:?}", t0.elapsed());
    assert!(status.success(), "{status:?}\n{rest}");
    assert!(rest.contains("fleet stopped;"), "{rest}");
    assert!(
        !rest.contains("killed after"),
        "a child needed SIGKILL:\n{rest}"
    );
    for p in &pids {
        assert!(!pid_alive(*p), "pid {p} left running");
    }
    assert_eq!(procs_mentioning(&data), Vec::new(), "left behind");
}
