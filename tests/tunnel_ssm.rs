//! `via=ssm://INSTANCE-ID`: keyhole speaks AWS Session Manager port
//! forwarding itself, in front of real PostgreSQL and MariaDB. The service
//! and its agent are a fake written from the protocol
//! (tests/support/fake_ssm.rs, its own encoding of every message and of
//! smux), reached the way the AWS SDKs find a VPC endpoint
//! (`AWS_ENDPOINT_URL_SSM`) and trusted through `AWS_CA_BUNDLE`.
//!
//! The database's TLS still starts in keyhole, verified against its name;
//! the tunnel carries ciphertext.

// Tests the Session Manager tunnel: only in builds with the "aws" feature.
#![cfg(feature = "aws")]

mod support;

use std::path::Path;
use std::time::Duration;

use support::bastion::SshBastion;
use support::cloud::AwsCredentials;
use support::fake_rds::{FakeRds, PgAsk, TokenCheck};
use support::fake_ssm::{ApiFailure, CloseKind, FakeSsm, Faults};
use support::keyhole::{Keyhole, Ready};
use support::mariadb::{self, MariaDb, NATIVE_PASS, NATIVE_USER};
use support::netns::Namespace;
use support::postgres::{PgCluster, TRUST_USER};
use support::{clients, scratch_dir, session};

const INSTANCE: &str = "i-0123456789abcdef0";

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// keyhole on a free port with `args` and the fake's endpoint, trust and
/// credentials.
fn keyhole(args: &[&str], ssm: &FakeSsm, home: &Path) -> Keyhole {
    let port = support::free_port();
    let port_text = port.to_string();
    let mut all = vec!["--port", port_text.as_str()];
    all.extend_from_slice(args);
    let vars = ssm.env();
    let mut env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend([
        ("HOME", utf8(home)),
        ("RUST_LOG", "keyhole=debug"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    Keyhole::spawn(&all, &env, Ready::Tcp(port))
}

fn pg_target(pg: &PgCluster, hop: &str) -> String {
    format!(
        "postgres://localhost:{}?ca-file={}&via={hop}",
        pg.port,
        utf8(&pg.pki.ca)
    )
}

fn fake() -> FakeSsm {
    FakeSsm::start(AwsCredentials::generate())
}

fn select(port: u16, sql: &str) -> Result<String, String> {
    let out = clients::psql(port, TRUST_USER, None, sql);
    if out.status.success() {
        Ok(clients::stdout(&out).trim().to_owned())
    } else {
        Err(clients::stderr(&out))
    }
}

/// SHA-256 in hex, to compare rows with the server's own digest of them.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Rows through keyhole, digested here, against the server's own digest.
fn assert_rows_arrive_exactly(pg: &PgCluster, kh: &Keyhole, rows: u32) {
    let port = kh.port();
    let direct = pg
        .psql_direct(
            TRUST_USER,
            None,
            &format!(
                "select count(*), encode(sha256(convert_to(string_agg(repeat(md5(i::text), 4), '' order by i), 'UTF8')), 'hex') \
                 from generate_series(1, {rows}) i"
            ),
        )
        .expect("direct");
    let out = clients::psql(
        port,
        TRUST_USER,
        None,
        &format!("select repeat(md5(i::text), 4) from generate_series(1, {rows}) i order by i"),
    );
    if !out.status.success() {
        panic!(
            "rows through Session Manager: {}\nkeyhole:\n{}",
            clients::stderr(&out),
            kh.logs()
        );
    }
    let text = clients::stdout(&out);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(
        format!("{}|{}", lines.len(), sha256_hex(lines.concat().as_bytes())),
        direct.trim()
    );
}

/// Stops keyhole (SIGTERM) and checks that the one session the fake
/// started was terminated at the service on the way out.
fn exits_terminating(mut kh: Keyhole, ssm: &FakeSsm) -> Keyhole {
    kh.signal(libc::SIGTERM);
    assert!(
        kh.wait_exit(Duration::from_secs(15)).is_some(),
        "keyhole exits"
    );
    let starts = ssm.start_requests();
    let session = starts[0].outcome.clone().expect("a session id");
    assert_eq!(ssm.terminated(), vec![session]);
    kh
}

#[test]
fn psql_reaches_postgres_through_one_multiplexed_session() {
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    let pg = PgCluster::shared();
    let target = pg_target(pg, &format!("ssm://{INSTANCE}"));
    let kh = keyhole(&[&target], &ssm, home.path());
    // A burst of first connections at once: they wait for one session and
    // share it.
    let port = kh.port();
    let handles: Vec<_> = (0..6)
        .map(|i| std::thread::spawn(move || select(port, &format!("select pg_sleep(0.2), {i}"))))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().expect("thread"), Ok(format!("|{i}")));
    }

    assert_eq!(
        select(
            kh.port(),
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        )
        .as_deref(),
        Ok("t")
    );
    for i in 0..3 {
        assert_eq!(
            select(kh.port(), &format!("select {i} + 1")),
            Ok((i + 1).to_string())
        );
    }
    let starts = ssm.start_requests();
    assert_eq!(
        starts.len(),
        1,
        "one session for every connection: {starts:?}"
    );
    assert_eq!(starts[0].target, INSTANCE);
    assert_eq!(
        starts[0].document,
        "AWS-StartPortForwardingSessionToRemoteHost"
    );
    assert_eq!(starts[0].parameters["host"][0], "localhost");
    assert_eq!(starts[0].parameters["portNumber"][0], pg.port.to_string());
    let counters = ssm.counters();
    assert_eq!(counters.streams_opened, 10, "{counters:?}");
    assert!(ssm.open_data_channels().iter().all(|o| o.token_ok));
    let version = ssm.last_client_version().expect("a handshake");
    assert!(version.starts_with("1.2."), "{version}");
    assert!(ssm.errors().is_empty(), "{:?}", ssm.errors());
    // At exit the shared session is terminated at the service.
    let kh = exits_terminating(kh, &ssm);
    let logs = kh.logs();
    for (name, value) in ssm.env() {
        if name.contains("SECRET") || name.contains("SESSION_TOKEN") {
            assert!(!logs.contains(&value), "{name} reached the log");
        }
    }
}

#[test]
fn mariadb_reaches_its_server_through_session_manager() {
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    let db = MariaDb::shared();
    let target = format!(
        "mysql://localhost:{}?ca-file={}&via=ssm://{INSTANCE}",
        db.port(),
        utf8(&db.pki().ca)
    );
    let kh = keyhole(&[&target], &ssm, home.path());
    let out = mariadb::mariadb(kh.port(), NATIVE_USER, Some(NATIVE_PASS), "select 6*7");
    assert_eq!(
        clients::expect_success(&out, "mariadb through SSM").trim(),
        "42"
    );
}

/// The agent's messages dropped (first transmission), duplicated and
/// reordered: what the client receives is still exactly the server's rows.
#[test]
fn a_lossy_reordering_data_channel_delivers_the_servers_bytes_exactly() {
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    ssm.set_faults(Faults {
        seed: 7,
        drop: 0.15,
        duplicate: 0.1,
        reorder: 0.15,
        ..Faults::default()
    });
    let pg = PgCluster::shared();
    let target = pg_target(pg, &format!("ssm://{INSTANCE}"));
    let kh = keyhole(&[&target], &ssm, home.path());
    assert_rows_arrive_exactly(pg, &kh, 20_000);
    let c = ssm.counters();
    assert!(
        c.messages_dropped > 0
            && c.messages_duplicated > 0
            && c.messages_reordered > 0
            && c.messages_resent > 0,
        "the faults happened: {c:?}"
    );
    assert!(ssm.errors().is_empty(), "{:?}", ssm.errors());
}

/// An agent without smux: one session per connection, each terminated
/// when its connection ends.
#[test]
fn an_agent_without_multiplexing_gets_one_session_per_connection() {
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    ssm.set_faults(Faults {
        agent_version: "3.0.100.0".into(),
        ..Faults::default()
    });
    let pg = PgCluster::shared();
    let target = pg_target(pg, &format!("ssm://{INSTANCE}"));
    let kh = keyhole(&[&target], &ssm, home.path());
    for i in 0..3 {
        assert_eq!(
            select(kh.port(), &format!("select {i} * 2")),
            Ok((i * 2).to_string())
        );
    }
    assert_eq!(ssm.counters().sessions_started, 3);
    ssm.wait_for("three sessions terminated", Duration::from_secs(10), |s| {
        s.counters().sessions_terminated == 3
    });
    assert_eq!(ssm.counters().streams_opened, 0, "no smux without it");
}

/// A data channel that drops takes its own connection only; the next
/// connection starts a new session.
#[test]
fn a_dropped_session_loses_only_its_connections_and_the_next_one_reconnects() {
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    let pg = PgCluster::shared();
    let target = pg_target(pg, &format!("ssm://{INSTANCE}"));
    let kh = keyhole(&[&target], &ssm, home.path());
    assert_eq!(select(kh.port(), "select 1").as_deref(), Ok("1"));
    let port = kh.port();
    let long = std::thread::spawn(move || select(port, "select pg_sleep(3), 'done'"));
    ssm.wait_for("a stream open", Duration::from_secs(10), |s| {
        s.counters().streams_opened == 2
    });
    ssm.close_channels(CloseKind::TcpDrop);
    let lost = long.join().expect("thread");
    assert!(
        lost.is_err(),
        "the connection on the dropped session ends: {lost:?}"
    );
    assert_eq!(select(kh.port(), "select 2").as_deref(), Ok("2"));
    assert_eq!(ssm.counters().sessions_started, 2);
    assert!(
        kh.logs().contains("the next one starts a new session"),
        "{}",
        kh.logs()
    );
}

/// A session left idle (a psql prompt) outlives the service's idle timeout:
/// keyhole's keep-alive is traffic the service counts.
#[test]
fn an_idle_session_is_kept_alive() {
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    ssm.set_faults(Faults {
        idle_close: Some(Duration::from_secs(14)),
        ..Faults::default()
    });
    let pg = PgCluster::shared();
    let target = pg_target(pg, &format!("ssm://{INSTANCE}"));
    let kh = keyhole(&[&target], &ssm, home.path());
    let port = kh.port();
    // One connection sits idle for 25 s between two statements.
    let rt = support::runtime();
    let (client, _driver) = session::connect(&rt, port, "idle");
    let first = session::simple_query(&rt, &client, "select 1").expect("first");
    std::thread::sleep(Duration::from_secs(25));
    let later = session::simple_query(&rt, &client, "select 2").expect("after idling");
    assert_eq!((first, later), (vec!["1".to_owned()], vec!["2".to_owned()]));
    let c = ssm.counters();
    assert_eq!(c.idle_closes, 0, "{c:?}");
    assert!(c.nops_received >= 2, "{c:?}");
    assert_eq!(c.sessions_started, 1);
}

/// Refusals name the hop and say what to fix.
#[test]
fn session_manager_refusals_name_the_hop_and_the_reason() {
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    let pg = PgCluster::shared();
    let hop = format!("ssm://{INSTANCE}");
    let target = pg_target(pg, &hop);
    let kh = keyhole(&[&target], &ssm, home.path());

    ssm.set_api_failure(Some(ApiFailure::AccessDenied));
    let said = select(kh.port(), "select 1").expect_err("denied");
    assert!(
        said.contains(&hop) && said.contains("ssm:StartSession"),
        "{said}"
    );

    ssm.set_api_failure(Some(ApiFailure::TargetNotConnected));
    let said = select(kh.port(), "select 1").expect_err("not connected");
    assert!(
        said.contains(&hop) && said.contains("not connected"),
        "{said}"
    );

    // The agent is offline: StartSession works, the handshake never comes.
    ssm.set_api_failure(None);
    ssm.set_faults(Faults {
        no_handshake: true,
        ..Faults::default()
    });
    let said = select(kh.port(), "select 1").expect_err("no handshake");
    assert!(
        said.contains(&hop) && said.contains("did not complete the session handshake"),
        "{said}"
    );
    ssm.wait_for(
        "the failed session terminated",
        Duration::from_secs(10),
        |s| s.counters().sessions_terminated >= 1,
    );
}

/// `via=ssm://i-...,ssh://USER@i-...`: SSH over Session Manager, as AWS
/// documents it, so an existing bastion layout works. The instance's own
/// `localhost:22` is a real sshd in a network namespace (the VPC), and the
/// database is a name only the namespace resolves.
#[test]
fn an_ssh_bastion_runs_over_a_session_manager_session() {
    let Some(ns) = Namespace::create() else {
        return;
    };
    ns.set_hosts(&[("db.internal", "127.0.0.1")]);
    let pg = PgCluster::shared();
    let relay = ns.relay_to(std::net::SocketAddr::from(([127, 0, 0, 1], pg.port)));
    let bastion = SshBastion::start(&ns);
    let home = scratch_dir("keyhole-ssm-home");
    let ssm = fake();
    ssm.route("localhost:22", bastion.addr);
    let config = bastion.ssh_config(INSTANCE);
    let target = format!(
        "postgres://db.internal:{}?ca-file={}&via=ssm://{INSTANCE},ssh://{INSTANCE}",
        relay.port(),
        utf8(&pg.pki.ca)
    );
    let kh = keyhole(&["--ssh-config", utf8(&config), &target], &ssm, home.path());
    for _ in 0..3 {
        assert_eq!(select(kh.port(), "select 40 + 2").as_deref(), Ok("42"));
    }
    assert_eq!(
        bastion.logins(),
        1,
        "one SSH login; sshd log:\n{}",
        bastion.log()
    );
    let starts = ssm.start_requests();
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert_eq!(starts[0].parameters["host"][0], "localhost");
    assert_eq!(starts[0].parameters["portNumber"][0], "22");
    // The session under the SSH connection is terminated at exit too.
    exits_terminating(kh, &ssm);
}

/// `iam=aws` through Session Manager: the token is signed on this side for
/// the database's own name and port, which the instance resolves (here:
/// `route`), never for an address keyhole dialled. A fake RDS in front of
/// the real PostgreSQL checks it as RDS does.
#[test]
fn an_iam_token_through_session_manager_is_signed_for_the_databases_own_name() {
    const DB: &str = "orders.abc123.us-east-1.rds.amazonaws.com";
    const DB_PORT: u16 = 5432;
    let home = scratch_dir("keyhole-ssm-home");
    let creds = AwsCredentials::generate();
    let ssm = FakeSsm::start(creds.clone());
    let rds = FakeRds::postgres_at(
        DB,
        PgCluster::shared(),
        TokenCheck::aws_for(&creds, DB, DB_PORT, ssm.region()),
        PgAsk::Cleartext,
    );
    // From the instance, the RDS name leads to the fake.
    ssm.route(
        &format!("{DB}:{DB_PORT}"),
        std::net::SocketAddr::from(([127, 0, 0, 1], rds.port())),
    );
    let target = format!(
        "postgres://{DB}:{DB_PORT}?via=ssm://{INSTANCE}&iam=aws&ca-file={}",
        utf8(&rds.pki().ca)
    );
    let kh = keyhole(&[&target], &ssm, home.path());
    assert_eq!(
        select(kh.port(), "select current_user").as_deref(),
        Ok(TRUST_USER)
    );
    let outcomes = rds.wait_for_outcomes(1, Duration::from_secs(15));
    assert_eq!(outcomes[0].result, Ok(()), "{outcomes:?}");
    let starts = ssm.start_requests();
    assert_eq!(starts[0].parameters["host"][0], DB);
    assert_eq!(starts[0].parameters["portNumber"][0], DB_PORT.to_string());
}
