//! Micro-benchmarks of the replication wire path for a 500-event batch: protobuf
//! encoding and decoding of the `Batch` (prost), and the conversions between wire
//! and store events in `convert` both ways.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use serde_json::json;
use tidemark_hlc::Hlc;
use tidemark_replicator::convert::{event_from_pb, event_to_pb};
use tidemark_replicator::pb;
use tidemark_store::{ChangeEvent, Operation};
use ulid::Ulid;

const EVENTS: usize = 500;

/// A batch of realistic events (a note of three columns, about 400 bytes on the
/// wire each), as a sender streams them.
fn events() -> Vec<ChangeEvent> {
    let origin = Ulid::from_parts(1_764_000_000_000, 7);
    (0..EVENTS)
        .map(|i| {
            let hlc = Hlc::from_parts(1_764_000_000_000 + i as i64, (i % 3) as u16).expect("hlc");
            let record = Ulid::from_parts(1_764_000_000_000, 1_000 + i as u128);
            ChangeEvent {
                event_id: Ulid::from_parts(1_764_000_000_000 + i as u64, i as u128),
                hlc,
                wall_ms: hlc.wall_ms(),
                node_id: origin,
                table_name: "notes".into(),
                record_id: record,
                operation: if i % 2 == 0 {
                    Operation::Insert
                } else {
                    Operation::Update
                },
                action: None,
                user_id: None,
                old_values: None,
                new_values: json!({
                    "id": record.to_string(),
                    "title": format!("note number {i}"),
                    "body": "a few words of body text that make the event a realistic size",
                    "stars": i % 5,
                })
                .as_object()
                .cloned(),
                metadata: Some(json!({ "vv": { origin.to_string(): hlc.encode() } })),
            }
        })
        .collect()
}

fn bench_wire(c: &mut Criterion) {
    let events = events();
    let batch = pb::Batch {
        batch_id: 1,
        events: events.iter().map(event_to_pb).collect(),
    };
    let bytes = batch.encode_to_vec();

    let mut g = c.benchmark_group("wire_batch_500");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("prost_encode", |b| {
        b.iter(|| black_box(black_box(&batch).encode_to_vec()))
    });
    g.bench_function("prost_decode", |b| {
        b.iter(|| pb::Batch::decode(black_box(bytes.as_slice())).expect("valid batch"))
    });
    g.bench_function("convert_to_pb", |b| {
        b.iter(|| {
            black_box(&events)
                .iter()
                .map(event_to_pb)
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("convert_from_pb", |b| {
        b.iter_batched(
            || batch.events.clone(),
            |wire| {
                wire.into_iter()
                    .map(|e| event_from_pb(e).expect("valid event"))
                    .collect::<Vec<_>>()
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("decode_and_convert", |b| {
        b.iter(|| {
            pb::Batch::decode(black_box(bytes.as_slice()))
                .expect("valid batch")
                .events
                .into_iter()
                .map(|e| event_from_pb(e).expect("valid event"))
                .collect::<Vec<_>>()
        })
    });
    g.finish();
    eprintln!("wire_batch_500: {} bytes encoded", bytes.len());
}

criterion_group!(benches, bench_wire);
criterion_main!(benches);
