//! A session backend for managing session state that runs anywhere: async or blocking,
//! on smol, tokio, any other executor, or none.
//!
//! Web applications keep per-user state (a login, a CSRF token, a cart) in a store,
//! under a random id that travels in a cookie. This crate is that store's core:
//!
//! - [`SessionStore`]: the interface a backend implements (create, save, load, delete).
//! - [`session::Id`] and [`session::Record`]: the id and what is stored under it.
//! - [`MemoryStore`]: sessions in this process's memory, sharded, with expiry.
//! - [`CachingSessionStore`]: a cache in front of a store that holds the truth.
//! - [`SqliteStore`] (feature `sqlite`): sessions in an SQLite file, surviving restarts.
//! - [`RedisStore`] (feature `redis`): sessions shared by many processes through Redis.
//! - [`PostgresStore`] (feature `postgres`): sessions in a PostgreSQL table, shared by
//!   many processes and surviving restarts.
//! - [`ExpiredDeletion`]: stores that can remove their expired records in one pass,
//!   or continuously on a [`Timer`] and a [`DeletionSchedule`].
//! - [`session_store::Error`]: what a store operation can fail with.
//! - [`session_store::Update`]: what a conditional write did (written, conflict, gone).
//! - [`session::Session`]: the per-request handle on one session: typed values,
//!   loaded on first use, written back only when changed.
//! - [`session::Owner`]: the user a session belongs to; every built-in store lists
//!   an owner's sessions ([`session::OwnedSession`], by [`session::Handle`], never
//!   by id) and ends one, the others, or all ([`session::Ending`]), race-free.
//! - [`SessionManager`]: the session cookie's round trip for any HTTP framework, with
//!   [`session::Expiry`] and [`session::SessionConfig`] deciding when sessions end.
//! - `SessionLayer` (feature `axum`, async mode): the round trip as a tower layer, and
//!   [`session::Session`] as an axum extractor; `SessionMiddleware` (feature
//!   `actix-web`) the same for actix-web.
//!
//! # Which one do I want?
//!
//! - One process, sessions may be lost on restart: [`MemoryStore`].
//! - Sessions that survive restarts, on one machine: [`SqliteStore`].
//! - Several processes or machines sharing sessions: [`RedisStore`], or
//!   [`PostgresStore`] where the application's data already lives in PostgreSQL.
//!   The persistent stores keep records under the SHA-256 of their id, never the id
//!   itself, so a stolen database file or dump holds no cookie to replay.
//! - A slower store that must be the truth (a database): put a [`MemoryStore`] in
//!   front of it with [`CachingSessionStore`].
//! - A backend of your own: implement [`SessionStore`], as below.
//! - Sessions in a web application: a [`SessionManager`] over any of these; or a
//!   [`session::Session`] alone where the framework handles cookies itself.
//!
//! # Two modes, one source
//!
//! By default every store operation is `async`, and runs on any executor: nothing here
//! needs tokio. With the `sync` feature the same API is blocking: the same methods,
//! without `async` and `.await`, for programs without an executor.
//!
//! The switch comes from [`maybe_async`](https://docs.rs/maybe-async), whose mode is
//! global to a build: **one program gets one mode**. If any crate in your dependency
//! graph turns on `sync` (or `maybe-async/is_sync`), the whole program is blocking.
//! `cargo --all-features` therefore builds the blocking mode. The framework
//! integrations and the `AsyncIoTimer`/`TokioTimer` timers are async mode's: a
//! blocking-mode program that uses them fails to compile with one message naming the
//! `sync` feature as the cause.
//!
//! # Implementing a custom store
//!
//! A backend implements the four methods of [`SessionStore`], and the conditional
//! write [`update`](SessionStore::update) that keeps concurrent requests of one
//! session from undoing each other. This one keeps records
//! in a `HashMap` behind a mutex (a toy: [`MemoryStore`] does the same job faster).
//! It is written once for both modes with the [`maybe_async`]
//! attribute, which this crate re-exports together with [`async_trait`]; a store for
//! one mode only can use `#[async_trait]` (async) or a plain `impl` (sync) instead.
//!
//! ```
//! use std::{collections::HashMap, sync::{Arc, Mutex}};
//!
//! use portable_sessions::{
//!     async_trait, maybe_async,
//!     session::{Id, Record},
//!     session_store::{self, Error, Update},
//!     SessionStore,
//! };
//! use time::{Duration, OffsetDateTime};
//!
//! #[derive(Clone, Debug, Default)]
//! pub struct HashMapStore(Arc<Mutex<HashMap<Id, Record>>>);
//!
//! impl HashMapStore {
//!     fn map(&self) -> session_store::Result<std::sync::MutexGuard<'_, HashMap<Id, Record>>> {
//!         // A poisoned lock is a backend failure, not a reason to panic.
//!         self.0.lock().map_err(|_| Error::backend("the store's lock is poisoned"))
//!     }
//! }
//!
//! #[maybe_async::maybe_async]
//! impl SessionStore for HashMapStore {
//!     async fn create(&self, record: &mut Record) -> session_store::Result<()> {
//!         let mut map = self.map()?;
//!         // Ids are random, but a collision must never overwrite another session.
//!         while map.contains_key(&record.id) {
//!             record.id = Id::default();
//!         }
//!         map.insert(record.id, record.clone());
//!         Ok(())
//!     }
//!
//!     async fn save(&self, record: &Record) -> session_store::Result<()> {
//!         self.map()?.insert(record.id, record.clone());
//!         Ok(())
//!     }
//!
//!     async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
//!         let now = OffsetDateTime::now_utc();
//!         // An expired record is never served, even before anything deleted it.
//!         Ok(self.map()?.get(id).filter(|r| !r.is_expired_at(now)).cloned())
//!     }
//!
//!     async fn delete(&self, id: &Id) -> session_store::Result<()> {
//!         self.map()?.remove(id);
//!         Ok(())
//!     }
//!
//!     // The conditional write: compare and replace under the one lock, so that two
//!     // requests that loaded the same version cannot both write.
//!     async fn update(&self, record: &Record) -> session_store::Result<Update> {
//!         let now = OffsetDateTime::now_utc();
//!         let mut map = self.map()?;
//!         let Some(stored) = map.get_mut(&record.id).filter(|r| !r.is_expired_at(now)) else {
//!             return Ok(Update::Gone); // never re-create a deleted or expired session
//!         };
//!         if stored.version != record.version {
//!             return Ok(Update::Conflict);
//!         }
//!         *stored = record.clone();
//!         stored.version = record.version + 1;
//!         Ok(Update::Written(stored.version))
//!     }
//!
//!     fn atomic_update(&self) -> bool {
//!         true
//!     }
//! }
//!
//! #[maybe_async::maybe_async]
//! async fn run() -> session_store::Result<()> {
//!     let store = HashMapStore::default();
//!     let mut record = Record::new(OffsetDateTime::now_utc() + Duration::hours(1));
//!     record.insert("cart", &vec!["apple", "pear"])?;
//!     store.create(&mut record).await?;
//!
//!     let loaded = store.load(&record.id).await?.expect("just created");
//!     assert_eq!(loaded.get::<Vec<String>>("cart")?, Some(vec!["apple".into(), "pear".into()]));
//!
//!     store.delete(&record.id).await?;
//!     // Bind awaited values before asserting: maybe-async cannot strip an `.await`
//!     // inside a macro call in blocking mode.
//!     let gone = store.load(&record.id).await?;
//!     assert_eq!(gone, None);
//!     Ok(())
//! }
//!
//! # #[maybe_async::sync_impl]
//! fn main() {
//!     run().unwrap(); // blocking mode: a plain call
//! }
//! # #[maybe_async::async_impl]
//! # fn main() {
//! #     futures_lite::future::block_on(run()).unwrap(); // any executor will do
//! # }
//! ```
//!
//! Values are encoded with [postcard](https://docs.rs/postcard) as they are inserted,
//! so a store keeps only bytes; a persistent store writes whole records with
//! [`Record::encode`](session::Record::encode) and reads them with
//! [`Record::decode`](session::Record::decode), which rejects any corrupt input with
//! an error instead of panicking.
//!
//! # The store contract
//!
//! [`SessionStore::create`] inserts only if the id is free, and draws a new one while
//! it is not; [`save`](SessionStore::save) writes the whole record;
//! [`load`](SessionStore::load) returns `None` for a missing or expired record;
//! [`delete`](SessionStore::delete) of a missing id succeeds;
//! [`update`](SessionStore::update) writes only over the version it was given, and
//! never re-creates a session that is gone. Errors are one of the
//! three kinds of [`session_store::Error`], each keeping its cause.
//!
//! # Caching
//!
//! [`CachingSessionStore`] puts a cache (usually a [`MemoryStore`]) in front of a store
//! that holds the truth, so that most loads never reach the slower store. Writes go to
//! the store first, then to the cache; a load tries the cache, then the store, and
//! fills the cache on the way back. A failing cache never fails a load or loses a
//! save, and never goes on serving a session the store has deleted or replaced; the
//! failures it absorbs are logged and can be observed with a callback.
//!
//! # Deleting expired sessions
//!
//! Stores that implement [`ExpiredDeletion`] remove their expired records with one
//! call to [`delete_expired`](ExpiredDeletion::delete_expired), which returns how many
//! it removed. Expired records are never served before that; deleting them frees their
//! memory or disk. Call it from whatever scheduler the program already runs, with a
//! [`DeletionSchedule`] to tell it when (period, jitter, backoff after failures).
//!
//! Or let [`continuously_delete_expired`](ExpiredDeletion::continuously_delete_expired)
//! run passes until a stop, sleeping on a [`Timer`] that picks the runtime:
//! `ThreadTimer` on a thread (blocking mode), `AsyncIoTimer` on any executor,
//! `TokioTimer`, or a timer of your own. A failed pass is reported and retried after a
//! bounded backoff, never the end of the loop; a [`StopHandle`] ends it at once, even
//! in the middle of a long period, and the loop returns a [`DeletionSummary`].
//!
//! # Sessions in a web application
//!
//! A [`SessionManager`] wraps any store and does the session cookie's round trip:
//! [`begin`](SessionManager::begin) turns a request's `Cookie` headers into a
//! [`session::Session`], without I/O and without ever failing (a bad or unknown cookie
//! yields a new, empty session under a fresh id), and
//! [`finish`](SessionManager::finish) writes the session when it changed and returns
//! the `Set-Cookie` value to send. [`session::Session::cycle_id`] moves a session to a
//! new id at login; [`session::Session::flush`] ends it at logout. The examples
//! `http_blocking` (std sockets, blocking mode) and `http_smol` (hyper on smol) are
//! complete servers.
//!
//! # Concurrent requests of one session
//!
//! Every stored record carries a [`version`](session::Record::version), and
//! [`session::Session`] writes with the store's conditional
//! [`update`](SessionStore::update): only over the version its request loaded. When
//! another request wrote first, it applies its own changes key by key over the newer
//! record and retries; [`Session::update`](session::Session::update) changes one value
//! atomically (counters, carts, rate limits). A session deleted, expired or moved by
//! [`cycle_id`](session::Session::cycle_id) under a request is never written back, and
//! that request's response sends no cookie: a logout or a login is never undone by a
//! request that was still in flight.
//!
//! # Using it with your framework
//!
//! - **axum** (feature `axum`): `.layer(SessionManager::new(store).layer())` on the
//!   router, then `session: Session` in handlers; `?` on [`session_store::Error`]
//!   answers a bare 503 for a store outage, 500 for a bug (logged), or the
//!   application's own response. The `SessionLayer` docs show a whole app.
//! - **actix-web** (feature `actix-web`): `.wrap(manager.middleware())` on the `App`,
//!   the same extractor and error handling (`SessionMiddleware` docs).
//! - **tower-sessions** (feature `tower-sessions`): `TowerSessionsStore` puts any of
//!   these stores under tower-sessions' own layer; `FromTowerSessions` puts any of its
//!   stores under [`SessionManager`].
//! - **Anything else**, blocking or async: [`SessionManager::begin`] with the request's
//!   `Cookie` header values, [`SessionManager::finish`] for the `Set-Cookie` to send
//!   (the `http_blocking` and `http_smol` examples), or
//!   [`SessionManager::finish_response`] for `Vary: Cookie` and
//!   `Cache-Control: private` too, which caches in front of the application need;
//!   [`session_store::Error::http_status`] gives the status to answer a failure
//!   with (503 for a store outage).
//!
//! [`session::Session`]'s futures are `Send`, and a request that never touches its
//! session costs no store call.
//!
//! # Features
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `sync` | no | blocking mode: every store operation is a plain blocking call |
//! | `testing` | no | [`testing`]: the store conformance suite, for your store's tests |
//! | `sqlite` | no | [`SqliteStore`], with SQLite compiled in; async mode runs its calls on the [`blocking`](https://docs.rs/blocking) thread pool |
//! | `redis` | no | [`RedisStore`]; speaks RESP on blocking sockets (sync mode) or async-io's reactor (async mode): no tokio at all; TLS through rustls (`rediss://`) |
//! | `postgres` | no | [`PostgresStore`]; speaks PostgreSQL's protocol on blocking sockets (sync mode) or async-io's reactor (async mode): no tokio at all; TLS through rustls (`sslmode`) |
//! | `async-io` | yes | `AsyncIoTimer`, the deletion loop's timer on any executor (async mode; a blocking program can turn it off with `default-features = false`) |
//! | `tokio` | no | `TokioTimer`, the deletion loop's timer on tokio (async mode; tokio's `time` feature only) |
//! | `tower-sessions` | no | `TowerSessionsStore` (our stores for tower-sessions 0.14 and 0.15) and `FromTowerSessions` (its stores as ours), async mode |
//! | `actix-web` | no | `SessionMiddleware`, the `Session` extractor and `ResponseError` for actix-web 4 (async mode; actix-web without its default features) |
//! | `axum` | no | `SessionLayer` and the `Session` extractor for axum 0.8 and any tower stack (async mode; axum-core, http, tower-layer, tower-service) |
//!
//! Logging goes through the [`log`](https://docs.rs/log) facade, so any logger (or
//! `tracing` with its `log` bridge) receives it.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The session model: ids, records and their codec, the per-request handle, expiry.
pub mod session;
// The contract every store implements, and its conformance suite.
pub mod session_store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
// The stores: memory, the cache layer, SQLite, Redis, PostgreSQL.
mod stores;
// A session's life around a request (the cookie round trip), expired-session
// deletion and the timers that drive it, and the clock.
mod lifecycle;
// The web framework integrations: axum, actix-web, tower-sessions.
mod integrations;

pub use async_trait;
pub use maybe_async;
/// The [`rustls`](https://docs.rs/rustls) crate the network stores speak TLS with,
/// for [`RedisStore::with_tls_config`] and [`PostgresStore::with_tls_config`]: a
/// `ClientConfig` built with this path is always of the version they take.
#[cfg(any(feature = "redis", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "redis", feature = "postgres"))))]
pub use rustls;
/// The [`time`](https://docs.rs/time) crate this one is built on, so that no version
/// mismatch can arise: [`session::Expiry`], [`session::SessionConfig`] and the
/// record's expiry date take `time::Duration` and `time::OffsetDateTime` (not
/// `std::time::Duration`); the stores' timeouts and the deletion schedule take
/// `std::time::Duration`.
pub use time;

pub use crate::{
    lifecycle::{
        deletion::{DeletionFailure, DeletionSchedule, DeletionSummary, MIN_BACKOFF},
        manager::{SameSite, SessionManager, SessionResponse},
        timer::{StopHandle, Tick, Timer},
    },
    session_store::{ExpiredDeletion, SessionStore},
    stores::{
        caching::{CacheFailure, CacheOp, CachingSessionStore},
        memory::MemoryStore,
    },
};

#[cfg(all(feature = "actix-web", not(feature = "sync")))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "actix-web", not(feature = "sync")))))]
pub use crate::integrations::actix::{SessionMiddleware, SessionMiddlewareService};
#[cfg(all(feature = "axum", not(feature = "sync")))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "axum", not(feature = "sync")))))]
pub use crate::integrations::axum_layer::{MissingSessionLayer, SessionLayer, SessionService};
#[cfg(all(feature = "tower-sessions", not(feature = "sync")))]
#[cfg_attr(
    docsrs,
    doc(cfg(all(feature = "tower-sessions", not(feature = "sync"))))
)]
pub use crate::integrations::tower_sessions::{FromTowerSessions, TowerSessionsStore};
#[cfg(all(feature = "sync", feature = "axum"))]
pub use crate::integrations::wrong_mode::SessionLayer;
#[cfg(all(feature = "sync", feature = "actix-web"))]
pub use crate::integrations::wrong_mode::SessionMiddleware;
#[cfg(feature = "async-io")]
pub use crate::lifecycle::timer::AsyncIoTimer;
#[cfg(feature = "sync")]
pub use crate::lifecycle::timer::ThreadTimer;
#[cfg(feature = "tokio")]
pub use crate::lifecycle::timer::TokioTimer;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::stores::postgres::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::stores::redis::RedisStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use crate::stores::sqlite::SqliteStore;

// Compiles and runs the README's example as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
