//! A blocking HTTP server with sessions, on plain threads, with the `sync` feature
//! (every session call is an ordinary blocking call).
//!
//! ```text
//! cargo run --example http_blocking --features sync,sqlite,redis,postgres [-- ADDRESS [STORE]]
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=1 user=-
//! curl -c jar -b jar -d alice http://127.0.0.1:3000/login   # a new session id
//! curl -c jar -b jar http://127.0.0.1:3000/                 # visits=2 user=alice
//! curl -c jar -b jar -X POST http://127.0.0.1:3000/logout   # the cookie is removed
//! ```
//!
//! It listens on ADDRESS (default `127.0.0.1:3000`; port 0 picks a free port), keeps
//! sessions in STORE (`memory`, the default; `sqlite:PATH`; a `redis://` URL; or a
//! `postgres://` URL),
//! deletes expired sessions every minute on a thread of its own, prints the address
//! it bound as its first line, and stops on Ctrl-C. The application itself is in
//! `visits/mod.rs`, shared with `http_smol.rs`.
//!
//! The HTTP part is the smallest server that is safe to face a network with: a
//! thread per connection (at most 256 at once, so slow clients cannot exhaust the
//! others), read and write timeouts, header and body size limits (431, 413), header
//! values taken as bytes (a cookie that is not ASCII is skipped, not fatal), and one
//! request per connection (`Connection: close`). A real application puts its
//! framework's server here; the session calls stay the same.

use std::{
    error::Error,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use portable_sessions::{DeletionSchedule, ExpiredDeletion, SessionManager, ThreadTimer};

#[path = "visits/mod.rs"]
mod visits;

/// The most connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send its request, or to take the response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head (request line and headers), in bytes.
const MAX_HEAD: usize = 8 * 1024;

/// The largest request body read, in bytes.
const MAX_BODY: usize = 1024;

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

/// The server: a listener, the session manager, and the deletion loop's store.
pub(crate) struct App {
    listener: TcpListener,
    store: Arc<dyn ExpiredDeletion>,
    sessions: SessionManager,
    deletion: DeletionSchedule,
    deletion_timer: ThreadTimer,
    stopping: Arc<AtomicBool>,
}

/// Stops a running [`App`] from another thread (a signal handler, a test).
pub(crate) struct Stopper {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    deletion_timer: ThreadTimer,
}

impl App {
    /// Listens on `addr`, keeping sessions in `store`.
    pub(crate) fn bind(
        addr: &str,
        store: Arc<dyn ExpiredDeletion>,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        Ok(Self {
            listener: TcpListener::bind(addr)?,
            sessions: visits::sessions(store.clone()),
            store,
            deletion: DeletionSchedule::new(Duration::from_secs(60)),
            deletion_timer: ThreadTimer::new(),
            stopping: Arc::new(AtomicBool::new(false)),
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
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener")
    }

    /// Returns a handle that stops the server.
    pub(crate) fn stopper(&self) -> Stopper {
        Stopper {
            addr: self.local_addr(),
            stopping: self.stopping.clone(),
            deletion_timer: self.deletion_timer.clone(),
        }
    }

    /// Serves connections until stopped; connections already accepted are served
    /// first, and the deletion loop ends too.
    pub(crate) fn run(self) {
        let open = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                self.store
                    .continuously_delete_expired(self.deletion.clone(), &self.deletion_timer)
            });
            for stream in self.listener.incoming() {
                if self.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(err) => {
                        // Out of file descriptors, say: wait a moment and go on.
                        eprintln!("failed to accept a connection: {err}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = respond(&stream, 503, "too many connections\n", None);
                    continue;
                }
                let (app, open) = (&self, &open);
                scope.spawn(move || {
                    app.connection(stream);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            self.deletion_timer.stop_handle().stop();
        });
    }

    /// Reads one request, serves it, answers, and closes the connection.
    fn connection(&self, stream: TcpStream) {
        let timeouts = stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
        if let Err(err) = timeouts {
            eprintln!("failed to set socket timeouts: {err}");
            return;
        }
        let mut reader = BufReader::new(&stream);
        let request = match read_request(&mut reader) {
            Ok(request) => request,
            Err(Refused::Status(status, why)) => {
                let _ = respond(&stream, status, why, None);
                // Closing with unread input would reset the connection, and the client
                // could lose the answer: read a little of what it still sends first.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = std::io::copy(&mut reader.take(64 * 1024), &mut std::io::sink());
                return;
            }
            // The client left (nothing to report) or stalled: nobody to answer.
            Err(Refused::Io(err)) => {
                if err.kind() != std::io::ErrorKind::UnexpectedEof {
                    eprintln!("dropped a connection before a full request: {err}");
                }
                return;
            }
        };
        let (status, body, set_cookie) = self.serve(&request);
        if let Err(err) = respond(&stream, status, &body, set_cookie.as_deref()) {
            eprintln!("failed to send a response: {err}");
        }
    }

    /// One request's whole session lifecycle: `begin`, the application, `finish`.
    fn serve(&self, request: &Request) -> (u16, String, Option<String>) {
        let session = self.sessions.begin(&request.cookies);
        let routed = visits::route(&session, &request.method, &request.target, &request.body);
        match routed.and_then(|reply| Ok((reply, self.sessions.finish(&session)?))) {
            Ok((reply, set_cookie)) => (reply.status, reply.body, set_cookie),
            Err(err) => {
                eprintln!("session store failed: {}", err.report());
                // 503 when the store is down: worth a retry.
                (
                    err.http_status(),
                    "the session store failed\n".to_owned(),
                    None,
                )
            }
        }
    }
}

impl Stopper {
    /// Stops accepting connections; [`App::run`] returns once the connections it
    /// has are served.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.deletion_timer.stop_handle().stop();
        // Wake the accept loop with a connection of our own.
        let _ = TcpStream::connect(self.addr);
    }
}

/// What the server needs of a request.
struct Request {
    method: String,
    target: String,
    /// The `Cookie` header values, as the client sent them (not always ASCII).
    cookies: Vec<Vec<u8>>,
    body: Vec<u8>,
}

/// Why a request is not served.
enum Refused {
    /// Answer with this status and text.
    Status(u16, &'static str),
    /// The connection failed or timed out.
    Io(std::io::Error),
}

impl From<std::io::Error> for Refused {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err)
    }
}

/// Reads a request head (at most [`MAX_HEAD`] bytes) and its body (at most
/// [`MAX_BODY`] bytes, by `Content-Length`).
fn read_request(reader: &mut impl BufRead) -> Result<Request, Refused> {
    let mut head_len = 0;
    let mut line = Vec::new();
    let mut next_line = |reader: &mut dyn BufRead, line: &mut Vec<u8>| -> Result<(), Refused> {
        line.clear();
        let limit = (MAX_HEAD + 1 - head_len.min(MAX_HEAD)) as u64;
        let read = reader.take(limit).read_until(b'\n', line)?;
        head_len += read;
        if read == 0 {
            return Err(Refused::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if head_len > MAX_HEAD || !line.ends_with(b"\n") {
            return Err(Refused::Status(431, "request head too large\n"));
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        Ok(())
    };

    next_line(reader, &mut line)?;
    let text =
        std::str::from_utf8(&line).map_err(|_| Refused::Status(400, "bad request line\n"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::Status(400, "bad request line\n"));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(Refused::Status(400, "bad request line\n"));
    }
    let (method, target) = (method.to_owned(), target.to_owned());

    let mut cookies = Vec::new();
    let mut length = 0usize;
    loop {
        next_line(reader, &mut line)?;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Err(Refused::Status(400, "bad header line\n"));
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"cookie") {
            cookies.push(value.to_vec());
        } else if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or(Refused::Status(400, "bad Content-Length\n"))?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(Refused::Status(411, "send a Content-Length\n"));
        }
    }
    if length > MAX_BODY {
        return Err(Refused::Status(413, "request body too large\n"));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Request {
        method,
        target,
        cookies,
        body,
    })
}

/// Writes a whole response and ends the connection.
fn respond(
    mut stream: &TcpStream,
    status: u16,
    body: &str,
    set_cookie: Option<&str>,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(value) = set_cookie {
        head.push_str(&format!("Set-Cookie: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}
