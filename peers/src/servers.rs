//! Where the benchmarks' servers are, shared by both binaries (`#[path]` modules).

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
