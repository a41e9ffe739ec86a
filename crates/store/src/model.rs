//! Plain data types shared by every backend.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};
use tidemark_hlc::{Hlc, WriteOrder};
use ulid::Ulid;

use crate::error::StoreError;
use crate::value::{ColumnType, SqlCell};

/// Column values of one record, keyed by column name (primary key included,
/// `node_id` and `hlc_modified` excluded).
pub type Values = Map<String, Value>;

/// The JSON text of a record's values, written from the map itself (wrapping
/// it in a [`Value`] first would copy every value).
pub fn values_text(values: &Values) -> String {
    // Strings and JSON values into a String: nothing here can fail.
    serde_json::to_string(values).expect("a JSON object always serialises")
}

/// The kind of write an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

impl Operation {
    /// The text stored in `change_events.operation`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Operation {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "INSERT" => Ok(Operation::Insert),
            "UPDATE" => Ok(Operation::Update),
            "DELETE" => Ok(Operation::Delete),
            other => Err(StoreError::invalid(
                "operation",
                format!("{other:?} is not one of INSERT, UPDATE, DELETE"),
            )),
        }
    }
}

/// Conflict policy of a replicated table (the seed's `conflict_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConflictPolicy {
    /// Last write wins by `(hlc, node_id)`.
    #[default]
    Lww,
    /// Same deterministic winner everywhere, and the conflict is kept open for a human.
    Manual,
}

impl ConflictPolicy {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::Lww => "lww",
            ConflictPolicy::Manual => "manual",
        }
    }
}

impl fmt::Display for ConflictPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConflictPolicy {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lww" => Ok(ConflictPolicy::Lww),
            "manual" => Ok(ConflictPolicy::Manual),
            other => Err(StoreError::invalid(
                "conflict_policy",
                format!("{other:?} is not one of lww, manual"),
            )),
        }
    }
}

/// Per origin node, the highest HLC seen. Used both as a node's applied vector
/// (every event of that origin up to the HLC is present) and as a record's causal
/// version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionVector(pub BTreeMap<Ulid, Hlc>);

/// The JSON form of [`VersionVector::to_json`]: origins in ULID order, which is
/// the order of their text (a `Value` map sorts its keys the same way).
impl serde::Serialize for VersionVector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(origin, hlc)| (origin, hlc.encode())))
    }
}

/// Where this node stands on one origin: the highest HLC of the origin's
/// events it holds, and the number (`metadata.seq`) of the last one. Every
/// origin numbers its events 1, 2, 3... so the numbers held are exactly 1 to
/// `seq` (0: none numbered yet); a position never rewinds or skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub hlc: Hlc,
    pub seq: u64,
}

/// Per origin, the number of the last event held (see [`Position`]).
pub type Sequences = BTreeMap<Ulid, u64>;

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry for `origin`, zero when absent.
    pub fn get(&self, origin: Ulid) -> Hlc {
        self.0.get(&origin).copied().unwrap_or(Hlc::ZERO)
    }

    /// Raises the entry for `origin` to at least `hlc`.
    pub fn observe(&mut self, origin: Ulid, hlc: Hlc) {
        let entry = self.0.entry(origin).or_insert(Hlc::ZERO);
        if hlc > *entry {
            *entry = hlc;
        }
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (origin, hlc) in &other.0 {
            self.observe(*origin, *hlc);
        }
    }

    /// Whether every entry of `other` is at most the matching entry of `self`.
    pub fn covers(&self, other: &VersionVector) -> bool {
        other
            .0
            .iter()
            .all(|(origin, hlc)| self.get(*origin) >= *hlc)
    }

    /// JSON form: `{"<origin ulid>": <hlc as integer>, ...}`.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(v.encode())))
                .collect(),
        )
    }

    /// The JSON text of [`VersionVector::to_json`], written without building
    /// the `Value` first.
    pub fn to_json_text(&self) -> String {
        // Ids and integers into a String: nothing here can fail.
        serde_json::to_string(self).expect("a version vector always serialises")
    }

    /// Parses the JSON form; `what` names the field in errors.
    pub fn from_json(value: &Value, what: &str) -> Result<Self, StoreError> {
        let obj = value
            .as_object()
            .ok_or_else(|| StoreError::invalid(what, "version vector must be a JSON object"))?;
        let mut vv = VersionVector::new();
        for (k, v) in obj {
            let origin = parse_ulid(what, k)?;
            let raw = v.as_i64().ok_or_else(|| {
                StoreError::invalid(what, format!("entry {k} is not a 64-bit integer"))
            })?;
            let hlc = Hlc::decode(raw)
                .map_err(|e| StoreError::invalid(what, format!("entry {k}: {e}")))?;
            vv.observe(origin, hlc);
        }
        Ok(vv)
    }
}

/// Parses a ULID, naming `what` in the error.
pub fn parse_ulid(what: &str, text: &str) -> Result<Ulid, StoreError> {
    if text.len() != 26 {
        return Err(StoreError::invalid(
            what,
            format!(
                "{:?} is not a ULID (must be 26 characters, got {})",
                truncate(text),
                text.len()
            ),
        ));
    }
    // 26 base32 characters hold 130 bits and a ULID 128, so the first character is
    // at most 7. The ulid crate drops the excess bits instead of refusing them,
    // which would make `8...` another spelling of `0...` (and `80000000000000000000000000`
    // the nil ULID).
    if !(b'0'..=b'7').contains(&text.as_bytes()[0]) {
        return Err(StoreError::invalid(
            what,
            format!(
                "{:?} is not a ULID (the first character must be 0 to 7)",
                truncate(text)
            ),
        ));
    }
    Ulid::from_string(text)
        .map_err(|e| StoreError::invalid(what, format!("{:?} is not a ULID: {e}", truncate(text))))
}

pub(crate) fn truncate(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut t: String = text.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

/// One row of `change_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub event_id: Ulid,
    pub hlc: Hlc,
    /// Wall time of the write at its origin, ms since the Unix epoch.
    pub wall_ms: i64,
    /// Origin node.
    pub node_id: Ulid,
    pub table_name: String,
    pub record_id: Ulid,
    pub operation: Operation,
    pub action: Option<String>,
    pub user_id: Option<Ulid>,
    pub old_values: Option<Values>,
    pub new_values: Option<Values>,
    /// Replication metadata; holds the record's version vector under `"vv"`.
    pub metadata: Option<Value>,
}

/// The JSON text an event's new values and metadata are stored as, rendered
/// once: a received event's while the batch before it is written, so its
/// transaction only binds the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventText {
    pub new_values: Option<String>,
    pub metadata: Option<String>,
}

impl EventText {
    pub fn of(event: &ChangeEvent) -> EventText {
        EventText {
            new_values: event.new_values.as_ref().map(values_text),
            metadata: event.metadata.as_ref().map(json_value_text),
        }
    }
}

/// The JSON text of a metadata value (written straight into bytes, not
/// through `Display`'s formatter).
pub fn json_value_text(value: &Value) -> String {
    serde_json::to_string(value).expect("a JSON value always serialises")
}

/// What [`crate::Backend::insert_events`] stores for events besides their
/// fields. Both sets are keyed by event id; an event in neither is stored
/// unsynced and rendered at insert.
#[derive(Debug, Default)]
pub struct EventExtras {
    /// Events stored with `synced_at` already set: every peer `synced_at`
    /// waits for is known to hold them.
    pub synced: HashSet<Ulid>,
    /// Text rendered ahead of the transaction.
    pub text: HashMap<Ulid, EventText>,
}

impl EventExtras {
    pub fn synced(&self, id: Ulid) -> bool {
        self.synced.contains(&id)
    }

    /// The event's new values' and metadata's text: rendered ahead, or now.
    pub fn text<'a>(&'a self, event: &ChangeEvent) -> std::borrow::Cow<'a, EventText> {
        match self.text.get(&event.event_id) {
            Some(t) => std::borrow::Cow::Borrowed(t),
            None => std::borrow::Cow::Owned(EventText::of(event)),
        }
    }
}

/// An event as the log stores it, its values and metadata left as the JSON
/// text stored: what a sender streams (the receiver parses and checks it, so
/// the sender need not parse it only to write it out again). Converting it
/// into a [`ChangeEvent`] parses the text.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    pub event_id: Ulid,
    pub hlc: Hlc,
    /// Wall time of the write at its origin, ms since the Unix epoch.
    pub wall_ms: i64,
    /// Origin node.
    pub node_id: Ulid,
    pub table_name: String,
    pub record_id: Ulid,
    pub operation: Operation,
    pub action: Option<String>,
    pub user_id: Option<Ulid>,
    /// The text of a JSON object; `None` for SQL NULL and for JSON `null`.
    pub old_values: Option<String>,
    /// The text of a JSON object; `None` for SQL NULL and for JSON `null`.
    pub new_values: Option<String>,
    /// The text of a JSON value; `None` for SQL NULL and for JSON `null`.
    pub metadata: Option<String>,
}

impl LoggedEvent {
    /// Position in the total order of writes (as [`ChangeEvent::order`]).
    pub fn order(&self) -> WriteOrder {
        WriteOrder {
            hlc: self.hlc,
            node_id: self.node_id,
            event_id: self.event_id,
        }
    }

    /// A stored JSON column's text: SQL NULL and JSON `null` are both absent.
    pub fn json_text(text: Option<String>) -> Option<String> {
        text.filter(|t| t.trim() != "null")
    }
}

impl From<&ChangeEvent> for LoggedEvent {
    /// The event as a log would store it (the in-memory backend's log holds
    /// parsed events).
    fn from(e: &ChangeEvent) -> Self {
        LoggedEvent {
            event_id: e.event_id,
            hlc: e.hlc,
            wall_ms: e.wall_ms,
            node_id: e.node_id,
            table_name: e.table_name.clone(),
            record_id: e.record_id,
            operation: e.operation,
            action: e.action.clone(),
            user_id: e.user_id,
            old_values: e.old_values.as_ref().map(values_text),
            new_values: e.new_values.as_ref().map(values_text),
            metadata: e
                .metadata
                .as_ref()
                .filter(|m| !m.is_null())
                .map(Value::to_string),
        }
    }
}

impl TryFrom<LoggedEvent> for ChangeEvent {
    type Error = StoreError;

    /// Parses the stored text; an error names `change_events` and what did
    /// not parse.
    fn try_from(e: LoggedEvent) -> Result<Self, StoreError> {
        let corrupt = |column: &str, reason: String| {
            StoreError::corrupt(
                "change_events",
                format!("event {} {column}: {reason}", e.event_id),
            )
        };
        let object = |column: &str, text: &Option<String>| -> Result<Option<Values>, StoreError> {
            let Some(text) = text else { return Ok(None) };
            match serde_json::from_str::<Value>(text) {
                Ok(Value::Null) => Ok(None),
                Ok(Value::Object(m)) => Ok(Some(m)),
                Ok(other) => Err(corrupt(
                    column,
                    format!(
                        "expected a JSON object, found {}",
                        truncate(&other.to_string())
                    ),
                )),
                Err(err) => Err(corrupt(column, err.to_string())),
            }
        };
        let old_values = object("old_values", &e.old_values)?;
        let new_values = object("new_values", &e.new_values)?;
        let metadata = match &e.metadata {
            None => None,
            Some(text) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Null) => None,
                Ok(v) => Some(v),
                Err(err) => return Err(corrupt("metadata", err.to_string())),
            },
        };
        Ok(ChangeEvent {
            event_id: e.event_id,
            hlc: e.hlc,
            wall_ms: e.wall_ms,
            node_id: e.node_id,
            table_name: e.table_name,
            record_id: e.record_id,
            operation: e.operation,
            action: e.action,
            user_id: e.user_id,
            old_values,
            new_values,
            metadata,
        })
    }
}

impl ChangeEvent {
    /// Position in the total order of writes.
    pub fn order(&self) -> WriteOrder {
        WriteOrder {
            hlc: self.hlc,
            node_id: self.node_id,
            event_id: self.event_id,
        }
    }

    /// The record's version vector this event carries (`metadata.vv`), or the
    /// vector holding just this event when absent.
    pub fn vector(&self) -> Result<VersionVector, StoreError> {
        match self.metadata.as_ref().and_then(|m| m.get("vv")) {
            Some(vv) => {
                let mut vv = VersionVector::from_json(vv, "metadata.vv")?;
                vv.observe(self.node_id, self.hlc);
                Ok(vv)
            }
            None => {
                let mut vv = VersionVector::new();
                vv.observe(self.node_id, self.hlc);
                Ok(vv)
            }
        }
    }

    /// The event's number in its origin's gap-free sequence (`metadata.seq`:
    /// 1, 2, 3... per origin); `None` for an event stamped before origins
    /// numbered their events.
    pub fn seq(&self) -> Result<Option<u64>, StoreError> {
        match self.metadata.as_ref().and_then(|m| m.get("seq")) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(StoreError::Invalid {
                    field: "metadata.seq".into(),
                    reason: format!("{} is not a positive integer", truncate(&v.to_string())),
                }),
            },
        }
    }

    /// This event as a version of its record.
    pub fn member(&self) -> Result<Member, StoreError> {
        Ok(Member {
            event_id: self.event_id,
            hlc: self.hlc,
            node_id: self.node_id,
            deleted: self.operation == Operation::Delete,
            vv: self.vector()?,
        })
    }

    /// The constraint clash this event resolves, as it carries it (see
    /// [`Conflict::clash_json`]).
    pub fn resolved_clash(&self) -> Option<Conflict> {
        let r = self.metadata.as_ref()?.get("resolution")?;
        let id = Ulid::from_string(r.get("conflict_id")?.as_str()?).ok()?;
        Conflict::from_clash_json(id, &self.table_name, self.record_id, r.get("clash")?)
    }

    /// The resolution this event carries (`metadata.resolution`), if it resolves a
    /// conflict.
    pub fn resolution(&self) -> Option<ResolutionInfo> {
        let r = self.metadata.as_ref()?.get("resolution")?;
        Some(ResolutionInfo {
            kind: r.get("kind")?.as_str()?.to_owned(),
            by: r.get("by").and_then(Value::as_str).map(str::to_owned),
            note: r.get("note").and_then(Value::as_str).map(str::to_owned),
        })
    }
}

/// Who resolved a conflict, how and why, as carried by the resolving event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolutionInfo {
    /// `keep_local`, `keep_remote` or `merged`.
    pub kind: String,
    pub by: Option<String>,
    pub note: Option<String>,
}

/// One version of a record: the event that wrote it and that event's causal past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub event_id: Ulid,
    pub hlc: Hlc,
    pub node_id: Ulid,
    pub deleted: bool,
    pub vv: VersionVector,
}

/// The JSON form of [`Member::to_json`], keys in the order its `Value` map
/// keeps them (sorted).
impl serde::Serialize for Member {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("d", &self.deleted)?;
        m.serialize_entry("e", &self.event_id)?;
        m.serialize_entry("h", &self.hlc.encode())?;
        m.serialize_entry("n", &self.node_id)?;
        m.serialize_entry("vv", &self.vv)?;
        m.end()
    }
}

impl Member {
    pub fn order(&self) -> WriteOrder {
        WriteOrder {
            hlc: self.hlc,
            node_id: self.node_id,
            event_id: self.event_id,
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "e": self.event_id.to_string(),
            "h": self.hlc.encode(),
            "n": self.node_id.to_string(),
            "d": self.deleted,
            "vv": self.vv.to_json(),
        })
    }

    pub(crate) fn from_json(v: &Value) -> Result<Member, StoreError> {
        let what = "frontier member";
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| StoreError::invalid(what, format!("missing {k}")))
        };
        let text = |k: &str| -> Result<&str, StoreError> {
            field(k)?
                .as_str()
                .ok_or_else(|| StoreError::invalid(what, format!("{k} is not a string")))
        };
        let raw = field("h")?
            .as_i64()
            .ok_or_else(|| StoreError::invalid(what, "h is not an integer"))?;
        Ok(Member {
            event_id: parse_ulid("frontier.e", text("e")?)?,
            hlc: Hlc::decode(raw).map_err(|e| StoreError::invalid(what, e.to_string()))?,
            node_id: parse_ulid("frontier.n", text("n")?)?,
            deleted: field("d")?.as_bool().unwrap_or(false),
            vv: VersionVector::from_json(field("vv")?, "frontier.vv")?,
        })
    }
}

/// The current version of a record (also kept for deleted records: a tombstone):
/// the winning version's identity, the merged vector of every version seen, and
/// the frontier (the versions no other version has seen). A frontier of more than
/// one member is a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub hlc: Hlc,
    pub node_id: Ulid,
    pub event_id: Ulid,
    pub deleted: bool,
    pub vv: VersionVector,
    /// Maximal versions, in the total order (the last one is the winner).
    pub frontier: Vec<Member>,
}

impl Version {
    /// The version of a record written by one event and nothing concurrent.
    pub fn single(member: Member) -> Version {
        Version {
            hlc: member.hlc,
            node_id: member.node_id,
            event_id: member.event_id,
            deleted: member.deleted,
            vv: member.vv.clone(),
            frontier: vec![member],
        }
    }

    pub fn order(&self) -> WriteOrder {
        WriteOrder {
            hlc: self.hlc,
            node_id: self.node_id,
            event_id: self.event_id,
        }
    }

    /// The frontier as stored.
    pub fn frontier_json(&self) -> Value {
        Value::Array(self.frontier.iter().map(Member::to_json).collect())
    }

    /// The JSON text of [`Version::frontier_json`], written without building
    /// the `Value` first.
    pub fn frontier_text(&self) -> String {
        serde_json::to_string(&self.frontier).expect("a frontier always serialises")
    }

    /// The frontier as the backends store it: `[]` when it is just the
    /// version's own member (one write and nothing concurrent, by far the
    /// common case), which the backends' readers rebuild from the row's own
    /// columns (`VersionRow::into_version`); otherwise every member, as
    /// [`Version::frontier_text`] writes them. The short form keeps a record
    /// version row about half the size, so its table and index take fewer
    /// pages (and fewer WAL frames per commit).
    pub fn stored_frontier_text(&self) -> String {
        match self.frontier.as_slice() {
            [own]
                if own.event_id == self.event_id
                    && own.hlc == self.hlc
                    && own.node_id == self.node_id
                    && own.deleted == self.deleted
                    && own.vv == self.vv =>
            {
                "[]".to_owned()
            }
            _ => self.frontier_text(),
        }
    }

    /// Parses a stored frontier.
    pub fn frontier_from_json(v: &Value) -> Result<Vec<Member>, StoreError> {
        v.as_array()
            .ok_or_else(|| StoreError::invalid("frontier", "not a JSON array"))?
            .iter()
            .map(Member::from_json)
            .collect()
    }
}

/// A FOREIGN KEY of a replicated table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForeignKey {
    pub columns: Vec<String>,
    pub parent: String,
    /// The parent's columns the key references (its primary key when the
    /// declaration names none).
    pub parent_columns: Vec<String>,
}

/// Why a record's row cannot be placed on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Another record's greater write holds the same UNIQUE value.
    Unique,
    /// Its parent row is not here (deleted, or not arrived yet).
    ForeignKey,
    /// The table refuses the row (CHECK, NOT NULL, a constraint Tidemark does
    /// not decide itself).
    Refused,
}

impl BlockKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            BlockKind::Unique => "unique",
            BlockKind::ForeignKey => "foreign_key",
            BlockKind::Refused => "refused",
        }
    }
}

impl FromStr for BlockKind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "unique" => Ok(BlockKind::Unique),
            "foreign_key" => Ok(BlockKind::ForeignKey),
            "refused" => Ok(BlockKind::Refused),
            other => Err(StoreError::invalid(
                "block kind",
                format!("{other:?} is not one of unique, foreign_key, refused"),
            )),
        }
    }
}

/// A record whose winning event is in the log but whose row is not placed here
/// (`tidemark_blocked`); it is retried when its blocker changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub table_name: String,
    pub record_id: Ulid,
    /// The record's winning event, not applied here.
    pub event_id: Ulid,
    pub kind: BlockKind,
    pub reason: String,
    /// The record holding the clashing value, or the missing parent (its table
    /// alone when the parent cannot be named by id).
    pub blocker_table: Option<String>,
    pub blocker_id: Option<Ulid>,
    pub blocked_at: String,
}

/// A registered replicated table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub datatype_id: Ulid,
    pub table_name: String,
    pub primary_key: String,
    /// Replicated columns, primary key first.
    pub columns: Vec<String>,
    /// The class of each column of `columns`, in the same order.
    pub types: Vec<ColumnType>,
    /// Each column's declared type on this backend, in the same order (for
    /// messages; PostgreSQL casts written values to it).
    pub declared: Vec<String>,
    pub conflict_policy: ConflictPolicy,
    /// UNIQUE constraints other than the primary key (columns each), read from
    /// the live schema.
    pub uniques: Vec<Vec<String>>,
    /// FOREIGN KEYs, read from the live schema.
    pub foreign_keys: Vec<ForeignKey>,
}

impl TableInfo {
    pub fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c == name)
    }

    /// The class of column `name`.
    pub fn column_type(&self, name: &str) -> Option<ColumnType> {
        let i = self.columns.iter().position(|c| c == name)?;
        self.types.get(i).copied()
    }

    /// Indexes of these columns among `columns` (None if one is not replicated).
    pub fn indexes_of(&self, names: &[String]) -> Option<Vec<usize>> {
        names
            .iter()
            .map(|n| self.columns.iter().position(|c| c == n))
            .collect()
    }

    /// The constraints as the handshake compares them, sorted: `unique(a,b)`,
    /// `fk(c)->parent(x)`.
    pub fn constraint_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .uniques
            .iter()
            .map(|u| format!("unique({})", u.join(",")))
            .chain(self.foreign_keys.iter().map(|f| {
                format!(
                    "fk({})->{}({})",
                    f.columns.join(","),
                    f.parent,
                    f.parent_columns.join(",")
                )
            }))
            .collect();
        out.sort();
        out
    }
}

/// The row a capture trigger recorded, as the backend stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum CapturedRow {
    /// A delete: no row after the write.
    Gone,
    /// A row a write may have deleted without a delete trigger firing (SQLite's
    /// REPLACE conflict resolution): a delete if the row is gone when drained.
    IfGone,
    /// SQLite: the row's values as stored, in registry column order.
    Cells(Vec<SqlCell>),
    /// PostgreSQL (and SQLite captures made before typed capture): the row as
    /// JSON text, JSON columns as text.
    Json(String),
}

/// A direct write recorded by a capture trigger, not yet stamped.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    pub seq: i64,
    pub table_name: String,
    pub record_id: String,
    pub operation: Operation,
    /// The row after the write.
    pub row: CapturedRow,
}

/// A captured direct write that cannot be replicated, set aside with its reason
/// (`tidemark_unreplicated`); the row stays local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub seq: i64,
    pub table_name: String,
    pub record_id: String,
    pub operation: String,
    pub reason: String,
    pub set_aside_at: String,
}

/// An event a peer sent that this node could not even identify (no valid
/// origin or id to hold it by), kept as received for the operator
/// (`tidemark_quarantine`); the rest of its batch applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The event id as received (possibly malformed).
    pub event_id: String,
    /// The peer it came from, when known.
    pub peer_id: Option<String>,
    /// The gRPC code name of the refusal.
    pub code: String,
    pub reason: String,
    /// The event as received, as JSON text.
    pub event: String,
    /// When it was quarantined (RFC 3339, UTC); empty when not recorded.
    pub received_at: String,
}

/// What one apply of remote events did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutcome {
    /// New events whose version became the record's current version.
    pub applied: u64,
    /// New events kept in the log but superseded by a newer local version.
    pub superseded: u64,
    /// Events already present (same event_id): nothing changed.
    pub duplicates: u64,
    /// Pending direct writes drained (stamped) before applying.
    pub drained: u64,
    /// New concurrent versions detected (a conflict row each).
    pub conflicts: u64,
    /// HLCs of the events newly stored (applied or superseded), in batch order.
    pub fresh: Vec<Hlc>,
    /// Events set aside in the quarantine (new ones and ones already there).
    pub quarantined: Vec<Rejected>,
    /// Records (re)blocked by this apply, each once: their events are kept in
    /// the log, their rows not placed here (see `tidemark_blocked`).
    pub blocked: u64,
    /// Origins held at an event this node cannot take now; nothing of theirs
    /// from that event on was applied.
    pub held: Vec<Held>,
}

/// An origin held at one of its events: that event and the origin's later ones
/// were not applied (the node's vector stays below them); the sender resends
/// them from the node's vector after `retry_after_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub origin: Ulid,
    pub hlc: Hlc,
    /// The event it was held at, as received.
    pub event_id: String,
    pub kind: RejectKind,
    pub reason: String,
    pub retry_after_ms: u64,
}

/// What one drain of the capture queue did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Events appended to `change_events`.
    pub events: u64,
    /// Captures that cannot be replicated, set aside with their reason.
    pub set_aside: Vec<SetAside>,
}

/// Whether a conflict still needs a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictStatus {
    Open,
    Resolved,
}

impl ConflictStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConflictStatus::Open => "open",
            ConflictStatus::Resolved => "resolved",
        }
    }
}

impl FromStr for ConflictStatus {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(ConflictStatus::Open),
            "resolved" => Ok(ConflictStatus::Resolved),
            other => Err(StoreError::invalid(
                "status",
                format!("{other:?} is not one of open, resolved"),
            )),
        }
    }
}

/// One side of a conflict: a version of the record.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictSide {
    pub event_id: Ulid,
    pub hlc: Hlc,
    pub node_id: Ulid,
    /// The record's values in this version; `None` for a delete.
    pub values: Option<Values>,
}

/// What two writes clashed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictKind {
    /// Concurrent versions of one record.
    Version,
    /// Two records' winning writes hold the same value of a UNIQUE constraint.
    Unique,
    /// A record's parent row is deleted (its delete wins over the child).
    ForeignKey,
}

impl ConflictKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConflictKind::Version => "version",
            ConflictKind::Unique => "unique",
            ConflictKind::ForeignKey => "foreign_key",
        }
    }
}

impl FromStr for ConflictKind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "version" => Ok(ConflictKind::Version),
            "unique" => Ok(ConflictKind::Unique),
            "foreign_key" => Ok(ConflictKind::ForeignKey),
            other => Err(StoreError::invalid(
                "conflict kind",
                format!("{other:?} is not one of version, unique, foreign_key"),
            )),
        }
    }
}

/// Two clashing writes: the one every node shows and one that lost. For a
/// version conflict both are versions of one record (the winner is the greater
/// by `(hlc, node_id, event_id)`); for a constraint conflict the loser's record
/// has no row and the winner is the other record's write that holds the value
/// (or the delete of its parent). Its id is the losing event's id.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub conflict_id: Ulid,
    pub kind: ConflictKind,
    pub table_name: String,
    pub record_id: Ulid,
    /// What clashed (e.g. `email = "a@x"`), for constraint conflicts.
    pub detail: Option<String>,
    /// The winner's record when it is another record (constraint conflicts).
    pub winner_table: Option<String>,
    pub winner_record_id: Option<Ulid>,
    /// The table's policy (conflicts follow it when it changes).
    pub policy: ConflictPolicy,
    pub status: ConflictStatus,
    pub winner: ConflictSide,
    pub loser: ConflictSide,
    /// When it arose: the HLC time of the later of the two writes (of the
    /// first greater concurrent write, for a version conflict), so the same on
    /// every node.
    pub detected_at: String,
    /// The closing write's HLC time (the time it arose, when decided by `lww`).
    pub resolved_at: Option<String>,
    pub resolved_by: Option<String>,
    /// `lww`, `keep_local`, `keep_remote`, `merged` or `superseded`.
    pub resolution: Option<String>,
    pub resolution_note: Option<String>,
    pub resolution_event_id: Option<Ulid>,
}

/// The write that ended a conflict: the first, in the total order, that had seen
/// the losing version, with the resolution it carries (an operator's) if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Closer {
    pub event_id: Ulid,
    /// Its HLC time (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
    pub at: String,
    pub info: Option<ResolutionInfo>,
}

impl Closer {
    /// The closing write a stored conflict names, if it names one.
    pub fn of(c: &Conflict) -> Option<Closer> {
        let event_id = c.resolution_event_id?;
        let explicit = matches!(
            c.resolution.as_deref(),
            Some("keep_local" | "keep_remote" | "merged")
        );
        Some(Closer {
            event_id,
            at: c.resolved_at.clone().unwrap_or_default(),
            info: explicit.then(|| ResolutionInfo {
                kind: c.resolution.clone().unwrap_or_default(),
                by: c.resolved_by.clone(),
                note: c.resolution_note.clone(),
            }),
        })
    }
}

impl Conflict {
    /// The clash as the write resolving it carries it (`metadata.resolution.clash`),
    /// so every node records the decided clash alike, whether or not the clash
    /// ever arose there; the two sides' values are left out when `values` is
    /// false (they would not fit in an event).
    pub fn clash_json(&self, values: bool) -> Value {
        let side = |s: &ConflictSide| {
            serde_json::json!({
                "e": s.event_id.to_string(),
                "h": s.hlc.encode(),
                "n": s.node_id.to_string(),
                "values": if values { s.values.clone().map(Value::Object) } else { None },
            })
        };
        serde_json::json!({
            "kind": self.kind.as_str(),
            "detail": self.detail,
            "winner_table": self.winner_table,
            "winner_record_id": self.winner_record_id.map(|i| i.to_string()),
            "winner": side(&self.winner),
            "loser": side(&self.loser),
            "detected_at": self.detected_at,
        })
    }

    /// Reads [`Conflict::clash_json`] back (unlabelled: see [`Conflict::label`]).
    fn from_clash_json(
        conflict_id: Ulid,
        table: &str,
        record_id: Ulid,
        v: &Value,
    ) -> Option<Conflict> {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let side = |s: &Value| -> Option<ConflictSide> {
            Some(ConflictSide {
                event_id: Ulid::from_string(&text(s, "e")?).ok()?,
                hlc: Hlc::decode(s.get("h")?.as_i64()?).ok()?,
                node_id: Ulid::from_string(&text(s, "n")?).ok()?,
                values: s.get("values").and_then(Value::as_object).cloned(),
            })
        };
        Some(Conflict {
            conflict_id,
            kind: text(v, "kind")?.parse().ok()?,
            table_name: table.to_owned(),
            record_id,
            detail: text(v, "detail"),
            winner_table: text(v, "winner_table"),
            winner_record_id: text(v, "winner_record_id").and_then(|i| Ulid::from_string(&i).ok()),
            policy: ConflictPolicy::Manual,
            status: ConflictStatus::Open,
            winner: side(v.get("winner")?)?,
            loser: side(v.get("loser")?)?,
            detected_at: text(v, "detected_at")?,
            resolved_at: None,
            resolved_by: None,
            resolution: None,
            resolution_note: None,
            resolution_event_id: None,
        })
    }

    /// Sets the policy, status and resolution from the table's policy and the
    /// write that closed the conflict, if one did. Nothing here depends on when
    /// or where it runs, so every node that holds the same writes labels a
    /// conflict the same way:
    /// * closed by a write carrying an operator's resolution: that resolution;
    /// * closed by any other write that had seen the losing version: `lww`
    ///   under `lww` (the rule had decided it), `superseded` under `manual`;
    /// * not closed: decided (`lww`, when it arose) under `lww`, open under
    ///   `manual`.
    pub fn label(&mut self, policy: ConflictPolicy, closer: Option<Closer>) {
        let lww = policy == ConflictPolicy::Lww;
        self.policy = policy;
        match closer {
            Some(c) => {
                self.status = ConflictStatus::Resolved;
                self.resolution_event_id = Some(c.event_id);
                self.resolved_at = Some(c.at);
                match c.info {
                    Some(info) => {
                        self.resolution = Some(info.kind);
                        self.resolved_by = info.by;
                        self.resolution_note = info.note;
                    }
                    None => {
                        self.resolution = Some(if lww { "lww" } else { "superseded" }.into());
                        self.resolved_by = lww.then(|| "lww".into());
                        self.resolution_note = None;
                    }
                }
            }
            None => {
                self.resolution_event_id = None;
                self.resolution_note = None;
                if lww {
                    self.status = ConflictStatus::Resolved;
                    self.resolution = Some("lww".into());
                    self.resolved_by = Some("lww".into());
                    self.resolved_at = Some(self.detected_at.clone());
                } else {
                    self.status = ConflictStatus::Open;
                    self.resolution = None;
                    self.resolved_by = None;
                    self.resolved_at = None;
                }
            }
        }
    }
}

/// Which conflicts to list: optional table and status, ordered by id, after a
/// cursor (the last id of the previous page).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictFilter {
    pub table: Option<String>,
    pub status: Option<ConflictStatus>,
    pub after: Option<Ulid>,
    pub limit: u32,
}

/// How an operator resolves a conflict.
#[derive(Debug, Clone)]
pub enum ResolveChoice {
    /// Keep the version every node shows now (the provisional winner).
    KeepLocal,
    /// Keep the concurrent version that lost.
    KeepRemote,
    /// Write these values, as an application writes them through the API
    /// (columns not given keep the shown version's values).
    Merged(crate::engine::RawValues),
}

impl ResolveChoice {
    pub fn kind(&self) -> &'static str {
        match self {
            ResolveChoice::KeepLocal => "keep_local",
            ResolveChoice::KeepRemote => "keep_remote",
            ResolveChoice::Merged(_) => "merged",
        }
    }
}

/// Why an event from a peer was quarantined instead of applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// Malformed: ids, operation, JSON, values not matching the record.
    Invalid,
    /// A table this node does not replicate.
    UnknownTable,
    /// The sending peer may not send events of this origin.
    NotAllowed,
    /// A timestamp so far ahead that no clock drift explains it.
    FarFuture,
    /// A timestamp beyond the max drift: it may apply once the clocks agree.
    Drift,
    /// The table refused the values (a constraint or type the row breaks).
    Refused,
    /// A numbered event that does not continue its origin's sequence here:
    /// the events between are missing (its sender no longer holds them, or
    /// sent out of order).
    Gap,
    /// A numbered event that contradicts its origin's sequence here: a number
    /// already held, with an HLC newer than any held. One writer stamps its
    /// numbers and HLCs in the same order, so two daemons are writing as one
    /// node (e.g. a copy of its database started with its id).
    SecondWriter,
}

impl RejectKind {
    /// The gRPC status code name reported for it.
    pub const fn code(self) -> &'static str {
        match self {
            RejectKind::Invalid => "INVALID_ARGUMENT",
            RejectKind::UnknownTable => "NOT_FOUND",
            RejectKind::NotAllowed => "PERMISSION_DENIED",
            RejectKind::FarFuture | RejectKind::Drift => "OUT_OF_RANGE",
            RejectKind::Refused | RejectKind::Gap | RejectKind::SecondWriter => {
                "FAILED_PRECONDITION"
            }
        }
    }
}

/// An event from a peer set aside in `tidemark_quarantine`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The event id as received (possibly malformed).
    pub event_id: String,
    pub kind: RejectKind,
    pub reason: String,
    /// The event as received, as JSON.
    pub event: Value,
}

impl ChangeEvent {
    /// The event as JSON, for the quarantine.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "event_id": self.event_id.to_string(),
            "hlc": self.hlc.encode(),
            "wall_ms": self.wall_ms,
            "node_id": self.node_id.to_string(),
            "table_name": self.table_name,
            "record_id": self.record_id.to_string(),
            "operation": self.operation.as_str(),
            "action": self.action,
            "user_id": self.user_id.map(|u| u.to_string()),
            "old_values": self.old_values,
            "new_values": self.new_values,
            "metadata": self.metadata,
        })
    }
}

/// The length of `value` as JSON text, counted without building the text (a
/// large row is not copied just to be measured); `usize::MAX` if it cannot be
/// serialised.
pub fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_or(usize::MAX, |()| count.0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a Unix time in ms (the SQL backends' format).
pub fn iso8601(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An HLC's wall time as stored conflict times are written.
pub fn hlc_time(hlc: Hlc) -> String {
    iso8601(hlc.wall_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_event() -> ChangeEvent {
        let values: Values = serde_json::from_str(
            r#"{"id":"01J0000000000000000000000A","title":"caf\u00e9 \"q\"","r":0.30000000000000004,"n":null,"big":-9223372036854775808}"#,
        )
        .expect("values");
        ChangeEvent {
            event_id: Ulid::from_parts(1, 1),
            hlc: Hlc::from_parts(1_700_000_000_000, 3).expect("hlc"),
            wall_ms: 1_700_000_000_000,
            node_id: Ulid::from_parts(1, 2),
            table_name: "notes".into(),
            record_id: Ulid::from_parts(1, 3),
            operation: Operation::Update,
            action: Some("edit".into()),
            user_id: Some(Ulid::from_parts(1, 4)),
            old_values: Some(values.clone()),
            new_values: Some(values),
            metadata: Some(serde_json::json!({"vv": {"01J0000000000000000000000B": 5}, "seq": 9})),
        }
    }

    /// An event written as the log stores it and read back is the same event;
    /// its stored text is the one text form of its values.
    #[test]
    fn logged_events_parse_back_to_the_event() {
        let e = sample_event();
        let logged = LoggedEvent::from(&e);
        assert_eq!(
            logged.new_values.as_deref(),
            Some(values_text(e.new_values.as_ref().expect("values")).as_str())
        );
        assert_eq!(ChangeEvent::try_from(logged).expect("parse"), e);
        let bare = ChangeEvent {
            old_values: None,
            new_values: None,
            metadata: None,
            ..sample_event()
        };
        assert_eq!(
            ChangeEvent::try_from(LoggedEvent::from(&bare)).expect("parse"),
            bare
        );
    }

    /// Stored text that is not what the log writes is reported with the event
    /// and the column; JSON `null` is read as no value, as SQL NULL is.
    #[test]
    fn corrupt_logged_text_names_the_column() {
        let mut logged = LoggedEvent::from(&sample_event());
        logged.new_values = Some("[1, 2]".into());
        let err = ChangeEvent::try_from(logged.clone())
            .expect_err("array")
            .to_string();
        assert!(
            err.contains("new_values") && err.contains("expected a JSON object"),
            "{err}"
        );
        logged.new_values = None;
        logged.metadata = Some("{not json".into());
        let err = ChangeEvent::try_from(logged.clone())
            .expect_err("metadata")
            .to_string();
        assert!(
            err.contains("metadata") && err.contains(&Ulid::from_parts(1, 1).to_string()),
            "{err}"
        );
        assert_eq!(LoggedEvent::json_text(Some(" null ".into())), None);
        assert_eq!(
            LoggedEvent::json_text(Some("{}".into())).as_deref(),
            Some("{}")
        );
    }

    #[test]
    fn iso8601_matches_known_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_764_000_000_000), "2025-11-24T16:00:00.000Z");
    }

    proptest::proptest! {
        /// The text written straight from a version is the text of its `Value`
        /// form (stored versions compare as text across nodes and builds).
        #[test]
        fn version_text_is_the_value_form(
            members in proptest::collection::vec(
                (any_ulid(), 1i64..1 << 60, any_ulid(), proptest::bool::ANY,
                 proptest::collection::btree_map(any_ulid(), 1i64..1 << 60, 0..4)),
                0..4,
            ),
        ) {
            let frontier: Vec<Member> = members
                .into_iter()
                .map(|(e, h, n, deleted, vv)| Member {
                    event_id: e,
                    hlc: Hlc::decode(h).expect("in range"),
                    node_id: n,
                    deleted,
                    vv: VersionVector(
                        vv.into_iter()
                            .map(|(o, h)| (o, Hlc::decode(h).expect("in range")))
                            .collect(),
                    ),
                })
                .collect();
            for m in &frontier {
                proptest::prop_assert_eq!(m.vv.to_json_text(), m.vv.to_json().to_string());
            }
            let version = Version {
                hlc: Hlc::ZERO,
                node_id: Ulid::nil(),
                event_id: Ulid::nil(),
                deleted: false,
                vv: VersionVector::new(),
                frontier,
            };
            proptest::prop_assert_eq!(version.frontier_text(), version.frontier_json().to_string());
        }
    }

    fn any_ulid() -> impl proptest::strategy::Strategy<Value = Ulid> {
        use proptest::strategy::Strategy;
        proptest::num::u128::ANY.prop_map(Ulid)
    }

    #[test]
    fn ulid_text_is_canonical() {
        let id = Ulid::from_parts(1_764_000_000_000, 42);
        let text = id.to_string();
        assert_eq!(parse_ulid("id", &text).expect("canonical"), id);
        assert_eq!(
            parse_ulid("id", &text.to_lowercase()).expect("lower case"),
            id
        );
        assert_eq!(
            parse_ulid("id", "7ZZZZZZZZZZZZZZZZZZZZZZZZZ")
                .expect("largest")
                .0,
            u128::MAX
        );
        // These decode (with the top bits dropped) to the ids spelled 0... and 1...;
        // they must be refused (the store_validators fuzz target checks the same).
        for bad in [
            "80000000000000000000000000",
            "Z1KQ9A7B3C4D5E6F7G8H9J0K1M",
            "81234567890ABCDEFGHJKMNPQR",
        ] {
            let err = parse_ulid("event_id", bad).expect_err(bad).to_string();
            assert!(
                err.contains("first character must be 0 to 7") && err.contains("event_id"),
                "{err}"
            );
        }
    }
}
