//! The record codec (what persistent stores write) against serde_json of
//! tower-sessions' record, on the same five-key workload as `benches/stores.rs`.
//!
//! The codec is the same in both modes; the benchmark names carry the mode anyway, so
//! that runs of both modes sit side by side in criterion's report. The encoded sizes
//! are printed before the timings.

use criterion::{criterion_group, criterion_main, Criterion};

mod common;
use common::{criterion_config, our_record, peer_record, OurRecord, PeerRecord, MODE};

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

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = codec
}
criterion_main!(benches);
