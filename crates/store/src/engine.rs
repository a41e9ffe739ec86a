//! The store's algorithms, written once over [`Backend`] primitives: draining the
//! capture queue, stamped writes through the API, applying remote events, reading
//! the log after a version vector, and progress bookkeeping.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde_json::{Value, json};
use tidemark_hlc::{Clock, Hlc};
use tokio::sync::{Mutex, watch};
use ulid::Ulid;

use crate::backend::{Backend, RowWrite, SavepointOp};
use crate::error::{Result, StoreError};
use crate::ident::Ident;
use crate::model::{
    ApplyOutcome, Capture, CapturedRow, ChangeEvent, Conflict, ConflictFilter, ConflictPolicy,
    ConflictSide, ConflictStatus, DrainOutcome, Operation, RejectKind, Rejected, ResolveChoice,
    SetAside, TableInfo, Values, Version, VersionVector, parse_ulid,
};
use crate::rules::{Causality, Resolution, resolve};
use crate::value::ColumnType;

/// Names reserved for Tidemark's own tables.
const RESERVED_PREFIX: &str = "tidemark_";
/// Columns Tidemark adds to every replicated table (the seed's entity additions).
pub const STAMP_COLUMNS: [&str; 2] = ["node_id", "hlc_modified"];
/// An event stamped further ahead of the local clock than this is quarantined:
/// no clock drift explains it (a drift within it only delays the batch).
const FAR_FUTURE_MS: i64 = 86_400_000;
/// The latest wall time an event may carry: the end of the year 9999 (SQLite's
/// date functions, and so `change_events.wall_timestamp`, stop there).
const MAX_WALL_MS: i64 = 253_402_300_799_999;
/// How many captures one drain step stamps per query.
const DRAIN_CHUNK: u32 = 512;
/// The registry as a replicated pseudo-table: a policy change is an event on it.
pub const REGISTRY_TABLE: &str = "tidemark_datatypes";
/// Default largest event (its values as JSON) a write may produce.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 << 20;

/// Values as an application wrote them (the write API): each value's JSON text,
/// so numbers keep every digit (see [`ColumnType::from_api`]).
pub type RawValues = BTreeMap<String, Box<serde_json::value::RawValue>>;

/// What became of one captured direct write.
enum Stamped {
    Event(ChangeEvent),
    SetAside(SetAside),
}

/// Record versions read in one transaction, kept current as events settle; and,
/// for bulk work (a received batch, a drained chunk of captures), the writes held
/// back to be issued as one statement per table by [`Engine::flush`].
#[derive(Debug, Clone, Default)]
struct VersionCache {
    versions: HashMap<(String, Ulid), Option<Version>>,
    /// `None`: every write goes to the database at once.
    pending: Option<Pending>,
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
    events: Vec<ChangeEvent>,
    rows: Vec<RowOp>,
}

#[derive(Debug, Clone)]
enum RowOp {
    Upsert {
        table: Arc<TableInfo>,
        event_id: Ulid,
        row: RowWrite,
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
                a.values.len() == b.values.len()
                    && a.values.keys().all(|k| b.values.contains_key(k))
            }
            (RowOp::Delete { .. }, RowOp::Delete { .. }) => true,
            (RowOp::Stamp { .. }, RowOp::Stamp { .. }) => true,
            _ => false,
        }
    }
}

/// The registry's id for a table: derived from the name, so every node agrees.
pub fn datatype_id(table: &str) -> Ulid {
    // FNV-1a, 128-bit; 80 bits of it form the ULID's random part.
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in table.as_bytes() {
        h ^= u128::from(*b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    Ulid::from_parts(0, h)
}

fn registry_table() -> TableInfo {
    TableInfo {
        datatype_id: Ulid::nil(),
        table_name: REGISTRY_TABLE.to_owned(),
        primary_key: "datatype_id".to_owned(),
        columns: vec![
            "datatype_id".to_owned(),
            "table_name".to_owned(),
            "conflict_policy".to_owned(),
        ],
        types: vec![
            ColumnType::Char { len: 26 },
            ColumnType::Text {
                max_chars: Some(64),
            },
            ColumnType::Text {
                max_chars: Some(20),
            },
        ],
        declared: vec![
            "CHAR(26)".into(),
            "VARCHAR(64)".into(),
            "VARCHAR(20)".into(),
        ],
        conflict_policy: ConflictPolicy::Lww,
    }
}

fn registry_values(table: &str, policy: ConflictPolicy) -> Values {
    let mut v = Values::new();
    v.insert(
        "datatype_id".into(),
        Value::String(datatype_id(table).to_string()),
    );
    v.insert("table_name".into(), Value::String(table.to_owned()));
    v.insert(
        "conflict_policy".into(),
        Value::String(policy.as_str().to_owned()),
    );
    v
}

fn parse_registry_values(v: &Values) -> Option<(String, ConflictPolicy)> {
    let name = v.get("table_name")?.as_str()?.to_owned();
    let policy = v.get("conflict_policy")?.as_str()?.parse().ok()?;
    Some((name, policy))
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
    pub async fn open(backend: B, clock: Arc<Clock>) -> Result<Self> {
        backend.migrate().await?;
        let node_id = clock.node_id();
        match backend.meta_get("node_id").await? {
            Some(stored) if stored != node_id.to_string() => {
                return Err(StoreError::IdentityMismatch {
                    key: "node_id",
                    stored,
                    configured: node_id.to_string(),
                });
            }
            Some(_) => {}
            None => backend.meta_set("node_id", &node_id.to_string()).await?,
        }
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
        };
        let persisted = engine.backend.max_hlc().await?;
        engine.clock.seed(persisted)?;
        engine.reload_tables().await?;
        Ok(engine)
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

    fn committed(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
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

    async fn reload_tables(&self) -> Result<()> {
        let mut loaded = self.backend.load_tables().await?;
        for info in &mut loaded {
            if info.types.len() != info.columns.len() {
                self.fill_classes(info).await?;
            }
        }
        let map = loaded
            .into_iter()
            .map(|t| (t.table_name.clone(), Arc::new(t)))
            .collect();
        *self.tables.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// Fills in the column classes of a table registered before they were kept,
    /// from its live schema.
    async fn fill_classes(&self, info: &mut TableInfo) -> Result<()> {
        let ident = Ident::parse("table name", &info.table_name)?;
        let shape = self.backend.inspect_table(&ident).await?.ok_or_else(|| {
            StoreError::corrupt(&info.table_name, "a registered table no longer exists")
        })?;
        let (mut types, mut declared) = (Vec::new(), Vec::new());
        for col in &info.columns {
            let (_, ty) = shape
                .columns
                .iter()
                .find(|(c, _)| c == col)
                .ok_or_else(|| {
                    StoreError::corrupt(&info.table_name, format!("column {col} no longer exists"))
                })?;
            let class = if *col == info.primary_key {
                ColumnType::Text { max_chars: None }
            } else {
                self.backend
                    .column_type(ty)
                    .map_err(|reason| StoreError::Unregistrable {
                        table: info.table_name.clone(),
                        reason: format!("column {col} ({ty}): {reason}"),
                    })?
            };
            types.push(class);
            declared.push(ty.clone());
        }
        info.types = types;
        info.declared = declared;
        Ok(())
    }

    /// Registered tables, by name.
    pub fn tables(&self) -> Vec<Arc<TableInfo>> {
        let map = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| a.table_name.cmp(&b.table_name));
        v
    }

    /// The registered table `name`, or [`StoreError::UnknownTable`].
    pub fn table(&self, name: &str) -> Result<Arc<TableInfo>> {
        let map = self.tables.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned().ok_or_else(|| {
            let mut names: Vec<_> = map.keys().cloned().collect();
            names.sort();
            StoreError::UnknownTable {
                table: crate::model::truncate(name),
                registered: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            }
        })
    }

    /// Registers `name` for replication with `policy` (see [`Backend::register`]).
    /// Registering again refreshes the column list and triggers; the policy of an
    /// already registered table is kept (change it with [`Engine::set_policy`]).
    pub async fn register_table(&self, name: &str, policy: ConflictPolicy) -> Result<TableInfo> {
        self.register_table_with(name, policy, &BTreeMap::new())
            .await
    }

    /// [`Engine::register_table`] with type overrides: the class of some SQLite
    /// columns whose declared type does not say it (e.g. `decimal(10,2)` for a
    /// TEXT column). PostgreSQL's types fix their class; an override there must
    /// agree with it.
    pub async fn register_table_with(
        &self,
        name: &str,
        policy: ConflictPolicy,
        overrides: &BTreeMap<String, ColumnType>,
    ) -> Result<TableInfo> {
        let ident = Ident::parse("table name", name)?;
        let unregistrable = |reason: String| StoreError::Unregistrable {
            table: name.to_owned(),
            reason,
        };
        if name.starts_with(RESERVED_PREFIX) || name == "change_events" {
            return Err(unregistrable(
                "the name is reserved for Tidemark's own tables".into(),
            ));
        }
        let shape = self
            .backend
            .inspect_table(&ident)
            .await?
            .ok_or_else(|| unregistrable("no such table".into()))?;
        let [pk] = shape.primary_key.as_slice() else {
            return Err(unregistrable(format!(
                "it must have a single-column ULID primary key; its primary key is {}",
                if shape.primary_key.is_empty() {
                    "missing".to_owned()
                } else {
                    format!("({})", shape.primary_key.join(", "))
                }
            )));
        };
        let (_, pk_type) = shape
            .columns
            .iter()
            .find(|(c, _)| c == pk)
            .ok_or_else(|| unregistrable(format!("primary key column {pk} not found")))?;
        if !is_ulid_text_type(pk_type) {
            return Err(unregistrable(format!(
                "primary key {pk} has type {pk_type}; a ULID key must be TEXT, CHAR(26) or VARCHAR(26)"
            )));
        }
        for col in overrides.keys() {
            if !shape.columns.iter().any(|(c, _)| c == col) {
                return Err(unregistrable(format!(
                    "a type override names column {col:?}, which the table does not have"
                )));
            }
        }
        let mut columns = vec![pk.clone()];
        let mut types = vec![ColumnType::Text { max_chars: None }];
        let mut declared = vec![pk_type.clone()];
        for (col, ty) in &shape.columns {
            if col == pk || STAMP_COLUMNS.contains(&col.as_str()) {
                continue;
            }
            Ident::parse("column name", col).map_err(|_| {
                unregistrable(format!(
                    "column {col:?} is not a plain identifier (letters, digits, _)"
                ))
            })?;
            let derived = self.backend.column_type(ty);
            let class = match (overrides.get(col), self.backend.kind()) {
                (Some(o), "postgres") => match derived {
                    Ok(d) if d == *o => d,
                    Ok(d) => {
                        return Err(unregistrable(format!(
                            "column {col}: the override {o} differs from {d}, the class of its PostgreSQL type {ty}; overrides are for SQLite columns"
                        )));
                    }
                    Err(reason) => return Err(unregistrable(format!("column {col}: {reason}"))),
                },
                (Some(o), _) => {
                    o.fits_sqlite(ty)
                        .map_err(|reason| unregistrable(format!("column {col}: {reason}")))?;
                    *o
                }
                (None, _) => derived
                    .map_err(|reason| unregistrable(format!("column {col} ({ty}): {reason}")))?,
            };
            columns.push(col.clone());
            types.push(class);
            declared.push(ty.clone());
        }
        let existing = self.table(name).ok();
        let info = TableInfo {
            datatype_id: datatype_id(name),
            table_name: name.to_owned(),
            primary_key: pk.clone(),
            columns,
            types,
            declared,
            // The registry is authoritative once a table is registered: a policy
            // changes only through set_policy, which replicates.
            conflict_policy: existing.as_ref().map_or(policy, |t| t.conflict_policy),
        };
        // Held across the reload, so no drain meets captures of a table it does
        // not know yet, and two registrations cannot both snapshot the rows.
        let _w = self.writer.lock().await;
        let existing = self.table(name).ok();
        if existing.is_some() {
            // Captures made by the current triggers are read with the current
            // column list before the triggers change.
            let mut tx = self.backend.begin().await?;
            let drained = self.drain_in(&mut tx).await?;
            self.backend.commit(tx).await?;
            if drained.events > 0 {
                self.committed();
            }
        }
        self.backend.register(&info, existing.is_none()).await?;
        self.reload_tables().await?;
        Ok(info)
    }

    /// Sets a table's conflict policy cluster-wide: the change is an event on the
    /// registry (`tidemark_datatypes`) that replicates like any write, last writer
    /// wins. Open conflicts follow the policy: switching to `lww` resolves them,
    /// switching to `manual` reopens those decided by `lww` whose versions are still
    /// concurrent.
    pub async fn set_policy(&self, table: &str, policy: ConflictPolicy) -> Result<ChangeEvent> {
        let info = self.table(table)?;
        let registry = registry_table();
        let record = datatype_id(&info.table_name);
        let values = registry_values(&info.table_name, policy);
        let _w = self.writer.lock().await;
        let mut tx = self.backend.begin().await?;
        self.drain_in(&mut tx).await?;
        let mut cache = VersionCache::new();
        let local = self
            .cached_version(&mut tx, &mut cache, &registry, record)
            .await?;
        let old = local
            .as_ref()
            .map(|_| registry_values(&info.table_name, info.conflict_policy));
        let event = self.local_event(
            &registry,
            record,
            Operation::Update,
            old,
            Some(values),
            local.as_ref(),
            None,
        );
        self.settle(&mut tx, &registry, &event, &mut cache).await?;
        self.apply_policy(&mut tx, &info.table_name, policy, &mut cache)
            .await?;
        self.commit_local(tx, &event).await?;
        self.reload_tables().await?;
        Ok(event)
    }

    /// Sets the policy inside `tx` and moves conflicts of the table to match it.
    async fn apply_policy(
        &self,
        tx: &mut B::Tx,
        table: &str,
        policy: ConflictPolicy,
        cache: &mut VersionCache,
    ) -> Result<()> {
        self.backend.set_policy(tx, table, policy).await?;
        match policy {
            ConflictPolicy::Lww => {
                self.backend.resolve_open_conflicts(tx, table).await?;
            }
            ConflictPolicy::Manual => {
                let decided = self.backend.conflicts_decided_by_lww(tx, table).await?;
                let info = self.table(table)?;
                let mut reopen = Vec::new();
                for c in decided {
                    let version = self.cached_version(tx, cache, &info, c.record_id).await?;
                    if version
                        .is_some_and(|v| v.frontier.iter().any(|m| m.event_id == c.loser.event_id))
                    {
                        reopen.push(c.conflict_id);
                    }
                }
                self.backend.reopen_conflicts(tx, &reopen).await?;
            }
        }
        Ok(())
    }

    /// Stamps captured direct writes into `change_events`, oldest first, until the
    /// queue is empty. A capture that cannot be replicated is set aside with its
    /// reason (`tidemark_unreplicated`) and the rest go on.
    pub async fn drain(&self) -> Result<DrainOutcome> {
        let _w = self.writer.lock().await;
        let mut tx = self.backend.begin().await?;
        let outcome = self.drain_in(&mut tx).await?;
        if outcome.events > 0 || !outcome.set_aside.is_empty() {
            self.backend.commit(tx).await?;
        }
        if outcome.events > 0 {
            self.committed();
        }
        Ok(outcome)
    }

    async fn drain_in(&self, tx: &mut B::Tx) -> Result<DrainOutcome> {
        let mut outcome = DrainOutcome::default();
        loop {
            let captures = self.backend.take_captures(tx, DRAIN_CHUNK).await?;
            if captures.is_empty() {
                break;
            }
            let seqs: Vec<i64> = captures.iter().map(|c| c.seq).collect();
            let mut cache = VersionCache::buffered();
            let records = captures.iter().filter_map(|c| {
                let id = parse_ulid("record id", &c.record_id).ok()?;
                Some((c.table_name.clone(), id))
            });
            self.prefetch(tx, &mut cache, records).await?;
            let mut events = Vec::with_capacity(captures.len());
            let mut set_aside = Vec::new();
            for capture in captures {
                match self.stamp_capture(tx, capture, &mut cache).await? {
                    Stamped::Event(event) => events.push(event),
                    Stamped::SetAside(s) => set_aside.push(s),
                }
            }
            self.flush(tx, &mut cache).await?;
            if !events.is_empty() {
                let mut own = VersionVector::new();
                for e in &events {
                    own.observe(e.node_id, e.hlc);
                }
                self.backend.insert_events(tx, &events).await?;
                self.backend.raise_vector(tx, &own).await?;
            }
            if !set_aside.is_empty() {
                self.backend.set_aside(tx, &set_aside).await?;
            }
            outcome.events += events.len() as u64;
            outcome.set_aside.extend(set_aside);
            self.backend.delete_captures(tx, &seqs).await?;
            if seqs.len() < DRAIN_CHUNK as usize {
                break;
            }
        }
        Ok(outcome)
    }

    /// The values of a captured row, canonical for its table's classes.
    fn captured_values(
        table: &TableInfo,
        row: CapturedRow,
    ) -> std::result::Result<Option<Values>, String> {
        let mut out = Values::new();
        match row {
            CapturedRow::Gone => return Ok(None),
            CapturedRow::Cells(cells) => {
                if cells.len() < table.columns.len() {
                    return Err(format!(
                        "the capture holds {} values for {} columns",
                        cells.len(),
                        table.columns.len()
                    ));
                }
                for ((col, ty), cell) in table.columns.iter().zip(&table.types).zip(cells) {
                    let v = ty
                        .from_sqlite(cell)
                        .map_err(|reason| format!("column {col} ({ty}): {reason}"))?;
                    out.insert(col.clone(), v);
                }
            }
            CapturedRow::Json(text) => {
                let raw: BTreeMap<String, Box<serde_json::value::RawValue>> =
                    serde_json::from_str(&text).map_err(|e| format!("unreadable capture: {e}"))?;
                for (col, ty) in table.columns.iter().zip(&table.types) {
                    let v = match raw.get(col) {
                        Some(r) => ty
                            .from_pg_json(r)
                            .map_err(|reason| format!("column {col} ({ty}): {reason}"))?,
                        None => Value::Null,
                    };
                    out.insert(col.clone(), v);
                }
            }
        }
        Ok(Some(out))
    }

    /// Bytes of `values` as the log and the wire carry them.
    fn event_bytes(values: Option<&Values>) -> usize {
        values.map_or(0, |v| serde_json::to_vec(v).map_or(usize::MAX, |b| b.len()))
    }

    /// Turns one capture into an event, or sets it aside with the reason it cannot
    /// be replicated.
    async fn stamp_capture(
        &self,
        tx: &mut B::Tx,
        capture: Capture,
        cache: &mut VersionCache,
    ) -> Result<Stamped> {
        let set_aside = |capture: &Capture, reason: String| {
            Stamped::SetAside(SetAside {
                seq: capture.seq,
                table_name: capture.table_name.clone(),
                record_id: capture.record_id.clone(),
                operation: capture.operation.as_str().to_owned(),
                reason,
                set_aside_at: String::new(),
            })
        };
        let Ok(table) = self.table(&capture.table_name) else {
            let reason = format!("table {:?} is not registered", capture.table_name);
            return Ok(set_aside(&capture, reason));
        };
        let record_id = match parse_ulid("captured record id", &capture.record_id) {
            Ok(id) => id,
            Err(e) => return Ok(set_aside(&capture, e.to_string())),
        };
        let operation = capture.operation;
        let new_values = match Self::captured_values(&table, capture.row.clone()) {
            Ok(v) => v,
            Err(reason) => return Ok(set_aside(&capture, reason)),
        };
        let bytes = Self::event_bytes(new_values.as_ref());
        if bytes > self.max_event_bytes() {
            let reason = StoreError::TooLarge {
                table: table.table_name.clone(),
                record_id: record_id.to_string(),
                bytes,
                limit: self.max_event_bytes(),
            }
            .to_string();
            return Ok(set_aside(&capture, reason));
        }
        let local = self.cached_version(tx, cache, &table, record_id).await?;
        let event = self.local_event(
            &table,
            record_id,
            operation,
            None,
            new_values,
            local.as_ref(),
            None,
        );
        self.settle(tx, &table, &event, cache).await?;
        if operation != Operation::Delete {
            match cache.pending.as_mut() {
                Some(p) => p.rows.push(RowOp::Stamp {
                    table: table.clone(),
                    id: record_id,
                    hlc: event.hlc,
                    node_id: self.node_id,
                }),
                None => {
                    self.backend
                        .stamp_rows(tx, &table, &[(record_id, event.hlc, self.node_id)])
                        .await?
                }
            }
        }
        Ok(Stamped::Event(event))
    }

    /// The record's version, read once per transaction and kept current in `cache`.
    async fn cached_version(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        table: &TableInfo,
        id: Ulid,
    ) -> Result<Option<Version>> {
        let key = (table.table_name.clone(), id);
        if let Some(v) = cache.get(&key) {
            return Ok(v.clone());
        }
        let found = self
            .backend
            .versions(tx, &table.table_name, &[id])
            .await?
            .remove(&id);
        cache.insert(key, found.clone());
        Ok(found)
    }

    /// Applies the rules for `event` to its record's version inside `tx`: stores the
    /// new version and keeps the record's conflicts in step with its frontier.
    async fn settle(
        &self,
        tx: &mut B::Tx,
        table: &TableInfo,
        event: &ChangeEvent,
        cache: &mut VersionCache,
    ) -> Result<Resolution> {
        let local = self
            .cached_version(tx, cache, table, event.record_id)
            .await?;
        let res = resolve(local.as_ref(), &event.member()?);
        if local.as_ref() != Some(&res.next) {
            match cache.pending.as_mut() {
                Some(p) => {
                    p.versions.insert(
                        (table.table_name.clone(), event.record_id),
                        res.next.clone(),
                    );
                }
                None => {
                    self.backend
                        .put_version(tx, &table.table_name, event.record_id, &res.next)
                        .await?
                }
            }
        }
        cache.insert(
            (table.table_name.clone(), event.record_id),
            Some(res.next.clone()),
        );
        let touches_conflicts =
            !res.superseded.is_empty() || res.causality == Causality::Concurrent;
        if table.table_name != REGISTRY_TABLE && touches_conflicts {
            // Conflict bookkeeping reads the stored events of the frontier.
            self.flush(tx, cache).await?;
            self.track_conflicts(tx, table, event, &res).await?;
        }
        Ok(res)
    }

    /// Conflict rows follow the frontier: one per losing member (open under
    /// `manual`, decided under `lww`), closed when a version that has seen it
    /// arrives (with the resolution that version carries, or as superseded).
    async fn track_conflicts(
        &self,
        tx: &mut B::Tx,
        table: &TableInfo,
        event: &ChangeEvent,
        res: &Resolution,
    ) -> Result<()> {
        if !res.superseded.is_empty() {
            let info = event.resolution();
            let ids: Vec<Ulid> = res.superseded.iter().map(|m| m.event_id).collect();
            self.backend
                .close_conflicts(
                    tx,
                    &ids,
                    info.as_ref().map_or("superseded", |i| i.kind.as_str()),
                    info.as_ref().and_then(|i| i.by.as_deref()),
                    info.as_ref().and_then(|i| i.note.as_deref()),
                    event.event_id,
                )
                .await?;
        }
        if res.causality != Causality::Concurrent {
            return Ok(());
        }
        let Some(winner) = res.next.frontier.last() else {
            return Ok(());
        };
        let wanted: Vec<Ulid> = res
            .next
            .frontier
            .iter()
            .map(|m| m.event_id)
            .filter(|id| *id != event.event_id)
            .collect();
        let mut values = self.backend.event_values(tx, &wanted).await?;
        values.insert(event.event_id, event.new_values.clone());
        let side = |m: &crate::model::Member| ConflictSide {
            event_id: m.event_id,
            hlc: m.hlc,
            node_id: m.node_id,
            values: values.get(&m.event_id).cloned().flatten(),
        };
        let manual = table.conflict_policy == ConflictPolicy::Manual;
        for loser in &res.next.frontier[..res.next.frontier.len() - 1] {
            let conflict = Conflict {
                conflict_id: loser.event_id,
                table_name: table.table_name.clone(),
                record_id: event.record_id,
                policy: table.conflict_policy,
                status: if manual {
                    ConflictStatus::Open
                } else {
                    ConflictStatus::Resolved
                },
                winner: side(winner),
                loser: side(loser),
                detected_at: String::new(),
                resolved_at: None,
                resolved_by: (!manual).then(|| "lww".to_owned()),
                resolution: (!manual).then(|| "lww".to_owned()),
                resolution_note: None,
                resolution_event_id: None,
            };
            self.backend.upsert_conflict(tx, &conflict).await?;
        }
        Ok(())
    }

    /// A new event of this node for a write on top of `local`; `extra` is merged
    /// into its metadata next to the version vector.
    #[allow(clippy::too_many_arguments)]
    fn local_event(
        &self,
        table: &TableInfo,
        record_id: Ulid,
        operation: Operation,
        old_values: Option<Values>,
        new_values: Option<Values>,
        local: Option<&Version>,
        extra: Option<(&str, Value)>,
    ) -> ChangeEvent {
        let hlc = self.clock.now();
        let mut vv = local.map(|v| v.vv.clone()).unwrap_or_default();
        vv.observe(self.node_id, hlc);
        let mut metadata = json!({ "vv": vv.to_json() });
        let mut action = None;
        if let Some((act, resolution)) = extra {
            action = Some(act.to_owned());
            metadata["resolution"] = resolution;
        }
        ChangeEvent {
            event_id: (self.ids)(),
            hlc,
            wall_ms: self.clock.wall_ms(),
            node_id: self.node_id,
            table_name: table.table_name.clone(),
            record_id,
            operation,
            action,
            user_id: None,
            old_values,
            new_values,
            metadata: Some(metadata),
        }
    }

    /// The class of a column a write may set (known, replicated, not a stamp).
    fn writable_column(table: &TableInfo, column: &str) -> Result<ColumnType> {
        if STAMP_COLUMNS.contains(&column) {
            return Err(StoreError::invalid(
                format!("column {column}"),
                "is maintained by Tidemark and cannot be written",
            ));
        }
        table
            .column_type(column)
            .ok_or_else(|| StoreError::UnknownColumn {
                table: table.table_name.clone(),
                column: crate::model::truncate(column),
            })
    }

    /// Checks a write's values, one column at a time, with `read` turning each
    /// into its canonical form; returns them with the primary key set to `id`.
    fn checked_values<'v, V: 'v>(
        table: &TableInfo,
        id: Ulid,
        values: impl IntoIterator<Item = (&'v String, &'v V)>,
        read: impl Fn(ColumnType, &V) -> std::result::Result<Value, String>,
    ) -> Result<Values> {
        let mut out = Values::new();
        let key = id.to_string();
        for (k, v) in values {
            let ty = Self::writable_column(table, k)?;
            let v = read(ty, v).map_err(|reason| StoreError::InvalidValue {
                table: table.table_name.clone(),
                column: k.clone(),
                class: ty.to_string(),
                reason,
            })?;
            if k == &table.primary_key && v.as_str() != Some(key.as_str()) {
                return Err(StoreError::invalid(
                    format!("column {k}"),
                    format!("primary key value {v} does not match record id {id}"),
                ));
            }
            out.insert(k.clone(), v);
        }
        out.insert(table.primary_key.clone(), Value::String(key));
        Ok(out)
    }

    /// Values in the log's form (see [`crate::value`]), checked against the table.
    fn canonical_values(table: &TableInfo, id: Ulid, values: &Values) -> Result<Values> {
        Self::checked_values(table, id, values, |ty, v| ty.check(v))
    }

    /// Values as an application wrote them, checked against the table.
    fn api_values(table: &TableInfo, id: Ulid, values: &RawValues) -> Result<Values> {
        Self::checked_values(table, id, values, |ty, v| ty.from_api(v))
    }

    /// Writes a record (insert, or update of the given columns) with values in the
    /// log's form and returns its event.
    pub async fn put(
        self: &Arc<Self>,
        table: &str,
        id: Ulid,
        values: &Values,
    ) -> Result<ChangeEvent> {
        let table = self.table(table)?;
        let values = Self::canonical_values(&table, id, values)?;
        let event = self.write_queued(table.clone(), id, Some(values)).await?;
        event.ok_or_else(|| StoreError::corrupt(&table.table_name, "a put wrote no event"))
    }

    /// Writes a record through the API (insert, or update of the given columns)
    /// with values as an application wrote them, and returns its event.
    pub async fn put_raw(
        self: &Arc<Self>,
        table: &str,
        id: Ulid,
        values: &RawValues,
    ) -> Result<ChangeEvent> {
        let table = self.table(table)?;
        let values = Self::api_values(&table, id, values)?;
        let event = self.write_queued(table.clone(), id, Some(values)).await?;
        event.ok_or_else(|| StoreError::corrupt(&table.table_name, "a put wrote no event"))
    }

    /// Deletes a record through the API; `None` when there was no such row.
    pub async fn delete(self: &Arc<Self>, table: &str, id: Ulid) -> Result<Option<ChangeEvent>> {
        let table = self.table(table)?;
        self.write_queued(table, id, None).await
    }

    /// One local write in its own transaction: `values` upserts (overlaid on the
    /// current row), `None` deletes. A delete of an absent row writes nothing
    /// unless `force` (a resolution that keeps a deleted version).
    async fn write_local(
        &self,
        table: &TableInfo,
        id: Ulid,
        values: Option<Values>,
        extra: Option<(&str, Value)>,
        force: bool,
    ) -> Result<Option<ChangeEvent>> {
        let _w = self.writer.lock().await;
        self.write_alone(table, id, values, extra, force).await
    }

    /// [`Engine::write_local`] with the writer lock already held.
    async fn write_alone(
        &self,
        table: &TableInfo,
        id: Ulid,
        values: Option<Values>,
        extra: Option<(&str, Value)>,
        force: bool,
    ) -> Result<Option<ChangeEvent>> {
        let mut tx = self.backend.begin().await?;
        let drained = self.drain_in(&mut tx).await?;
        let mut cache = VersionCache::new();
        match self
            .write_in(&mut tx, &mut cache, table, id, values, extra, force)
            .await?
        {
            Some(event) => {
                self.commit_local(tx, &event).await?;
                Ok(Some(event))
            }
            None => {
                if drained.events > 0 || !drained.set_aside.is_empty() {
                    self.backend.commit(tx).await?;
                }
                if drained.events > 0 {
                    self.committed();
                }
                Ok(None)
            }
        }
    }

    /// Writes through the API from concurrent callers share transactions (group
    /// commit): a caller queues its write, and whoever gets the writer lock next
    /// writes everything queued in one transaction, each write exactly as it
    /// would be alone, in queue order. If any of them fails, the group is rolled
    /// back and each write runs in its own transaction, so one caller's error is
    /// never another's. The group runs in its own task: a caller that goes away
    /// does not abandon the writes of the others.
    async fn write_queued(
        self: &Arc<Self>,
        table: Arc<TableInfo>,
        id: Ulid,
        values: Option<Values>,
    ) -> Result<Option<ChangeEvent>> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.queue().push(QueuedWrite {
            table,
            id,
            values,
            reply,
        });
        let guard = self.writer.clone().lock_owned().await;
        let group = std::mem::take(&mut *self.queue());
        if group.is_empty() {
            // An earlier group took this write and has answered it.
            drop(guard);
        } else {
            let me = self.clone();
            tokio::spawn(async move {
                let _guard = guard;
                me.write_group(group).await;
            });
        }
        done.await.map_err(|_| {
            StoreError::corrupt("write queue", "a queued write was dropped unanswered")
        })?
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<QueuedWrite>> {
        // The queue only holds plain data: a panic elsewhere cannot leave it torn.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn write_group(&self, group: Vec<QueuedWrite>) {
        if group.len() > 1 {
            match self.try_group(&group).await {
                Ok(events) => {
                    for (w, event) in group.into_iter().zip(events) {
                        let _ = w.reply.send(Ok(event));
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, writes = group.len(), "grouped write failed; writing one by one");
                }
            }
        }
        for w in group {
            let result = self
                .write_alone(&w.table, w.id, w.values, None, false)
                .await;
            let _ = w.reply.send(result);
        }
    }

    async fn try_group(&self, group: &[QueuedWrite]) -> Result<Vec<Option<ChangeEvent>>> {
        let mut tx = self.backend.begin().await?;
        match self.group_in(&mut tx, group).await {
            Ok((results, own)) => {
                if !own.0.is_empty() {
                    self.backend.raise_vector(&mut tx, &own).await?;
                }
                self.backend.commit(tx).await?;
                self.committed();
                Ok(results)
            }
            Err(e) => {
                self.backend.rollback(tx).await?;
                Err(e)
            }
        }
    }

    async fn group_in(
        &self,
        tx: &mut B::Tx,
        group: &[QueuedWrite],
    ) -> Result<(Vec<Option<ChangeEvent>>, VersionVector)> {
        self.drain_in(tx).await?;
        let mut cache = VersionCache::new();
        let mut own = VersionVector::new();
        let mut results = Vec::with_capacity(group.len());
        for w in group {
            let event = self
                .write_in(
                    tx,
                    &mut cache,
                    &w.table,
                    w.id,
                    w.values.clone(),
                    None,
                    false,
                )
                .await?;
            if let Some(e) = &event {
                self.backend
                    .insert_events(tx, std::slice::from_ref(e))
                    .await?;
                own.observe(self.node_id, e.hlc);
            }
            results.push(event);
        }
        Ok((results, own))
    }

    /// The write itself, inside `tx`: row, version and conflicts (the event is
    /// returned, not stored). `None`: a delete of an absent row, without `force`.
    #[allow(clippy::too_many_arguments)]
    async fn write_in(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        table: &TableInfo,
        id: Ulid,
        values: Option<Values>,
        extra: Option<(&str, Value)>,
        force: bool,
    ) -> Result<Option<ChangeEvent>> {
        let local = self.cached_version(tx, cache, table, id).await?;
        let old = self.backend.rows(tx, table, &[id]).await?.remove(&id);
        let event = match values {
            Some(values) => {
                let op = if old.is_some() {
                    Operation::Update
                } else {
                    Operation::Insert
                };
                // An update writes the whole row (current values overlaid with the
                // given ones): INSERT .. ON CONFLICT checks NOT NULL on the proposed
                // row first.
                let row = match &old {
                    Some(current) => {
                        let mut full = current.clone();
                        full.extend(values);
                        full
                    }
                    None => values,
                };
                let mut event = self.local_event(table, id, op, None, None, local.as_ref(), extra);
                self.backend
                    .upsert_row(tx, table, id, &row, event.hlc, self.node_id)
                    .await?;
                // The event carries the row as the database now holds it.
                event.new_values = self.backend.rows(tx, table, &[id]).await?.remove(&id);
                let bytes = Self::event_bytes(event.new_values.as_ref());
                if bytes > self.max_event_bytes() {
                    return Err(StoreError::TooLarge {
                        table: table.table_name.clone(),
                        record_id: id.to_string(),
                        bytes,
                        limit: self.max_event_bytes(),
                    });
                }
                event
            }
            None => {
                if old.is_none() && !force {
                    return Ok(None);
                }
                let event = self.local_event(
                    table,
                    id,
                    Operation::Delete,
                    None,
                    None,
                    local.as_ref(),
                    extra,
                );
                self.backend.delete_row(tx, table, id).await?;
                event
            }
        };
        self.settle(tx, table, &event, cache).await?;
        Ok(Some(event))
    }

    async fn commit_local(&self, mut tx: B::Tx, event: &ChangeEvent) -> Result<()> {
        self.backend
            .insert_events(&mut tx, std::slice::from_ref(event))
            .await?;
        let mut own = VersionVector::new();
        own.observe(self.node_id, event.hlc);
        self.backend.raise_vector(&mut tx, &own).await?;
        self.backend.commit(tx).await?;
        self.committed();
        Ok(())
    }

    /// Resolves an open conflict with a new write that has seen both versions: it
    /// replicates like any write and closes the conflict on every node. Fails,
    /// changing nothing, for an unknown or already resolved conflict or values with
    /// unknown columns.
    pub async fn resolve_conflict(
        &self,
        conflict_id: Ulid,
        choice: ResolveChoice,
        resolved_by: &str,
        note: Option<&str>,
    ) -> Result<ChangeEvent> {
        let conflict = self
            .backend
            .conflict(conflict_id)
            .await?
            .ok_or(StoreError::NoSuchConflict { conflict_id })?;
        if conflict.status != ConflictStatus::Open {
            return Err(StoreError::ConflictClosed {
                conflict_id,
                resolution: conflict.resolution.unwrap_or_default(),
                by: conflict.resolved_by.unwrap_or_else(|| "?".into()),
                at: conflict.resolved_at.unwrap_or_default(),
            });
        }
        let table = self.table(&conflict.table_name)?;
        let id = conflict.record_id;
        let values = match &choice {
            ResolveChoice::KeepLocal => conflict
                .winner
                .values
                .as_ref()
                .map(|v| Self::canonical_values(&table, id, v))
                .transpose()?,
            ResolveChoice::KeepRemote => conflict
                .loser
                .values
                .as_ref()
                .map(|v| Self::canonical_values(&table, id, v))
                .transpose()?,
            ResolveChoice::Merged(v) => Some(Self::api_values(&table, id, v)?),
        };
        let resolution = json!({
            "kind": choice.kind(),
            "by": resolved_by,
            "note": note,
            "conflict_id": conflict_id.to_string(),
        });
        let event = self
            .write_local(&table, id, values, Some(("resolve", resolution)), true)
            .await?;
        event.ok_or_else(|| StoreError::corrupt(&table.table_name, "a resolution wrote no event"))
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

    /// Validates a remote event against the registry and the strictest backend
    /// before anything is written; returns its table and the event with its values
    /// in canonical form (old values are not kept: events are state-based).
    fn check_remote(&self, event: &ChangeEvent) -> Result<(Arc<TableInfo>, ChangeEvent)> {
        let field = |f: &str| format!("event {} {f}", event.event_id);
        if let Some(action) = &event.action
            && (action.chars().count() > 20 || action.contains('\0'))
        {
            return Err(StoreError::invalid(
                field("action"),
                "must be at most 20 characters without NUL",
            ));
        }
        if !(0..=MAX_WALL_MS).contains(&event.wall_ms) {
            return Err(StoreError::invalid(
                field("wall_ms"),
                format!("{} is outside the years 1970 to 9999", event.wall_ms),
            ));
        }
        let table = if event.table_name == REGISTRY_TABLE {
            let values = event.new_values.as_ref().ok_or_else(|| {
                StoreError::invalid(
                    field("new_values"),
                    "a registry event must carry new values",
                )
            })?;
            let (name, _) = parse_registry_values(values).ok_or_else(|| {
                StoreError::invalid(
                    field("new_values"),
                    "expected {\"table_name\": .., \"conflict_policy\": \"lww\"|\"manual\"}",
                )
            })?;
            self.table(&name)?;
            if event.record_id != datatype_id(&name) || event.operation != Operation::Update {
                return Err(StoreError::invalid(
                    field("record_id"),
                    format!("not the registry record of table {name}"),
                ));
            }
            Arc::new(registry_table())
        } else {
            self.table(&event.table_name)?
        };
        let new_values = match (event.operation, &event.new_values) {
            (Operation::Delete, Some(_)) => {
                return Err(StoreError::invalid(
                    field("new_values"),
                    "a DELETE carries no new values",
                ));
            }
            (Operation::Insert | Operation::Update, None) => {
                return Err(StoreError::invalid(
                    field("new_values"),
                    format!("an {} must carry new values", event.operation),
                ));
            }
            (_, None) => None,
            (_, Some(values)) => {
                let canonical = Self::canonical_values(&table, event.record_id, values)?;
                if let Some(missing) = table.columns.iter().find(|c| !values.contains_key(*c)) {
                    return Err(StoreError::invalid(
                        field("new_values"),
                        format!("column {missing} is missing: an event carries the whole row"),
                    ));
                }
                Some(canonical)
            }
        };
        if let Some(meta) = &event.metadata
            && !meta.is_object()
        {
            return Err(StoreError::invalid(
                field("metadata"),
                "must be a JSON object",
            ));
        }
        event.vector()?;
        Ok((
            table,
            ChangeEvent {
                old_values: None,
                new_values,
                ..event.clone()
            },
        ))
    }

    /// Applies events from a peer in one transaction (see [`Engine::apply_from`]),
    /// accepting every origin.
    pub async fn apply_remote(&self, events: &[ChangeEvent]) -> Result<ApplyOutcome> {
        self.apply_from(None, events, Vec::new(), &|_| true).await
    }

    /// Applies a batch from `peer` in one transaction: idempotent (an event id
    /// already present changes nothing), the winner per record decided by the
    /// rules, conflicts recorded, every new event kept in `change_events`.
    ///
    /// Events that cannot be applied — `rejected` (the caller could not decode
    /// them), events of an origin `allowed` refuses, malformed ones, ones of an
    /// unknown table or column, ones the table's constraints refuse, ones stamped
    /// further ahead than any drift explains — go to the quarantine in the same
    /// transaction and the rest apply, so one bad event never blocks the stream.
    /// The whole batch is refused, changing nothing, when events of one origin
    /// come out of HLC order or one is beyond the max drift (it may apply later,
    /// once the clocks agree).
    pub async fn apply_from(
        &self,
        peer: Option<Ulid>,
        events: &[ChangeEvent],
        mut rejected: Vec<Rejected>,
        allowed: &(dyn Fn(Ulid) -> bool + Sync),
    ) -> Result<ApplyOutcome> {
        let mut accepted = Vec::with_capacity(events.len());
        let mut last_per_origin: BTreeMap<Ulid, (Hlc, Ulid)> = BTreeMap::new();
        let now_ms = self.clock.wall_ms();
        for event in events {
            let last = last_per_origin
                .entry(event.node_id)
                .or_insert((Hlc::ZERO, event.event_id));
            // Strictly increasing per origin (the same event twice is a duplicate).
            if event.hlc < last.0 || (event.hlc == last.0 && event.event_id != last.1) {
                return Err(StoreError::invalid(
                    format!("event {} hlc", event.event_id),
                    format!(
                        "events of origin {} out of order: {} after {}",
                        event.node_id, event.hlc, last.0
                    ),
                ));
            }
            *last = (event.hlc, event.event_id);
            let reject = |kind, reason: String| Rejected {
                event_id: event.event_id.to_string(),
                kind,
                reason,
                event: event.to_json(),
            };
            if !allowed(event.node_id) {
                rejected.push(reject(
                    RejectKind::NotAllowed,
                    format!(
                        "the sending peer may not relay events of origin {}",
                        event.node_id
                    ),
                ));
                continue;
            }
            let ahead_ms = event.hlc.wall_ms().saturating_sub(now_ms);
            if ahead_ms > FAR_FUTURE_MS {
                rejected.push(reject(
                    RejectKind::FarFuture,
                    format!(
                        "hlc {} is {ahead_ms} ms ahead of this node's clock: no clock drift explains it",
                        event.hlc
                    ),
                ));
                continue;
            }
            match self.check_remote(event) {
                Ok((table, checked)) => {
                    self.clock.check_drift(event.hlc)?;
                    accepted.push((checked, table));
                }
                Err(e @ StoreError::UnknownTable { .. }) => {
                    rejected.push(reject(RejectKind::UnknownTable, e.to_string()))
                }
                Err(
                    e @ (StoreError::Invalid { .. }
                    | StoreError::UnknownColumn { .. }
                    | StoreError::InvalidValue { .. }),
                ) => rejected.push(reject(RejectKind::Invalid, e.to_string())),
                Err(e) => return Err(e),
            }
        }
        if accepted.is_empty() && rejected.is_empty() {
            return Ok(ApplyOutcome::default());
        }
        let _w = self.writer.lock().await;
        let mut tx = self.backend.begin().await?;
        let mut outcome = match self.apply_in(&mut tx, &accepted, false).await {
            Ok(o) => o,
            // A row the table refused: start over, one savepoint per event, and
            // quarantine the refused ones.
            Err(StoreError::RowRefused { .. }) => {
                self.backend.rollback(tx).await?;
                tx = self.backend.begin().await?;
                self.apply_in(&mut tx, &accepted, true).await?
            }
            Err(e) => return Err(e),
        };
        outcome.quarantined.splice(0..0, rejected);
        if !outcome.quarantined.is_empty() {
            self.backend
                .quarantine(&mut tx, peer, &outcome.quarantined)
                .await?;
        }
        let policies_changed = accepted.iter().any(|(e, _)| e.table_name == REGISTRY_TABLE);
        self.backend.commit(tx).await?;
        if !outcome.fresh.is_empty() || outcome.drained > 0 {
            self.committed();
        }
        if policies_changed {
            self.reload_tables().await?;
        }
        Ok(outcome)
    }

    /// Applies checked events inside `tx`. With `careful`, each event runs under a
    /// savepoint and one the table refuses is rolled back and reported in
    /// `quarantined`; without, a refusal fails the whole call.
    async fn apply_in(
        &self,
        tx: &mut B::Tx,
        accepted: &[(ChangeEvent, Arc<TableInfo>)],
        careful: bool,
    ) -> Result<ApplyOutcome> {
        let mut outcome = ApplyOutcome {
            drained: self.drain_in(tx).await?.events,
            ..ApplyOutcome::default()
        };
        let ids: Vec<Ulid> = accepted.iter().map(|(e, _)| e.event_id).collect();
        let mut seen = self.backend.existing_events(tx, &ids).await?;
        // A careful pass writes through, so a savepoint covers each event's writes.
        let mut cache = if careful {
            VersionCache::new()
        } else {
            VersionCache::buffered()
        };
        let records = accepted
            .iter()
            .filter(|(e, _)| !seen.contains(&e.event_id))
            .map(|(e, t)| (t.table_name.clone(), e.record_id));
        self.prefetch(tx, &mut cache, records).await?;
        let mut fresh = Vec::new();
        let mut vector = VersionVector::new();
        let mut overrides: HashMap<String, ConflictPolicy> = HashMap::new();
        for (event, table) in accepted {
            if !seen.insert(event.event_id) {
                outcome.duplicates += 1;
                continue;
            }
            let backup = careful.then(|| cache.clone());
            if careful {
                self.backend.savepoint(tx, SavepointOp::Set).await?;
            }
            // A policy change earlier in this batch applies to the rest of it.
            let table = match overrides.get(&table.table_name) {
                Some(policy) => Arc::new(TableInfo {
                    conflict_policy: *policy,
                    ..(**table).clone()
                }),
                None => table.clone(),
            };
            let policy_change = (table.table_name == REGISTRY_TABLE)
                .then(|| event.new_values.as_ref().and_then(parse_registry_values))
                .flatten();
            match self.apply_one(tx, event, &table, &mut cache).await {
                Ok(res) => {
                    let policy_change = policy_change.filter(|_| res.incoming_wins);
                    if careful {
                        self.backend.savepoint(tx, SavepointOp::Release).await?;
                    }
                    if res.causality == Causality::Concurrent {
                        outcome.conflicts += 1;
                    }
                    if res.incoming_wins {
                        outcome.applied += 1;
                    } else {
                        outcome.superseded += 1;
                    }
                    vector.observe(event.node_id, event.hlc);
                    outcome.fresh.push(event.hlc);
                    fresh.push((*event).clone());
                    if let Some((name, policy)) = policy_change {
                        overrides.insert(name, policy);
                    }
                }
                Err(StoreError::RowRefused { reason, .. }) if careful => {
                    self.backend.savepoint(tx, SavepointOp::RollbackTo).await?;
                    self.backend.savepoint(tx, SavepointOp::Release).await?;
                    cache = backup.unwrap_or_default();
                    outcome.quarantined.push(Rejected {
                        event_id: event.event_id.to_string(),
                        kind: RejectKind::Refused,
                        reason: format!("table {} refused the values: {reason}", table.table_name),
                        event: event.to_json(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        self.flush(tx, &mut cache).await?;
        if !fresh.is_empty() {
            self.backend.raise_vector(tx, &vector).await?;
        }
        Ok(outcome)
    }

    /// One new event: observe its HLC, settle its record, write the row.
    async fn apply_one(
        &self,
        tx: &mut B::Tx,
        event: &ChangeEvent,
        table: &Arc<TableInfo>,
        cache: &mut VersionCache,
    ) -> Result<Resolution> {
        self.clock.observe(event.hlc)?;
        let res = self.settle(tx, table, event, cache).await?;
        // Stored before a later event of the same batch settles (a buffered cache
        // flushes before conflict bookkeeping), so one that conflicts with it
        // finds its values.
        match cache.pending.as_mut() {
            Some(p) => p.events.push(event.clone()),
            None => {
                self.backend
                    .insert_events(tx, std::slice::from_ref(event))
                    .await?
            }
        }
        if !res.incoming_wins {
            return Ok(res);
        }
        if let Some(p) = cache.pending.as_mut()
            && table.table_name != REGISTRY_TABLE
        {
            p.rows.push(match &event.new_values {
                Some(values) => RowOp::Upsert {
                    table: table.clone(),
                    event_id: event.event_id,
                    row: RowWrite {
                        id: event.record_id,
                        values: values.clone(),
                        hlc: event.hlc,
                        node_id: event.node_id,
                    },
                },
                None => RowOp::Delete {
                    table: table.clone(),
                    event_id: event.event_id,
                    id: event.record_id,
                },
            });
            return Ok(res);
        }
        if table.table_name == REGISTRY_TABLE {
            self.flush(tx, cache).await?;
            let (name, policy) = event
                .new_values
                .as_ref()
                .and_then(parse_registry_values)
                .ok_or_else(|| StoreError::corrupt(REGISTRY_TABLE, "checked values vanished"))?;
            self.apply_policy(tx, &name, policy, cache).await?;
            return Ok(res);
        }
        let written = match &event.new_values {
            Some(values) => {
                self.backend
                    .upsert_row(tx, table, event.record_id, values, event.hlc, event.node_id)
                    .await
            }
            None => self.backend.delete_row(tx, table, event.record_id).await,
        };
        match written {
            Ok(()) => Ok(res),
            Err(StoreError::Db(e)) if refused_by_table(&e) => Err(StoreError::RowRefused {
                table: table.table_name.clone(),
                event_id: event.event_id,
                reason: e
                    .as_database_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
            }),
            Err(StoreError::Constraint { reason, .. }) => Err(StoreError::RowRefused {
                table: table.table_name.clone(),
                event_id: event.event_id,
                reason,
            }),
            Err(e) => Err(e),
        }
    }

    /// Reads the versions of these records into `cache` (one query per table).
    async fn prefetch(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        records: impl Iterator<Item = (String, Ulid)>,
    ) -> Result<()> {
        let mut by_table: BTreeMap<String, Vec<Ulid>> = BTreeMap::new();
        for (table, id) in records {
            if cache.get(&(table.clone(), id)).is_none() {
                by_table.entry(table).or_default().push(id);
            }
        }
        for (table, mut ids) in by_table {
            ids.sort_unstable();
            ids.dedup();
            let mut found = self.backend.versions(tx, &table, &ids).await?;
            for id in ids {
                let version = found.remove(&id);
                cache.insert((table.clone(), id), version);
            }
        }
        Ok(())
    }

    /// Issues the writes a buffered `cache` holds back: rows in order (one
    /// statement per run of one table and kind), then versions, then events.
    async fn flush(&self, tx: &mut B::Tx, cache: &mut VersionCache) -> Result<()> {
        let Some(pending) = cache.pending.as_mut().map(std::mem::take) else {
            return Ok(());
        };
        let mut run: Vec<RowOp> = Vec::new();
        for op in pending.rows {
            if run.first().is_some_and(|first| !first.joins(&op)) {
                self.write_rows(tx, std::mem::take(&mut run)).await?;
            }
            run.push(op);
        }
        if !run.is_empty() {
            self.write_rows(tx, run).await?;
        }
        let mut by_table: BTreeMap<String, Vec<(Ulid, Version)>> = BTreeMap::new();
        for ((table, id), version) in pending.versions {
            by_table.entry(table).or_default().push((id, version));
        }
        for (table, versions) in by_table {
            self.backend.put_versions(tx, &table, &versions).await?;
        }
        if !pending.events.is_empty() {
            self.backend.insert_events(tx, &pending.events).await?;
        }
        Ok(())
    }

    /// One run of row writes that [`RowOp::joins`] put together.
    async fn write_rows(&self, tx: &mut B::Tx, run: Vec<RowOp>) -> Result<()> {
        let Some(first) = run.first() else {
            return Ok(());
        };
        let table = first.table().clone();
        let (written, event_id) = match first {
            RowOp::Upsert { event_id, .. } => {
                let event_id = *event_id;
                let rows: Vec<RowWrite> = run
                    .into_iter()
                    .filter_map(|op| match op {
                        RowOp::Upsert { row, .. } => Some(row),
                        _ => None,
                    })
                    .collect();
                (self.backend.upsert_rows(tx, &table, &rows).await, event_id)
            }
            RowOp::Delete { event_id, .. } => {
                let event_id = *event_id;
                let ids: Vec<Ulid> = run
                    .iter()
                    .filter_map(|op| match op {
                        RowOp::Delete { id, .. } => Some(*id),
                        _ => None,
                    })
                    .collect();
                (self.backend.delete_rows(tx, &table, &ids).await, event_id)
            }
            RowOp::Stamp { .. } => {
                // The last stamp of a record is the one that stays.
                let mut last: HashMap<Ulid, usize> = HashMap::new();
                let mut stamps: Vec<(Ulid, Hlc, Ulid)> = Vec::new();
                for op in run {
                    if let RowOp::Stamp {
                        id, hlc, node_id, ..
                    } = op
                    {
                        match last.get(&id) {
                            Some(&i) => stamps[i] = (id, hlc, node_id),
                            None => {
                                last.insert(id, stamps.len());
                                stamps.push((id, hlc, node_id));
                            }
                        }
                    }
                }
                return self.backend.stamp_rows(tx, &table, &stamps).await;
            }
        };
        match written {
            Err(StoreError::Db(e)) if refused_by_table(&e) => Err(StoreError::RowRefused {
                table: table.table_name.clone(),
                event_id,
                reason: e
                    .as_database_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
            }),
            Err(StoreError::Constraint { reason, .. }) => Err(StoreError::RowRefused {
                table: table.table_name.clone(),
                event_id,
                reason,
            }),
            other => other,
        }
    }

    /// This node's applied vector: per origin, the highest HLC it holds.
    pub async fn vector(&self) -> Result<VersionVector> {
        self.backend.vector().await
    }

    /// Up to `limit` events that a node with applied vector `have` lacks, in the
    /// total order (oldest first). Per origin they are a contiguous run after
    /// `have`'s entry, which keeps the receiver's vector a true prefix summary.
    pub async fn events_after(&self, have: &VersionVector, limit: u32) -> Result<Vec<ChangeEvent>> {
        let mine = self.backend.vector().await?;
        let mut all = Vec::new();
        for (origin, top) in &mine.0 {
            let after = have.get(*origin);
            if *top <= after {
                continue;
            }
            all.extend(
                self.backend
                    .events_of_origin_after(*origin, after, limit)
                    .await?,
            );
        }
        all.sort_by_key(ChangeEvent::order);
        all.truncate(limit as usize);
        Ok(all)
    }

    /// Records a peer's acknowledged vector.
    pub async fn record_ack(&self, peer: Ulid, vector: &VersionVector) -> Result<()> {
        // Every write of the daemon goes through the writer lock: on SQLite two
        // writers would otherwise meet in the busy handler, which sleeps.
        let _w = self.writer.lock().await;
        self.backend.record_ack(peer, vector).await
    }

    /// Sets `synced_at` on every event that all of `peers` have acknowledged.
    /// With no peers nothing is marked: an event no peer holds is not synced.
    pub async fn mark_synced(&self, peers: &[Ulid]) -> Result<u64> {
        if peers.is_empty() {
            return Ok(0);
        }
        let mut floor: Option<VersionVector> = None;
        for peer in peers {
            let acked = self.backend.peer_progress(*peer).await?;
            floor = Some(match floor {
                None => acked,
                Some(f) => VersionVector(
                    f.0.into_iter()
                        .filter_map(|(o, h)| {
                            let other = acked.get(o);
                            let min = h.min(other);
                            (min > Hlc::ZERO).then_some((o, min))
                        })
                        .collect(),
                ),
            });
        }
        let mut marked = 0;
        let _w = self.writer.lock().await;
        for (origin, upto) in floor.unwrap_or_default().0 {
            marked += self.backend.mark_synced(origin, upto).await?;
        }
        Ok(marked)
    }

    /// How far `peer` is behind this node: the number of events this node holds
    /// that the peer has not acknowledged, and the wall time (ms) of the oldest.
    pub async fn peer_lag(&self, peer: Ulid) -> Result<(u64, Option<i64>)> {
        let acked = self.backend.peer_progress(peer).await?;
        let mine = self.backend.vector().await?;
        let (mut count, mut oldest) = (0u64, None::<i64>);
        for (origin, top) in &mine.0 {
            let after = acked.get(*origin);
            if *top <= after {
                continue;
            }
            let (n, first) = self.backend.lag_of_origin(*origin, after).await?;
            count += n;
            if let Some(w) = first {
                oldest = Some(oldest.map_or(w, |o| o.min(w)));
            }
        }
        Ok((count, oldest))
    }

    pub async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        self.backend.peer_progress(peer).await
    }

    pub async fn count_quarantined(&self) -> Result<u64> {
        self.backend.count_quarantined().await
    }

    pub async fn count_unsynced(&self) -> Result<u64> {
        self.backend.count_unsynced().await
    }

    pub async fn pending_captures(&self) -> Result<u64> {
        self.backend.pending_captures().await
    }

    pub async fn has_captures(&self) -> Result<bool> {
        self.backend.has_captures().await
    }

    pub async fn close(&self) {
        self.backend.close().await;
    }
}

/// Whether a database error means the table refused the row's values (a
/// constraint, or a value of the wrong type), as opposed to the database failing.
fn refused_by_table(e: &sqlx::Error) -> bool {
    use sqlx::error::ErrorKind;
    let Some(db) = e.as_database_error() else {
        return false;
    };
    matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) || db.code().is_some_and(|c| c.starts_with("22"))
        || db.message().contains("datatype mismatch")
}

/// Whether a declared column type can hold a ULID as text.
fn is_ulid_text_type(ty: &str) -> bool {
    let t = ty.trim().to_ascii_lowercase();
    t == "text"
        || t == "char(26)"
        || t == "character(26)"
        || t == "varchar(26)"
        || t == "character varying(26)"
}
