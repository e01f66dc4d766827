//! Prints how much faster this crate is than tower-sessions, operation by operation:
//! a quick check without criterion, in well under a minute.
//!
//! ```text
//! cargo run --release --example compare                  # our async mode
//! cargo run --release --example compare --features sync  # our blocking mode
//! ```
//!
//! Each figure is the best of several rounds (the least disturbed by whatever else the
//! machine is doing); a speedup is the peer's time divided by ours. The workload and
//! the timed loops are those of `benches/`, which measure the same with criterion.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use portable_sessions::{CachingSessionStore, MemoryStore};
use tower_sessions_memory_store::MemoryStore as PeerMemoryStore;
use tower_sessions_moka_store::MokaStore;

#[path = "../benches/common/mod.rs"]
mod common;
use common::{
    expire_and_delete, fill_copies, our_parallel_loads, our_record, ours, peer,
    peer_parallel_loads, peer_record, run, run_peer, tokio_runtime, Op, OurRecord, PeerRecord,
    BIG_STORE_SIZE, MODE, STORE_SIZE,
};

/// Rounds per figure; the best one counts.
const ROUNDS: usize = 7;
/// How long one round of one operation runs.
const ROUND_TIME: Duration = Duration::from_millis(25);

/// Returns the best time per iteration of `timed(iters)`, which runs `iters`
/// iterations and returns the time they took.
fn best(mut timed: impl FnMut(u64) -> Duration) -> Duration {
    // Size the rounds from a short trial run.
    let trial = 1_000;
    let per_iter = timed(trial).max(Duration::from_nanos(trial)) / trial as u32;
    let iters = (ROUND_TIME.as_nanos() / per_iter.as_nanos().max(1)).clamp(100, 10_000_000) as u64;
    (0..ROUNDS)
        .map(|_| timed(iters) / iters as u32)
        .min()
        .expect("at least one round")
}

struct Table {
    rows: Vec<[String; 5]>,
}

impl Table {
    fn new() -> Self {
        let header = ["operation", "ours", "tower-sessions", "speedup", "goal"];
        Self {
            rows: vec![header.map(String::from)],
        }
    }

    /// Adds a row comparing two times per operation against a minimum speedup.
    fn times(&mut self, what: &str, ours: Duration, peer: Duration, goal: Option<f64>) {
        let speedup = peer.as_secs_f64() / ours.as_secs_f64();
        let verdict = goal.map_or(String::new(), |min| {
            verdict(speedup >= min, &format!(">= {min}x"))
        });
        self.row(
            what,
            show(ours),
            show(peer),
            format!("{speedup:.1}x"),
            verdict,
        );
    }

    fn row(&mut self, what: &str, ours: String, peer: String, ratio: String, verdict: String) {
        self.rows
            .push([what.to_owned(), ours, peer, ratio, verdict]);
    }

    fn print(&self) {
        let widths: Vec<usize> = (0..5)
            .map(|col| {
                self.rows
                    .iter()
                    .map(|row| row[col].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for (i, row) in self.rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(col, (cell, &w))| {
                    if col == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            println!("| {} |", cells.join(" | "));
            if i == 0 {
                let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
                println!("|-{}-|", rule.join("-|-"));
            }
        }
    }
}

fn show(time: Duration) -> String {
    let nanos = time.as_secs_f64() * 1e9;
    if nanos < 10_000.0 {
        format!("{nanos:.0} ns")
    } else if nanos < 10_000_000.0 {
        format!("{:.1} us", nanos / 1e3)
    } else {
        format!("{:.1} ms", nanos / 1e6)
    }
}

fn main() {
    let started = Instant::now();
    println!(
        "portable-sessions ({MODE} mode) against tower-sessions 0.14, on {} cores; \
         best of {ROUNDS} rounds\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut table = Table::new();

    // One thread, stores of 10,000 sessions.
    let memory = run(ours::Filled::new(
        MemoryStore::new(),
        STORE_SIZE,
        our_record,
    ));
    let caching = CachingSessionStore::new(MemoryStore::new(), MemoryStore::new());
    let caching = run(ours::Filled::new(caching, STORE_SIZE, our_record));
    let peer_memory = run_peer(peer::Filled::new(
        PeerMemoryStore::default(),
        STORE_SIZE,
        peer_record,
    ));
    let peer_moka = run_peer(peer::Filled::new(
        MokaStore::new(None),
        STORE_SIZE,
        peer_record,
    ));
    let peer_caching = tower_sessions_core::CachingSessionStore::new(
        MokaStore::new(None),
        PeerMemoryStore::default(),
    );
    let peer_caching = run_peer(peer::Filled::new(peer_caching, STORE_SIZE, peer_record));
    let goals = |op| match op {
        Op::LoadHit => Some(10.0),
        Op::Create | Op::Save => Some(5.0),
        Op::LoadMiss | Op::Delete => None,
    };
    let mut compare_ops = |label: &str,
                           ours: &dyn Fn(Op, u64) -> Duration,
                           theirs: &dyn Fn(Op, u64) -> Duration,
                           with_goals: bool| {
        for op in Op::ALL {
            let what = format!("{} ({label})", op.name());
            let goal = goals(op).filter(|_| with_goals);
            table.times(&what, best(|n| ours(op, n)), best(|n| theirs(op, n)), goal);
        }
    };
    compare_ops(
        "MemoryStore",
        &|op, n| run(memory.time(op, n)),
        &|op, n| run_peer(peer_memory.time(op, n)),
        true,
    );
    compare_ops(
        "ours MemoryStore, theirs MokaStore",
        &|op, n| run(memory.time(op, n)),
        &|op, n| run_peer(peer_moka.time(op, n)),
        false,
    );
    compare_ops(
        "CachingSessionStore",
        &|op, n| run(caching.time(op, n)),
        &|op, n| run_peer(peer_caching.time(op, n)),
        false,
    );
    drop((memory, caching, peer_memory, peer_moka, peer_caching));

    // Loads on 1 and 2 threads (ours: a thread each under `block_on` in async mode;
    // theirs: tasks on a two-worker tokio runtime), stores of 100,000 sessions.
    let memory = run(ours::Filled::new(
        MemoryStore::new(),
        BIG_STORE_SIZE,
        our_record,
    ));
    let peer_memory = PeerMemoryStore::default();
    let peer_memory = Arc::new(run_peer(peer::Filled::new(
        peer_memory,
        BIG_STORE_SIZE,
        peer_record,
    )));
    let runtime = tokio_runtime(2);
    let mut scaling = Vec::new();
    for threads in [1, 2] {
        // `best` gives the time of one round of loads: one per thread.
        let ours = threads as f64 / best(|n| our_parallel_loads(&memory, threads, n)).as_secs_f64();
        let theirs = threads as f64
            / best(|n| peer_parallel_loads(&runtime, &peer_memory, threads, n)).as_secs_f64();
        scaling.push((ours, theirs));
        let what = format!("load, {threads} thread(s), 100,000 sessions (ops/s)");
        let ratio = format!("{:.1}x", ours / theirs);
        table.row(&what, mops(ours), mops(theirs), ratio, String::new());
    }
    let ours_scaling = scaling[1].0 / scaling[0].0;
    let peer_scaling = scaling[1].1 / scaling[0].1;
    table.row(
        "load, 2 threads / 1 thread",
        format!("{ours_scaling:.2}x"),
        format!("{peer_scaling:.2}x"),
        String::new(),
        verdict(ours_scaling >= 1.6, ">= 1.6x"),
    );
    drop((memory, peer_memory, runtime));

    // delete_expired: ours only; tower-sessions' MemoryStore never deletes.
    let template = our_record();
    for size in [10_000, 100_000, 1_000_000] {
        let store = MemoryStore::new();
        let filled = run(fill_copies(&store, &template, size));
        assert_eq!(store.len(), filled);
        let expired = size / 100;
        let spent = (0..3)
            .map(|_| run(expire_and_delete(&store, &template, expired)))
            .min()
            .expect("three rounds");
        let per_record = spent / expired as u32;
        table.row(
            &format!("delete_expired, 1% of {size} sessions"),
            format!("{} ({} each)", show(spent), show(per_record)),
            "never deletes".to_owned(),
            String::new(),
            // "A few milliseconds" for the largest store.
            if size == 1_000_000 {
                verdict(spent <= Duration::from_millis(5), "<= 5 ms")
            } else {
                String::new()
            },
        );
    }

    // The record codec against serde_json of the peer's record.
    let ours_record = our_record();
    let peer_record = peer_record();
    let ours_bytes = ours_record.encode().expect("encodes");
    let peer_bytes = serde_json::to_vec(&peer_record).expect("encodes");
    let encode = best(|n| time_n(n, || ours_record.encode().expect("encodes")));
    let peer_encode = best(|n| time_n(n, || serde_json::to_vec(&peer_record).expect("encodes")));
    table.times("record encode", encode, peer_encode, None);
    let decode = best(|n| time_n(n, || OurRecord::decode(&ours_bytes).expect("decodes")));
    let peer_decode = best(|n| {
        time_n(n, || {
            serde_json::from_slice::<PeerRecord>(&peer_bytes).expect("decodes")
        })
    });
    table.times("record decode", decode, peer_decode, Some(5.0));
    let size_ratio = peer_bytes.len() as f64 / ours_bytes.len() as f64;
    table.row(
        "encoded whole record (bytes)",
        ours_bytes.len().to_string(),
        format!("{} (JSON)", peer_bytes.len()),
        format!("{size_ratio:.2}x smaller"),
        String::new(),
    );
    // What the SQLite and Redis stores write: the record without its id, filed under a
    // digest of it. The peer's stores write the whole record.
    let stored_len = ours_record.encode_without_id().expect("encodes").len();
    let stored_ratio = peer_bytes.len() as f64 / stored_len as f64;
    table.row(
        "stored record size (bytes)",
        stored_len.to_string(),
        format!("{} (JSON)", peer_bytes.len()),
        format!("{stored_ratio:.2}x smaller"),
        verdict(stored_ratio >= 2.0, ">= 2x smaller"),
    );

    table.print();
    println!("\n(took {:.0} s)", started.elapsed().as_secs_f64());
}

fn verdict(met: bool, goal: &str) -> String {
    format!("{goal}: {}", if met { "met" } else { "MISSED" })
}

fn mops(per_second: f64) -> String {
    format!("{:.2} M", per_second / 1e6)
}

fn time_n<T>(n: u64, mut work: impl FnMut() -> T) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(work());
    }
    start.elapsed()
}
