//! Integration tests of testbed: simulated devices over real Modbus TCP on
//! loopback, and the `testbed` binary end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod modbus;
