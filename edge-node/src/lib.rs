//! placeholder
pub mod clock;
pub mod modbus;
