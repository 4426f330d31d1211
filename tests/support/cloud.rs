//! In-process fakes of the cloud endpoints keyhole takes credentials from,
//! written from the documented contracts (see `REFERENCE.md`): the ECS/Fargate
//! container credentials endpoint, EC2 IMDSv2, STS, the GCE metadata server,
//! Google's OAuth2 token endpoint and the IAM Service Account Credentials API.
//!
//! Each fake is a tiny HTTP/1.1 server on 127.0.0.1 (a port from
//! [`free_port`](super::free_port)) with its own tokio runtime that lives as
//! long as the fake: one request per connection, `Connection: close`. It logs
//! every request it parses, mints its secrets randomly (so a test can grep
//! keyhole's logs for them) and stops when dropped.
//!
//! # API
//!
//! - [`HttpFake`], which every fake derefs to: `port()`, `url()`
//!   (`http://127.0.0.1:PORT`), `requests() -> Vec<Request>`,
//!   `clear_requests()`, `errors() -> Vec<String>` (connections it could not
//!   serve), `set_mode(Mode)`, `mode()`.
//! - [`Mode`]: `Normal`, `Down` (the port is closed: connections are refused;
//!   `set_mode(Normal)` listens on the same port again), `Slow(Duration)`
//!   (reads the request, waits, then answers normally), `Garbage` (200 with a
//!   body that is neither JSON nor XML), `Status(u16)` (that status, a text
//!   body). `set_mode` returns once the server has applied it.
//! - [`Request`]: `method`, `path`, `query`, `headers` (names lower-case),
//!   `body`; `header(name)`, `query_param(name)`, `form_param(name)`, `form()`,
//!   `is_form()`, `body_text()`.
//! - [`AwsCredentials`]`{ access_key_id, secret_access_key, session_token }`
//!   (`generate()`, `signer(region) -> sigv4::RdsSigner`; `Debug` redacts).
//!   The AWS fakes share `credentials()`, `rotate() -> AwsCredentials` (new
//!   random keys from now on) and `set_lifetime(Duration)` (each answer's
//!   `Expiration` is now + lifetime, 1 hour by default).
//! - [`FakeEcs`]`::start(path, authorization: Option<&str>)`: `GET path` → JSON
//!   `AccessKeyId, SecretAccessKey, Token, Expiration, RoleArn`; a wrong or
//!   missing `Authorization` (when one is required) → 401. `full_uri()` for
//!   `AWS_CONTAINER_CREDENTIALS_FULL_URI`, `authorization()`.
//! - [`FakeImds`]`::start()` / `start_with_role(role)`: IMDSv2. `PUT
//!   /latest/api/token` needs `x-aws-ec2-metadata-token-ttl-seconds` (1 to
//!   21600, else 400) and answers a token with that header echoed; every `GET`
//!   needs an issued `x-aws-ec2-metadata-token` (else 401):
//!   `/latest/meta-data/iam/security-credentials/` → role name, `.../<role>` →
//!   JSON with `Code: Success`, `Type: AWS-HMAC`, `LastUpdated`, the keys and
//!   `Expiration`; `/latest/meta-data/placement/region` → `region()`.
//!   `role()`, `issued_tokens()`.
//! - [`FakeSts`]`::start()`: `POST /` with a form body (declared
//!   `application/x-www-form-urlencoded`, else 400). `Action=
//!   AssumeRoleWithWebIdentity` needs `RoleArn`, `RoleSessionName` and
//!   `WebIdentityToken` = `web_identity_token()`; `Action=AssumeRole` needs
//!   `RoleArn` and `RoleSessionName`, and after `require_signature_from(key,
//!   secret)` a valid SigV4 `Authorization` by that key. Answers are STS's XML
//!   (`...Response` → `...Result` → `Credentials`, `AssumedRoleUser`); errors
//!   are STS `ErrorResponse` XML with 400 (`MissingParameter`,
//!   `InvalidIdentityToken`, `InvalidAction`, `InvalidRequest`) or 403
//!   (`MissingAuthenticationToken`, `InvalidClientTokenId`,
//!   `SignatureDoesNotMatch`). `write_web_identity_token_file(dir)`,
//!   `role_arn()` (a suggestion; any ARN is accepted).
//! - [`FakeGcpMetadata`]`::start()`: `GET /computeMetadata/v1/instance/
//!   service-accounts/default/token[?scopes=...]` → JSON `access_token,
//!   expires_in, token_type`; `.../default/email`; `/computeMetadata/v1/
//!   project/project-id`; `/` (detection). Every `/computeMetadata/` request
//!   needs `Metadata-Flavor: Google` (else 403); every answer carries it, in
//!   the failure modes too.
//!   `host()` (for `GCE_METADATA_HOST`), `access_token()`, `rotate()`,
//!   `set_expires_in(secs)`, `email()`, `project_id()`, `scopes_requested()`.
//! - [`FakeOAuth`]`::start()`: `POST /token` with a form body (declared
//!   `application/x-www-form-urlencoded`, else 400). `grant_type=urn:ietf:params:
//!   oauth:grant-type:jwt-bearer` with an `assertion` that [`verify_assertion`]
//!   accepts, or `grant_type=refresh_token` with the right `client_id`,
//!   `client_secret` (form fields or HTTP Basic) and `refresh_token`, → JSON
//!   `access_token, expires_in, token_type, scope`; otherwise 400
//!   `{"error":"invalid_grant","error_description":<which check failed>}`
//!   (`unsupported_grant_type` for another grant, `invalid_request` for a
//!   missing assertion or a body that is not a form). `start_with_key(key)`,
//!   `token_url()`, `key()`, `client_id()`, `client_secret()`,
//!   `refresh_token()`, `access_token()`, `rotate()`, `set_expires_in(secs)`,
//!   `write_service_account_json(dir) -> PathBuf`,
//!   `write_authorized_user_json(dir) -> PathBuf`.
//! - [`FakeIamCredentials`]`::start(base_token, target, delegates)`: `POST
//!   /v1/projects/-/serviceAccounts/{email}:generateAccessToken` (`%XX` in
//!   the path decoded first) with a JSON body (declared `application/json`)
//!   `{"delegates", "scope", "lifetime"}` → JSON `accessToken, expireTime`
//!   (RFC 3339, now + `lifetime`, 3600 s by default). Check order: the path
//!   and POST (else 404 `NOT_FOUND`), `Authorization: Bearer <base_token>`
//!   (else 401 `UNAUTHENTICATED`), the injected failure, the JSON body (else
//!   400 `INVALID_ARGUMENT`), `{email}` = `target` (else 404 `NOT_FOUND`),
//!   `delegates` = `projects/-/serviceAccounts/<email>` for each of
//!   `delegates`, in that order, first hop first (else 403
//!   `PERMISSION_DENIED`), a non-empty `scope` list (else 400), `lifetime`
//!   `1s` to `3600s` if given (else 400). Errors are Google's JSON error body
//!   `{"error": {code, message, status}}`; a 403 also carries `details:
//!   [{"@type": ...ErrorInfo, reason: IAM_PERMISSION_DENIED, domain:
//!   iam.googleapis.com}]`. `token_for(scope)` (the token minted for that
//!   scope list, joined by spaces; the same every time, made on first use),
//!   `minted()`, `bodies() -> Vec<Value>` (every `generateAccessToken`
//!   body, in order), `set_failure(Option<`[`IamFailure`]`>)`
//!   (`PermissionDenied` → 403, `NotFound` → 404, after the bearer check).
//!   [`CLOUD_PLATFORM_SCOPE`].
//! - [`ServiceAccountKey`]`::generate(client_email)`: an RSA-2048 key made by
//!   `openssl` (PKCS#8 PEM, and the PKCS#1 `RSAPublicKey` DER ring verifies
//!   with); `sign_jwt(claims)`, `assertion(token_url, scope, iat)`,
//!   `service_account_json(token_uri)`, `ring_public_key()`.
//! - [`verify_assertion`]`(jwt, key, token_url, now) -> Result<Value, String>`:
//!   the RS256 signature, `iss`, `aud`, the `sqlservice.login` scope, `iat` and
//!   `exp`; returns the claims.
//! - [`random_string`]`(len, alphabet)` (and `try_random_string`, for code
//!   that must not panic), [`write_json`]`(path, value)`,
//!   [`SQL_LOGIN_SCOPE`], [`JWT_BEARER`].

use std::collections::HashSet;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, RsaKeyPair, UnparsedPublicKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::process::{describe_output, output_with_timeout};
use super::sigv4;

/// The OAuth2 scope of Cloud SQL IAM database login.
pub const SQL_LOGIN_SCOPE: &str = "https://www.googleapis.com/auth/sqlservice.login";
/// The `grant_type` of a service account's JWT exchange.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Upper-case letters and digits 2-7, as in AWS access key ids.
const KEY_ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Base64's alphabet: secrets and session tokens need `/` and `+` encoded.
const BASE64_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// Base64url's alphabet, for Google tokens.
const URL_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A body that no JSON or XML parser accepts.
const GARBAGE: &str = "this is not JSON {{ nor XML <<";
/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request line plus headers, at most.
const MAX_HEAD: usize = 64 * 1024;
/// Request bodies, at most.
const MAX_BODY: usize = 1024 * 1024;
/// Default validity of AWS credentials the fakes hand out.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The account id in every ARN the fakes make up.
const ACCOUNT: &str = "123456789012";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `len` characters drawn from `alphabet` with ring's system randomness; None
/// if the system has no randomness to give (never, in practice).
pub fn try_random_string(len: usize, alphabet: &[u8]) -> Option<String> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(
        bytes
            .iter()
            .map(|b| char::from(alphabet[usize::from(*b) % alphabet.len()]))
            .collect(),
    )
}

/// [`try_random_string`] for setup code, where failing is fine.
pub fn random_string(len: usize, alphabet: &[u8]) -> String {
    try_random_string(len, alphabet).expect("system randomness")
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &Value) {
    let text = serde_json::to_string_pretty(value).expect("serialize JSON");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Decodes an `application/x-www-form-urlencoded` string (`+` is a space);
/// a malformed escape is kept as written.
fn form_decode(text: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let spaced = s.replace('+', " ");
        sigv4::percent_decode(&spaced).unwrap_or(spaced)
    };
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(n), decode(v))
        })
        .collect()
}

// --- the HTTP server --------------------------------------------------------------

/// What a fake does with the next connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer by the contract.
    Normal,
    /// Nothing listens on the port: connections are refused.
    Down,
    /// Read the request, wait this long, then answer by the contract.
    Slow(Duration),
    /// 200 with a body that is neither JSON nor XML.
    Garbage,
    /// This status with a short text body.
    Status(u16),
}

/// One request a fake received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query, without `?` (empty if none).
    pub query: String,
    /// Header names in lower case, values trimmed, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_decode(&self.query)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The body as a decoded form.
    pub fn form(&self) -> Vec<(String, String)> {
        form_decode(&self.body_text())
    }

    /// One field of the body's form, decoded.
    pub fn form_param(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Whether the body is declared `application/x-www-form-urlencoded`.
    pub fn is_form(&self) -> bool {
        self.header("content-type").is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        })
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a fake answers.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    pub fn text(status: u16, text: &str) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: text.as_bytes().to_vec(),
        }
    }

    pub fn xml(status: u16, text: String) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "text/xml".into())],
            body: text.into_bytes(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// The Content-Type of garbage answers, and headers every answer carries.
type Style = (&'static str, &'static [(&'static str, &'static str)]);

struct Shared {
    name: &'static str,
    requests: Mutex<Vec<Request>>,
    errors: Mutex<Vec<String>>,
    /// The generation of the last mode the accept loop has applied.
    applied: AtomicU64,
    listening: AtomicBool,
}

impl Shared {
    fn error(&self, what: String) {
        lock(&self.errors).push(what);
    }
}

/// The HTTP/1.1 server under every fake (see the module docs).
pub struct HttpFake {
    port: u16,
    shared: Arc<Shared>,
    mode: watch::Sender<(u64, Mode)>,
    runtime: Option<Runtime>,
}

impl HttpFake {
    /// Starts a server named `name` (for messages); `make_handler` gets the
    /// port, so handlers can know their own URL. `garbage_type` is the
    /// Content-Type of [`Mode::Garbage`] answers (the fake's usual one);
    /// `always` are headers added to every answer, whatever the mode.
    pub(crate) fn start(
        name: &'static str,
        garbage_type: &'static str,
        always: &'static [(&'static str, &'static str)],
        make_handler: impl FnOnce(u16) -> Handler,
    ) -> HttpFake {
        let runtime = super::runtime();
        let mut attempt = 0;
        let (listener, port) = loop {
            let port = super::free_port();
            match runtime.block_on(TcpListener::bind(("127.0.0.1", port))) {
                Ok(listener) => break (listener, port),
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    eprintln!("{name}: port {port} is taken ({e}), trying another");
                }
                Err(e) => panic!("{name}: bind 127.0.0.1: {e}"),
            }
        };
        let handler = make_handler(port);
        let shared = Arc::new(Shared {
            name,
            requests: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            applied: AtomicU64::new(0),
            listening: AtomicBool::new(true),
        });
        let (tx, rx) = watch::channel((0, Mode::Normal));
        runtime.spawn(accept_loop(
            listener,
            port,
            shared.clone(),
            handler,
            rx,
            (garbage_type, always),
        ));
        HttpFake {
            port,
            shared,
            mode: tx,
            runtime: Some(runtime),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Connections that sent no parsable request, and other server trouble.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.errors).clone()
    }

    pub fn mode(&self) -> Mode {
        self.mode.borrow().1
    }

    /// Switches the failure mode; returns once the server has applied it (the
    /// port is closed for [`Mode::Down`], listening again for the others).
    pub fn set_mode(&self, mode: Mode) {
        let mut generation = 0;
        self.mode.send_modify(|(g, m)| {
            *g += 1;
            *m = mode;
            generation = *g;
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.shared.applied.load(Ordering::SeqCst) < generation {
            assert!(
                Instant::now() < deadline,
                "{}: the server did not apply {mode:?}",
                self.shared.name
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            self.shared.listening.load(Ordering::SeqCst),
            mode != Mode::Down,
            "{}: could not apply {mode:?} on port {}: {:?}",
            self.shared.name,
            self.port,
            self.errors()
        );
    }
}

impl Drop for HttpFake {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Binds `port` again after [`Mode::Down`], retrying a little while in case
/// the kernel is slow to let go of it.
async fn rebind(port: u16, shared: &Shared) -> Option<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return Some(listener),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shared.error(format!("listen on port {port} again: {last:?}"));
    None
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    shared: Arc<Shared>,
    handler: Handler,
    mut modes: watch::Receiver<(u64, Mode)>,
    style: Style,
) {
    let mut listener = Some(listener);
    loop {
        let (generation, mode) = *modes.borrow_and_update();
        if mode == Mode::Down {
            listener = None;
        } else if listener.is_none() {
            listener = rebind(port, &shared).await;
        }
        shared.listening.store(listener.is_some(), Ordering::SeqCst);
        shared.applied.store(generation, Ordering::SeqCst);
        match &listener {
            Some(l) => tokio::select! {
                accepted = l.accept() => match accepted {
                    Ok((socket, _)) => {
                        let mode = modes.borrow().1;
                        tokio::spawn(serve_connection(
                            socket,
                            shared.clone(),
                            handler.clone(),
                            mode,
                            style,
                        ));
                    }
                    Err(e) => {
                        shared.error(format!("accept: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                changed = modes.changed() => if changed.is_err() {
                    return;
                },
            },
            None => {
                if modes.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve_connection(
    socket: TcpStream,
    shared: Arc<Shared>,
    handler: Handler,
    mode: Mode,
    (garbage_type, always): Style,
) {
    let mut reader = BufReader::new(socket);
    let request = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut reader)).await {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            shared.error(format!("unparsable request: {e}"));
            let _ = write_response(reader.get_mut(), &Response::text(400, "bad request")).await;
            return;
        }
        Err(_) => {
            shared.error("no complete request within the time limit".to_owned());
            return;
        }
    };
    lock(&shared.requests).push(request.clone());
    let response = match mode {
        Mode::Normal | Mode::Down => handler(&request),
        Mode::Slow(delay) => {
            tokio::time::sleep(delay).await;
            handler(&request)
        }
        Mode::Garbage => Response {
            status: 200,
            headers: vec![("Content-Type".into(), garbage_type.into())],
            body: GARBAGE.as_bytes().to_vec(),
        },
        Mode::Status(code) => {
            Response::text(code, &format!("{}: forced status {code}", shared.name))
        }
    };
    let mut response = response;
    for (name, value) in always {
        response
            .headers
            .push(((*name).to_owned(), (*value).to_owned()));
    }
    if let Err(e) = write_response(reader.get_mut(), &response).await {
        shared.error(format!("write the response: {e}"));
    }
}

/// One line (CRLF or LF), without its terminator; `None` at end of stream.
async fn read_line(
    reader: &mut BufReader<TcpStream>,
    budget: &mut usize,
) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    let limit = (*budget as u64).saturating_add(1);
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget || line.last() != Some(&b'\n') {
        return Err("request head too long or cut short".to_owned());
    }
    *budget -= n;
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| "request head is not UTF-8".to_owned())
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, String> {
    let mut budget = MAX_HEAD;
    let Some(request_line) = read_line(reader, &mut budget).await? else {
        return Ok(None);
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line '{request_line}'"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not HTTP/1.x: '{version}'"));
    }
    // Absolute form (through a proxy): drop scheme and authority.
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut budget)
            .await?
            .ok_or("connection closed in the headers")?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header line '{line}'"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        reader
            .get_mut()
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|e| format!("write 100 Continue: {e}"))?;
    }
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(reader).await?
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length '{len}'"))?;
        if len > MAX_BODY {
            return Err(format!("body of {len} bytes is too large"));
        }
        let mut body = vec![0u8; len];
        reader
            .read_exact(&mut body)
            .await
            .map_err(|e| format!("read the body: {e}"))?;
        body
    } else {
        Vec::new()
    };
    Ok(Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        body,
    }))
}

async fn read_chunked(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(reader, &mut budget)
            .await?
            .ok_or("connection closed in a chunk header")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size '{size_text}'"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(reader, &mut budget)
                .await?
                .ok_or("connection closed in the trailers")?
                .is_empty()
            {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err("chunked body too large".to_owned());
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .await
            .map_err(|e| format!("read a chunk: {e}"))?;
        let end = read_line(reader, &mut budget)
            .await?
            .ok_or("connection closed after a chunk")?;
        if !end.is_empty() {
            return Err("chunk data longer than its size".to_owned());
        }
    }
}

async fn write_response(socket: &mut TcpStream, response: &Response) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(&response.body).await?;
    socket.flush().await?;
    socket.shutdown().await
}

// --- AWS ----------------------------------------------------------------------------

/// A set of AWS credentials the fakes hand out (and tests sign with).
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AwsCredentials({}, secret and session token redacted)",
            self.access_key_id
        )
    }
}

impl AwsCredentials {
    /// Fresh random temporary credentials: `ASIA` + 16 characters, a
    /// 40-character secret and a long session token, both with `/` and `+`.
    pub fn generate() -> AwsCredentials {
        AwsCredentials {
            access_key_id: format!("ASIA{}", random_string(16, KEY_ID_ALPHABET)),
            secret_access_key: random_string(40, BASE64_ALPHABET),
            session_token: format!("IQoJb3JpZ2luX2Vj{}", random_string(300, BASE64_ALPHABET)),
        }
    }

    /// A signer for RDS tokens with these credentials (session token included).
    pub fn signer(&self, region: &str) -> sigv4::RdsSigner {
        sigv4::RdsSigner {
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            session_token: Some(self.session_token.clone()),
            region: region.to_owned(),
        }
    }
}

/// The credentials an AWS fake currently hands out, and for how long.
struct Issuer {
    state: Mutex<(AwsCredentials, Duration)>,
}

impl Issuer {
    fn new() -> Arc<Issuer> {
        Arc::new(Issuer {
            state: Mutex::new((AwsCredentials::generate(), DEFAULT_LIFETIME)),
        })
    }

    /// The credentials and the expiration to announce now.
    fn current(&self) -> (AwsCredentials, SystemTime) {
        let state = lock(&self.state);
        (state.0.clone(), SystemTime::now() + state.1)
    }
}

/// `credentials()`, `rotate()` and `set_lifetime()` for the AWS fakes.
macro_rules! aws_issuer_methods {
    () => {
        /// The credentials this fake hands out now.
        pub fn credentials(&self) -> AwsCredentials {
            lock(&self.issuer.state).0.clone()
        }

        /// Hands out new random credentials from now on; returns them.
        pub fn rotate(&self) -> AwsCredentials {
            let fresh = AwsCredentials::generate();
            lock(&self.issuer.state).0 = fresh.clone();
            fresh
        }

        /// Each answer's `Expiration` is now + `lifetime` (1 hour by default).
        pub fn set_lifetime(&self, lifetime: Duration) {
            lock(&self.issuer.state).1 = lifetime;
        }
    };
}

/// The ECS / Fargate container credentials endpoint.
pub struct FakeEcs {
    http: HttpFake,
    path: String,
    authorization: Option<String>,
    issuer: Arc<Issuer>,
}

impl Deref for FakeEcs {
    type Target = HttpFake;
    fn deref(&self) -> &HttpFake {
        &self.http
    }
}

impl FakeEcs {
    /// Serves credentials at `path` (e.g. `/v2/credentials/abc`), demanding
    /// `Authorization: <authorization>` when that is `Some`.
    pub fn start(path: &str, authorization: Option<&str>) -> FakeEcs {
        let issuer = Issuer::new();
        let (want_path, want_auth) = (path.to_owned(), authorization.map(str::to_owned));
        let handler_issuer = issuer.clone();
        let http = HttpFake::start("fake ECS endpoint", "application/json", &[], move |_| {
            Arc::new(move |req: &Request| {
                if req.path != want_path {
                    return Response::json(404, &json!({"message": "no such credentials path"}));
                }
                if req.method != "GET" {
                    return Response::json(405, &json!({"message": "method not allowed"}));
                }
                if let Some(want) = &want_auth {
                    if req.header("authorization") != Some(want.as_str()) {
                        return Response::json(
                            401,
                            &json!({"code": "AccessDenied", "message": "invalid authorization token"}),
                        );
                    }
                }
                let (creds, expiration) = handler_issuer.current();
                Response::json(
                    200,
                    &json!({
                        "RoleArn": format!("arn:aws:iam::{ACCOUNT}:role/keyhole-task-role"),
                        "AccessKeyId": creds.access_key_id,
                        "SecretAccessKey": creds.secret_access_key,
                        "Token": creds.session_token,
                        "Expiration": sigv4::iso8601(expiration),
                    }),
                )
            })
        });
        FakeEcs {
            http,
            path: path.to_owned(),
            authorization: authorization.map(str::to_owned),
            issuer,
        }
    }

    /// The value for `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub fn full_uri(&self) -> String {
        format!("{}{}", self.url(), self.path)
    }

    /// The `Authorization` value it demands, if any.
    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref()
    }

    aws_issuer_methods!();
}

/// EC2's instance metadata service, version 2 (session tokens).
pub struct FakeImds {
    http: HttpFake,
    role: String,
    region: String,
    tokens: Arc<Mutex<HashSet<String>>>,
    issuer: Arc<Issuer>,
}

impl Deref for FakeImds {
    type Target = HttpFake;
    fn deref(&self) -> &HttpFake {
        &self.http
    }
}

const IMDS_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const IMDS_CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";

impl FakeImds {
    /// An instance profile whose role is `keyhole-test-role`, in us-east-1.
    pub fn start() -> FakeImds {
        FakeImds::start_with_role("keyhole-test-role")
    }

    pub fn start_with_role(role: &str) -> FakeImds {
        let issuer = Issuer::new();
        let tokens: Arc<Mutex<HashSet<String>>> = Arc::default();
        let region = "us-east-1".to_owned();
        let (h_issuer, h_tokens, h_role, h_region) = (
            issuer.clone(),
            tokens.clone(),
            role.to_owned(),
            region.clone(),
        );
        let http = HttpFake::start("fake IMDS", "text/plain", &[], move |_| {
            Arc::new(move |req: &Request| {
                imds_answer(req, &h_issuer, &h_tokens, &h_role, &h_region)
            })
        });
        FakeImds {
            http,
            role: role.to_owned(),
            region,
            tokens,
            issuer,
        }
    }

    /// The role name `.../security-credentials/` lists.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// What `/latest/meta-data/placement/region` says.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Every session token handed out so far.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.tokens).iter().cloned().collect()
    }

    aws_issuer_methods!();
}

fn imds_answer(
    req: &Request,
    issuer: &Issuer,
    tokens: &Mutex<HashSet<String>>,
    role: &str,
    region: &str,
) -> Response {
    if req.path == "/latest/api/token" {
        if req.method != "PUT" {
            return Response::text(405, "method not allowed");
        }
        let ttl = req
            .header(IMDS_TTL_HEADER)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ttl| (1..=21_600).contains(ttl));
        let Some(ttl) = ttl else {
            return Response::text(400, "missing or invalid token TTL");
        };
        let Some(token) = try_random_string(56, URL_ALPHABET) else {
            return Response::text(500, "no randomness");
        };
        let token = format!("AQAEA{token}==");
        lock(tokens).insert(token.clone());
        return Response::text(200, &token).with_header(IMDS_TTL_HEADER, &ttl.to_string());
    }
    if req.method != "GET" {
        return Response::text(405, "method not allowed");
    }
    let authorized = req
        .header("x-aws-ec2-metadata-token")
        .is_some_and(|t| lock(tokens).contains(t));
    if !authorized {
        return Response::text(401, "Unauthorized");
    }
    match req.path.as_str() {
        IMDS_CREDENTIALS => Response::text(200, role),
        "/latest/meta-data/placement/region" => Response::text(200, region),
        path => match path.strip_prefix(IMDS_CREDENTIALS) {
            Some(name) if name == role => {
                let (creds, expiration) = issuer.current();
                let json = json!({
                    "Code": "Success",
                    "LastUpdated": sigv4::iso8601(SystemTime::now()),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": creds.access_key_id,
                    "SecretAccessKey": creds.secret_access_key,
                    "Token": creds.session_token,
                    "Expiration": sigv4::iso8601(expiration),
                });
                // IMDS answers JSON as text/plain.
                let mut response = Response::json(200, &json);
                response.headers[0].1 = "text/plain".into();
                response
            }
            _ => Response::text(404, "Not Found"),
        },
    }
}

/// AWS STS: `AssumeRoleWithWebIdentity` and `AssumeRole`.
pub struct FakeSts {
    http: HttpFake,
    web_identity_token: String,
    signed_by: Arc<Mutex<Option<(String, String)>>>,
    issuer: Arc<Issuer>,
}

impl Deref for FakeSts {
    type Target = HttpFake;
    fn deref(&self) -> &HttpFake {
        &self.http
    }
}

impl FakeSts {
    pub fn start() -> FakeSts {
        let issuer = Issuer::new();
        let web_identity_token = format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.{}",
            random_string(120, URL_ALPHABET),
            random_string(80, URL_ALPHABET)
        );
        let signed_by: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let (h_issuer, h_token, h_signed) = (
            issuer.clone(),
            web_identity_token.clone(),
            signed_by.clone(),
        );
        let http = HttpFake::start("fake STS", "text/xml", &[], move |_| {
            Arc::new(move |req: &Request| sts_answer(req, &h_issuer, &h_token, &h_signed))
        });
        FakeSts {
            http,
            web_identity_token,
            signed_by,
            issuer,
        }
    }

    /// The only `WebIdentityToken` accepted.
    pub fn web_identity_token(&self) -> &str {
        &self.web_identity_token
    }

    /// Writes the web identity token to `dir/web-identity-token` (for
    /// `AWS_WEB_IDENTITY_TOKEN_FILE`).
    pub fn write_web_identity_token_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("web-identity-token");
        std::fs::write(&path, &self.web_identity_token)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// A role ARN to configure (any well-formed one is accepted).
    pub fn role_arn(&self) -> String {
        format!("arn:aws:iam::{ACCOUNT}:role/keyhole-test-role")
    }

    /// From now on `AssumeRole` must carry a valid SigV4 `Authorization`
    /// made with these source credentials.
    pub fn require_signature_from(&self, access_key_id: &str, secret: &str) {
        *lock(&self.signed_by) = Some((access_key_id.to_owned(), secret.to_owned()));
    }

    aws_issuer_methods!();
}

fn sts_error(status: u16, code: &str, message: &str) -> Response {
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    Response::xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{code}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{}</RequestId>\n</ErrorResponse>\n",
            xml_escape(message),
            request_id()
        ),
    )
}

fn request_id() -> String {
    try_random_string(32, b"0123456789abcdef")
        .map(|s| {
            format!(
                "{}-{}-{}-{}-{}",
                &s[..8],
                &s[8..12],
                &s[12..16],
                &s[16..20],
                &s[20..]
            )
        })
        .unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".to_owned())
}

fn sts_answer(
    req: &Request,
    issuer: &Issuer,
    web_identity_token: &str,
    signed_by: &Mutex<Option<(String, String)>>,
) -> Response {
    if req.path != "/" {
        return sts_error(404, "NotFound", "no such path");
    }
    if req.method != "POST" {
        return sts_error(405, "MethodNotAllowed", "use POST");
    }
    if !req.is_form() {
        return sts_error(
            400,
            "InvalidRequest",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let form = req.form();
    let param = |name: &str| {
        form.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let action = param("Action").unwrap_or_default();
    if action != "AssumeRoleWithWebIdentity" && action != "AssumeRole" {
        return sts_error(
            400,
            "InvalidAction",
            &format!("Could not find operation {action}"),
        );
    }
    let (Some(role_arn), Some(session)) = (param("RoleArn"), param("RoleSessionName")) else {
        return sts_error(
            400,
            "MissingParameter",
            "RoleArn and RoleSessionName are required",
        );
    };
    if !role_arn.starts_with("arn:") {
        return sts_error(400, "ValidationError", "RoleArn is not an ARN");
    }
    if action == "AssumeRoleWithWebIdentity" {
        match param("WebIdentityToken") {
            None => return sts_error(400, "MissingParameter", "WebIdentityToken is required"),
            Some(t) if t != web_identity_token => {
                return sts_error(
                    400,
                    "InvalidIdentityToken",
                    "The web identity token is not valid",
                )
            }
            Some(_) => {}
        }
    } else if let Some((key_id, secret)) = lock(signed_by).clone() {
        let signed = sigv4::SignedRequest {
            method: &req.method,
            path: &req.path,
            query: &req.query,
            headers: &req.headers,
            body: &req.body,
        };
        if req.header("authorization").is_none() {
            return sts_error(
                403,
                "MissingAuthenticationToken",
                "Request is missing Authentication Token",
            );
        }
        if let Err(why) =
            sigv4::verify_header_signature(&signed, &key_id, &secret, SystemTime::now())
        {
            let code = if why.starts_with("signed with access key") {
                "InvalidClientTokenId"
            } else {
                "SignatureDoesNotMatch"
            };
            return sts_error(403, code, &why);
        }
    }
    let role_name = role_arn.rsplit('/').next().unwrap_or(role_arn);
    let (creds, expiration) = issuer.current();
    let role_id = format!(
        "AROA{}",
        try_random_string(17, KEY_ID_ALPHABET).unwrap_or_default()
    );
    let extra = if action == "AssumeRoleWithWebIdentity" {
        "    <SubjectFromWebIdentityToken>system:serviceaccount:default:keyhole</SubjectFromWebIdentityToken>\n    <Audience>sts.amazonaws.com</Audience>\n    <Provider>arn:aws:iam::123456789012:oidc-provider/oidc.example</Provider>\n"
    } else {
        ""
    };
    Response::xml(
        200,
        format!(
            "<{action}Response xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <{action}Result>\n{extra}    <AssumedRoleUser>\n      <Arn>arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{session}</Arn>\n      <AssumedRoleId>{role_id}:{session}</AssumedRoleId>\n    </AssumedRoleUser>\n    <Credentials>\n      <AccessKeyId>{akid}</AccessKeyId>\n      <SecretAccessKey>{secret}</SecretAccessKey>\n      <SessionToken>{token}</SessionToken>\n      <Expiration>{expiration}</Expiration>\n    </Credentials>\n  </{action}Result>\n  <ResponseMetadata>\n    <RequestId>{request}</RequestId>\n  </ResponseMetadata>\n</{action}Response>\n",
            role = xml_escape(role_name),
            session = xml_escape(session),
            akid = creds.access_key_id,
            secret = xml_escape(&creds.secret_access_key),
            token = xml_escape(&creds.session_token),
            expiration = sigv4::iso8601(expiration),
            request = request_id(),
        ),
    )
}

// --- Google ----------------------------------------------------------------------------

/// A Google access token as the fakes mint them.
fn google_access_token() -> String {
    format!("ya29.{}", random_string(120, URL_ALPHABET))
}

/// The token a Google fake hands out and its announced lifetime.
struct GoogleState {
    access_token: String,
    expires_in: u64,
}

fn new_google_state() -> Arc<Mutex<GoogleState>> {
    Arc::new(Mutex::new(GoogleState {
        access_token: google_access_token(),
        expires_in: 3599,
    }))
}

/// `access_token()`, `rotate()` and `set_expires_in()` for the Google fakes.
macro_rules! google_token_methods {
    () => {
        /// The access token it hands out now.
        pub fn access_token(&self) -> String {
            lock(&self.state).access_token.clone()
        }

        /// Hands out a new random access token from now on; returns it.
        pub fn rotate(&self) -> String {
            let fresh = google_access_token();
            lock(&self.state).access_token = fresh.clone();
            fresh
        }

        /// The `expires_in` it announces (3599 by default).
        pub fn set_expires_in(&self, secs: u64) {
            lock(&self.state).expires_in = secs;
        }
    };
}

/// The GCE metadata server (Cloud Run, GCE, GKE).
pub struct FakeGcpMetadata {
    http: HttpFake,
    state: Arc<Mutex<GoogleState>>,
    email: String,
    project_id: String,
}

impl Deref for FakeGcpMetadata {
    type Target = HttpFake;
    fn deref(&self) -> &HttpFake {
        &self.http
    }
}

const METADATA_PREFIX: &str = "/computeMetadata/v1/";

impl FakeGcpMetadata {
    pub fn start() -> FakeGcpMetadata {
        let state = new_google_state();
        let project_id = "keyhole-test-project".to_owned();
        let email = format!("keyhole-test@{project_id}.iam.gserviceaccount.com");
        let (h_state, h_email, h_project) = (state.clone(), email.clone(), project_id.clone());
        let http = HttpFake::start(
            "fake GCE metadata server",
            "application/json",
            &[("Metadata-Flavor", "Google")],
            move |_| {
                Arc::new(move |req: &Request| metadata_answer(req, &h_state, &h_email, &h_project))
            },
        );
        FakeGcpMetadata {
            http,
            state,
            email,
            project_id,
        }
    }

    /// `127.0.0.1:PORT`, the form `GCE_METADATA_HOST` takes.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The default service account's email.
    pub fn email(&self) -> &str {
        &self.email
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// The `scopes` parameter of every token request, in order (`None` for a
    /// request without one).
    pub fn scopes_requested(&self) -> Vec<Option<String>> {
        self.requests()
            .iter()
            .filter(|r| r.path.ends_with("/token"))
            .map(|r| r.query_param("scopes"))
            .collect()
    }

    google_token_methods!();
}

fn metadata_answer(
    req: &Request,
    state: &Mutex<GoogleState>,
    email: &str,
    project_id: &str,
) -> Response {
    if req.method != "GET" {
        return Response::text(405, "method not allowed");
    }
    if req.path == "/" {
        return Response::text(200, "computeMetadata/\n");
    }
    let Some(rest) = req.path.strip_prefix(METADATA_PREFIX) else {
        return Response::text(404, "Not Found");
    };
    if !req
        .header("metadata-flavor")
        .is_some_and(|v| v.eq_ignore_ascii_case("Google"))
    {
        return Response::text(403, "Missing Metadata-Flavor:Google header.");
    }
    let account = |r: &str| {
        r.strip_prefix("instance/service-accounts/")
            .and_then(|r| r.split_once('/'))
            .filter(|(who, _)| *who == "default" || *who == email)
            .map(|(_, what)| what.to_owned())
    };
    match (rest, account(rest).as_deref()) {
        ("project/project-id", _) => Response::text(200, project_id),
        (_, Some("token")) => {
            let state = lock(state);
            Response::json(
                200,
                &json!({
                    "access_token": state.access_token,
                    "expires_in": state.expires_in,
                    "token_type": "Bearer",
                }),
            )
        }
        (_, Some("email")) => Response::text(200, email),
        _ => Response::text(404, "Not Found"),
    }
}

/// A service account's RSA key, made with `openssl`.
#[derive(Clone)]
pub struct ServiceAccountKey {
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as in a key file.
    pub private_key_pem: String,
    /// PKCS#1 `RSAPublicKey` DER (what ring's `UnparsedPublicKey` wants).
    pub public_key_der: Vec<u8>,
    pub private_key_id: String,
    pub client_email: String,
    pub project_id: String,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServiceAccountKey({}, key id {}, private key redacted)",
            self.client_email, self.private_key_id
        )
    }
}

impl ServiceAccountKey {
    /// A fresh RSA-2048 key for `client_email` (`name@project.iam.gserviceaccount.com`;
    /// the project is read from it).
    pub fn generate(client_email: &str) -> ServiceAccountKey {
        let dir = super::scratch_dir("keyhole-sa-key-");
        let (key, public) = (dir.path().join("key.pem"), dir.path().join("public.der"));
        let run = |args: &[&str]| {
            let mut cmd = Command::new("openssl");
            cmd.args(args);
            let out = output_with_timeout(&mut cmd, Duration::from_secs(60));
            assert!(
                out.status.success(),
                "openssl {args:?} failed:\n{}",
                describe_output(&out)
            );
        };
        let (key_arg, public_arg) = (
            key.to_str().expect("UTF-8 path"),
            public.to_str().expect("UTF-8 path"),
        );
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key_arg,
        ]);
        run(&[
            "rsa",
            "-in",
            key_arg,
            "-RSAPublicKey_out",
            "-outform",
            "DER",
            "-out",
            public_arg,
        ]);
        let project_id = client_email
            .split_once('@')
            .and_then(|(_, domain)| domain.split('.').next())
            .unwrap_or("keyhole-test-project")
            .to_owned();
        ServiceAccountKey {
            private_key_pem: std::fs::read_to_string(&key).expect("read the private key"),
            public_key_der: std::fs::read(&public).expect("read the public key"),
            private_key_id: random_string(40, b"0123456789abcdef"),
            client_email: client_email.to_owned(),
            project_id,
        }
    }

    fn key_pair(&self) -> RsaKeyPair {
        let der = PrivatePkcs8KeyDer::from_pem_slice(self.private_key_pem.as_bytes())
            .expect("a PKCS#8 PEM key");
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("an RSA key ring accepts")
    }

    /// The public key as ring derives it from the private key (PKCS#1 DER):
    /// must equal `public_key_der`.
    pub fn ring_public_key(&self) -> Vec<u8> {
        self.key_pair().public().as_ref().to_vec()
    }

    /// A compact RS256 JWT of `claims`, header `{"alg":"RS256","typ":"JWT","kid":...}`.
    pub fn sign_jwt(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let pair = self.key_pair();
        let mut sig = vec![0u8; pair.public().modulus_len()];
        pair.sign(
            &signature::RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .expect("sign the JWT");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// The assertion a client sends to `token_url`: `iss` = the email, `scope`,
    /// `aud` = `token_url`, `iat`, `exp` = `iat` + 1 hour.
    pub fn assertion(&self, token_url: &str, scope: &str, iat: SystemTime) -> String {
        let iat = unix_secs(iat);
        self.sign_jwt(&json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": token_url,
            "iat": iat,
            "exp": iat + 3600,
        }))
    }

    /// A `type=service_account` key file's JSON, its `token_uri` set.
    pub fn service_account_json(&self, token_uri: &str) -> Value {
        json!({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        })
    }
}

/// Checks a service account's JWT assertion as Google's token endpoint does:
/// RS256 header (a `kid`, if any, must be the key's id), signature by `key`,
/// `iss` = the key's email, `aud` = `token_url`, `scope` contains
/// [`SQL_LOGIN_SCOPE`], `iat` not more than 5 minutes ahead of `now`, `exp`
/// after `now` and after `iat` by at most an hour. Returns the claims.
pub fn verify_assertion(
    jwt: &str,
    key: &ServiceAccountKey,
    token_url: &str,
    now: SystemTime,
) -> Result<Value, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header_b64, claims_b64, sig_b64] = parts[..] else {
        return Err("not a JWT of three parts".to_owned());
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| format!("the {what} is not base64url: {e}"))
    };
    let header: Value = serde_json::from_slice(&decode(header_b64, "header")?)
        .map_err(|e| format!("the header is not JSON: {e}"))?;
    if header["alg"] != "RS256" {
        return Err(format!("alg is {}, not RS256", header["alg"]));
    }
    if let Some(kid) = header.get("kid") {
        if kid != key.private_key_id.as_str() {
            return Err("kid is not the key's private_key_id".to_owned());
        }
    }
    let sig = decode(sig_b64, "signature")?;
    UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &key.public_key_der)
        .verify(format!("{header_b64}.{claims_b64}").as_bytes(), &sig)
        .map_err(|_| "invalid JWT signature".to_owned())?;
    let claims: Value = serde_json::from_slice(&decode(claims_b64, "claim set")?)
        .map_err(|e| format!("the claim set is not JSON: {e}"))?;
    if claims["iss"] != key.client_email.as_str() {
        return Err(format!("iss is {}, not the service account", claims["iss"]));
    }
    if claims["aud"] != token_url {
        return Err(format!("aud is {}, not {token_url}", claims["aud"]));
    }
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope.split(' ').any(|s| s == SQL_LOGIN_SCOPE) {
        return Err(format!("scope '{scope}' lacks {SQL_LOGIN_SCOPE}"));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err("iat and exp must be integers".to_owned());
    };
    let now = unix_secs(now);
    if iat > now + 300 {
        return Err("iat is in the future".to_owned());
    }
    if exp <= now {
        return Err("the assertion has expired".to_owned());
    }
    if exp <= iat || exp - iat > 3600 {
        return Err("exp must be after iat, by at most an hour".to_owned());
    }
    Ok(claims)
}

/// Google's OAuth2 token endpoint, for one service account key and one
/// `authorized_user` (gcloud ADC) client.
pub struct FakeOAuth {
    http: HttpFake,
    key: ServiceAccountKey,
    client_id: String,
    client_secret: String,
    refresh_token: String,
    state: Arc<Mutex<GoogleState>>,
}

impl Deref for FakeOAuth {
    type Target = HttpFake;
    fn deref(&self) -> &HttpFake {
        &self.http
    }
}

/// What the OAuth fake's handler checks against.
struct OAuthExpect {
    key: ServiceAccountKey,
    client_id: String,
    client_secret: String,
    refresh_token: String,
    token_url: String,
}

impl FakeOAuth {
    /// With a fresh key for `keyhole-test@keyhole-test-project.iam.gserviceaccount.com`.
    pub fn start() -> FakeOAuth {
        FakeOAuth::start_with_key(ServiceAccountKey::generate(
            "keyhole-test@keyhole-test-project.iam.gserviceaccount.com",
        ))
    }

    pub fn start_with_key(key: ServiceAccountKey) -> FakeOAuth {
        let state = new_google_state();
        let client_id = format!(
            "{}-{}.apps.googleusercontent.com",
            random_string(12, b"0123456789"),
            random_string(32, b"abcdefghijklmnopqrstuvwxyz0123456789")
        );
        let client_secret = format!("GOCSPX-{}", random_string(28, URL_ALPHABET));
        let refresh_token = format!("1//{}", random_string(100, URL_ALPHABET));
        let h_state = state.clone();
        let (k, id, secret, refresh) = (
            key.clone(),
            client_id.clone(),
            client_secret.clone(),
            refresh_token.clone(),
        );
        let http = HttpFake::start(
            "fake OAuth2 token endpoint",
            "application/json",
            &[],
            move |port| {
                let expect = OAuthExpect {
                    key: k,
                    client_id: id,
                    client_secret: secret,
                    refresh_token: refresh,
                    token_url: format!("http://127.0.0.1:{port}/token"),
                };
                Arc::new(move |req: &Request| oauth_answer(req, &expect, &h_state))
            },
        );
        FakeOAuth {
            http,
            key,
            client_id,
            client_secret,
            refresh_token,
            state,
        }
    }

    /// `http://127.0.0.1:PORT/token`: the `token_uri` and the JWT's `aud`.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.url())
    }

    pub fn key(&self) -> &ServiceAccountKey {
        &self.key
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn client_secret(&self) -> &str {
        &self.client_secret
    }

    pub fn refresh_token(&self) -> &str {
        &self.refresh_token
    }

    /// Writes `dir/service-account.json` (`type=service_account`, this fake's
    /// key, `token_uri` = [`FakeOAuth::token_url`]).
    pub fn write_service_account_json(&self, dir: &Path) -> PathBuf {
        let path = dir.join("service-account.json");
        write_json(&path, &self.key.service_account_json(&self.token_url()));
        path
    }

    /// Writes `dir/application_default_credentials.json` (`type=authorized_user`,
    /// `token_uri` = [`FakeOAuth::token_url`]).
    pub fn write_authorized_user_json(&self, dir: &Path) -> PathBuf {
        let path = dir.join("application_default_credentials.json");
        write_json(
            &path,
            &json!({
                "type": "authorized_user",
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "refresh_token": self.refresh_token,
                "token_uri": self.token_url(),
            }),
        );
        path
    }

    google_token_methods!();
}

fn oauth_error(error: &str, description: &str) -> Response {
    Response::json(
        400,
        &json!({"error": error, "error_description": description}),
    )
}

fn oauth_answer(req: &Request, expect: &OAuthExpect, state: &Mutex<GoogleState>) -> Response {
    if req.path != "/token" {
        return Response::json(404, &json!({"error": "not_found"}));
    }
    if req.method != "POST" {
        return Response::json(405, &json!({"error": "method_not_allowed"}));
    }
    if !req.is_form() {
        return oauth_error(
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let form = req.form();
    let param = |name: &str| {
        form.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let scope = match param("grant_type") {
        Some(JWT_BEARER) => {
            let Some(assertion) = param("assertion") else {
                return oauth_error("invalid_request", "Missing required parameter: assertion");
            };
            match verify_assertion(assertion, &expect.key, &expect.token_url, SystemTime::now()) {
                Ok(claims) => claims["scope"].as_str().unwrap_or_default().to_owned(),
                Err(why) => return oauth_error("invalid_grant", &why),
            }
        }
        Some("refresh_token") => {
            // Client authentication: form fields, or HTTP Basic.
            let basic = req
                .header("authorization")
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| STANDARD.decode(b.trim()).ok())
                .and_then(|b| String::from_utf8(b).ok());
            let (id, secret) = match &basic {
                Some(pair) => pair.split_once(':').unwrap_or((pair.as_str(), "")),
                None => (
                    param("client_id").unwrap_or_default(),
                    param("client_secret").unwrap_or_default(),
                ),
            };
            if id != expect.client_id || secret != expect.client_secret {
                return oauth_error("invalid_grant", "unknown client_id or wrong client_secret");
            }
            if param("refresh_token") != Some(expect.refresh_token.as_str()) {
                return oauth_error("invalid_grant", "Bad Request");
            }
            param("scope")
                .unwrap_or("openid https://www.googleapis.com/auth/cloud-platform")
                .to_owned()
        }
        Some(other) => {
            return oauth_error(
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            )
        }
        None => return oauth_error("unsupported_grant_type", "Missing grant_type"),
    };
    let state = lock(state);
    Response::json(
        200,
        &json!({
            "access_token": state.access_token,
            "expires_in": state.expires_in,
            "token_type": "Bearer",
            "scope": scope,
        }),
    )
}

// --- IAM Service Account Credentials API -------------------------------------------

/// The scope a base token needs for the IAM Credentials API.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// What the IAM fake answers instead of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IamFailure {
    /// 403 `PERMISSION_DENIED`, `ErrorInfo` reason `IAM_PERMISSION_DENIED`:
    /// the caller lacks `iam.serviceAccounts.getAccessToken` somewhere on the
    /// chain.
    PermissionDenied,
    /// 404 `NOT_FOUND`: the service account does not exist.
    NotFound,
}

/// The IAM Service Account Credentials API's `generateAccessToken`, for one
/// target service account reached through one delegation chain.
pub struct FakeIamCredentials {
    http: HttpFake,
    state: Arc<IamState>,
}

impl Deref for FakeIamCredentials {
    type Target = HttpFake;
    fn deref(&self) -> &HttpFake {
        &self.http
    }
}

struct IamState {
    /// The bearer token of the caller (the base credentials).
    base_token: String,
    target: String,
    /// As the request must list them: `projects/-/serviceAccounts/EMAIL`,
    /// first hop first.
    delegates: Vec<String>,
    failure: Mutex<Option<IamFailure>>,
    /// The token minted for each scope list (joined by spaces).
    minted: Mutex<std::collections::HashMap<String, String>>,
}

impl IamState {
    fn token_for(&self, scopes: &str) -> String {
        lock(&self.minted)
            .entry(scopes.to_owned())
            .or_insert_with(google_access_token)
            .clone()
    }
}

fn iam_error(code: u16, status: &str, message: &str) -> Response {
    let mut error = json!({"code": code, "message": message, "status": status});
    if status == "PERMISSION_DENIED" {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com",
            "metadata": {"permission": "iam.serviceAccounts.getAccessToken"},
        }]);
    }
    Response::json(code, &json!({ "error": error }))
}

const IAM_DENIED: &str =
    "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).";

impl FakeIamCredentials {
    /// Accepts `Authorization: Bearer <base_token>` and mints tokens for
    /// `target`, reached through `delegates` (emails, first hop first, as
    /// the request lists them; empty for none).
    pub fn start(base_token: &str, target: &str, delegates: &[&str]) -> FakeIamCredentials {
        let state = Arc::new(IamState {
            base_token: base_token.to_owned(),
            target: target.to_owned(),
            delegates: delegates
                .iter()
                .map(|d| format!("projects/-/serviceAccounts/{d}"))
                .collect(),
            failure: Mutex::new(None),
            minted: Mutex::new(std::collections::HashMap::new()),
        });
        let h_state = state.clone();
        let http = HttpFake::start(
            "fake IAM Credentials API",
            "application/json",
            &[],
            move |_| Arc::new(move |req: &Request| iam_answer(req, &h_state)),
        );
        FakeIamCredentials { http, state }
    }

    /// The access token it mints for `scope` (the same one every time).
    pub fn token_for(&self, scope: &str) -> String {
        self.state.token_for(scope)
    }

    /// Every token it has minted so far.
    pub fn minted(&self) -> Vec<String> {
        lock(&self.state.minted).values().cloned().collect()
    }

    /// Answer this failure (after the bearer check) until set back to `None`.
    pub fn set_failure(&self, failure: Option<IamFailure>) {
        *lock(&self.state.failure) = failure;
    }

    /// The JSON body of every `generateAccessToken` request, in order
    /// (`Value::Null` for a body that is not JSON).
    pub fn bodies(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.path.ends_with(":generateAccessToken"))
            .map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null))
            .collect()
    }
}

fn iam_answer(req: &Request, state: &IamState) -> Response {
    let path = sigv4::percent_decode(&req.path).unwrap_or_else(|_| req.path.clone());
    let account = path
        .strip_prefix("/v1/projects/-/serviceAccounts/")
        .and_then(|rest| rest.strip_suffix(":generateAccessToken"));
    let Some(account) = account.filter(|_| req.method == "POST") else {
        return iam_error(404, "NOT_FOUND", "Method not found.");
    };
    let bearer = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(state.base_token.as_str()) {
        return iam_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential.",
        );
    }
    match *lock(&state.failure) {
        Some(IamFailure::PermissionDenied) => {
            return iam_error(403, "PERMISSION_DENIED", IAM_DENIED)
        }
        Some(IamFailure::NotFound) => {
            return iam_error(
                404,
                "NOT_FOUND",
                &format!("Not found; Gaia id not found for email {account}"),
            )
        }
        None => {}
    }
    let json_type = req.header("content-type").is_some_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(body) if json_type => body,
        _ => return iam_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."),
    };
    if account != state.target {
        return iam_error(
            404,
            "NOT_FOUND",
            &format!("Not found; Gaia id not found for email {account}"),
        );
    }
    let delegates: Vec<&str> = match body.get("delegates") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        Some(_) => return iam_error(400, "INVALID_ARGUMENT", "Invalid value at 'delegates'."),
    };
    if delegates != state.delegates {
        return iam_error(403, "PERMISSION_DENIED", IAM_DENIED);
    }
    let scopes: Vec<&str> = body
        .get("scope")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if scopes.is_empty() {
        return iam_error(400, "INVALID_ARGUMENT", "Scope required.");
    }
    let lifetime = match body.get("lifetime").and_then(Value::as_str) {
        None => 3600,
        Some(text) => match text.strip_suffix('s').and_then(|n| n.parse::<u64>().ok()) {
            Some(secs) if (1..=3600).contains(&secs) => secs,
            _ => {
                return iam_error(
                    400,
                    "INVALID_ARGUMENT",
                    "The lifetime must be between 1s and 3600s.",
                )
            }
        },
    };
    let expire = SystemTime::now() + Duration::from_secs(lifetime);
    Response::json(
        200,
        &json!({
            "accessToken": state.token_for(&scopes.join(" ")),
            "expireTime": sigv4::iso8601(expire),
        }),
    )
}
