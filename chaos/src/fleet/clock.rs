//! Clock skew for fleet runs, and what a skewed edge keeps to itself.
//!
//! `edge-node` and `cloud-hub` read a **test-only** offset file when
//! started with `FIELDSYNC_CLOCK_OFFSET_FILE=<path>`: wall clock = system
//! clock + the file's integer (ms), re-read every 200 ms; monotonic time is
//! not moved. The runner sets the variable on every start of a node the
//! scenario skews ([`skewed_nodes`]), from its first start (the file is
//! missing until the first skew: offset 0), and carries out `clock-skew`
//! by rewriting the file atomically ([`apply`]).
//!
//! - `offset = "+2h"` shifts the node's clock relative to where it is
//!   (offsets add up: `+2h` then `-2h` is back to real time);
//! - `set_to_ms = T` sets it to `T` now: offset = `T - real now`.
//!
//! An edge whose clock is implausible (before `PLAUSIBLE_EPOCH`) keeps the
//! rollups of those samples in its local bucket (`local-rollups.json`,
//! `clock_unsynced`), never in a day document: [`read_local_rollups`] reads
//! them after the run for the telemetry checker, which counts them as held
//! on the edge, not lost and not in the hub.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use schemas::metrics::Rollup;

use super::FleetError;
use super::plan::NodePlan;
use crate::check::LocalRollup;
use crate::scenario::{Action, ClockChange, NodeRole, Scenario};

/// The environment variable the nodes read (test only).
pub const CLOCK_OFFSET_ENV: &str = "FIELDSYNC_CLOCK_OFFSET_FILE";

/// Name of the offset file in a node's directory.
pub const OFFSET_FILE: &str = "clock-offset-ms";

/// Name of an edge's local rollup bucket in its data directory.
pub const LOCAL_ROLLUPS_FILE: &str = "local-rollups.json";

/// A node's offset file.
pub fn offset_path(n: &NodePlan) -> PathBuf {
    n.dir.join(OFFSET_FILE)
}

/// Nodes the scenario skews at some point: they run with the offset file
/// from their first start.
pub fn skewed_nodes(s: &Scenario) -> BTreeSet<String> {
    s.timeline
        .iter()
        .filter_map(|ta| match &ta.action {
            Action::ClockSkew { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

/// `program args..`, run with `env` set first (through `env(1)`, which
/// execs the program: the pid stays the node's). Unchanged if `env` is
/// empty.
pub fn with_env(
    program: PathBuf,
    args: Vec<String>,
    env: &[(String, String)],
) -> (PathBuf, Vec<String>) {
    if env.is_empty() {
        return (program, args);
    }
    let mut out: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push(program.display().to_string());
    out.extend(args);
    (PathBuf::from("env"), out)
}

/// The environment a node starts with: the offset file if it is skewed.
pub fn node_env(n: &NodePlan, skewed: &BTreeSet<String>) -> Vec<(String, String)> {
    if skewed.contains(&n.name) {
        vec![(
            CLOCK_OFFSET_ENV.to_string(),
            offset_path(n).display().to_string(),
        )]
    } else {
        Vec::new()
    }
}

/// The offset after `change`, given the current offset and the real wall
/// clock (ms since the epoch).
pub fn next_offset(change: ClockChange, current_ms: i64, real_now_ms: i64) -> i64 {
    match change {
        ClockChange::OffsetMs(d) => current_ms.saturating_add(d),
        ClockChange::SetTo(t) => t.0.saturating_sub(real_now_ms),
    }
}

/// The offset a file holds now (missing: 0).
pub fn read_offset(path: &Path) -> Result<i64, FleetError> {
    match std::fs::read_to_string(path) {
        Ok(t) => t
            .trim()
            .parse()
            .map_err(|e| FleetError::Plan(format!("{}: not an offset in ms: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(FleetError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write `offset_ms` to `path` atomically (temporary file, then rename),
/// so a node never reads half a number.
pub fn write_offset(path: &Path, offset_ms: i64) -> Result<(), FleetError> {
    let io = |source| FleetError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset_ms}\n")).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Carry out `change` on the node whose offset file is `path`; returns
/// the new offset.
pub fn apply(path: &Path, change: ClockChange, real_now_ms: i64) -> Result<i64, FleetError> {
    let next = next_offset(change, read_offset(path)?, real_now_ms);
    write_offset(path, next)?;
    Ok(next)
}

/// The real wall clock, ms since the epoch: needed once per `set_to_ms`
/// skew, to turn an absolute time into an offset.
pub fn system_now_ms() -> i64 {
    // The runner is the outermost layer; the nodes it skews read their
    // own (injected) clocks.
    #[allow(clippy::disallowed_methods)]
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The rollups a stopped edge keeps in its local bucket (unsynced-clock
/// windows, and writes to sealed days). An edge without a bucket file
/// holds none.
pub fn read_local_rollups(n: &NodePlan) -> Result<Vec<LocalRollup>, FleetError> {
    let NodeRole::Edge { site, .. } = &n.role else {
        return Ok(Vec::new());
    };
    let path = n.data_dir().join(LOCAL_ROLLUPS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(FleetError::Io { path, source }),
    };
    let map: BTreeMap<String, Rollup> = serde_json::from_slice(&bytes)
        .map_err(|e| FleetError::Plan(format!("{}: {e}", path.display())))?;
    Ok(map
        .into_iter()
        .map(|(key, rollup)| LocalRollup {
            edge: n.name.clone(),
            site: site.clone(),
            key,
            rollup,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::time::Timestamp;

    #[test]
    fn offsets_add_up_and_set_to_is_relative_to_real_now() {
        let real = 1_760_000_000_000;
        assert_eq!(
            next_offset(ClockChange::OffsetMs(7_200_000), 0, real),
            7_200_000
        );
        assert_eq!(
            next_offset(ClockChange::OffsetMs(-7_200_000), 7_200_000, real),
            0
        );
        // "set_to_ms = 0": the node's clock reads 0 (1970) now.
        let off = next_offset(ClockChange::SetTo(Timestamp(0)), 12_345, real);
        assert_eq!(off, -real);
        assert_eq!(real + off, 0);
    }

    #[test]
    fn apply_writes_the_offset_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OFFSET_FILE);
        assert_eq!(read_offset(&path).unwrap(), 0, "missing file is no offset");
        assert_eq!(
            apply(&path, ClockChange::OffsetMs(7_200_000), 5).unwrap(),
            7_200_000
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "7200000\n");
        assert_eq!(
            apply(&path, ClockChange::OffsetMs(-7_200_000), 5).unwrap(),
            0
        );
        let real = 1_760_000_000_000;
        assert_eq!(
            apply(&path, ClockChange::SetTo(Timestamp(0)), real).unwrap(),
            -real
        );
        assert_eq!(read_offset(&path).unwrap(), -real);
        assert!(!path.with_extension("tmp").exists(), "temporary file left");
    }

    #[test]
    fn env_wraps_the_command_only_for_skewed_nodes() {
        let (p, a) = with_env("edge-node".into(), vec!["run".into()], &[]);
        assert_eq!(
            (p, a),
            (PathBuf::from("edge-node"), vec!["run".to_string()])
        );
        let (p, a) = with_env(
            "/bin/edge-node".into(),
            vec!["run".into(), "--config".into(), "e.toml".into()],
            &[(CLOCK_OFFSET_ENV.into(), "/r/n/clock-offset-ms".into())],
        );
        assert_eq!(p, PathBuf::from("env"));
        assert_eq!(
            a,
            [
                "FIELDSYNC_CLOCK_OFFSET_FILE=/r/n/clock-offset-ms",
                "/bin/edge-node",
                "run",
                "--config",
                "e.toml"
            ]
        );
    }

    #[test]
    fn the_library_scenario_skews_both_edges() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scenarios")
            .join("clock-skew-and-1970-boot.toml");
        let s = Scenario::load(&path).unwrap();
        let n: Vec<String> = skewed_nodes(&s).into_iter().collect();
        assert_eq!(n, ["coldstore-1/edge-1", "coldstore-1/edge-2"]);
    }
}
