//! The store's algorithms, written once over [`Backend`] primitives: draining the
//! capture queue, stamped writes through the API, applying remote events, reading
//! the log after a version vector, and progress bookkeeping.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde_json::{Value, json};
use tidemark_hlc::{Clock, Hlc};
use tokio::sync::{Mutex, watch};
use ulid::Ulid;

use crate::backend::Backend;
use crate::error::{Result, StoreError};
use crate::ident::Ident;
use crate::model::{
    ApplyOutcome, Capture, ChangeEvent, ConflictPolicy, DrainOutcome, Operation, TableInfo, Values,
    Version, VersionVector, parse_ulid,
};
use crate::rules::resolve;

/// Names reserved for Tidemark's own tables.
const RESERVED_PREFIX: &str = "tidemark_";
/// Columns Tidemark adds to every replicated table (the seed's entity additions).
pub const STAMP_COLUMNS: [&str; 2] = ["node_id", "hlc_modified"];
/// How many captures one drain step stamps per query.
const DRAIN_CHUNK: u32 = 512;

/// A store over one backend.
pub struct Engine<B: Backend> {
    backend: B,
    node_id: Ulid,
    clock: Arc<Clock>,
    tables: RwLock<HashMap<String, Arc<TableInfo>>>,
    /// Serialises the daemon's write transactions, so this node's events enter the
    /// log in HLC order per origin (the invariant version vectors rely on).
    writer: Mutex<()>,
    /// Bumped after every commit that added events, so senders wake at once.
    commits: watch::Sender<u64>,
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
            tables: RwLock::new(HashMap::new()),
            writer: Mutex::new(()),
            commits: watch::Sender::new(0),
        };
        let persisted = engine.backend.max_hlc().await?;
        engine.clock.seed(persisted)?;
        engine.reload_tables().await?;
        Ok(engine)
    }

    pub fn backend(&self) -> &B {
        &self.backend
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
        let loaded = self.backend.load_tables().await?;
        let map = loaded
            .into_iter()
            .map(|t| (t.table_name.clone(), Arc::new(t)))
            .collect();
        *self.tables.write().unwrap_or_else(|p| p.into_inner()) = map;
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
    /// Registering again refreshes the column list and triggers and sets the policy.
    pub async fn register_table(&self, name: &str, policy: ConflictPolicy) -> Result<TableInfo> {
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
        let mut columns = vec![pk.clone()];
        for (col, ty) in &shape.columns {
            if col == pk || STAMP_COLUMNS.contains(&col.as_str()) {
                continue;
            }
            Ident::parse("column name", col).map_err(|_| {
                unregistrable(format!(
                    "column {col:?} is not a plain identifier (letters, digits, _)"
                ))
            })?;
            let upper = ty.to_ascii_uppercase();
            if upper.contains("BLOB") || upper.contains("BYTEA") {
                return Err(unregistrable(format!(
                    "column {col} has binary type {ty}, which is not replicated yet"
                )));
            }
            columns.push(col.clone());
        }
        let existing = self.table(name).ok();
        let info = TableInfo {
            datatype_id: existing
                .as_ref()
                .map(|t| t.datatype_id)
                .unwrap_or_else(Ulid::generate),
            table_name: name.to_owned(),
            primary_key: pk.clone(),
            columns,
            conflict_policy: policy,
        };
        {
            let _w = self.writer.lock().await;
            self.backend.register(&info, existing.is_none()).await?;
        }
        self.reload_tables().await?;
        Ok(info)
    }

    /// Sets a registered table's conflict policy.
    pub async fn set_policy(&self, table: &str, policy: ConflictPolicy) -> Result<()> {
        self.table(table)?;
        self.backend.set_policy(table, policy).await?;
        self.reload_tables().await
    }

    /// Stamps captured direct writes into `change_events`, oldest first, until the
    /// queue is empty.
    pub async fn drain(&self) -> Result<DrainOutcome> {
        let _w = self.writer.lock().await;
        let mut tx = self.backend.begin().await?;
        let outcome = self.drain_in(&mut tx).await?;
        if outcome.events > 0 || outcome.unchanged > 0 {
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
            let mut versions: HashMap<(String, Ulid), Option<Version>> = HashMap::new();
            let mut events = Vec::with_capacity(captures.len());
            for capture in captures {
                match self.stamp_capture(tx, capture, &mut versions).await? {
                    Some(event) => events.push(event),
                    None => outcome.unchanged += 1,
                }
            }
            if !events.is_empty() {
                let mut own = VersionVector::new();
                for e in &events {
                    own.observe(e.node_id, e.hlc);
                }
                self.backend.insert_events(tx, &events).await?;
                self.backend.raise_vector(tx, &own).await?;
            }
            outcome.events += events.len() as u64;
            self.backend.delete_captures(tx, &seqs).await?;
            if seqs.len() < DRAIN_CHUNK as usize {
                break;
            }
        }
        Ok(outcome)
    }

    /// Turns one capture into an event (None when the capture changed nothing).
    async fn stamp_capture(
        &self,
        tx: &mut B::Tx,
        capture: Capture,
        versions: &mut HashMap<(String, Ulid), Option<Version>>,
    ) -> Result<Option<ChangeEvent>> {
        let table = self.table(&capture.table_name).map_err(|_| {
            StoreError::corrupt(
                "tidemark_capture_queue",
                format!(
                    "capture {} is for table {:?}, which is not registered",
                    capture.seq, capture.table_name
                ),
            )
        })?;
        let record_id = parse_ulid("captured record id", &capture.record_id).map_err(|e| {
            StoreError::corrupt(
                "tidemark_capture_queue",
                format!("capture {}: {e}", capture.seq),
            )
        })?;
        let project = |v: Option<Values>| {
            v.map(|m| {
                m.into_iter()
                    .filter(|(k, _)| table.has_column(k))
                    .collect::<Values>()
            })
        };
        let old_values = project(capture.old_values);
        let new_values = project(capture.new_values);
        if capture.operation == Operation::Update && old_values == new_values {
            return Ok(None);
        }
        let key = (table.table_name.clone(), record_id);
        if !versions.contains_key(&key) {
            let mut found = self
                .backend
                .versions(tx, &table.table_name, &[record_id])
                .await?;
            versions.insert(key.clone(), found.remove(&record_id));
        }
        let local = versions.get(&key).cloned().flatten();
        let event = self.local_event(
            &table,
            record_id,
            capture.operation,
            old_values,
            new_values,
            local.as_ref(),
        );
        let version = event.version()?;
        self.backend
            .put_version(tx, &table.table_name, record_id, &version)
            .await?;
        if capture.operation != Operation::Delete {
            self.backend
                .stamp_row(tx, &table, record_id, event.hlc, self.node_id)
                .await?;
        }
        versions.insert(key, Some(version));
        Ok(Some(event))
    }

    /// A new event of this node for a write on top of `local`.
    fn local_event(
        &self,
        table: &TableInfo,
        record_id: Ulid,
        operation: Operation,
        old_values: Option<Values>,
        new_values: Option<Values>,
        local: Option<&Version>,
    ) -> ChangeEvent {
        let hlc = self.clock.now();
        let mut vv = local.map(|v| v.vv.clone()).unwrap_or_default();
        vv.observe(self.node_id, hlc);
        ChangeEvent {
            event_id: Ulid::generate(),
            hlc,
            wall_ms: self.clock.wall_ms(),
            node_id: self.node_id,
            table_name: table.table_name.clone(),
            record_id,
            operation,
            action: None,
            user_id: None,
            old_values,
            new_values,
            metadata: Some(json!({ "vv": vv.to_json() })),
        }
    }

    /// Checks `values` against a table: known columns only, primary key (if given)
    /// equal to `id`. Returns the values with the primary key set.
    fn checked_values(table: &TableInfo, id: Ulid, values: &Values) -> Result<Values> {
        let mut out = Values::new();
        for (k, v) in values {
            if STAMP_COLUMNS.contains(&k.as_str()) {
                return Err(StoreError::invalid(
                    format!("column {k}"),
                    "is maintained by Tidemark and cannot be written",
                ));
            }
            if !table.has_column(k) {
                return Err(StoreError::UnknownColumn {
                    table: table.table_name.clone(),
                    column: crate::model::truncate(k),
                });
            }
            if k == &table.primary_key && v.as_str() != Some(id.to_string().as_str()) {
                return Err(StoreError::invalid(
                    format!("column {k}"),
                    format!("primary key value {v} does not match record id {id}"),
                ));
            }
            out.insert(k.clone(), v.clone());
        }
        out.insert(table.primary_key.clone(), Value::String(id.to_string()));
        Ok(out)
    }

    /// Writes a record through the API (insert, or update of the given columns)
    /// and returns its event.
    pub async fn put(&self, table: &str, id: Ulid, values: &Values) -> Result<ChangeEvent> {
        let table = self.table(table)?;
        let values = Self::checked_values(&table, id, values)?;
        let _w = self.writer.lock().await;
        let mut tx = self.backend.begin().await?;
        self.drain_in(&mut tx).await?;
        let local = self
            .backend
            .versions(&mut tx, &table.table_name, &[id])
            .await?
            .remove(&id);
        let old = self.backend.rows(&mut tx, &table, &[id]).await?.remove(&id);
        let op = if old.is_some() {
            Operation::Update
        } else {
            Operation::Insert
        };
        // An update writes the whole row (current values overlaid with the given
        // ones): an INSERT .. ON CONFLICT checks NOT NULL on the proposed row first.
        let row = match &old {
            Some(current) => {
                let mut full = current.clone();
                full.extend(values);
                full
            }
            None => values,
        };
        let mut event = self.local_event(&table, id, op, old, None, local.as_ref());
        self.backend
            .upsert_row(&mut tx, &table, id, &row, event.hlc, self.node_id)
            .await?;
        event.new_values = self.backend.rows(&mut tx, &table, &[id]).await?.remove(&id);
        self.commit_local(tx, &table, event).await
    }

    /// Deletes a record through the API; `None` when there was no such row.
    pub async fn delete(&self, table: &str, id: Ulid) -> Result<Option<ChangeEvent>> {
        let table = self.table(table)?;
        let _w = self.writer.lock().await;
        let mut tx = self.backend.begin().await?;
        let drained = self.drain_in(&mut tx).await?;
        let Some(old) = self.backend.rows(&mut tx, &table, &[id]).await?.remove(&id) else {
            if drained.events > 0 || drained.unchanged > 0 {
                self.backend.commit(tx).await?;
            }
            if drained.events > 0 {
                self.committed();
            }
            return Ok(None);
        };
        let local = self
            .backend
            .versions(&mut tx, &table.table_name, &[id])
            .await?
            .remove(&id);
        let event = self.local_event(
            &table,
            id,
            Operation::Delete,
            Some(old),
            None,
            local.as_ref(),
        );
        self.backend.delete_row(&mut tx, &table, id).await?;
        self.commit_local(tx, &table, event).await.map(Some)
    }

    async fn commit_local(
        &self,
        mut tx: B::Tx,
        table: &TableInfo,
        event: ChangeEvent,
    ) -> Result<ChangeEvent> {
        let version = event.version()?;
        self.backend
            .put_version(&mut tx, &table.table_name, event.record_id, &version)
            .await?;
        self.backend
            .insert_events(&mut tx, std::slice::from_ref(&event))
            .await?;
        let mut own = VersionVector::new();
        own.observe(self.node_id, event.hlc);
        self.backend.raise_vector(&mut tx, &own).await?;
        self.backend.commit(tx).await?;
        self.committed();
        Ok(event)
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

    /// Validates a remote event against the registry before anything is written.
    fn check_remote(&self, event: &ChangeEvent) -> Result<Arc<TableInfo>> {
        let table = self.table(&event.table_name)?;
        let field = |f: &str| format!("event {} {f}", event.event_id);
        match (event.operation, &event.new_values) {
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
            _ => {}
        }
        for values in [&event.old_values, &event.new_values].into_iter().flatten() {
            for (k, v) in values {
                if !table.has_column(k) {
                    return Err(StoreError::UnknownColumn {
                        table: table.table_name.clone(),
                        column: crate::model::truncate(k),
                    });
                }
                if k == &table.primary_key && v.as_str() != Some(&event.record_id.to_string()) {
                    return Err(StoreError::invalid(
                        field("values"),
                        format!(
                            "primary key {k} = {v} does not match record id {}",
                            event.record_id
                        ),
                    ));
                }
            }
        }
        if let Some(meta) = &event.metadata
            && !meta.is_object()
        {
            return Err(StoreError::invalid(
                field("metadata"),
                "must be a JSON object",
            ));
        }
        event.vector()?;
        Ok(table)
    }

    /// Applies events from a peer in one transaction: idempotent (an event id
    /// already present changes nothing), last-write-wins per record by
    /// `(hlc, node_id, event_id)`, every new event kept in `change_events`. Events of
    /// one origin must come in ascending HLC order. Nothing is written when any
    /// event is invalid or too far in the future.
    pub async fn apply_remote(&self, events: &[ChangeEvent]) -> Result<ApplyOutcome> {
        let mut tables = Vec::with_capacity(events.len());
        let mut last_per_origin: BTreeMap<Ulid, Hlc> = BTreeMap::new();
        for event in events {
            tables.push(self.check_remote(event)?);
            let last = last_per_origin.entry(event.node_id).or_insert(Hlc::ZERO);
            if event.hlc < *last {
                return Err(StoreError::invalid(
                    format!("event {} hlc", event.event_id),
                    format!(
                        "events of origin {} out of order: {} after {}",
                        event.node_id, event.hlc, last
                    ),
                ));
            }
            *last = event.hlc;
            self.clock.check_drift(event.hlc)?;
        }
        let mut outcome = ApplyOutcome::default();
        if events.is_empty() {
            return Ok(outcome);
        }
        let _w = self.writer.lock().await;
        let mut tx = self.backend.begin().await?;
        outcome.drained = self.drain_in(&mut tx).await?.events;
        let ids: Vec<Ulid> = events.iter().map(|e| e.event_id).collect();
        let mut seen = self.backend.existing_events(&mut tx, &ids).await?;
        let mut versions: HashMap<(String, Ulid), Option<Version>> = HashMap::new();
        let mut fresh = Vec::new();
        let mut vector = VersionVector::new();
        for (event, table) in events.iter().zip(tables) {
            if !seen.insert(event.event_id) {
                outcome.duplicates += 1;
                continue;
            }
            self.clock.observe(event.hlc)?;
            let key = (table.table_name.clone(), event.record_id);
            if !versions.contains_key(&key) {
                let mut found = self
                    .backend
                    .versions(&mut tx, &table.table_name, &[event.record_id])
                    .await?;
                versions.insert(key.clone(), found.remove(&event.record_id));
            }
            let local = versions.get(&key).cloned().flatten();
            let resolution = resolve(local.as_ref(), &event.version()?);
            if resolution.incoming_wins {
                match &event.new_values {
                    Some(values) => {
                        self.backend
                            .upsert_row(
                                &mut tx,
                                &table,
                                event.record_id,
                                values,
                                event.hlc,
                                event.node_id,
                            )
                            .await?
                    }
                    None => {
                        self.backend
                            .delete_row(&mut tx, &table, event.record_id)
                            .await?
                    }
                }
                outcome.applied += 1;
            } else {
                outcome.superseded += 1;
            }
            if local.as_ref() != Some(&resolution.next) {
                self.backend
                    .put_version(
                        &mut tx,
                        &table.table_name,
                        event.record_id,
                        &resolution.next,
                    )
                    .await?;
            }
            versions.insert(key, Some(resolution.next));
            vector.observe(event.node_id, event.hlc);
            fresh.push(event.clone());
        }
        if !fresh.is_empty() {
            self.backend.insert_events(&mut tx, &fresh).await?;
            self.backend.raise_vector(&mut tx, &vector).await?;
        }
        if !fresh.is_empty() || outcome.drained > 0 {
            self.backend.commit(tx).await?;
            self.committed();
        }
        Ok(outcome)
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
        for (origin, upto) in floor.unwrap_or_default().0 {
            marked += self.backend.mark_synced(origin, upto).await?;
        }
        Ok(marked)
    }

    pub async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        self.backend.peer_progress(peer).await
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

/// Whether a declared column type can hold a ULID as text.
fn is_ulid_text_type(ty: &str) -> bool {
    let t = ty.trim().to_ascii_lowercase();
    t == "text"
        || t == "char(26)"
        || t == "character(26)"
        || t == "varchar(26)"
        || t == "character varying(26)"
}
