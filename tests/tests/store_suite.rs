//! The store suite: every test runs against SQLite and against a real PostgreSQL
//! started by the test setup, and every test that needs no direct SQL also runs
//! against the in-memory backend. Direct writes go through the real `sqlite3` and
//! `psql` clients.

use std::sync::Arc;

use serde_json::{Value, json};
use tidemark_hlc::{Clock, Hlc, WallClock};
use tidemark_store::memory::Column;
use tidemark_store::{
    Backend, ChangeEvent, ConflictFilter, ConflictPolicy, ConflictStatus, LoggedEvent, Operation,
    ResolveChoice, Retain, Store, StoreError, StoreUrl, Values, VersionVector, snapshot,
};
use tidemark_tests::TestDb;
use ulid::Ulid;

fn clock(node: Ulid) -> Arc<Clock> {
    Arc::new(Clock::new(node, 5_000, WallClock::System).expect("clock"))
}

async fn open(db: &TestDb, node: Ulid) -> Store {
    db.open(clock(node)).await.expect("open store")
}

fn notes_ddl(db: &TestDb) -> String {
    format!(
        "CREATE TABLE notes (id {} PRIMARY KEY, title TEXT NOT NULL, body TEXT, stars {} DEFAULT 0)",
        db.ulid_type(),
        db.int_type()
    )
}

/// Creates the `notes` table: by DDL on the SQL backends, declared in memory.
async fn create_notes(db: &TestDb) {
    match db.memory_db() {
        Some(m) => m
            .create_table(
                "notes",
                vec![
                    Column::new("id", "TEXT").primary_key(),
                    Column::new("title", "TEXT").not_null(),
                    Column::new("body", "TEXT"),
                    Column::new("stars", "INTEGER").default(json!(0)),
                ],
            )
            .await
            .expect("create notes"),
        None => {
            db.sql(&notes_ddl(db));
        }
    }
}

/// Every row of `notes` (key, title, stamps), one line each, in key order.
async fn notes_rows(db: &TestDb) -> String {
    match db.memory_db() {
        Some(m) => m
            .table_rows("notes")
            .await
            .expect("notes")
            .iter()
            .map(|r| {
                format!(
                    "{}{}{}{}",
                    cell(&r["id"]),
                    cell(&r["title"]),
                    cell(&r["hlc_modified"]),
                    cell(&r["node_id"])
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        None => db.sql("SELECT id || title || hlc_modified || node_id FROM notes ORDER BY id"),
    }
}

/// One column of one `notes` row as the SQL clients print it.
async fn notes_cell(db: &TestDb, id: Ulid, column: &str) -> String {
    match db.memory_db() {
        Some(m) => m
            .table_rows("notes")
            .await
            .expect("notes")
            .iter()
            .find(|r| r["id"] == json!(id.to_string()))
            .map(|r| cell(&r[column]))
            .unwrap_or_default(),
        None => db.sql(&format!("SELECT {column} FROM notes WHERE id = '{id}'")),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn count_notes(db: &TestDb) -> usize {
    match db.memory_db() {
        Some(m) => m.table_rows("notes").await.expect("notes").len(),
        None => db.sql("SELECT COUNT(*) FROM notes").parse().expect("count"),
    }
}

async fn with_notes(db: &TestDb, node: Ulid) -> Store {
    create_notes(db).await;
    let store = open(db, node).await;
    store
        .register_table("notes", ConflictPolicy::Lww)
        .await
        .expect("register notes");
    store
}

fn obj(v: Value) -> Values {
    v.as_object().expect("object").clone()
}

/// Values as an application writes them through the API.
fn raw_obj(v: Value) -> tidemark_store::RawValues {
    serde_json::from_value::<std::collections::BTreeMap<String, Value>>(v)
        .expect("object")
        .into_iter()
        .map(|(k, v)| {
            let raw = serde_json::value::RawValue::from_string(v.to_string()).expect("raw");
            (k, raw)
        })
        .collect()
}

fn id(n: u128) -> Ulid {
    // Deterministic, valid ULIDs (timestamp part non-zero).
    Ulid::from_parts(1_764_000_000_000, n)
}

/// Events in `change_events`, in the total order.
async fn all_events(store: &Store) -> Vec<ChangeEvent> {
    store
        .events_after(&VersionVector::new(), 1_000_000)
        .await
        .expect("events")
}

/// A remote event from `origin`, as a peer would send it.
fn remote_event(
    origin: Ulid,
    hlc: Hlc,
    record: Ulid,
    op: Operation,
    new_values: Option<Value>,
) -> ChangeEvent {
    ChangeEvent {
        event_id: Ulid::generate(),
        hlc,
        wall_ms: hlc.wall_ms(),
        node_id: origin,
        table_name: "notes".into(),
        record_id: record,
        operation: op,
        action: None,
        user_id: None,
        old_values: None,
        new_values: new_values.map(|v| notes_row(record, v)),
        metadata: Some(json!({ "vv": { origin.to_string(): hlc.encode() } })),
    }
}

/// Compaction of superseded events older than `min_age`; tombstones stay.
fn superseded_after(min_age: std::time::Duration) -> Retain {
    Retain {
        min_age,
        ..Retain::default()
    }
}

/// Writes `title` to record `r` of `notes` through the store.
async fn put_title(store: &Store, r: Ulid, title: &str) -> ChangeEvent {
    store
        .put("notes", r, &obj(json!({"title": title})))
        .await
        .expect("put")
}

/// The ids of every event in the log, sorted.
async fn log_ids(store: &Store) -> Vec<Ulid> {
    sorted(all_events(store).await.iter().map(|e| e.event_id).collect())
}

fn sorted(mut ids: Vec<Ulid>) -> Vec<Ulid> {
    ids.sort();
    ids
}

/// A whole `notes` row (an event carries every column): the given values over
/// the columns' defaults.
fn notes_row(record: Ulid, given: Value) -> Values {
    let mut row = obj(json!({"id": record.to_string(), "title": null, "body": null, "stars": 0}));
    row.extend(obj(given));
    row
}

fn hlc_at(offset_ms: i64, counter: u16) -> Hlc {
    Hlc::from_parts(tidemark_hlc::system_wall_ms() + offset_ms, counter).expect("hlc")
}

// ---------------------------------------------------------------------------------

async fn migrations_up_down_up(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    assert_eq!(
        store.applied_migrations().await.expect("applied"),
        vec![1, 2, 3, 4, 5, 6]
    );
    store.migrate_down().await.expect("down");
    assert_eq!(
        store.applied_migrations().await.expect("applied"),
        Vec::<i64>::new()
    );
    assert!(
        db.client("SELECT COUNT(*) FROM change_events").is_err(),
        "change_events must be gone after down"
    );
    // The user's table still takes writes (no trigger left pointing at dropped tables).
    db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{}', 'after down')",
        id(1)
    ));
    store.migrate_up().await.expect("up again");
    assert_eq!(
        store.applied_migrations().await.expect("applied"),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(db.sql("SELECT COUNT(*) FROM change_events"), "0");
    store.close().await;
}

async fn direct_writes_are_captured_exactly_once(db: TestDb) {
    let node = Ulid::generate();
    let store = with_notes(&db, node).await;
    let (a, b) = (id(1), id(2));
    db.sql(&format!(
        "INSERT INTO notes (id, title, body, stars) VALUES ('{a}', 'first', 'hello', 3)"
    ));
    db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{b}', 'second')"
    ));
    db.sql(&format!(
        "UPDATE notes SET title = 'first!', stars = 4 WHERE id = '{a}'"
    ));
    db.sql(&format!("DELETE FROM notes WHERE id = '{b}'"));
    // An update that changes nothing replicated is not captured, nor one
    // that sets only the stamp columns.
    db.sql(&format!(
        "UPDATE notes SET title = 'first!' WHERE id = '{a}'"
    ));
    db.sql(&format!(
        "UPDATE notes SET hlc_modified = 1 WHERE id = '{a}'"
    ));
    assert_eq!(store.pending_captures().await.expect("pending"), 4);

    let drained = store.drain().await.expect("drain");
    assert_eq!(drained.events, 4);
    assert!(drained.set_aside.is_empty());
    assert_eq!(store.pending_captures().await.expect("pending"), 0);
    // Draining again adds nothing: exactly once.
    assert_eq!(store.drain().await.expect("drain").events, 0);
    assert_eq!(store.captured_totals(), (4, 0), "stamped direct writes");

    let events = all_events(&store).await;
    assert_eq!(events.len(), 4);
    let ops: Vec<_> = events.iter().map(|e| (e.record_id, e.operation)).collect();
    assert_eq!(
        ops,
        vec![
            (a, Operation::Insert),
            (b, Operation::Insert),
            (a, Operation::Update),
            (b, Operation::Delete)
        ]
    );
    for w in events.windows(2) {
        assert!(
            w[0].hlc < w[1].hlc,
            "hlc must strictly increase in commit order"
        );
    }
    assert!(events.iter().all(|e| e.node_id == node));
    let expect_first = json!({"id": a.to_string(), "title": "first", "body": "hello", "stars": 3});
    let expect_updated =
        json!({"id": a.to_string(), "title": "first!", "body": "hello", "stars": 4});
    // Events are state-based: the row after the write, no old values.
    assert!(events.iter().all(|e| e.old_values.is_none()));
    assert_eq!(events[0].new_values, Some(obj(expect_first)));
    assert_eq!(events[2].new_values, Some(obj(expect_updated.clone())));
    assert_eq!(events[3].new_values, None);

    // The row carries the stamp of its last event; the version is recorded.
    let stamp = db.sql(&format!(
        "SELECT hlc_modified || ',' || node_id FROM notes WHERE id = '{a}'"
    ));
    assert_eq!(stamp, format!("{},{}", events[2].hlc.encode(), node));
    let va = store.version("notes", a).await.expect("v").expect("some");
    assert_eq!((va.event_id, va.deleted), (events[2].event_id, false));
    let vb = store
        .version("notes", b)
        .await
        .expect("v")
        .expect("tombstone");
    assert!(vb.deleted, "a delete leaves a tombstone");
    assert_eq!(
        store.get("notes", a).await.expect("get"),
        Some(obj(expect_updated))
    );
    assert_eq!(store.get("notes", b).await.expect("get"), None);
    // Every stored HLC is above every earlier one, and the vector says so.
    assert_eq!(store.vector().await.expect("vv").get(node), events[3].hlc);
    // A direct write stamped by an API write's transaction counts as captured too.
    db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{}', 'third')",
        id(3)
    ));
    store
        .put("notes", id(4), &obj(json!({"title": "api"})))
        .await
        .expect("put");
    assert_eq!(store.captured_totals(), (5, 0), "stamped by the API write");
    store.close().await;
}

/// Statements writing several rows are captured row by row, in statement
/// order: a multi-row INSERT, an UPDATE of every row (one of which does not
/// change), a key change, and a DELETE of several rows.
async fn multi_row_statements_are_captured_row_by_row(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    let (a, b, c, d) = (id(1), id(2), id(3), id(4));
    db.sql(&format!(
        "INSERT INTO notes (id, title, stars) VALUES ('{c}', 'c', 5), ('{a}', 'a', 1), ('{b}', 'b', 2)"
    ));
    db.sql("UPDATE notes SET stars = 5");
    db.sql(&format!("UPDATE notes SET id = '{d}' WHERE id = '{a}'"));
    db.sql(&format!("DELETE FROM notes WHERE id IN ('{b}', '{c}')"));
    assert_eq!(store.drain().await.expect("drain").events, 9);
    let ops: Vec<(Ulid, Operation)> = all_events(&store)
        .await
        .iter()
        .map(|e| (e.record_id, e.operation))
        .collect();
    let sorted_ops = |mut v: Vec<(Ulid, Operation)>| {
        v.sort_by_key(|(id, _)| *id);
        v
    };
    assert_eq!(
        ops[..3],
        [
            (c, Operation::Insert),
            (a, Operation::Insert),
            (b, Operation::Insert)
        ],
        "{ops:?}"
    );
    assert_eq!(
        sorted_ops(ops[3..5].to_vec()),
        vec![(a, Operation::Update), (b, Operation::Update)],
        "c had five stars already: {ops:?}"
    );
    assert_eq!(
        ops[5..7],
        [(a, Operation::Delete), (d, Operation::Insert)],
        "{ops:?}"
    );
    assert_eq!(
        sorted_ops(ops[7..].to_vec()),
        vec![(b, Operation::Delete), (c, Operation::Delete)],
        "{ops:?}"
    );
    assert_eq!(
        store.get("notes", d).await.expect("get"),
        Some(obj(
            json!({"id": d.to_string(), "title": "a", "body": null, "stars": 5})
        ))
    );
    for gone in [a, b, c] {
        assert!(store.get("notes", gone).await.expect("get").is_none());
        assert!(
            store
                .version("notes", gone)
                .await
                .expect("v")
                .is_some_and(|v| v.deleted)
        );
    }
    store.close().await;
}

async fn key_change_is_delete_plus_insert(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    let (a, b) = (id(1), id(2));
    db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{a}', 'x')"
    ));
    db.sql(&format!("UPDATE notes SET id = '{b}' WHERE id = '{a}'"));
    store.drain().await.expect("drain");
    let ops: Vec<_> = all_events(&store)
        .await
        .iter()
        .map(|e| (e.record_id, e.operation))
        .collect();
    assert_eq!(
        ops,
        vec![
            (a, Operation::Insert),
            (a, Operation::Delete),
            (b, Operation::Insert)
        ]
    );
    store.close().await;
}

async fn non_ulid_keys_are_refused_by_the_trigger(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    for bad in [
        "not-a-ulid",
        "01ARZ3NDEKTSV4RRFFQ69G5fav",
        "81ARZ3NDEKTSV4RRFFQ69G5FAV",
    ] {
        let err = db
            .client(&format!(
                "INSERT INTO notes (id, title) VALUES ('{bad}', 'x')"
            ))
            .expect_err(bad);
        assert!(err.contains("must be a ULID in canonical form"), "{err}");
    }
    assert_eq!(db.sql("SELECT COUNT(*) FROM notes"), "0");
    assert_eq!(store.pending_captures().await.expect("pending"), 0);
    store.close().await;
}

async fn own_writes_are_not_captured(db: TestDb) {
    let node = Ulid::generate();
    let store = with_notes(&db, node).await;
    let a = id(7);
    let put = store
        .put("notes", a, &obj(json!({"title": "api", "stars": 9})))
        .await
        .expect("put");
    assert_eq!(put.operation, Operation::Insert);
    assert_eq!(
        put.new_values,
        Some(obj(
            json!({"id": a.to_string(), "title": "api", "body": null, "stars": 9})
        ))
    );
    let upd = store
        .put("notes", a, &obj(json!({"body": "more"})))
        .await
        .expect("put again");
    assert_eq!(upd.operation, Operation::Update);
    assert_eq!(upd.old_values, None, "events carry no old values");
    assert_eq!(
        upd.new_values.as_ref().and_then(|v| v.get("body")),
        Some(&json!("more"))
    );
    assert_eq!(
        upd.new_values.as_ref().and_then(|v| v.get("title")),
        Some(&json!("api"))
    );
    let del = store
        .delete("notes", a)
        .await
        .expect("delete")
        .expect("existed");
    assert_eq!(del.operation, Operation::Delete);
    assert_eq!(del.old_values, None);
    assert!(store.delete("notes", a).await.expect("delete").is_none());
    assert_eq!(store.pending_captures().await.expect("pending"), 0);
    assert_eq!(store.drain().await.expect("drain").events, 0);
    let events = all_events(&store).await;
    assert_eq!(
        events.len(),
        3,
        "each API write is one event, never captured again"
    );
    assert!(events.windows(2).all(|w| w[0].hlc < w[1].hlc));
    store.close().await;
}

async fn api_input_is_checked(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    let a = id(1);
    let err = store
        .put("nope", a, &Values::new())
        .await
        .expect_err("unknown table");
    assert!(matches!(err, StoreError::UnknownTable { .. }), "{err}");
    assert!(err.to_string().contains("\"nope\""), "{err}");
    let err = store
        .put("notes", a, &obj(json!({"title": "x", "colour": "red"})))
        .await
        .expect_err("unknown column");
    assert!(
        err.to_string().contains("no replicated column \"colour\""),
        "{err}"
    );
    let err = store
        .put(
            "notes",
            a,
            &obj(json!({"title": "x\"; DROP TABLE notes; --", "\"; DROP TABLE notes; --": 1})),
        )
        .await
        .expect_err("hostile column");
    assert!(matches!(err, StoreError::UnknownColumn { .. }), "{err}");
    let err = store
        .put("notes", a, &obj(json!({"hlc_modified": 5})))
        .await
        .expect_err("stamp column");
    assert!(err.to_string().contains("maintained by Tidemark"), "{err}");
    let err = store
        .put("notes", a, &obj(json!({"id": id(2).to_string()})))
        .await
        .expect_err("pk mismatch");
    assert!(
        err.to_string().contains("does not match record id"),
        "{err}"
    );
    assert!(all_events(&store).await.is_empty(), "nothing was written");
    assert_eq!(count_notes(&db).await, 0);
    store.close().await;
}

async fn registration_checks_the_key(db: TestDb) {
    let store = open(&db, Ulid::generate()).await;
    let mut cases = vec![
        ("intkey", "primary key id has type"),
        ("nokey", "primary key is missing"),
        ("twokeys", "primary key is (a, b)"),
        ("missing_table", "no such table"),
        ("tidemark_nodes", "reserved"),
        ("change_events", "reserved"),
        ("bad-name", "not a plain SQL identifier"),
    ];
    match db.memory_db() {
        Some(m) => {
            let text = |n: &str| Column::new(n, "TEXT");
            for (name, cols) in [
                (
                    "intkey",
                    vec![Column::new("id", "INTEGER").primary_key(), text("v")],
                ),
                ("nokey", vec![text("id"), text("v")]),
                (
                    "twokeys",
                    vec![text("a").primary_key(), text("b").primary_key()],
                ),
            ] {
                m.create_table(name, cols).await.expect(name);
            }
            // No row can get into a memory table except through the daemon, so a
            // table holding a non-ULID key (badrows below) cannot be built.
        }
        None => {
            db.sql("CREATE TABLE intkey (id INTEGER PRIMARY KEY, v TEXT)");
            db.sql("CREATE TABLE nokey (id TEXT, v TEXT)");
            db.sql("CREATE TABLE twokeys (a TEXT, b TEXT, PRIMARY KEY (a, b))");
            db.sql(&format!(
                "CREATE TABLE badrows (id {} PRIMARY KEY, v TEXT)",
                db.ulid_type()
            ));
            db.sql("INSERT INTO badrows (id, v) VALUES ('short', 'x')");
            cases.push(("badrows", "holds \"short\" which is not a ULID"));
        }
    }
    for (table, expect) in cases {
        let err = store
            .register_table(table, ConflictPolicy::Lww)
            .await
            .expect_err(table)
            .to_string();
        assert!(err.contains(expect), "{table}: {err}");
    }
    // A refused registration changed nothing: no columns added, no trigger installed.
    let cols = match db.kind() {
        "sqlite" => db.sql("SELECT group_concat(name) FROM pragma_table_info('badrows')"),
        "postgres" => db.sql("SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = 'badrows'"),
        _ => {
            let ident = tidemark_store::ident::Ident::parse("table", "intkey").expect("ident");
            let shape = db
                .memory_db()
                .expect("memory")
                .inspect_table(&ident)
                .await
                .expect("inspect")
                .expect("intkey");
            shape.columns.into_iter().map(|c| c.0).collect::<Vec<_>>().join(",")
        }
    };
    assert_eq!(cols, "id,v");
    if db.memory_db().is_none() {
        db.sql("INSERT INTO badrows (id, v) VALUES ('alsoshort', 'y')");
    }
    assert_eq!(store.pending_captures().await.expect("pending"), 0);
    assert!(store.tables().is_empty());
    store.close().await;
}

async fn registration_snapshots_existing_rows(db: TestDb) {
    db.sql(&notes_ddl(&db));
    let (a, b) = (id(1), id(2));
    db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{a}', 'old a'), ('{b}', 'old b')"
    ));
    let store = open(&db, Ulid::generate()).await;
    let info = store
        .register_table("notes", ConflictPolicy::Manual)
        .await
        .expect("register");
    assert_eq!(info.columns, vec!["id", "title", "body", "stars"]);
    assert_eq!(info.primary_key, "id");
    assert_eq!(store.drain().await.expect("drain").events, 2);
    let events = all_events(&store).await;
    assert!(events.iter().all(|e| e.operation == Operation::Insert));
    assert_eq!(
        events[0].new_values.as_ref().and_then(|v| v.get("title")),
        Some(&json!("old a"))
    );
    // Registering again (e.g. at every start) keeps the id and the registered
    // policy (only set_policy changes it, cluster-wide), and does not snapshot again.
    let again = store
        .register_table("notes", ConflictPolicy::Lww)
        .await
        .expect("again");
    assert_eq!(again.datatype_id, info.datatype_id);
    assert_eq!(again.conflict_policy, ConflictPolicy::Manual);
    let event = store
        .set_policy("notes", ConflictPolicy::Lww)
        .await
        .expect("set policy");
    assert_eq!(event.table_name, "tidemark_datatypes");
    assert_eq!(
        store.table("notes").expect("t").conflict_policy,
        ConflictPolicy::Lww
    );
    assert_eq!(store.pending_captures().await.expect("pending"), 0);
    // A column added later is picked up by re-registration.
    db.sql("ALTER TABLE notes ADD COLUMN tag TEXT");
    let re = store
        .register_table("notes", ConflictPolicy::Lww)
        .await
        .expect("re");
    assert_eq!(re.columns, vec!["id", "title", "body", "stars", "tag"]);
    db.sql(&format!("UPDATE notes SET tag = 'x' WHERE id = '{a}'"));
    store.drain().await.expect("drain");
    let last = all_events(&store)
        .await
        .into_iter()
        .rfind(|e| e.table_name == "notes")
        .expect("event");
    assert_eq!(
        last.new_values.as_ref().and_then(|v| v.get("tag")),
        Some(&json!("x"))
    );
    store.close().await;
}

/// A received event is logged exactly as its origin logged it: the text of
/// its values and metadata (rendered once, ahead of the receiver's
/// transaction) is the origin's, byte for byte, for inserts, updates and
/// deletes, with text that JSON escapes.
async fn received_events_are_logged_as_their_origin_logged_them(db: TestDb) {
    let origin = with_notes(&db, Ulid::generate()).await;
    let other = db.another();
    let receiver = with_notes(&other, Ulid::generate()).await;
    let writes = [
        (
            1,
            json!({"title": "tab\t quote\" backslash\\ é 😀", "body": null, "stars": 7}),
        ),
        (2, json!({"title": "second", "body": "line\nbreak"})),
        (1, json!({"body": "\u{1} control", "stars": -3})),
    ];
    for (n, values) in writes {
        origin.put("notes", id(n), &obj(values)).await.expect("put");
    }
    origin.delete("notes", id(2)).await.expect("delete");
    assert_logged_alike(&origin, &receiver, 4).await;
    origin.close().await;
    receiver.close().await;
}

/// Creates `gauges`, a column of each class besides text and integers
/// (double, exact decimal, boolean, date, instant, UUID, JSON, bytes), and
/// registers it on a new node's store.
async fn with_gauges(db: &TestDb) -> Store {
    let sqlite = db.kind() == "sqlite";
    match db.memory_db() {
        Some(m) => m
            .create_table(
                "gauges",
                [
                    "float64",
                    "decimal",
                    "bool",
                    "date",
                    "timestamptz",
                    "uuid",
                    "json",
                    "bytes",
                ]
                .iter()
                .zip(["f", "d", "b", "dt", "ts", "u", "j", "bl"])
                .fold(
                    vec![Column::new("id", "TEXT").primary_key()],
                    |mut cols, (ty, c)| {
                        cols.push(Column::new(c, ty));
                        cols
                    },
                ),
            )
            .await
            .expect("create gauges"),
        None if sqlite => {
            db.sql(
                "CREATE TABLE gauges (id TEXT PRIMARY KEY, f REAL, d TEXT, b BOOLEAN, dt DATE, \
                 ts TIMESTAMP, u UUID, j JSON, bl BLOB)",
            );
        }
        None => {
            db.sql(
                "CREATE TABLE gauges (id CHAR(26) PRIMARY KEY, f DOUBLE PRECISION, d NUMERIC, \
                 b BOOLEAN, dt DATE, ts TIMESTAMPTZ, u UUID, j JSONB, bl BYTEA)",
            );
        }
    }
    let store = open(db, Ulid::generate()).await;
    let overrides = if sqlite {
        std::collections::BTreeMap::from([("d".to_owned(), "decimal".parse().expect("class"))])
    } else {
        Default::default()
    };
    store
        .register_table_with("gauges", ConflictPolicy::Lww, &overrides)
        .await
        .expect("register gauges");
    store
}

/// The same as [`received_events_are_logged_as_their_origin_logged_them`] for
/// values of every class, their edge values among them (the double nearest
/// 0.1 + 0.2, infinities, the smallest subnormal, a 29-digit decimal, a
/// leap day, microseconds, JSON with escapes, bytes that are not UTF-8).
async fn received_typed_events_are_logged_as_their_origin_logged_them(db: TestDb) {
    let origin = with_gauges(&db).await;
    let other = db.another();
    let receiver = with_gauges(&other).await;
    let writes = [
        (
            1,
            json!({"f": 0.30000000000000004, "d": "-12345678901234567890.123456789",
                   "b": true, "dt": "2024-02-29", "ts": "2024-02-29T23:59:59.999999Z",
                   "u": "0189c3f4-8e1a-7b2c-9d3e-4f5a6b7c8d9e",
                   "j": {"a": [1, 2.5, "x\ty"], "b": null, "é": "\u{1}"}, "bl": "AP9/gA=="}),
        ),
        (
            2,
            json!({"f": "-Infinity", "d": "0.000000000000000000000000000001", "b": false,
                   "dt": "0001-01-01", "ts": "1970-01-01T00:00:00Z",
                   "u": "ffffffff-ffff-ffff-ffff-ffffffffffff", "j": [], "bl": ""}),
        ),
        (
            1,
            json!({"f": 5e-324, "d": "1e-3", "j": "just a string", "bl": null}),
        ),
        (3, json!({"f": "Infinity", "d": null, "j": null})),
    ];
    for (n, values) in writes {
        origin
            .put_raw("gauges", id(n), raw_obj(values))
            .await
            .unwrap_or_else(|e| panic!("put on {}: {e}", db.kind()));
    }
    origin.delete("gauges", id(2)).await.expect("delete");
    // The first event is logged with its exact values, not rounded ones.
    let first = origin
        .log_after(&VersionVector::new(), 1)
        .await
        .expect("log")
        .remove(0);
    let text = first.new_values.expect("new values");
    for exact in ["0.30000000000000004", "12345678901234567890.123456789"] {
        assert!(text.contains(exact), "{exact} is not in {text}");
    }
    assert_logged_alike(&origin, &receiver, 5).await;
    origin.close().await;
    receiver.close().await;
}

/// Applies the events `origin` wrote (at least `least` of them) on `receiver`
/// and checks the receiver logged each with the origin's values and metadata,
/// byte for byte.
async fn assert_logged_alike(origin: &Store, receiver: &Store, least: usize) {
    let own = |log: Vec<LoggedEvent>| -> Vec<LoggedEvent> {
        log.into_iter()
            .filter(|e| e.node_id == origin.node_id())
            .collect()
    };
    let sent = own(origin
        .log_after(&VersionVector::new(), 100)
        .await
        .expect("log"));
    assert!(sent.len() >= least, "{} events", sent.len());
    let events: Vec<ChangeEvent> = sent
        .iter()
        .cloned()
        .map(|e| ChangeEvent::try_from(e).expect("a logged event parses"))
        .collect();
    let out = receiver.apply_remote(&events).await.expect("apply");
    assert_eq!(out.applied, sent.len() as u64);
    let logged = own(receiver
        .log_after(&VersionVector::new(), 100)
        .await
        .expect("log"));
    assert_eq!(logged.len(), sent.len());
    for (a, b) in sent.iter().zip(&logged) {
        assert_eq!(a.event_id, b.event_id);
        assert_eq!(a.new_values, b.new_values, "values of event {}", a.event_id);
        assert_eq!(a.metadata, b.metadata, "metadata of event {}", a.event_id);
    }
}

/// Rows that already exist on two nodes when `notes` is registered on each:
/// every row becomes an event on each node, concurrent with the other's. The
/// rows both hold alike are one row, not a conflict; a row they hold
/// differently is one conflict, the same on both.
async fn identical_rows_registered_on_two_nodes_are_no_conflicts(db: TestDb) {
    let (same, other) = (id(1), id(2));
    let nodes = [db.another(), db.another()];
    let mut stores = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        node.sql(&notes_ddl(node));
        node.sql(&format!(
            "INSERT INTO notes (id, title, body, stars) VALUES ('{same}', 'alike', NULL, 3), \
             ('{other}', 'written on node {n}', 'x', 1)"
        ));
        let store = open(node, Ulid::generate()).await;
        store
            .register_table("notes", ConflictPolicy::Manual)
            .await
            .expect("register");
        assert_eq!(store.drain().await.expect("drain").events, 2);
        stores.push(store);
    }
    for (from, to) in [(0, 1), (1, 0)] {
        let events: Vec<ChangeEvent> = all_events(&stores[from])
            .await
            .into_iter()
            .filter(|e| e.node_id == stores[from].node_id())
            .collect();
        stores[to].apply_remote(&events).await.expect("apply");
    }
    let mut listed = Vec::new();
    for (store, node) in stores.iter().zip(&nodes) {
        let conflicts = store
            .list_conflicts(&ConflictFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(
            conflicts.iter().map(|c| c.record_id).collect::<Vec<_>>(),
            vec![other],
            "{}: only the row the nodes hold differently conflicts",
            db.kind()
        );
        listed.push(conflicts);
        assert_eq!(notes_cell(node, same, "title").await, "alike");
    }
    assert_eq!(
        listed[0],
        listed[1],
        "{}: the same conflict on both",
        db.kind()
    );
    assert_eq!(
        notes_rows(&nodes[0]).await,
        notes_rows(&nodes[1]).await,
        "{}: the same rows",
        db.kind()
    );
    for store in stores {
        store.close().await;
    }
}

/// A remote batch of any size writes every row, whatever statements the backend
/// cuts it into (SQLite upserts in statements of 32, 16, ..., 1 rows): inserts
/// of new records, then updates of all of them with each record written twice
/// in one batch (the later write is the row).
async fn remote_batches_of_any_size_write_every_row(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    let origin = Ulid::from_parts(1, 7);
    let base = tidemark_hlc::system_wall_ms() - 60_000;
    let mut tick = 0i64;
    let mut next_hlc = || {
        tick += 1;
        Hlc::from_parts(base + tick, 0).expect("hlc")
    };
    let mut first = 0u128;
    let mut total = 0;
    for n in [1u128, 2, 3, 31, 32, 33, 63, 65, 100] {
        let records: Vec<Ulid> = (first..first + n).map(|i| id(10_000 + i)).collect();
        first += n;
        let inserts: Vec<ChangeEvent> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let values =
                    json!({"title": format!("new {n}/{i}"), "body": format!("b{i}"), "stars": i});
                remote_event(origin, next_hlc(), *r, Operation::Insert, Some(values))
            })
            .collect();
        let out = store.apply_remote(&inserts).await.expect("apply inserts");
        assert_eq!(out.applied as u128, n, "inserts of a batch of {n}");
        total += n as usize;
        assert_eq!(count_notes(&db).await, total, "rows after a batch of {n}");
        let mut updates = Vec::new();
        for round in ["first", "second"] {
            for (i, r) in records.iter().enumerate() {
                let values =
                    json!({"title": format!("{round} {n}/{i}"), "body": null, "stars": 1000 + i});
                updates.push(remote_event(
                    origin,
                    next_hlc(),
                    *r,
                    Operation::Update,
                    Some(values),
                ));
            }
        }
        // Each update carries the record's whole history from this origin.
        let out = store.apply_remote(&updates).await.expect("apply updates");
        assert_eq!(out.applied as u128, 2 * n, "updates of a batch of {n}");
        for (i, r) in records.iter().enumerate() {
            let row = store.get("notes", *r).await.expect("get").expect("row");
            assert_eq!(row.get("title"), Some(&json!(format!("second {n}/{i}"))));
            assert_eq!(row.get("body"), Some(&Value::Null));
            assert_eq!(row.get("stars"), Some(&json!(1000 + i)));
        }
    }
    assert_eq!(count_notes(&db).await, total);
    store.close().await;
}

async fn remote_apply_is_idempotent_and_lww(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let (peer1, peer2) = (Ulid::from_parts(1, 1), Ulid::from_parts(1, 2));
    let r = id(5);
    let v1 = remote_event(
        peer1,
        hlc_at(-3_000, 0),
        r,
        Operation::Insert,
        Some(json!({"id": r.to_string(), "title": "from peer1", "body": null, "stars": 1})),
    );
    let out = store
        .apply_remote(std::slice::from_ref(&v1))
        .await
        .expect("apply");
    assert_eq!((out.applied, out.duplicates), (1, 0));
    let row = store.get("notes", r).await.expect("get").expect("row");
    assert_eq!(row.get("title"), Some(&json!("from peer1")));
    // The same event again changes nothing.
    let before = notes_rows(&db).await;
    let out = store
        .apply_remote(std::slice::from_ref(&v1))
        .await
        .expect("apply again");
    assert_eq!((out.applied, out.duplicates), (0, 1));
    assert_eq!(notes_rows(&db).await, before);
    assert_eq!(all_events(&store).await.len(), 1);
    // The daemon's apply was not captured.
    assert_eq!(store.pending_captures().await.expect("pending"), 0);

    // A newer delete from peer2, then a late older update from peer1: stays deleted.
    let del = remote_event(peer2, hlc_at(-1_000, 0), r, Operation::Delete, None);
    let late = remote_event(
        peer1,
        hlc_at(-2_000, 0),
        r,
        Operation::Update,
        Some(json!({"id": r.to_string(), "title": "late", "body": null, "stars": 2})),
    );
    let out = store
        .apply_remote(std::slice::from_ref(&del))
        .await
        .expect("delete");
    assert_eq!(out.applied, 1);
    let out = store
        .apply_remote(std::slice::from_ref(&late))
        .await
        .expect("late");
    assert_eq!((out.applied, out.superseded), (0, 1));
    assert_eq!(
        store.get("notes", r).await.expect("get"),
        None,
        "no resurrection"
    );
    let v = store
        .version("notes", r)
        .await
        .expect("v")
        .expect("tombstone");
    assert_eq!(v.event_id, del.event_id);
    // Every event is kept for audit and relay.
    assert_eq!(store.history("notes", r).await.expect("history").len(), 3);
    let vv = store.vector().await.expect("vv");
    assert_eq!(vv.get(peer1), late.hlc);
    assert_eq!(vv.get(peer2), del.hlc);
    // The clock moved past what it observed.
    assert!(store.clock().now() > del.hlc);
    store.close().await;
}

async fn concurrent_versions_converge_in_any_order(db: TestDb) {
    // Two stores on the same backend kind receive the same events in opposite orders.
    let other = db.another();
    let s1 = with_notes(&db, Ulid::generate()).await;
    let s2 = with_notes(&other, Ulid::generate()).await;
    let (p1, p2, p3) = (
        Ulid::from_parts(1, 1),
        Ulid::from_parts(1, 2),
        Ulid::from_parts(1, 3),
    );
    let r = id(9);
    let same = hlc_at(-500, 0);
    let events = vec![
        remote_event(
            p1,
            hlc_at(-900, 0),
            r,
            Operation::Insert,
            Some(json!({"id": r.to_string(), "title": "a", "body": null, "stars": 1})),
        ),
        remote_event(
            p2,
            same,
            r,
            Operation::Update,
            Some(json!({"id": r.to_string(), "title": "b", "body": null, "stars": 2})),
        ),
        remote_event(
            p3,
            same,
            r,
            Operation::Update,
            Some(json!({"id": r.to_string(), "title": "c", "body": null, "stars": 3})),
        ),
    ];
    for e in &events {
        s1.apply_remote(std::slice::from_ref(e))
            .await
            .expect("apply s1");
    }
    for e in events.iter().rev() {
        s2.apply_remote(std::slice::from_ref(e))
            .await
            .expect("apply s2");
    }
    let g1 = s1.get("notes", r).await.expect("g1");
    let g2 = s2.get("notes", r).await.expect("g2");
    assert_eq!(g1, g2);
    // Same hlc: the greater node id (p3) wins.
    assert_eq!(g1.expect("row").get("title"), Some(&json!("c")));
    let v1 = s1.version("notes", r).await.expect("v").expect("v");
    let v2 = s2.version("notes", r).await.expect("v").expect("v");
    assert_eq!(v1, v2);
    s1.close().await;
    s2.close().await;
}

async fn bad_remote_events_hold_their_origin(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    let peer = Ulid::from_parts(1, 1);
    let r = id(3);
    let good = remote_event(
        peer,
        hlc_at(-100, 0),
        r,
        Operation::Insert,
        Some(json!({"id": r.to_string(), "title": "ok", "body": null, "stars": 1})),
    );
    let mut unknown_table = remote_event(
        peer,
        hlc_at(-90, 0),
        r,
        Operation::Insert,
        Some(json!({"id": r.to_string(), "title": "x"})),
    );
    unknown_table.table_name = "users; DROP TABLE notes".into();
    let unknown_column = remote_event(
        peer,
        hlc_at(-80, 0),
        r,
        Operation::Update,
        Some(json!({"id": r.to_string(), "title\" = 'pwned' --": "x"})),
    );
    let delete_with_values = remote_event(
        peer,
        hlc_at(-70, 0),
        r,
        Operation::Delete,
        Some(json!({"id": r.to_string()})),
    );
    let wrong_pk = remote_event(
        peer,
        hlc_at(-60, 0),
        r,
        Operation::Update,
        Some(json!({"id": id(4).to_string(), "title": "x"})),
    );
    let mut bad_vv = remote_event(
        peer,
        hlc_at(-50, 0),
        r,
        Operation::Update,
        Some(json!({"id": r.to_string(), "title": "x"})),
    );
    bad_vv.metadata = Some(json!({"vv": {"not-a-ulid": 1}}));
    let mut far_future = remote_event(
        peer,
        hlc_at(-40, 0),
        id(5),
        Operation::Insert,
        Some(json!({"id": id(5).to_string(), "title": "max"})),
    );
    far_future.hlc = Hlc::decode(i64::MAX).expect("max");
    let refused_by_table = remote_event(
        peer,
        hlc_at(-30, 0),
        id(6),
        Operation::Insert,
        Some(json!({"id": id(6).to_string(), "body": "no title, which is NOT NULL"})),
    );
    let cases: Vec<(ChangeEvent, &str, &str)> = vec![
        (unknown_table, "NOT_FOUND", "is not a replicated table"),
        (
            unknown_column,
            "INVALID_ARGUMENT",
            "has no replicated column",
        ),
        (
            delete_with_values,
            "INVALID_ARGUMENT",
            "a DELETE carries no new values",
        ),
        (wrong_pk, "INVALID_ARGUMENT", "does not match record id"),
        (bad_vv, "INVALID_ARGUMENT", "is not a ULID"),
        (far_future, "OUT_OF_RANGE", "no clock drift explains it"),
    ];
    let other = Ulid::from_parts(1, 77);
    for (n, (bad, code, expect)) in cases.into_iter().enumerate() {
        let before = notes_rows(&db).await;
        // The good event travels in the same batch and applies (once); an event
        // of another origin after the bad one applies too: only the bad event's
        // origin is held, from the bad event on.
        let bystander = remote_event(
            other,
            hlc_at(-200, n as u16),
            id(300 + n as u128),
            Operation::Insert,
            Some(json!({"id": id(300 + n as u128).to_string(), "title": "bystander"})),
        );
        let out = store
            .apply_remote(&[good.clone(), bad.clone(), bystander.clone()])
            .await
            .expect(expect);
        assert!(
            out.quarantined.is_empty(),
            "{expect}: {:?}",
            out.quarantined
        );
        assert_eq!(out.held.len(), 1, "{expect}");
        let h = &out.held[0];
        assert_eq!(
            (h.origin, h.hlc, h.event_id.as_str(), h.kind.code()),
            (
                bad.node_id,
                bad.hlc,
                bad.event_id.to_string().as_str(),
                code
            ),
            "{expect}"
        );
        assert!(h.reason.contains(expect), "{expect}: {}", h.reason);
        assert!(h.retry_after_ms > 0, "{expect}");
        assert_eq!(store.count_quarantined().await.expect("count"), 0);
        // Nothing of the bad event reached the table or the log; the bystander did.
        let events = all_events(&store).await;
        assert!(events.iter().any(|e| e.event_id == good.event_id));
        assert!(events.iter().any(|e| e.event_id == bystander.event_id));
        assert!(
            !events.iter().any(|e| e.event_id == bad.event_id),
            "{expect}"
        );
        assert_eq!(events.len(), 2 + n, "{expect}");
        if n > 0 {
            assert_eq!(
                count_notes(&db).await,
                before.lines().count() + 1,
                "{expect}"
            );
        }
    }
    assert_eq!(notes_cell(&db, r, "title").await, "ok");
    let rows_before = count_notes(&db).await;
    // A row the table refuses (NOT NULL) is not a hole: the event is kept in the
    // log (and relayed), its record is blocked here with the table's reason.
    let out = store
        .apply_remote(std::slice::from_ref(&refused_by_table))
        .await
        .expect("refused by the table");
    assert!(out.quarantined.is_empty(), "{:?}", out.quarantined);
    assert_eq!(out.blocked, 1);
    assert!(
        all_events(&store)
            .await
            .iter()
            .any(|e| e.event_id == refused_by_table.event_id),
        "the refused event stays in the log"
    );
    let blocked = store.list_blocked(None, 10).await.expect("blocked");
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(
        (blocked[0].record_id, blocked[0].event_id, blocked[0].kind),
        (
            id(6),
            refused_by_table.event_id,
            tidemark_store::BlockKind::Refused
        )
    );
    assert!(
        blocked[0].reason.contains("the table refuses the row")
            && blocked[0].reason.to_lowercase().contains("null"),
        "{}",
        blocked[0].reason
    );
    assert_eq!(
        count_notes(&db).await,
        rows_before,
        "no row for the blocked record"
    );
    // A value the column's type cannot hold.
    let typed = remote_event(
        peer,
        hlc_at(-25, 0),
        id(7),
        Operation::Insert,
        Some(json!({"id": id(7).to_string(), "title": "t", "stars": "many"})),
    );
    let out = store
        .apply_remote(std::slice::from_ref(&typed))
        .await
        .expect("typed");
    // A value outside its column's class holds its origin alike on every
    // backend (SQLite would store the text; it is never carried there either).
    assert_eq!(out.held.len(), 1);
    assert_eq!(out.held[0].kind.code(), "INVALID_ARGUMENT");
    assert!(
        out.held[0]
            .reason
            .contains("column stars (int64): expected an integer, found a string"),
        "{}",
        out.held[0].reason
    );
    assert_eq!(notes_cell(&db, id(7), "stars").await, "");
    let again = store
        .apply_remote(std::slice::from_ref(&good))
        .await
        .expect("again");
    assert_eq!(again.duplicates, 1);

    let stored = all_events(&store).await.len();
    // A timestamp beyond the max drift but not absurd holds its origin from that
    // event on; what came before it applies, and it may apply once the clocks agree.
    let r2 = id(9);
    let later = remote_event(
        peer,
        hlc_at(-5, 0),
        r2,
        Operation::Insert,
        Some(json!({"id": r2.to_string(), "title": "later"})),
    );
    let future = remote_event(
        peer,
        hlc_at(3_600_000, 0),
        r2,
        Operation::Update,
        Some(json!({"id": r2.to_string(), "title": "future"})),
    );
    let out = store
        .apply_remote(&[later.clone(), future.clone()])
        .await
        .expect("drift");
    assert_eq!(out.applied, 1);
    assert_eq!(out.held.len(), 1);
    assert_eq!(
        (out.held[0].event_id.as_str(), out.held[0].kind.code()),
        (future.event_id.to_string().as_str(), "OUT_OF_RANGE")
    );
    assert!(
        out.held[0].reason.contains("beyond the max drift"),
        "{}",
        out.held[0].reason
    );
    assert!(out.held[0].retry_after_ms >= 1_000);
    assert_eq!(all_events(&store).await.len(), stored + 1);
    assert_eq!(store.vector().await.expect("vv").get(peer), later.hlc);
    // An origin's events out of order hold it at the first one out of order.
    // Below `later` by construction (the wall clock moved since `later` was made).
    let earlier = remote_event(
        peer,
        Hlc::from_parts(later.hlc.wall_ms() - 15, 0).expect("hlc"),
        id(8),
        Operation::Insert,
        Some(json!({"id": id(8).to_string(), "title": "earlier"})),
    );
    let next = remote_event(
        peer,
        hlc_at(-1, 0),
        id(10),
        Operation::Insert,
        Some(json!({"id": id(10).to_string(), "title": "next"})),
    );
    let out = store
        .apply_remote(&[later, earlier.clone(), next.clone()])
        .await
        .expect("order");
    assert_eq!(out.held.len(), 1);
    assert_eq!(out.held[0].event_id, earlier.event_id.to_string());
    assert!(
        out.held[0].reason.contains("out of order"),
        "{}",
        out.held[0].reason
    );
    assert!(
        !all_events(&store)
            .await
            .iter()
            .any(|e| e.event_id == next.event_id),
        "nothing of a held origin after the held event applies"
    );
    // Malformed ids and operations are named when parsed.
    let err = tidemark_store::model::parse_ulid("event_id", "01ARZ3NDEK").expect_err("short");
    assert_eq!(
        err.to_string(),
        "invalid event_id: \"01ARZ3NDEK\" is not a ULID (must be 26 characters, got 10)"
    );
    let err = "UPSERT".parse::<Operation>().expect_err("op");
    assert_eq!(
        err.to_string(),
        "invalid operation: \"UPSERT\" is not one of INSERT, UPDATE, DELETE"
    );
    store.close().await;
}

async fn events_after_a_vector(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let peer = Ulid::from_parts(1, 1);
    let mut remote = Vec::new();
    for i in 0..5u16 {
        let r = id(100 + u128::from(i));
        remote.push(remote_event(
            peer,
            hlc_at(-5_000, i),
            r,
            Operation::Insert,
            Some(json!({"id": r.to_string(), "title": format!("p{i}")})),
        ));
    }
    store.apply_remote(&remote).await.expect("apply");
    for i in 0..3 {
        store
            .put("notes", id(200 + i), &obj(json!({"title": "mine"})))
            .await
            .expect("put");
    }
    let all = all_events(&store).await;
    assert_eq!(all.len(), 8);
    assert!(
        all.windows(2).all(|w| w[0].order() < w[1].order()),
        "oldest first"
    );
    // A receiver that has peer's first two events and none of ours.
    let mut have = VersionVector::new();
    have.observe(peer, remote[1].hlc);
    let got = store.events_after(&have, 100).await.expect("after");
    assert_eq!(got.len(), 6);
    assert_eq!(got.iter().filter(|e| e.node_id == peer).count(), 3);
    assert_eq!(got[0].event_id, remote[2].event_id);
    // The limit cuts in the total order.
    let two = store.events_after(&have, 2).await.expect("limit");
    assert_eq!(
        two.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        got[..2].iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
    // A receiver with everything gets nothing.
    let full = store.vector().await.expect("vv");
    assert!(
        store
            .events_after(&full, 100)
            .await
            .expect("none")
            .is_empty()
    );
    store.close().await;
}

/// Retention deletes only superseded events every peer acknowledged, after
/// the minimum age; what stays (each record's current version, tombstones
/// included) brings a peer that is behind to the same rows; and a peer saying
/// it holds a compacted own event is no sign of a lost log.
async fn compaction_keeps_every_current_version(db: TestDb) {
    use std::time::Duration;
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let p1 = Ulid::from_parts(1, 1);
    let (r1, r2, r3) = (id(1), id(2), id(3));
    let put = |r: Ulid, title: &'static str| put_title(&store, r, title);
    let a1 = put(r1, "a1").await;
    put(r1, "a2").await;
    let a3 = put(r1, "a3").await;
    let b1 = put(r2, "b1").await;
    let c1 = put(r3, "c1").await;
    let c2 = store
        .delete("notes", r3)
        .await
        .expect("delete")
        .expect("an event");
    // Every event is older than a minimum age of zero (HLCs of this ms are not).
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Nothing is acknowledged yet: nothing goes.
    let done = store
        .compact_step(&superseded_after(Duration::ZERO), 100)
        .await
        .expect("step");
    assert_eq!((done.scanned, done.deleted), (0, 0));
    // The peer has everything up to b1: a1 and a2 are superseded and go.
    let mut acked = VersionVector::new();
    acked.observe(me, b1.hlc);
    store.record_ack(p1, &acked).await.expect("ack");
    store.mark_synced(&[p1]).await.expect("mark");
    let done = store
        .compact_step(&superseded_after(Duration::from_secs(3600)), 100)
        .await
        .expect("young");
    assert_eq!(done.deleted, 0, "younger than the minimum age: kept");
    let done = store
        .compact_step(&superseded_after(Duration::ZERO), 100)
        .await
        .expect("step");
    assert_eq!((done.scanned, done.deleted), (4, 2), "{done:?}");
    assert_eq!(
        log_ids(&store).await,
        sorted(vec![a3.event_id, b1.event_id, c1.event_id, c2.event_id])
    );
    // Everything acknowledged: c1 (superseded by the delete) goes; the
    // tombstone and the other current versions stay.
    let mut all = VersionVector::new();
    all.observe(me, c2.hlc);
    store.record_ack(p1, &all).await.expect("ack");
    store.mark_synced(&[p1]).await.expect("mark");
    let done = store
        .compact_step(&superseded_after(Duration::ZERO), 100)
        .await
        .expect("step");
    assert_eq!(done.deleted, 1, "{done:?}");
    assert_eq!(
        store
            .compact_step(&superseded_after(Duration::ZERO), 100)
            .await
            .expect("again")
            .deleted,
        0
    );
    let kept = store
        .events_after(&VersionVector::new(), 100)
        .await
        .expect("log");
    assert_eq!(
        sorted(kept.iter().map(|e| e.event_id).collect()),
        sorted(vec![a3.event_id, b1.event_id, c2.event_id])
    );
    assert_eq!(
        store.history("notes", r1).await.expect("history").len(),
        1,
        "r1 keeps its current version only"
    );
    // The rows are untouched.
    assert_eq!(
        store.get("notes", r1).await.expect("r1").expect("row")["title"],
        json!("a3")
    );
    assert!(store.get("notes", r3).await.expect("r3").is_none());
    // A peer holding a compacted own event: the log is not short of it.
    assert!(
        !store.peer_holds_own(p1, a1.hlc).await.expect("gate"),
        "a compacted event counts as held"
    );
    // A peer that is behind converges from what stays.
    let other = db.another();
    let behind = with_notes(&other, Ulid::generate()).await;
    behind.apply_remote(&kept).await.expect("apply");
    for r in [r1, r2, r3] {
        assert_eq!(
            behind.get("notes", r).await.expect("behind"),
            store.get("notes", r).await.expect("here"),
            "{r}"
        );
        assert_eq!(
            behind.version("notes", r).await.expect("v"),
            store.version("notes", r).await.expect("v")
        );
    }
    behind.close().await;
    store.close().await;
}

/// Tombstones go only when the delete is all that is left of its record,
/// nothing concurrent or blocked keeps it, it is old enough, and every
/// configured peer acknowledged it, a released one included (`synced_at`
/// does not wait for that one). The record's id written again afterwards is a
/// plain successor on a node that still keeps the tombstone: no conflict
/// there, none here, the same row and version on both.
async fn compaction_collects_tombstones(db: TestDb) {
    use std::time::Duration;
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let (p1, p2) = (Ulid::from_parts(1, 1), Ulid::from_parts(1, 2));
    let origin = Ulid::from_parts(1, 3);
    let (r1, r2, r3) = (id(21), id(22), id(23));
    // r1: written and deleted by `origin`, so the tombstone's vector has an
    // entry this node's own writes never raise.
    let d1 = remote_event(origin, hlc_at(-2_000, 0), r1, Operation::Delete, None);
    store
        .apply_remote(&[
            remote_event(
                origin,
                hlc_at(-3_000, 0),
                r1,
                Operation::Insert,
                Some(json!({"title": "a"})),
            ),
            d1.clone(),
        ])
        .await
        .expect("apply");
    // r3: deleted here, and a concurrent update from `origin` (older, so the
    // delete wins, but both are concurrent versions).
    put_title(&store, r3, "c").await;
    store
        .delete("notes", r3)
        .await
        .expect("delete")
        .expect("event");
    let theirs = remote_event(
        origin,
        hlc_at(-1_000, 0),
        r3,
        Operation::Update,
        Some(json!({"title": "theirs"})),
    );
    store.apply_remote(&[theirs]).await.expect("apply");
    // r2: a live row, written last so no delete is its origin's newest event.
    put_title(&store, r2, "b").await;
    // A node that receives all of it and keeps its tombstones.
    let other_db = db.another();
    let other = with_notes(&other_db, Ulid::generate()).await;
    other
        .apply_remote(&all_events(&store).await)
        .await
        .expect("other");
    tokio::time::sleep(Duration::from_millis(5)).await;

    let rules = Retain {
        min_age: Duration::ZERO,
        tombstone_min_age: Some(Duration::ZERO),
        peers: vec![p1, p2],
    };
    // p1 acknowledged everything; p2 (released: synced_at waits for p1
    // only) nothing yet. Superseded events go, tombstones stay.
    let everything = store.vector().await.expect("vector");
    store.record_ack(p1, &everything).await.expect("ack");
    store.mark_synced(&[p1]).await.expect("mark");
    let done = store.compact_step(&rules, 100).await.expect("step");
    assert_eq!((done.deleted, done.tombstones), (2, 0), "{done:?}");
    assert!(store.version("notes", r1).await.expect("v").is_some());
    // Too young for a tombstone age of an hour: stays.
    store.record_ack(p2, &everything).await.expect("ack");
    let young = Retain {
        tombstone_min_age: Some(Duration::from_secs(3600)),
        ..rules.clone()
    };
    let done = store.compact_step(&young, 100).await.expect("step");
    assert_eq!(done.tombstones, 0, "{done:?}");
    // Both peers acknowledged it and it is old enough: r1 is forgotten.
    let done = store.compact_step(&rules, 100).await.expect("step");
    assert_eq!((done.deleted, done.tombstones), (1, 1), "{done:?}");
    assert!(store.version("notes", r1).await.expect("v").is_none());
    assert!(store.history("notes", r1).await.expect("h").is_empty());
    assert!(!log_ids(&store).await.contains(&d1.event_id));
    // r3's tombstone has a concurrent version beside it: it stays, and so
    // do both events.
    let v3 = store.version("notes", r3).await.expect("v").expect("r3");
    assert_eq!(v3.frontier.len(), 2, "{v3:?}");
    assert_eq!(store.history("notes", r3).await.expect("h").len(), 2);
    assert_eq!(
        store
            .compact_step(&rules, 100)
            .await
            .expect("again")
            .tombstones,
        0
    );

    // r1 written again here, where it is forgotten, reaches the node that
    // keeps its tombstone as a successor of the delete.
    let again = put_title(&store, r1, "again").await;
    let vv = again.vector().expect("vv");
    let old = other
        .version("notes", r1)
        .await
        .expect("v")
        .expect("tombstone");
    assert!(
        old.vv.0.iter().all(|(o, h)| vv.get(*o) >= *h),
        "the new write has seen the tombstone: {vv:?} against {old:?}"
    );
    let before = conflicts_of(&other).await.len();
    let out = other.apply_remote(&[again]).await.expect("apply");
    assert_eq!((out.applied, out.conflicts), (1, 0), "{out:?}");
    assert_eq!(conflicts_of(&other).await.len(), before);
    assert_eq!(
        other.get("notes", r1).await.expect("other"),
        store.get("notes", r1).await.expect("here")
    );
    assert_eq!(
        other.version("notes", r1).await.expect("v"),
        store.version("notes", r1).await.expect("v")
    );
    other.close().await;
    store.close().await;
}

/// Compaction on records a conflict or a block holds: concurrent versions (the
/// record's frontier) and a blocked record's event stay however old and
/// acknowledged; once a later write has seen both versions they go; a node that
/// is behind converges from what stays, block included.
async fn compaction_keeps_concurrent_versions_and_blocked_events(db: TestDb) {
    use std::time::Duration;
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let (peer, origin) = (Ulid::from_parts(1, 1), Ulid::from_parts(1, 2));
    let (r1, r2, r3) = (id(11), id(12), id(13));
    let put = |r: Ulid, title: &'static str| put_title(&store, r, title);
    // r1: this node's version and a concurrent one from `origin` (older, so it
    // loses under lww but stays a concurrent version).
    let mine = put(r1, "mine").await;
    let theirs = remote_event(
        origin,
        hlc_at(-1_000, 0),
        r1,
        Operation::Insert,
        Some(json!({"title": "theirs"})),
    );
    // r3: a row the table refuses (title is NOT NULL): blocked here.
    let refused = remote_event(
        origin,
        hlc_at(-900, 0),
        r3,
        Operation::Insert,
        Some(json!({"body": "no title"})),
    );
    let out = store
        .apply_remote(&[theirs.clone(), refused.clone()])
        .await
        .expect("apply");
    assert_eq!(out.blocked, 1, "{out:?}");
    let frontier = store.version("notes", r1).await.expect("v").expect("r1");
    assert_eq!(frontier.frontier.len(), 2, "concurrent: {frontier:?}");
    // r2: two versions of this node, the first superseded.
    let b1 = put(r2, "b1").await;
    let b2 = put(r2, "b2").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let ack_all = || async {
        let all = store.vector().await.expect("vector");
        store.record_ack(peer, &all).await.expect("ack");
        store.mark_synced(&[peer]).await.expect("mark");
    };
    let log = || log_ids(&store);
    ack_all().await;
    let done = store
        .compact_step(&superseded_after(Duration::ZERO), 100)
        .await
        .expect("step");
    assert_eq!(done.deleted, 1, "only b1 is superseded: {done:?}");
    assert!(!log().await.contains(&b1.event_id));
    assert_eq!(
        log().await,
        sorted(vec![
            mine.event_id,
            theirs.event_id,
            refused.event_id,
            b2.event_id
        ])
    );
    assert_eq!(store.count_blocked().await.expect("blocked"), 1);
    // r1's two versions are a conflict lww decided: it stays with them.
    let decided = conflicts_of(&store).await;
    assert_eq!(decided.len(), 1, "{decided:?}");
    assert_eq!(decided[0].status, ConflictStatus::Resolved);
    assert_eq!(done.conflicts, 0);

    // A write that has seen both versions of r1 ends the conflict: the two go,
    // and the decided conflict with them.
    let after = put(r1, "after").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    ack_all().await;
    let done = store
        .compact_step(&superseded_after(Duration::ZERO), 100)
        .await
        .expect("step");
    assert_eq!(done.deleted, 2, "{done:?}");
    assert_eq!(done.conflicts, 1, "{done:?}");
    assert!(conflicts_of(&store).await.is_empty());
    let kept = all_events(&store).await;
    assert_eq!(
        sorted(kept.iter().map(|e| e.event_id).collect()),
        sorted(vec![refused.event_id, b2.event_id, after.event_id])
    );
    // A node that is behind converges from what stays, the block included.
    let other = db.another();
    let behind = with_notes(&other, Ulid::generate()).await;
    let out = behind.apply_remote(&kept).await.expect("apply");
    assert_eq!(out.blocked, 1, "{out:?}");
    for r in [r1, r2, r3] {
        assert_eq!(
            behind.get("notes", r).await.expect("behind"),
            store.get("notes", r).await.expect("here"),
            "{r}"
        );
        assert_eq!(
            behind.version("notes", r).await.expect("v"),
            store.version("notes", r).await.expect("v"),
            "{r}"
        );
    }
    // Nor does it hold the conflict: the same history on both.
    assert!(conflicts_of(&behind).await.is_empty());
    behind.close().await;
    store.close().await;
}

async fn synced_when_every_peer_acked(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let (p1, p2) = (Ulid::from_parts(1, 1), Ulid::from_parts(1, 2));
    let e1 = store
        .put("notes", id(1), &obj(json!({"title": "1"})))
        .await
        .expect("put");
    let e2 = store
        .put("notes", id(2), &obj(json!({"title": "2"})))
        .await
        .expect("put");
    assert_eq!(store.count_unsynced().await.expect("n"), 2);
    assert_eq!(
        store.mark_synced(&[]).await.expect("none"),
        0,
        "no peers: nothing is synced"
    );
    let mut acked = VersionVector::new();
    acked.observe(me, e1.hlc);
    store.record_ack(p1, &acked).await.expect("ack p1");
    assert_eq!(
        store.mark_synced(&[p1, p2]).await.expect("mark"),
        0,
        "p2 has not acked"
    );
    store.record_ack(p2, &acked).await.expect("ack p2");
    assert_eq!(store.mark_synced(&[p1, p2]).await.expect("mark"), 1);
    assert_eq!(store.count_unsynced().await.expect("n"), 1);
    let mut all = VersionVector::new();
    all.observe(me, e2.hlc);
    store.record_ack(p1, &all).await.expect("ack");
    // An older ack never lowers progress.
    store.record_ack(p1, &acked).await.expect("old ack");
    assert_eq!(store.peer_progress(p1).await.expect("p").get(me), e2.hlc);
    store.record_ack(p2, &all).await.expect("ack");
    assert_eq!(store.mark_synced(&[p1, p2]).await.expect("mark"), 1);
    assert_eq!(store.count_unsynced().await.expect("n"), 0);
    let synced = match db.memory_db() {
        Some(m) => m.count_synced().await.to_string(),
        None => db.sql("SELECT COUNT(*) FROM change_events WHERE synced_at IS NOT NULL"),
    };
    assert_eq!(synced, "2");
    // An ack recorded after the last pass is persisted when the store closes;
    // what was persisted survives a reopen.
    let p3 = Ulid::from_parts(1, 3);
    store.record_ack(p3, &acked).await.expect("ack p3");
    store.close().await;
    let store = open(&db, me).await;
    assert_eq!(store.peer_progress(p1).await.expect("p1").get(me), e2.hlc);
    assert_eq!(store.peer_progress(p2).await.expect("p2").get(me), e2.hlc);
    assert_eq!(store.peer_progress(p3).await.expect("p3").get(me), e1.hlc);
    assert_eq!(store.vector().await.expect("vv").get(me), e2.hlc);
    // Removed peers are forgotten, for good.
    assert_eq!(store.forget_peers(&[p1]).await.expect("forget"), 2);
    assert_eq!(store.forget_peers(&[p1]).await.expect("again"), 0);
    assert!(store.peer_progress(p2).await.expect("p2").0.is_empty());
    assert_eq!(store.peer_progress(p1).await.expect("p1").get(me), e2.hlc);
    store.close().await;
    let store = open(&db, me).await;
    assert!(store.peer_progress(p3).await.expect("p3").0.is_empty());
    assert_eq!(store.peer_progress(p1).await.expect("p1").get(me), e2.hlc);
    // A peer's own events count as acknowledged by it (it wrote them; no one
    // sends them back to it): an event of p1 waits only for the other peer.
    let from_p1 = remote_event(
        p1,
        hlc_at(-1_000, 0),
        id(3),
        Operation::Insert,
        Some(json!({"id": id(3).to_string(), "title": "p1's", "body": null, "stars": 0})),
    );
    store
        .apply_remote(std::slice::from_ref(&from_p1))
        .await
        .expect("apply");
    let p4 = Ulid::from_parts(1, 4);
    assert_eq!(store.mark_synced(&[p1, p4]).await.expect("mark"), 0);
    assert_eq!(
        store.peer_progress(p1).await.expect("p1").get(p1),
        from_p1.hlc
    );
    let mut theirs = VersionVector::new();
    theirs.observe(p1, from_p1.hlc);
    theirs.observe(me, e2.hlc);
    store.record_ack(p4, &theirs).await.expect("ack p4");
    assert_eq!(store.mark_synced(&[p1, p4]).await.expect("mark"), 1);
    assert_eq!(store.count_unsynced().await.expect("n"), 0);
    store.close().await;
}

/// How far a peer is behind: events it has not acknowledged, counted by the
/// origins' gap-free numbers (and in the log for events stamped before them),
/// with the wall time of the oldest.
async fn peer_lag_counts_what_the_peer_lacks(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let peer = Ulid::from_parts(1, 1);
    let mut mine = Vec::new();
    for n in 1..=5 {
        mine.push(
            store
                .put("notes", id(n), &obj(json!({"title": n.to_string()})))
                .await
                .expect("put"),
        );
    }
    assert_eq!(
        store.peer_lag(peer).await.expect("lag"),
        (5, Some(mine[0].wall_ms)),
        "nothing acknowledged"
    );
    let mut acked = VersionVector::new();
    acked.observe(me, mine[1].hlc);
    store.record_ack(peer, &acked).await.expect("ack");
    assert_eq!(
        store.peer_lag(peer).await.expect("lag"),
        (3, Some(mine[2].wall_ms)),
        "two acknowledged"
    );
    // Another origin's events, stamped without numbers: counted in the log.
    let other = Ulid::from_parts(1, 2);
    let theirs: Vec<ChangeEvent> = (0..2)
        .map(|n| {
            remote_event(
                other,
                hlc_at(-1_000 + n, 0),
                id(10 + n as u128),
                Operation::Insert,
                Some(json!({"title": "theirs", "body": null, "stars": 0})),
            )
        })
        .collect();
    assert_eq!(theirs[0].seq().expect("seq"), None);
    store.apply_remote(&theirs).await.expect("apply");
    assert_eq!(
        store.peer_lag(peer).await.expect("lag"),
        (5, Some(theirs[0].wall_ms)),
        "three of mine and two of theirs"
    );
    acked.observe(other, theirs[0].hlc);
    acked.observe(me, mine[4].hlc);
    store.record_ack(peer, &acked).await.expect("ack");
    assert_eq!(
        store.peer_lag(peer).await.expect("lag"),
        (1, Some(theirs[1].wall_ms))
    );
    acked.observe(other, theirs[1].hlc);
    store.record_ack(peer, &acked).await.expect("ack");
    assert_eq!(store.peer_lag(peer).await.expect("lag"), (0, None));
    store.close().await;
}

/// An event every waited-for peer is known to hold is stored already synced,
/// with no `synced_at` pass: the sending peer holds what it sent, an origin
/// holds its own events, and any other peer must have acknowledged it.
async fn received_events_every_peer_holds_arrive_synced(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let (p, q, r) = (
        Ulid::from_parts(1, 1),
        Ulid::from_parts(1, 2),
        Ulid::from_parts(1, 3),
    );
    let event = |origin: Ulid, offset_ms: i64, n: u128| {
        remote_event(
            origin,
            hlc_at(offset_ms, 0),
            id(n),
            Operation::Insert,
            Some(json!({"title": format!("note {n}")})),
        )
    };
    let apply = |e: &ChangeEvent, from: Ulid, waited: &[Ulid]| {
        let (store, e, waited) = (store.clone(), e.clone(), waited.to_vec());
        async move {
            let out = store
                .apply_from(
                    Some(from),
                    vec![store.check_event(e)],
                    Vec::new(),
                    &|_| true,
                    &waited,
                )
                .await
                .expect("apply");
            assert_eq!(out.applied, 1);
        }
    };
    // A pair: p sends its own event; p is the only peer waited for.
    let pair = event(p, -5_000, 1);
    apply(&pair, p, &[p]).await;
    assert_eq!(store.count_unsynced().await.expect("n"), 0, "held by p");
    // Relayed by p from r, with q waited for too: q has not acknowledged it.
    let relayed = event(r, -4_000, 2);
    apply(&relayed, p, &[p, q]).await;
    assert_eq!(store.count_unsynced().await.expect("n"), 1, "q lacks it");
    // The origin itself is waited for: it holds its own event.
    let own = event(r, -3_000, 3);
    apply(&own, p, &[p, r]).await;
    assert_eq!(
        store.count_unsynced().await.expect("n"),
        1,
        "held by p and r"
    );
    // Once q has acknowledged r's events this far, the next arrives synced.
    let mut q_has = VersionVector::new();
    q_has.observe(r, hlc_at(-1_000, 0));
    store.record_ack(q, &q_has).await.expect("ack");
    let later = event(r, -2_000, 4);
    apply(&later, p, &[p, q]).await;
    assert_eq!(store.count_unsynced().await.expect("n"), 1, "q acked it");
    // Nothing waited for (or no sending peer): stored unsynced, as before.
    let alone = event(r, -1_500, 5);
    apply(&alone, p, &[]).await;
    assert_eq!(store.count_unsynced().await.expect("n"), 2);
    // The pass marks the other two once p's and q's acks (the vectors their
    // sessions report) cover them.
    store.record_ack(p, &q_has).await.expect("ack");
    assert_eq!(store.mark_synced(&[p, q]).await.expect("mark"), 2);
    assert_eq!(store.count_unsynced().await.expect("n"), 0);
    store.close().await;
}

/// Triggers of the application on a replicated table fire on the daemon's
/// writes too; they are listed (Tidemark's own and the database's internal
/// ones are not), so the daemon can warn about each.
async fn application_triggers_are_listed(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    assert_eq!(
        store.application_triggers().await.expect("list"),
        Vec::<(String, String)>::new(),
        "only Tidemark's triggers so far"
    );
    match db.kind() {
        "postgres" => db.sql(
            "CREATE FUNCTION notes_touch() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN NEW.body := 'touched'; RETURN NEW; END $$; \
             CREATE TRIGGER update_notes_modified BEFORE UPDATE ON notes \
             FOR EACH ROW EXECUTE FUNCTION notes_touch()",
        ),
        _ => db.sql(
            "CREATE TRIGGER update_notes_modified AFTER UPDATE ON notes \
             BEGIN UPDATE notes SET body = 'touched' WHERE id = NEW.id; END",
        ),
    };
    assert_eq!(
        store.application_triggers().await.expect("list"),
        vec![("notes".to_owned(), "update_notes_modified".to_owned())]
    );
    store.close().await;
}

/// What a peer sent that could not be identified is kept as received, listed
/// oldest first, and discarded on demand.
async fn quarantined_events_list_and_discard(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    let peer = Ulid::generate();
    let rejected = |n: u32| tidemark_store::Rejected {
        event_id: format!("bad id {n}"),
        kind: tidemark_store::RejectKind::Invalid,
        reason: format!("event id is not a ULID ({n})"),
        event: json!({"event_id": format!("bad id {n}"), "n": n}),
    };
    store
        .apply_from(
            Some(peer),
            Vec::new(),
            vec![rejected(1), rejected(2)],
            &|_| true,
            &[],
        )
        .await
        .expect("apply");
    assert_eq!(store.count_quarantined().await.expect("count"), 2);
    let listed = store.list_quarantined(10).await.expect("list");
    let mut ids: Vec<&str> = listed.iter().map(|q| q.event_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["bad id 1", "bad id 2"]);
    let q = listed
        .iter()
        .find(|q| q.event_id == "bad id 1")
        .expect("listed");
    assert_eq!(
        (q.code.as_str(), q.reason.as_str()),
        ("INVALID_ARGUMENT", "event id is not a ULID (1)")
    );
    let event: Value = serde_json::from_str(&q.event).expect("event json");
    assert_eq!(event, json!({"event_id": "bad id 1", "n": 1}));
    assert!(q.received_at.ends_with('Z'), "{}", q.received_at);
    if db.kind() != "memory" {
        assert_eq!(q.peer_id, Some(peer.to_string()));
    }
    assert_eq!(store.list_quarantined(1).await.expect("list").len(), 1);
    assert_eq!(
        store
            .discard_quarantined(Some(&["bad id 2".to_owned(), "unknown".to_owned()]))
            .await
            .expect("discard"),
        1
    );
    assert_eq!(store.count_quarantined().await.expect("count"), 1);
    // Retention deletes what is older than its minimum age, and only that.
    let young = store
        .compact_step(&superseded_after(std::time::Duration::from_secs(3600)), 10)
        .await
        .expect("step");
    assert_eq!(young.quarantined, 0);
    assert_eq!(store.count_quarantined().await.expect("count"), 1);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let old = store
        .compact_step(&superseded_after(std::time::Duration::ZERO), 10)
        .await
        .expect("step");
    assert_eq!(old.quarantined, 1);
    assert_eq!(store.count_quarantined().await.expect("count"), 0);
    assert_eq!(store.discard_quarantined(None).await.expect("all"), 0);
    store.close().await;
}

async fn capture_around_the_triggers_is_reported(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    assert_eq!(
        store.check_capture().await.expect("check"),
        Vec::<String>::new()
    );
    match db.kind() {
        "postgres" => {
            // Sessions that skip ordinary triggers (replication tools, bulk
            // loaders) are captured all the same.
            db.sql(&format!(
                "SET session_replication_role = replica; INSERT INTO notes (id, title) VALUES ('{}', 'replica role')",
                id(1)
            ));
            assert_eq!(store.pending_captures().await.expect("pending"), 1);
            db.sql("ALTER TABLE notes DISABLE TRIGGER tidemark_capture_update");
            let problems = store.check_capture().await.expect("check");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].starts_with(
                    "table notes: capture trigger tidemark_capture_update is disabled"
                ) && problems[0].contains("ENABLE ALWAYS TRIGGER tidemark_capture_update"),
                "{problems:?}"
            );
        }
        _ => {
            db.sql("DROP TRIGGER tidemark_capture_notes_delete");
            let problems = store.check_capture().await.expect("check");
            assert_eq!(
                problems,
                vec!["table notes: capture trigger tidemark_capture_notes_delete is missing, so direct writes go uncaptured; restart the daemon to recreate it".to_owned()]
            );
        }
    }
    // Registering again (as every start does) restores them.
    store
        .register_table("notes", ConflictPolicy::Lww)
        .await
        .expect("register");
    assert_eq!(
        store.check_capture().await.expect("check"),
        Vec::<String>::new()
    );
    store.close().await;
}

async fn refused_rows_retry_on_demand(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    // The table starts refusing rows with more than 5 stars.
    match db.kind() {
        "postgres" => db.sql("ALTER TABLE notes ADD CONSTRAINT few_stars CHECK (stars <= 5)"),
        _ => db.sql(
            "CREATE TRIGGER few_stars BEFORE INSERT ON notes WHEN NEW.stars > 5 \
             BEGIN SELECT RAISE(ABORT, 'too many stars'); END",
        ),
    };
    let peer = Ulid::generate();
    let record = id(7);
    let event = remote_event(
        peer,
        hlc_at(0, 0),
        record,
        Operation::Insert,
        Some(json!({"title": "many", "stars": 9})),
    );
    // Counted before, so the count below must follow the commit that blocks.
    assert_eq!(store.count_blocked().await.expect("count"), 0);
    store
        .apply_remote(std::slice::from_ref(&event))
        .await
        .expect("apply");
    assert_eq!(store.count_blocked().await.expect("count"), 1);
    assert_eq!(store.get("notes", record).await.expect("get"), None);
    // Retrying changes nothing while the table still refuses.
    assert_eq!(store.retry_blocked(None).await.expect("retry"), (1, 0));
    assert_eq!(store.count_blocked().await.expect("count"), 1);
    // The operator lifts the constraint: the record is placed on demand.
    match db.kind() {
        "postgres" => db.sql("ALTER TABLE notes DROP CONSTRAINT few_stars"),
        _ => db.sql("DROP TRIGGER few_stars"),
    };
    let err = store
        .retry_blocked(Some("nope"))
        .await
        .expect_err("unknown table");
    assert!(matches!(err, StoreError::UnknownTable { .. }), "{err}");
    assert_eq!(
        store.retry_blocked(Some("notes")).await.expect("retry"),
        (1, 1)
    );
    assert_eq!(store.count_blocked().await.expect("count"), 0);
    assert_eq!(
        store.get("notes", record).await.expect("get"),
        event.new_values
    );
    assert_eq!(store.retry_blocked(None).await.expect("retry"), (0, 0));
    if db.kind() == "postgres" {
        // An application's trigger that raises refuses the row the same way.
        db.sql(
            "CREATE FUNCTION no_spam() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN IF NEW.title = 'spam' THEN RAISE EXCEPTION 'no spam'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER no_spam BEFORE INSERT OR UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION no_spam()",
        );
        let spam = remote_event(
            peer,
            hlc_at(0, 1),
            id(8),
            Operation::Insert,
            Some(json!({"title": "spam"})),
        );
        store.apply_remote(&[spam]).await.expect("apply");
        let blocked = store.list_blocked(None, 10).await.expect("list");
        assert_eq!(blocked.len(), 1);
        assert!(blocked[0].reason.contains("no spam"), "{:?}", blocked[0]);
    }
    store.close().await;
}

async fn one_daemon_per_database(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    // A second daemon on the same database is refused, naming who holds it,
    // whatever node id it claims.
    for node in [me, Ulid::generate()] {
        let err = db.open(clock(node)).await.expect_err("second daemon");
        assert!(matches!(err, StoreError::AlreadyRunning { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("another tidemark daemon already writes to"),
            "{msg}"
        );
        let who = match db.kind() {
            "sqlite" => format!("pid {}", std::process::id()),
            _ => "holds its advisory lock".to_owned(),
        };
        assert!(msg.contains(&who), "{msg}");
    }
    // The first keeps its lock and keeps working.
    store.check_lock().await.expect("still held");
    store
        .put("notes", id(1), &obj(json!({"title": "x"})))
        .await
        .expect("put");
    // Closing releases it: the daemon restarts.
    store.close().await;
    let store = open(&db, me).await;
    store.check_lock().await.expect("held again");
    store.close().await;
}

async fn identity_and_clock_survive_restart(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let mut last = Hlc::ZERO;
    for i in 0..20 {
        last = store
            .put("notes", id(i), &obj(json!({"title": "x"})))
            .await
            .expect("put")
            .hlc;
    }
    store.close().await;
    // Another node id on the same database is refused.
    let err = db
        .open(clock(Ulid::generate()))
        .await
        .expect_err("mismatch");
    assert!(
        matches!(err, StoreError::IdentityMismatch { key: "node_id", .. }),
        "{err}"
    );
    // The same node restarts with a fresh clock that continues above the log.
    let store = open(&db, me).await;
    assert!(store.clock().now() > last);
    let next = store
        .put("notes", id(99), &obj(json!({"title": "y"})))
        .await
        .expect("put");
    assert!(next.hlc > last);
    store.bind_cluster("alpha").await.expect("bind");
    store.bind_cluster("alpha").await.expect("same cluster");
    let err = store.bind_cluster("beta").await.expect_err("other cluster");
    assert!(
        err.to_string()
            .contains("cluster_id is alpha in the database but beta"),
        "{err}"
    );
    store.close().await;
}

async fn restart_with_persisted_hlc_far_ahead_is_refused(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    // An event applied while this node tolerated a large drift...
    let peer = Ulid::from_parts(1, 1);
    let ahead = hlc_at(4_000, 0);
    store
        .apply_remote(&[remote_event(
            peer,
            ahead,
            id(1),
            Operation::Insert,
            Some(json!({"id": id(1).to_string(), "title": "ahead"})),
        )])
        .await
        .expect("apply");
    store.close().await;
    // ...then a restart with a tighter bound: the clock cannot start below it.
    let tight = Arc::new(Clock::new(me, 100, WallClock::System).expect("clock"));
    let err = db.open(tight).await.expect_err("persisted ahead");
    assert!(
        err.to_string().contains("highest persisted timestamp"),
        "{err}"
    );
}

/// A remote event from `origin` that has seen `seen` (their vectors merged).
fn causal_event(
    origin: Ulid,
    hlc: Hlc,
    record: Ulid,
    title: &str,
    seen: &[&ChangeEvent],
) -> ChangeEvent {
    let mut vv = serde_json::Map::new();
    for e in seen {
        if let Some(v) = e
            .metadata
            .as_ref()
            .and_then(|m| m.get("vv"))
            .and_then(Value::as_object)
        {
            for (k, h) in v {
                let cur = vv.get(k).and_then(Value::as_i64).unwrap_or(0);
                vv.insert(k.clone(), json!(cur.max(h.as_i64().unwrap_or(0))));
            }
        }
    }
    vv.insert(origin.to_string(), json!(hlc.encode()));
    let mut e = remote_event(
        origin,
        hlc,
        record,
        Operation::Update,
        Some(json!({"id": record.to_string(), "title": title, "body": null, "stars": 0})),
    );
    e.metadata = Some(json!({ "vv": vv }));
    e
}

async fn manual_conflicts_open_and_resolve(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    store
        .set_policy("notes", ConflictPolicy::Manual)
        .await
        .expect("manual");
    let (p1, p2) = (Ulid::from_parts(1, 1), Ulid::from_parts(1, 2));
    let r = id(1);
    let base = causal_event(p1, hlc_at(-5_000, 0), r, "base", &[]);
    let left = causal_event(p1, hlc_at(-4_000, 0), r, "left", &[&base]);
    let right = causal_event(p2, hlc_at(-3_000, 0), r, "right", &[&base]);
    let out = store
        .apply_remote(&[base.clone(), left.clone()])
        .await
        .expect("base+left");
    assert_eq!(out.conflicts, 0, "a causal successor is no conflict");
    let out = store
        .apply_remote(std::slice::from_ref(&right))
        .await
        .expect("right");
    assert_eq!(out.conflicts, 1);
    // The later version shows; the earlier one is kept in an open conflict whose
    // id is the losing event's id.
    assert_eq!(
        store.get("notes", r).await.expect("get").expect("row")["title"],
        json!("right")
    );
    let open = store
        .list_conflicts(&ConflictFilter {
            status: Some(ConflictStatus::Open),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(open.len(), 1);
    let c = &open[0];
    assert_eq!(c.conflict_id, left.event_id);
    assert_eq!(
        (c.winner.event_id, c.loser.event_id),
        (right.event_id, left.event_id)
    );
    assert_eq!((c.winner.node_id, c.loser.node_id), (p2, p1));
    assert_eq!(
        c.loser.values.as_ref().expect("values")["title"],
        json!("left")
    );
    assert_eq!(
        c.winner.values.as_ref().expect("values")["title"],
        json!("right")
    );
    assert_eq!(c.policy, ConflictPolicy::Manual);

    // Bad resolutions change nothing.
    let err = store
        .resolve_conflict(
            Ulid::generate(),
            ResolveChoice::KeepLocal,
            "alice",
            None,
            None,
        )
        .await
        .expect_err("unknown");
    assert!(err.to_string().starts_with("no conflict"), "{err}");
    let err = store
        .resolve_conflict(
            c.conflict_id,
            ResolveChoice::Merged(raw_obj(json!({"colour": "red"}))),
            "alice",
            None,
            None,
        )
        .await
        .expect_err("unknown column");
    assert!(
        err.to_string().contains("no replicated column \"colour\""),
        "{err}"
    );
    assert_eq!(
        store
            .conflict(c.conflict_id)
            .await
            .expect("c")
            .expect("c")
            .status,
        ConflictStatus::Open
    );

    // Keep the losing version.
    let resolution = store
        .resolve_conflict(
            c.conflict_id,
            ResolveChoice::KeepRemote,
            "alice",
            Some("left was right"),
            None,
        )
        .await
        .expect("resolve");
    assert_eq!(resolution.action.as_deref(), Some("resolve"));
    assert_eq!(
        store.get("notes", r).await.expect("get").expect("row")["title"],
        json!("left")
    );
    let closed = store.conflict(c.conflict_id).await.expect("c").expect("c");
    assert_eq!(closed.status, ConflictStatus::Resolved);
    assert_eq!(closed.resolution.as_deref(), Some("keep_remote"));
    assert_eq!(closed.resolved_by.as_deref(), Some("alice"));
    assert_eq!(closed.resolution_note.as_deref(), Some("left was right"));
    assert_eq!(closed.resolution_event_id, Some(resolution.event_id));
    assert_eq!(
        store
            .version("notes", r)
            .await
            .expect("v")
            .expect("v")
            .frontier
            .len(),
        1
    );
    let err = store
        .resolve_conflict(c.conflict_id, ResolveChoice::KeepLocal, "bob", None, None)
        .await
        .expect_err("already resolved");
    assert!(
        err.to_string()
            .contains("is already resolved (keep_remote by alice"),
        "{err}"
    );

    // Another node with the same conflict closes it when the resolution arrives.
    let other = db.another();
    let s2 = with_notes(&other, Ulid::generate()).await;
    s2.set_policy("notes", ConflictPolicy::Manual)
        .await
        .expect("manual");
    s2.apply_remote(std::slice::from_ref(&right))
        .await
        .expect("right first");
    s2.apply_remote(&[base.clone(), left.clone()])
        .await
        .expect("then base+left");
    let c2 = s2
        .conflict(left.event_id)
        .await
        .expect("c2")
        .expect("same conflict id");
    assert_eq!(c2.status, ConflictStatus::Open);
    s2.apply_remote(std::slice::from_ref(&resolution))
        .await
        .expect("resolution");
    let c2 = s2.conflict(left.event_id).await.expect("c2").expect("c2");
    assert_eq!(c2.status, ConflictStatus::Resolved);
    assert_eq!(c2.resolution.as_deref(), Some("keep_remote"));
    assert_eq!(c2.resolved_by.as_deref(), Some("alice"));
    assert_eq!(
        s2.get("notes", r).await.expect("get"),
        store.get("notes", r).await.expect("get")
    );
    s2.close().await;
    store.close().await;
}

/// Conflicts are read off the record's history, not the order its versions
/// arrived in: every order of the same four versions gives the same conflicts,
/// decided ones included, with the same times (HLC times, not local ones).
/// `a` and `b` are concurrent, `c` has seen both (a plain write: it supersedes
/// them), `e` has seen nothing and is the greatest.
/// The conflicts of `notes` a store lists (any status).
async fn conflicts_of(store: &Store) -> Vec<tidemark_store::Conflict> {
    store
        .list_conflicts(&ConflictFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list")
}

/// Delivers four events in each of their 24 orders to a fresh store whose
/// `notes` are `manual` (half the orders one event per call, half as one
/// batch); returns each order with the conflicts the store ends with.
async fn conflicts_in_every_order(
    db: &TestDb,
    events: &[ChangeEvent; 4],
) -> Vec<(Vec<usize>, Vec<tidemark_store::Conflict>)> {
    let mut orders: Vec<Vec<usize>> = Vec::new();
    for i in 0..4 {
        for j in (0..4).filter(|j| *j != i) {
            for k in (0..4).filter(|k| *k != i && *k != j) {
                orders.push(vec![i, j, k, 6 - i - j - k]);
            }
        }
    }
    let mut out = Vec::new();
    for (n, order) in orders.into_iter().enumerate() {
        let fresh = db.another();
        let store = with_notes(&fresh, Ulid::generate()).await;
        store
            .set_policy("notes", ConflictPolicy::Manual)
            .await
            .expect("manual");
        let delivered: Vec<ChangeEvent> = order.iter().map(|i| events[*i].clone()).collect();
        if n % 2 == 0 {
            for ev in &delivered {
                store
                    .apply_remote(std::slice::from_ref(ev))
                    .await
                    .expect("apply");
            }
        } else {
            store.apply_remote(&delivered).await.expect("apply");
        }
        out.push((order, conflicts_of(&store).await));
        store.close().await;
    }
    out
}

async fn conflict_history_is_the_same_in_any_order(db: TestDb) {
    let (p1, p2, p3, p4) = (
        Ulid::from_parts(1, 1),
        Ulid::from_parts(1, 2),
        Ulid::from_parts(1, 3),
        Ulid::from_parts(1, 4),
    );
    let r = id(4);
    let a = causal_event(p1, hlc_at(-4_000, 0), r, "a", &[]);
    let b = causal_event(p2, hlc_at(-3_000, 0), r, "b", &[]);
    let c = causal_event(p3, hlc_at(-2_000, 0), r, "c", &[&a, &b]);
    let e = causal_event(p4, hlc_at(-1_000, 0), r, "e", &[]);
    let events = [a.clone(), b.clone(), c.clone(), e.clone()];
    let time = |ev: &ChangeEvent| tidemark_store::model::hlc_time(ev.hlc);
    let mut first: Option<Vec<tidemark_store::Conflict>> = None;
    for (order, got) in conflicts_in_every_order(&db, &events).await {
        let ctx = format!("{} delivered in order {order:?}", db.kind());
        match &first {
            Some(expected) => assert_eq!(&got, expected, "{ctx}"),
            None => {
                let summary: Vec<_> = got
                    .iter()
                    .map(|x| {
                        (
                            x.conflict_id,
                            x.status,
                            x.winner.event_id,
                            x.detected_at.clone(),
                            x.resolved_at.clone(),
                            x.resolution.clone(),
                            x.resolution_event_id,
                        )
                    })
                    .collect();
                let mut want = vec![
                    // a lost to b when b was written; c, which had seen it,
                    // ended it; e is the greatest version concurrent with it.
                    (
                        a.event_id,
                        ConflictStatus::Resolved,
                        e.event_id,
                        time(&b),
                        Some(time(&c)),
                        Some("superseded".to_owned()),
                        Some(c.event_id),
                    ),
                    (
                        b.event_id,
                        ConflictStatus::Resolved,
                        e.event_id,
                        time(&e),
                        Some(time(&c)),
                        Some("superseded".to_owned()),
                        Some(c.event_id),
                    ),
                    // c and e are both current: open.
                    (
                        c.event_id,
                        ConflictStatus::Open,
                        e.event_id,
                        time(&e),
                        None,
                        None,
                        None,
                    ),
                ];
                want.sort_by_key(|w| w.0);
                assert_eq!(summary, want, "{ctx}");
                first = Some(got);
            }
        }
    }
}

/// Concurrent versions that hold the same row are no conflict, whatever order
/// they arrive in: of a, b and f (the same title) and e (another), only e
/// lost anything (to f, the greatest). A conflict recorded while b was the
/// greatest different version goes when f, equal to its loser, arrives.
async fn identical_concurrent_versions_are_no_conflict(db: TestDb) {
    let (p1, p2, p3, p4) = (
        Ulid::from_parts(1, 1),
        Ulid::from_parts(1, 2),
        Ulid::from_parts(1, 3),
        Ulid::from_parts(1, 4),
    );
    let r = id(5);
    let a = causal_event(p1, hlc_at(-4_000, 0), r, "same", &[]);
    let e = causal_event(p2, hlc_at(-3_000, 0), r, "other", &[]);
    let b = causal_event(p3, hlc_at(-2_000, 0), r, "same", &[]);
    let f = causal_event(p4, hlc_at(-1_000, 0), r, "same", &[]);
    let events = [a.clone(), e.clone(), b.clone(), f.clone()];
    for (order, got) in conflicts_in_every_order(&db, &events).await {
        let summary: Vec<_> = got
            .iter()
            .map(|c| (c.conflict_id, c.status, c.winner.event_id))
            .collect();
        assert_eq!(
            summary,
            vec![(e.event_id, ConflictStatus::Open, f.event_id)],
            "{} delivered in order {order:?}",
            db.kind()
        );
    }
    // Two versions alike, alone: nothing to show.
    let fresh = db.another();
    let store = with_notes(&fresh, Ulid::generate()).await;
    store
        .apply_remote(&[a.clone(), b.clone()])
        .await
        .expect("apply");
    assert!(conflicts_of(&store).await.is_empty(), "{}", db.kind());
    store.close().await;
}

async fn out_of_order_causal_chain_opens_no_conflict(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    store
        .set_policy("notes", ConflictPolicy::Manual)
        .await
        .expect("manual");
    let (p1, p2, p3) = (
        Ulid::from_parts(1, 1),
        Ulid::from_parts(1, 2),
        Ulid::from_parts(1, 3),
    );
    let r = id(2);
    let a = causal_event(p1, hlc_at(-3_000, 0), r, "a", &[]);
    let b = causal_event(p2, hlc_at(-2_000, 0), r, "b", &[&a]);
    let c = causal_event(p3, hlc_at(-1_000, 0), r, "c", &[&b]);
    for e in [&c, &a, &b] {
        let out = store
            .apply_remote(std::slice::from_ref(e))
            .await
            .expect("apply");
        assert_eq!(out.conflicts, 0);
    }
    assert_eq!(
        store.get("notes", r).await.expect("get").expect("row")["title"],
        json!("c")
    );
    let all = store
        .list_conflicts(&ConflictFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(all.is_empty(), "{all:?}");
    store.close().await;
}

async fn policy_switch_moves_conflicts(db: TestDb) {
    let store = with_notes(&db, Ulid::generate()).await;
    let (p1, p2) = (Ulid::from_parts(1, 1), Ulid::from_parts(1, 2));
    let r = id(3);
    let x = causal_event(p1, hlc_at(-2_000, 0), r, "x", &[]);
    let y = causal_event(p2, hlc_at(-1_000, 0), r, "y", &[]);
    store
        .apply_remote(&[x.clone(), y.clone()])
        .await
        .expect("apply");
    // Under lww the conflict is recorded, decided.
    let c = store
        .conflict(x.event_id)
        .await
        .expect("c")
        .expect("recorded under lww");
    assert_eq!(
        (c.status, c.resolution.as_deref()),
        (ConflictStatus::Resolved, Some("lww"))
    );
    // Switching to manual reopens it (both versions are still concurrent)...
    store
        .set_policy("notes", ConflictPolicy::Manual)
        .await
        .expect("manual");
    let c = store.conflict(x.event_id).await.expect("c").expect("c");
    assert_eq!(c.status, ConflictStatus::Open);
    // ...and back to lww decides it again.
    store
        .set_policy("notes", ConflictPolicy::Lww)
        .await
        .expect("lww");
    let c = store.conflict(x.event_id).await.expect("c").expect("c");
    assert_eq!(
        (c.status, c.resolution.as_deref()),
        (ConflictStatus::Resolved, Some("lww"))
    );
    // A local write that has seen both supersedes; then manual reopens nothing.
    store
        .put("notes", r, &obj(json!({"title": "z"})))
        .await
        .expect("put");
    store
        .set_policy("notes", ConflictPolicy::Manual)
        .await
        .expect("manual");
    let c = store.conflict(x.event_id).await.expect("c").expect("c");
    assert_eq!(c.status, ConflictStatus::Resolved);
    // The policy event replicates: another store applying it switches too.
    let other = db.another();
    let s2 = with_notes(&other, Ulid::generate()).await;
    let policy_events: Vec<ChangeEvent> = all_events(&store)
        .await
        .into_iter()
        .filter(|e| e.table_name == "tidemark_datatypes")
        .collect();
    assert_eq!(policy_events.len(), 3);
    s2.apply_remote(&policy_events)
        .await
        .expect("policy events");
    assert_eq!(
        s2.table("notes").expect("t").conflict_policy,
        ConflictPolicy::Manual
    );
    s2.close().await;
    store.close().await;
}

async fn one_batch_with_policy_and_concurrent_versions(db: TestDb) {
    // A policy change and two concurrent versions arrive in the same batch: the
    // conflict follows the new policy and keeps both versions' values.
    let other = db.another();
    let source = with_notes(&other, Ulid::generate()).await;
    let policy = source
        .set_policy("notes", ConflictPolicy::Manual)
        .await
        .expect("manual");
    let store = with_notes(&db, Ulid::generate()).await;
    let (p1, p2) = (Ulid::from_parts(1, 1), Ulid::from_parts(1, 2));
    let r = id(11);
    let x = causal_event(p1, hlc_at(-2_000, 0), r, "x", &[]);
    let y = causal_event(p2, hlc_at(-1_000, 0), r, "y", &[]);
    let out = store
        .apply_remote(&[policy, x.clone(), y.clone()])
        .await
        .expect("batch");
    assert_eq!(out.conflicts, 1);
    let c = store
        .conflict(x.event_id)
        .await
        .expect("c")
        .expect("conflict");
    assert_eq!(
        c.status,
        ConflictStatus::Open,
        "the policy of the same batch applies"
    );
    assert_eq!(
        c.loser.values.as_ref().expect("loser values")["title"],
        json!("x")
    );
    assert_eq!(
        c.winner.values.as_ref().expect("winner values")["title"],
        json!("y")
    );
    // Keeping the loser restores its values (not a delete).
    store
        .resolve_conflict(
            c.conflict_id,
            ResolveChoice::KeepRemote,
            "alice",
            None,
            None,
        )
        .await
        .expect("resolve");
    assert_eq!(
        store.get("notes", r).await.expect("get").expect("row")["title"],
        json!("x")
    );
    source.close().await;
    store.close().await;
}

/// Concurrent API writes share transactions (group commit) without changing what
/// each caller sees: a write the table refuses fails alone, the others commit, and
/// the log holds exactly the accepted writes in strictly increasing HLC order.
async fn concurrent_api_writes_commit_in_groups(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let shared = id(900);
    // Two rounds: only valid writes first (groups that commit whole), then
    // valid and refused writes mixed (groups that fall back to one by one).
    let mut accepted = Vec::new();
    for round in [0..30u128, 30..60] {
        let mut tasks = tokio::task::JoinSet::new();
        let valid_only = round.start == 0;
        for i in round {
            let store = store.clone();
            tasks.spawn(async move {
                let (record, values) = match i % 3 {
                    // Inserts of new records.
                    0 => (
                        id(1000 + i),
                        json!({"title": format!("note {i}"), "stars": i as i64}),
                    ),
                    // Updates racing on one record.
                    1 => (shared, json!({"title": "shared", "stars": i as i64})),
                    // Inserts without the NOT NULL title: refused by the table.
                    _ if valid_only => (id(3000 + i), json!({"title": "valid"})),
                    _ => (id(2000 + i), json!({"body": "no title"})),
                };
                let values: Values = serde_json::from_value(values).expect("values");
                (i, record, store.put("notes", record, &values).await)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (i, record, result) = joined.expect("task");
            match (if i < 30 { 0 } else { i % 3 }, result) {
                (2, Err(e)) => assert!(
                    matches!(e, StoreError::Db(_) | StoreError::Constraint { .. }),
                    "write {i}: {e}"
                ),
                (2, Ok(e)) => panic!("write {i} without a title was accepted: {e:?}"),
                (_, Ok(event)) => {
                    assert_eq!(event.record_id, record);
                    accepted.push(event);
                }
                (_, Err(e)) => panic!("write {i} failed: {e}"),
            }
        }
    }
    assert_eq!(accepted.len(), 50);
    let log = all_events(&store).await;
    let mine: Vec<&ChangeEvent> = log
        .iter()
        .filter(|e| e.node_id == me && e.table_name == "notes")
        .collect();
    assert_eq!(mine.len(), 50, "exactly the accepted writes are logged");
    assert!(
        mine.windows(2).all(|w| w[0].hlc < w[1].hlc),
        "strictly increasing HLCs"
    );
    let mut logged: Vec<Ulid> = mine.iter().map(|e| e.event_id).collect();
    let mut returned: Vec<Ulid> = accepted.iter().map(|e| e.event_id).collect();
    logged.sort();
    returned.sort();
    assert_eq!(logged, returned, "every returned event is the logged one");
    // The shared record holds the values of its last write by HLC.
    let last = mine
        .iter()
        .filter(|e| e.record_id == shared)
        .max_by_key(|e| e.hlc)
        .expect("shared writes");
    let row = store.get("notes", shared).await.expect("get").expect("row");
    assert_eq!(
        row.get("stars"),
        last.new_values.as_ref().and_then(|v| v.get("stars"))
    );
    for refused in (30..60u128).filter(|i| i % 3 == 2) {
        assert!(
            store
                .get("notes", id(2000 + refused))
                .await
                .expect("get")
                .is_none()
        );
    }
    store.close().await;
}

/// API writes in groups beside received batches applied at the same time:
/// every received event and exactly the accepted writes are logged, a write
/// the table refuses fails alone (the batches and the other writes commit),
/// and the node's own numbers stay gap-free with its vector at its last write.
async fn api_writes_beside_received_batches(db: TestDb) {
    let me = Ulid::generate();
    let origin = Ulid::generate();
    let store = with_notes(&db, me).await;
    let start = hlc_at(-60_000, 0).wall_ms();
    let applier = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for b in 0..40u128 {
                let batch: Vec<ChangeEvent> = (0..5u128)
                    .map(|k| {
                        let n = b * 5 + k;
                        let hlc = Hlc::from_parts(start + n as i64, 0).expect("hlc");
                        remote_event(
                            origin,
                            hlc,
                            id(5000 + n),
                            Operation::Insert,
                            Some(json!({"title": format!("remote {n}")})),
                        )
                    })
                    .collect();
                sent.extend(batch.iter().map(|e| e.event_id));
                store.apply_remote(&batch).await.expect("apply");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            sent
        })
    };
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..90u128 {
        // In waves beside the batches: valid writes only at first (groups
        // that commit whole), then every third refused (groups that fall
        // back to one transaction each).
        if i % 10 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let store = store.clone();
        writes.spawn(async move {
            // Every third later write lacks the NOT NULL title: refused by the table.
            let (record, values) = if i >= 45 && i % 3 == 2 {
                (id(2000 + i), json!({"body": "no title"}))
            } else {
                (id(1000 + i), json!({"title": format!("note {i}")}))
            };
            let values: Values = serde_json::from_value(values).expect("values");
            let result = store.put("notes", record, &values).await;
            tokio::task::yield_now().await;
            (i, record, result)
        });
    }
    let mut accepted = Vec::new();
    while let Some(joined) = writes.join_next().await {
        let (i, record, result) = joined.expect("write task");
        let refused = i >= 45 && i % 3 == 2;
        match result {
            Ok(event) if !refused => {
                assert_eq!(event.record_id, record);
                accepted.push(event.event_id);
            }
            Ok(event) => panic!("write {i} without a title was accepted: {event:?}"),
            Err(e) if refused => assert!(
                matches!(e, StoreError::Db(_) | StoreError::Constraint { .. }),
                "write {i}: {e}"
            ),
            Err(e) => panic!("write {i} failed: {e}"),
        }
    }
    let sent = applier.await.expect("applier");
    assert_eq!(accepted.len(), 75);
    let log = all_events(&store).await;
    let received: Vec<Ulid> = log
        .iter()
        .filter(|e| e.node_id == origin)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(
        sorted(received),
        sorted(sent),
        "every received event is logged"
    );
    let mut own: Vec<&ChangeEvent> = log.iter().filter(|e| e.node_id == me).collect();
    own.sort_by_key(|e| e.hlc);
    assert_eq!(
        sorted(own.iter().map(|e| e.event_id).collect()),
        sorted(accepted),
        "exactly the accepted writes are logged"
    );
    let numbers: Vec<u64> = own
        .iter()
        .map(|e| e.seq().expect("seq").expect("numbered"))
        .collect();
    assert_eq!(
        numbers,
        (1..=75).collect::<Vec<u64>>(),
        "own numbers without gaps"
    );
    assert_eq!(store.positions()[&me].seq, 75);
    assert_eq!(
        store.vector().await.expect("vector").get(me),
        own.last().expect("own events").hlc
    );
    for n in 0..200u128 {
        assert!(
            store
                .get("notes", id(5000 + n))
                .await
                .expect("get")
                .is_some()
        );
    }
    for i in (45..90u128).filter(|i| i % 3 == 2) {
        assert!(
            store
                .get("notes", id(2000 + i))
                .await
                .expect("get")
                .is_none()
        );
    }
    store.close().await;
}

/// Every event a node stamps carries its number in the node's own sequence:
/// 1, 2, 3... in HLC order, with no gap, whether writes commit alone or in a
/// group. A write that fails after it was numbered gives its number back, and
/// numbering goes on after a restart. The node's position on its own origin
/// is the last number.
async fn own_events_are_numbered_without_gaps(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    put_title(&store, id(1), "one").await;
    let mut group = tokio::task::JoinSet::new();
    for n in 10..20u128 {
        let store = store.clone();
        group.spawn(async move { put_title(&store, id(n), "grouped").await });
    }
    while let Some(done) = group.join_next().await {
        done.expect("put task");
    }
    // NOT NULL refuses it after the event was numbered: rolled back.
    let err = store
        .put("notes", id(50), &obj(json!({"title": null})))
        .await
        .expect_err("NOT NULL title");
    assert!(
        err.constraint_message().is_some() || matches!(err, StoreError::Constraint { .. }),
        "{err}"
    );
    put_title(&store, id(2), "two").await;
    store.delete("notes", id(1)).await.expect("delete");
    let own_numbers = |events: Vec<ChangeEvent>| -> Vec<u64> {
        let mut own: Vec<ChangeEvent> = events.into_iter().filter(|e| e.node_id == me).collect();
        own.sort_by_key(|e| e.hlc);
        own.iter()
            .map(|e| e.seq().expect("seq").expect("numbered"))
            .collect()
    };
    let numbers = own_numbers(all_events(&store).await);
    let n = numbers.len() as u64;
    assert!(n >= 13, "{numbers:?}");
    assert_eq!(numbers, (1..=n).collect::<Vec<_>>());
    let position = store.positions()[&me];
    assert_eq!(position.seq, n);
    assert_eq!(position.hlc, store.vector().await.expect("vector").get(me));
    store.close().await;

    let store = open(&db, me).await;
    assert_eq!(
        store.positions()[&me].seq,
        n,
        "the position survives a restart"
    );
    let next = put_title(&store, id(3), "three").await;
    assert_eq!(next.seq().expect("seq"), Some(n + 1));
    assert_eq!(store.positions()[&me].seq, n + 1);
    store.close().await;
}

/// Received numbered events raise their origin's position (the highest HLC
/// and the number of the last event held), which survives a restart; an
/// unnumbered event (stamped before origins numbered their events) raises the
/// HLC only, and a malformed number holds its origin. (A session refuses a
/// number that skips past the position before the store sees it: see the
/// protocol tests.)
async fn received_numbers_raise_positions(db: TestDb) {
    let me = Ulid::generate();
    let store = with_notes(&db, me).await;
    let origin = Ulid::from_parts(1, 7);
    let event = |n: u128, seq: Value| {
        let mut e = remote_event(
            origin,
            hlc_at(-10_000 + n as i64, 0),
            id(n),
            Operation::Insert,
            Some(json!({"title": format!("note {n}")})),
        );
        if !seq.is_null() {
            e.metadata.as_mut().expect("metadata")["seq"] = seq;
        }
        e
    };
    let old = event(1, Value::Null);
    let out = store
        .apply_remote(std::slice::from_ref(&old))
        .await
        .expect("apply");
    assert_eq!(out.applied, 1);
    let position = store.positions()[&origin];
    assert_eq!(
        (position.seq, position.hlc),
        (0, old.hlc),
        "unnumbered: HLC only"
    );
    let (e1, e2) = (event(2, json!(1)), event(3, json!(2)));
    let out = store
        .apply_remote(&[e1.clone(), e2.clone()])
        .await
        .expect("apply");
    assert_eq!(out.applied, 2);
    let position = store.positions()[&origin];
    assert_eq!((position.seq, position.hlc), (2, e2.hlc));
    // Applied again: nothing moves.
    let out = store
        .apply_remote(std::slice::from_ref(&e1))
        .await
        .expect("apply");
    assert_eq!((out.applied, out.duplicates), (0, 1));
    assert_eq!(store.positions()[&origin].seq, 2);

    let bad = event(4, json!("three"));
    let out = store
        .apply_remote(std::slice::from_ref(&bad))
        .await
        .expect("apply");
    assert_eq!(out.applied, 0);
    assert_eq!(out.held.len(), 1);
    assert_eq!(out.held[0].kind, tidemark_store::RejectKind::Invalid);
    assert!(
        out.held[0].reason.contains("metadata.seq"),
        "{}",
        out.held[0].reason
    );
    assert_eq!(store.positions()[&origin].seq, 2);
    store.close().await;
    let store = open(&db, me).await;
    let position = store.positions()[&origin];
    assert_eq!((position.seq, position.hlc), (2, e2.hlc), "after a restart");
    // The numbers held tell a new event from one in the log without a
    // lookup: after the restart, numbered events already held and the
    // unnumbered one are still found in the log, resent in order with a new
    // one (twice).
    let before = all_events(&store).await.len();
    let e3 = event(5, json!(3));
    let out = store
        .apply_remote(&[old.clone(), e1.clone(), e2.clone(), e3.clone(), e3.clone()])
        .await
        .expect("apply after restart");
    assert_eq!((out.applied, out.duplicates), (1, 4));
    assert_eq!(all_events(&store).await.len(), before + 1);
    assert_eq!(store.positions()[&origin].seq, 3);
    let rows = notes_rows(&db).await;
    let again = store.apply_remote(&[e2, e3]).await.expect("all held");
    assert_eq!((again.applied, again.duplicates), (0, 2));
    assert_eq!(all_events(&store).await.len(), before + 1);
    assert_eq!(notes_rows(&db).await, rows);
    store.close().await;
}

/// `snapshot::strip` makes a copy of a node's database a start for a new
/// node: the donor's acks, unsynced marks and unstamped captures go, its log,
/// rows and positions stay, and only a node with another id may open it.
async fn a_stripped_database_opens_only_as_a_new_node(db: TestDb) {
    let donor = Ulid::generate();
    let store = with_notes(&db, donor).await;
    store.bind_cluster("c1").await.expect("bind");
    for i in 1..=3 {
        store
            .put("notes", id(i), &obj(json!({"title": format!("n{i}")})))
            .await
            .expect("put");
    }
    let peer = Ulid::from_parts(1, 1);
    store
        .record_ack(peer, &store.vector().await.expect("vv"))
        .await
        .expect("ack");
    assert_eq!(store.mark_synced(&[peer]).await.expect("mark"), 3);
    // A direct write the donor has not stamped yet.
    db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{}', 'late')",
        id(4)
    ));
    assert_eq!(store.pending_captures().await.expect("pending"), 1);
    let (vector, positions) = (store.vector().await.expect("vv"), store.positions());
    store.close().await;

    let url: StoreUrl = db.url().parse().expect("url");
    let info = snapshot::strip(&url).await.expect("strip");
    assert_eq!(info.donor, donor);
    assert_eq!(info.cluster_id.as_deref(), Some("c1"));
    // Again: already a snapshot, the same answer.
    assert_eq!(snapshot::strip(&url).await.expect("strip again"), info);

    match db.open(clock(donor)).await {
        Err(StoreError::SnapshotOfThisNode { donor: d }) => assert_eq!(d, donor.to_string()),
        Err(e) => panic!("opened as the donor: {e}"),
        Ok(_) => panic!("opened as the donor"),
    }
    let new = Ulid::generate();
    let store = open(&db, new).await;
    store.bind_cluster("c1").await.expect("same cluster");
    assert_eq!(store.node_id(), new);
    assert_eq!(store.vector().await.expect("vv"), vector);
    assert_eq!(store.positions(), positions);
    assert_eq!(store.count_unsynced().await.expect("unsynced"), 3);
    assert_eq!(store.pending_captures().await.expect("pending"), 0);
    assert!(
        store
            .peer_progress(peer)
            .await
            .expect("progress")
            .0
            .is_empty()
    );
    assert_eq!(all_events(&store).await.len(), 3);
    store.close().await;
    // Bound to the new node now: stripping it again names the new one.
    assert_eq!(snapshot::strip(&url).await.expect("strip").donor, new);
}

// ---------------------------------------------------------------------------------

macro_rules! tests_on {
    ($db:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($db).await;
            }
        )*
    };
}

macro_rules! suite {
    (every: [$($name:ident),* $(,)?], sql_only: [$($sql:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            tests_on!(tidemark_tests::TestDb::sqlite(); $($name),*, $($sql),*);
        }
        mod postgres {
            tests_on!(tidemark_tests::TestDb::postgres(); $($name),*, $($sql),*);
        }
        mod memory {
            tests_on!(tidemark_tests::TestDb::memory(); $($name),*);
        }
    };
}

suite!(
    every: [
        own_writes_are_not_captured,
        api_input_is_checked,
        registration_checks_the_key,
        remote_apply_is_idempotent_and_lww,
        received_events_are_logged_as_their_origin_logged_them,
        received_typed_events_are_logged_as_their_origin_logged_them,
        remote_batches_of_any_size_write_every_row,
        concurrent_versions_converge_in_any_order,
        bad_remote_events_hold_their_origin,
        events_after_a_vector,
        synced_when_every_peer_acked,
        peer_lag_counts_what_the_peer_lacks,
        received_events_every_peer_holds_arrive_synced,
        compaction_keeps_every_current_version,
        compaction_keeps_concurrent_versions_and_blocked_events,
        compaction_collects_tombstones,
        identity_and_clock_survive_restart,
        restart_with_persisted_hlc_far_ahead_is_refused,
        manual_conflicts_open_and_resolve,
        out_of_order_causal_chain_opens_no_conflict,
        conflict_history_is_the_same_in_any_order,
        identical_concurrent_versions_are_no_conflict,
        policy_switch_moves_conflicts,
        one_batch_with_policy_and_concurrent_versions,
        concurrent_api_writes_commit_in_groups,
        api_writes_beside_received_batches,
        quarantined_events_list_and_discard,
        own_events_are_numbered_without_gaps,
        received_numbers_raise_positions,
    ],
    // These need direct SQL, which the memory backend does not have: SQL
    // migrations checked through the SQL client, capture triggers fed by direct
    // writes, and rows inserted and columns added behind the daemon's back.
    sql_only: [
        migrations_up_down_up,
        direct_writes_are_captured_exactly_once,
        multi_row_statements_are_captured_row_by_row,
        key_change_is_delete_plus_insert,
        non_ulid_keys_are_refused_by_the_trigger,
        registration_snapshots_existing_rows,
        identical_rows_registered_on_two_nodes_are_no_conflicts,
        one_daemon_per_database,
        capture_around_the_triggers_is_reported,
        application_triggers_are_listed,
        refused_rows_retry_on_demand,
        a_stripped_database_opens_only_as_a_new_node,
    ],
);

#[tokio::test]
async fn sqlite_missing_directory_is_named() {
    let url: StoreUrl = "sqlite:///nonexistent-dir-xyz/node.db"
        .parse()
        .expect("url");
    let err = Store::open(&url, clock(Ulid::generate()))
        .await
        .expect_err("missing dir");
    assert_eq!(
        err.to_string(),
        "SQLite database directory /nonexistent-dir-xyz does not exist (database file /nonexistent-dir-xyz/node.db)"
    );
}

/// SQLite's WAL is checkpointed by a thread of its own shortly after commits,
/// not by the commit that crosses `wal_autocheckpoint`: a few hundred pages of
/// writes (below SQLite's default threshold of 1,000) reach the database file
/// with no further commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_checkpoints_the_wal_in_the_background() {
    let db = TestDb::sqlite();
    let TestDb::Sqlite { path, .. } = &db else {
        unreachable!("a SQLite database")
    };
    let store = with_notes(&db, Ulid::generate()).await;
    let size = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let wal = || {
        std::fs::metadata(path.with_extension("db-wal"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    // Let the checkpoint of start-up's commits finish first.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = size();
    let body = "x".repeat(2000);
    for i in 0..30u128 {
        let values: Values =
            serde_json::from_value(json!({"title": format!("note {i}"), "body": body}))
                .expect("values");
        store
            .put("notes", id(10_000 + i), &values)
            .await
            .expect("put");
    }
    // Below SQLite's own automatic checkpoint: only the thread copies them.
    let pages = wal() / 4096;
    assert!(pages < 1000, "the WAL grew to {pages} pages");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while size() < before + 60 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {} bytes (was {before}): no checkpoint ran",
            size()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    store.close().await;
}

#[tokio::test]
async fn unreachable_postgres_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut opts: tidemark_store::PostgresOptions =
        format!("postgres://u:secret@127.0.0.1:{port}/db")
            .parse()
            .expect("url");
    opts.connect_timeout = std::time::Duration::from_secs(2);
    let err = Store::open(&StoreUrl::Postgres(opts), clock(Ulid::generate()))
        .await
        .expect_err("unreachable");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}")),
        "{msg}"
    );
    assert!(!msg.contains("secret"), "password leaked: {msg}");
}

#[test]
fn bad_urls_are_named() {
    let err = "mysql://x".parse::<StoreUrl>().expect_err("mysql");
    assert!(
        err.to_string()
            .contains("expected sqlite://PATH or postgres://"),
        "{err}"
    );
    let err = "postgres://u:pw@host:notaport/db"
        .parse::<StoreUrl>()
        .expect_err("port");
    assert!(!err.to_string().contains("pw@"), "{err}");
}

/// SQLite's REPLACE conflict resolution deletes the rows a write clashes with
/// (on a UNIQUE column or the primary key) without firing delete triggers: the
/// deletions are captured all the same, and `OR IGNORE` captures nothing.
#[tokio::test]
async fn sqlite_replace_deletions_are_captured() {
    let db = TestDb::sqlite();
    db.sql("CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT UNIQUE, name TEXT)");
    let node = Ulid::generate();
    let store = open(&db, node).await;
    store
        .register_table("users", ConflictPolicy::Lww)
        .await
        .expect("register");
    let (u1, u2, u3, u4) = (id(1), id(2), id(3), id(4));
    db.sql(&format!(
        "INSERT INTO users (id, email, name) VALUES ('{u1}', 'e@x', 'first'); \
         INSERT INTO users (id, email, name) VALUES ('{u4}', 'f@x', 'fourth')"
    ));
    store.drain().await.expect("drain");
    let before = all_events(&store).await.len();

    // u2 takes u1's email: u1 is deleted by the REPLACE.
    db.sql(&format!(
        "INSERT OR REPLACE INTO users (id, email, name) VALUES ('{u2}', 'e@x', 'second')"
    ));
    // u3 would take it too, but OR IGNORE leaves everything as it was.
    db.sql(&format!(
        "INSERT OR IGNORE INTO users (id, email, name) VALUES ('{u3}', 'e@x', 'third')"
    ));
    // u2 takes u4's email by an update: u4 is deleted.
    db.sql(&format!(
        "UPDATE OR REPLACE users SET email = 'f@x' WHERE id = '{u2}'"
    ));
    store.drain().await.expect("drain");
    let ops: Vec<(Ulid, Operation)> = all_events(&store).await[before..]
        .iter()
        .map(|e| (e.record_id, e.operation))
        .collect();
    assert_eq!(
        ops,
        vec![
            (u1, Operation::Delete),
            (u2, Operation::Insert),
            (u4, Operation::Delete),
            (u2, Operation::Update),
        ]
    );
    for (gone, there) in [(u1, false), (u3, false), (u4, false), (u2, true)] {
        assert_eq!(
            store.get("users", gone).await.expect("get").is_some(),
            there,
            "{gone}"
        );
    }
    assert!(
        store
            .version("users", u1)
            .await
            .expect("v")
            .expect("v")
            .deleted
    );
    assert!(store.version("users", u3).await.expect("v").is_none());
    store.close().await;
}
