//! The end-to-end checks that both HTTP example servers must pass, driven over real
//! HTTP by a real client (ureq), plus a check of the built example binary itself.
#![allow(dead_code)] // each test file uses its own part of this

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use std::{io::Read, io::Write, net::TcpStream, sync::Arc};

use portable_sessions::{session::Id, ExpiredDeletion, SessionStore};

/// A blocking HTTP client that never treats a status as an error and never waits
/// forever.
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

/// What the server answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub set_cookie: Option<String>,
}

impl Answer {
    /// The `name=value` pair the server set: what a browser sends back.
    pub fn cookie(&self) -> String {
        let set = self.set_cookie.as_deref().expect("a Set-Cookie header");
        set.split(';').next().unwrap_or_default().to_owned()
    }
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        Self {
            agent,
            base: format!("http://{addr}"),
        }
    }

    /// `GET /`, with this `Cookie` header (raw bytes: garbage is part of the test).
    pub fn visit(&self, cookie: Option<&[u8]>) -> Answer {
        let mut request = self.agent.get(format!("{}/", self.base));
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        answer(request.call())
    }

    /// `GET path`, without a cookie.
    pub fn get(&self, path: &str) -> Answer {
        answer(self.agent.get(format!("{}{path}", self.base)).call())
    }

    /// `POST path` with a text body and this `Cookie` header.
    pub fn post(&self, path: &str, cookie: Option<&str>, body: &str) -> Answer {
        let mut request = self.agent.post(format!("{}{path}", self.base));
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        answer(request.send(body))
    }
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = response.expect("the server answers");
    let mut cookies = response.headers().get_all("set-cookie").iter();
    let set_cookie = cookies
        .next()
        .map(|v| v.to_str().expect("ASCII").to_owned());
    assert!(cookies.next().is_none(), "at most one Set-Cookie");
    Answer {
        status: response.status().as_u16(),
        body: response.body_mut().read_to_string().expect("a text body"),
        set_cookie,
    }
}

/// Returns `true` if `store` holds a live session under the id in `cookie`
/// (`sid=ID`): a record with values. (A login leaves a marker without values under
/// the old id for a while.)
pub fn stored(store: &dyn SessionStore, cookie: &str) -> bool {
    let id: Id = cookie["sid=".len()..].parse().expect("an id");
    let found = crate::common::block(store.load(&id)).expect("the store answers");
    found.is_some_and(|record| record.keys().any(|key| !key.starts_with('\0')))
}

fn visits(answer: &Answer, count: u64, user: &str) {
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, format!("visits={count} user={user}\n"));
}

/// Drives a server that serves the `visits` application at `addr` and keeps its
/// sessions in `store`, through every behaviour the examples promise.
pub fn check_server(addr: SocketAddr, store: &dyn SessionStore) {
    let client = Client::new(addr);

    // The first visit sets a cookie with the configured attributes.
    let first = client.visit(None);
    visits(&first, 1, "-");
    let set = first
        .set_cookie
        .as_deref()
        .expect("the first visit sets a cookie");
    let parsed = cookie::Cookie::parse(set).expect("a valid Set-Cookie value");
    assert_eq!(parsed.name(), "sid");
    assert!(parsed.value().parse::<Id>().is_ok(), "{set}");
    assert_eq!(parsed.path(), Some("/"));
    assert_eq!(parsed.http_only(), Some(true));
    assert_eq!(parsed.secure(), Some(true));
    assert_eq!(parsed.same_site(), Some(cookie::SameSite::Lax));
    assert_eq!(parsed.max_age(), Some(time::Duration::minutes(30)));
    assert_eq!(parsed.domain(), None);
    let anonymous = first.cookie();
    assert!(stored(store, &anonymous));

    // The counter rises across requests, under the same id.
    for count in 2..=4 {
        let answer = client.visit(Some(anonymous.as_bytes()));
        visits(&answer, count, "-");
        assert_eq!(answer.cookie(), anonymous, "the id stays");
    }

    // Login moves the session to a new id; the old cookie loads nothing.
    let login = client.post("/login", Some(&anonymous), "alice");
    assert_eq!(login.status, 200, "{login:?}");
    assert_eq!(login.body, "logged in as alice\n");
    let logged_in = login.cookie();
    assert_ne!(logged_in, anonymous, "login changes the id");
    assert!(!stored(store, &anonymous), "the old record is gone");
    assert!(stored(store, &logged_in));
    visits(&client.visit(Some(logged_in.as_bytes())), 5, "alice");
    // The pre-login id shows nothing, and for a while (as for a request that was in
    // flight during the login) its responses set no cookie that could replace the
    // new one.
    let stale = client.visit(Some(anonymous.as_bytes()));
    assert_eq!(stale.status, 409, "the visit is not kept: {stale:?}");
    assert_eq!(stale.set_cookie, None, "{stale:?}");
    assert!(!stored(store, &anonymous), "the old id stays retired");
    let refused = client.post("/login", Some(&logged_in), "not a name!");
    assert_eq!(refused.status, 400);

    // Logout removes the cookie and the record.
    let logout = client.post("/logout", Some(&logged_in), "");
    assert_eq!(logout.status, 200, "{logout:?}");
    let removal = logout
        .set_cookie
        .as_deref()
        .expect("logout removes the cookie");
    let removal = cookie::Cookie::parse(removal).expect("a valid Set-Cookie value");
    assert_eq!(removal.name(), "sid");
    assert_eq!(removal.value(), "");
    assert_eq!(removal.max_age(), Some(time::Duration::ZERO));
    assert_eq!(
        removal.path(),
        Some("/"),
        "the path must match to remove it"
    );
    assert!(!stored(store, &logged_in), "the record is gone");
    visits(&client.visit(Some(logged_in.as_bytes())), 1, "-");

    // Garbage and forged cookies get a fresh session and a 200. (Bytes beyond ASCII
    // are in `check_hostile_clients`: the HTTP client here sends only ASCII.)
    let forged = format!("sid={}", Id::default());
    let long = format!("sid={}", "A".repeat(3000));
    let garbage: [&[u8]; 8] = [
        b"sid=garbage",
        b"sid=",
        b"sid=%00%ff; sid=<script>",
        b"sid=AAAAAAAAAAAAAAAAAAAAAA==",
        b"sid=\"AAAAAAAAAAAAAAAAAAAAAA\"",
        b";;; =; sid",
        forged.as_bytes(),
        long.as_bytes(),
    ];
    for cookie in garbage {
        let answer = client.visit(Some(cookie));
        visits(&answer, 1, "-");
        let fresh = answer.cookie();
        assert!(fresh.len() == "sid=".len() + Id::TEXT_LEN, "{fresh}");
        assert_ne!(fresh.as_bytes(), cookie, "never the id the client sent");
    }

    // Many requests on one session at once: all served, none crashes the server.
    let shared = client.visit(None).cookie();
    let statuses = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                let (client, shared) = (Client::new(addr), shared.as_str());
                scope.spawn(move || {
                    (0..25)
                        .map(|i| match (worker + i) % 10 {
                            0 => client.post("/login", Some(shared), "bob").status,
                            _ => client.visit(Some(shared.as_bytes())).status,
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("the client thread"))
            .collect::<Vec<_>>()
    });
    assert_eq!(statuses.len(), 200);
    // A visit with the shared cookie after a login moved that session is told so.
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 409),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    visits(&client.visit(None), 1, "-");

    let missing = client.post("/nowhere", None, "");
    assert_eq!(missing.status, 404);
}

/// Runs `check` on each store the examples take: memory, SQLite (a file of its own)
/// Redis (the shared server, under a prefix of its own, and a cluster of the test's
/// own) and PostgreSQL (the shared server, in a schema of its own), as features
/// allow.
#[cfg_attr(
    not(any(feature = "sqlite", feature = "redis", feature = "postgres")),
    allow(unused_variables)
)]
pub fn each_store(test: &str, check: impl Fn(Arc<dyn ExpiredDeletion>)) {
    check(Arc::new(portable_sessions::MemoryStore::new()));
    #[cfg(feature = "sqlite")]
    {
        let dir = crate::common::TempDir::new(test);
        check(Arc::new(
            portable_sessions::SqliteStore::open(dir.db()).expect("opens"),
        ));
    }
    #[cfg(feature = "redis")]
    {
        check(Arc::new(crate::common::shared_redis(test)));
        let cluster = crate::common::redis_deployments::Cluster::start();
        let store = portable_sessions::RedisStore::new(&cluster.url(""))
            .expect("a cluster URL")
            .with_key_prefix(crate::common::unique_prefix(test));
        check(Arc::new(store));
    }
    #[cfg(feature = "postgres")]
    {
        let schema = crate::common::PgSchema::new(test);
        check(Arc::new(schema.store()));
    }
}

/// A request for [`at_once`].
type Request = Box<dyn Fn(&Client) -> Answer + Send + Sync>;

/// `count` visits with `cookie`.
fn visits_with(cookie: &str, count: usize) -> Vec<Request> {
    (0..count)
        .map(|_| {
            let cookie = cookie.to_owned();
            Box::new(move |c: &Client| c.visit(Some(cookie.as_bytes()))) as Request
        })
        .collect()
}

/// Sends `requests` at once (each a closure over its own client), released together
/// by a barrier; returns their answers in order.
fn at_once(addr: SocketAddr, requests: Vec<Request>) -> Vec<Answer> {
    let barrier = std::sync::Barrier::new(requests.len());
    std::thread::scope(|scope| {
        let threads: Vec<_> = requests
            .iter()
            .map(|request| {
                let (client, barrier) = (Client::new(addr), &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    request(&client)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("the client thread"))
            .collect()
    })
}

/// Drives the `visits` application at `addr` with concurrent requests of one
/// session: concurrent visits each count once, and a logout or a login racing
/// visits in flight is never undone.
pub fn check_races(addr: SocketAddr, store: &dyn SessionStore) {
    let client = Client::new(addr);

    // 40 visits at once with one cookie count exactly 40.
    let first = client.visit(None);
    visits(&first, 1, "-");
    let cookie = first.cookie();
    let answers = at_once(addr, visits_with(&cookie, 40));
    for answer in &answers {
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let mut counts: Vec<u64> = answers
        .iter()
        .map(|a| {
            let n = a
                .body
                .trim_start_matches("visits=")
                .split(' ')
                .next()
                .unwrap();
            n.parse().expect("a count")
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        (2..=41).collect::<Vec<_>>(),
        "each visit counted once"
    );
    visits(&client.visit(Some(cookie.as_bytes())), 42, "-");

    // A logout racing 30 visits in flight stays a logout.
    let login = client.post("/login", Some(&cookie), "alice");
    assert_eq!(login.status, 200, "{login:?}");
    let user = login.cookie();
    let mut requests = visits_with(&user, 30);
    let logout_cookie = user.clone();
    requests.push(Box::new(move |c: &Client| {
        c.post("/logout", Some(&logout_cookie), "")
    }));
    let answers = at_once(addr, requests);
    not_kept_or_served(&answers[..30]);
    let logout = answers.last().expect("the logout");
    assert_eq!(logout.status, 200, "{logout:?}");
    assert!(
        logout
            .set_cookie
            .as_deref()
            .is_some_and(|c| c.starts_with("sid=;")),
        "{logout:?}"
    );
    assert!(!stored(store, &user), "the logged-out session stays gone");
    visits(&client.visit(Some(user.as_bytes())), 1, "-");
    for answer in &answers[..30] {
        if let Some(set) = &answer.set_cookie {
            // A visit that loaded the session before the logout may renew its cookie;
            // one after it starts an anonymous session: never a logged-in one.
            let pair = set.split(';').next().unwrap_or_default();
            assert!(
                pair == user || !stored_as(store, pair, "alice"),
                "{answer:?}"
            );
        }
    }

    // A login racing 30 visits on the pre-login cookie keeps the user logged in
    // under the new id, and the pre-login id never comes back.
    let anonymous = client.visit(None).cookie();
    let mut requests = visits_with(&anonymous, 30);
    let login_cookie = anonymous.clone();
    requests.push(Box::new(move |c: &Client| {
        c.post("/login", Some(&login_cookie), "bob")
    }));
    let answers = at_once(addr, requests);
    not_kept_or_served(&answers[..30]);
    let login = answers.last().expect("the login");
    assert_eq!(login.status, 200, "{login:?}");
    let logged_in = login.cookie();
    assert_ne!(logged_in, anonymous);
    for answer in &answers[..30] {
        if let Some(set) = &answer.set_cookie {
            let pair = set.split(';').next().unwrap_or_default();
            assert_eq!(
                pair, anonymous,
                "a racing visit never sets another id: {answer:?}"
            );
        }
    }
    assert!(
        !stored(store, &anonymous),
        "the pre-login id never comes back"
    );
    assert!(stored_as(store, &logged_in, "bob"));
    let after = client.visit(Some(logged_in.as_bytes()));
    assert_eq!(after.status, 200);
    assert!(after.body.ends_with(" user=bob\n"), "{after:?}");
    let stale = client.visit(Some(anonymous.as_bytes()));
    assert_eq!(stale.status, 409, "{stale:?}");
    assert_eq!(stale.set_cookie, None, "{stale:?}");
}

impl Client {
    /// `GET path` with this `Cookie` header.
    pub fn get_with(&self, path: &str, cookie: &str) -> Answer {
        answer(
            self.agent
                .get(format!("{}{path}", self.base))
                .header("Cookie", cookie)
                .call(),
        )
    }

    /// A new session logged in as `user`: its cookie.
    pub fn log_in(&self, user: &str) -> String {
        let anonymous = self.visit(None).cookie();
        let login = self.post("/login", Some(&anonymous), user);
        assert_eq!(login.status, 200, "{login:?}");
        login.cookie()
    }
}

/// The lines of `GET /sessions` with `cookie`: `(handle, current)` each.
fn listed(client: &Client, cookie: &str) -> Vec<(String, bool)> {
    let answer = client.get_with("/sessions", cookie);
    assert_eq!(answer.status, 200, "{answer:?}");
    answer
        .body
        .lines()
        .map(|line| {
            let handle = line.split(' ').next().unwrap_or_default().to_owned();
            assert_eq!(handle.len(), 64, "{line}");
            assert!(
                line.contains(" created=") && line.contains(" expires="),
                "{line}"
            );
            (handle, line.ends_with(" current"))
        })
        .collect()
}

/// The handle of the session under `cookie`.
fn handle_of(cookie: &str) -> String {
    let id: Id = cookie["sid=".len()..].parse().expect("an id");
    portable_sessions::session::Handle::of(&id).to_string()
}

/// Drives the user's-sessions routes of the `visits` application at `addr`: each
/// login is listed under its owner (never by its id), the current one marked;
/// "log out the others" and "log out everywhere" end exactly the user's sessions,
/// and "everywhere" racing 30 visits in flight on the user's other cookies leaves
/// none of them alive.
///
/// On a store that keeps no owners (Redis Cluster), a login works all the same, and
/// the listing and endings answer 501.
pub fn check_owner_sessions(addr: SocketAddr, store: &dyn SessionStore) {
    let client = Client::new(addr);
    if !store.supports_owners() {
        let cookie = client.log_in("carol");
        for (method, path) in [
            ("GET", "/sessions"),
            ("POST", "/logout-others"),
            ("POST", "/logout-everywhere"),
        ] {
            let answer = match method {
                "GET" => client.get_with(path, &cookie),
                _ => client.post(path, Some(&cookie), ""),
            };
            assert_eq!(answer.status, 501, "{method} {path}: {}", answer.body);
        }
        assert!(client.get_with("/", &cookie).body.contains("user=carol"));
        return;
    }
    let devices: Vec<String> = (0..3).map(|_| client.log_in("carol")).collect();
    let bob = client.log_in("dave");

    let lines = listed(&client, &devices[1]);
    let mut handles: Vec<String> = lines.iter().map(|(h, _)| h.clone()).collect();
    handles.sort();
    let mut expected: Vec<String> = devices.iter().map(|c| handle_of(c)).collect();
    expected.sort();
    assert_eq!(
        handles, expected,
        "each of the user's sessions, by its handle"
    );
    let current: Vec<&String> = lines.iter().filter(|(_, c)| *c).map(|(h, _)| h).collect();
    assert_eq!(current, [&handle_of(&devices[1])], "the current one marked");
    let body = client.get_with("/sessions", &devices[1]).body;
    for cookie in &devices {
        assert!(
            !body.contains(&cookie["sid=".len()..]),
            "no id in the listing"
        );
    }
    assert_eq!(
        listed(&client, &bob).len(),
        1,
        "another user's listing is their own"
    );
    let anonymous = client.visit(None).cookie();
    let refused = client.get_with("/sessions", &anonymous);
    assert_eq!(refused.status, 401, "{refused:?}");

    // Log out the others: the two other devices, nothing of the other user.
    let others = client.post("/logout-others", Some(&devices[2]), "");
    assert_eq!(others.status, 200, "{others:?}");
    assert_eq!(others.body, "ended 2 other sessions\n");
    for cookie in &devices[..2] {
        assert!(!stored(store, cookie), "an ended session is gone");
        let visit = client.visit(Some(cookie.as_bytes()));
        assert!(visit.body.ends_with(" user=-\n"), "{visit:?}");
    }
    assert!(stored_as(store, &devices[2], "carol"), "this one stays");
    assert!(stored_as(store, &bob, "dave"), "another user's stays");
    assert_eq!(listed(&client, &devices[2]).len(), 1);

    // Log out everywhere: this one too, and its cookie is removed.
    let again = client.log_in("carol");
    let everywhere = client.post("/logout-everywhere", Some(&again), "");
    assert_eq!(everywhere.status, 200, "{everywhere:?}");
    assert_eq!(everywhere.body, "ended 2 sessions\n");
    assert!(
        everywhere
            .set_cookie
            .as_deref()
            .is_some_and(|c| c.starts_with("sid=;")),
        "{everywhere:?}"
    );
    for cookie in [&devices[2], &again] {
        assert!(!stored(store, cookie), "ended everywhere");
    }
    assert!(stored_as(store, &bob, "dave"), "another user's stays");

    // "Everywhere" racing 30 visits in flight on the user's other cookies: none of
    // those sessions is alive afterwards, and no visit sends a cookie for a
    // session of the user.
    let others: Vec<String> = (0..3).map(|_| client.log_in("carol")).collect();
    let here = client.log_in("carol");
    let mut requests: Vec<Request> = others
        .iter()
        .flat_map(|cookie| visits_with(cookie, 10))
        .collect();
    let ending = here.clone();
    requests.push(Box::new(move |c: &Client| {
        c.post("/logout-everywhere", Some(&ending), "")
    }));
    let answers = at_once(addr, requests);
    not_kept_or_served(&answers[..30]);
    let ended = answers.last().expect("the ending");
    assert_eq!(ended.status, 200, "{ended:?}");
    assert_eq!(ended.body, "ended 4 sessions\n");
    for cookie in others.iter().chain([&here]) {
        assert!(!stored(store, cookie), "no session of the user survives");
    }
    for answer in &answers[..30] {
        if let Some(set) = &answer.set_cookie {
            let pair = set.split(';').next().unwrap_or_default();
            assert!(!stored_as(store, pair, "carol"), "{answer:?}");
        }
    }
    let fresh = client.log_in("carol");
    assert_eq!(
        listed(&client, &fresh).len(),
        1,
        "only the new login is listed"
    );
    let _ = client.post("/logout-everywhere", Some(&fresh), "");
    let _ = client.post("/logout", Some(&bob), "");
}

/// Racing visits are served (200), or told that the session ended or moved under
/// them (409), and then send no cookie.
fn not_kept_or_served(answers: &[Answer]) {
    for answer in answers {
        match answer.status {
            200 => {}
            409 => assert_eq!(answer.set_cookie, None, "{answer:?}"),
            _ => panic!("{answer:?}"),
        }
    }
}

/// Sends `request` as raw bytes on a connection of its own and returns the status
/// code answered, or `None` if the server closed the connection without one.
fn raw_status(addr: SocketAddr, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a timeout");
    stream.write_all(request).expect("sends");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Drives a server with what hostile or careless clients send: a `Cookie` header that
/// is not ASCII, a query string, an over-long body, and 20 connections that never
/// finish their request. Each gets an answer, and a normal client is still served
/// at once.
pub fn check_hostile_clients(addr: SocketAddr) {
    let client = Client::new(addr);
    // A Latin-1 byte, and UTF-8 beyond ASCII: the cookie is skipped, not fatal.
    for cookie in [&b"sid=caf\xe9"[..], "sid=caf\u{e9}; lang=fr".as_bytes()] {
        let mut request = b"GET / HTTP/1.1\r\nHost: test\r\nCookie: ".to_vec();
        request.extend_from_slice(cookie);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        assert_eq!(raw_status(addr, &request), Some(200), "{cookie:?}");
    }
    // Routing is on the path alone.
    let query = client.get("/?utm_source=mail");
    visits(&query, 1, "-");
    // A login body over the limit is refused, not cut.
    let name = "a".repeat(2048);
    let long = client.post("/login", None, &name);
    assert_eq!(long.status, 413, "{long:?}");

    // Slow clients hold connections open without finishing a request.
    let slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).expect("connects");
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: sl")
                .expect("sends");
            stream
        })
        .collect();
    let started = std::time::Instant::now();
    visits(&client.visit(None), 1, "-");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a normal request waited {:?} behind slow clients",
        started.elapsed()
    );
    drop(slow);
}

/// Checks that the server deletes expired sessions by itself: a session stored
/// already expired in `store` (the server's, with a short deletion period) leaves it
/// within 20 s.
pub fn check_deletes_expired(store: &portable_sessions::MemoryStore) {
    let before = store.len();
    let record = portable_sessions::session::Record::new(
        time::OffsetDateTime::now_utc() - time::Duration::seconds(1),
    );
    crate::common::block(store.save(&record)).expect("saved");
    assert_eq!(store.len(), before + 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.len() > before {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never deleted the expired session"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drives a small app of a framework test's own, whose session integration (cookie
/// `sid`, over `store`) wraps `/count` (counts with `Session::update`), `/fail`
/// (inserts, then answers 500), `/own-cookie` (inserts, and sets a cookie of its
/// own), `/store-error` (a value read as the wrong type, through `?`), `/plain`
/// (never touches the session), `/read` (reads it), `/public` (inserts, with
/// `Cache-Control: public, max-age=60`), and `/nested/login` (inserts and moves the
/// session, under a second, nested integration of its own): the integration's
/// rules, the same for every framework.
pub fn check_integration_rules(addr: SocketAddr, store: &crate::common::FaultyStore) {
    // One line of setup, `Session` as an extractor, `?` on the crate's error.
    let (status, cookies, body) = fetch(addr, "/count", None);
    assert_eq!((status, body.as_str()), (200, "1"));
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let cookie = cookies[0].split(';').next().unwrap().to_owned();
    let (_, _, body) = fetch(addr, "/count", Some(&cookie));
    assert_eq!(body, "2");

    // The handler failed: nothing written, no cookie.
    let before = store.inner.len();
    let (status, cookies, _) = fetch(addr, "/fail", None);
    assert_eq!(status, 500);
    assert!(cookies.is_empty(), "{cookies:?}");
    assert_eq!(
        store.inner.len(),
        before,
        "no session created for a failed handler"
    );

    // The session cookie is appended beside the handler's own.
    let (status, cookies, _) = fetch(addr, "/own-cookie", None);
    assert_eq!(status, 200);
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert!(cookies.iter().any(|c| c.starts_with("theme=dark")));
    assert!(cookies.iter().any(|c| c.starts_with("sid=")));

    // A value read as the wrong type is a bare 500 that leaks nothing.
    let (status, _, body) = fetch(addr, "/store-error", None);
    assert_eq!(status, 500);
    assert_eq!(body, "internal server error");

    check_cache_headers(addr, &cookie);
    check_outage(addr, store, &cookie, (503, "service unavailable"));

    // Two integrations on one route: one session, one cookie, and a malformed
    // cookie's removal never follows the login's cookie.
    let (status, headers, body) = fetch_headers(addr, "/nested/login", Some("sid=garbage"));
    assert_eq!((status, body.as_str()), (200, "logged in"));
    let cookies = values(&headers, "set-cookie");
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let login = cookies[0].split(';').next().unwrap();
    assert!(stored_as(store, login, "alice"), "{login}");
}

/// Responses that used the session vary on `Cookie`; those that set it are private
/// to the user; those that never touched it are left alone.
fn check_cache_headers(addr: SocketAddr, cookie: &str) {
    let (_, headers, _) = fetch_headers(addr, "/plain", Some(cookie));
    assert!(values(&headers, "vary").is_empty(), "{headers:?}");
    assert!(values(&headers, "cache-control").is_empty(), "{headers:?}");

    let (_, headers, body) = fetch_headers(addr, "/read", Some(cookie));
    assert_eq!(body, "2");
    assert_eq!(values(&headers, "vary"), ["cookie"], "{headers:?}");
    assert!(values(&headers, "set-cookie").is_empty());
    assert!(values(&headers, "cache-control").is_empty(), "{headers:?}");

    let (_, headers, _) = fetch_headers(addr, "/public", None);
    assert_eq!(values(&headers, "set-cookie").len(), 1, "{headers:?}");
    assert_eq!(values(&headers, "vary"), ["cookie"], "{headers:?}");
    assert_eq!(
        values(&headers, "cache-control"),
        ["max-age=60, private"],
        "a shared cache never stores a session cookie"
    );
}

/// A store outage answers `unavailable` (the bare 503, or the application's own
/// answer), both from a handler's `?` and from the write after it.
pub fn check_outage(
    addr: SocketAddr,
    store: &crate::common::FaultyStore,
    cookie: &str,
    unavailable: (u16, &str),
) {
    store.fail_all(true);
    let (status, cookies, body) = fetch(addr, "/count", Some(cookie));
    assert_eq!((status, body.as_str()), unavailable, "the handler's ?");
    assert!(cookies.is_empty(), "{cookies:?}");
    let (status, cookies, body) = fetch(addr, "/own-cookie", None);
    assert_eq!((status, body.as_str()), unavailable, "the write");
    assert!(cookies.is_empty(), "{cookies:?}");
    store.fail_all(false);
    let (status, _, _) = fetch(addr, "/count", Some(cookie));
    assert_eq!(status, 200, "back once the store is");

    // A handler that stored a value, then failed on the crate's error: nothing of
    // its session is kept, whatever status the answer has.
    let before = store.inner.len();
    let (status, cookies, body) = fetch(addr, "/half", None);
    assert_eq!((status, body.as_str()), unavailable);
    assert!(cookies.is_empty(), "{cookies:?}");
    assert_eq!(store.inner.len(), before, "nothing stored");
}

/// Every value of the header `name` (lowercase).
fn values(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
        .collect()
}

/// Sends `GET path` with an optional `Cookie` header; returns the status, every
/// `Set-Cookie` value and the body.
pub fn fetch(addr: SocketAddr, path: &str, cookie: Option<&str>) -> (u16, Vec<String>, String) {
    let (status, headers, body) = fetch_headers(addr, path, cookie);
    (status, values(&headers, "set-cookie"), body)
}

/// Sends `GET path` with an optional `Cookie` header; returns the status, every
/// header (lowercase names) and the body.
pub fn fetch_headers(
    addr: SocketAddr,
    path: &str,
    cookie: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let mut request = agent.get(format!("http://{addr}{path}"));
    if let Some(cookie) = cookie {
        request = request.header("Cookie", cookie);
    }
    let mut response = request.call().expect("the server answers");
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = value.to_str().expect("ASCII").to_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().expect("a body");
    (status, headers, body)
}

/// Returns `true` if the session under the cookie's id is logged in as `user`.
fn stored_as(store: &dyn SessionStore, cookie: &str, user: &str) -> bool {
    let Ok(id) = cookie["sid=".len()..].parse::<Id>() else {
        return false;
    };
    let found = crate::common::block(store.load(&id)).expect("the store answers");
    found.is_some_and(|record| record.get::<String>("user").ok().flatten().as_deref() == Some(user))
}

/// Where cargo put the example binary `name`: `target/<profile>/examples/`, beside
/// the `deps/` folder that holds this test binary. `cargo test` builds examples
/// before it runs any test; `None` when it was not built (`cargo test --test ...`).
fn example_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe
        .parent()?
        .parent()?
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
}

/// Runs the built example binary on a free port, with a limit of 64 open files: its
/// first line of output is the address it bound, it serves a request there, it
/// survives running out of file descriptors (100 connections held open make its
/// `accept` fail; it logs that and goes on serving once they close), and it exits
/// successfully on SIGINT.
#[cfg(unix)]
pub fn check_binary(name: &str) {
    check_binary_logging(name, true);
}

/// [`check_binary`], for a server that may handle a failed `accept` without a log
/// line of its own (axum's server waits and retries, logging through `tracing`).
#[cfg(unix)]
pub fn check_binary_logging(name: &str, logs_accept_errors: bool) {
    let Some(binary) = example_binary(name) else {
        // CI runs plain `cargo test`, which builds it: there, missing is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "the {name} example is not built"
        );
        eprintln!("skipped: the {name} example is not built; plain `cargo test` builds it");
        return;
    };
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" 127.0.0.1:0"])
        .arg(binary)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("a first line");
    if line.is_empty() {
        // Both modes build examples to the same path: a binary from a blocking-mode
        // build of an async-only example exits at once with status 2. Plain
        // `cargo test` (as CI runs it) rebuilds it for this mode first.
        let status = child.wait().expect("waitable");
        assert!(
            std::env::var_os("CI").is_none() && status.code() == Some(2),
            "{name} printed nothing and exited with {status}"
        );
        eprintln!("skipped: {name} was last built in the other mode");
        return;
    }
    let addr: SocketAddr = line.trim().parse().expect("the first line is the address");
    let stderr = child.stderr.take().expect("piped");
    let logged = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    visits(&Client::new(addr).visit(None), 1, "-");

    // More connections than it has file descriptors for.
    let held: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(addr).expect("the backlog takes it"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    drop(held);
    visits(&Client::new(addr).visit(None), 1, "-");

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .expect("SIGINT sent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitable") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{name} did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{name} exited with {status}");
    let logged = logged.join().expect("the stderr reader");
    assert!(
        !logs_accept_errors || logged.contains("failed to accept a connection"),
        "{name} never ran out of file descriptors: {logged}"
    );
}
