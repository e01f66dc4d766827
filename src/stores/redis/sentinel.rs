//! Redis Sentinel: the primary found through the sentinels, and found again after a
//! failover.
//!
//! Each sentinel is asked in turn (`SENTINEL get-master-addr-by-name`), skipping
//! those that do not answer; the primary it names is confirmed with `ROLE` before
//! it is used, since a sentinel may not have seen a failover yet. The sentinels'
//! own list is refreshed from the one that answered (`SENTINEL sentinels`). The
//! primary is looked up again when a command on it fails with a connection error or
//! `READONLY` (it was demoted).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use super::{
    config::Auth,
    pool::{Node, Nodes, OpeningLock, Rotation, Settings},
    resp::{Conn, Reply, RespError},
};
use crate::stores::{net::Address, tls::Connector};

/// A primary watched by sentinels, shared by clones of a store.
pub(crate) struct Sentinel {
    service: String,
    /// The sentinels' own credentials.
    auth: Auth,
    sentinels: Rotation,
    primary: parking_lot::RwLock<Option<Arc<Node>>>,
    nodes: Nodes,
    /// Held while the primary is looked up, so that callers arriving meanwhile wait
    /// for that answer instead of each asking the sentinels.
    finding: OpeningLock,
    /// How many lookups ended, and how the last one failed (`None`: it found the
    /// primary): a caller that waited for a lookup takes its outcome instead of
    /// asking every sentinel again in turn.
    generation: AtomicU64,
    last_failure: parking_lot::Mutex<Option<RespError>>,
}

impl Sentinel {
    pub(crate) fn new(
        sentinels: Vec<Address>,
        service: String,
        auth: Auth,
        tls: Option<Connector>,
        settings: Arc<Settings>,
    ) -> Self {
        Self {
            service,
            auth,
            sentinels: Rotation::new(sentinels),
            primary: parking_lot::RwLock::new(None),
            nodes: Nodes::new(tls, settings),
            finding: OpeningLock::default(),
            generation: AtomicU64::new(0),
            last_failure: parking_lot::Mutex::new(None),
        }
    }

    /// A command on `node` found it down or demoted: the next command asks the
    /// sentinels again (unless another already did).
    pub(crate) fn lost(&self, node: &Arc<Node>) {
        let mut primary = self.primary.write();
        if primary.as_ref().is_some_and(|p| Arc::ptr_eq(p, node)) {
            *primary = None;
            node.shared.retire_all();
            node.waiting.retire_all();
        }
    }
}

#[maybe_async::maybe_async]
impl Sentinel {
    /// The primary, looked up when not known (asking no more sentinels once
    /// `deadline` has passed).
    pub(crate) async fn primary(&self, deadline: Instant) -> Result<Arc<Node>, RespError> {
        if let Some(primary) = self.primary.read().as_ref() {
            return Ok(Arc::clone(primary));
        }
        let seen = self.generation.load(Ordering::Acquire);
        let _finding = self.finding.lock().await;
        if let Some(primary) = self.primary.read().as_ref() {
            return Ok(Arc::clone(primary));
        }
        if self.generation.load(Ordering::Acquire) != seen {
            if let Some(err) = self.last_failure.lock().as_ref() {
                return Err(err.duplicate());
            }
        }
        let found = self.find(deadline).await;
        if let Ok(node) = &found {
            *self.primary.write() = Some(Arc::clone(node));
        }
        *self.last_failure.lock() = found.as_ref().err().map(RespError::duplicate);
        self.generation.fetch_add(1, Ordering::AcqRel);
        found
    }

    /// Asks the sentinels in turn for the primary, and confirms it, until one
    /// answers. Once `deadline` has passed by a timeout, no other sentinel is asked;
    /// a sentinel that failed goes last, so that the next lookup starts with
    /// another.
    async fn find(&self, deadline: Instant) -> Result<Arc<Node>, RespError> {
        let limit = deadline.checked_add(self.nodes.settings().timeout);
        let sentinels = self.sentinels.order();
        let mut last = None;
        for sentinel in &sentinels {
            if last.is_some() && limit.is_some_and(|limit| Instant::now() >= limit) {
                break;
            }
            match self.ask(sentinel).await {
                Ok((primary, others)) => {
                    // The other sentinels it knows of are asked too.
                    self.sentinels.learn(others);
                    match self.confirm(&primary).await {
                        Ok(node) => return Ok(node),
                        Err(err) => {
                            // It named a primary that is not one: ask another first.
                            self.sentinels.failed(sentinel);
                            last = Some(err);
                        }
                    }
                }
                Err(err) => {
                    log::debug!("sentinel {sentinel}: {err}");
                    self.sentinels.failed(sentinel);
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| RespError::Protocol("no sentinel to ask".into())))
    }

    /// Asks `sentinel` where the primary is, and which other sentinels watch it.
    async fn ask(&self, sentinel: &Address) -> Result<(Address, Vec<Address>), RespError> {
        let settings = self.nodes.settings();
        let tls = self.nodes.tls_to(sentinel)?;
        let mut conn =
            Conn::connect(sentinel, &self.auth, 0, tls.as_ref(), settings.timeout).await?;
        let service = self.service.as_bytes();
        conn.push(&[b"SENTINEL", b"get-master-addr-by-name", service]);
        conn.push(&[b"SENTINEL", b"sentinels", service]);
        let mut answers = conn.call_all().await?.into_iter();
        let primary = match answers.next() {
            Some(Ok(Reply::Array(items))) => match items.as_slice() {
                [Reply::Bulk(host), Reply::Bulk(port)] => address(host, port),
                _ => None,
            },
            Some(Ok(Reply::Nil)) => {
                return Err(RespError::Protocol(format!(
                    "sentinel {sentinel} watches no primary named {:?}",
                    self.service
                )))
            }
            Some(Err(message)) => return Err(RespError::Server(message)),
            _ => None,
        }
        .ok_or_else(|| {
            RespError::Protocol(format!("sentinel {sentinel} named the primary unreadably"))
        })?;
        // The other sentinels: a list of field-value lists, `ip` and `port` among them.
        let mut others = Vec::new();
        if let Some(Ok(Reply::Array(entries))) = answers.next() {
            for entry in entries {
                let Reply::Array(fields) = entry else {
                    continue;
                };
                let field = |name: &[u8]| {
                    fields.chunks(2).find_map(|pair| match pair {
                        [Reply::Bulk(key), Reply::Bulk(value)] if key == name => Some(value),
                        _ => None,
                    })
                };
                if let Some(other) = field(b"ip")
                    .zip(field(b"port"))
                    .and_then(|(h, p)| address(h, p))
                {
                    others.push(other);
                }
            }
        }
        Ok((primary, others))
    }

    /// The node at `address`, once it says it is a primary.
    async fn confirm(&self, address: &Address) -> Result<Arc<Node>, RespError> {
        let node = self.nodes.get(address)?;
        let (mux, _) = node.shared.connection().await?;
        let role = mux.call(&[b"ROLE"]).await;
        match role {
            Ok(Reply::Array(items)) if items.first() == Some(&Reply::Bulk(b"master".to_vec())) => {
                Ok(node)
            }
            Ok(_) => Err(RespError::Protocol(format!(
                "the sentinels named {address} as the primary, and it is not one (yet)"
            ))),
            Err(err) => {
                node.shared.retire(&mux);
                Err(err)
            }
        }
    }
}

fn address(host: &[u8], port: &[u8]) -> Option<Address> {
    let host = std::str::from_utf8(host).ok()?;
    let port = crate::stores::net::parse_port(std::str::from_utf8(port).ok()?)?;
    Some(Address::Tcp(host.to_owned(), port))
}
