//! The deletion loop and its schedule, in both modes: deterministic tests on a fake timer
//! written here against the public API, then the built-in timers on real threads, smol
//! and tokio.

use std::{
    sync::{
        atomic::{AtomicI64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use portable_sessions::{
    session::{Id, Record},
    session_store::{Error, Result},
    DeletionSchedule, DeletionSummary, ExpiredDeletion, MemoryStore, SessionStore, Tick, Timer,
};
use time::OffsetDateTime;

/// Declares a test that runs a scenario: a plain call in blocking mode, on a tiny
/// executor in async mode.
macro_rules! scenario_test {
    ($test:ident, $scenario:ident) => {
        #[test]
        fn $test() {
            #[cfg(feature = "sync")]
            $scenario();
            #[cfg(not(feature = "sync"))]
            futures_lite::future::block_on($scenario());
        }
    };
}

const MINUTE: Duration = Duration::from_secs(60);

/// A timer that never waits: it records each requested sleep, moves a simulated clock
/// forward by it, and says stop after `continues` sleeps.
#[derive(Debug, Default)]
struct FakeTimer {
    sleeps: Mutex<Vec<Duration>>,
    continues: usize,
    /// Milliseconds since the Unix epoch, as read by a store made with `clocked_store`.
    clock: Arc<AtomicI64>,
}

impl FakeTimer {
    fn new(continues: usize) -> Self {
        Self {
            continues,
            clock: Arc::new(AtomicI64::new(1_700_000_000_000)),
            ..Self::default()
        }
    }

    fn sleeps(&self) -> Vec<Duration> {
        self.sleeps.lock().unwrap().clone()
    }

    fn now(&self) -> OffsetDateTime {
        millis_to_time(self.clock.load(Ordering::SeqCst))
    }

    /// A store whose clock is this timer's simulated clock.
    fn clocked_store(&self) -> MemoryStore {
        let clock = self.clock.clone();
        MemoryStore::with_clock(move || millis_to_time(clock.load(Ordering::SeqCst)))
    }
}

fn millis_to_time(millis: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).unwrap()
}

#[maybe_async::maybe_async]
impl Timer for FakeTimer {
    async fn sleep(&self, duration: Duration) -> Tick {
        let mut sleeps = self.sleeps.lock().unwrap();
        if sleeps.len() == self.continues {
            return Tick::Stop;
        }
        sleeps.push(duration);
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 2);
        self.clock.fetch_add(millis, Ordering::SeqCst);
        Tick::Continue
    }
}

/// A store whose `delete_expired` fails its first `failures` calls (with an error,
/// or a panic when `panics`).
#[derive(Debug, Clone)]
struct FlakyStore {
    inner: MemoryStore,
    failures_left: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    panics: bool,
}

impl FlakyStore {
    fn new(inner: MemoryStore, failures: usize) -> Self {
        Self {
            inner,
            failures_left: Arc::new(AtomicUsize::new(failures)),
            calls: Arc::default(),
            panics: false,
        }
    }
}

#[maybe_async::maybe_async]
impl SessionStore for FlakyStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.inner.create(record).await
    }
    async fn save(&self, record: &Record) -> Result<()> {
        self.inner.save(record).await
    }
    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        self.inner.load(id).await
    }
    async fn delete(&self, id: &Id) -> Result<()> {
        self.inner.delete(id).await
    }
}

#[maybe_async::maybe_async]
impl ExpiredDeletion for FlakyStore {
    async fn delete_expired(&self) -> Result<usize> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 {
            self.failures_left.store(left - 1, Ordering::SeqCst);
            if self.panics {
                panic!("a bug in delete_expired");
            }
            return Err(Error::backend("database unreachable"));
        }
        self.inner.delete_expired().await
    }
}

/// Adds one session per expiry date.
#[maybe_async::maybe_async]
async fn add_sessions(store: &impl SessionStore, expiry_dates: &[OffsetDateTime]) {
    for &expiry in expiry_dates {
        let mut record = Record::new(expiry);
        store.create(&mut record).await.unwrap();
    }
}

/// `(passes, failures, deleted)`.
fn parts(summary: DeletionSummary) -> (u64, u64, u64) {
    (summary.passes, summary.failures, summary.deleted)
}

#[maybe_async::maybe_async]
async fn waits_a_period_before_each_pass_scenario() {
    let timer = FakeTimer::new(3);
    let store = timer.clocked_store();
    let now = timer.now();
    // Expire 30 s, 90 s and 10 min from now: passes run at 60 s, 120 s and 180 s.
    let offsets = [30, 90, 600].map(|s| now + time::Duration::seconds(s));
    add_sessions(&store, &offsets).await;

    let result = store
        .continuously_delete_expired(DeletionSchedule::new(MINUTE), &timer)
        .await;
    // Three periods passed, three passes ran, the fourth sleep said stop.
    assert_eq!(timer.sleeps(), vec![MINUTE; 3]);
    assert_eq!(parts(result), (3, 0, 2));
    assert_eq!(store.len(), 1, "the session expiring in 10 minutes is kept");
}

scenario_test!(
    waits_a_period_before_each_pass,
    waits_a_period_before_each_pass_scenario
);

#[maybe_async::maybe_async]
async fn no_pass_runs_when_stopped_during_the_first_wait_scenario() {
    let timer = FakeTimer::new(0);
    let flaky = FlakyStore::new(timer.clocked_store(), 0);
    let calls = flaky.calls.clone();
    // Through `dyn`: the loop takes no generic parameter, so the trait stays dyn-safe.
    let store: Arc<dyn ExpiredDeletion> = Arc::new(flaky);
    let result = store
        .continuously_delete_expired(DeletionSchedule::new(MINUTE), &timer)
        .await;
    assert_eq!(parts(result), (0, 0, 0));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

scenario_test!(
    no_pass_runs_when_stopped_during_the_first_wait,
    no_pass_runs_when_stopped_during_the_first_wait_scenario
);

#[maybe_async::maybe_async]
async fn failed_passes_back_off_then_delete_scenario() {
    let timer = FakeTimer::new(7);
    let memory = timer.clocked_store();
    let store = FlakyStore::new(memory.clone(), 5);
    let past = timer.now() - time::Duration::seconds(1);
    add_sessions(&store, &[past, past, past]).await;

    let reported = Arc::new(Mutex::new(Vec::new()));
    let sink = reported.clone();
    let schedule = DeletionSchedule::new(10 * MINUTE)
        .with_backoff(Duration::from_secs(1), Duration::from_secs(10))
        .on_error(move |failure| {
            assert!(matches!(failure.error, Error::Backend(_)));
            sink.lock()
                .unwrap()
                .push((failure.failures_in_a_row, failure.retry_in));
        });
    let result = store.continuously_delete_expired(schedule, &timer).await;

    let secs = |s: u64| Duration::from_secs(s);
    // A period, then 1 s, 2 s, 4 s, 8 s, the 10 s cap after the five failures, then
    // the sixth pass succeeds and the next wait is a period again.
    assert_eq!(
        timer.sleeps(),
        vec![
            10 * MINUTE,
            secs(1),
            secs(2),
            secs(4),
            secs(8),
            secs(10),
            10 * MINUTE
        ]
    );
    assert_eq!(
        *reported.lock().unwrap(),
        vec![
            (1, secs(1)),
            (2, secs(2)),
            (3, secs(4)),
            (4, secs(8)),
            (5, secs(10))
        ]
    );
    assert_eq!(parts(result), (7, 5, 3));
    assert!(memory.is_empty());
}

scenario_test!(
    failed_passes_back_off_then_delete,
    failed_passes_back_off_then_delete_scenario
);

/// A pass that panics is a failed pass, reported and retried; a hook that panics is
/// logged; neither ends the loop.
#[maybe_async::maybe_async]
async fn panics_in_a_pass_or_the_hook_do_not_end_the_loop_scenario() {
    let timer = FakeTimer::new(4);
    let memory = timer.clocked_store();
    let mut store = FlakyStore::new(memory.clone(), 2);
    store.panics = true;
    let past = timer.now() - time::Duration::seconds(1);
    add_sessions(&store, &[past, past]).await;

    let reported = Arc::new(Mutex::new(Vec::new()));
    let sink = reported.clone();
    let schedule = DeletionSchedule::new(MINUTE).on_error(move |failure| {
        sink.lock().unwrap().push(failure.error.report());
        panic!("a bug in the hook");
    });
    let result = store.continuously_delete_expired(schedule, &timer).await;
    assert_eq!(
        parts(result),
        (4, 2, 2),
        "two panicked passes, then two that ran"
    );
    let reported = reported.lock().unwrap().clone();
    assert_eq!(reported.len(), 2);
    assert!(
        reported[0].contains("delete_expired panicked: a bug in delete_expired"),
        "{reported:?}"
    );
    assert!(memory.is_empty());
}

scenario_test!(
    panics_in_a_pass_or_the_hook_do_not_end_the_loop,
    panics_in_a_pass_or_the_hook_do_not_end_the_loop_scenario
);

#[test]
fn backoff_starts_over_after_a_success() {
    let mut schedule =
        DeletionSchedule::new(MINUTE).with_backoff(Duration::from_secs(2), Duration::from_secs(30));
    let failed: Result<usize> = Err(Error::backend("down"));
    let delays: Vec<_> = [&failed, &failed, &failed, &Ok(4), &failed, &Ok(0)]
        .into_iter()
        .map(|result| schedule.after_pass(result).as_secs())
        .collect();
    assert_eq!(delays, [2, 4, 8, 60, 2, 60]);
    assert_eq!(schedule.failures_in_a_row(), 0);
    assert_eq!(parts(schedule.summary()), (6, 4, 4));
}

#[test]
fn default_backoff_is_capped_at_the_period() {
    let failed: Result<usize> = Err(Error::backend("down"));
    let mut schedule = DeletionSchedule::new(Duration::from_secs(5));
    let delays: Vec<_> = (0..5)
        .map(|_| schedule.after_pass(&failed).as_secs())
        .collect();
    assert_eq!(delays, [1, 2, 4, 5, 5]);

    // A period shorter than a second backs off at the period itself.
    let mut schedule = DeletionSchedule::new(Duration::from_millis(100));
    let delay = schedule.after_pass(&failed);
    assert_eq!(delay, Duration::from_millis(100));
}

/// `delay <= actual <= delay * (1 + jitter)`, with a nanosecond of rounding slack.
fn assert_jittered(actual: Duration, delay: Duration, jitter: f64) {
    let max = delay + delay.mul_f64(jitter) + Duration::from_nanos(1);
    assert!(
        actual >= delay && actual <= max,
        "{actual:?} outside {delay:?}..={max:?}"
    );
}

#[maybe_async::maybe_async]
async fn jitter_stays_within_its_bounds_scenario() {
    let timer = FakeTimer::new(400);
    let store = FlakyStore::new(timer.clocked_store(), 0);
    let schedule = DeletionSchedule::new(MINUTE).with_jitter(0.25);
    let result = store.continuously_delete_expired(schedule, &timer).await;
    assert_eq!(result.passes, 400);

    let sleeps = timer.sleeps();
    for &sleep in &sleeps {
        assert_jittered(sleep, MINUTE, 0.25);
    }
    // Really random: spread over most of the range, not one value.
    let min = sleeps.iter().min().unwrap();
    let max = sleeps.iter().max().unwrap();
    assert!(*max - *min > Duration::from_secs(10), "{min:?}..{max:?}");

    // Backoff delays get jitter too.
    let mut schedule = DeletionSchedule::new(MINUTE)
        .with_jitter(0.5)
        .with_backoff(Duration::from_secs(5), MINUTE);
    let failed: Result<usize> = Err(Error::backend("down"));
    for n in 0..8 {
        let backoff = (Duration::from_secs(5) * 2u32.pow(n)).min(MINUTE);
        assert_jittered(schedule.after_pass(&failed), backoff, 0.5);
    }
}

scenario_test!(
    jitter_stays_within_its_bounds,
    jitter_stays_within_its_bounds_scenario
);

#[test]
fn clones_draw_their_own_jitter() {
    let mut first = DeletionSchedule::new(MINUTE).with_jitter(1.0);
    let mut second = first.clone();
    let a: Vec<_> = (0..8).map(|_| first.first_delay()).collect();
    let b: Vec<_> = (0..8).map(|_| second.first_delay()).collect();
    assert_ne!(a, b);
}

#[test]
fn odd_settings_never_panic() {
    let failed: Result<usize> = Err(Error::backend("down"));
    for jitter in [
        f64::NAN,
        -1.0,
        0.0,
        1.0,
        7.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        for period in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            let mut schedule = DeletionSchedule::new(period)
                .with_jitter(jitter)
                .with_backoff(Duration::MAX, Duration::from_secs(1));
            let first = schedule.first_delay();
            assert!(first >= period);
            for _ in 0..70 {
                let retry = schedule.after_pass(&failed);
                assert!(retry <= Duration::from_secs(2), "{retry:?}");
            }
            let after = schedule.after_pass(&Ok(usize::MAX));
            assert!(after >= period);
            let _ = schedule.after_pass(&Ok(usize::MAX));
            assert_eq!(schedule.summary().deleted, u64::MAX);
            assert!(format!("{schedule:?}").contains("DeletionSchedule"));
        }
    }
}

#[test]
fn schedule_and_summary_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<DeletionSchedule>();
    assert_send_sync::<DeletionSummary>();
    assert_send_sync::<portable_sessions::StopHandle>();
}

/// A second ago, by the system clock (for the timers that really wait).
#[cfg(any(feature = "sync", feature = "async-io"))]
fn past() -> OffsetDateTime {
    OffsetDateTime::now_utc() - time::Duration::seconds(1)
}

/// The built-in timers on std threads.
#[cfg(feature = "sync")]
mod threads {
    use std::time::Instant;

    use portable_sessions::ThreadTimer;

    use super::*;

    /// Waits (really) until `store` is empty, for at most five seconds.
    fn wait_until_empty(store: &MemoryStore) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !store.is_empty() {
            assert!(Instant::now() < deadline, "sessions never deleted");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn loop_on_a_thread_deletes_then_stops() {
        let memory = MemoryStore::new();
        let store = FlakyStore::new(memory.clone(), 2);
        add_sessions(&store, &[past(); 4]);
        let timer = ThreadTimer::new();
        let stop = timer.stop_handle();
        let schedule = DeletionSchedule::new(Duration::from_millis(10))
            .with_backoff(Duration::from_millis(1), Duration::from_millis(10));
        let worker =
            std::thread::spawn(move || store.continuously_delete_expired(schedule, &timer));

        wait_until_empty(&memory);
        stop.stop();
        let result = worker.join().unwrap();
        assert_eq!((result.failures, result.deleted), (2, 4));
        assert!(result.passes >= 3);
    }

    #[test]
    fn stop_wakes_a_thread_in_the_middle_of_a_long_period() {
        let timer = ThreadTimer::new();
        let stop = timer.stop_handle();
        let store = MemoryStore::new();
        let started = Instant::now();
        let worker = std::thread::spawn(move || {
            store.continuously_delete_expired(
                DeletionSchedule::new(Duration::from_secs(3600)),
                &timer,
            )
        });
        std::thread::sleep(Duration::from_millis(50));
        stop.stop();
        let result = worker.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(parts(result), (0, 0, 0));
    }

    #[test]
    fn one_handle_stops_several_loops() {
        let stop = portable_sessions::StopHandle::new();
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let timer = ThreadTimer::with_stop_handle(stop.clone());
                std::thread::spawn(move || {
                    MemoryStore::new()
                        .continuously_delete_expired(DeletionSchedule::new(Duration::MAX), &timer)
                })
            })
            .collect();
        stop.stop();
        for worker in workers {
            assert_eq!(worker.join().unwrap().passes, 0);
        }
        // Stopped for good: a new loop on it returns at once.
        let timer = ThreadTimer::with_stop_handle(stop);
        let result = MemoryStore::new()
            .continuously_delete_expired(DeletionSchedule::new(Duration::from_secs(3600)), &timer);
        assert_eq!(result.passes, 0);
    }
}

/// The built-in timers as tasks on smol and tokio.
#[cfg(all(feature = "async-io", not(feature = "sync")))]
mod tasks {
    use std::time::Instant;

    use futures_lite::future::zip;
    use portable_sessions::{AsyncIoTimer, StopHandle};

    use super::*;

    /// Runs the loop over expired sessions in a store that fails twice, next to a
    /// watcher that waits (on `clock`) until they are gone, then stops the loop.
    async fn deletes_then_stops(timer: &dyn Timer, stop: StopHandle, clock: &dyn Timer) {
        let memory = MemoryStore::new();
        let store = FlakyStore::new(memory.clone(), 2);
        add_sessions(&store, &[past(); 4]).await;
        let schedule = DeletionSchedule::new(Duration::from_millis(10))
            .with_jitter(0.5)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(10));
        let watcher = async {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !memory.is_empty() {
                assert!(Instant::now() < deadline, "sessions never deleted");
                let _ = clock.sleep(Duration::from_millis(2)).await;
            }
            stop.stop();
        };
        let (result, ()) = zip(store.continuously_delete_expired(schedule, timer), watcher).await;
        assert_eq!((result.failures, result.deleted), (2, 4));
    }

    /// Stops a loop with a one-hour period 50 ms after it starts (timed on `clock`);
    /// it must return well within a second.
    async fn stop_interrupts_a_long_period(timer: &dyn Timer, stop: StopHandle, clock: &dyn Timer) {
        let started = Instant::now();
        let schedule = DeletionSchedule::new(Duration::from_secs(3600));
        let stopper = async {
            let _ = clock.sleep(Duration::from_millis(50)).await;
            stop.stop();
        };
        let store = MemoryStore::new();
        let (result, ()) = zip(store.continuously_delete_expired(schedule, timer), stopper).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(result.passes, 0);
    }

    fn async_io_timer() -> (AsyncIoTimer, StopHandle) {
        let timer = AsyncIoTimer::new();
        let stop = timer.stop_handle();
        (timer, stop)
    }

    #[test]
    fn smol_task_deletes_then_stops() {
        let (timer, stop) = async_io_timer();
        smol::block_on(smol::spawn(async move {
            deletes_then_stops(&timer, stop, &AsyncIoTimer::new()).await;
        }));
    }

    #[test]
    fn smol_stop_interrupts_a_long_period() {
        let (timer, stop) = async_io_timer();
        smol::block_on(smol::spawn(async move {
            stop_interrupts_a_long_period(&timer, stop, &AsyncIoTimer::new()).await;
        }));
    }

    #[test]
    fn stopped_resolves_for_every_waiter() {
        let stop = StopHandle::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || futures_lite::future::block_on(stop.stopped()))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        stop.stop();
        for waiter in waiters {
            waiter.join().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokio_with_the_async_io_timer() {
        let (timer, stop) = async_io_timer();
        tokio::spawn(async move {
            deletes_then_stops(&timer, stop, &AsyncIoTimer::new()).await;
        })
        .await
        .unwrap();
        let (timer, stop) = async_io_timer();
        tokio::spawn(async move {
            stop_interrupts_a_long_period(&timer, stop, &AsyncIoTimer::new()).await;
        })
        .await
        .unwrap();
    }

    #[cfg(feature = "tokio")]
    #[tokio::test(flavor = "current_thread")]
    async fn tokio_with_the_tokio_timer() {
        use portable_sessions::TokioTimer;

        let timer = TokioTimer::new();
        let stop = timer.stop_handle();
        tokio::spawn(async move {
            deletes_then_stops(&timer, stop, &TokioTimer::new()).await;
        })
        .await
        .unwrap();
        let timer = TokioTimer::new();
        let stop = timer.stop_handle();
        tokio::spawn(async move {
            stop_interrupts_a_long_period(&timer, stop, &TokioTimer::new()).await;
        })
        .await
        .unwrap();
    }
}

/// A loop with a zero period (its timer returns at once) still yields between passes:
/// another task on the same single-threaded executor makes progress, and the loop
/// stops when asked.
#[cfg(all(not(feature = "sync"), feature = "async-io"))]
#[test]
fn a_zero_period_loop_lets_other_tasks_on_its_thread_run() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let store = MemoryStore::new();
        let timer = portable_sessions::AsyncIoTimer::new();
        let stop = timer.stop_handle();
        let executor = smol::LocalExecutor::new();
        let summary = futures_lite::future::block_on(executor.run(async {
            let deletion = executor.spawn(
                store.continuously_delete_expired(DeletionSchedule::new(Duration::ZERO), &timer),
            );
            let other = executor.spawn(async {
                for _ in 0..100 {
                    futures_lite::future::yield_now().await;
                }
            });
            other.await;
            stop.stop();
            deletion.await
        }));
        let _ = done.send(summary);
    });
    let summary = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the other task ran and the loop stopped: it yields between passes");
    assert!(summary.passes > 0);
}
