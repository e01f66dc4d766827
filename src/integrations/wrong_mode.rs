//! What the async-only integrations are in blocking mode: names that exist, so that a
//! program using them fails to compile with one error that names the cause (the
//! `sync` feature), not with missing items or dozens of "is not a future". The
//! library itself, built with `--all-features` (blocking mode), compiles: the error
//! comes only where a program uses them.

use std::marker::PhantomData;

use crate::SessionManager;

/// Fails the build of whatever uses it with `T`, with the message below.
struct AsyncModeOnly<T>(PhantomData<T>);

impl<T> AsyncModeOnly<T> {
    const CHECK: () = panic!(
        "portable-sessions: this integration needs async mode, but the `sync` feature is on in \
         this build. maybe-async's mode is global to a build: some crate in the dependency \
         graph enables `portable-sessions/sync` (or `maybe-async/is_sync`). Remove it, or use \
         `SessionManager::begin` and `finish` from a blocking server."
    );
}

/// In blocking mode: a placeholder whose use as a tower layer fails to compile with a
/// message naming the `sync` feature. [`SessionLayer`] exists in async mode.
#[cfg(feature = "axum")]
#[derive(Debug, Clone)]
pub struct SessionLayer(());

#[cfg(feature = "axum")]
impl SessionManager {
    /// In blocking mode: fails the build where the layer is used; see
    /// [`SessionLayer`].
    pub fn layer(self) -> SessionLayer {
        SessionLayer(())
    }
}

#[cfg(feature = "axum")]
impl<S> tower_layer::Layer<S> for SessionLayer {
    type Service = S;

    fn layer(&self, inner: S) -> S {
        let () = AsyncModeOnly::<S>::CHECK;
        inner
    }
}

/// In blocking mode: a placeholder whose use with `App::wrap` fails to compile with a
/// message naming the `sync` feature. [`SessionMiddleware`] exists in async mode.
#[cfg(feature = "actix-web")]
#[derive(Debug, Clone)]
pub struct SessionMiddleware(());

#[cfg(feature = "actix-web")]
impl SessionManager {
    /// In blocking mode: fails the build where the middleware is used; see
    /// [`SessionMiddleware`].
    pub fn middleware(self) -> SessionMiddleware {
        SessionMiddleware(())
    }
}

#[cfg(feature = "actix-web")]
impl<S, B> actix_web::dev::Transform<S, actix_web::dev::ServiceRequest> for SessionMiddleware
where
    S: actix_web::dev::Service<
            actix_web::dev::ServiceRequest,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
        > + 'static,
{
    type Response = actix_web::dev::ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = S;
    type InitError = ();
    type Future = std::future::Ready<Result<S, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        let () = AsyncModeOnly::<S>::CHECK;
        std::future::ready(Ok(service))
    }
}
