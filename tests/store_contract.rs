//! The store contract, run against every store of the core crate, and create under
//! contention.

mod common;

use std::{collections::HashSet, sync::Arc};

use portable_sessions::{
    session::{Id, Record},
    testing::{self, Expiry},
    CachingSessionStore, MemoryStore, SessionStore,
};

#[maybe_async::maybe_async]
async fn memory_store_conforms() {
    let store = MemoryStore::new();
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
    assert!(store.is_empty(), "the suite cleans up after itself");
}

#[maybe_async::maybe_async]
async fn caching_store_conforms() {
    let store = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Deletes).await;
    assert!(store.cache().is_empty() && store.store().is_empty());
}

#[maybe_async::maybe_async]
async fn dyn_store_conforms() {
    // The suite takes unsized stores, and a shared store is a store.
    let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
    testing::check_store(store.as_ref()).await;
    testing::check_store(&store).await;
}

#[maybe_async::maybe_async]
async fn forced_collision_draws_a_new_id() {
    let store = MemoryStore::new();
    let mut first = common::live_record(1);
    store.create(&mut first).await.unwrap();
    let taken = first.id;
    for attempt in 0..10u64 {
        let mut second = common::live_record(100 + attempt);
        second.id = taken;
        store.create(&mut second).await.unwrap();
        assert_ne!(second.id, taken);
        let original = store.load(&taken).await.unwrap().unwrap();
        assert_eq!(original.get::<u64>("user").unwrap(), Some(1));
        let moved = store.load(&second.id).await.unwrap().unwrap();
        assert_eq!(moved.get::<u64>("user").unwrap(), Some(100 + attempt));
    }
    assert_eq!(store.len(), 11);
}

tests_in_both_modes!(
    memory_store_conforms,
    caching_store_conforms,
    dyn_store_conforms,
    forced_collision_draws_a_new_id,
);

const THREADS: usize = 8;
const PER_THREAD: usize = 500;

/// Creates records from many threads at once (each thread its own executor in async
/// mode) into one store, all starting from the same few ids so that collisions are
/// certain, and checks that no create overwrote another.
fn create_under_contention<S: SessionStore + Clone>(store: S) -> HashSet<Id> {
    let shared_ids: Vec<Id> = (0..4).map(|_| Id::default()).collect();
    let handles: Vec<_> = (0..THREADS)
        .map(|thread| {
            let store = store.clone();
            let shared_ids = shared_ids.clone();
            std::thread::spawn(move || {
                let mut created = Vec::new();
                for n in 0..PER_THREAD {
                    let mut record = common::live_record((thread * PER_THREAD + n) as u64);
                    // Every fourth create starts from an id that others use too.
                    if n % 4 == 0 {
                        record.id = shared_ids[n / 4 % shared_ids.len()];
                    }
                    common::block(store.create(&mut record)).unwrap();
                    created.push(record);
                }
                created
            })
        })
        .collect();
    let created: Vec<Record> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let ids: HashSet<Id> = created.iter().map(|r| r.id).collect();
    assert_eq!(
        ids.len(),
        THREADS * PER_THREAD,
        "every create got its own id"
    );
    for record in &created {
        let loaded = common::block(store.load(&record.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(record), "no create overwrote another");
    }
    ids
}

#[test]
fn memory_store_create_under_contention() {
    let store = MemoryStore::new();
    create_under_contention(store.clone());
    assert_eq!(store.len(), THREADS * PER_THREAD);
}

#[test]
fn caching_store_create_under_contention() {
    let store = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    create_under_contention(store.clone());
    assert_eq!(store.store().len(), THREADS * PER_THREAD);
    assert_eq!(store.cache().len(), THREADS * PER_THREAD);
}

/// A flaw that a store can have, each breaking one rule of the contract that an
/// earlier suite let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// `update` loads, compares and saves in three steps (and says it is atomic).
    NonAtomicUpdate,
    /// `load` never looks at the expiry date (expired records are only kept out at
    /// write time).
    IgnoresExpiryOnLoad,
    /// The backend's expiry (a TTL) is set by `create` and `save`, and forgotten by
    /// `update`, as a script that leaves out `PX` does; `load` trusts the backend.
    UpdateForgetsTheTtl,
    /// `delete_expired` goes by an index of expiry dates whose old entries are never
    /// removed: a record keeps the earliest date it ever had there.
    StaleExpiryIndex,
    /// Keys starting with NUL are dropped on the way in.
    DropsReservedKeys,
}

/// A small store with one flaw; otherwise it keeps the contract.
#[derive(Debug)]
struct Flawed {
    flaw: Flaw,
    /// Each record, with the backend's own expiry (`None`: never).
    records:
        std::sync::Mutex<std::collections::HashMap<Id, (Record, Option<time::OffsetDateTime>)>>,
    /// The expiry index that `delete_expired` goes by.
    created_expiry: std::sync::Mutex<std::collections::HashMap<Id, time::OffsetDateTime>>,
}

impl Flawed {
    fn new(flaw: Flaw) -> Self {
        Self {
            flaw,
            records: Default::default(),
            created_expiry: Default::default(),
        }
    }

    fn kept(&self, record: &Record) -> Record {
        let mut kept = record.clone();
        if self.flaw == Flaw::DropsReservedKeys {
            let reserved: Vec<String> = kept
                .keys()
                .filter(|k| k.starts_with('\0'))
                .map(str::to_owned)
                .collect();
            for key in reserved {
                kept.remove(&key);
            }
        }
        kept
    }

    fn live(&self, entry: &(Record, Option<time::OffsetDateTime>)) -> bool {
        let now = time::OffsetDateTime::now_utc();
        match self.flaw {
            Flaw::IgnoresExpiryOnLoad => true,
            Flaw::UpdateForgetsTheTtl => entry.1.is_none_or(|at| at > now),
            _ => !entry.0.is_expired_at(now),
        }
    }

    /// Notes the expiry date of a write in the index.
    fn index(&self, record: &Record) {
        let mut index = self.created_expiry.lock().unwrap();
        let at = record.expiry_date;
        let entry = index.entry(record.id).or_insert(at);
        *entry = if self.flaw == Flaw::StaleExpiryIndex {
            (*entry).min(at)
        } else {
            at
        };
    }

    fn put(&self, record: &Record, ttl: bool) {
        let now = time::OffsetDateTime::now_utc();
        self.index(record);
        let mut records = self.records.lock().unwrap();
        let by_ttl = matches!(
            self.flaw,
            Flaw::IgnoresExpiryOnLoad | Flaw::UpdateForgetsTheTtl
        );
        if by_ttl && record.is_expired_at(now) {
            records.remove(&record.id); // written already expired: gone at once
            return;
        }
        let deadline = ttl.then_some(record.expiry_date);
        records.insert(record.id, (self.kept(record), deadline));
    }
}

#[maybe_async::maybe_async]
impl SessionStore for Flawed {
    async fn create(&self, record: &mut Record) -> portable_sessions::session_store::Result<()> {
        while self.records.lock().unwrap().contains_key(&record.id) {
            record.id = Id::default();
        }
        self.put(record, true);
        Ok(())
    }

    async fn save(&self, record: &Record) -> portable_sessions::session_store::Result<()> {
        self.put(record, true);
        Ok(())
    }

    async fn load(&self, id: &Id) -> portable_sessions::session_store::Result<Option<Record>> {
        let records = self.records.lock().unwrap();
        Ok(records
            .get(id)
            .filter(|entry| self.live(entry))
            .map(|entry| entry.0.clone()))
    }

    async fn delete(&self, id: &Id) -> portable_sessions::session_store::Result<()> {
        self.records.lock().unwrap().remove(id);
        Ok(())
    }

    async fn update(
        &self,
        record: &Record,
    ) -> portable_sessions::session_store::Result<portable_sessions::session_store::Update> {
        use portable_sessions::session_store::Update;
        let mut records = self.records.lock().unwrap();
        let Some(stored) = records.get(&record.id).filter(|e| self.live(e)) else {
            return Ok(Update::Gone);
        };
        if stored.0.version != record.version {
            return Ok(Update::Conflict);
        }
        if self.flaw == Flaw::NonAtomicUpdate {
            // Compared, then written in another step: another writer gets between.
            drop(records);
            std::thread::sleep(std::time::Duration::from_micros(200));
            records = self.records.lock().unwrap();
        }
        let mut next = self.kept(record);
        next.version = record.version + 1;
        self.index(record);
        let deadline = (self.flaw != Flaw::UpdateForgetsTheTtl).then_some(record.expiry_date);
        records.insert(record.id, (next, deadline));
        Ok(Update::Written(record.version + 1))
    }

    fn atomic_update(&self) -> bool {
        true
    }
}

#[maybe_async::maybe_async]
impl portable_sessions::ExpiredDeletion for Flawed {
    async fn delete_expired(&self) -> portable_sessions::session_store::Result<usize> {
        let now = time::OffsetDateTime::now_utc();
        let expiry = self.created_expiry.lock().unwrap().clone();
        let mut records = self.records.lock().unwrap();
        let before = records.len();
        records.retain(|id, (record, _)| {
            let at = expiry.get(id).copied().unwrap_or(record.expiry_date);
            at > now
        });
        Ok(before - records.len())
    }
}

/// Runs `testing::check_store` to its end, in either mode.
#[maybe_async::sync_impl]
fn run_check_store(store: &Flawed) {
    testing::check_store(store);
}

#[maybe_async::async_impl]
fn run_check_store(store: &Flawed) {
    common::block(testing::check_store(store));
}

#[maybe_async::sync_impl]
fn run_check_expired_deletion(store: &Flawed) {
    testing::check_expired_deletion(store, Expiry::Deletes);
}

#[maybe_async::async_impl]
fn run_check_expired_deletion(store: &Flawed) {
    common::block(testing::check_expired_deletion(store, Expiry::Deletes));
}

/// The message of the panic that `check` ends in.
fn failure_of(check: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let panic = std::panic::catch_unwind(check).expect_err("the suite must fail this store");
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Each flaw fails the suite, on the rule it breaks: each check is proved by a store
/// that it must fail.
#[test]
fn the_suite_fails_a_store_for_each_broken_rule() {
    for (flaw, rule) in [
        (Flaw::NonAtomicUpdate, "concurrent updates lose no step"),
        (
            Flaw::IgnoresExpiryOnLoad,
            "no longer loads once it has expired",
        ),
        (
            Flaw::UpdateForgetsTheTtl,
            "updated to expire soon no longer loads",
        ),
        (
            Flaw::DropsReservedKeys,
            "load returns the record that create wrote",
        ),
    ] {
        let message = failure_of(|| run_check_store(&Flawed::new(flaw)));
        assert!(message.contains(rule), "{flaw:?}: {message}");
    }
    // The flaw of a deletion pass shows in the deletion check; the rest of the
    // contract holds.
    let store = Flawed::new(Flaw::StaleExpiryIndex);
    run_check_store(&store);
    let message = failure_of(|| run_check_expired_deletion(&store));
    assert!(
        message.contains("leaves records whose expiry was extended"),
        "{message}"
    );
}
