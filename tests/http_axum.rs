//! The axum integration: the example server end to end over real HTTP on every store,
//! and the layer's own rules on small routers of the test's own.
#![cfg(all(feature = "axum", not(feature = "sync")))]

mod common;
mod http;

// The example's own code, minus its `main`.
#[allow(dead_code)]
#[path = "../examples/http_axum.rs"]
mod example;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use common::FaultyStore;
use portable_sessions::{
    session::Session, session_store, MemoryStore, SessionLayer, SessionManager,
};

/// A tokio runtime for one test.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Runs the example `app` while `check` drives it, then stops it.
fn serving(app: impl FnOnce() -> example::App, check: impl FnOnce(SocketAddr)) {
    let runtime = runtime();
    let app = runtime.block_on(async { app() });
    let addr = app.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(app.run(async move {
        let _ = stopped.await;
    }));
    check(addr);
    let _ = stop.send(());
    runtime
        .block_on(server)
        .expect("the server task")
        .expect("the server stops cleanly");
}

#[test]
fn serves_sessions_over_http_on_every_store() {
    http::each_store("http-axum", |store| {
        let bound = store.clone();
        serving(
            move || {
                futures_lite::future::block_on(example::App::bind("127.0.0.1:0", bound))
                    .expect("binds")
            },
            |addr| {
                http::check_server(addr, &*store);
                http::check_races(addr, &*store);
                http::check_owner_sessions(addr, &*store);
                http::check_hostile_clients(addr);
            },
        );
    });
}

#[test]
fn deletes_expired_sessions_by_itself() {
    let store = MemoryStore::new();
    let shared = Arc::new(store.clone());
    serving(
        move || {
            futures_lite::future::block_on(example::App::bind("127.0.0.1:0", shared))
                .expect("binds")
                .with_deletion_period(Duration::from_millis(20))
        },
        |_| http::check_deletes_expired(&store),
    );
}

#[cfg(unix)]
#[test]
fn binary_prints_its_address_and_stops_on_ctrl_c() {
    http::check_binary_logging("http_axum", false);
}

/// Serves `router` on a free port while `check` drives it.
fn serve_router(router: Router, check: impl FnOnce(SocketAddr)) {
    let runtime = runtime();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binds");
    let addr = listener.local_addr().expect("bound");
    let server = runtime.spawn(async move { axum::serve(listener, router).await });
    check(addr);
    server.abort();
}

fn manager(store: FaultyStore) -> SessionManager {
    SessionManager::new(store).with_cookie_name("sid")
}

async fn count(session: Session) -> Result<String, session_store::Error> {
    let n = session
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await?;
    Ok(n.to_string())
}

async fn read(session: Session) -> Result<String, session_store::Error> {
    let n = session.get::<u64>("n").await?;
    Ok(n.unwrap_or(0).to_string())
}

async fn fail_after_insert(session: Session) -> Result<String, StatusCode> {
    session
        .insert("lost", "value")
        .await
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    Err(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn with_own_cookie(session: Session) -> impl IntoResponse {
    session.insert("user", "alice").await.expect("memory");
    ([(header::SET_COOKIE, "theme=dark; Path=/")], "ok")
}

async fn public(session: Session) -> Result<impl IntoResponse, session_store::Error> {
    session.insert("seen", true).await?;
    Ok(([(header::CACHE_CONTROL, "public, max-age=60")], "ok"))
}

async fn login(session: Session) -> Result<&'static str, session_store::Error> {
    session.insert("user", "alice").await?;
    session.cycle_id().await?;
    Ok("logged in")
}

async fn half(session: Session) -> Result<String, session_store::Error> {
    session.insert("half", true).await?;
    Err(session_store::Error::backend(
        "the next step's backend is down",
    ))
}

async fn store_error(session: Session) -> Result<String, session_store::Error> {
    // A value stored as a string, read as a number: an error `?` turns into a 500.
    session.insert("n", "not a number").await?;
    let n = session.get::<u64>("n").await?;
    Ok(format!("{n:?}"))
}

/// The test app of `http::check_integration_rules`, under `layer` (and a second
/// one, on the nested router).
fn app(layer: SessionLayer) -> Router {
    let nested = Router::new()
        .route("/login", get(login))
        .layer(layer.clone());
    Router::new()
        .route("/count", get(count))
        .route("/read", get(read))
        .route("/fail", get(fail_after_insert))
        .route("/own-cookie", get(with_own_cookie))
        .route("/public", get(public))
        .route("/store-error", get(store_error))
        .route("/half", get(half))
        .route("/plain", get(|| async { "plain" }))
        .nest("/nested", nested)
        .layer(layer)
}

#[test]
fn the_layer_follows_its_rules() {
    let store = FaultyStore::new();
    serve_router(app(manager(store.clone()).layer()), |addr| {
        http::check_integration_rules(addr, &store)
    });
}

/// The application's own answer to a store outage, from a handler's `?` and from
/// the write after it.
#[test]
fn an_outage_gets_the_applications_own_response() {
    let store = FaultyStore::new();
    // A 200 "try again" page: the layer keeps nothing of the failed handler's
    // session all the same.
    let layer = manager(store.clone()).layer().with_error_response(|err| {
        assert_eq!(err.http_status(), 503);
        (StatusCode::OK, "sessions are down, try again").into_response()
    });
    serve_router(app(layer), |addr| {
        let (_, cookies, _) = http::fetch(addr, "/count", None);
        let cookie = cookies[0].split(';').next().unwrap().to_owned();
        http::check_outage(addr, &store, &cookie, (200, "sessions are down, try again"));
    });
}

#[test]
fn a_missing_layer_is_a_500_not_a_panic() {
    let router = Router::new().route("/count", get(count));
    serve_router(router, |addr| {
        let (status, cookies, body) = http::fetch(addr, "/count", None);
        assert_eq!(status, 500);
        assert!(cookies.is_empty());
        assert_eq!(body, "internal server error");
    });
}
