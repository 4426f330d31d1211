//! The upstream leg through the real `keyhole` binary: what a client sees when
//! the server cannot be trusted (another CA, another name), refuses TLS, is not
//! a database at all, or wants a client certificate; several targets in one
//! process; the Unix socket listener.
//!
//! Every refusal is checked twice, as a person and as a program meet it: psql's
//! `FATAL:  <message>` on stderr, and the ErrorResponse fields (severity,
//! SQLSTATE, message) that tokio-postgres hands to an application.

mod support;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use support::certs::TestPki;
use support::clients;
use support::keyhole::{self as kh, Keyhole, Ready};
use support::postgres::{PgCluster, PgOptions, SCRAM_PASS, SCRAM_USER};

/// SQLSTATE 08001, sqlclient_unable_to_establish_sqlconnection: what keyhole
/// answers when it cannot reach the server safely.
const UNABLE_TO_CONNECT: &str = "08001";
/// SQLSTATE 28000, invalid_authorization_specification: the server's own
/// answer to a connection without the client certificate its pg_hba.conf wants.
const INVALID_AUTHORIZATION: &str = "28000";

/// SSLRequest as the protocol defines it: length 8, code 1234 << 16 | 5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The CN of every `TestPki` client certificate; the role that logs in with it.
const CERT_USER: &str = "keyhole-client";

/// Whether this connection to the server is encrypted, as the server sees it.
const SSL_SQL: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

/// A path as a target URL parameter value (percent-encoded where it must be).
fn url_path(path: &Path) -> String {
    let text = path.to_str().expect("test paths are UTF-8");
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `sql` as scram_user through keyhole's `port`; its trimmed output.
fn query(port: u16, sql: &str) -> String {
    let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), sql);
    clients::expect_success(&out, &format!("psql through keyhole port {port}"))
}

/// How keyhole turned two clients away.
struct Refusal {
    /// The ErrorResponse's message, as tokio-postgres reports it.
    message: String,
    /// Everything psql printed on stderr.
    psql: String,
}

/// Connects through keyhole's `port` with psql and with tokio-postgres, both
/// of which must be turned away with a FATAL ErrorResponse carrying
/// `sqlstate`; psql must print the same message.
fn refusal(rt: &Runtime, port: u16, user: &str, password: Option<&str>, sqlstate: &str) -> Refusal {
    let out = clients::psql(port, user, password, "select 1");
    let psql_stderr = clients::stderr(&out);
    assert!(
        !out.status.success(),
        "psql as {user} through keyhole port {port} was expected to fail, but printed: {}",
        clients::stdout(&out)
    );

    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname("postgres");
    if let Some(password) = password {
        config.password(password);
    }
    // A guard against a hang, not a timing assertion.
    let attempt = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), config.connect(NoTls)).await
    });
    let err = match attempt {
        Err(_) => panic!("tokio-postgres through keyhole port {port} hung"),
        Ok(Ok(_)) => panic!("tokio-postgres as {user} through keyhole port {port} connected"),
        Ok(Err(err)) => err,
    };
    let db = err.as_db_error().unwrap_or_else(|| {
        panic!("expected an ErrorResponse through keyhole port {port}, got: {err}")
    });
    assert_eq!(db.severity(), "FATAL", "severity of: {}", db.message());
    assert_eq!(db.code().code(), sqlstate, "SQLSTATE of: {}", db.message());
    let printed = format!("FATAL:  {}", db.message());
    assert!(
        psql_stderr.contains(&printed),
        "psql should print {printed:?}; its stderr:\n{psql_stderr}"
    );
    Refusal {
        message: db.message().to_owned(),
        psql: psql_stderr,
    }
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_in_both_tls_modes() {
    let pg = PgCluster::shared();
    let stranger = TestPki::generate(&["localhost"]);
    let target = format!("postgres://127.0.0.1:{}", pg.port);
    let chain_only = format!("{target}?tls-mode=verify-ca");
    let keyhole = Keyhole::start(&["--ca-file", path_arg(&stranger.ca), &target, &chain_only]);
    let rt = support::runtime();

    // verify-ca skips the name, never the chain.
    for port in [keyhole.port(), keyhole.port() + 1] {
        let refused = refusal(&rt, port, SCRAM_USER, Some(SCRAM_PASS), UNABLE_TO_CONNECT);
        assert_eq!(
            refused.message,
            "upstream certificate for 127.0.0.1 is not signed by a trusted CA (check --ca-file / ca-file=)",
            "keyhole port {port}"
        );
    }
}

#[test]
fn the_server_name_is_verified_unless_tls_mode_is_verify_ca() {
    let pg = PgCluster::shared();
    let target = format!("postgres://127.0.0.1:{}", pg.port);
    let wrong = format!("{target}?server-name=wrong.example");
    let wrong_chain_only = format!("{target}?server-name=wrong.example&tls-mode=verify-ca");
    // The tunnel case: dial one address, verify another name the certificate carries.
    let tunnel = format!("{target}?server-name=db.internal");
    let keyhole = Keyhole::start(&[
        "--ca-file",
        path_arg(&pg.pki.ca),
        &wrong,
        &wrong_chain_only,
        &tunnel,
    ]);
    let rt = support::runtime();
    let base = keyhole.port();

    let refused = refusal(&rt, base, SCRAM_USER, Some(SCRAM_PASS), UNABLE_TO_CONNECT);
    assert_eq!(
        refused.message,
        "upstream certificate not valid for wrong.example (set server-name= to the name the certificate carries)"
    );

    assert_eq!(query(base + 1, SSL_SQL), "t", "verify-ca with a wrong name");
    assert_eq!(query(base + 2, SSL_SQL), "t", "server-name=db.internal");
}

#[test]
fn a_server_without_tls_is_refused_and_sees_no_startup_packet() {
    let pg = PgCluster::start(PgOptions {
        ssl: false,
        ..PgOptions::default()
    });
    let target = format!("postgres://127.0.0.1:{}", pg.port);
    let keyhole = Keyhole::start(&["--ca-file", path_arg(&pg.pki.ca), &target]);
    let rt = support::runtime();
    let log_before = pg.logs().len();

    let refused = refusal(
        &rt,
        keyhole.port(),
        SCRAM_USER,
        Some(SCRAM_PASS),
        UNABLE_TO_CONNECT,
    );
    assert_eq!(
        refused.message,
        format!(
            "upstream refused TLS: 127.0.0.1:{} does not accept encrypted connections, \
             and keyhole never falls back to plaintext",
            pg.port
        )
    );

    // The server logs "connection received" before it reads anything, so
    // keyhole's two attempts are in the log by the time it answered 'N'; a
    // startup packet would have logged the user (and, with this server's
    // plain `host` rules, a "connection authorized" line).
    let log = pg.logs();
    let new = log.get(log_before..).unwrap_or(&log);
    assert!(
        new.matches("connection received: host=127.0.0.1").count() >= 2,
        "keyhole's attempts should show in the server log:\n{new}"
    );
    assert!(
        !new.contains("connection authorized") && !new.contains(SCRAM_USER),
        "a startup packet reached the server without TLS:\n{new}"
    );

    // The control: this server does let scram_user in over plaintext, and
    // says so in its log, so the absence above means something.
    let conninfo = format!(
        "host=127.0.0.1 port={} user={SCRAM_USER} dbname=postgres sslmode=disable",
        pg.port
    );
    let direct = clients::psql_conninfo(&conninfo, Some(SCRAM_PASS), SSL_SQL);
    assert_eq!(clients::expect_success(&direct, "plaintext psql"), "f");
    let log = pg.logs();
    assert!(
        log.contains(&format!("connection authorized: user={SCRAM_USER}")),
        "the server log should record a plaintext login:\n{log}"
    );
}

/// How a byte-level peer answers keyhole's SSLRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    /// 'E' and an ErrorResponse, as a pre-TLS server error would be.
    ErrorText,
    /// 'S' with more bytes in the same write (CVE-2021-23222).
    DataAfterS,
    /// Nothing at all; the connection stays open.
    Silent,
}

/// Text the `ErrorText` peer sends; keyhole must never show it (CVE-2024-10977).
const PEER_TEXT: &str = "peer-controlled text: visit evil.example to fix your database";

/// Listens on a fresh port on `rt`. Every connection reads the SSLRequest,
/// answers as `kind` says, keeps reading until keyhole hangs up, and reports
/// every byte it received.
fn spawn_peer(
    rt: &Runtime,
    kind: Misbehaviour,
    report: mpsc::UnboundedSender<(Misbehaviour, Vec<u8>)>,
) -> u16 {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind a peer on 127.0.0.1");
    let port = listener.local_addr().expect("peer address").port();
    rt.spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let mut received = Vec::new();
                while received.len() < SSL_REQUEST.len() {
                    match socket.read_buf(&mut received).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let answer = match kind {
                    Misbehaviour::ErrorText => {
                        let mut fields = Vec::new();
                        for (code, value) in [(b'S', "FATAL"), (b'C', "28000"), (b'M', PEER_TEXT)] {
                            fields.push(code);
                            fields.extend_from_slice(value.as_bytes());
                            fields.push(0);
                        }
                        fields.push(0);
                        let length = u32::try_from(fields.len() + 4).expect("short message");
                        let mut message = vec![b'E'];
                        message.extend_from_slice(&length.to_be_bytes());
                        message.extend_from_slice(&fields);
                        message
                    }
                    Misbehaviour::DataAfterS => b"S\x16\x03\x01injected".to_vec(),
                    Misbehaviour::Silent => Vec::new(),
                };
                if !answer.is_empty() {
                    let _ = socket.write_all(&answer).await;
                }
                // Until keyhole closes (a reset, with our answer unread, is fine).
                let _ = socket.read_to_end(&mut received).await;
                let _ = report.send((kind, received));
            });
        }
    });
    port
}

#[test]
fn misbehaving_peers_are_refused_and_keyhole_keeps_serving() {
    let pg = PgCluster::shared();
    let rt = support::runtime();
    let (report, mut reports) = mpsc::unbounded_channel();
    let kinds = [
        Misbehaviour::ErrorText,
        Misbehaviour::DataAfterS,
        Misbehaviour::Silent,
    ];
    let peer_ports: Vec<u16> = kinds
        .iter()
        .map(|&kind| spawn_peer(&rt, kind, report.clone()))
        .collect();
    // Free a moment ago and never handed out again in this process: nothing listens.
    let closed_port = support::free_port();

    let mut args: Vec<String> = ["--connect-timeout", "1s", "--ca-file"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(path_arg(&pg.pki.ca).to_owned());
    for port in peer_ports.iter().chain([&closed_port]) {
        args.push(format!("postgres://127.0.0.1:{port}"));
    }
    args.push(pg.keyhole_target());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let keyhole = Keyhole::start(&args);
    let base = keyhole.port();
    let good = base + 4;
    assert_eq!(
        query(good, SSL_SQL),
        "t",
        "the real cluster, before any peer"
    );

    let expected = [
        format!(
            "127.0.0.1:{} answered the TLS request with byte 0x45: not a database server that speaks TLS",
            peer_ports[0]
        ),
        format!(
            "127.0.0.1:{} sent data before the TLS handshake (possible man-in-the-middle); connection refused",
            peer_ports[1]
        ),
        format!("TLS setup with 127.0.0.1:{} timed out after 1s", peer_ports[2]),
        format!(
            "connection to 127.0.0.1:{closed_port} refused (is the database running and reachable?)"
        ),
    ];
    for (index, expected) in expected.iter().enumerate() {
        let port = base + u16::try_from(index).expect("small index");
        let refused = refusal(&rt, port, SCRAM_USER, Some(SCRAM_PASS), UNABLE_TO_CONNECT);
        assert_eq!(&refused.message, expected, "keyhole port {port}");
        assert!(
            !refused.psql.contains("evil.example"),
            "the peer's own text reached the client:\n{}",
            refused.psql
        );

        // Each of the two clients cost the peer one connection, on which it
        // must have received the SSLRequest and nothing else: no startup
        // packet, no user name.
        if let Some(&kind) = kinds.get(index) {
            let mut seen = 0;
            while seen < 2 {
                let next = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(60), reports.recv()).await
                });
                let (from, received) = next
                    .expect("a peer reports each connection once keyhole hangs up")
                    .expect("the peers are still running");
                assert_eq!(
                    received, SSL_REQUEST,
                    "the {from:?} peer should receive exactly one SSLRequest"
                );
                if from == kind {
                    seen += 1;
                }
            }
        }

        assert_eq!(
            query(good, SSL_SQL),
            "t",
            "the real cluster, after {expected}"
        );
    }

    while let Ok((from, received)) = reports.try_recv() {
        assert_eq!(
            received, SSL_REQUEST,
            "the {from:?} peer should receive exactly one SSLRequest"
        );
    }
}

/// A second TLS cluster (its own CA) on which the role `keyhole-client` may
/// log in only with a client certificate carrying that name; every other
/// user works as on the shared cluster.
fn cert_cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pg = PgCluster::start(PgOptions {
            extra_hba: vec![
                format!("hostssl all {CERT_USER} 127.0.0.1/32 cert"),
                format!("hostssl all {CERT_USER} ::1/128 cert"),
            ],
            ..PgOptions::default()
        });
        pg.admin_sql(&format!("CREATE ROLE \"{CERT_USER}\" LOGIN"));
        pg
    })
}

#[test]
fn a_server_that_requires_a_client_certificate() {
    let pg = cert_cluster();
    let target = format!("postgres://127.0.0.1:{}", pg.port);
    let ca = path_arg(&pg.pki.ca);
    let rt = support::runtime();

    let without = Keyhole::start(&["--ca-file", ca, &target]);
    let refused = refusal(&rt, without.port(), CERT_USER, None, INVALID_AUTHORIZATION);
    assert_eq!(
        refused.message,
        "connection requires a valid client certificate"
    );
    drop(without);

    // A certificate from a CA the server does not trust: TLS 1.3 servers
    // refuse it only after keyhole's side of the handshake is done, so the
    // alert arrives with the first bytes; it must still read as a TLS problem.
    let stranger = TestPki::generate(&["localhost"]);
    let untrusted = Keyhole::start(&[
        "--ca-file",
        ca,
        "--client-cert",
        path_arg(&stranger.client_cert),
        "--client-key",
        path_arg(&stranger.client_key),
        &target,
    ]);
    let refused = refusal(&rt, untrusted.port(), CERT_USER, None, UNABLE_TO_CONNECT);
    assert!(
        refused
            .message
            .starts_with("the server rejected keyhole's TLS handshake")
            && refused.message.contains(
                "--client-cert and --client-key are set and signed by a CA the server trusts"
            ),
        "{}",
        refused.message
    );
    drop(untrusted);

    let with = Keyhole::start(&[
        "--ca-file",
        ca,
        "--client-cert",
        path_arg(&pg.pki.client_cert),
        "--client-key",
        path_arg(&pg.pki.client_key),
        &target,
    ]);
    let out = clients::psql(
        with.port(),
        CERT_USER,
        None,
        "select current_user, client_dn from pg_stat_ssl where pid = pg_backend_pid()",
    );
    let row = clients::expect_success(&out, "psql with keyhole's client certificate");
    let (user, client_dn) = row.split_once('|').expect("two columns");
    assert_eq!(user, CERT_USER);
    assert!(
        client_dn.ends_with(&format!("/CN={CERT_USER}")),
        "the server saw the client certificate {client_dn:?}"
    );
}

#[test]
fn several_targets_in_one_process_listen_on_consecutive_ports() {
    let first = PgCluster::shared();
    let second = cert_cluster();
    // Each cluster has its own CA: per-target ca-file=.
    let targets: Vec<String> = [first, second]
        .iter()
        .map(|pg| {
            format!(
                "postgres://127.0.0.1:{}?server-name=localhost&ca-file={}",
                pg.port,
                url_path(&pg.pki.ca)
            )
        })
        .collect();
    let keyhole = Keyhole::start(&[&targets[0], &targets[1]]);
    let base = keyhole.port();

    for (port, pg) in [(base, first), (base + 1, second)] {
        assert_eq!(
            query(port, "select current_setting('port')"),
            pg.port.to_string(),
            "keyhole port {port}"
        );
    }
}

#[test]
fn the_unix_socket_listener_serves_and_is_removed_on_sigterm() {
    let pg = PgCluster::shared();
    let dir = support::scratch_dir("keyhole-sock-");
    let port = support::free_port();
    let socket = dir.path().join(format!(".s.PGSQL.{port}"));
    let port_arg = port.to_string();
    let target = pg.keyhole_target();
    let mut keyhole = Keyhole::spawn(
        &[
            "--port",
            &port_arg,
            "--unix-socket",
            path_arg(dir.path()),
            "--ca-file",
            path_arg(&pg.pki.ca),
            &target,
        ],
        &[],
        Ready::Unix(socket.clone()),
    );
    assert!(
        !kh::listens_tcp(keyhole.pid(), port),
        "--unix-socket listens instead of TCP, not as well"
    );

    let out = clients::psql_unix(
        dir.path(),
        port,
        SCRAM_USER,
        Some(SCRAM_PASS),
        "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert_eq!(
        clients::expect_success(&out, "psql over keyhole's Unix socket"),
        format!("{SCRAM_USER}|t")
    );

    keyhole.signal(libc::SIGTERM);
    let status = keyhole
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("keyhole still runs after SIGTERM:\n{}", keyhole.logs()));
    assert!(
        status.success(),
        "with no connection open, SIGTERM ends keyhole cleanly ({status}):\n{}",
        keyhole.logs()
    );
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "{} is still there after keyhole exited",
        socket.display()
    );
}

/// A fake Postgres server for `localhost` under `pki`: answers the
/// SSLRequest, completes TLS, reads the startup packet and then does what
/// `after_startup` does with the session. Returns its port.
fn fake_tls_server<F, Fut>(rt: &Runtime, pki: &TestPki, after_startup: F) -> u16
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = pki.tls_acceptor();
    let after_startup = std::sync::Arc::new(after_startup);
    support::serve_each(rt, move |mut socket| {
        let acceptor = acceptor.clone();
        let after_startup = after_startup.clone();
        async move {
            let mut request = [0u8; 8];
            if socket.read_exact(&mut request).await.is_err()
                || socket.write_all(b"S").await.is_err()
            {
                return;
            }
            let Ok(mut tls) = acceptor.accept(socket).await else {
                return;
            };
            let mut len = [0u8; 4];
            if tls.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut startup = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
            if tls.read_exact(&mut startup).await.is_err() {
                return;
            }
            after_startup(tls).await;
        }
    })
}

/// Starts keyhole with `--startup-timeout TIMEOUT` in front of a fake
/// server that does `after_startup`, and checks that psql and tokio-postgres
/// are told the login did not finish in time.
fn refused_at_the_login_deadline<F, Fut>(timeout: &str, after_startup: F)
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = support::runtime();
    let pki = TestPki::generate(&["localhost"]);
    let port = fake_tls_server(&rt, &pki, after_startup);
    let target = format!("postgres://127.0.0.1:{port}?server-name=localhost");
    let keyhole = Keyhole::start(&[
        "--ca-file",
        path_arg(&pki.ca),
        "--startup-timeout",
        timeout,
        &target,
    ]);
    let refused = refusal(&rt, keyhole.port(), SCRAM_USER, Some(SCRAM_PASS), "08006");
    assert_eq!(
        refused.message,
        format!("the server did not finish authentication within {timeout} (--startup-timeout)")
    );
    keyhole.wait_for_log("outcome=\"upstream_timeout\"", 2);
}

/// A server that completes TLS and then says nothing: the client is told so
/// after `--startup-timeout` instead of waiting forever.
#[test]
fn a_server_that_goes_quiet_after_tls_is_reported() {
    refused_at_the_login_deadline("1s", |mut tls| async move {
        // Never answer the startup packet.
        let mut sink = Vec::new();
        let _ = tls.read_to_end(&mut sink).await;
    });
}

/// A server (or anything on its path) that trickles ParameterStatus
/// messages forever, each well within the step timeout: the login as a
/// whole still ends at `--startup-timeout`.
#[test]
fn a_login_that_never_ends_is_cut_at_the_deadline() {
    refused_at_the_login_deadline("2s", |mut tls| async move {
        let status = b"S\0\0\0\x17application_name\0x\0";
        loop {
            if tls.write_all(status).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// 64 MiB of NoticeResponse before authentication: keyhole passes them on
/// as they arrive instead of holding them until ReadyForQuery, so its
/// memory does not grow with them, and the client gets every one before
/// the login's deadline error.
#[test]
fn login_notices_reach_the_client_as_they_come_and_keyhole_stays_small() {
    const NOTICES: usize = 8 * 1024;
    const TEXT: usize = 8 * 1024;
    let rt = support::runtime();
    let pki = TestPki::generate(&["localhost"]);
    let port = fake_tls_server(&rt, &pki, |mut tls| async move {
        let mut notice = b"N".to_vec();
        let body = [&b"SNOTICE\0C00000\0M"[..], &vec![b'n'; TEXT], &b"\0\0"[..]].concat();
        notice.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
        notice.extend_from_slice(&body);
        for _ in 0..NOTICES {
            if tls.write_all(&notice).await.is_err() {
                return;
            }
        }
        let _ = tls.flush().await;
        // Then nothing: no authentication, no ReadyForQuery.
        let mut sink = Vec::new();
        let _ = tls.read_to_end(&mut sink).await;
    });
    let target = format!("postgres://127.0.0.1:{port}?server-name=localhost");
    let keyhole = Keyhole::start(&[
        "--ca-file",
        path_arg(&pki.ca),
        "--startup-timeout",
        "8s",
        &target,
    ]);
    let before = peak_rss_kib(keyhole.pid());
    let (notices, error) = rt.block_on(async {
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", keyhole.port()))
            .await
            .expect("connect");
        let params = b"user\0app\0database\0app\0\0";
        let mut startup = (8 + params.len() as u32).to_be_bytes().to_vec();
        startup.extend_from_slice(&196608u32.to_be_bytes());
        startup.extend_from_slice(params);
        client.write_all(&startup).await.expect("startup");
        let mut notices = 0usize;
        loop {
            let mut header = [0u8; 5];
            client.read_exact(&mut header).await.expect("a message");
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            client.read_exact(&mut body).await.expect("its body");
            match header[0] {
                b'N' => notices += 1,
                b'E' => {
                    let text = body
                        .split(|&b| b == 0)
                        .find_map(|f| f.strip_prefix(b"M"))
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .unwrap_or_default();
                    return (notices, text);
                }
                other => panic!("unexpected message {:?}", char::from(other)),
            }
        }
    });
    assert_eq!(notices, NOTICES, "every notice reaches the client");
    assert_eq!(
        error,
        "the server did not finish authentication within 8s (--startup-timeout)"
    );
    let grew = peak_rss_kib(keyhole.pid()).saturating_sub(before);
    assert!(
        grew < 32 * 1024,
        "keyhole's peak memory grew by {grew} KiB while passing on 64 MiB of notices"
    );
}
