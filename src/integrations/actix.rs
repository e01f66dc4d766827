//! Sessions in actix-web 4: [`SessionMiddleware`] and the [`Session`] extractor.
//! Async mode, feature `actix-web`.

use std::{
    fmt,
    future::{ready, Future, Ready},
    pin::Pin,
    rc::Rc,
    sync::Arc,
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{forward_ready, Payload, Service, ServiceRequest, ServiceResponse, Transform},
    http::{header, StatusCode},
    FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError,
};

use crate::{session::Session, session_store::Error, SessionManager};

/// An actix-web middleware that gives every request a [`Session`]: one `.wrap(...)`
/// on the `App`, and then `session: Session` in any handler.
///
/// For each request it calls [`SessionManager::begin`] on the request's `Cookie`
/// headers (no I/O: the session loads on first use), puts the [`Session`] in the
/// request's extensions, runs the handler, then calls
/// [`SessionManager::finish_response`] and appends its `Set-Cookie` header beside any
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
/// **Wrapped twice** (a scope with a `.wrap(...)` of its own inside a wrapped
/// `App`): the inner middleware finds the outer one's session in the request and
/// passes the request through, so there is one session and one cookie; the outer
/// one's manager (its cookie, store and configuration) and error response serve it.
///
/// # Examples
///
/// ```
/// use actix_web::{web, App, HttpResponse};
/// use portable_sessions::{session::Session, session_store, MemoryStore, SessionManager};
///
/// async fn visit(session: Session) -> Result<HttpResponse, session_store::Error> {
///     let visits = session.update("visits", |n: Option<u64>| n.unwrap_or(0) + 1).await?;
///     Ok(HttpResponse::Ok().body(format!("visits={visits}")))
/// }
///
/// let sessions = SessionManager::new(MemoryStore::new()).middleware();
/// // In `HttpServer::new(move || ...)`, once per worker:
/// let app = App::new().wrap(sessions.clone()).route("/", web::get().to(visit));
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct SessionMiddleware {
    manager: Arc<SessionManager>,
    on_error: Option<Arc<ErrorResponse>>,
}

/// The application's response to a session error.
type ErrorResponse = dyn Fn(&Error) -> HttpResponse + Send + Sync;

impl SessionMiddleware {
    /// Makes the middleware over `manager`.
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
    /// use actix_web::{http::StatusCode, HttpResponse};
    /// use portable_sessions::{MemoryStore, SessionManager};
    ///
    /// let sessions = SessionManager::new(MemoryStore::new())
    ///     .middleware()
    ///     .with_error_response(|err| {
    ///         HttpResponse::build(StatusCode::from_u16(err.http_status()).unwrap())
    ///             .insert_header(("retry-after", "5"))
    ///             .body("Sessions are down; try again shortly.")
    ///     });
    /// # let _ = sessions;
    /// ```
    pub fn with_error_response(
        mut self,
        respond: impl Fn(&Error) -> HttpResponse + Send + Sync + 'static,
    ) -> Self {
        self.on_error = Some(Arc::new(respond));
        self
    }
}

impl SessionManager {
    /// Returns a [`SessionMiddleware`] over this manager, for actix-web's
    /// `App::wrap` (feature `actix-web`, async mode). Clones share the manager.
    pub fn middleware(self) -> SessionMiddleware {
        SessionMiddleware::new(self)
    }
}

impl fmt::Debug for SessionMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionMiddleware")
            .field("manager", &self.manager)
            .field("on_error", &self.on_error.is_some())
            .finish()
    }
}

impl<S, B> Transform<S, ServiceRequest> for SessionMiddleware
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = SessionMiddlewareService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(SessionMiddlewareService {
            service: Rc::new(service),
            manager: self.manager.clone(),
            on_error: self.on_error.clone(),
        }))
    }
}

/// The service that [`SessionMiddleware`] wraps around a handler.
pub struct SessionMiddlewareService<S> {
    service: Rc<S>,
    manager: Arc<SessionManager>,
    on_error: Option<Arc<ErrorResponse>>,
}

impl<S> fmt::Debug for SessionMiddlewareService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionMiddlewareService")
            .field("manager", &self.manager)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<ServiceRequest> for SessionMiddlewareService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let service = self.service.clone();
        if request.extensions().get::<Session>().is_some() {
            // An outer middleware made the session: it finishes it.
            return Box::pin(async move {
                let response = service.call(request).await?;
                Ok(response.map_into_left_body())
            });
        }
        let session = self
            .manager
            .begin(request.headers().get_all(header::COOKIE));
        request.extensions_mut().insert(session.clone());
        let (manager, on_error) = (self.manager.clone(), self.on_error.clone());
        Box::pin(async move {
            // However this future ends (finished, an error, a 5xx, dropped with its
            // client, a panic), the session refuses changes afterwards: nothing
            // would keep them.
            let _ended = session.abandon_on_drop();
            let mut response = service.call(request).await?;
            let failed = response
                .response()
                .error()
                .and_then(|err| err.as_error::<Error>())
                .map(|err| on_error.as_ref().map(|respond| respond(err)));
            if let Some(answer) = failed {
                // The handler's `?` on a session error: it failed, so nothing of the
                // session is kept, whatever the answer (the guard abandons it); the
                // application gives the answer, if it has its own.
                return Ok(match answer {
                    Some(answer) => response.into_response(answer).map_into_right_body(),
                    None => response.map_into_left_body(),
                });
            }
            if response.status().is_server_error() {
                // The handler failed: its session changes are not kept.
                return Ok(response.map_into_left_body());
            }
            match finish(&manager, &session, response.headers_mut()).await {
                Ok(()) => Ok(response.map_into_left_body()),
                Err(err) => {
                    log::error!(
                        target: "portable_sessions::actix",
                        "writing the session failed: {}",
                        err.report()
                    );
                    let answer = match &on_error {
                        Some(respond) => respond(&err),
                        None => bare(&err),
                    };
                    Ok(response.into_response(answer).map_into_right_body())
                }
            }
        })
    }
}

/// Finishes `session` and adds what that asks of the response: its cookie,
/// `Vary: Cookie`, and `Cache-Control: private` when a cookie is set.
async fn finish(
    manager: &SessionManager,
    session: &Session,
    headers: &mut header::HeaderMap,
) -> crate::session_store::Result<()> {
    let finished = manager.finish_response(session).await?;
    if !finished.vary_cookie && finished.set_cookie.is_none() {
        // A request that never used its session: no header to look at.
        return Ok(());
    }
    let vary = headers
        .get_all(header::VARY)
        .filter_map(|value| value.to_str().ok());
    if finished.needs_vary(vary) {
        headers.append(header::VARY, header::HeaderValue::from_static("cookie"));
    }
    let existing: Vec<&str> = headers
        .get_all(header::CACHE_CONTROL)
        .filter_map(|value| value.to_str().ok())
        .collect();
    let existing = (!existing.is_empty()).then(|| existing.join(", "));
    if let Some(cache_control) = finished.cache_control(existing.as_deref()) {
        match header::HeaderValue::from_str(&cache_control) {
            Ok(value) => {
                headers.insert(header::CACHE_CONTROL, value);
            }
            Err(err) => super::unsendable("Cache-Control", &err),
        }
    }
    if let Some(set_cookie) = &finished.set_cookie {
        // The manager's checked cookie attributes make it a valid header value.
        match header::HeaderValue::from_str(set_cookie) {
            Ok(value) => headers.append(header::SET_COOKIE, value),
            Err(err) => super::unsendable("Set-Cookie", &err),
        }
    }
    Ok(())
}

impl FromRequest for Session {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    /// Takes the request's session; without a [`SessionMiddleware`], a bare 500 and a
    /// log line that says so.
    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            request
                .extensions()
                .get::<Session>()
                .cloned()
                .ok_or_else(|| {
                    log::error!(
                        target: "portable_sessions::actix",
                        "a handler takes a Session, but no SessionMiddleware wraps its route: \
                         add `.wrap(manager.middleware())`"
                    );
                    actix_web::error::ErrorInternalServerError("internal server error")
                }),
        )
    }
}

/// A session error answers with the status of [`Error::http_status`] (503 when the
/// store is down) and a body that says only that, never its details (they may name
/// the backend), or with the middleware's
/// [`with_error_response`](SessionMiddleware::with_error_response); it is logged
/// with its whole chain of causes: `?` works in handlers.
impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        log::error!(
            target: "portable_sessions::actix",
            "a request failed on its session: {}",
            self.report()
        );
        bare(self)
    }
}

/// The bare answer to a session error: its status, and a body that says only that.
fn bare(err: &Error) -> HttpResponse {
    let status = err.status_code();
    HttpResponse::build(status).body(super::error_text(status.as_u16()))
}
