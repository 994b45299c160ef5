//! Command execution, at most once per command id, with a crash-safe ledger.
//!
//! [`CommandExecutor::handle`] checks a [`Command`] (duplicate, valid, not
//! expired, authorised, known device and register) and, only then, records
//! "started" durably, drives the caller's [`Actuator`], and records the
//! [`CommandResult`]. A command id is executed at most once, however often it
//! is delivered and across restarts:
//!
//! - a duplicate delivery returns the stored result without executing;
//! - a command "started" but not "finished" when the node died is reported
//!   on restart as failed, reason "interrupted by restart", and never run
//!   again (the device may or may not have seen the write: the operator
//!   decides, the edge does not guess);
//! - if "started" cannot be written, the command is not executed and the
//!   result is not stored (a later delivery may try again).
//!
//! Refusals are stored too (except for a malformed id), so a redelivered
//! refused command gets the same answer.
//!
//! # Ledger file
//!
//! JSON lines, each `{crc32 of json, 8 hex digits} {json}\n`, fsynced per
//! entry. Opening truncates a torn or corrupt last line; a bad line followed
//! by good ones is corruption and refuses to open (nothing is guessed).
//! [`CommandLedger::compact`] forgets ids whose command expired long ago:
//! safe, because an expired command is refused, never executed.
//!
//! # Who may command
//!
//! `hub` and `admin:{name}` anywhere; `operator:{site}:{name}` only on its
//! own site. Anything else is refused (see [`authorise`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

use schemas::command::{Command, CommandAction, CommandResult, CommandStatus};
use schemas::config::EdgeConfig;
use schemas::device::{FieldSpec, FieldValue};
use schemas::ids::{DeviceId, SiteId};
use schemas::registers::{RegisterFunction, RegisterSpec};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;
use serde::{Deserialize, Serialize};

/// Reason given for a command that was running when the node died.
pub const INTERRUPTED: &str = "interrupted by restart";

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// A file operation failed.
    #[error("command ledger {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line that is not the last one is unreadable.
    #[error("command ledger {path}: line {line} is corrupt ({reason}) and is not the last line")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// A device write failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ActuatorError(pub String);

/// What the executor drives; implemented by the caller (Modbus writes, the
/// device document). Each method returns once the effect is done.
pub trait Actuator {
    /// Write a coil.
    fn write_coil(
        &self,
        device: &DeviceId,
        register: &RegisterSpec,
        value: bool,
    ) -> impl Future<Output = Result<(), ActuatorError>> + Send;
    /// Write a holding register (the value in engineering units).
    fn write_register(
        &self,
        device: &DeviceId,
        register: &RegisterSpec,
        value: f64,
    ) -> impl Future<Output = Result<(), ActuatorError>> + Send;
    /// Change one desired-config field of a device.
    fn set_desired(
        &self,
        device: &DeviceId,
        field: &FieldSpec,
        value: &FieldValue,
    ) -> impl Future<Output = Result<(), ActuatorError>> + Send;
}

/// The devices this node owns, as the executor needs to know them.
pub trait DeviceCatalog {
    /// Whether this node owns the device.
    fn has_device(&self, device: &DeviceId) -> bool;
    /// A register of the device by name.
    fn register(&self, device: &DeviceId, name: &str) -> Option<RegisterSpec>;
}

impl DeviceCatalog for EdgeConfig {
    fn has_device(&self, device: &DeviceId) -> bool {
        self.device(device).is_some()
    }
    fn register(&self, device: &DeviceId, name: &str) -> Option<RegisterSpec> {
        self.device(device)?
            .registers
            .iter()
            .find(|r| r.name == name)
            .cloned()
    }
}

/// Whether `principal` may command devices of `site`: `Err` says why not.
pub fn authorise(principal: &str, site: &SiteId) -> Result<(), String> {
    let parts: Vec<&str> = principal.split(':').collect();
    match parts.as_slice() {
        ["hub"] => Ok(()),
        ["admin", name] if !name.is_empty() => Ok(()),
        ["operator", s, name] if !name.is_empty() => {
            if *s == site.as_str() {
                Ok(())
            } else {
                Err(format!(
                    "principal {principal:?} is an operator of site {s:?}, not of this site {site}"
                ))
            }
        }
        _ => Err(format!(
            "principal {principal:?} may not issue commands (allowed: hub, admin:NAME, operator:{site}:NAME)"
        )),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
enum Entry {
    Started {
        id: String,
        expires_at: Timestamp,
        at: Timestamp,
    },
    Finished {
        expires_at: Timestamp,
        result: CommandResult,
    },
}

#[derive(Debug, Clone)]
enum State {
    Started,
    Finished(CommandResult),
}

#[derive(Debug, Clone)]
struct Record {
    expires_at: Timestamp,
    started_at: Option<Timestamp>,
    state: State,
}

/// The persisted set of command ids this node has started or finished.
#[derive(Debug)]
pub struct CommandLedger {
    path: PathBuf,
    file: File,
    records: HashMap<String, Record>,
}

fn encode_line(e: &Entry) -> Vec<u8> {
    // Serialising plain structs of strings and numbers cannot fail.
    let json = serde_json::to_string(e).unwrap_or_default();
    format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes())).into_bytes()
}

fn decode_line(line: &str) -> Result<Entry, String> {
    let (crc, json) = line.split_once(' ').ok_or("no crc field")?;
    let crc = u32::from_str_radix(crc, 16).map_err(|e| format!("crc field: {e}"))?;
    if crc32fast::hash(json.as_bytes()) != crc {
        return Err("crc mismatch".into());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

impl CommandLedger {
    /// Open (or create) the ledger. Commands started but never finished are
    /// recorded as failed ("interrupted by restart", at `now`) and returned,
    /// so the caller can report them.
    pub fn open(
        path: impl AsRef<Path>,
        now: Timestamp,
        executed_by: &str,
    ) -> Result<(CommandLedger, Vec<CommandResult>), LedgerError> {
        let path = path.as_ref().to_path_buf();
        let io = |op, source| LedgerError::Io {
            op,
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("create dir", e))?;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("read", e)),
        };
        let mut records: HashMap<String, Record> = HashMap::new();
        let mut good_len = 0usize;
        let mut pos = 0usize;
        let mut line_no = 0usize;
        let mut bad: Option<(usize, String)> = None;
        while pos < bytes.len() {
            line_no += 1;
            let end = bytes[pos..].iter().position(|&b| b == b'\n');
            let parsed = match end {
                None => Err("torn line (no newline)".to_string()),
                Some(n) => std::str::from_utf8(&bytes[pos..pos + n])
                    .map_err(|e| e.to_string())
                    .and_then(decode_line),
            };
            let next = end.map_or(bytes.len(), |n| pos + n + 1);
            match parsed {
                Ok(entry) => {
                    if let Some((line, reason)) = bad.take() {
                        return Err(LedgerError::Corrupt { path, line, reason });
                    }
                    apply(&mut records, entry);
                    good_len = next;
                }
                Err(reason) => {
                    if bad.is_none() {
                        bad = Some((line_no, reason));
                    }
                }
            }
            pos = next;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("open", e))?;
        if good_len < bytes.len() {
            tracing::warn!(ledger = %path.display(), bytes = bytes.len() - good_len, "command ledger truncating torn tail");
            file.set_len(good_len as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| io("truncate torn tail", e))?;
        }
        let mut interrupted = Vec::new();
        let mut ids: Vec<&String> = records
            .iter()
            .filter(|(_, r)| matches!(r.state, State::Started))
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        let pending: Vec<(String, Timestamp)> = ids
            .into_iter()
            .map(|id| (id.clone(), records[id].expires_at))
            .collect();
        for (id, expires_at) in pending {
            let result = CommandResult {
                schema_version: SchemaVersion::default(),
                command_id: id,
                status: CommandStatus::Failed,
                reason: INTERRUPTED.into(),
                executed_at: now,
                executed_by: executed_by.to_string(),
            };
            let e = Entry::Finished {
                expires_at,
                result: result.clone(),
            };
            write_entry(&mut file, &path, &e)?;
            apply(&mut records, e);
            interrupted.push(result);
        }
        Ok((
            CommandLedger {
                path,
                file,
                records,
            },
            interrupted,
        ))
    }

    /// The stored result of a finished command.
    pub fn result(&self, id: &str) -> Option<&CommandResult> {
        match &self.records.get(id)?.state {
            State::Finished(r) => Some(r),
            State::Started => None,
        }
    }

    /// Whether the id was ever started or finished.
    pub fn contains(&self, id: &str) -> bool {
        self.records.contains_key(id)
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Durably record that a command is about to run.
    pub fn record_started(
        &mut self,
        id: &str,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let e = Entry::Started {
            id: id.to_string(),
            expires_at,
            at: now,
        };
        write_entry(&mut self.file, &self.path, &e)?;
        apply(&mut self.records, e);
        Ok(())
    }

    /// Durably record a command's result. On error the result is still
    /// remembered in memory (so this process never runs the id again).
    pub fn record_finished(
        &mut self,
        result: &CommandResult,
        expires_at: Timestamp,
    ) -> Result<(), LedgerError> {
        let e = Entry::Finished {
            expires_at,
            result: result.clone(),
        };
        let w = write_entry(&mut self.file, &self.path, &e);
        apply(&mut self.records, e);
        w
    }

    /// Forget finished ids whose command expired before `before`, rewriting
    /// the file atomically. Returns how many were forgotten.
    pub fn compact(&mut self, before: Timestamp) -> Result<usize, LedgerError> {
        let io = |op, source| LedgerError::Io {
            op,
            path: self.path.clone(),
            source,
        };
        let old = self.records.len();
        let keep: Vec<(String, Record)> = self
            .records
            .iter()
            .filter(|(_, r)| !(matches!(r.state, State::Finished(_)) && r.expires_at < before))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        let tmp = self.path.with_extension("compact");
        let mut f = File::create(&tmp).map_err(|e| io("create", e))?;
        let mut buf = Vec::new();
        for (id, r) in &keep {
            if let Some(at) = r.started_at {
                buf.extend(encode_line(&Entry::Started {
                    id: id.clone(),
                    expires_at: r.expires_at,
                    at,
                }));
            }
            if let State::Finished(res) = &r.state {
                buf.extend(encode_line(&Entry::Finished {
                    expires_at: r.expires_at,
                    result: res.clone(),
                }));
            }
        }
        f.write_all(&buf)
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("rename", e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("fsync dir", e))?;
        }
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io("reopen", e))?;
        self.records = keep.into_iter().collect();
        Ok(old - self.records.len())
    }
}

/// One "started" line of a ledger file: one actual execution of a command
/// (the device write follows it).
#[derive(Debug, Clone, PartialEq)]
pub struct StartedEntry {
    /// The command id.
    pub id: String,
    /// When it started (the node's wall clock).
    pub at: Timestamp,
    /// 1-based line number in the file.
    pub line: usize,
}

/// Every "started" line of the ledger file at `path`, in file order, read
/// without opening the ledger for writing (for an observer of a stopped
/// node). Unlike [`CommandLedger::open`], a second start of the same id is
/// kept, not folded: counting executions is the point. A missing file is
/// an empty ledger; a torn last line is skipped, as `open` would cut it; a
/// bad line followed by good ones is [`LedgerError::Corrupt`].
pub fn read_started(path: &Path) -> Result<Vec<StartedEntry>, LedgerError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LedgerError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    let mut bad: Option<(usize, String)> = None;
    for (i, chunk) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        let parsed = match chunk.strip_suffix(b"\n") {
            None => Err("torn line (no newline)".to_string()),
            Some(l) => std::str::from_utf8(l)
                .map_err(|e| e.to_string())
                .and_then(decode_line),
        };
        match parsed {
            Ok(entry) => {
                if let Some((line, reason)) = bad.take() {
                    return Err(LedgerError::Corrupt {
                        path: path.to_path_buf(),
                        line,
                        reason,
                    });
                }
                if let Entry::Started { id, at, .. } = entry {
                    out.push(StartedEntry {
                        id,
                        at,
                        line: i + 1,
                    });
                }
            }
            Err(reason) => {
                if bad.is_none() {
                    bad = Some((i + 1, reason));
                }
            }
        }
    }
    Ok(out)
}

fn apply(records: &mut HashMap<String, Record>, e: Entry) {
    match e {
        Entry::Started { id, expires_at, at } => {
            records.insert(
                id,
                Record {
                    expires_at,
                    started_at: Some(at),
                    state: State::Started,
                },
            );
        }
        Entry::Finished { expires_at, result } => {
            let started_at = records.get(&result.command_id).and_then(|r| r.started_at);
            records.insert(
                result.command_id.clone(),
                Record {
                    expires_at,
                    started_at,
                    state: State::Finished(result),
                },
            );
        }
    }
}

fn write_entry(file: &mut File, path: &Path, e: &Entry) -> Result<(), LedgerError> {
    let line = encode_line(e);
    file.write_all(&line)
        .and_then(|()| file.sync_data())
        .map_err(|source| LedgerError::Io {
            op: "append",
            path: path.to_path_buf(),
            source,
        })
}

/// Executes commands at most once per id. See the module docs.
#[derive(Debug)]
pub struct CommandExecutor {
    ledger: CommandLedger,
    site: SiteId,
    executed_by: String,
}

impl CommandExecutor {
    /// An executor for `site`, signing results as `executed_by` (the node's
    /// endpoint id, hex).
    pub fn new(ledger: CommandLedger, site: SiteId, executed_by: String) -> CommandExecutor {
        CommandExecutor {
            ledger,
            site,
            executed_by,
        }
    }

    /// The ledger (for reporting and compaction).
    pub fn ledger_mut(&mut self) -> &mut CommandLedger {
        &mut self.ledger
    }

    fn result(
        &self,
        cmd: &Command,
        status: CommandStatus,
        reason: String,
        now: Timestamp,
    ) -> CommandResult {
        CommandResult {
            schema_version: SchemaVersion::default(),
            command_id: cmd.id.clone(),
            status,
            reason,
            executed_at: now,
            executed_by: self.executed_by.clone(),
        }
    }

    /// Handle one delivery of a command: returns the stored result for a
    /// duplicate, a refusal with its reason, or the outcome of executing it.
    pub async fn handle<C, A>(
        &mut self,
        cmd: &Command,
        now: Timestamp,
        devices: &C,
        actuator: &A,
    ) -> CommandResult
    where
        C: DeviceCatalog + ?Sized,
        A: Actuator + ?Sized,
    {
        if let Some(r) = self.ledger.result(&cmd.id) {
            return r.clone();
        }
        if self.ledger.contains(&cmd.id) {
            // Started in this process but its result could not be recorded.
            return self.result(
                cmd,
                CommandStatus::Failed,
                "already started; its outcome was not recorded".into(),
                now,
            );
        }
        if let Err(reason) = schemas::command::validate_command_id(&cmd.id) {
            // Not stored: a malformed id is no key to remember.
            return self.result(cmd, CommandStatus::Refused, reason, now);
        }
        let plan = match self.check(cmd, now, devices) {
            Ok(plan) => plan,
            Err((status, reason)) => {
                let r = self.result(cmd, status, reason, now);
                if let Err(e) = self.ledger.record_finished(&r, cmd.expires_at) {
                    tracing::error!(command = %cmd.id, error = %e, "command ledger write failed");
                }
                return r;
            }
        };
        if let Err(e) = self.ledger.record_started(&cmd.id, cmd.expires_at, now) {
            tracing::error!(command = %cmd.id, error = %e, "command ledger write failed");
            return self.result(
                cmd,
                CommandStatus::Failed,
                format!("not executed: cannot record it in the command ledger: {e}"),
                now,
            );
        }
        let outcome = match plan {
            Plan::Coil(spec, v) => actuator.write_coil(&cmd.target, &spec, v).await,
            Plan::Register(spec, v) => actuator.write_register(&cmd.target, &spec, v).await,
            Plan::Desired(spec, v) => actuator.set_desired(&cmd.target, &spec, &v).await,
        };
        let r = match outcome {
            Ok(()) => self.result(cmd, CommandStatus::Succeeded, String::new(), now),
            Err(e) => self.result(cmd, CommandStatus::Failed, e.0, now),
        };
        if let Err(e) = self.ledger.record_finished(&r, cmd.expires_at) {
            tracing::error!(command = %cmd.id, error = %e, "command ledger write failed after execution");
        }
        r
    }

    /// Everything that can refuse a command before it runs.
    fn check<C: DeviceCatalog + ?Sized>(
        &self,
        cmd: &Command,
        now: Timestamp,
        devices: &C,
    ) -> Result<Plan, (CommandStatus, String)> {
        let refused = |r: String| (CommandStatus::Refused, r);
        cmd.validate().map_err(refused)?;
        if cmd.is_expired(now) {
            return Err((
                CommandStatus::Expired,
                format!(
                    "command {} expired at {} (now {})",
                    cmd.id, cmd.expires_at, now
                ),
            ));
        }
        authorise(&cmd.issued_by, &self.site).map_err(refused)?;
        let dev = &cmd.target;
        if !devices.has_device(dev) {
            return Err(refused(format!("unknown device {dev} on this node")));
        }
        let reg = |name: &str, want: RegisterFunction| {
            let spec = devices
                .register(dev, name)
                .ok_or_else(|| refused(format!("device {dev} has no register {name:?}")))?;
            if spec.function != want {
                return Err(refused(format!(
                    "register {name:?} of {dev} is {:?}, not a writable {want:?}",
                    spec.function
                )));
            }
            Ok(spec)
        };
        match &cmd.action {
            CommandAction::WriteCoil { register, value } => {
                Ok(Plan::Coil(reg(register, RegisterFunction::Coil)?, *value))
            }
            CommandAction::WriteRegister { register, value } => Ok(Plan::Register(
                reg(register, RegisterFunction::Holding)?,
                *value,
            )),
            CommandAction::SetDesired { field, value } => {
                let spec = schemas::device::field_spec(field)
                    .ok_or_else(|| refused(format!("unknown desired field {field:?}")))?;
                spec.check(value).map_err(refused)?;
                Ok(Plan::Desired(spec, value.clone()))
            }
        }
    }
}

enum Plan {
    Coil(RegisterSpec, bool),
    Register(RegisterSpec, f64),
    Desired(FieldSpec, FieldValue),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals() {
        let site = SiteId::new("site-1").unwrap();
        assert!(authorise("hub", &site).is_ok());
        assert!(authorise("admin:alice", &site).is_ok());
        assert!(authorise("operator:site-1:bob", &site).is_ok());
        let e = authorise("operator:site-2:bob", &site).unwrap_err();
        assert!(e.contains("site-2"), "{e}");
        for bad in [
            "",
            "admin",
            "admin:",
            "operator:site-1",
            "operator:site-1:",
            "root",
            "hub:x",
        ] {
            assert!(authorise(bad, &site).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn read_started_lists_every_start_and_skips_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands.ledger");
        assert!(read_started(&path).unwrap().is_empty());
        let (mut l, _) = CommandLedger::open(&path, Timestamp(1), "e").unwrap();
        l.record_started("c-1", Timestamp(100), Timestamp(10))
            .unwrap();
        l.record_started("c-2", Timestamp(100), Timestamp(20))
            .unwrap();
        drop(l);
        // A second start of c-1 (what at-most-once forbids) stays visible,
        // and a torn line at the end is skipped.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&encode_line(&Entry::Started {
            id: "c-1".into(),
            expires_at: Timestamp(100),
            at: Timestamp(30),
        }))
        .unwrap();
        f.write_all(b"0000 {\"entry\"").unwrap();
        let got: Vec<(String, i64)> = read_started(&path)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.at.as_millis()))
            .collect();
        assert_eq!(
            got,
            vec![("c-1".into(), 10), ("c-2".into(), 20), ("c-1".into(), 30)]
        );
        f.write_all(b"\n").unwrap();
        f.write_all(&encode_line(&Entry::Started {
            id: "c-3".into(),
            expires_at: Timestamp(100),
            at: Timestamp(40),
        }))
        .unwrap();
        assert!(matches!(
            read_started(&path),
            Err(LedgerError::Corrupt { line: 4, .. })
        ));
    }

    #[test]
    fn line_roundtrip_and_crc() {
        let e = Entry::Started {
            id: "c-1".into(),
            expires_at: Timestamp(5),
            at: Timestamp(1),
        };
        let line = String::from_utf8(encode_line(&e)).unwrap();
        assert!(decode_line(line.trim_end()).is_ok());
        let bad = line.replace("c-1", "c-2");
        assert_eq!(decode_line(bad.trim_end()).unwrap_err(), "crc mismatch");
    }
}
