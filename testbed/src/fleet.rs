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
use crate::device::{DeviceError, DeviceHandle, Fault, SimDevice};
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

/// A control line that could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ControlError(pub String);

/// Usage of the control lines read by `testbed devices` on stdin.
pub const CONTROL_HELP: &str = "commands: fault <device> <fault> | clear <device> | get <device> <signal> | help; \
faults: stuck[:signal], spikes:signal|*:probability:magnitude, slow:ms, missing, exception:code, drop";

impl RunningFleet {
    /// Carry out one control line (see [`CONTROL_HELP`]) and say what was
    /// done. This is how a person or a chaos scenario injects device faults
    /// into a running `testbed devices`.
    pub fn control(&self, line: &str) -> Result<String, ControlError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let device = |id: &str| {
            self.device(id).ok_or_else(|| {
                let known: Vec<&str> = self.devices.iter().map(|d| d.id.as_str()).collect();
                ControlError(format!("no device {id:?} (devices: {})", known.join(", ")))
            })
        };
        match words.as_slice() {
            ["fault", id, spec] => {
                let d = device(id)?;
                let fault: Fault = spec.parse().map_err(|e| ControlError(format!("{e}")))?;
                if let Fault::Stuck { signal: Some(s) }
                | Fault::Spikes {
                    signal: Some(s), ..
                } = &fault
                    && d.handle.signal(s).is_none()
                {
                    return Err(ControlError(format!(
                        "device {id} has no signal {s:?} (it has: {})",
                        d.handle.lock().model().signals().join(", ")
                    )));
                }
                d.handle.inject(fault);
                Ok(format!("ok fault {id} {spec}"))
            }
            ["clear", id] => {
                device(id)?.handle.clear_faults();
                Ok(format!("ok clear {id}"))
            }
            ["get", id, signal] => {
                let d = device(id)?;
                let v = d
                    .handle
                    .signal(signal)
                    .ok_or_else(|| ControlError(format!("device {id} has no signal {signal:?}")))?;
                Ok(format!("ok {id} {signal} {v}"))
            }
            ["help"] => Ok(CONTROL_HELP.to_string()),
            _ => Err(ControlError(format!(
                "cannot parse {line:?}; {CONTROL_HELP}"
            ))),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{edge_config, fleet};

    #[tokio::test]
    async fn control_lines_inject_and_clear_faults() {
        let cfg = edge_config(&fleet(3, 0).unwrap());
        let f = start_fleet(&cfg.devices, &FleetOptions::default())
            .await
            .unwrap();
        let room = f.device("cold-room-1").unwrap().handle.clone();
        assert_eq!(
            f.control("fault cold-room-1 exception:server-device-failure"),
            Ok("ok fault cold-room-1 exception:server-device-failure".into())
        );
        assert!(room.lock().faults().exception.is_some());
        f.control("fault cold-room-1 stuck:temperature").unwrap();
        assert!(room.lock().faults().stuck.contains_key("temperature"));
        f.control("clear cold-room-1").unwrap();
        assert_eq!(room.lock().faults(), &crate::device::Faults::default());
        assert!(
            f.control("get meter-1 energy")
                .unwrap()
                .starts_with("ok meter-1 energy ")
        );
        for (bad, says) in [
            ("fault boiler-9 drop", "no device \"boiler-9\""),
            ("fault pump-1 melt", "invalid fault \"melt\""),
            (
                "fault pump-1 stuck:temperature",
                "no signal \"temperature\"",
            ),
            ("get pump-1 nope", "no signal \"nope\""),
            ("dance", "cannot parse"),
        ] {
            let e = f.control(bad).unwrap_err();
            assert!(e.0.contains(says), "{bad}: {e}");
        }
        f.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_busy_port_or_bad_time_scale_fails_clearly() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut devs = fleet(2, 0).unwrap();
        devs[1].addr = taken.local_addr().unwrap();
        let cfg = edge_config(&devs);
        let e = start_fleet(&cfg.devices, &FleetOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FleetError::Server { device, .. } if device.as_str() == "pump-1"),
            "{e}"
        );
        assert!(e.to_string().contains("pump-1"), "{e}");
        let e = start_fleet(
            &cfg.devices,
            &FleetOptions {
                time_scale: 0.0,
                ..FleetOptions::default()
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, FleetError::TimeScale(_)), "{e}");
    }
}
