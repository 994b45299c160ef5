//! placeholder
pub mod clock;
pub mod commands;
pub mod modbus;
pub mod raw_zone;
pub mod summariser;
pub mod control;
pub mod alarms;
pub mod ingest;
