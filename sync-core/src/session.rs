//! The sans-IO sync session: one per connected peer.
//!
//! It performs no IO, reads no clock and spawns nothing: bytes and local
//! events go in through `handle_*`, bytes, wake-up times and events come out
//! through `poll_*` (the vocabulary of quinn-proto). A driver moves the
//! bytes: [`crate::driver`] over iroh QUIC, the simulator in
//! [`crate::test_utils`] through a seeded fake network.
//!
//! Protocol:
//! 1. Both ends send `Hello` and a `Summary` of the documents in the
//!    connection's scope (count and a digest over every id and heads).
//! 2. Equal summaries: nothing to do (an unchanged fleet reconnects for a few
//!    dozen bytes). Otherwise both send their full manifest (prefix-compressed
//!    ids with a 12-byte heads digest) and every document that differs, or
//!    that one end lacks, runs the Automerge sync protocol, resuming from the
//!    sync state persisted with that peer.
//! 3. Afterwards local changes are pushed live: command-plane documents at
//!    once, telemetry batched by `batch_delay`.
//!
//! Limits (frame size, documents, rounds without progress, bytes per second)
//! are each answered with an `Error` frame, an [`Event`] and no panic.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync;
use schemas::ids::DocId;

use crate::authz::{Authz, Directory, PeerInfo};
use crate::protocol::{
    DIGEST_LEN, ErrorCode, Frame, FrameError, FrameReader, ManifestEntry, Plane, VERSION,
};
use crate::store::{DocStore, StoreError};

/// Session limits and tuning.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest frame accepted (and announced in `Hello`).
    pub max_frame: usize,
    /// Most documents a peer's manifest may list.
    pub max_docs: usize,
    /// Most sync messages sent for one document without either side's heads
    /// moving; past it the document is dropped from this session.
    pub max_rounds: u32,
    /// Outgoing bytes per second to this peer.
    pub bytes_per_sec: u64,
    /// Delay before a local telemetry change is pushed, to batch changes.
    pub batch_delay: Duration,
    /// Manifest entries per frame.
    pub manifest_chunk: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_frame: 16 << 20,
            max_docs: 200_000,
            max_rounds: 64,
            bytes_per_sec: 64 << 20,
            batch_delay: Duration::from_millis(20),
            manifest_chunk: 1000,
        }
    }
}

/// Something the application or its metrics should know.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Every document that differed at connect time is now in sync.
    InSync,
    /// Remote changes were applied to this document.
    DocApplied(DocId),
    /// The peer sent something it may not; it was not applied.
    Refused { doc: Option<DocId>, reason: String },
    /// A limit was hit (ours or the peer's word).
    Limit {
        code: ErrorCode,
        doc: Option<DocId>,
        message: String,
    },
    /// The peer reported an error.
    PeerError {
        code: u16,
        doc: Option<DocId>,
        message: String,
    },
}

/// Bytes to send on a plane's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub plane: Plane,
    pub bytes: Vec<u8>,
}

/// Why the session must end. The driver closes the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("peer speaks protocol version {0}, this node speaks {VERSION}")]
    Version(u8),
    #[error("local store failed: {0}")]
    Store(StoreError),
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub sync_messages_sent: u64,
    pub sync_messages_received: u64,
    pub changes_applied: u64,
    pub refused: u64,
    pub limit_errors: u64,
}

#[derive(Debug)]
struct DocSync {
    state: sync::State,
    rounds: u32,
    disabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the peer's summary.
    Handshake,
    /// Summaries differed; waiting for the rest of the peer's manifest.
    Manifest,
    /// Initial differences are being synced (or are done).
    Live,
}

struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }
    fn ready_at(&self) -> Option<Instant> {
        (self.tokens <= 0.0)
            .then(|| self.last + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

/// One sync session with one peer.
pub struct Session {
    cfg: SessionConfig,
    authz: Arc<Authz>,
    directory: Arc<dyn Directory>,
    peer: PeerInfo,
    readers: [FrameReader; 2],
    peer_max_frame: usize,
    phase: Phase,
    my_summary: (u32, [u8; 16]),
    their_manifest: Vec<ManifestEntry>,
    docs: HashMap<DocId, DocSync>,
    /// Documents with something to send, and when.
    dirty: BTreeMap<DocId, Instant>,
    /// Documents that differed at connect time and are not in sync yet.
    initial: Option<HashSet<DocId>>,
    out: [VecDeque<Vec<u8>>; 2],
    events: VecDeque<Event>,
    bucket: TokenBucket,
    stats: SessionStats,
}

fn summary_of(entries: &[(DocId, [u8; 32])]) -> (u32, [u8; 16]) {
    let mut h = blake3::Hasher::new();
    for (id, digest) in entries {
        h.update(id.to_string().as_bytes());
        h.update(&[0]);
        h.update(&digest[..DIGEST_LEN]);
    }
    let mut root = [0u8; 16];
    root.copy_from_slice(&h.finalize().as_bytes()[..16]);
    (entries.len() as u32, root)
}

fn short(d: &[u8; 32]) -> [u8; DIGEST_LEN] {
    let mut s = [0u8; DIGEST_LEN];
    s.copy_from_slice(&d[..DIGEST_LEN]);
    s
}

impl Session {
    /// Start a session with `peer` (already authenticated and allowed to
    /// connect). Queues `Hello` and the scope summary.
    pub fn new(
        cfg: SessionConfig,
        authz: Arc<Authz>,
        directory: Arc<dyn Directory>,
        peer: PeerInfo,
        store: &DocStore,
        now: Instant,
    ) -> Session {
        let rate = cfg.bytes_per_sec.max(1) as f64;
        let burst = rate.max(cfg.max_frame as f64);
        let mut s = Session {
            readers: [
                FrameReader::new(cfg.max_frame),
                FrameReader::new(cfg.max_frame),
            ],
            peer_max_frame: cfg.max_frame,
            bucket: TokenBucket {
                rate,
                burst,
                tokens: burst,
                last: now,
            },
            cfg,
            authz,
            directory,
            peer,
            phase: Phase::Handshake,
            my_summary: (0, [0; 16]),
            their_manifest: Vec::new(),
            docs: HashMap::new(),
            dirty: BTreeMap::new(),
            initial: None,
            out: [VecDeque::new(), VecDeque::new()],
            events: VecDeque::new(),
            stats: SessionStats::default(),
        };
        s.queue(
            Plane::Command,
            Frame::Hello {
                version: VERSION,
                max_frame: s.cfg.max_frame as u32,
            },
        );
        let manifest = s.scope_manifest(store);
        s.my_summary = summary_of(&manifest);
        let (count, root) = s.my_summary;
        s.queue(Plane::Command, Frame::Summary { count, root });
        s
    }

    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Documents known to differ from the peer (queued or mid-sync).
    pub fn docs_behind(&self, store: &DocStore) -> usize {
        let mut behind: HashSet<&DocId> = self.dirty.keys().collect();
        for (id, d) in &self.docs {
            if d.disabled {
                continue;
            }
            if d.state.their_heads.as_ref() != store.heads(id).as_ref() {
                behind.insert(id);
            }
        }
        if let Some(init) = &self.initial {
            behind.extend(init.iter());
        }
        behind.len()
    }

    /// Bytes waiting in the outgoing queues.
    pub fn bytes_queued(&self) -> usize {
        self.out.iter().flat_map(|q| q.iter()).map(Vec::len).sum()
    }

    /// Whether the connect-time differences are all resolved.
    pub fn is_in_sync(&self) -> bool {
        self.phase == Phase::Live && self.initial.as_ref().is_none_or(HashSet::is_empty)
    }

    fn scope_manifest(&self, store: &DocStore) -> Vec<(DocId, [u8; 32])> {
        let authz = self.authz.clone();
        let peer = self.peer.clone();
        store.manifest(&move |id| authz.in_scope(&peer, id))
    }

    fn queue(&mut self, plane: Plane, f: Frame) {
        self.out[plane as usize].push_back(f.encode());
    }

    fn error(&mut self, code: ErrorCode, doc: Option<DocId>, message: String) {
        self.stats.limit_errors += u64::from(code != ErrorCode::NotAuthorised);
        let plane = doc.as_ref().map_or(Plane::Command, Plane::of);
        self.queue(
            plane,
            Frame::Error {
                code: code as u16,
                doc: doc.clone(),
                message: message.clone(),
            },
        );
        if code == ErrorCode::NotAuthorised || code == ErrorCode::Refused {
            self.stats.refused += 1;
            self.events.push_back(Event::Refused {
                doc,
                reason: message,
            });
        } else {
            self.events.push_back(Event::Limit { code, doc, message });
        }
    }

    /// A document changed locally (or through another peer).
    pub fn handle_local_change(&mut self, id: &DocId, now: Instant) {
        if !self.authz.in_scope(&self.peer, id) {
            return;
        }
        if let Some(d) = self.docs.get_mut(id) {
            if d.disabled {
                return;
            }
            d.rounds = 0;
        }
        let due = match Plane::of(id) {
            Plane::Command => now,
            Plane::Telemetry => now + self.cfg.batch_delay,
        };
        let e = self.dirty.entry(id.clone()).or_insert(due);
        *e = (*e).min(due);
    }

    /// Every document may have changed (a lagged change feed): re-run the
    /// summary exchange.
    pub fn handle_resync(&mut self, store: &DocStore) {
        let manifest = self.scope_manifest(store);
        self.my_summary = summary_of(&manifest);
        let (count, root) = self.my_summary;
        self.phase = Phase::Handshake;
        self.queue(Plane::Command, Frame::Summary { count, root });
    }

    /// Bytes arrived on a plane's stream.
    pub fn handle_data(
        &mut self,
        plane: Plane,
        bytes: &[u8],
        store: &DocStore,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.stats.bytes_received += bytes.len() as u64;
        self.readers[plane as usize].push(bytes);
        loop {
            let frame = match self.readers[plane as usize].next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::Malformed,
                    };
                    self.error(code, None, e.to_string());
                    return Err(e.into());
                }
            };
            self.stats.frames_received += 1;
            self.handle_frame(frame, store, now)?;
        }
    }

    fn handle_frame(
        &mut self,
        frame: Frame,
        store: &DocStore,
        now: Instant,
    ) -> Result<(), SessionError> {
        match frame {
            Frame::Hello { version, max_frame } => {
                if version != VERSION {
                    self.error(
                        ErrorCode::Version,
                        None,
                        format!("version {version} not supported, expected {VERSION}"),
                    );
                    return Err(SessionError::Version(version));
                }
                self.peer_max_frame = (max_frame as usize).min(self.cfg.max_frame);
            }
            Frame::Summary { count, root } => {
                if (count, root) == self.my_summary {
                    self.phase = Phase::Live;
                    self.initial = Some(HashSet::new());
                    self.events.push_back(Event::InSync);
                } else {
                    self.phase = Phase::Manifest;
                    self.their_manifest.clear();
                    let manifest = self.scope_manifest(store);
                    self.send_manifest(&manifest);
                }
            }
            Frame::Manifest { entries, last } => {
                if self.their_manifest.len() + entries.len() > self.cfg.max_docs {
                    self.error(
                        ErrorCode::TooManyDocuments,
                        None,
                        format!(
                            "manifest lists more than {} documents; the rest is ignored",
                            self.cfg.max_docs
                        ),
                    );
                } else {
                    self.their_manifest.extend(entries);
                }
                if last {
                    self.diff_manifests(store, now);
                }
            }
            Frame::Sync { doc, sigs, msg } => self.handle_sync(doc, &sigs, &msg, store, now)?,
            Frame::Error { code, doc, message } => {
                tracing::warn!(peer = %self.peer.key.short(), code, doc = ?doc.as_ref().map(|d| d.to_string()), %message, "peer reported an error");
                if let Some(d) = &doc
                    && let Some(s) = self.docs.get_mut(d)
                    && code == ErrorCode::NotAuthorised as u16
                {
                    s.disabled = true;
                }
                self.events
                    .push_back(Event::PeerError { code, doc, message });
            }
        }
        Ok(())
    }

    fn send_manifest(&mut self, manifest: &[(DocId, [u8; 32])]) {
        let chunk = self.cfg.manifest_chunk.max(1);
        let n = manifest.len();
        if n == 0 {
            self.queue(
                Plane::Command,
                Frame::Manifest {
                    entries: Vec::new(),
                    last: true,
                },
            );
            return;
        }
        for (i, part) in manifest.chunks(chunk).enumerate() {
            let entries = part
                .iter()
                .map(|(doc, d)| ManifestEntry {
                    doc: doc.clone(),
                    digest: short(d),
                })
                .collect();
            let last = (i + 1) * chunk >= n;
            self.queue(Plane::Command, Frame::Manifest { entries, last });
        }
    }

    fn diff_manifests(&mut self, store: &DocStore, now: Instant) {
        let mine: HashMap<DocId, [u8; DIGEST_LEN]> = self
            .scope_manifest(store)
            .into_iter()
            .map(|(id, d)| (id, short(&d)))
            .collect();
        let theirs = std::mem::take(&mut self.their_manifest);
        let mut differ: HashSet<DocId> = HashSet::new();
        let mut seen: HashSet<&DocId> = HashSet::new();
        let mut out_of_scope = 0usize;
        for e in &theirs {
            seen.insert(&e.doc);
            if !self.authz.in_scope(&self.peer, &e.doc) {
                out_of_scope += 1;
                continue;
            }
            if mine.get(&e.doc) != Some(&e.digest) {
                differ.insert(e.doc.clone());
            }
        }
        for id in mine.keys() {
            if !seen.contains(id) {
                differ.insert(id.clone());
            }
        }
        if out_of_scope > 0 {
            self.stats.refused += out_of_scope as u64;
            self.events.push_back(Event::Refused {
                doc: None,
                reason: format!(
                    "peer listed {out_of_scope} documents outside this connection's scope"
                ),
            });
        }
        for id in &differ {
            self.dirty.entry(id.clone()).or_insert(now);
        }
        self.phase = Phase::Live;
        self.initial = Some(differ);
        self.check_in_sync(store);
    }

    fn check_in_sync(&mut self, store: &DocStore) {
        let Some(init) = &mut self.initial else {
            return;
        };
        if init.is_empty() {
            return;
        }
        let docs = &self.docs;
        init.retain(|id| match docs.get(id) {
            Some(d) if d.disabled => false,
            Some(d) => {
                d.state.their_heads.as_ref() != store.heads(id).as_ref()
                    || d.state.their_heads.is_none()
            }
            None => true,
        });
        if init.is_empty() {
            self.events.push_back(Event::InSync);
        }
    }

    fn doc_sync<'a>(
        docs: &'a mut HashMap<DocId, DocSync>,
        store: &DocStore,
        peer: &PeerInfo,
        id: &DocId,
    ) -> &'a mut DocSync {
        docs.entry(id.clone()).or_insert_with(|| DocSync {
            state: store.sync_state(&peer.key, id),
            rounds: 0,
            disabled: false,
        })
    }

    fn handle_sync(
        &mut self,
        doc: DocId,
        sigs: &[[u8; 64]],
        msg: &[u8],
        store: &DocStore,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.stats.sync_messages_received += 1;
        if !self.authz.in_scope(&self.peer, &doc) {
            self.error(
                ErrorCode::NotAuthorised,
                Some(doc.clone()),
                format!("{doc} is outside this connection's scope"),
            );
            return Ok(());
        }
        let ds = Self::doc_sync(&mut self.docs, store, &self.peer, &doc);
        if ds.disabled {
            return Ok(());
        }
        let message = match sync::Message::decode(msg) {
            Ok(m) => m,
            Err(e) => {
                self.error(
                    ErrorCode::Malformed,
                    Some(doc),
                    format!("sync message does not decode: {e}"),
                );
                return Ok(());
            }
        };
        let authz = self.authz.clone();
        let directory = self.directory.clone();
        let peer = self.peer.clone();
        let guard = |c: &automerge::Change, sig: &[u8; 64]| {
            authz.check_change(&peer, &doc, c, sig, directory.as_ref())
        };
        match store.receive_sync_message(&doc, self.peer.key, &mut ds.state, message, sigs, &guard)
        {
            Ok(r) => {
                if r.applied {
                    ds.rounds = 0;
                    self.stats.changes_applied += r.changes as u64;
                    self.events.push_back(Event::DocApplied(doc.clone()));
                }
                self.dirty.entry(doc).or_insert(now);
            }
            Err(StoreError::Refused { id, hash, reason }) => {
                ds.disabled = true;
                tracing::warn!(peer = %self.peer.key.short(), doc = %id, %hash, %reason, "refused change");
                self.error(
                    ErrorCode::NotAuthorised,
                    Some(id),
                    format!("change {hash} refused: {reason}"),
                );
            }
            Err(StoreError::Sync { id, reason }) => {
                self.error(ErrorCode::Malformed, Some(id), reason);
            }
            Err(e) => {
                self.error(
                    ErrorCode::Internal,
                    Some(doc),
                    "receiver could not store the changes".into(),
                );
                return Err(SessionError::Store(e));
            }
        }
        self.check_in_sync(store);
        Ok(())
    }

    /// Generate the next sync message for `id`, if it has one.
    fn generate(&mut self, id: &DocId, store: &DocStore) -> Result<Option<Vec<u8>>, SessionError> {
        let max_rounds = self.cfg.max_rounds;
        let ds = Self::doc_sync(&mut self.docs, store, &self.peer, id);
        if ds.disabled {
            return Ok(None);
        }
        let msg = store
            .generate_sync_message(id, &mut ds.state)
            .map_err(SessionError::Store)?;
        let Some(msg) = msg else { return Ok(None) };
        ds.rounds += 1;
        if ds.rounds > max_rounds {
            ds.disabled = true;
            self.error(
                ErrorCode::TooManyRounds,
                Some(id.clone()),
                format!("{id}: more than {max_rounds} sync rounds without progress; dropped from this session"),
            );
            return Ok(None);
        }
        let hashes: Vec<_> = crate::store::message_changes(&msg)
            .map_err(|reason| {
                SessionError::Store(StoreError::Sync {
                    id: id.clone(),
                    reason,
                })
            })?
            .iter()
            .map(automerge::Change::hash)
            .collect();
        let sigs = store.signatures(&hashes).map_err(SessionError::Store)?;
        let frame = Frame::Sync {
            doc: id.clone(),
            sigs,
            msg: msg.encode(),
        }
        .encode();
        if frame.len() > self.peer_max_frame + 4 {
            let ds = Self::doc_sync(&mut self.docs, store, &self.peer, id);
            ds.disabled = true;
            self.error(
                ErrorCode::FrameTooLarge,
                Some(id.clone()),
                format!(
                    "{id}: sync message of {} bytes exceeds the peer's frame limit {}",
                    frame.len(),
                    self.peer_max_frame
                ),
            );
            return Ok(None);
        }
        self.stats.sync_messages_sent += 1;
        Ok(Some(frame))
    }

    /// The next bytes to send: command plane first, then telemetry; within
    /// the budget of bytes per second.
    pub fn poll_transmit(
        &mut self,
        store: &DocStore,
        now: Instant,
    ) -> Result<Option<Transmit>, SessionError> {
        self.bucket.refill(now);
        if self.bucket.tokens <= 0.0 {
            return Ok(None);
        }
        for plane in [Plane::Command, Plane::Telemetry] {
            if let Some(bytes) = self.out[plane as usize].pop_front() {
                return Ok(Some(self.sent(plane, bytes)));
            }
            // Dirty documents of this plane that are due.
            let due: Vec<DocId> = self
                .dirty
                .iter()
                .filter(|(id, at)| **at <= now && Plane::of(id) == plane)
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                self.dirty.remove(&id);
                if let Some(bytes) = self.generate(&id, store)? {
                    return Ok(Some(self.sent(plane, bytes)));
                }
                self.check_in_sync(store);
                // Errors queued by `generate` go out first.
                if let Some(bytes) = self.out[Plane::Command as usize].pop_front() {
                    return Ok(Some(self.sent(Plane::Command, bytes)));
                }
            }
        }
        Ok(None)
    }

    fn sent(&mut self, plane: Plane, bytes: Vec<u8>) -> Transmit {
        self.bucket.tokens -= bytes.len() as f64;
        self.stats.bytes_sent += bytes.len() as u64;
        self.stats.frames_sent += 1;
        Transmit { plane, bytes }
    }

    /// When the session next needs `poll_transmit` called, if not before
    /// new input arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let has_queued = self.out.iter().any(|q| !q.is_empty());
        let next_dirty = self.dirty.values().min().copied();
        let work = if has_queued {
            Some(self.bucket.last)
        } else {
            next_dirty
        };
        match (work, self.bucket.ready_at()) {
            (Some(w), Some(r)) => Some(w.max(r)),
            (w, _) => w,
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::StaticDirectory;
    use crate::docs::device;
    use crate::identity::NodeKey;
    use schemas::device::FieldValue;
    use schemas::ids::Role;
    use schemas::time::Timestamp;

    fn stores() -> (DocStore, DocStore) {
        (
            DocStore::in_memory(NodeKey::from_bytes([1; 32])),
            DocStore::in_memory(NodeKey::from_bytes([2; 32])),
        )
    }

    fn pair() -> (Arc<Authz>, Arc<Authz>, Arc<dyn Directory>) {
        let hub = PeerInfo {
            key: NodeKey::from_bytes([1; 32]).public(),
            role: Role::Hub,
            tenant: None,
            site: None,
        };
        let edge = PeerInfo {
            key: NodeKey::from_bytes([2; 32]).public(),
            role: Role::Edge,
            tenant: "acme".parse().ok(),
            site: "s1".parse().ok(),
        };
        let mut dir = StaticDirectory::default();
        dir.insert(hub.clone());
        dir.insert(edge.clone());
        (
            Arc::new(Authz::new(hub, None)),
            Arc::new(Authz::new(edge, None)),
            Arc::new(dir),
        )
    }

    /// Pump two sessions until neither sends anything. Returns frames moved.
    fn pump(a: &mut Session, sa: &DocStore, b: &mut Session, sb: &DocStore, now: Instant) -> usize {
        let mut moved = 0;
        for _ in 0..1000 {
            let mut any = false;
            while let Some(t) = a.poll_transmit(sa, now).unwrap() {
                b.handle_data(t.plane, &t.bytes, sb, now).unwrap();
                any = true;
                moved += 1;
            }
            while let Some(t) = b.poll_transmit(sb, now).unwrap() {
                a.handle_data(t.plane, &t.bytes, sa, now).unwrap();
                any = true;
                moved += 1;
            }
            if !any {
                return moved;
            }
        }
        panic!("sessions never went quiet");
    }

    #[test]
    fn live_change_reaches_peer() {
        let (ha, ea, dir) = pair();
        let (hs, es) = stores();
        let now = Instant::now();
        let mut h = Session::new(
            SessionConfig::default(),
            ha.clone(),
            dir.clone(),
            ea.local.clone(),
            &hs,
            now,
        );
        let mut e = Session::new(
            SessionConfig::default(),
            ea.clone(),
            dir.clone(),
            ha.local.clone(),
            &es,
            now,
        );
        pump(&mut h, &hs, &mut e, &es, now);
        assert!(h.is_in_sync() && e.is_in_sync());
        let id: DocId = "t/acme/s/s1/dev/p1".parse().unwrap();
        es.change(&id, Timestamp(1_800_000_000_000), |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(4.0))
        })
        .unwrap();
        e.handle_local_change(&id, now);
        let moved = pump(&mut h, &hs, &mut e, &es, now);
        assert!(moved > 0);
        assert_eq!(
            hs.heads(&id),
            es.heads(&id),
            "heads differ after {moved} frames"
        );
    }

    #[test]
    fn concurrent_edits_on_both_sides_converge() {
        let (ha, ea, dir) = pair();
        let (hs, es) = stores();
        let t0 = Instant::now();
        let mut h = Session::new(
            SessionConfig::default(),
            ha.clone(),
            dir.clone(),
            ea.local.clone(),
            &hs,
            t0,
        );
        let mut e = Session::new(
            SessionConfig::default(),
            ea.clone(),
            dir.clone(),
            ha.local.clone(),
            &es,
            t0,
        );
        let ids: Vec<DocId> = vec![
            "t/acme/s/s1/dev/p1".parse().unwrap(),
            "t/acme/s/s1/dev/p2".parse().unwrap(),
        ];
        for i in 0..40u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            let id = &ids[(i % 2) as usize];
            let (store, sess) = if i % 3 == 0 {
                (&hs, &mut h)
            } else {
                (&es, &mut e)
            };
            store
                .change(id, Timestamp(1_800_000_000_000), |d| {
                    device::set_desired(d, "setpoint", &FieldValue::Number(f64::from(i)))
                })
                .unwrap();
            sess.handle_local_change(id, now);
            if i % 4 == 0 {
                // Deliver only one frame each way sometimes: interleave.
                if let Some(t) = h.poll_transmit(&hs, now).unwrap() {
                    e.handle_data(t.plane, &t.bytes, &es, now).unwrap();
                }
                if let Some(t) = e.poll_transmit(&es, now).unwrap() {
                    h.handle_data(t.plane, &t.bytes, &hs, now).unwrap();
                }
            }
        }
        pump(&mut h, &hs, &mut e, &es, t0 + Duration::from_secs(10));
        let evs: Vec<Event> = std::iter::from_fn(|| h.poll_event())
            .chain(std::iter::from_fn(|| e.poll_event()))
            .filter(|e| !matches!(e, Event::DocApplied(_) | Event::InSync))
            .collect();
        assert!(evs.is_empty(), "{evs:?}");
        for id in &ids {
            let (mut a, mut b) = (hs.heads(id).unwrap(), es.heads(id).unwrap());
            a.sort();
            b.sort();
            assert_eq!(a, b, "{id}");
        }
    }

    fn limit_events(s: &mut Session) -> Vec<(ErrorCode, String)> {
        std::iter::from_fn(|| s.poll_event())
            .filter_map(|e| match e {
                Event::Limit { code, message, .. } => Some((code, message)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn oversized_frame_is_an_error_frame_and_ends_the_session() {
        let (ha, ea, dir) = pair();
        let (hs, _es) = stores();
        let now = Instant::now();
        let cfg = SessionConfig {
            max_frame: 1024,
            ..SessionConfig::default()
        };
        let mut h = Session::new(cfg, ha, dir, ea.local.clone(), &hs, now);
        let r = h.handle_data(Plane::Command, &[0, 1, 0, 0], &hs, now);
        assert!(
            matches!(
                r,
                Err(SessionError::Frame(FrameError::TooLarge {
                    len: 65536,
                    max: 1024
                }))
            ),
            "{r:?}"
        );
        let ev = limit_events(&mut h);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, ErrorCode::FrameTooLarge);
        // The error frame is queued for the peer.
        let mut frames = Vec::new();
        while let Some(t) = h.poll_transmit(&hs, now).unwrap() {
            frames.push(Frame::decode(&t.bytes[4..]).unwrap());
        }
        assert!(
            frames
                .iter()
                .any(|f| matches!(f, Frame::Error { code: 2, .. })),
            "{frames:?}"
        );
    }

    #[test]
    fn too_many_documents_in_a_manifest_is_refused() {
        let (ha, ea, dir) = pair();
        let (hs, _es) = stores();
        let now = Instant::now();
        let cfg = SessionConfig {
            max_docs: 3,
            ..SessionConfig::default()
        };
        let mut h = Session::new(cfg, ha, dir, ea.local.clone(), &hs, now);
        let entries = (0..5)
            .map(|i| ManifestEntry {
                doc: format!("t/acme/s/s1/dev/d{i}").parse().unwrap(),
                digest: [0; DIGEST_LEN],
            })
            .collect();
        let bytes = Frame::Manifest {
            entries,
            last: true,
        }
        .encode();
        h.handle_data(Plane::Command, &bytes, &hs, now).unwrap();
        let ev = limit_events(&mut h);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].0, ErrorCode::TooManyDocuments);
    }

    #[test]
    fn bytes_per_second_limit_defers_sending() {
        let (ha, ea, dir) = pair();
        let (hs, es) = stores();
        let t0 = Instant::now();
        let cfg = SessionConfig {
            bytes_per_sec: 1000,
            max_frame: 1000,
            ..SessionConfig::default()
        };
        let mut h = Session::new(cfg, ha, dir, ea.local.clone(), &hs, t0);
        let _ = &es;
        // Fill the queue with more than a second's worth of frames.
        for i in 0..20 {
            let id: DocId = format!("t/acme/s/s1/dev/d{i}").parse().unwrap();
            hs.change(&id, Timestamp(1_800_000_000_000), |d| {
                device::set_desired(d, "label", &FieldValue::Text("x".repeat(40)))
            })
            .unwrap();
            h.handle_local_change(&id, t0);
        }
        let mut sent = 0usize;
        while let Some(t) = h.poll_transmit(&hs, t0).unwrap() {
            sent += t.bytes.len();
        }
        assert!(
            sent <= 2000,
            "sent {sent} bytes at once with a 1000 B/s budget"
        );
        let wake = h
            .poll_timeout()
            .expect("throttled session must ask to be woken");
        assert!(wake > t0);
        let mut later = 0usize;
        while let Some(t) = h.poll_transmit(&hs, t0 + Duration::from_secs(30)).unwrap() {
            later += t.bytes.len();
        }
        assert!(later > 0, "nothing sent after the budget refilled");
    }
}
