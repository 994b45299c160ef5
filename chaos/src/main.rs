//! The `chaos` command line: validate scenario files, run a fault-injecting
//! relay by hand, and render a report from a recorded run.
//!
//! Exit codes: 0 pass, 1 fail (a checker failed, a scenario file is
//! invalid), 2 error (bad input, IO, or a run that could not be judged).
//! `chaos run` starts a real fleet (see `chaos::fleet`); `chaos sim` runs
//! the deterministic simulator over many seeds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use chaos::check::{self, RunRecord};
use chaos::link::{Direction, LinkFaults, Relay, RelayConfig};
use chaos::report;
use chaos::scenario::{self, Scenario};
use chaos::sim;

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "fieldsync chaos tooling: scenarios, fault-injecting relay, reports"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IsolationArg {
    /// One network namespace per node (needs root): only relays connect them.
    Netns,
    /// All nodes on loopback: iroh may route around the relays, so the
    /// isolation verdict cannot pass.
    Loopback,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dir {
    Both,
    AToB,
    BToA,
}

#[derive(Subcommand)]
enum Cmd {
    /// Parse and validate every *.toml scenario in DIR (or one file).
    CheckScenarios {
        /// Directory or file [default: the crate's scenarios/ folder].
        path: Option<PathBuf>,
    },
    /// Run a UDP relay between a client and --target until Ctrl-C.
    Relay {
        /// Address clients send to (127.0.0.1 only).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Address datagrams are forwarded to (127.0.0.1 only).
        #[arg(long)]
        target: std::net::SocketAddr,
        /// Which direction the faults apply to (a-to-b: client to target).
        #[arg(long, value_enum, default_value = "both")]
        direction: Dir,
        /// Drop everything.
        #[arg(long)]
        partition: bool,
        /// Loss probability.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Delay in ms.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Jitter in ms (uniform, +-).
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
        /// Duplication probability.
        #[arg(long, default_value_t = 0.0)]
        duplicate: f64,
        /// Reordering probability.
        #[arg(long, default_value_t = 0.0)]
        reorder: f64,
        /// How long a reordered datagram is held back, ms.
        #[arg(long, default_value_t = 20)]
        reorder_gap_ms: u64,
        /// Bandwidth cap, bytes per second.
        #[arg(long)]
        bandwidth: Option<u64>,
        /// Seed of the random decisions.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print counters every N seconds (0: only at exit).
        #[arg(long, default_value_t = 5)]
        stats_every: u64,
    },
    /// Run many seeds of the deterministic simulator; exit 1 on a failing
    /// seed, printing it and how to replay it.
    Sim {
        /// How many consecutive seeds [default: 10000, or 100000 with --nightly].
        #[arg(long)]
        seeds: Option<u64>,
        /// First seed.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Worker threads [default: the number of CPUs].
        #[arg(long)]
        threads: Option<usize>,
        /// Edge nodes per simulated fleet (plus one hub).
        #[arg(long)]
        edges: Option<usize>,
        /// Steps of the safety phase (10 ms of virtual time each).
        #[arg(long)]
        steps: Option<usize>,
        /// Virtual time the liveness phase may take to converge, ms.
        #[arg(long)]
        liveness_deadline_ms: Option<u64>,
        /// The larger nightly configuration (4 edges, 400 steps, 100000 seeds).
        #[arg(long)]
        nightly: bool,
        /// Keep running after a failing seed (report all of them).
        #[arg(long)]
        keep_going: bool,
        /// Print progress every N seconds.
        #[arg(long, default_value_t = 5)]
        progress_every: u64,
        /// Also write the failures (and the checker verdict of the first)
        /// as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run a scenario against a real local fleet (cloud-hub and edge-node
    /// child processes behind one relay per node pair), then check it and
    /// write run.json and the report into --out.
    Run {
        /// Scenario files, or directories of them (every `*.toml`, by
        /// name). With more than one, each runs in turn into
        /// `OUT/<file stem>/` and a summary table ends the output.
        #[arg(required = true)]
        scenario: Vec<PathBuf>,
        /// Output directory (node directories, logs, run.json, report).
        #[arg(long)]
        out: PathBuf,
        /// The cloud-hub binary [default: next to chaos, else on PATH].
        #[arg(long)]
        hub_bin: Option<PathBuf>,
        /// The edge-node binary [default: next to chaos, else on PATH].
        #[arg(long)]
        edge_bin: Option<PathBuf>,
        /// Seconds a node may take to print its ready line.
        #[arg(long, default_value_t = 30)]
        ready_timeout: u64,
        /// Simulated device seconds per real second.
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Run even if some actions cannot be carried out (recorded as
        /// failed operations).
        #[arg(long)]
        allow_unsupported: bool,
        /// How nodes are kept apart: `netns` (one network namespace per
        /// node; needs root) or `loopback` (no privileges, but iroh may
        /// route around the relays, and the isolation verdict never passes).
        #[arg(long, value_enum, default_value = "netns")]
        isolation: IsolationArg,
    },
    /// Probe reachability from the current network namespace (used by
    /// `chaos run` through `ip netns exec`); prints a JSON list.
    #[command(hide = true)]
    NetnsProbe {
        /// Send one UDP datagram here.
        #[arg(long)]
        udp: Vec<std::net::SocketAddr>,
        /// Open a TCP connection here.
        #[arg(long)]
        tcp: Vec<std::net::SocketAddr>,
        /// Send one UDP datagram here and wait for an answer.
        #[arg(long)]
        udp_roundtrip: Vec<std::net::SocketAddr>,
        /// Instead: echo UDP datagrams on this address (prints `ready ADDR`).
        #[arg(long)]
        serve_udp: Option<std::net::SocketAddr>,
        /// Bound of each probe, or how long to serve, ms.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Run the checkers over a recorded run and write report.json,
    /// summary.txt and timeline.svg.
    Report {
        /// The run record (JSON).
        #[arg(long)]
        input: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::CheckScenarios { path } => check_scenarios(path),
        Cmd::Report { input, out } => render(input, out),
        Cmd::Run {
            scenario,
            out,
            hub_bin,
            edge_bin,
            ready_timeout,
            time_scale,
            allow_unsupported,
            isolation,
        } => {
            let mut opts = chaos::fleet::run::RunOptions::new(out.join("fleet"));
            opts.isolation = match isolation {
                IsolationArg::Netns => chaos::fleet::Isolation::Netns,
                IsolationArg::Loopback => chaos::fleet::Isolation::Loopback,
            };
            if let Ok(me) = std::env::current_exe() {
                opts.probe_bin = me;
            }
            if let Some(b) = hub_bin {
                opts.hub_bin = b;
            }
            if let Some(b) = edge_bin {
                opts.edge_bin = b;
            }
            opts.ready_timeout = Duration::from_secs(ready_timeout.max(1));
            opts.device_time_scale = time_scale;
            opts.allow_unsupported = allow_unsupported;
            let can = match isolation {
                IsolationArg::Netns => chaos::netns::available().map_err(|e| {
                    anyhow::anyhow!(
                        "--isolation netns needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create one network namespace per node: {e}. \
                         `--isolation loopback` runs without it, but iroh may then route around the fault relays, so partition verdicts cannot pass"
                    )
                }),
                IsolationArg::Loopback => Ok(()),
            };
            match (can, tokio::runtime::Runtime::new()) {
                (Err(e), _) => Err(e),
                (Ok(()), Ok(rt)) => rt.block_on(run_fleets(scenario, out, opts)),
                (Ok(()), Err(e)) => Err(anyhow::Error::from(e).context("start the tokio runtime")),
            }
        }
        Cmd::NetnsProbe {
            udp,
            tcp,
            udp_roundtrip,
            serve_udp,
            timeout_ms,
        } => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(netns_probe(
                udp,
                tcp,
                udp_roundtrip,
                serve_udp,
                Duration::from_millis(timeout_ms),
            )),
            Err(e) => Err(anyhow::Error::from(e).context("start the tokio runtime")),
        },
        Cmd::Sim {
            seeds,
            from,
            threads,
            edges,
            steps,
            liveness_deadline_ms,
            nightly,
            keep_going,
            progress_every,
            json,
        } => run_sim(SimArgs {
            seeds,
            from,
            threads,
            edges,
            steps,
            liveness_deadline_ms,
            nightly,
            keep_going,
            progress_every,
            json,
        }),
        relay @ Cmd::Relay { .. } => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(run_relay(relay)),
            Err(e) => Err(anyhow::Error::from(e).context("start the tokio runtime")),
        },
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn netns_probe(
    udp: Vec<std::net::SocketAddr>,
    tcp: Vec<std::net::SocketAddr>,
    roundtrip: Vec<std::net::SocketAddr>,
    serve: Option<std::net::SocketAddr>,
    within: Duration,
) -> anyhow::Result<u8> {
    if let Some(addr) = serve {
        let n = chaos::netns::serve_udp_echo(addr, within)
            .await
            .with_context(|| format!("echo UDP on {addr}"))?;
        eprintln!("echoed {n} datagrams");
        return Ok(0);
    }
    let mut out = Vec::new();
    for a in udp {
        out.push(chaos::netns::probe_udp(a).await);
    }
    for a in tcp {
        out.push(chaos::netns::probe_tcp(a, within).await);
    }
    for a in roundtrip {
        out.push(chaos::netns::probe_udp_roundtrip(a, within).await);
    }
    println!(
        "{}",
        serde_json::to_string(&out).context("encode the probes")?
    );
    Ok(0)
}

fn check_scenarios(path: Option<PathBuf>) -> anyhow::Result<u8> {
    let path =
        path.unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios")));
    let results = if path.is_dir() {
        scenario::load_dir(&path)
            .with_context(|| format!("list scenarios in {}", path.display()))?
    } else {
        vec![(path.clone(), Scenario::load(&path))]
    };
    if results.is_empty() {
        anyhow::bail!("no *.toml scenario files in {}", path.display());
    }
    let mut bad = 0;
    for (file, r) in &results {
        match r {
            Ok(s) => println!(
                "ok    {}: {} ({} actions, {} nodes, {} links, {} s)",
                file.display(),
                s.name,
                s.timeline.len(),
                s.fleet.nodes().len(),
                s.fleet.links().len(),
                s.duration.as_secs_f64()
            ),
            Err(e) => {
                bad += 1;
                println!("error {e}");
            }
        }
    }
    println!("{} scenario files, {} invalid", results.len(), bad);
    Ok(if bad > 0 { 1 } else { 0 })
}

fn render(input: PathBuf, out: PathBuf) -> anyhow::Result<u8> {
    let text =
        std::fs::read_to_string(&input).with_context(|| format!("read {}", input.display()))?;
    let record: RunRecord = serde_json::from_str(&text)
        .with_context(|| format!("parse run record {}", input.display()))?;
    if let Err(e) = record.history.validate() {
        anyhow::bail!("{}: history is malformed: {e}", input.display());
    }
    let rep = report::build(&record);
    let files = report::write_all(&rep, &out).context("write the report")?;
    print!("{}", report::render_text(&rep));
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(check::exit_code(rep.overall) as u8)
}

async fn run_relay(cmd: Cmd) -> anyhow::Result<u8> {
    let Cmd::Relay {
        listen,
        target,
        direction,
        partition,
        loss,
        delay_ms,
        jitter_ms,
        duplicate,
        reorder,
        reorder_gap_ms,
        bandwidth,
        seed,
        stats_every,
    } = cmd
    else {
        anyhow::bail!("not a relay command");
    };
    let faults = LinkFaults {
        partitioned: partition,
        loss,
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(jitter_ms),
        duplicate,
        reorder,
        reorder_gap: Duration::from_millis(reorder_gap_ms),
        bandwidth,
        ..LinkFaults::default()
    };
    faults.validate().context("fault flags")?;
    let mut cfg = RelayConfig::proxy(listen, target, seed);
    for d in Direction::BOTH {
        let applies = matches!(
            (direction, d),
            (Dir::Both, _) | (Dir::AToB, Direction::AToB) | (Dir::BToA, Direction::BToA)
        );
        if applies {
            cfg.faults[match d {
                Direction::AToB => 0,
                Direction::BToA => 1,
            }] = faults.clone();
        }
    }
    let relay = Relay::spawn(cfg).await.context("start the relay")?;
    println!(
        "relaying {} -> {} (from {}); Ctrl-C to stop",
        relay.a_side(),
        target,
        relay.b_side()
    );
    let h = relay.handle();
    let print = || {
        for d in Direction::BOTH {
            let c = h.counters(d);
            println!(
                "{d:?}: in {} ({} B), forwarded {} ({} B), dropped partition {} loss {} queue {} no-peer {}, duplicated {}, reordered {}",
                c.packets_in,
                c.bytes_in,
                c.forwarded,
                c.bytes_forwarded,
                c.dropped_partition,
                c.dropped_loss,
                c.dropped_queue,
                c.no_peer,
                c.duplicated,
                c.reordered
            );
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(stats_every.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.context("wait for Ctrl-C")?;
                break;
            }
            _ = tick.tick(), if stats_every > 0 => print(),
        }
    }
    print();
    relay.shutdown().await.context("stop the relay")?;
    Ok(0)
}

struct SimArgs {
    seeds: Option<u64>,
    from: u64,
    threads: Option<usize>,
    edges: Option<usize>,
    steps: Option<usize>,
    liveness_deadline_ms: Option<u64>,
    nightly: bool,
    keep_going: bool,
    progress_every: u64,
    json: Option<PathBuf>,
}

fn run_sim(a: SimArgs) -> anyhow::Result<u8> {
    let mut cfg = if a.nightly {
        sim::nightly_config()
    } else {
        sim::SimConfig::default()
    };
    if let Some(e) = a.edges {
        anyhow::ensure!((1..=64).contains(&e), "--edges {e}: must be 1 to 64");
        cfg.edges = e;
    }
    if let Some(s) = a.steps {
        anyhow::ensure!(s <= 1_000_000, "--steps {s}: at most 1000000");
        cfg.steps = s;
    }
    if let Some(d) = a.liveness_deadline_ms {
        anyhow::ensure!(
            d > 0,
            "--liveness-deadline-ms 0: the liveness phase needs time"
        );
        cfg.liveness_deadline_ms = d;
    }
    let seeds = a.seeds.unwrap_or(if a.nightly { 100_000 } else { 10_000 });
    anyhow::ensure!(seeds > 0, "--seeds 0: nothing to run");
    anyhow::ensure!(
        a.from.checked_add(seeds).is_some(),
        "--from {} --seeds {seeds}: the range overflows u64",
        a.from
    );
    let threads = match a.threads {
        Some(0) => anyhow::bail!("--threads 0: need at least one thread"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let plan = sim::SimPlan {
        from: a.from,
        seeds,
        threads,
        stop_on_failure: !a.keep_going,
        cfg: cfg.clone(),
    };
    println!(
        "sim: seeds {}..{} ({seeds}), {threads} threads, {} edges + 1 hub, {} steps, liveness deadline {} ms",
        a.from,
        a.from + seeds,
        cfg.edges,
        cfg.steps,
        cfg.liveness_deadline_ms
    );
    // A panicking seed is caught and reported as a failure with its
    // message; keep the default hook from printing a backtrace per seed.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("chaos sim: panic: {info}");
    }));
    let every = Duration::from_secs(a.progress_every.max(1));
    let summary = sim::run_seeds(&plan, every, &mut |p| {
        println!(
            "sim: {}/{} seeds, {} failed, {:.1} s, {:.0} seeds/s",
            p.done,
            p.total,
            p.failed,
            p.elapsed.as_secs_f64(),
            p.rate()
        );
    });
    let _ = std::panic::take_hook();
    println!(
        "sim: {} seeds in {:.2} s: {:.1} seeds/s ({} edits, {} crashes, {} frames; slowest convergence {} ms virtual)",
        summary.run,
        summary.elapsed.as_secs_f64(),
        summary.seeds_per_sec(),
        summary.edits,
        summary.crashes,
        summary.frames,
        summary.max_converged_at_ms
    );
    let mut verdicts = Vec::new();
    for f in &summary.failures {
        let vs = sim::failure_verdicts(f);
        println!("FAIL seed {}: {}", f.seed, f.violation);
        for v in vs.iter().filter(|v| v.status != check::Status::Pass) {
            println!("  {} {}: {}", v.status.as_str(), v.checker, v.summary);
            for e in &v.evidence {
                println!("    - {}", e.describe());
            }
        }
        println!("  replay: {}", sim::replay_command(f.seed, &cfg, a.nightly));
        verdicts.push(serde_json::json!({
            "seed": f.seed,
            "violation": f.violation,
            "panicked": f.panicked,
            "replay": sim::replay_command(f.seed, &cfg, a.nightly),
            "verdicts": vs,
        }));
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "from": a.from,
            "planned": summary.planned,
            "run": summary.run,
            "elapsed_s": summary.elapsed.as_secs_f64(),
            "seeds_per_s": summary.seeds_per_sec(),
            "failures": verdicts,
        });
        let text = serde_json::to_string_pretty(&doc).context("encode the sim summary")?;
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    }
    if !summary.failures.is_empty() {
        println!(
            "sim: {} of {} seeds failed",
            summary.failures.len(),
            summary.run
        );
        return Ok(1);
    }
    if summary.run < summary.planned {
        anyhow::bail!(
            "only {} of {} seeds ran to an outcome",
            summary.run,
            summary.planned
        );
    }
    println!("sim: all {} seeds passed", summary.run);
    Ok(0)
}

/// Run one scenario, or several in turn (each into `out/<stem>`), and
/// summarise; the exit code is the worst of them.
async fn run_fleets(
    paths: Vec<PathBuf>,
    out: PathBuf,
    opts: chaos::fleet::run::RunOptions,
) -> anyhow::Result<u8> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(&p)
                .with_context(|| format!("read {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            in_dir.sort();
            if in_dir.is_empty() {
                anyhow::bail!("{}: no *.toml scenario files", p.display());
            }
            files.extend(in_dir);
        } else {
            files.push(p);
        }
    }
    if let [one] = files.as_slice() {
        return run_fleet(one.clone(), out, opts).await;
    }
    let mut results = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let stem = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("scenario-{i}"));
        let dir = out.join(&stem);
        let mut o = opts.clone();
        o.root = dir.join("fleet");
        println!("== [{}/{}] {}", i + 1, files.len(), f.display());
        let t = std::time::Instant::now();
        let code = match run_fleet(f.clone(), dir.clone(), o).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {}: {e:#}", f.display());
                2
            }
        };
        results.push((stem, code, t.elapsed(), dir));
    }
    println!(
        "\n{:<40} {:<8} {:>7}  report",
        "scenario", "verdict", "time"
    );
    for (stem, code, took, dir) in &results {
        let verdict = match code {
            0 => "pass",
            1 => "FAIL",
            _ => "UNKNOWN",
        };
        println!(
            "{stem:<40} {verdict:<8} {:>6.0}s  {}",
            took.as_secs_f64(),
            dir.join("report").display()
        );
    }
    let passed = results.iter().filter(|r| r.1 == 0).count();
    println!("{passed} of {} scenarios passed", results.len());
    // A failure outranks an unknown: 1 if any failed, else 2 if any could
    // not be judged, else 0.
    let codes: Vec<u8> = results.iter().map(|r| r.1).collect();
    Ok(if codes.contains(&1) {
        1
    } else {
        codes.into_iter().max().unwrap_or(0)
    })
}

async fn run_fleet(
    scenario: PathBuf,
    out: PathBuf,
    opts: chaos::fleet::run::RunOptions,
) -> anyhow::Result<u8> {
    let s = Scenario::load(&scenario).with_context(|| format!("load {}", scenario.display()))?;
    if out.join("fleet").exists() {
        anyhow::bail!(
            "{} already holds a run; choose a new --out",
            out.join("fleet").display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    println!(
        "run {}: {} nodes, {} links, {} s; files in {}",
        s.name,
        s.fleet.nodes().len(),
        s.fleet.links().len(),
        s.duration.as_secs_f64(),
        out.display()
    );
    let record = chaos::fleet::run::run_scenario(&s, opts)
        .await
        .with_context(|| format!("run scenario {}", s.name))?;
    let json = serde_json::to_string_pretty(&record).context("encode the run record")?;
    let path = out.join("run.json");
    std::fs::write(&path, json).with_context(|| format!("write {}", path.display()))?;
    for w in &record.relay_windows {
        println!(
            "relay {} {} {} {}..{} ms: in {} forwarded {} dropped (partition {} other {})",
            w.link,
            w.direction,
            w.faults,
            w.from_ms,
            w.to_ms,
            w.packets_in,
            w.forwarded,
            w.dropped_partition,
            w.dropped_other
        );
    }
    let rep = report::build(&record);
    let files = report::write_all(&rep, &out.join("report")).context("write the report")?;
    print!("{}", report::render_text(&rep));
    println!("wrote {}", path.display());
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(check::exit_code(rep.overall) as u8)
}
