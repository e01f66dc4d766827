//! An axum 0.8 server with sessions: one `.layer(...)`, and `Session` as an extractor.
//!
//! ```text
//! cargo run --example http_axum --features axum,tokio,sqlite,redis,postgres [-- ADDRESS [STORE]]
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=1 user=-
//! curl -c jar -b jar -d alice http://127.0.0.1:3000/login   # a new session id
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=2 user=alice
//! curl -c jar -b jar -X POST http://127.0.0.1:3000/logout   # the cookie is removed
//! ```
//!
//! It listens on ADDRESS (default `127.0.0.1:3000`; port 0 picks a free port), keeps
//! sessions in STORE (`memory`, the default; `sqlite:PATH`; a `redis://` URL; or a
//! `postgres://` URL),
//! deletes expired sessions every minute on a tokio task (`TokioTimer`), prints the
//! address it bound as its first line, and stops on Ctrl-C. The application itself is
//! in `visits/mod.rs`, shared with the other HTTP examples; here it is one axum
//! handler, wired with the session layer in one line.

#[cfg(feature = "sync")]
fn main() {
    eprintln!("http_axum runs in async mode: build it without the `sync` feature");
    std::process::exit(2);
}

#[cfg(not(feature = "sync"))]
fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write;

    let addr = std::env::args().nth(1);
    let store = visits::open_store(std::env::args().nth(2).as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = App::bind(addr.as_deref().unwrap_or("127.0.0.1:3000"), store).await?;
        // The first line of output is the address, for scripts and tests to read.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", app.local_addr()?)?;
        stdout.flush()?;
        drop(stdout);

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stop = std::sync::Mutex::new(Some(stop));
        ctrlc::set_handler(move || {
            if let Some(stop) = stop.lock().ok().and_then(|mut stop| stop.take()) {
                let _ = stop.send(());
            }
        })?;
        app.run(async move {
            let _ = stopped.await;
        })
        .await?;
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
    use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

    use axum::{
        body::Bytes,
        extract::DefaultBodyLimit,
        http::{Method, StatusCode, Uri},
        Router,
    };
    use portable_sessions::{
        session::Session, session_store, DeletionSchedule, ExpiredDeletion, TokioTimer,
    };
    use tokio::net::TcpListener;

    use super::visits;

    /// The largest request body read, in bytes.
    const MAX_BODY: usize = 1024;

    /// The server: a listener, the application, and the deletion loop's store.
    pub(crate) struct App {
        listener: TcpListener,
        router: Router,
        store: Arc<dyn ExpiredDeletion>,
        deletion: DeletionSchedule,
    }

    /// Every request goes to the shared application, which routes on its own.
    async fn handle(
        session: Session,
        method: Method,
        uri: Uri,
        body: Bytes,
    ) -> Result<(StatusCode, String), session_store::Error> {
        let reply = visits::route(&session, method.as_str(), uri.path(), &body).await?;
        let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
        Ok((status, reply.body))
    }

    impl App {
        /// Listens on `addr`, keeping sessions in `store`.
        pub(crate) async fn bind(addr: &str, store: Arc<dyn ExpiredDeletion>) -> io::Result<Self> {
            let router = Router::new()
                .fallback(handle)
                .layer(DefaultBodyLimit::max(MAX_BODY))
                // The one line that adds sessions.
                .layer(visits::sessions(store.clone()).layer());
            Ok(Self {
                listener: TcpListener::bind(addr).await?,
                router,
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
        pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
            self.listener.local_addr()
        }

        /// Serves until `shutdown` completes, deleting expired sessions on a task of
        /// its own; then finishes the requests under way and stops that task.
        pub(crate) async fn run(
            self,
            shutdown: impl Future<Output = ()> + Send + 'static,
        ) -> io::Result<()> {
            let timer = TokioTimer::new();
            let stop = timer.stop_handle();
            let (store, schedule) = (self.store.clone(), self.deletion.clone());
            let deletion =
                tokio::spawn(
                    async move { store.continuously_delete_expired(schedule, &timer).await },
                );
            let served = axum::serve(self.listener, self.router)
                .with_graceful_shutdown(shutdown)
                .await;
            stop.stop();
            let _ = deletion.await;
            served
        }
    }
}
