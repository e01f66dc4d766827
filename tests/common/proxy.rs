//! A TCP proxy in front of a real server that, on demand, forwards one request,
//! swallows its reply and closes the client's connection: a write that landed whose
//! reply was lost, as a server restart or a dropped connection leaves it.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

/// What the next matching request's reply is replaced by: `meanwhile` runs once the
/// server has answered, before the client's connection is closed.
struct Plan {
    matches: fn(&[u8]) -> bool,
    meanwhile: Box<dyn FnOnce() + Send>,
}

struct Shared {
    upstream: SocketAddr,
    /// Whether these bytes end a reply, so that the server is known to have answered.
    reply_done: fn(&[u8]) -> bool,
    plan: Mutex<Option<Plan>>,
    lost: AtomicUsize,
    stop: AtomicBool,
}

/// The proxy; it listens on a port the system picked, which no other test can take.
pub struct LossyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl LossyProxy {
    /// Starts a proxy to `upstream`; `reply_done` tells when bytes read from the
    /// server hold a whole reply.
    pub fn start(upstream: SocketAddr, reply_done: fn(&[u8]) -> bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            reply_done,
            plan: Mutex::new(None),
            lost: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(accepting.upstream) else {
                    continue;
                };
                relay(client, server, accepting.clone());
            }
        });
        Self { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Loses the reply of the next request whose bytes `matches`: it reaches the
    /// server, the server's whole reply is read and thrown away, `meanwhile` runs,
    /// and the client's connection is closed without a byte of it.
    pub fn lose_reply_of(
        &self,
        matches: fn(&[u8]) -> bool,
        meanwhile: impl FnOnce() + Send + 'static,
    ) {
        *self.shared.plan.lock().unwrap() = Some(Plan {
            matches,
            meanwhile: Box::new(meanwhile),
        });
    }

    /// How many replies were lost so far.
    pub fn lost(&self) -> usize {
        self.shared.lost.load(Ordering::SeqCst)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accepting thread
    }
}

/// Relays one connection both ways, on two threads.
fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    // The plan taken by a request of this connection, handed to the reply side.
    let taken: Arc<Mutex<Option<Plan>>> = Arc::default();
    let (mut from_client, mut to_server) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (requests, plan_shared) = (taken.clone(), shared.clone());
    std::thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let mut plan = plan_shared.plan.lock().unwrap();
                if plan.as_ref().is_some_and(|p| (p.matches)(&buf[..n])) {
                    *requests.lock().unwrap() = plan.take();
                }
            }
            if to_server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let (mut from_server, mut to_client) = (server, client);
    std::thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        let mut swallowed = Vec::new();
        loop {
            let n = match from_server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if taken.lock().unwrap().is_some() {
                swallowed.extend_from_slice(&buf[..n]);
                if (shared.reply_done)(&swallowed) {
                    let plan = taken.lock().unwrap().take().expect("taken");
                    (plan.meanwhile)();
                    shared.lost.fetch_add(1, Ordering::SeqCst);
                    let _ = to_client.shutdown(Shutdown::Both);
                    let _ = from_server.shutdown(Shutdown::Both);
                    return;
                }
                continue;
            }
            if to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(Shutdown::Both);
    });
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
