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

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use self::slot::SLOTS;
use super::{
    pool::{Node, Nodes, OpeningLock, Settings},
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
    seeds: Vec<Address>,
    map: parking_lot::RwLock<SlotMap>,
    /// Every node met: its connections outlive a refresh of the map.
    nodes: Nodes,
    /// Set when the map may be out of date: the next command reads it again first.
    stale: AtomicBool,
    /// Held while the map is read, so that callers arriving meanwhile wait for that
    /// reading instead of each asking the nodes.
    refreshing: OpeningLock,
    /// How many times the map was read: a caller that waited for a reading uses it.
    generation: AtomicU64,
}

impl Cluster {
    pub(crate) fn new(
        seeds: Vec<Address>,
        tls: Option<Connector>,
        settings: Arc<Settings>,
    ) -> Self {
        Self {
            seeds,
            nodes: Nodes::new(tls, settings),
            map: parking_lot::RwLock::new(SlotMap::empty()),
            stale: AtomicBool::new(true),
            refreshing: OpeningLock::default(),
            generation: AtomicU64::new(0),
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

    /// Where to ask for the map: the primaries of the last map, then the seeds.
    fn candidates(&self) -> Vec<Address> {
        let mut candidates: Vec<Address> = self
            .map
            .read()
            .nodes
            .iter()
            .map(|node| node.address.clone())
            .collect();
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
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
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

#[maybe_async::maybe_async]
impl Cluster {
    /// The node serving `slot`, reading the map first when it may be out of date.
    /// With no node known for the slot, any node: it redirects.
    pub(crate) async fn node_for(&self, slot: u16) -> Result<Arc<Node>, RespError> {
        if self.stale.load(Ordering::Acquire) {
            if let Err(err) = self.refresh().await {
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

    /// Reads the slot map from the first node that gives it.
    async fn refresh(&self) -> Result<(), RespError> {
        let seen = self.generation.load(Ordering::Acquire);
        let _refreshing = self.refreshing.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        // Cleared first: a redirection that comes while the map is read marks it
        // again.
        self.stale.store(false, Ordering::Release);
        let mut last = None;
        for address in self.candidates() {
            let node = self.node(&address)?;
            let asked = Self::ask_slots(&node).await;
            match asked
                .and_then(|reply| topology::parse(&reply, &address).map_err(RespError::Protocol))
            {
                Ok(ranges) if !ranges.is_empty() => return self.install(ranges),
                Ok(_) => last = Some(RespError::Protocol(format!("{address} serves no slot"))),
                Err(err) => last = Some(err),
            }
        }
        self.mark_stale();
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
