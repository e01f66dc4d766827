//! Redis deployments of the test's own, from Debian's `redis-server` and `redis-cli`:
//! a cluster of three primaries with a replica each, and a primary with a replica
//! watched by three sentinels. Each server takes free ports (a cluster node a second
//! one for its bus) and a temporary directory of its own, and is killed when dropped.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{spawn_redis_server, start_on_a_free_port, wait_listening, TempDir};

/// The files of a deployment that speaks TLS alone: its authority, and the
/// certificate and key every server presents (and uses as a client of the others).
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl Tls {
    /// `redis-cli`'s arguments to connect with it.
    fn cli_args(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--cacert".into(),
            self.ca.display().to_string(),
        ]
    }

    /// `redis-server`'s arguments to listen (on `port`), replicate and gossip with it.
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = ["--port", "0", "--tls-port"].map(String::from).to_vec();
        args.push(port.to_string());
        for (flag, path) in [
            ("--tls-cert-file", &self.cert),
            ("--tls-key-file", &self.key),
            ("--tls-ca-cert-file", &self.ca),
        ] {
            args.extend([flag.to_owned(), path.display().to_string()]);
        }
        args.extend(["--tls-auth-clients", "no", "--tls-replication", "yes"].map(String::from));
        args
    }
}

/// Runs `redis-cli -p PORT ARGS...` and returns what it printed.
pub fn cli(port: u16, args: &[&str]) -> String {
    cli_with(None, port, args)
}

/// [`cli`], over TLS when given.
pub fn cli_with(tls: Option<&Tls>, port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(tls.map(Tls::cli_args).unwrap_or_default())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run `redis-cli` ({err}): install redis-tools (apt-get install redis-server)")
        });
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits up to `within` for `done`, saying `what` when it does not come.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `redis-server` process of a deployment.
pub struct Server {
    pub port: u16,
    tls: Option<Tls>,
    args: Vec<String>,
    child: Option<Child>,
    pub dir: TempDir,
}

impl Server {
    /// Starts `redis-server` with `args` (and `--port`), `{dir}` replaced by its
    /// directory, `{free}` by another free port, once `files` (name, text) are
    /// written in its directory.
    fn start(what: &str, args: &[String], files: &[(&str, String)], tls: Option<&Tls>) -> Self {
        let dir = TempDir::new(what);
        for (name, text) in files {
            std::fs::write(dir.0.join(name), text).unwrap();
        }
        let mut args: Vec<String> = args
            .iter()
            .map(|arg| arg.replace("{dir}", &dir.0.display().to_string()))
            .collect();
        let mut used = Vec::new();
        let (port, child) = start_on_a_free_port(what, |port| {
            let resolved: Vec<String> = args
                .iter()
                .map(|arg| arg.replace("{free}", &super::free_port().to_string()))
                .collect();
            used = resolved.clone();
            spawn(&resolved, port, tls)
        });
        args = used;
        Self {
            port,
            tls: tls.cloned(),
            args,
            child: Some(child),
            dir,
        }
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again as a replica of the server on `primary`, as an
    /// operator restarts a primary without persistence: never as an empty primary,
    /// which the sentinels could promote back in a second failover (on a loaded
    /// machine, one stall past `down-after-milliseconds`), wiping its replica.
    pub fn restart_as_replica_of(&mut self, primary: u16) {
        self.args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ]);
        self.restart();
    }

    /// Starts a killed server again, on its port, with its files.
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            let mut child = spawn(&self.args, self.port, self.tls.as_ref());
            if wait_listening("redis-server", self.port, &mut child) {
                self.child = Some(child);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server could not listen on port {} again", self.port);
    }

    pub fn cli(&self, args: &[&str]) -> String {
        cli_with(self.tls.as_ref(), self.port, args)
    }

    /// The process, to signal.
    pub fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_child(self.child.as_ref().expect("a running server"))
    }

    /// `field:value` from `INFO`, if the server answers.
    pub fn info(&self, section: &str, field: &str) -> Option<String> {
        let info = self.cli(&["INFO", section]);
        info.lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
    }
}

fn spawn(args: &[String], port: u16, tls: Option<&Tls>) -> Child {
    let listen = match tls {
        Some(tls) => tls.server_args(port),
        None => vec!["--port".into(), port.to_string()],
    };
    spawn_redis_server(Command::new("redis-server").args(args).args(listen).args([
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster: three primaries, each with a replica, failing over within about
/// two seconds of losing a primary.
pub struct Cluster {
    pub nodes: Vec<Server>,
    tls: Option<Tls>,
}

/// What every server of a replicated deployment runs with: files in its own
/// directory, and replicas brought in step without a dump on disk, at once.
const REPLICATED: [&str; 6] = [
    "--dir",
    "{dir}",
    "--repl-diskless-sync",
    "yes",
    "--repl-diskless-sync-delay",
    "0",
];

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A cluster whose nodes speak TLS alone, to clients and to each other.
    pub fn start_with(tls: Option<Tls>) -> Self {
        let mut args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "{dir}/nodes.conf",
            "--cluster-port",
            "{free}",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
        ]
        .map(String::from)
        .to_vec();
        args.extend(REPLICATED.map(String::from));
        if tls.is_some() {
            // The cluster bus too.
            args.extend(["--tls-cluster", "yes"].map(String::from));
        }
        let nodes: Vec<Server> = (0..6)
            .map(|_| Server::start("redis-cluster-node", &args, &[], tls.as_ref()))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        // `redis-cli --cluster create` waits for the nodes to meet, forever if they
        // cannot: under a deadline.
        let output = Command::new("timeout")
            .arg("60")
            .arg("redis-cli")
            .args(tls.as_ref().map(Tls::cli_args).unwrap_or_default())
            .args(&create)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes, tls };
        cluster.wait_healthy();
        cluster
    }

    /// Waits until every node serves all slots and each primary has its replica in
    /// step.
    pub fn wait_healthy(&self) {
        wait_until("a healthy cluster", Duration::from_secs(30), || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|node| {
                let info = node.cli(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            }) && self.primaries().iter().all(|&port| {
                let replicas = self.cli(port, &["INFO", "replication"]);
                replicas.contains("connected_slaves:1") && replicas.contains("state=online")
            })
        });
    }

    /// `redis-cli` on the node at `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli_with(self.tls.as_ref(), port, args)
    }

    /// `redis-cluster://` (`rediss-cluster://` with TLS) with every node as a seed.
    pub fn url(&self, query: &str) -> String {
        let scheme = match self.tls {
            Some(_) => "rediss-cluster",
            None => "redis-cluster",
        };
        let mut url = format!("{scheme}://127.0.0.1:{}", self.nodes[0].port);
        let mut sep = '?';
        for node in &self.nodes[1..] {
            url.push_str(&format!("{sep}node=127.0.0.1:{}", node.port));
            sep = '&';
        }
        if !query.is_empty() {
            url.push(sep);
            url.push_str(query);
        }
        url
    }

    /// The ports of the nodes that are primaries now (asked of the first live node).
    pub fn primaries(&self) -> Vec<u16> {
        let Some(node) = self.nodes.iter().find(|n| n.child.is_some()) else {
            return Vec::new();
        };
        node.cli(&["CLUSTER", "NODES"])
            .lines()
            .filter(|line| line.contains("master") && !line.contains("fail"))
            .filter_map(|line| {
                let address = line.split(' ').nth(1)?;
                address.split('@').next()?.rsplit(':').next()?.parse().ok()
            })
            .collect()
    }

    /// The node listening on `port`.
    pub fn node(&mut self, port: u16) -> &mut Server {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of the cluster")
    }

    /// The id of the node on `port`.
    pub fn id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// The port of the primary serving `slot`.
    pub fn serving(&self, slot: u16) -> u16 {
        let node = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let slots = node.cli(&["CLUSTER", "NODES"]);
        for line in slots.lines().filter(|line| line.contains("master")) {
            let fields: Vec<&str> = line.split(' ').collect();
            let served = fields[8..].iter().any(|range| {
                let range = range.trim();
                if range.starts_with('[') {
                    return false;
                }
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                let (first, last): (u16, u16) = (first.parse().unwrap(), last.parse().unwrap());
                (first..=last).contains(&slot)
            });
            if served {
                let address = fields[1].split('@').next().unwrap();
                return address.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("no primary serves slot {slot}");
    }
}

/// A primary with one replica, watched by three sentinels as `primary`; a failover
/// begins a second after the primary stops answering.
pub struct Sentinels {
    pub primary: Server,
    pub replica: Server,
    pub sentinels: Vec<Server>,
}

impl Sentinels {
    pub const SERVICE: &'static str = "primary";

    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A deployment whose servers and sentinels speak TLS alone.
    pub fn start_with(tls: Option<Tls>) -> Self {
        let data: Vec<String> = REPLICATED.map(String::from).to_vec();
        let primary = Server::start("redis-primary", &data, &[], tls.as_ref());
        let mut replica_args = data.clone();
        replica_args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ]);
        let replica = Server::start("redis-replica", &replica_args, &[], tls.as_ref());
        let sentinels = (0..3)
            .map(|_| {
                let conf = format!(
                    "sentinel monitor {service} 127.0.0.1 {port} 2\n\
                         sentinel down-after-milliseconds {service} 2000\n\
                         sentinel failover-timeout {service} 10000\n\
                         sentinel parallel-syncs {service} 1\n",
                    service = Self::SERVICE,
                    port = primary.port
                );
                let args =
                    ["{dir}/sentinel.conf", "--sentinel", "--dir", "{dir}"].map(String::from);
                // Sentinel rewrites its configuration file: one of its own.
                Server::start(
                    "redis-sentinel",
                    &args,
                    &[("sentinel.conf", conf)],
                    tls.as_ref(),
                )
            })
            .collect();
        let deployment = Self {
            primary,
            replica,
            sentinels,
        };
        let primary = deployment.wait_settled();
        assert_eq!(
            primary, deployment.primary.port,
            "the primary started as one"
        );
        deployment
    }

    /// Waits until every sentinel names the same primary, knows its replica and the
    /// other sentinels, and the replica is in step; returns the primary's port. On a
    /// loaded machine the sentinels may fail over again meanwhile (a primary that
    /// stalls past `down-after-milliseconds`): whichever primary they settle on.
    pub fn wait_settled(&self) -> u16 {
        let mut settled = 0;
        wait_until("settled sentinels", Duration::from_secs(60), || {
            let port = self.primary_port();
            let agreed = self.sentinels.iter().all(|sentinel| {
                let named = sentinel.cli(&["SENTINEL", "get-master-addr-by-name", Self::SERVICE]);
                let primary = sentinel.cli(&["SENTINEL", "master", Self::SERVICE]);
                named.lines().nth(1).map(str::trim) == Some(port.to_string().as_str())
                    && field(&primary, "num-slaves") == Some("1")
                    && field(&primary, "num-other-sentinels") == Some("2")
                    && field(&primary, "flags") == Some("master")
            });
            settled = port;
            agreed
                && cli_with(self.primary.tls.as_ref(), port, &["INFO", "replication"])
                    .contains("state=online")
        });
        settled
    }

    /// `redis-sentinel://` (`rediss-sentinel://` with TLS) naming every sentinel.
    pub fn url(&self, query: &str) -> String {
        let scheme = match self.primary.tls {
            Some(_) => "rediss-sentinel",
            None => "redis-sentinel",
        };
        let mut url = format!(
            "{scheme}://127.0.0.1:{}?sentinelServiceName={}",
            self.sentinels[0].port,
            Self::SERVICE
        );
        for sentinel in &self.sentinels[1..] {
            url.push_str(&format!("&node=127.0.0.1:{}", sentinel.port));
        }
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        url
    }

    /// The port the sentinels name as the primary now.
    pub fn primary_port(&self) -> u16 {
        let named = self.sentinels[0].cli(&["SENTINEL", "get-master-addr-by-name", Self::SERVICE]);
        named.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// The server listening on `port`.
    pub fn server(&mut self, port: u16) -> &mut Server {
        if self.primary.port == port {
            &mut self.primary
        } else {
            &mut self.replica
        }
    }
}

/// A value of `SENTINEL master`'s field-value lines.
fn field<'a>(lines: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = lines.lines();
    while let Some(line) = lines.next() {
        if line.trim() == name {
            return lines.next().map(str::trim);
        }
    }
    None
}

/// Threads that keep counting in sessions of `store` (each its own sessions: load,
/// add one to `n`, `update`), noting what each write was acknowledged with, what it
/// tried, and how long each failure took.
pub struct Counters {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The last step that failed, for a report when counting stalls.
    last_failure: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

/// What one counting thread saw.
#[derive(Default)]
pub struct Tally {
    /// For each session, the last count a write was acknowledged with, and the
    /// highest count a write tried.
    pub acked: std::collections::HashMap<Id, u64>,
    pub tried: std::collections::HashMap<Id, u64>,
    /// How long each failed step took, and its error.
    pub failures: Vec<(Duration, String)>,
}

use portable_sessions::{
    session::{Id, Record},
    session_store::Update,
    RedisStore, SessionStore,
};

impl Counters {
    /// Starts one thread per chunk of `records` (already created in `store`).
    pub fn start(store: &RedisStore, records: &[Record], threads: usize) -> Self {
        use std::sync::{
            atomic::{AtomicBool, AtomicUsize, Ordering},
            Arc,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicUsize::new(0));
        let last_failure = Arc::new(parking_lot::Mutex::new(None));
        let chunk = records.len().div_ceil(threads);
        let threads = records
            .chunks(chunk)
            .map(|mine| {
                let (store, mine) = (store.clone(), mine.to_vec());
                let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
                let last_failure = Arc::clone(&last_failure);
                std::thread::spawn(move || {
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Acquire) {
                        for record in &mine {
                            let started = Instant::now();
                            match count_once(&store, &record.id, &mut tally) {
                                Ok(n) => {
                                    tally.acked.insert(record.id, n);
                                    written.fetch_add(1, Ordering::AcqRel);
                                }
                                Err(err) => {
                                    *last_failure.lock() = Some(err.clone());
                                    tally.failures.push((started.elapsed(), err));
                                }
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        Self {
            stop,
            written,
            last_failure,
            threads,
        }
    }

    /// How many writes were acknowledged so far.
    pub fn written(&self) -> usize {
        self.written.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until `more` more writes than now are acknowledged.
    pub fn wait_for_more(&self, more: usize, within: Duration) {
        let target = self.written() + more;
        let deadline = Instant::now() + within;
        while self.written() < target {
            assert!(
                Instant::now() < deadline,
                "{more} more acknowledged writes did not happen within {within:?} ({} of \
                 them did); the last failure: {:?}",
                more + self.written() - target,
                self.last_failure.lock()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the threads and returns what each saw, merged.
    pub fn stop(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let mut all = Tally::default();
        for thread in self.threads {
            let tally = thread.join().expect("a counting thread panicked");
            all.acked.extend(tally.acked);
            all.tried.extend(tally.tried);
            all.failures.extend(tally.failures);
        }
        all
    }
}

/// One counting step: the count written, or why not.
fn count_once(store: &RedisStore, id: &Id, tally: &mut Tally) -> Result<u64, String> {
    let loaded = super::block(store.load(id)).map_err(|err| err.report())?;
    let mut record = loaded.ok_or("the session is gone")?;
    let n = record
        .get::<u64>("n")
        .map_err(|err| err.report())?
        .unwrap_or(0)
        + 1;
    record.insert("n", &n).unwrap();
    let tried = tally.tried.entry(*id).or_default();
    *tried = (*tried).max(n);
    match super::block(store.update(&record)).map_err(|err| err.report())? {
        Update::Written(_) => Ok(n),
        other => Err(format!("the update answered {other:?}")),
    }
}

impl Tally {
    /// Checks that every acknowledged count is in `store` (a failover lost none),
    /// and none above what was tried; and that every failure took at most `within`.
    pub fn check(&self, store: &RedisStore, within: Duration) {
        assert!(!self.acked.is_empty(), "no write was acknowledged");
        for (id, acked) in &self.acked {
            let record = super::block(store.load(id))
                .unwrap()
                .unwrap_or_else(|| panic!("a session with {acked} acknowledged counts is gone"));
            let n = record.get::<u64>("n").unwrap().unwrap_or(0);
            assert!(n >= *acked, "an acknowledged count was lost: {n} < {acked}");
            assert!(n <= self.tried[id], "{n} was never tried");
        }
        for (took, err) in &self.failures {
            assert!(*took <= within, "a step failed after {took:?}: {err}");
        }
    }
}

/// `store` serves every operation, one after another (after a failover, on the
/// same store value).
pub fn serves_every_operation(store: &portable_sessions::RedisStore) {
    use portable_sessions::SessionStore;
    let mut record = super::live_record(3);
    super::block(store.create(&mut record)).unwrap();
    super::block(store.save(&record)).unwrap();
    let loaded = super::block(store.load(&record.id)).unwrap();
    assert_eq!(loaded, Some(record.clone()));
    super::block(store.delete(&record.id)).unwrap();
}
