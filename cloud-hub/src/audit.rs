//! The tamper-evident audit log: an append-only, hash-chained, hub-signed JSON-lines file.
//!
//! Each line is one [`AuditEntry`]: `seq` (1, 2, 3, ...), `time`, `actor` (who), `action`,
//! `target`, `reason` (why), `details`, `prev_hash` (the previous entry's hash, 64 zero hex
//! digits for the first), `hash` and `sig`. `hash` is blake3 over a canonical binary encoding
//! of every other field (domain-separated, length-prefixed, so no JSON canonicalisation is
//! involved); `sig` is the hub's ed25519 signature over `"fieldsync audit entry v1\0" || hash`.
//! [`verify`] replays the chain and reports the first entry that is wrong: an edited field
//! (hash mismatch), a recomputed hash (signature mismatch), a removed, inserted or reordered
//! entry (sequence or chain break), a line that does not parse.
//!
//! **Head file.** After each append the log writes `<log>.head` (`{seq, hash}` of the last
//! entry, atomically). Removing whole entries from the end of the log leaves no trace in the
//! chain itself; the head file catches it ([`Finding::Truncated`]). A head that is one entry
//! behind the log is normal (crash between the two writes). Limit: someone who can rewrite
//! both files can roll them back together to an earlier genuine state; only an external
//! witness of the head (e.g. the hub's peers) would catch that.
//!
//! **Crash safety.** [`AuditLog::append`] writes one whole line and fsyncs before it returns,
//! so an acknowledged entry is never lost. A kill during the write can leave a torn last
//! line (bytes not ending in a newline). [`verify`] reports that distinctly as
//! [`Finding::TornTail`], not as tampering. [`AuditLog::open`] repairs it: the torn bytes
//! are copied to `<log>.torn-<seq>` for inspection, the log is truncated to the last whole
//! line, and an `audit.repair` entry records how many bytes were removed, so the repair is
//! itself on the record. Any other finding makes `open` refuse to append (extending a
//! tampered chain would bless it): a human must look.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use schemas::time::Timestamp;
use serde::{Deserialize, Serialize};

use crate::keys::write_atomic;

const HASH_CONTEXT: &[u8] = b"fieldsync audit entry hash v1\0";
const SIG_CONTEXT: &[u8] = b"fieldsync audit entry v1\0";
/// `prev_hash` of the first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Longest line `verify` reads; anything longer is reported as malformed.
pub const MAX_LINE: usize = 1 << 20;

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// 1 for the first entry, then +1.
    pub seq: u64,
    /// When it happened.
    pub time: Timestamp,
    /// Who did it (`cli:alice`, `api:admin-token-3`, `hub`).
    pub actor: String,
    /// What was done (`node.revoke`).
    pub action: String,
    /// What it was done to (an endpoint id, a token nonce).
    pub target: String,
    /// Why (free text from the actor).
    pub reason: String,
    /// More detail (free text, often JSON).
    pub details: String,
    /// Hex blake3 hash of the previous entry.
    pub prev_hash: String,
    /// Hex blake3 hash of this entry (see the module docs).
    pub hash: String,
    /// Hex ed25519 signature by the hub over the hash.
    pub sig: String,
}

/// What an actor asks to record; the log adds seq, time, hashes and signature.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditRecord {
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// Why.
    pub reason: String,
    /// More detail.
    pub details: String,
}

fn put_str(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// The canonical hash of an entry's content and its predecessor's hash.
pub fn entry_hash(seq: u64, time: Timestamp, rec: &AuditRecord, prev: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(HASH_CONTEXT);
    h.update(&seq.to_le_bytes());
    h.update(&time.0.to_le_bytes());
    put_str(&mut h, &rec.actor);
    put_str(&mut h, &rec.action);
    put_str(&mut h, &rec.target);
    put_str(&mut h, &rec.reason);
    put_str(&mut h, &rec.details);
    h.update(prev);
    *h.finalize().as_bytes()
}

fn sig_input(hash: &[u8; 32]) -> Vec<u8> {
    let mut v = SIG_CONTEXT.to_vec();
    v.extend_from_slice(hash);
    v
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// What is wrong with a log, at the first bad place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Finding {
    /// A whole line is not a valid entry.
    #[error("entry {seq} (line {line}) is malformed: {reason}")]
    Malformed {
        /// The seq expected at that position.
        seq: u64,
        /// 1-based line number.
        line: u64,
        /// The decode error.
        reason: String,
    },
    /// The sequence number is not the next one: an entry was removed, inserted or moved.
    #[error(
        "entry {seq} (line {line}) is missing or out of place: found seq {found} where {seq} was expected (entry removed, inserted or reordered)"
    )]
    SeqBreak {
        /// The expected seq.
        seq: u64,
        /// 1-based line number.
        line: u64,
        /// The seq found there.
        found: u64,
    },
    /// `prev_hash` does not match the previous entry: the chain is broken.
    #[error(
        "entry {seq} (line {line}) does not chain to the entry before it (prev_hash mismatch: an entry was removed, inserted or replaced)"
    )]
    ChainBreak {
        /// The seq.
        seq: u64,
        /// 1-based line number.
        line: u64,
    },
    /// The content does not match its hash: a field was edited.
    #[error("entry {seq} (line {line}) was altered: its content does not match its hash")]
    HashMismatch {
        /// The seq.
        seq: u64,
        /// 1-based line number.
        line: u64,
    },
    /// The hash is not signed by the hub: forged or re-hashed after an edit.
    #[error("entry {seq} (line {line}) is not signed by this hub: forged, or edited and re-hashed")]
    BadSignature {
        /// The seq.
        seq: u64,
        /// 1-based line number.
        line: u64,
    },
    /// The last line is incomplete: a crash during an append (not tampering).
    #[error(
        "torn tail after entry {after_seq}: the last {bytes} bytes are an incomplete line, left by a crash during an append (not tampering; the next append repairs it)"
    )]
    TornTail {
        /// The last whole entry's seq (0 if none).
        after_seq: u64,
        /// Bytes in the incomplete line.
        bytes: u64,
    },
    /// The head file says entries existed that the log no longer has.
    #[error(
        "log truncated: the head file records entry {head_seq} but the log ends at entry {last_seq} (entries {first_missing}..={head_seq} removed)"
    )]
    Truncated {
        /// The head's seq.
        head_seq: u64,
        /// The last seq in the log.
        last_seq: u64,
        /// The first missing seq.
        first_missing: u64,
    },
    /// The head file disagrees with the entry it names.
    #[error("head file records a hash for entry {seq} that differs from the log's entry {seq}")]
    HeadMismatch {
        /// The seq.
        seq: u64,
    },
    /// The head file exists but does not decode.
    #[error("head file {path} is malformed: {reason}")]
    HeadMalformed {
        /// The head file.
        path: PathBuf,
        /// The decode error.
        reason: String,
    },
}

impl Finding {
    /// The first bad seq this finding is about (for a torn tail, the seq the torn line
    /// would have had).
    pub fn seq(&self) -> u64 {
        match self {
            Finding::Malformed { seq, .. }
            | Finding::SeqBreak { seq, .. }
            | Finding::ChainBreak { seq, .. }
            | Finding::HashMismatch { seq, .. }
            | Finding::BadSignature { seq, .. }
            | Finding::HeadMismatch { seq } => *seq,
            Finding::TornTail { after_seq, .. } => after_seq + 1,
            Finding::Truncated { first_missing, .. } => *first_missing,
            Finding::HeadMalformed { .. } => 0,
        }
    }

    /// Whether this finding means tampering (or unexplained damage), as opposed to a
    /// crash artefact that `open` repairs.
    pub fn is_tampering(&self) -> bool {
        !matches!(self, Finding::TornTail { .. })
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Whole entries that verified, in order, before any finding.
    pub verified: u64,
    /// The last verified entry's hash.
    pub last_hash: [u8; 32],
    /// Byte length of the verified prefix (where a repair truncates to).
    pub verified_len: u64,
    /// The first problem, if any.
    pub finding: Option<Finding>,
}

/// Why the audit log could not be read or written (not a finding about its content).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// An IO operation failed.
    #[error("audit log {path}: {action}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the log open for appending.
    #[error("audit log {path} is in use by another process (is a cloud-hub running?)")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The log failed verification; appending would extend a damaged chain.
    #[error(
        "audit log {path} failed verification, refusing to append: {finding} (run `cloud-hub audit verify` and investigate)"
    )]
    Tampered {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        finding: Finding,
    },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> AuditError + use<> {
    let path = path.to_path_buf();
    move |source| AuditError::Io {
        path,
        action,
        source,
    }
}

/// The head file next to `log`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".head");
    log.with_file_name(name)
}

#[derive(Debug, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// Verify the log at `path` (and its head file) against the hub's public key, checking
/// every entry's signature. A missing log is an empty, valid log. `Err` only for IO
/// failures; problems with the content are in [`VerifyReport::finding`].
pub fn verify(path: &Path, hub: &VerifyingKey) -> Result<VerifyReport, AuditError> {
    verify_inner(path, hub, SigCheck::Every)
}

/// How many signatures to check. Checking hashes and chain links of every entry plus the
/// last entry's signature authenticates the whole log (each hash covers its predecessor),
/// at a fraction of the cost; checking every signature pins down *which* entry is forged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigCheck {
    Every,
    LastOnly,
}

/// The head file as read before the scan.
enum HeadState {
    Missing,
    Malformed(String),
    At { seq: u64, hash: Option<[u8; 32]> },
}

fn read_head(log: &Path) -> Result<HeadState, AuditError> {
    let hp = head_path(log);
    let bytes = match std::fs::read(&hp) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HeadState::Missing),
        Err(e) => return Err(io_err(&hp, "read")(e)),
    };
    Ok(match serde_json::from_slice::<Head>(&bytes) {
        Ok(h) => HeadState::At {
            seq: h.seq,
            hash: unhex::<32>(&h.hash),
        },
        Err(e) => HeadState::Malformed(e.to_string()),
    })
}

fn verify_inner(
    path: &Path,
    hub: &VerifyingKey,
    sigs: SigCheck,
) -> Result<VerifyReport, AuditError> {
    let head = read_head(path)?;
    let mut report = VerifyReport {
        verified: 0,
        last_hash: GENESIS_HASH,
        verified_len: 0,
        finding: None,
    };
    let file = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    // The log's hash at the head's seq, captured during the scan.
    let mut hash_at_head: Option<[u8; 32]> = None;
    // The last entry's signature, when only that one is checked.
    let mut last_sig: Option<[u8; 64]> = None;
    if let Some(file) = file {
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(io_err(path, "read"))?;
            if n == 0 {
                break;
            }
            let seq = report.verified + 1;
            let line = seq;
            if buf.last() != Some(&b'\n') {
                report.finding = Some(if n > MAX_LINE {
                    Finding::Malformed {
                        seq,
                        line,
                        reason: format!("line longer than {MAX_LINE} bytes"),
                    }
                } else {
                    Finding::TornTail {
                        after_seq: report.verified,
                        bytes: n as u64,
                    }
                });
                return Ok(report);
            }
            let check_sig = sigs == SigCheck::Every;
            match check_line(&buf[..n - 1], seq, line, &report.last_hash, hub, check_sig) {
                Ok((hash, sig)) => {
                    report.verified = seq;
                    report.last_hash = hash;
                    report.verified_len += n as u64;
                    last_sig = Some(sig);
                    if matches!(head, HeadState::At { seq: hs, .. } if hs == seq) {
                        hash_at_head = Some(hash);
                    }
                }
                Err(f) => {
                    report.finding = Some(f);
                    return Ok(report);
                }
            }
        }
    }
    if sigs == SigCheck::LastOnly
        && let Some(sig) = last_sig
        && hub
            .verify_strict(&sig_input(&report.last_hash), &Signature::from_bytes(&sig))
            .is_err()
    {
        report.finding = Some(Finding::BadSignature {
            seq: report.verified,
            line: report.verified,
        });
        return Ok(report);
    }
    report.finding = check_head(path, &report, head, hash_at_head);
    Ok(report)
}

/// Check one whole line; returns its hash and signature.
fn check_line(
    bytes: &[u8],
    seq: u64,
    line: u64,
    prev: &[u8; 32],
    hub: &VerifyingKey,
    check_sig: bool,
) -> Result<([u8; 32], [u8; 64]), Finding> {
    let e: AuditEntry = serde_json::from_slice(bytes).map_err(|err| Finding::Malformed {
        seq,
        line,
        reason: err.to_string(),
    })?;
    if e.seq != seq {
        return Err(Finding::SeqBreak {
            seq,
            line,
            found: e.seq,
        });
    }
    let bad = |what: &str| Finding::Malformed {
        seq,
        line,
        reason: format!("{what} is not hex of the right length"),
    };
    let prev_hash = unhex::<32>(&e.prev_hash).ok_or_else(|| bad("prev_hash"))?;
    let hash = unhex::<32>(&e.hash).ok_or_else(|| bad("hash"))?;
    let sig = unhex::<64>(&e.sig).ok_or_else(|| bad("sig"))?;
    if &prev_hash != prev {
        return Err(Finding::ChainBreak { seq, line });
    }
    let rec = AuditRecord {
        actor: e.actor,
        action: e.action,
        target: e.target,
        reason: e.reason,
        details: e.details,
    };
    if entry_hash(e.seq, e.time, &rec, &prev_hash) != hash {
        return Err(Finding::HashMismatch { seq, line });
    }
    if check_sig {
        hub.verify_strict(&sig_input(&hash), &Signature::from_bytes(&sig))
            .map_err(|_| Finding::BadSignature { seq, line })?;
    }
    Ok((hash, sig))
}

fn check_head(
    log: &Path,
    report: &VerifyReport,
    head: HeadState,
    hash_at_head: Option<[u8; 32]>,
) -> Option<Finding> {
    let last = report.verified;
    match head {
        // A log with entries always has a head (written after each append) unless a
        // crash came between the first append and its head; more than one entry and
        // no head means the head was removed.
        HeadState::Missing if last > 1 => Some(Finding::HeadMalformed {
            path: head_path(log),
            reason: format!("missing, but the log has {last} entries (deleted?)"),
        }),
        HeadState::Missing => None,
        HeadState::Malformed(reason) => Some(Finding::HeadMalformed {
            path: head_path(log),
            reason,
        }),
        HeadState::At { seq, .. } if seq > last => Some(Finding::Truncated {
            head_seq: seq,
            last_seq: last,
            first_missing: last + 1,
        }),
        HeadState::At { seq: 0, .. } => None,
        HeadState::At { seq, hash } => match (hash, hash_at_head) {
            (Some(h), Some(l)) if h == l => None,
            _ => Some(Finding::HeadMismatch { seq }),
        },
    }
}

/// How [`AuditLog::open`] found the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOutcome {
    /// Entries in the log after opening (including a repair entry, if one was written).
    pub entries: u64,
    /// A torn tail that was repaired, and where its bytes were saved.
    pub repaired: Option<(Finding, PathBuf)>,
}

/// An audit log open for appending. Holds an exclusive lock on the file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    key: SigningKey,
    last_seq: u64,
    last_hash: [u8; 32],
    /// Length of the file up to the end of the last whole entry.
    len: u64,
    /// Set when a failed append could not be rolled back; every later append fails.
    poisoned: bool,
}

impl AuditLog {
    /// Open (or create) the log at `path` for appending with hub key `key`. Verifies the
    /// whole log first (every hash and link, and the last entry's signature, which with the
    /// chain authenticates all earlier entries); repairs a torn tail (see the module docs)
    /// and refuses anything else. For the exact first bad entry, use [`verify`].
    /// `now` timestamps the repair entry, if one is written.
    pub fn open(
        path: &Path,
        key: SigningKey,
        now: Timestamp,
    ) -> Result<(AuditLog, OpenOutcome), AuditError> {
        Self::open_inner(path, key, now, false)
    }

    /// Like [`AuditLog::open`], but if another process (the CLI, or `serve`) holds the log,
    /// block until it lets go instead of failing with [`AuditError::Locked`]. Holders keep
    /// the log for one command or one append, so the wait is short. Blocking: call it from
    /// a blocking thread in async code.
    pub fn open_wait(
        path: &Path,
        key: SigningKey,
        now: Timestamp,
    ) -> Result<(AuditLog, OpenOutcome), AuditError> {
        Self::open_inner(path, key, now, true)
    }

    fn open_inner(
        path: &Path,
        key: SigningKey,
        now: Timestamp,
        wait: bool,
    ) -> Result<(AuditLog, OpenOutcome), AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        if wait {
            file.lock().map_err(io_err(path, "lock"))?;
        } else {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(AuditError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path, "lock")(e)),
            }
        }
        let report = verify_inner(path, &key.verifying_key(), SigCheck::LastOnly)?;
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            key,
            last_seq: report.verified,
            last_hash: report.last_hash,
            len: report.verified_len,
            poisoned: false,
        };
        let mut repaired = None;
        match report.finding {
            None => {}
            Some(f @ Finding::TornTail { .. }) => {
                let saved = log.cut_torn_tail(report.verified_len, report.verified)?;
                let bytes = match f {
                    Finding::TornTail { bytes, .. } => bytes,
                    _ => 0,
                };
                log.append(
                    &AuditRecord {
                        actor: "hub".into(),
                        action: "audit.repair".into(),
                        target: path.display().to_string(),
                        reason: "torn tail left by a crash during an append".into(),
                        details: format!(
                            "removed {bytes} bytes after entry {}; saved to {}",
                            report.verified,
                            saved.display()
                        ),
                    },
                    now,
                )?;
                repaired = Some((f, saved));
            }
            Some(finding) => {
                return Err(AuditError::Tampered {
                    path: path.to_path_buf(),
                    finding,
                });
            }
        }
        let entries = log.last_seq;
        Ok((log, OpenOutcome { entries, repaired }))
    }

    fn cut_torn_tail(&mut self, keep: u64, after_seq: u64) -> Result<PathBuf, AuditError> {
        let path = self.path.clone();
        let mut torn = Vec::new();
        self.file
            .seek(SeekFrom::Start(keep))
            .map_err(io_err(&path, "seek"))?;
        self.file
            .read_to_end(&mut torn)
            .map_err(io_err(&path, "read torn tail"))?;
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".torn-{}", after_seq + 1));
        let saved = path.with_file_name(name);
        write_atomic(&saved, &torn).map_err(io_err(&saved, "save torn tail"))?;
        self.file.set_len(keep).map_err(io_err(&path, "truncate"))?;
        self.file.sync_all().map_err(io_err(&path, "fsync"))?;
        Ok(saved)
    }

    /// Append `rec` at time `now`: one whole line, fsynced before returning, then the head
    /// file. Returns the entry as written.
    pub fn append(&mut self, rec: &AuditRecord, now: Timestamp) -> Result<AuditEntry, AuditError> {
        let seq = self.last_seq + 1;
        let hash = entry_hash(seq, now, rec, &self.last_hash);
        let sig = self.key.sign(&sig_input(&hash));
        let entry = AuditEntry {
            seq,
            time: now,
            actor: rec.actor.clone(),
            action: rec.action.clone(),
            target: rec.target.clone(),
            reason: rec.reason.clone(),
            details: rec.details.clone(),
            prev_hash: hex(&self.last_hash),
            hash: hex(&hash),
            sig: hex(&sig.to_bytes()),
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| AuditError::Io {
            path: self.path.clone(),
            action: "encode entry",
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        let path = self.path.clone();
        if self.poisoned {
            return Err(AuditError::Io {
                path,
                action: "append",
                source: io::Error::other(
                    "an earlier append failed and could not be rolled back; reopen the log",
                ),
            });
        }
        let written = self
            .file
            .write_all(&line)
            .map_err(io_err(&path, "append"))
            .and_then(|()| self.file.sync_data().map_err(io_err(&path, "fsync")));
        if let Err(e) = written {
            // Do not leave a partial line for the next append to follow.
            if self.file.set_len(self.len).is_err() {
                self.poisoned = true;
            }
            return Err(e);
        }
        self.len += line.len() as u64;
        self.last_seq = seq;
        self.last_hash = hash;
        let head = Head {
            seq,
            hash: entry.hash.clone(),
        };
        let head_bytes = serde_json::to_vec(&head).unwrap_or_default();
        let hp = head_path(&self.path);
        write_atomic(&hp, &head_bytes).map_err(io_err(&hp, "write head"))?;
        Ok(entry)
    }

    /// The seq of the last entry (0 for an empty log).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
