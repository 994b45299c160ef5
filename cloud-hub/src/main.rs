//! The `cloud-hub` binary: a thin wrapper over the command line in `cli.rs`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
