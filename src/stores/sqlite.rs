//! [`SqliteStore`]: sessions in an SQLite database file.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::{Condvar, Mutex};
use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;

use crate::{
    lifecycle::clock::Clock,
    session::{random_id, Ending, Handle, Id, OwnedSession, Owner, Record},
    session_store::{Error, ExpiredDeletion, Result, SessionStore, Update},
    stores::stored,
};

/// How many expired rows one `DELETE` statement removes: each batch is its own short
/// write transaction, so saves from other connections get in between batches.
const DELETE_BATCH: usize = 512;

/// How long a connection waits for another one's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS portable_sessions (
    key BLOB PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL,
    record BLOB NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    owner TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS portable_sessions_expires_at ON portable_sessions (expires_at);
";

/// The owner index: made after the `owner` column is added to an older table.
const OWNER_INDEX: &str = "
CREATE INDEX IF NOT EXISTS portable_sessions_owner ON portable_sessions (owner)
    WHERE owner IS NOT NULL;
";

/// A session store in an SQLite database file: sessions survive restarts, and several
/// processes on one machine can share the file.
///
/// - **Schema.** [`open`](SqliteStore::open) creates one table, `portable_sessions`
///   (a 32-byte key, the expiry date in Unix nanoseconds with an index on it, the
///   encoded record, and its version), if it is not there yet: opening is idempotent,
///   and the table can live in a database file the program also uses for other
///   things. A table made before versions existed gets its `version` column added,
///   and one made before owners existed its `owner` column (with a partial index
///   on it).
/// - **A user's sessions.** A record's owner is written to the indexed `owner`
///   column by the same statement that writes the record, so listing an owner's
///   sessions is one indexed query, and ending them one write transaction.
/// - **Conditional writes.** [`update`](SessionStore::update) is one `UPDATE`
///   statement that compares the version and the expiry date and writes in the same
///   step.
/// - **Stolen files give no sessions.** Records are keyed by the SHA-256 digest of
///   their id and stored with the id zeroed, so the file, its WAL and its backups
///   hold no id that could be replayed as a cookie. Ids are 128 random bits, so an
///   unkeyed digest cannot be reversed by guessing; no secret needs configuring.
/// - **Durability.** The database runs in WAL mode with `synchronous = FULL`: once a
///   write returns, it survives the process being killed, and the machine losing
///   power on storage that honours `fsync`. Each write therefore costs a sync of the
///   log (about 1.5 ms on this project's test machine); reads cost microseconds.
///   Readers never wait for the writer.
/// - **Connections.** Clones of a store share a small pool of connections (as many
///   as the machine has CPUs, from 2 to 8), opened on demand. Each operation borrows
///   one for a single statement; a writer that finds the database locked by another
///   connection or process waits up to 5 s.
/// - **Expiry.** [`load`](SessionStore::load) never returns an expired row, even
///   before [`delete_expired`](ExpiredDeletion::delete_expired) removes it; that pass
///   walks the expiry index in batches of 512 rows and returns how many it deleted.
/// - **Corrupt rows** make [`load`](SessionStore::load) of that id fail with
///   [`Error::Decode`]; other sessions are unaffected.
///
/// - **Beside sqlx.** rusqlite 0.31 to 0.40 are accepted, so a program that also uses
///   sqlx 0.8's SQLite driver builds with both linking the same SQLite (cargo picks
///   rusqlite 0.31 then), and both can use one database file.
///
/// # Blocking
///
/// SQLite calls block. In async mode (the default) each write (an fsync'd commit)
/// runs on the [`blocking`](https://docs.rs/blocking) crate's thread pool, so no
/// executor thread waits for the disk, whatever the executor. In WAL mode a load runs
/// on the calling task when a pooled connection is idle: a WAL read never waits for a
/// writer and costs microseconds (for a database the operating system keeps in its
/// page cache), less than the hand-off to the pool; without an idle connection, or
/// where WAL is unavailable, it goes to the pool too. In sync mode everything runs on the calling thread.
/// [`open`](SqliteStore::open) blocks in both modes: call it at startup.
///
/// # Examples
///
/// ```
/// use portable_sessions::{session::Record, SessionStore, SqliteStore};
/// use time::{Duration, OffsetDateTime};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("ps-doc-sqlite-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("sessions.db");
/// let store = SqliteStore::open(&path)?;
/// let mut record = Record::new(OffsetDateTime::now_utc() + Duration::days(7));
/// record.insert("user_id", &42u64)?;
/// store.create(&mut record).await?;
/// drop(store);
///
/// // Another run of the program finds the session.
/// let store = SqliteStore::open(&path)?;
/// let loaded = store.load(&record.id).await?.expect("the session survived");
/// assert_eq!(loaded.get::<u64>("user_id")?, Some(42));
/// # drop(store);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: Arc<Pool>,
    clock: Clock,
}

impl SqliteStore {
    /// Opens (creating it if needed) the database file at `path`, switches it to WAL
    /// mode and creates the sessions table and its index if they are missing.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if the file cannot be opened or created, is not an
    /// SQLite database, or the schema cannot be created.
    ///
    /// # Blocking
    ///
    /// Opens the file and runs the schema statements on the calling thread, in both
    /// modes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let conn = connect(&path).map_err(Error::backend)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(Error::backend)?;
        let wal = mode.eq_ignore_ascii_case("wal");
        if !wal {
            // Some file systems cannot hold a WAL; SQLite then keeps its rollback
            // journal, which is slower for concurrent readers but just as safe.
            log::warn!(
                "SQLite kept journal mode {mode:?} for {}: WAL is unavailable",
                path.display()
            );
        }
        conn.execute_batch(SCHEMA).map_err(Error::backend)?;
        add_column(&conn, "version", "INTEGER NOT NULL DEFAULT 0").map_err(Error::backend)?;
        add_column(&conn, "owner", "TEXT").map_err(Error::backend)?;
        conn.execute_batch(OWNER_INDEX).map_err(Error::backend)?;
        let max = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .clamp(2, 8);
        let pool = Pool {
            path,
            wal,
            max,
            writer: Mutex::new(()),
            state: Mutex::new(PoolState {
                idle: vec![conn],
                open: 1,
            }),
            returned: Condvar::new(),
        };
        Ok(Self {
            pool: Arc::new(pool),
            clock: Clock::default(),
        })
    }

    /// Returns the store reading the current time from `clock` instead of the system
    /// clock: for tests that move time forward instead of sleeping.
    ///
    /// The time decides which records [`load`](SessionStore::load) treats as expired
    /// and which [`delete_expired`](ExpiredDeletion::delete_expired) removes.
    pub fn with_clock(
        mut self,
        clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static,
    ) -> Self {
        self.clock = Clock::custom(clock);
        self
    }

    /// Returns the path of the database file.
    pub fn path(&self) -> &Path {
        &self.pool.path
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// Runs `op` with a pooled connection, off the executor.
    #[maybe_async::async_impl]
    async fn with_conn<T, F>(&self, op: F) -> Result<T>
    where
        F: FnOnce(&Db<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        blocking::unblock(move || pool.with_conn(op)).await
    }

    /// Runs `op` with a pooled connection, on this thread.
    #[maybe_async::sync_impl]
    fn with_conn<T, F>(&self, op: F) -> Result<T>
    where
        F: FnOnce(&Db<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.pool.with_conn(op)
    }
}

/// Opens one connection with the settings every pooled connection needs.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // In WAL mode FULL syncs the log at every commit: an acknowledged write survives
    // power loss, not only a crash of this process.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// Adds column `name` of type `kind` to the table if it is missing: `version` to a
/// table made before versions existed (its rows start at version 0), `owner` to one
/// made before owners existed.
fn add_column(conn: &Connection, name: &str, kind: &str) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('portable_sessions') WHERE name = ?1)",
        [name],
        |row| row.get(0),
    )?;
    if !has {
        // Another process may add it at the same moment: a duplicate column is fine.
        match conn.execute_batch(&format!(
            "ALTER TABLE portable_sessions ADD COLUMN {name} {kind}"
        )) {
            Err(err) if err.to_string().contains("duplicate column") => {}
            other => other?,
        }
    }
    Ok(())
}

/// The owner column's value for `record`.
fn column_owner(record: &Record) -> Option<&str> {
    record.ownership.as_ref().map(|o| o.owner.as_str())
}

/// The version as stored: SQLite integers are signed, so the `u64` is kept as the
/// `i64` with the same bits.
fn column_version(version: u64) -> i64 {
    i64::from_ne_bytes(version.to_ne_bytes())
}

fn record_version(column: i64) -> u64 {
    u64::from_ne_bytes(column.to_ne_bytes())
}

/// The expiry date as stored in the indexed column: Unix nanoseconds, saturated to
/// the `i64` range (years 1677 to 2262). A date beyond either end sorts as that end,
/// which keeps its meaning (long expired, or not expiring); the exact date is in the
/// record itself.
fn column_time(at: OffsetDateTime) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

fn create_row(conn: &Connection, record: &mut Record) -> Result<()> {
    // The stored bytes do not contain the id, so a new id needs no new encoding.
    let bytes = stored::encode(record)?;
    let expires_at = column_time(record.expiry_date);
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO portable_sessions (key, expires_at, record, version, owner)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key) DO NOTHING",
        )
        .map_err(Error::backend)?;
    let version = column_version(record.version);
    loop {
        let key = stored::digest(&record.id);
        if insert
            .execute(params![
                &key[..],
                expires_at,
                &bytes,
                version,
                column_owner(record)
            ])
            .map_err(Error::backend)?
            == 1
        {
            return Ok(());
        }
        record.id = random_id()?;
    }
}

fn save_row(conn: &Connection, record: &Record) -> Result<()> {
    let bytes = stored::encode(record)?;
    let key = stored::digest(&record.id);
    conn.prepare_cached(
        "INSERT INTO portable_sessions (key, expires_at, record, version, owner)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at,
             record = excluded.record, version = excluded.version, owner = excluded.owner",
    )
    .and_then(|mut upsert| {
        upsert.execute(params![
            &key[..],
            column_time(record.expiry_date),
            &bytes,
            column_version(record.version),
            column_owner(record)
        ])
    })
    .map_err(Error::backend)?;
    Ok(())
}

fn update_row(conn: &Connection, record: &Record, now: OffsetDateTime) -> Result<Update> {
    let bytes = stored::encode(record)?;
    let key = stored::digest(&record.id);
    let expected = column_version(record.version);
    let next = record.version.wrapping_add(1);
    // One statement: the compare and the write are atomic.
    let changed = conn
        .prepare_cached(
            "UPDATE portable_sessions SET expires_at = ?1, record = ?2, version = ?3, owner = ?7
             WHERE key = ?4 AND version = ?5 AND expires_at > ?6",
        )
        .and_then(|mut update| {
            update.execute(params![
                column_time(record.expiry_date),
                &bytes,
                column_version(next),
                &key[..],
                expected,
                column_time(now),
                column_owner(record)
            ])
        })
        .map_err(Error::backend)?;
    if changed == 1 {
        return Ok(Update::Written(next));
    }
    // Nothing written: tell a newer version from no live record.
    let live: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM portable_sessions WHERE key = ?1 AND expires_at > ?2)",
        )
        .and_then(|mut select| {
            select.query_row(params![&key[..], column_time(now)], |row| row.get(0))
        })
        .map_err(Error::backend)?;
    Ok(if live { Update::Conflict } else { Update::Gone })
}

fn load_row(conn: &Connection, id: &Id, now: OffsetDateTime) -> Result<Option<Record>> {
    let key = stored::digest(id);
    let row: Option<(Vec<u8>, i64)> = conn
        .prepare_cached(
            "SELECT record, version FROM portable_sessions WHERE key = ?1 AND expires_at > ?2",
        )
        .and_then(|mut select| {
            select
                .query_row(params![&key[..], column_time(now)], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
        })
        .map_err(Error::backend)?;
    let Some((bytes, version)) = row else {
        return Ok(None);
    };
    let mut record = stored::decode(id, &bytes)?;
    record.version = record_version(version);
    // The column is the index; the record's own date is the exact one.
    Ok(Some(record).filter(|r| !r.is_expired_at(now)))
}

fn delete_row(conn: &Connection, id: &Id) -> Result<()> {
    let key = stored::digest(id);
    conn.prepare_cached("DELETE FROM portable_sessions WHERE key = ?1")
        .and_then(|mut delete| delete.execute(params![&key[..]]))
        .map_err(Error::backend)?;
    Ok(())
}

/// `owner`'s live rows: each key (the handle) and record.
/// `owner`'s live rows: each key (the handle) and record, or `None` for a record
/// that cannot be read (logged).
fn owned_rows(
    conn: &Connection,
    owner: &Owner,
    now: OffsetDateTime,
) -> Result<Vec<(Handle, Option<Record>)>> {
    let mut select = conn
        .prepare_cached(
            "SELECT key, record FROM portable_sessions WHERE owner = ?1 AND expires_at > ?2",
        )
        .map_err(Error::backend)?;
    let rows = select
        .query_map(params![owner.as_str(), column_time(now)], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .map_err(Error::backend)?;
    let mut owned = Vec::new();
    for row in rows {
        let (key, bytes) = row.map_err(Error::backend)?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| Error::decode("a session key is not 32 bytes long"))?;
        let handle = Handle::from_bytes(key);
        let record = match stored::decode_listed(&bytes) {
            Ok(record) => record,
            Err(err) => {
                stored::unreadable_in_listing(&handle, &err);
                owned.push((handle, None));
                continue;
            }
        };
        let mine = record.ownership.as_ref().is_some_and(|o| o.owner == *owner);
        if mine && !record.is_expired_at(now) {
            owned.push((handle, Some(record)));
        }
    }
    Ok(owned)
}

fn list_rows(conn: &Connection, owner: &Owner, now: OffsetDateTime) -> Result<Vec<OwnedSession>> {
    owned_rows(conn, owner, now)?
        .into_iter()
        .filter_map(|(handle, record)| Some(OwnedSession::new(handle, record?)))
        .collect()
}

/// Deletes the rows of `owner` that `ending` names: one statement on the owner
/// column (rows whose record cannot be read go too: the column says whose they
/// are), or, for the oldest beyond a limit, a listing and the deletes in one
/// transaction.
fn end_rows(
    conn: &Connection,
    owner: &Owner,
    ending: Ending,
    now: OffsetDateTime,
) -> Result<Vec<Handle>> {
    let (sql, key) = match ending {
        Ending::One(handle) => (
            "DELETE FROM portable_sessions WHERE owner = ?1 AND expires_at > ?2 AND key = ?3
             RETURNING key",
            handle.to_bytes().to_vec(),
        ),
        Ending::AllBut(handle) => (
            "DELETE FROM portable_sessions WHERE owner = ?1 AND expires_at > ?2 AND key <> ?3
             RETURNING key",
            handle.to_bytes().to_vec(),
        ),
        Ending::All => (
            "DELETE FROM portable_sessions WHERE owner = ?1 AND expires_at > ?2 AND key <> ?3
             RETURNING key",
            Vec::new(),
        ),
        Ending::AllButNewest(_) => return end_oldest_rows(conn, owner, ending, now),
    };
    let mut delete = conn.prepare_cached(sql).map_err(Error::backend)?;
    let rows = delete
        .query_map(params![owner.as_str(), column_time(now), key], |row| {
            row.get::<_, Vec<u8>>(0)
        })
        .map_err(Error::backend)?;
    let mut ended = Vec::new();
    for key in rows {
        let key: [u8; 32] = key
            .map_err(Error::backend)?
            .try_into()
            .map_err(|_| Error::decode("a session key is not 32 bytes long"))?;
        ended.push(Handle::from_bytes(key));
    }
    Ok(ended)
}

/// Deletes `owner`'s oldest rows beyond the limit of `ending`, in one transaction.
fn end_oldest_rows(
    conn: &Connection,
    owner: &Owner,
    ending: Ending,
    now: OffsetDateTime,
) -> Result<Vec<Handle>> {
    // IMMEDIATE: the writer's lock from the start, so that the read and the deletes
    // see one state, and another process's write waits instead of failing it.
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(Error::backend)?;
    let owned = owned_rows(&tx, owner, now)?;
    // An unreadable record counts as the oldest: the limit ends it first.
    let created = |record: &Option<Record>| {
        record
            .as_ref()
            .and_then(|r| r.ownership.as_ref())
            .map_or(OffsetDateTime::UNIX_EPOCH, |o| o.created_at)
    };
    let picked = ending.pick(
        owned
            .iter()
            .map(|(handle, record)| (*handle, created(record)))
            .collect(),
    );
    {
        let mut delete = tx
            .prepare_cached("DELETE FROM portable_sessions WHERE key = ?1 AND owner = ?2")
            .map_err(Error::backend)?;
        for handle in &picked {
            delete
                .execute(params![&handle.to_bytes()[..], owner.as_str()])
                .map_err(Error::backend)?;
        }
    }
    tx.commit().map_err(Error::backend)?;
    Ok(picked)
}

fn delete_expired_rows(db: &Db<'_>, now: OffsetDateTime) -> Result<usize> {
    let mut deleted = 0;
    loop {
        // Each batch is its own transaction, under the writer lock only for itself:
        // writers of this process that queued meanwhile go next, and other processes'
        // get SQLite's lock in the pause.
        let batch = db.write(|conn| {
            conn.prepare_cached(
                "DELETE FROM portable_sessions WHERE key IN
                 (SELECT key FROM portable_sessions WHERE expires_at <= ?1 LIMIT ?2)",
            )
            .and_then(|mut delete| delete.execute(params![column_time(now), DELETE_BATCH as i64]))
            .map_err(Error::backend)
        })?;
        deleted += batch;
        if batch < DELETE_BATCH {
            return Ok(deleted);
        }
        std::thread::yield_now();
    }
}

#[maybe_async::maybe_async]
impl SessionStore for SqliteStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        // The blocking pool needs owned data; a record clone shares its values.
        let mut owned = record.clone();
        let id = self
            .with_conn(move |db| {
                db.write(|conn| create_row(conn, &mut owned))
                    .map(|()| owned.id)
            })
            .await?;
        record.id = id;
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let owned = record.clone();
        self.with_conn(move |db| db.write(|conn| save_row(conn, &owned)))
            .await
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        let (id, clock) = (*id, self.clock.clone());
        // In async mode a read runs on the calling task when a connection is idle: in
        // WAL mode it never waits for the writer and takes microseconds, less than
        // the hand-off to the thread pool and back. Without an idle connection (one
        // would have to be opened, or waited for) it goes to the pool like a write.
        #[cfg(not(feature = "sync"))]
        if let Some(loaded) = self
            .pool
            .with_idle_conn(|db| db.read(|conn| load_row(conn, &id, clock.now())))
        {
            return loaded;
        }
        // The time is read once the connection is in hand: a wait for it must not
        // let a record that expired meanwhile through.
        self.with_conn(move |db| db.read(|conn| load_row(conn, &id, clock.now())))
            .await
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        let id = *id;
        self.with_conn(move |db| db.write(|conn| delete_row(conn, &id)))
            .await
    }

    /// One conditional `UPDATE` statement: atomic.
    async fn update(&self, record: &Record) -> Result<Update> {
        let (owned, clock) = (record.clone(), self.clock.clone());
        // The time is read under the writer lock, just before the statement: a wait
        // for a connection or the lock must not let an expired record be written.
        self.with_conn(move |db| db.write(|conn| update_row(conn, &owned, clock.now())))
            .await
    }

    fn atomic_update(&self) -> bool {
        true
    }

    fn supports_owners(&self) -> bool {
        true
    }

    /// One query on the indexed `owner` column.
    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        let (owner, clock) = (owner.clone(), self.clock.clone());
        self.with_conn(move |db| db.read(|conn| list_rows(conn, &owner, clock.now())))
            .await
    }

    /// One write transaction: the owner's live rows are read, and those `ending`
    /// names deleted, with no other write in between.
    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        let (owner, clock) = (owner.clone(), self.clock.clone());
        self.with_conn(move |db| db.write(|conn| end_rows(conn, &owner, ending, clock.now())))
            .await
    }
}

#[maybe_async::maybe_async]
impl ExpiredDeletion for SqliteStore {
    async fn delete_expired(&self) -> Result<usize> {
        let now = self.now();
        self.with_conn(move |db| delete_expired_rows(db, now)).await
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.pool.path)
            .field("connections", &self.pool.state.lock().open)
            .field("clock", &self.clock)
            .finish()
    }
}

/// A pooled connection lent to one operation, with the pool's writer lock.
struct Db<'a> {
    conn: &'a Connection,
    writer: &'a Mutex<()>,
}

impl Db<'_> {
    /// Runs a read.
    fn read<T>(&self, op: impl FnOnce(&Connection) -> T) -> T {
        op(self.conn)
    }

    /// Runs a write while holding the writer lock, then hands the lock fairly to the
    /// next writer in line.
    fn write<T>(&self, op: impl FnOnce(&Connection) -> T) -> T {
        let turn = self.writer.lock();
        let result = op(self.conn);
        parking_lot::MutexGuard::unlock_fair(turn);
        result
    }
}

/// Connections to one database file, opened on demand up to `max`.
///
/// A connection is used by one thread at a time, for one statement or one batch, and
/// then returned; when all `max` are busy a caller waits for one (SQLite serializes
/// writers anyway, and readers in WAL mode are quick).
struct Pool {
    path: PathBuf,
    /// `true` if the database is in WAL mode, where readers never wait for writers.
    #[cfg_attr(feature = "sync", allow(dead_code))]
    wal: bool,
    max: usize,
    /// Taken by each write statement of this process, and handed on fairly: a long
    /// `delete_expired` lets the writers that queued during a batch in before its
    /// next batch, instead of re-taking SQLite's lock while they sleep in its busy
    /// handler (and, after its timeout, fail).
    writer: Mutex<()>,
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Connection>,
    /// Connections in existence: idle, borrowed, or being opened.
    open: usize,
}

impl Pool {
    fn with_conn<T>(&self, op: impl FnOnce(&Db<'_>) -> Result<T>) -> Result<T> {
        let conn = self.take()?;
        self.run_on(conn, op)
    }

    /// Runs `op` on an idle connection if there is one, without waiting or opening,
    /// and only in WAL mode: in a rollback journal a reader may wait for a writer.
    #[cfg(not(feature = "sync"))]
    fn with_idle_conn<T>(&self, op: impl FnOnce(&Db<'_>) -> Result<T>) -> Option<Result<T>> {
        if !self.wal {
            return None;
        }
        let conn = self.state.lock().idle.pop()?;
        Some(self.run_on(conn, op))
    }

    /// Runs `op` on `conn`, then gives the connection back.
    fn run_on<T>(&self, conn: Connection, op: impl FnOnce(&Db<'_>) -> Result<T>) -> Result<T> {
        let panic_guard = LostOnPanic(self);
        let result = op(&Db {
            conn: &conn,
            writer: &self.writer,
        });
        std::mem::forget(panic_guard);
        self.state.lock().idle.push(conn);
        self.returned.notify_one();
        result
    }

    fn take(&self) -> Result<Connection> {
        let mut state = self.state.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(conn);
            }
            if state.open < self.max {
                state.open += 1;
                break;
            }
            self.returned.wait(&mut state);
        }
        // Open outside the lock: it touches the file system.
        drop(state);
        connect(&self.path).map_err(|err| {
            self.forget_one();
            Error::backend(err)
        })
    }

    /// Counts out a connection that will not come back, so that another can be opened.
    fn forget_one(&self) {
        self.state.lock().open -= 1;
        self.returned.notify_one();
    }
}

/// Armed while a connection is borrowed: if the operation panics, the connection is
/// dropped with the stack and this counts it out, so the pool never shrinks.
struct LostOnPanic<'a>(&'a Pool);

impl Drop for LostOnPanic<'_> {
    fn drop(&mut self) {
        self.0.forget_one();
    }
}
