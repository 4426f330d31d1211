//! Real clients through keyhole with their default settings: psql, pgbench
//! and a Rust driver, for trust, md5 and scram-sha-256 server users; many
//! clients at once; protocol 3.2; TLS on the local leg (SSLRequest and PG17
//! direct TLS); cancel requests that arrive after an SSLRequest.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::certs::TestPki;
use support::clients::{self, expect_success};
use support::keyhole::Keyhole;
use support::postgres::{PgCluster, MD5_PASS, MD5_USER, SCRAM_PASS, SCRAM_USER, TRUST_USER};
use support::wire::{
    self, cancel_request, read_message, read_until_ready, simple_query, startup_packet, SSL_REQUEST,
};

const USERS: [(&str, Option<&str>); 3] = [
    (TRUST_USER, None),
    (MD5_USER, Some(MD5_PASS)),
    (SCRAM_USER, Some(SCRAM_PASS)),
];

/// What the server saw: the user and whether its connection is TLS.
const WHO_AND_TLS: &str =
    "select current_user || '|' || ssl::text from pg_stat_ssl where pid = pg_backend_pid()";

#[test]
fn psql_with_default_settings_logs_in_with_every_auth_method() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    for (user, password) in USERS {
        let out = clients::psql(keyhole.port(), user, password, WHO_AND_TLS);
        assert_eq!(
            expect_success(&out, user).trim(),
            format!("{user}|true"),
            "{user}"
        );
    }
    // The scram server offers SCRAM-SHA-256-PLUS over its TLS session;
    // libpq on a plain leg refuses such an offer, so passing this proves
    // keyhole withheld it. A wrong password still fails, with the server's words.
    let out = clients::psql(
        keyhole.port(),
        SCRAM_USER,
        Some("not-the-password"),
        "select 1",
    );
    assert!(!out.status.success());
    assert!(
        clients::stderr(&out).contains("password authentication failed for user \"scram_user\""),
        "{}",
        clients::stderr(&out)
    );
    let logs = keyhole.wait_for_log("outcome=\"server_refused\"", 1);
    for secret in [MD5_PASS, SCRAM_PASS, "not-the-password"] {
        assert!(
            !logs.contains(secret),
            "a password reached the log:\n{logs}"
        );
    }
}

#[test]
fn pgbench_with_default_settings_runs_clean() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    let port = keyhole.port().to_string();
    let base = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", SCRAM_USER];
    let mut init = base.to_vec();
    init.extend(["-i", "-q", "-s", "1", "--no-vacuum", "postgres"]);
    expect_success(&clients::pgbench(&init, Some(SCRAM_PASS)), "pgbench -i");
    let mut run = base.to_vec();
    run.extend(["-c", "4", "-j", "2", "-t", "50", "postgres"]);
    let out = expect_success(&clients::pgbench(&run, Some(SCRAM_PASS)), "pgbench run");
    assert!(
        out.contains("number of transactions actually processed: 200/200"),
        "{out}"
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
}

async fn driver_connect(port: u16, user: &str, password: Option<&str>) -> tokio_postgres::Client {
    let mut conninfo = format!("host=127.0.0.1 port={port} user={user} dbname=postgres");
    if let Some(p) = password {
        conninfo.push_str(&format!(" password={p}"));
    }
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{user} through keyhole: {e}"));
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn rust_driver_logs_in_with_every_auth_method() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    for (user, password) in USERS {
        let client = driver_connect(keyhole.port(), user, password).await;
        let row = client
            .query_one("select current_user::text, ssl, $1::int + 1 from pg_stat_ssl where pid = pg_backend_pid()", &[&41i32])
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), user);
        assert!(row.get::<_, bool>(1), "the server side must be TLS");
        assert_eq!(row.get::<_, i32>(2), 42);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_at_once() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    let port = keyhole.port();
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        tasks.push(tokio::spawn(async move {
            let client = driver_connect(port, MD5_USER, Some(MD5_PASS)).await;
            let row = client
                .query_one("select $1::int * 2, pg_backend_pid()", &[&i])
                .await
                .expect("query");
            // Hold every session open until all have answered once.
            (row.get::<_, i32>(0), row.get::<_, i32>(1), client)
        }));
    }
    let mut pids = std::collections::HashSet::new();
    let mut clients_held = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (doubled, pid, client) = task.await.expect("join");
        assert_eq!(doubled, 2 * i as i32);
        pids.insert(pid);
        clients_held.push(client);
    }
    assert_eq!(pids.len(), 200, "each client has its own server session");
    let open: i64 = clients_held[0]
        .query_one(
            "select count(*) from pg_stat_activity where usename = 'md5_user'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(open >= 200, "{open} sessions open on the server");
}

// --- raw protocol helpers -------------------------------------------------

/// Reads messages until an ErrorResponse; returns its SQLSTATE.
fn read_error_code(stream: &mut impl Read) -> String {
    loop {
        let (tag, body) = read_message(stream);
        if tag == b'E' {
            return wire::error_field(&body, 'C');
        }
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to keyhole");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

#[test]
fn protocol_3_2_startup_is_negotiated_through() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    let mut s = connect(keyhole.port());
    s.write_all(&startup_packet(
        (3 << 16) | 2,
        &[("user", TRUST_USER), ("database", "postgres")],
    ))
    .expect("startup 3.2");
    let (tags, key) = read_until_ready(&mut s);
    // PostgreSQL 15 speaks 3.0 and says so with NegotiateProtocolVersion.
    assert_eq!(
        tags.first(),
        Some(&b'v'),
        "tags: {:?}",
        String::from_utf8_lossy(&tags)
    );
    assert!(tags.contains(&b'R') && tags.contains(&b'K'));
    assert_eq!(key.len(), 8);
    s.write_all(&simple_query("select 1")).expect("query");
    let (tag, _) = read_message(&mut s);
    assert_eq!(tag, b'T', "row description");
}

#[test]
fn cancel_request_after_ssl_request_reaches_the_server() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    let mut session = connect(keyhole.port());
    session
        .write_all(&startup_packet(
            3 << 16,
            &[("user", TRUST_USER), ("database", "postgres")],
        ))
        .expect("startup");
    let (_, key) = read_until_ready(&mut session);
    session
        .write_all(&simple_query("select pg_sleep(60)"))
        .expect("query");
    // Wait until the server runs it, then cancel from a second connection
    // that opens with SSLRequest (answered 'N') as libpq may do.
    let pid = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cluster
        .admin_sql(&format!(
            "select wait_event from pg_stat_activity where pid = {pid}"
        ))
        .trim()
        != "PgSleep"
    {
        assert!(std::time::Instant::now() < deadline, "query never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut cancel = connect(keyhole.port());
    cancel.write_all(&SSL_REQUEST).expect("ssl request");
    let mut answer = [0u8; 1];
    cancel.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N");
    cancel.write_all(&cancel_request(&key)).expect("cancel");
    assert_eq!(read_error_code(&mut session), "57014", "query_canceled");
}

// --- TLS on the local leg ---------------------------------------------------

fn local_tls_keyhole(cluster: &PgCluster) -> (Keyhole, TestPki) {
    let local = TestPki::generate(&["localhost"]);
    let cert = local.server_cert.to_str().expect("utf-8").to_owned();
    let key = local.server_key.to_str().expect("utf-8").to_owned();
    let keyhole = Keyhole::for_cluster(cluster, &["--listen-cert", &cert, "--listen-key", &key]);
    (keyhole, local)
}

#[test]
fn psql_verifies_keyholes_local_certificate() {
    let cluster = PgCluster::shared();
    let (keyhole, local) = local_tls_keyhole(cluster);
    let conninfo = |user: &str, extra: &str| {
        format!(
            "host=localhost port={} user={user} dbname=postgres sslmode=verify-full sslrootcert={} {extra}",
            keyhole.port(),
            local.ca.display()
        )
    };
    let out = clients::psql_conninfo(&conninfo(MD5_USER, ""), Some(MD5_PASS), WHO_AND_TLS);
    assert_eq!(
        expect_success(&out, "psql over local TLS").trim(),
        format!("{MD5_USER}|true")
    );

    // SCRAM over a TLS client leg: libpq (channel_binding=prefer) tells the
    // server it could bind but was not offered to; the server takes that as
    // a downgrade and refuses. The flag is signed, so no proxy may rewrite
    // it: such clients set channel_binding=disable (see docs/clients.md).
    let out = clients::psql_conninfo(&conninfo(SCRAM_USER, ""), Some(SCRAM_PASS), "select 1");
    assert!(
        clients::stderr(&out).contains("channel binding"),
        "{}",
        clients::stderr(&out)
    );
    // A client that insists on binding fails by design, with libpq's own
    // message (the README's security model says what to use instead).
    let out = clients::psql_conninfo(
        &conninfo(SCRAM_USER, "channel_binding=require"),
        Some(SCRAM_PASS),
        "select 1",
    );
    assert!(!out.status.success());
    assert!(
        clients::stderr(&out).contains(
            "channel binding is required, but server did not offer an authentication method that supports channel binding"
        ),
        "{}",
        clients::stderr(&out)
    );
    let out = clients::psql_conninfo(
        &conninfo(SCRAM_USER, "channel_binding=disable"),
        Some(SCRAM_PASS),
        WHO_AND_TLS,
    );
    assert_eq!(
        expect_success(&out, "scram over local TLS").trim(),
        format!("{SCRAM_USER}|true")
    );
    // Plain clients keep working next to TLS ones.
    let out = clients::psql(keyhole.port(), TRUST_USER, None, "select 1");
    assert_eq!(expect_success(&out, "plain psql").trim(), "1");
}

#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    keyhole::tls::install_crypto_provider();
    let cluster = PgCluster::shared();
    let (keyhole, local) = local_tls_keyhole(cluster);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");

    // PG17 direct TLS: a ClientHello first, ALPN "postgresql".
    let connector = tokio_rustls::TlsConnector::from(local.tls_client_config(Some(b"postgresql")));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", keyhole.port()))
        .await
        .expect("tcp");
    let mut tls = connector
        .connect(name.clone(), tcp)
        .await
        .expect("direct TLS handshake");
    tls.write_all(&startup_packet(
        3 << 16,
        &[("user", TRUST_USER), ("database", "postgres")],
    ))
    .await
    .expect("startup");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = tls.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before ReadyForQuery: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(seen[0], b'R', "authentication first");

    // Without ALPN the handshake may complete, but the session is refused.
    let connector = tokio_rustls::TlsConnector::from(local.tls_client_config(None));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", keyhole.port()))
        .await
        .expect("tcp");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(
        reply.first() == Some(&b'E') && text.contains("ALPN"),
        "{text}"
    );
    keyhole.wait_for_log("outcome=\"client_protocol\"", 1);
}
