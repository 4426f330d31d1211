//! `backend=private-ip`, the default: the database is on a private network
//! (a VPC, a peered network, a VPN), so a name that resolves to a public
//! address means a misconfiguration or a hijacked name, and keyhole refuses
//! it before any packet leaves. `destinations=` adds ranges.

use std::net::IpAddr;
use std::sync::Arc;

use super::{Backend, Registration, PRIVATE_RANGES};
use crate::cidr::{self, Cidr};
use crate::config::TargetConfig;

pub const REGISTRATION: Registration = Registration {
    name: "private-ip",
    summary:
        "dial only private addresses (RFC 1918, 100.64.0.0/10, fc00::/7, loopback, destinations=)",
    build,
};

struct PrivateIp {
    /// Extra ranges from `destinations=`.
    extra: Vec<Cidr>,
}

fn build(target: &TargetConfig) -> Result<Arc<dyn Backend>, String> {
    Ok(Arc::new(PrivateIp {
        extra: target.destinations.clone(),
    }))
}

impl Backend for PrivateIp {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn check_destination(&self, ip: IpAddr) -> Result<(), String> {
        if cidr::any_contains(PRIVATE_RANGES, ip) || cidr::any_contains(&self.extra, ip) {
            return Ok(());
        }
        Err(format!(
            "{} is not a private address, and backend private-ip dials only private ones \
             (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7, loopback{}); \
             add its range with destinations=, or use backend=public for a database reached over the internet",
            cidr::canonical(ip),
            if self.extra.is_empty() {
                String::new()
            } else {
                format!(", {}", cidr::join(&self.extra))
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::{build, tests::target};

    #[test]
    fn private_addresses_pass_and_public_ones_are_refused_by_name() {
        let backend = build(&target(&["postgres://db.internal"])).expect("builds");
        for ok in [
            "10.1.2.3",
            "172.31.255.1",
            "192.168.0.9",
            "100.100.1.1",
            "127.0.0.1",
            "::1",
            "fd00::5",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(
                backend.check_destination(ok.parse().expect("ip")),
                Ok(()),
                "{ok}"
            );
        }
        for refused in [
            "8.8.8.8",
            "172.32.0.1",
            "169.254.169.254",
            "2001:db8::1",
            "::ffff:8.8.4.4",
        ] {
            let err = backend
                .check_destination(refused.parse().expect("ip"))
                .expect_err(refused);
            assert!(err.contains("is not a private address"), "{err}");
            assert!(err.contains("destinations="), "{err}");
        }
        let err = backend
            .check_destination("::ffff:8.8.4.4".parse().expect("ip"))
            .expect_err("mapped");
        assert!(
            err.starts_with("8.8.4.4 "),
            "the address as the user knows it: {err}"
        );
    }

    #[test]
    fn destinations_add_ranges() {
        let backend =
            build(&target(&["postgres://db?destinations=203.0.113.0/24"])).expect("builds");
        assert_eq!(
            backend.check_destination("203.0.113.7".parse().expect("ip")),
            Ok(())
        );
        let err = backend
            .check_destination("198.51.100.1".parse().expect("ip"))
            .expect_err("outside");
        assert!(err.contains("loopback, 203.0.113.0/24)"), "{err}");
    }
}
