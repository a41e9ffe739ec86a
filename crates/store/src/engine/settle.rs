//! Settling an event on its record: the version rules, conflict bookkeeping,
//! and the write buffer that issues rows, versions and events in bulk.

use super::*;

impl<B: Backend> Engine<B> {
    /// The record's version, read once per transaction and kept current in `cache`.
    pub(super) async fn cached_version(
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
    pub(super) async fn settle(
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
    pub(super) async fn track_conflicts(
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
                kind: ConflictKind::Version,
                detail: None,
                winner_table: None,
                winner_record_id: None,
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
    pub(super) fn local_event(
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

    /// Reads the versions of these records into `cache` (one query per table).
    pub(super) async fn prefetch(
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
    pub(super) async fn flush(&self, tx: &mut B::Tx, cache: &mut VersionCache) -> Result<()> {
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
    pub(super) async fn write_rows(&self, tx: &mut B::Tx, run: Vec<RowOp>) -> Result<()> {
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
}

/// Whether a database error means the table refused the row's values (a
/// constraint, or a value of the wrong type), as opposed to the database failing.
pub(super) fn refused_by_table(e: &sqlx::Error) -> bool {
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
    ) || db.code().is_some_and(|c| {
        // PostgreSQL: a data exception (class 22), or an exception raised by
        // an application's trigger (P0001). SQLite: any constraint code (19 and
        // its extended forms, a trigger's RAISE(ABORT) among them).
        c.starts_with("22") || c == "P0001" || c.parse::<i64>().is_ok_and(|n| n & 0xff == 19)
    }) || db.message().contains("datatype mismatch")
}
