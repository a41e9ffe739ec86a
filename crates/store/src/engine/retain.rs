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
//! Quarantined events (what a peer sent that could not even be identified;
//! never part of the log) go by age alone: older than the minimum age.
//!
//! Compaction walks the log in HLC order a step at a time (each step one short
//! write transaction), remembering where it stopped; at the end it starts over,
//! since an event kept because it was current may be superseded since.
//!
//! Tombstones go too when [`Retain::tombstone_min_age`] is set: a deleted
//! record whose delete is all that is left of it, older than that age and
//! acknowledged by every configured peer (released ones included), is
//! forgotten altogether. Two things keep that safe:
//! * a late write concurrent with the delete could otherwise bring the row
//!   back on the nodes that forgot it and not on the others; every peer's ack
//!   and the age bound the window (a node cut off from every path for longer
//!   than the age must rejoin as a new node, as for any tombstone expiry);
//! * a record id written again later: a new record's vector is the writer's
//!   whole applied vector (see `Engine::local_event`), so it has seen every
//!   tombstone any node may still keep, and the write is a plain successor on
//!   every node, not a conflict on some.

use std::time::Duration;

use super::*;
use crate::backend::{Compacted, Tombstones};

/// What compaction may delete (see [`Engine::compact_step`]).
#[derive(Debug, Clone, Default)]
pub struct Retain {
    /// Superseded events every peer acknowledged go once older than this.
    pub min_age: Duration,
    /// Tombstones go once older than this (at least `min_age`); `None` keeps
    /// them.
    pub tombstone_min_age: Option<Duration>,
    /// Every configured peer, released ones included: a tombstone goes only
    /// once each has acknowledged its delete.
    pub peers: Vec<Ulid>,
}

impl<B: Backend> Engine<B> {
    /// The HLC of wall time `age` ago.
    fn stamped_before(&self, age: Duration) -> Hlc {
        let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self.clock.wall_ms().saturating_sub(age_ms);
        Hlc::at_wall_ms(cutoff.max(0)).unwrap_or(Hlc::ZERO)
    }

    /// One step of compaction by `rules`, looking at up to `limit` events after
    /// where the previous step stopped.
    pub async fn compact_step(&self, rules: &Retain, limit: u32) -> Result<Compacted> {
        let before = self.stamped_before(rules.min_age);
        let acked = match rules.tombstone_min_age {
            Some(_) => self.acked_by_all(&rules.peers).await?,
            None => VersionVector::new(),
        };
        let tombstones = rules.tombstone_min_age.map(|age| Tombstones {
            before: self.stamped_before(age.max(rules.min_age)),
            acked: &acked,
        });
        let after = *lock(&self.compact_from);
        // Quarantined events (not part of the log) leave by age alone, once a
        // pass.
        let quarantined = if after == Hlc::ZERO {
            self.backend.expire_quarantined(before.wall_ms()).await?
        } else {
            0
        };
        let _w = self.writer.lock().await;
        let mut tx = self.begin_tx().await?;
        let done = match self
            .backend
            .compact_events(&mut tx, after, before, tombstones, limit.max(1))
            .await
        {
            Ok(done) => done,
            Err(e) => {
                self.backend.rollback(tx).await?;
                return Err(e);
            }
        };
        self.commit_tx(tx).await?;
        let done = Compacted {
            quarantined,
            ..done
        };
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
