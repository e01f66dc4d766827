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
    body::Body,
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::{header, request::Parts, HeaderValue, Request, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::{session::Session, session_store::Error, SessionManager, SessionResponse};

/// A tower [`Layer`] that gives every request a [`Session`]: one line in an axum
/// application, and then `session: Session` in any handler.
///
/// For each request it calls [`SessionManager::begin`] on the request's `Cookie`
/// headers (no I/O: the session loads on first use), puts the [`Session`] in the
/// request's extensions, runs the inner service, then calls
/// [`SessionManager::finish_response`] and appends its `Set-Cookie` header, beside any
/// cookies the handler set.
///
/// **When the handler failed, nothing is written**: a response with a 5xx status,
/// or one made from the crate's [`Error`] returned through `?` (whatever the status
/// [`with_error_response`](Self::with_error_response) gives it), skips `finish` (it
/// calls [`SessionManager::abandon`]), so the session's pending
/// changes are dropped, a pending [`Session::cycle_id`] never happens, and no cookie
/// is sent (a value changed with [`Session::update`], which writes at once, stays
/// written).
///
/// **Errors**: when `finish` itself fails, or a handler returns the crate's
/// [`Error`] through `?`, the answer has the status of
/// [`Error::http_status`]: `503 Service Unavailable` when the store is down, 500 for
/// a bug; its body says only that, and the error is logged with its causes. Give
/// the application's own response with
/// [`with_error_response`](Self::with_error_response).
///
/// **Caches**: a response whose handler used the session, or that sets the cookie,
/// gets `Vary: Cookie`; one that sets the cookie gets `Cache-Control: private`
/// (`public` and `s-maxage` dropped), so no shared cache serves one user's session
/// to another (see [`SessionManager::finish_response`]).
///
/// **Applied twice** (a nested router with a layer of its own): the inner layer
/// finds the outer one's session in the request and passes the request through, so
/// there is one session and one cookie; the outer one's manager (its cookie, store
/// and configuration) and error response serve the request.
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
    on_error: Option<Arc<ErrorResponse>>,
}

/// The application's response to a session error.
type ErrorResponse = dyn Fn(&Error) -> Response + Send + Sync;

impl SessionLayer {
    /// Makes the layer over `manager`.
    pub fn new(manager: SessionManager) -> Self {
        Self {
            manager: Arc::new(manager),
            on_error: None,
        }
    }

    /// Answers a session error with the application's own response (a page, a JSON
    /// body, a `Retry-After`) instead of the bare one: for `finish` failing, and
    /// for a handler that returned the crate's [`Error`] through `?`. The error is
    /// still logged.
    ///
    /// ```
    /// use axum::{http::StatusCode, response::IntoResponse, routing::get, Router};
    /// use portable_sessions::{MemoryStore, SessionManager};
    ///
    /// let layer = SessionManager::new(MemoryStore::new())
    ///     .layer()
    ///     .with_error_response(|err| {
    ///         let status = StatusCode::from_u16(err.http_status()).unwrap();
    ///         (status, [("retry-after", "5")], "Sessions are down; try again shortly.")
    ///             .into_response()
    ///     });
    /// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(layer);
    /// ```
    pub fn with_error_response(
        mut self,
        respond: impl Fn(&Error) -> Response + Send + Sync + 'static,
    ) -> Self {
        self.on_error = Some(Arc::new(respond));
        self
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
            on_error: self.on_error.clone(),
        }
    }
}

impl fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer")
            .field("manager", &self.manager)
            .field("on_error", &self.on_error.is_some())
            .finish()
    }
}

/// The service that [`SessionLayer`] wraps around an inner one.
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    manager: Arc<SessionManager>,
    on_error: Option<Arc<ErrorResponse>>,
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
    ResBody: From<Body> + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The clone that was made ready by `poll_ready` serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.extensions().get::<Session>().is_some() {
            // An outer layer made the session: it finishes it.
            return Box::pin(inner.call(request));
        }
        let session = self
            .manager
            .begin(request.headers().get_all(header::COOKIE));
        request.extensions_mut().insert(session.clone());
        let manager = self.manager.clone();
        let on_error = self.on_error.clone();
        Box::pin(async move {
            // However this future ends (finished, an error, a 5xx, dropped with its
            // client, a panic), the session refuses changes afterwards: nothing
            // would keep them.
            let _ended = session.abandon_on_drop();
            let response = inner.call(request).await?;
            if let Some(failed) = response.extensions().get::<HandlerError>() {
                // The handler's `?` on a session error: it failed, so nothing of the
                // session is kept, whatever the answer (the guard abandons it); the
                // application gives the answer, if it has its own.
                return Ok(match &on_error {
                    Some(respond) => respond(&failed.0).map(ResBody::from),
                    None => response,
                });
            }
            let mut response = response;
            if response.status().is_server_error() {
                // The handler failed: its session changes are not kept.
                return Ok(response);
            }
            match manager.finish_response(&session).await {
                Ok(finished) => {
                    add_session_headers(response.headers_mut(), &finished);
                    Ok(response)
                }
                Err(err) => {
                    log::error!(
                        target: "portable_sessions::axum",
                        "writing the session failed: {}",
                        err.report()
                    );
                    Ok(match &on_error {
                        Some(respond) => respond(&err),
                        None => bare(&err),
                    }
                    .map(ResBody::from))
                }
            }
        })
    }
}

/// Adds what `finished` asks of the response: its cookie, `Vary: Cookie`, and
/// `Cache-Control: private` when a cookie is set.
fn add_session_headers(headers: &mut http::HeaderMap, finished: &SessionResponse) {
    if !finished.vary_cookie && finished.set_cookie.is_none() {
        // A request that never used its session: no header to look at.
        return;
    }
    let vary = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|value| value.to_str().ok());
    if finished.needs_vary(vary) {
        headers.append(header::VARY, HeaderValue::from_static("cookie"));
    }
    let existing: Vec<&str> = headers
        .get_all(header::CACHE_CONTROL)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let existing = (!existing.is_empty()).then(|| existing.join(", "));
    if let Some(cache_control) = finished.cache_control(existing.as_deref()) {
        // Only the directives' own characters: always a valid header value.
        match HeaderValue::try_from(cache_control) {
            Ok(value) => {
                headers.insert(header::CACHE_CONTROL, value);
            }
            Err(err) => super::unsendable("Cache-Control", &err),
        }
    }
    if let Some(set_cookie) = &finished.set_cookie {
        // The manager's checked cookie attributes make it a valid header value.
        match HeaderValue::try_from(set_cookie.as_str()) {
            Ok(value) => {
                headers.append(header::SET_COOKIE, value);
            }
            Err(err) => super::unsendable("Set-Cookie", &err),
        }
    }
}

/// The bare answer to a session error: its status, and a body that says only that.
fn bare(err: &Error) -> Response {
    let status =
        StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, super::error_text(status.as_u16())).into_response()
}

/// What a handler's `?` on the crate's [`Error`] leaves in its response, for the
/// layer's [`with_error_response`](SessionLayer::with_error_response).
#[derive(Clone)]
struct HandlerError(Arc<Error>);

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

/// A session error answers with the status of [`Error::http_status`] (503 when the
/// store is down) and a body that says only that, never its details (they may name
/// the backend), or with the layer's
/// [`with_error_response`](SessionLayer::with_error_response); it is logged with its
/// whole chain of causes: `?` works in handlers.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        log::error!(
            target: "portable_sessions::axum",
            "a handler failed on its session: {}",
            self.report()
        );
        let mut response = bare(&self);
        response
            .extensions_mut()
            .insert(HandlerError(Arc::new(self)));
        response
    }
}
