//! A user's sessions through `Session`: the owner set at login, listing, ending one,
//! the others or all, the owner limit, on every store and in both modes; and each
//! race, stepped deterministically by a store that holds a request inside a chosen
//! operation while the test runs another.

mod common;

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc, Condvar, Mutex,
};

use common::block;
use portable_sessions::{
    session::{Ending, Expiry, Handle, Id, OwnedSession, Owner, Record, SessionConfig},
    session_store::{Result, Update},
    CachingSessionStore, ExpiredDeletion, MemoryStore, SessionManager, SessionStore,
};
use time::{Duration, OffsetDateTime};

tests_in_both_modes!(
    owners_on_memory,
    owners_on_a_cache,
    a_store_without_owners_says_so,
    a_write_held_while_everything_ends_is_not_kept,
    a_write_after_everything_ended_is_not_kept,
    a_login_held_while_everything_ends_stays,
    a_login_before_everything_ends_is_ended,
    a_relogin_held_while_everything_ends_keeps_its_owner,
    a_listing_during_a_login_sees_the_session_once_it_moved,
    two_logins_racing_a_limit_of_two_leave_two,
    two_logins_racing_a_limit_of_one_leave_the_later,
    expired_sessions_leave_the_listing_and_the_index,
    a_session_with_only_an_owner_is_stored,
    a_session_without_an_owner_ends_alone_everywhere,
    a_relogin_restarted_by_the_limit_race_still_applies_the_limit,
    a_failed_limit_step_is_not_a_failed_login,
    a_cache_never_keeps_a_login_ended_between_its_store_and_cache_steps,
    a_cache_serves_nothing_while_a_failed_ending_may_still_land,
    a_cache_never_keeps_a_login_created_during_an_ending,
);

fn manager_of(store: Arc<dyn SessionStore>, config: SessionConfig) -> SessionManager {
    SessionManager::from_shared(store)
        .with_config(config)
        .with_cookie_name("sid")
}

fn config() -> SessionConfig {
    SessionConfig::new(Expiry::OnInactivity(Duration::hours(1)))
}

/// An owner no other test (or run) uses.
fn owner(name: &str) -> Owner {
    Owner::new(format!("{name}-{}", Id::default())).unwrap()
}

/// The `sid=ID` pair of a `Set-Cookie` value.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_owned()
}

fn id_of(cookie: &str) -> Id {
    cookie["sid=".len()..].parse().expect("an id")
}

fn handle_of(cookie: &str) -> Handle {
    Handle::of(&id_of(cookie))
}

/// One login request on a new session: a device name, the move to a new id, the
/// owner. Returns the cookie it set.
#[maybe_async::maybe_async]
async fn log_in(manager: &SessionManager, who: &Owner, device: &str) -> String {
    let session = manager.begin(None::<&str>);
    session.insert("device", device).await.unwrap();
    session.cycle_id().await.unwrap();
    session.set_owner(who).await.unwrap();
    let set = manager.finish(&session).await.unwrap();
    pair(&set.expect("a login sets its cookie"))
}

/// The owner's sessions as the session under `cookie` lists them.
#[maybe_async::maybe_async]
async fn listing(manager: &SessionManager, cookie: &str) -> Vec<OwnedSession> {
    let session = manager.begin([cookie]);
    let mut listed = session.owner_sessions().await.unwrap();
    manager.finish(&session).await.unwrap();
    listed.sort_by_key(OwnedSession::handle);
    listed
}

#[maybe_async::maybe_async]
async fn handles(manager: &SessionManager, cookie: &str) -> Vec<Handle> {
    let listed = listing(manager, cookie).await;
    listed.iter().map(OwnedSession::handle).collect()
}

fn sorted(mut handles: Vec<Handle>) -> Vec<Handle> {
    handles.sort();
    handles
}

/// Whether the store holds a session with values under the cookie's id.
#[maybe_async::maybe_async]
async fn live(store: &dyn SessionStore, cookie: &str) -> bool {
    let found = store.load(&id_of(cookie)).await.unwrap();
    found.is_some_and(|record| record.keys().any(|key| !key.starts_with('\0')))
}

/// The whole `Session` API of a user's sessions, on `store`.
#[maybe_async::maybe_async]
async fn check_sessions_of_owners(store: Arc<dyn SessionStore>) {
    let manager = manager_of(store.clone(), config());
    let alice = owner("alice");
    let bob = owner("bob");
    let laptop = log_in(&manager, &alice, "laptop").await;
    let phone = log_in(&manager, &alice, "phone").await;
    let tablet = log_in(&manager, &alice, "tablet").await;
    let bobs = log_in(&manager, &bob, "desktop").await;

    // Listed by handle, the current one marked, values readable, no id anywhere.
    let session = manager.begin([phone.as_str()]);
    let found = session.owner().await.unwrap();
    assert_eq!(found.as_ref(), Some(&alice));
    let listed = session.owner_sessions().await.unwrap();
    manager.finish(&session).await.unwrap();
    assert_eq!(
        sorted(listed.iter().map(OwnedSession::handle).collect()),
        sorted(vec![
            handle_of(&laptop),
            handle_of(&phone),
            handle_of(&tablet)
        ])
    );
    for entry in &listed {
        let current = entry.handle() == handle_of(&phone);
        assert_eq!(entry.is_current(), current, "{entry:?}");
        assert_eq!(entry.owner(), &alice);
        let device: Option<String> = entry.get("device").unwrap();
        let expected = [(&laptop, "laptop"), (&phone, "phone"), (&tablet, "tablet")]
            .into_iter()
            .find(|(cookie, _)| handle_of(cookie) == entry.handle())
            .map(|(_, device)| device.to_owned());
        assert_eq!(device, expected);
        assert!(entry.created_at() <= entry.written_at());
        assert!(entry.expiry_date() > OffsetDateTime::now_utc());
        let shown = format!("{entry:?} {}", entry.handle());
        assert!(
            !shown.contains(&phone["sid=".len()..]),
            "no id shown: {shown}"
        );
    }

    // One, by handle; never another owner's.
    let session = manager.begin([phone.as_str()]);
    let ended = session.end_session(handle_of(&laptop)).await;
    assert!(ended.unwrap());
    let ended = session.end_session(handle_of(&laptop)).await;
    assert!(!ended.unwrap(), "already ended");
    let ended = session.end_session(handle_of(&bobs)).await;
    assert!(!ended.unwrap(), "another owner's");
    let set_cookie = manager.finish(&session).await;
    assert_eq!(set_cookie.unwrap(), None);
    let laptop_live = live(&*store, &laptop).await;
    assert!(!laptop_live);
    let bobs_live = live(&*store, &bobs).await;
    assert!(bobs_live);

    // The others: this one and other owners stay.
    let session = manager.begin([tablet.as_str()]);
    let ended = session.end_other_sessions().await;
    assert_eq!(ended.unwrap(), 1);
    manager.finish(&session).await.unwrap();
    let phone_live = live(&*store, &phone).await;
    assert!(!phone_live);
    let tablet_live = live(&*store, &tablet).await;
    assert!(tablet_live);
    let listed = handles(&manager, &tablet).await;
    assert_eq!(listed, vec![handle_of(&tablet)]);

    // All, this one included: as a logout, its cookie removed.
    let again = log_in(&manager, &alice, "laptop").await;
    let session = manager.begin([again.as_str()]);
    let ended = session.end_all_sessions().await;
    assert_eq!(ended.unwrap(), 2);
    let removal = manager.finish(&session).await.unwrap().expect("a removal");
    assert!(removal.starts_with("sid=;"), "{removal}");
    let again_live = live(&*store, &again).await;
    let tablet_live = live(&*store, &tablet).await;
    assert!(!again_live && !tablet_live);
    let listed = handles(&manager, &bobs).await;
    assert_eq!(listed, vec![handle_of(&bobs)]);

    // Taking the owner away takes the session out of the listing.
    let first = log_in(&manager, &alice, "laptop").await;
    let second = log_in(&manager, &alice, "phone").await;
    let session = manager.begin([first.as_str()]);
    session.clear_owner().await.unwrap();
    let found_owner = session.owner().await;
    assert_eq!(found_owner.unwrap(), None);
    manager.finish(&session).await.unwrap();
    let listed = handles(&manager, &second).await;
    assert_eq!(listed, vec![handle_of(&second)]);

    // A limit of two: a third login ends the oldest.
    let limited = manager_of(store.clone(), config().with_owner_limit(2));
    let carol = owner("carol");
    let one = log_in(&limited, &carol, "one").await;
    let two = log_in(&limited, &carol, "two").await;
    let three = log_in(&limited, &carol, "three").await;
    let one_live = live(&*store, &one).await;
    assert!(!one_live, "the oldest is ended");
    let listed = handles(&limited, &three).await;
    assert_eq!(listed, sorted(vec![handle_of(&two), handle_of(&three)]));

    for cookie in [&first, &second, &bobs, &two, &three] {
        store.delete(&id_of(cookie)).await.unwrap();
    }
}

#[maybe_async::maybe_async]
async fn owners_on_memory() {
    check_sessions_of_owners(Arc::new(MemoryStore::new())).await;
}

#[maybe_async::maybe_async]
async fn owners_on_a_cache() {
    let store = Arc::new(CachingSessionStore::new(
        MemoryStore::new(),
        MemoryStore::new(),
    ));
    check_sessions_of_owners(store.clone()).await;
    assert!(store.store().is_empty() && store.cache().is_empty());
}

#[cfg(feature = "sqlite")]
#[test]
#[allow(clippy::unit_arg)] // blocking mode: the check is a plain call
fn owners_on_sqlite() {
    let dir = common::TempDir::new("owners");
    let store = portable_sessions::SqliteStore::open(dir.db()).unwrap();
    block(check_sessions_of_owners(Arc::new(store)));
}

#[cfg(feature = "redis")]
#[test]
#[allow(clippy::unit_arg)]
fn owners_on_redis() {
    block(check_sessions_of_owners(Arc::new(common::shared_redis(
        "owners",
    ))));
}

#[cfg(feature = "postgres")]
#[test]
#[allow(clippy::unit_arg)]
fn owners_on_postgres() {
    let schema = common::PgSchema::new("owners");
    block(check_sessions_of_owners(Arc::new(schema.store())));
}

/// A store written without owners: setting one, listing and ending fail with a
/// clear "unsupported" error, and nothing else changes.
#[maybe_async::maybe_async]
async fn a_store_without_owners_says_so() {
    let store = Arc::new(common::FaultyStore::new());
    assert!(!store.supports_owners());
    let manager = manager_of(store.clone(), config());
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    let refused = session.set_owner(&owner("alice")).await.unwrap_err();
    assert!(refused.is_unsupported(), "{}", refused.report());
    assert!(refused.report().contains("owners"), "{}", refused.report());
    let cookie = pair(
        &manager
            .finish(&session)
            .await
            .unwrap()
            .expect("stored all the same"),
    );
    let cookie_live = live(&*store, &cookie).await;
    assert!(cookie_live);
    let listed = store.list_owned(&owner("alice")).await.unwrap_err();
    assert!(listed.is_unsupported(), "{}", listed.report());
    let ended = store
        .end_owned(&owner("alice"), Ending::All)
        .await
        .unwrap_err();
    assert!(ended.is_unsupported(), "{}", ended.report());
    // Nor can a session list or end its owner's sessions there.
    let session = manager.begin([cookie.as_str()]);
    let listed = session.owner_sessions().await;
    assert!(listed.unwrap_err().is_unsupported());
    let ended = session.end_all_sessions().await;
    assert!(ended.unwrap_err().is_unsupported());
    let others = session.end_other_sessions().await;
    assert!(others.unwrap_err().is_unsupported());
}

/// The operations a [`GatedStore`] can hold a request in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    /// Just after a create reached the memory store.
    Created,
    Update,
    EndOwned,
}

/// What a [`GatedStore`]'s `end_owned` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// Ends, as the memory store does.
    Pass,
    /// Fails, ending nothing.
    Fail,
    /// Fails at once, and ends later, when the test calls [`GatedStore::land`]: a
    /// reply lost while the statement still runs.
    Late,
}

/// A memory store that, once armed for an operation, holds the next call of it
/// just before it reaches the memory store, until the test lets it go; its
/// `end_owned` may fail, or land late ([`Ends`]).
#[derive(Debug)]
struct GatedStore {
    inner: MemoryStore,
    /// What `end_owned` does.
    ends: Mutex<Ends>,
    /// An ending that [`Ends::Late`] left to land later.
    pending: Mutex<Option<(Owner, Ending)>>,
    armed: Mutex<Option<Op>>,
    holding: Mutex<bool>,
    released: Mutex<bool>,
    changed: Condvar,
}

impl GatedStore {
    fn new(inner: MemoryStore) -> Self {
        Self {
            inner,
            ends: Mutex::new(Ends::Pass),
            pending: Mutex::new(None),
            armed: Mutex::new(None),
            holding: Mutex::new(false),
            released: Mutex::new(false),
            changed: Condvar::new(),
        }
    }

    fn pass(&self, op: Op) {
        let mut armed = self.armed.lock().unwrap();
        if *armed != Some(op) {
            return;
        }
        *armed = None;
        drop(armed);
        *self.holding.lock().unwrap() = true;
        self.changed.notify_all();
        let released = self.released.lock().unwrap();
        let (_released, waited) = self
            .changed
            .wait_timeout_while(released, std::time::Duration::from_secs(20), |r| !*r)
            .unwrap();
        assert!(!waited.timed_out(), "never released");
    }

    /// Runs `held` on a thread of its own until it reaches `op`, then `meanwhile`
    /// on this thread, then lets `held` finish; returns both results.
    fn interleave<T: Send, U>(
        &self,
        op: Op,
        held: impl FnOnce() -> T + Send,
        meanwhile: impl FnOnce() -> U,
    ) -> (T, U) {
        *self.released.lock().unwrap() = false;
        *self.holding.lock().unwrap() = false;
        *self.armed.lock().unwrap() = Some(op);
        std::thread::scope(|scope| {
            let held = scope.spawn(held);
            let holding = self.holding.lock().unwrap();
            let (holding, waited) = self
                .changed
                .wait_timeout_while(holding, std::time::Duration::from_secs(20), |h| !*h)
                .unwrap();
            assert!(!waited.timed_out(), "{op:?} was never reached");
            drop(holding);
            let during = meanwhile();
            *self.released.lock().unwrap() = true;
            self.changed.notify_all();
            (held.join().expect("the held request"), during)
        })
    }
}

#[maybe_async::maybe_async]
impl SessionStore for GatedStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.pass(Op::Create);
        let created = self.inner.create(record).await;
        self.pass(Op::Created);
        created
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
        self.pass(Op::Update);
        self.inner.update(record).await
    }

    fn atomic_update(&self) -> bool {
        true
    }

    fn supports_owners(&self) -> bool {
        true
    }

    async fn list_owned(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        self.inner.list_owned(owner).await
    }

    async fn end_owned(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        self.pass(Op::EndOwned);
        let ends = *self.ends.lock().unwrap();
        match ends {
            Ends::Pass => self.inner.end_owned(owner, ending).await,
            Ends::Fail => Err(portable_sessions::session_store::Error::backend("injected")),
            Ends::Late => {
                *self.pending.lock().unwrap() = Some((owner.clone(), ending));
                Err(portable_sessions::session_store::Error::backend(
                    "the reply was lost",
                ))
            }
        }
    }
}

impl GatedStore {
    /// Lands the ending that [`Ends::Late`] left.
    #[maybe_async::maybe_async]
    async fn land(&self) {
        let (owner, ending) = self.pending.lock().unwrap().take().expect("an ending");
        self.inner.end_owned(&owner, ending).await.unwrap();
    }
}

fn gated() -> (Arc<GatedStore>, SessionManager) {
    let store = Arc::new(GatedStore::new(MemoryStore::new()));
    let manager = manager_of(store.clone(), config());
    (store, manager)
}

/// Ends every session of the owner of the session under `cookie`; returns how many.
#[maybe_async::maybe_async]
async fn everywhere(manager: &SessionManager, cookie: &str) -> usize {
    let session = manager.begin([cookie]);
    let ended = session.end_all_sessions().await.unwrap();
    manager.finish(&session).await.unwrap();
    ended
}

/// A request of a session, held inside its write while "log out everywhere" runs:
/// the write finds the session gone, keeps nothing and sends no cookie.
#[maybe_async::maybe_async]
async fn a_write_held_while_everything_ends_is_not_kept() {
    let (store, manager) = gated();
    let alice = owner("alice");
    let visiting = log_in(&manager, &alice, "laptop").await;
    let ending = log_in(&manager, &alice, "phone").await;
    let visit = manager.begin([visiting.as_str()]);
    visit.insert("cart", "pear").await.unwrap();
    let (finished, ended) = store.interleave(
        Op::Update,
        || block(manager.finish(&visit)),
        || block(everywhere(&manager, &ending)),
    );
    assert_eq!(ended, 2);
    assert_eq!(
        finished.unwrap(),
        None,
        "no cookie that would bring it back"
    );
    let visiting_live = live(&*store, &visiting).await;
    assert!(!visiting_live, "ended for good");
    assert!(store.inner.is_empty());
}

/// The same in the other order: the request loaded the session, the ending ran,
/// then the request writes.
#[maybe_async::maybe_async]
async fn a_write_after_everything_ended_is_not_kept() {
    let (store, manager) = gated();
    let alice = owner("alice");
    let visiting = log_in(&manager, &alice, "laptop").await;
    let ending = log_in(&manager, &alice, "phone").await;
    let visit = manager.begin([visiting.as_str()]);
    let device = visit.get::<String>("device").await.unwrap();
    assert_eq!(device.as_deref(), Some("laptop"));
    let ended = everywhere(&manager, &ending).await;
    assert_eq!(ended, 2);
    visit.insert("cart", "pear").await.unwrap();
    let saved = visit.save().await;
    assert!(
        saved.unwrap_err().is_session_gone(),
        "the write finds it gone"
    );
    let set_cookie = manager.finish(&visit).await;
    assert_eq!(set_cookie.unwrap(), None);
    assert!(store.inner.is_empty(), "nothing revived");
}

/// A login held inside its create while "everywhere" runs completes after it: a
/// new session, which stays.
#[maybe_async::maybe_async]
async fn a_login_held_while_everything_ends_stays() {
    let (store, manager) = gated();
    let alice = owner("alice");
    let ending = log_in(&manager, &alice, "phone").await;
    let (login, ended) = store.interleave(
        Op::Create,
        || block(log_in(&manager, &alice, "laptop")),
        || block(everywhere(&manager, &ending)),
    );
    assert_eq!(ended, 1);
    let login_live = live(&*store, &login).await;
    assert!(login_live);
    let listed = handles(&manager, &login).await;
    assert_eq!(listed, vec![handle_of(&login)]);
}

/// A login that completed before "everywhere" is ended by it.
#[maybe_async::maybe_async]
async fn a_login_before_everything_ends_is_ended() {
    let (store, manager) = gated();
    let alice = owner("alice");
    let ending = log_in(&manager, &alice, "phone").await;
    let login = log_in(&manager, &alice, "laptop").await;
    let ended = everywhere(&manager, &ending).await;
    assert_eq!(ended, 2);
    let login_live = live(&*store, &login).await;
    assert!(!login_live);
    assert!(store.inner.is_empty());
}

/// A user logging in again on a session already theirs, held between creating the
/// new record and retiring the old one while "everywhere" ends both: the login
/// stands as a new session, still the user's, so "everywhere" and listings reach it.
#[maybe_async::maybe_async]
async fn a_relogin_held_while_everything_ends_keeps_its_owner() {
    let (store, manager) = gated();
    let alice = owner("alice");
    let cookie = log_in(&manager, &alice, "laptop").await;
    let ending = log_in(&manager, &alice, "phone").await;
    let relogin = manager.begin([cookie.as_str()]);
    relogin.cycle_id().await.unwrap();
    relogin.set_owner(&alice).await.unwrap();
    relogin.insert("user", "alice").await.unwrap();
    let (finished, ended) = store.interleave(
        Op::Update,
        || block(manager.finish(&relogin)),
        || block(everywhere(&manager, &ending)),
    );
    assert_eq!(
        ended, 3,
        "the old record, the new one, and the ending's own"
    );
    let new = pair(&finished.unwrap().expect("the login's new session"));
    assert_ne!(new, cookie);
    let cookie_live = live(&*store, &cookie).await;
    assert!(!cookie_live, "the ended session stays ended");
    let session = manager.begin([new.as_str()]);
    let found_owner = session.owner().await;
    assert_eq!(found_owner.unwrap().as_ref(), Some(&alice));
    let device = session.get::<String>("device").await.unwrap();
    assert_eq!(device, None, "nothing of the ended session comes back");
    manager.finish(&session).await.unwrap();
    let listed = handles(&manager, &new).await;
    assert_eq!(listed, vec![handle_of(&new)]);
}

/// A listing while a login moves the session to a new id lists it (under its old
/// handle, its new one, or both: both records are live until the move completes);
/// once the move is done, under its new handle alone, marked current for the new
/// cookie.
#[maybe_async::maybe_async]
async fn a_listing_during_a_login_sees_the_session_once_it_moved() {
    let (store, manager) = gated();
    let alice = owner("alice");
    let moving = log_in(&manager, &alice, "laptop").await;
    let other = log_in(&manager, &alice, "phone").await;
    let session = manager.begin([moving.as_str()]);
    session.cycle_id().await.unwrap();
    let (finished, during) = store.interleave(
        Op::Update,
        || block(manager.finish(&session)),
        || block(handles(&manager, &other)),
    );
    assert!(during.contains(&handle_of(&moving)), "{during:?}");
    assert!(during.contains(&handle_of(&other)), "{during:?}");
    let moved = pair(&finished.unwrap().expect("the new id"));
    let listed = listing(&manager, &moved).await;
    assert_eq!(
        sorted(listed.iter().map(OwnedSession::handle).collect()),
        sorted(vec![handle_of(&moved), handle_of(&other)]),
        "the old handle is gone once the move is done"
    );
    for entry in listed {
        assert_eq!(entry.is_current(), entry.handle() == handle_of(&moved));
    }
}

/// Two logins with a limit of two, one held at its limit step until the other is
/// done: two sessions are left, the two logins, never three.
#[maybe_async::maybe_async]
async fn two_logins_racing_a_limit_of_two_leave_two() {
    let store = Arc::new(GatedStore::new(MemoryStore::new()));
    let manager = manager_of(store.clone(), config().with_owner_limit(2));
    let alice = owner("alice");
    let oldest = log_in(&manager, &alice, "desktop").await;
    let (first, second) = store.interleave(
        Op::EndOwned,
        || block(log_in(&manager, &alice, "laptop")),
        || block(log_in(&manager, &alice, "phone")),
    );
    let oldest_live = live(&*store, &oldest).await;
    assert!(!oldest_live);
    let listed = handles(&manager, &first).await;
    assert_eq!(listed, sorted(vec![handle_of(&first), handle_of(&second)]));
}

/// With a limit of one, the later login wins; the earlier one, ended by the later
/// one's limit step, sends no cookie.
#[maybe_async::maybe_async]
async fn two_logins_racing_a_limit_of_one_leave_the_later() {
    let store = Arc::new(GatedStore::new(MemoryStore::new()));
    let manager = manager_of(store.clone(), config().with_owner_limit(1));
    let alice = owner("alice");
    let (first, second) = store.interleave(
        Op::EndOwned,
        || {
            let session = manager.begin(None::<&str>);
            block(session.set_owner(&alice)).unwrap();
            block(session.insert("device", "laptop")).unwrap();
            block(manager.finish(&session)).unwrap()
        },
        || block(log_in(&manager, &alice, "phone")),
    );
    assert_eq!(first, None, "the ended login sends no cookie");
    let listed = handles(&manager, &second).await;
    assert_eq!(listed, vec![handle_of(&second)]);
    assert_eq!(store.inner.len(), 1);
}

/// Expired sessions are not listed, and `delete_expired` takes them out of the
/// index with their records.
#[maybe_async::maybe_async]
async fn expired_sessions_leave_the_listing_and_the_index() {
    let seconds = Arc::new(AtomicI64::new(OffsetDateTime::now_utc().unix_timestamp()));
    let clock = {
        let seconds = seconds.clone();
        move || OffsetDateTime::from_unix_timestamp(seconds.load(Ordering::SeqCst)).unwrap()
    };
    let store = MemoryStore::with_clock(clock.clone());
    let manager = SessionManager::new(store.clone())
        .with_config(config().with_clock(clock))
        .with_cookie_name("sid");
    let alice = owner("alice");
    let old = log_in(&manager, &alice, "laptop").await;
    seconds.fetch_add(1800, Ordering::SeqCst);
    let new = log_in(&manager, &alice, "phone").await;
    let listed = handles(&manager, &new).await;
    assert_eq!(listed.len(), 2);
    seconds.fetch_add(1800, Ordering::SeqCst);
    let listed = handles(&manager, &new).await;
    assert_eq!(
        listed,
        vec![handle_of(&new)],
        "the expired one is not listed"
    );
    let deleted = store.delete_expired().await;
    assert_eq!(deleted.unwrap(), 1);
    let ended = store.end_owned(&alice, Ending::All).await.unwrap();
    assert_eq!(
        ended,
        vec![handle_of(&new)],
        "nothing expired is ended or counted"
    );
    assert!(store.is_empty());
    let old_live = live(&store, &old).await;
    assert!(!old_live);
}

/// An owner is content: a session with nothing but an owner is stored and sends its
/// cookie.
#[maybe_async::maybe_async]
async fn a_session_with_only_an_owner_is_stored() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone(), config());
    let alice = owner("alice");
    let session = manager.begin(None::<&str>);
    session.set_owner(&alice).await.unwrap();
    let set = manager.finish(&session).await.unwrap();
    let cookie = pair(&set.expect("stored, with its cookie"));
    let listed = handles(&manager, &cookie).await;
    assert_eq!(listed, vec![handle_of(&cookie)]);
}

/// "Everywhere" from a session that has no owner (logged in before owners were
/// set) ends that session, and says so.
#[maybe_async::maybe_async]
async fn a_session_without_an_owner_ends_alone_everywhere() {
    let store = Arc::new(MemoryStore::new());
    let manager = manager_of(store.clone(), config());
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    let cookie = pair(&manager.finish(&session).await.unwrap().expect("stored"));
    let session = manager.begin([cookie.as_str()]);
    let ended = session.end_all_sessions().await.unwrap();
    assert_eq!(ended, 1);
    let removal = manager.finish(&session).await.unwrap().expect("a removal");
    assert!(removal.starts_with("sid=;"), "{removal}");
    assert!(store.is_empty());
}

/// Limit one. A user logs in again on a session already theirs (`cycle_id`, then
/// the owner); held between creating its new record and retiring the old one, while
/// another login of the user runs, whose limit step ends the old session. The
/// re-login then restarts as a new session, and its limit step still runs: one
/// session is left.
#[maybe_async::maybe_async]
async fn a_relogin_restarted_by_the_limit_race_still_applies_the_limit() {
    let store = Arc::new(GatedStore::new(MemoryStore::new()));
    let manager = manager_of(store.clone(), config().with_owner_limit(1));
    let alice = owner("alice");
    let cookie = log_in(&manager, &alice, "laptop").await;
    let relogin = manager.begin([cookie.as_str()]);
    relogin.cycle_id().await.unwrap();
    relogin.set_owner(&alice).await.unwrap();
    let (first, other) = store.interleave(
        Op::Update,
        || block(manager.finish(&relogin)),
        || block(log_in(&manager, &alice, "phone")),
    );
    let first = first.unwrap();
    let live_sessions = store.inner.len();
    assert_eq!(live_sessions, 1, "{first:?} {other}");
    let survivor = first.map(|set| pair(&set)).unwrap_or(other);
    let listed = handles(&manager, &survivor).await;
    assert_eq!(listed, vec![handle_of(&survivor)]);
}

/// A store whose `end_owned` fails: the login is written, its cookie sent, and the
/// failure logged; the limit waits for the next login.
#[maybe_async::maybe_async]
async fn a_failed_limit_step_is_not_a_failed_login() {
    let store = Arc::new(GatedStore::new(MemoryStore::new()));
    *store.ends.lock().unwrap() = Ends::Fail;
    let manager = manager_of(store.clone(), config().with_owner_limit(1));
    let alice = owner("alice");
    let first = log_in(&manager, &alice, "laptop").await;
    let second = log_in(&manager, &alice, "phone").await;
    let first_live = live(&*store, &first).await;
    let second_live = live(&*store, &second).await;
    assert!(first_live && second_live, "both logins stand");
}

/// A caching store over a gated store: a login's create, held just after its store
/// step, while "everywhere" ends that very session; the create's cache step then
/// leaves the cache alone, and the ended session is never served.
#[maybe_async::maybe_async]
async fn a_cache_never_keeps_a_login_ended_between_its_store_and_cache_steps() {
    let gated = Arc::new(GatedStore::new(MemoryStore::new()));
    let caching = Arc::new(CachingSessionStore::new(MemoryStore::new(), gated.clone()));
    let manager = manager_of(caching.clone(), config());
    let alice = owner("alice");
    let (login, ended) = gated.interleave(
        Op::Created,
        || block(log_in(&manager, &alice, "laptop")),
        || block(caching.end_owned(&alice, Ending::All)).unwrap(),
    );
    assert_eq!(ended.len(), 1, "the login's record, ended in the store");
    let found_live = live(&*caching, &login).await;
    assert!(!found_live, "never served from the cache");
    assert!(caching.cache().is_empty());
}

/// A store whose `end_owned` fails at once and lands later (a reply lost, the
/// statement still running): the caching store serves nothing from its cache
/// meanwhile, so a fill made in between never outlives the ending.
#[maybe_async::maybe_async]
async fn a_cache_serves_nothing_while_a_failed_ending_may_still_land() {
    let late = Arc::new(GatedStore::new(MemoryStore::new()));
    *late.ends.lock().unwrap() = Ends::Late;
    let caching = Arc::new(CachingSessionStore::new(MemoryStore::new(), late.clone()));
    let manager = manager_of(caching.clone(), config());
    let alice = owner("alice");
    let cookie = log_in(&manager, &alice, "laptop").await;
    let failed = caching.end_owned(&alice, Ending::All).await;
    assert!(failed.is_err());
    // A load in between: the store still has the session, and would fill the cache.
    let found_live = live(&*caching, &cookie).await;
    assert!(found_live);
    late.land().await;
    let found_live = live(&*caching, &cookie).await;
    assert!(!found_live, "the cache does not serve it");
}

/// A login whose store step runs while an ending of its owner is held inside its own
/// store step (the caching store holds every stripe lock meanwhile): the ending then
/// ends it, and the login's cache step, after the ending, leaves the cache alone.
#[maybe_async::maybe_async]
async fn a_cache_never_keeps_a_login_created_during_an_ending() {
    let gated = Arc::new(GatedStore::new(MemoryStore::new()));
    let caching = Arc::new(CachingSessionStore::new(MemoryStore::new(), gated.clone()));
    let manager = manager_of(caching.clone(), config());
    let alice = owner("alice");
    let first = log_in(&manager, &alice, "phone").await;
    let mut login = None;
    let (ended, ()) = gated.interleave(
        Op::EndOwned,
        || block(caching.end_owned(&alice, Ending::All)).unwrap(),
        || {
            let manager = manager.clone();
            let alice = alice.clone();
            login = Some(std::thread::spawn(move || {
                block(log_in(&manager, &alice, "laptop"))
            }));
            // Its store step lands; its cache step waits for the ending's locks.
            common::wait_for("the login's store step", || gated.inner.len() == 2);
        },
    );
    let login = login.unwrap().join().unwrap();
    assert_eq!(ended.len(), 2, "the ending found the new login too");
    let first_live = live(&*caching, &first).await;
    let login_live = live(&*caching, &login).await;
    assert!(!first_live && !login_live, "never served from the cache");
    assert!(caching.cache().is_empty());
}
