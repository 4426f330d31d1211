//! keyhole as a sidecar, with real processes and signals: the health
//! endpoints (`/startup`, `/liveness`, `/readiness`) through start, the
//! connection limit and the drain; the connection test; the shutdown
//! sequence (min then max SIGTERM delay, `--exit-zero-on-sigterm`,
//! `/quitquitquit` on a loopback-only admin port); the `wait`, `shutdown`
//! and `check-config` commands; `--skip-failed-targets`; and, in the last
//! section, the Prometheus metrics.
//!
//! What postgres_lifecycle.rs covers already (a session finishing within
//! `--max-sigterm-delay`, a cut session's 143/130, a second signal, exit 0
//! without sessions, exit 2 on configuration errors) is not repeated here.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::certs::TestPki;
use support::http;
use support::keyhole::{listens_tcp, Keyhole, Ready};
use support::logs::{closed_lines, field};
use support::mariadb::{self, MariaDb, NATIVE_PASS, NATIVE_USER};
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER};
use support::process::{clean_env, output_with_timeout};
use support::session::{connect, exit_code, simple_query, wait_until};
use support::{clients, free_port};
use tokio::runtime::Runtime;
use tokio_postgres::Client;

/// Generous limit for anything a test waits for (an HTTP answer to change, a
/// log line, keyhole to exit): long enough for a loaded CI machine, short
/// enough that a hang fails the test instead of the whole run.
const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn path_arg(path: &std::path::Path) -> String {
    path.to_str().expect("the path is UTF-8").to_owned()
}

fn ca_arg(pg: &PgCluster) -> String {
    path_arg(&pg.pki.ca)
}

/// Calls `probe` until `done` accepts its answer and returns that answer;
/// panics with `what`, the last answer and `context()` after `limit`.
fn poll<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let answer = probe();
        if done(&answer) {
            return answer;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: still not the case after {limit:?}\nlast: {answer:#?}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` with the body's trailing newline removed.
fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    http::get(port, path).map(|(status, body)| (status, body.trim_end().to_owned()))
}

/// Polls `GET path` until it answers `status` with the one-line `body`;
/// panics with the last answer and keyhole's log otherwise.
fn wait_http(keyhole: &Keyhole, port: u16, path: &str, status: u16, body: &str) {
    let want = Ok((status, body.to_owned()));
    let _ = poll(
        &format!("GET {path} answers {status} {body:?}"),
        PATIENCE,
        || get(port, path),
        |answer| *answer == want,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
}

fn assert_http(keyhole: &Keyhole, port: u16, path: &str, status: u16, body: &str) {
    let got = get(port, path);
    assert_eq!(
        got,
        Ok((status, body.to_owned())),
        "GET {path}; keyhole log:\n{}",
        keyhole.logs()
    );
}

/// keyhole in front of the shared cluster with the HTTP server on a port of
/// its own: returns keyhole and that port.
fn with_http(pg: &PgCluster, extra: &[&str]) -> (Keyhole, u16) {
    let http_port = free_port();
    let port_arg = http_port.to_string();
    let mut args = vec!["--http-port", port_arg.as_str()];
    args.extend_from_slice(extra);
    (Keyhole::for_cluster(pg, &args), http_port)
}

/// The keyhole binary with a clean environment (no `PG*`, no `KEYHOLE_*`)
/// plus `env`.
fn keyhole_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyhole"));
    clean_env(&mut cmd);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KEYHOLE_") {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd
}

/// Runs a keyhole command (`wait`, `shutdown`, `check-config`) to the end.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    output_with_timeout(&mut keyhole_command(args, env), Duration::from_secs(60))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    support::process::describe_output(out)
}

/// Asserts one line on stderr, starting with `prefix` and mentioning each of
/// `mentions`, and nothing on stdout.
fn assert_one_error_line(out: &Output, prefix: &str, mentions: &[&str]) {
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr:\n{}",
        describe(out)
    );
    assert!(
        lines[0].starts_with(prefix),
        "expected a line starting with {prefix:?}:\n{}",
        describe(out)
    );
    for m in mentions {
        assert!(
            lines[0].contains(m),
            "{m:?} not mentioned:\n{}",
            describe(out)
        );
    }
    assert!(
        out.stdout.is_empty(),
        "unexpected stdout:\n{}",
        describe(out)
    );
}

/// Waits for keyhole to exit and returns its exit code.
fn exit_of(keyhole: &mut Keyhole) -> i32 {
    let status = keyhole
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("keyhole still runs:\n{}", keyhole.logs()));
    exit_code(status).expect("an exit code")
}

/// Ends a tokio-postgres session and waits until its connection is gone.
fn close(rt: &Runtime, client: Client, connection: tokio::task::JoinHandle<()>) {
    drop(client);
    rt.block_on(async { tokio::time::timeout(PATIENCE, connection).await })
        .expect("the connection task ends")
        .expect("the connection task does not panic");
}

/// psql through keyhole as scram_user; its trimmed stdout, or panics.
fn psql_ok(port: u16, sql: &str, what: &str) -> String {
    let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), sql);
    clients::expect_success(&out, what)
}

/// Where `needle` first occurs in `logs`; panics with the log if nowhere.
fn position(logs: &str, needle: &str) -> usize {
    logs.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in the log:\n{logs}"))
}

/// A TCP listener that accepts connections and never says a word: a
/// database that does not answer. Counts what it accepted.
struct Mute {
    listener: Arc<TcpListener>,
    accepted: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Mute {
    fn bind() -> Mute {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a mute listener");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let mute = Mute {
            listener: Arc::new(listener),
            accepted: Arc::default(),
            stop: Arc::default(),
        };
        let (listener, accepted, stop) = (
            mute.listener.clone(),
            mute.accepted.clone(),
            mute.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                Mute::drain(&listener, &accepted);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        mute
    }

    fn drain(listener: &TcpListener, accepted: &Mutex<Vec<TcpStream>>) {
        let mut held = accepted.lock().unwrap_or_else(|p| p.into_inner());
        while let Ok((stream, _)) = listener.accept() {
            held.push(stream);
        }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().expect("local address").port()
    }

    /// Connections accepted so far, the kernel's backlog included.
    fn accepted(&self) -> usize {
        Mute::drain(&self.listener, &self.accepted);
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for Mute {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The machine's address on its default route, if it has one that is not
/// loopback (a UDP "connect" sends nothing; it only picks the route).
fn non_loopback_ip() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// The local addresses (as /proc/net/tcp{,6} writes them) of every
/// listening socket on `port` in `pid`'s network namespace.
fn listen_addresses(pid: u32, port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((addr, hex_port)) = local.rsplit_once(':') else {
                continue;
            };
            if u16::from_str_radix(hex_port, 16).ok() == Some(port) && *state == "0A" {
                found.push(format!("{table}:{addr}"));
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------
// 1. The endpoints of a started keyhole
// ---------------------------------------------------------------------------

#[test]
fn health_endpoints_answer_ok_and_anything_else_404_or_405() {
    let pg = PgCluster::shared();
    let (keyhole, http_port) = with_http(pg, &["--health-check"]);
    wait_http(&keyhole, http_port, "/startup", 200, "ok");
    for path in ["/startup", "/liveness", "/readiness"] {
        let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        let reply = http::request(addr, "GET", path).expect("an answer");
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "ok\n"),
            "GET {path}: one short line; log:\n{}",
            keyhole.logs()
        );
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "GET {path}: {reply:?}"
        );
    }
    // /metrics needs --prometheus.
    assert_http(&keyhole, http_port, "/metrics", 404, "not found");
    assert_http(&keyhole, http_port, "/nope", 404, "not found");
    assert_http(&keyhole, http_port, "/", 404, "not found");
    let (status, body) = http::post(http_port, "/startup").expect("an answer to POST");
    assert_eq!(status, 405, "POST /startup: {body}");
    assert!(body.contains("GET"), "405 names the method to use: {body}");
    let (status, _) = http::post(http_port, "/nope").expect("an answer to POST");
    assert_eq!(status, 404, "an unknown path is 404 whatever the method");

    // The proxy itself is unaffected.
    assert_eq!(psql_ok(keyhole.port(), "select 1", "psql"), "1");
}

#[test]
fn no_http_server_without_health_check_or_prometheus() {
    let pg = PgCluster::shared();
    // Explicitly off (the `=false` form) and not given at all.
    for extra in [&["--health-check=false"][..], &[][..]] {
        let (keyhole, http_port) = with_http(pg, extra);
        // Endpoints bind before any listener: by now they would be up.
        assert!(
            !listens_tcp(keyhole.pid(), http_port),
            "{extra:?}: keyhole listens on the HTTP port:\n{}",
            keyhole.logs()
        );
        let err = get(http_port, "/startup").expect_err("nothing listens");
        assert!(err.contains("nothing answers HTTP"), "{err}");
        assert!(
            !keyhole.logs().contains("HTTP endpoints listening"),
            "{}",
            keyhole.logs()
        );
        // And the port is free to take.
        TcpListener::bind(("127.0.0.1", http_port)).expect("the HTTP port is free");
    }
}

#[test]
fn prometheus_alone_serves_metrics_but_no_health_endpoints() {
    let pg = PgCluster::shared();
    let (keyhole, http_port) = with_http(pg, &["--prometheus"]);
    let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    let reply = poll(
        "GET /metrics answers 200",
        PATIENCE,
        || http::request(addr, "GET", "/metrics"),
        |answer| answer.as_ref().is_ok_and(|r| r.status == 200),
        || format!("log:\n{}", keyhole.logs()),
    )
    .expect("an answer");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{reply:?}"
    );
    for path in ["/startup", "/liveness", "/readiness"] {
        assert_http(&keyhole, http_port, path, 404, "not found");
    }
    let (status, _) = http::post(http_port, "/metrics").expect("an answer");
    assert_eq!(status, 405);
}

// ---------------------------------------------------------------------------
// 2. Start: the connection test
// ---------------------------------------------------------------------------

#[test]
fn startup_is_503_while_the_connection_test_waits_then_keyhole_exits_1() {
    let pg = PgCluster::shared();
    let mute = Mute::bind();
    let target = format!("postgres://127.0.0.1:{}?server-name=localhost", mute.port());
    let (listen, http_port) = (free_port(), free_port());
    let (listen_arg, http_arg, ca) = (listen.to_string(), http_port.to_string(), ca_arg(pg));
    let mut keyhole = Keyhole::spawn(
        &[
            "--port",
            &listen_arg,
            "--health-check",
            "--http-port",
            &http_arg,
            "--run-connection-test",
            "--connect-timeout",
            "5s",
            "--ca-file",
            &ca,
            &target,
        ],
        &[],
        Ready::Nothing,
    );

    // The HTTP server comes up first and says "starting" while the test
    // waits for an answer that never comes.
    let first = poll(
        "the HTTP server answers /startup",
        PATIENCE,
        || get(http_port, "/startup"),
        Result::is_ok,
        || format!("log:\n{}", keyhole.logs()),
    );
    assert_eq!(
        first,
        Ok((503, "starting".to_owned())),
        "log:\n{}",
        keyhole.logs()
    );
    assert_http(&keyhole, http_port, "/readiness", 503, "starting");
    assert_http(&keyhole, http_port, "/liveness", 200, "ok");
    wait_until(
        "the connection test dials the target",
        PATIENCE,
        || mute.accepted() >= 1,
        || keyhole.logs(),
    );
    assert!(
        !listens_tcp(keyhole.pid(), listen),
        "the listener is bound before the connection test passed:\n{}",
        keyhole.logs()
    );
    // `keyhole wait` gives up and says what it saw.
    let out = run(&["wait", "--max", "1s", "--http-port", &http_arg], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_one_error_line(
        &out,
        "keyhole wait: ",
        &["has not started after 1s", "503 starting"],
    );

    // Then the test fails: exit 1 with the target and why.
    assert_eq!(exit_of(&mut keyhole), 1, "log:\n{}", keyhole.logs());
    let logs = keyhole.logs();
    let name = format!("postgres://127.0.0.1:{}", mute.port());
    let line = logs
        .lines()
        .find(|l| l.contains("connection test failed for"))
        .unwrap_or_else(|| panic!("no final error line:\n{logs}"));
    assert!(
        line.contains(&name) && line.contains("timed out after 5s"),
        "the message names the target and the reason: {line}\nlog:\n{logs}"
    );
    assert!(!logs.contains("keyhole is ready"), "{logs}");
}

#[test]
fn connection_test_against_a_good_target_passes_and_startup_turns_200() {
    let pg = PgCluster::shared();
    let (keyhole, http_port) = with_http(pg, &["--run-connection-test", "--health-check"]);
    wait_http(&keyhole, http_port, "/startup", 200, "ok");
    wait_http(&keyhole, http_port, "/readiness", 200, "ok");
    let logs = keyhole.logs();
    let passed = logs
        .lines()
        .find(|l| l.contains("connection test passed"))
        .unwrap_or_else(|| panic!("no \"connection test passed\" line:\n{logs}"));
    assert!(
        passed.contains(&format!("postgres://127.0.0.1:{}", pg.port)),
        "{passed}"
    );
    assert!(
        position(&logs, "connection test passed") < position(&logs, "keyhole is ready"),
        "{logs}"
    );
    assert_eq!(psql_ok(keyhole.port(), "select 'tested'", "psql"), "tested");
}

/// Runs keyhole with `--run-connection-test` against `target` and the CA of
/// a PKI that did not sign the server; expects exit 1 and returns the output.
fn connection_test_with_another_ca(target: &str) -> String {
    let other = TestPki::generate(&["localhost"]);
    let (port, other_ca) = (free_port().to_string(), path_arg(&other.ca));
    let (status, output) = Keyhole::start_expect_exit(
        &[
            "--port",
            &port,
            "--run-connection-test",
            "--ca-file",
            &other_ca,
            target,
        ],
        PATIENCE,
    );
    assert_eq!(exit_code(status), Some(1), "{output}");
    output
}

#[test]
fn connection_test_with_the_wrong_ca_exits_1_with_the_tls_reason() {
    let pg = PgCluster::shared();
    let output = connection_test_with_another_ca(&pg.keyhole_target());
    let line = output
        .lines()
        .find(|l| l.contains("connection test failed for"))
        .unwrap_or_else(|| panic!("no final error line:\n{output}"));
    assert!(
        line.contains(&format!("postgres://127.0.0.1:{}", pg.port))
            && line.contains("not signed by a trusted CA"),
        "{line}\n{output}"
    );
}

#[test]
fn connection_test_for_mysql_targets() {
    let db = MariaDb::shared();
    let ca = path_arg(&db.pki().ca);
    let target = db.keyhole_target();

    // A good server: the test reads the greeting, upgrades to TLS, passes.
    let http_port = free_port();
    let http_arg = http_port.to_string();
    let keyhole = Keyhole::start(&[
        "--run-connection-test",
        "--health-check",
        "--http-port",
        &http_arg,
        "--ca-file",
        &ca,
        &target,
    ]);
    wait_http(&keyhole, http_port, "/startup", 200, "ok");
    assert!(
        keyhole.logs().contains("connection test passed"),
        "{}",
        keyhole.logs()
    );
    let out = mariadb::mariadb(keyhole.port(), NATIVE_USER, Some(NATIVE_PASS), "select 6*7");
    assert_eq!(clients::expect_success(&out, "mariadb"), "42");
    drop(keyhole);

    // The wrong CA.
    let output = connection_test_with_another_ca(&target);
    assert!(
        output.contains("connection test failed for")
            && output.contains(&format!("mysql://127.0.0.1:{}", db.port()))
            && output.contains("not signed by a trusted CA"),
        "{output}"
    );

    // A server that never greets: MySQL servers speak first.
    let mute = Mute::bind();
    let silent = format!("mysql://127.0.0.1:{}?server-name=localhost", mute.port());
    let port = free_port().to_string();
    let (status, output) = Keyhole::start_expect_exit(
        &[
            "--port",
            &port,
            "--run-connection-test",
            "--connect-timeout",
            "2s",
            "--ca-file",
            &ca,
            &silent,
        ],
        PATIENCE,
    );
    assert_eq!(exit_code(status), Some(1), "{output}");
    assert!(
        output.contains(&format!("mysql://127.0.0.1:{}", mute.port()))
            && output.contains("sent no greeting within 2s"),
        "{output}"
    );
}

// ---------------------------------------------------------------------------
// 3. Readiness at the connection limit
// ---------------------------------------------------------------------------

#[test]
fn readiness_fails_at_the_connection_limit_and_recovers() {
    let pg = PgCluster::shared();
    let (keyhole, http_port) = with_http(pg, &["--health-check", "--max-connections", "1"]);
    wait_http(&keyhole, http_port, "/readiness", 200, "ok");

    let rt = support::runtime();
    let (client, connection) = connect(&rt, keyhole.port(), "sidecar_limit");
    assert_eq!(
        simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );
    wait_http(
        &keyhole,
        http_port,
        "/readiness",
        503,
        "at the connection limit (1 of 1)",
    );
    // Not ready is not dead, and start is done.
    assert_http(&keyhole, http_port, "/liveness", 200, "ok");
    assert_http(&keyhole, http_port, "/startup", 200, "ok");

    close(&rt, client, connection);
    wait_http(&keyhole, http_port, "/readiness", 200, "ok");
    assert_eq!(psql_ok(keyhole.port(), "select 'again'", "psql"), "again");
}

// ---------------------------------------------------------------------------
// 4. Readiness during the drain
// ---------------------------------------------------------------------------

#[test]
fn sigterm_drains_readiness_but_accepts_during_the_min_delay_then_refuses() {
    let pg = PgCluster::shared();
    // Long enough for the checks below on a loaded machine; nothing waits
    // for it to pass but keyhole itself.
    let (mut keyhole, http_port) = with_http(pg, &["--health-check", "--min-sigterm-delay", "8s"]);
    wait_http(&keyhole, http_port, "/readiness", 200, "ok");

    keyhole.signal(libc::SIGTERM);
    wait_http(&keyhole, http_port, "/readiness", 503, "draining");
    assert_http(&keyhole, http_port, "/liveness", 200, "ok");
    assert_http(&keyhole, http_port, "/startup", 200, "ok");
    // A new client during the min delay still gets through.
    assert_eq!(
        psql_ok(
            keyhole.port(),
            "select 'during the delay'",
            "psql during the min delay"
        ),
        "during the delay"
    );
    let rt = support::runtime();
    let (client, connection) = connect(&rt, keyhole.port(), "sidecar_min_delay");
    assert_eq!(
        simple_query(&rt, &client, "select 2").expect("query"),
        ["2"]
    );
    close(&rt, client, connection);

    // After it, the listener closes and new clients are refused.
    wait_until(
        "keyhole closes its listener after the min delay",
        PATIENCE,
        || !listens_tcp(keyhole.pid(), keyhole.port()),
        || keyhole.logs(),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], keyhole.port()));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_err(),
        "a TCP connection was accepted after the min delay"
    );
    // No session open: exit 0.
    assert_eq!(exit_of(&mut keyhole), 0, "log:\n{}", keyhole.logs());
    let logs = keyhole.logs();
    assert!(
        logs.contains("still accepting new connections for a while"),
        "{logs}"
    );
    let closed = closed_lines(&logs);
    assert_eq!(closed.len(), 2, "{logs}");
    assert!(
        closed
            .iter()
            .all(|f| field(f, "outcome") == "client_closed"),
        "{logs}"
    );
}

// ---------------------------------------------------------------------------
// 5. SIGTERM: min then max delay, --exit-zero-on-sigterm
// ---------------------------------------------------------------------------

#[test]
fn min_then_max_delay_in_sequence_and_a_session_ending_in_the_max_delay_exits_0() {
    let pg = PgCluster::shared();
    let (mut keyhole, http_port) = with_http(
        pg,
        &[
            "--health-check",
            "--min-sigterm-delay",
            "2s",
            "--max-sigterm-delay",
            "60s",
        ],
    );
    let rt = support::runtime();
    let (client, connection) = connect(&rt, keyhole.port(), "sidecar_min_max");
    assert_eq!(
        simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );

    keyhole.signal(libc::SIGTERM);
    wait_http(&keyhole, http_port, "/readiness", 503, "draining");
    // The min delay ends, the max delay begins: the listener is closed...
    keyhole.wait_for_log("waiting for open connections to finish", 1);
    wait_until(
        "keyhole closes its listener after the min delay",
        PATIENCE,
        || !listens_tcp(keyhole.pid(), keyhole.port()),
        || keyhole.logs(),
    );
    // ...the open session goes on...
    assert_eq!(
        simple_query(&rt, &client, "select 'in the max delay'").expect("the session goes on"),
        ["in the max delay"]
    );
    assert_http(&keyhole, http_port, "/readiness", 503, "draining");
    assert!(
        keyhole.wait_exit(Duration::ZERO).is_none(),
        "keyhole exited with a session open:\n{}",
        keyhole.logs()
    );
    // ...and when it ends by itself, keyhole exits 0.
    close(&rt, client, connection);
    assert_eq!(exit_of(&mut keyhole), 0, "log:\n{}", keyhole.logs());
    let logs = keyhole.logs();
    assert!(
        position(&logs, "still accepting new connections for a while")
            < position(&logs, "waiting for open connections to finish"),
        "{logs}"
    );
    assert!(logs.contains("all connections ended"), "{logs}");
    let closed = closed_lines(&logs);
    assert_eq!(closed.len(), 1, "{logs}");
    assert_eq!(field(&closed[0], "outcome"), "client_closed", "{logs}");
}

#[test]
fn exit_zero_on_sigterm_turns_a_cut_session_into_exit_0() {
    let pg = PgCluster::shared();
    let mut keyhole = Keyhole::for_cluster(
        pg,
        &[
            "--min-sigterm-delay",
            "1s",
            "--max-sigterm-delay",
            "1s",
            "--exit-zero-on-sigterm",
        ],
    );
    let rt = support::runtime();
    let (client, _connection) = connect(&rt, keyhole.port(), "sidecar_exit_zero");
    assert_eq!(
        simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );

    keyhole.signal(libc::SIGTERM);
    // Without --exit-zero-on-sigterm this is 143 (postgres_lifecycle.rs).
    assert_eq!(exit_of(&mut keyhole), 0, "log:\n{}", keyhole.logs());
    let logs = keyhole.logs();
    let still = position(&logs, "still accepting new connections for a while");
    let waiting = position(&logs, "waiting for open connections to finish");
    let cutting = position(&logs, "cutting the connections still open");
    assert!(still < waiting && waiting < cutting, "{logs}");
    let closed = closed_lines(&logs);
    assert_eq!(closed.len(), 1, "{logs}");
    assert_eq!(field(&closed[0], "outcome"), "cut_at_shutdown", "{logs}");
    assert_eq!(field(&closed[0], "user"), SCRAM_USER, "{logs}");
    let err = simple_query(&rt, &client, "select 1").expect_err("the session was cut");
    assert!(err.is_closed() || err.code().is_none(), "{err:?}");
}

// ---------------------------------------------------------------------------
// 6. quitquitquit
// ---------------------------------------------------------------------------

#[test]
fn quitquitquit_on_a_loopback_admin_port_exits_0_even_after_cutting() {
    let pg = PgCluster::shared();
    let admin = free_port();
    let admin_arg = admin.to_string();
    // The health server on every address: the control that proves a
    // connection through another local address reaches a socket that
    // listens there.
    let (mut keyhole, http_port) = with_http(
        pg,
        &[
            "--health-check",
            "--http-address",
            "0.0.0.0",
            "--quitquitquit",
            "--admin-port",
            &admin_arg,
            "--max-sigterm-delay",
            "1s",
        ],
    );
    wait_http(&keyhole, http_port, "/startup", 200, "ok");
    assert!(
        listens_tcp(keyhole.pid(), admin),
        "no admin port:\n{}",
        keyhole.logs()
    );

    // The admin port is bound to 127.0.0.1 and nothing else.
    assert_eq!(
        listen_addresses(keyhole.pid(), admin),
        ["tcp:0100007F"],
        "the admin socket's bind address (hex, as /proc/net/tcp writes 127.0.0.1)"
    );
    let mut others = vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))];
    others.extend(non_loopback_ip());
    for ip in others {
        assert!(
            http::accepts(SocketAddr::new(ip, http_port)),
            "control: the health server on 0.0.0.0 is not reachable via {ip}"
        );
        assert!(
            !http::accepts(SocketAddr::new(ip, admin)),
            "the admin port accepts connections via {ip}"
        );
    }

    // Only POST stops keyhole.
    let (status, body) = http::get(admin, "/quitquitquit").expect("an answer");
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("POST"), "{body}");
    assert_eq!(http::get(admin, "/").expect("an answer").0, 404);
    assert!(
        keyhole.wait_exit(Duration::ZERO).is_none(),
        "{}",
        keyhole.logs()
    );
    assert_http(&keyhole, http_port, "/readiness", 200, "ok");

    let rt = support::runtime();
    let (client, _connection) = connect(&rt, keyhole.port(), "sidecar_quit");
    assert_eq!(
        simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );

    let out = run(&["shutdown", "--admin-port", &admin_arg], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(out.stderr.is_empty(), "{}", describe(&out));

    // The session outlives the 1 s max delay and is cut; still exit 0.
    assert_eq!(exit_of(&mut keyhole), 0, "log:\n{}", keyhole.logs());
    let logs = keyhole.logs();
    assert!(logs.contains("quitquitquit received"), "{logs}");
    assert!(
        logs.contains("cutting the connections still open"),
        "{logs}"
    );
    let closed = closed_lines(&logs);
    assert_eq!(closed.len(), 1, "{logs}");
    assert_eq!(field(&closed[0], "outcome"), "cut_at_shutdown", "{logs}");
}

// ---------------------------------------------------------------------------
// 7. keyhole wait
// ---------------------------------------------------------------------------

#[test]
fn wait_without_a_keyhole_gives_up_with_exit_1() {
    let port = free_port().to_string();
    let out = run(&["wait", "--max", "1s", "--http-port", &port], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_one_error_line(
        &out,
        "keyhole wait: ",
        &["has not started after 1s", "last: "],
    );
}

#[test]
fn wait_returns_0_once_keyhole_has_started_and_reads_the_environment() {
    let pg = PgCluster::shared();
    let http_port = free_port();
    let http_arg = http_port.to_string();
    // Started before keyhole: it polls until /startup answers 200.
    let early = keyhole_command(&["wait", "--max", "60s", "--http-port", &http_arg], &[])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keyhole wait");
    let keyhole = Keyhole::for_cluster(pg, &["--health-check", "--http-port", &http_arg]);
    let out = support::process::finish_with_timeout(early, "keyhole wait", Duration::from_secs(90));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nkeyhole log:\n{}",
        describe(&out),
        keyhole.logs()
    );
    assert!(out.stderr.is_empty(), "{}", describe(&out));

    let out = run(&["wait", "--max", "20s", "--http-port", &http_arg], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // No flag: KEYHOLE_HTTP_PORT, as keyhole itself reads it.
    let out = run(
        &["wait", "--max", "20s"],
        &[("KEYHOLE_HTTP_PORT", &http_arg)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // An unspecified http-address is polled on loopback.
    let out = run(
        &["wait", "--max", "20s"],
        &[
            ("KEYHOLE_HTTP_PORT", &http_arg),
            ("KEYHOLE_HTTP_ADDRESS", "0.0.0.0"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn wait_with_bad_usage_exits_2() {
    let out = run(&["wait", "--max", "nonsense"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_one_error_line(&out, "keyhole wait: ", &["--max", "nonsense"]);

    let out = run(&["wait", "--http-port", "99999"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_one_error_line(&out, "keyhole wait: ", &["99999", "--http-port"]);

    let out = run(&["wait", "--bogus"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(text(&out.stderr).contains("--bogus"), "{}", describe(&out));
}

// ---------------------------------------------------------------------------
// 8. keyhole shutdown
// ---------------------------------------------------------------------------

#[test]
fn shutdown_with_nothing_listening_exits_1_and_names_quitquitquit() {
    let port = free_port().to_string();
    let out = run(&["shutdown", "--admin-port", &port], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_one_error_line(&out, "keyhole shutdown: ", &["--quitquitquit", &port]);

    let out = run(&["shutdown", "--admin-port", "nope"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_one_error_line(&out, "keyhole shutdown: ", &["nope", "--admin-port"]);
}

#[test]
fn shutdown_reads_the_admin_port_from_the_environment() {
    let pg = PgCluster::shared();
    let admin = free_port().to_string();
    let mut keyhole = Keyhole::for_cluster(pg, &["--quitquitquit", "--admin-port", &admin]);
    wait_until(
        "the admin port listens",
        PATIENCE,
        || listens_tcp(keyhole.pid(), admin.parse().expect("a port")),
        || keyhole.logs(),
    );
    let out = run(&["shutdown"], &[("KEYHOLE_ADMIN_PORT", &admin)]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(exit_of(&mut keyhole), 0, "log:\n{}", keyhole.logs());
    assert!(
        keyhole.logs().contains("quitquitquit received"),
        "{}",
        keyhole.logs()
    );
}

// ---------------------------------------------------------------------------
// 9. --skip-failed-targets
// ---------------------------------------------------------------------------

/// The shared cluster's target, listening on 127.0.0.1:`port`.
fn good_target(pg: &PgCluster, port: u16) -> String {
    format!("{}&listen=127.0.0.1:{port}", pg.keyhole_target())
}

#[test]
fn skip_failed_targets_skips_a_target_with_a_missing_ca_file() {
    let pg = PgCluster::shared();
    let scratch = support::scratch_dir("keyhole-skip-");
    let missing = path_arg(&scratch.path().join("missing-ca.pem"));
    let (bad_port, good_port) = (free_port(), free_port());
    // Another host name, so the two targets have different names.
    let bad = format!(
        "postgres://localhost:{}?server-name=localhost&ca-file={missing}&listen=127.0.0.1:{bad_port}",
        pg.port
    );
    let bad_name = format!("postgres://localhost:{}", pg.port);
    let good = good_target(pg, good_port);
    let ca = ca_arg(pg);

    let keyhole = Keyhole::spawn(
        &["--skip-failed-targets", "--ca-file", &ca, &bad, &good],
        &[],
        Ready::Tcp(good_port),
    );
    assert_eq!(psql_ok(good_port, "select 'good'", "psql"), "good");
    let logs = keyhole.logs();
    let skipped = logs
        .lines()
        .find(|l| l.contains("target skipped"))
        .unwrap_or_else(|| panic!("no \"target skipped\" line:\n{logs}"));
    assert!(
        skipped.contains(&bad_name) && skipped.contains("missing-ca.pem"),
        "the line names the target and the reason: {skipped}"
    );
    assert!(!listens_tcp(keyhole.pid(), bad_port), "{logs}");

    // Without the flag the same configuration does not start.
    let (status, output) = Keyhole::start_expect_exit(&["--ca-file", &ca, &bad, &good], PATIENCE);
    assert_eq!(exit_code(status), Some(2), "{output}");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "{output}");
    assert!(
        lines[0].starts_with("keyhole: ")
            && lines[0].contains(&bad_name)
            && lines[0].contains("missing-ca.pem"),
        "{output}"
    );
}

#[test]
fn skip_failed_targets_skips_a_target_whose_port_is_taken() {
    let pg = PgCluster::shared();
    let held = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let held_port = held.local_addr().expect("local address").port();
    let good_port = free_port();
    let bad = format!(
        "postgres://localhost:{}?server-name=localhost&listen=127.0.0.1:{held_port}",
        pg.port
    );
    let bad_name = format!("postgres://localhost:{}", pg.port);
    let ca = ca_arg(pg);
    let keyhole = Keyhole::spawn(
        &[
            "--skip-failed-targets",
            "--ca-file",
            &ca,
            &bad,
            &good_target(pg, good_port),
        ],
        &[],
        Ready::Tcp(good_port),
    );
    assert_eq!(psql_ok(good_port, "select 'good'", "psql"), "good");
    let logs = keyhole.logs();
    let skipped = logs
        .lines()
        .find(|l| l.contains("target skipped"))
        .unwrap_or_else(|| panic!("no \"target skipped\" line:\n{logs}"));
    assert!(
        skipped.contains(&bad_name)
            && skipped.contains(&format!("127.0.0.1:{held_port}"))
            && skipped.contains("in use"),
        "{skipped}"
    );
    drop(held);
}

#[test]
fn skip_failed_targets_exits_2_when_every_target_fails_its_configuration() {
    let pg = PgCluster::shared();
    let scratch = support::scratch_dir("keyhole-skip-all-");
    let missing = path_arg(&scratch.path().join("missing-ca.pem"));
    let port = free_port().to_string();

    // Bad URLs: the configuration itself has nothing left.
    let (status, output) = Keyhole::start_expect_exit(
        &[
            "--port",
            &port,
            "--skip-failed-targets",
            "postgres://db?tls-mode=nope",
            "ftp://db",
        ],
        PATIENCE,
    );
    assert_eq!(exit_code(status), Some(2), "{output}");
    assert!(
        output.contains("no target left") && output.contains("tls-mode") && output.contains("ftp"),
        "{output}"
    );

    // Files: every target's CA is missing.
    let a = format!("postgres://localhost:{}?ca-file={missing}", pg.port);
    let b = format!("postgres://127.0.0.1:{}?ca-file={missing}", pg.port);
    let (status, output) = Keyhole::start_expect_exit(
        &["--port", &port, "--skip-failed-targets", &a, &b],
        PATIENCE,
    );
    assert_eq!(exit_code(status), Some(2), "{output}");
    for name in [
        format!("postgres://localhost:{}", pg.port),
        format!("postgres://127.0.0.1:{}", pg.port),
    ] {
        assert!(
            output
                .lines()
                .any(|l| l.contains("target skipped") && l.contains(&name)),
            "{name} not reported as skipped:\n{output}"
        );
    }
    assert!(!output.contains(" ready on "), "{output}");
}

/// When `--skip-failed-targets` has skipped every target at preparation
/// (certificate files, backend, credential source), keyhole says that none is
/// left, as the configuration stage and `check-config` do, not just the first
/// target's failure.
#[test]
fn skip_failed_targets_says_no_target_left_when_every_target_fails_preparation() {
    let pg = PgCluster::shared();
    let scratch = support::scratch_dir("keyhole-skip-all-");
    let missing = path_arg(&scratch.path().join("missing-ca.pem"));
    let port = free_port().to_string();
    let a = format!("postgres://localhost:{}?ca-file={missing}", pg.port);
    let b = format!("postgres://127.0.0.1:{}?ca-file={missing}", pg.port);
    let (status, output) = Keyhole::start_expect_exit(
        &["--port", &port, "--skip-failed-targets", &a, &b],
        PATIENCE,
    );
    assert_eq!(exit_code(status), Some(2), "{output}");
    let last = output.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("keyhole: ") && last.contains("no target left"),
        "{output}"
    );
}

/// A target whose port is in use is skipped under `--skip-failed-targets`;
/// with every port taken there is nothing left to serve: exit 2, as for any
/// other way of losing every target.
#[test]
fn skip_failed_targets_exits_2_when_every_port_is_taken() {
    let pg = PgCluster::shared();
    let held = [
        TcpListener::bind("127.0.0.1:0").expect("hold a port"),
        TcpListener::bind("127.0.0.1:0").expect("hold a port"),
    ];
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect();
    let a = format!(
        "postgres://localhost:{}?server-name=localhost&listen=127.0.0.1:{}",
        pg.port, ports[0]
    );
    let b = good_target(pg, ports[1]);
    let ca = ca_arg(pg);
    let (status, output) = Keyhole::start_expect_exit(
        &["--skip-failed-targets", "--ca-file", &ca, &a, &b],
        PATIENCE,
    );
    assert!(output.contains("no target left"), "{output}");
    assert_eq!(exit_code(status), Some(2), "{output}");
    drop(held);
}

// ---------------------------------------------------------------------------
// 10. keyhole check-config
// ---------------------------------------------------------------------------

#[test]
fn check_config_with_a_running_keyholes_arguments_prints_each_target() {
    let pg = PgCluster::shared();
    let (port, http_port, admin, second) = (free_port(), free_port(), free_port(), free_port());
    let (port_arg, http_arg, admin_arg) =
        (port.to_string(), http_port.to_string(), admin.to_string());
    let ca = ca_arg(pg);
    let first = pg.keyhole_target();
    let other = format!(
        "postgres://localhost:{}?server-name=localhost&listen=127.0.0.1:{second}",
        pg.port
    );
    let args = [
        "--port",
        &port_arg,
        "--health-check",
        "--http-port",
        &http_arg,
        "--quitquitquit",
        "--admin-port",
        &admin_arg,
        "--max-connections",
        "5",
        "--ca-file",
        &ca,
        &first,
        &other,
    ];
    let mut keyhole = Keyhole::spawn(&args, &[], Ready::Tcp(port));
    wait_http(&keyhole, http_port, "/startup", 200, "ok");

    // keyhole holds every port: check-config must not need any of them.
    let mut check = vec!["check-config"];
    check.extend_from_slice(&args);
    let out = run(&check, &[("KEYHOLE_MIN_SIGTERM_DELAY", "3s")]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(out.stderr.is_empty(), "{}", describe(&out));
    let report = text(&out.stdout);
    let line = |key: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in\n{report}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("health-check"), "health-check = true # --health-check");
    assert_eq!(
        line("max-connections"),
        "max-connections = 5 # --max-connections"
    );
    assert_eq!(
        line("min-sigterm-delay"),
        "min-sigterm-delay = 3s # KEYHOLE_MIN_SIGTERM_DELAY"
    );
    assert_eq!(
        line("admin-port"),
        format!("admin-port = {admin} # --admin-port")
    );
    for (name, listen) in [
        (format!("postgres://127.0.0.1:{}", pg.port), port),
        (format!("postgres://localhost:{}", pg.port), second),
    ] {
        let header = format!("[target {name}]");
        let at = report
            .find(&header)
            .unwrap_or_else(|| panic!("no {header} in\n{report}"));
        let section = &report[at..];
        let section = &section[..section[1..].find("\n[").map_or(section.len(), |i| i + 1)];
        assert!(
            section.contains(&format!("127.0.0.1:{listen}")) && section.contains(&ca),
            "{section}"
        );
    }
    assert!(keyhole.wait_exit(Duration::ZERO).is_none());
}

#[test]
fn check_config_never_binds_and_never_dials() {
    let (postgres_db, mysql_db) = (Mute::bind(), Mute::bind());
    let (port, http_port, admin) = (free_port(), free_port(), free_port());
    let (port_arg, http_arg, admin_arg) =
        (port.to_string(), http_port.to_string(), admin.to_string());
    let pg_target = format!(
        "postgres://127.0.0.1:{}?server-name=localhost",
        postgres_db.port()
    );
    let second = free_port();
    let my_target = format!(
        "mysql://127.0.0.1:{}?server-name=localhost&listen=127.0.0.1:{second}",
        mysql_db.port()
    );
    // Every option that would bind or dial at start.
    let out = run(
        &[
            "check-config",
            "--port",
            &port_arg,
            "--health-check",
            "--prometheus",
            "--readiness-checks-upstream",
            "--http-port",
            &http_arg,
            "--quitquitquit",
            "--admin-port",
            &admin_arg,
            "--run-connection-test",
            &pg_target,
            &my_target,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report = text(&out.stdout);
    for mute in [&postgres_db, &mysql_db] {
        assert!(
            report.contains(&format!("127.0.0.1:{}", mute.port())),
            "{report}"
        );
        assert_eq!(mute.accepted(), 0, "check-config dialled a target");
    }
    for taken in [port, second, http_port, admin] {
        TcpListener::bind(("127.0.0.1", taken))
            .unwrap_or_else(|e| panic!("port {taken} is not free after check-config: {e}"));
    }
}

#[test]
fn check_config_errors_are_one_line_and_exit_2() {
    let pg = PgCluster::shared();
    let scratch = support::scratch_dir("keyhole-check-");
    let missing = path_arg(&scratch.path().join("missing-ca.pem"));
    let target = pg.keyhole_target();
    let ca = ca_arg(pg);
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--max-connections", "lots", "--ca-file", &ca, &target],
            &["--max-connections", "lots"],
        ),
        (&["--ca-file", &missing, &target], &["missing-ca.pem"]),
        (
            &["--http-port", "99999", "--ca-file", &ca, &target],
            &["99999"],
        ),
        (&["--bogus", "--ca-file", &ca, &target], &["--bogus"]),
        (&["--ca-file", &ca], &["no target"]),
    ];
    for (args, mentions) in cases {
        let mut all = vec!["check-config"];
        all.extend_from_slice(args);
        let out = run(&all, &[]);
        assert_eq!(out.status.code(), Some(2), "{all:?}:\n{}", describe(&out));
        assert_one_error_line(&out, "keyhole check-config: ", mentions);
    }
}

// ---------------------------------------------------------------------------
// 11. Metrics
//
// The Prometheus names and labels are those docs/operations.md lists.
// ---------------------------------------------------------------------------

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        other => other
            .parse::<f64>()
            .map_err(|_| format!("bad value {other:?}")),
    }
}

/// Parses Prometheus text format 0.0.4: `# HELP`/`# TYPE` lines (a TYPE
/// before its samples, at most once per family), then `name{labels} value
/// [timestamp]` lines.
fn parse_prometheus(body: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    let mut typed: HashMap<String, String> = HashMap::new();
    for (n, line) in body.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            match words.first() {
                Some(&"HELP") if !words.get(1).is_some_and(|n| is_metric_name(n)) => {
                    return Err(at("HELP without a metric name".into()));
                }
                Some(&"TYPE") => {
                    let (Some(name), Some(kind), None) = (words.get(1), words.get(2), words.get(3))
                    else {
                        return Err(at("TYPE needs a name and a type".into()));
                    };
                    if !is_metric_name(name) {
                        return Err(at("bad metric name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(kind) {
                        return Err(at(format!("unknown type {kind}")));
                    }
                    if typed.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at("a second TYPE for the same metric".into()));
                    }
                    if samples.iter().any(|s: &Sample| family(&s.name) == *name) {
                        return Err(at("TYPE after the metric's samples".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at("bad metric name".into()));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut consumed = None;
            loop {
                while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                    chars.next();
                }
                match chars.peek() {
                    Some((i, '}')) => {
                        consumed = Some(i + 1);
                        break;
                    }
                    None => break,
                    _ => {}
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if !is_metric_name(&key) || key.contains(':') {
                    return Err(at(format!("bad label name {key:?}")));
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(at("label value not quoted".into()));
                }
                let mut value = String::new();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            other => return Err(at(format!("bad escape {other:?}"))),
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                if !closed {
                    return Err(at("unterminated label value".into()));
                }
                if labels.insert(key.clone(), value).is_some() {
                    return Err(at(format!("label {key} twice")));
                }
            }
            let end = consumed.ok_or_else(|| at("unterminated labels".into()))?;
            rest = &inner[end..];
        }
        let mut words = rest.split_whitespace();
        let value = parse_value(words.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = words.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if words.next().is_some() {
            return Err(at("trailing text".into()));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// The family a sample belongs to (histogram and summary parts stripped).
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// GET /metrics, checked and parsed.
fn scrape(http_port: u16) -> Vec<Sample> {
    let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    let reply = http::request(addr, "GET", "/metrics").expect("GET /metrics");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{reply:?}"
    );
    parse_prometheus(&reply.body)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{}", reply.body))
}

/// The value of the sample `name` whose labels include `labels`.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// Polls /metrics until `ok` holds; returns that scrape.
fn wait_metrics(
    keyhole: &Keyhole,
    http_port: u16,
    what: &str,
    ok: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    poll(
        what,
        PATIENCE,
        || scrape(http_port),
        |samples| ok(samples),
        || format!("keyhole log:\n{}", keyhole.logs()),
    )
}

#[test]
fn metrics_follow_a_session_from_open_to_close() {
    let pg = PgCluster::shared();
    let (keyhole, http_port) = with_http(pg, &["--prometheus"]);
    let target = format!("postgres://127.0.0.1:{}", pg.port);
    let t = target.as_str();
    let before = scrape(http_port);
    assert_eq!(
        metric(&before, "keyhole_connections_total", &[("target", t)]).unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        metric(&before, "keyhole_build_info", &[]),
        Some(1.0),
        "{before:#?}"
    );
    assert!(
        before
            .iter()
            .any(|s| s.name == "keyhole_build_info" && s.labels.contains_key("version")),
        "{before:#?}"
    );
    // What the platform reports (`/proc` on Linux); the rest is left out of
    // the scrape, never reported as zero (src/platform/process.rs).
    let (reported, absent): (&[&str], &[&str]) = if cfg!(linux_native) {
        (
            &[
                "process_resident_memory_bytes",
                "process_virtual_memory_bytes",
                "process_open_fds",
                "process_max_fds",
                "process_start_time_seconds",
            ],
            &[],
        )
    } else {
        (
            &[
                "process_open_fds",
                "process_max_fds",
                "process_start_time_seconds",
            ],
            &[
                "process_resident_memory_bytes",
                "process_virtual_memory_bytes",
            ],
        )
    };
    for positive in reported {
        assert!(
            metric(&before, positive, &[]).is_some_and(|v| v > 0.0),
            "{positive} is not > 0 in {before:#?}"
        );
    }
    for missing in absent {
        assert!(
            !before.iter().any(|s| s.name == *missing),
            "{missing} should be left out in {before:#?}"
        );
    }
    assert!(metric(&before, "process_cpu_seconds_total", &[]).is_some_and(|v| v >= 0.0));

    let rt = support::runtime();
    let (client, connection) = connect(&rt, keyhole.port(), "sidecar_metrics");
    wait_metrics(
        &keyhole,
        http_port,
        "one connection accepted and open",
        |s| {
            metric(s, "keyhole_connections_total", &[("target", t)]) == Some(1.0)
                && metric(s, "keyhole_connections_open", &[("target", t)]) == Some(1.0)
        },
    );
    assert_eq!(
        simple_query(&rt, &client, "select repeat('x', 10000)").expect("query")[0].len(),
        10000
    );
    let during = scrape(http_port);
    for direction in ["client_to_server", "server_to_client"] {
        let bytes = metric(
            &during,
            "keyhole_bytes_total",
            &[("target", t), ("direction", direction)],
        );
        assert!(bytes.is_some_and(|b| b > 0.0), "{direction}: {during:#?}");
    }
    assert!(
        metric(
            &during,
            "keyhole_bytes_total",
            &[("target", t), ("direction", "server_to_client")]
        )
        .is_some_and(|b| b >= 10000.0),
        "{during:#?}"
    );
    for histogram in [
        "keyhole_upstream_connect_seconds_count",
        "keyhole_upstream_tls_handshake_seconds_count",
    ] {
        assert!(
            metric(&during, histogram, &[("target", t)]).is_some_and(|n| n >= 1.0),
            "{histogram}: {during:#?}"
        );
    }

    close(&rt, client, connection);
    let after = wait_metrics(
        &keyhole,
        http_port,
        "the connection closed with outcome ok",
        |s| {
            metric(s, "keyhole_connections_open", &[("target", t)]) == Some(0.0)
                && metric(
                    s,
                    "keyhole_connections_closed_total",
                    &[("target", t), ("outcome", "client_closed")],
                ) == Some(1.0)
        },
    );
    assert_eq!(
        metric(&after, "keyhole_connections_total", &[("target", t)]),
        Some(1.0)
    );
    // Labels never carry user names or client addresses.
    for s in &after {
        for value in s.labels.values() {
            assert!(
                !value.contains(SCRAM_USER) && !value.contains("sidecar_metrics"),
                "{s:?}"
            );
        }
        if s.name.starts_with("keyhole_") {
            let allowed = [
                "target",
                "outcome",
                "reason",
                "direction",
                "result",
                "version",
                "le",
                // TLS handshakes by kind; the pool's connections by state.
                "kind",
                "state",
            ];
            assert!(
                s.labels.keys().all(|k| allowed.contains(&k.as_str())),
                "unexpected label in {s:?}"
            );
        }
    }
}

#[test]
fn metrics_count_failed_connections_by_outcome() {
    let pg = PgCluster::shared();
    // A second target whose database refuses connections (nothing listens).
    let (dead, dead_listen, good_port, http_port) =
        (free_port(), free_port(), free_port(), free_port());
    let dead_target =
        format!("postgres://127.0.0.1:{dead}?server-name=localhost&listen=127.0.0.1:{dead_listen}");
    let (ca, http_arg) = (ca_arg(pg), http_port.to_string());
    let keyhole = Keyhole::spawn(
        &[
            "--prometheus",
            "--http-port",
            &http_arg,
            "--ca-file",
            &ca,
            &good_target(pg, good_port),
            &dead_target,
        ],
        &[],
        Ready::Tcp(good_port),
    );
    let good = format!("postgres://127.0.0.1:{}", pg.port);
    let dead_name = format!("postgres://127.0.0.1:{dead}");

    let out = clients::psql(good_port, SCRAM_USER, Some("wrong password"), "select 1");
    assert!(!out.status.success(), "{}", clients::stderr(&out));
    let out = clients::psql(dead_listen, SCRAM_USER, Some(SCRAM_PASS), "select 1");
    assert!(!out.status.success(), "{}", clients::stderr(&out));
    keyhole.wait_for_log("connection closed", 2);

    let closed = closed_lines(&keyhole.logs());
    for name in [&good, &dead_name] {
        let line = closed
            .iter()
            .find(|f| field(f, "target") == name.as_str())
            .unwrap_or_else(|| panic!("no closed line for {name}:\n{}", keyhole.logs()));
        let outcome = field(line, "outcome").to_owned();
        assert_ne!(outcome, "client_closed", "{line:?}");
        wait_metrics(
            &keyhole,
            http_port,
            &format!("{name} closed with outcome {outcome}"),
            |s| {
                metric(
                    s,
                    "keyhole_connections_closed_total",
                    &[("target", name.as_str()), ("outcome", outcome.as_str())],
                ) == Some(1.0)
            },
        );
    }
}

#[test]
fn metrics_count_connections_refused_at_the_limit() {
    let pg = PgCluster::shared();
    let (keyhole, http_port) = with_http(pg, &["--prometheus", "--max-connections", "1"]);
    let target = format!("postgres://127.0.0.1:{}", pg.port);
    let rt = support::runtime();
    let (client, _connection) = connect(&rt, keyhole.port(), "sidecar_metrics_limit");
    assert_eq!(
        simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );

    let out = clients::psql(keyhole.port(), SCRAM_USER, Some(SCRAM_PASS), "select 1");
    assert!(
        !out.status.success(),
        "a second session got in at the limit"
    );
    wait_metrics(
        &keyhole,
        http_port,
        "one connection refused at the limit",
        |s| {
            metric(
                s,
                "keyhole_connections_refused_total",
                &[("target", target.as_str()), ("reason", "limit")],
            ) == Some(1.0)
        },
    );
}

#[test]
fn the_prometheus_parser_accepts_the_format_and_rejects_garbage() {
    // The metrics tests above are only as good as this parser.
    let good = "# HELP keyhole_connections_total Accepted.\n\
                # TYPE keyhole_connections_total counter\n\
                keyhole_connections_total{target=\"postgres://db:5432\"} 3\n\
                # TYPE keyhole_upstream_connect_seconds histogram\n\
                keyhole_upstream_connect_seconds_bucket{target=\"a\",le=\"+Inf\"} 2\n\
                keyhole_upstream_connect_seconds_count{target=\"a\",} 2 1700000000000\n\
                weird{v=\"q\\\"uote\\\\n\"} NaN\n\
                process_open_fds 12\n";
    let samples = parse_prometheus(good).expect("valid");
    assert_eq!(samples.len(), 5);
    assert_eq!(
        metric(
            &samples,
            "keyhole_connections_total",
            &[("target", "postgres://db:5432")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &samples,
            "keyhole_upstream_connect_seconds_count",
            &[("target", "a")]
        ),
        Some(2.0)
    );
    assert_eq!(samples[3].labels["v"], "q\"uote\\n");
    for bad in [
        "keyhole_x{target=unquoted} 1",
        "keyhole_x{target=\"a\" 1",
        "keyhole_x one",
        "9lives 1",
        "keyhole_x 1 2 3",
        "# TYPE keyhole_x countr",
        "keyhole_x 1\n# TYPE keyhole_x counter",
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}
