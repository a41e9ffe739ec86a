//! The store's algorithms, written once over [`Backend`] primitives, one file per
//! stage of the data flow: `registry` (tables, classes, policies), `capture`
//! (draining direct writes), `write` (API writes and resolutions), `apply`
//! (remote batches), `settle` (the version rules, conflicts and the bulk write
//! buffer every path shares) and `progress` (reading the log after a vector,
//! acks, `synced_at`, lag). This file holds the [`Engine`] itself and its reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use serde_json::{Value, json};
use tidemark_hlc::{Clock, Hlc};
use tokio::sync::{Mutex, watch};
use ulid::Ulid;

use crate::backend::{Backend, RowWrite, SavepointOp, TxScope};
use crate::error::{Result, StoreError};
use crate::ident::Ident;
use crate::model::{
    ApplyOutcome, BlockKind, Blocked, Capture, CapturedRow, ChangeEvent, Conflict, ConflictFilter,
    ConflictKind, ConflictPolicy, ConflictSide, ConflictStatus, DrainOutcome, EventExtras,
    EventText, Held, LoggedEvent, Operation, Position, RejectKind, Rejected, ResolveChoice,
    Sequences, SetAside, TableInfo, Values, Version, VersionVector, parse_ulid,
};
use crate::rules::{Causality, Resolution, resolve};
use crate::value::ColumnType;

mod apply;
mod capture;
pub mod digest;
mod place;
mod progress;
mod registry;
mod retain;
mod settle;
mod write;

pub use apply::CheckedEvent;
pub use registry::datatype_id;
pub use retain::Retain;

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
use registry::{parse_registry_values, registry_table};

/// Columns Tidemark adds to every replicated table (the seed's entity additions).
pub const STAMP_COLUMNS: [&str; 2] = ["node_id", "hlc_modified"];
/// The registry as a replicated pseudo-table: a policy change is an event on it.
pub const REGISTRY_TABLE: &str = "tidemark_datatypes";
/// Default largest event (its values as JSON) a write may produce.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 << 20;

/// Values as an application wrote them (the write API): each value's JSON text,
/// so numbers keep every digit (see [`ColumnType::from_api`]).
pub type RawValues = BTreeMap<String, Box<serde_json::value::RawValue>>;

/// Record versions read in one transaction, kept current as events settle; and,
/// for bulk work (a received batch, a drained chunk of captures), the writes held
/// back to be issued as one statement per table by [`Engine::flush`].
#[derive(Debug, Clone, Default)]
struct VersionCache {
    versions: HashMap<(String, Ulid), Option<Version>>,
    /// `None`: every write goes to the database at once.
    pending: Option<Pending>,
    /// Rows of constrained tables written or removed in this transaction: the
    /// records they blocked are retried before it commits.
    touched: std::collections::BTreeSet<(String, Ulid)>,
    /// Rows written without constraint checks (their records' blocks are over).
    cleared: std::collections::BTreeSet<(String, Ulid)>,
    /// Records blocked in this transaction (each once).
    blocked: std::collections::BTreeSet<(String, Ulid)>,
    /// Events to store with `synced_at` already set, and text rendered ahead
    /// (see [`Engine::apply_from`]).
    extras: Arc<EventExtras>,
}

impl VersionCache {
    fn new() -> Self {
        Self::default()
    }

    fn buffered() -> Self {
        VersionCache {
            pending: Some(Pending::default()),
            ..Self::default()
        }
    }

    fn get(&self, key: &(String, Ulid)) -> Option<&Option<Version>> {
        self.versions.get(key)
    }

    fn insert(&mut self, key: (String, Ulid), version: Option<Version>) {
        self.versions.insert(key, version);
    }
}

/// An API write waiting in the group-commit queue.
#[derive(Debug)]
struct QueuedWrite {
    table: Arc<TableInfo>,
    id: Ulid,
    values: Option<Values>,
    reply: tokio::sync::oneshot::Sender<Result<Option<ChangeEvent>>>,
}

/// Writes held back in a buffered [`VersionCache`]. The database sees them, in
/// order, before anything reads what they touch: [`Engine::flush`] runs before
/// conflict bookkeeping (which reads stored events), before a policy change, and
/// at the end of the batch.
#[derive(Debug, Clone, Default)]
struct Pending {
    /// The latest version of each record written.
    versions: BTreeMap<(String, Ulid), Version>,
    /// Shared with the batch being applied, not copies of its events.
    events: Vec<Arc<ChangeEvent>>,
    rows: Vec<RowOp>,
}

/// A row to write when its run of [`RowOp`]s is flushed (`Engine::write_rows`
/// lends its values to the backend as a [`RowWrite`]).
#[derive(Debug, Clone)]
struct PendingRow {
    id: Ulid,
    values: RowValues,
    hlc: Hlc,
    node_id: Ulid,
}

/// The values of a pending row.
#[derive(Debug, Clone)]
enum RowValues {
    Own(Values),
    /// Those of the event the row follows, shared with it; made only from an
    /// event that has new values ([`RowValues::of_event`]).
    Event(Arc<ChangeEvent>),
}

impl RowValues {
    fn of_event(event: &Arc<ChangeEvent>) -> Option<RowValues> {
        event
            .new_values
            .is_some()
            .then(|| RowValues::Event(event.clone()))
    }

    fn get(&self) -> &Values {
        // `NONE` is never lent: an `Event` is made only from an event that
        // has new values, and an event's values do not change once shared.
        static NONE: std::sync::LazyLock<Values> = std::sync::LazyLock::new(Values::new);
        match self {
            RowValues::Own(values) => values,
            RowValues::Event(event) => event.new_values.as_ref().unwrap_or(&NONE),
        }
    }
}

#[derive(Debug, Clone)]
enum RowOp {
    Upsert {
        table: Arc<TableInfo>,
        event_id: Ulid,
        row: PendingRow,
    },
    Delete {
        table: Arc<TableInfo>,
        event_id: Ulid,
        id: Ulid,
    },
    Stamp {
        table: Arc<TableInfo>,
        id: Ulid,
        hlc: Hlc,
        node_id: Ulid,
    },
}

impl RowOp {
    fn upsert(table: Arc<TableInfo>, event_id: Ulid, row: PendingRow) -> RowOp {
        RowOp::Upsert {
            table,
            event_id,
            row,
        }
    }

    fn table(&self) -> &Arc<TableInfo> {
        match self {
            RowOp::Upsert { table, .. }
            | RowOp::Delete { table, .. }
            | RowOp::Stamp { table, .. } => table,
        }
    }

    /// Whether `other` can go in the same statement as `self`.
    fn joins(&self, other: &RowOp) -> bool {
        if self.table().table_name != other.table().table_name {
            return false;
        }
        match (self, other) {
            (RowOp::Upsert { row: a, .. }, RowOp::Upsert { row: b, .. }) => {
                let (a, b) = (a.values.get(), b.values.get());
                // Maps keep their keys sorted: one pass in step, no lookups
                // (were the order ever not canonical, rows would only join
                // less).
                a.len() == b.len() && a.keys().eq(b.keys())
            }
            (RowOp::Delete { .. }, RowOp::Delete { .. }) => true,
            (RowOp::Stamp { .. }, RowOp::Stamp { .. }) => true,
            _ => false,
        }
    }
}

/// Where new event ids come from: [`Ulid::generate`] unless a deterministic
/// source is set with [`Engine::with_ids`] (network simulation).
pub type IdSource = Arc<dyn Fn() -> Ulid + Send + Sync>;

/// A store over one backend.
pub struct Engine<B: Backend> {
    backend: B,
    node_id: Ulid,
    clock: Arc<Clock>,
    ids: IdSource,
    tables: RwLock<HashMap<String, Arc<TableInfo>>>,
    /// Serialises the daemon's write transactions, so this node's events enter the
    /// log in HLC order per origin (the invariant version vectors rely on).
    writer: Arc<Mutex<()>>,
    /// API writes waiting for the writer lock, written as one group.
    queue: std::sync::Mutex<Vec<QueuedWrite>>,
    /// Bumped after every commit that added events, so senders wake at once.
    commits: watch::Sender<u64>,
    /// Largest event (its values as JSON) a write may produce.
    max_event_bytes: std::sync::atomic::AtomicUsize,
    /// This node's own origin against its peers' copies of it.
    own: OwnOrigin,
    /// Direct writes stamped or set aside, counted once their transaction commits.
    captured: CaptureTally,
    /// The applied vector as committed: loaded when the store opens, raised after
    /// every commit by what the transaction raised (only [`Engine::raise_vector`]
    /// writes the vector, and only in the daemon's write transactions).
    applied: std::sync::Mutex<VersionVector>,
    /// What the open write transaction raised the vector to.
    pending_raise: std::sync::Mutex<VersionVector>,
    /// Per origin, the number of the last event held (positions), as
    /// committed: loaded when the store opens, raised after every commit.
    sequences: std::sync::Mutex<Sequences>,
    /// What the open write transaction raised them to: the numbers of the
    /// events it inserted, this node's own new events among them (numbered
    /// by [`Engine::next_own_seq`]). A transaction that does not commit gives
    /// its numbers back: the next begin clears this.
    pending_sequences: std::sync::Mutex<Sequences>,
    /// Peers' acknowledged vectors as last heard, ahead of what is persisted:
    /// an ack is recorded in memory on the sender's path and written with the
    /// next `synced_at` pass (see [`Engine::mark_synced`]).
    acks: std::sync::Mutex<HashMap<Ulid, PeerAcks>>,
    /// Changes whenever a recorded ack raised a peer's progress.
    acked: watch::Sender<u64>,
    /// Where the next compaction step starts (see `retain`).
    compact_from: std::sync::Mutex<Hlc>,
    /// Blocked records counted (see [`Engine::count_blocked`]).
    blocked: BlockedTally,
}

/// The number of blocked records, counted again only after a commit that
/// blocked or unblocked one: every received batch's ack reports it.
#[derive(Debug, Default)]
struct BlockedTally {
    /// Whether the open write transaction blocked or unblocked a record.
    pending: std::sync::atomic::AtomicBool,
    /// Bumped by every commit that did.
    generation: std::sync::atomic::AtomicU64,
    /// The last count and the generation it was read at.
    counted: std::sync::Mutex<Option<(u64, u64)>>,
}

/// One peer's acknowledged vector in memory.
#[derive(Debug, Clone, Default)]
struct PeerAcks {
    vector: VersionVector,
    /// Whether `vector` is ahead of the persisted progress.
    dirty: bool,
}

/// Direct writes drained from the capture queue, by whichever transaction
/// drained them (the capture loop, an API write, an applied batch, ...).
/// `pending_*` belong to the open write transaction (there is one at a time,
/// under the writer lock); a commit moves them to the totals, the next begin
/// drops what a rolled-back transaction left.
#[derive(Debug, Default)]
struct CaptureTally {
    pending_stamped: std::sync::atomic::AtomicU64,
    pending_set_aside: std::sync::atomic::AtomicU64,
    stamped: std::sync::atomic::AtomicU64,
    set_aside: std::sync::atomic::AtomicU64,
}

impl CaptureTally {
    fn begin(&self) {
        self.pending_stamped
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.pending_set_aside
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn drained(&self, outcome: &DrainOutcome) {
        self.pending_stamped
            .fetch_add(outcome.events, std::sync::atomic::Ordering::Relaxed);
        self.pending_set_aside.fetch_add(
            outcome.set_aside.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn committed(&self) {
        let stamped = self
            .pending_stamped
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let set_aside = self
            .pending_set_aside
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        self.stamped
            .fetch_add(stamped, std::sync::atomic::Ordering::Relaxed);
        self.set_aside
            .fetch_add(set_aside, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a node knows of its own origin's log against the copies its peers
/// hold: a database restored from an older copy lacks events its peers have.
#[derive(Debug)]
struct OwnOrigin {
    /// The own-origin entry of the vector when the store opened.
    at_open: Hlc,
    /// The highest own-origin HLC a peer holds that the log lacked: until the
    /// log holds it, the vector this node advertises stops at `at_open`, so
    /// peers send everything after it.
    missing_upto: std::sync::Mutex<Option<Hlc>>,
    /// Whether API writes and capture draining may stamp new own events.
    writes: watch::Sender<bool>,
    /// Peers that told this node how far they hold its origin since it opened.
    heard_from: std::sync::Mutex<std::collections::BTreeSet<Ulid>>,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.kind())
            .field("node_id", &self.node_id.to_string())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// Migrates the schema, checks the database belongs to this node, and seeds the
    /// clock from the highest persisted HLC.
    /// A store that cannot open is closed before the error returns, so its
    /// writer lock is free at once for the next attempt.
    pub async fn open(backend: B, clock: Arc<Clock>) -> Result<Self> {
        let node_id = clock.node_id();
        let applied = match Self::identify(&backend, node_id).await {
            Ok(applied) => applied,
            Err(e) => {
                backend.close().await;
                return Err(e);
            }
        };
        let own_at_open = applied.get(node_id);
        let sequences = match backend.sequences().await {
            Ok(s) => s,
            Err(e) => {
                backend.close().await;
                return Err(e);
            }
        };
        let engine = Engine {
            backend,
            node_id,
            clock,
            ids: Arc::new(Ulid::generate),
            tables: RwLock::new(HashMap::new()),
            writer: Arc::new(Mutex::new(())),
            queue: std::sync::Mutex::new(Vec::new()),
            commits: watch::Sender::new(0),
            max_event_bytes: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_EVENT_BYTES),
            own: OwnOrigin {
                at_open: own_at_open,
                missing_upto: std::sync::Mutex::new(None),
                writes: watch::Sender::new(true),
                heard_from: Default::default(),
            },
            captured: CaptureTally::default(),
            applied: std::sync::Mutex::new(applied),
            pending_raise: Default::default(),
            sequences: std::sync::Mutex::new(sequences),
            pending_sequences: Default::default(),
            acks: Default::default(),
            acked: watch::Sender::new(0),
            compact_from: std::sync::Mutex::new(Hlc::ZERO),
            blocked: BlockedTally::default(),
        };
        let started: Result<()> = async {
            let persisted = engine.backend.max_hlc().await?;
            engine.clock.seed(persisted)?;
            engine.reload_tables().await
        }
        .await;
        if let Err(e) = started {
            engine.backend.close().await;
            return Err(e);
        }
        Ok(engine)
    }

    /// Migrates the schema and checks the database belongs to `node_id`;
    /// returns its applied vector.
    async fn identify(backend: &B, node_id: Ulid) -> Result<VersionVector> {
        backend.migrate().await?;
        match backend.meta_get("node_id").await? {
            Some(stored) if stored != node_id.to_string() => {
                return Err(StoreError::IdentityMismatch {
                    key: "node_id",
                    stored,
                    configured: node_id.to_string(),
                });
            }
            Some(_) => {}
            None => {
                if let Some(donor) = backend.meta_get("snapshot_of").await?
                    && donor == node_id.to_string()
                {
                    return Err(StoreError::SnapshotOfThisNode { donor });
                }
                backend.meta_set("node_id", &node_id.to_string()).await?
            }
        }
        backend.vector().await
    }

    /// Takes new event ids from `ids` instead of [`Ulid::generate`].
    pub fn with_ids(mut self, ids: IdSource) -> Self {
        self.ids = ids;
        self
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Sets the largest event (its values as JSON) a write may produce: a larger
    /// API write is refused, a larger captured write is set aside.
    pub fn set_max_event_bytes(&self, bytes: usize) {
        self.max_event_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn node_id(&self) -> Ulid {
        self.node_id
    }

    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// A receiver that changes after every commit that added events to the log.
    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// A receiver that changes whenever a recorded ack raised a peer's progress
    /// (what the `synced_at` marker waits for besides commits).
    pub fn subscribe_acks(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
    }

    fn committed(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Begins the daemon's write transaction (the caller holds the writer lock).
    async fn begin_tx(&self) -> Result<B::Tx> {
        self.begin_scoped(TxScope::Rows).await
    }

    /// Begins a write transaction that touches only Tidemark's bookkeeping
    /// (acks, `synced_at`): direct writes need not wait for it.
    async fn begin_log_tx(&self) -> Result<B::Tx> {
        self.begin_scoped(TxScope::Log).await
    }

    async fn begin_scoped(&self, scope: TxScope) -> Result<B::Tx> {
        self.captured.begin();
        self.blocked.pending.store(false, Relaxed);
        lock(&self.pending_raise).0.clear();
        lock(&self.pending_sequences).clear();
        self.backend.begin(scope).await
    }

    /// Commits the daemon's write transaction, with the positions its events
    /// raised.
    async fn commit_tx(&self, mut tx: B::Tx) -> Result<()> {
        let sequences = std::mem::take(&mut *lock(&self.pending_sequences));
        if !sequences.is_empty() {
            self.backend.raise_sequences(&mut tx, &sequences).await?;
        }
        self.backend.commit(tx).await?;
        self.captured.committed();
        if self.blocked.pending.swap(false, Relaxed) {
            self.blocked.generation.fetch_add(1, Relaxed);
        }
        // Positions first: a vector read in between (an ack) never shows an
        // HLC whose number the session's gap check could not see yet. The
        // vector is raised with the numbers still locked, so `positions`
        // (which locks them first) sees both raised or neither.
        let raised = std::mem::take(&mut *lock(&self.pending_raise));
        let mut committed = lock(&self.sequences);
        for (origin, seq) in sequences {
            let at = committed.entry(origin).or_default();
            *at = (*at).max(seq);
        }
        lock(&self.applied).merge(&raised);
        drop(committed);
        Ok(())
    }

    /// Records a blocked record in the open write transaction.
    async fn put_blocked(&self, tx: &mut B::Tx, blocked: &Blocked) -> Result<()> {
        self.blocked.pending.store(true, Relaxed);
        self.backend.put_blocked(tx, blocked).await
    }

    /// Removes a record's block in the open write transaction.
    async fn remove_blocked(&self, tx: &mut B::Tx, table: &str, id: Ulid) -> Result<()> {
        self.blocked.pending.store(true, Relaxed);
        self.backend.remove_blocked(tx, table, id).await
    }

    /// Records blocked by constraints, as committed; read from the database
    /// only when a commit since the last count blocked or unblocked one.
    pub async fn count_blocked(&self) -> Result<u64> {
        let generation = self.blocked.generation.load(Relaxed);
        if let Some((n, at)) = *lock(&self.blocked.counted)
            && at == generation
        {
            return Ok(n);
        }
        // Read after the generation: a commit in between bumps it again, so
        // a count it makes stale is never taken as current.
        let n = self.backend.count_blocked().await?;
        let mut counted = lock(&self.blocked.counted);
        if counted.is_none_or(|(_, at)| at <= generation) {
            *counted = Some((n, generation));
        }
        Ok(n)
    }

    /// Keeps events in `change_events` in the open write transaction, noting
    /// the numbers they carry (their origins' positions rise at commit).
    async fn insert_events(
        &self,
        tx: &mut B::Tx,
        events: &[&ChangeEvent],
        extras: &EventExtras,
    ) -> Result<()> {
        self.backend.insert_events(tx, events, extras).await?;
        let mut pending = lock(&self.pending_sequences);
        for e in events {
            if let Some(seq) = e.seq()? {
                let at = pending.entry(e.node_id).or_default();
                *at = (*at).max(seq);
            }
        }
        Ok(())
    }

    /// Per origin, the highest number of any event in the log, as the open
    /// write transaction sees it (committed, or inserted earlier in it). Every
    /// event enters the log through [`Engine::insert_events`], which raises
    /// these in the same transaction; they are loaded when the store opens
    /// (migration 0006 counted them from the log) and never rewind, compaction
    /// included. So an event numbered above its origin's entry, or of an
    /// origin with none, is not in the log. Events without a number (stamped
    /// before positions) are not covered.
    pub(super) fn held_numbers(&self) -> Sequences {
        let mut held = lock(&self.sequences).clone();
        for (origin, seq) in lock(&self.pending_sequences).iter() {
            let at = held.entry(*origin).or_default();
            *at = (*at).max(*seq);
        }
        held
    }

    /// The number of this node's next own event in the open write
    /// transaction: one past the last held, committed or earlier in it.
    pub(super) fn next_own_seq(&self) -> u64 {
        let committed = lock(&self.sequences).get(&self.node_id).copied();
        let mut pending = lock(&self.pending_sequences);
        let at = pending.entry(self.node_id).or_default();
        *at = (*at).max(committed.unwrap_or(0)) + 1;
        *at
    }

    /// Per origin this node holds events of, where it stands: the highest HLC
    /// held and the number of the last event held, as of one commit (a
    /// session's checks compare both: a number with an HLC from another
    /// commit could look like a gap or a second writer).
    pub fn positions(&self) -> BTreeMap<Ulid, Position> {
        let (vector, sequences) = {
            let sequences = lock(&self.sequences);
            (self.applied_vector(), sequences.clone())
        };
        let mut out: BTreeMap<Ulid, Position> = vector
            .0
            .into_iter()
            .map(|(origin, hlc)| (origin, Position { hlc, seq: 0 }))
            .collect();
        for (origin, seq) in sequences {
            out.entry(origin).or_default().seq = seq;
        }
        out
    }

    /// Raises the applied vector in the open write transaction; the in-memory
    /// copy follows when it commits.
    async fn raise_vector(&self, tx: &mut B::Tx, vector: &VersionVector) -> Result<()> {
        self.backend.raise_vector(tx, vector).await?;
        lock(&self.pending_raise).merge(vector);
        Ok(())
    }

    /// Direct writes stamped into `change_events` and set aside since the store
    /// opened, counted once committed, whichever transaction drained them.
    pub fn captured_totals(&self) -> (u64, u64) {
        (
            self.captured
                .stamped
                .load(std::sync::atomic::Ordering::Relaxed),
            self.captured
                .set_aside
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Checks the cluster id stored in the database against `cluster_id`, storing it
    /// on first use.
    pub async fn bind_cluster(&self, cluster_id: &str) -> Result<()> {
        match self.backend.meta_get("cluster_id").await? {
            Some(stored) if stored != cluster_id => Err(StoreError::IdentityMismatch {
                key: "cluster_id",
                stored,
                configured: cluster_id.to_owned(),
            }),
            Some(_) => Ok(()),
            None => self.backend.meta_set("cluster_id", cluster_id).await,
        }
    }

    pub async fn conflict(&self, conflict_id: Ulid) -> Result<Option<Conflict>> {
        self.backend.conflict(conflict_id).await
    }

    pub async fn list_conflicts(&self, filter: &ConflictFilter) -> Result<Vec<Conflict>> {
        if let Some(t) = &filter.table {
            self.table(t)?;
        }
        self.backend.list_conflicts(filter).await
    }

    /// Open conflicts per registered table (zero included).
    pub async fn open_conflicts_by_table(&self) -> Result<Vec<(String, u64)>> {
        let counts: HashMap<String, u64> = self
            .backend
            .open_conflict_counts()
            .await?
            .into_iter()
            .collect();
        Ok(self
            .tables()
            .iter()
            .map(|t| {
                (
                    t.table_name.clone(),
                    counts.get(&t.table_name).copied().unwrap_or(0),
                )
            })
            .collect())
    }

    /// Current values of a record (`None` when absent or deleted).
    pub async fn get(&self, table: &str, id: Ulid) -> Result<Option<Values>> {
        let table = self.table(table)?;
        self.backend.get_row(&table, id).await
    }

    /// The record's current version (tombstones included).
    pub async fn version(&self, table: &str, id: Ulid) -> Result<Option<Version>> {
        self.table(table)?;
        self.backend.get_version(table, id).await
    }

    /// Every event of a record, in the total order.
    pub async fn history(&self, table: &str, id: Ulid) -> Result<Vec<ChangeEvent>> {
        self.table(table)?;
        self.backend.record_events(table, id).await
    }

    pub async fn count_quarantined(&self) -> Result<u64> {
        self.backend.count_quarantined().await
    }

    pub async fn pending_captures(&self) -> Result<u64> {
        self.backend.pending_captures().await
    }

    pub async fn has_captures(&self) -> Result<bool> {
        self.backend.has_captures().await
    }

    pub async fn close(&self) {
        // Acks recorded since the last synced_at pass (they are only in memory).
        if let Err(e) = self.mark_synced(&[]).await {
            tracing::debug!(error = %e, "cannot persist peer progress on close");
        }
        self.backend.close().await;
    }
}
