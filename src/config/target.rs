//! Target URLs: `postgres://HOST[:PORT][?PARAMS]`.

use std::net::SocketAddr;

/// The protocols keyhole speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Postgres,
    Mysql,
}

impl Protocol {
    pub fn default_port(self) -> u16 {
        match self {
            Protocol::Postgres => 5432,
            Protocol::Mysql => 3306,
        }
    }
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
        }
    }
    /// The socket file a client finds in a `--unix-socket` directory.
    pub fn socket_file(self, port: u16) -> String {
        match self {
            // libpq's own convention: psql -h DIR -p PORT finds it.
            Protocol::Postgres => format!(".s.PGSQL.{port}"),
            Protocol::Mysql => format!("mysql-{port}.sock"),
        }
    }
}

/// A target as written, before defaults from flags are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    /// `name=value` pairs after `?`, percent-decoded, in order.
    pub params: Vec<(String, String)>,
}

/// Parameters a target URL may carry.
pub const TARGET_PARAMS: &[&str] = &[
    "listen",
    "unix-socket",
    "ca-file",
    "server-name",
    "tls-mode",
    "client-cert",
    "client-key",
    "backend",
    "destinations",
    "allow",
    "iam",
    "region",
    "user",
    "iam-port",
    "via",
    "password-file",
    "pool",
    "pool-size",
    "pool-idle-timeout",
    "pool-max-lifetime",
];

pub fn parse(raw: &str) -> Result<TargetUrl, String> {
    // Every message below quotes the target; never with a password in it.
    let shown = super::via::redact(raw);
    let text = shown.as_str();
    // A hop in the parameters may carry its own user (via=ssh://me@bastion).
    let before_query = raw.split_once('?').map_or(raw, |(head, _)| head);
    if let Some(at) = before_query.rfind('@') {
        let start = before_query.find("://").map_or(0, |s| s + 3).min(at);
        return Err(format!(
            "target '{}***{}': a target carries no user or password; clients send their own",
            &before_query[..start],
            &before_query[at..]
        ));
    }
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| format!("target '{text}' is not a URL like postgres://HOST[:PORT]"))?;
    let protocol = match scheme.to_ascii_lowercase().as_str() {
        "postgres" | "postgresql" => Protocol::Postgres,
        "mysql" | "mariadb" => Protocol::Mysql,
        other => {
            return Err(format!(
                "target '{text}': unknown scheme '{other}' (use postgres:// or mysql://)"
            ))
        }
    };
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains('/') {
        return Err(format!(
            "target '{text}': a target names a server, not a database; clients choose the database"
        ));
    }
    let (host, port) = split_host_port(authority).map_err(|e| format!("target '{text}': {e}"))?;
    let port = port.unwrap_or(protocol.default_port());
    let mut params: Vec<(String, String)> = Vec::new();
    // A hop URL with parameters of its own (`via=ssm://i-1?region=R&document=D`)
    // keeps those that follow it, up to the first parameter that is not its.
    let mut hop_params: &[&str] = &[];
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let own = pair
            .split_once('=')
            .is_some_and(|(name, _)| hop_params.contains(&name));
        if let (true, Some((_, via))) = (own, params.last_mut()) {
            via.push('&');
            via.push_str(pair);
            continue;
        }
        hop_params = &[];
        let (name, value) = pair.split_once('=').ok_or_else(|| {
            // A hop URL written without `via=` lands here: never its password.
            let pair = super::via::redact(pair);
            format!("target '{text}': parameter '{pair}' has no value")
        })?;
        let name = percent_decode(name).map_err(|e| format!("target '{text}': {e}"))?;
        if !TARGET_PARAMS.contains(&name.as_str()) {
            return Err(format!(
                "target '{text}': unknown parameter '{}' (known: {})",
                super::via::redact(&name),
                TARGET_PARAMS.join(", ")
            ));
        }
        // A hop's URL is decoded once, by its own parser (its password may
        // hold an escaped '@' or '&').
        let value = if name == "via" {
            hop_params = super::via::hop_params(value);
            value.to_owned()
        } else {
            percent_decode(value).map_err(|e| format!("target '{text}': {e}"))?
        };
        params.push((name, value));
    }
    Ok(TargetUrl {
        protocol,
        host,
        port,
        params,
    })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
pub fn split_host_port(text: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("'{text}': unclosed '[' in IPv6 address"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("'{text}': expected ':' after ']'"))?,
                ),
            ),
        }
    } else {
        match text.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(format!(
                    "'{text}': write IPv6 addresses in brackets, like [::1]:5432"
                ))
            }
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err(format!("'{text}': no host"));
    }
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("'{text}': invalid port '{p}'"))
        })
        .transpose()?;
    Ok((host.to_owned(), port))
}

/// A listen address: `ADDR:PORT` or `[v6]:PORT`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("listen address '{text}' is not ADDR:PORT (like 127.0.0.1:6432 or [::1]:6432)")
    })
}

/// Percent-decoding of target parameters (also for instance targets).
pub(crate) fn percent_decode_text(text: &str) -> Result<String, String> {
    percent_decode(text)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in '{}'", super::via::redact(text)))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{text}' is not UTF-8 after percent-decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_params() {
        let t =
            parse("postgres://db.internal:6543?server-name=db.example.com&ca-file=%2Fetc%2Fca.pem")
                .expect("valid");
        assert_eq!(t.protocol, Protocol::Postgres);
        assert_eq!(t.host, "db.internal");
        assert_eq!(t.port, 6543);
        assert_eq!(
            t.params,
            vec![
                ("server-name".into(), "db.example.com".into()),
                ("ca-file".into(), "/etc/ca.pem".into())
            ]
        );
    }

    #[test]
    fn defaults_and_ipv6() {
        let t = parse("postgresql://10.0.0.5").expect("valid");
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.5", 5432));
        let t = parse("mysql://10.0.0.6").expect("valid");
        assert_eq!((t.protocol, t.port), (Protocol::Mysql, 3306));
        let t = parse("mariadb://10.0.0.6:3307").expect("valid");
        assert_eq!((t.protocol, t.port), (Protocol::Mysql, 3307));
        let t = parse("postgres://[fd00::5]:5433/").expect("valid");
        assert_eq!((t.host.as_str(), t.port), ("fd00::5", 5433));
    }

    #[test]
    fn clear_errors_for_what_a_target_cannot_be() {
        let err = |s: &str| parse(s).expect_err(s);
        assert!(err("db.internal:5432").contains("not a URL"));
        assert!(err("redis://db").contains("unknown scheme 'redis'"));
        assert!(err("postgres://db/mydb").contains("not a database"));
        assert!(err("postgres://me:pw@db").contains("no user or password"));
        assert!(err("postgres://db:99999").contains("invalid port"));
        assert!(err("postgres://fd00::1:5432").contains("brackets"));
        assert!(err("postgres://db?sslmode=disable").contains("unknown parameter 'sslmode'"));
        assert!(err("postgres://db?listen").contains("has no value"));
    }

    #[test]
    fn the_error_never_echoes_a_password_it_refused() {
        // The whole target is echoed, so a password would be: refuse before
        // that happens by never accepting userinfo, and say so plainly.
        for raw in ["postgres://me:hunter2@db", "me:hunter2@db:5432"] {
            let e = parse(raw).expect_err("userinfo");
            assert!(e.contains("no user or password"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("127.0.0.1:6432").expect("v4").port(), 6432);
        assert!(parse_listen("[::1]:6432").expect("v6").is_ipv6());
        assert!(parse_listen("6432").is_err());
    }
}
