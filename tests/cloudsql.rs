//! The Cloud SQL connector through the real `keyhole` binary: instance
//! connection names as targets, the SQL Admin API (a fake written from its
//! contract, `support::cloudsql`) for settings and ephemeral certificates,
//! and the instance's server-side proxy on port 3307 (a fake that requires
//! the certificate the fake API signed, in front of the REAL PostgreSQL and
//! MariaDB the harness starts). Real clients: psql, the mariadb CLI,
//! tokio-postgres.
//!
//! keyhole runs with `RUST_LOG=debug`, and no log may hold a token.

// Tests the Cloud SQL connector: only in builds with the "gcp" feature.
#![cfg(feature = "gcp")]

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use support::clients;
use support::cloudsql::{
    self as fake, ApiMethod, CaMode, Failure, FakeSqlAdmin, InstanceSpec, DEFAULT_PROJECT,
};
use support::keyhole::{Keyhole, Ready};
use support::mariadb::{self, MariaDb, MariaDbOptions, NATIVE_PASS, NATIVE_USER};
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER};

/// One cluster for the file, reachable over its Unix socket by the fake proxy.
fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pg = PgCluster::start(fake::pg_options(&[IAM_PG_USER]));
        fake::create_pg_iam_user(&pg, IAM_PG_USER);
        pg
    })
}

fn mariadb_server() -> &'static MariaDb {
    static SERVER: OnceLock<MariaDb> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = MariaDb::start(MariaDbOptions::default());
        fake::create_mysql_iam_user(&server, IAM_MYSQL_USER);
        server
    })
}

/// Cloud SQL's Postgres name for a service account's IAM user.
const IAM_PG_USER: &str = "keyhole-sa@keyhole-test-project.iam";
const IAM_MYSQL_USER: &str = "keyhole-sa";

/// keyhole on a free port with `--token` and the fake's endpoint, then `args`.
fn start(api: &FakeSqlAdmin, args: &[&str]) -> Keyhole {
    keyhole_env(api, args, &[])
}

fn keyhole_env(api: &FakeSqlAdmin, args: &[&str], env: &[(&str, &str)]) -> Keyhole {
    let port = support::free_port();
    let port_text = port.to_string();
    let token = api.admin_token();
    let url = api.url();
    let mut all = vec![
        "--port",
        port_text.as_str(),
        "--token",
        token.as_str(),
        "--sqladmin-api-endpoint",
        url.as_str(),
    ];
    all.extend_from_slice(args);
    let mut full: Vec<(&str, &str)> = vec![("RUST_LOG", "debug")];
    full.extend_from_slice(env);
    Keyhole::spawn(&all, &full, Ready::Tcp(port))
}

fn psql_scram(port: u16, sql: &str) -> std::process::Output {
    clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), sql)
}

fn assert_no_secret(keyhole: &Keyhole, secrets: &[String]) {
    let logs = keyhole.logs();
    for secret in secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret reached keyhole's log:\n{logs}"
        );
    }
}

#[test]
fn a_postgres_instance_with_psql_and_a_rust_driver() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("pg-main", pg));
    let keyhole = start(&api, &[&instance.connection_name()]);

    let out = psql_scram(keyhole.port(), "select current_user || ' ' || 1+1");
    assert_eq!(
        clients::expect_success(&out, "psql through the connector"),
        "scram_user 2"
    );
    // A Rust driver, and a second session on the same certificate.
    let rt = support::runtime();
    let (client, _task) = support::session::connect(&rt, keyhole.port(), "cloudsql-driver");
    let rows = support::session::simple_query(&rt, &client, "select 40 + 2").expect("a query");
    assert_eq!(rows, ["42"]);

    // The fake proxy saw TLS with a certificate its API issued.
    let seen = api.wait_for_connections(instance.name(), 2, Duration::from_secs(10));
    assert!(seen.iter().all(|c| c.handshake.is_ok() && c.issued_by_fake));
    assert_eq!(
        api.calls(ApiMethod::GenerateEphemeralCert),
        1,
        "one refresh serves both"
    );
    assert!(keyhole
        .logs()
        .contains("Cloud SQL client certificate refreshed"));
    assert_no_secret(&keyhole, &[api.admin_token()]);
}

#[test]
fn a_mysql_instance_with_the_mariadb_cli() {
    let server = mariadb_server();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::mysql("my-main", server));
    let keyhole = start(&api, &[&instance.connection_name()]);

    let out = mariadb::mariadb(
        keyhole.port(),
        NATIVE_USER,
        Some(NATIVE_PASS),
        "select concat(current_user(), ' ', 6*7)",
    );
    let text = clients::expect_success(&out, "mariadb through the connector");
    assert!(
        text.starts_with("native_user@") && text.ends_with(" 42"),
        "{text}"
    );
    // The server inside the tunnel saw no TLS request of keyhole's: the
    // session is plain there, and the tunnel is the TLS.
    let out = mariadb::mariadb(
        keyhole.port(),
        NATIVE_USER,
        Some(NATIVE_PASS),
        "select count(*) from information_schema.processlist where user = 'native_user'",
    );
    clients::expect_success(&out, "a second session");
    assert!(api
        .connections(instance.name())
        .iter()
        .all(|c| c.handshake.is_ok()));
}

#[test]
fn every_server_ca_mode_is_verified_and_a_wrong_name_is_refused() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let modes = [
        ("internal", CaMode::GoogleManagedInternal, false),
        ("cas", CaMode::GoogleManagedCas, false),
        ("customer", CaMode::CustomerManagedCas, false),
        ("dotted", CaMode::GoogleManagedCas, true),
    ];
    for (name, ca_mode, trailing_dot) in modes {
        let instance = api.add_instance(InstanceSpec {
            ca_mode,
            san_trailing_dot: trailing_dot,
            api_trailing_dot: trailing_dot,
            ..InstanceSpec::postgres(name, pg)
        });
        let keyhole = start(&api, &[&instance.connection_name()]);
        let out = psql_scram(keyhole.port(), "select 1");
        assert_eq!(
            clients::expect_success(
                &out,
                &format!(
                    "{ca_mode:?} (trailing dot {trailing_dot}); keyhole:\n{}",
                    keyhole.logs()
                )
            ),
            "1"
        );
    }
    for ca_mode in [CaMode::GoogleManagedInternal, CaMode::GoogleManagedCas] {
        let name = format!("wrong-{}", ca_mode.as_api_str().len());
        let instance = api.add_instance(InstanceSpec {
            ca_mode,
            wrong_name: true,
            ..InstanceSpec::postgres(&name, pg)
        });
        let keyhole = start(&api, &["--lazy-refresh", &instance.connection_name()]);
        let out = psql_scram(keyhole.port(), "select 1");
        assert!(!out.status.success(), "a wrong name must be refused");
        let err = clients::stderr(&out);
        assert!(
            err.contains("Cloud SQL server certificate refused")
                && err.contains(&format!("{DEFAULT_PROJECT}:{name}")),
            "{ca_mode:?}: {err}\nkeyhole:\n{}",
            keyhole.logs()
        );
    }
}

#[test]
fn lazy_refresh_calls_nothing_before_the_first_connection() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("lazy", pg));
    let keyhole = start(&api, &["--lazy-refresh", &instance.connection_name()]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        api.api_calls().is_empty(),
        "lazy mode called the API before any client: {:?}",
        api.api_calls()
    );
    let out = psql_scram(keyhole.port(), "select 7");
    assert_eq!(clients::expect_success(&out, "lazy first connection"), "7");
    assert_eq!(api.calls(ApiMethod::ConnectSettings), 1);
    assert_eq!(api.calls(ApiMethod::GenerateEphemeralCert), 1);
    // The certificate is reused while it is valid.
    let out = psql_scram(keyhole.port(), "select 8");
    assert_eq!(clients::expect_success(&out, "lazy second connection"), "8");
    assert_eq!(api.calls(ApiMethod::GenerateEphemeralCert), 1);

    // MySQL: the engine (and so the frontend) is learned at the first
    // connection, before keyhole reads a byte: a MySQL client waits for the
    // server's greeting, which keyhole must send.
    let server = mariadb_server();
    let my = api.add_instance(InstanceSpec::mysql("lazy-my", server));
    let keyhole = start(&api, &["--lazy-refresh", &my.connection_name()]);
    let out = mariadb::mariadb(keyhole.port(), NATIVE_USER, Some(NATIVE_PASS), "select 9");
    assert_eq!(clients::expect_success(&out, "lazy MySQL"), "9");
}

#[test]
fn what_a_client_sees_when_the_connector_cannot_connect() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("errors", pg));
    let name = instance.connection_name();
    let failing = |failure: Option<Failure>, args: &[&str], target: &str| -> String {
        api.set_failure(instance.name(), failure);
        let mut all = vec!["--lazy-refresh"];
        all.extend_from_slice(args);
        all.push(target);
        let keyhole = start(&api, &all);
        let out = psql_scram(keyhole.port(), "select 1");
        assert!(
            !out.status.success(),
            "{failure:?} {args:?}: psql succeeded"
        );
        clients::stderr(&out)
    };
    let err = failing(Some(Failure::NotFound), &[], &name);
    assert!(err.contains("was not found (HTTP 404)"), "{err}");
    let err = failing(Some(Failure::Forbidden), &[], &name);
    assert!(
        err.contains("HTTP 403")
            && err.contains("roles/cloudsql.client")
            && err.contains("--token"),
        "{err}"
    );
    let err = failing(Some(Failure::Quota), &[], &name);
    assert!(
        err.contains("quota is exhausted (HTTP 429") && err.contains("(cool-down)"),
        "{err}"
    );
    let err = failing(None, &["--private-ip"], &name);
    assert!(
        err.contains("has no private IP address (it has: public)"),
        "{err}"
    );
    let wrong_region = format!("{DEFAULT_PROJECT}:europe-west9:{}", instance.name());
    let err = failing(None, &[], &wrong_region);
    assert!(
        err.contains("region us-central1, not europe-west9") && err.contains(&name),
        "{err}"
    );
    // An API nobody answers: keyhole keeps running and says so.
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let port = support::free_port();
    let port_text = port.to_string();
    let keyhole = Keyhole::spawn(
        &[
            "--port",
            &port_text,
            "--lazy-refresh",
            "--token",
            "t",
            "--sqladmin-api-endpoint",
            &dead,
            &name,
        ],
        &[],
        Ready::Tcp(port),
    );
    let out = psql_scram(port, "select 1");
    let err = clients::stderr(&out);
    assert!(err.contains("SQL Admin API is unreachable"), "{err}");
    // keyhole is still up, and logged the session's end.
    keyhole.wait_for_log("connection closed", 1);

    // MySQL clients get an ERR packet with the same words.
    let server = mariadb_server();
    let my = api.add_instance(InstanceSpec::mysql("errors-my", server));
    api.set_failure(my.name(), Some(Failure::Forbidden));
    let keyhole = start(&api, &["--lazy-refresh", &my.connection_name()]);
    let out = mariadb::mariadb(keyhole.port(), NATIVE_USER, Some(NATIVE_PASS), "select 1");
    let err = clients::stderr(&out);
    assert!(
        err.contains("HTTP 403") && err.contains("roles/cloudsql.client"),
        "{err}\nkeyhole:\n{}",
        keyhole.logs()
    );
}

#[test]
fn automatic_iam_login_puts_the_token_in_the_certificate() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("iam", pg));
    let login = "ya29.login-token-for-the-test";
    let keyhole = start(
        &api,
        &[
            "--auto-iam-authn",
            "--login-token",
            login,
            &instance.connection_name(),
        ],
    );
    let out = clients::psql(keyhole.port(), IAM_PG_USER, None, "select current_user");
    assert_eq!(
        clients::expect_success(&out, "IAM login without a password"),
        IAM_PG_USER
    );
    assert_eq!(api.login_tokens(), [login]);
    let issued = api.issued_certs();
    assert!(issued
        .iter()
        .all(|c| c.access_token.as_deref() == Some(login)));
    assert_no_secret(&keyhole, &[login.to_owned(), api.admin_token()]);

    // MySQL: the IAM user is the part of the email before '@'.
    let server = mariadb_server();
    let my = api.add_instance(InstanceSpec::mysql("iam-my", server));
    let keyhole = keyhole_env(
        &api,
        &[
            "--auto-iam-authn",
            "--login-token",
            login,
            &my.connection_name(),
        ],
        &[],
    );
    let out = mariadb::mariadb(keyhole.port(), IAM_MYSQL_USER, None, "select 1");
    assert_eq!(clients::expect_success(&out, "MySQL IAM login"), "1");
}

#[test]
fn a_certificate_that_expires_during_a_session() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("short", pg));
    api.set_cert_validity(instance.name(), Duration::from_secs(8));
    let keyhole = start(&api, &[&instance.connection_name()]);
    let rt = support::runtime();
    let (client, _task) = support::session::connect(&rt, keyhole.port(), "long-session");
    assert_eq!(
        support::session::simple_query(&rt, &client, "select 1").expect("query"),
        ["1"]
    );
    let first = api.issued_certs();
    std::thread::sleep(Duration::from_secs(10));
    // The session outlives its certificate (TLS checked it once, at the start)...
    assert_eq!(
        support::session::simple_query(&rt, &client, "select 2").expect("query"),
        ["2"]
    );
    // ... and a new connection gets the certificate refreshed ahead of expiry.
    let out = psql_scram(keyhole.port(), "select 3");
    assert_eq!(clients::expect_success(&out, "after expiry"), "3");
    let later = api.issued_certs();
    assert!(later.len() > first.len(), "no new certificate: {later:?}");
    let conns = api.connections(instance.name());
    let last = conns.last().expect("a connection");
    assert!(
        !first
            .iter()
            .any(|c| Some(&c.serial) == last.client_cert_serial.as_ref()),
        "the new connection used an old certificate"
    );
}

#[test]
fn a_cloud_sql_proxy_command_line_runs_as_is() {
    // As in cloud-sql-proxy's README, with the binary renamed and the API
    // and token given the way cloud-sql-proxy takes them (its flags and its
    // CSQL_PROXY_* variables).
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("renamed", pg));
    let dir = support::scratch_dir("keyhole-renamed-");
    let renamed = dir.path().join("cloud-sql-proxy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_keyhole"), &renamed).expect("symlink");
    let port = support::free_port();
    let token = api.admin_token();
    let mut cmd = std::process::Command::new(&renamed);
    cmd.args([
        "--address",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--auto-ip",
        &format!("{}?port={port}", instance.connection_name()),
    ])
    .env("CSQL_PROXY_TOKEN", &token)
    .env("CSQL_PROXY_SQLADMIN_API_ENDPOINT", api.url())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("start cloud-sql-proxy (keyhole)");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !support::keyhole::listens_tcp(child.id(), port) {
        assert!(std::time::Instant::now() < deadline, "it never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = psql_scram(port, "select 'renamed'");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        clients::expect_success(&out, "cloud-sql-proxy command line"),
        "renamed"
    );
}

#[test]
fn without_a_port_each_engine_listens_where_cloud_sql_proxy_would() {
    let pg = cluster();
    let server = mariadb_server();
    let api = FakeSqlAdmin::start();
    let p = api.add_instance(InstanceSpec::postgres("default-pg", pg));
    let m = api.add_instance(InstanceSpec::mysql("default-my", server));
    // An address of its own, so 5432 and 3306 are free whatever else runs.
    let address = loopback_with_free(&[5432, 3306]).to_string();
    let token = api.admin_token();
    let url = api.url();
    let mut keyhole = Keyhole::spawn(
        &[
            "--address",
            &address,
            "--token",
            &token,
            "--sqladmin-api-endpoint",
            &url,
            &m.connection_name(),
            &p.connection_name(),
        ],
        &[],
        Ready::Nothing,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(support::keyhole::listens_tcp(keyhole.pid(), 5432)
        && support::keyhole::listens_tcp(keyhole.pid(), 3306))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not listening on 5432 and 3306:\n{}",
            keyhole.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = clients::psql_args(
        &[
            "-h",
            &address,
            "-p",
            "5432",
            "-U",
            SCRAM_USER,
            "-d",
            "postgres",
            "-c",
            "select 5432",
        ],
        Some(SCRAM_PASS),
    );
    assert_eq!(clients::expect_success(&out, "Postgres on 5432"), "5432");
    let out = mariadb::mariadb_with_args(
        &[
            "--host",
            &address,
            "--port",
            "3306",
            "-u",
            NATIVE_USER,
            "-e",
            "select 3306",
        ],
        Some(NATIVE_PASS),
    );
    assert_eq!(clients::expect_success(&out, "MySQL on 3306"), "3306");
    keyhole.signal(libc::SIGTERM);
    keyhole.wait_exit(Duration::from_secs(10));

    // SQL Server is refused by name, at start.
    let sql_server = api.add_instance(InstanceSpec {
        database_version: "SQLSERVER_2019_STANDARD".into(),
        ..InstanceSpec::new("mssql", fake::Backend::None)
    });
    let (status, logs) = Keyhole::start_expect_exit(
        &[
            "--token",
            &token,
            "--sqladmin-api-endpoint",
            &url,
            &sql_server.connection_name(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(logs.contains("not SQL Server"), "{logs}");
}

/// A 127.88.x.y on which `ports` are free (a moment ago).
fn loopback_with_free(ports: &[u16]) -> std::net::Ipv4Addr {
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for i in 0..200u32 {
        let n = seed.wrapping_add(i) % (254 * 254);
        let ip = std::net::Ipv4Addr::new(127, 88, (n / 254 + 1) as u8, (n % 254 + 1) as u8);
        if ports
            .iter()
            .all(|&p| std::net::TcpListener::bind((ip, p)).is_ok())
        {
            return ip;
        }
    }
    panic!("no 127.88.x.y with {ports:?} free")
}

#[test]
fn readiness_names_an_instance_without_a_certificate_and_metrics_count_refreshes() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let good = api.add_instance(InstanceSpec::postgres("ready", pg));
    let bad = api.add_instance(InstanceSpec::postgres("refused", pg));
    api.set_failure(bad.name(), Some(Failure::Forbidden));
    let http_port = support::free_port().to_string();
    // The second instance gets a port of its own (not --port + 1, which
    // another test may hold).
    let bad_target = format!("{}?port={}", bad.connection_name(), support::free_port());
    let keyhole = start(
        &api,
        &[
            "--health-check",
            "--prometheus",
            "--http-port",
            &http_port,
            &good.connection_name(),
            &bad_target,
        ],
    );
    let http_port: u16 = http_port.parse().expect("a port");
    let last = std::cell::RefCell::new((0, String::new()));
    support::session::wait_until(
        "readiness to name the refused instance",
        Duration::from_secs(20),
        || {
            let reply = support::http::get(http_port, "/readiness").unwrap_or_default();
            let named = reply.0 == 503 && reply.1.contains("refused");
            *last.borrow_mut() = reply;
            named
        },
        || format!("{:?}\n{}", last.borrow(), keyhole.logs()),
    );
    let last = last.into_inner();
    assert!(
        last.1.contains(&bad.connection_name()) && last.1.contains("HTTP 403"),
        "{last:?}"
    );
    // The good instance serves all the same, and keyhole did not exit.
    let out = psql_scram(keyhole.port(), "select 'still serving'");
    assert_eq!(
        clients::expect_success(&out, "good instance"),
        "still serving"
    );

    let (status, metrics) = support::http::get(http_port, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let good_name = good.connection_name();
    for needle in [
        format!("keyhole_cloudsql_refreshes_total{{target=\"{good_name}\",result=\"ok\"}} 1"),
        format!("keyhole_cloudsql_api_calls_total{{target=\"{good_name}\",method=\"generateEphemeralCert\",status=\"200\"}} 1"),
        format!(
            "keyhole_cloudsql_refreshes_total{{target=\"{}\",result=\"forbidden\"}}",
            bad.connection_name()
        ),
        format!("keyhole_cloudsql_cert_expiry_seconds{{target=\"{good_name}\"}} 3"),
    ] {
        assert!(metrics.contains(&needle), "no {needle} in\n{metrics}");
    }
    assert_no_secret(&keyhole, &[api.admin_token()]);
    assert!(!metrics.contains(&api.admin_token()));
}

#[test]
fn unix_sockets_are_laid_out_as_cloud_sql_proxy_does() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("socket", pg));
    let dir = support::scratch_dir("keyhole-csql-sock-");
    let dir_text = dir.path().to_str().expect("UTF-8").to_owned();
    let instance_dir = dir.path().join(instance.connection_name());
    let socket = instance_dir.join(".s.PGSQL.5432");
    let token = api.admin_token();
    let url = api.url();
    let _keyhole = Keyhole::spawn(
        &[
            "-u",
            &dir_text,
            "-t",
            &token,
            "--sqladmin-api-endpoint",
            &url,
            &instance.connection_name(),
        ],
        &[],
        Ready::Unix(socket.clone()),
    );
    let out = clients::psql_unix(
        &instance_dir,
        5432,
        SCRAM_USER,
        Some(SCRAM_PASS),
        "select 'over the socket'",
    );
    assert_eq!(
        clients::expect_success(&out, "psql -h DIR/INSTANCE"),
        "over the socket"
    );
}

/// A DNS server on 127.0.0.1 that answers TXT queries from a map (and
/// NXDOMAIN otherwise), for `KEYHOLE_DNS_SERVER`. Stops when dropped.
struct FakeDns {
    addr: std::net::SocketAddr,
    records: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeDns {
    fn start() -> FakeDns {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        let addr = socket.local_addr().expect("its address");
        let records = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
            String,
            String,
        >::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (map, done) = (records.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let query = &buf[..n];
                let Some(name) = question_name(query) else {
                    continue;
                };
                let txt = map
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&name)
                    .cloned();
                let _ = socket.send_to(&txt_answer(query, txt.as_deref()), from);
            }
        });
        FakeDns {
            addr,
            records,
            stop,
        }
    }

    fn set(&self, name: &str, txt: &str) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), txt.to_owned());
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The queried name (labels joined by dots) of a one-question query.
fn question_name(query: &[u8]) -> Option<String> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            return Some(labels.join("."));
        }
        labels.push(String::from_utf8(query.get(at..at + len)?.to_vec()).ok()?);
        at += len;
    }
}

/// The answer to `query`: one TXT record, or NXDOMAIN.
fn txt_answer(query: &[u8], txt: Option<&str>) -> Vec<u8> {
    let mut out = query[..2].to_vec();
    out.extend_from_slice(&[0x81, if txt.is_some() { 0x80 } else { 0x83 }]);
    out.extend_from_slice(&[0, 1, 0, u8::from(txt.is_some()), 0, 0, 0, 0]);
    out.extend_from_slice(&query[12..]);
    if let Some(txt) = txt {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 16, 0, 1, 0, 0, 0, 30]);
        out.extend_from_slice(&((txt.len() + 1) as u16).to_be_bytes());
        out.push(txt.len() as u8);
        out.extend_from_slice(txt.as_bytes());
    }
    out
}

#[test]
fn a_dns_named_instance_follows_its_txt_record_and_drains_the_old_one() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let blue = api.add_instance(InstanceSpec::postgres("blue", pg));
    let green = api.add_instance(InstanceSpec::postgres("green", pg));
    let dns = FakeDns::start();
    let name = "prod-db.example.com";
    dns.set(name, &blue.connection_name());
    let dns_server = dns.addr.to_string();
    let keyhole = keyhole_env(
        &api,
        &["--max-sigterm-delay", "10s", &format!("cloudsql://{name}")],
        &[("KEYHOLE_DNS_SERVER", &dns_server)],
    );
    let rt = support::runtime();
    let (old, _task) = support::session::connect(&rt, keyhole.port(), "before-the-move");
    assert_eq!(
        support::session::simple_query(&rt, &old, "select 1").expect("query"),
        ["1"]
    );
    assert!(!api.connections(blue.name()).is_empty());

    // The switchover: the name now points to green.
    dns.set(name, &green.connection_name());
    support::session::wait_until(
        "new connections to go to the new instance",
        Duration::from_secs(45),
        || {
            let out = psql_scram(keyhole.port(), "select 1");
            out.status.success() && !api.connections(green.name()).is_empty()
        },
        || keyhole.logs(),
    );
    // The session on the old instance goes on for the drain...
    assert_eq!(
        support::session::simple_query(&rt, &old, "select 2").expect("still open"),
        ["2"]
    );
    // ... and is closed after it.
    support::session::wait_until(
        "the old instance's session to be closed after the drain",
        Duration::from_secs(20),
        || support::session::simple_query(&rt, &old, "select 3").is_err(),
        || keyhole.logs(),
    );
    let logs = keyhole.logs();
    assert!(
        logs.contains("outcome=\"instance_moved\"") || logs.contains("outcome=instance_moved"),
        "{logs}"
    );
    assert!(
        logs.contains("points to another Cloud SQL instance"),
        "{logs}"
    );
}

#[test]
fn a_cancel_request_reaches_the_instance_through_the_tunnel() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("cancel", pg));
    let keyhole = start(&api, &[&instance.connection_name()]);
    let rt = support::runtime();
    let (client, _task) = support::session::connect(&rt, keyhole.port(), "cloudsql-cancel");
    let token = client.cancel_token();
    let query =
        rt.spawn(async move { client.simple_query("select pg_sleep(60)").await.map(|_| ()) });
    support::session::wait_until(
        "the query to be running",
        Duration::from_secs(20),
        || {
            pg.admin_sql(
                "select count(*) from pg_stat_activity where application_name = 'cloudsql-cancel' \
                 and query like '%pg_sleep%'",
            ) == "1"
        },
        || keyhole.logs(),
    );
    rt.block_on(token.cancel_query(tokio_postgres::NoTls))
        .expect("the cancel request is delivered to keyhole");
    let result = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), query).await })
        .expect("the cancelled query returns")
        .expect("the query task does not panic");
    let err = result.expect_err("the query was cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err:?}"
    );
    keyhole.wait_for_log("cancel_forwarded", 1);
}

#[test]
fn private_ip_psc_and_the_quota_project_as_asked() {
    let pg = cluster();
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec {
        private_ip: true,
        psc: true,
        ..InstanceSpec::postgres("addresses", pg)
    });
    let name = instance.connection_name();
    let cases = [
        (vec!["--private-ip", name.as_str()], fake::IpType::Private),
        (vec!["--psc", name.as_str()], fake::IpType::Psc),
        (vec![name.as_str()], fake::IpType::Public),
    ];
    for (args, expected) in cases {
        let mut all = vec!["--quota-project", "billing-proj"];
        all.extend(args.iter().copied());
        let keyhole = start(&api, &all);
        let before = api.connections(instance.name()).len();
        let out = psql_scram(keyhole.port(), "select 1");
        assert_eq!(clients::expect_success(&out, &format!("{args:?}")), "1");
        let conns = api.wait_for_connections(instance.name(), before + 1, Duration::from_secs(10));
        assert_eq!(conns[before].ip_type, expected, "{args:?}");
    }
    let requests = api.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.header("x-goog-user-project") == Some("billing-proj")),
        "every Admin API call bills the quota project"
    );
}
