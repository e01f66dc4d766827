//! `PostgresStore` against real PostgreSQL servers: the conformance suite (alone and
//! behind a cache) on the shared server at 127.0.0.1:5432 in a schema per test; rows
//! as PostgreSQL holds them; corrupt rows; batched deletion; and outages of servers
//! the tests start, stop, freeze and restart themselves.
#![cfg(feature = "postgres")]

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration as StdDuration, Instant},
};

use portable_sessions::{
    session::{Ending, Handle, Id, Owner, Ownership, Record},
    session_store::{Error, Result, Update},
    testing::{self, Expiry},
    CachingSessionStore, ExpiredDeletion, MemoryStore, PostgresStore, SessionStore,
};
use rustix::process::{kill_process, Pid, Signal};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use common::{
    block, every_operation, is_backend, live_record,
    pgbouncer::{PgBouncer, PoolMode, POOL_SIZE},
    psql, wait_for, LoopTimer, PgSchema, FAIL_WITHIN, TIMEOUT,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key_hex(id: &Id) -> String {
    hex(&Sha256::digest(id.to_bytes()))
}

/// A stored record carries a check of its own key: the same bytes found under
/// another key (a reply meant for another session, a copied row) are refused.
#[maybe_async::maybe_async]
async fn a_row_under_another_key_is_refused() {
    let schema = PgSchema::new("misdelivered");
    let store = schema.store();
    let mut record = live_record(7);
    store.create(&mut record).await.unwrap();
    let other = Id::default();
    psql(&format!(
        "INSERT INTO {table} (key, expires_at, version, record)
         SELECT '\\x{other}'::bytea, expires_at, version, record FROM {table}
         WHERE key = '\\x{own}'::bytea",
        table = schema.table(),
        other = key_hex(&other),
        own = key_hex(&record.id),
    ));
    let err = store.load(&other).await.unwrap_err();
    assert!(matches!(err, Error::Decode(_)), "{err:?}");
    assert!(err.report().contains("another key"), "{}", err.report());
    let own = store.load(&record.id).await.unwrap();
    assert!(own.is_some());
}

#[maybe_async::maybe_async]
async fn postgres_store_conforms() {
    conforms_at(common::SHARED_POSTGRES).await;
}

/// Through PgBouncer in transaction and statement mode, with no setting of the
/// store's changed: the statements travel unnamed once a request finds a server
/// connection without them, the statement timeout is set for each operation's own
/// transaction, and the table is created in one transaction.
#[maybe_async::maybe_async]
async fn postgres_store_conforms_through_pgbouncer() {
    let bouncer = PgBouncer::start();
    for mode in PoolMode::BOTH {
        eprintln!("through PgBouncer in {} mode", mode.name());
        conforms_at(&bouncer.url(mode)).await;
    }
}

#[maybe_async::maybe_async]
async fn conforms_at(url: &str) {
    let schema = PgSchema::new("conform");
    let store = schema.store_at(url);
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
    let left = psql(&format!("SELECT count(*) FROM {}", schema.table()));
    assert_eq!(left, "0", "the suite cleans up");
}

#[maybe_async::maybe_async]
async fn caching_postgres_store_conforms() {
    let schema = PgSchema::new("cached");
    let store = CachingSessionStore::new(MemoryStore::new(), schema.store());
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
    assert!(store.cache().is_empty(), "the suite cleans up the cache");
}

#[maybe_async::maybe_async]
async fn the_table_holds_digests_not_ids() {
    let schema = PgSchema::new("digests");
    let store = schema.store();
    let mut record = live_record(7);
    store.create(&mut record).await.unwrap();
    let rows = psql(&format!(
        "SELECT encode(key, 'hex'), encode(record, 'hex'), version, \
         (extract(epoch FROM expires_at) * 1000000)::bigint FROM {}",
        schema.table()
    ));
    let fields: Vec<&str> = rows.split('|').collect();
    assert_eq!(fields[0], key_hex(&record.id), "keyed by the id's SHA-256");
    assert!(
        !fields[1].contains(&hex(&record.id.to_bytes())),
        "the record holds no id"
    );
    assert_eq!(fields[2], "0");
    assert_eq!(
        i128::from(fields[3].parse::<i64>().unwrap()),
        record.expiry_date.unix_timestamp_nanos().div_euclid(1000),
        "the expiry column is the record's date"
    );
    // The column types an administrator would create the table with.
    let types = psql(&format!(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' \
         ORDER BY attnum) FROM pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0",
        schema.table()
    ));
    assert_eq!(
        types,
        "key bytea, expires_at timestamp with time zone, version bigint, record bytea, owner text"
    );
}

#[maybe_async::maybe_async]
async fn a_corrupt_row_fails_only_its_own_load() {
    let schema = PgSchema::new("corrupt");
    let store = schema.store();
    let table = schema.table();
    common::check_corruption_is_contained(&store, |id, bytes| {
        psql(&format!(
            "UPDATE {table} SET record = '\\x{}' WHERE key = '\\x{}'",
            hex(bytes),
            key_hex(id)
        ));
    })
    .await;
}

#[maybe_async::maybe_async]
async fn expired_rows_never_load_and_are_deleted_in_batches() {
    deletes_in_batches_at(common::SHARED_POSTGRES).await;
}

#[maybe_async::maybe_async]
async fn expired_rows_are_deleted_in_batches_through_pgbouncer() {
    let bouncer = PgBouncer::start();
    for mode in PoolMode::BOTH {
        eprintln!("through PgBouncer in {} mode", mode.name());
        deletes_in_batches_at(&bouncer.url(mode)).await;
    }
}

#[maybe_async::maybe_async]
async fn deletes_in_batches_at(url: &str) {
    let schema = PgSchema::new("expiry");
    let now = Arc::new(parking_lot::Mutex::new(OffsetDateTime::now_utc()));
    let clock = now.clone();
    let store = schema.store_at(url).with_clock(move || *clock.lock());
    // More than two batches of 5,000 expire; a few live on.
    let mut live = Vec::new();
    for i in 0..10_003u64 {
        let mut record = live_record(i);
        record.expiry_date = *now.lock() + Duration::minutes(if i % 2_000 == 0 { 90 } else { 30 });
        store.create(&mut record).await.unwrap();
        if i % 2_000 == 0 {
            live.push(record);
        }
    }
    *now.lock() += Duration::hours(1);
    let mut expired = live_record(1);
    expired.expiry_date = *now.lock() - Duration::seconds(1);
    store.save(&expired).await.unwrap();
    let loaded = store.load(&expired.id).await.unwrap();
    assert_eq!(
        loaded, None,
        "expired rows never load, even before deletion"
    );

    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 10_003 - live.len() + 1);
    for record in &live {
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(record));
    }
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 0);
    let left = psql(&format!("SELECT count(*) FROM {}", schema.table()));
    assert_eq!(left, live.len().to_string());
}

#[maybe_async::maybe_async]
async fn creating_the_table_is_idempotent() {
    let schema = PgSchema::new("idempotent");
    let first = schema.store();
    first.create_table().await.unwrap();
    let mut record = live_record(1);
    first.create(&mut record).await.unwrap();
    // Another store (another process) on the same table finds it and leaves it be.
    let second = schema.store();
    second.create_table().await.unwrap();
    let loaded = second.load(&record.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&record));
    // A table dropped under a running store (or a database restored without it) is
    // created again by the next operation, on a new connection, without an error.
    psql(&format!("DROP TABLE {}", schema.table()));
    let gone = first.load(&record.id).await.unwrap();
    assert_eq!(gone, None);
    let mut record = live_record(3);
    first.create(&mut record).await.unwrap();
    let loaded = second.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
}

/// A role of its own on the shared server, dropped when this is.
struct PgRole(String);

impl Drop for PgRole {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| psql(&format!("DROP ROLE IF EXISTS {}", self.0)));
    }
}

#[maybe_async::maybe_async]
async fn a_role_that_may_not_create_uses_a_table_made_for_it() {
    let role = PgRole(format!("ps_limited_{}", std::process::id()));
    // Declared after the role: dropped first, with the grants on it.
    let schema = PgSchema::new("limited");
    psql(&format!(
        "DROP ROLE IF EXISTS {0}; CREATE ROLE {0} LOGIN",
        role.0
    ));
    let url = format!("postgres://{}@127.0.0.1:5432/test", role.0);
    let store = PostgresStore::new(&url)
        .unwrap()
        .with_table(&schema.0, "sessions")
        .unwrap()
        .with_timeout(TIMEOUT);
    // It may not create the schema: a clear error, and nothing half-made.
    let err = store.create_table().await.unwrap_err();
    assert!(err.report().contains("42501"), "{}", err.report());
    let mut record = live_record(1);
    let created = store.create(&mut record).await;
    assert!(is_backend(&created), "{created:?}");

    // An administrator makes the table (the statements of the store's documentation)
    // and grants the role what it needs; the same store value then works.
    psql(&format!(
        "CREATE SCHEMA \"{schema}\";
         CREATE TABLE {table} (
             key bytea PRIMARY KEY,
             expires_at timestamptz NOT NULL,
             version bigint NOT NULL,
             record bytea NOT NULL,
             owner text
         );
         CREATE INDEX ON {table} (expires_at);
         CREATE INDEX ON {table} (owner) WHERE owner IS NOT NULL;
         GRANT USAGE ON SCHEMA \"{schema}\" TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role};",
        schema = schema.0,
        table = schema.table(),
        role = role.0
    ));
    store.create_table().await.unwrap();
    store.create(&mut record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&record));
    testing::check_update(&store).await;
    testing::check_owners(&store).await;
}

/// Makes the sessions table of `schema` as it was before owners existed, with
/// `filler` rows of records nobody loads (for the planner's row estimate).
fn table_from_before_owners(schema: &PgSchema, filler: u32) {
    psql(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE {table} (
             key bytea PRIMARY KEY,
             expires_at timestamptz NOT NULL,
             version bigint NOT NULL,
             record bytea NOT NULL
         );
         CREATE INDEX ON {table} (expires_at);
         INSERT INTO {table} SELECT sha256(i::text::bytea), now() + interval '1 hour', 0, '\\x04'
             FROM generate_series(1, {filler}) AS i;
         ANALYZE {table};",
        schema = schema.0,
        table = schema.table(),
    ));
}

/// A table made before owners existed gets its `owner` column and index from the
/// first connection, keeps its rows, and then files owned records.
#[maybe_async::maybe_async]
async fn a_table_from_before_owners_is_migrated() {
    let schema = PgSchema::new("migrate_owner");
    table_from_before_owners(&schema, 0);
    let old = live_record(5);
    psql(&format!(
        "INSERT INTO {} VALUES ('\\x{}', now() + interval '1 hour', 0, '\\x{}')",
        schema.table(),
        key_hex(&old.id),
        hex(&old.encode_without_id().unwrap()),
    ));
    let store = schema.store();
    let loaded = store.load(&old.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&old), "the row from before is kept");
    let index = psql(&format!(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = '{}' AND indexdef LIKE '%(owner)%'",
        schema.0
    ));
    assert_eq!(index, "1", "the owner index is made");
    testing::check_owners(&store).await;
}

/// A big table from before owners: the first connection adds the column (a quick
/// change), but leaves the index to be built without blocking writes (it logs the
/// statement); owners work meanwhile.
#[maybe_async::maybe_async]
async fn a_big_table_from_before_owners_gets_the_column_and_no_blocking_index() {
    let schema = PgSchema::new("migrate_big");
    let table = schema.table();
    table_from_before_owners(&schema, 120_000);
    let store = schema.store();
    testing::check_owners(&store).await;
    let indexes = psql(&format!(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = '{}' AND indexdef LIKE '%(owner)%'",
        schema.0
    ));
    assert_eq!(indexes, "0", "no index built while writes would wait");
    let column = psql(&format!(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attname = 'owner'"
    ));
    assert_eq!(column, "1");
}

/// An owner with more sessions than one statement ends (5,000): listed up to 1,024
/// (those expiring last), and ended in full, all but one, then all.
#[maybe_async::maybe_async]
async fn an_owner_with_thousands_of_sessions_is_ended_in_batches() {
    let schema = PgSchema::new("big_owner");
    let store = schema.store();
    let owner = Owner::new(format!("hana {}", Id::default())).unwrap();
    let mut kept = None;
    for n in 0..5000u64 {
        let mut record = live_record(n);
        record.ownership = Some(Ownership::new(owner.clone(), OffsetDateTime::now_utc()));
        store.create(&mut record).await.unwrap();
        kept = Some(Handle::of(&record.id));
    }
    let kept = kept.unwrap();
    let listed = store.list_owned(&owner).await.unwrap();
    assert_eq!(listed.len(), 1024, "a listing shows at most 1,024");
    let ended = store.end_owned(&owner, Ending::AllBut(kept)).await.unwrap();
    assert_eq!(ended.len(), 4999);
    let ended = store.end_owned(&owner, Ending::All).await.unwrap();
    assert_eq!(ended, vec![kept]);
    let left = psql(&format!("SELECT count(*) FROM {}", schema.table()));
    assert_eq!(left, "0");
}

/// An owner whose sessions hold more than a listing reads (40 of 900 KB): the
/// listing shows those that fit, the latest-expiring first, instead of failing.
#[maybe_async::maybe_async]
async fn a_listing_of_big_sessions_shows_what_fits() {
    let schema = PgSchema::new("big_values");
    let store = schema.store();
    let owner = Owner::new(format!("ines {}", Id::default())).unwrap();
    let mut latest = None;
    for n in 0..40i64 {
        let mut record = live_record(1);
        record.expiry_date += Duration::minutes(n);
        record.insert("blob", &vec![7u8; 900 * 1024]).unwrap();
        record.ownership = Some(Ownership::new(owner.clone(), OffsetDateTime::now_utc()));
        store.create(&mut record).await.unwrap();
        latest = Some(Handle::of(&record.id));
    }
    let listed = store.list_owned(&owner).await.unwrap();
    assert!(
        (20..40).contains(&listed.len()),
        "{} listed: as many as fit in 32 MiB",
        listed.len()
    );
    assert_eq!(
        listed[0].handle(),
        latest.unwrap(),
        "the latest-expiring first"
    );
    let ended = store.end_owned(&owner, Ending::All).await.unwrap();
    assert_eq!(ended.len(), 40);
}

#[maybe_async::maybe_async]
async fn bad_urls_and_logins_are_backend_errors() {
    for url in [
        "http://127.0.0.1/x",
        "postgres://u@h/d?sslmode=verify-full&sslrootcert=/no/such/ca.pem",
    ] {
        let store = PostgresStore::new(url);
        assert!(is_backend(&store), "{url}: {store:?}");
    }
    let store = PostgresStore::new("postgres://postgres@127.0.0.1:5432/no_such_database")
        .unwrap()
        .with_timeout(TIMEOUT);
    let loaded = store.load(&Id::default()).await;
    let err = loaded.unwrap_err();
    assert!(err.report().contains("3D000"), "{}", err.report());
    // Nothing listens on port 1.
    let store = PostgresStore::new("postgres://postgres@127.0.0.1:1/test")
        .unwrap()
        .with_timeout(TIMEOUT);
    let started = Instant::now();
    let loaded = store.load(&Id::default()).await;
    assert!(is_backend(&loaded), "{loaded:?}");
    assert!(started.elapsed() < FAIL_WITHIN);
}

#[maybe_async::maybe_async]
async fn a_terminated_connection_costs_no_error() {
    let schema = PgSchema::new("terminated");
    let url = format!("{}?application_name={}", common::SHARED_POSTGRES, schema.0);
    let store = PostgresStore::new(&url)
        .unwrap()
        .with_table(&schema.0, "sessions")
        .unwrap();
    let mut record = live_record(1);
    store.create(&mut record).await.unwrap();
    for _ in 0..2 {
        let ended = psql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = '{}'",
            schema.0
        ));
        assert_eq!(ended, "1", "the store's one idle connection");
        // The idle connection is dead; the operation runs again on a new one.
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(&record));
    }
}

/// Starts another client that locks every row of the schema's table for `seconds`,
/// and returns once it holds them.
fn hold_every_row(schema: &PgSchema, seconds: u32) -> Child {
    let holder = common::psql_command()
        .args(["-q", "-c"])
        .arg(format!(
            "BEGIN; SELECT 1 FROM {} FOR UPDATE; SELECT pg_sleep({seconds}); COMMIT;",
            schema.table()
        ))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let holding = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         WHERE c.relname = 'sessions' AND l.mode = 'RowShareLock' \
         AND c.relnamespace = '\"{}\"'::regnamespace",
        schema.0
    );
    wait_for("the other client's lock", || psql(&holding) != "0");
    holder
}

#[maybe_async::maybe_async]
async fn a_statement_stuck_behind_a_lock_is_cancelled() {
    let schema = PgSchema::new("stuck");
    let store = schema.store().with_timeout(TIMEOUT);
    let mut record = live_record(1);
    store.create(&mut record).await.unwrap();
    // Another client holds the row for two seconds.
    let mut holder = hold_every_row(&schema, 2);
    let started = Instant::now();
    let saved = store.save(&record).await;
    let took = started.elapsed();
    assert!(is_backend(&saved), "{saved:?}");
    assert!(took < FAIL_WITHIN, "took {took:?}");
    holder.wait().unwrap();
    // The statement was cancelled on the server too: nothing is stuck, and the store
    // goes on.
    store.save(&record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
}

/// The server cancels a statement that runs past the store's timeout, without a
/// session setting: the timeout is set for the operation's own implicit transaction,
/// seen by its statement, and left on no connection.
#[maybe_async::maybe_async]
async fn a_statement_past_the_timeout_is_cancelled_by_the_server() {
    cancelled_at(common::SHARED_POSTGRES, None).await;
}

/// The same through PgBouncer, where a session setting would stay on a server
/// connection that other clients get next, and a later transaction of the store may
/// run on another one.
#[maybe_async::maybe_async]
async fn a_statement_past_the_timeout_is_cancelled_by_the_server_through_pgbouncer() {
    let bouncer = PgBouncer::start();
    for mode in PoolMode::BOTH {
        eprintln!("through PgBouncer in {} mode", mode.name());
        cancelled_at(&bouncer.url(mode), Some((&bouncer, mode))).await;
    }
}

/// The version that makes a write of the test table sleep.
const SLOW_VERSION: u64 = 4242;

#[maybe_async::maybe_async]
async fn cancelled_at(url: &str, bouncer: Option<(&PgBouncer, PoolMode)>) {
    let schema = PgSchema::new("timeout");
    let store = schema.store_at(url).with_timeout(TIMEOUT);
    store.create_table().await.unwrap();
    // A trigger sleeps in a write of version SLOW_VERSION. It notes the statement
    // timeout it runs under, and counts its cancellations by the statement timeout
    // (SQLSTATE 57014, query_canceled, with the timeout's message rather than a
    // cancel request's), in sequences, which no rollback undoes.
    psql(&format!(
        "CREATE SEQUENCE \"{s}\".seen_ms MINVALUE 0;
         CREATE SEQUENCE \"{s}\".cancelled;
         CREATE FUNCTION \"{s}\".slow() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE message text;
         BEGIN
             PERFORM setval('\"{s}\".seen_ms', (extract(epoch FROM
                 current_setting('statement_timeout')::interval) * 1000)::bigint, true);
             PERFORM pg_sleep(30);
             RETURN NEW;
         EXCEPTION WHEN query_canceled THEN
             GET STACKED DIAGNOSTICS message = MESSAGE_TEXT;
             IF message LIKE '%statement timeout%' THEN
                 PERFORM nextval('\"{s}\".cancelled');
             END IF;
             RAISE;
         END $$;
         CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW
             WHEN (NEW.version = {SLOW_VERSION}) EXECUTE FUNCTION \"{s}\".slow();",
        s = schema.0,
        table = schema.table(),
    ));
    let mut record = live_record(1);
    store.create(&mut record).await.unwrap();
    let mut slow = record.clone();
    slow.version = SLOW_VERSION;
    let started = Instant::now();
    let saved = store.save(&slow).await;
    let took = started.elapsed();
    // The client gives up at the same time, so either error may come first.
    assert!(is_backend(&saved), "{saved:?}");
    assert!(took < FAIL_WITHIN, "took {took:?}");
    let cancelled = format!(
        "SELECT last_value * is_called::int FROM \"{}\".cancelled",
        schema.0
    );
    wait_for("the server to cancel the statement", || {
        psql(&cancelled) == "1"
    });
    let seen = psql(&format!("SELECT last_value FROM \"{}\".seen_ms", schema.0));
    assert_eq!(seen, TIMEOUT.as_millis().to_string(), "the store's timeout");
    // The store goes on (on a new connection: the one that timed out was closed).
    store.save(&record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
    if let Some((bouncer, mode)) = bouncer {
        // The server connections of the pool (the most recently used first) have the
        // server's own setting.
        let default = psql("SHOW statement_timeout");
        for _ in 0..POOL_SIZE * 2 {
            let shown = bouncer.psql(mode, "SHOW statement_timeout");
            assert_eq!(shown, default, "no setting left behind");
        }
    }
}

/// A PostgreSQL server of the test's own: a new cluster in a temporary directory,
/// listening only on a Unix socket there (no other test can take its address, before
/// it starts or while it is down for a restart), wanting a SCRAM password.
struct PgServer {
    dir: common::TempDir,
    child: Option<Child>,
}

const PASSWORD: &str = "sesame";

/// A PostgreSQL program run as the `postgres` user when we are root (PostgreSQL
/// refuses to run as root), as ourselves otherwise.
fn as_server_user(program: &str) -> Command {
    common::as_postgres_user(common::pg_bin(program))
}

impl PgServer {
    fn start() -> Self {
        let dir = common::TempDir::new("pg-server");
        common::give_to_postgres_user(&dir);
        std::fs::write(dir.0.join("pw"), PASSWORD).unwrap();
        let pwfile = format!("--pwfile={}", dir.0.join("pw").display());
        common::initdb(
            &dir.0.join("data"),
            &["--auth=scram-sha-256".as_ref(), pwfile.as_ref()],
        );
        let mut server = Self { dir, child: None };
        server.run();
        server
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join(".s.PGSQL.5432")
    }

    /// Starts the server on the existing cluster and waits until it answers.
    fn run(&mut self) {
        let child = as_server_user("postgres")
            .arg("-D")
            .arg(self.dir.0.join("data"))
            .arg("-k")
            .arg(&self.dir.0)
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=60",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres runs");
        self.child = Some(child);
        let deadline = Instant::now() + StdDuration::from_secs(20);
        loop {
            let ready = Command::new(common::pg_bin("pg_isready"))
                .arg("-h")
                .arg(&self.dir.0)
                .arg("-q")
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start within 20 s"
            );
            std::thread::sleep(StdDuration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@/postgres?host={}",
            self.dir.0.display()
        )
    }

    fn pid(&self) -> Pid {
        Pid::from_child(self.child.as_ref().expect("running"))
    }

    /// Stops the server with `signal` (SIGINT: fast shutdown, which tells clients;
    /// SIGQUIT: immediate shutdown, as in a crash) and waits until it is gone.
    fn stop(&mut self, signal: Signal) {
        let mut child = self.child.take().expect("running");
        kill_process(Pid::from_child(&child), signal).unwrap();
        child.wait().unwrap();
        // Its socket goes with it.
        assert!(!self.socket().exists() || signal == Signal::QUIT);
    }

    /// The server's processes: the postmaster and its children.
    fn processes(&self) -> Vec<Pid> {
        let output = Command::new("pgrep")
            .arg("-P")
            .arg(self.pid().as_raw_nonzero().to_string())
            .output()
            .unwrap();
        let mut pids: Vec<Pid> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .filter_map(Pid::from_raw)
            .collect();
        pids.push(self.pid());
        pids
    }

    /// Freezes every process of the server (SIGSTOP): connections are accepted by the
    /// kernel, but nothing answers.
    fn freeze(&self) {
        for pid in self.processes() {
            let _ = kill_process(pid, Signal::STOP);
        }
    }

    fn thaw(&self) {
        for pid in self.processes() {
            let _ = kill_process(pid, Signal::CONT);
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw();
            let mut child = self.child.take().unwrap();
            let _ = kill_process(Pid::from_child(&child), Signal::QUIT);
            let _ = child.wait();
        }
    }
}

#[maybe_async::maybe_async]
async fn a_crashed_server_gives_backend_errors_then_the_store_recovers() {
    let mut server = PgServer::start();
    let store = PostgresStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    let mut before = live_record(1);
    store.create(&mut before).await.unwrap();

    server.stop(Signal::QUIT);
    for (op, result) in every_operation(&store).await {
        assert!(is_backend(&result), "{op} with the server down: {result:?}");
    }
    for _ in 0..3 {
        let started = Instant::now();
        let loaded = store.load(&before.id).await;
        assert!(is_backend(&loaded), "{loaded:?}");
        assert!(
            started.elapsed() < FAIL_WITHIN,
            "took {:?}",
            started.elapsed()
        );
    }

    // Back, after crash recovery: the acknowledged session is there, and the same
    // store value works again from its first operation on.
    server.run();
    let kept = store.load(&before.id).await.unwrap();
    assert_eq!(kept, Some(before));
    let mut after = live_record(2);
    store.create(&mut after).await.unwrap();
    let loaded = store.load(&after.id).await.unwrap();
    assert_eq!(loaded, Some(after));
}

#[maybe_async::maybe_async]
async fn a_restart_between_operations_costs_no_error() {
    let mut server = PgServer::start();
    let store = PostgresStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    let mut record = live_record(1);
    store.create(&mut record).await.unwrap();
    for signal in [Signal::INT, Signal::QUIT] {
        // The store's idle connection dies with the server; the next operation finds
        // it closed and runs again on a new one.
        server.stop(signal);
        server.run();
        record.insert("signal", &format!("{signal:?}")).unwrap();
        store.save(&record).await.unwrap();
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded.as_ref(), Some(&record));
    }
}

#[maybe_async::maybe_async]
async fn a_frozen_server_times_out_then_the_store_recovers() {
    let server = PgServer::start();
    let store = PostgresStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    common::check_frozen_server_times_out_then_recovers(
        &store,
        || server.freeze(),
        || server.thaw(),
    )
    .await;
}

#[maybe_async::maybe_async]
async fn a_wrong_password_is_a_backend_error() {
    let server = PgServer::start();
    let url = server.url().replace(PASSWORD, "wrong");
    let store = PostgresStore::new(&url).unwrap().with_timeout(TIMEOUT);
    let err = store.load(&Id::default()).await.unwrap_err();
    assert!(err.report().contains("28P01"), "{}", err.report());
    let url = server.url().replace(&format!(":{PASSWORD}"), "");
    let store = PostgresStore::new(&url).unwrap().with_timeout(TIMEOUT);
    let err = store.load(&Id::default()).await.unwrap_err();
    assert!(err.report().contains("password"), "{}", err.report());
}

tests_in_both_modes!(
    a_listing_of_big_sessions_shows_what_fits,
    a_big_table_from_before_owners_gets_the_column_and_no_blocking_index,
    an_owner_with_thousands_of_sessions_is_ended_in_batches,
    a_table_from_before_owners_is_migrated,
    a_row_under_another_key_is_refused,
    postgres_store_conforms,
    caching_postgres_store_conforms,
    the_table_holds_digests_not_ids,
    a_corrupt_row_fails_only_its_own_load,
    expired_rows_never_load_and_are_deleted_in_batches,
    creating_the_table_is_idempotent,
    a_role_that_may_not_create_uses_a_table_made_for_it,
    bad_urls_and_logins_are_backend_errors,
    a_terminated_connection_costs_no_error,
    a_statement_stuck_behind_a_lock_is_cancelled,
    a_statement_past_the_timeout_is_cancelled_by_the_server,
    a_statement_past_the_timeout_is_cancelled_by_the_server_through_pgbouncer,
    postgres_store_conforms_through_pgbouncer,
    expired_rows_are_deleted_in_batches_through_pgbouncer,
    a_crashed_server_gives_backend_errors_then_the_store_recovers,
    a_restart_between_operations_costs_no_error,
    a_frozen_server_times_out_then_the_store_recovers,
    a_wrong_password_is_a_backend_error,
);

/// `update` reads the time once it has a connection, as `load` does: a record that
/// expired while the write waited for a pooled connection is gone, never written.
#[test]
fn a_record_that_expires_while_its_write_waits_for_a_connection_is_gone() {
    let schema = PgSchema::new("waits");
    let now = OffsetDateTime::now_utc();
    let clock = Arc::new(std::sync::atomic::AtomicI64::new(now.unix_timestamp()));
    let read = clock.clone();
    let store = schema
        .store()
        .with_max_connections(1)
        .with_timeout(StdDuration::from_secs(10))
        .with_clock(move || {
            OffsetDateTime::from_unix_timestamp(read.load(Ordering::SeqCst)).unwrap()
        });
    let mut busy = live_record(1);
    block(store.create(&mut busy)).unwrap();
    let mut target = live_record(2);
    target.expiry_date = now + Duration::seconds(30);
    block(store.create(&mut target)).unwrap();
    // Another client holds every row for a second: a save takes the only connection
    // and waits behind it.
    let mut holder = hold_every_row(&schema, 1);
    let blocked = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%{}%'",
        schema.0
    );
    std::thread::scope(|scope| {
        let saving = scope.spawn(|| block(store.save(&busy)));
        // The save holds the connection once it waits on the lock.
        wait_for("the save to wait on the lock", || psql(&blocked) != "0");
        let writing = scope.spawn(|| {
            let mut next = target.clone();
            next.expiry_date = now + Duration::hours(1);
            block(store.update(&next))
        });
        // The write waits for the connection; meanwhile its record expires.
        std::thread::sleep(StdDuration::from_millis(200));
        clock.fetch_add(60, Ordering::SeqCst);
        saving.join().unwrap().unwrap();
        let written = writing.join().unwrap().unwrap();
        assert_eq!(written, Update::Gone, "judged when it was written");
    });
    holder.wait().unwrap();
    let loaded = block(store.load(&target.id)).unwrap();
    assert_eq!(loaded, None);
}

#[test]
fn processes_starting_together_create_the_table_once() {
    create_together_at(common::SHARED_POSTGRES);
}

/// Through PgBouncer, whose two server connections per pool the eight stores share:
/// the lock is held by one transaction, never across two.
#[test]
fn processes_starting_together_create_the_table_once_through_pgbouncer() {
    let bouncer = PgBouncer::start();
    for mode in PoolMode::BOTH {
        eprintln!("through PgBouncer in {} mode", mode.name());
        create_together_at(&bouncer.url(mode));
    }
}

fn create_together_at(url: &str) {
    let schema = PgSchema::new("together");
    let stores: Vec<_> = (0..8).map(|_| schema.store_at(url)).collect();
    let barrier = Arc::new(std::sync::Barrier::new(stores.len()));
    let threads: Vec<_> = stores
        .into_iter()
        .map(|store| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut record = live_record(1);
                block(store.create(&mut record)).map(|()| record)
            })
        })
        .collect();
    for thread in threads {
        let record = thread
            .join()
            .unwrap()
            .expect("every first operation succeeds");
        let loaded = block(schema.store().load(&record.id)).unwrap();
        assert_eq!(loaded, Some(record));
    }
}

#[test]
fn many_callers_on_a_frozen_server_each_fail_within_the_timeout() {
    let server = PgServer::start();
    // Fewer connections than callers: waiting for one is bounded too.
    let store = PostgresStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT)
        .with_max_connections(4);
    let mut record = live_record(1);
    block(store.create(&mut record)).unwrap();
    server.freeze();
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let id = record.id;
            std::thread::spawn(move || {
                let started = Instant::now();
                let loaded = block(store.load(&id));
                (loaded, started.elapsed())
            })
        })
        .collect();
    for caller in callers {
        let (loaded, took) = caller.join().unwrap();
        assert!(is_backend(&loaded), "{loaded:?}");
        // A caller may wait for a connection, then for its reply.
        assert!(took < FAIL_WITHIN + TIMEOUT, "a caller took {took:?}");
    }
    server.thaw();
    let loaded = block(store.load(&record.id)).unwrap();
    assert_eq!(loaded, Some(record));
}

#[cfg(not(feature = "sync"))]
#[test]
fn a_dropped_operation_leaks_nothing() {
    let server = PgServer::start();
    let store = PostgresStore::new(&server.url())
        .unwrap()
        .with_max_connections(1);
    common::check_dropped_operations_leak_nothing(&store, || server.freeze(), || server.thaw());
}

/// Inside a tokio application (either runtime flavour) the store needs nothing from
/// tokio: async-io's reactor serves its sockets.
#[cfg(not(feature = "sync"))]
#[test]
fn runs_inside_tokio_runtimes() {
    let schema = PgSchema::new("tokio");
    let store = schema.store();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let current = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for runtime in [multi, current] {
        let store = store.clone();
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..8u64)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut record = live_record(i);
                        store.create(&mut record).await.unwrap();
                        let loaded = store.load(&record.id).await.unwrap();
                        assert_eq!(loaded, Some(record));
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
    }
}

#[test]
fn a_deletion_loop_runs_through_an_outage() {
    let mut server = PgServer::start();
    let passes = Arc::new(AtomicUsize::new(0));
    let store = PostgresStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    let mut expired = live_record(1);
    expired.expiry_date = OffsetDateTime::now_utc() - Duration::seconds(1);
    block(store.create(&mut expired)).unwrap();

    let timer = LoopTimer::new();
    let stop = timer.stop_handle();
    let schedule = portable_sessions::DeletionSchedule::new(StdDuration::from_millis(20))
        .with_backoff(StdDuration::from_millis(20), StdDuration::from_millis(100));
    let task = {
        let store = CountingPasses(store.clone(), passes.clone());
        std::thread::spawn(move || block(store.continuously_delete_expired(schedule, &timer)))
    };
    wait_for("a first pass", || passes.load(Ordering::SeqCst) > 0);

    server.stop(Signal::QUIT);
    std::thread::sleep(StdDuration::from_millis(500));
    let passed_in_outage = passes.load(Ordering::SeqCst);
    server.run();
    wait_for("a pass after the restart", || {
        passes.load(Ordering::SeqCst) > passed_in_outage
    });
    let mut record = live_record(2);
    block(store.create(&mut record)).unwrap();

    stop.stop();
    let summary = task.join().expect("the loop does not panic");
    assert!(summary.failures >= 2, "{summary:?}");
    assert_eq!(summary.deleted, 1, "{summary:?}");
    let loaded = block(store.load(&record.id)).unwrap();
    assert_eq!(loaded, Some(record));
}

/// A `PostgresStore` that counts its successful deletion passes.
#[derive(Debug, Clone)]
struct CountingPasses(PostgresStore, Arc<AtomicUsize>);

#[maybe_async::maybe_async]
impl SessionStore for CountingPasses {
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
    async fn update(&self, record: &Record) -> Result<portable_sessions::session_store::Update> {
        self.0.update(record).await
    }
    fn atomic_update(&self) -> bool {
        true
    }
}

#[maybe_async::maybe_async]
impl ExpiredDeletion for CountingPasses {
    async fn delete_expired(&self) -> Result<usize> {
        let deleted = self.0.delete_expired().await?;
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(deleted)
    }
}

#[test]
fn timeouts_are_kept_between_a_millisecond_and_a_day() {
    let day = StdDuration::from_secs(24 * 3600);
    let store = PostgresStore::new(common::SHARED_POSTGRES)
        .unwrap()
        .with_timeout(StdDuration::MAX);
    assert_eq!(store.timeout(), day);
    // Every wait is bounded by a day: nothing overflows, and operations work.
    let loaded = block(store.load(&Id::default())).unwrap();
    assert_eq!(loaded, None);
    let store = store.with_timeout(StdDuration::ZERO);
    assert_eq!(store.timeout(), StdDuration::from_millis(1));
}

#[test]
fn debug_output_hides_the_password() {
    let store = PostgresStore::new("postgres://app:hunter2@db.example:6543/app").unwrap();
    let debug = format!("{store:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("db.example"), "{debug}");
}

#[test]
fn the_store_is_send_sync_clone_and_fits_in_a_dyn_store() {
    fn shareable<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    shareable::<PostgresStore>();
    fn as_dyn(store: PostgresStore) -> std::sync::Arc<dyn ExpiredDeletion> {
        std::sync::Arc::new(store)
    }
    let _ = as_dyn;
}
