//! Applying batches of remote events: validation before the transaction,
//! idempotent apply, refusals kept per event.

use super::*;

/// An event stamped further ahead of the local clock than this is quarantined:
/// no clock drift explains it (a drift within it only delays the batch).
const FAR_FUTURE_MS: i64 = 86_400_000;
/// The latest wall time an event may carry: the end of the year 9999 (SQLite's
/// date functions, and so `change_events.wall_timestamp`, stop there).
const MAX_WALL_MS: i64 = 253_402_300_799_999;

impl<B: Backend> Engine<B> {
    /// Validates a remote event against the registry and the strictest backend
    /// before anything is written; returns its table and the event with its values
    /// in canonical form (old values are not kept: events are state-based).
    pub(super) fn check_remote(
        &self,
        event: &ChangeEvent,
    ) -> Result<(Arc<TableInfo>, ChangeEvent)> {
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
    pub(super) async fn apply_in(
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
    pub(super) async fn apply_one(
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
}
