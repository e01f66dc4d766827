//! [`SessionManager`]: the session cookie's round trip, for any HTTP framework.

use std::{fmt, sync::Arc};

use cookie::Cookie;
use time::Duration;

use crate::{
    session::handle::CookieAction,
    session::{Expiry, Id, Session, SessionConfig},
    session_store::{Result, SessionStore},
};

/// The `SameSite` attribute of the session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SameSite {
    /// Sent only with requests that start on this site.
    Strict,
    /// Also sent when the user follows a link to this site from elsewhere (top-level
    /// navigation), not with other sites' embedded or scripted requests.
    Lax,
    /// Sent with every request, including other sites'; browsers accept it only
    /// together with `Secure`.
    None,
}

impl From<SameSite> for cookie::SameSite {
    fn from(same_site: SameSite) -> Self {
        match same_site {
            SameSite::Strict => Self::Strict,
            SameSite::Lax => Self::Lax,
            SameSite::None => Self::None,
        }
    }
}

/// Turns a request's `Cookie` header into a [`Session`] and, after the handler, the
/// session into the `Set-Cookie` header to send: the session lifecycle of any HTTP
/// framework, blocking or async, in two calls.
///
/// ```text
/// let session = manager.begin(request's Cookie headers);   // no I/O
/// ... the handler reads and writes `session` ...
/// if let Some(value) = manager.finish(&session)? {         // writes if needed
///     add the header `Set-Cookie: {value}` to the response
/// }
/// ```
///
/// - [`begin`](Self::begin) finds the session cookie and makes the handle; it never
///   fails: a malformed, unknown or expired cookie yields a new, empty session (and,
///   unless that session is stored, a cookie that removes the bad one).
/// - [`finish`](Self::finish) writes the session when it changed, or when its sliding
///   expiry is due for a refresh (see
///   [`with_refresh_on_request`](Self::with_refresh_on_request)), and returns the
///   `Set-Cookie` value when the client's cookie must change: a new id, a renewed
///   `Max-Age`, or removal after [`Session::flush`] or [`Session::delete`].
///
/// The cookie defaults are safe ones: named `id` (the tower-sessions name, so its
/// cookies keep working), `Path=/`, `Secure`, `HttpOnly`, `SameSite=Lax`, no
/// `Domain`. `Lax` rather than `Strict` so that a user who follows a link to the site
/// from an e-mail arrives logged in. Browsers keep `Secure` cookies from
/// `http://localhost`, so the default works in local development too.
///
/// A manager is cheap to clone and needs no lock: share one across all requests.
///
/// # Examples
///
/// ```
/// use portable_sessions::{session::Expiry, MemoryStore, SessionManager};
/// use time::Duration;
///
/// # #[maybe_async::maybe_async]
/// # async fn run() -> portable_sessions::session_store::Result<()> {
/// let manager = SessionManager::new(MemoryStore::default())
///     .with_cookie_name("sid")
///     .with_expiry(Expiry::OnInactivity(Duration::hours(1)));
///
/// // First request: no cookie.
/// let session = manager.begin(None::<&str>);
/// session.insert("user", "alice").await?;
/// let set_cookie = manager.finish(&session).await?.expect("a new session sets its cookie");
/// assert!(set_cookie.starts_with("sid="));
/// assert!(set_cookie.contains("Max-Age=3600"));
///
/// // Second request: the browser sends the cookie back.
/// let cookie = set_cookie.split(';').next().unwrap();
/// let session = manager.begin([cookie]);
/// let user = session.get::<String>("user").await?;
/// assert_eq!(user.as_deref(), Some("alice"));
/// let unchanged = manager.finish(&session).await?;
/// assert_eq!(unchanged, None); // nothing changed: no write, no header
/// # Ok(())
/// # }
/// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
/// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
/// ```
#[derive(Clone)]
pub struct SessionManager {
    store: Arc<dyn SessionStore>,
    config: SessionConfig,
    cookie: CookieConfig,
    refresh: Option<f64>,
}

#[derive(Clone, Debug)]
struct CookieConfig {
    name: String,
    path: Option<String>,
    domain: Option<String>,
    secure: bool,
    http_only: bool,
    same_site: Option<SameSite>,
}

/// The most session-cookie values of one request that [`SessionManager::begin`] keeps.
const MAX_CANDIDATES: usize = 4;

impl SessionManager {
    /// The default cookie name, `id`.
    pub const DEFAULT_COOKIE_NAME: &'static str = "id";

    /// The largest fraction [`with_refresh_on_request`](Self::with_refresh_on_request)
    /// takes.
    pub const MAX_REFRESH_FRACTION: f64 = 0.5;

    /// Makes a manager over `store`, with the default cookie attributes and
    /// [`Expiry::OnSessionEnd`].
    pub fn new(store: impl SessionStore) -> Self {
        Self::from_shared(Arc::new(store))
    }

    /// Like [`new`](Self::new), for a store that is already shared.
    pub fn from_shared(store: Arc<dyn SessionStore>) -> Self {
        Self {
            store,
            config: SessionConfig::default(),
            cookie: CookieConfig {
                name: Self::DEFAULT_COOKIE_NAME.to_owned(),
                path: Some("/".to_owned()),
                domain: None,
                secure: true,
                http_only: true,
                same_site: Some(SameSite::Lax),
            },
            refresh: None,
        }
    }

    /// Sets the session configuration: expiry policy, lifetime cap, session-end TTL,
    /// clock. It replaces the whole configuration, an expiry set before included.
    pub fn with_config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the expiry policy, keeping the rest of the session configuration.
    pub fn with_expiry(mut self, expiry: Expiry) -> Self {
        self.config = self.config.with_expiry(expiry);
        self
    }

    /// Sets the cookie's name.
    ///
    /// Prefer a name starting with `__Host-` (say `__Host-sid`): browsers then
    /// accept the cookie only when it is `Secure`, has `Path=/` and no `Domain`, so
    /// no other path or subdomain can set a same-named cookie that the browser would
    /// send beside it (cookie tossing). This manager's defaults are all three, and it
    /// checks them for such a name; a `__Secure-` name is checked to be `Secure`.
    ///
    /// ```
    /// use portable_sessions::{MemoryStore, SessionManager};
    ///
    /// let manager = SessionManager::new(MemoryStore::new()).with_cookie_name("__Host-sid");
    /// # let _ = manager;
    /// ```
    ///
    /// # Panics
    ///
    /// Panics if `name` is empty or has a character that a cookie name cannot hold
    /// (a control character, a space, or one of `()<>@,;:\"/[]?={}`), or if it has
    /// a prefix that the other attributes break: a programming error, found at
    /// startup.
    pub fn with_cookie_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        assert!(valid, "{name:?} is not a valid cookie name");
        self.cookie.name = name;
        self.cookie.check();
        self
    }

    /// Sets the cookie's `Path` (default `/`); `None` leaves it out, and then no
    /// removal cookie is ever sent (the browser would aim it at the path of the
    /// request, where it could delete another application's cookie).
    ///
    /// # Panics
    ///
    /// Panics if the path has a `;` or a control character, or is not `/` for a
    /// `__Host-` name.
    pub fn with_path(mut self, path: Option<&str>) -> Self {
        self.cookie.path = path.map(|p| checked_attribute("path", p));
        self.cookie.check();
        self
    }

    /// Sets the cookie's `Domain` (default none: the cookie goes back to this host
    /// only).
    ///
    /// # Panics
    ///
    /// Panics if the domain has a `;` or a control character, or is set for a
    /// `__Host-` name.
    pub fn with_domain(mut self, domain: Option<&str>) -> Self {
        self.cookie.domain = domain.map(|d| checked_attribute("domain", d));
        self.cookie.check();
        self
    }

    /// Sets whether the cookie is `Secure`, sent over HTTPS only (default `true`).
    ///
    /// # Panics
    ///
    /// Panics when turning it off for a cookie that needs it: `SameSite=None`, or a
    /// `__Host-` or `__Secure-` name.
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.cookie.secure = secure;
        self.cookie.check();
        self
    }

    /// Sets whether the cookie is `HttpOnly`, hidden from scripts (default `true`).
    pub fn with_http_only(mut self, http_only: bool) -> Self {
        self.cookie.http_only = http_only;
        self
    }

    /// Sets the cookie's `SameSite` (default [`SameSite::Lax`]); `None` leaves it
    /// out, and the browser's default applies.
    ///
    /// # Panics
    ///
    /// Panics for [`SameSite::None`] on a cookie that is not `Secure`: browsers
    /// drop such a cookie, so no session would ever come back.
    pub fn with_same_site(mut self, same_site: Option<SameSite>) -> Self {
        self.cookie.same_site = same_site;
        self.cookie.check();
        self
    }

    /// Refreshes a session's sliding expiry on requests that only read it, throttled:
    /// an unmodified session is rewritten (and its cookie's `Max-Age` renewed) only
    /// when that moves its expiry date forward by at least `fraction` of the window
    /// ([`Expiry::OnInactivity`]'s duration, or the session-end TTL).
    ///
    /// With `0.0` every request that reaches the store rewrites; with `0.25` a session
    /// with a one-hour window is rewritten at most once per 15 minutes. Sessions with
    /// [`Expiry::AtDateTime`] never slide. Off by default: then only writes (of
    /// modified sessions) move the expiry date.
    ///
    /// With refresh on, [`finish`](Self::finish) loads every session whose request
    /// carried a cookie, used or not.
    ///
    /// # Panics
    ///
    /// Panics if `fraction` is not between `0.0` and
    /// [`MAX_REFRESH_FRACTION`](Self::MAX_REFRESH_FRACTION) (`0.5`): a programming
    /// error, found at startup. A larger fraction leaves only the end of the window for
    /// a request to refresh in, so the sessions of users active all along would still
    /// expire (at `1.0`, every one).
    pub fn with_refresh_on_request(mut self, fraction: f64) -> Self {
        assert!(
            (0.0..=Self::MAX_REFRESH_FRACTION).contains(&fraction),
            "with_refresh_on_request({fraction}): the fraction must be between 0.0 and {}; \
             above that, sessions of active users expire before a request refreshes them",
            Self::MAX_REFRESH_FRACTION
        );
        self.refresh = Some(fraction);
        self
    }

    /// Returns the cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.cookie.name
    }

    /// Returns the session configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Makes the session for a request, from the values of its `Cookie` headers (all
    /// of them, if it has several). No I/O: the session loads on first use.
    ///
    /// Header values that are not UTF-8, cookies that do not parse, and values of
    /// the session cookie that are not a well-formed id are skipped; a value in
    /// double quotes counts without them. A browser also sends same-named cookies
    /// set for other paths or a parent domain (often stale, and often first, since
    /// longer paths come first), so up to four well-formed ids are tried in order:
    /// the first three, and the last one (the cookie with the shortest path, or the
    /// newest of one path: this manager's own after a login). The session is the
    /// first of them that loads.
    ///
    /// When none loads, a removal cookie is sent only if no value was left untried
    /// and the cookie has a `Path`: a removal can only delete this manager's own
    /// cookie, and never one that might be valid; nor when a candidate's record could
    /// not be read (corrupt, or of a newer format during a rolling deploy). Planted
    /// cookies (cookie tossing from a sibling subdomain) that hide the real one
    /// still cost the user the requests that carry them, and a request that writes
    /// its session meanwhile starts a new one, whose cookie replaces the real one: a
    /// `__Host-` cookie name (see [`with_cookie_name`](Self::with_cookie_name)) rules
    /// the planting out. This never fails.
    pub fn begin<I>(&self, cookie_headers: I) -> Session
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let mut seen = false;
        let mut ids = Vec::new();
        // The last well-formed value past the first few, and whether any was left
        // untried.
        let mut last = None;
        let mut untried = false;
        for header in cookie_headers {
            let Ok(text) = std::str::from_utf8(header.as_ref()) else {
                continue;
            };
            for (name, value) in cookie_pairs(text) {
                if name != self.cookie.name {
                    continue;
                }
                seen = true;
                let Ok(parsed) = value.parse::<Id>() else {
                    continue;
                };
                if ids.contains(&parsed) || last == Some(parsed) {
                    continue;
                }
                // A few at most, so that a request cannot make the session try more:
                // the first ones, and the last one.
                if ids.len() < MAX_CANDIDATES - 1 {
                    ids.push(parsed);
                } else {
                    untried |= last.is_some();
                    last = Some(parsed);
                }
            }
        }
        ids.extend(last);
        // A removal goes to this manager's own cookie (its name, Path and Domain),
        // and only when it cannot be a valid one that was never tried: planted
        // cookies that push the real one out of the candidates must not log the
        // user out. Without a Path the browser would aim it at the request's own.
        let removable = seen && !untried && self.cookie.path.is_some();
        Session::from_request(self.store.clone(), ids, removable, self.config.clone())
    }

    /// Ends a request: writes the session when needed and returns the `Set-Cookie`
    /// header value to send, or `None` when the client's cookie is right as it is.
    ///
    /// | after the handler, the session is | written | returns |
    /// |---|---|---|
    /// | untouched, or read only | no (unless a refresh is due) | `None` (a renewed cookie after a refresh) |
    /// | modified, with values | yes: created under a fresh id if new | the cookie if new, or if the write moved its `Max-Age`; otherwise `None` |
    /// | modified, left empty | yes: it stays, empty, until it expires | as above: never a removal |
    /// | flushed or deleted | already deleted | a removal cookie if the client had one (and the cookie has a `Path`, and every value was tried, see [`begin`](Self::begin)) |
    /// | moved by [`cycle_id`](Session::cycle_id) | yes: moved to its new id now | the new cookie |
    /// | ended or moved by another request meanwhile | no: its changes are dropped (logged) | `None`: the other response set the cookie |
    /// | new from a bad or unknown cookie, unused | no | a removal cookie |
    ///
    /// # Errors
    ///
    /// Returns the store's error when loading or writing fails; the response should
    /// then be an error too, since the handler's changes were not kept. A second
    /// `finish` of a session that was finished fails with
    /// [`SessionFinished`](crate::session_store::SessionFinished).
    ///
    /// A session that another request ended or moved meanwhile is not an error here:
    /// its changes are dropped, and the response must not touch the cookie. A handler
    /// whose answer depends on its change being kept writes it before answering,
    /// with [`Session::save`] or [`Session::update`], which fail with
    /// [`SessionGone`](crate::session_store::SessionGone) instead.
    #[maybe_async::maybe_async]
    pub async fn finish(&self, session: &Session) -> Result<Option<String>> {
        Ok(self.finish_response(session).await?.set_cookie)
    }

    /// Like [`finish`](Self::finish), with what shared caches in front of the
    /// application (a CDN, a reverse proxy) must be told: the response depends on
    /// the `Cookie` header when the handler used the session or a cookie is set
    /// (add `Vary: Cookie`, as Django's session middleware does), and a response
    /// that sets a session cookie must not be stored for other users
    /// (`Cache-Control: private`). The axum and actix-web integrations add both; a
    /// framework of your own adds them from the returned [`SessionResponse`].
    ///
    /// ```
    /// use portable_sessions::{MemoryStore, SessionManager};
    ///
    /// # #[maybe_async::maybe_async]
    /// # async fn run() -> portable_sessions::session_store::Result<()> {
    /// let manager = SessionManager::new(MemoryStore::new());
    /// let session = manager.begin(None::<&str>);
    /// session.insert("user", "alice").await?;
    /// let response = manager.finish_response(&session).await?;
    /// assert!(response.set_cookie.is_some() && response.vary_cookie);
    /// // The handler's own header, made safe for shared caches:
    /// let cache_control = response.cache_control(Some("public, max-age=60"));
    /// assert_eq!(cache_control.as_deref(), Some("max-age=60, private"));
    /// # Ok(())
    /// # }
    /// # #[maybe_async::sync_impl] fn main() { run().unwrap() }
    /// # #[maybe_async::async_impl] fn main() { futures_lite::future::block_on(run()).unwrap() }
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`finish`](Self::finish).
    #[maybe_async::maybe_async]
    pub async fn finish_response(&self, session: &Session) -> Result<SessionResponse> {
        let (action, used) = session.commit(self.refresh).await?;
        let set_cookie = match action {
            CookieAction::Keep => None,
            CookieAction::Set { id, max_age } => Some(self.set_cookie(id, max_age)),
            CookieAction::Remove => Some(self.removal_cookie()),
        };
        Ok(SessionResponse {
            vary_cookie: used || set_cookie.is_some(),
            set_cookie,
        })
    }

    /// Ends a request that failed, without writing the session: its pending
    /// changes are dropped, a pending [`cycle_id`](Session::cycle_id) never takes
    /// effect, and from now on the session refuses changes, as after
    /// [`finish`](Self::finish). Send no session cookie with the response: the
    /// client's cookie is still right. The framework layers call this for a
    /// response with a 5xx status.
    pub fn abandon(&self, session: &Session) {
        session.abandon();
    }

    /// Formats the `Set-Cookie` value that carries `id`.
    fn set_cookie(&self, id: Id, max_age: Option<Duration>) -> String {
        let mut cookie = self.cookie(id.to_string());
        if let Some(max_age) = max_age {
            // Whole seconds: a fraction would be dropped anyway.
            cookie.set_max_age(Duration::seconds(max_age.whole_seconds()));
        }
        cookie.to_string()
    }

    /// Returns the `Set-Cookie` value that makes the client drop its session cookie.
    pub fn removal_cookie(&self) -> String {
        let mut cookie = self.cookie(String::new());
        cookie.make_removal();
        cookie.to_string()
    }

    fn cookie(&self, value: String) -> Cookie<'static> {
        let mut cookie = Cookie::new(self.cookie.name.clone(), value);
        if let Some(path) = &self.cookie.path {
            cookie.set_path(path.clone());
        }
        if let Some(domain) = &self.cookie.domain {
            cookie.set_domain(domain.clone());
        }
        cookie.set_secure(self.cookie.secure);
        cookie.set_http_only(self.cookie.http_only);
        cookie.set_same_site(self.cookie.same_site.map(cookie::SameSite::from));
        cookie
    }
}

/// The `name=value` pairs of a `Cookie` header, as the `cookie` crate splits and
/// parses them (pieces between semicolons, each cut at its first `=`, name and value
/// trimmed of whitespace; a piece with no `=` or an empty name is skipped), with the
/// value's surrounding double quotes taken off. Without building a `Cookie` per
/// pair: this runs on every request.
fn cookie_pairs(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split(';').filter_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let value = value.trim();
        let value = match value.as_bytes() {
            [b'"', .., b'"'] => &value[1..value.len() - 1],
            _ => value,
        };
        Some((name, value))
    })
}

/// What a response needs for its session: see [`SessionManager::finish_response`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionResponse {
    /// The `Set-Cookie` value to append, when the client's cookie must change.
    pub set_cookie: Option<String>,
    /// The response depends on the request's `Cookie` header: send `Vary: Cookie`
    /// (unless the response already varies on it, or on `*`).
    pub vary_cookie: bool,
}

impl SessionResponse {
    /// The `Cache-Control` value to send, given the response's own (`existing`: its
    /// header lines joined with `", "`), or `None` to leave it as it is: when a
    /// cookie is set, `private` is added and `public` and `s-maxage` are dropped, so
    /// that no shared cache stores one user's cookie for another; `no-store` or
    /// `private` already there are kept as they are.
    pub fn cache_control(&self, existing: Option<&str>) -> Option<String> {
        self.set_cookie.as_ref()?;
        let directives = split_directives(existing.unwrap_or(""));
        let named = |directive: &str, name: &str| {
            let key = directive.split('=').next().unwrap_or("").trim();
            key.eq_ignore_ascii_case(name)
        };
        if directives
            .iter()
            .any(|d| named(d, "private") || named(d, "no-store"))
        {
            return None;
        }
        let mut kept: Vec<&str> = directives
            .into_iter()
            .filter(|d| !named(d, "public") && !named(d, "s-maxage"))
            .collect();
        kept.push("private");
        Some(kept.join(", "))
    }

    /// Whether a response with these `Vary` header values needs `Vary: Cookie`
    /// added.
    pub fn needs_vary<'v>(&self, existing: impl IntoIterator<Item = &'v str>) -> bool {
        self.vary_cookie
            && !existing
                .into_iter()
                .flat_map(|value| value.split(','))
                .any(|name| {
                    let name = name.trim();
                    name == "*" || name.eq_ignore_ascii_case("cookie")
                })
    }
}

/// Splits a `Cache-Control` value into its directives, at commas outside quoted
/// strings (`no-cache="Set-Cookie, X"` is one directive).
fn split_directives(value: &str) -> Vec<&str> {
    let mut directives = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                directives.push(&value[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    directives.push(&value[start..]);
    directives
        .into_iter()
        .map(str::trim)
        .filter(|directive| !directive.is_empty())
        .collect()
}

impl CookieConfig {
    /// Refuses attributes that browsers would reject together: a programming error,
    /// found at startup.
    fn check(&self) {
        let name = &self.name;
        let has_prefix = |prefix: &str| {
            name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        if has_prefix("__Host-") {
            assert!(
                self.secure && self.path.as_deref() == Some("/") && self.domain.is_none(),
                "the cookie {name:?} has the __Host- prefix, so browsers accept it only when \
                 it is Secure, with Path=/ and no Domain (this manager's defaults): keep them"
            );
        } else if has_prefix("__Secure-") {
            assert!(
                self.secure,
                "the cookie {name:?} has the __Secure- prefix, so browsers accept it only \
                 when it is Secure: keep with_secure(true)"
            );
        }
        assert!(
            self.secure || self.same_site != Some(SameSite::None),
            "SameSite=None needs Secure: browsers drop a SameSite=None cookie that is not \
             Secure; keep with_secure(true) or choose SameSite::Lax"
        );
    }
}

fn checked_attribute(what: &str, value: &str) -> String {
    assert!(
        !value.bytes().any(|b| b == b';' || b.is_ascii_control()),
        "{value:?} is not a valid cookie {what}"
    );
    value.to_owned()
}

impl fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionManager")
            .field("store", &self.store)
            .field("config", &self.config)
            .field("cookie", &self.cookie)
            .field("refresh", &self.refresh)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting() -> SessionResponse {
        SessionResponse {
            set_cookie: Some("id=x".to_owned()),
            vary_cookie: true,
        }
    }

    #[test]
    fn cache_control_keeps_a_cookie_private() {
        let set = setting();
        assert_eq!(set.cache_control(None).as_deref(), Some("private"));
        assert_eq!(
            set.cache_control(Some("public, max-age=60, s-maxage=600"))
                .as_deref(),
            Some("max-age=60, private")
        );
        // A quoted list is one directive; no-store and private stay as they are.
        assert_eq!(
            set.cache_control(Some(r#"no-cache="Set-Cookie, X-Id", public"#))
                .as_deref(),
            Some(r#"no-cache="Set-Cookie, X-Id", private"#)
        );
        assert_eq!(set.cache_control(Some("max-age=5, no-store")), None);
        assert_eq!(set.cache_control(Some("Private")), None);
        let unset = SessionResponse {
            set_cookie: None,
            vary_cookie: true,
        };
        assert_eq!(unset.cache_control(Some("public")), None);
    }

    /// `cookie_pairs` splits a header as the `cookie` crate does (its pieces that
    /// parse, with `value_trimmed`), on the forms a browser or an attacker sends.
    #[test]
    fn cookie_pairs_split_as_the_cookie_crate_does() {
        let headers = [
            "",
            ";",
            " ; ;; ",
            "id=abc",
            "id=abc; other=1",
            " id = abc ;other=2",
            "id=\"abc\"",
            "id=\"",
            "id=\"\"",
            "id=\"abc",
            "id=a=b=c",
            "=abc; id=x",
            " =abc",
            "noequals; id=y",
            "id=; id=z",
            "id=\t tab \t",
            "id=abc;id=def;id=abc",
            "\u{a0}id=x\u{a0}; id=\u{2003}q",
            "Id=case; ID=case2; id=lower",
            "id=val; Path=/; HttpOnly",
        ];
        for header in headers {
            let ours: Vec<(&str, &str)> = cookie_pairs(header).collect();
            let theirs: Vec<(String, String)> = Cookie::split_parse(header)
                .flatten()
                .map(|c| (c.name().to_owned(), c.value_trimmed().to_owned()))
                .collect();
            let theirs: Vec<(&str, &str)> = theirs
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            assert_eq!(ours, theirs, "header {header:?}");
        }
    }

    #[test]
    fn vary_is_added_once() {
        let set = setting();
        assert!(set.needs_vary([]));
        assert!(set.needs_vary(["Accept-Encoding"]));
        assert!(!set.needs_vary(["accept-encoding, Cookie"]));
        assert!(!set.needs_vary(["*"]));
        assert!(!SessionResponse::default().needs_vary([]));
    }
}
