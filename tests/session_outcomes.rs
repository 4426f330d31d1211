//! How sessions end, one class at a time, with real PostgreSQL and MariaDB
//! servers behind keyhole: the `outcome` of the "connection closed" line,
//! the line's level, and `keyhole_connections_closed_total{outcome}`.
//!
//! What a client does to its own connection (a goodbye, a close without
//! one, a reset) is logged at INFO, as the server keyhole stands in front
//! of takes it in stride; so is a server that ends the session with a
//! proper TLS close. A server that fails under a session (or closes it
//! without close_notify, which nothing on the path can tell from a cut), a
//! limit and a drain are warnings. Besides the tests here, `faults.rs`
//! (`an_upstream_reset_ends_only_the_affected_session`) and
//! `postgres_lifecycle.rs` (sessions cut at shutdown) check their lines'
//! levels too.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use support::clients::{self, expect_success};
use support::keyhole::Keyhole;
use support::logs::{closed_lines, field};
use support::mariadb::{self, MariaDb, DATABASE, NATIVE_PASS, NATIVE_USER};
use support::postgres::{PgCluster, TRUST_USER};
use support::session::wait_until;
use support::wire::{read_message, read_until_ready, startup_packet};

const PATIENCE: Duration = Duration::from_secs(30);

/// keyhole with `/metrics` on a port of its own, in front of `target`.
fn keyhole_with_metrics(ca: &std::path::Path, target: &str) -> (Keyhole, u16) {
    let http = support::free_port();
    let http_arg = http.to_string();
    let ca = ca.to_str().expect("the CA path is UTF-8");
    let keyhole = Keyhole::start(&[
        "--prometheus",
        "--http-port",
        &http_arg,
        "--ca-file",
        ca,
        target,
    ]);
    (keyhole, http)
}

/// Waits until keyhole has logged `count` "connection closed" lines, and
/// returns them.
fn wait_closed(keyhole: &Keyhole, count: usize) -> Vec<HashMap<String, String>> {
    wait_until(
        &format!("{count} \"connection closed\" lines"),
        PATIENCE,
        || closed_lines(&keyhole.logs()).len() >= count,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    let logs = keyhole.logs();
    assert!(!logs.contains("panicked"), "keyhole panicked:\n{logs}");
    closed_lines(&logs)
}

/// The outcome and level of each closed line, in order.
fn endings(closed: &[HashMap<String, String>]) -> Vec<(String, String)> {
    closed
        .iter()
        .map(|f| (field(f, "outcome").to_owned(), field(f, "level").to_owned()))
        .collect()
}

/// Waits for as many "connection closed" lines as `want` has, checks their
/// (outcome, level) in order, and returns them.
fn expect_endings(keyhole: &Keyhole, want: &[(&str, &str)]) -> Vec<HashMap<String, String>> {
    let closed = wait_closed(keyhole, want.len());
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(endings(&closed), want, "{}", keyhole.logs());
    closed
}

/// `keyhole_connections_closed_total{outcome}` on `http`.
fn closed_count(http: u16, outcome: &str) -> f64 {
    support::http::metric(
        http,
        "keyhole_connections_closed_total",
        &format!("outcome=\"{outcome}\""),
    )
}

/// A Postgres session of the trust user through keyhole's `port`, logged in
/// by hand (no Terminate is ever sent unless the test sends one).
fn pg_session(port: u16, application: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to keyhole");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    s.write_all(&startup_packet(
        3 << 16,
        &[
            ("user", TRUST_USER),
            ("database", "postgres"),
            ("application_name", application),
        ],
    ))
    .expect("startup");
    read_until_ready(&mut s);
    s
}

#[test]
fn postgres_clients_that_close_vanish_or_reset_are_info_each_under_its_own_label() {
    let pg = PgCluster::shared();
    let (keyhole, http) = keyhole_with_metrics(&pg.pki.ca, &pg.keyhole_target());
    let port = keyhole.port();

    // psql says goodbye (Terminate) before it closes.
    let out = clients::psql(port, TRUST_USER, None, "select 1");
    assert_eq!(expect_success(&out, "psql").trim(), "1");
    wait_closed(&keyhole, 1);

    // A client that closes its socket without Terminate.
    drop(pg_session(port, "outcome_vanished"));
    wait_closed(&keyhole, 2);

    // A client whose socket is reset (SO_LINGER 0, then close: an RST).
    let reset = socket2::Socket::from(pg_session(port, "outcome_reset"));
    reset.set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
    drop(reset);
    let closed = expect_endings(
        &keyhole,
        &[
            ("client_closed", "INFO"),
            ("client_vanished", "INFO"),
            ("client_reset", "INFO"),
        ],
    );
    assert!(
        closed[..2].iter().all(|f| !f.contains_key("error")),
        "a close is not an error: {closed:?}"
    );
    assert!(
        field(&closed[2], "error").contains("Connection reset"),
        "a reset says so: {closed:?}"
    );
    for outcome in ["client_closed", "client_vanished", "client_reset"] {
        assert_eq!(closed_count(http, outcome), 1.0, "{outcome}");
    }

    // Whatever the clients did, the next one is served.
    let out = clients::psql(port, TRUST_USER, None, "select 'still serving'");
    assert_eq!(expect_success(&out, "psql").trim(), "still serving");
}

#[test]
fn a_postgres_server_that_ends_the_session_is_upstream_closed() {
    let pg = PgCluster::shared();
    let (keyhole, http) = keyhole_with_metrics(&pg.pki.ca, &pg.keyhole_target());
    let mut session = pg_session(keyhole.port(), "outcome_terminated");

    let terminated = pg.admin_sql(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity \
         where application_name = 'outcome_terminated'",
    );
    assert_eq!(terminated.trim(), "1");
    // The server's own FATAL reaches the client, then the end.
    let (tag, body) = read_message(&mut session);
    assert_eq!(tag, b'E');
    assert_eq!(support::wire::error_field(&body, 'C'), "57P01");
    let mut rest = Vec::new();
    let _ = session.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing after the FATAL: {rest:?}");
    drop(session);

    expect_endings(&keyhole, &[("upstream_closed", "INFO")]);
    assert_eq!(closed_count(http, "upstream_closed"), 1.0);
}

#[test]
fn a_client_over_the_connection_limit_is_a_warning() {
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &["--max-connections", "1"]);
    let mut held = pg_session(keyhole.port(), "outcome_held");

    let mut over = TcpStream::connect(("127.0.0.1", keyhole.port())).expect("connect");
    over.set_read_timeout(Some(PATIENCE)).expect("timeout");
    over.write_all(&startup_packet(3 << 16, &[("user", TRUST_USER)]))
        .expect("startup");
    let (tag, body) = read_message(&mut over);
    assert_eq!(tag, b'E');
    assert_eq!(support::wire::error_field(&body, 'C'), "53300");
    drop(over);

    held.write_all(&[b'X', 0, 0, 0, 4]).expect("Terminate");
    drop(held);
    expect_endings(
        &keyhole,
        &[("too_many_connections", "WARN"), ("client_closed", "INFO")],
    );
}

/// A `mariadb` CLI logged in through `port` as native_user, reading
/// statements from its stdin: it has answered one when this returns.
fn mariadb_session(port: u16) -> Child {
    let mut cmd = mariadb::mariadb_command(Some(NATIVE_PASS));
    cmd.args(mariadb::MARIADB_FLAGS)
        .args(["--unbuffered", "-h", "127.0.0.1", "-P"])
        .arg(port.to_string())
        .args(["-u", NATIVE_USER, "-D", DATABASE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("run mariadb");
    let stdin = child.stdin.as_mut().expect("stdin");
    stdin
        .write_all(b"select 'logged in';\n")
        .expect("a statement");
    stdin.flush().expect("flush");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("the answer");
    assert_eq!(line.trim(), "logged in");
    child
}

/// The case: a MySQL client that closes without COM_QUIT (a killed
/// process) is keyhole passing on a bare FIN, to which the server's TLS
/// library may answer with an alert. The end is the client's, every time.
#[test]
fn a_killed_mysql_client_is_client_vanished_not_an_upstream_error() {
    const KILLED: usize = 8;
    let db = MariaDb::shared();
    let (keyhole, http) = keyhole_with_metrics(&db.pki().ca, &db.keyhole_target());

    for _ in 0..KILLED {
        let mut child = mariadb_session(keyhole.port());
        child.kill().expect("SIGKILL the client");
        let _ = child.wait();
    }
    expect_endings(&keyhole, &[("client_vanished", "INFO"); KILLED]);
    assert_eq!(closed_count(http, "client_vanished"), KILLED as f64);

    // The CLI's own exit sends COM_QUIT: a goodbye.
    let mut child = mariadb_session(keyhole.port());
    drop(child.stdin.take());
    let status = child.wait().expect("mariadb exits");
    assert!(status.success(), "{status:?}");
    let mut want = vec![("client_vanished", "INFO"); KILLED];
    want.push(("client_closed", "INFO"));
    expect_endings(&keyhole, &want);
    assert!(
        !keyhole.logs().contains(" WARN "),
        "no warning for any of it:\n{}",
        keyhole.logs()
    );
}

/// A MySQL session of native_user through keyhole's `port`, logged in by
/// hand (mysql_native_password, plain to keyhole): the socket and the
/// server connection's id from the greeting.
fn mysql_session(port: u16) -> (TcpStream, u32) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to keyhole");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let (_, greeting) = mariadb::read_packet(&mut s);
    let id = mariadb::parse_greeting(&greeting)
        .expect("a greeting")
        .connection_id;
    let auth = keyhole::protocol::mysql::native_password(
        NATIVE_PASS.as_bytes(),
        &mariadb::greeting_scramble(&greeting),
    );
    // LONG_PASSWORD | CONNECT_WITH_DB | PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH
    let mut response = mariadb::response_header(0x1 | 0x8 | 0x200 | 0x8000 | 0x8_0000);
    for part in [
        NATIVE_USER.as_bytes(),
        &[0],
        &[20],
        &auth,
        DATABASE.as_bytes(),
        &[0],
    ] {
        response.extend_from_slice(part);
    }
    response.extend_from_slice(b"mysql_native_password\0");
    s.write_all(&mariadb::packet(1, &response))
        .expect("the login");
    let (_, ok) = mariadb::read_packet(&mut s);
    assert_eq!(ok.first(), Some(&0), "OK: {ok:?}");
    (s, id)
}

/// A client whose statement is killed (`KILL QUERY`) and which then resets
/// its socket: the reset is the client's own doing, not a warning.
#[test]
fn a_mysql_client_that_resets_after_kill_query_is_client_reset() {
    let db = MariaDb::shared();
    let (keyhole, http) = keyhole_with_metrics(&db.pki().ca, &db.keyhole_target());
    let (mut session, id) = mysql_session(keyhole.port());
    let mut query = vec![3u8];
    query.extend_from_slice(b"select sleep(60)");
    session
        .write_all(&mariadb::packet(0, &query))
        .expect("a long statement");
    wait_until(
        "the statement runs",
        PATIENCE,
        || {
            db.admin_sql(&format!(
                "select count(*) from information_schema.processlist where id = {id} and info like 'select sleep%'"
            )) == "1"
        },
        || db.log_tail(20),
    );
    db.admin_sql(&format!("KILL QUERY {id}"));
    // The statement ends early (an interrupted SLEEP answers 1): its
    // result set's first packet, the column count, is the sign.
    let (_, columns) = mariadb::read_packet(&mut session);
    assert_eq!(columns, [1], "a one-column result");
    let reset = socket2::Socket::from(session);
    reset.set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
    drop(reset);

    expect_endings(&keyhole, &[("client_reset", "INFO")]);
    assert_eq!(closed_count(http, "client_reset"), 1.0);
}

/// `KILL CONNECTION` from an administrator ends the session at the
/// server, which MariaDB does without TLS close_notify: nothing on the path
/// can tell that from a cut (a forged FIN), so it is the server's failure
/// and a warning, as any truncation is. The client's query after it fails.
#[test]
fn a_mysql_session_killed_at_the_server_is_an_upstream_warning() {
    use mysql_async::prelude::Queryable;
    let db = MariaDb::shared();
    let (keyhole, http) = keyhole_with_metrics(&db.pki().ca, &db.keyhole_target());
    let rt = support::runtime();
    let mut conn = rt
        .block_on(mysql_async::Conn::new(mariadb::native_driver_opts(
            keyhole.port(),
        )))
        .expect("a session through keyhole");
    let id: u64 = rt
        .block_on(conn.query_first("select connection_id()"))
        .expect("its id")
        .expect("one row");
    db.admin_sql(&format!("KILL CONNECTION {id}"));
    wait_until(
        "the killed session is gone from the server",
        PATIENCE,
        || {
            db.admin_sql(&format!(
                "select count(*) from information_schema.processlist where id = {id}"
            )) == "0"
        },
        || db.log_tail(20),
    );
    let err = rt
        .block_on(conn.query_drop("select 1"))
        .expect_err("the session was killed");
    assert!(
        matches!(
            err,
            mysql_async::Error::Io(_) | mysql_async::Error::Server(_)
        ),
        "{err:?}"
    );
    drop(conn);
    let closed = wait_closed(&keyhole, 1);
    let (outcome, level) = endings(&closed).remove(0);
    assert!(
        ["upstream_truncated", "upstream_io"].contains(&outcome.as_str()) && level == "WARN",
        "{}",
        keyhole.logs()
    );
    assert_eq!(closed_count(http, &outcome), 1.0);
}
