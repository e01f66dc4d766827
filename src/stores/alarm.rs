//! Timeouts for a connection's reads and writes in async mode, without a timer
//! registration per wait.
//!
//! An async-io `Timer` registers with the reactor when first polled, and again
//! whenever it is polled by another task's waker; each registration wakes the thread
//! that runs the reactor, a system call and often a context switch. A network store
//! waits for every reply, so a fresh timer per wait paid that on every operation.
//!
//! An [`Alarm`] keeps one timer per connection, always polled through the same waker
//! (a [`Relay`] that passes the wake-up on to the task waiting now). The timer is set
//! to a wait's deadline when it is unset or set later than that, and once it fires,
//! to the deadline of the wait then under way if that is still to come; deadlines
//! mostly move forward, so a busy connection registers about once per timeout, not
//! once per wait.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Wake, Waker},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// Passes a wake-up on to the task that waits on the connection now.
struct Relay(Mutex<Option<Waker>>);

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Woken outside the lock: an executor may poll the task from `wake`.
        let waker = self.0.lock().clone();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One connection's timeout.
pub(crate) struct Alarm {
    timer: async_io::Timer,
    /// When `timer` is set to fire, if it is.
    set_for: Option<Instant>,
    relay: Arc<Relay>,
    /// A waker for `relay`: the same one at every poll, so the timer never registers
    /// again for a new waker.
    waker: Waker,
}

impl Default for Alarm {
    fn default() -> Self {
        let relay = Arc::new(Relay(Mutex::new(None)));
        Self {
            timer: async_io::Timer::never(),
            set_for: None,
            waker: Waker::from(Arc::clone(&relay)),
            relay,
        }
    }
}

impl std::fmt::Debug for Alarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alarm")
            .field("set_for", &self.set_for)
            .finish_non_exhaustive()
    }
}

impl Alarm {
    /// Makes [`waker`](Alarm::waker) wake `cx`'s task, until another task's is set
    /// or [`forget_task`](Alarm::forget_task).
    pub(crate) fn relay_to(&self, cx: &Context<'_>) {
        let mut waiting = self.relay.0.lock();
        if !waiting.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waiting = Some(cx.waker().clone());
        }
    }

    /// A waker that is the same at every call, and wakes the task last set with
    /// [`relay_to`](Alarm::relay_to): to register with other sources (a socket's
    /// readiness), which then never register again for a new task.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Stops waking the task last set: a wake-up later goes nowhere.
    pub(crate) fn forget_task(&self) {
        *self.relay.0.lock() = None;
    }

    /// Ready once `deadline` has passed; until then wakes `cx`'s task when it does.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        self.relay_to(cx);
        loop {
            if self.set_for.is_none_or(|at| at > deadline) {
                // Unset, or set later than this wait may last (a shorter timeout).
                self.timer.set_at(deadline);
                self.set_for = Some(deadline);
            }
            let mut relayed = Context::from_waker(&self.waker);
            match Pin::new(&mut self.timer).poll(&mut relayed) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => {
                    // Fired: at an earlier wait's deadline, or this one's.
                    self.set_for = None;
                    if Instant::now() >= deadline {
                        return Poll::Ready(());
                    }
                }
            }
        }
    }

    /// Runs `io`, or fails with `timed_out()` once `timeout` has passed.
    pub(crate) async fn within<T>(
        &mut self,
        timeout: Duration,
        io: impl Future<Output = io::Result<T>>,
        timed_out: fn() -> io::Error,
    ) -> io::Result<T> {
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            // Beyond what the clock counts: no deadline at all.
            return io.await;
        };
        let mut io = std::pin::pin!(io);
        let done = std::future::poll_fn(|cx| {
            if let Poll::Ready(done) = io.as_mut().poll(cx) {
                return Poll::Ready(done);
            }
            self.poll(cx, deadline).map(|()| Err(timed_out()))
        })
        .await;
        // A timer still set for this wait wakes no task when it fires later.
        self.forget_task();
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_out_after_the_deadline_and_not_before() {
        futures_lite::future::block_on(async {
            let mut alarm = Alarm::default();
            let timeout = Duration::from_millis(30);
            let start = Instant::now();
            let never = std::future::pending::<io::Result<()>>();
            let err = alarm
                .within(timeout, never, || io::ErrorKind::TimedOut.into())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
            assert!(start.elapsed() >= timeout);
            // A wait that finishes in time, then another that times out: the timer
            // set for the first fires early for the second and is set again.
            let quick = async {
                async_io::Timer::after(Duration::from_millis(5)).await;
                Ok(7)
            };
            assert_eq!(
                alarm
                    .within(timeout, quick, || io::ErrorKind::TimedOut.into())
                    .await
                    .unwrap(),
                7
            );
            async_io::Timer::after(Duration::from_millis(10)).await;
            let start = Instant::now();
            let never = std::future::pending::<io::Result<()>>();
            assert!(alarm
                .within(timeout, never, || io::ErrorKind::TimedOut.into())
                .await
                .is_err());
            assert!(start.elapsed() >= timeout, "{:?}", start.elapsed());
        });
    }
}
