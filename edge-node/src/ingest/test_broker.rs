//! A private Mosquitto broker for tests and benches: started on a free
//! loopback port with a generated config and persistence in a temp dir,
//! killed when dropped. Needs Debian's `mosquitto` and `mosquitto-clients`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a broker could not be started or a publish failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// `mosquitto` or `mosquitto_pub` is not installed.
    #[error(
        "{0} is not on PATH: install Debian's packages `mosquitto` and `mosquitto-clients` \
         (apt-get install -y mosquitto mosquitto-clients), or set FIELDSYNC_SKIP_MQTT=1 to skip"
    )]
    Missing(&'static str),
    /// Starting, configuring or talking to the broker failed.
    #[error("mosquitto: {0}")]
    Failed(String),
}

/// Whether MQTT tests were asked to be skipped (`FIELDSYNC_SKIP_MQTT=1`).
pub fn skip_requested() -> bool {
    std::env::var("FIELDSYNC_SKIP_MQTT").is_ok_and(|v| v == "1")
}

fn on_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// A running `mosquitto`; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    port: u16,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

fn spawn(bin: &Path, dir: &Path) -> Result<Child, BrokerError> {
    let fail = |what: &str, e: std::io::Error| BrokerError::Failed(format!("{what}: {e}"));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mosquitto.log"))
        .map_err(|e| fail("log file", e))?;
    Command::new(bin)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| fail("spawn", e))
}

impl Mosquitto {
    /// Start a broker on a free loopback port; `extra` is appended to its
    /// config (e.g. `max_inflight_messages 1000`). Waits (bounded) until it
    /// accepts connections.
    pub fn start(extra: &str) -> Result<Mosquitto, BrokerError> {
        let bin = on_path("mosquitto").ok_or(BrokerError::Missing("mosquitto"))?;
        on_path("mosquitto_pub").ok_or(BrokerError::Missing("mosquitto_pub"))?;
        let fail = |what: &str, e: std::io::Error| BrokerError::Failed(format!("{what}: {e}"));
        let dir = tempfile::tempdir().map_err(|e| fail("temp dir", e))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| fail("free port", e))?
            .port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nuser root\nmax_queued_messages 0\n{extra}\n",
            dir.path().display()
        );
        std::fs::File::create(&conf)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| fail("write config", e))?;
        let child = spawn(&bin, dir.path())?;
        let mut m = Mosquitto {
            child,
            port,
            bin,
            _dir: dir,
        };
        m.wait_listening()?;
        Ok(m)
    }

    fn wait_listening(&mut self) -> Result<(), BrokerError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(BrokerError::Failed(format!(
                    "exited with {st}: {}",
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(BrokerError::Failed(format!(
                    "not listening after 10 s: {}",
                    self.log()
                )));
            }
            // Poll the condition (listening) under the deadline above.
            std::thread::park_timeout(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kill the broker (SIGKILL: sessions not yet saved are lost) and start
    /// it again on the same port with the same files.
    pub fn restart(&mut self) -> Result<(), BrokerError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.bin, self._dir.path())?;
        self.wait_listening()
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Publish each of `messages` to `topic` with QoS 1 via `mosquitto_pub -l`
    /// (one message per line), waiting for it to finish.
    pub fn publish(&self, topic: &str, messages: &[String]) -> Result<(), BrokerError> {
        publish_lines(self.port, topic, messages)
    }

    /// Directory of the broker's files.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

fn publish_lines(port: u16, topic: &str, messages: &[String]) -> Result<(), BrokerError> {
    let bin = on_path("mosquitto_pub").ok_or(BrokerError::Missing("mosquitto_pub"))?;
    let mut child = Command::new(bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BrokerError::Failed(format!("spawn mosquitto_pub: {e}")))?;
    let mut text = String::new();
    for m in messages {
        text.push_str(m);
        text.push('\n');
    }
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| BrokerError::Failed(format!("mosquitto_pub stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| BrokerError::Failed(format!("mosquitto_pub: {e}")))?;
    if !out.status.success() {
        return Err(BrokerError::Failed(format!(
            "mosquitto_pub exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
