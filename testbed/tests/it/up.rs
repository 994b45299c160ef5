//! `testbed up` as a process: its orchestration against a stand-in for the
//! hub and edge binaries (`src/bin/testbed-fake-node.rs`, same command-line
//! contracts), the data-directory guard, and what happens when a child dies.
//! The fleet against the real binaries is in `fleet.rs`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use schemas::config::EdgeConfig;
use testbed::up::child::pid_alive;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_testbed");

/// The stand-in for the hub and edge binaries (`src/bin/testbed-fake-node.rs`).
fn fake_node() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_testbed-fake-node"))
}

pub(crate) fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Read lines of `child`'s stdout until one contains `needle` (at most
/// `limit`); returns every line read.
pub(crate) async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    needle: &str,
    limit: Duration,
) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(limit, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let hit = l.contains(needle);
            seen.push(l);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "{needle:?} not printed within {limit:?}; got:\n{}",
        seen.join("\n")
    );
    seen
}

pub(crate) async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(s) => s.unwrap(),
        Err(_) => {
            let _ = child.start_kill();
            panic!("testbed up did not exit within {limit:?}");
        }
    }
}

fn up(data: &Path, bin: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("up")
        .arg("--data-dir")
        .arg(data)
        .arg("--hub-bin")
        .arg(bin)
        .arg("--edge-bin")
        .arg(bin)
        .args(["--ready-timeout-s", "20"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Live processes whose command line mentions `needle` (a test's unique
/// temporary directory): what a run left behind.
pub(crate) fn procs_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) && pid_alive(pid) {
            out.push((pid, cmd));
        }
    }
    out
}

fn pids(fleet_json: &Path) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fleet_json).unwrap()).unwrap();
    let mut p = vec![v["hub"]["pid"].as_u64().unwrap() as u32];
    for e in v["edges"].as_array().unwrap() {
        p.push(e["pid"].as_u64().unwrap() as u32);
    }
    p
}

#[tokio::test]
async fn fake_fleet_comes_up_with_progress_and_stops_on_sigterm_leaving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("run");
    let mut child = up(
        &data,
        &fake_node(),
        &[
            "--sites",
            "2",
            "--edges",
            "1",
            "--devices",
            "2",
            "--time-scale",
            "60",
        ],
    )
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let out = read_until(&mut lines, "Ctrl-C to stop", Duration::from_secs(60)).await;
    let text = out.join("\n");
    // 3 hub steps + 2 per edge, numbered.
    for step in 1..=7 {
        assert!(
            text.contains(&format!("[{step}/7]")),
            "step {step} missing:\n{text}"
        );
    }
    assert!(text.contains("edge site-2/edge-1 ready"), "{text}");
    assert!(
        text.contains("hub dashboard: http://127.0.0.1:")
            && text.contains("#token=fsu1.fake-admin"),
        "{text}"
    );

    // Every edge got a valid config naming the hub, its token and devices
    // that answer Modbus on loopback.
    let mut device_addrs = Vec::new();
    for (site, tenant) in [("site-1", "acme"), ("site-2", "globex")] {
        let cfg = EdgeConfig::load(&data.join(format!("{site}-edge-1.toml"))).unwrap();
        assert_eq!(cfg.node.tenant.as_str(), tenant);
        assert_eq!(
            cfg.hub.as_ref().unwrap().join_token.as_deref(),
            Some("fsj1.fake-join")
        );
        assert_eq!(cfg.devices.len(), 2);
        for d in &cfg.devices {
            let mut ctx = tokio_modbus::client::tcp::connect_slave(d.addr, tokio_modbus::Slave(1))
                .await
                .unwrap();
            use tokio_modbus::client::Reader;
            ctx.read_input_registers(0, 1).await.unwrap().unwrap();
            device_addrs.push(d.addr);
        }
    }
    assert!(data.join("logs/hub.log").is_file() && data.join("logs/site-1-edge-1.log").is_file());
    let pids = pids(&data.join("fleet.json"));
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| pid_alive(*p)), "{pids:?}");

    signal(child.id().unwrap(), "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let rest: Vec<String> = {
        let mut v = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            v.push(l);
        }
        v
    };
    let rest = rest.join("\n");
    assert!(status.success(), "{status:?}\n{rest}");
    assert!(
        rest.contains("hub (pid") && rest.contains("stopped"),
        "{rest}"
    );
    assert!(rest.contains("4 simulated device(s) stopped"), "{rest}");
    for p in &pids {
        assert!(!pid_alive(*p), "pid {p} left running");
    }
    assert_eq!(procs_mentioning(&data), Vec::new(), "left behind");
    for a in device_addrs {
        assert!(
            tokio::net::TcpStream::connect(a).await.is_err(),
            "device {a} still serving"
        );
    }
    // The fake edges saw SIGTERM (a clean stop), not SIGKILL.
    let log = std::fs::read_to_string(data.join("logs/site-1-edge-1.log")).unwrap();
    assert!(log.contains("SIGTERM"), "{log}");
}

#[tokio::test]
async fn a_hub_that_fails_to_start_stops_the_fleet_with_its_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("run");
    let mut cmd = up(&data, &fake_node(), &["--sites", "1", "--devices", "1"]);
    cmd.env("FAKE_SERVE_FAIL", "1");
    let out = cmd.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("hub exited with exit status: 3"),
        "{stderr}"
    );
    assert!(stderr.contains("fake hub cannot bind"), "{stderr}");
    assert!(stdout.contains("fleet stopped after an error"), "{stdout}");
}

#[tokio::test]
async fn an_edge_that_dies_stops_everything_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("run");
    let mut cmd = up(&data, &fake_node(), &["--sites", "2", "--devices", "1"]);
    cmd.env("FAKE_EDGE_EXIT_AFTER_MS", "1500");
    let mut child = cmd.spawn().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("edge-1 exited with exit status: 4") && stderr.contains("fake crash"),
        "{stderr}"
    );
    // Everything it started is gone.
    for p in pids(&data.join("fleet.json")) {
        assert!(!pid_alive(p), "pid {p} left running");
    }
}

#[tokio::test]
async fn a_foreign_non_empty_data_dir_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let out = up(dir.path(), &fake_node(), &[]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not empty and not a previous testbed run"),
        "{stderr}"
    );
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "testbed wrote into a foreign directory");
}

#[tokio::test]
async fn missing_binaries_are_named_with_how_to_build_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = up(
        &dir.path().join("run"),
        Path::new("/nonexistent/cloud-hub"),
        &[],
    )
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/cloud-hub") && stderr.contains("cargo build -p cloud-hub"),
        "{stderr}"
    );
}

#[tokio::test]
async fn ctrl_c_while_the_hub_is_starting_stops_it_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("run");
    let mut cmd = up(&data, &fake_node(), &["--sites", "1", "--devices", "1"]);
    cmd.env("FAKE_SERVE_DELAY_MS", "30000");
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    read_until(&mut lines, "[2/5]", Duration::from_secs(30)).await;
    // The hub is being started: wait until its process exists.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !procs_mentioning(&data)
        .iter()
        .any(|(_, c)| c.contains("serve"))
    {
        assert!(tokio::time::Instant::now() < deadline, "hub never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(child.id().unwrap(), "-INT");
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let mut rest = Vec::new();
    while let Ok(Some(l)) = lines.next_line().await {
        rest.push(l);
    }
    let rest = rest.join("\n");
    assert!(status.success(), "{status:?}\n{rest}");
    assert!(rest.contains("interrupted while starting"), "{rest}");
    assert!(rest.contains("hub (pid"), "{rest}");
    assert_eq!(procs_mentioning(&data), Vec::new(), "left behind");
}
