//! Which requests go through a proxy, from `HTTPS_PROXY`, `HTTP_PROXY` and
//! `NO_PROXY` (each also in lower case), read from a map so tests can feed
//! their own.
//!
//! The rules are hyper-util's proxy matcher
//! ([`hyper_util::client::proxy::matcher::Matcher`]), which follows curl:
//!
//! - An `https://` URL goes through `HTTPS_PROXY`, an `http://` URL through
//!   `HTTP_PROXY`. The upper-case name wins when both are set (even to an
//!   empty value); an empty value means no proxy. `ALL_PROXY` is not read
//!   (it is often a SOCKS proxy, which this client does not speak).
//! - The proxy is `http://[user:password@]host[:port]` (no scheme means
//!   `http://`; no port means 80). The user and password, percent-decoded,
//!   are sent as `Proxy-Authorization: Basic` on the `CONNECT`, and are
//!   never shown: a proxy is named by its scheme, host and port only.
//!   An `https://` (TLS to the proxy) or SOCKS proxy is refused with an
//!   error naming the variable, rather than silently bypassed.
//! - `NO_PROXY` is a comma-separated list. An entry is a host name, which
//!   also covers its subdomains (`example.com` and `.example.com` both match
//!   `example.com` and `www.example.com`, not `notexample.com`); an IP
//!   address; or an IP network (`10.0.0.0/8`, `fd00::/8`). Names match
//!   without regard to case.
//!
//! Three additions to the matcher, where it falls short of what curl and
//! Google's libraries (Go's `httpproxy`, Python's `requests`) do:
//!
//! - A `*` entry turns the proxy off for every host. (The matcher applies it
//!   to host names only, so an IP-literal URL would still be proxied.)
//! - An entry with a port (`example.com:8443`, `10.1.2.3:80`,
//!   `[fd00::1]:443`) covers that host on that port only, as in Go and
//!   Python. (Curl and the matcher never match such an entry.)
//! - A bracketed IPv6 entry (`[::1]`) is the address.
//!
//! The metadata servers never go through a proxy, whatever `NO_PROXY` says,
//! as Google's own libraries do: link-local addresses and
//! `metadata.google.internal` (Google Cloud's, EC2's and ECS's credential
//! endpoints; a proxy that reached one would reach its own machine's and hand
//! out that identity). Loopback follows `NO_PROXY` as in curl, so a proxy on
//! this host can be tested; deployments behind a proxy usually want
//! `NO_PROXY=localhost,127.0.0.1,::1`.

use std::collections::HashMap;
use std::fmt;

use http::{HeaderValue, Uri};
use hyper_util::client::proxy::matcher::Matcher;

use crate::config::host_port;

use super::Url;

/// The proxy settings of one client.
pub(super) struct ProxyRules {
    /// `HTTP_PROXY`, for `http://` URLs.
    http: Option<Result<Proxy, ProxyError>>,
    /// `HTTPS_PROXY`, for `https://` URLs.
    https: Option<Result<Proxy, ProxyError>>,
    no_proxy: NoProxy,
}

/// A usable proxy.
#[derive(Clone)]
pub(super) struct Proxy {
    /// `http://host:port`: how messages name it (never with credentials).
    shown: String,
    /// The variable it came from.
    variable: &'static str,
    /// `http://host[:port]/`, for the tunnel connector.
    uri: Uri,
    /// `Basic ...`, marked sensitive.
    auth: Option<HeaderValue>,
}

impl Proxy {
    pub(super) fn shown(&self) -> &str {
        &self.shown
    }

    pub(super) fn variable(&self) -> &'static str {
        self.variable
    }

    pub(super) fn uri(&self) -> &Uri {
        &self.uri
    }

    pub(super) fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// The proxy's host, without brackets.
    pub(super) fn host(&self) -> &str {
        let host = self.uri.host().unwrap_or_default();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    pub(super) fn port(&self) -> u16 {
        self.uri.port_u16().unwrap_or(80)
    }

    /// "the proxy http://host:port (HTTPS_PROXY)".
    pub(super) fn describe(&self) -> String {
        format!("the proxy {} ({})", self.shown, self.variable)
    }
}

/// Credentials are left out: only the scheme, host and port are shown.
impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({}, {})", self.shown, self.variable)
    }
}

/// A proxy variable this client cannot use. Its value is not shown: it may
/// hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable} is set, but {reason}")]
pub(super) struct ProxyError {
    variable: &'static str,
    reason: &'static str,
}

/// Where one request goes.
#[derive(Debug)]
pub(super) enum Route<'a> {
    Direct,
    Proxy(&'a Proxy),
    /// The variable for this scheme is set but unusable.
    Unusable(&'a ProxyError),
}

impl ProxyRules {
    pub(super) fn from_env(env: &HashMap<String, String>) -> ProxyRules {
        let proxy = |names| first(env, names).and_then(|(name, value)| parse_proxy(name, value));
        ProxyRules {
            http: proxy(["HTTP_PROXY", "http_proxy"]),
            https: proxy(["HTTPS_PROXY", "https_proxy"]),
            no_proxy: first(env, ["NO_PROXY", "no_proxy"])
                .map(|(_, value)| NoProxy::parse(value))
                .unwrap_or_default(),
        }
    }

    /// `HTTP_PROXY`, when it is set and usable.
    pub(super) fn http_proxy(&self) -> Option<&Proxy> {
        self.http.as_ref().and_then(|p| p.as_ref().ok())
    }

    /// `HTTPS_PROXY`, when it is set and usable.
    pub(super) fn https_proxy(&self) -> Option<&Proxy> {
        self.https.as_ref().and_then(|p| p.as_ref().ok())
    }

    pub(super) fn route(&self, url: &Url) -> Route<'_> {
        let configured = if url.is_https() {
            &self.https
        } else {
            &self.http
        };
        match configured {
            None => Route::Direct,
            Some(_) if self.no_proxy.excludes(url) => Route::Direct,
            Some(Ok(proxy)) => Route::Proxy(proxy),
            Some(Err(e)) => Route::Unusable(e),
        }
    }
}

/// The first of `names` that is set (even to an empty value), as the
/// matcher's own `from_env` reads them.
fn first<'a>(
    env: &'a HashMap<String, String>,
    names: [&'static str; 2],
) -> Option<(&'static str, &'a str)> {
    names
        .into_iter()
        .find_map(|name| env.get(name).map(|value| (name, value.as_str())))
}

/// A proxy URL, through the matcher's own parser (which splits off and
/// percent-decodes the credentials). `None` for an empty value.
fn parse_proxy(variable: &'static str, value: &str) -> Option<Result<Proxy, ProxyError>> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let fail = |reason| Some(Err(ProxyError { variable, reason }));
    let probe = Uri::from_static("http://proxy-probe.invalid/");
    let Some(found) = Matcher::builder().http(value).build().intercept(&probe) else {
        return fail("it is not a proxy URL (http://[user:password@]host[:port])");
    };
    match found.uri().scheme_str() {
        Some("http") => {}
        Some("https") => {
            return fail("https:// proxies (TLS to the proxy) are not supported; use http://")
        }
        _ => return fail("only http:// proxies are supported (not SOCKS)"),
    }
    let Some(host) = found.uri().host() else {
        return fail("it is not a proxy URL (http://[user:password@]host[:port])");
    };
    // The host keeps its brackets (an IPv6 address) in a URI.
    let port = found.uri().port_u16().unwrap_or(80);
    Some(Ok(Proxy {
        shown: format!("http://{host}:{port}"),
        variable,
        uri: found.uri().clone(),
        auth: found.basic_auth().cloned(),
    }))
}

/// `NO_PROXY`.
#[derive(Default)]
struct NoProxy {
    /// A `*` entry.
    all: bool,
    /// The entries without a port.
    hosts: Option<Matcher>,
    /// The entries with a port, one matcher each.
    with_port: Vec<(u16, Matcher)>,
}

impl NoProxy {
    fn parse(value: &str) -> NoProxy {
        let mut no_proxy = NoProxy::default();
        let mut hosts = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                no_proxy.all = true;
            } else if let Some((host, port)) = split_port(entry) {
                no_proxy.with_port.push((port, host_rules(host)));
            } else {
                hosts.push(unbracket(entry));
            }
        }
        if !hosts.is_empty() {
            no_proxy.hosts = Some(host_rules(&hosts.join(",")));
        }
        no_proxy
    }

    fn excludes(&self, url: &Url) -> bool {
        always_direct(url.host()) || self.names(url.host(), url.port())
    }

    /// Whether the list names `host` on `port`.
    fn names(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        // Only the host matters to the matcher; the scheme makes it look.
        let Ok(uri) = format!("http://{}/", host_port(host, port)).parse::<Uri>() else {
            return false;
        };
        let named = |rules: &Matcher| rules.intercept(&uri).is_none();
        self.hosts.as_ref().is_some_and(named)
            || self
                .with_port
                .iter()
                .any(|(p, rules)| *p == port && named(rules))
    }
}

/// Whether the `NO_PROXY` list `list` names `host:port`, by the rules above
/// (for keyhole's own hops: `ALL_PROXY` applies to the hosts it does not name).
pub(crate) fn no_proxy_excludes(list: &str, host: &str, port: u16) -> bool {
    NoProxy::parse(list).names(host, port)
}

/// Hosts no proxy is used for (see the module docs).
fn always_direct(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("metadata.google.internal") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_link_local(),
        Ok(std::net::IpAddr::V6(ip)) => (ip.segments()[0] & 0xffc0) == 0xfe80,
        Err(_) => false,
    }
}

/// The matcher's `NO_PROXY` rules for `list`, on their own: a matcher whose
/// only proxy is a placeholder, so that `intercept` is `None` exactly when
/// `list` names the host.
fn host_rules(list: &str) -> Matcher {
    Matcher::builder()
        .all("http://no-proxy-placeholder.invalid")
        .no(list)
        .build()
}

/// `host:port` or `[v6]:port` into its parts; `None` for an entry without a
/// port (a name, an address, an unbracketed IPv6 address, a network).
fn split_port(entry: &str) -> Option<(&str, u16)> {
    let (host, port) = match entry.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']')?;
            (host, after.strip_prefix(':')?)
        }
        None => {
            let (host, port) = entry.rsplit_once(':')?;
            if host.contains(':') {
                return None;
            }
            (host, port)
        }
    };
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((host, port.parse().ok()?))
}

/// `[::1]` → `::1`, which the matcher reads as an address.
fn unbracket(entry: &str) -> &str {
    entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .unwrap_or(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, &str)]) -> ProxyRules {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyRules::from_env(&env)
    }

    /// Where `url` goes: "direct", the proxy as shown, or the error.
    fn route(rules: &ProxyRules, url: &str) -> String {
        let url = Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        match rules.route(&url) {
            Route::Direct => "direct".to_owned(),
            Route::Proxy(p) => format!("{} {}", p.shown(), p.variable()),
            Route::Unusable(e) => e.to_string(),
        }
    }

    const HTTP: &str = "http://proxy.corp:3128 HTTP_PROXY";
    const HTTPS: &str = "http://secure.corp:8080 HTTPS_PROXY";

    #[test]
    fn each_scheme_has_its_own_proxy() {
        let r = rules(&[
            ("HTTP_PROXY", "http://proxy.corp:3128"),
            ("HTTPS_PROXY", "http://secure.corp:8080"),
        ]);
        assert_eq!(route(&r, "http://example.com/x"), HTTP);
        assert_eq!(route(&r, "https://oauth2.googleapis.com/token"), HTTPS);

        let r = rules(&[("HTTPS_PROXY", "http://secure.corp:8080")]);
        assert_eq!(route(&r, "https://sqladmin.googleapis.com/"), HTTPS);
        assert_eq!(route(&r, "http://example.com/"), "direct");

        let r = rules(&[("HTTP_PROXY", "http://proxy.corp:3128")]);
        assert_eq!(route(&r, "https://sqladmin.googleapis.com/"), "direct");

        assert_eq!(route(&rules(&[]), "https://example.com/"), "direct");
        assert_eq!(
            route(&rules(&[("ALL_PROXY", "http://p:1")]), "http://e/"),
            "direct"
        );
    }

    #[test]
    fn lower_case_names_work_and_upper_case_wins() {
        let r = rules(&[
            ("http_proxy", "http://proxy.corp:3128"),
            ("https_proxy", "http://secure.corp:8080"),
        ]);
        assert_eq!(
            route(&r, "http://example.com/"),
            "http://proxy.corp:3128 http_proxy"
        );
        assert_eq!(
            route(&r, "https://example.com/"),
            "http://secure.corp:8080 https_proxy"
        );

        let r = rules(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
        ]);
        assert_eq!(
            route(&r, "https://example.com/"),
            "http://upper:1 HTTPS_PROXY"
        );
        // Set but empty: no proxy, and the lower-case one is not consulted.
        let r = rules(&[("HTTPS_PROXY", ""), ("https_proxy", "http://lower:2")]);
        assert_eq!(route(&r, "https://example.com/"), "direct");
        // NO_PROXY likewise.
        let r = rules(&[
            ("HTTP_PROXY", "http://proxy.corp:3128"),
            ("no_proxy", "example.com"),
        ]);
        assert_eq!(route(&r, "http://example.com/"), "direct");
        let r = rules(&[
            ("HTTP_PROXY", "http://proxy.corp:3128"),
            ("NO_PROXY", ""),
            ("no_proxy", "example.com"),
        ]);
        assert_eq!(route(&r, "http://example.com/"), HTTP);
    }

    #[test]
    fn proxy_urls_default_their_scheme_and_port_and_hide_credentials() {
        for (value, shown) in [
            ("proxy.corp:3128", "http://proxy.corp:3128"),
            ("http://proxy.corp", "http://proxy.corp:80"),
            ("http://proxy.corp:3128/", "http://proxy.corp:3128"),
            (" http://10.0.0.1:3128 ", "http://10.0.0.1:3128"),
            ("http://[fd00::1]:3128", "http://[fd00::1]:3128"),
            (
                "http://user:p%40ss@proxy.corp:3128",
                "http://proxy.corp:3128",
            ),
        ] {
            let r = rules(&[("HTTPS_PROXY", value)]);
            assert_eq!(
                route(&r, "https://example.com/"),
                format!("{shown} HTTPS_PROXY"),
                "{value}"
            );
        }

        let r = rules(&[("HTTPS_PROXY", "http://user:p%40ss@proxy.corp:3128")]);
        let proxy = r.https_proxy().expect("a proxy");
        let auth = proxy.auth().expect("credentials");
        // base64("user:p@ss"): percent-decoded.
        assert_eq!(auth, "Basic dXNlcjpwQHNz");
        assert!(auth.is_sensitive());
        assert!(!format!("{proxy:?}").contains("user"), "{proxy:?}");
        assert!(!proxy.describe().contains("user"));
        assert!(rules(&[("HTTPS_PROXY", "http://proxy.corp:3128")])
            .https_proxy()
            .expect("a proxy")
            .auth()
            .is_none());
    }

    #[test]
    fn unusable_proxies_are_errors_that_do_not_show_the_value() {
        for (value, reason) in [
            ("https://user:hunter2@proxy.corp:443", "https:// proxies"),
            ("socks5://user:hunter2@proxy.corp:1080", "not SOCKS"),
            ("http://user:hunter2@", "not a proxy URL"),
            ("http://exa mple:hunter2", "not a proxy URL"),
        ] {
            let r = rules(&[("HTTPS_PROXY", value)]);
            let shown = route(&r, "https://example.com/");
            assert!(
                shown.starts_with("HTTPS_PROXY is set, but "),
                "{value}: {shown}"
            );
            assert!(shown.contains(reason), "{value}: {shown}");
            assert!(!shown.contains("hunter2"), "{value}: {shown}");
            assert!(r.https_proxy().is_none());
        }
        // NO_PROXY still applies: an excluded host never sees the error.
        let r = rules(&[("HTTPS_PROXY", "socks5://p:1"), ("NO_PROXY", "example.com")]);
        assert_eq!(route(&r, "https://example.com/"), "direct");
    }

    #[test]
    fn no_proxy_names_cover_their_subdomains() {
        let r = rules(&[
            ("HTTPS_PROXY", "http://secure.corp:8080"),
            ("NO_PROXY", "googleapis.com, .internal ,Example.ORG"),
        ]);
        for direct in [
            "https://googleapis.com/",
            "https://oauth2.googleapis.com/token",
            "https://sqladmin.GoogleApis.com/",
            "https://metadata.google.internal/",
            // A leading dot is ignored, as in curl.
            "https://internal/",
            "https://example.org:8443/",
            "https://www.example.org/",
        ] {
            assert_eq!(route(&r, direct), "direct", "{direct}");
        }
        for proxied in [
            "https://notgoogleapis.com/",
            "https://googleapis.com.evil.example/",
            "https://internal.example/",
            "https://example.com/",
        ] {
            assert_eq!(route(&r, proxied), HTTPS, "{proxied}");
        }
    }

    #[test]
    fn no_proxy_addresses_and_networks() {
        let r = rules(&[
            ("HTTP_PROXY", "http://proxy.corp:3128"),
            ("NO_PROXY", "10.0.0.0/8,169.254.169.254,fd00::/8,[::1]"),
        ]);
        for direct in [
            "http://10.1.2.3/",
            "http://169.254.169.254/computeMetadata/v1/",
            "http://[fd00::1]:8080/",
            "http://[::1]:9090/ready",
        ] {
            assert_eq!(route(&r, direct), "direct", "{direct}");
        }
        for proxied in ["http://11.0.0.1/", "http://169.255.169.253/"] {
            assert_eq!(route(&r, proxied), HTTP, "{proxied}");
        }
    }

    #[test]
    fn a_no_proxy_entry_with_a_port_covers_that_port_only() {
        let r = rules(&[
            ("HTTP_PROXY", "http://proxy.corp:3128"),
            ("HTTPS_PROXY", "http://secure.corp:8080"),
            (
                "NO_PROXY",
                "example.com:8443,127.0.0.1:9090,[::1]:9090,10.0.0.0/8:80",
            ),
        ]);
        assert_eq!(route(&r, "https://example.com:8443/"), "direct");
        assert_eq!(route(&r, "https://www.example.com:8443/"), "direct");
        assert_eq!(route(&r, "https://example.com/"), HTTPS);
        assert_eq!(route(&r, "http://example.com:8443/"), "direct");
        assert_eq!(route(&r, "http://127.0.0.1:9090/ready"), "direct");
        assert_eq!(route(&r, "http://127.0.0.1:9091/ready"), HTTP);
        assert_eq!(route(&r, "http://[::1]:9090/ready"), "direct");
        assert_eq!(route(&r, "http://10.9.8.7/"), "direct");
        assert_eq!(route(&r, "http://10.9.8.7:8080/"), HTTP);
        // The scheme's default port counts as the URL's port.
        let r = rules(&[
            ("HTTPS_PROXY", "http://secure.corp:8080"),
            ("NO_PROXY", "example.com:443"),
        ]);
        assert_eq!(route(&r, "https://example.com/"), "direct");
    }

    #[test]
    fn a_star_turns_the_proxy_off_for_names_and_addresses() {
        for list in ["*", "example.com, *"] {
            let r = rules(&[
                ("HTTP_PROXY", "http://proxy.corp:3128"),
                ("HTTPS_PROXY", "http://secure.corp:8080"),
                ("NO_PROXY", list),
            ]);
            for url in [
                "https://oauth2.googleapis.com/",
                "http://10.0.0.1/",
                "http://[fd00::1]/",
                "http://127.0.0.1:9090/",
            ] {
                assert_eq!(route(&r, url), "direct", "{list}: {url}");
            }
        }
        // Not a wildcard inside a name.
        let r = rules(&[
            ("HTTPS_PROXY", "http://secure.corp:8080"),
            ("NO_PROXY", "*.example.com"),
        ]);
        assert_eq!(route(&r, "https://www.example.com/"), HTTPS);
    }

    #[test]
    fn metadata_servers_never_go_through_a_proxy_and_loopback_follows_no_proxy() {
        let proxies = [
            ("HTTP_PROXY", "http://proxy.corp:3128"),
            ("HTTPS_PROXY", "http://secure.corp:8080"),
        ];
        let r = rules(&proxies);
        for url in [
            "http://metadata.google.internal/x",
            "http://METADATA.google.internal/x",
            "http://169.254.169.254/x",
            "http://169.254.170.2/v2/credentials",
            "http://[fe80::a9fe:a9fe]/x",
        ] {
            assert_eq!(route(&r, url), "direct", "{url}");
        }
        assert_eq!(route(&r, "http://127.0.0.1:9090/ready"), HTTP);
        assert_eq!(route(&r, "http://[::1]:9090/ready"), HTTP);
        assert_eq!(route(&r, "http://localhost:9090/ready"), HTTP);
        assert_eq!(route(&r, "https://localhost/"), HTTPS);

        let mut with_no_proxy = proxies.to_vec();
        with_no_proxy.push(("NO_PROXY", "localhost,127.0.0.0/8,::1"));
        let r = rules(&with_no_proxy);
        for url in [
            "http://127.0.0.1:9090/ready",
            "http://127.1.2.3/",
            "http://[::1]:9090/ready",
            "http://localhost:9090/ready",
            "https://localhost/",
            "http://metadata.google.internal/x",
            "http://169.254.169.254/x",
        ] {
            assert_eq!(route(&r, url), "direct", "{url}");
        }
        assert_eq!(route(&r, "https://oauth2.googleapis.com/"), HTTPS);
    }

    #[test]
    fn ports_split_off_only_where_they_are_ports() {
        assert_eq!(split_port("example.com:8443"), Some(("example.com", 8443)));
        assert_eq!(split_port("[::1]:80"), Some(("::1", 80)));
        assert_eq!(split_port("10.0.0.0/8:80"), Some(("10.0.0.0/8", 80)));
        for no_port in [
            "example.com",
            "::1",
            "fd00::/8",
            "[::1]",
            "example.com:",
            "example.com:x",
            ":80",
            "example.com:99999",
        ] {
            assert_eq!(split_port(no_port), None, "{no_port}");
        }
    }
}
