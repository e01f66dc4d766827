//! Store operations, ours against tower-sessions' stores in the same run.
//!
//! `cargo bench --bench stores` measures our async mode, `cargo bench --bench stores
//! --features sync` our blocking mode; the peers are async either way. Benchmark names
//! carry the mode (`ours-async/...`, `ours-sync/...`), so after both runs criterion's
//! report holds both side by side.
//!
//! - `create`, `save`, `load_hit`, `load_miss`, `delete`: one thread, a store of
//!   10,000 sessions.
//! - `load_threads`: loads on 1 and 2 threads (blocking mode) or tasks (async mode) on a
//!   store of 100,000 sessions, reported as throughput, beside the physical floor
//!   (`floor/hashmap-arc`: a bare `HashMap` lookup and an `Arc` clone of the record's
//!   bytes, same ids, same order), and chained (`-chained`: each lookup waits for the
//!   last, as a server's loads do, so the processor cannot overlap their cache
//!   misses), the floor and ours, and the floor again with entries of 64 bytes, the
//!   size of a `MemoryStore` entry (`-chained-64B`). Each of our tasks runs on its
//!   own thread under `block_on`; the peer's run on a tokio runtime with two workers,
//!   which serves its contended mutex far better than `block_on` does.
//! - `delete_expired`: ours only (tower-sessions' `MemoryStore` never deletes expired
//!   records), on stores of 10,000, 100,000 and 1,000,000 sessions with 1% expired, and
//!   with a fixed 1,000 expired: the cost follows the expired count, not the size.
//! - With `--features postgres`: `create`, `save`, `load_hit`, `load_miss`, `delete`
//!   of `PostgresStore` (`ours-async/postgres`) on a table of 1,000 sessions, in a
//!   schema of its own dropped afterwards, on the server that
//!   `PORTABLE_SESSIONS_BENCH_POSTGRES` names (a URL; by default
//!   `postgres://postgres@127.0.0.1:5432/test`, the tests' server): one round trip
//!   each, so mostly the server's and the loopback's cost.

use std::{sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portable_sessions::{CachingSessionStore, MemoryStore};
use tower_sessions_memory_store::MemoryStore as PeerMemoryStore;
use tower_sessions_moka_store::MokaStore;

mod common;
use common::{
    chained_loads, criterion_config, expire_and_delete, fill_copies, our_parallel_loads,
    our_record, ours, peer, peer_parallel_loads, peer_record, run, run_peer, tokio_runtime, Floor,
    Op, BIG_STORE_SIZE, MODE, STORE_SIZE,
};

type OurCaching = CachingSessionStore<MemoryStore, MemoryStore>;
type PeerCaching = tower_sessions_core::CachingSessionStore<MokaStore, PeerMemoryStore>;

/// Every store under test, each filled with the same number of sessions.
struct Stores {
    memory: ours::Filled<MemoryStore>,
    caching: ours::Filled<OurCaching>,
    peer_memory: peer::Filled<PeerMemoryStore>,
    peer_moka: peer::Filled<MokaStore>,
    peer_caching: peer::Filled<PeerCaching>,
}

impl Stores {
    fn filled(n: usize) -> Self {
        let caching = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
        let peer_caching = PeerCaching::new(MokaStore::new(None), PeerMemoryStore::default());
        Self {
            memory: run(ours::Filled::new(MemoryStore::new(), n, our_record)),
            caching: run(ours::Filled::new(caching, n, our_record)),
            peer_memory: run_peer(peer::Filled::new(
                PeerMemoryStore::default(),
                n,
                peer_record,
            )),
            peer_moka: run_peer(peer::Filled::new(MokaStore::new(None), n, peer_record)),
            peer_caching: run_peer(peer::Filled::new(peer_caching, n, peer_record)),
        }
    }
}

fn ours_name(store: &str) -> String {
    format!("ours-{MODE}/{store}")
}

fn single_threaded(c: &mut Criterion) {
    let s = Stores::filled(STORE_SIZE);
    for op in Op::ALL {
        let mut group = c.benchmark_group(op.name());
        group.bench_function(ours_name("memory"), |b| {
            b.iter_custom(|iters| run(s.memory.time(op, iters)))
        });
        group.bench_function(ours_name("caching"), |b| {
            b.iter_custom(|iters| run(s.caching.time(op, iters)))
        });
        group.bench_function("tower/memory", |b| {
            b.iter_custom(|iters| run_peer(s.peer_memory.time(op, iters)))
        });
        group.bench_function("tower/moka", |b| {
            b.iter_custom(|iters| run_peer(s.peer_moka.time(op, iters)))
        });
        group.bench_function("tower/caching", |b| {
            b.iter_custom(|iters| run_peer(s.peer_caching.time(op, iters)))
        });
        group.finish();
    }
}

fn load_threads(c: &mut Criterion) {
    let memory = run(ours::Filled::new(
        MemoryStore::new(),
        BIG_STORE_SIZE,
        our_record,
    ));
    let caching = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    let caching = run(ours::Filled::new(caching, BIG_STORE_SIZE, our_record));
    let peer_memory = PeerMemoryStore::default();
    let peer_memory = Arc::new(run_peer(peer::Filled::new(
        peer_memory,
        BIG_STORE_SIZE,
        peer_record,
    )));
    let peer_moka = MokaStore::new(None);
    let peer_moka = Arc::new(run_peer(peer::Filled::new(
        peer_moka,
        BIG_STORE_SIZE,
        peer_record,
    )));
    let runtime = tokio_runtime(2);
    let floor = Floor::of(&memory);

    let mut group = c.benchmark_group("load_threads");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("floor/hashmap-arc", 1), |b| {
        b.iter_custom(|iters| floor.loads(iters))
    });
    // Each load waiting for the previous one, as a server's loads do: the floor and
    // ours.
    group.bench_function(BenchmarkId::new("floor/hashmap-arc-chained", 1), |b| {
        b.iter_custom(|iters| floor.chained_loads(iters))
    });
    // The same, in entries of a `MemoryStore` entry's size.
    group.bench_function(BenchmarkId::new("floor/hashmap-arc-chained-64B", 1), |b| {
        b.iter_custom(|iters| floor.chained_wide_loads(iters))
    });
    group.bench_function(BenchmarkId::new(ours_name("memory-chained"), 1), |b| {
        b.iter_custom(|iters| run(chained_loads(&memory.store, &memory.ids, iters)))
    });
    for threads in [1, 2] {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(BenchmarkId::new(ours_name("memory"), threads), |b| {
            b.iter_custom(|iters| our_parallel_loads(&memory, threads, iters))
        });
        group.bench_function(BenchmarkId::new(ours_name("caching"), threads), |b| {
            b.iter_custom(|iters| our_parallel_loads(&caching, threads, iters))
        });
        group.bench_function(BenchmarkId::new("tower/memory", threads), |b| {
            b.iter_custom(|iters| peer_parallel_loads(&runtime, &peer_memory, threads, iters))
        });
        group.bench_function(BenchmarkId::new("tower/moka", threads), |b| {
            b.iter_custom(|iters| peer_parallel_loads(&runtime, &peer_moka, threads, iters))
        });
    }
    group.finish();
}

fn delete_expired(c: &mut Criterion) {
    let mut group = c.benchmark_group("delete_expired");
    group.sample_size(10);
    for size in [10_000, 100_000, 1_000_000] {
        let store = MemoryStore::new();
        let template = our_record();
        let filled = run(fill_copies(&store, &template, size));
        assert_eq!(store.len(), filled);
        for (name, expired) in [("one_percent", size / 100), ("fixed_1000", 1_000)] {
            group.throughput(Throughput::Elements(expired as u64));
            group.bench_function(BenchmarkId::new(format!("ours-{MODE}/{name}"), size), |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        spent += run(expire_and_delete(&store, &template, expired));
                    }
                    spent
                })
            });
        }
    }
    group.finish();
}

/// `PostgresStore`'s operations, one round trip each, on a table of 1,000 sessions.
#[cfg(feature = "postgres")]
fn postgres(c: &mut Criterion) {
    let url = std::env::var("PORTABLE_SESSIONS_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("ps_bench_{}", std::process::id());
    let store = portable_sessions::PostgresStore::new(&url)
        .expect("a valid URL")
        .with_table(&schema, "sessions")
        .expect("valid names");
    let filled = run(ours::Filled::new(store, 1_000, our_record));
    for op in Op::ALL {
        let mut group = c.benchmark_group(op.name());
        group.bench_function(ours_name("postgres"), |b| {
            b.iter_custom(|iters| run(filled.time(op, iters)))
        });
        group.finish();
    }
    // The store has no way to drop its table; psql does, where it is installed.
    let dropped = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", &url, "-c"])
        .arg(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .output();
    if !dropped.is_ok_and(|out| out.status.success()) {
        eprintln!("drop the benchmark's schema {schema} by hand: psql failed");
    }
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &mut Criterion) {}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = single_threaded, load_threads, delete_expired, postgres
}
criterion_main!(benches);
