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
    body::MessageBody,
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
/// request's extensions, runs the handler, then calls [`SessionManager::finish`] and
/// appends its `Set-Cookie` header beside any cookies the handler set.
///
/// **When the handler failed, nothing is written**: a response with a 5xx status
/// skips `finish` (it calls [`SessionManager::abandon`]), so the session's pending
/// changes are dropped, a pending [`Session::cycle_id`] never happens, and no cookie
/// is sent (a value changed with [`Session::update`], which writes at once, stays
/// written). When `finish` itself fails, the request fails with a bare 500 and the
/// error is logged.
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
}

impl SessionMiddleware {
    /// Makes the middleware over `manager`.
    pub fn new(manager: SessionManager) -> Self {
        Self {
            manager: Arc::new(manager),
        }
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
            .finish()
    }
}

impl<S, B> Transform<S, ServiceRequest> for SessionMiddleware
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = SessionMiddlewareService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(SessionMiddlewareService {
            service: Rc::new(service),
            manager: self.manager.clone(),
        }))
    }
}

/// The service that [`SessionMiddleware`] wraps around a handler.
pub struct SessionMiddlewareService<S> {
    service: Rc<S>,
    manager: Arc<SessionManager>,
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
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let session = self
            .manager
            .begin(request.headers().get_all(header::COOKIE));
        request.extensions_mut().insert(session.clone());
        let (service, manager) = (self.service.clone(), self.manager.clone());
        Box::pin(async move {
            // However this future ends (finished, an error, a 5xx, dropped with its
            // client, a panic), the session refuses changes afterwards: nothing
            // would keep them.
            let _ended = session.abandon_on_drop();
            let mut response = service.call(request).await?;
            if response.status().is_server_error() {
                // The handler failed: its session changes are not kept.
                return Ok(response);
            }
            let set_cookie = manager.finish(&session).await?;
            if let Some(value) = set_cookie {
                let value = header::HeaderValue::from_str(&value).map_err(Error::encode)?;
                response.headers_mut().append(header::SET_COOKIE, value);
            }
            Ok(response)
        })
    }
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

/// A store error answers a bare 500, never its details (they may name the backend),
/// and is logged with its whole chain of causes: `?` works in handlers.
impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        StatusCode::INTERNAL_SERVER_ERROR
    }

    fn error_response(&self) -> HttpResponse {
        log::error!(
            target: "portable_sessions::actix",
            "a request failed on its session: {}",
            self.report()
        );
        HttpResponse::InternalServerError().body("internal server error")
    }
}
