//! The store contract, run against every store of the core crate, and create under
//! contention.

mod common;

use std::{collections::HashSet, sync::Arc};

use portable_sessions::{
    session::{Id, Record},
    testing::{self, Expiry},
    CachingSessionStore, MemoryStore, SessionStore,
};

#[maybe_async::maybe_async]
async fn memory_store_conforms() {
    let store = MemoryStore::new();
    testing::check_store(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
    assert!(store.is_empty(), "the suite cleans up after itself");
}

#[maybe_async::maybe_async]
async fn caching_store_conforms() {
    let store = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    testing::check_store(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
    assert!(store.cache().is_empty() && store.store().is_empty());
}

#[maybe_async::maybe_async]
async fn dyn_store_conforms() {
    // The suite takes unsized stores, and a shared store is a store.
    let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
    testing::check_store(store.as_ref()).await;
    testing::check_store(&store).await;
}

#[maybe_async::maybe_async]
async fn forced_collision_draws_a_new_id() {
    let store = MemoryStore::new();
    let mut first = common::live_record(1);
    store.create(&mut first).await.unwrap();
    let taken = first.id;
    for attempt in 0..10u64 {
        let mut second = common::live_record(100 + attempt);
        second.id = taken;
        store.create(&mut second).await.unwrap();
        assert_ne!(second.id, taken);
        let original = store.load(&taken).await.unwrap().unwrap();
        assert_eq!(original.get::<u64>("user").unwrap(), Some(1));
        let moved = store.load(&second.id).await.unwrap().unwrap();
        assert_eq!(moved.get::<u64>("user").unwrap(), Some(100 + attempt));
    }
    assert_eq!(store.len(), 11);
}

tests_in_both_modes!(
    memory_store_conforms,
    caching_store_conforms,
    dyn_store_conforms,
    forced_collision_draws_a_new_id,
);

const THREADS: usize = 8;
const PER_THREAD: usize = 500;

/// Creates records from many threads at once (each thread its own executor in async
/// mode) into one store, all starting from the same few ids so that collisions are
/// certain, and checks that no create overwrote another.
fn create_under_contention<S: SessionStore + Clone>(store: S) -> HashSet<Id> {
    let shared_ids: Vec<Id> = (0..4).map(|_| Id::default()).collect();
    let handles: Vec<_> = (0..THREADS)
        .map(|thread| {
            let store = store.clone();
            let shared_ids = shared_ids.clone();
            std::thread::spawn(move || {
                let mut created = Vec::new();
                for n in 0..PER_THREAD {
                    let mut record = common::live_record((thread * PER_THREAD + n) as u64);
                    // Every fourth create starts from an id that others use too.
                    if n % 4 == 0 {
                        record.id = shared_ids[n / 4 % shared_ids.len()];
                    }
                    common::block(store.create(&mut record)).unwrap();
                    created.push(record);
                }
                created
            })
        })
        .collect();
    let created: Vec<Record> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let ids: HashSet<Id> = created.iter().map(|r| r.id).collect();
    assert_eq!(
        ids.len(),
        THREADS * PER_THREAD,
        "every create got its own id"
    );
    for record in &created {
        let loaded = common::block(store.load(&record.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(record), "no create overwrote another");
    }
    ids
}

#[test]
fn memory_store_create_under_contention() {
    let store = MemoryStore::new();
    create_under_contention(store.clone());
    assert_eq!(store.len(), THREADS * PER_THREAD);
}

#[test]
fn caching_store_create_under_contention() {
    let store = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    create_under_contention(store.clone());
    assert_eq!(store.store().len(), THREADS * PER_THREAD);
    assert_eq!(store.cache().len(), THREADS * PER_THREAD);
}
