//! Modbus TCP device adapter: one task and one TCP connection per device,
//! polling its register map and executing writes, with health tracking and
//! reconnects.
//!
//! ```text
//!  DeviceHandle::write_coil ──cmd (mpsc, oneshot reply)──┐
//!                                                        v
//!                         device task (one per device, one TCP connection)
//!                           │ polls read groups on their poll_ms
//!                           │ decodes with RegisterSpec::decode
//!                           ├──> LatestValues (shared cell, read by control loops)
//!                           └──> events (mpsc): DeviceEvent::Sample / ::Health
//! ```
//!
//! Invariants:
//! - devices never share a task or a connection, so a device that times out,
//!   refuses or answers exceptions cannot delay another one;
//! - a request that times out closes the connection (a late answer would
//!   desynchronise the transaction ids); the task reconnects with capped
//!   exponential backoff and jitter;
//! - while a device is disconnected, writes fail at once with
//!   [`WriteError::NotConnected`] instead of waiting, so a control loop never
//!   waits on a device;
//! - samples are normalised to canonical units ([`schemas::metrics::Unit::to_canonical`]).

mod backoff;
mod health;
mod plan;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use schemas::config::DeviceConfig;
use schemas::device::{DeviceHealth, Reading};
use schemas::ids::DeviceId;
use schemas::metrics::Sample;
use schemas::registers::{RegisterFunction, RegisterMap, RegisterSpec, RegisterType};
use schemas::version::SchemaVersion;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_modbus::Slave;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;

use crate::clock::Clock;

pub use health::{HealthTracker, Outcome};

use backoff::Backoff;
use plan::{ReadGroup, function_name};

/// Tuning of the adapter; the defaults suit a real site.
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_cap: Duration,
    /// Transport failures in a row before the device is `Unreachable`.
    pub unreachable_after: u32,
    /// Queued write requests per device; beyond it `try_*` writes fail with
    /// [`WriteError::Busy`].
    pub command_queue: usize,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        AdapterOptions {
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(30),
            unreachable_after: 3,
            command_queue: 16,
        }
    }
}

/// What a device task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    /// One decoded value.
    Sample(Sample),
    /// The device's health status changed.
    Health {
        device: DeviceId,
        health: DeviceHealth,
    },
}

/// A device could not be started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The device's register map is invalid (`field` names the register).
    #[error("device {device}: invalid register map: {field}: {reason}")]
    InvalidMap {
        device: DeviceId,
        field: String,
        reason: String,
    },
    /// `timeout_ms` is zero.
    #[error("device {device}: timeout_ms must be at least 1")]
    ZeroTimeout { device: DeviceId },
}

/// A write was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The register map has no register of that name.
    #[error("device {device} has no register {name:?} (known: {known})")]
    UnknownRegister {
        device: DeviceId,
        name: String,
        /// Comma-separated names of the device's registers.
        known: String,
    },
    /// The register is read-only (input register or discrete input) or the
    /// wrong kind for the call (a coil written as a number or the reverse).
    #[error("device {device}: register {name:?} is a {function} {reason}")]
    WrongKind {
        device: DeviceId,
        name: String,
        function: &'static str,
        reason: &'static str,
    },
    /// The value cannot be represented by the register.
    #[error("device {device}: {value} cannot be written to {name:?}: {reason}")]
    OutOfRange {
        device: DeviceId,
        name: String,
        value: f64,
        reason: String,
    },
    /// The device's write queue is full (only from `try_*` calls).
    #[error("device {device}: write queue is full")]
    Busy { device: DeviceId },
    /// The device task has stopped.
    #[error("device {device}: adapter is stopped")]
    Stopped { device: DeviceId },
    /// The device is not connected right now.
    #[error("device {device}: not connected ({reason})")]
    NotConnected { device: DeviceId, reason: String },
    /// The device answered with a Modbus exception.
    #[error("device {device}: write to {name:?} refused with Modbus exception {code}")]
    Exception {
        device: DeviceId,
        name: String,
        code: String,
    },
    /// Timeout, disconnect or protocol error during the write.
    #[error("device {device}: write to {name:?} failed: {reason}")]
    Transport {
        device: DeviceId,
        name: String,
        reason: String,
    },
}

/// The latest value of a metric and when (monotonic) it was received.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    pub reading: Reading,
    /// Monotonic receive time, from the adapter's [`Clock`]; loops judge
    /// staleness by it, so a wall-clock step never fakes a sensor fault.
    pub received: Instant,
}

/// Shared cell of the latest value of every metric of every device: written
/// by device tasks, read by control loops and the local API. Never held
/// across an await.
#[derive(Debug, Clone, Default)]
pub struct LatestValues {
    inner: Arc<RwLock<HashMap<DeviceId, HashMap<String, Latest>>>>,
}

impl LatestValues {
    /// An empty cell.
    pub fn new() -> Self {
        Self::default()
    }

    /// The latest value of `metric` of `device`, if any was read.
    pub fn get(&self, device: &DeviceId, metric: &str) -> Option<Latest> {
        let g = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.get(device).and_then(|m| m.get(metric)).cloned()
    }

    /// Record a value (device tasks, tests and simulations).
    pub fn set(&self, device: &DeviceId, metric: &str, latest: Latest) {
        let mut g = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.entry(device.clone())
            .or_default()
            .insert(metric.to_string(), latest);
    }
}

/// The reply to one write request.
pub type WriteReply = oneshot::Receiver<Result<(), WriteError>>;

#[derive(Debug)]
enum WriteValue {
    Coil(bool),
    Words(Vec<u16>),
}

#[derive(Debug)]
struct WriteRequest {
    register: usize,
    value: WriteValue,
    reply: oneshot::Sender<Result<(), WriteError>>,
}

/// Cheap clonable handle to write to one device.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    device: DeviceId,
    map: Arc<RegisterMap>,
    tx: mpsc::Sender<WriteRequest>,
    health: watch::Receiver<DeviceHealth>,
}

impl DeviceHandle {
    /// The device's id.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The device's current health.
    pub fn health(&self) -> DeviceHealth {
        self.health.borrow().clone()
    }

    /// A receiver that sees every health change.
    pub fn watch_health(&self) -> watch::Receiver<DeviceHealth> {
        self.health.clone()
    }

    fn lookup(&self, name: &str) -> Result<(usize, &RegisterSpec), WriteError> {
        self.map
            .registers
            .iter()
            .enumerate()
            .find(|(_, r)| r.name == name)
            .ok_or_else(|| WriteError::UnknownRegister {
                device: self.device.clone(),
                name: name.to_string(),
                known: self
                    .map
                    .registers
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn coil_request(&self, name: &str, on: bool) -> Result<(usize, WriteValue), WriteError> {
        let (i, r) = self.lookup(name)?;
        if r.function != RegisterFunction::Coil {
            return Err(WriteError::WrongKind {
                device: self.device.clone(),
                name: name.to_string(),
                function: function_name(r.function),
                reason: "and cannot be written as a coil",
            });
        }
        Ok((i, WriteValue::Coil(on)))
    }

    fn register_request(&self, name: &str, value: f64) -> Result<(usize, WriteValue), WriteError> {
        let (i, r) = self.lookup(name)?;
        if r.function != RegisterFunction::Holding {
            return Err(WriteError::WrongKind {
                device: self.device.clone(),
                name: name.to_string(),
                function: function_name(r.function),
                reason: if r.function == RegisterFunction::Coil {
                    "; write it with write_coil"
                } else {
                    "and is read-only"
                },
            });
        }
        check_range(r, value).map_err(|reason| WriteError::OutOfRange {
            device: self.device.clone(),
            name: name.to_string(),
            value,
            reason,
        })?;
        Ok((i, WriteValue::Words(r.encode(value))))
    }

    async fn send(&self, (register, value): (usize, WriteValue)) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WriteRequest {
                register,
                value,
                reply,
            })
            .await
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    fn try_send(&self, (register, value): (usize, WriteValue)) -> Result<WriteReply, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(WriteRequest {
                register,
                value,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => WriteError::Busy {
                    device: self.device.clone(),
                },
                mpsc::error::TrySendError::Closed(_) => self.stopped(),
            })?;
        Ok(rx)
    }

    fn stopped(&self) -> WriteError {
        WriteError::Stopped {
            device: self.device.clone(),
        }
    }

    /// Write a coil and wait for the device's answer (at most the device's
    /// timeout once the request is sent).
    pub async fn write_coil(&self, name: &str, on: bool) -> Result<(), WriteError> {
        let req = self.coil_request(name, on)?;
        self.send(req).await
    }

    /// Write a holding register (encoded by its [`RegisterSpec`]) and wait
    /// for the device's answer.
    pub async fn write_register(&self, name: &str, value: f64) -> Result<(), WriteError> {
        let req = self.register_request(name, value)?;
        self.send(req).await
    }

    /// Queue a coil write without waiting; the outcome arrives on the
    /// returned receiver. Fails at once if the queue is full.
    pub fn try_write_coil(&self, name: &str, on: bool) -> Result<WriteReply, WriteError> {
        let req = self.coil_request(name, on)?;
        self.try_send(req)
    }

    /// Queue a register write without waiting.
    pub fn try_write_register(&self, name: &str, value: f64) -> Result<WriteReply, WriteError> {
        let req = self.register_request(name, value)?;
        self.try_send(req)
    }
}

/// Check that `value` fits the register, so a write never silently saturates.
fn check_range(r: &RegisterSpec, value: f64) -> Result<(), String> {
    if !value.is_finite() {
        return Err("not a finite number".into());
    }
    let raw = (value - r.offset) / r.scale;
    let (lo, hi) = match r.data_type {
        RegisterType::Bool => (0.0, 1.0),
        RegisterType::U16 => (0.0, 65_535.0),
        RegisterType::I16 => (-32_768.0, 32_767.0),
        RegisterType::U32 => (0.0, 4_294_967_295.0),
        RegisterType::I32 => (-2_147_483_648.0, 2_147_483_647.0),
        RegisterType::F32 => (f64::from(f32::MIN), f64::from(f32::MAX)),
    };
    let rounded = if r.data_type == RegisterType::F32 {
        raw
    } else {
        raw.round()
    };
    if rounded < lo || rounded > hi {
        let (vlo, vhi) = {
            let a = lo * r.scale + r.offset;
            let b = hi * r.scale + r.offset;
            (a.min(b), a.max(b))
        };
        return Err(format!(
            "outside the register's range {vlo}..={vhi} ({:?}, scale {}, offset {})",
            r.data_type, r.scale, r.offset
        ));
    }
    Ok(())
}

/// A running device adapter: the task plus its handle. Dropping it does not
/// stop the task; call [`DeviceRunner::stop`].
#[derive(Debug)]
pub struct DeviceRunner {
    handle: DeviceHandle,
    shutdown: watch::Sender<bool>,
    join: JoinHandle<()>,
}

impl DeviceRunner {
    /// A handle for writes and health.
    pub fn handle(&self) -> DeviceHandle {
        self.handle.clone()
    }

    /// Stop the task and close its connection; returns when it has ended.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        // The task only ends by observing shutdown; a JoinError here means it
        // panicked, which has already been reported by the runtime.
        let _ = self.join.await;
    }
}

/// Validate the device config and start its task.
pub fn spawn_device(
    cfg: DeviceConfig,
    opts: AdapterOptions,
    clock: Arc<dyn Clock>,
    values: LatestValues,
    events: mpsc::Sender<DeviceEvent>,
) -> Result<DeviceRunner, AdapterError> {
    let map = RegisterMap {
        registers: cfg.registers.clone(),
    };
    map.validate().map_err(|e| AdapterError::InvalidMap {
        device: cfg.id.clone(),
        field: e.field,
        reason: e.reason,
    })?;
    if cfg.timeout_ms == 0 {
        return Err(AdapterError::ZeroTimeout { device: cfg.id });
    }
    let map = Arc::new(map);
    let (tx, rx) = mpsc::channel(opts.command_queue.max(1));
    let (health_tx, health_rx) = watch::channel(DeviceHealth::default());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    cfg.id.hash(&mut hasher);
    let seed = hasher.finish();
    let task = DeviceTask {
        device: cfg.id.clone(),
        addr: cfg.addr,
        timeout: Duration::from_millis(cfg.timeout_ms),
        groups: plan::plan(&map.registers),
        map: map.clone(),
        health: HealthTracker::new(opts.unreachable_after),
        health_tx,
        backoff: Backoff::new(opts.backoff_base, opts.backoff_cap, seed),
        clock,
        values,
        events,
        commands: rx,
        shutdown: shutdown_rx,
    };
    let join = tokio::spawn(task.run());
    Ok(DeviceRunner {
        handle: DeviceHandle {
            device: cfg.id,
            map,
            tx,
            health: health_rx,
        },
        shutdown,
        join,
    })
}

struct DeviceTask {
    device: DeviceId,
    addr: SocketAddr,
    timeout: Duration,
    map: Arc<RegisterMap>,
    groups: Vec<ReadGroup>,
    health: HealthTracker,
    health_tx: watch::Sender<DeviceHealth>,
    backoff: Backoff,
    clock: Arc<dyn Clock>,
    values: LatestValues,
    events: mpsc::Sender<DeviceEvent>,
    commands: mpsc::Receiver<WriteRequest>,
    shutdown: watch::Receiver<bool>,
}

/// Why a connected session ended.
enum SessionEnd {
    Shutdown,
    Transport(String),
}

/// The result of one Modbus request, flattened.
enum Answer<T> {
    Ok(T),
    Exception(String),
    Transport(String),
}

impl DeviceTask {
    async fn run(mut self) {
        let mut next_due: Vec<tokio::time::Instant> =
            vec![tokio::time::Instant::now(); self.groups.len()];
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            let connect = tokio::time::timeout(
                self.timeout,
                tokio_modbus::client::tcp::connect_slave(self.addr, Slave(1)),
            );
            let connected = tokio::select! {
                r = connect => r,
                _ = self.shutdown.changed() => return,
            };
            let error = match connected {
                Ok(Ok(ctx)) => {
                    tracing::debug!(device = %self.device, addr = %self.addr, "connected");
                    // Shutdown also interrupts a request in flight, so
                    // stop() never waits for a silent device's timeout.
                    let mut shutdown = self.shutdown.clone();
                    let end = tokio::select! {
                        end = self.session(ctx, &mut next_due) => end,
                        _ = shutdown.changed() => SessionEnd::Shutdown,
                    };
                    match end {
                        SessionEnd::Shutdown => return,
                        SessionEnd::Transport(e) => e,
                    }
                }
                Ok(Err(e)) => format!("connect to {}: {e}", self.addr),
                Err(_) => format!(
                    "connect to {}: no answer within {} ms",
                    self.addr,
                    self.timeout.as_millis()
                ),
            };
            tracing::warn!(device = %self.device, error = %error, "device connection lost");
            self.outcome(Outcome::Transport {
                error: error.clone(),
            })
            .await;
            let delay = self.backoff.next_delay();
            if !self.wait_disconnected(delay, &error).await {
                return;
            }
        }
    }

    /// Sleep `delay` while refusing writes at once; false on shutdown.
    async fn wait_disconnected(&mut self, delay: Duration, reason: &str) -> bool {
        let deadline = tokio::time::sleep(delay);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return true,
                _ = self.shutdown.changed() => return false,
                Some(req) = self.commands.recv() => {
                    let _ = req.reply.send(Err(WriteError::NotConnected {
                        device: self.device.clone(),
                        reason: reason.to_string(),
                    }));
                }
            }
        }
    }

    async fn session(
        &mut self,
        mut ctx: Context,
        next_due: &mut [tokio::time::Instant],
    ) -> SessionEnd {
        loop {
            let Some(wake) = next_due.iter().min().copied() else {
                // No registers: only serve writes.
                tokio::select! {
                    _ = self.shutdown.changed() => return SessionEnd::Shutdown,
                    Some(req) = self.commands.recv() => {
                        if let Err(e) = self.write(&mut ctx, req).await {
                            return SessionEnd::Transport(e);
                        }
                    }
                }
                continue;
            };
            tokio::select! {
                _ = self.shutdown.changed() => return SessionEnd::Shutdown,
                Some(req) = self.commands.recv() => {
                    if let Err(e) = self.write(&mut ctx, req).await {
                        return SessionEnd::Transport(e);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = tokio::time::Instant::now();
                    for (g, due) in next_due.iter_mut().enumerate() {
                        if *due > now {
                            continue;
                        }
                        let period = Duration::from_millis(self.groups[g].poll_ms);
                        *due += period;
                        if *due <= now {
                            // Fell behind (slow device or reconnect): skip
                            // the missed polls instead of bursting.
                            *due = now + period;
                        }
                        if let Err(e) = self.poll_group(&mut ctx, g).await {
                            return SessionEnd::Transport(e);
                        }
                    }
                }
            }
        }
    }

    async fn request<T, F>(&self, fut: F) -> Answer<T>
    where
        F: std::future::Future<Output = tokio_modbus::Result<T>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => {
                Answer::Transport(format!("no answer within {} ms", self.timeout.as_millis()))
            }
            Ok(Err(e)) => Answer::Transport(e.to_string()),
            Ok(Ok(Err(code))) => Answer::Exception(format!("{code:?}")),
            Ok(Ok(Ok(v))) => Answer::Ok(v),
        }
    }

    /// Read one group; `Err` only for a transport failure (the session ends).
    async fn poll_group(&mut self, ctx: &mut Context, g: usize) -> Result<(), String> {
        let group = self.groups[g].clone();
        ctx.set_slave(Slave(group.unit_id));
        let words: Answer<Vec<u16>> = match group.function {
            RegisterFunction::Holding => {
                self.request(ctx.read_holding_registers(group.start, group.count))
                    .await
            }
            RegisterFunction::Input => {
                self.request(ctx.read_input_registers(group.start, group.count))
                    .await
            }
            RegisterFunction::Coil => {
                bits_to_words(self.request(ctx.read_coils(group.start, group.count)).await)
            }
            RegisterFunction::Discrete => bits_to_words(
                self.request(ctx.read_discrete_inputs(group.start, group.count))
                    .await,
            ),
        };
        let words = match words {
            Answer::Ok(w) => w,
            Answer::Exception(code) => {
                let error = format!("read {}: Modbus exception {code}", group.describe());
                self.outcome(Outcome::ReadFailed { group: g, error }).await;
                return Ok(());
            }
            Answer::Transport(e) => {
                return Err(format!("read {}: {e}", group.describe()));
            }
        };
        let ts = self.clock.now();
        let received = self.clock.monotonic();
        let mut decode_errors = Vec::new();
        for &i in &group.members {
            let r = &self.map.registers[i];
            let off = usize::from(r.address - group.start);
            let len = if r.function.is_bit() {
                1
            } else {
                usize::from(r.data_type.words())
            };
            let Some(slice) = words.get(off..off + len) else {
                decode_errors.push(format!(
                    "{}: device returned {} words, expected {}",
                    r.name,
                    words.len(),
                    group.count
                ));
                continue;
            };
            match r.decode(slice) {
                Ok(v) => {
                    let (unit, value) = r.unit.to_canonical(v);
                    self.values.set(
                        &self.device,
                        &r.name,
                        Latest {
                            reading: Reading { value, ts },
                            received,
                        },
                    );
                    let sample = Sample {
                        schema_version: SchemaVersion::default(),
                        device: self.device.clone(),
                        metric: r.name.clone(),
                        ts,
                        value,
                        unit,
                    };
                    // The receiver going away means the node is shutting
                    // down; polling goes on until we are told to stop.
                    let _ = self.events.send(DeviceEvent::Sample(sample)).await;
                }
                Err(e) => decode_errors.push(format!("{}: {e}", r.name)),
            }
        }
        let outcome = if decode_errors.is_empty() {
            Outcome::ReadOk { group: g }
        } else {
            Outcome::ReadFailed {
                group: g,
                error: format!("decode {}: {}", group.describe(), decode_errors.join("; ")),
            }
        };
        self.outcome(outcome).await;
        Ok(())
    }

    /// Execute one write; `Err` only for a transport failure.
    async fn write(&mut self, ctx: &mut Context, req: WriteRequest) -> Result<(), String> {
        let r = self.map.registers[req.register].clone();
        ctx.set_slave(Slave(r.unit_id));
        let answer = match &req.value {
            WriteValue::Coil(on) => self.request(ctx.write_single_coil(r.address, *on)).await,
            WriteValue::Words(w) if w.len() == 1 => {
                self.request(ctx.write_single_register(r.address, w[0]))
                    .await
            }
            WriteValue::Words(w) => {
                self.request(ctx.write_multiple_registers(r.address, w))
                    .await
            }
        };
        match answer {
            Answer::Ok(()) => {
                let _ = req.reply.send(Ok(()));
                self.outcome(Outcome::WriteAnswered { error: None }).await;
                Ok(())
            }
            Answer::Exception(code) => {
                let error = format!("write {:?}: Modbus exception {code}", r.name);
                let _ = req.reply.send(Err(WriteError::Exception {
                    device: self.device.clone(),
                    name: r.name.clone(),
                    code,
                }));
                self.outcome(Outcome::WriteAnswered { error: Some(error) })
                    .await;
                Ok(())
            }
            Answer::Transport(e) => {
                let _ = req.reply.send(Err(WriteError::Transport {
                    device: self.device.clone(),
                    name: r.name.clone(),
                    reason: e.clone(),
                }));
                Err(format!("write {:?}: {e}", r.name))
            }
        }
    }

    async fn outcome(&mut self, o: Outcome) {
        if matches!(o, Outcome::ReadOk { .. }) {
            self.backoff.reset();
        }
        let now = self.clock.now();
        if self.health.handle_outcome(o, now) {
            let health = self.health.health().clone();
            tracing::info!(device = %self.device, status = ?health.status, error = ?health.last_error, "device health changed");
            self.health_tx.send_replace(health.clone());
            let _ = self
                .events
                .send(DeviceEvent::Health {
                    device: self.device.clone(),
                    health,
                })
                .await;
        }
    }
}

fn bits_to_words(a: Answer<Vec<bool>>) -> Answer<Vec<u16>> {
    match a {
        Answer::Ok(bits) => Answer::Ok(bits.into_iter().map(u16::from).collect()),
        Answer::Exception(e) => Answer::Exception(e),
        Answer::Transport(e) => Answer::Transport(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::metrics::Unit;

    fn reg(t: RegisterType, scale: f64, offset: f64) -> RegisterSpec {
        RegisterSpec {
            name: "x".into(),
            unit_id: 1,
            function: RegisterFunction::Holding,
            address: 0,
            data_type: t,
            word_order: Default::default(),
            byte_order: Default::default(),
            scale,
            offset,
            unit: Unit::None,
            poll_ms: 1000,
        }
    }

    #[test]
    fn range_checks_refuse_values_that_would_saturate() {
        assert!(check_range(&reg(RegisterType::U16, 1.0, 0.0), 65_535.0).is_ok());
        assert!(check_range(&reg(RegisterType::U16, 1.0, 0.0), 65_536.0).is_err());
        assert!(check_range(&reg(RegisterType::U16, 1.0, 0.0), -1.0).is_err());
        let t = reg(RegisterType::I16, 0.1, -40.0);
        assert!(check_range(&t, 22.5).is_ok());
        let e = check_range(&t, 5000.0).unwrap_err();
        assert!(e.contains("range"), "{e}");
        assert!(check_range(&t, f64::NAN).is_err());
        assert!(check_range(&reg(RegisterType::F32, 1.0, 0.0), 1e300).is_err());
    }
}
