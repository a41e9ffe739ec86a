//! Hybrid logical clock for Tidemark, in the seed encoding.
//!
//! A timestamp is a signed 64-bit integer `(wall_ms << 16) | logical_counter`
//! ([`Hlc`]), stored as `BIGINT`/`INTEGER` by the store. The clock ([`Clock`]) is
//! built on [`uhlc`]: uhlc is handed a wall clock that already returns seed-encoded
//! values (`wall_ms << 16`), so uhlc's update rule (`max(now, remote + 1, last + 1)`)
//! and its drift check run directly on seed-encoded numbers. uhlc's native NTP64
//! format is never converted to or from the seed encoding (that conversion is lossy
//! and does not preserve order).
//!
//! Guarantees (property-tested in `tests/`):
//! * [`Clock::now`] is strictly increasing on one clock, whatever the wall clock does;
//! * after [`Clock::observe`] of a remote timestamp, every later [`Clock::now`] is
//!   greater than it;
//! * a remote timestamp more than `max_drift_ms` ahead of the local wall clock is
//!   refused with [`ClockError::DriftExceeded`] and leaves the clock unchanged;
//! * [`Clock::seed`] with the highest persisted timestamp makes the clock continue
//!   above it after a restart, or fails with [`ClockError::PersistedAhead`] when the
//!   wall clock is further behind it than the drift bound.
//!
//! The total order of writes is `(hlc, node_id, event_id)`; [`WriteOrder`] spells it.
//! This crate knows nothing of databases or networks.

use std::cmp::Ordering;
use std::fmt;
use std::num::NonZeroU128;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ulid::Ulid;

/// Bits of the logical counter in the seed encoding.
pub const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: i64 = (1 << COUNTER_BITS) - 1;
/// The largest wall time (ms since the Unix epoch) the encoding can hold in a
/// non-negative `i64`: about year 6429.
pub const MAX_WALL_MS: i64 = i64::MAX >> COUNTER_BITS;

/// A hybrid logical clock timestamp in the seed encoding
/// `(wall_ms << 16) | logical_counter`.
///
/// Ordering of `Hlc` values is ordering of the encoded integers, which is
/// lexicographic on `(wall_ms, counter)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(i64);

impl Hlc {
    /// The zero timestamp: lower than every timestamp a clock issues.
    pub const ZERO: Hlc = Hlc(0);
    /// The greatest timestamp the encoding holds.
    pub const MAX: Hlc = Hlc(i64::MAX);

    /// Builds a timestamp from its parts. Fails when `wall_ms` is negative or beyond
    /// [`MAX_WALL_MS`], or `counter` does not fit 16 bits.
    pub fn from_parts(wall_ms: i64, counter: u16) -> Result<Hlc, HlcError> {
        if !(0..=MAX_WALL_MS).contains(&wall_ms) {
            return Err(HlcError::WallOutOfRange { wall_ms });
        }
        Ok(Hlc((wall_ms << COUNTER_BITS) | i64::from(counter)))
    }

    /// Decodes a stored value. Negative values are never issued and are refused.
    pub fn decode(raw: i64) -> Result<Hlc, HlcError> {
        if raw < 0 {
            return Err(HlcError::Negative { raw });
        }
        Ok(Hlc(raw))
    }

    /// The value as stored in `change_events.hlc_timestamp` and `hlc_modified`.
    pub const fn encode(self) -> i64 {
        self.0
    }

    /// Wall-clock part: milliseconds since the Unix epoch.
    pub const fn wall_ms(self) -> i64 {
        self.0 >> COUNTER_BITS
    }

    /// Logical counter part.
    pub const fn counter(self) -> u16 {
        (self.0 & COUNTER_MASK) as u16
    }

    /// Wall-clock part as a [`SystemTime`].
    pub fn wall_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.wall_ms().unsigned_abs())
    }

    /// The smallest timestamp whose wall part is `wall_ms` (counter zero).
    pub fn at_wall_ms(wall_ms: i64) -> Result<Hlc, HlcError> {
        Hlc::from_parts(wall_ms, 0)
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}:{})", self.wall_ms(), self.counter())
    }
}

impl fmt::Display for Hlc {
    /// `<wall_ms>.<counter>` followed by the encoded integer, e.g. `1764000000000.3 (115...)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} ({})", self.wall_ms(), self.counter(), self.0)
    }
}

impl FromStr for Hlc {
    type Err = HlcError;

    /// Parses the encoded integer form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw: i64 = s.trim().parse().map_err(|_| HlcError::Parse {
            input: s.chars().take(64).collect(),
        })?;
        Hlc::decode(raw)
    }
}

/// Errors building or decoding a timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HlcError {
    #[error("hlc wall time {wall_ms} ms is outside 0..={MAX_WALL_MS}")]
    WallOutOfRange { wall_ms: i64 },
    #[error("hlc value {raw} is negative; timestamps are (wall_ms << 16) | counter >= 0")]
    Negative { raw: i64 },
    #[error("hlc value {input:?} is not an integer")]
    Parse { input: String },
}

/// Errors from the clock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// A remote timestamp is further ahead of the local wall clock than allowed.
    #[error(
        "remote timestamp {remote} is {ahead_ms} ms ahead of local wall clock {local_wall_ms} ms; max drift is {max_drift_ms} ms"
    )]
    DriftExceeded {
        remote: Hlc,
        local_wall_ms: i64,
        ahead_ms: i64,
        max_drift_ms: u64,
    },
    /// At start, the highest persisted timestamp is further ahead of the wall clock
    /// than the drift bound: the wall clock went backwards (or the data came from a
    /// node with a clock far ahead). Issuing timestamps now would go backwards.
    #[error(
        "highest persisted timestamp {persisted} is {ahead_ms} ms ahead of the wall clock ({local_wall_ms} ms), more than max drift {max_drift_ms} ms; fix the system clock or raise max_drift_ms"
    )]
    PersistedAhead {
        persisted: Hlc,
        local_wall_ms: i64,
        ahead_ms: i64,
        max_drift_ms: u64,
    },
    /// A node id that cannot serve as a clock identity (the nil ULID).
    #[error("node id {0} cannot be a clock identity (nil ULID)")]
    NilNodeId(Ulid),
    /// The configured drift does not fit the encoding.
    #[error("max_drift_ms {0} is too large (must be at most {MAX_WALL_MS})")]
    DriftTooLarge(u64),
}

/// The wall clock a [`Clock`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WallClock {
    /// The system clock, shifted by [`set_system_offset_ms`] (zero unless set).
    #[default]
    System,
    /// A manual clock local to the current thread, set with [`manual::set`];
    /// for deterministic tests.
    Manual,
}

static SYSTEM_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Shifts the [`WallClock::System`] reading of every clock in this process by
/// `offset_ms`. Used to run a daemon with a deliberately skewed clock (fault tests).
pub fn set_system_offset_ms(offset_ms: i64) {
    SYSTEM_OFFSET_MS.store(offset_ms, AtomicOrdering::Relaxed);
}

/// Current reading of [`WallClock::System`] in ms since the Unix epoch.
pub fn system_wall_ms() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(MAX_WALL_MS))
        .unwrap_or(0);
    ms.saturating_add(SYSTEM_OFFSET_MS.load(AtomicOrdering::Relaxed))
        .clamp(0, MAX_WALL_MS)
}

/// The thread-local manual wall clock behind [`WallClock::Manual`].
pub mod manual {
    use std::cell::Cell;

    thread_local! {
        static NOW_MS: Cell<i64> = const { Cell::new(0) };
    }

    /// Sets this thread's manual wall clock (ms since the Unix epoch).
    pub fn set(wall_ms: i64) {
        NOW_MS.with(|c| c.set(wall_ms.clamp(0, super::MAX_WALL_MS)));
    }

    /// Reads this thread's manual wall clock.
    pub fn get() -> i64 {
        NOW_MS.with(Cell::get)
    }
}

fn to_ntp(wall_ms: i64) -> uhlc::NTP64 {
    // wall_ms is clamped to 0..=MAX_WALL_MS, so the shift cannot overflow or go negative.
    uhlc::NTP64((wall_ms.clamp(0, MAX_WALL_MS) as u64) << COUNTER_BITS)
}

fn system_clock() -> uhlc::NTP64 {
    to_ntp(system_wall_ms())
}

fn manual_clock() -> uhlc::NTP64 {
    to_ntp(manual::get())
}

/// A wall clock supplied by the caller: any function returning ms since the Unix
/// epoch. Each [`Clock`] built with [`Clock::with_source`] reads its own source, so
/// many clocks on one thread (hosts of a network simulation) can each follow a
/// simulated time, with their own skew.
#[derive(Clone)]
pub struct WallSource(std::sync::Arc<dyn Fn() -> i64 + Send + Sync>);

impl WallSource {
    pub fn new(read_ms: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        WallSource(std::sync::Arc::new(read_ms))
    }

    /// The current reading, clamped into the encodable range.
    pub fn read_ms(&self) -> i64 {
        (self.0)().clamp(0, MAX_WALL_MS)
    }
}

impl fmt::Debug for WallSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WallSource(..)")
    }
}

// uhlc takes its wall clock as a plain fn pointer. For a [`WallSource`], the clock
// reads the source into this thread-local right before each uhlc call, and the fn
// pointer handed to uhlc returns it: uhlc reads its clock synchronously inside
// that call, on the same thread.
thread_local! {
    static SOURCE_NOW_MS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

fn source_clock() -> uhlc::NTP64 {
    to_ntp(SOURCE_NOW_MS.with(std::cell::Cell::get))
}

/// What a [`Clock`] reads: one of the [`WallClock`] kinds or a caller's source.
#[derive(Debug, Clone)]
enum Wall {
    Kind(WallClock),
    Source(WallSource),
}

/// The smallest [`Duration`] that uhlc converts into at least `units` NTP64 units.
/// One nanosecond is about 4.3 units, so an exact preimage may not exist; the drift
/// bound itself is checked exactly by [`Clock::check_drift`] before uhlc sees a
/// timestamp, and uhlc's own check (at most 5 units, under 0.0001 ms, looser) only
/// backs it up.
fn duration_at_least_units(units: u64) -> Duration {
    let mut d = uhlc::NTP64(units).to_duration();
    while uhlc::NTP64::from(d).0 < units {
        d += Duration::from_nanos(1);
    }
    d
}

/// The hybrid logical clock of one node.
pub struct Clock {
    inner: uhlc::HLC,
    node_id: Ulid,
    max_drift_ms: u64,
    wall: Wall,
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("node_id", &self.node_id.to_string())
            .field("max_drift_ms", &self.max_drift_ms)
            .field("wall", &self.wall)
            .finish_non_exhaustive()
    }
}

impl Clock {
    /// Default bound on how far ahead of the local wall clock a remote timestamp
    /// may be: 5 seconds.
    pub const DEFAULT_MAX_DRIFT_MS: u64 = 5_000;

    /// A clock for node `node_id` that refuses remote timestamps more than
    /// `max_drift_ms` ahead of `wall`.
    pub fn new(node_id: Ulid, max_drift_ms: u64, wall: WallClock) -> Result<Clock, ClockError> {
        Clock::build(node_id, max_drift_ms, Wall::Kind(wall))
    }

    /// A clock reading its wall time from `source` (for deterministic simulation:
    /// e.g. a simulated time plus a per-node skew).
    pub fn with_source(
        node_id: Ulid,
        max_drift_ms: u64,
        source: WallSource,
    ) -> Result<Clock, ClockError> {
        Clock::build(node_id, max_drift_ms, Wall::Source(source))
    }

    fn build(node_id: Ulid, max_drift_ms: u64, wall: Wall) -> Result<Clock, ClockError> {
        let id_bits = NonZeroU128::new(node_id.0).ok_or(ClockError::NilNodeId(node_id))?;
        if max_drift_ms > MAX_WALL_MS as u64 {
            return Err(ClockError::DriftTooLarge(max_drift_ms));
        }
        let clock_fn: fn() -> uhlc::NTP64 = match wall {
            Wall::Kind(WallClock::System) => system_clock,
            Wall::Kind(WallClock::Manual) => manual_clock,
            Wall::Source(_) => source_clock,
        };
        let inner = uhlc::HLCBuilder::new()
            .with_id(uhlc::ID::from(id_bits))
            .with_clock(clock_fn)
            .with_max_delta(duration_at_least_units(max_drift_ms << COUNTER_BITS))
            .build();
        Ok(Clock {
            inner,
            node_id,
            max_drift_ms,
            wall,
        })
    }

    /// The node this clock stamps for.
    pub fn node_id(&self) -> Ulid {
        self.node_id
    }

    /// The configured drift bound in ms.
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// The current wall-clock reading in ms since the Unix epoch.
    pub fn wall_ms(&self) -> i64 {
        match &self.wall {
            Wall::Kind(WallClock::System) => system_wall_ms(),
            Wall::Kind(WallClock::Manual) => manual::get(),
            Wall::Source(s) => s.read_ms(),
        }
    }

    /// Runs a uhlc call; for a [`WallSource`], first makes its reading the one the
    /// uhlc clock function returns.
    fn with_wall<T>(&self, f: impl FnOnce(&uhlc::HLC) -> T) -> T {
        if let Wall::Source(s) = &self.wall {
            let ms = s.read_ms();
            SOURCE_NOW_MS.with(|c| c.set(ms));
        }
        f(&self.inner)
    }

    /// A new timestamp for a local write: greater than every timestamp this clock
    /// issued or observed before.
    pub fn now(&self) -> Hlc {
        let ts = self.with_wall(uhlc::HLC::new_timestamp);
        // uhlc only ever produces values from our clock (< 2^63) plus increments;
        // reaching i64::MAX would take 2^16 increments per ms for millennia.
        Hlc(i64::try_from(ts.get_time().0).unwrap_or(i64::MAX))
    }

    /// Observes a remote timestamp: later local timestamps will be greater than it.
    /// Refuses (and leaves the clock unchanged) a timestamp more than `max_drift_ms`
    /// ahead of the local wall clock.
    pub fn observe(&self, remote: Hlc) -> Result<(), ClockError> {
        self.check_drift(remote)?;
        let ts = uhlc::Timestamp::new(uhlc::NTP64(remote.0 as u64), *self.inner.get_id());
        self.with_wall(|h| h.update_with_timestamp(&ts))
            .map_err(|_| {
                let local_wall_ms = self.wall_ms();
                ClockError::DriftExceeded {
                    remote,
                    local_wall_ms,
                    ahead_ms: remote.wall_ms() - local_wall_ms,
                    max_drift_ms: self.max_drift_ms,
                }
            })
    }

    /// Whether `remote` would be refused by [`Clock::observe`] right now.
    pub fn check_drift(&self, remote: Hlc) -> Result<(), ClockError> {
        let local_wall_ms = self.wall_ms();
        let now = local_wall_ms << COUNTER_BITS;
        let bound = (self.max_drift_ms as i64) << COUNTER_BITS;
        if remote.0 > now && remote.0 - now > bound {
            return Err(ClockError::DriftExceeded {
                remote,
                local_wall_ms,
                ahead_ms: remote.wall_ms() - local_wall_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    /// Seeds the clock at start from the highest timestamp persisted by this node
    /// (or applied from others), so it never issues a lower one after a restart.
    /// Fails when that timestamp is further ahead of the wall clock than the drift
    /// bound, instead of silently going backwards.
    pub fn seed(&self, persisted: Hlc) -> Result<(), ClockError> {
        self.observe(persisted).map_err(|err| match err {
            ClockError::DriftExceeded {
                remote,
                local_wall_ms,
                ahead_ms,
                max_drift_ms,
            } => ClockError::PersistedAhead {
                persisted: remote,
                local_wall_ms,
                ahead_ms,
                max_drift_ms,
            },
            other => other,
        })
    }
}

/// The total order of writes: `(hlc, node_id, event_id)`.
///
/// ULIDs are compared by their 128-bit value, which is also the order of their
/// canonical 26-character text, so SQL `ORDER BY hlc_timestamp, node_id, event_id`
/// on the text columns agrees with this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteOrder {
    pub hlc: Hlc,
    pub node_id: Ulid,
    pub event_id: Ulid,
}

impl Ord for WriteOrder {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.hlc, self.node_id.0, self.event_id.0).cmp(&(
            other.hlc,
            other.node_id.0,
            other.event_id.0,
        ))
    }
}

impl PartialOrd for WriteOrder {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uhlc_drift_bound_is_just_above_the_exact_one() {
        for ms in [0u64, 1, 7, 500, 5_000, 60_000, 86_400_000, 1 << 30] {
            let units = ms << COUNTER_BITS;
            let got = uhlc::NTP64::from(duration_at_least_units(units)).0;
            assert!(got >= units && got < units + 8, "{ms} ms: {got} vs {units}");
        }
    }

    #[test]
    fn parts_round_trip() {
        let h = Hlc::from_parts(1_764_000_000_123, 42).expect("parts");
        assert_eq!(h.wall_ms(), 1_764_000_000_123);
        assert_eq!(h.counter(), 42);
        assert_eq!(Hlc::decode(h.encode()).expect("decode"), h);
        assert_eq!(
            h.to_string().parse::<Hlc>().ok(),
            None,
            "display is not the parse form"
        );
        assert_eq!(h.encode().to_string().parse::<Hlc>().expect("parse"), h);
    }

    #[test]
    fn clocks_with_sources_follow_their_own_wall_on_one_thread() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicI64;
        let sim = Arc::new(AtomicI64::new(1_000_000));
        let source = |skew: i64| {
            let sim = sim.clone();
            WallSource::new(move || sim.load(AtomicOrdering::Relaxed) + skew)
        };
        let a = Clock::with_source(Ulid::from_parts(1, 1), 500, source(0)).expect("a");
        let b = Clock::with_source(Ulid::from_parts(1, 2), 500, source(250)).expect("b");
        assert_eq!(a.wall_ms(), 1_000_000);
        assert_eq!(b.wall_ms(), 1_000_250);
        assert_eq!(a.now().wall_ms(), 1_000_000);
        assert_eq!(b.now().wall_ms(), 1_000_250);
        // The same wall reading again: the counter moves, the wall part stays.
        let (a1, a2) = (a.now(), a.now());
        assert!(a2 > a1 && a2.wall_ms() == 1_000_000);
        sim.store(1_000_100, AtomicOrdering::Relaxed);
        assert_eq!(a.now().wall_ms(), 1_000_100);
        // b's readings stay ahead by its skew; a observes one and moves past it.
        let hb = b.now();
        assert_eq!(hb.wall_ms(), 1_000_350);
        a.observe(hb).expect("within drift");
        assert!(a.now() > hb);
        // Drift is checked against the source: 600 ms ahead of a's wall is refused.
        let far = Hlc::at_wall_ms(1_000_700).expect("hlc");
        assert!(matches!(
            a.observe(far),
            Err(ClockError::DriftExceeded { .. })
        ));
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(Hlc::decode(-5), Err(HlcError::Negative { raw: -5 }));
        assert!(matches!(
            Hlc::from_parts(-1, 0),
            Err(HlcError::WallOutOfRange { wall_ms: -1 })
        ));
        assert!(matches!(
            Hlc::from_parts(MAX_WALL_MS + 1, 0),
            Err(HlcError::WallOutOfRange { .. })
        ));
        assert!(Clock::new(Ulid::nil(), 10, WallClock::Manual).is_err());
    }
}
