//! Chaos testing for fieldsync: a fault-injecting UDP link, scenario files,
//! pure invariant checkers over a recorded run, and reports.
//!
//! The story: a reliability engineer writes a [`scenario`] (TOML: a fleet
//! shape, a timeline of partitions, link faults, kills, clock skew,
//! concurrent edits, commands, floods, device faults; checker settings) and
//! validates it with `chaos check-scenarios`. The runner ([`fleet`],
//! `chaos run`) starts a real fleet and puts a [`mesh::RelayMesh`] between the nodes, one
//! [`link::Relay`] per node pair, applies [`scenario::Scenario::link_changes`]
//! at their offsets, records a [`check::RunRecord`] (start from
//! [`check::RunRecord::from_scenario`]), and `chaos report` turns it into
//! verdicts with evidence ([`check`]) rendered as JSON, text and an SVG
//! timeline ([`report`]). Exit codes: 0 pass, 1 fail, 2 error or undecided.
//!
//! [`sim`] (`chaos sim`) runs sync-core's deterministic simulator over
//! many seeds and reports failures with the same evidence types.
//!
//! Everything but the relay driver and the fleet runner is pure: the shaper takes `now` as an
//! argument, checkers and reports are functions of their input.
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
pub mod fleet;
pub mod link;
pub mod mesh;
pub mod netns;
pub mod report;
pub mod scenario;
pub mod sim;
