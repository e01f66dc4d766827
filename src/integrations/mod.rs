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
