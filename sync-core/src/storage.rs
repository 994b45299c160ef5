//! Bytes storage behind one narrow trait. This is the only module that names
//! sled; [`MemStorage`] is its in-memory twin for tests and the simulator,
//! and can simulate a crash that loses everything not yet flushed.
//!
//! Keys are grouped in named trees. Writes become durable at [`Storage::flush`]
//! (sled also flushes on its own every few hundred milliseconds; nothing may
//! count on that).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A storage failure. The message says what was being done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The backing store failed (disk full, permissions, corruption).
    #[error("storage: {0}")]
    Backend(String),
}

/// Key-value pairs in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        tree: &'static str,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        tree: &'static str,
        key: Vec<u8>,
    },
}

/// Ordered key-value trees with atomic batches.
pub trait Storage: Send + Sync + 'static {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Every pair whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, tree: &'static str, prefix: &[u8]) -> Result<Pairs, StorageError>;
    /// Apply all ops atomically (all or none survive a crash).
    fn apply(&self, ops: Vec<Op>) -> Result<(), StorageError>;
    /// Make every write so far durable.
    fn flush(&self) -> Result<(), StorageError>;
}

/// sled-backed storage.
pub struct SledStorage {
    db: sled::Db,
}

fn backend<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StorageError + '_ {
    move |e| StorageError::Backend(format!("{what}: {e}"))
}

impl SledStorage {
    /// Open (or create) a store in `dir`.
    pub fn open(dir: &Path) -> Result<SledStorage, StorageError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| StorageError::Backend(format!("open {}: {e}", dir.display())))?;
        Ok(SledStorage { db })
    }

    fn tree(&self, name: &'static str) -> Result<sled::Tree, StorageError> {
        self.db.open_tree(name).map_err(backend("open tree"))
    }
}

impl Storage for SledStorage {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .tree(tree)?
            .get(key)
            .map_err(backend("get"))?
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, tree: &'static str, prefix: &[u8]) -> Result<Pairs, StorageError> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(backend("scan"))
            })
            .collect()
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        use sled::Transactional;
        // Group ops per tree, then apply them in one multi-tree transaction.
        let mut names: Vec<&'static str> = Vec::new();
        for op in &ops {
            let t = match op {
                Op::Put { tree, .. } | Op::Delete { tree, .. } => *tree,
            };
            if !names.contains(&t) {
                names.push(t);
            }
        }
        let trees = names
            .iter()
            .map(|n| self.tree(n))
            .collect::<Result<Vec<_>, _>>()?;
        let res: sled::transaction::TransactionResult<(), ()> =
            trees.as_slice().transaction(|txs| {
                for op in &ops {
                    match op {
                        Op::Put { tree, key, value } => {
                            let i = names.iter().position(|n| n == tree).unwrap_or(0);
                            txs[i].insert(key.as_slice(), value.as_slice())?;
                        }
                        Op::Delete { tree, key } => {
                            let i = names.iter().position(|n| n == tree).unwrap_or(0);
                            txs[i].remove(key.as_slice())?;
                        }
                    }
                }
                Ok(())
            });
        res.map_err(|e| StorageError::Backend(format!("write batch: {e:?}")))
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }
}

type Trees = BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>;

/// In-memory storage. Writes go to a pending layer until [`Storage::flush`];
/// [`MemStorage::crash`] drops the pending layer, like a power cut.
#[derive(Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    durable: Trees,
    /// Batches applied since the last flush, in order.
    pending: Vec<Vec<Op>>,
    /// Fail every write with this message (a full disk).
    fail_writes: Option<String>,
}

impl MemInner {
    fn view(&self) -> Trees {
        let mut t = self.durable.clone();
        for batch in &self.pending {
            apply_ops(&mut t, batch);
        }
        t
    }
}

fn apply_ops(t: &mut Trees, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put { tree, key, value } => {
                t.entry(tree)
                    .or_default()
                    .insert(key.clone(), value.clone());
            }
            Op::Delete { tree, key } => {
                t.entry(tree).or_default().remove(key);
            }
        }
    }
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Lose every write that was not flushed.
    pub fn crash(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.pending.clear();
        }
    }

    /// Make every write fail with `msg` (or succeed again with `None`).
    pub fn set_fail_writes(&self, msg: Option<&str>) {
        if let Ok(mut g) = self.inner.lock() {
            g.fail_writes = msg.map(str::to_string);
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemInner>, StorageError> {
        self.inner
            .lock()
            .map_err(|_| StorageError::Backend("memory store lock poisoned".into()))
    }
}

impl Storage for MemStorage {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let g = self.lock()?;
        let mut found = g.durable.get(tree).and_then(|t| t.get(key)).cloned();
        for batch in &g.pending {
            for op in batch {
                match op {
                    Op::Put {
                        tree: t,
                        key: k,
                        value,
                    } if *t == tree && k == key => found = Some(value.clone()),
                    Op::Delete { tree: t, key: k } if *t == tree && k == key => found = None,
                    _ => {}
                }
            }
        }
        Ok(found)
    }

    fn scan_prefix(&self, tree: &'static str, prefix: &[u8]) -> Result<Pairs, StorageError> {
        let g = self.lock()?;
        let view = if g.pending.is_empty() {
            None
        } else {
            Some(g.view())
        };
        let trees = view.as_ref().unwrap_or(&g.durable);
        Ok(trees
            .get(tree)
            .map(|t| {
                t.range(prefix.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        if let Some(msg) = &g.fail_writes {
            return Err(StorageError::Backend(msg.clone()));
        }
        g.pending.push(ops);
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        if let Some(msg) = &g.fail_writes {
            return Err(StorageError::Backend(msg.clone()));
        }
        let pending = std::mem::take(&mut g.pending);
        for batch in &pending {
            apply_ops(&mut g.durable, batch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(s: &dyn Storage) {
        s.apply(vec![
            Op::Put {
                tree: "a",
                key: b"k1".to_vec(),
                value: b"v1".to_vec(),
            },
            Op::Put {
                tree: "a",
                key: b"k2".to_vec(),
                value: b"v2".to_vec(),
            },
            Op::Put {
                tree: "b",
                key: b"k1".to_vec(),
                value: b"other".to_vec(),
            },
        ])
        .unwrap();
        assert_eq!(s.get("a", b"k1").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(s.scan_prefix("a", b"k").unwrap().len(), 2);
        s.apply(vec![Op::Delete {
            tree: "a",
            key: b"k1".to_vec(),
        }])
        .unwrap();
        assert_eq!(s.get("a", b"k1").unwrap(), None);
        assert_eq!(
            s.scan_prefix("a", b"").unwrap(),
            vec![(b"k2".to_vec(), b"v2".to_vec())]
        );
        s.flush().unwrap();
    }

    #[test]
    fn mem_and_sled_behave_alike() {
        exercise(&MemStorage::new());
        let dir = tempfile::tempdir().unwrap();
        exercise(&SledStorage::open(dir.path()).unwrap());
    }

    #[test]
    fn mem_crash_loses_only_unflushed() {
        let s = MemStorage::new();
        s.apply(vec![Op::Put {
            tree: "a",
            key: b"x".to_vec(),
            value: b"1".to_vec(),
        }])
        .unwrap();
        s.flush().unwrap();
        s.apply(vec![Op::Put {
            tree: "a",
            key: b"y".to_vec(),
            value: b"2".to_vec(),
        }])
        .unwrap();
        s.crash();
        assert_eq!(s.get("a", b"x").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get("a", b"y").unwrap(), None);
        s.set_fail_writes(Some("disk full"));
        let e = s
            .apply(vec![Op::Delete {
                tree: "a",
                key: b"x".to_vec(),
            }])
            .unwrap_err();
        assert!(e.to_string().contains("disk full"));
    }

    #[test]
    fn sled_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            s.apply(vec![Op::Put {
                tree: "a",
                key: b"x".to_vec(),
                value: b"1".to_vec(),
            }])
            .unwrap();
            s.flush().unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(s.get("a", b"x").unwrap(), Some(b"1".to_vec()));
    }
}
