//! [`Expiry`] and [`SessionConfig`]: when a session ends.

use std::fmt;

use time::{Duration, OffsetDateTime};

use crate::{
    lifecycle::clock::Clock,
    session::Record,
    session_store::{Error, Result},
};

/// When a session expires.
///
/// The expiry date a store receives is computed each time the session is written, from
/// the moment of the write; [`SessionConfig::with_max_lifetime`] caps it so that no
/// session outlives a fixed span from its creation, however often it is refreshed.
///
/// | variant | store expiry date, at each write | cookie |
/// |---|---|---|
/// | [`OnSessionEnd`](Expiry::OnSessionEnd) | now + [`session_end_ttl`](SessionConfig::with_session_end_ttl) | no `Max-Age`: the browser drops it when its session ends |
/// | [`OnInactivity`](Expiry::OnInactivity) | now + the duration | `Max-Age` up to the store expiry date |
/// | [`AtDateTime`](Expiry::AtDateTime) | that moment | `Max-Age` up to that moment |
///
/// # Examples
///
/// ```
/// use portable_sessions::session::{Expiry, SessionConfig};
/// use time::Duration;
///
/// // Two hours after the last write, and never more than a week after creation.
/// let config = SessionConfig::new(Expiry::OnInactivity(Duration::hours(2)))
///     .with_max_lifetime(Duration::weeks(1));
/// assert_eq!(config.expiry(), Expiry::OnInactivity(Duration::hours(2)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Expiry {
    /// The cookie lasts as long as the browser session; the store keeps the record
    /// for [`SessionConfig::session_end_ttl`] after its last write, since a server
    /// cannot see a browser close.
    #[default]
    OnSessionEnd,
    /// The session expires this long after it was last written. It slides forward on
    /// each write; with refresh on request (see
    /// [`SessionManager::with_refresh_on_request`](crate::SessionManager::with_refresh_on_request))
    /// reads keep it alive too. A zero or negative duration expires it at once.
    OnInactivity(Duration),
    /// The session expires at this moment, however active it is.
    AtDateTime(OffsetDateTime),
}

/// The reserved key under which a record keeps its session's creation time (Unix
/// seconds). Keys starting with NUL are reserved for this crate and hidden from the
/// [`Session`](crate::session::Session) API.
pub(crate) const CREATED_KEY: &str = "\0created";

/// The reserved key that marks the record left under an old id by
/// [`Session::cycle_id`](crate::session::Session::cycle_id): the session moved away.
pub(crate) const MOVED_KEY: &str = "\0moved";

/// Returns `true` for keys that this crate reserves in a record.
pub(crate) fn is_reserved(key: &str) -> bool {
    key.starts_with('\0')
}

/// Returns `true` if the record holds no values but reserved ones.
pub(crate) fn has_no_user_values(record: &Record) -> bool {
    record.keys().all(is_reserved)
}

/// Reads the creation time kept in a record; `None` when it has none.
///
/// # Errors
///
/// Returns [`Error::Decode`] when the stored value is not a valid time.
pub(crate) fn created_at(record: &Record) -> Result<Option<OffsetDateTime>> {
    match record.get::<i64>(CREATED_KEY)? {
        None => Ok(None),
        Some(secs) => OffsetDateTime::from_unix_timestamp(secs)
            .map(Some)
            .map_err(Error::decode),
    }
}

/// Writes the creation time into a record.
pub(crate) fn set_created_at(record: &mut Record, at: OffsetDateTime) {
    // An i64 always encodes, so there is no error to report.
    let bytes = postcard::to_allocvec(&at.unix_timestamp()).unwrap_or_default();
    record.insert_raw(CREATED_KEY, bytes);
}

/// How sessions expire: the [`Expiry`] policy, an optional cap on a session's whole
/// lifetime, the store-side lifetime of browser-session cookies, and the clock.
///
/// Cloning is cheap. A [`Session`](crate::session::Session) takes one when it is made;
/// [`SessionManager`](crate::SessionManager) hands its own to every session it makes.
///
/// # Examples
///
/// ```
/// use portable_sessions::session::{Expiry, SessionConfig};
/// use time::Duration;
///
/// let config = SessionConfig::new(Expiry::OnSessionEnd)
///     .with_session_end_ttl(Duration::hours(8))
///     .with_max_lifetime(Duration::days(2));
/// assert_eq!(config.session_end_ttl(), Duration::hours(8));
/// assert_eq!(config.max_lifetime(), Some(Duration::days(2)));
/// ```
#[derive(Clone)]
pub struct SessionConfig {
    expiry: Expiry,
    max_lifetime: Option<Duration>,
    session_end_ttl: Duration,
    clock: Clock,
}

impl Default for SessionConfig {
    /// [`Expiry::OnSessionEnd`], no lifetime cap, the default session-end TTL and the
    /// system clock.
    fn default() -> Self {
        Self::new(Expiry::OnSessionEnd)
    }
}

impl From<Expiry> for SessionConfig {
    fn from(expiry: Expiry) -> Self {
        Self::new(expiry)
    }
}

impl SessionConfig {
    /// How long the store keeps an [`Expiry::OnSessionEnd`] session after its last
    /// write, unless set otherwise: 24 hours.
    ///
    /// A browser session can outlast a day (browsers restore session cookies), but a
    /// record nobody wrote for a day is more likely abandoned than in use.
    pub const DEFAULT_SESSION_END_TTL: Duration = Duration::hours(24);

    /// Makes a configuration with this expiry policy, no lifetime cap, the default
    /// session-end TTL and the system clock.
    pub fn new(expiry: Expiry) -> Self {
        Self {
            expiry,
            max_lifetime: None,
            session_end_ttl: Self::DEFAULT_SESSION_END_TTL,
            clock: Clock::default(),
        }
    }

    /// Sets the expiry policy.
    pub fn with_expiry(mut self, expiry: Expiry) -> Self {
        self.expiry = expiry;
        self
    }

    /// Caps a session's lifetime: no write extends it past `max_lifetime` after the
    /// session was created, and a session older than that loads as a new, empty one.
    ///
    /// The creation time is kept in the record, under a reserved key that the
    /// [`Session`](crate::session::Session) API does not show. It survives
    /// [`cycle_id`](crate::session::Session::cycle_id) and
    /// [`clear`](crate::session::Session::clear); only
    /// [`flush`](crate::session::Session::flush) starts a new lifetime.
    pub fn with_max_lifetime(mut self, max_lifetime: Duration) -> Self {
        self.max_lifetime = Some(max_lifetime);
        self
    }

    /// Sets how long the store keeps an [`Expiry::OnSessionEnd`] session after its
    /// last write (default [`DEFAULT_SESSION_END_TTL`](Self::DEFAULT_SESSION_END_TTL)).
    pub fn with_session_end_ttl(mut self, ttl: Duration) -> Self {
        self.session_end_ttl = ttl;
        self
    }

    /// Reads the current time from `clock` instead of the system clock: for tests
    /// that move time forward instead of sleeping.
    pub fn with_clock(
        mut self,
        clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static,
    ) -> Self {
        self.clock = Clock::custom(clock);
        self
    }

    /// Returns the expiry policy.
    pub fn expiry(&self) -> Expiry {
        self.expiry
    }

    /// Returns the lifetime cap, if any.
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.max_lifetime
    }

    /// Returns how long the store keeps an [`Expiry::OnSessionEnd`] session after its
    /// last write.
    pub fn session_end_ttl(&self) -> Duration {
        self.session_end_ttl
    }

    /// Returns the current time from the configured clock.
    pub(crate) fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// The expiry date of a record written at `now`, for a session created at
    /// `created`.
    pub(crate) fn expiry_date(
        &self,
        created: OffsetDateTime,
        now: OffsetDateTime,
    ) -> OffsetDateTime {
        let policy = match self.expiry {
            Expiry::OnSessionEnd => now.saturating_add(self.session_end_ttl),
            Expiry::OnInactivity(idle) => now.saturating_add(idle),
            Expiry::AtDateTime(at) => at,
        };
        match self.max_lifetime {
            Some(cap) => policy.min(created.saturating_add(cap)),
            None => policy,
        }
    }

    /// Returns `true` if a session created at `created` is past its lifetime cap.
    pub(crate) fn is_past_lifetime(&self, created: OffsetDateTime, now: OffsetDateTime) -> bool {
        self.max_lifetime
            .is_some_and(|cap| created.saturating_add(cap) <= now)
    }

    /// The span by which each write moves the expiry date forward, for the policies
    /// that slide.
    pub(crate) fn sliding_window(&self) -> Option<Duration> {
        match self.expiry {
            Expiry::OnSessionEnd => Some(self.session_end_ttl),
            Expiry::OnInactivity(idle) => Some(idle),
            Expiry::AtDateTime(_) => None,
        }
    }

    /// The cookie's `Max-Age` for a record expiring at `expiry_date`: none for a
    /// browser-session cookie.
    pub(crate) fn cookie_max_age(
        &self,
        expiry_date: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Option<Duration> {
        match self.expiry {
            Expiry::OnSessionEnd => None,
            Expiry::OnInactivity(_) | Expiry::AtDateTime(_) => {
                Some((expiry_date - now).max(Duration::ZERO))
            }
        }
    }
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("expiry", &self.expiry)
            .field("max_lifetime", &self.max_lifetime)
            .field("session_end_ttl", &self.session_end_ttl)
            .field("clock", &self.clock)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }

    #[test]
    fn expiry_dates_follow_the_policy_and_the_cap() {
        let now = at(10_000);
        let idle = SessionConfig::new(Expiry::OnInactivity(Duration::seconds(100)));
        assert_eq!(idle.expiry_date(now, now), at(10_100));
        let capped = idle.clone().with_max_lifetime(Duration::seconds(150));
        assert_eq!(capped.expiry_date(at(9_900), now), at(10_050));
        assert!(capped.is_past_lifetime(at(9_850), now));
        assert!(!capped.is_past_lifetime(at(9_851), now));

        let end = SessionConfig::default();
        assert_eq!(
            end.expiry_date(now, now),
            now + SessionConfig::DEFAULT_SESSION_END_TTL
        );
        assert_eq!(end.cookie_max_age(at(20_000), now), None);

        let fixed = SessionConfig::new(Expiry::AtDateTime(at(12_000)));
        assert_eq!(fixed.expiry_date(now, now), at(12_000));
        assert_eq!(fixed.sliding_window(), None);
        assert_eq!(
            fixed.cookie_max_age(at(12_000), now),
            Some(Duration::seconds(2_000))
        );
        assert_eq!(
            fixed.cookie_max_age(at(9_000), now),
            Some(Duration::ZERO),
            "never a negative Max-Age"
        );
    }

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let config = SessionConfig::new(Expiry::OnInactivity(Duration::MAX))
            .with_max_lifetime(Duration::MAX);
        let now = at(0);
        assert!(config.expiry_date(now, now) > now);
        assert!(!config.is_past_lifetime(now, now));
    }

    #[test]
    fn creation_time_round_trips_and_is_hidden() {
        let mut record = Record::new(at(0));
        assert_eq!(created_at(&record).unwrap(), None);
        set_created_at(&mut record, at(1_234));
        assert_eq!(created_at(&record).unwrap(), Some(at(1_234)));
        assert!(has_no_user_values(&record));
        record.insert("k", &1u8).unwrap();
        assert!(!has_no_user_values(&record));
    }
}
