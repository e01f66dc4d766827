//! An async HTTP server with sessions on smol, with no tokio runtime: hyper's HTTP/1
//! server over smol's sockets (through smol-hyper's I/O adapter), in the default
//! async mode.
//!
//! ```text
//! cargo run --example http_smol --features sqlite,redis,postgres [-- ADDRESS [STORE]]
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=1 user=-
//! curl -c jar -b jar -d alice http://127.0.0.1:3000/login   # a new session id
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=2 user=alice
//! curl -c jar -b jar -X POST http://127.0.0.1:3000/logout   # the cookie is removed
//! ```
//!
//! It listens on ADDRESS (default `127.0.0.1:3000`; port 0 picks a free port), keeps
//! sessions in STORE (`memory`, the default; `sqlite:PATH`; a `redis://` URL; or a
//! `postgres://` URL),
//! deletes expired sessions every minute on a task of its own (`AsyncIoTimer`),
//! prints the address it bound as its first line, and stops on Ctrl-C. A client
//! gets 10 seconds to send its request head; a failed `accept` (out of file
//! descriptors, say) is logged and retried after a pause, never the server's end;
//! bodies over 1 KiB get a 413. The application
//! itself is in `visits/mod.rs`, shared with `http_blocking.rs`.
//!
//! Why hyper: it is the most used and best kept HTTP implementation in Rust, and it
//! needs no runtime of its own. Its only tie to tokio is the `tokio` crate with just
//! the `sync` feature (channels, no runtime, no reactor); smol supplies the executor
//! and the sockets.

#[cfg(feature = "sync")]
fn main() {
    eprintln!("http_smol runs in async mode: build it without the `sync` feature");
    std::process::exit(2);
}

#[cfg(not(feature = "sync"))]
fn main() -> std::io::Result<()> {
    use std::io::Write;

    let addr = std::env::args().nth(1);
    let store = visits::open_store(std::env::args().nth(2).as_deref()).map_err(|err| {
        eprintln!("{err}");
        std::io::Error::new(std::io::ErrorKind::InvalidInput, err)
    })?;
    smol::block_on(async {
        let app = App::bind(addr.as_deref().unwrap_or("127.0.0.1:3000"), store).await?;
        // The first line of output is the address, for scripts and tests to read.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", app.local_addr()?)?;
        stdout.flush()?;
        drop(stdout);

        let (stop, stopped) = smol::channel::bounded::<()>(1);
        ctrlc::set_handler(move || {
            let _ = stop.try_send(());
        })
        .map_err(std::io::Error::other)?;
        app.run(async move {
            let _ = stopped.recv().await;
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
    use std::{
        convert::Infallible, future::Future, io, net::SocketAddr, sync::Arc, time::Duration,
    };

    use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
    use hyper::{
        body::{Bytes, Incoming},
        header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, SET_COOKIE, VARY},
        server::conn::http1,
        service::service_fn,
        Request, Response,
    };
    use portable_sessions::{
        AsyncIoTimer, DeletionSchedule, ExpiredDeletion, SessionManager, SessionResponse,
    };
    use smol::net::{TcpListener, TcpStream};
    use smol_hyper::rt::{FuturesIo, SmolTimer};

    use super::visits;

    /// The largest request body read, in bytes.
    const MAX_BODY: usize = 1024;

    /// How long a client may take to send its request head.
    const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

    /// The server: a listener, the session manager, and the deletion loop's store.
    #[derive(Clone, Debug)]
    pub(crate) struct App {
        listener: TcpListener,
        store: Arc<dyn ExpiredDeletion>,
        sessions: Arc<SessionManager>,
        deletion: DeletionSchedule,
    }

    impl App {
        /// Listens on `addr`, keeping sessions in `store`.
        pub(crate) async fn bind(addr: &str, store: Arc<dyn ExpiredDeletion>) -> io::Result<Self> {
            Ok(Self {
                listener: TcpListener::bind(addr).await?,
                sessions: Arc::new(visits::sessions(store.clone())),
                store,
                deletion: DeletionSchedule::new(Duration::from_secs(60)),
            })
        }

        /// Deletes expired sessions every `period` instead of every minute (the tests
        /// use it).
        #[allow(dead_code)]
        pub(crate) fn with_deletion_period(mut self, period: Duration) -> Self {
            self.deletion = DeletionSchedule::new(period);
            self
        }

        /// Returns the address the server listens on.
        pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
            self.listener.local_addr()
        }

        /// Serves connections, each on its own task on smol's executor, and deletes
        /// expired sessions on another, until `shutdown` completes; then stops
        /// accepting, stops the deletion loop and returns.
        pub(crate) async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
            let timer = AsyncIoTimer::new();
            let stop = timer.stop_handle();
            let deletion = {
                let (store, schedule) = (self.store.clone(), self.deletion.clone());
                smol::spawn(
                    async move { store.continuously_delete_expired(schedule, &timer).await },
                )
            };
            let accept = async {
                let mut pause = Duration::from_millis(10);
                loop {
                    match self.listener.accept().await {
                        Ok((stream, _)) => {
                            pause = Duration::from_millis(10);
                            smol::spawn(self.clone().connection(stream)).detach();
                        }
                        Err(err) => {
                            // Out of file descriptors, say: the connections being
                            // served free some. Wait, longer each time, and go on.
                            eprintln!("failed to accept a connection: {err}");
                            smol::Timer::after(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(1));
                        }
                    }
                }
            };
            smol::future::or(accept, shutdown).await;
            stop.stop();
            deletion.await;
            Ok(())
        }

        async fn connection(self, stream: TcpStream) {
            let service = service_fn(move |request| {
                let app = self.clone();
                async move { Ok::<_, Infallible>(app.serve(request).await) }
            });
            let served = http1::Builder::new()
                .timer(SmolTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(FuturesIo::new(stream), service)
                .await;
            if let Err(err) = served {
                eprintln!("connection failed: {err}");
            }
        }

        /// One request's whole session lifecycle.
        async fn serve(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
            let session = self.sessions.begin(request.headers().get_all(COOKIE));
            let method = request.method().as_str().to_owned();
            let path = request.uri().path().to_owned();

            let routed = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(body) => visits::route(&session, &method, &path, &body.to_bytes()).await,
                Err(err) if err.is::<LengthLimitError>() => Ok(visits::Reply {
                    status: 413,
                    body: "request body too large\n".to_owned(),
                }),
                Err(err) => Ok(visits::Reply {
                    status: 400,
                    body: format!("unreadable body: {err}\n"),
                }),
            };
            let finished = match routed {
                Ok(reply) => self
                    .sessions
                    .finish_response(&session)
                    .await
                    .map(|finished| (reply, finished)),
                Err(err) => Err(err),
            };
            let (reply, finished) = finished.unwrap_or_else(|err| {
                eprintln!("session store failed: {}", err.report());
                // 503 when the store is down: worth a retry.
                let reply = visits::Reply {
                    status: err.http_status(),
                    body: "the session store failed\n".to_owned(),
                };
                (reply, SessionResponse::default())
            });

            let mut response = Response::builder()
                .status(reply.status)
                .header(CONTENT_TYPE, "text/plain; charset=utf-8");
            // For caches in front of the server: the answer depends on the cookie,
            // and one that sets it is for this user only.
            if finished.needs_vary([]) {
                response = response.header(VARY, "cookie");
            }
            if let Some(value) = finished.cache_control(None) {
                response = response.header(CACHE_CONTROL, value);
            }
            if let Some(value) = finished.set_cookie {
                response = response.header(SET_COOKIE, value);
            }
            response
                .body(Full::new(Bytes::from(reply.body)))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"bad response\n"))))
        }
    }
}
