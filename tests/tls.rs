//! TLS against real servers the tests start themselves, on ports of their own:
//! Debian's `redis-server` with `--tls-port`, and a PostgreSQL cluster with
//! `ssl = on` whose TCP connections must be encrypted. Certificates are made at test
//! time (a test authority, another one, a server certificate for `127.0.0.1` and
//! `sessions.test`, an expired one, a client certificate), so none can expire in the
//! repository.
#![cfg(all(feature = "redis", feature = "postgres"))]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration as StdDuration, Instant},
};

use portable_sessions::{
    session::Id, session_store::Result, testing, PostgresStore, RedisStore, SessionStore,
};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use common::{block, live_record, TempDir};

/// A reply over TLS on a loaded machine: the handshake is a round trip or two more.
const TIMEOUT: StdDuration = StdDuration::from_secs(2);

/// An authority and what it signed, written as PEM files in a directory of their own.
struct Pki {
    dir: TempDir,
}

/// A certificate's and its key's files.
struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

fn authority(name: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.self_signed(&key).unwrap(), key)
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: TempDir::new("pki"),
        };
        let (ca, ca_key) = authority("portable-sessions test CA");
        std::fs::write(pki.path("ca.crt"), ca.pem()).unwrap();
        let (other, _) = authority("another CA");
        std::fs::write(pki.path("other-ca.crt"), other.pem()).unwrap();

        let now = OffsetDateTime::now_utc();
        let leaf =
            |name: &str, sans: &[&str], usages: Vec<ExtendedKeyUsagePurpose>, from, until| {
                let key = KeyPair::generate().unwrap();
                let sans: Vec<String> = sans.iter().map(|san| san.to_string()).collect();
                let mut params = CertificateParams::new(sans).unwrap();
                params.distinguished_name.push(DnType::CommonName, name);
                params.extended_key_usages = usages;
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.not_before = from;
                params.not_after = until;
                let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
                std::fs::write(pki.path(&format!("{name}.crt")), cert.pem()).unwrap();
                std::fs::write(pki.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
            };
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let names = ["127.0.0.1", "sessions.test"];
        let (day, year) = (Duration::days(1), Duration::days(365));
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        leaf(
            "server",
            &names,
            vec![server.clone()],
            now - day,
            now + year,
        );
        leaf(
            "expired",
            &names,
            vec![server.clone()],
            now - year,
            now - day,
        );
        leaf(
            "client",
            &["client.test"],
            vec![client.clone()],
            now - day,
            now + year,
        );
        // A cluster node is a client of the others too, and its bus demands a
        // client certificate.
        leaf("node", &names, vec![server, client], now - day, now + year);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
        }
    }

    /// Hands the files to the `postgres` user when we are root: the server refuses a
    /// key file another user owns.
    fn give_to_postgres(&self) {
        common::give_to_postgres_user(&self.dir);
        for entry in std::fs::read_dir(&self.dir.0).unwrap() {
            use std::os::unix::fs::PermissionsExt;
            let path = entry.unwrap().path();
            let mode = if path.is_dir() { 0o700 } else { 0o600 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}

/// A `redis-server` listening with TLS only, on 127.0.0.1.
struct RedisTls {
    port: u16,
    child: Child,
    args: Vec<String>,
}

impl RedisTls {
    fn start(pki: &Pki, cert: &str, auth_clients: bool) -> Self {
        let pair = pki.pair(cert);
        let args = vec![
            "--port".into(),
            "0".into(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--tls-cert-file".into(),
            pair.cert.display().to_string(),
            "--tls-key-file".into(),
            pair.key.display().to_string(),
            "--tls-ca-cert-file".into(),
            pki.path("ca.crt").display().to_string(),
            "--tls-auth-clients".into(),
            if auth_clients { "yes" } else { "no" }.into(),
        ];
        let (port, child) =
            common::start_on_a_free_port("redis-server", |port| Self::spawn(&args, port));
        Self { port, child, args }
    }

    fn spawn(args: &[String], port: u16) -> Child {
        common::spawn_redis_server(
            Command::new("redis-server")
                .args(args)
                .args(["--tls-port", &port.to_string()]),
        )
    }

    fn url(&self, query: &str) -> String {
        format!("rediss://127.0.0.1:{}/?{query}", self.port)
    }

    /// `total_connections_received`, asked through `redis-cli` over TLS (its own
    /// connection counts too).
    fn connections_received(&self, ca: &str) -> u64 {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--tls", "--cacert", ca, "INFO", "stats"])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.strip_prefix("total_connections_received:"))
            .unwrap_or_else(|| panic!("no total_connections_received in {output:?}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Kills the server (SIGKILL) and starts it again on the same port.
    fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        for _ in 0..50 {
            self.child = Self::spawn(&self.args, self.port);
            if common::wait_listening("redis-server", self.port, &mut self.child) {
                return;
            }
            std::thread::sleep(StdDuration::from_millis(100));
        }
        panic!("redis-server could not listen on its port again");
    }
}

#[cfg(not(feature = "sync"))]
impl RedisTls {
    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
    }
}

impl Drop for RedisTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster of the test's own that takes TCP connections over TLS only
/// (`hostssl`): database `mtls` also wants a client certificate the test authority
/// signed. Its Unix socket, in its directory, is for the test's own `psql`.
struct PgTls {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PgTls {
    fn start(pki: &Pki) -> Self {
        let dir = TempDir::new("pg-tls");
        common::give_to_postgres_user(&dir);
        let data = dir.0.join("data");
        common::initdb(&data, &["--auth=trust".as_ref()]);
        // Written by the server's user (the directory is theirs).
        let hba = "local all all trust\n\
                   hostssl mtls all 127.0.0.1/32 trust clientcert=verify-ca\n\
                   hostssl clear all 127.0.0.1/32 password\n\
                   hostssl all all 127.0.0.1/32 trust\n";
        write_as_postgres(&data.join("pg_hba.conf"), hba);
        let mut server = Self {
            dir,
            port: 0,
            child: None,
        };
        let (port, child) =
            common::start_on_a_free_port("postgres", |port| server.spawn(pki, port));
        server.port = port;
        server.child = Some(child);
        server.wait_ready();
        server.psql("CREATE DATABASE mtls");
        server.psql("CREATE DATABASE clear");
        server.psql("ALTER USER postgres PASSWORD 'sesame'");
        server
    }

    fn spawn(&self, pki: &Pki, port: u16) -> Child {
        let setting = |name: &str, value: &Path| format!("{name}={}", value.display());
        common::as_postgres_user(common::pg_bin("postgres"))
            .arg("-D")
            .arg(self.dir.0.join("data"))
            .arg("-k")
            .arg(&self.dir.0)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "ssl=on"])
            .arg("-c")
            .arg(setting("ssl_cert_file", &pki.path("server.crt")))
            .arg("-c")
            .arg(setting("ssl_key_file", &pki.path("server.key")))
            .arg("-c")
            .arg(setting("ssl_ca_file", &pki.path("ca.crt")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres runs")
    }

    fn wait_ready(&self) {
        common::wait_for("postgres to take connections", || {
            Command::new(common::pg_bin("pg_isready"))
                .arg("-h")
                .arg(&self.dir.0)
                .args(["-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|status| status.success())
        });
    }

    fn psql(&self, sql: &str) -> String {
        common::psql_at(&self.dir.0, self.port, "postgres", sql)
    }

    fn url(&self, host: &str, db: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/{db}?{query}", self.port)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port.
    fn restart(&mut self, pki: &Pki) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
        // A killed postmaster leaves its children to notice and exit.
        let pid_file = self.dir.0.join("data").join("postmaster.pid");
        for _ in 0..100 {
            let mut child = self.spawn(pki, self.port);
            if common::wait_listening("postgres", self.port, &mut child) {
                self.child = Some(child);
                self.wait_ready();
                return;
            }
            let _ = std::fs::remove_file(&pid_file);
            std::thread::sleep(StdDuration::from_millis(100));
        }
        panic!("postgres could not listen on its port again");
    }
}

impl Drop for PgTls {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write_as_postgres(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    if rustix::process::getuid().is_root() {
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// The error of a store's first operation, as a report.
#[maybe_async::maybe_async]
async fn first_error<S: SessionStore>(store: Result<S>) -> String {
    let store = match store {
        Ok(store) => store,
        Err(err) => return err.report(),
    };
    let started = Instant::now();
    let err = store
        .load(&Id::default())
        .await
        .expect_err("the connection must fail")
        .report();
    assert!(
        started.elapsed() < TIMEOUT * 3,
        "failed after {:?}: {err}",
        started.elapsed()
    );
    err
}

/// A record written and read back: the connection works.
#[maybe_async::maybe_async]
async fn round_trip<S: SessionStore>(store: &S) {
    let mut record = live_record(7);
    store.create(&mut record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
}

fn redis(url: &str) -> Result<RedisStore> {
    Ok(RedisStore::new(url)?
        .with_timeout(TIMEOUT)
        .with_key_prefix(common::unique_prefix("tls")))
}

fn postgres(url: &str) -> Result<PostgresStore> {
    Ok(PostgresStore::new(url)?.with_timeout(TIMEOUT))
}

fn assert_says(report: &str, expected: &str) {
    assert!(
        report.contains(expected),
        "expected {expected:?} in: {report}"
    );
}

#[maybe_async::maybe_async]
async fn redis_verifies_the_server() {
    let pki = Pki::new();
    let server = RedisTls::start(&pki, "server", false);
    let ca = pki.path("ca.crt").display().to_string();

    let store = redis(&server.url(&format!("cacert={ca}"))).unwrap();
    testing::check_store(&store).await;
    testing::check_update(&store).await;
    large_values_cross_many_records(&store).await;
    // SNI names the server, and the certificate is checked against that name.
    round_trip(&redis(&server.url(&format!("cacert={ca}&sni=sessions.test"))).unwrap()).await;
    let report = first_error(redis(&server.url(&format!("cacert={ca}&sni=wrong.test")))).await;
    assert_says(&report, "host name mismatch");

    let other = pki.path("other-ca.crt").display().to_string();
    let report = first_error(redis(&server.url(&format!("cacert={other}")))).await;
    assert_says(&report, "not signed by a trusted authority");
    // The system's roots do not hold the test authority either (a system with none
    // fails as the store is made).
    let report = first_error(redis(&server.url(""))).await;
    assert!(
        report.contains("not signed by a trusted authority")
            || report.contains("no trusted root certificates"),
        "{report}"
    );
    // Only asked for by name, verification is skipped.
    round_trip(&redis(&server.url(&format!("cacert={other}&insecure=true"))).unwrap()).await;

    // Plain text to a TLS port: the server drops the connection.
    let plain = format!("redis://127.0.0.1:{}", server.port);
    let report = first_error(redis(&plain)).await;
    assert!(
        report.contains("reading from 127.0.0.1")
            && (report.contains("closed") || report.contains("reset")),
        "{report}"
    );

    let expired = RedisTls::start(&pki, "expired", false);
    let report = first_error(redis(&expired.url(&format!("cacert={ca}")))).await;
    assert_says(&report, "expired");
}

/// Values larger than a TLS record (16 KiB) arrive in several records, and often in
/// parts of one per read.
#[maybe_async::maybe_async]
async fn large_values_cross_many_records<S: SessionStore>(store: &S) {
    for size in [15_000, 16_384, 100_000, 700_000] {
        let mut record = live_record(size as u64);
        let value: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        record.insert("blob", &value).unwrap();
        store.create(&mut record).await.unwrap();
        let loaded = store.load(&record.id).await.unwrap();
        assert_eq!(loaded, Some(record));
    }
}

#[maybe_async::maybe_async]
async fn redis_mutual_tls() {
    let pki = Pki::new();
    let server = RedisTls::start(&pki, "server", true);
    let ca = pki.path("ca.crt").display().to_string();
    let client = pki.pair("client");
    let url = server.url(&format!(
        "cacert={ca}&cert={}&key={}",
        client.cert.display(),
        client.key.display()
    ));
    let store = redis(&url).unwrap();
    testing::check_store(&store).await;

    let report = first_error(redis(&server.url(&format!("cacert={ca}")))).await;
    assert_says(&report, "client certificate");
    let report = first_error(redis(
        &server.url(&format!("cacert={ca}&cert=/no/such.crt&key=/no/such.key")),
    ))
    .await;
    assert_says(&report, "/no/such.crt");
}

#[maybe_async::maybe_async]
async fn redis_reconnects_over_tls_after_a_restart() {
    let pki = Pki::new();
    let mut server = RedisTls::start(&pki, "server", false);
    let ca = pki.path("ca.crt").display().to_string();
    let store = redis(&server.url(&format!("cacert={ca}"))).unwrap();
    round_trip(&store).await;
    server.restart();
    // The pooled connection died with the server: the next operation finds it
    // closed and connects again, with a new handshake.
    round_trip(&store).await;
}

#[maybe_async::maybe_async]
async fn postgres_verifies_the_server() {
    let pki = Pki::new();
    pki.give_to_postgres();
    let server = PgTls::start(&pki);
    let ca = pki.path("ca.crt").display().to_string();
    let full = format!("sslmode=verify-full&sslrootcert={ca}");

    let store = postgres(&server.url("127.0.0.1", "postgres", &full)).unwrap();
    testing::check_store(&store).await;
    testing::check_update(&store).await;
    large_values_cross_many_records(&store).await;
    // The default, prefer, encrypts (the server takes nothing else over TCP), and
    // so do require and a root file's verify-ca.
    for query in ["", "sslmode=require", &format!("sslrootcert={ca}")] {
        round_trip(&postgres(&server.url("127.0.0.1", "postgres", query)).unwrap()).await;
    }

    // The certificate names 127.0.0.1 and sessions.test, not localhost: verify-ca
    // takes it, verify-full does not.
    let report = first_error(postgres(&server.url("localhost", "postgres", &full))).await;
    assert_says(&report, "host name mismatch");
    let chain = format!("sslmode=verify-ca&sslrootcert={ca}");
    round_trip(&postgres(&server.url("localhost", "postgres", &chain)).unwrap()).await;

    let other = pki.path("other-ca.crt").display().to_string();
    let wrong_ca = format!("sslmode=verify-full&sslrootcert={other}");
    let report = first_error(postgres(&server.url("127.0.0.1", "postgres", &wrong_ca))).await;
    assert_says(&report, "not signed by a trusted authority");
    let report = first_error(postgres(&server.url(
        "127.0.0.1",
        "postgres",
        "sslmode=verify-full",
    )))
    .await;
    assert!(
        report.contains("not signed by a trusted authority")
            || report.contains("no trusted root certificates"),
        "{report}"
    );
    // require with a root file checks the chain, as verify-ca.
    let require_other = format!("sslmode=require&sslrootcert={other}");
    let report = first_error(postgres(&server.url(
        "127.0.0.1",
        "postgres",
        &require_other,
    )))
    .await;
    assert_says(&report, "not signed by a trusted authority");

    // A server that asks for the password in clear text gets it over TLS (that it
    // does not over TLS to an unverified server on another machine is in
    // hostile_servers.rs: here the server is on loopback).
    let clear = format!(
        "postgres://postgres:sesame@127.0.0.1:{}/clear?{full}",
        server.port
    );
    round_trip(&postgres(&clear).unwrap()).await;

    let report = first_error(postgres(&server.url(
        "127.0.0.1",
        "postgres",
        "sslmode=disable",
    )))
    .await;
    assert_says(&report, "only over TLS");
    // allow: without TLS first, then with it.
    round_trip(&postgres(&server.url("127.0.0.1", "postgres", "sslmode=allow")).unwrap()).await;

    // Mutual TLS: database mtls wants a client certificate.
    let client = pki.pair("client");
    let with_cert = format!(
        "{full}&sslcert={}&sslkey={}",
        client.cert.display(),
        client.key.display()
    );
    round_trip(&postgres(&server.url("127.0.0.1", "mtls", &with_cert)).unwrap()).await;
    let report = first_error(postgres(&server.url("127.0.0.1", "mtls", &full))).await;
    assert_says(&report, "certificate");

    // An expired server certificate, once the server has reloaded its files.
    let (live, expired) = (pki.pair("server"), pki.pair("expired"));
    let kept = (
        std::fs::read(&live.cert).unwrap(),
        std::fs::read(&live.key).unwrap(),
    );
    std::fs::copy(&expired.cert, &live.cert).unwrap();
    std::fs::copy(&expired.key, &live.key).unwrap();
    server.psql("SELECT pg_reload_conf()");
    let url = server.url("127.0.0.1", "postgres", &full);
    let report = loop_until_error(&url, "expired").await;
    assert_says(&report, "expired");
    std::fs::write(&live.cert, kept.0).unwrap();
    std::fs::write(&live.key, kept.1).unwrap();
}

/// The first error of new stores on `url` that says `expected`, trying for a while:
/// the server reloads its certificate files a moment after it is told to.
#[maybe_async::maybe_async]
async fn loop_until_error(url: &str, expected: &str) -> String {
    let deadline = Instant::now() + StdDuration::from_secs(10);
    loop {
        let store = postgres(url).unwrap();
        if let Err(err) = store.load(&Id::default()).await {
            let report = err.report();
            if report.contains(expected) || Instant::now() > deadline {
                return report;
            }
        }
        assert!(Instant::now() < deadline, "{url} kept working");
        std::thread::sleep(StdDuration::from_millis(50));
    }
}

#[maybe_async::maybe_async]
async fn postgres_reconnects_over_tls_after_a_restart() {
    let pki = Pki::new();
    pki.give_to_postgres();
    let mut server = PgTls::start(&pki);
    let ca = pki.path("ca.crt").display().to_string();
    let url = server.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let store = postgres(&url).unwrap();
    round_trip(&store).await;
    server.restart(&pki);
    round_trip(&store).await;
}

tests_in_both_modes!(
    redis_verifies_the_server,
    redis_mutual_tls,
    redis_reconnects_over_tls_after_a_restart,
    postgres_verifies_the_server,
    postgres_reconnects_over_tls_after_a_restart,
    a_whole_client_config_can_be_given,
    a_tls_configuration_given_later_takes_connections_of_its_own,
);

/// Sixteen callers pipelining reads, writes and refused updates on one TLS
/// connection (in sync mode one thread reads while others write): every reply is its
/// caller's own.
#[test]
fn concurrent_callers_share_one_tls_connection() {
    let pki = Pki::new();
    let server = RedisTls::start(&pki, "server", false);
    let ca = pki.path("ca.crt").display().to_string();
    let store = redis(&server.url(&format!("cacert={ca}"))).unwrap();
    let records = common::created(&store, 64);
    common::sixteen_callers(&store, &records);
    for record in &records {
        assert_eq!(
            block(store.load(&record.id)).unwrap().as_ref(),
            Some(record)
        );
    }
    // One handshake for all of it: the store's connection, and redis-cli's (Redis
    // counts a TLS connection once its handshake is done, so the start-up probe's
    // plain one does not count).
    assert_eq!(server.connections_received(&ca), 2);
}

/// Over TLS a command waits for the reader to write it with others (commands one
/// record each are served one a turn of Redis' event loop). One held back whose
/// future is dropped, and the reader's too, still goes out at once, as a dropped
/// operation's command does in plain text, not with whatever call comes next.
#[cfg(not(feature = "sync"))]
#[test]
fn a_command_held_for_the_reader_goes_out_when_its_caller_is_dropped() {
    use futures_lite::future::poll_once;
    use rustix::process::Signal;
    let pki = Pki::new();
    let server = RedisTls::start(&pki, "server", false);
    let ca = pki.path("ca.crt").display().to_string();
    let url = server.url(&format!("cacert={ca}"));
    let store = redis(&url).unwrap();
    let mut first = live_record(1);
    block(store.create(&mut first)).unwrap();

    server.signal(Signal::STOP);
    let mut reader = Box::pin(store.load(&first.id));
    assert!(
        block(poll_once(reader.as_mut())).is_none(),
        "the server is frozen"
    );
    let held = live_record(2);
    let mut save = Box::pin(store.save(&held));
    assert!(
        block(poll_once(save.as_mut())).is_none(),
        "held for the reader"
    );
    // Dropped, the save first, then the reader: no caller is left to read or write.
    drop(save);
    drop(reader);
    server.signal(Signal::CONT);

    // Another store, on a connection of its own, sees the dropped save land.
    let other = redis(&url).unwrap().with_key_prefix(store.key_prefix());
    common::wait_for("the held-back save to land", || {
        block(other.load(&held.id)).unwrap().is_some()
    });
}

/// A whole rustls configuration trusting the authority in `ca`.
#[allow(deprecated)] // ring's provider: see src/stores/tls.rs
fn client_config(ca: &Path) -> portable_sessions::rustls::ClientConfig {
    use portable_sessions::rustls::{self, pki_types::pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[maybe_async::maybe_async]
async fn a_whole_client_config_can_be_given() {
    let pki = Pki::new();
    let server = RedisTls::start(&pki, "server", false);
    let config = client_config(&pki.path("ca.crt"));
    // A plain URL: the configuration given turns TLS on.
    let url = format!("redis://127.0.0.1:{}", server.port);
    let store = redis(&url).unwrap().with_tls_config(config).unwrap();
    round_trip(&store).await;
}

/// A store given a TLS configuration after it connected never sends another byte
/// over the plain connection it had: it connects again, over TLS (which the plain
/// shared server refuses).
#[maybe_async::maybe_async]
async fn a_tls_configuration_given_later_takes_connections_of_its_own() {
    let pki = Pki::new();
    let plain = common::shared_redis("tls-later");
    round_trip(&plain).await;
    let tls = plain
        .clone()
        .with_tls_config(client_config(&pki.path("ca.crt")))
        .unwrap();
    let report = first_error(Ok(tls)).await;
    assert_says(&report, "starting TLS");
    round_trip(&plain).await;
}

/// The files a TLS-only Redis deployment of the tests' presents and trusts.
fn deployment_tls(pki: &Pki) -> common::redis_deployments::Tls {
    common::redis_deployments::Tls {
        ca: pki.path("ca.crt"),
        cert: pki.path("node.crt"),
        key: pki.path("node.key"),
    }
}

/// `rediss-cluster://`: every node (the seeds, and those the slot map names by IP
/// address) verified against the URL's authority, through the conformance suite and
/// 16 callers; without the authority, the nodes are refused.
#[test]
#[cfg_attr(feature = "sync", allow(clippy::unit_arg))] // block passes () on
fn redis_cluster_over_tls() {
    let pki = Pki::new();
    let cluster = common::redis_deployments::Cluster::start_with(Some(deployment_tls(&pki)));
    let ca = pki.path("ca.crt").display().to_string();
    let store = redis(&cluster.url(&format!("cacert={ca}")))
        .unwrap()
        .with_key_prefix(common::unique_prefix("tls-cluster"));
    block(testing::check_store(&store));
    let records = common::created(&store, 32);
    common::sixteen_callers(&store, &records);

    let untrusting = redis(&cluster.url("")).unwrap();
    let report = block(first_error(Ok(untrusting)));
    assert_says(&report, "certificate");
}

/// `rediss-sentinel://`: the sentinels and the primary they name, over TLS, through
/// the conformance suite with owners.
#[test]
#[cfg_attr(feature = "sync", allow(clippy::unit_arg))] // block passes () on
fn redis_sentinel_over_tls() {
    let pki = Pki::new();
    let deployment = common::redis_deployments::Sentinels::start_with(Some(deployment_tls(&pki)));
    let ca = pki.path("ca.crt").display().to_string();
    let store = redis(&deployment.url(&format!("cacert={ca}")))
        .unwrap()
        .with_key_prefix(common::unique_prefix("tls-sentinel"));
    block(testing::check_store(&store));
    block(testing::check_owners(&store));

    let untrusting = redis(&deployment.url("")).unwrap();
    let report = block(first_error(Ok(untrusting)));
    assert_says(&report, "certificate");
}
