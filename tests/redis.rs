//! `RedisStore` against real Redis servers: the conformance suite (alone and behind a
//! cache) on the shared server at 127.0.0.1:6379 under a key prefix per test; keys,
//! values and TTLs as Redis holds them; corrupt values; and outages of servers the
//! tests start, kill, freeze and restart themselves.
#![cfg(feature = "redis")]

mod common;

use std::{
    process::{Child, Command},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration as StdDuration, Instant},
};

use portable_sessions::{
    session::{Ending, Handle, Id, Owner, Ownership, Record},
    session_store::{Error, Result, Update},
    testing::{self, Expiry},
    CachingSessionStore, ExpiredDeletion, MemoryStore, RedisStore, SessionStore,
};
use rustix::process::{kill_process, Pid, Signal};
use time::{Duration, OffsetDateTime};

use common::{
    block, created, every_operation, is_backend, live_record, sixteen_callers, wait_for, LoopTimer,
    FAIL_WITHIN, TIMEOUT,
};

const SHARED: &str = common::SHARED_REDIS;

fn shared_store(test: &str) -> RedisStore {
    common::shared_redis(test)
}

fn raw(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn key_of(store: &RedisStore, id: &Id) -> String {
    common::redis_key(store, id)
}

fn keys(conn: &mut redis::Connection, prefix: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(conn)
        .unwrap()
}

/// A `redis-server` of the test's own, without persistence, listening only on a Unix
/// socket in a temporary directory of its own: no other test (or program) can take
/// its address, before it starts or while it is down for a restart.
struct RedisServer {
    dir: common::TempDir,
    password: Option<&'static str>,
    child: Child,
}

impl RedisServer {
    fn start() -> Self {
        Self::start_in(common::TempDir::new("redis-server"), None)
    }

    /// Starts a server that wants a password: connecting then takes a round trip.
    fn start_with_password(password: &'static str) -> Self {
        Self::start_in(common::TempDir::new("redis-server"), Some(password))
    }

    fn socket(dir: &common::TempDir) -> std::path::PathBuf {
        dir.0.join("redis.sock")
    }

    fn start_in(dir: common::TempDir, password: Option<&'static str>) -> Self {
        let socket = Self::socket(&dir);
        let mut command = Command::new("redis-server");
        command
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(password) = password {
            command.args(["--requirepass", password]);
        }
        let child = common::spawn_redis_server(&mut command);
        let mut server = Self {
            dir,
            password,
            child,
        };
        let deadline = Instant::now() + StdDuration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "redis-server on {} exited at start: {status}",
                    socket.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {} within 10 s",
                socket.display()
            );
            std::thread::sleep(StdDuration::from_millis(10));
        }
        server
    }

    fn url(&self) -> String {
        let socket = Self::socket(&self.dir);
        match self.password {
            Some(password) => format!("redis+unix://{}?pass={password}", socket.display()),
            None => format!("redis+unix://{}", socket.display()),
        }
    }

    /// Kills the server with SIGKILL and waits until it is gone.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Restarts a killed server on the same socket.
    fn restart(&mut self) {
        let dir = std::mem::replace(&mut self.dir, common::TempDir::new("redis-server"));
        let password = self.password;
        *self = Self::start_in(dir, password);
    }

    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.child), signal)
            .unwrap_or_else(|err| panic!("sending {signal:?} to redis-server failed: {err}"));
    }

    /// Freezes the server (SIGSTOP): it accepts connections but never replies.
    fn freeze(&self) {
        self.signal(Signal::STOP);
    }

    fn thaw(&self) {
        self.signal(Signal::CONT);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a frozen process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[maybe_async::maybe_async]
async fn redis_store_conforms() {
    let store = shared_store("conform");
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Native).await;
    let left = keys(&mut raw(SHARED), store.key_prefix());
    assert!(left.is_empty(), "the suite cleans up: {left:?}");
}

#[maybe_async::maybe_async]
async fn caching_redis_store_conforms() {
    let store = CachingSessionStore::new(MemoryStore::new(), shared_store("conform-cached"));
    testing::check_store(&store).await;
    testing::check_owners(&store).await;
    testing::check_expired_deletion(&store, Expiry::Native).await;
    assert!(store.cache().is_empty(), "the suite cleans up the cache");
}

#[maybe_async::maybe_async]
async fn keys_are_digests_and_values_carry_their_ttl() {
    let store = shared_store("keys");
    let mut conn = raw(SHARED);
    let mut record = Record::new(OffsetDateTime::now_utc() + Duration::minutes(10));
    record.insert("user", &7u64).unwrap();
    store.create(&mut record).await.unwrap();

    let key = key_of(&store, &record.id);
    assert_eq!(keys(&mut conn, store.key_prefix()), vec![key.clone()]);
    let value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    assert!(
        !value.windows(16).any(|w| w == record.id.to_bytes()),
        "raw id in the value"
    );
    let text = record.id.to_string();
    assert!(
        !value.windows(22).any(|w| w == text.as_bytes()),
        "id text in the value"
    );
    let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
    assert!((590_000..=600_000).contains(&pttl), "PTTL {pttl}");

    // save writes the value and a new TTL together.
    record.expiry_date = OffsetDateTime::now_utc() + Duration::hours(1);
    record.insert("user", &8u64).unwrap();
    store.save(&record).await.unwrap();
    let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
    assert!((3_590_000..=3_600_000).contains(&pttl), "PTTL {pttl}");
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&record));

    // A record saved already expired deletes its key.
    record.expiry_date = OffsetDateTime::now_utc() - Duration::seconds(1);
    store.save(&record).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
    assert_eq!(exists, 0);
    let deleted = store.delete_expired().await.unwrap();
    assert_eq!(deleted, 0, "Redis expires keys itself");
}

#[maybe_async::maybe_async]
async fn redis_drops_the_key_when_the_record_expires() {
    let store = shared_store("ttl");
    let mut record = live_record(1);
    record.expiry_date = OffsetDateTime::now_utc() + Duration::milliseconds(50);
    store.create(&mut record).await.unwrap();
    let key = key_of(&store, &record.id);
    // Redis' clock is the one that counts here: wait for it.
    std::thread::sleep(StdDuration::from_millis(120));
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query(&mut raw(SHARED))
        .unwrap();
    assert_eq!(exists, 0);
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, None);
}

#[maybe_async::maybe_async]
async fn a_corrupt_value_fails_only_its_own_load() {
    let store = shared_store("corrupt");
    let conn = std::cell::RefCell::new(raw(SHARED));
    common::check_corruption_is_contained(&store, |id, garbage| {
        let () = redis::cmd("SET")
            .arg(key_of(&store, id))
            .arg(garbage)
            .arg("XX")
            .query(&mut *conn.borrow_mut())
            .unwrap();
    })
    .await;
}

/// A value written by a build before versions existed (the record alone) loads at
/// version 0, and the conditional write takes it over; a session whose cookie names
/// an unreadable value goes on as a new session instead of failing every request.
/// Values written with a version but before the header (expiry date and write
/// token) existed still load, at their version, and take conditional writes.
#[maybe_async::maybe_async]
async fn values_from_before_the_header_load_and_update() {
    let store = shared_store("before-header");
    let mut conn = raw(SHARED);
    let mut record = live_record(7);
    let mut value = 5u64.to_be_bytes().to_vec();
    value.extend(record.encode_without_id().unwrap());
    let () = redis::cmd("SET")
        .arg(key_of(&store, &record.id))
        .arg(value)
        .arg("EX")
        .arg(3600)
        .query(&mut conn)
        .unwrap();
    let loaded = store.load(&record.id).await.unwrap().expect("readable");
    assert_eq!(loaded.version, 5);
    record.version = 4;
    let refused = store.update(&record).await.unwrap();
    assert_eq!(refused, Update::Conflict);
    record.version = 5;
    record.insert("user", &8u64).unwrap();
    let written = store.update(&record).await.unwrap();
    assert_eq!(written, Update::Written(6));
    let loaded = store.load(&record.id).await.unwrap().expect("still there");
    assert_eq!(loaded.get::<u64>("user").unwrap(), Some(8));
}

/// A record whose own expiry date has passed while its key still lives (the key's
/// TTL is rounded up, runs on the server's clock, or was moved) is gone for `update`
/// exactly as it is for `load`: never written.
#[maybe_async::maybe_async]
async fn a_record_past_its_date_is_gone_for_update_as_for_load() {
    let store = shared_store("past-its-date");
    let mut conn = raw(SHARED);
    let mut record = live_record(1);
    record.expiry_date = OffsetDateTime::now_utc() + Duration::milliseconds(200);
    store.create(&mut record).await.unwrap();
    // The key outlives the record.
    let () = redis::cmd("PEXPIRE")
        .arg(key_of(&store, &record.id))
        .arg(60_000)
        .query(&mut conn)
        .unwrap();
    while OffsetDateTime::now_utc() <= record.expiry_date {
        std::thread::sleep(StdDuration::from_millis(20));
    }
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, None, "load: past its date");
    let mut next = record.clone();
    next.expiry_date = OffsetDateTime::now_utc() + Duration::hours(1);
    let written = store.update(&next).await.unwrap();
    assert_eq!(written, Update::Gone, "update judges as load does");
    let still = store.load(&record.id).await.unwrap();
    assert_eq!(still, None, "nothing revived");
}

/// A stored value carries a check of its own key: the same bytes found under another
/// key (a reply meant for another session, a copied value) are refused.
#[maybe_async::maybe_async]
async fn a_value_under_another_key_is_refused() {
    let store = shared_store("misdelivered");
    let mut conn = raw(SHARED);
    let mut record = live_record(7);
    store.create(&mut record).await.unwrap();
    let value: Vec<u8> = redis::cmd("GET")
        .arg(key_of(&store, &record.id))
        .query(&mut conn)
        .unwrap();
    let other = Id::default();
    let () = redis::cmd("SET")
        .arg(key_of(&store, &other))
        .arg(value)
        .arg("EX")
        .arg(3600)
        .query(&mut conn)
        .unwrap();
    let err = store.load(&other).await.unwrap_err();
    assert!(matches!(err, Error::Decode(_)), "{err:?}");
    assert!(err.report().contains("another key"), "{}", err.report());
    let own = store.load(&record.id).await.unwrap();
    assert!(own.is_some());
}

#[maybe_async::maybe_async]
async fn values_from_before_versions_load_and_update() {
    let store = shared_store("legacy");
    let mut conn = raw(SHARED);
    let mut record = live_record(7);
    // The record alone, as written then: format 2, values without shape tags.
    let mut legacy = vec![2u8];
    legacy.extend(postcard::to_allocvec(&record.expiry_date.unix_timestamp_nanos()).unwrap());
    legacy.extend([1, 4]);
    legacy.extend(b"user");
    let user = postcard::to_allocvec(&7u64).unwrap();
    legacy.push(user.len() as u8);
    legacy.extend(user);
    let () = redis::cmd("SET")
        .arg(key_of(&store, &record.id))
        .arg(legacy)
        .arg("EX")
        .arg(3600)
        .query(&mut conn)
        .unwrap();
    let loaded = store.load(&record.id).await.unwrap().expect("readable");
    assert_eq!(loaded.version, 0);
    assert_eq!(loaded.expiry_date, record.expiry_date);
    assert_eq!(loaded.get::<u64>("user").unwrap(), Some(7));
    record.insert("user", &8u64).unwrap();
    let written = store.update(&record).await.unwrap();
    assert_eq!(
        written,
        portable_sessions::session_store::Update::Written(1)
    );
    let loaded = store.load(&record.id).await.unwrap().expect("still there");
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.get::<u64>("user").unwrap(), Some(8));

    let corrupt = live_record(9);
    let () = redis::cmd("SET")
        .arg(key_of(&store, &corrupt.id))
        .arg(&b"\x00\x00\x00\x00\x00\x00\x00\x01garbage"[..])
        .arg("EX")
        .arg(3600)
        .query(&mut conn)
        .unwrap();
    let manager = portable_sessions::SessionManager::new(store.clone());
    let cookie = format!("id={}", corrupt.id);
    let session = manager.begin([cookie.as_str()]);
    let user = session.get::<u64>("user").await.unwrap();
    assert_eq!(user, None, "a new session");
    session.insert("user", 10u64).await.unwrap();
    let set = manager
        .finish(&session)
        .await
        .unwrap()
        .expect("a new cookie");
    assert!(!set.contains(&corrupt.id.to_string()), "{set}");
    let left: Vec<u8> = redis::cmd("GET")
        .arg(key_of(&store, &corrupt.id))
        .query(&mut conn)
        .unwrap();
    assert!(
        left.ends_with(b"garbage"),
        "the unreadable value is left alone"
    );
    for id in [record.id, corrupt.id] {
        store.delete(&id).await.unwrap();
    }
    let new_id = session.id().await.unwrap().expect("stored");
    store.delete(&new_id).await.unwrap();
}

#[maybe_async::maybe_async]
async fn prefixes_keep_stores_apart() {
    let a = shared_store("prefix-a");
    let b = shared_store("prefix-b");
    let mut record = live_record(1);
    a.create(&mut record).await.unwrap();
    let seen_by_b = b.load(&record.id).await.unwrap();
    assert_eq!(seen_by_b, None);
    // Two handles with the same prefix are two processes sharing sessions.
    let a2 = RedisStore::new(SHARED)
        .unwrap()
        .with_key_prefix(a.key_prefix());
    let seen = a2.load(&record.id).await.unwrap();
    assert_eq!(seen, Some(record.clone()));
    a2.delete(&record.id).await.unwrap();
    let gone = a.load(&record.id).await.unwrap();
    assert_eq!(gone, None);
}

#[maybe_async::maybe_async]
async fn a_bad_url_is_a_backend_error() {
    let store = RedisStore::new("not a url");
    assert!(is_backend(&store), "{store:?}");
    let store = RedisStore::new("http://127.0.0.1:6379");
    assert!(is_backend(&store), "{store:?}");
}

#[maybe_async::maybe_async]
async fn a_killed_server_gives_backend_errors_then_the_store_recovers() {
    let mut server = RedisServer::start();
    let store = RedisStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    let mut before = live_record(1);
    store.create(&mut before).await.unwrap();

    server.kill();
    for (op, result) in every_operation(&store).await {
        assert!(is_backend(&result), "{op} with the server dead: {result:?}");
    }
    for _ in 0..3 {
        let started = Instant::now();
        let loaded = store.load(&before.id).await;
        assert!(is_backend(&loaded), "{loaded:?}");
        assert!(
            started.elapsed() < FAIL_WITHIN,
            "took {:?}",
            started.elapsed()
        );
    }

    // Back on the same port (empty: it kept nothing). The same store value works
    // again from its first operation on.
    server.restart();
    let lost = store.load(&before.id).await.unwrap();
    assert_eq!(lost, None);
    let mut after = live_record(2);
    store.create(&mut after).await.unwrap();
    let loaded = store.load(&after.id).await.unwrap();
    assert_eq!(loaded, Some(after));
}

#[maybe_async::maybe_async]
async fn a_restart_between_operations_costs_no_error() {
    let mut server = RedisServer::start();
    let store = RedisStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    let mut record = live_record(1);
    store.create(&mut record).await.unwrap();
    // The store's idle connection dies with the server; the next operation finds it
    // closed and retries on a new one.
    server.kill();
    server.restart();
    store.save(&record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
}

#[maybe_async::maybe_async]
async fn a_frozen_server_times_out_then_the_store_recovers() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    common::check_frozen_server_times_out_then_recovers(
        &store,
        || server.freeze(),
        || server.thaw(),
    )
    .await;
}

#[maybe_async::maybe_async]
async fn a_forgotten_script_is_sent_whole() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url()).unwrap();
    let mut record = live_record(1);
    store.create(&mut record).await.unwrap();
    let written = store.update(&record).await.unwrap();
    assert_eq!(written, Update::Written(1));
    // The server forgets its scripts (as after `SCRIPT FLUSH`, or a failover to a
    // replica that never ran it): `EVALSHA` fails, and the script goes whole.
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut raw(&server.url()))
        .unwrap();
    record.version = 1;
    record.insert("after", "flush").unwrap();
    let written = store.update(&record).await.unwrap();
    assert_eq!(written, Update::Written(2));
    let loaded = store.load(&record.id).await.unwrap().unwrap();
    assert_eq!(loaded.version, 2);
    assert_eq!(
        loaded.get::<String>("after").unwrap().as_deref(),
        Some("flush")
    );
}

/// Instances with their own caches over one store see each other's logouts and
/// logins within the cache lifetime.
#[maybe_async::maybe_async]
async fn two_caches_over_one_redis_see_each_others_logouts() {
    let a = shared_store("two-caches");
    let b = RedisStore::new(SHARED)
        .unwrap()
        .with_key_prefix(a.key_prefix());
    common::check_two_caches_over_one_store(a, b).await;
}

/// The owner index in Redis: one sorted set per owner, named by a digest (no user
/// name in keys), expiring no sooner than its latest session; expired, deleted and
/// moved entries are pruned when read, and the set goes away with its last entry.
#[maybe_async::maybe_async]
async fn the_owner_index_expires_with_its_sessions_and_is_pruned_when_read() {
    let store = shared_store("owner-index");
    let mut conn = raw(SHARED);
    let owner = Owner::new(format!("erin {}", Id::default())).unwrap();
    let owned = |expiry: OffsetDateTime| {
        let mut record = live_record(1);
        record.expiry_date = expiry;
        record.ownership = Some(Ownership::new(owner.clone(), OffsetDateTime::now_utc()));
        record
    };
    let mut brief = owned(OffsetDateTime::now_utc() + Duration::milliseconds(300));
    let mut long = owned(OffsetDateTime::now_utc() + Duration::hours(1));
    let mut other = owned(OffsetDateTime::now_utc() + Duration::hours(1));
    for record in [&mut brief, &mut long, &mut other] {
        store.create(record).await.unwrap();
    }
    let sets: Vec<String> = keys(&mut conn, &format!("{}owner:", store.key_prefix()));
    assert_eq!(sets.len(), 1, "one set per owner: {sets:?}");
    let set = &sets[0];
    assert!(!set.contains("erin"), "no user name in keys: {set}");
    let count = |conn: &mut redis::Connection| -> usize {
        redis::cmd("ZCARD").arg(set).query(conn).unwrap()
    };
    assert_eq!(count(&mut conn), 3);
    let ttl: i64 = redis::cmd("PTTL").arg(set).query(&mut conn).unwrap();
    assert!(
        ttl > 3_500_000,
        "the set lives as long as its latest session: {ttl} ms"
    );

    // Expired, deleted, and moved to another owner: pruned when read.
    wait_for("the brief session to expire", || {
        OffsetDateTime::now_utc() > brief.expiry_date + Duration::milliseconds(5)
    });
    store.delete(&other.id).await.unwrap();
    let listed = store.list_owned(&owner).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].handle(), Handle::of(&long.id));
    assert_eq!(count(&mut conn), 1, "pruned when read");
    let mut moved = long.clone();
    moved.ownership = Some(Ownership::new(
        Owner::new(format!("frank {}", Id::default())).unwrap(),
        OffsetDateTime::now_utc(),
    ));
    let written = store.update(&moved).await.unwrap();
    assert_eq!(written, Update::Written(1));
    let listed = store.list_owned(&owner).await.unwrap();
    assert!(listed.is_empty());
    let exists: bool = redis::cmd("EXISTS").arg(set).query(&mut conn).unwrap();
    assert!(!exists, "the emptied set is gone");
    store.delete(&long.id).await.unwrap();
    let left = keys(&mut conn, store.key_prefix());
    assert_eq!(left.len(), 1, "the other owner's set: {left:?}");
}

/// An owner with more sessions than one script reply carries (600): listed in full,
/// and "all but one" then "all" end every one, over several pages; a session written
/// all along by another thread is ended all the same; one whose record no longer
/// decodes (its header intact) is left out of the listing but ended.
#[test]
fn endings_reach_every_session_of_a_big_owner_even_one_being_written() {
    let store = shared_store("big-owner");
    let owner = Owner::new(format!("gina {}", Id::default())).unwrap();
    let mut records = Vec::new();
    for n in 0..600u64 {
        let mut record = live_record(n);
        record.ownership = Some(Ownership::new(owner.clone(), OffsetDateTime::now_utc()));
        block(store.create(&mut record)).unwrap();
        records.push(record);
    }
    // One unreadable: its record bytes cut short, its header kept.
    let mut conn = raw(SHARED);
    let broken = &records[7];
    let value: Vec<u8> = redis::cmd("GET")
        .arg(key_of(&store, &broken.id))
        .query(&mut conn)
        .unwrap();
    let () = redis::cmd("SET")
        .arg(key_of(&store, &broken.id))
        .arg(&value[..value.len() - 3])
        .arg("EX")
        .arg(3600)
        .query(&mut conn)
        .unwrap();
    let listed = block(store.list_owned(&owner)).unwrap();
    assert_eq!(listed.len(), 599, "every readable one");

    let kept = Handle::of(&records[0].id);
    let busy = records[1].clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut busy = busy;
            let mut writes = 0;
            while !stop.load(Ordering::SeqCst) {
                match block(store.update(&busy)).unwrap() {
                    Update::Written(version) => busy.version = version,
                    Update::Gone => return writes,
                    Update::Conflict => panic!("the only writer conflicted"),
                }
                writes += 1;
            }
            writes
        })
    };
    let ended = block(store.end_owned(&owner, Ending::AllBut(kept))).unwrap();
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes > 0, "the writer wrote while the ending ran");
    assert_eq!(ended.len(), 599, "all but one, the unreadable one too");
    assert!(ended.contains(&Handle::of(&records[1].id)));
    for record in &records[1..] {
        let loaded = block(store.load(&record.id));
        assert!(matches!(loaded, Ok(None)), "{loaded:?}");
    }
    let listed = block(store.list_owned(&owner)).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].handle(), kept);
    let ended = block(store.end_owned(&owner, Ending::All)).unwrap();
    assert_eq!(ended, vec![kept]);
    let left = keys(&mut conn, store.key_prefix());
    assert!(left.is_empty(), "{} keys left", left.len());
}

tests_in_both_modes!(
    the_owner_index_expires_with_its_sessions_and_is_pruned_when_read,
    a_value_under_another_key_is_refused,
    two_caches_over_one_redis_see_each_others_logouts,
    a_forgotten_script_is_sent_whole,
    redis_store_conforms,
    caching_redis_store_conforms,
    keys_are_digests_and_values_carry_their_ttl,
    redis_drops_the_key_when_the_record_expires,
    a_corrupt_value_fails_only_its_own_load,
    values_from_before_versions_load_and_update,
    values_from_before_the_header_load_and_update,
    a_record_past_its_date_is_gone_for_update_as_for_load,
    prefixes_keep_stores_apart,
    a_bad_url_is_a_backend_error,
    a_killed_server_gives_backend_errors_then_the_store_recovers,
    a_restart_between_operations_costs_no_error,
    a_frozen_server_times_out_then_the_store_recovers,
);

#[test]
fn many_callers_on_a_frozen_server_each_fail_within_the_timeout() {
    // With a password, connecting takes a round trip (AUTH), so connecting to a frozen
    // server waits out the timeout too.
    let server = RedisServer::start_with_password("sesame");
    let store = RedisStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    let mut record = live_record(1);
    block(store.create(&mut record)).unwrap();
    server.freeze();
    // This times out and drops the connection: the callers below must connect.
    let loaded = block(store.load(&record.id));
    assert!(is_backend(&loaded), "{loaded:?}");
    // 32 callers at once: none waits out the others' timeouts in turn.
    let callers: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            let id = record.id;
            std::thread::spawn(move || {
                let started = Instant::now();
                let loaded = block(store.load(&id));
                (loaded, started.elapsed())
            })
        })
        .collect();
    for caller in callers {
        let (loaded, took) = caller.join().unwrap();
        assert!(is_backend(&loaded), "{loaded:?}");
        assert!(took < FAIL_WITHIN, "a caller took {took:?}");
    }
    server.thaw();
    let loaded = block(store.load(&record.id)).unwrap();
    assert_eq!(loaded, Some(record));
}

#[cfg(not(feature = "sync"))]
#[test]
fn a_dropped_operation_leaks_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url())
        .unwrap()
        .with_max_connections(1);
    common::check_dropped_operations_leak_nothing(&store, || server.freeze(), || server.thaw());
}

/// A `RedisStore` whose deletion pass also reads a key, so that each pass reaches
/// Redis and an outage reaches the loop (`RedisStore`'s own pass never touches Redis).
/// It counts the passes that succeeded.
#[derive(Debug, Clone)]
struct ProbingStore(RedisStore, Arc<AtomicUsize>);

impl ProbingStore {
    fn passed(&self) -> usize {
        self.1.load(Ordering::SeqCst)
    }
}

#[maybe_async::maybe_async]
impl SessionStore for ProbingStore {
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
}

#[maybe_async::maybe_async]
impl ExpiredDeletion for ProbingStore {
    async fn delete_expired(&self) -> Result<usize> {
        self.0.load(&Id::from_bytes([0; 16])).await?;
        let deleted = self.0.delete_expired().await?;
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(deleted)
    }
}

/// Runs `store`'s deletion loop on a thread of its own until the returned handle
/// stops it.
fn deletion_loop<S: ExpiredDeletion + Clone>(
    store: &S,
) -> (
    portable_sessions::StopHandle,
    std::thread::JoinHandle<portable_sessions::DeletionSummary>,
) {
    let timer = LoopTimer::new();
    let stop = timer.stop_handle();
    let store = store.clone();
    let schedule = portable_sessions::DeletionSchedule::new(StdDuration::from_millis(20))
        .with_backoff(StdDuration::from_millis(20), StdDuration::from_millis(100));
    let task =
        std::thread::spawn(move || block(store.continuously_delete_expired(schedule, &timer)));
    (stop, task)
}

#[test]
fn deletion_loops_run_through_an_outage() {
    let mut server = RedisServer::start();
    let store = RedisStore::new(&server.url())
        .unwrap()
        .with_timeout(TIMEOUT);
    let probing = ProbingStore(store.clone(), Arc::default());
    let (stop_plain, plain) = deletion_loop(&store);
    let (stop_probing, probing_loop) = deletion_loop(&probing);
    wait_for("a first probing pass", || probing.passed() > 0);

    server.kill();
    let mut record = live_record(1);
    let created = block(store.create(&mut record));
    assert!(is_backend(&created), "{created:?}");
    // Long enough for several failed passes, backing off.
    std::thread::sleep(StdDuration::from_millis(500));
    let passed_in_outage = probing.passed();
    server.restart();

    // The loops go on, their passes succeed again, and the store works again.
    wait_for("a probing pass after the restart", || {
        probing.passed() > passed_in_outage
    });
    block(store.create(&mut record)).unwrap();
    let loaded = block(probing.load(&record.id)).unwrap();
    assert_eq!(loaded, Some(record));

    stop_plain.stop();
    stop_probing.stop();
    let plain = plain.join().expect("the loop on RedisStore does not panic");
    let probing = probing_loop
        .join()
        .expect("the probing loop does not panic");
    // RedisStore's pass is a no-op: the outage cannot fail it.
    assert!(plain.passes >= 5, "{plain:?}");
    assert_eq!((plain.failures, plain.deleted), (0, 0));
    // The probing loop saw the outage, and kept going through it.
    assert!(probing.failures >= 2, "{probing:?}");
}

#[test]
fn timeouts_are_kept_between_a_millisecond_and_a_day() {
    let day = StdDuration::from_secs(24 * 3600);
    let store = RedisStore::new(SHARED)
        .unwrap()
        .with_timeout(StdDuration::MAX);
    assert_eq!(store.timeout(), day);
    // Every wait is bounded by a day: nothing overflows, and operations work.
    let loaded = block(store.load(&Id::default())).unwrap();
    assert_eq!(loaded, None);
    let store = store.with_timeout(StdDuration::ZERO);
    assert_eq!(store.timeout(), StdDuration::from_millis(1));
}

#[test]
fn debug_output_hides_the_password() {
    let store = RedisStore::new("redis://user:hunter2@127.0.0.1:6380/1").unwrap();
    let debug = format!("{store:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("127.0.0.1:6380"), "{debug}");
}

#[test]
fn the_store_is_send_sync_clone_and_fits_in_a_dyn_store() {
    fn shareable<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    shareable::<RedisStore>();
    fn as_dyn(store: RedisStore) -> std::sync::Arc<dyn ExpiredDeletion> {
        std::sync::Arc::new(store)
    }
    let _ = as_dyn;
}

/// `connected_clients` and `total_connections_received` of a server.
fn connections(url: &str) -> (u64, u64) {
    let mut conn = raw(url);
    let info: String = redis::cmd("INFO").arg("clients").query(&mut conn).unwrap();
    let stats: String = redis::cmd("INFO").arg("stats").query(&mut conn).unwrap();
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in INFO"))
            .trim()
            .parse()
            .unwrap()
    };
    (
        field(&info, "connected_clients"),
        field(&stats, "total_connections_received"),
    )
}

#[test]
fn concurrent_callers_share_one_connection_and_each_gets_its_own_reply() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url()).unwrap();
    let records = created(&store, 64);
    sixteen_callers(&store, &records);
    // Then one caller: every reply is still its own command's.
    for record in &records {
        let loaded = block(store.load(&record.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(record));
        block(store.delete(&record.id)).unwrap();
        let gone = block(store.load(&record.id)).unwrap();
        assert_eq!(gone, None);
    }
    // One connection carried them all (the default allows 16), beside INFO's own.
    let (connected, received) = connections(&server.url());
    assert_eq!(connected, 2, "the store's connection and INFO's");
    assert_eq!(received, 3, "the start-up probe's, the store's and INFO's");
}

/// Futures dropped while their commands are in flight: the reader's (the first polled)
/// and another. The reading passes on, their replies are thrown away when they come,
/// and every later caller gets its own reply, on the same connection.
#[cfg(not(feature = "sync"))]
#[test]
fn callers_dropped_mid_pipeline_leave_it_in_step() {
    use futures_lite::future::poll_once;
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url()).unwrap();
    let records = created(&store, 4);
    server.freeze();
    let mut loads: Vec<_> = records
        .iter()
        .map(|record| Box::pin(store.load(&record.id)))
        .collect();
    for load in &mut loads {
        assert!(
            block(poll_once(load.as_mut())).is_none(),
            "the server is frozen"
        );
    }
    let mut loads = loads.into_iter();
    drop(loads.next());
    drop(loads.next());
    server.thaw();
    for (load, record) in loads.zip(&records[2..]) {
        assert_eq!(block(load).unwrap().as_ref(), Some(record));
    }
    for record in records.iter().rev() {
        let loaded = block(store.load(&record.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(record));
    }
    let (connected, _) = connections(&server.url());
    assert_eq!(connected, 2, "the store's connection and INFO's");
}
