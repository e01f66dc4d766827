//! [`RedisStore`]: sessions shared by many processes through Redis.

use std::{fmt, sync::Arc, time::Duration};

use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind, Value};
use time::OffsetDateTime;

use crate::{
    session::{random_id, Id, Record},
    session_store::{Error, ExpiredDeletion, Result, SessionStore, Update},
    stores::stored,
};

/// The conditional write, run by Redis as one step: writes the new value (or deletes
/// the key, for a record saved already expired) only if the key exists and its value
/// starts with the expected version. A value written before versions existed (it
/// starts with the record format byte 2, never the first byte of a version) counts as
/// version 0.
///
/// KEYS[1] is the key; ARGV[1] the expected version (8 bytes, big-endian), ARGV[2]
/// the new value, ARGV[3] its TTL in milliseconds ("0": delete). It returns 0 when no
/// key is there, 1 for another version, 2 once written.
const UPDATE_SCRIPT: &str = r"
local current = redis.call('GETRANGE', KEYS[1], 0, 7)
if current == '' then return 0 end
if string.byte(current, 1) == 2 then current = string.rep('\0', 8) end
if current ~= ARGV[1] then return 1 end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 2
";

fn update_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(UPDATE_SCRIPT))
}

/// The length of the version in front of every stored value.
const VERSION_LEN: usize = 8;

/// The stored value: the version (8 bytes, big-endian, so that the update script can
/// compare it as a string), then the record without its id.
fn encode_value(record: &Record, version: u64) -> Result<Vec<u8>> {
    record.encode_without_id_after(&version.to_be_bytes())
}

fn decode_value(id: &Id, value: &[u8]) -> Result<Record> {
    if value.first() == Some(&Record::FORMAT_VERSION_WITHOUT_ID) {
        // Written before versions existed: the record alone, at version 0.
        return stored::decode(id, value);
    }
    let (version, bytes) = value
        .split_first_chunk::<VERSION_LEN>()
        .ok_or_else(|| Error::decode("stored value is shorter than its version"))?;
    let mut record = stored::decode(id, bytes)?;
    record.version = u64::from_be_bytes(*version);
    Ok(record)
}

/// A session store in Redis: one key per session, expiring through Redis' own TTL, so
/// any number of server processes share sessions and nothing needs deleting.
///
/// - **Keys.** A session lives under `PREFIX` followed by the hexadecimal SHA-256
///   digest of its id (the prefix is `session:` unless set with
///   [`with_key_prefix`](RedisStore::with_key_prefix)). The value is the encoded
///   record with its id zeroed, so a dump of the database holds no id that could be
///   replayed as a cookie. Ids are 128 random bits, so an unkeyed digest cannot be
///   reversed by guessing, and processes sharing the store need no shared secret.
/// - **Expiry.** Every write sets the value and its TTL in one `SET ... PX`, rounded
///   up to the millisecond; a record saved already expired deletes its key, and one
///   created already expired is not written (but still gets a new id when its id is
///   taken, as `create` must).
///   [`load`](SessionStore::load) also checks the record's own date, so a session is
///   never served after it expires, whatever the clocks.
///   [`delete_expired`](ExpiredDeletion::delete_expired) does nothing and returns 0:
///   Redis removes expired keys itself.
/// - **Create** writes with `SET ... NX` and draws a new id while the key exists.
/// - **Conditional writes.** The value starts with the record's version (8 bytes,
///   big-endian); [`update`](SessionStore::update) runs a Lua script that compares it
///   and writes in one step on the server, in one round trip (`EVALSHA`; the script
///   is sent once more, with `EVAL`, after the server restarted and forgot it).
/// - **Timeouts and outages.** Connecting and each reply wait at most the
///   [timeout](RedisStore::with_timeout) (2 s unless set): an unreachable or hung
///   server makes operations fail with [`Error::Backend`], never hang. A connection
///   that failed is dropped and the next operation connects again, so a store keeps
///   working once the server is back, without being rebuilt; an operation that finds
///   its idle connection closed by a server restart retries once on a new one.
/// - **Corrupt values** make [`load`](SessionStore::load) of that id fail with
///   [`Error::Decode`]; other sessions are unaffected.
///
/// Clones are cheap and share connections. In async mode (the default) a store holds
/// one multiplexed connection that all tasks share, driven by the redis crate's smol
/// support: its I/O task runs on smol's global executor thread, so it needs no tokio
/// runtime and callers may use any executor. In sync mode each
/// operation borrows a blocking connection from a small pool (one per concurrent
/// caller, up to 16 kept idle).
///
/// The URL takes the redis crate's forms: `redis://[user:password@]host[:port][/db]`,
/// or `redis+unix:///path` for a Unix socket. TLS is not enabled.
///
/// # Examples
///
/// Two store values standing in for two server processes share sessions (this needs a
/// Redis server on `127.0.0.1:6379`):
///
/// ```
/// use std::time::Duration as StdDuration;
/// use portable_sessions::{session::Record, RedisStore, SessionStore};
/// use time::{Duration, OffsetDateTime};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let web1 = RedisStore::new("redis://127.0.0.1:6379")?
///     .with_key_prefix("doc-example:")
///     .with_timeout(StdDuration::from_millis(500));
/// let web2 = RedisStore::new("redis://127.0.0.1:6379")?.with_key_prefix("doc-example:");
///
/// let mut record = Record::new(OffsetDateTime::now_utc() + Duration::minutes(30));
/// record.insert("user_id", &42u64)?;
/// web1.create(&mut record).await?;
///
/// let seen = web2.load(&record.id).await?.expect("shared through Redis");
/// assert_eq!(seen.get::<u64>("user_id")?, Some(42));
/// web2.delete(&record.id).await?;
/// let gone = web1.load(&record.id).await?;
/// assert_eq!(gone, None);
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    prefix: Arc<str>,
    timeout: Duration,
    conns: Arc<Connections>,
}

impl RedisStore {
    /// The key prefix used unless [`with_key_prefix`](RedisStore::with_key_prefix)
    /// sets another.
    pub const DEFAULT_KEY_PREFIX: &'static str = "session:";

    /// The timeout used unless [`with_timeout`](RedisStore::with_timeout) sets
    /// another.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    /// Makes a store for the Redis server at `url`, such as `redis://127.0.0.1:6379`.
    ///
    /// Nothing is connected yet: the first operation connects, so a program can
    /// start while Redis is still coming up.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if `url` is not a Redis URL.
    pub fn new(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(Error::backend)?;
        Ok(Self {
            client,
            prefix: Self::DEFAULT_KEY_PREFIX.into(),
            timeout: Self::DEFAULT_TIMEOUT,
            conns: Arc::default(),
        })
    }

    /// Returns the store putting its keys under `prefix`, so that several
    /// applications (or tests) can share one Redis database.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// Returns the store waiting at most `timeout` to connect and for each reply.
    ///
    /// The store value returned gets connections of its own; clones made before
    /// keep the old timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.conns = Arc::default();
        self
    }

    /// Returns the key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Returns the timeout for connecting and for each reply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn key(&self, id: &Id) -> String {
        stored::hex_key(&self.prefix, &stored::digest(id))
    }
}

/// Milliseconds from `now` until `expiry`, rounded up so that Redis never drops a
/// key before its record expires, or `None` if it has expired.
fn ttl_millis(expiry: OffsetDateTime, now: OffsetDateTime) -> Option<u64> {
    let nanos = (expiry - now).whole_nanoseconds();
    if nanos <= 0 {
        return None;
    }
    let millis = (nanos + 999_999) / 1_000_000;
    Some(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// `true` if a connection taken from the pool failed because the server had closed
/// it (it restarted, or dropped idle clients): worth one retry on a new connection.
/// A timeout is not: the server may still be processing the command.
///
/// Such a server never read the command, so sending it again runs it once. Were it to
/// run twice anyway: `GET`, `DEL` and a plain `SET` are idempotent; a `SET NX` whose
/// first copy did land finds its key taken, so `create` draws another id (the first
/// copy expires with its TTL); an update whose first copy landed finds the version
/// moved on and answers `Conflict`, after which the caller reloads and sees its write.
fn closed_while_idle(err: &RedisError) -> bool {
    err.is_connection_dropped() && !err.is_timeout()
}

/// `true` if Redis refused `EVALSHA` because it does not know the script.
fn is_no_script(err: &Error) -> bool {
    let Error::Backend(source) = err else {
        return false;
    };
    source
        .downcast_ref::<RedisError>()
        .is_some_and(|err| err.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
}

/// `true` if the shared connection may be unusable after `err`: it is dropped, and the
/// next operation connects again.
#[cfg(not(feature = "sync"))]
fn breaks_connection(err: &RedisError) -> bool {
    err.is_io_error() || err.is_unrecoverable_error()
}

#[maybe_async::maybe_async]
impl SessionStore for RedisStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        let Some(ttl) = ttl_millis(record.expiry_date, OffsetDateTime::now_utc()) else {
            // Created already expired: it would never load, so nothing is written, but
            // its id must still be one that no other session holds.
            loop {
                let mut exists = redis::cmd("EXISTS");
                exists.arg(self.key(&record.id));
                let taken: bool = self.query(&exists).await?;
                if !taken {
                    return Ok(());
                }
                record.id = random_id()?;
            }
        };
        let bytes = encode_value(record, record.version)?;
        loop {
            let mut set = redis::cmd("SET");
            set.arg(self.key(&record.id))
                .arg(&bytes)
                .arg("PX")
                .arg(ttl)
                .arg("NX");
            let reply: Value = self.query(&set).await?;
            if reply != Value::Nil {
                return Ok(());
            }
            // The key exists: another session has this id.
            record.id = random_id()?;
        }
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let key = self.key(&record.id);
        match ttl_millis(record.expiry_date, OffsetDateTime::now_utc()) {
            Some(ttl) => {
                let bytes = encode_value(record, record.version)?;
                let mut set = redis::cmd("SET");
                set.arg(key).arg(bytes).arg("PX").arg(ttl);
                self.query::<()>(&set).await
            }
            None => {
                let mut del = redis::cmd("DEL");
                del.arg(key);
                self.query::<()>(&del).await
            }
        }
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        let mut get = redis::cmd("GET");
        get.arg(self.key(id));
        let bytes: Option<Vec<u8>> = self.query(&get).await?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let record = decode_value(id, &bytes)?;
        Ok(Some(record).filter(|r| !r.is_expired_at(OffsetDateTime::now_utc())))
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        let mut del = redis::cmd("DEL");
        del.arg(self.key(id));
        self.query::<()>(&del).await
    }

    /// One server-side script, one round trip: atomic.
    async fn update(&self, record: &Record) -> Result<Update> {
        let next = record.version.wrapping_add(1);
        let ttl = ttl_millis(record.expiry_date, OffsetDateTime::now_utc());
        let value = match ttl {
            Some(_) => encode_value(record, next)?,
            None => Vec::new(),
        };
        let (key, expected) = (self.key(&record.id), record.version.to_be_bytes());
        // `EVALSHA hash` or `EVAL source`, with the same key and arguments.
        let call = |verb: &str, script: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(script)
                .arg(1)
                .arg(&key)
                .arg(&expected[..])
                .arg(&value)
                .arg(ttl.unwrap_or(0));
            cmd
        };
        let by_hash = call("EVALSHA", update_script().get_hash());
        let outcome: i64 = match self.query(&by_hash).await {
            Err(err) if is_no_script(&err) => {
                // The server does not know the script (it restarted): send it whole.
                let whole = call("EVAL", UPDATE_SCRIPT);
                self.query(&whole).await?
            }
            other => other?,
        };
        match outcome {
            0 => Ok(Update::Gone),
            1 => Ok(Update::Conflict),
            2 => Ok(Update::Written(next)),
            other => Err(Error::backend(format!(
                "the update script answered {other}, not 0, 1 or 2"
            ))),
        }
    }

    fn atomic_update(&self) -> bool {
        true
    }
}

/// Does nothing and returns `Ok(0)`: Redis deletes each key when its TTL runs out.
#[maybe_async::maybe_async]
impl ExpiredDeletion for RedisStore {
    async fn delete_expired(&self) -> Result<usize> {
        Ok(0)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The address only: the URL may hold a password.
        f.debug_struct("RedisStore")
            .field(
                "server",
                &format_args!("{}", self.client.get_connection_info().addr()),
            )
            .field("key_prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Idle blocking connections, one taken per operation.
#[cfg(feature = "sync")]
#[derive(Default)]
struct Connections {
    idle: parking_lot::Mutex<Vec<redis::Connection>>,
}

/// More idle connections than this are closed instead of kept.
#[cfg(feature = "sync")]
const MAX_IDLE: usize = 16;

#[cfg(feature = "sync")]
impl RedisStore {
    fn connect(&self) -> Result<redis::Connection> {
        let conn = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(Error::backend)?;
        conn.set_read_timeout(Some(self.timeout))
            .map_err(Error::backend)?;
        conn.set_write_timeout(Some(self.timeout))
            .map_err(Error::backend)?;
        Ok(conn)
    }

    fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let pooled = self.conns.idle.lock().pop();
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let mut result = cmd.query(&mut conn);
        if reused && result.as_ref().is_err_and(closed_while_idle) {
            conn = self.connect()?;
            result = cmd.query(&mut conn);
        }
        match result {
            Ok(value) => {
                let mut idle = self.conns.idle.lock();
                if idle.len() < MAX_IDLE {
                    idle.push(conn);
                }
                Ok(value)
            }
            // A blocking connection that failed may be mid-reply: never reuse it.
            Err(err) => Err(Error::backend(err)),
        }
    }
}

/// The shared multiplexed connection, made on first use and after a failure.
#[cfg(not(feature = "sync"))]
#[derive(Default)]
struct Connections {
    slot: async_lock::Mutex<Slot>,
}

#[cfg(not(feature = "sync"))]
#[derive(Default)]
struct Slot {
    conn: Option<redis::aio::MultiplexedConnection>,
    /// Counts connections made, so that a failed one is dropped only if it is still
    /// the current one.
    generation: u64,
    /// When the last connection attempt failed, and why.
    failed: Option<(std::time::Instant, String)>,
}

#[cfg(not(feature = "sync"))]
impl RedisStore {
    /// Returns the shared connection, connecting if there is none; `true` with it if
    /// it had been used before.
    async fn connection(&self) -> Result<(redis::aio::MultiplexedConnection, u64, bool)> {
        let asked = std::time::Instant::now();
        let mut slot = self.conns.slot.lock().await;
        if let Some(conn) = &slot.conn {
            return Ok((conn.clone(), slot.generation, true));
        }
        // Callers queue here while one connects. If that attempt failed after this
        // caller arrived, share its failure instead of waiting out another timeout:
        // a dead server then costs each caller one timeout at most, not one each.
        if let Some((at, why)) = &slot.failed {
            if *at >= asked {
                return Err(Error::backend(why.clone()));
            }
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(conn) => {
                slot.generation += 1;
                slot.conn = Some(conn.clone());
                slot.failed = None;
                Ok((conn, slot.generation, false))
            }
            Err(err) => {
                slot.failed = Some((
                    std::time::Instant::now(),
                    format!("connecting to Redis failed: {err}"),
                ));
                Err(Error::backend(err))
            }
        }
    }

    async fn discard(&self, generation: u64) {
        let mut slot = self.conns.slot.lock().await;
        if slot.generation == generation {
            slot.conn = None;
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let (mut conn, mut generation, reused) = self.connection().await?;
        let mut result = cmd.query_async(&mut conn).await;
        if reused && result.as_ref().is_err_and(closed_while_idle) {
            self.discard(generation).await;
            (conn, generation, _) = self.connection().await?;
            result = cmd.query_async(&mut conn).await;
        }
        match result {
            Ok(value) => Ok(value),
            Err(err) => {
                if breaks_connection(&err) {
                    self.discard(generation).await;
                }
                Err(Error::backend(err))
            }
        }
    }
}
