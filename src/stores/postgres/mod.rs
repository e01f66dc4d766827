//! [`PostgresStore`]: sessions in a PostgreSQL table.

mod config;
mod pool;
mod wire;

use std::{fmt, sync::Arc, time::Duration};

use time::OffsetDateTime;

use self::{
    config::{Config, SslMode},
    pool::{Pool, Setup},
    wire::{columns, oid, Param, Statement, WireError},
};
use crate::{
    lifecycle::clock::Clock,
    session::{random_id, Ending, Handle, Id, OwnedSession, Owner, Record},
    session_store::{Error, ExpiredDeletion, Result, SessionStore, Update},
    stores::{net, stored, tls::Connector},
};

/// How many expired rows one `DELETE` statement removes. Each batch is its own
/// transaction of a few milliseconds, so a pass over millions of expired rows never
/// becomes one long transaction (which the statement timeout would cancel, and which
/// would hold its row locks and WAL to the end); larger batches cost less per row.
const DELETE_BATCH: i32 = 5000;

/// Serializes concurrent schema creation (two processes starting at once) through
/// `pg_advisory_xact_lock`: "portsess" in ASCII.
const SCHEMA_LOCK: i64 = 0x706f_7274_7365_7373;

/// What the expiry index's name adds to the table's.
const INDEX_SUFFIX: &str = "_expires_at";

/// What the owner index's name adds to the table's.
const OWNER_INDEX_SUFFIX: &str = "_owner";

/// The most rows (as the planner estimates them) of a table made before owners
/// existed for which the first connection builds the owner index itself.
const SMALL_TABLE: u32 = 100_000;
/// The same for a table the planner has no estimate for (never analyzed), by size.
const SMALL_TABLE_BYTES: u64 = 64 << 20;

/// The most sessions an owner's listing shows (those expiring last), and the most
/// bytes of rows it reads: a server cannot make a listing buffer more.
const MAX_LISTED: usize = 1024;
const MAX_LISTED_BYTES: usize = 32 << 20;
/// What a listing leaves of its byte budget for the rows' framing and one record
/// beyond the budget (the first, always listed).
const LISTED_SLACK: usize = 2 << 20;

/// How many sessions one statement of "all" or "all but one" deletes (each returns
/// its 32-byte key); the statement runs again until fewer come back.
const END_BATCH: usize = 4096;
/// The most such statements one ending runs: a bound on an ending that other
/// logins keep feeding.
const MAX_END_BATCHES: usize = 4096;

/// How many sessions a page of a limit's ranking reads, and the most it ranks:
/// beyond, the next login's limit step goes on.
const RANK_PAGE: usize = 256;
const MAX_RANKED: usize = 1 << 16;

/// How many ids `create` draws before it gives up: a collision of random 128-bit ids
/// never happens twice in a row, so more means the insert is being dropped (a rule or
/// trigger), which no number of tries fixes.
const MAX_CREATE_ATTEMPTS: usize = 8;

/// A session store in a PostgreSQL table: sessions shared by every server process
/// that reaches the database, and kept across restarts.
///
/// - **Schema.** One table, `public.portable_sessions` unless
///   [`with_table`](PostgresStore::with_table) names another (schema-qualified):
///
///   ```sql
///   CREATE TABLE portable_sessions (
///       key bytea PRIMARY KEY,            -- SHA-256 of the session id
///       expires_at timestamptz NOT NULL,  -- indexed
///       version bigint NOT NULL,          -- for conditional writes
///       record bytea NOT NULL,            -- the encoded record, without its id
///       owner text                        -- the session's owner, indexed
///   );
///   CREATE INDEX portable_sessions_expires_at ON portable_sessions (expires_at);
///   CREATE INDEX portable_sessions_owner ON portable_sessions (owner)
///       WHERE owner IS NOT NULL;
///   ```
///
///   A table made before owners existed gets its `owner` column and index added
///   (`ALTER TABLE .. ADD COLUMN IF NOT EXISTS`, under the same advisory lock) by
///   the first connection, which needs the table's owner's privileges; or run the
///   two statements yourself.
///
///   The first connection creates the schema, table and index if the table is
///   missing (idempotently, serialized by an advisory lock so that processes
///   starting together do not collide), or [`create_table`](PostgresStore::create_table)
///   does so at startup. Where the table exists, nothing is created, so an
///   application whose role may not create tables runs on a table an administrator
///   made with the statement above.
/// - **Stolen dumps give no sessions.** Records are keyed by the SHA-256 digest of
///   their id and stored with the id zeroed, so the table, its WAL and its backups
///   hold no id that could be replayed as a cookie.
/// - **One statement per operation**, sent with its parameters (and the statement
///   timeout's own, see below) in one round trip, prepared once per connection.
///   [`update`](SessionStore::update) compares the
///   version and the expiry date and writes in that one statement (row locks make
///   concurrent updates of one session take turns, and each sees the other's
///   version), and tells a conflict from a missing session in the same reply.
/// - **A user's sessions.** A record's owner is written to the indexed `owner`
///   column by the same statement that writes the record. Listing is one indexed
///   query (at most 1,024 sessions an owner); ending one session, all but one, or
///   all is one `DELETE` statement, and ending the oldest beyond a limit is a
///   listing followed by one `DELETE` of each, conditional on the owner.
/// - **Expiry.** [`load`](SessionStore::load) never returns an expired row, even
///   before [`delete_expired`](ExpiredDeletion::delete_expired) removes it; that pass
///   walks the expiry index in batches of 5,000 rows, each its own statement and
///   transaction of a few milliseconds (only expired rows are locked, so no live
///   session's writer ever waits for it), and returns how many it deleted. A session
///   saved with a new expiry date while its batch runs is kept.
/// - **Connections.** Clones of a store share a pool of at most 16 connections
///   (set with [`with_max_connections`](PostgresStore::with_max_connections)),
///   opened on demand and kept open. An operation waits at most the
///   [timeout](PostgresStore::with_timeout) (2 s unless set) for a free connection,
///   to connect, and for each reply; the server is told the same limit as the
///   `statement_timeout` of each operation's transaction, so a statement stuck
///   behind a lock is cancelled there too.
/// - **Outages.** Operations fail with [`Error::Backend`] within the timeout while
///   the server is unreachable. A connection that failed, timed out, or whose
///   operation's future was dropped halfway is closed, never reused, and the next
///   operation connects again: a store keeps working once the server is back,
///   without being rebuilt. An operation that finds its idle connection closed by a
///   server restart or by `pg_terminate_backend` runs once more on a new connection.
/// - **Corrupt rows** make [`load`](SessionStore::load) of that id fail with
///   [`Error::Decode`]; other sessions are unaffected.
///
/// # Modes and runtimes
///
/// The store speaks PostgreSQL's protocol itself, on the caller's thread or task: no
/// driver task and no runtime. In sync mode it uses plain blocking sockets. In async
/// mode it uses async-io's reactor, which runs on its own, so the store works under
/// smol, under tokio and on any other executor.
///
/// # Connecting
///
/// The URL is `postgres://[user[:password]@][host][:port][/dbname][?param=value&...]`
/// (or `postgresql://`), percent-encoded. Parameters: `host` (a directory, such as
/// `/var/run/postgresql`, for the server's Unix socket), `port`, `user`, `password`,
/// `dbname`, `application_name`, `connect_timeout`, `require_auth`, and the TLS
/// parameters below. Passwords are sent as the server asks: SCRAM-SHA-256, MD5 or
/// clear text, except that a clear-text or MD5 password is never sent over an
/// unencrypted connection to another machine unless `require_auth` names it
/// (libpq's option: a list of the methods allowed, `password,md5,scram-sha-256,none`,
/// or of those refused, `!md5`). Over TLS it goes only to a server whose certificate
/// was verified (`verify-ca`, `verify-full`, or `require` with `sslrootcert`): the
/// others encrypt to whoever answers. `connect_timeout` bounds the TCP connection;
/// the TLS handshake, as each reply, gets the store's timeout.
/// SCRAM completes only once the server has proved it knows the password.
///
/// A hostile or broken server cannot make a connection buffer more than about the
/// largest record (1 MiB and 64 KiB per message, 2 rows per reply): a longer
/// message is refused from its length alone. A SCRAM exchange asking for more than
/// 1,000,000 iterations is refused.
///
/// # TLS
///
/// TCP connections use TLS through rustls (no OpenSSL) as libpq's `sslmode` says:
///
/// - `prefer` (the default): TLS if the server offers it, without verifying the
///   server, and without TLS if the handshake fails; `allow`: without TLS unless the
///   server refuses that; `disable`: never;
/// - `require`: TLS or no connection, without verifying the server unless
///   `sslrootcert` names a file (then as `verify-ca`);
/// - `verify-ca`: the server's certificate is signed by an authority in
///   `sslrootcert=PATH`; `verify-full`: and names the host connected to.
///
/// `verify-full` trusts the authorities in `sslrootcert=PATH`, or the system's (where
/// libpq would read `~/.postgresql/root.crt`; `sslrootcert=system` says so). `sslcert=PATH` and `sslkey=PATH` give a client
/// certificate (mutual TLS); `sslsni=0` stops the host name going out as SNI
/// (services such as Neon route by it, so it is sent by default). Over a Unix
/// socket, as in libpq, TLS is never used. Each connection shakes hands once and is
/// then pooled; files are read when the store is made. For anything else, give a
/// whole configuration to [`with_tls_config`](PostgresStore::with_tls_config).
///
/// # Connection poolers
///
/// The store works unchanged through a connection pooler such as PgBouncer, in any
/// pool mode (session, transaction or statement) and any version. Each connection
/// prepares the store's statements once, under names made from their SQL and types,
/// and each operation binds one in a single round trip; the statement timeout is set
/// with `set_config(..., true)` for that operation's implicit transaction alone,
/// never for the session (a session setting would stay on a server connection that
/// other clients get next). When a request reaches a server connection that lacks
/// a statement, or a preparation finds one there already (what a pooler in
/// transaction or statement mode does), nothing of it ran: the store sends every
/// statement whole from then on (parse, bind and execute, in one write), and runs
/// the request again. Named statements are thus used only while the server keeps
/// them, and never relied on. Sent whole, each statement is parsed and planned
/// anew: on `benches/stores.rs` (`--features postgres`) a load took 95 µs whole
/// against 62 µs prepared with a session timeout (before the timeout moved into each
/// operation). The table is created in a single transaction, under a
/// transaction-scoped advisory lock.
///
/// Two notes. The server applies the timeout to the statement after `set_config`
/// from PostgreSQL 12 on (13 for the table's creation, a query string); with older
/// servers only the client's timeout holds. Amazon RDS Proxy takes prepared
/// statements without error but pins each client connection that prepares to one
/// server connection, so it then multiplexes nothing.
///
/// # Examples
///
/// This needs a PostgreSQL server on `127.0.0.1:5432` that lets user `postgres` in:
///
/// ```
/// use portable_sessions::{session::Record, PostgresStore, SessionStore};
/// use time::{Duration, OffsetDateTime};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let store = PostgresStore::new("postgres://postgres@127.0.0.1:5432/test")?
///     .with_table("doc_example", "sessions")?;
/// store.create_table().await?;
///
/// let mut record = Record::new(OffsetDateTime::now_utc() + Duration::minutes(30));
/// record.insert("user_id", &42u64)?;
/// store.create(&mut record).await?;
///
/// let loaded = store.load(&record.id).await?.expect("stored");
/// assert_eq!(loaded.get::<u64>("user_id")?, Some(42));
/// store.delete(&record.id).await?;
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: Arc<Pool>,
    statements: Arc<Statements>,
    settings: Settings,
    clock: Clock,
}

/// What the pool is built from.
#[derive(Clone, Debug)]
struct Settings {
    config: Config,
    schema: String,
    table: String,
    timeout: Duration,
    max_connections: usize,
}

impl PostgresStore {
    /// The schema used unless [`with_table`](PostgresStore::with_table) names another.
    pub const DEFAULT_SCHEMA: &'static str = "public";
    /// The table used unless [`with_table`](PostgresStore::with_table) names another.
    pub const DEFAULT_TABLE: &'static str = "portable_sessions";
    /// The timeout used unless [`with_timeout`](PostgresStore::with_timeout) sets
    /// another.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// The pool size used unless
    /// [`with_max_connections`](PostgresStore::with_max_connections) sets another.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

    /// Makes a store for the database at `url`, such as
    /// `postgres://app:secret@127.0.0.1:5432/app`.
    ///
    /// Nothing is connected yet: the first operation connects (and creates the table
    /// if it is missing), so a program can start while the database is still coming
    /// up. Call [`create_table`](PostgresStore::create_table) at startup to fail
    /// early instead.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if `url` is not a PostgreSQL URL this store can
    /// follow (see [Connecting](PostgresStore#connecting)).
    pub fn new(url: &str) -> Result<Self> {
        let mut config = Config::parse(url)?;
        if config.sslmode != SslMode::Disable && matches!(config.address, net::Address::Tcp(..)) {
            config.connector = Some(config.tls.connector(&config.address)?);
        }
        let settings = Settings {
            config,
            schema: Self::DEFAULT_SCHEMA.into(),
            table: Self::DEFAULT_TABLE.into(),
            timeout: Self::DEFAULT_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        };
        let (pool, statements) = build_pool(&settings);
        Ok(Self {
            pool: Arc::new(pool),
            statements: Arc::new(statements),
            settings,
            clock: Clock::default(),
        })
    }

    /// Returns the store keeping its sessions in table `table` of schema `schema`
    /// (created if missing), so that several applications (or tests) can share one
    /// database.
    ///
    /// Names are used as given, quoted: `Sessions` and `sessions` are two tables.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if a name is empty, holds a NUL character, or is
    /// longer than PostgreSQL's 63 bytes (52 for the table, whose index is named
    /// after it with `_expires_at`).
    pub fn with_table(mut self, schema: &str, table: &str) -> Result<Self> {
        for (name, max) in [(schema, 63), (table, 63 - INDEX_SUFFIX.len())] {
            if name.is_empty() || name.len() > max || name.contains('\0') {
                return Err(Error::backend(format!(
                    "{name:?} cannot name this PostgreSQL schema or table: names are 1 to \
                     {max} bytes without NUL"
                )));
            }
        }
        self.settings.schema = schema.into();
        self.settings.table = table.into();
        Ok(self.rebuilt())
    }

    /// Returns the store setting up TLS with `config` whenever `sslmode` has it
    /// used (by default, `prefer`: whenever the server offers it): for what the URL's
    /// parameters cannot say (another crypto provider, a custom certificate verifier,
    /// protocol versions). The certificate must name the URL's host, as rustls checks
    /// it with `config`'s verifier.
    ///
    /// The store value returned gets connections of its own; clones made before keep
    /// the old settings.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if the store connects over a Unix socket (where TLS
    /// is never used), or if the host is neither a DNS name nor an IP address.
    pub fn with_tls_config(mut self, config: rustls::ClientConfig) -> Result<Self> {
        let address = &self.settings.config.address;
        self.settings.config.connector = Some(Connector::new(Arc::new(config), address, None)?);
        Ok(self.rebuilt())
    }

    /// Returns the store waiting at most `timeout` for a free connection, to
    /// connect, and for each reply; the server cancels a statement running longer.
    /// The timeout is kept between 1 ms and one day.
    ///
    /// The store value returned gets connections of its own; clones made before keep
    /// the old timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = net::clamp_timeout(timeout);
        self.rebuilt()
    }

    /// Returns the store keeping at most `max` connections open (at least 1).
    ///
    /// The store value returned gets connections of its own; clones made before keep
    /// the old pool.
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.settings.max_connections = max.max(1);
        self.rebuilt()
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

    /// Returns the schema and table names.
    pub fn table(&self) -> (&str, &str) {
        (&self.settings.schema, &self.settings.table)
    }

    /// Returns the timeout.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    fn rebuilt(mut self) -> Self {
        let (pool, statements) = build_pool(&self.settings);
        self.pool = Arc::new(pool);
        self.statements = Arc::new(statements);
        self
    }
}

#[maybe_async::maybe_async]
impl PostgresStore {
    /// Connects, and creates the schema, table and index if the table is missing.
    ///
    /// Operations do this on their first connection anyway; call it at startup so
    /// that a wrong URL, password or privilege shows at once.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if the server cannot be reached, refuses the login,
    /// or refuses to create what is missing.
    pub async fn create_table(&self) -> Result<()> {
        self.pool.create_schema().await
    }
}

/// Quotes an identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal, as an escape string so that it means the same whatever
/// the server's `standard_conforming_strings`.
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// The store's statements, one per operation, on its table.
#[derive(Debug)]
struct Statements {
    load: Statement,
    create: Statement,
    save: Statement,
    update: Statement,
    delete: Statement,
    delete_expired: Statement,
    list_owned: Statement,
    rank_owned: Statement,
    end_one: Statement,
    end_all_but: Statement,
}

fn build_pool(settings: &Settings) -> (Pool, Statements) {
    let table = format!("{}.{}", ident(&settings.schema), ident(&settings.table));
    let index = ident(&format!("{}{INDEX_SUFFIX}", settings.table));
    let owner_index = ident(&format!("{}{OWNER_INDEX_SUFFIX}", settings.table));
    let exists = format!(
        "SELECT to_regclass({table_literal}) IS NOT NULL, \
         EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {}), \
         EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass({table_literal}) \
                 AND attname = 'owner' AND NOT attisdropped)",
        literal(&settings.schema),
        table_literal = literal(&table),
    );
    let owner_index_name = owner_index.clone();
    let owner_index = format!(
        "CREATE INDEX IF NOT EXISTS {owner_index} ON {table} (owner) WHERE owner IS NOT NULL;"
    );
    // For a table made before owners existed, under the schema lock and a lock
    // timeout (so that it neither waits behind a long transaction nor holds every
    // query of the table up meanwhile): the column, added only if still missing once
    // the lock is held (`ALTER TABLE` takes the table's exclusive lock even when the
    // column is there), which is quick; and the index, built here only for a small
    // table (a big one would block writes while it builds: the store logs the
    // statement to run with CONCURRENTLY instead).
    let add_owner = format!(
        "SELECT set_config('lock_timeout', current_setting('statement_timeout'), true);
         DO $portable_sessions$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_attribute
                            WHERE attrelid = to_regclass({table_literal})
                            AND attname = 'owner' AND NOT attisdropped) THEN
                 ALTER TABLE {table} ADD COLUMN owner text;
             END IF;
             IF (SELECT CASE WHEN reltuples >= 0 THEN reltuples < {SMALL_TABLE}
                             ELSE pg_relation_size(oid) < {SMALL_TABLE_BYTES} END
                 FROM pg_class WHERE oid = to_regclass({table_literal})) THEN
                 {owner_index}
             END IF;
         END $portable_sessions$;",
        table_literal = literal(&table),
    );
    let owner_index_missing = format!(
        "SELECT to_regclass({}) IS NULL",
        literal(&format!("{}.{owner_index_name}", ident(&settings.schema)))
    );
    let owner_index_advice = format!(
        "CREATE INDEX CONCURRENTLY {owner_index_name} ON {table} (owner) WHERE owner IS NOT NULL"
    );
    // One simple query: one implicit transaction, so the advisory lock holds to its
    // end. The schema is created only if missing, which needs no CREATE privilege
    // on the database when it exists.
    let lock = format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK});");
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             key bytea PRIMARY KEY,
             expires_at timestamptz NOT NULL,
             version bigint NOT NULL,
             record bytea NOT NULL,
             owner text
         );
         CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
         {owner_index}"
    );
    let create_schema = format!("CREATE SCHEMA IF NOT EXISTS {};", ident(&settings.schema));
    use oid::{BYTEA, INT4, INT8, TEXT, TIMESTAMPTZ};
    let statement = |label, sql, types| Statement::new(label, sql, types);
    let statements = Statements {
        load: statement(
            "load",
            format!("SELECT version, record FROM {table} WHERE key = $1 AND expires_at > $2"),
            &[BYTEA, TIMESTAMPTZ],
        ),
        create: statement(
            "create",
            format!(
                "INSERT INTO {table} (key, expires_at, version, record, owner) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING"
            ),
            &[BYTEA, TIMESTAMPTZ, INT8, BYTEA, TEXT],
        ),
        save: statement(
            "save",
            format!(
                "INSERT INTO {table} (key, expires_at, version, record, owner) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at, \
                 version = EXCLUDED.version, record = EXCLUDED.record, owner = EXCLUDED.owner"
            ),
            &[BYTEA, TIMESTAMPTZ, INT8, BYTEA, TEXT],
        ),
        // The compare and the write are one statement. The other columns are read
        // from the statement's snapshot, before its write: whether a live row is
        // there (a newer version, or no session), and whether that row is this very
        // write already (its version and its token, which lead the record bytes),
        // when the write is sent again after a lost reply.
        update: statement(
            "update",
            format!(
                "WITH written AS (
                     UPDATE {table} SET expires_at = $2, version = $5, record = $4, owner = $7
                     WHERE key = $1 AND version = $3 AND expires_at > $6
                     RETURNING 1
                 )
                 SELECT EXISTS (SELECT 1 FROM written),
                        EXISTS (SELECT 1 FROM {table} WHERE key = $1 AND expires_at > $6),
                        EXISTS (SELECT 1 FROM {table} WHERE key = $1 AND expires_at > $6
                                AND version = $5
                                AND substring(record from 1 for {head}) =
                                    substring($4 from 1 for {head}))",
                head = 1 + stored::TOKEN_LEN
            ),
            &[BYTEA, TIMESTAMPTZ, INT8, BYTEA, INT8, TIMESTAMPTZ, TEXT],
        ),
        delete: statement(
            "delete",
            format!("DELETE FROM {table} WHERE key = $1"),
            &[BYTEA],
        ),
        delete_expired: statement(
            "delete_expired",
            format!(
                // The batch is found through the expiry index and deleted by
                // tuple id; the second test of the date skips a row that a
                // concurrent save revived meanwhile.
                "DELETE FROM {table} WHERE ctid = ANY (ARRAY (
                     SELECT ctid FROM {table} WHERE expires_at <= $1
                     ORDER BY expires_at LIMIT $2
                 )) AND expires_at <= $1"
            ),
            &[TIMESTAMPTZ, INT4],
        ),
        list_owned: statement(
            "list_owned",
            // The latest-expiring first, as many as fit in the byte budget (the
            // first always: a record is at most 1 MiB, below the slack).
            format!(
                "SELECT key, record FROM (
                     SELECT key, record, expires_at,
                            sum(octet_length(record)) OVER (ORDER BY expires_at DESC, key)
                                AS running
                     FROM {table} WHERE owner = $1 AND expires_at > $2
                     ORDER BY expires_at DESC, key LIMIT {MAX_LISTED}
                 ) AS listed
                 WHERE running <= {budget} OR running = octet_length(record)
                 ORDER BY expires_at DESC, key",
                budget = MAX_LISTED_BYTES - LISTED_SLACK,
            ),
            &[TEXT, TIMESTAMPTZ],
        ),
        rank_owned: statement(
            "rank_owned",
            format!(
                "SELECT key, substring(record from 1 for {prefix}) FROM {table} \
                 WHERE owner = $1 AND expires_at > $2 AND key > $3 ORDER BY key LIMIT {RANK_PAGE}",
                prefix = stored::OWNED_PREFIX_LEN,
            ),
            &[TEXT, TIMESTAMPTZ, BYTEA],
        ),
        end_one: statement(
            "end_one",
            format!(
                "DELETE FROM {table} WHERE key = $1 AND owner = $2 AND expires_at > $3 \
                 RETURNING key"
            ),
            &[BYTEA, TEXT, TIMESTAMPTZ],
        ),
        end_all_but: statement(
            "end_all_but",
            format!(
                // A batch at a time; the owner is tested again on the rows
                // deleted, in case one was given another meanwhile.
                "DELETE FROM {table} WHERE key IN (
                     SELECT key FROM {table} WHERE owner = $1 AND key <> $2 AND expires_at > $3
                     LIMIT {END_BATCH}
                 ) AND owner = $1 RETURNING key"
            ),
            &[TEXT, BYTEA, TIMESTAMPTZ],
        ),
    };
    let pool = Pool::new(
        settings.config.clone(),
        settings.timeout,
        settings.max_connections,
        Setup {
            exists,
            lock,
            create,
            add_owner,
            owner_index_missing,
            owner_index_advice,
            create_schema,
            statements: [
                &statements.load,
                &statements.create,
                &statements.save,
                &statements.update,
                &statements.delete,
                &statements.delete_expired,
                &statements.list_owned,
                &statements.rank_owned,
                &statements.end_one,
                &statements.end_all_but,
            ]
            .map(Statement::clone)
            .to_vec(),
        },
    );
    (pool, statements)
}

/// Microseconds from PostgreSQL's epoch (2000-01-01 UTC) to `at`, rounded down.
fn timestamptz(at: OffsetDateTime) -> i64 {
    const POSTGRES_EPOCH_MICROS: i128 = 946_684_800_000_000;
    let micros = at.unix_timestamp_nanos().div_euclid(1000) - POSTGRES_EPOCH_MICROS;
    // Within `time`'s years ±9999 this always fits; saturate rather than wrap anyway.
    i64::try_from(micros).unwrap_or(if micros < 0 {
        i64::MIN + 1
    } else {
        i64::MAX - 1
    })
}

/// `i64` with the same bits: versions are `u64`, columns `bigint`.
fn column_version(version: u64) -> i64 {
    i64::from_ne_bytes(version.to_ne_bytes())
}

fn record_version(column: i64) -> u64 {
    u64::from_ne_bytes(column.to_ne_bytes())
}

fn protocol(what: &str) -> Error {
    Error::backend(WireError::Protocol(what.into()))
}

/// The `owner` column's parameter for `record`.
fn owner_param(record: &Record) -> Param<'_> {
    match &record.ownership {
        Some(ownership) => Param::Text(ownership.owner.as_str()),
        None => Param::Null,
    }
}

/// The handle in a `key` column.
fn handle_column(column: Option<&[u8]>) -> Result<Handle> {
    let key: [u8; 32] = column
        .and_then(|key| key.try_into().ok())
        .ok_or_else(|| protocol("a session key is not 32 bytes long"))?;
    Ok(Handle::from_bytes(key))
}

/// Reads a boolean column of a binary row.
fn bool_column(column: Option<&[u8]>) -> Result<bool> {
    match column {
        Some([byte]) => Ok(*byte != 0),
        _ => Err(protocol("a boolean column is not one byte")),
    }
}

#[maybe_async::maybe_async]
impl SessionStore for PostgresStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        let expires_at = timestamptz(record.expiry_date);
        let version = column_version(record.version);
        for _ in 0..MAX_CREATE_ATTEMPTS {
            // Encoded for each id drawn: the stored bytes carry its key check.
            let bytes = stored::encode_checked(record)?;
            let key = stored::digest(&record.id);
            let reply = self
                .pool
                .call(|conn| {
                    conn.push(
                        &self.statements.create,
                        &[
                            Param::Bytea(&key),
                            Param::Timestamptz(expires_at),
                            Param::Int8(version),
                            Param::Bytea(&bytes),
                            owner_param(record),
                        ],
                    )
                })
                .await?;
            if reply.affected == 1 {
                return Ok(());
            }
            record.id = random_id()?;
        }
        Err(Error::backend(format!(
            "no row was inserted for {MAX_CREATE_ATTEMPTS} new ids in a row: a rule or \
             trigger on the table may be dropping inserts"
        )))
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let bytes = stored::encode_checked(record)?;
        let key = stored::digest(&record.id);
        self.pool
            .call(|conn| {
                conn.push(
                    &self.statements.save,
                    &[
                        Param::Bytea(&key),
                        Param::Timestamptz(timestamptz(record.expiry_date)),
                        Param::Int8(column_version(record.version)),
                        Param::Bytea(&bytes),
                        owner_param(record),
                    ],
                )
            })
            .await?;
        Ok(())
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        let key = stored::digest(id);
        // The time is read once a connection is in hand: a wait for one must not let
        // a record that expired meanwhile through, and `update` reads it the same way.
        let read_at = parking_lot::Mutex::new(None);
        let reply = self
            .pool
            .call(|conn| {
                let now = self.clock.now();
                *read_at.lock() = Some(now);
                conn.push(
                    &self.statements.load,
                    &[Param::Bytea(&key), Param::Timestamptz(timestamptz(now))],
                )
            })
            .await?;
        let now = read_at.into_inner().unwrap_or_else(|| self.clock.now());
        let Some(row) = reply.rows.first() else {
            return Ok(None);
        };
        let columns = columns(row).map_err(Error::backend)?;
        let (Some(Some(version)), Some(Some(bytes))) = (columns.first(), columns.get(1)) else {
            return Err(protocol("a session row lacks its version or record"));
        };
        let version: [u8; 8] = (*version)
            .try_into()
            .map_err(|_| protocol("a bigint column is not eight bytes"))?;
        let mut record = stored::decode(id, bytes)?;
        record.version = record_version(i64::from_be_bytes(version));
        // The column is rounded to the microsecond; the record's own date is exact.
        Ok(Some(record).filter(|r| !r.is_expired_at(now)))
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        let key = stored::digest(id);
        self.pool
            .call(|conn| conn.push(&self.statements.delete, &[Param::Bytea(&key)]))
            .await?;
        Ok(())
    }

    /// One conditional `UPDATE` statement: atomic.
    ///
    /// The record is stored behind a random token of this write, so that when the
    /// write is sent again (its connection closed before the reply came) the
    /// statement recognises its own first copy, if that committed, and answers
    /// `Written` rather than `Conflict`. If another write came in between, the
    /// outcome cannot be told and the call fails instead: answering `Conflict` would
    /// have the caller apply its changes a second time.
    async fn update(&self, record: &Record) -> Result<Update> {
        let token = stored::write_token()?;
        let bytes = stored::encode_with_token(record, &token)?;
        let key = stored::digest(&record.id);
        let next = record.version.wrapping_add(1);
        let reply = self
            .pool
            .call(|conn| {
                // Read once a connection is in hand, as `load` does.
                let now = timestamptz(self.clock.now());
                conn.push(
                    &self.statements.update,
                    &[
                        Param::Bytea(&key),
                        Param::Timestamptz(timestamptz(record.expiry_date)),
                        Param::Int8(column_version(record.version)),
                        Param::Bytea(&bytes),
                        Param::Int8(column_version(next)),
                        Param::Timestamptz(now),
                        owner_param(record),
                    ],
                )
            })
            .await?;
        let row = reply
            .rows
            .first()
            .ok_or_else(|| protocol("the conditional write returned no row"))?;
        let columns = columns(row).map_err(Error::backend)?;
        let written = bool_column(columns.first().copied().flatten())?;
        let live = bool_column(columns.get(1).copied().flatten())?;
        let ours = bool_column(columns.get(2).copied().flatten())?;
        Ok(match (written || ours, live) {
            (true, _) => Update::Written(next),
            (false, true) if reply.resent => return Err(stored::unknown_outcome()),
            (false, true) => Update::Conflict,
            (false, false) => Update::Gone,
        })
    }

    fn atomic_update(&self) -> bool {
        true
    }

    fn supports_owners(&self) -> bool {
        true
    }

    /// One query on the indexed `owner` column.
    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        self.owned(owner)
            .await?
            .into_iter()
            .map(|(handle, record)| OwnedSession::new(handle, record))
            .collect()
    }

    /// One `DELETE` statement, conditional on the owner, except for
    /// [`Ending::AllButNewest`]: a listing, then one `DELETE` of each session it
    /// ends.
    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        let (one, key) = match ending {
            Ending::One(handle) => (true, handle.to_bytes().to_vec()),
            Ending::AllBut(handle) => (false, handle.to_bytes().to_vec()),
            Ending::All => (false, Vec::new()),
            Ending::AllButNewest(_) => {
                let picked = ending.pick(self.ranked(owner).await?);
                let mut ended = Vec::with_capacity(picked.len());
                for handle in picked {
                    ended.extend(self.end_owned(owner, Ending::One(handle)).await?);
                }
                return Ok(ended);
            }
        };
        let mut ended = Vec::new();
        let mut batches = 0;
        loop {
            let reply = self
                .pool
                .call(|conn| {
                    conn.allow_rows(END_BATCH, END_BATCH * 64);
                    let now = timestamptz(self.clock.now());
                    let owner = Param::Text(owner.as_str());
                    if one {
                        let params = [Param::Bytea(&key), owner, Param::Timestamptz(now)];
                        conn.push(&self.statements.end_one, &params)
                    } else {
                        let params = [owner, Param::Bytea(&key), Param::Timestamptz(now)];
                        conn.push(&self.statements.end_all_but, &params)
                    }
                })
                .await?;
            for row in &reply.rows {
                let columns = columns(row).map_err(Error::backend)?;
                ended.push(handle_column(columns.first().copied().flatten())?);
            }
            // Until a batch finds nothing: one may come back short while more rows
            // remain (a row it picked was ended or given another owner meanwhile).
            if one || reply.rows.is_empty() {
                return Ok(ended);
            }
            batches += 1;
            if batches == MAX_END_BATCHES {
                return Err(Error::backend(format!(
                    "an owner's sessions kept coming while they were ended, \
                     {MAX_END_BATCHES} statements of {END_BATCH}"
                )));
            }
        }
    }
}

#[maybe_async::maybe_async]
impl PostgresStore {
    /// `owner`'s live sessions, each with when it got the owner (an unreadable one
    /// as the oldest), a page at a time by key.
    async fn ranked(&self, owner: &Owner) -> Result<Vec<(Handle, OffsetDateTime)>> {
        let mut ranked = Vec::new();
        let mut after = Vec::new();
        while ranked.len() < MAX_RANKED {
            let reply = self
                .pool
                .call(|conn| {
                    conn.allow_rows(RANK_PAGE, RANK_PAGE * (stored::OWNED_PREFIX_LEN + 64));
                    let now = timestamptz(self.clock.now());
                    conn.push(
                        &self.statements.rank_owned,
                        &[
                            Param::Text(owner.as_str()),
                            Param::Timestamptz(now),
                            Param::Bytea(&after),
                        ],
                    )
                })
                .await?;
            for row in &reply.rows {
                let columns = columns(row).map_err(Error::backend)?;
                let handle = handle_column(columns.first().copied().flatten())?;
                // An unreadable one counts as the oldest: the limit ends it first.
                let created = columns
                    .get(1)
                    .copied()
                    .flatten()
                    .and_then(|bytes| stored::decode_ownership(bytes).ok().flatten())
                    .map_or(OffsetDateTime::UNIX_EPOCH, |o| o.created_at);
                ranked.push((handle, created));
                after = handle.to_bytes().to_vec();
            }
            if reply.rows.len() < RANK_PAGE {
                break;
            }
        }
        Ok(ranked)
    }

    /// `owner`'s live rows: each key (the handle) and record.
    async fn owned(&self, owner: &Owner) -> Result<Vec<(Handle, Record)>> {
        let read_at = parking_lot::Mutex::new(None);
        let reply = self
            .pool
            .call(|conn| {
                conn.allow_rows(MAX_LISTED, MAX_LISTED_BYTES);
                let now = self.clock.now();
                *read_at.lock() = Some(now);
                conn.push(
                    &self.statements.list_owned,
                    &[
                        Param::Text(owner.as_str()),
                        Param::Timestamptz(timestamptz(now)),
                    ],
                )
            })
            .await?;
        let now = read_at.into_inner().unwrap_or_else(|| self.clock.now());
        let mut owned = Vec::with_capacity(reply.rows.len());
        for row in &reply.rows {
            let columns = columns(row).map_err(Error::backend)?;
            let handle = handle_column(columns.first().copied().flatten())?;
            let bytes = columns
                .get(1)
                .copied()
                .flatten()
                .ok_or_else(|| protocol("a session row lacks its record"))?;
            let record = match stored::decode_listed(bytes) {
                Ok(record) => record,
                Err(err) => {
                    stored::unreadable_in_listing(&handle, &err);
                    continue;
                }
            };
            let mine = record.ownership.as_ref().is_some_and(|o| o.owner == *owner);
            if mine && !record.is_expired_at(now) {
                owned.push((handle, record));
            }
        }
        Ok(owned)
    }
}

#[maybe_async::maybe_async]
impl ExpiredDeletion for PostgresStore {
    async fn delete_expired(&self) -> Result<usize> {
        let now = timestamptz(self.clock.now());
        let mut deleted = 0;
        loop {
            let reply = self
                .pool
                .call(|conn| {
                    conn.push(
                        &self.statements.delete_expired,
                        &[Param::Timestamptz(now), Param::Int4(DELETE_BATCH)],
                    )
                })
                .await?;
            deleted += reply.affected as usize;
            if reply.affected < DELETE_BATCH as u64 {
                return Ok(deleted);
            }
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("server", &format_args!("{}", self.settings.config.address))
            .field("dbname", &self.settings.config.dbname)
            .field("schema", &self.settings.schema)
            .field("table", &self.settings.table)
            .field("timeout", &self.settings.timeout)
            .field("max_connections", &self.pool.max())
            .field("clock", &self.clock)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_count_from_2000() {
        let y2k = OffsetDateTime::from_unix_timestamp(946_684_800).unwrap();
        assert_eq!(timestamptz(y2k), 0);
        assert_eq!(timestamptz(y2k + time::Duration::nanoseconds(1999)), 1);
        assert_eq!(timestamptz(y2k - time::Duration::nanoseconds(1)), -1);
    }

    #[test]
    fn names_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "E'it''s'");
        assert_eq!(literal("a\\'b"), "E'a\\\\''b'");
    }

    #[test]
    fn bad_table_names_are_refused() {
        let store = PostgresStore::new("postgres://u@127.0.0.1/d").unwrap();
        assert!(store.clone().with_table("", "t").is_err());
        assert!(store.clone().with_table("s", &"x".repeat(53)).is_err());
        assert!(store.clone().with_table(&"x".repeat(64), "t").is_err());
        assert!(store
            .clone()
            .with_table(&"x".repeat(63), &"x".repeat(52))
            .is_ok());
        assert!(store.clone().with_table("s", "a\0b").is_err());
        assert_eq!(
            store.with_table("My Schema", "t").unwrap().table(),
            ("My Schema", "t")
        );
    }
}
