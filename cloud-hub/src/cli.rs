//! The `cloud-hub` command line: hub identity, join tokens, offline registry edits, audit.
//!
//! Every command that changes state opens the audit log first (which locks it, verifies
//! the chain and repairs a torn tail), then changes the registry, then appends one audit
//! entry saying who did what and why. Exit codes: 0 success, 1 audit log tampered,
//! 2 any other error (bad input, missing files, IO), 3 audit log has a torn tail only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use cloud_hub::audit::{self, AuditLog, AuditRecord};
use cloud_hub::keys;
use cloud_hub::registry::{JsonFileStore, Registry};
use cloud_hub::tokens::{self, TokenRequest};
use ed25519_dalek::{SigningKey, VerifyingKey};
use schemas::config::HubConfig;
use schemas::identity::EndpointKey;
use schemas::ids::{Role, SiteId, TenantId};
use schemas::time::Timestamp;

/// The wall clock, read in exactly one place.
fn now() -> Timestamp {
    // The CLI is the outermost layer: library code takes `now` as an argument.
    #[allow(clippy::disallowed_methods)]
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    Timestamp(since.map(|d| d.as_millis() as i64).unwrap_or(0))
}

#[derive(Debug, Parser)]
#[command(
    name = "cloud-hub",
    version,
    about = "fieldsync cloud hub: identity, enrolment, revocation and audit of a fleet",
    long_about = "fieldsync cloud hub: identity, enrolment, revocation and audit of a fleet.\n\n\
        Start with `cloud-hub init` to create the hub key and data directory. Issue a join \
        token per new edge node with `cloud-hub token create`; the node presents it once to \
        enrol. `cloud-hub node revoke` cuts a node off (edges learn it from the signed \
        registry). Every change is written to a hash-chained, signed audit log that \
        `cloud-hub audit verify` checks.\n\n\
        Exit codes: 0 ok, 1 audit log tampered, 2 error, 3 audit log torn by a crash \
        (repaired by the next change)."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Hub config file (TOML, `schemas::config::HubConfig`); flags override it.
    #[arg(long, global = true, env = "FIELDSYNC_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (registry, audit log, default key location).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Hub secret key file (default: <data-dir>/hub.key).
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Who is acting, for the audit log (default: cli:$USER).
    #[arg(long, global = true, env = "FIELDSYNC_ACTOR")]
    actor: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub: the sync endpoint (iroh QUIC, `fieldsync/1`) with enrolment
    /// (`fieldsync-enrol/1`) on the same endpoint, the HTTP API and dashboard, and (on a
    /// regional hub with `upstream`) the link to the global hub. Prints
    /// `ready hub=<id> sync=<ip:port> http=http://<addr>` once listening; Ctrl-C or SIGTERM
    /// shut it down gracefully (exit 0). `node revoke` may be run while it serves: the hub
    /// re-reads the registry file within a second, closes the node's connections and
    /// republishes the signed registry to the edges.
    Serve(ServeArgs),
    /// Create the hub key (mode 0600) and data directory; print the hub endpoint id.
    /// Safe to re-run: an existing key is kept.
    Init,
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The node registry (offline edits while the hub is not serving).
    #[command(subcommand)]
    Node(NodeCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// API users: bearer tokens for the HTTP API and dashboard.
    #[command(subcommand)]
    User(cloud_hub::users::UserCmd),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// HTTP API and dashboard address (overrides `http_listen`).
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// QUIC sync address (overrides `sync_listen`; port 0 picks a free port).
    #[arg(long)]
    sync_bind: Option<std::net::SocketAddr>,
    /// Do not serve HTTP.
    #[arg(long)]
    no_http: bool,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Issue a one-use join token; prints it alone on stdout, details on stderr.
    Create {
        /// Tenant the node will belong to.
        #[arg(long)]
        tenant: TenantId,
        /// Site the node will belong to.
        #[arg(long)]
        site: SiteId,
        /// Role to grant: edge or operator.
        #[arg(long, default_value = "edge")]
        role: Role,
        /// Time to live: 90s, 30m, 1h, 7d (at most 30d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Why the token is issued (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List enrolled nodes, revoked ones included.
    List {
        /// Print JSON records instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Redeem a join token for an endpoint id by hand (normally the sync endpoint does
    /// this when a new node connects with its token).
    Enrol {
        /// The join token (fsj1....).
        #[arg(long)]
        token: String,
        /// The node's endpoint id (64 hex digits).
        #[arg(long)]
        endpoint: EndpointKey,
    },
    /// Revoke a node: it may no longer sync, and edges refuse it once they hold the new
    /// signed registry. Works while `serve` runs: the hub notices the registry change,
    /// closes the node's live connections within seconds and republishes the registry.
    Revoke {
        /// The node's endpoint id (64 hex digits).
        id: EndpointKey,
        /// Why (required; recorded in the registry and the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Print the hub-signed registry snapshot (JSON) that edges hold read-only.
    Snapshot,
    /// Record a regional hub's endpoint id in this (global) hub's registry, so it may sync
    /// fleet aggregates here.
    AddHub {
        /// The regional hub's endpoint id (64 hex digits).
        id: EndpointKey,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Verify the audit log's hash chain and signatures. Exit 0 if intact, 1 if tampered,
    /// 3 if only a torn tail (crash during an append) was found.
    Verify {
        /// Verify against this hub endpoint id instead of the local key (for auditors
        /// without the secret key).
        #[arg(long)]
        hub_id: Option<EndpointKey>,
    },
}

/// Paths resolved from config and flags.
struct Paths {
    data_dir: PathBuf,
    key: PathBuf,
    registry: PathBuf,
    audit: PathBuf,
}

/// The hub config from `--config` (or defaults) with `--data-dir` and `--key` applied.
fn load_config(g: &GlobalArgs) -> anyhow::Result<HubConfig> {
    let mut cfg = match &g.config {
        Some(p) => HubConfig::load(p).map_err(|e| anyhow!("{e}"))?,
        None => HubConfig::default(),
    };
    if let Some(d) = &g.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(k) = &g.key {
        cfg.key_path = Some(k.clone());
    }
    Ok(cfg)
}

impl Paths {
    fn resolve(g: &GlobalArgs) -> anyhow::Result<Paths> {
        let cfg = load_config(g)?;
        Ok(Paths {
            key: cfg.key_path(),
            registry: cfg.data_dir.join("registry.json"),
            audit: cfg.data_dir.join("audit.log"),
            data_dir: cfg.data_dir,
        })
    }

    fn require_init(&self) -> anyhow::Result<()> {
        if !self.key.exists() {
            bail!(
                "no hub key at {}; run `cloud-hub init --data-dir {}` first",
                self.key.display(),
                self.data_dir.display()
            );
        }
        Ok(())
    }

    fn load_key(&self) -> anyhow::Result<SigningKey> {
        self.require_init()?;
        keys::load(&self.key).with_context(|| "load the hub key")
    }
}

fn actor(g: &GlobalArgs) -> String {
    g.actor.clone().unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    })
}

/// Entry point of the binary.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn open_audit(paths: &Paths, key: &SigningKey) -> anyhow::Result<AuditLog> {
    // Wait (briefly) if a running hub is appending.
    let (log, outcome) =
        AuditLog::open_wait(&paths.audit, key.clone(), now()).context("open the audit log")?;
    if let Some((finding, saved)) = outcome.repaired {
        eprintln!(
            "note: repaired the audit log: {finding}; torn bytes saved to {}",
            saved.display()
        );
    }
    Ok(log)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let paths = Paths::resolve(&cli.global)?;
    let who = actor(&cli.global);
    match cli.command {
        Command::Init => init(&paths, &who),
        Command::Serve(args) => {
            paths.require_init()?;
            let mut cfg = load_config(&cli.global)?;
            if let Some(h) = args.http {
                cfg.http_listen = h;
            }
            if let Some(b) = args.sync_bind {
                cfg.sync_listen = b;
            }
            serve(cfg, !args.no_http)
        }
        Command::Node(NodeCmd::AddHub { id, reason }) => {
            let key = paths.load_key()?;
            let mut log = open_audit(&paths, &key)?;
            let mut reg = open_registry(&paths, key)?;
            let t = now();
            reg.add_hub(id, t)?;
            log.append(
                &AuditRecord {
                    actor: who,
                    action: "node.add_hub".into(),
                    target: id.to_string(),
                    reason,
                    details: format!("role=hub registry_seq={}", reg.seq()),
                },
                t,
            )
            .context("the hub IS recorded, but recording it in the audit log failed; add the entry by hand")?;
            println!("recorded hub {id} (registry seq {})", reg.seq());
            Ok(ExitCode::SUCCESS)
        }
        Command::User(cmd) => {
            cloud_hub::users::run_cli(cmd, &paths.data_dir, &paths.audit, &paths.key, &who, now())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCmd::Create {
            tenant,
            site,
            role,
            ttl,
            reason,
        }) => {
            let key = paths.load_key()?;
            let ttl_ms = tokens::parse_ttl(&ttl)?;
            let mut log = open_audit(&paths, &key)?;
            let req = TokenRequest {
                tenant,
                site,
                role,
                ttl_ms,
            };
            let t = now();
            let (token, claims) = tokens::issue(&key, &req, t)?;
            log.append(
                &AuditRecord {
                    actor: who,
                    action: "token.create".into(),
                    target: format!("token:{}", claims.nonce),
                    reason,
                    details: format!(
                        "tenant={} site={} role={} expires_at={}",
                        claims.tenant, claims.site, claims.role, claims.expires_at
                    ),
                },
                t,
            )
            .context("record the token in the audit log (no token was issued)")?;
            eprintln!(
                "join token for tenant {} site {} role {}, valid until {} (one use)",
                claims.tenant, claims.site, claims.role, claims.expires_at
            );
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCmd::List { json }) => {
            let key = paths.load_key()?;
            let reg = open_registry(&paths, key)?;
            if json {
                let recs: Vec<_> = reg.list().collect();
                println!("{}", serde_json::to_string_pretty(&recs)?);
            } else {
                println!(
                    "{:<64}  {:<16}  {:<16}  {:<8}  {:<24}  status",
                    "endpoint", "tenant", "site", "role", "enrolled_at"
                );
                for r in reg.list() {
                    let status = match (&r.revoked_at, &r.revoked_reason) {
                        (Some(at), reason) => format!(
                            "revoked {at}: {}",
                            reason.as_deref().unwrap_or("no reason recorded")
                        ),
                        (None, _) => "active".into(),
                    };
                    println!(
                        "{:<64}  {:<16}  {:<16}  {:<8}  {:<24}  {status}",
                        r.endpoint_id,
                        r.tenant.as_ref().map(|t| t.as_str()).unwrap_or("-"),
                        r.site.as_ref().map(|s| s.as_str()).unwrap_or("-"),
                        r.role.to_string(),
                        r.enrolled_at.to_string(),
                    );
                }
                eprintln!("{} node(s), registry seq {}", reg.list().count(), reg.seq());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCmd::Enrol { token, endpoint }) => {
            let key = paths.load_key()?;
            let mut log = open_audit(&paths, &key)?;
            let mut reg = open_registry(&paths, key)?;
            let t = now();
            let nonce = tokens::parse(&token)
                .map(|p| p.claims.nonce)
                .unwrap_or_default();
            let rec = reg.enrol(&token, endpoint, t)?;
            log.append(
                &AuditRecord {
                    actor: who,
                    action: "node.enrol".into(),
                    target: endpoint.to_string(),
                    reason: "join token redeemed (offline)".into(),
                    details: format!(
                        "tenant={} site={} role={} token={nonce} registry_seq={}",
                        rec.tenant.as_ref().map(|t| t.as_str()).unwrap_or("-"),
                        rec.site.as_ref().map(|s| s.as_str()).unwrap_or("-"),
                        rec.role,
                        reg.seq()
                    ),
                },
                t,
            )
            .context("the node IS enrolled, but recording it in the audit log failed; add the entry by hand")?;
            println!(
                "enrolled {endpoint} as {} (registry seq {})",
                rec.role,
                reg.seq()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCmd::Revoke { id, reason }) => {
            let key = paths.load_key()?;
            let mut log = open_audit(&paths, &key)?;
            let mut reg = open_registry(&paths, key)?;
            let t = now();
            let rec = reg.revoke(&id, &reason, t)?;
            log.append(
                &AuditRecord {
                    actor: who,
                    action: "node.revoke".into(),
                    target: id.to_string(),
                    reason: reason.trim().to_string(),
                    details: format!("registry_seq={}", reg.seq()),
                },
                t,
            )
            .context("the node IS revoked, but recording it in the audit log failed; add the entry by hand")?;
            println!(
                "revoked {id} at {} (registry seq {}); a running hub closes its connections within seconds",
                rec.revoked_at.unwrap_or(t),
                reg.seq()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCmd::Snapshot) => {
            let key = paths.load_key()?;
            let reg = open_registry(&paths, key)?;
            println!("{}", serde_json::to_string_pretty(&reg.signed_snapshot())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCmd::Verify { hub_id }) => {
            let hub: VerifyingKey = match hub_id {
                Some(id) => keys::verifying_key(&id)?,
                None => paths.load_key()?.verifying_key(),
            };
            audit_verify(&paths.audit, &hub)
        }
    }
}

fn open_registry(paths: &Paths, key: SigningKey) -> anyhow::Result<Registry<JsonFileStore>> {
    Registry::open(JsonFileStore::new(&paths.registry), key).context("open the registry")
}

fn init(paths: &Paths, who: &str) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&paths.data_dir)
        .with_context(|| format!("create data directory {}", paths.data_dir.display()))?;
    let (key, created) = keys::load_or_create(&paths.key).context("load or create the hub key")?;
    let id = keys::endpoint_key(&key);
    let mut log = open_audit(paths, &key)?;
    let store = JsonFileStore::new(&paths.registry);
    let new_registry = !store.path().exists();
    if new_registry {
        use cloud_hub::registry::RegistryStore as _;
        store
            .save(&Default::default())
            .context("create the registry")?;
    }
    if created || new_registry {
        log.append(
            &AuditRecord {
                actor: who.to_string(),
                action: "hub.init".into(),
                target: id.to_string(),
                reason: "cloud-hub init".into(),
                details: format!(
                    "key {} ({}), registry {} ({})",
                    paths.key.display(),
                    if created { "created" } else { "existing" },
                    paths.registry.display(),
                    if new_registry { "created" } else { "existing" },
                ),
            },
            now(),
        )
        .context("record init in the audit log")?;
        eprintln!("initialised hub in {}", paths.data_dir.display());
    } else {
        eprintln!(
            "hub already initialised in {}; key kept",
            paths.data_dir.display()
        );
    }
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

fn audit_verify(path: &Path, hub: &VerifyingKey) -> anyhow::Result<ExitCode> {
    let report = audit::verify(path, hub).context("verify the audit log")?;
    match report.finding {
        None => {
            println!(
                "ok: {} entries verified in {}",
                report.verified,
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(f) => {
            let kind = if f.is_tampering() {
                "TAMPERED"
            } else {
                "TORN TAIL"
            };
            println!(
                "{kind}: first bad entry {}: {f} ({} entries before it verified)",
                f.seq(),
                report.verified
            );
            Ok(ExitCode::from(if f.is_tampering() { 1 } else { 3 }))
        }
    }
}

/// `cloud-hub serve`: run until Ctrl-C or SIGTERM.
fn serve(cfg: HubConfig, http: bool) -> anyhow::Result<ExitCode> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        let mut opts = cloud_hub::hub::ServeOptions::new(cfg);
        opts.http = http;
        let clock: std::sync::Arc<dyn cloud_hub::api::Clock> = cloud_hub::offset_clock::from_env();
        let hub = cloud_hub::hub::Hub::start(opts, clock)
            .await
            .context("start the hub")?;
        let sync = hub
            .sync_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "none".into());
        let http = hub
            .http_addr()
            .map(|a| format!("http://{a}"))
            .unwrap_or_else(|| "off".into());
        println!("ready hub={} sync={sync} http={http}", hub.endpoint_id());
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("install the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
            _ = term.recv() => {}
        }
        eprintln!("shutting down");
        hub.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
