//! Reading the log after a vector, peer progress, `synced_at` and lag.

use super::*;

impl<B: Backend> Engine<B> {
    /// This node's applied vector: per origin, the highest HLC it holds.
    pub async fn vector(&self) -> Result<VersionVector> {
        self.backend.vector().await
    }

    /// The vector this node tells its peers it holds (Welcome, Ack): its
    /// applied vector, except that while it lacks own events a peer holds (see
    /// [`Engine::peer_holds_own`]) its own entry stays where it was when the
    /// store opened, so every peer sends it everything of its origin after
    /// that, the lost events included, even across reconnects.
    pub async fn advertised_vector(&self) -> Result<VersionVector> {
        let mut vector = self.backend.vector().await?;
        if self.own_missing().await?.is_some() {
            match self.own.at_open {
                Hlc::ZERO => vector.0.remove(&self.node_id),
                at => vector.0.insert(self.node_id, at),
            };
        }
        Ok(vector)
    }

    /// Notes that `peer` holds this node's own events up to `hlc`. When the log
    /// lacks that event, the database was restored from an older copy (or
    /// another daemon wrote with this node id): the clock moves past `hlc`, so
    /// every new event of this origin sorts after the lost ones, and the
    /// advertised vector asks peers for them until the log holds `hlc`.
    /// Returns whether the log lacked it.
    pub async fn peer_holds_own(&self, peer: Ulid, hlc: Hlc) -> Result<bool> {
        self.own
            .heard_from
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer);
        if hlc <= self.own.at_open || self.holds_own(hlc).await? {
            return Ok(false);
        }
        {
            let mut missing = self
                .own
                .missing_upto
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *missing = Some(missing.map_or(hlc, |m| m.max(hlc)));
        }
        // Beyond the drift bound only if the clock went back since the lost
        // events were stamped: then nothing sorts new events after them.
        let _ = self.clock.observe(hlc);
        Ok(true)
    }

    /// The peers that said how far they hold this node's origin since the store
    /// opened (see [`Engine::peer_holds_own`]).
    pub fn own_heard_from(&self) -> std::collections::BTreeSet<Ulid> {
        self.own
            .heard_from
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The highest own event a peer holds and this log still lacks.
    pub async fn own_missing(&self) -> Result<Option<Hlc>> {
        let missing = *self
            .own
            .missing_upto
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(upto) = missing else {
            return Ok(None);
        };
        if self.holds_own(upto).await? {
            let mut m = self
                .own
                .missing_upto
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *m == Some(upto) {
                *m = None;
            }
            return Ok(None);
        }
        Ok(Some(upto))
    }

    /// Whether the log holds this node's own event stamped `hlc`.
    async fn holds_own(&self, hlc: Hlc) -> Result<bool> {
        let before = Hlc::decode(hlc.encode() - 1).unwrap_or(Hlc::ZERO);
        Ok(self
            .backend
            .events_of_origin_after(self.node_id, before, 1)
            .await?
            .first()
            .is_some_and(|e| e.hlc == hlc))
    }

    /// Holds API writes and capture draining (new own events) until
    /// [`Engine::release_own_writes`]: a restarting daemon first learns from its
    /// peers whether its log lacks own events. Remote events still apply.
    pub fn hold_own_writes(&self) {
        self.own.writes.send_replace(false);
    }

    pub fn release_own_writes(&self) {
        self.own.writes.send_replace(true);
    }

    pub fn own_writes_held(&self) -> bool {
        !*self.own.writes.borrow()
    }

    /// Waits until new own events may be stamped.
    pub async fn own_writes_released(&self) {
        let mut rx = self.own.writes.subscribe();
        let _ = rx.wait_for(|open| *open).await;
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
        // Every write of the daemon goes through the writer lock: on SQLite two
        // writers would otherwise meet in the busy handler, which sleeps.
        let _w = self.writer.lock().await;
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
        let _w = self.writer.lock().await;
        for (origin, upto) in floor.unwrap_or_default().0 {
            marked += self.backend.mark_synced(origin, upto).await?;
        }
        Ok(marked)
    }

    /// How far `peer` is behind this node: the number of events this node holds
    /// that the peer has not acknowledged, and the wall time (ms) of the oldest.
    pub async fn peer_lag(&self, peer: Ulid) -> Result<(u64, Option<i64>)> {
        let acked = self.backend.peer_progress(peer).await?;
        let mine = self.backend.vector().await?;
        let (mut count, mut oldest) = (0u64, None::<i64>);
        for (origin, top) in &mine.0 {
            let after = acked.get(*origin);
            if *top <= after {
                continue;
            }
            let (n, first) = self.backend.lag_of_origin(*origin, after).await?;
            count += n;
            if let Some(w) = first {
                oldest = Some(oldest.map_or(w, |o| o.min(w)));
            }
        }
        Ok((count, oldest))
    }

    pub async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        self.backend.peer_progress(peer).await
    }

    pub async fn count_unsynced(&self) -> Result<u64> {
        self.backend.count_unsynced().await
    }
}
