//! Expired-session deletion over time: [`DeletionSchedule`] decides when the next pass
//! runs, the loop of [`ExpiredDeletion::continuously_delete_expired`] runs it.

use std::{
    fmt,
    panic::{self, AssertUnwindSafe},
    sync::Arc,
    time::Duration,
};

use crate::{
    lifecycle::timer::{Tick, Timer},
    session_store::{Error, ExpiredDeletion, Result},
};

/// The log target of the deletion loop and of [`DeletionSchedule`].
const TARGET: &str = "portable_sessions::deletion";

/// When to run the next pass of [`delete_expired`](ExpiredDeletion::delete_expired):
/// the period, its jitter and the backoff after failures, with no runtime attached.
///
/// The loop of [`ExpiredDeletion::continuously_delete_expired`] runs on a schedule,
/// and a scheduler the program already has (a job runner, its own loop) can use one
/// the same way: wait [`first_delay`](Self::first_delay), run a pass, hand its result
/// to [`after_pass`](Self::after_pass), wait the delay that returns, and so on.
///
/// - After a successful pass the next one is one **period** away.
/// - After a failed pass the failure is reported (see below) and the next pass is
///   tried sooner or later by **bounded exponential backoff**: the first retry after
///   `first` (by default the period or one second, whichever is shorter), each next
///   one twice as late, never later than `max` (by default the period), and never
///   sooner than [`MIN_BACKOFF`] (100 ms), so that a store that is down is not asked
///   again in a busy loop. The loop also yields between passes. A success
///   resets it.
/// - **Jitter** (none by default) lengthens every delay by a random part of itself,
///   so that processes started together spread their passes apart. The random numbers
///   come from a small generator seeded by the operating system.
///
/// Every failed pass is logged through the [`log`](https://docs.rs/log) facade (target
/// `portable_sessions::deletion`: a warning, an error once the backoff has reached
/// `max`) and passed to the callback set with [`on_error`](Self::on_error). Successful
/// passes are logged at debug level. In the loop, a pass that panics is a failed
/// pass like any other (its error says so), and a callback that panics is logged:
/// neither ends the loop.
///
/// A schedule also counts passes, failures and deleted records: see
/// [`summary`](Self::summary). A clone gets its own random sequence.
///
/// # Examples
///
/// Driving deletion from a scheduler of your own, here a loop that polls every so
/// often (in a real program, a job runner or a timer wheel):
///
/// ```
/// use std::time::{Duration, Instant};
/// use portable_sessions::{DeletionSchedule, ExpiredDeletion, MemoryStore};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let store = MemoryStore::new();
/// let mut schedule = DeletionSchedule::new(Duration::from_millis(20)).with_jitter(0.1);
/// let mut next_pass = Instant::now() + schedule.first_delay();
/// for _ in 0..10 {
///     std::thread::sleep(Duration::from_millis(5)); // the scheduler's own tick
///     if Instant::now() >= next_pass {
///         let result = store.delete_expired().await;
///         next_pass = Instant::now() + schedule.after_pass(&result);
///     }
/// }
/// assert!(schedule.summary().passes >= 1);
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
pub struct DeletionSchedule {
    period: Duration,
    jitter: f64,
    backoff_first: Duration,
    backoff_max: Duration,
    failures_in_a_row: u32,
    summary: DeletionSummary,
    rng: SplitMix64,
    on_error: Option<Arc<ErrorHook>>,
}

type ErrorHook = dyn Fn(&DeletionFailure<'_>) + Send + Sync;

/// What a deletion loop or a [`DeletionSchedule`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct DeletionSummary {
    /// Passes run, failed ones included.
    pub passes: u64,
    /// Passes that failed.
    pub failures: u64,
    /// Expired records deleted, over all passes.
    pub deleted: u64,
}

/// A failed pass, as passed to the callback set with
/// [`DeletionSchedule::on_error`].
#[derive(Debug)]
#[non_exhaustive]
pub struct DeletionFailure<'a> {
    /// The store's error.
    pub error: &'a Error,
    /// How many passes in a row have failed, this one included.
    pub failures_in_a_row: u32,
    /// How long until the next try.
    pub retry_in: Duration,
}

impl DeletionSchedule {
    /// Makes a schedule that runs a pass every `period`, without jitter, and backs off
    /// from `min(period, 1 s)` up to `period` after failures.
    ///
    /// A zero period runs passes back to back.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            jitter: 0.0,
            backoff_first: period.min(Duration::from_secs(1)),
            backoff_max: period,
            failures_in_a_row: 0,
            summary: DeletionSummary::default(),
            rng: SplitMix64::from_os(),
            on_error: None,
        }
    }

    /// Lengthens every delay by a random part of itself, up to `fraction` of it: with
    /// `0.1`, a period of 60 s becomes anything from 60 s to 66 s.
    ///
    /// `fraction` is clamped to `0.0..=1.0` (a NaN means no jitter).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use portable_sessions::DeletionSchedule;
    ///
    /// let mut schedule = DeletionSchedule::new(Duration::from_secs(60)).with_jitter(0.1);
    /// let delay = schedule.first_delay();
    /// assert!(delay >= Duration::from_secs(60) && delay <= Duration::from_secs(66));
    /// ```
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self
    }

    /// Backs off after failed passes from `first`, doubling each time, up to `max`.
    ///
    /// A `first` longer than `max` is cut to `max`.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use portable_sessions::{session_store::Error, DeletionSchedule};
    ///
    /// let mut schedule = DeletionSchedule::new(Duration::from_secs(300))
    ///     .with_backoff(Duration::from_secs(10), Duration::from_secs(30));
    /// let failed = Err(Error::backend("database unreachable"));
    /// let retries: Vec<u64> = (0..4).map(|_| schedule.after_pass(&failed).as_secs()).collect();
    /// assert_eq!(retries, [10, 20, 30, 30]);
    /// assert_eq!(schedule.after_pass(&Ok(3)), Duration::from_secs(300)); // reset
    /// ```
    pub fn with_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff_first = first.min(max);
        self.backoff_max = max;
        self
    }

    /// Calls `hook` for every failed pass, in addition to logging it: to count
    /// failures, raise an alert, or fail a test.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use portable_sessions::DeletionSchedule;
    ///
    /// let schedule = DeletionSchedule::new(Duration::from_secs(60)).on_error(|failure| {
    ///     eprintln!(
    ///         "session cleanup failed {} time(s) in a row, retrying in {:?}: {}",
    ///         failure.failures_in_a_row,
    ///         failure.retry_in,
    ///         failure.error.report(),
    ///     );
    /// });
    /// # drop(schedule);
    /// ```
    pub fn on_error(mut self, hook: impl Fn(&DeletionFailure<'_>) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(hook));
        self
    }

    /// Returns the period between successful passes, before jitter.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Returns how many passes in a row have failed up to now.
    pub fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row
    }

    /// Returns the passes, failures and deleted records counted so far.
    pub fn summary(&self) -> DeletionSummary {
        self.summary
    }

    /// Returns how long to wait before the first pass: one period, with jitter.
    pub fn first_delay(&mut self) -> Duration {
        self.jittered(self.period)
    }

    /// Records the result of a pass and returns how long to wait before the next one:
    /// a period after a success, the backoff after a failure (which it also reports).
    pub fn after_pass(&mut self, result: &Result<usize>) -> Duration {
        self.summary.passes = self.summary.passes.saturating_add(1);
        match result {
            Ok(deleted) => {
                self.failures_in_a_row = 0;
                let deleted = u64::try_from(*deleted).unwrap_or(u64::MAX);
                self.summary.deleted = self.summary.deleted.saturating_add(deleted);
                log::debug!(target: TARGET, "deleted {deleted} expired sessions");
                self.jittered(self.period)
            }
            Err(error) => {
                self.summary.failures = self.summary.failures.saturating_add(1);
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                let backoff = self.backoff();
                let retry_in = self.jittered(backoff);
                let level = if backoff < self.backoff_max {
                    log::Level::Warn
                } else {
                    log::Level::Error
                };
                log::log!(
                    target: TARGET,
                    level,
                    "deleting expired sessions failed ({} in a row), retrying in {retry_in:?}: {}",
                    self.failures_in_a_row,
                    error.report()
                );
                if let Some(hook) = &self.on_error {
                    let failure = DeletionFailure {
                        error,
                        failures_in_a_row: self.failures_in_a_row,
                        retry_in,
                    };
                    // A hook that panics must not end the loop that called it.
                    let called = panic::catch_unwind(AssertUnwindSafe(|| hook(&failure)));
                    if let Err(payload) = called {
                        log::error!(
                            target: TARGET,
                            "the deletion loop's on_error hook panicked: {}",
                            panic_message(payload.as_ref())
                        );
                    }
                }
                retry_in
            }
        }
    }

    /// The backoff after `failures_in_a_row` failures (at least one), before jitter:
    /// never below [`MIN_BACKOFF`], whatever was configured.
    fn backoff(&self) -> Duration {
        self.uncapped_backoff().max(MIN_BACKOFF)
    }

    fn uncapped_backoff(&self) -> Duration {
        let doublings = self.failures_in_a_row.saturating_sub(1).min(127);
        let nanos = self
            .backoff_first
            .as_nanos()
            .saturating_mul(1u128 << doublings);
        if nanos >= self.backoff_max.as_nanos() {
            return self.backoff_max;
        }
        // Below `backoff_max`, so it fits in a `Duration`.
        const NANOS_PER_SEC: u128 = 1_000_000_000;
        Duration::new(
            (nanos / NANOS_PER_SEC) as u64,
            (nanos % NANOS_PER_SEC) as u32,
        )
    }

    fn jittered(&mut self, delay: Duration) -> Duration {
        if self.jitter == 0.0 {
            return delay;
        }
        let extra = delay.as_secs_f64() * self.jitter * self.rng.next_unit();
        delay.saturating_add(Duration::try_from_secs_f64(extra).unwrap_or(Duration::MAX))
    }
}

impl Clone for DeletionSchedule {
    fn clone(&self) -> Self {
        Self {
            rng: SplitMix64::from_os(),
            on_error: self.on_error.clone(),
            ..*self
        }
    }
}

impl fmt::Debug for DeletionSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeletionSchedule")
            .field("period", &self.period)
            .field("jitter", &self.jitter)
            .field("backoff_first", &self.backoff_first)
            .field("backoff_max", &self.backoff_max)
            .field("failures_in_a_row", &self.failures_in_a_row)
            .field("summary", &self.summary)
            .field("on_error", &self.on_error.is_some())
            .finish()
    }
}

/// The shortest wait after a failed pass, whatever the schedule says: a store that is
/// down is not asked again in a busy loop.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Lets other tasks on the executor (or other threads) run: between two passes, so
/// that a loop whose timer returns at once (a zero period) never starves them.
#[maybe_async::async_impl]
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}

#[maybe_async::sync_impl]
fn yield_now() {
    std::thread::yield_now();
}

/// Runs one pass; a pass that panics is a failed pass (reported and retried like
/// an error), never the end of the loop.
#[maybe_async::async_impl]
async fn pass<S: ExpiredDeletion + ?Sized>(store: &S) -> Result<usize> {
    use std::future::Future;
    let mut pass = std::pin::pin!(store.delete_expired());
    std::future::poll_fn(|cx| {
        match panic::catch_unwind(AssertUnwindSafe(|| pass.as_mut().poll(cx))) {
            Ok(polled) => polled,
            Err(payload) => std::task::Poll::Ready(Err(panicked(payload.as_ref()))),
        }
    })
    .await
}

#[maybe_async::sync_impl]
fn pass<S: ExpiredDeletion + ?Sized>(store: &S) -> Result<usize> {
    panic::catch_unwind(AssertUnwindSafe(|| store.delete_expired()))
        .unwrap_or_else(|payload| Err(panicked(payload.as_ref())))
}

/// The error for a pass that panicked.
fn panicked(payload: &(dyn std::any::Any + Send)) -> Error {
    Error::backend(format!(
        "delete_expired panicked: {}",
        panic_message(payload)
    ))
}

/// The message of a panic, when it carried one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs passes of `store.delete_expired()` on `schedule`, sleeping on `timer`, until
/// the timer says stop. The body of [`ExpiredDeletion::continuously_delete_expired`].
#[maybe_async::maybe_async]
pub(crate) async fn run<S: ExpiredDeletion + ?Sized>(
    store: &S,
    mut schedule: DeletionSchedule,
    timer: &dyn Timer,
) -> DeletionSummary {
    let mut delay = schedule.first_delay();
    while timer.sleep(delay).await == Tick::Continue {
        let result = pass(store).await;
        delay = schedule.after_pass(&result);
        yield_now().await;
    }
    let summary = schedule.summary();
    log::debug!(target: TARGET, "deletion loop stopped: {summary:?}");
    summary
}

/// SplitMix64: a tiny generator, plenty for jitter and with no state worth guarding.
#[derive(Clone, Copy)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn from_os() -> Self {
        // Without the OS generator, the clock still tells processes apart.
        let seed = getrandom::u64().unwrap_or_else(|_| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (now.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
        });
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0.0..1.0`.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_never_goes_below_the_floor() {
        let mut schedule =
            DeletionSchedule::new(Duration::ZERO).with_backoff(Duration::ZERO, Duration::ZERO);
        let failed = Err(crate::session_store::Error::backend("down"));
        for _ in 0..5 {
            assert_eq!(schedule.after_pass(&failed), MIN_BACKOFF);
        }
        assert_eq!(
            schedule.after_pass(&Ok(0)),
            Duration::ZERO,
            "a success keeps the period"
        );
    }

    #[test]
    fn backoff_doubles_saturates_and_stays_capped() {
        let mut schedule = DeletionSchedule::new(Duration::MAX)
            .with_backoff(Duration::from_nanos(1), Duration::from_secs(3600));
        let mut last = Duration::ZERO;
        for n in 1..=200u32 {
            schedule.failures_in_a_row = n;
            let backoff = schedule.backoff();
            assert!(backoff >= last && backoff <= Duration::from_secs(3600));
            last = backoff;
        }
        assert_eq!(last, Duration::from_secs(3600));
        schedule.failures_in_a_row = u32::MAX;
        assert_eq!(schedule.backoff(), Duration::from_secs(3600));
    }

    #[test]
    fn unit_numbers_stay_in_range_and_vary() {
        let mut rng = SplitMix64(0);
        let draws: Vec<f64> = (0..1000).map(|_| rng.next_unit()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }
}
