//! What a hostile or broken server can do to the network stores, in both modes:
//! servers of the test's own, written here, that answer with replies too long to
//! buffer, lines that never end, authentication that skips its proof or asks for
//! endless work, and that ask for passwords in clear text from another machine.
//! Each must fail the operation promptly with an error that says why, and a
//! password must never reach a server that it was not meant for.
#![cfg(any(feature = "redis", feature = "postgres"))]

mod common;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use portable_sessions::{session::Id, SessionStore};

/// A server that runs `script` on each connection it accepts, and keeps every byte
/// each connection sent.
struct FakeServer {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
}

impl FakeServer {
    fn start(ip: IpAddr, script: Script) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("a free port");
        let addr = listener.local_addr().expect("bound");
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut conn = Conn { stream, seen };
                    let _ = script(&mut conn);
                    conn.drain();
                });
            }
        });
        Self { addr, received }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

/// What a fake server does on one connection.
type Script = fn(&mut Conn) -> std::io::Result<()>;

/// One connection to a fake server, keeping what the client sent.
struct Conn {
    stream: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Conn {
    /// Reads at least `n` bytes, or what comes before the connection ends.
    fn read_some(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        self.stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while out.len() < n {
            let got = self.stream.read(&mut buf)?;
            if got == 0 {
                break;
            }
            out.extend_from_slice(&buf[..got]);
        }
        self.seen.lock().unwrap().extend_from_slice(&out);
        Ok(out)
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads what is left into the record once the script is done.
    fn drain(&mut self) {
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(300)));
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            self.seen.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    }
}

/// This machine's address on its network (not loopback), if it has one: a server
/// there is "another machine" to the stores, which judge by the peer's address.
fn network_address() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // No packet is sent: connecting a UDP socket only picks the route.
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// [`network_address`], which these tests need to play another machine: a machine
/// without one fails them, unless `PORTABLE_SESSIONS_NO_NETWORK=1` says to skip that
/// half knowingly.
fn remote_address() -> Option<IpAddr> {
    let ip = network_address();
    if ip.is_none() {
        assert!(
            std::env::var("PORTABLE_SESSIONS_NO_NETWORK").as_deref() == Ok("1"),
            "this machine has no network address besides loopback, which these tests \
             need to play another machine; set PORTABLE_SESSIONS_NO_NETWORK=1 to skip them"
        );
        eprintln!("skipped: no network address besides loopback");
    }
    ip
}

const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Runs `operation`, which must fail within a few seconds (the stores' timeout is
/// longer, so an error that comes from waiting out a timeout does not pass), with an
/// error whose report contains `expected`.
fn fails_promptly(what: &str, expected: &str, operation: impl FnOnce() -> Result<(), String>) {
    let started = Instant::now();
    let err = operation().expect_err(what);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{what}: took {:?}",
        started.elapsed()
    );
    assert!(err.contains(expected), "{what}: {err}");
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use portable_sessions::RedisStore;

    fn load(url: &str) -> Result<(), String> {
        load_within(url, Duration::from_secs(20))
    }

    fn load_within(url: &str, timeout: Duration) -> Result<(), String> {
        let store = RedisStore::new(url)
            .map_err(|err| err.report())?
            .with_timeout(timeout);
        common::block(store.load(&Id::default()))
            .map(|_| ())
            .map_err(|err| err.report())
    }

    /// Answers every command, `GET` with `reply`.
    fn answering(stream: &mut Conn, reply: &[u8]) -> std::io::Result<()> {
        loop {
            let got = stream.read_some(1)?;
            if got.is_empty() {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&got);
            for command in text.split('*').skip(1) {
                let answer: &[u8] = if command.contains("$3\r\nGET\r\n") {
                    reply
                } else {
                    b"+OK\r\n"
                };
                stream.write_all(answer)?;
            }
        }
    }

    #[test]
    fn a_reply_too_long_to_buffer_is_refused_from_its_length() {
        let server = FakeServer::start(LOOPBACK, |stream| answering(stream, b"$100000000\r\n"));
        fails_promptly("a 100 MB bulk string", "more than", || {
            load(&format!("redis://{}", server.addr))
        });
        let server = FakeServer::start(LOOPBACK, |stream| {
            let mut endless = b"+".to_vec();
            endless.resize(100 * 1024, b'a');
            answering(stream, &endless)
        });
        fails_promptly("a line that never ends", "without its end", || {
            load(&format!("redis://{}", server.addr))
        });
    }

    /// A reply that trickles in a byte at a time is due within the timeout all the
    /// same: each read waiting less than the timeout does not make it last longer.
    #[test]
    fn a_trickling_reply_is_due_within_the_timeout() {
        let server = FakeServer::start(LOOPBACK, |stream| {
            stream.read_some(1)?;
            for &byte in b"+OKOKOKOKOKOKOKOKOKOKOKOK\r\n" {
                stream.write_all(&[byte])?;
                std::thread::sleep(Duration::from_millis(250));
            }
            Ok(())
        });
        let started = Instant::now();
        let err = load_within(
            &format!("redis://:pw@{}", server.addr),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.contains("in time"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_password_goes_in_clear_text_only_on_this_machine_or_when_asked() {
        // On loopback, AUTH goes as always.
        let server = FakeServer::start(LOOPBACK, |stream| answering(stream, b"$-1\r\n"));
        load(&format!("redis://:s3cret@{}", server.addr)).expect("loads");
        let seen = String::from_utf8_lossy(&server.received()).into_owned();
        assert!(seen.contains("AUTH") && seen.contains("s3cret"), "{seen}");

        let Some(ip) = remote_address() else {
            return;
        };
        let server = FakeServer::start(ip, |stream| answering(stream, b"$-1\r\n"));
        fails_promptly("AUTH to another machine", "insecure_auth=true", || {
            load(&format!("redis://:s3cret@{}", server.addr))
        });
        let seen = String::from_utf8_lossy(&server.received()).into_owned();
        assert!(
            !seen.contains("s3cret"),
            "the password never went out: {seen}"
        );
        let err = load(&format!("redis://:s3cret@{}", server.addr)).unwrap_err();
        assert!(!err.contains("s3cret"), "nor is it in the error: {err}");

        load(&format!(
            "redis://:s3cret@{}?insecure_auth=true",
            server.addr
        ))
        .expect("asked for by name");
        let seen = String::from_utf8_lossy(&server.received()).into_owned();
        assert!(seen.contains("s3cret"), "{seen}");
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use portable_sessions::PostgresStore;

    fn load(url: &str) -> Result<(), String> {
        load_within(url, Duration::from_secs(20))
    }

    fn load_within(url: &str, timeout: Duration) -> Result<(), String> {
        let store = PostgresStore::new(url)
            .map_err(|err| err.report())?
            .with_timeout(timeout);
        common::block(store.load(&Id::default()))
            .map(|_| ())
            .map_err(|err| err.report())
    }

    /// A backend message: its tag, its length, its body.
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// An authentication request of this code, with this payload.
    fn auth(code: i32, payload: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(payload);
        message(b'R', &body)
    }

    /// A frontend's SSLRequest: its length (8) and code (80877103).
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    /// Reads the startup message (its length first), after declining TLS (`N`) if the
    /// client asks for it first, as a server without TLS does.
    fn startup(stream: &mut Conn) -> std::io::Result<()> {
        let mut got = stream.read_some(8)?;
        if got.len() >= 8 && got[..8] == SSL_REQUEST {
            stream.write_all(b"N")?;
            got.drain(..8);
            if got.len() < 4 {
                got.extend(stream.read_some(4 - got.len())?);
            }
        }
        let len = i32::from_be_bytes([got[0], got[1], got[2], got[3]]) as usize;
        if got.len() < len {
            stream.read_some(len - got.len())?;
        }
        Ok(())
    }

    /// Reads the client's SSLRequest and agrees to TLS with `S`.
    fn agree_to_tls(stream: &mut Conn) -> std::io::Result<()> {
        stream.read_some(8)?;
        stream.write_all(b"S")
    }

    /// Bytes sent after the `S` came unencrypted, where anyone could have put them:
    /// the handshake is refused.
    #[test]
    fn bytes_before_the_handshake_are_refused() {
        let server = FakeServer::start(LOOPBACK, |stream| {
            stream.read_some(8)?;
            // One write, so that the client reads the `S` and what follows at once.
            stream.write_all(b"SR\0\0\0\x08\0\0\0\0")
        });
        fails_promptly("data after the S", "before the TLS handshake", || {
            load(&format!("postgres://u@{}/d?sslmode=require", server.addr))
        });
    }

    /// A handshake the server never finishes is due within the timeout.
    #[test]
    fn a_handshake_never_finished_is_due_within_the_timeout() {
        let server = FakeServer::start(LOOPBACK, |stream| {
            agree_to_tls(stream)?;
            stream.read_some(1)?;
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        });
        let started = Instant::now();
        let url = format!("postgres://u@{}/d?sslmode=require", server.addr);
        let err = load_within(&url, Duration::from_millis(500)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert!(err.contains("starting TLS"), "{err}");
    }

    /// A TLS server that sends session tickets without end, and never a byte of
    /// data: the client stops at 64 KiB of them instead of spinning on them.
    #[test]
    #[allow(deprecated)] // ring's provider, as the stores'
    fn records_without_data_are_bounded() {
        let server = FakeServer::start(LOOPBACK, |stream| {
            use portable_sessions::rustls;
            agree_to_tls(stream)?;
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap();
            config.send_tls13_tickets = 2_000;
            let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            let mut socket = stream.stream.try_clone()?;
            while conn.is_handshaking() {
                conn.complete_io(&mut socket)?;
            }
            while conn.wants_write() {
                conn.write_tls(&mut socket)?;
            }
            std::thread::sleep(Duration::from_secs(5));
            Ok(())
        });
        // rustls refuses a flight this large itself; sent a ticket at a time, the
        // store's own bound ends it.
        let started = Instant::now();
        let url = format!("postgres://u@{}/d?sslmode=require", server.addr);
        let err = load(&url).expect_err("2,000 session tickets");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert!(
            err.contains("without data") || err.contains("message buffer full"),
            "{err}"
        );
    }

    /// A certificate authority, and a certificate it signed for this machine's
    /// network address and its key, made once per run for the TLS servers below.
    #[allow(deprecated)] // ring's provider, as the stores'
    fn tls_server() -> &'static (String, Arc<portable_sessions::rustls::ServerConfig>) {
        use portable_sessions::rustls;
        static SERVER: std::sync::OnceLock<(String, Arc<rustls::ServerConfig>)> =
            std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca.self_signed(&ca_key).unwrap();
            let mut names = vec!["localhost".to_owned()];
            names.extend(network_address().map(|ip| ip.to_string()));
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap();
            (ca.pem(), Arc::new(config))
        })
    }

    /// Over TLS, whether verified or not, a server on another machine asks for the
    /// password in clear text: it goes only to a server whose certificate was
    /// checked, since over TLS to whoever answers (`sslmode=require`) anyone on the
    /// path could be answering.
    #[test]
    fn a_password_goes_over_tls_only_to_a_verified_server() {
        fn asks_in_clear_over_tls(stream: &mut Conn) -> std::io::Result<()> {
            use portable_sessions::rustls;
            agree_to_tls(stream)?;
            let conn = rustls::ServerConnection::new(tls_server().1.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, stream.stream.try_clone()?);
            let mut len = [0u8; 4];
            tls.read_exact(&mut len)?;
            let mut startup = vec![0; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
            tls.read_exact(&mut startup)?;
            tls.write_all(&auth(3, b""))?;
            let mut reply = [0u8; 256];
            let n = tls.read(&mut reply)?;
            stream.seen.lock().unwrap().extend_from_slice(&reply[..n]);
            let mut error = b"SFATAL\0C28P01\0Mpassword authentication failed\0".to_vec();
            error.push(0);
            tls.write_all(&message(b'E', &error))?;
            tls.flush()
        }
        let Some(ip) = remote_address() else { return };
        let server = FakeServer::start(ip, asks_in_clear_over_tls);
        let url = format!("postgres://app:s3cret@{}/db", server.addr);
        let err = load(&format!("{url}?sslmode=require")).unwrap_err();
        assert!(err.contains("not verified"), "{err}");
        let seen = String::from_utf8_lossy(&server.received()).into_owned();
        assert!(
            !seen.contains("s3cret"),
            "the password never went out: {seen}"
        );

        let dir = common::TempDir::new("hostile-ca");
        let ca = dir.0.join("ca.crt");
        std::fs::write(&ca, &tls_server().0).unwrap();
        let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
        let err = load(&verified).unwrap_err();
        assert!(err.contains("password authentication failed"), "{err}");
        let seen = String::from_utf8_lossy(&server.received()).into_owned();
        assert!(
            seen.contains("s3cret"),
            "sent to the verified server: {seen}"
        );
    }

    /// Answers an SSLRequest with `answer` and ends that connection; answers a
    /// startup message with an error that says plain text reached the server.
    fn tls_then_plain(stream: &mut Conn, answer: &[u8]) -> std::io::Result<()> {
        let got = stream.read_some(8)?;
        if got[..8] == SSL_REQUEST {
            return stream.write_all(answer);
        }
        let mut error = b"SFATAL\0C28000\0Mrole reached in plain text\0".to_vec();
        error.push(0);
        stream.write_all(&message(b'E', &error))
    }

    /// libpq's fallbacks: `prefer` goes on without TLS when the handshake fails;
    /// `allow`, refused without TLS, tries with it, and reports the first refusal
    /// when that fails too; `require` never goes without.
    #[test]
    fn prefer_and_allow_fall_back_as_in_libpq() {
        // `S`, then the connection ends: the handshake fails.
        let server = FakeServer::start(LOOPBACK, |stream| tls_then_plain(stream, b"S"));
        let url = |mode: &str| format!("postgres://u@{}/d?sslmode={mode}", server.addr);
        let err = load(&url("prefer")).unwrap_err();
        assert!(err.contains("role reached in plain text"), "{err}");
        let err = load(&url("require")).unwrap_err();
        assert!(err.contains("starting TLS"), "{err}");

        let server = FakeServer::start(LOOPBACK, |stream| tls_then_plain(stream, b"N"));
        let url = format!("postgres://u@{}/d?sslmode=allow", server.addr);
        let err = load(&url).unwrap_err();
        assert!(err.contains("role reached in plain text"), "{err}");
    }

    /// One request's messages, tag and body, up to its end: a Sync, or a simple
    /// Query (which is a request alone). `buf` keeps what was read past it.
    fn request(stream: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<Vec<(u8, Vec<u8>)>> {
        let mut messages = Vec::new();
        loop {
            let mut fill = |buf: &mut Vec<u8>, n: usize| -> std::io::Result<()> {
                while buf.len() < n {
                    let more = stream.read_some(1)?;
                    if more.is_empty() {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    buf.extend(more);
                }
                Ok(())
            };
            fill(buf, 5)?;
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            fill(buf, 1 + len)?;
            let tag = buf[0];
            let body = buf[5..1 + len].to_vec();
            buf.drain(..1 + len);
            messages.push((tag, body));
            if tag == b'S' || tag == b'Q' {
                return Ok(messages);
            }
        }
    }

    /// A data row of text columns.
    fn row(columns: &[&[u8]]) -> Vec<u8> {
        let mut body = (columns.len() as i16).to_be_bytes().to_vec();
        for column in columns {
            body.extend_from_slice(&(column.len() as i32).to_be_bytes());
            body.extend_from_slice(column);
        }
        message(b'D', &body)
    }

    /// A server whose server connections do not keep what a connection prepared, as
    /// a pooler in transaction mode hands each request another: it answers a bind of
    /// a statement prepared by name with `26000` (no such statement), and any other
    /// request as done. It notes each request's kind among what it received.
    fn forgets_prepared_statements(stream: &mut Conn) -> std::io::Result<()> {
        startup(stream)?;
        stream.write_all(&auth(0, b""))?;
        stream.write_all(&message(b'Z', b"I"))?;
        let mut buf = Vec::new();
        loop {
            let messages = request(stream, &mut buf)?;
            let named_bind = messages.iter().any(|(tag, body)| {
                // A bind's body: the portal's name, then the statement's.
                let mut names = body.split(|&b| b == 0);
                *tag == b'B' && names.nth(1).is_some_and(|name| !name.is_empty())
            });
            let named_parse = messages
                .iter()
                .any(|(tag, body)| *tag == b'P' && body[0] != 0);
            let kind: &[u8] = match (messages[0].0, named_parse, named_bind) {
                (b'Q', ..) => b"[query]",
                (_, true, _) => b"[prepare]",
                (_, false, true) => b"[named]",
                _ => b"[unnamed]",
            };
            stream.seen.lock().unwrap().extend_from_slice(kind);
            let mut reply = Vec::new();
            if kind == b"[query]" {
                // The table's check: it, its schema and its owner column exist.
                reply.extend(row(&[b""]));
                reply.extend(message(b'C', b"SELECT 1\0"));
                reply.extend(row(&[b"t", b"t", b"t"]));
                reply.extend(message(b'C', b"SELECT 1\0"));
            } else if kind == b"[named]" {
                let mut error = b"SERROR\0C26000\0Mprepared statement does not exist\0".to_vec();
                error.push(0);
                reply.extend(message(b'E', &error));
            } else {
                for (tag, _) in &messages {
                    match tag {
                        b'P' => reply.extend(message(b'1', b"")),
                        b'B' => reply.extend(message(b'2', b"")),
                        b'E' => reply.extend(message(b'C', b"DELETE 1\0")),
                        _ => {}
                    }
                }
            }
            reply.extend(message(b'Z', b"I"));
            stream.write_all(&reply)?;
        }
    }

    /// A request that finds its prepared statement missing ran nothing, and runs
    /// again with its statements whole; the store sends them whole from then on.
    #[test]
    fn statements_go_whole_once_a_server_lacks_a_prepared_one() {
        let server = FakeServer::start(LOOPBACK, forgets_prepared_statements);
        let url = format!("postgres://u@{}/d?sslmode=disable", server.addr);
        let store = PostgresStore::new(&url)
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        common::block(store.delete(&Id::default())).unwrap();
        common::block(store.delete(&Id::default())).unwrap();
        let seen = server.received();
        let kinds: Vec<&str> = ["[query]", "[prepare]", "[named]", "[unnamed]"]
            .into_iter()
            .flat_map(|kind| {
                seen.windows(kind.len())
                    .enumerate()
                    .filter(move |(_, w)| *w == kind.as_bytes())
                    .map(move |(at, _)| (at, kind))
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_values()
            .collect();
        assert_eq!(
            kinds,
            ["[query]", "[prepare]", "[named]", "[unnamed]", "[unnamed]"],
            "prepared and refused once, then whole"
        );
    }

    /// A reply that trickles in a byte at a time is due within the timeout all the
    /// same.
    #[test]
    fn a_trickling_reply_is_due_within_the_timeout() {
        let server = FakeServer::start(LOOPBACK, |stream| {
            startup(stream)?;
            let mut notice = b"SNOTICE\0C00000\0M".to_vec();
            notice.extend_from_slice(&[b'x'; 32]);
            notice.extend_from_slice(b"\0\0");
            for byte in message(b'N', &notice) {
                stream.write_all(&[byte])?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        let started = Instant::now();
        let err = load_within(
            &format!("postgres://app@{}/db", server.addr),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.contains("in time"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_message_too_long_to_buffer_is_refused_from_its_length() {
        let server = FakeServer::start(LOOPBACK, |stream| {
            startup(stream)?;
            let mut header = vec![b'R'];
            header.extend_from_slice(&i32::MAX.to_be_bytes());
            stream.write_all(&header)?;
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        });
        fails_promptly("a 2 GB message", "more than", || {
            load(&format!("postgres://app@{}/db", server.addr))
        });
    }

    #[test]
    fn scram_completes_only_with_the_servers_proof_and_bounded_work() {
        // The server skips its proof: whoever it is, it does not know the password.
        let server = FakeServer::start(LOOPBACK, |stream| {
            startup(stream)?;
            stream.write_all(&auth(10, b"SCRAM-SHA-256\0\0"))?;
            stream.read_some(1)?;
            stream.write_all(&auth(0, b""))?;
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        });
        fails_promptly(
            "AuthenticationOk without the proof",
            "without proving",
            || load(&format!("postgres://app:pw@{}/db", server.addr)),
        );

        // The server asks for a hundred million iterations.
        let server = FakeServer::start(LOOPBACK, |stream| {
            startup(stream)?;
            stream.write_all(&auth(10, b"SCRAM-SHA-256\0\0"))?;
            let first = stream.read_some(1)?;
            let text = String::from_utf8_lossy(&first).into_owned();
            let nonce = text
                .split("r=")
                .nth(1)
                .unwrap_or_default()
                .trim_end_matches('\0')
                .to_owned();
            let server_first = format!("r={nonce}srv,s=QSXCR+Q6sek8bf92,i=100000000");
            stream.write_all(&auth(11, server_first.as_bytes()))?;
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        });
        fails_promptly("100,000,000 SCRAM iterations", "iterations", || {
            load(&format!("postgres://app:pw@{}/db", server.addr))
        });
    }

    #[test]
    fn a_password_goes_in_clear_text_only_on_this_machine_or_when_asked() {
        fn asks_in_clear(stream: &mut Conn) -> std::io::Result<()> {
            startup(stream)?;
            stream.write_all(&auth(3, b""))?;
            stream.read_some(1)?;
            // Then refuse, as a server whose password check failed.
            let mut error = b"SFATAL\0C28P01\0Mpassword authentication failed\0".to_vec();
            error.push(0);
            stream.write_all(&message(b'E', &error))
        }
        // On loopback the password goes, as the server asks.
        let server = FakeServer::start(LOOPBACK, asks_in_clear);
        let err = load(&format!("postgres://app:s3cret@{}/db", server.addr)).unwrap_err();
        assert!(err.contains("password authentication failed"), "{err}");
        assert!(String::from_utf8_lossy(&server.received()).contains("s3cret"));

        let Some(ip) = remote_address() else {
            return;
        };
        fn asks_for_md5(stream: &mut Conn) -> std::io::Result<()> {
            startup(stream)?;
            stream.write_all(&auth(5, b"salt"))?;
            stream.read_some(1)?;
            Ok(())
        }
        for (script, method) in [
            (asks_in_clear as Script, "password"),
            (asks_for_md5 as Script, "md5"),
        ] {
            let server = FakeServer::start(ip, script);
            fails_promptly(method, &format!("require_auth={method}"), || {
                load(&format!("postgres://app:s3cret@{}/db", server.addr))
            });
            // The startup message is all the server got: no password, no hash.
            let seen = String::from_utf8_lossy(&server.received()).into_owned();
            assert!(
                !seen.contains("s3cret") && !seen.contains("md5"),
                "{method}: {seen}"
            );
        }
        // Named in require_auth, it goes.
        let server = FakeServer::start(ip, asks_in_clear);
        let err = load(&format!(
            "postgres://app:s3cret@{}/db?require_auth=password",
            server.addr
        ))
        .unwrap_err();
        assert!(err.contains("password authentication failed"), "{err}");
        assert!(String::from_utf8_lossy(&server.received()).contains("s3cret"));
    }
}

/// An error about a URL never repeats the credentials in it: errors end up in logs.
#[test]
fn url_errors_never_echo_credentials() {
    let mut urls: Vec<(&str, String)> = Vec::new();
    #[cfg(feature = "postgres")]
    for url in [
        "postgres://u:hunter2@h:bad/d",
        "postgres://u:hunter2@h/d?nope=1",
        "postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=/no/such/ca.pem",
        "postgres://u:hunter2@h/d?sslsni=hunter2",
        "postgres://u:hunter2@h/d?sslcert=/c.pem",
        "postgres://u:hunter2@h/d%zz",
        "postgres://u:hunter2@h/d?require_auth=hunter2",
        "postgres://u@h/d?password=hunter2&port=0",
        // No `@host`: the password stands where the port would.
        "postgres://u:hunter2/d",
        // Unencoded `?` and `&` in the password.
        "postgres://app:pa?hunter2@db/app",
        "postgres://app@db/app?password=ab&hunter2",
        "postgres://app@db/app?sslmode=hunter2",
    ] {
        let err = portable_sessions::PostgresStore::new(url).unwrap_err();
        urls.push((url, err.report()));
    }
    #[cfg(feature = "redis")]
    for url in [
        "redis://:hunter2@h:bad",
        "redis://u:hunter2@h/x",
        "redis://:hunter2@h?nope=1",
        "redis://:hunter2@h?insecure_auth=maybe",
        "rediss://:hunter2@h?insecure=hunter2",
        "rediss://:hunter2@h?cacert=/no/such/ca.pem",
        "redis://:hunter2@h?cacert=/ca.pem",
        "redis://u:hunter2",
        "redis://:pa?hunter2@h",
        "redis://:x@h?pass=ab&hunter2",
        "u:hunter2@h://x",
    ] {
        let err = portable_sessions::RedisStore::new(url).unwrap_err();
        urls.push((url, err.report()));
    }
    for (url, report) in urls {
        assert!(!report.contains("hunter2"), "{url}: {report}");
    }
}
