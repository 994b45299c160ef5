//! Data contracts of fieldsync: every type that crosses a process, a file or
//! the network is defined here, with serde, a JSON Schema and a schema version.
//!
//! The rest of the workspace builds on these types and adds behaviour; nothing
//! in this crate does IO except [`config::EdgeConfig::load`] and
//! [`config::HubConfig::load`], which read one TOML file.
//!
//! ```
//! use schemas::ids::{DocId, DocKind};
//!
//! let id: DocId = "t/acme/s/coldstore-1/dev/pump-7".parse().unwrap();
//! assert_eq!(id.kind(), DocKind::Device);
//! assert_eq!(id.to_string(), "t/acme/s/coldstore-1/dev/pump-7");
//! assert!("t/acme/s/Cold Store/site".parse::<DocId>().is_err());
//! ```

pub mod alarm;
pub mod command;
pub mod config;
pub mod device;
pub mod export;
pub mod identity;
pub mod ids;
pub mod ingest;
pub mod metrics;
pub mod policy;
pub mod registers;
pub mod time;
pub mod version;

pub use ids::{DeviceId, DocId, DocKind, SiteId, TenantId};
pub use version::SchemaVersion;
