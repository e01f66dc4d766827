//! The conditional write (`SessionStore::update`) beside the unconditional `save`, on
//! each store, in the same run: what conflict safety costs. DESIGN.md section 7's
//! goal is at most 10% slower than `save`.
//!
//! `cargo bench --bench conditional --features sqlite,redis` measures async mode;
//! add `sync` for blocking mode. Each write goes to a record of the store picked in
//! shuffled order: 100,000 sessions of five values for the memory stores, 1,000 for
//! SQLite (each write is an fsync'd commit) and Redis (at 127.0.0.1:6379, under a
//! prefix of its own). Records are built before the clock starts; in async mode each
//! timed loop is one `block_on`, as a server's executor runs many writes per entry.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use portable_sessions::{session_store::Update, CachingSessionStore, MemoryStore, SessionStore};

mod common;
use common::{criterion_config, our_record, run, shuffle, OurRecord, BIG_STORE_SIZE, MODE};

/// `n` workload records created in `store`, in shuffled order.
#[maybe_async::maybe_async]
async fn filled<S: SessionStore>(store: &S, n: usize) -> Vec<OurRecord> {
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let mut record = our_record();
        store.create(&mut record).await.expect("create");
        records.push(record);
    }
    shuffle(&mut records);
    records
}

/// Times `iters` unconditional saves, cycling through `records`.
#[maybe_async::maybe_async]
async fn saves<S: SessionStore>(store: &S, records: &[OurRecord], iters: u64) -> Duration {
    let start = Instant::now();
    for record in records.iter().cycle().take(iters as usize) {
        store.save(record).await.expect("save");
    }
    start.elapsed()
}

/// Times `iters` conditional writes, cycling through `records`, each over the version
/// the store holds (so every one is written, as a request without a race writes).
#[maybe_async::maybe_async]
async fn updates<S: SessionStore>(store: &S, records: &mut [OurRecord], iters: u64) -> Duration {
    let len = records.len();
    let start = Instant::now();
    for i in 0..iters as usize {
        let record = &mut records[i % len];
        let outcome = store.update(record).await.expect("update");
        match outcome {
            Update::Written(version) => record.version = version,
            other => panic!("a write without a race was {other:?}"),
        }
    }
    start.elapsed()
}

/// Benchmarks `save` and `update` on `store`, under `name`.
fn compare<S: SessionStore>(c: &mut Criterion, name: &str, store: S, sessions: usize) {
    let mut records = run(filled(&store, sessions));
    // `save` leaves the versions as they are: the updates' records stay current.
    let mut group = c.benchmark_group(format!("conditional/{name}"));
    if sessions < BIG_STORE_SIZE {
        group.sample_size(10);
    }
    group.bench_function(format!("ours-{MODE}/save"), |b| {
        b.iter_custom(|iters| run(saves(&store, &records, iters)))
    });
    group.bench_function(format!("ours-{MODE}/update"), |b| {
        b.iter_custom(|iters| run(updates(&store, &mut records, iters)))
    });
    group.finish();
}

fn memory(c: &mut Criterion) {
    compare(c, "memory", MemoryStore::new(), BIG_STORE_SIZE);
    let caching = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    compare(c, "caching", caching, BIG_STORE_SIZE);
}

#[cfg(feature = "sqlite")]
fn sqlite(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ps-bench-conditional-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let store = portable_sessions::SqliteStore::open(dir.join("sessions.db")).expect("opens");
    compare(c, "sqlite", store, 1_000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(_: &mut Criterion) {}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    let prefix = format!(
        "ps-bench-conditional:{}:",
        portable_sessions::session::Id::default()
    );
    let store = portable_sessions::RedisStore::new("redis://127.0.0.1:6379")
        .expect("a valid URL")
        .with_key_prefix(prefix);
    compare(c, "redis", store, 1_000);
}

#[cfg(not(feature = "redis"))]
fn redis(_: &mut Criterion) {}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = memory, sqlite, redis
}
criterion_main!(benches);
