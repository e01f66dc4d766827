//! What the network stores (Redis, PostgreSQL) share: a socket driven by its callers
//! (blocking in sync mode, on async-io's reactor in async mode) with a timeout on every
//! wait, and URL parsing helpers.
//!
//! No driver task and no runtime: the threads or tasks that run operations write their
//! requests and read the replies themselves, so an operation costs one round trip and
//! no hand-off to a thread of the store's own.

use std::{fmt, io, path::PathBuf, time::Duration};

use bytes::BytesMut;

use crate::session_store::{Error, Result};

/// How much one read asks the socket for.
const READ_CHUNK: usize = 16 * 1024;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Address {
    /// A host name or IP address, and a port.
    Tcp(String, u16),
    /// A Unix socket's path.
    #[cfg(unix)]
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(host, port) if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp(host, port) => write!(f, "{host}:{port}"),
            #[cfg(unix)]
            Self::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Decodes a URL part's `%XX` escapes; `what` names the URL kind in errors.
pub(crate) fn percent_decode(text: &str, what: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    Error::backend(format!(
                        "invalid {what} URL: a `%` is not followed by two hexadecimal digits"
                    ))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        Error::backend(format!(
            "invalid {what} URL: a percent-encoded part is not UTF-8"
        ))
    })
}

/// Parses a port: 1 to 65535.
pub(crate) fn parse_port(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|&port| port != 0)
}

#[cfg(feature = "sync")]
enum Stream {
    Tcp(std::net::TcpStream),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream),
}

#[cfg(not(feature = "sync"))]
enum Stream {
    Tcp(async_io::Async<std::net::TcpStream>),
    #[cfg(unix)]
    Unix(async_io::Async<std::os::unix::net::UnixStream>),
}

/// An open connection to a server, with its read buffer.
pub(crate) struct Socket {
    stream: Stream,
    /// The TLS session over `stream`, once started.
    tls: Option<Box<super::tls::Session>>,
    address: String,
    scratch: Box<[u8]>,
    /// What was read and not yet consumed.
    pub(crate) read: BytesMut,
    /// How long each read or write may wait.
    timeout: Duration,
    /// When the reply under way is due, however its bytes trickle in: set by
    /// [`reply_due`](Socket::reply_due).
    deadline: Option<std::time::Instant>,
    /// The socket's read timeout as last set (blocking mode).
    #[cfg(feature = "sync")]
    read_timeout: Duration,
    /// Bounds each read or write by `timeout` (async mode).
    #[cfg(not(feature = "sync"))]
    alarm: super::alarm::Alarm,
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// A failed socket operation: what was being done, where, and the I/O error.
#[derive(Debug)]
pub(crate) struct IoFailure {
    pub(crate) what: &'static str,
    pub(crate) address: String,
    pub(crate) source: io::Error,
}

impl IoFailure {
    /// `true` if the connection closed (or was reset) under the request, rather than
    /// timing out: a server that restarted or dropped the connection.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(
            self.source.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        )
    }
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} failed", self.what, self.address)
    }
}

impl std::error::Error for IoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl Socket {
    /// `true` if the connection stays on this machine: a Unix socket, or TCP to a
    /// loopback address. Anything else crosses a network that may be listened to,
    /// so credentials are not sent over it in clear text unasked.
    pub(crate) fn is_local(&self) -> bool {
        match &self.stream {
            Stream::Tcp(stream) => {
                #[cfg(feature = "sync")]
                let peer = stream.peer_addr();
                #[cfg(not(feature = "sync"))]
                let peer = stream.get_ref().peer_addr();
                peer.is_ok_and(|peer| match peer.ip() {
                    std::net::IpAddr::V4(ip) => ip.is_loopback(),
                    std::net::IpAddr::V6(ip) => {
                        ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|ip| ip.is_loopback())
                    }
                })
            }
            #[cfg(unix)]
            Stream::Unix(_) => true,
        }
    }

    /// `true` once the connection runs over TLS.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_encrypted(&self) -> bool {
        self.tls.is_some()
    }

    /// `true` once the connection runs over TLS with a server whose certificate was
    /// checked: who reads what is sent is known.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn is_verified(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.is_verified())
    }

    pub(crate) fn failure(&self, what: &'static str, source: io::Error) -> IoFailure {
        IoFailure {
            what,
            address: self.address.clone(),
            source,
        }
    }

    /// Sets how long each later read or write may wait.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        #[cfg(feature = "sync")]
        {
            self.read_timeout = timeout;
            let _ = match &self.stream {
                Stream::Tcp(s) => s
                    .set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout))),
                #[cfg(unix)]
                Stream::Unix(s) => s
                    .set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout))),
            };
        }
    }

    /// Writes `bytes` if the socket takes them at once, never waiting: for a goodbye
    /// on the way out.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn write_now(&self, bytes: &[u8]) {
        let _ = match &self.tls {
            None => write_now(&self.stream, bytes),
            Some(tls) => tls.seal_and(bytes, |sealed| write_now(&self.stream, sealed)),
        };
    }

    /// Shuts the connection down both ways: a read blocked on it returns at once.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn shutdown(&self) {
        let how = std::net::Shutdown::Both;
        let _ = match &self.stream {
            #[cfg(feature = "sync")]
            Stream::Tcp(s) => s.shutdown(how),
            #[cfg(not(feature = "sync"))]
            Stream::Tcp(s) => s.get_ref().shutdown(how),
            #[cfg(all(unix, feature = "sync"))]
            Stream::Unix(s) => s.shutdown(how),
            #[cfg(all(unix, not(feature = "sync")))]
            Stream::Unix(s) => s.get_ref().shutdown(how),
        };
    }

    /// Takes what was read and not yet consumed, leaving the buffer empty.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn take_read(&mut self) -> BytesMut {
        std::mem::take(&mut self.read)
    }
}

/// Reads and writes through a shared reference, so that one thread can read while
/// another writes (sync mode): blocking, each bounded by a timeout.
#[cfg(feature = "sync")]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl Socket {
    /// Reads what the server sent next into `buf`, after setting the socket's read
    /// timeout to `timeout` if given; fails on a closed connection. Over TLS, a read
    /// that brings part of a record returns `Ok(0)`.
    pub(crate) fn read_shared(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> std::result::Result<usize, IoFailure> {
        let fail = |err| self.failure("reading from", err);
        // Set even when buffered plaintext answers at once: the caller keeps track of
        // the timeout it set.
        let set = match timeout.map(clamp_timeout) {
            None => Ok(()),
            Some(timeout) => match &self.stream {
                Stream::Tcp(s) => s.set_read_timeout(Some(timeout)),
                #[cfg(unix)]
                Stream::Unix(s) => s.set_read_timeout(Some(timeout)),
            },
        };
        if let Some(tls) = &self.tls {
            if let Some(n) = tls.take_plain(buf).map_err(fail)? {
                return set.map(|()| n).map_err(fail);
            }
        }
        let n = match set.and_then(|()| read_some(&self.stream, buf)) {
            Ok(0) => return Err(fail(closed())),
            Ok(n) => n,
            Err(err) => return Err(fail(err)),
        };
        match &self.tls {
            None => Ok(n),
            Some(tls) => {
                tls.feed(&buf[..n]).map_err(fail)?;
                Ok(tls.take_plain(buf).map_err(fail)?.unwrap_or(0))
            }
        }
    }

    /// Writes all of `bytes`, each wait bounded by the socket's timeout.
    pub(crate) fn write_shared(&self, bytes: &[u8]) -> std::result::Result<(), IoFailure> {
        match &self.tls {
            None => write_all(&self.stream, bytes),
            Some(tls) => tls.seal_and(bytes, |sealed| write_all(&self.stream, sealed)),
        }
        .map_err(|err| self.failure("writing to", err))
    }
}

/// Reads and writes that never wait, and the readiness to wait for (async mode), all
/// through a shared reference.
#[cfg(not(feature = "sync"))]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl Socket {
    /// Reads what is there into `buf`: `WouldBlock` if nothing is, `Ok(0)` once closed.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return read_now(&self.stream, buf);
        };
        loop {
            if let Some(n) = tls.take_plain(buf)? {
                return Ok(n);
            }
            match read_now(&self.stream, buf)? {
                0 => return Ok(0),
                n => tls.feed(&buf[..n])?,
            }
        }
    }

    /// Writes what the socket takes at once of `bytes`. Over TLS, takes nothing
    /// (`WouldBlock`) while ciphertext from before waits, and writes that first;
    /// `bytes` may be empty, to write what waits (see [`unflushed`](Socket::unflushed)).
    pub(crate) fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match &self.tls {
            None => write_now(&self.stream, bytes),
            Some(tls) => tls.write_now(bytes, |sealed| write_now(&self.stream, sealed)),
        }
    }

    /// `true` while bytes taken by [`try_write`](Socket::try_write) still wait to go
    /// out (only over TLS).
    pub(crate) fn unflushed(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.unflushed())
    }

    /// Ready once the socket may have something to read; until then wakes `cx`'s task
    /// when it does.
    pub(crate) fn poll_readable(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match &self.stream {
            Stream::Tcp(s) => s.poll_readable(cx),
            #[cfg(unix)]
            Stream::Unix(s) => s.poll_readable(cx),
        }
    }

    /// Ready once the socket may take more bytes; until then wakes `cx`'s task when
    /// it does.
    pub(crate) fn poll_writable(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match &self.stream {
            Stream::Tcp(s) => s.poll_writable(cx),
            #[cfg(unix)]
            Stream::Unix(s) => s.poll_writable(cx),
        }
    }
}

#[maybe_async::maybe_async]
impl Socket {
    /// Connects to `address`, waiting at most `timeout`; each later read or write
    /// waits at most `timeout` too.
    pub(crate) async fn connect(
        address: &Address,
        timeout: Duration,
    ) -> std::result::Result<Self, IoFailure> {
        let stream = open_stream(address, timeout)
            .await
            .map_err(|source| IoFailure {
                what: "connecting to",
                address: address.to_string(),
                source,
            })?;
        Ok(Self {
            stream,
            tls: None,
            address: address.to_string(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            read: BytesMut::with_capacity(READ_CHUNK),
            timeout,
            deadline: None,
            #[cfg(feature = "sync")]
            read_timeout: timeout,
            #[cfg(not(feature = "sync"))]
            alarm: super::alarm::Alarm::default(),
        })
    }

    /// Sends `bytes`.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> std::result::Result<(), IoFailure> {
        let sent = match &self.tls {
            None => self.send_raw(bytes).await,
            Some(tls) => {
                let mut sealed = Vec::new();
                match tls.seal_and(bytes, |ciphertext| {
                    sealed.extend_from_slice(ciphertext);
                    Ok(())
                }) {
                    Ok(()) => self.send_raw(&sealed).await,
                    Err(err) => Err(err),
                }
            }
        };
        sent.map_err(|err| self.failure("writing to", err))
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        #[cfg(feature = "sync")]
        let sent = write_all(&self.stream, bytes);
        #[cfg(not(feature = "sync"))]
        let sent = {
            let write = write_all(&mut self.stream, bytes);
            self.alarm.within(self.timeout, write, timed_out).await
        };
        sent
    }

    /// Starts TLS over the connection and completes the handshake, within the
    /// timeout. Anything the server sent before is refused: it came unencrypted.
    pub(crate) async fn start_tls(
        &mut self,
        connector: &super::tls::Connector,
    ) -> std::result::Result<(), IoFailure> {
        if !self.read.is_empty() {
            return Err(self.failure(
                "starting TLS with",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server sent data before the TLS handshake",
                ),
            ));
        }
        let session = connector
            .session()
            .map_err(|err| self.failure("starting TLS with", err))?;
        self.tls = Some(Box::new(session));
        self.reply_due();
        let shaken = self.handshake().await;
        self.deadline = None;
        // What failed, failed starting TLS: a caller may try again without it.
        shaken.map_err(|failure| IoFailure {
            what: "starting TLS with",
            ..failure
        })
    }

    async fn handshake(&mut self) -> std::result::Result<(), IoFailure> {
        loop {
            // The handshake's messages are sealed with no plaintext.
            self.send(&[]).await?;
            if !self.tls.as_ref().is_some_and(|tls| tls.is_handshaking()) {
                return Ok(());
            }
            let n = self.receive_raw().await?;
            let fed = match &self.tls {
                Some(tls) => tls.feed(&self.scratch[..n]),
                None => Ok(()),
            };
            if let Err(err) = fed {
                // Tell the server why, if the socket takes it at once.
                self.write_now(&[]);
                return Err(self.failure("starting TLS with", err));
            }
        }
    }

    /// Reads what the server sent next into [`read`](Socket::read); fails on a closed
    /// connection, and once the reply under way is overdue (see
    /// [`reply_due`](Socket::reply_due)).
    pub(crate) async fn receive(&mut self) -> std::result::Result<(), IoFailure> {
        loop {
            if let Some(tls) = &self.tls {
                let plain = tls
                    .take_plain(&mut self.scratch)
                    .map_err(|err| self.failure("reading from", err))?;
                if let Some(n) = plain {
                    self.read.extend_from_slice(&self.scratch[..n]);
                    return Ok(());
                }
            }
            let n = self.receive_raw().await?;
            match &self.tls {
                None => {
                    self.read.extend_from_slice(&self.scratch[..n]);
                    return Ok(());
                }
                Some(tls) => tls
                    .feed(&self.scratch[..n])
                    .map_err(|err| self.failure("reading from", err))?,
            }
        }
    }

    /// Reads what came next on the socket into `scratch`, within what is left of the
    /// reply's time.
    async fn receive_raw(&mut self) -> std::result::Result<usize, IoFailure> {
        let wait = self
            .wait_left()
            .map_err(|err| self.failure("reading from", err))?;
        #[cfg(feature = "sync")]
        let read = {
            // The socket's timeout is set again only when it is off by more than an
            // eighth of the timeout, so that a reply that comes in one read costs no
            // call: a trickling reply may overrun its deadline by that eighth.
            let slack = self.timeout / 8;
            if self.read_timeout > wait + slack || self.read_timeout + slack < wait {
                self.read_timeout = wait;
                let _ = match &self.stream {
                    Stream::Tcp(s) => s.set_read_timeout(Some(wait)),
                    #[cfg(unix)]
                    Stream::Unix(s) => s.set_read_timeout(Some(wait)),
                };
            }
            read_some(&self.stream, &mut self.scratch)
        };
        #[cfg(not(feature = "sync"))]
        let read = {
            let read = read_some(&mut self.stream, &mut self.scratch);
            self.alarm.within(wait, read, timed_out).await
        };
        match read {
            Ok(0) => Err(self.failure("reading from", closed())),
            Ok(n) => Ok(n),
            Err(err) => Err(self.failure("reading from", err)),
        }
    }
}

impl Socket {
    /// Makes the reply about to be read due within the timeout from now, however
    /// slowly its bytes come: a server that trickles a byte at a time cannot hold a
    /// caller past it.
    pub(crate) fn reply_due(&mut self) {
        let now = std::time::Instant::now();
        self.deadline = Some(now.checked_add(self.timeout).unwrap_or(now));
    }

    /// Ends the reply's deadline, and gives the socket its whole timeout back: for a
    /// socket handed to code that keeps time on its own.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn no_reply_due(&mut self) {
        self.deadline = None;
        #[cfg(feature = "sync")]
        if self.read_timeout != self.timeout {
            self.read_timeout = self.timeout;
            let _ = match &self.stream {
                Stream::Tcp(s) => s.set_read_timeout(Some(self.timeout)),
                #[cfg(unix)]
                Stream::Unix(s) => s.set_read_timeout(Some(self.timeout)),
            };
        }
    }

    /// How long the next read may wait: the timeout, or what is left of the reply's.
    fn wait_left(&self) -> io::Result<Duration> {
        match self.deadline {
            None => Ok(self.timeout),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    Err(timed_out())
                } else {
                    Ok(left.min(self.timeout))
                }
            }
        }
    }
}

/// The error of a connection the server closed.
pub(crate) fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection",
    )
}

pub(crate) fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the server did not answer in time")
}

/// Resolves a host name: IP addresses at once, names through the system resolver.
fn resolve(host: &str, port: u16) -> io::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![(ip, port).into()]);
    }
    let addrs: Vec<_> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no address"),
        ));
    }
    Ok(addrs)
}

#[cfg(feature = "sync")]
fn open_stream(address: &Address, timeout: Duration) -> io::Result<Stream> {
    match address {
        Address::Tcp(host, port) => {
            let mut last = None;
            for addr in resolve(host, *port)? {
                match std::net::TcpStream::connect_timeout(&addr, timeout) {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        stream.set_read_timeout(Some(timeout))?;
                        stream.set_write_timeout(Some(timeout))?;
                        return Ok(Stream::Tcp(stream));
                    }
                    Err(err) => last = Some(err),
                }
            }
            Err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into()))
        }
        #[cfg(unix)]
        Address::Unix(path) => {
            let stream = std::os::unix::net::UnixStream::connect(path)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            Ok(Stream::Unix(stream))
        }
    }
}

#[cfg(feature = "sync")]
fn write_all(stream: &Stream, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let result = match stream {
        Stream::Tcp(s) => (&*s).write_all(bytes),
        #[cfg(unix)]
        Stream::Unix(s) => (&*s).write_all(bytes),
    };
    result.map_err(would_block_is_timeout)
}

#[cfg(feature = "sync")]
fn read_some(stream: &Stream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    loop {
        let result = match stream {
            Stream::Tcp(s) => (&*s).read(buf),
            #[cfg(unix)]
            Stream::Unix(s) => (&*s).read(buf),
        };
        // With a receive timeout set, the kernel does not restart a read that a
        // signal interrupted: read again.
        match result {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map_err(would_block_is_timeout),
        }
    }
}

/// A socket timeout shows as `WouldBlock` on Unix.
#[cfg(feature = "sync")]
fn would_block_is_timeout(err: io::Error) -> io::Error {
    if err.kind() == io::ErrorKind::WouldBlock {
        timed_out()
    } else {
        err
    }
}

#[cfg(feature = "sync")]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn write_now(stream: &Stream, bytes: &[u8]) -> io::Result<usize> {
    use std::io::Write;
    match stream {
        Stream::Tcp(s) => (&*s).write(bytes),
        #[cfg(unix)]
        Stream::Unix(s) => (&*s).write(bytes),
    }
}

/// Runs `io`, or fails with a timeout after `timeout`.
#[cfg(not(feature = "sync"))]
async fn within<T>(
    timeout: Duration,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    futures_lite::future::or(io, async {
        async_io::Timer::after(timeout).await;
        Err(timed_out())
    })
    .await
}

#[cfg(not(feature = "sync"))]
async fn open_stream(address: &Address, timeout: Duration) -> io::Result<Stream> {
    match address {
        Address::Tcp(host, port) => {
            let (host, port) = (host.clone(), *port);
            // Name lookups block: off the executor.
            let addrs = within(timeout, blocking::unblock(move || resolve(&host, port))).await?;
            let mut last = None;
            for addr in addrs {
                match within(
                    timeout,
                    async_io::Async::<std::net::TcpStream>::connect(addr),
                )
                .await
                {
                    Ok(stream) => {
                        stream.get_ref().set_nodelay(true)?;
                        return Ok(Stream::Tcp(stream));
                    }
                    Err(err) => last = Some(err),
                }
            }
            Err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into()))
        }
        #[cfg(unix)]
        Address::Unix(path) => {
            let stream = within(
                timeout,
                async_io::Async::<std::os::unix::net::UnixStream>::connect(path),
            )
            .await?;
            Ok(Stream::Unix(stream))
        }
    }
}

#[cfg(not(feature = "sync"))]
async fn write_all(stream: &mut Stream, bytes: &[u8]) -> io::Result<()> {
    use futures_lite::AsyncWriteExt;
    match stream {
        Stream::Tcp(s) => s.write_all(bytes).await,
        #[cfg(unix)]
        Stream::Unix(s) => s.write_all(bytes).await,
    }
}

#[cfg(not(feature = "sync"))]
async fn read_some(stream: &mut Stream, buf: &mut [u8]) -> io::Result<usize> {
    use futures_lite::AsyncReadExt;
    match stream {
        Stream::Tcp(s) => s.read(buf).await,
        #[cfg(unix)]
        Stream::Unix(s) => s.read(buf).await,
    }
}

/// Reads what is there (async mode): `WouldBlock` if nothing is, `Ok(0)` once closed.
#[cfg(not(feature = "sync"))]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn read_now(stream: &Stream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    match stream {
        Stream::Tcp(s) => s.get_ref().read(buf),
        #[cfg(unix)]
        Stream::Unix(s) => s.get_ref().read(buf),
    }
}

#[cfg(not(feature = "sync"))]
fn write_now(stream: &Stream, bytes: &[u8]) -> io::Result<usize> {
    use std::io::Write;
    // The socket is non-blocking: this never waits.
    match stream {
        Stream::Tcp(s) => s.get_ref().write(bytes),
        #[cfg(unix)]
        Stream::Unix(s) => s.get_ref().write(bytes),
    }
}

/// How long a connection may sit idle and still be used: older ones are closed
/// instead, since a firewall or NAT between may have forgotten them silently (which
/// would cost the next operation a whole timeout).
pub(crate) const MAX_IDLE: Duration = Duration::from_secs(60);

/// The shortest and longest timeouts the network stores take: a zero timeout cannot
/// be set on a socket, and PostgreSQL's `statement_timeout` stops at 24 days.
pub(crate) const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(24 * 3600));

/// `timeout` within [`TIMEOUT_RANGE`].
pub(crate) fn clamp_timeout(timeout: Duration) -> Duration {
    timeout.clamp(TIMEOUT_RANGE.0, TIMEOUT_RANGE.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%3Ab%2f", "test").unwrap(), "a:b/");
        assert!(percent_decode("%zz", "test").is_err());
        assert!(percent_decode("%ff", "test").is_err(), "not UTF-8");
        assert_eq!(parse_port("6379"), Some(6379));
        assert_eq!(parse_port("0"), None);
        assert_eq!(parse_port("70000"), None);
    }
}
