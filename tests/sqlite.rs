//! `SqliteStore` against real SQLite files: the conformance suite (alone and behind a
//! cache), persistence, what the file holds, corrupt rows, batched expiry, concurrent
//! writers, and a writer process killed with SIGKILL.
#![cfg(feature = "sqlite")]

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicI64, Ordering},
        mpsc, Arc,
    },
    time::{Duration as StdDuration, Instant},
};

use portable_sessions::{
    session::{Id, Record},
    session_store::Error,
    testing::{self, Expiry},
    CachingSessionStore, ExpiredDeletion, MemoryStore, SessionStore, SqliteStore,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use common::{block, live_record, TempDir};

/// A store whose clock the test moves: `(store, seconds since the Unix epoch)`.
fn store_with_clock(path: &Path) -> (SqliteStore, Arc<AtomicI64>) {
    let seconds = Arc::new(AtomicI64::new(OffsetDateTime::now_utc().unix_timestamp()));
    let now = seconds.clone();
    let store = SqliteStore::open(path).unwrap().with_clock(move || {
        OffsetDateTime::from_unix_timestamp(now.load(Ordering::SeqCst)).unwrap()
    });
    (store, seconds)
}

fn raw_connection(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

fn key_of(id: &Id) -> Vec<u8> {
    Sha256::digest(id.to_bytes()).to_vec()
}

#[maybe_async::maybe_async]
async fn sqlite_store_conforms() {
    let dir = TempDir::new("conform");
    let store = SqliteStore::open(dir.db()).unwrap();
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
}

#[maybe_async::maybe_async]
async fn caching_sqlite_store_conforms() {
    let dir = TempDir::new("conform-cached");
    let store = CachingSessionStore::new(MemoryStore::new(), SqliteStore::open(dir.db()).unwrap());
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
    assert!(store.cache().is_empty(), "the suite cleans up the cache");
}

#[maybe_async::maybe_async]
async fn sessions_survive_reopening() {
    let dir = TempDir::new("reopen");
    let mut record = live_record(7);
    {
        let store = SqliteStore::open(dir.db()).unwrap();
        store.create(&mut record).await.unwrap();
    }
    // Opening again is idempotent: the schema is there and is left alone.
    let store = SqliteStore::open(dir.db()).unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
    assert_eq!(store.path(), dir.db());
}

#[maybe_async::maybe_async]
async fn the_file_holds_digests_not_ids() {
    let dir = TempDir::new("no-ids");
    let store = SqliteStore::open(dir.db()).unwrap();
    let mut ids = Vec::new();
    for user in 0..20 {
        let mut record = live_record(user);
        store.create(&mut record).await.unwrap();
        ids.push(record.id);
    }
    let conn = raw_connection(&dir.db());
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    for id in &ids {
        let found: i64 = conn
            .query_row(
                "SELECT count(*) FROM portable_sessions WHERE key = ?1",
                [key_of(id)],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(found, 1, "each record is keyed by the SHA-256 of its id");
    }
    // Neither the id's bytes nor its text appear anywhere: not in the database, not
    // in its write-ahead log.
    let mut files = vec![std::fs::read(dir.db()).unwrap()];
    if let Ok(wal) = std::fs::read(dir.0.join("sessions.db-wal")) {
        files.push(wal);
    }
    for id in &ids {
        let bytes = id.to_bytes();
        let text = id.to_string();
        for file in &files {
            assert!(!file.windows(16).any(|w| w == bytes), "raw id in the file");
            assert!(
                !file.windows(text.len()).any(|w| w == text.as_bytes()),
                "id text in the file"
            );
        }
    }
}

#[maybe_async::maybe_async]
async fn a_corrupt_row_fails_only_its_own_load() {
    let dir = TempDir::new("corrupt");
    let store = SqliteStore::open(dir.db()).unwrap();
    let conn = raw_connection(&dir.db());
    common::check_corruption_is_contained(&store, |id, garbage| {
        let changed = conn
            .execute(
                "UPDATE portable_sessions SET record = ?1 WHERE key = ?2",
                rusqlite::params![garbage, key_of(id)],
            )
            .unwrap();
        assert_eq!(changed, 1);
    })
    .await;
}

#[maybe_async::maybe_async]
async fn expired_rows_never_load_and_are_deleted_in_batches() {
    let dir = TempDir::new("expiry");
    let (store, seconds) = store_with_clock(&dir.db());
    let start = OffsetDateTime::from_unix_timestamp(seconds.load(Ordering::SeqCst)).unwrap();

    // 1300 records expire in a minute (more than two deletion batches), 5 in a day.
    let mut short = Vec::new();
    for n in 0..1300u64 {
        let mut record = Record::new(start + Duration::minutes(1));
        record.insert("n", &n).unwrap();
        store.create(&mut record).await.unwrap();
        short.push(record.id);
    }
    let mut long = Vec::new();
    for n in 0..5u64 {
        let mut record = Record::new(start + Duration::days(1));
        record.insert("n", &n).unwrap();
        store.create(&mut record).await.unwrap();
        long.push(record);
    }
    let nothing_yet = store.delete_expired().await.unwrap();
    assert_eq!(nothing_yet, 0);

    // Two minutes later: expired rows no longer load, though they are still there.
    seconds.fetch_add(120, Ordering::SeqCst);
    let gone = store.load(&short[0]).await.unwrap();
    assert_eq!(gone, None);
    // The expiry date is exact, to the nanosecond, not rounded to the second.
    let mut edge = Record::new(start + Duration::seconds(120) + Duration::nanoseconds(1));
    store.create(&mut edge).await.unwrap();
    let edge_loaded = store.load(&edge.id).await.unwrap();
    assert_eq!(edge_loaded.as_ref(), Some(&edge));

    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 1300);
    let again = store.delete_expired().await.unwrap();
    assert_eq!(again, 0);
    for record in &long {
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(record));
    }
    let rows: i64 = raw_connection(&dir.db())
        .query_row("SELECT count(*) FROM portable_sessions", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(rows, 6);
    // The deletion pass uses the expiry index.
    let plan: String = raw_connection(&dir.db())
        .query_row(
            "EXPLAIN QUERY PLAN SELECT key FROM portable_sessions WHERE expires_at <= 0 LIMIT 1",
            [],
            |row| row.get(3),
        )
        .unwrap();
    assert!(
        plan.contains("portable_sessions_expires_at"),
        "plan: {plan}"
    );
}

#[maybe_async::maybe_async]
async fn dates_beyond_the_column_range_keep_their_meaning() {
    let dir = TempDir::new("far-dates");
    let store = SqliteStore::open(dir.db()).unwrap();
    // Past the year 2262 the column saturates; the record keeps the exact date.
    let mut far = Record::new(OffsetDateTime::now_utc() + Duration::days(365 * 500));
    store.create(&mut far).await.unwrap();
    let loaded = store.load(&far.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&far));
    let mut ancient = Record::new(OffsetDateTime::UNIX_EPOCH - Duration::days(365 * 500));
    store.create(&mut ancient).await.unwrap();
    let loaded = store.load(&ancient.id).await.unwrap();
    assert_eq!(loaded, None);
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 1);
}

#[maybe_async::maybe_async]
async fn a_file_that_is_not_a_database_is_a_backend_error() {
    let dir = TempDir::new("not-a-db");
    std::fs::write(dir.db(), vec![0x42; 4096]).unwrap();
    let opened = SqliteStore::open(dir.db());
    assert!(matches!(opened, Err(Error::Backend(_))), "{opened:?}");
    let in_missing_dir = SqliteStore::open(dir.0.join("no/such/dir/sessions.db"));
    assert!(matches!(in_missing_dir, Err(Error::Backend(_))));
}

/// Instances with their own caches over one store see each other's logouts and
/// logins within the cache lifetime.
#[maybe_async::maybe_async]
async fn two_caches_over_one_sqlite_file_see_each_others_logouts() {
    let dir = common::TempDir::new("two-caches");
    let a = SqliteStore::open(dir.db()).unwrap();
    let b = SqliteStore::open(dir.db()).unwrap();
    common::check_two_caches_over_one_store(a, b).await;
}

/// A table made before owners (and versions) existed gets its columns and the owner
/// index, keeps its rows, and then files owned records.
#[maybe_async::maybe_async]
async fn a_table_from_before_owners_is_migrated() {
    let dir = TempDir::new("migrate-owner");
    let old = live_record(3);
    {
        let conn = raw_connection(&dir.db());
        conn.execute_batch(
            "CREATE TABLE portable_sessions (
                 key BLOB PRIMARY KEY NOT NULL,
                 expires_at INTEGER NOT NULL,
                 record BLOB NOT NULL
             ) WITHOUT ROWID;",
        )
        .unwrap();
        let expires_at = i64::try_from(old.expiry_date.unix_timestamp_nanos()).unwrap();
        conn.execute(
            "INSERT INTO portable_sessions (key, expires_at, record) VALUES (?1, ?2, ?3)",
            rusqlite::params![
                key_of(&old.id),
                expires_at,
                old.encode_without_id().unwrap()
            ],
        )
        .unwrap();
    }
    let store = SqliteStore::open(dir.db()).unwrap();
    let loaded = store.load(&old.id).await.unwrap().expect("the old row");
    assert_eq!(loaded, old);
    let index: bool = raw_connection(&dir.db())
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'portable_sessions_owner')",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert!(index, "the owner index is made");
    testing::check_owners(&store).await;
    // Opening again changes nothing.
    drop(store);
    let store = SqliteStore::open(dir.db()).unwrap();
    let again = store.load(&old.id).await.unwrap();
    assert_eq!(again.as_ref(), Some(&old));
}

tests_in_both_modes!(
    a_table_from_before_owners_is_migrated,
    two_caches_over_one_sqlite_file_see_each_others_logouts,
    sqlite_store_conforms,
    caching_sqlite_store_conforms,
    sessions_survive_reopening,
    the_file_holds_digests_not_ids,
    a_corrupt_row_fails_only_its_own_load,
    expired_rows_never_load_and_are_deleted_in_batches,
    dates_beyond_the_column_range_keep_their_meaning,
    a_file_that_is_not_a_database_is_a_backend_error,
);

#[test]
fn many_threads_and_two_handles_share_one_file() {
    let dir = TempDir::new("threads");
    // Two stores on one file stand in for two processes.
    let stores = [
        SqliteStore::open(dir.db()).unwrap(),
        SqliteStore::open(dir.db()).unwrap(),
    ];
    let taken = Id::default();
    let handles: Vec<_> = (0..8u64)
        .map(|thread| {
            let store = stores[thread as usize % 2].clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for n in 0..100u64 {
                    let mut record = live_record(thread * 1000 + n);
                    if n % 10 == 0 {
                        record.id = taken; // collisions, certain
                    }
                    block(store.create(&mut record)).unwrap();
                    record.insert("again", &n).unwrap();
                    block(store.save(&record)).unwrap();
                    mine.push(record);
                }
                mine
            })
        })
        .collect();
    let records: Vec<Record> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let ids: std::collections::HashSet<Id> = records.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 800, "every create got its own id");
    for record in &records {
        let loaded = block(stores[1].load(&record.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(record));
    }
}

/// The environment variable that turns [`child_writer`] into the writer process.
const CHILD_DB: &str = "PORTABLE_SESSIONS_TEST_CHILD_DB";

/// Not a test of its own: the body of the writer process that
/// [`acknowledged_writes_survive_sigkill`] starts by running this test binary again.
/// Without the environment variable it returns at once.
///
/// It creates records, and saves new versions of one record, forever, printing a line
/// for each write after the store acknowledged it.
#[test]
fn child_writer() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let store = SqliteStore::open(path).unwrap();
    let mut counter = live_record(0);
    block(store.create(&mut counter)).unwrap();
    // The harness has printed `test child_writer ... ` without a newline.
    println!("\nCOUNTER {}", counter.id);
    for n in 1u64.. {
        let mut record = live_record(n);
        block(store.create(&mut record)).unwrap();
        println!("CREATED {} {n}", record.id);
        counter.insert("user", &n).unwrap();
        block(store.save(&counter)).unwrap();
        println!("SAVED {n}");
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = TempDir::new("sigkill");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, dir.db())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the test binary as the writer process");
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        // Only whole lines: a line cut by the kill was never acknowledged.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let mut acked = Vec::new();
    let deadline = Instant::now() + StdDuration::from_secs(120);
    let mut creates = 0;
    while creates < 300 {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                creates += usize::from(line.starts_with("CREATED"));
                acked.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the writer acknowledged {creates} creates before the deadline");
            }
        }
    }
    // SIGKILL, in the middle of its writing.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the writer was killed, not finished");
    #[cfg(unix)]
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "SIGKILL"
    );
    reader.join().unwrap();
    acked.extend(received.try_iter());

    let mut counter = None;
    let mut created = Vec::new();
    let mut last_saved = 0;
    for line in &acked {
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["COUNTER", id] => counter = Some(id.parse::<Id>().unwrap()),
            ["CREATED", id, n] => {
                created.push((id.parse::<Id>().unwrap(), n.parse::<u64>().unwrap()))
            }
            ["SAVED", n] => last_saved = n.parse().unwrap(),
            _ => {} // the test harness's own lines
        }
    }
    assert!(created.len() >= 300);

    // The file opens cleanly, and holds every acknowledged write.
    let conn = raw_connection(&dir.db());
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    let store = SqliteStore::open(dir.db()).unwrap();
    for (id, n) in &created {
        let record = block(store.load(id))
            .unwrap()
            .expect("an acknowledged create");
        assert_eq!(record.get::<u64>("user").unwrap(), Some(*n));
    }
    let counter = block(store.load(&counter.unwrap())).unwrap().unwrap();
    // A save in flight at the kill may or may not have landed; every one acknowledged
    // before it did.
    let value = counter.get::<u64>("user").unwrap().unwrap();
    assert!(value >= last_saved, "saved {last_saved}, found {value}");
    let mut next = live_record(1);
    block(store.create(&mut next)).unwrap();
}

#[test]
fn the_store_is_send_sync_clone_and_fits_in_a_dyn_store() {
    fn shareable<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    shareable::<SqliteStore>();
    fn as_dyn(store: SqliteStore) -> std::sync::Arc<dyn ExpiredDeletion> {
        std::sync::Arc::new(store)
    }
    let _ = as_dyn;
}

/// A purge of 200,000 expired rows (after a long downtime, say) lets a writer of the
/// same store in between its batches: every save succeeds, many during the purge,
/// none waits out the busy timeout.
#[test]
fn a_large_purge_lets_writers_in() {
    const EXPIRED: usize = 200_000;
    let dir = TempDir::new("purge");
    let store = SqliteStore::open(dir.db()).unwrap();
    let bytes = common::expired_record().encode_without_id().unwrap();
    let past = (OffsetDateTime::now_utc() - Duration::hours(1)).unix_timestamp_nanos() as i64;
    {
        let mut conn = raw_connection(&dir.db());
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO portable_sessions (key, expires_at, record, version)
                     VALUES (?1, ?2, ?3, 0)",
                )
                .unwrap();
            for _ in 0..EXPIRED {
                insert
                    .execute(rusqlite::params![key_of(&Id::default()), past, &bytes])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }

    let purging = std::sync::atomic::AtomicBool::new(true);
    let (deleted, (saves, errors)) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut record = live_record(1);
            block(store.create(&mut record)).unwrap();
            let (mut saves, mut errors) = (0usize, Vec::new());
            while purging.load(Ordering::SeqCst) {
                match block(store.save(&record)) {
                    Ok(()) => saves += 1,
                    Err(err) => errors.push(err.report()),
                }
            }
            (saves, errors)
        });
        let deleted = block(store.delete_expired());
        purging.store(false, Ordering::SeqCst);
        (deleted, writer.join().unwrap())
    });
    assert_eq!(deleted.unwrap(), EXPIRED);
    assert!(
        errors.is_empty(),
        "saves failed during the purge: {errors:?}"
    );
    // The purge ran about 390 batches; the writer had a turn after most of them.
    assert!(saves >= 50, "only {saves} saves got in during the purge");
}
