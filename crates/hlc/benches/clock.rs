//! Micro-benchmarks of the clock's hot paths: stamping a local write
//! ([`Clock::now`]), observing a remote timestamp ([`Clock::observe`]), and the
//! seed encoding ([`Hlc::encode`] / [`Hlc::decode`] and the text form).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tidemark_hlc::{Clock, Hlc, WallClock};
use ulid::Ulid;

fn clock(n: u128) -> Clock {
    Clock::new(
        Ulid::from_parts(1_764_000_000_000, n),
        5_000,
        WallClock::System,
    )
    .expect("a valid clock")
}

fn bench_clock(c: &mut Criterion) {
    let local = clock(1);
    c.bench_function("hlc/now", |b| b.iter(|| black_box(local.now())));

    // A peer's timestamps, always fresh and within the drift bound.
    let remote = clock(2);
    c.bench_function("hlc/observe", |b| {
        b.iter_batched(
            || remote.now(),
            |t| local.observe(black_box(t)).expect("within drift"),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("hlc/observe_then_now", |b| {
        b.iter_batched(
            || remote.now(),
            |t| {
                local.observe(t).expect("within drift");
                black_box(local.now())
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn bench_encoding(c: &mut Criterion) {
    let h = Hlc::from_parts(1_764_000_000_123, 42).expect("valid parts");
    let raw = h.encode();
    let text = raw.to_string();
    c.bench_function("hlc/encode", |b| {
        b.iter(|| black_box(black_box(h).encode()))
    });
    c.bench_function("hlc/decode", |b| {
        b.iter(|| Hlc::decode(black_box(raw)).expect("valid"))
    });
    c.bench_function("hlc/from_parts", |b| {
        b.iter(|| Hlc::from_parts(black_box(1_764_000_000_123), black_box(42)).expect("valid"))
    });
    c.bench_function("hlc/parse_text", |b| {
        b.iter(|| black_box(text.as_str()).parse::<Hlc>().expect("valid"))
    });
}

criterion_group!(benches, bench_clock, bench_encoding);
criterion_main!(benches);
