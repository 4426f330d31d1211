//! `iam=aws`: RDS and Aurora IAM database authentication.
//!
//! The token is a SigV4 presigned URL (`GET https://HOST:PORT/?Action=connect
//! &DBUser=USER`, service `rds-db`, 15 minutes) without its scheme, used as
//! the password. It is signed locally, so minting one costs no request; the
//! credentials it is signed with come from the standard AWS chain
//! (aws-config: environment, shared config and credentials files with
//! profiles, SSO and assume-role, EKS web identity, the ECS/Fargate container
//! endpoint, EC2 IMDSv2), which caches and refreshes them itself.
//!
//! The token names the database's real endpoint host and port, whatever
//! address keyhole dials (a tunnel, a relay, an IP): RDS checks the name.

use std::error::Error as _;
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::error::CredentialsError as AwsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::identity::Identity;

use super::{CredentialsError, SourceContext, Token, TokenFuture, TokenRequest, TokenSource};
use crate::config::Iam;
use crate::platform::home::{self, Os};

const PROVIDER: &str = "aws";
/// How long RDS accepts a token (the longest it allows).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// The process's AWS configuration: the default credential chain and the
/// region from the environment or profile. Loaded once, shared by every
/// `iam=aws` target; its HTTPS client uses ring, like the rest of keyhole.
pub async fn load_config() -> SdkConfig {
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    // Pinned, not `latest()`: a new behavior version changes the SDK's defaults (retries,
    // timeouts, the HTTP stack), and keyhole's behavior changes only when we decide, with an
    // aws-config update that moves this pin on purpose. v2026_01_12 is the newest in
    // aws-config 1.13 (what `latest()` gave there, so pinning it changed nothing): retries
    // on, a 3.1 s connect timeout for the credential providers' clients.
    aws_config::defaults(BehaviorVersion::v2026_01_12())
        .http_client(https)
        .load()
        .await
}

/// The region in an RDS endpoint name
/// (`mydb.abc123.eu-west-1.rds.amazonaws.com`, `...rds.amazonaws.com.cn`).
pub fn region_from_host(host: &str) -> Option<&str> {
    let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    let rds = labels
        .windows(2)
        .position(|w| w[0].eq_ignore_ascii_case("rds") && w[1].eq_ignore_ascii_case("amazonaws"))?;
    rds.checked_sub(1)
        .and_then(|i| labels.get(i))
        .copied()
        .filter(|r| r.contains('-'))
}

/// The token source for an `iam=aws` target: the loaded chain, and the
/// region from `region=`, else the RDS host name, else the environment.
pub fn source_for(iam: &Iam, context: &SourceContext) -> Result<AwsTokenSource, String> {
    let sdk = context
        .aws
        .as_ref()
        .ok_or("the AWS configuration was not loaded (this is a bug in keyhole)")?;
    let region = iam
        .region
        .clone()
        .or_else(|| region_from_host(&iam.endpoint_host).map(str::to_owned))
        .or_else(|| sdk.region().map(|r| r.to_string()))
        .ok_or_else(|| {
            format!(
                "iam=aws needs a region: {} is not an RDS host name to read one from; \
                 set region= (or --region), or AWS_REGION",
                iam.endpoint_host
            )
        })?;
    let credentials = sdk
        .credentials_provider()
        .ok_or("the AWS configuration has no credential chain (this is a bug in keyhole)")?;
    Ok(AwsTokenSource::new(credentials, region))
}

/// Mints RDS IAM tokens for one region.
pub struct AwsTokenSource {
    credentials: SharedCredentialsProvider,
    region: String,
}

impl AwsTokenSource {
    pub fn new(credentials: SharedCredentialsProvider, region: String) -> AwsTokenSource {
        AwsTokenSource {
            credentials,
            region,
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// A token signed at `time` (now, except for reproducible output).
    pub async fn token_at(
        &self,
        request: &TokenRequest,
        time: SystemTime,
    ) -> Result<Token, CredentialsError> {
        let credentials = self
            .credentials
            .provide_credentials()
            .await
            .map_err(describe_chain_error)?;
        let token = sign_token(&credentials, &self.region, request, time).map_err(|reason| {
            CredentialsError::Signing {
                provider: PROVIDER,
                reason,
            }
        })?;
        // Signed with temporary credentials, a token dies with them.
        let mut expires_at = time + TOKEN_LIFETIME;
        if let Some(creds_expiry) = credentials.expiry() {
            expires_at = expires_at.min(creds_expiry);
        }
        Ok(Token::new(token, expires_at))
    }
}

impl TokenSource for AwsTokenSource {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    fn fetch<'a>(&'a self, request: &'a TokenRequest) -> TokenFuture<'a> {
        Box::pin(self.token_at(request, SystemTime::now()))
    }

    fn describe(&self) -> String {
        format!("the AWS credential chain, region {}", self.region)
    }
}

/// The RDS IAM token for `request`, signed at `time` with `credentials`.
pub fn sign_token(
    credentials: &Credentials,
    region: &str,
    request: &TokenRequest,
    time: SystemTime,
) -> Result<String, String> {
    let identity = Identity::from(credentials.clone());
    let mut settings = SigningSettings::default();
    settings.expires_in = Some(TOKEN_LIFETIME);
    settings.signature_location = SignatureLocation::QueryParams;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("rds-db")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let host = crate::config::host_port(&request.host, request.port);
    let url = format!(
        "https://{host}/?Action=connect&DBUser={}",
        crate::http::client::percent_encode(&request.user)
    );
    let signable = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let mut signed = http::Request::builder()
        .uri(url.as_str())
        .body(())
        .map_err(|e| e.to_string())?;
    instructions.apply_to_request_http1x(&mut signed);
    let uri = signed.uri().to_string();
    uri.strip_prefix("https://")
        .map(str::to_owned)
        .ok_or_else(|| "the signed URL lost its scheme".to_owned())
}

/// The chain's own words (it lists what it tried), with the causes it does
/// not already repeat. aws-config's messages carry no secrets.
pub fn chain_text(e: &AwsError) -> String {
    let mut reason = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        cause = c.source();
    }
    reason
}

/// [`chain_text`], mapped to keyhole's error.
fn describe_chain_error(e: AwsError) -> CredentialsError {
    let reason = chain_text(&e);
    match e {
        AwsError::CredentialsNotLoaded(_) => CredentialsError::Missing {
            provider: PROVIDER,
            reason: format!(
                "{reason} (keyhole looks where the AWS SDKs do: AWS_ACCESS_KEY_ID, AWS_PROFILE and {}, \
                 web identity, the ECS container endpoint, EC2 instance metadata)",
                home::aws_files_shown(Os::current(), &home::process_env)
            ),
        },
        _ => CredentialsError::Source {
            provider: PROVIDER,
            origin: "the AWS credential chain".into(),
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn token(
        akid: &str,
        secret: &str,
        time: SystemTime,
        host: &str,
        port: u16,
        region: &str,
        user: &str,
    ) -> String {
        let creds = Credentials::new(akid, secret, None, None, "test");
        let request = TokenRequest {
            host: host.into(),
            port,
            user: user.into(),
        };
        sign_token(&creds, region, &request, time).expect("signs")
    }

    fn signature(token: &str) -> &str {
        token
            .rsplit_once("X-Amz-Signature=")
            .map(|(_, s)| s)
            .expect("a signature")
    }

    #[test]
    fn vector_a_smithy_rs() {
        // 2024-08-26T22:00:00Z
        let t = token(
            "akid",
            "secret",
            at(1_724_709_600),
            "prod-instance.us-east-1.rds.amazonaws.com",
            3306,
            "us-east-1",
            "peccy",
        );
        assert_eq!(
            t,
            "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy\
             &X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request\
             &X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89"
        );
    }

    #[test]
    fn vector_b_smithy_rs() {
        let t = token(
            "ANOTREAL",
            "notrealrnrELgWzOk3IfjzDKtFBhDby",
            at(0),
            "dontcare.fake-region-1.rds.amazonaws.com",
            3306,
            "fake-region-1",
            "mydbuser",
        );
        assert_eq!(
            signature(&t),
            "32562254e5a540b51186f885e7df18188f5e963133f081c95668f8ce6d17c6c1"
        );
        assert!(t.starts_with(
            "dontcare.fake-region-1.rds.amazonaws.com:3306/?Action=connect&DBUser=mydbuser&"
        ));
    }

    #[test]
    fn vector_c_aws_sdk_js() {
        let t = token(
            "akid",
            "secret",
            at(0),
            "db.us-east-1.amazonaws.com",
            8000,
            "us-east-1",
            "test",
        );
        assert_eq!(
            signature(&t),
            "6f2b4daa29668c1c264d7af7927d9d2a706768e35d92d76b461aedbaca14b6ad"
        );
    }

    #[test]
    fn a_session_token_is_signed_and_users_are_encoded() {
        let creds = Credentials::new(
            "akid",
            "secret",
            Some("session/token=".into()),
            None,
            "test",
        );
        let request = TokenRequest {
            host: "db.eu-west-1.rds.amazonaws.com".into(),
            port: 5432,
            user: "app user@x".into(),
        };
        let t = sign_token(&creds, "eu-west-1", &request, at(0)).expect("signs");
        assert!(t.contains("DBUser=app%20user%40x"), "{t}");
        assert!(t.contains("X-Amz-Security-Token=session%2Ftoken%3D"), "{t}");
        let without = sign_token(
            &Credentials::new("akid", "secret", None, None, "t"),
            "eu-west-1",
            &request,
            at(0),
        )
        .expect("signs");
        assert_ne!(
            signature(&t),
            signature(&without),
            "the session token is part of the signature"
        );
    }

    #[test]
    fn regions_from_rds_host_names() {
        assert_eq!(
            region_from_host("mydb.abc123.eu-west-1.rds.amazonaws.com"),
            Some("eu-west-1")
        );
        assert_eq!(
            region_from_host("c.cluster-ro-abc.us-east-2.rds.amazonaws.com."),
            Some("us-east-2")
        );
        assert_eq!(
            region_from_host("p.proxy-abc.cn-north-1.rds.amazonaws.com.cn"),
            Some("cn-north-1")
        );
        assert_eq!(region_from_host("db.internal"), None);
        assert_eq!(region_from_host("10.0.0.5"), None);
        assert_eq!(region_from_host("rds.amazonaws.com"), None);
    }

    #[tokio::test]
    async fn the_token_expires_with_the_credentials_that_signed_it() {
        let now = SystemTime::now();
        let soon = now + Duration::from_secs(120);
        let creds = Credentials::new("akid", "secret", Some("st".into()), Some(soon), "test");
        let source = AwsTokenSource::new(SharedCredentialsProvider::new(creds), "us-east-1".into());
        let request = TokenRequest {
            host: "db".into(),
            port: 5432,
            user: "u".into(),
        };
        let t = source.token_at(&request, now).await.expect("token");
        assert_eq!(t.expires_at(), soon);
        let lasting = Credentials::new("akid", "secret", None, None, "test");
        let source =
            AwsTokenSource::new(SharedCredentialsProvider::new(lasting), "us-east-1".into());
        assert_eq!(
            source
                .token_at(&request, now)
                .await
                .expect("token")
                .expires_at(),
            now + TOKEN_LIFETIME
        );
    }
}
