//! Backends: how keyhole may reach a target's database. A backend is the
//! network policy of a target, chosen with `backend=` (or `--backend`, or
//! `backend` in the config file); each lives in its own module behind the
//! one [`Backend`] trait, and [`REGISTRY`] is the only list that names them.
//!
//! - `private-ip` (the default): dial only private addresses.
//! - `public`: a database across the internet; public addresses only,
//!   verify-full TLS, and an inbound allowlist unless keyhole listens on
//!   loopback alone.
//!
//! Credentials are the other half of "how": `iam=` (see [`crate::credentials`])
//! composes with either backend, because an IAM database may sit on a private
//! address or a public one.
//!
//! Adding a backend: one new module with a [`Registration`], one line in
//! [`REGISTRY`].

mod private_ip;
mod public;

use std::net::IpAddr;
use std::sync::Arc;

use crate::cidr::Cidr;
use crate::config::TargetConfig;

/// A target's network policy, consulted for every address a connection
/// would dial, before any packet leaves.
pub trait Backend: Send + Sync + 'static {
    /// The name in `backend=`.
    fn name(&self) -> &'static str;

    /// `Ok` if keyhole may dial `ip` (freshly resolved); otherwise why not,
    /// in words that name the rule and how to change it.
    fn check_destination(&self, ip: IpAddr) -> Result<(), String>;
}

/// How a backend is found and built.
pub struct Registration {
    pub name: &'static str,
    /// One line for `--help` and error messages.
    pub summary: &'static str,
    /// Builds the backend for a target, or says which setting is wrong.
    pub build: fn(&TargetConfig) -> Result<Arc<dyn Backend>, String>,
}

/// Every backend keyhole has; the first is the default.
pub const REGISTRY: &[Registration] = &[private_ip::REGISTRATION, public::REGISTRATION];

/// The backend used when a target names none.
pub fn default_name() -> &'static str {
    REGISTRY[0].name
}

/// `Some` if `name` is a registered backend.
pub fn find(name: &str) -> Option<&'static Registration> {
    REGISTRY.iter().find(|r| r.name == name)
}

/// `private-ip, public`, for messages.
pub fn names() -> String {
    REGISTRY
        .iter()
        .map(|r| r.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the backend a target names, with its settings checked.
pub fn build(target: &TargetConfig) -> Result<Arc<dyn Backend>, String> {
    let registration = find(&target.backend)
        .ok_or_else(|| format!("unknown backend '{}' (known: {})", target.backend, names()))?;
    (registration.build)(target)
}

/// Addresses that never leave a private network: RFC 1918, shared address
/// space (100.64.0.0/10, carrier-grade NAT and some VPC peerings), IPv6
/// unique local addresses, and loopback.
pub const PRIVATE_RANGES: &[Cidr] = &[
    Cidr::v4(10, 0, 0, 0, 8),
    Cidr::v4(172, 16, 0, 0, 12),
    Cidr::v4(192, 168, 0, 0, 16),
    Cidr::v4(100, 64, 0, 0, 10),
    Cidr::v4(127, 0, 0, 0, 8),
    Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
];

/// Addresses that are neither private nor routable across the internet:
/// link-local (169.254.0.0/16 holds the cloud metadata servers), unspecified,
/// multicast and broadcast.
pub const NOT_PUBLIC_RANGES: &[Cidr] = &[
    Cidr::v4(169, 254, 0, 0, 16),
    Cidr::v4(0, 0, 0, 0, 8),
    Cidr::v4(224, 0, 0, 0, 4),
    Cidr::v4(255, 255, 255, 255, 32),
    Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;
    use std::collections::HashMap;

    /// The first target of a command line, as the config layer builds it.
    pub(crate) fn target(args: &[&str]) -> TargetConfig {
        let argv = std::iter::once("keyhole").chain(args.iter().copied());
        let config = Config::load(argv, &HashMap::new()).expect("valid configuration");
        config.targets.into_iter().next().expect("one target")
    }

    #[test]
    fn the_default_is_private_ip_and_unknown_names_are_refused() {
        assert_eq!(default_name(), "private-ip");
        assert_eq!(
            build(&target(&["postgres://10.0.0.5"])).map(|b| b.name()),
            Ok("private-ip")
        );
        let mut t = target(&["postgres://10.0.0.5"]);
        t.backend = "bastion".into();
        let err = build(&t).map(|b| b.name()).expect_err("unknown");
        assert!(
            err.contains("unknown backend 'bastion' (known: private-ip, public)"),
            "{err}"
        );
    }
}
