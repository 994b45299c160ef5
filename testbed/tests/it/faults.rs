//! Each injectable device fault is observable at the edge and never crashes
//! it: the edge's real Modbus adapter (`edge_node::modbus::spawn_device`)
//! and alarm engine poll a simulated device over loopback Modbus TCP while a
//! fault is injected; the fault shows as device health, an alarm or the
//! values read; after the fault is cleared the same adapter task reads good
//! values again (it neither died nor wedged).

use std::sync::Arc;
use std::time::Duration;

use edge_node::alarms::{AlarmEngine, UNREACHABLE_RULE, UnreachableRule};
use edge_node::clock::{Clock, SystemClock};
use edge_node::modbus::{AdapterOptions, DeviceEvent, LatestValues, spawn_device};
use schemas::alarm::Severity;
use schemas::device::HealthStatus;
use schemas::ids::DeviceId;
use testbed::device::{DeviceHandle, Fault};
use testbed::maps::device_config;
use testbed::physics::DeviceKind;
use testbed::server::DeviceServer;
use tokio::sync::mpsc;
use tokio_modbus::ExceptionCode;

/// The edge side of one device: adapter, events, alarm engine.
struct Edge {
    id: DeviceId,
    values: LatestValues,
    events: mpsc::Receiver<DeviceEvent>,
    alarms: AlarmEngine,
    samples: Vec<f64>,
    runner: edge_node::modbus::DeviceRunner,
}

impl Edge {
    /// Feed pending events to the alarm engine; keep temperature samples.
    fn drain(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            if let DeviceEvent::Sample(s) = &ev
                && s.metric == "temperature"
            {
                self.samples.push(s.value);
            }
            self.alarms.observe_event(&ev, SystemClock.now());
        }
        self.alarms.tick(SystemClock.now());
    }

    fn unreachable_alarm(&self) -> bool {
        self.alarms
            .active()
            .iter()
            .any(|a| a.rule == UNREACHABLE_RULE && a.device == self.id)
    }

    /// Poll (draining events) until `cond` holds, at most 10 s.
    async fn until(&mut self, what: &str, cond: impl Fn(&Edge) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            self.drain();
            if cond(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not seen within 10 s; health {:?}, alarms {:?}",
                self.runner.handle().health(),
                self.alarms.active()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn status(&self) -> HealthStatus {
        self.runner.handle().health().status
    }
}

async fn start(device: &DeviceHandle, id: &DeviceId) -> (DeviceServer, Edge) {
    let server = DeviceServer::start(device.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut cfg = device_config(DeviceKind::ColdRoom, id.clone(), server.addr());
    cfg.timeout_ms = 200;
    for r in &mut cfg.registers {
        r.poll_ms = 50;
    }
    let values = LatestValues::new();
    let (tx, events) = mpsc::channel(4096);
    let opts = AdapterOptions {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        unreachable_after: 3,
        command_queue: 16,
    };
    let runner = spawn_device(cfg, opts, Arc::new(SystemClock), values.clone(), tx).unwrap();
    let alarms = AlarmEngine::new(
        Vec::new(),
        Some(UnreachableRule {
            delay_ms: 0,
            severity: Severity::Critical,
        }),
    )
    .unwrap();
    let edge = Edge {
        id: id.clone(),
        values,
        events,
        alarms,
        samples: Vec::new(),
        runner,
    };
    (server, edge)
}

/// After a fault is cleared, the same adapter reads good values again and
/// the unreachable alarm (if any) clears.
async fn recovers(device: &DeviceHandle, edge: &mut Edge, fault: &str) {
    device.clear_faults();
    edge.until(&format!("{fault}: health Ok again after clear"), |e| {
        e.status() == HealthStatus::Ok && !e.unreachable_alarm()
    })
    .await;
    let truth = device.signal("temperature").unwrap();
    let n = edge.samples.len();
    edge.until(&format!("{fault}: a good sample after clear"), |e| {
        e.samples[n..].iter().any(|v| (v - truth).abs() < 0.2)
    })
    .await;
}

#[tokio::test]
async fn every_device_fault_shows_at_the_edge_and_the_edge_recovers() {
    let id = DeviceId::new("cold-room-1").unwrap();
    let device = DeviceHandle::simulated(DeviceKind::ColdRoom, 11, 8.0 * 3600.0);
    let (server, mut edge) = start(&device, &id).await;
    edge.until("first good reads", |e| e.status() == HealthStatus::Ok)
        .await;

    // Stuck: health stays Ok, but the value the edge holds no longer follows
    // the room (4 h without cooling warms it by degrees).
    device.inject(Fault::Stuck {
        signal: Some("temperature".into()),
    });
    let frozen = device.lock().reported("temperature").unwrap();
    device.advance(Duration::from_secs(4 * 3600));
    let truth = device.signal("temperature").unwrap();
    assert!(
        (truth - frozen).abs() > 1.0,
        "room did not move: {frozen} -> {truth}"
    );
    let n = edge.samples.len();
    edge.until("stuck: samples after the room moved", |e| {
        e.samples.len() > n + 5
    })
    .await;
    assert!(
        edge.samples[n..].iter().all(|v| (v - frozen).abs() < 0.11),
        "stuck value not seen: frozen {frozen}, read {:?}",
        &edge.samples[n..]
    );
    assert_eq!(
        edge.status(),
        HealthStatus::Ok,
        "a stuck sensor still answers"
    );
    recovers(&device, &mut edge, "stuck").await;

    // Spikes: values far from the truth reach the edge.
    device.inject(Fault::Spikes {
        signal: Some("temperature".into()),
        probability: 1.0,
        magnitude: 15.0,
    });
    let truth = device.signal("temperature").unwrap();
    let n = edge.samples.len();
    edge.until("spikes: a value 10 C off", |e| {
        e.samples[n..].iter().any(|v| (v - truth).abs() > 10.0)
    })
    .await;
    recovers(&device, &mut edge, "spikes").await;

    // Modbus exception: the device talks but reads fail: Degraded, with the
    // error kept.
    device.inject(Fault::Exception(ExceptionCode::ServerDeviceFailure));
    edge.until("exception: Degraded", |e| {
        e.status() == HealthStatus::Degraded
    })
    .await;
    let err = edge.runner.handle().health().last_error.unwrap_or_default();
    assert!(!err.is_empty(), "no error recorded for the exception");
    recovers(&device, &mut edge, "exception").await;

    // Slow (longer than the edge's timeout), missing answers, dropped
    // connections: the device stops talking: Unreachable and an alarm.
    for fault in [
        Fault::Slow {
            delay: Duration::from_millis(600),
        },
        Fault::Missing,
        Fault::DropConnection,
    ] {
        let name = format!("{fault:?}");
        device.inject(fault);
        edge.until(&format!("{name}: Unreachable with an alarm"), |e| {
            e.status() == HealthStatus::Unreachable && e.unreachable_alarm()
        })
        .await;
        let h = edge.runner.handle().health();
        assert!(h.last_error.is_some(), "{name}: no error recorded: {h:?}");
        recovers(&device, &mut edge, &name).await;
    }

    // The latest-value cell the control loops read is fresh again.
    assert!(edge.values.get(&id, "temperature").is_some());
    edge.runner.stop().await;
    server.stop().await.unwrap();
}
