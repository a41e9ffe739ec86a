//! Reading the log after a vector, peer progress, `synced_at` and lag.

use super::*;

impl<B: Backend> Engine<B> {
    /// This node's applied vector: per origin, the highest HLC it holds.
    pub async fn vector(&self) -> Result<VersionVector> {
        Ok(self.applied_vector())
    }

    /// The applied vector as last committed, without a query.
    pub(super) fn applied_vector(&self) -> VersionVector {
        lock(&self.applied).clone()
    }

    /// The vector this node tells its peers it holds (Welcome, Ack): its
    /// applied vector, except that while it lacks own events a peer holds (see
    /// [`Engine::peer_holds_own`]) its own entry stays where it was when the
    /// store opened, so every peer sends it everything of its origin after
    /// that, the lost events included, even across reconnects.
    pub async fn advertised_vector(&self) -> Result<VersionVector> {
        let mut vector = self.applied_vector();
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
    ///
    /// The peer counts as heard from only once what it said is recorded: a
    /// start-up check that sees the peer heard from also sees the events it
    /// holds that the log lacks, so it never opens writes in between.
    pub async fn peer_holds_own(&self, peer: Ulid, hlc: Hlc) -> Result<bool> {
        let heard = || {
            self.own
                .heard_from
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(peer);
        };
        if hlc <= self.own.at_open || self.holds_own(hlc).await? {
            heard();
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
        heard();
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

    /// Whether the log holds this node's own event stamped `hlc`, or held it
    /// until compaction deleted it as superseded.
    async fn holds_own(&self, hlc: Hlc) -> Result<bool> {
        if hlc <= self.backend.compacted_upto(self.node_id).await? {
            return Ok(true);
        }
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
        self.log_after(have, limit)
            .await?
            .into_iter()
            .map(ChangeEvent::try_from)
            .collect()
    }

    /// [`Engine::events_after`] with the values and metadata left as the log
    /// stores them: what a sender streams.
    pub async fn log_after(&self, have: &VersionVector, limit: u32) -> Result<Vec<LoggedEvent>> {
        let mine = self.applied_vector();
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
        all.sort_by_key(LoggedEvent::order);
        all.truncate(limit as usize);
        Ok(all)
    }

    /// Records a peer's acknowledged vector. It is kept in memory (never
    /// lowered) and persisted by the next [`Engine::mark_synced`] pass: a lost
    /// ack only delays `synced_at`, since a peer's Welcome restates what it has.
    pub async fn record_ack(&self, peer: Ulid, vector: &VersionVector) -> Result<()> {
        self.load_acks(peer).await?;
        let mut acks = lock(&self.acks);
        let entry = acks.entry(peer).or_default();
        let before = entry.vector.clone();
        entry.vector.merge(vector);
        if entry.vector != before {
            entry.dirty = true;
            drop(acks);
            self.acked.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    /// Makes sure `peer`'s persisted progress is in memory.
    async fn load_acks(&self, peer: Ulid) -> Result<()> {
        if lock(&self.acks).contains_key(&peer) {
            return Ok(());
        }
        let persisted = self.backend.peer_progress(peer).await?;
        lock(&self.acks)
            .entry(peer)
            .or_insert_with(|| PeerAcks {
                vector: VersionVector::new(),
                dirty: false,
            })
            .vector
            .merge(&persisted);
        Ok(())
    }

    /// Persists the acks recorded since the last pass and sets `synced_at` on
    /// every event that all of `peers` have acknowledged, in one write
    /// transaction. With no peers nothing is marked: an event no peer holds is
    /// not synced.
    pub async fn mark_synced(&self, peers: &[Ulid]) -> Result<u64> {
        self.settle_acks(peers, None).await
    }

    /// Like [`Engine::mark_synced`] when no peer is waited for (every peer is
    /// released: see the sender's absent-peer limit): every event this node
    /// holds is marked synced, and recorded acks are persisted.
    pub async fn mark_all_synced(&self) -> Result<u64> {
        let everything = self.vector().await?;
        self.settle_acks(&[], Some(everything)).await
    }

    /// Brings `peers`' acks into memory (persisted ones first seen), and
    /// counts what this node holds of a peer's own origin as acknowledged by
    /// it: a peer holds its own events (it wrote them), and no one sends them
    /// back to it to be acknowledged.
    async fn refresh_acks(&self, peers: &[Ulid]) -> Result<()> {
        let held = self.vector().await?;
        for peer in peers {
            self.load_acks(*peer).await?;
            let own = held.get(*peer);
            if own > Hlc::ZERO {
                let mut acks = lock(&self.acks);
                let entry = acks.entry(*peer).or_default();
                if entry.vector.get(*peer) < own {
                    entry.vector.observe(*peer, own);
                    entry.dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Per origin, what every one of `peers` acknowledged (as in memory);
    /// `None` for no peers.
    fn acks_floor(&self, peers: &[Ulid]) -> Option<VersionVector> {
        let acks = lock(&self.acks);
        let mut floor: Option<VersionVector> = None;
        for peer in peers {
            let acked = acks.get(peer).map(|a| &a.vector);
            floor = Some(match (floor, acked) {
                (_, None) => VersionVector::new(),
                (None, Some(a)) => a.clone(),
                (Some(f), Some(a)) => VersionVector(
                    f.0.into_iter()
                        .filter_map(|(o, h)| {
                            let min = h.min(a.get(o));
                            (min > Hlc::ZERO).then_some((o, min))
                        })
                        .collect(),
                ),
            });
        }
        floor
    }

    /// Per origin, what every one of `peers` acknowledged; everything this
    /// node holds when there are none.
    pub(super) async fn acked_by_all(&self, peers: &[Ulid]) -> Result<VersionVector> {
        self.refresh_acks(peers).await?;
        Ok(match self.acks_floor(peers) {
            Some(floor) => floor,
            None => self.applied_vector(),
        })
    }

    /// Persists dirty acks and marks synced every event up to the floor of
    /// `peers`' acks, or up to `floor` when given.
    async fn settle_acks(&self, peers: &[Ulid], floor: Option<VersionVector>) -> Result<u64> {
        self.refresh_acks(peers).await?;
        let floor = floor.or_else(|| self.acks_floor(peers)).unwrap_or_default();
        let _w = self.writer.lock().await;
        let dirty: Vec<(Ulid, VersionVector)> = lock(&self.acks)
            .iter()
            .filter(|(_, a)| a.dirty)
            .map(|(p, a)| (*p, a.vector.clone()))
            .collect();
        if dirty.is_empty() && floor.0.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_log_tx().await?;
        let mut marked = 0;
        let done: Result<()> = async {
            for (peer, vector) in &dirty {
                self.backend.record_ack(&mut tx, *peer, vector).await?;
            }
            for (origin, upto) in &floor.0 {
                marked += self.backend.mark_synced(&mut tx, *origin, *upto).await?;
            }
            Ok(())
        }
        .await;
        match done {
            Ok(()) => self.commit_tx(tx).await?,
            Err(e) => {
                self.backend.rollback(tx).await?;
                return Err(e);
            }
        }
        let mut acks = lock(&self.acks);
        for (peer, vector) in dirty {
            if let Some(a) = acks.get_mut(&peer)
                && a.vector == vector
            {
                a.dirty = false;
            }
        }
        Ok(marked)
    }

    /// Forgets the progress of every peer not in `keep` (nodes removed from the
    /// cluster): its acks no longer count anywhere. Returns how many peers.
    pub async fn forget_peers(&self, keep: &[Ulid]) -> Result<u64> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_log_tx().await?;
        let n = match self.backend.forget_peers(&mut tx, keep).await {
            Ok(n) => n,
            Err(e) => {
                self.backend.rollback(tx).await?;
                return Err(e);
            }
        };
        self.commit_tx(tx).await?;
        lock(&self.acks).retain(|peer, _| keep.contains(peer));
        Ok(n)
    }

    /// How far `peer` is behind this node: the number of events this node holds
    /// that the peer has not acknowledged, and the wall time (ms) of the oldest.
    pub async fn peer_lag(&self, peer: Ulid) -> Result<(u64, Option<i64>)> {
        let acked = self.peer_progress(peer).await?;
        let (mut count, mut oldest) = (0u64, None::<i64>);
        for (origin, held) in self.positions() {
            let after = acked.get(origin);
            if held.hlc <= after {
                continue;
            }
            let Some(first) = self.backend.first_of_origin_after(origin, after).await? else {
                continue;
            };
            // An origin numbers its events without gaps, and nothing above a
            // peer's ack is compacted while the peer counts: from the first
            // one it lacks to the last one held, one each. Two index reads,
            // not a scan of the backlog every time the gauges refresh (every
            // second, for as long as a peer is away). Events stamped before
            // positions are counted in the log.
            count += match first.seq {
                Some(seq) if seq > 0 && held.seq >= seq => held.seq - seq + 1,
                _ => self.backend.count_of_origin_after(origin, after).await?,
            };
            oldest = Some(oldest.map_or(first.wall_ms, |o| o.min(first.wall_ms)));
        }
        Ok((count, oldest))
    }

    /// What `peer` has acknowledged: its last ack, persisted or not yet.
    pub async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        self.load_acks(peer).await?;
        Ok(lock(&self.acks)
            .get(&peer)
            .map(|a| a.vector.clone())
            .unwrap_or_default())
    }

    pub async fn count_unsynced(&self) -> Result<u64> {
        self.backend.count_unsynced().await
    }
}
