//! Chaos testing for fieldsync: a fault-injecting UDP link, scenario files,
//! pure invariant checkers over a recorded run, and reports.
//!
//! Reliability engineers describe a fault schedule as a TOML [`scenario`],
//! a runner (later: against a real local fleet) drives it through one
//! [`link::Relay`] per node pair and records a [`check::RunRecord`], and the
//! [`check`]ers turn that record into verdicts with evidence, which
//! [`report`] renders as JSON, text and an SVG timeline.
//!
//! ```
//! use chaos::link::{Direction, LinkFaults, Shaper};
//! use std::time::{Duration, Instant};
//!
//! // The fault logic is sans-IO: datagrams and `now` in, datagrams out.
//! let mut s = Shaper::new(42);
//! s.set_faults(LinkFaults { delay: Duration::from_millis(10), ..LinkFaults::default() });
//! let t0 = Instant::now();
//! s.handle_datagram(t0, b"hello");
//! assert!(s.poll_transmit(t0).is_none());
//! assert_eq!(s.poll_transmit(t0 + Duration::from_millis(10)).as_deref(), Some(&b"hello"[..]));
//! let _ = Direction::AToB;
//! ```

pub mod check;
pub mod link;
pub mod mesh;
pub mod report;
pub mod scenario;
