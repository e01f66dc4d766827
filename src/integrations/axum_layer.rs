//! Sessions in axum (and any tower stack): [`SessionLayer`] and the [`Session`]
//! extractor. Async mode, feature `axum`.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum_core::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::{header, request::Parts, HeaderValue, Request, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::{session::Session, session_store::Error, SessionManager};

/// A tower [`Layer`] that gives every request a [`Session`]: one line in an axum
/// application, and then `session: Session` in any handler.
///
/// For each request it calls [`SessionManager::begin`] on the request's `Cookie`
/// headers (no I/O: the session loads on first use), puts the [`Session`] in the
/// request's extensions, runs the inner service, then calls
/// [`SessionManager::finish`] and appends its `Set-Cookie` header, beside any
/// cookies the handler set.
///
/// **When the handler failed, nothing is written**: a response with a 5xx status
/// skips `finish` (it calls [`SessionManager::abandon`]), so the session's pending
/// changes are dropped, a pending [`Session::cycle_id`] never happens, and no cookie
/// is sent (a value changed with [`Session::update`], which writes at once, stays
/// written). When `finish` itself fails (the store is down), the response is
/// replaced by a bare 500 and the error is logged.
///
/// # Examples
///
/// ```
/// use axum::{routing::get, Router};
/// use portable_sessions::{session::Session, session_store, MemoryStore, SessionManager};
///
/// async fn visit(session: Session) -> Result<String, session_store::Error> {
///     let visits = session.update("visits", |n: Option<u64>| n.unwrap_or(0) + 1).await?;
///     Ok(format!("visits={visits}"))
/// }
///
/// let app: Router = Router::new()
///     .route("/", get(visit))
///     .layer(SessionManager::new(MemoryStore::new()).layer());
/// ```
#[derive(Clone)]
pub struct SessionLayer {
    manager: Arc<SessionManager>,
}

impl SessionLayer {
    /// Makes the layer over `manager`.
    pub fn new(manager: SessionManager) -> Self {
        Self {
            manager: Arc::new(manager),
        }
    }
}

impl SessionManager {
    /// Returns a [`SessionLayer`] over this manager, for axum's `Router::layer` or
    /// any tower stack (feature `axum`, async mode).
    pub fn layer(self) -> SessionLayer {
        SessionLayer::new(self)
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            manager: self.manager.clone(),
        }
    }
}

impl fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer")
            .field("manager", &self.manager)
            .finish()
    }
}

/// The service that [`SessionLayer`] wraps around an inner one.
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    manager: Arc<SessionManager>,
}

impl<S> fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService")
            .field("manager", &self.manager)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let session = self
            .manager
            .begin(request.headers().get_all(header::COOKIE));
        request.extensions_mut().insert(session.clone());
        // The clone that was made ready by `poll_ready` serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let manager = self.manager.clone();
        Box::pin(async move {
            // However this future ends (finished, an error, a 5xx, dropped with its
            // client, a panic), the session refuses changes afterwards: nothing
            // would keep them.
            let _ended = session.abandon_on_drop();
            let mut response = inner.call(request).await?;
            if response.status().is_server_error() {
                // The handler failed: its session changes are not kept.
                return Ok(response);
            }
            match manager.finish_header(&session).await {
                Ok(Some(set_cookie)) => {
                    response
                        .headers_mut()
                        .append(header::SET_COOKIE, set_cookie);
                }
                Ok(None) => {}
                Err(err) => {
                    log::error!(
                        target: "portable_sessions::axum",
                        "writing the session failed: {}",
                        err.report()
                    );
                    let mut failed = http::Response::new(ResBody::default());
                    *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    return Ok(failed);
                }
            }
            Ok(response)
        })
    }
}

impl SessionManager {
    /// Like [`finish`](Self::finish), with the `Set-Cookie` value as a typed header
    /// value, for frameworks built on the `http` crate (feature `axum`).
    ///
    /// # Errors
    ///
    /// As for [`finish`](Self::finish); a value that is not a valid header (which
    /// the manager's checked cookie attributes rule out) is [`Error::Encode`].
    pub async fn finish_header(
        &self,
        session: &Session,
    ) -> crate::session_store::Result<Option<HeaderValue>> {
        let set_cookie = self.finish(session).await?;
        set_cookie
            .map(|value| HeaderValue::try_from(value).map_err(Error::encode))
            .transpose()
    }
}

/// The rejection of the [`Session`] extractor when no [`SessionLayer`] ran for the
/// request: a 500, and a log line that says so.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MissingSessionLayer;

impl fmt::Display for MissingSessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a handler takes a Session, but no SessionLayer runs for its route")
    }
}

impl std::error::Error for MissingSessionLayer {}

impl IntoResponse for MissingSessionLayer {
    fn into_response(self) -> Response {
        log::error!(target: "portable_sessions::axum", "{self}: add `.layer(manager.layer())`");
        (StatusCode::INTERNAL_SERVER_ERROR, "internal server error").into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = MissingSessionLayer;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(MissingSessionLayer)
    }
}

/// A store error answers a bare 500, never its details (they may name the backend),
/// and is logged with its whole chain of causes: `?` works in handlers.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        log::error!(
            target: "portable_sessions::axum",
            "a handler failed on its session: {}",
            self.report()
        );
        (StatusCode::INTERNAL_SERVER_ERROR, "internal server error").into_response()
    }
}
