//! Exported JSON Schemas accept real payloads and refuse bad ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::{Value, json};

fn validator(dir: &Path, name: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(dir.join(format!("{name}.schema.json"))).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn sample_payloads() -> Vec<(&'static str, Value)> {
    use schemas::command::*;
    use schemas::device::*;
    use schemas::ids::*;
    use schemas::metrics::*;
    use schemas::time::Timestamp;
    let dev = DeviceId::new("pump-7").unwrap();
    let cmd = Command {
        schema_version: Default::default(),
        id: "cmd-1".into(),
        target: dev.clone(),
        action: CommandAction::SetDesired {
            field: "setpoint".into(),
            value: FieldValue::Number(4.5),
        },
        issued_by: "admin:alice".into(),
        issued_at: Timestamp(1),
        expires_at: Timestamp(2),
    };
    let rollup = Rollup::of_sample(
        &Sample {
            schema_version: Default::default(),
            device: dev,
            metric: "pressure".into(),
            ts: Timestamp(1_700_000_000_000),
            value: 2.5,
            unit: Unit::Bar,
        },
        60_000,
    );
    let edge =
        schemas::config::EdgeConfig::parse(Path::new("x.toml"), "[node]\ntenant = \"acme\"\n")
            .unwrap();
    vec![
        ("command", serde_json::to_value(&cmd).unwrap()),
        ("rollup", serde_json::to_value(&rollup).unwrap()),
        (
            "reported-state",
            serde_json::to_value(ReportedState::default()).unwrap(),
        ),
        ("edge-config", serde_json::to_value(&edge).unwrap()),
        (
            "hub-config",
            serde_json::to_value(schemas::config::HubConfig::default()).unwrap(),
        ),
        ("doc-id", json!("t/acme/s/site-1/tel/pump-7/2026-11-23")),
    ]
}

#[test]
fn export_writes_one_schema_per_contract_and_they_validate_samples() {
    let dir = tempfile::tempdir().unwrap();
    let files = schemas::export::write_all(dir.path()).unwrap();
    assert_eq!(files.len(), schemas::export::all_schemas().len());
    for (name, payload) in sample_payloads() {
        let v = validator(dir.path(), name);
        let errors: Vec<String> = v.iter_errors(&payload).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{name}: {errors:?}\n{payload:#}");
    }
}

#[test]
fn schemas_refuse_bad_payloads() {
    let dir = tempfile::tempdir().unwrap();
    schemas::export::write_all(dir.path()).unwrap();
    let cmd = validator(dir.path(), "command");
    let mut bad = sample_payloads().remove(0).1;
    bad.as_object_mut().unwrap().remove("expires_at");
    assert!(!cmd.is_valid(&bad), "missing expires_at accepted");
    let id = validator(dir.path(), "doc-id");
    assert!(!id.is_valid(&json!("t/ACME/s/x/site")));
    assert!(!id.is_valid(&json!("t/acme/s/x/tel/d/2026-1-1")));
    let rollup = validator(dir.path(), "rollup");
    let mut r = sample_payloads().remove(1).1;
    r["count"] = json!("three");
    assert!(!rollup.is_valid(&r));
}

#[test]
fn export_command_writes_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fieldsync-schemas"))
        .args(["export", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("edge-config.schema.json").exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 19 schemas"));
}
