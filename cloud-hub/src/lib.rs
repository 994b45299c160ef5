//! placeholder
pub mod aggregate;
pub mod analytics;
pub mod api;
pub mod audit;
pub mod dashboard;
pub mod fleet_store;
pub mod hub;
pub mod keys;
pub mod offset_clock;
pub mod registry;
pub mod rollout;
pub mod tokens;
pub mod users;
