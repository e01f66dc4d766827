//! A bounded pool of PostgreSQL connections, opened on demand; the first one a store
//! opens makes sure its table exists.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use super::{
    config::Config,
    wire::{oid, Conn, Param, Reply, Statement, WireError},
};
use crate::{
    session_store::{Error, Result},
    stores::pool::{self, Lent},
};

/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";
/// SQLSTATE `invalid_sql_statement_name`: no prepared statement of that name on the
/// server connection the request reached.
const NO_SUCH_STATEMENT: &str = "26000";
/// SQLSTATE `duplicate_prepared_statement`: the server connection already has it.
const DUPLICATE_STATEMENT: &str = "42P05";

/// Sets the statement timeout for the rest of the implicit transaction that a
/// request's sync ends (`is_local`): never a session setting, which a pooler in
/// transaction or statement mode would leave on a server connection that other
/// clients get next, and which the next transaction may not find. The server times
/// each statement of a request afresh, from its first message, with the setting in
/// force then, so the statement after this one runs under it (as does each statement
/// after it in a simple query string).
const LOCAL_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1, true)";

/// The schema the store needs.
pub(crate) struct Setup {
    /// A simple query answering whether the table exists, then whether its schema
    /// does.
    pub(crate) exists: String,
    /// Takes the lock that serializes schema creation.
    pub(crate) lock: String,
    /// Adds the `owner` column (and, to a small table, its index) to a table made
    /// before owners existed.
    pub(crate) add_owner: String,
    /// Answers whether the owner index is missing.
    pub(crate) owner_index_missing: String,
    /// The statement to build the owner index without blocking writes, for the log.
    pub(crate) owner_index_advice: String,
    /// Creates the schema.
    pub(crate) create_schema: String,
    /// Creates the table and its index if they are missing.
    pub(crate) create: String,
    /// The operations' statements, prepared by name on each connection while that
    /// lasts (see `Pool::named`), with the statement timeout's.
    pub(crate) statements: Vec<Statement>,
}

pub(crate) struct Pool {
    config: Config,
    timeout: Duration,
    /// The timeout in milliseconds, the server's `statement_timeout`: it gives up on
    /// a statement when the client would, so that a statement stuck behind a lock
    /// does not outlive the caller's error.
    timeout_ms: String,
    setup: Setup,
    /// Set once this store has seen its table: new connections then need nothing
    /// more.
    ready: AtomicBool,
    /// Whether statements are prepared by name once per connection (`true` until a
    /// server says otherwise), or sent whole with each request. A server reached
    /// directly keeps what a connection prepared, and a statement prepared is
    /// neither parsed nor planned again (a load costs about two thirds of what it
    /// does unnamed). Through a pooler in transaction or statement mode (PgBouncer
    /// before 1.21, or without `max_prepared_statements`), a request may reach a
    /// server connection that never saw the preparation (`26000`), or one that
    /// another client connection prepared already (`42P05`): nothing of such a
    /// request ran, and from then on the store sends every statement whole, and the
    /// request runs again so.
    named: AtomicBool,
    /// The statement timeout's own statement (also among those prepared).
    timeout_statement: Statement,
    conns: pool::Pool<Conn>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.config)
            .field("conns", &self.conns)
            .finish_non_exhaustive()
    }
}

/// The connection of a lent slot: present once taken or opened.
fn conn_of<'l>(lent: &'l mut Lent<'_, Conn>) -> &'l mut Conn {
    lent.conn
        .as_mut()
        .expect("a lent connection is present until dropped")
}

impl Pool {
    pub(crate) fn new(config: Config, timeout: Duration, max: usize, mut setup: Setup) -> Self {
        let timeout_statement = Statement::new("timeout", LOCAL_TIMEOUT.to_owned(), &[oid::TEXT]);
        setup.statements.push(timeout_statement.clone());
        Self {
            config,
            timeout,
            timeout_ms: timeout.as_millis().max(1).to_string(),
            setup,
            ready: AtomicBool::new(false),
            named: AtomicBool::new(true),
            timeout_statement,
            conns: pool::Pool::new(max, timeout),
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.conns.max()
    }
}

#[maybe_async::maybe_async]
impl Pool {
    /// Runs one request, built by `build` on the connection (its statements, with
    /// no sync), under the statement timeout, and returns the reply of its last
    /// statement: one round trip.
    ///
    /// A connection taken from the idle list may have been closed by the server
    /// meanwhile (it restarted, or an administrator ended it): if the request fails
    /// that way before any reply, the idle list is emptied (its connections date from
    /// the same server) and the request runs once more on a new connection. So it
    /// does, after emptying the idle list, when the table has gone (dropped, or the
    /// database restored without it): the new connection creates it again.
    ///
    /// A server that went away before reading the request did not run it, and one
    /// that ran it and died before answering leaves an outcome the contract
    /// tolerates when it runs twice: loads, saves and deletes are idempotent; a
    /// create whose first copy committed finds its key taken and draws another id
    /// (the first row expires unused); an update recognises its own first copy by
    /// the token it wrote (see `PostgresStore::update`), and the reply says that
    /// it was sent again.
    pub(crate) async fn call(
        &self,
        build: impl Fn(&mut Conn) -> Result<(), WireError> + Send + Sync,
    ) -> Result<Reply> {
        let mut retried = false;
        let mut resent = false;
        loop {
            let mut lent = self.get(retried).await?;
            let reused = lent.reused;
            let conn = conn_of(&mut lent);
            let named = self.named.load(Ordering::Acquire);
            let result = match self.prepare(conn, named).await {
                Ok(()) => {
                    conn.clear_request();
                    conn.named = named;
                    conn.push(&self.timeout_statement, &[Param::Text(&self.timeout_ms)])
                        .map_err(Error::backend)?;
                    build(conn).map_err(Error::backend)?;
                    conn.push_sync();
                    conn.exchange().await
                }
                Err(err) => {
                    // Statements a failed preparation made before it stopped stay on
                    // the server: the connection is not used again, so that none is
                    // ever prepared twice on it.
                    lent.discard = true;
                    Err(err)
                }
            };
            match result {
                Ok(mut reply) => {
                    reply.resent = resent;
                    return Ok(reply);
                }
                Err(err)
                    if named
                        && matches!(err.code(), Some(NO_SUCH_STATEMENT | DUPLICATE_STATEMENT)) =>
                {
                    if self.named.swap(false, Ordering::AcqRel) {
                        log::info!(
                            "PostgreSQL: a prepared statement was not where it was prepared \
                             ({err}): a connection pooler in transaction or statement mode \
                             is in between, so this store sends its statements whole from \
                             now on"
                        );
                    }
                }
                Err(err) if err.code() == Some(UNDEFINED_TABLE) && !retried => {
                    self.ready.store(false, Ordering::Release);
                    lent.discard = true;
                    self.conns.clear();
                    retried = true;
                }
                Err(err) if reused && !retried && err.closed_before_reply() => {
                    self.conns.clear();
                    retried = true;
                    resent = true;
                }
                Err(err) => return Err(Error::backend(err)),
            }
        }
    }

    /// Creates the schema, table and index if they are missing.
    pub(crate) async fn create_schema(&self) -> Result<()> {
        let mut lent = self.get(false).await?;
        self.ensure_table(conn_of(&mut lent)).await
    }

    /// Takes an idle connection (unless `fresh`) or opens one, waiting for a free
    /// slot at most the timeout.
    async fn get(&self, fresh: bool) -> Result<Lent<'_, Conn>> {
        let mut lent = self.conns.take("PostgreSQL", fresh).await?;
        if lent.conn.is_some() {
            return Ok(lent);
        }
        let opened = Conn::connect(&self.config, self.timeout).await;
        lent.conn = Some(opened.map_err(Error::backend)?);
        if !self.ready.load(Ordering::Acquire) {
            self.ensure_table(conn_of(&mut lent)).await?;
        }
        Ok(lent)
    }

    /// Prepares the statements by name on `conn` if they are to be (`named`) and it
    /// has not yet: one round trip per connection, under the statement timeout
    /// (parsing takes the table's locks, which a schema change may hold).
    async fn prepare(&self, conn: &mut Conn, named: bool) -> std::result::Result<(), WireError> {
        if !named || conn.prepared {
            return Ok(());
        }
        conn.clear_request();
        conn.named = false;
        conn.push(&self.timeout_statement, &[Param::Text(&self.timeout_ms)])?;
        conn.push_parses(&self.setup.statements)?;
        conn.push_sync();
        conn.exchange().await?;
        conn.prepared = true;
        Ok(())
    }

    /// The simple-query form of [`LOCAL_TIMEOUT`], to lead a query string: the
    /// string is one implicit transaction, which the setting lasts to the end of.
    fn local_timeout(&self) -> String {
        format!(
            "SELECT set_config('statement_timeout', '{}', true);",
            self.timeout_ms
        )
    }

    /// Adds the owner column to a table made before owners existed (and its index,
    /// to a small one); logs the statement that builds the index without blocking
    /// writes where it was not built.
    async fn add_owner(&self, conn: &mut Conn) -> Result<()> {
        let mut sql = self.local_timeout();
        sql.push_str(&self.setup.lock);
        sql.push_str(&self.setup.add_owner);
        conn.push_query(&sql).map_err(Error::backend)?;
        conn.exchange().await.map_err(|err| {
            Error::backend(format!(
                "this version keeps each session's owner in an `owner` column, which the \
                 sessions table lacks, and adding it failed ({err}): run `ALTER TABLE .. \
                 ADD COLUMN owner text` as the table's owner, then `{}`",
                self.setup.owner_index_advice
            ))
        })?;
        conn.push_query(&self.setup.owner_index_missing)
            .map_err(Error::backend)?;
        let reply = conn.exchange().await.map_err(Error::backend)?;
        let missing = reply
            .rows
            .first()
            .and_then(|row| super::wire::columns(row).ok())
            .is_some_and(|columns| columns.first().copied().flatten() == Some(b"t".as_slice()));
        if missing {
            log::warn!(
                target: "portable_sessions::postgres",
                "the sessions table got its `owner` column, but is too big to build its \
                 index while writes wait: listing a user's sessions scans the table until \
                 `{}` is run",
                self.setup.owner_index_advice
            );
        }
        Ok(())
    }

    async fn ensure_table(&self, conn: &mut Conn) -> Result<()> {
        // Look first: creating needs privileges that an application whose table was
        // made by an administrator may lack.
        let sql = format!("{}{}", self.local_timeout(), self.setup.exists);
        conn.push_query(&sql).map_err(Error::backend)?;
        let reply = conn.exchange().await.map_err(Error::backend)?;
        let row = reply
            .rows
            .first()
            .ok_or_else(|| Error::backend(WireError::Protocol("no reply row".into())))?;
        let columns = super::wire::columns(row).map_err(Error::backend)?;
        let is_true = |i: usize| columns.get(i).copied().flatten() == Some(b"t".as_slice());
        let (table_exists, schema_exists, has_owner) = (is_true(0), is_true(1), is_true(2));
        if table_exists && !has_owner {
            self.add_owner(conn).await?;
        }
        if !table_exists {
            // One simple query of several statements: one implicit transaction in
            // one round trip, holding the transaction-scoped advisory lock to its
            // end. A pooler in transaction or statement mode keeps it on one server
            // connection and sees no transaction left open at its end (statement
            // mode refuses one), where a session lock taken and released in two
            // requests could land on two server connections. Each statement is
            // idempotent besides: a process that gets the lock after another made
            // the table changes nothing.
            let mut sql = self.local_timeout();
            sql.push_str(&self.setup.lock);
            if !schema_exists {
                sql.push_str(&self.setup.create_schema);
            }
            sql.push_str(&self.setup.create);
            conn.push_query(&sql).map_err(Error::backend)?;
            conn.exchange().await.map_err(Error::backend)?;
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }
}
