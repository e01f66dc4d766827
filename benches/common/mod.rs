//! The workload and the timed loops shared by `benches/stores.rs`, `benches/codec.rs`
//! and `examples/compare.rs`, so that all three measure the same thing.
//!
//! Every loop returns the time spent in store calls only: building records, and
//! putting back what a `create` or `delete` loop changed, happen off the clock. Ours
//! run in whichever mode the crate was built in; the peer (tower-sessions) is async in
//! both. Async loops are driven by `futures_lite::future::block_on`, the least
//! overhead an executor can add: none of these stores needs a runtime's reactor.

#![allow(dead_code)] // each bench uses part of this

use std::{
    collections::HashMap,
    future::Future,
    hint::black_box,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use time::OffsetDateTime;

pub use portable_sessions::session::{Id as OurId, Record as OurRecord};
pub use tower_sessions_core::session::{Id as PeerId, Record as PeerRecord};

/// Sessions in the store for the single-threaded operations.
pub const STORE_SIZE: usize = 10_000;
/// Sessions in the store for the load-throughput runs.
pub const BIG_STORE_SIZE: usize = 100_000;
/// Records created or deleted between two rounds of putting the store back.
const CHUNK: u64 = 1_024;

/// The mode our crate was built in, for benchmark names and table headers.
pub const MODE: &str = if cfg!(feature = "sync") {
    "sync"
} else {
    "async"
};

// The five values of the workload record: about 250 bytes of tower-sessions' JSON, as
// in the figures that DESIGN.md section 7 starts from (235 bytes).
const USER_ID: u64 = 4_815_162_342;
const CSRF_TOKEN: &str = "q8ZJv2XlT0bN5sWc7YfGk1HdRm3PaE9u";
const RECENT: [u32; 8] = [4, 8, 15, 16, 23, 42, 108, 815];
const FLASH: &str = "Welcome back!";
const ROLES: [&str; 2] = ["admin", "editor"];

/// One day from now: far enough that nothing expires during a run.
pub fn expiry() -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::days(1)
}

/// The workload record in our form, with a fresh id and its own copy of the values.
pub fn our_record() -> OurRecord {
    let mut record = OurRecord::new(expiry());
    record.insert("user_id", &USER_ID).expect("encodes");
    record.insert("csrf_token", CSRF_TOKEN).expect("encodes");
    record.insert("recent", &RECENT).expect("encodes");
    record.insert("flash", FLASH).expect("encodes");
    record.insert("roles", &ROLES).expect("encodes");
    record
}

/// The workload record in the peer's form, with a fresh id.
pub fn peer_record() -> PeerRecord {
    let json = |value: serde_json::Result<serde_json::Value>| value.expect("encodes");
    let data = HashMap::from([
        ("user_id".to_owned(), json(serde_json::to_value(USER_ID))),
        (
            "csrf_token".to_owned(),
            json(serde_json::to_value(CSRF_TOKEN)),
        ),
        ("recent".to_owned(), json(serde_json::to_value(RECENT))),
        ("flash".to_owned(), json(serde_json::to_value(FLASH))),
        ("roles".to_owned(), json(serde_json::to_value(ROLES))),
    ]);
    PeerRecord {
        id: PeerId::default(),
        data,
        expiry_date: expiry(),
    }
}

/// The criterion settings of every benchmark here: shorter than criterion's defaults,
/// so that a run of both files takes minutes, not a quarter of an hour.
pub fn criterion_config() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

/// Drives one of our loops to completion: `block_on` in async mode, the value itself
/// in blocking mode (where the loop has already run).
#[maybe_async::async_impl]
pub fn run<F: Future>(work: F) -> F::Output {
    futures_lite::future::block_on(work)
}

/// Drives one of our loops to completion: `block_on` in async mode, the value itself
/// in blocking mode (where the loop has already run).
#[maybe_async::sync_impl]
pub fn run<T>(done: T) -> T {
    done
}

/// Drives one of the peer's loops: its stores are async in both of our modes.
pub fn run_peer<F: Future>(work: F) -> F::Output {
    futures_lite::future::block_on(work)
}

/// Ids for the records that `create` loops make. They come from a fast generator
/// instead of the operating system's: a system call per id, between two timed
/// batches, would evict the caches that the timed calls then pay to refill.
pub trait FastId {
    /// Returns the next id, distinct from every earlier one.
    fn fast() -> Self;
}

impl FastId for OurId {
    fn fast() -> Self {
        OurId::from_bytes(fast_bytes())
    }
}

impl FastId for PeerId {
    fn fast() -> Self {
        PeerId(i128::from_le_bytes(fast_bytes()))
    }
}

/// Sixteen bytes from a per-thread splitmix64 sequence.
fn fast_bytes() -> [u8; 16] {
    thread_local! {
        static STATE: std::cell::Cell<u64> = const { std::cell::Cell::new(0x2545_F491_4F6C_DD1D) };
    }
    let next = || {
        let state = STATE.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        STATE.set(state);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (u128::from(next()) << 64 | u128::from(next())).to_le_bytes()
}

/// Shuffles `items` (Fisher-Yates, with a fixed-seed xorshift: every run the same).
pub fn shuffle<T>(items: &mut [T]) {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

/// Runs `each(thread)` on `threads` threads that start together, and returns the wall
/// time until the last one finished.
pub fn parallel(threads: usize, each: impl Fn(usize) + Sync) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        let (barrier, each) = (&barrier, &each);
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                scope.spawn(move || {
                    barrier.wait();
                    each(thread);
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for handle in handles {
            handle.join().expect("a benchmark thread panicked");
        }
        start.elapsed()
    })
}

/// Times `tasks` tasks that each make `iters` loads from `filled`'s store, on a tokio
/// runtime with a worker per task: the peer's loads in parallel. Its `MemoryStore`
/// holds one async mutex, which tasks contend for; under `block_on` a task that finds
/// it locked parks its whole thread, under tokio only the task waits, which is ten
/// times faster. Each task starts at its own place in the (shuffled) ids.
pub fn peer_parallel_loads<S: tower_sessions_core::SessionStore>(
    runtime: &tokio::runtime::Runtime,
    filled: &Arc<peer::Filled<S>>,
    tasks: usize,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    runtime.block_on(async {
        let running: Vec<_> = (0..tasks)
            .map(|task| {
                let filled = Arc::clone(filled);
                tokio::spawn(async move {
                    let from = task * filled.ids.len() / tasks;
                    peer::load(&filled.store, &filled.ids, from, iters).await
                })
            })
            .collect();
        for task in running {
            task.await.expect("a benchmark task panicked");
        }
    });
    start.elapsed()
}

/// Times `threads` threads that each make `iters` loads from `filled`'s store: ours
/// in parallel (each thread under `block_on` in async mode: our stores never make a
/// task wait, so a thread per task is the least overhead). Each thread starts at its
/// own place in the (shuffled) ids.
pub fn our_parallel_loads<S: portable_sessions::SessionStore>(
    filled: &ours::Filled<S>,
    threads: usize,
    iters: u64,
) -> Duration {
    parallel(threads, |thread| {
        let from = thread * filled.ids.len() / threads;
        run(ours::load(&filled.store, &filled.ids, from, iters));
    })
}

/// A tokio runtime with `workers` worker threads, for [`peer_parallel_loads`].
pub fn tokio_runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .build()
        .expect("a tokio runtime")
}

// The same timed loops for both crates: `ours` in our build's mode, `peer` always
// async. A macro rather than two copies, so that the two can never drift apart.
macro_rules! timed_loops {
    ($(#[$mode:meta])* mod $name:ident: $store:path, $id:ty, $record:ty) => {
        /// Timed loops over one crate's `SessionStore`.
        pub mod $name {
            use super::*;

            /// A store filled with sessions, and what the loops need to run on it.
            pub struct Filled<S> {
                /// The store under test.
                pub store: S,
                /// The records in the store.
                pub records: Vec<$record>,
                /// Their ids, shuffled: loads go all over the store, as a server's do.
                pub ids: Vec<$id>,
                /// Ids that are not in the store.
                pub missing: Vec<$id>,
                /// What `create` copies.
                pub template: $record,
            }

            $(#[$mode])*
            impl<S: $store> Filled<S> {
                /// Fills `store` with `n` records made by `make`.
                pub async fn new(store: S, n: usize, make: fn() -> $record) -> Self {
                    let mut records = Vec::with_capacity(n);
                    for _ in 0..n {
                        let mut record = make();
                        store.create(&mut record).await.expect("create");
                        records.push(record);
                    }
                    let mut ids: Vec<$id> = records.iter().map(|record| record.id).collect();
                    shuffle(&mut ids);
                    Self {
                        store,
                        ids,
                        missing: (0..n).map(|_| <$id>::default()).collect(),
                        records,
                        template: make(),
                    }
                }

                /// Times `iters` runs of `op`.
                pub async fn time(&self, op: Op, iters: u64) -> Duration {
                    let store = &self.store;
                    match op {
                        Op::Create => create(store, &self.template, iters).await,
                        Op::Save => save(store, &self.records, iters).await,
                        Op::LoadHit => load(store, &self.ids, 0, iters).await,
                        Op::LoadMiss => load(store, &self.missing, 0, iters).await,
                        Op::Delete => delete(store, &self.records, iters).await,
                    }
                }
            }

            /// Times `iters` creates of copies of `template` under fresh ids.
            $(#[$mode])*
            pub async fn create<S: $store>(
                store: &S,
                template: &$record,
                iters: u64,
            ) -> Duration {
                let mut spent = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(CHUNK);
                    left -= n;
                    let mut records: Vec<$record> = (0..n)
                        .map(|_| {
                            let mut record = template.clone();
                            record.id = <$id as FastId>::fast();
                            record
                        })
                        .collect();
                    let start = Instant::now();
                    for record in &mut records {
                        store.create(record).await.expect("create");
                    }
                    spent += start.elapsed();
                    for record in &records {
                        store.delete(&record.id).await.expect("delete");
                    }
                }
                spent
            }

            /// Times `iters` saves, cycling through `records` (already in the store).
            $(#[$mode])*
            pub async fn save<S: $store>(store: &S, records: &[$record], iters: u64) -> Duration {
                let start = Instant::now();
                for record in records.iter().cycle().take(iters as usize) {
                    store.save(record).await.expect("save");
                }
                start.elapsed()
            }

            /// Times `iters` loads, cycling through `ids` from position `from`.
            $(#[$mode])*
            pub async fn load<S: $store>(
                store: &S,
                ids: &[$id],
                from: usize,
                iters: u64,
            ) -> Duration {
                let start = Instant::now();
                for id in ids.iter().cycle().skip(from).take(iters as usize) {
                    let loaded = store.load(id).await.expect("load");
                    black_box(loaded);
                }
                start.elapsed()
            }

            /// Times `iters` deletes of `records` (in the store), putting them back
            /// off the clock.
            $(#[$mode])*
            pub async fn delete<S: $store>(
                store: &S,
                records: &[$record],
                iters: u64,
            ) -> Duration {
                let mut spent = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(CHUNK).min(records.len() as u64);
                    left -= n;
                    let batch = &records[..n as usize];
                    let start = Instant::now();
                    for record in batch {
                        store.delete(&record.id).await.expect("delete");
                    }
                    spent += start.elapsed();
                    for record in batch {
                        store.save(record).await.expect("save");
                    }
                }
                spent
            }
        }
    };
}

timed_loops!(#[maybe_async::maybe_async] mod ours: portable_sessions::SessionStore, OurId, OurRecord);
timed_loops!(mod peer: tower_sessions_core::SessionStore, PeerId, PeerRecord);

/// The single-threaded store operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `create` of a record with a fresh id.
    Create,
    /// `save` of a record that is in the store.
    Save,
    /// `load` of an id that is in the store.
    LoadHit,
    /// `load` of an id that is not.
    LoadMiss,
    /// `delete` of an id that is in the store.
    Delete,
}

impl Op {
    /// Every operation, in table order.
    pub const ALL: [Op; 5] = [Op::Create, Op::Save, Op::LoadHit, Op::LoadMiss, Op::Delete];

    /// The benchmark group's name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Save => "save",
            Op::LoadHit => "load_hit",
            Op::LoadMiss => "load_miss",
            Op::Delete => "delete",
        }
    }
}

/// Creates `n` copies of `template` under fresh ids in `store` (they share their
/// values: cheap to make, for stores too big to fill record by record). Returns `n`.
#[maybe_async::maybe_async]
pub async fn fill_copies<S: portable_sessions::SessionStore>(
    store: &S,
    template: &OurRecord,
    n: usize,
) -> usize {
    for _ in 0..n {
        let mut record = template.clone();
        record.id = OurId::default();
        store.create(&mut record).await.expect("create");
    }
    n
}

/// Saves `expired` records that expired an hour ago into `store`, then times one
/// `delete_expired`, which must remove exactly those.
#[maybe_async::maybe_async]
pub async fn expire_and_delete<S: portable_sessions::ExpiredDeletion>(
    store: &S,
    template: &OurRecord,
    expired: usize,
) -> Duration {
    let past = OffsetDateTime::now_utc() - time::Duration::hours(1);
    for _ in 0..expired {
        let mut record = template.clone();
        record.id = OurId::fast();
        record.expiry_date = past;
        store.save(&record).await.expect("save");
    }
    let start = Instant::now();
    let deleted = store.delete_expired().await.expect("delete_expired");
    let spent = start.elapsed();
    assert_eq!(deleted, expired, "delete_expired removed the wrong records");
    spent
}

/// The physical floor of a load, for DESIGN.md section 7: a bare `HashMap` lookup of a
/// random id plus an `Arc` clone of the record's bytes, over the same number of
/// sessions, looked up in the same shuffled order. The ids are random already, so the
/// table hashes them by their low 64 bits, the cheapest hash there is.
pub struct Floor {
    map: FloorTable<Arc<[u8]>>,
    /// The same `Arc`s in entries of 64 bytes, a `MemoryStore` entry's size: the
    /// pointer and 32 bytes that a load does not read, as a store's entry holds the
    /// record's expiry, version and date beside the pointer.
    wide: FloorTable<(Arc<[u8]>, [u64; 4])>,
    ids: Vec<OurId>,
}

/// The floor's tables: ids to `V`, hashed by [`LowBits`].
type FloorTable<V> = HashMap<OurId, V, std::hash::BuildHasherDefault<LowBits>>;

/// Hashes an id by its low 64 bits: for the floor only (no protection against chosen
/// ids, which a store must have).
#[derive(Default)]
pub struct LowBits(u64);

impl std::hash::Hasher for LowBits {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Floor {
    /// The floor's table for the ids of `filled`, each with its record's stored bytes.
    pub fn of<S>(filled: &ours::Filled<S>) -> Self {
        let map: FloorTable<Arc<[u8]>> = filled
            .records
            .iter()
            .map(|record| {
                let bytes = record.encode_without_id().expect("encodes");
                (record.id, Arc::from(bytes))
            })
            .collect();
        let wide = map
            .iter()
            .map(|(id, bytes)| (*id, (Arc::clone(bytes), [0; 4])))
            .collect();
        Self {
            map,
            wide,
            ids: filled.ids.clone(),
        }
    }

    /// Times `iters` lookups with an `Arc` clone, cycling through the shuffled ids.
    pub fn loads(&self, iters: u64) -> Duration {
        let start = Instant::now();
        for id in self.ids.iter().cycle().take(iters as usize) {
            black_box(self.map.get(id).cloned());
        }
        start.elapsed()
    }

    /// Times `iters` lookups with an `Arc` clone, each id's place taken from the
    /// previous lookup's result (a step of one, which the compiler cannot know): the
    /// processor cannot start a lookup before the last one is done, as in a server,
    /// where a request's load never overlaps the previous request's.
    pub fn chained_loads(&self, iters: u64) -> Duration {
        self.chained(iters, |id| self.map.get(id).cloned())
    }

    /// As [`chained_loads`](Self::chained_loads), in the table of 64-byte entries.
    pub fn chained_wide_loads(&self, iters: u64) -> Duration {
        self.chained(iters, |id| {
            self.wide.get(id).map(|(bytes, _)| Arc::clone(bytes))
        })
    }

    fn chained(&self, iters: u64, get: impl Fn(&OurId) -> Option<Arc<[u8]>>) -> Duration {
        let start = Instant::now();
        let mut at = 0;
        for _ in 0..iters {
            let found = get(&self.ids[at]);
            let step = 1 + found.as_ref().map_or(0, |bytes| bytes.len() / 1_000_000);
            black_box(found);
            at = (at + step) % self.ids.len();
        }
        start.elapsed()
    }
}

/// Times `iters` loads from `store`, each id's place taken from the previous load's
/// result, as [`Floor::chained_loads`] does.
#[maybe_async::maybe_async]
pub async fn chained_loads<S: portable_sessions::SessionStore>(
    store: &S,
    ids: &[OurId],
    iters: u64,
) -> Duration {
    let start = Instant::now();
    let mut at = 0;
    for _ in 0..iters {
        let found = store.load(&ids[at]).await.expect("load");
        let step = 1 + found
            .as_ref()
            .map_or(0, |record| record.version as usize / 1_000_000);
        black_box(found);
        at = (at + step) % ids.len();
    }
    start.elapsed()
}
