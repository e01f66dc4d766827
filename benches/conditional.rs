//! What the writes of conflict safety and of a user's sessions cost, on each store,
//! in the same run: the conditional write (`SessionStore::update`) beside the
//! unconditional `save` (DESIGN.md section 7: at most 10% slower); both with an
//! owner beside without (at most 10%, with no round trip on Redis or statement on
//! SQL stores added); and listing an owner's sessions against their count.
//!
//! `cargo bench --bench conditional --features sqlite,redis,postgres` measures async
//! mode; add `sync` for blocking mode. Writes go to records picked in shuffled
//! order: 100,000 sessions of five values for the memory stores (one owner per five
//! sessions, for the owned ones), 1,000 for SQLite (each write an fsync'd commit),
//! Redis (127.0.0.1:6379, a prefix of its own) and PostgreSQL (127.0.0.1:5432,
//! database `test`, a schema of its own). Records are built before the clock starts;
//! in async mode each timed loop is one `block_on`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use portable_sessions::{
    session::{Owner, Ownership},
    session_store::Update,
    CachingSessionStore, MemoryStore, SessionStore,
};
use time::OffsetDateTime;

mod common;
use common::{criterion_config, our_record, run, shuffle, OurRecord, BIG_STORE_SIZE, MODE};

/// Sessions per owner among the owned records.
const PER_OWNER: usize = 5;

/// `n` workload records created in `store`, in shuffled order; owned ones by
/// `n / PER_OWNER` owners.
#[maybe_async::maybe_async]
async fn filled<S: SessionStore>(store: &S, n: usize, owned: bool) -> Vec<OurRecord> {
    let prefix = portable_sessions::session::Id::default();
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        let mut record = our_record();
        if owned {
            let owner = Owner::new(format!("user-{prefix}-{}", i / PER_OWNER)).expect("a name");
            record.ownership = Some(Ownership::new(owner, OffsetDateTime::now_utc()));
        }
        store.create(&mut record).await.expect("create");
        records.push(record);
    }
    shuffle(&mut records);
    records
}

/// Times `iters` saves, cycling through `records`.
#[maybe_async::maybe_async]
async fn saves<S: SessionStore>(store: &S, records: &[OurRecord], iters: u64) -> Duration {
    let start = Instant::now();
    for record in records.iter().cycle().take(iters as usize) {
        store.save(record).await.expect("save");
    }
    start.elapsed()
}

/// Times `iters` conditional writes (what `Session` writes), cycling through
/// `records`, each over the version the store holds.
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

/// Times `iters` listings of `owner`.
#[maybe_async::maybe_async]
async fn listings<S: SessionStore>(store: &S, owner: &Owner, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let listed = store.list_owned(owner).await.expect("list");
        std::hint::black_box(listed);
    }
    start.elapsed()
}

/// An owner with `n` sessions in `store`.
#[maybe_async::maybe_async]
async fn owner_with<S: SessionStore>(store: &S, n: usize) -> Owner {
    let owner = Owner::new(format!(
        "lister-{}",
        portable_sessions::session::Id::default()
    ))
    .expect("a name");
    for _ in 0..n {
        let mut record = our_record();
        record.ownership = Some(Ownership::new(owner.clone(), OffsetDateTime::now_utc()));
        store.create(&mut record).await.expect("create");
    }
    owner
}

/// Benchmarks saves and updates with and without an owner, and listings of owners
/// with 1, 10 and 100 sessions, on `store`, under `name`.
fn compare<S: SessionStore>(c: &mut Criterion, name: &str, store: S, sessions: usize) {
    let mut plain = run(filled(&store, sessions, false));
    let mut owned = run(filled(&store, sessions, true));
    let mut group = c.benchmark_group(format!("conditional/{name}"));
    if sessions < BIG_STORE_SIZE {
        group.sample_size(10);
    }
    group.bench_function(format!("ours-{MODE}/save"), |b| {
        b.iter_custom(|iters| run(saves(&store, &plain, iters)))
    });
    group.bench_function(format!("ours-{MODE}/save-owned"), |b| {
        b.iter_custom(|iters| run(saves(&store, &owned, iters)))
    });
    group.bench_function(format!("ours-{MODE}/update"), |b| {
        b.iter_custom(|iters| run(updates(&store, &mut plain, iters)))
    });
    group.bench_function(format!("ours-{MODE}/update-owned"), |b| {
        b.iter_custom(|iters| run(updates(&store, &mut owned, iters)))
    });
    group.finish();
    paired(name, &store, &mut plain, &mut owned, sessions);
    let mut group = c.benchmark_group(format!("listing/{name}"));
    if sessions < BIG_STORE_SIZE {
        group.sample_size(10);
    }
    for n in [1, 10, 100] {
        let owner = run(owner_with(&store, n));
        group.bench_function(format!("ours-{MODE}/list-{n}"), |b| {
            b.iter_custom(|iters| run(listings(&store, &owner, iters)))
        });
    }
    group.finish();
}

/// The writes with an owner against those without, measured in alternating rounds
/// (so that a machine's drift over a run falls on both alike); prints the median
/// time per write of each, and their ratio.
fn paired<S: SessionStore>(
    name: &str,
    store: &S,
    plain: &mut [OurRecord],
    owned: &mut [OurRecord],
    sessions: usize,
) {
    let batch = (sessions / 5).clamp(100, 20_000) as u64;
    let per_write = |time: Duration| time.as_secs_f64() * 1e9 / batch as f64;
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let (mut saves_plain, mut saves_owned) = (Vec::new(), Vec::new());
    let (mut updates_plain, mut updates_owned) = (Vec::new(), Vec::new());
    for _ in 0..21 {
        saves_plain.push(per_write(run(saves(store, plain, batch))));
        saves_owned.push(per_write(run(saves(store, owned, batch))));
        updates_plain.push(per_write(run(updates(store, plain, batch))));
        updates_owned.push(per_write(run(updates(store, owned, batch))));
    }
    for (what, plain, owned) in [
        ("save", median(saves_plain), median(saves_owned)),
        ("update", median(updates_plain), median(updates_owned)),
    ] {
        eprintln!(
            "paired conditional/{name}/ours-{MODE}/{what}: {plain:.0} ns without an owner, \
             {owned:.0} ns with one: {:.3}x",
            owned / plain
        );
    }
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

#[cfg(feature = "postgres")]
fn postgres(c: &mut Criterion) {
    let schema = format!(
        "ps_bench_conditional_{}",
        portable_sessions::session::Id::default()
            .to_string()
            .to_lowercase()
            .replace('-', "_")
    );
    let store = portable_sessions::PostgresStore::new(
        "postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
    )
    .expect("a valid URL")
    .with_table(&schema, "sessions")
    .expect("valid names");
    compare(c, "postgres", store, 1_000);
    let _ = std::process::Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc"])
        .arg(format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .status();
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &mut Criterion) {}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = memory, sqlite, redis, postgres
}
criterion_main!(benches);
