//! Which server a command goes to, and what to do when it fails there: one server,
//! a cluster's node for the key's slot, or the primary the sentinels name.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    cluster::{slot, Cluster},
    config::{Config, Kind},
    mux::Mux,
    pool::{pause, Node, Settings},
    resp::RespError,
    sentinel::Sentinel,
};
use crate::stores::{net::Address, tls::Connector};

/// Where commands go.
pub(crate) enum Router {
    /// One server.
    Server(Arc<Node>),
    /// The node serving each key's slot.
    Cluster(Cluster),
    /// The primary the sentinels name.
    Sentinel(Sentinel),
}

impl Router {
    pub(crate) fn new(config: &Config, tls: Option<Connector>, settings: Arc<Settings>) -> Self {
        match &config.kind {
            Kind::Server => Self::Server(Node::new(config.address.clone(), tls, &settings)),
            Kind::Cluster => Self::Cluster(Cluster::new(
                config.addresses().cloned().collect(),
                tls,
                settings,
            )),
            Kind::Sentinel { service, auth } => Self::Sentinel(Sentinel::new(
                config.addresses().cloned().collect(),
                service.clone(),
                auth.clone(),
                tls,
                settings,
            )),
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// The most tries of one operation (redirections and retries), whatever the time
/// left: a cluster that keeps redirecting in a loop is broken.
const MAX_TRIES: u32 = 32;

/// One operation's tries, until it succeeds or its time runs out.
pub(crate) struct Attempt {
    /// Retries after failures stop here (a redirection is followed while tries are
    /// left): about the store's timeout after the operation began.
    deadline: Instant,
    tries: u32,
    /// `true` once the command went out again after a try that may have run it.
    pub(crate) resent: bool,
    /// Where an `ASK` sent the next try.
    ask: Option<Arc<Node>>,
    /// The node, and the connection (whether just opened, and whether from the
    /// waiting pool), of the last try, as far as it got.
    node: Option<Arc<Node>>,
    conn: Option<(Arc<Mux>, bool, bool)>,
}

impl Attempt {
    pub(crate) fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            deadline: now.checked_add(timeout).unwrap_or(now),
            tries: 0,
            resent: false,
            ask: None,
            node: None,
            conn: None,
        }
    }

    /// Starts a try: the node an `ASK` named (then `true`: send `ASKING` first), or
    /// none (route by the key).
    pub(crate) fn start(&mut self) -> Option<Arc<Node>> {
        self.node = None;
        self.conn = None;
        self.ask.take()
    }

    pub(crate) fn reached(&mut self, node: &Arc<Node>) {
        self.node = Some(Arc::clone(node));
    }

    pub(crate) fn connected(&mut self, mux: &Arc<Mux>, opened: bool, waiting: bool) {
        self.conn = Some((Arc::clone(mux), opened, waiting));
    }

    /// How long to wait before the next try: growing, within the time left.
    fn backoff(&self) -> Duration {
        let grown = Duration::from_millis(10) * (1 << self.tries.min(6));
        grown
            .min(self.deadline.saturating_duration_since(Instant::now()))
            .min(Duration::from_millis(500))
    }
}

#[maybe_async::maybe_async]
impl Router {
    /// The node to send a command about `key` to, in `attempt`: the topology is
    /// looked up (when it must be) until the attempt's deadline.
    pub(crate) async fn route(
        &self,
        key: &[u8],
        attempt: &Attempt,
    ) -> Result<Arc<Node>, RespError> {
        match self {
            Self::Server(node) => Ok(Arc::clone(node)),
            Self::Cluster(cluster) => cluster.node_for(slot::of(key), attempt.deadline).await,
            Self::Sentinel(sentinel) => sentinel.primary(attempt.deadline).await,
        }
    }

    /// Decides, after a try failed with `err`, whether to try again (`Ok`, once any
    /// pause is over) or fail with `err`.
    ///
    /// - `MOVED` and `ASK` (a cluster): to the node named, at once.
    /// - One server: only a command whose shared connection the server closed before
    ///   the reply goes once more, on a new connection.
    /// - A cluster or a primary behind sentinels: a connection that failed, a
    ///   `READONLY` (a demoted primary), `TRYAGAIN`, `CLUSTERDOWN`, `LOADING` and
    ///   `MASTERDOWN` look the topology up again and try again after a pause, until
    ///   the deadline.
    pub(crate) async fn recover(
        &self,
        attempt: &mut Attempt,
        err: RespError,
    ) -> Result<(), RespError> {
        attempt.tries += 1;
        let node = attempt.node.take();
        let conn = attempt.conn.take();
        let out_of_tries = attempt.tries >= MAX_TRIES;
        if let (Self::Cluster(cluster), Some(redirect)) = (self, err.redirect()) {
            if out_of_tries {
                return Err(err);
            }
            let address = match (&redirect.address, &node) {
                // No endpoint named: the node that answered, on the port named.
                (Address::Tcp(host, port), Some(node)) if host.is_empty() => match &node.address {
                    Address::Tcp(asked, _) => Address::Tcp(asked.clone(), *port),
                    #[cfg(unix)]
                    Address::Unix(_) => return Err(err),
                },
                (address, _) => address.clone(),
            };
            let target = cluster.node(&address)?;
            if redirect.moved {
                cluster.moved(redirect.slot, &target);
            } else {
                attempt.ask = Some(target);
            }
            return Ok(());
        }
        let broken = matches!(err, RespError::Io(_));
        if let (Some(node), Some((mux, _, waiting))) = (&node, &conn) {
            if broken {
                let pool = if *waiting {
                    &node.waiting
                } else {
                    &node.shared
                };
                pool.retire(mux);
            }
        }
        let out_of_time = out_of_tries || Instant::now() >= attempt.deadline;
        match self {
            Self::Server(_) => {
                // A shared connection the server closed before the reply (it
                // restarted, or dropped idle clients): once more on a new one.
                let reused = conn.as_ref().is_some_and(|(_, opened, _)| !opened);
                if reused && !attempt.resent && err.closed_before_reply() {
                    attempt.resent = true;
                    return Ok(());
                }
                Err(err)
            }
            Self::Cluster(_) | Self::Sentinel(_) => {
                let retry = match &err {
                    RespError::Io(_) => true,
                    RespError::Server(_) => err.is_transient() || err.is_read_only(),
                    // The topology could not be read: a failover under way.
                    RespError::Protocol(_) => conn.is_none(),
                    RespError::Replicas { .. } => false,
                };
                if !retry || out_of_time {
                    return Err(err);
                }
                let moved_on = broken || err.is_read_only() || err.is_transient();
                match self {
                    Self::Cluster(cluster) if moved_on => cluster.mark_stale(),
                    Self::Sentinel(sentinel) if broken || err.is_read_only() => {
                        if let Some(node) = &node {
                            sentinel.lost(node);
                        }
                    }
                    _ => {}
                }
                // A command that went out may have run.
                if broken && conn.is_some() {
                    attempt.resent = true;
                }
                log::debug!("Redis: {err}; trying again");
                pause(attempt.backoff()).await;
                Ok(())
            }
        }
    }
}
