//! A blocking HTTP server with sessions: tiny_http on plain threads, with the `sync`
//! feature (every session call is an ordinary blocking call).
//!
//! ```text
//! cargo run --example http_blocking --features sync,sqlite,redis [-- ADDRESS [STORE]]
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=1 user=-
//! curl -c jar -b jar -d alice http://127.0.0.1:3000/login   # a new session id
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=2 user=alice
//! curl -c jar -b jar -X POST http://127.0.0.1:3000/logout   # the cookie is removed
//! ```
//!
//! It listens on ADDRESS (default `127.0.0.1:3000`; port 0 picks a free port), keeps
//! sessions in STORE (`memory`, the default; `sqlite:PATH`; or a `redis://` URL),
//! prints the address it bound as its first line, and stops on Ctrl-C. The application
//! itself is in `visits/mod.rs`, shared with `http_smol.rs`.

use std::{
    error::Error,
    io::{Read, Write},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use portable_sessions::{SessionManager, SessionStore};
use tiny_http::{Header, Request, Response, Server};

#[path = "visits/mod.rs"]
mod visits;

/// Requests are served by this many threads, so that requests on one session can
/// run at the same time.
const WORKERS: usize = 4;

/// The largest request body read, in bytes.
const MAX_BODY: u64 = 1024;

fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let addr = std::env::args().nth(1);
    let store = visits::open_store(std::env::args().nth(2).as_deref())?;
    let app = App::bind(addr.as_deref().unwrap_or("127.0.0.1:3000"), store)?;
    // The first line of output is the address, for scripts and tests to read.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", app.local_addr())?;
    stdout.flush()?;
    drop(stdout);

    let stopper = app.stopper();
    ctrlc::set_handler(move || stopper.stop())?;
    app.run();
    eprintln!("stopped");
    Ok(())
}

/// The server: an HTTP listener and the session manager.
pub(crate) struct App {
    server: Arc<Server>,
    sessions: SessionManager,
    stopping: Arc<AtomicBool>,
}

/// Stops a running [`App`] from another thread.
pub(crate) struct Stopper {
    server: Arc<Server>,
    stopping: Arc<AtomicBool>,
}

impl App {
    /// Listens on `addr`, keeping sessions in `store`.
    pub(crate) fn bind(
        addr: &str,
        store: impl SessionStore,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        Ok(Self {
            server: Arc::new(Server::http(addr)?),
            sessions: visits::sessions(store),
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Returns the address the server listens on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        let addr = self.server.server_addr().to_ip();
        addr.expect("bound to an IP address, not a Unix socket")
    }

    /// Returns a handle that stops the server.
    pub(crate) fn stopper(&self) -> Stopper {
        Stopper {
            server: self.server.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// Serves requests until stopped; requests already received are answered first.
    pub(crate) fn run(self) {
        std::thread::scope(|scope| {
            for _ in 0..WORKERS {
                scope.spawn(|| self.work());
            }
        });
    }

    fn work(&self) {
        loop {
            match self.server.recv() {
                Ok(request) => self.serve(request),
                Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                Err(err) => eprintln!("failed to receive a request: {err}"),
            }
        }
    }

    /// One request's whole session lifecycle.
    fn serve(&self, mut request: Request) {
        let cookies = request
            .headers()
            .iter()
            .filter(|h| h.field.equiv("Cookie"))
            .map(|h| h.value.as_str());
        let session = self.sessions.begin(cookies);

        let mut body = Vec::new();
        let read = request.as_reader().take(MAX_BODY).read_to_end(&mut body);
        let method = request.method().as_str().to_owned();
        let routed = match read {
            Ok(_) => visits::route(&session, &method, request.url(), &body),
            Err(err) => Ok(visits::Reply {
                status: 400,
                body: format!("unreadable body: {err}\n"),
            }),
        };
        let (reply, set_cookie) = match routed.and_then(|reply| {
            let set_cookie = self.sessions.finish(&session)?;
            Ok((reply, set_cookie))
        }) {
            Ok(done) => done,
            Err(err) => {
                eprintln!("session store failed: {}", err.report());
                let reply = visits::Reply {
                    status: 500,
                    body: "internal error\n".to_owned(),
                };
                (reply, None)
            }
        };

        let mut response = Response::from_string(reply.body)
            .with_status_code(reply.status)
            .with_header(header("Content-Type", "text/plain; charset=utf-8"));
        if let Some(value) = set_cookie {
            response.add_header(header("Set-Cookie", &value));
        }
        if let Err(err) = request.respond(response) {
            eprintln!("failed to send a response: {err}");
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    // Both are ASCII without line breaks, which is all that `from_bytes` checks.
    Header::from_bytes(name, value).expect("a valid header")
}

impl Stopper {
    /// Stops accepting requests; [`App::run`] returns once the workers finish the
    /// requests they have.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Each call wakes one worker.
        for _ in 0..WORKERS {
            self.server.unblock();
        }
    }
}
