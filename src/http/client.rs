//! A small HTTP/1.1 client: credential endpoints (the metadata server and
//! OAuth2 token endpoints) and keyhole's own health and admin endpoints.
//!
//! One request per connection (`Connection: close`), http:// or https://
//! (verified against the system trust store with the ring provider), and a
//! reply body capped at [`MAX_BODY`]: a credential endpoint answers with a
//! few hundred bytes of JSON, and a broken or hostile one must not make
//! keyhole buffer without bound. There is no timeout here; callers bound the
//! whole exchange with `tokio::time::timeout`. Nothing waits on the peer once
//! the reply body is complete: the connection is driven inside [`send`]'s own
//! future and dropped with it, so no task outlives the call.
//!
//! Requests and replies carry secrets (refresh tokens, client secrets, access
//! tokens, and occasionally a secret in a query string), so [`HttpError`]
//! names the URL without its query and never holds a body or a header value,
//! and [`Request`] and [`Response`] do not show their contents in `Debug`.

use std::fmt;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::pin::pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{host_port, TlsMode, UpstreamTls};
use crate::tls::{self, TlsSetupError};

/// The largest reply body [`send`] accepts. Token replies are well under 4 KiB.
pub(crate) const MAX_BODY: usize = 64 * 1024;

const FORM: &str = "application/x-www-form-urlencoded";

/// An `http://` or `https://` URL, split into what a request needs.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Url {
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
pub(crate) struct UrlError {
    shown: String,
    reason: &'static str,
}

impl Url {
    /// Parses `scheme://host[:port][/path][?query][#fragment]`, where host
    /// is a name, an IPv4 address or a bracketed IPv6 address. The path and
    /// query are kept as given (already percent-encoded); the fragment is
    /// dropped, as it is never sent.
    pub(crate) fn parse(text: &str) -> Result<Url, UrlError> {
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

    pub(crate) fn is_https(&self) -> bool {
        self.https
    }

    /// The host name or address, without brackets.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// `host[:port]` as the `Host` header wants it: brackets around an IPv6
    /// address, the port only when it is not the scheme's default.
    pub(crate) fn authority(&self) -> String {
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
pub(crate) fn percent_encode(text: &str) -> String {
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
pub(crate) fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One request. `Host`, `Connection: close`, `User-Agent` and, with a body,
/// `Content-Type` and `Content-Length` are set by [`send`].
pub(crate) struct Request {
    method: Method,
    url: Url,
    headers: Vec<(&'static str, String)>,
    body: Option<(&'static str, Vec<u8>)>,
}

impl Request {
    pub(crate) fn new(method: Method, url: Url) -> Request {
        Request {
            method,
            url,
            headers: Vec::new(),
            body: None,
        }
    }

    pub(crate) fn get(url: Url) -> Request {
        Request::new(Method::GET, url)
    }

    /// A POST of an `application/x-www-form-urlencoded` body.
    pub(crate) fn post_form(url: Url, pairs: &[(&str, &str)]) -> Request {
        Request::new(Method::POST, url).body(FORM, form_encode(pairs).into_bytes())
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Request {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn body(mut self, content_type: &'static str, body: Vec<u8>) -> Request {
        self.body = Some((content_type, body));
        self
    }

    pub(crate) fn url(&self) -> &Url {
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
pub(crate) struct Response {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
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
pub(crate) struct HttpError {
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
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn kind(&self) -> &HttpErrorKind {
        &self.kind
    }
}

/// What went wrong, in words that never include a body or a header value.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpErrorKind {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("connection to {addr} refused")]
    Refused { addr: SocketAddr },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
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

/// Sends one request and reads the whole reply (status and body).
pub(crate) async fn send(request: Request) -> Result<Response, HttpError> {
    send_with(request, None).await
}

/// [`send`], with `tls` in place of the system trust store (for tests).
async fn send_with(
    request: Request,
    tls: Option<Arc<ClientConfig>>,
) -> Result<Response, HttpError> {
    let url = request.url.clone();
    let hyper_request = build(request).map_err(|kind| HttpError::new(&url, kind))?;
    let tcp = connect(&url)
        .await
        .map_err(|kind| HttpError::new(&url, kind))?;
    let outcome = if url.is_https() {
        let config = match tls {
            Some(config) => config,
            None => system_tls().map_err(|kind| HttpError::new(&url, kind))?,
        };
        let name = tls::server_name(url.host())
            .map_err(|e| HttpError::new(&url, HttpErrorKind::Tls(e.to_string())))?;
        let stream = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| HttpError::new(&url, HttpErrorKind::Tls(handshake_failure(&e))))?;
        exchange(stream, hyper_request).await
    } else {
        exchange(tcp, hyper_request).await
    };
    outcome.map_err(|kind| HttpError::new(&url, kind))
}

fn build(request: Request) -> Result<hyper::Request<Full<Bytes>>, HttpErrorKind> {
    let mut builder = hyper::Request::builder()
        .method(request.method)
        .uri(request.url.path_and_query())
        .header(HOST, request.url.authority())
        .header(CONNECTION, "close")
        .header(USER_AGENT, concat!("keyhole/", env!("CARGO_PKG_VERSION")));
    for (name, value) in request.headers {
        builder = builder.header(name, value);
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

/// Resolves the host and connects to the first address that answers.
async fn connect(url: &Url) -> Result<TcpStream, HttpErrorKind> {
    let host = url.host();
    let addrs = tokio::net::lookup_host((host, url.port()))
        .await
        .map_err(|source| HttpErrorKind::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                // Requests are one small write each; do not let Nagle hold them.
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                last = Some(HttpErrorKind::Refused { addr })
            }
            Err(source) => last = Some(HttpErrorKind::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| HttpErrorKind::NoAddress {
        host: host.to_owned(),
    }))
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

fn handshake_failure(err: &io::Error) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return format!("TLS handshake failed: {err}");
    };
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "TLS handshake failed: the server's certificate is not signed by a CA in the system trust store".to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// One request and its reply over an open stream. The connection future is
/// polled alongside the reply and dropped as soon as the body is complete,
/// whether or not the peer has closed.
async fn exchange<S>(
    stream: S,
    request: hyper::Request<Full<Bytes>>,
) -> Result<Response, HttpErrorKind>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| exchange_failure(&e))?;
    let reply = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| exchange_failure(&e))?;
        read_capped(response).await
    };
    let mut connection = pin!(connection);
    let mut reply = pin!(reply);
    // When the connection ends in an error first, that error says more than
    // the "connection closed" the reply then sees.
    let mut connection_failure = None;
    let mut connection_done = false;
    loop {
        tokio::select! {
            result = &mut reply => {
                return result.map_err(|kind| match (kind, connection_failure) {
                    (HttpErrorKind::Exchange(_), Some(failure)) => failure,
                    (kind, _) => kind,
                });
            }
            outcome = &mut connection, if !connection_done => {
                connection_done = true;
                if let Err(e) = outcome {
                    connection_failure = Some(exchange_failure(&e));
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
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
        assert!(lower.contains("\r\nconnection: close\r\n"), "{request}");
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
}
