//! JSON Schema export: one schema per contract, so other systems can validate
//! payloads before they reach fieldsync.

use std::path::Path;

use schemars::{JsonSchema, Schema, schema_for};

/// Every contract, by file stem.
pub fn all_schemas() -> Vec<(&'static str, Schema)> {
    fn s<T: JsonSchema>() -> Schema {
        schema_for!(T)
    }
    vec![
        ("doc-id", s::<crate::ids::DocId>()),
        ("sample", s::<crate::metrics::Sample>()),
        ("rollup", s::<crate::metrics::Rollup>()),
        ("register-map", s::<crate::registers::RegisterMap>()),
        ("desired-config", s::<crate::device::DesiredConfig>()),
        ("reported-state", s::<crate::device::ReportedState>()),
        ("field-spec", s::<crate::device::FieldSpec>()),
        ("command", s::<crate::command::Command>()),
        ("command-result", s::<crate::command::CommandResult>()),
        ("alarm-rule", s::<crate::alarm::AlarmRule>()),
        ("alarm", s::<crate::alarm::Alarm>()),
        ("tenant-policy", s::<crate::policy::TenantPolicy>()),
        ("identity-record", s::<crate::identity::IdentityRecord>()),
        ("join-token-claims", s::<crate::identity::JoinTokenClaims>()),
        ("edge-config", s::<crate::config::EdgeConfig>()),
        ("hub-config", s::<crate::config::HubConfig>()),
        ("ingest-section", s::<crate::ingest::IngestSection>()),
        ("ingest-batch", s::<crate::ingest::IngestBatch>()),
        ("quarantine-entry", s::<crate::ingest::QuarantineEntry>()),
    ]
}

/// Write `{name}.schema.json` for every contract into `dir` (created if
/// missing). Returns the files written.
pub fn write_all(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (name, schema) in all_schemas() {
        let path = dir.join(format!("{name}.schema.json"));
        let text = serde_json::to_string_pretty(&schema).map_err(std::io::Error::other)?;
        std::fs::write(&path, text + "\n")?;
        out.push(path);
    }
    Ok(out)
}
