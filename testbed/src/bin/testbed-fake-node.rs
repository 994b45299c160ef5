//! `testbed-fake-node`, for tests only: a stand-in for the `cloud-hub` and
//! `edge-node` binaries that speaks their
//! command-line contracts (init, token create, user token create, serve, run:
//! ready lines, an HTTP port answering 200, exit 0 on SIGTERM) so the tests
//! of `testbed up` can check its orchestration without the real ones.
//!
//! Behaviour switches (environment): `FAKE_SERVE_FAIL=1` makes `serve` exit
//! 3 before its ready line; `FAKE_EDGE_EXIT_AFTER_MS=N` makes `run` exit 4 N
//! ms after its ready line; `FAKE_SERVE_DELAY_MS=N` delays the hub's ready
//! line by N ms.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn arg_after(args: &[String], flag: &str) -> Option<PathBuf> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}

async fn serve_http(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                .await;
        });
    }
}

async fn run_server(role: &str, http: std::net::SocketAddr) -> std::process::ExitCode {
    let listener = match tokio::net::TcpListener::bind(http).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: bind {http}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let addr = listener.local_addr().unwrap_or(http);
    println!(
        "ready {role}={} sync=127.0.0.1:1 http=http://{addr}",
        "ab".repeat(32)
    );
    let exit_after = std::env::var("FAKE_EDGE_EXIT_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|_| role == "edge");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tokio::select! {
        _ = serve_http(listener) => std::process::ExitCode::from(2),
        _ = term.recv() => {
            eprintln!("{role}: SIGTERM, stopping");
            std::process::ExitCode::SUCCESS
        }
        () = async {
            match exit_after {
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                None => std::future::pending().await,
            }
        } => {
            eprintln!("{role}: fake crash");
            std::process::ExitCode::from(4)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-') && !a.contains('/'))
        .map(String::as_str)
        .collect();
    if words.ends_with(&["init"]) {
        eprintln!("initialised fake hub");
        println!("{}", "ab".repeat(32));
        return std::process::ExitCode::SUCCESS;
    }
    if words.starts_with(&["user", "token", "create"]) {
        println!("fsu1.fake-admin");
        return std::process::ExitCode::SUCCESS;
    }
    if words.starts_with(&["token", "create"]) {
        println!("fsj1.fake-join");
        return std::process::ExitCode::SUCCESS;
    }
    if words.ends_with(&["serve"]) {
        if std::env::var_os("FAKE_SERVE_FAIL").is_some() {
            eprintln!("error: fake hub cannot bind its sync port");
            return std::process::ExitCode::from(3);
        }
        if let Some(ms) = std::env::var("FAKE_SERVE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            eprintln!("hub: starting slowly");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let Some(path) = arg_after(&args, "--config") else {
            eprintln!("error: serve needs --config");
            return std::process::ExitCode::from(2);
        };
        match schemas::config::HubConfig::load(&path) {
            Ok(cfg) => return run_server("hub", cfg.http_listen).await,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if words.starts_with(&["run"]) {
        let Some(path) = arg_after(&args, "--config") else {
            eprintln!("error: run needs --config");
            return std::process::ExitCode::from(2);
        };
        match schemas::config::EdgeConfig::load(&path) {
            Ok(cfg) => return run_server("edge", cfg.listen.http).await,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    eprintln!("error: testbed-fake-node: unknown command {args:?}");
    std::process::ExitCode::from(2)
}
