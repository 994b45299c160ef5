//! `edge-node`: the site box. `run` starts a node from a config file;
//! `check-config` validates one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edge_node::node::{EdgeNode, NodeOptions};
use schemas::config::EdgeConfig;

/// fieldsync edge node: polls Modbus devices, runs local control loops,
/// keeps raw samples, summarises telemetry into CRDT documents synced with
/// the hub and the site's other edges, and serves the site operator's API
/// and UI, with or without the uplink.
#[derive(Debug, Parser)]
#[command(name = "edge-node", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node until Ctrl-C or SIGTERM. Prints
    /// `ready edge=<id> sync=<ip:port> http=http://<addr>` once serving.
    Run {
        /// The edge config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override `node.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override `listen.http` (local API and UI).
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Override `listen.sync` (QUIC bind address).
        #[arg(long)]
        sync_bind: Option<SocketAddr>,
    },
    /// Validate a config file and print it with every default filled in.
    CheckConfig {
        /// The edge config file (TOML).
        config: PathBuf,
    },
}

/// Exit code for an unusable config.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::CheckConfig { config } => match EdgeConfig::load(&config) {
            Ok(cfg) => match toml::to_string_pretty(&cfg) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: printing the config: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Cmd::Run {
            config,
            data_dir,
            http,
            sync_bind,
        } => {
            let mut cfg = match EdgeConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            if let Some(d) = data_dir {
                cfg.node.data_dir = d;
            }
            if let Some(h) = http {
                cfg.listen.http = h;
            }
            if let Some(s) = sync_bind {
                cfg.listen.sync = s;
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cfg: EdgeConfig) -> anyhow::Result<()> {
    let node = EdgeNode::start(cfg, NodeOptions::new(edge_node::clock::from_env()))
        .await
        .context("starting the edge node")?;
    println!("{}", node.ready_line());
    wait_for_signal().await?;
    tracing::info!("stopping");
    node.shutdown().await.context("stopping the edge node")?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
