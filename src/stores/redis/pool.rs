//! The connections to one Redis server: shared by concurrent callers, pipelined,
//! opened on demand and kept open.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use super::{
    config::Auth,
    mux::{Mux, Standing},
    resp::{Conn, Reply, RespError},
    Script,
};
use crate::stores::{net::Address, tls::Connector};

/// What every connection of a store is opened with, whichever server it goes to.
pub(crate) struct Settings {
    pub(crate) auth: Auth,
    /// The database `SELECT`ed (0 in a cluster, where it is the only one).
    pub(crate) db: u32,
    pub(crate) timeout: Duration,
    /// The most connections to one server, in each of a node's two pools.
    pub(crate) max: usize,
    /// How many replicas each write waits for (0: none).
    pub(crate) wait_replicas: u32,
    /// The SHA-1 digest of each [`Script`], once a server told it.
    pub(crate) script_shas: [OnceLock<String>; Script::ALL.len()],
}

/// One server: its address, and its connections.
pub(crate) struct Node {
    pub(crate) address: Address,
    /// Connections for every command but the writes that wait for replicas: up to
    /// 64 commands in flight on each.
    pub(crate) shared: Pool,
    /// Connections for writes followed by `WAIT`, which holds up every command behind
    /// it on its connection until the replicas answer: one write at a time on each,
    /// so that a slow replica never stalls a read.
    pub(crate) waiting: Pool,
}

impl Node {
    pub(crate) fn new(
        address: Address,
        tls: Option<Connector>,
        settings: &Arc<Settings>,
    ) -> Arc<Self> {
        let pool = |depth| Pool {
            address: address.clone(),
            tls: tls.clone(),
            settings: Arc::clone(settings),
            depth,
            conns: parking_lot::Mutex::default(),
            opening: OpeningLock::default(),
            failed: AtomicU64::new(0),
            last_failure: parking_lot::Mutex::default(),
        };
        Arc::new(Self {
            shared: pool(PIPELINE_DEPTH),
            waiting: pool(1),
            address,
        })
    }
}

/// Open connections to one server, each shared by the operations in flight on it.
pub(crate) struct Pool {
    address: Address,
    tls: Option<Connector>,
    settings: Arc<Settings>,
    /// How many commands may be in flight on one connection before another is opened.
    depth: usize,
    conns: parking_lot::Mutex<Vec<Arc<Mux>>>,
    /// Held while a connection is opened, so that callers arriving meanwhile wait for
    /// it rather than each opening their own.
    opening: OpeningLock,
    /// How many attempts to connect failed, and the last one's error: callers that
    /// waited for an attempt that failed fail with it, instead of each waiting out a
    /// timeout of its own in turn.
    failed: AtomicU64,
    last_failure: parking_lot::Mutex<Option<RespError>>,
}

#[cfg(feature = "sync")]
pub(crate) type OpeningLock = parking_lot::Mutex<()>;
#[cfg(not(feature = "sync"))]
pub(crate) type OpeningLock = async_lock::Mutex<()>;

/// How many commands may be in flight on one connection before another is opened
/// (up to the store's maximum): enough to pipeline the commands of many concurrent
/// callers on one connection, which is what makes them cheap.
const PIPELINE_DEPTH: usize = 64;

/// A connection handed out by a pool: in a pool that never shares one, the
/// holder's alone until this is dropped.
pub(crate) struct Lease {
    mux: Arc<Mux>,
    exclusive: bool,
}

impl Lease {
    fn shared(mux: Arc<Mux>) -> Self {
        Self {
            mux,
            exclusive: false,
        }
    }
}

impl std::ops::Deref for Lease {
    type Target = Arc<Mux>;

    fn deref(&self) -> &Arc<Mux> {
        &self.mux
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.exclusive {
            self.mux.release();
        }
    }
}

/// What [`Pool::pick`] found.
enum Pick {
    Use(Lease),
    /// None fits, and another may be opened.
    Open,
    /// Every connection of a pool that never shares one is busy, and no more may be
    /// opened.
    Full,
}

impl Pool {
    /// A connection to send a command on, if one fits: the first with room in its
    /// pipeline, or, when no more may be opened, the least busy (never a busy one
    /// of a pool of single commands: a `WAIT` queued behind another would be
    /// answered past its deadline). Broken connections and those idle too long are
    /// closed on the way.
    fn pick(&self) -> Pick {
        let mut conns = self.conns.lock();
        let mut least: Option<(usize, usize)> = None;
        let mut at = 0;
        while at < conns.len() {
            match conns[at].standing() {
                Standing::Retired => {
                    conns.swap_remove(at);
                    continue;
                }
                // One of a pool that never shares: free, and taken here, under the
                // pool's lock, before another caller can choose it.
                Standing::InFlight(0) if self.depth == 1 => {
                    if conns[at].lease() {
                        return Pick::Use(Lease {
                            mux: Arc::clone(&conns[at]),
                            exclusive: true,
                        });
                    }
                }
                // Commands in flight and no holder: its caller's future was dropped
                // before the reply, and nobody will read it. Closed.
                Standing::InFlight(_) if self.depth == 1 && conns[at].lease() => {
                    conns.swap_remove(at);
                    continue;
                }
                Standing::InFlight(n) if n < self.depth => {
                    return Pick::Use(Lease::shared(Arc::clone(&conns[at])))
                }
                Standing::InFlight(n) => {
                    if least.is_none_or(|(_, fewest)| n < fewest) {
                        least = Some((at, n));
                    }
                }
            }
            at += 1;
        }
        if conns.len() < self.settings.max {
            return Pick::Open;
        }
        match least {
            _ if self.depth == 1 => Pick::Full,
            Some((at, _)) => Pick::Use(Lease::shared(Arc::clone(&conns[at]))),
            None => Pick::Open,
        }
    }

    /// Stops handing out `mux`: it failed as a connection the server closed does.
    pub(crate) fn retire(&self, mux: &Arc<Mux>) {
        self.conns.lock().retain(|conn| !Arc::ptr_eq(conn, mux));
    }

    /// Closes every connection (they still answer what is in flight on them): the
    /// server is no longer the one to ask.
    pub(crate) fn retire_all(&self) {
        self.conns.lock().clear();
    }
}

#[maybe_async::maybe_async]
impl Pool {
    /// A connection to send a command on: a shared one, or a new one (then `true`)
    /// when none fits. Callers that come while one is opened wait for it; if it fails,
    /// they fail with the same error. In a pool that never shares a connection, a
    /// caller waits (within the timeout) for one to be free when no more may be
    /// opened.
    pub(crate) async fn connection(&self) -> Result<(Lease, bool), RespError> {
        let mut full_since = None;
        loop {
            if let Some(found) = self.try_connection().await {
                return found;
            }
            let since = *full_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.settings.timeout {
                return Err(RespError::Protocol(format!(
                    "all {} connections to {} for writes that wait for replicas stayed \
                     busy for {:?}: the replicas acknowledge slowly, or more such writes \
                     come at once than the store's maximum of connections",
                    self.settings.max, self.address, self.settings.timeout
                )));
            }
            pause(Duration::from_millis(1)).await;
        }
    }

    /// [`connection`](Pool::connection), or `None` when the pool is full.
    async fn try_connection(&self) -> Option<Result<(Lease, bool), RespError>> {
        match self.pick() {
            Pick::Use(mux) => return Some(Ok((mux, false))),
            Pick::Full => return None,
            Pick::Open => {}
        }
        let failed_before = self.failed.load(Ordering::Acquire);
        let _opening = self.opening.lock().await;
        match self.pick() {
            Pick::Use(mux) => return Some(Ok((mux, false))),
            Pick::Full => return None,
            Pick::Open => {}
        }
        Some(self.open_one(failed_before).await)
    }

    /// Opens a connection for the pool, unless an attempt made since
    /// `failed_before` failed: then fails with its error.
    async fn open_one(&self, failed_before: u64) -> Result<(Lease, bool), RespError> {
        if self.failed.load(Ordering::Acquire) != failed_before {
            if let Some(error) = self.last_failure.lock().as_ref() {
                return Err(error.duplicate());
            }
        }
        match self.open().await {
            Ok(mux) => {
                let mux = Arc::new(mux);
                // Leased before another caller can see it.
                let exclusive = self.depth == 1 && mux.lease();
                self.conns.lock().push(Arc::clone(&mux));
                Ok((Lease { mux, exclusive }, true))
            }
            Err(error) => {
                *self.last_failure.lock() = Some(error.duplicate());
                self.failed.fetch_add(1, Ordering::AcqRel);
                Err(error)
            }
        }
    }

    /// Opens a connection. Until the store knows its scripts' digests, it loads the
    /// scripts to learn them, in one round trip.
    async fn open(&self) -> Result<Mux, RespError> {
        let settings = &*self.settings;
        let mut conn = Conn::connect(
            &self.address,
            &settings.auth,
            settings.db,
            self.tls.as_ref(),
            settings.timeout,
        )
        .await?;
        let unknown: Vec<Script> = Script::ALL
            .into_iter()
            .filter(|script| settings.script_shas[*script as usize].get().is_none())
            .collect();
        if !unknown.is_empty() {
            // Learn the digests once; scripts are sent whole until then, and
            // whenever the server has not seen them.
            for script in &unknown {
                conn.push(&[b"SCRIPT", b"LOAD", script.source().as_bytes()]);
            }
            for (script, loaded) in unknown.iter().zip(conn.call_all().await?) {
                match loaded {
                    Ok(Reply::Bulk(sha)) => {
                        if let Ok(sha) = String::from_utf8(sha) {
                            let _ = settings.script_shas[*script as usize].set(sha);
                        }
                    }
                    // A server (or proxy) that refuses `SCRIPT` still runs `EVAL`:
                    // the connection is in step, and the operation goes on.
                    Ok(other) => log::warn!("Redis answered SCRIPT LOAD with {other:?}"),
                    Err(message) => {
                        log::warn!("Redis refused SCRIPT LOAD ({message}): scripts are sent whole")
                    }
                }
            }
        }
        Ok(Mux::new(conn.into_socket(), settings.timeout))
    }
}

/// Servers asked in turn for the topology (a cluster's seed nodes, the sentinels),
/// those that last failed put last, so that the next lookup starts with another.
pub(crate) struct Rotation(parking_lot::Mutex<Vec<Address>>);

impl Rotation {
    pub(crate) fn new(addresses: Vec<Address>) -> Self {
        Self(parking_lot::Mutex::new(addresses))
    }

    /// The addresses, in the order to ask them.
    pub(crate) fn order(&self) -> Vec<Address> {
        self.0.lock().clone()
    }

    pub(crate) fn contains(&self, address: &Address) -> bool {
        self.0.lock().contains(address)
    }

    /// Adds those not known yet, last.
    pub(crate) fn learn(&self, others: Vec<Address>) {
        let mut known = self.0.lock();
        for other in others {
            if !known.contains(&other) {
                known.push(other);
            }
        }
    }

    /// `address` failed: it is asked last from now on.
    pub(crate) fn failed(&self, address: &Address) {
        let mut addresses = self.0.lock();
        if let Some(at) = addresses.iter().position(|known| known == address) {
            let failed = addresses.remove(at);
            addresses.push(failed);
        }
    }
}

/// The nodes a store has met (cluster nodes, primaries a sentinel named), by
/// address: a node's connections outlive a change of topology that keeps it.
pub(crate) struct Nodes {
    tls: Option<Connector>,
    settings: Arc<Settings>,
    nodes: parking_lot::Mutex<std::collections::HashMap<Address, Arc<Node>>>,
}

impl Nodes {
    pub(crate) fn new(tls: Option<Connector>, settings: Arc<Settings>) -> Self {
        Self {
            tls,
            settings,
            nodes: parking_lot::Mutex::default(),
        }
    }

    /// The TLS settings for the server at `address`, if TLS is on.
    pub(crate) fn tls_to(&self, address: &Address) -> Result<Option<Connector>, RespError> {
        self.tls
            .as_ref()
            .map(|tls| tls.to(address))
            .transpose()
            .map_err(|err| RespError::Protocol(format!("{address}: {err}")))
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The node at `address`, met before or new.
    pub(crate) fn get(&self, address: &Address) -> Result<Arc<Node>, RespError> {
        let mut nodes = self.nodes.lock();
        if let Some(node) = nodes.get(address) {
            return Ok(Arc::clone(node));
        }
        let node = Node::new(address.clone(), self.tls_to(address)?, &self.settings);
        nodes.insert(address.clone(), Arc::clone(&node));
        Ok(node)
    }
}

/// Waits `duration`, blocking the thread (sync mode) or the task.
#[cfg(feature = "sync")]
pub(crate) fn pause(duration: Duration) {
    std::thread::sleep(duration);
}

/// Waits `duration`, blocking the thread (sync mode) or the task.
#[cfg(not(feature = "sync"))]
pub(crate) async fn pause(duration: Duration) {
    async_io::Timer::after(duration).await;
}
