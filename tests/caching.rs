//! Every row of the CachingSessionStore table, proved with stores that fail on demand.

mod common;

use std::sync::{atomic::Ordering, Arc};

use common::{expired_record, live_record, FaultyStore};
use parking_lot::Mutex;
use portable_sessions::{
    session::Id, session_store::Error, CacheOp, CachingSessionStore, ExpiredDeletion, MemoryStore,
    SessionStore,
};

type Reports = Arc<Mutex<Vec<(CacheOp, Option<Id>)>>>;

/// A caching store over two faulty layers, recording every reported cache failure.
fn layered() -> (
    CachingSessionStore<FaultyStore, FaultyStore>,
    FaultyStore,
    FaultyStore,
    Reports,
) {
    let cache = FaultyStore::new();
    let store = FaultyStore::new();
    let reports = Reports::default();
    let sink = reports.clone();
    let caching = CachingSessionStore::new(cache.clone(), store.clone())
        .on_cache_error(move |failure| sink.lock().push((failure.op, failure.id)));
    (caching, cache, store, reports)
}

fn ops(reports: &Reports) -> Vec<CacheOp> {
    reports.lock().iter().map(|(op, _)| *op).collect()
}

#[maybe_async::maybe_async]
async fn create_store_failure_returns_error_and_leaves_cache_untouched() {
    let (caching, cache, store, reports) = layered();
    store.faults.create.store(true, Ordering::SeqCst);
    let mut record = live_record(1);
    let result = caching.create(&mut record).await;
    assert!(matches!(result, Err(Error::Backend(_))));
    assert!(cache.inner.is_empty() && store.inner.is_empty());
    assert!(ops(&reports).is_empty());
}

#[maybe_async::maybe_async]
async fn create_cache_failure_is_reported_and_the_session_exists() {
    let (caching, cache, store, reports) = layered();
    cache.faults.save.store(true, Ordering::SeqCst);
    cache.faults.create.store(true, Ordering::SeqCst);
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    let stored = store.inner.load(&record.id).await.unwrap();
    assert_eq!(stored.as_ref(), Some(&record));
    assert!(cache.inner.is_empty());
    assert_eq!(*reports.lock(), vec![(CacheOp::Fill, Some(record.id))]);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
}

#[maybe_async::maybe_async]
async fn create_fills_the_cache_with_the_final_id() {
    let (caching, cache, store, _) = layered();
    let mut first = live_record(1);
    caching.create(&mut first).await.unwrap();
    // The store has the id taken: it draws another, and the cache gets that one.
    let mut second = live_record(2);
    second.id = first.id;
    caching.create(&mut second).await.unwrap();
    assert_ne!(second.id, first.id);
    let cached = cache.inner.load(&second.id).await.unwrap();
    assert_eq!(cached.as_ref(), Some(&second));
    let cached_first = cache.inner.load(&first.id).await.unwrap();
    assert_eq!(cached_first.as_ref(), Some(&first));
    assert_eq!(store.inner.len(), 2);
}

#[maybe_async::maybe_async]
async fn save_store_failure_drops_the_cache_entry_and_returns_error() {
    let (caching, cache, store, _) = layered();
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    store.faults.save.store(true, Ordering::SeqCst);
    let mut newer = record.clone();
    newer.insert("user", &2u64).unwrap();
    let result = caching.save(&newer).await;
    assert!(matches!(result, Err(Error::Backend(_))));
    // No newer data in the cache than in the store; the old entry is dropped too.
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(cached, None);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
}

#[maybe_async::maybe_async]
async fn save_cache_failure_loses_nothing() {
    let (caching, cache, store, reports) = layered();
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    cache.faults.save.store(true, Ordering::SeqCst);
    let mut newer = record.clone();
    newer.insert("user", &2u64).unwrap();
    caching.save(&newer).await.unwrap();
    let stored = store.inner.load(&record.id).await.unwrap();
    assert_eq!(stored.as_ref(), Some(&newer));
    // The stale entry was evicted, so loads see the new version.
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(cached, None);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(newer));
    assert_eq!(ops(&reports)[0], CacheOp::Save);
}

#[maybe_async::maybe_async]
async fn failed_eviction_never_serves_the_stale_entry() {
    let (caching, cache, store, reports) = layered();
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    // The cache can neither take the new version nor drop the old one.
    cache.faults.save.store(true, Ordering::SeqCst);
    cache.faults.delete.store(true, Ordering::SeqCst);
    let mut newer = record.clone();
    newer.insert("user", &2u64).unwrap();
    caching.save(&newer).await.unwrap();
    assert_eq!(ops(&reports), vec![CacheOp::Save, CacheOp::Evict]);
    let stale = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(
        stale.as_ref(),
        Some(&record),
        "the cache still holds the old version"
    );
    // Yet every load answers with the store's version.
    for _ in 0..3 {
        let loaded = caching.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(&newer));
    }
    // Once the cache recovers, the stale entry is evicted and the cache refilled.
    cache.fail_all(false);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&newer));
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(cached.as_ref(), Some(&newer));
    assert_eq!(store.inner.len(), 1);
}

#[maybe_async::maybe_async]
async fn load_cache_failure_falls_back_to_the_store() {
    let (caching, cache, store, reports) = layered();
    let record = live_record(1);
    store.inner.save(&record).await.unwrap();
    cache.faults.load.store(true, Ordering::SeqCst);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&record));
    assert_eq!(*reports.lock(), vec![(CacheOp::Load, Some(record.id))]);
    // A cache that cannot be filled does not fail the load either.
    cache.fail_all(true);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
    assert_eq!(
        ops(&reports),
        vec![CacheOp::Load, CacheOp::Load, CacheOp::Fill]
    );
}

#[maybe_async::maybe_async]
async fn load_miss_fills_the_cache() {
    let (caching, cache, store, _) = layered();
    let record = live_record(1);
    store.inner.save(&record).await.unwrap();
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&record));
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(cached, Some(record.clone()));
    // Now the cache answers alone.
    store.faults.load.store(true, Ordering::SeqCst);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
    let missing = caching.load(&Id::default()).await;
    assert!(
        matches!(missing, Err(Error::Backend(_))),
        "a miss that reaches a failing store fails"
    );
}

#[maybe_async::maybe_async]
async fn load_store_failure_returns_error() {
    let (caching, _cache, store, _) = layered();
    store.faults.load.store(true, Ordering::SeqCst);
    let result = caching.load(&Id::default()).await;
    assert!(matches!(result, Err(Error::Backend(_))));
}

#[maybe_async::maybe_async]
async fn delete_cache_failure_is_returned_and_the_session_is_not_served() {
    let (caching, cache, store, _) = layered();
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    cache.faults.delete.store(true, Ordering::SeqCst);
    let result = caching.delete(&record.id).await;
    assert!(
        matches!(result, Err(Error::Backend(_))),
        "a delete the cache missed is reported"
    );
    let stored = store.inner.load(&record.id).await.unwrap();
    assert_eq!(stored, None);
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert!(cached.is_some(), "the cache still holds the session");
    // A logged-out session must not live on through the cache.
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded, None);
    cache.fail_all(false);
    let loaded = caching.load(&record.id).await.unwrap();
    assert_eq!(loaded, None);
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(cached, None, "the first load after recovery evicted it");
}

#[maybe_async::maybe_async]
async fn delete_store_failure_returns_error() {
    let (caching, cache, store, _) = layered();
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    store.faults.delete.store(true, Ordering::SeqCst);
    let result = caching.delete(&record.id).await;
    assert!(matches!(result, Err(Error::Backend(_))));
    let stored = store.inner.load(&record.id).await.unwrap();
    assert!(
        stored.is_some(),
        "the store still has it, so the session lives"
    );
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(cached, None, "the cache entry was dropped on the way");
}

#[maybe_async::maybe_async]
async fn delete_expired_runs_on_both_layers() {
    let (caching, cache, store, reports) = layered();
    let mut live = live_record(1);
    caching.create(&mut live).await.unwrap();
    for _ in 0..3 {
        let mut expired = expired_record();
        caching.create(&mut expired).await.unwrap();
    }
    assert_eq!((cache.inner.len(), store.inner.len()), (4, 4));
    let deleted = caching.delete_expired().await.unwrap();
    assert_eq!(deleted, 3);
    assert_eq!((cache.inner.len(), store.inner.len()), (1, 1));

    // A failing cache is reported; the store's count comes back.
    let mut expired = expired_record();
    caching.create(&mut expired).await.unwrap();
    cache.faults.delete_expired.store(true, Ordering::SeqCst);
    let deleted = caching.delete_expired().await.unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(ops(&reports), vec![CacheOp::DeleteExpired]);
    let loaded = caching.load(&expired.id).await.unwrap();
    assert_eq!(loaded, None);

    // A failing store fails the pass.
    store.faults.delete_expired.store(true, Ordering::SeqCst);
    let result = caching.delete_expired().await;
    assert!(matches!(result, Err(Error::Backend(_))));
}

#[maybe_async::maybe_async]
async fn errors_keep_their_source() {
    let (caching, _cache, store, _) = layered();
    store.fail_all(true);
    let err = caching.load(&Id::default()).await.unwrap_err();
    let source = std::error::Error::source(&err).expect("the cause is kept");
    assert_eq!(source.to_string(), "injected load failure");
    assert_eq!(
        err.report(),
        "session store backend failed: injected load failure"
    );
}

tests_in_both_modes!(
    create_store_failure_returns_error_and_leaves_cache_untouched,
    create_cache_failure_is_reported_and_the_session_exists,
    create_fills_the_cache_with_the_final_id,
    save_store_failure_drops_the_cache_entry_and_returns_error,
    save_cache_failure_loses_nothing,
    failed_eviction_never_serves_the_stale_entry,
    load_cache_failure_falls_back_to_the_store,
    load_miss_fills_the_cache,
    load_store_failure_returns_error,
    delete_cache_failure_is_returned_and_the_session_is_not_served,
    delete_store_failure_returns_error,
    delete_expired_runs_on_both_layers,
    errors_keep_their_source,
);

/// A store whose loads wait at a gate, to hold a cache fill in the middle.
#[derive(Debug, Clone, Default)]
struct GatedStore {
    inner: MemoryStore,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    state: std::sync::Mutex<(bool, bool)>, // (a load is waiting, the gate is open)
    changed: std::sync::Condvar,
}

impl Gate {
    fn wait_open(&self) {
        let mut state = self.state.lock().unwrap();
        state.0 = true;
        self.changed.notify_all();
        while !state.1 {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn wait_for_load(&self) {
        let mut state = self.state.lock().unwrap();
        while !state.0 {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

#[maybe_async::maybe_async]
impl SessionStore for GatedStore {
    async fn create(
        &self,
        record: &mut portable_sessions::session::Record,
    ) -> portable_sessions::session_store::Result<()> {
        self.inner.create(record).await
    }

    async fn save(
        &self,
        record: &portable_sessions::session::Record,
    ) -> portable_sessions::session_store::Result<()> {
        self.inner.save(record).await
    }

    async fn load(
        &self,
        id: &Id,
    ) -> portable_sessions::session_store::Result<Option<portable_sessions::session::Record>> {
        let loaded = self.inner.load(id).await;
        self.gate.wait_open();
        loaded
    }

    async fn delete(&self, id: &Id) -> portable_sessions::session_store::Result<()> {
        self.inner.delete(id).await
    }
}

/// A load that read a record from the store must not put it in the cache after a
/// delete of that record finished: the delete waits for the fill, then evicts.
#[test]
fn a_fill_cannot_resurrect_a_deleted_session() {
    let cache = MemoryStore::new();
    let store = GatedStore::default();
    let caching = CachingSessionStore::new(cache.clone(), store.clone());
    let record = live_record(1);
    common::block(store.inner.save(&record)).unwrap();

    let loader = {
        let caching = caching.clone();
        let id = record.id;
        std::thread::spawn(move || common::block(caching.load(&id)).unwrap())
    };
    store.gate.wait_for_load(); // the loader has read the record and waits to fill
    let deleter = {
        let caching = caching.clone();
        let id = record.id;
        std::thread::spawn(move || common::block(caching.delete(&id)).unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !deleter.is_finished(),
        "the delete waits for the fill in progress"
    );
    store.gate.open();
    assert_eq!(loader.join().unwrap(), Some(record.clone()));
    deleter.join().unwrap();
    assert_eq!(common::block(cache.load(&record.id)).unwrap(), None);
    assert_eq!(common::block(caching.load(&record.id)).unwrap(), None);
}
