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

/// Every contract: a sample value survives a JSON round trip unchanged and
/// validates against its exported schema.
#[test]
fn every_contract_round_trips_and_validates() {
    use schemas::alarm::*;
    use schemas::command::*;
    use schemas::config::{EdgeConfig, HubConfig};
    use schemas::device::*;
    use schemas::identity::*;
    use schemas::ids::*;
    use schemas::ingest::*;
    use schemas::metrics::*;
    use schemas::policy::*;
    use schemas::registers::*;
    use schemas::time::Timestamp;

    let dir = tempfile::tempdir().unwrap();
    schemas::export::write_all(dir.path()).unwrap();
    let mut checked = std::collections::BTreeSet::new();

    fn check<T>(dir: &Path, name: &str, v: &T, checked: &mut std::collections::BTreeSet<String>)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_value(v).unwrap();
        let back: T = serde_json::from_value(json.clone())
            .unwrap_or_else(|e| panic!("{name}: {e}\n{json:#}"));
        assert_eq!(&back, v, "{name} changed in a round trip");
        let errors: Vec<String> = validator(dir, name)
            .iter_errors(&json)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}\n{json:#}");
        checked.insert(name.to_string());
    }

    let dev = DeviceId::new("pump-7").unwrap();
    let ts = Timestamp(1_800_000_000_000);
    let key = EndpointKey([7; 32]);
    let tenant = TenantId::new("acme").unwrap();
    let site = SiteId::new("site-1").unwrap();
    let sample = Sample {
        schema_version: Default::default(),
        device: dev.clone(),
        metric: "pressure".into(),
        ts,
        value: 2.5,
        unit: Unit::Bar,
    };
    let d = dir.path();
    check(
        d,
        "doc-id",
        &DocId::telemetry(&tenant, &site, &dev, ts.day()),
        &mut checked,
    );
    check(d, "sample", &sample, &mut checked);
    check(
        d,
        "rollup",
        &Rollup::of_sample(&sample, 60_000),
        &mut checked,
    );
    let spec = RegisterSpec {
        name: "temperature".into(),
        unit_id: 1,
        function: RegisterFunction::Input,
        address: 3,
        data_type: RegisterType::F32,
        word_order: WordOrder::LittleEndian,
        byte_order: ByteOrder::BigEndian,
        scale: 0.1,
        offset: -40.0,
        unit: Unit::Celsius,
        poll_ms: 500,
    };
    check(
        d,
        "register-map",
        &RegisterMap {
            registers: vec![spec],
        },
        &mut checked,
    );
    let mut desired = DesiredConfig::default();
    desired
        .fields
        .insert("setpoint".into(), FieldValue::Number(4.0));
    desired
        .fields
        .insert("label".into(), FieldValue::Text("north".into()));
    desired
        .fields
        .insert("enabled".into(), FieldValue::Bool(true));
    check(d, "desired-config", &desired, &mut checked);
    let mut reported = ReportedState::default();
    reported
        .values
        .insert("temperature".into(), Reading { value: 3.9, ts });
    reported.health = DeviceHealth {
        status: HealthStatus::Degraded,
        last_error: Some("timeout".into()),
        since: Some(ts),
        last_ok: Some(ts),
    };
    reported.loops.insert(
        "cooling".into(),
        LoopState {
            output: true,
            setpoint: Some(4.0),
            fail_safe: false,
            last_actuation: Some(ts),
            jitter_p99_us: Some(800),
        },
    );
    reported.software_version = Some("0.1.0".into());
    reported.owner = Some(key.to_string());
    check(d, "reported-state", &reported, &mut checked);
    for f in standard_fields() {
        check(d, "field-spec", &f, &mut checked);
    }
    for action in [
        CommandAction::WriteRegister {
            register: "speed".into(),
            value: 40.0,
        },
        CommandAction::WriteCoil {
            register: "run".into(),
            value: true,
        },
        CommandAction::SetDesired {
            field: "setpoint".into(),
            value: FieldValue::Number(3.0),
        },
    ] {
        let c = Command {
            schema_version: Default::default(),
            id: "c-1".into(),
            target: dev.clone(),
            action,
            issued_by: "admin:alice".into(),
            issued_at: ts,
            expires_at: ts.saturating_add_ms(60_000),
        };
        check(d, "command", &c, &mut checked);
    }
    let result = CommandResult {
        schema_version: Default::default(),
        command_id: "c-1".into(),
        status: CommandStatus::Refused,
        reason: "expired at ...".into(),
        executed_at: ts,
        executed_by: key.to_string(),
    };
    check(d, "command-result", &result, &mut checked);
    let rule = AlarmRule {
        name: "too-warm".into(),
        device: dev.clone(),
        metric: "temperature".into(),
        condition: Condition::Above,
        threshold: 8.0,
        hysteresis: 1.0,
        delay_ms: 60_000,
        severity: Severity::Critical,
    };
    check(d, "alarm-rule", &rule, &mut checked);
    let alarm = Alarm {
        schema_version: Default::default(),
        id: "too-warm:pump-7:1".into(),
        rule: "too-warm".into(),
        device: dev.clone(),
        metric: "temperature".into(),
        severity: Severity::Warning,
        raised_at: ts,
        value: 9.1,
        message: "temperature 9.1 above 8".into(),
        cleared_at: None,
        acked_by: Some("operator:site-1:bob".into()),
        acked_at: Some(ts),
    };
    check(d, "alarm", &alarm, &mut checked);
    check(
        d,
        "tenant-policy",
        &TenantPolicy::new(tenant.clone(), Region::new("eu").unwrap()),
        &mut checked,
    );
    let rec = IdentityRecord {
        schema_version: Default::default(),
        endpoint_id: key,
        tenant: Some(tenant.clone()),
        site: Some(site.clone()),
        role: Role::Edge,
        enrolled_at: ts,
        revoked_at: Some(ts),
        revoked_reason: Some("stolen".into()),
    };
    check(d, "identity-record", &rec, &mut checked);
    let claims = JoinTokenClaims {
        schema_version: Default::default(),
        nonce: "n-1".into(),
        tenant,
        site,
        role: Role::Edge,
        issued_at: ts,
        expires_at: ts.saturating_add_ms(3_600_000),
        issuer: key,
    };
    check(d, "join-token-claims", &claims, &mut checked);
    check(d, "edge-config", &EdgeConfig::default(), &mut checked);
    check(d, "hub-config", &HubConfig::default(), &mut checked);
    check(d, "ingest-section", &IngestSection::default(), &mut checked);
    let batch: IngestBatch = serde_json::from_value(
        json!({"samples": [{"metric": "temp", "value": 3.5, "ts": 1_800_000_000_000u64}]}),
    )
    .unwrap();
    check(d, "ingest-batch", &batch, &mut checked);
    let q = QuarantineEntry {
        id: 1,
        at: ts,
        source: IngestSource::Mqtt,
        origin: "site/pump-7".into(),
        device: Some(dev),
        field: Some("temperature".into()),
        reason: "out of range".into(),
        payload: "{\"temperature\": 999}".into(),
        payload_len: 20,
    };
    check(d, "quarantine-entry", &q, &mut checked);

    let all: std::collections::BTreeSet<String> = schemas::export::all_schemas()
        .into_iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(
        checked, all,
        "every exported contract has a round-trip case"
    );
}
