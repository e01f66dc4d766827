//! An axum router with the session layer, in blocking mode.
use axum::{routing::get, Router};
use portable_sessions::{MemoryStore, SessionManager};

fn main() {
    let router: Router = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(SessionManager::new(MemoryStore::new()).layer());
    drop(router);
}
