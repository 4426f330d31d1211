//! The Cloud SQL connector's Google side (the `gcp` feature): the
//! credentials it calls the SQL Admin API and mints IAM login tokens with,
//! and the RSA key its ephemeral certificates are for (the one use of the
//! `rsa` crate).

use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::api::AdminApi;
use super::Connector;
use crate::config::cloudsql::{AdminCredentials, CloudSqlSettings};
use crate::credentials::gcp::{GcpTokenSource, ADMIN_SCOPE, LOGIN_SCOPE};
use crate::credentials::impersonate::{
    BaseCredentials, Chain, ImpersonatedTokenSource, CLOUD_PLATFORM_SCOPE,
};
use crate::credentials::{
    SourceContext, Token, TokenCache, TokenFuture, TokenRequest, TokenSource,
};

/// A fresh RSA key of `bits`: its PKCS#8 PrivateKeyInfo DER (wiped when
/// dropped) and its SubjectPublicKeyInfo DER. `rsa` only generates it; every
/// signature is made by rustls with ring.
pub(super) fn rsa_key(bits: usize) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), String> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let key =
        rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(|e| e.to_string())?;
    let pkcs8 = key.to_pkcs8_der().map_err(|e| e.to_string())?;
    let spki = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?
        .into_vec();
    Ok((Zeroizing::new(pkcs8.as_bytes().to_vec()), spki))
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
