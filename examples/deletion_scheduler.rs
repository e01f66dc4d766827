//! Purges expired sessions from a scheduler the program already runs: the scheduler
//! calls `delete_expired` itself, and a `DeletionSchedule` tells it when.
//!
//! ```text
//! cargo run --example deletion_scheduler                  # async mode
//! cargo run --example deletion_scheduler --features sync  # blocking mode
//! ```
//!
//! The scheduler here is a loop that wakes every 100 ms and runs the jobs that are
//! due; a cron-like job runner or a timer wheel would do the same.

use std::time::{Duration, Instant};

use portable_sessions::{
    session::Record, session_store::Result, DeletionSchedule, ExpiredDeletion, MemoryStore,
    SessionStore,
};
use time::OffsetDateTime;

#[maybe_async::maybe_async]
async fn run() -> Result<()> {
    let store = MemoryStore::new();
    let now = OffsetDateTime::now_utc();
    for millis in [300, 700, 1100, 3_600_000] {
        let mut record = Record::new(now + time::Duration::milliseconds(millis));
        store.create(&mut record).await?;
    }
    println!("4 sessions: three expire within 1.1 s, one in an hour");

    let mut schedule = DeletionSchedule::new(Duration::from_millis(400)).with_jitter(0.1);
    let started = Instant::now();
    let mut next_deletion = started + schedule.first_delay();
    println!(
        "first deletion pass due in {} ms",
        (next_deletion - started).as_millis()
    );

    // The program's own scheduler: two seconds of ticks, then shutdown.
    while started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() >= next_deletion {
            let result = store.delete_expired().await;
            let wait = schedule.after_pass(&result);
            next_deletion = Instant::now() + wait;
            let t = started.elapsed().as_secs_f64();
            match result {
                Ok(deleted) => println!(
                    "t = {t:.1} s: pass deleted {deleted}, {} session(s) left, next pass in {} ms",
                    store.len(),
                    wait.as_millis()
                ),
                // The schedule has logged it and backs off: the next pass comes sooner.
                Err(error) => println!(
                    "t = {t:.1} s: pass failed ({}), retry in {} ms",
                    error.report(),
                    wait.as_millis()
                ),
            }
        }
    }

    // Stopping is the scheduler's business: it simply runs no more passes.
    let summary = schedule.summary();
    println!(
        "scheduler stopped: {} passes, {} sessions deleted, {} failures",
        summary.passes, summary.deleted, summary.failures
    );
    Ok(())
}

#[maybe_async::sync_impl]
fn main() -> Result<()> {
    run()
}

#[maybe_async::async_impl]
fn main() -> Result<()> {
    futures_lite::future::block_on(run())
}
