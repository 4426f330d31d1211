//! A small HTTP/1.1 client: credential endpoints (the metadata server and
//! OAuth2 token endpoints), the Cloud SQL Admin and IAM Credentials APIs, and
//! keyhole's own health and admin endpoints.
//!
//! http:// or https:// (verified against the system trust store with the
//! ring provider), and a reply body capped at [`MAX_BODY`]: a credential
//! endpoint answers with a few hundred bytes of JSON, and a broken or hostile
//! one must not make keyhole buffer without bound (reading stops at the cap).
//! There is no timeout here; callers bound the whole exchange with
//! `tokio::time::timeout`. Nothing waits on the peer once the reply body is
//! complete.
//!
//! The transport is hyper-util's pooled client over hyper-rustls: one
//! process-wide [`Client`] (built on first use from the process environment)
//! keeps connections alive and reuses them (idle ones are closed after
//! [`IDLE_TIMEOUT`]), connects with happy eyeballs and `TCP_NODELAY`, and
//! honours `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` as curl does (the exact
//! rules, and what is not exempt, are in `client/proxy.rs`). Through a
//! proxy, every request, `http://` or `https://`, goes through a `CONNECT`
//! tunnel (with `Proxy-Authorization` when the proxy URL holds credentials);
//! TLS then runs end to end with the destination, verified as without a
//! proxy. [`client_for`] builds a client from a map of variables, for tests.
//!
//! Requests and replies carry secrets (refresh tokens, client secrets, access
//! tokens, and occasionally a secret in a query string), so [`HttpError`]
//! names the URL without its query and never holds a body or a header value,
//! and [`Request`] and [`Response`] do not show their contents in `Debug`.
//! A proxy is named by its scheme, host and port, never its credentials.

mod proxy;
pub(crate) use proxy::no_proxy_excludes;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::proxy::{Proxy, ProxyRules, Route};
use crate::config::{host_port, TlsMode, UpstreamTls};
use crate::tls::{self, TlsSetupError};

/// The largest reply body [`send`] accepts. Token replies are well under 4 KiB.
pub const MAX_BODY: usize = 64 * 1024;

const FORM: &str = "application/x-www-form-urlencoded";

/// An `http://` or `https://` URL, split into what a request needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    https: bool,
    /// Without brackets for an IPv6 literal.
    host: String,
    port: u16,
    /// Starts with `/`; the query, if any, included; no fragment.
    path_and_query: String,
}

/// Why a URL was refused. Names the URL without its query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{shown}' is not a usable URL: {reason}")]
pub struct UrlError {
    shown: String,
    reason: &'static str,
}

impl Url {
    /// Parses `scheme://host[:port][/path][?query][#fragment]`, where host
    /// is a name, an IPv4 address or a bracketed IPv6 address. The path and
    /// query are kept as given (already percent-encoded); the fragment is
    /// dropped, as it is never sent.
    pub fn parse(text: &str) -> Result<Url, UrlError> {
        let fail = |reason| UrlError {
            shown: without_query(text).to_owned(),
            reason,
        };
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| fail("it has no http:// or https://"))?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(fail("only http:// and https:// are supported")),
        };
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(split);
        if authority.contains('@') {
            return Err(fail("credentials in a URL are not supported"));
        }
        let (host, port) = split_authority(authority).map_err(fail)?;
        let port = match port {
            None => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(port) => parse_port(port).map_err(fail)?,
        };
        if path_and_query.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(fail("it holds a space or a character that is not ASCII"));
        }
        let path_and_query = if path_and_query.starts_with('/') {
            path_and_query.to_owned()
        } else {
            format!("/{path_and_query}")
        };
        Ok(Url {
            https,
            host: host.to_owned(),
            port,
            path_and_query,
        })
    }

    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The host name or address, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// `host[:port]` as the `Host` header wants it: brackets around an IPv6
    /// address, the port only when it is not the scheme's default.
    pub fn authority(&self) -> String {
        if self.port == self.default_port() {
            if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.clone()
            }
        } else {
            host_port(&self.host, self.port)
        }
    }

    fn default_port(&self) -> u16 {
        if self.https {
            443
        } else {
            80
        }
    }
}

/// Shown without the query (which may hold a secret): the form every error
/// and log line uses.
impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let path = without_query(&self.path_and_query);
        write!(f, "{scheme}://{}{path}", self.authority())
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Url({self})")
    }
}

fn without_query(text: &str) -> &str {
    let end = text.find(['?', '#']).unwrap_or(text.len());
    &text[..end]
}

/// `host[:port]` or `[v6][:port]` into host and the port text, if any.
fn split_authority(authority: &str) -> Result<(&str, Option<&str>), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address is missing its closing ']'")?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err("the text in brackets is not an IPv6 address");
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("only ':port' may follow an IPv6 address")?,
            ),
        };
        (host, port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err("an IPv6 address must be in brackets");
        }
        let name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if !host.bytes().all(name_byte) {
            return Err("the host is not a name or an address");
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("it has no host");
    }
    Ok((host, port))
}

fn parse_port(text: &str) -> Result<u16, &'static str> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the port is not a number");
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port is not between 1 and 65535"),
        Ok(port) => Ok(port),
    }
}

/// Whether `text` is a URL this client can use (for configuration checks).
pub fn check_url(text: &str) -> Result<(), String> {
    Url::parse(text).map(|_| ()).map_err(|e| e.to_string())
}

/// Percent-encodes everything but the unreserved characters
/// (`A-Z a-z 0-9 - _ . ~`), byte by byte of the UTF-8.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An `application/x-www-form-urlencoded` body: `name=value` pairs joined
/// by `&`, both sides percent-encoded.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One request. `Host`, `User-Agent` and, with a body, `Content-Type` and
/// `Content-Length` are set by [`send`].
pub struct Request {
    method: Method,
    url: Url,
    headers: Vec<(std::borrow::Cow<'static, str>, String)>,
    body: Option<(&'static str, Vec<u8>)>,
}

impl Request {
    pub fn new(method: Method, url: Url) -> Request {
        Request {
            method,
            url,
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn get(url: Url) -> Request {
        Request::new(Method::GET, url)
    }

    /// A POST of an `application/x-www-form-urlencoded` body.
    pub fn post_form(url: Url, pairs: &[(&str, &str)]) -> Request {
        Request::new(Method::POST, url).body(FORM, form_encode(pairs).into_bytes())
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// [`Request::header`] with a name known only at run time (the
    /// operator's `OTEL_EXPORTER_OTLP_HEADERS`).
    #[cfg(feature = "otel")]
    pub fn header_owned(mut self, name: String, value: String) -> Request {
        self.headers.push((name.into(), value));
        self
    }

    pub fn body(mut self, content_type: &'static str, body: Vec<u8>) -> Request {
        self.body = Some((content_type, body));
        self
    }

    pub fn url(&self) -> &Url {
        &self.url
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values and the body are left out: they carry secrets.
        write!(f, "Request({} {})", self.method, self.url)
    }
}

/// A complete reply.
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A token reply's body is a secret.
        write!(f, "Response({}, {} bytes)", self.status, self.body.len())
    }
}

/// A failed exchange: which URL (without query) and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {kind}")]
pub struct HttpError {
    url: String,
    kind: HttpErrorKind,
}

impl HttpError {
    fn new(url: &Url, kind: HttpErrorKind) -> HttpError {
        HttpError {
            url: url.to_string(),
            kind,
        }
    }

    /// The URL, without its query.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn kind(&self) -> &HttpErrorKind {
        &self.kind
    }
}

/// What went wrong, in words that never include a body or a header value.
#[derive(Debug, thiserror::Error)]
pub enum HttpErrorKind {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    /// `addr` is the URL's `host:port` (for an IP-literal URL, the socket
    /// address).
    #[error("connection to {addr} refused")]
    Refused { addr: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// The proxy the request was to go through is unusable, unreachable or
    /// refused the tunnel. Names the proxy (scheme, host and port only) and
    /// the variable it came from.
    #[error("{0}")]
    Proxy(String),
    /// The TLS setup or handshake failed.
    #[error("{0}")]
    Tls(String),
    /// The exchange itself failed: not HTTP, cut short, an I/O error.
    #[error("{0}")]
    Exchange(String),
    #[error("the reply is larger than {} KiB", MAX_BODY / 1024)]
    TooLarge,
    /// A header name or value is not valid HTTP (which one is not said: the
    /// value could be a secret).
    #[error("the request is not valid HTTP (a header name or value holds a forbidden character)")]
    BadRequest,
}

/// How long a kept-alive connection may sit idle in the pool. Short enough
/// that a server's own idle timeout (Google's front ends allow minutes) is
/// not what closes it under a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per destination.
const IDLE_PER_HOST: usize = 8;
/// How long the first address family gets before the other is tried too.
const HAPPY_EYEBALLS: Duration = Duration::from_millis(300);

type Body = Full<Bytes>;
type PlainDirect = legacy::Client<HttpConnector, Body>;
type PlainTunnel = legacy::Client<Tunnel<HttpConnector>, Body>;
type TlsDirect = legacy::Client<HttpsConnector<HttpConnector>, Body>;
type TlsTunnel = legacy::Client<HttpsConnector<Tunnel<HttpConnector>>, Body>;

/// A pooled HTTP client with its proxy settings. Connections are kept per
/// destination and per route: one opened through a proxy is never used for
/// a direct request, nor the other way round.
pub struct Client {
    proxies: ProxyRules,
    plain: PlainDirect,
    /// Through `HTTP_PROXY`, when it is set and usable.
    plain_proxied: Option<PlainTunnel>,
    /// `None`: the system trust store, loaded on the first https request.
    tls: Option<Arc<ClientConfig>>,
    secure: OnceLock<Secure>,
}

/// The https side, built once its TLS config is at hand.
struct Secure {
    direct: TlsDirect,
    /// Through `HTTPS_PROXY`, when it is set and usable.
    proxied: Option<TlsTunnel>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The proxies as shown (no credentials); nothing else is of interest.
        f.debug_struct("Client")
            .field("http_proxy", &self.proxies.http_proxy())
            .field("https_proxy", &self.proxies.https_proxy())
            .finish_non_exhaustive()
    }
}

/// A client whose proxy settings come from `env` (`HTTPS_PROXY`,
/// `HTTP_PROXY`, `NO_PROXY` and their lower-case forms), verifying https
/// servers against the system trust store.
pub fn client_for(env: &HashMap<String, String>) -> Client {
    Client::new(env, None)
}

/// [`client_for`], verifying https servers with `tls` instead (for tests:
/// a private CA). Its ALPN list is left as it is.
pub fn client_with_tls(env: &HashMap<String, String>, tls: Arc<ClientConfig>) -> Client {
    Client::new(env, Some(tls))
}

/// The process-wide client, on the process environment (an empty one in
/// this crate's unit tests, so a developer's proxy settings cannot reach
/// them), built on first use.
fn default_client() -> &'static Client {
    static DEFAULT: OnceLock<Client> = OnceLock::new();
    DEFAULT.get_or_init(|| {
        #[cfg(not(test))]
        let env = crate::config::process_env();
        #[cfg(test)]
        let env = HashMap::new();
        client_for(&env)
    })
}

/// Sends one request with the process-wide client and reads the whole reply
/// (status and body).
pub async fn send(request: Request) -> Result<Response, HttpError> {
    default_client().send(request).await
}

/// [`send`], with `tls` in place of the system trust store (for tests): a
/// client of its own, on no proxy variables.
#[cfg(test)]
async fn send_with(
    request: Request,
    tls: Option<Arc<ClientConfig>>,
) -> Result<Response, HttpError> {
    match tls {
        Some(config) => client_with_tls(&HashMap::new(), config).send(request).await,
        None => send(request).await,
    }
}

impl Client {
    fn new(env: &HashMap<String, String>, tls: Option<Arc<ClientConfig>>) -> Client {
        let proxies = ProxyRules::from_env(env);
        let plain_proxied = proxies.http_proxy().map(|p| pool().build(tunnel(p)));
        Client {
            plain: pool().build(connector()),
            plain_proxied,
            proxies,
            tls,
            secure: OnceLock::new(),
        }
    }

    /// Sends one request and reads the whole reply (status and body).
    pub async fn send(&self, request: Request) -> Result<Response, HttpError> {
        let url = request.url.clone();
        let fail = |kind| HttpError::new(&url, kind);
        let hyper_request = build(request).map_err(fail)?;
        let proxy = match self.proxies.route(&url) {
            Route::Direct => None,
            Route::Proxy(proxy) => Some(proxy),
            Route::Unusable(e) => return Err(fail(HttpErrorKind::Proxy(e.to_string()))),
        };
        if let Some(proxy) = proxy {
            tracing::debug!(
                url = %url,
                proxy = proxy.shown(),
                variable = proxy.variable(),
                "HTTP request through a proxy"
            );
        }
        let pending = self.start(&url, proxy, hyper_request).map_err(fail)?;
        let response = match pending.await {
            Ok(response) => response,
            Err(e) => {
                let causes = Causes::of(&e);
                // hyper-util's tunnel keeps only "not 200" of the proxy's
                // answer; the proxy is asked again for the status, to say why.
                let status = match proxy {
                    Some(proxy) if causes.tunnel.as_deref() == Some(UNSUCCESSFUL) => {
                        connect_status(proxy, &url).await
                    }
                    _ => None,
                };
                return Err(fail(failure(&e, &causes, &url, proxy, status)));
            }
        };
        read_capped(response).await.map_err(fail)
    }

    /// Hands the request to the pool for its route.
    fn start(
        &self,
        url: &Url,
        proxy: Option<&Proxy>,
        request: hyper::Request<Body>,
    ) -> Result<ResponseFuture, HttpErrorKind> {
        // Each pool exists exactly when its proxy does; `missing` is for
        // the impossible other case.
        let missing = || HttpErrorKind::Proxy("no connection pool for the proxy".to_owned());
        if !url.is_https() {
            return match proxy {
                None => Ok(self.plain.request(request)),
                Some(_) => Ok(self
                    .plain_proxied
                    .as_ref()
                    .ok_or_else(missing)?
                    .request(request)),
            };
        }
        // Checked here for the same message as before hyper-rustls (which
        // would refuse the name as well).
        tls::server_name(url.host()).map_err(|e| HttpErrorKind::Tls(e.to_string()))?;
        let secure = self.secure()?;
        match proxy {
            None => Ok(secure.direct.request(request)),
            Some(_) => Ok(secure
                .proxied
                .as_ref()
                .ok_or_else(missing)?
                .request(request)),
        }
    }

    fn secure(&self) -> Result<&Secure, HttpErrorKind> {
        if let Some(secure) = self.secure.get() {
            return Ok(secure);
        }
        let config = match &self.tls {
            Some(config) => config.clone(),
            None => system_tls()?,
        };
        let secure = Secure {
            direct: pool().build(HttpsConnector::from((connector(), config.clone()))),
            proxied: self
                .proxies
                .https_proxy()
                .map(|p| pool().build(HttpsConnector::from((tunnel(p), config.clone())))),
        };
        Ok(self.secure.get_or_init(|| secure))
    }
}

/// The pool settings every route shares.
fn pool() -> legacy::Builder {
    let mut builder = legacy::Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(IDLE_PER_HOST);
    builder
}

/// TCP to a destination or a proxy: happy eyeballs, no Nagle (requests are
/// one small write each), https:// URIs accepted (TLS is layered on top).
fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_happy_eyeballs_timeout(Some(HAPPY_EYEBALLS));
    http
}

/// A `CONNECT` tunnel through `proxy`, with its credentials if it has them.
fn tunnel(proxy: &Proxy) -> Tunnel<HttpConnector> {
    let tunnel = Tunnel::new(proxy.uri().clone(), connector());
    match proxy.auth() {
        Some(auth) => tunnel.with_auth(auth.clone()),
        None => tunnel,
    }
}

fn build(request: Request) -> Result<hyper::Request<Body>, HttpErrorKind> {
    // The pool is keyed on scheme and authority, and the tunnel connects to
    // the authority's port (443 when there is none): the port is always
    // written out. The wire gets the path and query only.
    let scheme = if request.url.is_https() {
        "https"
    } else {
        "http"
    };
    let uri: Uri = format!(
        "{scheme}://{}{}",
        host_port(request.url.host(), request.url.port()),
        request.url.path_and_query()
    )
    .parse()
    .map_err(|_| HttpErrorKind::BadRequest)?;
    let mut builder = hyper::Request::builder()
        .method(request.method)
        .uri(uri)
        .header(HOST, request.url.authority())
        .header(USER_AGENT, concat!("keyhole/", env!("CARGO_PKG_VERSION")));
    for (name, value) in request.headers {
        builder = builder.header(&*name, value);
    }
    let body = match request.body {
        Some((content_type, body)) => {
            builder = builder
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_LENGTH, body.len());
            Bytes::from(body)
        }
        None => Bytes::new(),
    };
    // The error would only say which part failed to parse; ours says as much.
    builder
        .body(Full::new(body))
        .map_err(|_| HttpErrorKind::BadRequest)
}

/// The client config on the system trust store, built once: loading the
/// store reads hundreds of files. A failure is not kept, so a later call
/// tries again.
fn system_tls() -> Result<Arc<ClientConfig>, HttpErrorKind> {
    static SYSTEM: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    if let Some(config) = SYSTEM.get() {
        return Ok(config.clone());
    }
    let settings = UpstreamTls {
        ca_file: None,
        // Not used to build the config; each connection names its host.
        server_name: String::new(),
        mode: TlsMode::VerifyFull,
        client_cert: None,
    };
    let config = tls::client_config(&settings, None).map_err(|e| {
        HttpErrorKind::Tls(match e {
            TlsSetupError::NoSystemRoots => {
                "the system trust store is empty or unreadable, so no HTTPS server can be verified"
                    .to_owned()
            }
            other => other.to_string(),
        })
    })?;
    Ok(SYSTEM.get_or_init(|| config).clone())
}

fn handshake_failure(tls: &rustls::Error) -> String {
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "TLS handshake failed: the server's certificate is not signed by a CA in the system trust store".to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// What the pooled client's error chain says, found by type where the type
/// is public and by hyper-util's fixed texts where it is not (its
/// `ConnectError` and `TunnelError`; the unit tests pin those texts).
struct Causes<'a> {
    /// hyper-util's "dns error": resolving the host failed.
    dns: bool,
    /// hyper-util's "tcp connect error" (or another "tcp ..." step).
    tcp: bool,
    /// What follows "tunnel error: ".
    tunnel: Option<String>,
    /// The first I/O error.
    io: Option<&'a io::Error>,
    tls: Option<&'a rustls::Error>,
    hyper: Option<&'a hyper::Error>,
    /// Every link's text, for an error nothing above explains.
    text: String,
}

impl<'a> Causes<'a> {
    fn of(err: &'a (dyn StdError + 'static)) -> Causes<'a> {
        let mut causes = Causes {
            dns: false,
            tcp: false,
            tunnel: None,
            io: None,
            tls: None,
            hyper: None,
            text: String::new(),
        };
        let mut next = Some(err);
        // A bound, in case a chain ever loops.
        for _ in 0..16 {
            let Some(e) = next else { break };
            let text = e.to_string();
            causes.dns |= text == "dns error";
            causes.tcp |= text.starts_with("tcp ");
            if causes.tunnel.is_none() {
                causes.tunnel = text.strip_prefix("tunnel error: ").map(str::to_owned);
            }
            if !causes.text.contains(&text) {
                if !causes.text.is_empty() {
                    causes.text.push_str(": ");
                }
                causes.text.push_str(&text);
            }
            causes.tls = causes.tls.or_else(|| e.downcast_ref());
            causes.hyper = causes.hyper.or_else(|| e.downcast_ref());
            next = match e.downcast_ref::<io::Error>() {
                // An I/O error's `source` skips the error it wraps.
                Some(io) => {
                    causes.io = causes.io.or(Some(io));
                    io.get_ref().map(|inner| inner as &(dyn StdError + 'static))
                }
                None => e.source(),
            };
        }
        causes
    }

    /// The I/O error, owned (an OS error exactly; another by kind and text).
    fn io_error(&self) -> io::Error {
        match self.io {
            Some(e) => match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            },
            None => io::Error::other(self.text.clone()),
        }
    }

    /// A TCP connection that failed: refused, or something else.
    fn tcp_failure(&self, host: &str, port: u16) -> HttpErrorKind {
        let addr = host_port(host, port);
        match self.io {
            Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                HttpErrorKind::Refused { addr }
            }
            // hyper-util's own error when the name resolved to nothing.
            Some(e) if e.kind() == io::ErrorKind::NotConnected && e.raw_os_error().is_none() => {
                HttpErrorKind::NoAddress {
                    host: host.to_owned(),
                }
            }
            _ => HttpErrorKind::Connect {
                addr,
                source: self.io_error(),
            },
        }
    }
}

/// Maps the pooled client's error onto this module's kinds: resolving and
/// connecting to the destination (the kinds the metadata hints match on),
/// the proxy, TLS, or the exchange itself.
fn failure(
    err: &legacy::Error,
    causes: &Causes<'_>,
    url: &Url,
    proxy: Option<&Proxy>,
    status: Option<StatusCode>,
) -> HttpErrorKind {
    if !err.is_connect() {
        return match causes.hyper {
            Some(e) => exchange_failure(e),
            None => HttpErrorKind::Exchange(causes.text.clone()),
        };
    }
    if let Some(proxy) = proxy {
        if let Some(tunnel) = &causes.tunnel {
            return HttpErrorKind::Proxy(proxy_failure(proxy, tunnel, causes, url, status));
        }
    } else if causes.dns {
        return HttpErrorKind::Resolve {
            host: url.host().to_owned(),
            source: causes.io_error(),
        };
    } else if causes.tcp {
        return causes.tcp_failure(url.host(), url.port());
    }
    match causes.tls {
        Some(tls) => HttpErrorKind::Tls(handshake_failure(tls)),
        None if url.is_https() => {
            HttpErrorKind::Tls(format!("TLS handshake failed: {}", causes.io_error()))
        }
        None => HttpErrorKind::Exchange(causes.text.clone()),
    }
}

/// hyper-util's words for a CONNECT answered with a status other than 200
/// or 407.
const UNSUCCESSFUL: &str = "unsuccessful";

/// Why the tunnel through `proxy` did not open, from the tunnel's own words
/// and, when it only says "unsuccessful", the `status` the proxy answered
/// when asked again.
fn proxy_failure(
    proxy: &Proxy,
    tunnel: &str,
    causes: &Causes<'_>,
    url: &Url,
    status: Option<StatusCode>,
) -> String {
    let named = proxy.describe();
    let variable = proxy.variable();
    let target = host_port(url.host(), url.port());
    let credentials = |status: StatusCode| match proxy.auth() {
        Some(_) => format!(
            "{named} refused the user name and password in {variable} ({})",
            shown(status)
        ),
        None => format!(
            "{named} requires a user name and password ({}); \
             give them in {variable} as http://USER:PASSWORD@HOST:PORT",
            shown(status)
        ),
    };
    match tunnel {
        "failed to create underlying connection" => {
            let why = if causes.dns {
                HttpErrorKind::Resolve {
                    host: proxy.host().to_owned(),
                    source: causes.io_error(),
                }
            } else {
                causes.tcp_failure(proxy.host(), proxy.port())
            };
            format!("cannot reach {named}: {why}")
        }
        "proxy authorization required" => credentials(StatusCode::PROXY_AUTHENTICATION_REQUIRED),
        UNSUCCESSFUL => match status {
            // Some proxies (tinyproxy) answer wrong credentials with 401.
            Some(
                status @ (StatusCode::UNAUTHORIZED | StatusCode::PROXY_AUTHENTICATION_REQUIRED),
            ) => credentials(status),
            Some(
                status @ (StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT),
            ) => {
                format!("{named} cannot reach {target} ({})", shown(status))
            }
            Some(status @ StatusCode::FORBIDDEN) => format!(
                "{named} refused to open a tunnel to {target} ({}: it does not allow \
                 that host or port)",
                shown(status)
            ),
            Some(status) => format!(
                "{named} refused to open a tunnel to {target} ({})",
                shown(status)
            ),
            None => format!(
                "{named} refused to open a tunnel to {target} (its answer to CONNECT was not 200)"
            ),
        },
        "unexpected end of file" => {
            format!("{named} closed the connection before answering CONNECT")
        }
        "proxy response headers too long" => {
            format!("{named} answered CONNECT with headers too long to be a proxy's")
        }
        "io error establishing tunnel" => {
            format!(
                "the CONNECT exchange with {named} failed: {}",
                causes.io_error()
            )
        }
        other => format!("the CONNECT exchange with {named} failed: {other}"),
    }
}

/// The status the proxy answers a `CONNECT` to `url` with, asked on a
/// connection of its own (closed at once; 5 s at most). `None` when it
/// cannot be had.
async fn connect_status(proxy: &Proxy, url: &Url) -> Option<StatusCode> {
    let ask = async {
        let mut tcp = tokio::net::TcpStream::connect((proxy.host(), proxy.port()))
            .await
            .ok()?;
        let target = host_port(url.host(), url.port());
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
        if let Some(auth) = proxy.auth() {
            head.extend_from_slice(b"Proxy-Authorization: ");
            head.extend_from_slice(auth.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        tcp.write_all(&head).await.ok()?;
        // "HTTP/1.1 407" is all that is needed.
        let mut line = Vec::new();
        let mut chunk = [0u8; 64];
        while line.len() < 12 {
            let n = tcp.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            line.extend_from_slice(&chunk[..n]);
        }
        status_of(&line)
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .ok()
        .flatten()
}

/// "407 Proxy Authentication Required"; "599" for a code without a name.
fn shown(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The status code of a reply that starts `HTTP/1.x NNN`.
fn status_of(reply: &[u8]) -> Option<StatusCode> {
    let rest = reply
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| reply.strip_prefix(b"HTTP/1.0 "))?;
    StatusCode::from_bytes(rest.get(..3)?).ok()
}

async fn read_capped(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<Response, HttpErrorKind> {
    let status = response.status();
    let declared = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(HttpErrorKind::TooLarge);
    }
    let mut body = response.into_body();
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| exchange_failure(&e))?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > MAX_BODY {
                return Err(HttpErrorKind::TooLarge);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(Response {
        status,
        body: Bytes::from(collected),
    })
}

/// hyper's own text for each error is fixed; an I/O cause is added, as it is
/// the part that explains (a reset, a TLS alert).
fn exchange_failure(err: &hyper::Error) -> HttpErrorKind {
    let text = if err.is_parse() || err.is_parse_status() {
        format!("the reply is not HTTP/1.1 ({err})")
    } else if err.is_incomplete_message() {
        "the connection closed before the reply was complete".to_owned()
    } else {
        let io = std::error::Error::source(err).and_then(|s| s.downcast_ref::<io::Error>());
        match io {
            Some(io) => format!("{err}: {io}"),
            None => err.to_string(),
        }
    };
    HttpErrorKind::Exchange(text)
}

/// A one-connection HTTP server for tests of this module and its callers.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    /// What the server does once it has written its reply.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum After {
        Close,
        /// Keeps the connection open (for a minute) without a word more.
        HoldOpen,
    }

    /// A complete HTTP/1.1 reply with a Content-Length.
    pub(crate) fn reply(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// Listens on `bind` (port 0), accepts one connection, reads one request
    /// (head and Content-Length body), writes `reply` and then does `after`.
    /// The receiver gets the request as text.
    pub(crate) async fn serve_on(
        bind: &str,
        reply: Vec<u8>,
        after: After,
    ) -> std::io::Result<(SocketAddr, oneshot::Receiver<String>)> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let request = read_request(&mut tcp).await;
            let _ = tx.send(request);
            let _ = tcp.write_all(&reply).await;
            let _ = tcp.flush().await;
            match after {
                After::Close => drop(tcp),
                After::HoldOpen => {
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                    drop(tcp);
                }
            }
        });
        Ok((addr, rx))
    }

    /// [`serve_on`] 127.0.0.1.
    pub(crate) async fn serve(
        reply: Vec<u8>,
        after: After,
    ) -> (SocketAddr, oneshot::Receiver<String>) {
        serve_on("127.0.0.1:0", reply, after)
            .await
            .expect("bind a test server on 127.0.0.1")
    }

    /// An address on which nothing listens.
    pub(crate) async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        drop(listener);
        addr
    }

    async fn read_request<S: AsyncReadExt + Unpin>(stream: &mut S) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    break;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }
}

/// Google's error body `{"error": {"status", "details": [{"reason"}],
/// "errors": [{"reason"}]}}`: the `status` and each `reason` that is a short
/// identifier. The message is the service's prose and is not shown.
pub(crate) fn google_error_codes(body: &[u8]) -> Vec<String> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let identifier = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
            .map(str::to_owned)
    };
    let mut codes: Vec<String> = identifier(value.pointer("/error/status"))
        .into_iter()
        .collect();
    let reasons = ["/error/details", "/error/errors"]
        .iter()
        .filter_map(|pointer| value.pointer(pointer).and_then(serde_json::Value::as_array))
        .flatten()
        .filter_map(|entry| identifier(entry.get("reason")));
    for reason in reasons {
        if !codes.contains(&reason) {
            codes.push(reason);
        }
    }
    codes
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::testing::{closed_port, reply, serve, serve_on, After};
    use super::*;
    use crate::config::CertKey;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    /// Within a generous bound, so a hang fails the test instead of the suite.
    async fn bounded(request: Request) -> Result<Response, HttpError> {
        tokio::time::timeout(Duration::from_secs(5), send(request))
            .await
            .expect("send returned within 5 s")
    }

    #[test]
    fn parses_scheme_host_port_and_path() {
        let u = url("http://metadata.google.internal/computeMetadata/v1/x?scopes=a%20b");
        assert!(!u.is_https());
        assert_eq!(u.host(), "metadata.google.internal");
        assert_eq!(u.port(), 80);
        assert_eq!(u.path_and_query(), "/computeMetadata/v1/x?scopes=a%20b");
        assert_eq!(u.authority(), "metadata.google.internal");

        let u = url("HTTPS://oauth2.googleapis.com");
        assert!(u.is_https());
        assert_eq!(u.port(), 443);
        assert_eq!(u.path_and_query(), "/");

        let u = url("https://example.com:8443/token#frag");
        assert_eq!(u.port(), 8443);
        assert_eq!(u.path_and_query(), "/token");
        assert_eq!(u.authority(), "example.com:8443");

        let u = url("http://10.0.0.1:80?x=1");
        assert_eq!(u.host(), "10.0.0.1");
        assert_eq!(u.path_and_query(), "/?x=1");
        assert_eq!(u.authority(), "10.0.0.1");
    }

    #[test]
    fn parses_ipv6_literals() {
        let u = url("http://[::1]:8080/token");
        assert_eq!(u.host(), "::1");
        assert_eq!(u.port(), 8080);
        assert_eq!(u.authority(), "[::1]:8080");
        assert_eq!(u.to_string(), "http://[::1]:8080/token");

        let u = url("https://[fd00:ec2::254]");
        assert_eq!(u.host(), "fd00:ec2::254");
        assert_eq!(u.port(), 443);
        assert_eq!(u.authority(), "[fd00:ec2::254]");
    }

    #[test]
    fn refuses_bad_urls() {
        for (text, why) in [
            ("metadata.google.internal/x", "no http:// or https://"),
            ("ftp://example.com/", "only http:// and https://"),
            ("http:///path", "no host"),
            ("http://:80/", "no host"),
            ("http://example.com:99999/", "between 1 and 65535"),
            ("http://example.com:0/", "between 1 and 65535"),
            ("http://example.com:/", "not a number"),
            ("http://example.com:8o/", "not a number"),
            ("http://::1/", "must be in brackets"),
            ("http://[::1/", "closing ']'"),
            ("http://[example.com]/", "not an IPv6 address"),
            ("http://[::1]x/", "only ':port'"),
            ("http://user:pw@example.com/", "credentials in a URL"),
            ("http://exa mple.com/", "not a name or an address"),
            ("http://example.com/a b", "a space"),
            ("http://example.com/é", "not ASCII"),
        ] {
            let err = Url::parse(text).expect_err(text).to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn display_and_errors_leave_out_the_query() {
        let u = url("https://example.com/token?key=hunter2");
        assert_eq!(u.to_string(), "https://example.com/token");
        assert_eq!(format!("{u:?}"), "Url(https://example.com/token)");
        let err = Url::parse("ftp://example.com/x?key=hunter2").expect_err("ftp");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn form_encoding_keeps_only_unreserved_characters() {
        assert_eq!(percent_encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(
            percent_encode("a b+c/d:e=f&g?h%"),
            "a%20b%2Bc%2Fd%3Ae%3Df%26g%3Fh%25"
        );
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(
            form_encode(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", "a.b_c-d"),
            ]),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=a.b_c-d"
        );
        assert_eq!(form_encode(&[]), "");
    }

    #[tokio::test]
    async fn posts_a_form_and_reads_the_reply() {
        let body = r#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#;
        let (addr, request) = serve(reply("200 OK", body), After::Close).await;
        let u = url(&format!("http://{addr}/token"));
        let response = bounded(Request::post_form(u, &[("a", "1 2"), ("b", "x/y")]))
            .await
            .expect("a reply");
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(&response.body[..], body.as_bytes());
        assert!(!format!("{response:?}").contains("ya29"));

        let request = request.await.expect("the request");
        let lower = request.to_ascii_lowercase();
        assert!(request.starts_with("POST /token HTTP/1.1\r\n"), "{request}");
        assert!(
            lower.contains(&format!("\r\nhost: {addr}\r\n")),
            "{request}"
        );
        // Kept alive for the next request.
        assert!(!lower.contains("\r\nconnection:"), "{request}");
        assert!(
            lower.contains("\r\ncontent-type: application/x-www-form-urlencoded\r\n"),
            "{request}"
        );
        assert!(lower.contains("\r\ncontent-length: 15\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\na=1%202&b=x%2Fy"), "{request}");
    }

    #[tokio::test]
    async fn gets_with_headers_over_ipv6() {
        // Some sandboxes have no IPv6 loopback; there is nothing to test then.
        let Ok((addr, request)) = serve_on("[::1]:0", reply("200 OK", "{}"), After::Close).await
        else {
            return;
        };
        let u = url(&format!(
            "http://[::1]:{}/v1/token?scopes=a%2Fb",
            addr.port()
        ));
        let response = bounded(Request::get(u).header("Metadata-Flavor", "Google"))
            .await
            .expect("a reply");
        assert_eq!(response.status, StatusCode::OK);
        let request = request.await.expect("the request");
        assert!(
            request.starts_with("GET /v1/token?scopes=a%2Fb HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("\r\nhost: [::1]:{}\r\n", addr.port())),
            "{request}"
        );
        assert!(
            lower.contains("\r\nmetadata-flavor: google\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn an_error_status_is_a_reply() {
        let (addr, _) = serve(
            reply("500 Internal Server Error", r#"{"error":"invalid_grant"}"#),
            After::Close,
        )
        .await;
        let response = bounded(Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect("a reply");
        assert_eq!(response.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(&response.body[..], br#"{"error":"invalid_grant"}"#);
    }

    #[tokio::test]
    async fn does_not_wait_for_the_peer_to_close_after_the_body() {
        let (addr, _) = serve(reply("200 OK", "{}"), After::HoldOpen).await;
        let started = std::time::Instant::now();
        let response = bounded(Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect("a reply");
        assert_eq!(&response.body[..], b"{}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn garbage_is_not_http() {
        let (addr, _) = serve(b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(), After::Close).await;
        let err = bounded(Request::get(url(&format!("http://{addr}/token?k=v"))))
            .await
            .expect_err("garbage");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("http://{addr}/token: the reply is not HTTP/1.1")),
            "{text}"
        );
        assert!(!text.contains("OpenSSH") && !text.contains("k=v"), "{text}");
    }

    #[tokio::test]
    async fn a_cut_reply_is_incomplete() {
        let (addr, _) = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"access".to_vec(),
            After::Close,
        )
        .await;
        let err = bounded(Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect_err("cut short");
        assert!(matches!(err.kind(), HttpErrorKind::Exchange(_)), "{err:?}");
        assert!(!err.to_string().contains("access"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let addr = closed_port().await;
        let err = bounded(Request::get(url(&format!(
            "http://{addr}/token?refresh_token=1//secret"
        ))))
        .await
        .expect_err("refused");
        assert!(
            matches!(err.kind(), HttpErrorKind::Refused { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("http://{addr}/token: connection to {addr} refused")
        );
        assert_eq!(err.url(), format!("http://{addr}/token"));
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        // Declared up front.
        let big = "x".repeat(MAX_BODY + 1);
        let (addr, _) = serve(reply("200 OK", &big), After::Close).await;
        let err = bounded(Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect_err("too large");
        assert!(matches!(err.kind(), HttpErrorKind::TooLarge), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("http://{addr}/: the reply is larger than 64 KiB")
        );

        // Not declared: read until the peer closes, or the cap.
        let mut undeclared = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        undeclared.extend_from_slice(big.as_bytes());
        let (addr, _) = serve(undeclared, After::HoldOpen).await;
        let err = bounded(Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect_err("too large");
        assert!(matches!(err.kind(), HttpErrorKind::TooLarge), "{err:?}");

        // Exactly at the cap is fine.
        let (addr, _) = serve(reply("200 OK", &big[1..]), After::Close).await;
        let response = bounded(Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect("at the cap");
        assert_eq!(response.body.len(), MAX_BODY);
    }

    #[tokio::test]
    async fn a_header_value_with_a_newline_is_refused_without_showing_it() {
        let (addr, _) = serve(reply("200 OK", "{}"), After::Close).await;
        let err = bounded(
            Request::get(url(&format!("http://{addr}/"))).header("Authorization", "a\r\nb: secret"),
        )
        .await
        .expect_err("bad header");
        assert!(matches!(err.kind(), HttpErrorKind::BadRequest), "{err:?}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    /// A TLS server on 127.0.0.1 with a certificate from the project's own
    /// test PKI script; answers one request.
    async fn tls_server(dir: &Path) -> SocketAddr {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/generate.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir)
            .output()
            .expect("run certs/generate.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = tls::server_config(
            &CertKey {
                cert: dir.join("server.crt"),
                key: dir.join("server.key"),
            },
            None,
        )
        .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            // Two connections at most: the trusted one and the untrusted one.
            for _ in 0..2 {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
                    let _ = tls.write_all(&reply("200 OK", r#"{"ok":true}"#)).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_verifies_the_server() {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = tls_server(dir.path()).await;
        let u = url(&format!("https://127.0.0.1:{}/token", addr.port()));

        let trusting = tls::client_config(
            &UpstreamTls {
                ca_file: Some(dir.path().join("ca.crt")),
                server_name: "127.0.0.1".into(),
                mode: TlsMode::VerifyFull,
                client_cert: None,
            },
            None,
        )
        .expect("client config");
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            send_with(Request::get(u.clone()), Some(trusting)),
        )
        .await
        .expect("in time")
        .expect("a reply over TLS");
        assert_eq!(&response.body[..], br#"{"ok":true}"#);

        // The system trust store does not know the test CA.
        let err = bounded(Request::get(u)).await.expect_err("untrusted");
        assert!(matches!(err.kind(), HttpErrorKind::Tls(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("not signed by a CA in the system trust store")
                || text.contains("system trust store is empty"),
            "{text}"
        );
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    async fn bounded_on(client: &Client, request: Request) -> Result<Response, HttpError> {
        tokio::time::timeout(Duration::from_secs(5), client.send(request))
            .await
            .expect("send returned within 5 s")
    }

    /// A fake proxy: on every connection, reads the CONNECT head, answers
    /// `answer`, and on a 200 pipes the connection to the target it names.
    /// The receiver gets the first head as text.
    async fn fake_proxy(
        answer: &'static str,
    ) -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let first = Arc::new(std::sync::Mutex::new(Some(tx)));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(fake_proxy_connection(client, answer, first.clone()));
            }
        });
        (addr, rx)
    }

    async fn fake_proxy_connection(
        mut client: tokio::net::TcpStream,
        answer: &'static str,
        first: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<String>>>>,
    ) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match tokio::io::AsyncReadExt::read(&mut client, &mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let target = head
            .strip_prefix("CONNECT ")
            .and_then(|rest| rest.split(' ').next())
            .map(str::to_owned);
        if let Some(tx) = first.lock().ok().and_then(|mut f| f.take()) {
            let _ = tx.send(head);
        }
        let _ = client.write_all(answer.as_bytes()).await;
        if !answer.starts_with("HTTP/1.1 200") {
            return;
        }
        let Some(target) = target else { return };
        let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }

    #[tokio::test]
    async fn http_goes_through_a_connect_tunnel_with_the_proxy_credentials() {
        let (target, request) = serve(reply("200 OK", "{}"), After::Close).await;
        let (proxy, head) = fake_proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
        let client = client_for(&env(&[(
            "HTTP_PROXY",
            &format!("http://keyhole:s%3Dcret@{proxy}"),
        )]));
        let response = bounded_on(
            &client,
            Request::get(url(&format!("http://{target}/v1/token?k=v"))),
        )
        .await
        .expect("a reply through the tunnel");
        assert_eq!(&response.body[..], b"{}");

        let head = head.await.expect("the CONNECT");
        assert!(
            head.starts_with(&format!("CONNECT {target} HTTP/1.1\r\n")),
            "{head}"
        );
        // base64("keyhole:s=cret")
        assert!(
            head.contains("\r\nProxy-Authorization: Basic a2V5aG9sZTpzPWNyZXQ=\r\n"),
            "{head}"
        );
        // Inside the tunnel: origin form, the destination's Host, no proxy
        // credentials.
        let request = request.await.expect("the request");
        assert!(
            request.starts_with("GET /v1/token?k=v HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("\r\nhost: {target}\r\n")),
            "{request}"
        );
        assert!(!lower.contains("proxy-authorization"), "{request}");
        assert!(!format!("{client:?}").contains("keyhole"), "{client:?}");
    }

    #[tokio::test]
    async fn the_default_port_is_written_out_in_the_connect() {
        // Port 80 is not listened on here; the CONNECT line is what counts.
        let (proxy, head) = fake_proxy("HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let client = client_for(&env(&[("HTTP_PROXY", &format!("{proxy}"))]));
        let err = bounded_on(&client, Request::get(url("http://metadata.invalid/x")))
            .await
            .expect_err("refused");
        let head = head.await.expect("the CONNECT");
        assert!(
            head.starts_with("CONNECT metadata.invalid:80 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(matches!(err.kind(), HttpErrorKind::Proxy(_)), "{err:?}");
    }

    #[tokio::test]
    async fn proxy_failures_name_the_proxy_and_never_its_credentials() {
        let target = url("http://10.255.255.1:8080/token?refresh_token=SECRET");
        for (answer, credentials, expected) in [
            (
                "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                true,
                "refused the user name and password in HTTP_PROXY (407 Proxy Authentication Required)",
            ),
            (
                "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                false,
                "requires a user name and password (407 Proxy Authentication Required); \
                 give them in HTTP_PROXY as http://USER:PASSWORD@HOST:PORT",
            ),
            (
                "HTTP/1.0 401 Unauthorized\r\n\r\n",
                true,
                "refused the user name and password in HTTP_PROXY (401 Unauthorized)",
            ),
            (
                "HTTP/1.1 403 Forbidden\r\n\r\n",
                true,
                "refused to open a tunnel to 10.255.255.1:8080 (403 Forbidden: it does not allow \
                 that host or port)",
            ),
            (
                "HTTP/1.1 502 Bad Gateway\r\n\r\n",
                false,
                "cannot reach 10.255.255.1:8080 (502 Bad Gateway)",
            ),
            (
                "HTTP/1.1 599 Whatever\r\n\r\n",
                false,
                "refused to open a tunnel to 10.255.255.1:8080 (599)",
            ),
            ("", true, "closed the connection before answering CONNECT"),
        ] {
            let (proxy, _) = fake_proxy(answer).await;
            let value = if credentials {
                format!("http://user:hunter2@{proxy}")
            } else {
                format!("http://{proxy}")
            };
            let client = client_for(&env(&[("HTTP_PROXY", &value)]));
            let err = bounded_on(&client, Request::get(target.clone()))
                .await
                .expect_err(expected);
            assert!(matches!(err.kind(), HttpErrorKind::Proxy(_)), "{err:?}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "http://10.255.255.1:8080/token: the proxy http://{proxy} (HTTP_PROXY) "
                )),
                "{text}"
            );
            assert!(text.contains(expected), "{text}");
            for secret in ["hunter2", "user:", "SECRET"] {
                assert!(!text.contains(secret), "{text}");
                assert!(!format!("{err:?}").contains(secret), "{err:?}");
            }
        }
    }

    #[test]
    fn a_connect_status_is_read_from_the_status_line() {
        assert_eq!(
            status_of(b"HTTP/1.1 407 Proxy"),
            Some(StatusCode::PROXY_AUTHENTICATION_REQUIRED)
        );
        assert_eq!(
            status_of(b"HTTP/1.0 401 Unauthorized\r\n"),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status_of(b"HTTP/1.1 20"), None);
        assert_eq!(status_of(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_of(b""), None);
    }

    #[tokio::test]
    async fn a_dead_proxy_is_named_and_its_refusal_is_not_the_destinations() {
        let proxy = closed_port().await;
        let client = client_for(&env(&[
            ("HTTPS_PROXY", &format!("http://user:hunter2@{proxy}")),
            ("HTTP_PROXY", &format!("http://user:hunter2@{proxy}")),
        ]));
        for target in [
            "https://oauth2.googleapis.com/token",
            "http://127.0.0.1:1/x",
        ] {
            let err = bounded_on(&client, Request::get(url(target)))
                .await
                .expect_err("dead proxy");
            assert!(matches!(err.kind(), HttpErrorKind::Proxy(_)), "{err:?}");
            let variable = if target.starts_with("https") {
                "HTTPS_PROXY"
            } else {
                "HTTP_PROXY"
            };
            assert_eq!(
                err.to_string(),
                format!(
                    "{target}: cannot reach the proxy http://{proxy} ({variable}): \
                     connection to {proxy} refused"
                )
            );
        }

        let client = client_for(&env(&[(
            "HTTPS_PROXY",
            "http://user:hunter2@proxy.keyhole-test.invalid:3128",
        )]));
        let err = bounded_on(&client, Request::get(url("https://example.com/")))
            .await
            .expect_err("unresolvable proxy");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "https://example.com/: cannot reach the proxy \
                 http://proxy.keyhole-test.invalid:3128 (HTTPS_PROXY): \
                 cannot resolve proxy.keyhole-test.invalid: "
            ),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[tokio::test]
    async fn an_unusable_proxy_variable_fails_the_requests_it_covers() {
        let client = client_for(&env(&[
            ("HTTPS_PROXY", "socks5://user:hunter2@127.0.0.1:1080"),
            ("NO_PROXY", "127.0.0.1"),
        ]));
        let err = bounded_on(&client, Request::get(url("https://example.com/")))
            .await
            .expect_err("unusable");
        assert_eq!(
            err.to_string(),
            "https://example.com/: HTTPS_PROXY is set, but only http:// proxies are supported (not SOCKS)"
        );
        // http:// is not its business, and NO_PROXY still applies.
        let (addr, _) = serve(reply("200 OK", "{}"), After::Close).await;
        bounded_on(&client, Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect("direct");
    }

    #[tokio::test]
    async fn no_proxy_sends_a_request_around_the_proxy() {
        let (addr, _) = serve(reply("200 OK", "{}"), After::Close).await;
        let proxy = closed_port().await;
        let proxied = client_for(&env(&[("HTTP_PROXY", &format!("http://{proxy}"))]));
        let err = bounded_on(&proxied, Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect_err("through the dead proxy");
        assert!(matches!(err.kind(), HttpErrorKind::Proxy(_)), "{err:?}");
        for list in ["127.0.0.1", "127.0.0.1:PORT", "*", "localhost,127.0.0.0/8"] {
            let (addr, _) = serve(reply("200 OK", "{}"), After::Close).await;
            let no_proxy = list.replace("PORT", &addr.port().to_string());
            let client = client_for(&env(&[
                ("HTTP_PROXY", &format!("http://{proxy}")),
                ("NO_PROXY", &no_proxy),
            ]));
            bounded_on(&client, Request::get(url(&format!("http://{addr}/"))))
                .await
                .unwrap_or_else(|e| panic!("NO_PROXY={list}: {e}"));
        }
        // Another port of the same host is not covered.
        let client = client_for(&env(&[
            ("HTTP_PROXY", &format!("http://{proxy}")),
            ("NO_PROXY", &format!("127.0.0.1:{}", proxy.port())),
        ]));
        let err = bounded_on(&client, Request::get(url(&format!("http://{addr}/"))))
            .await
            .expect_err("through the dead proxy");
        assert!(matches!(err.kind(), HttpErrorKind::Proxy(_)), "{err:?}");
    }

    #[tokio::test]
    async fn https_through_a_tunnel_is_verified_end_to_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = tls_server(dir.path()).await;
        let (proxy, head) = fake_proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
        let trusting = tls::client_config(
            &UpstreamTls {
                ca_file: Some(dir.path().join("ca.crt")),
                server_name: "127.0.0.1".into(),
                mode: TlsMode::VerifyFull,
                client_cert: None,
            },
            None,
        )
        .expect("client config");
        let client = client_with_tls(
            &env(&[("HTTPS_PROXY", &format!("http://{proxy}"))]),
            trusting,
        );
        let response = bounded_on(
            &client,
            Request::get(url(&format!("https://127.0.0.1:{}/token", addr.port()))),
        )
        .await
        .expect("a reply over TLS through the tunnel");
        assert_eq!(&response.body[..], br#"{"ok":true}"#);
        let head = head.await.expect("the CONNECT");
        assert!(
            head.starts_with(&format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n", addr.port())),
            "{head}"
        );

        // Through the tunnel too, the system trust store does not know the
        // test CA.
        let (proxy, _) = fake_proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
        let client = client_for(&env(&[("HTTPS_PROXY", &format!("http://{proxy}"))]));
        let err = bounded_on(
            &client,
            Request::get(url(&format!("https://127.0.0.1:{}/token", addr.port()))),
        )
        .await
        .expect_err("untrusted");
        assert!(matches!(err.kind(), HttpErrorKind::Tls(_)), "{err:?}");
    }

    /// Accepts connections until dropped, counting them; answers every
    /// request on a connection (kept alive) with `{}`.
    async fn keep_alive_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if tcp.write_all(&reply("200 OK", "{}")).await.is_err() {
                                return;
                            }
                        }
                        match tokio::io::AsyncReadExt::read(&mut tcp, &mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn connections_are_kept_alive_and_reused() {
        let (addr, accepted) = keep_alive_server().await;
        let client = client_for(&HashMap::new());
        for _ in 0..3 {
            let response = bounded_on(&client, Request::get(url(&format!("http://{addr}/x"))))
                .await
                .expect("a reply");
            assert_eq!(&response.body[..], b"{}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
