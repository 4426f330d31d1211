//! The Cloud SQL connector: a second answer to "where is the database and
//! how is it verified", next to a target's fixed host and CA file.
//!
//! For a target that names an instance (`PROJECT:REGION:INSTANCE`, see
//! [`name`]) keyhole asks the SQL Admin API ([`api`]) for the instance's
//! addresses, engine and server CA, has a short-lived client certificate
//! signed for a key it generated itself ([`cert`]), and dials the
//! instance's server-side proxy on port 3307 with TLS 1.3 from the first
//! byte, verifying the server with the instance's own rule (SAN, then CN).
//! [`instance`] keeps all of that fresh; `google.rs` (the `gcp` feature)
//! gives the connector its credentials and its key. The database protocol then starts
//! plain inside the tunnel: the frontends learn only "the upstream leg is
//! already TLS".

pub mod api;
pub mod cert;
pub mod dns;
// What the connector needs from Google's side, its credentials and its RSA
// key, comes with the `gcp` Cargo feature (crate::features). Without it a
// stand-in refuses both, so that the connector's model, which the proxy
// routes through, needs no cfg: the configuration has refused instance
// targets before a connector is built.
#[cfg_attr(not(feature = "gcp"), path = "without_google.rs")]
mod google;
pub mod instance;
pub mod name;
pub mod slot;
pub(crate) mod x509;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

pub use google::build;
pub use instance::{ConnectInfo, Dial, Instance};
pub use name::InstanceName;
pub use slot::Slot;

use crate::credentials::{CredentialsError, Token, TokenCache, TokenRequest};
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
