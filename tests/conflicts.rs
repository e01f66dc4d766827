//! Concurrent requests of one session: conditional writes, merging, atomic updates,
//! and logouts and logins that racing requests can never undo. In both modes.
//!
//! The interleavings are deterministic: two request handles on one store, stepped in
//! a chosen order, and a store that pauses a request inside its write until the test
//! has run another one. Then real load: many threads (and, in async mode, several
//! futures on each thread) counting through `Session::update` on every store.

mod common;

use std::sync::{
    atomic::{AtomicI64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex,
};

use common::block;
use portable_sessions::{
    session::{Expiry, Id, Record, SessionConfig},
    session_store::{Result, Update},
    MemoryStore, SessionManager, SessionStore,
};
use time::{Duration, OffsetDateTime};

tests_in_both_modes!(
    requests_writing_different_keys_keep_both,
    requests_writing_one_key_the_later_wins_and_nothing_else_is_lost,
    a_write_racing_a_logout_never_revives_the_session,
    a_write_racing_cycle_id_neither_revives_nor_overwrites,
    a_refresh_racing_a_logout_never_revives_the_session,
    update_runs_again_on_the_newer_value,
    endless_conflicts_end_in_a_clear_error,
    a_request_with_a_moved_id_is_told_its_changes_are_not_kept,
    emptying_a_session_never_deletes_a_concurrent_write,
    emptying_a_session_held_in_its_write_keeps_a_concurrent_write,
    a_failed_update_leaves_the_session_as_it_was,
    a_login_whose_request_fails_leaves_the_session_as_it_was,
    a_write_racing_a_logout_is_reported_as_not_kept,
    changes_after_finish_are_refused,
    a_step_counted_by_a_login_racing_a_logout_lands_in_the_new_session,
    a_step_counted_after_cycle_id_carries_the_move_out,
    a_move_whose_marker_lands_with_an_error_is_recognised,
    unchanged_cookies_are_not_sent_again,
);

/// A step whose write failed is not kept as a change: a retry (or the commit)
/// computes it again from what is stored, so another request's step is not lost.
#[maybe_async::maybe_async]
async fn a_failed_update_leaves_the_session_as_it_was() {
    let store = Arc::new(common::FaultyStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    let session = manager.begin([cookie.as_str()]);
    let one = session
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap();
    assert_eq!(one, 1);
    store.faults.update.store(true, Ordering::SeqCst);
    let failed = session
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await;
    assert!(failed.is_err());
    let n = session.get::<u64>("n").await.unwrap();
    assert_eq!(n, Some(1), "as it was before the failed call");
    store.faults.update.store(false, Ordering::SeqCst);
    // Meanwhile another request counted.
    let other = manager.begin([cookie.as_str()]);
    let two = other
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap();
    assert_eq!(two, 2);
    let three = session
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap();
    assert_eq!(three, 3, "computed from the stored value, no step lost");
    manager.finish(&session).await.unwrap();
    let stored = read_u64(&manager, &cookie, "n").await;
    assert_eq!(stored, Some(3));
}

#[maybe_async::maybe_async]
async fn read_u64(manager: &SessionManager, cookie: &str, key: &str) -> Option<u64> {
    let session = manager.begin([cookie]);
    session.get::<u64>(key).await.unwrap()
}

/// A store that, once armed, stops the next conditional write just before it reaches
/// the memory store, until the test lets it go: the test runs another request while
/// one is held there, between its load and its write.
#[derive(Debug, Default)]
struct PausingStore {
    inner: MemoryStore,
    gate: Gate,
    updates: AtomicUsize,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum GateState {
    #[default]
    Open,
    Armed,
    Holding,
    Released,
}

impl Gate {
    fn set(&self, state: GateState) {
        *self.state.lock().unwrap() = state;
        self.changed.notify_all();
    }

    fn wait_for(&self, wanted: GateState) {
        let state = self.state.lock().unwrap();
        let timeout = std::time::Duration::from_secs(20);
        let (state, waited) = self
            .changed
            .wait_timeout_while(state, timeout, |s| *s != wanted)
            .unwrap();
        assert!(
            !waited.timed_out(),
            "the gate never reached {wanted:?}: {state:?}"
        );
    }

    /// Called by the store: holds the caller here if armed.
    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        if *state == GateState::Armed {
            *state = GateState::Holding;
            self.changed.notify_all();
            drop(state);
            self.wait_for(GateState::Released);
            self.set(GateState::Open);
        }
    }
}

impl PausingStore {
    /// Runs `held` on a thread of its own until it reaches its next conditional write,
    /// then `meanwhile` on this thread, then lets `held` finish; returns its result.
    fn interleave<T: Send>(&self, held: impl FnOnce() -> T + Send, meanwhile: impl FnOnce()) -> T {
        self.gate.set(GateState::Armed);
        std::thread::scope(|scope| {
            let held = scope.spawn(held);
            self.gate.wait_for(GateState::Holding);
            meanwhile();
            self.gate.set(GateState::Released);
            held.join().expect("the held request")
        })
    }
}

#[maybe_async::maybe_async]
impl SessionStore for PausingStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.inner.create(record).await
    }

    async fn save(&self, record: &Record) -> Result<()> {
        self.inner.save(record).await
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        self.inner.load(id).await
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        self.inner.delete(id).await
    }

    async fn update(&self, record: &Record) -> Result<Update> {
        self.updates.fetch_add(1, Ordering::SeqCst);
        self.gate.pass();
        self.inner.update(record).await
    }

    fn atomic_update(&self) -> bool {
        true
    }
}

fn manager_of(store: Arc<dyn SessionStore>) -> SessionManager {
    SessionManager::from_shared(store)
        .with_cookie_name("sid")
        .with_expiry(Expiry::OnInactivity(Duration::hours(1)))
}

/// The `sid=ID` pair of a `Set-Cookie` value.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_owned()
}

fn id_of(cookie: &str) -> Id {
    cookie["sid=".len()..].parse().expect("an id")
}

/// One request that stores `key = value` in a new session; returns its cookie.
#[maybe_async::maybe_async]
async fn new_session(manager: &SessionManager, values: &[(&str, &str)]) -> String {
    let session = manager.begin(None::<&str>);
    for (key, value) in values {
        session.insert(key, value).await.unwrap();
    }
    let set = manager.finish(&session).await.unwrap();
    pair(&set.expect("a new session sets its cookie"))
}

/// What a new request with `cookie` reads under `key`.
#[maybe_async::maybe_async]
async fn read(manager: &SessionManager, cookie: &str, key: &str) -> Option<String> {
    let session = manager.begin([cookie]);
    let value = session.get::<String>(key).await.unwrap();
    manager.finish(&session).await.unwrap();
    value
}

/// Whether the store holds a session with values under the cookie's id.
#[maybe_async::maybe_async]
async fn live(store: &dyn SessionStore, cookie: &str) -> bool {
    let found = store.load(&id_of(cookie)).await.unwrap();
    found.is_some_and(|record| record.keys().any(|key| !key.starts_with('\0')))
}

#[maybe_async::maybe_async]
async fn requests_writing_different_keys_keep_both() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;

    let a = manager.begin([cookie.as_str()]);
    let b = manager.begin([cookie.as_str()]);
    a.insert("theme", "dark").await.unwrap();
    b.insert("cart", "pear").await.unwrap();
    let set_a = manager.finish(&a).await.unwrap();
    let set_b = manager.finish(&b).await.unwrap();
    assert_eq!(set_a.map(|s| pair(&s)), Some(cookie.clone()));
    assert_eq!(
        set_b.map(|s| pair(&s)),
        Some(cookie.clone()),
        "merged, not lost"
    );

    let theme = read(&manager, &cookie, "theme").await;
    let cart = read(&manager, &cookie, "cart").await;
    let user = read(&manager, &cookie, "user").await;
    assert_eq!(theme.as_deref(), Some("dark"));
    assert_eq!(cart.as_deref(), Some("pear"));
    assert_eq!(user.as_deref(), Some("alice"));
    let record = store.load(&id_of(&cookie)).await.unwrap().unwrap();
    assert_eq!(record.version, 2, "one create, then two conditional writes");
}

#[maybe_async::maybe_async]
async fn requests_writing_one_key_the_later_wins_and_nothing_else_is_lost() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice"), ("theme", "light")]).await;

    let a = manager.begin([cookie.as_str()]);
    let b = manager.begin([cookie.as_str()]);
    a.insert("theme", "dark").await.unwrap();
    a.insert("lang", "en").await.unwrap();
    b.insert("theme", "blue").await.unwrap();
    b.remove::<String>("user").await.unwrap();
    b.insert("user", "alice").await.unwrap(); // set back: still one of b's changes
    manager.finish(&a).await.unwrap();
    manager.finish(&b).await.unwrap();

    let theme = read(&manager, &cookie, "theme").await;
    let lang = read(&manager, &cookie, "lang").await;
    let user = read(&manager, &cookie, "user").await;
    assert_eq!(
        theme.as_deref(),
        Some("blue"),
        "the later write wins its key"
    );
    assert_eq!(
        lang.as_deref(),
        Some("en"),
        "the earlier one's other keys stay"
    );
    assert_eq!(user.as_deref(), Some("alice"));

    // A removal is a change too: it is applied over the newer record.
    let a = manager.begin([cookie.as_str()]);
    let b = manager.begin([cookie.as_str()]);
    a.insert("lang", "fr").await.unwrap();
    b.remove::<String>("theme").await.unwrap();
    manager.finish(&a).await.unwrap();
    manager.finish(&b).await.unwrap();
    let theme = read(&manager, &cookie, "theme").await;
    let lang = read(&manager, &cookie, "lang").await;
    assert_eq!(theme, None);
    assert_eq!(lang.as_deref(), Some("fr"));
}

#[maybe_async::maybe_async]
async fn a_write_racing_a_logout_never_revives_the_session() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;

    // A request loads the session; a logout ends it; then the first one writes.
    let visit = manager.begin([cookie.as_str()]);
    let user = visit.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
    let logout = manager.begin([cookie.as_str()]);
    logout.flush().await.unwrap();
    let removal = manager.finish(&logout).await.unwrap().expect("a removal");
    assert!(removal.starts_with("sid=;"), "{removal}");

    visit.insert("visits", "5").await.unwrap();
    let set = manager.finish(&visit).await.unwrap();
    assert_eq!(set, None, "no cookie that would undo the logout's removal");
    let revived = live(&*store, &cookie).await;
    assert!(!revived, "the logged-out session stays gone");
    assert!(store.is_empty());
    let id = visit.id().await.unwrap();
    assert_eq!(id, None);

    // The same with the write inside the commit: held after its load, before its
    // conditional write, while the logout runs.
    let store = Arc::new(PausingStore::default());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    let visit = manager.begin([cookie.as_str()]);
    visit.insert("visits", "6").await.unwrap();
    let set = store.interleave(
        || block(manager.finish(&visit)).unwrap(),
        || {
            let logout = manager.begin([cookie.as_str()]);
            block(logout.flush()).unwrap();
            block(manager.finish(&logout)).unwrap();
        },
    );
    assert_eq!(set, None);
    assert!(store.inner.is_empty(), "nothing written back");
}

#[maybe_async::maybe_async]
async fn a_write_racing_cycle_id_neither_revives_nor_overwrites() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("cart", "apple")]).await;

    // A request loads the anonymous session; a login moves it; then the first writes.
    let visit = manager.begin([cookie.as_str()]);
    visit.insert("cart", "pear").await.unwrap();
    let login = manager.begin([cookie.as_str()]);
    login.cycle_id().await.unwrap();
    login.insert("user", "alice").await.unwrap();
    let logged_in = pair(&manager.finish(&login).await.unwrap().expect("the new id"));
    assert_ne!(logged_in, cookie);

    let set = manager.finish(&visit).await.unwrap();
    assert_eq!(set, None, "no cookie that would replace the new one");
    let old = live(&*store, &cookie).await;
    assert!(!old, "the pre-login id never comes back");
    let user = read(&manager, &logged_in, "user").await;
    let cart = read(&manager, &logged_in, "cart").await;
    assert_eq!(
        user.as_deref(),
        Some("alice"),
        "the login is not overwritten"
    );
    assert_eq!(cart.as_deref(), Some("apple"), "the late change is dropped");
    let stale = read(&manager, &cookie, "user").await;
    assert_eq!(stale, None);

    // A change written after the login loaded the session, but before it retired
    // the old id, moves with the session.
    let store = Arc::new(PausingStore::default());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("cart", "apple")]).await;
    let login = manager.begin([cookie.as_str()]);
    login.get::<String>("cart").await.unwrap();
    login.cycle_id().await.unwrap();
    login.insert("user", "alice").await.unwrap();
    // The move is written by the login's finish: held there, at its conditional
    // write of the old id, while another request writes the old id.
    let set = store.interleave(
        || block(manager.finish(&login)).unwrap(),
        || {
            let visit = manager.begin([cookie.as_str()]);
            block(visit.insert("cart", "pear")).unwrap();
            block(manager.finish(&visit)).unwrap();
        },
    );
    let logged_in = pair(&set.expect("new id"));
    let cart = read(&manager, &logged_in, "cart").await;
    let user = read(&manager, &logged_in, "user").await;
    assert_eq!(cart.as_deref(), Some("pear"), "carried over to the new id");
    assert_eq!(user.as_deref(), Some("alice"));
    let old = live(&*store, &cookie).await;
    assert!(!old);

    // A logout while the login is held: the login must not revive the session.
    let cookie = new_session(&manager, &[("cart", "apple")]).await;
    let login = manager.begin([cookie.as_str()]);
    login.insert("cart", "apple, pear").await.unwrap();
    login.cycle_id().await.unwrap();
    login.insert("user", "alice").await.unwrap();
    let set = store.interleave(
        || block(manager.finish(&login)).unwrap(),
        || {
            let logout = manager.begin([cookie.as_str()]);
            block(logout.flush()).unwrap();
            block(manager.finish(&logout)).unwrap();
        },
    );
    // The login goes on as a new session with what it stored since `cycle_id`:
    // nothing of the logged-out one.
    let logged_in = pair(&set.expect("a new session"));
    assert_ne!(logged_in, cookie);
    let user = read(&manager, &logged_in, "user").await;
    let cart = read(&manager, &logged_in, "cart").await;
    assert_eq!((user.as_deref(), cart), (Some("alice"), None));
    let old = live(&*store, &cookie).await;
    assert!(!old, "the logged-out id stays logged out");
}

/// A request that empties a session (it reads and removes a flash message) never
/// makes another request's write of the same session vanish, whichever finishes
/// first: an emptied session is written like any other, and stays, empty.
#[maybe_async::maybe_async]
async fn emptying_a_session_never_deletes_a_concurrent_write() {
    for emptier_first in [true, false] {
        let store = Arc::new(MemoryStore::new());
        let manager = manager_of(store.clone());
        let cookie = new_session(&manager, &[("flash", "saved")]).await;
        let reader = manager.begin([cookie.as_str()]);
        let flash = reader.remove::<String>("flash").await.unwrap();
        assert_eq!(flash.as_deref(), Some("saved"));
        let login = manager.begin([cookie.as_str()]);
        login.insert("user", "alice").await.unwrap();
        let (first, second) = if emptier_first {
            (&reader, &login)
        } else {
            (&login, &reader)
        };
        let set_first = manager.finish(first).await.unwrap();
        let set_second = manager.finish(second).await.unwrap();
        for set in [set_first, set_second].into_iter().flatten() {
            assert_eq!(pair(&set), cookie, "never a removal: {set}");
        }
        let user = read(&manager, &cookie, "user").await;
        let flash = read(&manager, &cookie, "flash").await;
        assert_eq!(
            (user.as_deref(), flash),
            (Some("alice"), None),
            "emptier first: {emptier_first}"
        );
    }

    // Without a race, an emptied session stays, without values, until it expires;
    // its cookie is left alone. A logout (`flush`) is what ends a session.
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("flash", "saved")]).await;
    let reader = manager.begin([cookie.as_str()]);
    reader.clear().await.unwrap();
    let set = manager.finish(&reader).await.unwrap();
    assert!(
        set.as_deref().is_none_or(|set| pair(set) == cookie),
        "{set:?}"
    );
    let kept = store.load(&id_of(&cookie)).await.unwrap();
    assert!(kept.is_some(), "an empty record, still live");
    let has_values = live(&*store, &cookie).await;
    assert!(!has_values);
}

/// The same race with the emptying request held inside its conditional write while
/// the other request writes, and the other way round.
#[maybe_async::maybe_async]
async fn emptying_a_session_held_in_its_write_keeps_a_concurrent_write() {
    for hold_emptier in [true, false] {
        let store = Arc::new(PausingStore::default());
        let manager = manager_of(store.clone());
        let cookie = new_session(&manager, &[("flash", "saved")]).await;
        let reader = manager.begin([cookie.as_str()]);
        reader.remove::<String>("flash").await.unwrap();
        let login = manager.begin([cookie.as_str()]);
        login.insert("user", "alice").await.unwrap();
        let (held, meanwhile) = if hold_emptier {
            (&reader, &login)
        } else {
            (&login, &reader)
        };
        let held_set = store.interleave(
            || block(manager.finish(held)).unwrap(),
            || {
                block(manager.finish(meanwhile)).unwrap();
            },
        );
        assert!(
            held_set.as_deref().is_none_or(|set| pair(set) == cookie),
            "{held_set:?}"
        );
        let user = read(&manager, &cookie, "user").await;
        let flash = read(&manager, &cookie, "flash").await;
        assert_eq!(
            (user.as_deref(), flash),
            (Some("alice"), None),
            "emptier held: {hold_emptier}"
        );
    }
}

/// A login (`cycle_id`) whose request fails, so that its finish never runs (the
/// framework layers skip it on an error response), leaves the session exactly as
/// it was: still under the id the browser holds, nothing moved, nothing stranded.
#[maybe_async::maybe_async]
async fn a_login_whose_request_fails_leaves_the_session_as_it_was() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("cart", "apple")]).await;
    let before = store.load(&id_of(&cookie)).await.unwrap().unwrap();

    let login = manager.begin([cookie.as_str()]);
    login.cycle_id().await.unwrap();
    login.insert("user", "alice").await.unwrap();
    let until_finish = login.id().await.unwrap();
    assert_eq!(
        until_finish,
        Some(id_of(&cookie)),
        "the old id until written"
    );
    drop(login); // the handler failed: no finish

    assert_eq!(store.len(), 1, "no record under a new id");
    let after = store.load(&id_of(&cookie)).await.unwrap().unwrap();
    assert_eq!(after, before, "the old record untouched");
    // The browser's next request goes on as before.
    let next = manager.begin([cookie.as_str()]);
    next.insert("cart", "apple, pear").await.unwrap();
    let set = manager.finish(&next).await.unwrap();
    assert!(set.is_none_or(|set| pair(&set) == cookie));
    let cart = read(&manager, &cookie, "cart").await;
    assert_eq!(cart.as_deref(), Some("apple, pear"));

    // A login that does finish moves the session then, and only then.
    let login = manager.begin([cookie.as_str()]);
    login.cycle_id().await.unwrap();
    let set = manager.finish(&login).await.unwrap().expect("the new id");
    assert_ne!(pair(&set), cookie);
    let cart = read(&manager, &pair(&set), "cart").await;
    assert_eq!(cart.as_deref(), Some("apple, pear"));
}

/// A change that a concurrent logout made impossible to keep is reported to the
/// handler: `save` and `update` fail with `SessionGone`, and nothing is written.
#[maybe_async::maybe_async]
async fn a_write_racing_a_logout_is_reported_as_not_kept() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    let cart = manager.begin([cookie.as_str()]);
    cart.insert("cart", "apple").await.unwrap();
    let counter = manager.begin([cookie.as_str()]);
    counter.get::<u64>("n").await.unwrap();

    let logout = manager.begin([cookie.as_str()]);
    logout.flush().await.unwrap();
    manager.finish(&logout).await.unwrap();

    let saved = cart.save().await.unwrap_err();
    assert!(saved.is_session_gone(), "{}", saved.report());
    let counted = counter
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap_err();
    assert!(counted.is_session_gone(), "{}", counted.report());
    // Later changes fail at once; the responses send no cookie.
    let again = cart.insert("cart", "pear").await.unwrap_err();
    assert!(again.is_session_gone());
    let set = manager.finish(&cart).await.unwrap();
    assert_eq!(set, None);
    let set = manager.finish(&counter).await.unwrap();
    assert_eq!(set, None);
    assert!(store.is_empty(), "nothing revived");
}

/// A login that counts a step with `update` after `cycle_id` writes the move at
/// once; when a logout ends the old session meanwhile, the step is stored in the new
/// session the login starts (with what the login stored since `cycle_id`), and
/// `update` says so truthfully.
#[maybe_async::maybe_async]
async fn a_step_counted_by_a_login_racing_a_logout_lands_in_the_new_session() {
    let store = Arc::new(PausingStore::default());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("cart", "apple")]).await;
    let login = manager.begin([cookie.as_str()]);
    login.cycle_id().await.unwrap();
    login.insert("user", "alice").await.unwrap();
    let counted = store.interleave(
        || block(login.update("logins", |n: Option<u64>| n.unwrap_or(0) + 1)).unwrap(),
        || {
            let logout = manager.begin([cookie.as_str()]);
            block(logout.flush()).unwrap();
            block(manager.finish(&logout)).unwrap();
        },
    );
    assert_eq!(counted, 1);
    let set = block(manager.finish(&login))
        .unwrap()
        .expect("the new session");
    let fresh = pair(&set);
    assert_ne!(fresh, cookie);
    let logins = read_u64(&manager, &fresh, "logins").await;
    let user = read(&manager, &fresh, "user").await;
    let cart = read(&manager, &fresh, "cart").await;
    assert_eq!(
        (logins, user.as_deref(), cart),
        (Some(1), Some("alice"), None),
        "the step and the login's own change, nothing of the ended session"
    );
}

/// An atomic step is a write: made while a `cycle_id` waits, it carries the move out
/// at once, never writing the login's changes under the old id (whoever holds that
/// id must not see them).
#[maybe_async::maybe_async]
async fn a_step_counted_after_cycle_id_carries_the_move_out() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("cart", "apple")]).await;
    let login = manager.begin([cookie.as_str()]);
    login.cycle_id().await.unwrap();
    login.insert("user", "alice").await.unwrap();
    let n = login
        .update("logins", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let moved = login.id().await.unwrap().expect("stored");
    assert_ne!(moved, id_of(&cookie), "moved by the step's write");
    let old = store
        .load(&id_of(&cookie))
        .await
        .unwrap()
        .expect("the marker");
    let user_under_old_id = old.get::<String>("user").unwrap();
    assert_eq!(user_under_old_id, None, "the old id never shows the login");
    let set = manager.finish(&login).await.unwrap().expect("the new id");
    assert_eq!(id_of(&pair(&set)), moved);
    let logins = read_u64(&manager, &pair(&set), "logins").await;
    let user = read(&manager, &pair(&set), "user").await;
    assert_eq!((logins, user.as_deref()), (Some(1), Some("alice")));
}

/// A store whose next conditional write lands, then fails as if its reply were
/// lost for good.
#[derive(Debug, Default)]
struct LandsThenFails {
    inner: MemoryStore,
    armed: std::sync::atomic::AtomicBool,
}

#[maybe_async::maybe_async]
impl SessionStore for LandsThenFails {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.inner.create(record).await
    }
    async fn save(&self, record: &Record) -> Result<()> {
        self.inner.save(record).await
    }
    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        self.inner.load(id).await
    }
    async fn delete(&self, id: &Id) -> Result<()> {
        self.inner.delete(id).await
    }
    async fn update(&self, record: &Record) -> Result<Update> {
        let written = self.inner.update(record).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            return Err(portable_sessions::session_store::Error::backend(
                "the connection closed after the write",
            ));
        }
        Ok(written)
    }
    fn atomic_update(&self) -> bool {
        true
    }
}

/// A move whose retirement of the old id lands but reports an error finds its own
/// marker there and completes: the session is not ended under both ids.
#[maybe_async::maybe_async]
async fn a_move_whose_marker_lands_with_an_error_is_recognised() {
    let store = Arc::new(LandsThenFails::default());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("cart", "apple")]).await;
    let login = manager.begin([cookie.as_str()]);
    login.cycle_id().await.unwrap();
    login.insert("user", "alice").await.unwrap();
    store.armed.store(true, Ordering::SeqCst);
    let set = manager.finish(&login).await.unwrap().expect("the new id");
    assert!(!store.armed.load(Ordering::SeqCst), "the fault was met");
    let moved = pair(&set);
    assert_ne!(moved, cookie);
    let user = read(&manager, &moved, "user").await;
    let cart = read(&manager, &moved, "cart").await;
    assert_eq!(
        (user.as_deref(), cart.as_deref()),
        (Some("alice"), Some("apple"))
    );
}

/// After its request is finished a session refuses changes (a clone kept by a
/// spawned task or a streaming body): they would be stored nowhere, or move the
/// record while the client keeps the old id.
#[maybe_async::maybe_async]
async fn changes_after_finish_are_refused() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    let before = store.load(&id_of(&cookie)).await.unwrap().unwrap();
    let session = manager.begin([cookie.as_str()]);
    let kept_by_a_task = session.clone();
    session.get::<String>("user").await.unwrap();
    manager.finish(&session).await.unwrap();

    let inserted = kept_by_a_task.insert("late", "value").await.unwrap_err();
    assert!(inserted.is_session_finished(), "{}", inserted.report());
    let cycled = kept_by_a_task.cycle_id().await.unwrap_err();
    assert!(cycled.is_session_finished());
    let counted = kept_by_a_task
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap_err();
    assert!(counted.is_session_finished());
    let flushed = kept_by_a_task.flush().await.unwrap_err();
    assert!(flushed.is_session_finished());
    let saved = kept_by_a_task.save().await.unwrap_err();
    assert!(saved.is_session_finished());
    let finished_twice = manager.finish(&kept_by_a_task).await.unwrap_err();
    assert!(finished_twice.is_session_finished());
    // Reading still works; the store is untouched.
    let user = kept_by_a_task.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
    let after = store.load(&id_of(&cookie)).await.unwrap().unwrap();
    assert_eq!(after, before);
    assert_eq!(store.len(), 1);
}

/// `Set-Cookie` goes out only when it changes something. A request that wrote an
/// existing session just before a login in another tab therefore sends no
/// `Set-Cookie` with the old id after the login's response: the browser stays on
/// the new id.
#[maybe_async::maybe_async]
async fn unchanged_cookies_are_not_sent_again() {
    let store = Arc::new(MemoryStore::new());
    // A browser-session cookie (no Max-Age) and a fixed expiry date: a write of an
    // existing session changes nothing in either cookie.
    let end_of_day = OffsetDateTime::now_utc() + Duration::hours(8);
    for expiry in [Expiry::OnSessionEnd, Expiry::AtDateTime(end_of_day)] {
        let manager = manager_of(store.clone()).with_expiry(expiry);
        let cookie = new_session(&manager, &[("user", "alice")]).await;
        let visit = manager.begin([cookie.as_str()]);
        visit.insert("page", "/cart").await.unwrap();
        let login = manager.begin([cookie.as_str()]);
        login.cycle_id().await.unwrap();
        // The visit writes first; the login then moves the session.
        let visit_set = manager.finish(&visit).await.unwrap();
        assert_eq!(visit_set, None, "{expiry:?}: nothing to change");
        let login_set = manager.finish(&login).await.unwrap().expect("new id");
        assert_ne!(pair(&login_set), cookie);
        let page = read(&manager, &pair(&login_set), "page").await;
        assert_eq!(page.as_deref(), Some("/cart"), "carried over");
    }
    // A sliding expiry with a Max-Age: the write moves it, so the cookie is renewed.
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    let visit = manager.begin([cookie.as_str()]);
    visit.insert("page", "/cart").await.unwrap();
    let set = manager
        .finish(&visit)
        .await
        .unwrap()
        .expect("a renewed Max-Age");
    assert_eq!(pair(&set), cookie);
    assert!(set.contains("Max-Age=3600"), "{set}");
    // An untouched or read-only request sends nothing.
    let read_only = manager.begin([cookie.as_str()]);
    read_only.get::<String>("user").await.unwrap();
    let set = manager.finish(&read_only).await.unwrap();
    assert_eq!(set, None);
}

#[maybe_async::maybe_async]
async fn a_refresh_racing_a_logout_never_revives_the_session() {
    let clock = Arc::new(AtomicI64::new(1_700_000_000));
    let now = {
        let clock = clock.clone();
        move || OffsetDateTime::from_unix_timestamp(clock.load(Ordering::SeqCst)).unwrap()
    };
    let store = Arc::new(MemoryStore::with_clock(now.clone()));
    let config =
        SessionConfig::new(Expiry::OnInactivity(Duration::hours(1))).with_clock(now.clone());
    let manager = SessionManager::from_shared(store.clone())
        .with_cookie_name("sid")
        .with_config(config)
        .with_refresh_on_request(0.25);
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    clock.fetch_add(30 * 60, Ordering::SeqCst); // a refresh is due

    let reader = manager.begin([cookie.as_str()]);
    let user = reader.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
    let logout = manager.begin([cookie.as_str()]);
    logout.flush().await.unwrap();
    manager.finish(&logout).await.unwrap();

    let set = manager.finish(&reader).await.unwrap();
    assert_eq!(set, None, "a refresh of a gone session sends nothing");
    assert!(store.is_empty(), "and writes nothing");

    // A refresh that loses to another write leaves that write alone.
    let cookie = new_session(&manager, &[("user", "bob")]).await;
    clock.fetch_add(30 * 60, Ordering::SeqCst);
    let reader = manager.begin([cookie.as_str()]);
    reader.get::<String>("user").await.unwrap();
    let writer = manager.begin([cookie.as_str()]);
    writer.insert("user", "carol").await.unwrap();
    manager.finish(&writer).await.unwrap();
    manager.finish(&reader).await.unwrap();
    let user = read(&manager, &cookie, "user").await;
    assert_eq!(user.as_deref(), Some("carol"));
}

#[maybe_async::maybe_async]
async fn update_runs_again_on_the_newer_value() {
    let store = Arc::new(PausingStore::default());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;

    let calls = AtomicUsize::new(0);
    let first = manager.begin([cookie.as_str()]);
    first.get::<String>("user").await.unwrap();
    let counted = store.interleave(
        || {
            block(first.update("visits", |n: Option<u64>| {
                calls.fetch_add(1, Ordering::SeqCst);
                n.unwrap_or(0) + 1
            }))
            .unwrap()
        },
        || {
            // Another request counts while the first one is held before its write.
            let other = manager.begin([cookie.as_str()]);
            let n = block(other.update("visits", |n: Option<u64>| n.unwrap_or(0) + 5)).unwrap();
            assert_eq!(n, 5);
            block(manager.finish(&other)).unwrap();
        },
    );
    assert_eq!(
        counted, 6,
        "the first request's step comes after the other's"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "run again after the conflict"
    );
    let set = manager.finish(&first).await.unwrap();
    assert!(set.is_some(), "the written session's cookie is renewed");
    let session = manager.begin([cookie.as_str()]);
    let visits = session.get::<u64>("visits").await.unwrap();
    assert_eq!(visits, Some(6));

    // On a session not stored yet, update only changes the handle: the commit
    // creates it.
    let fresh = manager.begin(None::<&str>);
    let writes = store.updates.load(Ordering::SeqCst);
    let one = fresh
        .update("visits", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap();
    assert_eq!(one, 1);
    assert_eq!(store.updates.load(Ordering::SeqCst), writes);
    let cookie = pair(&manager.finish(&fresh).await.unwrap().expect("created"));
    let session = manager.begin([cookie.as_str()]);
    let visits = session.get::<u64>("visits").await.unwrap();
    assert_eq!(visits, Some(1));

    // A value of another type is a decode error, and nothing changes.
    let wrong = session
        .update("visits", |s: Option<String>| s.unwrap_or_default())
        .await;
    assert!(matches!(
        wrong,
        Err(portable_sessions::session_store::Error::Decode(_))
    ));
    let reserved = session
        .update("\0created", |n: Option<u64>| n.unwrap_or(0))
        .await;
    assert!(reserved.is_err());
}

/// A store whose conditional writes always lose, as under a storm of other writers.
#[derive(Debug, Default)]
struct AlwaysConflicting(MemoryStore);

#[maybe_async::maybe_async]
impl SessionStore for AlwaysConflicting {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.0.create(record).await
    }

    async fn save(&self, record: &Record) -> Result<()> {
        self.0.save(record).await
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        self.0.load(id).await
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        self.0.delete(id).await
    }

    async fn update(&self, _: &Record) -> Result<Update> {
        Ok(Update::Conflict)
    }

    fn atomic_update(&self) -> bool {
        true
    }
}

#[maybe_async::maybe_async]
async fn endless_conflicts_end_in_a_clear_error() {
    let store = Arc::new(AlwaysConflicting::default());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    let session = manager.begin([cookie.as_str()]);
    session.insert("theme", "dark").await.unwrap();
    let failed = manager.finish(&session).await.unwrap_err();
    assert!(failed.is_write_conflict(), "{}", failed.report());
    assert!(
        failed.report().contains("64 attempts"),
        "{}",
        failed.report()
    );
    let modified = session.is_modified().await;
    assert!(modified, "the changes are still there to retry");
    let stored = store.0.load(&id_of(&cookie)).await.unwrap().unwrap();
    assert_eq!(stored.get::<String>("theme").unwrap(), None);
}

/// A request that arrives with the old id after a login moved the session (sent
/// before the login's response came back) sees no session, and each change it tries
/// fails with `SessionGone`: the handler knows nothing was kept. Nothing is created,
/// and no cookie is sent that would replace the new one.
#[maybe_async::maybe_async]
async fn a_request_with_a_moved_id_is_told_its_changes_are_not_kept() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone());
    let cookie = new_session(&manager, &[("user", "alice")]).await;
    let login = manager.begin([cookie.as_str()]);
    login.cycle_id().await.unwrap();
    manager.finish(&login).await.unwrap();
    let records = store.len();

    let late = manager.begin([cookie.as_str()]);
    let user = late.get::<String>("user").await.unwrap();
    assert_eq!(user, None, "the old id never shows the session");
    let inserted = late.insert("cart", "apple").await.unwrap_err();
    assert!(inserted.is_session_gone(), "{}", inserted.report());
    let counted = late
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap_err();
    assert!(counted.is_session_gone(), "{}", counted.report());
    let saved = late.save().await.unwrap_err();
    assert!(saved.is_session_gone());
    let cart = late.get::<String>("cart").await.unwrap();
    assert_eq!(cart, None, "nothing shown as kept");
    let set = manager.finish(&late).await.unwrap();
    assert_eq!(set, None, "no cookie that would replace the new one");
    assert_eq!(store.len(), records, "nothing created");
}

// Many requests of one session counting at once, on every store.

/// Threads, each running requests that count once through `Session::update`; in
/// async mode each thread drives two requests at a time on one executor.
const THREADS: usize = 8;
const REQUESTS: usize = 25;

#[maybe_async::maybe_async]
async fn count_once(manager: &SessionManager, cookie: &str) {
    let session = manager.begin([cookie]);
    session
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap();
    let set = manager.finish(&session).await.unwrap();
    assert!(set.is_some(), "a written session renews its cookie");
}

#[maybe_async::sync_impl]
fn count_concurrently(manager: &SessionManager, cookie: &str, threads: usize) {
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..REQUESTS {
                    count_once(manager, cookie);
                }
            });
        }
    });
}

#[maybe_async::async_impl]
fn count_concurrently(manager: &SessionManager, cookie: &str, threads: usize) {
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                block(async {
                    for _ in 0..REQUESTS / 2 {
                        futures_lite::future::zip(
                            count_once(manager, cookie),
                            count_once(manager, cookie),
                        )
                        .await;
                    }
                    for _ in 0..REQUESTS % 2 {
                        count_once(manager, cookie).await;
                    }
                })
            });
        }
    });
}

fn counts_exactly(store: Arc<dyn SessionStore>) {
    counts_exactly_on(store, THREADS);
}

/// [`counts_exactly`] with `threads` threads.
fn counts_exactly_on(store: Arc<dyn SessionStore>, threads: usize) {
    let manager = manager_of(store);
    let cookie = block(new_session(&manager, &[("user", "alice")]));
    count_concurrently(&manager, &cookie, threads);
    let session = manager.begin([cookie.as_str()]);
    let n = block(session.get::<u64>("n")).unwrap();
    assert_eq!(n, Some((threads * REQUESTS) as u64), "no step lost");
    let user = block(session.get::<String>("user")).unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
}

#[test]
fn concurrent_counting_is_exact_on_memory() {
    counts_exactly(Arc::new(MemoryStore::new()));
}

#[cfg(feature = "sqlite")]
#[test]
fn concurrent_counting_is_exact_on_sqlite() {
    let dir = common::TempDir::new("conflicts-sqlite");
    let store = portable_sessions::SqliteStore::open(dir.db()).unwrap();
    counts_exactly(Arc::new(store));
}

#[cfg(feature = "sqlite")]
#[test]
fn concurrent_counting_is_exact_on_memory_cached_sqlite() {
    let dir = common::TempDir::new("conflicts-cached-sqlite");
    let store = portable_sessions::SqliteStore::open(dir.db()).unwrap();
    counts_exactly(Arc::new(portable_sessions::CachingSessionStore::new(
        MemoryStore::new(),
        store,
    )));
}

#[cfg(feature = "redis")]
#[test]
fn concurrent_counting_is_exact_on_redis() {
    counts_exactly(Arc::new(common::shared_redis("conflicts")));
}

#[cfg(feature = "redis")]
#[test]
fn concurrent_counting_is_exact_on_memory_cached_redis() {
    let store = portable_sessions::CachingSessionStore::new(
        MemoryStore::new(),
        common::shared_redis("conflicts"),
    );
    counts_exactly(Arc::new(store));
}

#[cfg(feature = "redis")]
#[test]
fn concurrent_counting_is_exact_on_a_redis_cluster() {
    let cluster = common::redis_deployments::Cluster::start();
    let store = portable_sessions::RedisStore::new(&cluster.url(""))
        .unwrap()
        .with_key_prefix(common::unique_prefix("conflicts-cluster"));
    counts_exactly(Arc::new(store));
}

#[cfg(feature = "redis")]
#[test]
fn concurrent_counting_is_exact_through_redis_sentinel() {
    let deployment = common::redis_deployments::Sentinels::start();
    let store = portable_sessions::RedisStore::new(&deployment.url("wait_replicas=1"))
        .unwrap()
        .with_key_prefix(common::unique_prefix("conflicts-sentinel"));
    counts_exactly(Arc::new(store));
}

#[cfg(feature = "postgres")]
#[test]
fn concurrent_counting_is_exact_on_postgres() {
    let schema = common::PgSchema::new("conflicts");
    counts_exactly(Arc::new(schema.store()));
}

/// Through PgBouncer in transaction and statement mode, whose two server connections
/// per pool the counting requests take turns on. Fewer at once than elsewhere: the
/// pooler queues each request's load and its write apart, so that with 16 at once
/// nearly every write finds that another came between, and a request can lose all
/// of its 64 tries (a `WriteConflict`, never a lost step) in one run of a few.
#[cfg(feature = "postgres")]
#[test]
fn concurrent_counting_is_exact_on_postgres_through_pgbouncer() {
    use common::pgbouncer::{PgBouncer, PoolMode};
    let bouncer = PgBouncer::start();
    for mode in PoolMode::BOTH {
        eprintln!("through PgBouncer in {} mode", mode.name());
        let schema = common::PgSchema::new("conflicts_pgbouncer");
        counts_exactly_on(Arc::new(schema.store_at(&bouncer.url(mode))), 2);
    }
}

#[cfg(feature = "postgres")]
#[test]
fn concurrent_counting_is_exact_on_memory_cached_postgres() {
    let schema = common::PgSchema::new("conflicts_cached");
    let store = portable_sessions::CachingSessionStore::new(MemoryStore::new(), schema.store());
    counts_exactly(Arc::new(store));
}
