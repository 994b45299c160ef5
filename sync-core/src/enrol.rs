//! The enrolment protocol (`fieldsync-enrol/1`): a new node presents its
//! join token once and receives the hub-signed registry.
//!
//! One bidirectional stream per enrolment. The client sends the token as a
//! frame (u32 big-endian length, then bytes; at most [`MAX_TOKEN_LEN`]) and
//! finishes its side; the hub answers with one frame of JSON ([`Answer`]):
//! the [`SignedRegistry`] that now lists the node, or a refusal reason. The
//! key bound to the token is the caller's TLS-authenticated endpoint key
//! (`conn.remote_id()`), never something the caller claims, so a token
//! intercepted in transit cannot enrol another key than the one presenting
//! it first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::{Connection, RecvStream, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use schemas::identity::EndpointKey;
use serde::{Deserialize, Serialize};

use crate::identity::{from_iroh, to_iroh};
use crate::registry::{SignedRegistry, SnapshotError};

/// ALPN of the enrolment protocol.
pub const ENROL_ALPN: &[u8] = b"fieldsync-enrol/1";
/// Largest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4 * 1024;
/// Largest answer accepted, in bytes (a registry of many thousand nodes).
pub const MAX_ANSWER_LEN: usize = 16 * 1024 * 1024;
/// How long one enrolment may take end to end.
pub const ENROL_TIMEOUT: Duration = Duration::from_secs(15);

/// The hub's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Answer {
    /// Enrolled: the registry that lists the node.
    Ok {
        /// The hub-signed registry.
        registry: SignedRegistry,
    },
    /// Refused, with the reason (reused, expired, forged, malformed, compliance...).
    Refused {
        /// Why, for a person to read.
        reason: String,
    },
}

/// Why an enrolment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrolError {
    /// The hub key is not a valid ed25519 public key.
    #[error("hub id {0} is not a valid ed25519 public key")]
    BadHubKey(EndpointKey),
    /// The token is empty or longer than [`MAX_TOKEN_LEN`].
    #[error("join token is {len} bytes; expected 1..={MAX_TOKEN_LEN}")]
    TokenSize {
        /// Its length.
        len: usize,
    },
    /// The hub could not be reached or the stream broke.
    #[error("enrol with hub {hub} at {addr}: {reason}")]
    Transport {
        /// The hub.
        hub: String,
        /// Where it was dialled.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The hub did not answer within [`ENROL_TIMEOUT`].
    #[error("enrol with hub at {0}: no answer within {ENROL_TIMEOUT:?}")]
    Timeout(SocketAddr),
    /// The hub refused the token.
    #[error("hub refused enrolment: {0}")]
    Refused(String),
    /// The answer does not decode.
    #[error("hub answer is malformed: {0}")]
    Malformed(String),
    /// The registry in the answer does not verify against the hub key.
    #[error("hub answered with a registry that does not verify: {0}")]
    BadRegistry(#[from] SnapshotError),
    /// The registry verifies but does not list this node as active.
    #[error("hub answered ok, but its registry (seq {seq}) does not list this node as active")]
    NotListed {
        /// The registry's sequence number.
        seq: u64,
    },
}

/// Enrol `endpoint`'s key with the hub `hub` at `addr` using `token`.
/// Returns the signed registry, verified against `hub` and listing this node.
pub async fn enrol(
    endpoint: &iroh::Endpoint,
    hub: EndpointKey,
    addr: SocketAddr,
    token: &str,
) -> Result<SignedRegistry, EnrolError> {
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(EnrolError::TokenSize { len: token.len() });
    }
    let id = to_iroh(&hub).ok_or(EnrolError::BadHubKey(hub))?;
    let vk =
        ed25519_dalek::VerifyingKey::from_bytes(&hub.0).map_err(|_| EnrolError::BadHubKey(hub))?;
    let transport = |reason: String| EnrolError::Transport {
        hub: hub.short(),
        addr,
        reason,
    };
    let exchange = async {
        let conn = endpoint
            .connect(iroh::EndpointAddr::new(id).with_ip_addr(addr), ENROL_ALPN)
            .await
            .map_err(|e| transport(format!("connect: {e}")))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| transport(format!("open stream: {e}")))?;
        send.write_all(&(token.len() as u32).to_be_bytes())
            .await
            .map_err(|e| transport(format!("send: {e}")))?;
        send.write_all(token.as_bytes())
            .await
            .map_err(|e| transport(format!("send: {e}")))?;
        send.finish().map_err(|e| transport(format!("send: {e}")))?;
        let body = read_frame(&mut recv, MAX_ANSWER_LEN)
            .await
            .map_err(|e| transport(format!("read answer: {e}")))?;
        conn.close(VarInt::from_u32(0), b"done");
        Ok::<_, EnrolError>(body)
    };
    let body = tokio::time::timeout(ENROL_TIMEOUT, exchange)
        .await
        .map_err(|_| EnrolError::Timeout(addr))??;
    let answer: Answer =
        serde_json::from_slice(&body).map_err(|e| EnrolError::Malformed(e.to_string()))?;
    match answer {
        Answer::Refused { reason } => Err(EnrolError::Refused(reason)),
        Answer::Ok { registry } => {
            let snap = registry.verify(&vk)?;
            let me = from_iroh(&endpoint.id());
            if crate::registry::check_record(snap.lookup(&me), &me, snap.seq).is_err() {
                return Err(EnrolError::NotListed { seq: snap.seq });
            }
            Ok(registry)
        }
    }
}

async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(format!("frame of {len} bytes exceeds the limit of {max}"));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

/// The hub side: redeems a token for the key that presented it.
pub trait Enroller: Send + Sync + 'static {
    /// Redeem `token` for `endpoint`; on success the signed registry listing
    /// it, else the refusal reason. Called on a blocking thread: it may write
    /// files.
    fn enrol(&self, token: &str, endpoint: EndpointKey) -> Result<SignedRegistry, String>;
}

/// The iroh protocol handler for [`ENROL_ALPN`].
pub struct EnrolHandler<E> {
    enroller: Arc<E>,
}

impl<E> std::fmt::Debug for EnrolHandler<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrolHandler")
    }
}

impl<E> Clone for EnrolHandler<E> {
    fn clone(&self) -> Self {
        EnrolHandler {
            enroller: self.enroller.clone(),
        }
    }
}

impl<E: Enroller> EnrolHandler<E> {
    /// A handler redeeming tokens through `enroller`.
    pub fn new(enroller: Arc<E>) -> Self {
        EnrolHandler { enroller }
    }

    async fn serve(&self, conn: &Connection) -> Result<(), String> {
        let peer = from_iroh(&conn.remote_id());
        let (mut send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| format!("accept stream: {e}"))?;
        let answer = match read_frame(&mut recv, MAX_TOKEN_LEN).await {
            Err(e) => Answer::Refused {
                reason: format!("malformed request: {e}"),
            },
            Ok(bytes) => match String::from_utf8(bytes) {
                Err(_) => Answer::Refused {
                    reason: "malformed token: not UTF-8".into(),
                },
                Ok(token) => {
                    let enroller = self.enroller.clone();
                    match tokio::task::spawn_blocking(move || enroller.enrol(&token, peer)).await {
                        Ok(Ok(registry)) => Answer::Ok { registry },
                        Ok(Err(reason)) => Answer::Refused { reason },
                        Err(e) => Answer::Refused {
                            reason: format!("hub error while enrolling: {e}"),
                        },
                    }
                }
            },
        };
        match &answer {
            Answer::Ok { .. } => tracing::info!(peer = %peer.short(), "enrolled"),
            Answer::Refused { reason } => {
                tracing::warn!(peer = %peer.short(), %reason, "enrolment refused")
            }
        }
        let body = serde_json::to_vec(&answer).map_err(|e| e.to_string())?;
        send.write_all(&(body.len() as u32).to_be_bytes())
            .await
            .map_err(|e| e.to_string())?;
        send.write_all(&body).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        // Wait for the client to read and close, bounded.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        Ok(())
    }
}

impl<E: Enroller> ProtocolHandler for EnrolHandler<E> {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        match tokio::time::timeout(ENROL_TIMEOUT, self.serve(&conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "enrolment stream failed");
                conn.close(VarInt::from_u32(2), e.as_bytes());
            }
            Err(_) => conn.close(VarInt::from_u32(2), b"enrolment timed out"),
        }
        Ok(())
    }
}
