//! One connection to a Redis server, speaking RESP2 on a socket driven by the caller.

use std::fmt;

use bytes::Buf;

use super::config::Auth;
use crate::stores::{
    net::{Address, IoFailure, Socket},
    tls::Connector,
};

/// The largest bulk string a reply may carry: the largest stored value this store
/// writes (a record, its version and header) with room to spare. Anything longer is
/// refused as soon as its length line arrives, before it is buffered: a hostile or
/// broken server cannot make a connection hold more.
pub(super) const MAX_BULK: usize = crate::session::Record::MAX_ENCODED_LEN + 64 * 1024;
/// The longest line (a status, an error, a number) a reply may have before its end:
/// a line that runs on without one is refused rather than buffered.
const MAX_LINE: usize = 64 * 1024;
/// The most elements a reply array may have, and the deepest nesting: a cluster's
/// slot map (`CLUSTER SLOTS`: a range for each of the 16,384 slots at worst, each
/// with its nodes and their details), no more. An array cannot multiply the bound on
/// one bulk string: [`MAX_REPLY`] bounds a whole reply.
const MAX_ARRAY: usize = 16_384;
const MAX_DEPTH: usize = 4;
/// The most bytes one reply may take in all, arrays included: a cluster's slot map
/// broken into all 16,384 slots, each with a primary and three replicas named by
/// IPv6 address, id and host name (about 700 bytes a slot), with room to spare.
/// Beyond it a reply is refused before more of it is buffered.
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Status(String),
    Array(Vec<Reply>),
}

/// What went wrong on a connection.
#[derive(Debug)]
pub(crate) enum RespError {
    /// The socket failed, timed out or closed.
    Io(IoFailure),
    /// The server answered with an error reply.
    Server(String),
    /// The server sent something that is not RESP, or not what the command answers.
    Protocol(String),
    /// A write reached the primary, and fewer replicas than asked for acknowledged
    /// it in time (`wait_replicas`).
    Replicas {
        acked: i64,
        wanted: u32,
        waited: std::time::Duration,
    },
}

impl RespError {
    /// `true` if the connection closed (or was reset) before the reply: the server
    /// restarted or dropped the connection, and a new connection may succeed.
    pub(crate) fn closed_before_reply(&self) -> bool {
        matches!(self, Self::Io(failure) if failure.is_closed())
    }

    /// The same error again, for each of the callers a broken connection fails.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::Io(failure) => Self::Io(IoFailure {
                what: failure.what,
                address: failure.address.clone(),
                source: std::io::Error::new(failure.source.kind(), failure.source.to_string()),
            }),
            Self::Server(message) => Self::Server(message.clone()),
            Self::Protocol(what) => Self::Protocol(what.clone()),
            Self::Replicas {
                acked,
                wanted,
                waited,
            } => Self::Replicas {
                acked: *acked,
                wanted: *wanted,
                waited: *waited,
            },
        }
    }

    /// `true` if the server does not know the script `EVALSHA` named.
    pub(crate) fn is_no_script(&self) -> bool {
        self.server_says("NOSCRIPT")
    }

    fn server_says(&self, code: &str) -> bool {
        matches!(self, Self::Server(message)
            if message.strip_prefix(code).is_some_and(|rest| rest.is_empty() || rest.starts_with(' ')))
    }

    /// Where a cluster node sends the command (`MOVED` or `ASK`), if it does.
    pub(crate) fn redirect(&self) -> Option<Redirect> {
        let Self::Server(message) = self else {
            return None;
        };
        let mut words = message.split(' ');
        let moved = match words.next()? {
            "MOVED" => true,
            "ASK" => false,
            _ => return None,
        };
        let slot: u16 = words.next()?.parse().ok().filter(|&slot| slot < 16_384)?;
        let (host, port) = words.next()?.rsplit_once(':')?;
        let port = crate::stores::net::parse_port(port)?;
        // Redis names an IPv6 node without brackets; a node it knows by no endpoint
        // is an empty host, or `?` where nodes are named by host name (the one that
        // answered, which the caller knows): both become the empty host.
        let host = match host {
            "?" => String::new(),
            host => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        };
        Some(Redirect {
            moved,
            slot,
            address: Address::Tcp(host, port),
        })
    }

    /// `true` for an answer that goes away by itself: a cluster moving a slot
    /// (`TRYAGAIN`) or without a quorum (`CLUSTERDOWN`), a server loading its data
    /// (`LOADING`) or a replica cut off from its primary (`MASTERDOWN`).
    pub(crate) fn is_transient(&self) -> bool {
        ["TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN"]
            .iter()
            .any(|code| self.server_says(code))
    }

    /// `true` if the server is a replica now (`READONLY`): the primary moved.
    pub(crate) fn is_read_only(&self) -> bool {
        self.server_says("READONLY")
    }
}

/// A cluster node's answer that a key's slot is served elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redirect {
    /// `MOVED` (the slot map changed for good), or `ASK` (this command only, while
    /// the slot migrates).
    pub(crate) moved: bool,
    pub(crate) slot: u16,
    pub(crate) address: Address,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(failure) => write!(f, "Redis: {failure}"),
            Self::Server(message) => write!(f, "Redis answered: {message}"),
            Self::Protocol(what) => write!(f, "Redis protocol error: {what}"),
            Self::Replicas {
                acked,
                wanted,
                waited,
            } => write!(
                f,
                "Redis: the write is on the primary, but {acked} of the {wanted} replicas \
                 asked for (wait_replicas) acknowledged it within {} ms: a failover may \
                 lose it",
                waited.as_millis()
            ),
        }
    }
}

impl std::error::Error for RespError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Its own text is already in ours: its cause next.
            Self::Io(failure) => Some(&failure.source),
            _ => None,
        }
    }
}

/// A reply, or the message of an error reply.
pub(super) type Answer = Result<Reply, String>;

/// A line of a reply: its type byte, the rest of it, and where the next line starts.
type Line<'a> = (u8, &'a [u8], usize);

/// The first line of `buf`; `None` while its end has not come.
fn first_line(buf: &[u8]) -> Result<Option<Line<'_>>, String> {
    let head = &buf[..buf.len().min(MAX_LINE + 2)];
    let Some(end) = head.windows(2).position(|w| w == b"\r\n") else {
        if head.len() == MAX_LINE + 2 {
            return Err(format!(
                "a reply line runs past {MAX_LINE} bytes without its end"
            ));
        }
        return Ok(None);
    };
    let Some((&kind, line)) = buf[..end].split_first() else {
        return Err("an empty line".into());
    };
    Ok(Some((kind, line, end + 2)))
}

fn number(line: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| format!("`{}` is not a number", String::from_utf8_lossy(line)))
}

/// Finds where a reply ends as its bytes come in, without building it, and
/// resumes where it stopped: a reply read in many pieces is scanned once, where
/// parsing it whole at each piece would cost a pass a piece (a slot map of 10 MB
/// read 16 KiB at a time: 600 passes). Bounds are checked as they are met, so a
/// reply past [`MAX_REPLY`] is refused before more of it is buffered.
#[derive(Debug, Default)]
pub(super) struct Scanner {
    /// Where the next element starts, from the start of the reply.
    at: usize,
    /// How many elements are still to come in each array open there, outermost
    /// first.
    open: Vec<usize>,
}

impl Scanner {
    /// `true` before the first byte of a reply has been scanned.
    pub(super) fn is_fresh(&self) -> bool {
        self.at == 0 && self.open.is_empty()
    }

    /// The length of the reply at the start of `buf` once it is all there;
    /// `None` while more must come. Each call must see the bytes of the last one,
    /// with any that came since behind them; once a reply is found whole, the next
    /// call starts on the next reply.
    pub(super) fn whole(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
        loop {
            let Some((kind, line, line_end)) = first_line(&buf[self.at..])? else {
                return Ok(None);
            };
            let size = match kind {
                b'+' | b'-' | b':' => line_end,
                b'$' => match usize::try_from(number(line)?) {
                    // Nil.
                    Err(_) => line_end,
                    Ok(len) if len <= MAX_BULK => line_end + len + 2,
                    Ok(len) => {
                        return Err(format!(
                        "a bulk string of {len} bytes, more than the {MAX_BULK} a reply may carry"
                    ))
                    }
                },
                b'*' => match usize::try_from(number(line)?) {
                    Err(_) | Ok(0) => line_end,
                    Ok(count) if count <= MAX_ARRAY && self.open.len() < MAX_DEPTH => {
                        self.open.push(count);
                        self.at += line_end;
                        continue;
                    }
                    Ok(_) => return Err("an array is too long or too deep".into()),
                },
                other => return Err(format!("unknown reply type {:?}", char::from(other))),
            };
            if self.at + size > MAX_REPLY {
                return Err(format!(
                    "a reply runs past the {MAX_REPLY} bytes a reply may take"
                ));
            }
            if buf.len() < self.at + size {
                return Ok(None);
            }
            self.at += size;
            // An element is whole: so is each array it completes.
            loop {
                match self.open.last_mut() {
                    None => return Ok(Some(std::mem::take(&mut self.at))),
                    Some(left) if *left > 1 => {
                        *left -= 1;
                        break;
                    }
                    Some(_) => {
                        self.open.pop();
                    }
                }
            }
        }
    }
}

/// Parses one reply from the start of `buf`: the reply and how many bytes it took,
/// `None` if `buf` holds only part of it. An error reply is an `Err` answer, with its
/// length, so that the caller can consume it and keep the connection; malformed input
/// is an `Err`.
pub(super) fn parse(buf: &[u8], depth: usize) -> Result<Option<(Answer, usize)>, String> {
    let Some((kind, line, line_end)) = first_line(buf)? else {
        return Ok(None);
    };
    let text = || std::str::from_utf8(line).map_err(|_| "a line is not UTF-8".to_owned());
    let number = || number(line);
    match kind {
        b'+' => Ok(Some((Ok(Reply::Status(text()?.to_owned())), line_end))),
        b'-' => Ok(Some((Err(text()?.to_owned()), line_end))),
        b':' => Ok(Some((Ok(Reply::Int(number()?)), line_end))),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Ok(Reply::Nil), line_end)));
            }
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= MAX_BULK)
                .ok_or_else(|| {
                    format!(
                        "a bulk string of {len} bytes, more than the {MAX_BULK} a reply may carry"
                    )
                })?;
            let Some(body) = buf.get(line_end..line_end + len + 2) else {
                return Ok(None);
            };
            if &body[len..] != b"\r\n" {
                return Err("a bulk string does not end its line".into());
            }
            Ok(Some((
                Ok(Reply::Bulk(body[..len].to_vec())),
                line_end + len + 2,
            )))
        }
        b'*' => {
            let count = number()?;
            if count < 0 {
                return Ok(Some((Ok(Reply::Nil), line_end)));
            }
            let count = usize::try_from(count)
                .ok()
                .filter(|&count| count <= MAX_ARRAY && depth < MAX_DEPTH)
                .ok_or("an array is too long or too deep")?;
            let mut at = line_end;
            let mut items = Vec::with_capacity(count);
            // An error inside an array is an error reply as a whole, once the whole
            // array is consumed.
            let mut error = None;
            for _ in 0..count {
                let Some((item, used)) = parse(&buf[at..], depth + 1)? else {
                    return Ok(None);
                };
                if at + used > MAX_REPLY {
                    return Err(format!(
                        "an array reply runs past the {MAX_REPLY} bytes a reply may take"
                    ));
                }
                match item {
                    Ok(item) => items.push(item),
                    Err(message) => {
                        error.get_or_insert(message);
                    }
                }
                at += used;
            }
            let answer = match error {
                Some(message) => Err(message),
                None => Ok(Reply::Array(items)),
            };
            Ok(Some((answer, at)))
        }
        other => Err(format!("unknown reply type {:?}", char::from(other))),
    }
}

/// Appends a command in RESP's array form.
pub(super) fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    push_length(out, args.len());
    for arg in args {
        out.push(b'$');
        push_length(out, arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends `n` in decimal, then CRLF.
fn push_length(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// One open, authenticated connection, used alone while it is set up.
pub(crate) struct Conn {
    socket: Socket,
    write: Vec<u8>,
    /// Commands queued and not yet answered.
    queued: usize,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Queues a command.
    pub(crate) fn push(&mut self, args: &[&[u8]]) {
        encode(&mut self.write, args);
        self.queued += 1;
    }

    /// Drops what was queued but not sent.
    fn clear_request(&mut self) {
        self.write.clear();
        self.queued = 0;
    }

    /// The socket, once connected and between requests, for a [`Mux`](super::mux::Mux).
    pub(crate) fn into_socket(mut self) -> Socket {
        // The mux keeps each reply's deadline itself.
        self.socket.no_reply_due();
        self.socket
    }
}

#[maybe_async::maybe_async]
impl Conn {
    /// Connects, authenticates and selects the database, in one round trip.
    pub(crate) async fn connect(
        address: &Address,
        auth: &Auth,
        db: u32,
        tls: Option<&Connector>,
        timeout: std::time::Duration,
    ) -> Result<Self, RespError> {
        let mut socket = Socket::connect(address, timeout)
            .await
            .map_err(RespError::Io)?;
        if let Some(tls) = tls {
            socket.start_tls(tls).await.map_err(RespError::Io)?;
        }
        let mut conn = Self {
            socket,
            write: Vec::with_capacity(256),
            queued: 0,
        };
        if let Some(password) = &auth.password {
            if !conn.socket.is_local() && !conn.socket.is_encrypted() && !auth.insecure_auth {
                return Err(RespError::Protocol(format!(
                    "the URL holds a password, and {} is another machine reached over \
                     plain TCP: AUTH would send the password where anyone on the path \
                     could read it; connect over a Unix socket or a tunnel, or add \
                     insecure_auth=true to the URL to send it anyway",
                    address
                )));
            }
            match &auth.user {
                Some(user) => conn.push(&[b"AUTH", user.as_bytes(), password.as_bytes()]),
                None => conn.push(&[b"AUTH", password.as_bytes()]),
            }
        }
        if db != 0 {
            conn.push(&[b"SELECT", db.to_string().as_bytes()]);
        }
        if conn.queued > 0 {
            for reply in conn.exchange().await? {
                reply.map_err(RespError::Server)?;
            }
        }
        Ok(conn)
    }

    /// Sends the queued commands and returns the answer to each: a reply, or the
    /// message of an error reply.
    pub(crate) async fn call_all(&mut self) -> Result<Vec<Answer>, RespError> {
        self.exchange().await
    }

    /// Sends the queued commands and reads one reply for each.
    async fn exchange(&mut self) -> Result<Vec<Answer>, RespError> {
        let sent = self.socket.send(&self.write).await;
        // The replies are due within the timeout, however slowly they come.
        self.socket.reply_due();
        let expected = self.queued;
        self.clear_request();
        sent.map_err(RespError::Io)?;
        let mut replies = Vec::with_capacity(expected);
        while replies.len() < expected {
            match parse(&self.socket.read, 0).map_err(RespError::Protocol)? {
                Some((reply, used)) => {
                    self.socket.read.advance(used);
                    replies.push(reply);
                }
                None => self.socket.receive().await.map_err(RespError::Io)?,
            }
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Result<Reply, String> {
        let (reply, used) = parse(bytes, 0).unwrap().expect("complete");
        assert_eq!(used, bytes.len());
        reply
    }

    #[test]
    fn reads_redirections() {
        let redirect = |text: &str| RespError::Server(text.into()).redirect();
        let moved = redirect("MOVED 3999 10.0.0.2:6381").unwrap();
        assert!(moved.moved);
        assert_eq!(moved.slot, 3999);
        assert_eq!(moved.address, Address::Tcp("10.0.0.2".into(), 6381));
        let ask = redirect("ASK 16383 [::1]:7000").unwrap();
        assert!(!ask.moved);
        assert_eq!(ask.address, Address::Tcp("::1".into(), 7000));
        assert_eq!(
            redirect("ASK 1 cache-2.internal:6379").unwrap().address,
            Address::Tcp("cache-2.internal".into(), 6379)
        );
        // No endpoint, or an unknown host name: the node that answered, on the port.
        for text in ["MOVED 7 :7002", "MOVED 7 ?:7002"] {
            assert_eq!(
                redirect(text).unwrap().address,
                Address::Tcp(String::new(), 7002)
            );
        }
        for text in [
            "MOVED 16384 h:1",
            "MOVED x h:1",
            "MOVED 1 h",
            "MOVED 1 h:0",
            "ASK",
            "ERR MOVED 1 h:1",
            "READONLY You can't write against a read only replica.",
        ] {
            assert!(redirect(text).is_none(), "{text}");
        }
        assert!(RespError::Protocol("MOVED 1 h:1".into())
            .redirect()
            .is_none());
    }

    #[test]
    fn parses_every_reply_kind() {
        assert_eq!(whole(b"+OK\r\n"), Ok(Reply::Status("OK".into())));
        assert_eq!(whole(b"-NOSCRIPT gone\r\n"), Err("NOSCRIPT gone".into()));
        assert_eq!(whole(b":-12\r\n"), Ok(Reply::Int(-12)));
        assert_eq!(whole(b"$-1\r\n"), Ok(Reply::Nil));
        assert_eq!(
            whole(b"$5\r\na\r\nbc\r\n"),
            Ok(Reply::Bulk(b"a\r\nbc".to_vec()))
        );
        assert_eq!(
            whole(b"*2\r\n$1\r\nx\r\n:1\r\n"),
            Ok(Reply::Array(vec![
                Reply::Bulk(b"x".to_vec()),
                Reply::Int(1)
            ]))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// A short fuzz run of the reply parser: arbitrary bytes, and arbitrary
        /// bytes after a well-formed start of each reply kind, never panic, and a
        /// complete reply never claims more bytes than there are.
        #[test]
        fn any_reply_bytes_never_panic(
            start in proptest::sample::select(vec![&b""[..], b"+", b"-", b":", b"$", b"*", b"*2\r\n", b"$3\r\n"]),
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
        ) {
            let mut input = start.to_vec();
            input.extend_from_slice(&bytes);
            if let Ok(Some((_, used))) = parse(&input, 0) {
                proptest::prop_assert!(used <= input.len());
                // The scanner finds the same end, however the bytes come.
                proptest::prop_assert_eq!(scanned(&input, 1), Ok(Some(used)));
                proptest::prop_assert_eq!(scanned(&input, 5), Ok(Some(used)));
            }
            // And never panics.
            let _ = scanned(&input, 3);
        }
    }

    #[test]
    fn waits_for_the_rest_and_rejects_garbage() {
        for part in [&b""[..], b"+OK", b"$5\r\nab", b"*2\r\n:1\r\n"] {
            assert_eq!(parse(part, 0), Ok(None), "{part:?}");
        }
        for bad in [
            &b"?x\r\n"[..],
            b":x\r\n",
            b"$3\r\nabcd\r\n",
            b"$999999999999\r\n",
            b"\r\n",
            // One byte over the bound: refused from its length line alone.
            format!("${}\r\n", MAX_BULK + 1).as_bytes(),
        ] {
            assert!(parse(bad, 0).is_err(), "{bad:?}");
        }
        // A line that never ends: waited for up to the bound, refused past it.
        let mut endless = b"+".to_vec();
        endless.resize(MAX_LINE, b'a');
        assert_eq!(parse(&endless, 0), Ok(None));
        endless.resize(MAX_LINE + 1, b'a');
        assert_eq!(
            parse(&endless, 0),
            Ok(None),
            "a line of the bound, its CRLF to come"
        );
        endless.resize(MAX_LINE + 2, b'a');
        assert!(parse(&endless, 0).is_err());
        let deep = b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n";
        assert!(parse(deep, 0).is_err());
        // An error inside an array: the whole array is consumed, and is the error.
        assert_eq!(whole(b"*2\r\n-ERR x\r\n:1\r\n"), Err("ERR x".into()));
    }

    /// `CLUSTER SLOTS` of a cluster whose 16,384 slots each sit apart, each with a
    /// primary and three replicas named by host name too, is read whole; a reply
    /// past the bound is refused.
    #[test]
    fn reads_the_largest_slot_map() {
        let bulk = |text: &str| format!("${}\r\n{text}\r\n", text.len());
        let node = |port: u16| {
            let ip = format!("2001:db8:aaaa:bbbb:cccc:dddd:eeee:{port}");
            let host = format!("node-{port}.sessions.cache.internal");
            format!(
                "*4\r\n{}:{port}\r\n{}*2\r\n{}{}",
                bulk(&ip),
                bulk(&format!("{port:040}")),
                bulk("hostname"),
                bulk(&host)
            )
        };
        let mut reply = format!("*{}\r\n", SLOTS_FOR_TEST);
        for slot in 0..SLOTS_FOR_TEST {
            reply.push_str(&format!("*6\r\n:{slot}\r\n:{slot}\r\n"));
            for port in [7000, 7001, 7002, 7003] {
                reply.push_str(&node(port));
            }
        }
        assert!(reply.len() > 10 * 1024 * 1024, "{}", reply.len());
        let Ok(Reply::Array(ranges)) = whole(reply.as_bytes()) else {
            panic!("not read");
        };
        assert_eq!(ranges.len(), SLOTS_FOR_TEST);

        let mut past = b"*2\r\n".to_vec();
        for _ in 0..2 {
            past.extend_from_slice(b"*9\r\n");
            for _ in 0..9 {
                past.extend_from_slice(format!("${MAX_BULK}\r\n").as_bytes());
                past.resize(past.len() + MAX_BULK, b'x');
                past.extend_from_slice(b"\r\n");
            }
        }
        assert!(parse(&past, 0).is_err());
    }

    const SLOTS_FOR_TEST: usize = 16_384;

    /// Feeds `bytes` to a scanner `step` bytes at a time; the length it finds.
    fn scanned(bytes: &[u8], step: usize) -> Result<Option<usize>, String> {
        let mut scanner = Scanner::default();
        let mut seen = 0;
        while seen < bytes.len() {
            seen = (seen + step).min(bytes.len());
            if let Some(end) = scanner.whole(&bytes[..seen])? {
                assert!(end <= seen, "an end past the bytes seen");
                return Ok(Some(end));
            }
        }
        Ok(None)
    }

    #[test]
    fn the_scanner_finds_where_each_reply_ends() {
        let replies: [&[u8]; 9] = [
            b"+OK\r\n",
            b"-ERR no\r\n",
            b":-42\r\n",
            b"$-1\r\n",
            b"$4\r\na\r\nb\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n*0\r\n-ERR in\r\n",
            b"*2\r\n*1\r\n*1\r\n*1\r\n:1\r\n$0\r\n\r\n",
        ];
        for reply in replies {
            let (_, used) = parse(reply, 0).unwrap().unwrap();
            assert_eq!(used, reply.len(), "{reply:?}");
            for step in [1, 2, 3, 7, reply.len()] {
                assert_eq!(
                    scanned(reply, step),
                    Ok(Some(reply.len())),
                    "{reply:?} by {step}"
                );
            }
            // Not yet whole one byte short; the next reply behind it is not its.
            let mut scanner = Scanner::default();
            assert_eq!(scanner.whole(&reply[..reply.len() - 1]), Ok(None));
            let two = [reply, b":7\r\n"].concat();
            assert_eq!(scanner.whole(&two), Ok(Some(reply.len())));
            assert_eq!(scanner.whole(&two[reply.len()..]), Ok(Some(4)));
        }
        for bad in [
            &b"?x\r\n"[..],
            b"$x\r\n",
            b"*x\r\n",
            b"\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(Scanner::default().whole(bad).is_err(), "{bad:?}");
        }
    }

    /// The largest slot map, read 16 KiB at a time as a connection reads it, is
    /// scanned once (and parsed once, whole); a reply past the bound is refused
    /// before much more than the bound has come.
    #[test]
    fn the_scanner_reads_large_replies_in_one_pass() {
        let node =
            "*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$40\r\n0123456789012345678901234567890123456789\r\n";
        let mut reply = format!("*{SLOTS_FOR_TEST}\r\n");
        for slot in 0..SLOTS_FOR_TEST {
            reply.push_str(&format!("*4\r\n:{slot}\r\n:{slot}\r\n{node}{node}"));
        }
        // Parsed whole at each of its some 160 pieces, it would be parsed 160 times.
        assert_eq!(scanned(reply.as_bytes(), 16 * 1024), Ok(Some(reply.len())));

        let mut scanner = Scanner::default();
        let mut past = b"*64\r\n".to_vec();
        let refused = loop {
            past.extend_from_slice(format!("${MAX_BULK}\r\n").as_bytes());
            past.resize(past.len() + MAX_BULK, b'x');
            past.extend_from_slice(b"\r\n");
            match scanner.whole(&past) {
                Ok(None) => continue,
                other => break other,
            }
        };
        assert!(refused.is_err(), "{refused:?}");
        assert!(past.len() <= MAX_REPLY + MAX_BULK + 64, "{}", past.len());
    }

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b"v\r\n"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n");
        out.clear();
        encode(&mut out, &[&[b'x'; 1234], b"", &[b'y'; 10]]);
        let expected = [
            &b"*3\r\n$1234\r\n"[..],
            &[b'x'; 1234],
            b"\r\n$0\r\n\r\n$10\r\n",
            &[b'y'; 10],
            b"\r\n",
        ]
        .concat();
        assert_eq!(out, expected);
    }
}
