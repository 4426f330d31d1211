//! Self-test of the MariaDB part of the harness (tests/support/mariadb.rs): the
//! shared server speaks only TLS and knows the test users, the `mariadb` client
//! behaves as the harness documents, and a `tls: false` server offers no TLS.
//! Does not need keyhole itself.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::clients;
use support::mariadb::{
    self, MariaDb, MariaDbOptions, CLIENT_SSL, DATABASE, ED25519_PASS, ED25519_USER, NATIVE_PASS,
    NATIVE_USER,
};
use support::process::describe_output;

/// `current_user()` and whether the session uses TLS (a cipher): `user@%\t1`.
const WHO_AND_TLS: &str = "select current_user(), variable_value <> '' from \
     information_schema.session_status where variable_name = 'Ssl_cipher'";

/// The error MariaDB 10.11 gives a plain login to a `require_secure_transport`
/// server (the same as for a wrong password).
fn access_denied(user: &str) -> String {
    format!("ERROR 1045 (28000): Access denied for user '{user}'@'127.0.0.1' (using password: YES)")
}

#[test]
fn shared_server_requires_tls_and_has_the_test_users() {
    let started = Instant::now();
    let db = MariaDb::shared();
    eprintln!(
        "shared MariaDB on port {} ready after {:?}",
        db.port(),
        started.elapsed()
    );

    let admin = db.admin_sql("select current_user(), @@have_ssl, @@require_secure_transport");
    let fields: Vec<&str> = admin.split('\t').collect();
    assert!(
        matches!(fields[..], [who, "YES", "1"] if who.ends_with("@localhost")),
        "administrator over the socket, TLS on and required: {admin:?}"
    );
    assert_eq!(
        db.admin_sql(
            "select user, host, plugin from mysql.user \
             where user in ('native_user', 'ed25519_user') order by user"
        )
        .lines()
        .collect::<Vec<_>>(),
        [
            "ed25519_user\t%\ted25519",
            "native_user\t%\tmysql_native_password"
        ],
        "test users and their authentication plugins"
    );

    // Verified TLS straight to the server, for both authentication methods.
    for (user, password) in [(NATIVE_USER, NATIVE_PASS), (ED25519_USER, ED25519_PASS)] {
        let out = db
            .mariadb_direct(user, password, WHO_AND_TLS)
            .unwrap_or_else(|e| panic!("{user} over verified TLS:\n{e}"));
        assert_eq!(out, format!("{user}@%\t1"), "{user}'s connection uses TLS");
        let grants = db
            .mariadb_direct(user, password, "show grants")
            .unwrap_or_else(|e| panic!("show grants as {user}:\n{e}"));
        assert!(
            grants.contains("GRANT PROCESS, CONNECTION ADMIN ON *.*")
                && grants.contains(&format!("GRANT ALL PRIVILEGES ON `{DATABASE}`.*")),
            "grants of {user}:\n{grants}"
        );
    }

    // The server offers TLS in its greeting.
    let greeting = mariadb::read_greeting(db.port()).expect("read the greeting");
    assert_eq!(greeting.protocol_version, 10);
    assert!(greeting.server_version.contains("MariaDB"), "{greeting:?}");
    assert_ne!(greeting.capabilities & CLIENT_SSL, 0, "{greeting:?}");
    assert_eq!(
        greeting.auth_plugin.as_deref(),
        Some("mysql_native_password"),
        "{greeting:?}"
    );

    // A wrong password is refused.
    let err = db
        .mariadb_direct(NATIVE_USER, "not-the-password", "select 1")
        .expect_err("a wrong password must be refused");
    assert!(err.contains(&access_denied(NATIVE_USER)), "{err}");

    // Plain TCP is refused even with the right password: MariaDB reports it as
    // "Access denied" (not MySQL's ERROR 3159).
    let port = db.port().to_string();
    for (user, password) in [(NATIVE_USER, NATIVE_PASS), (ED25519_USER, ED25519_PASS)] {
        let out = mariadb::mariadb_tcp(
            &port,
            user,
            Some(password),
            &["--skip-ssl", "-e", "select 1"],
        );
        assert!(!out.status.success(), "a plain login was accepted");
        let stderr = clients::stderr(&out);
        assert_eq!(stderr.trim_end(), access_denied(user), "plain login");
    }
}

#[test]
fn client_defaults_use_tls_when_offered_without_verifying() {
    let db = MariaDb::shared();
    // No TLS option at all: the client upgrades to TLS, and does not check the
    // certificate (the test CA is unknown to it).
    for (user, password) in [(NATIVE_USER, NATIVE_PASS), (ED25519_USER, ED25519_PASS)] {
        let out = mariadb::mariadb(db.port(), user, Some(password), WHO_AND_TLS);
        let out = clients::expect_success(&out, "mariadb with default settings");
        assert_eq!(out, format!("{user}@%\t1"), "the default client uses TLS");
    }

    // Verification is available but off by default: asking for it without the
    // CA fails.
    let port = db.port().to_string();
    let out = mariadb::mariadb_tcp(
        &port,
        NATIVE_USER,
        Some(NATIVE_PASS),
        &["--ssl-verify-server-cert", "-e", "select 1"],
    );
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert!(
        clients::stderr(&out).contains(
            "ERROR 2026 (HY000): TLS/SSL error: self-signed certificate in certificate chain"
        ),
        "{}",
        describe_output(&out)
    );

    // No password given: no MYSQL_PWD leaks in, the login has no password.
    let out = mariadb::mariadb(db.port(), NATIVE_USER, None, "select 1");
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert!(
        clients::stderr(&out).contains("(using password: NO)"),
        "{}",
        describe_output(&out)
    );
}

#[test]
fn kill_query_works_across_the_test_users() {
    let db = MariaDb::shared();
    let port = db.port();
    let sleeper = std::thread::spawn(move || {
        let started = Instant::now();
        let out = mariadb::mariadb(port, ED25519_USER, Some(ED25519_PASS), "select sleep(120)");
        (out, started.elapsed())
    });

    let find = "select id from information_schema.processlist \
                where user = 'ed25519_user' and info = 'select sleep(120)'";
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let id = db
            .mariadb_direct(NATIVE_USER, NATIVE_PASS, find)
            .unwrap_or_else(|e| panic!("list the processes:\n{e}"));
        if !id.is_empty() {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the sleeping query never showed up"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    db.mariadb_direct(NATIVE_USER, NATIVE_PASS, &format!("KILL QUERY {id}"))
        .unwrap_or_else(|e| panic!("native_user kills ed25519_user's query:\n{e}"));

    let (out, took) = sleeper.join().expect("the sleeping client's thread");
    // The killed statement fails; the client exits with an error.
    assert!(
        !out.status.success()
            && clients::stderr(&out)
                .contains("ERROR 1317 (70100) at line 1: Query execution was interrupted"),
        "{}",
        describe_output(&out)
    );
    assert!(
        took < Duration::from_secs(100),
        "KILL QUERY took effect late: {took:?}"
    );
}

#[test]
fn plain_server_offers_no_tls_restarts_and_cleans_up() {
    let started = Instant::now();
    let db = MariaDb::start(MariaDbOptions {
        tls: false,
        extra_conf: vec!["wait_timeout=3600".to_string()],
    });
    eprintln!(
        "plain MariaDB on port {} ready after {:?}",
        db.port(),
        started.elapsed()
    );
    assert_eq!(
        db.admin_sql("select @@have_ssl, @@require_secure_transport, @@wait_timeout"),
        "DISABLED\t0\t3600"
    );

    let greeting = mariadb::read_greeting(db.port()).expect("read the greeting");
    assert_eq!(
        greeting.capabilities & CLIENT_SSL,
        0,
        "no TLS offered: {greeting:?}"
    );

    // The default client carries on without TLS, silently.
    for (user, password) in [(NATIVE_USER, NATIVE_PASS), (ED25519_USER, ED25519_PASS)] {
        let out = mariadb::mariadb(db.port(), user, Some(password), WHO_AND_TLS);
        assert_eq!(
            clients::stderr(&out),
            "",
            "no warning about the missing TLS"
        );
        let out = clients::expect_success(&out, "default client against a plain server");
        assert_eq!(out, format!("{user}@%\t0"), "plain connection");
    }

    // Only --ssl-verify-server-cert makes the client insist on TLS.
    let err = db
        .mariadb_direct(NATIVE_USER, NATIVE_PASS, "select 1")
        .expect_err("verified TLS against a server without TLS");
    assert!(
        err.contains(
            "ERROR 2026 (HY000): TLS/SSL error: SSL is required, but the server does not support it"
        ),
        "{err}"
    );

    // Restart: same port, same data, accepting again.
    let old_pid = db.pid().expect("running");
    let restarted = Instant::now();
    db.restart();
    eprintln!("restart took {:?}", restarted.elapsed());
    assert_ne!(db.pid(), Some(old_pid));
    let out = mariadb::mariadb(db.port(), NATIVE_USER, Some(NATIVE_PASS), "select 42");
    assert_eq!(clients::expect_success(&out, "after restart"), "42");

    // stop() kills the server and deletes everything.
    let scratch = db.scratch_dir().to_path_buf();
    let pid = db.pid().expect("running");
    let stopping = Instant::now();
    db.stop();
    eprintln!("stop took {:?}", stopping.elapsed());
    assert!(!scratch.exists(), "{} still exists", scratch.display());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "mariadbd {pid} still exists"
    );
    assert!(
        mariadb::read_greeting(db.port()).is_err(),
        "something still answers on the port"
    );
}

#[test]
fn parses_a_greeting() {
    let mut payload = vec![10u8];
    payload.extend_from_slice(b"5.5.5-10.11.19-MariaDB\0");
    payload.extend_from_slice(&7u32.to_le_bytes());
    payload.extend_from_slice(b"abcdefgh\0");
    payload.extend_from_slice(&0xf7feu16.to_le_bytes());
    payload.push(45);
    payload.extend_from_slice(&2u16.to_le_bytes());
    payload.extend_from_slice(&0x81bfu16.to_le_bytes());
    payload.push(21);
    payload.extend_from_slice(&[0; 10]);
    payload.extend_from_slice(b"ijklmnopqrst\0");
    payload.extend_from_slice(b"mysql_native_password\0");
    let greeting = mariadb::parse_greeting(&payload).expect("a valid greeting");
    assert_eq!(greeting.server_version, "5.5.5-10.11.19-MariaDB");
    assert_eq!(greeting.connection_id, 7);
    assert_eq!(greeting.capabilities, 0x81bf_f7fe);
    assert_eq!(
        greeting.auth_plugin.as_deref(),
        Some("mysql_native_password")
    );

    let error = [0xff, 0x10, 0x04, b'T', b'o', b'o'];
    let err = mariadb::parse_greeting(&error).expect_err("an error packet");
    assert!(err.contains("Too"), "{err}");
}
