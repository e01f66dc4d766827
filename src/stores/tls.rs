//! TLS for the network stores, through rustls on our own sockets.
//!
//! A rustls connection does no I/O of its own: [`Session`] holds it with the
//! ciphertext read from the socket and not yet taken in, and the ciphertext it made
//! and that is not yet written, and [`Socket`](super::net::Socket) moves the bytes.
//! The state sits behind a small lock of its own, so that one thread may read while
//! another writes (the Redis connection in sync mode does), and so that any number of
//! calls share one connection; a writer keeps a second lock until its records are on
//! the socket, so that records go out in the order they were sealed.
//!
//! What a URL asks for ([`Options`]) becomes a [`Connector`] once per store: the
//! files it names are read then, so that a missing or malformed one fails the store's
//! construction rather than its first operation. One handshake per connection; a
//! pooled connection reuses its session.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use parking_lot::Mutex;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    AlertDescription, CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct,
    RootCertStore, SignatureScheme,
};

use super::net::Address;
use crate::session_store::{Error, Result};

/// How much of the server's certificate a connection checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing: the connection is encrypted, but the server may be anyone (libpq's
    /// `require` without a root file, Redis' `insecure=true`).
    Nothing,
    /// That a trusted authority signed it, whatever host it names (`verify-ca`).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Chain,
    /// That a trusted authority signed it for the host connected to (`verify-full`,
    /// and `rediss://`).
    Full,
}

/// Which authorities a connection trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Roots {
    /// The system's (`SSL_CERT_FILE` and `SSL_CERT_DIR` where set).
    System,
    /// Those in a PEM file.
    File(PathBuf),
}

/// What a URL says about TLS, before any file is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Options {
    pub(crate) verify: Verify,
    pub(crate) roots: Roots,
    /// A client certificate chain and its key, PEM files (mutual TLS).
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
    /// Whether the host name goes out as SNI (never an IP address, which TLS does
    /// not send).
    pub(crate) sni: bool,
    /// The name to send and to check the certificate against, when it is not the
    /// host connected to (Redis' `sni=NAME`).
    pub(crate) server_name: Option<String>,
}

impl Options {
    /// Verifies the chain and the host name against the system's roots, sends SNI.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn verify_full() -> Self {
        Self {
            verify: Verify::Full,
            roots: Roots::System,
            client_cert: None,
            sni: true,
            server_name: None,
        }
    }

    /// Reads the files the options name and builds the settings for the server at
    /// `address`.
    pub(crate) fn connector(&self, address: &Address) -> Result<Connector> {
        let mut connector =
            Connector::new(self.client_config()?, address, self.server_name.as_deref())?;
        connector.verified = self.verify != Verify::Nothing;
        Ok(connector)
    }

    /// Reads the files the options name and builds the connection settings.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| failed("building the TLS settings", err))?;
        let builder = match self.verify {
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(
                    provider.signature_verification_algorithms,
                ))),
            Verify::Chain | Verify::Full => {
                let roots = match &self.roots {
                    Roots::System => system_roots()?,
                    Roots::File(path) => Arc::new(roots_from(path)?),
                };
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|err| failed("building the TLS certificate verifier", err))?;
                if self.verify == Verify::Full {
                    builder.with_webpki_verifier(webpki)
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                }
            }
        };
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates_from(cert, "client certificate")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|err| {
                    Error::backend(format!(
                        "cannot read the client key from {}: {err}",
                        key.display()
                    ))
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| failed("using the client certificate and key", err))?
            }
        };
        config.enable_sni = self.sni;
        Ok(Arc::new(config))
    }
}

/// rustls with the `ring` provider, whatever other provider the program enabled
/// (`ClientConfig::builder` panics when it cannot tell which one to take).
///
/// rustls 0.23.48 marks it deprecated because ring has no post-quantum key exchange;
/// aws-lc-rs has one, at several times the build time and a cmake or NASM toolchain
/// on some targets. A program that wants it gives its own `ClientConfig`
/// (`with_tls_config`).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

fn failed(what: &str, err: impl fmt::Display) -> Error {
    Error::backend(format!("{what} failed: {err}"))
}

/// The system's trusted roots, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>> {
    static ROOTS: OnceLock<std::result::Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(format!(
                    "this system has no trusted root certificates to verify the server \
                     with ({why}): install them (Debian: ca-certificates), or name the \
                     authority's certificate file (sslrootcert=PATH, cacert=PATH)"
                ));
            }
            Ok(Arc::new(roots))
        })
        .clone()
        .map_err(Error::backend)
}

fn certificates_from(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let unreadable = |err: &dyn fmt::Display| {
        Error::backend(format!(
            "cannot read the {what} file {}: {err}",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| unreadable(&err))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|err| unreadable(&err))?;
    if certs.is_empty() {
        return Err(unreadable(&"it holds no PEM certificate"));
    }
    Ok(certs)
}

fn roots_from(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certificates_from(path, "certificate authority")? {
        roots.add(cert).map_err(|err| {
            Error::backend(format!(
                "a certificate in {} cannot be used as a root: {err}",
                path.display()
            ))
        })?;
    }
    Ok(roots)
}

/// Connection settings and the name the server is reached by: what each new
/// connection of a store starts its TLS session with.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    /// Whether the server's certificate is checked (always, for a configuration
    /// given whole: its verifier is the caller's).
    verified: bool,
    /// Whether `name` was given (`sni=NAME`) rather than taken from the address: it
    /// then stands for every server the settings reach.
    named: bool,
}

impl PartialEq for Connector {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
            && self.name == other.name
            && self.verified == other.verified
    }
}

impl Eq for Connector {}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Settings for the server at `address`, reached by its host name or IP address,
    /// or by `server_name` where given (what SNI sends and the certificate must name).
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        address: &Address,
        server_name: Option<&str>,
    ) -> Result<Self> {
        let host = match (server_name, address) {
            (Some(name), _) => name,
            (None, Address::Tcp(host, _)) => host.as_str(),
            #[cfg(unix)]
            (None, Address::Unix(_)) => {
                return Err(Error::backend(
                    "TLS over a Unix socket is not supported: the socket never leaves this \
                     machine, so connect without TLS, or over TCP",
                ))
            }
        };
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            Error::backend(
                "TLS needs the server's host name or IP address, and the URL's host is \
                 neither",
            )
        })?;
        Ok(Self {
            config,
            name,
            verified: true,
            named: server_name.is_some(),
        })
    }

    /// The same settings for another server of the same deployment (a cluster node,
    /// a sentinel, a primary a sentinel named): reached by its own host name or IP
    /// address, unless a name was given for all.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn to(&self, address: &Address) -> Result<Self> {
        if self.named {
            return Ok(self.clone());
        }
        let mut connector = Self::new(Arc::clone(&self.config), address, None)?;
        connector.verified = self.verified;
        Ok(connector)
    }

    /// Starts a client session (nothing is sent yet).
    pub(crate) fn session(&self) -> io::Result<Session> {
        let mut conn = ClientConnection::new(Arc::clone(&self.config), self.name.clone())
            .map_err(|err| tls_error(err, None))?;
        // Every byte handed over is taken: the socket layer bounds what it sends.
        conn.set_buffer_limit(None);
        Ok(Session {
            state: Mutex::new(State {
                conn,
                incoming: Vec::new(),
                outgoing: Vec::new(),
                without_data: 0,
            }),
            writing: Mutex::new(Vec::new()),
            verified: self.verified,
        })
    }
}

/// One connection's TLS state.
pub(crate) struct Session {
    state: Mutex<State>,
    /// Held by a writer from sealing its records to their last byte on the socket;
    /// the spare buffer they are moved out into.
    writing: Mutex<Vec<u8>>,
    /// Whether the server's certificate was checked.
    verified: bool,
}

struct State {
    conn: ClientConnection,
    /// Ciphertext read and not yet taken in.
    incoming: Vec<u8>,
    /// Ciphertext made and not yet written.
    outgoing: Vec<u8>,
    /// Ciphertext taken in since the handshake, or since the last plaintext, that
    /// brought none (session tickets, key updates): bounded by
    /// [`MAX_WITHOUT_DATA`].
    without_data: usize,
}

/// How much ciphertext a server may send after the handshake without any data in it
/// before the connection is refused: a server sends a few session tickets, of a few
/// hundred bytes each; one that sends them endlessly would keep a caller (and, in
/// async mode, its executor thread) busy past every deadline.
const MAX_WITHOUT_DATA: usize = 64 * 1024;

impl State {
    /// Moves what the connection has to send into `outgoing`.
    fn drain(&mut self) {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.outgoing).is_err() {
                break;
            }
        }
    }

    /// Takes plaintext into `buf`: `None` if none can be had without reading more.
    fn take_plain(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        use std::io::Read;
        loop {
            match self.conn.reader().read(buf) {
                Ok(0) if !buf.is_empty() => return Err(super::net::closed()),
                Ok(n) => {
                    self.without_data = 0;
                    return Ok(Some(n));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(super::net::closed())
                }
                Err(err) => return Err(err),
            }
            if self.incoming.is_empty() {
                return Ok(None);
            }
            self.take_in()?;
        }
    }

    /// Hands the connection what was read, as far as it takes it, and processes it.
    fn take_in(&mut self) -> io::Result<()> {
        let mut rest = &self.incoming[..];
        let taken = self.conn.read_tls(&mut rest)?;
        self.incoming.drain(..taken);
        let handshaking = self.conn.is_handshaking();
        match self.conn.process_new_packets() {
            Err(err) => {
                // The alert rustls queued for the server goes with the next write, if any.
                self.drain();
                Err(tls_error(err, Some(&self.conn)))
            }
            Ok(io) if !handshaking && io.plaintext_bytes_to_read() == 0 => {
                self.without_data += taken;
                if self.without_data > MAX_WITHOUT_DATA {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the server sent more than 64 KiB of TLS records without data \
                         (session tickets or key updates without end)",
                    ));
                }
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// `true` if the server's certificate was checked.
    pub(crate) fn is_verified(&self) -> bool {
        self.verified
    }

    /// `true` until the handshake is done.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.state.lock().conn.is_handshaking()
    }

    /// Takes plaintext into `buf`; `None` when more must be read from the socket.
    pub(crate) fn take_plain(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.state.lock().take_plain(buf)
    }

    /// Takes in ciphertext read from the socket (handshake messages are processed
    /// at once).
    pub(crate) fn feed(&self, ciphertext: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        state.incoming.extend_from_slice(ciphertext);
        if state.conn.is_handshaking() {
            while !state.incoming.is_empty() && state.conn.is_handshaking() {
                state.take_in()?;
            }
        }
        Ok(())
    }

    /// Seals `plaintext` (none for the handshake's own messages) and calls `write`
    /// with all the ciphertext waiting to go out, in order, under the writer's lock.
    pub(crate) fn seal_and<T>(
        &self,
        plaintext: &[u8],
        write: impl FnOnce(&[u8]) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut spare = self.writing.lock();
        {
            let mut state = self.state.lock();
            if !plaintext.is_empty() {
                use std::io::Write;
                state.conn.writer().write_all(plaintext)?;
            }
            state.drain();
            std::mem::swap(&mut *spare, &mut state.outgoing);
        }
        let written = write(&spare);
        spare.clear();
        written
    }

    /// Non-blocking writes (async mode): seals `plaintext` and writes what the socket
    /// takes with `write_now`; ciphertext it does not take waits for the next call.
    /// Takes nothing (`WouldBlock`) while earlier ciphertext waits.
    #[cfg_attr(feature = "sync", allow(dead_code))]
    pub(crate) fn write_now(
        &self,
        plaintext: &[u8],
        mut write_now: impl FnMut(&[u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut state = self.state.lock();
        state.drain();
        let flush = |state: &mut State, write_now: &mut dyn FnMut(&[u8]) -> io::Result<usize>| {
            while !state.outgoing.is_empty() {
                match write_now(&state.outgoing) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        state.outgoing.drain(..n);
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err),
                }
            }
            Ok(())
        };
        flush(&mut state, &mut write_now)?;
        if plaintext.is_empty() {
            return Ok(0);
        }
        {
            use std::io::Write;
            state.conn.writer().write_all(plaintext)?;
        }
        state.drain();
        match flush(&mut state, &mut write_now) {
            Err(err) if err.kind() != io::ErrorKind::WouldBlock => Err(err),
            _ => Ok(plaintext.len()),
        }
    }

    /// `true` while sealed ciphertext waits to be written.
    #[cfg_attr(feature = "sync", allow(dead_code))]
    pub(crate) fn unflushed(&self) -> bool {
        let state = self.state.lock();
        !state.outgoing.is_empty() || state.conn.wants_write()
    }
}

/// A TLS failure, with what it means for the user first.
#[derive(Debug)]
pub(crate) struct TlsError {
    meaning: &'static str,
    source: rustls::Error,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS: {}", self.meaning)
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// An I/O error for a rustls error, saying what failed in words a user acts on.
fn tls_error(err: rustls::Error, conn: Option<&ClientConnection>) -> io::Error {
    use rustls::Error as E;
    let handshaking = conn.is_none_or(|conn| conn.is_handshaking());
    let meaning = match &err {
        E::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => {
                "the server's certificate is not signed by a trusted authority (name the \
                 authority's certificate with sslrootcert=PATH or cacert=PATH)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the server's certificate does not name the host connected to (host name \
                 mismatch)"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet"
            }
            CertificateError::Revoked => "the server's certificate is revoked",
            _ => "the server's certificate is not valid",
        },
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the server requires a client certificate (sslcert and sslkey, or cert and key)"
        }
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied,
        ) => "the server refused the client certificate",
        E::AlertReceived(AlertDescription::HandshakeFailure) if handshaking => {
            "the server refused the handshake (no protocol version or cipher in common, or \
             it requires a client certificate)"
        }
        _ if handshaking => "the handshake failed",
        _ => "the encrypted connection failed",
    };
    io::Error::new(
        io::ErrorKind::InvalidData,
        TlsError {
            meaning,
            source: err,
        },
    )
}

/// Accepts any certificate, still checking the handshake's signatures with it: an
/// encrypted connection to whoever answers.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Checks that a trusted authority signed the certificate, whatever name it holds
/// (libpq's `verify-ca`).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
