//! Where and as whom a [`PostgresStore`](super::PostgresStore) connects: a parsed
//! `postgres://` URL.

use std::{fmt, path::PathBuf, time::Duration};

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
    /// The server's socket: a host and port, or the file `.s.PGSQL.PORT` in the
    /// directory that `host` names.
    pub(crate) address: Address,
    pub(crate) user: String,
    pub(crate) password: Option<String>,
    pub(crate) dbname: String,
    pub(crate) application_name: String,
    /// `connect_timeout`, if the URL sets it.
    pub(crate) connect_timeout: Option<Duration>,
    /// `require_auth`: which authentication methods the server may ask for.
    pub(crate) require_auth: RequireAuth,
    /// `sslmode`: whether TLS is tried, and whether it is required.
    pub(crate) sslmode: SslMode,
    /// How TLS is set up when it is used (`sslrootcert`, `sslcert`, `sslkey`,
    /// `sslsni`, and `sslmode`'s verification).
    pub(crate) tls: tls::Options,
    /// The TLS settings made from `tls` (files read), once the store has made them.
    pub(crate) connector: Option<tls::Connector>,
}

/// libpq's `sslmode`: whether a TCP connection is encrypted. Over a Unix socket, as
/// in libpq, TLS is never tried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Never.
    Disable,
    /// Without TLS first, and with TLS if the server refuses that.
    Allow,
    /// TLS if the server offers it (libpq's default).
    #[default]
    Prefer,
    /// TLS or no connection (`require`, `verify-ca`, `verify-full`: what is verified
    /// is in the TLS options).
    Require,
}

/// libpq's `require_auth`: the authentication methods a connection accepts from the
/// server, by their libpq names (`password`, `md5`, `gss`, `sspi`, `scram-sha-256`,
/// `none`), all listed (`password,scram-sha-256`) or all refused (`!password,!md5`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum RequireAuth {
    /// Not set: any method, except that a clear-text or MD5 password is never sent
    /// to another machine over a connection that is unencrypted, or encrypted to a
    /// server not verified.
    #[default]
    Default,
    /// Only these.
    Only(Vec<String>),
    /// Any but these.
    Not(Vec<String>),
}

/// The method names `require_auth` takes.
const AUTH_METHODS: [&str; 6] = ["password", "md5", "gss", "sspi", "scram-sha-256", "none"];

impl RequireAuth {
    fn parse(value: &str) -> Result<Self> {
        let mut only = Vec::new();
        let mut not = Vec::new();
        for name in value.split(',') {
            let (list, name) = match name.strip_prefix('!') {
                Some(name) => (&mut not, name),
                None => (&mut only, name),
            };
            if !AUTH_METHODS.contains(&name) {
                // The value is not repeated: a misplaced password could be it.
                return Err(invalid(format_args!(
                    "require_auth lists a method that is not one of {}",
                    AUTH_METHODS.join(", ")
                )));
            }
            if list.iter().any(|listed| listed == name) {
                return Err(invalid("require_auth lists a method twice"));
            }
            list.push(name.to_owned());
        }
        match (only.is_empty(), not.is_empty()) {
            (false, true) => Ok(Self::Only(only)),
            (true, false) => Ok(Self::Not(not)),
            _ => Err(invalid(
                "require_auth lists methods to allow and methods to refuse (with `!`) at once",
            )),
        }
    }

    /// Checks that the server may use `method` (a libpq name) on a connection that
    /// stays on this machine or reaches a verified server (`safe`), or not: the error
    /// says why not.
    pub(crate) fn check(&self, method: &str, safe: bool) -> std::result::Result<(), String> {
        match self {
            // Only a list that names the method sends a password in the open: refusing
            // others (`!none`) does not.
            Self::Default | Self::Not(_)
                if !safe && (method == "password" || method == "md5") => Err(format!(
                "the server asks for the password {}, over a connection to another machine \
                 that is unencrypted or whose server is not verified: refused, since anyone \
                 on the path could {}; connect with sslmode=verify-full (or verify-ca with \
                 sslrootcert), over a Unix socket or a tunnel, or set \
                 require_auth={method},scram-sha-256 to send it anyway",
                if method == "md5" {
                    "as an MD5 hash"
                } else {
                    "in clear text"
                },
                if method == "md5" {
                    "replay the hash"
                } else {
                    "read it"
                },
            )),
            Self::Default => Ok(()),
            Self::Only(allowed) if allowed.iter().any(|name| name == method) => Ok(()),
            Self::Only(allowed) => Err(format!(
                "the server asks for {method} authentication, and require_auth={} does not allow it",
                allowed.join(",")
            )),
            Self::Not(refused) if refused.iter().any(|name| name == method) => Err(format!(
                "the server asks for {method} authentication, and require_auth refuses it"
            )),
            Self::Not(_) => Ok(()),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password: configs end up in logs.
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "..."))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn invalid(why: impl fmt::Display) -> Error {
    Error::backend(format!("invalid PostgreSQL URL: {why}"))
}

fn percent_decode(text: &str) -> Result<String> {
    net::percent_decode(text, "PostgreSQL")
}

fn parse_port(text: &str) -> Result<u16> {
    // The text is not repeated: in a URL missing its `@`, it is the password.
    net::parse_port(text).ok_or_else(|| invalid("the port is not a number from 1 to 65535"))
}

impl Config {
    /// The port used when the URL names none.
    pub(crate) const DEFAULT_PORT: u16 = 5432;

    /// Parses `postgres://[user[:password]@][host][:port][/dbname][?param=value&...]`
    /// (or `postgresql://`). Parameters: `host` (a directory starting with `/` means a
    /// Unix socket), `port`, `user`, `password`, `dbname`, `application_name`,
    /// `connect_timeout` (seconds), `require_auth` (as libpq's), and TLS's `sslmode`,
    /// `sslrootcert`, `sslcert`, `sslkey` and `sslsni` (see [`tls_options`]). Any other
    /// parameter is an error, so that a typo is not ignored.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| invalid("it must start with postgres:// or postgresql://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };

        let mut user = None;
        let mut password = None;
        if let Some(userinfo) = userinfo {
            let (name, pass) = match userinfo.split_once(':') {
                Some((name, pass)) => (name, Some(pass)),
                None => (userinfo, None),
            };
            if !name.is_empty() {
                user = Some(percent_decode(name)?);
            }
            password = pass.map(percent_decode).transpose()?;
        }

        let (mut host, mut port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (ip, after) = bracketed
                .split_once(']')
                .ok_or_else(|| invalid("an IPv6 address lacks its `]`"))?;
            let port = match after {
                "" => None,
                after => {
                    Some(parse_port(after.strip_prefix(':').ok_or_else(|| {
                        invalid("unexpected text after the IPv6 address")
                    })?)?)
                }
            };
            (Some(ip.to_owned()), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (Some(percent_decode(host)?), Some(parse_port(port)?)),
                None => (Some(percent_decode(hostport)?), None),
            }
        };
        if host.as_deref() == Some("") {
            host = None;
        }
        let mut dbname = match path {
            "" => None,
            path => Some(percent_decode(path)?),
        };
        let mut application_name = None;
        let mut connect_timeout = None;
        let mut require_auth = RequireAuth::Default;
        let mut sslmode = None;
        let (mut sslrootcert, mut sslcert, mut sslkey) = (None, None, None);
        let mut sslsni = true;

        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid("a parameter has no value"))?;
            let value = percent_decode(value)?;
            match key {
                "host" => host = Some(value),
                "port" => port = Some(parse_port(&value)?),
                "user" => user = Some(value),
                "password" => password = Some(value),
                "dbname" => dbname = Some(value),
                "application_name" => application_name = Some(value),
                "require_auth" => require_auth = RequireAuth::parse(&value)?,
                "connect_timeout" => {
                    let seconds: u64 = value
                        .parse()
                        .map_err(|_| invalid("connect_timeout is not whole seconds"))?;
                    // libpq: zero (or nothing) means wait indefinitely; the store's own
                    // timeout still bounds the wait.
                    connect_timeout = (seconds > 0).then(|| Duration::from_secs(seconds));
                }
                "sslmode" => {
                    sslmode = Some(match value.as_str() {
                        "disable" => (SslMode::Disable, tls::Verify::Nothing),
                        "allow" => (SslMode::Allow, tls::Verify::Nothing),
                        "prefer" => (SslMode::Prefer, tls::Verify::Nothing),
                        "require" => (SslMode::Require, tls::Verify::Nothing),
                        "verify-ca" => (SslMode::Require, tls::Verify::Chain),
                        "verify-full" => (SslMode::Require, tls::Verify::Full),
                        // Not repeated: it could be a misplaced password.
                        _ => {
                            return Err(invalid(
                                "sslmode is not one of disable, allow, prefer, require, \
                                 verify-ca, verify-full",
                            ))
                        }
                    })
                }
                "sslrootcert" => sslrootcert = Some(value),
                "sslcert" => sslcert = Some(value),
                "sslkey" => sslkey = Some(value),
                "sslsni" => {
                    sslsni = match value.as_str() {
                        "1" => true,
                        "0" => false,
                        _ => return Err(invalid("sslsni takes 0 or 1")),
                    }
                }
                _ => {
                    return Err(invalid(
                        "unknown parameter (known: host, port, user, password, dbname, \
                         application_name, connect_timeout, require_auth, sslmode, \
                         sslrootcert, sslcert, sslkey, sslsni)",
                    ))
                }
            }
        }
        let (sslmode, tls) = tls_options(sslmode, sslrootcert, sslcert, sslkey, sslsni)?;

        let user = match user {
            Some(user) => user,
            None => std::env::var("USER")
                .or_else(|_| std::env::var("USERNAME"))
                .map_err(|_| invalid("it names no user, and $USER is not set"))?,
        };
        let port = port.unwrap_or(Self::DEFAULT_PORT);
        let address = match host {
            #[cfg(unix)]
            Some(dir) if dir.starts_with('/') => {
                Address::Unix(PathBuf::from(dir).join(format!(".s.PGSQL.{port}")))
            }
            Some(name) => Address::Tcp(name, port),
            None => Address::Tcp("localhost".to_owned(), port),
        };
        Ok(Self {
            address,
            dbname: dbname.unwrap_or_else(|| user.clone()),
            user,
            password,
            application_name: application_name.unwrap_or_else(|| "portable-sessions".into()),
            connect_timeout,
            require_auth,
            sslmode,
            tls,
            connector: None,
        })
    }
}

/// libpq's rules for what is verified: a root file makes every mode that encrypts
/// check the chain (`require` acts as `verify-ca`), and `sslrootcert=system` takes the
/// system's roots and asks for `verify-full`, refusing a weaker mode named with it.
/// Without `sslrootcert` (where libpq would look for `~/.postgresql/root.crt`),
/// `verify-full` uses the system's roots, and `verify-ca` is refused: against them it
/// would take any certificate a public authority signed.
fn tls_options(
    sslmode: Option<(SslMode, tls::Verify)>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    sni: bool,
) -> Result<(SslMode, tls::Options)> {
    let (mode, mut verify, roots) = match sslrootcert.as_deref() {
        Some("system") => match sslmode {
            None | Some((_, tls::Verify::Full)) => {
                (SslMode::Require, tls::Verify::Full, tls::Roots::System)
            }
            Some(_) => {
                return Err(invalid(
                    "sslrootcert=system asks for sslmode=verify-full, and a weaker sslmode \
                     is set",
                ))
            }
        },
        Some(path) => {
            let (mode, verify) = sslmode.unwrap_or((SslMode::Prefer, tls::Verify::Nothing));
            (mode, verify, tls::Roots::File(path.into()))
        }
        None => match sslmode.unwrap_or((SslMode::Prefer, tls::Verify::Nothing)) {
            // Any certificate a public authority signed, for any name, would pass.
            (_, tls::Verify::Chain) => {
                return Err(invalid(
                    "sslmode=verify-ca needs sslrootcert=PATH, the authority that signs the \
                     server's certificate (against the system's authorities, use verify-full)",
                ))
            }
            (mode, verify) => (mode, verify, tls::Roots::System),
        },
    };
    if matches!(roots, tls::Roots::File(_)) && verify == tls::Verify::Nothing {
        verify = tls::Verify::Chain;
    }
    let client_cert = match (sslcert, sslkey) {
        (Some(cert), Some(key)) => Some((cert.into(), key.into())),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "a client certificate needs both sslcert and sslkey",
            ))
        }
    };
    Ok((
        mode,
        tls::Options {
            verify,
            roots,
            client_cert,
            sni,
            server_name: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let config = Config::parse("postgres://app:s%3Acret@db.example:6543/sessions").unwrap();
        assert_eq!(config.address, Address::Tcp("db.example".into(), 6543));
        assert_eq!(config.user, "app");
        assert_eq!(config.password.as_deref(), Some("s:cret"));
        assert_eq!(config.dbname, "sessions");

        let config = Config::parse("postgresql://me@[::1]/").unwrap();
        assert_eq!(config.address, Address::Tcp("::1".into(), 5432));
        assert_eq!(config.dbname, "me");
        assert_eq!(config.address.to_string(), "[::1]:5432");

        let config = Config::parse(
            "postgres://me@/db?host=%2Fvar%2Frun%2Fpostgresql&port=5433&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            config.address,
            Address::Unix("/var/run/postgresql/.s.PGSQL.5433".into())
        );
        assert_eq!(config.connect_timeout, Some(Duration::from_secs(3)));
        assert!(
            !format!("{:?}", Config::parse("postgres://u:hunter2@h/d").unwrap())
                .contains("hunter2")
        );
    }

    #[test]
    fn require_auth_follows_libpq() {
        let parse = |url: &str| Config::parse(url).unwrap().require_auth;
        let default = parse("postgres://u@h/d");
        assert_eq!(default, RequireAuth::Default);
        for method in ["scram-sha-256", "none", "password", "md5"] {
            assert!(default.check(method, true).is_ok(), "{method} locally");
        }
        assert!(default.check("scram-sha-256", false).is_ok());
        let refused = default.check("password", false).unwrap_err();
        assert!(refused.contains("require_auth=password"), "{refused}");
        assert!(default.check("md5", false).is_err());

        let only = parse("postgres://u@h/d?require_auth=password,scram-sha-256");
        assert!(only.check("password", false).is_ok(), "asked for by name");
        assert!(only.check("md5", true).is_err());
        assert!(only.check("none", true).is_err());
        let not = parse("postgres://u@h/d?require_auth=!none");
        assert!(
            not.check("none", true).is_err(),
            "the server must authenticate"
        );
        assert!(not.check("md5", true).is_ok());
        assert!(
            not.check("md5", false).is_err(),
            "refusing others does not send a password in the open"
        );
        assert!(Config::parse("postgres://u@h/d?require_auth=md5,md5").is_err());
    }

    #[test]
    fn sslmode_follows_libpq() {
        let parse = |url: &str| {
            let config = Config::parse(url).unwrap();
            (config.sslmode, config.tls.verify, config.tls.roots)
        };
        let system = tls::Roots::System;
        let file = || tls::Roots::File("/ca.pem".into());
        assert_eq!(
            parse("postgres://u@h/d"),
            (SslMode::Prefer, tls::Verify::Nothing, system.clone())
        );
        assert_eq!(
            parse("postgres://u@h/d?sslmode=require"),
            (SslMode::Require, tls::Verify::Nothing, system.clone())
        );
        assert_eq!(
            parse("postgres://u@h/d?sslmode=require&sslrootcert=/ca.pem"),
            (SslMode::Require, tls::Verify::Chain, file()),
            "require with a root file acts as verify-ca"
        );
        assert!(Config::parse("postgres://u@h/d?sslmode=verify-ca").is_err());
        assert_eq!(
            parse("postgres://u@h/d?sslmode=verify-ca&sslrootcert=/ca.pem"),
            (SslMode::Require, tls::Verify::Chain, file())
        );
        assert_eq!(
            parse("postgres://u@h/d?sslrootcert=/ca.pem&sslmode=verify-full"),
            (SslMode::Require, tls::Verify::Full, file())
        );
        assert_eq!(
            parse("postgres://u@h/d?sslrootcert=system"),
            (SslMode::Require, tls::Verify::Full, system.clone())
        );
        assert_eq!(parse("postgres://u@h/d?sslmode=allow").0, SslMode::Allow);
        assert_eq!(
            parse("postgres://u@h/d?sslmode=disable").0,
            SslMode::Disable
        );
        let config =
            Config::parse("postgres://u@h/d?sslcert=/c.pem&sslkey=/k.pem&sslsni=0").unwrap();
        assert_eq!(
            config.tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        assert!(!config.tls.sni);
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        for url in [
            "mysql://u@h/d",
            "postgres://u@h:99999/d",
            "postgres://u@h:0/d",
            "postgres://u@h/d?sslmode=required",
            "postgres://u@h/d?sslmode=require&sslrootcert=system",
            "postgres://u@h/d?sslcert=/c.pem",
            "postgres://u@h/d?sslsni=yes",
            "postgres://u@h/d?sslmod=disable",
            "postgres://u@h/d?port",
            "postgres://u@h/d%zz",
            "postgres://u@[::1/d",
            "postgres://u@h/d?connect_timeout=soon",
            "postgres://u@h/d?require_auth=kerberos",
            "postgres://u@h/d?require_auth=password,!md5",
        ] {
            let err = Config::parse(url).unwrap_err();
            assert!(matches!(err, Error::Backend(_)), "{url}");
            assert!(err.report().contains("invalid PostgreSQL URL"), "{url}");
        }
    }
}
