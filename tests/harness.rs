//! Self-test of the integration-test harness (tests/support): the shared
//! PostgreSQL cluster speaks only TLS and knows the test users. Does not need
//! keyhole itself.

mod support;

use std::time::Instant;

use support::clients;
use support::postgres::{PgCluster, MD5_PASS, MD5_USER, SCRAM_PASS, SCRAM_USER, TRUST_USER};

#[test]
fn shared_cluster_is_tls_only_and_has_the_test_users() {
    let started = Instant::now();
    let pg = PgCluster::shared();
    eprintln!(
        "shared cluster on port {} ready after {:?}",
        pg.port,
        started.elapsed()
    );

    let ssl_sql = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    for (user, password) in [
        (SCRAM_USER, Some(SCRAM_PASS)),
        (MD5_USER, Some(MD5_PASS)),
        (TRUST_USER, None),
    ] {
        let ssl = pg
            .psql_direct(user, password, ssl_sql)
            .unwrap_or_else(|e| panic!("{user} over verify-full TLS:\n{e}"));
        assert_eq!(ssl, "t", "{user}'s connection uses TLS");
    }

    // The passwords are stored in the form their authentication method needs.
    let stored = pg.admin_sql(
        "select rolname || ' ' || case \
             when rolpassword like 'md5%' then 'md5' \
             when rolpassword like 'SCRAM-SHA-256$%' then 'scram' \
             else coalesce(rolpassword, 'none') end \
         from pg_authid where rolname in ('md5_user', 'scram_user', 'trust_user') \
         order by rolname",
    );
    assert_eq!(
        stored.lines().collect::<Vec<_>>(),
        ["md5_user md5", "scram_user scram", "trust_user none"],
        "stored secrets"
    );

    // A wrong password is refused (so scram-sha-256 really is enforced).
    let wrong = pg.psql_direct(SCRAM_USER, Some("not-the-password"), "select 1");
    let err = wrong.expect_err("a wrong password must be refused");
    assert!(err.contains("password authentication failed"), "{err}");

    // Without TLS, pg_hba.conf turns every connection away.
    let conninfo = format!(
        "host=127.0.0.1 port={} user={SCRAM_USER} dbname=postgres sslmode=disable",
        pg.port
    );
    let out = clients::psql_conninfo(&conninfo, Some(SCRAM_PASS), "select 1");
    let stderr = clients::stderr(&out);
    assert!(!out.status.success(), "a non-TLS connection was accepted");
    assert!(
        stderr.contains("pg_hba.conf rejects connection") && stderr.contains("no encryption"),
        "unexpected error for a non-TLS connection: {stderr}"
    );
}
