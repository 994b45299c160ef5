//! Node child processes: start one, copy its stdout and stderr into its log
//! file and an in-memory line list, wait for its `ready` line with a
//! deadline, kill it with SIGKILL, and run one-shot helper commands.
//!
//! A node may start inside a network namespace: `ip netns exec NS PROGRAM
//! ARGS..`. `ip` enters the namespace and execs the program, so the child's
//! pid is the node's own and SIGTERM / SIGKILL reach the node itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::FleetError;

/// What a node's `ready` line says:
/// `ready edge=<id> sync=<ip:port> http=http://<addr>` (or `hub=<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ready {
    /// The endpoint id (`edge=` or `hub=`), if given.
    pub id: Option<String>,
    /// The QUIC address it bound.
    pub sync: Option<SocketAddr>,
    /// The HTTP base URL's address.
    pub http: Option<SocketAddr>,
}

/// Parse a `ready ...` line; `None` if the line is not one.
pub fn parse_ready(line: &str) -> Option<Ready> {
    let mut words = line.split_whitespace();
    if words.next() != Some("ready") {
        return None;
    }
    let mut r = Ready::default();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        match k {
            "edge" | "hub" | "id" => r.id = Some(v.to_string()),
            "sync" => r.sync = v.parse().ok(),
            "http" => {
                let v = v.trim_start_matches("http://").trim_end_matches('/');
                r.http = v.parse().ok();
            }
            _ => {}
        }
    }
    Some(r)
}

/// The lines a node printed, all incarnations, shared with its readers.
#[derive(Debug, Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<String>>>);

impl LogBuffer {
    /// Append a line.
    pub fn push(&self, line: String) {
        if let Ok(mut v) = self.0.lock() {
            v.push(line);
        }
    }
    /// A copy of every line.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
    /// The last `n` lines, joined, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let v = self.lines();
        v[v.len().saturating_sub(n)..].join("\n")
    }
}

/// A running node process.
#[derive(Debug)]
pub struct NodeProcess {
    name: String,
    child: Child,
    ready: Ready,
    copiers: Vec<tokio::task::JoinHandle<()>>,
}

async fn copy_lines(
    r: impl tokio::io::AsyncRead + Unpin,
    tag: &'static str,
    log: LogBuffer,
    file: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    ready: Option<watch::Sender<Option<Ready>>>,
) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(tx) = &ready
            && let Some(r) = parse_ready(&line)
        {
            let _ = tx.send(Some(r));
        }
        {
            let mut f = file.lock().await;
            // tokio's File hands writes to a blocking thread: flush so
            // the line is in the file when the copier is awaited.
            let _ = f.write_all(format!("{tag} {line}\n").as_bytes()).await;
            let _ = f.flush().await;
        }
        log.push(line);
    }
}

impl NodeProcess {
    /// Start `program args..` (inside network namespace `netns`, if
    /// given), appending its output to `log_file` and `log`, and wait up
    /// to `ready_within` for its `ready` line. A process that exits or
    /// stays silent is killed and reported with its log tail.
    pub async fn start(
        name: &str,
        program: &Path,
        args: &[String],
        netns: Option<&str>,
        log_file: &Path,
        log: LogBuffer,
        ready_within: Duration,
    ) -> Result<NodeProcess, FleetError> {
        let io = |source| FleetError::Io {
            path: log_file.to_path_buf(),
            source,
        };
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file)
            .await
            .map_err(io)?;
        let file = Arc::new(tokio::sync::Mutex::new(file));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FleetError::Process {
                node: name.to_string(),
                detail: match netns {
                    Some(ns) => format!(
                        "cannot start `ip netns exec {ns} {}`: {e}",
                        program.display()
                    ),
                    None => format!("cannot start {}: {e}", program.display()),
                },
            })?;
        let (tx, mut rx) = watch::channel(None);
        let mut copiers = Vec::new();
        if let Some(out) = child.stdout.take() {
            copiers.push(tokio::spawn(copy_lines(
                out,
                "out",
                log.clone(),
                file.clone(),
                Some(tx),
            )));
        }
        if let Some(err) = child.stderr.take() {
            copiers.push(tokio::spawn(copy_lines(
                err,
                "err",
                log.clone(),
                file,
                None,
            )));
        }
        let waited = tokio::time::timeout(ready_within, rx.wait_for(|r| r.is_some())).await;
        let ready = match waited {
            Ok(Ok(r)) => r.clone().unwrap_or_default(),
            Ok(Err(_)) | Err(_) => {
                let status = match child.try_wait() {
                    Ok(Some(s)) => format!("exited with {s}"),
                    _ => format!("no ready line within {} s", ready_within.as_secs_f64()),
                };
                let _ = child.start_kill();
                let _ = child.wait().await;
                for c in copiers {
                    let _ = c.await;
                }
                return Err(FleetError::Process {
                    node: name.to_string(),
                    detail: format!("{status}; last log lines:\n{}", log.tail(15)),
                });
            }
        };
        Ok(NodeProcess {
            name: name.to_string(),
            child,
            ready,
            copiers,
        })
    }

    /// What its `ready` line said.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether it has exited on its own (and how).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown: {e}")),
        }
    }

    /// `kill -9` and wait for it (and its output) to end.
    pub async fn kill9(mut self) -> Result<(), FleetError> {
        let r = self.child.start_kill();
        let _ = self.child.wait().await;
        for c in self.copiers.drain(..) {
            let _ = c.await;
        }
        r.map_err(|e| FleetError::Process {
            node: self.name.clone(),
            detail: format!("kill -9: {e}"),
        })
    }

    /// Ask it to stop (SIGTERM via `kill`), wait up to `grace`, then kill
    /// -9. Returns whether it stopped on its own.
    pub async fn stop(mut self, grace: Duration) -> Result<bool, FleetError> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let clean = matches!(
            tokio::time::timeout(grace, self.child.wait()).await,
            Ok(Ok(_))
        );
        if !clean {
            self.kill9().await?;
        } else {
            for c in self.copiers.drain(..) {
                let _ = c.await;
            }
        }
        Ok(clean)
    }
}

/// Run a one-shot helper command; its stdout on success (trimmed), an
/// error naming the node, the command and its stderr otherwise.
pub async fn run_helper(
    node: &str,
    program: &Path,
    args: &[String],
    within: Duration,
) -> Result<String, FleetError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let fail = |detail: String| FleetError::Command {
        node: node.to_string(),
        command: command.clone(),
        detail,
    };
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(within, out).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(fail(format!("cannot start: {e}"))),
        Err(_) => return Err(fail(format!("no answer within {} s", within.as_secs()))),
    };
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Find a sibling binary of the running executable (cargo puts workspace
/// binaries in one directory), else rely on `PATH`.
pub fn find_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_are_parsed_and_other_lines_are_not() {
        let r =
            parse_ready("ready edge=ab12 sync=127.0.0.1:4000 http=http://127.0.0.1:8081").unwrap();
        assert_eq!(r.id.as_deref(), Some("ab12"));
        assert_eq!(r.sync, Some("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(r.http, Some("127.0.0.1:8081".parse().unwrap()));
        let h = parse_ready("ready hub=ff sync=127.0.0.1:1 http=http://127.0.0.1:2/").unwrap();
        assert_eq!(h.http, Some("127.0.0.1:2".parse().unwrap()));
        assert!(parse_ready("not ready edge=1").is_none());
        assert!(parse_ready("readying").is_none());
    }

    #[tokio::test]
    async fn a_process_is_ready_logged_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log_file = dir.path().join("n.log");
        let log = LogBuffer::default();
        let script = "echo starting >&2; echo ready edge=e1 sync=127.0.0.1:9 http=http://127.0.0.1:10; exec sleep 30";
        let p = NodeProcess::start(
            "n",
            Path::new("sh"),
            &["-c".into(), script.into()],
            None,
            &log_file,
            log.clone(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(p.ready().id.as_deref(), Some("e1"));
        let pid = p.pid().unwrap();
        p.kill9().await.unwrap();
        let lines = log.lines();
        assert!(lines.iter().any(|l| l == "starting"), "{lines:?}");
        let text = std::fs::read_to_string(&log_file).unwrap();
        assert!(text.contains("out ready edge=e1"), "{text}");
        // The process is gone.
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "process {pid} still running");
    }

    #[tokio::test]
    async fn a_process_that_dies_before_ready_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let e = NodeProcess::start(
            "bad",
            Path::new("sh"),
            &[
                "-c".into(),
                "echo 'error: config is broken' >&2; exit 2".into(),
            ],
            None,
            &dir.path().join("b.log"),
            LogBuffer::default(),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad") && e.contains("config is broken"), "{e}");
        let e = run_helper(
            "h",
            Path::new("sh"),
            &["-c".into(), "echo no >&2; exit 3".into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("no") && e.contains("exit status: 3"), "{e}");
        let ok = run_helper(
            "h",
            Path::new("sh"),
            &["-c".into(), "echo fsj1.tok".into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(ok, "fsj1.tok");
    }
}
