//! The actix-web integration: the example server end to end over real HTTP on every
//! store, and the middleware's own rules on a small app of the test's own.
#![cfg(all(feature = "actix-web", not(feature = "sync")))]

mod common;
mod http;

// The example's own code, minus its `main`.
#[allow(dead_code)]
#[path = "../examples/http_actix.rs"]
mod example;

use std::{net::SocketAddr, sync::mpsc, time::Duration};

use actix_web::{dev::ServerHandle, http::header, web, HttpResponse, HttpServer};
use common::FaultyStore;
use portable_sessions::{
    session::Session, session_store, MemoryStore, SessionManager, SessionMiddleware,
};

/// Runs `app` in an actix system on a thread of its own while `check` drives it, then
/// stops it.
fn serving(app: example::App, check: impl FnOnce(SocketAddr)) {
    let addr = app.local_addr();
    let (started, handle) = mpsc::channel::<ServerHandle>();
    let server = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(app.run(move |handle| {
            let _ = started.send(handle);
        }))
    });
    let handle = handle
        .recv_timeout(Duration::from_secs(20))
        .expect("started");
    check(addr);
    actix_web::rt::System::new().block_on(handle.stop(true));
    server
        .join()
        .expect("the server thread")
        .expect("the server stops cleanly");
}

#[test]
fn serves_sessions_over_http_on_every_store() {
    http::each_store("http-actix", |store| {
        let app = example::App::bind("127.0.0.1:0", store.clone()).expect("binds");
        serving(app, |addr| {
            http::check_server(addr, &*store);
            http::check_races(addr, &*store);
            http::check_owner_sessions(addr, &*store);
            http::check_hostile_clients(addr);
        });
    });
}

#[test]
fn deletes_expired_sessions_by_itself() {
    let store = MemoryStore::new();
    let app = example::App::bind("127.0.0.1:0", std::sync::Arc::new(store.clone()))
        .expect("binds")
        .with_deletion_period(Duration::from_millis(20));
    serving(app, |_| http::check_deletes_expired(&store));
}

#[cfg(unix)]
#[test]
fn binary_prints_its_address_and_stops_on_ctrl_c() {
    http::check_binary_logging("http_actix", false);
}

async fn count(session: Session) -> Result<HttpResponse, session_store::Error> {
    let n = session
        .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await?;
    Ok(HttpResponse::Ok().body(n.to_string()))
}

async fn read(session: Session) -> Result<HttpResponse, session_store::Error> {
    let n = session.get::<u64>("n").await?;
    Ok(HttpResponse::Ok().body(n.unwrap_or(0).to_string()))
}

async fn fail_after_insert(session: Session) -> HttpResponse {
    session.insert("lost", "value").await.expect("memory");
    HttpResponse::InternalServerError().finish()
}

async fn with_own_cookie(session: Session) -> HttpResponse {
    session.insert("user", "alice").await.expect("memory");
    HttpResponse::Ok()
        .insert_header((header::SET_COOKIE, "theme=dark; Path=/"))
        .body("ok")
}

async fn public(session: Session) -> Result<HttpResponse, session_store::Error> {
    session.insert("seen", true).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=60"))
        .body("ok"))
}

async fn login(session: Session) -> Result<HttpResponse, session_store::Error> {
    session.insert("user", "alice").await?;
    session.cycle_id().await?;
    Ok(HttpResponse::Ok().body("logged in"))
}

async fn plain() -> HttpResponse {
    HttpResponse::Ok().body("plain")
}

async fn half(session: Session) -> Result<HttpResponse, session_store::Error> {
    session.insert("half", true).await?;
    Err(session_store::Error::backend(
        "the next step's backend is down",
    ))
}

async fn store_error(session: Session) -> Result<HttpResponse, session_store::Error> {
    session.insert("n", "not a number").await?;
    let n = session.get::<u64>("n").await?;
    Ok(HttpResponse::Ok().body(format!("{n:?}")))
}

/// Serves the app of `http::check_integration_rules` (`middleware`: wrapping it,
/// and a nested scope too) while `check` drives it.
fn serve_routes(middleware: Option<SessionMiddleware>, check: impl FnOnce(SocketAddr)) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = listener.local_addr().expect("bound");
    let (started, handle) = mpsc::channel::<ServerHandle>();
    let server = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                let wrapped = middleware.is_some();
                let middleware = middleware
                    .clone()
                    .unwrap_or_else(|| SessionManager::new(MemoryStore::new()).middleware());
                let nested = web::scope("/nested")
                    .wrap(actix_web::middleware::Condition::new(
                        wrapped,
                        middleware.clone(),
                    ))
                    .route("/login", web::get().to(login));
                let routes = actix_web::App::new()
                    .route("/count", web::get().to(count))
                    .route("/read", web::get().to(read))
                    .route("/fail", web::get().to(fail_after_insert))
                    .route("/own-cookie", web::get().to(with_own_cookie))
                    .route("/public", web::get().to(public))
                    .route("/store-error", web::get().to(store_error))
                    .route("/half", web::get().to(half))
                    .route("/plain", web::get().to(plain))
                    .service(nested);
                routes.wrap(actix_web::middleware::Condition::new(wrapped, middleware))
            })
            .workers(1)
            .disable_signals()
            .listen(listener)
            .expect("listens")
            .run();
            let _ = started.send(server.handle());
            server.await
        })
    });
    let handle = handle
        .recv_timeout(Duration::from_secs(20))
        .expect("started");
    check(addr);
    actix_web::rt::System::new().block_on(handle.stop(true));
    server.join().expect("the server thread").expect("stops");
}

fn middleware(store: &FaultyStore) -> SessionMiddleware {
    SessionManager::new(store.clone())
        .with_cookie_name("sid")
        .middleware()
}

#[test]
fn the_middleware_follows_its_rules() {
    let store = FaultyStore::new();
    serve_routes(Some(middleware(&store)), |addr| {
        http::check_integration_rules(addr, &store)
    });
}

/// The application's own answer to a store outage, from a handler's `?` and from
/// the write after it.
#[test]
fn an_outage_gets_the_applications_own_response() {
    let store = FaultyStore::new();
    // A 200 "try again" page: the middleware keeps nothing of the failed
    // handler's session all the same.
    let middleware = middleware(&store).with_error_response(|err| {
        assert_eq!(err.http_status(), 503);
        HttpResponse::Ok().body("sessions are down, try again")
    });
    serve_routes(Some(middleware), |addr| {
        let (_, cookies, _) = http::fetch(addr, "/count", None);
        let cookie = cookies[0].split(';').next().unwrap().to_owned();
        http::check_outage(addr, &store, &cookie, (200, "sessions are down, try again"));
    });
}

#[test]
fn a_missing_middleware_is_a_500_not_a_panic() {
    serve_routes(None, |addr| {
        let (status, cookies, body) = http::fetch(addr, "/count", None);
        assert_eq!(status, 500);
        assert!(cookies.is_empty());
        assert_eq!(body, "internal server error");
    });
}
