//! Redis Cluster: which node serves a key, learnt from the nodes and corrected by
//! their redirections.
//!
//! The slot map comes from `CLUSTER SLOTS`, asked of the nodes known (the primaries
//! of the last map, then the URL's seed nodes) in turn. A `MOVED` points its slot at
//! the node named at once and has the map read again before the next command; an
//! `ASK` sends that one command to the node named, after `ASKING`, and changes
//! nothing; a node that fails or a cluster that says `CLUSTERDOWN` has the map read
//! again (a failover moved the slots). Each node keeps its connections across
//! refreshes.

pub(crate) mod slot;
mod topology;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use self::slot::SLOTS;
use super::{
    pool::{Node, Nodes, OpeningLock, Rotation, Settings},
    resp::RespError,
};
use crate::stores::{net::Address, tls::Connector};

/// No node serves the slot, as far as the map knows.
const NONE: u16 = u16::MAX;

/// Which node serves each slot.
struct SlotMap {
    /// An index into `nodes` for each slot, or [`NONE`].
    owners: Box<[u16]>,
    nodes: Vec<Arc<Node>>,
}

impl SlotMap {
    fn empty() -> Self {
        Self {
            owners: vec![NONE; SLOTS].into_boxed_slice(),
            nodes: Vec::new(),
        }
    }

    fn set(&mut self, first: u16, last: u16, node: &Arc<Node>) {
        let index = match self.nodes.iter().position(|n| Arc::ptr_eq(n, node)) {
            Some(index) => index,
            None => {
                self.nodes.push(Arc::clone(node));
                self.nodes.len() - 1
            }
        };
        // At most 16,384 nodes: one per slot.
        let index = index as u16;
        for owner in &mut self.owners[usize::from(first)..=usize::from(last)] {
            *owner = index;
        }
    }
}

/// A cluster's nodes and slot map, shared by clones of a store.
pub(crate) struct Cluster {
    /// The URL's nodes, those that failed last put last.
    seeds: Rotation,
    map: parking_lot::RwLock<SlotMap>,
    /// Every node met: its connections outlive a refresh of the map.
    nodes: Nodes,
    /// Set when the map may be out of date: the next command reads it again first.
    stale: AtomicBool,
    /// Held while the map is read, so that callers arriving meanwhile wait for that
    /// reading instead of each asking the nodes.
    refreshing: OpeningLock,
    /// How many readings of the map ended, and how the last one failed (`None`: it
    /// succeeded): a caller that waited for a reading takes its outcome instead of
    /// asking every node again in turn.
    generation: AtomicU64,
    last_failure: parking_lot::Mutex<Option<RespError>>,
}

impl Cluster {
    pub(crate) fn new(
        seeds: Vec<Address>,
        tls: Option<Connector>,
        settings: Arc<Settings>,
    ) -> Self {
        Self {
            seeds: Rotation::new(seeds),
            nodes: Nodes::new(tls, settings),
            map: parking_lot::RwLock::new(SlotMap::empty()),
            stale: AtomicBool::new(true),
            refreshing: OpeningLock::default(),
            generation: AtomicU64::new(0),
            last_failure: parking_lot::Mutex::new(None),
        }
    }

    /// The node at `address`, met before or new.
    pub(crate) fn node(&self, address: &Address) -> Result<Arc<Node>, RespError> {
        self.nodes.get(address)
    }

    /// A node said `MOVED`: `slot` is served by `node` from now on, and the rest of
    /// the map is read again before the next command.
    pub(crate) fn moved(&self, slot: u16, node: &Arc<Node>) {
        self.map.write().set(slot, slot, node);
        self.mark_stale();
    }

    /// Has the map read again before the next command: a node failed, or the
    /// cluster is down while it fails over.
    pub(crate) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    fn lookup(&self, slot: u16) -> Option<Arc<Node>> {
        let map = self.map.read();
        let index = map.owners[usize::from(slot) % SLOTS];
        map.nodes
            .get(usize::from(index))
            .or_else(|| map.nodes.first())
            .cloned()
    }

    /// Where to ask for the map, each address once: the primaries of the last map,
    /// then the seeds; the seeds first when the last reading failed (the whole
    /// cluster may have moved to new addresses).
    fn candidates(&self) -> Vec<Address> {
        let primaries: Vec<Address> = self
            .map
            .read()
            .nodes
            .iter()
            .map(|node| node.address.clone())
            .collect();
        let seeds = self.seeds.order();
        let (first, then) = match self.last_failure.lock().is_some() {
            true => (&seeds, &primaries),
            false => (&primaries, &seeds),
        };
        let mut candidates: Vec<Address> = Vec::with_capacity(first.len() + then.len());
        for address in first.iter().chain(then) {
            if !candidates.contains(address) {
                candidates.push(address.clone());
            }
        }
        candidates
    }

    fn install(&self, ranges: topology::Ranges) -> Result<(), RespError> {
        let mut map = SlotMap::empty();
        for (first, last, address) in ranges {
            let node = self.node(&address)?;
            map.set(first, last, &node);
        }
        *self.map.write() = map;
        Ok(())
    }
}

/// Marks the map stale again when dropped, unless disarmed: a reading that failed,
/// or whose future was dropped halfway, leaves the reading to the next command.
struct Restale<'a>(Option<&'a AtomicBool>);

impl Drop for Restale<'_> {
    fn drop(&mut self) {
        if let Some(stale) = self.0 {
            stale.store(true, Ordering::Release);
        }
    }
}

#[maybe_async::maybe_async]
impl Cluster {
    /// The node serving `slot`, reading the map first when it may be out of date
    /// (asking no more nodes once `deadline` has passed). With no node known for
    /// the slot, any node: it redirects.
    pub(crate) async fn node_for(
        &self,
        slot: u16,
        deadline: Instant,
    ) -> Result<Arc<Node>, RespError> {
        if self.stale.load(Ordering::Acquire) {
            if let Err(err) = self.refresh(deadline).await {
                // The map as it stands may still serve: a node that moved redirects.
                if self.map.read().nodes.is_empty() {
                    return Err(err);
                }
                log::warn!("could not read the Redis Cluster's slot map: {err}");
            }
        }
        self.lookup(slot)
            .ok_or_else(|| RespError::Protocol("the cluster serves no slot".into()))
    }

    /// Reads the slot map, once for the callers that come meanwhile.
    async fn refresh(&self, deadline: Instant) -> Result<(), RespError> {
        let seen = self.generation.load(Ordering::Acquire);
        let _refreshing = self.refreshing.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return match self.last_failure.lock().as_ref() {
                Some(err) => Err(err.duplicate()),
                None => Ok(()),
            };
        }
        // Cleared first: a redirection that comes while the map is read marks it
        // again; so does a reading that fails or is dropped halfway.
        self.stale.store(false, Ordering::Release);
        let mut restale = Restale(Some(&self.stale));
        let read = self.read_map(deadline).await;
        if read.is_ok() {
            restale.0 = None;
        }
        *self.last_failure.lock() = read.as_ref().err().map(RespError::duplicate);
        self.generation.fetch_add(1, Ordering::AcqRel);
        read
    }

    /// Reads the slot map from the first node that gives it (see `candidates`).
    /// Once `deadline` has passed by a timeout and a seed has been asked, no other
    /// node is asked.
    async fn read_map(&self, deadline: Instant) -> Result<(), RespError> {
        let limit = deadline.checked_add(self.nodes.settings().timeout);
        let mut last = None;
        let mut seed_asked = false;
        for address in self.candidates() {
            let late = limit.is_some_and(|limit| Instant::now() >= limit);
            if last.is_some() && late && seed_asked {
                break;
            }
            seed_asked |= self.seeds.contains(&address);
            let asked = match self.node(&address) {
                Ok(node) => Self::ask_slots(&node).await,
                Err(err) => Err(err),
            };
            match asked
                .and_then(|reply| topology::parse(&reply, &address).map_err(RespError::Protocol))
            {
                Ok(ranges) if !ranges.is_empty() => return self.install(ranges),
                Ok(_) => last = Some(RespError::Protocol(format!("{address} serves no slot"))),
                Err(err) => last = Some(err),
            }
            self.seeds.failed(&address);
        }
        Err(last.unwrap_or_else(|| RespError::Protocol("no node to ask".into())))
    }

    async fn ask_slots(node: &Node) -> Result<super::resp::Reply, RespError> {
        let (mux, _) = node.shared.connection().await?;
        let reply = mux.call(&[b"CLUSTER", b"SLOTS"]).await;
        if matches!(reply, Err(RespError::Io(_))) {
            node.shared.retire(&mux);
        }
        reply
    }
}
