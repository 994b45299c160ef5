//! A dedicated runtime for the control loops: one OS thread running a
//! current-thread tokio runtime, so CPU-heavy work on the main runtime
//! (applying a flood of synced changes, summarising) cannot delay a tick.
//!
//! Measured with `edge-bench-node` (release, 10 ms period, 2 shared cores,
//! a second node flooded with ~850 document changes/s over iroh): loops on
//! the main runtime had a p99 lateness of ~157 ms (max ~300 ms); on this
//! thread, p99 ~8.6 ms (max ~14 ms), against ~2 ms with sync idle.

use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::control::TickJournal;

/// The loops' runtime thread.
#[derive(Debug)]
pub struct LoopRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    journal: Option<TickJournal>,
}

impl LoopRuntime {
    /// Start the thread and its runtime.
    pub fn start() -> std::io::Result<LoopRuntime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("control-loops".into())
            .spawn(move || {
                // Runs the loop tasks until told to stop; the runtime is
                // dropped on this thread, outside any async context.
                let _ = rt.block_on(stopped);
            })?;
        Ok(LoopRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
            journal: None,
        })
    }

    /// The runtime's handle: enter it to spawn loops there.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Keep the loops' tick journal; [`LoopRuntime::shutdown`] writes what
    /// it still holds and closes it.
    pub fn attach_journal(&mut self, journal: TickJournal) {
        self.journal = Some(journal);
    }

    /// Stop the runtime (after the loops were stopped) and join its thread,
    /// then close the tick journal.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(j) = self.journal.take() {
            let _ = tokio::task::spawn_blocking(move || j.close()).await;
        }
    }
}

impl Drop for LoopRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
