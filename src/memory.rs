//! [`MemoryStore`]: sessions in this process's memory.

use std::{
    collections::{hash_map::Entry, BTreeSet, HashMap},
    fmt,
    hash::{BuildHasher, Hasher},
    sync::Arc,
};

use parking_lot::RwLock;
use time::OffsetDateTime;

use crate::{
    session::{Id, Record},
    session_store::{ExpiredDeletion, Result, SessionStore},
};

/// How many independently locked shards a store has: enough that two threads rarely
/// meet on one lock, few enough that a deletion pass visits them all cheaply.
const SHARDS: usize = 64;

/// A session store in this process's memory.
///
/// - Clones are cheap and share the same sessions.
/// - Sessions live in 64 shards, each behind its own read-write lock: readers never
///   wait for each other, and a writer holds up only the ids of its shard. No lock is
///   held across an `.await`.
/// - An expired record is never returned, even before it is deleted.
/// - Each shard keeps an index of its records by expiry date, so
///   [`delete_expired`](ExpiredDeletion::delete_expired) costs in proportion to the
///   number of expired records, not to the size of the store.
///
/// Sessions are lost when the process ends and are not shared between processes;
/// use a persistent store for that, possibly behind a
/// [`CachingSessionStore`](crate::CachingSessionStore) with a `MemoryStore` in front.
///
/// # Examples
///
/// ```
/// use portable_sessions::{session::Record, ExpiredDeletion, MemoryStore, SessionStore};
/// use time::{Duration, OffsetDateTime};
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let store = MemoryStore::default();
/// let mut record = Record::new(OffsetDateTime::now_utc() + Duration::minutes(30));
/// record.insert("user_id", &7u64)?;
/// store.create(&mut record).await?;
///
/// let loaded = store.load(&record.id).await?.expect("the session is there");
/// assert_eq!(loaded.get::<u64>("user_id")?, Some(7));
///
/// let mut stale = Record::new(OffsetDateTime::now_utc() - Duration::seconds(1));
/// store.create(&mut stale).await?;
/// let served = store.load(&stale.id).await?;
/// assert_eq!(served, None); // expired: never served
/// let deleted = store.delete_expired().await?;
/// assert_eq!(deleted, 1); // and now gone
/// assert_eq!(store.len(), 1);
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Padded]>,
    hasher: IdHasherBuilder,
    clock: Option<Box<dyn Fn() -> OffsetDateTime + Send + Sync>>,
}

/// One shard on a cache line of its own, so that readers of different shards do not
/// slow each other down by writing to one line.
#[repr(align(128))]
#[derive(Default)]
struct Padded(RwLock<Shard>);

#[derive(Default)]
struct Shard {
    records: HashMap<Id, Record, IdHasherBuilder>,
    /// `(expiry in Unix nanoseconds, id)` for every record in `records`.
    by_expiry: BTreeSet<(i128, Id)>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            hasher: IdHasherBuilder::random(),
            clock: None,
        }
    }
}

impl MemoryStore {
    /// Makes an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes an empty store that reads the current time from `clock` instead of the
    /// system clock: for tests that move time forward instead of sleeping.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::{atomic::{AtomicI64, Ordering}, Arc};
    /// use portable_sessions::MemoryStore;
    /// use time::OffsetDateTime;
    ///
    /// let seconds = Arc::new(AtomicI64::new(1_000));
    /// let now = seconds.clone();
    /// let store = MemoryStore::with_clock(move || {
    ///     OffsetDateTime::from_unix_timestamp(now.load(Ordering::Relaxed)).unwrap()
    /// });
    /// seconds.store(2_000, Ordering::Relaxed); // an instant later, 1000 s have passed
    /// # drop(store);
    /// ```
    pub fn with_clock(clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Self {
        Self {
            inner: Arc::new(Inner {
                clock: Some(Box::new(clock)),
                ..Inner::default()
            }),
        }
    }

    /// Returns how many records the store holds, counting expired ones that have not
    /// been deleted yet.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.0.read().records.len())
            .sum()
    }

    /// Returns `true` if the store holds no records, expired or not.
    pub fn is_empty(&self) -> bool {
        self.inner
            .shards
            .iter()
            .all(|s| s.0.read().records.is_empty())
    }

    fn now(&self) -> OffsetDateTime {
        match &self.inner.clock {
            Some(clock) => clock(),
            None => OffsetDateTime::now_utc(),
        }
    }

    fn shard(&self, id: &Id) -> &RwLock<Shard> {
        // The top bits of the hash pick the shard; the table inside uses the low ones.
        let hash = self.inner.hasher.hash_one(id);
        &self.inner.shards[(hash >> 58) as usize % SHARDS].0
    }

    // The store's synchronous core: every operation takes one shard lock and holds it
    // for no longer than a few map operations, never across an await.

    fn create_now(&self, record: &mut Record) {
        loop {
            let mut shard = self.shard(&record.id).write();
            match shard.records.entry(record.id) {
                Entry::Vacant(slot) => {
                    slot.insert(record.clone());
                    shard
                        .by_expiry
                        .insert((nanos(record.expiry_date), record.id));
                    return;
                }
                Entry::Occupied(_) => {
                    drop(shard);
                    record.id = Id::default();
                }
            }
        }
    }

    fn save_now(&self, record: &Record) {
        let mut shard = self.shard(&record.id).write();
        let expiry = nanos(record.expiry_date);
        let old = shard.records.insert(record.id, record.clone());
        match old {
            Some(old) if nanos(old.expiry_date) == expiry => {}
            Some(old) => {
                shard.by_expiry.remove(&(nanos(old.expiry_date), old.id));
                shard.by_expiry.insert((expiry, record.id));
            }
            None => {
                shard.by_expiry.insert((expiry, record.id));
            }
        }
    }

    fn load_now(&self, id: &Id) -> Option<Record> {
        let now = self.now();
        let shard = self.shard(id).read();
        shard
            .records
            .get(id)
            .filter(|record| !record.is_expired_at(now))
            .cloned()
    }

    fn delete_now(&self, id: &Id) {
        let mut shard = self.shard(id).write();
        if let Some(old) = shard.records.remove(id) {
            shard.by_expiry.remove(&(nanos(old.expiry_date), old.id));
        }
    }

    fn delete_expired_now(&self) -> usize {
        let now = nanos(self.now());
        let mut deleted = 0;
        for padded in self.inner.shards.iter() {
            let is_due = |shard: &Shard| shard.by_expiry.first().is_some_and(|&(at, _)| at <= now);
            // Most shards have nothing due: look under the read lock first.
            if !is_due(&padded.0.read()) {
                continue;
            }
            let mut shard = padded.0.write();
            while is_due(&shard) {
                if let Some((_, id)) = shard.by_expiry.pop_first() {
                    shard.records.remove(&id);
                    deleted += 1;
                }
            }
        }
        deleted
    }
}

fn nanos(at: OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos()
}

#[maybe_async::maybe_async]
impl SessionStore for MemoryStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.create_now(record);
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        self.save_now(record);
        Ok(())
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        Ok(self.load_now(id))
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        self.delete_now(id);
        Ok(())
    }
}

#[maybe_async::maybe_async]
impl ExpiredDeletion for MemoryStore {
    async fn delete_expired(&self) -> Result<usize> {
        Ok(self.delete_expired_now())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field(
                "clock",
                &if self.inner.clock.is_some() {
                    "injected"
                } else {
                    "system"
                },
            )
            .finish()
    }
}

/// Hashes ids for the shard tables.
///
/// Ids are already uniformly random, so hashing them only has to resist callers who
/// pick ids themselves (a `save` with a chosen id): a folded multiply with per-store
/// random seeds, as in foldhash, costs a few cycles and keeps such ids from landing in
/// one bucket.
#[derive(Clone, Copy, Default)]
struct IdHasherBuilder {
    seeds: [u64; 2],
}

impl IdHasherBuilder {
    fn random() -> Self {
        let mut bytes = [0u8; 16];
        // Without OS randomness the seeds stay zero: hashing still works, only the
        // resistance to chosen ids is lost, which is no reason to fail.
        let _ = getrandom::fill(&mut bytes);
        let seed = u128::from_le_bytes(bytes);
        Self {
            seeds: [seed as u64, (seed >> 64) as u64],
        }
    }
}

impl BuildHasher for IdHasherBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            seeds: self.seeds,
            hash: 0,
        }
    }
}

struct IdHasher {
    seeds: [u64; 2],
    hash: u64,
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for IdHasher {
    fn write_u128(&mut self, value: u128) {
        let low = (value as u64) ^ self.seeds[0];
        let high = ((value >> 64) as u64) ^ self.seeds[1] ^ self.hash;
        self.hash = folded_multiply(low, high);
    }

    fn write(&mut self, bytes: &[u8]) {
        // `Id` hashes through `write_u128`; this serves any other input correctly.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.hash = folded_multiply(
                u64::from_le_bytes(word) ^ self.seeds[0],
                self.hash ^ self.seeds[1],
            );
        }
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_spread_over_shards() {
        let store = MemoryStore::new();
        let mut used = std::collections::HashSet::new();
        for _ in 0..2_000 {
            used.insert(store.shard(&Id::default()) as *const _ as usize);
        }
        assert_eq!(used.len(), SHARDS);
    }

    #[test]
    fn chosen_ids_with_equal_low_bits_spread_over_shards() {
        let store = MemoryStore::new();
        let mut used = std::collections::HashSet::new();
        for high in 0..2_000u128 {
            used.insert(
                store.shard(&Id::from_bytes((high << 64).to_le_bytes())) as *const _ as usize,
            );
        }
        assert!(used.len() > SHARDS / 2, "{} shards used", used.len());
    }

    #[test]
    fn expiry_index_follows_saves_and_deletes() {
        let store = MemoryStore::new();
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH + time::Duration::days(1));
        store.create_now(&mut record);
        record.expiry_date += time::Duration::days(1);
        store.save_now(&record);
        store.save_now(&record);
        let indexed: usize = store
            .inner
            .shards
            .iter()
            .map(|s| s.0.read().by_expiry.len())
            .sum();
        assert_eq!(indexed, 1);
        store.delete_now(&record.id);
        let indexed: usize = store
            .inner
            .shards
            .iter()
            .map(|s| s.0.read().by_expiry.len())
            .sum();
        assert_eq!(indexed, 0);
    }
}
