//! [`Session`]: the per-request handle on one session.

use std::{fmt, sync::Arc};

use serde::{de::DeserializeOwned, Serialize};
use time::{Duration, OffsetDateTime};

use crate::{
    expiry::{created_at, has_no_user_values, is_reserved, set_created_at, SessionConfig},
    session::{Id, Record},
    session_store::{Error, Result, SessionStore},
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
/// Writes are whole-record and unconditional (the store contract has no
/// compare-and-set): two requests that change one session at the same time both
/// write, and the later write wins; a request that writes a session while another
/// deletes it (a logout) can write it back.
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
    /// The id the request carried, if it carried a well-formed one.
    incoming: Option<Id>,
    /// The request carried a session cookie, well-formed or not.
    cookie_seen: bool,
    state: StateLock,
}

struct Loaded {
    record: Record,
    /// `record.id` names a record in the store, as far as this handle knows.
    stored: bool,
    /// The values changed since they were loaded or last written.
    modified: bool,
    /// A write reached the store through this handle.
    written: bool,
}

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
        Self::from_request(store, id, id.is_some(), config)
    }

    /// Like [`new`](Self::new), also knowing whether the request carried a session
    /// cookie at all (a malformed one parses to no id, but must still be removed).
    pub(crate) fn from_request(
        store: Arc<dyn SessionStore>,
        id: Option<Id>,
        cookie_seen: bool,
        config: SessionConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                incoming: id,
                cookie_seen,
                state: StateLock::new(None),
            }),
        }
    }

    /// Returns the configuration this session was made with.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    fn fresh(&self, now: OffsetDateTime) -> Loaded {
        // `Record::new` draws a fresh id: never the one the client sent.
        let mut record = Record::new(now);
        set_created_at(&mut record, now);
        Loaded {
            record,
            stored: false,
            modified: false,
            written: false,
        }
    }

    /// Turns what the store returned for the incoming id into this request's state.
    fn adopt(&self, found: Option<Record>, now: OffsetDateTime) -> Loaded {
        let Some(mut record) = found else {
            return self.fresh(now);
        };
        let mut modified = false;
        match created_at(&record) {
            Ok(Some(created)) if self.inner.config.is_past_lifetime(created, now) => {
                return self.fresh(now);
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                // A record written by something else: its lifetime starts now, and is
                // written down at the next write.
                set_created_at(&mut record, now);
                modified = true;
            }
            Err(err) => {
                log::warn!(
                    target: "portable_sessions::session",
                    "session {:?} has an unreadable creation time, starting a new session: {}",
                    record.id,
                    err.report()
                );
                return self.fresh(now);
            }
        }
        Loaded {
            record,
            stored: true,
            modified,
            written: false,
        }
    }
}

#[maybe_async::maybe_async]
impl Session {
    /// Loads the record into `state` on first use and returns it.
    async fn loaded<'s>(&self, state: &'s mut State) -> Result<&'s mut Loaded> {
        let loaded = match state.take() {
            Some(loaded) => loaded,
            None => {
                let now = self.inner.config.now();
                match self.inner.incoming {
                    Some(id) => {
                        let found = self.inner.store.load(&id).await?;
                        self.adopt(found, now)
                    }
                    None => self.fresh(now),
                }
            }
        };
        Ok(state.insert(loaded))
    }

    /// Writes the record: creates it when the store does not have it yet, saves it
    /// otherwise, with an expiry date computed from now.
    async fn write(&self, loaded: &mut Loaded, now: OffsetDateTime) -> Result<()> {
        let created = created_at(&loaded.record)?.unwrap_or(now);
        loaded.record.expiry_date = self.inner.config.expiry_date(created, now);
        if loaded.stored {
            self.inner.store.save(&loaded.record).await?;
        } else {
            // The store may draw another id on a collision; the record then holds it.
            self.inner.store.create(&mut loaded.record).await?;
            loaded.stored = true;
        }
        loaded.modified = false;
        loaded.written = true;
        Ok(())
    }

    /// Returns the value stored under `key`, decoded as a `T`, or `None` if there is
    /// none.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`] if the value was not written as a `T`, or the store's
    /// error if loading the session fails.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        if is_reserved(key) {
            return Ok(None);
        }
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        loaded.record.get(key)
    }

    /// Stores `value` under `key`, replacing what was there; the session is marked
    /// modified only if the stored bytes change.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Encode`] if `value` cannot be serialized or `key` starts with
    /// a NUL character (reserved for this crate), or the store's error if loading the
    /// session fails. On error the session is unchanged.
    pub async fn insert<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        if is_reserved(key) {
            return Err(Error::encode(format!(
                "session key {key:?} is reserved: keys starting with NUL belong to portable-sessions"
            )));
        }
        let bytes = postcard::to_allocvec(value).map_err(Error::encode)?;
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        if loaded.record.get_raw(key) != Some(bytes.as_slice()) {
            loaded.record.insert_raw(key, bytes);
            loaded.modified = true;
        }
        Ok(())
    }

    /// Removes the value stored under `key` and returns it decoded as a `T`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`] if the value was not written as a `T`, in which case
    /// it stays in place (see [`remove_raw`](Self::remove_raw)), or the store's error
    /// if loading the session fails.
    pub async fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        if is_reserved(key) {
            return Ok(None);
        }
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        let value = loaded.record.get(key)?;
        if loaded.record.remove(key).is_some() {
            loaded.modified = true;
        }
        Ok(value)
    }

    /// Removes the value stored under `key`, whatever its type, and returns its
    /// encoded bytes.
    ///
    /// # Errors
    ///
    /// Returns the store's error if loading the session fails.
    pub async fn remove_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if is_reserved(key) {
            return Ok(None);
        }
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        let removed = loaded.record.remove(key);
        loaded.modified |= removed.is_some();
        Ok(removed)
    }

    /// Removes every value; the session keeps its id and its lifetime.
    ///
    /// A session left empty is not kept: when it is finished, its record is deleted
    /// and its cookie removed.
    ///
    /// # Errors
    ///
    /// Returns the store's error if loading the session fails.
    pub async fn clear(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        if !has_no_user_values(&loaded.record) {
            let created = created_at(&loaded.record)?;
            loaded.record.clear();
            set_created_at(
                &mut loaded.record,
                created.unwrap_or_else(|| self.inner.config.now()),
            );
            loaded.modified = true;
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

    /// Returns the id the session is stored under, or `None` while it is not stored
    /// (new and not yet saved, or deleted).
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

    /// Writes the session to the store now, modified or not: creates it under a fresh
    /// id when it is new, saves it otherwise, with an expiry date computed from now.
    ///
    /// # Errors
    ///
    /// Returns the store's error; the session then stays modified.
    pub async fn save(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        let now = self.inner.config.now();
        self.write(loaded, now).await
    }

    /// Deletes the session's record from the store.
    ///
    /// The values stay readable in this handle, under a freshly drawn id and
    /// unmodified: nothing is written back unless they change again, in which case
    /// they are stored as a new session. A deleted id is never used again.
    ///
    /// # Errors
    ///
    /// Returns the store's error; the session is then unchanged.
    pub async fn delete(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        if loaded.stored {
            self.inner.store.delete(&loaded.record.id).await?;
        }
        loaded.record.id = Id::default();
        loaded.stored = false;
        loaded.modified = false;
        Ok(())
    }

    /// Ends the session: deletes its record from the store and starts over with no
    /// values, a fresh id and a new lifetime. Does not load the session first.
    ///
    /// Call it on logout.
    ///
    /// # Errors
    ///
    /// Returns the store's error; the session is then unchanged.
    pub async fn flush(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let stored = match &*state {
            Some(loaded) => loaded.stored.then_some(loaded.record.id),
            None => self.inner.incoming,
        };
        if let Some(id) = stored {
            self.inner.store.delete(&id).await?;
        }
        *state = Some(self.fresh(self.inner.config.now()));
        Ok(())
    }

    /// Moves the session to a freshly drawn id, against session fixation: call it
    /// when the user's privileges change, such as at login.
    ///
    /// A stored session is created under the new id (with its current values) before
    /// the old id is deleted, so a failure leaves it loadable under one of the two
    /// ids, never neither. A session that is not stored yet just draws a new id and is
    /// marked modified.
    ///
    /// # Errors
    ///
    /// Returns the store's error. If creating the new record failed, nothing changed:
    /// the session is still under its old id. If deleting the old one failed, the
    /// session is under its new id, and the old id loads the old record until it
    /// expires.
    pub async fn cycle_id(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let loaded = self.loaded(&mut state).await?;
        if !loaded.stored {
            loaded.record.id = Id::default();
            loaded.modified = true;
            return Ok(());
        }
        let now = self.inner.config.now();
        let created = created_at(&loaded.record)?.unwrap_or(now);
        let old = loaded.record.id;
        let mut moved = loaded.record.clone();
        moved.id = Id::default();
        moved.expiry_date = self.inner.config.expiry_date(created, now);
        self.inner.store.create(&mut moved).await?;
        loaded.record = moved;
        loaded.modified = false;
        loaded.written = true;
        self.inner.store.delete(&old).await
    }

    /// Ends the request: writes the session if it changed (or, with `refresh`, if
    /// writing would move its sliding expiry forward by at least that fraction of the
    /// window), and says what to do with the client's cookie.
    pub(crate) async fn commit(&self, refresh: Option<f64>) -> Result<CookieAction> {
        let mut state = self.inner.state.lock().await;
        if state.is_none() {
            match self.inner.incoming {
                // Untouched: only a refresh needs the record.
                Some(_) if refresh.is_some() => {}
                Some(_) => return Ok(CookieAction::Keep),
                None if self.inner.cookie_seen => return Ok(CookieAction::Remove),
                None => return Ok(CookieAction::Keep),
            }
        }
        let loaded = self.loaded(&mut state).await?;
        let now = self.inner.config.now();
        if loaded.modified {
            if has_no_user_values(&loaded.record) {
                // Nothing worth keeping.
                if loaded.stored {
                    self.inner.store.delete(&loaded.record.id).await?;
                    loaded.record.id = Id::default();
                    loaded.stored = false;
                }
                loaded.modified = false;
            } else {
                self.write(loaded, now).await?;
            }
        } else if loaded.stored && self.refresh_due(&loaded.record, now, refresh)? {
            self.write(loaded, now).await?;
        }
        Ok(if loaded.stored {
            if loaded.written || self.inner.incoming != Some(loaded.record.id) {
                CookieAction::Set {
                    id: loaded.record.id,
                    max_age: self
                        .inner
                        .config
                        .cookie_max_age(loaded.record.expiry_date, now),
                }
            } else {
                CookieAction::Keep
            }
        } else if self.inner.cookie_seen {
            CookieAction::Remove
        } else {
            CookieAction::Keep
        })
    }
}

impl Session {
    /// Returns `true` if rewriting the record now would move its expiry date forward
    /// by at least `fraction` of the sliding window.
    fn refresh_due(
        &self,
        record: &Record,
        now: OffsetDateTime,
        fraction: Option<f64>,
    ) -> Result<bool> {
        let (Some(fraction), Some(window)) = (fraction, self.inner.config.sliding_window()) else {
            return Ok(false);
        };
        let created = created_at(record)?.unwrap_or(now);
        let gain = self.inner.config.expiry_date(created, now) - record.expiry_date;
        let threshold =
            Duration::checked_seconds_f64(window.as_seconds_f64() * fraction).unwrap_or(window);
        Ok(gain > Duration::ZERO && gain >= threshold)
    }
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
