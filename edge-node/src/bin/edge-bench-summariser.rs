//! Bench: summariser throughput, raw-zone append throughput with group
//! commit, and append ack latency. Prints a table of medians.
//!
//! `cargo run --release -p edge-node --bin edge-bench-summariser`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edge_node::raw_zone::{RawZone, RawZoneOptions};
use edge_node::summariser::{MemoryRollupStore, RollupSink, Summariser, SummariserConfig};
use schemas::ids::DeviceId;
use schemas::metrics::{Sample, Unit};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;

#[derive(Parser)]
#[command(about = "Measure the summariser and the raw zone")]
struct Args {
    /// Samples per summariser run.
    #[arg(long, default_value_t = 1_000_000)]
    samples: u64,
    /// Runs per figure (the median is printed).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Samples appended per raw-zone run.
    #[arg(long, default_value_t = 50_000)]
    appends: u64,
    /// Concurrent appenders (tasks) per raw-zone run.
    #[arg(long, default_value_t = 64)]
    appenders: u64,
    /// Directory for the raw zone (default: a fresh one in the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const T0: i64 = 1_700_000_040_000;

fn sample(devices: &[DeviceId], i: u64) -> Sample {
    // 20 devices x 5 metrics, a sample every 10 ms of wall time, 1 in 50 late
    // by up to 3 minutes.
    let late = if i.is_multiple_of(50) {
        (i % 180) as i64 * 1000
    } else {
        0
    };
    Sample {
        schema_version: SchemaVersion::default(),
        device: devices[(i % 20) as usize].clone(),
        metric: ["temperature", "pressure", "flow", "power", "speed"][((i / 20) % 5) as usize]
            .to_string(),
        ts: Timestamp(T0 + i as i64 * 10 - late),
        value: (i % 1000) as f64 * 0.1,
        unit: Unit::None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One summariser run: returns (samples/s, rollups written).
fn summariser_run(samples: &[Sample]) -> anyhow::Result<(f64, usize)> {
    let mut sm = Summariser::new(SummariserConfig::default())?;
    let mut store = MemoryRollupStore::default();
    let mut writes = 0;
    let start = Instant::now();
    for (i, s) in samples.iter().enumerate() {
        sm.handle_sample(i as u64, s)?;
        if i % 1000 == 999 {
            let now = Timestamp(T0 + i as i64 * 10);
            if let Some(f) = sm.poll_flush(now) {
                writes += f.writes.len();
                let _ = store.write_rollups(&f.writes);
                sm.handle_flushed();
            }
        }
    }
    if let Some(f) = sm.force_flush(Timestamp(T0 + samples.len() as i64 * 10 + 86_400_000)) {
        writes += f.writes.len();
        let _ = store.write_rollups(&f.writes);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((samples.len() as f64 / secs, writes))
}

struct AppendRun {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    read_per_sec: f64,
}

fn append_run(
    dir: &std::path::Path,
    devices: &[DeviceId],
    n: u64,
    appenders: u64,
) -> anyhow::Result<AppendRun> {
    let (z, _) = RawZone::open(dir, RawZoneOptions::default())
        .with_context(|| format!("open raw zone in {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start runtime")?;
    let per_task = n / appenders.max(1);
    let start = Instant::now();
    let lat = rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..appenders {
            let z = z.clone();
            let devices = devices.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_task as usize);
                for k in 0..per_task {
                    let s = sample(&devices, t * per_task + k);
                    let t0 = Instant::now();
                    z.append(s).await?;
                    lat.push(t0.elapsed());
                }
                anyhow::Ok(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.context("appender task")??);
        }
        anyhow::Ok(all)
    })?;
    let secs = start.elapsed().as_secs_f64();
    let mut lat = lat;
    lat.sort();
    let total = lat.len() as f64;
    let t = Instant::now();
    let mut read = 0u64;
    for r in z.read_from(0) {
        r.context("read back")?;
        read += 1;
    }
    let read_per_sec = read as f64 / t.elapsed().as_secs_f64();
    z.close();
    Ok(AppendRun {
        per_sec: total / secs,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        read_per_sec,
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("edge-bench-summariser: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let devices: Vec<DeviceId> = (0..20)
        .map(|i| DeviceId::new(format!("dev-{i}")))
        .collect::<Result<_, _>>()?;
    let samples: Vec<Sample> = (0..args.samples).map(|i| sample(&devices, i)).collect();

    let mut rates = Vec::new();
    let mut writes = 0;
    for _ in 0..args.runs {
        let (r, w) = summariser_run(&samples)?;
        rates.push(r);
        writes = w;
    }
    let sum_rate = median(rates);

    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("edge-bench-raw-{}", std::process::id())),
    };
    let mut rows = Vec::new();
    let mut read_rate = 0.0;
    for appenders in [1, args.appenders] {
        let n = if appenders == 1 {
            (args.appends / 10).max(1)
        } else {
            args.appends
        };
        let mut runs = Vec::new();
        for r in 0..args.runs {
            let dir = base.join(format!("a{appenders}-r{r}"));
            let run = append_run(&dir, &devices, n, appenders);
            let _ = std::fs::remove_dir_all(&dir);
            runs.push(run?);
        }
        let p50 = median(runs.iter().map(|r| r.p50.as_secs_f64()).collect());
        let p99 = median(runs.iter().map(|r| r.p99.as_secs_f64()).collect());
        let rate = median(runs.iter().map(|r| r.per_sec).collect());
        rows.push((appenders, n, rate, p50, p99));
        read_rate = median(runs.iter().map(|r| r.read_per_sec).collect());
    }
    let _ = std::fs::remove_dir_all(&base);

    println!("| figure | value (median of {} runs) |", args.runs);
    println!("|---|---|");
    println!(
        "| summariser throughput, 1 core ({} samples, 100 series, 2% late) | {:.0} samples/s ({} rollups written) |",
        args.samples, sum_rate, writes
    );
    for (appenders, n, rate, p50, p99) in rows {
        println!(
            "| raw zone append, {appenders} concurrent appender(s), {n} samples, fsync per group | {rate:.0} samples/s, ack p50 {:.3} ms, p99 {:.3} ms |",
            p50 * 1e3,
            p99 * 1e3
        );
    }
    println!(
        "| raw zone sequential read from seq 0 ({} samples) | {read_rate:.0} samples/s |",
        args.appends
    );
    Ok(())
}
