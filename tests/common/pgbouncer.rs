//! A PgBouncer of the test's own in front of the shared PostgreSQL server, with a pool
//! in transaction mode and one in statement mode, each of two server connections, so
//! that the store's connections really take turns on them.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use super::{as_postgres_user, give_to_postgres_user, TempDir};

/// PgBouncer's pool modes that hand a client's transactions (or statements) to any
/// server connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    Transaction,
    Statement,
}

impl PoolMode {
    pub const BOTH: [PoolMode; 2] = [PoolMode::Transaction, PoolMode::Statement];

    /// The mode's name in `pgbouncer.ini`.
    pub fn name(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }

    /// The name, in PgBouncer, of the database whose pool is in this mode.
    fn database(self) -> String {
        format!("test_{}", self.name())
    }
}

/// Server connections per pool: fewer than the clients of any test here.
pub const POOL_SIZE: usize = 2;

/// The port PgBouncer's socket file is named after (it listens on no TCP port).
const PORT: u16 = 6432;

/// A running PgBouncer, listening only on a Unix socket in a directory of its own (no
/// other test can take its address), stopped when dropped.
pub struct PgBouncer {
    dir: TempDir,
    child: Child,
}

/// `pgbouncer` on the `PATH`, or where Debian puts it (`/usr/sbin`, which a user's
/// `PATH` may lack).
fn program() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "pgbouncer is not installed: these tests start their own. Install it \
                 (Debian: apt-get install pgbouncer), or run `bash scripts/test.sh`, which \
                 does"
            )
        })
}

impl PgBouncer {
    /// Starts PgBouncer with trust authentication for user `postgres`, pooling
    /// connections to database `test` on 127.0.0.1:5432, and waits until it listens.
    pub fn start() -> Self {
        let dir = TempDir::new("pgbouncer");
        let path = |name: &str| dir.0.join(name).display().to_string();
        let databases: String = PoolMode::BOTH
            .iter()
            .map(|mode| {
                format!(
                    "{} = host=127.0.0.1 port=5432 dbname=test pool_mode={}\n",
                    mode.database(),
                    mode.name()
                )
            })
            .collect();
        let ini = format!(
            "[databases]\n{databases}\n\
             [pgbouncer]\n\
             listen_addr =\n\
             listen_port = {PORT}\n\
             unix_socket_dir = {dir}\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             default_pool_size = {POOL_SIZE}\n\
             max_client_conn = 200\n\
             logfile = {log}\n\
             pidfile =\n",
            dir = dir.0.display(),
            users = path("users.txt"),
            log = path("pgbouncer.log"),
        );
        std::fs::write(dir.0.join("pgbouncer.ini"), ini).unwrap();
        // Trust still wants the user listed.
        std::fs::write(dir.0.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        give_to_postgres_user(&dir);
        let mut child = as_postgres_user(program())
            .arg(dir.0.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run pgbouncer: {err}"));
        let socket = dir.0.join(format!(".s.PGSQL.{PORT}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.0.join("pgbouncer.log"));
                panic!("pgbouncer exited at start: {status}: {log:?}");
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen on {} within 10 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { dir, child }
    }

    /// The URL of the pool in `mode`.
    pub fn url(&self, mode: PoolMode) -> String {
        format!(
            "postgres://postgres@/{}?host={}&port={PORT}",
            mode.database(),
            self.dir.0.display()
        )
    }

    /// Runs `sql` through the pool in `mode` with `psql`, and returns its unaligned
    /// output.
    pub fn psql(&self, mode: PoolMode, sql: &str) -> String {
        super::psql_at(&self.dir.0, PORT, &mode.database(), sql)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // SIGKILL: nothing of it is kept, and SIGTERM waits for clients to leave
        // from PgBouncer 1.23 on.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
