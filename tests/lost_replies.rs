//! Conditional writes whose reply is lost: a TCP proxy in front of the real Redis and
//! PostgreSQL servers forwards the write, swallows the reply and closes the
//! connection, so the store sends the write again on a new one. The outcome must be
//! exact: `Session::update`'s function runs once per step that lands, and a login's
//! `cycle_id` keeps its own new record. In both modes.
#![cfg(any(feature = "redis", feature = "postgres"))]

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use common::{block, proxy::LossyProxy};
use portable_sessions::{session::Expiry, SessionManager, SessionStore};

/// A backend under test: the store through the proxy, and one straight to the server
/// (another process, writing the same sessions).
struct Backend {
    proxy: LossyProxy,
    through: Arc<dyn SessionStore>,
    direct: Arc<dyn SessionStore>,
    /// Whether a request's bytes are the conditional write.
    is_update: fn(&[u8]) -> bool,
    _schema: Option<common::PgSchema>,
}

#[cfg(feature = "redis")]
fn redis(test: &str) -> Backend {
    let direct = common::shared_redis(test);
    let upstream: SocketAddr = "127.0.0.1:6379".parse().unwrap();
    let proxy = LossyProxy::start(upstream, |reply| reply.ends_with(b"\r\n"));
    let through = portable_sessions::RedisStore::new(&format!("redis://{}", proxy.addr()))
        .unwrap()
        .with_key_prefix(direct.key_prefix());
    Backend {
        proxy,
        through: Arc::new(through),
        direct: Arc::new(direct),
        is_update: |request| common::proxy::contains(request, b"EVAL"),
        _schema: None,
    }
}

#[cfg(feature = "postgres")]
fn postgres(test: &str) -> Backend {
    // Schema names are short: 63 bytes in all.
    let schema = common::PgSchema::new(&test[..test.len().min(24)]);
    let direct = schema.store();
    let upstream: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    // A reply is whole at ReadyForQuery.
    let proxy = LossyProxy::start(upstream, |reply| {
        common::proxy::contains(reply, b"Z\0\0\0\x05")
    });
    // In plain text: the proxy tells the conditional write by its SQL.
    let url = format!("postgres://postgres@{}/test?sslmode=disable", proxy.addr());
    let through = portable_sessions::PostgresStore::new(&url)
        .unwrap()
        .with_table(&schema.0, "sessions")
        .unwrap();
    Backend {
        proxy,
        through: Arc::new(through),
        direct: Arc::new(direct),
        // The conditional write: by its prepared statement's name, or sent whole
        // (the one statement that starts with a CTE), never both (a connection's
        // preparation of its statements).
        is_update: |request| {
            common::proxy::contains(request, b"portable_sessions_update_")
                != common::proxy::contains(request, b"WITH written AS")
        },
        _schema: Some(schema),
    }
}

fn manager(store: &Arc<dyn SessionStore>) -> SessionManager {
    SessionManager::from_shared(store.clone()).with_expiry(Expiry::OnSessionEnd)
}

fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_owned()
}

/// A session with `user = alice`, created straight on the server; its cookie.
#[maybe_async::maybe_async]
async fn new_session(backend: &Backend) -> String {
    let manager = manager(&backend.direct);
    let session = manager.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    session.insert("cart", "apple").await.unwrap();
    pair(&manager.finish(&session).await.unwrap().expect("a cookie"))
}

#[maybe_async::maybe_async]
async fn stored_count(backend: &Backend, cookie: &str) -> Option<u64> {
    let manager = manager(&backend.direct);
    let session = manager.begin([cookie]);
    session.get::<u64>("n").await.unwrap()
}

/// The counter's write lands, its reply is lost, the store sends it again: the
/// step is counted once and the function ran once.
#[maybe_async::maybe_async]
async fn a_counted_step_whose_reply_is_lost_counts_once(backend: Backend) {
    let cookie = new_session(&backend).await;
    let manager = manager(&backend.through);
    let session = manager.begin([cookie.as_str()]);
    // The first use opens the connection; the write then goes out on it, reused.
    session.get::<String>("user").await.unwrap();
    backend.proxy.lose_reply_of(backend.is_update, || {});
    let runs = AtomicUsize::new(0);
    let n = session
        .update("n", |n: Option<u64>| {
            runs.fetch_add(1, Ordering::SeqCst);
            n.unwrap_or(0) + 1
        })
        .await
        .unwrap();
    assert_eq!(backend.proxy.lost(), 1, "the reply was lost");
    assert_eq!(n, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the function ran once");
    let stored = stored_count(&backend, &cookie).await;
    assert_eq!(stored, Some(1), "counted once");
    // The session goes on in step.
    manager.finish(&session).await.unwrap();
    let next = manager.begin([cookie.as_str()]);
    let two = next
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await
        .unwrap();
    assert_eq!(two, 2);
}

/// When another write lands between the lost first copy and the copy sent again,
/// nobody can tell whether the first landed: the call fails, rather than run the
/// function a second time over a record that may already hold its step.
#[maybe_async::maybe_async]
async fn a_lost_reply_overtaken_by_another_write_fails_rather_than_count_twice(backend: Backend) {
    let cookie = new_session(&backend).await;
    let manager = manager(&backend.through);
    let session = manager.begin([cookie.as_str()]);
    session.get::<String>("user").await.unwrap();
    let (direct, other_cookie) = (backend.direct.clone(), cookie.clone());
    backend.proxy.lose_reply_of(backend.is_update, move || {
        // Another request of the session counts while the reply is lost.
        let other = self::manager(&direct);
        let session = other.begin([other_cookie.as_str()]);
        let n = block(session.update("n", |n: Option<u64>| n.unwrap_or(0) + 1)).unwrap();
        assert_eq!(n, 2, "it sees the first copy, which landed");
    });
    let runs = AtomicUsize::new(0);
    let counted = session
        .update("n", |n: Option<u64>| {
            runs.fetch_add(1, Ordering::SeqCst);
            n.unwrap_or(0) + 1
        })
        .await;
    let err = counted.unwrap_err();
    assert!(
        err.report().contains("unknown") && !err.is_session_gone(),
        "{}",
        err.report()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "never run again");
    let stored = stored_count(&backend, &cookie).await;
    assert_eq!(
        stored,
        Some(2),
        "each step once: ours and the other request's"
    );
}

/// A login whose retirement of the old id lands with its reply lost: sent again, it
/// recognises its own write, and the session moves once, values and all.
#[maybe_async::maybe_async]
async fn a_login_whose_reply_is_lost_moves_the_session_once(backend: Backend) {
    let cookie = new_session(&backend).await;
    let manager = manager(&backend.through);
    let login = manager.begin([cookie.as_str()]);
    login.get::<String>("user").await.unwrap();
    login.cycle_id().await.unwrap();
    login.insert("role", "admin").await.unwrap();
    backend.proxy.lose_reply_of(backend.is_update, || {});
    let set = manager.finish(&login).await.unwrap().expect("the new id");
    assert_eq!(backend.proxy.lost(), 1);
    let moved = pair(&set);
    assert_ne!(moved, cookie);
    let direct = self::manager(&backend.direct);
    let session = direct.begin([moved.as_str()]);
    let cart = session.get::<String>("cart").await.unwrap();
    let role = session.get::<String>("role").await.unwrap();
    assert_eq!(
        (cart.as_deref(), role.as_deref()),
        (Some("apple"), Some("admin")),
        "the session moved with its values"
    );
    let old = direct.begin([cookie.as_str()]);
    let refused = old.insert("cart", "pear").await.unwrap_err();
    assert!(refused.is_session_gone(), "the old id is retired");
}

/// A create (`SET NX`) that lands with its reply lost: sent again, it finds its own
/// first copy under its id, byte for byte, and keeps that id rather than leave the
/// copy behind and draw another.
#[cfg(feature = "redis")]
#[maybe_async::maybe_async]
async fn a_create_whose_reply_is_lost_keeps_its_id(backend: Backend) {
    let mut record = common::live_record(1);
    // The first use opens the connection; the create then goes out on it, reused.
    backend.through.load(&record.id).await.unwrap();
    backend
        .proxy
        .lose_reply_of(|request| common::proxy::contains(request, b"NX"), || {});
    let drawn = record.id;
    backend.through.create(&mut record).await.unwrap();
    assert_eq!(backend.proxy.lost(), 1, "the reply was lost");
    assert_eq!(record.id, drawn, "the id of the copy that landed");
    let stored = backend.direct.load(&record.id).await.unwrap();
    assert_eq!(stored, Some(record));
}

#[cfg(feature = "redis")]
#[test]
#[cfg_attr(feature = "sync", allow(clippy::unit_arg))] // block passes () on
fn a_create_whose_reply_is_lost_keeps_its_id_on_redis() {
    block(a_create_whose_reply_is_lost_keeps_its_id(redis(
        "create_reply_lost",
    )));
}

macro_rules! on_backend {
    ($feature:literal, $backend:ident: $($test:ident),* $(,)?) => {
        #[cfg(feature = $feature)]
        mod $backend {
            $(
                #[test]
                fn $test() {
                    let backend = super::$backend(stringify!($test));
                    super::block(super::$test(backend));
                }
            )*
        }
    };
}

on_backend!("redis", redis:
    a_counted_step_whose_reply_is_lost_counts_once,
    a_lost_reply_overtaken_by_another_write_fails_rather_than_count_twice,
    a_login_whose_reply_is_lost_moves_the_session_once,
);
on_backend!("postgres", postgres:
    a_counted_step_whose_reply_is_lost_counts_once,
    a_lost_reply_overtaken_by_another_write_fails_rather_than_count_twice,
    a_login_whose_reply_is_lost_moves_the_session_once,
);
