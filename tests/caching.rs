//! Every row of the CachingSessionStore table, proved with stores that fail on demand.

mod common;

use std::sync::{atomic::Ordering, Arc};

use common::{expired_record, live_record, FaultyStore};
use parking_lot::Mutex;
use portable_sessions::{
    session::Id,
    session_store::{Error, Update},
    CacheOp, CachingSessionStore, ExpiredDeletion, MemoryStore, SessionStore,
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
    // Yet every load answers with the store's version. The first load tries the
    // eviction again, fails and reports it; the next ones back off instead of each
    // waiting out a slow cache.
    for _ in 0..3 {
        let loaded = caching.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(&newer));
    }
    assert_eq!(
        ops(&reports),
        vec![CacheOp::Save, CacheOp::Evict, CacheOp::Evict],
        "one more eviction tried, and reported"
    );
    // Once the cache recovers, the deletion pass evicts the stale entry, whatever
    // the backoff, and the next load refills the cache.
    cache.fail_all(false);
    assert!(
        format!("{caching:?}").contains("suspects: 1"),
        "{caching:?}"
    );
    caching.delete_expired().await.unwrap();
    assert!(
        format!("{caching:?}").contains("suspects: 0"),
        "{caching:?}"
    );
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
    // The load backed off from evicting again so soon; the deletion pass does not.
    caching.delete_expired().await.unwrap();
    let cached = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(cached, None, "the deletion pass after recovery evicted it");
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
    suspects_are_retried_by_the_deletion_pass,
    update_follows_the_store,
    the_cache_keeps_at_most_its_entries_the_least_recently_used_go_first,
    an_entry_older_than_the_cache_lifetime_is_loaded_again,
);

/// The cache is bounded: past its entry limit, filling it evicts the least recently
/// used entry of the stripe; a session in use stays. The store keeps them all.
#[maybe_async::maybe_async]
async fn the_cache_keeps_at_most_its_entries_the_least_recently_used_go_first() {
    let (cache, store) = (MemoryStore::new(), MemoryStore::new());
    // Two entries a stripe, 128 in all.
    let caching = CachingSessionStore::new(cache.clone(), store.clone()).with_max_entries(128);
    let mut hot = live_record(0);
    caching.create(&mut hot).await.unwrap();
    let mut ids = Vec::new();
    for n in 1..=2_000 {
        let mut record = live_record(n);
        store.create(&mut record).await.unwrap();
        let loaded = caching.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(&record));
        // The session in use is read between every two others.
        let again = caching.load(&hot.id).await.unwrap();
        assert_eq!(again.as_ref(), Some(&hot));
        ids.push(record.id);
    }
    assert!(cache.len() <= 128, "{} entries", cache.len());
    let in_use = cache.load(&hot.id).await.unwrap();
    assert!(in_use.is_some(), "the most recently used entry stays");
    assert_eq!(store.len(), 2_001, "the store keeps every session");
    // An evicted session loads from the store again.
    let first = caching.load(&ids[0]).await.unwrap();
    assert!(first.is_some());
}

/// An entry older than the cache lifetime is not served: the store answers, so a
/// change that another process made there shows within the lifetime.
#[maybe_async::maybe_async]
async fn an_entry_older_than_the_cache_lifetime_is_loaded_again() {
    let (cache, store) = (MemoryStore::new(), MemoryStore::new());
    let caching = CachingSessionStore::new(cache.clone(), store.clone())
        .with_cache_lifetime(std::time::Duration::from_millis(100));
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    // Another process logs the session out, in the store alone.
    store.delete(&record.id).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let loaded = caching.load(&record.id).await.unwrap();
        if loaded.is_none() {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "still served after the lifetime"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(100));
    let cached = cache.load(&record.id).await.unwrap();
    assert_eq!(cached, None, "the stale entry was dropped");
}

/// Suspect ids (their cache entry could not be evicted) never outlast a deletion pass
/// once the cache answers, and never before: not even when the record written since
/// has expired, since the stale entry may live longer.
#[maybe_async::maybe_async]
async fn suspects_are_retried_by_the_deletion_pass() {
    let (caching, cache, _store, _) = layered();
    let mut records = Vec::new();
    for n in 0..100 {
        let mut record = live_record(n);
        caching.create(&mut record).await.unwrap();
        records.push(record);
    }
    cache.faults.save.store(true, Ordering::SeqCst);
    cache.faults.delete.store(true, Ordering::SeqCst);
    for record in &records {
        let mut lapsed = record.clone();
        lapsed.expiry_date = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
        caching.save(&lapsed).await.unwrap();
    }
    assert!(
        format!("{caching:?}").contains("suspects: 100"),
        "{caching:?}"
    );
    caching.delete_expired().await.unwrap();
    assert!(
        format!("{caching:?}").contains("suspects: 100"),
        "{caching:?}"
    );
    for record in &records {
        let served = caching.load(&record.id).await.unwrap();
        assert_eq!(served, None, "the live entry in the cache is stale");
    }
    cache.fail_all(false);
    caching.delete_expired().await.unwrap();
    assert!(
        format!("{caching:?}").contains("suspects: 0"),
        "{caching:?}"
    );
    for record in &records {
        let served = caching.load(&record.id).await.unwrap();
        assert_eq!(served, None);
    }
}

/// The conditional write: the store decides, and the cache follows (written) or is
/// evicted (conflict, gone, failure), so that a retry's load sees the store.
#[maybe_async::maybe_async]
async fn update_follows_the_store() {
    let (caching, cache, store, reports) = layered();
    let mut record = live_record(1);
    caching.create(&mut record).await.unwrap();
    let mut newer = record.clone();
    newer.insert("user", &2u64).unwrap();
    let written = caching.update(&newer).await.unwrap();
    assert_eq!(written, Update::Written(1));
    let cached = cache.inner.load(&record.id).await.unwrap().expect("cached");
    assert_eq!(
        (cached.version, cached.get::<u64>("user").unwrap()),
        (1, Some(2))
    );

    // Another process wrote the store directly: the cache's version is stale.
    let mut other = cached.clone();
    other.insert("user", &3u64).unwrap();
    other.version = 2;
    store.inner.save(&other).await.unwrap();
    let stale = caching.update(&cached).await.unwrap();
    assert_eq!(stale, Update::Conflict);
    let evicted = cache.inner.load(&record.id).await.unwrap();
    assert_eq!(evicted, None, "a conflict evicts the cache entry");
    let fresh = caching.load(&record.id).await.unwrap();
    assert_eq!(fresh, Some(other.clone()));

    store.inner.delete(&record.id).await.unwrap();
    let gone = caching.update(&other).await.unwrap();
    assert_eq!(gone, Update::Gone);
    let served = caching.load(&record.id).await.unwrap();
    assert_eq!(served, None, "never served after the store lost it");

    let mut live = live_record(4);
    caching.create(&mut live).await.unwrap();
    store.faults.update.store(true, Ordering::SeqCst);
    let failed = caching.update(&live).await;
    assert!(matches!(failed, Err(Error::Backend(_))));
    let evicted = cache.inner.load(&live.id).await.unwrap();
    assert_eq!(evicted, None);
    assert!(ops(&reports).is_empty(), "{:?}", ops(&reports));
    assert!(caching.atomic_update());
}

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

/// Async mode: a caller's future dropped between the store step and the cache step (a
/// client that disconnects, a timeout layer) must not leave the cache serving what
/// the store no longer holds. Each write is dropped at each of its awaits.
#[cfg(not(feature = "sync"))]
mod cancellation {
    use std::{
        future::Future,
        sync::atomic::{AtomicBool, AtomicUsize},
        task::{Context, Poll},
    };

    use portable_sessions::{session::Record, session_store::Result};

    use super::*;

    /// A memory store whose next operation, once armed, does its work and then never
    /// completes: like a Redis command sent before the caller gave up, it happened.
    #[derive(Debug, Clone, Default)]
    struct Stalling {
        inner: MemoryStore,
        /// Stall after the operation's work (`true`) or before it (`false`).
        after: Arc<AtomicBool>,
        armed: Arc<AtomicUsize>,
    }

    impl Stalling {
        async fn step<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
            if self.armed.swap(0, Ordering::SeqCst) == 0 {
                return work.await;
            }
            if self.after.load(Ordering::SeqCst) {
                let _ = work.await;
            }
            std::future::pending().await
        }
    }

    #[portable_sessions::async_trait::async_trait]
    impl SessionStore for Stalling {
        async fn create(&self, record: &mut Record) -> Result<()> {
            self.inner.create(record).await
        }
        async fn save(&self, record: &Record) -> Result<()> {
            self.step(self.inner.save(record)).await
        }
        async fn load(&self, id: &Id) -> Result<Option<Record>> {
            self.inner.load(id).await
        }
        async fn delete(&self, id: &Id) -> Result<()> {
            self.step(self.inner.delete(id)).await
        }
        async fn update(&self, record: &Record) -> Result<Update> {
            self.step(self.inner.update(record)).await
        }
        fn atomic_update(&self) -> bool {
            true
        }
    }

    /// Polls `future` once, expecting it to stall, then drops it.
    fn drop_midway<F: Future>(future: F) {
        let mut future = Box::pin(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            matches!(future.as_mut().poll(&mut cx), Poll::Pending),
            "the operation stalls"
        );
    }

    #[derive(Clone, Copy, Debug)]
    enum Write {
        Save,
        Update,
        Delete,
    }

    /// Interrupts each write in the store (after its work) and in the cache (before
    /// its work); every later load must answer what the store holds.
    #[test]
    fn a_dropped_write_never_leaves_the_cache_stale() {
        for write in [Write::Save, Write::Update, Write::Delete] {
            for in_store in [true, false] {
                let (cache, store) = (Stalling::default(), Stalling::default());
                let caching = CachingSessionStore::new(cache.clone(), store.clone());
                let mut record = live_record(1);
                futures_lite::future::block_on(caching.create(&mut record)).unwrap();
                let mut newer = record.clone();
                newer.insert("user", &2u64).unwrap();
                let stalling = if in_store { &store } else { &cache };
                // In the store: the step does its work, then stalls. In the cache: the
                // store step ran, and the cache step stalls before its work.
                stalling.after.store(in_store, Ordering::SeqCst);
                stalling.armed.store(1, Ordering::SeqCst);
                match write {
                    Write::Save => drop_midway(caching.save(&newer)),
                    Write::Update => drop_midway(caching.update(&newer)),
                    Write::Delete => drop_midway(caching.delete(&record.id)),
                }
                let truth = futures_lite::future::block_on(store.inner.load(&record.id)).unwrap();
                let cached = futures_lite::future::block_on(cache.inner.load(&record.id)).unwrap();
                assert_ne!(cached, truth, "{write:?}: the cache is stale, as set up");
                for _ in 0..2 {
                    let loaded = futures_lite::future::block_on(caching.load(&record.id)).unwrap();
                    assert_eq!(loaded, truth, "{write:?} dropped (in store: {in_store})");
                }
            }
        }
    }

    /// A store whose deletes run on a thread of their own, which waits at a gate:
    /// a write that goes on after its caller's future was dropped, as SQLite's
    /// blocking job, a committed PostgreSQL statement or a sent Redis command does.
    #[derive(Debug, Clone, Default)]
    struct Threaded {
        inner: MemoryStore,
        started: Arc<AtomicBool>,
        open: Arc<AtomicBool>,
    }

    #[portable_sessions::async_trait::async_trait]
    impl SessionStore for Threaded {
        async fn create(&self, record: &mut Record) -> Result<()> {
            self.inner.create(record).await
        }
        async fn save(&self, record: &Record) -> Result<()> {
            self.inner.save(record).await
        }
        async fn load(&self, id: &Id) -> Result<Option<Record>> {
            self.inner.load(id).await
        }
        async fn delete(&self, id: &Id) -> Result<()> {
            let (store, id) = (self.clone(), *id);
            let done = Arc::new(AtomicBool::new(false));
            let finished = done.clone();
            std::thread::spawn(move || {
                store.started.store(true, Ordering::SeqCst);
                common::wait_for("the gate to open", || store.open.load(Ordering::SeqCst));
                futures_lite::future::block_on(store.inner.delete(&id)).unwrap();
                finished.store(true, Ordering::SeqCst);
            });
            futures_lite::future::poll_fn(|cx| {
                if done.load(Ordering::SeqCst) {
                    return Poll::Ready(());
                }
                cx.waker().wake_by_ref(); // a test store: spinning is fine
                Poll::Pending
            })
            .await;
            Ok(())
        }
        async fn update(&self, record: &Record) -> Result<Update> {
            self.inner.update(record).await
        }
        fn atomic_update(&self) -> bool {
            true
        }
    }

    /// A logout whose future is dropped while the store's delete goes on: a load in
    /// between still finds the record in the store, and must not copy it into the
    /// cache, which would then serve the logged-out session after the delete lands.
    #[test]
    fn an_abandoned_logout_is_never_undone_by_a_refill() {
        let (cache, store) = (MemoryStore::new(), Threaded::default());
        let caching = CachingSessionStore::new(cache.clone(), store.clone());
        let mut record = live_record(1);
        futures_lite::future::block_on(caching.create(&mut record)).unwrap();
        drop_midway(caching.delete(&record.id));
        common::wait_for("the delete to start", || {
            store.started.load(Ordering::SeqCst)
        });

        let meanwhile = futures_lite::future::block_on(caching.load(&record.id)).unwrap();
        assert!(meanwhile.is_some(), "the store still has it");

        store.open.store(true, Ordering::SeqCst);
        common::wait_for("the delete to land", || store.inner.is_empty());
        for _ in 0..2 {
            let loaded = futures_lite::future::block_on(caching.load(&record.id)).unwrap();
            assert_eq!(loaded, None, "the logout stands");
        }

        // Once the hold is over, the id is cached as usual again, and what the cache
        // held from before the logout is never served.
        let caching = caching.with_abandoned_write_hold(std::time::Duration::from_millis(50));
        let mut other = live_record(2);
        futures_lite::future::block_on(caching.create(&mut other)).unwrap();
        store.open.store(false, Ordering::SeqCst);
        store.started.store(false, Ordering::SeqCst);
        drop_midway(caching.delete(&other.id));
        common::wait_for("the delete to start", || {
            store.started.load(Ordering::SeqCst)
        });
        std::thread::sleep(std::time::Duration::from_millis(60));
        store.open.store(true, Ordering::SeqCst);
        common::wait_for("the delete to land", || store.inner.is_empty());
        let loaded = futures_lite::future::block_on(caching.load(&other.id)).unwrap();
        assert_eq!(loaded, None, "the stale entry is not served");
        let cached = futures_lite::future::block_on(cache.load(&other.id)).unwrap();
        assert_eq!(cached, None, "and it was dropped from the cache");
    }

    /// A write that lands while an abandoned logout is still under way is not
    /// listed for the cache either: once the hold is over, the logout has landed
    /// over it, and the cache must not serve it.
    #[test]
    fn a_write_during_an_abandoned_logout_is_not_served_after_the_hold() {
        let (cache, store) = (MemoryStore::new(), Threaded::default());
        let caching = CachingSessionStore::new(cache.clone(), store.clone())
            .with_abandoned_write_hold(std::time::Duration::from_millis(50));
        let mut record = live_record(1);
        futures_lite::future::block_on(caching.create(&mut record)).unwrap();
        drop_midway(caching.delete(&record.id));
        common::wait_for("the delete to start", || {
            store.started.load(Ordering::SeqCst)
        });
        let mut newer = record.clone();
        newer.insert("user", &2u64).unwrap();
        let written = futures_lite::future::block_on(caching.update(&newer)).unwrap();
        assert_eq!(written, Update::Written(1), "lands before the delete");
        store.open.store(true, Ordering::SeqCst);
        common::wait_for("the delete to land", || store.inner.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(60)); // the hold is over
        let loaded = futures_lite::future::block_on(caching.load(&record.id)).unwrap();
        assert_eq!(loaded, None, "the logout stands");
    }

    /// The same with real SQLite: a second connection holds the write lock
    /// (`BEGIN IMMEDIATE`), so the store's delete waits on its pool thread after the
    /// caller gave up, and lands when the lock is released.
    #[cfg(feature = "sqlite")]
    #[test]
    fn an_abandoned_logout_on_sqlite_is_never_undone_by_a_refill() {
        let dir = common::TempDir::new("abandoned-logout");
        let store = portable_sessions::SqliteStore::open(dir.db()).unwrap();
        let cache = MemoryStore::new();
        let caching = CachingSessionStore::new(cache.clone(), store.clone());
        let mut record = live_record(1);
        futures_lite::future::block_on(caching.create(&mut record)).unwrap();
        let holder = rusqlite::Connection::open(dir.db()).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();

        {
            let mut delete = Box::pin(caching.delete(&record.id));
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(
                delete.as_mut().poll(&mut cx).is_pending(),
                "waits for the lock"
            );
            // The job goes to a pool thread; give it time to start and wait on the
            // lock before the caller gives up (a job dropped before it starts never
            // runs: then there is nothing to land later).
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let meanwhile = futures_lite::future::block_on(caching.load(&record.id)).unwrap();
        assert!(meanwhile.is_some(), "readers do not wait for the writer");

        holder.execute_batch("COMMIT").unwrap();
        common::wait_for("the delete to land", || {
            futures_lite::future::block_on(store.load(&record.id))
                .unwrap()
                .is_none()
        });
        let loaded = futures_lite::future::block_on(caching.load(&record.id)).unwrap();
        assert_eq!(loaded, None, "the logout stands");
    }
}
