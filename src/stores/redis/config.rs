//! Where and as whom a [`RedisStore`](super::RedisStore) connects: a parsed Redis URL.

use std::fmt;

use crate::{
    session_store::{Error, Result},
    stores::{
        net::{self, Address},
        tls,
    },
};

/// What a URL says about a connection.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) address: Address,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) db: u32,
    /// `insecure_auth=true`: send `AUTH` over plain TCP to another machine, where
    /// anyone on the path could read the password. Refused unless asked for.
    pub(crate) insecure_auth: bool,
    /// TLS (`rediss://`), with its parameters.
    pub(crate) tls: Option<tls::Options>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password: configs end up in logs.
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "..."))
            .field("db", &self.db)
            .field("insecure_auth", &self.insecure_auth)
            .field("tls", &self.tls)
            .finish()
    }
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

    /// Parses `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS, with
    /// `cacert`, `cert`, `key`, `sni` and `insecure` named as `redis-cli`'s flags), or
    /// `redis+unix:///path/to/socket[?db=N&user=U&pass=P]` (also `unix://`), with
    /// `insecure_auth=true` to send a password over plain TCP to another machine. Any
    /// parameter not listed is refused, so that a typo is not ignored.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("it must start with redis://, rediss:// or redis+unix://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut config = match scheme {
            "redis" => Self::parse_tcp(rest)?,
            "redis+unix" | "unix" => {
                #[cfg(unix)]
                {
                    if !rest.starts_with('/') {
                        return Err(invalid("a Unix socket needs an absolute path"));
                    }
                    Self {
                        address: Address::Unix(decode(rest)?.into()),
                        user: None,
                        password: None,
                        db: 0,
                        insecure_auth: false,
                        tls: None,
                    }
                }
                #[cfg(not(unix))]
                return Err(invalid("Unix sockets need a Unix system"));
            }
            "rediss" => Self {
                tls: Some(tls::Options::verify_full()),
                ..Self::parse_tcp(rest)?
            },
            // Not repeated: in a malformed URL it could hold the password.
            _ => {
                return Err(invalid(
                    "the scheme is not redis, rediss, redis+unix or unix",
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
                "user" => config.user = Some(value),
                "pass" | "password" => config.password = Some(value),
                "insecure_auth" => {
                    config.insecure_auth = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid("insecure_auth takes true or false")),
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
                         and with rediss:// cacert, cert, key, sni, insecure)",
                    ))
                }
            }
        }
        match (client_cert, &mut config.tls) {
            ((Some(cert), Some(key)), Some(tls)) => tls.client_cert = Some((cert, key)),
            ((None, None), _) => {}
            _ => return Err(invalid("a client certificate needs both cert and key")),
        }
        Ok(config)
    }

    fn parse_tcp(rest: &str) -> Result<Self> {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (mut user, mut password) = (None, None);
        if let Some(userinfo) = userinfo {
            let (name, pass) = match userinfo.split_once(':') {
                Some((name, pass)) => (name, Some(pass)),
                None => (userinfo, None),
            };
            if !name.is_empty() {
                user = Some(decode(name)?);
            }
            password = pass.map(decode).transpose()?;
        }
        let port_of = |text: &str| {
            // The text is not repeated: in a URL missing its `@`, it is the password.
            net::parse_port(text).ok_or_else(|| invalid("the port is not a number from 1 to 65535"))
        };
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (ip, after) = bracketed
                .split_once(']')
                .ok_or_else(|| invalid("an IPv6 address lacks its `]`"))?;
            let port = match after {
                "" => Self::DEFAULT_PORT,
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
                None => (decode(hostport)?, Self::DEFAULT_PORT),
            }
        };
        if host.is_empty() {
            return Err(invalid("it names no host"));
        }
        let db = match path {
            "" => 0,
            path => parse_db(path)?,
        };
        Ok(Self {
            address: Address::Tcp(host, port),
            user,
            password,
            db,
            insecure_auth: false,
            tls: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let config = Config::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(config.address, Address::Tcp("127.0.0.1".into(), 6380));
        assert_eq!((config.user, config.password, config.db), (None, None, 2));

        let config = Config::parse("redis://app:s%40cret@cache.example").unwrap();
        assert_eq!(config.address, Address::Tcp("cache.example".into(), 6379));
        assert_eq!(config.user.as_deref(), Some("app"));
        assert_eq!(config.password.as_deref(), Some("s@cret"));

        let config = Config::parse("redis://:only@[::1]:7000").unwrap();
        assert_eq!(config.address, Address::Tcp("::1".into(), 7000));
        assert_eq!(config.user, None);
        assert_eq!(config.password.as_deref(), Some("only"));

        let config = Config::parse("redis+unix:///run/redis.sock?db=3&pass=x").unwrap();
        assert_eq!(config.address, Address::Unix("/run/redis.sock".into()));
        assert_eq!((config.db, config.password.as_deref()), (3, Some("x")));
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
