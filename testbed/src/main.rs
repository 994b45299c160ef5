//! `testbed`: run simulated Modbus devices for fieldsync.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use schemas::config::EdgeConfig;
use testbed::fleet::{FleetOptions, RunningFleet, start_fleet};
use testbed::maps::{edge_config_toml, fleet};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Simulated industrial devices for fieldsync: real Modbus TCP servers with
/// seeded physics (cold rooms, pump stations, energy meters).
///
/// Quick start:
///
///   testbed example-config --devices 3 > edge.toml
///
///   testbed devices --config edge.toml --time-scale 10
///
/// then point an edge node at the same edge.toml. The edge's loops and
/// alarm delays run on real time: above a time scale of about 10 the
/// example's minimum on/off times become long in simulated time.
#[derive(Debug, Parser)]
#[command(name = "testbed", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one simulated device per [[devices]] entry of an edge config,
    /// on its configured addr, until Ctrl-C.
    ///
    /// device_type selects the physics: cold-room, pump or meter. Each
    /// register of the entry must name a signal of that device (the maps
    /// from `testbed example-config` do). An addr with port 0 gets a free
    /// port, printed at start.
    ///
    /// Faults can be injected while running by writing lines on stdin, e.g.
    /// `fault cold-room-1 stuck:temperature`, `fault pump-1 slow:800`,
    /// `fault meter-1 exception:server-device-failure`, `fault pump-1 drop`,
    /// `fault cold-room-1 spikes:temperature:0.1:15`, `fault meter-1 missing`,
    /// `clear cold-room-1`, `get cold-room-1 temperature`, `help`. Each line
    /// is answered on stdout with `ok ...` or `error: ...`.
    #[command(verbatim_doc_comment)]
    Devices {
        /// Edge config file (TOML) whose [[devices]] to simulate.
        #[arg(long, short)]
        config: PathBuf,
        /// Master seed: same seed, same trajectories.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated seconds per real second (60: a minute per second).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Simulated hour of day at start (0..24).
        #[arg(long, default_value_t = 8.0)]
        start_hour: f64,
    },
    /// Print an example edge.toml for N simulated devices (cycling cold-room,
    /// pump, meter) with loops and alarms, to pair a real edge node with
    /// `testbed devices`.
    ExampleConfig {
        /// How many devices.
        #[arg(long, default_value_t = 3)]
        devices: usize,
        /// First Modbus TCP port on 127.0.0.1; the others follow. 0 lets
        /// `testbed devices` pick free ports (an edge cannot use that file).
        #[arg(long, default_value_t = 15020)]
        base_port: u16,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::ExampleConfig { devices, base_port } => {
            anyhow::ensure!(
                (1..=1000).contains(&devices),
                "--devices {devices}: must be 1..=1000"
            );
            anyhow::ensure!(
                base_port == 0 || usize::from(base_port) + devices <= 65_536,
                "--base-port {base_port}: {devices} devices would run past port 65535"
            );
            let devs = fleet(devices, base_port).context("name the devices")?;
            let text = edge_config_toml(&devs).context("write the example config")?;
            print!("{text}");
            Ok(())
        }
        Command::Devices {
            config,
            seed,
            time_scale,
            start_hour,
        } => {
            anyhow::ensure!(
                start_hour.is_finite() && (0.0..24.0).contains(&start_hour),
                "--start-hour {start_hour}: must be in 0..24"
            );
            let cfg = EdgeConfig::load(&config).context("load the edge config")?;
            anyhow::ensure!(
                !cfg.devices.is_empty(),
                "{}: no [[devices]] to simulate",
                config.display()
            );
            let opts = FleetOptions {
                seed,
                time_scale,
                start_of_day_s: start_hour * 3600.0,
                ..FleetOptions::default()
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("start the async runtime")?;
            let result = rt.block_on(serve(cfg, opts));
            // The stdin reader sits in a blocking read: do not wait for it.
            rt.shutdown_timeout(Duration::from_millis(200));
            result
        }
    }
}

async fn serve(cfg: EdgeConfig, opts: FleetOptions) -> anyhow::Result<()> {
    let running = start_fleet(&cfg.devices, &opts)
        .await
        .context("start simulated devices")?;
    {
        let mut out = std::io::stdout().lock();
        for d in &running.devices {
            writeln!(
                out,
                "device {} ({}) listening on {}",
                d.id,
                d.kind,
                d.server.addr()
            )?;
        }
        writeln!(
            out,
            "ready: {} device(s), seed {}, time scale {}x; Ctrl-C to stop",
            running.devices.len(),
            opts.seed,
            opts.time_scale
        )?;
        out.flush()?;
    }
    let stop = tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C"),
        r = terminated() => r,
        () = control_from_stdin(&running) => Ok(()),
    };
    running.stop().await.context("stop simulated devices")?;
    stop?;
    println!("stopped");
    Ok(())
}

/// Carry out control lines from stdin until it ends; then wait forever (a
/// closed stdin is not a reason to stop serving).
async fn control_from_stdin(running: &RunningFleet) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        match running.control(&line) {
            Ok(msg) => println!("{msg}"),
            Err(e) => println!("error: {e}"),
        }
    }
    std::future::pending::<()>().await;
}

#[cfg(unix)]
async fn terminated() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    term.recv().await;
    Ok(())
}

#[cfg(not(unix))]
async fn terminated() -> anyhow::Result<()> {
    std::future::pending().await
}
