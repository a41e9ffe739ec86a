//! In-memory backend: the whole database is a set of ordered maps behind one async
//! mutex, with the same observable semantics as the SQLite backend, so the
//! replicator can run under deterministic network simulation (every host on one
//! thread, no database threads, no file IO, iteration in key order).
//!
//! * A daemon write transaction holds the mutex for its whole life and mutates
//!   the state in place, recording an undo log: rollback (explicit, or by
//!   dropping the transaction, as a crashed process would) undoes it, savepoints
//!   are marks in the log. Readers outside the transaction wait for its end, so
//!   they only ever see committed state.
//! * User tables are declared programmatically ([`MemoryBackend::create_table`])
//!   with their columns, primary key, `NOT NULL` and defaults; values are kept as
//!   JSON, as given (dynamic typing, like SQLite). A row breaking `NOT NULL` is
//!   refused with [`StoreError::Constraint`].
//! * There is no direct-SQL access, so nothing is ever captured: rows only change
//!   through the daemon, and [`Backend::take_captures`] returns nothing.
//! * The backend is a cheap handle: clones share one database, so a "restarted"
//!   node opens a new engine over a clone and finds everything committed before.
//!
//! Timestamps it writes itself (`synced_at`, `detected_at`, `resolved_at`) come
//! from the wall function given to [`MemoryBackend::with_wall`] (the system clock
//! by default).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use serde_json::Value;
use tidemark_hlc::Hlc;
use tokio::sync::{Mutex, OwnedMutexGuard};
use ulid::Ulid;

use crate::backend::{
    Backend, Compacted, FirstEvent, RowWrite, SavepointOp, TableShape, Tombstones, TxScope,
};
use crate::error::{Result, StoreError};
use crate::ident::Ident;
use crate::model::{
    Blocked, Capture, ChangeEvent, Conflict, ConflictFilter, ConflictPolicy, ConflictStatus,
    EventExtras, ForeignKey, LoggedEvent, Quarantined, Rejected, Sequences, SetAside, TableInfo,
    Values, Version, VersionVector,
};
use crate::value::ColumnType;

/// One column of a table declared in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// The declared type, as `inspect_table` reports it (e.g. `TEXT`, `INTEGER`).
    pub sql_type: String,
    pub primary_key: bool,
    pub not_null: bool,
    /// Value of the column when a new row does not give one (NULL when `None`).
    pub default: Option<Value>,
    /// `UNIQUE`: no two rows hold the same non-NULL value.
    pub unique: bool,
    /// `REFERENCES parent(column)`: a non-NULL value must be held by a parent
    /// row; deleting a parent with children is refused (RESTRICT).
    pub references: Option<(String, String)>,
    /// `CHECK (column BETWEEN min AND max)` on a number.
    pub check_range: Option<(f64, f64)>,
}

impl Column {
    pub fn new(name: &str, sql_type: &str) -> Column {
        Column {
            name: name.to_owned(),
            sql_type: sql_type.to_owned(),
            primary_key: false,
            not_null: false,
            default: None,
            unique: false,
            references: None,
            check_range: None,
        }
    }

    pub fn unique(mut self) -> Column {
        self.unique = true;
        self
    }

    pub fn references(mut self, table: &str, column: &str) -> Column {
        self.references = Some((table.to_owned(), column.to_owned()));
        self
    }

    pub fn check_range(mut self, min: f64, max: f64) -> Column {
        self.check_range = Some((min, max));
        self
    }

    pub fn primary_key(mut self) -> Column {
        self.primary_key = true;
        self
    }

    pub fn not_null(mut self) -> Column {
        self.not_null = true;
        self
    }

    pub fn default(mut self, value: Value) -> Column {
        self.default = Some(value);
        self
    }
}

#[derive(Debug, Clone, Default)]
struct Table {
    columns: Vec<Column>,
    /// Rows by primary key text; every column present (stamps included).
    rows: BTreeMap<String, Values>,
}

#[derive(Debug, Clone)]
struct StoredEvent {
    event: ChangeEvent,
    synced_at: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    migrated: bool,
    meta: BTreeMap<String, String>,
    tables: BTreeMap<String, Table>,
    /// `tidemark_datatypes`, by table name.
    registry: BTreeMap<String, TableInfo>,
    /// `change_events`, by event id.
    events: BTreeMap<Ulid, StoredEvent>,
    /// `(origin, hlc, event_id)` of every event: streaming per origin in HLC order.
    by_origin: BTreeSet<(Ulid, Hlc, Ulid)>,
    /// `tidemark_nodes.max_hlc`.
    nodes: BTreeMap<Ulid, Hlc>,
    versions: BTreeMap<(String, Ulid), Version>,
    conflicts: BTreeMap<Ulid, Conflict>,
    /// By event id as received, with when it came (wall ms).
    quarantine: BTreeMap<String, (Rejected, i64)>,
    /// `(peer, origin)` -> acknowledged HLC.
    progress: BTreeMap<(Ulid, Ulid), Hlc>,
    /// `tidemark_blocked`, by (table, record).
    blocked: BTreeMap<(String, Ulid), Blocked>,
    /// `tidemark_nodes.max_seq`.
    seqs: BTreeMap<Ulid, u64>,
    /// `tidemark_nodes.compacted_hlc`.
    compacted: BTreeMap<Ulid, Hlc>,
}

type Undo = Box<dyn FnOnce(&mut State) + Send>;
type WallFn = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The in-memory database; clones share it.
#[derive(Clone)]
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
    wall_ms: WallFn,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

/// A daemon write transaction on the in-memory database.
pub struct MemoryTx {
    state: OwnedMutexGuard<State>,
    /// Inverse of every change made so far, in order.
    undo: Vec<Undo>,
    /// Undo-log lengths at each open savepoint.
    marks: Vec<usize>,
}

impl std::fmt::Debug for MemoryTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTx")
            .field("changes", &self.undo.len())
            .finish_non_exhaustive()
    }
}

impl Drop for MemoryTx {
    /// A transaction dropped without commit (an error, or a crashed task) rolls back.
    fn drop(&mut self) {
        self.undo_to(0);
    }
}

impl MemoryTx {
    fn undo_to(&mut self, len: usize) {
        while self.undo.len() > len {
            if let Some(f) = self.undo.pop() {
                f(&mut self.state);
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) `key` in the map `field` selects,
    /// recording the inverse; returns the previous value.
    fn set<K, V>(
        &mut self,
        field: fn(&mut State) -> &mut BTreeMap<K, V>,
        key: K,
        value: Option<V>,
    ) -> Option<V>
    where
        K: Ord + Clone + Send + 'static,
        V: Clone + Send + 'static,
    {
        let map = field(&mut self.state);
        let old = match value {
            Some(v) => map.insert(key.clone(), v),
            None => map.remove(&key),
        };
        let restore = old.clone();
        self.undo.push(Box::new(move |s| {
            let map = field(s);
            match restore {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
        }));
        old
    }

    /// Sets or removes a row of a user table, recording the inverse.
    fn set_row(&mut self, table: &str, pk: String, row: Option<Values>) -> Result<()> {
        let t = self
            .state
            .tables
            .get_mut(table)
            .ok_or_else(|| StoreError::corrupt(table, "the table no longer exists"))?;
        let old = match row {
            Some(r) => t.rows.insert(pk.clone(), r),
            None => t.rows.remove(&pk),
        };
        let name = table.to_owned();
        self.undo.push(Box::new(move |s| {
            if let Some(t) = s.tables.get_mut(&name) {
                match old {
                    Some(r) => t.rows.insert(pk, r),
                    None => t.rows.remove(&pk),
                };
            }
        }));
        Ok(())
    }

    fn remove_origin_entry(&mut self, entry: (Ulid, Hlc, Ulid)) {
        if self.state.by_origin.remove(&entry) {
            self.undo.push(Box::new(move |s| {
                s.by_origin.insert(entry);
            }));
        }
    }

    fn add_origin_entry(&mut self, entry: (Ulid, Hlc, Ulid)) {
        if self.state.by_origin.insert(entry) {
            self.undo.push(Box::new(move |s| {
                s.by_origin.remove(&entry);
            }));
        }
    }
}

fn events_field(s: &mut State) -> &mut BTreeMap<Ulid, StoredEvent> {
    &mut s.events
}
fn nodes_field(s: &mut State) -> &mut BTreeMap<Ulid, Hlc> {
    &mut s.nodes
}
fn versions_field(s: &mut State) -> &mut BTreeMap<(String, Ulid), Version> {
    &mut s.versions
}
fn conflicts_field(s: &mut State) -> &mut BTreeMap<Ulid, Conflict> {
    &mut s.conflicts
}
fn quarantine_field(s: &mut State) -> &mut BTreeMap<String, (Rejected, i64)> {
    &mut s.quarantine
}
fn registry_field(s: &mut State) -> &mut BTreeMap<String, TableInfo> {
    &mut s.registry
}
fn seqs_field(s: &mut State) -> &mut BTreeMap<Ulid, u64> {
    &mut s.seqs
}
fn compacted_field(s: &mut State) -> &mut BTreeMap<Ulid, Hlc> {
    &mut s.compacted
}
fn progress_field(s: &mut State) -> &mut BTreeMap<(Ulid, Ulid), Hlc> {
    &mut s.progress
}
fn blocked_field(s: &mut State) -> &mut BTreeMap<(String, Ulid), Blocked> {
    &mut s.blocked
}

/// Events of one record, in the total order.
fn events_of_record(s: &State, table: &str, id: Ulid) -> Vec<ChangeEvent> {
    let mut events: Vec<ChangeEvent> = s
        .events
        .values()
        .filter(|e| e.event.table_name == table && e.event.record_id == id)
        .map(|e| e.event.clone())
        .collect();
    events.sort_by_key(ChangeEvent::order);
    events
}

fn is_canonical_ulid(text: &str) -> bool {
    Ulid::from_string(text).is_ok_and(|u| u.to_string() == text)
}

/// The replicated columns of a stored row (`TableInfo::columns`), as the SQL
/// backends' `json_object` over them returns it.
fn project(info: &TableInfo, row: &Values) -> Values {
    info.columns
        .iter()
        .map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Value::Null)))
        .collect()
}

impl MemoryBackend {
    /// An empty database whose own timestamps follow the system clock.
    pub fn new() -> Self {
        MemoryBackend::with_wall(tidemark_hlc::system_wall_ms)
    }

    /// An empty database whose own timestamps (`synced_at`, conflict times) read
    /// `wall_ms` (ms since the Unix epoch).
    pub fn with_wall(wall_ms: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        MemoryBackend {
            state: Arc::new(Mutex::new(State::default())),
            wall_ms: Arc::new(wall_ms),
        }
    }

    fn now(&self) -> String {
        crate::model::iso8601((self.wall_ms)())
    }

    /// Declares a user table (`CREATE TABLE`). Fails, naming the problem, for a
    /// name or column that is not a plain identifier, duplicate columns, or a
    /// table that exists.
    pub async fn create_table(&self, name: &str, columns: Vec<Column>) -> Result<()> {
        Ident::parse("table name", name)?;
        if columns.is_empty() {
            return Err(StoreError::invalid(
                format!("table {name}"),
                "a table needs at least one column",
            ));
        }
        let mut seen = HashSet::new();
        for c in &columns {
            Ident::parse("column name", &c.name)?;
            if !seen.insert(c.name.as_str()) {
                return Err(StoreError::invalid(
                    format!("table {name}"),
                    format!("column {} is declared twice", c.name),
                ));
            }
        }
        let mut state = self.state.lock().await;
        if state.tables.contains_key(name) {
            return Err(StoreError::invalid(
                format!("table {name}"),
                "a table of that name already exists",
            ));
        }
        state.tables.insert(
            name.to_owned(),
            Table {
                columns,
                rows: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Committed rows of a user table in primary-key order, every column included
    /// (`node_id` and `hlc_modified` too); `None` for an unknown table.
    pub async fn table_rows(&self, name: &str) -> Option<Vec<Values>> {
        let state = self.state.lock().await;
        state
            .tables
            .get(name)
            .map(|t| t.rows.values().cloned().collect())
    }

    /// Events whose `synced_at` is set.
    pub async fn count_synced(&self) -> u64 {
        let state = self.state.lock().await;
        state
            .events
            .values()
            .filter(|e| e.synced_at.is_some())
            .count() as u64
    }

    fn registered(state: &State, table: &TableInfo) -> Result<()> {
        if state.tables.contains_key(&table.table_name) {
            Ok(())
        } else {
            Err(StoreError::corrupt(
                &table.table_name,
                "registered table does not exist",
            ))
        }
    }
}

/// One row of an upsert: `INSERT .. ON CONFLICT DO UPDATE` of the given columns,
/// each value checked against its column's class like a typed database would.
fn upsert(tx: &mut MemoryTx, table: &TableInfo, r: &RowWrite) -> Result<()> {
    let t = &tx.state.tables[&table.table_name];
    let pk = r.id.to_string();
    let refused = |reason: String| StoreError::Constraint {
        table: table.table_name.clone(),
        reason,
    };
    // The given replicated columns, the key and the stamps.
    let mut given = Values::new();
    for (c, ty) in table.columns.iter().zip(&table.types) {
        if let Some(v) = r.values.get(c) {
            let v = ty
                .check(v)
                .map_err(|reason| refused(format!("column {c} ({ty}): {reason}")))?;
            given.insert(c.clone(), v);
        }
    }
    given.insert(table.primary_key.clone(), Value::String(pk.clone()));
    given.insert("node_id".into(), Value::String(r.node_id.to_string()));
    given.insert("hlc_modified".into(), Value::from(r.hlc.encode()));
    // Like INSERT .. ON CONFLICT, NOT NULL is checked on the proposed new row
    // (defaults for what is not given) before the existing row is considered.
    let mut proposed = Values::new();
    for c in &t.columns {
        let v = given
            .get(&c.name)
            .cloned()
            .or_else(|| c.default.clone())
            .unwrap_or(Value::Null);
        if c.not_null && v.is_null() {
            return Err(refused(format!(
                "NOT NULL constraint failed: {}.{}",
                table.table_name, c.name
            )));
        }
        proposed.insert(c.name.clone(), v);
    }
    let row = match t.rows.get(&pk) {
        Some(existing) => {
            let mut row = existing.clone();
            row.extend(given);
            row
        }
        None => proposed,
    };
    for c in &t.columns {
        let Some(v) = row.get(&c.name).filter(|v| !v.is_null()) else {
            continue;
        };
        let failed = |what: &str| {
            refused(format!(
                "{what} constraint failed: {}.{}",
                table.table_name, c.name
            ))
        };
        if c.unique
            && t.rows
                .iter()
                .any(|(k, r)| *k != pk && r.get(&c.name) == Some(v))
        {
            return Err(failed("UNIQUE"));
        }
        if let Some((parent, column)) = &c.references {
            let held = tx
                .state
                .tables
                .get(parent)
                .is_some_and(|p| p.rows.values().any(|r| r.get(column) == Some(v)));
            if !held {
                return Err(failed("FOREIGN KEY"));
            }
        }
        if let Some((min, max)) = c.check_range {
            let n = v.as_f64().unwrap_or(f64::NAN);
            if !(min..=max).contains(&n) {
                return Err(failed("CHECK"));
            }
        }
    }
    tx.set_row(&table.table_name, pk, Some(row))
}

fn conflict_matches(c: &Conflict, filter: &ConflictFilter) -> bool {
    filter.table.as_ref().is_none_or(|t| *t == c.table_name)
        && filter.status.is_none_or(|s| s == c.status)
        && filter.after.is_none_or(|a| c.conflict_id > a)
}

impl MemoryBackend {
    /// Whether `e` is a tombstone that goes (see [`Backend::compact_events`]);
    /// its origin's newest events and blocks on it are checked by the caller.
    fn tombstone_goes(s: &State, e: &ChangeEvent, t: &Tombstones<'_>) -> bool {
        let record = (e.table_name.clone(), e.record_id);
        let named = |table: &Option<String>, id: Option<Ulid>| {
            table.as_deref() == Some(e.table_name.as_str()) && id == Some(e.record_id)
        };
        e.operation == crate::model::Operation::Delete
            && e.hlc < t.before
            && s.versions
                .get(&record)
                .is_some_and(|v| v.event_id == e.event_id && v.deleted && v.frontier.len() == 1)
            && !s.events.values().any(|o| {
                o.event.event_id != e.event_id
                    && o.event.record_id == e.record_id
                    && o.event.table_name == e.table_name
            })
            && !s.conflicts.values().any(|c| {
                c.status == ConflictStatus::Open
                    && ((c.table_name == e.table_name && c.record_id == e.record_id)
                        || named(&c.winner_table, c.winner_record_id))
            })
            && !s.blocked.values().any(|b| {
                (b.table_name == e.table_name && b.record_id == e.record_id)
                    || named(&b.blocker_table, b.blocker_id)
            })
            && t.acked.get(e.node_id) >= e.hlc
    }
}

impl Backend for MemoryBackend {
    type Tx = MemoryTx;

    fn kind(&self) -> &'static str {
        "memory"
    }

    /// A declared type is a class name (`float64`, `decimal(10,2)`, ...) or a
    /// SQLite type name, read as SQLite reads it.
    fn column_type(&self, declared: &str) -> std::result::Result<ColumnType, String> {
        declared
            .parse::<ColumnType>()
            .or_else(|_| ColumnType::of_sqlite(declared))
    }

    async fn migrate(&self) -> Result<()> {
        self.state.lock().await.migrated = true;
        Ok(())
    }

    async fn migrate_down(&self) -> Result<()> {
        let mut s = self.state.lock().await;
        let tables = std::mem::take(&mut s.tables);
        *s = State {
            tables,
            ..State::default()
        };
        Ok(())
    }

    async fn applied_migrations(&self) -> Result<Vec<i64>> {
        Ok(if self.state.lock().await.migrated {
            vec![1]
        } else {
            Vec::new()
        })
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.state.lock().await.meta.get(key).cloned())
    }

    async fn meta_set(&self, key: &str, value: &str) -> Result<()> {
        self.state
            .lock()
            .await
            .meta
            .insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    async fn inspect_table(&self, name: &Ident) -> Result<Option<TableShape>> {
        let s = self.state.lock().await;
        Ok(s.tables.get(name.as_str()).map(|t| TableShape {
            name: name.clone(),
            columns: t
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.sql_type.clone()))
                .collect(),
            primary_key: t
                .columns
                .iter()
                .filter(|c| c.primary_key)
                .map(|c| c.name.clone())
                .collect(),
            uniques: t
                .columns
                .iter()
                .filter(|c| c.unique && !c.primary_key)
                .map(|c| vec![c.name.clone()])
                .collect(),
            foreign_keys: t
                .columns
                .iter()
                .filter_map(|c| {
                    let (parent, column) = c.references.as_ref()?;
                    Some(ForeignKey {
                        columns: vec![c.name.clone()],
                        parent: parent.clone(),
                        parent_columns: vec![column.clone()],
                    })
                })
                .collect(),
        }))
    }

    async fn register(&self, info: &TableInfo, _first_time: bool) -> Result<()> {
        // Rows only ever enter through the daemon, so there are none to snapshot
        // at first registration (the SQL backends queue existing rows as captures).
        let mut s = self.state.lock().await;
        let table =
            s.tables
                .get_mut(&info.table_name)
                .ok_or_else(|| StoreError::Unregistrable {
                    table: info.table_name.clone(),
                    reason: "no such table".into(),
                })?;
        if let Some(bad) = table.rows.keys().find(|k| !is_canonical_ulid(k)) {
            return Err(StoreError::Unregistrable {
                table: info.table_name.clone(),
                reason: format!(
                    "primary key {} holds {:?} which is not a ULID in canonical form (26 uppercase Crockford base32 characters)",
                    info.primary_key,
                    crate::model::truncate(bad)
                ),
            });
        }
        if !table.columns.iter().any(|c| c.name == "node_id") {
            table.columns.push(Column::new("node_id", "TEXT"));
            for row in table.rows.values_mut() {
                row.insert("node_id".into(), Value::Null);
            }
        }
        if !table.columns.iter().any(|c| c.name == "hlc_modified") {
            table.columns.push(
                Column::new("hlc_modified", "INTEGER")
                    .not_null()
                    .default(Value::from(0)),
            );
            for row in table.rows.values_mut() {
                row.insert("hlc_modified".into(), Value::from(0));
            }
        }
        s.registry.insert(info.table_name.clone(), info.clone());
        Ok(())
    }

    async fn set_policy(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        policy: ConflictPolicy,
    ) -> Result<()> {
        if let Some(mut info) = tx.state.registry.get(table).cloned() {
            info.conflict_policy = policy;
            tx.set(registry_field, table.to_owned(), Some(info));
        }
        Ok(())
    }

    async fn load_tables(&self) -> Result<Vec<TableInfo>> {
        Ok(self.state.lock().await.registry.values().cloned().collect())
    }

    async fn begin(&self, _scope: TxScope) -> Result<Self::Tx> {
        Ok(MemoryTx {
            state: self.state.clone().lock_owned().await,
            undo: Vec::new(),
            marks: Vec::new(),
        })
    }

    async fn commit(&self, mut tx: Self::Tx) -> Result<()> {
        tx.undo.clear();
        tx.marks.clear();
        Ok(())
    }

    async fn rollback(&self, mut tx: Self::Tx) -> Result<()> {
        tx.undo_to(0);
        Ok(())
    }

    async fn take_captures(&self, _tx: &mut Self::Tx, _limit: u32) -> Result<Vec<Capture>> {
        Ok(Vec::new())
    }

    async fn delete_captures(&self, _tx: &mut Self::Tx, _seqs: &[i64]) -> Result<()> {
        Ok(())
    }

    async fn set_aside(&self, _tx: &mut Self::Tx, rows: &[SetAside]) -> Result<()> {
        // Nothing is ever captured, so nothing is set aside.
        debug_assert!(rows.is_empty());
        Ok(())
    }

    async fn list_set_aside(&self, _limit: u32) -> Result<Vec<SetAside>> {
        Ok(Vec::new())
    }

    async fn count_set_aside(&self) -> Result<u64> {
        Ok(0)
    }

    async fn discard_set_aside(&self, _seqs: Option<&[i64]>) -> Result<u64> {
        Ok(0)
    }

    async fn versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Version>> {
        Ok(ids
            .iter()
            .filter_map(|id| {
                tx.state
                    .versions
                    .get(&(table.to_owned(), *id))
                    .map(|v| (*id, v.clone()))
            })
            .collect())
    }

    async fn put_versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        versions: &[(Ulid, Version)],
    ) -> Result<()> {
        for (id, version) in versions {
            tx.set(
                versions_field,
                (table.to_owned(), *id),
                Some(version.clone()),
            );
        }
        Ok(())
    }

    async fn rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Values>> {
        Self::registered(&tx.state, table)?;
        let t = &tx.state.tables[&table.table_name];
        Ok(ids
            .iter()
            .filter_map(|id| {
                t.rows
                    .get(&id.to_string())
                    .map(|row| (*id, project(table, row)))
            })
            .collect())
    }

    async fn upsert_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        rows: &[RowWrite<'_>],
    ) -> Result<()> {
        Self::registered(&tx.state, table)?;
        for r in rows {
            upsert(tx, table, r)?;
        }
        Ok(())
    }

    async fn delete_rows(&self, tx: &mut Self::Tx, table: &TableInfo, ids: &[Ulid]) -> Result<()> {
        Self::registered(&tx.state, table)?;
        for id in ids {
            let pk = id.to_string();
            let Some(row) = tx.state.tables[&table.table_name].rows.get(&pk) else {
                continue;
            };
            // RESTRICT: a row some child still references stays.
            for (child, t) in &tx.state.tables {
                for c in &t.columns {
                    let Some((parent, column)) = &c.references else {
                        continue;
                    };
                    let held = row.get(column).filter(|v| !v.is_null());
                    if *parent == table.table_name
                        && held.is_some_and(|v| t.rows.values().any(|r| r.get(&c.name) == Some(v)))
                    {
                        return Err(StoreError::Constraint {
                            table: table.table_name.clone(),
                            reason: format!(
                                "FOREIGN KEY constraint failed: {child}.{} references the row",
                                c.name
                            ),
                        });
                    }
                }
            }
            tx.set_row(&table.table_name, pk, None)?;
        }
        Ok(())
    }

    async fn matching_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        columns: &[usize],
        values: &[Value],
        except: Option<Ulid>,
    ) -> Result<Vec<Ulid>> {
        Self::registered(&tx.state, table)?;
        let skip = except.map(|e| e.to_string());
        Ok(tx.state.tables[&table.table_name]
            .rows
            .iter()
            .filter(|(pk, _)| skip.as_ref() != Some(*pk))
            .filter(|(_, row)| {
                columns
                    .iter()
                    .zip(values)
                    .all(|(&i, v)| !v.is_null() && row.get(&table.columns[i]) == Some(v))
            })
            .filter_map(|(pk, _)| Ulid::from_string(pk).ok())
            .collect())
    }

    async fn put_blocked(&self, tx: &mut Self::Tx, b: &Blocked) -> Result<()> {
        let mut b = b.clone();
        b.blocked_at = self.now();
        tx.set(blocked_field, (b.table_name.clone(), b.record_id), Some(b));
        Ok(())
    }

    async fn remove_blocked(&self, tx: &mut Self::Tx, table: &str, id: Ulid) -> Result<()> {
        if tx.state.blocked.contains_key(&(table.to_owned(), id)) {
            tx.set(blocked_field, (table.to_owned(), id), None);
        }
        Ok(())
    }

    async fn blocked(&self, tx: &mut Self::Tx, table: &str, id: Ulid) -> Result<Option<Blocked>> {
        Ok(tx.state.blocked.get(&(table.to_owned(), id)).cloned())
    }

    async fn blocked_by_any(
        &self,
        tx: &mut Self::Tx,
        blockers: &[(String, Ulid)],
    ) -> Result<Vec<Blocked>> {
        Ok(tx
            .state
            .blocked
            .values()
            .filter(|b| {
                blockers.iter().any(|(t, id)| {
                    b.blocker_table.as_deref() == Some(t.as_str())
                        && b.blocker_id.is_none_or(|x| x == *id)
                })
            })
            .cloned()
            .collect())
    }

    async fn has_blocked(&self, tx: &mut Self::Tx) -> Result<bool> {
        Ok(!tx.state.blocked.is_empty())
    }

    async fn list_blocked(
        &self,
        after: Option<(String, Ulid)>,
        limit: u32,
    ) -> Result<Vec<Blocked>> {
        let s = self.state.lock().await;
        let start = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        Ok(s.blocked
            .range((start, Bound::Unbounded))
            .take(limit as usize)
            .map(|(_, b)| b.clone())
            .collect())
    }

    async fn count_blocked(&self) -> Result<u64> {
        Ok(self.state.lock().await.blocked.len() as u64)
    }

    async fn delete_clash(&self, tx: &mut Self::Tx, id: Ulid) -> Result<()> {
        if tx
            .state
            .conflicts
            .get(&id)
            .is_some_and(|c| c.kind != crate::model::ConflictKind::Version)
        {
            tx.set(conflicts_field, id, None);
        }
        Ok(())
    }

    async fn delete_version_conflict(&self, tx: &mut Self::Tx, id: Ulid) -> Result<()> {
        if tx
            .state
            .conflicts
            .get(&id)
            .is_some_and(|c| c.kind == crate::model::ConflictKind::Version)
        {
            tx.set(conflicts_field, id, None);
        }
        Ok(())
    }

    async fn stamp_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        stamps: &[(Ulid, Hlc, Ulid)],
    ) -> Result<()> {
        Self::registered(&tx.state, table)?;
        for (id, hlc, node_id) in stamps {
            let pk = id.to_string();
            if let Some(existing) = tx.state.tables[&table.table_name].rows.get(&pk) {
                let mut row = existing.clone();
                row.insert("node_id".into(), Value::String(node_id.to_string()));
                row.insert("hlc_modified".into(), Value::from(hlc.encode()));
                tx.set_row(&table.table_name, pk, Some(row))?;
            }
        }
        Ok(())
    }

    async fn existing_events(&self, tx: &mut Self::Tx, ids: &[Ulid]) -> Result<HashSet<Ulid>> {
        Ok(ids
            .iter()
            .filter(|id| tx.state.events.contains_key(id))
            .copied()
            .collect())
    }

    async fn insert_events(
        &self,
        tx: &mut Self::Tx,
        events: &[&ChangeEvent],
        extras: &EventExtras,
    ) -> Result<()> {
        for e in events {
            if tx.state.events.contains_key(&e.event_id) {
                continue;
            }
            tx.set(
                events_field,
                e.event_id,
                Some(StoredEvent {
                    event: (*e).clone(),
                    synced_at: extras.synced(e.event_id).then(|| self.now()),
                }),
            );
            tx.add_origin_entry((e.node_id, e.hlc, e.event_id));
        }
        Ok(())
    }

    async fn raise_vector(&self, tx: &mut Self::Tx, vector: &VersionVector) -> Result<()> {
        for (origin, hlc) in &vector.0 {
            let current = tx.state.nodes.get(origin).copied();
            if current.is_none_or(|c| *hlc > c) {
                tx.set(nodes_field, *origin, Some(*hlc));
            }
        }
        Ok(())
    }

    async fn raise_sequences(&self, tx: &mut Self::Tx, seqs: &Sequences) -> Result<()> {
        for (origin, seq) in seqs {
            if tx.state.seqs.get(origin).is_none_or(|c| seq > c) {
                tx.set(seqs_field, *origin, Some(*seq));
            }
        }
        Ok(())
    }

    async fn event_values(
        &self,
        tx: &mut Self::Tx,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Option<Values>>> {
        Ok(ids
            .iter()
            .filter_map(|id| {
                tx.state
                    .events
                    .get(id)
                    .map(|e| (*id, e.event.new_values.clone()))
            })
            .collect())
    }

    async fn quarantine(
        &self,
        tx: &mut Self::Tx,
        _peer: Option<Ulid>,
        rows: &[Rejected],
    ) -> Result<()> {
        for r in rows {
            let key = crate::model::truncate(&r.event_id);
            if !tx.state.quarantine.contains_key(&key) {
                let at = (self.wall_ms)();
                tx.set(quarantine_field, key, Some((r.clone(), at)));
            }
        }
        Ok(())
    }

    async fn savepoint(&self, tx: &mut Self::Tx, op: SavepointOp) -> Result<()> {
        let missing = || StoreError::corrupt("savepoint", "no savepoint is open");
        match op {
            SavepointOp::Set => tx.marks.push(tx.undo.len()),
            SavepointOp::RollbackTo => {
                let mark = *tx.marks.last().ok_or_else(missing)?;
                tx.undo_to(mark);
            }
            SavepointOp::Release => {
                tx.marks.pop().ok_or_else(missing)?;
            }
        }
        Ok(())
    }

    async fn count_quarantined(&self) -> Result<u64> {
        Ok(self.state.lock().await.quarantine.len() as u64)
    }

    async fn list_quarantined(&self, limit: u32) -> Result<Vec<Quarantined>> {
        // The memory backend keeps no peer with them.
        Ok(self
            .state
            .lock()
            .await
            .quarantine
            .values()
            .take(limit as usize)
            .map(|(r, at)| Quarantined {
                event_id: r.event_id.clone(),
                peer_id: None,
                code: r.kind.code().to_owned(),
                reason: r.reason.clone(),
                event: r.event.to_string(),
                received_at: crate::model::iso8601(*at),
            })
            .collect())
    }

    async fn discard_quarantined(&self, event_ids: Option<&[String]>) -> Result<u64> {
        let mut state = self.state.lock().await;
        let before = state.quarantine.len();
        match event_ids {
            None => state.quarantine.clear(),
            Some(ids) => state.quarantine.retain(|id, _| !ids.contains(id)),
        }
        Ok((before - state.quarantine.len()) as u64)
    }

    async fn expire_quarantined(&self, before_ms: i64) -> Result<u64> {
        let mut state = self.state.lock().await;
        let before = state.quarantine.len();
        state.quarantine.retain(|_, (_, at)| *at >= before_ms);
        Ok((before - state.quarantine.len()) as u64)
    }

    async fn put_conflicts(&self, tx: &mut Self::Tx, conflicts: &[Conflict]) -> Result<()> {
        for c in conflicts {
            tx.set(conflicts_field, c.conflict_id, Some(c.clone()));
        }
        Ok(())
    }

    async fn record_conflicts(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> Result<Vec<Conflict>> {
        Ok(tx
            .state
            .conflicts
            .values()
            .filter(|c| c.table_name == table && c.record_id == id)
            .cloned()
            .collect())
    }

    async fn table_conflicts(&self, tx: &mut Self::Tx, table: &str) -> Result<Vec<Conflict>> {
        Ok(tx
            .state
            .conflicts
            .values()
            .filter(|c| c.table_name == table)
            .cloned()
            .collect())
    }

    async fn conflict(&self, id: Ulid) -> Result<Option<Conflict>> {
        Ok(self.state.lock().await.conflicts.get(&id).cloned())
    }

    async fn conflict_in(&self, tx: &mut Self::Tx, id: Ulid) -> Result<Option<Conflict>> {
        Ok(tx.state.conflicts.get(&id).cloned())
    }

    async fn list_conflicts(&self, filter: &ConflictFilter) -> Result<Vec<Conflict>> {
        let s = self.state.lock().await;
        Ok(s.conflicts
            .values()
            .filter(|c| conflict_matches(c, filter))
            .take(filter.limit as usize)
            .cloned()
            .collect())
    }

    async fn open_conflict_counts(&self) -> Result<Vec<(String, u64)>> {
        let s = self.state.lock().await;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for c in s.conflicts.values() {
            if c.status == ConflictStatus::Open {
                *counts.entry(c.table_name.clone()).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    async fn get_row(&self, table: &TableInfo, id: Ulid) -> Result<Option<Values>> {
        let s = self.state.lock().await;
        Self::registered(&s, table)?;
        Ok(s.tables[&table.table_name]
            .rows
            .get(&id.to_string())
            .map(|row| project(table, row)))
    }

    async fn get_version(&self, table: &str, id: Ulid) -> Result<Option<Version>> {
        let s = self.state.lock().await;
        Ok(s.versions.get(&(table.to_owned(), id)).cloned())
    }

    async fn vector(&self) -> Result<VersionVector> {
        let s = self.state.lock().await;
        Ok(VersionVector(
            s.nodes
                .iter()
                .filter(|(_, h)| **h > Hlc::ZERO)
                .map(|(o, h)| (*o, *h))
                .collect(),
        ))
    }

    async fn sequences(&self) -> Result<Sequences> {
        Ok(self.state.lock().await.seqs.clone())
    }

    async fn max_hlc(&self) -> Result<Hlc> {
        let s = self.state.lock().await;
        Ok(s.events
            .values()
            .map(|e| e.event.hlc)
            .max()
            .unwrap_or(Hlc::ZERO))
    }

    async fn events_of_origin_after(
        &self,
        origin: Ulid,
        after: Hlc,
        limit: u32,
    ) -> Result<Vec<LoggedEvent>> {
        let s = self.state.lock().await;
        Ok(origin_range(&s, origin, after)
            .take(limit as usize)
            .filter_map(|(_, _, id)| s.events.get(id).map(|e| LoggedEvent::from(&e.event)))
            .collect())
    }

    async fn first_of_origin_after(&self, origin: Ulid, after: Hlc) -> Result<Option<FirstEvent>> {
        let s = self.state.lock().await;
        let first = origin_range(&s, origin, after)
            .next()
            .and_then(|(_, _, id)| s.events.get(id));
        Ok(first.map(|e| FirstEvent {
            wall_ms: e.event.wall_ms,
            seq: e.event.seq().ok().flatten(),
        }))
    }

    async fn count_of_origin_after(&self, origin: Ulid, after: Hlc) -> Result<u64> {
        let s = self.state.lock().await;
        Ok(origin_range(&s, origin, after).count() as u64)
    }

    async fn record_events(&self, table: &str, id: Ulid) -> Result<Vec<ChangeEvent>> {
        let s = self.state.lock().await;
        Ok(events_of_record(&s, table, id))
    }

    async fn record_events_in(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> Result<Vec<ChangeEvent>> {
        Ok(events_of_record(&tx.state, table, id))
    }

    async fn pending_captures(&self) -> Result<u64> {
        Ok(0)
    }

    async fn has_captures(&self) -> Result<bool> {
        Ok(false)
    }

    async fn record_ack(
        &self,
        tx: &mut Self::Tx,
        peer: Ulid,
        vector: &VersionVector,
    ) -> Result<()> {
        for (origin, hlc) in &vector.0 {
            let current = tx.state.progress.get(&(peer, *origin)).copied();
            if current.is_none_or(|c| *hlc > c) {
                tx.set(progress_field, (peer, *origin), Some(*hlc));
            }
        }
        Ok(())
    }

    async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        let s = self.state.lock().await;
        let mut vv = VersionVector::new();
        for ((_, origin), hlc) in s
            .progress
            .range((peer, Ulid::nil())..=(peer, Ulid::from(u128::MAX)))
        {
            vv.observe(*origin, *hlc);
        }
        Ok(vv)
    }

    async fn forget_peers(&self, tx: &mut Self::Tx, keep: &[Ulid]) -> Result<u64> {
        let gone: Vec<(Ulid, Ulid)> = tx
            .state
            .progress
            .keys()
            .filter(|(peer, _)| !keep.contains(peer))
            .copied()
            .collect();
        let peers: std::collections::BTreeSet<Ulid> = gone.iter().map(|(p, _)| *p).collect();
        for key in gone {
            tx.set(progress_field, key, None);
        }
        Ok(peers.len() as u64)
    }

    async fn mark_synced(&self, tx: &mut Self::Tx, origin: Ulid, upto: Hlc) -> Result<u64> {
        let now = self.now();
        let ids: Vec<Ulid> = tx
            .state
            .by_origin
            .range((origin, Hlc::ZERO, Ulid::nil())..=(origin, upto, Ulid::from(u128::MAX)))
            .map(|(_, _, id)| *id)
            .collect();
        let mut marked = 0;
        for id in ids {
            if let Some(e) = tx.state.events.get(&id)
                && e.synced_at.is_none()
            {
                let mut e = e.clone();
                e.synced_at = Some(now.clone());
                tx.set(events_field, id, Some(e));
                marked += 1;
            }
        }
        Ok(marked)
    }

    async fn compact_events(
        &self,
        tx: &mut Self::Tx,
        after: Hlc,
        before: Hlc,
        tombstones: Option<Tombstones<'_>>,
        limit: u32,
    ) -> Result<Compacted> {
        // In HLC order, as the SQL backends' index on hlc_timestamp gives it.
        let mut candidates: Vec<(Hlc, Ulid)> = tx
            .state
            .events
            .values()
            .filter(|e| e.synced_at.is_some() && e.event.hlc > after && e.event.hlc < before)
            .map(|e| (e.event.hlc, e.event.event_id))
            .collect();
        candidates.sort();
        candidates.truncate(limit as usize);
        let mut done = Compacted {
            scanned: candidates.len() as u64,
            ..Compacted::default()
        };
        for (hlc, id) in candidates {
            done.last = Some(hlc);
            let Some(stored) = tx.state.events.get(&id) else {
                continue;
            };
            let e = &stored.event;
            let s = &tx.state;
            let newest = s.nodes.get(&e.node_id).is_none_or(|top| e.hlc >= *top);
            let current = s
                .versions
                .get(&(e.table_name.clone(), e.record_id))
                .is_some_and(|v| v.event_id == id || v.frontier.iter().any(|m| m.event_id == id));
            let waited_on = s.blocked.values().any(|b| b.event_id == id);
            let record = (e.table_name.clone(), e.record_id);
            let tombstone =
                !newest && !waited_on && tombstones.is_some_and(|t| Self::tombstone_goes(s, e, &t));
            if !tombstone && (newest || current || waited_on) {
                continue;
            }
            let origin = e.node_id;
            let decided: Vec<Ulid> = s
                .conflicts
                .values()
                .filter(|c| {
                    c.status == ConflictStatus::Resolved
                        && (c.table_name.as_str(), c.record_id) == (record.0.as_str(), record.1)
                        && (c.loser.event_id == id || c.winner.event_id == id)
                })
                .map(|c| c.conflict_id)
                .collect();
            for conflict in decided {
                tx.set(conflicts_field, conflict, None);
                done.conflicts += 1;
            }
            if tombstone {
                tx.set(versions_field, record, None);
                done.tombstones += 1;
            }
            tx.set(events_field, id, None);
            tx.remove_origin_entry((origin, hlc, id));
            if tx.state.compacted.get(&origin).is_none_or(|c| hlc > *c) {
                tx.set(compacted_field, origin, Some(hlc));
            }
            done.deleted += 1;
        }
        Ok(done)
    }

    async fn compacted_upto(&self, origin: Ulid) -> Result<Hlc> {
        let s = self.state.lock().await;
        Ok(s.compacted.get(&origin).copied().unwrap_or(Hlc::ZERO))
    }

    async fn log_extent(&self) -> Result<(u64, Option<i64>)> {
        let s = self.state.lock().await;
        let oldest = s.events.values().map(|e| e.event.hlc).min();
        Ok((s.events.len() as u64, oldest.map(Hlc::wall_ms)))
    }

    async fn count_unsynced(&self) -> Result<u64> {
        let s = self.state.lock().await;
        Ok(s.events.values().filter(|e| e.synced_at.is_none()).count() as u64)
    }

    async fn check_capture(&self, _tables: &[std::sync::Arc<TableInfo>]) -> Result<Vec<String>> {
        // Every write goes through the store: nothing to bypass.
        Ok(Vec::new())
    }

    async fn application_triggers(
        &self,
        _tables: &[std::sync::Arc<TableInfo>],
    ) -> Result<Vec<(String, String)>> {
        // Tables are declared in code: there are no triggers.
        Ok(Vec::new())
    }

    async fn strip_identity(&self, donor: Ulid) -> Result<()> {
        let mut s = self.state.lock().await;
        s.progress.clear();
        for e in s.events.values_mut() {
            e.synced_at = None;
        }
        s.meta.insert("snapshot_of".into(), donor.to_string());
        s.meta.remove("node_id");
        Ok(())
    }

    async fn check_lock(&self) -> Result<()> {
        Ok(())
    }

    async fn close(&self) {}

    async fn row_ids(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        from: Option<Ulid>,
        to: Option<Ulid>,
        limit: u32,
    ) -> Result<Vec<Ulid>> {
        Self::registered(&tx.state, table)?;
        let lower = from.map_or(Bound::Unbounded, |f| Bound::Included(f.to_string()));
        let upper = to.map_or(Bound::Unbounded, |t| Bound::Excluded(t.to_string()));
        tx.state.tables[&table.table_name]
            .rows
            .range::<String, _>((lower, upper))
            .take(limit as usize)
            .map(|(pk, _)| {
                Ulid::from_string(pk)
                    .map_err(|e| StoreError::corrupt(&table.table_name, e.to_string()))
            })
            .collect()
    }
}

/// Entries of `origin` with HLC above `after`, in `(hlc, event_id)` order.
fn origin_range(s: &State, origin: Ulid, after: Hlc) -> impl Iterator<Item = &(Ulid, Hlc, Ulid)> {
    s.by_origin
        .range((
            Bound::Excluded((origin, after, Ulid::from(u128::MAX))),
            Bound::Unbounded,
        ))
        .take_while(move |(o, _, _)| *o == origin)
}
