//! The primitives each backend provides. The algorithms built on them (drain,
//! stamped writes, remote apply) live once in [`crate::engine`], so SQLite and
//! PostgreSQL behave the same by construction.
//!
//! Every `&mut Self::Tx` method runs inside one daemon write transaction, begun by
//! [`Backend::begin`]: the backend guarantees that inside it no capture trigger
//! fires for the daemon's own writes, that every direct write committed before it
//! began is visible to [`Backend::take_captures`], and that no direct write to a
//! replicated table commits while it is open (SQLite: the single write lock;
//! PostgreSQL: the capture-queue lock, see the migration).

use std::collections::{HashMap, HashSet};
use std::future::Future;

use tidemark_hlc::Hlc;
use ulid::Ulid;

use crate::error::Result;
use crate::ident::Ident;
use crate::model::{
    Blocked, Capture, ChangeEvent, Conflict, ConflictFilter, ConflictPolicy, EventExtras,
    ForeignKey, LoggedEvent, Quarantined, Rejected, Sequences, SetAside, TableInfo, Values,
    Version, VersionVector,
};
use crate::value::ColumnType;

/// What to do with the per-event savepoint of a careful apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavepointOp {
    Set,
    RollbackTo,
    Release,
}

impl SavepointOp {
    pub fn sql(self) -> &'static str {
        match self {
            SavepointOp::Set => "SAVEPOINT tidemark_event",
            SavepointOp::RollbackTo => "ROLLBACK TO SAVEPOINT tidemark_event",
            SavepointOp::Release => "RELEASE SAVEPOINT tidemark_event",
        }
    }
}

/// Whether event `e` of a compaction scan is a tombstone that goes (see
/// [`Backend::compact_events`]), as an SQL expression both SQL backends use:
/// `before` is the placeholder of the HLC it must be older than (0 when
/// tombstones stay), `acked` an expression for what every peer acknowledged
/// of `e`'s origin, `frontier_len` one for the length of `v.frontier` (0 in
/// the stored short form of a single version, see
/// [`crate::model::Version::stored_frontier_text`]).
pub(crate) fn tombstone_goes_sql(before: &str, acked: &str, frontier_len: &str) -> String {
    format!(
        "(e.operation = 'DELETE' AND e.hlc_timestamp < {before} \
         AND e.hlc_timestamp < (SELECT n.max_hlc FROM tidemark_nodes n WHERE n.node_id = e.node_id) \
         AND EXISTS (SELECT 1 FROM tidemark_record_versions v \
           WHERE v.table_name = e.table_name AND v.record_id = e.record_id AND v.event_id = e.event_id \
           AND v.deleted AND {frontier_len} <= 1) \
         AND NOT EXISTS (SELECT 1 FROM change_events o \
           WHERE o.table_name = e.table_name AND o.record_id = e.record_id AND o.event_id <> e.event_id) \
         AND NOT EXISTS (SELECT 1 FROM tidemark_conflicts c WHERE c.status = 'open' \
           AND ((c.table_name = e.table_name AND c.record_id = e.record_id) \
             OR (c.winner_table = e.table_name AND c.winner_record_id = e.record_id))) \
         AND NOT EXISTS (SELECT 1 FROM tidemark_blocked b WHERE b.event_id = e.event_id \
           OR (b.table_name = e.table_name AND b.record_id = e.record_id) \
           OR (b.blocker_table = e.table_name AND b.blocker_id = e.record_id)) \
         AND e.hlc_timestamp <= {acked})"
    )
}

/// One row to write with [`Backend::upsert_rows`].
/// What one step of log compaction did (see [`Backend::compact_events`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Events looked at.
    pub scanned: u64,
    /// Events deleted.
    pub deleted: u64,
    /// Decided conflicts deleted with one of their events: history that no
    /// longer has an event in the log (a node joining now would not hold it).
    pub conflicts: u64,
    /// Tombstones collected: deleted records of which nothing stays.
    pub tombstones: u64,
    /// Quarantined events older than the minimum age deleted (at the start
    /// of a pass over the log).
    pub quarantined: u64,
    /// HLC of the last event looked at.
    pub last: Option<Hlc>,
}

/// Which tombstones a compaction step may collect (see
/// [`Backend::compact_events`]).
#[derive(Debug, Clone, Copy)]
pub struct Tombstones<'a> {
    /// Deletes stamped before this.
    pub before: Hlc,
    /// Per origin, what every configured peer (released ones included)
    /// acknowledged: a delete above it stays.
    pub acked: &'a VersionVector,
}

/// The first event of an origin after some HLC (see
/// [`Backend::first_of_origin_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstEvent {
    /// Its wall time, ms since the Unix epoch.
    pub wall_ms: i64,
    /// Its number in the origin's sequence; `None` for an event stamped before
    /// positions.
    pub seq: Option<u64>,
}

/// What a daemon write transaction may touch (see [`Backend::begin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxScope {
    /// Replicated tables and the capture queue: drains, applies, local writes,
    /// registration.
    Rows,
    /// Only Tidemark's own tables besides them: acks, `synced_at`, the log's
    /// bookkeeping. Direct writes to replicated tables may run alongside.
    Log,
}

/// A row to write: its values are borrowed from whoever holds them (an event
/// being applied, a record's winning version), never copied for the write.
#[derive(Debug, Clone, Copy)]
pub struct RowWrite<'a> {
    pub id: Ulid,
    pub values: &'a Values,
    pub hlc: Hlc,
    pub node_id: Ulid,
}

/// What a backend found when inspecting a table before registering it.
#[derive(Debug, Clone)]
pub struct TableShape {
    pub name: Ident,
    /// `(column, declared type)` in table order.
    pub columns: Vec<(String, String)>,
    /// Primary key columns.
    pub primary_key: Vec<String>,
    /// UNIQUE constraints and unique indexes over plain columns, other than the
    /// primary key (partial and expression indexes are not listed: the database
    /// alone enforces them).
    pub uniques: Vec<Vec<String>>,
    /// FOREIGN KEYs (`parent_columns` empty when the declaration names none).
    pub foreign_keys: Vec<ForeignKey>,
}

pub trait Backend: Send + Sync + 'static {
    type Tx: Send;

    /// `"sqlite"`, `"postgres"` or `"memory"`.
    fn kind(&self) -> &'static str;

    // ---- schema -------------------------------------------------------------

    /// Applies every pending migration.
    fn migrate(&self) -> impl Future<Output = Result<()>> + Send;
    /// Reverts every migration (capture triggers on user tables removed first).
    fn migrate_down(&self) -> impl Future<Output = Result<()>> + Send;
    /// Applied migration versions, ascending.
    fn applied_migrations(&self) -> impl Future<Output = Result<Vec<i64>>> + Send;

    fn meta_get(&self, key: &str) -> impl Future<Output = Result<Option<String>>> + Send;
    fn meta_set(&self, key: &str, value: &str) -> impl Future<Output = Result<()>> + Send;

    /// The class of a column of this backend from its declared type (the reason
    /// when the type is not replicated).
    fn column_type(&self, declared: &str) -> std::result::Result<ColumnType, String>;

    /// Columns and primary key of a table, `None` when no such table exists.
    fn inspect_table(
        &self,
        name: &Ident,
    ) -> impl Future<Output = Result<Option<TableShape>>> + Send;

    /// Registers (or re-registers) a table in one transaction: adds `node_id` and
    /// `hlc_modified` when missing, checks existing keys are ULIDs, (re)installs the
    /// capture triggers, writes the registry row. On first registration, every
    /// existing row is queued as a captured INSERT so it replicates.
    fn register(
        &self,
        info: &TableInfo,
        first_time: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    fn set_policy(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        policy: ConflictPolicy,
    ) -> impl Future<Output = Result<()>> + Send;

    fn load_tables(&self) -> impl Future<Output = Result<Vec<TableInfo>>> + Send;

    // ---- the daemon's write transaction ----------------------------------------

    /// Begins the daemon's write transaction. A [`TxScope::Rows`] transaction
    /// may drain captures and write replicated tables, so it excludes direct
    /// writes for its length; a [`TxScope::Log`] one touches only Tidemark's
    /// own bookkeeping and lets applications write meanwhile.
    fn begin(&self, scope: TxScope) -> impl Future<Output = Result<Self::Tx>> + Send;
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;
    fn rollback(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// Oldest captured direct writes, in commit order (by `seq`).
    fn take_captures(
        &self,
        tx: &mut Self::Tx,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Capture>>> + Send;
    fn delete_captures(
        &self,
        tx: &mut Self::Tx,
        seqs: &[i64],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Records captures that cannot be replicated (`tidemark_unreplicated`); the
    /// caller deletes them from the queue.
    fn set_aside(
        &self,
        tx: &mut Self::Tx,
        rows: &[SetAside],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Captures set aside, oldest first, at most `limit`.
    fn list_set_aside(&self, limit: u32) -> impl Future<Output = Result<Vec<SetAside>>> + Send;
    fn count_set_aside(&self) -> impl Future<Output = Result<u64>> + Send;
    /// Removes these set-aside entries (every one with `None`); returns how many
    /// went. The rows they describe are not touched.
    fn discard_set_aside(&self, seqs: Option<&[i64]>) -> impl Future<Output = Result<u64>> + Send;

    fn versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        ids: &[Ulid],
    ) -> impl Future<Output = Result<HashMap<Ulid, Version>>> + Send;
    fn put_version(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
        version: &Version,
    ) -> impl Future<Output = Result<()>> + Send {
        async move { self.put_versions(tx, table, &[(id, version.clone())]).await }
    }

    /// Current replicated values of existing rows, in their canonical form (see
    /// [`crate::value`]).
    fn rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        ids: &[Ulid],
    ) -> impl Future<Output = Result<HashMap<Ulid, Values>>> + Send;
    /// Inserts or updates a row with the given columns (a subset of the table's,
    /// primary key included) and stamps it with `hlc`/`node_id`.
    fn upsert_row(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        id: Ulid,
        values: &Values,
        hlc: Hlc,
        node_id: Ulid,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let row = RowWrite {
                id,
                values,
                hlc,
                node_id,
            };
            self.upsert_rows(tx, table, std::slice::from_ref(&row))
                .await
        }
    }
    fn delete_row(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        id: Ulid,
    ) -> impl Future<Output = Result<()>> + Send {
        async move { self.delete_rows(tx, table, &[id]).await }
    }
    /// Writes many versions of one table's records (each id once), one statement.
    fn put_versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        versions: &[(Ulid, Version)],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Inserts or updates many rows of one table, in order, all with the same
    /// columns (an id may repeat: the later row wins, as if written in turn);
    /// values are canonical and written exactly (see [`crate::value`]).
    fn upsert_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        rows: &[RowWrite<'_>],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Deletes many rows of one table.
    fn delete_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        ids: &[Ulid],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Sets only `hlc_modified`/`node_id` of many rows of one table (after captured
    /// direct writes; each id once).
    fn stamp_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        stamps: &[(Ulid, Hlc, Ulid)],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Rows of `table` whose columns at `columns` (indexes into
    /// `table.columns`) equal `values` (canonical), other than `except`.
    fn matching_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        columns: &[usize],
        values: &[serde_json::Value],
        except: Option<Ulid>,
    ) -> impl Future<Output = Result<Vec<Ulid>>> + Send;

    // ---- records whose rows cannot be placed here -------------------------------

    /// Records (or replaces) a blocked record.
    fn put_blocked(
        &self,
        tx: &mut Self::Tx,
        b: &Blocked,
    ) -> impl Future<Output = Result<()>> + Send;
    fn remove_blocked(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> impl Future<Output = Result<()>> + Send;
    fn blocked(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<Blocked>>> + Send;
    /// Records blocked by any of these records, or by the table of one of them
    /// with no record named.
    fn blocked_by_any(
        &self,
        tx: &mut Self::Tx,
        blockers: &[(String, Ulid)],
    ) -> impl Future<Output = Result<Vec<Blocked>>> + Send;
    /// Whether any record is blocked (cheap).
    fn has_blocked(&self, tx: &mut Self::Tx) -> impl Future<Output = Result<bool>> + Send;
    /// Blocked records in key order, after `after`, at most `limit`.
    fn list_blocked(
        &self,
        after: Option<(String, Ulid)>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Blocked>>> + Send;
    fn count_blocked(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Which of these event ids are already in `change_events`.
    fn existing_events(
        &self,
        tx: &mut Self::Tx,
        ids: &[Ulid],
    ) -> impl Future<Output = Result<HashSet<Ulid>>> + Send;
    /// Keeps new events (an id already present is skipped). Those `extras`
    /// name synced are stored with `synced_at` already set (every peer
    /// `synced_at` waits for is known to hold them); text `extras` holds is
    /// bound as it is, not rendered again.
    fn insert_events(
        &self,
        tx: &mut Self::Tx,
        events: &[&ChangeEvent],
        extras: &EventExtras,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Raises each origin's applied-vector entry to at least the given HLC.
    fn raise_vector(
        &self,
        tx: &mut Self::Tx,
        vector: &VersionVector,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Raises each origin's `max_seq` (the number of its last event held) to
    /// at least the given number.
    fn raise_sequences(
        &self,
        tx: &mut Self::Tx,
        seqs: &Sequences,
    ) -> impl Future<Output = Result<()>> + Send;

    /// `new_values` of these events (`None` for a delete).
    fn event_values(
        &self,
        tx: &mut Self::Tx,
        ids: &[Ulid],
    ) -> impl Future<Output = Result<HashMap<Ulid, Option<Values>>>> + Send;

    /// Sets these events aside in the quarantine (an event id already there is
    /// kept as it is).
    fn quarantine(
        &self,
        tx: &mut Self::Tx,
        peer: Option<Ulid>,
        rows: &[Rejected],
    ) -> impl Future<Output = Result<()>> + Send;
    /// `SAVEPOINT`, `ROLLBACK TO SAVEPOINT`, `RELEASE SAVEPOINT` with this name.
    fn savepoint(
        &self,
        tx: &mut Self::Tx,
        op: SavepointOp,
    ) -> impl Future<Output = Result<()>> + Send;
    fn count_quarantined(&self) -> impl Future<Output = Result<u64>> + Send;
    /// The oldest `limit` quarantined events.
    fn list_quarantined(&self, limit: u32)
    -> impl Future<Output = Result<Vec<Quarantined>>> + Send;
    /// Deletes these quarantined events (by event id as received), or all of
    /// them; how many went.
    fn discard_quarantined(
        &self,
        event_ids: Option<&[String]>,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Deletes quarantined events received before `before_ms` (wall time, ms
    /// since the epoch); how many went.
    fn expire_quarantined(&self, before_ms: i64) -> impl Future<Output = Result<u64>> + Send;

    // ---- conflicts ------------------------------------------------------------------

    /// Writes these conflicts whole (inserting or replacing by id).
    fn put_conflicts(
        &self,
        tx: &mut Self::Tx,
        conflicts: &[Conflict],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Removes the constraint conflict (kind other than `version`) with this id,
    /// a clash that no longer holds.
    fn delete_clash(&self, tx: &mut Self::Tx, id: Ulid) -> impl Future<Output = Result<()>> + Send;
    /// Removes the version conflict with this id: its sides turned out to
    /// hold the same row.
    fn delete_version_conflict(
        &self,
        tx: &mut Self::Tx,
        id: Ulid,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Every conflict of one record, inside `tx`.
    fn record_conflicts(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> impl Future<Output = Result<Vec<Conflict>>> + Send;
    /// Every conflict of a table, inside `tx` (its policy changes).
    fn table_conflicts(
        &self,
        tx: &mut Self::Tx,
        table: &str,
    ) -> impl Future<Output = Result<Vec<Conflict>>> + Send;
    fn conflict(&self, id: Ulid) -> impl Future<Output = Result<Option<Conflict>>> + Send;
    /// [`Backend::conflict`] inside a daemon transaction (seeing its writes).
    fn conflict_in(
        &self,
        tx: &mut Self::Tx,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<Conflict>>> + Send;
    fn list_conflicts(
        &self,
        filter: &ConflictFilter,
    ) -> impl Future<Output = Result<Vec<Conflict>>> + Send;
    /// Open conflicts per table (tables without any are absent).
    fn open_conflict_counts(&self) -> impl Future<Output = Result<Vec<(String, u64)>>> + Send;

    // ---- reads and progress -------------------------------------------------------

    fn get_row(
        &self,
        table: &TableInfo,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<Values>>> + Send;
    fn get_version(
        &self,
        table: &str,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<Version>>> + Send;
    /// The applied vector: per origin, the highest HLC present.
    fn vector(&self) -> impl Future<Output = Result<VersionVector>> + Send;
    /// Per origin, the number of the last event held (`max_seq`; origins with
    /// none numbered are left out).
    fn sequences(&self) -> impl Future<Output = Result<Sequences>> + Send;
    /// Highest HLC in `change_events` (zero when empty).
    fn max_hlc(&self) -> impl Future<Output = Result<Hlc>> + Send;
    /// Events of `origin` with HLC above `after`, ascending, at most `limit`,
    /// their values and metadata as the stored text.
    fn events_of_origin_after(
        &self,
        origin: Ulid,
        after: Hlc,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<LoggedEvent>>> + Send;
    /// The first event of `origin` above `after` (one index read, however many
    /// follow).
    fn first_of_origin_after(
        &self,
        origin: Ulid,
        after: Hlc,
    ) -> impl Future<Output = Result<Option<FirstEvent>>> + Send;
    /// Number of events of `origin` above `after`, counted in the log: a scan
    /// of them, for when their numbers cannot tell.
    fn count_of_origin_after(
        &self,
        origin: Ulid,
        after: Hlc,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Events of one record, in the total order.
    fn record_events(
        &self,
        table: &str,
        id: Ulid,
    ) -> impl Future<Output = Result<Vec<ChangeEvent>>> + Send;
    /// [`Backend::record_events`] inside `tx` (seeing its writes).
    fn record_events_in(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> impl Future<Output = Result<Vec<ChangeEvent>>> + Send;
    /// Number of captured direct writes not yet drained.
    fn pending_captures(&self) -> impl Future<Output = Result<u64>> + Send;
    /// Whether any captured direct write waits to be drained (cheap).
    fn has_captures(&self) -> impl Future<Output = Result<bool>> + Send;

    /// Records that `peer` has durably applied everything up to `vector`
    /// (never lowering what is recorded).
    fn record_ack(
        &self,
        tx: &mut Self::Tx,
        peer: Ulid,
        vector: &VersionVector,
    ) -> impl Future<Output = Result<()>> + Send;
    /// What `peer`'s recorded acks add up to.
    fn peer_progress(&self, peer: Ulid) -> impl Future<Output = Result<VersionVector>> + Send;
    /// Deletes the recorded acks of every peer not in `keep` (nodes removed
    /// from the cluster); returns how many peers were forgotten.
    fn forget_peers(
        &self,
        tx: &mut Self::Tx,
        keep: &[Ulid],
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Sets `synced_at` on events of `origin` up to `upto` that have none yet.
    fn mark_synced(
        &self,
        tx: &mut Self::Tx,
        origin: Ulid,
        upto: Hlc,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Events with `synced_at` still NULL.
    fn count_unsynced(&self) -> impl Future<Output = Result<u64>> + Send;

    /// One step of log compaction (retention). Looks at up to `limit` events
    /// every peer acknowledged (`synced_at` set) with HLC in `(after, before)`,
    /// in HLC order, and deletes the superseded ones: an event stays while it
    /// is its record's current version or one of its concurrent versions, while
    /// a blocked record waits on it, and while it is its origin's newest. Raises
    /// each origin's `compacted_hlc` to the highest HLC it deleted.
    ///
    /// With `tombstones`, a delete that is its record's only version left (no
    /// other event of the record in the log, nothing concurrent, no open
    /// conflict naming the record, no block on it or waiting for it), stamped
    /// before `tombstones.before`, not its origin's newest, and within
    /// `tombstones.acked` (every configured peer's acks, not `synced_at`,
    /// which does not wait for released peers) goes too, with the record's
    /// version: nothing of the record stays.
    fn compact_events(
        &self,
        tx: &mut Self::Tx,
        after: Hlc,
        before: Hlc,
        tombstones: Option<Tombstones<'_>>,
        limit: u32,
    ) -> impl Future<Output = Result<Compacted>> + Send;
    /// The highest HLC of `origin` compaction deleted (zero when none).
    fn compacted_upto(&self, origin: Ulid) -> impl Future<Output = Result<Hlc>> + Send;
    /// Rows in `change_events`, and the wall time (ms) of the oldest.
    fn log_extent(&self) -> impl Future<Output = Result<(u64, Option<i64>)>> + Send;

    /// What is wrong with the capture triggers of `tables` (missing, or
    /// disabled so writes would go uncaptured), one message each; empty when
    /// all is well.
    fn check_capture(
        &self,
        tables: &[std::sync::Arc<TableInfo>],
    ) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Triggers on `tables` that are not Tidemark's, as (table, trigger): they
    /// fire on the daemon's replicated writes too, so whatever they set is set
    /// by each node for itself.
    fn application_triggers(
        &self,
        tables: &[std::sync::Arc<TableInfo>],
    ) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;

    /// Checks that this daemon still holds the database's writer lock (taken
    /// when the backend connected), taking it again if its connection broke.
    fn check_lock(&self) -> impl Future<Output = Result<()>> + Send;

    /// Makes the database a snapshot of node `donor` in one transaction (see
    /// [`crate::snapshot`]): [`STRIP_IDENTITY`] on the SQL backends.
    fn strip_identity(&self, donor: Ulid) -> impl Future<Output = Result<()>> + Send;

    /// Closes the connections and releases the writer lock.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Ids of `table`'s rows in `[from, to)` (`None`: from the first, to the
    /// last), ascending, at most `limit`. Keys are canonical ULID text, whose
    /// text order is id order.
    fn row_ids(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        from: Option<Ulid>,
        to: Option<Ulid>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Ulid>>> + Send;
}

/// What makes a copy of a node's database a snapshot any new node may start
/// from, the same text on both SQL backends (`$1`: the donor's node id):
/// peers' acks of the donor's log go (the new node's peers acknowledge it
/// anew, so `synced_at` is cleared too), direct writes the donor had not
/// stamped go (the donor stamps them; they arrive as its events), the donor
/// is recorded as `snapshot_of` and its node id goes, last.
pub const STRIP_IDENTITY: [&str; 5] = [
    "DELETE FROM tidemark_peer_progress",
    "DELETE FROM tidemark_capture_queue",
    "UPDATE change_events SET synced_at = NULL WHERE synced_at IS NOT NULL",
    "INSERT INTO tidemark_meta (key, value) VALUES ('snapshot_of', $1) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    "DELETE FROM tidemark_meta WHERE key = 'node_id'",
];
