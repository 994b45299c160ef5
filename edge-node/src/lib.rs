//! placeholder
pub mod clock;
