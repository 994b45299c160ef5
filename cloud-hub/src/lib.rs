//! placeholder
pub mod analytics;
pub mod api;
pub mod audit;
pub mod keys;
pub mod registry;
pub mod rollout;
pub mod tokens;
