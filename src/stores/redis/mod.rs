//! [`RedisStore`]: sessions shared by many processes through Redis.

mod cluster;
mod config;
mod mux;
mod owners;
mod pool;
mod resp;
mod router;
mod sentinel;

use std::{fmt, sync::Arc, time::Duration};

use time::OffsetDateTime;

use self::{
    cluster::slot,
    config::{Config, Kind},
    mux::Mux,
    pool::Settings,
    resp::{Reply, RespError},
    router::{Attempt, Router},
};
use crate::{
    session::{random_id, Ending, Handle, Id, OwnedSession, Owner, Record},
    session_store::{Error, ExpiredDeletion, Result, SessionStore, Update},
    stores::{net, stored, tls::Connector},
};

/// The conditional write, run by Redis as one step: writes the new value (or deletes
/// the key, for a record written already expired) only if a live record is there and
/// its value starts with the expected version.
///
/// Liveness is the record's own expiry date, kept in the value's header, against the
/// time the client sent, read as the command went out: the judgement `load` makes,
/// never the key's TTL alone (a key outlives its record by the rounding of its TTL
/// and the trip to the server). A value written before the header existed counts as
/// live while its key exists, and one written before versions existed (it starts
/// with the record format byte 2, never the first byte of a version) as version 0.
///
/// KEYS[1] is the key; ARGV[1] the expected version (8 bytes, big-endian), ARGV[2]
/// the new value, ARGV[3] its TTL in milliseconds ("0": delete), ARGV[4] and ARGV[5]
/// the client's time (Unix seconds, nanoseconds). It returns 0 when no live record
/// is there, 1 for another version, 2 once written, and 3 when the stored value
/// already is this very write (same version, expiry and token): a copy sent again
/// after its reply was lost, whose first copy landed.
///
/// For an owned record, KEYS[2] is its owner's set, and ARGV[6] and ARGV[7] the
/// member and its score: the write files the record there too (see `owners`).
const UPDATE_SCRIPT: &str = concat!(
    owners::file_under_owner!(),
    r"
local head = redis.call('GETRANGE', KEYS[1], 0, 28)
if head == '' then return 0 end
local version = string.sub(head, 1, 8)
if string.byte(head, 1) == 2 then
  version = string.rep('\0', 8)
elseif (string.byte(head, 9) == 3 or string.byte(head, 9) == 180) and string.len(head) == 29 then
  local secs, nanos = struct.unpack('>i8I4', head, 10)
  local now_secs, now_nanos = tonumber(ARGV[4]), tonumber(ARGV[5])
  if secs < now_secs or (secs == now_secs and nanos <= now_nanos) then return 0 end
  if head == string.sub(ARGV[2], 1, 29) then return 3 end
end
if version ~= ARGV[1] then return 1 end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  if KEYS[2] then file(KEYS[2], ARGV[6], ARGV[7], ARGV[3], nil) end
end
return 2
"
);

/// The store's server-side scripts, each sent by digest once the server told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Update = 0,
    WriteOwned = 1,
    Values = 2,
    End = 3,
    Members = 4,
}

impl Script {
    const ALL: [Script; 5] = [
        Script::Update,
        Script::WriteOwned,
        Script::Values,
        Script::End,
        Script::Members,
    ];

    fn source(self) -> &'static str {
        match self {
            Self::Update => UPDATE_SCRIPT,
            Self::WriteOwned => owners::WRITE_OWNED_SCRIPT,
            Self::Values => owners::VALUES_SCRIPT,
            Self::End => owners::END_SCRIPT,
            Self::Members => owners::MEMBERS_SCRIPT,
        }
    }
}

/// The length of the version in front of every stored value.
const VERSION_LEN: usize = 8;

/// The byte after the version that starts the header: the record's own format byte
/// (2) stands there in values written before the header existed.
const HEADER_TAG: u8 = 3;

/// The header after the version: the tag, the expiry date (Unix seconds as `i64`,
/// then nanoseconds as `u32`, big-endian) and the write's token.
const HEADER_LEN: usize = 1 + 8 + 4 + stored::TOKEN_LEN;

/// The tag of the header of an owned record: the header above, then a digest of the
/// owner's name (the first bytes of its SHA-256), at a fixed place where the owner scripts
/// read it without decoding the record. Far from the record format bytes (values
/// written before the header start with one) and the tags of `stored`.
const OWNED_HEADER_TAG: u8 = 0xB4;

/// The length of an owned record's header.
const OWNED_HEADER_LEN: usize = HEADER_LEN + owners::OWNER_DIGEST_LEN;

/// Skips the header of a stored value (after its version), whichever it is.
fn after_header(bytes: &[u8]) -> Result<&[u8]> {
    let len = match bytes.first() {
        Some(&HEADER_TAG) => HEADER_LEN,
        Some(&OWNED_HEADER_TAG) => OWNED_HEADER_LEN,
        _ => return Ok(bytes),
    };
    bytes
        .get(len..)
        .ok_or_else(|| Error::decode("stored value is shorter than its header"))
}

/// The stored value: the version (8 bytes, big-endian, so that the update script can
/// compare it as a string), the header (the record's expiry date, for the script to
/// judge liveness as `load` does, and the token of the write that stored it), the
/// record's key check, then the record without its id.
fn encode_value(
    record: &Record,
    version: u64,
    token: &[u8; stored::TOKEN_LEN],
    filing: Option<&Filing>,
) -> Result<Vec<u8>> {
    let mut head = [0u8; VERSION_LEN + OWNED_HEADER_LEN + 1 + stored::CHECK_LEN];
    head[..VERSION_LEN].copy_from_slice(&version.to_be_bytes());
    head[VERSION_LEN] = HEADER_TAG;
    let expiry = record.expiry_date;
    head[VERSION_LEN + 1..VERSION_LEN + 9].copy_from_slice(&expiry.unix_timestamp().to_be_bytes());
    head[VERSION_LEN + 9..VERSION_LEN + 13].copy_from_slice(&expiry.nanosecond().to_be_bytes());
    head[VERSION_LEN + 13..VERSION_LEN + HEADER_LEN].copy_from_slice(token);
    let mut header = HEADER_LEN;
    if let Some(filing) = filing {
        head[VERSION_LEN] = OWNED_HEADER_TAG;
        head[VERSION_LEN + HEADER_LEN..VERSION_LEN + OWNED_HEADER_LEN]
            .copy_from_slice(&filing.digest);
        header = OWNED_HEADER_LEN;
    }
    // Then the record's key check: a reply for another key is refused on load.
    let check = VERSION_LEN + header;
    head[check..check + 1 + stored::CHECK_LEN]
        .copy_from_slice(&stored::tagged_key_check(&record.id));
    record.encode_without_id_after(&head[..check + 1 + stored::CHECK_LEN])
}

fn decode_value(id: &Id, value: &[u8]) -> Result<Record> {
    if value.first() == Some(&Record::LEGACY_FORMAT_VERSION_WITHOUT_ID) {
        // Written before versions existed: the record alone, at version 0.
        return stored::decode(id, value);
    }
    let (version, bytes) = value
        .split_first_chunk::<VERSION_LEN>()
        .ok_or_else(|| Error::decode("stored value is shorter than its version"))?;
    let mut record = stored::decode(id, after_header(bytes)?)?;
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
///   big-endian), then a header with the record's expiry date and the token of the
///   write that stored it; [`update`](SessionStore::update) runs a Lua script that
///   checks the record is live (by its own date, against the client's time, as
///   `load` judges it), compares the version and writes in one step on the server,
///   in one round trip (`EVALSHA`; the script is sent whole, with `EVAL`, to a
///   server that has not seen it or has forgotten it). A write sent again after its
///   reply was lost recognises its own first copy by the token. Values written
///   before the header existed still load and take conditional writes.
/// - **One round trip per operation, pipelined.** Operations in flight at once share
///   a connection: each command is written at once, behind those already sent, and
///   one of the waiting callers reads the replies for all and hands each to its
///   caller. The calling thread (sync mode) or task (async mode) does this itself,
///   with no driver task; under concurrency the server and the store then read and
///   write many commands per system call.
/// - **Connections.** Clones of a store share its connections: to each server (each
///   node of a cluster), one while fewer than 64 commands are in flight on it, more
///   (at most 16, or what
///   [`with_max_connections`](RedisStore::with_max_connections) sets) beyond that;
///   with `wait_replicas`, as many again for the writes that wait. They are opened on
///   demand and kept open.
/// - **Timeouts and outages.** Connecting and each reply take at most the
///   [timeout](RedisStore::with_timeout) (2 s unless set; an eighth more at worst,
///   and an operation that waits for the connection another is opening waits for
///   that too): an unreachable or hung server makes operations fail with
///   [`Error::Backend`], never hang. A connection
///   that failed, or whose oldest reply is overdue, fails every operation waiting on
///   it and is closed, and the next operation connects again, so a store keeps
///   working once the server is back, without being rebuilt; an operation that finds
///   its connection closed by a server restart runs once more on a new one. An
///   operation whose future is dropped halfway may still run (its command was
///   queued, and goes out with the others); its reply is read and thrown away, and
///   the connection stays in step. In async mode the callers drive their connection:
///   an operation's future that has been polled must then be polled to the end or
///   dropped, since one left pending and never polled again may be the one reading
///   for the others, which then wait for it, as they would for a lock it held.
/// - **Corrupt values** make [`load`](SessionStore::load) of that id fail with
///   [`Error::Decode`]; other sessions are unaffected.
///
/// In sync mode the store uses plain blocking sockets; in async mode async-io's
/// reactor, which runs on its own, so the store works under smol, under tokio and on
/// any other executor, with no runtime of its own.
///
/// # URLs
///
/// [`new`](RedisStore::new) takes every form below, so that moving from one server
/// to a cluster or to Sentinel changes the URL and nothing else. Parts are
/// percent-encoded; the cluster and Sentinel forms are fred's (the client under
/// tower-sessions' Redis store), so its users keep their URLs.
///
/// | Deployment | URL |
/// |---|---|
/// | one server | `redis://[[user]:password@]host[:port][/db]` |
/// | one server, local socket | `redis+unix:///path/to/socket[?db=N&user=U&pass=P]` |
/// | Redis Cluster | `redis-cluster://[[user]:password@]host[:port][?node=host:port&node=...]` |
/// | Sentinel | `redis-sentinel://[[user]:password@]host[:port][/db]?sentinelServiceName=NAME[&node=host:port...]` |
///
/// Each TCP form has a TLS twin (`rediss://`, `rediss-cluster://`,
/// `rediss-sentinel://`), with the parameters under [TLS](#tls). The port is 6379
/// unless given, and 26379 for a sentinel. Every form takes `wait_replicas=N` (see
/// [Acknowledged writes](#acknowledged-writes-wait_replicas)) and
/// `insecure_auth=true`: a password is not sent over plain TCP to another machine
/// (the connection fails, saying so) unless the URL says so. A parameter the store
/// does not know is refused, so a typo is never ignored. A value longer than the
/// largest record, with room to spare, a reply of more than 16 MiB in all (room for
/// a cluster's slot map broken into every slot), or a line that runs on without its
/// end, is refused before it is buffered.
///
/// Which to use: one server while it is enough (with Redis' persistence on, a
/// restart loses nothing but the seconds it is down); **Sentinel** for a primary
/// with replicas that take over when it fails; **Cluster** when sessions outgrow one
/// server, or where the service offers nothing else: AWS ElastiCache Serverless is a
/// cluster reached over TLS at one endpoint,
/// `rediss-cluster://default:PASSWORD@NAME-xxxxxx.serverless.REGION.cache.amazonaws.com:6379`.
///
/// # Redis Cluster
///
/// The URL names one or more seed nodes; the store reads the slot map from them
/// (`CLUSTER SLOTS`) and sends each command to the primary serving its key's slot
/// (CRC16 of the key, as Redis computes it), over that node's own pipelined
/// connections. A `MOVED` reply sends the command to the node named at once and
/// has the map read again; an `ASK` (a slot being migrated) sends that one command
/// to the node named, after `ASKING`. `TRYAGAIN`, `CLUSTERDOWN`, `LOADING`, a
/// demoted primary's `READONLY`, and a node that stops answering (a failover under
/// way) have the map read again and the command tried again after a growing pause
/// (10 ms, doubling, at most 500 ms) while the operation's
/// [timeout](RedisStore::with_timeout) lasts: a failover shorter than the timeout
/// is ridden through; during a longer one operations fail with [`Error::Backend`],
/// and once it is over they succeed on the same store. An operation that began
/// just before its deadline may still wait for its last reply, so it can take up to
/// about twice the timeout. Each operation touches one key, so no command crosses
/// slots. A cluster has database 0 alone: a URL with `/db` is refused.
///
/// Session owners are not kept on a cluster: an owner's index and its sessions
/// would sit on different nodes. There,
/// [`supports_owners`](SessionStore::supports_owners) is `false`, records with an
/// owner are stored as any other, and [`list_owned`](SessionStore::list_owned) and
/// [`end_owned`](SessionStore::end_owned) fail with
/// [`Unsupported`](crate::session_store::Unsupported).
///
/// Over TLS, every node is verified as the seeds are, by the host name or IP
/// address the slot map gives for it; where the certificates name the nodes by host
/// names and the map gives IP addresses, `sni=NAME` checks every node against
/// `NAME` instead.
///
/// # Sentinel
///
/// The URL names one or more sentinels and the name they watch the primary by
/// (`sentinelServiceName`); `sentinelUsername` and `sentinelPassword` are the
/// sentinels' credentials, those before `@` (and the `/db`) the primary's. The
/// sentinels are asked in turn for the primary, which is confirmed with `ROLE`
/// before it is used (a sentinel may not have seen a failover yet); the other
/// sentinels they know of are learnt from them. A connection error or a `READONLY`
/// from the primary (it was demoted) has the sentinels asked again and the command
/// tried again after a growing pause while the timeout lasts, as on a cluster. With
/// TLS, the sentinels and the primary are both reached over it.
///
/// # Acknowledged writes (`wait_replicas`)
///
/// Redis replicates asynchronously: a primary acknowledges a write before any
/// replica has it, and a failover may promote a replica that does not, so a logout
/// acknowledged by the old primary can come back. With `wait_replicas=N` (or
/// [`with_wait_replicas`](RedisStore::with_wait_replicas)) every write (create,
/// save, update, delete, and the owners' index writes) is followed, in the same
/// round trip, by `WAIT N` for half the timeout. When fewer than `N`
/// replicas acknowledge it in time, the operation fails with [`Error::Backend`],
/// saying how many did. Each waiting write has a connection to itself, so that no
/// read and no other write queues behind its `WAIT`; past the store's maximum of
/// connections, a write waits (within the timeout) for one to be free.
///
/// What it guarantees: a write that succeeded is on the primary and on at least `N`
/// replicas, so it survives a failover that promotes one of those. Sentinel picks
/// the replica of the best priority, then the one furthest along the replication
/// stream; a cluster's replicas stand for election sooner the further along they
/// are. With `N` equal to the number of replicas, every candidate holds the write.
///
/// What it does not:
///
/// - It is not a transaction. A write that fails for want of acknowledgements **has
///   been applied on the primary** and is in the replication stream: it may still
///   reach the replicas, or be lost in a failover. Treat the error as "not known to
///   be durable" and repeat the operation (a `delete` again, a login again) rather
///   than assume it was undone.
/// - A replica acknowledges having received the write, not having written it to
///   disk: lose the primary and those `N` replicas at once and it is lost.
/// - A replica that has not acknowledged may still be promoted (a failover forced by
///   hand, or a replica of better priority), and then the write is lost: keep such
///   replicas out of elections (`replica-priority 0` under Sentinel,
///   `cluster-replica-no-failover yes` on a cluster), or make `N` the number of
///   replicas.
/// - Reads are not affected: every command goes to the primary.
///
/// So that a `WAIT` always has a write of its own to wait for (a `delete` of a key
/// already gone changes nothing), the store also sets a small marker key,
/// `PREFIXreplicated` (on a cluster, `PREFIXreplicated{TAG}` in the write's slot,
/// or `{TAG}PREFIXreplicated` where the prefix holds braces of its own), that
/// expires after a minute. An [`update`](SessionStore::update) that fails
/// with a conflict, or finds its session gone, reports that, whatever the replicas
/// said. A write whose script the server has forgotten is sent again whole, and may
/// wait twice.
///
/// # TLS
///
/// `rediss://` connects through rustls (no OpenSSL), verifying the server's
/// certificate and host name against the system's trusted roots. Its parameters are
/// named as `redis-cli`'s flags:
///
/// - `cacert=PATH`: trust the authorities in this PEM file instead;
/// - `cert=PATH` and `key=PATH`: a client certificate and its key (mutual TLS);
/// - `sni=NAME`: the name sent as SNI and checked against the certificate, where it
///   is not the host connected to;
/// - `insecure=true`: encrypt without verifying the server (anyone on the path may
///   stand in for it, and would get the URL's password with `AUTH`; taken only as
///   written).
///
/// Each connection shakes hands once and is then pooled. Files are read when the
/// store is made, so a missing one fails [`new`](RedisStore::new). For anything
/// else (another crypto provider, pinned certificates, protocol versions), give a
/// whole configuration to [`with_tls_config`](RedisStore::with_tls_config).
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
    config: Arc<Config>,
    /// TLS settings, read once (`rediss://`, or [`with_tls_config`](RedisStore::with_tls_config)).
    tls: Option<Connector>,
    prefix: Arc<str>,
    timeout: Duration,
    max_connections: usize,
    wait_replicas: u32,
    /// What clones share: the connections, opened with `settings`, and where each
    /// command goes.
    settings: Arc<Settings>,
    router: Arc<Router>,
}

impl RedisStore {
    /// The key prefix used unless [`with_key_prefix`](RedisStore::with_key_prefix)
    /// sets another.
    pub const DEFAULT_KEY_PREFIX: &'static str = "session:";

    /// The timeout used unless [`with_timeout`](RedisStore::with_timeout) sets
    /// another.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    /// The most connections a store opens unless
    /// [`with_max_connections`](RedisStore::with_max_connections) sets another.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

    /// Makes a store for the Redis deployment `url` names: one server
    /// (`redis://127.0.0.1:6379`), a cluster (`redis-cluster://...`) or a primary
    /// behind sentinels (`redis-sentinel://...`), in any of the
    /// [forms above](RedisStore#urls).
    ///
    /// Nothing is connected yet: the first operation connects, so a program can
    /// start while Redis is still coming up.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if `url` is not a Redis URL this store can follow.
    pub fn new(url: &str) -> Result<Self> {
        let config = Config::parse(url)?;
        let tls = match &config.tls {
            Some(options) => Some(options.connector(&config.address)?),
            None => None,
        };
        let (timeout, max) = (Self::DEFAULT_TIMEOUT, Self::DEFAULT_MAX_CONNECTIONS);
        let wait_replicas = config.wait_replicas;
        let (settings, router) = connections(&config, tls.clone(), timeout, max, wait_replicas);
        Ok(Self {
            config: Arc::new(config),
            tls,
            prefix: Self::DEFAULT_KEY_PREFIX.into(),
            timeout,
            max_connections: max,
            wait_replicas,
            settings,
            router,
        })
    }

    /// Gives the store value connections of its own, opened with its settings as they
    /// now stand; clones made before keep theirs.
    fn reconnect(&mut self) {
        (self.settings, self.router) = connections(
            &self.config,
            self.tls.clone(),
            self.timeout,
            self.max_connections,
            self.wait_replicas,
        );
    }

    /// Returns the store connecting over TLS with `config`, whatever the URL's scheme:
    /// for what the URL's parameters cannot say (another crypto provider, a custom
    /// certificate verifier, session resumption settings, protocol versions). The
    /// server is reached by the URL's host, or by its `sni` parameter.
    ///
    /// The store value returned gets connections of its own; clones made before keep
    /// the old settings.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Backend`] if the store connects over a Unix socket, or if the
    /// host is neither a DNS name nor an IP address.
    pub fn with_tls_config(mut self, config: rustls::ClientConfig) -> Result<Self> {
        let server_name = self
            .config
            .tls
            .as_ref()
            .and_then(|tls| tls.server_name.as_deref());
        self.tls = Some(Connector::new(
            Arc::new(config),
            &self.config.address,
            server_name,
        )?);
        // Connections of its own: none opened before goes on without TLS.
        self.reconnect();
        Ok(self)
    }

    /// Returns the store putting its keys under `prefix`, so that several
    /// applications (or tests) can share one Redis database.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// Returns the store waiting at most `timeout` to connect and for each reply
    /// (kept between 1 ms and one day).
    ///
    /// The store value returned gets connections of its own; clones made before
    /// keep the old timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        let timeout = net::clamp_timeout(timeout);
        self.timeout = timeout;
        self.reconnect();
        self
    }

    /// Returns the store keeping at most `max` connections open to each server (at
    /// least 1; with `wait_replicas`, as many again for the writes that wait). A
    /// connection carries up to 64 commands in flight before another is opened; past
    /// `max` connections, commands queue on the least busy one.
    ///
    /// The store value returned gets connections of its own; clones made before keep
    /// the old ones.
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self.reconnect();
        self
    }

    /// Returns the store making each write wait until `replicas` replicas hold it,
    /// as the URL's `wait_replicas=N` does (0: no waiting). See
    /// [Acknowledged writes](RedisStore#acknowledged-writes-wait_replicas).
    ///
    /// The store value returned gets connections of its own; clones made before keep
    /// the old setting.
    pub fn with_wait_replicas(mut self, replicas: u32) -> Self {
        self.wait_replicas = replicas;
        self.reconnect();
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

/// What a store value's operations share: the settings of its connections, and
/// where its commands go.
fn connections(
    config: &Config,
    tls: Option<Connector>,
    timeout: Duration,
    max: usize,
    wait_replicas: u32,
) -> (Arc<Settings>, Arc<Router>) {
    let settings = Arc::new(Settings {
        auth: config.auth.clone(),
        db: config.db,
        timeout,
        max,
        wait_replicas,
        script_shas: Default::default(),
    });
    let router = Arc::new(Router::new(config, tls, Arc::clone(&settings)));
    (settings, router)
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

/// How many ids `create` draws before it gives up: a collision of random 128-bit ids
/// never happens twice in a row, so more means something answers for every key.
const MAX_CREATE_ATTEMPTS: usize = 8;

fn too_many_collisions() -> Error {
    Error::backend(format!(
        "every one of {MAX_CREATE_ATTEMPTS} new ids was taken: is the key prefix shared \
         with something that is not a session store?"
    ))
}

/// `Ok` with a reply to a command other than `want`.
fn unexpected(want: &str, reply: &Reply) -> Error {
    Error::backend(RespError::Protocol(format!("{want} answered {reply:?}")))
}

#[maybe_async::maybe_async]
impl SessionStore for RedisStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        let Some(ttl) = ttl_millis(record.expiry_date, OffsetDateTime::now_utc()) else {
            // Created already expired: it would never load, so nothing is written, but
            // its id must still be one that no other session holds.
            for _ in 0..MAX_CREATE_ATTEMPTS {
                let key = self.key(&record.id);
                let reply = self.call(&[b"EXISTS", key.as_bytes()]).await?;
                match reply {
                    Reply::Int(0) => return Ok(()),
                    Reply::Int(_) => record.id = random_id()?,
                    other => return Err(unexpected("EXISTS", &other)),
                }
            }
            return Err(too_many_collisions());
        };
        let ttl = ttl.to_string();
        for _ in 0..MAX_CREATE_ATTEMPTS {
            // Encoded for each id drawn: the value carries its key check. An owned
            // one carries a token too, by which a create sent again after its reply
            // was lost knows its own first copy (and leaves no session nobody holds).
            let token = match record.ownership {
                Some(_) => stored::write_token()?,
                None => [0; stored::TOKEN_LEN],
            };
            let key = self.key(&record.id);
            let filing = self.filing(record, &key);
            let bytes = encode_value(record, record.version, &token, filing.as_ref())?;
            let sent = match filing {
                None => {
                    self.write(&[b"SET", key.as_bytes(), &bytes, b"PX", ttl.as_bytes(), b"NX"])
                        .await?
                }
                Some(filing) => self.write_owned(&key, &bytes, &ttl, b"NX", &filing).await?,
            };
            match sent.reply {
                Reply::Status(_) | Reply::Int(1) => return self.replicated(&sent),
                // Sent again after a try that may have run: the key may hold the
                // first copy, byte for byte (an owned one knows it by its token).
                Reply::Nil if sent.resent && self.holds(&key, &bytes).await? => {
                    return self.replicated(&sent)
                }
                // The key exists: another session has this id.
                Reply::Nil | Reply::Int(0) => record.id = random_id()?,
                other => return Err(unexpected("SET NX", &other)),
            }
        }
        Err(too_many_collisions())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let key = self.key(&record.id);
        let sent = match ttl_millis(record.expiry_date, OffsetDateTime::now_utc()) {
            Some(ttl) => {
                let filing = self.filing(record, &key);
                let token = [0; stored::TOKEN_LEN];
                let bytes = encode_value(record, record.version, &token, filing.as_ref())?;
                let ttl = ttl.to_string();
                match filing {
                    None => {
                        self.write(&[b"SET", key.as_bytes(), &bytes, b"PX", ttl.as_bytes()])
                            .await?
                    }
                    Some(filing) => {
                        self.write_owned(&key, &bytes, &ttl, b"ANY", &filing)
                            .await?
                    }
                }
            }
            None => self.write(&[b"DEL", key.as_bytes()]).await?,
        };
        self.replicated(&sent)
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        let key = self.key(id);
        let reply = self.call(&[b"GET", key.as_bytes()]).await?;
        let bytes = match reply {
            Reply::Nil => return Ok(None),
            Reply::Bulk(bytes) => bytes,
            other => return Err(unexpected("GET", &other)),
        };
        let record = decode_value(id, &bytes)?;
        Ok(Some(record).filter(|r| !r.is_expired_at(OffsetDateTime::now_utc())))
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        let key = self.key(id);
        let sent = self.write(&[b"DEL", key.as_bytes()]).await?;
        self.replicated(&sent)
    }

    /// One server-side script, one round trip: atomic.
    ///
    /// The time that judges liveness, and the TTL, are read once a connection is in
    /// hand, as the command goes out. The value carries a random token of this
    /// write: sent again after its connection closed before the reply, the script
    /// recognises its own first copy, if that landed, and the write is `Written`;
    /// if another write came in between, the outcome cannot be told and the call
    /// fails rather than answer `Conflict`, which would have the caller apply its
    /// changes twice.
    async fn update(&self, record: &Record) -> Result<Update> {
        let next = record.version.wrapping_add(1);
        let token = stored::write_token()?;
        let (key, expected) = (self.key(&record.id), record.version.to_be_bytes());
        let filing = self.filing(record, &key);
        let value = encode_value(record, next, &token, filing.as_ref())?;
        let mut attempt = Attempt::new(self.timeout);
        let sent = loop {
            let now = OffsetDateTime::now_utc();
            let ttl = ttl_millis(record.expiry_date, now);
            let value: &[u8] = if ttl.is_some() { &value } else { b"" };
            let ttl = ttl.unwrap_or(0).to_string();
            let (secs, nanos) = (
                now.unix_timestamp().to_string(),
                now.nanosecond().to_string(),
            );
            let mut keys: Vec<&[u8]> = vec![key.as_bytes()];
            let mut args: Vec<&[u8]> = vec![
                &expected,
                value,
                ttl.as_bytes(),
                secs.as_bytes(),
                nanos.as_bytes(),
            ];
            if let Some(filing) = &filing {
                keys.push(filing.index.as_bytes());
                args.extend([filing.member.as_bytes(), filing.score.as_bytes()]);
            }
            let request = Request::Script(Script::Update, &keys, &args);
            let result = self.try_once(&mut attempt, &request, true).await;
            match result {
                Ok(sent) => break sent,
                Err(err) => self.router.recover(&mut attempt, err).await?,
            }
        };
        match sent.reply {
            Reply::Int(0) => Ok(Update::Gone),
            Reply::Int(1) if attempt.resent => Err(stored::unknown_outcome()),
            Reply::Int(1) => Ok(Update::Conflict),
            Reply::Int(2 | 3) => {
                self.replicated(&sent)?;
                Ok(Update::Written(next))
            }
            ref other => Err(unexpected("the update script", other)),
        }
    }

    fn atomic_update(&self) -> bool {
        true
    }

    /// `false` in a cluster, where an owner's index and its sessions would sit on
    /// different nodes.
    fn supports_owners(&self) -> bool {
        !self.router.is_cluster()
    }

    /// The owner's set, then the values of its live members (one round trip for
    /// each 256 members, or each megabyte of values); stale entries are removed.
    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        self.owners_supported()?;
        self.list_owned_now(owner).await
    }

    /// A listing, then one script that deletes each session still at the version
    /// read; read again when writes came in between.
    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        self.owners_supported()?;
        self.end_owned_now(owner, ending).await
    }
}

/// Where a write of an owned record files it: its owner's set, its member there,
/// and its score (expiry in Unix milliseconds); and the owner's digest its header
/// carries.
struct Filing {
    index: String,
    member: String,
    score: String,
    digest: [u8; owners::OWNER_DIGEST_LEN],
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
                "kind",
                &match self.config.kind {
                    Kind::Server => "server",
                    Kind::Cluster => "cluster",
                    Kind::Sentinel { .. } => "sentinel",
                },
            )
            .field("server", &format_args!("{}", self.config.address))
            .field("db", &self.config.db)
            .field("wait_replicas", &self.wait_replicas)
            .field("tls", &self.tls.is_some())
            .field("key_prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl RedisStore {
    /// Where a write of `record` files it, if it has an owner (and the store keeps
    /// owners). `key` is the record's: its member is the key's digest part.
    fn filing(&self, record: &Record, key: &str) -> Option<Filing> {
        let ownership = record.ownership.as_ref()?;
        if self.router.is_cluster() {
            return None;
        }
        let (index, digest) = self.owner_keys(&ownership.owner);
        Some(Filing {
            index,
            member: key[self.prefix.len()..].to_owned(),
            score: owners::unix_millis(record.expiry_date),
            digest,
        })
    }

    fn owners_supported(&self) -> Result<()> {
        if self.supports_owners() {
            return Ok(());
        }
        Err(Error::backend(crate::session_store::Unsupported {
            store: "RedisStore on a Redis Cluster",
            what: "session owners (an owner's index and its sessions would sit on \
                   different nodes)",
        }))
    }

    /// Fails if the write was sent with `WAIT` and fewer replicas than asked for
    /// acknowledged it.
    fn replicated(&self, sent: &Sent) -> Result<()> {
        let wanted = self.settings.wait_replicas;
        match &sent.replicas {
            None => Ok(()),
            Some(Ok(Reply::Int(acked))) if *acked >= i64::from(wanted) => Ok(()),
            Some(Ok(Reply::Int(acked))) => Err(Error::backend(RespError::Replicas {
                acked: *acked,
                wanted,
                waited: wait_for(self.timeout),
            })),
            Some(Ok(other)) => Err(unexpected("WAIT", other)),
            Some(Err(message)) => Err(Error::backend(RespError::Server(message.clone()))),
        }
    }

    /// The key a waiting write sets just before its `WAIT`, so that the `WAIT` has
    /// something of its own to wait for even when the write changed nothing (a `DEL`
    /// of a key already gone: its first copy's deletion may not have reached the
    /// replicas): on the node of `key`, in the same slot in a cluster.
    fn marker(&self, key: &[u8]) -> String {
        match &*self.router {
            Router::Cluster(_) => {
                let (slot, prefix) = (slot::of(key), &self.prefix);
                let tag = slot::tag(slot);
                let marker = format!("{prefix}replicated{{{tag}}}");
                if slot::of(marker.as_bytes()) == slot {
                    marker
                } else {
                    // A prefix with braces of its own would hash another tag.
                    format!("{{{tag}}}{prefix}replicated")
                }
            }
            _ => format!("{}replicated", self.prefix),
        }
    }
}

/// How long a write's `WAIT` waits for the replicas: half the timeout, so that its
/// answer comes well before the reply's own deadline, even from a loaded server (a
/// late answer would fail the write as a timeout, and take the server for lost).
fn wait_for(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_millis(1))
}

/// A command, or a script with its keys and arguments.
enum Request<'a> {
    Command(&'a [&'a [u8]]),
    Script(Script, &'a [&'a [u8]], &'a [&'a [u8]]),
}

impl Request<'_> {
    /// The key the command is about, which routes it: every command of the store
    /// names its key first.
    fn key(&self) -> &[u8] {
        match self {
            Self::Command(args) => args.get(1).copied().unwrap_or_default(),
            Self::Script(_, keys, _) => keys.first().copied().unwrap_or_default(),
        }
    }
}

/// What a command answered, and, for a write sent with `WAIT`, what that answered.
struct Sent {
    reply: Reply,
    replicas: Option<resp::Answer>,
    /// The command went out again after a try that may have run it.
    resent: bool,
}

#[maybe_async::maybe_async]
impl RedisStore {
    /// Writes an owned record (`mode`: `NX` to create, `ANY` to save) and files it,
    /// in one script round trip.
    async fn write_owned(
        &self,
        key: &str,
        value: &[u8],
        ttl: &str,
        mode: &[u8],
        filing: &Filing,
    ) -> Result<Sent> {
        let now = owners::unix_millis(OffsetDateTime::now_utc());
        let keys: [&[u8]; 2] = [key.as_bytes(), filing.index.as_bytes()];
        let args: [&[u8]; 6] = [
            value,
            ttl.as_bytes(),
            mode,
            filing.member.as_bytes(),
            filing.score.as_bytes(),
            now.as_bytes(),
        ];
        Ok(self
            .run(&Request::Script(Script::WriteOwned, &keys, &args), true)
            .await?)
    }

    /// Runs a script that reads or writes nothing the replicas must hold.
    async fn script(&self, script: Script, keys: &[&[u8]], args: &[&[u8]]) -> Result<Reply> {
        let sent = self
            .run(&Request::Script(script, keys, args), false)
            .await?;
        Ok(sent.reply)
    }

    /// `true` if `key` holds `value`, byte for byte.
    async fn holds(&self, key: &str, value: &[u8]) -> Result<bool> {
        let reply = self.call(&[b"GET", key.as_bytes()]).await?;
        Ok(matches!(reply, Reply::Bulk(held) if held == value))
    }

    /// Runs one command that reads; an error reply is an error.
    async fn call(&self, args: &[&[u8]]) -> Result<Reply> {
        let sent = self.run(&Request::Command(args), false).await?;
        Ok(sent.reply)
    }

    /// Runs one command that writes, waiting for replicas when the store does.
    async fn write(&self, args: &[&[u8]]) -> Result<Sent> {
        Ok(self.run(&Request::Command(args), true).await?)
    }

    /// Runs `request` where its key lives, trying again as
    /// [`Router::recover`] decides.
    ///
    /// On one server, a command whose shared connection the server closed before the
    /// reply (it restarted, or dropped idle clients) runs once more on a new one; on
    /// a cluster or behind sentinels, a command whose connection failed runs again
    /// until the deadline. The command may have run or not: a server that restarted
    /// under a busy connection ran some of the commands pipelined on it. Were it to
    /// run twice: `GET`, `DEL`, `EXISTS` and a plain `SET` are idempotent; a
    /// `SET NX` whose first copy did land finds its key taken, and `create`, seeing
    /// the reply to a command sent again ([`Sent::resent`]), takes the key's value,
    /// byte for byte its own, as its first copy; the owned create and `update`
    /// recognise their first copy by its token.
    async fn run(
        &self,
        request: &Request<'_>,
        write: bool,
    ) -> std::result::Result<Sent, RespError> {
        let mut attempt = Attempt::new(self.timeout);
        loop {
            match self.try_once(&mut attempt, request, write).await {
                Ok(sent) => {
                    return Ok(Sent {
                        resent: attempt.resent,
                        ..sent
                    })
                }
                Err(err) => self.router.recover(&mut attempt, err).await?,
            }
        }
    }

    /// One try of `request`: to the node its key's slot (or an `ASK`) names, on one
    /// of its connections; a write with `WAIT` behind it when the store waits for
    /// replicas.
    async fn try_once(
        &self,
        attempt: &mut Attempt,
        request: &Request<'_>,
        write: bool,
    ) -> std::result::Result<Sent, RespError> {
        let asked = attempt.start();
        let asking = asked.is_some();
        let node = match asked {
            Some(node) => node,
            None => self.router.route(request.key(), attempt).await?,
        };
        attempt.reached(&node);
        let waits = write && self.settings.wait_replicas > 0;
        let pool = if waits { &node.waiting } else { &node.shared };
        let (mux, opened) = pool.connection().await?;
        attempt.connected(&mux, opened, waits);
        let marker = waits.then(|| self.marker(request.key()));
        let mut by_digest = match request {
            Request::Script(script, ..) => self.settings.script_shas[*script as usize].get(),
            Request::Command(_) => None,
        };
        loop {
            let result = self
                .send(
                    &mux,
                    request,
                    by_digest.map(String::as_str),
                    asking,
                    marker.as_deref(),
                )
                .await;
            match result {
                // The server has forgotten the script: send it whole.
                Err(err) if by_digest.is_some() && err.is_no_script() => by_digest = None,
                other => return other,
            }
        }
    }

    /// Sends `request` on `mux`: a script by its digest (`sha`) or whole; after
    /// `ASKING` when `asking`; followed by a `SET` of `marker` and `WAIT` when
    /// given a marker.
    async fn send(
        &self,
        mux: &Mux,
        request: &Request<'_>,
        sha: Option<&str>,
        asking: bool,
        marker: Option<&str>,
    ) -> std::result::Result<Sent, RespError> {
        let count;
        let mut script_command: Vec<&[u8]> = Vec::new();
        let command: &[&[u8]] = match request {
            Request::Command(args) => args,
            Request::Script(script, keys, args) => {
                count = keys.len().to_string();
                script_command.reserve(3 + keys.len() + args.len());
                match sha {
                    Some(sha) => script_command.extend([&b"EVALSHA"[..], sha.as_bytes()]),
                    None => script_command.extend([&b"EVAL"[..], script.source().as_bytes()]),
                }
                script_command.push(count.as_bytes());
                script_command.extend_from_slice(keys);
                script_command.extend_from_slice(args);
                &script_command
            }
        };
        if !asking && marker.is_none() {
            let reply = mux.call(command).await?;
            return Ok(Sent {
                reply,
                replicas: None,
                resent: false,
            });
        }
        let (replicas, millis) = (
            self.settings.wait_replicas.to_string(),
            wait_for(self.timeout).as_millis().to_string(),
        );
        // `ASKING` lets only the next command in, so the marker, in the same slot,
        // needs its own.
        let asking_command: &[&[u8]] = &[b"ASKING"];
        let mut commands: Vec<&[&[u8]]> = Vec::with_capacity(5);
        if asking {
            commands.push(asking_command);
        }
        commands.push(command);
        let set_marker: [&[u8]; 5];
        let wait: [&[u8]; 3];
        if let Some(marker) = marker {
            set_marker = [b"SET", marker.as_bytes(), b"1", b"PX", b"60000"];
            wait = [b"WAIT", replicas.as_bytes(), millis.as_bytes()];
            if asking {
                commands.push(asking_command);
            }
            commands.extend([&set_marker[..], &wait[..]]);
        }
        let mut answers = mux.call_many(&commands).await?.into_iter();
        if asking {
            answers.next();
        }
        let reply = answers
            .next()
            .ok_or_else(|| RespError::Protocol("a reply went missing".into()))?
            .map_err(RespError::Server)?;
        // The `WAIT`'s answer comes last; the marker's says nothing it does not.
        let replicas = marker.and_then(|_| answers.last());
        Ok(Sent {
            reply,
            replicas,
            resent: false,
        })
    }
}

impl From<RespError> for Error {
    fn from(err: RespError) -> Self {
        Error::backend(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiting write's marker goes to the node and slot of its key, whatever
    /// braces the prefix holds, so that the `WAIT` after it waits for a write on
    /// that node.
    #[test]
    fn markers_share_their_writes_slot() {
        for prefix in ["session:", "", "app{", "{tenant}:", "a}b{", "{}", "x{y"] {
            let store = RedisStore::new("redis-cluster://127.0.0.1:7000")
                .unwrap()
                .with_key_prefix(prefix);
            for n in 0..200u32 {
                let key = format!(
                    "{prefix}{:064x}",
                    u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                );
                let marker = store.marker(key.as_bytes());
                assert_eq!(
                    slot::of(marker.as_bytes()),
                    slot::of(key.as_bytes()),
                    "{prefix:?}: {marker} for {key}"
                );
            }
        }
        let one = RedisStore::new("redis://127.0.0.1").unwrap();
        assert_eq!(one.marker(b"session:ab"), "session:replicated");
    }
}
