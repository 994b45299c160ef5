//! The schema version carried by every persisted record.

use serde::{Deserialize, Deserializer, Serialize};

/// The newest schema version this build writes and understands.
pub const CURRENT: u32 = 1;

/// Schema version of a persisted record. Deserialising a version newer than
/// [`CURRENT`] (or 0) fails, so an old binary never silently misreads a record
/// written by a newer one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct SchemaVersion(#[schemars(range(min = 1))] pub u32);

impl Default for SchemaVersion {
    fn default() -> Self {
        SchemaVersion(CURRENT)
    }
}

impl<'de> Deserialize<'de> for SchemaVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v == 0 || v > CURRENT {
            return Err(serde::de::Error::custom(format!(
                "schema_version {v} is not supported by this build (supports 1..={CURRENT})"
            )));
        }
        Ok(SchemaVersion(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_future_and_zero_versions() {
        assert_eq!(
            serde_json::from_str::<SchemaVersion>("1").ok(),
            Some(SchemaVersion(1))
        );
        let err = serde_json::from_str::<SchemaVersion>("99")
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema_version 99"), "{err}");
        assert!(serde_json::from_str::<SchemaVersion>("0").is_err());
    }
}
