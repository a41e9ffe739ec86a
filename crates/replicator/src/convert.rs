//! Conversions between wire types and store types. This is the one place prost
//! types meet the rest of the code; every field of an incoming message is checked
//! here and a failure names the field.

use std::collections::BTreeMap;

use serde_json::Value;
use tidemark_hlc::Hlc;
use tidemark_store::model::parse_ulid;
use tidemark_store::{
    ChangeEvent, LoggedEvent, Operation, Position, TableInfo, Values, VersionVector, values_text,
};
use ulid::Ulid;

use crate::pb;

/// A field of an incoming message that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn ulid(field: &str, text: &str) -> Result<Ulid, FieldError> {
    parse_ulid(field, text).map_err(|e| match e {
        tidemark_store::StoreError::Invalid { reason, .. } => FieldError::new(field, reason),
        other => FieldError::new(field, other.to_string()),
    })
}

fn hlc(field: &str, raw: i64) -> Result<Hlc, FieldError> {
    Hlc::decode(raw).map_err(|e| FieldError::new(field, e.to_string()))
}

/// Parses a JSON object, naming `field` when it is not one.
pub fn json_object(field: &str, text: &str) -> Result<Values, FieldError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(FieldError::new(
            field,
            format!("expected a JSON object, found {}", kind(&other)),
        )),
        Err(e) => Err(FieldError::new(field, format!("malformed JSON: {e}"))),
    }
}

/// Parses a JSON object keeping each value's text (numbers keep every digit), naming
/// `field` when it is not one.
pub fn raw_object(field: &str, text: &str) -> Result<tidemark_store::RawValues, FieldError> {
    match serde_json::from_str::<tidemark_store::RawValues>(text) {
        Ok(m) => Ok(m),
        Err(e) => Err(match serde_json::from_str::<Value>(text) {
            Ok(other) if !other.is_object() => FieldError::new(
                field,
                format!("expected a JSON object, found {}", kind(&other)),
            ),
            _ => FieldError::new(field, format!("malformed JSON: {e}")),
        }),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn operation_to_pb(op: Operation) -> pb::Operation {
    match op {
        Operation::Insert => pb::Operation::Insert,
        Operation::Update => pb::Operation::Update,
        Operation::Delete => pb::Operation::Delete,
    }
}

fn operation_from_pb(raw: i32) -> Result<Operation, FieldError> {
    match pb::Operation::try_from(raw) {
        Ok(pb::Operation::Insert) => Ok(Operation::Insert),
        Ok(pb::Operation::Update) => Ok(Operation::Update),
        Ok(pb::Operation::Delete) => Ok(Operation::Delete),
        _ => Err(FieldError::new(
            "operation",
            format!("{raw} is not one of INSERT (1), UPDATE (2), DELETE (3)"),
        )),
    }
}

pub fn event_to_pb(e: &ChangeEvent) -> pb::Event {
    pb::Event {
        event_id: e.event_id.to_string(),
        hlc: e.hlc.encode(),
        wall_ms: e.wall_ms,
        node_id: e.node_id.to_string(),
        table_name: e.table_name.clone(),
        record_id: e.record_id.to_string(),
        operation: operation_to_pb(e.operation) as i32,
        action: e.action.clone(),
        user_id: e.user_id.map(|u| u.to_string()),
        old_values_json: None,
        new_values_json: e.new_values.as_ref().map(values_text),
        metadata_json: e.metadata.as_ref().map(Value::to_string),
    }
}

/// An event as the log stores it, onto the wire: its values and metadata
/// text moves into the message as stored (old values are not sent, as in
/// [`event_to_pb`]).
pub fn logged_to_pb(e: LoggedEvent) -> pb::Event {
    pb::Event {
        event_id: e.event_id.to_string(),
        hlc: e.hlc.encode(),
        wall_ms: e.wall_ms,
        node_id: e.node_id.to_string(),
        table_name: e.table_name,
        record_id: e.record_id.to_string(),
        operation: operation_to_pb(e.operation) as i32,
        action: e.action,
        user_id: e.user_id.map(|u| u.to_string()),
        old_values_json: None,
        new_values_json: e.new_values,
        metadata_json: e.metadata,
    }
}

/// Checks and converts an incoming event. Errors name the field (prefixed by
/// `event_id` when that parsed).
pub fn event_from_pb(e: pb::Event) -> Result<ChangeEvent, FieldError> {
    let event_id = ulid("event_id", &e.event_id)?;
    let at =
        |err: FieldError| FieldError::new(format!("event {event_id} {}", err.field), err.reason);
    let inner = || -> Result<ChangeEvent, FieldError> {
        if e.table_name.is_empty() || e.table_name.len() > 64 {
            return Err(FieldError::new(
                "table_name",
                format!("must be 1 to 64 bytes, got {}", e.table_name.len()),
            ));
        }
        let metadata = match &e.metadata_json {
            None => None,
            Some(m) => Some(Value::Object(json_object("metadata_json", m)?)),
        };
        Ok(ChangeEvent {
            event_id,
            hlc: hlc("hlc", e.hlc)?,
            wall_ms: e.wall_ms,
            node_id: ulid("node_id", &e.node_id)?,
            table_name: e.table_name.clone(),
            record_id: ulid("record_id", &e.record_id)?,
            operation: operation_from_pb(e.operation)?,
            action: e.action.clone(),
            user_id: e
                .user_id
                .as_deref()
                .map(|u| ulid("user_id", u))
                .transpose()?,
            old_values: None,
            new_values: e
                .new_values_json
                .as_deref()
                .map(|v| json_object("new_values_json", v))
                .transpose()?,
            metadata,
        })
    };
    inner().map_err(at)
}

/// An incoming event as JSON, exactly as sent (for the quarantine).
pub fn event_json(e: &pb::Event) -> Value {
    serde_json::json!({
        "event_id": e.event_id,
        "hlc": e.hlc,
        "wall_ms": e.wall_ms,
        "node_id": e.node_id,
        "table_name": e.table_name,
        "record_id": e.record_id,
        "operation": e.operation,
        "action": e.action,
        "user_id": e.user_id,
        "old_values_json": e.old_values_json,
        "new_values_json": e.new_values_json,
        "metadata_json": e.metadata_json,
    })
}

pub fn vector_to_pb(v: &VersionVector) -> pb::VersionVector {
    pb::VersionVector {
        entries: v
            .0
            .iter()
            .map(|(node, hlc)| pb::VectorEntry {
                node_id: node.to_string(),
                hlc: hlc.encode(),
            })
            .collect(),
    }
}

pub fn vector_from_pb(
    field: &str,
    v: Option<pb::VersionVector>,
) -> Result<VersionVector, FieldError> {
    let mut out = VersionVector::new();
    for (i, entry) in v.unwrap_or_default().entries.into_iter().enumerate() {
        let node = ulid(&format!("{field}.entries[{i}].node_id"), &entry.node_id)?;
        out.observe(node, hlc(&format!("{field}.entries[{i}].hlc"), entry.hlc)?);
    }
    Ok(out)
}

/// Positions per origin, ordered by origin.
pub fn positions_to_pb(positions: &BTreeMap<Ulid, Position>) -> Vec<pb::Position> {
    positions
        .iter()
        .map(|(origin, p)| pb::Position {
            origin: origin.to_string(),
            hlc: p.hlc.encode(),
            seq: p.seq,
        })
        .collect()
}

pub fn positions_from_pb(
    field: &str,
    positions: Vec<pb::Position>,
) -> Result<BTreeMap<Ulid, Position>, FieldError> {
    let mut out = BTreeMap::new();
    for (i, p) in positions.into_iter().enumerate() {
        let origin = ulid(&format!("{field}[{i}].origin"), &p.origin)?;
        let hlc = hlc(&format!("{field}[{i}].hlc"), p.hlc)?;
        out.insert(origin, Position { hlc, seq: p.seq });
    }
    Ok(out)
}

pub fn tables_to_pb(tables: &[std::sync::Arc<TableInfo>], backend: &str) -> Vec<pb::TableSchema> {
    tables
        .iter()
        .map(|t| pb::TableSchema {
            name: t.table_name.clone(),
            columns: t.columns.clone(),
            column_types: t.types.iter().map(ToString::to_string).collect(),
            declared_types: t.declared.clone(),
            backend: backend.to_owned(),
            constraints: t.constraint_names(),
        })
        .collect()
}

/// Describes how two nodes' replicated schemas differ, `None` when they agree:
/// tables, columns (names and order) and each column's class.
pub fn schema_difference(mine: &[pb::TableSchema], theirs: &[pb::TableSchema]) -> Option<String> {
    use std::collections::BTreeMap;
    let index = |ts: &[pb::TableSchema]| -> BTreeMap<String, pb::TableSchema> {
        ts.iter().map(|t| (t.name.clone(), t.clone())).collect()
    };
    let (a, b) = (index(mine), index(theirs));
    let mut diffs = Vec::new();
    let declared = |t: &pb::TableSchema, i: usize| {
        let ty = t.declared_types.get(i).map_or("?", String::as_str);
        if t.backend.is_empty() {
            ty.to_owned()
        } else {
            format!("{ty} on {}", t.backend)
        }
    };
    for (name, here) in &a {
        match b.get(name) {
            None => diffs.push(format!(
                "table {name} is replicated here but not by the peer"
            )),
            Some(there) if there.columns != here.columns => diffs.push(format!(
                "table {name} has columns ({}) here but ({}) at the peer",
                here.columns.join(", "),
                there.columns.join(", ")
            )),
            Some(there) => {
                if here.constraints != there.constraints {
                    diffs.push(format!(
                        "table {name} has constraints [{}] here but [{}] at the peer: \
                         clashes would be decided differently",
                        here.constraints.join(", "),
                        there.constraints.join(", ")
                    ));
                }
                for (i, col) in here.columns.iter().enumerate() {
                    let (x, y) = (here.column_types.get(i), there.column_types.get(i));
                    if x != y {
                        diffs.push(format!(
                            "table {name} column {col} is {} ({}) here but {} ({}) at the peer: \
                             the two cannot hold each other's values",
                            x.map_or("untyped", String::as_str),
                            declared(here, i),
                            y.map_or("untyped", String::as_str),
                            declared(there, i),
                        ));
                    }
                }
            }
        }
    }
    for name in b.keys().filter(|n| !a.contains_key(*n)) {
        diffs.push(format!(
            "table {name} is replicated by the peer but not here"
        ));
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::Event {
        pb::Event {
            event_id: Ulid::generate().to_string(),
            hlc: 1 << 40,
            wall_ms: 1,
            node_id: Ulid::generate().to_string(),
            table_name: "notes".into(),
            record_id: Ulid::generate().to_string(),
            operation: pb::Operation::Insert as i32,
            action: None,
            user_id: None,
            old_values_json: None,
            new_values_json: Some(r#"{"title":"x"}"#.into()),
            metadata_json: Some(r#"{"vv":{}}"#.into()),
        }
    }

    #[test]
    fn round_trip() {
        let e = event_from_pb(sample()).expect("valid");
        assert_eq!(event_from_pb(event_to_pb(&e)).expect("again"), e);
    }

    /// An event streamed as the log stores it is the message of the parsed
    /// event: the same fields, the same text.
    #[test]
    fn logged_events_go_out_as_parsed_ones_would() {
        let mut e = event_from_pb(sample()).expect("valid");
        e.action = Some("edit".into());
        e.user_id = Some(Ulid::generate());
        let logged = LoggedEvent::from(&e);
        assert_eq!(logged_to_pb(logged.clone()), event_to_pb(&e));
        let parsed = ChangeEvent::try_from(logged).expect("parse");
        assert_eq!(event_from_pb(event_to_pb(&parsed)).expect("again"), e);
    }

    #[test]
    fn malformed_fields_are_named() {
        let mut e = sample();
        e.record_id = "nope".into();
        let err = event_from_pb(e).expect_err("bad id").to_string();
        assert!(err.contains("record_id: \"nope\" is not a ULID"), "{err}");

        let mut e = sample();
        e.operation = 9;
        let err = event_from_pb(e).expect_err("bad op").to_string();
        assert!(err.contains("operation: 9 is not one of"), "{err}");

        let mut e = sample();
        e.new_values_json = Some("[1,2]".into());
        let err = event_from_pb(e).expect_err("array").to_string();
        assert!(
            err.contains("new_values_json: expected a JSON object, found an array"),
            "{err}"
        );

        let mut e = sample();
        e.metadata_json = Some("{".into());
        let err = event_from_pb(e).expect_err("json").to_string();
        assert!(err.contains("metadata_json: malformed JSON"), "{err}");

        let mut e = sample();
        e.hlc = -1;
        let err = event_from_pb(e).expect_err("hlc").to_string();
        assert!(err.contains("hlc: hlc value -1 is negative"), "{err}");

        let mut e = sample();
        e.event_id = "x".into();
        let err = event_from_pb(e).expect_err("event id").to_string();
        assert!(err.starts_with("event_id:"), "{err}");
    }

    #[test]
    fn schema_differences_are_spelled_out() {
        let t = |n: &str, c: &[&str]| pb::TableSchema {
            name: n.into(),
            columns: c.iter().map(|s| s.to_string()).collect(),
            column_types: c.iter().map(|_| "text".to_string()).collect(),
            declared_types: c.iter().map(|_| "TEXT".to_string()).collect(),
            backend: "sqlite".into(),
            constraints: Vec::new(),
        };
        assert_eq!(
            schema_difference(&[t("a", &["id"])], &[t("a", &["id"])]),
            None
        );
        let d = schema_difference(
            &[t("a", &["id", "x"]), t("b", &["id"])],
            &[t("a", &["id"]), t("c", &["id"])],
        )
        .expect("differs");
        assert!(
            d.contains("table a has columns (id, x) here but (id) at the peer"),
            "{d}"
        );
        assert!(
            d.contains("table b is replicated here but not by the peer"),
            "{d}"
        );
        assert!(
            d.contains("table c is replicated by the peer but not here"),
            "{d}"
        );
        let mut real = t("a", &["id", "v"]);
        real.column_types[1] = "float64".into();
        real.declared_types[1] = "REAL".into();
        let mut int = t("a", &["id", "v"]);
        int.column_types[1] = "int32".into();
        int.declared_types[1] = "integer".into();
        int.backend = "postgres".into();
        let d = schema_difference(&[real.clone()], &[int]).expect("types differ");
        assert!(
            d.contains(
                "table a column v is float64 (REAL on sqlite) here but int32 (integer on postgres) at the peer"
            ),
            "{d}"
        );
        let mut unique = real.clone();
        unique.constraints = vec!["unique(v)".into()];
        let d = schema_difference(&[real], &[unique]).expect("constraints differ");
        assert!(
            d.contains("table a has constraints [] here but [unique(v)] at the peer"),
            "{d}"
        );
    }
}
