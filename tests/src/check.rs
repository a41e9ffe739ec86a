//! The checks every fault scenario ends with, on the databases of real daemons:
//!
//! 1. [`assert_complete`]: every event committed on any node reached every node;
//!    per origin, each node holds exactly the union's events with no gap, and its
//!    version-vector entry is the last of them. [`assert_prefixes`] is the part
//!    that holds at any moment, even mid-fault: per origin, what a node holds up to
//!    its vector entry is a gap-free prefix of that origin's events.
//! 2. [`assert_same_state`]: every node's normalised tables, event ids, record
//!    versions and conflicts, open and decided, are identical (compared whole,
//!    reported by digest and first difference).
//! 3. [`assert_lww_union`]: under `lww`, every record equals the greatest event of
//!    the union of all nodes' events by `(hlc, node_id, event_id)`; a record whose
//!    greatest event is a delete is absent.
//! 4. [`assert_integrity`]: the database passes its integrity check (SQLite
//!    `PRAGMA integrity_check`) and the consistency queries that tie the log, the
//!    vector, the record versions and the rows together (both backends).
//!
//! [`after_heal`] runs the four in order on every running node of a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::Value;

use crate::daemon::{Cluster, Reader, TestNode};

/// One event's place in the log: (hlc, event id).
type Entry = (i64, String);

async fn fetch<T>(reader: &Reader, sql: &'static str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + Send
        + Unpin,
{
    match reader {
        Reader::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await,
        Reader::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await,
    }
    .unwrap_or_else(|e| panic!("check query failed: {e}\n{sql}"))
}

async fn count(reader: &Reader, sql: &'static str) -> i64 {
    let rows: Vec<(i64,)> = fetch(reader, sql).await;
    rows.first().map(|r| r.0).unwrap_or(0)
}

/// Per origin, the events a node holds, in HLC order, and its vector entry.
#[derive(Debug, Default)]
struct Log {
    events: BTreeMap<String, Vec<Entry>>,
    vector: BTreeMap<String, i64>,
}

async fn log_of(reader: &Reader) -> Log {
    // The vector first: events are appended in the transaction that raises it,
    // so every event up to the entries read here is already visible below.
    let vector: Vec<(String, i64)> = fetch(
        reader,
        "SELECT node_id, max_hlc FROM tidemark_nodes WHERE max_hlc > 0",
    )
    .await;
    let rows: Vec<(String, i64, String)> = fetch(
        reader,
        "SELECT node_id, hlc_timestamp, event_id FROM change_events ORDER BY node_id, hlc_timestamp, event_id",
    )
    .await;
    let mut log = Log {
        vector: vector.into_iter().collect(),
        ..Log::default()
    };
    for (origin, hlc, event) in rows {
        log.events.entry(origin).or_default().push((hlc, event));
    }
    log
}

fn running(nodes: &[TestNode]) -> Vec<&TestNode> {
    nodes.iter().filter(|n| n.is_running()).collect()
}

/// Checker 1, the part that holds at any time, even mid-fault: per origin, each
/// running node's events up to its vector entry are exactly the union's events
/// up to that entry (a gap-free prefix of the origin's log).
pub async fn assert_prefixes(nodes: &[TestNode]) {
    let mut logs = Vec::new();
    for node in running(nodes) {
        logs.push((node, log_of(node.reader()).await));
    }
    let mut union: BTreeMap<String, BTreeSet<Entry>> = BTreeMap::new();
    for (_, log) in &logs {
        for (origin, events) in &log.events {
            union
                .entry(origin.clone())
                .or_default()
                .extend(events.iter().cloned());
        }
    }
    for (node, log) in &logs {
        for (origin, all) in &union {
            let upto = log.vector.get(origin).copied().unwrap_or(0);
            let held: Vec<&Entry> = log
                .events
                .get(origin)
                .map(|e| e.iter().filter(|(h, _)| *h <= upto).collect())
                .unwrap_or_default();
            let want: Vec<&Entry> = all.iter().filter(|(h, _)| *h <= upto).collect();
            if held != want {
                let missing: Vec<_> = want.iter().filter(|e| !held.contains(e)).take(5).collect();
                panic!(
                    "{}: events of origin {origin} up to its vector entry {upto} are not a \
                     gap-free prefix: holds {}, the union has {}; first missing: {missing:?}",
                    node.name,
                    held.len(),
                    want.len()
                );
            }
        }
    }
}

/// Checker 1 after convergence: every running node holds every event of the
/// union, per origin, and its vector entry is that origin's last event;
/// `committed` (event ids acknowledged to writers) are all among them.
pub async fn assert_complete(nodes: &[TestNode], committed: &[String]) {
    let mut logs = Vec::new();
    for node in running(nodes) {
        logs.push((node, log_of(node.reader()).await));
    }
    let mut union: BTreeMap<String, BTreeSet<Entry>> = BTreeMap::new();
    for (_, log) in &logs {
        for (origin, events) in &log.events {
            union
                .entry(origin.clone())
                .or_default()
                .extend(events.iter().cloned());
        }
    }
    let all_ids: BTreeSet<&str> = union
        .values()
        .flat_map(|s| s.iter().map(|(_, e)| e.as_str()))
        .collect();
    let lost: Vec<&String> = committed
        .iter()
        .filter(|e| !all_ids.contains(e.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} committed events are on no node, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    for (node, log) in &logs {
        for (origin, all) in &union {
            let held = log.events.get(origin).map(Vec::as_slice).unwrap_or(&[]);
            let want: Vec<Entry> = all.iter().cloned().collect();
            if held != want.as_slice() {
                let missing: Vec<_> = want.iter().filter(|e| !held.contains(e)).take(5).collect();
                panic!(
                    "{}: holds {} events of origin {origin}, the union has {}; first missing: {missing:?}",
                    node.name,
                    held.len(),
                    want.len()
                );
            }
            let last = want.last().map(|e| e.0).unwrap_or(0);
            assert_eq!(
                log.vector.get(origin).copied().unwrap_or(0),
                last,
                "{}: vector entry of origin {origin} is not its last event",
                node.name
            );
        }
    }
}

/// A normalised `notes` row: (id, title, body, stars, node_id, hlc_modified).
pub type Row = (
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    String,
    i64,
);

/// A node's replicated state, normalised for comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    pub rows: Vec<Row>,
    pub events: Vec<String>,
    /// Record versions: (table, record, hlc, node, event, deleted).
    pub versions: Vec<(String, String, i64, String, String, i64)>,
    /// Every conflict, open and decided (one history on every node).
    pub conflicts: Vec<Decided>,
}

/// A conflict as every node must record it: (id, kind, record, status,
/// winner event, loser event, resolution, resolved by, closing event). Its
/// times are HLC times, compared by the store suite (backends print them
/// differently).
pub type Decided = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

const DECIDED: &str = "SELECT conflict_id, kind, record_id, status, winner_event_id, loser_event_id, \
     resolution, resolved_by, resolution_event_id FROM tidemark_conflicts ORDER BY conflict_id";

impl State {
    pub async fn read(reader: &Reader) -> State {
        State {
            rows: fetch(
                reader,
                "SELECT id, title, body, CAST(stars AS BIGINT), node_id, CAST(hlc_modified AS BIGINT) \
                 FROM notes ORDER BY id",
            )
            .await,
            events: fetch::<(String,)>(reader, "SELECT event_id FROM change_events ORDER BY event_id")
                .await
                .into_iter()
                .map(|e| e.0)
                .collect(),
            versions: fetch(
                reader,
                "SELECT table_name, record_id, hlc, node_id, event_id, CAST(CASE WHEN deleted THEN 1 ELSE 0 END AS BIGINT) \
                 FROM tidemark_record_versions ORDER BY table_name, record_id",
            )
            .await,
            conflicts: fetch(reader, DECIDED).await,
        }
    }

    pub fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

fn first_difference<T: PartialEq + std::fmt::Debug>(what: &str, a: &[T], b: &[T]) -> String {
    if a.len() != b.len() {
        return format!("{what}: {} vs {}", a.len(), b.len());
    }
    match a.iter().zip(b).find(|(x, y)| x != y) {
        Some((x, y)) => format!("{what}: {x:?} vs {y:?}"),
        None => String::new(),
    }
}

/// Checker 2: every running node's state is identical; returns it.
pub async fn assert_same_state(nodes: &[TestNode]) -> State {
    let mut states = Vec::new();
    for node in running(nodes) {
        states.push((node, State::read(node.reader()).await));
    }
    let (first, reference) = states.first().expect("a running node");
    for (node, state) in &states[1..] {
        if state != reference {
            let diff = [
                first_difference("rows", &reference.rows, &state.rows),
                first_difference("events", &reference.events, &state.events),
                first_difference("versions", &reference.versions, &state.versions),
                first_difference("conflicts", &reference.conflicts, &state.conflicts),
            ]
            .into_iter()
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
            panic!(
                "{} (digest {:016x}) and {} (digest {:016x}) differ: {diff}",
                first.name,
                reference.digest(),
                node.name,
                state.digest()
            );
        }
    }
    reference.clone()
}

/// A blocked record: (table, record, winning event, kind, blocker table, blocker id).
pub type Blocked = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// Every running node lists the same blocked records (`tidemark_blocked`) and
/// the same conflicts, open and resolved, with their kinds and resolutions.
pub async fn assert_same_blocked(nodes: &[TestNode]) {
    let mut seen: Option<(&str, Vec<Blocked>, Vec<Decided>)> = None;
    for node in running(nodes) {
        let blocked: Vec<Blocked> = fetch(
            node.reader(),
            "SELECT table_name, record_id, event_id, kind, blocker_table, blocker_id \
             FROM tidemark_blocked ORDER BY table_name, record_id",
        )
        .await;
        let conflicts: Vec<Decided> = fetch(node.reader(), DECIDED).await;
        match &seen {
            None => seen = Some((&node.name, blocked, conflicts)),
            Some((first, b, c)) => {
                assert_eq!(&blocked, b, "blocked records of {} and {first}", node.name);
                assert_eq!(&conflicts, c, "conflicts of {} and {first}", node.name);
            }
        }
    }
}

/// Checker 3: under `lww`, every running node's `notes` rows are the greatest
/// event per record of the union of every node's events.
pub async fn assert_lww_union(nodes: &[TestNode]) {
    type Ev = (String, i64, String, String, String, Option<String>);
    let mut union: BTreeMap<String, Ev> = BTreeMap::new();
    for node in running(nodes) {
        let events: Vec<Ev> = fetch(
            node.reader(),
            "SELECT record_id, hlc_timestamp, node_id, event_id, operation, CAST(new_values AS TEXT) \
             FROM change_events WHERE table_name = 'notes'",
        )
        .await;
        for e in events {
            union.insert(e.3.clone(), e);
        }
    }
    // Per record, the maximum by (hlc, node_id, event_id).
    let mut winners: BTreeMap<String, &Ev> = BTreeMap::new();
    for e in union.values() {
        let record = e.0.trim().to_owned();
        let better = winners
            .get(&record)
            .is_none_or(|w| (e.1, &e.2, &e.3) > (w.1, &w.2, &w.3));
        if better {
            winners.insert(record, e);
        }
    }
    let expected: BTreeMap<&String, &Ev> = winners
        .iter()
        .filter(|(_, e)| e.4 != "DELETE")
        .map(|(r, e)| (r, *e))
        .collect();
    for node in running(nodes) {
        let state = State::read(node.reader()).await;
        assert_eq!(
            state.rows.len(),
            expected.len(),
            "{}: {} rows, but the union of all events leaves {} live records",
            node.name,
            state.rows.len(),
            expected.len()
        );
        for (id, title, body, stars, row_node, row_hlc) in &state.rows {
            let id = id.trim().to_owned();
            let w = expected
                .get(&id)
                .unwrap_or_else(|| panic!("{}: row {id} is deleted by the union", node.name));
            let values: Value =
                serde_json::from_str(w.5.as_deref().unwrap_or("null")).expect("new_values JSON");
            let got = serde_json::json!({"title": title, "body": body, "stars": stars});
            for key in ["title", "body", "stars"] {
                assert_eq!(
                    got.get(key),
                    values.get(key).or(Some(&Value::Null)),
                    "{}: {id}.{key} is not the value of the winning event {}",
                    node.name,
                    w.3
                );
            }
            assert_eq!(
                (row_hlc, row_node.trim()),
                (&w.1, w.2.trim()),
                "{}: {id} is not stamped with its winning event {}",
                node.name,
                w.3
            );
        }
    }
}

/// Checker 4: the database's own integrity check (SQLite) and the consistency
/// queries tying log, vector, versions and rows together (both backends). Safe
/// on a killed node (its database is read as the next start would find it).
pub async fn assert_integrity(node: &TestNode) {
    let reader = node.reader();
    if let Reader::Sqlite(_) = reader {
        let result: Vec<(String,)> = fetch(reader, "PRAGMA integrity_check").await;
        let result: Vec<String> = result.into_iter().map(|r| r.0).collect();
        assert_eq!(result, ["ok"], "{}: PRAGMA integrity_check", node.name);
    }
    let checks: [(&str, &'static str); 3] = [
        (
            "events beyond their origin's vector entry (or of an unknown origin)",
            "SELECT COUNT(*) FROM change_events e LEFT JOIN tidemark_nodes n ON n.node_id = e.node_id \
             WHERE n.node_id IS NULL OR e.hlc_timestamp > n.max_hlc",
        ),
        (
            "vector entries that are not an event of their origin",
            "SELECT COUNT(*) FROM tidemark_nodes n WHERE n.max_hlc > 0 AND NOT EXISTS \
             (SELECT 1 FROM change_events e WHERE e.node_id = n.node_id AND e.hlc_timestamp = n.max_hlc)",
        ),
        (
            "record versions naming an event not in the log",
            "SELECT COUNT(*) FROM tidemark_record_versions v WHERE NOT EXISTS \
             (SELECT 1 FROM change_events e WHERE e.event_id = v.event_id)",
        ),
    ];
    for (what, sql) in checks {
        assert_eq!(count(reader, sql).await, 0, "{}: {what}", node.name);
    }
    // Rows match their versions once every direct write is stamped (a killed
    // node may hold captured writes it has not drained yet).
    if count(reader, "SELECT COUNT(*) FROM tidemark_capture_queue").await == 0 {
        let checks: [(&str, &'static str); 2] = [
            (
                "rows whose stamp is not their record's version",
                "SELECT COUNT(*) FROM notes t LEFT JOIN tidemark_record_versions v \
                 ON v.table_name = 'notes' AND v.record_id = t.id \
                 WHERE v.record_id IS NULL OR v.deleted OR v.hlc <> t.hlc_modified OR v.node_id <> t.node_id",
            ),
            (
                "live record versions without a row",
                "SELECT COUNT(*) FROM tidemark_record_versions v WHERE v.table_name = 'notes' \
                 AND NOT v.deleted AND NOT EXISTS (SELECT 1 FROM notes t WHERE t.id = v.record_id)",
            ),
        ];
        for (what, sql) in checks {
            assert_eq!(count(reader, sql).await, 0, "{}: {what}", node.name);
        }
    }
}

/// The four checks, after a fault healed and the cluster converged: nothing lost
/// (`committed` event ids included), one state everywhere, last writer wins,
/// databases intact.
pub async fn after_heal(cluster: &Cluster, committed: &[String]) -> State {
    assert_complete(&cluster.nodes, committed).await;
    let state = assert_same_state(&cluster.nodes).await;
    assert_lww_union(&cluster.nodes).await;
    for node in running(&cluster.nodes) {
        assert_integrity(node).await;
    }
    state
}
