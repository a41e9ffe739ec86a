//! Test-only pauses for fault tests, off unless an environment variable sets them.
//!
//! They let a whole-daemon test stop a node at a precise point of the protocol
//! and kill it there, instead of hoping a kill lands in a narrow window:
//!
//! * `TIDEMARK_TEST_PAUSE_AFTER_APPLY_MS`: the receiver sleeps this long after a
//!   batch's transaction committed and before it sends the batch's ack;
//! * `TIDEMARK_TEST_PAUSE_BEFORE_SYNC_MARK_MS`: the `synced_at` marker sleeps this
//!   long after being woken (by an ack or a commit) before it marks events, so
//!   acks are recorded in peer progress while `synced_at` is still unset.
//!
//! Each variable is read once, on first use; unset, empty or `0` means no pause.
//! These are not configuration (configuration is `TIDEMARK_<SECTION>__<KEY>`) and
//! must never be set in production: a warning is logged when one is active.

use std::sync::OnceLock;
use std::time::Duration;

fn read(var: &'static str, cell: &'static OnceLock<Option<Duration>>) -> Option<Duration> {
    *cell.get_or_init(|| {
        let raw = std::env::var(var).ok()?;
        match raw.trim().parse::<u64>() {
            Ok(0) => None,
            Ok(ms) => {
                tracing::warn!(
                    variable = var,
                    pause_ms = ms,
                    "test-only pause active: never set this in production"
                );
                Some(Duration::from_millis(ms))
            }
            Err(_) => {
                tracing::warn!(variable = var, value = %raw, "ignoring test pause: not a number of ms");
                None
            }
        }
    })
}

/// Pause between a batch's commit and its ack (receiver).
pub fn pause_after_apply() -> Option<Duration> {
    static CELL: OnceLock<Option<Duration>> = OnceLock::new();
    read("TIDEMARK_TEST_PAUSE_AFTER_APPLY_MS", &CELL)
}

/// Pause before each `synced_at` marking pass after a wake-up (sender side).
pub fn pause_before_sync_mark() -> Option<Duration> {
    static CELL: OnceLock<Option<Duration>> = OnceLock::new();
    read("TIDEMARK_TEST_PAUSE_BEFORE_SYNC_MARK_MS", &CELL)
}
