//! `backend=public`: a database reached across the internet. Only public
//! addresses are dialled (or the explicit `destinations=` list), the
//! certificate must match the name (verify-full), and a listener that other
//! hosts can reach needs an inbound allowlist (`allow=`): a public
//! database's proxy must not become an open relay into it.

use std::net::IpAddr;
use std::sync::Arc;

use super::{Backend, Registration, NOT_PUBLIC_RANGES, PRIVATE_RANGES};
use crate::cidr::{self, Cidr};
use crate::config::{TargetConfig, TlsMode};

pub const REGISTRATION: Registration = Registration {
    name: "public",
    summary: "dial only public addresses (or destinations=), verify-full TLS, allow= required off loopback",
    build,
};

struct Public {
    /// `destinations=`: when given, the only addresses dialled.
    destinations: Vec<Cidr>,
}

fn build(target: &TargetConfig) -> Result<Arc<dyn Backend>, String> {
    if target.tls.mode != TlsMode::VerifyFull {
        return Err(
            "backend public requires tls-mode=verify-full: across the internet the certificate must name the server"
                .into(),
        );
    }
    if target.allow.is_empty() {
        if let Some(addr) = target.listen.filter(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "backend public listens on {addr}, which other hosts can reach, but has no allowlist: \
                 set allow=CIDR,... (or --allow) to the clients that may connect, or listen on 127.0.0.1"
            ));
        }
    }
    Ok(Arc::new(Public {
        destinations: target.destinations.clone(),
    }))
}

impl Backend for Public {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn check_destination(&self, ip: IpAddr) -> Result<(), String> {
        let ip = cidr::canonical(ip);
        if !self.destinations.is_empty() {
            return if cidr::any_contains(&self.destinations, ip) {
                Ok(())
            } else {
                Err(format!(
                    "{ip} is not in this target's destinations ({})",
                    cidr::join(&self.destinations)
                ))
            };
        }
        if cidr::any_contains(PRIVATE_RANGES, ip) || cidr::any_contains(NOT_PUBLIC_RANGES, ip) {
            return Err(format!(
                "{ip} is not a public address, and backend public dials only public ones; \
                 use backend=private-ip for a database on a private network, or list the range in destinations="
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::{build, tests::target};

    #[test]
    fn public_addresses_only_unless_destinations_say_otherwise() {
        let backend =
            build(&target(&["postgres://db.example.com?backend=public"])).expect("builds");
        assert_eq!(
            backend.check_destination("8.8.8.8".parse().expect("ip")),
            Ok(())
        );
        for refused in [
            "10.0.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "::ffff:192.168.1.1",
        ] {
            let err = backend
                .check_destination(refused.parse().expect("ip"))
                .expect_err(refused);
            assert!(err.contains("is not a public address"), "{err}");
        }
        let pinned = build(&target(&[
            "postgres://db?backend=public&destinations=127.0.0.1",
        ]))
        .expect("builds");
        assert_eq!(
            pinned.check_destination("127.0.0.1".parse().expect("ip")),
            Ok(())
        );
        let err = pinned
            .check_destination("8.8.8.8".parse().expect("ip"))
            .expect_err("not listed");
        assert!(
            err.contains("not in this target's destinations (127.0.0.1/32)"),
            "{err}"
        );
    }

    #[test]
    fn verify_ca_and_an_open_listener_without_allowlist_are_refused() {
        let err = build(&target(&[
            "postgres://db?backend=public&tls-mode=verify-ca",
        ]))
        .map(|b| b.name())
        .expect_err("verify-ca");
        assert!(err.contains("requires tls-mode=verify-full"), "{err}");
        let err = build(&target(&["-a", "0.0.0.0", "postgres://db?backend=public"]))
            .map(|b| b.name())
            .expect_err("open listener");
        assert!(
            err.contains("listens on 0.0.0.0:5432") && err.contains("allow="),
            "{err}"
        );
        let open_with_allowlist = target(&[
            "-a",
            "0.0.0.0",
            "--allow",
            "10.0.0.0/8",
            "postgres://db?backend=public",
        ]);
        assert_eq!(build(&open_with_allowlist).map(|b| b.name()), Ok("public"));
        assert_eq!(
            build(&target(&["postgres://db?backend=public"])).map(|b| b.name()),
            Ok("public")
        );
    }
}
