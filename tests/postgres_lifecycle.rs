//! The life of connections through keyhole, as users see it: cancelling a
//! running query (psql's Ctrl-C, tokio-postgres' CancelToken, a guessed key),
//! a client vanishing mid-query, the server restarting under a session,
//! graceful shutdown and its exit codes, configuration errors, and what the
//! logs say (text and JSON, never a password).

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::clients;
use support::keyhole::{listens_tcp, Keyhole, Ready};
use support::logs::{closed_lines, field};
use support::postgres::{
    PgCluster, PgOptions, MD5_PASS, MD5_USER, SCRAM_PASS, SCRAM_USER, TRUST_USER,
};
use support::process::signal_pid;
use support::session::{connect, exit_code, simple_query, wait_until};
use support::wire;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// Generous limit for anything the tests wait for (a log line, a backend to go
/// away, keyhole to exit): long enough for a loaded CI machine, short enough
/// that a hang fails the test instead of the whole run.
const PATIENCE: Duration = Duration::from_secs(20);

/// The CancelRequest code (PostgreSQL protocol: 1234 << 16 | 5678).
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// The SSLRequest packet: length 8, code 1234 << 16 | 5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn ca_arg(pg: &PgCluster) -> String {
    pg.pki
        .ca
        .to_str()
        .expect("the CA path is UTF-8")
        .to_string()
}

/// How many server backends carry `application_name = app` (and, if given,
/// are sleeping in pg_sleep).
fn backends(pg: &PgCluster, app: &str, only_sleeping: bool) -> usize {
    let filter = if only_sleeping {
        " and wait_event = 'PgSleep'"
    } else {
        ""
    };
    pg.admin_sql(&format!(
        "select count(*) from pg_stat_activity where application_name = '{app}'{filter}"
    ))
    .parse()
    .expect("count(*) is a number")
}

/// Waits until the session tagged `app` is inside pg_sleep on the server.
fn wait_sleeping(pg: &PgCluster, app: &str, keyhole: &Keyhole) {
    wait_until(
        &format!("a backend of {app} sleeping in pg_sleep"),
        PATIENCE,
        || backends(pg, app, true) == 1,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
}

/// Waits for a "connection closed" line that `pick` accepts and returns it.
fn wait_closed_line(
    keyhole: &Keyhole,
    what: &str,
    pick: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let mut found = None;
    wait_until(
        &format!("a \"connection closed\" line {what}"),
        PATIENCE,
        || {
            found = closed_lines(&keyhole.logs()).into_iter().find(|f| pick(f));
            found.is_some()
        },
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    found.expect("found above")
}

/// A psql child running `sql` through keyhole as scram_user, tagged `app`.
fn spawn_psql(port: u16, app: &str, sql: &str) -> Child {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={SCRAM_USER} dbname=postgres application_name={app}"
    );
    let mut cmd = clients::command("psql", Some(SCRAM_PASS));
    cmd.args(clients::PSQL_FLAGS)
        .args(["-d", &conninfo, "-c", sql])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"))
}

/// A raw CancelRequest for (pid, secret), optionally preceded by an
/// SSLRequest that keyhole (without --listen-cert) must answer 'N'. Returns
/// what keyhole sent back after the request (the protocol says: nothing).
fn raw_cancel(port: u16, ssl_first: bool, pid: u32, secret: u32) -> Vec<u8> {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).expect("connect to keyhole");
    socket
        .set_read_timeout(Some(PATIENCE))
        .expect("set a read timeout");
    if ssl_first {
        socket.write_all(&SSL_REQUEST).expect("send SSLRequest");
        let mut answer = [0u8; 1];
        socket
            .read_exact(&mut answer)
            .expect("keyhole answers the SSLRequest");
        assert_eq!(
            answer[0], b'N',
            "keyhole without --listen-cert declines TLS"
        );
    }
    let mut packet = Vec::with_capacity(16);
    for word in [16, CANCEL_REQUEST_CODE, pid, secret] {
        packet.extend_from_slice(&word.to_be_bytes());
    }
    socket.write_all(&packet).expect("send CancelRequest");
    let mut reply = Vec::new();
    socket
        .read_to_end(&mut reply)
        .expect("keyhole closes the cancel connection");
    reply
}

// ---------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------

#[test]
fn psql_ctrl_c_cancels_the_running_query() {
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &[]);
    let app = "lifecycle_psql_cancel";
    let mut psql = spawn_psql(keyhole.port(), app, "select pg_sleep(60)");

    let deadline = Instant::now() + PATIENCE;
    while backends(pg, app, true) == 0 {
        if let Some(status) = psql.try_wait().expect("poll psql") {
            panic!(
                "psql ended ({status}) before its query ran; keyhole log:\n{}",
                keyhole.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "psql's query never showed up in pg_stat_activity; keyhole log:\n{}",
            keyhole.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What Ctrl-C in a terminal does: psql sends a CancelRequest to the
    // address it is connected to, keyhole.
    signal_pid(psql.id(), libc::SIGINT);
    let out = support::process::finish_with_timeout(psql, "psql", PATIENCE);

    let stderr = clients::stderr(&out);
    assert!(
        !out.status.success(),
        "psql succeeded although its query was cancelled:\n{stderr}"
    );
    assert!(
        stderr.contains("canceling statement due to user request"),
        "psql's error is not the server's cancel message:\n{stderr}\nkeyhole log:\n{}",
        keyhole.logs()
    );
    let cancel = wait_closed_line(&keyhole, "with outcome=cancel_forwarded", |f| {
        field(f, "outcome") == "cancel_forwarded"
    });
    assert_eq!(field(&cancel, "user"), "-", "a cancel carries no user");
    wait_until(
        "psql's session is gone from the server",
        PATIENCE,
        || backends(pg, app, false) == 0,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
}

#[test]
fn tokio_postgres_cancel_token_cancels_through_keyhole() {
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &[]);
    let app = "lifecycle_token_cancel";
    let rt = support::runtime();
    let (client, _connection) = connect(&rt, keyhole.port(), app);
    let token = client.cancel_token();
    let query = rt.spawn(async move {
        let result = client.simple_query("select pg_sleep(60)").await;
        (result.map(|_| ()), client)
    });
    wait_sleeping(pg, app, &keyhole);

    rt.block_on(token.cancel_query(NoTls))
        .expect("tokio-postgres delivers the cancel request to keyhole");
    let (result, client) = rt
        .block_on(async { tokio::time::timeout(PATIENCE, query).await })
        .expect("the cancelled query returns")
        .expect("the query task does not panic");
    let err = result.expect_err("the query was cancelled");
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "unexpected error: {err:?}"
    );
    wait_closed_line(&keyhole, "with outcome=cancel_forwarded", |f| {
        field(f, "outcome") == "cancel_forwarded"
    });
    // The session itself survives a cancelled statement.
    let rows = simple_query(&rt, &client, "select 'still here'").expect("the session goes on");
    assert_eq!(rows, ["still here"]);
}

#[test]
fn cancel_with_an_unknown_key_goes_nowhere_and_keyhole_keeps_serving() {
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &[]);
    let app = "lifecycle_unknown_cancel";
    let rt = support::runtime();
    let (client, _connection) = connect(&rt, keyhole.port(), app);
    let pid: u32 = simple_query(&rt, &client, "select pg_backend_pid()").expect("backend pid")[0]
        .parse()
        .expect("a pid is a number");

    // The pid of a live session with a guessed secret, bare and after an
    // SSLRequest: neither matches a key keyhole handed out.
    for (ssl_first, secret) in [(false, 0x1234_5678), (true, 0x0bad_cafe)] {
        let reply = raw_cancel(keyhole.port(), ssl_first, pid, secret);
        assert!(
            reply.is_empty(),
            "keyhole answered a CancelRequest with {reply:?}"
        );
    }
    wait_until(
        "two connections closed with outcome=unknown_cancel_key",
        PATIENCE,
        || {
            closed_lines(&keyhole.logs())
                .iter()
                .filter(|f| field(f, "outcome") == "unknown_cancel_key")
                .count()
                == 2
        },
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    let logs = keyhole.logs();
    assert!(
        !closed_lines(&logs)
            .iter()
            .any(|f| field(f, "outcome") == "cancel_forwarded"),
        "a cancel with an unknown key was forwarded:\n{logs}"
    );
    for secret in [0x1234_5678_u32, 0x0bad_cafe] {
        assert!(
            !logs.contains(&secret.to_string()) && !logs.contains(&format!("{secret:x}")),
            "the secret of a cancel key appears in the log:\n{logs}"
        );
    }

    // The session is untouched and new clients still get through.
    let rows = simple_query(&rt, &client, "select 'alive'").expect("the session goes on");
    assert_eq!(rows, ["alive"]);
    let out = clients::psql(keyhole.port(), SCRAM_USER, Some(SCRAM_PASS), "select 7*6");
    assert_eq!(
        clients::expect_success(&out, "psql after the bogus cancels"),
        "42"
    );
}

// ---------------------------------------------------------------------------
// Client and server going away
// ---------------------------------------------------------------------------

#[test]
fn client_vanishing_mid_query_ends_the_server_backend() {
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &[]);
    let app = "lifecycle_client_vanishes";
    let rt = support::runtime();
    let (client, connection) = connect(&rt, keyhole.port(), app);
    let query = rt.spawn(async move {
        let _ = client.simple_query("select pg_sleep(60)").await;
    });
    wait_sleeping(pg, app, &keyhole);

    // The application dies: its socket closes without a Terminate.
    connection.abort();
    query.abort();
    rt.block_on(async {
        let _ = connection.await;
        let _ = query.await;
    });

    // keyhole passes the close on; the server notices within its
    // client_connection_check_interval and ends the backend.
    wait_until(
        "the server backend of the vanished client is gone",
        PATIENCE,
        || backends(pg, app, false) == 0,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    let closed = wait_closed_line(&keyhole, "for the vanished client", |f| {
        field(f, "user") == SCRAM_USER
    });
    assert_eq!(field(&closed, "database"), "postgres");
    // Which comes first: the server's own check, or keyhole's cancel.
    assert!(
        [
            "client_vanished",
            "client_reset",
            "client_io",
            "client_gone_cancelled"
        ]
        .contains(&field(&closed, "outcome")),
        "unexpected outcome for a client that went away: {closed:?}"
    );

    let (client, _connection) = connect(&rt, keyhole.port(), app);
    let rows = simple_query(&rt, &client, "select 'next'").expect("a new session works");
    assert_eq!(rows, ["next"]);
}

/// A raw session as `TRUST_USER`, tagged `app`, ready for a query.
fn raw_session(port: u16, app: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let startup = wire::startup_packet(
        196_608,
        &[
            ("user", TRUST_USER),
            ("database", "postgres"),
            ("application_name", app),
        ],
    );
    stream.write_all(&startup).expect("startup");
    wire::read_until_ready(&mut stream);
    stream
}

/// What RDS and most servers run with: no client_connection_check_interval,
/// so a backend busy in a statement never looks at its socket. When the
/// client vanishes (closed, or reset), keyhole cancels the statement with
/// the session's key, and the backend then sees the client's end.
#[test]
fn a_vanished_clients_statement_is_cancelled_on_a_server_that_would_not_notice() {
    let pg = PgCluster::shared();
    let http = support::free_port().to_string();
    let keyhole = Keyhole::for_cluster(pg, &["--http-port", &http, "--prometheus"]);
    for (app, reset) in [("vanishes_closed", false), ("vanishes_reset", true)] {
        let mut stream = raw_session(keyhole.port(), app);
        stream
            .write_all(&wire::simple_query(
                "set client_connection_check_interval = 0",
            ))
            .expect("set");
        wire::read_until_ready(&mut stream);
        stream
            .write_all(&wire::simple_query("select pg_sleep(600)"))
            .expect("query");
        wait_sleeping(pg, app, &keyhole);
        if reset {
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER 0: close with a reset");
        }
        drop(stream);
        wait_until(
            &format!("the server backend of {app} is gone"),
            PATIENCE,
            || backends(pg, app, false) == 0,
            || format!("keyhole log:\n{}", keyhole.logs()),
        );
        let closed = wait_closed_line(&keyhole, &format!("for {app}"), |f| {
            f.get("outcome")
                .is_some_and(|o| o == "client_gone_cancelled")
                && f.get("user").is_some_and(|u| u == TRUST_USER)
        });
        assert!(
            field(&closed, "error").contains("keyhole cancelled its statement"),
            "{closed:?}"
        );
        keyhole.wait_for_log(
            "outcome=\"client_gone_cancelled\"",
            if reset { 2 } else { 1 },
        );
    }
    let port: u16 = http.parse().expect("port");
    let (_, metrics) = support::http::get(port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("outcome=\"client_gone_cancelled\"} 2"),
        "both cancels are counted:\n{metrics}"
    );
}

/// A client that sends its statements and Terminate, then closes at once,
/// meant them to run: keyhole cancels nothing after a goodbye.
#[test]
fn statements_sent_before_terminate_run_to_their_end() {
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &[]);
    let app = "goodbye_then_close";
    pg.admin_sql("create table if not exists goodbye_marks (app text)");
    pg.admin_sql(&format!("delete from goodbye_marks where app = '{app}'"));
    pg.admin_sql(&format!("grant insert on goodbye_marks to {TRUST_USER}"));
    let mut stream = raw_session(keyhole.port(), app);
    let mut bytes = wire::simple_query(&format!(
        "set client_connection_check_interval = 0; select pg_sleep(3); \
         insert into goodbye_marks values ('{app}')"
    ));
    bytes.extend_from_slice(b"X\0\0\0\x04");
    stream.write_all(&bytes).expect("statements and Terminate");
    wait_sleeping(pg, app, &keyhole);
    drop(stream);
    wait_until(
        "the statement sent before the goodbye has run",
        PATIENCE,
        || {
            pg.admin_sql(&format!(
                "select count(*) from goodbye_marks where app = '{app}'"
            )) == "1"
        },
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    let closed = wait_closed_line(&keyhole, "after the goodbye", |f| {
        f.get("user").is_some_and(|u| u == TRUST_USER)
    });
    assert_ne!(
        field(&closed, "outcome"),
        "client_gone_cancelled",
        "{closed:?}"
    );
}

#[test]
fn server_restart_ends_the_session_but_not_keyhole() {
    let pg = PgCluster::start(PgOptions::default());
    let mut keyhole = Keyhole::for_cluster(&pg, &[]);
    let rt = support::runtime();
    let (client, _connection) = connect(&rt, keyhole.port(), "lifecycle_restart");
    let rows = simple_query(&rt, &client, "select 'before'").expect("query before the restart");
    assert_eq!(rows, ["before"]);

    pg.restart();

    let err = simple_query(&rt, &client, "select 'after'")
        .expect_err("the session did not survive a server restart");
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "expected 57P01 or a closed connection, got: {err:?}"
    );
    let closed = wait_closed_line(&keyhole, "for the session cut by the restart", |f| {
        field(f, "user") == SCRAM_USER
    });
    assert_eq!(field(&closed, "database"), "postgres");
    assert!(
        keyhole.wait_exit(Duration::ZERO).is_none(),
        "keyhole exited when the server restarted:\n{}",
        keyhole.logs()
    );

    let (client, _connection) = connect(&rt, keyhole.port(), "lifecycle_restart");
    let rows = simple_query(&rt, &client, "select 'after'").expect("a new session works");
    assert_eq!(rows, ["after"]);
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

#[test]
fn sigterm_lets_open_sessions_finish_and_exits_0() {
    let pg = PgCluster::shared();
    let mut keyhole = Keyhole::for_cluster(pg, &["--max-sigterm-delay", "30s"]);
    let rt = support::runtime();
    let (client, connection) = connect(&rt, keyhole.port(), "lifecycle_drain");
    assert_eq!(
        simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );

    keyhole.signal(libc::SIGTERM);
    // Watched in /proc: a probe connection could itself be let in before
    // the listener closes.
    wait_until(
        "keyhole closes its listener after SIGTERM",
        PATIENCE,
        || !listens_tcp(keyhole.pid(), keyhole.port()),
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], keyhole.port()));
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
    assert!(
        refused.is_err(),
        "a TCP connection was accepted after SIGTERM"
    );
    let out = clients::psql(keyhole.port(), SCRAM_USER, Some(SCRAM_PASS), "select 1");
    let stderr = clients::stderr(&out);
    assert!(
        !out.status.success() && stderr.contains("Connection refused"),
        "a new client was not refused after SIGTERM:\n{stderr}"
    );

    // The session opened before the signal carries on...
    let rows = simple_query(&rt, &client, "select 'draining'").expect("the old session works");
    assert_eq!(rows, ["draining"]);
    assert!(
        keyhole.wait_exit(Duration::ZERO).is_none(),
        "keyhole exited while a session was still open:\n{}",
        keyhole.logs()
    );
    // ...and when it ends by itself, keyhole exits 0.
    drop(client);
    rt.block_on(connection).expect("the connection task ends");
    let status = keyhole
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("keyhole still runs:\n{}", keyhole.logs()));
    assert_eq!(exit_code(status), Some(0), "log:\n{}", keyhole.logs());
    let closed = closed_lines(&keyhole.logs());
    assert_eq!(closed.len(), 1, "log:\n{}", keyhole.logs());
    assert_eq!(field(&closed[0], "outcome"), "client_closed");
}

/// Opens a session, sends `signals` (waiting for keyhole to take in the
/// first), and checks that the still-open session is cut with `code`.
fn shutdown_cuts_open_session(delay: &str, signals: &[libc::c_int], code: i32) {
    let pg = PgCluster::shared();
    let mut keyhole = Keyhole::for_cluster(pg, &["--max-sigterm-delay", delay]);
    let rt = support::runtime();
    let (client, _connection) = connect(&rt, keyhole.port(), "lifecycle_cut");
    assert_eq!(
        simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );

    for (i, &sig) in signals.iter().enumerate() {
        if i > 0 {
            wait_until(
                "keyhole announces that it waits for open connections",
                PATIENCE,
                || keyhole.logs().contains("waiting for open connections"),
                || format!("keyhole log:\n{}", keyhole.logs()),
            );
        }
        keyhole.signal(sig);
    }
    let status = keyhole
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("keyhole still runs:\n{}", keyhole.logs()));
    let logs = keyhole.logs();
    assert_eq!(exit_code(status), Some(code), "log:\n{logs}");
    let closed = closed_lines(&logs);
    assert_eq!(closed.len(), 1, "log:\n{logs}");
    assert_eq!(field(&closed[0], "outcome"), "cut_at_shutdown", "{logs}");
    assert_eq!(field(&closed[0], "level"), "WARN", "a drain's cut: {logs}");
    assert_eq!(field(&closed[0], "user"), SCRAM_USER);

    let err = simple_query(&rt, &client, "select 1").expect_err("the session was cut");
    assert!(err.is_closed() || err.code().is_none(), "{err:?}");
}

#[test]
fn sigterm_cuts_sessions_still_open_after_the_delay_and_exits_143() {
    shutdown_cuts_open_session("1s", &[libc::SIGTERM], 143);
}

#[test]
fn sigint_cuts_sessions_still_open_after_the_delay_and_exits_130() {
    shutdown_cuts_open_session("1s", &[libc::SIGINT], 130);
}

#[test]
fn second_sigterm_stops_waiting_for_open_sessions() {
    // The delay is far longer than PATIENCE: only the second signal can end it in time.
    shutdown_cuts_open_session("10m", &[libc::SIGTERM, libc::SIGTERM], 143);
}

#[test]
fn sigterm_without_connections_exits_0() {
    let pg = PgCluster::shared();
    let mut keyhole = Keyhole::for_cluster(pg, &["--max-sigterm-delay", "10m"]);
    // The ready line is logged once the signal handlers are in place.
    wait_until(
        "keyhole logs its ready line",
        PATIENCE,
        || keyhole.logs().contains(" ready on "),
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    keyhole.signal(libc::SIGTERM);
    let status = keyhole
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("keyhole still runs:\n{}", keyhole.logs()));
    assert_eq!(exit_code(status), Some(0), "log:\n{}", keyhole.logs());
}

// ---------------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------------

#[test]
fn configuration_errors_exit_2_with_one_line_before_binding() {
    let pg = PgCluster::shared();
    let ca = ca_arg(pg);
    let target = pg.keyhole_target();
    let scratch = support::scratch_dir("keyhole-missing-ca-");
    let missing_ca = scratch.path().join("missing-ca.pem");
    let missing_ca = missing_ca.to_str().expect("UTF-8 path");
    // Plaintext is for a relay on this host only.
    let tls_disable = "postgres://10.1.2.3:5432?tls-mode=disable".to_owned();

    // keyhole's port is held open by the test throughout: had keyhole tried
    // to bind it before validating, it would fail on the bind instead.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let port = held.local_addr().expect("local address").port().to_string();

    let cases: [(&[&str], &str); 7] = [
        (
            &["--max-connections", "lots", "--ca-file", &ca, &target],
            "--max-connections",
        ),
        (
            &["--max-sigterm-delay", "forever", "--ca-file", &ca, &target],
            "--max-sigterm-delay",
        ),
        (&["--ca-file", missing_ca, &target], "missing-ca.pem"),
        (&["--ca-file", &ca, &tls_disable], "tls-mode"),
        (&["--ca-file", &ca], "no target"),
        (&["--ca-file"], "--ca-file"),
        (&["--bogus", "x", &ca, &target], "--bogus"),
    ];
    for (args, mentions) in cases {
        let mut all = vec!["--port", port.as_str()];
        all.extend_from_slice(args);
        let (status, output) = Keyhole::start_expect_exit(&all, PATIENCE);
        assert_eq!(status.code(), Some(2), "{all:?}:\n{output}");
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{all:?} printed more than one line:\n{output}"
        );
        assert!(
            lines[0].starts_with("keyhole: ") && lines[0].contains(mentions),
            "{all:?}: expected one \"keyhole: \" line mentioning {mentions:?}, got:\n{output}"
        );
    }

    // Control: with a valid configuration keyhole does reach the held port
    // and fails there, so the cases above really stopped before binding.
    let (status, output) =
        Keyhole::start_expect_exit(&["--port", &port, "--ca-file", &ca, &target], PATIENCE);
    assert!(!status.success(), "{output}");
    assert_ne!(status.code(), Some(2), "{output}");
    assert!(
        output.contains(&format!("127.0.0.1:{port}")) && output.contains("in use"),
        "expected an address-in-use error:\n{output}"
    );
    drop(held);
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

/// One log line as a JSON object: its top-level members, strings unquoted
/// and other values as written.
fn parse_json_object(line: &str) -> Result<HashMap<String, String>, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let object = value.as_object().ok_or("not an object")?;
    Ok(object
        .iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect())
}

#[test]
fn logs_are_json_on_request_and_never_show_a_password() {
    // Besides the md5 and SCRAM users, a user with plain `password`
    // authentication: the only method where the password itself crosses
    // keyhole, so the only one where keyhole could leak it.
    const CLEAR_USER: &str = "clear_user";
    const CLEAR_PASS: &str = "clear_pass_c0ffee";
    const WRONG_PASS: &str = "wrong_pass_dec0de";
    let pg = PgCluster::start(PgOptions {
        extra_hba: vec![
            format!("hostssl all {CLEAR_USER} 127.0.0.1/32 password"),
            format!("hostssl all {CLEAR_USER} ::1/128 password"),
        ],
        ..PgOptions::default()
    });
    pg.admin_sql(&format!(
        "CREATE ROLE {CLEAR_USER} LOGIN PASSWORD '{CLEAR_PASS}'"
    ));

    let ca = ca_arg(&pg);
    let target = pg.keyhole_target();
    for format in ["text", "json", "cloudwatch"] {
        let port = support::free_port();
        let port_arg = port.to_string();
        // Debug level: a password must not show up at any level.
        let mut keyhole = Keyhole::spawn(
            &[
                "--port",
                &port_arg,
                "--log-format",
                format,
                "--ca-file",
                &ca,
                &target,
            ],
            &[("RUST_LOG", "debug")],
            Ready::Tcp(port),
        );
        for (user, password) in [
            (MD5_USER, MD5_PASS),
            (SCRAM_USER, SCRAM_PASS),
            (CLEAR_USER, CLEAR_PASS),
        ] {
            let out = clients::psql(port, user, Some(password), "select current_user");
            assert_eq!(clients::expect_success(&out, user), user);
        }
        for user in [MD5_USER, SCRAM_USER, CLEAR_USER] {
            let out = clients::psql(port, user, Some(WRONG_PASS), "select 1");
            let stderr = clients::stderr(&out);
            assert!(
                !out.status.success() && stderr.contains("password authentication failed"),
                "{user} with a wrong password:\n{stderr}"
            );
        }
        // Six sessions, three of them refused by the server.
        wait_until(
            &format!("six \"connection closed\" lines ({format})"),
            PATIENCE,
            || keyhole.logs().matches("connection closed").count() == 6,
            || format!("keyhole log:\n{}", keyhole.logs()),
        );
        keyhole.signal(libc::SIGTERM);
        keyhole
            .wait_exit(PATIENCE)
            .expect("keyhole exits on SIGTERM");
        let logs = keyhole.logs();

        for secret in [MD5_PASS, SCRAM_PASS, CLEAR_PASS, WRONG_PASS] {
            assert!(
                !logs.contains(secret),
                "the {format} log contains the password {secret:?}:\n{logs}"
            );
        }

        if format == "text" {
            let closed = closed_lines(&logs);
            assert_eq!(closed.len(), 6, "{logs}");
            let refused = closed
                .iter()
                .filter(|f| field(f, "outcome") == "server_refused")
                .count();
            assert_eq!(refused, 3, "{logs}");
            continue;
        }

        let mut closed = Vec::new();
        for line in logs.lines() {
            let members = parse_json_object(line)
                .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}\nlog:\n{logs}"));
            // Cloud Logging's names, or CloudWatch's (as AWS Lambda's JSON logs).
            let (level, time, levels) = if format == "json" {
                ("severity", "time", ["DEBUG", "INFO", "WARNING", "ERROR"])
            } else {
                ("level", "timestamp", ["DEBUG", "INFO", "WARN", "ERROR"])
            };
            assert!(
                members.contains_key(time)
                    && members
                        .get(level)
                        .is_some_and(|l| levels.contains(&l.as_str())),
                "{format}: {line}"
            );
            assert_eq!(
                line.contains("logging.googleapis.com/labels"),
                format == "json" && members.contains_key("target"),
                "{format}: {line}"
            );
            if members.get("message").map(String::as_str) == Some("connection closed") {
                closed.push(members);
            }
        }
        assert!(
            logs.lines().any(|l| l.contains("\"listen\":\"127.0.0.1:")
                && l.contains("\"protocol\":\"postgres\"")
                && l.contains(" ready on 127.0.0.1:")),
            "{logs}"
        );
        assert_eq!(closed.len(), 6, "{logs}");
        for members in &closed {
            for key in [
                "conn",
                "client",
                "target",
                "user",
                "database",
                "bytes_from_client",
                "bytes_to_client",
                "duration_ms",
                "outcome",
            ] {
                assert!(members.contains_key(key), "no {key} in {members:?}");
            }
            assert_eq!(
                members["target"],
                format!("postgres://127.0.0.1:{}", pg.port)
            );
            assert_eq!(members["database"], "postgres");
            for number in [
                "conn",
                "bytes_from_client",
                "bytes_to_client",
                "duration_ms",
            ] {
                assert!(
                    members[number].parse::<u64>().is_ok(),
                    "{number} is not a JSON number in {members:?}"
                );
            }
            match members["outcome"].as_str() {
                "client_closed" => assert!(
                    members["bytes_to_client"] != "0" && !members.contains_key("error"),
                    "{members:?}"
                ),
                "server_refused" => assert!(members.contains_key("error"), "{members:?}"),
                other => panic!("unexpected outcome {other} in {members:?}"),
            }
        }
        let mut users: Vec<&str> = closed
            .iter()
            .filter(|m| m["outcome"] == "client_closed")
            .map(|m| m["user"].as_str())
            .collect();
        users.sort_unstable();
        assert_eq!(users, [CLEAR_USER, MD5_USER, SCRAM_USER]);
    }
}

/// The names of a process's threads, from /proc.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[test]
fn connections_run_on_the_data_threads_asked_for() {
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &["--data-threads", "3"]);
    let ready = keyhole.wait_for_log("keyhole is ready", 1);
    assert!(ready.contains("data_threads=3"), "{ready}");
    let mut data: Vec<String> = thread_names(keyhole.pid())
        .into_iter()
        .filter(|n| n.starts_with("keyhole-data-"))
        .collect();
    data.sort();
    assert_eq!(
        data,
        ["keyhole-data-0", "keyhole-data-1", "keyhole-data-2"],
        "keyhole's threads: {:?}",
        thread_names(keyhole.pid())
    );
    // Sessions at once, spread over the threads, each answered.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sessions: Vec<_> = (0..6)
        .map(|i| connect(&rt, keyhole.port(), &format!("data_threads_{i}")))
        .collect();
    for (i, (client, _)) in sessions.iter().enumerate() {
        let rows = simple_query(&rt, client, &format!("select {i}")).expect("query");
        assert_eq!(rows, [i.to_string()]);
    }
}

/// Datagrams keyhole sends to a `NOTIFY_SOCKET`, read until `until` is one
/// of them (or the patience runs out); every datagram read is returned.
fn notifications_until(
    socket: &std::os::unix::net::UnixDatagram,
    until: &str,
    patience: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + patience;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = message.lines().any(|l| l == until);
                got.push(message);
                if done {
                    return got;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }
    panic!("no {until} within {patience:?}; got {got:?}")
}

/// systemd's `Type=notify` and `WatchdogSec`, with a socket standing in for
/// systemd (sd_notify(3)'s datagrams): READY=1 only once keyhole serves
/// (after `--run-connection-test` passed, listener bound), the watchdog
/// pinged at half its period, RELOADING=1 then READY=1 around a SIGHUP
/// reload, STOPPING=1 when the drain starts.
#[test]
fn systemd_is_told_ready_reloading_stopping_and_fed_its_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let pg = PgCluster::shared();
    let scratch = support::scratch_dir("notify");
    let path = scratch.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let port = support::free_port();
    let port_text = port.to_string();
    let target = pg.keyhole_target();
    let ca = pg.pki.ca.to_str().expect("UTF-8").to_owned();
    let args = [
        "--port",
        &port_text,
        "--ca-file",
        &ca,
        "--run-connection-test",
        &target,
    ];
    let env = [
        ("NOTIFY_SOCKET", path.to_str().expect("UTF-8")),
        ("WATCHDOG_USEC", "400000"),
    ];
    let mut keyhole = Keyhole::spawn(&args, &env, Ready::Nothing);
    let got = notifications_until(&socket, "READY=1", PATIENCE);
    // The ready line, and so the bound listener, came first.
    assert!(keyhole.logs().contains(" ready on "), "{}", keyhole.logs());
    assert!(listens_tcp(keyhole.pid(), port), "READY=1 before listening");
    let ready = got.last().expect("READY=1");
    assert!(ready.contains("STATUS=serving 1 target(s)"), "{ready}");
    assert!(
        got.iter().all(|m| m == "WATCHDOG=1" || m == ready),
        "only pings before READY=1: {got:?}"
    );
    // Pinged at half of 400 ms: several within a second and a half.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        pings += notifications_until(&socket, "WATCHDOG=1", PATIENCE)
            .iter()
            .filter(|m| *m == "WATCHDOG=1")
            .count();
    }
    assert!(
        pings >= 4,
        "{pings} watchdog pings in 1.5 s at a 400 ms WatchdogSec"
    );

    keyhole.signal(libc::SIGHUP);
    let got = notifications_until(&socket, "READY=1", PATIENCE);
    let reloading = got
        .iter()
        .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {got:?}"));
    assert!(reloading < got.len() - 1, "{got:?}");
    // The ready line names the data path, once; a reload does not repeat it.
    let logs = keyhole.logs();
    let path = if cfg!(linux_native) {
        "data_path=splice+ktls"
    } else {
        "data_path=portable"
    };
    assert_eq!(logs.matches("data_path=").count(), 1, "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("keyhole is ready") && l.contains(path)),
        "{logs}"
    );

    keyhole.signal(libc::SIGTERM);
    let got = notifications_until(&socket, "STOPPING=1", PATIENCE);
    let stopping = got.last().expect("STOPPING=1");
    assert!(stopping.contains("STATUS=draining (SIGTERM)"), "{stopping}");
    let status = keyhole
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("keyhole still runs:\n{}", keyhole.logs()));
    assert_eq!(status.code(), Some(0), "{}", keyhole.logs());
}

/// A connection test that fails never tells systemd READY=1: the unit
/// fails to start, with keyhole's reason in its log.
#[test]
fn systemd_is_not_told_ready_when_the_connection_test_fails() {
    use std::os::unix::net::UnixDatagram;
    let scratch = support::scratch_dir("notify-fail");
    let path = scratch.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_nonblocking(true).expect("nonblocking");
    let closed = support::free_port();
    let target = format!("postgres://127.0.0.1:{closed}?tls-mode=disable");
    let mut keyhole = Keyhole::spawn(
        &["--port", "0", "--run-connection-test", &target],
        &[("NOTIFY_SOCKET", path.to_str().expect("UTF-8"))],
        Ready::Nothing,
    );
    let status = keyhole
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("keyhole still runs:\n{}", keyhole.logs()));
    assert_ne!(status.code(), Some(0), "{}", keyhole.logs());
    assert!(
        keyhole.logs().contains("connection test"),
        "{}",
        keyhole.logs()
    );
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        !got.iter().any(|m| m.contains("READY=1")),
        "told ready: {got:?}"
    );
}
