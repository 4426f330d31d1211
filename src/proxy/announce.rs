//! The line keyhole logs when a listener opens, one per target: what it
//! serves, where, and a client command that reaches it from this machine,
//! so the person who started keyhole can act on it at once:
//!
//! ```text
//! postgres lab-proj:us-central1:pg ready on 127.0.0.1:5432 (psql "host=127.0.0.1 port=5432 user=app")
//! ```
//!
//! The same event carries `target`, `listen` and `protocol` as fields, for
//! JSON logs and for `keyhole connect`, which waits for it.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use crate::config::Protocol;

/// Where a listener is bound.
#[derive(Debug, Clone, Copy)]
pub(super) enum Bound<'a> {
    Tcp(SocketAddr),
    // Made only where there are Unix-socket listeners (src/platform/).
    #[cfg_attr(not(keyhole_unix), allow(dead_code))]
    Unix(&'a Path),
}

/// The ready line for `target` (its protocol, if known yet: a Cloud SQL
/// instance's engine may only be known at its first connection) bound at
/// `at`; `user` is the database user the target fixes, if any.
pub(super) fn ready_line(
    protocol: Option<Protocol>,
    target: &str,
    at: Bound<'_>,
    user: Option<&str>,
) -> String {
    // A target named by its URL says its protocol already.
    let mut line = match protocol {
        Some(p) if !target.starts_with(&format!("{}://", p.scheme())) => {
            format!("{} {target} ready on {}", p.scheme(), display(at))
        }
        _ => format!("{target} ready on {}", display(at)),
    };
    if let Some(command) = protocol.and_then(|p| client_command(p, at, user)) {
        let _ = write!(line, " ({command})");
    }
    line
}

fn display(at: Bound<'_>) -> String {
    match at {
        Bound::Tcp(addr) => addr.to_string(),
        Bound::Unix(path) => path.display().to_string(),
    }
}

/// psql or mariadb, pointed at `at` from this machine.
fn client_command(protocol: Protocol, at: Bound<'_>, user: Option<&str>) -> Option<String> {
    match protocol {
        Protocol::Postgres => {
            let (host, port) = match at {
                Bound::Tcp(addr) => (reachable(addr.ip()).to_string(), addr.port()),
                // libpq finds DIR/.s.PGSQL.PORT from host=DIR port=PORT.
                Bound::Unix(path) => {
                    let port = path
                        .file_name()?
                        .to_str()?
                        .strip_prefix(".s.PGSQL.")?
                        .parse::<u16>()
                        .ok()?;
                    (path.parent()?.to_str()?.to_owned(), port)
                }
            };
            let mut conninfo = format!("host={} port={port}", conninfo_value(&host));
            if let Some(user) = user {
                let _ = write!(conninfo, " user={}", conninfo_value(user));
            }
            Some(format!("psql \"{conninfo}\""))
        }
        Protocol::Mysql => {
            let mut command = match at {
                Bound::Tcp(addr) => {
                    format!("mariadb -h {} -P {}", reachable(addr.ip()), addr.port())
                }
                Bound::Unix(path) => format!("mariadb -S {}", shell_word(path.to_str()?)),
            };
            if let Some(user) = user {
                let _ = write!(command, " -u {}", shell_word(user));
            }
            Some(command)
        }
    }
}

/// The address a local client dials for a listener bound to `ip`: the
/// wildcard addresses are reached on loopback.
fn reachable(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// A conninfo value, quoted as libpq reads it when it has spaces, quotes
/// or backslashes.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\', '"']) {
        return value.to_owned();
    }
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    // The conninfo sits in double quotes on the line: a double quote in it
    // would end them early for a shell.
    format!("'{}'", escaped.replace('"', "\\\""))
}

/// A word a POSIX shell reads back as `value`.
fn shell_word(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:@%+=,".contains(c))
    {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_on_tcp() {
        let at = Bound::Tcp("127.0.0.1:5432".parse().unwrap());
        assert_eq!(
            ready_line(Some(Protocol::Postgres), "lab-proj:us-central1:pg", at, Some("app")),
            "postgres lab-proj:us-central1:pg ready on 127.0.0.1:5432 (psql \"host=127.0.0.1 port=5432 user=app\")"
        );
        assert_eq!(
            ready_line(Some(Protocol::Postgres), "db", at, None),
            "postgres db ready on 127.0.0.1:5432 (psql \"host=127.0.0.1 port=5432\")"
        );
    }

    #[test]
    fn a_target_named_by_its_url_is_not_prefixed_twice() {
        let at = Bound::Tcp("127.0.0.1:5432".parse().unwrap());
        assert_eq!(
            ready_line(Some(Protocol::Postgres), "postgres://db:5432", at, None),
            "postgres://db:5432 ready on 127.0.0.1:5432 (psql \"host=127.0.0.1 port=5432\")"
        );
    }

    #[test]
    fn a_wildcard_address_is_reached_on_loopback() {
        let v4 = Bound::Tcp("0.0.0.0:6432".parse().unwrap());
        assert!(ready_line(Some(Protocol::Postgres), "db", v4, None)
            .ends_with("ready on 0.0.0.0:6432 (psql \"host=127.0.0.1 port=6432\")"));
        let v6 = Bound::Tcp("[::]:3306".parse().unwrap());
        assert!(ready_line(Some(Protocol::Mysql), "db", v6, None)
            .ends_with("ready on [::]:3306 (mariadb -h ::1 -P 3306)"));
    }

    #[test]
    fn unix_sockets_as_each_client_finds_them() {
        let pg = Path::new("/run/keyhole/p:r:i/.s.PGSQL.5432");
        assert_eq!(
            ready_line(Some(Protocol::Postgres), "p:r:i", Bound::Unix(pg), Some("me@x.iam")),
            "postgres p:r:i ready on /run/keyhole/p:r:i/.s.PGSQL.5432 (psql \"host=/run/keyhole/p:r:i port=5432 user=me@x.iam\")"
        );
        let my = Path::new("/run/keyhole/mysql-3306.sock");
        assert_eq!(
            ready_line(Some(Protocol::Mysql), "db", Bound::Unix(my), Some("app")),
            "mysql db ready on /run/keyhole/mysql-3306.sock (mariadb -S /run/keyhole/mysql-3306.sock -u app)"
        );
    }

    #[test]
    fn odd_names_are_quoted_for_the_shell_and_libpq() {
        let my = Path::new("/tmp/my dir/db.sock");
        assert!(
            ready_line(Some(Protocol::Mysql), "db", Bound::Unix(my), Some("o'neil"))
                .ends_with("(mariadb -S '/tmp/my dir/db.sock' -u 'o'\\''neil')")
        );
        let pg = Path::new("/tmp/my dir/.s.PGSQL.5432");
        assert!(
            ready_line(Some(Protocol::Postgres), "db", Bound::Unix(pg), None)
                .ends_with("(psql \"host='/tmp/my dir' port=5432\")")
        );
    }

    #[test]
    fn an_engine_not_known_yet_gives_no_client() {
        let at = Bound::Tcp("127.0.0.1:5432".parse().unwrap());
        assert_eq!(
            ready_line(None, "p:r:i", at, None),
            "p:r:i ready on 127.0.0.1:5432"
        );
        // A socket file not named as libpq looks for gives no psql line.
        let odd = Path::new("/run/db.sock");
        assert_eq!(
            ready_line(Some(Protocol::Postgres), "db", Bound::Unix(odd), None),
            "postgres db ready on /run/db.sock"
        );
    }
}
