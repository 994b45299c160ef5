//! `testbed`: run simulated Modbus devices for fieldsync.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use schemas::config::EdgeConfig;
use testbed::fleet::{FleetOptions, RunningFleet, start_fleet};
use testbed::maps::{edge_config_toml, fleet};
use testbed::up::plan::Shape;
use testbed::up::{UpOptions, fresh_run_dir, up};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Simulated industrial devices for fieldsync: real Modbus TCP servers with
/// seeded physics (cold rooms, pump stations, energy meters).
///
/// Whole local fleet (hub, edges, devices):
///
///   cargo build -p cloud-hub -p edge-node --bins && testbed up
///
/// Devices only, for a real edge node:
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
    /// Run a whole local fleet: one cloud-hub serving two tenants in two
    /// regions, edge nodes (child processes) and their simulated devices.
    ///
    /// Writes configs, logs and data under --data-dir, enrols every edge
    /// with a join token, shows progress while the fleet comes up, prints the
    /// hub dashboard URL with an admin token and each edge's local UI, then
    /// runs until Ctrl-C (or SIGTERM) and stops everything it started.
    ///
    ///   cargo build -p cloud-hub -p edge-node --bins
    ///   cargo run -p testbed -- up
    #[command(verbatim_doc_comment)]
    Up {
        /// Number of sites (dealt in turn to the tenants acme/eu, globex/us).
        #[arg(long, default_value_t = 3)]
        sites: usize,
        /// Edge nodes per site.
        #[arg(long, default_value_t = 1)]
        edges: usize,
        /// Simulated devices per edge (cycling cold room, pump, meter).
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Tenants (1 or 2).
        #[arg(long, default_value_t = 2)]
        tenants: usize,
        /// Data directory: absent, empty or a previous run (default: a fresh
        /// ./testbed-data/run-N).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Master seed of the simulated devices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated seconds per real second.
        #[arg(long, default_value_t = 10.0)]
        time_scale: f64,
        /// The cloud-hub binary (default: next to this one, else on PATH).
        #[arg(long)]
        hub_bin: Option<PathBuf>,
        /// The edge-node binary (default: next to this one, else on PATH).
        #[arg(long)]
        edge_bin: Option<PathBuf>,
        /// Edge summariser window in seconds (must divide a day).
        #[arg(long, default_value_t = 60)]
        window_s: u64,
        /// Seconds each process may take to get ready.
        #[arg(long, default_value_t = 60)]
        ready_timeout_s: u64,
    },
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

/// `name` next to the running executable, else the first on PATH, else
/// the path next to the executable (so the error names where it looked).
fn find_bin(name: &str) -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)));
    if let Some(p) = beside.as_ref().filter(|p| p.is_file()) {
        return p.clone();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or(beside)
        .unwrap_or_else(|| PathBuf::from(name))
}

async fn stop_signal() {
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if let Err(e) = r {
                eprintln!("error: wait for Ctrl-C: {e}");
            }
        }
        r = terminated() => {
            if let Err(e) = r {
                eprintln!("error: {e:#}");
                std::future::pending::<()>().await;
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up {
            sites,
            edges,
            devices,
            tenants,
            data_dir,
            seed,
            time_scale,
            hub_bin,
            edge_bin,
            window_s,
            ready_timeout_s,
        } => {
            let opts = UpOptions {
                shape: Shape {
                    sites,
                    edges_per_site: edges,
                    devices_per_edge: devices,
                    tenants,
                },
                data_dir: data_dir.unwrap_or_else(|| fresh_run_dir(Path::new("testbed-data"))),
                seed,
                time_scale,
                hub_bin: hub_bin.unwrap_or_else(|| find_bin("cloud-hub")),
                edge_bin: edge_bin.unwrap_or_else(|| find_bin("edge-node")),
                summary_window_s: window_s,
                ready_timeout: Duration::from_secs(ready_timeout_s.max(1)),
                stop_grace: Duration::from_secs(10),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("start the async runtime")?;
            rt.block_on(up(&opts, stop_signal()))
                .context("testbed up")?;
            Ok(())
        }
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
