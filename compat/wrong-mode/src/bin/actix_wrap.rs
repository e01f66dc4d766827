//! An actix-web app wrapped with the session middleware, in blocking mode.
use actix_web::{web, App, HttpServer};
use portable_sessions::{MemoryStore, SessionManager};

fn main() -> std::io::Result<()> {
    let middleware = SessionManager::new(MemoryStore::new()).middleware();
    actix_web::rt::System::new().block_on(
        HttpServer::new(move || {
            App::new()
                .wrap(middleware.clone())
                .route("/", web::get().to(|| async { "ok" }))
        })
        .bind("127.0.0.1:0")?
        .run(),
    )
}
