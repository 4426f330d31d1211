//! `iam=gcp`: Cloud SQL IAM database login. The password is an OAuth2
//! access token with the `sqlservice.login` scope, minted from Application
//! Default Credentials found the way Google's own libraries find them:
//!
//! 1. `GOOGLE_APPLICATION_CREDENTIALS`, naming a service account key file or
//!    a user credentials file;
//! 2. gcloud's well-known file, `application_default_credentials.json` in
//!    `$CLOUDSDK_CONFIG` or `~/.config/gcloud` (`%APPDATA%\gcloud` on
//!    Windows: [`crate::platform::home::gcloud_dir`]), written by
//!    `gcloud auth application-default login`;
//! 3. the metadata server of Cloud Run, GCE and GKE.
//!
//! Files are read once, at startup, so that a missing or broken file is an
//! error then rather than at the first connection. The metadata server is
//! not probed at startup: off Google Cloud the first token request says what
//! to set instead.
//!
//! Key files and replies hold secrets (a private key, a refresh token, the
//! token itself), so nothing here echoes them: a file that does not parse is
//! named with the line and column of the fault, a failed reply with its
//! status and OAuth2 error code, never with its text.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Map, Value};

use super::{CredentialsError, Token, TokenFuture, TokenRequest, TokenSource};
use crate::config::Protocol;
use crate::http::client::{self as http, HttpError, HttpErrorKind, Request, Response, Url};
use crate::platform::home::{self, Os};

const PROVIDER: &str = "gcp";

/// The scope Cloud SQL IAM database login needs, and no more.
pub const LOGIN_SCOPE: &str = "https://www.googleapis.com/auth/sqlservice.login";

/// The scope the SQL Admin API calls of the Cloud SQL connector need.
pub const ADMIN_SCOPE: &str = "https://www.googleapis.com/auth/sqlservice.admin";

const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

const METADATA_HOST: &str = "metadata.google.internal";

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The longest a self-signed assertion may live (Google's limit).
const ASSERTION_LIFETIME: u64 = 3600;

const ELSEWHERE: &str = "outside Google Cloud, set GOOGLE_APPLICATION_CREDENTIALS to a service \
                         account key file or run `gcloud auth application-default login`";

/// Mints Cloud SQL login tokens from Application Default Credentials.
pub struct GcpTokenSource {
    credentials: Credentials,
    /// The OAuth2 scope every token is asked for.
    scope: &'static str,
    timeout: Duration,
}

/// What was found, read and checked at discovery.
enum Credentials {
    Metadata {
        /// As configured (`GCE_METADATA_HOST` or the default), for messages.
        host: String,
        /// Without the `scopes` query: [`GcpTokenSource::mint`] adds it.
        token_url: String,
    },
    // Boxed: the key pair is large beside the other variants.
    ServiceAccount(Box<ServiceAccount>),
    AuthorizedUser(AuthorizedUser),
}

/// Which rule found a credentials file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    Variable,
    /// gcloud's well-known location.
    Gcloud,
    /// Named by keyhole's own option (`--credentials-file`).
    Option,
    /// Given inline (`--json-credentials`): there is no file.
    Inline,
}

/// A service account key file: tokens for a signed JWT assertion.
struct ServiceAccount {
    path: PathBuf,
    found: Found,
    client_email: String,
    private_key_id: Option<String>,
    key: RsaKeyPair,
    /// As written in the file: it is also the assertion's audience.
    token_uri_text: String,
    token_uri: Url,
}

/// User credentials (gcloud's usual file): tokens for a refresh token.
struct AuthorizedUser {
    path: PathBuf,
    found: Found,
    client_id: String,
    client_secret: String,
    refresh_token: String,
    token_uri: Url,
}

impl GcpTokenSource {
    /// Finds Application Default Credentials in `env` (the process
    /// environment, passed in so tests can supply their own) and the files
    /// it points to. `timeout` bounds each [`TokenSource::fetch`].
    pub fn discover(
        env: &HashMap<String, String>,
        timeout: Duration,
    ) -> Result<GcpTokenSource, CredentialsError> {
        GcpTokenSource::discover_for(env, LOGIN_SCOPE, timeout)
    }

    /// [`GcpTokenSource::discover`], for tokens of another scope.
    pub fn discover_for(
        env: &HashMap<String, String>,
        scope: &'static str,
        timeout: Duration,
    ) -> Result<GcpTokenSource, CredentialsError> {
        let credentials = if let Some(path) = non_empty(env, "GOOGLE_APPLICATION_CREDENTIALS") {
            load_file(Path::new(path), Found::Variable)?
        } else if let Some(path) = gcloud_file(env)? {
            load_file(&path, Found::Gcloud)?
        } else {
            metadata(env)?
        };
        Ok(GcpTokenSource {
            credentials,
            scope,
            timeout,
        })
    }

    /// A service account key or user credentials file named by an option
    /// (`--credentials-file`), instead of the ADC search.
    pub fn from_file(
        path: &Path,
        scope: &'static str,
        timeout: Duration,
    ) -> Result<GcpTokenSource, CredentialsError> {
        Ok(GcpTokenSource {
            credentials: load_file(path, Found::Option)?,
            scope,
            timeout,
        })
    }

    /// The same credentials given as JSON text (`--json-credentials`).
    pub fn from_json(
        json: &str,
        scope: &'static str,
        timeout: Duration,
    ) -> Result<GcpTokenSource, CredentialsError> {
        Ok(GcpTokenSource {
            credentials: load_bytes(
                json.as_bytes(),
                Path::new("--json-credentials"),
                Found::Inline,
            )?,
            scope,
            timeout,
        })
    }

    /// Which credentials were found, for the startup log: no secret.
    pub fn describe(&self) -> String {
        match &self.credentials {
            Credentials::Metadata { host, .. } => format!("metadata server {host}"),
            Credentials::ServiceAccount(sa) => match sa.found {
                Found::Variable => format!(
                    "service account key file {} ({})",
                    sa.path.display(),
                    sa.client_email
                ),
                Found::Gcloud => format!(
                    "gcloud application default credentials {} (service account {})",
                    sa.path.display(),
                    sa.client_email
                ),
                Found::Option => format!(
                    "--credentials-file {} ({})",
                    sa.path.display(),
                    sa.client_email
                ),
                Found::Inline => format!("--json-credentials ({})", sa.client_email),
            },
            Credentials::AuthorizedUser(user) => match user.found {
                Found::Variable => format!("user credentials file {}", user.path.display()),
                Found::Gcloud => format!(
                    "gcloud application default credentials {}",
                    user.path.display()
                ),
                Found::Option => format!("--credentials-file {}", user.path.display()),
                Found::Inline => "--json-credentials (user credentials)".to_owned(),
            },
        }
    }

    async fn mint(&self) -> Result<Token, CredentialsError> {
        // The token's lifetime is counted from before the request was sent,
        // so the expiry can only err early.
        let issued = SystemTime::now();
        let request = match &self.credentials {
            Credentials::Metadata { token_url, .. } => {
                let url = Url::parse(&format!(
                    "{token_url}?scopes={}",
                    http::percent_encode(self.scope)
                ))
                .map_err(|e| source_error("GCE_METADATA_HOST", e.to_string()))?;
                Request::get(url).header("Metadata-Flavor", "Google")
            }
            Credentials::ServiceAccount(sa) => {
                let assertion = sa.assertion(unix_seconds(issued)?, self.scope)?;
                Request::post_form(
                    sa.token_uri.clone(),
                    &[("grant_type", JWT_BEARER), ("assertion", &assertion)],
                )
            }
            Credentials::AuthorizedUser(user) => Request::post_form(
                user.token_uri.clone(),
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", &user.client_id),
                    ("client_secret", &user.client_secret),
                    ("refresh_token", &user.refresh_token),
                ],
            ),
        };
        let origin = request.url().to_string();
        let response = http::send(request).await.map_err(|e| self.unreachable(e))?;
        self.token_from(&origin, &response, issued)
    }

    /// A failed exchange, with a hint where the usual cause is known.
    fn unreachable(&self, err: HttpError) -> CredentialsError {
        let mut reason = err.kind().to_string();
        if let Credentials::Metadata { .. } = self.credentials {
            match err.kind() {
                HttpErrorKind::Refused { .. } | HttpErrorKind::Connect { .. } => reason.push_str(&format!(
                    " (is the metadata server reachable? On Cloud Run, GCE and GKE it is; {ELSEWHERE})"
                )),
                HttpErrorKind::Resolve { .. } | HttpErrorKind::NoAddress { .. } => reason
                    .push_str(&format!(
                        " (keyhole does not seem to run on Google Cloud; {ELSEWHERE})"
                    )),
                _ => {}
            }
        }
        source_error(err.url(), reason)
    }

    fn token_from(
        &self,
        origin: &str,
        response: &Response,
        issued: SystemTime,
    ) -> Result<Token, CredentialsError> {
        if !response.status.is_success() {
            return Err(source_error(origin, self.rejected(response)));
        }
        let not_a_token = |what: &str| {
            source_error(
                origin,
                format!("returned something that is not a token ({what})"),
            )
        };
        let reply: Value =
            serde_json::from_slice(&response.body).map_err(|_| not_a_token("not JSON"))?;
        let access_token = reply
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| not_a_token("no access_token"))?;
        // It becomes a password on the wire: printable ASCII only.
        if access_token.is_empty() || !access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(not_a_token("an access_token that is not printable text"));
        }
        if let Some(kind) = reply.get("token_type").and_then(Value::as_str) {
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(not_a_token("not a Bearer token"));
            }
        }
        let expires_at = reply
            .get("expires_in")
            .and_then(Value::as_u64)
            .filter(|&seconds| seconds > 0)
            .and_then(|seconds| issued.checked_add(Duration::from_secs(seconds)))
            .ok_or_else(|| not_a_token("no usable expires_in"))?;
        Ok(Token::new(access_token, expires_at))
    }

    /// Why an error status: the status, the OAuth2 `error` code if the body
    /// has a plausible one, and what usually fixes it.
    fn rejected(&self, response: &Response) -> String {
        let code = oauth_error_code(&response.body);
        let mut reason = format!("HTTP {}", response.status);
        if let Some(code) = &code {
            reason.push_str(&format!(" ({code})"));
        }
        let hint = match (&self.credentials, code.as_deref()) {
            (Credentials::AuthorizedUser(_), Some("invalid_grant")) => {
                "; the refresh token has expired or was revoked: run `gcloud auth application-default login` again"
            }
            (Credentials::AuthorizedUser(_), Some("invalid_client")) => {
                "; the file's client_id or client_secret was rejected"
            }
            (Credentials::ServiceAccount(_), Some("invalid_grant")) => {
                "; the key may have been deleted or disabled, or this machine's clock is off"
            }
            (Credentials::Metadata { .. }, _) if response.status.as_u16() == 404 => {
                "; is a service account attached to this instance or service?"
            }
            _ => "",
        };
        reason.push_str(hint);
        reason
    }
}

impl TokenSource for GcpTokenSource {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    fn describe(&self) -> String {
        GcpTokenSource::describe(self)
    }

    /// One identity serves every endpoint and user: the request is not needed.
    fn fetch<'a>(&'a self, _request: &'a TokenRequest) -> TokenFuture<'a> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.mint())
                .await
                .unwrap_or(Err(CredentialsError::Timeout {
                    provider: PROVIDER,
                    after: self.timeout,
                }))
        })
    }

    /// Cloud SQL's names for IAM principals: on Postgres a service account
    /// is its email without `.gserviceaccount.com`; on MySQL any principal
    /// is the part of its email before `@`.
    fn database_user(&self, user: &str, protocol: Protocol) -> String {
        database_user(user, protocol)
    }
}

impl fmt::Debug for GcpTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GcpTokenSource({}, timeout {:?})",
            self.describe(),
            self.timeout
        )
    }
}

fn database_user(user: &str, protocol: Protocol) -> String {
    const SERVICE_ACCOUNT: &str = ".gserviceaccount.com";
    let Some((local, domain)) = user.split_once('@') else {
        return user.to_owned();
    };
    if local.is_empty() || domain.is_empty() {
        return user.to_owned();
    }
    match protocol {
        Protocol::Mysql => local.to_owned(),
        Protocol::Postgres => {
            // ASCII lowercasing keeps every byte offset, so `project` spans
            // the same bytes of `domain`.
            match domain.to_ascii_lowercase().strip_suffix(SERVICE_ACCOUNT) {
                Some(project) if !project.is_empty() => {
                    format!("{local}@{}", &domain[..project.len()])
                }
                _ => user.to_owned(),
            }
        }
    }
}

impl ServiceAccount {
    /// The signed JWT that asks `token_uri` for a token with `scope`.
    fn assertion(&self, now: u64, scope: &str) -> Result<String, CredentialsError> {
        let mut header = json!({ "alg": "RS256", "typ": "JWT" });
        if let (Some(kid), Some(map)) = (&self.private_key_id, header.as_object_mut()) {
            map.insert("kid".into(), Value::String(kid.clone()));
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": self.token_uri_text,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| CredentialsError::Signing {
                provider: PROVIDER,
                reason: format!("RSA signing with the key in {} failed", self.path.display()),
            })?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

fn source_error(origin: impl Into<String>, reason: impl Into<String>) -> CredentialsError {
    CredentialsError::Source {
        provider: PROVIDER,
        origin: origin.into(),
        reason: reason.into(),
    }
}

fn non_empty<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// gcloud's file, if it is there: in gcloud's directory on this system
/// ([`home::gcloud_dir`]).
fn gcloud_file(env: &HashMap<String, String>) -> Result<Option<PathBuf>, CredentialsError> {
    gcloud_file_on(Os::current(), env)
}

fn gcloud_file_on(
    os: Os,
    env: &HashMap<String, String>,
) -> Result<Option<PathBuf>, CredentialsError> {
    let Some(dir) = home::gcloud_dir(os, &home::map_env(env)) else {
        return Ok(None);
    };
    let path = dir.join("application_default_credentials.json");
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(Some(path)),
        Ok(_) => Err(source_error(
            path.display().to_string(),
            "is not a regular file",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(source_error(
            path.display().to_string(),
            format!("cannot be read: {e}"),
        )),
    }
}

fn metadata(env: &HashMap<String, String>) -> Result<Credentials, CredentialsError> {
    let host = non_empty(env, "GCE_METADATA_HOST").unwrap_or(METADATA_HOST);
    let bad = |reason: String| source_error("GCE_METADATA_HOST", reason);
    // host[:port] only: anything more would change which URL is asked.
    if host
        .bytes()
        .any(|b| matches!(b, b'/' | b'?' | b'#' | b'@') || !b.is_ascii_graphic())
    {
        return Err(bad(format!("'{host}' is not host[:port]")));
    }
    let token_url =
        format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
    // Checked here, so that a bad host is a startup error.
    Url::parse(&token_url).map_err(|e| bad(e.to_string()))?;
    Ok(Credentials::Metadata {
        host: host.to_owned(),
        token_url,
    })
}

/// Reads and checks a credentials file. Errors name the file, never its text.
fn load_file(path: &Path, found: Found) -> Result<Credentials, CredentialsError> {
    let named_by = match found {
        Found::Variable => " (named by GOOGLE_APPLICATION_CREDENTIALS)",
        Found::Option => " (named by --credentials-file)",
        Found::Gcloud | Found::Inline => "",
    };
    let bytes = std::fs::read(path).map_err(|e| {
        source_error(
            path.display().to_string(),
            format!("cannot be read{named_by}: {e}"),
        )
    })?;
    load_bytes(&bytes, path, found)
}

/// Checks credentials read from `path` (or given inline, then `path` only
/// names the option). Errors name where they came from, never the text.
fn load_bytes(bytes: &[u8], path: &Path, found: Found) -> Result<Credentials, CredentialsError> {
    let origin = path.display().to_string();
    let bad = |reason: String| source_error(origin.clone(), reason);
    // serde_json's messages can quote the text they choke on: only the
    // position is shown.
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        bad(format!(
            "is not a JSON credentials file (fault at line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let fields = value
        .as_object()
        .ok_or_else(|| bad("is not a JSON credentials file (not an object)".into()))?;
    let kind = text_field(fields, "type").map_err(&bad)?;
    match kind {
        "service_account" => {
            let token_uri_text = optional_field(fields, "token_uri")
                .map_err(&bad)?
                .unwrap_or(DEFAULT_TOKEN_URI);
            let private_key = text_field(fields, "private_key").map_err(&bad)?;
            Ok(Credentials::ServiceAccount(Box::new(ServiceAccount {
                path: path.to_owned(),
                found,
                client_email: text_field(fields, "client_email").map_err(&bad)?.to_owned(),
                private_key_id: optional_field(fields, "private_key_id")
                    .map_err(&bad)?
                    .map(str::to_owned),
                key: rsa_key(private_key).map_err(|r| bad(r.into()))?,
                token_uri: token_uri(token_uri_text).map_err(&bad)?,
                token_uri_text: token_uri_text.to_owned(),
            })))
        }
        "authorized_user" => {
            let token_uri_text = optional_field(fields, "token_uri")
                .map_err(&bad)?
                .unwrap_or(DEFAULT_TOKEN_URI);
            Ok(Credentials::AuthorizedUser(AuthorizedUser {
                path: path.to_owned(),
                found,
                client_id: text_field(fields, "client_id").map_err(&bad)?.to_owned(),
                client_secret: text_field(fields, "client_secret")
                    .map_err(&bad)?
                    .to_owned(),
                refresh_token: text_field(fields, "refresh_token")
                    .map_err(&bad)?
                    .to_owned(),
                token_uri: token_uri(token_uri_text).map_err(&bad)?,
            }))
        }
        other => {
            // A type is a short identifier; anything else is not repeated.
            let shown = if other.len() <= 64
                && other
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                format!("'{other}'")
            } else {
                "this".to_owned()
            };
            Err(bad(format!(
                "holds credentials of type {shown}, which keyhole does not support \
                 (it supports service_account and authorized_user)"
            )))
        }
    }
}

/// A required string field.
fn text_field<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    optional_field(fields, name)?.ok_or_else(|| format!("has no {name}"))
}

/// A string field that may be absent, but not of another type or empty.
fn optional_field<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if !text.is_empty() => Ok(Some(text)),
        Some(Value::String(_)) => Err(format!("has an empty {name}")),
        Some(_) => Err(format!("has a {name} that is not a string")),
    }
}

fn token_uri(text: &str) -> Result<Url, String> {
    Url::parse(text).map_err(|e| format!("token_uri: {e}"))
}

/// The RSA key from a PKCS#8 PEM. Errors say what is wrong, never what is there.
fn rsa_key(pem: &str) -> Result<RsaKeyPair, &'static str> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "has a private_key that is not a PKCS#8 PEM key (BEGIN PRIVATE KEY)")?;
    RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|_| "has a private_key that is not an RSA key ring can sign with")
}

// Google's error bodies are read the same by every Google endpoint keyhole
// calls, the Admin API included (which is in every build).
pub(crate) use crate::http::client::google_error_codes;

/// The OAuth2 `error` field (RFC 6749 §5.2) when it is a short ASCII code
/// like `invalid_grant`; the rest of the body is never shown.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    let plausible = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    plausible.then(|| code.to_owned())
}

fn unix_seconds(now: SystemTime) -> Result<u64, CredentialsError> {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| CredentialsError::Signing {
            provider: PROVIDER,
            reason: "the system clock is set before 1970".into(),
        })
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::OnceLock;

    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    use super::*;
    use crate::http::client::testing::{closed_port, reply, serve, After};

    const REFRESH_TOKEN: &str = "1//0refresh-SECRET-token";
    const CLIENT_SECRET: &str = "d-FL95Q19q7MQmFpd7hHD0Ty";

    /// A fresh RSA-2048 key from openssl (PKCS#8 PEM) and its public half
    /// (PKCS#1 DER, as ring verifies), made once for all tests.
    fn test_key() -> &'static (String, Vec<u8>) {
        static KEY: OnceLock<(String, Vec<u8>)> = OnceLock::new();
        KEY.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let key = dir.path().join("key.pem");
            let public = dir.path().join("public.der");
            let run = |args: &[&str]| {
                let out = Command::new("openssl")
                    .args(args)
                    .output()
                    .expect("run openssl");
                assert!(
                    out.status.success(),
                    "openssl {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            let key_path = key.to_str().expect("UTF-8 temp path");
            run(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                key_path,
            ]);
            run(&[
                "rsa",
                "-in",
                key_path,
                "-RSAPublicKey_out",
                "-outform",
                "DER",
                "-out",
                public.to_str().expect("UTF-8 temp path"),
            ]);
            (
                std::fs::read_to_string(&key).expect("read the key"),
                std::fs::read(&public).expect("read the public key"),
            )
        })
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(path: &Path, text: &str) -> PathBuf {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create dir");
        }
        std::fs::write(path, text).expect("write file");
        path.to_owned()
    }

    fn service_account_json(token_uri: Option<&str>) -> String {
        let mut file = json!({
            "type": "service_account",
            "project_id": "proj",
            "private_key_id": "key-1",
            "private_key": test_key().0,
            "client_email": "sa@proj.iam.gserviceaccount.com",
            "client_id": "1234",
        });
        if let (Some(uri), Some(map)) = (token_uri, file.as_object_mut()) {
            map.insert("token_uri".into(), Value::String(uri.into()));
        }
        file.to_string()
    }

    fn authorized_user_json(token_uri: Option<&str>) -> String {
        let mut file = json!({
            "type": "authorized_user",
            "client_id": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
            "client_secret": CLIENT_SECRET,
            "refresh_token": REFRESH_TOKEN,
        });
        if let (Some(uri), Some(map)) = (token_uri, file.as_object_mut()) {
            map.insert("token_uri".into(), Value::String(uri.into()));
        }
        file.to_string()
    }

    fn discover(pairs: &[(&str, &str)]) -> Result<GcpTokenSource, CredentialsError> {
        GcpTokenSource::discover(&env(pairs), Duration::from_secs(5))
    }

    fn discover_error(pairs: &[(&str, &str)]) -> String {
        match discover(pairs) {
            Ok(source) => panic!("expected an error, found {source:?}"),
            Err(e) => e.to_string(),
        }
    }

    async fn fetch(source: &GcpTokenSource) -> Result<Token, CredentialsError> {
        let request = TokenRequest {
            host: "10.0.0.5".into(),
            port: 5432,
            user: "sa@proj.iam".into(),
        };
        source.fetch(&request).await
    }

    fn token_reply() -> Vec<u8> {
        reply(
            "200 OK",
            r#"{"access_token":"ya29.c.test-token","expires_in":3599,"token_type":"Bearer"}"#,
        )
    }

    /// The form body of a captured request, decoded.
    fn form_fields(request: &str) -> HashMap<String, String> {
        let body = request.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        body.split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect()
    }

    fn percent_decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).expect("UTF-8")
    }

    /// Checks an assertion's signature with the openssl-made public key and
    /// returns its decoded header and claims.
    fn verify_assertion(jwt: &str) -> (Value, Value) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        let signature = URL_SAFE_NO_PAD
            .decode(parts[2])
            .expect("base64url signature");
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &test_key().1);
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(signed.as_bytes(), &signature)
            .expect("the signature verifies with the public key");
        assert!(
            public
                .verify(format!("{signed}x").as_bytes(), &signature)
                .is_err(),
            "a changed message must not verify"
        );
        let decode = |part: &str| -> Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
        };
        (decode(parts[0]), decode(parts[1]))
    }

    #[test]
    fn the_connector_s_sources_take_their_own_scope_and_inline_json() {
        let text = service_account_json(None).to_string();
        let source = GcpTokenSource::from_json(&text, ADMIN_SCOPE, Duration::from_secs(5))
            .expect("inline credentials");
        assert_eq!(source.scope, ADMIN_SCOPE);
        assert_eq!(
            source.describe(),
            "--json-credentials (sa@proj.iam.gserviceaccount.com)"
        );
        let Credentials::ServiceAccount(sa) = &source.credentials else {
            panic!("expected a service account, found {source:?}");
        };
        let (_, claims) =
            verify_assertion(&sa.assertion(1_700_000_000, source.scope).expect("jwt"));
        assert_eq!(claims["scope"], ADMIN_SCOPE);
        // A broken inline value is named by its option, never echoed.
        let err = GcpTokenSource::from_json(
            "{\"private_key\": \"SECRET",
            ADMIN_SCOPE,
            Duration::from_secs(5),
        )
        .expect_err("not JSON")
        .to_string();
        assert!(
            err.contains("--json-credentials") && !err.contains("SECRET"),
            "{err}"
        );
        // A file named by --credentials-file says so when it cannot be read.
        let err = GcpTokenSource::from_file(
            Path::new("/nonexistent/sa.json"),
            LOGIN_SCOPE,
            Duration::from_secs(5),
        )
        .expect_err("missing")
        .to_string();
        assert!(err.contains("named by --credentials-file"), "{err}");
        // The ADC search with another scope finds the same credentials.
        let source =
            GcpTokenSource::discover_for(&HashMap::new(), ADMIN_SCOPE, Duration::from_secs(5))
                .expect("the metadata server");
        assert_eq!(source.scope, ADMIN_SCOPE);
    }

    #[test]
    fn the_assertion_is_an_rs256_jwt_signed_by_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(
            &dir.path().join("sa.json"),
            &service_account_json(Some("https://oauth2.example.test/token")),
        );
        let source = discover(&[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            file.to_str().expect("path"),
        )])
        .expect("a service account");
        let Credentials::ServiceAccount(sa) = &source.credentials else {
            panic!("expected a service account, found {source:?}");
        };
        let jwt = sa
            .assertion(1_700_000_000, LOGIN_SCOPE)
            .expect("an assertion");
        assert!(!jwt.contains('=') && !jwt.contains('+') && !jwt.contains('/'));
        let (header, claims) = verify_assertion(&jwt);
        assert_eq!(
            header,
            json!({ "alg": "RS256", "typ": "JWT", "kid": "key-1" })
        );
        assert_eq!(
            claims,
            json!({
                "iss": "sa@proj.iam.gserviceaccount.com",
                "scope": "https://www.googleapis.com/auth/sqlservice.login",
                "aud": "https://oauth2.example.test/token",
                "iat": 1_700_000_000u64,
                "exp": 1_700_003_600u64,
            })
        );
    }

    #[test]
    fn discovery_order_is_the_variable_then_gcloud_then_metadata() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sa = write(&dir.path().join("sa.json"), &service_account_json(None));
        let config = dir.path().join("cloudsdk");
        let gcloud = write(
            &config.join("application_default_credentials.json"),
            &authorized_user_json(None),
        );
        let home = dir.path().join("home");
        let home_file = write(
            &home.join(".config/gcloud/application_default_credentials.json"),
            &authorized_user_json(None),
        );
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).expect("create dir");
        let (sa, config, gcloud, home, home_file, empty) = (
            sa.to_str().expect("path"),
            config.to_str().expect("path"),
            gcloud.to_str().expect("path"),
            home.to_str().expect("path"),
            home_file.to_str().expect("path"),
            empty.to_str().expect("path"),
        );
        let describe = |pairs: &[(&str, &str)]| discover(pairs).expect("credentials").describe();

        assert_eq!(
            describe(&[
                ("GOOGLE_APPLICATION_CREDENTIALS", sa),
                ("CLOUDSDK_CONFIG", config),
                ("HOME", home)
            ]),
            format!("service account key file {sa} (sa@proj.iam.gserviceaccount.com)")
        );
        assert_eq!(
            describe(&[("CLOUDSDK_CONFIG", config), ("HOME", home)]),
            format!("gcloud application default credentials {gcloud}")
        );
        assert_eq!(
            describe(&[("GOOGLE_APPLICATION_CREDENTIALS", ""), ("HOME", home)]),
            format!("gcloud application default credentials {home_file}")
        );
        // CLOUDSDK_CONFIG replaces ~/.config/gcloud rather than adding to it.
        assert_eq!(
            describe(&[("CLOUDSDK_CONFIG", empty), ("HOME", home)]),
            "metadata server metadata.google.internal"
        );
        assert_eq!(
            describe(&[("HOME", empty)]),
            "metadata server metadata.google.internal"
        );
        assert_eq!(describe(&[]), "metadata server metadata.google.internal");
        assert_eq!(
            describe(&[("GCE_METADATA_HOST", "[::1]:8080"), ("HOME", empty)]),
            "metadata server [::1]:8080"
        );
        // A service account key in gcloud's place, and user credentials named by the variable.
        write(
            Path::new(gcloud),
            &service_account_json(Some("https://oauth2.googleapis.com/token")),
        );
        assert_eq!(
            describe(&[("CLOUDSDK_CONFIG", config)]),
            format!(
                "gcloud application default credentials {gcloud} (service account sa@proj.iam.gserviceaccount.com)"
            )
        );
        assert_eq!(
            describe(&[("GOOGLE_APPLICATION_CREDENTIALS", home_file)]),
            format!("user credentials file {home_file}")
        );
    }

    #[test]
    fn gcloud_file_is_where_gcloud_puts_it_on_each_system() {
        const FILE: &str = "application_default_credentials.json";
        let dir = tempfile::tempdir().expect("temp dir");
        let home = dir.path().join("home");
        let in_home = write(&home.join(".config/gcloud").join(FILE), "{}");
        // The Windows rule joins with `\`: on Unix that is part of one name,
        // on Windows a separator, so the file is found on either.
        let appdata = dir.path().join("appdata");
        let appdata = appdata.to_str().expect("path");
        let in_appdata = write(&Path::new(&format!("{appdata}\\gcloud")).join(FILE), "{}");
        let (home, empty) = (home.to_str().expect("path"), "");
        let found = |os, pairs: &[(&str, &str)]| gcloud_file_on(os, &env(pairs)).expect("no error");

        let both = [("HOME", home), ("APPDATA", appdata)];
        for os in [Os::Linux, Os::MacOs] {
            assert_eq!(found(os, &both), Some(in_home.clone()), "{os:?}");
            assert_eq!(found(os, &[("APPDATA", appdata)]), None, "{os:?}");
            assert_eq!(found(os, &[("HOME", empty)]), None, "{os:?}");
        }
        assert_eq!(found(Os::Windows, &both), Some(in_appdata));
        // Windows does not look in HOME.
        assert_eq!(found(Os::Windows, &[("HOME", home)]), None);
        // CLOUDSDK_CONFIG is the directory everywhere.
        let config = in_home.parent().expect("dir").to_str().expect("path");
        for os in [Os::Linux, Os::MacOs, Os::Windows] {
            assert_eq!(
                found(os, &[("CLOUDSDK_CONFIG", config), ("APPDATA", empty)]),
                Some(in_home.clone()),
                "{os:?}"
            );
        }
    }

    #[test]
    fn a_broken_credentials_file_is_an_error_that_names_it_and_not_its_text() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("creds.json");
        let shown = path.to_str().expect("path").to_owned();
        let with_file = |text: &str| {
            write(&path, text);
            discover_error(&[("GOOGLE_APPLICATION_CREDENTIALS", &shown)])
        };
        let missing = dir.path().join("missing.json");
        let err = discover_error(&[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            missing.to_str().expect("path"),
        )]);
        assert!(
            err.starts_with(&format!(
                "gcp credentials from {}: cannot be read (named by GOOGLE_APPLICATION_CREDENTIALS): ",
                missing.display()
            )),
            "{err}"
        );

        let truncated = &authorized_user_json(None)[..60];
        let err = with_file(truncated);
        assert!(
            err.starts_with(&format!(
                "gcp credentials from {shown}: is not a JSON credentials file (fault at line 1"
            )),
            "{err}"
        );
        let err = with_file(&format!("{{\"refresh_token\": {REFRESH_TOKEN}}}"));
        assert!(!err.contains("SECRET"), "{err}");

        let err = with_file(r#"{"type":"external_account","audience":"x"}"#);
        assert_eq!(
            err,
            format!(
                "gcp credentials from {shown}: holds credentials of type 'external_account', which \
                 keyhole does not support (it supports service_account and authorized_user)"
            )
        );
        let err = with_file(&format!(r#"{{"type":"{REFRESH_TOKEN}"}}"#));
        assert!(
            err.contains("type this,") && !err.contains("SECRET"),
            "{err}"
        );
        let err = with_file(r#"{"client_email":"a@b"}"#);
        assert!(err.ends_with(": has no type"), "{err}");
        let err = with_file("[1, 2]");
        assert!(err.ends_with("(not an object)"), "{err}");

        let err = with_file(
            &json!({"type": "authorized_user", "client_id": "x", "client_secret": CLIENT_SECRET})
                .to_string(),
        );
        assert!(err.ends_with(": has no refresh_token"), "{err}");
        assert!(!err.contains(CLIENT_SECRET), "{err}");
        let err = with_file(
            &json!({"type": "authorized_user", "client_id": 7, "client_secret": "s", "refresh_token": "r"})
                .to_string(),
        );
        assert!(
            err.ends_with(": has a client_id that is not a string"),
            "{err}"
        );

        let mut sa: Value = serde_json::from_str(&service_account_json(None)).expect("JSON");
        sa["private_key"] =
            "-----BEGIN PRIVATE KEY-----\nU0VDUkVUS0VZTUFURVJJQUw=\n-----END PRIVATE KEY-----\n"
                .into();
        let err = with_file(&sa.to_string());
        assert!(
            err.ends_with(": has a private_key that is not an RSA key ring can sign with"),
            "{err}"
        );
        assert!(!err.contains("U0VDUkVU"), "{err}");
        sa["private_key"] =
            "-----BEGIN RSA PRIVATE KEY-----\nU0VDUkVU\n-----END RSA PRIVATE KEY-----\n".into();
        let err = with_file(&sa.to_string());
        assert!(err.contains("not a PKCS#8 PEM key"), "{err}");
        assert!(!err.contains("U0VDUkVU"), "{err}");
        sa["private_key"] = test_key().0.clone().into();
        sa["token_uri"] = "oauth2.googleapis.com/token".into();
        let err = with_file(&sa.to_string());
        assert!(
            err.contains(": token_uri: 'oauth2.googleapis.com/token' is not a usable URL"),
            "{err}"
        );

        // gcloud's location taken by a directory.
        let config = dir.path().join("cloudsdk");
        std::fs::create_dir_all(config.join("application_default_credentials.json"))
            .expect("create dir");
        let err = discover_error(&[("CLOUDSDK_CONFIG", config.to_str().expect("path"))]);
        assert!(
            err.ends_with("application_default_credentials.json: is not a regular file"),
            "{err}"
        );

        let err = discover_error(&[("GCE_METADATA_HOST", "evil.example/x?")]);
        assert!(
            err.starts_with("gcp credentials from GCE_METADATA_HOST: "),
            "{err}"
        );
    }

    #[test]
    fn debug_and_describe_hold_no_secret() {
        let dir = tempfile::tempdir().expect("temp dir");
        for text in [authorized_user_json(None), service_account_json(None)] {
            let file = write(&dir.path().join("creds.json"), &text);
            let source = discover(&[(
                "GOOGLE_APPLICATION_CREDENTIALS",
                file.to_str().expect("path"),
            )])
            .expect("credentials");
            for shown in [format!("{source:?}"), source.describe()] {
                assert!(!shown.contains(REFRESH_TOKEN), "{shown}");
                assert!(!shown.contains(CLIENT_SECRET), "{shown}");
                assert!(!shown.contains("PRIVATE KEY"), "{shown}");
            }
        }
    }

    #[test]
    fn database_users_follow_cloud_sql_naming() {
        let source = discover(&[("GCE_METADATA_HOST", "127.0.0.1:1")]).expect("metadata");
        for (user, postgres, mysql) in [
            ("sa@proj.iam.gserviceaccount.com", "sa@proj.iam", "sa"),
            ("sa@proj.iam.GSERVICEACCOUNT.COM", "sa@proj.iam", "sa"),
            ("alice@example.com", "alice@example.com", "alice"),
            ("app_user", "app_user", "app_user"),
            ("x@.gserviceaccount.com", "x@.gserviceaccount.com", "x"),
            ("@example.com", "@example.com", "@example.com"),
            ("postgres", "postgres", "postgres"),
        ] {
            assert_eq!(
                source.database_user(user, Protocol::Postgres),
                postgres,
                "{user}"
            );
            assert_eq!(source.database_user(user, Protocol::Mysql), mysql, "{user}");
        }
        assert_eq!(source.provider(), "gcp");
    }

    #[tokio::test]
    async fn a_service_account_exchanges_a_signed_assertion() {
        let (addr, request) = serve(token_reply(), After::Close).await;
        let token_uri = format!("http://{addr}/token");
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(
            &dir.path().join("sa.json"),
            &service_account_json(Some(&token_uri)),
        );
        let source = discover(&[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            file.to_str().expect("path"),
        )])
        .expect("a service account");
        let before = SystemTime::now();
        let token = fetch(&source).await.expect("a token");
        assert_eq!(token.expose(), "ya29.c.test-token");
        let lifetime = token
            .expires_at()
            .duration_since(before)
            .expect("expires after now");
        assert!(
            lifetime <= Duration::from_secs(3600) && lifetime > Duration::from_secs(3590),
            "{lifetime:?}"
        );

        let request = request.await.expect("the request");
        assert!(request.starts_with("POST /token HTTP/1.1\r\n"), "{request}");
        let fields = form_fields(&request);
        assert_eq!(fields["grant_type"], JWT_BEARER);
        let (_, claims) = verify_assertion(&fields["assertion"]);
        assert_eq!(claims["aud"], token_uri.as_str());
        assert_eq!(claims["scope"], LOGIN_SCOPE);
        let iat = claims["iat"].as_u64().expect("iat");
        assert_eq!(claims["exp"].as_u64(), Some(iat + 3600));
        let now = unix_seconds(SystemTime::now()).expect("clock");
        assert!(iat <= now && iat + 10 >= now, "iat {iat}, now {now}");
    }

    #[tokio::test]
    async fn a_user_refresh_token_is_exchanged_and_a_revoked_one_explained() {
        let (addr, request) = serve(token_reply(), After::Close).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("gcloud");
        let file = config.join("application_default_credentials.json");
        write(
            &file,
            &authorized_user_json(Some(&format!("http://{addr}/token"))),
        );
        let source = discover(&[("CLOUDSDK_CONFIG", config.to_str().expect("path"))])
            .expect("user credentials");
        let token = fetch(&source).await.expect("a token");
        assert_eq!(token.expose(), "ya29.c.test-token");
        let fields = form_fields(&request.await.expect("the request"));
        assert_eq!(fields["grant_type"], "refresh_token");
        assert_eq!(fields["refresh_token"], REFRESH_TOKEN);
        assert_eq!(fields["client_secret"], CLIENT_SECRET);
        assert!(fields["client_id"].ends_with(".apps.googleusercontent.com"));

        let (addr, _) = serve(
            reply(
                "400 Bad Request",
                r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#,
            ),
            After::Close,
        )
        .await;
        write(
            &file,
            &authorized_user_json(Some(&format!("http://{addr}/token"))),
        );
        let source = discover(&[("CLOUDSDK_CONFIG", config.to_str().expect("path"))])
            .expect("user credentials");
        let err = fetch(&source).await.expect_err("revoked").to_string();
        assert_eq!(
            err,
            format!(
                "gcp credentials from http://{addr}/token: HTTP 400 Bad Request (invalid_grant); \
                 the refresh token has expired or was revoked: run `gcloud auth application-default login` again"
            )
        );
    }

    async fn metadata_source(addr: std::net::SocketAddr) -> GcpTokenSource {
        discover(&[("GCE_METADATA_HOST", &addr.to_string())]).expect("metadata")
    }

    #[tokio::test]
    async fn the_metadata_server_is_asked_for_the_login_scope() {
        let (addr, request) = serve(token_reply(), After::HoldOpen).await;
        let source = metadata_source(addr).await;
        assert_eq!(source.describe(), format!("metadata server {addr}"));
        let token = fetch(&source).await.expect("a token");
        assert_eq!(token.expose(), "ya29.c.test-token");
        assert!(token.remaining() > Duration::from_secs(3590));
        let request = request.await.expect("the request");
        assert!(
            request.starts_with(
                "GET /computeMetadata/v1/instance/service-accounts/default/token\
                 ?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fsqlservice.login HTTP/1.1\r\n"
            ),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("\r\nmetadata-flavor: google\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn bad_replies_are_explained_without_their_text() {
        let origin = |addr| {
            format!(
                "gcp credentials from http://{addr}/computeMetadata/v1/instance/service-accounts/default/token: "
            )
        };
        let oversized = "x".repeat(http::MAX_BODY + 1);
        for (answer, expected) in [
            (
                reply("200 OK", "<html>ya29.SECRET</html>"),
                "returned something that is not a token (not JSON)",
            ),
            (
                reply("200 OK", r#"{"token":"ya29.SECRET","expires_in":3599}"#),
                "returned something that is not a token (no access_token)",
            ),
            (
                reply("200 OK", r#"{"access_token":"ya29.SECRET"}"#),
                "returned something that is not a token (no usable expires_in)",
            ),
            (
                reply("200 OK", r#"{"access_token":"ya29 SECRET","expires_in":3599}"#),
                "returned something that is not a token (an access_token that is not printable text)",
            ),
            (
                reply(
                    "200 OK",
                    r#"{"access_token":"ya29.SECRET","expires_in":3599,"token_type":"MAC"}"#,
                ),
                "returned something that is not a token (not a Bearer token)",
            ),
            (
                reply(
                    "500 Internal Server Error",
                    r#"{"error":"invalid_grant","error_description":"SECRET"}"#,
                ),
                "HTTP 500 Internal Server Error (invalid_grant)",
            ),
            (
                reply("403 Forbidden", r#"{"error":"SECRET text that is no code"}"#),
                "HTTP 403 Forbidden",
            ),
            (
                reply("403 Forbidden", r#"{"error":{"code":403,"message":"SECRET"}}"#),
                "HTTP 403 Forbidden",
            ),
            (
                reply("404 Not Found", "SECRET\n"),
                "HTTP 404 Not Found; is a service account attached to this instance or service?",
            ),
            (
                reply("200 OK", &oversized),
                "the reply is larger than 64 KiB",
            ),
            (
                b"SECRET garbage\r\n\r\n".to_vec(),
                "the reply is not HTTP/1.1 (invalid HTTP version parsed)",
            ),
        ] {
            let (addr, _) = serve(answer, After::Close).await;
            let err = fetch(&metadata_source(addr).await)
                .await
                .expect_err(expected)
                .to_string();
            assert_eq!(err, format!("{}{expected}", origin(addr)));
        }
    }

    #[tokio::test]
    async fn an_unreachable_metadata_server_says_what_to_do() {
        let addr = closed_port().await;
        let err = fetch(&metadata_source(addr).await)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.starts_with(&format!(
                "gcp credentials from http://{addr}/computeMetadata/v1/instance/service-accounts/default/token: \
                 connection to {addr} refused (is the metadata server reachable? On Cloud Run, GCE and GKE it is; \
                 outside Google Cloud, set GOOGLE_APPLICATION_CREDENTIALS"
            )),
            "{err}"
        );
        assert!(!err.contains("scopes"), "{err}");

        let source =
            discover(&[("GCE_METADATA_HOST", "metadata.keyhole-test.invalid")]).expect("metadata");
        let err = fetch(&source).await.expect_err("unresolvable").to_string();
        assert!(
            err.contains("cannot resolve metadata.keyhole-test.invalid")
                && err.contains("does not seem to run on Google Cloud"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_silent_endpoint_times_out() {
        let (addr, _) = serve(Vec::new(), After::HoldOpen).await;
        let source = GcpTokenSource::discover(
            &env(&[("GCE_METADATA_HOST", &addr.to_string())]),
            Duration::from_millis(100),
        )
        .expect("metadata");
        let err = fetch(&source).await.expect_err("timeout");
        assert!(matches!(err, CredentialsError::Timeout { .. }), "{err:?}");
        assert_eq!(err.to_string(), "gcp credentials: no answer within 100ms");
    }
}
