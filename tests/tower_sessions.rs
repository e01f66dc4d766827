//! Interop with tower-sessions, both ways: our stores through tower-sessions' own
//! trait (0.14 and 0.15), and its stores (the 0.14 memory store) through ours.
#![cfg(all(feature = "tower-sessions", not(feature = "sync")))]

mod common;

use std::{collections::HashMap, sync::Arc};

use common::block;
use portable_sessions::{
    session::{Expiry, Id, Session},
    FromTowerSessions, MemoryStore, SessionManager, SessionStore, TowerSessionsStore,
};
use serde_json::json;
use time::{Duration, OffsetDateTime};

/// Drives a store through tower-sessions 0.14's trait, as its layer would.
async fn their_round_trip_0_14<S: tower_sessions_core::SessionStore>(store: &S) {
    use tower_sessions_core::session::{Id as TheirId, Record as TheirRecord};
    let values = HashMap::from([
        ("user".to_owned(), json!({"id": 42, "name": "alice"})),
        ("cart".to_owned(), json!(["apple", "pear"])),
        ("flag".to_owned(), json!(true)),
        // A float that only an exact parser gives back bit for bit.
        ("ratio".to_owned(), json!(0.09144338512092887_f64)),
    ]);
    let mut record = TheirRecord {
        id: TheirId::default(),
        data: values.clone(),
        expiry_date: OffsetDateTime::now_utc() + Duration::hours(1),
    };
    store.create(&mut record).await.expect("create");
    let loaded = store.load(&record.id).await.expect("load").expect("found");
    assert_eq!(loaded.data, values, "JSON values come back exactly");
    assert_eq!(loaded.id, record.id);

    // A create under a taken id draws another, never overwriting.
    let mut intruder = TheirRecord {
        id: record.id,
        data: HashMap::new(),
        expiry_date: record.expiry_date,
    };
    store.create(&mut intruder).await.expect("create");
    assert_ne!(intruder.id, record.id);

    let mut changed = loaded.clone();
    changed.data.insert("flag".to_owned(), json!(false));
    store.save(&changed).await.expect("save");
    let loaded = store.load(&record.id).await.expect("load").expect("found");
    assert_eq!(loaded.data["flag"], json!(false));

    let mut expired = changed.clone();
    expired.expiry_date = OffsetDateTime::now_utc() - Duration::seconds(1);
    store.save(&expired).await.expect("save");
    let gone = store.load(&record.id).await.expect("load");
    assert!(gone.is_none(), "an expired record never loads");

    store.delete(&intruder.id).await.expect("delete");
    let gone = store.load(&intruder.id).await.expect("load");
    assert!(gone.is_none());
    let missing = store.load(&TheirId::default()).await.expect("load");
    assert!(missing.is_none());
}

/// The same through tower-sessions 0.15's trait (what its latest layer takes).
async fn their_round_trip_0_15<S: tower_sessions_core_0_15::SessionStore>(store: &S) {
    use tower_sessions_core_0_15::session::{Id as TheirId, Record as TheirRecord};
    let mut record = TheirRecord {
        id: TheirId::default(),
        data: HashMap::from([("user".to_owned(), json!("bob"))]),
        expiry_date: OffsetDateTime::now_utc() + Duration::hours(1),
    };
    store.create(&mut record).await.expect("create");
    let loaded = store.load(&record.id).await.expect("load").expect("found");
    assert_eq!(loaded.data["user"], json!("bob"));
    // The id's text form is the same in both crates: cookies carry over.
    let ours: Id = record.id.to_string().parse().expect("same text form");
    assert_eq!(ours.to_string(), record.id.to_string());
    store.delete(&record.id).await.expect("delete");
}

#[test]
fn our_stores_serve_tower_sessions() {
    block(their_round_trip_0_14(&TowerSessionsStore::new(
        MemoryStore::new(),
    )));
    block(their_round_trip_0_15(&TowerSessionsStore::new(
        MemoryStore::new(),
    )));
    #[cfg(feature = "sqlite")]
    {
        let dir = common::TempDir::new("tower-sessions");
        let store = portable_sessions::SqliteStore::open(dir.db()).expect("opens");
        block(their_round_trip_0_14(&TowerSessionsStore::new(
            store.clone(),
        )));
        block(their_round_trip_0_15(&TowerSessionsStore::new(store)));
    }
    #[cfg(feature = "redis")]
    block(their_round_trip_0_14(&TowerSessionsStore::new(
        common::shared_redis("tower-sessions"),
    )));
}

#[test]
fn tower_sessions_stores_serve_our_sessions() {
    let theirs = tower_sessions_memory_store::MemoryStore::default();
    let store = FromTowerSessions::new(theirs);
    assert!(!store.atomic_update(), "their API has no conditional write");
    block(async {
        // Records: typed values and versions come back exactly.
        let mut record =
            portable_sessions::session::Record::new(OffsetDateTime::now_utc() + Duration::hours(1));
        record.insert("user_id", &42u64).unwrap();
        record.insert("roles", &vec!["admin".to_owned()]).unwrap();
        record.version = 9;
        store.create(&mut record).await.unwrap();
        let loaded = store.load(&record.id).await.unwrap().expect("found");
        assert_eq!(loaded, record);

        // Sessions over it: the manager's whole round trip.
        let manager = SessionManager::new(store.clone()).with_expiry(Expiry::OnSessionEnd);
        let session = manager.begin(None::<&str>);
        session.insert("user", "alice").await.unwrap();
        let set = manager.finish(&session).await.unwrap().expect("a cookie");
        let cookie = set.split(';').next().unwrap().to_owned();
        let session = manager.begin([cookie.as_str()]);
        let n = session
            .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await
            .unwrap();
        assert_eq!(n, 1);
        let user = session.get::<String>("user").await.unwrap();
        assert_eq!(user.as_deref(), Some("alice"));
        manager.finish(&session).await.unwrap();

        // A session its handle loaded, then logged out elsewhere, is not written back.
        let late = Session::new(
            Arc::new(store.clone()),
            session.id().await.unwrap(),
            Expiry::OnSessionEnd.into(),
        );
        late.get::<u64>("n").await.unwrap();
        store
            .delete(&session.id().await.unwrap().unwrap())
            .await
            .unwrap();
        late.insert("n", &5u64).await.unwrap();
        let saved = late.save().await.unwrap_err();
        assert!(saved.is_session_gone(), "{}", saved.report());
        let revived = store
            .load(&session.id().await.unwrap().unwrap())
            .await
            .unwrap();
        assert_eq!(revived, None, "the fallback update still never re-creates");
    });
}

/// A tower-sessions 0.15 application (its own layer and extractor, on axum) keeps
/// working, over real HTTP, when its store is swapped for one of ours in one line: on
/// memory, SQLite and Redis.
#[test]
fn a_tower_sessions_application_runs_on_our_stores() {
    app_counts_on(MemoryStore::new());
    #[cfg(feature = "sqlite")]
    {
        let dir = common::TempDir::new("tower-sessions-app");
        app_counts_on(portable_sessions::SqliteStore::open(dir.db()).expect("opens"));
    }
    #[cfg(feature = "redis")]
    app_counts_on(common::shared_redis("tower-sessions-app"));
}

fn app_counts_on<S: SessionStore + Clone>(store: S) {
    use axum::{routing::get, Router};

    async fn count(session: tower_sessions::Session) -> String {
        let n: u64 = session.get("n").await.expect("reads").unwrap_or(0) + 1;
        session.insert("n", n).await.expect("writes");
        n.to_string()
    }

    // The one line: `TowerSessionsStore::new(...)` where its own store was.
    let layer = tower_sessions::SessionManagerLayer::new(TowerSessionsStore::new(store.clone()))
        .with_secure(false);
    let router = Router::new().route("/", get(count)).layer(layer);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binds");
    let addr = listener.local_addr().expect("bound");
    let server = runtime.spawn(async move { axum::serve(listener, router).await });

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(20)))
        .build()
        .into();
    let mut first = agent
        .get(format!("http://{addr}/"))
        .call()
        .expect("answers");
    let cookie = first
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .expect("ASCII")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(first.body_mut().read_to_string().unwrap(), "1");
    for n in 2..=3 {
        let mut next = agent
            .get(format!("http://{addr}/"))
            .header("Cookie", &cookie)
            .call()
            .expect("answers");
        assert_eq!(next.body_mut().read_to_string().unwrap(), n.to_string());
    }
    // The session is in our store, under the id of tower-sessions' cookie.
    let id: Id = cookie["id=".len()..].parse().expect("our text form");
    let record = block(store.load(&id)).unwrap().expect("stored in ours");
    assert_eq!(
        record.get_raw("n"),
        Some(&b"\0\x003"[..]),
        "as JSON text, behind the unchecked shape tag"
    );
    block(store.delete(&id)).unwrap();
    server.abort();
}

/// tower-sessions' memory store, refusing what its Redis store cannot write (an
/// expiry date already past: Redis refuses `EXAT 0`), and counting what it holds.
#[derive(Debug, Clone, Default)]
struct RefusesPastDates(tower_sessions_memory_store::MemoryStore);

#[async_trait::async_trait]
impl tower_sessions_core::SessionStore for RefusesPastDates {
    async fn create(
        &self,
        record: &mut tower_sessions_core::session::Record,
    ) -> tower_sessions_core::session_store::Result<()> {
        Self::check(record)?;
        self.0.create(record).await
    }

    async fn save(
        &self,
        record: &tower_sessions_core::session::Record,
    ) -> tower_sessions_core::session_store::Result<()> {
        Self::check(record)?;
        self.0.save(record).await
    }

    async fn load(
        &self,
        id: &tower_sessions_core::session::Id,
    ) -> tower_sessions_core::session_store::Result<Option<tower_sessions_core::session::Record>>
    {
        self.0.load(id).await
    }

    async fn delete(
        &self,
        id: &tower_sessions_core::session::Id,
    ) -> tower_sessions_core::session_store::Result<()> {
        self.0.delete(id).await
    }
}

impl RefusesPastDates {
    fn check(
        record: &tower_sessions_core::session::Record,
    ) -> tower_sessions_core::session_store::Result<()> {
        if record.expiry_date <= OffsetDateTime::now_utc() {
            return Err(tower_sessions_core::session_store::Error::Backend(
                "ERR invalid expire time".into(),
            ));
        }
        Ok(())
    }

    /// Whether the wrapped store still holds a record under `id`, expired or not
    /// (their memory store filters expired records on load, so ask it with a
    /// fresh date).
    async fn holds(&self, id: &Id) -> bool {
        use tower_sessions_core::SessionStore as _;
        let theirs = tower_sessions_core::session::Id(i128::from_le_bytes(id.to_bytes()));
        self.0.load(&theirs).await.unwrap().is_some()
    }
}

/// Over a store that is not atomic, a logout and a login delete: no write dated in
/// the past (which tower-sessions' Redis store refuses, failing the logout), no
/// marker left for a store that never frees expired records.
#[test]
fn a_non_atomic_store_gets_deletes_not_dated_writes() {
    let theirs = RefusesPastDates::default();
    let manager = SessionManager::new(FromTowerSessions::new(theirs.clone()))
        .with_expiry(Expiry::OnInactivity(Duration::hours(1)));
    block(async {
        let session = manager.begin(None::<&str>);
        session.insert("cart", 3u8).await.unwrap();
        let set = manager.finish(&session).await.unwrap().unwrap();
        let cookie = set.split(';').next().unwrap().to_owned();
        let first = session.id().await.unwrap().unwrap();

        // A login moves the session: the old record is deleted, not marked.
        let session = manager.begin([cookie.as_str()]);
        session.insert("user", "alice").await.unwrap();
        session.cycle_id().await.unwrap();
        let set = manager.finish(&session).await.unwrap().expect("the new id");
        let cookie = set.split(';').next().unwrap().to_owned();
        let second = session.id().await.unwrap().unwrap();
        assert_ne!(first, second);
        assert!(
            !theirs.holds(&first).await,
            "no marker left under the old id"
        );
        assert!(theirs.holds(&second).await);

        // A write to the old id between the login's load and its move is carried
        // over to the new id.
        let cookie_second = cookie.clone();
        let login = manager.begin([cookie_second.as_str()]);
        login.insert("role", "admin").await.unwrap();
        login.cycle_id().await.unwrap();
        let other = manager.begin([cookie_second.as_str()]);
        other.insert("cart", 5u8).await.unwrap();
        manager.finish(&other).await.unwrap();
        let set = manager.finish(&login).await.unwrap().expect("the new id");
        let cookie = set.split(';').next().unwrap().to_owned();
        let third = login.id().await.unwrap().unwrap();
        assert!(!theirs.holds(&second).await);
        let session = manager.begin([cookie.as_str()]);
        let cart = session.get::<u8>("cart").await.unwrap();
        assert_eq!(cart, Some(5), "the concurrent write is carried over");
        let role = session.get::<String>("role").await.unwrap();
        assert_eq!(role.as_deref(), Some("admin"));
        let second = third;

        // A logout by clear() succeeds and keeps the session, empty.
        let session = manager.begin([cookie.as_str()]);
        session.clear().await.unwrap();
        let set = manager
            .finish(&session)
            .await
            .expect("the logout is written");
        assert!(!set.unwrap_or_default().contains("Max-Age=0"), "no removal");
        let session = manager.begin([cookie.as_str()]);
        assert!(session.is_empty().await.unwrap());
        assert!(theirs.holds(&second).await);

        // A logout by flush() deletes.
        session.flush().await.unwrap();
        let removal = manager.finish(&session).await.unwrap().expect("a removal");
        assert!(removal.contains("Max-Age=0"), "{removal}");
        assert!(!theirs.holds(&second).await);
    });
}

/// A record tower-sessions wrote whose values all happen to be byte arrays is not
/// taken for one of ours: it has no version key.
#[test]
fn a_record_tower_sessions_wrote_is_never_adopted() {
    use tower_sessions_core::SessionStore as _;
    let theirs = tower_sessions_memory_store::MemoryStore::default();
    let mut record = tower_sessions_core::session::Record {
        id: tower_sessions_core::session::Id::default(),
        data: HashMap::from([("bytes".to_owned(), json!([1, 2, 3]))]),
        expiry_date: OffsetDateTime::now_utc() + Duration::hours(1),
    };
    block(async {
        theirs.create(&mut record).await.unwrap();
        let ours = FromTowerSessions::new(theirs);
        let id = Id::from_bytes(record.id.0.to_le_bytes());
        let err = ours.load(&id).await.unwrap_err();
        assert!(
            matches!(err, portable_sessions::session_store::Error::Decode(_)),
            "{err:?}"
        );
        assert!(err.report().contains("not written by portable-sessions"));
    });
}

/// Sessions written before values had shape tags still read, both ways: records of
/// ours holding tower-sessions' JSON (the old format), and tower-sessions records
/// holding our values as untagged byte arrays.
#[test]
fn sessions_written_before_shape_tags_still_read() {
    use tower_sessions_core::SessionStore as _;
    block(async {
        // Through TowerSessionsStore: a record of the old format, its values JSON.
        let id = Id::default();
        let expiry = OffsetDateTime::now_utc() + Duration::hours(1);
        let mut old = vec![1u8];
        old.extend_from_slice(&id.to_bytes());
        old.extend(postcard::to_allocvec(&expiry.unix_timestamp_nanos()).unwrap());
        old.push(1);
        old.extend([4]);
        old.extend(b"user");
        let json = br#""alice""#;
        old.push(json.len() as u8);
        old.extend(json);
        let mut record = portable_sessions::session::Record::decode(&old).unwrap();
        let ours = MemoryStore::new();
        ours.create(&mut record).await.unwrap();
        let theirs = TowerSessionsStore::new(ours);
        let loaded = theirs
            .load(&tower_sessions_core::session::Id(i128::from_le_bytes(
                record.id.to_bytes(),
            )))
            .await
            .unwrap()
            .expect("loads");
        assert_eq!(loaded.data.get("user"), Some(&json!("alice")));

        // Through FromTowerSessions: our untagged values, as byte arrays.
        let their_store = tower_sessions_memory_store::MemoryStore::default();
        let created = OffsetDateTime::now_utc().unix_timestamp();
        let mut their_record = tower_sessions_core::session::Record {
            id: tower_sessions_core::session::Id::default(),
            data: HashMap::from([
                ("\0version".to_owned(), json!(3)),
                (
                    "\0created".to_owned(),
                    json!(postcard::to_allocvec(&created).unwrap()),
                ),
                (
                    "user".to_owned(),
                    json!(postcard::to_allocvec("alice").unwrap()),
                ),
            ]),
            expiry_date: expiry,
        };
        their_store.create(&mut their_record).await.unwrap();
        let manager = SessionManager::new(FromTowerSessions::new(their_store));
        let cookie = format!("id={}", Id::from_bytes(their_record.id.0.to_le_bytes()));
        let session = manager.begin([cookie.as_str()]);
        let user = session.get::<String>("user").await.unwrap();
        assert_eq!(
            user.as_deref(),
            Some("alice"),
            "the same session, not a new one"
        );
        let id = session.id().await.unwrap();
        assert_eq!(id, Some(Id::from_bytes(their_record.id.0.to_le_bytes())));
    });
}
