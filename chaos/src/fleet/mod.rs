//! Running a scenario against a real local fleet: `cloud-hub` and
//! `edge-node` child processes, simulated devices in process (testbed),
//! and one fault-injecting relay per node pair between them.
//!
//! - [`plan`]: pure. Names, directories, fixed sync ports, device ids, and
//!   the TOML configs of every node, wired so that every `[hub].addr`,
//!   `[[peers]].addr` and `upstream.addr` is a relay address
//!   ([`plan::check_routing`] refuses a plan that leaks a real address).
//! - [`process`]: child processes, their logs, `ready` lines, kill -9.
//! - [`http`]: a tiny HTTP/1.1 client for the hub and edge APIs (loopback).
//! - [`run`]: the runner: start, timeline, quiescence, observations.
//!
//! Architecture invariant: no node can reach another node except through
//! that pair's relay. With [`Isolation::Netns`] (the default of `chaos
//! run`) every node runs in its own network namespace ([`crate::netns`])
//! and can reach only its gateway, where its relays and devices listen:
//! iroh learns real peer addresses inside QUIC and would otherwise route
//! around the relay (`chaos/notes/bypass-finding.md`). The runner probes
//! every direct path at start and records the result for the isolation
//! checker. Sync addresses are fixed per node for the whole run (a
//! restarted node binds the same one), so each relay's targets stay valid.
//! With [`Isolation::Loopback`] configs still name only relay addresses,
//! but that is not enough, and the isolation verdict cannot pass.

pub mod clock;
pub mod flood;
pub mod http;
pub mod observe;
pub mod plan;
pub mod process;
pub mod run;

use std::path::PathBuf;

/// How the nodes of a fleet run are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// One network namespace per node (needs root, or CAP_NET_ADMIN and
    /// CAP_SYS_ADMIN): only the relays connect them.
    Netns,
    /// Every node on the host's loopback: configs name only relays, but
    /// iroh may learn and use a direct path, so partitions are not proven.
    #[default]
    Loopback,
}

impl Isolation {
    /// `netns` or `loopback` (as recorded in the run).
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Netns => "netns",
            Isolation::Loopback => "loopback",
        }
    }
}

/// Errors of the fleet runner. Every variant says which node or file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// A scenario name or device path cannot be mapped onto the fleet.
    #[error("plan: {0}")]
    Plan(String),
    /// A file or directory could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A node's config would let it reach a peer without its relay.
    #[error("routing: {0}")]
    Routing(String),
    /// A helper command (`cloud-hub init`, `token create`, ...) failed.
    #[error("{node}: `{command}` failed: {detail}")]
    Command {
        /// The node.
        node: String,
        /// The command line.
        command: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// A node process could not be started or did not get ready in time.
    #[error("{node}: {detail}")]
    Process {
        /// The node.
        node: String,
        /// What happened (with the tail of its log).
        detail: String,
    },
    /// An HTTP call failed.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// The relay mesh failed.
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    /// Network namespaces could not be set up, removed or probed.
    #[error("network namespaces: {0}")]
    Netns(#[from] crate::netns::NetnsError),
    /// The scenario uses an action the runner cannot carry out yet.
    #[error("unsupported: {0}")]
    Unsupported(String),
}
