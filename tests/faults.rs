//! Fault injection (issue 15): upstreams and clients that misbehave on the
//! wire, through the real `keyhole` binary.
//!
//! Upstream faults are made by the suite's own relay between keyhole and the
//! real server ([`support::fault_proxy`]): a reset in the middle of a result
//! or at the first query, a stall, a half-close (FIN without close_notify), a
//! TLS record cut short, a rotated certificate on the next connection, a DNS
//! answer that changes between connections, a server that accepts and never
//! answers (not even the TLS hello), and one that answers byte by byte.
//! Client faults are made by the test's own sockets: slowloris, a client
//! that stops reading a large result, abrupt resets. MySQL gets the two
//! commonest upstream faults, a half-close and a reset in a result.
//!
//! Each test checks what the affected client sees (keyhole's ErrorResponse
//! before the session; during the session, the end of the connection, which
//! is all the protocol leaves room for), that a bystander session through
//! the same keyhole still answers afterwards, that keyhole's memory stays
//! bounded where a fault could make it grow, and how
//! `keyhole_connections_closed_total{outcome}` counts it.

mod support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Cursor, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_postgres::NoTls;

use support::clients;
use support::fault_proxy::{Fault, FaultProxy, Phase, Preamble};
use support::keyhole::{listens_tcp, Keyhole};
use support::logs::{closed_lines, field};
use support::mariadb::{self, MariaDb};
use support::postgres::{PgCluster, PgOptions, SCRAM_PASS, SCRAM_USER, TRUST_USER};
use support::process::{clean_env, describe_output, output_with_timeout, Watchdog};
use support::session::{connect, simple_query, wait_until};
use support::wire;

/// Limit for anything a test waits for: a guard against a hang, not a
/// timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

/// How much keyhole's resident memory may grow under a fault. keyhole's
/// buffers are 64 KiB per direction and only while bytes are in flight; a
/// fault that made it buffer a result would blow far past this.
const RSS_SLACK_KIB: u64 = 64 * 1024;

/// About 20 MB in 20,000 rows: a result long enough for a fault to land in
/// its middle.
const BIG_RESULT: &str = "select repeat('x', 1000) from generate_series(1, 20000)";
const BIG_ROWS: usize = 20_000;

/// Nominally 2 GB: far more than keyhole could read and drop in the second
/// it gives a server whose client has gone, so the server is still busy
/// when keyhole decides (the statement is cancelled long before its end).
const HUGE_RESULT: &str = "select repeat('x', 1000) from generate_series(1, 2000000)";

/// Server bytes after which a planned fault strikes: past any login (a few
/// KiB), well inside [`BIG_RESULT`].
const MID_RESULT: u64 = 256 * 1024;

/// What libpq (psql) prints when the connection ends in the middle of a
/// statement.
const PSQL_LOST: &str = "server closed the connection unexpectedly";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// A PostgreSQL cluster with its own CA (every cluster's PKI is fresh), for
/// a certificate keyhole's `--ca-file` does not vouch for.
fn second_cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| PgCluster::start(PgOptions::default()))
}

fn pg_addr(pg: &PgCluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], pg.port))
}

/// keyhole with `/metrics` on its own port, in front of the Postgres server
/// reached at 127.0.0.1:`upstream_port`, trusting `ca`.
fn keyhole_for(upstream_port: u16, ca: &Path, extra: &[&str]) -> (Keyhole, u16) {
    let http = support::free_port();
    let http_arg = http.to_string();
    let target = format!("postgres://127.0.0.1:{upstream_port}?server-name=localhost");
    let mut args = vec!["--prometheus", "--http-port", &http_arg];
    args.extend_from_slice(extra);
    args.extend(["--ca-file", path_arg(ca), &target]);
    (Keyhole::start(&args), http)
}

/// A fault proxy in front of `pg` and keyhole in front of the proxy.
struct Rig {
    proxy: FaultProxy,
    keyhole: Keyhole,
    http: u16,
}

fn rig(pg: &PgCluster, extra: &[&str]) -> Rig {
    let proxy = FaultProxy::start(pg_addr(pg), Preamble::Postgres);
    let (keyhole, http) = keyhole_for(proxy.port(), &pg.pki.ca, extra);
    Rig {
        proxy,
        keyhole,
        http,
    }
}

/// `keyhole_connections_closed_total`, by outcome, over all targets.
fn outcomes(http: u16) -> BTreeMap<String, u64> {
    let (status, body) = support::http::get(http, "/metrics")
        .unwrap_or_else(|e| panic!("GET /metrics on port {http}: {e}"));
    assert_eq!(status, 200, "GET /metrics: {body}");
    let mut counts = BTreeMap::new();
    for line in body.lines() {
        if !line.starts_with("keyhole_connections_closed_total{") {
            continue;
        }
        let outcome = line
            .split("outcome=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no outcome label in {line:?}"));
        let value: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line:?}"));
        *counts.entry(outcome.to_owned()).or_default() += value;
    }
    counts
}

/// Waits until the closed connections counted by outcome are exactly
/// `expected` (outcomes not listed: none), and checks that nothing in
/// keyhole panicked on the way.
fn wait_outcomes(keyhole_logs: impl Fn() -> String, http: u16, expected: &[(&str, u64)]) {
    let want: BTreeMap<String, u64> = expected
        .iter()
        .map(|(outcome, count)| (outcome.to_string(), *count))
        .collect();
    wait_until(
        &format!("keyhole_connections_closed_total by outcome is {want:?}"),
        PATIENCE,
        || outcomes(http) == want,
        || {
            format!(
                "/metrics counts {:?}\nkeyhole log:\n{}",
                outcomes(http),
                keyhole_logs()
            )
        },
    );
    let logs = keyhole_logs();
    assert!(!logs.contains("panicked"), "keyhole panicked:\n{logs}");
}

/// A "connection closed" line of keyhole's log with `outcome`; waits for it.
fn closed_line(keyhole: &Keyhole, outcome: &str) -> std::collections::HashMap<String, String> {
    let mut found = None;
    wait_until(
        &format!("a \"connection closed\" line with outcome={outcome}"),
        PATIENCE,
        || {
            found = closed_lines(&keyhole.logs())
                .into_iter()
                .find(|f| field(f, "outcome") == outcome);
            found.is_some()
        },
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    found.expect("found above")
}

/// One figure (in KiB) of /proc/PID/status: `VmRSS`, `VmHWM`.
fn memory_kib(pid: u32, name: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
}

/// keyhole's resident memory before a fault, to compare with later.
struct Memory {
    pid: u32,
    baseline_kib: u64,
}

impl Memory {
    fn baseline(keyhole: &Keyhole) -> Memory {
        Memory {
            pid: keyhole.pid(),
            baseline_kib: memory_kib(keyhole.pid(), "VmRSS"),
        }
    }

    /// Resident memory now is within [`RSS_SLACK_KIB`] of the baseline.
    fn assert_bounded(&self, when: &str) {
        let now = memory_kib(self.pid, "VmRSS");
        assert!(
            now < self.baseline_kib + RSS_SLACK_KIB,
            "{when}: keyhole's resident memory grew from {} KiB to {now} KiB",
            self.baseline_kib
        );
    }

    /// The peak resident memory (VmHWM) since the start is within
    /// [`RSS_SLACK_KIB`] of the baseline.
    fn assert_peak_bounded(&self, when: &str) {
        let peak = memory_kib(self.pid, "VmHWM");
        assert!(
            peak < self.baseline_kib + RSS_SLACK_KIB,
            "{when}: keyhole's peak resident memory was {peak} KiB, from {} KiB before",
            self.baseline_kib
        );
    }
}

/// `sql` through keyhole's `port` with psql as scram_user, which must fail
/// in the middle of the statement; psql's stderr.
fn psql_cut_off(port: u16, sql: &str, keyhole: &Keyhole) -> String {
    let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), sql);
    let stderr = clients::stderr(&out);
    assert!(
        !out.status.success(),
        "psql survived the fault and printed {} bytes\nkeyhole log:\n{}",
        out.stdout.len(),
        keyhole.logs()
    );
    assert!(
        stderr.contains(PSQL_LOST),
        "psql should report the lost connection; its stderr:\n{stderr}\nkeyhole log:\n{}",
        keyhole.logs()
    );
    stderr
}

/// `sql` through keyhole's `port` with psql as scram_user; its output.
fn psql_ok(port: u16, sql: &str) -> String {
    let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), sql);
    clients::expect_success(&out, &format!("psql `{sql}` through keyhole port {port}"))
}

/// A bystander: a session opened before the fault must still answer.
fn still_answers(rt: &Runtime, client: &tokio_postgres::Client, what: &str) {
    let rows = simple_query(rt, client, "select 'still here'")
        .unwrap_or_else(|e| panic!("the bystander session broke {what}: {e}"));
    assert_eq!(rows, ["still here"], "the bystander session {what}");
}

/// Connects with tokio-postgres as scram_user through keyhole's `port`,
/// expecting keyhole to refuse with an ErrorResponse: its severity, SQLSTATE
/// and message.
fn refusal(rt: &Runtime, port: u16) -> (String, String, String) {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(SCRAM_USER)
        .password(SCRAM_PASS)
        .dbname("postgres");
    let attempt = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), config.connect(NoTls)).await
    });
    let err = match attempt {
        Err(_) => panic!("tokio-postgres through keyhole port {port} hung"),
        Ok(Ok(_)) => panic!("tokio-postgres through keyhole port {port} connected"),
        Ok(Err(err)) => err,
    };
    let db = err.as_db_error().unwrap_or_else(|| {
        panic!("expected keyhole's ErrorResponse through port {port}, got: {err}")
    });
    (
        db.severity().to_owned(),
        db.code().code().to_owned(),
        db.message().to_owned(),
    )
}

/// A raw session as trust_user tagged `app`, ready for a query.
fn raw_session(port: u16, app: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to keyhole");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("set a read timeout");
    let startup = wire::startup_packet(
        196_608,
        &[
            ("user", TRUST_USER),
            ("database", "postgres"),
            ("application_name", app),
        ],
    );
    stream.write_all(&startup).expect("send the startup packet");
    wire::read_until_ready(&mut stream);
    stream
}

/// `sql` on a raw session, answered to its ReadyForQuery.
fn raw_query(stream: &mut TcpStream, sql: &str) {
    stream
        .write_all(&wire::simple_query(sql))
        .expect("send a query");
    wire::read_until_ready(stream);
}

/// Closes `stream` with a reset (SO_LINGER 0), as a crashing client does.
fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

/// How many server backends carry `application_name = app` (and, if given,
/// wait for `wait_event`).
fn backends(pg: &PgCluster, app: &str, wait_event: Option<&str>) -> usize {
    let filter = wait_event.map_or(String::new(), |w| format!(" and wait_event = '{w}'"));
    pg.admin_sql(&format!(
        "select count(*) from pg_stat_activity where application_name = '{app}'{filter}"
    ))
    .parse()
    .expect("count(*) is a number")
}

// ---------------------------------------------------------------------------
// Upstream faults
// ---------------------------------------------------------------------------

/// The server's connection is reset in the middle of a result, and on
/// another session at the first byte of the first query after the login.
/// Each affected client sees its connection end (there is no room in the
/// protocol for a message in the middle of a result); the bystander goes
/// on; both count as `upstream_io`.
#[test]
fn an_upstream_reset_ends_only_the_affected_session() {
    let pg = PgCluster::shared();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(pg, &[]);
    let rt = support::runtime();
    let (bystander, _bystander_task) = connect(&rt, keyhole.port(), "faults_reset_bystander");
    still_answers(&rt, &bystander, "before the faults");
    let memory = Memory::baseline(&keyhole);

    // Mid-result, as a person with psql sees it.
    let first = proxy.connections();
    proxy.plan_next(Fault::ResetAfter(MID_RESULT));
    psql_cut_off(keyhole.port(), BIG_RESULT, &keyhole);
    proxy.connection(first).wait_phase(Phase::Reset, PATIENCE);

    // At the first query byte after the login, as an application sees it.
    let second = proxy.connections();
    let (victim, _victim_task) = connect(&rt, keyhole.port(), "faults_reset_victim");
    proxy.connection(second).set(Fault::ResetOnClientData);
    let err = simple_query(&rt, &victim, "select 1")
        .expect_err("the session whose server reset cannot answer");
    assert!(
        err.is_closed(),
        "tokio-postgres should report the closed connection, got: {err:?}"
    );
    proxy.connection(second).wait_phase(Phase::Reset, PATIENCE);

    still_answers(&rt, &bystander, "after two resets");
    wait_outcomes(|| keyhole.logs(), http, &[("upstream_io", 2)]);
    let closed = closed_line(&keyhole, "upstream_io");
    assert_eq!(
        field(&closed, "level"),
        "WARN",
        "a server's failure: {closed:?}"
    );
    assert!(
        field(&closed, "error").contains("server connection failed"),
        "{closed:?}"
    );
    memory.assert_bounded("after two upstream resets");
}

/// The server stops sending in the middle of a result (its bytes are held,
/// its socket stays open). keyhole holds no more memory for it, other
/// sessions go on, and when the server resumes the client gets every row it
/// was owed. A client that gives up during the stall gets its statement
/// cancelled (`client_gone_cancelled`).
#[test]
fn an_upstream_stall_holds_the_client_and_nothing_else() {
    let pg = PgCluster::shared();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(pg, &[]);
    let rt = support::runtime();
    let (bystander, _bystander_task) = connect(&rt, keyhole.port(), "faults_stall_bystander");
    let memory = Memory::baseline(&keyhole);

    // Stalled, then resumed: every row arrives.
    let index = proxy.connections();
    let (patient, patient_task) = connect(&rt, keyhole.port(), "faults_stall_patient");
    let stalled = proxy.connection(index);
    stalled.set(Fault::StallAfter(1024 * 1024));
    let query = rt.spawn(async move {
        let result = patient.simple_query(BIG_RESULT).await;
        (result, patient)
    });
    stalled.wait_phase(Phase::Stalled, PATIENCE);
    assert!(!query.is_finished(), "the query ended during the stall");
    still_answers(&rt, &bystander, "during the stall");
    memory.assert_bounded("during the stall");
    stalled.set(Fault::Pass);
    let (result, patient) = rt
        .block_on(async { tokio::time::timeout(PATIENCE, query).await })
        .expect("the query ends once the server resumes")
        .expect("the query task does not panic");
    let rows: Vec<String> = result
        .expect("the query succeeds once the server resumes")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), BIG_ROWS, "every row after the stall");
    assert!(
        rows.iter()
            .all(|r| r.len() == 1000 && r.bytes().all(|b| b == b'x')),
        "a row was damaged by the stall"
    );
    drop(patient);
    rt.block_on(patient_task).expect("the session ends");

    // Stalled, and the client gives up: keyhole cancels its statement.
    let index = proxy.connections();
    let (impatient, impatient_task) = connect(&rt, keyhole.port(), "faults_stall_impatient");
    let stalled = proxy.connection(index);
    stalled.set(Fault::StallAfter(1024 * 1024));
    let query = rt.spawn(async move {
        let _ = impatient.simple_query(BIG_RESULT).await;
    });
    stalled.wait_phase(Phase::Stalled, PATIENCE);
    query.abort();
    impatient_task.abort();
    rt.block_on(async {
        let _ = query.await;
        let _ = impatient_task.await;
    });

    still_answers(&rt, &bystander, "after the stalls");
    wait_outcomes(
        || keyhole.logs(),
        http,
        &[("client_closed", 1), ("client_gone_cancelled", 1)],
    );
    memory.assert_peak_bounded("after the stalls");
}

/// The server's side sends a FIN without TLS close_notify in the middle of
/// a result: a truncation, which anything on the path can cause. The client
/// sees its connection end; the bystander goes on; `upstream_truncated`.
#[test]
fn an_upstream_half_close_mid_result_is_a_truncation() {
    let pg = PgCluster::shared();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(pg, &[]);
    let rt = support::runtime();
    let (bystander, _bystander_task) = connect(&rt, keyhole.port(), "faults_fin_bystander");
    let memory = Memory::baseline(&keyhole);

    let index = proxy.connections();
    proxy.plan_next(Fault::HalfCloseAfter(MID_RESULT));
    psql_cut_off(keyhole.port(), BIG_RESULT, &keyhole);
    proxy
        .connection(index)
        .wait_phase(Phase::HalfClosed, PATIENCE);

    still_answers(&rt, &bystander, "after the half-close");
    wait_outcomes(|| keyhole.logs(), http, &[("upstream_truncated", 1)]);
    let closed = closed_line(&keyhole, "upstream_truncated");
    assert!(
        field(&closed, "error").contains("without TLS close_notify"),
        "{closed:?}"
    );
    memory.assert_bounded("after the half-close");
}

/// The server's side passes on half of a TLS record and then a FIN: the
/// record can never be opened. The client sees its connection end; the
/// bystander goes on; a truncation (`upstream_truncated`).
#[test]
fn a_tls_record_cut_short_is_a_truncation() {
    let pg = PgCluster::shared();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(pg, &[]);
    let rt = support::runtime();
    let (bystander, _bystander_task) = connect(&rt, keyhole.port(), "faults_cut_bystander");
    let memory = Memory::baseline(&keyhole);

    let index = proxy.connections();
    proxy.plan_next(Fault::TruncateRecordAfter(MID_RESULT));
    psql_cut_off(keyhole.port(), BIG_RESULT, &keyhole);
    proxy
        .connection(index)
        .wait_phase(Phase::Truncated, PATIENCE);

    still_answers(&rt, &bystander, "after the cut record");
    wait_outcomes(|| keyhole.logs(), http, &[("upstream_truncated", 1)]);
    memory.assert_bounded("after the cut record");
}

/// The address keyhole dials answers, on the next connection, with another
/// server whose certificate comes from a CA keyhole does not trust (a
/// rotation done wrong, or someone else). The new client gets keyhole's
/// FATAL 08001 naming the CA problem; the session opened before goes on; a
/// keyhole that trusts the new CA too (the rotation done right) accepts it.
#[test]
fn a_rotated_certificate_is_checked_on_the_next_connection() {
    let old = PgCluster::shared();
    let new = second_cluster();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(old, &[]);
    let scratch = support::scratch_dir("keyhole-faults-bundle-");
    let bundle = scratch.path().join("both-cas.pem");
    let mut pem = fs::read(&old.pki.ca).expect("read the old CA");
    pem.extend(fs::read(&new.pki.ca).expect("read the new CA"));
    fs::write(&bundle, pem).expect("write the CA bundle");
    let (rotated, rotated_http) = keyhole_for(proxy.port(), &bundle, &[]);
    let rt = support::runtime();
    let port_sql = "select current_setting('port')";

    let (before, _before_task) = connect(&rt, keyhole.port(), "faults_rotation_before");
    assert_eq!(
        simple_query(&rt, &before, port_sql).expect("the old server answers"),
        [old.port.to_string()]
    );

    proxy.set_upstream(pg_addr(new));
    let expected = "upstream certificate for localhost is not signed by a trusted CA \
                    (check --ca-file / ca-file=)";
    let (severity, code, message) = refusal(&rt, keyhole.port());
    assert_eq!(
        (severity.as_str(), code.as_str(), message.as_str()),
        ("FATAL", "08001", expected)
    );
    let out = clients::psql(keyhole.port(), SCRAM_USER, Some(SCRAM_PASS), "select 1");
    let stderr = clients::stderr(&out);
    assert!(
        !out.status.success() && stderr.contains(&format!("FATAL:  {expected}")),
        "psql through keyhole to the stranger:\n{stderr}"
    );
    assert_eq!(
        simple_query(&rt, &before, port_sql).expect("the old session goes on"),
        [old.port.to_string()]
    );

    // Trusting both CAs, the new server is accepted.
    assert_eq!(psql_ok(rotated.port(), port_sql), new.port.to_string());
    // Back to the old server: the first keyhole accepts it again.
    proxy.set_upstream(pg_addr(old));
    assert_eq!(psql_ok(keyhole.port(), port_sql), old.port.to_string());

    wait_outcomes(
        || keyhole.logs(),
        http,
        &[("upstream_tls", 2), ("client_closed", 1)],
    );
    wait_outcomes(|| rotated.logs(), rotated_http, &[("client_closed", 1)]);
}

/// A server that accepts TCP and then says nothing: not to keyhole's
/// SSLRequest, and (another connection) not to its TLS hello after the
/// `S`. Each client gets keyhole's FATAL 08001 after `--connect-timeout`;
/// the silent peer received the SSLRequest and nothing else (no startup
/// packet, no user name); the bystander goes on; `upstream_timeout`.
#[test]
fn a_server_that_never_answers_is_given_up_after_the_connect_timeout() {
    let pg = PgCluster::shared();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(pg, &["--connect-timeout", "1s"]);
    let rt = support::runtime();
    let (bystander, _bystander_task) = connect(&rt, keyhole.port(), "faults_silent_bystander");
    let expected = format!(
        "TLS setup with 127.0.0.1:{} timed out after 1s",
        proxy.port()
    );

    let silent = proxy.connections();
    proxy.plan_next(Fault::Silent);
    let (severity, code, message) = refusal(&rt, keyhole.port());
    assert_eq!(
        (severity.as_str(), code.as_str(), message.as_str()),
        ("FATAL", "08001", expected.as_str()),
        "a silent server"
    );
    assert_eq!(
        proxy.connection(silent).client_to_server(),
        wire::SSL_REQUEST.len() as u64,
        "the silent server should have received the SSLRequest and nothing else"
    );

    // 'S', then silence where the ServerHello belongs.
    let hello = proxy.connections();
    proxy.plan_next(Fault::StallAfter(1));
    let out = clients::psql(keyhole.port(), SCRAM_USER, Some(SCRAM_PASS), "select 1");
    let stderr = clients::stderr(&out);
    assert!(
        !out.status.success() && stderr.contains(&format!("FATAL:  {expected}")),
        "psql through keyhole to a server that never answers the TLS hello:\n{stderr}"
    );
    let stalled = proxy.connection(hello);
    stalled.wait_phase(Phase::Stalled, PATIENCE);
    assert_eq!(stalled.server_to_client(), 1, "only the S went to keyhole");

    still_answers(&rt, &bystander, "after two silent servers");
    wait_outcomes(|| keyhole.logs(), http, &[("upstream_timeout", 2)]);
}

/// A server that answers one byte at a time. After the login, a client gets
/// exactly the data it asked for, only slowly. During the login, the whole
/// exchange has one deadline (`--startup-timeout`): a client gets keyhole's
/// FATAL 08006 when it passes (`upstream_timeout`), however steadily the
/// bytes come.
#[test]
fn a_server_answering_byte_by_byte() {
    let pg = PgCluster::shared();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(pg, &["--startup-timeout", "1s", "--connect-timeout", "60s"]);
    let rt = support::runtime();
    let (bystander, _bystander_task) = connect(&rt, keyhole.port(), "faults_trickle_bystander");
    let memory = Memory::baseline(&keyhole);

    // The data phase: slow, whole.
    let index = proxy.connections();
    let (slow, _slow_task) = connect(&rt, keyhole.port(), "faults_trickle_data");
    proxy
        .connection(index)
        .set(Fault::Trickle(Duration::from_millis(1)));
    let rows = simple_query(&rt, &slow, "select repeat('x', 1000) || 'end'")
        .expect("a trickling server's answer arrives");
    assert_eq!(rows, [format!("{}end", "x".repeat(1000))]);
    still_answers(&rt, &bystander, "while another session trickles");

    // The login: the handshake (~1.5 KiB at 3 ms a byte) fits in the 60 s
    // connect timeout, the authentication that follows (hundreds of bytes)
    // not in the 1 s startup timeout.
    proxy.plan_next(Fault::Trickle(Duration::from_millis(3)));
    let (severity, code, message) = refusal(&rt, keyhole.port());
    assert_eq!(
        (severity.as_str(), code.as_str(), message.as_str()),
        (
            "FATAL",
            "08006",
            "the server did not finish authentication within 1s (--startup-timeout)"
        )
    );

    still_answers(&rt, &bystander, "after a trickling login");
    drop(slow);
    wait_outcomes(
        || keyhole.logs(),
        http,
        &[("upstream_timeout", 1), ("client_closed", 1)],
    );
    memory.assert_peak_bounded("after trickling servers");
}

/// keyhole in a private mount namespace (`unshare --mount`) whose
/// /etc/hosts is a file of the test's: the host's own file is not touched,
/// and every other process resolves as before. keyhole resolves its target
/// at every dial, through the C library, which reads the file each time.
struct HostsKeyhole {
    child: Child,
    port: u16,
    http: u16,
    hosts: PathBuf,
    log: PathBuf,
    _scratch: tempfile::TempDir,
    watchdog: Watchdog,
}

impl HostsKeyhole {
    /// Starts keyhole with `args` (and its own `--port`, `--prometheus`,
    /// `--http-port`) seeing `hosts` as /etc/hosts. `None`, after a loud
    /// SKIPPED message, where a mount namespace cannot be made (not root,
    /// no `unshare`).
    fn start(hosts: &[(&str, &str)], args: &[&str]) -> Option<HostsKeyhole> {
        let scratch = support::scratch_dir("keyhole-faults-hosts-");
        let hosts_path = scratch.path().join("hosts");
        write_hosts(&hosts_path, hosts);
        let Some(unshare) = support::netns::find_program("unshare") else {
            skip("unshare (util-linux) is not installed");
            return None;
        };
        let mut probe = Command::new(&unshare);
        probe
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && grep -q keyhole-faults /etc/hosts"#)
            .arg("sh")
            .arg(&hosts_path);
        let out = output_with_timeout(&mut probe, Duration::from_secs(30));
        if !out.status.success() {
            skip(&format!(
                "a private /etc/hosts needs a mount namespace (root): {}",
                describe_output(&out)
            ));
            return None;
        }

        let log = scratch.path().join("keyhole.log");
        let log_file = File::create(&log).expect("create the keyhole log");
        let log_err = log_file.try_clone().expect("clone the log handle");
        let port = support::free_port();
        let http = support::free_port();
        let mut cmd = Command::new(&unshare);
        clean_env(&mut cmd);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KEYHOLE_") {
                cmd.env_remove(&key);
            }
        }
        // unshare and sh exec: the child's PID is keyhole's.
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#)
            .arg("sh")
            .arg(&hosts_path)
            .arg(env!("CARGO_BIN_EXE_keyhole"))
            .args(["--port", &port.to_string()])
            .args(["--prometheus", "--http-port", &http.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
        let pid = child.id().to_string();
        let watchdog = Watchdog::spawn(
            "a keyhole process",
            r#"kill -KILL "$1" 2>/dev/null"#,
            &[OsStr::new(&pid)],
            false,
        );
        let deadline = Instant::now() + PATIENCE;
        while !listens_tcp(child.id(), port) {
            let logs = fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.try_wait().expect("poll keyhole") {
                panic!("keyhole exited ({status}) before listening:\n{logs}");
            }
            assert!(
                Instant::now() < deadline,
                "keyhole does not listen on {port}:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(HostsKeyhole {
            child,
            port,
            http,
            hosts: hosts_path,
            log,
            _scratch: scratch,
            watchdog,
        })
    }

    /// keyhole's /etc/hosts from now on (rewritten in place: the bind mount
    /// holds the file, not its name).
    fn set_hosts(&self, hosts: &[(&str, &str)]) {
        write_hosts(&self.hosts, hosts);
    }

    fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HostsKeyhole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        self.watchdog.fire();
        let _ = self.child.wait();
    }
}

fn write_hosts(path: &Path, entries: &[(&str, &str)]) {
    let mut text = String::from("# keyhole-faults\n127.0.0.1 localhost\n::1 localhost\n");
    for (name, addr) in entries {
        text.push_str(&format!("{addr} {name}\n"));
    }
    let mut file = File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Says loudly, past the test harness's capture, that a test did not run.
fn skip(why: &str) {
    let rule = "=".repeat(78);
    let _ = std::io::stderr().lock().write_all(
        format!(
            "\n{rule}\nSKIPPED: {why}\n(run the tests as root on Linux to run this one)\n{rule}\n"
        )
        .as_bytes(),
    );
}

/// The target's name moves between connections: `db.internal` first at
/// 127.0.0.2 (a relay to one server), then at 127.0.0.3 (to another, its
/// certificate from another CA, both in keyhole's bundle), then at 127.0.0.4
/// where nothing listens, then back. Each new connection goes where the name
/// points at its dial; a session keeps the server it was opened with; the
/// dead address is keyhole's FATAL 08001 (`upstream_connect`).
#[test]
fn a_dns_answer_that_changes_between_connections_is_followed() {
    let first = PgCluster::shared();
    let second = second_cluster();
    // Two relays on one port, at two loopback addresses.
    let (at_2, at_3) = (0..5)
        .find_map(|_| {
            let at_2 = FaultProxy::start_on(
                "127.0.0.2:0".parse().expect("address"),
                pg_addr(first),
                Preamble::Postgres,
            )
            .ok()?;
            let at_3 = FaultProxy::start_on(
                SocketAddr::from(([127, 0, 0, 3], at_2.port())),
                pg_addr(second),
                Preamble::Postgres,
            )
            .ok()?;
            Some((at_2, at_3))
        })
        .expect("one port free on both 127.0.0.2 and 127.0.0.3");
    let port = at_2.port();
    let scratch = support::scratch_dir("keyhole-faults-bundle-");
    let bundle = scratch.path().join("both-cas.pem");
    let mut pem = fs::read(&first.pki.ca).expect("read a CA");
    pem.extend(fs::read(&second.pki.ca).expect("read a CA"));
    fs::write(&bundle, pem).expect("write the CA bundle");
    let target = format!("postgres://db.internal:{port}");
    let Some(keyhole) = HostsKeyhole::start(
        &[("db.internal", "127.0.0.2")],
        &["--ca-file", path_arg(&bundle), &target],
    ) else {
        return;
    };
    let rt = support::runtime();
    let port_sql = "select current_setting('port')";

    let (pinned, _pinned_task) = connect(&rt, keyhole.port, "faults_dns_pinned");
    assert_eq!(
        simple_query(&rt, &pinned, port_sql).expect("the first server answers"),
        [first.port.to_string()]
    );

    keyhole.set_hosts(&[("db.internal", "127.0.0.3")]);
    assert_eq!(psql_ok(keyhole.port, port_sql), second.port.to_string());
    assert_eq!(
        simple_query(&rt, &pinned, port_sql).expect("the open session stays"),
        [first.port.to_string()],
        "a session keeps the server it was opened with"
    );

    keyhole.set_hosts(&[("db.internal", "127.0.0.4")]);
    let (severity, code, message) = refusal(&rt, keyhole.port);
    assert_eq!(
        (severity.as_str(), code.as_str(), message.as_str()),
        (
            "FATAL",
            "08001",
            format!(
                "connection to 127.0.0.4:{port} refused (is the database running and reachable?)"
            )
            .as_str()
        )
    );

    keyhole.set_hosts(&[("db.internal", "127.0.0.2")]);
    assert_eq!(psql_ok(keyhole.port, port_sql), first.port.to_string());
    still_answers(&rt, &pinned, "after the name moved three times");

    assert_eq!(
        at_2.connections(),
        2,
        "the pinned session and the last psql"
    );
    assert_eq!(
        at_3.connections(),
        1,
        "the psql while the name pointed there"
    );
    wait_outcomes(
        || keyhole.logs(),
        keyhole.http,
        &[("client_closed", 2), ("upstream_connect", 1)],
    );
}

// ---------------------------------------------------------------------------
// Client faults
// ---------------------------------------------------------------------------

/// Raises this process's open-file limit (keyhole inherits it) to `want`,
/// or as far as the hard limit allows.
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// How many slowloris connections.
const SLOWLORIS: usize = 1500;

/// Slowloris: many connections that each send their startup packet one
/// byte a second. keyhole ends every one at `--startup-timeout` with FATAL
/// 08P01 (`startup_timeout`), without dialling the server for any of them,
/// a normal client gets through in the middle of it, and memory stays
/// bounded.
#[test]
fn slowloris_clients_are_cut_at_the_startup_timeout() {
    raise_fd_limit(8 * SLOWLORIS as u64);
    let pg = PgCluster::shared();
    let Rig {
        proxy,
        keyhole,
        http,
    } = rig(pg, &["--startup-timeout", "3s"]);
    let memory = Memory::baseline(&keyhole);
    let rt = support::runtime();
    let addr = SocketAddr::from(([127, 0, 0, 1], keyhole.port()));
    let startup = Arc::new(wire::startup_packet(
        196_608,
        &[("user", TRUST_USER), ("database", "postgres")],
    ));
    let connected = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..SLOWLORIS)
        .map(|_| {
            let (startup, connected) = (startup.clone(), connected.clone());
            rt.spawn(async move {
                let mut socket = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                connected.fetch_add(1, Ordering::SeqCst);
                let mut received = Vec::new();
                let mut sent = 0;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut buf = [0u8; 1024];
                let ended = tokio::time::timeout(PATIENCE, async {
                    loop {
                        tokio::select! {
                            _ = tick.tick(), if sent < startup.len() => {
                                // Once keyhole has hung up, a write may fail.
                                let _ = socket.write_all(&startup[sent..=sent]).await;
                                sent += 1;
                            }
                            read = socket.read(&mut buf) => match read {
                                Ok(0) | Err(_) => break,
                                Ok(n) => received.extend_from_slice(&buf[..n]),
                            },
                        }
                    }
                })
                .await;
                ended.map_err(|_| "keyhole never hung up".to_owned())?;
                Ok::<Vec<u8>, String>(received)
            })
        })
        .collect();
    wait_until(
        &format!("{SLOWLORIS} slowloris connections are open"),
        PATIENCE,
        || connected.load(Ordering::SeqCst) == SLOWLORIS,
        || format!("keyhole log tail:\n{}", tail(&keyhole.logs(), 20)),
    );
    // A normal client in the middle of it.
    assert_eq!(psql_ok(keyhole.port(), "select 'through'"), "through");
    memory.assert_bounded("with the slowloris connections open");

    for (i, client) in clients.into_iter().enumerate() {
        let received = rt
            .block_on(client)
            .expect("the slowloris task does not panic")
            .unwrap_or_else(|e| panic!("slowloris connection {i}: {e}"));
        let (tag, body) = wire::read_message(&mut Cursor::new(&received));
        assert_eq!(
            (
                char::from(tag),
                wire::error_field(&body, 'S'),
                wire::error_field(&body, 'C'),
                wire::error_field(&body, 'M')
            ),
            (
                'E',
                "FATAL".to_owned(),
                "08P01".to_owned(),
                "client sent no startup packet within 3s (--startup-timeout)".to_owned()
            ),
            "slowloris connection {i}"
        );
    }
    assert_eq!(
        proxy.connections(),
        1,
        "only the normal client reached the server"
    );
    wait_outcomes(
        || tail(&keyhole.logs(), 20),
        http,
        &[("startup_timeout", SLOWLORIS as u64), ("client_closed", 1)],
    );
    assert!(
        !keyhole.logs().contains("panicked"),
        "keyhole panicked under slowloris:\n{}",
        keyhole.logs()
    );
    memory.assert_peak_bounded("after the slowloris connections");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A client asks for a large result and stops reading. keyhole stops
/// reading the server in turn (the server waits in ClientWrite) instead of
/// buffering the result: its memory stays bounded, and other sessions go
/// on. When the client then goes, its statement is cancelled
/// (`client_gone_cancelled`) and the server backend ends.
#[test]
fn a_client_that_stops_reading_holds_back_the_server_not_keyholes_memory() {
    let pg = PgCluster::shared();
    let http = support::free_port();
    let http_arg = http.to_string();
    let keyhole = Keyhole::for_cluster(pg, &["--prometheus", "--http-port", &http_arg]);
    let rt = support::runtime();
    let (bystander, _bystander_task) =
        connect(&rt, keyhole.port(), "faults_backpressure_bystander");
    let memory = Memory::baseline(&keyhole);

    let app = "faults_backpressure";
    let mut reader = raw_session(keyhole.port(), app);
    // The server itself would notice the client's end only between rows
    // it can send; keyhole's cancel is what must end the statement.
    raw_query(&mut reader, "set client_connection_check_interval = 0");
    reader
        .write_all(&wire::simple_query(HUGE_RESULT))
        .expect("send the query");
    wait_until(
        "the server waits for keyhole to take its result (ClientWrite)",
        PATIENCE,
        || backends(pg, app, Some("ClientWrite")) == 1,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    memory.assert_bounded("while the client does not read");
    still_answers(&rt, &bystander, "while another client does not read");
    assert_eq!(psql_ok(keyhole.port(), "select 'through'"), "through");
    memory.assert_bounded("while the client still does not read");
    assert_eq!(
        backends(pg, app, Some("ClientWrite")),
        1,
        "the server is still held back"
    );

    // Closing with unread bytes resets the connection.
    drop(reader);
    wait_until(
        "the server backend of the client that went is gone",
        PATIENCE,
        || backends(pg, app, None) == 0,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    still_answers(&rt, &bystander, "after the client went");
    wait_outcomes(
        || keyhole.logs(),
        http,
        &[("client_gone_cancelled", 1), ("client_closed", 1)],
    );
    memory.assert_peak_bounded("after the client that did not read");
}

/// Clients that reset their connection: one idle between statements
/// (`client_reset`: the server ends its session at keyhole's close), one in
/// the middle of a large result (`client_gone_cancelled`: its statement is
/// cancelled). The bystander goes on.
#[test]
fn client_resets_end_only_their_own_sessions() {
    let pg = PgCluster::shared();
    let http = support::free_port();
    let http_arg = http.to_string();
    let keyhole = Keyhole::for_cluster(pg, &["--prometheus", "--http-port", &http_arg]);
    let rt = support::runtime();
    let (bystander, _bystander_task) = connect(&rt, keyhole.port(), "faults_rst_bystander");
    let memory = Memory::baseline(&keyhole);

    let idle_app = "faults_rst_idle";
    let mut idle = raw_session(keyhole.port(), idle_app);
    raw_query(&mut idle, "select 1");
    reset(idle);
    wait_outcomes(|| keyhole.logs(), http, &[("client_reset", 1)]);
    wait_until(
        "the reset idle session's backend is gone",
        PATIENCE,
        || backends(pg, idle_app, None) == 0,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    still_answers(&rt, &bystander, "after an idle client's reset");

    let busy_app = "faults_rst_busy";
    let mut busy = raw_session(keyhole.port(), busy_app);
    raw_query(&mut busy, "set client_connection_check_interval = 0");
    busy.write_all(&wire::simple_query(HUGE_RESULT))
        .expect("send the query");
    let mut taken = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while taken < 1024 * 1024 {
        let n = busy.read(&mut buf).expect("read the result");
        assert!(n > 0, "keyhole ended the result early");
        taken += n;
    }
    reset(busy);
    wait_until(
        "the reset busy session's backend is gone",
        PATIENCE,
        || backends(pg, busy_app, None) == 0,
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    still_answers(&rt, &bystander, "after a busy client's reset");
    wait_outcomes(
        || keyhole.logs(),
        http,
        &[("client_reset", 1), ("client_gone_cancelled", 1)],
    );
    let closed = closed_line(&keyhole, "client_gone_cancelled");
    assert!(
        field(&closed, "error").starts_with("the client went away while the server was still busy"),
        "{closed:?}"
    );
    memory.assert_peak_bounded("after two client resets");
}

// ---------------------------------------------------------------------------
// MySQL
// ---------------------------------------------------------------------------

fn mysql_connect(rt: &Runtime, port: u16) -> mysql_async::Conn {
    rt.block_on(async {
        tokio::time::timeout(
            PATIENCE,
            mysql_async::Conn::new(mariadb::native_driver_opts(port)),
        )
        .await
    })
    .expect("mysql_async connects in time")
    .expect("mysql_async connects through keyhole")
}

fn mysql_query(rt: &Runtime, conn: &mut mysql_async::Conn, sql: &str) -> Result<String, String> {
    rt.block_on(async { tokio::time::timeout(PATIENCE, conn.query_first::<String, _>(sql)).await })
        .map_err(|_| format!("`{sql}` got no answer within {PATIENCE:?}"))?
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}

/// MySQL sessions whose server half-closes (FIN without close_notify) or
/// resets in the middle of a 10 MB row: the driver reports the lost
/// connection, the bystander goes on, and the outcomes are
/// `upstream_truncated` and `upstream_io`.
#[test]
fn mysql_upstream_half_close_and_reset_mid_result() {
    let db = MariaDb::shared();
    let proxy = FaultProxy::start(
        SocketAddr::from(([127, 0, 0, 1], db.port())),
        Preamble::Mysql,
    );
    let http = support::free_port();
    let http_arg = http.to_string();
    let target = format!("mysql://127.0.0.1:{}?server-name=localhost", proxy.port());
    let keyhole = Keyhole::start(&[
        "--prometheus",
        "--http-port",
        &http_arg,
        "--ca-file",
        path_arg(&db.pki().ca),
        &target,
    ]);
    let rt = support::runtime();
    let mut bystander = mysql_connect(&rt, keyhole.port());
    assert_eq!(
        mysql_query(&rt, &mut bystander, "select 'here'"),
        Ok("here".into())
    );
    let memory = Memory::baseline(&keyhole);
    let big = "select repeat('x', 10000000)";

    for (fault, phase) in [
        (Fault::HalfCloseAfter(MID_RESULT), Phase::HalfClosed),
        (Fault::ResetAfter(MID_RESULT), Phase::Reset),
    ] {
        let index = proxy.connections();
        let mut victim = mysql_connect(&rt, keyhole.port());
        proxy.connection(index).set(fault);
        let err = mysql_query(&rt, &mut victim, big)
            .expect_err("a session whose server went cannot answer");
        assert!(
            err.contains("bytes remaining on stream"),
            "mysql_async should report the lost connection ({fault:?}), got: {err}"
        );
        proxy.connection(index).wait_phase(phase, PATIENCE);
        let _ = rt.block_on(victim.disconnect());
        assert_eq!(
            mysql_query(&rt, &mut bystander, "select 'still here'"),
            Ok("still here".into()),
            "the bystander after {fault:?}"
        );
    }
    wait_outcomes(
        || keyhole.logs(),
        http,
        &[("upstream_truncated", 1), ("upstream_io", 1)],
    );
    memory.assert_bounded("after two MySQL upstream faults");
    let _ = rt.block_on(bystander.disconnect());
}
