//! The layout of each document kind inside Automerge, and typed accessors.
//!
//! Every document starts from a deterministic [`genesis`]: the same id gives
//! the same first change (same actor, same time, same ops) on every node, so
//! two nodes that "create" `dev/pump-7` independently share history and merge.
//! Genesis creates the document's top-level maps, so no two replicas ever
//! create the same map concurrently (which would make two maps, not one).
//!
//! Layout (root keys):
//!
//! | kind | keys |
//! |---|---|
//! | site | `info` map |
//! | device | `desired` map (one scalar per field: concurrent writes stay visible), `reported` (JSON, owning edge only), `meta` map |
//! | telemetry, aggregate | `rollups` map: `{metric}@{window_start_ms}` -> JSON rollup (whole window, overwritten) |
//! | commands | `requests` map: id -> JSON command; `results` map: id -> JSON result |
//! | alarms | `alarms` map: id -> JSON alarm (edge); `acks` map: id -> JSON ack (operators) |
//! | policy | `policy` (JSON) |
//! | identity | `registry` (signed registry snapshot, bytes) |

use std::collections::BTreeMap;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use schemas::device::{FieldValue, MergePolicy};
use schemas::ids::{DocId, DocKind};

/// A document could not be read or written as its kind's layout says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// The document lacks a key its genesis creates (not a fieldsync document).
    #[error("document has no {0:?} map: not created from a fieldsync genesis")]
    MissingMap(&'static str),
    /// A value did not decode as its contract.
    #[error("{key}: {reason}")]
    BadValue { key: String, reason: String },
    /// The field is not a known desired-config field, or the value does not fit it.
    #[error("{0}")]
    Invalid(String),
}

/// The actor that authors every genesis change: 16 bytes derived from the id.
/// (Node actors are 40 bytes, so a genesis actor is never mistaken for one.)
pub fn genesis_actor(id: &DocId) -> ActorId {
    let h = blake3::hash(format!("fieldsync/genesis/v1/{id}").as_bytes());
    ActorId::from(h.as_bytes()[..16].to_vec())
}

fn top_maps(kind: DocKind) -> &'static [&'static str] {
    match kind {
        DocKind::Site => &["info"],
        DocKind::Device => &["desired", "meta"],
        DocKind::Telemetry | DocKind::Aggregate => &["rollups"],
        DocKind::Commands => &["requests", "results"],
        DocKind::Alarms => &["alarms", "acks"],
        DocKind::Policy | DocKind::Identity => &[],
    }
}

/// The deterministic first state of document `id`.
pub fn genesis(id: &DocId) -> AutoCommit {
    let mut doc = AutoCommit::new().with_actor(genesis_actor(id));
    // The genesis change writes the id itself, so documents of different ids
    // never share a genesis hash.
    let ok = doc.put(ROOT, "_id", id.to_string()).is_ok()
        && top_maps(id.kind())
            .iter()
            .all(|k| doc.put_object(ROOT, *k, ObjType::Map).is_ok());
    debug_assert!(ok, "genesis writes to a fresh document cannot fail");
    doc.commit_with(CommitOptions::default().with_time(0));
    doc
}

/// The change hash of the genesis of `id`.
pub fn genesis_hash(id: &DocId) -> Option<automerge::ChangeHash> {
    let mut g = genesis(id);
    g.get_heads().first().copied()
}

fn map(doc: &AutoCommit, key: &'static str) -> Result<ObjId, DocError> {
    match doc.get(ROOT, key)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(DocError::MissingMap(key)),
    }
}

fn scalar_to_field(s: &ScalarValue) -> Option<FieldValue> {
    match s {
        ScalarValue::Boolean(b) => Some(FieldValue::Bool(*b)),
        ScalarValue::F64(f) => Some(FieldValue::Number(*f)),
        ScalarValue::Int(i) => Some(FieldValue::Number(*i as f64)),
        ScalarValue::Uint(u) => Some(FieldValue::Number(*u as f64)),
        ScalarValue::Str(s) => Some(FieldValue::Text(s.to_string())),
        _ => None,
    }
}

fn field_to_scalar(v: &FieldValue) -> ScalarValue {
    match v {
        FieldValue::Bool(b) => ScalarValue::Boolean(*b),
        FieldValue::Number(n) => ScalarValue::F64(*n),
        FieldValue::Text(t) => ScalarValue::Str(t.as_str().into()),
    }
}

fn put_json<T: serde::Serialize>(
    doc: &mut AutoCommit,
    obj: &ObjId,
    key: &str,
    v: &T,
) -> Result<(), DocError> {
    let text = serde_json::to_string(v).map_err(|e| DocError::BadValue {
        key: key.into(),
        reason: e.to_string(),
    })?;
    doc.put(obj, key, text)?;
    Ok(())
}

fn get_json<T: serde::de::DeserializeOwned>(
    doc: &AutoCommit,
    obj: &ObjId,
    key: &str,
) -> Result<Option<T>, DocError> {
    match doc.get(obj, key)? {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(text) => {
                serde_json::from_str(text)
                    .map(Some)
                    .map_err(|e| DocError::BadValue {
                        key: key.into(),
                        reason: e.to_string(),
                    })
            }
            other => Err(DocError::BadValue {
                key: key.into(),
                reason: format!("expected JSON text, found {other:?}"),
            }),
        },
        Some(_) => Err(DocError::BadValue {
            key: key.into(),
            reason: "expected JSON text, found an object".into(),
        }),
        None => Ok(None),
    }
}

/// Every JSON value of a map, in key order; undecodable entries are reported
/// as errors beside the good ones, never silently dropped.
fn all_json<T: serde::de::DeserializeOwned>(
    doc: &AutoCommit,
    obj: &ObjId,
) -> (Vec<(String, T)>, Vec<DocError>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for key in doc.keys(obj) {
        match get_json::<T>(doc, obj, &key) {
            Ok(Some(v)) => out.push((key, v)),
            Ok(None) => {}
            Err(e) => bad.push(e),
        }
    }
    (out, bad)
}

/// Device documents: desired config with conflicts, reported state, metadata.
pub mod device {
    use super::*;
    use schemas::device::ReportedState;

    /// One desired field: every concurrent value, and the effective one.
    #[derive(Debug, Clone, PartialEq, serde::Serialize)]
    pub struct DesiredField {
        /// The value in force after the field's merge policy.
        pub effective: FieldValue,
        /// All concurrent values (more than one means an open conflict).
        pub values: Vec<FieldValue>,
        pub policy: MergePolicy,
    }

    impl DesiredField {
        pub fn in_conflict(&self) -> bool {
            self.values.len() > 1
        }
    }

    /// Write one desired field after checking it against its declaration.
    pub fn set_desired(
        doc: &mut AutoCommit,
        field: &str,
        value: &FieldValue,
    ) -> Result<(), DocError> {
        let spec = schemas::device::field_spec(field)
            .ok_or_else(|| DocError::Invalid(format!("unknown desired field {field:?}")))?;
        spec.check(value).map_err(DocError::Invalid)?;
        let m = map(doc, "desired")?;
        doc.put(&m, field, field_to_scalar(value))?;
        Ok(())
    }

    /// Every desired field with its concurrent values and effective value.
    pub fn desired(doc: &AutoCommit) -> Result<BTreeMap<String, DesiredField>, DocError> {
        let m = map(doc, "desired")?;
        let mut out = BTreeMap::new();
        for key in doc.keys(&m) {
            let values: Vec<FieldValue> = doc
                .get_all(&m, key.as_str())?
                .into_iter()
                .filter_map(|(v, _)| match v {
                    Value::Scalar(s) => scalar_to_field(s.as_ref()),
                    Value::Object(_) => None,
                })
                .collect();
            let policy =
                schemas::device::field_spec(&key).map_or(MergePolicy::LastWriter, |s| s.policy);
            if let Some(i) = policy.resolve(&values) {
                out.insert(
                    key,
                    DesiredField {
                        effective: values[i].clone(),
                        values,
                        policy,
                    },
                );
            }
        }
        Ok(out)
    }

    /// The effective value of one numeric field.
    pub fn desired_number(doc: &AutoCommit, field: &str) -> Result<Option<f64>, DocError> {
        Ok(desired(doc)?.get(field).and_then(|f| f.effective.as_f64()))
    }

    pub fn set_reported(doc: &mut AutoCommit, state: &ReportedState) -> Result<(), DocError> {
        put_json(doc, &ROOT, "reported", state)
    }

    pub fn reported(doc: &AutoCommit) -> Result<Option<ReportedState>, DocError> {
        get_json(doc, &ROOT, "reported")
    }

    /// Device type and tags, for fleet grouping and rollout selectors.
    pub fn set_meta(
        doc: &mut AutoCommit,
        device_type: &str,
        tags: &[String],
    ) -> Result<(), DocError> {
        let m = map(doc, "meta")?;
        if get_json::<String>(doc, &m, "device_type")?.as_deref() != Some(device_type) {
            put_json(doc, &m, "device_type", &device_type)?;
        }
        if get_json::<Vec<String>>(doc, &m, "tags")?.as_deref() != Some(tags) {
            put_json(doc, &m, "tags", &tags)?;
        }
        Ok(())
    }

    pub fn meta(doc: &AutoCommit) -> Result<(Option<String>, Vec<String>), DocError> {
        let m = map(doc, "meta")?;
        Ok((
            get_json(doc, &m, "device_type")?,
            get_json(doc, &m, "tags")?.unwrap_or_default(),
        ))
    }
}

/// Telemetry and aggregate documents: rollups keyed by metric and window.
pub mod telemetry {
    use super::*;
    use schemas::metrics::Rollup;

    pub fn key(r: &Rollup) -> String {
        format!("{}@{}", r.metric, r.window_start.as_millis())
    }

    /// Write (overwrite) the whole rollup of one window. Skips the write if
    /// the stored rollup is identical, so re-summarising costs nothing.
    pub fn put_rollup(doc: &mut AutoCommit, r: &Rollup) -> Result<bool, DocError> {
        let m = map(doc, "rollups")?;
        let k = key(r);
        if get_json::<Rollup>(doc, &m, &k).ok().flatten().as_ref() == Some(r) {
            return Ok(false);
        }
        put_json(doc, &m, &k, r)?;
        Ok(true)
    }

    /// Every rollup, plus any entries that failed to decode.
    pub fn rollups(doc: &AutoCommit) -> Result<(Vec<Rollup>, Vec<DocError>), DocError> {
        let m = map(doc, "rollups")?;
        let (items, bad) = all_json::<Rollup>(doc, &m);
        Ok((items.into_iter().map(|(_, r)| r).collect(), bad))
    }

    /// Root-key prefix of a late part: samples of a window that arrived
    /// after the window's rollup was written, kept apart
    /// (`late:{metric}@{window_ms}#{seq}`) because [`put_rollup`]
    /// overwrites a whole window.
    pub const LATE_PREFIX: &str = "late:";

    /// Every window's rollup with its late parts merged in
    /// ([`Rollup::merge`]), plus any entries that failed to decode. What a
    /// reader that counts samples wants: [`rollups`] alone misses the late
    /// ones.
    pub fn rollups_with_late(doc: &AutoCommit) -> Result<(Vec<Rollup>, Vec<DocError>), DocError> {
        let (main, mut bad) = rollups(doc)?;
        let mut by_key: BTreeMap<String, Rollup> = main.into_iter().map(|r| (key(&r), r)).collect();
        for k in doc.keys(automerge::ROOT) {
            if !k.starts_with(LATE_PREFIX) {
                continue;
            }
            match get_root_json::<Rollup>(doc, &k) {
                Ok(Some(late)) => match by_key.get_mut(&key(&late)) {
                    Some(r) => r.merge(&late),
                    None => {
                        by_key.insert(key(&late), late);
                    }
                },
                Ok(None) => {}
                Err(e) => bad.push(e),
            }
        }
        Ok((by_key.into_values().collect(), bad))
    }
}

/// Command documents: requests (hub, operators) and results (edges).
pub mod commands {
    use super::*;
    use schemas::command::{Command, CommandResult};

    pub fn put_request(doc: &mut AutoCommit, c: &Command) -> Result<(), DocError> {
        c.validate().map_err(DocError::Invalid)?;
        let m = map(doc, "requests")?;
        if get_json::<Command>(doc, &m, &c.id)?.is_some() {
            return Ok(()); // idempotent: the first request with an id stands
        }
        put_json(doc, &m, &c.id, c)
    }

    pub fn requests(doc: &AutoCommit) -> Result<(Vec<Command>, Vec<DocError>), DocError> {
        let m = map(doc, "requests")?;
        let (items, bad) = all_json::<Command>(doc, &m);
        Ok((items.into_iter().map(|(_, c)| c).collect(), bad))
    }

    pub fn put_result(doc: &mut AutoCommit, r: &CommandResult) -> Result<(), DocError> {
        let m = map(doc, "results")?;
        put_json(doc, &m, &r.command_id, r)
    }

    pub fn results(doc: &AutoCommit) -> Result<BTreeMap<String, CommandResult>, DocError> {
        let m = map(doc, "results")?;
        let (items, _bad) = all_json::<CommandResult>(doc, &m);
        Ok(items.into_iter().collect())
    }
}

/// Alarm documents: alarms raised and cleared by the edge, acks by operators.
pub mod alarms {
    use super::*;
    use schemas::alarm::Alarm;
    use schemas::time::Timestamp;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Ack {
        pub by: String,
        pub at: Timestamp,
    }

    pub fn put_alarm(doc: &mut AutoCommit, a: &Alarm) -> Result<(), DocError> {
        let m = map(doc, "alarms")?;
        put_json(doc, &m, &a.id, a)
    }

    pub fn ack(doc: &mut AutoCommit, id: &str, by: &str, at: Timestamp) -> Result<(), DocError> {
        let m = map(doc, "alarms")?;
        if get_json::<Alarm>(doc, &m, id)?.is_none() {
            return Err(DocError::Invalid(format!("no alarm {id:?}")));
        }
        let acks = map(doc, "acks")?;
        put_json(
            doc,
            &acks,
            id,
            &Ack {
                by: by.to_string(),
                at,
            },
        )
    }

    /// Alarms with their acknowledgements folded in.
    pub fn alarms(doc: &AutoCommit) -> Result<Vec<Alarm>, DocError> {
        let m = map(doc, "alarms")?;
        let acks = map(doc, "acks")?;
        let (items, _bad) = all_json::<Alarm>(doc, &m);
        Ok(items
            .into_iter()
            .map(|(id, mut a)| {
                if let Ok(Some(ack)) = get_json::<Ack>(doc, &acks, &id) {
                    a.acked_by = Some(ack.by);
                    a.acked_at = Some(ack.at);
                }
                a
            })
            .collect())
    }
}

/// Generic JSON value at a root key (policy, registry).
pub fn put_root_json<T: serde::Serialize>(
    doc: &mut AutoCommit,
    key: &str,
    v: &T,
) -> Result<(), DocError> {
    put_json(doc, &ROOT, key, v)
}

pub fn get_root_json<T: serde::de::DeserializeOwned>(
    doc: &AutoCommit,
    key: &str,
) -> Result<Option<T>, DocError> {
    get_json(doc, &ROOT, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;

    #[test]
    fn late_parts_merge_into_their_window_and_count() {
        use schemas::metrics::{Rollup, Sample};
        use schemas::time::Timestamp;
        let sample = |metric: &str, ts: i64, value: f64| {
            Rollup::of_sample(
                &Sample {
                    schema_version: Default::default(),
                    device: "d1".parse().unwrap(),
                    metric: metric.into(),
                    ts: Timestamp(ts),
                    value,
                    unit: Default::default(),
                },
                60_000,
            )
        };
        let mut doc = genesis(&"t/acme/s/s1/tel/d1/2026-01-01".parse().unwrap());
        let mut main = sample("temp", 60_000, 1.0);
        main.merge(&sample("temp", 60_500, 2.0));
        telemetry::put_rollup(&mut doc, &main).unwrap();
        // A late sample of the same window, and one of a window with no
        // main rollup at all.
        put_root_json(&mut doc, "late:temp@60000#0", &sample("temp", 61_000, 9.0)).unwrap();
        put_root_json(
            &mut doc,
            "late:temp@120000#1",
            &sample("temp", 120_001, 4.0),
        )
        .unwrap();
        let (plain, _) = telemetry::rollups(&doc).unwrap();
        assert_eq!(
            plain.iter().map(|r| r.count).sum::<u64>(),
            2,
            "the main map alone"
        );
        let (all, bad) = telemetry::rollups_with_late(&doc).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(all.len(), 2);
        let w1 = all
            .iter()
            .find(|r| r.window_start == Timestamp(60_000))
            .unwrap();
        assert_eq!((w1.count, w1.sum, w1.max), (3, 12.0, 9.0));
        let w2 = all
            .iter()
            .find(|r| r.window_start == Timestamp(120_000))
            .unwrap();
        assert_eq!(w2.count, 1);
        // A corrupt late part is reported, not skipped silently.
        put_root_json(&mut doc, "late:temp@180000#2", &"not a rollup").unwrap();
        let (_, bad) = telemetry::rollups_with_late(&doc).unwrap();
        assert_eq!(bad.len(), 1);
    }

    fn id() -> DocId {
        "t/acme/s/s1/dev/pump-1".parse().unwrap()
    }

    #[test]
    fn genesis_is_deterministic_and_per_id() {
        let mut a = genesis(&id());
        let mut b = genesis(&id());
        assert_eq!(a.get_heads(), b.get_heads());
        assert_eq!(a.save(), b.save());
        let mut c = genesis(&"t/acme/s/s1/dev/pump-2".parse().unwrap());
        assert_ne!(a.get_heads(), c.get_heads());
    }

    fn sync_pair(a: &mut AutoCommit, b: &mut AutoCommit) {
        let (mut sa, mut sb) = (automerge::sync::State::new(), automerge::sync::State::new());
        for _ in 0..10 {
            let m1 = a.sync().generate_sync_message(&mut sa);
            if let Some(m) = m1.clone() {
                b.sync().receive_sync_message(&mut sb, m).unwrap();
            }
            let m2 = b.sync().generate_sync_message(&mut sb);
            if let Some(m) = m2.clone() {
                a.sync().receive_sync_message(&mut sa, m).unwrap();
            }
            if m1.is_none() && m2.is_none() {
                break;
            }
        }
    }

    #[test]
    fn concurrent_desired_edits_keep_both_and_apply_policy() {
        let mut a = genesis(&id()).with_actor(ActorId::from(vec![1u8; 40]));
        let mut b = genesis(&id()).with_actor(ActorId::from(vec![2u8; 40]));
        device::set_desired(&mut a, "high_limit", &FieldValue::Number(8.0)).unwrap();
        device::set_desired(&mut b, "high_limit", &FieldValue::Number(6.0)).unwrap();
        device::set_desired(&mut a, "label", &FieldValue::Text("north".into())).unwrap();
        a.commit();
        b.commit();
        sync_pair(&mut a, &mut b);
        assert_eq!(a.get_heads(), b.get_heads());
        let da = device::desired(&a).unwrap();
        let hl = &da["high_limit"];
        assert!(hl.in_conflict());
        assert_eq!(hl.effective, FieldValue::Number(6.0), "min_wins");
        assert_eq!(device::desired(&b).unwrap(), da);
        assert!(!da["label"].in_conflict());
        // Writing again resolves the conflict.
        device::set_desired(&mut a, "high_limit", &FieldValue::Number(7.0)).unwrap();
        assert!(!device::desired(&a).unwrap()["high_limit"].in_conflict());
        assert!(device::set_desired(&mut a, "nonsense", &FieldValue::Bool(true)).is_err());
        assert!(device::set_desired(&mut a, "high_limit", &FieldValue::Text("x".into())).is_err());
    }
}
