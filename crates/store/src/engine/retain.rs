//! Retention: compacting the log.
//!
//! An event may go once every configured peer acknowledged it (`synced_at` is
//! set), it is older than the retention age, and it is superseded: a later
//! event of its record is the record's version (see
//! [`Backend::compact_events`] for what stays). What remains is every record's
//! current version (tombstones included) and its concurrent versions, so a
//! peer that is behind still converges from it: it receives each record's
//! newest event instead of the history that led there. The log then holds
//! roughly one event per record, not every change ever made.
//!
//! Compaction walks the log in HLC order a step at a time (each step one short
//! write transaction), remembering where it stopped; at the end it starts over,
//! since an event kept because it was current may be superseded since.

use std::time::Duration;

use super::*;
use crate::backend::Compacted;

impl<B: Backend> Engine<B> {
    /// One step of compaction over events older than `min_age`, looking at up to
    /// `limit` events after where the previous step stopped.
    pub async fn compact_step(&self, min_age: Duration, limit: u32) -> Result<Compacted> {
        let age_ms = i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self.clock.wall_ms().saturating_sub(age_ms);
        let before = Hlc::at_wall_ms(cutoff.max(0)).unwrap_or(Hlc::ZERO);
        let after = *lock(&self.compact_from);
        let _w = self.writer.lock().await;
        let mut tx = self.begin_tx().await?;
        let done = match self
            .backend
            .compact_events(&mut tx, after, before, limit.max(1))
            .await
        {
            Ok(done) => done,
            Err(e) => {
                self.backend.rollback(tx).await?;
                return Err(e);
            }
        };
        self.commit_tx(tx).await?;
        *lock(&self.compact_from) = match done.last {
            Some(last) if done.scanned >= u64::from(limit.max(1)) => last,
            // The end of what may go: the next step starts over.
            _ => Hlc::ZERO,
        };
        Ok(done)
    }

    /// Rows in the log and the wall time (ms) of the oldest.
    pub async fn log_extent(&self) -> Result<(u64, Option<i64>)> {
        self.backend.log_extent().await
    }

    /// Per origin, the highest HLC of its events compaction deleted here
    /// (origins with none left out): what a session tells a receiver its
    /// stream may skip.
    pub async fn compacted_vector(&self) -> Result<VersionVector> {
        let mut compacted = VersionVector::new();
        for origin in self.applied_vector().0.into_keys() {
            let hlc = self.backend.compacted_upto(origin).await?;
            if hlc > Hlc::ZERO {
                compacted.observe(origin, hlc);
            }
        }
        Ok(compacted)
    }
}
