//! [`MemoryStore`]: sessions in this process's memory.

use std::{
    cmp::Reverse,
    collections::{hash_map::Entry, BinaryHeap, HashMap, HashSet},
    fmt,
    hash::{BuildHasher, Hasher},
    sync::Arc,
};

use parking_lot::RwLock;
use time::OffsetDateTime;

use crate::{
    lifecycle::clock::Clock,
    session::{random_id, Ending, Handle, Id, OwnedSession, Owner, Ownership, Record},
    session_store::{ExpiredDeletion, Result, SessionStore, Update},
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
///   number of expired records, not to the size of the store. (Entries that deletes
///   and expiry changes leave behind are dropped as they come due, and all at once
///   before they outnumber the records.)
/// - A user's sessions: each shard also keeps its owned records' ids by owner,
///   written under the same lock as the records, so listing and ending an owner's
///   sessions visit that owner's entries in each shard, never every record.
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
    clock: Clock,
}

/// One shard on a cache line of its own, so that readers of different shards do not
/// slow each other down by writing to one line.
#[repr(align(128))]
struct Padded(RwLock<Shard>);

impl Padded {
    /// An empty shard whose table hashes with seeds of its own, drawn independently of
    /// the shard selector's: ids chosen to collide in one never collide in the other.
    fn new() -> Self {
        Self(RwLock::new(Shard {
            records: HashMap::with_hasher(IdHasherBuilder::random()),
            expiries: BinaryHeap::new(),
            owners: HashMap::new(),
        }))
    }
}

struct Shard {
    records: HashMap<Id, Slot, IdHasherBuilder>,
    /// `(expiry in Unix nanoseconds, id)` for every record in `records`, soonest first.
    ///
    /// Deleting a record or changing its expiry leaves its entry behind: a stale entry
    /// is skipped when it comes due, and all are dropped at once when they outnumber
    /// the records. That keeps writes at a push (cheap: new expiries are mostly the
    /// latest) instead of a search tree's insert and remove.
    expiries: BinaryHeap<Reverse<(i64, Id)>>,
    /// The ids of the owned records in `records`, by owner: changed with them, under
    /// the same lock.
    owners: HashMap<Owner, HashSet<Id, IdHasherBuilder>>,
}

impl Shard {
    /// Moves `id` from `old`'s entry to `new`'s, when the owner changed.
    fn refile(&mut self, id: Id, old: Option<&Owner>, new: Option<&Owner>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            if let Some(ids) = self.owners.get_mut(old) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.owners.remove(old);
                }
            }
        }
        if let Some(new) = new {
            // The table's seeded hasher: ids chosen by a caller cannot pile up in
            // one bucket here either.
            let hasher = *self.records.hasher();
            self.owners
                .entry(new.clone())
                .or_insert_with(|| HashSet::with_hasher(hasher))
                .insert(id);
        }
    }

    /// Removes `id`'s record, and its owner's entry; returns the record's slot.
    fn remove(&mut self, id: &Id) -> Option<Slot> {
        let slot = self.records.remove(id)?;
        self.refile(*id, slot.owner(), None);
        Some(slot)
    }

    /// Adds `id`'s new expiry to the index.
    fn index(&mut self, expiry: i64, id: Id) {
        self.expiries.push(Reverse((expiry, id)));
        self.compact_if_stale();
    }

    /// Rebuilds the index from the records once stale entries outnumber them: the
    /// O(n) rebuild is paid for by the n writes that made the entries stale.
    fn compact_if_stale(&mut self) {
        if self.expiries.len() > 2 * self.records.len() + 32 {
            self.expiries = self
                .records
                .iter()
                .map(|(id, slot)| Reverse((slot.expiry, *id)))
                .collect();
        }
    }

    /// Returns `true` if the index's soonest entry is due at `now`.
    fn is_due(&self, now: i128) -> bool {
        self.expiries
            .peek()
            .is_some_and(|Reverse((at, _))| i128::from(*at) <= now)
    }

    /// Deletes the records that have expired at `now`; returns how many.
    fn delete_expired(&mut self, now: i128) -> usize {
        let mut deleted = 0;
        while self.is_due(now) {
            let Some(Reverse((at, id))) = self.expiries.pop() else {
                break;
            };
            // A stale entry (the record is gone, or now expires at another time) is
            // just dropped.
            if self.records.get(&id).is_some_and(|slot| slot.expiry == at) {
                self.remove(&id);
                deleted += 1;
            }
        }
        deleted
    }
}

/// A stored record, without its id (the table's key). 80 bytes: the owner and its
/// dates are kept inline, so that a write of an owned record costs no allocation and
/// no pointer chase beyond the entry.
struct Slot {
    /// `expiry_date` in Unix nanoseconds (see [`nanos`]): compared on every load, and
    /// much cheaper to compare than a date with an offset.
    expiry: i64,
    version: u64,
    expiry_date: OffsetDateTime,
    values: Option<Arc<[u8]>>,
    owned: Option<Owned>,
}

/// A record's ownership as a slot keeps it: its dates in Unix nanoseconds, as the
/// record codec writes them.
struct Owned {
    owner: Owner,
    created_at: i64,
    written_at: i64,
}

impl Owned {
    fn of(ownership: &Ownership) -> Self {
        Self {
            owner: ownership.owner.clone(),
            created_at: nanos(ownership.created_at),
            written_at: nanos(ownership.written_at),
        }
    }

    /// The ownership a write of `new` leaves in place of `old`, and, when the owner
    /// changed, the old one (`Some(None)`: there was none), to move the index entry.
    /// An owner that is the very same name as before (a record read from this store
    /// and written back) is moved over, not cloned: no reference count is touched.
    fn replace(
        old: Option<Owned>,
        new: Option<&Ownership>,
    ) -> (Option<Owned>, Option<Option<Owner>>) {
        match (old, new) {
            (None, None) => (None, None),
            (Some(prev), None) => (None, Some(Some(prev.owner))),
            (Some(prev), Some(new)) if prev.owner.same_as(&new.owner) => {
                let owned = Self {
                    owner: prev.owner,
                    created_at: nanos(new.created_at),
                    written_at: nanos(new.written_at),
                };
                (Some(owned), None)
            }
            (prev, Some(new)) => {
                let prev = prev.map(|prev| prev.owner);
                let moved = (prev.as_ref() != Some(&new.owner)).then_some(prev);
                (Some(Self::of(new)), moved)
            }
        }
    }

    fn ownership(&self) -> Ownership {
        let date = |nanos: i64| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
                .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        };
        Ownership {
            owner: self.owner.clone(),
            created_at: date(self.created_at),
            written_at: date(self.written_at),
        }
    }
}

impl Slot {
    fn of(record: &Record) -> Self {
        let mut slot = Self::unowned(record);
        slot.owned = record.ownership.as_ref().map(Owned::of);
        slot
    }

    /// The slot of `record` without its ownership, which the write sets under the
    /// lock (see [`Owned::replace`]).
    fn unowned(record: &Record) -> Self {
        Self {
            expiry: nanos(record.expiry_date),
            version: record.version,
            expiry_date: record.expiry_date,
            values: record.shared_values(),
            owned: None,
        }
    }

    fn record(&self, id: Id) -> Record {
        let mut record =
            Record::from_parts(id, self.expiry_date, self.version, self.values.clone());
        record.ownership = self.owned.as_ref().map(Owned::ownership);
        record
    }

    fn owner(&self) -> Option<&Owner> {
        self.owned.as_ref().map(|o| &o.owner)
    }
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Padded::new()).collect(),
            hasher: IdHasherBuilder::random(),
            clock: Clock::default(),
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
                clock: Clock::custom(clock),
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

    /// The current time in Unix nanoseconds.
    /// The clock in Unix nanoseconds, held strictly inside what [`nanos`] gives, so
    /// that a record saturated at either end keeps its meaning whatever the clock.
    fn now(&self) -> i128 {
        self.inner
            .clock
            .now_nanos()
            .clamp(i128::from(i64::MIN) + 1, i128::from(i64::MAX) - 1)
    }

    /// `true` if a slot's `expiry` has come: never for the far future (saturated at
    /// `i64::MAX`), always for the far past, whatever the clock says.
    fn has_passed(&self, expiry: i64) -> bool {
        match expiry {
            i64::MAX => false,
            i64::MIN => true,
            expiry => self.inner.clock.has_passed(i128::from(expiry)),
        }
    }

    fn shard(&self, id: &Id) -> &RwLock<Shard> {
        // The top bits of the hash pick the shard; the table inside uses the low ones.
        let hash = self.inner.hasher.hash_one(id);
        &self.inner.shards[(hash >> 58) as usize % SHARDS].0
    }

    // The store's synchronous core: every operation takes one shard lock and holds it
    // for no longer than a few map operations, never across an await.

    fn create_now(&self, record: &mut Record) -> Result<()> {
        let slot = Slot::of(record);
        let expiry = slot.expiry;
        loop {
            let mut guard = self.shard(&record.id).write();
            let shard = &mut *guard;
            match shard.records.entry(record.id) {
                Entry::Vacant(vacant) => {
                    let owner = slot.owner().cloned();
                    vacant.insert(slot);
                    shard.index(expiry, record.id);
                    shard.refile(record.id, None, owner.as_ref());
                    return Ok(());
                }
                Entry::Occupied(_) => {
                    drop(guard);
                    record.id = random_id()?;
                }
            }
        }
    }

    fn save_now(&self, record: &Record) {
        let mut slot = Slot::unowned(record);
        let expiry = slot.expiry;
        let owner = record.ownership.as_ref().map(|o| &o.owner);
        let mut guard = self.shard(&record.id).write();
        let shard = &mut *guard;
        // The old slot's expiry, if there was one, and the old owner when the index
        // entry must move.
        let (old_expiry, moved) = match shard.records.get_mut(&record.id) {
            Some(old) => {
                let (owned, moved) = Owned::replace(old.owned.take(), record.ownership.as_ref());
                slot.owned = owned;
                (Some(std::mem::replace(old, slot).expiry), moved)
            }
            None => {
                slot.owned = record.ownership.as_ref().map(Owned::of);
                shard.records.insert(record.id, slot);
                (None, owner.is_some().then_some(None))
            }
        };
        if old_expiry != Some(expiry) {
            shard.index(expiry, record.id);
        }
        if let Some(moved) = moved {
            shard.refile(record.id, moved.as_ref(), owner);
        }
    }

    fn update_now(&self, record: &Record) -> Update {
        // Made before the lock, as `save_now` does: the work on the values (a reference
        // count, or a copy of values changed since they were read) and the table
        // lookup then miss the cache at the same time, not one after the other. A
        // write that is refused drops it again.
        let mut next = Slot::unowned(record);
        next.version = record.version.wrapping_add(1);
        let expiry = next.expiry;
        let mut guard = self.shard(&record.id).write();
        let shard = &mut *guard;
        let Some(slot) = shard.records.get_mut(&record.id) else {
            return Update::Gone;
        };
        if self.has_passed(slot.expiry) {
            return Update::Gone;
        }
        if slot.version != record.version {
            return Update::Conflict;
        }
        let version = next.version;
        let (owned, moved) = Owned::replace(slot.owned.take(), record.ownership.as_ref());
        next.owned = owned;
        let old = std::mem::replace(slot, next);
        if old.expiry != expiry {
            shard.index(expiry, record.id);
        }
        if let Some(moved) = moved {
            let owner = record.ownership.as_ref().map(|o| &o.owner);
            shard.refile(record.id, moved.as_ref(), owner);
        }
        Update::Written(version)
    }

    fn load_now(&self, id: &Id) -> Option<Record> {
        let (expiry, record) = {
            let shard = self.shard(id).read();
            let slot = shard.records.get(id)?;
            (slot.expiry, slot.record(*id))
        };
        // The clock is read only for a hit, and outside the lock.
        (!self.has_passed(expiry)).then_some(record)
    }

    fn delete_now(&self, id: &Id) {
        let mut shard = self.shard(id).write();
        if shard.remove(id).is_some() {
            shard.compact_if_stale();
        }
    }

    /// The ids, handles and creation dates of `owner`'s live records.
    fn owned_now(&self, owner: &Owner) -> Vec<(Id, Handle, OffsetDateTime)> {
        let mut owned = Vec::new();
        for padded in self.inner.shards.iter() {
            let shard = padded.0.read();
            let Some(ids) = shard.owners.get(owner) else {
                continue;
            };
            for id in ids {
                if let Some(slot) = shard.records.get(id) {
                    if let (false, Some(ownership)) = (self.has_passed(slot.expiry), &slot.owned) {
                        owned.push((*id, Handle::of(id), ownership.ownership().created_at));
                    }
                }
            }
        }
        owned
    }

    fn list_now(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        let mut listed = Vec::new();
        for padded in self.inner.shards.iter() {
            let records: Vec<Record> = {
                let shard = padded.0.read();
                let Some(ids) = shard.owners.get(owner) else {
                    continue;
                };
                ids.iter()
                    .filter_map(|id| shard.records.get(id).map(|slot| (id, slot)))
                    .filter(|(_, slot)| !self.has_passed(slot.expiry))
                    .map(|(id, slot)| slot.record(*id))
                    .collect()
            };
            for record in records {
                listed.push(OwnedSession::new(Handle::of(&record.id), record)?);
            }
        }
        Ok(listed)
    }

    /// Deletes the records of `owner` that `ending` names: those still `owner`'s
    /// when their shard's lock is taken.
    fn end_now(&self, owner: &Owner, ending: Ending) -> Vec<Handle> {
        let owned = self.owned_now(owner);
        let picked: HashSet<Handle> = ending
            .pick(owned.iter().map(|(_, h, at)| (*h, *at)).collect())
            .into_iter()
            .collect();
        let mut ended = Vec::with_capacity(picked.len());
        for (id, handle, _) in owned {
            if !picked.contains(&handle) {
                continue;
            }
            let mut shard = self.shard(&id).write();
            let still = shard.records.get(&id).and_then(Slot::owner) == Some(owner);
            if still && shard.remove(&id).is_some() {
                ended.push(handle);
            }
        }
        ended
    }

    fn delete_expired_now(&self) -> usize {
        let now = self.now();
        let mut deleted = 0;
        for padded in self.inner.shards.iter() {
            // Most shards have nothing due: look under the read lock first.
            if padded.0.read().is_due(now) {
                deleted += padded.0.write().delete_expired(now);
            }
        }
        deleted
    }
}

/// `at` in Unix nanoseconds, held to what an `i64` counts (1677 to 2262): a date
/// beyond is as good as never, one before as good as always.
fn nanos(at: OffsetDateTime) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

#[maybe_async::maybe_async]
impl SessionStore for MemoryStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.create_now(record)
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

    /// Compares and replaces under the record's shard lock: atomic.
    async fn update(&self, record: &Record) -> Result<Update> {
        Ok(self.update_now(record))
    }

    fn atomic_update(&self) -> bool {
        true
    }

    fn supports_owners(&self) -> bool {
        true
    }

    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        self.list_now(owner)
    }

    /// Deletes each record ended under its shard's lock, if it is still `owner`'s.
    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        Ok(self.end_now(owner, ending))
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
            .field("clock", &self.inner.clock)
            .finish()
    }
}

/// Hashes ids for the shard tables.
///
/// Ids are already uniformly random, so hashing them only has to resist callers who
/// pick ids themselves (a `save` with a chosen id): a folded multiply with per-store
/// random seeds, as in foldhash, costs a few cycles and keeps such ids from landing in
/// one bucket.
#[derive(Clone, Copy)]
pub(crate) struct IdHasherBuilder {
    seeds: [u64; 2],
}

impl Default for IdHasherBuilder {
    /// Random seeds, as every table of ids wants.
    fn default() -> Self {
        Self::random()
    }
}

impl IdHasherBuilder {
    fn random() -> Self {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // No OS randomness right now: std's randomly keyed hasher still gives
            // seeds no caller can predict, which is all they are for.
            let keys = std::collections::hash_map::RandomState::new();
            bytes[..8].copy_from_slice(&keys.hash_one(1u8).to_le_bytes());
            bytes[8..].copy_from_slice(&keys.hash_one(2u8).to_le_bytes());
        }
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

pub(crate) struct IdHasher {
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
        // One more folded multiply by an odd constant: the product's high half
        // carries every input bit into the low bits, which pick the table bucket.
        // Without it, ids that differ only in a few bits (chosen, not drawn) could
        // share low bits whenever a seed had trailing zeros.
        folded_multiply(self.hash, 0x9E37_79B9_7F4A_7C15)
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
    fn chosen_ids_with_a_zero_half_spread_over_each_table() {
        let store = MemoryStore::new();
        for half in [0, 64] {
            let ids: Vec<Id> = (1..=10_000u128)
                .map(|n| Id::from_bytes((n << half).to_le_bytes()))
                .collect();
            let shard = store.inner.shards[0].0.read();
            let buckets: std::collections::HashSet<u64> = ids
                .iter()
                .map(|id| shard.records.hasher().hash_one(id) & 0xffff)
                .collect();
            // 10,000 random draws from 65,536 buckets leave about 9,300 distinct.
            assert!(buckets.len() > 9_000, "{} buckets", buckets.len());
        }
        // And the operations stay fast: 10,000 such ids in one store.
        let mut record = Record::new(OffsetDateTime::now_utc() + time::Duration::hours(1));
        for n in 1..=10_000u128 {
            record.id = Id::from_bytes(n.to_le_bytes());
            store.save_now(&record);
        }
        assert_eq!(store.len(), 10_000);
    }

    fn indexed(store: &MemoryStore) -> usize {
        store
            .inner
            .shards
            .iter()
            .map(|s| s.0.read().expiries.len())
            .sum()
    }

    #[test]
    fn stale_index_entries_are_skipped_and_compacted() {
        let now = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let clock = now.clone();
        let store = MemoryStore::with_clock(move || {
            let seconds = clock.load(std::sync::atomic::Ordering::Relaxed);
            OffsetDateTime::from_unix_timestamp(seconds).expect("in range")
        });
        let at = |seconds| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(seconds);

        // Moved from 10 s to 20 s, then back to 10 s: three entries, one record.
        let mut moved = Record::new(at(10));
        store.create_now(&mut moved).unwrap();
        moved.expiry_date = at(20);
        store.save_now(&moved);
        moved.expiry_date = at(10);
        store.save_now(&moved);
        // Deleted before it expired: its entry stays behind.
        let mut deleted = Record::new(at(10));
        store.create_now(&mut deleted).unwrap();
        store.delete_now(&deleted.id);
        // Moved later: its first entry is stale when it comes due.
        let mut extended = Record::new(at(10));
        store.create_now(&mut extended).unwrap();
        extended.expiry_date = at(30);
        store.save_now(&extended);
        assert_eq!(indexed(&store), 6);

        now.store(15, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(store.delete_expired_now(), 1);
        assert!(store.load_now(&moved.id).is_none());
        assert!(store.load_now(&extended.id).is_some());
        now.store(30, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(store.delete_expired_now(), 1);
        assert_eq!(store.len(), 0);
        assert_eq!(indexed(&store), 0);

        // Rewriting one record's expiry over and over keeps the index small.
        let mut busy = Record::new(at(100));
        store.create_now(&mut busy).unwrap();
        for second in 101..10_000 {
            busy.expiry_date = at(second);
            store.save_now(&busy);
        }
        assert!(indexed(&store) <= 2 + 32, "{} entries", indexed(&store));
        // And so does deleting many records.
        for _ in 0..10_000 {
            let mut record = Record::new(at(100_000));
            store.create_now(&mut record).unwrap();
            store.delete_now(&record.id);
        }
        assert!(
            indexed(&store) <= 2 * (2 + 32) * SHARDS,
            "{} entries",
            indexed(&store)
        );
    }

    /// Expiry dates outside what `i64` nanoseconds count (1677 to 2262) are held to
    /// its ends: the far future never expires, the far past always has, and both
    /// come back exactly as saved.
    #[test]
    fn dates_beyond_i64_nanoseconds_keep_their_meaning() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let store = MemoryStore::with_clock(move || now);
        let far = time::Date::from_calendar_date(9999, time::Month::December, 31).unwrap();
        let far = far
            .midnight()
            .assume_offset(time::UtcOffset::from_hms(5, 30, 0).unwrap());
        let past = time::Date::from_calendar_date(1000, time::Month::January, 1).unwrap();
        let past = past.midnight().assume_utc();
        let mut future = Record::new(far);
        future.insert("k", &1u8).unwrap();
        store.save_now(&future);
        let mut gone = Record::new(past);
        gone.insert("k", &2u8).unwrap();
        store.save_now(&gone);
        assert_eq!(store.load_now(&future.id), Some(future.clone()));
        assert_eq!(
            store.load_now(&future.id).unwrap().expiry_date.offset(),
            far.offset()
        );
        assert_eq!(store.load_now(&gone.id), None);
        assert_eq!(store.delete_expired_now(), 1);
        assert_eq!(store.len(), 1);
        assert!(matches!(store.update_now(&future), Update::Written(1)));
        assert!(matches!(store.update_now(&gone), Update::Gone));

        // A clock beyond those ends too: years 3000 and 1600 are before 9999 and after
        // 1000.
        for year in [3000, 1600] {
            let now = time::Date::from_calendar_date(year, time::Month::June, 1).unwrap();
            let now = now.midnight().assume_utc();
            let store = MemoryStore::with_clock(move || now);
            store.save_now(&future);
            store.save_now(&gone);
            assert_eq!(store.load_now(&future.id).is_some(), now < far, "{year}");
            assert_eq!(store.load_now(&gone.id).is_some(), now < past, "{year}");
            assert_eq!(store.delete_expired_now(), 1, "{year}");
            assert!(store.load_now(&future.id).is_some(), "{year}");
            assert!(
                matches!(store.update_now(&future), Update::Written(_)),
                "{year}"
            );
        }
    }
}
