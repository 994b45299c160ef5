//! Commands to devices and their results.

use serde::{Deserialize, Serialize};

use crate::device::FieldValue;
use crate::ids::DeviceId;
use crate::time::Timestamp;
use crate::version::SchemaVersion;

/// What a command does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum CommandAction {
    /// Write a holding register named in the device's register map.
    WriteRegister { register: String, value: f64 },
    /// Write a coil named in the device's register map.
    WriteCoil { register: String, value: bool },
    /// Change one desired-config field.
    SetDesired { field: String, value: FieldValue },
}

/// A command. Its `id` is the idempotency key: an edge executes each id at
/// most once, however often it is delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Command {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub id: String,
    pub target: DeviceId,
    #[serde(flatten)]
    pub action: CommandAction,
    /// Principal that issued it (`admin:alice`, `operator:site-1:bob`).
    pub issued_by: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Life cycle of a command as the hub tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Pending,
    Delivered,
    Succeeded,
    Failed,
    /// Refused by the edge (unauthorised, invalid, unknown device).
    Refused,
    Expired,
    /// Never executed, or its effect was overwritten: a newer command for
    /// the same target (by issue order) or a newer edit of the same field
    /// took its place. Never reported as `succeeded`.
    Superseded,
}

impl CommandStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, CommandStatus::Pending | CommandStatus::Delivered)
    }
}

/// The outcome an edge writes back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CommandResult {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    pub command_id: String,
    pub status: CommandStatus,
    /// Why it failed or was refused; empty on success.
    #[serde(default)]
    pub reason: String,
    pub executed_at: Timestamp,
    /// Endpoint id (hex) of the edge that executed it.
    pub executed_by: String,
}

/// Why a command id was refused.
pub fn validate_command_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("command id must be 1..=128 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(format!(
            "command id {id:?} may contain only ascii letters, digits and - _ . :"
        ));
    }
    Ok(())
}

impl Command {
    /// Structural checks that need no device knowledge.
    pub fn validate(&self) -> Result<(), String> {
        validate_command_id(&self.id)?;
        if self.expires_at <= self.issued_at {
            return Err(format!(
                "command {} expires ({}) before it was issued ({})",
                self.id, self.expires_at, self.issued_at
            ));
        }
        if let CommandAction::WriteRegister { value, .. } = &self.action
            && !value.is_finite()
        {
            return Err(format!("command {}: value {value} is not finite", self.id));
        }
        Ok(())
    }

    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Command {
        Command {
            schema_version: SchemaVersion::default(),
            id: "c-1".into(),
            target: DeviceId::new("pump-1").unwrap(),
            action: CommandAction::WriteCoil {
                register: "run".into(),
                value: true,
            },
            issued_by: "admin:alice".into(),
            issued_at: Timestamp(100),
            expires_at: Timestamp(200),
        }
    }

    #[test]
    fn roundtrip_and_shape() {
        let c = cmd();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["action"], "write_coil");
        assert_eq!(v["register"], "run");
        assert_eq!(serde_json::from_value::<Command>(v).unwrap(), c);
    }

    #[test]
    fn validation() {
        assert!(cmd().validate().is_ok());
        let mut c = cmd();
        c.expires_at = Timestamp(50);
        assert!(c.validate().unwrap_err().contains("expires"));
        c = cmd();
        c.id = "bad id".into();
        assert!(c.validate().is_err());
        assert!(cmd().is_expired(Timestamp(200)));
        assert!(!cmd().is_expired(Timestamp(199)));
    }
}
