//! The heart of fieldsync: the Automerge document store, the sans-IO sync
//! session, the iroh transport driver, identity and authorisation.
//!
//! - [`storage`]: bytes behind a trait (sled, or memory for tests).
//! - [`docs`]: the layout of each document kind, deterministic genesis.
//! - [`store`]: documents persisted as change chunks, lazily loaded.
//! - [`identity`]: node keys (0600 files) and actor ids bound to them.

pub mod authz;
pub mod clock_offset;
pub mod docs;
pub mod driver;
pub mod enrol;
pub mod identity;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod storage;
pub mod store;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
