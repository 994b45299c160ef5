//! The Modbus TCP server of one simulated device (tokio-modbus 0.17).
//!
//! Each connection gets a service that asks the shared [`DeviceHandle`] for
//! an [`Answer`] and carries it out: reply, exception, wait (slow), stay
//! silent (missing) or close the socket (dropped connection). Closing is done
//! by a transport wrapper that reports end-of-stream once its connection is
//! marked closed, which ends tokio-modbus's per-connection loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Response, SlaveRequest};

use crate::device::{DeviceHandle, Outcome};

/// Why a device server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("bind modbus server on {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The accept loop failed.
    #[error("modbus server on {addr}: {source}")]
    Serve {
        /// Address served.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The server task panicked or was cancelled.
    #[error("modbus server on {addr}: task ended abnormally: {reason}")]
    Task {
        /// Address served.
        addr: SocketAddr,
        /// What the runtime said.
        reason: String,
    },
}

/// A TCP stream that reads as end-of-stream once `closed` is set.
struct Closable {
    inner: TcpStream,
    closed: Arc<AtomicBool>,
}

impl AsyncRead for Closable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Closable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The service of one connection.
struct ConnService {
    device: DeviceHandle,
    closed: Arc<AtomicBool>,
}

type Reply = Result<Option<Response>, ExceptionCode>;

impl Service for ConnService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let answer = self.device.lock().handle(req.slave, &req.request);
        let closed = Arc::clone(&self.closed);
        Box::pin(async move {
            if let Some(d) = answer.delay {
                tokio::time::sleep(d).await;
            }
            match answer.outcome {
                Outcome::Reply(r) => Ok(Some(r)),
                Outcome::Exception(code) => Err(code),
                Outcome::NoAnswer => Ok(None),
                Outcome::Drop => {
                    closed.store(true, Ordering::Release);
                    Ok(None)
                }
            }
        })
    }
}

/// A running Modbus TCP server for one device. Stop it with
/// [`DeviceServer::stop`]; dropping it stops it too.
#[derive(Debug)]
pub struct DeviceServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl DeviceServer {
    /// Bind `bind` (port 0 picks a free port) and serve `device` on it.
    pub async fn start(
        device: DeviceHandle,
        bind: SocketAddr,
    ) -> Result<DeviceServer, ServerError> {
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| ServerError::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr: bind, source })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream: TcpStream, peer: SocketAddr| {
                let device = device.clone();
                async move {
                    let closed = Arc::new(AtomicBool::new(false));
                    let accepted = accept_tcp_connection(stream, peer, |_| {
                        Ok(Some(ConnService {
                            device: device.clone(),
                            closed: Arc::clone(&closed),
                        }))
                    })?;
                    Ok(accepted.map(|(svc, inner)| (svc, Closable { inner, closed })))
                }
            };
            let on_error = move |e: io::Error| {
                tracing::debug!(%addr, error = %e, "modbus connection ended with an error");
            };
            let abort = async move {
                // Either a stop request or the handle being dropped.
                let _ = stopped.await;
            };
            server
                .serve_until(&on_connected, on_error, abort)
                .await
                .map(|_| ())
        });
        tracing::debug!(%addr, "modbus server listening");
        Ok(DeviceServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Serve `device` on a free loopback port (`127.0.0.1:0`).
    pub async fn start_local(device: DeviceHandle) -> Result<DeviceServer, ServerError> {
        Self::start(device, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, close every connection and wait for the server task.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let addr = self.addr;
        match self.task.take() {
            Some(t) => match t.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(ServerError::Serve { addr, source }),
                Err(e) => Err(ServerError::Task {
                    addr,
                    reason: e.to_string(),
                }),
            },
            None => Ok(()),
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
