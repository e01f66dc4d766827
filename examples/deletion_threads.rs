//! Purges expired sessions from a plain thread (blocking mode), then stops it at once.
//!
//! ```text
//! cargo run --example deletion_threads --features sync
//! ```

use std::{
    thread,
    time::{Duration, Instant},
};

use portable_sessions::{
    session::Record, session_store::Result, DeletionSchedule, ExpiredDeletion, MemoryStore,
    SessionStore, ThreadTimer,
};
use time::OffsetDateTime;

fn main() -> Result<()> {
    let store = MemoryStore::new();
    let now = OffsetDateTime::now_utc();
    for millis in [400, 800, 1200, 3_600_000] {
        let mut record = Record::new(now + time::Duration::milliseconds(millis));
        store.create(&mut record)?;
    }
    println!("4 sessions: three expire within 1.2 s, one in an hour");

    let timer = ThreadTimer::new();
    let stop = timer.stop_handle();
    let schedule = DeletionSchedule::new(Duration::from_millis(250))
        .with_jitter(0.2)
        .on_error(|failure| eprintln!("deletion failed: {}", failure.error.report()));
    let worker = {
        let store = store.clone();
        thread::spawn(move || store.continuously_delete_expired(schedule, &timer))
    };

    let started = Instant::now();
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(250));
        println!(
            "t = {:.2} s: {} session(s) held",
            started.elapsed().as_secs_f64(),
            store.len()
        );
    }

    // The thread sleeps on a condition variable: the stop wakes it at once.
    let stopping = Instant::now();
    stop.stop();
    let summary = worker.join().expect("the deletion thread panicked");
    println!(
        "stopped in {:?}: {} passes, {} sessions deleted, {} failures",
        stopping.elapsed(),
        summary.passes,
        summary.deleted,
        summary.failures
    );
    Ok(())
}
