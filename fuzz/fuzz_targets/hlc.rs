//! The HLC: decoding stored and received values (`Hlc::decode`, `from_parts`, the
//! text form) and the clock's update rule under any sequence of local stamps,
//! remote observations and wall-clock jumps (a manual wall clock).
//!
//! Properties: decode(encode(x)) == x and the parts rebuild the value; the clock
//! never issues a timestamp twice or goes backwards; after observing a remote
//! timestamp every later one is above it; a refused observation names a timestamp
//! really beyond the drift bound.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tidemark_hlc::{Clock, ClockError, Hlc, MAX_WALL_MS, WallClock, manual};
use ulid::Ulid;

#[derive(Debug, Arbitrary)]
enum Op {
    Now,
    /// Observe a timestamp this many units from the current wall clock.
    ObserveNear(i32),
    /// Observe any raw value.
    ObserveRaw(i64),
    /// Move the wall clock by this many ms (either way).
    Jump(i32),
}

#[derive(Debug, Arbitrary)]
struct Input {
    raw: i64,
    wall_ms: i64,
    counter: u16,
    text: String,
    max_drift_ms: u32,
    start_ms: u32,
    ops: Vec<Op>,
}

fn decoding(input: &Input) {
    match Hlc::decode(input.raw) {
        Ok(h) => {
            assert_eq!(h.encode(), input.raw);
            assert_eq!(Hlc::from_parts(h.wall_ms(), h.counter()), Ok(h));
            assert_eq!(input.raw.to_string().parse::<Hlc>(), Ok(h));
        }
        Err(_) => assert!(input.raw < 0),
    }
    match Hlc::from_parts(input.wall_ms, input.counter) {
        Ok(h) => {
            assert_eq!((h.wall_ms(), h.counter()), (input.wall_ms, input.counter));
            assert_eq!(Hlc::decode(h.encode()), Ok(h));
        }
        Err(_) => assert!(!(0..=MAX_WALL_MS).contains(&input.wall_ms)),
    }
    if let Ok(h) = input.text.parse::<Hlc>() {
        assert_eq!(input.text.trim().parse::<i64>(), Ok(h.encode()));
    }
}

fn clock(input: &Input) {
    // A wall clock around 2026 so jumps and drift stay within the encoding.
    let mut wall = 1_764_000_000_000 + i64::from(input.start_ms);
    manual::set(wall);
    let max_drift_ms = u64::from(input.max_drift_ms % 86_400_001);
    let clock = Clock::new(Ulid::from_parts(1, 1), max_drift_ms, WallClock::Manual).expect("clock");
    let mut last = clock.now();
    for op in input.ops.iter().take(256) {
        match op {
            Op::Now => {
                let t = clock.now();
                assert!(t > last, "now went from {last:?} to {t:?}");
                last = t;
            }
            Op::ObserveNear(_) | Op::ObserveRaw(_) => {}
            Op::Jump(ms) => {
                wall = (wall + i64::from(*ms)).clamp(0, MAX_WALL_MS);
                manual::set(wall);
            }
        }
        let remote_raw = match op {
            Op::ObserveNear(delta) => (wall << 16).saturating_add(i64::from(*delta) * 997),
            Op::ObserveRaw(raw) => *raw,
            _ => continue,
        };
        let Ok(remote) = Hlc::decode(remote_raw) else {
            continue;
        };
        match clock.observe(remote) {
            Ok(()) => {
                let t = clock.now();
                assert!(t > remote && t > last, "{t:?} after observing {remote:?}");
                last = t;
            }
            Err(ClockError::DriftExceeded { ahead_ms, .. }) => {
                assert!(remote.encode() - (wall << 16) > (max_drift_ms as i64) << 16);
                assert!(ahead_ms >= max_drift_ms as i64);
                let t = clock.now();
                assert!(t > last, "refused observation moved the clock back");
                last = t;
            }
            Err(other) => panic!("unexpected clock error {other}"),
        }
    }
}

fuzz_target!(|input: Input| {
    decoding(&input);
    clock(&input);
});
