//! Integration tests of the command executor and its ledger: at most once per
//! id (also across restarts and interrupted runs), refusals with reasons.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use edge_node::commands::{
    Actuator, ActuatorError, CommandExecutor, CommandLedger, DeviceCatalog, INTERRUPTED,
};
use schemas::command::{Command, CommandAction, CommandStatus};
use schemas::device::{FieldSpec, FieldValue};
use schemas::ids::{DeviceId, SiteId};
use schemas::registers::{RegisterFunction, RegisterSpec, RegisterType};
use schemas::time::Timestamp;
use schemas::version::SchemaVersion;

const NOW: Timestamp = Timestamp(1_700_000_000_000);

struct Devices;

fn spec(name: &str, function: RegisterFunction) -> RegisterSpec {
    RegisterSpec {
        name: name.into(),
        unit_id: 1,
        function,
        address: 0,
        data_type: if function == RegisterFunction::Coil {
            RegisterType::Bool
        } else {
            RegisterType::U16
        },
        word_order: Default::default(),
        byte_order: Default::default(),
        scale: 1.0,
        offset: 0.0,
        unit: Default::default(),
        poll_ms: 1000,
    }
}

impl DeviceCatalog for Devices {
    fn has_device(&self, d: &DeviceId) -> bool {
        d.as_str() == "pump-1"
    }
    fn register(&self, d: &DeviceId, name: &str) -> Option<RegisterSpec> {
        if d.as_str() != "pump-1" {
            return None;
        }
        match name {
            "run" => Some(spec("run", RegisterFunction::Coil)),
            "speed" => Some(spec("speed", RegisterFunction::Holding)),
            "temperature" => Some(spec("temperature", RegisterFunction::Input)),
            _ => None,
        }
    }
}

/// Counts calls; optionally fails, or never completes.
#[derive(Default)]
struct Counting {
    calls: AtomicUsize,
    log: Mutex<Vec<String>>,
    fail: bool,
    hang: bool,
}

impl Counting {
    async fn act(&self, what: String) -> Result<(), ActuatorError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(what);
        if self.hang {
            std::future::pending::<()>().await;
        }
        if self.fail {
            return Err(ActuatorError("modbus exception: illegal data value".into()));
        }
        Ok(())
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Actuator for Counting {
    async fn write_coil(
        &self,
        d: &DeviceId,
        r: &RegisterSpec,
        v: bool,
    ) -> Result<(), ActuatorError> {
        self.act(format!("coil {d} {} {v}", r.name)).await
    }
    async fn write_register(
        &self,
        d: &DeviceId,
        r: &RegisterSpec,
        v: f64,
    ) -> Result<(), ActuatorError> {
        self.act(format!("reg {d} {} {v}", r.name)).await
    }
    async fn set_desired(
        &self,
        d: &DeviceId,
        f: &FieldSpec,
        v: &FieldValue,
    ) -> Result<(), ActuatorError> {
        self.act(format!("desired {d} {} {v:?}", f.name)).await
    }
}

fn cmd(id: &str) -> Command {
    Command {
        schema_version: SchemaVersion::default(),
        id: id.into(),
        target: DeviceId::new("pump-1").unwrap(),
        action: CommandAction::WriteCoil {
            register: "run".into(),
            value: true,
        },
        issued_by: "operator:site-1:bob".into(),
        issued_at: Timestamp(NOW.0 - 1000),
        expires_at: Timestamp(NOW.0 + 60_000),
    }
}

fn executor(path: &std::path::Path) -> (CommandExecutor, Vec<schemas::command::CommandResult>) {
    let (ledger, interrupted) = CommandLedger::open(path, NOW, "edge-a").unwrap();
    (
        CommandExecutor::new(ledger, SiteId::new("site-1").unwrap(), "edge-a".into()),
        interrupted,
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn delivered_twice_executes_once_also_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let act = Counting::default();
    let r = rt();
    let (mut ex, interrupted) = executor(&path);
    assert!(interrupted.is_empty());
    let first = r.block_on(ex.handle(&cmd("c-1"), NOW, &Devices, &act));
    assert_eq!(first.status, CommandStatus::Succeeded, "{first:?}");
    let again = r.block_on(ex.handle(&cmd("c-1"), Timestamp(NOW.0 + 5), &Devices, &act));
    assert_eq!(again, first, "duplicate returns the stored result");
    assert_eq!(act.calls(), 1);

    // Restart: the ledger remembers.
    drop(ex);
    let (mut ex, interrupted) = executor(&path);
    assert!(interrupted.is_empty());
    let after = r.block_on(ex.handle(&cmd("c-1"), Timestamp(NOW.0 + 10), &Devices, &act));
    assert_eq!(after, first);
    assert_eq!(act.calls(), 1);
    // A different id does run.
    let other = r.block_on(ex.handle(&cmd("c-2"), NOW, &Devices, &act));
    assert_eq!(other.status, CommandStatus::Succeeded);
    assert_eq!(act.calls(), 2);
}

#[test]
fn interrupted_command_is_reported_failed_and_never_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let hanging = Counting {
        hang: true,
        ..Counting::default()
    };
    let r = rt();
    let (mut ex, _) = executor(&path);
    // The node dies while the device write is in flight: the future is
    // dropped after "started" was recorded and before "finished".
    r.block_on(async {
        let c = cmd("c-9");
        let run = ex.handle(&c, NOW, &Devices, &hanging);
        tokio::select! {
            _ = run => panic!("a hanging actuator cannot finish"),
            _ = async {
                while hanging.calls() == 0 {
                    tokio::task::yield_now().await;
                }
            } => {}
        }
    });
    assert_eq!(hanging.calls(), 1);
    drop(ex);

    let (mut ex, interrupted) = executor(&path);
    assert_eq!(interrupted.len(), 1);
    assert_eq!(interrupted[0].command_id, "c-9");
    assert_eq!(interrupted[0].status, CommandStatus::Failed);
    assert_eq!(interrupted[0].reason, INTERRUPTED);
    let act = Counting::default();
    let redelivered = r.block_on(ex.handle(&cmd("c-9"), NOW, &Devices, &act));
    assert_eq!(redelivered, interrupted[0]);
    assert_eq!(act.calls(), 0, "never executed twice");
    // And the interrupted verdict itself survives another restart.
    drop(ex);
    let (_, interrupted) = executor(&path);
    assert!(interrupted.is_empty());
}

#[test]
fn expired_command_is_refused_with_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ex, _) = executor(&dir.path().join("l"));
    let act = Counting::default();
    let mut c = cmd("c-3");
    c.expires_at = Timestamp(NOW.0 - 1);
    let res = rt().block_on(ex.handle(&c, NOW, &Devices, &act));
    assert_eq!(res.status, CommandStatus::Expired);
    assert!(
        res.reason.contains("expired at 2023-11-14T22:13:19.999Z"),
        "{}",
        res.reason
    );
    assert_eq!(act.calls(), 0);
}

#[test]
fn unauthorised_invalid_and_unknown_commands_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ex, _) = executor(&dir.path().join("l"));
    let act = Counting::default();
    let r = rt();
    let mut run = |c: Command| r.block_on(ex.handle(&c, NOW, &Devices, &act));

    let mut c = cmd("u-1");
    c.issued_by = "operator:site-2:eve".into();
    let res = run(c);
    assert_eq!(res.status, CommandStatus::Refused);
    assert!(res.reason.contains("site-2"), "{}", res.reason);

    let mut c = cmd("u-2");
    c.issued_by = "guest".into();
    assert!(run(c).reason.contains("may not issue commands"));

    for ok in ["hub", "admin:alice"] {
        let mut c = cmd(&format!("ok-{}", ok.len()));
        c.issued_by = ok.into();
        assert_eq!(run(c).status, CommandStatus::Succeeded, "{ok}");
    }

    let mut c = cmd("bad id with spaces");
    c.issued_by = "hub".into();
    let res = run(c);
    assert_eq!(res.status, CommandStatus::Refused);
    assert!(res.reason.contains("may contain only"), "{}", res.reason);

    let mut c = cmd("v-1");
    c.expires_at = c.issued_at;
    assert!(run(c).reason.contains("before it was issued"));

    let mut c = cmd("d-1");
    c.target = DeviceId::new("pump-9").unwrap();
    assert!(run(c).reason.contains("unknown device pump-9"));

    let mut c = cmd("d-2");
    c.action = CommandAction::WriteCoil {
        register: "nope".into(),
        value: true,
    };
    assert!(run(c).reason.contains("no register \"nope\""));

    let mut c = cmd("d-3");
    c.action = CommandAction::WriteRegister {
        register: "temperature".into(),
        value: 3.0,
    };
    assert!(run(c).reason.contains("not a writable Holding"));

    let mut c = cmd("d-4");
    c.action = CommandAction::SetDesired {
        field: "setpoint".into(),
        value: FieldValue::Number(5000.0),
    };
    assert!(run(c).reason.contains("above the maximum"));

    let mut c = cmd("d-5");
    c.action = CommandAction::SetDesired {
        field: "colour".into(),
        value: FieldValue::Text("red".into()),
    };
    assert!(run(c).reason.contains("unknown desired field"));

    let mut c = cmd("w-1");
    c.action = CommandAction::WriteRegister {
        register: "speed".into(),
        value: 1200.0,
    };
    assert_eq!(run(c).status, CommandStatus::Succeeded);
    assert_eq!(act.calls(), 3, "only the two principals' and w-1 ran");
    assert_eq!(act.log.lock().unwrap()[2], "reg pump-1 speed 1200");
}

#[test]
fn refusals_and_failures_are_final() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let failing = Counting {
        fail: true,
        ..Counting::default()
    };
    let r = rt();
    let (mut ex, _) = executor(&path);
    let res = r.block_on(ex.handle(&cmd("f-1"), NOW, &Devices, &failing));
    assert_eq!(res.status, CommandStatus::Failed);
    assert!(res.reason.contains("illegal data value"));
    // A redelivery does not retry: at most once.
    let again = r.block_on(ex.handle(&cmd("f-1"), NOW, &Devices, &failing));
    assert_eq!(again, res);
    assert_eq!(failing.calls(), 1);
    // An expired refusal stays the answer for that id even before expiry
    // would have been reached by a clock that went backwards.
    let mut c = cmd("e-1");
    c.expires_at = Timestamp(NOW.0 - 1);
    let refused = r.block_on(ex.handle(&c, NOW, &Devices, &failing));
    let ok = Counting::default();
    let later = r.block_on(ex.handle(&c, Timestamp(NOW.0 - 10_000), &Devices, &ok));
    assert_eq!(later, refused);
    assert_eq!(ok.calls(), 0);
}

#[test]
fn torn_ledger_tail_is_dropped_and_mid_file_corruption_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let act = Counting::default();
    let r = rt();
    let (mut ex, _) = executor(&path);
    r.block_on(ex.handle(&cmd("t-1"), NOW, &Devices, &act));
    r.block_on(ex.handle(&cmd("t-2"), NOW, &Devices, &act));
    drop(ex);
    let good = std::fs::read(&path).unwrap();
    let mut torn = good.clone();
    torn.extend_from_slice(b"0badc0de {\"entry\":\"sta");
    std::fs::write(&path, &torn).unwrap();
    let (mut ex, interrupted) = executor(&path);
    assert!(interrupted.is_empty());
    assert_eq!(std::fs::read(&path).unwrap(), good, "torn tail cut");
    let res = r.block_on(ex.handle(&cmd("t-2"), NOW, &Devices, &act));
    assert_eq!(res.status, CommandStatus::Succeeded);
    assert_eq!(act.calls(), 2);
    drop(ex);

    // Corrupt a byte in the first line: later lines are good, so this is
    // not a torn tail and the ledger refuses to guess.
    let mut bad = good.clone();
    bad[12] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let e = CommandLedger::open(&path, NOW, "edge-a").unwrap_err();
    assert!(e.to_string().contains("line 1 is corrupt"), "{e}");
}

#[test]
fn compaction_forgets_only_long_expired_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let act = Counting::default();
    let r = rt();
    let (mut ex, _) = executor(&path);
    let mut old = cmd("old");
    old.expires_at = Timestamp(NOW.0 + 10);
    r.block_on(ex.handle(&old, NOW, &Devices, &act));
    r.block_on(ex.handle(&cmd("new"), NOW, &Devices, &act));
    let before = std::fs::metadata(&path).unwrap().len();
    let n = ex.ledger_mut().compact(Timestamp(NOW.0 + 1000)).unwrap();
    assert_eq!(n, 1);
    assert!(std::fs::metadata(&path).unwrap().len() < before);
    drop(ex);
    let (mut ex, _) = executor(&path);
    let again = r.block_on(ex.handle(&cmd("new"), NOW, &Devices, &act));
    assert_eq!(again.status, CommandStatus::Succeeded);
    assert_eq!(act.calls(), 2, "the kept id is still a duplicate");
    // The forgotten one, redelivered after its expiry, is refused, not run.
    let res = r.block_on(ex.handle(&old, Timestamp(NOW.0 + 2000), &Devices, &act));
    assert_eq!(res.status, CommandStatus::Expired);
    assert_eq!(act.calls(), 2);
}

// ------------------------------------------------------------ kill -9 test

const CHILD_ENV: &str = "FIELDSYNC_COMMANDS_CHILD_DIR";
const N_COMMANDS: usize = 800;

/// Records each effect as a fsynced line, like a device that remembers.
struct FileActuator {
    file: Mutex<std::fs::File>,
}

impl FileActuator {
    fn open(path: &std::path::Path) -> FileActuator {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        FileActuator {
            file: Mutex::new(file),
        }
    }
    fn effect(&self, what: String) -> Result<(), ActuatorError> {
        use std::io::Write;
        let mut f = self.file.lock().unwrap();
        f.write_all(format!("{what}\n").as_bytes())
            .and_then(|()| f.sync_data())
            .map_err(|e| ActuatorError(e.to_string()))
    }
}

impl Actuator for FileActuator {
    async fn write_coil(
        &self,
        _: &DeviceId,
        _: &RegisterSpec,
        v: bool,
    ) -> Result<(), ActuatorError> {
        self.effect(format!("coil {v}"))
    }
    async fn write_register(
        &self,
        _: &DeviceId,
        _: &RegisterSpec,
        v: f64,
    ) -> Result<(), ActuatorError> {
        // The value carries the command number.
        self.effect(format!("c-{v}"))
    }
    async fn set_desired(
        &self,
        _: &DeviceId,
        _: &FieldSpec,
        _: &FieldValue,
    ) -> Result<(), ActuatorError> {
        self.effect("desired".into())
    }
}

fn numbered(k: usize) -> Command {
    let mut c = cmd(&format!("c-{k}"));
    c.action = CommandAction::WriteRegister {
        register: "speed".into(),
        value: k as f64,
    };
    c
}

/// Deliver every command (each twice), printing `DONE k` as results come.
fn commands_child(dir: &std::path::Path) {
    let (mut ex, _) = executor(&dir.join("ledger"));
    let act = FileActuator::open(&dir.join("effects"));
    let r = rt();
    let mut out = std::io::stdout();
    for k in 0..N_COMMANDS {
        for c in [numbered(k), numbered(k.saturating_sub(1))] {
            let res = r.block_on(ex.handle(&c, NOW, &Devices, &act));
            use std::io::Write;
            writeln!(out, "DONE {} {:?}", res.command_id, res.status).unwrap();
            out.flush().unwrap();
        }
    }
}

fn run_commands_child(dir: &std::path::Path, min_done: usize) -> usize {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "kill9_commands_run_at_most_once",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("DONE ") && tx.send(()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut done = 0;
    while done < min_done {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(()) => done += 1,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child reported only {done} results: {e}");
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    done + rx.try_iter().count()
}

#[test]
fn kill9_commands_run_at_most_once() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        commands_child(std::path::Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for round in 1..=3 {
        run_commands_child(dir.path(), 150 * round);
    }
    // Final restart in process: redeliver everything with a counting
    // actuator; only ids never started may run now.
    let (mut ex, interrupted) = executor(&dir.path().join("ledger"));
    let effects = std::fs::read_to_string(dir.path().join("effects")).unwrap();
    let mut effect_count = std::collections::HashMap::<String, usize>::new();
    for line in effects.lines() {
        *effect_count.entry(line.to_string()).or_default() += 1;
    }
    for (id, n) in &effect_count {
        assert_eq!(*n, 1, "{id} executed {n} times before the final restart");
    }
    assert!(effect_count.len() >= 150, "children executed commands");
    let act = Counting::default();
    let r = rt();
    let mut interrupted_seen = 0;
    for k in 0..N_COMMANDS {
        let c = numbered(k);
        let before = act.calls();
        let res = r.block_on(ex.handle(&c, NOW, &Devices, &act));
        let ran_now = act.calls() > before;
        let ran_before = effect_count.contains_key(&c.id);
        assert!(!(ran_now && ran_before), "{} executed twice", c.id);
        if res.reason == INTERRUPTED {
            interrupted_seen += 1;
            assert!(!ran_now, "an interrupted command is never rerun");
        } else {
            assert_eq!(res.status, CommandStatus::Succeeded, "{res:?}");
            assert!(ran_now || ran_before, "{} never executed", c.id);
        }
    }
    eprintln!(
        "{} executed by children, {interrupted_seen} interrupted, {} run at the end",
        effect_count.len(),
        act.calls()
    );
    // Interrupted commands found at the final open are among those seen.
    assert!(interrupted.len() <= interrupted_seen);
}
