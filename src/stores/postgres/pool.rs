//! A bounded pool of PostgreSQL connections, opened on demand; the first one a store
//! opens makes sure its table exists.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use super::{
    config::Config,
    wire::{oid, Conn, Param, Reply, WireError},
};
use crate::{
    session_store::{Error, Result},
    stores::pool::{self, Lent},
};

/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

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
    /// Creates the schema.
    pub(crate) create_schema: String,
    /// Creates the table and its index if they are missing.
    pub(crate) create: String,
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
    pub(crate) fn new(config: Config, timeout: Duration, max: usize, setup: Setup) -> Self {
        Self {
            config,
            timeout,
            timeout_ms: timeout.as_millis().max(1).to_string(),
            setup,
            ready: AtomicBool::new(false),
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
            conn.clear_request();
            conn.push_statement(
                LOCAL_TIMEOUT,
                &[oid::TEXT],
                &[Param::Text(&self.timeout_ms)],
            )
            .map_err(Error::backend)?;
            build(conn).map_err(Error::backend)?;
            conn.push_sync();
            let result = conn.exchange().await;
            match result {
                Ok(mut reply) => {
                    reply.resent = resent;
                    return Ok(reply);
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

    /// The simple-query form of [`LOCAL_TIMEOUT`], to lead a query string: the
    /// string is one implicit transaction, which the setting lasts to the end of.
    fn local_timeout(&self) -> String {
        format!(
            "SELECT set_config('statement_timeout', '{}', true);",
            self.timeout_ms
        )
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
        let (table_exists, schema_exists) = (is_true(0), is_true(1));
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
