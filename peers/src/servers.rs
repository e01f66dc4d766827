//! Where the benchmarks' servers are, and the SQLite peer's setup, shared by both
//! binaries (`#[path]` modules).

/// Where the PostgreSQL server is: `PEERS_POSTGRES` or the test server.
pub fn postgres_url() -> String {
    std::env::var("PEERS_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Runs `sql` on that server with psql.
pub fn psql(sql: &str) {
    let status = std::process::Command::new("psql")
        .arg(postgres_url())
        .args(["-X", "-q", "-c", sql])
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql: {sql}");
}

/// tower-sessions-sqlx-store's SQLite store as its documentation sets it up (a file in
/// WAL mode, each commit fsync'd), on a pool of `connections`, its table made.
pub async fn peer_sqlite(
    path: &std::path::Path,
    connections: u32,
) -> tower_sessions_sqlx_store::SqliteStore {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Full);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(connections)
        .connect_with(options)
        .await
        .unwrap();
    let store = tower_sessions_sqlx_store::SqliteStore::new(pool);
    store.migrate().await.unwrap();
    store
}
