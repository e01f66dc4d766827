//! A conformance suite for [`SessionStore`] implementations.
//!
//! Every store in this crate runs it, in both modes; a store of your own runs the same
//! checks with one call from a test:
//!
//! ```
//! use portable_sessions::{testing, MemoryStore};
//!
//! # #[maybe_async::maybe_async]
//! # async fn run() {
//! let store = MemoryStore::default(); // your store here
//! testing::check_store(&store).await;
//! testing::check_expired_deletion(&store, testing::Expiry::Deletes).await;
//! # }
//! # #[maybe_async::sync_impl] fn main() { run() }
//! # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()) }
//! ```
//!
//! A store that keeps an index of owners
//! ([`supports_owners`](SessionStore::supports_owners)) runs [`check_owners`] too.
//!
//! [`check_store`] includes [`check_update`], the conditional write's rules and a run
//! of concurrent writers; it fails for a store that still uses the provided,
//! non-atomic [`SessionStore::update`].
//!
//! The checks panic, with a message naming the rule that was broken, as test
//! assertions do. They use the system clock for expiry dates, and records with fresh
//! random ids, so a store that other tests use at the same time is fine, except for
//! [`check_expired_deletion`], which counts what one pass deletes and so wants a store
//! (or a table, or a key prefix) of its own.

use std::fmt::Debug;

use serde::{de::DeserializeOwned, Serialize};
use time::{Duration, OffsetDateTime};

use crate::{
    session::{Ending, Handle, Id, OwnedSession, Owner, Ownership, Record},
    session_store::{Error, Update},
    ExpiredDeletion, SessionStore,
};

/// How a store gets rid of expired records, for [`check_expired_deletion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// [`delete_expired`](ExpiredDeletion::delete_expired) removes them and counts
    /// them.
    Deletes,
    /// The backend expires records by itself (a Redis TTL, say) and `delete_expired`
    /// is a no-op that returns 0.
    Native,
}

/// An expiry date an hour from now, to the millisecond, so that stores that keep
/// milliseconds give back exactly what they were given.
fn in_an_hour() -> OffsetDateTime {
    truncate_to_millis(OffsetDateTime::now_utc() + Duration::hours(1))
}

fn an_hour_ago() -> OffsetDateTime {
    truncate_to_millis(OffsetDateTime::now_utc() - Duration::hours(1))
}

fn truncate_to_millis(at: OffsetDateTime) -> OffsetDateTime {
    let millis = at.unix_timestamp_nanos() / 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).unwrap_or(at)
}

fn record_with_values(expiry_date: OffsetDateTime) -> Record {
    let mut record = Record::new(expiry_date);
    // Keys starting with NUL are this crate's own (a session's creation time, the
    // marker a login leaves under the old id): a store keeps them like any other.
    record.insert_raw("\0created", vec![0x80, 0x01]);
    record.insert_raw("\0moved", Vec::new());
    insert(&mut record, "user_id", &42u64);
    insert(
        &mut record,
        "csrf",
        "c2VjcmV0LXRva2VuLXRoYXQtaXMtMzItYnl0ZXM",
    );
    insert(&mut record, "recent", &[1u32, 2, 3, 5, 8, 13, 21, 34]);
    insert(&mut record, "flash", &Some("saved"));
    insert(
        &mut record,
        "roles",
        &vec!["admin".to_owned(), "editor".to_owned()],
    );
    record
}

fn insert<T: Serialize + ?Sized>(record: &mut Record, key: &str, value: &T) {
    record
        .insert(key, value)
        .unwrap_or_else(|err| panic!("Record::insert({key:?}) failed: {}", err.report()));
}

fn value<T: DeserializeOwned + Serialize>(record: &Record, key: &str) -> Option<T> {
    record
        .get(key)
        .unwrap_or_else(|err| panic!("Record::get({key:?}) failed: {}", err.report()))
}

fn ok<T>(result: Result<T, Error>, what: &str) -> T {
    result.unwrap_or_else(|err| panic!("{what} failed: {}", err.report()))
}

fn same<T: PartialEq + Debug>(actual: T, expected: T, rule: &str) {
    assert!(
        actual == expected,
        "store contract broken: {rule}\n  expected: {expected:?}\n    actual: {actual:?}"
    );
}

/// Checks the [`SessionStore`] contract: `create` inserts only under a free id and
/// draws a new one on a collision; `save` inserts or replaces the whole record; `load`
/// gives back exactly what was written (its version included), and `None` for missing
/// and expired records; `delete` removes, and succeeds for a missing id; `update`
/// writes only over the expected version, advances it, and never re-creates a
/// missing, deleted or expired record, also under concurrent writers (see
/// [`check_update`]).
///
/// # Panics
///
/// Panics, naming the broken rule, if the store breaks one or returns an error, and
/// for a store that still relies on the provided, non-atomic
/// [`update`](SessionStore::update).
#[maybe_async::maybe_async]
pub async fn check_store<S: SessionStore + ?Sized>(store: &S) {
    check_basics(store).await;
    check_update(store).await;
    check_expiring(store).await;
}

/// How long the records that [`check_expiring`] watches expire after they are written:
/// long enough for a slow round trip, short enough for a test.
const SHORT: Duration = Duration::milliseconds(300);

/// Sleeps until `at` has passed on the system clock.
fn wait_until(at: OffsetDateTime) {
    while OffsetDateTime::now_utc() <= at {
        let left = at - OffsetDateTime::now_utc();
        let nap = left.clamp(Duration::milliseconds(1), Duration::milliseconds(50));
        std::thread::sleep(
            nap.try_into()
                .unwrap_or(std::time::Duration::from_millis(1)),
        );
    }
}

/// Records that go from live to expired while stored: created to expire soon, and
/// updated (or saved) to expire soon, then waited out. Each must stop loading and be
/// gone for `update` once its date has passed, whatever the backend's own expiry
/// (a store that ignores the date on load, or a TTL that a write forgets, fails).
#[maybe_async::maybe_async]
async fn check_expiring<S: SessionStore + ?Sized>(store: &S) {
    let soon = truncate_to_millis(OffsetDateTime::now_utc() + SHORT);
    let mut created = record_with_values(soon);
    ok(store.create(&mut created).await, "create");
    let mut updated = record_with_values(in_an_hour());
    ok(store.create(&mut updated).await, "create");
    let mut shortened = updated.clone();
    shortened.expiry_date = soon;
    let written = ok(store.update(&shortened).await, "update");
    same(
        written,
        Update::Written(1),
        "update over the stored version writes",
    );
    let mut saved = record_with_values(in_an_hour());
    ok(store.create(&mut saved).await, "create");
    saved.expiry_date = soon;
    ok(store.save(&saved).await, "save");
    let live = ok(store.load(&created.id).await, "load");
    // (Only while its date is still ahead: a slow store may take that long.)
    if OffsetDateTime::now_utc() < soon {
        same(live.is_some(), true, "a record loads until its expiry date");
    }

    wait_until(soon);
    for (id, how) in [
        (created.id, "created"),
        (updated.id, "updated"),
        (saved.id, "saved"),
    ] {
        let loaded = ok(store.load(&id).await, "load");
        same(
            loaded.map(|r| r.id),
            None,
            &format!("a record {how} to expire soon no longer loads once it has expired"),
        );
        let mut late = record_with_values(in_an_hour());
        late.id = id;
        late.version = if how == "updated" { 1 } else { 0 };
        let written = ok(store.update(&late).await, "update");
        same(
            written,
            Update::Gone,
            &format!("a record {how} to expire soon is gone for update once it has expired"),
        );
        let revived = ok(store.load(&id).await, "load");
        same(
            revived.map(|r| r.id),
            None,
            "update never revives an expired record",
        );
        ok(store.delete(&id).await, "delete");
    }
}

#[maybe_async::maybe_async]
async fn check_basics<S: SessionStore + ?Sized>(store: &S) {
    // create, then load what was created, at the version it was given
    let mut first = record_with_values(in_an_hour());
    first.version = 7;
    let created = store.create(&mut first).await;
    ok(created, "create");
    let loaded = ok(store.load(&first.id).await, "load");
    same(
        loaded.as_ref(),
        Some(&first),
        "load returns the record that create wrote",
    );
    let user: Option<u64> = loaded.as_ref().and_then(|r| value(r, "user_id"));
    same(user, Some(42), "values survive the store");

    // create never overwrites: a record under a taken id gets a new id
    let mut intruder = Record::new(in_an_hour());
    intruder.id = first.id;
    insert(&mut intruder, "user_id", &666u64);
    let created = store.create(&mut intruder).await;
    ok(created, "create under a taken id");
    assert!(
        intruder.id != first.id,
        "store contract broken: create under a taken id must draw a new id into the record"
    );
    let kept = ok(store.load(&first.id).await, "load");
    same(
        kept.as_ref(),
        Some(&first),
        "create does not overwrite another session",
    );
    let moved = ok(store.load(&intruder.id).await, "load");
    same(
        moved.as_ref(),
        Some(&intruder),
        "create stores the record under its new id",
    );

    // save replaces the whole record: values and expiry date
    let mut changed = first.clone();
    insert(&mut changed, "user_id", &43u64);
    changed.remove("flash");
    changed.expiry_date = in_an_hour() + Duration::minutes(5);
    let saved = store.save(&changed).await;
    ok(saved, "save");
    let reloaded = ok(store.load(&first.id).await, "load");
    same(
        reloaded.as_ref(),
        Some(&changed),
        "save replaces the whole record",
    );

    // save inserts a record the store has not seen, at the version it was given
    let mut fresh = record_with_values(in_an_hour());
    fresh.version = u64::MAX - 1;
    let saved = store.save(&fresh).await;
    ok(saved, "save of a new record");
    let loaded = ok(store.load(&fresh.id).await, "load");
    same(
        loaded.as_ref(),
        Some(&fresh),
        "save inserts a missing record",
    );

    // a record without values, and one with a large value
    let mut empty = Record::new(in_an_hour());
    let created = store.create(&mut empty).await;
    ok(created, "create of an empty record");
    let loaded = ok(store.load(&empty.id).await, "load");
    same(
        loaded.as_ref(),
        Some(&empty),
        "an empty record loads as written",
    );
    let mut large = Record::new(in_an_hour());
    insert(&mut large, "blob", &vec![0xa5u8; 64 * 1024]);
    let created = store.create(&mut large).await;
    ok(created, "create of a 64 KiB record");
    let loaded = ok(store.load(&large.id).await, "load");
    same(
        loaded.as_ref(),
        Some(&large),
        "a 64 KiB record loads as written",
    );

    // missing and expired records do not load
    let missing = ok(store.load(&Id::default()).await, "load of a missing id");
    same(missing, None, "load of a missing id returns None");
    let mut expired = record_with_values(an_hour_ago());
    expired.id = first.id;
    let created = store.create(&mut expired).await;
    ok(created, "create of an expired record");
    assert!(
        expired.id != first.id,
        "store contract broken: create of an expired record under a taken id must draw a \
         new id too"
    );
    let kept = ok(store.load(&first.id).await, "load");
    same(
        kept.as_ref(),
        Some(&changed),
        "create of an expired record does not overwrite another session",
    );
    let loaded = ok(store.load(&expired.id).await, "load");
    same(
        loaded,
        None,
        "an expired record never loads (created expired)",
    );
    let mut lapsed = changed.clone();
    lapsed.expiry_date = an_hour_ago();
    let saved = store.save(&lapsed).await;
    ok(saved, "save of an expired record");
    let loaded = ok(store.load(&lapsed.id).await, "load");
    same(
        loaded,
        None,
        "an expired record never loads (saved expired)",
    );

    // delete removes, and a missing id is no error
    let deleted = store.delete(&fresh.id).await;
    ok(deleted, "delete");
    let loaded = ok(store.load(&fresh.id).await, "load");
    same(loaded, None, "a deleted record does not load");
    let deleted = store.delete(&fresh.id).await;
    ok(deleted, "delete of a missing id");
    let deleted = store.delete(&Id::default()).await;
    ok(deleted, "delete of an id never seen");
    let other = ok(store.load(&intruder.id).await, "load");
    same(
        other.as_ref(),
        Some(&intruder),
        "delete removes only its own record",
    );

    for id in [intruder.id, empty.id, large.id, expired.id, lapsed.id] {
        let deleted = store.delete(&id).await;
        ok(deleted, "delete");
    }
}

/// Checks [`ExpiredDeletion`]: one pass of
/// [`delete_expired`](ExpiredDeletion::delete_expired) removes the expired records
/// and counts them ([`Expiry::Deletes`]), or is a no-op returning 0
/// ([`Expiry::Native`]); live records are untouched either way, and expired ones
/// never load.
///
/// Give it a store of its own: it counts what one pass deletes, so expired records
/// that other code leaves in the same store at the same time make it fail.
///
/// # Panics
///
/// Panics, naming the broken rule, if the store breaks one or returns an error.
#[maybe_async::maybe_async]
pub async fn check_expired_deletion<S: ExpiredDeletion + ?Sized>(store: &S, expiry: Expiry) {
    let mut live = Vec::new();
    for _ in 0..2 {
        let mut record = record_with_values(in_an_hour());
        let created = store.create(&mut record).await;
        ok(created, "create");
        live.push(record);
    }
    let mut expired = Vec::new();
    for _ in 0..3 {
        let mut record = record_with_values(an_hour_ago());
        let created = store.create(&mut record).await;
        ok(created, "create of an expired record");
        expired.push(record.id);
    }
    // A live record that is then saved with a past expiry date expires too.
    let mut lapsed = record_with_values(in_an_hour());
    let created = store.create(&mut lapsed).await;
    ok(created, "create");
    lapsed.expiry_date = an_hour_ago();
    let saved = store.save(&lapsed).await;
    ok(saved, "save");
    expired.push(lapsed.id);

    let deleted = ok(store.delete_expired().await, "delete_expired");
    match expiry {
        Expiry::Deletes => assert!(
            deleted >= expired.len(),
            "store contract broken: delete_expired removed {deleted} records, \
             but {} had expired",
            expired.len()
        ),
        Expiry::Native => same(
            deleted,
            0,
            "a store with native expiry deletes nothing itself",
        ),
    }
    if expiry == Expiry::Deletes {
        let again = ok(store.delete_expired().await, "delete_expired");
        same(again, 0, "a second pass finds nothing left to delete");
    }

    // Records that were to expire soon, then extended past their first date (by a
    // conditional write and by a save), are live: a pass after that first date must
    // leave them (a store that deletes by a stale copy of the date fails).
    let soon = truncate_to_millis(OffsetDateTime::now_utc() + SHORT);
    let mut extended = Vec::new();
    for by_update in [true, false] {
        let mut record = record_with_values(soon);
        ok(store.create(&mut record).await, "create");
        record.expiry_date = in_an_hour();
        if by_update {
            let written = ok(store.update(&record).await, "update");
            same(
                written,
                Update::Written(1),
                "update over the stored version writes",
            );
            record.version = 1;
        } else {
            ok(store.save(&record).await, "save");
        }
        extended.push(record);
    }
    wait_until(soon);
    let swept = ok(store.delete_expired().await, "delete_expired");
    if expiry == Expiry::Deletes {
        same(
            swept,
            0,
            "delete_expired leaves records whose expiry was extended",
        );
    }
    for record in &extended {
        let loaded = ok(store.load(&record.id).await, "load");
        same(
            loaded.as_ref(),
            Some(record),
            "a record extended past its first expiry date survives delete_expired",
        );
        ok(store.delete(&record.id).await, "delete");
    }
    for id in &expired {
        let loaded = ok(store.load(id).await, "load");
        same(loaded, None, "an expired record never loads");
    }
    for record in &live {
        let loaded = ok(store.load(&record.id).await, "load");
        same(
            loaded.as_ref(),
            Some(record),
            "delete_expired leaves live records alone",
        );
        let deleted = store.delete(&record.id).await;
        ok(deleted, "delete");
    }
}

/// How many concurrent writers [`check_update`] runs, and how many steps each takes.
const WRITERS: u64 = 8;
const STEPS: u64 = 25;

/// Checks the conditional write, [`SessionStore::update`]: written only over the
/// expected version, which it advances by one; [`Update::Conflict`] for a stale
/// version, with nothing written; [`Update::Gone`] for a record that is missing,
/// deleted or expired, with nothing created; and, with 8 concurrent writers each
/// counting 25 steps through load-update-retry loops, a count of exactly 200. The
/// writers run on threads of their own in both modes (in async mode each thread
/// drives its writer with a minimal executor, `futures_lite::future::block_on`), so
/// that their steps interleave for real, wherever a store's update suspends or not.
/// In async mode this blocks the calling thread while the writers run (and while
/// [`check_store`] waits for records to expire): a store whose I/O is driven by the
/// caller's runtime needs a runtime with other threads to drive it (tokio's
/// multi-threaded one, say), and its futures must find the runtime's context on
/// threads of their own (enter it in the store's methods).
///
/// [`check_store`] runs it too.
///
/// # Panics
///
/// Panics, naming the broken rule, if the store breaks one or returns an error, or
/// if [`atomic_update`](SessionStore::atomic_update) says that the store still uses
/// the provided, non-atomic `update`.
#[maybe_async::maybe_async]
pub async fn check_update<S: SessionStore + ?Sized>(store: &S) {
    assert!(
        store.atomic_update(),
        "store contract broken: {store:?} uses the provided SessionStore::update, which is \
         not atomic: two requests of one session can both write, losing an update or \
         reviving a deleted session. Override `update` with one atomic compare-and-write \
         (see the SessionStore docs, \"Making update atomic\"), then return true from \
         `atomic_update`."
    );

    let mut record = record_with_values(in_an_hour());
    record.version = 41;
    ok(store.create(&mut record).await, "create");
    let mut first = ok(store.load(&record.id).await, "load").expect("created");
    let mut second = first.clone();
    same(first.version, 41, "load returns the version create stored");

    insert(&mut first, "user_id", &7u64);
    first.expiry_date = in_an_hour() + Duration::minutes(10);
    let written = ok(store.update(&first).await, "update");
    same(
        written,
        Update::Written(42),
        "update over the stored version writes, at the next version",
    );
    let loaded = ok(store.load(&record.id).await, "load").expect("updated");
    let mut expected = first.clone();
    expected.version = 42;
    same(
        &loaded,
        &expected,
        "update replaces values and expiry date, and stores the next version",
    );

    insert(&mut second, "user_id", &8u64);
    let refused = ok(store.update(&second).await, "update of a stale version");
    same(
        refused,
        Update::Conflict,
        "update over a version that is no longer stored is a conflict",
    );
    let kept = ok(store.load(&record.id).await, "load").expect("still there");
    same(&kept, &expected, "a conflicting update writes nothing");

    let never = record_with_values(in_an_hour());
    let gone = ok(store.update(&never).await, "update of a missing record");
    same(gone, Update::Gone, "update of a missing record is gone");
    let created = ok(store.load(&never.id).await, "load");
    same(created, None, "update never inserts");

    let mut lapsing = record_with_values(in_an_hour());
    ok(store.create(&mut lapsing).await, "create");
    let mut lapsed = lapsing.clone();
    lapsed.expiry_date = an_hour_ago();
    ok(store.save(&lapsed).await, "save of an expired record");
    let expired = ok(store.update(&lapsing).await, "update of an expired record");
    same(expired, Update::Gone, "update of an expired record is gone");
    let revived = ok(store.load(&lapsing.id).await, "load");
    same(revived, None, "update never revives an expired record");

    ok(store.delete(&record.id).await, "delete");
    let deleted = ok(store.update(&kept).await, "update of a deleted record");
    same(deleted, Update::Gone, "update of a deleted record is gone");
    let revived = ok(store.load(&record.id).await, "load");
    same(revived, None, "update never revives a deleted record");

    // Concurrent writers: every step counts once.
    let mut counter = Record::new(in_an_hour());
    ok(store.create(&mut counter).await, "create");
    run_writers(store, counter.id).await;
    let counted = ok(store.load(&counter.id).await, "load").expect("the counter");
    let total: Option<u64> = value(&counted, "count");
    same(
        total,
        Some(WRITERS * STEPS),
        "concurrent updates lose no step (is update atomic?)",
    );
    same(
        counted.version,
        WRITERS * STEPS,
        "each update advances the version by one",
    );
    for id in [counter.id, lapsing.id] {
        ok(store.delete(&id).await, "delete");
    }
}

/// Adds one to the record's `count` with a load-update-retry loop.
#[maybe_async::maybe_async]
async fn count_once<S: SessionStore + ?Sized>(store: &S, id: Id) {
    for _ in 0..100_000 {
        let loaded = ok(store.load(&id).await, "load");
        let mut record = loaded.expect("store contract broken: a record vanished under update");
        let count: u64 = value(&record, "count").unwrap_or(0);
        insert(&mut record, "count", &(count + 1));
        let outcome = ok(store.update(&record).await, "update");
        match outcome {
            Update::Written(_) => return,
            Update::Conflict => {}
            Update::Gone => panic!("store contract broken: a live record was gone for update"),
        }
    }
    panic!("store contract broken: update kept conflicting with no writer left to win");
}

/// Runs the writers on threads of their own, and passes a writer's panic on as it
/// was, so that the broken rule is what the caller sees.
fn on_threads<S: SessionStore + ?Sized>(store: &S, writer: impl Fn(&S) + Sync) {
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| scope.spawn(|| writer(store)))
            .collect();
        for writer in writers {
            if let Err(panic) = writer.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

#[maybe_async::sync_impl]
fn run_writers<S: SessionStore + ?Sized>(store: &S, id: Id) {
    on_threads(store, |store| {
        for _ in 0..STEPS {
            count_once(store, id);
        }
    });
}

#[maybe_async::async_impl]
async fn run_writers<S: SessionStore + ?Sized>(store: &S, id: Id) {
    on_threads(store, |store| {
        futures_lite::future::block_on(async {
            for _ in 0..STEPS {
                count_once(store, id).await;
            }
        });
    });
}

/// Checks a store's index of owners (see
/// [A user's sessions](SessionStore#a-users-sessions)): a record's
/// [`ownership`](Record::ownership) round trips through every write; an owner's
/// listing holds exactly its live records (under their [`Handle`]s, with their dates
/// and values), follows an owner changed or taken away by `update` or `save`, and
/// drops records that are deleted or expired; [`end_owned`](SessionStore::end_owned)
/// ends exactly what its [`Ending`] names, never another owner's session, and an
/// ended session is gone for `load` and `update`. Owners are named at random, so a
/// store that other tests use at the same time is fine.
///
/// # Panics
///
/// Panics, naming the broken rule, if the store breaks one, returns an error, or
/// does not [`support_owners`](SessionStore::supports_owners).
#[maybe_async::maybe_async]
pub async fn check_owners<S: SessionStore + ?Sized>(store: &S) {
    assert!(
        store.supports_owners(),
        "{store:?} does not support owners: SessionStore::supports_owners is false"
    );
    // Names that quoting, pattern characters and non-ASCII text must not confuse.
    let alice = owner(&format!("alice '%_\\ ü {}", Id::default()));
    let bob = owner(&format!("bob {}", Id::default()));
    let base = truncate_to_millis(OffsetDateTime::now_utc());
    let owned_by = |who: &Owner, seconds: i64, device: &str| {
        let mut record = record_with_values(in_an_hour());
        let at = base + Duration::seconds(seconds);
        record.ownership = Some(Ownership {
            owner: who.clone(),
            created_at: at,
            written_at: at + Duration::milliseconds(5),
        });
        insert(&mut record, "device", device);
        record
    };

    // Filed by each kind of write: create, save, and an update that sets the owner.
    let mut first = owned_by(&alice, 0, "laptop");
    ok(store.create(&mut first).await, "create with an owner");
    let second = owned_by(&alice, 1, "phone");
    ok(store.save(&second).await, "save with an owner");
    let mut third = record_with_values(in_an_hour());
    ok(store.create(&mut third).await, "create without an owner");
    let mut third_owned = owned_by(&alice, 2, "tablet");
    third_owned.id = third.id;
    third_owned.version = third.version;
    let written = ok(store.update(&third_owned).await, "update setting an owner");
    same(
        written,
        Update::Written(third.version + 1),
        "update setting an owner writes",
    );
    third_owned.version += 1;
    let mut bobs = owned_by(&bob, 0, "desktop");
    ok(store.create(&mut bobs).await, "create with another owner");
    let mut nobody = record_with_values(in_an_hour());
    ok(store.create(&mut nobody).await, "create without an owner");

    let loaded = ok(store.load(&first.id).await, "load").expect("created");
    same(
        &loaded.ownership,
        &first.ownership,
        "load gives back the ownership create stored",
    );
    let loaded = ok(store.load(&third.id).await, "load").expect("updated");
    same(
        &loaded,
        &third_owned,
        "load gives back the ownership update stored",
    );
    let loaded = ok(store.load(&nobody.id).await, "load").expect("created");
    same(
        loaded.ownership,
        None,
        "a record without an owner loads without one",
    );

    let listed = listing(store, &alice).await;
    same(
        listed.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        handles(&[&first, &second, &third_owned]),
        "list_owned gives exactly the owner's live records, by handle",
    );
    for (handle, session) in &listed {
        let record = [&first, &second, &third_owned]
            .into_iter()
            .find(|r| Handle::of(&r.id) == *handle)
            .expect("listed");
        let ownership = record.ownership.as_ref().expect("owned");
        same(session.owner(), &alice, "a listed session names its owner");
        same(
            session.created_at(),
            ownership.created_at,
            "a listing gives created_at",
        );
        same(
            session.written_at(),
            ownership.written_at,
            "a listing gives written_at",
        );
        same(
            session.expiry_date(),
            record.expiry_date,
            "a listing gives the expiry date",
        );
        let device: Option<String> = ok(session.get("device"), "OwnedSession::get");
        same(
            device,
            value(record, "device"),
            "a listing gives the record's values",
        );
        same(
            session.is_current(),
            false,
            "a store's listing marks no session current",
        );
    }
    same(
        listing(store, &bob).await.len(),
        1,
        "another owner's listing holds only its own",
    );

    // Ending never reaches another owner's session.
    let ended = ok(
        store
            .end_owned(&alice, Ending::One(Handle::of(&bobs.id)))
            .await,
        "end_owned",
    );
    same(
        ended,
        Vec::new(),
        "end_owned never ends another owner's session",
    );
    let kept = ok(store.load(&bobs.id).await, "load");
    same(
        kept.is_some(),
        true,
        "end_owned never ends another owner's session",
    );

    // Moving: update to another owner, and to none (a login's marker).
    let mut moved = third_owned.clone();
    moved.ownership.as_mut().expect("owned").owner = bob.clone();
    let written = ok(store.update(&moved).await, "update changing the owner");
    same(
        written,
        Update::Written(moved.version + 1),
        "update changing the owner writes",
    );
    moved.version += 1;
    same(
        listing(store, &alice).await.len(),
        2,
        "update to another owner takes the record out of the old owner's listing",
    );
    same(
        listing(store, &bob).await.len(),
        2,
        "update to another owner files the record under the new one",
    );
    let mut unowned = moved.clone();
    unowned.ownership = None;
    let written = ok(store.update(&unowned).await, "update taking the owner away");
    same(
        written,
        Update::Written(moved.version + 1),
        "update taking the owner away writes",
    );
    same(
        listing(store, &bob).await.len(),
        1,
        "update without an owner takes the record out of the listing",
    );

    // Expired and deleted records are not listed.
    let mut lapsed = second.clone();
    lapsed.expiry_date = an_hour_ago();
    ok(store.save(&lapsed).await, "save of an expired record");
    same(
        listing(store, &alice)
            .await
            .iter()
            .map(|(h, _)| *h)
            .collect::<Vec<_>>(),
        handles(&[&first]),
        "an expired record is not listed",
    );
    ok(store.delete(&first.id).await, "delete");
    same(
        listing(store, &alice).await.len(),
        0,
        "a deleted record is not listed",
    );

    // Each ending.
    let mut sessions = Vec::new();
    for seconds in 0..4 {
        let mut record = owned_by(&alice, seconds, "device");
        ok(store.create(&mut record).await, "create with an owner");
        sessions.push(record);
    }
    let handle = |i: usize| Handle::of(&sessions[i].id);
    let ended = ok(
        store.end_owned(&alice, Ending::One(handle(0))).await,
        "end_owned One",
    );
    same(
        ended,
        vec![handle(0)],
        "Ending::One ends the session with that handle",
    );
    let gone = ok(
        store.update(&sessions[0]).await,
        "update of an ended session",
    );
    same(
        gone,
        Update::Gone,
        "an ended session is gone for update, never revived",
    );
    same(
        ok(store.load(&sessions[0].id).await, "load"),
        None,
        "an ended session does not load",
    );
    let ended = ok(
        store.end_owned(&alice, Ending::AllButNewest(2)).await,
        "end_owned AllButNewest",
    );
    same(
        ended,
        vec![handle(1)],
        "Ending::AllButNewest ends the oldest beyond the limit",
    );
    let mut ended = ok(
        store.end_owned(&alice, Ending::AllBut(handle(3))).await,
        "end_owned AllBut",
    );
    ended.sort();
    same(
        ended,
        vec![handle(2)],
        "Ending::AllBut ends all but that one",
    );
    let ended = ok(store.end_owned(&alice, Ending::All).await, "end_owned All");
    same(
        ended,
        vec![handle(3)],
        "Ending::All ends every session of the owner",
    );
    same(
        listing(store, &alice).await.len(),
        0,
        "nothing is listed after Ending::All",
    );
    same(
        listing(store, &bob).await.len(),
        1,
        "Ending::All leaves other owners alone",
    );
    let ended = ok(store.end_owned(&alice, Ending::All).await, "end_owned All");
    same(
        ended,
        Vec::new(),
        "ending what is already ended ends nothing",
    );

    for id in [bobs.id, nobody.id, third.id] {
        ok(store.delete(&id).await, "delete");
    }
    same(
        listing(store, &bob).await.len(),
        0,
        "a deleted record is not listed",
    );
}

fn owner(name: &str) -> Owner {
    ok(Owner::new(name), "Owner::new")
}

fn handles(records: &[&Record]) -> Vec<Handle> {
    let mut handles: Vec<Handle> = records.iter().map(|r| Handle::of(&r.id)).collect();
    handles.sort();
    handles
}

/// `owner`'s listing, sorted by handle.
#[maybe_async::maybe_async]
async fn listing<S: SessionStore + ?Sized>(
    store: &S,
    owner: &Owner,
) -> Vec<(Handle, OwnedSession)> {
    let listed = ok(store.list_owned(owner).await, "list_owned");
    let mut listed: Vec<_> = listed.into_iter().map(|s| (s.handle(), s)).collect();
    listed.sort_by_key(|(h, _)| *h);
    listed
}
