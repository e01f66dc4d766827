//! Expiry: expired records never load, and `delete_expired` removes exactly those.
//! Time is injected, never slept through.

mod common;

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use portable_sessions::{
    session::Record, CachingSessionStore, ExpiredDeletion, MemoryStore, SessionStore,
};
use time::{Duration, OffsetDateTime};

/// A store whose clock reads `seconds` since the Unix epoch.
fn store_at(seconds: &Arc<AtomicI64>) -> MemoryStore {
    let now = seconds.clone();
    MemoryStore::with_clock(move || {
        OffsetDateTime::from_unix_timestamp(now.load(Ordering::SeqCst)).expect("in range")
    })
}

fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(seconds).expect("in range")
}

#[maybe_async::maybe_async]
async fn a_record_stops_loading_at_its_expiry_date() {
    let clock = Arc::new(AtomicI64::new(1_000));
    let store = store_at(&clock);
    let mut record = Record::new(at(1_060));
    store.create(&mut record).await.unwrap();
    clock.store(1_059, Ordering::SeqCst);
    let loaded = store.load(&record.id).await.unwrap();
    assert!(loaded.is_some(), "one second before expiry it loads");
    clock.store(1_060, Ordering::SeqCst);
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, None, "at its expiry date it no longer loads");
    assert_eq!(store.len(), 1, "not deleted yet, only hidden");
}

#[maybe_async::maybe_async]
async fn delete_expired_removes_exactly_the_expired() {
    let clock = Arc::new(AtomicI64::new(0));
    let store = store_at(&clock);
    // 100 records expiring at seconds 10, 20, ..., 1000.
    let mut records = Vec::new();
    for n in 1..=100 {
        let mut record = Record::new(at(n * 10));
        record.insert("n", &n).unwrap();
        store.create(&mut record).await.unwrap();
        records.push(record);
    }
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 0);

    clock.store(250, Ordering::SeqCst); // 10..=250: 25 expired
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 25);
    assert_eq!(store.len(), 75);
    for record in &records {
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded.is_some(), record.expiry_date > at(250));
    }
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 0, "nothing is counted twice");

    // Moving an expiry date moves the record in the index: extend one, shorten another.
    let mut extended = records[30].clone(); // expires at 310
    extended.expiry_date = at(5_000);
    store.save(&extended).await.unwrap();
    let mut shortened = records[99].clone(); // expires at 1000
    shortened.expiry_date = at(300);
    store.save(&shortened).await.unwrap();
    clock.store(400, Ordering::SeqCst); // 260..=400 is 15 records, less the extended, plus the shortened
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 15);
    let kept = store.load(&extended.id).await.unwrap();
    assert_eq!(kept, Some(extended));
    let gone = store.load(&shortened.id).await.unwrap();
    assert_eq!(gone, None);

    clock.store(10_000, Ordering::SeqCst);
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 60);
    assert!(store.is_empty());
}

#[maybe_async::maybe_async]
async fn deleted_records_leave_the_expiry_index() {
    let clock = Arc::new(AtomicI64::new(0));
    let store = store_at(&clock);
    let mut record = Record::new(at(10));
    store.create(&mut record).await.unwrap();
    store.delete(&record.id).await.unwrap();
    clock.store(20, Ordering::SeqCst);
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 0, "a deleted record is not deleted again");
}

#[maybe_async::maybe_async]
async fn caching_store_never_serves_an_expired_record() {
    let clock = Arc::new(AtomicI64::new(0));
    let store = CachingSessionStore::new(store_at(&clock), store_at(&clock));
    let mut record = Record::new(at(100));
    store.create(&mut record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert!(loaded.is_some());
    clock.store(100, Ordering::SeqCst);
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, None);
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 1);
    assert!(store.cache().is_empty() && store.store().is_empty());
}

#[maybe_async::maybe_async]
async fn records_expired_by_the_system_clock_never_load() {
    let store = MemoryStore::new();
    let mut record = Record::new(OffsetDateTime::now_utc() - Duration::milliseconds(1));
    store.create(&mut record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, None);
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 1);
}

tests_in_both_modes!(
    a_record_stops_loading_at_its_expiry_date,
    delete_expired_removes_exactly_the_expired,
    deleted_records_leave_the_expiry_index,
    caching_store_never_serves_an_expired_record,
    records_expired_by_the_system_clock_never_load,
);
