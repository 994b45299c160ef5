//! The iroh driver: moves a [`Session`]'s bytes over QUIC.
//!
//! One endpoint per node, keyed by the node key (its `EndpointId`), offline
//! by default: no relay, no address lookup, portmapper off, bound to the
//! configured address (loopback by default). Protocol `fieldsync/1` is
//! accepted through an iroh `Router`. Each connection carries two
//! bidirectional streams, one per [`Plane`], so a telemetry backlog never
//! delays a command. Per connection, one task owns the session (read,
//! handle, poll, write, sleep until the next timeout, as quinn's
//! `ConnectionDriver`), with a reader and a writer task per stream so a slow
//! peer never blocks reading.
//!
//! Every accepted connection is checked against the [`Directory`] before
//! any stream is read: unknown or revoked keys are closed with
//! [`CLOSE_UNAUTHORISED`] and receive no document bytes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh::endpoint::{Connection, PortmapperConfig, RecvStream, SendStream, VarInt, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router, RouterBuilder};
use schemas::identity::EndpointKey;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::authz::{Authz, Directory, PeerInfo};
use crate::identity::{NodeKey, from_iroh, to_iroh};
use crate::protocol::{ALPN, Plane};
use crate::session::{Event, Session, SessionConfig, SessionStats};
use crate::store::DocStore;

/// Close code: the peer is unknown, revoked or may not connect.
pub const CLOSE_UNAUTHORISED: u32 = 1;
/// Close code: a protocol error ended the session.
pub const CLOSE_PROTOCOL: u32 = 2;
/// Close code: the local node disconnected the peer (revocation).
pub const CLOSE_REVOKED: u32 = 3;
/// Close code: the node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 4;

/// Why the driver could not start or connect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    #[error("bind QUIC endpoint on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("connect to {peer} at {addr}: {reason}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("peer {0} is not a valid ed25519 public key")]
    BadPeerKey(String),
}

/// Driver settings.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// UDP address to bind (port 0: any free port).
    pub bind: SocketAddr,
    pub session: SessionConfig,
    /// How often received changes are made durable.
    pub flush_every: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            session: SessionConfig::default(),
            flush_every: Duration::from_millis(50),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Per-peer status for UIs and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerStatus {
    pub connected: bool,
    /// Time since the connect-time differences were last all synced.
    #[serde(skip)]
    pub last_sync: Option<Instant>,
    pub docs_behind: usize,
    pub bytes_queued: usize,
    pub connects: u64,
    pub last_error: Option<String>,
    pub stats: SessionStatsView,
}

/// Serializable copy of [`SessionStats`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SessionStatsView {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sync_messages_sent: u64,
    pub sync_messages_received: u64,
    pub changes_applied: u64,
    pub refused: u64,
    pub limit_errors: u64,
}

impl From<SessionStats> for SessionStatsView {
    fn from(s: SessionStats) -> Self {
        SessionStatsView {
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            sync_messages_sent: s.sync_messages_sent,
            sync_messages_received: s.sync_messages_received,
            changes_applied: s.changes_applied,
            refused: s.refused,
            limit_errors: s.limit_errors,
        }
    }
}

/// Something that happened on a connection.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    Connected(EndpointKey),
    Disconnected {
        peer: EndpointKey,
        reason: String,
    },
    /// A connection attempt from a key the directory refuses.
    Refused {
        peer: EndpointKey,
        reason: String,
    },
    Session {
        peer: EndpointKey,
        event: Event,
    },
}

struct Shared {
    store: Arc<DocStore>,
    authz: Arc<Authz>,
    directory: Arc<dyn Directory>,
    cfg: DriverConfig,
    status: Mutex<BTreeMap<EndpointKey, PeerStatus>>,
    conns: Mutex<BTreeMap<EndpointKey, Vec<Connection>>>,
    events: broadcast::Sender<NodeEvent>,
    shutdown: tokio_util_shutdown::Shutdown,
}

/// A tiny cancellation token (a watch channel), so we need no extra crate.
mod tokio_util_shutdown {
    use tokio::sync::watch;

    #[derive(Clone)]
    pub(crate) struct Shutdown(watch::Sender<bool>);

    impl Shutdown {
        pub(crate) fn new() -> Shutdown {
            Shutdown(watch::channel(false).0)
        }
        pub(crate) fn trigger(&self) {
            let _ = self.0.send(true);
        }
        pub(crate) async fn wait(&self) {
            let mut rx = self.0.subscribe();
            let _ = rx.wait_for(|v| *v).await;
        }
        pub(crate) fn is_triggered(&self) -> bool {
            *self.0.borrow()
        }
    }
}

impl Shared {
    fn set_status(&self, peer: EndpointKey, f: impl FnOnce(&mut PeerStatus)) {
        if let Ok(mut g) = self.status.lock() {
            f(g.entry(peer).or_default());
        }
    }

    fn emit(&self, e: NodeEvent) {
        let _ = self.events.send(e);
    }

    /// Who `key` is, and whether it may connect at all.
    fn admit(&self, key: &EndpointKey) -> Result<PeerInfo, String> {
        let info = self
            .directory
            .lookup(key)
            .ok_or_else(|| "unknown or revoked endpoint".to_string())?;
        self.authz.may_connect(&info)?;
        Ok(info)
    }
}

#[derive(Debug, Clone)]
struct Handler(Arc<SharedRef>);

struct SharedRef(Arc<Shared>);

impl std::fmt::Debug for SharedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fieldsync-handler")
    }
}

impl ProtocolHandler for Handler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let shared = self.0.0.clone();
        let peer = from_iroh(&conn.remote_id());
        let info = match shared.admit(&peer) {
            Ok(i) => i,
            Err(reason) => {
                tracing::warn!(peer = %peer.short(), %reason, "refused connection");
                conn.close(VarInt::from_u32(CLOSE_UNAUTHORISED), reason.as_bytes());
                shared.emit(NodeEvent::Refused { peer, reason });
                return Ok(());
            }
        };
        let accept = async {
            let (s1, mut r1) = conn.accept_bi().await?;
            let (s2, mut r2) = conn.accept_bi().await?;
            let t1 = read_tag(&mut r1).await?;
            let t2 = read_tag(&mut r2).await?;
            Ok::<_, anyhow_lite::Error>(if t1 == 0 && t2 == 1 {
                ((s1, r1), (s2, r2))
            } else if t1 == 1 && t2 == 0 {
                ((s2, r2), (s1, r1))
            } else {
                return Err(anyhow_lite::Error(format!("bad stream tags {t1}, {t2}")));
            })
        };
        match tokio::time::timeout(shared.cfg.connect_timeout, accept).await {
            Ok(Ok((cmd, tel))) => run_connection(shared, conn, info, cmd, tel).await,
            Ok(Err(e)) => {
                conn.close(VarInt::from_u32(CLOSE_PROTOCOL), e.0.as_bytes());
            }
            Err(_) => conn.close(
                VarInt::from_u32(CLOSE_PROTOCOL),
                b"streams not opened in time",
            ),
        }
        Ok(())
    }
}

/// Minimal string error for the stream set-up steps.
mod anyhow_lite {
    #[derive(Debug)]
    pub(crate) struct Error(pub(crate) String);

    impl<E: std::fmt::Display> From<E> for Error {
        fn from(e: E) -> Self {
            Error(e.to_string())
        }
    }
}

async fn read_tag(r: &mut RecvStream) -> Result<u8, anyhow_lite::Error> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).await?;
    Ok(b[0])
}

enum Input {
    Data(Plane, Vec<u8>),
    Closed(String),
}

/// Run one session over an established connection until it ends.
async fn run_connection(
    shared: Arc<Shared>,
    conn: Connection,
    peer: PeerInfo,
    cmd: (SendStream, RecvStream),
    tel: (SendStream, RecvStream),
) {
    let key = peer.key;
    if let Ok(mut g) = shared.conns.lock() {
        g.entry(key).or_default().push(conn.clone());
    }
    shared.set_status(key, |s| {
        s.connected = true;
        s.connects += 1;
    });
    shared.emit(NodeEvent::Connected(key));
    tracing::info!(peer = %key.short(), role = %peer.role, "connected");

    let (in_tx, mut in_rx) = mpsc::channel::<Input>(64);
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    let mut out_txs = Vec::new();
    for (plane, (mut send, mut recv)) in [(Plane::Command, cmd), (Plane::Telemetry, tel)] {
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        out_txs.push(out_tx);
        writers.push(tokio::spawn(async move {
            while let Some(bytes) = out_rx.recv().await {
                if send.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        }));
        let tx = in_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        if tx
                            .send(Input::Data(plane, buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(Input::Closed("peer finished its stream".into()))
                            .await;
                        break;
                    }
                    Err(e) => {
                        let _ = tx.send(Input::Closed(format!("read: {e}"))).await;
                        break;
                    }
                }
            }
        }));
    }
    drop(in_tx);

    let mut changes = shared.store.subscribe();
    let mut session = Session::new(
        shared.cfg.session.clone(),
        shared.authz.clone(),
        shared.directory.clone(),
        peer.clone(),
        &shared.store,
        Instant::now().into_std(),
    );
    // Re-check admission every second: a peer revoked in the directory (for
    // an edge: the hub-signed registry it holds) is cut off mid-session too.
    let mut admission = tokio::time::interval(Duration::from_secs(1));
    admission.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason: String = loop {
        // Send everything the session has.
        let now = Instant::now().into_std();
        let mut fatal = None;
        loop {
            match session.poll_transmit(&shared.store, now) {
                Ok(Some(t)) => {
                    let _ = out_txs[t.plane as usize].send(t.bytes);
                }
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(e.to_string());
                    break;
                }
            }
        }
        while let Some(ev) = session.poll_event() {
            if ev == Event::InSync {
                shared.set_status(key, |s| s.last_sync = Some(Instant::now()));
            }
            shared.emit(NodeEvent::Session {
                peer: key,
                event: ev,
            });
        }
        let docs_behind = session.docs_behind(&shared.store);
        let queued = session.bytes_queued();
        let stats = session.stats();
        shared.set_status(key, |s| {
            s.docs_behind = docs_behind;
            s.bytes_queued = queued;
            s.stats = stats.into();
        });
        if let Some(f) = fatal {
            break f;
        }
        let wake = session.poll_timeout().map(Instant::from_std);
        tokio::select! {
            input = in_rx.recv() => match input {
                Some(Input::Data(plane, bytes)) => {
                    if let Err(e) = session.handle_data(plane, &bytes, &shared.store, Instant::now().into_std()) {
                        // Let the error frame the session queued go out first.
                        while let Ok(Some(t)) = session.poll_transmit(&shared.store, Instant::now().into_std()) {
                            let _ = out_txs[t.plane as usize].send(t.bytes);
                        }
                        break format!("protocol error: {e}");
                    }
                }
                Some(Input::Closed(r)) => break r,
                None => break "streams closed".into(),
            },
            c = changes.recv() => match c {
                Ok(changed) => session.handle_local_change(&changed.id, Instant::now().into_std()),
                Err(broadcast::error::RecvError::Lagged(_)) => session.handle_resync(&shared.store),
                Err(broadcast::error::RecvError::Closed) => break "store closed".into(),
            },
            () = async { match wake { Some(w) => tokio::time::sleep_until(w).await, None => std::future::pending().await } } => {}
            reason = conn.closed() => break format!("connection closed: {reason}"),
            () = shared.shutdown.wait() => break "shutting down".into(),
            _ = admission.tick() => {
                if let Err(why) = shared.admit(&key) {
                    conn.close(VarInt::from_u32(CLOSE_REVOKED), why.as_bytes());
                    break format!("peer no longer admitted: {why}");
                }
            }
        }
    };
    tracing::info!(peer = %key.short(), %reason, "disconnected");
    if reason.starts_with("protocol error") {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), reason.as_bytes());
    }
    drop(out_txs);
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
    }
    for r in readers {
        r.abort();
    }
    if let Ok(mut g) = shared.conns.lock()
        && let Some(v) = g.get_mut(&key)
    {
        v.retain(|c| c.stable_id() != conn.stable_id());
    }
    let still = shared
        .conns
        .lock()
        .map(|g| g.get(&key).is_some_and(|v| !v.is_empty()))
        .unwrap_or(false);
    shared.set_status(key, |s| {
        s.connected = still;
        s.last_error = Some(reason.clone());
    });
    shared.emit(NodeEvent::Disconnected { peer: key, reason });
}

/// A running sync node: endpoint, router, flusher, dialers.
pub struct SyncNode {
    router: Router,
    shared: Arc<Shared>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl SyncNode {
    /// Bind the endpoint and start accepting `fieldsync/1`.
    pub async fn spawn(
        key: &NodeKey,
        store: Arc<DocStore>,
        authz: Arc<Authz>,
        directory: Arc<dyn Directory>,
        cfg: DriverConfig,
    ) -> Result<SyncNode, DriverError> {
        Self::spawn_with(key, store, authz, directory, cfg, &[], |b| b).await
    }

    /// Like [`Self::spawn`], with more protocols on the same endpoint (the
    /// hub's enrolment protocol): `extra_alpns` are advertised and `extra`
    /// registers their handlers on the router.
    pub async fn spawn_with(
        key: &NodeKey,
        store: Arc<DocStore>,
        authz: Arc<Authz>,
        directory: Arc<dyn Directory>,
        cfg: DriverConfig,
        extra_alpns: &[&[u8]],
        extra: impl FnOnce(RouterBuilder) -> RouterBuilder,
    ) -> Result<SyncNode, DriverError> {
        let mut alpns = vec![ALPN.to_vec()];
        alpns.extend(extra_alpns.iter().map(|a| a.to_vec()));
        let bind_err = |reason: String| DriverError::Bind {
            addr: cfg.bind,
            reason,
        };
        let endpoint = iroh::Endpoint::builder(presets::Minimal)
            .secret_key(key.iroh_secret().clone())
            .alpns(alpns)
            .clear_ip_transports()
            .bind_addr(cfg.bind)
            .map_err(|e| bind_err(e.to_string()))?
            .portmapper_config(PortmapperConfig::Disabled)
            .bind()
            .await
            .map_err(|e| bind_err(e.to_string()))?;
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            store,
            authz,
            directory,
            cfg,
            status: Mutex::new(BTreeMap::new()),
            conns: Mutex::new(BTreeMap::new()),
            events,
            shutdown: tokio_util_shutdown::Shutdown::new(),
        });
        let router = extra(
            Router::builder(endpoint).accept(ALPN, Handler(Arc::new(SharedRef(shared.clone())))),
        )
        .spawn();
        let flusher = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(shared.cfg.flush_every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = shared.shutdown.wait() => break,
                    }
                    let store = shared.store.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.flush()).await {
                        tracing::error!(error = %e, "flushing the document store failed");
                    }
                }
            })
        };
        Ok(SyncNode {
            router,
            shared,
            tasks: Mutex::new(vec![flusher]),
        })
    }

    pub fn endpoint_id(&self) -> EndpointKey {
        from_iroh(&self.router.endpoint().id())
    }

    /// The UDP addresses the endpoint is bound to.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.router.endpoint().bound_sockets()
    }

    /// The iroh endpoint (to dial other protocols, e.g. enrolment).
    pub fn endpoint(&self) -> &iroh::Endpoint {
        self.router.endpoint()
    }

    pub fn store(&self) -> &Arc<DocStore> {
        &self.shared.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    pub fn status(&self) -> BTreeMap<EndpointKey, PeerStatus> {
        self.shared
            .status
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    /// Keep a connection to `peer` at `addr` open: dial, run the session,
    /// and on any loss redial with jittered exponential backoff, until
    /// shutdown.
    pub fn dial(&self, peer: EndpointKey, addr: SocketAddr) -> Result<(), DriverError> {
        let id = to_iroh(&peer).ok_or_else(|| DriverError::BadPeerKey(peer.to_string()))?;
        let shared = self.shared.clone();
        let endpoint = self.router.endpoint().clone();
        let task = tokio::spawn(async move {
            let mut backoff = shared.cfg.backoff_min;
            while !shared.shutdown.is_triggered() {
                let info = match shared.admit(&peer) {
                    Ok(i) => Some(i),
                    Err(reason) => {
                        shared.set_status(peer, |s| {
                            s.last_error = Some(format!("not dialing: {reason}"))
                        });
                        None
                    }
                };
                if let Some(info) = info {
                    let addr_full = iroh::EndpointAddr::new(id).with_ip_addr(addr);
                    let attempt = tokio::time::timeout(shared.cfg.connect_timeout, async {
                        let conn = endpoint
                            .connect(addr_full, ALPN)
                            .await
                            .map_err(|e| e.to_string())?;
                        let (mut s1, r1) = conn.open_bi().await.map_err(|e| e.to_string())?;
                        s1.write_all(&[0]).await.map_err(|e| e.to_string())?;
                        let (mut s2, r2) = conn.open_bi().await.map_err(|e| e.to_string())?;
                        s2.write_all(&[1]).await.map_err(|e| e.to_string())?;
                        Ok::<_, String>((conn, (s1, r1), (s2, r2)))
                    })
                    .await;
                    match attempt {
                        Ok(Ok((conn, cmd, tel))) => {
                            let started = Instant::now();
                            run_connection(shared.clone(), conn, info, cmd, tel).await;
                            if started.elapsed() > shared.cfg.backoff_max {
                                backoff = shared.cfg.backoff_min;
                            }
                        }
                        Ok(Err(e)) => shared.set_status(peer, |s| {
                            s.last_error = Some(format!("connect {addr}: {e}"))
                        }),
                        Err(_) => shared.set_status(peer, |s| {
                            s.last_error = Some(format!("connect {addr}: timed out"))
                        }),
                    }
                }
                // Jitter: 50%..100% of the backoff.
                let jitter = 0.5 + rand::random::<f64>() * 0.5;
                let wait = backoff.mul_f64(jitter);
                backoff = (backoff * 2).min(shared.cfg.backoff_max);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shared.shutdown.wait() => break,
                }
            }
        });
        if let Ok(mut g) = self.tasks.lock() {
            g.push(task);
        }
        Ok(())
    }

    /// Close every live connection with `peer` (after a revocation).
    pub fn disconnect(&self, peer: &EndpointKey, reason: &str) -> usize {
        let conns = self
            .shared
            .conns
            .lock()
            .map(|mut g| g.remove(peer).unwrap_or_default())
            .unwrap_or_default();
        for c in &conns {
            c.close(VarInt::from_u32(CLOSE_REVOKED), reason.as_bytes());
        }
        conns.len()
    }

    /// Stop dialing, close connections, flush the store, close the endpoint.
    pub async fn shutdown(self) {
        self.shared.shutdown.trigger();
        let conns: Vec<Connection> = self
            .shared
            .conns
            .lock()
            .map(|g| g.values().flatten().cloned().collect())
            .unwrap_or_default();
        for c in conns {
            c.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        }
        let tasks = self
            .tasks
            .lock()
            .map(|mut g| std::mem::take(&mut *g))
            .unwrap_or_default();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        let _ = self.router.shutdown().await;
        if let Err(e) = self.shared.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}
