//! Tidemark's persistence: the schema and its migrations per backend, capture of
//! direct writes, the `change_events` log, stamped writes, idempotent apply of
//! remote events, and per-peer progress.
//!
//! Main types:
//! * [`Store`], the one handle the daemon uses, over SQLite ([`sqlite`]) or
//!   PostgreSQL ([`postgres`]), chosen by URL at start, or over the in-memory
//!   backend ([`memory`]), which has the same semantics without SQL and lets the
//!   replicator run under deterministic network simulation (`tests/tests/simulation.rs`);
//! * [`Engine`], the algorithms, written once over the [`Backend`] primitives each
//!   backend implements;
//! * [`rules`], the pure replication rules (winner by `(hlc, node_id, event_id)`,
//!   version-vector causality) shared by every backend;
//! * [`model`], plain data: [`ChangeEvent`], [`Version`], [`VersionVector`]...
//!
//! Invariants the store keeps:
//! * every committed direct write to a registered table is stamped into
//!   `change_events` exactly once, in commit order, with strictly increasing HLCs;
//! * the daemon's own writes are never captured;
//! * per origin, `change_events` holds a prefix of that origin's events in HLC order,
//!   and `tidemark_nodes.max_hlc` is its last HLC (the node's applied vector);
//! * applying an event already present changes nothing.
//!
//! This crate has no networking and no gRPC types.

pub mod backend;
pub mod engine;
pub mod error;
pub mod ident;
pub mod memory;
pub mod model;
pub mod postgres;
mod rows;
pub mod rules;
pub mod snapshot;
pub mod sqlite;
pub mod value;

use std::sync::Arc;

use tidemark_hlc::{Clock, Hlc};
use ulid::Ulid;

pub use backend::{Backend, FirstEvent, RowWrite, TxScope};
pub use engine::{
    CheckedEvent, DEFAULT_MAX_EVENT_BYTES, Engine, IdSource, RawValues, Retain, STAMP_COLUMNS,
};
pub use error::{DbError, Result, StoreError};
pub use memory::MemoryBackend;
pub use model::{
    ApplyOutcome, BlockKind, Blocked, ChangeEvent, Conflict, ConflictFilter, ConflictKind,
    ConflictPolicy, ConflictSide, ConflictStatus, DrainOutcome, EventExtras, EventText, ForeignKey,
    Held, LoggedEvent, Member, Operation, Position, Quarantined, RejectKind, Rejected,
    ResolveChoice, Sequences, SetAside, TableInfo, Values, Version, VersionVector, values_text,
};
pub use postgres::{PostgresBackend, PostgresOptions};
pub use sqlite::{SqliteBackend, SqliteOptions};
pub use value::ColumnType;

/// Where the store lives, parsed from a URL: `sqlite://PATH` or
/// `postgres://USER:PASSWORD@HOST:PORT/DB`.
#[derive(Debug, Clone)]
pub enum StoreUrl {
    Sqlite(SqliteOptions),
    Postgres(PostgresOptions),
}

/// What an operator reads: the backend, where, and its main settings; a
/// PostgreSQL password is never shown.
impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(o) => write!(
                f,
                "SQLite {} (synchronous {}, busy timeout {} ms)",
                o.path.display(),
                if o.synchronous_full { "FULL" } else { "NORMAL" },
                o.busy_timeout.as_millis()
            ),
            StoreUrl::Postgres(o) => write!(
                f,
                "PostgreSQL {} (up to {} connections)",
                postgres::redact(&o.url),
                o.max_connections
            ),
        }
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(StoreUrl::Sqlite(url.parse()?))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(url.parse()?))
        } else {
            Err(StoreError::BadUrl {
                url: postgres::redact(url),
                reason: "expected sqlite://PATH or postgres://USER@HOST:PORT/DB".into(),
            })
        }
    }
}

/// Waits for direct writes to drain; see [`Store::capture_waiter`].
#[derive(Debug)]
pub struct CaptureWaiter {
    listener: Option<sqlx::postgres::PgListener>,
    poll: std::time::Duration,
}

impl CaptureWaiter {
    /// Returns when captures may be pending: on a notification, or after the poll
    /// interval. Never errors: a lost listener connection degrades to polling
    /// until sqlx reconnects it.
    pub async fn wait(&mut self) {
        match &mut self.listener {
            Some(l) => {
                if let Ok(Err(e)) = tokio::time::timeout(self.poll, l.recv()).await {
                    tracing::debug!(error = %e, "capture listener interrupted");
                    tokio::time::sleep(self.poll).await;
                }
            }
            None => tokio::time::sleep(self.poll).await,
        }
    }
}

/// The store handle: one backend, chosen at start.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(Arc<Engine<SqliteBackend>>),
    Postgres(Arc<Engine<PostgresBackend>>),
    Memory(Arc<Engine<MemoryBackend>>),
}

macro_rules! dispatch {
    ($self:ident, $e:ident => $body:expr) => {
        match $self {
            Store::Sqlite($e) => $body,
            Store::Postgres($e) => $body,
            Store::Memory($e) => $body,
        }
    };
}

impl Store {
    /// Connects, migrates, checks this database belongs to the clock's node, and
    /// seeds the clock from the highest persisted HLC.
    pub async fn open(url: &StoreUrl, clock: Arc<Clock>) -> Result<Store> {
        Ok(match url {
            StoreUrl::Sqlite(o) => Store::Sqlite(Arc::new(
                Engine::open(SqliteBackend::connect(o).await?, clock).await?,
            )),
            StoreUrl::Postgres(o) => Store::Postgres(Arc::new(
                Engine::open(PostgresBackend::connect(o).await?, clock).await?,
            )),
        })
    }

    /// Opens a store over an in-memory database (see [`memory`]); `ids`, when
    /// given, replaces [`Ulid::generate`] for new event ids (deterministic runs).
    pub async fn open_memory(
        backend: MemoryBackend,
        clock: Arc<Clock>,
        ids: Option<IdSource>,
    ) -> Result<Store> {
        let mut engine = Engine::open(backend, clock).await?;
        if let Some(ids) = ids {
            engine = engine.with_ids(ids);
        }
        Ok(Store::Memory(Arc::new(engine)))
    }

    /// `"sqlite"`, `"postgres"` or `"memory"`.
    pub fn kind(&self) -> &'static str {
        dispatch!(self, e => e.backend().kind())
    }

    pub fn node_id(&self) -> Ulid {
        dispatch!(self, e => e.node_id())
    }

    pub fn clock(&self) -> &Arc<Clock> {
        dispatch!(self, e => e.clock())
    }

    pub async fn bind_cluster(&self, cluster_id: &str) -> Result<()> {
        dispatch!(self, e => e.bind_cluster(cluster_id).await)
    }

    pub async fn register_table(&self, name: &str, policy: ConflictPolicy) -> Result<TableInfo> {
        dispatch!(self, e => e.register_table(name, policy).await)
    }

    /// Registers a table with type overrides for some of its SQLite columns (see
    /// [`Engine::register_table_with`]).
    pub async fn register_table_with(
        &self,
        name: &str,
        policy: ConflictPolicy,
        overrides: &std::collections::BTreeMap<String, ColumnType>,
    ) -> Result<TableInfo> {
        dispatch!(self, e => e.register_table_with(name, policy, overrides).await)
    }

    /// The largest event a write may produce (see [`Engine::set_max_event_bytes`]).
    pub fn set_max_event_bytes(&self, bytes: usize) {
        dispatch!(self, e => e.set_max_event_bytes(bytes))
    }

    /// Captured writes set aside because they cannot be replicated, oldest first.
    pub async fn list_set_aside(&self, limit: u32) -> Result<Vec<SetAside>> {
        dispatch!(self, e => e.backend().list_set_aside(limit).await)
    }

    /// Removes these set-aside entries (all with `None`) once an operator has
    /// dealt with them; returns how many went.
    pub async fn discard_set_aside(&self, seqs: Option<&[i64]>) -> Result<u64> {
        dispatch!(self, e => e.backend().discard_set_aside(seqs).await)
    }

    /// Tries every blocked record (of `table`, or all) again now, e.g. after
    /// an operator changed the constraint that refused it; returns how many
    /// were tried and how many are placed now.
    pub async fn retry_blocked(&self, table: Option<&str>) -> Result<(u64, u64)> {
        dispatch!(self, e => e.retry_blocked_now(table).await)
    }

    pub async fn count_set_aside(&self) -> Result<u64> {
        dispatch!(self, e => e.backend().count_set_aside().await)
    }

    /// Records whose winning event is kept but whose row is not placed here, in
    /// key order after `after`.
    pub async fn list_blocked(
        &self,
        after: Option<(String, Ulid)>,
        limit: u32,
    ) -> Result<Vec<Blocked>> {
        dispatch!(self, e => e.backend().list_blocked(after, limit).await)
    }

    pub async fn count_blocked(&self) -> Result<u64> {
        dispatch!(self, e => e.count_blocked().await)
    }

    /// Sets a table's conflict policy cluster-wide (the change replicates).
    pub async fn set_policy(&self, table: &str, policy: ConflictPolicy) -> Result<ChangeEvent> {
        dispatch!(self, e => e.set_policy(table, policy).await)
    }

    /// Resolves a conflict (see [`Engine::resolve_conflict`]); with
    /// `expected_winner`, only if its winner is still that event.
    pub async fn resolve_conflict(
        &self,
        conflict_id: Ulid,
        choice: ResolveChoice,
        resolved_by: &str,
        note: Option<&str>,
        expected_winner: Option<Ulid>,
    ) -> Result<ChangeEvent> {
        dispatch!(self, e => e.resolve_conflict(conflict_id, choice, resolved_by, note, expected_winner).await)
    }

    pub async fn conflict(&self, conflict_id: Ulid) -> Result<Option<Conflict>> {
        dispatch!(self, e => e.conflict(conflict_id).await)
    }

    pub async fn list_conflicts(&self, filter: &ConflictFilter) -> Result<Vec<Conflict>> {
        dispatch!(self, e => e.list_conflicts(filter).await)
    }

    pub async fn open_conflicts_by_table(&self) -> Result<Vec<(String, u64)>> {
        dispatch!(self, e => e.open_conflicts_by_table().await)
    }

    pub fn tables(&self) -> Vec<Arc<TableInfo>> {
        dispatch!(self, e => e.tables())
    }

    pub fn table(&self, name: &str) -> Result<Arc<TableInfo>> {
        dispatch!(self, e => e.table(name))
    }

    pub async fn drain(&self) -> Result<DrainOutcome> {
        dispatch!(self, e => e.drain().await)
    }

    /// Direct writes stamped into `change_events` and set aside since the store
    /// opened, whichever transaction drained them (the capture loop, an API
    /// write, an applied batch, ...), counted once committed.
    pub fn captured_totals(&self) -> (u64, u64) {
        dispatch!(self, e => e.captured_totals())
    }

    /// Writes a record with values in the log's form (see [`value`]).
    pub async fn put(&self, table: &str, id: Ulid, values: &Values) -> Result<ChangeEvent> {
        dispatch!(self, e => e.put(table, id, values).await)
    }

    /// Writes a record with values as an application wrote them (the write API).
    pub async fn put_raw(&self, table: &str, id: Ulid, values: RawValues) -> Result<ChangeEvent> {
        dispatch!(self, e => e.put_raw(table, id, values).await)
    }

    pub async fn delete(&self, table: &str, id: Ulid) -> Result<Option<ChangeEvent>> {
        dispatch!(self, e => e.delete(table, id).await)
    }

    pub async fn get(&self, table: &str, id: Ulid) -> Result<Option<Values>> {
        dispatch!(self, e => e.get(table, id).await)
    }

    pub async fn version(&self, table: &str, id: Ulid) -> Result<Option<Version>> {
        dispatch!(self, e => e.version(table, id).await)
    }

    pub async fn history(&self, table: &str, id: Ulid) -> Result<Vec<ChangeEvent>> {
        dispatch!(self, e => e.history(table, id).await)
    }

    pub async fn apply_remote(&self, events: &[ChangeEvent]) -> Result<ApplyOutcome> {
        dispatch!(self, e => e.apply_remote(events).await)
    }

    /// Checks a remote event against the registry ahead of its transaction
    /// (see [`Engine::check_event`]); no database is read.
    pub fn check_event(&self, event: ChangeEvent) -> CheckedEvent {
        dispatch!(self, e => e.check_event(event))
    }

    /// Applies a batch from `peer`, quarantining what cannot be applied (see
    /// [`Engine::apply_from`]).
    pub async fn apply_from(
        &self,
        peer: Option<Ulid>,
        events: Vec<CheckedEvent>,
        rejected: Vec<Rejected>,
        allowed: &(dyn Fn(Ulid) -> bool + Sync),
        waited: &[Ulid],
    ) -> Result<ApplyOutcome> {
        dispatch!(self, e => e.apply_from(peer, events, rejected, allowed, waited).await)
    }

    pub async fn count_quarantined(&self) -> Result<u64> {
        dispatch!(self, e => e.count_quarantined().await)
    }

    /// The oldest `limit` quarantined events (see [`Quarantined`]).
    pub async fn list_quarantined(&self, limit: u32) -> Result<Vec<Quarantined>> {
        dispatch!(self, e => e.backend().list_quarantined(limit).await)
    }

    /// Deletes these quarantined events (by event id as received), or all of
    /// them; how many went. They are the node's record of what peers sent
    /// wrong: nothing else reads them, and one that comes again is kept again.
    pub async fn discard_quarantined(&self, event_ids: Option<&[String]>) -> Result<u64> {
        dispatch!(self, e => e.backend().discard_quarantined(event_ids).await)
    }

    /// See [`Engine::advertised_vector`].
    pub async fn advertised_vector(&self) -> Result<VersionVector> {
        dispatch!(self, e => e.advertised_vector().await)
    }

    /// See [`Engine::peer_holds_own`].
    pub async fn peer_holds_own(&self, peer: Ulid, hlc: Hlc) -> Result<bool> {
        dispatch!(self, e => e.peer_holds_own(peer, hlc).await)
    }

    /// See [`Engine::own_heard_from`].
    pub fn own_heard_from(&self) -> std::collections::BTreeSet<Ulid> {
        dispatch!(self, e => e.own_heard_from())
    }

    /// See [`Engine::own_missing`].
    pub async fn own_missing(&self) -> Result<Option<Hlc>> {
        dispatch!(self, e => e.own_missing().await)
    }

    /// See [`Engine::hold_own_writes`].
    pub fn hold_own_writes(&self) {
        dispatch!(self, e => e.hold_own_writes())
    }

    pub fn release_own_writes(&self) {
        dispatch!(self, e => e.release_own_writes())
    }

    pub fn own_writes_held(&self) -> bool {
        dispatch!(self, e => e.own_writes_held())
    }

    pub async fn own_writes_released(&self) {
        dispatch!(self, e => e.own_writes_released().await)
    }

    pub async fn vector(&self) -> Result<VersionVector> {
        dispatch!(self, e => e.vector().await)
    }

    /// See [`Engine::positions`].
    pub fn positions(&self) -> std::collections::BTreeMap<Ulid, Position> {
        dispatch!(self, e => e.positions())
    }

    pub async fn events_after(&self, have: &VersionVector, limit: u32) -> Result<Vec<ChangeEvent>> {
        dispatch!(self, e => e.events_after(have, limit).await)
    }

    /// [`Store::events_after`] with values and metadata as the log stores
    /// them (see [`LoggedEvent`]).
    pub async fn log_after(&self, have: &VersionVector, limit: u32) -> Result<Vec<LoggedEvent>> {
        dispatch!(self, e => e.log_after(have, limit).await)
    }

    pub async fn record_ack(&self, peer: Ulid, vector: &VersionVector) -> Result<()> {
        dispatch!(self, e => e.record_ack(peer, vector).await)
    }

    /// Events this node holds that `peer` has not acknowledged, and the wall time
    /// (ms) of the oldest of them.
    pub async fn peer_lag(&self, peer: Ulid) -> Result<(u64, Option<i64>)> {
        dispatch!(self, e => e.peer_lag(peer).await)
    }

    pub async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        dispatch!(self, e => e.peer_progress(peer).await)
    }

    /// Forgets the progress of every peer not in `keep` (removed nodes).
    pub async fn forget_peers(&self, keep: &[Ulid]) -> Result<u64> {
        dispatch!(self, e => e.forget_peers(keep).await)
    }

    pub async fn mark_synced(&self, peers: &[Ulid]) -> Result<u64> {
        dispatch!(self, e => e.mark_synced(peers).await)
    }

    /// Marks every event this node holds synced (no peer is waited for).
    pub async fn mark_all_synced(&self) -> Result<u64> {
        dispatch!(self, e => e.mark_all_synced().await)
    }

    pub async fn count_unsynced(&self) -> Result<u64> {
        dispatch!(self, e => e.count_unsynced().await)
    }

    /// One step of log compaction (see [`engine::Engine::compact_step`]).
    pub async fn compact_step(&self, rules: &Retain, limit: u32) -> Result<backend::Compacted> {
        dispatch!(self, e => e.compact_step(rules, limit).await)
    }

    /// Rows in the log and the wall time (ms) of the oldest.
    pub async fn log_extent(&self) -> Result<(u64, Option<i64>)> {
        dispatch!(self, e => e.log_extent().await)
    }

    /// See [`Engine::compacted_vector`].
    pub async fn compacted_vector(&self) -> Result<VersionVector> {
        dispatch!(self, e => e.compacted_vector().await)
    }

    pub async fn pending_captures(&self) -> Result<u64> {
        dispatch!(self, e => e.pending_captures().await)
    }

    pub async fn has_captures(&self) -> Result<bool> {
        dispatch!(self, e => e.has_captures().await)
    }

    /// A receiver that changes after every commit that added events to the log.
    pub fn subscribe_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        dispatch!(self, e => e.subscribe_commits())
    }

    /// Changes whenever a recorded ack raised a peer's progress.
    pub fn subscribe_acks(&self) -> tokio::sync::watch::Receiver<u64> {
        dispatch!(self, e => e.subscribe_acks())
    }

    /// Something to wait on for new direct writes: PostgreSQL's LISTEN/NOTIFY (with
    /// `poll` as a fallback), or polling every `poll` on SQLite.
    pub async fn capture_waiter(&self, poll: std::time::Duration) -> Result<CaptureWaiter> {
        let listener = match self {
            Store::Sqlite(_) | Store::Memory(_) => None,
            Store::Postgres(e) => {
                let mut l = sqlx::postgres::PgListener::connect_with(e.backend().pool()).await?;
                l.listen(postgres::CAPTURE_CHANNEL).await?;
                Some(l)
            }
        };
        Ok(CaptureWaiter { listener, poll })
    }

    pub async fn applied_migrations(&self) -> Result<Vec<i64>> {
        dispatch!(self, e => e.backend().applied_migrations().await)
    }

    /// Reverts every migration: drops Tidemark's tables and capture triggers. User
    /// tables keep their rows and their `node_id`/`hlc_modified` columns.
    pub async fn migrate_down(&self) -> Result<()> {
        dispatch!(self, e => e.backend().migrate_down().await)
    }

    /// Applies pending migrations (again after [`Store::migrate_down`]).
    pub async fn migrate_up(&self) -> Result<()> {
        dispatch!(self, e => e.backend().migrate().await)
    }

    /// What is wrong with the registered tables' capture triggers (missing or
    /// disabled), one message each.
    pub async fn check_capture(&self) -> Result<Vec<String>> {
        let tables = self.tables();
        dispatch!(self, e => e.backend().check_capture(&tables).await)
    }

    /// Triggers on the registered tables that are not Tidemark's, as (table,
    /// trigger): they fire on replicated writes too (see
    /// [`Backend::application_triggers`]).
    pub async fn application_triggers(&self) -> Result<Vec<(String, String)>> {
        let tables = self.tables();
        dispatch!(self, e => e.backend().application_triggers(&tables).await)
    }

    /// Checks that this daemon still holds the database's writer lock (one
    /// daemon per database), taking it again if its session broke.
    pub async fn check_lock(&self) -> Result<()> {
        dispatch!(self, e => e.backend().check_lock().await)
    }

    pub async fn close(&self) {
        dispatch!(self, e => e.close().await)
    }

    /// Digests of `table`'s rows in `[from, to)` split into `parts` ranges (see
    /// [`engine::digest`]).
    pub async fn digest(
        &self,
        table: &str,
        from: Option<Ulid>,
        to: Option<Ulid>,
        parts: u32,
    ) -> Result<Vec<engine::digest::RangeDigest>> {
        dispatch!(self, e => e.digest(table, from, to, parts).await)
    }

    /// The hash of each of `table`'s rows in `[from, to)`, at most `limit` (see
    /// [`engine::digest`]).
    pub async fn record_hashes(
        &self,
        table: &str,
        from: Option<Ulid>,
        to: Option<Ulid>,
        limit: u32,
    ) -> Result<engine::digest::RecordHashes> {
        dispatch!(self, e => e.record_hashes(table, from, to, limit).await)
    }
}
