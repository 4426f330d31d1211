//! The two Systems Manager API calls a `via=ssm://INSTANCE-ID` hop makes:
//! `StartSession` (which hands out the data channel's `StreamUrl` and its
//! one-use `TokenValue`) and `TerminateSession`.
//!
//! Both are AWS JSON 1.1: `POST /` with `Content-Type:
//! application/x-amz-json-1.1`, `X-Amz-Target: AmazonSSM.<Operation>` and a
//! JSON body, signed with SigV4 in the `Authorization` header (service `ssm`).
//! An error reply is a JSON body `{"__type": ..., "message"|"Message": ...}`
//! whose `__type` may carry a namespace (`com.amazonaws.ssm#...`); it becomes
//! an [`SsmApiError`] that says what to fix and names the hop.
//!
//! The endpoint follows the AWS SDKs: `AWS_ENDPOINT_URL_SSM`, else
//! `AWS_ENDPOINT_URL`, else `https://ssm.{region}.amazonaws.com`
//! (`.amazonaws.com.cn` in China); `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`
//! turns the two variables off. TLS trusts the system roots plus the PEM
//! bundle in `AWS_CA_BUNDLE`, as the SDKs and the CLI do; [`tls_config`]
//! builds that trust once for the API and for the data channel's `wss://`.
//!
//! `StartSession` asks for the document `AWS-StartPortForwardingSessionToRemoteHost`
//! with `host` and `portNumber` only: `localPortNumber` is for the
//! session-manager-plugin's own listener (the agent reads `host`,
//! `portNumber` and the document's `type`, never it; the CLI sends it only
//! when the user gives it), and a custom document need not define it.
//!
//! The token is a secret: [`Session`]'s `Debug` leaves it out, and no error
//! holds it (nor any credential or request body).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::Method;
use rustls::ClientConfig;
use serde_json::{json, Value};

use crate::http::client::{client_with_tls, Client, HttpError, Request, Url};

/// The document keyhole asks for unless the hop names another.
pub const DEFAULT_DOCUMENT: &str = "AWS-StartPortForwardingSessionToRemoteHost";
/// The JSON 1.1 protocol's content type.
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// The SigV4 service name (and the endpoint prefix).
pub const SERVICE: &str = "ssm";
/// How long one API call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a service message an error repeats.
const MAX_MESSAGE: usize = 512;

// --- endpoint and trust -----------------------------------------------------------

fn var<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// The API endpoint for `region`: `AWS_ENDPOINT_URL_SSM`, else
/// `AWS_ENDPOINT_URL` (neither when `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`
/// is `true`), else the regional endpoint. The error names the variable.
pub fn endpoint(env: &HashMap<String, String>, region: &str) -> Result<Url, String> {
    let ignore = var(env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !ignore {
        for name in ["AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL"] {
            if let Some(text) = var(env, name) {
                return Url::parse(text).map_err(|e| format!("{name}: {e}"));
            }
        }
    }
    let valid = !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(format!(
            "'{region}' is not an AWS region name (like eu-west-1); set region= or AWS_REGION"
        ));
    }
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    Url::parse(&format!("https://{SERVICE}.{region}.{suffix}/")).map_err(|e| e.to_string())
}

/// The TLS client config for the API and the data channel: the system roots
/// (rustls-native-certs, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`)
/// plus every certificate in the PEM file `AWS_CA_BUNDLE` names. An
/// unreadable or empty bundle is an error naming the variable and the path.
pub fn tls_config(env: &HashMap<String, String>) -> Result<Arc<ClientConfig>, String> {
    let bundle =
        var(env, "AWS_CA_BUNDLE").map(|path| ("AWS_CA_BUNDLE", std::path::Path::new(path)));
    crate::transport::wss::tls_config(bundle)
}

// --- results and errors ---------------------------------------------------------

/// A started session: what the data channel needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    pub session_id: String,
    /// `wss://ssmmessages.{region}.amazonaws.com/v1/data-channel/{id}?...`.
    pub stream_url: String,
    token_value: String,
}

impl Session {
    pub fn new(session_id: String, stream_url: String, token_value: String) -> Session {
        Session {
            session_id,
            stream_url,
            token_value,
        }
    }

    /// The one-use token the data channel's `OpenDataChannel` frame carries.
    /// A secret: never log it.
    pub fn token_value(&self) -> &str {
        &self.token_value
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.session_id)
            .field("stream_url", &self.stream_url)
            .field("token_value", &"(redacted)")
            .finish()
    }
}

/// Why an API call failed, in words a user can act on. Every variant names
/// the hop; none holds a token, a credential or a request body.
#[derive(Debug, thiserror::Error)]
pub enum SsmApiError {
    #[error(
        "{hop}: not allowed to {action} on {resource}: check the IAM policy ({}) ({message})",
        policy_hint(.action)
    )]
    AccessDenied {
        hop: String,
        /// `ssm:StartSession` or `ssm:TerminateSession`.
        action: &'static str,
        /// The instance, or the session.
        resource: String,
        message: String,
    },
    #[error(
        "{hop}: the SSM agent on {target} is not connected: the instance is stopped, the agent \
         is not running, or it cannot reach the SSM endpoints (or the instance is in another \
         account or region) ({message})"
    )]
    TargetNotConnected {
        hop: String,
        target: String,
        message: String,
    },
    #[error(
        "{hop}: the SSM document {document} does not exist or is not shared with this \
         account ({message})"
    )]
    InvalidDocument {
        hop: String,
        document: String,
        message: String,
    },
    #[error(
        "{hop}: the SSM document {document} does not take the parameters keyhole sends \
         (host, portNumber): name a port-forwarding-to-remote-host document ({message})"
    )]
    InvalidParameters {
        hop: String,
        document: String,
        message: String,
    },
    #[error("{hop}: Systems Manager is throttling this account's requests ({kind}: {message})")]
    Throttled {
        hop: String,
        kind: String,
        message: String,
    },
    #[error(
        "{hop}: AWS refused the credentials ({kind}: {message}): they are expired, revoked or \
         for another partition, or the clock is off; refresh them (e.g. aws sso login)"
    )]
    CredentialsRejected {
        hop: String,
        kind: String,
        message: String,
    },
    #[error("{hop}: no AWS credentials to sign with: {reason}")]
    CredentialsUnavailable { hop: String, reason: String },
    #[error("{hop}: cannot sign the request: {reason}")]
    Signing { hop: String, reason: String },
    #[error("{hop}: {operation} failed with HTTP {status}: {kind}: {message}")]
    Service {
        hop: String,
        operation: &'static str,
        status: u16,
        kind: String,
        message: String,
    },
    #[error("{hop}: {endpoint} answered {operation} with HTTP {status} and {what}")]
    BadResponse {
        hop: String,
        endpoint: String,
        operation: &'static str,
        status: u16,
        what: String,
    },
    /// Resolving, connecting, TLS or the exchange failed; `cause` names the
    /// endpoint (kept whole so callers can tell TLS from a refused port).
    #[error("{hop}: cannot reach the SSM endpoint: {cause}")]
    Unreachable { hop: String, cause: HttpError },
    #[error("{hop}: {endpoint} did not answer {operation} within {} s", .after.as_secs())]
    Timeout {
        hop: String,
        endpoint: String,
        operation: &'static str,
        after: Duration,
    },
}

impl SsmApiError {
    /// A stable short name for metrics and log fields.
    pub fn label(&self) -> &'static str {
        match self {
            SsmApiError::AccessDenied { .. } => "ssm_access_denied",
            SsmApiError::TargetNotConnected { .. } => "ssm_target_not_connected",
            SsmApiError::InvalidDocument { .. } => "ssm_invalid_document",
            SsmApiError::InvalidParameters { .. } => "ssm_invalid_parameters",
            SsmApiError::Throttled { .. } => "ssm_throttled",
            SsmApiError::CredentialsRejected { .. } => "ssm_credentials_rejected",
            SsmApiError::CredentialsUnavailable { .. } => "ssm_credentials_unavailable",
            SsmApiError::Signing { .. } => "ssm_signing",
            SsmApiError::Service { .. } => "ssm_api_error",
            SsmApiError::BadResponse { .. } => "ssm_bad_response",
            SsmApiError::Unreachable { .. } => "ssm_unreachable",
            SsmApiError::Timeout { .. } => "ssm_timeout",
        }
    }

    /// Whether trying again later may succeed without anyone changing
    /// anything (throttling, the service's own failures, the network).
    pub fn is_transient(&self) -> bool {
        match self {
            SsmApiError::Throttled { .. }
            | SsmApiError::Unreachable { .. }
            | SsmApiError::Timeout { .. } => true,
            SsmApiError::Service { status, .. } | SsmApiError::BadResponse { status, .. } => {
                *status >= 500
            }
            _ => false,
        }
    }
}

/// What the policy must allow for `action`.
fn policy_hint(action: &str) -> &'static str {
    if action == "ssm:TerminateSession" {
        "ssm:TerminateSession on the session, arn:aws:ssm:REGION:ACCOUNT:session/${aws:userid}-*"
    } else {
        "ssm:StartSession on the instance and the document"
    }
}

/// What an error body said: the type without its namespace, and the message.
fn parse_error_body(body: &[u8]) -> Option<(String, String)> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let raw = value.get("__type")?.as_str()?;
    // `aws.protocoltests#Type`, or `Type:http://...` as in x-amzn-ErrorType.
    let kind = raw.rsplit('#').next().unwrap_or(raw);
    let kind = kind.split(':').next().unwrap_or(kind).trim();
    let message = ["message", "Message", "errorMessage"]
        .iter()
        .find_map(|k| value.get(*k).and_then(Value::as_str))
        .unwrap_or("");
    Some((clean(kind, 128), clean(message, MAX_MESSAGE)))
}

/// `text` without control characters, cut at `max` characters.
fn clean(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// Which call an error came from, with what the error messages name.
#[derive(Debug, Clone, Copy)]
enum Call<'a> {
    Start { target: &'a str, document: &'a str },
    Terminate { session_id: &'a str },
}

impl Call<'_> {
    fn operation(&self) -> &'static str {
        match self {
            Call::Start { .. } => "StartSession",
            Call::Terminate { .. } => "TerminateSession",
        }
    }
}

/// Maps a non-2xx reply onto [`SsmApiError`].
fn map_error(hop: &str, endpoint: &str, call: Call<'_>, status: u16, body: &[u8]) -> SsmApiError {
    let hop = hop.to_owned();
    let operation = call.operation();
    let Some((kind, message)) = parse_error_body(body) else {
        return SsmApiError::BadResponse {
            hop,
            endpoint: endpoint.to_owned(),
            operation,
            status,
            what: "a body that is not an AWS JSON error".to_owned(),
        };
    };
    let (target, document) = match call {
        Call::Start { target, document } => (target, document),
        Call::Terminate { session_id } => (session_id, ""),
    };
    match kind.as_str() {
        "AccessDeniedException" | "AccessDenied" => SsmApiError::AccessDenied {
            hop,
            action: match call {
                Call::Start { .. } => "ssm:StartSession",
                Call::Terminate { .. } => "ssm:TerminateSession",
            },
            resource: target.to_owned(),
            message,
        },
        "TargetNotConnected" => SsmApiError::TargetNotConnected {
            hop,
            target: target.to_owned(),
            message,
        },
        "InvalidDocument" if matches!(call, Call::Start { .. }) => SsmApiError::InvalidDocument {
            hop,
            document: document.to_owned(),
            message,
        },
        "InvalidParameters" if matches!(call, Call::Start { .. }) => {
            SsmApiError::InvalidParameters {
                hop,
                document: document.to_owned(),
                message,
            }
        }
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => SsmApiError::Throttled { hop, kind, message },
        "ExpiredTokenException"
        | "ExpiredToken"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationTokenException"
        | "MissingAuthenticationToken" => SsmApiError::CredentialsRejected { hop, kind, message },
        _ => SsmApiError::Service {
            hop,
            operation,
            status,
            kind,
            message,
        },
    }
}

// --- the client -----------------------------------------------------------------------

/// The SSM API for one hop: endpoint, region, credentials and the HTTP client.
pub struct SsmApi {
    hop: String,
    region: String,
    endpoint: Url,
    credentials: SharedCredentialsProvider,
    client: Client,
}

impl fmt::Debug for SsmApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsmApi")
            .field("hop", &self.hop)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl SsmApi {
    /// The API for `hop` (e.g. `ssm://i-0abc`, for messages) in `region`,
    /// with the endpoint and trust that `env` configures (see [`endpoint`] and
    /// [`tls_config`]) and the proxy variables in `env`.
    pub fn new(
        hop: &str,
        env: &HashMap<String, String>,
        region: &str,
        credentials: SharedCredentialsProvider,
    ) -> Result<SsmApi, String> {
        let tls = tls_config(env).map_err(|e| format!("{hop}: {e}"))?;
        SsmApi::with_tls(hop, env, region, credentials, tls)
    }

    /// [`SsmApi::new`] with a TLS config of the caller's (shared with the
    /// data channel, or a test's private CA).
    pub fn with_tls(
        hop: &str,
        env: &HashMap<String, String>,
        region: &str,
        credentials: SharedCredentialsProvider,
        tls: Arc<ClientConfig>,
    ) -> Result<SsmApi, String> {
        let endpoint = endpoint(env, region).map_err(|e| format!("{hop}: {e}"))?;
        Ok(SsmApi {
            hop: hop.to_owned(),
            region: region.to_owned(),
            endpoint,
            credentials,
            client: client_with_tls(env, tls),
        })
    }

    pub fn hop(&self) -> &str {
        &self.hop
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// `StartSession` on `target` with `document` (see [`DEFAULT_DOCUMENT`]),
    /// forwarding to `host`:`port` as the agent resolves and dials it.
    pub async fn start_session(
        &self,
        target: &str,
        document: &str,
        host: &str,
        port: u16,
    ) -> Result<Session, SsmApiError> {
        let body = json!({
            "Target": target,
            "DocumentName": document,
            "Parameters": {
                "host": [host],
                "portNumber": [port.to_string()],
            },
        });
        let call = Call::Start { target, document };
        let (status, reply) = self.call(call, &body).await?;
        let bad = |what: &str| SsmApiError::BadResponse {
            hop: self.hop.clone(),
            endpoint: self.endpoint.to_string(),
            operation: call.operation(),
            status,
            what: what.to_owned(),
        };
        let value: Value =
            serde_json::from_slice(&reply).map_err(|_| bad("a body that is not JSON"))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("no {name} in the reply")))
        };
        let session_id = field("SessionId")?;
        let stream_url = field("StreamUrl")?;
        let token_value = field("TokenValue")?;
        if !stream_url.starts_with("wss://") && !stream_url.starts_with("ws://") {
            return Err(bad("a StreamUrl that is not a wss:// URL"));
        }
        Ok(Session {
            session_id,
            stream_url,
            token_value,
        })
    }

    /// `TerminateSession`: ends the session on the service's side (the agent
    /// closes its end; the data channel gets `channel_closed`).
    pub async fn terminate_session(&self, session_id: &str) -> Result<(), SsmApiError> {
        let body = json!({ "SessionId": session_id });
        self.call(Call::Terminate { session_id }, &body)
            .await
            .map(|_| ())
    }

    /// Signs and sends one call; a 2xx reply's status and body, else the
    /// mapped error.
    async fn call(&self, call: Call<'_>, body: &Value) -> Result<(u16, bytes::Bytes), SsmApiError> {
        let operation = call.operation();
        let credentials = self.credentials.provide_credentials().await.map_err(|e| {
            SsmApiError::CredentialsUnavailable {
                hop: self.hop.clone(),
                reason: crate::credentials::aws::chain_text(&e),
            }
        })?;
        let body = body.to_string().into_bytes();
        let target = format!("AmazonSSM.{operation}");
        let signed = sign_headers(
            &self.endpoint,
            &self.region,
            &credentials,
            &target,
            &body,
            SystemTime::now(),
        )
        .map_err(|reason| SsmApiError::Signing {
            hop: self.hop.clone(),
            reason,
        })?;
        let mut request =
            Request::new(Method::POST, self.endpoint.clone()).header("x-amz-target", target);
        for (name, value) in signed {
            request = request.header(name, value);
        }
        let request = request.body(CONTENT_TYPE, body);
        let response = match tokio::time::timeout(CALL_TIMEOUT, self.client.send(request)).await {
            Err(_) => {
                return Err(SsmApiError::Timeout {
                    hop: self.hop.clone(),
                    endpoint: self.endpoint.to_string(),
                    operation,
                    after: CALL_TIMEOUT,
                })
            }
            Ok(Err(cause)) => {
                return Err(SsmApiError::Unreachable {
                    hop: self.hop.clone(),
                    cause,
                })
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status.as_u16();
        if response.status.is_success() {
            Ok((status, response.body))
        } else {
            Err(map_error(
                &self.hop,
                &self.endpoint.to_string(),
                call,
                status,
                &response.body,
            ))
        }
    }
}

/// The SigV4 headers (`x-amz-date`, `authorization`, and
/// `x-amz-security-token` when the credentials have a session token) for a
/// JSON 1.1 POST of `body` to `endpoint`, signed over `host`,
/// `content-type` and `x-amz-target` as the client will send them.
pub fn sign_headers(
    endpoint: &Url,
    region: &str,
    credentials: &Credentials,
    target: &str,
    body: &[u8],
    time: SystemTime,
) -> Result<Vec<(&'static str, String)>, String> {
    let identity = Identity::from(credentials.clone());
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::Headers;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let authority = endpoint.authority();
    let scheme = if endpoint.is_https() { "https" } else { "http" };
    let url = format!("{scheme}://{authority}{}", endpoint.path_and_query());
    let headers = [
        ("host", authority.as_str()),
        ("content-type", CONTENT_TYPE),
        ("x-amz-target", target),
    ];
    let signable = SignableRequest::new(
        "POST",
        url.as_str(),
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let (headers, _params) = instructions.into_parts();
    Ok(headers
        .into_iter()
        .map(|h| (h.name(), h.value().to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn shown(url: Result<Url, String>) -> String {
        let url = url.expect("an endpoint");
        format!(
            "{}://{}{}",
            if url.is_https() { "https" } else { "http" },
            url.authority(),
            url.path_and_query()
        )
    }

    #[test]
    fn endpoint_is_regional_by_default() {
        assert_eq!(
            shown(endpoint(&env(&[]), "eu-west-1")),
            "https://ssm.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            shown(endpoint(&env(&[]), "cn-north-1")),
            "https://ssm.cn-north-1.amazonaws.com.cn/"
        );
    }

    #[test]
    fn endpoint_variables_in_sdk_order() {
        let both = env(&[
            ("AWS_ENDPOINT_URL", "https://all.example:8443"),
            ("AWS_ENDPOINT_URL_SSM", "https://ssm.example:9443/base"),
        ]);
        assert_eq!(
            shown(endpoint(&both, "us-east-1")),
            "https://ssm.example:9443/base"
        );
        let general = env(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")]);
        assert_eq!(
            shown(endpoint(&general, "us-east-1")),
            "http://127.0.0.1:4566/"
        );
        let empty = env(&[("AWS_ENDPOINT_URL_SSM", " "), ("AWS_ENDPOINT_URL", "")]);
        assert_eq!(
            shown(endpoint(&empty, "us-east-1")),
            "https://ssm.us-east-1.amazonaws.com/"
        );
    }

    #[test]
    fn endpoint_variables_can_be_ignored() {
        let mut vars = env(&[
            ("AWS_ENDPOINT_URL_SSM", "https://ssm.example"),
            ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "TRUE"),
        ]);
        assert_eq!(
            shown(endpoint(&vars, "us-west-2")),
            "https://ssm.us-west-2.amazonaws.com/"
        );
        vars.insert("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS".into(), "false".into());
        assert_eq!(shown(endpoint(&vars, "us-west-2")), "https://ssm.example/");
    }

    #[test]
    fn endpoint_errors_name_the_variable_or_region() {
        let bad = env(&[("AWS_ENDPOINT_URL_SSM", "ftp://x")]);
        let e = endpoint(&bad, "us-east-1").expect_err("refused");
        assert!(e.starts_with("AWS_ENDPOINT_URL_SSM: "), "{e}");
        let e = endpoint(&env(&[]), "").expect_err("refused");
        assert!(e.contains("region"), "{e}");
        let e = endpoint(&env(&[]), "evil.com/x").expect_err("refused");
        assert!(e.contains("evil.com/x"), "{e}");
    }

    #[test]
    fn tls_config_bundle_errors_name_variable_and_path() {
        let e = tls_config(&env(&[("AWS_CA_BUNDLE", "/nonexistent/ca.pem")])).expect_err("refused");
        assert!(
            e.contains("AWS_CA_BUNDLE") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("keyhole-ssm-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let path = empty.display().to_string();
        let e = tls_config(&env(&[("AWS_CA_BUNDLE", &path)])).expect_err("refused");
        assert!(e.contains("AWS_CA_BUNDLE") && e.contains(&path), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn start(status: u16, body: &str) -> SsmApiError {
        map_error(
            "ssm://i-0abc",
            "https://ssm.eu-west-1.amazonaws.com/",
            Call::Start {
                target: "i-0abc",
                document: DEFAULT_DOCUMENT,
            },
            status,
            body.as_bytes(),
        )
    }

    #[test]
    fn access_denied_says_what_to_fix() {
        let e = start(
            400,
            r#"{"__type":"AccessDeniedException","Message":"User: arn:aws:sts::1:assumed-role/r/s is not authorized to perform: ssm:StartSession"}"#,
        );
        assert_eq!(e.label(), "ssm_access_denied");
        let text = e.to_string();
        assert!(
            text.starts_with("ssm://i-0abc: not allowed to ssm:StartSession on i-0abc"),
            "{text}"
        );
        assert!(
            text.contains("IAM policy") && text.contains("is not authorized"),
            "{text}"
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn namespaced_types_and_lower_case_message() {
        let e = start(
            400,
            r#"{"__type":"com.amazonaws.ssm#TargetNotConnected","message":"i-0abc is not connected."}"#,
        );
        assert_eq!(e.label(), "ssm_target_not_connected");
        let text = e.to_string();
        assert!(
            text.contains("SSM agent on i-0abc is not connected"),
            "{text}"
        );
        assert!(text.contains("i-0abc is not connected."), "{text}");
        let e = start(
            400,
            r#"{"__type":"com.amazon.coral.service#UnrecognizedClientException","message":"The security token included in the request is invalid."}"#,
        );
        assert_eq!(e.label(), "ssm_credentials_rejected");
        assert!(e.to_string().contains("UnrecognizedClientException"), "{e}");
        let e = start(
            400,
            r#"{"__type":"ExpiredTokenException","message":"expired"}"#,
        );
        assert_eq!(e.label(), "ssm_credentials_rejected");
    }

    #[test]
    fn other_types_keep_type_and_message() {
        let e = start(
            400,
            r#"{"__type":"InvalidDocument","Message":"no such doc"}"#,
        );
        assert_eq!(e.label(), "ssm_invalid_document");
        assert!(e.to_string().contains(DEFAULT_DOCUMENT), "{e}");
        let e = start(400, r#"{"__type":"InvalidParameters","Message":"bad"}"#);
        assert_eq!(e.label(), "ssm_invalid_parameters");
        let e = start(
            400,
            r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
        );
        assert_eq!(e.label(), "ssm_throttled");
        assert!(e.is_transient());
        let e = start(500, r#"{"__type":"InternalServerError","Message":"oops"}"#);
        assert_eq!(e.label(), "ssm_api_error");
        let text = e.to_string();
        assert!(
            text.contains("HTTP 500") && text.contains("InternalServerError: oops"),
            "{text}"
        );
        assert!(e.is_transient());
        let e = start(502, "<html>bad gateway</html>");
        assert_eq!(e.label(), "ssm_bad_response");
        assert!(e.to_string().contains("HTTP 502"), "{e}");
    }

    #[test]
    fn terminate_errors_are_not_about_documents() {
        let terminate = |body: &[u8]| {
            map_error(
                "ssm://i-0abc",
                "https://ssm.eu-west-1.amazonaws.com/",
                Call::Terminate {
                    session_id: "keyhole-0123",
                },
                400,
                body,
            )
        };
        let e = terminate(br#"{"__type":"InvalidDocument","Message":"x"}"#);
        assert_eq!(e.label(), "ssm_api_error");
        assert!(e.to_string().contains("TerminateSession"), "{e}");
        let e = terminate(br#"{"__type":"AccessDeniedException","Message":"no"}"#);
        assert_eq!(e.label(), "ssm_access_denied");
        let text = e.to_string();
        assert!(
            text.contains("not allowed to ssm:TerminateSession on keyhole-0123"),
            "{text}"
        );
    }

    #[test]
    fn messages_are_cleaned_and_capped() {
        let long = "x".repeat(2000);
        let body = format!(r#"{{"__type":"Weird","message":"a\nb{long}"}}"#);
        let text = start(400, &body).to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.len() < 900, "{}", text.len());
    }

    #[test]
    fn session_debug_hides_the_token() {
        let s = Session::new(
            "keyhole-test-0123456789abcdef0".into(),
            "wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/x".into(),
            "SECRET-TOKEN-VALUE".into(),
        );
        let shown = format!("{s:?}");
        assert!(!shown.contains("SECRET-TOKEN-VALUE"), "{shown}");
        assert!(shown.contains("keyhole-test-0123456789abcdef0"), "{shown}");
        assert_eq!(s.token_value(), "SECRET-TOKEN-VALUE");
    }

    #[test]
    fn signed_headers_cover_the_session_token() {
        let url = Url::parse("https://ssm.eu-west-1.amazonaws.com/").expect("url");
        let with = Credentials::new("AKID", "secret", Some("TOKEN".into()), None, "test");
        let headers = sign_headers(
            &url,
            "eu-west-1",
            &with,
            "AmazonSSM.StartSession",
            b"{}",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )
        .expect("signed");
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("x-amz-date"), Some("20231114T221320Z"));
        assert_eq!(get("x-amz-security-token"), Some("TOKEN"));
        let auth = get("authorization").expect("authorization");
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKID/20231114/eu-west-1/ssm/aws4_request"
            ),
            "{auth}"
        );
        assert!(
            auth.contains(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
            ),
            "{auth}"
        );
        let without = Credentials::new("AKID", "secret", None, None, "test");
        let headers = sign_headers(
            &url,
            "eu-west-1",
            &without,
            "AmazonSSM.StartSession",
            b"{}",
            SystemTime::now(),
        )
        .expect("signed");
        assert!(headers.iter().all(|(k, _)| *k != "x-amz-security-token"));
    }

    #[test]
    fn debug_of_errors_hold_no_body() {
        // The error keeps the service's message only, never the request.
        let e = start(400, r#"{"__type":"AccessDeniedException","Message":"m"}"#);
        let shown = format!("{e:?}");
        assert!(!shown.contains("TokenValue"), "{shown}");
    }
}
