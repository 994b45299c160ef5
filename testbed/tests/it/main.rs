//! Integration tests of testbed: simulated devices over real Modbus TCP on
//! loopback, the edge's real control loop and Modbus adapter against them,
//! and the `testbed` binary end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod control;
mod faults;
mod fleet;
mod modbus;
mod up;
