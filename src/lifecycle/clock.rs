//! The clock that stores and sessions read: the system clock, or one injected by tests.

use std::{
    fmt,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use time::OffsetDateTime;

/// Where the current time comes from: the system clock by default, or a function
/// given by `with_clock` constructors, so that expiry tests move time instead of
/// sleeping. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Clock(Option<Arc<dyn Fn() -> OffsetDateTime + Send + Sync>>);

impl Clock {
    /// A clock that reads `now`.
    pub(crate) fn custom(now: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(now)))
    }

    /// The current time.
    pub(crate) fn now(&self) -> OffsetDateTime {
        match &self.0 {
            Some(now) => now(),
            None => OffsetDateTime::now_utc(),
        }
    }

    /// The current time in Unix nanoseconds. The system clock is read directly:
    /// building an `OffsetDateTime` first would cost a calendar computation on every
    /// call, and hot paths only compare instants.
    pub(crate) fn now_nanos(&self) -> i128 {
        match &self.0 {
            Some(now) => now().unix_timestamp_nanos(),
            None => match SystemTime::now().duration_since(UNIX_EPOCH) {
                Ok(since) => since.as_nanos() as i128,
                Err(before) => -(before.duration().as_nanos() as i128),
            },
        }
    }
}

/// How far the coarse clock may lag the precise one, with a wide margin: it is
/// updated at every scheduler tick (a few milliseconds).
#[cfg(any(target_os = "linux", target_os = "android"))]
const COARSE_LAG: i128 = 1_000_000_000;

impl Clock {
    /// Returns `true` if the instant `at` (Unix nanoseconds) has passed.
    ///
    /// On Linux the system clock's coarse reading comes first: it never runs ahead of
    /// the precise one and lags it by a tick at most, so an instant more than a
    /// second after it has certainly not passed, and the precise clock, whose read
    /// stalls the CPU's memory pipeline, is read only for instants near now.
    #[inline]
    pub(crate) fn has_passed(&self, at: i128) -> bool {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if self.0.is_none() {
            let coarse = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
            let coarse = i128::from(coarse.tv_sec) * 1_000_000_000 + i128::from(coarse.tv_nsec);
            if at > coarse + COARSE_LAG {
                return false;
            }
        }
        at <= self.now_nanos()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "injected"
        } else {
            "system"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_passed_agrees_with_the_precise_clock() {
        let clock = Clock::default();
        let now = clock.now_nanos();
        let second = 1_000_000_000;
        for (at, passed) in [
            (now - 3600 * second, true),
            (now - second, true),
            (now - 1, true),
            (now + 5 * second, false),
            (now + 3600 * second, false),
        ] {
            assert_eq!(clock.has_passed(at), passed, "{at} against {now}");
        }
        // An injected clock is the only truth.
        let fixed = Clock::custom(|| OffsetDateTime::UNIX_EPOCH);
        assert!(fixed.has_passed(0));
        assert!(!fixed.has_passed(1));
    }

    #[test]
    fn both_readings_of_the_system_clock_agree() {
        let clock = Clock::default();
        let before = OffsetDateTime::now_utc().unix_timestamp_nanos();
        let nanos = clock.now_nanos();
        let after = clock.now().unix_timestamp_nanos();
        assert!(before <= nanos && nanos <= after);
    }

    #[test]
    fn an_injected_clock_is_read() {
        let clock = Clock::custom(|| OffsetDateTime::UNIX_EPOCH);
        assert_eq!(clock.now(), OffsetDateTime::UNIX_EPOCH);
        assert_eq!(clock.now_nanos(), 0);
        assert_eq!(format!("{clock:?}"), "injected");
    }
}
