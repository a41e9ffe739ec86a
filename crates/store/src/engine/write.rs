//! Local writes through the API and conflict resolutions, with group commit.

use super::place::{Placing, Winner};
use super::*;

/// The most writes one group commit holds: writes queued beyond it wait for
/// the next transaction, so a steady stream of callers cannot keep one
/// transaction open.
pub(super) const MAX_GROUP: usize = 256;

impl<B: Backend> Engine<B> {
    /// The class of a column a write may set (known, replicated, not a stamp).
    pub(super) fn writable_column(table: &TableInfo, column: &str) -> Result<ColumnType> {
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
    /// Names and values may be borrowed (copied as they are read) or owned
    /// (moved into the result).
    pub(super) fn checked_values<K, V>(
        table: &TableInfo,
        id: Ulid,
        values: impl IntoIterator<Item = (K, V)>,
        read: impl Fn(ColumnType, V) -> std::result::Result<Value, String>,
    ) -> Result<Values>
    where
        K: AsRef<str> + Into<String>,
    {
        let mut out = Values::new();
        let key = id.to_string();
        for (k, v) in values {
            let name = k.as_ref();
            let ty = Self::writable_column(table, name)?;
            let v = read(ty, v).map_err(|reason| StoreError::InvalidValue {
                table: table.table_name.clone(),
                column: name.to_owned(),
                class: ty.to_string(),
                reason,
            })?;
            if name == table.primary_key && v.as_str() != Some(key.as_str()) {
                return Err(StoreError::invalid(
                    format!("column {name}"),
                    format!("primary key value {v} does not match record id {id}"),
                ));
            }
            out.insert(k.into(), v);
        }
        out.insert(table.primary_key.clone(), Value::String(key));
        Ok(out)
    }

    /// Values in the log's form (see [`crate::value`]), checked against the table.
    pub(super) fn canonical_values(table: &TableInfo, id: Ulid, values: &Values) -> Result<Values> {
        Self::checked_values(table, id, values, |ty, v| ty.check(v))
    }

    /// [`Engine::canonical_values`] of values the caller gives up: names and
    /// canonical strings move into the result instead of being copied.
    pub(super) fn canonical_values_owned(
        table: &TableInfo,
        id: Ulid,
        values: Values,
    ) -> Result<Values> {
        Self::checked_values(table, id, values, |ty, v| ty.check_owned(v))
    }

    /// Values as an application wrote them, checked against the table.
    pub(super) fn api_values(table: &TableInfo, id: Ulid, values: &RawValues) -> Result<Values> {
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
        self.own_writes_released().await;
        let event = self.write_queued(table.clone(), id, Some(values)).await?;
        event.ok_or_else(|| StoreError::corrupt(&table.table_name, "a put wrote no event"))
    }

    /// Writes a record through the API (insert, or update of the given columns)
    /// with values as an application wrote them, and returns its event.
    pub async fn put_raw(
        self: &Arc<Self>,
        table: &str,
        id: Ulid,
        values: RawValues,
    ) -> Result<ChangeEvent> {
        let table = self.table(table)?;
        // The values as given go once they are typed: a large value is held
        // as few times as possible while the write waits and runs.
        let typed = Self::api_values(&table, id, &values)?;
        drop(values);
        let values = typed;
        self.own_writes_released().await;
        let event = self.write_queued(table.clone(), id, Some(values)).await?;
        event.ok_or_else(|| StoreError::corrupt(&table.table_name, "a put wrote no event"))
    }

    /// Deletes a record through the API; `None` when there was no such row.
    pub async fn delete(self: &Arc<Self>, table: &str, id: Ulid) -> Result<Option<ChangeEvent>> {
        let table = self.table(table)?;
        self.own_writes_released().await;
        self.write_queued(table, id, None).await
    }

    /// One local write in its own transaction, the writer lock held: `values`
    /// upserts (overlaid on the current row), `None` deletes (nothing when there
    /// is no row).
    pub(super) async fn write_alone(
        &self,
        table: &TableInfo,
        id: Ulid,
        values: Option<Values>,
    ) -> Result<Option<ChangeEvent>> {
        let mut tx = self.begin_tx().await?;
        let drained = self.drain_in(&mut tx).await?;
        let mut cache = VersionCache::new();
        match self
            .write_in(&mut tx, &mut cache, table, id, values)
            .await?
        {
            Some(event) => {
                self.finish_blocks(&mut tx, &mut cache).await?;
                self.commit_local(tx, &event).await?;
                Ok(Some(event))
            }
            None => {
                if drained.events > 0 || !drained.set_aside.is_empty() {
                    self.commit_tx(tx).await?;
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
    /// would be alone, in queue order; writes queued while the group runs join
    /// it before it commits (up to [`MAX_GROUP`]), so a caller whose write
    /// arrives mid-transaction shares the next commit instead of waiting for a
    /// commit of its own. If any of them fails, the group is rolled back and
    /// each write runs in its own transaction, so one caller's error is never
    /// another's (a group of one answers with its error at once). The group runs in its own task: a caller that goes away does
    /// not abandon the writes of the others.
    pub(super) async fn write_queued(
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
        // Requests other tasks are decoding this moment queue theirs first
        // and share this commit.
        tokio::task::yield_now().await;
        let guard = self.writer.clone().lock_owned().await;
        let group: Vec<QueuedWrite> = {
            let mut queue = self.queue();
            let n = queue.len().min(MAX_GROUP);
            queue.drain(..n).collect()
        };
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

    pub(super) fn queue(&self) -> std::sync::MutexGuard<'_, Vec<QueuedWrite>> {
        // The queue only holds plain data: a panic elsewhere cannot leave it torn.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) async fn write_group(&self, mut group: Vec<QueuedWrite>) {
        match self.try_group(&mut group).await {
            Ok(events) => {
                for (w, event) in group.into_iter().zip(events) {
                    let _ = w.reply.send(Ok(event));
                }
                return;
            }
            Err(e) if group.len() == 1 => {
                // A group of one ran the steps `write_alone` would: its error
                // is the write's own.
                let w = group.remove(0);
                let _ = w.reply.send(Err(e));
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, writes = group.len(), "grouped write failed; writing one by one");
            }
        }
        for w in group {
            let result = self.write_alone(&w.table, w.id, w.values).await;
            let _ = w.reply.send(result);
        }
    }

    /// The group in one transaction; `group` grows by the writes that join it.
    pub(super) async fn try_group(
        &self,
        group: &mut Vec<QueuedWrite>,
    ) -> Result<Vec<Option<ChangeEvent>>> {
        let mut tx = self.begin_tx().await?;
        match self.group_in(&mut tx, group).await {
            Ok((results, own)) => {
                if !own.0.is_empty() {
                    self.raise_vector(&mut tx, &own).await?;
                }
                self.commit_tx(tx).await?;
                self.committed();
                Ok(results)
            }
            Err(e) => {
                self.backend.rollback(tx).await?;
                Err(e)
            }
        }
    }

    pub(super) async fn group_in(
        &self,
        tx: &mut B::Tx,
        group: &mut Vec<QueuedWrite>,
    ) -> Result<(Vec<Option<ChangeEvent>>, VersionVector)> {
        self.drain_in(tx).await?;
        let mut cache = VersionCache::new();
        let mut own = VersionVector::new();
        let mut results = Vec::with_capacity(group.len());
        loop {
            for w in &group[results.len()..] {
                let event = self
                    .write_in(tx, &mut cache, &w.table, w.id, w.values.clone())
                    .await?;
                if let Some(e) = &event {
                    self.insert_events(tx, &[e], &EventExtras::default())
                        .await?;
                    own.observe(self.node_id, e.hlc);
                }
                results.push(event);
            }
            if !self.join_queued(group) {
                break;
            }
        }
        self.finish_blocks(tx, &mut cache).await?;
        Ok((results, own))
    }

    /// Moves writes queued since the group formed into it, up to
    /// [`MAX_GROUP`] writes in all; whether any joined.
    fn join_queued(&self, group: &mut Vec<QueuedWrite>) -> bool {
        let room = MAX_GROUP.saturating_sub(group.len());
        if room == 0 {
            return false;
        }
        let mut queue = self.queue();
        let joining = queue.len().min(room);
        group.extend(queue.drain(..joining));
        joining > 0
    }

    /// The write itself, inside `tx`: row, version and conflicts (the event is
    /// returned, not stored). `None`: a delete of an absent row.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_in(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        table: &TableInfo,
        id: Ulid,
        values: Option<Values>,
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
                let mut event = self.local_event(table, id, op, None, None, local.as_ref(), None);
                self.backend
                    .upsert_row(tx, table, id, &row, event.hlc, self.node_id)
                    .await?;
                drop(row);
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
                if old.is_none() {
                    return Ok(None);
                }
                let event = self.local_event(
                    table,
                    id,
                    Operation::Delete,
                    None,
                    None,
                    local.as_ref(),
                    None,
                );
                // The version says deleted before the row goes, so its children
                // are blocked by a delete that wins, as on the nodes it reaches.
                self.settle(tx, table, &event, cache).await?;
                if self.constrained(table) {
                    let arc = self.table(&table.table_name)?;
                    self.unplace(tx, cache, vec![(arc, id)]).await?;
                } else {
                    self.backend.delete_row(tx, table, id).await?;
                }
                self.note_written(cache, table, id);
                return Ok(Some(event));
            }
        };
        self.settle(tx, table, &event, cache).await?;
        self.note_written(cache, table, id);
        Ok(Some(event))
    }

    pub(super) async fn commit_local(&self, mut tx: B::Tx, event: &ChangeEvent) -> Result<()> {
        self.insert_events(&mut tx, &[event], &EventExtras::default())
            .await?;
        let mut own = VersionVector::new();
        own.observe(self.node_id, event.hlc);
        self.raise_vector(&mut tx, &own).await?;
        self.commit_tx(tx).await?;
        self.committed();
        Ok(())
    }

    /// Resolves an open conflict with a new write that has seen both sides: it
    /// replicates like any write and closes the conflict on every node. The
    /// write is the greatest of the record's, so it is placed even where another
    /// record holds a value it needs (keeping the side that lost a UNIQUE clash
    /// displaces the holder, everywhere). For a constraint clash, keeping the
    /// winner deletes the blocked record; merged values overlay the blocked
    /// side's. With `expected_winner`, the resolution is a compare-and-set: it is
    /// refused, changing nothing, when the conflict's winner is no longer the one
    /// the operator saw. Fails, changing nothing, for an unknown or already
    /// resolved conflict, or values the table's columns do not take.
    pub async fn resolve_conflict(
        &self,
        conflict_id: Ulid,
        choice: ResolveChoice,
        resolved_by: &str,
        note: Option<&str>,
        expected_winner: Option<Ulid>,
    ) -> Result<ChangeEvent> {
        self.own_writes_released().await;
        let _w = self.writer.lock().await;
        let mut tx = self.begin_tx().await?;
        let drained = self.drain_in(&mut tx).await?;
        let resolved = self
            .resolve_in(
                &mut tx,
                conflict_id,
                &choice,
                resolved_by,
                note,
                expected_winner,
            )
            .await;
        match resolved {
            Ok(event) => {
                self.commit_local(tx, &event).await?;
                Ok(event)
            }
            Err(e) => {
                self.backend.rollback(tx).await?;
                if drained.events > 0 {
                    // The drained captures are drained again by the next write.
                    tracing::debug!("a refused resolution rolled back drained captures");
                }
                Err(e)
            }
        }
    }

    /// [`Engine::resolve_conflict`] inside `tx`, under the writer lock: the
    /// conflict read here cannot change before commit.
    async fn resolve_in(
        &self,
        tx: &mut B::Tx,
        conflict_id: Ulid,
        choice: &ResolveChoice,
        resolved_by: &str,
        note: Option<&str>,
        expected_winner: Option<Ulid>,
    ) -> Result<ChangeEvent> {
        let conflict = self
            .backend
            .conflict_in(tx, conflict_id)
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
        if let Some(expected) = expected_winner
            && expected != conflict.winner.event_id
        {
            return Err(StoreError::StaleResolution {
                conflict_id,
                expected,
                current: conflict.winner.event_id,
            });
        }
        let table = self.table(&conflict.table_name)?;
        let id = conflict.record_id;
        let mut cache = VersionCache::new();
        let local = self.cached_version(tx, &mut cache, &table, id).await?;
        let row = self.backend.rows(tx, &table, &[id]).await?.remove(&id);
        let canonical = |v: &Option<Values>| {
            v.as_ref()
                .map(|v| Self::canonical_values(&table, id, v))
                .transpose()
        };
        let constraint = conflict.kind != ConflictKind::Version;
        let loser = canonical(&conflict.loser.values)?;
        let values = match choice {
            ResolveChoice::KeepLocal if constraint => None,
            ResolveChoice::KeepLocal => canonical(&conflict.winner.values)?,
            ResolveChoice::KeepRemote => loser,
            ResolveChoice::Merged(given) => {
                // Over the blocked write's values for a clash; over the shown
                // version's otherwise (this node may have no row for it: a
                // blocked record, a delete).
                let shown = if constraint {
                    loser
                } else {
                    canonical(&conflict.winner.values)?
                };
                let mut base = shown.unwrap_or_default();
                base.extend(Self::api_values(&table, id, given)?);
                // An event carries the whole row.
                for col in &table.columns {
                    base.entry(col.clone()).or_insert(Value::Null);
                }
                Some(base)
            }
        };
        let operation = match (&values, &row) {
            (None, _) => Operation::Delete,
            (Some(_), Some(_)) => Operation::Update,
            (Some(_), None) => Operation::Insert,
        };
        let mut resolution = json!({
            "kind": choice.kind(),
            "by": resolved_by,
            "note": note,
            "conflict_id": conflict_id.to_string(),
        });
        if constraint {
            // The decided clash travels with its resolution (every node records
            // it, the same way); its sides' values only while the event fits.
            let full = conflict.clash_json(true);
            let room = self
                .max_event_bytes()
                .saturating_sub(Self::event_bytes(values.as_ref()));
            resolution["clash"] = if crate::model::json_len(&full) <= room {
                full
            } else {
                conflict.clash_json(false)
            };
        }
        let event = self.local_event(
            &table,
            id,
            operation,
            None,
            values.clone(),
            local.as_ref(),
            Some(("resolve", resolution)),
        );
        let bytes = Self::event_bytes(event.new_values.as_ref());
        if bytes > self.max_event_bytes() {
            return Err(StoreError::TooLarge {
                table: table.table_name.clone(),
                record_id: id.to_string(),
                bytes,
                limit: self.max_event_bytes(),
            });
        }
        self.settle(tx, &table, &event, &mut cache).await?;
        let winner = Winner {
            order: event.order(),
            values,
        };
        self.place(tx, &mut cache, &table, id, &winner, Placing::New)
            .await?;
        self.finish_blocks(tx, &mut cache).await?;
        Ok(event)
    }
}
