//! [`Session`]: the per-request handle on one session.

use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::{de::DeserializeOwned, Serialize};
use time::{Duration, OffsetDateTime};

use crate::{
    session::expiry::{
        created_at, encode_policy, has_no_user_values, is_reserved, set_created_at, Expiry,
        SessionConfig, CREATED_KEY, EXPIRY_KEY, MOVED_KEY,
    },
    session::{
        encode_value, random_id, Ending, Handle, Id, OwnedSession, Owner, Ownership, Record,
    },
    session_store::{
        Error, Result, SessionFinished, SessionGone, SessionStore, Update, WriteConflict,
    },
};

// The state lock is held while the record loads, so that racing clones load it once:
// in async mode that spans an await, which needs an async mutex; blocking mode blocks.
#[cfg(not(feature = "sync"))]
type StateLock = async_lock::Mutex<State>;
#[cfg(feature = "sync")]
type StateLock = parking_lot::Mutex<State>;

/// `None` until the first access loads the record.
type State = Option<Loaded>;

/// A handle on one session for the length of a request: typed values in, typed values
/// out, written back only when something changed.
///
/// - **Cheap to clone**: clones share one state behind an [`Arc`], so a framework can
///   hand one to the handler and keep one for after it.
/// - **Lazy**: the record is loaded from the store on the first access, once, even
///   when clones race for it (they wait for the one load). A request that never
///   touches its session costs no store call.
/// - **Never the client's id for a new session**: an id that the store does not know
///   (unknown, expired, forged) yields an empty session under a freshly drawn id.
/// - **Tracked**: [`insert`](Self::insert), [`remove`](Self::remove) and
///   [`clear`](Self::clear) mark the session modified only when they change it;
///   [`SessionManager::finish`](crate::SessionManager::finish) writes only a modified
///   session (or one whose sliding expiry is due for a refresh).
///
/// In async mode every method is `async` and holds no blocking lock across an
/// `.await`; with the `sync` feature they block. Errors come from the store, or are
/// [`Error::Decode`] for a value read as a type it was not written as; nothing here
/// panics on bad input.
///
/// # Concurrent requests
///
/// One browser often sends several requests of one session at once. Each handle
/// records its request's changes key by key, and writes them with the store's
/// conditional [`update`](SessionStore::update), over the version it loaded:
///
/// - **No lost update.** When another request wrote first, the handle loads the newer
///   record, applies its own changes over it (keys it did not touch keep the other
///   request's values; on a key both changed, the later write wins) and tries again,
///   up to 64 times, then fails with a [`WriteConflict`].
/// - **Atomic steps.** [`update`](Self::update) runs its function again on the newer
///   value, so concurrent counters, carts and rate limits never lose a step.
/// - **No undone logout.** A session deleted ([`flush`](Self::flush),
///   [`delete`](Self::delete)), expired, or moved by [`cycle_id`](Self::cycle_id)
///   under a request is never written back: the request's changes are dropped and
///   its response sends no cookie, so it cannot replace or remove the one the
///   logout or login response set. The handler is told: changes, [`save`](Self::save)
///   and [`update`](Self::update) then fail with [`SessionGone`].
/// - **Emptying is not ending.** A session left without values is written like any
///   other and stays, empty, until it expires, so a request that stores values in it
///   meanwhile keeps them; only `flush` and `delete` end a session for everyone.
/// - **A login takes effect with its response.** `cycle_id` moves the session when
///   the request is finished; a request that fails leaves it as it found it.
/// - **Cookies only when they change.** The response sets the cookie for a new id,
///   a removal, or a `Max-Age` its write moved, never for an id found moved.
/// - **Finished is finished.** Once its request is finished, a session (or a clone
///   of it kept by a spawned task) refuses changes with [`SessionFinished`].
///
/// This needs a store whose `update` is atomic, as every store in this crate's is.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use portable_sessions::{session::{Expiry, Session}, MemoryStore};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let store = Arc::new(MemoryStore::default());
///
/// // A request without a session cookie.
/// let session = Session::new(store.clone(), None, Expiry::OnSessionEnd.into());
/// let visits = session.get::<u32>("visits").await?.unwrap_or(0);
/// session.insert("visits", &(visits + 1)).await?;
/// session.save().await?;
/// let id = session.id().await?.expect("saved, so stored under an id");
///
/// // The next request carries the id back.
/// let session = Session::new(store, Some(id), Expiry::OnSessionEnd.into());
/// let visits = session.get::<u32>("visits").await?;
/// assert_eq!(visits, Some(1));
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn SessionStore>,
    config: SessionConfig,
    /// The well-formed ids the request's session cookies carried, in order: a browser
    /// sends same-named cookies of other paths or a parent domain too.
    incoming: Vec<Id>,
    /// The request carried a session cookie, well-formed or not, and a removal
    /// cookie can only delete the one this manager set: every value was tried, and
    /// the cookie has a `Path` to aim the removal at.
    removable: bool,
    /// The request was finished: changes are refused from then on. A commit sets it
    /// under the state lock, so a change that takes the lock after it sees it;
    /// `abandon` sets it without the lock (a change under way then completes).
    finished: std::sync::atomic::AtomicBool,
    state: StateLock,
}

struct Loaded {
    /// The session as this request sees it: the record as last loaded or written,
    /// with `changes` applied.
    record: Record,
    /// `record.id` names a record in the store, as far as this handle knows.
    stored: bool,
    /// The values changed since they were loaded or last written.
    modified: bool,
    /// What this request changed since the last write, key by key: what a write that
    /// lost a race applies again over the newer record.
    changes: Changes,
    /// A write reached the store through this handle.
    written: bool,
    /// The stored session went away under this request (deleted, expired, or moved
    /// by another request's `cycle_id`): nothing is written and no cookie is sent.
    gone: bool,
    /// The expiry date of the record as loaded: a write that moves it moves the
    /// cookie's `Max-Age` too.
    loaded_expiry: Option<OffsetDateTime>,
    /// The expiry policy of the record as loaded: a write that changes it
    /// ([`Session::set_expiry`]) sends the cookie again, `Max-Age` or none.
    loaded_policy: Option<Expiry>,
    /// A [`Session::cycle_id`] asked for and not yet written: it takes effect with
    /// the next write (the commit, or an explicit save), never before.
    rotation: Option<Rotation>,
    /// An id the request carried named a record this build cannot read (corrupt,
    /// or of a newer format during a rolling deploy): its cookie is never removed.
    unreadable: bool,
    /// This request gave the session an owner: once written, the owner's sessions
    /// beyond the configured limit are ended.
    limit_due: bool,
}

/// A pending move to a new id.
struct Rotation {
    /// The id drawn for the session.
    id: Id,
    /// The changes made since the move was asked for: what a login racing a logout
    /// stores in a new session, when the old one turns out to be gone.
    since: Changes,
}

impl Loaded {
    /// Marks everything written as of `version`.
    fn written(&mut self, version: u64) {
        self.record.version = version;
        // A move still waiting is still to be written.
        self.modified = self.rotation.is_some();
        self.changes = Changes::default();
        self.written = true;
    }

    /// Takes `record`, the session written under its new id, as the session: the
    /// pending move is done.
    fn moved_to(&mut self, record: Record) {
        let version = record.version;
        self.record = record;
        self.stored = true;
        self.rotation = None;
        self.written(version);
    }

    /// Records a change of `key` (`None`: removed) by this request.
    fn change(&mut self, key: &str, value: Option<Vec<u8>>) {
        if let Some(rotation) = &mut self.rotation {
            rotation.since.set(key, value.clone());
        }
        self.changes.set(key, value);
        self.modified = true;
    }

    /// Records this request's change of the session's owner.
    fn change_owner(&mut self, ownership: Option<Ownership>) {
        if let Some(rotation) = &mut self.rotation {
            rotation.since.ownership = Some(ownership.clone());
        }
        self.record.ownership = ownership.clone();
        self.changes.ownership = Some(ownership);
        self.modified = true;
    }

    /// Records that this request removed every value.
    fn change_all(&mut self) {
        if let Some(rotation) = &mut self.rotation {
            rotation.since.clear();
        }
        self.changes.clear();
        self.modified = true;
    }

    /// Leaves the values readable under `id`, a fresh id, as a session that is not
    /// stored and has nothing to write: after its record was deleted or ended.
    fn unstored(&mut self, id: Id) {
        self.record.id = id;
        self.stored = false;
        self.modified = false;
        self.changes = Changes::default();
        self.rotation = None;
    }

    /// Drops this request's changes: the session is no longer there to change.
    fn gone(&mut self) {
        self.gone = true;
        self.stored = false;
        self.modified = false;
        self.changes = Changes::default();
        self.rotation = None;
    }
}

/// What a write runs again on the newer record after a conflict: the step of an
/// atomic [`Session::update`], or nothing.
type Recompute<'r> = dyn FnMut(&mut Record) -> Result<()> + Send + 'r;

/// The error for a change that was not kept because the session went away.
fn gone() -> Error {
    Error::backend(SessionGone)
}

/// A request's changes to a session's values, by key.
#[derive(Default, Clone)]
struct Changes {
    /// Every value was removed first ([`Session::clear`]).
    cleared: bool,
    /// Each key set (`Some`) or removed (`None`), last change only.
    keys: BTreeMap<String, Option<Vec<u8>>>,
    /// The owner set (`Some(Some)`) or taken away (`Some(None)`).
    ownership: Option<Option<Ownership>>,
}

impl Changes {
    fn set(&mut self, key: &str, value: Option<Vec<u8>>) {
        self.keys.insert(key.to_owned(), value);
    }

    fn clear(&mut self) {
        self.cleared = true;
        // What was set before the clear is gone with it; the crate's own keys stay.
        self.keys.retain(|key, _| is_reserved(key));
    }

    /// Applies the changes over `base`, a newer version of the record: keys this
    /// request did not touch keep their values there.
    fn apply(&self, mut base: Record) -> Record {
        if let Some(ownership) = &self.ownership {
            base.ownership = match (ownership, base.ownership.take()) {
                // The same owner already: it keeps the date it got it.
                (Some(new), Some(old)) if new.owner == old.owner => Some(old),
                (new, _) => new.clone(),
            };
        }
        if self.cleared {
            let user: Vec<String> = base
                .keys()
                .filter(|key| !is_reserved(key))
                .map(str::to_owned)
                .collect();
            for key in user {
                base.remove(&key);
            }
        }
        for (key, value) in &self.keys {
            match value {
                Some(bytes) => {
                    base.insert_raw(key.clone(), bytes.clone());
                }
                None => {
                    base.remove(key);
                }
            }
        }
        base
    }
}

/// How many conditional writes one session write tries before it gives up with a
/// [`WriteConflict`]: each refused try means another write of the same session
/// succeeded, so this many requests of one session would have to write at once.
pub(crate) const MAX_WRITE_ATTEMPTS: u32 = 64;

/// How long the old id of a session moved by [`Session::cycle_id`] stays marked as
/// moved: requests still in flight with it find it moved, so they write nothing and
/// send no cookie that would replace the new one. After that it expires.
const MOVED_GRACE: Duration = Duration::minutes(2);

/// What a response must do with the session cookie after the handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CookieAction {
    /// Send nothing: the client's cookie is right as it is.
    Keep,
    /// Send the id, with this `Max-Age` (`None`: a browser-session cookie).
    Set { id: Id, max_age: Option<Duration> },
    /// Tell the client to drop its cookie.
    Remove,
}

impl Session {
    /// Makes the handle for a request that carried `id` (or none), over `store`.
    ///
    /// Nothing is loaded until the session is first used.
    pub fn new(store: Arc<dyn SessionStore>, id: Option<Id>, config: SessionConfig) -> Self {
        Self::from_request(store, id.into_iter().collect(), id.is_some(), config)
    }

    /// Like [`new`](Self::new), with the well-formed ids the request's cookies
    /// carried (tried in order: the first that loads is the session), and whether a
    /// cookie that does not lead to a session is to be removed (a malformed one
    /// parses to no id, but must still be removed).
    pub(crate) fn from_request(
        store: Arc<dyn SessionStore>,
        incoming: Vec<Id>,
        removable: bool,
        config: SessionConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                incoming,
                removable,
                finished: std::sync::atomic::AtomicBool::new(false),
                state: StateLock::new(None),
            }),
        }
    }

    /// Returns the configuration this session was made with.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    fn fresh(&self, now: OffsetDateTime) -> Result<Loaded> {
        // A freshly drawn id: never the one the client sent.
        let mut record = Record::with_id(random_id()?, now);
        set_created_at(&mut record, now);
        Ok(Loaded {
            record,
            stored: false,
            modified: false,
            changes: Changes::default(),
            written: false,
            gone: false,
            loaded_expiry: None,
            loaded_policy: None,
            rotation: None,
            unreadable: false,
            limit_due: false,
        })
    }

    /// Returns a guard that ends the request without a write when it is dropped (after
    /// a successful commit, that changes nothing): for a framework layer whose request
    /// future may be dropped (the client went away) or unwind (the handler panicked).
    #[cfg(all(not(feature = "sync"), any(feature = "axum", feature = "actix-web")))]
    pub(crate) fn abandon_on_drop(&self) -> AbandonOnDrop {
        AbandonOnDrop(self.clone())
    }

    /// Ends the request without writing anything: changes from now on are refused.
    pub(crate) fn abandon(&self) {
        self.inner
            .finished
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Refuses changes once the request is finished. Called with the state lock held.
    fn check_open(&self) -> Result<()> {
        if self
            .inner
            .finished
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::backend(SessionFinished));
        }
        Ok(())
    }

    /// Turns a record the store returned for an incoming id into this request's
    /// state; `None` if the session has outlived its lifetime cap or is unreadable.
    fn adopt(&self, mut record: Record, now: OffsetDateTime) -> Option<Loaded> {
        let mut changes = Changes::default();
        match created_at(&record) {
            Ok(Some(created)) if self.inner.config.is_past_lifetime(created, now) => {
                return None;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                // A record written by something else: its lifetime starts now, and is
                // written down at the next write.
                set_created_at(&mut record, now);
                changes.set(CREATED_KEY, record.get_raw(CREATED_KEY).map(<[u8]>::to_vec));
            }
            Err(err) => {
                log::warn!(
                    target: "portable_sessions::session",
                    "session {:?} has an unreadable creation time, starting a new session: {}",
                    record.id,
                    err.report()
                );
                return None;
            }
        }
        Some(Loaded {
            loaded_expiry: Some(record.expiry_date),
            loaded_policy: Some(self.inner.config.policy(&record)),
            record,
            stored: true,
            modified: !changes.keys.is_empty(),
            changes,
            written: false,
            gone: false,
            rotation: None,
            unreadable: false,
            limit_due: false,
        })
    }

    /// Sets the expiry date a write made now gives the record, by the session's own
    /// policy or the configuration's. A date already past is logged: the write makes
    /// a record that never loads.
    fn stamp_expiry(&self, record: &mut Record, now: OffsetDateTime) -> Result<()> {
        record.expiry_date = self.inner.config.write_date(record, now)?;
        if let Some(ownership) = &mut record.ownership {
            ownership.written_at = now;
        }
        if record.expiry_date <= now {
            let policy = self.inner.config.policy(record);
            log::warn!(
                target: "portable_sessions::session",
                "session {:?} is written with an expiry date already past ({}, by {policy:?}): \
                 it will not load again; check Expiry::AtDateTime and the lifetime cap",
                record.id,
                record.expiry_date
            );
        }
        Ok(())
    }
}

/// Ends its session's request without a write when dropped; see
/// [`Session::abandon_on_drop`].
#[cfg(all(not(feature = "sync"), any(feature = "axum", feature = "actix-web")))]
pub(crate) struct AbandonOnDrop(Session);

#[cfg(all(not(feature = "sync"), any(feature = "axum", feature = "actix-web")))]
impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// Returns `true` for a record not worth storing as a new session: no values of the
/// application's, and no owner.
fn nothing_to_store(record: &Record) -> bool {
    has_no_user_values(record) && record.ownership.is_none()
}

/// Returns `true` for the record that [`Session::cycle_id`] leaves under an old id.
fn is_moved(record: &Record) -> bool {
    record.contains_key(MOVED_KEY)
}

#[maybe_async::maybe_async]
impl Session {
    /// Loads the record into `state` on first use and returns it: the first incoming
    /// id that loads a usable session. When none does, a fresh session; or, when one
    /// of them was moved away by a login under way, a gone one (see
    /// [`cycle_id`](Self::cycle_id)): a request in flight during that login must not
    /// start a session whose cookie would replace the new one.
    async fn loaded<'s>(&self, state: &'s mut State) -> Result<&'s mut Loaded> {
        let loaded = match state.take() {
            Some(loaded) => loaded,
            None => {
                let now = self.inner.config.now();
                let mut adopted = None;
                let mut moved = false;
                let mut unreadable = false;
                for id in &self.inner.incoming {
                    let found = match self.inner.store.load(id).await {
                        Ok(found) => found,
                        // Unreadable: corrupt, or written in a format this build does
                        // not read. Left as it is in the store, and logged; the
                        // request goes on as if the cookie had not named it.
                        Err(err @ Error::Decode(_)) => {
                            log::warn!(
                                target: "portable_sessions::session",
                                "session {id:?} cannot be read, so the request does not use it: {}",
                                err.report()
                            );
                            unreadable = true;
                            continue;
                        }
                        Err(err) => return Err(err),
                    };
                    match found {
                        None => {}
                        Some(record) if is_moved(&record) => moved = true,
                        Some(record) => {
                            adopted = self.adopt(record, now);
                            if adopted.is_some() {
                                break;
                            }
                        }
                    }
                }
                match adopted {
                    Some(loaded) => loaded,
                    None => {
                        let mut fresh = self.fresh(now)?;
                        fresh.unreadable = unreadable;
                        if moved {
                            fresh.gone();
                        }
                        fresh
                    }
                }
            }
        };
        Ok(state.insert(loaded))
    }

    /// Like [`loaded`](Self::loaded), for a change: refused once the request is
    /// finished, and when the session is gone (a change would be kept nowhere).
    async fn changeable<'s>(&self, state: &'s mut State) -> Result<&'s mut Loaded> {
        self.check_open()?;
        let loaded = self.loaded(state).await?;
        if loaded.gone {
            return Err(gone());
        }
        Ok(loaded)
    }

    /// Writes the session: creates it when the store does not have it yet, moves it
    /// when a [`cycle_id`](Self::cycle_id) is pending, and otherwise writes it
    /// conditionally on the version it was loaded at. When another write came first,
    /// loads the newer record, applies this request's changes over it, runs
    /// `recompute` on the result and tries again, up to [`MAX_WRITE_ATTEMPTS`]
    /// times. When the session is gone, drops the changes and fails with
    /// [`SessionGone`].
    ///
    /// A session left without values is written like any other: it stays, empty,
    /// until it expires, so that a request that stored values in it meanwhile merges
    /// over it rather than losing them. Only [`flush`](Self::flush) and
    /// [`delete`](Self::delete) end a session for every request.
    async fn write(&self, loaded: &mut Loaded, recompute: &mut Recompute<'_>) -> Result<()> {
        self.write_record(loaded, recompute).await?;
        if let (true, Some(limit)) = (loaded.limit_due, self.inner.config.owner_limit()) {
            loaded.limit_due = false;
            if let Some(ownership) = &loaded.record.ownership {
                let owner = ownership.owner.clone();
                // The login is written: a failure here leaves the limit to the next
                // login, and is logged, never turned into a failed login.
                if let Err(err) = self.enforce_limit(loaded, &owner, limit).await {
                    log::warn!(
                        target: "portable_sessions::session",
                        "the owner limit of {limit} could not be applied after a login \
                         (the next login applies it): {}",
                        err.report()
                    );
                }
            }
        }
        Ok(())
    }

    /// Ends `owner`'s sessions beyond `limit`, after this session's login was written.
    async fn enforce_limit(&self, loaded: &mut Loaded, owner: &Owner, limit: usize) -> Result<()> {
        let ended = self
            .inner
            .store
            .end_owned(owner, Ending::AllButNewest(limit))
            .await?;
        // This very session was the oldest of a race of logins: it is over, and its
        // cookie is not sent. (Ended by another login's limit step, it is found gone.)
        let mine = Handle::of(&loaded.record.id);
        if ended.contains(&mine) || self.inner.store.load(&loaded.record.id).await?.is_none() {
            loaded.gone();
        }
        Ok(())
    }

    /// [`write`](Self::write) without the owner limit.
    async fn write_record(&self, loaded: &mut Loaded, recompute: &mut Recompute<'_>) -> Result<()> {
        if loaded.gone {
            return Err(gone());
        }
        let now = self.inner.config.now();
        if !loaded.stored {
            return self.create(loaded, now).await;
        }
        if loaded.rotation.is_some() {
            return self.rotate(loaded, recompute, now).await;
        }
        for _ in 0..MAX_WRITE_ATTEMPTS {
            self.stamp_expiry(&mut loaded.record, now)?;
            let outcome = self.inner.store.update(&loaded.record).await?;
            match outcome {
                Update::Written(version) => {
                    loaded.written(version);
                    return Ok(());
                }
                Update::Gone => {
                    loaded.gone();
                    return Err(gone());
                }
                Update::Conflict => {
                    let newer = self.inner.store.load(&loaded.record.id).await?;
                    match newer {
                        Some(newer) if !is_moved(&newer) => {
                            let mut merged = loaded.changes.apply(newer);
                            recompute(&mut merged)?;
                            loaded.record = merged;
                        }
                        _ => {
                            loaded.gone();
                            return Err(gone());
                        }
                    }
                }
            }
        }
        Err(Error::backend(WriteConflict {
            attempts: MAX_WRITE_ATTEMPTS,
        }))
    }

    /// Stores a session the store does not have yet, under its id or, on a
    /// collision, one the store draws; one without values is not worth storing.
    async fn create(&self, loaded: &mut Loaded, now: OffsetDateTime) -> Result<()> {
        if nothing_to_store(&loaded.record) {
            loaded.modified = false;
            loaded.changes = Changes::default();
            return Ok(());
        }
        self.stamp_expiry(&mut loaded.record, now)?;
        self.inner.store.create(&mut loaded.record).await?;
        loaded.stored = true;
        let version = loaded.record.version;
        loaded.written(version);
        Ok(())
    }

    /// Carries out a pending [`cycle_id`](Self::cycle_id): creates the session under
    /// its new id, then replaces the old record, conditionally on the version this
    /// request last saw, by a marker that expires within [`MOVED_GRACE`]. Values
    /// that other requests wrote to the old id before that are carried over. When
    /// the old session turns out to be gone (a concurrent logout), the new record is
    /// deleted, and the changes made since `cycle_id` are stored as a new session:
    /// nothing of the ended one comes back. On an error the old session is as it was.
    async fn rotate(
        &self,
        loaded: &mut Loaded,
        recompute: &mut Recompute<'_>,
        now: OffsetDateTime,
    ) -> Result<()> {
        let Some(new_id) = loaded.rotation.as_ref().map(|rotation| rotation.id) else {
            return Ok(());
        };
        let mut moved = loaded.record.clone();
        moved.id = new_id;
        moved.version = 0;
        self.stamp_expiry(&mut moved, now)?;
        self.inner.store.create(&mut moved).await?;

        if !self.inner.store.atomic_update() {
            // A store whose update is not one conditional step (load, compare,
            // save) cannot keep the marker's promises, and one that does not
            // expire records by itself would never free it: the old id is
            // deleted, after what other requests wrote to it meanwhile is
            // carried over (as far as a store without conditional writes can).
            if let Some(ended) = self
                .carry_over_or_end(loaded, recompute, &mut moved, now)
                .await
            {
                return ended;
            }
            let deleted = self.inner.store.delete(&loaded.record.id).await;
            if let Err(err) = deleted {
                // The delete may have landed all the same: then the move is done,
                // and discarding the new record would end the session under both.
                let found = self.inner.store.load(&loaded.record.id).await;
                if !matches!(found, Ok(None)) {
                    self.discard(&moved.id).await;
                    return Err(err);
                }
            }
            loaded.moved_to(moved);
            return Ok(());
        }

        let grace = (now + MOVED_GRACE).min(loaded.record.expiry_date);
        let mut marker = Record::with_id(loaded.record.id, grace);
        // A random value of this move's own (never the new id, which whoever holds
        // the old one must not learn): it tells this marker from another's when the
        // outcome of writing it is unknown.
        let nonce = random_id()?.to_bytes().to_vec();
        marker.insert_raw(MOVED_KEY, nonce.clone());
        for _ in 0..MAX_WRITE_ATTEMPTS {
            marker.version = loaded.record.version;
            let retired = self.inner.store.update(&marker).await;
            let outcome = match retired {
                Ok(outcome) => outcome,
                Err(err) => {
                    // The marker may have landed all the same (a reply lost for
                    // good): then the move is done, and deleting the new record
                    // would end the session under both ids.
                    let found = self.inner.store.load(&loaded.record.id).await;
                    match found {
                        Ok(Some(old)) if old.get_raw(MOVED_KEY) == Some(nonce.as_slice()) => {
                            Update::Written(old.version)
                        }
                        // Ended or moved by another request: this marker, written
                        // conditionally, can no longer land.
                        Ok(None) => Update::Gone,
                        Ok(Some(old)) if is_moved(&old) => Update::Gone,
                        // Still unknown (the write may be in flight): the new
                        // record is left to expire unused, never deleted, since
                        // the marker may yet land.
                        Ok(Some(_)) | Err(_) => return Err(err),
                    }
                }
            };
            match outcome {
                Update::Written(_) => {
                    loaded.moved_to(moved);
                    return Ok(());
                }
                Update::Gone => {
                    self.discard(&moved.id).await;
                    return self.restart(loaded, recompute, now).await;
                }
                Update::Conflict => {
                    // Another request wrote the old record first: carry its values
                    // over to the new one, then retire the old one again.
                    if let Some(ended) = self
                        .carry_over_or_end(loaded, recompute, &mut moved, now)
                        .await
                    {
                        return ended;
                    }
                }
            }
        }
        self.discard(&moved.id).await;
        Err(Error::backend(WriteConflict {
            attempts: MAX_WRITE_ATTEMPTS,
        }))
    }

    /// During a move, reloads the old record and, when another request wrote it since
    /// this one loaded it, applies this request's changes over it (and the step
    /// `recompute` makes) and rewrites the new record with the result. `Ok(false)`:
    /// the old session is gone (ended or moved). On an error the caller discards the
    /// new record.
    async fn carry_over(
        &self,
        loaded: &mut Loaded,
        recompute: &mut Recompute<'_>,
        moved: &mut Record,
    ) -> Result<bool> {
        let newer = self.inner.store.load(&loaded.record.id).await?;
        let Some(newer) = newer.filter(|newer| !is_moved(newer)) else {
            return Ok(false);
        };
        if newer.version == loaded.record.version {
            return Ok(true);
        }
        let mut merged = loaded.changes.apply(newer);
        recompute(&mut merged)?;
        loaded.record = merged;
        let mut next = loaded.record.clone();
        next.id = moved.id;
        next.version = moved.version;
        next.expiry_date = moved.expiry_date;
        match self.inner.store.update(&next).await? {
            Update::Written(version) => {
                *moved = next;
                moved.version = version;
                Ok(true)
            }
            Update::Conflict | Update::Gone => Err(Error::backend(
                "the new record of a cycle_id changed or vanished under it",
            )),
        }
    }

    /// [`carry_over`](Self::carry_over) for a move under way: `None` to go on with
    /// the move; otherwise the move's end, after the new record was discarded (a new
    /// session when the old one is gone, or the error).
    async fn carry_over_or_end(
        &self,
        loaded: &mut Loaded,
        recompute: &mut Recompute<'_>,
        moved: &mut Record,
        now: OffsetDateTime,
    ) -> Option<Result<()>> {
        let carried = self.carry_over(loaded, recompute, moved).await;
        if let Ok(true) = carried {
            return None;
        }
        self.discard(&moved.id).await;
        Some(match carried {
            Ok(_) => self.restart(loaded, recompute, now).await,
            Err(err) => Err(err),
        })
    }

    /// After a move found its session ended: starts a new session under a fresh id
    /// with only the changes made since `cycle_id` (and the step `recompute` makes,
    /// for an atomic update under way), and stores it if that leaves it any values.
    async fn restart(
        &self,
        loaded: &mut Loaded,
        recompute: &mut Recompute<'_>,
        now: OffsetDateTime,
    ) -> Result<()> {
        let since = loaded
            .rotation
            .as_ref()
            .map(|rotation| rotation.since.clone())
            .unwrap_or_default();
        let mut fresh = self.fresh(now)?;
        fresh.record = since.apply(fresh.record);
        recompute(&mut fresh.record)?;
        fresh.changes = since;
        fresh.modified = true;
        // A login's new session is still a login: the owner limit applies to it.
        fresh.limit_due = loaded.limit_due;
        // Only a new session that was stored (or had nothing to store) replaces
        // this one: on an error the move is still pending, and is tried again.
        self.create(&mut fresh, now).await?;
        *loaded = fresh;
        Ok(())
    }

    /// Rewrites an unchanged session to move its expiry date forward, once and only
    /// over the version it was loaded at: a refresh never revives a session, and one
    /// that loses to another write has nothing to do (that write moved the date).
    async fn refresh(&self, loaded: &mut Loaded, now: OffsetDateTime) -> Result<()> {
        let mut refreshed = loaded.record.clone();
        self.stamp_expiry(&mut refreshed, now)?;
        let outcome = self.inner.store.update(&refreshed).await?;
        match outcome {
            Update::Written(version) => {
                loaded.record = refreshed;
                loaded.written(version);
            }
            Update::Conflict => {}
            Update::Gone => loaded.gone(),
        }
        Ok(())
    }

    /// Deletes a record that `cycle_id` made and could not use; a failure is logged,
    /// since the caller is already reporting another outcome. The id was never sent
    /// to anyone, and the record expires like any other.
    async fn discard(&self, id: &Id) {
        let deleted = self.inner.store.delete(id).await;
        if let Err(err) = deleted {
            log::warn!(
                target: "portable_sessions::session",
                "could not delete the unused record {id:?} of an interrupted cycle_id: {}",
                err.report()
            );
        }
    }

    /// Returns the value stored under `key`, decoded as a `T`, or `None` if there is
    /// none.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`] if the value was not written as a `T`, or the store's
    /// error if loading the session fails.
    pub async fn get<T: DeserializeOwned + Serialize>(&self, key: &str) -> Result<Option<T>> {
        if is_reserved(key) {
            return Ok(None);
        }
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        loaded.record.get(key)
    }

    /// Stores `value` under `key`, replacing what was there; the session is marked
    /// modified only if the stored bytes change. The value is taken by value or by
    /// reference (`insert("n", 1)` and `insert("n", &n)` store the same bytes).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Encode`] if `value` cannot be serialized or `key` starts with
    /// a NUL character (reserved for this crate), a [`SessionGone`] if the session
    /// ended or moved under this request (nothing will be stored), a
    /// [`SessionFinished`] once the request is finished, or the store's error if
    /// loading the session fails. On error the session is unchanged.
    pub async fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<()> {
        check_key(key)?;
        let bytes = encode_value(&value)?;
        // Encoded: the future holds no `T` across its awaits.
        drop(value);
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        if loaded.record.get_raw(key) != Some(bytes.as_slice()) {
            loaded.record.insert_raw(key, bytes.clone());
            loaded.change(key, Some(bytes));
        }
        Ok(())
    }

    /// Replaces the value under `key` with `f` of the current one, atomically: for
    /// counters, carts and rate limits, where concurrent requests of one session
    /// must not lose a step. Returns the value written.
    ///
    /// The session (with any other change this request made) is written at once,
    /// conditionally; if another request wrote the session first, `f` runs again on
    /// the newer value, so `f` must have no effect beyond its result. A session not
    /// stored yet is only changed here, and stored when it is finished or saved.
    /// When the session turns out to be gone (a concurrent logout or login), nothing
    /// is written and the call fails with [`SessionGone`].
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`] if the current value is not a `T`, [`Error::Encode`]
    /// for a reserved key or a value that cannot be serialized, a
    /// [`WriteConflict`] after too many concurrent writes, a [`SessionGone`] when the
    /// session ended or moved under this request, a [`SessionFinished`] once the
    /// request is finished, or the store's error. On error the session is as it was
    /// before the call (or, when gone, empty and unstored).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use portable_sessions::{session::{Expiry, Session}, MemoryStore, SessionStore};
    ///
    /// # #[maybe_async::maybe_async]
    /// # async fn run() -> portable_sessions::session_store::Result<()> {
    /// let store = Arc::new(MemoryStore::default());
    /// let session = Session::new(store.clone(), None, Expiry::OnSessionEnd.into());
    /// session.insert("user", "alice").await?;
    /// session.save().await?;
    /// let id = session.id().await?;
    ///
    /// // Two requests of the same session count at once: neither step is lost.
    /// let first = Session::new(store.clone(), id, Expiry::OnSessionEnd.into());
    /// let second = Session::new(store.clone(), id, Expiry::OnSessionEnd.into());
    /// let a = first.update("visits", |n: Option<u64>| n.unwrap_or(0) + 1).await?;
    /// let b = second.update("visits", |n: Option<u64>| n.unwrap_or(0) + 1).await?;
    /// assert_eq!((a, b), (1, 2));
    /// # Ok(())
    /// # }
    /// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
    /// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
    /// ```
    pub async fn update<T, F>(&self, key: &str, mut f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut(Option<T>) -> T + Send,
    {
        check_key(key)?;
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        let mut result = None;
        let mut apply = |record: &mut Record| -> Result<()> {
            let next = f(record.get::<T>(key)?);
            let bytes = encode_value(&next)?;
            record.insert_raw(key, bytes);
            result = Some(next);
            Ok(())
        };
        let before = (loaded.record.clone(), loaded.modified);
        apply(&mut loaded.record)?;
        loaded.modified = true;
        if loaded.stored {
            // The step is written now, and is not one of the recorded changes: after a
            // conflict `apply` computes it again from the newer value, which a
            // recorded change would overwrite first.
            let written = self.write(loaded, &mut apply).await;
            if let Err(err) = written {
                // Not written: the session is as it was before the call (unless it
                // is gone, or a move found it ended and started a new one: never
                // put the old record back under a session that is not stored).
                if !loaded.gone && loaded.record.id == before.0.id {
                    (loaded.record, loaded.modified) = before;
                }
                return Err(err);
            }
        } else {
            // Not stored yet: the step waits for the session's creation.
            let bytes = loaded.record.get_raw(key).map(<[u8]>::to_vec);
            loaded.change(key, bytes);
        }
        result.ok_or_else(|| Error::encode("the update function never ran"))
    }

    /// Removes the value stored under `key` and returns it decoded as a `T`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`] if the value was not written as a `T`, in which case
    /// it stays in place (see [`remove_raw`](Self::remove_raw)), a [`SessionGone`] or
    /// [`SessionFinished`] as for [`insert`](Self::insert), or the store's error if
    /// loading the session fails.
    pub async fn remove<T: DeserializeOwned + Serialize>(&self, key: &str) -> Result<Option<T>> {
        if is_reserved(key) {
            return Ok(None);
        }
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        let value = loaded.record.get(key)?;
        if loaded.record.remove(key).is_some() {
            loaded.change(key, None);
        }
        Ok(value)
    }

    /// Removes the value stored under `key`, whatever its type, and returns its
    /// encoded bytes.
    ///
    /// # Errors
    ///
    /// Returns a [`SessionGone`] or [`SessionFinished`] as for
    /// [`insert`](Self::insert), or the store's error if loading the session fails.
    pub async fn remove_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if is_reserved(key) {
            return Ok(None);
        }
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        let removed = loaded.record.remove(key);
        if removed.is_some() {
            loaded.change(key, None);
        }
        Ok(removed)
    }

    /// Removes every value; the session keeps its id and its lifetime.
    ///
    /// An emptied session is not ended: it is written like any other, and stays,
    /// without values, until it expires, so that a request of the same session
    /// that stores values meanwhile keeps them (they are merged over the empty
    /// record). To end a session for every request, a logout, use
    /// [`flush`](Self::flush).
    ///
    /// # Errors
    ///
    /// Returns a [`SessionGone`] or [`SessionFinished`] as for
    /// [`insert`](Self::insert), or the store's error if loading the session fails.
    pub async fn clear(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        if !has_no_user_values(&loaded.record) {
            let created = created_at(&loaded.record)?;
            let policy = loaded.record.remove(EXPIRY_KEY);
            loaded.record.clear();
            set_created_at(
                &mut loaded.record,
                created.unwrap_or_else(|| self.inner.config.now()),
            );
            if let Some(policy) = policy {
                loaded.record.insert_raw(EXPIRY_KEY, policy);
            }
            loaded.change_all();
        }
        Ok(())
    }

    /// Returns `true` if the session holds no values.
    ///
    /// # Errors
    ///
    /// Returns the store's error if loading the session fails.
    pub async fn is_empty(&self) -> Result<bool> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        Ok(has_no_user_values(&loaded.record))
    }

    /// Gives this session an expiry policy of its own, in place of the
    /// configuration's ([`SessionConfig::expiry`]); `None` goes back to the
    /// configuration's. For "remember me": a login that asks to be remembered sets
    /// `Some(Expiry::OnInactivity(Duration::days(30)))` (a [`time::Duration`],
    /// re-exported as `portable_sessions::time`), one that does not keeps the
    /// browser-session cookie.
    ///
    /// The policy is kept in the record (under a reserved key the API does not
    /// show), so it holds for every later request of the session, across
    /// [`cycle_id`](Self::cycle_id) and [`clear`](Self::clear); only
    /// [`flush`](Self::flush) drops it. It is a change like any other: written with
    /// the session, merged with concurrent requests' changes, and it sends the
    /// cookie again with its new `Max-Age` (or none, for
    /// [`Expiry::OnSessionEnd`]). The lifetime cap
    /// ([`SessionConfig::with_max_lifetime`]) still applies.
    ///
    /// # Errors
    ///
    /// Returns a [`SessionGone`] if the session ended or moved under this request, a
    /// [`SessionFinished`] once the request is finished, or the store's error if
    /// loading the session fails. On error the session is unchanged.
    pub async fn set_expiry(&self, expiry: Option<Expiry>) -> Result<()> {
        let bytes = expiry.map(encode_policy);
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        if loaded.record.get_raw(EXPIRY_KEY) != bytes.as_deref() {
            match &bytes {
                Some(bytes) => loaded.record.insert_raw(EXPIRY_KEY, bytes.clone()),
                None => loaded.record.remove(EXPIRY_KEY),
            };
            loaded.change(EXPIRY_KEY, bytes);
        }
        Ok(())
    }

    /// Returns the policy this session expires by: its own, from
    /// [`set_expiry`](Self::set_expiry), or the configuration's.
    ///
    /// # Errors
    ///
    /// Returns the store's error if loading the session fails.
    pub async fn expiry(&self) -> Result<Expiry> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        Ok(self.inner.config.policy(&loaded.record))
    }

    /// Returns the moment the session expires: the stored record's expiry date, or,
    /// while this request has changes to write (or the session is not stored yet),
    /// the date a write made now would give it.
    ///
    /// # Errors
    ///
    /// Returns the store's error if loading the session fails, or
    /// [`Error::Decode`] if its creation time is unreadable.
    pub async fn expiry_date(&self) -> Result<OffsetDateTime> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        if loaded.stored && !loaded.modified {
            return Ok(loaded.record.expiry_date);
        }
        let config = &self.inner.config;
        config.write_date(&loaded.record, config.now())
    }

    /// Returns how long until the session expires (see
    /// [`expiry_date`](Self::expiry_date)); zero once it is past.
    ///
    /// # Errors
    ///
    /// As for [`expiry_date`](Self::expiry_date).
    pub async fn expiry_age(&self) -> Result<Duration> {
        let date = self.expiry_date().await?;
        Ok((date - self.inner.config.now()).max(Duration::ZERO))
    }

    /// Returns the id the session is stored under, or `None` while it is not stored
    /// (new and not yet saved, deleted, or gone under a concurrent request).
    ///
    /// # Errors
    ///
    /// Returns the store's error if loading the session fails.
    pub async fn id(&self) -> Result<Option<Id>> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        Ok(loaded.stored.then_some(loaded.record.id))
    }

    /// Returns `true` if the session has changes that are not written yet.
    ///
    /// A session that was never used is not modified; this does not load it.
    pub async fn is_modified(&self) -> bool {
        let state = self.inner.state.lock().await;
        state.as_ref().is_some_and(|loaded| loaded.modified)
    }

    /// Writes the session to the store now, modified or not: creates it when it is new,
    /// moves it when a [`cycle_id`](Self::cycle_id) is pending, and otherwise writes
    /// it over the version it was loaded at, merging with what other requests wrote
    /// meanwhile (see the type's docs), with an expiry date computed from now.
    ///
    /// Call it before answering when the answer depends on the change being kept:
    /// a change that [`finish`](crate::SessionManager::finish) finds it cannot keep
    /// (the session ended or moved meanwhile) is dropped there without an error,
    /// since the response is already made.
    ///
    /// # Errors
    ///
    /// Returns a [`SessionGone`] when the session ended or moved under this request
    /// (nothing was written), a [`SessionFinished`] once the request is finished,
    /// the store's error, or a [`WriteConflict`] after too many concurrent writes;
    /// the session then stays modified.
    pub async fn save(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        self.write(loaded, &mut |_| Ok(())).await
    }

    /// Deletes the session's record from the store.
    ///
    /// The values stay readable in this handle, under a freshly drawn id and
    /// unmodified: nothing is written back unless they change again, in which case
    /// they are stored as a new session. A deleted id is never used again. A pending
    /// [`cycle_id`](Self::cycle_id) is dropped with the record.
    ///
    /// # Errors
    ///
    /// Returns a [`SessionFinished`] once the request is finished, or the store's
    /// error; the session is then unchanged.
    pub async fn delete(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        self.check_open()?;
        let loaded = self.loaded(&mut state).await?;
        let fresh = random_id()?;
        if loaded.stored {
            self.inner.store.delete(&loaded.record.id).await?;
        }
        loaded.unstored(fresh);
        Ok(())
    }

    /// Ends the session: deletes its record from the store and starts over with no
    /// values, a fresh id and a new lifetime. Does not load the session first.
    ///
    /// Call it on logout. Requests of the session still in flight can no longer
    /// write it: their changes are dropped.
    ///
    /// # Errors
    ///
    /// Returns a [`SessionFinished`] once the request is finished, or the store's
    /// error; the session is then unchanged.
    pub async fn flush(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        self.check_open()?;
        let stored = match &*state {
            Some(loaded) => loaded
                .stored
                .then_some(loaded.record.id)
                .into_iter()
                .collect(),
            // Not loaded: whichever of the incoming ids is the session goes.
            None => self.inner.incoming.clone(),
        };
        let fresh = self.fresh(self.inner.config.now())?;
        for id in &stored {
            self.inner.store.delete(id).await?;
        }
        *state = Some(fresh);
        Ok(())
    }

    /// Moves the session to a freshly drawn id, against session fixation: call it
    /// when the user's privileges change, such as at login.
    ///
    /// The move takes effect with the request's response: when
    /// [`finish`](crate::SessionManager::finish) writes the session (or earlier,
    /// at an explicit [`save`](Self::save)). A request that fails, or whose finish
    /// never runs, leaves the session exactly as it found it, under the id the
    /// browser still holds. Until then [`id`](Self::id) gives the old id.
    ///
    /// The write creates the session under the new id (with its values and this
    /// request's changes) first; then it replaces the old record, conditionally on
    /// the version this request last saw, by a marker that expires within two
    /// minutes: requests still in flight with the old id write nothing (their
    /// changes fail with [`SessionGone`]) and send no cookie, so they can neither
    /// revive the old id nor replace the new cookie. Values those requests wrote
    /// before the move are carried over to the new id. If the session was deleted or
    /// moved meanwhile (a concurrent logout or login), the new record is deleted too,
    /// and only the changes made since `cycle_id` are stored, as a new session under
    /// a fresh id: a login then keeps what it stored, and nothing of the ended
    /// session comes back.
    ///
    /// An atomic [`update`](Self::update) made while the move waits is a write, and
    /// carries the move out at once, with its step (writing the step to the old id
    /// would show the changes made since `cycle_id` to whoever holds that id): make
    /// it before `cycle_id` where a failure after it must leave the session as it
    /// was, since a request that fails after the move costs the session as a lost
    /// response does.
    ///
    /// Over a store whose [`update`](SessionStore::update) is not atomic (see
    /// [`SessionStore::atomic_update`]), the old record is deleted instead of
    /// marked: such a store cannot keep the marker's promises, and may never free
    /// an expired record by itself.
    ///
    /// A session that is not stored yet just draws a new id. A response that never
    /// reaches the browser after the move was written costs the user the session:
    /// the browser keeps the old id, which finds the marker for two minutes (changes
    /// fail with [`SessionGone`]) and nothing after that, while the moved values
    /// wait under an id nobody holds until they expire.
    ///
    /// # Errors
    ///
    /// Returns a [`SessionFinished`] once the request is finished, or the store's
    /// error if loading the session or drawing an id fails; the session is then
    /// unchanged. The move's own errors come from the write that carries it out,
    /// which then leaves the old session as it was.
    pub async fn cycle_id(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        self.check_open()?;
        let loaded = self.loaded(&mut state).await?;
        let now = self.inner.config.now();
        if loaded.gone {
            // The session went away under this request (a logout, another login):
            // a login now starts a new, empty one rather than silently doing nothing.
            *loaded = self.fresh(now)?;
            return Ok(());
        }
        let id = random_id()?;
        if !loaded.stored {
            loaded.record.id = id;
            loaded.modified |= !nothing_to_store(&loaded.record);
            return Ok(());
        }
        match &mut loaded.rotation {
            Some(rotation) => rotation.id = id,
            None => {
                loaded.rotation = Some(Rotation {
                    id,
                    since: Changes::default(),
                });
            }
        }
        loaded.modified = true;
        Ok(())
    }

    /// Names the user this session belongs to, typically at login, next to
    /// [`cycle_id`](Self::cycle_id). The owner is stored with the record, in the
    /// same write, and filed in the store's index of owners, so that
    /// [`owner_sessions`](Self::owner_sessions) lists this session and
    /// [`end_other_sessions`](Self::end_other_sessions) and
    /// [`end_all_sessions`](Self::end_all_sessions) can end it. With an
    /// [owner limit](SessionConfig::with_owner_limit), the owner's oldest sessions
    /// beyond it are ended once this one is written.
    ///
    /// Setting the owner the session already has changes nothing (it keeps the date
    /// it got it).
    ///
    /// # Errors
    ///
    /// An [`Unsupported`](crate::session_store::Unsupported) error when the store
    /// keeps no owner index, a [`SessionFinished`] once the request is finished, a
    /// [`SessionGone`] when another request ended the session, or the store's error
    /// if loading the session fails.
    pub async fn set_owner(&self, owner: &Owner) -> Result<()> {
        self.change_owner(Some(owner)).await
    }

    /// Takes the session's owner away: it is no longer listed or ended with the
    /// owner's sessions. A logout usually ends the session instead
    /// ([`flush`](Self::flush)).
    ///
    /// # Errors
    ///
    /// As for [`set_owner`](Self::set_owner).
    pub async fn clear_owner(&self) -> Result<()> {
        self.change_owner(None).await
    }

    async fn change_owner(&self, owner: Option<&Owner>) -> Result<()> {
        if owner.is_some() && !self.inner.store.supports_owners() {
            return Err(unsupported_owners(&self.inner.store));
        }
        let mut state = self.inner.state.lock().await;
        let loaded = self.changeable(&mut state).await?;
        let current = loaded.record.ownership.as_ref().map(|o| &o.owner);
        let now = self.inner.config.now();
        let ownership = owner.map(|owner| Ownership::new(owner.clone(), now));
        if current == owner {
            // The owner it has. A login under way (`cycle_id` pending) still
            // records it: if the old session turns out to be ended, the login's new
            // session gets the owner all the same.
            if let Some(rotation) = &mut loaded.rotation {
                rotation.since.ownership = Some(ownership.clone());
                // And over whatever another request wrote meanwhile: a login names
                // this session's owner.
                loaded.changes.ownership = Some(ownership);
                loaded.limit_due |= owner.is_some();
            }
            return Ok(());
        }
        loaded.limit_due = ownership.is_some();
        loaded.change_owner(ownership);
        Ok(())
    }

    /// The user this session belongs to, if [`set_owner`](Self::set_owner) named
    /// one.
    ///
    /// # Errors
    ///
    /// The store's error if loading the session fails.
    pub async fn owner(&self) -> Result<Option<Owner>> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        Ok(loaded.record.ownership.as_ref().map(|o| o.owner.clone()))
    }

    /// The live sessions of this session's owner, this one marked
    /// ([`OwnedSession::is_current`]); none when the session has no owner. Each
    /// gives a [`Handle`] to end it with, never its id.
    ///
    /// # Errors
    ///
    /// An [`Unsupported`](crate::session_store::Unsupported) error when the store
    /// keeps no owner index, or the store's error.
    pub async fn owner_sessions(&self) -> Result<Vec<OwnedSession>> {
        if !self.inner.store.supports_owners() {
            return Err(unsupported_owners(&self.inner.store));
        }
        let (owner, current) = {
            let mut state = self.inner.state.lock().await;
            let loaded = self.loaded(&mut state).await?;
            let Some(ownership) = &loaded.record.ownership else {
                return Ok(Vec::new());
            };
            (ownership.owner.clone(), Handle::of(&loaded.record.id))
        };
        let mut listed = self.inner.store.list_owned(&owner).await?;
        for session in &mut listed {
            let is_current = session.handle() == current;
            session.mark_current(is_current);
        }
        Ok(listed)
    }

    /// Ends one of this session's owner's sessions, by the handle a listing gave:
    /// "sign out that device". Returns `false` when the owner has no live session
    /// with that handle (it ended already, or the handle is another owner's: a
    /// handle never reaches another user's sessions). Ending this very session is a
    /// [`flush`](Self::flush).
    ///
    /// Requests of the ended session still in flight can no longer write it, nor
    /// send a cookie that would bring it back.
    ///
    /// # Errors
    ///
    /// An [`Unsupported`](crate::session_store::Unsupported) error when the store
    /// keeps no owner index, a [`SessionFinished`] once the request is finished, or
    /// the store's error.
    pub async fn end_session(&self, handle: Handle) -> Result<bool> {
        let ended = self.end_owned(Some(handle)).await?;
        Ok(!ended.is_empty())
    }

    /// Ends every session of this session's owner except this one: "sign out the
    /// other devices", after a password change say. Returns how many it ended.
    ///
    /// Final for the ended sessions' requests in flight: they can neither write
    /// their session nor send a cookie that would bring it back. A login of the
    /// same owner that completes after this started is a new session and stays.
    ///
    /// # Errors
    ///
    /// As for [`end_session`](Self::end_session).
    pub async fn end_other_sessions(&self) -> Result<usize> {
        Ok(self.end_owned(None).await?.len())
    }

    /// Ends every session of this session's owner, this one included (which is then
    /// as after a [`flush`](Self::flush): empty, under a fresh id, its cookie
    /// removed): "sign out everywhere". Returns how many it ended.
    ///
    /// A session without an owner ends alone. Sessions logged in before the
    /// application set owners have none, and are not found from another session:
    /// give them their owner when one is loaded (`if logged_in && session.owner()
    /// .await?.is_none() { session.set_owner(..) }`), or end them by the means
    /// used before.
    ///
    /// # Errors
    ///
    /// As for [`end_session`](Self::end_session).
    pub async fn end_all_sessions(&self) -> Result<usize> {
        if !self.inner.store.supports_owners() {
            return Err(unsupported_owners(&self.inner.store));
        }
        let mut state = self.inner.state.lock().await;
        self.check_open()?;
        let loaded = self.loaded(&mut state).await?;
        let ended = match &loaded.record.ownership {
            Some(ownership) => {
                let owner = ownership.owner.clone();
                self.inner.store.end_owned(&owner, Ending::All).await?
            }
            // No owner (a session logged in before owners were set): this one ends.
            None => Vec::new(),
        };
        // This session too, even if its owner was not written yet.
        let mut count = ended.len();
        if loaded.stored && !ended.contains(&Handle::of(&loaded.record.id)) {
            self.inner.store.delete(&loaded.record.id).await?;
            count += usize::from(loaded.record.ownership.is_none());
        }
        *state = Some(self.fresh(self.inner.config.now())?);
        Ok(count)
    }

    /// Ends the owner's session with `handle` (`Some`), or all but this one.
    async fn end_owned(&self, handle: Option<Handle>) -> Result<Vec<Handle>> {
        if !self.inner.store.supports_owners() {
            return Err(unsupported_owners(&self.inner.store));
        }
        let mut state = self.inner.state.lock().await;
        self.check_open()?;
        let loaded = self.loaded(&mut state).await?;
        let Some(ownership) = &loaded.record.ownership else {
            return Ok(Vec::new());
        };
        let owner = ownership.owner.clone();
        let current = Handle::of(&loaded.record.id);
        let ending = match handle {
            Some(handle) => Ending::One(handle),
            None => Ending::AllBut(current),
        };
        let mut ended = self.inner.store.end_owned(&owner, ending).await?;
        // Ending this very session: a reply lost and sent again may not say that it
        // was ended, so look.
        if handle == Some(current)
            && loaded.stored
            && !ended.contains(&current)
            && self.inner.store.load(&loaded.record.id).await?.is_none()
        {
            ended.push(current);
        }
        if ended.contains(&current) {
            *state = Some(self.fresh(self.inner.config.now())?);
        }
        Ok(ended)
    }

    /// Ends the request: writes the session if it changed (or, with `refresh`, if
    /// writing would move its sliding expiry forward by at least that fraction of the
    /// window), and says what to do with the client's cookie. Once it succeeded,
    /// the session refuses changes.
    ///
    /// The cookie is sent only when it changes something: a new id, a removal, or a
    /// `Max-Age` that this request's write moved. A session found gone (ended or
    /// moved by another request) sends nothing: that request's response set the
    /// cookie, and this one must not undo it. Its changes are dropped, and logged.
    pub(crate) async fn commit(&self, refresh: Option<f64>) -> Result<(CookieAction, bool)> {
        let mut state = self.inner.state.lock().await;
        self.check_open()?;
        // The handler read or wrote the session: the response depends on the cookie.
        let used = state.is_some();
        let action = self.commit_locked(&mut state, refresh).await?;
        // Only a commit that succeeded ends the request: after a failure the
        // changes are still there, and a retry may write them.
        self.inner
            .finished
            .store(true, std::sync::atomic::Ordering::Release);
        Ok((action, used))
    }

    async fn commit_locked(&self, state: &mut State, refresh: Option<f64>) -> Result<CookieAction> {
        if state.is_none() {
            match self.inner.incoming.first() {
                // Untouched: only a refresh needs the record.
                Some(_) if refresh.is_some() => {}
                Some(_) => return Ok(CookieAction::Keep),
                None if self.inner.removable => return Ok(CookieAction::Remove),
                None => return Ok(CookieAction::Keep),
            }
        }
        let loaded = self.loaded(state).await?;
        let now = self.inner.config.now();
        if loaded.gone {
            return Ok(CookieAction::Keep);
        }
        if loaded.modified {
            let written = self.write(loaded, &mut |_| Ok(())).await;
            match written {
                Ok(()) => {}
                Err(err) if err.is_session_gone() => {
                    log::info!(
                        target: "portable_sessions::session",
                        "a request's changes to session {:?} were dropped: another request \
                         ended or moved the session first",
                        loaded.record.id
                    );
                }
                Err(err) => return Err(err),
            }
        } else if loaded.stored
            && self
                .inner
                .config
                .refresh_due(&loaded.record, now, refresh)?
        {
            self.refresh(loaded, now).await?;
        }
        if loaded.gone {
            // Another request logged out or moved the session meanwhile: its
            // response has set the cookie, and this one must not undo that.
            return Ok(CookieAction::Keep);
        }
        let (policy, max_age) = self.inner.config.cookie_max_age(&loaded.record, now);
        Ok(if loaded.stored {
            let new_id = !self.inner.incoming.contains(&loaded.record.id);
            let moved_max_age = loaded.written
                && max_age.is_some()
                && loaded.loaded_expiry != Some(loaded.record.expiry_date);
            let new_policy = loaded.written && loaded.loaded_policy != Some(policy);
            if new_id || moved_max_age || new_policy {
                CookieAction::Set {
                    id: loaded.record.id,
                    max_age,
                }
            } else {
                CookieAction::Keep
            }
        } else if self.inner.removable && !loaded.unreadable {
            CookieAction::Remove
        } else {
            CookieAction::Keep
        })
    }
}

/// The error for an owner set over a store that keeps no owner index.
fn unsupported_owners(store: &Arc<dyn SessionStore>) -> Error {
    log::debug!(target: "portable_sessions::session", "{store:?} keeps no owner index");
    Error::backend(crate::session_store::Unsupported {
        store: "this session store",
        what: "session owners (it keeps no owner index)",
    })
}

/// Refuses the keys this crate reserves.
fn check_key(key: &str) -> Result<()> {
    if is_reserved(key) {
        return Err(Error::encode(format!(
            "session key {key:?} is reserved: keys starting with NUL belong to portable-sessions"
        )));
    }
    Ok(())
}

impl fmt::Debug for Session {
    /// Prints the abridged incoming id, never the values: they may hold credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("incoming", &self.inner.incoming)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{session::id::tests::RNG_FAILS, MemoryStore};

    fn rng_fails(fails: bool) {
        RNG_FAILS.with(|flag| flag.set(fails));
    }

    fn backend_error<T: fmt::Debug>(result: Result<T>, what: &str) {
        assert!(
            matches!(&result, Err(Error::Backend(err)) if err.to_string().contains("random")),
            "{what}: {result:?}"
        );
    }

    /// Every place that draws an id fails with an error, not a panic, when the OS
    /// random source fails, and leaves the session as it was.
    #[maybe_async::maybe_async]
    async fn random_source_failures_are_errors() {
        let store = Arc::new(MemoryStore::new());
        let config = SessionConfig::default();

        rng_fails(true);
        let new = Session::new(store.clone(), None, config.clone());
        backend_error(new.get::<u8>("k").await, "first use of a new session");
        rng_fails(false);
        new.insert("user", "alice").await.unwrap();
        new.save().await.unwrap();
        let id = new.id().await.unwrap().expect("stored");

        let session = Session::new(store.clone(), Some(id), config.clone());
        session.get::<String>("user").await.unwrap();
        rng_fails(true);
        backend_error(session.cycle_id().await, "cycle_id");
        backend_error(session.delete().await, "delete");
        backend_error(session.flush().await, "flush");
        rng_fails(false);
        let still = store.load(&id).await.unwrap().expect("still stored");
        assert_eq!(
            still.get::<String>("user").unwrap().as_deref(),
            Some("alice")
        );
        let same_id = session.id().await.unwrap();
        assert_eq!(same_id, Some(id));

        // A create whose id is taken must draw another one.
        let mut colliding = still.clone();
        rng_fails(true);
        backend_error(
            store.create(&mut colliding).await,
            "create under a taken id",
        );
        rng_fails(false);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn random_source_failures_are_errors_in_this_mode() {
        #[maybe_async::sync_impl]
        fn run() {
            random_source_failures_are_errors();
        }
        #[maybe_async::async_impl]
        fn run() {
            futures_lite::future::block_on(random_source_failures_are_errors());
        }
        run();
    }
}
