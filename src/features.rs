//! The optional parts of keyhole (Cargo features) and the one place where a
//! configuration that needs a part this build lacks is refused.
//!
//! - `aws`: `iam=aws` (RDS/Aurora IAM tokens, [`crate::credentials`]'s
//!   `aws`), `via=ssm://` (Session Manager, [`crate::transport::ssm`]) and
//!   `keyhole token aws`. Brings the AWS credential chain and SigV4.
//! - `gcp`: `iam=gcp` (Cloud SQL IAM login, `credentials::gcp` and
//!   `credentials::impersonate`), `via=iap://` ([`crate::transport::iap`])
//!   and Cloud SQL instance targets (the connector's Google side,
//!   `cloudsql::google`). Brings `rsa` for the connector's client key.
//!
//! Both are in `default`. The configuration is parsed the same in every
//! build, so that a target asking for a missing part is refused at
//! configuration time ([`check_target`], exit 2) with the feature's name,
//! never half-started.

use crate::config::via::{Tunnel, Via};
use crate::config::{IamProvider, TargetConfig};

/// Whether this build has the `aws` feature.
pub const AWS: bool = cfg!(feature = "aws");
/// Whether this build has the `gcp` feature.
pub const GCP: bool = cfg!(feature = "gcp");

/// The features this build has, for messages: `aws, gcp`, or `none`.
pub fn enabled() -> String {
    let names: Vec<&str> = [("aws", AWS), ("gcp", GCP), ("otel", cfg!(feature = "otel"))]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The refusal of `what` in a build without `feature`.
pub fn missing(what: &str, feature: &str) -> String {
    format!(
        "{what} needs keyhole built with the \"{feature}\" feature (this build has: {})",
        enabled()
    )
}

/// `Ok` if this build has `feature`, else the refusal of `what`.
pub fn require(what: &str, feature: &'static str) -> Result<(), String> {
    let present = match feature {
        "aws" => AWS,
        "gcp" => GCP,
        _ => false,
    };
    if present {
        Ok(())
    } else {
        Err(missing(what, feature))
    }
}

/// `iam=aws` needs `aws`, `iam=gcp` needs `gcp`.
pub fn check_iam(provider: IamProvider) -> Result<(), String> {
    let feature = match provider {
        IamProvider::Aws => "aws",
        IamProvider::Gcp => "gcp",
    };
    require(&format!("iam={}", provider.name()), feature)
}

/// `via=iap://` needs `gcp`, `via=ssm://` needs `aws`, alone or under `ssh://`.
pub fn check_via(via: &Via) -> Result<(), String> {
    let tunnel = match via {
        Via::Iap(_) => "iap",
        Via::Ssm(_) => "ssm",
        Via::Ssh(hop) => match &hop.over {
            Some(Tunnel::Iap(_)) => "iap",
            Some(Tunnel::Ssm(_)) => "ssm",
            None => return Ok(()),
        },
        Via::Direct | Via::Socks5(_) | Via::Http(_) => return Ok(()),
    };
    if tunnel == "iap" {
        require("via=iap://", "gcp")
    } else {
        require("via=ssm://", "aws")
    }
}

/// Everything a target needs from the build: its token login, a Cloud SQL
/// instance, its hop. The configuration calls this for every target.
pub fn check_target(target: &TargetConfig) -> Result<(), String> {
    if target.cloudsql.is_some() {
        require("a Cloud SQL instance target", "gcp")?;
    }
    if let Some(iam) = &target.iam {
        check_iam(iam.provider)?;
    }
    check_via(&target.via)
}
