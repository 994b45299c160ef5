//! Integration tests of the audit log: verification of an intact log, detection of each kind
//! of tampering with the right seq, torn-tail repair, locking, and `cloud-hub audit verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cloud_hub::audit::{
    self, AuditEntry, AuditError, AuditLog, AuditRecord, Finding, entry_hash, head_path,
};
use ed25519_dalek::{Signer as _, SigningKey};
use schemas::time::Timestamp;

const T0: Timestamp = Timestamp(1_790_000_000_000);

/// The tests here run one at a time. A test that spawns `cloud-hub` forks this process;
/// until the child execs it holds duplicates of every open file, including another test's
/// locked audit log, so a test that drops and at once reopens its log would see it locked.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn hub() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn rec(i: u64) -> AuditRecord {
    AuditRecord {
        actor: format!("cli:user{i}"),
        action: "node.revoke".into(),
        target: format!("node-{i}"),
        reason: format!("reason {i}"),
        details: format!("{{\"n\":{i}}}"),
    }
}

/// A log with `n` entries in a fresh temp dir.
fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let (mut log, outcome) = AuditLog::open(&path, hub(), T0).unwrap();
    assert_eq!(outcome.entries, 0);
    for i in 1..=n {
        let e = log.append(&rec(i), T0.saturating_add_ms(i as i64)).unwrap();
        assert_eq!(e.seq, i);
    }
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

fn finding(path: &Path) -> Option<Finding> {
    audit::verify(path, &hub().verifying_key()).unwrap().finding
}

fn entry(line: &str) -> AuditEntry {
    serde_json::from_str(line).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn record_of(e: &AuditEntry) -> AuditRecord {
    AuditRecord {
        actor: e.actor.clone(),
        action: e.action.clone(),
        target: e.target.clone(),
        reason: e.reason.clone(),
        details: e.details.clone(),
    }
}

fn unhex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

#[test]
fn untouched_log_verifies_and_reopen_continues_the_chain() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let report = audit::verify(&path, &hub().verifying_key()).unwrap();
    assert_eq!(report.finding, None);
    assert_eq!(report.verified, 5);
    let (mut log, outcome) = AuditLog::open(&path, hub(), T0).unwrap();
    assert_eq!(outcome.entries, 5);
    assert_eq!(outcome.repaired, None);
    assert_eq!(log.append(&rec(6), T0).unwrap().seq, 6);
    drop(log);
    let report = audit::verify(&path, &hub().verifying_key()).unwrap();
    assert_eq!((report.verified, report.finding), (6, None));
    // Entries chain: each prev_hash is the previous hash.
    let ls = lines(&path);
    for w in ls.windows(2) {
        assert_eq!(entry(&w[1]).prev_hash, entry(&w[0]).hash);
    }
    // And a missing log is an empty, valid one.
    let report = audit::verify(&path.with_file_name("nope.log"), &hub().verifying_key()).unwrap();
    assert_eq!((report.verified, report.finding), (0, None));
}

#[test]
fn wrong_hub_key_fails_at_the_first_entry() {
    let _serial = serial();
    let (_d, path) = log_with(3);
    let other = SigningKey::from_bytes(&[2; 32]).verifying_key();
    let f = audit::verify(&path, &other).unwrap().finding.unwrap();
    assert!(matches!(f, Finding::BadSignature { seq: 1, .. }), "{f:?}");
}

#[test]
fn edited_field_is_detected_at_its_seq() {
    let _serial = serial();
    for field in ["actor", "action", "target", "reason", "details", "time"] {
        let (_d, path) = log_with(5);
        let mut ls = lines(&path);
        let mut v: serde_json::Value = serde_json::from_str(&ls[2]).unwrap();
        v[field] = if field == "time" {
            serde_json::json!(T0.0 + 999)
        } else {
            "edited".into()
        };
        ls[2] = v.to_string();
        write_lines(&path, &ls);
        let f = finding(&path).unwrap();
        assert!(
            matches!(f, Finding::HashMismatch { seq: 3, .. }),
            "{field}: {f:?}"
        );
        assert_eq!(f.seq(), 3);
        assert!(f.is_tampering());
    }
}

#[test]
fn edited_and_rehashed_entry_fails_its_signature() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    let mut e = entry(&ls[2]);
    e.reason = "nothing to see here".into();
    let h = entry_hash(e.seq, e.time, &record_of(&e), &unhex32(&e.prev_hash));
    e.hash = hex(&h);
    ls[2] = serde_json::to_string(&e).unwrap();
    write_lines(&path, &ls);
    let f = finding(&path).unwrap();
    assert!(matches!(f, Finding::BadSignature { seq: 3, .. }), "{f:?}");
}

#[test]
fn deleted_entry_is_detected_at_its_seq() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls.remove(2);
    write_lines(&path, &ls);
    let f = finding(&path).unwrap();
    assert!(
        matches!(
            f,
            Finding::SeqBreak {
                seq: 3,
                found: 4,
                ..
            }
        ),
        "{f:?}"
    );
    assert!(f.to_string().contains("entry 3"), "{f}");
}

#[test]
fn deleted_entry_with_renumbering_breaks_the_chain() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls.remove(2);
    let mut e = entry(&ls[2]);
    e.seq = 3;
    ls[2] = serde_json::to_string(&e).unwrap();
    write_lines(&path, &ls);
    let f = finding(&path).unwrap();
    assert!(matches!(f, Finding::ChainBreak { seq: 3, .. }), "{f:?}");
}

#[test]
fn swapped_entries_are_detected_at_the_first() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls.swap(2, 3);
    write_lines(&path, &ls);
    let f = finding(&path).unwrap();
    assert!(
        matches!(
            f,
            Finding::SeqBreak {
                seq: 3,
                found: 4,
                ..
            }
        ),
        "{f:?}"
    );
}

#[test]
fn inserted_forged_entry_is_detected() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    // A well-formed entry 3 chained to entry 2, signed with another key.
    let prev = entry(&ls[1]);
    let forger = SigningKey::from_bytes(&[9; 32]);
    let r = rec(99);
    let prev_hash = unhex32(&prev.hash);
    let h = entry_hash(3, T0, &r, &prev_hash);
    let mut msg = b"fieldsync audit entry v1\0".to_vec();
    msg.extend_from_slice(&h);
    let forged = AuditEntry {
        seq: 3,
        time: T0,
        actor: r.actor,
        action: r.action,
        target: r.target,
        reason: r.reason,
        details: r.details,
        prev_hash: prev.hash.clone(),
        hash: hex(&h),
        sig: hex(&forger.sign(&msg).to_bytes()),
    };
    ls.insert(2, serde_json::to_string(&forged).unwrap());
    write_lines(&path, &ls);
    let f = finding(&path).unwrap();
    assert!(matches!(f, Finding::BadSignature { seq: 3, .. }), "{f:?}");

    // A copy of a genuine entry inserted elsewhere is caught too.
    let (_d2, path2) = log_with(5);
    let mut ls = lines(&path2);
    let dup = ls[0].clone();
    ls.insert(3, dup);
    write_lines(&path2, &ls);
    let f = finding(&path2).unwrap();
    assert!(
        matches!(
            f,
            Finding::SeqBreak {
                seq: 4,
                found: 1,
                ..
            }
        ),
        "{f:?}"
    );
}

#[test]
fn garbage_line_is_malformed_at_its_seq() {
    let _serial = serial();
    let (_d, path) = log_with(4);
    let mut ls = lines(&path);
    ls[1] = "{not json".into();
    write_lines(&path, &ls);
    let f = finding(&path).unwrap();
    assert!(matches!(f, Finding::Malformed { seq: 2, .. }), "{f:?}");
}

#[test]
fn removed_tail_entries_are_caught_by_the_head() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let mut ls = lines(&path);
    ls.truncate(3);
    write_lines(&path, &ls);
    let f = finding(&path).unwrap();
    assert_eq!(
        f,
        Finding::Truncated {
            head_seq: 5,
            last_seq: 3,
            first_missing: 4
        }
    );
    assert_eq!(f.seq(), 4);
    // Deleting the head too is noticed.
    std::fs::remove_file(head_path(&path)).unwrap();
    assert!(matches!(
        finding(&path),
        Some(Finding::HeadMalformed { .. })
    ));
}

#[test]
fn torn_tail_is_reported_distinctly_and_repaired_on_open() {
    let _serial = serial();
    let (_d, path) = log_with(5);
    let full = std::fs::read(&path).unwrap();
    let ls = lines(&path);
    // Cut the last line in the middle, as a kill -9 during the write would.
    let cut = full.len() - ls[4].len() / 2 - 1;
    std::fs::write(&path, &full[..cut]).unwrap();
    let torn_bytes = (cut - (full.len() - ls[4].len() - 1)) as u64;
    let f = finding(&path).unwrap();
    assert_eq!(
        f,
        Finding::TornTail {
            after_seq: 4,
            bytes: torn_bytes
        }
    );
    assert!(!f.is_tampering());
    assert_eq!(f.seq(), 5);
    assert!(f.to_string().contains("not tampering"), "{f}");

    let (mut log, outcome) = AuditLog::open(&path, hub(), T0).unwrap();
    let (repaired, saved) = outcome.repaired.unwrap();
    assert_eq!(repaired, f);
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        full[cut - torn_bytes as usize..cut]
    );
    // The repair is itself on the record, as entry 5.
    assert_eq!(outcome.entries, 5);
    assert_eq!(log.append(&rec(6), T0).unwrap().seq, 6);
    drop(log);
    let report = audit::verify(&path, &hub().verifying_key()).unwrap();
    assert_eq!((report.verified, report.finding), (6, None));
    let e5 = entry(&lines(&path)[4]);
    assert_eq!(e5.action, "audit.repair");
    assert!(
        e5.details.contains(&format!("removed {torn_bytes} bytes")),
        "{}",
        e5.details
    );
}

#[test]
fn open_refuses_to_extend_a_tampered_log() {
    let _serial = serial();
    let (_d, path) = log_with(3);
    let mut ls = lines(&path);
    ls.swap(0, 1);
    write_lines(&path, &ls);
    let before = std::fs::read(&path).unwrap();
    let err = AuditLog::open(&path, hub(), T0).unwrap_err();
    assert!(
        matches!(
            &err,
            AuditError::Tampered {
                finding: Finding::SeqBreak { seq: 1, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
}

#[test]
fn second_writer_is_refused_while_the_first_holds_the_log() {
    let _serial = serial();
    let (_d, path) = log_with(1);
    let (log, _) = AuditLog::open(&path, hub(), T0).unwrap();
    let err = AuditLog::open(&path, hub(), T0).unwrap_err();
    assert!(matches!(err, AuditError::Locked { .. }), "{err:?}");
    drop(log);
    assert!(AuditLog::open(&path, hub(), T0).is_ok());
}

// ---------------------------------------------------------------- CLI

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("FIELDSYNC_HUB_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn cli_audit_verify_exit_codes() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = cli(dir, &["init"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hub_id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    for _ in 0..3 {
        assert!(
            cli(dir, &["token", "create", "--tenant", "a", "--site", "b"])
                .status
                .success()
        );
    }
    let o = cli(dir, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok: 4 entries"));
    // An auditor with only the public id gets the same answer.
    let o = cli(dir, &["audit", "verify", "--hub-id", &hub_id]);
    assert_eq!(o.status.code(), Some(0));

    let path = dir.join("audit.log");
    let pristine = std::fs::read(&path).unwrap();

    // Tampered: exit 1 naming the seq.
    let mut ls = lines(&path);
    ls[2] = ls[2].replace("\"token.create\"", "\"token.revoke\"");
    write_lines(&path, &ls);
    let o = cli(dir, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("TAMPERED: first bad entry 3"), "{out}");
    // And a mutating command refuses to run on it.
    let o = cli(dir, &["token", "create", "--tenant", "a", "--site", "b"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to append"));
    assert!(o.stdout.is_empty(), "no token may be issued unaudited");

    // Torn tail: exit 3, then repaired by the next change.
    std::fs::write(&path, &pristine[..pristine.len() - 10]).unwrap();
    let o = cli(dir, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stdout).contains("TORN TAIL: first bad entry 4"));
    let o = cli(dir, &["token", "create", "--tenant", "a", "--site", "b"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("repaired the audit log"));
    let o = cli(dir, &["audit", "verify"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok: 5 entries"));
}

#[test]
fn open_refuses_a_forged_last_entry_and_a_wrong_key() {
    let _serial = serial();
    let (_d, path) = log_with(3);
    let mut ls = lines(&path);
    let prev = entry(&ls[2]);
    let forger = SigningKey::from_bytes(&[9; 32]);
    let r = rec(4);
    let h = entry_hash(4, T0, &r, &unhex32(&prev.hash));
    let mut msg = b"fieldsync audit entry v1\0".to_vec();
    msg.extend_from_slice(&h);
    let forged = AuditEntry {
        seq: 4,
        time: T0,
        actor: r.actor,
        action: r.action,
        target: r.target,
        reason: r.reason,
        details: r.details,
        prev_hash: prev.hash.clone(),
        hash: hex(&h),
        sig: hex(&forger.sign(&msg).to_bytes()),
    };
    ls.push(serde_json::to_string(&forged).unwrap());
    write_lines(&path, &ls);
    let err = AuditLog::open(&path, hub(), T0).unwrap_err();
    assert!(
        matches!(
            &err,
            AuditError::Tampered {
                finding: Finding::BadSignature { seq: 4, .. },
                ..
            }
        ),
        "{err:?}"
    );
    // An intact log opened with another hub's key is refused too.
    let (_d2, path2) = log_with(2);
    let err = AuditLog::open(&path2, forger, T0).unwrap_err();
    assert!(matches!(&err, AuditError::Tampered { .. }), "{err:?}");
}

/// A crash can stop an append at any byte of its line. For cuts across the line, verify must
/// report a torn tail (never tampering), and open must repair it with nothing lost.
#[test]
fn a_crash_at_every_byte_of_the_last_line_is_a_torn_tail_and_repairs() {
    let _serial = serial();
    let (_d, path) = log_with(3);
    let full = std::fs::read(&path).unwrap();
    let head = std::fs::read(head_path(&path)).unwrap();
    let last_len = lines(&path)[2].len() + 1;
    let start = full.len() - last_len;
    // The head of a crashed append still names entry 2: it is written after the line.
    let (_d2, two) = log_with(2);
    let head_before = std::fs::read(head_path(&two)).unwrap();
    // Every byte would cost an fsync-ing repair each (~10 s); 40 cuts spread over the line,
    // first and last byte included, keep the test fast.
    let stride = (last_len / 40).max(1);
    let cuts = (start + 1..full.len())
        .step_by(stride)
        .chain([full.len() - 1]);
    for cut in cuts {
        std::fs::write(&path, &full[..cut]).unwrap();
        std::fs::write(head_path(&path), &head_before).unwrap();
        let f = finding(&path).unwrap();
        assert_eq!(
            f,
            Finding::TornTail {
                after_seq: 2,
                bytes: (cut - start) as u64
            },
            "cut at {cut}"
        );
        let (log, outcome) = AuditLog::open(&path, hub(), T0).unwrap();
        assert_eq!(outcome.entries, 3, "cut at {cut}");
        drop(log);
        assert_eq!(finding(&path), None, "cut at {cut}");
        assert_eq!(&std::fs::read(&path).unwrap()[..start], &full[..start]);
    }
    // The whole line written but the head not yet: a valid log.
    std::fs::write(&path, &full).unwrap();
    std::fs::write(head_path(&path), &head_before).unwrap();
    assert_eq!(finding(&path), None);
    std::fs::write(head_path(&path), &head).unwrap();
    assert_eq!(finding(&path), None);
}

/// Real kill -9: run `cloud-hub token create` over and over, SIGKILL each run after a
/// pseudo-random delay, and check after every kill that the audit log is intact or only
/// torn (never "tampered"), and that every token a run printed (so its audit entry was
/// acknowledged) is in the log.
#[test]
fn kill_9_during_mutations_never_loses_an_acknowledged_entry() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(cli(dir, &["init"]).status.success());
    // Spread kills over about twice the time a run takes, so some runs finish.
    let t = std::time::Instant::now();
    assert!(
        cli(dir, &["token", "create", "--tenant", "a", "--site", "b"])
            .status
            .success()
    );
    let run_us = (t.elapsed().as_micros() as u64).max(1000);
    let bin = env!("CARGO_BIN_EXE_cloud-hub");
    let mut seed: u64 = 0x5eed_0001;
    let mut acknowledged = 0u32;
    let mut killed = 0u32;
    let mut torn = 0u32;
    for round in 0..40 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let delay = std::time::Duration::from_micros((seed >> 33) % (run_us * 2));
        let mut child = Command::new(bin)
            .arg("--data-dir")
            .arg(dir)
            .args(["token", "create", "--tenant", "a", "--site", "b"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Fault injection, not synchronisation: kill after `delay` unless it already exited.
        let start = std::time::Instant::now();
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::hint::spin_loop();
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        let out = child.wait_with_output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let report = audit::verify(&dir.join("audit.log"), &hub_of(dir)).unwrap();
        if let Some(f) = &report.finding {
            assert!(!f.is_tampering(), "round {round} (seed {seed:#x}): {f}");
            torn += 1;
        }
        if printed.starts_with("fsj1.") {
            acknowledged += 1;
            let nonce = cloud_hub::tokens::parse(&printed).unwrap().claims.nonce;
            let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
            assert!(
                log.contains(&format!("token:{nonce}")),
                "round {round}: printed token not in the audit log"
            );
        }
    }
    // Whatever happened, the next command repairs and the log verifies.
    assert!(
        cli(dir, &["token", "create", "--tenant", "a", "--site", "b"])
            .status
            .success()
    );
    let o = cli(dir, &["audit", "verify"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    eprintln!(
        "kill -9 rounds: {killed} killed, {acknowledged} acknowledged, {torn} torn tails seen"
    );
}

fn hub_of(dir: &Path) -> ed25519_dalek::VerifyingKey {
    cloud_hub::keys::load(&dir.join("hub.key"))
        .unwrap()
        .verifying_key()
}
