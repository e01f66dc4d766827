//! The application that both HTTP examples serve: a visit counter, a login and a
//! logout on a `Session`. Written once for both modes with `maybe_async`, so that each
//! example file shows only what differs: the server and the session cookie's round
//! trip through `SessionManager::begin` and `SessionManager::finish`.

use std::sync::Arc;

use portable_sessions::{
    session::{Expiry, Owner, Session, SessionConfig},
    session_store::Result,
    ExpiredDeletion, MemoryStore, SessionManager, SessionStore,
};
use time::Duration;

/// The store named by the examples' second argument (with its expired-session
/// deletion, which the examples run every minute): `memory` (the default),
/// `sqlite:PATH` (feature `sqlite`), a Redis URL (feature `redis`: `redis://`,
/// `rediss://`, `redis+unix://`, `redis-cluster://`, `rediss-cluster://`,
/// `redis-sentinel://`, `rediss-sentinel://`), or a `postgres://` URL (feature
/// `postgres`).
///
/// # Errors
///
/// Says what is wrong with the argument, or why the store cannot be opened.
pub(crate) fn open_store(
    spec: Option<&str>,
) -> std::result::Result<Arc<dyn ExpiredDeletion>, String> {
    match spec.unwrap_or("memory") {
        "memory" => Ok(Arc::new(MemoryStore::new())),
        spec if spec.starts_with("sqlite:") => open_sqlite(&spec["sqlite:".len()..]),
        spec if spec.starts_with("redis") || spec.starts_with("unix://") => open_redis(spec),
        spec if spec.starts_with("postgres://") || spec.starts_with("postgresql://") => {
            open_postgres(spec)
        }
        other => Err(format!(
            "unknown store {other:?}: expected `memory`, `sqlite:PATH`, a Redis URL \
             (`redis://`, `rediss://`, `redis-cluster://`, `redis-sentinel://`, ...) or a \
             `postgres://` URL"
        )),
    }
}

#[cfg(feature = "sqlite")]
fn open_sqlite(path: &str) -> std::result::Result<Arc<dyn ExpiredDeletion>, String> {
    if path.is_empty() {
        return Err("`sqlite:` needs a file path, as in `sqlite:/tmp/sessions.db`".to_owned());
    }
    let store = portable_sessions::SqliteStore::open(path)
        .map_err(|err| format!("cannot open {path}: {}", err.report()))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "sqlite"))]
fn open_sqlite(_: &str) -> std::result::Result<Arc<dyn ExpiredDeletion>, String> {
    Err("this build has no SQLite store: build with `--features sqlite`".to_owned())
}

#[cfg(feature = "redis")]
fn open_redis(url: &str) -> std::result::Result<Arc<dyn ExpiredDeletion>, String> {
    let store = portable_sessions::RedisStore::new(url)
        .map_err(|err| format!("bad Redis URL: {}", err.report()))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
fn open_redis(_: &str) -> std::result::Result<Arc<dyn ExpiredDeletion>, String> {
    Err("this build has no Redis store: build with `--features redis`".to_owned())
}

#[cfg(feature = "postgres")]
fn open_postgres(url: &str) -> std::result::Result<Arc<dyn ExpiredDeletion>, String> {
    let store = portable_sessions::PostgresStore::new(url)
        .map_err(|err| format!("bad PostgreSQL URL: {}", err.report()))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_: &str) -> std::result::Result<Arc<dyn ExpiredDeletion>, String> {
    Err("this build has no PostgreSQL store: build with `--features postgres`".to_owned())
}

/// The cookie name the examples use.
pub(crate) const COOKIE: &str = "sid";

/// The examples' session settings: a `sid` cookie (with the default `Path=/`,
/// `Secure`, `HttpOnly`, `SameSite=Lax`), sessions that end after 30 idle minutes and
/// at most a day after they began, and reads that keep a session alive, rewriting it
/// at most once per 7.5 minutes.
pub(crate) fn sessions(store: impl SessionStore) -> SessionManager {
    let config = SessionConfig::new(Expiry::OnInactivity(Duration::minutes(30)))
        .with_max_lifetime(Duration::days(1));
    SessionManager::new(store)
        .with_config(config)
        .with_cookie_name(COOKIE)
        .with_refresh_on_request(0.25)
}

/// What the application answers: a status code and a text body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
}

fn reply(status: u16, body: impl Into<String>) -> Reply {
    Reply {
        status,
        body: body.into(),
    }
}

/// The answer to a request for the user's sessions from a session without an owner:
/// 401 when logged out, 501 when logged in on a store that keeps no owners (or
/// before it kept them).
#[maybe_async::maybe_async]
async fn without_owner(session: &Session) -> Result<Option<Reply>> {
    if session.owner().await?.is_some() {
        return Ok(None);
    }
    let user = session.get::<String>("user").await?;
    Ok(Some(match user {
        // A store that keeps no owners, or a login from before it kept them.
        Some(_) => reply(501, "no list of this login's sessions is kept\n"),
        None => reply(401, "not logged in\n"),
    }))
}

/// Serves one request on its session.
///
/// - `GET /`: counts the visit, atomically (concurrent visits of one session each
///   count once); answers `visits=N user=NAME` (`-` when logged out), or 409 when
///   another request ended or moved the session first (a stale cookie, sent before
///   a login's or logout's response arrived), since the visit was not kept.
/// - `POST /login` with a name as the body: moves the session to a new id (against
///   session fixation) and logs that name in: the session's owner is that name.
/// - `POST /logout`: ends the session.
/// - `GET /sessions`: the logged-in user's live sessions, oldest first, one line
///   each: its handle, when it logged in, was last written and expires, and
///   `current` for the session of this request; 401 when logged out, 501 on a
///   store that keeps no owners (Redis Cluster: the login works, without the list).
/// - `POST /logout-others`: ends the user's other sessions ("sign out the other
///   devices"); `POST /logout-everywhere` ends them all, this one included.
///
/// # Errors
///
/// Returns the store's error; the server answers 500 then.
#[maybe_async::maybe_async]
pub(crate) async fn route(
    session: &Session,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Reply> {
    // Route on the path alone: `/?utm=x` is still `/`.
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/") => {
            let counted = session
                .update("visits", |n: Option<u64>| n.unwrap_or(0) + 1)
                .await;
            let visits = match counted {
                Ok(visits) => visits,
                // Another request logged out or logged in (moving the session)
                // first: this visit was counted nowhere, so say so rather than
                // show a count that was not kept. No cookie goes out.
                Err(err) if err.is_session_gone() => {
                    return Ok(reply(409, "the session ended or moved: reload\n"));
                }
                Err(err) => return Err(err),
            };
            let user = session.get::<String>("user").await?;
            let user = user.as_deref().unwrap_or("-");
            Ok(reply(200, format!("visits={visits} user={user}\n")))
        }
        ("POST", "/login") => {
            // A real application checks a password here.
            let name = std::str::from_utf8(body).unwrap_or_default().trim();
            let valid = (1..=64).contains(&name.len())
                && name.chars().all(|c| c.is_alphanumeric() || c == '_');
            if !valid {
                return Ok(reply(400, "the body must be a user name\n"));
            }
            session.cycle_id().await?;
            session.insert("user", name).await?;
            let owned = session.set_owner(&Owner::new(name)?).await;
            match owned {
                Ok(()) => {}
                // A store that keeps no owners (Redis Cluster): logged in all the
                // same, without the list of the user's sessions.
                Err(err) if err.is_unsupported() => {}
                Err(err) => return Err(err),
            }
            Ok(reply(200, format!("logged in as {name}\n")))
        }
        ("GET", "/sessions") => {
            if let Some(refused) = without_owner(session).await? {
                return Ok(refused);
            }
            let mut listed = session.owner_sessions().await?;
            listed.sort_by_key(|listed| (listed.created_at(), listed.handle()));
            let mut body = String::new();
            for listed in listed {
                body.push_str(&format!(
                    "{} created={} written={} expires={}{}\n",
                    listed.handle(),
                    listed.created_at().unix_timestamp(),
                    listed.written_at().unix_timestamp(),
                    listed.expiry_date().unix_timestamp(),
                    if listed.is_current() { " current" } else { "" },
                ));
            }
            Ok(reply(200, body))
        }
        ("POST", "/logout-others") => {
            if let Some(refused) = without_owner(session).await? {
                return Ok(refused);
            }
            let ended = session.end_other_sessions().await?;
            Ok(reply(200, format!("ended {ended} other sessions\n")))
        }
        ("POST", "/logout-everywhere") => {
            if let Some(refused) = without_owner(session).await? {
                return Ok(refused);
            }
            let ended = session.end_all_sessions().await?;
            Ok(reply(200, format!("ended {ended} sessions\n")))
        }
        ("POST", "/logout") => {
            session.flush().await?;
            Ok(reply(200, "logged out\n"))
        }
        _ => Ok(reply(404, "not found\n")),
    }
}
