//! Applying batches of remote events: validation before the transaction,
//! idempotent apply, refusals kept per event.

use super::place::{Placing, Winner};
use super::*;

/// An event stamped further ahead of the local clock than this is reported as
/// far in the future (no clock drift explains it); its origin is held either way.
const FAR_FUTURE_MS: i64 = 86_400_000;
/// When to retry an origin held for a malformed event, or an unknown table or
/// column (a schema change in flight): the sender backs off from here.
const HOLD_INVALID_MS: u64 = 5_000;
/// When to retry an origin its sender may not relay (a configuration to fix).
const HOLD_NOT_ALLOWED_MS: u64 = 60_000;
/// The latest wall time an event may carry: the end of the year 9999 (SQLite's
/// date functions, and so `change_events.wall_timestamp`, stop there).
const MAX_WALL_MS: i64 = 253_402_300_799_999;

/// A remote event checked against the registry ahead of its transaction
/// ([`Engine::check_event`]): its values in canonical form and its table, or
/// why the event cannot be taken (kept for its turn in
/// [`Engine::apply_from`], which holds its origin there).
#[derive(Debug)]
pub struct CheckedEvent {
    event: ChangeEvent,
    table: Result<Arc<TableInfo>>,
    /// The log's text of the checked values and metadata, rendered with the
    /// check (see [`EventText`]).
    text: Option<EventText>,
}

impl CheckedEvent {
    /// The event (its values canonical when the check passed).
    pub fn event(&self) -> &ChangeEvent {
        &self.event
    }
}

/// Batches at least this large are freed off the write path.
const RELEASE_ELSEWHERE_EVENTS: usize = 256;

/// Frees a committed batch's events (thousands of small allocations: values,
/// metadata, rendered text) on the runtime's blocking pool, so the session
/// that applied them goes on to its acks and its next transaction at once.
/// Small batches, and calls outside a runtime, free in place.
fn release_elsewhere<T: Send + 'static>(batch: T, events: usize) {
    if events < RELEASE_ELSEWHERE_EVENTS {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(move || drop(batch));
    }
}

impl<B: Backend> Engine<B> {
    /// Checks a remote event ahead of its transaction (see [`CheckedEvent`]).
    /// Pure: no database is read, so a receiver checks the next batch while
    /// the current one is written.
    pub fn check_event(&self, mut event: ChangeEvent) -> CheckedEvent {
        let table = self.check_remote(&mut event);
        let text = table.is_ok().then(|| EventText::of(&event));
        CheckedEvent { event, table, text }
    }

    /// Validates a remote event against the registry and the strictest backend
    /// before anything is written; returns its table and leaves the event with
    /// its values in canonical form (old values are not kept: events are
    /// state-based). The values move into their canonical form, not copied; on
    /// an error the event keeps its identity (ids, HLC, metadata), which is
    /// all a hold needs.
    fn check_remote(&self, event: &mut ChangeEvent) -> Result<Arc<TableInfo>> {
        let event_id = event.event_id;
        let field = |f: &str| format!("event {event_id} {f}");
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
        // Checked here, reported after the values as before: the values move below.
        let vector = event.vector().map(drop);
        event.old_values = None;
        let new_values = match (event.operation, event.new_values.take()) {
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
                let missing = table
                    .columns
                    .iter()
                    .find(|c| !values.contains_key(*c))
                    .cloned();
                let canonical = Self::canonical_values_owned(&table, event.record_id, values)?;
                if let Some(missing) = missing {
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
        vector?;
        event.new_values = new_values;
        Ok(table)
    }

    /// Applies events from a peer in one transaction (see [`Engine::apply_from`]),
    /// accepting every origin.
    pub async fn apply_remote(&self, events: &[ChangeEvent]) -> Result<ApplyOutcome> {
        let checked = events.iter().map(|e| self.check_event(e.clone())).collect();
        self.apply_from(None, checked, Vec::new(), &|_| true, &[])
            .await
    }

    /// Applies a batch from `peer` in one transaction: idempotent (an event id
    /// already present changes nothing), the winner per record decided by the
    /// rules, conflicts recorded, every new event kept in `change_events`.
    ///
    /// Each origin's events apply in order up to the first one this node cannot
    /// take now; that origin is then *held* for the rest of the batch and
    /// reported in [`ApplyOutcome::held`] with the reason and when to retry, while
    /// every other origin goes on. An origin is held for an event stamped beyond
    /// the max drift (it may apply once the clocks agree), one its sender may not
    /// relay, one that is malformed or out of its origin's order, or one of a
    /// table or column this node does not know. Holding keeps the node's vector a
    /// true summary: it never passes an event the log does not hold. `rejected`
    /// (events the caller could not even identify) go to the quarantine.
    ///
    /// `waited` are the peers `synced_at` waits for. An event every one of them
    /// is known to hold is stored already synced, instead of being updated
    /// once more by the next `synced_at` pass: `peer` holds what it sent, the
    /// origin holds its own events, and any other must have acknowledged it.
    /// In a pair, every received event is synced on arrival. The events,
    /// checked beforehand by [`Engine::check_event`], are taken: their values
    /// move into the transaction's rows and log entries. A check's verdict
    /// counts where the event's turn comes, after its origin's order, the
    /// relay rule and the drift bound.
    pub async fn apply_from(
        &self,
        peer: Option<Ulid>,
        events: Vec<CheckedEvent>,
        rejected: Vec<Rejected>,
        allowed: &(dyn Fn(Ulid) -> bool + Sync),
        waited: &[Ulid],
    ) -> Result<ApplyOutcome> {
        let mut accepted = Vec::with_capacity(events.len());
        let mut held: Vec<Held> = Vec::new();
        let mut last_per_origin: BTreeMap<Ulid, (Hlc, Ulid)> = BTreeMap::new();
        let now_ms = self.clock.wall_ms();
        let max_drift_ms = self.clock.max_drift_ms() as i64;
        let mut text = HashMap::new();
        for CheckedEvent {
            event,
            table,
            text: rendered,
        } in events
        {
            if held.iter().any(|h| h.origin == event.node_id) {
                continue;
            }
            let (origin, hlc, event_id) = (event.node_id, event.hlc, event.event_id);
            let mut hold = |kind, reason: String, retry_after_ms: u64| {
                held.push(Held {
                    origin,
                    hlc,
                    event_id: event_id.to_string(),
                    kind,
                    reason,
                    retry_after_ms,
                })
            };
            let last = last_per_origin
                .entry(event.node_id)
                .or_insert((Hlc::ZERO, event.event_id));
            // Strictly increasing per origin (the same event twice is a duplicate).
            if event.hlc < last.0 || (event.hlc == last.0 && event.event_id != last.1) {
                let reason = format!(
                    "event {} of origin {} is out of order: {} after {}",
                    event.event_id, event.node_id, event.hlc, last.0
                );
                hold(RejectKind::Invalid, reason, HOLD_INVALID_MS);
                continue;
            }
            *last = (event.hlc, event.event_id);
            if let Err(e) = event.seq() {
                let reason = format!("event {} of origin {}: {e}", event.event_id, event.node_id);
                hold(RejectKind::Invalid, reason, HOLD_INVALID_MS);
                continue;
            }
            if !allowed(event.node_id) {
                let reason = format!(
                    "the sending peer may not relay events of origin {}",
                    event.node_id
                );
                hold(RejectKind::NotAllowed, reason, HOLD_NOT_ALLOWED_MS);
                continue;
            }
            let ahead_ms = event.hlc.wall_ms().saturating_sub(now_ms);
            if ahead_ms > max_drift_ms {
                let (kind, note) = if ahead_ms > FAR_FUTURE_MS {
                    (RejectKind::FarFuture, "no clock drift explains it")
                } else {
                    (RejectKind::Drift, "held until the clocks agree")
                };
                let reason = format!(
                    "event {} of origin {}: hlc {} is {ahead_ms} ms ahead of this node's clock, beyond the max drift of {max_drift_ms} ms; {note}",
                    event.event_id, event.node_id, event.hlc
                );
                let wait = (ahead_ms - max_drift_ms).clamp(100, HOLD_NOT_ALLOWED_MS as i64);
                hold(kind, reason, wait as u64);
                continue;
            }
            match table {
                Ok(table) => {
                    if let Some(rendered) = rendered {
                        text.insert(event.event_id, rendered);
                    }
                    accepted.push((Arc::new(event), table));
                }
                Err(e @ StoreError::UnknownTable { .. }) => {
                    hold(RejectKind::UnknownTable, e.to_string(), HOLD_INVALID_MS)
                }
                Err(
                    e @ (StoreError::Invalid { .. }
                    | StoreError::UnknownColumn { .. }
                    | StoreError::InvalidValue { .. }),
                ) => hold(RejectKind::Invalid, e.to_string(), HOLD_INVALID_MS),
                Err(e) => return Err(e),
            }
        }
        if accepted.is_empty() && rejected.is_empty() {
            return Ok(ApplyOutcome {
                held,
                ..ApplyOutcome::default()
            });
        }
        let _w = self.writer.lock().await;
        // The policy a table has now, read under the writer lock: a session that
        // waited for the lock must not apply with a policy another changed.
        for (_, table) in accepted.iter_mut() {
            if table.table_name != REGISTRY_TABLE {
                *table = self.table(&table.table_name)?;
            }
        }
        let extras = Arc::new(EventExtras {
            synced: match peer {
                Some(peer) if !waited.is_empty() => self.held_by_all(peer, waited, &accepted),
                _ => HashSet::new(),
            },
            text,
        });
        let mut tx = self.begin_tx().await?;
        let mut outcome = match self.apply_in(&mut tx, &accepted, false, &extras).await {
            Ok(o) => o,
            // A row the table refused: start over, each row under a savepoint, and
            // block the records whose rows are refused.
            Err(StoreError::RowRefused { .. }) => {
                self.backend.rollback(tx).await?;
                tx = self.begin_tx().await?;
                self.apply_in(&mut tx, &accepted, true, &extras).await?
            }
            Err(e) => return Err(e),
        };
        outcome.held = held;
        outcome.quarantined.splice(0..0, rejected);
        if !outcome.quarantined.is_empty() {
            self.backend
                .quarantine(&mut tx, peer, &outcome.quarantined)
                .await?;
        }
        let policies_changed = accepted.iter().any(|(e, _)| e.table_name == REGISTRY_TABLE);
        self.commit_tx(tx).await?;
        if !outcome.fresh.is_empty() || outcome.drained > 0 {
            self.committed();
        }
        if policies_changed {
            self.reload_tables().await?;
        }
        let events = accepted.len();
        release_elsewhere((accepted, extras), events);
        Ok(outcome)
    }

    /// The accepted events that every peer in `waited` is known to hold, with
    /// `peer` the one that sent them (see [`Engine::apply_from`]).
    fn held_by_all(
        &self,
        peer: Ulid,
        waited: &[Ulid],
        accepted: &[(Arc<ChangeEvent>, Arc<TableInfo>)],
    ) -> HashSet<Ulid> {
        let acks = lock(&self.acks);
        accepted
            .iter()
            .map(|(e, _)| e)
            .filter(|e| {
                waited.iter().all(|w| {
                    *w == peer
                        || *w == e.node_id
                        || acks
                            .get(w)
                            .is_some_and(|a| a.vector.get(e.node_id) >= e.hlc)
                })
            })
            .map(|e| e.event_id)
            .collect()
    }

    pub(super) async fn apply_in(
        &self,
        tx: &mut B::Tx,
        accepted: &[(Arc<ChangeEvent>, Arc<TableInfo>)],
        careful: bool,
        extras: &Arc<EventExtras>,
    ) -> Result<ApplyOutcome> {
        let mut outcome = ApplyOutcome {
            drained: self.drain_in(tx).await?.events,
            ..ApplyOutcome::default()
        };
        // Only events that may be in the log are looked up: one numbered above
        // the last number held of its origin is not (see `held_numbers`), so a
        // batch of new events (the steady state) costs no lookup at all.
        let held = self.held_numbers();
        let ids: Vec<Ulid> = accepted
            .iter()
            .filter(|(e, _)| match e.seq() {
                Ok(Some(seq)) => held.get(&e.node_id).is_some_and(|h| seq <= *h),
                _ => true,
            })
            .map(|(e, _)| e.event_id)
            .collect();
        let mut seen = if ids.is_empty() {
            HashSet::new()
        } else {
            self.backend.existing_events(tx, &ids).await?
        };
        let mut cache = VersionCache::buffered();
        cache.extras = Arc::clone(extras);
        let records = accepted
            .iter()
            .filter(|(e, _)| !seen.contains(&e.event_id))
            .map(|(e, t)| (t.table_name.clone(), e.record_id));
        self.prefetch(tx, &mut cache, records).await?;
        let mut vector = VersionVector::new();
        let mut overrides: HashMap<String, ConflictPolicy> = HashMap::new();
        for (event, table) in accepted {
            if !seen.insert(event.event_id) {
                outcome.duplicates += 1;
                continue;
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
            let res = self
                .apply_one(tx, event, &table, &mut cache, careful)
                .await?;
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
            if let Some((name, policy)) = policy_change.filter(|_| res.incoming_wins) {
                overrides.insert(name, policy);
            }
        }
        self.finish_blocks(tx, &mut cache).await?;
        self.flush(tx, &mut cache).await?;
        if !outcome.fresh.is_empty() {
            self.raise_vector(tx, &vector).await?;
        }
        outcome.blocked = cache.blocked.len() as u64;
        Ok(outcome)
    }

    /// One new event: observe its HLC, settle its record, keep the event, and
    /// make the row follow the record's winner. The event is kept whatever
    /// becomes of its row: a row the table cannot take blocks its record
    /// (see `place`), so the log never has a hole.
    pub(super) async fn apply_one(
        &self,
        tx: &mut B::Tx,
        event: &Arc<ChangeEvent>,
        table: &Arc<TableInfo>,
        cache: &mut VersionCache,
        careful: bool,
    ) -> Result<Resolution> {
        self.clock.observe(event.hlc)?;
        let res = self.settle(tx, table, event, cache).await?;
        // Stored before a later event of the same batch settles (a buffered cache
        // flushes before conflict bookkeeping), so one that conflicts with it
        // finds its values.
        match cache.pending.as_mut() {
            Some(p) => p.events.push(Arc::clone(event)),
            None => self.insert_events(tx, &[&**event], &cache.extras).await?,
        }
        if !res.incoming_wins {
            return Ok(res);
        }
        if table.table_name == REGISTRY_TABLE {
            self.flush(tx, cache).await?;
            let (name, policy) = event
                .new_values
                .as_ref()
                .and_then(parse_registry_values)
                .ok_or_else(|| StoreError::corrupt(REGISTRY_TABLE, "checked values vanished"))?;
            self.apply_policy(tx, &name, policy).await?;
            return Ok(res);
        }
        if !careful && !self.constrained(table) && cache.pending.is_some() {
            // No constraint Tidemark decides: written in bulk; a refusal by the
            // table fails the batch, which is then applied carefully.
            cache
                .cleared
                .insert((table.table_name.clone(), event.record_id));
            let Some(p) = cache.pending.as_mut() else {
                return Err(StoreError::corrupt("apply", "the write buffer vanished"));
            };
            p.rows.push(match RowValues::of_event(event) {
                Some(values) => RowOp::upsert(
                    table.clone(),
                    event.event_id,
                    PendingRow {
                        id: event.record_id,
                        values,
                        hlc: event.hlc,
                        node_id: event.node_id,
                    },
                ),
                None => RowOp::Delete {
                    table: table.clone(),
                    event_id: event.event_id,
                    id: event.record_id,
                },
            });
            return Ok(res);
        }
        let winner = Winner {
            order: event.order(),
            values: event.new_values.clone(),
        };
        let how = if careful {
            Placing::NewCareful
        } else {
            Placing::New
        };
        self.place(tx, cache, table, event.record_id, &winner, how)
            .await?;
        Ok(res)
    }
}
