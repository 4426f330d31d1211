//! Where a database password comes from when the target says `iam=`: a
//! short-lived token minted from cloud credentials (`aws`: an RDS IAM token
//! signed with SigV4; `gcp`: an OAuth2 access token for Cloud SQL IAM login).
//!
//! A [`TokenSource`] knows how to mint one token; the [`TokenCache`] keeps one
//! per (endpoint, user), refreshes it ahead of expiry in the background, and
//! never lets a connection wait on a refresh it does not need.
//!
//! A token is a password: it never reaches a log line, an error message or a
//! metric label. [`Token`]'s `Debug` shows only when it expires.

// Each provider comes with its cloud's Cargo feature (see crate::features).
#[cfg(feature = "aws")]
pub mod aws;
mod cache;
#[cfg(feature = "gcp")]
pub mod gcp;
#[cfg(feature = "gcp")]
pub mod impersonate;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use cache::TokenCache;

use crate::config::{IamProvider, Protocol};
use crate::upstream::humanize;

/// A short-lived database password.
#[derive(Clone)]
pub struct Token {
    secret: Arc<str>,
    expires_at: SystemTime,
}

impl Token {
    pub fn new(secret: impl Into<Arc<str>>, expires_at: SystemTime) -> Token {
        Token {
            secret: secret.into(),
            expires_at,
        }
    }

    /// The password itself: for the wire and for `keyhole token`, nothing else.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Time left before it expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<redacted>, expires in {:?})", self.remaining())
    }
}

/// What a token is for: the database endpoint as the database knows it (the
/// real RDS host name and port, even when keyhole dials an IP or a tunnel)
/// and the database user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenRequest {
    pub host: String,
    pub port: u16,
    pub user: String,
}

/// Why no token could be had. Every variant is safe to show to the client:
/// none carries a secret (no key, no token, no response body that could hold one).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialsError {
    /// No credential source is configured or found.
    #[error("no {provider} credentials found: {reason}")]
    Missing {
        provider: &'static str,
        reason: String,
    },
    /// A credential endpoint or file failed, or answered with something unusable.
    #[error("{provider} credentials from {origin}: {reason}")]
    Source {
        provider: &'static str,
        /// Where: a URL without query, a file path, "the environment".
        origin: String,
        reason: String,
    },
    /// A credential endpoint took too long.
    #[error("{provider} credentials: no answer within {}", humanize(*.after))]
    Timeout {
        provider: &'static str,
        after: Duration,
    },
    /// The credentials were there but a token could not be made from them.
    #[error("cannot make the {provider} token: {reason}")]
    Signing {
        provider: &'static str,
        reason: String,
    },
}

/// Boxed so that sources can sit behind `dyn`.
pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Token, CredentialsError>> + Send + 'a>>;

/// Mints tokens. One per target kind (`iam=aws`, `iam=gcp`); adding a kind is
/// one new module and one line in [`build`].
pub trait TokenSource: Send + Sync + 'static {
    /// `aws` or `gcp`: the value of `iam=`, for messages.
    fn provider(&self) -> &'static str;

    /// Mints a fresh token (no caching here; see [`TokenCache`]).
    fn fetch<'a>(&'a self, request: &'a TokenRequest) -> TokenFuture<'a>;

    /// Where the credentials come from, for the startup log (no secret).
    fn describe(&self) -> String {
        self.provider().to_owned()
    }

    /// The database user for the user name a client sent (or `user=` fixed).
    fn database_user(&self, user: &str, _protocol: Protocol) -> String {
        user.to_owned()
    }
}

/// What the session drivers use on a target with `iam=`: the token cache,
/// and the endpoint tokens are for.
pub struct TokenLogin {
    provider: IamProvider,
    cache: Arc<TokenCache>,
    endpoint_host: String,
    endpoint_port: u16,
}

impl TokenLogin {
    pub fn new(
        provider: IamProvider,
        cache: Arc<TokenCache>,
        endpoint_host: String,
        endpoint_port: u16,
    ) -> TokenLogin {
        TokenLogin {
            provider,
            cache,
            endpoint_host,
            endpoint_port,
        }
    }

    pub fn provider(&self) -> IamProvider {
        self.provider
    }

    /// The database user for a client's user name.
    pub fn database_user(&self, user: &str, protocol: Protocol) -> String {
        self.cache.source().database_user(user, protocol)
    }

    /// A token for `user` (a database user, already mapped).
    pub async fn token(&self, user: &str) -> Result<Token, CredentialsError> {
        let request = TokenRequest {
            host: self.endpoint_host.clone(),
            port: self.endpoint_port,
            user: user.to_owned(),
        };
        self.cache.get(&request).await
    }
}

/// Process-wide inputs the token sources are built from, loaded once.
pub struct SourceContext {
    /// The process environment (a map, so tests can feed their own).
    pub env: std::collections::HashMap<String, String>,
    /// Bound on one token fetch.
    pub timeout: Duration,
    /// The AWS chain and region, loaded once when a target needs them.
    #[cfg(feature = "aws")]
    pub aws: Option<aws_config::SdkConfig>,
}

impl SourceContext {
    pub fn new(env: std::collections::HashMap<String, String>, timeout: Duration) -> SourceContext {
        SourceContext {
            env,
            timeout,
            #[cfg(feature = "aws")]
            aws: None,
        }
    }
}

/// Builds the token source a target's `iam=` names: the one place that
/// lists the providers. Errors are configuration errors (exit 2).
pub async fn build(
    iam: &crate::config::Iam,
    context: &mut SourceContext,
) -> Result<Arc<dyn TokenSource>, String> {
    match iam.provider {
        #[cfg(feature = "aws")]
        IamProvider::Aws => {
            if context.aws.is_none() {
                context.aws = Some(aws::load_config().await);
            }
            Ok(Arc::new(aws::source_for(iam, context)?))
        }
        #[cfg(feature = "gcp")]
        IamProvider::Gcp => {
            let source = gcp::GcpTokenSource::discover(&context.env, context.timeout)
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(source))
        }
        // A provider this build lacks: the configuration refuses it first
        // (crate::features); this says the same to any other caller.
        #[allow(unreachable_patterns)]
        provider => {
            let _ = context;
            crate::features::check_iam(provider)?;
            Err(format!(
                "internal: no token source for iam={}",
                provider.name()
            ))
        }
    }
}
