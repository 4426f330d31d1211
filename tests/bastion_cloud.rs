//! `via=` hops together with the cloud features, with real servers: a
//! network namespace stands in for the VPC (see `tests/bastion.rs`), with a
//! real OpenSSH sshd and dante inside, and the databases reachable from
//! there only through relays on the namespace's own loopback.
//!
//! - `iam=aws` through an SSH bastion: the token is signed in keyhole for the
//!   database's own name and port (`db.internal:PORT`), never for the
//!   bastion or for an address keyhole dialled; a fake RDS in front of the
//!   real PostgreSQL checks it the way RDS does.
//! - A Cloud SQL instance target through a SOCKS5 hop: the Admin API is
//!   asked from here, and the TLS 1.3 tunnel to the instance's port 3307
//!   rides the hop, to the instance's address as the VPC sees it.
//! - `/readiness` names an SSH bastion whose login fails, and is ready with
//!   one that works.
//!
//! Where network namespaces cannot be made, each test says so loudly and is
//! skipped.

// Tests IAP and Session Manager under SSH: they need the default build (both cloud features).
#![cfg(all(feature = "aws", feature = "gcp"))]

mod support;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::bastion::{Socks5Proxy, SshBastion};
use support::clients;
use support::cloud::AwsCredentials;
use support::cloudsql::{self as fake, FakeSqlAdmin, InstanceSpec, IpType};
use support::fake_rds::{FakeRds, PgAsk, TokenCheck};
use support::keyhole::{Keyhole, Ready};
use support::netns::Namespace;
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER, TRUST_USER};
use support::session::wait_until;

/// The database's name, known only to the namespace's resolver.
const DB_NAME: &str = "db.internal";
const REGION: &str = "us-east-1";
/// How long a test waits for something that should happen within seconds.
const LIMIT: Duration = Duration::from_secs(15);

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// keyhole with exactly `args`, `env` added, ready once it listens on `port`.
fn keyhole_on(port: u16, args: &[&str], env: &[(&str, &str)]) -> Keyhole {
    Keyhole::spawn(args, env, Ready::Tcp(port))
}

#[test]
fn an_iam_token_through_an_ssh_bastion_is_signed_for_the_databases_own_name_and_port() {
    let Some(ns) = Namespace::create() else {
        return;
    };
    ns.set_hosts(&[(DB_NAME, "127.0.0.1")]);
    let creds = AwsCredentials::generate();
    // A fake RDS whose certificate names db.internal, in front of the real
    // PostgreSQL; inside the VPC it is db.internal:<relay port>.
    let rds = FakeRds::postgres_at(
        DB_NAME,
        PgCluster::shared(),
        TokenCheck::aws_for(&creds, DB_NAME, 0, REGION),
        PgAsk::Cleartext,
    );
    let relay = ns.relay_to(SocketAddr::from(([127, 0, 0, 1], rds.port())));
    let db_port = relay.port();
    // RDS accepts only a token signed for its own endpoint: db.internal and
    // the port the target names (not the fake's port on the host, not the
    // bastion, not 127.0.0.1).
    rds.set_check(TokenCheck::aws_for(&creds, DB_NAME, db_port, REGION));
    let bastion = SshBastion::start(&ns);
    let config = bastion.ssh_config("bastion");
    let home = support::scratch_dir("keyhole-iam-home");
    let target = format!(
        "postgres://{DB_NAME}:{db_port}?via=ssh://bastion&iam=aws&region={REGION}&ca-file={}",
        rds.pki().ca.display()
    );
    let port = support::free_port();
    let port_text = port.to_string();
    let keyhole = keyhole_on(
        port,
        &["--port", &port_text, "--ssh-config", utf8(&config), &target],
        &[
            ("HOME", utf8(home.path())),
            ("RUST_LOG", "trace"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_ACCESS_KEY_ID", &creds.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", &creds.secret_access_key),
            ("AWS_SESSION_TOKEN", &creds.session_token),
        ],
    );

    // A client with no password logs in: keyhole answered with a token the
    // fake verified (signature, expiry, user, host and port).
    let out = clients::psql(port, TRUST_USER, None, "select current_user");
    assert_eq!(
        clients::expect_success(&out, "psql with an IAM token through the bastion"),
        TRUST_USER,
        "{}",
        keyhole.logs()
    );
    let outcomes = rds.wait_for_outcomes(1, LIMIT);
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0].user, TRUST_USER);
    assert_eq!(outcomes[0].result, Ok(()), "{outcomes:?}");
    assert_eq!(bastion.logins(), 1, "{}", bastion.log());
    assert!(relay.connections() >= 1, "the bytes went through the VPC");

    // Which endpoint is the token signed for? The fake, told to expect the
    // loopback address keyhole might have signed instead, refuses and says
    // what the token names: the database's own name and port.
    rds.set_check(TokenCheck::aws_for(&creds, "127.0.0.1", db_port, REGION));
    let out = clients::psql(port, TRUST_USER, None, "select 1");
    assert!(!out.status.success(), "{}", clients::stdout(&out));
    let err = clients::stderr(&out);
    assert!(
        err.contains("PAM authentication failed for user \"trust_user\""),
        "{err}"
    );
    let outcomes = rds.wait_for_outcomes(2, LIMIT);
    let signed_for = outcomes[1]
        .result
        .clone()
        .expect_err("a token for another endpoint");
    assert_eq!(
        signed_for,
        format!("signed for {DB_NAME}:{db_port}, expected 127.0.0.1:{db_port}"),
        "{outcomes:?}"
    );
    let bastion_addr = bastion.addr.to_string();
    assert!(!signed_for.contains(&bastion_addr), "{signed_for}");
    assert!(
        !signed_for.contains(&format!("{}:", bastion.addr.ip())),
        "{signed_for}"
    );
    // Still the one SSH login for both connections.
    assert_eq!(bastion.logins(), 1, "{}", bastion.log());

    // No secret and no token reached keyhole's log.
    let logs = keyhole.logs();
    for secret in [&creds.secret_access_key, &creds.session_token] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the log");
    }
    assert!(!logs.contains("X-Amz-Signature"), "a token reached the log");
}

#[test]
fn a_cloud_sql_instance_through_a_socks5_hop_the_3307_tunnel_rides_the_hop() {
    let Some(ns) = Namespace::create() else {
        return;
    };
    // A cluster the fake instance reaches over its Unix socket.
    let pg = PgCluster::start(fake::pg_options(&[]));
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::postgres("pg-behind-a-hop", &pg));
    let addr = instance
        .addr(IpType::Public)
        .expect("the instance's address");
    assert_eq!(addr.port(), 3307);
    // Inside the VPC the instance's address is its own: a relay listening
    // on that address and port 3307 in the namespace, to the fake's
    // server-side proxy on the host.
    let relay = ns.relay_on(addr, addr);
    let dante = Socks5Proxy::start_dante(&ns);
    let hop = dante.url();
    let port = support::free_port();
    let token = api.admin_token();
    let url = api.url();
    let target = format!("{}?port={port}&via={hop}", instance.connection_name());
    let keyhole = keyhole_on(
        port,
        &["--token", &token, "--sqladmin-api-endpoint", &url, &target],
        &[("RUST_LOG", "debug")],
    );

    let query = |port: u16, sql: &str| clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), sql);
    for i in 0..2 {
        let out = query(port, &format!("select current_user || ' ' || {i} + 40"));
        assert_eq!(
            clients::expect_success(&out, "psql to a Cloud SQL instance through the hop"),
            format!("scram_user {}", 40 + i),
            "{}",
            keyhole.logs()
        );
    }
    // The instance saw TLS with a client certificate its API issued, and
    // every connection it saw came through the VPC's relay: none was
    // dialled from here.
    let seen = api.wait_for_connections(instance.name(), 2, LIMIT);
    assert!(
        seen.iter().all(|c| c.handshake.is_ok() && c.issued_by_fake),
        "{seen:#?}"
    );
    assert_eq!(relay.connections(), seen.len(), "{seen:#?}");
    // dante dialled the instance's address on 3307 (it logs addresses as
    // IP.PORT).
    let dialled = format!("{}.3307", addr.ip());
    assert!(dante.log().contains(&dialled), "{}", dante.log());

    // Without the hop there is no way: keyhole says which hop failed and
    // dials nothing itself.
    dante.kill();
    let out = query(port, "select 1");
    assert!(!out.status.success(), "{}", clients::stdout(&out));
    let err = clients::stderr(&out);
    assert!(
        err.contains(&format!("socks5://{} is unreachable", dante.addr)),
        "{err}"
    );
    assert_eq!(api.connections(instance.name()).len(), seen.len());
    assert_eq!(relay.connections(), seen.len());
    // Back up: the next client goes through again.
    dante.restart();
    let out = query(port, "select 'again'");
    assert_eq!(
        clients::expect_success(&out, "after the hop came back"),
        "again"
    );
    assert_eq!(relay.connections(), seen.len() + 1);
    drop(keyhole);

    // The same with the hop for every target (--via) and the bare
    // connection name, as cloud-sql-proxy users write it.
    let port = support::free_port();
    let target = format!("{}?port={port}", instance.connection_name());
    let keyhole = keyhole_on(
        port,
        &[
            "--via",
            &hop,
            "--token",
            &token,
            "--sqladmin-api-endpoint",
            &url,
            &target,
        ],
        &[("RUST_LOG", "debug")],
    );
    let out = query(port, "select 'global'");
    assert_eq!(
        clients::expect_success(&out, "with --via"),
        "global",
        "{}",
        keyhole.logs()
    );
    assert_eq!(relay.connections(), seen.len() + 2);
    assert_eq!(api.connections(instance.name()).len(), seen.len() + 2);
}

#[test]
fn readiness_names_a_bastion_whose_login_fails_and_is_ready_with_one_that_works() {
    let Some(ns) = Namespace::create() else {
        return;
    };
    ns.set_hosts(&[(DB_NAME, "127.0.0.1")]);
    let pg = PgCluster::shared();
    let relay = ns.relay_to(SocketAddr::from(([127, 0, 0, 1], pg.port)));
    let bastion = SshBastion::start(&ns);
    let good = bastion.ssh_config("bastion");
    let wrong = bastion.ssh_config_wrong_key("bastion");
    let ca = utf8(&pg.pki.ca).to_owned();
    let target = format!("postgres://{DB_NAME}:{}?via=ssh://bastion", relay.port());
    let start = |config: &Path| -> (Keyhole, u16) {
        let http_port = support::free_port();
        let keyhole = Keyhole::start(&[
            "--ca-file",
            &ca,
            "--health-check",
            "--http-port",
            &http_port.to_string(),
            "--ssh-config",
            utf8(config),
            &target,
        ]);
        (keyhole, http_port)
    };
    let readiness = |http_port: u16| {
        support::http::get(http_port, "/readiness")
            .map(|(status, body)| (status, body.trim_end().to_owned()))
    };
    let select = |port: u16| {
        let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), "select 40 + 2");
        out.status
            .success()
            .then(|| clients::stdout(&out).trim().to_owned())
    };

    // The wrong key: keyhole logs in at start, in the background, is
    // refused, and says so with no client having asked.
    let (keyhole, http_port) = start(&wrong);
    let last = RefCell::new(Err(String::new()));
    wait_until(
        "/readiness fails with the bastion's refusal",
        LIMIT,
        || {
            let answer = readiness(http_port);
            let done = matches!(&answer, Ok((503, body)) if body.contains("ssh://bastion"));
            *last.borrow_mut() = answer;
            done
        },
        || format!("{:?}\n{}", last.borrow(), keyhole.logs()),
    );
    let (_, body) = last.into_inner().expect("an answer");
    assert!(
        body.contains("ssh://bastion refused the SSH login: ")
            && body.contains("Permission denied"),
        "{body}"
    );
    assert_eq!(bastion.logins(), 0, "{}", bastion.log());
    assert_eq!(relay.connections(), 0);
    // /liveness is not concerned: the process serves.
    assert_eq!(
        support::http::get(http_port, "/liveness").map(|(s, _)| s),
        Ok(200)
    );

    // The key fixed (the same file now holds the good config): the next
    // client logs in, and keyhole is ready again.
    std::fs::copy(&good, &wrong).expect("fix the ssh config");
    let mut answer = None;
    wait_until(
        "a client through the fixed bastion config",
        LIMIT,
        || {
            answer = select(keyhole.port());
            answer.is_some()
        },
        || keyhole.logs(),
    );
    assert_eq!(answer.as_deref(), Some("42"));
    assert_eq!(
        readiness(http_port),
        Ok((200, "ok".to_owned())),
        "{}",
        keyhole.logs()
    );
    assert_eq!(bastion.logins(), 1, "{}", bastion.log());
    drop(keyhole);

    // A working bastion from the start: keyhole logs in before any client,
    // and is ready.
    let (keyhole, http_port) = start(&good);
    wait_until(
        "the login at start",
        LIMIT,
        || bastion.logins() == 2,
        || format!("{}\n{}", bastion.log(), keyhole.logs()),
    );
    wait_until(
        "keyhole says the SSH connection is open",
        LIMIT,
        || {
            keyhole
                .logs()
                .contains("SSH connection to the bastion open")
        },
        || keyhole.logs(),
    );
    assert_eq!(
        readiness(http_port),
        Ok((200, "ok".to_owned())),
        "{}",
        keyhole.logs()
    );
    assert_eq!(select(keyhole.port()).as_deref(), Some("42"));
    assert_eq!(bastion.logins(), 2, "one login serves the client too");
    assert_eq!(readiness(http_port), Ok((200, "ok".to_owned())));
}
