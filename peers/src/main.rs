//! Times portable-sessions' persistent stores against their tower-sessions peers on
//! the workload of DESIGN section 7, in one run, and prints the ratio table.
//!
//! - real random ids; records of five values, built before any timing;
//! - the store filled with `--sessions` records (100,000 unless given), then loads,
//!   saves and deletes in shuffled order over them;
//! - one caller, then 16 at once; in our async mode each phase is one executor entry
//!   (smol; two threads for 16 callers), the peers run on a tokio runtime (two worker
//!   threads), as their applications would;
//! - the same server for both, in the same run, alternating who goes first.
//!
//! ```text
//! cargo run --release -- postgres sqlite redis           # our async mode
//! cargo run --release --features sync -- postgres        # our blocking mode
//! cargo run --release -- postgres --sessions 10000       # a smaller table
//! ```
//!
//! `redis-cluster` and `redis-cluster-wait` (ours with `wait_replicas=1`, the peer as
//! ever) need the local cluster `run.sh` starts (`PEERS_REDIS_CLUSTER_PORTS`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use portable_sessions::{
    session::{Id as OurId, Record as OurRecord},
    ExpiredDeletion as OurDeletion, SessionStore as _,
};
use time::OffsetDateTime;
use tower_sessions_core::{
    session::{Id as PeerId, Record as PeerRecord},
    session_store::{self as peer_store, ExpiredDeletion as _, SessionStore as PeerSessionStore},
};

type Ours = Arc<dyn OurDeletion>;
type Peer = Arc<dyn PeerStore>;

/// A peer store behind one object-safe trait (tower-sessions' `ExpiredDeletion` is
/// not), with its deletion pass where it has one.
#[async_trait::async_trait]
trait PeerStore: Send + Sync {
    async fn create(&self, record: &mut PeerRecord) -> peer_store::Result<()>;
    async fn save(&self, record: &PeerRecord) -> peer_store::Result<()>;
    async fn load(&self, id: &PeerId) -> peer_store::Result<Option<PeerRecord>>;
    async fn delete(&self, id: &PeerId) -> peer_store::Result<()>;
    async fn delete_expired(&self) -> peer_store::Result<()>;
}

/// A peer store and its deletion pass (a no-op for Redis, which expires keys itself).
struct PeerOf<T> {
    store: T,
    pass: for<'a> fn(&'a T) -> futures_lite::future::Boxed<peer_store::Result<()>>,
}

#[async_trait::async_trait]
impl<T: PeerSessionStore + Clone> PeerStore for PeerOf<T> {
    async fn create(&self, record: &mut PeerRecord) -> peer_store::Result<()> {
        self.store.create(record).await
    }
    async fn save(&self, record: &PeerRecord) -> peer_store::Result<()> {
        self.store.save(record).await
    }
    async fn load(&self, id: &PeerId) -> peer_store::Result<Option<PeerRecord>> {
        self.store.load(id).await
    }
    async fn delete(&self, id: &PeerId) -> peer_store::Result<()> {
        self.store.delete(id).await
    }
    async fn delete_expired(&self) -> peer_store::Result<()> {
        (self.pass)(&self.store).await
    }
}

const CALLERS: usize = 16;
/// Operations timed per figure, one caller (each over a different session).
const SEQUENTIAL_OPS: usize = 5_000;
/// Operations timed per figure with 16 callers, in all.
const CONCURRENT_OPS: usize = 16_000;

const MODE: &str = if cfg!(feature = "sync") {
    "blocking"
} else {
    "async"
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut sessions = 100_000;
    if let Some(at) = args.iter().position(|a| a == "--sessions") {
        sessions = args
            .get(at + 1)
            .and_then(|n| n.parse().ok())
            .expect("--sessions N");
        args.drain(at..at + 2);
    }
    if args.is_empty() {
        args = vec!["postgres".into(), "sqlite".into(), "redis".into()];
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "# ours: {MODE} mode; peers: tokio (2 workers); {sessions} sessions; \
         figures are time per operation"
    );
    for store in &args {
        let (ours, peer, cleanup) = match store.as_str() {
            "postgres" => stores::postgres(&runtime, "sslmode=disable"),
            "postgres-tls" => stores::postgres(&runtime, "sslmode=require"),
            "sqlite" => stores::sqlite(&runtime),
            "redis" => stores::redis(&runtime, None),
            "redis-tls" => stores::redis(&runtime, Some(stores::redis_tls())),
            "redis-cluster" => stores::redis_cluster(&runtime, 0),
            "redis-cluster-wait" => stores::redis_cluster(&runtime, 1),
            other => panic!(
                "unknown store {other}: postgres, postgres-tls, sqlite, redis, redis-tls, \
                 redis-cluster or redis-cluster-wait"
            ),
        };
        let table = compare(&runtime, store, ours, peer, sessions);
        cleanup();
        table.print(store);
    }
}

mod servers;

mod stores {
    use super::servers::{postgres_url, psql};
    use super::*;

    /// The server's URL with `sslmode` set, for both sides alike: both default to
    /// `prefer`, and only ours could otherwise take TLS where the server offers it.
    fn postgres_url_with(sslmode: &str) -> String {
        let url = postgres_url();
        let join = if url.contains('?') { '&' } else { '?' };
        format!("{url}{join}{sslmode}")
    }

    /// The TLS Redis that run.sh starts: its port and the authority that signed its
    /// certificate (`PEERS_REDIS_TLS_PORT`, `PEERS_REDIS_TLS_CA`).
    pub struct RedisTls {
        port: String,
        ca: String,
    }

    pub fn redis_tls() -> RedisTls {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run peers/run.sh"))
        };
        RedisTls {
            port: var("PEERS_REDIS_TLS_PORT"),
            ca: var("PEERS_REDIS_TLS_CA"),
        }
    }

    pub fn postgres(
        runtime: &tokio::runtime::Runtime,
        sslmode: &str,
    ) -> (Ours, Peer, Box<dyn FnOnce()>) {
        psql("DROP SCHEMA IF EXISTS peers_ours CASCADE; DROP SCHEMA IF EXISTS peers_peer CASCADE");
        let url = postgres_url_with(sslmode);
        let ours = portable_sessions::PostgresStore::new(&url)
            .unwrap()
            .with_table("peers_ours", "sessions")
            .unwrap()
            .with_max_connections(CALLERS);
        block(ours.create_table()).unwrap();
        let peer = runtime.block_on(async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(CALLERS as u32)
                .connect(&url)
                .await
                .unwrap();
            let store = tower_sessions_sqlx_store::PostgresStore::new(pool)
                .with_schema_name("peers_peer")
                .unwrap();
            store.migrate().await.unwrap();
            store
        });
        let cleanup = Box::new(|| {
            psql("DROP SCHEMA IF EXISTS peers_ours CASCADE; DROP SCHEMA IF EXISTS peers_peer CASCADE")
        });
        let peer = PeerOf {
            store: peer,
            pass: |store| {
                let store = store.clone();
                Box::pin(async move { store.delete_expired().await })
            },
        };
        (Arc::new(ours), Arc::new(peer), cleanup)
    }

    pub fn sqlite(runtime: &tokio::runtime::Runtime) -> (Ours, Peer, Box<dyn FnOnce()>) {
        let dir = std::env::temp_dir().join(format!("peers-sqlite-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ours = portable_sessions::SqliteStore::open(dir.join("ours.db")).unwrap();
        let peer_path = dir.join("peer.db");
        let peer = runtime
            .block_on(async { super::servers::peer_sqlite(&peer_path, CALLERS as u32).await });
        let cleanup = Box::new(move || {
            let _ = std::fs::remove_dir_all(&dir);
        });
        let peer = PeerOf {
            store: peer,
            pass: |store| {
                let store = store.clone();
                Box::pin(async move { store.delete_expired().await })
            },
        };
        (Arc::new(ours), Arc::new(peer), cleanup)
    }

    pub fn redis(
        runtime: &tokio::runtime::Runtime,
        tls: Option<RedisTls>,
    ) -> (Ours, Peer, Box<dyn FnOnce()>) {
        use tower_sessions_redis_store::fred::prelude::*;
        let (our_url, peer_url) = match &tls {
            None => (
                "redis://127.0.0.1:6379".to_owned(),
                "redis://127.0.0.1:6379".to_owned(),
            ),
            Some(tls) => (
                format!("rediss://127.0.0.1:{}?cacert={}", tls.port, tls.ca),
                format!("rediss://127.0.0.1:{}", tls.port),
            ),
        };
        let ours = portable_sessions::RedisStore::new(&our_url)
            .unwrap()
            .with_key_prefix("peers-ours:");
        let peer = runtime.block_on(async {
            let mut config = Config::from_url(&peer_url).unwrap();
            if let Some(tls) = &tls {
                config.tls = Some(fred_tls(&tls.ca).into());
            }
            let pool = Pool::new(config, None, None, None, CALLERS).unwrap();
            let _ = pool.connect();
            pool.wait_for_connect().await.unwrap();
            tower_sessions_redis_store::RedisStore::new(pool)
        });
        let cleanup = Box::new(move || {
            let mut flush = std::process::Command::new("redis-cli");
            match &tls {
                None => flush.args(["-h", "127.0.0.1"]),
                Some(tls) => flush.args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &tls.port,
                    "--tls",
                    "--cacert",
                    &tls.ca,
                ]),
            };
            let _ = flush.arg("FLUSHDB").status();
        });
        let peer = PeerOf {
            store: peer,
            pass: |_| Box::pin(async { Ok(()) }),
        };
        (Arc::new(ours), Arc::new(peer), cleanup)
    }

    /// Both stores on the same local cluster, by the same URL (every node a seed);
    /// ours waiting for `wait_replicas` replicas on each write (0: not waiting).
    pub fn redis_cluster(
        runtime: &tokio::runtime::Runtime,
        wait_replicas: u32,
    ) -> (Ours, Peer, Box<dyn FnOnce()>) {
        use tower_sessions_redis_store::fred::prelude::*;
        let ports = cluster_ports();
        let nodes: Vec<String> = ports[1..]
            .iter()
            .map(|port| format!("node=127.0.0.1:{port}"))
            .collect();
        let url = format!("redis-cluster://127.0.0.1:{}?{}", ports[0], nodes.join("&"));
        let ours = portable_sessions::RedisStore::new(&url)
            .unwrap()
            .with_key_prefix("peers-ours:")
            .with_wait_replicas(wait_replicas);
        let peer = runtime.block_on(async {
            let config = Config::from_url(&url).unwrap();
            let pool = Pool::new(config, None, None, None, CALLERS).unwrap();
            let _ = pool.connect();
            pool.wait_for_connect().await.unwrap();
            tower_sessions_redis_store::RedisStore::new(pool)
        });
        let cleanup = Box::new(move || {
            let _ = std::process::Command::new("redis-cli")
                .args([
                    "--cluster",
                    "call",
                    &format!("127.0.0.1:{}", ports[0]),
                    "FLUSHALL",
                ])
                .stdout(std::process::Stdio::null())
                .status();
        });
        let peer = PeerOf {
            store: peer,
            pass: |_| Box::pin(async { Ok(()) }),
        };
        (Arc::new(ours), Arc::new(peer), cleanup)
    }
}

/// The cluster run.sh starts (three primaries with a replica each): its nodes' ports.
fn cluster_ports() -> Vec<String> {
    std::env::var("PEERS_REDIS_CLUSTER_PORTS")
        .expect("PEERS_REDIS_CLUSTER_PORTS: run.sh starts the cluster")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// fred's TLS settings: rustls on ring (ours too), trusting the authority in `ca`.
#[allow(deprecated)] // ring's provider, as ours
fn fred_tls(ca: &str) -> fred::types::config::TlsConnector {
    use portable_sessions::rustls::{self, pki_types::pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
        .into()
}

/// Runs a body written for both modes: passes a blocking call's value through, or
/// drives a future to completion on the current thread, as a smol application does
/// (`smol::block_on` runs async-io's reactor on this thread while it waits).
#[cfg(feature = "sync")]
fn block<T>(value: T) -> T {
    value
}

#[cfg(not(feature = "sync"))]
fn block<F: std::future::Future>(future: F) -> F::Output {
    smol::block_on(future)
}

/// A record of five values, as a logged-in user with a cart has.
fn our_record(i: usize, expiry: OffsetDateTime) -> OurRecord {
    let mut record = OurRecord::new(expiry);
    record.insert("user_id", &(i as u64)).unwrap();
    record
        .insert("csrf", "5f0c3a9e2b7d4c18a6e1f3b2d9c07e45")
        .unwrap();
    record.insert("cart", &["apple", "pear", "cherry"]).unwrap();
    record.insert("flash", "Your order was placed.").unwrap();
    record.insert("last_seen", &1_764_000_000i64).unwrap();
    record
}

fn peer_record(i: usize, expiry: OffsetDateTime) -> PeerRecord {
    let mut data = std::collections::HashMap::new();
    data.insert("user_id".to_owned(), serde_json::json!(i as u64));
    data.insert(
        "csrf".to_owned(),
        serde_json::json!("5f0c3a9e2b7d4c18a6e1f3b2d9c07e45"),
    );
    data.insert(
        "cart".to_owned(),
        serde_json::json!(["apple", "pear", "cherry"]),
    );
    data.insert(
        "flash".to_owned(),
        serde_json::json!("Your order was placed."),
    );
    data.insert("last_seen".to_owned(), serde_json::json!(1_764_000_000i64));
    PeerRecord {
        id: PeerId::default(),
        data,
        expiry_date: expiry,
    }
}

/// `record` with a new expiry date.
fn moved(record: &OurRecord, expiry: OffsetDateTime) -> OurRecord {
    let mut record = record.clone();
    record.expiry_date = expiry;
    record
}

/// A permutation of `0..n` from the OS's randomness.
fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut bytes = vec![0u8; n * 8];
    getrandom::fill(&mut bytes).unwrap();
    for i in (1..n).rev() {
        let r = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        order.swap(i, (r % (i as u64 + 1)) as usize);
    }
    order
}

struct Row {
    op: String,
    ours: Duration,
    peer: Duration,
}

struct Table(Vec<Row>);

impl Table {
    fn print(&self, store: &str) {
        println!();
        println!("## {store} ({MODE} mode)");
        println!();
        println!("| operation | ours | peer | peer / ours |");
        println!("|---|---|---|---|");
        for row in &self.0 {
            println!(
                "| {} | {} | {} | {:.2}x |",
                row.op,
                show(row.ours),
                show(row.peer),
                row.peer.as_secs_f64() / row.ours.as_secs_f64()
            );
        }
    }
}

fn show(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns >= 10_000 {
        format!("{:.1} µs", ns as f64 / 1000.0)
    } else {
        format!("{ns} ns")
    }
}

/// Time per operation of `ops` operations that took `took`.
fn per_op(took: Duration, ops: usize) -> Duration {
    took / ops as u32
}

fn compare(
    runtime: &tokio::runtime::Runtime,
    store: &str,
    ours: Ours,
    peer: Peer,
    sessions: usize,
) -> Table {
    let expiry = OffsetDateTime::now_utc() + time::Duration::hours(2);
    eprintln!("{store}: building {sessions} records for each side");
    let mut our_records: Vec<OurRecord> = (0..sessions).map(|i| our_record(i, expiry)).collect();
    let mut peer_records: Vec<PeerRecord> = (0..sessions).map(|i| peer_record(i, expiry)).collect();
    let mut rows = Vec::new();

    // Fill: every record created, one caller; the whole fill is the create figure.
    eprintln!("{store}: creating");
    let ours_create = {
        let started = Instant::now();
        block(async_or_not::create_all(&*ours, &mut our_records));
        per_op(started.elapsed(), sessions)
    };
    let peer_create = {
        let started = Instant::now();
        runtime.block_on(async {
            for record in &mut peer_records {
                peer.create(record).await.unwrap();
            }
        });
        per_op(started.elapsed(), sessions)
    };
    rows.push(Row {
        op: format!("create ({sessions} into an empty table)"),
        ours: ours_create,
        peer: peer_create,
    });

    let our_ids: Arc<Vec<OurId>> = Arc::new(our_records.iter().map(|r| r.id).collect());
    let peer_ids: Arc<Vec<PeerId>> = Arc::new(peer_records.iter().map(|r| r.id).collect());

    // Loads, one caller, shuffled.
    let order = shuffled(sessions);
    let picks: Vec<usize> = order.iter().copied().take(SEQUENTIAL_OPS).collect();
    eprintln!("{store}: loading");
    let ours_load = {
        let ids: Vec<OurId> = picks.iter().map(|&i| our_ids[i]).collect();
        let started = Instant::now();
        block(async_or_not::load_all(&*ours, &ids));
        per_op(started.elapsed(), ids.len())
    };
    let peer_load = {
        let ids: Vec<PeerId> = picks.iter().map(|&i| peer_ids[i]).collect();
        let started = Instant::now();
        runtime.block_on(async {
            for id in &ids {
                assert!(peer.load(id).await.unwrap().is_some());
            }
        });
        per_op(started.elapsed(), ids.len())
    };
    rows.push(Row {
        op: "load, one caller, shuffled".into(),
        ours: ours_load,
        peer: peer_load,
    });

    // Saves, one caller, shuffled.
    eprintln!("{store}: saving");
    let picks: Vec<usize> = shuffled(sessions)
        .into_iter()
        .take(SEQUENTIAL_OPS)
        .collect();
    // A save writes what a request changed: here the expiry date, moved by a
    // minute, as a session that is kept alive has it (an unchanged record would let
    // SQLite skip the write altogether, which no real save does).
    let later = expiry + time::Duration::minutes(1);
    let ours_save = {
        let records: Vec<OurRecord> = picks
            .iter()
            .map(|&i| moved(&our_records[i], later))
            .collect();
        let started = Instant::now();
        block(async_or_not::save_all(&*ours, &records));
        per_op(started.elapsed(), records.len())
    };
    let peer_save = {
        let records: Vec<PeerRecord> = picks
            .iter()
            .map(|&i| PeerRecord {
                expiry_date: later,
                ..peer_records[i].clone()
            })
            .collect();
        let started = Instant::now();
        runtime.block_on(async {
            for record in &records {
                peer.save(record).await.unwrap();
            }
        });
        per_op(started.elapsed(), records.len())
    };
    rows.push(Row {
        op: "save, one caller, shuffled".into(),
        ours: ours_save,
        peer: peer_save,
    });

    // 16 callers at once: loads, then saves (each moving the expiry date again).
    let later = later + time::Duration::minutes(1);
    for op in ["load", "save"] {
        eprintln!("{store}: {op}, {CALLERS} callers");
        let picks = Arc::new(
            shuffled(sessions)
                .into_iter()
                .take(CONCURRENT_OPS.min(sessions))
                .collect::<Vec<_>>(),
        );
        let ours_time = {
            let ids: Arc<Vec<OurId>> = Arc::new(picks.iter().map(|&i| our_ids[i]).collect());
            let records: Arc<Vec<OurRecord>> = Arc::new(
                picks
                    .iter()
                    .map(|&i| moved(&our_records[i], later))
                    .collect(),
            );
            let started = Instant::now();
            concurrent::ours(&ours, op, ids, records);
            per_op(started.elapsed(), picks.len())
        };
        let peer_time = {
            let ids: Arc<Vec<PeerId>> = Arc::new(picks.iter().map(|&i| peer_ids[i]).collect());
            let records: Arc<Vec<PeerRecord>> = Arc::new(
                picks
                    .iter()
                    .map(|&i| PeerRecord {
                        expiry_date: later,
                        ..peer_records[i].clone()
                    })
                    .collect(),
            );
            let started = Instant::now();
            runtime.block_on(async {
                let tasks: Vec<_> = (0..CALLERS)
                    .map(|caller| {
                        let (peer, ids, records) = (peer.clone(), ids.clone(), records.clone());
                        tokio::spawn(async move {
                            for i in (caller..ids.len()).step_by(CALLERS) {
                                if op == "load" {
                                    assert!(peer.load(&ids[i]).await.unwrap().is_some());
                                } else {
                                    peer.save(&records[i]).await.unwrap();
                                }
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            });
            per_op(started.elapsed(), picks.len())
        };
        rows.push(Row {
            op: format!("{op}, {CALLERS} callers, shuffled (throughput)"),
            ours: ours_time,
            peer: peer_time,
        });
    }

    // Deletes, one caller, shuffled.
    eprintln!("{store}: deleting");
    let picks: Vec<usize> = shuffled(sessions)
        .into_iter()
        .take(SEQUENTIAL_OPS)
        .collect();
    let ours_delete = {
        let ids: Vec<OurId> = picks.iter().map(|&i| our_ids[i]).collect();
        let started = Instant::now();
        block(async_or_not::delete_all(&*ours, &ids));
        per_op(started.elapsed(), ids.len())
    };
    let peer_delete = {
        let ids: Vec<PeerId> = picks.iter().map(|&i| peer_ids[i]).collect();
        let started = Instant::now();
        runtime.block_on(async {
            for id in &ids {
                peer.delete(id).await.unwrap();
            }
        });
        per_op(started.elapsed(), ids.len())
    };
    rows.push(Row {
        op: "delete, one caller, shuffled".into(),
        ours: ours_delete,
        peer: peer_delete,
    });

    // A deletion pass: 10% of the remaining sessions expired. Redis expires keys
    // itself and both stores' passes do nothing: one call to a no-op timed once is
    // noise, not a figure, so there is no row for it.
    if store.starts_with("redis") {
        return Table(rows);
    }
    eprintln!("{store}: expiring");
    let past = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let deleted: std::collections::HashSet<usize> = picks.into_iter().collect();
    let expiring: Vec<usize> = shuffled(sessions)
        .into_iter()
        .filter(|i| !deleted.contains(i))
        .take(sessions / 10)
        .collect();
    for &i in &expiring {
        our_records[i].expiry_date = past;
        peer_records[i].expiry_date = past;
    }
    let ours_expired: Vec<OurRecord> = expiring.iter().map(|&i| our_records[i].clone()).collect();
    block(async_or_not::save_all(&*ours, &ours_expired));
    runtime.block_on(async {
        for &i in &expiring {
            peer.save(&peer_records[i]).await.unwrap();
        }
    });
    let ours_pass = {
        let started = Instant::now();
        let _count = block(ours.delete_expired()).unwrap();
        started.elapsed()
    };
    let peer_pass = {
        let started = Instant::now();
        runtime.block_on(peer.delete_expired()).unwrap();
        started.elapsed()
    };
    rows.push(Row {
        op: format!(
            "delete_expired pass ({} expired), whole pass",
            expiring.len()
        ),
        ours: ours_pass,
        peer: peer_pass,
    });
    Table(rows)
}

/// Our sequential loops, one executor entry each in async mode.
mod async_or_not {
    use super::*;

    #[maybe_async::maybe_async]
    pub async fn create_all(store: &dyn OurDeletion, records: &mut [OurRecord]) {
        for record in records {
            store.create(record).await.unwrap();
        }
    }

    #[maybe_async::maybe_async]
    pub async fn load_all(store: &dyn OurDeletion, ids: &[OurId]) {
        for id in ids {
            let loaded = store.load(id).await.unwrap();
            assert!(loaded.is_some());
        }
    }

    #[maybe_async::maybe_async]
    pub async fn save_all(store: &dyn OurDeletion, records: &[OurRecord]) {
        for record in records {
            store.save(record).await.unwrap();
        }
    }

    #[maybe_async::maybe_async]
    pub async fn delete_all(store: &dyn OurDeletion, ids: &[OurId]) {
        for id in ids {
            store.delete(id).await.unwrap();
        }
    }

    /// One caller's share of a concurrent phase: every `CALLERS`-th operation.
    #[maybe_async::maybe_async]
    pub async fn caller(
        store: Ours,
        op: &'static str,
        caller: usize,
        ids: Arc<Vec<OurId>>,
        records: Arc<Vec<OurRecord>>,
    ) {
        for i in (caller..ids.len()).step_by(CALLERS) {
            if op == "load" {
                let loaded = store.load(&ids[i]).await.unwrap();
                assert!(loaded.is_some());
            } else {
                store.save(&records[i]).await.unwrap();
            }
        }
    }
}

mod concurrent {
    use super::*;

    /// 16 threads, each a blocking caller.
    #[cfg(feature = "sync")]
    pub fn ours(
        store: &Ours,
        op: &'static str,
        ids: Arc<Vec<OurId>>,
        records: Arc<Vec<OurRecord>>,
    ) {
        std::thread::scope(|scope| {
            for caller in 0..CALLERS {
                let (store, ids, records) = (store.clone(), ids.clone(), records.clone());
                scope.spawn(move || async_or_not::caller(store, op, caller, ids, records));
            }
        });
    }

    /// 16 tasks on a smol executor run by two threads (the machine's cores).
    #[cfg(not(feature = "sync"))]
    pub fn ours(
        store: &Ours,
        op: &'static str,
        ids: Arc<Vec<OurId>>,
        records: Arc<Vec<OurRecord>>,
    ) {
        let executor = smol::Executor::new();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let (store, ids, records) = (store.clone(), ids.clone(), records.clone());
                executor.spawn(async_or_not::caller(store, op, caller, ids, records))
            })
            .collect();
        let done = smol::channel::bounded::<()>(1);
        std::thread::scope(|scope| {
            let helper = scope.spawn(|| {
                smol::block_on(executor.run(async {
                    let _ = done.1.recv().await;
                }))
            });
            smol::block_on(executor.run(async {
                for task in tasks {
                    task.await;
                }
            }));
            drop(done.0);
            helper.join().unwrap();
        });
    }
}
