//! Draining the capture queue: each direct write becomes a stamped event, or is
//! set aside with the reason it cannot be replicated.

use super::*;

/// How many captures one drain step stamps per query.
const DRAIN_CHUNK: u32 = 512;
/// What became of one captured direct write.
enum Stamped {
    Event(ChangeEvent),
    SetAside(SetAside),
    /// A row a write might have replaced is still there: nothing happened to it.
    Nothing,
}

impl<B: Backend> Engine<B> {
    /// Stamps captured direct writes into `change_events`, oldest first, until the
    /// queue is empty. A capture that cannot be replicated is set aside with its
    /// reason (`tidemark_unreplicated`) and the rest go on.
    pub async fn drain(&self) -> Result<DrainOutcome> {
        // Held while a restarting daemon checks its log with its peers: the
        // captures wait in their queue.
        if self.own_writes_held() {
            return Ok(DrainOutcome::default());
        }
        let _w = self.writer.lock().await;
        let mut tx = self.begin_tx().await?;
        let outcome = self.drain_in(&mut tx).await?;
        if outcome.events > 0 || !outcome.set_aside.is_empty() {
            self.commit_tx(tx).await?;
        }
        if outcome.events > 0 {
            self.committed();
        }
        Ok(outcome)
    }

    pub(super) async fn drain_in(&self, tx: &mut B::Tx) -> Result<DrainOutcome> {
        let outcome = self.drain_chunks(tx).await?;
        self.captured.drained(&outcome);
        Ok(outcome)
    }

    async fn drain_chunks(&self, tx: &mut B::Tx) -> Result<DrainOutcome> {
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
                    Stamped::Nothing => {}
                }
            }
            self.flush(tx, &mut cache).await?;
            if !events.is_empty() {
                let mut own = VersionVector::new();
                for e in &events {
                    own.observe(e.node_id, e.hlc);
                }
                self.insert_events(
                    tx,
                    &events.iter().collect::<Vec<_>>(),
                    &EventExtras::default(),
                )
                .await?;
                self.raise_vector(tx, &own).await?;
            }
            if !set_aside.is_empty() {
                self.backend.set_aside(tx, &set_aside).await?;
            }
            outcome.events += events.len() as u64;
            outcome.set_aside.extend(set_aside);
            self.backend.delete_captures(tx, &seqs).await?;
            self.finish_blocks(tx, &mut cache).await?;
            if seqs.len() < DRAIN_CHUNK as usize {
                break;
            }
        }
        Ok(outcome)
    }

    /// The values of a captured row, canonical for its table's classes.
    pub(super) fn captured_values(
        table: &TableInfo,
        row: CapturedRow,
    ) -> std::result::Result<Option<Values>, String> {
        let mut out = Values::new();
        match row {
            CapturedRow::Gone | CapturedRow::IfGone => return Ok(None),
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
    pub(super) fn event_bytes(values: Option<&Values>) -> usize {
        values.map_or(0, crate::model::json_len)
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
        if capture.row == CapturedRow::IfGone
            && !self
                .backend
                .rows(tx, &table, &[record_id])
                .await?
                .is_empty()
        {
            return Ok(Stamped::Nothing);
        }
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
        self.note_written(cache, &table, record_id);
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
}
