//! One connection to a PostgreSQL server: protocol version 3, through
//! postgres-protocol's message codecs, on a plain socket (blocking mode) or on
//! async-io's reactor (async mode). No driver task, no runtime: the caller's own
//! thread or task writes each request and reads its reply.

use std::{fmt, time::Duration};

use bytes::BytesMut;
use postgres_protocol::{
    authentication::{self, sasl},
    message::{
        backend::{DataRowBody, ErrorResponseBody, Message},
        frontend,
    },
    IsNull, Oid,
};

use super::config::{Config, SslMode};
use crate::stores::{
    net::{Address, IoFailure, Socket},
    pool::Pooled,
    tls::Connector,
};

/// What went wrong on a connection.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The socket failed, timed out or closed.
    Io(IoFailure),
    /// The server answered with an error.
    Server(ServerError),
    /// The server sent something this client does not expect.
    Protocol(String),
}

impl WireError {
    /// `true` if TLS failed where plain text might not: the handshake failed, or
    /// the server refused the encrypted connection (`hostnossl`).
    fn tls_refused(&self) -> bool {
        match self {
            Self::Io(failure) => failure.what == "starting TLS with",
            Self::Server(err) => err.code == NOT_AUTHORIZED,
            Self::Protocol(_) => false,
        }
    }

    /// `true` if this is the server telling us it is going away, or the connection
    /// closing, before any reply to the request came: the server did not run it (or,
    /// if it did, the operation is one that can safely run twice), and a new
    /// connection may succeed.
    pub(crate) fn closed_before_reply(&self) -> bool {
        match self {
            Self::Io(failure) => failure.is_closed(),
            Self::Server(err) => err.is_fatal(),
            Self::Protocol(_) => false,
        }
    }

    /// The SQLSTATE code, for a server error.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            Self::Server(err) => Some(&err.code),
            _ => None,
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(failure) => write!(f, "PostgreSQL: {failure}"),
            Self::Server(err) => err.fmt(f),
            Self::Protocol(what) => write!(f, "PostgreSQL protocol error: {what}"),
        }
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(failure) => failure.source(),
            _ => None,
        }
    }
}

/// An error the server reported: its severity, SQLSTATE code and message.
#[derive(Debug, Clone)]
pub(crate) struct ServerError {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
}

impl ServerError {
    fn from_body(body: &ErrorResponseBody) -> Self {
        use fallible_iterator::FallibleIterator;
        let mut err = Self {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
        };
        let mut fields = body.fields();
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => err.severity = value,
                b'S' if err.severity.is_empty() => err.severity = value,
                b'C' => err.code = value,
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                _ => {}
            }
        }
        err
    }

    /// `FATAL` and `PANIC` end the connection.
    fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL {} {}: {}",
            self.severity, self.code, self.message
        )?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// A statement parameter, sent in binary format.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Param<'a> {
    Bytea(&'a [u8]),
    Text(&'a str),
    /// SQL `NULL`, of the statement's type for it.
    Null,
    Int4(i32),
    Int8(i64),
    /// A `timestamptz`: microseconds since 2000-01-01 UTC.
    Timestamptz(i64),
}

/// The type OIDs of the parameters above.
pub(crate) mod oid {
    use super::Oid;
    pub(crate) const BYTEA: Oid = 17;
    pub(crate) const INT8: Oid = 20;
    pub(crate) const INT4: Oid = 23;
    pub(crate) const TEXT: Oid = 25;
    pub(crate) const TIMESTAMPTZ: Oid = 1184;
}

/// What a request returned: the rows of its last command (binary format for
/// statements sent with parameters, text for simple queries) and its row count.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub(crate) rows: Vec<DataRowBody>,
    pub(crate) affected: u64,
    /// The request was sent again after a connection closed before its reply: its
    /// first copy may have run.
    pub(crate) resent: bool,
}

/// The columns of a row: `None` for SQL `NULL`.
pub(crate) fn columns(row: &DataRowBody) -> Result<Vec<Option<&[u8]>>, WireError> {
    let mut buf = row.buffer();
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (len, rest) = buf
            .split_first_chunk::<4>()
            .ok_or_else(|| WireError::Protocol("truncated data row".into()))?;
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            out.push(None);
            buf = rest;
            continue;
        }
        let len = len as usize;
        if rest.len() < len {
            return Err(WireError::Protocol("truncated data row".into()));
        }
        out.push(Some(&rest[..len]));
        buf = &rest[len..];
    }
    Ok(out)
}

/// One open, authenticated connection.
pub(crate) struct Conn {
    socket: Socket,
    write: BytesMut,
    /// `true` from the moment a request starts being written until its reply has been
    /// read to the end: a connection left in this state (an error, a timeout, a
    /// dropped future) no longer knows where the server is, and is closed.
    busy: bool,
    /// `true` once the store's statements are prepared by name on this connection.
    pub(crate) prepared: bool,
    /// How the request being built sends its statements: by name (prepared) or
    /// whole (unnamed).
    pub(crate) named: bool,
    /// How many rows the request's reply may carry, and how many bytes in all:
    /// [`MAX_ROWS`] and one message unless the request allows more
    /// ([`allow_rows`](Conn::allow_rows)).
    max_rows: usize,
    max_row_bytes: usize,
}

/// A statement of the store: its SQL, the types of its parameters, and the name it
/// is prepared under: `portable_sessions_`, what it does, and a digest of the SQL
/// and the types, so that a server connection that knows the name (a pooler may
/// hand one over from another client of this crate) knows this very statement.
#[derive(Clone, Debug)]
pub(crate) struct Statement {
    pub(crate) name: String,
    pub(crate) sql: String,
    pub(crate) types: &'static [Oid],
}

impl Statement {
    /// `label` says what it does, in at most 20 bytes (names stop at 63).
    pub(crate) fn new(label: &str, sql: String, types: &'static [Oid]) -> Self {
        use fmt::Write;
        use sha2::{Digest, Sha256};
        let mut name = format!("portable_sessions_{label}_");
        let mut digest = Sha256::new();
        digest.update(sql.as_bytes());
        for oid in types {
            digest.update(oid.to_be_bytes());
        }
        for byte in &digest.finalize()[..12] {
            let _ = write!(name, "{byte:02x}");
        }
        Self { name, sql, types }
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("socket", &self.socket)
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl Pooled for Conn {
    fn reusable(&self) -> bool {
        !self.busy
    }
}

/// The buffer encoders write into only fails past 2 GiB.
fn too_large(_: std::io::Error) -> WireError {
    WireError::Protocol("a message is too large".into())
}

impl Conn {
    /// Queues a bind and execute of `statement` with `params` (binary format, as are
    /// the results): by its name when the request is [`named`](Conn::named), and
    /// otherwise preceded by its SQL as the unnamed statement, so that the request
    /// carries all it needs to run on whichever server connection a pooler such as
    /// PgBouncer hands it. No sync: [`push_sync`](Conn::push_sync) ends the request.
    pub(crate) fn push(
        &mut self,
        statement: &Statement,
        params: &[Param<'_>],
    ) -> Result<(), WireError> {
        let name = if self.named {
            statement.name.as_str()
        } else {
            frontend::parse(
                "",
                &statement.sql,
                statement.types.iter().copied(),
                &mut self.write,
            )
            .map_err(too_large)?;
            ""
        };
        frontend::bind(
            "",
            name,
            [1],
            params.iter().copied(),
            |param, buf| {
                match param {
                    Param::Null => return Ok(IsNull::Yes),
                    Param::Bytea(bytes) => buf.extend_from_slice(bytes),
                    Param::Text(text) => buf.extend_from_slice(text.as_bytes()),
                    Param::Int4(v) => buf.extend_from_slice(&v.to_be_bytes()),
                    Param::Int8(v) => buf.extend_from_slice(&v.to_be_bytes()),
                    Param::Timestamptz(v) => buf.extend_from_slice(&v.to_be_bytes()),
                }
                Ok(IsNull::No)
            },
            [1],
            &mut self.write,
        )
        .map_err(|_| WireError::Protocol("a parameter is too large".into()))?;
        frontend::execute("", 0, &mut self.write).map_err(too_large)
    }

    /// Queues the preparation of `statements` by name. No sync.
    pub(crate) fn push_parses(&mut self, statements: &[Statement]) -> Result<(), WireError> {
        for statement in statements {
            frontend::parse(
                &statement.name,
                &statement.sql,
                statement.types.iter().copied(),
                &mut self.write,
            )
            .map_err(too_large)?;
        }
        Ok(())
    }

    /// Queues a sync: the end of a request of statements, and of the implicit
    /// transaction they ran in.
    pub(crate) fn push_sync(&mut self) {
        frontend::sync(&mut self.write);
    }

    /// Queues a simple (text) query.
    pub(crate) fn push_query(&mut self, sql: &str) -> Result<(), WireError> {
        frontend::query(sql, &mut self.write).map_err(too_large)
    }

    /// Drops what was queued but not sent.
    pub(crate) fn clear_request(&mut self) {
        self.write.clear();
        self.max_rows = MAX_ROWS;
        self.max_row_bytes = MAX_MESSAGE;
    }

    /// Lets the request being built read up to `rows` rows of at most `bytes` in
    /// all: for an owner's listing, whose rows follow the owner's session count.
    pub(crate) fn allow_rows(&mut self, rows: usize, bytes: usize) {
        self.max_rows = rows;
        self.max_row_bytes = bytes;
    }
}

#[maybe_async::maybe_async]
impl Conn {
    /// Connects (over TLS as `sslmode` says) and authenticates.
    ///
    /// As in libpq, `prefer` tries without TLS when the server refuses the handshake
    /// or the encrypted connection (and reports that attempt's failure), and `allow`
    /// tries with TLS when the server refuses the connection without it (and reports
    /// the first refusal if TLS fails too).
    pub(crate) async fn connect(config: &Config, timeout: Duration) -> Result<Self, WireError> {
        let first = Self::connect_as(config, config.sslmode, timeout).await;
        let retry = match (&first, config.sslmode) {
            (Err(err), SslMode::Prefer) if err.tls_refused() => SslMode::Disable,
            (Err(WireError::Server(err)), SslMode::Allow) if err.code == NOT_AUTHORIZED => {
                SslMode::Require
            }
            (Err(WireError::Server(err)), SslMode::Disable)
                if err.code == NOT_AUTHORIZED && err.message.contains("no encryption") =>
            {
                return Err(WireError::Protocol(format!(
                    "{err} (the server takes this connection only over TLS, and the URL \
                     says sslmode=disable)"
                )));
            }
            _ => return first,
        };
        match Self::connect_as(config, retry, timeout).await {
            // With TLS refused, `allow`'s own refusal says more than TLS's.
            Err(_) if retry == SslMode::Require => first,
            retried => retried,
        }
    }

    async fn connect_as(
        config: &Config,
        sslmode: SslMode,
        timeout: Duration,
    ) -> Result<Self, WireError> {
        // `connect_timeout` bounds the connection; the store's timeout bounds it and
        // every later wait.
        let connect_timeout = config.connect_timeout.map_or(timeout, |t| t.min(timeout));
        let mut socket = Socket::connect(&config.address, connect_timeout)
            .await
            .map_err(WireError::Io)?;
        socket.set_timeout(timeout);
        let mut conn = Self {
            socket,
            write: BytesMut::with_capacity(1024),
            busy: true,
            prepared: false,
            named: false,
            max_rows: MAX_ROWS,
            max_row_bytes: MAX_MESSAGE,
        };
        // As in libpq, never over a Unix socket, which stays on this machine.
        let tcp = matches!(config.address, Address::Tcp(..));
        if tcp && matches!(sslmode, SslMode::Prefer | SslMode::Require) {
            let connector = config.connector.as_ref().ok_or_else(|| {
                WireError::Protocol("TLS is asked for, and its settings were not made".into())
            })?;
            conn.negotiate_tls(connector, sslmode == SslMode::Require)
                .await?;
        }
        let params = [
            ("user", config.user.as_str()),
            ("database", config.dbname.as_str()),
            ("application_name", config.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params, &mut conn.write).map_err(too_large)?;
        conn.send().await?;
        conn.authenticate(config).await?;
        // Then parameter statuses and the backend key, up to the first ReadyForQuery.
        loop {
            match conn.next_message().await? {
                Message::ReadyForQuery(_) => break,
                Message::ErrorResponse(body) => {
                    return Err(WireError::Server(ServerError::from_body(&body)))
                }
                _ => {}
            }
        }
        conn.busy = false;
        Ok(conn)
    }

    /// Asks the server for TLS (an SSLRequest, answered by one byte) and, if it
    /// agrees, completes the handshake. A server that declines is an error when TLS
    /// is `required`; otherwise the connection goes on unencrypted.
    async fn negotiate_tls(
        &mut self,
        connector: &Connector,
        required: bool,
    ) -> Result<(), WireError> {
        frontend::ssl_request(&mut self.write);
        self.send().await?;
        while self.socket.read.is_empty() {
            self.socket.receive().await.map_err(WireError::Io)?;
        }
        match self.socket.read[0] {
            b'S' => {
                let _ = self.socket.read.split_to(1);
                // Bytes after the `S` came unencrypted: `start_tls` refuses them.
                self.socket
                    .start_tls(connector)
                    .await
                    .map_err(WireError::Io)
            }
            b'N' if required => Err(WireError::Protocol(
                "the server does not accept TLS, and sslmode requires it (require, verify-ca \
                 or verify-full)"
                    .into(),
            )),
            b'N' => {
                let _ = self.socket.read.split_to(1);
                Ok(())
            }
            // An error message (the server cannot take the request).
            _ => match self.next_message().await? {
                Message::ErrorResponse(body) => {
                    Err(WireError::Server(ServerError::from_body(&body)))
                }
                _ => Err(WireError::Protocol(
                    "the server answered the TLS request with neither yes nor no".into(),
                )),
            },
        }
    }

    async fn authenticate(&mut self, config: &Config) -> Result<(), WireError> {
        let password = || {
            config.password.as_deref().ok_or_else(|| {
                WireError::Protocol(format!(
                    "the server asks for user {}'s password, and the URL has none",
                    config.user
                ))
            })
        };
        // A password may go to a server whose certificate was checked, or over a
        // connection that stays on this machine: not over TLS to whoever answered
        // (`prefer`, `require`), which anyone on the path could be.
        let safe = self.socket.is_local() || self.socket.is_verified();
        let allowed = |method: &str| {
            config
                .require_auth
                .check(method, safe)
                .map_err(WireError::Protocol)
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        let mut asked = false;
        let mut proven = false;
        loop {
            match self.next_message().await? {
                Message::AuthenticationOk => {
                    if scram.is_some() && !proven {
                        // Only a server that knows the password can prove it; one
                        // that skips the proof may be anyone.
                        return Err(WireError::Protocol(
                            "SCRAM: the server ended the exchange without proving that it \
                             knows the password"
                                .into(),
                        ));
                    }
                    if !asked {
                        allowed("none")?;
                    }
                    return Ok(());
                }
                Message::AuthenticationCleartextPassword => {
                    asked = true;
                    allowed("password")?;
                    // The codec ends the string itself (and refuses a NUL inside).
                    let text = password()?.as_bytes().to_vec();
                    if text.contains(&0) {
                        return Err(WireError::Protocol(
                            "the password holds a NUL character, which PostgreSQL's clear-text \
                             password message cannot carry"
                                .into(),
                        ));
                    }
                    frontend::password_message(&text, &mut self.write).map_err(too_large)?;
                    self.send().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    asked = true;
                    allowed("md5")?;
                    let hash = authentication::md5_hash(
                        config.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    let text = hash.into_bytes();
                    frontend::password_message(&text, &mut self.write).map_err(too_large)?;
                    self.send().await?;
                }
                Message::AuthenticationSasl(body) => {
                    use fallible_iterator::FallibleIterator;
                    asked = true;
                    allowed("scram-sha-256")?;
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Ok(Some(mechanism)) = mechanisms.next() {
                        offered |= mechanism == sasl::SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(WireError::Protocol(
                            "the server offers no SASL mechanism but SCRAM-SHA-256-PLUS, \
                             which needs TLS"
                                .into(),
                        ));
                    }
                    proven = false;
                    let state = sasl::ScramSha256::new(
                        password()?.as_bytes(),
                        sasl::ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        state.message(),
                        &mut self.write,
                    )
                    .map_err(too_large)?;
                    scram = Some(state);
                    self.send().await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        WireError::Protocol("SASL continue before SASL start".into())
                    })?;
                    check_iterations(body.data())?;
                    state
                        .update(body.data())
                        .map_err(|err| WireError::Protocol(format!("SCRAM: {err}")))?;
                    frontend::sasl_response(state.message(), &mut self.write).map_err(too_large)?;
                    self.send().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        WireError::Protocol("SASL final before SASL start".into())
                    })?;
                    state.finish(body.data()).map_err(|err| {
                        WireError::Protocol(format!("SCRAM: the server's proof is wrong: {err}"))
                    })?;
                    proven = true;
                }
                Message::ErrorResponse(body) => {
                    return Err(WireError::Server(ServerError::from_body(&body)))
                }
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(WireError::Protocol(
                        "the server asks for an authentication method this client lacks \
                         (Kerberos, GSSAPI or SSPI)"
                            .into(),
                    ))
                }
            }
        }
    }

    /// Sends what was queued and reads the reply up to `ReadyForQuery`.
    ///
    /// A server error ends the reply normally: the connection stays usable, and the
    /// error is returned. Any other failure leaves the connection busy, to be closed.
    pub(crate) async fn exchange(&mut self) -> Result<Reply, WireError> {
        self.busy = true;
        self.send().await?;
        let mut reply = Reply::default();
        // The rows of the command under way; a request's earlier commands (the
        // statement timeout's `set_config`) return rows nobody reads.
        let mut rows = Vec::new();
        let mut row_bytes = 0;
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(row) => {
                    row_bytes += row.buffer().len();
                    if rows.len() == self.max_rows || row_bytes > self.max_row_bytes {
                        return Err(WireError::Protocol(format!(
                            "the server sent more than the {} rows (or {} bytes) this \
                             statement may return",
                            self.max_rows, self.max_row_bytes
                        )));
                    }
                    rows.push(row);
                }
                Message::CommandComplete(body) => {
                    reply.rows = std::mem::take(&mut rows);
                    row_bytes = 0;
                    reply.affected = body
                        .tag()
                        .ok()
                        .and_then(|tag| tag.rsplit(' ').next())
                        .and_then(|count| count.parse().ok())
                        .unwrap_or(0);
                }
                Message::ErrorResponse(body) => {
                    let err = ServerError::from_body(&body);
                    if err.is_fatal() {
                        return Err(WireError::Server(err));
                    }
                    error.get_or_insert(err);
                }
                Message::ReadyForQuery(_) => {
                    self.busy = false;
                    return match error {
                        Some(err) => Err(WireError::Server(err)),
                        None => Ok(reply),
                    };
                }
                Message::BindComplete
                | Message::ParseComplete
                | Message::CloseComplete
                | Message::NoData
                | Message::EmptyQueryResponse
                | Message::RowDescription(_)
                | Message::ParameterDescription(_)
                | Message::ParameterStatus(_)
                | Message::NoticeResponse(_)
                | Message::NotificationResponse(_)
                | Message::PortalSuspended => {}
                _ => return Err(WireError::Protocol("unexpected message in a reply".into())),
            }
        }
    }

    async fn send(&mut self) -> Result<(), WireError> {
        let result = self.socket.send(&self.write).await;
        self.write.clear();
        // Its reply is due within the timeout, however slowly it comes.
        self.socket.reply_due();
        result.map_err(WireError::Io)
    }

    async fn next_message(&mut self) -> Result<Message, WireError> {
        loop {
            check_length(&self.socket.read)?;
            match Message::parse(&mut self.socket.read) {
                Ok(Some(message)) => return Ok(message),
                Ok(None) => {}
                Err(err) => return Err(WireError::Protocol(err.to_string())),
            }
            self.socket.receive().await.map_err(WireError::Io)?;
        }
    }
}

/// SQLSTATE `invalid_authorization_specification`: what a server that takes a
/// connection only with (or only without) TLS answers the other kind with.
const NOT_AUTHORIZED: &str = "28000";

/// The longest message a reply may carry: a row with the largest record, with room
/// to spare.
const MAX_MESSAGE: usize = crate::session::Record::MAX_ENCODED_LEN + 64 * 1024;

/// Refuses the message at the front of `read` when its length is past
/// [`MAX_MESSAGE`]: the length comes first, and is refused before anything of the
/// message is buffered (the codec would reserve room for all of it).
fn check_length(read: &[u8]) -> Result<(), WireError> {
    if let Some(header) = read.get(..5) {
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if usize::try_from(len).map_or(true, |len| len > MAX_MESSAGE) {
            return Err(WireError::Protocol(format!(
                "the server sent a message of {len} bytes, more than the {MAX_MESSAGE} \
                 a reply may carry"
            )));
        }
    }
    Ok(())
}

/// The most rows a reply may carry: every statement here returns one at most.
const MAX_ROWS: usize = 2;

/// The most PBKDF2 iterations a server may ask SCRAM for (PostgreSQL's default is
/// 4,096; OWASP suggests 600,000): each one is computed here, so a server asking
/// for billions would hold a connection, and a core, for hours.
const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

/// Refuses a SCRAM server-first message that asks for too many iterations.
fn check_iterations(server_first: &[u8]) -> Result<(), WireError> {
    let text = std::str::from_utf8(server_first)
        .map_err(|_| WireError::Protocol("SCRAM: the server's message is not UTF-8".into()))?;
    let iterations = text
        .split(',')
        .find_map(|attribute| attribute.strip_prefix("i="))
        .and_then(|count| count.parse::<u64>().ok());
    match iterations {
        Some(count) if count > u64::from(MAX_SCRAM_ITERATIONS) => {
            Err(WireError::Protocol(format!(
                "SCRAM: the server asks for {count} iterations, more than the \
             {MAX_SCRAM_ITERATIONS} this client computes"
            )))
        }
        // A count that does not parse is the codec's to refuse.
        _ => Ok(()),
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Say goodbye, so that the server logs no lost connection; never wait for it.
        if !self.busy {
            let mut bye = BytesMut::new();
            frontend::terminate(&mut bye);
            self.socket.write_now(&bye);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A backend message: its tag, its length, its body.
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Reads every message from `bytes` as the connection does: the length guard,
    /// the codec, and what this client reads out of rows and errors. Never panics.
    fn read_all(bytes: &[u8]) {
        let mut read = BytesMut::from(bytes);
        loop {
            if check_length(&read).is_err() {
                return;
            }
            match Message::parse(&mut read) {
                Ok(Some(Message::DataRow(row))) => {
                    let _ = columns(&row);
                }
                Ok(Some(Message::ErrorResponse(body))) => {
                    let _ = ServerError::from_body(&body);
                }
                Ok(Some(Message::AuthenticationSaslContinue(body))) => {
                    let _ = check_iterations(body.data());
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// A short fuzz run of the reply parsing: arbitrary bytes, and well-framed
        /// messages of every tag with arbitrary bodies.
        #[test]
        fn any_reply_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            read_all(&bytes);
        }

        #[test]
        fn framed_messages_with_any_body_never_panic(
            messages in proptest::collection::vec(
                (prop::sample::select(b"RSKZDCEINTtn1237s".to_vec()),
                 proptest::collection::vec(any::<u8>(), 0..64)),
                1..6,
            )
        ) {
            let bytes: Vec<u8> = messages
                .iter()
                .flat_map(|(tag, body)| message(*tag, body))
                .collect();
            read_all(&bytes);
        }
    }

    #[test]
    fn a_length_past_the_bound_is_refused_before_the_body() {
        let mut header = vec![b'D'];
        header.extend_from_slice(&((MAX_MESSAGE + 1) as i32).to_be_bytes());
        assert!(check_length(&header).is_err());
        header[1..5].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(check_length(&header).is_err());
        header[1..5].copy_from_slice(&(MAX_MESSAGE as i32).to_be_bytes());
        assert!(check_length(&header).is_ok());
        assert!(check_iterations(b"r=abc,s=c2FsdA==,i=4096").is_ok());
        assert!(check_iterations(b"r=abc,s=c2FsdA==,i=600000").is_ok());
        assert!(check_iterations(b"r=abc,s=c2FsdA==,i=1000001").is_err());
    }
}
