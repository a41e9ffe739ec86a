//! Placing a record's row: the row follows the record's winning event unless a
//! constraint says otherwise, decided the same way on every node, whatever the
//! order events arrive in.
//!
//! * **UNIQUE**: when two records' winning writes hold the same value, the row
//!   of the greater write (by `(hlc, node_id, event_id)`) stays and the other
//!   record is blocked: it has no row. A write that arrives greater than the row
//!   holding its value displaces that row. This is the greedy rule "place records
//!   in descending order of their winning writes, skipping any that clash with a
//!   placed one", kept incrementally: whenever a row is written or removed, the
//!   records it blocked are tried again, greatest first.
//! * **FOREIGN KEY**: a child row is placed only while its parent row is. A child
//!   that arrives before its parent waits (blocked) and is placed when the parent
//!   arrives. A parent's delete wins over its children regardless of order: its
//!   children are blocked before its row goes (re-creating a deleted parent from
//!   a child's reference would invent values no one wrote).
//! * Anything else the table refuses (CHECK, NOT NULL, a partial or expression
//!   index the database alone enforces) blocks the record with the database's
//!   reason; it is retried when its blocker changes or on demand.
//!
//! A blocked record keeps its winning event in the log (relayed like any event,
//! so no node's vector ever covers an event it does not hold) and is listed in
//! `tidemark_blocked`. A UNIQUE clash, and a child whose parent is deleted, is
//! also a conflict decided by the table's policy: under `lww` it is recorded as
//! decided, under `manual` it stays open for an operator, on every node alike.
//! When a blocked record is placed again without a new write, its conflict row
//! goes away: it was never a final outcome.

use std::collections::BTreeSet;

use super::*;
use crate::model::ForeignKey;
use tidemark_hlc::WriteOrder;

/// Below every write: the order of a row that no write of the log made.
const LEAST: WriteOrder = WriteOrder {
    hlc: tidemark_hlc::Hlc::ZERO,
    node_id: Ulid::nil(),
    event_id: Ulid::nil(),
};

/// Most times one transaction tries a blocked record again (each try follows a
/// real change of a row it waits on; this only bounds a pathological chain).
const MAX_RETRIES_PER_RECORD: u32 = 64;

/// Most placements one transaction retries before it leaves the rest for the
/// next change (they stay blocked and listed; nothing is lost).
const MAX_RETRIES_PER_TX: usize = 10_000;

/// How a row is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placing {
    /// A new winner in a batch that fails whole if the table refuses a row (it
    /// is then applied again, carefully).
    New,
    /// A new winner, its row written under a savepoint: a row the table refuses
    /// blocks its record instead of failing the transaction.
    NewCareful,
    /// A blocked record tried again (carefully): its winner did not change, so
    /// it counts as changed only if its row does.
    Retry,
}

/// The winning event of a record, as placement needs it.
#[derive(Debug, Clone)]
pub(super) struct Winner {
    pub order: WriteOrder,
    /// The record's whole row after the write; `None` for a delete.
    pub values: Option<Values>,
}

impl<B: Backend> Engine<B> {
    /// FOREIGN KEYs of registered tables that reference `table`.
    fn children_of(&self, table: &str) -> Vec<(Arc<TableInfo>, ForeignKey)> {
        self.tables()
            .into_iter()
            .flat_map(|t| {
                t.foreign_keys
                    .iter()
                    .filter(|fk| fk.parent == table)
                    .map(|fk| (t.clone(), fk.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Whether rows of `table` are placed with constraint checks (it has UNIQUE
    /// constraints or FOREIGN KEYs, or a FOREIGN KEY references it); others are
    /// written in bulk.
    pub(super) fn constrained(&self, table: &TableInfo) -> bool {
        !table.uniques.is_empty()
            || !table.foreign_keys.is_empty()
            || self.tables().iter().any(|t| {
                t.foreign_keys
                    .iter()
                    .any(|fk| fk.parent == table.table_name)
            })
    }

    /// Places the row of `record` as its winning write says (see the module
    /// docs and [`Placing`]).
    pub(super) async fn place(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        table: &Arc<TableInfo>,
        record: Ulid,
        winner: &Winner,
        how: Placing,
    ) -> Result<()> {
        let careful = how != Placing::New;
        let retrying = how == Placing::Retry;
        self.flush(tx, cache).await?;
        if !retrying {
            // A new winner: what waits on this record is tried again, even when
            // its row stays absent (a parent whose delete now wins).
            cache.touched.insert((table.table_name.clone(), record));
        }
        let previous = self.backend.blocked(tx, &table.table_name, record).await?;
        let Some(values) = &winner.values else {
            self.unplace(tx, cache, vec![(table.clone(), record)])
                .await?;
            if previous.is_some() {
                self.remove_blocked(tx, &table.table_name, record).await?;
            }
            return Ok(());
        };
        // A parent that is not here blocks the child.
        for fk in &table.foreign_keys {
            let Some(parent) = self.table(&fk.parent).ok() else {
                continue;
            };
            let (Some(cols), Some(pcols)) = (
                table.indexes_of(&fk.columns),
                parent.indexes_of(&fk.parent_columns),
            ) else {
                continue;
            };
            let key: Vec<Value> = cols
                .iter()
                .map(|&i| {
                    values
                        .get(&table.columns[i])
                        .cloned()
                        .unwrap_or(Value::Null)
                })
                .collect();
            if key.iter().any(Value::is_null) {
                continue;
            }
            if !self
                .backend
                .matching_rows(tx, &parent, &pcols, &key, None)
                .await?
                .is_empty()
            {
                continue;
            }
            let parent_id = (fk.parent_columns == [parent.primary_key.clone()])
                .then(|| key[0].as_str().and_then(|k| Ulid::from_string(k).ok()))
                .flatten();
            let parent_version = match parent_id {
                Some(p) => self.cached_version(tx, cache, &parent, p).await?,
                None => None,
            };
            let detail = describe(&fk.columns, &key);
            let deleted = parent_version.as_ref().filter(|v| v.deleted);
            let reason = match deleted {
                Some(_) => format!(
                    "its parent in {} ({}) is deleted: the delete wins",
                    fk.parent, detail
                ),
                None => format!(
                    "waits for its parent in {} ({}), which is not here",
                    fk.parent, detail
                ),
            };
            let clash = deleted.map(|v| Clash {
                kind: ConflictKind::ForeignKey,
                detail: detail.clone(),
                table: parent.table_name.clone(),
                record: parent_id.unwrap_or(record),
                order: v.order(),
                values: None,
            });
            return self
                .block(
                    tx,
                    cache,
                    table,
                    record,
                    winner,
                    BlockKind::ForeignKey,
                    reason,
                    (parent.table_name.clone(), parent_id),
                    clash,
                )
                .await;
        }
        // Rows holding one of its UNIQUE values: the greater write keeps the value.
        let mut clashes: Vec<Clash> = Vec::new();
        for unique in &table.uniques {
            let Some(cols) = table.indexes_of(unique) else {
                continue;
            };
            let key: Vec<Value> = cols
                .iter()
                .map(|&i| {
                    values
                        .get(&table.columns[i])
                        .cloned()
                        .unwrap_or(Value::Null)
                })
                .collect();
            if key.iter().any(Value::is_null) {
                continue;
            }
            for other in self
                .backend
                .matching_rows(tx, table, &cols, &key, Some(record))
                .await?
            {
                let order = self
                    .cached_version(tx, cache, table, other)
                    .await?
                    .map_or(LEAST, |v| v.order());
                clashes.push(Clash {
                    kind: ConflictKind::Unique,
                    detail: describe(unique, &key),
                    table: table.table_name.clone(),
                    record: other,
                    order,
                    values: self.row_of(tx, table, other).await?,
                });
            }
        }
        // The displacements and the row write stand or fall together: a row the
        // table then refuses leaves the holders it would have displaced in place.
        let touched_before = careful.then(|| cache.touched.clone());
        if careful {
            self.backend.savepoint(tx, SavepointOp::Set).await?;
        }
        if let Some(top) = clashes.iter().max_by_key(|c| c.order).cloned() {
            if top.order > winner.order {
                if careful {
                    self.backend.savepoint(tx, SavepointOp::Release).await?;
                }
                let reason = format!(
                    "{} is held by record {} of {}, whose write is greater",
                    top.detail, top.record, top.table
                );
                return self
                    .block(
                        tx,
                        cache,
                        table,
                        record,
                        winner,
                        BlockKind::Unique,
                        reason,
                        (table.table_name.clone(), Some(top.record)),
                        Some(top),
                    )
                    .await;
            }
            for c in clashes {
                let version = self.cached_version(tx, cache, table, c.record).await?;
                let Some(version) = version else {
                    // A row no write of the log made: its value gives way.
                    self.unplace(tx, cache, vec![(table.clone(), c.record)])
                        .await?;
                    continue;
                };
                let loser = Winner {
                    order: version.order(),
                    values: c.values.clone(),
                };
                let reason = format!(
                    "{} is held by record {record} of {}, whose write is greater",
                    c.detail, table.table_name
                );
                let clash = Clash {
                    kind: ConflictKind::Unique,
                    detail: c.detail.clone(),
                    table: table.table_name.clone(),
                    record,
                    order: winner.order,
                    values: winner.values.clone(),
                };
                self.block(
                    tx,
                    cache,
                    table,
                    c.record,
                    &loser,
                    BlockKind::Unique,
                    reason,
                    (table.table_name.clone(), Some(record)),
                    Some(clash),
                )
                .await?;
            }
        }
        let row = PendingRow {
            id: record,
            values: RowValues::Own(values.clone()),
            hlc: winner.order.hlc,
            node_id: winner.order.node_id,
        };
        match self
            .write_rows(
                tx,
                vec![RowOp::upsert(table.clone(), winner.order.event_id, row)],
            )
            .await
        {
            Ok(()) => {
                if careful {
                    self.backend.savepoint(tx, SavepointOp::Release).await?;
                }
                cache.touched.insert((table.table_name.clone(), record));
                if let Some(b) = previous {
                    self.remove_blocked(tx, &table.table_name, record).await?;
                    if b.event_id == winner.order.event_id {
                        // Placed again without a new write: the clash is gone.
                        self.backend.delete_clash(tx, b.event_id).await?;
                    }
                }
                Ok(())
            }
            Err(StoreError::RowRefused { reason, .. }) if careful => {
                self.backend.savepoint(tx, SavepointOp::RollbackTo).await?;
                self.backend.savepoint(tx, SavepointOp::Release).await?;
                // Nothing the rolled-back displacements touched changed.
                if let Some(before) = touched_before {
                    cache.touched = before;
                }
                let reason = format!("the table refuses the row: {reason}");
                // Blocked by its own table: tried again when a row of it changes,
                // so it meets a greater write that takes one of its values (a
                // UNIQUE clash decides it then, as in any order).
                self.block(
                    tx,
                    cache,
                    table,
                    record,
                    winner,
                    BlockKind::Refused,
                    reason,
                    (table.table_name.clone(), None),
                    None,
                )
                .await
            }
            Err(e) => Err(e),
        }
    }

    /// The row's current values, if it has one.
    async fn row_of(&self, tx: &mut B::Tx, table: &TableInfo, id: Ulid) -> Result<Option<Values>> {
        Ok(self.backend.rows(tx, table, &[id]).await?.remove(&id))
    }

    /// Blocks `record`: its row goes (children first), it is listed with its
    /// reason, and a clash with another write is recorded as a conflict.
    #[allow(clippy::too_many_arguments)]
    async fn block(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        table: &Arc<TableInfo>,
        record: Ulid,
        winner: &Winner,
        kind: BlockKind,
        reason: String,
        blocker: (String, Option<Ulid>),
        clash: Option<Clash>,
    ) -> Result<()> {
        self.unplace(tx, cache, vec![(table.clone(), record)])
            .await?;
        cache.blocked.insert((table.table_name.clone(), record));
        let (blocker_table, blocker_id) = blocker;
        self.put_blocked(
            tx,
            &Blocked {
                table_name: table.table_name.clone(),
                record_id: record,
                event_id: winner.order.event_id,
                kind,
                reason,
                blocker_table: (!blocker_table.is_empty()).then_some(blocker_table),
                blocker_id,
                blocked_at: String::new(),
            },
        )
        .await?;
        match clash {
            Some(clash) => self.record_clash(tx, table, record, winner, &clash).await,
            // Blocked for another reason now (waiting for a parent that is not
            // deleted, refused by the table): a clash recorded before is over.
            None => self.backend.delete_clash(tx, winner.order.event_id).await,
        }
    }

    /// Keeps a constraint clash in the conflict table, keyed by the blocked
    /// write's event id: open under `manual`, decided under `lww`, arisen when
    /// the later of the two writes was made (the same on every node).
    async fn record_clash(
        &self,
        tx: &mut B::Tx,
        table: &TableInfo,
        record: Ulid,
        loser: &Winner,
        clash: &Clash,
    ) -> Result<()> {
        let mut conflict = Conflict {
            conflict_id: loser.order.event_id,
            kind: clash.kind,
            table_name: table.table_name.clone(),
            record_id: record,
            detail: Some(clash.detail.clone()),
            winner_table: Some(clash.table.clone()),
            winner_record_id: Some(clash.record),
            policy: table.conflict_policy,
            status: ConflictStatus::Open,
            winner: ConflictSide {
                event_id: clash.order.event_id,
                hlc: clash.order.hlc,
                node_id: clash.order.node_id,
                values: clash.values.clone(),
            },
            loser: ConflictSide {
                event_id: loser.order.event_id,
                hlc: loser.order.hlc,
                node_id: loser.order.node_id,
                values: loser.values.clone(),
            },
            detected_at: crate::model::hlc_time(clash.order.hlc.max(loser.order.hlc)),
            resolved_at: None,
            resolved_by: None,
            resolution: None,
            resolution_note: None,
            resolution_event_id: None,
        };
        conflict.label(table.conflict_policy, None);
        self.backend
            .put_conflicts(tx, std::slice::from_ref(&conflict))
            .await
    }

    /// Removes these rows, blocking first every child row that references one of
    /// them (and their children in turn); children go before their parents.
    pub(super) async fn unplace(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        start: Vec<(Arc<TableInfo>, Ulid)>,
    ) -> Result<()> {
        let mut order: Vec<(Arc<TableInfo>, Ulid)> = Vec::new();
        let mut seen: BTreeSet<(String, Ulid)> = BTreeSet::new();
        let mut stack = start;
        while let Some((table, id)) = stack.pop() {
            if !seen.insert((table.table_name.clone(), id)) {
                continue;
            }
            let Some(row) = self.row_of(tx, &table, id).await? else {
                continue;
            };
            let children = self.children_of(&table.table_name);
            if !children.is_empty() {
                let parent = self.cached_version(tx, cache, &table, id).await?;
                let deleted = parent.as_ref().filter(|v| v.deleted);
                for (child, fk) in children {
                    let (Some(pcols), Some(cols)) = (
                        table.indexes_of(&fk.parent_columns),
                        child.indexes_of(&fk.columns),
                    ) else {
                        continue;
                    };
                    let key: Vec<Value> = pcols
                        .iter()
                        .map(|&i| row.get(&table.columns[i]).cloned().unwrap_or(Value::Null))
                        .collect();
                    if key.iter().any(Value::is_null) {
                        continue;
                    }
                    for kid in self
                        .backend
                        .matching_rows(tx, &child, &cols, &key, None)
                        .await?
                    {
                        if child.table_name == table.table_name && kid == id {
                            continue;
                        }
                        let Some(kv) = self.cached_version(tx, cache, &child, kid).await? else {
                            continue;
                        };
                        let kid_winner = Winner {
                            order: kv.order(),
                            values: self.row_of(tx, &child, kid).await?,
                        };
                        let detail = describe(&fk.columns, &key);
                        let reason = match deleted {
                            Some(_) => format!(
                                "its parent in {} ({detail}) is deleted: the delete wins",
                                table.table_name
                            ),
                            None => format!(
                                "waits for its parent in {} ({detail}), which is not here",
                                table.table_name
                            ),
                        };
                        cache.blocked.insert((child.table_name.clone(), kid));
                        self.put_blocked(
                            tx,
                            &Blocked {
                                table_name: child.table_name.clone(),
                                record_id: kid,
                                event_id: kv.event_id,
                                kind: BlockKind::ForeignKey,
                                reason,
                                blocker_table: Some(table.table_name.clone()),
                                blocker_id: Some(id),
                                blocked_at: String::new(),
                            },
                        )
                        .await?;
                        if let Some(v) = deleted {
                            let clash = Clash {
                                kind: ConflictKind::ForeignKey,
                                detail,
                                table: table.table_name.clone(),
                                record: id,
                                order: v.order(),
                                values: None,
                            };
                            self.record_clash(tx, &child, kid, &kid_winner, &clash)
                                .await?;
                        }
                        stack.push((child.clone(), kid));
                    }
                }
            }
            order.push((table, id));
        }
        for (table, id) in order.into_iter().rev() {
            self.backend.delete_rows(tx, &table, &[id]).await?;
            cache.touched.insert((table.table_name.clone(), id));
        }
        Ok(())
    }

    /// Notes a row this node wrote itself (a direct write, an API write, a
    /// remote write without constraint checks): a block its record had is over,
    /// and records it blocked may be placed now.
    pub(super) fn note_written(&self, cache: &mut VersionCache, table: &TableInfo, id: Ulid) {
        cache.cleared.insert((table.table_name.clone(), id));
        if self.constrained(table) {
            cache.touched.insert((table.table_name.clone(), id));
        }
    }

    /// Ends a transaction's placements: drops the blocks of records whose rows
    /// were written without [`Engine::place`], then retries the records blocked
    /// by rows this transaction wrote or removed, greatest write first, until
    /// nothing more changes. Costs one query when nothing is blocked.
    pub(super) async fn finish_blocks(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
    ) -> Result<()> {
        if cache.touched.is_empty() && cache.cleared.is_empty() {
            return Ok(());
        }
        self.flush(tx, cache).await?;
        if !self.backend.has_blocked(tx).await? {
            cache.touched.clear();
            cache.cleared.clear();
            return Ok(());
        }
        for (table, id) in std::mem::take(&mut cache.cleared) {
            self.remove_blocked(tx, &table, id).await?;
        }
        self.retry_blocked(tx, cache).await
    }

    /// Tries again the records blocked by rows this transaction wrote or removed,
    /// greatest write first, until nothing more changes.
    async fn retry_blocked(&self, tx: &mut B::Tx, cache: &mut VersionCache) -> Result<()> {
        let mut tries = 0;
        let mut per_record: HashMap<(String, Ulid), u32> = HashMap::new();
        while !cache.touched.is_empty() && tries < MAX_RETRIES_PER_TX {
            let keys: Vec<(String, Ulid)> =
                std::mem::take(&mut cache.touched).into_iter().collect();
            let waiting = self.backend.blocked_by_any(tx, &keys).await?;
            if waiting.is_empty() {
                break;
            }
            tries += self
                .retry_these(tx, cache, waiting, &mut per_record)
                .await?;
        }
        if tries >= MAX_RETRIES_PER_TX {
            tracing::warn!(
                tries,
                "stopped retrying blocked records in one transaction; the rest wait for the next change"
            );
        }
        cache.touched.clear();
        Ok(())
    }

    /// Tries these blocked records again, greatest write first (each at most
    /// [`MAX_RETRIES_PER_RECORD`] times per transaction); returns how many it
    /// tried.
    async fn retry_these(
        &self,
        tx: &mut B::Tx,
        cache: &mut VersionCache,
        mut waiting: Vec<Blocked>,
        per_record: &mut HashMap<(String, Ulid), u32>,
    ) -> Result<usize> {
        let mut tries = 0;
        {
            let mut candidates = Vec::with_capacity(waiting.len());
            for b in waiting.drain(..) {
                let Ok(table) = self.table(&b.table_name) else {
                    continue;
                };
                let Some(version) = self.cached_version(tx, cache, &table, b.record_id).await?
                else {
                    continue;
                };
                if version.event_id != b.event_id {
                    continue;
                }
                candidates.push((version.order(), table, b));
            }
            candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
            for (order, table, b) in candidates {
                let attempts = per_record
                    .entry((b.table_name.clone(), b.record_id))
                    .or_insert(0);
                *attempts += 1;
                if *attempts > MAX_RETRIES_PER_RECORD {
                    continue;
                }
                tries += 1;
                // Still blocked on the same write (an earlier retry may have moved it).
                let current = self
                    .backend
                    .blocked(tx, &table.table_name, b.record_id)
                    .await?;
                if current.as_ref().is_none_or(|c| c.event_id != b.event_id) {
                    continue;
                }
                let values = self
                    .backend
                    .event_values(tx, &[b.event_id])
                    .await?
                    .remove(&b.event_id)
                    .flatten();
                let winner = Winner { order, values };
                self.place(tx, cache, &table, b.record_id, &winner, Placing::Retry)
                    .await?;
            }
        }
        Ok(tries)
    }

    /// Tries every blocked record (of `table`, or all) again now, in one
    /// transaction, and then the records their rows unblock in turn: for
    /// refusals no row change retries (a CHECK or NOT NULL the operator
    /// changed). Returns how many were tried and how many are placed now.
    pub async fn retry_blocked_now(&self, table: Option<&str>) -> Result<(u64, u64)> {
        if let Some(t) = table {
            self.table(t)?;
        }
        let _w = self.writer.lock().await;
        let mut blocked = Vec::new();
        let mut after = None;
        loop {
            let page = self.backend.list_blocked(after.clone(), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some((last.table_name.clone(), last.record_id));
            let full = page.len() == 1000;
            blocked.extend(
                page.into_iter()
                    .filter(|b| table.is_none_or(|t| b.table_name == t)),
            );
            if !full {
                break;
            }
        }
        let tried = blocked.len() as u64;
        if blocked.is_empty() {
            return Ok((0, 0));
        }
        let mut tx = self.begin_tx().await?;
        let drained = self.drain_in(&mut tx).await?;
        let mut cache = VersionCache::new();
        let mut per_record = HashMap::new();
        let keys: Vec<(String, Ulid)> = blocked
            .iter()
            .map(|b| (b.table_name.clone(), b.record_id))
            .collect();
        self.retry_these(&mut tx, &mut cache, blocked, &mut per_record)
            .await?;
        self.finish_blocks(&mut tx, &mut cache).await?;
        let mut placed = 0;
        for (t, id) in &keys {
            if self.backend.blocked(&mut tx, t, *id).await?.is_none() {
                placed += 1;
            }
        }
        self.commit_tx(tx).await?;
        if drained.events > 0 {
            self.committed();
        }
        Ok((tried, placed))
    }
}

/// What a blocked write clashed with.
#[derive(Debug, Clone)]
struct Clash {
    kind: ConflictKind,
    /// e.g. `email = "a@x"`.
    detail: String,
    /// The record holding the value, or the deleted parent.
    table: String,
    record: Ulid,
    /// Its winning write, and the values that write holds (none for a delete).
    order: WriteOrder,
    values: Option<Values>,
}

/// `a = 1, b = "x"`, for messages.
fn describe(columns: &[String], values: &[Value]) -> String {
    columns
        .iter()
        .zip(values)
        .map(|(c, v)| format!("{c} = {}", crate::model::truncate(&v.to_string())))
        .collect::<Vec<_>>()
        .join(", ")
}
