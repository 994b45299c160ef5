//! MQTT ingestion against a real Mosquitto broker (Debian `mosquitto` and
//! `mosquitto-clients`; the test fails naming them when missing, unless
//! `FIELDSYNC_SKIP_MQTT=1`): published samples reach the sink and the
//! rollups, messages published while ingestion is stopped arrive after a
//! restart, a replayed batch is counted once, a malformed payload lands in
//! quarantine, and a sink refusal delays but never loses a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_node::clock::{Clock, ManualClock};
use edge_node::ingest::test_broker::{Mosquitto, skip_requested};
use edge_node::ingest::{self, IngestHandle, SampleSink};
use schemas::config::EdgeConfig;
use schemas::ids::DeviceId;
use schemas::metrics::{Sample, Unit};
use schemas::time::Timestamp;

const NOW: Timestamp = Timestamp(1_800_000_000_000);
const T0: i64 = 1_799_999_940_000; // a minute boundary before NOW

/// Records accepted samples; refuses the first `fail_first` calls.
#[derive(Default)]
struct RecordingSink {
    samples: Mutex<Vec<Sample>>,
    fail_first: AtomicUsize,
    calls: AtomicUsize,
}

impl SampleSink for RecordingSink {
    fn accept(
        &self,
        samples: Vec<Sample>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.fail_first.load(Ordering::SeqCst) {
                return Err(format!("injected sink failure {n}"));
            }
            self.samples.lock().unwrap().extend(samples);
            Ok(())
        })
    }
}

impl RecordingSink {
    fn of(&self, device: &str) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.device.as_str() == device)
            .cloned()
            .collect()
    }
}

fn broker() -> Option<Mosquitto> {
    match Mosquitto::start("") {
        Ok(m) => Some(m),
        Err(e) if skip_requested() => {
            eprintln!("skipping MQTT test (FIELDSYNC_SKIP_MQTT=1): {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn config(data_dir: &Path, broker: &str, client_id: &str) -> EdgeConfig {
    let text = format!(
        r#"
[node]
data_dir = "{}"

[ingest.mqtt]
broker = "{broker}"
client_id = "{client_id}"
reconnect_min_ms = 50
reconnect_max_ms = 500
topics = [ {{ filter = "plant/+/telemetry", device_level = 1 }} ]

[[ingest.profiles]]
name = "room"
timestamp = {{ field = "ts", format = "unix_ms" }}
metrics = [
  {{ name = "temperature", aliases = ["temp_f"], unit = "fahrenheit", min = -40.0, max = 250.0, required = true }},
]

[[ingest.profiles]]
name = "tank"
format = "number"
metrics = [ {{ name = "level", unit = "percent", min = 0.0, max = 100.0 }} ]

[[ingest.devices]]
id = "room-9"
profile = "room"

[[ingest.devices]]
id = "probe"
profile = "room"

[[ingest.devices]]
id = "tank-1"
profile = "tank"
"#,
        data_dir.display()
    );
    EdgeConfig::parse(Path::new("edge.toml"), &text).unwrap()
}

async fn start(cfg: &EdgeConfig, sink: &Arc<RecordingSink>) -> IngestHandle {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(NOW));
    ingest::start(cfg, sink.clone(), clock).await.unwrap()
}

/// Wait for `cond`, polling, up to 20 s.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish probes until one arrives: the subscription is then in place.
async fn wait_subscribed(b: &Mosquitto, sink: &RecordingSink) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    static PROBE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let before = sink.of("probe").len();
    while sink.of("probe").len() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription never became active; broker log:\n{}",
            b.log()
        );
        let i = PROBE.fetch_add(1, Ordering::SeqCst);
        b.publish(
            "plant/probe/telemetry",
            &[format!(
                r#"{{"temperature": 1, "ts": {}}}"#,
                NOW.0 - 10_000_000 + i
            )],
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reading(ts: i64, f: f64) -> String {
    format!(r#"{{"temp_f": {f}, "ts": {ts}}}"#)
}

#[tokio::test]
async fn published_samples_reach_the_sink_and_the_rollups() {
    let Some(b) = broker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let cfg = config(dir.path(), &b.addr(), "edge-rollups");
    let h = start(&cfg, &sink).await;
    wait_subscribed(&b, &sink).await;

    b.publish(
        "plant/room-9/telemetry",
        &[
            reading(T0 + 1_000, 32.0),
            reading(T0 + 2_000, 50.0),
            reading(T0 + 3_000, 68.0),
        ],
    )
    .unwrap();
    b.publish("plant/tank-1/telemetry", &["42.5".into()])
        .unwrap();
    wait_for("4 samples", || {
        sink.of("room-9").len() == 3 && sink.of("tank-1").len() == 1
    })
    .await;

    let room = sink.of("room-9");
    assert!(
        room.iter()
            .all(|s| s.unit == Unit::Celsius && s.metric == "temperature")
    );
    let rollups = edge_node::summariser::summarise_all(room.iter(), 60_000);
    assert_eq!(rollups.len(), 1, "{rollups:?}");
    let r = rollups.values().next().unwrap();
    assert_eq!(r.count, 3);
    assert_eq!(r.window_start, Timestamp(T0));
    assert!(r.min.abs() < 1e-9 && (r.max - 20.0).abs() < 1e-9, "{r:?}");
    assert!((r.mean().unwrap() - 10.0).abs() < 1e-9, "{r:?}");
    // The plain number is stamped with receipt time (the injected clock).
    let tank = sink.of("tank-1");
    assert_eq!(
        (tank[0].value, tank[0].ts, tank[0].unit),
        (42.5, NOW, Unit::Percent)
    );
    assert!(h.stats().mqtt_acked >= 5);
    h.stop().await;
}

#[tokio::test]
async fn samples_published_while_stopped_arrive_after_restart() {
    let Some(b) = broker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let cfg = config(dir.path(), &b.addr(), "edge-restart");
    let h = start(&cfg, &sink).await;
    wait_subscribed(&b, &sink).await;
    h.stop().await;

    let msgs: Vec<String> = (0..20)
        .map(|i| reading(T0 + i * 100, 40.0 + i as f64))
        .collect();
    b.publish("plant/room-9/telemetry", &msgs).unwrap();
    assert!(
        sink.of("room-9").is_empty(),
        "nothing arrives while stopped"
    );

    let h = start(&cfg, &sink).await;
    wait_for("20 samples after restart", || sink.of("room-9").len() == 20).await;
    let mut ts: Vec<i64> = sink.of("room-9").iter().map(|s| s.ts.0).collect();
    ts.sort_unstable();
    assert_eq!(ts, (0..20).map(|i| T0 + i * 100).collect::<Vec<_>>());
    h.stop().await;
}

#[tokio::test]
async fn a_replayed_batch_is_counted_once_even_across_a_restart() {
    let Some(b) = broker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let cfg = config(dir.path(), &b.addr(), "edge-replay");
    let h = start(&cfg, &sink).await;
    wait_subscribed(&b, &sink).await;

    // A device's buffered backlog, as one array message, sent twice, and
    // one reading of it again on its own.
    let backlog: Vec<String> = (0..10).map(|i| reading(T0 + i * 1000, 50.0)).collect();
    let batch = format!("[{}]", backlog.join(","));
    b.publish(
        "plant/room-9/telemetry",
        &[batch.clone(), batch.clone(), backlog[3].clone()],
    )
    .unwrap();
    // A marker after the replays: once it is in, the replays were handled.
    b.publish("plant/room-9/telemetry", &[reading(T0 + 59_000, 50.0)])
        .unwrap();
    wait_for("marker", || {
        sink.of("room-9").iter().any(|s| s.ts.0 == T0 + 59_000)
    })
    .await;
    assert_eq!(sink.of("room-9").len(), 11);
    assert_eq!(h.stats().duplicates, 11);
    h.stop().await;

    // After a restart the window is still remembered (persisted).
    let h = start(&cfg, &sink).await;
    wait_subscribed(&b, &sink).await;
    b.publish(
        "plant/room-9/telemetry",
        &[batch, reading(T0 + 58_000, 50.0)],
    )
    .unwrap();
    wait_for("second marker", || {
        sink.of("room-9").iter().any(|s| s.ts.0 == T0 + 58_000)
    })
    .await;
    assert_eq!(sink.of("room-9").len(), 12);
    assert_eq!(h.stats().duplicates, 10);
    h.stop().await;
}

#[tokio::test]
async fn malformed_payloads_land_in_quarantine_with_their_reason() {
    let Some(b) = broker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let cfg = config(dir.path(), &b.addr(), "edge-quarantine");
    let h = start(&cfg, &sink).await;
    wait_subscribed(&b, &sink).await;

    b.publish(
        "plant/room-9/telemetry",
        &[
            "{not json".into(),
            reading(T0, 999.0),
            format!(r#"{{"temp_f": 50, "ts": {T0}, "humidity": 3}}"#),
        ],
    )
    .unwrap();
    b.publish("plant/ghost/telemetry", &[reading(T0, 50.0)])
        .unwrap();
    wait_for("4 quarantined", || h.quarantine().len() == 4).await;
    let q = h.quarantine();
    assert!(
        q[0].reason.contains("not JSON") && q[0].payload == "{not json",
        "{q:?}"
    );
    assert_eq!(q[1].field.as_deref(), Some("temp_f"));
    assert!(q[1].reason.contains("above the maximum 250"), "{q:?}");
    assert_eq!(q[2].field.as_deref(), Some("humidity"));
    assert_eq!(q[3].device, Some(DeviceId::new("ghost").unwrap()));
    assert!(q[3].reason.contains("unknown device"), "{q:?}");
    assert!(sink.of("room-9").is_empty());

    // Visible through the HTTP API too, and kept across a restart.
    h.stop().await;
    let h = start(&cfg, &sink).await;
    use tower::ServiceExt;
    let resp = ingest::router(&h)
        .oneshot(
            axum::http::Request::get("/api/quarantine")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let entries: Vec<schemas::ingest::QuarantineEntry> = serde_json::from_slice(&body).unwrap();
    assert_eq!(entries, q);
    h.stop().await;
}

#[tokio::test]
async fn a_message_the_sink_refused_is_not_acked_and_is_redelivered() {
    let Some(b) = broker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let cfg = config(dir.path(), &b.addr(), "edge-sinkfail");
    let h = start(&cfg, &sink).await;
    wait_subscribed(&b, &sink).await;
    let acked = h.stats().mqtt_acked;
    sink.fail_first.store(usize::MAX, Ordering::SeqCst);

    b.publish("plant/room-9/telemetry", &[reading(T0 + 5, 60.0)])
        .unwrap();
    wait_for("two refusals", || h.stats().sink_errors >= 2).await;
    assert_eq!(h.stats().mqtt_acked, acked, "nothing acked while refused");
    // Stop while the sink still refuses: the broker keeps the message.
    h.stop().await;
    assert!(sink.of("room-9").is_empty());

    sink.fail_first.store(0, Ordering::SeqCst);
    let h = start(&cfg, &sink).await;
    wait_for("the redelivered sample", || sink.of("room-9").len() == 1).await;
    assert_eq!(sink.of("room-9")[0].ts, Timestamp(T0 + 5));
    wait_for("its ack", || h.stats().mqtt_acked >= 1).await;
    h.stop().await;
}

#[tokio::test]
async fn the_driver_reconnects_after_the_broker_restarts() {
    let Some(mut b) = broker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let cfg = config(dir.path(), &b.addr(), "edge-reconnect");
    let h = start(&cfg, &sink).await;
    wait_subscribed(&b, &sink).await;
    let connects = h.stats().mqtt_connects;

    // SIGKILL: the broker forgets the session (never saved), so the driver
    // must reconnect with backoff and subscribe again on its own.
    b.restart().unwrap();
    wait_for("a reconnect", || h.stats().mqtt_connects > connects).await;
    wait_subscribed(&b, &sink).await;
    b.publish("plant/room-9/telemetry", &[reading(T0 + 7, 70.0)])
        .unwrap();
    wait_for("the sample after reconnect", || {
        sink.of("room-9").len() == 1
    })
    .await;
    assert!(h.mqtt_connected());
    h.stop().await;
}
