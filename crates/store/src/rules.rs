//! The replication rules, as pure functions shared by every backend.
//!
//! * **Winner**: of two versions of a record, the one later in the total order
//!   `(hlc, node_id, event_id)` wins, on every node, whatever the delivery order.
//!   Deletes are versions too (tombstones), so an older update arriving after a
//!   newer delete loses and never resurrects the row.
//! * **Causality**: each version carries a version vector (origin -> highest HLC of
//!   that origin's writes the version has seen). An incoming version whose vector
//!   covers the local one is a fast-forward; one the local vector covers is old;
//!   otherwise the two are concurrent (a conflict). The merged vector is the
//!   pointwise maximum, so it too is independent of delivery order.
//!
//! Laws (property-tested): `resolve` picks the maximum by the total order, so folding
//! any permutation of a set of versions, with any duplication, ends in the same
//! winner and the same merged vector.

use crate::model::{Version, VersionVector};

/// How an incoming version relates causally to the local one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// No local version: the record is new here.
    New,
    /// The incoming version has seen everything the local one has, and more.
    Newer,
    /// The local version has seen everything the incoming one has.
    Older,
    /// Neither has seen the other: concurrent writes.
    Concurrent,
}

/// Decision for one incoming version against the local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub causality: Causality,
    /// Whether the incoming version becomes the record's current version.
    pub incoming_wins: bool,
    /// The record's version after the decision (winner's identity, merged vector).
    pub next: Version,
}

/// Compares two vectors causally.
pub fn causality(incoming: &VersionVector, local: &VersionVector) -> Causality {
    match (incoming.covers(local), local.covers(incoming)) {
        (_, true) => Causality::Older,
        (true, false) => Causality::Newer,
        (false, false) => Causality::Concurrent,
    }
}

/// Decides what an incoming version does to a record whose current version is `local`.
pub fn resolve(local: Option<&Version>, incoming: &Version) -> Resolution {
    let Some(local) = local else {
        return Resolution {
            causality: Causality::New,
            incoming_wins: true,
            next: incoming.clone(),
        };
    };
    let causality = causality(&incoming.vv, &local.vv);
    let incoming_wins = incoming.order() > local.order();
    let mut vv = local.vv.clone();
    vv.merge(&incoming.vv);
    let winner = if incoming_wins { incoming } else { local };
    Resolution {
        causality,
        incoming_wins,
        next: Version {
            vv,
            ..winner.clone()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tidemark_hlc::Hlc;
    use ulid::Ulid;

    fn version(hlc: i64, node: u128, event: u128, deleted: bool, vv: &[(u128, i64)]) -> Version {
        let mut v = VersionVector::new();
        for (n, h) in vv {
            v.observe(Ulid(*n), Hlc::decode(*h).expect("hlc"));
        }
        v.observe(Ulid(node), Hlc::decode(hlc).expect("hlc"));
        Version {
            hlc: Hlc::decode(hlc).expect("hlc"),
            node_id: Ulid(node),
            event_id: Ulid(event),
            deleted,
            vv: v,
        }
    }

    #[test]
    fn causal_successor_is_newer_and_wins() {
        let a = version(10, 1, 100, false, &[]);
        let b = version(20, 2, 200, false, &[(1, 10)]);
        let r = resolve(Some(&a), &b);
        assert_eq!(r.causality, Causality::Newer);
        assert!(r.incoming_wins);
        let r = resolve(Some(&b), &a);
        assert_eq!(r.causality, Causality::Older);
        assert!(!r.incoming_wins);
    }

    #[test]
    fn concurrent_writes_tie_break_on_node() {
        let a = version(10, 1, 100, false, &[]);
        let b = version(10, 2, 200, false, &[]);
        let r = resolve(Some(&a), &b);
        assert_eq!(r.causality, Causality::Concurrent);
        assert!(r.incoming_wins, "same hlc: the greater node id wins");
        assert_eq!(r.next.vv.get(Ulid(1)), Hlc::decode(10).expect("hlc"));
        assert_eq!(r.next.vv.get(Ulid(2)), Hlc::decode(10).expect("hlc"));
    }

    #[test]
    fn late_older_update_does_not_resurrect_a_delete() {
        let update = version(10, 1, 100, false, &[]);
        let delete = version(20, 2, 200, true, &[]);
        let r = resolve(Some(&delete), &update);
        assert!(!r.incoming_wins);
        assert!(r.next.deleted);
    }

    fn arb_version() -> impl Strategy<Value = Version> {
        (
            1i64..50,
            1u128..5,
            any::<u128>(),
            any::<bool>(),
            prop::collection::vec((1u128..5, 1i64..50), 0..4),
        )
            .prop_map(|(h, n, e, d, vv)| version(h, n, e, d, &vv))
    }

    proptest! {
        /// Folding any permutation, with duplicates, gives the same record version.
        #[test]
        fn fold_is_order_and_duplicate_independent(
            versions in prop::collection::vec(arb_version(), 1..12),
            perm_seed in any::<u64>(),
            dups in prop::collection::vec(0usize..12, 0..6),
        ) {
            let fold = |vs: &[Version]| {
                let mut cur: Option<Version> = None;
                for v in vs {
                    cur = Some(resolve(cur.as_ref(), v).next);
                }
                cur
            };
            let reference = fold(&versions);
            let mut shuffled = versions.clone();
            for d in dups { let v = shuffled[d % shuffled.len()].clone(); shuffled.push(v); }
            // Deterministic Fisher-Yates from the seed.
            let mut s = perm_seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (s >> 33) as usize % (i + 1);
                shuffled.swap(i, j);
            }
            let got = fold(&shuffled);
            prop_assert_eq!(&got, &reference);
            // And the winner is the maximum by the total order.
            let max = versions.iter().max_by_key(|v| v.order()).expect("non-empty");
            let got = got.expect("some");
            prop_assert_eq!(got.event_id, max.event_id);
            prop_assert_eq!(got.deleted, max.deleted);
        }
    }
}
