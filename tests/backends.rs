//! Backends and the inbound allowlist through the real `keyhole` binary, with
//! real clients against the real servers: `private-ip` refuses a public
//! address before dialling it, `public` dials only public addresses (or its
//! explicit `destinations=`), demands verify-full and an allowlist off
//! loopback, and `allow=` turns a client away at accept with the protocol's
//! own error, for either protocol.

mod support;

use std::time::Duration;

use support::clients;
use support::keyhole::Keyhole;
use support::mariadb::{self, MariaDb, NATIVE_PASS, NATIVE_USER};
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER};

/// A TEST-NET-3 address (RFC 5737): not private, so private-ip must refuse
/// it; nothing answers there, so a dial would end in a timeout instead.
const PUBLIC_ADDR: &str = "203.0.113.5";

fn ca(pki: &support::certs::TestPki) -> String {
    pki.ca.to_str().expect("UTF-8 path").to_owned()
}

/// psql through keyhole's `port` must fail; its stderr.
fn psql_refused(port: u16) -> String {
    let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), "select 1");
    assert!(
        !out.status.success(),
        "psql should have been refused: {}",
        clients::stdout(&out)
    );
    clients::stderr(&out)
}

/// The mariadb CLI through keyhole's `port` must fail; its stderr.
fn mariadb_refused(port: u16) -> String {
    let out = mariadb::mariadb(port, NATIVE_USER, Some(NATIVE_PASS), "select 1");
    assert!(
        !out.status.success(),
        "mariadb should have been refused: {}",
        clients::stdout(&out)
    );
    clients::stderr(&out)
}

#[test]
fn private_ip_refuses_a_public_address_before_dialling_it() {
    // A dial to PUBLIC_ADDR would end in "timed out after 30s"; the policy
    // answers at once, naming the address and the rule.
    let pg = Keyhole::start(&[
        "--connect-timeout",
        "30s",
        &format!("postgres://{PUBLIC_ADDR}:5432"),
    ]);
    let err = psql_refused(pg.port());
    assert!(
        err.contains(&format!("keyhole will not connect to {PUBLIC_ADDR}:5432: {PUBLIC_ADDR} is not a private address, and backend private-ip dials only private ones")),
        "{err}"
    );
    assert!(err.contains("destinations="), "says how to allow it: {err}");
    let log = pg.wait_for_log("outcome=\"policy_refused\"", 1);
    assert!(
        log.contains("address refused by the backend's policy"),
        "{log}"
    );
    assert!(log.contains(&format!("address={PUBLIC_ADDR}")), "{log}");

    let my = Keyhole::start(&[
        "--connect-timeout",
        "30s",
        &format!("mysql://{PUBLIC_ADDR}:3306"),
    ]);
    let err = mariadb_refused(my.port());
    assert!(
        err.contains(&format!("{PUBLIC_ADDR} is not a private address")),
        "{err}"
    );
    my.wait_for_log("outcome=\"policy_refused\"", 1);
}

#[test]
fn private_ip_dials_extra_destinations_it_is_given() {
    // With the range added the policy lets it through and the dial itself is
    // what fails (a timeout, or whatever a sandbox's network puts there):
    // proof the refusal above came from the policy alone.
    let kh = Keyhole::start(&[
        "--connect-timeout",
        "1s",
        &format!("postgres://{PUBLIC_ADDR}:5432?destinations=203.0.113.0/24"),
    ]);
    let err = psql_refused(kh.port());
    assert!(!err.contains("is not a private address"), "{err}");
    assert!(
        err.contains(&format!("{PUBLIC_ADDR}:5432")),
        "the dial was tried: {err}"
    );
    assert!(!err.contains("keyhole will not connect"), "{err}");
}

#[test]
fn public_refuses_a_private_address_unless_listed() {
    let pg = PgCluster::shared();
    let target = format!(
        "postgres://127.0.0.1:{}?server-name=localhost&backend=public",
        pg.port
    );
    let kh = Keyhole::start(&["--ca-file", &ca(&pg.pki), &target]);
    let err = psql_refused(kh.port());
    assert!(
        err.contains(
            "127.0.0.1 is not a public address, and backend public dials only public ones"
        ),
        "{err}"
    );

    // An explicit destination list is the only thing public dials.
    let listed = format!("{target}&destinations=127.0.0.1/32");
    let kh = Keyhole::start(&["--ca-file", &ca(&pg.pki), &listed]);
    let out = clients::psql(
        kh.port(),
        SCRAM_USER,
        Some(SCRAM_PASS),
        "select 'through public'",
    );
    assert_eq!(
        clients::expect_success(&out, "public with destinations"),
        "through public"
    );
}

#[test]
fn public_will_not_start_without_verify_full_or_with_an_open_listener_and_no_allowlist() {
    let (status, out) = Keyhole::start_expect_exit(
        &["-a", "0.0.0.0", "postgres://db.example.com?backend=public"],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("backend public listens on 0.0.0.0:"), "{out}");
    assert!(out.contains("has no allowlist: set allow=CIDR"), "{out}");

    let (status, out) = Keyhole::start_expect_exit(
        &["postgres://db.example.com?backend=public&tls-mode=verify-ca"],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("backend public requires tls-mode=verify-full"),
        "{out}"
    );

    let (status, out) =
        Keyhole::start_expect_exit(&["postgres://db?backend=bastion"], Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("unknown backend 'bastion' (known: private-ip, public)"),
        "{out}"
    );
}

#[test]
fn a_client_outside_the_allowlist_is_refused_at_accept_with_the_protocols_error() {
    let pg = PgCluster::shared();
    let target = format!(
        "{}&backend=public&destinations=127.0.0.1&allow=10.0.0.0/8,192.168.0.0/16",
        pg.keyhole_target()
    );
    let kh = Keyhole::start(&["--ca-file", &ca(&pg.pki), &target]);
    let err = psql_refused(kh.port());
    assert!(
        err.contains("this client's address is not in the target's allow list (allow=)"),
        "{err}"
    );
    let log = kh.wait_for_log("outcome=\"not_allowed\"", 1);
    assert!(
        log.contains("client refused: its address is not in the target's allow list"),
        "{log}"
    );
    assert!(log.contains("allow=10.0.0.0/8, 192.168.0.0/16"), "{log}");
    assert!(
        !log.contains("upstream"),
        "no upstream work for a refused client: {log}"
    );

    // The same target with loopback allowed serves.
    let open = format!("{}&allow=127.0.0.0/8", pg.keyhole_target());
    let kh = Keyhole::start(&["--ca-file", &ca(&pg.pki), &open]);
    let out = clients::psql(kh.port(), SCRAM_USER, Some(SCRAM_PASS), "select 'allowed'");
    assert_eq!(clients::expect_success(&out, "allowed client"), "allowed");

    // --allow sets it for every target, MySQL included: ER_HOST_NOT_PRIVILEGED.
    let my = MariaDb::shared();
    let kh = Keyhole::start(&[
        "--allow",
        "10.0.0.0/8",
        "--ca-file",
        &ca(my.pki()),
        &my.keyhole_target(),
    ]);
    let err = mariadb_refused(kh.port());
    assert!(err.contains("1130"), "{err}");
    assert!(err.contains("not in the target's allow list"), "{err}");
    kh.wait_for_log("outcome=\"not_allowed\"", 1);
}
