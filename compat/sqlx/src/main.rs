//! Uses sqlx's SQLite driver and portable-sessions' `SqliteStore` on one database file
//! in one program: it builds only if both link the same SQLite.

use portable_sessions::{session::Record, SessionStore, SqliteStore};
use time::{Duration, OffsetDateTime};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("sqlx-compat-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("app.db");

    // The application's own data, through sqlx.
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let pool = sqlx::SqlitePool::connect(&url).await?;
    sqlx::query("CREATE TABLE users (name TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO users (name) VALUES ('alice')")
        .execute(&pool)
        .await?;

    // Its sessions, in the same file, through portable-sessions.
    let store = SqliteStore::open(&path)?;
    let mut record = Record::new(OffsetDateTime::now_utc() + Duration::hours(1));
    record.insert("user", "alice")?;
    store.create(&mut record).await?;
    let loaded = store
        .load(&record.id)
        .await?
        .ok_or("the session is there")?;
    assert_eq!(loaded.get::<String>("user")?.as_deref(), Some("alice"));

    let (users,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users")
        .fetch_one(&pool)
        .await?;
    assert_eq!(users, 1);
    pool.close().await;
    std::fs::remove_dir_all(&dir)?;
    println!("sqlx and portable-sessions share one SQLite: ok");
    Ok(())
}
