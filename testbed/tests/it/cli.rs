//! The `testbed` binary end to end: serve an edge config's devices on free
//! loopback ports, read them over Modbus, stop with Ctrl-C (SIGINT), and
//! leave no process behind; refuse bad configs naming the device.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use schemas::config::EdgeConfig;
use testbed::maps::{SimDeviceSpec, edge_config};
use testbed::physics::DeviceKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_modbus::client::Reader;
use tokio_modbus::prelude::{ExceptionCode, Slave};

const BIN: &str = env!("CARGO_BIN_EXE_testbed");

/// Free loopback ports: bind port 0, note the port, release it. Another
/// process could take one in between; the race is accepted.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn write_config(dir: &Path, devices: &[SimDeviceSpec]) -> std::path::PathBuf {
    let path = dir.join("edge.toml");
    std::fs::write(&path, toml::to_string(&edge_config(devices)).unwrap()).unwrap();
    path
}

fn interrupt(child: &Child) {
    let pid = child.id().expect("child still running");
    let st = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test]
async fn devices_serve_the_config_until_ctrl_c_and_leave_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let devices: Vec<SimDeviceSpec> = DeviceKind::ALL
        .into_iter()
        .zip(&ports)
        .map(|(kind, port)| SimDeviceSpec {
            id: format!("{kind}-1").parse().unwrap(),
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], *port)),
        })
        .collect();
    let config = write_config(dir.path(), &devices);

    let mut child = Command::new(BIN)
        .args(["devices", "--config"])
        .arg(&config)
        .args(["--seed", "7", "--time-scale", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let ready = line.starts_with("ready:");
            printed.push(line);
            if ready {
                break;
            }
        }
    })
    .await
    .expect("testbed did not print ready within 20 s");
    assert!(
        printed.last().unwrap().starts_with("ready: 3 device(s)"),
        "{printed:?}"
    );
    for d in &devices {
        let want = format!("device {} ({}) listening on {}", d.id, d.kind, d.addr);
        assert!(printed.contains(&want), "missing {want:?} in {printed:?}");
    }

    // Each device answers with a plausible value decoded by its spec.
    let cfg = EdgeConfig::load(&config).unwrap();
    let checks = [
        ("cold-room-1", "temperature", 0.0, 10.0),
        ("pump-1", "pressure", 0.0, 1.0),
        ("meter-1", "voltage", 210.0, 245.0),
    ];
    for (id, reg, lo, hi) in checks {
        let dev = cfg.devices.iter().find(|d| d.id.as_str() == id).unwrap();
        let spec = dev.registers.iter().find(|r| r.name == reg).unwrap();
        let mut ctx = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_modbus::client::tcp::connect_slave(dev.addr, Slave(spec.unit_id)),
        )
        .await
        .unwrap()
        .unwrap();
        let words = tokio::time::timeout(
            Duration::from_secs(5),
            ctx.read_input_registers(spec.address, spec.data_type.words()),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap();
        let v = spec.decode(&words).unwrap();
        assert!(
            (lo..=hi).contains(&v),
            "{id} {reg} = {v}, expected {lo}..={hi}"
        );
    }

    // Faults go in through stdin and come out over Modbus.
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"fault meter-1 exception:server-device-failure\nfault nope drop\n")
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    let replies = tokio::time::timeout(Duration::from_secs(10), async {
        [
            lines.next_line().await.unwrap(),
            lines.next_line().await.unwrap(),
        ]
    })
    .await
    .expect("no answer to control lines within 10 s");
    assert_eq!(
        replies[0].as_deref(),
        Some("ok fault meter-1 exception:server-device-failure")
    );
    assert!(
        replies[1]
            .as_deref()
            .unwrap_or("")
            .starts_with("error: no device \"nope\""),
        "{replies:?}"
    );
    let meter = &devices[2];
    let mut ctx = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_modbus::client::tcp::connect_slave(meter.addr, Slave(1)),
    )
    .await
    .unwrap()
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), ctx.read_input_registers(4, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Err(ExceptionCode::ServerDeviceFailure));

    interrupt(&child);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("testbed did not exit within 10 s of SIGINT")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let rest: Vec<String> = {
        let mut v = Vec::new();
        while let Some(l) = lines.next_line().await.unwrap() {
            v.push(l);
        }
        v
    };
    assert_eq!(rest, ["stopped"]);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is still there"
    );
    for d in &devices {
        assert!(
            tokio::net::TcpStream::connect(d.addr).await.is_err(),
            "{} still listening on {}",
            d.id,
            d.addr
        );
    }
}

async fn run_to_end(args: &[&str], config: &Path) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(BIN)
            .args(args)
            .arg(config)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("testbed did not exit within 20 s")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn unknown_device_type_fails_naming_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let text = toml::to_string(&edge_config(&[SimDeviceSpec {
        id: "boiler-1".parse().unwrap(),
        kind: DeviceKind::Meter,
        addr: "127.0.0.1:0".parse().unwrap(),
    }]))
    .unwrap()
    .replace("device_type = \"meter\"", "device_type = \"boiler\"");
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, stdout, stderr) = run_to_end(&["devices", "--config"], &path).await;
    assert!(!ok);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("device boiler-1") && stderr.contains("unknown device type \"boiler\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn registers_the_device_lacks_fail_naming_device_and_register() {
    let dir = tempfile::tempdir().unwrap();
    let text = toml::to_string(&edge_config(&[SimDeviceSpec {
        id: "pump-9".parse().unwrap(),
        kind: DeviceKind::Pump,
        addr: "127.0.0.1:0".parse().unwrap(),
    }]))
    .unwrap()
    .replace("name = \"flow\"", "name = \"viscosity\"");
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, _, stderr) = run_to_end(&["devices", "--config"], &path).await;
    assert!(!ok);
    assert!(
        stderr.contains("device pump-9") && stderr.contains("\"viscosity\""),
        "{stderr}"
    );
    // A bad time scale is refused with the reason.
    let ok_cfg = dir.path().join("ok.toml");
    std::fs::write(
        &ok_cfg,
        toml::to_string(&edge_config(&testbed::maps::fleet(1, 0).unwrap())).unwrap(),
    )
    .unwrap();
    let (ok, _, stderr) = run_to_end(&["devices", "--time-scale", "0", "--config"], &ok_cfg).await;
    assert!(!ok);
    assert!(stderr.contains("time scale 0 must be"), "{stderr}");
    // A missing file is named too.
    let missing = dir.path().join("nope.toml");
    let (ok, _, stderr) = run_to_end(&["devices", "--config"], &missing).await;
    assert!(!ok);
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

#[tokio::test]
async fn example_config_is_a_valid_edge_config() {
    let out = Command::new(BIN)
        .args(["example-config", "--devices", "4", "--base-port", "16000"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let cfg = EdgeConfig::parse(Path::new("stdout"), &text).unwrap();
    let types: Vec<&str> = cfg.devices.iter().map(|d| d.device_type.as_str()).collect();
    assert_eq!(types, ["cold-room", "pump", "meter", "cold-room"]);
    assert_eq!(cfg.devices[3].addr.port(), 16003);
    assert!(!cfg.loops.is_empty() && !cfg.alarms.is_empty());
}
