//! [`Expiry`] and [`SessionConfig`]: when a session ends.

use std::fmt;

use time::{Duration, OffsetDateTime};

use crate::{
    lifecycle::clock::Clock,
    session::{encode_value, Record},
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
/// Its durations, and [`SessionConfig`]'s, are [`time::Duration`]s (signed; the
/// crate re-exports `time` as `portable_sessions::time`, so no version can
/// mismatch), never `std::time::Duration`: passing one of those gives "expected
/// `Duration`, found `std::time::Duration`". What waits on a clock of the machine
/// takes `std::time::Duration`: the deletion loop's
/// [`DeletionSchedule`](crate::DeletionSchedule) and timers, the stores' timeouts,
/// and the cache's lifetimes.
///
/// One session can have a policy of its own ("remember me"):
/// [`Session::set_expiry`](crate::session::Session::set_expiry).
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

/// The reserved key under which a record keeps the expiry policy that
/// [`Session::set_expiry`](crate::session::Session::set_expiry) gave its session,
/// when it differs from the configuration's.
pub(crate) const EXPIRY_KEY: &str = "\0expiry";

/// Encodes a session's own expiry policy, for [`EXPIRY_KEY`]: a tag and one number
/// (nanoseconds of the duration, or of the date since the Unix epoch).
pub(crate) fn encode_policy(expiry: Expiry) -> Vec<u8> {
    let (tag, nanos): (u8, i128) = match expiry {
        Expiry::OnSessionEnd => (0, 0),
        Expiry::OnInactivity(idle) => (1, idle.whole_nanoseconds()),
        Expiry::AtDateTime(at) => (2, at.unix_timestamp_nanos()),
    };
    // A u8 and an i128 always encode, so there is no error to report.
    postcard::to_allocvec(&(tag, nanos)).unwrap_or_default()
}

/// Reads back what [`encode_policy`] wrote.
fn decode_policy(bytes: &[u8]) -> Result<Expiry> {
    let (tag, nanos) = postcard::from_bytes::<(u8, i128)>(bytes).map_err(Error::decode)?;
    match tag {
        0 => Ok(Expiry::OnSessionEnd),
        1 => i64::try_from(nanos / 1_000_000_000)
            .map(|secs| Expiry::OnInactivity(Duration::new(secs, (nanos % 1_000_000_000) as i32)))
            .map_err(Error::decode),
        2 => OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .map(Expiry::AtDateTime)
            .map_err(Error::decode),
        other => Err(Error::decode(format!("unknown expiry policy tag {other}"))),
    }
}

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
    let bytes = encode_value(&at.unix_timestamp()).unwrap_or_default();
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
    owner_limit: Option<usize>,
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
            owner_limit: None,
            clock: Clock::default(),
        }
    }

    /// Caps how many live sessions one owner has: when a session gets an owner
    /// ([`Session::set_owner`](crate::session::Session::set_owner), at login), the
    /// write is followed by ending that owner's oldest sessions (by when they got
    /// the owner) beyond `limit`, the new one included in the count. Two logins at
    /// once leave at most `limit`: each ends what is beyond the limit once its own
    /// session is written, so the later one sees both. A `limit` of 0 counts as 1.
    pub fn with_owner_limit(mut self, limit: usize) -> Self {
        self.owner_limit = Some(limit.max(1));
        self
    }

    /// The cap on an owner's live sessions, if any; see
    /// [`with_owner_limit`](Self::with_owner_limit).
    pub fn owner_limit(&self) -> Option<usize> {
        self.owner_limit
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

    /// The policy `record`'s session expires by: its own, set with
    /// [`Session::set_expiry`](crate::session::Session::set_expiry), or this
    /// configuration's. An unreadable policy of its own is logged and ignored.
    pub(crate) fn policy(&self, record: &Record) -> Expiry {
        let Some(bytes) = record.get_raw(EXPIRY_KEY) else {
            return self.expiry;
        };
        decode_policy(bytes).unwrap_or_else(|err| {
            log::warn!(
                target: "portable_sessions::session",
                "session {:?} has an unreadable expiry policy of its own, using the \
                 configured one: {}",
                record.id,
                err.report()
            );
            self.expiry
        })
    }

    /// The expiry date of a record written at `now` under `expiry`, for a session
    /// created at `created`.
    pub(crate) fn expiry_date(
        &self,
        expiry: Expiry,
        created: OffsetDateTime,
        now: OffsetDateTime,
    ) -> OffsetDateTime {
        let policy = match expiry {
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
    pub(crate) fn sliding_window(&self, expiry: Expiry) -> Option<Duration> {
        match expiry {
            Expiry::OnSessionEnd => Some(self.session_end_ttl),
            Expiry::OnInactivity(idle) => Some(idle),
            Expiry::AtDateTime(_) => None,
        }
    }

    /// The cookie's `Max-Age` for a record expiring at `expiry_date` under
    /// `expiry`: none for a browser-session cookie.
    fn max_age(
        expiry: Expiry,
        expiry_date: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Option<Duration> {
        match expiry {
            Expiry::OnSessionEnd => None,
            Expiry::OnInactivity(_) | Expiry::AtDateTime(_) => {
                Some((expiry_date - now).max(Duration::ZERO))
            }
        }
    }

    // What a request's commit asks of its record, one call each: the date its write
    // gives it, whether an unchanged session is due for a refresh, and the cookie.

    /// The expiry date a write made at `now` gives `record`, by the session's own
    /// policy or this configuration's, within the lifetime cap.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`] when the record's creation time is unreadable.
    pub(crate) fn write_date(
        &self,
        record: &Record,
        now: OffsetDateTime,
    ) -> Result<OffsetDateTime> {
        let created = created_at(record)?.unwrap_or(now);
        Ok(self.expiry_date(self.policy(record), created, now))
    }

    /// Returns `true` if rewriting `record` now would move its expiry date forward
    /// by at least `fraction` of its sliding window (never without a fraction, or
    /// for a policy that does not slide).
    ///
    /// # Errors
    ///
    /// As for [`write_date`](Self::write_date).
    pub(crate) fn refresh_due(
        &self,
        record: &Record,
        now: OffsetDateTime,
        fraction: Option<f64>,
    ) -> Result<bool> {
        let policy = self.policy(record);
        let (Some(fraction), Some(window)) = (fraction, self.sliding_window(policy)) else {
            return Ok(false);
        };
        let gain = self.write_date(record, now)? - record.expiry_date;
        let threshold =
            Duration::checked_seconds_f64(window.as_seconds_f64() * fraction).unwrap_or(window);
        Ok(gain > Duration::ZERO && gain >= threshold)
    }

    /// The policy `record` expires by, and its cookie's `Max-Age` at `now` (none for
    /// a browser-session cookie).
    pub(crate) fn cookie_max_age(
        &self,
        record: &Record,
        now: OffsetDateTime,
    ) -> (Expiry, Option<Duration>) {
        let policy = self.policy(record);
        (policy, Self::max_age(policy, record.expiry_date, now))
    }
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("expiry", &self.expiry)
            .field("max_lifetime", &self.max_lifetime)
            .field("session_end_ttl", &self.session_end_ttl)
            .field("owner_limit", &self.owner_limit)
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
        let policy = Expiry::OnInactivity(Duration::seconds(100));
        let idle = SessionConfig::new(policy);
        assert_eq!(idle.expiry_date(policy, now, now), at(10_100));
        let capped = idle.clone().with_max_lifetime(Duration::seconds(150));
        assert_eq!(capped.expiry_date(policy, at(9_900), now), at(10_050));
        assert!(capped.is_past_lifetime(at(9_850), now));
        assert!(!capped.is_past_lifetime(at(9_851), now));

        let end = SessionConfig::default();
        assert_eq!(
            end.expiry_date(Expiry::OnSessionEnd, now, now),
            now + SessionConfig::DEFAULT_SESSION_END_TTL
        );
        assert_eq!(
            SessionConfig::max_age(Expiry::OnSessionEnd, at(20_000), now),
            None
        );

        let fixed = Expiry::AtDateTime(at(12_000));
        assert_eq!(
            SessionConfig::new(fixed).expiry_date(fixed, now, now),
            at(12_000)
        );
        assert_eq!(end.sliding_window(fixed), None);
        assert_eq!(
            SessionConfig::max_age(fixed, at(12_000), now),
            Some(Duration::seconds(2_000))
        );
        assert_eq!(
            SessionConfig::max_age(fixed, at(9_000), now),
            Some(Duration::ZERO),
            "never a negative Max-Age"
        );
    }

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let config = SessionConfig::new(Expiry::OnInactivity(Duration::MAX))
            .with_max_lifetime(Duration::MAX);
        let now = at(0);
        assert!(config.expiry_date(config.expiry(), now, now) > now);
        assert!(!config.is_past_lifetime(now, now));
    }

    #[test]
    fn a_sessions_own_policy_round_trips_and_a_corrupt_one_falls_back() {
        let config = SessionConfig::new(Expiry::OnSessionEnd);
        let mut record = Record::new(at(0));
        assert_eq!(config.policy(&record), Expiry::OnSessionEnd);
        for policy in [
            Expiry::OnInactivity(Duration::new(-3, -5)),
            Expiry::OnInactivity(Duration::MAX),
            Expiry::AtDateTime(at(1_700_000_000) + Duration::nanoseconds(7)),
            Expiry::OnSessionEnd,
        ] {
            record.insert_raw(EXPIRY_KEY, encode_policy(policy));
            assert_eq!(config.policy(&record), policy);
        }
        record.insert_raw(EXPIRY_KEY, vec![9, 0]);
        assert_eq!(config.policy(&record), Expiry::OnSessionEnd);
        assert!(has_no_user_values(&record));
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
