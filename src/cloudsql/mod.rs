//! The Cloud SQL connector: a second answer to "where is the database and
//! how is it verified", next to a target's fixed host and CA file.
//!
//! For a target that names an instance (`PROJECT:REGION:INSTANCE`, see
//! [`name`]) keyhole asks the SQL Admin API ([`api`]) for the instance's
//! addresses, engine and server CA, has a short-lived client certificate
//! signed for a key it generated itself ([`cert`]), and dials the
//! instance's server-side proxy on port 3307 with TLS 1.3 from the first
//! byte, verifying the server with the instance's own rule (SAN, then CN).
//! [`instance`] keeps all of that fresh. The database protocol then starts
//! plain inside the tunnel: the frontends learn only "the upstream leg is
//! already TLS".

pub mod api;
pub mod cert;
pub mod dns;
pub mod instance;
pub mod name;
pub mod slot;
pub(crate) mod x509;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

pub use instance::{ConnectInfo, Dial, Instance};
pub use name::InstanceName;
pub use slot::Slot;

use crate::config::cloudsql::{AdminCredentials, CloudSqlSettings};
use crate::credentials::gcp::{GcpTokenSource, ADMIN_SCOPE, LOGIN_SCOPE};
use crate::credentials::impersonate::{
    BaseCredentials, Chain, ImpersonatedTokenSource, CLOUD_PLATFORM_SCOPE,
};
use crate::credentials::{
    CredentialsError, SourceContext, Token, TokenCache, TokenFuture, TokenRequest, TokenSource,
};
use api::{AdminApi, ApiError};
use cert::{CertError, EphemeralKey};

/// Which address of an instance keyhole dials (`--private-ip`, `--psc`,
/// `--auto-ip`; public by default, as cloud-sql-proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpPreference {
    #[default]
    Public,
    Private,
    Psc,
    /// Public if the instance has one, else private.
    Auto,
}

impl IpPreference {
    pub fn describe(self) -> &'static str {
        match self {
            IpPreference::Public => "public IP address",
            IpPreference::Private => "private IP address",
            IpPreference::Psc => "Private Service Connect (PSC) DNS name",
            IpPreference::Auto => "public or private IP address",
        }
    }
}

/// Why the connector cannot give a connection what it needs. Every variant
/// is safe to show to a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectorError {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("Cloud SQL instance {instance} runs {version}: keyhole speaks Postgres and MySQL, not SQL Server")]
    Engine { instance: String, version: String },
    #[error("Cloud SQL instance {instance} has no {asked} (it has: {has}); choose another with --private-ip, --psc or --auto-ip")]
    NoAddress {
        instance: String,
        asked: &'static str,
        has: String,
    },
    #[error("Cloud SQL certificate setup failed: {0}")]
    Certificate(Arc<CertError>),
    #[error("no IAM login token for automatic IAM database login: {0}")]
    LoginToken(CredentialsError),
    #[error("{cause}; keyhole asks the SQL Admin API again for instance {instance} in {}s (cool-down)", .left.as_secs().max(1))]
    CoolDown {
        instance: String,
        left: Duration,
        /// The 429 that started it, in words.
        cause: String,
    },
    #[error("instance {instance} was refreshed too often; the next refresh is allowed in {}s", .left.as_secs().max(1))]
    RateLimited { instance: String, left: Duration },
}

impl ConnectorError {
    pub fn certificate(e: CertError) -> ConnectorError {
        ConnectorError::Certificate(Arc::new(e))
    }

    /// A short stable name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectorError::Api(e) => e.label(),
            ConnectorError::Engine { .. } => "engine",
            ConnectorError::NoAddress { .. } => "no_address",
            ConnectorError::Certificate(_) => "certificate",
            ConnectorError::LoginToken(_) => "credentials",
            ConnectorError::CoolDown { .. } => "quota_cool_down",
            ConnectorError::RateLimited { .. } => "rate_limited",
        }
    }
}

/// What every instance of the process shares: the Admin API client, the
/// one key, and where automatic IAM login tokens come from.
pub struct Connector {
    pub api: AdminApi,
    /// Generated on first use, kept in memory only.
    key: OnceCell<Arc<EphemeralKey>>,
    /// Tokens of the login scope (or `--login-token`), for `--auto-iam-authn`.
    login: Option<Arc<TokenCache>>,
}

impl Connector {
    pub fn new(api: AdminApi, login: Option<Arc<TokenCache>>) -> Connector {
        Connector {
            api,
            key: OnceCell::new(),
            login,
        }
    }

    /// The process's key (RSA-2048, generated once, off the async threads).
    pub async fn key(&self) -> Result<Arc<EphemeralKey>, ConnectorError> {
        self.key
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(EphemeralKey::generate)
                    .await
                    .map_err(|e| {
                        CertError::KeyGeneration(format!("key generation did not finish: {e}"))
                    })
                    .and_then(|generated| generated)
                    .map(Arc::new)
                    .map_err(ConnectorError::certificate)
            })
            .await
            .cloned()
    }

    /// A login-scope token for automatic IAM database login.
    pub async fn login_token(&self) -> Result<Token, ConnectorError> {
        let Some(cache) = &self.login else {
            return Err(ConnectorError::LoginToken(CredentialsError::Missing {
                provider: "gcp",
                reason: "automatic IAM login has no token source".into(),
            }));
        };
        let request = TokenRequest {
            host: "sqlservice.login".into(),
            port: 0,
            user: String::new(),
        };
        cache
            .get(&request)
            .await
            .map_err(ConnectorError::LoginToken)
    }
}

/// Builds the connector from its settings: the Admin API's credentials
/// (`--token`, `--credentials-file`, `--json-credentials`, or Application
/// Default Credentials, each possibly the base of
/// `--impersonate-service-account`) and, when an instance logs in with IAM
/// automatically, the login token's source. Errors are configuration
/// errors.
pub async fn build(
    settings: &CloudSqlSettings,
    sources: &mut SourceContext,
    auto_iam: bool,
) -> Result<Arc<Connector>, String> {
    let timeout = sources.timeout;
    let source = |scope: &'static str| -> Result<Arc<dyn TokenSource>, String> {
        let gcp = match &settings.credentials {
            AdminCredentials::Token(token) => {
                return Ok(Arc::new(StaticToken {
                    token: token.expose().to_owned(),
                    what: "--token",
                }))
            }
            AdminCredentials::Default => GcpTokenSource::discover_for(&sources.env, scope, timeout),
            AdminCredentials::File(path) => GcpTokenSource::from_file(path, scope, timeout),
            AdminCredentials::Json(json) => {
                GcpTokenSource::from_json(json.expose(), scope, timeout)
            }
        };
        gcp.map(|s| Arc::new(s) as Arc<dyn TokenSource>)
            .map_err(|e| e.to_string())
    };
    // With --impersonate-service-account, as cloud-sql-proxy: those
    // credentials (scope cloud-platform), or --token, are the base that acts
    // as the chain's target, for the Admin API and for IAM login alike.
    let base = match Chain::from_flag(&settings.impersonate) {
        Some(chain) => Some((chain, BaseCredentials::new(source(CLOUD_PLATFORM_SCOPE)?))),
        None => None,
    };
    let impersonated = |scope: &'static str| -> Result<Option<Arc<TokenCache>>, String> {
        let Some((chain, base)) = &base else {
            return Ok(None);
        };
        let source = ImpersonatedTokenSource::new(
            base.clone(),
            chain.clone(),
            &settings.iam_credentials_endpoint,
            scope,
            timeout,
        )
        .map_err(|e| e.to_string())?;
        Ok(Some(TokenCache::new(Arc::new(source), timeout)))
    };
    let admin = match impersonated(ADMIN_SCOPE)? {
        Some(cache) => cache,
        None => TokenCache::new(source(ADMIN_SCOPE)?, timeout),
    };
    let login = if !auto_iam {
        None
    } else if let Some(cache) = impersonated(LOGIN_SCOPE)? {
        Some(cache)
    } else if let AdminCredentials::Token(_) = settings.credentials {
        let token = settings.login_token.as_ref().ok_or(
            "--auto-iam-authn with --token needs --login-token (an OAuth2 token for IAM database login)",
        )?;
        Some(TokenCache::new(
            Arc::new(StaticToken {
                token: token.expose().to_owned(),
                what: "--login-token",
            }),
            timeout,
        ))
    } else {
        Some(TokenCache::new(source(LOGIN_SCOPE)?, timeout))
    };
    let api = AdminApi::new(
        &settings.api_endpoint,
        admin,
        settings.quota_project.clone(),
        timeout,
    )?;
    Ok(Arc::new(Connector::new(api, login)))
}

/// A token given on the command line (`--token`, `--login-token`): used as
/// is. Its expiry is unknown; an hour is assumed, as cloud-sql-proxy does,
/// and the caller is trusted to restart keyhole with a new one.
struct StaticToken {
    token: String,
    what: &'static str,
}

impl TokenSource for StaticToken {
    fn provider(&self) -> &'static str {
        "gcp"
    }

    fn describe(&self) -> String {
        format!("the token given with {}", self.what)
    }

    fn fetch<'a>(&'a self, _request: &'a TokenRequest) -> TokenFuture<'a> {
        let token = Token::new(
            self.token.as_str(),
            std::time::SystemTime::now() + Duration::from_secs(3600),
        );
        Box::pin(async move { Ok(token) })
    }
}
