//! The end-to-end benchmark's server: one web application, served bare, under our
//! session layer or under the peer's, on one store. `peers/e2e.sh` starts it, loads it
//! with wrk and prints the table.
//!
//!   e2e <axum|actix> <bare|ours|peer> <memory|redis|sqlite|postgres> <port> <cookies-file>
//!
//! Routes: `GET /none` never touches the session, `GET /read` reads one value,
//! `GET /write` reads it and writes it back plus one, `GET /init` starts a session
//! holding it. Once listening, the server starts 2,000 sessions through `/init`
//! itself, over HTTP as a browser would, writes their `Cookie` header values to the
//! cookies file (one per line) and then prints `ready`.

#[cfg(feature = "sync")]
fn main() {
    eprintln!("the end-to-end benchmark measures the async integrations: build it without `sync`");
    std::process::exit(2);
}

#[cfg(not(feature = "sync"))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [framework, layer, store, port, cookies] = &args[..] else {
        eprintln!("usage: e2e <axum|actix> <bare|ours|peer> <memory|redis|sqlite|postgres> <port> <cookies-file>");
        std::process::exit(2);
    };
    let port: u16 = port.parse().expect("a port number");
    let setup = e2e::Setup {
        layer: layer.parse().expect("bare, ours or peer"),
        store: store.clone(),
        port,
        cookies: cookies.into(),
    };
    match framework.as_str() {
        "axum" => e2e::axum_app::serve(setup),
        "actix" => e2e::actix_app::serve(setup),
        other => panic!("unknown framework {other}: axum or actix"),
    }
}

#[cfg(not(feature = "sync"))]
#[path = "../servers.rs"]
mod servers;

#[cfg(not(feature = "sync"))]
mod e2e {
    use super::servers::{postgres_url, psql};
    use std::{
        io::{Read, Write},
        net::TcpStream,
        path::PathBuf,
        str::FromStr,
    };

    /// How many sessions the load spreads its cookies over.
    pub const SESSIONS: usize = 2_000;

    /// The application with no session layer, with ours, or with the peer's.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Layer {
        Bare,
        Ours,
        Peer,
    }

    impl FromStr for Layer {
        type Err = String;

        fn from_str(s: &str) -> Result<Self, String> {
            match s {
                "bare" => Ok(Layer::Bare),
                "ours" => Ok(Layer::Ours),
                "peer" => Ok(Layer::Peer),
                other => Err(format!("unknown layer {other}")),
            }
        }
    }

    pub struct Setup {
        pub layer: Layer,
        pub store: String,
        pub port: u16,
        pub cookies: PathBuf,
    }

    /// The server's worker threads: `E2E_WORKERS`, or one per core.
    pub fn workers() -> usize {
        std::env::var("E2E_WORKERS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Where the Redis server is: `PEERS_REDIS` or the test server.
    fn redis_url() -> String {
        std::env::var("PEERS_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// A fresh SQLite file in a directory of this process's own.
    fn sqlite_path(side: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("peers-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{side}.db"))
    }

    /// Our store of that name, made empty.
    /// Keys, schemas and files are named after the port, so that servers measured
    /// side by side never share sessions; e2e.sh deletes them at the end.
    pub fn our_store(name: &str, port: u16) -> std::sync::Arc<dyn portable_sessions::SessionStore> {
        use std::sync::Arc;
        match name {
            "memory" => Arc::new(portable_sessions::MemoryStore::new()),
            "redis" => Arc::new(
                portable_sessions::RedisStore::new(&redis_url())
                    .unwrap()
                    .with_key_prefix(format!("e2e-ours-{port}:")),
            ),
            "sqlite" => {
                Arc::new(portable_sessions::SqliteStore::open(sqlite_path("ours")).unwrap())
            }
            "postgres" => {
                let schema = format!("e2e_ours_{port}");
                psql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                let store = portable_sessions::PostgresStore::new(&postgres_url())
                    .unwrap()
                    .with_table(&schema, "sessions")
                    .unwrap();
                futures_lite::future::block_on(store.create_table()).unwrap();
                Arc::new(store)
            }
            other => panic!("unknown store {other}"),
        }
    }

    /// Starts the sessions through `GET /init`, as clients would, and writes their
    /// cookies; for the bare server, which sets none, random ids of the same length
    /// under tower-sessions' cookie name, so that every server parses a like header.
    pub fn start_sessions(setup: &Setup) {
        let mut lines = String::new();
        for _ in 0..SESSIONS {
            let cookie = if setup.layer == Layer::Bare {
                let mut bytes = [0u8; 16];
                getrandom::fill(&mut bytes).unwrap();
                let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                format!("id={}", &id[..22])
            } else {
                init_cookie(setup.port)
            };
            lines.push_str(&cookie);
            lines.push('\n');
        }
        std::fs::write(&setup.cookies, lines).unwrap();
        println!("ready");
    }

    /// `GET /init` on a connection of its own; the `name=value` of its `Set-Cookie`.
    fn init_cookie(port: u16) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .write_all(b"GET /init HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "GET /init: {response}"
        );
        response
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("set-cookie")
                    .then(|| value.trim().split(';').next().unwrap().to_owned())
            })
            .unwrap_or_else(|| panic!("GET /init set no cookie: {response}"))
    }

    pub mod axum_app {
        use super::*;
        use axum::{http::StatusCode, routing::get, Router};
        use portable_sessions::{session::Session, session_store, SessionManager};

        async fn none() -> &'static str {
            "none"
        }

        async fn init(session: Session) -> Result<&'static str, session_store::Error> {
            session.insert("n", 0u64).await?;
            Ok("init")
        }

        async fn read(session: Session) -> Result<String, session_store::Error> {
            let n: Option<u64> = session.get("n").await?;
            Ok(n.unwrap_or(0).to_string())
        }

        async fn write(session: Session) -> Result<String, session_store::Error> {
            let n = session.get::<u64>("n").await?.unwrap_or(0) + 1;
            session.insert("n", n).await?;
            Ok(n.to_string())
        }

        async fn peer_init(session: tower_sessions::Session) -> Result<&'static str, StatusCode> {
            session.insert("n", 0u64).await.map_err(internal)?;
            Ok("init")
        }

        async fn peer_read(session: tower_sessions::Session) -> Result<String, StatusCode> {
            let n: Option<u64> = session.get("n").await.map_err(internal)?;
            Ok(n.unwrap_or(0).to_string())
        }

        async fn peer_write(session: tower_sessions::Session) -> Result<String, StatusCode> {
            let n = session
                .get::<u64>("n")
                .await
                .map_err(internal)?
                .unwrap_or(0)
                + 1;
            session.insert("n", n).await.map_err(internal)?;
            Ok(n.to_string())
        }

        fn internal(err: impl std::fmt::Display) -> StatusCode {
            eprintln!("peer session error: {err}");
            StatusCode::INTERNAL_SERVER_ERROR
        }

        fn peer_layer<S: tower_sessions::SessionStore>(
            store: S,
        ) -> tower_sessions::SessionManagerLayer<S> {
            tower_sessions::SessionManagerLayer::new(store).with_secure(false)
        }

        pub fn serve(setup: Setup) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers())
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let app = match setup.layer {
                    Layer::Bare => Router::new()
                        .route("/none", get(none))
                        .route("/read", get(|| async { "0" }))
                        .route("/write", get(|| async { "1" })),
                    Layer::Ours => Router::new()
                        .route("/none", get(none))
                        .route("/init", get(init))
                        .route("/read", get(read))
                        .route("/write", get(write))
                        .layer(
                            SessionManager::from_shared(our_store(&setup.store, setup.port))
                                .with_secure(false)
                                .layer(),
                        ),
                    Layer::Peer => {
                        let routes = Router::new()
                            .route("/none", get(none))
                            .route("/init", get(peer_init))
                            .route("/read", get(peer_read))
                            .route("/write", get(peer_write));
                        match setup.store.as_str() {
                            "memory" => {
                                routes.layer(peer_layer(tower_sessions::MemoryStore::default()))
                            }
                            // Its keys are the bare ids, random: no run meets another's.
                            "redis" => routes.layer(peer_layer(peer_redis().await)),
                            "sqlite" => routes.layer(peer_layer(peer_sqlite().await)),
                            "postgres" => routes.layer(peer_layer(peer_postgres(setup.port).await)),
                            other => panic!("unknown store {other}"),
                        }
                    }
                };
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", setup.port))
                    .await
                    .unwrap();
                tokio::task::spawn_blocking(move || start_sessions(&setup));
                axum::serve(listener, app).await.unwrap();
            });
        }

        async fn peer_redis() -> tower_sessions_redis_store::RedisStore<fred::clients::Pool> {
            use fred::prelude::*;
            let config = Config::from_url(&redis_url()).unwrap();
            // As the peer's README sets it up (a pool of six), but with enough
            // clients for the load's connections.
            let pool = Pool::new(config, None, None, None, 16).unwrap();
            let _ = pool.connect();
            pool.wait_for_connect().await.unwrap();
            tower_sessions_redis_store::RedisStore::new(pool)
        }

        async fn peer_sqlite() -> tower_sessions_sqlx_store::SqliteStore {
            super::super::servers::peer_sqlite(&sqlite_path("peer"), 16).await
        }

        async fn peer_postgres(port: u16) -> tower_sessions_sqlx_store::PostgresStore {
            let schema = format!("e2e_peer_{port}");
            psql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(16)
                .connect(&postgres_url())
                .await
                .unwrap();
            let store = tower_sessions_sqlx_store::PostgresStore::new(pool)
                .with_schema_name(&schema)
                .unwrap();
            store.migrate().await.unwrap();
            store
        }
    }

    pub mod actix_app {
        use super::*;
        use actix_web::{web, App, HttpResponse, HttpServer};
        use portable_sessions::{session::Session, session_store, SessionManager};

        async fn none() -> HttpResponse {
            HttpResponse::Ok().body("none")
        }

        async fn init(session: Session) -> Result<HttpResponse, session_store::Error> {
            session.insert("n", 0u64).await?;
            Ok(HttpResponse::Ok().body("init"))
        }

        async fn read(session: Session) -> Result<HttpResponse, session_store::Error> {
            let n: Option<u64> = session.get("n").await?;
            Ok(HttpResponse::Ok().body(n.unwrap_or(0).to_string()))
        }

        async fn write(session: Session) -> Result<HttpResponse, session_store::Error> {
            let n = session.get::<u64>("n").await?.unwrap_or(0) + 1;
            session.insert("n", n).await?;
            Ok(HttpResponse::Ok().body(n.to_string()))
        }

        async fn peer_init(session: actix_session::Session) -> actix_web::Result<HttpResponse> {
            session.insert("n", 0u64)?;
            Ok(HttpResponse::Ok().body("init"))
        }

        async fn peer_read(session: actix_session::Session) -> actix_web::Result<HttpResponse> {
            let n: Option<u64> = session.get("n")?;
            Ok(HttpResponse::Ok().body(n.unwrap_or(0).to_string()))
        }

        async fn peer_write(session: actix_session::Session) -> actix_web::Result<HttpResponse> {
            let n = session.get::<u64>("n")?.unwrap_or(0) + 1;
            session.insert("n", n)?;
            Ok(HttpResponse::Ok().body(n.to_string()))
        }

        pub fn serve(setup: Setup) {
            assert!(
                setup.store == "redis" || setup.layer != Layer::Peer,
                "actix-session keeps server-side sessions in Redis only"
            );
            actix_web::rt::System::new().block_on(async move {
                let port = setup.port;
                let server = match setup.layer {
                    Layer::Bare => HttpServer::new(|| {
                        App::new()
                            .route("/none", web::get().to(none))
                            .route(
                                "/read",
                                web::get().to(|| async { HttpResponse::Ok().body("0") }),
                            )
                            .route(
                                "/write",
                                web::get().to(|| async { HttpResponse::Ok().body("1") }),
                            )
                    })
                    .workers(workers())
                    .bind(("127.0.0.1", port))
                    .unwrap()
                    .run(),
                    Layer::Ours => {
                        let sessions =
                            SessionManager::from_shared(our_store(&setup.store, setup.port))
                                .with_secure(false)
                                .middleware();
                        HttpServer::new(move || {
                            App::new()
                                .wrap(sessions.clone())
                                .route("/none", web::get().to(none))
                                .route("/init", web::get().to(init))
                                .route("/read", web::get().to(read))
                                .route("/write", web::get().to(write))
                        })
                        .workers(workers())
                        .bind(("127.0.0.1", port))
                        .unwrap()
                        .run()
                    }
                    Layer::Peer => {
                        let store = actix_session::storage::RedisSessionStore::builder(redis_url())
                            .cache_keygen(move |key| format!("e2e-peer-{port}:{key}"))
                            .build()
                            .await
                            .unwrap();
                        let key = actix_web::cookie::Key::generate();
                        HttpServer::new(move || {
                            App::new()
                                .wrap(
                                    actix_session::SessionMiddleware::builder(
                                        store.clone(),
                                        key.clone(),
                                    )
                                    .cookie_secure(false)
                                    .build(),
                                )
                                .route("/none", web::get().to(none))
                                .route("/init", web::get().to(peer_init))
                                .route("/read", web::get().to(peer_read))
                                .route("/write", web::get().to(peer_write))
                        })
                        .workers(workers())
                        .bind(("127.0.0.1", port))
                        .unwrap()
                        .run()
                    }
                };
                std::thread::spawn(move || start_sessions(&setup));
                server.await.unwrap();
            });
        }
    }
}
