//! Where and as whom a [`RedisStore`](super::RedisStore) connects: a parsed Redis URL.

use std::fmt;

use crate::{
    session_store::{Error, Result},
    stores::{
        net::{self, Address},
        tls,
    },
};

/// Credentials for one kind of server (Redis nodes, or sentinels).
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Auth {
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    /// `insecure_auth=true`: send `AUTH` over plain TCP to another machine, where
    /// anyone on the path could read the password. Refused unless asked for.
    pub(crate) insecure_auth: bool,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password: configs end up in logs.
        f.debug_struct("Auth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "..."))
            .field("insecure_auth", &self.insecure_auth)
            .finish()
    }
}

/// Which servers a URL names, and how they stand to each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One server (`redis://`, `rediss://`, `redis+unix://`).
    Server,
    /// A Redis Cluster, reached first through its seed nodes (`redis-cluster://`).
    Cluster,
    /// A primary found through the sentinels named (`redis-sentinel://`), which
    /// watch it as `service` and may want credentials of their own.
    Sentinel { service: String, auth: Auth },
}

/// What a URL says about a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) kind: Kind,
    /// The server (one server), or the first seed node or sentinel.
    pub(crate) address: Address,
    /// The other seed nodes or sentinels (`node=host:port`).
    pub(crate) nodes: Vec<Address>,
    /// The credentials for Redis itself (not the sentinels').
    pub(crate) auth: Auth,
    pub(crate) db: u32,
    /// TLS (`rediss://` and its kin), with its parameters: to every node, and to the
    /// sentinels.
    pub(crate) tls: Option<tls::Options>,
    /// `wait_replicas=N`: each write waits until N replicas have it.
    pub(crate) wait_replicas: u32,
}

fn invalid(why: impl fmt::Display) -> Error {
    Error::backend(format!("invalid Redis URL: {why}"))
}

fn decode(text: &str) -> Result<String> {
    net::percent_decode(text, "Redis")
}

fn parse_db(text: &str) -> Result<u32> {
    text.parse()
        .map_err(|_| invalid("the database is not a number"))
}

impl Config {
    /// The port used when the URL names none.
    pub(crate) const DEFAULT_PORT: u16 = 6379;

    /// The port of a sentinel named without one.
    pub(crate) const DEFAULT_SENTINEL_PORT: u16 = 26379;

    /// Parses a Redis URL:
    ///
    /// - `redis://[[user]:password@]host[:port][/db]`, or `rediss://...` for TLS (with
    ///   `cacert`, `cert`, `key`, `sni` and `insecure` named as `redis-cli`'s flags);
    /// - `redis+unix:///path/to/socket[?db=N&user=U&pass=P]` (also `unix://`);
    /// - `redis-cluster://[[user]:password@]host[:port][?node=host:port&...]` (and
    ///   `rediss-cluster://`): seed nodes of a cluster, as fred writes them;
    /// - `redis-sentinel://[[user]:password@]host[:port][/db]?sentinelServiceName=NAME
    ///   [&node=host:port...][&sentinelUsername=U&sentinelPassword=P]` (and
    ///   `rediss-sentinel://`): sentinels watching a primary, as fred writes them; the
    ///   credentials before `@` are the primary's.
    ///
    /// Each takes `insecure_auth=true`, to send a password over plain TCP to another
    /// machine, and `wait_replicas=N`. Any parameter not listed is refused, so that a
    /// typo is not ignored.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            invalid(
                "it must start with redis://, rediss://, redis+unix://, redis-cluster://, \
                 rediss-cluster://, redis-sentinel:// or rediss-sentinel://",
            )
        })?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let sentinel = || Kind::Sentinel {
            service: String::new(),
            auth: Auth::default(),
        };
        let mut config = match scheme {
            "redis" => Self::parse_tcp(rest, Kind::Server)?,
            "redis-cluster" => Self::parse_tcp(rest, Kind::Cluster)?,
            "redis-sentinel" => Self::parse_tcp(rest, sentinel())?,
            "redis+unix" | "unix" => {
                #[cfg(unix)]
                {
                    if !rest.starts_with('/') {
                        return Err(invalid("a Unix socket needs an absolute path"));
                    }
                    Self {
                        kind: Kind::Server,
                        address: Address::Unix(decode(rest)?.into()),
                        nodes: Vec::new(),
                        auth: Auth::default(),
                        db: 0,
                        tls: None,
                        wait_replicas: 0,
                    }
                }
                #[cfg(not(unix))]
                return Err(invalid("Unix sockets need a Unix system"));
            }
            "rediss" | "rediss-cluster" | "rediss-sentinel" => {
                let kind = match scheme {
                    "rediss" => Kind::Server,
                    "rediss-cluster" => Kind::Cluster,
                    _ => sentinel(),
                };
                Self {
                    tls: Some(tls::Options::verify_full()),
                    ..Self::parse_tcp(rest, kind)?
                }
            }
            // Not repeated: in a malformed URL it could hold the password.
            _ => {
                return Err(invalid(
                    "the scheme is not redis, rediss, redis+unix, unix, redis-cluster, \
                     rediss-cluster, redis-sentinel or rediss-sentinel",
                ))
            }
        };
        let mut client_cert: (Option<std::path::PathBuf>, Option<std::path::PathBuf>) =
            (None, None);
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid("a parameter has no value"))?;
            let value = decode(value)?;
            match key {
                "db" => config.db = parse_db(&value)?,
                "user" => config.auth.user = Some(value),
                "pass" | "password" => config.auth.password = Some(value),
                "insecure_auth" => {
                    config.auth.insecure_auth = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid("insecure_auth takes true or false")),
                    };
                    if let Kind::Sentinel { auth, .. } = &mut config.kind {
                        auth.insecure_auth = config.auth.insecure_auth;
                    }
                }
                "wait_replicas" => {
                    config.wait_replicas = value
                        .parse()
                        .ok()
                        .filter(|&n: &u32| n <= 64)
                        .ok_or_else(|| invalid("wait_replicas takes a number from 0 to 64"))?;
                }
                "node" => {
                    if config.kind == Kind::Server {
                        return Err(invalid(
                            "node names a cluster's seed node or a sentinel: it needs \
                             redis-cluster:// or redis-sentinel://",
                        ));
                    }
                    let port = match config.kind {
                        Kind::Cluster => Self::DEFAULT_PORT,
                        _ => Self::DEFAULT_SENTINEL_PORT,
                    };
                    config.nodes.push(parse_host_port(&value, port)?);
                }
                "sentinelServiceName" | "sentinelUsername" | "sentinelPassword" => {
                    let Kind::Sentinel { service, auth } = &mut config.kind else {
                        return Err(invalid(format_args!(
                            "{key} is a Sentinel parameter, and Sentinel needs redis-sentinel://"
                        )));
                    };
                    match key {
                        "sentinelServiceName" => *service = value,
                        "sentinelUsername" => auth.user = Some(value),
                        _ => auth.password = Some(value),
                    }
                }
                "cacert" | "cert" | "key" | "sni" | "insecure" => {
                    let Some(tls) = &mut config.tls else {
                        return Err(invalid(format_args!(
                            "{key} is a TLS parameter, and TLS needs rediss://"
                        )));
                    };
                    match key {
                        "cacert" => tls.roots = tls::Roots::File(value.into()),
                        "cert" => client_cert.0 = Some(value.into()),
                        "key" => client_cert.1 = Some(value.into()),
                        "sni" => tls.server_name = Some(value),
                        _ => {
                            // Only the exact word turns verification off.
                            tls.verify = match value.as_str() {
                                "true" => tls::Verify::Nothing,
                                "false" => tls::Verify::Full,
                                _ => return Err(invalid("insecure takes true or false")),
                            }
                        }
                    }
                }
                _ => {
                    return Err(invalid(
                        "unknown parameter (known: db, user, pass, password, insecure_auth, \
                         wait_replicas; node with redis-cluster:// and redis-sentinel://; \
                         sentinelServiceName, sentinelUsername, sentinelPassword with \
                         redis-sentinel://; cacert, cert, key, sni, insecure with TLS)",
                    ))
                }
            }
        }
        match (client_cert, &mut config.tls) {
            ((Some(cert), Some(key)), Some(tls)) => tls.client_cert = Some((cert, key)),
            ((None, None), _) => {}
            _ => return Err(invalid("a client certificate needs both cert and key")),
        }
        match &config.kind {
            Kind::Cluster if config.db != 0 => {
                return Err(invalid("a cluster has database 0 alone: drop the /db"))
            }
            Kind::Sentinel { service, .. } if service.is_empty() => {
                return Err(invalid(
                    "a Sentinel URL needs sentinelServiceName=NAME, the name the sentinels \
                     watch the primary by",
                ))
            }
            _ => {}
        }
        Ok(config)
    }

    /// Every address the URL names: the seed nodes or sentinels, first the one
    /// before the path.
    pub(crate) fn addresses(&self) -> impl Iterator<Item = &Address> {
        std::iter::once(&self.address).chain(&self.nodes)
    }

    fn parse_tcp(rest: &str, kind: Kind) -> Result<Self> {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let mut auth = Auth::default();
        if let Some(userinfo) = userinfo {
            let (name, pass) = match userinfo.split_once(':') {
                Some((name, pass)) => (name, Some(pass)),
                None => (userinfo, None),
            };
            if !name.is_empty() {
                auth.user = Some(decode(name)?);
            }
            auth.password = pass.map(decode).transpose()?;
        }
        let port = match kind {
            Kind::Sentinel { .. } => Self::DEFAULT_SENTINEL_PORT,
            _ => Self::DEFAULT_PORT,
        };
        let address = parse_host_port(hostport, port)?;
        let db = match path {
            "" => 0,
            path => parse_db(path)?,
        };
        Ok(Self {
            kind,
            address,
            nodes: Vec::new(),
            auth,
            db,
            tls: None,
            wait_replicas: 0,
        })
    }
}

/// Parses `host[:port]` or `[ipv6][:port]`, percent-encoded.
pub(crate) fn parse_host_port(hostport: &str, default_port: u16) -> Result<Address> {
    let port_of = |text: &str| {
        // The text is not repeated: in a URL missing its `@`, it is the password.
        net::parse_port(text).ok_or_else(|| invalid("the port is not a number from 1 to 65535"))
    };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 address lacks its `]`"))?;
        let port = match after {
            "" => default_port,
            after => port_of(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| invalid("unexpected text after the IPv6 address"))?,
            )?,
        };
        (ip.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (decode(host)?, port_of(port)?),
            None => (decode(hostport)?, default_port),
        }
    };
    if host.is_empty() {
        return Err(invalid("it names no host"));
    }
    Ok(Address::Tcp(host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let config = Config::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(config.address, Address::Tcp("127.0.0.1".into(), 6380));
        assert_eq!(
            (config.auth.user, config.auth.password, config.db),
            (None, None, 2)
        );

        let config = Config::parse("redis://app:s%40cret@cache.example").unwrap();
        assert_eq!(config.address, Address::Tcp("cache.example".into(), 6379));
        assert_eq!(config.auth.user.as_deref(), Some("app"));
        assert_eq!(config.auth.password.as_deref(), Some("s@cret"));

        let config = Config::parse("redis://:only@[::1]:7000").unwrap();
        assert_eq!(config.address, Address::Tcp("::1".into(), 7000));
        assert_eq!(config.auth.user, None);
        assert_eq!(config.auth.password.as_deref(), Some("only"));

        let config = Config::parse("redis+unix:///run/redis.sock?db=3&pass=x").unwrap();
        assert_eq!(config.address, Address::Unix("/run/redis.sock".into()));
        assert_eq!((config.db, config.auth.password.as_deref()), (3, Some("x")));
        assert!(!format!("{config:?}").contains("\"x\""));
        assert_eq!(config.tls, None);
    }

    #[test]
    fn parses_tls_parameters_named_as_redis_cli_flags() {
        let config = Config::parse("rediss://:pw@cache.example:6380/1").unwrap();
        assert_eq!(config.address, Address::Tcp("cache.example".into(), 6380));
        assert_eq!(config.db, 1);
        assert_eq!(config.tls, Some(tls::Options::verify_full()));

        let config = Config::parse(
            "rediss://h?cacert=%2Fetc%2Fca.pem&cert=/c.pem&key=/k.pem&sni=cache.internal",
        )
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.verify, tls::Verify::Full);
        assert_eq!(tls.roots, tls::Roots::File("/etc/ca.pem".into()));
        assert_eq!(tls.client_cert, Some(("/c.pem".into(), "/k.pem".into())));
        assert_eq!(tls.server_name.as_deref(), Some("cache.internal"));

        let tls = Config::parse("rediss://h?insecure=true")
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(tls.verify, tls::Verify::Nothing);
    }

    #[test]
    fn parses_clusters_as_fred_writes_them() {
        let config =
            Config::parse("redis-cluster://u:p%40ss@10.0.0.1:7000?node=10.0.0.2:7001&node=h3")
                .unwrap();
        assert_eq!(config.kind, Kind::Cluster);
        assert_eq!(
            config.addresses().cloned().collect::<Vec<_>>(),
            [
                Address::Tcp("10.0.0.1".into(), 7000),
                Address::Tcp("10.0.0.2".into(), 7001),
                Address::Tcp("h3".into(), Config::DEFAULT_PORT),
            ]
        );
        assert_eq!(config.auth.user.as_deref(), Some("u"));
        assert_eq!(config.auth.password.as_deref(), Some("p@ss"));
        assert_eq!((config.db, config.tls, config.wait_replicas), (0, None, 0));

        // ElastiCache Serverless: one endpoint, TLS, with acknowledged writes.
        let config = Config::parse(
            "rediss-cluster://cache-abc.serverless.use1.cache.amazonaws.com:6379?wait_replicas=1",
        )
        .unwrap();
        assert_eq!(config.kind, Kind::Cluster);
        assert_eq!(config.tls, Some(tls::Options::verify_full()));
        assert_eq!(config.wait_replicas, 1);
        assert!(config.nodes.is_empty());
    }

    #[test]
    fn parses_sentinels_as_fred_writes_them() {
        let config = Config::parse(
            "rediss-sentinel://app:secret@s1/3?node=s2:26380&node=s3\
             &sentinelServiceName=my%20primary&sentinelUsername=watch&sentinelPassword=w\
             &insecure_auth=true&wait_replicas=2&cacert=/ca.pem",
        )
        .unwrap();
        assert_eq!(
            config.kind,
            Kind::Sentinel {
                service: "my primary".into(),
                auth: Auth {
                    user: Some("watch".into()),
                    password: Some("w".into()),
                    insecure_auth: true,
                },
            }
        );
        // Sentinels named without a port are on Sentinel's.
        assert_eq!(
            config.addresses().cloned().collect::<Vec<_>>(),
            [
                Address::Tcp("s1".into(), Config::DEFAULT_SENTINEL_PORT),
                Address::Tcp("s2".into(), 26380),
                Address::Tcp("s3".into(), Config::DEFAULT_SENTINEL_PORT),
            ]
        );
        // The credentials before `@`, and the database, are the primary's.
        assert_eq!(config.auth.user.as_deref(), Some("app"));
        assert_eq!(config.auth.password.as_deref(), Some("secret"));
        assert_eq!((config.db, config.wait_replicas), (3, 2));
        assert!(matches!(
            config.tls.unwrap().roots,
            tls::Roots::File(path) if path == std::path::Path::new("/ca.pem")
        ));
        // The password never shows in a log.
        assert!(!format!(
            "{:?}",
            Config::parse("redis-sentinel://h?sentinelServiceName=a&sentinelPassword=hidden")
                .unwrap()
        )
        .contains("hidden"));
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        for url in [
            "not a url",
            "http://127.0.0.1:6379",
            "redis://127.0.0.1?cacert=/ca.pem",
            "rediss://127.0.0.1?insecure=yes",
            "rediss://127.0.0.1?cert=/c.pem",
            "redis://",
            "redis://h:0",
            "redis://h:port",
            "redis://h/db",
            "redis://h?tls=1",
            "redis+unix://relative.sock",
            // A cluster has no other database; a node needs a cluster or sentinels.
            "redis-cluster://h:7000/1",
            "redis://h?node=g:7001",
            // Sentinel without the service it watches, or its parameters elsewhere.
            "redis-sentinel://h:26379",
            "redis-cluster://h?sentinelServiceName=x",
            "redis://h?sentinelPassword=x",
            "rediss-cluster://h?node=g:notaport",
            // wait_replicas: a count Redis' WAIT can mean.
            "redis://h?wait_replicas=-1",
            "redis://h?wait_replicas=65",
            "redis://h?wait_replicas=two",
            "redis-cluster://h?cacert=/ca.pem",
        ] {
            let err = Config::parse(url).unwrap_err();
            assert!(
                err.report().contains("invalid Redis URL"),
                "{url}: {}",
                err.report()
            );
        }
    }
}
