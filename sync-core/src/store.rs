//! The document store: Automerge documents persisted as incremental change
//! chunks plus periodic snapshots, loaded lazily and evicted under a memory
//! budget, with per-peer sync states persisted beside them.
//!
//! Storage layout (trees of [`crate::storage::Storage`]):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `snap` | doc id | `save()` of the document at the last compaction |
//! | `chunk` | doc id, 0, seq (u64 BE) | `save_after(previous heads)`: changes since the previous chunk |
//! | `heads` | doc id | the document's heads (n x 32 bytes): the manifest reads these without loading documents |
//! | `sync` | peer key (32 bytes), doc id | `sync::State::encode()` |
//! | `sig` | change hash | the author's ed25519 signature of the change hash (see [`change_sign_payload`]) |
//!
//! Every change this store commits is signed with the node key; every
//! change it accepts from a peer carries its author's signature, which is
//! kept so the change can be relayed to others with its proof.
//!
//! A change is written as one atomic batch (chunk + heads). It is durable
//! ("acknowledged") once [`DocStore::flush`] returns.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::CommitOptions;
use automerge::{ActorId, AutoCommit, Change, ChangeHash};
use schemas::identity::EndpointKey;
use schemas::ids::{DocId, Lifetime};
use schemas::time::{MS_PER_DAY, Timestamp};
use tokio::sync::broadcast;

use crate::docs::{DocError, genesis};
use crate::identity::NodeKey;
use crate::storage::{Op, Storage, StorageError};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("document {id}: {source}")]
    Doc {
        id: DocId,
        #[source]
        source: DocError,
    },
    /// Stored bytes of a document did not load.
    #[error("document {id}: stored data is corrupt: {reason}")]
    Corrupt { id: DocId, reason: String },
    /// A day-bucket document is past its day plus grace: read-only.
    #[error("document {id} is sealed (its day ended more than {grace_ms} ms ago): read-only")]
    Sealed { id: DocId, grace_ms: i64 },
    /// Incoming changes were refused by the authorisation guard.
    #[error("document {id}: change {hash} refused: {reason}")]
    Refused {
        id: DocId,
        hash: String,
        reason: String,
    },
    /// A sync message did not apply.
    #[error("document {id}: sync message did not apply: {reason}")]
    Sync { id: DocId, reason: String },
}

/// Store tuning.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Approximate memory for loaded documents; least recently used are evicted past it.
    pub memory_budget_bytes: u64,
    /// A loaded document is estimated at this many times its stored size (measured ~80x).
    pub memory_factor: u64,
    /// Compact a document's chunks into a snapshot after this many chunks.
    pub compact_after_chunks: u32,
    /// Day-bucket documents are sealed this long after their day ends.
    pub seal_grace_ms: i64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            memory_budget_bytes: 256 << 20,
            memory_factor: 80,
            compact_after_chunks: 64,
            seal_grace_ms: 2 * MS_PER_DAY,
        }
    }
}

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Local,
    Peer(EndpointKey),
}

/// Notification that a document changed.
#[derive(Debug, Clone)]
pub struct Changed {
    pub id: DocId,
    pub origin: Origin,
}

/// Decides whether an incoming change (with its author's signature) may be applied.
pub type ChangeGuard<'a> = dyn Fn(&Change, &[u8; 64]) -> Result<(), String> + 'a;

/// What a received sync message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Received {
    /// The message brought changes that are now in the document.
    pub applied: bool,
    /// Number of new changes.
    pub changes: usize,
}

struct Entry {
    doc: AutoCommit,
    persisted_heads: Vec<ChangeHash>,
    next_chunk: u64,
    chunks: u32,
    stored_bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    loaded: HashMap<DocId, Entry>,
    /// Every document the store holds, with its heads.
    heads: BTreeMap<DocId, Vec<ChangeHash>>,
    tick: u64,
    loaded_bytes: u64,
}

/// Statistics for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    pub documents: usize,
    pub loaded: usize,
    pub loaded_bytes_estimate: u64,
}

/// The document store. Cheap to share (`Arc`); all methods take `&self`.
pub struct DocStore {
    storage: Arc<dyn Storage>,
    key: NodeKey,
    actor: ActorId,
    cfg: StoreConfig,
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Changed>,
}

fn id_key(id: &DocId) -> Vec<u8> {
    id.to_string().into_bytes()
}

fn chunk_prefix(id: &DocId) -> Vec<u8> {
    let mut k = id_key(id);
    k.push(0);
    k
}

fn chunk_key(id: &DocId, seq: u64) -> Vec<u8> {
    let mut k = chunk_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn sync_key(peer: &EndpointKey, id: &DocId) -> Vec<u8> {
    let mut k = peer.0.to_vec();
    k.extend_from_slice(&id_key(id));
    k
}

fn encode_heads(h: &[ChangeHash]) -> Vec<u8> {
    h.iter().flat_map(|c| c.0).collect()
}

fn decode_heads(b: &[u8]) -> Option<Vec<ChangeHash>> {
    if !b.len().is_multiple_of(32) {
        return None;
    }
    b.chunks(32)
        .map(|c| c.try_into().ok().map(ChangeHash))
        .collect()
}

/// The bytes a change's author signs: a domain tag and the change hash.
pub fn change_sign_payload(hash: &ChangeHash) -> Vec<u8> {
    let mut v = b"fieldsync/change/v1\0".to_vec();
    v.extend_from_slice(&hash.0);
    v
}

/// A signature slot for a change that needs none (genesis) or has none.
pub const NO_SIGNATURE: [u8; 64] = [0; 64];

/// A short digest of a set of heads (order-independent).
pub fn heads_digest(heads: &[ChangeHash]) -> [u8; 32] {
    let mut sorted = heads.to_vec();
    sorted.sort();
    let mut h = blake3::Hasher::new();
    for c in &sorted {
        h.update(&c.0);
    }
    *h.finalize().as_bytes()
}

impl DocStore {
    /// Open a store over `storage`, writing local changes as `actor` and
    /// signing them with `key` (the actor must belong to the key).
    pub fn open(
        storage: Arc<dyn Storage>,
        key: NodeKey,
        actor: ActorId,
        cfg: StoreConfig,
    ) -> Result<DocStore, StoreError> {
        let mut inner = Inner::default();
        for (k, v) in storage.scan_prefix("heads", b"")? {
            let Ok(text) = String::from_utf8(k) else {
                continue;
            };
            let Ok(id) = text.parse::<DocId>() else {
                tracing::warn!(key = %text, "ignoring stored document with an invalid id");
                continue;
            };
            match decode_heads(&v) {
                Some(h) => {
                    inner.heads.insert(id, h);
                }
                None => {
                    return Err(StoreError::Corrupt {
                        id,
                        reason: "heads record is not a multiple of 32 bytes".into(),
                    });
                }
            }
        }
        let (changes, _) = broadcast::channel(4096);
        Ok(DocStore {
            storage,
            key,
            actor,
            cfg,
            inner: Mutex::new(inner),
            changes,
        })
    }

    /// An in-memory store (tests, simulations), with a fresh actor of `key`.
    pub fn in_memory(key: NodeKey) -> DocStore {
        let (changes, _) = broadcast::channel(4096);
        DocStore {
            storage: Arc::new(crate::storage::MemStorage::new()),
            actor: key.new_actor(),
            key,
            cfg: StoreConfig::default(),
            inner: Mutex::new(Inner::default()),
            changes,
        }
    }

    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// The stored signature of each change (or [`NO_SIGNATURE`]).
    pub fn signatures(&self, hashes: &[ChangeHash]) -> Result<Vec<[u8; 64]>, StoreError> {
        hashes
            .iter()
            .map(|h| {
                Ok(self
                    .storage
                    .get("sig", &h.0)?
                    .and_then(|v| <[u8; 64]>::try_from(v.as_slice()).ok())
                    .unwrap_or(NO_SIGNATURE))
            })
            .collect()
    }

    /// Subscribe to change notifications. A lagged receiver must assume
    /// every document may have changed.
    pub fn subscribe(&self) -> broadcast::Receiver<Changed> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves documents consistent (all
        // writes go through `persist`), so recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a day-bucket document is sealed at `now`.
    pub fn is_sealed(&self, id: &DocId, now: Timestamp) -> bool {
        match (id.kind().lifetime(), id.day()) {
            (Lifetime::DayBucket, Some(day)) => {
                now.as_millis() > day.end().as_millis() + self.cfg.seal_grace_ms
            }
            _ => false,
        }
    }

    /// Ids of every document held.
    pub fn list(&self) -> Vec<DocId> {
        self.lock().heads.keys().cloned().collect()
    }

    /// Every document held that `filter` accepts, with its heads digest.
    pub fn manifest(&self, filter: &dyn Fn(&DocId) -> bool) -> Vec<(DocId, [u8; 32])> {
        self.lock()
            .heads
            .iter()
            .filter(|(id, _)| filter(id))
            .map(|(id, h)| (id.clone(), heads_digest(h)))
            .collect()
    }

    pub fn heads(&self, id: &DocId) -> Option<Vec<ChangeHash>> {
        self.lock().heads.get(id).cloned()
    }

    /// Every document's heads as sorted hex strings: the form replicas are
    /// compared in (edge and hub `sync/heads` endpoints, chaos runs).
    pub fn heads_hex(&self) -> Vec<(DocId, Vec<String>)> {
        self.lock()
            .heads
            .iter()
            .map(|(id, hs)| {
                let mut v: Vec<String> = hs.iter().map(|h| h.to_string()).collect();
                v.sort();
                (id.clone(), v)
            })
            .collect()
    }

    pub fn contains(&self, id: &DocId) -> bool {
        self.lock().heads.contains_key(id)
    }

    pub fn stats(&self) -> StoreStats {
        let g = self.lock();
        StoreStats {
            documents: g.heads.len(),
            loaded: g.loaded.len(),
            loaded_bytes_estimate: g.loaded_bytes,
        }
    }

    /// Load `id` into memory if it is stored; with `create`, start it from
    /// genesis if it is not.
    fn entry<'a>(
        &self,
        g: &'a mut Inner,
        id: &DocId,
        create: bool,
    ) -> Result<Option<&'a mut Entry>, StoreError> {
        g.tick += 1;
        let tick = g.tick;
        if !g.loaded.contains_key(id) {
            let stored = g.heads.contains_key(id);
            if !stored && !create {
                return Ok(None);
            }
            let entry = if stored {
                self.load(id)?
            } else {
                self.fresh(id)
            };
            g.loaded_bytes += entry.stored_bytes * self.cfg.memory_factor;
            g.loaded.insert(id.clone(), entry);
            self.evict(g, id);
        }
        let entry = g.loaded.get_mut(id);
        if let Some(e) = entry {
            e.last_used = tick;
            return Ok(Some(e));
        }
        Ok(None)
    }

    fn fresh(&self, id: &DocId) -> Entry {
        let doc = genesis(id);
        Entry {
            doc,
            persisted_heads: Vec::new(),
            next_chunk: 0,
            chunks: 0,
            stored_bytes: 0,
            last_used: 0,
        }
    }

    fn load(&self, id: &DocId) -> Result<Entry, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: id.clone(),
            reason,
        };
        let mut doc = match self.storage.get("snap", &id_key(id))? {
            Some(bytes) => {
                AutoCommit::load(&bytes).map_err(|e| corrupt(format!("snapshot: {e}")))?
            }
            None => genesis(id),
        };
        let mut stored_bytes = 0u64;
        let mut next_chunk = 0;
        let chunks = self.storage.scan_prefix("chunk", &chunk_prefix(id))?;
        for (k, v) in &chunks {
            doc.load_incremental(v)
                .map_err(|e| corrupt(format!("chunk: {e}")))?;
            stored_bytes += v.len() as u64;
            if let Some(seq) = k
                .len()
                .checked_sub(8)
                .and_then(|at| k[at..].try_into().ok())
                .map(u64::from_be_bytes)
            {
                next_chunk = next_chunk.max(seq + 1);
            }
        }
        let persisted_heads = doc.get_heads();
        Ok(Entry {
            doc,
            persisted_heads,
            next_chunk,
            chunks: chunks.len() as u32,
            stored_bytes,
            last_used: 0,
        })
    }

    fn evict(&self, g: &mut Inner, keep: &DocId) {
        while g.loaded_bytes > self.cfg.memory_budget_bytes && g.loaded.len() > 1 {
            let victim = g
                .loaded
                .iter()
                .filter(|(id, _)| *id != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| id.clone());
            let Some(victim) = victim else { break };
            if let Some(e) = g.loaded.remove(&victim) {
                g.loaded_bytes = g
                    .loaded_bytes
                    .saturating_sub(e.stored_bytes * self.cfg.memory_factor);
            }
        }
    }

    /// Persist whatever `id` has beyond its persisted heads, as one batch.
    fn persist(&self, g: &mut Inner, id: &DocId, extra: Vec<Op>) -> Result<bool, StoreError> {
        let factor = self.cfg.memory_factor;
        let compact_after = self.cfg.compact_after_chunks;
        let Some(e) = g.loaded.get_mut(id) else {
            return Ok(false);
        };
        let heads = e.doc.get_heads();
        if heads == e.persisted_heads && extra.is_empty() {
            return Ok(false);
        }
        let mut ops = extra;
        let mut grew = 0u64;
        let changed = heads != e.persisted_heads;
        if changed {
            if e.chunks + 1 >= compact_after {
                let snap = e.doc.save();
                grew = snap.len() as u64;
                for (k, _) in self.storage.scan_prefix("chunk", &chunk_prefix(id))? {
                    ops.push(Op::Delete {
                        tree: "chunk",
                        key: k,
                    });
                }
                ops.push(Op::Put {
                    tree: "snap",
                    key: id_key(id),
                    value: snap,
                });
                e.chunks = 0;
                e.stored_bytes = 0;
            } else {
                let chunk = e.doc.save_after(&e.persisted_heads);
                grew = chunk.len() as u64;
                ops.push(Op::Put {
                    tree: "chunk",
                    key: chunk_key(id, e.next_chunk),
                    value: chunk,
                });
                e.next_chunk += 1;
                e.chunks += 1;
            }
            ops.push(Op::Put {
                tree: "heads",
                key: id_key(id),
                value: encode_heads(&heads),
            });
        }
        self.storage.apply(ops)?;
        e.stored_bytes += grew;
        e.persisted_heads = heads.clone();
        g.loaded_bytes += grew * factor;
        if changed {
            g.heads.insert(id.clone(), heads);
        }
        Ok(changed)
    }

    /// Change document `id` (created from genesis if new) as this store's
    /// actor, at time `now`. The closure's writes are committed as one change
    /// and persisted; if it fails, nothing is written.
    pub fn change<R>(
        &self,
        id: &DocId,
        now: Timestamp,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, DocError>,
    ) -> Result<R, StoreError> {
        if self.is_sealed(id, now) {
            return Err(StoreError::Sealed {
                id: id.clone(),
                grace_ms: self.cfg.seal_grace_ms,
            });
        }
        let mut g = self.lock();
        let Some(e) = self.entry(&mut g, id, true)? else {
            unreachable!("create=true always yields an entry")
        };
        e.doc.set_actor(self.actor.clone());
        let out = match f(&mut e.doc) {
            Ok(v) => v,
            Err(source) => {
                e.doc.rollback();
                return Err(StoreError::Doc {
                    id: id.clone(),
                    source,
                });
            }
        };
        let hash = e
            .doc
            .commit_with(CommitOptions::default().with_time(now.as_millis() / 1000));
        let sig_ops = hash
            .map(|h| {
                vec![Op::Put {
                    tree: "sig",
                    key: h.0.to_vec(),
                    value: self.key.sign(&change_sign_payload(&h)).to_vec(),
                }]
            })
            .unwrap_or_default();
        let changed = match self.persist(&mut g, id, sig_ops) {
            Ok(c) => c,
            Err(err) => {
                // Not persisted: drop the in-memory copy so memory never
                // shows a change that storage does not have.
                if let Some(e) = g.loaded.remove(id) {
                    g.loaded_bytes = g
                        .loaded_bytes
                        .saturating_sub(e.stored_bytes * self.cfg.memory_factor);
                }
                return Err(err);
            }
        };
        drop(g);
        if changed {
            let _ = self.changes.send(Changed {
                id: id.clone(),
                origin: Origin::Local,
            });
        }
        Ok(out)
    }

    /// Read document `id`; `None` if the store does not hold it.
    pub fn read<R>(
        &self,
        id: &DocId,
        f: impl FnOnce(&AutoCommit) -> R,
    ) -> Result<Option<R>, StoreError> {
        let mut g = self.lock();
        Ok(self.entry(&mut g, id, false)?.map(|e| f(&e.doc)))
    }

    /// Make every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        Ok(self.storage.flush()?)
    }

    /// Produce the next sync message for `id` to a peer (from genesis if
    /// the document is new here).
    pub fn generate_sync_message(
        &self,
        id: &DocId,
        state: &mut sync::State,
    ) -> Result<Option<sync::Message>, StoreError> {
        let mut g = self.lock();
        let Some(e) = self.entry(&mut g, id, true)? else {
            return Ok(None);
        };
        Ok(e.doc.sync().generate_sync_message(state))
    }

    /// Apply a sync message from `peer`. `sigs` holds one signature per
    /// change of the message, in message order ([`message_changes`]). Every
    /// change this document does not have yet is shown to `guard` with its
    /// signature first; if the guard refuses any, nothing is applied.
    pub fn receive_sync_message(
        &self,
        id: &DocId,
        peer: EndpointKey,
        state: &mut sync::State,
        msg: sync::Message,
        sigs: &[[u8; 64]],
        guard: &ChangeGuard<'_>,
    ) -> Result<Received, StoreError> {
        let mut g = self.lock();
        let Some(e) = self.entry(&mut g, id, true)? else {
            return Ok(Received::default());
        };
        let mut new_changes = 0;
        let changes = message_changes(&msg).map_err(|reason| StoreError::Sync {
            id: id.clone(),
            reason,
        })?;
        if changes.len() != sigs.len() {
            return Err(StoreError::Sync {
                id: id.clone(),
                reason: format!("{} changes but {} signatures", changes.len(), sigs.len()),
            });
        }
        let mut sig_ops = Vec::new();
        for (change, sig) in changes.iter().zip(sigs) {
            if e.doc.get_change_by_hash(&change.hash()).is_some() {
                continue;
            }
            new_changes += 1;
            if let Err(reason) = guard(change, sig) {
                return Err(StoreError::Refused {
                    id: id.clone(),
                    hash: change.hash().to_string(),
                    reason,
                });
            }
            if *sig != NO_SIGNATURE {
                sig_ops.push(Op::Put {
                    tree: "sig",
                    key: change.hash().0.to_vec(),
                    value: sig.to_vec(),
                });
            }
        }
        let before = e.doc.get_heads();
        e.doc
            .sync()
            .receive_sync_message(state, msg)
            .map_err(|err| StoreError::Sync {
                id: id.clone(),
                reason: err.to_string(),
            })?;
        let applied = e.doc.get_heads() != before;
        sig_ops.push(Op::Put {
            tree: "sync",
            key: sync_key(&peer, id),
            value: state.encode(),
        });
        let changed = self.persist(&mut g, id, sig_ops)?;
        drop(g);
        if changed {
            let _ = self.changes.send(Changed {
                id: id.clone(),
                origin: Origin::Peer(peer),
            });
        }
        Ok(Received {
            applied,
            changes: new_changes,
        })
    }

    /// The persisted sync state with `peer` for `id`, or a fresh one.
    pub fn sync_state(&self, peer: &EndpointKey, id: &DocId) -> sync::State {
        self.storage
            .get("sync", &sync_key(peer, id))
            .ok()
            .flatten()
            .and_then(|b| sync::State::decode(&b).ok())
            .unwrap_or_default()
    }

    /// Persist the sync state with `peer` for `id`.
    pub fn save_sync_state(
        &self,
        peer: &EndpointKey,
        id: &DocId,
        state: &sync::State,
    ) -> Result<(), StoreError> {
        self.storage.apply(vec![Op::Put {
            tree: "sync",
            key: sync_key(peer, id),
            value: state.encode(),
        }])?;
        Ok(())
    }

    /// Number of changes in `id` (0 if not held).
    pub fn change_count(&self, id: &DocId) -> usize {
        let mut g = self.lock();
        match self.entry(&mut g, id, false) {
            Ok(Some(e)) => e.doc.get_changes(&[]).len(),
            _ => 0,
        }
    }
}

/// The changes a sync message carries, in order.
pub fn message_changes(msg: &sync::Message) -> Result<Vec<Change>, String> {
    let mut out = Vec::new();
    for chunk in msg.changes.iter() {
        out.extend(decode_chunk(chunk)?);
    }
    Ok(out)
}

/// Decode the change data of a sync message into changes. The data is a
/// sequence of Automerge storage chunks: change chunks (plain or
/// compressed), or a whole saved document ("send everything" messages).
fn decode_chunk(data: &[u8]) -> Result<Vec<Change>, String> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 9 || rest[..4] != MAGIC {
            return Err("change data is not a sequence of automerge chunks".into());
        }
        let chunk_type = rest[8];
        let (len, used) = leb128(&rest[9..]).ok_or("truncated chunk length")?;
        let total = 9usize
            .checked_add(used)
            .and_then(|n| n.checked_add(usize::try_from(len).ok()?))
            .filter(|n| *n <= rest.len())
            .ok_or("chunk length exceeds the message")?;
        let (chunk, tail) = rest.split_at(total);
        if chunk_type == 0 {
            let doc = automerge::Automerge::load(chunk)
                .map_err(|e| format!("undecodable document chunk: {e}"))?;
            out.extend(doc.get_changes(&[]));
        } else {
            out.push(
                Change::try_from(chunk).map_err(|e| format!("undecodable change chunk: {e}"))?,
            );
        }
        rest = tail;
    }
    Ok(out)
}

fn leb128(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docs::device;
    use crate::storage::MemStorage;
    use schemas::device::FieldValue;

    fn id() -> DocId {
        "t/acme/s/s1/dev/pump-1".parse().unwrap()
    }

    fn key(n: u8) -> NodeKey {
        NodeKey::from_bytes([n; 32])
    }

    fn open(mem: &MemStorage, cfg: StoreConfig) -> DocStore {
        let k = key(1);
        let actor = k.new_actor();
        DocStore::open(Arc::new(mem.clone()), k, actor, cfg).unwrap()
    }

    const NOW: Timestamp = Timestamp(1_800_000_000_000);

    #[test]
    fn changes_survive_reopen_and_compaction() {
        let mem = MemStorage::new();
        let cfg = StoreConfig {
            compact_after_chunks: 4,
            ..StoreConfig::default()
        };
        {
            let s = open(&mem, cfg.clone());
            for i in 0..10 {
                s.change(&id(), NOW, |d| {
                    device::set_desired(d, "setpoint", &FieldValue::Number(f64::from(i)))
                })
                .unwrap();
            }
            s.flush().unwrap();
        }
        let chunks = mem.scan_prefix("chunk", b"").unwrap().len();
        assert!(
            chunks < 4,
            "compaction keeps chunks bounded, found {chunks}"
        );
        let s = open(&mem, cfg);
        let v = s
            .read(&id(), |d| device::desired_number(d, "setpoint").unwrap())
            .unwrap();
        assert_eq!(v, Some(Some(9.0)));
    }

    #[test]
    fn crash_loses_only_unacknowledged_changes() {
        let mem = MemStorage::new();
        let s = open(&mem, StoreConfig::default());
        s.change(&id(), NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(1.0))
        })
        .unwrap();
        s.flush().unwrap(); // acknowledged
        s.change(&id(), NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Number(2.0))
        })
        .unwrap();
        let acked_heads = {
            let mem2 = mem.clone();
            mem2.crash();
            let s2 = open(&mem2, StoreConfig::default());
            s2.read(&id(), |d| device::desired_number(d, "setpoint").unwrap())
                .unwrap()
        };
        assert_eq!(acked_heads, Some(Some(1.0)));
    }

    #[test]
    fn failed_closure_or_storage_writes_nothing() {
        let mem = MemStorage::new();
        let s = open(&mem, StoreConfig::default());
        let e = s.change(&id(), NOW, |d| {
            device::set_desired(d, "setpoint", &FieldValue::Text("hot".into()))
        });
        assert!(matches!(e, Err(StoreError::Doc { .. })));
        assert!(!s.contains(&id()));
        mem.set_fail_writes(Some("No space left on device"));
        let e = s
            .change(&id(), NOW, |d| {
                device::set_desired(d, "setpoint", &FieldValue::Number(3.0))
            })
            .unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        mem.set_fail_writes(None);
        assert_eq!(
            s.read(&id(), |d| device::desired_number(d, "setpoint").unwrap())
                .unwrap(),
            None
        );
    }

    #[test]
    fn sealed_day_documents_refuse_local_writes() {
        let s = DocStore::in_memory(key(1));
        let day = NOW.day();
        let tel = DocId::telemetry(
            &"acme".parse().unwrap(),
            &"s1".parse().unwrap(),
            &"d".parse().unwrap(),
            day,
        );
        let r = s.change(&tel, NOW, |_| Ok(()));
        assert!(r.is_ok());
        let later = Timestamp(day.end().as_millis() + 3 * MS_PER_DAY);
        assert!(matches!(
            s.change(&tel, later, |_| Ok(())),
            Err(StoreError::Sealed { .. })
        ));
    }

    #[test]
    fn eviction_keeps_memory_under_budget_and_reloads() {
        let cfg = StoreConfig {
            memory_budget_bytes: 200_000,
            ..StoreConfig::default()
        };
        let s = open(&MemStorage::new(), cfg);
        let ids: Vec<DocId> = (0..50)
            .map(|i| format!("t/acme/s/s1/dev/d{i}").parse().unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            s.change(id, NOW, |d| {
                device::set_desired(d, "setpoint", &FieldValue::Number(i as f64))
            })
            .unwrap();
        }
        let st = s.stats();
        assert_eq!(st.documents, 50);
        assert!(st.loaded < 50, "some documents were evicted: {st:?}");
        assert!(st.loaded_bytes_estimate <= 200_000 + 80 * 2_000, "{st:?}");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                s.read(id, |d| device::desired_number(d, "setpoint").unwrap())
                    .unwrap(),
                Some(Some(i as f64))
            );
        }
    }
}
