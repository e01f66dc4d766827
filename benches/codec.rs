//! The session model against tower-sessions', on the same five-key workload as
//! `benches/stores.rs`:
//!
//! - `id`: a fresh random id, beside two floors: one `getrandom` call per 16 bytes
//!   (what every id cost before ids were read in blocks) and the kernel CSPRNG's own
//!   rate, 16 bytes' share of 64 KiB reads. (The peer's ids come from `rand`'s
//!   user-space generator, not from the operating system.)
//! - `build_record`: a record of five values with a fresh id, as a request makes one.
//! - `encode` and `decode`: the record codec (what persistent stores write) against
//!   serde_json of tower-sessions' record.
//! - `read_values`: the five values read back typed (ours checks each one's shape
//!   tag) against tower-sessions' `serde_json::from_value` of each.
//!
//! The codec is the same in both modes; the benchmark names carry the mode anyway, so
//! that runs of both modes sit side by side in criterion's report. The encoded sizes
//! are printed before the timings.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion};

mod common;
use common::{
    criterion_config, our_record, peer_record, OurId, OurRecord, PeerId, PeerRecord, MODE,
};

/// Times the kernel producing `16 * iters` random bytes in reads of `block` bytes.
fn kernel_rate(iters: u64, block: usize) -> Duration {
    let mut buffer = vec![0u8; block];
    let calls = (iters * 16).div_ceil(block as u64);
    let start = Instant::now();
    for _ in 0..calls {
        getrandom::fill(&mut buffer).expect("random bytes");
        black_box(&buffer);
    }
    start.elapsed()
}

fn ids(c: &mut Criterion) {
    let mut group = c.benchmark_group("id");
    group.bench_function(format!("ours-{MODE}"), |b| b.iter(OurId::default));
    group.bench_function("tower", |b| b.iter(PeerId::default));
    group.bench_function("floor/getrandom-16", |b| {
        b.iter_custom(|iters| kernel_rate(iters, 16))
    });
    group.bench_function("floor/kernel-64KiB", |b| {
        b.iter_custom(|iters| kernel_rate(iters, 64 << 10))
    });
    group.finish();

    let mut group = c.benchmark_group("build_record");
    group.bench_function(format!("ours-{MODE}"), |b| b.iter(our_record));
    group.bench_function("tower", |b| b.iter(peer_record));
    group.finish();
}

fn codec(c: &mut Criterion) {
    let ours = our_record();
    let peer = peer_record();
    let our_bytes = ours.encode().expect("encodes");
    let peer_bytes = serde_json::to_vec(&peer).expect("encodes");
    // What our persistent stores write: the record without its id, which they file
    // under a digest of it.
    let stored_bytes = ours.encode_without_id().expect("encodes");
    for (what, bytes) in [("whole record", &our_bytes), ("stored form", &stored_bytes)] {
        println!(
            "encoded {what}: ours {} bytes, tower-sessions (JSON) {} bytes: {:.2}x smaller",
            bytes.len(),
            peer_bytes.len(),
            peer_bytes.len() as f64 / bytes.len() as f64
        );
    }

    let mut group = c.benchmark_group("encode");
    group.bench_function(format!("ours-{MODE}"), |b| {
        b.iter(|| ours.encode().expect("encodes"))
    });
    group.bench_function("tower/json", |b| {
        b.iter(|| serde_json::to_vec(&peer).expect("encodes"))
    });
    group.finish();

    let mut group = c.benchmark_group("decode");
    group.bench_function(format!("ours-{MODE}"), |b| {
        b.iter(|| OurRecord::decode(&our_bytes).expect("decodes"))
    });
    group.bench_function("tower/json", |b| {
        b.iter(|| serde_json::from_slice::<PeerRecord>(&peer_bytes).expect("decodes"))
    });
    group.finish();
}

/// Reading the five values back typed, as a request's handler does: ours decodes
/// postcard and checks each value's shape tag; the peer converts its JSON values.
fn read_values(c: &mut Criterion) {
    let ours = our_record();
    let peer = peer_record();
    let mut group = c.benchmark_group("read_values");
    group.bench_function(format!("ours-{MODE}"), |b| {
        b.iter(|| {
            let user: Option<u64> = ours.get("user_id").expect("reads");
            let csrf: Option<String> = ours.get("csrf_token").expect("reads");
            let recent: Option<[u32; 8]> = ours.get("recent").expect("reads");
            let flash: Option<String> = ours.get("flash").expect("reads");
            let roles: Option<[String; 2]> = ours.get("roles").expect("reads");
            black_box((user, csrf, recent, flash, roles))
        })
    });
    group.bench_function("tower/json", |b| {
        b.iter(|| {
            let get = |key: &str| peer.data.get(key).cloned().expect("present");
            let user: u64 = serde_json::from_value(get("user_id")).expect("reads");
            let csrf: String = serde_json::from_value(get("csrf_token")).expect("reads");
            let recent: [u32; 8] = serde_json::from_value(get("recent")).expect("reads");
            let flash: String = serde_json::from_value(get("flash")).expect("reads");
            let roles: [String; 2] = serde_json::from_value(get("roles")).expect("reads");
            black_box((user, csrf, recent, flash, roles))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = ids, codec, read_values
}
criterion_main!(benches);
