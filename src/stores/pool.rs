//! A bounded pool of connections to one server, for a store whose operations each
//! take a connection of their own for a request (PostgreSQL's).

use std::{fmt, time::Duration};

use parking_lot::Mutex;

use super::net::MAX_IDLE;
use crate::session_store::{Error, Result};

/// A connection that a [`Pool`] can take back.
pub(crate) trait Pooled: Send {
    /// `true` if the connection is between requests, in step with its server, and
    /// ready for the next one.
    fn reusable(&self) -> bool;
}

/// Open connections to one server, at most `max` at a time, kept open between uses.
pub(crate) struct Pool<C> {
    /// Idle connections, each with the time it was given back.
    idle: Mutex<Vec<(C, std::time::Instant)>>,
    slots: Slots,
    max: usize,
    timeout: Duration,
}

impl<C> fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("max", &self.max)
            .field("idle", &self.idle.lock().len())
            .finish_non_exhaustive()
    }
}

/// A connection lent to one operation, or the right to open one. Dropped, the
/// connection goes back to the pool if it is reusable and not marked `discard`;
/// otherwise (an error, a timeout, a dropped future) it is closed, since it may be
/// out of step with its server.
pub(crate) struct Lent<'a, C: Pooled> {
    pub(crate) conn: Option<C>,
    /// `true` if the connection was taken from the idle list, not just opened.
    pub(crate) reused: bool,
    /// Set when the connection must not be reused even if it is in step.
    pub(crate) discard: bool,
    pool: &'a Pool<C>,
    _slot: Slot<'a>,
}

impl<C: Pooled> Drop for Lent<'_, C> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if conn.reusable() && !self.discard {
                self.pool
                    .idle
                    .lock()
                    .push((conn, std::time::Instant::now()));
            }
        }
    }
}

impl<C: Pooled> Pool<C> {
    pub(crate) fn new(max: usize, timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            slots: Slots::new(max),
            max,
            timeout,
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Takes the most recently used idle connection, closing those idle too long.
    fn fresh_enough(&self) -> Option<C> {
        let mut idle = self.idle.lock();
        // The oldest come first: they were given back first.
        let stale = idle
            .iter()
            .take_while(|(_, since)| since.elapsed() > MAX_IDLE)
            .count();
        let closed: Vec<_> = idle.drain(..stale).collect();
        let conn = idle.pop().map(|(conn, _)| conn);
        drop(idle);
        drop(closed);
        conn
    }

    /// Closes every idle connection: after one was found closed by its server, the
    /// others (as old) likely are too.
    pub(crate) fn clear(&self) {
        let idle = std::mem::take(&mut *self.idle.lock());
        drop(idle);
    }
}

#[maybe_async::maybe_async]
impl<C: Pooled> Pool<C> {
    /// Waits (at most the timeout) for a free slot, and lends an idle connection with
    /// it unless `fresh` is asked for; without one, the caller opens a connection into
    /// [`Lent::conn`].
    pub(crate) async fn take(&self, what: &str, fresh: bool) -> Result<Lent<'_, C>> {
        let slot = self.slots.take(self.timeout).await.ok_or_else(|| {
            Error::backend(format!(
                "all {} {what} connections stayed busy for {:?}",
                self.max, self.timeout
            ))
        })?;
        let conn = if fresh { None } else { self.fresh_enough() };
        Ok(Lent {
            reused: conn.is_some(),
            conn,
            discard: false,
            pool: self,
            _slot: slot,
        })
    }
}

/// The bound on open connections: a slot is held by each lent connection.
#[cfg(feature = "sync")]
struct Slots {
    free: Mutex<usize>,
    returned: parking_lot::Condvar,
}

/// A taken slot, given back when dropped.
#[cfg(feature = "sync")]
struct Slot<'a>(&'a Slots);

#[cfg(feature = "sync")]
impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.returned.notify_one();
    }
}

#[cfg(feature = "sync")]
impl Slots {
    fn new(max: usize) -> Self {
        Self {
            free: Mutex::new(max),
            returned: parking_lot::Condvar::new(),
        }
    }

    /// Takes a slot, waiting at most `timeout` for one.
    fn take(&self, timeout: Duration) -> Option<Slot<'_>> {
        let deadline = std::time::Instant::now().checked_add(timeout);
        let mut free = self.free.lock();
        while *free == 0 {
            match deadline {
                Some(deadline) => {
                    if self.returned.wait_until(&mut free, deadline).timed_out() && *free == 0 {
                        return None;
                    }
                }
                None => self.returned.wait(&mut free),
            }
        }
        *free -= 1;
        Some(Slot(self))
    }
}

/// The bound on open connections: a slot is held by each lent connection.
#[cfg(not(feature = "sync"))]
struct Slots(async_lock::Semaphore);

/// A taken slot, given back when dropped.
#[cfg(not(feature = "sync"))]
type Slot<'a> = async_lock::SemaphoreGuard<'a>;

#[cfg(not(feature = "sync"))]
impl Slots {
    fn new(max: usize) -> Self {
        Self(async_lock::Semaphore::new(max))
    }

    /// Takes a slot, waiting at most `timeout` for one.
    async fn take(&self, timeout: Duration) -> Option<Slot<'_>> {
        if let Some(slot) = self.0.try_acquire() {
            return Some(slot);
        }
        futures_lite::future::or(async { Some(self.0.acquire().await) }, async {
            async_io::Timer::after(timeout).await;
            None
        })
        .await
    }
}
