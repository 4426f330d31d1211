//! `iam=gcp`: Cloud SQL IAM database login. (Being written.)

use std::collections::HashMap;
use std::time::Duration;

use super::{CredentialsError, TokenFuture, TokenRequest, TokenSource};

pub struct GcpTokenSource;

impl GcpTokenSource {
    pub fn discover(
        _env: &HashMap<String, String>,
        _timeout: Duration,
    ) -> Result<GcpTokenSource, CredentialsError> {
        Err(CredentialsError::Missing {
            provider: "gcp",
            reason: "not built yet".into(),
        })
    }
}

impl TokenSource for GcpTokenSource {
    fn provider(&self) -> &'static str {
        "gcp"
    }
    fn fetch<'a>(&'a self, _request: &'a TokenRequest) -> TokenFuture<'a> {
        Box::pin(async {
            Err(CredentialsError::Missing {
                provider: "gcp",
                reason: "not built yet".into(),
            })
        })
    }
}
