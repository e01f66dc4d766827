//! [`Timer`]: what the deletion loop sleeps on, and the built-in timers.

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// What a [`Timer`] says when it wakes: go on, or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a `Tick::Stop` asks the caller to stop"]
pub enum Tick {
    /// The whole duration has passed: go on.
    Continue,
    /// A stop was requested: end the task now. The sleep may have ended early.
    Stop,
}

/// Sleeps for the deletion loop, and tells it when to stop.
///
/// The loop of [`ExpiredDeletion::continuously_delete_expired`] knows no runtime: it
/// waits on the timer it is given. In async mode (the default)
/// [`sleep`](Timer::sleep) is an `async` method of an
/// [`async_trait`](crate::async_trait) trait whose future is `Send`; with the `sync`
/// feature it blocks the calling thread. It returns [`Tick::Stop`] when the task
/// should end, as early as it can: a stop request should not wait out a long sleep.
///
/// Built in:
///
/// | timer | mode | feature | runs on |
/// |---|---|---|---|
/// | `ThreadTimer` | blocking | `sync` | a plain thread |
/// | `AsyncIoTimer` | async | `async-io` (default) | any executor: smol, tokio, `block_on`, ... |
/// | `TokioTimer` | async | `tokio` | a tokio runtime with its time driver |
///
/// Each of them is stopped through a [`StopHandle`].
///
/// # Examples
///
/// A timer for another runtime takes a few lines. This is a tokio timer written
/// against this crate's public API only: it races tokio's sleep with
/// `StopHandle::stopped` (it is what `TokioTimer` does).
///
/// ```
/// # #[cfg(not(feature = "sync"))] mod example {
/// use std::time::Duration;
/// use portable_sessions::{async_trait, StopHandle, Tick, Timer};
///
/// #[derive(Debug, Default)]
/// pub struct MyTokioTimer {
///     pub stop: StopHandle,
/// }
///
/// #[async_trait::async_trait]
/// impl Timer for MyTokioTimer {
///     async fn sleep(&self, duration: Duration) -> Tick {
///         tokio::select! {
///             biased; // a stop wins over a sleep that ends at the same time
///             () = self.stop.stopped() => Tick::Stop,
///             () = tokio::time::sleep(duration) => Tick::Continue,
///         }
///     }
/// }
///
/// #[tokio::main(flavor = "current_thread")]
/// pub async fn main() {
///     let timer = MyTokioTimer::default();
///     let tick = timer.sleep(Duration::from_millis(1)).await;
///     assert_eq!(tick, Tick::Continue);
///
///     timer.stop.stop();
///     let tick = timer.sleep(Duration::from_secs(3600)).await; // returns at once
///     assert_eq!(tick, Tick::Stop);
/// }
/// # }
/// # #[cfg(not(feature = "sync"))] fn main() { example::main() }
/// # #[cfg(feature = "sync")] fn main() {}
/// ```
///
/// In blocking mode the method is a plain `fn sleep(&self, duration: Duration) -> Tick`;
/// write the `impl` with `#[maybe_async::maybe_async]` to serve both modes.
///
/// [`ExpiredDeletion::continuously_delete_expired`]: crate::ExpiredDeletion::continuously_delete_expired
#[maybe_async::maybe_async]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a `Timer` in this build's mode",
    note = "in blocking mode (the `sync` feature) a timer is `ThreadTimer` or one of your own; \
            `AsyncIoTimer` and `TokioTimer` are async mode's, and maybe-async's mode is global \
            to a build: some crate in the dependency graph may enable `portable-sessions/sync`"
)]
pub trait Timer: Send + Sync {
    /// Waits for `duration`, or less if the task is asked to stop, and says which.
    ///
    /// A duration too long to represent as a deadline means "until stopped".
    async fn sleep(&self, duration: Duration) -> Tick;
}

/// Stops the task that a built-in timer drives, waking it at once if it sleeps.
///
/// Clones are cheap and share one signal; once stopped, it stays stopped, and every
/// later sleep of its timers returns [`Tick::Stop`] at once. It is also the building
/// block of third-party timers: in async mode, race their sleep with its `stopped`
/// future, as the [`Timer`] docs show.
///
/// # Examples
///
/// ```
/// use portable_sessions::StopHandle;
///
/// let stop = StopHandle::new();
/// let for_shutdown = stop.clone();
/// assert!(!stop.is_stopped());
/// for_shutdown.stop();
/// assert!(stop.is_stopped());
/// ```
#[derive(Clone, Default)]
pub struct StopHandle {
    state: Arc<StopState>,
}

#[derive(Default)]
struct StopState {
    stopped: AtomicBool,
    /// Sleeping threads wait on `wake`; `lock` orders a stop against a sleeper that
    /// is about to wait, so that no wakeup is lost.
    #[cfg(feature = "sync")]
    lock: parking_lot::Mutex<()>,
    #[cfg(feature = "sync")]
    wake: parking_lot::Condvar,
    #[cfg(not(feature = "sync"))]
    wake: event_listener::Event,
}

impl StopHandle {
    /// Makes a handle that has not been stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a stop and wakes every task sleeping on a timer of this handle.
    pub fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        #[cfg(feature = "sync")]
        {
            // Taking the lock waits out a sleeper between its check and its wait.
            drop(self.state.lock.lock());
            self.state.wake.notify_all();
        }
        #[cfg(not(feature = "sync"))]
        self.state.wake.notify(usize::MAX);
    }

    /// Returns `true` once [`stop`](Self::stop) has been called on this handle or a
    /// clone of it.
    pub fn is_stopped(&self) -> bool {
        self.state.stopped.load(Ordering::SeqCst)
    }

    /// Waits until [`stop`](Self::stop) is called, on any executor; returns at once if
    /// it already was.
    ///
    /// # Examples
    ///
    /// ```
    /// use portable_sessions::StopHandle;
    ///
    /// let stop = StopHandle::new();
    /// let remote = stop.clone();
    /// std::thread::spawn(move || remote.stop());
    /// futures_lite::future::block_on(stop.stopped());
    /// assert!(stop.is_stopped());
    /// ```
    #[cfg(not(feature = "sync"))]
    #[cfg_attr(docsrs, doc(cfg(not(feature = "sync"))))]
    pub async fn stopped(&self) {
        loop {
            if self.is_stopped() {
                return;
            }
            // Listen before the second check: a stop between the two is not missed.
            let listener = self.state.wake.listen();
            if self.is_stopped() {
                return;
            }
            listener.await;
        }
    }

    /// Blocks for `duration`, or until a stop, whichever comes first.
    #[cfg(feature = "sync")]
    fn sleep_blocking(&self, duration: Duration) -> Tick {
        let deadline = std::time::Instant::now().checked_add(duration);
        let mut guard = self.state.lock.lock();
        while !self.is_stopped() {
            match deadline {
                Some(deadline) => {
                    if self.state.wake.wait_until(&mut guard, deadline).timed_out() {
                        break;
                    }
                }
                None => self.state.wake.wait(&mut guard),
            }
        }
        if self.is_stopped() {
            Tick::Stop
        } else {
            Tick::Continue
        }
    }
}

impl fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// Races `sleep` with a stop of `stop`; a stop wins a tie.
#[cfg(all(any(feature = "async-io", feature = "tokio"), not(feature = "sync")))]
async fn sleep_or_stop(stop: &StopHandle, sleep: impl std::future::Future<Output = ()>) -> Tick {
    use std::{future::Future, pin::pin, task::Poll};

    let mut sleep = pin!(sleep);
    let mut stopped = pin!(stop.stopped());
    std::future::poll_fn(|cx| {
        if stopped.as_mut().poll(cx).is_ready() {
            Poll::Ready(Tick::Stop)
        } else if sleep.as_mut().poll(cx).is_ready() {
            Poll::Ready(Tick::Continue)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Declares a built-in timer: a [`StopHandle`] and the methods every timer shares.
macro_rules! timer_type {
    (#[cfg($cfg:meta)] $(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        #[cfg($cfg)]
        #[cfg_attr(docsrs, doc(cfg($cfg)))]
        #[derive(Debug, Clone, Default)]
        pub struct $name {
            stop: StopHandle,
        }

        #[cfg($cfg)]
        impl $name {
            /// Makes a timer with a fresh [`StopHandle`].
            pub fn new() -> Self {
                Self::default()
            }

            /// Makes a timer stopped by `stop`: one handle can stop several tasks.
            pub fn with_stop_handle(stop: StopHandle) -> Self {
                Self { stop }
            }

            /// Returns a handle that stops this timer, and the task it drives.
            pub fn stop_handle(&self) -> StopHandle {
                self.stop.clone()
            }
        }
    };
}

timer_type! {
    #[cfg(feature = "sync")]
    /// A [`Timer`] for blocking mode: sleeps on a condition variable, so that its
    /// [`StopHandle`] wakes it at once instead of waiting out the period.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[maybe_async::sync_impl] fn main() {
    /// use std::time::{Duration, Instant};
    /// use portable_sessions::{ThreadTimer, Tick, Timer};
    ///
    /// let timer = ThreadTimer::new();
    /// let stop = timer.stop_handle();
    /// let started = Instant::now();
    /// let sleeper = std::thread::spawn(move || timer.sleep(Duration::from_secs(3600)));
    /// stop.stop();
    /// assert_eq!(sleeper.join().unwrap(), Tick::Stop);
    /// assert!(started.elapsed() < Duration::from_secs(60));
    /// # }
    /// # #[maybe_async::async_impl] fn main() {}
    /// ```
    ThreadTimer
}

#[cfg(feature = "sync")]
impl Timer for ThreadTimer {
    fn sleep(&self, duration: Duration) -> Tick {
        self.stop.sleep_blocking(duration)
    }
}

timer_type! {
    #[cfg(all(feature = "async-io", not(feature = "sync")))]
    /// A [`Timer`] for async mode on [async-io](https://docs.rs/async-io)'s timer,
    /// which works under any executor (smol, tokio, `block_on`, ...) because async-io
    /// runs its own reactor. Its [`StopHandle`] wakes it at once.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[maybe_async::async_impl] fn main() {
    /// use std::time::Duration;
    /// use portable_sessions::{AsyncIoTimer, Tick, Timer};
    ///
    /// futures_lite::future::block_on(async {
    ///     let timer = AsyncIoTimer::new();
    ///     let tick = timer.sleep(Duration::from_millis(1)).await;
    ///     assert_eq!(tick, Tick::Continue);
    ///     timer.stop_handle().stop();
    ///     let tick = timer.sleep(Duration::from_secs(3600)).await;
    ///     assert_eq!(tick, Tick::Stop);
    /// });
    /// # }
    /// # #[maybe_async::sync_impl] fn main() {}
    /// ```
    AsyncIoTimer
}

#[cfg(all(feature = "async-io", not(feature = "sync")))]
#[async_trait::async_trait]
impl Timer for AsyncIoTimer {
    async fn sleep(&self, duration: Duration) -> Tick {
        // `Timer::after` turns an unrepresentable deadline into "never".
        sleep_or_stop(&self.stop, async {
            async_io::Timer::after(duration).await;
        })
        .await
    }
}

timer_type! {
    #[cfg(all(feature = "tokio", not(feature = "sync")))]
    /// A [`Timer`] for async mode on tokio's timer.
    ///
    /// # Panics
    ///
    /// Sleeping panics outside a tokio runtime, or in one built without its time
    /// driver (`enable_time`): use `AsyncIoTimer` where that may happen.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[maybe_async::async_impl] fn main() {
    /// use std::time::Duration;
    /// use portable_sessions::{Tick, Timer, TokioTimer};
    ///
    /// let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    /// runtime.block_on(async {
    ///     let timer = TokioTimer::new();
    ///     let tick = timer.sleep(Duration::from_millis(1)).await;
    ///     assert_eq!(tick, Tick::Continue);
    ///     timer.stop_handle().stop();
    ///     let tick = timer.sleep(Duration::from_secs(3600)).await;
    ///     assert_eq!(tick, Tick::Stop);
    /// });
    /// # }
    /// # #[maybe_async::sync_impl] fn main() {}
    /// ```
    TokioTimer
}

#[cfg(all(feature = "tokio", not(feature = "sync")))]
#[async_trait::async_trait]
impl Timer for TokioTimer {
    async fn sleep(&self, duration: Duration) -> Tick {
        // tokio caps an unrepresentable deadline at a far future instead of panicking.
        sleep_or_stop(&self.stop, tokio::time::sleep(duration)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_before_the_sleep_is_seen() {
        let stop = StopHandle::new();
        stop.stop();
        stop.stop(); // stopping twice is harmless
        #[cfg(feature = "sync")]
        assert_eq!(stop.sleep_blocking(Duration::MAX), Tick::Stop);
        #[cfg(not(feature = "sync"))]
        futures_lite::future::block_on(stop.stopped());
        assert!(stop.is_stopped());
    }
}

timer_type! {
    #[cfg(all(feature = "async-io", feature = "sync"))]
    /// In blocking mode: a placeholder that is not a [`Timer`], so that a program
    /// using it fails to compile with a message naming the `sync` feature. In async
    /// mode it is the async-io timer; in blocking mode use `ThreadTimer`.
    AsyncIoTimer
}

timer_type! {
    #[cfg(all(feature = "tokio", feature = "sync"))]
    /// In blocking mode: a placeholder that is not a [`Timer`], so that a program
    /// using it fails to compile with a message naming the `sync` feature. In async
    /// mode it is the tokio timer; in blocking mode use `ThreadTimer`.
    TokioTimer
}
