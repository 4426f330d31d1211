//! Malformed, hostile and slow clients: each gets what PostgreSQL would
//! answer (an ErrorResponse, or nothing where the server closes without a
//! word; tests/pg_like_the_server.rs compares the two) and a log line, and
//! keyhole keeps serving everyone else. Also the connection limit.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::clients::{self, expect_success};
use support::keyhole::Keyhole;
use support::postgres::{PgCluster, MD5_PASS, MD5_USER, TRUST_USER};
use support::wire::{cancel_request, startup_packet, GSSENC_REQUEST, SSL_REQUEST};

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to keyhole");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s
}

/// Everything keyhole sends until it closes the connection.
fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The fields of the single FATAL ErrorResponse that `reply` must be.
fn error_fields(reply: &[u8]) -> (String, String) {
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "expected an ErrorResponse, got {reply:?}"
    );
    let len = u32::from_be_bytes([reply[1], reply[2], reply[3], reply[4]]) as usize;
    assert_eq!(reply.len(), 1 + len, "exactly one message, then close");
    let text = String::from_utf8_lossy(&reply[5..]).into_owned();
    let field = |c: char| {
        text.split('\0')
            .find_map(|f| f.strip_prefix(c))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field('S'), "FATAL");
    (field('C'), field('M'))
}

/// Sends `bytes` and everything keyhole answers until it closes.
fn answer_to(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = connect(port);
    s.write_all(bytes).expect("send");
    read_all(&mut s)
}

/// Sends `bytes`, expects one FATAL ErrorResponse, returns (SQLSTATE, message).
fn refused(port: u16, bytes: &[u8]) -> (String, String) {
    error_fields(&answer_to(port, bytes))
}

#[test]
fn malformed_startup_packets_are_answered_as_the_server_would_and_keyhole_stays_up() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    let port = keyhole.port();

    // Over the server's cap (10,000 bytes after the length word): closed
    // without a byte, as the server does, from the length alone; the log
    // says why.
    let mut oversized = 20_000u32.to_be_bytes().to_vec();
    oversized.extend_from_slice(&(3u32 << 16).to_be_bytes());
    assert_eq!(answer_to(port, &oversized), b"", "closed without a byte");
    keyhole.wait_for_log(
        "startup packet length 20000 is out of range (8 to 10004 bytes)",
        1,
    );

    // A typed message or text where a startup packet belongs reads as such a
    // length: the same. (node-postgres' connect() then end() sends Terminate
    // first, and must not be answered with an error it would die on.)
    for early in [&b"X\0\0\0\x04"[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"] {
        assert_eq!(answer_to(port, early), b"", "closed without a byte");
    }
    // A CancelRequest too short for a key: no answer, as to any cancel.
    assert_eq!(answer_to(port, &cancel_request(&[0, 0, 0, 1])), b"");

    let (code, msg) = refused(port, &[0, 0, 0, 8, 0x04, 0xd2, 0x99, 0x99]);
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "0A000",
            "invalid startup packet: unsupported frontend protocol 1234.39321: server supports 3.0 to 3.2"
        )
    );

    // A protocol-2 client is answered in the format it reads.
    assert_eq!(
        answer_to(port, &startup_packet(2 << 16, &[("user", "u")])),
        b"EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.2\n\0"
    );

    let (code, msg) = refused(port, &startup_packet(3 << 16, &[("database", "postgres")]));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "28000",
            "invalid startup packet: no user name in startup packet"
        )
    );

    // A parameter list that never ends inside its packet.
    let mut unterminated = 14u32.to_be_bytes().to_vec();
    unterminated.extend_from_slice(&(3u32 << 16).to_be_bytes());
    unterminated.extend_from_slice(b"user\0a");
    let (code, msg) = refused(port, &unterminated);
    assert_eq!(code, "08P01");
    assert!(msg.contains("startup parameter without a value"), "{msg}");

    keyhole.wait_for_log("outcome=\"client_protocol\"", 8);
    let out = clients::psql(port, TRUST_USER, None, "select 'still serving'");
    assert_eq!(
        expect_success(&out, "psql after garbage").trim(),
        "still serving"
    );
}

#[test]
fn each_upgrade_is_allowed_once() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &[]);
    let port = keyhole.port();

    let mut s = connect(port);
    s.write_all(&SSL_REQUEST).expect("ssl");
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N", "no local certificate: plain");
    s.write_all(&SSL_REQUEST).expect("ssl again");
    // Once answered, the request's code reads as an unsupported protocol
    // version (1234.5679), as the server reads it.
    let (code, msg) = error_fields(&read_all(&mut s));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("0A000", "SSLRequest sent twice or after TLS was set up")
    );

    // GSSENCRequest is declined; the client may then go on in plain text.
    let mut s = connect(port);
    s.write_all(&GSSENC_REQUEST).expect("gss");
    s.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N");
    s.write_all(&GSSENC_REQUEST).expect("gss again");
    let (code, msg) = error_fields(&read_all(&mut s));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("0A000", "GSSENCRequest sent twice or after TLS was set up")
    );

    let mut s = connect(port);
    s.write_all(&GSSENC_REQUEST).expect("gss");
    s.read_exact(&mut answer).expect("answer");
    s.write_all(&SSL_REQUEST).expect("then ssl");
    s.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N");
    s.write_all(&startup_packet(
        3 << 16,
        &[("user", TRUST_USER), ("database", "postgres")],
    ))
    .expect("startup");
    let mut first = [0u8; 1];
    s.read_exact(&mut first).expect("reply");
    assert_eq!(
        &first, b"R",
        "authentication proceeds after both were declined"
    );
}

#[test]
fn bytes_pipelined_behind_an_ssl_request_are_refused_before_tls() {
    let cluster = PgCluster::shared();
    let local = support::certs::TestPki::generate(&["localhost"]);
    let cert = local.server_cert.to_str().expect("utf-8").to_owned();
    let key = local.server_key.to_str().expect("utf-8").to_owned();
    let keyhole = Keyhole::for_cluster(cluster, &["--listen-cert", &cert, "--listen-key", &key]);
    // An SSLRequest and a StartupMessage in one write: had keyhole said 'S',
    // the StartupMessage would be read as if it came through TLS.
    let mut bytes = SSL_REQUEST.to_vec();
    bytes.extend(startup_packet(3 << 16, &[("user", TRUST_USER)]));
    let (code, msg) = refused(keyhole.port(), &bytes);
    assert_eq!(code, "08P01");
    assert_eq!(
        msg,
        "client sent data after SSLRequest before the TLS handshake"
    );
}

#[test]
fn a_silent_client_is_timed_out_with_an_error() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &["--startup-timeout", "1s"]);
    let mut silent = connect(keyhole.port());
    let (code, msg) = error_fields(&read_all(&mut silent));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "08P01",
            "client sent no startup packet within 1s (--startup-timeout)"
        )
    );

    // Half a packet, then nothing: the same.
    let mut slow = connect(keyhole.port());
    slow.write_all(&[0, 0, 0, 40, 0, 3]).expect("partial");
    let (_, msg) = error_fields(&read_all(&mut slow));
    assert_eq!(
        msg,
        "client sent no startup packet within 1s (--startup-timeout)"
    );
    keyhole.wait_for_log("outcome=\"startup_timeout\"", 2);
}

#[tokio::test]
async fn clients_over_the_limit_get_53300_and_the_next_one_fits_again() {
    let cluster = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(cluster, &["--max-connections", "1"]);
    let conninfo = format!(
        "host=127.0.0.1 port={} user={MD5_USER} password={MD5_PASS} dbname=postgres",
        keyhole.port()
    );
    let (held, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("first client");
    let conn_task = tokio::spawn(connection);
    held.simple_query("select 1").await.expect("first works");

    let err = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .err()
        .expect("second client is over the limit");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(db.code().code(), "53300");
    assert_eq!(
        db.message(),
        "too many connections: keyhole allows 1 at once (--max-connections)"
    );

    drop(held);
    let _ = conn_task.await;
    // The slot is free again once the first session is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
    keyhole.wait_for_log("outcome=\"too_many_connections\"", 1);
}
