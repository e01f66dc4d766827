//! `RedisStore` through Redis Sentinel, on a deployment the tests start themselves (a
//! primary, a replica and three sentinels, on free ports): the conformance suite and
//! concurrent callers; a `SENTINEL FAILOVER` and a primary killed while sessions are
//! counted with `wait_replicas=1` (steps fail only within the timeout, then succeed
//! on the same store, and no acknowledged count is lost); and what `wait_replicas`
//! does when the replica cannot acknowledge.
#![cfg(feature = "redis")]
// `block` is the identity in blocking mode, where the suites return `()`.
#![cfg_attr(feature = "sync", allow(clippy::unit_arg))]

mod common;

use std::time::{Duration, Instant};

use portable_sessions::{
    session::{Id, Record},
    testing::{self, Expiry},
    RedisStore, SessionStore,
};
use rustix::process::{kill_process, Signal};

use common::{
    block, created, live_record,
    redis_deployments::{wait_until, Counters, Sentinels, Tally},
    sixteen_callers, unique_prefix,
};

fn store(deployment: &Sentinels, query: &str, test: &str) -> RedisStore {
    RedisStore::new(&deployment.url(query))
        .unwrap()
        .with_key_prefix(unique_prefix(test))
}

#[test]
fn the_store_conforms_through_sentinel() {
    let deployment = Sentinels::start();
    let store = store(&deployment, "", "sentinel-conform");
    block(testing::check_store(&store));
    block(testing::check_owners(&store));
    block(testing::check_expired_deletion(&store, Expiry::Native));
    let records = created(&store, 40);
    sixteen_callers(&store, &records);

    // A service the sentinels do not watch: a clear error, within the timeout.
    let url = deployment
        .url("")
        .replace("sentinelServiceName=primary", "sentinelServiceName=other");
    let lost = RedisStore::new(&url)
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = block(lost.load(&Id::default())).unwrap_err();
    assert!(
        err.report().contains("no primary named \"other\""),
        "{}",
        err.report()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Counts in sessions with `wait_replicas=1` while `fail_over` moves the primary,
/// until the store writes on the new one; then checks no acknowledged count was
/// lost, and that every failed step failed within `within`.
fn count_through(
    deployment: &mut Sentinels,
    timeout: Duration,
    fail_over: impl FnOnce(&mut Sentinels),
) -> Tally {
    let store = store(deployment, "wait_replicas=1", "sentinel-failover").with_timeout(timeout);
    let records: Vec<Record> = created(&store, 16);
    let counters = Counters::start(&store, &records, 4);
    counters.wait_for_more(50, Duration::from_secs(20));
    let old = deployment.primary_port();
    fail_over(deployment);
    wait_until("a new primary", Duration::from_secs(60), || {
        deployment.primary_port() != old
    });
    let new = deployment.wait_settled();
    counters.wait_for_more(100, Duration::from_secs(30));
    let tally = counters.stop();
    // A step is a load and an update: each may take twice the timeout at worst.
    tally.check(&store, timeout * 4 + Duration::from_secs(1));
    assert_eq!(
        deployment
            .server(new)
            .info("replication", "role")
            .as_deref(),
        Some("master")
    );
    // The same store, on the new primary: every operation works.
    common::redis_deployments::serves_every_operation(&store);
    tally
}

/// `SENTINEL FAILOVER`: the old primary is demoted and its clients disconnected; the
/// store asks the sentinels again and goes on with the new one.
#[test]
fn a_sentinel_failover_is_followed_and_loses_no_acknowledged_write() {
    let mut deployment = Sentinels::start();
    count_through(&mut deployment, Duration::from_secs(10), |deployment| {
        let answer = deployment.sentinels[0].cli(&["SENTINEL", "FAILOVER", Sentinels::SERVICE]);
        assert_eq!(answer.trim(), "OK");
    });
}

/// The primary is killed (SIGKILL): the sentinels promote the replica a few seconds
/// later, and the old primary comes back as its replica (until then no write can be
/// acknowledged by a replica). Steps fail while there is no primary, each within
/// the timeout, then succeed on the same store.
#[test]
fn a_killed_primary_is_replaced_and_no_acknowledged_write_is_lost() {
    let mut deployment = Sentinels::start();
    let tally = count_through(&mut deployment, Duration::from_millis(500), |deployment| {
        let old = deployment.primary_port();
        deployment.server(old).kill();
        wait_until("a new primary", Duration::from_secs(60), || {
            deployment.primary_port() != old
        });
        let new = deployment.primary_port();
        deployment.server(old).restart_as_replica_of(new);
    });
    assert!(
        !tally.failures.is_empty(),
        "seconds without a primary went unseen"
    );
}

/// With the replica frozen (SIGSTOP), a write fails within the timeout saying how
/// many replicas acknowledged it, yet is on the primary; a delete of a session that
/// is already gone fails too (its `WAIT` has a write of its own to wait for), and
/// reads still work. More such writes at once than connections each wait for one of
/// their own, never behind another's `WAIT`. Thawed, writes succeed. Asking for more
/// replicas than there are fails every write.
#[test]
fn wait_replicas_fails_writes_the_replicas_do_not_acknowledge() {
    let mut deployment = Sentinels::start();
    // Each write waits half of it for the replica: the other half is the margin
    // for its answer on a loaded machine.
    let timeout = Duration::from_secs(1);
    let store = store(&deployment, "wait_replicas=1", "sentinel-wait").with_timeout(timeout);
    let mut record = live_record(1);
    block(store.create(&mut record)).unwrap();

    let replica = deployment.replica.port;
    let pid = deployment.server(replica).pid();
    kill_process(pid, Signal::STOP).unwrap();
    let mut unacknowledged = live_record(2);
    let started = Instant::now();
    let err = block(store.create(&mut unacknowledged)).unwrap_err();
    assert!(
        started.elapsed() < timeout * 2,
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.report().contains("0 of the 1 replicas"),
        "{}",
        err.report()
    );
    let loaded = block(store.load(&unacknowledged.id)).unwrap();
    assert_eq!(loaded, Some(unacknowledged.clone()), "on the primary");
    let never = Id::default();
    let err = block(store.delete(&never)).unwrap_err();
    assert!(
        err.report().contains("0 of the 1 replicas"),
        "{}",
        err.report()
    );
    let err = block(store.update(&record)).unwrap_err();
    assert!(
        err.report().contains("0 of the 1 replicas"),
        "{}",
        err.report()
    );
    // More waiting writes at once than connections: each waits for a connection
    // of its own (a `WAIT` queued behind another would be answered past its
    // deadline, and the primary taken for lost), and says why it failed.
    let narrow = store.clone().with_max_connections(1);
    let reports: Vec<String> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let narrow = &narrow;
                scope.spawn(move || {
                    let never = Id::default();
                    block(narrow.delete(&never)).unwrap_err().report()
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for report in &reports {
        assert!(
            report.contains("0 of the 1 replicas") || report.contains("stayed busy"),
            "{report}"
        );
    }
    assert!(
        reports.iter().any(|r| r.contains("0 of the 1 replicas")),
        "{reports:?}"
    );
    // A waiting write dropped before its answer leaves its connection to nobody:
    // the next is not kept waiting for it.
    #[cfg(not(feature = "sync"))]
    {
        let gone = Id::default();
        let mut dropped = Box::pin(narrow.delete(&gone));
        let polled = futures_lite::future::block_on(futures_lite::future::poll_once(&mut dropped));
        assert!(polled.is_none(), "waiting for the replica");
        drop(dropped);
        let report = block(narrow.delete(&Id::default())).unwrap_err().report();
        assert!(report.contains("0 of the 1 replicas"), "{report}");
    }
    kill_process(pid, Signal::CONT).unwrap();

    wait_until("writes acknowledged again", Duration::from_secs(10), || {
        block(store.save(&unacknowledged)).is_ok()
    });
    block(store.delete(&unacknowledged.id)).unwrap();

    let greedy = store.clone().with_wait_replicas(2);
    let err = block(greedy.save(&record)).unwrap_err();
    assert!(
        err.report().contains("1 of the 2 replicas"),
        "{}",
        err.report()
    );
}
