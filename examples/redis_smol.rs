//! Two server instances sharing sessions through Redis, played by two `RedisStore`
//! values in one smol program: a user logs in on one, is recognized on the other,
//! and logs out there.
//!
//! ```text
//! cargo run --example redis_smol --features redis                      # 127.0.0.1:6379
//! cargo run --example redis_smol --features redis -- redis://host:port  # elsewhere
//! ```
//!
//! No tokio runtime: each operation writes its command and reads its reply on the
//! calling task, through async-io's reactor, so the same store works under any
//! executor.

#[cfg(not(feature = "sync"))]
fn main() -> portable_sessions::session_store::Result<()> {
    use std::time::Duration as StdDuration;

    use portable_sessions::{session::Record, RedisStore, SessionStore};
    use time::{Duration, OffsetDateTime};

    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());

    smol::block_on(async {
        // Each instance builds its own store from the same settings.
        let instance = |name: &str| -> portable_sessions::session_store::Result<RedisStore> {
            let store = RedisStore::new(&url)?
                .with_key_prefix("example-app:session:")
                .with_timeout(StdDuration::from_millis(500));
            println!("{name}: sessions in Redis under {:?}", store.key_prefix());
            Ok(store)
        };
        let web1 = instance("web1")?;
        let web2 = instance("web2")?;

        // web1 logs a user in and sets the cookie.
        let mut record = Record::new(OffsetDateTime::now_utc() + Duration::minutes(30));
        record.insert("user_id", &42u64)?;
        record.insert("name", "Ada")?;
        web1.create(&mut record).await?;
        let cookie = record.id.to_string();
        println!("web1: logged in user 42, cookie session={cookie}");

        // The next request lands on web2, which knows the user from the cookie alone.
        let id = cookie.parse().expect("a cookie this program set");
        let Some(mut seen) = web2.load(&id).await? else {
            panic!("web2 should find the session web1 created");
        };
        let name: Option<String> = seen.get("name")?;
        println!(
            "web2: request from {} (user {:?})",
            name.unwrap_or_default(),
            seen.get::<u64>("user_id")?
        );

        // web2 changes the session; web1 sees the change.
        seen.insert("cart", &vec!["book", "lamp"])?;
        web2.save(&seen).await?;
        let cart: Option<Vec<String>> = web1
            .load(&id)
            .await?
            .and_then(|r| r.get("cart").ok().flatten());
        println!("web1: cart is {cart:?}");

        // Logging out on web2 ends the session everywhere.
        web2.delete(&id).await?;
        let after = web1.load(&id).await?;
        println!("web1: after logout on web2, the session is {after:?}");
        Ok(())
    })
}

#[cfg(feature = "sync")]
fn main() {
    eprintln!("redis_smol shows async mode on smol: run it without `--features sync`");
}
