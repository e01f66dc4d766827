//! Purges expired sessions from a tokio task with the tokio timer, then stops it.
//!
//! ```text
//! cargo run --example deletion_tokio --features tokio
//! ```
//!
//! `AsyncIoTimer` works here too, without the `tokio` feature.

#[cfg(not(feature = "sync"))]
#[tokio::main]
async fn main() -> portable_sessions::session_store::Result<()> {
    use std::time::{Duration, Instant};

    use portable_sessions::{
        session::Record, DeletionSchedule, ExpiredDeletion, MemoryStore, SessionStore, TokioTimer,
    };
    use time::OffsetDateTime;

    let store = MemoryStore::new();
    let now = OffsetDateTime::now_utc();
    for millis in [400, 800, 1200, 3_600_000] {
        let mut record = Record::new(now + time::Duration::milliseconds(millis));
        store.create(&mut record).await?;
    }
    println!("4 sessions: three expire within 1.2 s, one in an hour");

    let timer = TokioTimer::new();
    let stop = timer.stop_handle();
    let schedule = DeletionSchedule::new(Duration::from_millis(250)).with_jitter(0.2);
    let task = tokio::spawn({
        let store = store.clone();
        async move { store.continuously_delete_expired(schedule, &timer).await }
    });

    let started = Instant::now();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        println!(
            "t = {:.2} s: {} session(s) held",
            started.elapsed().as_secs_f64(),
            store.len()
        );
    }

    // The stop wakes the sleeping task at once.
    let stopping = Instant::now();
    stop.stop();
    let summary = task.await.expect("the deletion task panicked");
    println!(
        "stopped in {:?}: {} passes, {} sessions deleted, {} failures",
        stopping.elapsed(),
        summary.passes,
        summary.deleted,
        summary.failures
    );
    Ok(())
}

#[cfg(feature = "sync")]
fn main() {
    eprintln!("deletion_tokio shows async mode: run it without `--features sync`");
}
