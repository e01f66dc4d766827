//! The deletion loop on the tokio timer, in blocking mode.
use std::time::Duration;

use portable_sessions::{DeletionSchedule, ExpiredDeletion, MemoryStore, TokioTimer};

fn main() {
    let timer = TokioTimer::new();
    let summary = MemoryStore::new()
        .continuously_delete_expired(DeletionSchedule::new(Duration::from_secs(60)), &timer);
    println!("{summary:?}");
}
