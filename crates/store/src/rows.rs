//! Row shapes shared by the SQL backends, decoded with `sqlx::FromRow` and turned
//! into model types (with errors naming the stored value that did not decode).

use serde_json::Value;
use sqlx::types::Json;
use tidemark_hlc::Hlc;
use ulid::Ulid;

use crate::error::{Result, StoreError};
use crate::model::{
    Blocked, Capture, CapturedRow, ChangeEvent, Conflict, ConflictPolicy, ConflictSide,
    LoggedEvent, Member, Operation, TableInfo, Values, Version, VersionVector,
};
use crate::value::ColumnType;

fn ulid(what: &str, text: &str) -> Result<Ulid> {
    Ulid::from_string(text.trim())
        .map_err(|e| StoreError::corrupt(what, format!("{text:?} is not a ULID: {e}")))
}

pub(crate) fn hlc(what: &str, raw: i64) -> Result<Hlc> {
    Hlc::decode(raw).map_err(|e| StoreError::corrupt(what, e.to_string()))
}

fn object(what: &str, v: Option<Json<Value>>) -> Result<Option<Values>> {
    match v.map(|j| j.0) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(StoreError::corrupt(
            what,
            format!("expected a JSON object, found {other}"),
        )),
    }
}

/// Column list matching [`EventRow`]; `{wall_ms}` is the backend's expression for
/// `wall_timestamp` in ms since the epoch. The JSON columns are read as their
/// text (PostgreSQL casts them, see its backend).
pub const EVENT_COLUMNS: &str = "event_id, hlc_timestamp, node_id, table_name, record_id, operation, action, user_id, old_values, new_values, metadata";

#[derive(Debug, sqlx::FromRow)]
pub struct EventRow {
    pub event_id: String,
    pub hlc_timestamp: i64,
    pub wall_ms: i64,
    pub node_id: String,
    pub table_name: String,
    pub record_id: String,
    pub operation: String,
    pub action: Option<String>,
    pub user_id: Option<String>,
    pub old_values: Option<String>,
    pub new_values: Option<String>,
    pub metadata: Option<String>,
}

impl TryFrom<EventRow> for LoggedEvent {
    type Error = StoreError;

    fn try_from(r: EventRow) -> Result<Self> {
        let what = "change_events";
        Ok(LoggedEvent {
            event_id: ulid(what, &r.event_id)?,
            hlc: hlc(what, r.hlc_timestamp)?,
            wall_ms: r.wall_ms,
            node_id: ulid(what, &r.node_id)?,
            table_name: r.table_name,
            record_id: ulid(what, &r.record_id)?,
            operation: r
                .operation
                .parse()
                .map_err(|e: StoreError| StoreError::corrupt(what, e.to_string()))?,
            action: r.action,
            user_id: r.user_id.as_deref().map(|u| ulid(what, u)).transpose()?,
            old_values: LoggedEvent::json_text(r.old_values),
            new_values: LoggedEvent::json_text(r.new_values),
            metadata: LoggedEvent::json_text(r.metadata),
        })
    }
}

impl TryFrom<EventRow> for ChangeEvent {
    type Error = StoreError;

    fn try_from(r: EventRow) -> Result<Self> {
        LoggedEvent::try_from(r)?.try_into()
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct VersionRow {
    pub record_id: String,
    pub hlc: i64,
    pub node_id: String,
    pub event_id: String,
    pub deleted: bool,
    pub vv: Json<Value>,
    pub frontier: Json<Value>,
}

impl VersionRow {
    pub fn into_version(self) -> Result<(Ulid, Version)> {
        let what = "tidemark_record_versions";
        let vv = VersionVector::from_json(&self.vv.0, "tidemark_record_versions.vv")
            .map_err(|e| StoreError::corrupt(what, e.to_string()))?;
        let frontier = Version::frontier_from_json(&self.frontier.0)
            .map_err(|e| StoreError::corrupt(what, e.to_string()))?;
        let hlc = hlc(what, self.hlc)?;
        let node_id = ulid(what, &self.node_id)?;
        let event_id = ulid(what, &self.event_id)?;
        let frontier = if frontier.is_empty() {
            vec![Member {
                event_id,
                hlc,
                node_id,
                deleted: self.deleted,
                vv: vv.clone(),
            }]
        } else {
            frontier
        };
        Ok((
            ulid(what, &self.record_id)?,
            Version {
                hlc,
                node_id,
                event_id,
                deleted: self.deleted,
                vv,
                frontier,
            },
        ))
    }
}

/// A PostgreSQL capture: the row as `to_json` text.
#[derive(Debug, sqlx::FromRow)]
pub struct CaptureRow {
    pub seq: i64,
    pub table_name: String,
    pub record_id: String,
    pub operation: String,
    pub new_values: Option<String>,
}

impl TryFrom<CaptureRow> for Capture {
    type Error = StoreError;

    fn try_from(r: CaptureRow) -> Result<Self> {
        let what = "tidemark_capture_queue";
        let operation: Operation = r
            .operation
            .parse()
            .map_err(|e: StoreError| StoreError::corrupt(what, e.to_string()))?;
        Ok(Capture {
            seq: r.seq,
            table_name: r.table_name,
            record_id: r.record_id.trim().to_owned(),
            operation,
            row: match (operation, r.new_values) {
                (Operation::Delete, _) | (_, None) => CapturedRow::Gone,
                (_, Some(json)) => CapturedRow::Json(json),
            },
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct TableRow {
    pub datatype_id: String,
    pub table_name: String,
    pub primary_key: String,
    pub columns: Json<Vec<String>>,
    pub column_types: Option<Json<Vec<String>>>,
    pub declared_types: Option<Json<Vec<String>>>,
    pub conflict_policy: String,
}

impl TryFrom<TableRow> for TableInfo {
    type Error = StoreError;

    fn try_from(r: TableRow) -> Result<Self> {
        let what = "tidemark_datatypes";
        // Registered before column classes existed: empty, filled from the live
        // schema when the table is loaded.
        let types = r
            .column_types
            .map(|t| t.0)
            .unwrap_or_default()
            .iter()
            .map(|t| t.parse::<ColumnType>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| StoreError::corrupt(what, e))?;
        Ok(TableInfo {
            datatype_id: ulid(what, &r.datatype_id)?,
            table_name: r.table_name,
            primary_key: r.primary_key,
            columns: r.columns.0,
            types,
            declared: r.declared_types.map(|t| t.0).unwrap_or_default(),
            // Read from the live schema when the table is loaded.
            uniques: Vec::new(),
            foreign_keys: Vec::new(),
            conflict_policy: r
                .conflict_policy
                .parse::<ConflictPolicy>()
                .map_err(|e| StoreError::corrupt(what, e.to_string()))?,
        })
    }
}

/// Columns of [`ConflictRow`] except the timestamps, which each backend formats.
pub const CONFLICT_COLUMNS: &str = "conflict_id, kind, table_name, record_id, policy, status, \
    winner_event_id, winner_hlc, winner_node_id, winner_values, \
    loser_event_id, loser_hlc, loser_node_id, loser_values, \
    resolved_by, resolution, resolution_note, resolution_event_id, \
    detail, winner_table, winner_record_id";

/// Columns of [`BlockedRow`] except `blocked_at`, which each backend formats.
pub const BLOCKED_COLUMNS: &str =
    "table_name, record_id, event_id, kind, reason, blocker_table, blocker_id";

#[derive(Debug, sqlx::FromRow)]
pub struct BlockedRow {
    pub table_name: String,
    pub record_id: String,
    pub event_id: String,
    pub kind: String,
    pub reason: String,
    pub blocker_table: Option<String>,
    pub blocker_id: Option<String>,
    pub blocked_at: String,
}

impl TryFrom<BlockedRow> for Blocked {
    type Error = StoreError;

    fn try_from(r: BlockedRow) -> Result<Self> {
        let what = "tidemark_blocked";
        Ok(Blocked {
            table_name: r.table_name,
            record_id: ulid(what, &r.record_id)?,
            event_id: ulid(what, &r.event_id)?,
            kind: r
                .kind
                .parse()
                .map_err(|e: StoreError| StoreError::corrupt(what, e.to_string()))?,
            reason: r.reason,
            blocker_table: r.blocker_table,
            blocker_id: r.blocker_id.as_deref().map(|i| ulid(what, i)).transpose()?,
            blocked_at: r.blocked_at,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct ConflictRow {
    pub conflict_id: String,
    pub kind: String,
    pub detail: Option<String>,
    pub winner_table: Option<String>,
    pub winner_record_id: Option<String>,
    pub table_name: String,
    pub record_id: String,
    pub policy: String,
    pub status: String,
    pub winner_event_id: String,
    pub winner_hlc: i64,
    pub winner_node_id: String,
    pub winner_values: Option<Json<Value>>,
    pub loser_event_id: String,
    pub loser_hlc: i64,
    pub loser_node_id: String,
    pub loser_values: Option<Json<Value>>,
    pub detected_at: String,
    pub resolved_at: Option<String>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
    pub resolution_note: Option<String>,
    pub resolution_event_id: Option<String>,
}

impl TryFrom<ConflictRow> for Conflict {
    type Error = StoreError;

    fn try_from(r: ConflictRow) -> Result<Self> {
        let what = "tidemark_conflicts";
        let corrupt = |e: StoreError| StoreError::corrupt(what, e.to_string());
        Ok(Conflict {
            conflict_id: ulid(what, &r.conflict_id)?,
            kind: r.kind.parse().map_err(corrupt)?,
            detail: r.detail,
            winner_table: r.winner_table,
            winner_record_id: r
                .winner_record_id
                .as_deref()
                .map(|i| ulid(what, i))
                .transpose()?,
            table_name: r.table_name,
            record_id: ulid(what, &r.record_id)?,
            policy: r.policy.parse().map_err(corrupt)?,
            status: r.status.parse().map_err(corrupt)?,
            winner: ConflictSide {
                event_id: ulid(what, &r.winner_event_id)?,
                hlc: hlc(what, r.winner_hlc)?,
                node_id: ulid(what, &r.winner_node_id)?,
                values: object(what, r.winner_values)?,
            },
            loser: ConflictSide {
                event_id: ulid(what, &r.loser_event_id)?,
                hlc: hlc(what, r.loser_hlc)?,
                node_id: ulid(what, &r.loser_node_id)?,
                values: object(what, r.loser_values)?,
            },
            detected_at: r.detected_at,
            resolved_at: r.resolved_at,
            resolved_by: r.resolved_by,
            resolution: r.resolution,
            resolution_note: r.resolution_note,
            resolution_event_id: r
                .resolution_event_id
                .as_deref()
                .map(|e| ulid(what, e))
                .transpose()?,
        })
    }
}

/// `(event_id, new_values)` rows to a map.
pub fn rows_to_values(
    rows: Vec<(String, Option<Json<Value>>)>,
) -> Result<std::collections::HashMap<Ulid, Option<Values>>> {
    rows.into_iter()
        .map(|(id, v)| Ok((ulid("change_events", &id)?, object("change_events", v)?)))
        .collect()
}

/// Builds a vector from `(origin, hlc)` rows.
pub fn vector_from_rows(rows: Vec<(String, i64)>, what: &str) -> Result<VersionVector> {
    let mut vv = VersionVector::new();
    for (origin, raw) in rows {
        vv.observe(ulid(what, &origin)?, hlc(what, raw)?);
    }
    Ok(vv)
}

/// `(origin, max_seq)` rows of `tidemark_nodes` as sequences.
pub fn sequences_from_rows(rows: Vec<(String, i64)>) -> Result<crate::model::Sequences> {
    rows.into_iter()
        .map(|(origin, seq)| {
            let seq = u64::try_from(seq).map_err(|_| {
                StoreError::corrupt("tidemark_nodes", format!("max_seq {seq} is negative"))
            })?;
            Ok((ulid("tidemark_nodes", &origin)?, seq))
        })
        .collect()
}

/// The regular expression / GLOB class of a canonical ULID's characters.
pub const ULID_FIRST: &str = "0-7";
pub const ULID_REST: &str = "0-9A-HJKMNP-TV-Z";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Member;

    fn member(event: u128, hlc: i64, node: u128, deleted: bool, vv: &[(u128, i64)]) -> Member {
        Member {
            event_id: Ulid(event),
            hlc: Hlc::decode(hlc).expect("in range"),
            node_id: Ulid(node),
            deleted,
            vv: VersionVector(
                vv.iter()
                    .map(|&(o, h)| (Ulid(o), Hlc::decode(h).expect("in range")))
                    .collect(),
            ),
        }
    }

    /// A version as a backend stores it and reads it back.
    fn stored_and_read(v: &Version) -> Version {
        let row = VersionRow {
            record_id: Ulid(7).to_string(),
            hlc: v.hlc.encode(),
            node_id: v.node_id.to_string(),
            event_id: v.event_id.to_string(),
            deleted: v.deleted,
            vv: Json(serde_json::from_str(&v.vv.to_json_text()).expect("vv")),
            frontier: Json(serde_json::from_str(&v.stored_frontier_text()).expect("frontier")),
        };
        let (id, read) = row.into_version().expect("reads back");
        assert_eq!(id, Ulid(7));
        read
    }

    #[test]
    fn a_single_version_is_stored_short_and_read_back_whole() {
        for deleted in [false, true] {
            let v = Version::single(member(11, 5 << 16, 3, deleted, &[(3, 5 << 16), (4, 9)]));
            assert_eq!(v.stored_frontier_text(), "[]");
            assert_eq!(stored_and_read(&v), v);
        }
    }

    #[test]
    fn other_versions_are_stored_whole() {
        let a = member(11, 5 << 16, 3, false, &[(3, 5 << 16)]);
        let b = member(12, 6 << 16, 4, true, &[(4, 6 << 16)]);
        // Two concurrent members; the winner is the last.
        let mut concurrent = Version::single(b.clone());
        concurrent.vv.observe(Ulid(3), a.hlc);
        concurrent.frontier = vec![a.clone(), b.clone()];
        // One member that is not the row's own version (its vector is smaller).
        let mut wider = Version::single(a.clone());
        wider.vv.observe(Ulid(4), b.hlc);
        for v in [concurrent, wider] {
            assert_ne!(v.stored_frontier_text(), "[]");
            assert_eq!(v.stored_frontier_text(), v.frontier_text());
            assert_eq!(stored_and_read(&v), v);
        }
    }
}
