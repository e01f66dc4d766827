//! The [`SessionStore`] trait that backends implement, and its error type.

use std::fmt::Debug;

use crate::{
    lifecycle::deletion::{DeletionSchedule, DeletionSummary},
    lifecycle::timer::Timer,
    session::{Ending, Handle, Id, OwnedSession, Owner, Record},
};

/// A boxed error as kept inside [`Error`]: any error type, or a message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result of a store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a session store.
///
/// Each variant keeps the error that caused it, reachable through
/// [`source`](std::error::Error::source); its own message stays short so that error
/// reporters that walk the chain do not print the cause twice.
///
/// Store authors map their errors in one call with [`Error::encode`],
/// [`Error::decode`] or [`Error::backend`], which take any error type or a message:
///
/// ```
/// use portable_sessions::session_store::Error;
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let err = Error::backend(io);
/// assert_eq!(err.to_string(), "session store backend failed");
/// assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "refused");
///
/// let err = Error::decode("row holds no record");
/// assert!(matches!(err, Error::Decode(_)));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value or record could not be encoded.
    #[error("failed to encode session data")]
    Encode(#[source] BoxError),
    /// Stored bytes could not be decoded: corrupt, truncated, of an unknown format, or
    /// read as the wrong type.
    #[error("failed to decode session data")]
    Decode(#[source] BoxError),
    /// The backend failed: unreachable, timed out, refused the operation.
    #[error("session store backend failed")]
    Backend(#[source] BoxError),
}

impl Error {
    /// Wraps `source` in [`Error::Encode`].
    pub fn encode(source: impl Into<BoxError>) -> Self {
        Self::Encode(source.into())
    }

    /// Wraps `source` in [`Error::Decode`].
    pub fn decode(source: impl Into<BoxError>) -> Self {
        Self::Decode(source.into())
    }

    /// Wraps `source` in [`Error::Backend`].
    pub fn backend(source: impl Into<BoxError>) -> Self {
        Self::Backend(source.into())
    }

    /// Returns `true` if this is a [`WriteConflict`]: the session's changes were not
    /// written because concurrent writes to it kept coming first.
    pub fn is_write_conflict(&self) -> bool {
        match self {
            Self::Backend(source) => source.is::<WriteConflict>(),
            _ => false,
        }
    }

    /// Returns `true` if this is a [`SessionGone`]: the request's change was not kept,
    /// because another request ended the session (a logout) or moved it (a login's
    /// [`cycle_id`](crate::session::Session::cycle_id)).
    pub fn is_session_gone(&self) -> bool {
        match self {
            Self::Backend(source) => source.is::<SessionGone>(),
            _ => false,
        }
    }

    /// Returns `true` if this is a [`SessionFinished`]: a change was refused because
    /// the session's request was already finished.
    pub fn is_session_finished(&self) -> bool {
        match self {
            Self::Backend(source) => source.is::<SessionFinished>(),
            _ => false,
        }
    }

    /// Returns `true` if this is an [`Unsupported`]: the store does not keep an
    /// owner index, so it cannot store a session's owner, list an owner's sessions
    /// or end them.
    pub fn is_unsupported(&self) -> bool {
        match self {
            Self::Backend(source) => source.is::<Unsupported>(),
            _ => false,
        }
    }

    /// The HTTP status for a request that failed on this error, as the axum and
    /// actix-web integrations answer it: `503 Service Unavailable` for the backend
    /// (unreachable, timed out, too many concurrent writes: worth a retry), `409
    /// Conflict` for a [`SessionGone`] (another request ended or moved the session),
    /// and `500 Internal Server Error` for the rest (a value that does not encode,
    /// stored bytes that do not decode, a change after the request finished: bugs,
    /// or data to look at).
    ///
    /// ```
    /// use portable_sessions::session_store::Error;
    ///
    /// assert_eq!(Error::backend("connection refused").http_status(), 503);
    /// assert_eq!(Error::decode("not a u64").http_status(), 500);
    /// ```
    pub fn http_status(&self) -> u16 {
        match self {
            _ if self.is_session_gone() => 409,
            _ if self.is_session_finished() => 500,
            Self::Backend(_) => 503,
            Self::Encode(_) | Self::Decode(_) => 500,
        }
    }

    /// Formats the error with every cause in its chain, `outer: inner: ...`, for logs.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }
}

/// What a conditional write ([`SessionStore::update`]) did.
///
/// # Examples
///
/// ```
/// use portable_sessions::{session::Record, session_store::Update, MemoryStore, SessionStore};
/// use time::{Duration, OffsetDateTime};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let store = MemoryStore::new();
/// let mut record = Record::new(OffsetDateTime::now_utc() + Duration::hours(1));
/// store.create(&mut record).await?;
///
/// // Two requests load the same version...
/// let mut first = store.load(&record.id).await?.expect("stored");
/// let mut second = first.clone();
/// first.insert("cart", &["apple"])?;
/// second.insert("cart", &["pear"])?;
/// // ...the first to write wins, the other learns that it must merge and retry.
/// let written = store.update(&first).await?;
/// assert_eq!(written, Update::Written(first.version + 1));
/// let refused = store.update(&second).await?;
/// assert_eq!(refused, Update::Conflict);
///
/// // A deleted session is never brought back.
/// store.delete(&record.id).await?;
/// let gone = store.update(&first).await?;
/// assert_eq!(gone, Update::Gone);
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a conditional write may have written nothing"]
pub enum Update {
    /// The record was written; the store now holds it at this version (the expected
    /// version plus one).
    Written(u64),
    /// Nothing was written: the stored record is at another version (another write
    /// came first). Load it again, apply the changes over it, and retry.
    Conflict,
    /// Nothing was written: there is no live record under this id (deleted, expired,
    /// or never stored). Nothing was created either.
    Gone,
}

/// The error inside [`Error::Backend`] when a session's changes could not be written
/// because other writes to the same session kept coming first, a bounded number of
/// times in a row.
///
/// ```
/// use portable_sessions::session_store::{Error, WriteConflict};
///
/// let err = Error::backend(WriteConflict { attempts: 64 });
/// assert!(err.is_write_conflict());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session changed under {attempts} attempts in a row to write it")]
pub struct WriteConflict {
    /// How many conditional writes were refused.
    pub attempts: u32,
}

/// The error inside [`Error::Backend`] when a request's change to its session was not
/// kept: another request ended the session ([`flush`](crate::session::Session::flush),
/// [`delete`](crate::session::Session::delete), a logout) or moved it to a new id
/// ([`cycle_id`](crate::session::Session::cycle_id), a login) first, or it expired.
///
/// Nothing was written, and the response sends no cookie, so the logout or login
/// stands. A handler that must know whether its change is kept before it answers
/// writes it with [`Session::save`](crate::session::Session::save) or
/// [`Session::update`](crate::session::Session::update), and on this error answers
/// as for a user who is not logged in (say, a redirect to the login page) instead of
/// showing the change as made.
///
/// ```
/// use portable_sessions::session_store::{Error, SessionGone};
///
/// let err = Error::backend(SessionGone);
/// assert!(err.is_session_gone());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session ended or moved under this request, so its change was not kept")]
pub struct SessionGone;

/// The error inside [`Error::Backend`] when a change is made to a session whose
/// request was already finished
/// ([`SessionManager::finish`](crate::SessionManager::finish)): a clone kept by a
/// spawned task or a streaming body can still read the session, but no longer change
/// it, since nothing would store the change or send its cookie.
///
/// ```
/// use portable_sessions::session_store::{Error, SessionFinished};
///
/// let err = Error::backend(SessionFinished);
/// assert!(err.is_session_finished());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session's request is finished: it can no longer be changed")]
pub struct SessionFinished;

/// The error inside [`Error::Backend`] when a store is asked for what it does not
/// implement: an owner's sessions ([`SessionStore::list_owned`],
/// [`SessionStore::end_owned`]), or a session with an owner, from a store whose
/// [`supports_owners`](SessionStore::supports_owners) is `false`.
///
/// ```
/// use portable_sessions::session_store::{Error, Unsupported};
///
/// let err = Error::backend(Unsupported { store: "MyStore", what: "owners" });
/// assert!(err.is_unsupported());
/// assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "MyStore does not support owners");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{store} does not support {what}")]
pub struct Unsupported {
    /// The store's type name.
    pub store: &'static str,
    /// What it was asked for.
    pub what: &'static str,
}

/// The [`Unsupported`] error for a store of type `S` that keeps no owner index.
fn no_owners<S: ?Sized>() -> Error {
    Error::backend(Unsupported {
        store: std::any::type_name::<S>(),
        what: "session owners (listing and ending an owner's sessions)",
    })
}

/// Keeps session records: the interface that every backend implements.
///
/// In async mode (the default) the methods are `async` and the trait is an
/// [`async_trait`] trait whose futures are `Send`; with the `sync`
/// feature they are plain blocking methods. Either way `Arc<dyn SessionStore>` works.
///
/// # Contract
///
/// | method | must |
/// |---|---|
/// | [`create`](SessionStore::create) | insert only if the id is free, atomically; on a collision draw a new id ([`Id::default`]) into the record and retry |
/// | [`save`](SessionStore::save) | write the whole record, inserting or replacing |
/// | [`load`](SessionStore::load) | return `None` for a missing or expired record, even before expired records are deleted |
/// | [`delete`](SessionStore::delete) | remove the record; a missing id is not an error |
/// | [`update`](SessionStore::update) | atomically: replace the record only if the stored one is live and at `record.version`, advancing the version; never insert |
///
/// Every record carries a [`version`](Record::version). `create` and `save` store it
/// as given and `load` returns it; `update`, the conditional write that
/// [`Session`](crate::session::Session) uses, stores the record at the next version,
/// so two requests that loaded the same version cannot both write (no lost update),
/// and a session that is gone is never written back (no undone logout).
///
/// # Making `update` atomic
///
/// The provided `update` is a fallback for stores written before it existed: it
/// loads, compares and saves in three steps, so two writers can still both succeed
/// between them. It logs a warning the first time it runs for each store type. A
/// store overrides it with
/// one atomic step and says so with [`atomic_update`](SessionStore::atomic_update):
///
/// - in memory, compare and replace under the lock that guards the record;
/// - in SQL, one statement: `UPDATE .. SET .., version = version + 1 WHERE key = ? AND
///   version = ? AND expires_at > ?`; zero rows changed is `Conflict` if a live row
///   is still there, `Gone` if not;
/// - in a key-value server, a server-side script or transaction that compares the
///   stored version and writes in one step (never a read, then a write).
///
/// Keep the version beside the encoded record, not inside it: the record codec does
/// not carry it, and an atomic compare needs it where the backend can read it.
/// [`testing::check_store`](crate::testing) checks all of this, and fails for a store
/// that still uses the fallback.
///
/// # A user's sessions
///
/// A record can name its owner ([`Record::ownership`]: the user it belongs to).
/// A store that keeps an index of owners says so with
/// [`supports_owners`](SessionStore::supports_owners) and implements
/// [`list_owned`](SessionStore::list_owned) and
/// [`end_owned`](SessionStore::end_owned); the provided ones fail with
/// [`Unsupported`], and a [`Session`](crate::session::Session) refuses to set an
/// owner on such a store. A store that supports owners must:
///
/// - file a record under its owner in the same atomic step that writes it (`create`,
///   `save`, `update`), and out of the old owner's entry when `update` or `save`
///   changes or drops the owner (a [`cycle_id`](crate::session::Session::cycle_id)
///   leaves a marker without an owner under the old id);
/// - list only live records (expired ones are skipped, and may be pruned from the
///   index then), at a cost that follows the owner's session count, never a scan;
/// - end sessions for good: `end_owned` deletes each record it ends (a later
///   `update` of it is [`Update::Gone`]), and never one whose owner is another;
/// - drop index entries with their records on `delete` and `delete_expired`.
///
/// [`testing::check_owners`](crate::testing) checks all of this.
///
/// The crate-level docs show a complete implementation.
#[maybe_async::maybe_async]
pub trait SessionStore: Debug + Send + Sync + 'static {
    /// Inserts a new record, drawing a new id into `record.id` while the id is taken.
    ///
    /// The caller reads the final id from the record afterwards.
    async fn create(&self, record: &mut Record) -> Result<()>;

    /// Writes the whole record, inserting it or replacing the one with its id.
    async fn save(&self, record: &Record) -> Result<()>;

    /// Returns the record with this id, or `None` if there is none or it has expired.
    async fn load(&self, id: &Id) -> Result<Option<Record>>;

    /// Removes the record with this id; removing a missing id succeeds.
    async fn delete(&self, id: &Id) -> Result<()>;

    /// Replaces the stored record with `record` only if the stored one is live (not
    /// expired) and at version `record.version`; the stored record is then at the
    /// next version, which [`Update::Written`] returns. Never inserts: a missing or
    /// expired record is [`Update::Gone`]; another version is [`Update::Conflict`].
    ///
    /// Stores must override this with an atomic implementation (see
    /// [Making `update` atomic](SessionStore#making-update-atomic)) and return `true`
    /// from [`atomic_update`](SessionStore::atomic_update). The provided one is
    /// `load`, compare, `save`: correct alone, but two concurrent writers can both
    /// succeed. It logs a warning the first time it runs for each store type.
    async fn update(&self, record: &Record) -> Result<Update> {
        warn_non_atomic_update(self);
        let current = self.load(&record.id).await?;
        match current {
            None => Ok(Update::Gone),
            Some(current) if current.version != record.version => Ok(Update::Conflict),
            Some(_) => {
                let mut next = record.clone();
                next.version = record.version.wrapping_add(1);
                self.save(&next).await?;
                Ok(Update::Written(next.version))
            }
        }
    }

    /// Returns `true` if [`update`](SessionStore::update) is atomic in this store;
    /// `false` (the default) while it is the provided, non-atomic fallback.
    fn atomic_update(&self) -> bool {
        false
    }

    /// Returns `true` if this store keeps an index of owners: it stores records with
    /// an [`ownership`](Record::ownership) and implements
    /// [`list_owned`](SessionStore::list_owned) and
    /// [`end_owned`](SessionStore::end_owned). `false` by default.
    fn supports_owners(&self) -> bool {
        false
    }

    /// Returns `owner`'s live sessions, in no particular order.
    ///
    /// The provided one fails with [`Unsupported`].
    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        let _ = owner;
        Err(no_owners::<Self>())
    }

    /// Ends (deletes) the sessions of `owner` that `ending` names, and returns their
    /// handles. Sessions of other owners are never touched, whatever the handle.
    ///
    /// The provided one fails with [`Unsupported`].
    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        let _ = (owner, ending);
        Err(no_owners::<Self>())
    }
}

/// Logs, once per store type, that a store runs the non-atomic fallback of `update`.
fn warn_non_atomic_update<S: SessionStore + ?Sized>(store: &S) {
    // One static serves every instance of this generic function, so it keeps the
    // names of the types already reported.
    static WARNED: parking_lot::Mutex<Vec<&'static str>> = parking_lot::Mutex::new(Vec::new());
    let name = std::any::type_name::<S>();
    {
        let mut warned = WARNED.lock();
        if warned.contains(&name) {
            return;
        }
        warned.push(name);
    }
    log::warn!(
        target: "portable_sessions::session_store",
        "{store:?} does not implement SessionStore::update: concurrent requests of one \
         session can lose updates or undo a logout; see the SessionStore docs"
    );
}

/// A store that can remove its expired records in one pass.
///
/// Call [`delete_expired`](ExpiredDeletion::delete_expired) from any scheduler you
/// already run (a cron job, a job runner, your own loop), or let the crate's deletion
/// loop drive it with a timer of your choosing.
///
/// A store whose backend expires records by itself (Redis keys with a TTL) implements
/// it as a no-op that returns `Ok(0)`, and says so.
#[maybe_async::maybe_async]
pub trait ExpiredDeletion: SessionStore {
    /// Deletes every record that has expired by now and returns how many it removed.
    async fn delete_expired(&self) -> Result<usize>;

    /// Deletes expired records over and over, sleeping on `timer` between passes,
    /// until the timer says stop; returns what it did.
    ///
    /// It waits before the first pass, then runs passes at the times `schedule` gives:
    /// one period apart, with its jitter. A failed pass never ends the loop: it is
    /// logged (and passed to the schedule's [`on_error`](DeletionSchedule::on_error)
    /// callback), and the next pass comes after a bounded exponential backoff. It
    /// returns as soon as `timer` returns [`Tick::Stop`](crate::Tick::Stop), which
    /// the built-in timers do at once when their [`StopHandle`](crate::StopHandle) is
    /// used, even in the middle of a long period; a pass under way is finished first.
    ///
    /// In async mode, run it as a task of its own on any executor; in blocking mode,
    /// on a thread of its own. The timer picks the runtime: `ThreadTimer` (blocking
    /// mode), `AsyncIoTimer` (any executor), `TokioTimer` (see [`Timer`]), or one of
    /// your own.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::{sync::{atomic::{AtomicI64, Ordering}, Arc}, time::Duration};
    /// use portable_sessions::{session::Record, DeletionSchedule, ExpiredDeletion, MemoryStore, SessionStore, Tick, Timer};
    /// use time::OffsetDateTime;
    ///
    /// // A timer that lets three periods pass at once, then stops: a real program
    /// // uses a built-in timer, or one for its runtime.
    /// #[derive(Debug, Default)]
    /// struct ThreePeriods(std::sync::atomic::AtomicU32);
    ///
    /// #[maybe_async::maybe_async]
    /// impl Timer for ThreePeriods {
    ///     async fn sleep(&self, _: Duration) -> Tick {
    ///         if self.0.fetch_add(1, Ordering::Relaxed) < 3 { Tick::Continue } else { Tick::Stop }
    ///     }
    /// }
    ///
    /// # #[maybe_async::maybe_async]
    /// # async fn run() -> portable_sessions::session_store::Result<()> {
    /// let store = MemoryStore::new();
    /// let mut old = Record::new(OffsetDateTime::now_utc() - time::Duration::minutes(1));
    /// store.create(&mut old).await?;
    ///
    /// let schedule = DeletionSchedule::new(Duration::from_secs(60));
    /// let summary = store.continuously_delete_expired(schedule, &ThreePeriods::default()).await;
    /// assert_eq!((summary.passes, summary.deleted, summary.failures), (3, 1, 0));
    /// assert!(store.is_empty());
    /// # Ok(())
    /// # }
    /// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
    /// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
    /// ```
    async fn continuously_delete_expired(
        &self,
        schedule: DeletionSchedule,
        timer: &dyn Timer,
    ) -> DeletionSummary {
        crate::lifecycle::deletion::run(self, schedule, timer).await
    }
}

// A shared store is a store: lets `Arc<dyn SessionStore>` and `Arc<MyStore>` sit
// wherever a store is expected, such as either layer of a `CachingSessionStore`.
#[maybe_async::maybe_async]
impl<S: SessionStore + ?Sized> SessionStore for std::sync::Arc<S> {
    async fn create(&self, record: &mut Record) -> Result<()> {
        (**self).create(record).await
    }

    async fn save(&self, record: &Record) -> Result<()> {
        (**self).save(record).await
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        (**self).load(id).await
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        (**self).delete(id).await
    }

    async fn update(&self, record: &Record) -> Result<Update> {
        (**self).update(record).await
    }

    fn atomic_update(&self) -> bool {
        (**self).atomic_update()
    }

    fn supports_owners(&self) -> bool {
        (**self).supports_owners()
    }

    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        (**self).list_owned(owner).await
    }

    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        (**self).end_owned(owner, ending).await
    }
}

#[maybe_async::maybe_async]
impl<S: ExpiredDeletion + ?Sized> ExpiredDeletion for std::sync::Arc<S> {
    async fn delete_expired(&self) -> Result<usize> {
        (**self).delete_expired().await
    }
}
