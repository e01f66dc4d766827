//! A session's life, narrated: created, saved, loaded, served through a cache,
//! expired and purged. The same source runs in both modes:
//!
//! ```text
//! cargo run --example quickstart                  # async, on a minimal executor
//! cargo run --example quickstart --features sync  # blocking
//! ```

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use portable_sessions::{
    session::Record, session_store::Result, CachingSessionStore, ExpiredDeletion, MemoryStore,
    SessionStore,
};
use time::{Duration, OffsetDateTime};

#[maybe_async::maybe_async]
async fn run() -> Result<()> {
    // A clock we can move forward, so the example shows expiry without waiting.
    let start = OffsetDateTime::now_utc().unix_timestamp();
    let seconds = Arc::new(AtomicI64::new(start));
    let clock = {
        let seconds = seconds.clone();
        move || OffsetDateTime::from_unix_timestamp(seconds.load(Ordering::SeqCst)).unwrap()
    };
    let now = clock();

    // A cache in front of a store; the store stands in for a database.
    let cache = MemoryStore::with_clock(clock.clone());
    let database = MemoryStore::with_clock(clock);
    let store = CachingSessionStore::new(cache.clone(), database.clone());

    let mut record = Record::new(now + Duration::minutes(30));
    record.insert("user_id", &7u64)?;
    record.insert("csrf", "3f9c1d2e8a7b4c6d5e0f1a2b3c4d5e6f")?;
    store.create(&mut record).await?;
    println!("created session {:?}, expiring in 30 minutes", record.id);
    println!(
        "  the cookie would carry {} characters of id",
        record.id.to_string().len()
    );

    record.insert("cart", &vec!["apple", "pear"])?;
    store.save(&record).await?;
    println!("saved a cart into it");

    let loaded = store.load(&record.id).await?.expect("the session is live");
    let cart: Option<Vec<String>> = loaded.get("cart")?;
    println!(
        "loaded it back: user {:?}, cart {:?}",
        loaded.get::<u64>("user_id")?,
        cart
    );

    // The cache may lose anything; the store still answers and the cache refills.
    cache.delete(&record.id).await?;
    println!(
        "the cache dropped it: cache holds {} session(s)",
        cache.len()
    );
    let again = store.load(&record.id).await?;
    println!(
        "served again through the cache: {}; cache holds {} session(s)",
        again.is_some(),
        cache.len()
    );

    // A value read as the wrong type is an error, not a panic.
    match loaded.get::<u64>("cart") {
        Ok(value) => println!("unexpectedly read the cart as a number: {value:?}"),
        Err(err) => println!(
            "reading the cart as a number fails cleanly: {}",
            err.report()
        ),
    }

    // Forty minutes later the session has expired: it is never served again...
    seconds.fetch_add(40 * 60, Ordering::SeqCst);
    let expired = store.load(&record.id).await?;
    println!("40 minutes later, load returns {expired:?}");
    println!(
        "  though it is still held: cache {}, database {}",
        cache.len(),
        database.len()
    );

    // ...and one deletion pass frees it.
    let purged = store.delete_expired().await?;
    println!(
        "delete_expired purged {purged} session(s); cache {}, database {}",
        cache.len(),
        database.len()
    );
    Ok(())
}

#[maybe_async::sync_impl]
fn main() -> Result<()> {
    println!("(blocking mode)");
    run()
}

#[maybe_async::async_impl]
fn main() -> Result<()> {
    println!("(async mode, on futures-lite's block_on: no runtime needed)");
    futures_lite::future::block_on(run())
}
