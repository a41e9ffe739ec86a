//! A batch from a peer, end to end through the store: wire events converted by
//! `convert::event_from_pb` (malformed ones quarantined, as the receiver does),
//! then `Store::apply_from` on a SQLite database with a replicated `notes` table.
//! This exercises the checks the engine makes on remote events before anything is
//! written (registry, table and column names, primary key, operation and values,
//! metadata and version vector, drift, per-origin order).
//!
//! Properties: nothing panics; a batch is either applied, with every event
//! accounted for exactly once (applied, superseded, duplicate or quarantined), or
//! refused as a whole for a reason the protocol allows (an origin's events out of
//! order, a timestamp beyond the drift bound); input never surfaces as a database
//! error or as corrupt stored data.

#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use tidemark_hlc::{Clock, WallClock};
use tidemark_replicator::convert::{event_from_pb, event_json};
use tidemark_replicator::pb;
use tidemark_store::{ConflictPolicy, RejectKind, Rejected, SqliteOptions, Store, StoreError, StoreUrl};
use ulid::Ulid;

struct Env {
    rt: tokio::runtime::Runtime,
    store: Store,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("fuzz.db");
        let store = rt.block_on(async {
            let pool = sqlx::SqlitePool::connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .expect("create database");
            sqlx::query(
                "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT NOT NULL, body TEXT, stars INTEGER CHECK (stars >= 0))",
            )
            .execute(&pool)
            .await
            .expect("create notes");
            pool.close().await;
            let clock = Arc::new(Clock::new(node(9), 5_000, WallClock::System).expect("clock"));
            let store = Store::open(&StoreUrl::Sqlite(SqliteOptions::new(&path)), clock)
                .await
                .expect("open store");
            store.bind_cluster("fuzz").await.expect("bind cluster");
            store.register_table("notes", ConflictPolicy::Lww).await.expect("register notes");
            store
        });
        Env { rt, store, _dir: dir }
    })
}

fn node(n: u8) -> Ulid {
    Ulid::from_parts(1_764_000_000_000, u128::from(n) + 1)
}

/// A few records of `notes`, and the registry record of `notes` itself.
fn record(n: u8) -> Ulid {
    match n % 5 {
        4 => tidemark_store::engine::datatype_id("notes"),
        n => Ulid::from_parts(1_764_000_000_001, u128::from(n) + 1),
    }
}

#[derive(Debug, Arbitrary)]
enum Text {
    Known(u8),
    Any(String),
}

#[derive(Debug, Arbitrary)]
enum FuzzValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    RecordId(u8),
    Word(u8),
    List(Vec<i8>),
}

impl FuzzValue {
    fn json(&self) -> Value {
        match self {
            FuzzValue::Null => Value::Null,
            FuzzValue::Bool(b) => json!(b),
            FuzzValue::Int(i) => json!(i),
            FuzzValue::Float(f) => json!(f),
            FuzzValue::Str(s) => json!(s),
            FuzzValue::RecordId(n) => json!(record(*n).to_string()),
            FuzzValue::Word(n) => json!(["notes", "lww", "manual"][*n as usize % 3]),
            FuzzValue::List(l) => json!(l),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Values {
    Absent,
    Columns(Vec<(Text, FuzzValue)>),
    Raw(String),
}

impl Values {
    fn text(&self) -> Option<String> {
        const COLUMNS: [&str; 8] = [
            "id",
            "title",
            "body",
            "stars",
            "node_id",
            "hlc_modified",
            "table_name",
            "conflict_policy",
        ];
        match self {
            Values::Absent => None,
            Values::Raw(s) => Some(s.clone()),
            Values::Columns(cols) => {
                let mut m = Map::new();
                for (name, v) in cols.iter().take(8) {
                    let name = match name {
                        Text::Known(i) => COLUMNS[*i as usize % COLUMNS.len()].to_owned(),
                        Text::Any(s) => s.clone(),
                    };
                    m.insert(name, v.json());
                }
                Some(Value::Object(m).to_string())
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Metadata {
    Absent,
    Vector(Vec<(u8, u32)>),
    Registry(bool),
    Raw(String),
}

#[derive(Debug, Arbitrary)]
struct FuzzEvent {
    event: u8,
    origin: u8,
    /// How far before the present (units of 2^-16 ms) the event is stamped.
    age: u32,
    future: bool,
    table: Text,
    record: u8,
    operation: i32,
    new_values: Values,
    old_values: Values,
    metadata: Metadata,
}

#[derive(Debug, Arbitrary)]
struct Batch {
    relay: bool,
    events: Vec<FuzzEvent>,
}

fn to_pb(e: &FuzzEvent, now: i64) -> pb::Event {
    let hlc = if e.future {
        now + (i64::from(e.age) << 8)
    } else {
        now - i64::from(e.age)
    };
    let table_name = match &e.table {
        Text::Known(i) if i % 3 == 0 => "tidemark_datatypes".to_owned(),
        Text::Known(_) => "notes".to_owned(),
        Text::Any(s) => s.clone(),
    };
    let metadata_json = match &e.metadata {
        Metadata::Absent => None,
        Metadata::Raw(s) => Some(s.clone()),
        Metadata::Vector(entries) => {
            let vv: Map<String, Value> = entries
                .iter()
                .take(4)
                .map(|(n, age)| (node(n % 3).to_string(), json!(now - i64::from(*age))))
                .collect();
            Some(json!({ "vv": vv }).to_string())
        }
        Metadata::Registry(manual) => Some(
            json!({ "resolution": { "kind": if *manual { "merged" } else { "keep_local" }, "by": "fuzz" } })
                .to_string(),
        ),
    };
    pb::Event {
        event_id: Ulid::from_parts(1_764_000_000_002, u128::from(e.event) + 1).to_string(),
        hlc,
        wall_ms: hlc >> 16,
        node_id: node(e.origin % 3).to_string(),
        table_name,
        record_id: record(e.record).to_string(),
        operation: e.operation % 5,
        action: None,
        user_id: None,
        old_values_json: e.old_values.text(),
        new_values_json: e.new_values.text(),
        metadata_json,
    }
}

fuzz_target!(|batch: Batch| {
    let env = env();
    let now = tidemark_hlc::system_wall_ms() << 16;
    let peer = node(0);
    let mut events = Vec::new();
    let mut rejected = Vec::new();
    let sent = batch.events.len().min(16);
    for e in batch.events.iter().take(16) {
        let raw = to_pb(e, now);
        let json = event_json(&raw);
        let event_id = raw.event_id.clone();
        match event_from_pb(raw) {
            Ok(e) => events.push(env.store.check_event(e)),
            Err(err) => rejected.push(Rejected {
                event_id,
                kind: RejectKind::Invalid,
                reason: err.to_string(),
                event: json,
            }),
        }
    }
    let relay = batch.relay;
    let allowed = move |origin: Ulid| relay || origin == peer;
    let result = env
        .rt
        .block_on(env.store.apply_from(Some(peer), events, rejected, &allowed, &[]));
    match result {
        Ok(o) => {
            let accounted = o.applied + o.superseded + o.duplicates + o.quarantined.len() as u64;
            assert_eq!(accounted, sent as u64, "events not accounted for: {o:?}");
        }
        Err(StoreError::Invalid { reason, .. }) => {
            assert!(reason.contains("out of order"), "batch refused: {reason}");
        }
        Err(StoreError::Clock(_)) => {}
        Err(other) => panic!("input surfaced as {other:?}"),
    }
});
