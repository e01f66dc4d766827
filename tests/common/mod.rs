//! Helpers shared by the integration tests: a mode-neutral way to run a test body,
//! and a store that fails on demand.
#![allow(dead_code)] // each test file uses its own part of this

use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc,
};

use portable_sessions::{
    session::{Id, Record},
    session_store::{Error, Result, Update},
    ExpiredDeletion, MemoryStore, SessionStore,
};

/// Runs a test body written once for both modes: in blocking mode the body has
/// already run and this passes its value through; in async mode it drives the future
/// on a minimal executor.
#[cfg(feature = "sync")]
pub fn block<T>(value: T) -> T {
    value
}

/// Runs a test body written once for both modes: in blocking mode the body has
/// already run and this passes its value through; in async mode it drives the future
/// on a minimal executor.
#[cfg(not(feature = "sync"))]
pub fn block<F: std::future::Future>(future: F) -> F::Output {
    futures_lite::future::block_on(future)
}

/// Declares `#[test]` functions that run the named `#[maybe_async]` test bodies of
/// the enclosing file in either mode.
#[macro_export]
macro_rules! tests_in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod run {
            $(
                #[test]
                fn $name() {
                    $crate::common::block(super::$name());
                }
            )*
        }
    };
}

/// Which operations of a [`FaultyStore`] fail.
#[derive(Debug, Default)]
pub struct Faults {
    pub create: AtomicBool,
    pub save: AtomicBool,
    pub update: AtomicBool,
    pub load: AtomicBool,
    pub delete: AtomicBool,
    pub delete_expired: AtomicBool,
    /// How many calls failed so far.
    pub failures: AtomicUsize,
}

/// A [`MemoryStore`] whose operations fail on demand with `Error::Backend`, without
/// touching the data, as an unreachable backend would.
#[derive(Debug, Clone, Default)]
pub struct FaultyStore {
    pub inner: MemoryStore,
    pub faults: Arc<Faults>,
}

impl FaultyStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn check(&self, fault: &AtomicBool, op: &str) -> Result<()> {
        if fault.load(Ordering::SeqCst) {
            self.faults.failures.fetch_add(1, Ordering::SeqCst);
            Err(Error::backend(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("injected {op} failure"),
            )))
        } else {
            Ok(())
        }
    }

    pub fn fail_all(&self, fail: bool) {
        for fault in [
            &self.faults.create,
            &self.faults.save,
            &self.faults.update,
            &self.faults.load,
            &self.faults.delete,
            &self.faults.delete_expired,
        ] {
            fault.store(fail, Ordering::SeqCst);
        }
    }

    pub fn failures(&self) -> usize {
        self.faults.failures.load(Ordering::SeqCst)
    }
}

#[maybe_async::maybe_async]
impl SessionStore for FaultyStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        self.check(&self.faults.create, "create")?;
        self.inner.create(record).await
    }

    async fn save(&self, record: &Record) -> Result<()> {
        self.check(&self.faults.save, "save")?;
        self.inner.save(record).await
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        self.check(&self.faults.load, "load")?;
        self.inner.load(id).await
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        self.check(&self.faults.delete, "delete")?;
        self.inner.delete(id).await
    }

    async fn update(&self, record: &Record) -> Result<Update> {
        self.check(&self.faults.update, "update")?;
        self.inner.update(record).await
    }

    fn atomic_update(&self) -> bool {
        true
    }
}

#[maybe_async::maybe_async]
impl ExpiredDeletion for FaultyStore {
    async fn delete_expired(&self) -> Result<usize> {
        self.check(&self.faults.delete_expired, "delete_expired")?;
        self.inner.delete_expired().await
    }
}

/// A record that expires in an hour, with one value.
pub fn live_record(user: u64) -> Record {
    let mut record = Record::new(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    record.insert("user", &user).expect("a u64 encodes");
    record
}

/// A record that expired an hour ago.
pub fn expired_record() -> Record {
    Record::new(time::OffsetDateTime::now_utc() - time::Duration::hours(1))
}

/// Checks that corrupt stored bytes fail only their own session: `corrupt` overwrites
/// what the store holds for an id with the bytes given, and each time, loading that
/// id must fail with `Error::Decode` while another session still loads.
#[maybe_async::maybe_async]
pub async fn check_corruption_is_contained<S: SessionStore>(
    store: &S,
    corrupt: impl Fn(&Id, &[u8]),
) {
    let mut victim = live_record(1);
    let mut bystander = live_record(2);
    // Both of one owner, where the store keeps owners: a listing leaves the
    // unreadable one out and still lists the other.
    let owner = portable_sessions::session::Owner::new(format!("corrupt {}", Id::default()));
    let owner = owner.unwrap();
    if store.supports_owners() {
        for record in [&mut victim, &mut bystander] {
            record.ownership = Some(portable_sessions::session::Ownership::new(
                owner.clone(),
                time::OffsetDateTime::now_utc(),
            ));
        }
    }
    store.create(&mut victim).await.unwrap();
    store.create(&mut bystander).await.unwrap();
    for garbage in [&b""[..], b"\x01", b"\xff\xff\xff", &[0x01; 40][..]] {
        corrupt(&victim.id, garbage);
        let loaded = store.load(&victim.id).await;
        assert!(
            matches!(loaded, Err(Error::Decode(_))),
            "corrupt bytes {garbage:?} gave {loaded:?}"
        );
        let other = store.load(&bystander.id).await.unwrap();
        assert_eq!(other.as_ref(), Some(&bystander));
        if store.supports_owners() {
            let listed = store.list_owned(&owner).await.unwrap();
            let handles: Vec<_> = listed.iter().map(|s| s.handle()).collect();
            let expected = portable_sessions::session::Handle::of(&bystander.id);
            assert_eq!(handles, [expected], "the readable one, and no error");
        }
    }
    // Saving over the corrupt bytes repairs the session.
    store.save(&victim).await.unwrap();
    let repaired = store.load(&victim.id).await.unwrap();
    assert_eq!(repaired, Some(victim.clone()));
    store.delete(&victim.id).await.unwrap();
    store.delete(&bystander.id).await.unwrap();
}

/// A directory under the system's temporary directory, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "portable-sessions-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }

    pub fn db(&self) -> std::path::PathBuf {
        self.0.join("sessions.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A command run as the `postgres` user when we are root (PostgreSQL and PgBouncer
/// refuse to run as root), as ourselves otherwise.
pub fn as_postgres_user(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    if rustix::process::getuid().is_root() {
        let mut command = std::process::Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        std::process::Command::new(program)
    }
}

/// Makes a PostgreSQL cluster in `data` (user `postgres`, UTF-8, no fsync), with
/// initdb's `extra` arguments (authentication, a password file).
pub fn initdb(data: &std::path::Path, extra: &[&std::ffi::OsStr]) {
    let output = as_postgres_user(pg_bin("initdb"))
        .arg("-D")
        .arg(data)
        .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
        .args(extra)
        .output()
        .expect("initdb runs");
    assert!(
        output.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Gives `dir` to the `postgres` user when we are root, so that a server run as
/// [`as_postgres_user`] may write there.
pub fn give_to_postgres_user(dir: &TempDir) {
    if rustix::process::getuid().is_root() {
        let status = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir.0)
            .status()
            .unwrap();
        assert!(status.success(), "chown of {} failed", dir.0.display());
    }
}

/// The Redis server every test shares, at 127.0.0.1:6379.
pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("portable-sessions-test:{test}:{}:", Id::default())
}

/// A Redis store on the shared server, under a prefix of its own.
#[cfg(feature = "redis")]
pub fn shared_redis(test: &str) -> portable_sessions::RedisStore {
    if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
        panic!(
            "no Redis answers on 127.0.0.1:6379: start one, or run `bash scripts/test.sh`, \
             which does"
        );
    }
    portable_sessions::RedisStore::new(SHARED_REDIS)
        .expect("a valid URL")
        .with_key_prefix(unique_prefix(test))
}

/// The PostgreSQL server every test shares: 127.0.0.1:5432, database `test`, user
/// `postgres` with trust authentication (as `scripts/test.sh` leaves it).
pub const SHARED_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Runs `sql` on the shared PostgreSQL server through `psql` and returns its
/// unaligned output, one row per line.
pub fn psql(sql: &str) -> String {
    psql_at("127.0.0.1", 5432, "test", sql)
}

/// Runs `sql` as `postgres` on database `db` of the server at `host` (a name, an
/// address, or the directory of its Unix socket) and `port`, through `psql`, and
/// returns its unaligned output, one row per line.
pub fn psql_at(host: impl AsRef<std::ffi::OsStr>, port: u16, db: &str, sql: &str) -> String {
    let output = std::process::Command::new("psql")
        .arg("-h")
        .arg(host)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", db, "-X"])
        .args(["-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run psql ({err}): run `bash scripts/test.sh`, which installs it")
        });
    assert!(
        output.status.success(),
        "psql failed on {sql:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .trim_end()
        .to_owned()
}

/// A schema of its own on the shared PostgreSQL server, dropped with everything in it
/// when this is dropped.
pub struct PgSchema(pub String);

impl PgSchema {
    /// A new schema name no other test (or run) uses; the store creates the schema.
    pub fn new(test: &str) -> Self {
        if std::net::TcpStream::connect("127.0.0.1:5432").is_err() {
            panic!(
                "no PostgreSQL answers on 127.0.0.1:5432: start one, or run \
                 `bash scripts/test.sh`, which does"
            );
        }
        Self(format!(
            "ps_test_{test}_{}",
            Id::default().to_string().to_lowercase().replace('-', "_")
        ))
    }

    /// A store on the shared server keeping its table in this schema.
    #[cfg(feature = "postgres")]
    pub fn store(&self) -> portable_sessions::PostgresStore {
        self.store_at(SHARED_POSTGRES)
    }

    /// A store keeping its table in this schema, connecting to `url`: the shared
    /// server, or a pooler in front of it.
    #[cfg(feature = "postgres")]
    pub fn store_at(&self, url: &str) -> portable_sessions::PostgresStore {
        portable_sessions::PostgresStore::new(url)
            .expect("a valid URL")
            .with_table(&self.0, "sessions")
            .expect("valid names")
    }

    /// The schema-qualified table, quoted for SQL.
    pub fn table(&self) -> String {
        format!("\"{}\".\"sessions\"", self.0)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-X",
                "-q",
                "-c",
            ])
            .arg(format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0))
            .output();
    }
}

/// Checks that a future dropped halfway (a client gone, a timeout of the caller's
/// own) leaves neither a half-read connection in the pool nor a slot taken: `store`
/// has one connection at most, `freeze` stops its server answering and `thaw` lets
/// it go on.
#[cfg(all(not(feature = "sync"), feature = "async-io"))]
pub fn check_dropped_operations_leak_nothing<S: SessionStore>(
    store: &S,
    freeze: impl FnOnce(),
    thaw: impl FnOnce(),
) {
    let mut record = live_record(1);
    block(store.create(&mut record)).unwrap();
    freeze();
    for _ in 0..3 {
        let gave_up = block(futures_lite::future::or(
            async { Some(store.load(&record.id).await) },
            async {
                async_io::Timer::after(std::time::Duration::from_millis(100)).await;
                None
            },
        ));
        assert!(
            gave_up.is_none(),
            "the load cannot finish on a frozen server"
        );
    }
    thaw();
    // The one connection was mid-reply when dropped: it was closed, and its slot given
    // back, so this gets a new one and reads the right reply.
    for _ in 0..3 {
        let loaded = block(store.load(&record.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(&record));
    }
}

/// The built-in timer of the mode.
#[cfg(feature = "sync")]
pub type LoopTimer = portable_sessions::ThreadTimer;
/// The built-in timer of the mode.
#[cfg(all(not(feature = "sync"), feature = "async-io"))]
pub type LoopTimer = portable_sessions::AsyncIoTimer;

/// Polls `done` until it holds, failing after 10 s.
pub fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `psql` on the shared PostgreSQL server, quiet and without the user's settings; the
/// caller adds `-c SQL` and how it runs.
pub fn psql_command() -> std::process::Command {
    let mut command = std::process::Command::new("psql");
    command.args([
        "-h",
        "127.0.0.1",
        "-p",
        "5432",
        "-U",
        "postgres",
        "-d",
        "test",
        "-X",
    ]);
    command
}

/// `true` for an `Err(Error::Backend(_))`.
pub fn is_backend<T: std::fmt::Debug>(result: &Result<T>) -> bool {
    matches!(result, Err(Error::Backend(_)))
}

/// The timeout the network stores' fault tests set.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// How long one failing operation may take: a connection attempt and a reply, each
/// bounded by the timeout, with room for a loaded machine.
pub const FAIL_WITHIN: std::time::Duration = std::time::Duration::from_millis(2 * 300 + 1500);

/// Runs each operation of `store` once, on a new record, and returns what each gave.
#[maybe_async::maybe_async]
pub async fn every_operation<S: SessionStore>(store: &S) -> Vec<(&'static str, Result<()>)> {
    let mut record = live_record(3);
    let created = store.create(&mut record).await;
    let saved = store.save(&record).await;
    let updated = store.update(&record).await.map(drop);
    let loaded = store.load(&record.id).await.map(drop);
    let deleted = store.delete(&record.id).await;
    vec![
        ("create", created),
        ("save", saved),
        ("update", updated),
        ("load", loaded),
        ("delete", deleted),
    ]
}

/// Checks that a server that stops answering (`freeze`) makes every operation of
/// `store` (set to [`TIMEOUT`]) fail with `Error::Backend` after waiting for a reply,
/// within [`FAIL_WITHIN`], and that the same store works again once it answers
/// (`thaw`).
#[maybe_async::maybe_async]
pub async fn check_frozen_server_times_out_then_recovers<S: SessionStore>(
    store: &S,
    freeze: impl FnOnce(),
    thaw: impl FnOnce(),
) {
    let mut record = live_record(1);
    store.create(&mut record).await.unwrap();

    freeze();
    for (op, result) in every_operation(store).await {
        assert!(
            is_backend(&result),
            "{op} with the server frozen: {result:?}"
        );
    }
    let started = std::time::Instant::now();
    let loaded = store.load(&record.id).await;
    assert!(is_backend(&loaded), "{loaded:?}");
    let took = started.elapsed();
    assert!(
        took >= TIMEOUT / 2,
        "failed in {took:?}: it did not wait for a reply"
    );
    assert!(took < FAIL_WITHIN, "took {took:?}");

    thaw();
    let loaded = store.load(&record.id).await.unwrap();
    assert_eq!(loaded, Some(record));
}

pub mod pgbouncer;
pub mod proxy;
#[cfg(feature = "redis")]
pub mod redis_deployments;

/// The key a `RedisStore` keeps `id`'s session under: its prefix, then the id's
/// SHA-256 in hexadecimal.
#[cfg(feature = "redis")]
pub fn redis_key(store: &portable_sessions::RedisStore, id: &Id) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.to_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}{hex}", store.key_prefix())
}

/// PostgreSQL's programs: `pg_config --bindir`, or Debian's directory.
pub fn pg_bin(program: &str) -> std::path::PathBuf {
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|dirs| {
            dirs.filter_map(|dir| dir.ok().map(|dir| dir.path().join("bin")))
                .filter(|dir| dir.join("initdb").exists())
                .max()
        });
    from_pg_config
        .filter(|dir| dir.join("initdb").exists())
        .or(debian)
        .unwrap_or_else(|| {
            panic!("PostgreSQL's initdb is not installed: run `bash scripts/test.sh`, which installs it")
        })
        .join(program)
}

/// Two server instances, each with its own cache in front of one shared store (`a`
/// and `b` reach the same records): a logout or a login on one is seen by the other
/// within the cache lifetime, and a write through the other's stale cache is refused
/// at once, since writes go to the store.
#[maybe_async::maybe_async]
pub async fn check_two_caches_over_one_store<S: SessionStore + Clone>(a: S, b: S) {
    use portable_sessions::{CachingSessionStore, SessionManager};
    let lifetime = std::time::Duration::from_millis(100);
    let cached = |store: S| {
        SessionManager::new(
            CachingSessionStore::new(MemoryStore::new(), store).with_cache_lifetime(lifetime),
        )
    };
    let (web1, web2) = (cached(a), cached(b));
    let pair = |set: Option<String>| {
        set.expect("a cookie")
            .split(';')
            .next()
            .unwrap_or_default()
            .to_owned()
    };

    // A logout on web1, while web2 has the session cached.
    let session = web1.begin(None::<&str>);
    session.insert("user", "alice").await.unwrap();
    let cookie = pair(web1.finish(&session).await.unwrap());
    let seen = web2.begin([cookie.as_str()]);
    let user = seen.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("alice"), "cached on web2 now");
    let logout = web1.begin([cookie.as_str()]);
    logout.flush().await.unwrap();
    web1.finish(&logout).await.unwrap();
    // A write through web2 is refused at once: the store decides.
    let late = web2.begin([cookie.as_str()]);
    late.get::<String>("user").await.unwrap();
    let refused = late.insert("cart", "apple").await.and(late.save().await);
    assert!(
        refused.as_ref().is_err_and(|err| err.is_session_gone()),
        "{refused:?}"
    );
    // Reads see the logout within the lifetime.
    let started = std::time::Instant::now();
    loop {
        let session = web2.begin([cookie.as_str()]);
        let user = session.get::<String>("user").await.unwrap();
        if user.is_none() {
            break;
        }
        assert!(
            started.elapsed() < lifetime * 50,
            "web2 still serves the logged-out session after {:?}",
            started.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // A login (cycle_id) on web1, while web2 has the pre-login session cached.
    let session = web1.begin(None::<&str>);
    session.insert("cart", "pear").await.unwrap();
    let anonymous = pair(web1.finish(&session).await.unwrap());
    let seen = web2.begin([anonymous.as_str()]);
    seen.get::<String>("cart").await.unwrap();
    let login = web1.begin([anonymous.as_str()]);
    login.cycle_id().await.unwrap();
    login.insert("user", "bob").await.unwrap();
    let logged_in = pair(web1.finish(&login).await.unwrap());
    let on_web2 = web2.begin([logged_in.as_str()]);
    let user = on_web2.get::<String>("user").await.unwrap();
    assert_eq!(user.as_deref(), Some("bob"), "the new id, from the store");
    let started = std::time::Instant::now();
    loop {
        let stale = web2.begin([anonymous.as_str()]);
        let cart = stale.get::<String>("cart").await.unwrap();
        if cart.is_none() {
            let refused = stale.insert("cart", "plum").await.unwrap_err();
            assert!(refused.is_session_gone(), "the old id is retired");
            break;
        }
        assert!(
            started.elapsed() < lifetime * 50,
            "web2 still serves the pre-login id"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What each of the concurrent callers below does: reads, writes and refused updates
/// of shared records, each checked against what it must answer.
#[cfg(feature = "redis")]
#[maybe_async::maybe_async]
async fn pipelined_caller(
    store: &portable_sessions::RedisStore,
    records: &[Record],
    caller: usize,
) {
    for step in 0..300 {
        let record = &records[(caller * 31 + step * 7) % records.len()];
        match step % 10 {
            // Writes between reads: replies of every kind interleave in the pipeline.
            3 => store.save(record).await.unwrap(),
            7 => {
                let mut stale = record.clone();
                stale.version += 1;
                let update = store.update(&stale).await.unwrap();
                assert_eq!(update, Update::Conflict, "caller {caller}, step {step}");
            }
            _ => {
                let loaded = store.load(&record.id).await.unwrap();
                assert_eq!(
                    loaded.as_ref(),
                    Some(record),
                    "caller {caller}, step {step}"
                );
            }
        }
    }
}

#[cfg(feature = "redis")]
/// Runs [`pipelined_caller`] 16 times at once: on 16 threads in blocking mode; in
/// async mode as 4 tasks on each of 4 threads, so that callers of one connection wake
/// each other both within a thread and across threads.
pub fn sixteen_callers(store: &portable_sessions::RedisStore, records: &[Record]) {
    std::thread::scope(|scope| {
        #[cfg(feature = "sync")]
        for caller in 0..16 {
            scope.spawn(move || pipelined_caller(store, records, caller));
        }
        #[cfg(not(feature = "sync"))]
        for thread in 0..4 {
            scope.spawn(move || {
                let executor = smol::LocalExecutor::new();
                let tasks: Vec<_> = (0..4)
                    .map(|task| executor.spawn(pipelined_caller(store, records, thread * 4 + task)))
                    .collect();
                block(executor.run(async {
                    for task in tasks {
                        task.await;
                    }
                }));
            });
        }
    });
}

#[cfg(feature = "redis")]
/// `n` records, each with a value of its own, created in `store`.
pub fn created(store: &portable_sessions::RedisStore, n: u64) -> Vec<Record> {
    (0..n)
        .map(|n| {
            let mut record = live_record(n);
            record.insert("n", &n).unwrap();
            block(store.create(&mut record)).unwrap();
            record
        })
        .collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago. A server that then fails to
/// take it is started again on another (see [`start_on_a_free_port`]).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `spawn` on free ports until its server listens: a port taken by another
/// program between the probe and the server's bind makes the server exit, and the
/// next try takes another port. Never connects to a port the child did not take.
pub fn start_on_a_free_port(
    what: &str,
    mut spawn: impl FnMut(u16) -> std::process::Child,
) -> (u16, std::process::Child) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port);
        if wait_listening(what, port, &mut child) {
            return (port, child);
        }
    }
    panic!("{what} could not take a free port in five tries");
}

/// Waits until the child listens on `port` (`true`) or exits (`false`).
pub fn wait_listening(what: &str, port: u16, child: &mut std::process::Child) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // The child is still the one listening: a bind that failed ends it.
            std::thread::sleep(std::time::Duration::from_millis(20));
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            return true;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on 127.0.0.1:{port} within 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Starts `command` (a `redis-server` and its arguments) with its output discarded,
/// saying how to install the server when it is missing.
pub fn spawn_redis_server(command: &mut std::process::Command) -> std::process::Child {
    use std::process::Stdio;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run `redis-server` ({err}): these tests start their own servers. \
                 Install it (Debian: apt-get install redis-server), or run \
                 `bash scripts/test.sh`, which does"
            )
        })
}
