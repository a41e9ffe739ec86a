//! How the store decides constraint clashes between replicated writes (the
//! rules are stated in `crates/store/src/engine/place.rs`), on SQLite,
//! PostgreSQL and the in-memory backend, with the schema of
//! [`tidemark_tests::schema`]:
//!
//! * the store reads the UNIQUE constraints and FOREIGN KEYs of each backend;
//! * UNIQUE: of two records whose winning writes hold one value, the greater
//!   write keeps its row and the other is blocked, with one conflict decided by
//!   the table's policy, whatever the delivery order or batching; a later write
//!   of the blocked record that has seen its first one places it and closes
//!   the conflict; a local row gives way to a greater remote write and is
//!   placed again, its conflict gone, once that write's row goes;
//! * FOREIGN KEY: a child waits for its parent without a conflict; a parent's
//!   delete wins over its children in any delivery order (ON DELETE CASCADE,
//!   RESTRICT and, on PostgreSQL, a deferred key alike);
//! * CHECK: a row the table refuses blocks only its record;
//! * every applied event stays in the log whatever becomes of its row;
//! * one test each, delivery orders the property test found to end
//!   differently: a displaced holder's blocked records, a refused record that
//!   also clashes, a child whose parent's delete stops winning;
//! * any delivery order converges: random causally consistent histories over
//!   three origins, delivered in random interleavings, batches and duplicates,
//!   end with the same rows, blocked records, open conflicts and log on every
//!   store, and those rows and blocked records are the ones the rules give.
//!
//! The property test prints its seed: `TIDEMARK_CONSTRAINTS_SEED=S` replays
//! it, `TIDEMARK_CONSTRAINTS_CASES=N` sets how many histories the memory
//! backend runs (SQLite and PostgreSQL run [`SQL_CASES`], each also delivered
//! to the memory backend for comparison).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tidemark_hlc::Hlc;
use tidemark_store::{
    ApplyOutcome, BlockKind, ChangeEvent, Conflict, ConflictFilter, ConflictKind, ConflictPolicy,
    ConflictStatus, ForeignKey, Operation, Retain, Store, Values, VersionVector,
};
use tidemark_tests::TestDb;
use tidemark_tests::schema::{self, child_row, child_tables, user_row};
use ulid::Ulid;

// ---------------------------------------------------------------------------------
// Events, stores and what they end with.

fn origin(n: u128) -> Ulid {
    Ulid::from_parts(1, n)
}

/// An HLC `offset_ms` from now (negative: in the past).
fn hlc_at(offset_ms: i64) -> Hlc {
    Hlc::from_parts(tidemark_hlc::system_wall_ms() + offset_ms, 0).expect("hlc")
}

/// A remote event of `origin`: the whole row after the write (`None`: a
/// delete), and as the record's version vector `seen` (the vectors of the
/// record's events the origin has seen) plus its own entry.
fn event(
    event_id: Ulid,
    origin: Ulid,
    hlc: Hlc,
    table: &str,
    record: Ulid,
    values: Option<Values>,
    mut seen: VersionVector,
) -> ChangeEvent {
    let operation = match (&values, seen.0.is_empty()) {
        (None, _) => Operation::Delete,
        (Some(_), true) => Operation::Insert,
        (Some(_), false) => Operation::Update,
    };
    seen.observe(origin, hlc);
    ChangeEvent {
        event_id,
        hlc,
        wall_ms: hlc.wall_ms(),
        node_id: origin,
        table_name: table.to_owned(),
        record_id: record,
        operation,
        action: None,
        user_id: None,
        old_values: None,
        new_values: values,
        metadata: Some(json!({ "vv": seen.to_json() })),
    }
}

/// A remote write of `origin` at `hlc` that has seen the events `seen` of its record.
fn write(
    origin: Ulid,
    hlc: Hlc,
    table: &str,
    record: Ulid,
    values: Option<Values>,
    seen: &[&ChangeEvent],
) -> ChangeEvent {
    let mut vv = VersionVector::new();
    for e in seen {
        vv.merge(&e.vector().expect("vv"));
    }
    event(Ulid::generate(), origin, hlc, table, record, values, vv)
}

/// A delivery to one store: its name, and its batches, one call each.
type Delivery = (&'static str, Vec<Vec<ChangeEvent>>);

/// Each event in a batch of its own.
fn one_by_one(events: &[&ChangeEvent]) -> Vec<Vec<ChangeEvent>> {
    events.iter().map(|e| vec![(*e).clone()]).collect()
}

/// Makes each delivery to a new store on its own fresh database of `db`'s
/// kind (`db` first), the schema registered with `policy`.
async fn deliver_each(
    db: TestDb,
    policy: ConflictPolicy,
    deliveries: &[Delivery],
) -> Vec<(TestDb, Store)> {
    let mut nodes: Vec<(TestDb, Store)> = Vec::new();
    let mut spare = Some(db);
    for (_, batches) in deliveries {
        let db = spare.take().unwrap_or_else(|| nodes[0].0.another());
        let store = schema::open(&db, policy).await;
        for batch in batches {
            apply(&store, batch).await;
        }
        nodes.push((db, store));
    }
    nodes
}

/// Checks that the stores end the same (rows of `records`, blocked records,
/// open conflicts, log), whatever their deliveries.
async fn converged(nodes: &[(TestDb, Store)], deliveries: &[Delivery], records: &[(&str, Ulid)]) {
    let names = Names::new(&deliveries[0].1.concat());
    let first = state(&nodes[0].1, records).await;
    for ((_, store), (name, _)) in nodes.iter().zip(deliveries).skip(1) {
        let got = state(store, records).await;
        let (_, diff) = names.diff(&first, &got);
        assert!(
            got == first,
            "{}: delivered {} and delivered {name}, the stores end differently \
             (events #i in the order of the first delivery):\n{diff}",
            store.kind(),
            deliveries[0].0
        );
    }
}

async fn close_all(nodes: &[(TestDb, Store)]) {
    for (_, store) in nodes {
        store.close().await;
    }
}

/// Applies `events` in one call; none may be quarantined.
async fn apply(store: &Store, events: &[ChangeEvent]) -> ApplyOutcome {
    let out = store
        .apply_remote(events)
        .await
        .unwrap_or_else(|e| panic!("apply on {}: {e}", store.kind()));
    assert!(out.quarantined.is_empty(), "{:?}", out.quarantined);
    out
}

async fn row(store: &Store, table: &str, id: Ulid) -> Option<Values> {
    store.get(table, id).await.expect("get")
}

/// Conflicts of every table, with `status` (any when `None`).
async fn conflicts(store: &Store, status: Option<ConflictStatus>) -> Vec<Conflict> {
    store
        .list_conflicts(&ConflictFilter {
            status,
            limit: 100_000,
            ..ConflictFilter::default()
        })
        .await
        .expect("conflicts")
}

/// Ids of the events in the log.
async fn log(store: &Store) -> BTreeSet<Ulid> {
    store
        .events_after(&VersionVector::new(), 100_000)
        .await
        .expect("events")
        .iter()
        .map(|e| e.event_id)
        .collect()
}

/// `(table, record, event, kind, blocker table, blocker)` of a blocked record.
type BlockedKey = (String, Ulid, Ulid, BlockKind, Option<String>, Option<Ulid>);
/// `(id, kind, table, record, winner table, winner record)` of a conflict.
type ConflictKey = (
    Ulid,
    ConflictKind,
    String,
    Ulid,
    Option<String>,
    Option<Ulid>,
);

/// Rows by `(table, record)`.
type Rows = BTreeMap<(String, Ulid), Values>;
/// `(table, record, event)`: a record and its winning event.
type RecordEvent = (String, Ulid, Ulid);

/// What a store ends with, as every node must agree on it.
#[derive(Debug, PartialEq)]
struct State {
    /// Rows of the records asked about.
    rows: Rows,
    blocked: Vec<BlockedKey>,
    open_conflicts: Vec<ConflictKey>,
    /// Every conflict, open and decided, with every field but the values.
    history: Vec<HistoryLine>,
    log: BTreeSet<Ulid>,
}

/// A conflict in the history: `(id, kind, record, status, winner event,
/// detected at, resolved at, resolution, by, closing event)`.
type HistoryLine = (
    Ulid,
    ConflictKind,
    Ulid,
    ConflictStatus,
    Ulid,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<Ulid>,
);

async fn state(store: &Store, records: &[(&str, Ulid)]) -> State {
    let mut rows = BTreeMap::new();
    for &(table, id) in records {
        if let Some(values) = row(store, table, id).await {
            rows.insert((table.to_owned(), id), values);
        }
    }
    let blocked = store
        .list_blocked(None, 100_000)
        .await
        .expect("blocked")
        .into_iter()
        .map(|b| {
            let by = (b.blocker_table, b.blocker_id);
            (b.table_name, b.record_id, b.event_id, b.kind, by.0, by.1)
        })
        .collect();
    let open_conflicts = conflicts(store, Some(ConflictStatus::Open))
        .await
        .into_iter()
        .map(|c| {
            let by = (c.winner_table, c.winner_record_id);
            (c.conflict_id, c.kind, c.table_name, c.record_id, by.0, by.1)
        })
        .collect();
    let history = conflicts(store, None)
        .await
        .into_iter()
        .map(|c| {
            (
                c.conflict_id,
                c.kind,
                c.record_id,
                c.status,
                c.winner.event_id,
                c.detected_at,
                c.resolved_at,
                c.resolution,
                c.resolved_by,
                c.resolution_event_id,
            )
        })
        .collect();
    State {
        rows,
        blocked,
        open_conflicts,
        history,
        log: log(store).await,
    }
}

/// Short names for reports: origins A, B, C; events `#i`; users `u<k>`,
/// orders `o<k>`; users referenced but never written `x<k>`.
struct Names(BTreeMap<Ulid, String>);

impl Names {
    /// Names for `events` (`#i` in this order), their origins (in id order),
    /// their records (in order of first write) and the users they reference
    /// but never write.
    fn new(events: &[ChangeEvent]) -> Names {
        let mut names = BTreeMap::new();
        let origins: BTreeSet<Ulid> = events.iter().map(|e| e.node_id).collect();
        for (o, letter) in origins.into_iter().zip('A'..) {
            names.insert(o, letter.to_string());
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            names.insert(e.event_id, format!("#{i}"));
            names.entry(e.record_id).or_insert_with(|| {
                let n = counts.entry(&e.table_name).or_default();
                *n += 1;
                format!("{}{}", &e.table_name[..1], *n - 1)
            });
        }
        let mut strangers = 0;
        for e in events {
            let user = e.new_values.as_ref().and_then(|v| v.get("user_id"));
            if let Some(u) = user
                .and_then(Value::as_str)
                .and_then(|u| u.parse::<Ulid>().ok())
                && !names.contains_key(&u)
            {
                names.insert(u, format!("x{strangers}"));
                strangers += 1;
            }
        }
        Names(names)
    }

    fn id(&self, id: Ulid) -> String {
        self.0.get(&id).cloned().unwrap_or_else(|| id.to_string())
    }

    fn opt(&self, id: Option<Ulid>) -> String {
        id.map_or_else(|| "-".into(), |i| self.id(i))
    }

    fn values(&self, v: &Values) -> String {
        match v.get("user_id").and_then(Value::as_str) {
            Some(u) => format!("user={}", u.parse().map_or(u.to_owned(), |u| self.id(u))),
            None => format!("email={} age={} name={}", v["email"], v["age"], v["name"]),
        }
    }

    fn hlc(&self, h: &History, hlc: Hlc) -> String {
        format!("+{}.{}", hlc.wall_ms() - h.base_ms, hlc.counter())
    }

    fn history(&self, h: &History) -> String {
        let mut out = String::new();
        for e in &h.events {
            let vv: Vec<String> = (e.vector().expect("vv").0.iter())
                .map(|(o, x)| format!("{}:{}", self.id(*o), self.hlc(h, *x)))
                .collect();
            let values = e.new_values.as_ref().map_or("-".into(), |v| self.values(v));
            out += &format!(
                "  {} {} {} {} {} {values} vv[{}]\n",
                self.id(e.event_id),
                self.id(e.node_id),
                self.hlc(h, e.hlc),
                self.id(e.record_id),
                e.operation,
                vv.join(" ")
            );
        }
        out
    }

    fn plan(&self, plan: &[Vec<usize>]) -> String {
        let batches: Vec<String> = plan
            .iter()
            .map(|b| {
                let ids: Vec<String> = b.iter().map(|i| format!("#{i}")).collect();
                format!("[{}]", ids.join(" "))
            })
            .collect();
        batches.join(" ")
    }

    fn rows(&self, rows: &Rows) -> String {
        let rows: Vec<String> = (rows.iter())
            .map(|((_, id), v)| format!("{} {}", self.id(*id), self.values(v)))
            .collect();
        rows.join(", ")
    }

    /// Each part of a state, labelled, as `(part, text)`.
    fn state(&self, s: &State) -> [(&'static str, String); 5] {
        let blocked: Vec<String> = (s.blocked.iter())
            .map(|(_, r, e, k, _, by)| {
                format!("{} {} {k:?} by {}", self.id(*r), self.id(*e), self.opt(*by))
            })
            .collect();
        let conflicts: Vec<String> = (s.open_conflicts.iter())
            .map(|(id, k, _, r, _, w)| {
                format!(
                    "{} {k:?} {} won by {}",
                    self.id(*id),
                    self.id(*r),
                    self.opt(*w)
                )
            })
            .collect();
        let history: Vec<String> = (s.history.iter())
            .map(|(id, k, r, st, w, at, closed, how, by, event)| {
                format!(
                    "{} {k:?} {} {st:?} won by {} at {at} closed {closed:?} {how:?} by {by:?} with {}",
                    self.id(*id),
                    self.id(*r),
                    self.id(*w),
                    self.opt(*event)
                )
            })
            .collect();
        let log: Vec<String> = s.log.iter().map(|e| self.id(*e)).collect();
        [
            ("rows", self.rows(&s.rows)),
            ("blocked", blocked.join(", ")),
            ("open conflicts", conflicts.join(", ")),
            ("conflict history", history.join(", ")),
            ("log", log.join(" ")),
        ]
    }

    /// The parts in which two states differ, and how.
    fn diff(&self, a: &State, b: &State) -> (Problems, String) {
        let mut parts = Problems::new();
        let mut out = String::new();
        for ((part, x), (_, y)) in self.state(a).into_iter().zip(self.state(b)) {
            if x != y {
                parts.insert(part);
                out += &format!("  {part}:\n    {x}\n    vs\n    {y}\n");
            }
        }
        (parts, out)
    }
}

/// A record blocked by `blocker` of `users` (none: refused by the table).
fn blocked_by(event: &ChangeEvent, kind: BlockKind, blocker: Option<Ulid>) -> BlockedKey {
    (
        event.table_name.clone(),
        event.record_id,
        event.event_id,
        kind,
        blocker.map(|_| "users".to_owned()),
        blocker,
    )
}

/// Status and resolution of a constraint conflict when it is detected.
fn detected(policy: ConflictPolicy) -> (ConflictStatus, Option<&'static str>) {
    match policy {
        ConflictPolicy::Lww => (ConflictStatus::Resolved, Some("lww")),
        ConflictPolicy::Manual => (ConflictStatus::Open, None),
    }
}

/// Checks one constraint conflict: keyed by the losing `loser` event, won by
/// `winner` (a write of `winner_record`, or its delete).
fn assert_clash(
    c: &Conflict,
    kind: ConflictKind,
    loser: &ChangeEvent,
    winner: &ChangeEvent,
    winner_record: Ulid,
    ctx: &str,
) {
    assert_eq!(
        (
            c.conflict_id,
            c.kind,
            c.table_name.as_str(),
            c.record_id,
            c.winner_table.as_deref(),
            c.winner_record_id,
            c.loser.event_id,
            c.winner.event_id,
        ),
        (
            loser.event_id,
            kind,
            loser.table_name.as_str(),
            loser.record_id,
            Some("users"),
            Some(winner_record),
            loser.event_id,
            winner.event_id,
        ),
        "{ctx}: {c:#?}"
    );
}

// ---------------------------------------------------------------------------------
// The rules, one at a time.

/// The UNIQUE constraints and FOREIGN KEYs the store decides clashes on, as it
/// reads them from each backend's schema.
async fn the_store_reads_the_constraints(db: TestDb) {
    let store = schema::open(&db, ConflictPolicy::Lww).await;
    let users = store.table("users").expect("users");
    assert_eq!(users.uniques, vec![vec!["email".to_owned()]]);
    assert!(users.foreign_keys.is_empty(), "{:?}", users.foreign_keys);
    for child in child_tables(&db) {
        let t = store.table(child).expect("child table");
        assert_eq!(
            t.foreign_keys,
            vec![ForeignKey {
                columns: vec!["user_id".into()],
                parent: "users".into(),
                parent_columns: vec!["id".into()],
            }],
            "{child} on {}",
            db.kind()
        );
        assert!(t.uniques.is_empty(), "{child}: {:?}", t.uniques);
    }
    store.close().await;
}

/// Two origins insert different users with one email concurrently, delivered
/// in both orders, one by one and in one batch; under `lww` and `manual`.
async fn a_unique_clash_keeps_the_greater_write_in_any_order(db: TestDb) {
    unique_clash(db.another(), ConflictPolicy::Lww).await;
    unique_clash(db, ConflictPolicy::Manual).await;
}

async fn unique_clash(db: TestDb, policy: ConflictPolicy) {
    let (loser, winner) = (Ulid::generate(), Ulid::generate());
    let first = write(
        origin(1),
        hlc_at(-3_000),
        "users",
        loser,
        Some(user_row(loser, Some("same@x.test"), "one", 30)),
        &[],
    );
    let second = write(
        origin(2),
        hlc_at(-2_000),
        "users",
        winner,
        Some(user_row(winner, Some("same@x.test"), "two", 40)),
        &[],
    );
    let (f, s) = (first.clone(), second.clone());
    let deliveries = [
        ("[first] [second]", vec![vec![f.clone()], vec![s.clone()]]),
        ("[second] [first]", vec![vec![s.clone()], vec![f.clone()]]),
        ("[first, second]", vec![vec![f.clone(), s.clone()]]),
        ("[second, first]", vec![vec![s, f]]),
    ];
    let nodes = deliver_each(db, policy, &deliveries).await;
    let records = [("users", loser), ("users", winner)];
    for ((_, store), (name, _)) in nodes.iter().zip(&deliveries) {
        let ctx = format!("{} under {policy}, delivered {name}", store.kind());
        assert_eq!(
            row(store, "users", winner).await,
            second.new_values,
            "{ctx}"
        );
        assert_eq!(row(store, "users", loser).await, None, "{ctx}");
        let got = state(store, &records).await;
        assert_eq!(
            got.blocked,
            vec![blocked_by(&first, BlockKind::Unique, Some(winner))],
            "{ctx}"
        );
        let all = conflicts(store, None).await;
        assert_eq!(all.len(), 1, "{ctx}: {all:#?}");
        assert_clash(&all[0], ConflictKind::Unique, &first, &second, winner, &ctx);
        assert_eq!(
            (all[0].status, all[0].resolution.as_deref()),
            detected(policy),
            "{ctx}"
        );
        assert_eq!(got.log, BTreeSet::from([first.event_id, second.event_id]));
    }
    converged(&nodes, &deliveries, &records).await;

    // The blocked user writes again, having seen its first write, with another
    // email: it is placed and its conflict is closed by the new write.
    let again = write(
        origin(1),
        hlc_at(-1_000),
        "users",
        loser,
        Some(user_row(loser, Some("other@x.test"), "one", 30)),
        &[&first],
    );
    for ((_, store), (name, _)) in nodes.iter().zip(&deliveries) {
        apply(store, std::slice::from_ref(&again)).await;
        let ctx = format!(
            "{} under {policy}, delivered {name} then the new write",
            store.kind()
        );
        assert_eq!(row(store, "users", loser).await, again.new_values, "{ctx}");
        assert_eq!(
            row(store, "users", winner).await,
            second.new_values,
            "{ctx}"
        );
        let got = state(store, &records).await;
        assert!(got.blocked.is_empty(), "{ctx}: {:?}", got.blocked);
        assert!(
            got.open_conflicts.is_empty(),
            "{ctx}: {:?}",
            got.open_conflicts
        );
        // The clash ended with the new write, which had seen the blocked one:
        // its row goes on every node (a node given the new write first never
        // saw the clash), the new write stays in the log.
        assert_eq!(
            store.conflict(first.event_id).await.expect("conflict"),
            None,
            "{ctx}"
        );
        assert!(got.log.contains(&again.event_id), "{ctx}");
    }
    converged(&nodes, &deliveries, &records).await;
    close_all(&nodes).await;
}

/// A user written through the API holds an email a greater remote insert of
/// another user holds too; then the remote user is deleted.
async fn a_local_row_gives_way_to_a_greater_remote_write(db: TestDb) {
    let store = schema::open(&db, ConflictPolicy::Lww).await;
    let (local, remote) = (Ulid::generate(), Ulid::generate());
    let mine = store
        .put(
            "users",
            local,
            &user_row(local, Some("taken@x.test"), "local", 20),
        )
        .await
        .expect("local put");
    let ahead = Hlc::from_parts(mine.hlc.wall_ms() + 1, 0).expect("hlc");
    let theirs = write(
        origin(1),
        ahead,
        "users",
        remote,
        Some(user_row(remote, Some("taken@x.test"), "remote", 21)),
        &[],
    );
    apply(&store, std::slice::from_ref(&theirs)).await;
    assert_eq!(row(&store, "users", local).await, None);
    assert_eq!(row(&store, "users", remote).await, theirs.new_values);
    let got = state(&store, &[]).await;
    assert_eq!(
        got.blocked,
        vec![blocked_by(&mine, BlockKind::Unique, Some(remote))]
    );
    let all = conflicts(&store, None).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_clash(
        &all[0],
        ConflictKind::Unique,
        &mine,
        &theirs,
        remote,
        "local",
    );

    // The remote user is deleted: the local one is placed again without a new
    // write, and its conflict row goes away.
    let gone = write(
        origin(1),
        Hlc::from_parts(ahead.wall_ms() + 1, 0).expect("hlc"),
        "users",
        remote,
        None,
        &[&theirs],
    );
    apply(&store, std::slice::from_ref(&gone)).await;
    assert_eq!(row(&store, "users", remote).await, None);
    assert_eq!(row(&store, "users", local).await, mine.new_values);
    let got = state(&store, &[]).await;
    assert!(got.blocked.is_empty(), "{:?}", got.blocked);
    assert_eq!(conflicts(&store, None).await, Vec::new());
    assert_eq!(
        got.log,
        BTreeSet::from([mine.event_id, theirs.event_id, gone.event_id])
    );
    store.close().await;
}

/// One new row referencing `parent` in each table that references `users`,
/// written by `origin` at increasing HLCs from `offset_ms`.
fn children_of(db: &TestDb, parent: Ulid, origin: Ulid, offset_ms: i64) -> Vec<ChangeEvent> {
    child_tables(db)
        .iter()
        .zip(0..)
        .map(|(table, i)| {
            let id = Ulid::generate();
            let values = child_row(id, parent, 10 + i);
            write(origin, hlc_at(offset_ms + i), table, id, Some(values), &[])
        })
        .collect()
}

/// A row of each table referencing `users` arrives before its user.
async fn a_child_waits_for_its_parent(db: TestDb) {
    let store = schema::open(&db, ConflictPolicy::Lww).await;
    let parent = Ulid::generate();
    let user = write(
        origin(1),
        hlc_at(-5_000),
        "users",
        parent,
        Some(user_row(parent, Some("p@x.test"), "parent", 50)),
        &[],
    );
    let children = children_of(&db, parent, origin(2), -4_000);
    for child in &children {
        apply(&store, std::slice::from_ref(child)).await;
        assert_eq!(row(&store, &child.table_name, child.record_id).await, None);
    }
    let got = state(&store, &[]).await;
    let mut waiting: Vec<BlockedKey> = children
        .iter()
        .map(|c| blocked_by(c, BlockKind::ForeignKey, Some(parent)))
        .collect();
    waiting.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert_eq!(got.blocked, waiting, "on {}", db.kind());
    assert_eq!(
        conflicts(&store, None).await,
        Vec::new(),
        "waiting is no conflict"
    );

    apply(&store, std::slice::from_ref(&user)).await;
    for child in &children {
        assert_eq!(
            row(&store, &child.table_name, child.record_id).await,
            child.new_values,
            "{} placed once its parent arrived",
            child.table_name
        );
    }
    let got = state(&store, &[]).await;
    assert!(got.blocked.is_empty(), "{:?}", got.blocked);
    assert_eq!(conflicts(&store, None).await, Vec::new());
    let all: BTreeSet<Ulid> = children.iter().chain([&user]).map(|e| e.event_id).collect();
    assert_eq!(got.log, all);
    store.close().await;
}

/// Children written after their parent (on one origin) and its delete (on
/// another, which has not seen them), delivered in both orders.
async fn a_parent_delete_wins_over_its_children(db: TestDb) {
    let parent = Ulid::generate();
    let insert = write(
        origin(1),
        hlc_at(-6_000),
        "users",
        parent,
        Some(user_row(parent, Some("p@x.test"), "parent", 50)),
        &[],
    );
    // Origin A deletes the parent without having seen the children; origin B,
    // having seen the parent, writes them later (greater HLCs than the delete).
    let delete = write(origin(1), hlc_at(-5_000), "users", parent, None, &[&insert]);
    let children = children_of(&db, parent, origin(2), -4_000);
    let children_first: Vec<&ChangeEvent> = [&insert]
        .into_iter()
        .chain(&children)
        .chain([&delete])
        .collect();
    let delete_first: Vec<&ChangeEvent> = [&insert, &delete].into_iter().chain(&children).collect();
    let deliveries = [
        ("children before the delete", one_by_one(&children_first)),
        ("the delete before the children", one_by_one(&delete_first)),
    ];
    let records: Vec<(&str, Ulid)> = [&insert]
        .into_iter()
        .chain(&children)
        .map(|e| (e.table_name.as_str(), e.record_id))
        .collect();
    // On PostgreSQL a deferred key checked at commit would fail a transaction
    // here: every call must succeed.
    let nodes = deliver_each(db, ConflictPolicy::Lww, &deliveries).await;
    for ((_, store), (name, _)) in nodes.iter().zip(&deliveries) {
        let ctx = format!("{}, {name}", store.kind());
        let got = state(store, &records).await;
        assert!(got.rows.is_empty(), "{ctx}: {:?}", got.rows);
        let mut expected: Vec<BlockedKey> = children
            .iter()
            .map(|c| blocked_by(c, BlockKind::ForeignKey, Some(parent)))
            .collect();
        expected.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        assert_eq!(got.blocked, expected, "{ctx}");
        let all = conflicts(store, None).await;
        assert_eq!(all.len(), children.len(), "{ctx}: {all:#?}");
        for child in &children {
            let c = all
                .iter()
                .find(|c| c.conflict_id == child.event_id)
                .unwrap_or_else(|| panic!("{ctx}: no conflict for {}", child.table_name));
            assert_clash(c, ConflictKind::ForeignKey, child, &delete, parent, &ctx);
            assert_eq!(
                (c.status, c.resolution.as_deref()),
                detected(ConflictPolicy::Lww)
            );
        }
        let every: BTreeSet<Ulid> = [&insert, &delete]
            .into_iter()
            .chain(&children)
            .map(|e| e.event_id)
            .collect();
        assert_eq!(got.log, every, "{ctx}");
    }
    converged(&nodes, &deliveries, &records).await;
    // The parent's tombstone stays while its children wait for it, however
    // old and acknowledged (a later write of its origin, so it is not the
    // origin's newest): collected, a node would no longer know what they wait
    // for, and a node keeping it would.
    let later_id = Ulid::generate();
    let later = write(
        origin(1),
        hlc_at(-1_000),
        "users",
        later_id,
        Some(user_row(later_id, Some("later@x.test"), "later", 30)),
        &[],
    );
    let rules = Retain {
        min_age: std::time::Duration::ZERO,
        tombstone_min_age: Some(std::time::Duration::ZERO),
        peers: Vec::new(),
    };
    for (_, store) in &nodes {
        apply(store, std::slice::from_ref(&later)).await;
        store.mark_all_synced().await.expect("synced");
        let done = store.compact_step(&rules, 1_000).await.expect("compact");
        assert_eq!(done.tombstones, 0, "{}: {done:?}", store.kind());
        let kept = store.version("users", parent).await.expect("version");
        assert!(kept.is_some_and(|v| v.deleted), "{}", store.kind());
    }
    close_all(&nodes).await;
}

/// A user whose age the CHECK refuses, in one batch with one it accepts.
async fn a_check_the_table_refuses_blocks_only_that_record(db: TestDb) {
    let store = schema::open(&db, ConflictPolicy::Lww).await;
    let (bad, good) = (Ulid::generate(), Ulid::generate());
    let refused = write(
        origin(1),
        hlc_at(-2_000),
        "users",
        bad,
        Some(user_row(bad, Some("old@x.test"), "old", 500)),
        &[],
    );
    let fine = write(
        origin(2),
        hlc_at(-1_000),
        "users",
        good,
        Some(user_row(good, Some("fine@x.test"), "fine", 40)),
        &[],
    );
    let out = apply(&store, &[refused.clone(), fine.clone()]).await;
    assert_eq!(out.blocked, 1, "{out:?}");
    assert_eq!(row(&store, "users", bad).await, None);
    assert_eq!(row(&store, "users", good).await, fine.new_values);
    let blocked = store.list_blocked(None, 10).await.expect("blocked");
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    let got = state(&store, &[]).await;
    // Blocked by its own table (no record named): tried again whenever a row of
    // it changes, so a greater write that takes one of its values decides it.
    assert_eq!(
        got.blocked,
        vec![(
            "users".to_owned(),
            bad,
            refused.event_id,
            BlockKind::Refused,
            Some("users".to_owned()),
            None
        )]
    );
    assert!(
        blocked[0].reason.to_lowercase().contains("check"),
        "{}",
        blocked[0].reason
    );
    assert_eq!(conflicts(&store, None).await, Vec::new());
    assert_eq!(got.log, BTreeSet::from([refused.event_id, fine.event_id]));
    store.close().await;
}

// ---------------------------------------------------------------------------------
// Delivery orders the property test found ending differently, one each.

/// Three users write one email, each write greater than the one before.
/// Delivered in ascending order each displaces the holder before it;
/// delivered in descending order the greatest holds it from the start. Either
/// way the other two are blocked by the greatest, and their conflicts name it.
async fn every_clash_names_the_record_holding_the_value(db: TestDb) {
    let writes: Vec<ChangeEvent> = (1..=3)
        .map(|n| {
            let id = Ulid::generate();
            let values = user_row(id, Some("same@x.test"), "same", 20);
            let hlc = hlc_at(-4_000 + 1_000 * n as i64);
            write(origin(n), hlc, "users", id, Some(values), &[])
        })
        .collect();
    let ascending: Vec<&ChangeEvent> = writes.iter().collect();
    let descending: Vec<&ChangeEvent> = writes.iter().rev().collect();
    let deliveries = [
        ("in ascending order", one_by_one(&ascending)),
        ("in descending order", one_by_one(&descending)),
    ];
    let nodes = deliver_each(db, ConflictPolicy::Manual, &deliveries).await;
    let holder = &writes[2];
    for ((_, store), (name, _)) in nodes.iter().zip(&deliveries) {
        let ctx = format!("{} delivered {name}", store.kind());
        let mut blocked: Vec<BlockedKey> = writes[..2]
            .iter()
            .map(|w| blocked_by(w, BlockKind::Unique, Some(holder.record_id)))
            .collect();
        blocked.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        assert_eq!(state(store, &[]).await.blocked, blocked, "{ctx}");
        let open = conflicts(store, Some(ConflictStatus::Open)).await;
        assert_eq!(open.len(), 2, "{ctx}: {open:#?}");
        for loser in &writes[..2] {
            let c = open
                .iter()
                .find(|c| c.conflict_id == loser.event_id)
                .unwrap_or_else(|| panic!("{ctx}: no conflict for {}", loser.event_id));
            assert_clash(
                c,
                ConflictKind::Unique,
                loser,
                holder,
                holder.record_id,
                &ctx,
            );
        }
    }
    let records: Vec<(&str, Ulid)> = writes.iter().map(|w| ("users", w.record_id)).collect();
    converged(&nodes, &deliveries, &records).await;
    close_all(&nodes).await;
}

/// A user whose age the CHECK refuses writes an email that a greater write of
/// another user holds. Delivered first it is refused by the table; delivered
/// after the other it clashes on the email first. Every node must end the same.
async fn a_refused_record_is_blocked_alike_in_any_order(db: TestDb) {
    let (refused, holder) = (Ulid::generate(), Ulid::generate());
    let bad = write(
        origin(1),
        hlc_at(-2_000),
        "users",
        refused,
        Some(user_row(refused, Some("same@x.test"), "bad", 500)),
        &[],
    );
    let good = write(
        origin(2),
        hlc_at(-1_000),
        "users",
        holder,
        Some(user_row(holder, Some("same@x.test"), "good", 20)),
        &[],
    );
    let deliveries = [
        ("the refused user first", one_by_one(&[&bad, &good])),
        ("the holder first", one_by_one(&[&good, &bad])),
    ];
    let nodes = deliver_each(db, ConflictPolicy::Manual, &deliveries).await;
    for ((_, store), (name, _)) in nodes.iter().zip(&deliveries) {
        let ctx = format!("{} delivered {name}", store.kind());
        assert_eq!(row(store, "users", holder).await, good.new_values, "{ctx}");
        assert_eq!(row(store, "users", refused).await, None, "{ctx}");
        let blocked = state(store, &[]).await.blocked;
        let records: Vec<(Ulid, Ulid)> = blocked.iter().map(|b| (b.1, b.2)).collect();
        assert_eq!(records, vec![(refused, bad.event_id)], "{ctx}: {blocked:?}");
    }
    converged(
        &nodes,
        &deliveries,
        &[("users", refused), ("users", holder)],
    )
    .await;
    close_all(&nodes).await;
}

/// A parent is deleted and, concurrently, updated by a greater write whose
/// email a greater user holds, so the update wins and the parent still has no
/// row. Its child delivered before the delete was blocked by the delete;
/// delivered last, it only waits for its parent. Every node must end the same.
async fn a_child_conflicts_alike_when_its_parents_delete_stops_winning(db: TestDb) {
    let (parent, other, child) = (Ulid::generate(), Ulid::generate(), Ulid::generate());
    let insert = write(
        origin(1),
        hlc_at(-6_000),
        "users",
        parent,
        Some(user_row(parent, Some("p@x.test"), "parent", 50)),
        &[],
    );
    let delete = write(origin(2), hlc_at(-5_000), "users", parent, None, &[&insert]);
    let update = write(
        origin(3),
        hlc_at(-4_000),
        "users",
        parent,
        Some(user_row(parent, Some("same@x.test"), "parent", 50)),
        &[&insert],
    );
    let holder = write(
        origin(4),
        hlc_at(-1_000),
        "users",
        other,
        Some(user_row(other, Some("same@x.test"), "other", 60)),
        &[],
    );
    let order = write(
        origin(5),
        hlc_at(-5_500),
        "orders",
        child,
        Some(child_row(child, parent, 10)),
        &[],
    );
    let deliveries = [
        (
            "the order before the delete",
            one_by_one(&[&insert, &order, &delete, &holder, &update]),
        ),
        (
            "the order last",
            one_by_one(&[&insert, &holder, &delete, &update, &order]),
        ),
    ];
    let nodes = deliver_each(db, ConflictPolicy::Manual, &deliveries).await;
    let records = [("users", parent), ("users", other), ("orders", child)];
    for ((_, store), (name, _)) in nodes.iter().zip(&deliveries) {
        let ctx = format!("{} delivered {name}", store.kind());
        let got = state(store, &records).await;
        let placed: Vec<Ulid> = got.rows.keys().map(|k| k.1).collect();
        assert_eq!(placed, vec![other], "{ctx}");
        assert_eq!(
            got.blocked,
            vec![
                blocked_by(&order, BlockKind::ForeignKey, Some(parent)),
                blocked_by(&update, BlockKind::Unique, Some(other)),
            ],
            "{ctx}"
        );
    }
    converged(&nodes, &deliveries, &records).await;
    close_all(&nodes).await;
}

// ---------------------------------------------------------------------------------
// Any delivery order converges.

/// Histories the memory backend runs unless `TIDEMARK_CONSTRAINTS_CASES` says.
const MEMORY_CASES: u64 = 1_000;
/// Histories SQLite and PostgreSQL run.
const SQL_CASES: u64 = 2;
/// Deliveries of each history, each to a fresh store.
const DELIVERIES: usize = 3;
const EMAILS: [&str; 3] = ["a@x.test", "b@x.test", "c@x.test"];

/// Every event of a causally consistent history of three origins, in the
/// order they were written.
struct History {
    /// HLCs start here (an hour ago).
    base_ms: i64,
    origins: Vec<Ulid>,
    events: Vec<ChangeEvent>,
    /// Every record written, in order of first write.
    records: Vec<(&'static str, Ulid)>,
}

/// An origin while a history is written: its clock and what it has seen.
struct Origin {
    id: Ulid,
    clock: Hlc,
    /// Indexes in the history of the events it has seen, its own included.
    known: BTreeSet<usize>,
}

impl Origin {
    /// Its next HLC: in the same millisecond or a little later.
    fn tick(&mut self, rng: &mut ChaCha8Rng) -> Hlc {
        let (wall, counter) = (self.clock.wall_ms(), self.clock.counter());
        self.clock = if rng.random_bool(0.3) {
            Hlc::from_parts(wall, counter + 1)
        } else {
            Hlc::from_parts(wall + rng.random_range(1..=3), 0)
        }
        .expect("hlc");
        self.clock
    }

    /// The merged vectors of the events of a record it has seen, and the
    /// greatest of them.
    fn view<'h>(
        &self,
        events: &'h [ChangeEvent],
        table: &str,
        record: Ulid,
    ) -> (VersionVector, Option<&'h ChangeEvent>) {
        let mut vv = VersionVector::new();
        let mut top: Option<&ChangeEvent> = None;
        for e in self.known.iter().map(|&i| &events[i]) {
            if e.table_name == table && e.record_id == record {
                vv.merge(&e.vector().expect("vv"));
                top = top.filter(|t| t.order() > e.order()).or(Some(e));
            }
        }
        (vv, top)
    }

    /// Records of `table` it has seen.
    fn known_records(&self, events: &[ChangeEvent], table: &str) -> Vec<Ulid> {
        let ids: BTreeSet<Ulid> = self
            .known
            .iter()
            .map(|&i| &events[i])
            .filter(|e| e.table_name == table)
            .map(|e| e.record_id)
            .collect();
        ids.into_iter().collect()
    }

    /// A record of `table` whose greatest write it has seen is not a delete.
    fn pick_live(&self, rng: &mut ChaCha8Rng, events: &[ChangeEvent], table: &str) -> Option<Ulid> {
        let live: Vec<Ulid> = self
            .known_records(events, table)
            .into_iter()
            .filter(|&r| {
                let (_, top) = self.view(events, table, r);
                top.is_some_and(|e| e.new_values.is_some())
            })
            .collect();
        pick(rng, &live)
    }
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> Option<T> {
    (!items.is_empty()).then(|| items[rng.random_range(0..items.len())])
}

impl History {
    /// A random history: users inserted, updated and deleted with emails from
    /// a small pool (now and then none, or an age the CHECK refuses), orders
    /// inserted and deleted referencing a user the origin knows or any other,
    /// and now and then an origin learning all another one knows.
    fn generate(rng: &mut ChaCha8Rng) -> History {
        let base_ms = tidemark_hlc::system_wall_ms() - 3_600_000;
        let start = Hlc::from_parts(base_ms, 0).expect("hlc");
        let mut origins: Vec<Origin> = (1..=3)
            .map(|n| Origin {
                id: origin(n),
                clock: start,
                known: BTreeSet::new(),
            })
            .collect();
        let mut h = History {
            base_ms,
            origins: origins.iter().map(|o| o.id).collect(),
            events: Vec::new(),
            records: Vec::new(),
        };
        let new_id = |rng: &mut ChaCha8Rng| Ulid::from_parts(base_ms as u64, rng.random());
        for _ in 0..rng.random_range(10..=40) {
            let o = rng.random_range(0..origins.len());
            let me = &origins[o];
            match rng.random_range(0..100) {
                0..15 => {
                    let from = (o + rng.random_range(1..origins.len())) % origins.len();
                    let learned = origins[from].known.clone();
                    let top = learned.iter().map(|&i| h.events[i].hlc).max();
                    let me = &mut origins[o];
                    me.clock = me.clock.max(top.unwrap_or(Hlc::ZERO));
                    me.known.extend(learned);
                }
                15..60 => {
                    // Half the time an update of a user it knows, else a new user.
                    let known = rng.random_bool(0.5);
                    let id = (known.then(|| me.pick_live(rng, &h.events, "users")))
                        .flatten()
                        .unwrap_or_else(|| new_id(rng));
                    let values = random_user(rng, id);
                    h.write(&mut origins[o], rng, "users", id, Some(values));
                }
                60..68 => {
                    if let Some(id) = me.pick_live(rng, &h.events, "users") {
                        h.write(&mut origins[o], rng, "users", id, None);
                    }
                }
                68..88 => {
                    let anyone: Vec<Ulid> = h
                        .records
                        .iter()
                        .filter(|r| r.0 == "users")
                        .map(|r| r.1)
                        .collect();
                    let user = match rng.random_range(0..10) {
                        0..7 => pick(rng, &me.known_records(&h.events, "users")),
                        7..9 => pick(rng, &anyone),
                        _ => None,
                    };
                    let user = user.unwrap_or_else(|| new_id(rng));
                    let id = new_id(rng);
                    let values = child_row(id, user, rng.random_range(1..100));
                    h.write(&mut origins[o], rng, "orders", id, Some(values));
                }
                _ => {
                    if let Some(id) = me.pick_live(rng, &h.events, "orders") {
                        h.write(&mut origins[o], rng, "orders", id, None);
                    }
                }
            }
        }
        h
    }

    /// `origin` writes `values` (`None`: deletes) to a record, having seen
    /// what it knows of it.
    fn write(
        &mut self,
        origin: &mut Origin,
        rng: &mut ChaCha8Rng,
        table: &'static str,
        record: Ulid,
        values: Option<Values>,
    ) {
        let (seen, _) = origin.view(&self.events, table, record);
        let hlc = origin.tick(rng);
        let id = Ulid::from_parts(hlc.wall_ms() as u64, rng.random());
        self.events
            .push(event(id, origin.id, hlc, table, record, values, seen));
        origin.known.insert(self.events.len() - 1);
        if !self.records.contains(&(table, record)) {
            self.records.push((table, record));
        }
    }

    /// A random delivery: batches of event indexes in which each origin's
    /// events keep their HLC order; now and then a batch is delivered again.
    fn delivery(&self, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
        let mut queues: Vec<VecDeque<usize>> = self
            .origins
            .iter()
            .map(|o| {
                (0..self.events.len())
                    .filter(|&i| self.events[i].node_id == *o)
                    .collect()
            })
            .collect();
        let mut order = Vec::with_capacity(self.events.len());
        loop {
            let ready: Vec<usize> = (0..queues.len())
                .filter(|&q| !queues[q].is_empty())
                .collect();
            let Some(q) = pick(rng, &ready) else { break };
            order.extend(queues[q].pop_front());
        }
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut rest = order.as_slice();
        while !rest.is_empty() {
            let n = if rng.random_bool(0.1) {
                rest.len()
            } else {
                rng.random_range(1..=rest.len().min(4))
            };
            batches.push(rest[..n].to_vec());
            rest = &rest[n..];
            if rng.random_bool(0.15) {
                let again = batches[rng.random_range(0..batches.len())].clone();
                batches.push(again);
            }
        }
        batches
    }

    /// The rows and blocked records `(table, record, winning event)` the rules
    /// give: a record's winner is its greatest write; of the users whose
    /// winners hold one email, the greatest the table accepts has a row; an
    /// order has a row when its user has one; a record whose winner is not a
    /// delete and has no row is blocked.
    fn expected(&self) -> (Rows, BTreeSet<RecordEvent>) {
        let mut winners: BTreeMap<(&str, Ulid), &ChangeEvent> = BTreeMap::new();
        for e in &self.events {
            let w = winners.entry((&e.table_name, e.record_id)).or_insert(e);
            if e.order() > w.order() {
                *w = e;
            }
        }
        let mut live: Vec<(&ChangeEvent, &Values)> = winners
            .values()
            .filter_map(|e| Some((*e, e.new_values.as_ref()?)))
            .collect();
        live.sort_by_key(|(e, _)| Reverse(e.order()));
        let mut rows = BTreeMap::new();
        let mut taken = BTreeSet::new();
        for (e, v) in live.iter().filter(|(e, _)| e.table_name == "users") {
            let accepted = v["age"].as_i64().is_none_or(|a| (0..=200).contains(&a));
            if accepted && v["email"].as_str().is_none_or(|m| taken.insert(m)) {
                rows.insert(("users".to_owned(), e.record_id), (*v).clone());
            }
        }
        for (e, v) in live.iter().filter(|(e, _)| e.table_name == "orders") {
            let user = v["user_id"]
                .as_str()
                .and_then(|u| Ulid::from_string(u).ok());
            if user.is_some_and(|u| rows.contains_key(&("users".to_owned(), u))) {
                rows.insert(("orders".to_owned(), e.record_id), (*v).clone());
            }
        }
        let blocked = live
            .iter()
            .map(|(e, _)| (e.table_name.clone(), e.record_id, e.event_id))
            .filter(|(t, r, _)| !rows.contains_key(&(t.clone(), *r)))
            .collect();
        (rows, blocked)
    }
}

fn random_user(rng: &mut ChaCha8Rng, id: Ulid) -> Values {
    let email = pick(rng, &EMAILS).filter(|_| !rng.random_bool(0.1));
    let age = if rng.random_bool(0.05) {
        500
    } else {
        rng.random_range(0..=120)
    };
    user_row(id, email, &format!("n{}", rng.random_range(0..100)), age)
}

/// Delivers `plan` to a new store on `db` (tables under `manual`, so that
/// open conflicts tell what every node must keep) and returns what it ends with.
async fn deliver(db: &TestDb, h: &History, plan: &[Vec<usize>]) -> Result<State, String> {
    let store = schema::open(db, ConflictPolicy::Manual).await;
    for batch in plan {
        let events: Vec<ChangeEvent> = batch.iter().map(|&i| h.events[i].clone()).collect();
        match store.apply_remote(&events).await {
            Ok(out) if out.quarantined.is_empty() => {}
            Ok(out) => return Err(format!("batch {batch:?} quarantined {:?}", out.quarantined)),
            Err(e) => return Err(format!("batch {batch:?} failed: {e}")),
        }
    }
    let got = state(&store, &h.records).await;
    store.close().await;
    Ok(got)
}

/// A run of one history: the backend, its delivery, what the store ended with.
type Run = (&'static str, Vec<Vec<usize>>, Result<State, String>);

/// What went wrong in a history, in short: the parts of the state stores
/// disagree on, and the other problems [`check`] names.
type Problems = BTreeSet<&'static str>;

/// What is wrong with one history's runs: a delivery that failed, stores that
/// disagree with the first, or a first store whose rows or blocked records are
/// not the rules'. Returns the problems and a report naming events and records.
fn check(h: &History, runs: &[Run]) -> Option<(Problems, String)> {
    let names = Names::new(&h.events);
    let mut problems = Problems::new();
    let mut out = String::new();
    let mut states = Vec::new();
    for (kind, plan, got) in runs {
        match got {
            Ok(state) => states.push(state),
            Err(e) => {
                problems.insert("a delivery failed");
                out += &format!("{kind} delivery {}: {e}\n", names.plan(plan));
            }
        }
    }
    if states.len() == runs.len() {
        let (kind, plan, first) = (runs[0].0, names.plan(&runs[0].1), states[0]);
        for (run, got) in runs.iter().zip(&states).skip(1) {
            if *got != first {
                let (parts, diff) = names.diff(first, got);
                problems.extend(parts);
                out += &format!(
                    "{kind} delivery {plan}\nand {} delivery {}\nend differently:\n{diff}",
                    run.0,
                    names.plan(&run.1),
                );
            }
        }
        let (rows, blocked) = h.expected();
        if first.rows != rows {
            problems.insert("rows are not the rules'");
            out += &format!(
                "{kind} delivery {plan} ends with rows\n  {}\nthe rules give\n  {}\n",
                names.rows(&first.rows),
                names.rows(&rows)
            );
        }
        let got: BTreeSet<RecordEvent> = (first.blocked.iter())
            .map(|b| (b.0.clone(), b.1, b.2))
            .collect();
        if got != blocked {
            problems.insert("blocked records are not the rules'");
            let show = |set: &BTreeSet<RecordEvent>| {
                let items: Vec<String> = (set.iter())
                    .map(|(_, r, e)| format!("{} {}", names.id(*r), names.id(*e)))
                    .collect();
                items.join(", ")
            };
            out += &format!(
                "{kind} delivery {plan} blocks\n  {}\nthe rules give\n  {}\n",
                show(&got),
                show(&blocked)
            );
        }
    }
    (!out.is_empty()).then(|| (problems, format!("history:\n{}{out}", names.history(h))))
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a number")),
    )
}

async fn any_delivery_order_converges(db: TestDb) {
    let seed = env_u64("TIDEMARK_CONSTRAINTS_SEED").unwrap_or_else(|| rand::rng().random());
    let on_sql = db.memory_db().is_none();
    let cases = if on_sql {
        SQL_CASES
    } else {
        env_u64("TIDEMARK_CONSTRAINTS_CASES").unwrap_or(MEMORY_CASES)
    };
    let replay = format!(
        "TIDEMARK_CONSTRAINTS_SEED={seed} cargo test -p tidemark-tests --test constraints \
         {}::any_delivery_order_converges",
        db.kind()
    );
    eprintln!(
        "{cases} histories on {} from seed {seed}; replay: {replay}",
        db.kind()
    );
    // Per problem, the histories that have it; the report of the shortest.
    let mut failures: BTreeMap<&str, (Vec<u64>, usize, String)> = BTreeMap::new();
    for case in 0..cases {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(case));
        let h = History::generate(&mut rng);
        let mut runs: Vec<Run> = Vec::new();
        for i in 0..DELIVERIES {
            // On SQL backends the first delivery goes to the memory backend,
            // which the others are compared with.
            let on = if on_sql && i > 0 {
                db.another()
            } else {
                TestDb::memory()
            };
            let plan = h.delivery(&mut rng);
            let got = deliver(&on, &h, &plan).await;
            runs.push((on.kind(), plan, got));
        }
        let Some((problems, report)) = check(&h, &runs) else {
            continue;
        };
        for problem in problems {
            let (cases, size, shortest) = failures
                .entry(problem)
                .or_insert_with(|| (Vec::new(), usize::MAX, String::new()));
            cases.push(case);
            if h.events.len() < *size {
                (*size, *shortest) = (h.events.len(), format!("case {case}: {report}"));
            }
        }
    }
    if !failures.is_empty() {
        let mut summary = String::new();
        let mut reports = BTreeSet::new();
        for (problem, (cases, _, report)) in &failures {
            summary += &format!("  {problem}: {} histories {cases:?}\n", cases.len());
            reports.insert(report.as_str());
        }
        let reports: Vec<&str> = reports.into_iter().collect();
        panic!(
            "histories went wrong on {} (seed {seed}; case c has seed {seed} + c; replay: \
             {replay}):\n{summary}the shortest history of each problem:\n{}",
            db.kind(),
            reports.join("\n")
        );
    }
}

/// An operator resolves a UNIQUE clash under `manual`: a stale resolution (the
/// winner changed) is refused; merged values place the blocked record with a
/// new value; keeping the losing side displaces the holder (which becomes the
/// blocked one, with a conflict of its own); keeping the winner deletes the
/// blocked record.
/// Two operators resolve the same UNIQUE clash on two nodes at once: every
/// node, whatever order the two resolutions reach it in, records the clash as
/// resolved by the first of them and ends with the same rows and history.
async fn two_operators_resolve_one_clash_on_two_nodes(db: TestDb) {
    use tidemark_store::ResolveChoice;
    let (low, high) = (Ulid::from_parts(2, 9), Ulid::from_parts(3, 9));
    let lo = write(
        origin(1),
        hlc_at(-2_000),
        "users",
        low,
        Some(user_row(low, Some("two@x.test"), "low", 20)),
        &[],
    );
    let hi = write(
        origin(2),
        hlc_at(-1_000),
        "users",
        high,
        Some(user_row(high, Some("two@x.test"), "high", 30)),
        &[],
    );
    let both = vec![vec![lo.clone(), hi.clone()]];
    let deliveries: Vec<Delivery> = vec![
        ("resolves keep local, then gets the other", both.clone()),
        ("resolves keep remote, then gets the other", both.clone()),
        ("gets the first resolution, then the second", both.clone()),
        ("gets the second resolution, then the first", both),
    ];
    let nodes = deliver_each(db, ConflictPolicy::Manual, &deliveries).await;
    let r0 = nodes[0]
        .1
        .resolve_conflict(lo.event_id, ResolveChoice::KeepLocal, "ann", None, None)
        .await
        .expect("keep local");
    let r1 = nodes[1]
        .1
        .resolve_conflict(lo.event_id, ResolveChoice::KeepRemote, "bob", None, None)
        .await
        .expect("keep remote");
    apply(&nodes[0].1, std::slice::from_ref(&r1)).await;
    apply(&nodes[1].1, std::slice::from_ref(&r0)).await;
    apply(&nodes[2].1, &[r0.clone(), r1.clone()]).await;
    apply(&nodes[3].1, std::slice::from_ref(&r1)).await;
    apply(&nodes[3].1, std::slice::from_ref(&r0)).await;
    let first = if (r0.hlc.wall_ms(), r0.event_id) < (r1.hlc.wall_ms(), r1.event_id) {
        (&r0, "keep_local", "ann")
    } else {
        (&r1, "keep_remote", "bob")
    };
    for (_, store) in &nodes {
        let c = store
            .conflict(lo.event_id)
            .await
            .expect("conflict")
            .expect("the resolved clash is kept");
        assert_eq!(
            (
                c.resolution_event_id,
                c.resolution.as_deref(),
                c.resolved_by.as_deref()
            ),
            (Some(first.0.event_id), Some(first.1), Some(first.2)),
            "{}",
            store.kind()
        );
    }
    let records = [("users", low), ("users", high)];
    converged(&nodes, &deliveries, &records).await;
    close_all(&nodes).await;
}

async fn an_operator_resolves_a_unique_clash(db: TestDb) {
    use tidemark_store::{ResolveChoice, StoreError};
    let store = schema::open(&db, ConflictPolicy::Manual).await;
    let clash = |n: u128, offset: i64| {
        let (low, high) = (Ulid::from_parts(2, n), Ulid::from_parts(3, n));
        let email = format!("clash{n}@x.test");
        let lo = write(
            origin(1),
            hlc_at(offset - 1_000),
            "users",
            low,
            Some(user_row(low, Some(&email), "low", 20)),
            &[],
        );
        let hi = write(
            origin(2),
            hlc_at(offset),
            "users",
            high,
            Some(user_row(high, Some(&email), "high", 30)),
            &[],
        );
        (lo, hi)
    };
    let (lo1, hi1) = clash(1, -30_000);
    let (lo2, hi2) = clash(2, -20_000);
    let (lo3, hi3) = clash(3, -10_000);
    apply(
        &store,
        &[
            lo1.clone(),
            hi1.clone(),
            lo2.clone(),
            hi2.clone(),
            lo3.clone(),
            hi3.clone(),
        ],
    )
    .await;
    let open = conflicts(&store, Some(ConflictStatus::Open)).await;
    assert_eq!(open.len(), 3, "{open:?}");

    // A compare-and-set against a winner that is not the conflict's changes nothing.
    let err = store
        .resolve_conflict(
            lo1.event_id,
            ResolveChoice::KeepRemote,
            "ops",
            None,
            Some(lo1.event_id),
        )
        .await
        .expect_err("stale");
    assert!(matches!(err, StoreError::StaleResolution { .. }), "{err}");
    assert_eq!(conflicts(&store, Some(ConflictStatus::Open)).await.len(), 3);

    // Merged: the blocked user gets another email and is placed.
    let merged: tidemark_store::RawValues = [(
        "email".to_owned(),
        serde_json::value::RawValue::from_string("\"merged@x.test\"".into()).expect("raw"),
    )]
    .into_iter()
    .collect();
    let e = store
        .resolve_conflict(
            lo1.event_id,
            ResolveChoice::Merged(merged),
            "ops",
            Some("new email"),
            Some(hi1.event_id),
        )
        .await
        .expect("merged");
    let placed = row(&store, "users", lo1.record_id).await.expect("placed");
    assert_eq!(placed["email"], json!("merged@x.test"));
    assert_eq!(
        placed["name"],
        json!("low"),
        "merged values overlay the blocked side"
    );
    assert_eq!(e.new_values.as_ref(), Some(&placed));
    assert!(row(&store, "users", hi1.record_id).await.is_some());

    // Keep the losing side: it displaces the holder, everywhere alike.
    store
        .resolve_conflict(
            lo2.event_id,
            ResolveChoice::KeepRemote,
            "ops",
            None,
            Some(hi2.event_id),
        )
        .await
        .expect("keep remote");
    assert!(row(&store, "users", lo2.record_id).await.is_some());
    assert_eq!(row(&store, "users", hi2.record_id).await, None);
    let blocked = store.list_blocked(None, 10).await.expect("blocked");
    assert!(
        blocked
            .iter()
            .any(|b| b.record_id == hi2.record_id && b.kind == BlockKind::Unique),
        "{blocked:?}"
    );

    // Keep the winner: the blocked user is deleted.
    store
        .resolve_conflict(
            lo3.event_id,
            ResolveChoice::KeepLocal,
            "ops",
            None,
            Some(hi3.event_id),
        )
        .await
        .expect("keep local");
    assert_eq!(row(&store, "users", lo3.record_id).await, None);
    assert!(row(&store, "users", hi3.record_id).await.is_some());
    assert!(
        store
            .version("users", lo3.record_id)
            .await
            .expect("version")
            .expect("tombstone")
            .deleted
    );

    // The three resolved conflicts are closed with their resolutions; the only
    // open one is the displaced holder's.
    let all = conflicts(&store, None).await;
    for (loser, kind) in [
        (&lo1, "merged"),
        (&lo2, "keep_remote"),
        (&lo3, "keep_local"),
    ] {
        let c = all
            .iter()
            .find(|c| c.conflict_id == loser.event_id)
            .expect("kept");
        assert_eq!(
            (c.status, c.resolution.as_deref()),
            (ConflictStatus::Resolved, Some(kind))
        );
        assert_eq!(c.resolved_by.as_deref(), Some("ops"));
    }
    let open = conflicts(&store, Some(ConflictStatus::Open)).await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].record_id, hi2.record_id);
    assert_eq!(open[0].kind, ConflictKind::Unique);
    store.close().await;
}

// ---------------------------------------------------------------------------------

macro_rules! tests_on {
    ($db:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($db).await;
            }
        )*
    };
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            tests_on!(tidemark_tests::TestDb::sqlite(); $($name),*);
        }
        mod postgres {
            tests_on!(tidemark_tests::TestDb::postgres(); $($name),*);
        }
        mod memory {
            tests_on!(tidemark_tests::TestDb::memory(); $($name),*);
        }
    };
}

on_every_backend!(
    the_store_reads_the_constraints,
    a_unique_clash_keeps_the_greater_write_in_any_order,
    two_operators_resolve_one_clash_on_two_nodes,
    a_local_row_gives_way_to_a_greater_remote_write,
    a_child_waits_for_its_parent,
    a_parent_delete_wins_over_its_children,
    a_check_the_table_refuses_blocks_only_that_record,
    every_clash_names_the_record_holding_the_value,
    a_refused_record_is_blocked_alike_in_any_order,
    a_child_conflicts_alike_when_its_parents_delete_stops_winning,
    an_operator_resolves_a_unique_clash,
    any_delivery_order_converges,
);
