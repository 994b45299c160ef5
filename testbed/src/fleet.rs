//! Start the simulated devices of an edge config: one server per device.
//!
//! This is what `testbed devices` runs, kept in the library so the fleet
//! runner and `chaos` can start the same devices in process and reach their
//! [`DeviceHandle`]s to inject faults.

use std::time::Duration;

use schemas::config::DeviceConfig;
use schemas::ids::DeviceId;
use schemas::registers::RegisterMap;

use crate::clock::{BadTimeScale, ClockDriver};
use crate::device::{DeviceError, DeviceHandle, SimDevice};
use crate::physics::{DeviceKind, UnknownKind};
use crate::rng::SimRng;
use crate::server::{DeviceServer, ServerError};

/// How to run simulated devices.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetOptions {
    /// Master seed; each device derives its own from it and its id.
    pub seed: u64,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    /// Simulated time of day at start, seconds after midnight.
    pub start_of_day_s: f64,
    /// How often the clock driver advances the devices (real time).
    pub tick: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            seed: 1,
            time_scale: 1.0,
            start_of_day_s: 8.0 * 3600.0,
            tick: Duration::from_millis(100),
        }
    }
}

/// Why simulated devices could not start. Each variant names the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// `device_type` names no simulated device.
    #[error("device {device}: {source}")]
    UnknownType {
        /// Device id.
        device: DeviceId,
        /// The unknown type.
        #[source]
        source: UnknownKind,
    },
    /// The device's registers do not fit its simulated type.
    #[error("device {device}: {source}")]
    Registers {
        /// Device id.
        device: DeviceId,
        /// What is wrong.
        #[source]
        source: DeviceError,
    },
    /// Its Modbus server could not start.
    #[error("device {device}: {source}")]
    Server {
        /// Device id.
        device: DeviceId,
        /// What failed.
        #[source]
        source: ServerError,
    },
    /// The time scale is out of range.
    #[error(transparent)]
    TimeScale(#[from] BadTimeScale),
}

/// One running simulated device.
#[derive(Debug)]
pub struct RunningDevice {
    /// Its id in the config.
    pub id: DeviceId,
    /// What it simulates.
    pub kind: DeviceKind,
    /// Shared state: read signals, inject faults.
    pub handle: DeviceHandle,
    /// Its server (bound address in [`DeviceServer::addr`]).
    pub server: DeviceServer,
}

/// Simulated devices with their servers and the clock that drives them.
#[derive(Debug)]
pub struct RunningFleet {
    /// The devices, in config order.
    pub devices: Vec<RunningDevice>,
    clock: Option<ClockDriver>,
}

/// Build the simulated device for one config entry (no IO): the type must be
/// known and every register must name one of its signals.
pub fn build_device(
    d: &DeviceConfig,
    opts: &FleetOptions,
) -> Result<(DeviceKind, DeviceHandle), FleetError> {
    let kind: DeviceKind = d
        .device_type
        .parse()
        .map_err(|source| FleetError::UnknownType {
            device: d.id.clone(),
            source,
        })?;
    let seed = SimRng::derive_seed(opts.seed, d.id.as_str());
    let model = kind.model(seed, opts.start_of_day_s);
    let map = RegisterMap {
        registers: d.registers.clone(),
    };
    let dev = SimDevice::new(model, map, seed).map_err(|source| FleetError::Registers {
        device: d.id.clone(),
        source,
    })?;
    Ok((kind, DeviceHandle::new(dev)))
}

/// Start one server per device on its configured address (port 0 picks a
/// free port) and a clock driving them all. On any failure, whatever was
/// started is stopped again.
pub async fn start_fleet(
    devices: &[DeviceConfig],
    opts: &FleetOptions,
) -> Result<RunningFleet, FleetError> {
    crate::clock::check_time_scale(opts.time_scale)?;
    let built = devices
        .iter()
        .map(|d| build_device(d, opts).map(|(k, h)| (d, k, h)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut running = Vec::with_capacity(built.len());
    for (d, kind, handle) in built {
        match DeviceServer::start(handle.clone(), d.addr).await {
            Ok(server) => running.push(RunningDevice {
                id: d.id.clone(),
                kind,
                handle,
                server,
            }),
            Err(source) => {
                for r in running {
                    let _ = r.server.stop().await;
                }
                return Err(FleetError::Server {
                    device: d.id.clone(),
                    source,
                });
            }
        }
    }
    let handles = running.iter().map(|r| r.handle.clone()).collect();
    let clock = ClockDriver::spawn(handles, opts.time_scale, opts.tick)?;
    Ok(RunningFleet {
        devices: running,
        clock: Some(clock),
    })
}

impl RunningFleet {
    /// The running device with this id.
    pub fn device(&self, id: &str) -> Option<&RunningDevice> {
        self.devices.iter().find(|d| d.id.as_str() == id)
    }

    /// Stop the clock and every server; returns the first server error.
    pub async fn stop(mut self) -> Result<(), FleetError> {
        if let Some(c) = self.clock.take() {
            c.stop().await;
        }
        let mut first = None;
        for d in self.devices.drain(..) {
            if let Err(source) = d.server.stop().await {
                first.get_or_insert(FleetError::Server {
                    device: d.id,
                    source,
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
}
