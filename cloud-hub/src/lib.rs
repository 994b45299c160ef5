//! placeholder
pub mod analytics;
pub mod api;
pub mod rollout;
