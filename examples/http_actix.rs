//! An actix-web 4 server with sessions: one `.wrap(...)`, and `Session` as an
//! extractor.
//!
//! ```text
//! cargo run --example http_actix --features actix-web,tokio,sqlite,redis,postgres [-- ADDRESS [STORE]]
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=1 user=-
//! curl -c jar -b jar -d alice http://127.0.0.1:3000/login   # a new session id
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=2 user=alice
//! curl -c jar -b jar -X POST http://127.0.0.1:3000/logout   # the cookie is removed
//! ```
//!
//! It listens on ADDRESS (default `127.0.0.1:3000`; port 0 picks a free port), keeps
//! sessions in STORE (`memory`, the default; `sqlite:PATH`; a `redis://` URL; or a
//! `postgres://` URL),
//! deletes expired sessions every minute on a task of its own (`TokioTimer`: actix
//! runs on tokio), prints the address it bound as its first line, and stops on
//! Ctrl-C. The application itself is in `visits/mod.rs`, shared with the other HTTP
//! examples; here it is one actix-web handler, wrapped with the session middleware.

#[cfg(feature = "sync")]
fn main() {
    eprintln!("http_actix runs in async mode: build it without the `sync` feature");
    std::process::exit(2);
}

#[cfg(not(feature = "sync"))]
fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write;

    let addr = std::env::args().nth(1);
    let store = visits::open_store(std::env::args().nth(2).as_deref())?;
    actix_web::rt::System::new().block_on(async {
        let app = App::bind(addr.as_deref().unwrap_or("127.0.0.1:3000"), store)?;
        // The first line of output is the address, for scripts and tests to read.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", app.local_addr())?;
        stdout.flush()?;
        drop(stdout);
        // actix-web's server stops gracefully on Ctrl-C by itself.
        app.run(|_| {}).await?;
        eprintln!("stopped");
        Ok(())
    })
}

#[cfg(not(feature = "sync"))]
#[path = "visits/mod.rs"]
mod visits;

#[cfg(not(feature = "sync"))]
pub(crate) use server::App;

/// The server, in a module of its own only because it builds in async mode alone.
#[cfg(not(feature = "sync"))]
mod server {
    use std::{io, net::SocketAddr, sync::Arc, time::Duration};

    use actix_web::{
        dev::ServerHandle, http::StatusCode, web, HttpRequest, HttpResponse, HttpServer,
    };
    use portable_sessions::{
        session::Session, session_store, DeletionSchedule, ExpiredDeletion, SessionManager,
        TokioTimer,
    };

    use super::visits;

    /// The largest request body read, in bytes.
    const MAX_BODY: usize = 1024;

    /// The server: the bound listener, the session manager, and the deletion loop's
    /// store.
    pub(crate) struct App {
        listener: std::net::TcpListener,
        sessions: SessionManager,
        store: Arc<dyn ExpiredDeletion>,
        deletion: DeletionSchedule,
    }

    /// Every request goes to the shared application, which routes on its own.
    async fn handle(
        session: Session,
        request: HttpRequest,
        body: web::Bytes,
    ) -> Result<HttpResponse, session_store::Error> {
        let path = request.uri().path();
        let reply = visits::route(&session, request.method().as_str(), path, &body).await?;
        let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
        Ok(HttpResponse::build(status)
            .content_type("text/plain; charset=utf-8")
            .body(reply.body))
    }

    impl App {
        /// Listens on `addr`, keeping sessions in `store`.
        pub(crate) fn bind(addr: &str, store: Arc<dyn ExpiredDeletion>) -> io::Result<Self> {
            Ok(Self {
                listener: std::net::TcpListener::bind(addr)?,
                sessions: visits::sessions(store.clone()),
                store,
                deletion: DeletionSchedule::new(Duration::from_secs(60)),
            })
        }

        /// Deletes expired sessions every `period` instead of every minute (the
        /// tests use it).
        #[allow(dead_code)]
        pub(crate) fn with_deletion_period(mut self, period: Duration) -> Self {
            self.deletion = DeletionSchedule::new(period);
            self
        }

        /// Returns the address the server listens on.
        pub(crate) fn local_addr(&self) -> SocketAddr {
            self.listener.local_addr().expect("a bound listener")
        }

        /// Serves until stopped (Ctrl-C, or the handle given to `started`), deleting
        /// expired sessions on a task of its own. Runs inside an actix system.
        pub(crate) async fn run(self, started: impl FnOnce(ServerHandle)) -> io::Result<()> {
            let timer = TokioTimer::new();
            let stop = timer.stop_handle();
            let (store, schedule) = (self.store.clone(), self.deletion.clone());
            let deletion = actix_web::rt::spawn(async move {
                store.continuously_delete_expired(schedule, &timer).await
            });
            // The one line that adds sessions: `.wrap(manager.middleware())`.
            let middleware = self.sessions.middleware();
            let server = HttpServer::new(move || {
                actix_web::App::new()
                    .wrap(middleware.clone())
                    .app_data(web::PayloadConfig::new(MAX_BODY))
                    .default_service(web::to(handle))
            })
            .workers(2)
            .listen(self.listener)?
            .run();
            started(server.handle());
            let served = server.await;
            stop.stop();
            let _ = deletion.await;
            served
        }
    }
}
