//! The Cloud SQL connector's Google side in a build without the `gcp`
//! feature: the shape of `google.rs` with nothing behind it. The
//! configuration refuses instance targets first ([`crate::features`]);
//! should anything else ask, no connector and no key is made.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::Connector;
use crate::config::cloudsql::CloudSqlSettings;
use crate::credentials::SourceContext;

fn refusal() -> String {
    crate::features::missing("a Cloud SQL instance target", "gcp")
}

pub(super) fn rsa_key(_bits: usize) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), String> {
    Err(refusal())
}

pub async fn build(
    _settings: &CloudSqlSettings,
    _sources: &mut SourceContext,
    _auto_iam: bool,
) -> Result<Arc<Connector>, String> {
    Err(refusal())
}
