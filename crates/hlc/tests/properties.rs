//! Property tests of the clock on the thread-local manual wall clock.

use proptest::prelude::*;
use tidemark_hlc::{Clock, ClockError, Hlc, MAX_WALL_MS, WallClock, WriteOrder, manual};
use ulid::Ulid;

const BASE_MS: i64 = 1_764_000_000_000;

#[derive(Debug, Clone)]
enum Step {
    /// Move the wall clock by this many ms (negative = backwards jump).
    Jump(i64),
    /// Issue a local timestamp.
    Now,
    /// Observe a remote timestamp this many ms from the wall clock, with a counter.
    Observe(i64, u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (-10_000i64..10_000).prop_map(Step::Jump),
        6 => Just(Step::Now),
        3 => ((-20_000i64..20_000), any::<u16>()).prop_map(|(d, c)| Step::Observe(d, c)),
    ]
}

fn clock(max_drift_ms: u64) -> Clock {
    Clock::new(Ulid::from_parts(1, 7), max_drift_ms, WallClock::Manual).expect("clock")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Local timestamps strictly increase and exceed every accepted remote
    /// timestamp, whatever the wall clock does; refused remotes change nothing.
    #[test]
    fn monotonic_and_above_observed(steps in prop::collection::vec(step(), 1..200), drift in 0u64..8_000) {
        manual::set(BASE_MS);
        let clock = clock(drift);
        let mut wall = BASE_MS;
        let mut last_issued = Hlc::ZERO;
        let mut floor = Hlc::ZERO; // max of issued and accepted remote
        for step in steps {
            match step {
                Step::Jump(d) => { wall = (wall + d).max(0); manual::set(wall); }
                Step::Now => {
                    let ts = clock.now();
                    prop_assert!(ts > last_issued, "{ts:?} after {last_issued:?}");
                    prop_assert!(ts > floor, "{ts:?} not above {floor:?}");
                    prop_assert!(ts.wall_ms() >= wall, "timestamp behind wall clock");
                    last_issued = ts;
                    floor = floor.max(ts);
                }
                Step::Observe(d, c) => {
                    let remote = Hlc::from_parts(wall + d, c).expect("in range");
                    let ahead_ms = remote.wall_ms() - wall;
                    let res = clock.observe(remote);
                    // The bound compares full encodings: remote - now > drift << 16.
                    let refused = ahead_ms > drift as i64
                        || (ahead_ms == drift as i64 && c > 0);
                    if refused {
                        let is_drift = matches!(res, Err(ClockError::DriftExceeded { .. }));
                        prop_assert!(is_drift, "{remote:?} accepted at drift {drift}");
                        prop_assert!(clock.check_drift(remote).is_err());
                    } else {
                        prop_assert!(res.is_ok(), "{remote:?} refused: {res:?}");
                        prop_assert!(clock.check_drift(remote).is_ok());
                        floor = floor.max(remote);
                    }
                }
            }
        }
        let ts = clock.now();
        prop_assert!(ts > floor);
    }

    /// Encoding round-trips and preserves order of (wall_ms, counter).
    #[test]
    fn encoding_round_trips_and_orders(a in (0..=MAX_WALL_MS, any::<u16>()), b in (0..=MAX_WALL_MS, any::<u16>())) {
        let ha = Hlc::from_parts(a.0, a.1).expect("a");
        let hb = Hlc::from_parts(b.0, b.1).expect("b");
        prop_assert_eq!(Hlc::decode(ha.encode()).expect("decode"), ha);
        prop_assert_eq!((ha.wall_ms(), ha.counter()), a);
        prop_assert_eq!(ha.cmp(&hb), a.cmp(&b));
        prop_assert_eq!(ha.encode().cmp(&hb.encode()), a.cmp(&b));
    }

    /// A restarted clock seeded with the persisted maximum never issues a lower
    /// timestamp, even when the wall clock moved back within the drift bound.
    #[test]
    fn seed_never_goes_backwards(n in 1usize..300, back_ms in 0i64..5_000, drift in 0u64..6_000) {
        manual::set(BASE_MS);
        let before = clock(drift);
        let mut persisted = Hlc::ZERO;
        for _ in 0..n { persisted = before.now(); }
        manual::set(BASE_MS - back_ms);
        let after = clock(drift);
        let seeded = after.seed(persisted);
        // persisted is at BASE_MS (plus counter), so it is back_ms ahead of the wall.
        let ahead = persisted.encode() - ((BASE_MS - back_ms) << 16);
        if ahead > (drift as i64) << 16 {
            let is_ahead_err = matches!(seeded, Err(ClockError::PersistedAhead { .. }));
            prop_assert!(is_ahead_err, "{seeded:?}");
        } else {
            prop_assert!(seeded.is_ok(), "{seeded:?}");
            prop_assert!(after.now() > persisted);
        }
    }

    /// The write order is lexicographic on (hlc, node_id, event_id) and agrees with
    /// the order of the ULIDs' canonical text (what SQL ORDER BY compares).
    #[test]
    fn write_order_matches_text_order(a in any::<(i64, u128, u128)>(), b in any::<(i64, u128, u128)>()) {
        let wa = WriteOrder { hlc: Hlc::decode(a.0.abs()).expect("hlc"), node_id: Ulid(a.1), event_id: Ulid(a.2) };
        let wb = WriteOrder { hlc: Hlc::decode(b.0.abs()).expect("hlc"), node_id: Ulid(b.1), event_id: Ulid(b.2) };
        let text = |w: &WriteOrder| (w.hlc, w.node_id.to_string(), w.event_id.to_string());
        prop_assert_eq!(wa.cmp(&wb), text(&wa).cmp(&text(&wb)));
    }
}

#[test]
fn counter_overflow_carries_into_wall_and_stays_increasing() {
    manual::set(BASE_MS);
    let clock = clock(1_000);
    let mut prev = clock.now();
    for _ in 0..200_000 {
        let ts = clock.now();
        assert!(ts > prev);
        prev = ts;
    }
    assert!(
        prev.wall_ms() > BASE_MS,
        "counter overflow must borrow from the next ms"
    );
}

#[test]
fn drift_error_names_the_numbers() {
    manual::set(BASE_MS);
    let clock = clock(2_000);
    let far = Hlc::from_parts(BASE_MS + 3_600_000, 0).expect("far");
    let err = clock.observe(far).expect_err("far future must be refused");
    let msg = err.to_string();
    assert!(msg.contains("3600000 ms ahead"), "{msg}");
    assert!(msg.contains("max drift is 2000 ms"), "{msg}");
    // The refused timestamp left the clock where it was.
    assert!(clock.now().wall_ms() < BASE_MS + 3_600_000);
    // i64::MAX as a remote timestamp is refused too.
    let max = Hlc::decode(i64::MAX).expect("max");
    assert!(clock.observe(max).is_err());
}
