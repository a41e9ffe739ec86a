//! Reading the log after a vector, peer progress, `synced_at` and lag.

use super::*;

impl<B: Backend> Engine<B> {
    /// This node's applied vector: per origin, the highest HLC it holds.
    pub async fn vector(&self) -> Result<VersionVector> {
        self.backend.vector().await
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
