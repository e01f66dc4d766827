//! `RedisStore` on a Redis Cluster the tests start themselves (three primaries with a
//! replica each, on free ports): the conformance suite and concurrent callers; a slot
//! migrated while requests run (`ASK`, then `MOVED`); a primary killed while requests
//! run, with `wait_replicas=1`: operations fail only within the timeout, then succeed
//! on the same store, and no acknowledged write is lost.
#![cfg(feature = "redis")]
// `block` is the identity in blocking mode, where the suites return `()`.
#![cfg_attr(feature = "sync", allow(clippy::unit_arg))]

mod common;

use std::time::Duration;

use portable_sessions::{
    session::{Owner, Record},
    session_store::Update,
    testing::{self, Expiry},
    RedisStore, SessionStore,
};

use common::{
    block, created, live_record, redis_deployments::Cluster, redis_key, sixteen_callers,
    unique_prefix,
};

fn store(cluster: &Cluster, query: &str, test: &str) -> RedisStore {
    RedisStore::new(&cluster.url(query))
        .unwrap()
        .with_key_prefix(unique_prefix(test))
}

/// The slot Redis puts `key` in.
fn server_slot(port: u16, key: &str) -> u16 {
    common::redis_deployments::cli(port, &["CLUSTER", "KEYSLOT", key])
        .trim()
        .parse()
        .unwrap()
}

/// The slot of a key without a hash tag, by the cluster specification's CRC16
/// (XMODEM), bit by bit: searching for an id whose key falls in a given slot takes
/// thousands of tries, too many to ask the server each.
fn key_slot(key: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in key {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc % 16384
}

/// `count` from `INFO` lines `NAME:count=N,...` (command and error statistics).
fn stat(port: u16, section: &str, name: &str) -> u64 {
    let info = common::redis_deployments::cli(port, &["INFO", section]);
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|fields| {
            fields.split(',').find_map(|field| {
                let (key, value) = field.split_once('=')?;
                (key == "calls" || key == "count").then(|| value.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

#[test]
fn the_store_conforms_on_a_cluster() {
    let cluster = Cluster::start();
    let store = store(&cluster, "", "cluster-conform");
    block(testing::check_store(&store));
    block(testing::check_expired_deletion(&store, Expiry::Native));

    // Sessions on every primary, read and written by 16 callers at once.
    let records = created(&store, 60);
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3);
    for &port in &primaries {
        let keys: u64 = common::redis_deployments::cli(port, &["DBSIZE"])
            .trim()
            .parse()
            .unwrap();
        assert!(keys > 0, "no session on the primary at {port}");
    }
    sixteen_callers(&store, &records);

    // An owner's index and its sessions would sit on different nodes.
    assert!(!store.supports_owners());
    let listed = block(store.list_owned(&Owner::new("alice").unwrap()));
    assert!(listed.unwrap_err().is_unsupported());

    // A cluster has database 0 alone.
    let url = cluster.url("").replacen("?", "/1?", 1);
    assert!(RedisStore::new(&url).is_err(), "{url}");

    #[cfg(not(feature = "sync"))]
    a_reading_of_the_map_dropped_halfway_is_done_again(&cluster, &store);
}

/// An operation dropped while the store reads the slot map (its first seed accepts
/// connections and never answers) leaves the reading to the next one, which gets
/// past that seed within its timeout and is served.
#[cfg(not(feature = "sync"))]
fn a_reading_of_the_map_dropped_halfway_is_done_again(cluster: &Cluster, served: &RedisStore) {
    let mut record = live_record(7);
    block(served.create(&mut record)).unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "redis-cluster://{}?node=127.0.0.1:{}",
        silent.local_addr().unwrap(),
        cluster.primaries()[0]
    );
    let store = RedisStore::new(&url)
        .unwrap()
        .with_key_prefix(served.key_prefix())
        .with_timeout(Duration::from_millis(300));
    let mut dropped = Box::pin(store.load(&record.id));
    for _ in 0..3 {
        let polled = futures_lite::future::block_on(futures_lite::future::poll_once(&mut dropped));
        assert!(polled.is_none(), "waiting on the silent seed");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(dropped);
    let loaded = block(store.load(&record.id)).unwrap();
    assert_eq!(loaded, Some(record));
}

/// A slot moves from one primary to another while 16 callers read and write: a
/// session already moved is found through `ASK` (the store's map still names the
/// old primary), a session created in the slot mid-move lands on the new one, and
/// once the move is over the old primary's `MOVED` updates the map.
#[test]
fn a_slot_migrating_while_requests_run_is_followed() {
    let cluster = Cluster::start();
    let store = store(&cluster, "", "cluster-migrate");
    let mut moved = live_record(1);
    block(store.create(&mut moved)).unwrap();
    let key = redis_key(&store, &moved.id);
    let slot = server_slot(cluster.nodes[0].port, &key);
    let source = cluster.serving(slot);
    let target = *cluster
        .primaries()
        .iter()
        .find(|&&port| port != source)
        .unwrap();
    let (source_id, target_id) = (cluster.id(source), cluster.id(target));

    // A session to create in the slot once it migrates: an id whose key falls there.
    let mut born = loop {
        let record = live_record(2);
        if key_slot(redis_key(&store, &record.id).as_bytes()) == slot {
            break record;
        }
    };
    assert_eq!(server_slot(source, &redis_key(&store, &born.id)), slot);

    let mut records = created(&store, 40);
    records.push(moved.clone());
    let cli = common::redis_deployments::cli;
    std::thread::scope(|scope| {
        let callers = scope.spawn(|| sixteen_callers(&store, &records));
        let slot = slot.to_string();
        cli(
            target,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id],
        );
        cli(
            source,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
        );
        let migrated = cli(
            source,
            &[
                "MIGRATE",
                "127.0.0.1",
                &target.to_string(),
                "",
                "0",
                "5000",
                "KEYS",
                &key,
            ],
        );
        assert_eq!(migrated.trim(), "OK");

        // Moved, while the slot is still the source's: through ASK.
        let asked_before = stat(target, "commandstats", "cmdstat_asking");
        let loaded = block(store.load(&moved.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(&moved));
        let id = born.id;
        block(store.create(&mut born)).unwrap();
        assert_eq!(born.id, id, "the id was free: no other drawn");
        assert!(stat(target, "commandstats", "cmdstat_asking") >= asked_before + 2);
        assert!(stat(source, "errorstats", "errorstat_ASK") >= 2);

        // The move is over: the source answers MOVED (to this caller or to one of
        // the 16), the store follows.
        let moved_before = stat(source, "errorstats", "errorstat_MOVED");
        for port in cluster.primaries() {
            cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]);
        }
        let loaded = block(store.load(&born.id)).unwrap();
        assert_eq!(loaded.as_ref(), Some(&born));
        assert!(stat(source, "errorstats", "errorstat_MOVED") > moved_before);
        let update = block(store.update(&born)).unwrap();
        assert!(matches!(update, Update::Written(_)), "{update:?}");
        callers.join().unwrap();
    });
    // The map was read again: no more redirections for the slot.
    let moved_before = stat(source, "errorstats", "errorstat_MOVED");
    block(store.load(&born.id)).unwrap();
    assert_eq!(stat(source, "errorstats", "errorstat_MOVED"), moved_before);
}

/// A primary is killed (SIGKILL) while sessions are counted with
/// `wait_replicas=1`, and comes back as a replica once its replica took over. With
/// a timeout longer than the failover, the store rides through it; with a shorter
/// one, steps fail, each within the timeout, then succeed on the same store. Either
/// way every acknowledged count survives.
fn kill_a_primary_while_counting(timeout: Duration) -> common::redis_deployments::Tally {
    let mut cluster = Cluster::start();
    let store = store(&cluster, "wait_replicas=1", "cluster-failover").with_timeout(timeout);
    let records: Vec<Record> = created(&store, 24);
    let counters = common::redis_deployments::Counters::start(&store, &records, 4);
    counters.wait_for_more(50, Duration::from_secs(20));

    let victim = cluster.serving(server_slot(
        cluster.nodes[0].port,
        &redis_key(&store, &records[0].id),
    ));
    cluster.node(victim).kill();
    common::redis_deployments::wait_until("a failover", Duration::from_secs(30), || {
        !cluster.primaries().contains(&victim) && cluster.primaries().len() == 3
    });
    cluster.node(victim).restart();
    cluster.wait_healthy();
    counters.wait_for_more(100, Duration::from_secs(30));
    let tally = counters.stop();
    // A step is a load and an update: each may take twice the timeout at worst.
    tally.check(&store, timeout * 4 + Duration::from_secs(1));

    // The same store, without a restart: every operation works.
    common::redis_deployments::serves_every_operation(&store);
    tally
}

#[test]
fn a_failover_within_the_timeout_costs_no_error_and_no_acknowledged_write() {
    let tally = kill_a_primary_while_counting(Duration::from_secs(10));
    assert_eq!(
        tally.failures,
        Vec::new(),
        "the store waited the failover out"
    );
}

#[test]
fn a_failover_past_the_timeout_fails_steps_within_it_and_loses_no_acknowledged_write() {
    let tally = kill_a_primary_while_counting(Duration::from_millis(300));
    assert!(
        !tally.failures.is_empty(),
        "a second without a primary went unseen"
    );
}
