//! [`CachingSessionStore`]: a fast cache in front of a store that holds the truth.

use std::{
    collections::HashSet,
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;

use crate::{
    session::{Id, Record},
    session_store::{Error, ExpiredDeletion, Result, SessionStore, Update},
};

/// How many locks order the writes of one id against the cache fills of the same id.
const STRIPES: usize = 64;

// The stripe lock is held across the awaits of a store call and a cache call, so in
// async mode it must be an async mutex; in blocking mode a plain one does.
#[cfg(not(feature = "sync"))]
type StripeLock = async_lock::Mutex<()>;
#[cfg(feature = "sync")]
type StripeLock = parking_lot::Mutex<()>;

/// A cache (`Cache`, say a [`MemoryStore`](crate::MemoryStore)) in front of a store
/// (`Store`, say a database) that holds the truth.
///
/// The cache may lose anything at any time; it must never serve a session that the
/// store no longer has, or an older version of one. Every operation is ordered so:
///
/// | operation | steps | when the cache fails | when the store fails |
/// |---|---|---|---|
/// | [`create`](SessionStore::create) | `store.create`, then `cache.save` of the final record | reported; the call succeeds | the error is returned, the cache untouched |
/// | [`save`](SessionStore::save) | `store.save`, then `cache.save` | the entry is evicted, reported; the call succeeds | the entry is evicted; the error is returned |
/// | [`update`](SessionStore::update) | `store.update`; if written, `cache.save` of the record at its new version, otherwise the entry is evicted | the entry is evicted, reported; the call succeeds | the entry is evicted; the error is returned |
/// | [`load`](SessionStore::load) | `cache.load`; on a miss `store.load`, then `cache.save` to fill | reported; the store answers | the error is returned |
/// | [`delete`](SessionStore::delete) | `store.delete`, then `cache.delete` | the error is returned: a logged-out session must not live on | the error is returned (the cache entry is still evicted) |
/// | [`delete_expired`](ExpiredDeletion::delete_expired) | `store`, then `cache` | reported; the store's count is returned | the error is returned |
///
/// Writes and cache fills of one id are serialized by a striped lock, so a fill that
/// read an old version from the store cannot land in the cache after a newer save or a
/// delete. When the cache cannot even evict an entry that may be stale, the id is
/// remembered and loads of it skip the cache until an eviction succeeds. The cache hit
/// path takes no lock of this type's own.
///
/// Failures that do not fail the call are never silent: each is logged through the
/// [`log`](https://docs.rs/log) facade (target `portable_sessions::caching`) and
/// passed to the callback set with [`on_cache_error`](Self::on_cache_error).
///
/// The cache must be private to this store and its clones (clones share the ordering
/// state). A store that other processes write to directly can change under the cache;
/// give such a cache short expiry dates or none at all.
///
/// # Examples
///
/// ```
/// use portable_sessions::{session::Record, CachingSessionStore, MemoryStore, SessionStore};
/// use time::{Duration, OffsetDateTime};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let cache = MemoryStore::default();
/// let database = MemoryStore::default(); // stands in for a persistent store
/// let store = CachingSessionStore::new(cache.clone(), database.clone());
///
/// let mut record = Record::new(OffsetDateTime::now_utc() + Duration::hours(1));
/// store.create(&mut record).await?;
/// // (`.await` stays out of `assert!`: maybe-async cannot remove it from a macro call.)
/// let in_database = database.load(&record.id).await?; // the truth
/// let in_cache = cache.load(&record.id).await?; // the fast copy
/// assert!(in_database.is_some() && in_cache.is_some());
///
/// cache.delete(&record.id).await?; // the cache may lose anything...
/// let loaded = store.load(&record.id).await?; // ...the store still answers
/// assert!(loaded.is_some());
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
pub struct CachingSessionStore<Cache, Store> {
    cache: Cache,
    store: Store,
    shared: Arc<Shared>,
    on_error: Option<ErrorHook>,
}

struct Shared {
    stripes: Box<[StripeLock]>,
    /// Ids whose cache entry may be stale because evicting it failed.
    suspects: Mutex<HashSet<Id>>,
    /// `suspects.len()`, readable without the lock so that the hit path stays free.
    suspect_count: AtomicUsize,
}

type ErrorHook = Arc<dyn Fn(&CacheFailure<'_>) + Send + Sync>;

/// The cache step that failed, in a [`CacheFailure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheOp {
    /// Reading the cache in `load`; the store answered instead.
    Load,
    /// Copying a record into the cache after `create`, or after a miss in `load`.
    Fill,
    /// Writing the cache after a successful `save`; the entry is evicted next.
    Save,
    /// Evicting an entry that may be stale. Loads of the id skip the cache until an
    /// eviction succeeds.
    Evict,
    /// Deleting from the cache in `delete`; the call returns this error.
    Delete,
    /// Deleting expired records from the cache.
    DeleteExpired,
}

/// A cache failure that [`CachingSessionStore`] handled, as passed to the callback
/// set with [`on_cache_error`](CachingSessionStore::on_cache_error).
#[derive(Debug)]
#[non_exhaustive]
pub struct CacheFailure<'a> {
    /// The step that failed.
    pub op: CacheOp,
    /// The session concerned, if the step was about one.
    pub id: Option<Id>,
    /// The cache's error.
    pub error: &'a Error,
}

impl<Cache, Store> CachingSessionStore<Cache, Store> {
    /// Puts `cache` in front of `store`.
    pub fn new(cache: Cache, store: Store) -> Self {
        Self {
            cache,
            store,
            shared: Arc::new(Shared {
                stripes: (0..STRIPES).map(|_| StripeLock::default()).collect(),
                suspects: Mutex::default(),
                suspect_count: AtomicUsize::new(0),
            }),
            on_error: None,
        }
    }

    /// Calls `hook` for every cache failure that does not fail the call, in addition
    /// to logging it: to count them, raise an alert, or fail a test.
    ///
    /// Clones made afterwards share the hook.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::{atomic::{AtomicUsize, Ordering}, Arc};
    /// use portable_sessions::{CachingSessionStore, MemoryStore};
    ///
    /// let failures = Arc::new(AtomicUsize::new(0));
    /// let counter = failures.clone();
    /// let store = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new())
    ///     .on_cache_error(move |_failure| {
    ///         counter.fetch_add(1, Ordering::Relaxed);
    ///     });
    /// # drop(store);
    /// ```
    pub fn on_cache_error(
        mut self,
        hook: impl Fn(&CacheFailure<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.on_error = Some(Arc::new(hook));
        self
    }

    /// Returns the cache layer.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Returns the store layer.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn stripe(&self, id: &Id) -> &StripeLock {
        let bits = u128::from_le_bytes(id.to_bytes());
        &self.shared.stripes[((bits ^ (bits >> 64)) as usize) % STRIPES]
    }

    fn report(&self, op: CacheOp, id: Option<Id>, error: &Error) {
        let level = match op {
            CacheOp::Evict | CacheOp::Delete => log::Level::Error,
            _ => log::Level::Warn,
        };
        log::log!(
            target: "portable_sessions::caching",
            level,
            "cache {op:?} failed for session {id:?}: {}",
            error.report()
        );
        if let Some(hook) = &self.on_error {
            hook(&CacheFailure { op, id, error });
        }
    }

    fn is_suspect(&self, id: &Id) -> bool {
        self.shared.suspect_count.load(Ordering::Acquire) > 0
            && self.shared.suspects.lock().contains(id)
    }

    fn set_suspect(&self, id: Id, suspect: bool) {
        let mut suspects = self.shared.suspects.lock();
        let changed = if suspect {
            suspects.insert(id)
        } else {
            suspects.remove(&id)
        };
        if changed {
            self.shared
                .suspect_count
                .store(suspects.len(), Ordering::Release);
        }
    }
}

#[maybe_async::maybe_async]
impl<Cache: SessionStore, Store: SessionStore> CachingSessionStore<Cache, Store> {
    /// Evicts `id` from the cache; if that fails, reports it and stops serving the id
    /// from the cache until a later eviction succeeds. Returns the cache's error.
    async fn evict(&self, id: &Id) -> Result<()> {
        match self.cache.delete(id).await {
            Ok(()) => {
                if self.is_suspect(id) {
                    self.set_suspect(*id, false);
                }
                Ok(())
            }
            Err(err) => {
                self.set_suspect(*id, true);
                Err(err)
            }
        }
    }

    async fn evict_reporting(&self, id: &Id) {
        if let Err(err) = self.evict(id).await {
            self.report(CacheOp::Evict, Some(*id), &err);
        }
    }
}

#[maybe_async::maybe_async]
impl<Cache: SessionStore, Store: SessionStore> SessionStore for CachingSessionStore<Cache, Store> {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.store.create(record).await?;
        // `cache.save`, never `cache.create`: the cache must not pick another id.
        let filled = self.cache.save(record).await;
        if let Err(err) = filled {
            self.report(CacheOp::Fill, Some(record.id), &err);
        }
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let _ordered = self.stripe(&record.id).lock().await;
        let stored = self.store.save(record).await;
        match stored {
            Ok(()) => {
                let cached = self.cache.save(record).await;
                if let Err(err) = cached {
                    self.report(CacheOp::Save, Some(record.id), &err);
                    self.evict_reporting(&record.id).await;
                }
                Ok(())
            }
            Err(err) => {
                // The store may or may not hold the new version: the cache holds neither.
                self.evict_reporting(&record.id).await;
                Err(err)
            }
        }
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        if self.is_suspect(id) {
            let _ordered = self.stripe(id).lock().await;
            let evicted = self.evict(id).await;
            if evicted.is_err() {
                // Still possibly stale in the cache: answer from the store alone.
                return self.store.load(id).await;
            }
            return self.load_and_fill(id).await;
        }
        let cached = self.cache.load(id).await;
        match cached {
            Ok(Some(record)) => return Ok(Some(record)),
            Ok(None) => {}
            Err(err) => self.report(CacheOp::Load, Some(*id), &err),
        }
        let _ordered = self.stripe(id).lock().await;
        self.load_and_fill(id).await
    }

    async fn update(&self, record: &Record) -> Result<Update> {
        let _ordered = self.stripe(&record.id).lock().await;
        let stored = self.store.update(record).await;
        match stored {
            Ok(Update::Written(version)) => {
                let mut written = record.clone();
                written.version = version;
                let cached = self.cache.save(&written).await;
                if let Err(err) = cached {
                    self.report(CacheOp::Save, Some(record.id), &err);
                    self.evict_reporting(&record.id).await;
                }
                Ok(Update::Written(version))
            }
            Ok(outcome) => {
                // The cache holds an older version, or a record the store no longer
                // has: the retry's load must come from the store.
                self.evict_reporting(&record.id).await;
                Ok(outcome)
            }
            Err(err) => {
                self.evict_reporting(&record.id).await;
                Err(err)
            }
        }
    }

    /// Atomic when the store's `update` is: the cache only follows the store.
    fn atomic_update(&self) -> bool {
        self.store.atomic_update()
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        let _ordered = self.stripe(id).lock().await;
        let stored = self.store.delete(id).await;
        let evicted = self.evict(id).await;
        match (stored, evicted) {
            (Err(store_err), Err(cache_err)) => {
                self.report(CacheOp::Delete, Some(*id), &cache_err);
                Err(store_err)
            }
            (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
            (Ok(()), Ok(())) => Ok(()),
        }
    }
}

#[maybe_async::maybe_async]
impl<Cache: SessionStore, Store: SessionStore> CachingSessionStore<Cache, Store> {
    /// Loads from the store and copies a found record into the cache. The caller holds
    /// the id's stripe lock, so no write of the id can come between the two.
    async fn load_and_fill(&self, id: &Id) -> Result<Option<Record>> {
        let loaded = self.store.load(id).await?;
        if let Some(record) = &loaded {
            let filled = self.cache.save(record).await;
            if let Err(err) = filled {
                self.report(CacheOp::Fill, Some(*id), &err);
            }
        }
        Ok(loaded)
    }
}

#[maybe_async::maybe_async]
impl<Cache, Store> ExpiredDeletion for CachingSessionStore<Cache, Store>
where
    Cache: ExpiredDeletion,
    Store: ExpiredDeletion,
{
    /// Deletes expired records from the store, then from the cache, and returns the
    /// store's count. A cache failure is reported, not returned: expired records are
    /// never served either way.
    async fn delete_expired(&self) -> Result<usize> {
        let deleted = self.store.delete_expired().await?;
        let cached = self.cache.delete_expired().await;
        if let Err(err) = cached {
            self.report(CacheOp::DeleteExpired, None, &err);
        }
        Ok(deleted)
    }
}

impl<Cache: Clone, Store: Clone> Clone for CachingSessionStore<Cache, Store> {
    /// Clones share the cache, the store, the ordering state and the error hook.
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            store: self.store.clone(),
            shared: self.shared.clone(),
            on_error: self.on_error.clone(),
        }
    }
}

impl<Cache: fmt::Debug, Store: fmt::Debug> fmt::Debug for CachingSessionStore<Cache, Store> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingSessionStore")
            .field("cache", &self.cache)
            .field("store", &self.store)
            .field(
                "suspects",
                &self.shared.suspect_count.load(Ordering::Relaxed),
            )
            .field("on_cache_error", &self.on_error.is_some())
            .finish()
    }
}
