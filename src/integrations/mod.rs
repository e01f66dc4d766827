//! The web framework integrations (async mode), and what stands in for them in
//! blocking mode.

#[cfg(all(feature = "actix-web", not(feature = "sync")))]
pub(crate) mod actix;
#[cfg(all(feature = "axum", not(feature = "sync")))]
pub(crate) mod axum_layer;
#[cfg(all(feature = "tower-sessions", not(feature = "sync")))]
pub(crate) mod tower_sessions;
#[cfg(all(feature = "sync", any(feature = "axum", feature = "actix-web")))]
pub(crate) mod wrong_mode;

/// The body of the bare answer to a session error of this HTTP status: what the
/// status means, never the error's details (they may name the backend).
#[cfg(all(not(feature = "sync"), any(feature = "axum", feature = "actix-web")))]
fn error_text(status: u16) -> &'static str {
    match status {
        503 => "service unavailable",
        409 => "the session changed under this request",
        _ => "internal server error",
    }
}

/// Logs a session header that could not be sent: the session is already written,
/// so the response goes on without it. (The manager's checks make it unreachable.)
#[cfg(all(not(feature = "sync"), any(feature = "axum", feature = "actix-web")))]
fn unsendable(header: &str, err: &dyn std::fmt::Display) {
    log::error!(
        target: "portable_sessions::session",
        "the session's {header} header is not a valid header value, and was not sent: {err}"
    );
}
