//! Simulated industrial devices for fieldsync: real Modbus TCP servers with
//! simple, seeded physics and injectable faults.
//!
//! - [`physics`]: cold room, pump station and energy meter models, pure and
//!   stepped by `dt` (no clock reads, a seeded RNG each).
//! - [`maps`]: their register maps (`schemas::registers::RegisterMap`) and
//!   the edge config entries that poll them.
//! - [`device`]: a model behind a register map, answering Modbus requests
//!   with faults applied, sans-IO.
//! - [`server`]: the Modbus TCP server of one device (tokio-modbus).
//! - [`clock`]: the simulated clock that advances devices at a time scale.
//! - [`fleet`]: start the devices of an edge config, inject faults by
//!   control line.
//! - [`up`]: `testbed up`, a hub, edge nodes (child processes) and their
//!   devices from one command.
//!
//! ```
//! use std::time::Duration;
//! use testbed::device::DeviceHandle;
//! use testbed::physics::DeviceKind;
//!
//! let room = DeviceHandle::simulated(DeviceKind::ColdRoom, 42, 8.0 * 3600.0);
//! let before = room.signal("temperature").unwrap();
//! room.advance(Duration::from_secs(4 * 3600)); // compressor off: it warms
//! assert!(room.signal("temperature").unwrap() > before + 2.0);
//! ```

pub mod clock;
pub mod device;
pub mod fleet;
pub mod maps;
pub mod physics;
pub mod rng;
pub mod server;
pub mod up;
