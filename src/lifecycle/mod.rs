//! A session's life around requests and after them: the cookie round trip, the
//! deletion of expired sessions and the timers that drive it, and the clock.

pub(crate) mod clock;
pub(crate) mod deletion;
pub(crate) mod manager;
pub(crate) mod timer;
