//! [`CachingSessionStore`]: a fast cache in front of a store that holds the truth.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    session::{Ending, Handle, Id, OwnedSession, Owner, Record},
    session_store::{Error, ExpiredDeletion, Result, SessionStore, Update},
    stores::memory::IdHasherBuilder,
};

/// How many locks order the writes of one id against the cache fills of the same id.
const STRIPES: usize = 64;

// The stripe lock is held across the awaits of a store call and a cache call, so in
// async mode it must be an async mutex; in blocking mode a plain one does.
#[cfg(not(feature = "sync"))]
type StripeLock = async_lock::Mutex<Suspects>;
#[cfg(not(feature = "sync"))]
type StripeGuard<'a> = async_lock::MutexGuard<'a, Suspects>;
#[cfg(feature = "sync")]
type StripeLock = parking_lot::Mutex<Suspects>;
#[cfg(feature = "sync")]
type StripeGuard<'a> = parking_lot::MutexGuard<'a, Suspects>;

/// How long loads wait before evicting a suspect entry again after its second failed
/// eviction; the wait doubles with each further failure, up to [`MAX_EVICT_BACKOFF`].
/// (After the first failure the next load tries again at once.)
const EVICT_BACKOFF: Duration = Duration::from_millis(100);
const MAX_EVICT_BACKOFF: Duration = Duration::from_secs(30);

/// How many holds a stripe keeps before it drops those that ended.
const MAX_HELD: usize = 1024;

/// The longest hold [`CachingSessionStore::with_abandoned_write_hold`] takes: a year.
const MAX_HOLD: Duration = Duration::from_secs(365 * 24 * 3600);

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
/// delete. When the cache cannot even evict an entry that may be stale, or a write's
/// future is dropped between its store step and its cache step (a client that
/// disconnected, a timeout), the id is remembered as suspect, and loads of it skip the
/// cache until an eviction succeeds. After a failed eviction the next load tries once
/// more, then loads back off (from 100 ms, doubling, up to 30 s) rather than each wait
/// on a failing cache; [`delete_expired`](ExpiredDeletion::delete_expired) retries
/// every suspect, so they never outlast a pass once the cache answers. A cache hit
/// takes no lock across an await unless its own stripe (one of 64) holds a suspect;
/// it takes its stripe's bookkeeping mutex (held for one map lookup) once.
///
/// The callback runs while the id's stripe lock is held: it must not call this store.
///
/// Failures that do not fail the call are never silent: each is logged through the
/// [`log`](https://docs.rs/log) facade (target `portable_sessions::caching`) and
/// passed to the callback set with [`on_cache_error`](Self::on_cache_error).
///
/// Which cache entries may be served is kept here, not in the cache: an entry is
/// served only while it is listed, for at most the [cache
/// lifetime](Self::with_cache_lifetime) (10 s unless set) after it was filled or
/// written, and the cache holds at most [`with_max_entries`](Self::with_max_entries)
/// of them (100,000 unless set), about the least recently used evicted first (the
/// CLOCK approximation, per stripe). A write
/// whose future was dropped while its store step was under way keeps its id out of
/// the cache for [a while](Self::with_abandoned_write_hold) (60 s unless set): the
/// store's step can still land after the caller left, and a refill in between would
/// serve what the store is about to replace or delete.
///
/// # When a cache in front of a shared store is safe
///
/// The cache must be private to this store and its clones (clones share the
/// ordering state). With one process writing the store, all of it through this
/// cache, nothing stale is ever served, whatever the lifetime. When other processes
/// write the same store (several instances of an application, each with its own
/// cache, over one database or Redis), a change one of them makes (a logout, a
/// login's `cycle_id`, any write) is unseen by the others' caches until their
/// entries age out: that is what the lifetime bounds, so keep it as short as a
/// logged-out session may still be read elsewhere. Writes are safe either way:
/// conditional writes go to the store, which refuses a write over a version or a
/// session it no longer has.
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
    lifetime: Duration,
    /// The most entries one stripe lists.
    stripe_capacity: usize,
    hold: Duration,
}

struct Shared {
    stripes: Box<[Stripe]>,
    /// How many owner endings have started: a `create` that saw another number
    /// before its store step does not fill the cache (an ending may have deleted
    /// the record since).
    endings: std::sync::atomic::AtomicU64,
}

/// One lock of the striped lock, with the ids of its stripe whose cache entry may be
/// stale.
#[derive(Default)]
struct Stripe {
    lock: StripeLock,
    /// How many suspects the stripe holds: read without the lock, so that a hit in a
    /// stripe without suspects takes no lock at all.
    suspects: AtomicUsize,
    /// Which of the stripe's cache entries may be served.
    residency: parking_lot::Mutex<Residency>,
}

/// Ids whose cache entry may be stale: evicting it failed, or a write was interrupted
/// (its future dropped) between the store step and the cache step.
#[derive(Default)]
struct Suspects(HashMap<Id, Suspect>);

struct Suspect {
    /// No eviction is tried before this, after failed ones.
    retry_at: Option<Instant>,
    /// Failed evictions so far.
    failures: u32,
}

impl Suspects {
    /// Marks `id` suspect, keeping any backoff under way.
    fn mark(&mut self, id: Id) {
        self.0.entry(id).or_insert(Suspect {
            retry_at: None,
            failures: 0,
        });
    }

    /// Notes a failed eviction of `id`: backs off exponentially.
    fn failed(&mut self, id: Id) {
        self.mark(id);
        if let Some(suspect) = self.0.get_mut(&id) {
            suspect.failures = suspect.failures.saturating_add(1);
            // The next load tries once more at once; after that, loads wait.
            suspect.retry_at = (suspect.failures > 1).then(|| {
                let doublings = (suspect.failures - 2).min(16);
                Instant::now()
                    + EVICT_BACKOFF
                        .saturating_mul(1 << doublings)
                        .min(MAX_EVICT_BACKOFF)
            });
        }
    }
}

/// Which cache entries may be served, per stripe: each id filled into the cache (or
/// written through it) with the time it was. A cache entry that is not listed here
/// is never served, whatever the cache holds: it was evicted for room or age, its
/// eviction failed, or a write of its id was abandoned. Room is made the CLOCK way
/// (an approximation of least recently used that costs a hit one flag): the oldest
/// admitted entry goes, unless it was used since it last came round, in which case
/// it gets another round.
#[derive(Default)]
struct Residency {
    /// The ids whose entry may be served.
    entries: HashMap<Id, Listed, IdHasherBuilder>,
    /// Listed ids in the order they come round for eviction, each with the
    /// admission it stands for (an id forgotten or admitted again leaves a stale
    /// place behind, skipped when it comes round).
    ring: VecDeque<(Id, u64)>,
    admissions: u64,
    /// Ids with an abandoned write (its future dropped while the store step may
    /// still land): not cached again before this moment.
    held: HashMap<Id, Instant, IdHasherBuilder>,
    /// The same for every id: after an owner ending whose store step may still land
    /// (its future dropped, or the store failed), or whose eviction failed.
    held_all: Option<Instant>,
    /// When the last such hold began: entries filled before it are never served
    /// (they stay listed, and leave the cache as room is made, as any other).
    held_since: Option<Instant>,
}

struct Listed {
    filled: Instant,
    /// Which admission listed it, to tell its place in the ring from stale ones.
    admission: u64,
    /// Served since it last came round.
    used: bool,
}

impl Residency {
    /// Lists `id` as filled now (unless an abandoned write of it may still land);
    /// returns the ids that no longer fit, for the caller to evict.
    fn admit(&mut self, id: Id, now: Instant, capacity: usize) -> Vec<Id> {
        self.entries.remove(&id);
        if self.is_held(&id, now) {
            // An abandoned write of the id may still land over what was just cached.
            return Vec::new();
        }
        self.admissions += 1;
        let admission = self.admissions;
        self.entries.insert(
            id,
            Listed {
                filled: now,
                admission,
                used: false,
            },
        );
        self.ring.push_back((id, admission));
        let mut victims = Vec::new();
        while self.entries.len() > capacity {
            let Some((candidate, admitted)) = self.ring.pop_front() else {
                break;
            };
            match self.entries.get_mut(&candidate) {
                Some(listed) if listed.admission == admitted => {
                    if listed.used {
                        listed.used = false;
                        self.ring.push_back((candidate, admitted));
                    } else {
                        self.entries.remove(&candidate);
                        victims.push(candidate);
                    }
                }
                _ => {} // a stale place
            }
        }
        if self.ring.len() > 2 * self.entries.len() + 64 {
            // Mostly stale places: keep the live ones, in order.
            let entries = &self.entries;
            self.ring
                .retain(|(id, admitted)| entries.get(id).is_some_and(|l| l.admission == *admitted));
        }
        victims
    }

    /// Returns `true` if the entry of `id` may be served: listed, younger than
    /// `lifetime`, and with no abandoned write that may still land. Marks it used.
    fn serve(&mut self, id: &Id, now: Instant, lifetime: Duration) -> bool {
        if (self.held_all.is_some() || !self.held.is_empty()) && self.is_held(id, now) {
            return false;
        }
        let Some(listed) = self.entries.get_mut(id) else {
            return false;
        };
        if self.held_since.is_some_and(|since| listed.filled <= since) {
            return false;
        }
        if now.saturating_duration_since(listed.filled) >= lifetime {
            self.entries.remove(id);
            return false;
        }
        listed.used = true;
        true
    }

    fn forget(&mut self, id: &Id) {
        self.entries.remove(id);
    }

    /// Serves nothing of what the cache holds now, and caches nothing before
    /// `until`.
    fn hold_all(&mut self, now: Instant, until: Instant) {
        self.held_since = Some(now);
        self.held_all = Some(until);
    }

    /// Returns `true` while an abandoned write of `id` may still land.
    fn is_held(&mut self, id: &Id, now: Instant) -> bool {
        match self.held_all {
            Some(until) if until > now => return true,
            Some(_) => self.held_all = None,
            None => {}
        }
        match self.held.get(id) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.held.remove(id);
                false
            }
            None => false,
        }
    }

    /// Drops holds that ended. (Entries past their lifetime stay listed, so that
    /// they still count against the bound until eviction takes them out of the
    /// cache: `serve` never serves them.)
    fn prune(&mut self, now: Instant) {
        self.held.retain(|_, until| *until > now);
    }
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
                stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
                endings: std::sync::atomic::AtomicU64::new(0),
            }),
            on_error: None,
            lifetime: Self::DEFAULT_CACHE_LIFETIME,
            stripe_capacity: Self::DEFAULT_MAX_ENTRIES.div_ceil(STRIPES),
            hold: Self::DEFAULT_ABANDONED_WRITE_HOLD,
        }
    }

    /// How long a cache entry is served, unless set otherwise: 10 seconds.
    pub const DEFAULT_CACHE_LIFETIME: Duration = Duration::from_secs(10);

    /// How many entries the cache keeps, unless set otherwise: 100,000.
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

    /// How long an id whose write was abandoned is kept out of the cache, unless set
    /// otherwise: 60 seconds.
    pub const DEFAULT_ABANDONED_WRITE_HOLD: Duration = Duration::from_secs(60);

    /// Serves a cache entry for at most `lifetime` after it was filled or written;
    /// an older one is loaded from the store again (default
    /// [`DEFAULT_CACHE_LIFETIME`](Self::DEFAULT_CACHE_LIFETIME), 10 s).
    ///
    /// This bounds how long a change that another process made in the store (a
    /// logout, a login's `cycle_id`, any write) goes unseen here. With one process
    /// writing the store, all through this cache, the cache never serves a stale
    /// record and a long lifetime is safe (`Duration::MAX`); with several, the
    /// lifetime is how long a logged-out session may still be read by the others.
    /// Writes are never affected: they go to the store, conditionally.
    pub fn with_cache_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Keeps at most about `max` entries in the cache: once one of the 64 stripes
    /// of ids holds `max / 64` (rounded up, at least one), filling it evicts the
    /// entry of that stripe that was admitted longest ago and not used since it last
    /// came round (CLOCK, an approximation of least recently used; default
    /// [`DEFAULT_MAX_ENTRIES`](Self::DEFAULT_MAX_ENTRIES)). The store keeps every
    /// session; an evicted one is loaded from it again.
    pub fn with_max_entries(mut self, max: usize) -> Self {
        self.stripe_capacity = max.div_ceil(STRIPES).max(1);
        self
    }

    /// Keeps an id out of the cache for `hold` after one of its writes was
    /// abandoned (its future dropped while the store's step was under way), default
    /// [`DEFAULT_ABANDONED_WRITE_HOLD`](Self::DEFAULT_ABANDONED_WRITE_HOLD), 60 s.
    ///
    /// A store's write can still land after its caller has gone: SQLite's blocking
    /// job runs to its end, a PostgreSQL statement commits, a sent Redis command
    /// runs. Until then the cache must not be filled with what the store is about to
    /// replace or delete, so loads of the id go to the store alone. Make it longer
    /// than the longest a store's write can take (for the stores of this crate,
    /// their timeout, or SQLite's 5 s busy timeout, plus the wait for a connection).
    /// At most a year.
    pub fn with_abandoned_write_hold(mut self, hold: Duration) -> Self {
        self.hold = hold.min(MAX_HOLD);
        self
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

    fn stripe(&self, id: &Id) -> &Stripe {
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
}

/// Held by a write from before its store step until its cache step is done: if the
/// write's future is dropped in between (or the store panics), the id stays suspect,
/// so that loads never serve what the cache held before the store changed, and is
/// kept out of the cache for the hold, while the abandoned store step may still land.
struct Ordered<'a> {
    stripe: &'a Stripe,
    suspects: StripeGuard<'a>,
    id: Id,
    done: bool,
    hold: Duration,
}

impl Ordered<'_> {
    /// Marks the id suspect (after a failed eviction, say), counted for the hit path.
    fn mark(&mut self, failed: bool) {
        if failed {
            self.suspects.failed(self.id);
        } else {
            self.suspects.mark(self.id);
        }
        self.stripe
            .suspects
            .store(self.suspects.0.len(), Ordering::Release);
    }

    /// Clears the id: the cache holds what the store holds, or nothing.
    fn clear(&mut self) {
        if self.suspects.0.remove(&self.id).is_some() {
            self.stripe
                .suspects
                .store(self.suspects.0.len(), Ordering::Release);
        }
    }

    fn is_suspect(&self) -> bool {
        self.suspects.0.contains_key(&self.id)
    }
}

/// Held by an owner ending: unless it is marked done, its drop keeps every cache
/// entry from being served, and every id from being cached, for the hold.
struct HoldAll<'a> {
    shared: &'a Shared,
    hold: Duration,
    done: bool,
}

impl Drop for HoldAll<'_> {
    fn drop(&mut self) {
        if !self.done {
            let now = Instant::now();
            let until = now.checked_add(self.hold).unwrap_or(now + MAX_HOLD);
            for stripe in self.shared.stripes.iter() {
                stripe.residency.lock().hold_all(now, until);
            }
        }
        // Again once the store step is over (or abandoned): a create whose store
        // step ran during the ending sees that an ending overlapped it.
        self.shared
            .endings
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Drop for Ordered<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.mark(false);
            let now = Instant::now();
            // The hold is at most a year (see `with_abandoned_write_hold`).
            let until = now.checked_add(self.hold).unwrap_or(now + MAX_HOLD);
            let mut residency = self.stripe.residency.lock();
            residency.forget(&self.id);
            if residency.held.len() >= MAX_HELD {
                // Without deletion passes, ended holds would pile up.
                residency.prune(now);
            }
            residency.held.insert(self.id, until);
        }
    }
}

#[maybe_async::maybe_async]
impl<Cache: SessionStore, Store: SessionStore> CachingSessionStore<Cache, Store> {
    /// Takes the stripe lock of `id` for a write or a fill that ends by the cache step.
    async fn ordered(&self, id: Id) -> Ordered<'_> {
        let stripe = self.stripe(&id);
        let suspects = stripe.lock.lock().await;
        Ordered {
            stripe,
            suspects,
            id,
            done: false,
            hold: self.hold,
        }
    }

    /// Lists `id` as just filled in the cache, and evicts what no longer fits.
    async fn admit(&self, id: Id) {
        let victims =
            self.stripe(&id)
                .residency
                .lock()
                .admit(id, Instant::now(), self.stripe_capacity);
        for victim in victims {
            // Unlisted already, so never served: a failure only leaves it in memory
            // until it expires.
            let evicted = self.cache.delete(&victim).await;
            if let Err(err) = evicted {
                self.report(CacheOp::Evict, Some(victim), &err);
            }
        }
    }

    /// Returns `true` while an abandoned write of `id` may still land.
    fn is_held(&self, id: &Id) -> bool {
        self.stripe(id).residency.lock().is_held(id, Instant::now())
    }

    /// Evicts the id from the cache; on failure reports it, backs off, and keeps the
    /// id suspect, so that loads skip the cache until an eviction succeeds.
    async fn evict(&self, ordered: &mut Ordered<'_>, op: CacheOp) -> Result<()> {
        ordered.stripe.residency.lock().forget(&ordered.id);
        let evicted = self.cache.delete(&ordered.id).await;
        match evicted {
            Ok(()) => {
                ordered.clear();
                Ok(())
            }
            Err(err) => {
                ordered.mark(true);
                self.report(op, Some(ordered.id), &err);
                Err(err)
            }
        }
    }

    /// After the store step of a write: copies `written` into the cache, or evicts
    /// the entry when that fails. Either way the write is done.
    async fn follow(&self, ordered: &mut Ordered<'_>, written: &Record) {
        if self.is_held(&ordered.id) {
            // Not cached during a hold: evicted instead, so that nothing unlisted
            // piles up in the cache.
            let _ = self.evict(ordered, CacheOp::Evict).await;
            ordered.done = true;
            return;
        }
        let cached = self.cache.save(written).await;
        match cached {
            Ok(()) => {
                ordered.clear();
                self.admit(ordered.id).await;
            }
            Err(err) => {
                self.report(CacheOp::Save, Some(ordered.id), &err);
                let _ = self.evict(ordered, CacheOp::Evict).await;
            }
        }
        ordered.done = true;
    }

    /// Loads from the store and copies a found record into the cache, holding the
    /// id's stripe lock, so that no write of the id comes between the two.
    async fn load_and_fill(&self, ordered: &mut Ordered<'_>) -> Result<Option<Record>> {
        let loaded = self.store.load(&ordered.id).await?;
        if self.is_held(&ordered.id) {
            return Ok(loaded);
        }
        if let Some(record) = &loaded {
            // A fill dropped halfway may still land in a remote cache: the id is
            // then held, like after an abandoned write.
            ordered.done = false;
            let filled = self.cache.save(record).await;
            ordered.done = true;
            match filled {
                Ok(()) => self.admit(ordered.id).await,
                Err(err) => self.report(CacheOp::Fill, Some(ordered.id), &err),
            }
        }
        Ok(loaded)
    }

    /// Loads an id whose stripe holds suspects: a suspect one is evicted first (or,
    /// while evictions fail or back off, answered by the store alone).
    async fn load_suspect(&self, id: &Id) -> Result<Option<Record>> {
        let mut ordered = self.ordered(*id).await;
        ordered.done = true;
        let Some(suspect) = ordered.suspects.0.get(id) else {
            drop(ordered);
            return self.load_cached(id).await;
        };
        if suspect.retry_at.is_some_and(|at| at > Instant::now()) {
            return self.store.load(id).await;
        }
        self.evict_then_load(&mut ordered).await
    }

    /// Evicts a suspect entry, then loads and fills; while the eviction fails, the
    /// cache may still be stale, so the store alone answers.
    async fn evict_then_load(&self, ordered: &mut Ordered<'_>) -> Result<Option<Record>> {
        let evicted = self.evict(ordered, CacheOp::Evict).await;
        match evicted {
            Ok(()) => self.load_and_fill(ordered).await,
            Err(_) => self.store.load(&ordered.id).await,
        }
    }

    /// The usual load: the cache, then on a miss the store, filling the cache.
    async fn load_cached(&self, id: &Id) -> Result<Option<Record>> {
        let cached = self.cache.load(id).await;
        let unlisted = match cached {
            Ok(Some(record))
                if self
                    .stripe(id)
                    .residency
                    .lock()
                    .serve(id, Instant::now(), self.lifetime) =>
            {
                return Ok(Some(record));
            }
            // Unlisted (too old, evicted for room), or of an abandoned write: the
            // store answers, and fills the cache again unless a write is held.
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(err) => {
                self.report(CacheOp::Load, Some(*id), &err);
                false
            }
        };
        let mut ordered = self.ordered(*id).await;
        ordered.done = true;
        if ordered.is_suspect() {
            // A write was interrupted meanwhile: evict before filling.
            return self.evict_then_load(&mut ordered).await;
        }
        let loaded = self.load_and_fill(&mut ordered).await?;
        if unlisted && loaded.is_none() {
            // The store has nothing: the unlisted entry (never served) goes, best
            // effort, rather than wait for its own expiry. Only then: a plain miss
            // needs no delete.
            let _ = self.cache.delete(id).await;
        }
        Ok(loaded)
    }
}

#[maybe_async::maybe_async]
impl<Cache: SessionStore, Store: SessionStore> SessionStore for CachingSessionStore<Cache, Store> {
    async fn create(&self, record: &mut Record) -> Result<()> {
        let endings = self.shared.endings.load(Ordering::Acquire);
        self.store.create(record).await?;
        let mut ordered = self.ordered(record.id).await;
        ordered.done = true;
        if self.shared.endings.load(Ordering::Acquire) != endings || self.is_held(&record.id) {
            // An owner ending ran meanwhile and may have ended this very record:
            // the store answers for it.
            return Ok(());
        }
        // `cache.save`, never `cache.create`: the cache must not pick another id.
        let filled = self.cache.save(record).await;
        match filled {
            Ok(()) => self.admit(record.id).await,
            Err(err) => self.report(CacheOp::Fill, Some(record.id), &err),
        }
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let mut ordered = self.ordered(record.id).await;
        let stored = self.store.save(record).await;
        match stored {
            Ok(()) => {
                self.follow(&mut ordered, record).await;
                Ok(())
            }
            Err(err) => {
                // The store may or may not hold the new version: the cache holds neither.
                let _ = self.evict(&mut ordered, CacheOp::Evict).await;
                ordered.done = true;
                Err(err)
            }
        }
    }

    async fn update(&self, record: &Record) -> Result<Update> {
        let mut ordered = self.ordered(record.id).await;
        let stored = self.store.update(record).await;
        match stored {
            Ok(Update::Written(version)) => {
                let mut written = record.clone();
                written.version = version;
                self.follow(&mut ordered, &written).await;
                Ok(Update::Written(version))
            }
            other => {
                // Not written (the cache may hold an older version, or a record the
                // store no longer has: the retry's load must come from the store), or
                // the store failed and may hold either version.
                let _ = self.evict(&mut ordered, CacheOp::Evict).await;
                ordered.done = true;
                other
            }
        }
    }

    /// Atomic when the store's `update` is: the cache only follows the store.
    fn atomic_update(&self) -> bool {
        self.store.atomic_update()
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        // (An id with an abandoned write that may still land is never served from
        // the cache, nor filled into it: see `Residency::serve` and `load_and_fill`.)
        if self.stripe(id).suspects.load(Ordering::Acquire) > 0 {
            return self.load_suspect(id).await;
        }
        self.load_cached(id).await
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        let mut ordered = self.ordered(*id).await;
        let stored = self.store.delete(id).await;
        let evicted = self.evict(&mut ordered, CacheOp::Delete).await;
        ordered.done = true;
        match (stored, evicted) {
            (Err(err), _) | (Ok(()), Err(err)) => Err(err),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// When both the store and the cache keep an owner index.
    fn supports_owners(&self) -> bool {
        self.store.supports_owners() && self.cache.supports_owners()
    }

    /// The store's listing: the store holds the truth.
    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        self.store.list_owned(owner).await
    }

    /// Ends the sessions in the store, and evicts every cached session of `owner`
    /// (the ended ones, and the others too: they load again from the store), with
    /// every stripe lock held, so that no fill can bring an ended session back into
    /// the cache meanwhile. Writes and fills of this process wait for it: an ending
    /// is rare, and one store call long. A `create` whose store step came before,
    /// and its cache step after, leaves the cache alone.
    ///
    /// When the store step fails or this call is dropped (the store step may still
    /// land), or an eviction fails, nothing the cache holds is served, and nothing
    /// is cached, for the abandoned-write hold: the store answers meanwhile.
    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        if !self.supports_owners() {
            // Ending in the store would leave the ended sessions in a cache that
            // cannot tell whose they are.
            return Err(Error::backend(crate::session_store::Unsupported {
                store: std::any::type_name::<Self>(),
                what: "session owners (its cache or its store keeps no owner index)",
            }));
        }
        let mut stripes = Vec::with_capacity(self.shared.stripes.len());
        for stripe in self.shared.stripes.iter() {
            stripes.push(stripe.lock.lock().await);
        }
        self.shared.endings.fetch_add(1, Ordering::AcqRel);
        let mut guard = HoldAll {
            shared: &self.shared,
            hold: self.hold,
            done: false,
        };
        // Before too: were this call dropped after the store step, no ended
        // session would be left in the cache.
        self.evict_owned(owner).await?;
        let ended = self.store.end_owned(owner, ending).await;
        let evicted = self.evict_owned(owner).await;
        guard.done = ended.is_ok() && evicted.is_ok();
        drop(guard);
        drop(stripes);
        let ended = ended?;
        evicted?;
        Ok(ended)
    }
}

#[maybe_async::maybe_async]
impl<Cache: SessionStore, Store: SessionStore> CachingSessionStore<Cache, Store> {
    /// Drops every cached session of `owner`; called with every stripe lock held.
    async fn evict_owned(&self, owner: &Owner) -> Result<()> {
        let evicted = self.cache.end_owned(owner, Ending::All).await;
        if let Err(err) = &evicted {
            self.report(CacheOp::Evict, None, err);
        }
        evicted.map(drop)
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
    /// never served either way. Then every suspect entry is evicted again, whatever
    /// its backoff: suspects never outlast a pass once the cache answers. (An id stops
    /// being suspect only when an eviction succeeds: the stale entry's own expiry is
    /// not known, and may be later than any record written since.)
    async fn delete_expired(&self) -> Result<usize> {
        let deleted = self.store.delete_expired().await?;
        let cached = self.cache.delete_expired().await;
        if let Err(err) = cached {
            self.report(CacheOp::DeleteExpired, None, &err);
        }
        let now = Instant::now();
        for stripe in self.shared.stripes.iter() {
            stripe.residency.lock().prune(now);
            if stripe.suspects.load(Ordering::Acquire) == 0 {
                continue;
            }
            let ids: Vec<Id> = stripe.lock.lock().await.0.keys().copied().collect();
            for id in ids {
                let mut ordered = self.ordered(id).await;
                ordered.done = true;
                if ordered.is_suspect() {
                    let _ = self.evict(&mut ordered, CacheOp::Evict).await;
                }
            }
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
            lifetime: self.lifetime,
            stripe_capacity: self.stripe_capacity,
            hold: self.hold,
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
                &self
                    .shared
                    .stripes
                    .iter()
                    .map(|s| s.suspects.load(Ordering::Relaxed))
                    .sum::<usize>(),
            )
            .field("on_cache_error", &self.on_error.is_some())
            .finish()
    }
}
