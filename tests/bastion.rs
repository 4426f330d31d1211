//! Laptops through a bastion (`via=`), with real servers: a network
//! namespace stands in for the VPC, and inside it run a real OpenSSH sshd,
//! dante (SOCKS5), microsocks (SOCKS5 with a login) and tinyproxy (HTTP
//! CONNECT). The databases (the real PostgreSQL and MariaDB of the other
//! tests) are reachable only from inside: through a relay on the
//! namespace's own loopback, named `db.internal` only in the namespace's
//! hosts file. So a test passes only if the bytes went through the hop, and
//! the name was resolved there.
//!
//! TLS still runs from keyhole to the database and is verified against
//! `db.internal` (the servers' certificates carry it): the hops see
//! ciphertext. Where network namespaces cannot be made, each test says so
//! loudly and is skipped.

mod support;

use std::time::{Duration, Instant};

use support::bastion::{HttpProxy, Socks5Proxy, SshBastion};
use support::clients;
use support::keyhole::{Keyhole, Ready};
use support::mariadb::{self, MariaDb, NATIVE_PASS, NATIVE_USER};
use support::netns::{Namespace, Relay};
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER};

/// The database's name, known only to the namespace's resolver.
const DB_NAME: &str = "db.internal";

/// A namespace with the shared PostgreSQL behind a relay on its loopback,
/// named `db.internal` inside.
struct Vpc {
    ns: Namespace,
    pg_relay: Relay,
}

fn vpc() -> Option<Vpc> {
    let ns = Namespace::create()?;
    ns.set_hosts(&[(DB_NAME, "127.0.0.1")]);
    let pg = PgCluster::shared();
    let pg_relay = ns.relay_to(format!("127.0.0.1:{}", pg.port).parse().expect("address"));
    Some(Vpc { ns, pg_relay })
}

/// The shared MariaDB behind a relay in the namespace, and its CA file.
fn mariadb_behind(vpc: &Vpc) -> (Relay, String) {
    let db = MariaDb::shared();
    let relay = vpc
        .ns
        .relay_to(format!("127.0.0.1:{}", db.port()).parse().expect("address"));
    (relay, db.pki().ca.to_str().expect("UTF-8").to_owned())
}

fn pg_ca() -> String {
    PgCluster::shared()
        .pki
        .ca
        .to_str()
        .expect("UTF-8 path")
        .to_owned()
}

/// A Postgres target at db.internal:PORT through `via`.
fn pg_target(port: u16, via: &str) -> String {
    format!("postgres://{DB_NAME}:{port}?via={via}")
}

fn start(args: &[&str]) -> Keyhole {
    let mut all = vec!["--ca-file".to_owned(), pg_ca()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    Keyhole::start(&refs)
}

fn select_one(port: u16) -> Result<String, String> {
    let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), "select 40 + 2");
    if out.status.success() {
        Ok(clients::stdout(&out).trim().to_owned())
    } else {
        Err(clients::stderr(&out))
    }
}

#[test]
fn psql_through_an_ssh_bastion_to_a_name_only_the_bastion_resolves() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("bastion");
    let config = config.to_str().expect("UTF-8");
    let mut keyhole = start(&[
        "--ssh-config",
        config,
        &pg_target(vpc.pg_relay.port(), "ssh://bastion"),
    ]);
    assert_eq!(select_one(keyhole.port()).as_deref(), Ok("42"));
    // Many connections, one at a time and at once: one SSH login.
    for _ in 0..3 {
        assert_eq!(select_one(keyhole.port()).as_deref(), Ok("42"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let port = keyhole.port();
    rt.block_on(async {
        let mut sessions = Vec::new();
        for i in 0..12 {
            sessions.push(tokio::spawn(async move {
                let (client, connection) = tokio_postgres::connect(
                    &format!(
                        "host=127.0.0.1 port={port} user={SCRAM_USER} password={SCRAM_PASS} dbname=postgres application_name=via{i}"
                    ),
                    tokio_postgres::NoTls,
                )
                .await
                .expect("session through the bastion");
                tokio::spawn(connection);
                let row = client
                    .query_one("select pg_sleep(0.2), $1::int", &[&i])
                    .await
                    .expect("query");
                row.get::<_, i32>(1)
            }));
        }
        for (i, session) in sessions.into_iter().enumerate() {
            assert_eq!(session.await.expect("task"), i as i32);
        }
    });
    assert_eq!(
        bastion.logins(),
        1,
        "every connection must ride the one SSH login; sshd log:\n{}",
        bastion.log()
    );
    assert!(
        vpc.pg_relay.connections() >= 16,
        "the bytes went through the namespace's relay"
    );
    // Without the hop the name does not even resolve here.
    assert!(std::net::ToSocketAddrs::to_socket_addrs(&(DB_NAME, 5432)).is_err());
    let logs = keyhole.logs();
    assert!(
        logs.contains("SSH connection to the bastion open"),
        "{logs}"
    );
    // However keyhole ends (here SIGKILL), its SSH master ends with it: on
    // Linux. The portable build (macOS) has no parent-death signal, so there
    // the master ends at keyhole's shutdown (SIGTERM here), as documented.
    let control = format!("keyhole-ssh-{}-", keyhole.pid());
    assert!(
        ssh_masters(&control) > 0,
        "the master runs while keyhole does"
    );
    if !cfg!(linux_native) {
        keyhole.signal(libc::SIGTERM);
        let _ = keyhole.wait_exit(Duration::from_secs(20));
    }
    drop(keyhole);
    support::session::wait_until(
        "the SSH master to end with keyhole",
        Duration::from_secs(10),
        || ssh_masters(&control) == 0,
        || "an ssh master outlived keyhole".into(),
    );
}

/// ssh processes whose command line names keyhole's control directory.
fn ssh_masters(control: &str) -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| {
            let text = String::from_utf8_lossy(cmdline);
            text.starts_with("ssh\0") && text.contains(control)
        })
        .count()
}

#[test]
fn mariadb_through_an_ssh_bastion() {
    let Some(vpc) = vpc() else { return };
    let (relay, ca) = mariadb_behind(&vpc);
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("bastion");
    let keyhole = Keyhole::start(&[
        "--ca-file",
        &ca,
        "--ssh-config",
        config.to_str().expect("UTF-8"),
        &format!("mysql://{DB_NAME}:{}?via=ssh://bastion", relay.port()),
    ]);
    for _ in 0..3 {
        let out = mariadb::mariadb(
            keyhole.port(),
            NATIVE_USER,
            Some(NATIVE_PASS),
            "select 6 * 7",
        );
        assert!(out.status.success(), "{}", clients::stderr(&out));
        assert_eq!(clients::stdout(&out).trim(), "42");
    }
    assert_eq!(bastion.logins(), 1, "{}", bastion.log());
    assert!(relay.connections() >= 3);
}

#[test]
fn the_database_certificate_is_checked_against_its_own_name_not_the_bastion() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("bastion");
    // The certificate names db.internal, not the bastion: a server-name the
    // certificate does not carry is refused, through the hop as directly.
    let keyhole = start(&[
        "--ssh-config",
        config.to_str().expect("UTF-8"),
        &format!(
            "{}&server-name=bastion.example.com",
            pg_target(vpc.pg_relay.port(), "ssh://bastion")
        ),
    ]);
    let err = select_one(keyhole.port()).expect_err("wrong name");
    assert!(
        err.contains("bastion.example.com") && err.contains("certificate"),
        "{err}"
    );
}

#[test]
fn a_database_the_bastion_cannot_reach_is_named_with_the_bastions_reason() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("bastion");
    // Nothing listens on this port inside the namespace.
    let closed = vpc.ns.claim_port(1);
    let keyhole = start(&[
        "--ssh-config",
        config.to_str().expect("UTF-8"),
        &pg_target(closed, "ssh://bastion"),
    ]);
    let err = select_one(keyhole.port()).expect_err("nothing there");
    assert!(
        err.contains(&format!(
            "{DB_NAME}:{closed} is unreachable from ssh://bastion"
        )) && err.contains("Connection refused"),
        "{err}"
    );
    // The bastion itself was fine: one login, still up for the next client.
    let again = select_one(keyhole.port()).expect_err("still nothing there");
    assert!(again.contains("Connection refused"), "{again}");
    assert_eq!(bastion.logins(), 1, "{}", bastion.log());
}

#[test]
fn unknown_and_changed_host_keys_and_a_refused_key_each_say_what_to_do() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let cases = [
        (
            bastion.ssh_config_unknown_host("bastion"),
            "is not in known_hosts, and keyhole never adds one by itself",
        ),
        (
            bastion.ssh_config_changed_host_key("bastion"),
            "has CHANGED since it was recorded in known_hosts",
        ),
        (
            bastion.ssh_config_wrong_key("bastion"),
            "refused the SSH login: ",
        ),
    ];
    for (config, expected) in cases {
        let keyhole = start(&[
            "--ssh-config",
            config.to_str().expect("UTF-8"),
            &pg_target(vpc.pg_relay.port(), "ssh://bastion"),
        ]);
        let err = select_one(keyhole.port()).expect_err("refused");
        assert!(
            err.contains("ssh://bastion") && err.contains(expected),
            "{expected}: {err}"
        );
        // keyhole never wrote the key it was not given.
        let text = std::fs::read_to_string(&config).expect("config");
        let known = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("UserKnownHostsFile "))
            .expect("UserKnownHostsFile");
        let known = std::fs::read_to_string(known.trim()).unwrap_or_default();
        if !expected.contains("refused") {
            assert!(
                !known.contains(&bastion.host_public_key),
                "known_hosts was changed"
            );
        }
        drop(keyhole);
    }
    assert_eq!(bastion.logins(), 0, "{}", bastion.log());
    assert_eq!(vpc.pg_relay.connections(), 0);
}

#[test]
fn a_bastion_that_dies_takes_its_sessions_and_the_next_client_logs_in_again() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("bastion");
    let keyhole = start(&[
        "--ssh-config",
        config.to_str().expect("UTF-8"),
        &pg_target(vpc.pg_relay.port(), "ssh://bastion"),
    ]);
    assert_eq!(select_one(keyhole.port()).as_deref(), Ok("42"));
    // A long session, open while the bastion dies.
    let port = keyhole.port();
    let long = std::thread::spawn(move || {
        clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), "select pg_sleep(5)")
    });
    std::thread::sleep(Duration::from_millis(1500));
    bastion.kill();
    let out = long.join().expect("thread");
    assert!(
        !out.status.success(),
        "the session through a dead bastion must end"
    );
    // While it is down, a new connection is told which hop failed.
    let err = select_one(keyhole.port()).expect_err("bastion down");
    assert!(err.contains("ssh://bastion is unreachable: "), "{err}");
    bastion.restart();
    // The next connection opens a new SSH connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match select_one(keyhole.port()) {
            Ok(answer) => {
                assert_eq!(answer, "42");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("no reconnect: {e}\n{}", keyhole.logs()),
        }
    }
    assert_eq!(bastion.logins(), 2, "{}", bastion.log());
    let logs = keyhole.logs();
    assert!(
        logs.contains("the SSH connection to the bastion ended"),
        "{logs}"
    );
}

#[test]
fn psql_and_mariadb_through_socks5_with_and_without_a_login() {
    let Some(vpc) = vpc() else { return };
    let dante = Socks5Proxy::start_dante(&vpc.ns);
    let micro = Socks5Proxy::start_microsocks(&vpc.ns, "keyhole", "s3cret-pass");
    let (my_relay, ca) = mariadb_behind(&vpc);
    let wrong = format!("socks5://keyhole:wrong-pass@{}", micro.addr);
    let keyhole = start(&[
        &pg_target(vpc.pg_relay.port(), &dante.url()),
        &pg_target(vpc.pg_relay.port(), &micro.url()),
        &pg_target(vpc.pg_relay.port(), &wrong),
    ]);
    let port = keyhole.port();
    assert_eq!(select_one(port).as_deref(), Ok("42"));
    assert_eq!(select_one(port + 1).as_deref(), Ok("42"));
    let err = select_one(port + 2).expect_err("wrong password");
    assert!(
        err.contains(&format!("socks5://{} refused keyhole's login", micro.addr)),
        "{err}"
    );
    assert!(!err.contains("wrong-pass") && !keyhole.logs().contains("wrong-pass"));
    let my = Keyhole::start(&[
        "--ca-file",
        &ca,
        &format!("mysql://{DB_NAME}:{}?via={}", my_relay.port(), dante.url()),
    ]);
    let out = mariadb::mariadb(my.port(), NATIVE_USER, Some(NATIVE_PASS), "select 6 * 7");
    assert!(out.status.success(), "{}", clients::stderr(&out));
    assert_eq!(clients::stdout(&out).trim(), "42");
}

#[test]
fn all_proxy_socks5_applies_unless_no_proxy_names_the_host() {
    let Some(vpc) = vpc() else { return };
    let dante = Socks5Proxy::start_dante(&vpc.ns);
    let all_proxy = dante.url();
    let ca = pg_ca();
    let target = format!("postgres://{DB_NAME}:{}", vpc.pg_relay.port());
    let port = support::free_port();
    let port_text = port.to_string();
    let args = ["--port", &port_text, "--ca-file", &ca, &target];
    let via_env = Keyhole::spawn(&args, &[("ALL_PROXY", &all_proxy)], Ready::Tcp(port));
    assert_eq!(select_one(port).as_deref(), Ok("42"));
    drop(via_env);
    let port = support::free_port();
    let port_text = port.to_string();
    let args = ["--port", &port_text, "--ca-file", &ca, &target];
    let excluded = Keyhole::spawn(
        &args,
        &[("ALL_PROXY", &all_proxy), ("NO_PROXY", ".internal")],
        Ready::Tcp(port),
    );
    let err = select_one(port).expect_err("direct: the name does not resolve here");
    assert!(err.contains("could not resolve db.internal"), "{err}");
    drop(excluded);
}

#[test]
fn psql_through_http_connect_with_proxy_authentication() {
    let Some(vpc) = vpc() else { return };
    let proxy = HttpProxy::start(&vpc.ns, Some(("keyhole", "s3cret-pass")));
    let anonymous = format!("http://{}", proxy.addr);
    let wrong = format!("http://keyhole:wrong-pass@{}", proxy.addr);
    let keyhole = start(&[
        &pg_target(vpc.pg_relay.port(), &proxy.url()),
        &pg_target(vpc.pg_relay.port(), &anonymous),
        &pg_target(vpc.pg_relay.port(), &wrong),
    ]);
    assert_eq!(select_one(keyhole.port()).as_deref(), Ok("42"));
    let err = select_one(keyhole.port() + 1).expect_err("no credentials");
    assert!(
        err.contains(&format!("{anonymous} refused keyhole's login: HTTP 407")),
        "{err}"
    );
    let err = select_one(keyhole.port() + 2).expect_err("wrong password");
    assert!(
        err.contains(&format!("{anonymous} refused keyhole's login: HTTP 401")),
        "{err}"
    );
    assert!(!err.contains("wrong-pass"));
    let logs = keyhole.logs();
    assert!(!logs.contains("s3cret-pass") && !logs.contains("wrong-pass"));
    assert!(proxy.log().contains("CONNECT"), "{}", proxy.log());
}

#[test]
fn metrics_count_connections_per_transport_and_bastion_logins() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("bastion");
    let http_port = support::free_port().to_string();
    let keyhole = start(&[
        "--prometheus",
        "--http-port",
        &http_port,
        "--ssh-config",
        config.to_str().expect("UTF-8"),
        &pg_target(vpc.pg_relay.port(), "ssh://bastion"),
    ]);
    for _ in 0..2 {
        assert_eq!(select_one(keyhole.port()).as_deref(), Ok("42"));
    }
    let (status, body) =
        support::http::get(http_port.parse().expect("port"), "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains(
            r#"keyhole_hop_connections_total{hop="ssh://bastion",transport="ssh",result="ok"} 2"#
        ),
        "{body}"
    );
    assert!(
        body.contains(r#"keyhole_bastion_logins_total{hop="ssh://bastion",result="ok"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"keyhole_bastion_up{hop="ssh://bastion"} 1"#),
        "{body}"
    );
}

#[test]
fn check_config_shows_the_path_and_the_connection_test_goes_all_the_way() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let good = bastion.ssh_config("bastion");
    let target = pg_target(vpc.pg_relay.port(), "ssh://bastion");
    let ca = pg_ca();
    let out = support::process::output_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_keyhole")).args([
            "check-config",
            "--ca-file",
            &ca,
            "--ssh-config",
            good.to_str().expect("UTF-8"),
            &target,
        ]),
        Duration::from_secs(30),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        support::process::describe_output(&out)
    );
    let port = vpc.pg_relay.port();
    assert!(
        report.contains(&format!("path         keyhole → ssh ssh://bastion → {DB_NAME}:{port} (the bastion resolves and dials the name")),
        "{report}"
    );
    assert!(
        report.contains("backend      private-ip (not checked here: through ssh://bastion the hop resolves and dials the name"),
        "{report}"
    );
    assert!(report.contains("ssh-config"), "{report}");
    // check-config dials nothing: no login.
    assert_eq!(bastion.logins(), 0);

    // --run-connection-test goes through the bastion to the database.
    let keyhole = start(&[
        "--run-connection-test",
        "--ssh-config",
        good.to_str().expect("UTF-8"),
        &target,
    ]);
    assert!(
        keyhole.logs().contains("connection test passed"),
        "{}",
        keyhole.logs()
    );
    drop(keyhole);
    let wrong = bastion.ssh_config_wrong_key("bastion");
    let (status, logs) = Keyhole::start_expect_exit(
        &[
            "--port",
            &support::free_port().to_string(),
            "--ca-file",
            &ca,
            "--run-connection-test",
            "--ssh-config",
            wrong.to_str().expect("UTF-8"),
            &target,
        ],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains("ssh://bastion refused the SSH login"),
        "{logs}"
    );
}

#[test]
fn psql_through_an_https_proxy_verified_against_its_own_name() {
    let Some(vpc) = vpc() else { return };
    let proxy = HttpProxy::start(&vpc.ns, Some(("keyhole", "s3cret-pass")));
    // TLS in front of the proxy: stunnel in the namespace, with a certificate
    // for the namespace's address from a CA only this test trusts.
    let ns_ip = vpc.ns.ns_ip.to_string();
    let pki = support::certs::TestPki::generate(&[&ns_ip]);
    let conf = pki.dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[proxy]\naccept = {ns_ip}:8443\nconnect = {}\ncert = {}\nkey = {}\n",
            proxy.addr,
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    )
    .expect("stunnel.conf");
    let stunnel = support::netns::require_program("stunnel4", "stunnel4");
    let mut tls_front = vpc
        .ns
        .command(&stunnel)
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("stunnel");
    support::session::wait_until(
        "stunnel in front of the proxy",
        Duration::from_secs(10),
        || std::net::TcpStream::connect((vpc.ns.ns_ip, 8443)).is_ok(),
        || "stunnel did not listen".into(),
    );
    let https = format!("https://keyhole:s3cret-pass@{ns_ip}:8443");
    let ca = pg_ca();
    let port = support::free_port();
    let port_text = port.to_string();
    let target = pg_target(vpc.pg_relay.port(), &https);
    let trusted = pki.ca.to_str().expect("UTF-8").to_owned();
    let keyhole = Keyhole::spawn(
        &["--port", &port_text, "--ca-file", &ca, &target],
        &[("SSL_CERT_FILE", &trusted)],
        Ready::Tcp(port),
    );
    assert_eq!(select_one(port).as_deref(), Ok("42"));
    assert!(proxy.log().contains("CONNECT"), "{}", proxy.log());
    drop(keyhole);
    // The same proxy, but the system roots do not know its CA: refused.
    let port = support::free_port();
    let port_text = port.to_string();
    let untrusting = Keyhole::spawn(
        &["--port", &port_text, "--ca-file", &ca, &target],
        &[("SSL_CERT_FILE", &ca)],
        Ready::Tcp(port),
    );
    let err = select_one(port).expect_err("untrusted proxy");
    assert!(
        err.contains(&format!(
            "https://{ns_ip}:8443 is unreachable: TLS to the proxy failed"
        )),
        "{err}"
    );
    drop(untrusting);
    let _ = tls_front.kill();
    let _ = tls_front.wait();
}

#[test]
fn the_bastion_login_happens_at_start_or_with_lazy_refresh_at_the_first_client() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("bastion");
    let target = pg_target(vpc.pg_relay.port(), "ssh://bastion");
    let eager = start(&["--ssh-config", config.to_str().expect("UTF-8"), &target]);
    support::session::wait_until(
        "the login at start",
        Duration::from_secs(10),
        || bastion.logins() == 1,
        || bastion.log(),
    );
    drop(eager);
    let lazy = start(&[
        "--lazy-refresh",
        "--ssh-config",
        config.to_str().expect("UTF-8"),
        &target,
    ]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        bastion.logins(),
        1,
        "a lazy keyhole logs in at the first client"
    );
    assert_eq!(select_one(lazy.port()).as_deref(), Ok("42"));
    assert_eq!(bastion.logins(), 2, "{}", bastion.log());
}

#[test]
fn mariadb_through_http_connect_and_refusals_with_the_proxys_own_codes() {
    let Some(vpc) = vpc() else { return };
    // MySQL servers speak first: the greeting must not be swallowed with the
    // proxy's reply.
    let (relay, ca) = mariadb_behind(&vpc);
    let proxy = HttpProxy::start(&vpc.ns, None);
    let dante = Socks5Proxy::start_dante(&vpc.ns);
    let closed = vpc.ns.claim_port(2);
    let keyhole = Keyhole::start(&[
        "--ca-file",
        &ca,
        &format!("mysql://{DB_NAME}:{}?via={}", relay.port(), proxy.url()),
        &format!("mysql://{DB_NAME}:{closed}?via={}", dante.url()),
        &format!("mysql://{DB_NAME}:{closed}?via={}", proxy.url()),
    ]);
    let out = mariadb::mariadb(
        keyhole.port(),
        NATIVE_USER,
        Some(NATIVE_PASS),
        "select 6 * 7",
    );
    assert!(out.status.success(), "{}", clients::stderr(&out));
    assert_eq!(clients::stdout(&out).trim(), "42");
    assert!(relay.connections() >= 1);
    let refused = |port: u16| {
        let out = mariadb::mariadb(port, NATIVE_USER, Some(NATIVE_PASS), "select 1");
        assert!(!out.status.success(), "{}", clients::stdout(&out));
        clients::stderr(&out)
    };
    let err = refused(keyhole.port() + 1);
    assert!(
        err.contains(&format!(
            "{DB_NAME}:{closed} is unreachable from socks5://{}: SOCKS reply",
            dante.addr
        )),
        "{err}"
    );
    let err = refused(keyhole.port() + 2);
    assert!(
        err.contains(&format!("http://{}", proxy.addr)) && err.contains("HTTP "),
        "{err}"
    );
}

#[test]
fn proxy_jump_in_the_users_ssh_config_is_honoured() {
    let Some(vpc) = vpc() else { return };
    let bastion = SshBastion::start(&vpc.ns);
    let config = bastion.ssh_config("jumphost");
    // A second host reached with ProxyJump through the first (the same sshd
    // here): what ~/.ssh/config says holds for keyhole too.
    let mut text = std::fs::read_to_string(&config).expect("config");
    let inner = text
        .replace("Host jumphost", "Host inner")
        .lines()
        .filter(|l| !l.trim_start().starts_with("ProxyJump"))
        .collect::<Vec<_>>()
        .join("\n");
    text.push_str(&format!("\n{inner}\n    ProxyJump jumphost\n"));
    std::fs::write(&config, text).expect("config");
    let keyhole = start(&[
        "--ssh-config",
        config.to_str().expect("UTF-8"),
        &pg_target(vpc.pg_relay.port(), "ssh://inner"),
    ]);
    for _ in 0..3 {
        assert_eq!(select_one(keyhole.port()).as_deref(), Ok("42"));
    }
    // Two logins, once: the jump host, then the inner host through it.
    assert_eq!(bastion.logins(), 2, "{}", bastion.log());
}
