//! placeholder
pub mod alarms;
pub mod clock;
pub mod commands;
pub mod control;
pub mod directory;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod modbus;
pub mod node;
pub mod raw_zone;
pub mod summariser;
