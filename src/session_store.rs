//! The [`SessionStore`] trait that backends implement, and its error type.

use std::fmt::Debug;

use crate::{
    deletion::{DeletionSchedule, DeletionSummary},
    session::{Id, Record},
    timer::Timer,
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
        crate::deletion::run(self, schedule, timer).await
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
}

#[maybe_async::maybe_async]
impl<S: ExpiredDeletion + ?Sized> ExpiredDeletion for std::sync::Arc<S> {
    async fn delete_expired(&self) -> Result<usize> {
        (**self).delete_expired().await
    }
}
