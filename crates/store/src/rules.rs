//! The replication rules, as pure functions shared by every backend.
//!
//! * **Causality**: each version of a record carries a version vector (origin ->
//!   highest HLC of that origin's writes the version has seen). A version whose
//!   vector covers another's has seen it.
//! * **Frontier**: a record keeps its *maximal* versions, those no other version
//!   has seen. An incoming version that some member has seen is old and changes
//!   nothing; otherwise it joins the frontier and evicts the members it has seen.
//!   One member: no conflict. Several: concurrent versions, a conflict.
//! * **Winner**: the frontier member greatest by `(hlc, node_id, event_id)`. A
//!   version that has seen another has a greater HLC (the HLC respects causality),
//!   so this is also the greatest version ever written, tombstones included: an
//!   older update arriving after a newer delete never resurrects the row.
//!
//! * **Conflicts** are read off a record's history, not off the order it
//!   arrived in: a version *lost* when a greater version (by the total order) is
//!   concurrent with it. Its conflict shows the greatest such version (the
//!   winner), arose with the least (the first write that beat it), and closed
//!   with the least version that has seen it, if any. Open conflicts are exactly
//!   the frontier's members other than its winner.
//!
//! Laws (property-tested below): the frontier is the set of maximal elements of
//! every version received, so any order and any duplication of the same versions
//! give the same frontier, the same winner and the same merged vector; a
//! record's conflicts kept up as versions arrive, in any order, are those of
//! its whole history.

use crate::model::{Member, Version};

/// How an incoming version relates causally to the record's current versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// No local version: the record is new here.
    New,
    /// The incoming version has seen every current version (fast-forward).
    Newer,
    /// A current version has seen the incoming one: it is old.
    Older,
    /// The incoming version is concurrent with some current version.
    Concurrent,
}

/// Decision for one incoming version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub causality: Causality,
    /// Whether the incoming version becomes the record's current (winning) version.
    pub incoming_wins: bool,
    /// The record's version afterwards.
    pub next: Version,
    /// Members that left the frontier because the incoming version has seen them.
    pub superseded: Vec<Member>,
}

/// Decides what an incoming version does to a record whose version is `local`.
pub fn resolve(local: Option<&Version>, incoming: &Member) -> Resolution {
    let Some(local) = local else {
        return Resolution {
            causality: Causality::New,
            incoming_wins: true,
            next: Version::single(incoming.clone()),
            superseded: Vec::new(),
        };
    };
    let mut vv = local.vv.clone();
    vv.merge(&incoming.vv);
    let seen = local
        .frontier
        .iter()
        .any(|m| m.event_id == incoming.event_id || m.vv.covers(&incoming.vv));
    if seen {
        return Resolution {
            causality: Causality::Older,
            incoming_wins: false,
            next: Version {
                vv,
                ..local.clone()
            },
            superseded: Vec::new(),
        };
    }
    let (superseded, mut frontier): (Vec<Member>, Vec<Member>) = local
        .frontier
        .iter()
        .cloned()
        .partition(|m| incoming.vv.covers(&m.vv));
    let causality = if frontier.is_empty() {
        Causality::Newer
    } else {
        Causality::Concurrent
    };
    frontier.push(incoming.clone());
    frontier.sort_by_key(Member::order);
    let winner = frontier.last().cloned().unwrap_or_else(|| incoming.clone());
    Resolution {
        causality,
        incoming_wins: winner.event_id == incoming.event_id,
        next: Version {
            hlc: winner.hlc,
            node_id: winner.node_id,
            event_id: winner.event_id,
            deleted: winner.deleted,
            vv,
            frontier,
        },
        superseded,
    }
}

/// Neither version has seen the other.
pub fn concurrent(a: &Member, b: &Member) -> bool {
    a.event_id != b.event_id && !a.vv.covers(&b.vv) && !b.vv.covers(&a.vv)
}

/// `later` has seen `earlier` (a version has not seen itself).
pub fn has_seen(later: &Member, earlier: &Member) -> bool {
    later.event_id != earlier.event_id && later.vv.covers(&earlier.vv)
}

/// The conflict a version is the losing side of, within a record's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost<'a> {
    pub loser: &'a Member,
    /// The greatest version concurrent with the loser.
    pub winner: &'a Member,
    /// The least greater version concurrent with it: when the conflict arose.
    pub arose: &'a Member,
    /// The least version that has seen it: the write that ended the conflict.
    pub closer: Option<&'a Member>,
}

/// The conflict `loser` lost within `history` (duplicates allowed), if a greater
/// concurrent version exists there.
pub fn lost<'a>(loser: &'a Member, history: &'a [Member]) -> Option<Lost<'a>> {
    let beat = || {
        history
            .iter()
            .filter(|h| h.order() > loser.order() && concurrent(h, loser))
    };
    let winner = beat().max_by_key(|h| h.order())?;
    let arose = beat().min_by_key(|h| h.order())?;
    let closer = history
        .iter()
        .filter(|h| has_seen(h, loser))
        .min_by_key(|h| h.order());
    Some(Lost {
        loser,
        winner,
        arose,
        closer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VersionVector;
    use proptest::prelude::*;
    use tidemark_hlc::Hlc;
    use ulid::Ulid;

    fn member(hlc: i64, node: u128, deleted: bool, seen: &[&Member]) -> Member {
        let mut vv = VersionVector::new();
        for m in seen {
            vv.merge(&m.vv);
        }
        let hlc = Hlc::decode(hlc).expect("hlc");
        vv.observe(Ulid(node), hlc);
        Member {
            event_id: Ulid::generate(),
            hlc,
            node_id: Ulid(node),
            deleted,
            vv,
        }
    }

    fn fold(members: &[Member]) -> Option<Version> {
        let mut cur: Option<Version> = None;
        for m in members {
            cur = Some(resolve(cur.as_ref(), m).next);
        }
        cur
    }

    #[test]
    fn causal_successor_fast_forwards() {
        let a = member(10, 1, false, &[]);
        let b = member(20, 2, false, &[&a]);
        let va = Version::single(a.clone());
        let r = resolve(Some(&va), &b);
        assert_eq!(r.causality, Causality::Newer);
        assert!(r.incoming_wins);
        assert_eq!(r.next.frontier.len(), 1);
        assert_eq!(r.superseded, vec![a.clone()]);
        let r = resolve(Some(&r.next), &a);
        assert_eq!(r.causality, Causality::Older);
        assert!(!r.incoming_wins);
    }

    #[test]
    fn concurrent_writes_keep_both_and_tie_break_on_node() {
        let a = member(10, 1, false, &[]);
        let b = member(10, 2, false, &[]);
        let r = resolve(Some(&Version::single(a.clone())), &b);
        assert_eq!(r.causality, Causality::Concurrent);
        assert!(r.incoming_wins, "same hlc: the greater node id wins");
        assert_eq!(r.next.frontier, vec![a.clone(), b.clone()]);
        // A write that has seen both resolves the conflict.
        let c = member(30, 3, false, &[&a, &b]);
        let r = resolve(Some(&r.next), &c);
        assert_eq!(r.causality, Causality::Newer);
        assert_eq!(r.next.frontier, vec![c]);
        assert_eq!(r.superseded.len(), 2);
    }

    #[test]
    fn late_older_update_does_not_resurrect_a_delete() {
        let update = member(10, 1, false, &[]);
        let delete = member(20, 2, true, &[]);
        let r = resolve(Some(&Version::single(delete)), &update);
        assert!(!r.incoming_wins);
        assert!(r.next.deleted);
    }

    /// A causally consistent history: nodes write on top of what they know, and
    /// now and then learn everything another node knows.
    fn history() -> impl Strategy<Value = Vec<Member>> {
        prop::collection::vec((0u8..3, 0u8..3, any::<bool>(), any::<bool>()), 1..24)
            .prop_map(|steps| {
                let mut known: Vec<Vec<Member>> = vec![Vec::new(); 3];
                let mut clock = [0i64; 3];
                let mut all = Vec::new();
                for (node, other, sync, deleted) in steps {
                    let (n, o) = (node as usize, other as usize);
                    if sync && n != o {
                        let theirs = known[o].clone();
                        for m in theirs {
                            if !known[n].iter().any(|k| k.event_id == m.event_id) {
                                clock[n] = clock[n].max(m.hlc.encode());
                                known[n].push(m);
                            }
                        }
                        continue;
                    }
                    clock[n] += 1;
                    let seen: Vec<&Member> = known[n].iter().collect();
                    let m = member(clock[n], n as u128 + 1, deleted, &seen);
                    known[n].push(m.clone());
                    all.push(m);
                }
                all
            })
            .prop_filter("at least one write", |all| !all.is_empty())
    }

    fn is_maximal(m: &Member, all: &[Member]) -> bool {
        !all.iter()
            .any(|o| o.event_id != m.event_id && o.vv.covers(&m.vv))
    }

    proptest! {
        /// Any permutation, with duplicates, gives the same version; the frontier is
        /// exactly the maximal versions and the winner is the greatest version.
        #[test]
        fn fold_is_order_and_duplicate_independent(
            versions in history(),
            perm_seed in any::<u64>(),
            dups in prop::collection::vec(0usize..64, 0..8),
        ) {
            let reference = fold(&versions).expect("non-empty");
            let mut shuffled = versions.clone();
            for d in dups { let v = shuffled[d % shuffled.len()].clone(); shuffled.push(v); }
            let mut s = perm_seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (s >> 33) as usize % (i + 1);
                shuffled.swap(i, j);
            }
            prop_assert_eq!(fold(&shuffled).expect("non-empty"), reference.clone());
            let max = versions.iter().max_by_key(|v| v.order()).expect("non-empty");
            prop_assert_eq!(reference.event_id, max.event_id);
            prop_assert_eq!(reference.deleted, max.deleted);
            let mut maximal: Vec<Ulid> = versions.iter().filter(|m| is_maximal(m, &versions)).map(|m| m.event_id).collect();
            maximal.sort();
            let mut got: Vec<Ulid> = reference.frontier.iter().map(|m| m.event_id).collect();
            got.sort();
            prop_assert_eq!(got, maximal);
        }

        /// Open conflicts (no version has seen the loser) are the frontier's
        /// members but its winner, each shown against the winner.
        #[test]
        fn open_conflicts_are_the_frontier(versions in history()) {
            let version = fold(&versions).expect("non-empty");
            let winner = version.frontier.last().expect("winner");
            let mut open: Vec<Ulid> = Vec::new();
            for v in &versions {
                if let Some(l) = lost(v, &versions) && l.closer.is_none() {
                    prop_assert_eq!(l.winner.event_id, winner.event_id);
                    open.push(v.event_id);
                }
            }
            open.sort();
            let mut losers: Vec<Ulid> = version.frontier[..version.frontier.len() - 1]
                .iter()
                .map(|m| m.event_id)
                .collect();
            losers.sort();
            prop_assert_eq!(open, losers);
        }

        /// Conflicts kept up as versions arrive (the way the engine does: a
        /// fast-forward only closes the conflicts of the versions it
        /// supersedes; any other arrival recomputes those it is concurrent
        /// with and closes those it has seen) end as those of the whole
        /// history, in any arrival order, with duplicates.
        #[test]
        fn kept_up_conflicts_match_the_whole_history(
            versions in history(),
            perm_seed in any::<u64>(),
            dups in prop::collection::vec(0usize..64, 0..8),
        ) {
            type Row = (Ulid, Ulid, Option<Ulid>);
            let row = |l: Lost<'_>| (l.winner.event_id, l.arose.event_id, l.closer.map(|c| c.event_id));
            let mut arrivals = versions.clone();
            for d in dups { let v = arrivals[d % arrivals.len()].clone(); arrivals.push(v); }
            let mut s = perm_seed;
            for i in (1..arrivals.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (s >> 33) as usize % (i + 1);
                arrivals.swap(i, j);
            }
            let mut held: Vec<Member> = Vec::new();
            let mut rows: std::collections::BTreeMap<Ulid, Row> = Default::default();
            let mut cur: Option<Version> = None;
            for e in arrivals {
                if held.iter().any(|h| h.event_id == e.event_id) {
                    continue;
                }
                let r = resolve(cur.as_ref(), &e);
                cur = Some(r.next.clone());
                held.push(e.clone());
                match r.causality {
                    Causality::New => {}
                    Causality::Newer => {
                        for m in &r.superseded {
                            if let Some(row) = rows.get_mut(&m.event_id) && row.2.is_none() {
                                row.2 = Some(e.event_id);
                            }
                        }
                    }
                    Causality::Concurrent | Causality::Older => {
                        for l in held.iter().filter(|l| l.event_id == e.event_id || concurrent(l, &e)) {
                            if let Some(found) = lost(l, &held) {
                                rows.insert(l.event_id, row(found));
                            }
                        }
                        for (loser, row) in rows.iter_mut() {
                            let l = held.iter().find(|h| h.event_id == *loser).expect("held");
                            if has_seen(&e, l) {
                                let earlier = row.2.and_then(|c| held.iter().find(|h| h.event_id == c));
                                if earlier.is_none_or(|c| e.order() < c.order()) {
                                    row.2 = Some(e.event_id);
                                }
                            }
                        }
                    }
                }
            }
            let full: std::collections::BTreeMap<Ulid, Row> = versions
                .iter()
                .filter_map(|v| lost(v, &versions).map(|l| (v.event_id, row(l))))
                .collect();
            prop_assert_eq!(rows, full);
        }
    }
}
