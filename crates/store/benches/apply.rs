//! Micro-benchmarks of the store's write paths on a SQLite database in a temp
//! directory: `Engine::apply_remote` of a batch of 100 and of 1000 remote events
//! (inserts of new records, and updates of records already present), and
//! `Engine::put` of one record through the write API.
//!
//! The database grows as the benchmark runs (every iteration writes new events),
//! as a live node's does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use tidemark_hlc::{Clock, WallClock};
use tidemark_store::{
    ChangeEvent, ConflictPolicy, Engine, Operation, SqliteBackend, SqliteOptions, Values,
};
use tokio::runtime::Runtime;
use ulid::Ulid;

struct Bench {
    rt: Runtime,
    engine: std::sync::Arc<Engine<SqliteBackend>>,
    /// The clock of the peer whose events are applied.
    remote: Clock,
    _dir: tempfile::TempDir,
}

fn setup() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = SqliteOptions::new(dir.path().join("bench.db"));
    let local = Ulid::from_parts(1_764_000_000_000, 1);
    let engine = rt.block_on(async {
        let backend = SqliteBackend::connect(&opts).await.expect("connect");
        sqlx::query(
            "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT NOT NULL, body TEXT, stars INTEGER)",
        )
        .execute(backend.pool())
        .await
        .expect("create notes");
        let clock = Arc::new(Clock::new(local, 5_000, WallClock::System).expect("clock"));
        let engine = Engine::open(backend, clock).await.expect("open");
        engine
            .register_table("notes", ConflictPolicy::Lww)
            .await
            .expect("register notes");
        engine
    });
    let remote = Clock::new(
        Ulid::from_parts(1_764_000_000_000, 2),
        5_000,
        WallClock::System,
    )
    .expect("remote clock");
    Bench {
        rt,
        engine: std::sync::Arc::new(engine),
        remote,
        _dir: dir,
    }
}

fn values(record: Ulid, n: usize) -> Values {
    json!({
        "id": record.to_string(),
        "title": format!("note number {n}"),
        "body": "a few words of body text that make the event a realistic size",
        "stars": n % 5,
    })
    .as_object()
    .cloned()
    .expect("an object")
}

impl Bench {
    /// One remote event writing `record`, stamped by the remote clock.
    fn event(&self, record: Ulid, op: Operation, n: usize) -> ChangeEvent {
        let origin = self.remote.node_id();
        let hlc = self.remote.now();
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
            new_values: Some(values(record, n)),
            metadata: Some(json!({ "vv": { origin.to_string(): hlc.encode() } })),
        }
    }

    fn apply(&self, batch: &[ChangeEvent]) -> Duration {
        let start = Instant::now();
        let outcome = self
            .rt
            .block_on(self.engine.apply_remote(batch))
            .expect("apply");
        let took = start.elapsed();
        assert_eq!(outcome.applied, batch.len() as u64, "every event applies");
        took
    }
}

fn bench_apply(c: &mut Criterion) {
    let bench = setup();
    let mut g = c.benchmark_group("apply_remote");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for size in [100usize, 1000] {
        g.throughput(Throughput::Elements(size as u64));
        g.bench_function(format!("insert_{size}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch: Vec<ChangeEvent> = (0..size)
                        .map(|i| bench.event(Ulid::generate(), Operation::Insert, i))
                        .collect();
                    total += bench.apply(&batch);
                }
                total
            })
        });

        // Records present before the measurement; every iteration updates all of
        // them with newer versions from the same peer (fast-forward).
        let records: Vec<Ulid> = (0..size).map(|_| Ulid::generate()).collect();
        let inserts: Vec<ChangeEvent> = records
            .iter()
            .enumerate()
            .map(|(i, r)| bench.event(*r, Operation::Insert, i))
            .collect();
        bench.apply(&inserts);
        g.bench_function(format!("update_{size}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for round in 0..iters as usize {
                    let batch: Vec<ChangeEvent> = records
                        .iter()
                        .enumerate()
                        .map(|(i, r)| bench.event(*r, Operation::Update, i + round))
                        .collect();
                    total += bench.apply(&batch);
                }
                total
            })
        });
    }
    g.finish();
}

fn bench_put(c: &mut Criterion) {
    let bench = setup();
    let mut g = c.benchmark_group("put");
    g.throughput(Throughput::Elements(1));
    g.bench_function("new_record", |b| {
        let mut n = 0;
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let id = Ulid::generate();
                n += 1;
                bench
                    .rt
                    .block_on(bench.engine.put("notes", id, &values(id, n)))
                    .expect("put");
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_apply, bench_put);
criterion_main!(benches);
