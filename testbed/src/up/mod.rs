//! `testbed up`: a whole local fleet from one command.
//!
//! One `cloud-hub` (serving every tenant's region), edge nodes as child
//! processes, and the simulated devices of each edge in this process:
//!
//! 1. check the data directory (fresh, empty, or a previous run: never a
//!    directory holding something else) and mark it as a testbed run;
//! 2. `cloud-hub init`, a join token per edge, an admin API token;
//! 3. write `hub.toml`, start the hub, wait for its `ready` line and API;
//! 4. per edge: start its devices (free ports), write its `edge.toml`, start
//!    it, wait for its `ready` line and `/healthz`;
//! 5. print the dashboard URL with the token and each edge's UI, write
//!    `fleet.json`, and run until asked to stop or until a child exits;
//! 6. stop edges and hub (SIGTERM, SIGKILL after a grace period), then the
//!    devices, and say so.
//!
//! Invariants: every process started is owned by a [`ChildProc`] that kills
//! it on drop, so no return path (error, panic) leaves one behind; a child
//! that exits on its own stops the fleet with an error showing its log tail.

pub mod child;
pub mod http;
pub mod plan;

use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemas::identity::EndpointKey;

use crate::fleet::{FleetError, FleetOptions, RunningFleet, start_fleet};
use crate::maps::{SimDeviceSpec, device_config};
use child::{ChildError, ChildProc, run_capture};
use plan::{EdgePlan, FleetPlan, HubContact, Shape, ShapeError, edge_node_config};

/// File that marks a directory as a `testbed up` data directory.
pub const MARKER: &str = "testbed-run.txt";

/// What `testbed up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Fleet size.
    pub shape: Shape,
    /// Data directory; must be absent, empty, or a previous run.
    pub data_dir: PathBuf,
    /// Master seed of the simulated devices.
    pub seed: u64,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    /// The `cloud-hub` binary.
    pub hub_bin: PathBuf,
    /// The `edge-node` binary.
    pub edge_bin: PathBuf,
    /// Edge summariser window (seconds; must divide a day).
    pub summary_window_s: u64,
    /// How long each process may take to get ready.
    pub ready_timeout: Duration,
    /// How long a process may take to exit after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
}

/// Why the fleet could not come up or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpError {
    /// The data directory cannot be used.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The fleet shape is out of range.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// A child process failed.
    #[error(transparent)]
    Child(#[from] ChildError),
    /// Simulated devices could not start.
    #[error("simulated devices of {edge}: {source}")]
    Devices {
        /// Which edge's devices.
        edge: String,
        /// Why.
        #[source]
        source: FleetError,
    },
    /// A file could not be written or a port reserved.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command printed something unexpected.
    #[error("{what}: unexpected output {got:?}")]
    Output {
        /// Which command.
        what: String,
        /// What it printed.
        got: String,
    },
    /// A process printed its ready line but its HTTP check did not pass.
    #[error("{name}: {url} did not answer 2xx within {timeout:?}: {last}")]
    Health {
        /// Which process.
        name: String,
        /// The URL checked.
        url: String,
        /// The deadline.
        timeout: Duration,
        /// The last answer or error.
        last: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpError {
    let what = what.into();
    move |source| UpError::Io { what, source }
}

/// Check and mark the data directory. Absent: created. Empty or holding
/// [`MARKER`] (a previous run, reused): fine. Anything else: refused, so a
/// typo never writes into someone's directory.
pub fn prepare_data_dir(dir: &Path) -> Result<(), UpError> {
    let refuse = |reason: String| UpError::DataDir {
        path: dir.to_path_buf(),
        reason,
    };
    if dir.exists() {
        if !dir.is_dir() {
            return Err(refuse("exists and is not a directory".into()));
        }
        let mut entries = std::fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))?;
        let empty = entries.next().is_none();
        if !empty && !dir.join(MARKER).is_file() {
            return Err(refuse(format!(
                "is not empty and not a previous testbed run (no {MARKER}); \
                 choose another --data-dir or an empty directory"
            )));
        }
    }
    for sub in ["", "logs", "hub", "edges"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
    }
    std::fs::write(
        dir.join(MARKER),
        "This directory holds a fieldsync `testbed up` run: configs, logs, hub and edge data.\n\
         `testbed up --data-dir` may reuse it; delete it to start afresh.\n",
    )
    .map_err(io(format!("write {}", dir.join(MARKER).display())))?;
    Ok(())
}

/// The first `run-N` under `base` that does not exist yet.
pub fn fresh_run_dir(base: &Path) -> PathBuf {
    (1..)
        .map(|n| base.join(format!("run-{n}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| base.join("run"))
}

/// A free loopback port (bound then released: another process could take
/// it in between, which the child's exit would then report).
fn free_port(what: &str) -> Result<SocketAddr, UpError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(io(format!("reserve a loopback port for {what}")))?;
    l.local_addr()
        .map_err(io(format!("reserve a loopback port for {what}")))
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    list.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// Poll `GET path` until it answers 2xx, at most `timeout`.
async fn wait_http_ok(
    name: &str,
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(), UpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last;
    loop {
        match http::get(addr, path, bearer, Duration::from_secs(2)).await {
            Ok(r) if r.ok() => return Ok(()),
            Ok(r) => last = format!("status {}: {}", r.status, r.body.trim()),
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(UpError::Health {
                name: name.to_string(),
                url: format!("http://{addr}{path}"),
                timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An edge that is up.
#[derive(Debug)]
struct RunningEdge {
    plan: EdgePlan,
    proc: ChildProc,
    http: SocketAddr,
    devices: RunningFleet,
}

/// Everything started so far; stopped in reverse order.
#[derive(Debug, Default)]
struct Started {
    hub: Option<ChildProc>,
    edges: Vec<RunningEdge>,
    /// Devices started for an edge whose process is not up yet.
    pending_devices: Option<RunningFleet>,
}

impl Started {
    /// Stop edges (all signalled together), then the hub, then the
    /// devices. Returns one line per process.
    async fn stop(&mut self, grace: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        for e in &mut self.edges {
            e.proc.terminate().await;
        }
        for e in &mut self.edges {
            lines.push(stop_line(&mut e.proc, grace).await);
        }
        if let Some(hub) = self.hub.as_mut() {
            lines.push(stop_line(hub, grace).await);
        }
        let mut devices = 0;
        for e in self.edges.drain(..) {
            devices += e.devices.devices.len();
            let _ = e.devices.stop().await;
        }
        if let Some(d) = self.pending_devices.take() {
            devices += d.devices.len();
            let _ = d.stop().await;
        }
        lines.push(format!("{devices} simulated device(s) stopped"));
        lines
    }
}

async fn stop_line(p: &mut ChildProc, grace: Duration) -> String {
    match p.stop(grace).await {
        Ok((status, false)) => format!("{} (pid {}) stopped: {status}", p.name(), p.pid()),
        Ok((status, true)) => format!(
            "{} (pid {}) killed after {grace:?} without exiting: {status}",
            p.name(),
            p.pid()
        ),
        Err(e) => format!("{} (pid {}): {e}", p.name(), p.pid()),
    }
}

/// Prints numbered progress lines.
struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    fn say(&mut self, msg: impl std::fmt::Display) {
        self.step += 1;
        println!("[{}/{}] {msg}", self.step, self.total);
        let _ = std::io::stdout().flush();
    }
}

/// Bring the fleet up, run until `shutdown` completes or a child exits,
/// then stop everything. Progress and URLs go to stdout.
pub async fn up(opts: &UpOptions, shutdown: impl Future<Output = ()>) -> Result<(), UpError> {
    let plan = FleetPlan::new(&opts.shape)?;
    crate::clock::check_time_scale(opts.time_scale).map_err(|e| UpError::Devices {
        edge: "all".into(),
        source: e.into(),
    })?;
    for (what, bin) in [("--hub-bin", &opts.hub_bin), ("--edge-bin", &opts.edge_bin)] {
        if !bin.is_file() {
            return Err(UpError::Io {
                what: format!(
                    "{what} {}: build it with `cargo build -p cloud-hub -p edge-node --bins` \
                     or pass its path",
                    bin.display()
                ),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
    }
    prepare_data_dir(&opts.data_dir)?;
    let mut started = Started::default();
    // Race the bring-up against the stop signal too, so Ctrl-C while the
    // fleet is starting stops what was started.
    tokio::pin!(shutdown);
    let brought = tokio::select! {
        r = bring_up(opts, &plan, &mut started) => Some(r),
        () = &mut shutdown => None,
    };
    let result = match brought {
        Some(Ok(())) => watch_until(&mut started, shutdown).await,
        Some(Err(e)) => Err(e),
        None => {
            println!("interrupted while starting");
            Ok(())
        }
    };
    println!("stopping...");
    for line in started.stop(opts.stop_grace).await {
        println!("  {line}");
    }
    match &result {
        Ok(()) => println!("fleet stopped; data kept in {}", opts.data_dir.display()),
        Err(_) => println!(
            "fleet stopped after an error; logs in {}",
            opts.data_dir.join("logs").display()
        ),
    }
    result
}

/// Start everything; return once the fleet is up and announced.
async fn bring_up(
    opts: &UpOptions,
    plan: &FleetPlan,
    started: &mut Started,
) -> Result<(), UpError> {
    let dir = &opts.data_dir;
    let logs = dir.join("logs");
    let hub_dir = dir.join("hub");
    let hub_log = logs.join("hub.log");
    let mut progress = Progress {
        step: 0,
        total: 3 + 2 * plan.edges.len(),
    };
    let oneshot = Duration::from_secs(30).max(opts.ready_timeout);
    let hub_id_text = run_capture(
        "cloud-hub init",
        &opts.hub_bin,
        &args(&[&"--data-dir", &hub_dir, &"init"]),
        &hub_log,
        oneshot,
    )
    .await?;
    let hub_id: EndpointKey = hub_id_text
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .map_err(|_| UpError::Output {
            what: "cloud-hub init".into(),
            got: hub_id_text.clone(),
        })?;
    progress.say(format_args!("hub initialised (id {})", hub_id.short()));

    let mut tokens = Vec::with_capacity(plan.edges.len());
    for e in &plan.edges {
        let t = run_capture(
            &format!("cloud-hub token create for {}", e.label()),
            &opts.hub_bin,
            &args(&[
                &"--data-dir",
                &hub_dir,
                &"token",
                &"create",
                &"--tenant",
                &e.tenant.as_str(),
                &"--site",
                &e.site.as_str(),
                &"--role",
                &"edge",
                &"--ttl",
                &"1h",
                &"--reason",
                &"testbed up",
            ]),
            &hub_log,
            oneshot,
        )
        .await?;
        if t.is_empty() || t.contains(char::is_whitespace) {
            return Err(UpError::Output {
                what: format!("cloud-hub token create for {}", e.label()),
                got: t,
            });
        }
        tokens.push(t);
    }
    let admin = run_capture(
        "cloud-hub user token create",
        &opts.hub_bin,
        &args(&[
            &"--data-dir",
            &hub_dir,
            &"user",
            &"token",
            &"create",
            &"--scope",
            &"admin",
            &"--name",
            &"testbed",
        ]),
        &hub_log,
        oneshot,
    )
    .await?;
    let admin = admin.lines().last().unwrap_or("").trim().to_string();
    if admin.is_empty() {
        return Err(UpError::Output {
            what: "cloud-hub user token create".into(),
            got: admin,
        });
    }
    progress.say(format_args!(
        "{} join token(s) and an admin API token issued",
        tokens.len()
    ));

    let hub_http = free_port("the hub's HTTP API")?;
    let hub_cfg = plan.hub_config(&hub_dir, hub_http);
    let hub_toml = dir.join("hub.toml");
    let text = toml::to_string(&hub_cfg).map_err(|e| UpError::Output {
        what: "serialise hub.toml".into(),
        got: e.to_string(),
    })?;
    std::fs::write(&hub_toml, text).map_err(io(format!("write {}", hub_toml.display())))?;
    let hub = started.hub.insert(ChildProc::spawn(
        "hub",
        &opts.hub_bin,
        &args(&[&"--config", &hub_toml, &"serve"]),
        &hub_log,
    )?);
    let hub_ready = hub.wait_ready(opts.ready_timeout).await?;
    wait_http_ok(
        "hub",
        hub_ready.http,
        "/api/v1/edges",
        Some(&admin),
        opts.ready_timeout,
    )
    .await?;
    progress.say(format_args!(
        "hub ready (pid {}, sync {}, http://{})",
        hub.pid(),
        hub_ready.sync,
        hub_ready.http
    ));
    let contact = HubContact {
        endpoint_id: hub_id,
        addr: hub_ready.sync,
    };

    let dev_opts = FleetOptions {
        seed: opts.seed,
        time_scale: opts.time_scale,
        ..FleetOptions::default()
    };
    for (e, token) in plan.edges.iter().zip(tokens) {
        let cfgs: Vec<_> = e
            .devices
            .iter()
            .map(|d| device_config(d.kind, d.id.clone(), d.addr))
            .collect();
        let devices = start_fleet(&cfgs, &dev_opts)
            .await
            .map_err(|source| UpError::Devices {
                edge: e.label(),
                source,
            })?;
        let real: Vec<SimDeviceSpec> = e
            .devices
            .iter()
            .zip(&devices.devices)
            .map(|(spec, run)| SimDeviceSpec {
                addr: run.server.addr(),
                ..spec.clone()
            })
            .collect();
        started.pending_devices = Some(devices);
        progress.say(format_args!(
            "{} simulated device(s) for {} listening ({}..)",
            real.len(),
            e.label(),
            real.first().map(|d| d.addr.to_string()).unwrap_or_default()
        ));
        let stem = e.file_stem();
        let http = free_port(&format!("the HTTP API of {}", e.label()))?;
        let cfg = edge_node_config(
            e,
            &real,
            dir.join("edges").join(&stem),
            http,
            &contact,
            token,
            opts.summary_window_s,
        );
        let path = dir.join(format!("{stem}.toml"));
        let text = toml::to_string(&cfg).map_err(|err| UpError::Output {
            what: format!("serialise {}", path.display()),
            got: err.to_string(),
        })?;
        std::fs::write(&path, text).map_err(io(format!("write {}", path.display())))?;
        let proc = ChildProc::spawn(
            &e.label(),
            &opts.edge_bin,
            &args(&[&"run", &"--config", &path]),
            &logs.join(format!("{stem}.log")),
        )?;
        let devices = started
            .pending_devices
            .take()
            .unwrap_or_else(|| unreachable!("set just above"));
        started.edges.push(RunningEdge {
            plan: e.clone(),
            proc,
            http,
            devices,
        });
    }
    // Edges come up in parallel; report them in order.
    for i in 0..started.edges.len() {
        let edge = &mut started.edges[i];
        let ready = edge.proc.wait_ready(opts.ready_timeout).await?;
        edge.http = ready.http;
        let name = edge.plan.label();
        wait_http_ok(&name, ready.http, "/healthz", None, opts.ready_timeout).await?;
        progress.say(format_args!(
            "edge {name} ready (pid {}, http://{})",
            edge.proc.pid(),
            ready.http
        ));
    }

    let summary = summary(opts, plan, started, hub_ready.http, &admin);
    let fleet_json = dir.join("fleet.json");
    std::fs::write(&fleet_json, summary.to_string())
        .map_err(io(format!("write {}", fleet_json.display())))?;
    print_summary(opts, plan, started, hub_ready.http, &admin);
    Ok(())
}

/// Run until `shutdown` or until a child exits on its own (an error).
async fn watch_until(
    started: &mut Started,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), UpError> {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = tick.tick() => {
                let procs = started
                    .hub
                    .iter_mut()
                    .chain(started.edges.iter_mut().map(|e| &mut e.proc));
                for p in procs {
                    if let Some(status) = p.try_exited() {
                        return Err(UpError::Child(p.exited_error(status)));
                    }
                }
            }
        }
    }
}

fn summary(
    opts: &UpOptions,
    plan: &FleetPlan,
    started: &Started,
    hub_http: SocketAddr,
    admin: &str,
) -> serde_json::Value {
    serde_json::json!({
        "hub": {
            "http": format!("http://{hub_http}"),
            "dashboard": dashboard_url(hub_http, admin),
            "admin_token": admin,
            "pid": started.hub.as_ref().map(ChildProc::pid),
        },
        "tenants": plan.tenants.iter().map(|(t, r)| serde_json::json!({"id": t.as_str(), "region": r.as_str()})).collect::<Vec<_>>(),
        "edges": started.edges.iter().map(|e| serde_json::json!({
            "name": e.plan.label(),
            "tenant": e.plan.tenant.as_str(),
            "site": e.plan.site.as_str(),
            "http": format!("http://{}", e.http),
            "pid": e.proc.pid(),
            "devices": e.devices.devices.iter().map(|d| serde_json::json!({
                "id": d.id.as_str(), "kind": d.kind.as_str(), "addr": d.server.addr().to_string(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "seed": opts.seed,
        "time_scale": opts.time_scale,
    })
}

/// The hub dashboard URL carrying the admin token in the fragment (never
/// sent to the server in a request line or a log).
pub fn dashboard_url(hub_http: SocketAddr, token: &str) -> String {
    format!("http://{hub_http}/dashboard/#token={token}")
}

fn print_summary(
    opts: &UpOptions,
    plan: &FleetPlan,
    started: &Started,
    hub_http: SocketAddr,
    admin: &str,
) {
    let devices: usize = started.edges.iter().map(|e| e.devices.devices.len()).sum();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nfleet up: 1 hub, {} tenant(s), {} site(s), {} edge(s), {devices} simulated device(s) \
         (seed {}, time scale {}x)",
        plan.tenants.len(),
        plan.sites(),
        started.edges.len(),
        opts.seed,
        opts.time_scale
    );
    let _ = writeln!(out, "hub dashboard: {}", dashboard_url(hub_http, admin));
    let _ = writeln!(
        out,
        "hub API:       http://{hub_http}/api/v1 (Authorization: Bearer {admin})"
    );
    for e in &started.edges {
        let _ = writeln!(
            out,
            "edge {} ({}): http://{}/",
            e.plan.label(),
            e.plan.tenant,
            e.http
        );
    }
    let _ = writeln!(
        out,
        "data, configs and logs: {} (fleet.json has all of the above)",
        opts.data_dir.display()
    );
    let _ = writeln!(out, "running; Ctrl-C to stop everything");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_fresh_empty_or_previous_run_only() {
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("new");
        prepare_data_dir(&fresh).unwrap();
        assert!(fresh.join(MARKER).is_file() && fresh.join("logs").is_dir());
        // A previous run is reused.
        prepare_data_dir(&fresh).unwrap();
        // Someone else's directory is refused and left alone.
        let other = base.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("thesis.tex"), "x").unwrap();
        let e = prepare_data_dir(&other).unwrap_err().to_string();
        assert!(
            e.contains("not empty and not a previous testbed run"),
            "{e}"
        );
        assert!(!other.join("logs").exists());
        // A file is refused.
        let e = prepare_data_dir(&other.join("thesis.tex")).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert_eq!(fresh_run_dir(base.path()), base.path().join("run-1"));
        std::fs::create_dir(base.path().join("run-1")).unwrap();
        assert_eq!(fresh_run_dir(base.path()), base.path().join("run-2"));
    }
}
