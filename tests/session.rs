//! `Session`, `Expiry` and `SessionManager` through the public API, in both modes:
//! lazy loading, typed values, modification tracking, the write rules, `cycle_id`'s
//! failure guarantee on a faulty store, expiry with an injected clock, and the cookie
//! round trip.

mod common;

use std::sync::{
    atomic::{AtomicI64, AtomicUsize, Ordering},
    Arc,
};

use common::{block, FaultyStore};

use portable_sessions::{
    session::{Expiry, Id, Record, Session, SessionConfig},
    session_store::{Error, Result, Update},
    ExpiredDeletion, MemoryStore, SameSite, SessionManager, SessionStore,
};
use time::{Duration, OffsetDateTime};

tests_in_both_modes!(
    new_session_is_created_on_save_under_a_fresh_id,
    stored_session_loads_its_values,
    unknown_id_gives_a_fresh_session_never_the_clients_id,
    wrong_type_is_a_decode_error_not_a_panic,
    only_changes_mark_the_session_modified,
    reserved_keys_are_refused_and_hidden,
    delete_removes_the_record_and_never_reuses_the_id,
    flush_ends_the_session_without_loading_it,
    cycle_id_moves_the_record,
    cycle_id_failing_to_create_leaves_the_old_id,
    cycle_id_failing_to_retire_the_old_id_leaves_it,
    load_errors_are_returned_and_retried,
    expiry_dates_follow_the_policy,
    lifetime_cap_ends_even_a_refreshed_session,
    manager_sets_the_cookie_with_its_attributes,
    manager_round_trip_writes_only_when_needed,
    manager_removes_bad_and_unknown_cookies,
    manager_removes_the_cookie_after_flush_not_after_emptying,
    manager_sends_the_new_id_after_cycle_id,
    refresh_on_request_is_throttled,
    session_end_cookie_has_no_max_age,
    store_errors_fail_finish,
    a_stale_duplicate_cookie_does_not_lock_the_user_out,
    cycle_id_of_an_emptied_session_moves_it,
    insert_takes_a_value_or_a_reference,
    remember_me_is_a_per_session_expiry,
    planted_cookies_never_log_the_user_out,
    an_unreadable_session_keeps_its_cookie,
);

/// A store whose records cannot be read by this build (as a newer format during a
/// rolling deploy looks to an older one).
#[derive(Debug, Default)]
struct Unreadable(MemoryStore);

#[maybe_async::maybe_async]
impl SessionStore for Unreadable {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.0.create(record).await
    }
    async fn save(&self, record: &Record) -> Result<()> {
        self.0.save(record).await
    }
    async fn load(&self, _: &Id) -> Result<Option<Record>> {
        Err(Error::decode(
            "record format version 9 where 4 was expected",
        ))
    }
    async fn delete(&self, id: &Id) -> Result<()> {
        self.0.delete(id).await
    }
    async fn update(&self, record: &Record) -> Result<Update> {
        self.0.update(record).await
    }
    fn atomic_update(&self) -> bool {
        true
    }
}

/// A cookie whose record cannot be read is not removed: another build (or a fixed
/// one) may still read it.
#[maybe_async::maybe_async]
async fn an_unreadable_session_keeps_its_cookie() {
    let manager = SessionManager::new(Unreadable::default());
    let cookie = format!("id={}", Id::default());
    let session = manager.begin([cookie.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user, None, "read as no session");
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None, "and its cookie kept");
}

/// Cookie tossing: ids planted for longer paths or a parent domain come first. The
/// real cookie is found even behind four of them (the last value is always
/// tried), and when it cannot be (behind more, in the middle) no removal is sent
/// that would delete it. Without a `Path`, a removal would land on the request's
/// own path: none is sent.
#[maybe_async::maybe_async]
async fn planted_cookies_never_log_the_user_out() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    let id = stored(&probe, "alice").await;
    let planted: Vec<Id> = (0..8).map(|_| Id::default()).collect();
    let cookies = |ids: &[Id]| {
        ids.iter()
            .map(|id| format!("id={id}"))
            .collect::<Vec<_>>()
            .join("; ")
    };

    // Four planted, then the real one.
    let header = format!("{}; id={id}", cookies(&planted[..4]));
    let session = manager.begin([header.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"), "the last value is tried");
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None);

    // The real one among more than can be tried: not found, and not removed.
    let header = format!(
        "{}; id={id}; {}",
        cookies(&planted[..4]),
        cookies(&planted[4..])
    );
    let session = manager.begin([header.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user, None);
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None, "no removal that could delete the real cookie");
    let kept = probe.store.load(&id).await.unwrap();
    assert!(kept.is_some());

    // Every value tried and none loads: the manager's own cookie is removed.
    let header = cookies(&planted[..4]);
    let session = manager.begin([header.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user, None);
    let set = manager.finish(&session).await.unwrap().expect("a removal");
    assert!(set.starts_with("id=;") && set.contains("Path=/"), "{set}");

    // No Path: no removal, ever.
    let pathless = SessionManager::from_shared(probe.clone())
        .with_config(probe.config(HOUR))
        .with_path(None);
    for header in ["id=garbage".to_owned(), format!("id={}", planted[0])] {
        let session = pathless.begin([header.as_str()]);
        let user = session.get::<String>("user").await.unwrap();
        assert_eq!(user, None);
        let set = pathless.finish(&session).await.unwrap();
        assert_eq!(set, None, "{header}");
    }
}

/// "Remember me": one session gets its own expiry policy, kept across requests,
/// `clear` and `cycle_id`; the cookie follows it (a `Max-Age`, then none again);
/// `expiry_date`/`expiry_age` report it; `flush` drops it.
#[maybe_async::maybe_async]
async fn remember_me_is_a_per_session_expiry() {
    let probe = Probe::new();
    let manager =
        SessionManager::from_shared(probe.clone()).with_config(probe.config(Expiry::OnSessionEnd));
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    let policy = session.expiry().await.unwrap();
    assert_eq!(policy, Expiry::OnSessionEnd);
    let remembered = Expiry::OnInactivity(Duration::days(30));
    session.set_expiry(Some(remembered)).await.unwrap();
    let policy = session.expiry().await.unwrap();
    assert_eq!(policy, remembered);
    let date = session.expiry_date().await.unwrap();
    assert_eq!(date, probe.now() + Duration::days(30));
    let age = session.expiry_age().await.unwrap();
    assert_eq!(age, Duration::days(30));
    let set = manager.finish(&session).await.unwrap().unwrap();
    let cookie = cookie::Cookie::parse(set.as_str()).unwrap();
    assert_eq!(cookie.max_age(), Some(Duration::days(30)));
    let id = session.id().await.unwrap().unwrap();
    let stored = probe.store.load(&id).await.unwrap().unwrap();
    assert_eq!(stored.expiry_date, probe.now() + Duration::days(30));
    assert_eq!(
        stored.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );

    // A later request keeps the policy: its write slides 30 days, not 24 hours.
    probe.advance(3_600);
    let cookie_pair = pair(&set);
    let session = manager.begin([cookie_pair.as_str()]);
    let policy = session.expiry().await.unwrap();
    assert_eq!(policy, remembered);
    let date = session.expiry_date().await.unwrap();
    assert_eq!(date, stored.expiry_date, "unchanged: the stored date");
    let age = session.expiry_age().await.unwrap();
    assert_eq!(age, Duration::days(30) - Duration::hours(1));
    session.clear().await.unwrap();
    session.insert("n", 1u8).await.unwrap();
    session.cycle_id().await.unwrap();
    let set = manager.finish(&session).await.unwrap().unwrap();
    let cookie = cookie::Cookie::parse(set.as_str()).unwrap();
    assert_eq!(
        cookie.max_age(),
        Some(Duration::days(30)),
        "kept by clear and cycle_id"
    );
    let id = session.id().await.unwrap().unwrap();
    let stored = probe.store.load(&id).await.unwrap().unwrap();
    assert_eq!(stored.expiry_date, probe.now() + Duration::days(30));

    // Going back to the configured policy sends a browser-session cookie again,
    // though the id stays.
    let cookie_pair = pair(&set);
    let session = manager.begin([cookie_pair.as_str()]);
    session.set_expiry(None).await.unwrap();
    let policy = session.expiry().await.unwrap();
    assert_eq!(policy, Expiry::OnSessionEnd);
    let set = manager.finish(&session).await.unwrap();
    let set = set.expect("the cookie changes");
    let cookie = cookie::Cookie::parse(set.as_str()).unwrap();
    assert_eq!(cookie.max_age(), None);
    assert_eq!(pair(&set), cookie_pair, "same id");
    let stored = probe.store.load(&id).await.unwrap().unwrap();
    assert_eq!(
        stored.expiry_date,
        probe.now() + SessionConfig::DEFAULT_SESSION_END_TTL
    );
    // Setting what is already there changes nothing.
    let session = manager.begin([cookie_pair.as_str()]);
    session.set_expiry(None).await.unwrap();
    let modified = session.is_modified().await;
    assert!(!modified);

    // flush drops it with the session.
    let session = manager.begin([cookie_pair.as_str()]);
    session.set_expiry(Some(remembered)).await.unwrap();
    session.flush().await.unwrap();
    let policy = session.expiry().await.unwrap();
    assert_eq!(policy, Expiry::OnSessionEnd);
}

/// `insert` takes its value by value or by reference, as tower-sessions' does; the
/// crate's `time` is re-exported, so `Expiry` takes a duration without a version
/// mismatch.
#[maybe_async::maybe_async]
async fn insert_takes_a_value_or_a_reference() {
    use portable_sessions::time::Duration as SessionDuration;
    let probe = Probe::new();
    let session = probe.session(None, Expiry::OnInactivity(SessionDuration::minutes(5)));
    let owned = String::from("alice");
    session.insert("by_value", owned.clone()).await.unwrap();
    session.insert("by_reference", &owned).await.unwrap();
    session.insert("number", 7u32).await.unwrap();
    session.insert("list", vec![1u8, 2]).await.unwrap();
    let by_value = session.get::<String>("by_value").await.unwrap();
    let by_reference = session.get::<String>("by_reference").await.unwrap();
    let number = session.get::<u32>("number").await.unwrap();
    let list = session.get::<Vec<u8>>("list").await.unwrap();
    assert_eq!(by_value, by_reference);
    assert_eq!(
        (by_value.as_deref(), number, list),
        (Some("alice"), Some(7), Some(vec![1, 2]))
    );
}

#[maybe_async::maybe_async]
async fn a_stale_duplicate_cookie_does_not_lock_the_user_out() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    let id = stored(&probe, "alice").await;
    let stale = Id::default(); // a parent domain's old cookie, sent first

    for header in [
        format!("id={stale}; id={id}"),
        format!("id={stale}; theme=dark; id=\"{id}\""),
        format!("id=garbage; id={stale}; id={id}"),
    ] {
        let session = manager.begin([header.as_str()]);
        let user = session.get::<String>("user").await.unwrap();
        assert_eq!(user.as_deref(), Some("alice"), "{header}");
        let set = manager.finish(&session).await.unwrap();
        assert_eq!(set, None, "nothing removed or replaced: {header}");
    }
    // Two headers, the valid cookie in the second.
    let first = format!("id={stale}");
    let second = format!("id={id}");
    let session = manager.begin([first.as_str(), second.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
    // A logout that never loads ends whichever of them is the session.
    session.flush().await.unwrap();
    let gone = probe.store.load(&id).await.unwrap();
    assert_eq!(gone, None);

    // When none loads, the cookie is removed.
    let other = Id::default();
    let header = format!("id={stale}; id={other}");
    let session = manager.begin([header.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user, None);
    let set = manager.finish(&session).await.unwrap().expect("a removal");
    assert!(set.starts_with("id=;"), "{set}");
}

#[maybe_async::maybe_async]
async fn cycle_id_of_an_emptied_session_moves_it() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    let id = stored(&probe, "alice").await;
    let cookie = format!("id={id}");
    let session = manager.begin([cookie.as_str()]);
    session.clear().await.unwrap();
    session.cycle_id().await.unwrap();
    let set = manager.finish(&session).await.unwrap().expect("the new id");
    let new_id = id_of(&pair(&set));
    assert_ne!(new_id, id);
    // An emptied session is a session like any other: moved, empty, and the old id
    // left with the marker that keeps requests in flight from writing it.
    let moved = probe.store.load(&new_id).await.unwrap().expect("moved");
    assert_eq!(moved.keys().filter(|k| !k.starts_with('\0')).count(), 0);
    let late = manager.begin([cookie.as_str()]);
    let refused = late.insert("user", "mallory").await.unwrap_err();
    assert!(refused.is_session_gone());
    assert_eq!(
        probe.store.len(),
        2,
        "the new record and the old id's marker"
    );
}

fn id_of(cookie: &str) -> Id {
    cookie["id=".len()..].parse().expect("an id")
}

/// A [`FaultyStore`] (operations fail on demand) over a [`MemoryStore`] with an
/// injected clock, counting the calls that reach it.
#[derive(Debug)]
struct Probe {
    faulty: FaultyStore,
    /// The memory store under it, for checks that bypass the probe.
    store: MemoryStore,
    clock: Arc<AtomicI64>,
    loads: AtomicUsize,
    writes: AtomicUsize,
    /// Makes each load take this many milliseconds (blocking), to widen races.
    slow_load_ms: AtomicUsize,
}

const START: i64 = 1_700_000_000;

impl Probe {
    fn new() -> Arc<Self> {
        let clock = Arc::new(AtomicI64::new(START));
        let read = clock.clone();
        let store = MemoryStore::with_clock(move || at(read.load(Ordering::SeqCst)));
        Arc::new(Self {
            faulty: FaultyStore {
                inner: store.clone(),
                faults: Arc::default(),
            },
            store,
            clock,
            loads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            slow_load_ms: AtomicUsize::new(0),
        })
    }

    /// A session configuration reading this store's clock.
    fn config(&self, expiry: Expiry) -> SessionConfig {
        let clock = self.clock.clone();
        SessionConfig::new(expiry).with_clock(move || at(clock.load(Ordering::SeqCst)))
    }

    fn session(self: &Arc<Self>, id: Option<Id>, expiry: Expiry) -> Session {
        Session::new(self.clone(), id, self.config(expiry))
    }

    fn advance(&self, seconds: i64) {
        self.clock.fetch_add(seconds, Ordering::SeqCst);
    }

    fn now(&self) -> OffsetDateTime {
        at(self.clock.load(Ordering::SeqCst))
    }

    fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }
}

#[maybe_async::maybe_async]
impl SessionStore for Probe {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.faulty.create(record).await?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        self.faulty.save(record).await?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let delay = self.slow_load_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay as u64));
        }
        pause().await;
        self.faulty.load(id).await
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        self.faulty.delete(id).await
    }

    async fn update(&self, record: &Record) -> Result<Update> {
        let outcome = self.faulty.update(record).await?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(outcome)
    }

    fn atomic_update(&self) -> bool {
        true
    }
}

/// A real await point in async mode, as a network store has: lets futures on one
/// executor interleave there. Nothing in blocking mode.
#[maybe_async::async_impl]
async fn pause() {
    futures_lite::future::yield_now().await;
}

#[maybe_async::sync_impl]
fn pause() {}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

const HOUR: Expiry = Expiry::OnInactivity(Duration::hours(1));

/// Stores a session holding `user = name` and returns its id.
#[maybe_async::maybe_async]
async fn stored(probe: &Arc<Probe>, name: &str) -> Id {
    let session = probe.session(None, HOUR);
    session.insert("user", name).await.unwrap();
    session.save().await.unwrap();
    let id = session.id().await.unwrap();
    id.expect("saved")
}

#[maybe_async::maybe_async]
async fn new_session_is_created_on_save_under_a_fresh_id() {
    let probe = Probe::new();
    let session = probe.session(None, HOUR);
    let empty = session.is_empty().await.unwrap();
    assert!(empty);
    let id = session.id().await.unwrap();
    assert_eq!(id, None, "a new session has no id until it is stored");
    assert_eq!(Probe::count(&probe.loads), 0, "no cookie, no load");

    session.insert("n", 1u32).await.unwrap();
    session.save().await.unwrap();
    let id = session.id().await.unwrap().expect("stored");
    let record = probe.store.load(&id).await.unwrap().expect("in the store");
    assert_eq!(record.get::<u32>("n").unwrap(), Some(1));
    assert_eq!(record.expiry_date, probe.now() + Duration::hours(1));
}

#[maybe_async::maybe_async]
async fn stored_session_loads_its_values() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    assert_eq!(Probe::count(&probe.loads), 0, "lazy: nothing loaded yet");
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
    let again = session.clone().get::<String>("user").await.unwrap();
    assert_eq!(again, user);
    assert_eq!(Probe::count(&probe.loads), 1, "loaded once for all clones");
    let stored_id = session.id().await.unwrap();
    assert_eq!(stored_id, Some(id));
}

#[maybe_async::maybe_async]
async fn unknown_id_gives_a_fresh_session_never_the_clients_id() {
    let probe = Probe::new();
    let forged = Id::default();
    let session = probe.session(Some(forged), HOUR);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user, None);
    session.insert("user", "mallory").await.unwrap();
    session.save().await.unwrap();
    let id = session.id().await.unwrap().expect("stored");
    assert_ne!(id, forged, "a client never picks its own id");
    let planted = probe.store.load(&forged).await.unwrap();
    assert_eq!(planted, None);

    // An expired session is unknown too.
    let old = stored(&probe, "bob").await;
    probe.advance(3_600);
    let session = probe.session(Some(old), HOUR);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user, None);
}

#[maybe_async::maybe_async]
async fn wrong_type_is_a_decode_error_not_a_panic() {
    let probe = Probe::new();
    let id = stored(&probe, "a string that is not a number").await;
    let session = probe.session(Some(id), HOUR);
    let as_bool = session.get::<bool>("user").await;
    assert!(matches!(as_bool, Err(Error::Decode(_))), "{as_bool:?}");
    let as_u8 = session.get::<u8>("user").await;
    assert!(matches!(as_u8, Err(Error::Decode(_))), "{as_u8:?}");
    let removed = session.remove::<bool>("user").await;
    assert!(matches!(removed, Err(Error::Decode(_))));
    let kept = session.get::<String>("user").await.unwrap();
    assert!(kept.is_some(), "a failed typed remove leaves the value");
    let raw = session.remove_raw("user").await.unwrap();
    assert!(raw.is_some());
    let empty = session.is_empty().await.unwrap();
    assert!(empty);
}

#[maybe_async::maybe_async]
async fn only_changes_mark_the_session_modified() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    let untouched = session.is_modified().await;
    assert!(!untouched);
    session.insert("user", "alice").await.unwrap();
    let same_value = session.is_modified().await;
    assert!(!same_value, "writing the same value is no change");
    let missing = session.remove::<String>("nothing here").await.unwrap();
    assert_eq!(missing, None);
    let removed_nothing = session.is_modified().await;
    assert!(!removed_nothing);
    session.insert("user", "bob").await.unwrap();
    let changed = session.is_modified().await;
    assert!(changed);
    session.save().await.unwrap();
    let saved = session.is_modified().await;
    assert!(!saved);

    let fresh = probe.session(Some(id), HOUR);
    fresh.clear().await.unwrap();
    let cleared = fresh.is_modified().await;
    assert!(cleared);
    let empty = fresh.is_empty().await.unwrap();
    assert!(empty);
}

#[maybe_async::maybe_async]
async fn reserved_keys_are_refused_and_hidden() {
    let probe = Probe::new();
    let session = probe.session(None, HOUR);
    let refused = session.insert("\0created", 0i64).await;
    assert!(matches!(refused, Err(Error::Encode(_))));
    let hidden = session.get::<i64>("\0created").await.unwrap();
    assert_eq!(hidden, None);
    let kept = session.remove::<i64>("\0created").await.unwrap();
    assert_eq!(kept, None);
    let empty = session.is_empty().await.unwrap();
    assert!(empty, "the creation time is not a value");
}

#[maybe_async::maybe_async]
async fn delete_removes_the_record_and_never_reuses_the_id() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    session.delete().await.unwrap();
    let gone = probe.store.load(&id).await.unwrap();
    assert_eq!(gone, None);
    let still_readable = session.get::<String>("user").await.unwrap();
    assert_eq!(still_readable.as_deref(), Some("alice"));
    let now_id = session.id().await.unwrap();
    assert_eq!(now_id, None);

    // Changed again, it becomes a new session under a new id.
    session.insert("user", "alice again").await.unwrap();
    session.save().await.unwrap();
    let new_id = session.id().await.unwrap().expect("stored");
    assert_ne!(new_id, id);
    let resurrected = probe.store.load(&id).await.unwrap();
    assert_eq!(resurrected, None);
}

#[maybe_async::maybe_async]
async fn flush_ends_the_session_without_loading_it() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    session.flush().await.unwrap();
    assert_eq!(Probe::count(&probe.loads), 0, "flush needs no load");
    let gone = probe.store.load(&id).await.unwrap();
    assert_eq!(gone, None);
    let empty = session.is_empty().await.unwrap();
    assert!(empty);
    let no_id = session.id().await.unwrap();
    assert_eq!(no_id, None);
}

#[maybe_async::maybe_async]
async fn cycle_id_moves_the_record() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    session.insert("role", "admin").await.unwrap();
    session.cycle_id().await.unwrap();
    let pending = session.id().await.unwrap();
    assert_eq!(pending, Some(id), "moved only when written");
    session.save().await.unwrap();
    let new_id = session.id().await.unwrap().expect("stored");
    assert_ne!(new_id, id);
    // The old id holds a marker without values, for two minutes at most.
    let old = probe.store.load(&id).await.unwrap().expect("a marker");
    assert_eq!(old.keys().filter(|k| !k.starts_with('\0')).count(), 0);
    assert!(old.expiry_date <= probe.now() + Duration::minutes(2));
    let late = probe.session(Some(id), HOUR);
    let late_user = late.get::<String>("user").await.unwrap();
    assert_eq!(late_user, None, "the old id never shows the session");
    let late_id = late.id().await.unwrap();
    assert_eq!(late_id, None);
    probe.advance(121);
    let expired = probe.store.load(&id).await.unwrap();
    assert_eq!(expired, None, "the marker expires");
    let moved = probe.store.load(&new_id).await.unwrap().expect("moved");
    assert_eq!(
        moved.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );
    assert_eq!(
        moved.get::<String>("role").unwrap().as_deref(),
        Some("admin"),
        "pending changes move with it"
    );
    let modified = session.is_modified().await;
    assert!(!modified, "the move wrote everything");

    // A session not stored yet just changes id, and is written when finished.
    let fresh = probe.session(None, HOUR);
    fresh.cycle_id().await.unwrap();
    let not_stored = fresh.id().await.unwrap();
    assert_eq!(not_stored, None);
}

#[maybe_async::maybe_async]
async fn cycle_id_failing_to_create_leaves_the_old_id() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    session.get::<String>("user").await.unwrap();
    probe.faulty.faults.create.store(true, Ordering::SeqCst);
    session.cycle_id().await.unwrap();
    let cycled = session.save().await;
    assert!(matches!(cycled, Err(Error::Backend(_))));
    let still = session.id().await.unwrap();
    assert_eq!(still, Some(id), "nothing changed");
    let old = probe.store.load(&id).await.unwrap();
    assert!(
        old.is_some(),
        "the user is still logged in under the old id"
    );
    assert_eq!(probe.store.len(), 1);

    // Once the store recovers, the same handle can cycle.
    probe.faulty.faults.create.store(false, Ordering::SeqCst);
    session.save().await.unwrap();
    let new_id = session.id().await.unwrap();
    assert_ne!(new_id, Some(id));
}

#[maybe_async::maybe_async]
async fn cycle_id_failing_to_retire_the_old_id_leaves_it() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    probe.faulty.faults.update.store(true, Ordering::SeqCst);
    session.cycle_id().await.unwrap();
    let cycled = session.save().await;
    assert!(matches!(cycled, Err(Error::Backend(_))));
    let still = session.id().await.unwrap();
    assert_eq!(still, Some(id), "nothing changed");
    let old = probe.store.load(&id).await.unwrap().expect("still there");
    assert_eq!(old.get::<String>("user").unwrap().as_deref(), Some("alice"));
    // The failed write may still land (its reply lost, say): the new record is then
    // the session, so it is left to expire rather than deleted. Nobody holds its id.
    assert_eq!(
        probe.store.len(),
        2,
        "the unused new record is left to expire"
    );
}

#[maybe_async::maybe_async]
async fn load_errors_are_returned_and_retried() {
    let probe = Probe::new();
    let id = stored(&probe, "alice").await;
    let session = probe.session(Some(id), HOUR);
    probe.faulty.faults.load.store(true, Ordering::SeqCst);
    let failed = session.get::<String>("user").await;
    assert!(matches!(failed, Err(Error::Backend(_))));
    probe.faulty.faults.load.store(false, Ordering::SeqCst);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(
        user.as_deref(),
        Some("alice"),
        "a failed load is not cached"
    );
}

#[maybe_async::maybe_async]
async fn expiry_dates_follow_the_policy() {
    let probe = Probe::new();
    let cases = [
        (
            Expiry::OnSessionEnd,
            probe.now() + SessionConfig::DEFAULT_SESSION_END_TTL,
        ),
        (HOUR, probe.now() + Duration::hours(1)),
        (Expiry::AtDateTime(at(START + 90)), at(START + 90)),
    ];
    for (expiry, expected) in cases {
        let session = probe.session(None, expiry);
        session.insert("k", 1u8).await.unwrap();
        session.save().await.unwrap();
        let id = session.id().await.unwrap().unwrap();
        let record = probe.store.load(&id).await.unwrap().unwrap();
        assert_eq!(record.expiry_date, expected, "{expiry:?}");
    }
    // A shorter server-side lifetime for browser-session cookies.
    let config = probe
        .config(Expiry::OnSessionEnd)
        .with_session_end_ttl(Duration::minutes(5));
    let session = Session::new(probe.clone(), None, config);
    session.insert("k", 1u8).await.unwrap();
    session.save().await.unwrap();
    let id = session.id().await.unwrap().unwrap();
    let record = probe.store.load(&id).await.unwrap().unwrap();
    assert_eq!(record.expiry_date, probe.now() + Duration::minutes(5));
}

#[maybe_async::maybe_async]
async fn lifetime_cap_ends_even_a_refreshed_session() {
    let probe = Probe::new();
    let config = probe.config(HOUR).with_max_lifetime(Duration::hours(3));
    let manager = SessionManager::from_shared(probe.clone())
        .with_config(config)
        .with_refresh_on_request(0.0);
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    let mut cookie = pair(&manager.finish(&session).await.unwrap().unwrap());
    let first = cookie.clone();
    // Active every 50 minutes: sliding expiry alone would keep it forever.
    for _ in 0..3 {
        probe.advance(50 * 60);
        let session = manager.begin([cookie.as_str()]);
        let user = session.get::<String>("user").await.unwrap();
        assert_eq!(user.as_deref(), Some("alice"));
        if let Some(set) = manager.finish(&session).await.unwrap() {
            cookie = pair(&set);
        }
    }
    assert_eq!(cookie, first, "refreshes keep the id");
    // 150 minutes in: the next refresh may only reach the 3-hour cap.
    let session = manager.begin([cookie.as_str()]);
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None, "nothing to gain: already expiring at the cap");
    probe.advance(30 * 60);
    let session = manager.begin([cookie.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user, None, "three hours after creation the session is over");
}

#[maybe_async::maybe_async]
async fn manager_sets_the_cookie_with_its_attributes() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone())
        .with_config(probe.config(HOUR))
        .with_cookie_name("sid")
        .with_path(Some("/app"))
        .with_domain(Some("example.com"))
        .with_same_site(Some(SameSite::Strict));
    let session = manager.begin(None::<&str>);
    session.insert("n", 1u8).await.unwrap();
    let set = manager
        .finish(&session)
        .await
        .unwrap()
        .expect("a new session");
    let cookie = cookie::Cookie::parse(set.as_str()).unwrap();
    assert_eq!(cookie.name(), "sid");
    let id: Id = cookie.value().parse().unwrap();
    let stored_id = session.id().await.unwrap();
    assert_eq!(Some(id), stored_id);
    assert_eq!(cookie.path(), Some("/app"));
    assert_eq!(cookie.domain(), Some("example.com"));
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.same_site(), Some(cookie::SameSite::Strict));
    assert_eq!(cookie.max_age(), Some(Duration::hours(1)));

    let plain = SessionManager::new(MemoryStore::default())
        .with_secure(false)
        .with_http_only(false)
        .with_same_site(None)
        .with_path(None);
    let removal = plain.removal_cookie();
    assert_eq!(removal.split(';').next(), Some("id="));
    assert!(!removal.contains("Secure") && !removal.contains("HttpOnly"));
    assert!(!removal.contains("SameSite") && !removal.contains("Path"));
}

#[maybe_async::maybe_async]
async fn manager_round_trip_writes_only_when_needed() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));

    // Untouched, without a cookie: nothing at all.
    let session = manager.begin(None::<&str>);
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None);
    // Read only: still nothing, and nothing stored.
    let session = manager.begin(None::<&str>);
    let nothing = session.get::<u32>("n").await.unwrap();
    assert_eq!(nothing, None);
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None);
    assert_eq!(Probe::count(&probe.writes), 0);

    let session = manager.begin(None::<&str>);
    session.insert("n", 1u32).await.unwrap();
    let cookie = pair(&manager.finish(&session).await.unwrap().unwrap());
    assert_eq!(Probe::count(&probe.writes), 1);

    // Other cookies and headers around it do not matter.
    let header = format!("theme=dark; {cookie}; lang=en");
    let session = manager.begin(["other=1", header.as_str()]);
    let n = session.get::<u32>("n").await.unwrap();
    assert_eq!(n, Some(1));
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None, "read only: no write, no cookie");
    assert_eq!(Probe::count(&probe.writes), 1);

    // A write at the same moment leaves the expiry date, and so the cookie, as it
    // was: nothing to send.
    let session = manager.begin([cookie.as_bytes()]);
    session.insert("n", 2u32).await.unwrap();
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None, "the same Max-Age");
    assert_eq!(Probe::count(&probe.writes), 2);

    // A minute later the write moves the sliding expiry, and the cookie with it.
    probe.advance(60);
    let session = manager.begin([cookie.as_bytes()]);
    session.insert("n", 3u32).await.unwrap();
    let set = manager
        .finish(&session)
        .await
        .unwrap()
        .expect("renewed Max-Age");
    assert_eq!(pair(&set), cookie, "same id");
    assert_eq!(Probe::count(&probe.writes), 3);
}

#[maybe_async::maybe_async]
async fn manager_removes_bad_and_unknown_cookies() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    let unknown = format!("id={}", Id::default());
    let malformed: [&[u8]; 3] = [b"id=garbage", b"id=", b"id=AAAAAAAAAAAAAAAAAAAAAA=="];
    // Well-formed once its quotes are dropped: an unknown id like the other.
    let quoted: &[u8] = b"id=\"AAAAAAAAAAAAAAAAAAAAAA\"";
    let not_ours: [&[u8]; 4] = [
        b"id=\xff\xfe",
        b";;;=;id",
        b"ID=AAAAAAAAAAAAAAAAAAAAAA",
        b"",
    ];
    let all = malformed
        .iter()
        .chain(&not_ours)
        .copied()
        .chain([unknown.as_bytes(), quoted]);
    for header in all {
        let ours = !not_ours.contains(&header);
        // Unused: a malformed cookie is removed at once; a well-formed one is not
        // looked up, so it stays until the session is used.
        let session = manager.begin([header]);
        let set = manager.finish(&session).await.unwrap();
        let expected = malformed
            .contains(&header)
            .then(|| manager.removal_cookie());
        assert_eq!(set, expected, "{header:?}");
        // Read: the client's cookie names no session, so it is removed.
        let session = manager.begin([header]);
        let value = session.get::<String>("user").await.unwrap();
        assert_eq!(value, None);
        let set = manager.finish(&session).await.unwrap();
        let expected = ours.then(|| manager.removal_cookie());
        assert_eq!(set, expected, "{header:?}");
        // Written: a fresh session under a fresh id.
        let session = manager.begin([header]);
        session.insert("user", "someone").await.unwrap();
        let set = manager.finish(&session).await.unwrap().unwrap();
        let id: Id = pair(&set)[3..].parse().unwrap();
        assert_ne!(unknown, format!("id={id}"));
    }
    assert_eq!(probe.store.len(), 9);
}

#[maybe_async::maybe_async]
async fn manager_removes_the_cookie_after_flush_not_after_emptying() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    let cookie = pair(&manager.finish(&session).await.unwrap().unwrap());
    let id: Id = cookie[3..].parse().unwrap();

    let session = manager.begin([cookie.as_str()]);
    session.flush().await.unwrap();
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, Some(manager.removal_cookie()));
    let gone = probe.store.load(&id).await.unwrap();
    assert_eq!(gone, None);
    assert!(probe.store.is_empty());

    // A session emptied by its handler is not ended: it stays, empty, until it
    // expires (a concurrent request may be storing values in it), and keeps its
    // cookie.
    let session = manager.begin(None::<&str>);
    session.insert("user", "bob").await.unwrap();
    let cookie = pair(&manager.finish(&session).await.unwrap().unwrap());
    let session = manager.begin([cookie.as_str()]);
    session.clear().await.unwrap();
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None, "no removal");
    let kept = probe
        .store
        .load(&id_of(&cookie))
        .await
        .unwrap()
        .expect("kept");
    assert_eq!(kept.keys().filter(|k| !k.starts_with('\0')).count(), 0);
    probe.advance(3601);
    let deleted = probe.store.delete_expired().await.unwrap();
    assert_eq!(deleted, 1, "expired like any other");
    assert!(probe.store.is_empty());

    // Flushed in a request that had no cookie: nothing to remove.
    let session = manager.begin(None::<&str>);
    session.insert("user", "carol").await.unwrap();
    session.flush().await.unwrap();
    let set = manager.finish(&session).await.unwrap();
    assert_eq!(set, None);
}

#[maybe_async::maybe_async]
async fn manager_sends_the_new_id_after_cycle_id() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    let session = manager.begin(None::<&str>);
    session.insert("visits", 3u32).await.unwrap();
    let anonymous = pair(&manager.finish(&session).await.unwrap().unwrap());

    let session = manager.begin([anonymous.as_str()]);
    session.cycle_id().await.unwrap();
    session.insert("user", "alice").await.unwrap();
    let logged_in = pair(&manager.finish(&session).await.unwrap().unwrap());
    assert_ne!(logged_in, anonymous);

    let old = manager.begin([anonymous.as_str()]);
    let visits = old.get::<u32>("visits").await.unwrap();
    assert_eq!(visits, None, "the old cookie loads nothing");
    let new = manager.begin([logged_in.as_str()]);
    let visits = new.get::<u32>("visits").await.unwrap();
    assert_eq!(visits, Some(3));
    let user = new.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
}

#[maybe_async::maybe_async]
async fn refresh_on_request_is_throttled() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone())
        .with_config(probe.config(HOUR))
        .with_refresh_on_request(0.25);
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    let cookie = pair(&manager.finish(&session).await.unwrap().unwrap());
    let id: Id = cookie[3..].parse().unwrap();
    let writes = Probe::count(&probe.writes);

    // Within the first quarter of the window: untouched requests write nothing.
    for _ in 0..14 {
        probe.advance(60);
        let session = manager.begin([cookie.as_str()]);
        let set = manager.finish(&session).await.unwrap();
        assert_eq!(set, None);
    }
    assert_eq!(Probe::count(&probe.writes), writes);
    // The fifteenth minute: one write, a renewed cookie, a later expiry date.
    probe.advance(60);
    let session = manager.begin([cookie.as_str()]);
    let set = manager.finish(&session).await.unwrap().expect("refreshed");
    assert!(set.contains("Max-Age=3600"), "{set}");
    assert_eq!(Probe::count(&probe.writes), writes + 1);
    let record = probe.store.load(&id).await.unwrap().unwrap();
    assert_eq!(record.expiry_date, probe.now() + Duration::hours(1));

    // Without refresh, reads never move the expiry date.
    let plain = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    probe.advance(50 * 60);
    let session = plain.begin([cookie.as_str()]);
    let user = session.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
    let set = plain.finish(&session).await.unwrap();
    assert_eq!(set, None);
    assert_eq!(Probe::count(&probe.writes), writes + 1);

    // Fixed expiry dates never slide.
    let fixed = SessionManager::from_shared(probe.clone())
        .with_config(probe.config(Expiry::AtDateTime(probe.now() + Duration::hours(1))))
        .with_refresh_on_request(0.0);
    let session = fixed.begin(None::<&str>);
    session.insert("k", 1u8).await.unwrap();
    let cookie = pair(&fixed.finish(&session).await.unwrap().unwrap());
    probe.advance(600);
    let session = fixed.begin([cookie.as_str()]);
    let set = fixed.finish(&session).await.unwrap();
    assert_eq!(set, None);
}

#[maybe_async::maybe_async]
async fn session_end_cookie_has_no_max_age() {
    let manager = SessionManager::new(MemoryStore::default());
    let session = manager.begin(None::<&str>);
    session.insert("k", 1u8).await.unwrap();
    let set = manager.finish(&session).await.unwrap().unwrap();
    let cookie = cookie::Cookie::parse(set.as_str()).unwrap();
    assert_eq!(cookie.max_age(), None);
    assert_eq!(cookie.expires(), None);
    assert_eq!(cookie.name(), SessionManager::DEFAULT_COOKIE_NAME);
    assert_eq!(cookie.path(), Some("/"));
    assert_eq!(cookie.same_site(), Some(cookie::SameSite::Lax));
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
}

#[maybe_async::maybe_async]
async fn store_errors_fail_finish() {
    let probe = Probe::new();
    let manager = SessionManager::from_shared(probe.clone()).with_config(probe.config(HOUR));
    let session = manager.begin(None::<&str>);
    session.insert("k", 1u8).await.unwrap();
    probe.faulty.faults.create.store(true, Ordering::SeqCst);
    let failed = manager.finish(&session).await;
    assert!(matches!(failed, Err(Error::Backend(_))));
    let modified = session.is_modified().await;
    assert!(modified, "the changes are still pending");
    probe.faulty.faults.create.store(false, Ordering::SeqCst);
    let set = manager.finish(&session).await.unwrap();
    assert!(set.is_some(), "a retry writes them");
}

/// The `name=value` pair of a `Set-Cookie` value: what a browser sends back.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_owned()
}

/// Clones racing for the first access load the record once, and all see it.
#[test]
fn racing_clones_load_once() {
    let probe = Probe::new();
    let id = block(stored(&probe, "alice"));
    probe.slow_load_ms.store(50, Ordering::SeqCst);
    let session = probe.session(Some(id), HOUR);
    let start = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let session = session.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                block(session.get::<String>("user")).unwrap()
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap().as_deref(), Some("alice"));
    }
    assert_eq!(Probe::count(&probe.loads), 1);
}

/// In async mode, clones racing on one thread interleave at the load's await points
/// and still load once; the futures are `Send`, so any executor can run them.
#[cfg(not(feature = "sync"))]
#[test]
fn racing_clones_on_one_executor_load_once() {
    use futures_lite::future;

    let probe = Probe::new();
    let id = future::block_on(stored(&probe, "alice"));
    let session = probe.session(Some(id), HOUR);
    let (a, b) = (session.clone(), session.clone());
    let both = future::block_on(future::zip(
        async move { a.get::<String>("user").await },
        async move { b.get::<String>("user").await },
    ));
    assert_eq!(both.0.unwrap().as_deref(), Some("alice"));
    assert_eq!(both.1.unwrap().as_deref(), Some("alice"));
    assert_eq!(Probe::count(&probe.loads), 1);

    fn assert_send<T: Send>(_: &T) {}
    assert_send(&session.get::<String>("user"));
    assert_send(&session.cycle_id());
}

#[test]
fn handles_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Session>();
    assert_send_sync::<SessionManager>();
    assert_send_sync::<SessionConfig>();
}

#[test]
#[should_panic(expected = "not a valid cookie name")]
fn invalid_cookie_names_are_refused_at_startup() {
    let _ = SessionManager::new(MemoryStore::default()).with_cookie_name("a;b");
}

/// The message of the panic `build` raises.
fn refusal(build: impl FnOnce() -> SessionManager + std::panic::UnwindSafe) -> String {
    let message = std::panic::catch_unwind(build).expect_err("refused");
    match message.downcast::<String>() {
        Ok(text) => *text,
        Err(other) => other
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .unwrap_or_default(),
    }
}

/// A `__Host-` name is accepted with the defaults and checked against every
/// attribute, in any order of the calls; `SameSite=None` needs `Secure`.
#[test]
fn cookie_prefixes_and_same_site_none_are_checked_at_startup() {
    let manager = || SessionManager::new(MemoryStore::default());
    let host = manager().with_cookie_name("__Host-sid");
    assert_eq!(host.cookie_name(), "__Host-sid");
    let host = manager()
        .with_same_site(Some(SameSite::None))
        .with_cookie_name("__Host-sid");
    let _ = host;
    for text in [
        refusal(|| manager().with_cookie_name("__Host-sid").with_secure(false)),
        refusal(|| {
            manager()
                .with_cookie_name("__host-sid")
                .with_path(Some("/app"))
        }),
        refusal(|| manager().with_cookie_name("__Host-sid").with_path(None)),
        refusal(|| {
            manager()
                .with_domain(Some("example.com"))
                .with_cookie_name("__Host-sid")
        }),
    ] {
        assert!(text.contains("__Host- prefix"), "{text}");
    }
    let text = refusal(|| {
        manager()
            .with_secure(false)
            .with_cookie_name("__Secure-sid")
    });
    assert!(text.contains("__Secure- prefix"), "{text}");
    let _ = manager()
        .with_cookie_name("__Secure-sid")
        .with_domain(Some("example.com"));
    for text in [
        refusal(|| {
            manager()
                .with_same_site(Some(SameSite::None))
                .with_secure(false)
        }),
        refusal(|| {
            manager()
                .with_secure(false)
                .with_same_site(Some(SameSite::None))
        }),
    ] {
        assert!(text.contains("SameSite=None needs Secure"), "{text}");
    }
    let _ = manager()
        .with_secure(false)
        .with_same_site(Some(SameSite::Strict));
}

#[test]
fn unusable_refresh_fractions_are_refused_at_startup() {
    for fraction in [1.0, 0.99, 0.51, -0.1, f64::NAN, f64::INFINITY] {
        let refused = std::panic::catch_unwind(|| {
            SessionManager::new(MemoryStore::default()).with_refresh_on_request(fraction)
        });
        let message = refused.expect_err("refused");
        let text = message
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        assert!(text.contains("between 0.0 and 0.5"), "{fraction}: {text}");
    }
    for fraction in [0.0, 0.25, 0.5] {
        let _ = SessionManager::new(MemoryStore::default()).with_refresh_on_request(fraction);
    }
}
