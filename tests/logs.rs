//! What the crate logs through `log`, in both modes: each store type that runs the
//! non-atomic `update` fallback is reported once, and a write dated in the past is
//! reported rather than failing silently. A logger of its own captures the records
//! (one per test binary, so these tests live apart).

mod common;

use std::sync::Mutex;

use portable_sessions::{
    session::{Expiry, Id, Record},
    session_store::{Result, Update},
    MemoryStore, SessionManager, SessionStore,
};
use time::{Duration, OffsetDateTime};

tests_in_both_modes!(
    each_non_atomic_store_type_is_reported_once,
    a_session_dated_in_the_past_is_reported,
);

#[cfg(feature = "postgres")]
#[test]
#[allow(clippy::unit_arg)] // in blocking mode the body has run, and block passes () on
fn a_server_reached_directly_keeps_its_prepared_statements() {
    common::block(keeps_its_prepared_statements());
}

/// A PostgresStore on a server reached directly keeps its statements prepared: it
/// never takes the server for a pooler that loses them (which it would report).
#[cfg(feature = "postgres")]
#[maybe_async::maybe_async]
async fn keeps_its_prepared_statements() {
    let switched = "sends its statements whole";
    records_with(log::Level::Info, "");
    let schema = common::PgSchema::new("logs_named");
    let store = schema.store().with_max_connections(4);
    let mut records = Vec::new();
    for n in 0..40u64 {
        let mut record = common::live_record(n);
        store.create(&mut record).await.unwrap();
        records.push(record);
    }
    for record in &records {
        store.save(record).await.unwrap();
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(record));
        let updated = store.update(record).await.unwrap();
        assert!(matches!(updated, Update::Written(_)), "{updated:?}");
    }
    assert_eq!(records_with(log::Level::Info, switched), 0);
}

static RECORDS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        RECORDS
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
    }

    fn flush(&self) {}
}

/// Installs the capture (once) and returns how many warnings so far contain `text`.
fn warnings_with(text: &str) -> usize {
    records_with(log::Level::Warn, text)
}

/// Installs the capture (once) and returns how many records of `level` so far
/// contain `text`.
fn records_with(level: log::Level, text: &str) -> usize {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
    RECORDS
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, message)| *at == level && message.contains(text))
        .count()
}

macro_rules! non_atomic_store {
    ($name:ident) => {
        /// A store that keeps the provided, non-atomic `update`.
        #[derive(Debug, Default)]
        struct $name(MemoryStore);

        #[maybe_async::maybe_async]
        impl SessionStore for $name {
            async fn create(&self, record: &mut Record) -> Result<()> {
                self.0.create(record).await
            }
            async fn save(&self, record: &Record) -> Result<()> {
                self.0.save(record).await
            }
            async fn load(&self, id: &Id) -> Result<Option<Record>> {
                self.0.load(id).await
            }
            async fn delete(&self, id: &Id) -> Result<()> {
                self.0.delete(id).await
            }
        }
    };
}

non_atomic_store!(FirstNonAtomic);
non_atomic_store!(SecondNonAtomic);

#[maybe_async::maybe_async]
async fn update_twice(store: &impl SessionStore) {
    let mut record = Record::new(OffsetDateTime::now_utc() + Duration::hours(1));
    store.create(&mut record).await.unwrap();
    for _ in 0..2 {
        let written = store.update(&record).await.unwrap();
        assert_eq!(written, Update::Written(record.version + 1));
        record.version += 1;
    }
}

#[maybe_async::maybe_async]
async fn each_non_atomic_store_type_is_reported_once() {
    warnings_with("");
    update_twice(&FirstNonAtomic::default()).await;
    update_twice(&FirstNonAtomic::default()).await;
    update_twice(&SecondNonAtomic::default()).await;
    assert_eq!(warnings_with("FirstNonAtomic"), 1);
    assert_eq!(
        warnings_with("SecondNonAtomic"),
        1,
        "a second store type is reported too"
    );
}

#[maybe_async::maybe_async]
async fn a_session_dated_in_the_past_is_reported() {
    warnings_with("");
    let past = OffsetDateTime::now_utc() - Duration::hours(1);
    let manager = SessionManager::new(MemoryStore::new()).with_expiry(Expiry::AtDateTime(past));
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    manager.finish(&session).await.unwrap();
    let id = session.id().await.unwrap().unwrap();
    let id = format!("{id:?}");
    let reported = RECORDS
        .lock()
        .unwrap()
        .iter()
        .filter(|(level, message)| {
            *level == log::Level::Warn && message.contains(&id) && message.contains("already past")
        })
        .count();
    assert_eq!(reported, 1, "the write is reported");
}
