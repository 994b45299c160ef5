//! The dashboard in Debian's headless Chromium, driven over WebDriver
//! (`chromedriver`): the fleet overview renders with data, a device page
//! draws a telemetry chart, an alarm is acknowledged with a click (checked
//! through the API), and a screenshot of the overview is saved to
//! `$FIELDSYNC_ARTIFACTS_DIR/fleet-overview.png` (default
//! `target/ci-artifacts/`).
//!
//! Needs `apt-get install chromium chromium-driver`; fails without them
//! unless `FIELDSYNC_SKIP_BROWSER=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cloud_hub::analytics::{DeviceKey, EdgeStatus};
use cloud_hub::api::data::{DeviceRecord, FleetAlarm, MemoryFleet, SiteRecord};
use cloud_hub::api::{self, ApiState, FleetData, ManualClock, RateLimit, Scope};
use schemas::alarm::{Alarm, Severity};
use schemas::device::{FieldValue, HealthStatus, ReportedState};
use schemas::metrics::{Rollup, Unit};
use schemas::time::Timestamp;
use schemas::{DeviceId, SiteId, TenantId};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const T0: i64 = 1_790_000_000_000;
const DEADLINE: Duration = Duration::from_secs(30);

// ---------- a minimal blocking HTTP/1.1 client ----------

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = auth {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then exactly Content-Length bytes (some servers keep
    // the connection open despite `Connection: close`).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut payload = raw[split + 4..].to_vec();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    match length {
        Some(n) => {
            while payload.len() < n {
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0, "connection closed mid-body");
                payload.extend_from_slice(&buf[..k]);
            }
            payload.truncate(n);
        }
        None => {
            s.read_to_end(&mut payload).unwrap();
            if head.contains("transfer-encoding: chunked") {
                payload = dechunk(&payload);
            }
        }
    }
    let v = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&payload).unwrap_or(Value::Null)
    };
    (status, v)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

// ---------- chromedriver ----------

/// Kills chromedriver and every Chromium process using our profile
/// directory when dropped, so a failing test leaves no browser behind.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: Option<String>,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            // Best effort: a clean session end closes Chromium.
            let _ = std::panic::catch_unwind(|| {
                http(self.addr, "DELETE", &format!("/session/{id}"), None, None)
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium processes started for this test carry our unique
        // profile directory on their command line.
        let marker = self.profile.path().to_string_lossy().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                    continue;
                };
                if String::from_utf8_lossy(&cmd).contains(&marker) {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                }
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut b = Browser {
            driver,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: None,
            profile: tempfile::tempdir().unwrap(),
        };
        let start = Instant::now();
        loop {
            if TcpStream::connect(b.addr).is_ok() {
                let (st, v) = http(b.addr, "GET", "/status", None, None);
                if st == 200 && v["value"]["ready"] == json!(true) {
                    break;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "chromedriver did not become ready on {}",
                b.addr
            );
            std::thread::yield_now();
            wait_a_little();
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", b.profile.path().display()),
                ]
            }
        }}});
        let (st, v) = http(b.addr, "POST", "/session", None, Some(&caps));
        assert_eq!(st, 200, "new session: {v}");
        b.session = Some(v["value"]["sessionId"].as_str().unwrap().to_string());
        b
    }

    fn cmd(&self, method: &str, rest: &str, body: Option<Value>) -> Value {
        let id = self.session.as_ref().unwrap();
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (st, v) = http(
            self.addr,
            method,
            &format!("/session/{id}{rest}"),
            None,
            body.as_ref(),
        );
        assert_eq!(st, 200, "{method} {rest}: {v}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Poll `script` (returning a truthy value when done) until the deadline.
    fn wait_for(&self, what: &str, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script, json!([]));
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            if start.elapsed() > DEADLINE {
                let page = self.js(
                    "return document.getElementById('app').outerHTML.slice(0, 2000)",
                    json!([]),
                );
                panic!("timed out waiting for {what}; page: {page}");
            }
            wait_a_little();
        }
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// A short pause between polls of a condition (never a synchronisation by
/// itself: every caller re-checks its condition against a deadline).
fn wait_a_little() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let _keep = tx;
    let _ = rx.recv_timeout(Duration::from_millis(100));
}

// ---------- the fleet ----------

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

fn fleet() -> Arc<MemoryFleet> {
    let f = Arc::new(MemoryFleet::default());
    for (s, name, seen) in [
        ("plant-1", "North plant", T0 - 5_000),
        ("plant-2", "South plant", T0 - 3_600_000),
    ] {
        f.put_site(SiteRecord::new(tenant("acme"), site(s), name));
        f.put_edge(EdgeStatus {
            endpoint: format!("{:0>64}", if s == "plant-1" { "e1" } else { "e2" }),
            tenant: tenant("acme"),
            site: site(s),
            last_seen: Some(Timestamp(seen)),
            lag_ms: Some(200),
            docs_behind: 0,
            bytes_queued: 0,
        });
    }
    for (s, d) in [
        ("plant-1", "pump-1"),
        ("plant-1", "pump-2"),
        ("plant-2", "boiler-1"),
    ] {
        let mut rec = DeviceRecord::new(
            DeviceKey::parse("acme", s, d).unwrap(),
            "thermostat",
            &["line-a"],
        );
        rec.desired
            .fields
            .insert("high_limit".into(), FieldValue::Number(80.0));
        rec.reported = ReportedState::default();
        rec.reported.health.status = HealthStatus::Ok;
        f.put_device(rec);
    }
    for i in 0..30i64 {
        let v = 20.0 + (i as f64 / 4.0).sin() * 5.0;
        f.put_rollup(
            &tenant("acme"),
            &site("plant-1"),
            Rollup {
                schema_version: Default::default(),
                device: DeviceId::new("pump-1").unwrap(),
                metric: "temperature".into(),
                unit: Unit::Celsius,
                window_start: Timestamp(T0 - 1_800_000 + i * 60_000),
                window_ms: 60_000,
                count: 6,
                min: v - 1.0,
                max: v + 1.0,
                sum: v * 6.0,
                first: v,
                first_ts: Timestamp(T0 - 1_800_000 + i * 60_000),
                last: v,
                last_ts: Timestamp(T0 - 1_800_000 + i * 60_000 + 50_000),
                clock_unsynced: false,
            },
        );
    }
    f.put_alarm(FleetAlarm::new(
        tenant("acme"),
        site("plant-1"),
        Alarm {
            schema_version: Default::default(),
            id: "high:pump-1:1".into(),
            rule: "high".into(),
            device: DeviceId::new("pump-1").unwrap(),
            metric: "temperature".into(),
            severity: Severity::Critical,
            raised_at: Timestamp(T0 - 60_000),
            value: 91.5,
            message: "temperature above 90".into(),
            cleared_at: None,
            acked_by: None,
            acked_at: None,
        },
    ));
    f
}

fn artifacts_dir() -> PathBuf {
    std::env::var_os("FIELDSYNC_ARTIFACTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ci-artifacts"))
}

#[test]
fn dashboard_renders_charts_and_acknowledges_in_chromium() {
    if std::env::var("FIELDSYNC_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("FIELDSYNC_SKIP_BROWSER=1: the Chromium dashboard test is skipped");
        return;
    }
    for bin in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: run `apt-get install chromium chromium-driver` (or set FIELDSYNC_SKIP_BROWSER=1 on a developer machine without it)"
        );
    }

    // The hub's API and dashboard, in-process on loopback.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fleet = fleet();
    let state = ApiState::new(
        fleet.clone(),
        Arc::new(ManualClock::new(T0)),
        RateLimit {
            burst: 10_000,
            per_second: 10_000.0,
        },
    );
    let token = state
        .tokens
        .create_user_token("admin", Scope::Admin)
        .unwrap();
    let app = api::router(state).merge(cloud_hub::dashboard::router());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let hub = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    let browser = Browser::start();
    let base = format!("http://{hub}");

    // `/` leads to the dashboard, which asks for a token; paste it.
    browser.goto(&format!("{base}/"));
    browser.wait_for(
        "the login form",
        "return !document.getElementById('login').hidden",
    );
    browser.js(
        "document.getElementById('token-input').value = arguments[0]; document.getElementById('login-form').requestSubmit(); return true;",
        json!([token]),
    );
    browser.wait_for(
        "the fleet overview with data",
        "const a = document.getElementById('app'); return a.dataset.state === 'ready' && a.dataset.view === 'overview' && document.querySelector('#alarms tr[data-alarm]') !== null;",
    );
    let counts = browser.js(
        "return ['sites-count','edges-online','edges-offline','alarms-active'].map(id => document.getElementById(id).textContent.trim())",
        json!([]),
    );
    assert_eq!(counts, json!(["2", "1", "1", "1"]), "overview cards");
    assert_eq!(
        browser.js("return localStorage.getItem('fieldsync.token')", json!([])),
        json!(token),
        "token kept in localStorage"
    );
    let shot = artifacts_dir().join("fleet-overview.png");
    browser.screenshot(&shot);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "screenshot too small"
    );

    // The device page draws one chart path with a point per minute rollup.
    browser.js(
        "location.hash = '#/device/acme:plant-1:pump-1'; return true;",
        json!([]),
    );
    let d = browser.wait_for(
        "the telemetry chart",
        "const a = document.getElementById('app'); const p = document.querySelector('#charts svg path.series'); return a.dataset.view === 'device' && a.dataset.state === 'ready' && p ? p.getAttribute('d') : null;",
    );
    let d = d.as_str().unwrap();
    assert!(d.starts_with('M'), "path {d}");
    assert_eq!(
        d.matches('L').count(),
        29,
        "30 points make 29 segments: {d}"
    );

    // Acknowledge the alarm from the overview with a click.
    browser.js("location.hash = '#/'; return true;", json!([]));
    browser.wait_for(
        "the overview again",
        "const a = document.getElementById('app'); return a.dataset.view === 'overview' && a.dataset.state === 'ready' && document.querySelector('button.ack');",
    );
    let el = browser.cmd(
        "POST",
        "/element",
        Some(json!({ "using": "css selector", "value": "button.ack" })),
    );
    let el_id = el
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    browser.cmd("POST", &format!("/element/{el_id}/click"), None);
    browser.wait_for(
        "the alarm to show as acknowledged",
        "return document.querySelector('#alarms .acked') !== null && document.querySelector('button.ack') === null;",
    );
    // The API (not just the page) says it is acknowledged, by whom and why.
    let (st, v) = http(hub, "GET", "/api/v1/alarms", Some(&token), None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["items"][0]["alarm"]["acked_by"],
        json!("admin:admin"),
        "{v}"
    );
    let audit = fleet.audit();
    let ack = audit
        .iter()
        .find(|r| r.entry.action == "alarm.ack")
        .expect("alarm.ack audited");
    assert_eq!(ack.entry.reason, "seen on dashboard");

    drop(browser);
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();
}
