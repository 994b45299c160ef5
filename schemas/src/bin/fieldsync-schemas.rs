//! `fieldsync-schemas`: export the JSON Schema of every fieldsync contract.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// JSON Schemas of fieldsync's data contracts (device config, telemetry,
/// commands, policy, identity, config files).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write one `<name>.schema.json` per contract into a folder.
    Export {
        /// Folder to write into (created if missing).
        #[arg(long, default_value = "schemas-json")]
        out: PathBuf,
    },
    /// List the contracts.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::List => {
            for (name, _) in schemas::export::all_schemas() {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Export { out } => match schemas::export::write_all(&out) {
            Ok(files) => {
                println!("wrote {} schemas to {}", files.len(), out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: writing schemas to {}: {e:#}", out.display());
                ExitCode::FAILURE
            }
        },
    }
}
