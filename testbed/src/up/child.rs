//! Child processes of `testbed up`: started with their output in a log file,
//! watched for their `ready ...` line, stopped with SIGTERM then SIGKILL, and
//! killed when dropped so a panic or an early return never leaves one behind.
//!
//! Where `setpriv` exists (util-linux), children also get
//! `--pdeathsig KILL`: if `testbed` itself is killed with SIGKILL, the kernel
//! kills them too. (The workspace forbids `unsafe`, so `prctl` in a
//! `pre_exec` hook is not available; `setpriv` does the same before `exec`.)

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

const SETPRIV: &str = "/usr/bin/setpriv";

/// A child process that could not be started, got ready or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChildError {
    /// The program could not be started.
    #[error("{name}: cannot start {program}: {source}")]
    Spawn {
        /// Which child.
        name: String,
        /// Program path.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its log file could not be created.
    #[error("{name}: log file {log}: {source}")]
    Log {
        /// Which child.
        name: String,
        /// Log path.
        log: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before printing its ready line, or a one-shot command
    /// failed.
    #[error("{name} exited with {status} (log {log}); last lines:\n{tail}")]
    Exited {
        /// Which child.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// Log path.
        log: PathBuf,
        /// Last lines of its log.
        tail: String,
    },
    /// No ready line within the deadline.
    #[error("{name} not ready within {timeout:?} (log {log}); last lines:\n{tail}")]
    NotReady {
        /// Which child.
        name: String,
        /// The deadline.
        timeout: Duration,
        /// Log path.
        log: PathBuf,
        /// Last lines of its log.
        tail: String,
    },
    /// Its ready line could not be understood.
    #[error("{name}: bad ready line {line:?}: {reason}")]
    BadReadyLine {
        /// Which child.
        name: String,
        /// The line.
        line: String,
        /// What is wrong.
        reason: String,
    },
    /// Waiting for it failed.
    #[error("{name}: wait: {source}")]
    Wait {
        /// Which child.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `ready hub=<hex> sync=<ip:port> http=http://<addr>`, as the hub and edge
/// binaries print it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    /// `hub` or `edge`.
    pub role: String,
    /// The endpoint id (hex) after `hub=` / `edge=`.
    pub id: String,
    /// Sync (QUIC) address.
    pub sync: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
}

impl ReadyLine {
    /// Parse a ready line; `Ok(None)` if the line is not one.
    pub fn parse(line: &str) -> Result<Option<ReadyLine>, String> {
        let mut words = line.split_whitespace();
        if words.next() != Some("ready") {
            return Ok(None);
        }
        let (mut role, mut id, mut sync, mut http) = (None, None, None, None);
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                continue;
            };
            match k {
                "hub" | "edge" => {
                    role = Some(k.to_string());
                    id = Some(v.to_string());
                }
                "sync" => sync = Some(v.parse().map_err(|e| format!("sync={v}: {e}"))?),
                "http" => {
                    let a = v
                        .trim_start_matches("http://")
                        .trim_end_matches('/')
                        .to_string();
                    http = Some(a.parse().map_err(|e| format!("http={v}: {e}"))?);
                }
                _ => {}
            }
        }
        match (role, id, sync, http) {
            (Some(role), Some(id), Some(sync), Some(http)) => Ok(Some(ReadyLine {
                role,
                id,
                sync,
                http,
            })),
            _ => Err("expected hub=|edge=, sync= and http=".into()),
        }
    }
}

/// A running child with its log; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildProc {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
    ready: watch::Receiver<Option<Result<ReadyLine, String>>>,
    status: Option<ExitStatus>,
}

fn command(program: &Path, args: &[OsString]) -> Command {
    let mut cmd = if Path::new(SETPRIV).exists() {
        let mut c = Command::new(SETPRIV);
        c.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    };
    // Logs go to files: no terminal colour codes in them.
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn open_log(name: &str, log: &Path) -> Result<std::fs::File, ChildError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| ChildError::Log {
            name: name.to_string(),
            log: log.to_path_buf(),
            source,
        })
}

/// The last `n` lines of a log file (empty if it cannot be read).
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut last: VecDeque<&str> = VecDeque::with_capacity(n);
    for l in text.lines() {
        if last.len() == n {
            last.pop_front();
        }
        last.push_back(l);
    }
    last.iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Run a one-shot command (`cloud-hub init`, `token create`): its stderr is
/// appended to `log`, its trimmed stdout returned. A non-zero exit is an
/// error carrying the log's last lines.
pub async fn run_capture(
    name: &str,
    program: &Path,
    args: &[OsString],
    log: &Path,
    timeout: Duration,
) -> Result<String, ChildError> {
    let stderr = open_log(name, log)?;
    let mut cmd = command(program, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::from(stderr));
    let child = cmd.spawn().map_err(|source| ChildError::Spawn {
        name: name.to_string(),
        program: program.to_path_buf(),
        source,
    })?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| ChildError::NotReady {
            name: name.to_string(),
            timeout,
            log: log.to_path_buf(),
            tail: log_tail(log, 10),
        })?
        .map_err(|source| ChildError::Wait {
            name: name.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(ChildError::Exited {
            name: name.to_string(),
            status: out.status,
            log: log.to_path_buf(),
            tail: log_tail(log, 10),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl ChildProc {
    /// Start `program args`, stdout and stderr appended to `log`; stdout is
    /// also watched for the first `ready ...` line.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[OsString],
        log: &Path,
    ) -> Result<ChildProc, ChildError> {
        let stderr = open_log(name, log)?;
        let mut cmd = command(program, args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().map_err(|source| ChildError::Spawn {
            name: name.to_string(),
            program: program.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = watch::channel(None);
        if let Some(stdout) = child.stdout.take() {
            let log = log.to_path_buf();
            tokio::spawn(async move {
                let mut file = match tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .await
                {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!("log {}: {e}", log.display());
                        None
                    }
                };
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(f) = file.as_mut() {
                        let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                    }
                    if tx.borrow().is_none() {
                        match ReadyLine::parse(&line) {
                            Ok(None) => {}
                            Ok(Some(r)) => {
                                let _ = tx.send(Some(Ok(r)));
                            }
                            Err(e) => {
                                let _ = tx.send(Some(Err(format!("{line}\u{0}{e}"))));
                            }
                        }
                    }
                }
                if let Some(f) = file.as_mut() {
                    let _ = f.flush().await;
                }
            });
        }
        Ok(ChildProc {
            name: name.to_string(),
            child,
            pid,
            log: log.to_path_buf(),
            ready: rx,
            status: None,
        })
    }

    /// Its name (`hub`, `site-1/edge-1`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id (of `setpriv`, which `exec`s the program: the same).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Wait for its ready line, at most `timeout`; an exit first is an error.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<ReadyLine, ChildError> {
        let mut ready = self.ready.clone();
        let got = tokio::time::timeout(timeout, async {
            tokio::select! {
                r = ready.wait_for(Option::is_some) => match r {
                    Ok(v) => Ok(v.clone()),
                    // The reader ended without a ready line: stdout closed,
                    // the process is exiting; report its exit below.
                    Err(_) => Err(()),
                },
                _ = self.child.wait() => Err(()),
            }
        })
        .await;
        match got {
            Ok(Ok(Some(Ok(r)))) => Ok(r),
            Ok(Ok(Some(Err(e)))) => {
                let (line, reason) = e.split_once('\u{0}').unwrap_or((&e, ""));
                Err(ChildError::BadReadyLine {
                    name: self.name.clone(),
                    line: line.to_string(),
                    reason: reason.to_string(),
                })
            }
            Ok(Ok(None)) | Ok(Err(())) => {
                let status = self.wait().await?;
                Err(ChildError::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log.clone(),
                    tail: log_tail(&self.log, 15),
                })
            }
            Err(_) => Err(ChildError::NotReady {
                name: self.name.clone(),
                timeout,
                log: self.log.clone(),
                tail: log_tail(&self.log, 15),
            }),
        }
    }

    /// Wait until it exits.
    pub async fn wait(&mut self) -> Result<ExitStatus, ChildError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self.child.wait().await.map_err(|source| ChildError::Wait {
            name: self.name.clone(),
            source,
        })?;
        self.status = Some(s);
        Ok(s)
    }

    /// The error describing an exit that nobody asked for.
    pub fn exited_error(&self, status: ExitStatus) -> ChildError {
        ChildError::Exited {
            name: self.name.clone(),
            status,
            log: self.log.clone(),
            tail: log_tail(&self.log, 15),
        }
    }

    /// Whether it has exited (without waiting).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
        }
        self.status
    }

    /// Send SIGTERM (if it is still running) without waiting.
    pub async fn terminate(&mut self) {
        if self.try_exited().is_some() {
            return;
        }
        // `kill` from procps: no unsafe code needed to send a signal. If it
        // cannot run, SIGKILL after the grace period still stops the child.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }

    /// Stop it: SIGTERM, then SIGKILL if it has not exited within `grace`.
    /// Returns its exit status and whether it had to be killed.
    pub async fn stop(&mut self, grace: Duration) -> Result<(ExitStatus, bool), ChildError> {
        if let Some(s) = self.try_exited() {
            return Ok((s, false));
        }
        self.terminate().await;
        if let Ok(r) = tokio::time::timeout(grace, self.wait()).await {
            return r.map(|s| (s, false));
        }
        let _ = self.child.start_kill();
        self.wait().await.map(|s| (s, true))
    }
}

/// Whether a process id is alive (not gone, not a zombie), from `/proc`.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the `(comm)` field.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse() {
        let r = ReadyLine::parse("ready hub=ab12 sync=127.0.0.1:4000 http=http://127.0.0.1:8080")
            .unwrap()
            .unwrap();
        assert_eq!(r.role, "hub");
        assert_eq!(r.id, "ab12");
        assert_eq!(r.sync.port(), 4000);
        assert_eq!(r.http.port(), 8080);
        let r = ReadyLine::parse("ready edge=cd sync=127.0.0.1:1 http=http://127.0.0.1:2/")
            .unwrap()
            .unwrap();
        assert_eq!((r.role.as_str(), r.http.port()), ("edge", 2));
        assert_eq!(ReadyLine::parse("starting up").unwrap(), None);
        assert!(ReadyLine::parse("ready hub=ab sync=nope http=http://127.0.0.1:1").is_err());
        assert!(ReadyLine::parse("ready now").is_err());
    }

    fn sh(script: &str) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    #[tokio::test]
    async fn ready_line_is_seen_and_sigterm_stops_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let script = "trap 'echo got term; exit 0' TERM; echo hello; \
                      echo 'ready hub=aa sync=127.0.0.1:1 http=http://127.0.0.1:2'; \
                      while true; do sleep 0.05; done";
        let mut c = ChildProc::spawn("c", Path::new("/bin/sh"), &sh(script), &log).unwrap();
        let r = c.wait_ready(Duration::from_secs(10)).await.unwrap();
        assert_eq!(r.id, "aa");
        let pid = c.pid();
        assert!(pid_alive(pid));
        let (status, killed) = c.stop(Duration::from_secs(10)).await.unwrap();
        assert!(status.success() && !killed, "{status:?} killed={killed}");
        assert!(!pid_alive(pid));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello"), "{text}");
    }

    #[tokio::test]
    async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let script = "trap '' TERM; echo 'ready edge=bb sync=127.0.0.1:1 http=http://127.0.0.1:2'; \
                      while true; do sleep 0.05; done";
        let mut c = ChildProc::spawn("c", Path::new("/bin/sh"), &sh(script), &log).unwrap();
        c.wait_ready(Duration::from_secs(10)).await.unwrap();
        let (_, killed) = c.stop(Duration::from_millis(300)).await.unwrap();
        assert!(killed);
        assert!(!pid_alive(c.pid()));
    }

    #[tokio::test]
    async fn an_early_exit_reports_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let script = "echo 'error: cannot bind 127.0.0.1:1' >&2; exit 3";
        let mut c = ChildProc::spawn("hub", Path::new("/bin/sh"), &sh(script), &log).unwrap();
        let e = c.wait_ready(Duration::from_secs(10)).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ChildError::Exited { .. }), "{msg}");
        assert!(
            msg.contains("hub exited") && msg.contains("cannot bind"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn dropping_the_guard_kills_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let c = ChildProc::spawn(
            "c",
            Path::new("/bin/sh"),
            &sh("while true; do sleep 0.05; done"),
            &log,
        )
        .unwrap();
        let pid = c.pid();
        assert!(pid_alive(pid));
        drop(c);
        // tokio reaps a killed child in the background: wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pid_alive(pid), "pid {pid} still alive after drop");
    }
}
