//! Whether this node has caught up since it started: the state behind `/readyz`.
//!
//! A node that starts (new and empty, restarted after a while, restored from a
//! file snapshot) holds less than its peers. It is *waiting for a peer* until
//! one of its sessions is welcomed, *catching up* while its positions are
//! below what a welcomed peer held at its welcome (each [`pb::Welcome`] carries
//! the receiver's positions) or while configured peers it has not heard from
//! may still answer, and *active* from the moment it holds all of it.
//!
//! Invariants:
//! * never active before it is: with peers configured, active needs at least
//!   one welcome, a welcome from every configured peer or the grace
//!   (`replication.startup_check_ms`, counted from start) over, and every
//!   position of every peer welcomed before then covered (HLC and number) by
//!   this node's own: a peer that answers a moment after another cannot be
//!   left out because the node caught up with the first one quickly;
//! * what a peer held at its welcome is the whole target: events written
//!   later are lag (the lag metrics), not catching up, so a node under
//!   continuous writes still becomes active;
//! * an origin this node holds at an event (beyond its max drift, a second
//!   writer, malformed: see `Ack.held`) is left out of the target, so one bad
//!   origin cannot keep a node unready forever; the hold is reported where it
//!   is (peer status, `tidemark_peer_held_origins`) and logged when leaving it
//!   out decided readiness;
//! * active is kept until the daemon stops (later lag is lag);
//! * no configured peer: active at once.
//!
//! [`pb::Welcome`]: crate::pb::Welcome

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark_store::{Position, Store};
use tokio_util::sync::CancellationToken;
use tracing::info;
use ulid::Ulid;

/// How long after start configured peers not heard from are waited for,
/// unless [`CatchUp::set_grace`] says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Where the node stands since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Peers are configured and none has welcomed a session yet.
    WaitingForPeer,
    /// Holds less than a welcomed peer held at its welcome, or a configured
    /// peer has not answered yet within the grace.
    CatchingUp,
    /// Holds what every welcomed peer held at its welcome, every configured
    /// peer having answered or the grace being over.
    Active,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::WaitingForPeer, Phase::CatchingUp, Phase::Active];

    /// The name shown in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::WaitingForPeer => "waiting_for_peer",
            Phase::CatchingUp => "catching_up",
            Phase::Active => "active",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The phase and what is left, as of one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpStatus {
    pub phase: Phase,
    /// Events of the target this node lacks, counted by their numbers (events
    /// a peer compacted count too: an upper bound then). 0 when active.
    pub remaining_events: u64,
    /// Origins still below the target.
    pub origins_behind: Vec<Ulid>,
    /// Peers whose welcome set the target.
    pub peers_heard: Vec<Ulid>,
    /// Origins left out of the target because this node holds them.
    pub held_origins: Vec<Ulid>,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Until when a configured peer not heard from yet is waited for.
    grace_until: Instant,
    /// Per origin, the greatest position a welcomed peer reported.
    target: BTreeMap<Ulid, Position>,
    heard: BTreeSet<Ulid>,
    held: BTreeSet<Ulid>,
}

/// The node's catch-up state, shared by the sender (welcomes), the receiver
/// (origins it holds) and whoever reports it (`/readyz`, metrics, status).
/// Cloned handles share one state.
#[derive(Debug, Clone)]
pub struct CatchUp(Arc<Mutex<State>>);

impl CatchUp {
    /// `has_peers`: whether any peer is configured at start. Configured peers
    /// not heard from are waited for up to [`DEFAULT_GRACE`] from now (see
    /// [`CatchUp::set_grace`]).
    pub fn new(has_peers: bool) -> Self {
        let phase = if has_peers {
            Phase::WaitingForPeer
        } else {
            Phase::Active
        };
        CatchUp(Arc::new(Mutex::new(State {
            phase,
            grace_until: Instant::now() + DEFAULT_GRACE,
            target: BTreeMap::new(),
            heard: BTreeSet::new(),
            held: BTreeSet::new(),
        })))
    }

    /// Waits for configured peers not heard from up to `grace` after start
    /// (`replication.startup_check_ms`; 0: only for the first).
    pub fn set_grace(&self, grace: Duration) {
        let mut s = self.state();
        s.grace_until = s.grace_until - DEFAULT_GRACE + grace;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.state().phase
    }

    pub fn is_active(&self) -> bool {
        self.phase() == Phase::Active
    }

    /// `peer` welcomed a session holding `theirs`. Only a peer's first
    /// welcome since start counts, and none once active; the next
    /// [`CatchUp::observe`] decides.
    pub fn welcomed(&self, peer: Ulid, theirs: &BTreeMap<Ulid, Position>) {
        let mut s = self.state();
        if s.phase == Phase::Active || !s.heard.insert(peer) {
            return;
        }
        for (origin, p) in theirs {
            let t = s.target.entry(*origin).or_default();
            t.hlc = t.hlc.max(p.hlc);
            t.seq = t.seq.max(p.seq);
        }
        s.phase = Phase::CatchingUp;
    }

    /// This node holds `origin` at an event: it is left out of the target.
    pub fn origin_held(&self, origin: Ulid) {
        let mut s = self.state();
        if s.phase != Phase::Active {
            s.held.insert(origin);
        }
    }

    /// No peer is configured any more (the list was reloaded): nothing to
    /// catch up with.
    pub fn no_peers(&self) {
        let mut s = self.state();
        if s.phase == Phase::WaitingForPeer {
            s.phase = Phase::Active;
            info!("no peer configured: active");
        }
    }

    /// Looks again with this node's positions now and the peers configured
    /// now; returns the phase.
    pub fn observe(&self, local: &BTreeMap<Ulid, Position>, configured: &[Ulid]) -> Phase {
        let mut s = self.state();
        if s.phase == Phase::CatchingUp {
            let unheard: Vec<Ulid> = configured
                .iter()
                .filter(|p| !s.heard.contains(p))
                .copied()
                .collect();
            if unheard.is_empty() || Instant::now() >= s.grace_until {
                settle(&mut s, local, &unheard);
            }
        }
        s.phase
    }

    /// The phase and what is left against `local`.
    pub fn status(&self, local: &BTreeMap<Ulid, Position>) -> CatchUpStatus {
        let s = self.state();
        let (remaining_events, origins_behind) = if s.phase == Phase::Active {
            (0, Vec::new())
        } else {
            behind(&s, local)
        };
        CatchUpStatus {
            phase: s.phase,
            remaining_events,
            origins_behind,
            peers_heard: s.heard.iter().copied().collect(),
            held_origins: s.held.iter().copied().collect(),
        }
    }

    /// Follows the store's commits until the node is active (or `cancel`).
    pub async fn watch(self, store: Store, peers: crate::PeerSet, cancel: CancellationToken) {
        let mut commits = store.subscribe_commits();
        let mut listed = peers.subscribe();
        loop {
            if peers.ids().is_empty() {
                self.no_peers();
            }
            if self.observe(&store.positions(), &peers.ids()) == Phase::Active {
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = commits.changed() => if r.is_err() { return },
                r = listed.changed() => if r.is_err() { return },
                // A welcome changes the target without a commit.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// Events and origins of the target `local` lacks (held origins left out).
fn behind(s: &State, local: &BTreeMap<Ulid, Position>) -> (u64, Vec<Ulid>) {
    let mut events = 0u64;
    let mut origins = Vec::new();
    for (origin, t) in &s.target {
        if s.held.contains(origin) {
            continue;
        }
        let here = local.get(origin).copied().unwrap_or_default();
        if here.hlc < t.hlc || here.seq < t.seq {
            events += t.seq.saturating_sub(here.seq);
            origins.push(*origin);
        }
    }
    (events, origins)
}

/// Active if `local` covers the target; `unheard`: configured peers that did
/// not answer within the grace.
fn settle(s: &mut State, local: &BTreeMap<Ulid, Position>, unheard: &[Ulid]) {
    let (_, origins) = behind(s, local);
    if !origins.is_empty() {
        return;
    }
    s.phase = Phase::Active;
    let peers: Vec<String> = s.heard.iter().map(Ulid::to_string).collect();
    if s.held.is_empty() && unheard.is_empty() {
        info!(peers = ?peers, "caught up with the peers: active");
    } else {
        let held: Vec<String> = s.held.iter().map(Ulid::to_string).collect();
        let unheard: Vec<String> = unheard.iter().map(Ulid::to_string).collect();
        tracing::warn!(
            peers = ?peers,
            held = ?held,
            unheard = ?unheard,
            "caught up with the peers that answered, except origins this node holds (see admin status): active; peers that did not answer within replication.startup_check_ms were not waited for"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_hlc::Hlc;

    fn pos(wall_ms: i64, seq: u64) -> Position {
        Position {
            hlc: Hlc::from_parts(wall_ms, 0).expect("hlc"),
            seq,
        }
    }

    #[test]
    fn active_only_once_every_welcomed_position_is_held() {
        let (a, b, peer) = (Ulid::generate(), Ulid::generate(), Ulid::generate());
        let c = CatchUp::new(true);
        let empty = BTreeMap::new();
        assert_eq!(c.observe(&empty, &[peer]), Phase::WaitingForPeer);
        let theirs = BTreeMap::from([(a, pos(10, 5)), (b, pos(20, 3))]);
        c.welcomed(peer, &theirs);
        assert_eq!(c.phase(), Phase::CatchingUp);
        let status = c.status(&BTreeMap::from([(a, pos(10, 5))]));
        assert_eq!(status.remaining_events, 3);
        assert_eq!(status.origins_behind, vec![b]);
        // The HLC reached but not the number (or the reverse): still behind.
        assert_eq!(
            c.observe(&BTreeMap::from([(a, pos(10, 5)), (b, pos(20, 2))]), &[peer]),
            Phase::CatchingUp
        );
        assert_eq!(
            c.observe(&BTreeMap::from([(a, pos(10, 4)), (b, pos(20, 3))]), &[peer]),
            Phase::CatchingUp
        );
        let caught = BTreeMap::from([(a, pos(11, 6)), (b, pos(20, 3))]);
        assert_eq!(c.observe(&caught, &[peer]), Phase::Active);
        // Kept: lag after that is lag.
        assert_eq!(c.observe(&empty, &[peer]), Phase::Active);
        c.welcomed(Ulid::generate(), &BTreeMap::from([(a, pos(99, 99))]));
        assert_eq!(c.phase(), Phase::Active);
    }

    #[test]
    fn a_second_welcome_raises_the_target_and_a_held_origin_leaves_it() {
        let (a, b) = (Ulid::generate(), Ulid::generate());
        let (p, q) = (Ulid::generate(), Ulid::generate());
        let c = CatchUp::new(true);
        c.welcomed(p, &BTreeMap::from([(a, pos(10, 5))]));
        c.welcomed(q, &BTreeMap::from([(a, pos(12, 6)), (b, pos(5, 1))]));
        let have_a = BTreeMap::from([(a, pos(10, 5))]);
        assert_eq!(c.observe(&have_a, &[p, q]), Phase::CatchingUp);
        assert_eq!(c.status(&have_a).remaining_events, 2);
        // A repeated welcome of the same peer (a reconnect) changes nothing.
        c.welcomed(p, &BTreeMap::from([(a, pos(50, 50))]));
        c.origin_held(b);
        assert_eq!(
            c.observe(&BTreeMap::from([(a, pos(12, 6))]), &[p, q]),
            Phase::Active
        );
    }

    #[test]
    fn a_peer_not_heard_from_is_waited_for_until_the_grace_ends() {
        let a = Ulid::generate();
        let (p, q) = (Ulid::generate(), Ulid::generate());
        let c = CatchUp::new(true);
        c.welcomed(p, &BTreeMap::from([(a, pos(10, 5))]));
        let caught = BTreeMap::from([(a, pos(10, 5))]);
        // Caught up with p, but q may hold more and has not answered yet.
        assert_eq!(c.observe(&caught, &[p, q]), Phase::CatchingUp);
        // Once q answers with nothing more, or the grace is over, active.
        let d = CatchUp::new(true);
        d.welcomed(p, &BTreeMap::from([(a, pos(10, 5))]));
        d.set_grace(Duration::ZERO);
        assert_eq!(d.observe(&caught, &[p, q]), Phase::Active);
        c.welcomed(q, &BTreeMap::from([(a, pos(9, 4))]));
        assert_eq!(c.observe(&caught, &[p, q]), Phase::Active);
    }

    #[test]
    fn without_peers_the_node_is_active_at_once() {
        assert_eq!(CatchUp::new(false).phase(), Phase::Active);
        let c = CatchUp::new(true);
        c.no_peers();
        assert!(c.is_active());
    }
}
