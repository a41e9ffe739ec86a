//! Large backlogs made fast, and process memory read from `/proc`.
//!
//! [`make_backlog`] writes `n` unsynced events of a stopped SQLite node straight
//! into its database with one statement per table through the `sqlite3` CLI
//! (a recursive CTE), shaped exactly as the daemon writes a local insert: valid
//! ULIDs, strictly increasing HLCs in the seed encoding (in the past, after every
//! event the node already has), `metadata.vv`, the row stamped with
//! `node_id`/`hlc_modified`, its record version and frontier, and the node's
//! vector entry raised to the last HLC. The capture guard is raised inside the
//! transaction, as the daemon does, so the triggers do not capture the rows.

use std::path::Path;

use ulid::Ulid;

use crate::TestDb;
use crate::daemon::TestNode;

const CROCKFORD: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// SQL for the 4-character Crockford base32 form of the integer expression `i`.
fn b32(i: &str) -> String {
    [15, 10, 5, 0]
        .iter()
        .map(|shift| format!("substr('{CROCKFORD}', (({i} >> {shift}) & 31) + 1, 1)"))
        .collect::<Vec<_>>()
        .join(" || ")
}

/// Adds `n` (at most 2^20) inserts of new `notes` records by `node` to its
/// stopped SQLite database, each with a body of `body_bytes` bytes; returns the
/// highest HLC written.
pub fn make_backlog(node: &TestNode, n: u64, body_bytes: usize) -> i64 {
    assert!(!node.is_running(), "{} must be stopped", node.name);
    assert!(n > 0 && n <= 1 << 20, "backlog of {n} events");
    let TestDb::Sqlite { path, .. } = &node.db else {
        panic!("backlogs are made on SQLite nodes");
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    let last: i64 = node
        .db
        .sql(&format!(
            "SELECT COALESCE(MAX(hlc_timestamp), 0) FROM change_events WHERE node_id = '{}'",
            node.id
        ))
        .parse()
        .expect("max hlc");
    // 1000 events per millisecond, ending before now.
    let span_ms = (n as i64) / 1000 + 1;
    let base_ms = ((last >> 16) + 1).max(now_ms - span_ms - 60_000);
    assert!(
        base_ms + span_ms < now_ms,
        "backlog would end in the future"
    );
    // Event and record ids: the first 22 characters of fresh ULIDs, then the
    // event's index in base32.
    let event_prefix = &Ulid::generate().to_string()[..22];
    let record_prefix = &Ulid::from_parts(base_ms as u64, rand_u128()).to_string()[..22];
    let node_id = node.id;
    let body = "b".repeat(body_bytes);
    let ib32 = b32("i");
    let sql = format!(
        "PRAGMA cache_size = -262144;
PRAGMA temp_store = MEMORY;
BEGIN IMMEDIATE;
UPDATE tidemark_capture_guard SET active = 1 WHERE id = 1;
CREATE TEMP TABLE backlog AS
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < {last_i})
SELECT i,
       '{event_prefix}' || {ib32} AS event_id,
       '{record_prefix}' || {ib32} AS record_id,
       (({base_ms} + i / 1000) << 16) + (i % 1000) AS hlc,
       {base_ms} + i / 1000 AS wall_ms
FROM seq;
INSERT INTO change_events (event_id, hlc_timestamp, wall_timestamp, node_id, table_name, record_id,
                           operation, new_values, metadata)
SELECT event_id, hlc, strftime('%Y-%m-%dT%H:%M:%fZ', wall_ms / 1000.0, 'unixepoch'), '{node_id}', 'notes',
       record_id, 'INSERT',
       json_object('body', '{body}', 'id', record_id, 'stars', i, 'title', 'backlog ' || i),
       json_object('vv', json_object('{node_id}', hlc))
FROM backlog ORDER BY i;
INSERT INTO notes (id, title, body, stars, node_id, hlc_modified)
SELECT record_id, 'backlog ' || i, '{body}', i, '{node_id}', hlc FROM backlog ORDER BY i;
INSERT INTO tidemark_record_versions (table_name, record_id, hlc, node_id, event_id, deleted, vv, frontier)
SELECT 'notes', record_id, hlc, '{node_id}', event_id, 0, json_object('{node_id}', hlc),
       json_array(json_object('d', json('false'), 'e', event_id, 'h', hlc, 'n', '{node_id}',
                              'vv', json_object('{node_id}', hlc)))
FROM backlog ORDER BY i;
INSERT INTO tidemark_nodes (node_id, max_hlc) SELECT '{node_id}', MAX(hlc) FROM backlog WHERE true
  ON CONFLICT (node_id) DO UPDATE SET max_hlc = MAX(max_hlc, excluded.max_hlc);
UPDATE tidemark_capture_guard SET active = 0 WHERE id = 1;
DROP TABLE backlog;
COMMIT;
SELECT max_hlc FROM tidemark_nodes WHERE node_id = '{node_id}';",
        last_i = n - 1,
    );
    run_sqlite(path, &sql)
        .trim()
        .parse()
        .expect("backlog's last hlc")
}

fn rand_u128() -> u128 {
    use rand::Rng;
    rand::rng().random::<u128>() & ((1u128 << 80) - 1)
}

fn run_sqlite(path: &Path, sql: &str) -> String {
    crate::sqlite3(path, sql).unwrap_or_else(|e| panic!("making the backlog failed: {e}"))
}

/// A process's resident memory now and at its peak, in KiB (`VmRSS`, `VmHWM`).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}
