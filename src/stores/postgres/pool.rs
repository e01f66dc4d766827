//! A bounded pool of PostgreSQL connections, opened on demand, each prepared with the
//! store's statements.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use postgres_protocol::Oid;

use super::{
    config::Config,
    wire::{Conn, Reply, WireError},
};
use crate::{
    session_store::{Error, Result},
    stores::pool::{self, Lent},
};

/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

/// What each new connection is prepared with, and the schema it needs.
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
    /// The prepared statements: name, SQL, parameter types.
    pub(crate) statements: Vec<(&'static str, String, &'static [Oid])>,
}

pub(crate) struct Pool {
    config: Config,
    timeout: Duration,
    setup: Setup,
    /// Set once this store has seen its table: new connections then only prepare.
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
    /// Runs one request, built by `build` on the connection, and returns its reply.
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
            build(conn).map_err(Error::backend)?;
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

    /// Takes an idle connection (unless `fresh`) or opens and prepares one, waiting
    /// for a free slot at most the timeout.
    async fn get(&self, fresh: bool) -> Result<Lent<'_, Conn>> {
        let mut lent = self.conns.take("PostgreSQL", fresh).await?;
        if lent.conn.is_some() {
            return Ok(lent);
        }
        let opened = Conn::connect(&self.config, self.timeout, self.timeout).await;
        lent.conn = Some(opened.map_err(Error::backend)?);
        let conn = conn_of(&mut lent);
        if !self.ready.load(Ordering::Acquire) {
            self.ensure_table(conn).await?;
        }
        let statements: Vec<(&str, &str, &[Oid])> = self
            .setup
            .statements
            .iter()
            .map(|(name, sql, types)| (*name, sql.as_str(), *types))
            .collect();
        conn.push_prepare(&statements).map_err(Error::backend)?;
        let prepared = conn.exchange().await;
        if let Err(err) = prepared {
            if err.code() == Some(UNDEFINED_TABLE) {
                self.ready.store(false, Ordering::Release);
            }
            return Err(Error::backend(err));
        }
        conn.prepared = true;
        Ok(lent)
    }

    async fn ensure_table(&self, conn: &mut Conn) -> Result<()> {
        // Look first: creating needs privileges that an application whose table was
        // made by an administrator may lack.
        conn.push_query(&self.setup.exists)
            .map_err(Error::backend)?;
        let reply = conn.exchange().await.map_err(Error::backend)?;
        let row = reply
            .rows
            .first()
            .ok_or_else(|| Error::backend(WireError::Protocol("no reply row".into())))?;
        let columns = super::wire::columns(row).map_err(Error::backend)?;
        let is_true = |i: usize| columns.get(i).copied().flatten() == Some(b"t".as_slice());
        let (table_exists, schema_exists) = (is_true(0), is_true(1));
        if !table_exists {
            // One simple query: one transaction, holding the lock to its end.
            let mut sql = self.setup.lock.clone();
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
