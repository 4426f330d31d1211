//! `--impersonate-service-account`: the Cloud SQL connector acts as a
//! service account whose key it does not hold, as cloud-sql-proxy v2 does.
//!
//! The flag is a comma-separated delegation chain, read as cloud-sql-proxy
//! reads it: the first entry is the target, the service account whose
//! tokens keyhole uses; the entries after it are delegates, and the last one
//! given is the first hop. With `sa1,sa2,sa3`, keyhole's own credentials (the
//! base) act as `sa3`, which acts as `sa2`, which acts as the target `sa1`.
//! Each hop needs `roles/iam.serviceAccountTokenCreator` on the next.
//!
//! Every token comes from the IAM Service Account Credentials API:
//! `POST {endpoint}/v1/projects/-/serviceAccounts/{target}:generateAccessToken`
//! with `{"delegates": ["projects/-/serviceAccounts/{email}", ...] (first hop
//! first), "scope": [scope], "lifetime": "3600s"}` and the base's token
//! (scope `cloud-platform`) as `Authorization: Bearer`. The reply is
//! `{"accessToken", "expireTime"}` (RFC 3339); an error is Google's JSON
//! error body, read only for its `status` and `reason` codes.
//!
//! The base token is kept while it has time left, so the admin and the
//! login source (which share one base) need one base token between them.
//! No token, base or impersonated, reaches an error message or `Debug`.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::{CredentialsError, Token, TokenFuture, TokenRequest, TokenSource};
use crate::config::Protocol;
use crate::http::client::{self as http_client, Request, Response, Url};

const PROVIDER: &str = "gcp";

/// The scope the base token needs for the IAM Credentials API.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The IAM Credentials API of the default universe `googleapis.com`.
pub const DEFAULT_ENDPOINT: &str = "https://iamcredentials.googleapis.com";

/// What every impersonated token is asked for: the longest the API grants
/// without an organization policy. The cache refreshes it ahead of expiry.
const LIFETIME: &str = "3600s";

/// The role each hop of the chain needs on the next.
const TOKEN_CREATOR: &str = "roles/iam.serviceAccountTokenCreator";

/// A base token is reused while it has more than this left.
const BASE_MARGIN: Duration = Duration::from_secs(60);

/// An impersonation chain as `--impersonate-service-account` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The service account whose tokens keyhole uses.
    pub target: String,
    /// The delegates in hop order: the base acts as the first.
    pub delegates: Vec<String>,
}

impl Chain {
    /// Reads the flag's entries in the order given: the first is the
    /// target, the rest are delegates, the last of them the first hop.
    /// `None` for no entries.
    pub fn from_flag(entries: &[String]) -> Option<Chain> {
        let (target, rest) = entries.split_first()?;
        Some(Chain {
            target: target.clone(),
            delegates: rest.iter().rev().cloned().collect(),
        })
    }

    /// The hops after the base, in order, ending with the target.
    fn hops(&self) -> impl Iterator<Item = &str> {
        self.delegates
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(self.target.as_str()))
    }
}

/// The credentials impersonation starts from (Application Default
/// Credentials, `--credentials-file`, `--json-credentials` with the
/// `cloud-platform` scope, or `--token`), shared by the sources that
/// impersonate with them.
pub struct BaseCredentials {
    source: Arc<dyn TokenSource>,
    /// The last base token, reused while it has time left.
    last: tokio::sync::Mutex<Option<Token>>,
}

impl BaseCredentials {
    pub fn new(source: Arc<dyn TokenSource>) -> Arc<BaseCredentials> {
        Arc::new(BaseCredentials {
            source,
            last: tokio::sync::Mutex::new(None),
        })
    }

    /// Who the base is, for messages (no secret).
    pub fn describe(&self) -> String {
        self.source.describe()
    }

    async fn token(&self, request: &TokenRequest) -> Result<Token, CredentialsError> {
        let mut last = self.last.lock().await;
        if let Some(token) = last.as_ref().filter(|t| t.remaining() > BASE_MARGIN) {
            return Ok(token.clone());
        }
        let token = self.source.fetch(request).await?;
        *last = Some(token.clone());
        Ok(token)
    }

    /// Drops `used` if it is still the kept token: the API refused it.
    async fn forget(&self, used: &Token) {
        let mut last = self.last.lock().await;
        if last.as_ref().is_some_and(|t| t.expose() == used.expose()) {
            *last = None;
        }
    }
}

/// Mints tokens of one scope for the chain's target.
pub struct ImpersonatedTokenSource {
    base: Arc<BaseCredentials>,
    chain: Chain,
    /// `{endpoint}/v1/projects/-/serviceAccounts/{target}:generateAccessToken`.
    url: Url,
    scope: &'static str,
    /// Bound on one fetch, the base token's included.
    timeout: Duration,
}

impl ImpersonatedTokenSource {
    /// `endpoint`: `--iam-credentials-endpoint`, or the default for the
    /// universe; `scope`: what the tokens are for (the Admin API's, or IAM
    /// database login's).
    pub fn new(
        base: Arc<BaseCredentials>,
        chain: Chain,
        endpoint: &str,
        scope: &'static str,
        timeout: Duration,
    ) -> Result<ImpersonatedTokenSource, CredentialsError> {
        let text = format!(
            "{}/v1/projects/-/serviceAccounts/{}:generateAccessToken",
            endpoint.trim_end_matches('/'),
            chain.target
        );
        let url = Url::parse(&text).map_err(|e| CredentialsError::Source {
            provider: PROVIDER,
            origin: "--iam-credentials-endpoint".into(),
            reason: e.to_string(),
        })?;
        Ok(ImpersonatedTokenSource {
            base,
            chain,
            url,
            scope,
            timeout,
        })
    }

    /// The `generateAccessToken` request body.
    fn request_body(&self) -> Vec<u8> {
        let delegates: Vec<String> = self
            .chain
            .delegates
            .iter()
            .map(|email| format!("projects/-/serviceAccounts/{email}"))
            .collect();
        json!({
            "delegates": delegates,
            "scope": [self.scope],
            "lifetime": LIFETIME,
        })
        .to_string()
        .into_bytes()
    }

    async fn mint(&self, request: &TokenRequest) -> Result<Token, CredentialsError> {
        let base = self.base.token(request).await?;
        let call = Request::new(Method::POST, self.url.clone())
            .header("Authorization", format!("Bearer {}", base.expose()))
            .body("application/json", self.request_body());
        let response = http_client::send(call)
            .await
            .map_err(|e| self.error(e.kind().to_string()))?;
        if response.status == StatusCode::UNAUTHORIZED {
            // A revoked or expired base token: fetch a new one next time.
            self.base.forget(&base).await;
        }
        if !response.status.is_success() {
            return Err(self.error(self.rejected(&response)));
        }
        token_from(&response.body)
            .map_err(|what| self.error(format!("returned something that is not a token ({what})")))
    }

    fn error(&self, reason: String) -> CredentialsError {
        CredentialsError::Source {
            provider: PROVIDER,
            origin: self.url.to_string(),
            reason,
        }
    }

    /// Why an error status, in the words a user acts on: the status,
    /// Google's codes, and for 401, 403 and 404 what to check.
    fn rejected(&self, response: &Response) -> String {
        let codes = super::gcp::google_error_codes(&response.body);
        let mut reason = format!("HTTP {}", response.status);
        if !codes.is_empty() {
            reason.push_str(&format!(" ({})", codes.join(", ")));
        }
        let base = self.base.describe();
        let target = &self.chain.target;
        let hint = match response.status {
            StatusCode::FORBIDDEN if codes.iter().any(|c| c == "SERVICE_DISABLED") => {
                "the IAM Service Account Credentials API (iamcredentials.googleapis.com) is \
                 disabled in the caller's project: enable it there"
                    .to_owned()
            }
            StatusCode::FORBIDDEN if self.chain.delegates.is_empty() => format!(
                "{base} may not impersonate service account {target}: it needs the role \
                 {TOKEN_CREATOR} (Service Account Token Creator) on {target}; Google also \
                 answers 403 when the service account does not exist"
            ),
            StatusCode::FORBIDDEN => {
                let mut grants = Vec::new();
                let mut from = base.as_str();
                for hop in self.chain.hops() {
                    grants.push(format!("{from} on {hop}"));
                    from = hop;
                }
                format!(
                    "{base} may not impersonate service account {target} through {}: each \
                     needs the role {TOKEN_CREATOR} (Service Account Token Creator) on the \
                     next ({}); Google also answers 403 when a service account in the chain \
                     does not exist",
                    self.chain.delegates.join(", then "),
                    grants.join("; ")
                )
            }
            StatusCode::NOT_FOUND if self.chain.delegates.is_empty() => format!(
                "service account not found: check that {target} (--impersonate-service-account) exists"
            ),
            StatusCode::NOT_FOUND => format!(
                "service account not found: check that {target} and the delegates {} \
                 (--impersonate-service-account) exist",
                self.chain.delegates.join(", ")
            ),
            StatusCode::UNAUTHORIZED => format!(
                "the IAM Credentials API did not accept the token of {base}; it must be valid \
                 and carry the scope {CLOUD_PLATFORM_SCOPE}"
            ),
            _ => String::new(),
        };
        if !hint.is_empty() {
            reason.push_str(": ");
            reason.push_str(&hint);
        }
        reason
    }
}

impl TokenSource for ImpersonatedTokenSource {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "service account {} impersonated by {}",
            self.chain.target,
            self.base.describe()
        );
        if !self.chain.delegates.is_empty() {
            text.push_str(" through ");
            text.push_str(&self.chain.delegates.join(", then "));
        }
        text
    }

    /// The target serves every endpoint and user: the request only goes on
    /// to the base.
    fn fetch<'a>(&'a self, request: &'a TokenRequest) -> TokenFuture<'a> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.mint(request))
                .await
                .unwrap_or(Err(CredentialsError::Timeout {
                    provider: PROVIDER,
                    after: self.timeout,
                }))
        })
    }

    fn database_user(&self, user: &str, protocol: Protocol) -> String {
        self.base.source.database_user(user, protocol)
    }
}

impl fmt::Debug for ImpersonatedTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ImpersonatedTokenSource({}, scope {}, timeout {:?})",
            self.describe(),
            self.scope,
            self.timeout
        )
    }
}

/// The token in a `generateAccessToken` reply; `Err` says what is wrong
/// without quoting the body.
fn token_from(body: &[u8]) -> Result<Token, &'static str> {
    let reply: Value = serde_json::from_slice(body).map_err(|_| "not JSON")?;
    let access_token = reply
        .get("accessToken")
        .and_then(Value::as_str)
        .ok_or("no accessToken")?;
    // It goes into an Authorization header and a certificate request:
    // printable ASCII only.
    if access_token.is_empty() || !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an accessToken that is not printable text");
    }
    let expires_at = reply
        .get("expireTime")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
        .ok_or("no usable expireTime")?;
    if expires_at <= SystemTime::now() {
        return Err("an expireTime in the past");
    }
    Ok(Token::new(access_token, expires_at))
}

/// An RFC 3339 timestamp (`2024-08-26T22:00:00Z`, with optional fractional
/// seconds and a `Z` or `±hh:mm` offset) as a `SystemTime`; `None` for
/// anything else or a time before 1970.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, d) in fraction.bytes().take(digits.min(9)).enumerate() {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let field = |hi: &u8, lo: &u8| -> Option<i64> {
                (hi.is_ascii_digit() && lo.is_ascii_digit())
                    .then(|| i64::from(hi - b'0') * 10 + i64::from(lo - b'0'))
            };
            let (h, m) = (field(h1, h2)?, field(m1, m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let seconds = h * 3600 + m * 60;
            if *sign == b'+' {
                seconds
            } else {
                -seconds
            }
        }
        _ => return None,
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    // A leap second (60) is read as the next second.
    if !(1..=month_days).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let seconds = crate::civil::days_from_civil(year, month, day) * 86_400
        + hour * 3600
        + minute * 60
        + second
        - offset;
    let seconds = u64::try_from(seconds).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::gcp::{ADMIN_SCOPE, LOGIN_SCOPE};
    use crate::http::client::testing::{closed_port, reply, serve, After};

    const BASE_TOKEN: &str = "ya29.base-SECRET-token";
    const MINTED: &str = "ya29.impersonated-SECRET-token";
    const TARGET: &str = "target@p.iam.gserviceaccount.com";

    /// A base that hands out [`BASE_TOKEN`] and counts its fetches.
    struct Base {
        fetches: std::sync::atomic::AtomicUsize,
        lifetime: Duration,
    }

    impl TokenSource for Base {
        fn provider(&self) -> &'static str {
            PROVIDER
        }
        fn describe(&self) -> String {
            "the token given with --token".into()
        }
        fn fetch<'a>(&'a self, _request: &'a TokenRequest) -> TokenFuture<'a> {
            self.fetches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let token = Token::new(BASE_TOKEN, SystemTime::now() + self.lifetime);
            Box::pin(async move { Ok(token) })
        }
    }

    fn base_with(lifetime: Duration) -> (Arc<Base>, Arc<BaseCredentials>) {
        let base = Arc::new(Base {
            fetches: Default::default(),
            lifetime,
        });
        (base.clone(), BaseCredentials::new(base))
    }

    fn entries(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn source(endpoint: &str, chain: &[&str], scope: &'static str) -> ImpersonatedTokenSource {
        let (_, base) = base_with(Duration::from_secs(3600));
        source_on(base, endpoint, chain, scope)
    }

    fn source_on(
        base: Arc<BaseCredentials>,
        endpoint: &str,
        chain: &[&str],
        scope: &'static str,
    ) -> ImpersonatedTokenSource {
        let chain = Chain::from_flag(&entries(chain)).expect("a chain");
        ImpersonatedTokenSource::new(base, chain, endpoint, scope, Duration::from_secs(5))
            .expect("a source")
    }

    fn request() -> TokenRequest {
        TokenRequest {
            host: "sqladmin".into(),
            port: 443,
            user: String::new(),
        }
    }

    fn body_of(request: &str) -> Value {
        let body = request.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).expect("a JSON body")
    }

    fn minted_reply(expire_time: &str) -> Vec<u8> {
        reply(
            "200 OK",
            &json!({"accessToken": MINTED, "expireTime": expire_time}).to_string(),
        )
    }

    fn in_an_hour() -> String {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600;
        let (y, m, d) = crate::civil::civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    #[test]
    fn the_first_entry_is_the_target_and_the_last_the_first_hop() {
        let chain = Chain::from_flag(&entries(&["sa1@p", "sa2@p", "sa3@p"])).expect("a chain");
        assert_eq!(chain.target, "sa1@p");
        assert_eq!(chain.delegates, ["sa3@p", "sa2@p"]);
        assert_eq!(
            chain.hops().collect::<Vec<_>>(),
            ["sa3@p", "sa2@p", "sa1@p"]
        );
        let alone = Chain::from_flag(&entries(&["sa1@p"])).expect("a chain");
        assert!(alone.delegates.is_empty());
        assert_eq!(Chain::from_flag(&[]), None);
    }

    #[test]
    fn the_request_names_the_target_the_delegates_in_hop_order_the_scope_and_an_hour() {
        let s = source(
            "https://iamcredentials.googleapis.com/",
            &[
                TARGET,
                "d1@p.iam.gserviceaccount.com",
                "d2@p.iam.gserviceaccount.com",
            ],
            ADMIN_SCOPE,
        );
        assert_eq!(
            s.url.to_string(),
            format!(
                "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken"
            )
        );
        let body: Value = serde_json::from_slice(&s.request_body()).expect("JSON");
        assert_eq!(
            body,
            json!({
                "delegates": [
                    "projects/-/serviceAccounts/d2@p.iam.gserviceaccount.com",
                    "projects/-/serviceAccounts/d1@p.iam.gserviceaccount.com",
                ],
                "scope": ["https://www.googleapis.com/auth/sqlservice.admin"],
                "lifetime": "3600s",
            })
        );
        let alone = source("https://iamcredentials.example", &[TARGET], LOGIN_SCOPE);
        let body: Value = serde_json::from_slice(&alone.request_body()).expect("JSON");
        assert_eq!(body["delegates"], json!([]));
        assert_eq!(body["scope"], json!([LOGIN_SCOPE]));
    }

    #[test]
    fn describe_and_debug_name_the_chain_and_no_token() {
        let s = source("http://127.0.0.1:9", &[TARGET], ADMIN_SCOPE);
        assert_eq!(
            s.describe(),
            format!("service account {TARGET} impersonated by the token given with --token")
        );
        let s = source("http://127.0.0.1:9", &[TARGET, "a@p", "b@p"], ADMIN_SCOPE);
        assert_eq!(
            s.describe(),
            format!(
                "service account {TARGET} impersonated by the token given with --token through b@p, then a@p"
            )
        );
        assert!(!format!("{s:?}").contains("SECRET"));
        assert_eq!(s.provider(), "gcp");
    }

    #[test]
    fn a_reply_is_read_for_its_token_and_expiry() {
        let token = token_from(
            json!({"accessToken": MINTED, "expireTime": "2999-01-02T03:04:05Z"})
                .to_string()
                .as_bytes(),
        )
        .expect("a token");
        assert_eq!(token.expose(), MINTED);
        assert_eq!(
            token.expires_at(),
            UNIX_EPOCH + Duration::from_secs(32_472_241_445)
        );
        for (body, why) in [
            ("<html>ya29.SECRET</html>".to_owned(), "not JSON"),
            (json!({"token": "SECRET"}).to_string(), "no accessToken"),
            (
                json!({"accessToken": "ya29 SECRET", "expireTime": "2999-01-01T00:00:00Z"})
                    .to_string(),
                "an accessToken that is not printable text",
            ),
            (
                json!({"accessToken": "ya29.SECRET"}).to_string(),
                "no usable expireTime",
            ),
            (
                json!({"accessToken": "ya29.SECRET", "expireTime": "tomorrow"}).to_string(),
                "no usable expireTime",
            ),
            (
                json!({"accessToken": "ya29.SECRET", "expireTime": "2001-01-01T00:00:00Z"})
                    .to_string(),
                "an expireTime in the past",
            ),
        ] {
            assert_eq!(token_from(body.as_bytes()).err(), Some(why), "{body}");
        }
    }

    #[test]
    fn rfc3339_times_as_google_writes_them() {
        let at = |secs: u64, nanos: u32| Some(UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), at(0, 0));
        assert_eq!(parse_rfc3339("2024-08-26T22:00:00Z"), at(1_724_709_600, 0));
        assert_eq!(
            parse_rfc3339("2024-08-26T22:00:00.123456789Z"),
            at(1_724_709_600, 123_456_789)
        );
        assert_eq!(
            parse_rfc3339("2024-08-26T22:00:00.5z"),
            at(1_724_709_600, 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-08-27T00:30:00+02:30"),
            at(1_724_709_600, 0)
        );
        assert_eq!(
            parse_rfc3339("2024-08-26T21:00:00-01:00"),
            at(1_724_709_600, 0)
        );
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), at(1_709_164_800, 0));
        for bad in [
            "",
            "2024-08-26 22:00:00Z",
            "2024-08-26T22:00:00",
            "2024-08-26T22:00:00.Z",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-08-26T24:00:00Z",
            "2024-08-26T22:00:00+2:00",
            "1969-12-31T23:59:59Z",
            "2024-08-26T22:00:00ZZ",
            "２024-08-26T22:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_token_is_minted_with_the_base_token_as_bearer() {
        let (addr, captured) = serve(minted_reply(&in_an_hour()), After::Close).await;
        let s = source(
            &format!("http://{addr}"),
            &[TARGET, "d@p.iam.gserviceaccount.com"],
            LOGIN_SCOPE,
        );
        let token = s.fetch(&request()).await.expect("a token");
        assert_eq!(token.expose(), MINTED);
        let left = token.remaining();
        assert!(
            left > Duration::from_secs(3590) && left <= Duration::from_secs(3600),
            "{left:?}"
        );
        let text = captured.await.expect("the request");
        assert!(
            text.starts_with(&format!(
                "POST /v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken HTTP/1.1\r\n"
            )),
            "{text}"
        );
        let lower = text.to_ascii_lowercase();
        assert!(
            lower.contains(&format!(
                "\r\nauthorization: bearer {}\r\n",
                BASE_TOKEN.to_ascii_lowercase()
            )),
            "{text}"
        );
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{text}"
        );
        let body = body_of(&text);
        assert_eq!(
            body["delegates"],
            json!(["projects/-/serviceAccounts/d@p.iam.gserviceaccount.com"])
        );
        assert_eq!(body["scope"], json!([LOGIN_SCOPE]));
        assert_eq!(body["lifetime"], "3600s");
    }

    #[tokio::test]
    async fn the_base_token_is_reused_while_it_has_time_and_dropped_after_a_401() {
        let (base, shared) = base_with(Duration::from_secs(3600));
        for _ in 0..2 {
            let (addr, _) = serve(minted_reply(&in_an_hour()), After::Close).await;
            let s = source_on(
                shared.clone(),
                &format!("http://{addr}"),
                &[TARGET],
                ADMIN_SCOPE,
            );
            s.fetch(&request()).await.expect("a token");
        }
        assert_eq!(base.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (addr, _) = serve(
            reply(
                "401 Unauthorized",
                r#"{"error":{"code":401,"message":"SECRET","status":"UNAUTHENTICATED"}}"#,
            ),
            After::Close,
        )
        .await;
        let s = source_on(
            shared.clone(),
            &format!("http://{addr}"),
            &[TARGET],
            ADMIN_SCOPE,
        );
        let err = s.fetch(&request()).await.expect_err("401").to_string();
        assert!(
            err.ends_with(
                "HTTP 401 Unauthorized (UNAUTHENTICATED): the IAM Credentials API did not accept \
                 the token of the token given with --token; it must be valid and carry the scope \
                 https://www.googleapis.com/auth/cloud-platform"
            ),
            "{err}"
        );
        let (addr, _) = serve(minted_reply(&in_an_hour()), After::Close).await;
        let s = source_on(shared, &format!("http://{addr}"), &[TARGET], ADMIN_SCOPE);
        s.fetch(&request()).await.expect("a token");
        assert_eq!(base.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);

        // A base token about to expire is not reused.
        let (base, shared) = base_with(Duration::from_secs(30));
        for _ in 0..2 {
            let (addr, _) = serve(minted_reply(&in_an_hour()), After::Close).await;
            let s = source_on(
                shared.clone(),
                &format!("http://{addr}"),
                &[TARGET],
                ADMIN_SCOPE,
            );
            s.fetch(&request()).await.expect("a token");
        }
        assert_eq!(base.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    async fn error_for(status: &str, body: &str, chain: &[&str]) -> String {
        let (addr, _) = serve(reply(status, body), After::Close).await;
        let s = source(&format!("http://{addr}"), chain, ADMIN_SCOPE);
        let err = s.fetch(&request()).await.expect_err(status).to_string();
        let origin = format!(
            "gcp credentials from http://{addr}/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken: "
        );
        assert!(err.starts_with(&origin), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        err[origin.len()..].to_owned()
    }

    #[tokio::test]
    async fn each_error_says_what_to_check_without_the_body() {
        let denied = json!({"error": {
            "code": 403,
            "message": "Permission 'iam.serviceAccounts.getAccessToken' denied (SECRET)",
            "status": "PERMISSION_DENIED",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "IAM_PERMISSION_DENIED",
                "domain": "iam.googleapis.com",
            }],
        }})
        .to_string();
        assert_eq!(
            error_for("403 Forbidden", &denied, &[TARGET]).await,
            format!(
                "HTTP 403 Forbidden (PERMISSION_DENIED, IAM_PERMISSION_DENIED): the token given \
                 with --token may not impersonate service account {TARGET}: it needs the role \
                 roles/iam.serviceAccountTokenCreator (Service Account Token Creator) on {TARGET}; \
                 Google also answers 403 when the service account does not exist"
            )
        );
        assert_eq!(
            error_for("403 Forbidden", &denied, &[TARGET, "a@p", "b@p"]).await,
            format!(
                "HTTP 403 Forbidden (PERMISSION_DENIED, IAM_PERMISSION_DENIED): the token given \
                 with --token may not impersonate service account {TARGET} through b@p, then a@p: \
                 each needs the role roles/iam.serviceAccountTokenCreator (Service Account Token \
                 Creator) on the next (the token given with --token on b@p; b@p on a@p; a@p on \
                 {TARGET}); Google also answers 403 when a service account in the chain does not exist"
            )
        );
        let disabled =
            json!({"error": {"code": 403, "message": "SECRET", "status": "PERMISSION_DENIED",
            "details": [{"reason": "SERVICE_DISABLED"}]}})
            .to_string();
        assert_eq!(
            error_for("403 Forbidden", &disabled, &[TARGET]).await,
            "HTTP 403 Forbidden (PERMISSION_DENIED, SERVICE_DISABLED): the IAM Service Account \
             Credentials API (iamcredentials.googleapis.com) is disabled in the caller's project: \
             enable it there"
        );
        let missing = r#"{"error":{"code":404,"message":"Not found; Gaia id not found for SECRET","status":"NOT_FOUND"}}"#;
        assert_eq!(
            error_for("404 Not Found", missing, &[TARGET]).await,
            format!(
                "HTTP 404 Not Found (NOT_FOUND): service account not found: check that {TARGET} \
                 (--impersonate-service-account) exists"
            )
        );
        assert_eq!(
            error_for("404 Not Found", missing, &[TARGET, "a@p", "b@p"]).await,
            format!(
                "HTTP 404 Not Found (NOT_FOUND): service account not found: check that {TARGET} \
                 and the delegates b@p, a@p (--impersonate-service-account) exist"
            )
        );
        assert_eq!(
            error_for(
                "400 Bad Request",
                r#"{"error":{"code":400,"message":"SECRET","status":"INVALID_ARGUMENT"}}"#,
                &[TARGET]
            )
            .await,
            "HTTP 400 Bad Request (INVALID_ARGUMENT)"
        );
        assert_eq!(
            error_for("500 Internal Server Error", "SECRET", &[TARGET]).await,
            "HTTP 500 Internal Server Error"
        );
        assert_eq!(
            error_for("200 OK", r#"{"accessToken":"ya29.SECRET"}"#, &[TARGET]).await,
            "returned something that is not a token (no usable expireTime)"
        );
    }

    #[tokio::test]
    async fn an_unreachable_or_silent_endpoint() {
        let addr = closed_port().await;
        let s = source(&format!("http://{addr}"), &[TARGET], ADMIN_SCOPE);
        let err = s.fetch(&request()).await.expect_err("refused").to_string();
        assert!(
            err.ends_with(&format!(
                ":generateAccessToken: connection to {addr} refused"
            )),
            "{err}"
        );

        let (addr, _) = serve(Vec::new(), After::HoldOpen).await;
        let (_, base) = base_with(Duration::from_secs(3600));
        let chain = Chain::from_flag(&entries(&[TARGET])).expect("a chain");
        let s = ImpersonatedTokenSource::new(
            base,
            chain,
            &format!("http://{addr}"),
            ADMIN_SCOPE,
            Duration::from_millis(100),
        )
        .expect("a source");
        let err = s.fetch(&request()).await.expect_err("timeout");
        assert_eq!(err.to_string(), "gcp credentials: no answer within 100ms");
    }

    #[test]
    fn a_bad_endpoint_is_named() {
        let (_, base) = base_with(Duration::from_secs(3600));
        let chain = Chain::from_flag(&entries(&[TARGET])).expect("a chain");
        let err = ImpersonatedTokenSource::new(
            base,
            chain,
            "ftp://x",
            ADMIN_SCOPE,
            Duration::from_secs(1),
        )
        .expect_err("not http")
        .to_string();
        assert!(
            err.starts_with("gcp credentials from --iam-credentials-endpoint: "),
            "{err}"
        );
    }
}
