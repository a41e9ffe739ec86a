//! Settling an event on its record: the version rules, conflict bookkeeping,
//! and the write buffer that issues rows, versions and events in bulk.

use super::*;
use crate::model::{Closer, Member, hlc_time};
use crate::rules::{Lost, concurrent, has_seen, lost};
use tidemark_hlc::WriteOrder;

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
        if table.table_name != REGISTRY_TABLE {
            self.track_conflicts(tx, table, event, &res, cache).await?;
        }
        Ok(res)
    }

    /// Keeps the record's conflicts equal to those its history defines
    /// ([`crate::rules::lost`]), whatever order its versions arrive in, so
    /// every node that holds the same events holds the same conflicts, decided
    /// ones included:
    /// * a fast-forward only closes the conflicts of the versions it
    ///   supersedes (they were current: it is the first write to have seen
    ///   them);
    /// * any other arrival recomputes, from the record's log, the conflicts of
    ///   the versions concurrent with it (and its own), and closes those whose
    ///   losing version it has seen, unless a write before it in the total
    ///   order already did.
    ///
    /// A stored conflict keeps what it knows of versions compacted from the log
    /// since (the greater winner, the earlier time and closing write).
    /// Constraint clashes are kept while they hold (whether one arose depends
    /// on what else a node held at the time, not on the record's history): a
    /// write that has seen the blocked write ends one, and its row goes; the
    /// write itself, an operator's resolution included, stays in the log.
    pub(super) async fn track_conflicts(
        &self,
        tx: &mut B::Tx,
        table: &TableInfo,
        event: &ChangeEvent,
        res: &Resolution,
        cache: &mut VersionCache,
    ) -> Result<()> {
        let closed_by_event = || Closer {
            event_id: event.event_id,
            at: hlc_time(event.hlc),
            info: event.resolution(),
        };
        let mut changed: Vec<Conflict> = Vec::new();
        // Constraint clashes whose blocked write a later write has seen: over.
        let mut over: Vec<Ulid> = Vec::new();
        // Version conflicts whose winner turned out to hold the same row.
        let mut moot: Vec<Ulid> = Vec::new();
        // The record's conflicts as stored before this event (read only when
        // one can change).
        let mut stored: HashMap<Ulid, Conflict> = HashMap::new();
        match res.causality {
            Causality::New => {}
            // One version superseded: none of its record's conflicts was open
            // (an open one has two current versions), and only a constrained
            // table has clashes: nothing to read.
            Causality::Newer if res.superseded.len() < 2 && !self.constrained(table) => {}
            Causality::Newer => {
                stored = self.stored_conflicts(tx, table, event.record_id).await?;
                for c in stored.values() {
                    let superseded = res
                        .superseded
                        .iter()
                        .any(|m| m.event_id == c.loser.event_id);
                    if !superseded {
                        continue;
                    }
                    if c.kind != ConflictKind::Version {
                        // A clash an operator resolved stays (its row came
                        // from the resolving write, the same everywhere).
                        if c.resolution_event_id.is_none() {
                            over.push(c.conflict_id);
                        }
                    } else if c.resolution_event_id.is_none() {
                        let mut c = c.clone();
                        c.label(table.conflict_policy, Some(closed_by_event()));
                        changed.push(c);
                    }
                }
            }
            Causality::Concurrent | Causality::Older => {
                // The record's log must hold what this transaction buffered.
                self.flush(tx, cache).await?;
                let mut events = self
                    .backend
                    .record_events_in(tx, &table.table_name, event.record_id)
                    .await?;
                if !events.iter().any(|e| e.event_id == event.event_id) {
                    events.push(event.clone());
                }
                let history = History::new(&events)?;
                let incoming = event.member()?;
                stored = self.stored_conflicts(tx, table, event.record_id).await?;
                for l in history
                    .members
                    .iter()
                    .filter(|l| l.event_id == incoming.event_id || concurrent(l, &incoming))
                {
                    // A version conflict replaces a clash its loser was blocked by
                    // while it was the record's winner (it no longer is).
                    let before = stored
                        .get(&l.event_id)
                        .filter(|c| c.kind == ConflictKind::Version);
                    if let Some(found) = lost(l, &history.members) {
                        let c = history.conflict(table, event.record_id, &found, before);
                        if Self::same_row(table, &c.winner, &c.loser) {
                            // Nothing was lost: the row the loser wrote is the
                            // row that stays (the same rows written on several
                            // nodes, e.g. existing rows registered on each).
                            if before.is_some() {
                                moot.push(c.conflict_id);
                            }
                            // No version conflict takes the id of a clash the
                            // loser was blocked by while it was the record's
                            // winner; the clash is over all the same (it no
                            // longer is the winner; a node that got the
                            // winner first never placed it).
                            if stored.get(&l.event_id).is_some_and(|s| {
                                s.kind != ConflictKind::Version && s.resolution_event_id.is_none()
                            }) {
                                over.push(l.event_id);
                            }
                        } else {
                            changed.push(c);
                        }
                    }
                }
                for c in stored.values() {
                    if changed.iter().any(|d| d.conflict_id == c.conflict_id)
                        || moot.contains(&c.conflict_id)
                    {
                        continue;
                    }
                    let Some(loser) = history.member(c.loser.event_id) else {
                        continue;
                    };
                    if !has_seen(&incoming, loser) {
                        continue;
                    }
                    if c.kind != ConflictKind::Version {
                        if c.resolution_event_id.is_none() {
                            over.push(c.conflict_id);
                        }
                        continue;
                    }
                    let earlier = Closer::of(c).is_some_and(|k| match history.member(k.event_id) {
                        Some(m) => m.order() < incoming.order(),
                        None => k.at <= hlc_time(event.hlc),
                    });
                    if !earlier {
                        let mut c = c.clone();
                        c.label(table.conflict_policy, Some(closed_by_event()));
                        changed.push(c);
                    }
                }
            }
        }
        // A resolved clash is recorded from the resolving write (unless its
        // blocked write lost a version conflict since: that conflict is the one
        // kept under the id).
        if let Some(mut clash) = event.resolved_clash()
            && !stored
                .get(&clash.conflict_id)
                .into_iter()
                .chain(
                    changed
                        .iter()
                        .filter(|c| c.conflict_id == clash.conflict_id),
                )
                .any(|c| c.kind == ConflictKind::Version)
            && !stored
                .get(&clash.conflict_id)
                .is_some_and(|c| resolved_earlier(c, event))
        {
            clash.label(table.conflict_policy, Some(closed_by_event()));
            over.retain(|id| *id != clash.conflict_id);
            changed.retain(|c| c.conflict_id != clash.conflict_id);
            changed.push(clash);
        }
        for id in over {
            self.backend.delete_clash(tx, id).await?;
        }
        for id in moot {
            self.backend.delete_version_conflict(tx, id).await?;
        }
        if !changed.is_empty() {
            self.backend.put_conflicts(tx, &changed).await?;
        }
        Ok(())
    }

    /// Whether two sides of a version conflict hold the same row: both
    /// deleted, or the same columns with the same values
    /// ([`ColumnType::same`], so the answer does not depend on which backend
    /// wrote or printed a value).
    fn same_row(table: &TableInfo, a: &ConflictSide, b: &ConflictSide) -> bool {
        match (&a.values, &b.values) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                x.len() == y.len()
                    && x.iter().all(|(column, v)| {
                        y.get(column)
                            .is_some_and(|w| match table.column_type(column) {
                                Some(class) => class.same(v, w),
                                None => v == w,
                            })
                    })
            }
            _ => false,
        }
    }

    /// The conflicts of one record, by id.
    async fn stored_conflicts(
        &self,
        tx: &mut B::Tx,
        table: &TableInfo,
        record: Ulid,
    ) -> Result<HashMap<Ulid, Conflict>> {
        Ok(self
            .backend
            .record_conflicts(tx, &table.table_name, record)
            .await?
            .into_iter()
            .map(|c| (c.conflict_id, c))
            .collect())
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
        // A record this node holds no version of starts from everything the
        // node holds (its applied vector: no holes, so every event below it is
        // here). A tombstone of the same id that this node collected, or never
        // received because its donor had, is below it: on a node that still
        // keeps the tombstone the write is its successor, as it is here, not a
        // concurrent version (see `retain`).
        let mut vv = match local {
            Some(v) => v.vv.clone(),
            None => self.applied_vector(),
        };
        vv.observe(self.node_id, hlc);
        let mut metadata = json!({ "vv": vv.to_json(), "seq": self.next_own_seq() });
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
            let events: Vec<&ChangeEvent> = pending.events.iter().map(|e| &**e).collect();
            self.insert_events(tx, &events, &cache.extras).await?;
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
                let rows: Vec<RowWrite<'_>> = run
                    .iter()
                    .filter_map(|op| match op {
                        RowOp::Upsert { row, .. } => Some(RowWrite {
                            id: row.id,
                            values: row.values.get(),
                            hlc: row.hlc,
                            node_id: row.node_id,
                        }),
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
            Err(StoreError::Db(crate::error::DbError(e))) if refused_by_table(&e) => {
                Err(StoreError::RowRefused {
                    table: table.table_name.clone(),
                    event_id,
                    reason: e
                        .as_database_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                })
            }
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

/// Whether `stored`, a clash `event` resolves too (two operators on two
/// nodes), is recorded as resolved by another write that comes first (by its
/// HLC time, then id: the same order on every node): the first resolution is
/// the one kept.
fn resolved_earlier(stored: &Conflict, event: &ChangeEvent) -> bool {
    stored.kind != ConflictKind::Version
        && Closer::of(stored).is_some_and(|k| {
            k.info.is_some()
                && (k.at.as_str(), k.event_id) < (hlc_time(event.hlc).as_str(), event.event_id)
        })
}

/// A record's log as versions, to read its conflicts off.
struct History<'a> {
    events: &'a [ChangeEvent],
    members: Vec<Member>,
    /// Position of each event in both.
    by_id: HashMap<Ulid, usize>,
}

impl<'a> History<'a> {
    fn new(events: &'a [ChangeEvent]) -> Result<History<'a>> {
        let members = events
            .iter()
            .map(ChangeEvent::member)
            .collect::<Result<Vec<_>>>()?;
        let by_id = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.event_id, i))
            .collect();
        Ok(History {
            events,
            members,
            by_id,
        })
    }

    fn index(&self, id: Ulid) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    fn member(&self, id: Ulid) -> Option<&Member> {
        self.index(id).map(|i| &self.members[i])
    }

    fn side(&self, m: &Member) -> ConflictSide {
        ConflictSide {
            event_id: m.event_id,
            hlc: m.hlc,
            node_id: m.node_id,
            values: self
                .index(m.event_id)
                .and_then(|i| self.events[i].new_values.clone()),
        }
    }

    /// The conflict `found` describes, joined with what the stored one knows of
    /// versions no longer in the log, labelled by the table's policy.
    fn conflict(
        &self,
        table: &TableInfo,
        record_id: Ulid,
        found: &Lost<'_>,
        stored: Option<&Conflict>,
    ) -> Conflict {
        let mut c = Conflict {
            conflict_id: found.loser.event_id,
            kind: ConflictKind::Version,
            table_name: table.table_name.clone(),
            record_id,
            detail: None,
            winner_table: None,
            winner_record_id: None,
            policy: table.conflict_policy,
            status: ConflictStatus::Open,
            winner: self.side(found.winner),
            loser: self.side(found.loser),
            detected_at: hlc_time(found.arose.hlc),
            resolved_at: None,
            resolved_by: None,
            resolution: None,
            resolution_note: None,
            resolution_event_id: None,
        };
        let mut closer = found.closer.map(|m| Closer {
            event_id: m.event_id,
            at: hlc_time(m.hlc),
            info: self
                .index(m.event_id)
                .and_then(|i| self.events[i].resolution()),
        });
        if let Some(s) = stored {
            let gone = |id: Ulid| self.index(id).is_none();
            let stored_winner = WriteOrder {
                hlc: s.winner.hlc,
                node_id: s.winner.node_id,
                event_id: s.winner.event_id,
            };
            if gone(s.winner.event_id) && stored_winner > found.winner.order() {
                c.winner = s.winner.clone();
            }
            if s.detected_at < c.detected_at {
                c.detected_at = s.detected_at.clone();
            }
            if let Some(k) = Closer::of(s)
                && gone(k.event_id)
                && closer.as_ref().is_none_or(|c| k.at < c.at)
            {
                closer = Some(k);
            }
        }
        c.label(table.conflict_policy, closer);
        c
    }
}
