//! A blocking program whose sessions survive a restart: run it twice, and the second
//! run finds the session the first one created.
//!
//! ```text
//! cargo run --example sqlite_sync --features sqlite,sync            # a new session
//! cargo run --example sqlite_sync --features sqlite,sync            # welcome back
//! cargo run --example sqlite_sync --features sqlite,sync -- DIR     # files in DIR
//! ```
//!
//! The database and a file standing in for the browser's cookie go in DIR (by default
//! `portable-sessions-example` under the system's temporary directory). No executor,
//! no async: with the `sync` feature every store call is a plain blocking call.

#[cfg(feature = "sync")]
fn main() -> portable_sessions::session_store::Result<()> {
    use std::{fs, path::PathBuf};

    use portable_sessions::{session::Record, ExpiredDeletion, SessionStore, SqliteStore};
    use time::{Duration, OffsetDateTime};

    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("portable-sessions-example"));
    fs::create_dir_all(&dir).map_err(portable_sessions::session_store::Error::backend)?;
    let cookie_jar = dir.join("cookie.txt");

    // Opening creates the file and its table the first time, and is idempotent.
    let store = SqliteStore::open(dir.join("sessions.db"))?;
    let now = OffsetDateTime::now_utc();

    // The "browser" sends back the cookie it was given, if any; a cookie that does
    // not parse or names no live session just means a new visitor.
    let returning = match fs::read_to_string(&cookie_jar)
        .ok()
        .and_then(|text| text.trim().parse().ok())
    {
        Some(id) => store.load(&id)?,
        None => None,
    };

    match returning {
        Some(mut record) => {
            let visits = record.get::<u32>("visits")?.unwrap_or(0) + 1;
            let first: i64 = record.get("first_visit")?.unwrap_or_default();
            record.insert("visits", &visits)?;
            // Sliding expiry: every visit keeps the session for another 30 days.
            record.expiry_date = now + Duration::days(30);
            store.save(&record)?;
            println!(
                "welcome back: visit {visits}, first seen {} s ago (session {:?})",
                now.unix_timestamp() - first,
                record.id
            );
        }
        None => {
            let mut record = Record::new(now + Duration::days(30));
            record.insert("visits", &1u32)?;
            record.insert("first_visit", &now.unix_timestamp())?;
            store.create(&mut record)?;
            // `create` may have drawn a new id: the cookie takes the final one.
            fs::write(&cookie_jar, record.id.to_string())
                .map_err(portable_sessions::session_store::Error::backend)?;
            println!(
                "new session {:?}, stored in {}: run me again",
                record.id,
                store.path().display()
            );
        }
    }

    // What a periodic job would do: drop sessions that expired.
    let purged = store.delete_expired()?;
    println!("{purged} expired session(s) purged");
    Ok(())
}

#[cfg(not(feature = "sync"))]
fn main() {
    eprintln!("sqlite_sync shows blocking mode: run it with `--features sqlite,sync`");
}
