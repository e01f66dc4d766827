//! Four server processes' worth of workers sharing sessions through PostgreSQL: one
//! logs a user in, then all of them count that user's requests at once, and no step
//! is lost. The same source runs in both modes:
//!
//! ```text
//! cargo run --example postgres_workers --features postgres                   # async (smol)
//! cargo run --example postgres_workers --features postgres,sync              # blocking threads
//! cargo run --example postgres_workers --features postgres -- postgres://USER:PASSWORD@HOST/DB
//! ```
//!
//! The URL defaults to `postgres://postgres@127.0.0.1:5432/test`. Sessions go in the
//! table `portable_sessions_example.sessions`, which the store creates if missing.

use std::{sync::Arc, time::Duration as StdDuration};

use portable_sessions::{
    session::Expiry, session_store::Result, ExpiredDeletion, PostgresStore, SessionManager,
};
use time::Duration;

const WORKERS: usize = 4;
const REQUESTS: usize = 25;

/// One worker: `REQUESTS` requests carrying `cookie`, each counting itself.
#[maybe_async::maybe_async]
async fn worker(sessions: Arc<SessionManager>, cookie: String) -> Result<()> {
    for _ in 0..REQUESTS {
        let session = sessions.begin([cookie.as_str()]);
        // A conditional write: if another request wrote first, this one reloads and
        // counts again on top of it.
        session
            .update("requests", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await?;
        sessions.finish(&session).await?;
    }
    Ok(())
}

#[maybe_async::maybe_async]
async fn run(url: &str) -> Result<()> {
    let store = PostgresStore::new(url)?
        .with_table("portable_sessions_example", "sessions")?
        .with_timeout(StdDuration::from_secs(5));
    // Fail now, not at the first request, if the URL, password or privileges are wrong.
    store.create_table().await?;
    let sessions = Arc::new(
        SessionManager::new(store.clone())
            .with_cookie_name("sid")
            .with_expiry(Expiry::OnInactivity(Duration::minutes(30))),
    );

    // A login: the response's Set-Cookie carries the new session's id.
    let session = sessions.begin(None::<&str>);
    session.insert("user", "alice").await?;
    let set_cookie = sessions
        .finish(&session)
        .await?
        .expect("a new session sets its cookie");
    let cookie = set_cookie.split(';').next().unwrap_or_default().to_owned();
    println!("logged in: Set-Cookie: {set_cookie}");

    run_workers(&sessions, &cookie).await?;

    let session = sessions.begin([cookie.as_str()]);
    let user: Option<String> = session.get("user").await?;
    let counted: Option<u64> = session.get("requests").await?;
    println!(
        "{WORKERS} workers x {REQUESTS} requests at once: user {user:?}, requests counted {}",
        counted.unwrap_or(0)
    );
    assert_eq!(counted, Some((WORKERS * REQUESTS) as u64), "no step lost");

    // A deletion pass, as a scheduler would run it: one short statement per batch.
    let deleted = store.delete_expired().await?;
    println!("deleted {deleted} expired session(s)");
    Ok(())
}

/// Runs the workers on threads, each a blocking loop.
#[maybe_async::sync_impl]
fn run_workers(sessions: &Arc<SessionManager>, cookie: &str) -> Result<()> {
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (sessions, cookie) = (sessions.clone(), cookie.to_owned());
            std::thread::spawn(move || worker(sessions, cookie))
        })
        .collect();
    workers
        .into_iter()
        .try_for_each(|worker| worker.join().expect("a worker does not panic"))
}

/// Runs the workers as tasks on smol's executor: the store needs no runtime.
#[maybe_async::async_impl]
async fn run_workers(sessions: &Arc<SessionManager>, cookie: &str) -> Result<()> {
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| smol::spawn(worker(sessions.clone(), cookie.to_owned())))
        .collect();
    for worker in workers {
        worker.await?;
    }
    Ok(())
}

fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    #[cfg(feature = "sync")]
    let result = run(&url);
    #[cfg(not(feature = "sync"))]
    let result = smol::block_on(run(&url));
    if let Err(err) = result {
        eprintln!("error: {}", err.report());
        std::process::exit(1);
    }
}
