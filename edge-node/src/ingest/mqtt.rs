//! MQTT driver: a persistent QoS 1 session on the site broker (rumqttc, manual
//! acks). The event-loop task only moves packets; a worker task maps batches
//! of messages through the perimeter, hands them to the sink, and acks each
//! message (in arrival order) only once its samples are durable or it is
//! quarantined.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use schemas::ids::DeviceId;
use schemas::ingest::{IngestSource, MqttSection};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::perimeter::{Keyed, Reject, map_payload, topic_matches};
use super::{IngestError, Shared};

/// Most messages handled in one sink call.
const MAX_BATCH: usize = 512;

/// The running driver.
pub(crate) struct MqttTask {
    stop: watch::Sender<bool>,
    connected: Arc<AtomicBool>,
    client: AsyncClient,
    eventloop: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
}

impl Drop for MqttTask {
    /// Dropped without [`MqttTask::stop`]: end both tasks anyway.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in [self.eventloop.take(), self.worker.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

impl MqttTask {
    pub(crate) fn spawn(cfg: MqttSection, shared: Arc<Shared>) -> Result<MqttTask, IngestError> {
        let (host, port) = cfg
            .broker
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((
                    h.trim_matches(|c| c == '[' || c == ']'),
                    p.parse::<u16>().ok()?,
                ))
            })
            .ok_or_else(|| {
                IngestError::Config(
                    "ingest.mqtt.broker".into(),
                    format!("{:?} is not host:port", cfg.broker),
                )
            })?;
        let mut opts = MqttOptions::new(cfg.client_id.clone(), host, port);
        opts.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(cfg.keep_alive_s))
            // Oversized payloads are refused by the perimeter (quarantined
            // and acked), not by the client: a client-side limit would drop
            // the connection and the broker would redeliver for ever.
            .set_max_packet_size(256 << 20, 1 << 20)
            .set_request_channel_capacity(4096);
        if let Some(u) = &cfg.username {
            opts.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
        }
        let (client, eventloop) = AsyncClient::new(opts, 4096);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let el = tokio::spawn(run_eventloop(
            eventloop,
            client.clone(),
            cfg.clone(),
            shared.clone(),
            work_tx,
            stop_rx.clone(),
            connected.clone(),
        ));
        let worker = tokio::spawn(run_worker(cfg, shared, client.clone(), work_rx, stop_rx));
        Ok(MqttTask {
            stop: stop_tx,
            connected,
            client,
            eventloop: Some(el),
            worker: Some(worker),
        })
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(w) = self.worker.take()
            && let Err(e) = w.await
        {
            tracing::warn!(error = %e, "mqtt ingest worker ended abnormally");
        }
        // A clean DISCONNECT keeps the persistent session on the broker;
        // whatever was not acked is redelivered on the next connect.
        let _ = self.client.try_disconnect();
        if let Some(mut el) = self.eventloop.take()
            && tokio::time::timeout(Duration::from_secs(2), &mut el)
                .await
                .is_err()
        {
            el.abort();
            let _ = el.await;
        }
    }
}

async fn run_eventloop(
    mut el: EventLoop,
    client: AsyncClient,
    cfg: MqttSection,
    shared: Arc<Shared>,
    work: mpsc::UnboundedSender<Publish>,
    mut stop: watch::Receiver<bool>,
    connected: Arc<AtomicBool>,
) {
    let min = Duration::from_millis(cfg.reconnect_min_ms);
    let max = Duration::from_millis(cfg.reconnect_max_ms);
    let mut backoff = min;
    loop {
        let ev = el.poll().await;
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = min;
                connected.store(true, Ordering::Relaxed);
                shared
                    .counters
                    .mqtt_connects
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(broker = %cfg.broker, session_present = ack.session_present, "mqtt connected");
                // Subscribe on every connect: harmless when the session
                // already holds the subscriptions, needed when it does not.
                for t in &cfg.topics {
                    if let Err(e) = client.try_subscribe(t.filter.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(filter = %t.filter, error = %e, "mqtt subscribe not queued");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if work.send(p).is_err() {
                    break;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!("mqtt broker refused a subscription");
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.store(false, Ordering::Relaxed);
                if *stop.borrow() {
                    break;
                }
                tracing::warn!(broker = %cfg.broker, error = %e, retry_in_ms = backoff.as_millis() as u64, "mqtt connection failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(max);
            }
        }
    }
    connected.store(false, Ordering::Relaxed);
}

/// Which device a topic is about.
fn device_of(cfg: &MqttSection, topic: &str) -> Result<DeviceId, Reject> {
    for t in &cfg.topics {
        if !topic_matches(&t.filter, topic) {
            continue;
        }
        if let Some(d) = &t.device {
            return Ok(d.clone());
        }
        if let Some(l) = t.device_level {
            let level = topic.split('/').nth(l as usize).unwrap_or("");
            return DeviceId::new(level).map_err(|e| {
                Reject::whole(format!(
                    "topic level {l} ({level:?}) is not a device id: {e}"
                ))
            });
        }
    }
    Err(Reject::whole("topic matches no configured subscription"))
}

/// Map one message; `Err` carries the device (if known) and the rejection.
fn map_message(
    cfg: &MqttSection,
    shared: &Shared,
    p: &Publish,
) -> Result<(DeviceId, Vec<Keyed>), (Option<DeviceId>, Reject)> {
    let device = device_of(cfg, &p.topic).map_err(|r| (None, r))?;
    let Some(rules) = shared.perimeter.devices.get(&device) else {
        return Err((
            Some(device.clone()),
            Reject::whole(format!(
                "unknown device {:?}: not in [[ingest.devices]]",
                device.as_str()
            )),
        ));
    };
    if !rules.cfg.mqtt {
        return Err((
            Some(device),
            Reject::whole("MQTT is disabled for this device (mqtt = false)"),
        ));
    }
    if p.payload.len() as u64 > shared.cfg.max_body_bytes {
        return Err((
            Some(device),
            Reject::whole(format!(
                "payload of {} bytes is over max_body_bytes {}",
                p.payload.len(),
                shared.cfg.max_body_bytes
            )),
        ));
    }
    let keyed = map_payload(
        rules,
        &p.payload,
        shared.clock.now(),
        shared.perimeter.max_future_ms,
    )
    .map_err(|r| (Some(device.clone()), r))?;
    if let Err(wait) = shared.take_rate(&device, keyed.len()) {
        return Err((
            Some(device),
            Reject::whole(format!(
                "rate limit: {} samples/s sustained, burst {}; retry in {} ms",
                rules.cfg.rate_per_s,
                rules.cfg.burst,
                wait.as_millis()
            )),
        ));
    }
    Ok((device, keyed))
}

async fn run_worker(
    cfg: MqttSection,
    shared: Arc<Shared>,
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    mut stop: watch::Receiver<bool>,
) {
    let min = Duration::from_millis(cfg.reconnect_min_ms);
    let max = Duration::from_millis(cfg.reconnect_max_ms);
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = stop.changed() => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut keyed = Vec::new();
        for p in &batch {
            match map_message(&cfg, &shared, p) {
                Ok((_, k)) => keyed.extend(k),
                Err((device, reject)) => {
                    let mut delay = min;
                    // The quarantine write must succeed before the ack.
                    while let Err(e) = shared.quarantine(
                        IngestSource::Mqtt,
                        &p.topic,
                        device.as_ref(),
                        &reject,
                        &p.payload,
                    ) {
                        tracing::error!(error = %e, "quarantine write failed; message not acked");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => return,
                        }
                        delay = (delay * 2).min(max);
                    }
                }
            }
        }
        // Retry the sink until it accepts or we are stopped: the messages
        // stay unacked meanwhile (the broker holds them).
        let mut delay = min;
        loop {
            match shared.submit(keyed.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "sink refused mqtt samples; not acked");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => return,
                    }
                    delay = (delay * 2).min(max);
                }
            }
        }
        for p in &batch {
            if p.qos == QoS::AtMostOnce {
                continue;
            }
            match client.ack(p).await {
                Ok(()) => {
                    shared.counters.mqtt_acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // Event loop gone: the broker will redeliver, dedupe
                    // catches the replay.
                    tracing::warn!(error = %e, "mqtt ack not sent");
                }
            }
        }
    }
}
