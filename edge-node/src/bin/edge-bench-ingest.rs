//! Bench: accepted MQTT samples per second through the ingest on one core
//! (a `current_thread` runtime), with a no-op sink and with the raw zone as
//! sink. Each run queues N messages on a private Mosquitto for the edge's
//! persistent session while the ingest is stopped, then starts the ingest
//! and times the drain until every sample is accepted. Prints medians.
//!
//! `cargo run --release -p edge-node --bin edge-bench-ingest`
//! (needs Debian's `mosquitto` and `mosquitto-clients`)

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edge_node::clock::{Clock, SystemClock};
use edge_node::ingest::test_broker::Mosquitto;
use edge_node::ingest::{self, SampleSink};
use edge_node::raw_zone::{RawZone, RawZoneError, RawZoneOptions};
use schemas::config::EdgeConfig;
use schemas::metrics::Sample;

#[derive(Parser)]
#[command(about = "Measure MQTT ingest throughput on one core")]
struct Args {
    /// Samples per run.
    #[arg(long, default_value_t = 20_000)]
    samples: u64,
    /// Runs per figure (the median is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Counts accepted samples.
struct NoopSink(AtomicU64);

impl SampleSink for NoopSink {
    fn accept(
        &self,
        samples: Vec<Sample>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        self.0.fetch_add(samples.len() as u64, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

/// Appends to a raw zone; accepted once durable (group commit per batch).
struct RawSink {
    zone: RawZone,
    count: AtomicU64,
}

impl SampleSink for RawSink {
    fn accept(
        &self,
        samples: Vec<Sample>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let n = samples.len() as u64;
            let mut acks = Vec::with_capacity(samples.len());
            for s in samples {
                match self.zone.try_append(s) {
                    Ok(a) => acks.push(a),
                    Err(RawZoneError::QueueFull { sample, .. }) => {
                        for a in acks.drain(..) {
                            a.await.map_err(|e| e.to_string())?;
                        }
                        self.zone.append(*sample).await.map_err(|e| e.to_string())?;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            for a in acks {
                a.await.map_err(|e| e.to_string())?;
            }
            self.count.fetch_add(n, Ordering::Relaxed);
            Ok(())
        })
    }
}

fn config(dir: &Path, broker: &str, client: &str) -> anyhow::Result<EdgeConfig> {
    let text = format!(
        r#"
[node]
data_dir = "{}"
[ingest]
dedupe_max_entries = 1000000
[ingest.mqtt]
broker = "{broker}"
client_id = "{client}"
topics = [ {{ filter = "bench/+/t", device_level = 1 }} ]
[[ingest.profiles]]
name = "p"
timestamp = {{ field = "ts", format = "unix_ms" }}
metrics = [ {{ name = "temperature", unit = "celsius", min = -100.0, max = 1000.0 }} ]
[[ingest.devices]]
id = "dev-1"
profile = "p"
rate_per_s = 1e9
burst = 1e9
[[ingest.devices]]
id = "probe"
profile = "p"
"#,
        dir.display()
    );
    EdgeConfig::parse(Path::new("bench.toml"), &text).context("bench config")
}

#[derive(Clone, Copy, PartialEq)]
enum SinkKind {
    Noop,
    Raw,
}

async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// One run: returns accepted samples per second.
async fn run(
    broker: &Mosquitto,
    kind: SinkKind,
    per_msg: u64,
    samples: u64,
    run_no: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let client = format!("bench-{}-{per_msg}-{run_no}", kind as u8);
    let cfg = config(dir.path(), &broker.addr(), &client)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (sink, count): (Arc<dyn SampleSink>, Box<dyn Fn() -> u64>) = match kind {
        SinkKind::Noop => {
            let s = Arc::new(NoopSink(AtomicU64::new(0)));
            (s.clone(), Box::new(move || s.0.load(Ordering::Relaxed)))
        }
        SinkKind::Raw => {
            let (zone, _) = RawZone::open(dir.path().join("raw"), RawZoneOptions::default())
                .context("open raw zone")?;
            let s = Arc::new(RawSink {
                zone,
                count: AtomicU64::new(0),
            });
            (s.clone(), Box::new(move || s.count.load(Ordering::Relaxed)))
        }
    };
    // Establish the persistent session and its subscription.
    let h = ingest::start(&cfg, sink.clone(), clock.clone()).await?;
    let mut i = 0i64;
    let now = clock.now().0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() == 0 {
        anyhow::ensure!(Instant::now() < deadline, "no probe arrived");
        broker.publish(
            "bench/probe/t",
            &[format!(
                r#"{{"temperature": 1, "ts": {}}}"#,
                now - 1_000_000 + i
            )],
        )?;
        i += 1;
        wait_until("probe", 1, || count() > 0).await.ok();
    }
    h.stop().await;
    let base = count();

    // Queue the messages while the edge is away.
    let msgs: Vec<String> = (0..samples / per_msg)
        .map(|m| {
            let items: Vec<String> = (0..per_msg)
                .map(|k| {
                    let ts = now - 600_000 + (m * per_msg + k) as i64;
                    format!(r#"{{"temperature": {}, "ts": {ts}}}"#, (ts % 50) as f64)
                })
                .collect();
            if per_msg == 1 {
                items.concat()
            } else {
                format!("[{}]", items.join(","))
            }
        })
        .collect();
    broker.publish("bench/dev-1/t", &msgs)?;
    let target = base + (samples / per_msg) * per_msg;

    let t0 = Instant::now();
    let h = ingest::start(&cfg, sink, clock).await?;
    wait_until("all samples", 300, || count() >= target).await?;
    let dt = t0.elapsed();
    h.stop().await;
    Ok((target - base) as f64 / dt.as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("edge-bench-ingest: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        println!(
            "MQTT ingest, current_thread runtime, {} samples per run, median of {} runs",
            args.samples, args.runs
        );
        println!(
            "{:<10} {:>8} {:>14} {:>16}",
            "sink", "inflight", "samples/msg", "samples/s"
        );
        for inflight in [20u32, 1000] {
            let broker = Mosquitto::start(&format!("max_inflight_messages {inflight}"))?;
            for (kind, name) in [(SinkKind::Noop, "no-op"), (SinkKind::Raw, "raw zone")] {
                for per_msg in [1u64, 10] {
                    let mut rates = Vec::new();
                    for r in 0..args.runs {
                        rates.push(run(&broker, kind, per_msg, args.samples, r).await?);
                    }
                    println!(
                        "{name:<10} {inflight:>8} {per_msg:>14} {:>16.0}",
                        median(rates)
                    );
                }
            }
        }
        Ok(())
    })
}
