//! Token login (`iam=aws`, `iam=gcp`) through the real `keyhole` binary, the
//! whole path: real clients with no password → keyhole → a fake RDS / Cloud
//! SQL front end that checks the token the way the service does (the SigV4
//! signature recomputed from the token's own parameters with the test
//! secret, expiry, host and port, user) → the real PostgreSQL and MariaDB.
//! Credentials come from fake endpoints written from their documented
//! contracts (ECS container endpoint, IMDSv2, STS, the GCP metadata server,
//! the OAuth2 token endpoint), started here.
//!
//! No log line may carry a secret: keyhole runs with `RUST_LOG=trace` in
//! these tests and its whole log is searched for every secret in play.

// Tests both clouds' token sources: they need the default build (both cloud features).
#![cfg(all(feature = "aws", feature = "gcp"))]

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use support::clients;
use support::cloud::{FakeEcs, FakeGcpMetadata, FakeImds, FakeOAuth, FakeSts, Mode};
use support::fake_rds::{self, FakeRds, PgAsk, SwitchData, TokenCheck, IAM_USER};
use support::keyhole::{Keyhole, Ready};
use support::mariadb::{self, MariaDb, ED25519_USER};
use support::postgres::{PgCluster, SCRAM_USER, TRUST_USER};
use support::sigv4::{verify_rds_token, RdsExpectation};

const REGION: &str = "us-east-1";

/// keyhole with exactly `args` after `--port`, the environment a clean
/// container would have (HOME without ~/.aws, no instance metadata unless
/// the test provides one) plus `env`, logging everything it logs.
fn keyhole(args: &[&str], home: &Path, env: &[(&str, &str)]) -> Keyhole {
    let port = support::free_port();
    let port_text = port.to_string();
    let mut all = vec!["--port", port_text.as_str()];
    all.extend_from_slice(args);
    let home = home.to_str().expect("UTF-8 path");
    let mut full: Vec<(&str, &str)> = vec![
        ("HOME", home),
        ("RUST_LOG", "trace"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    full.extend_from_slice(env);
    Keyhole::spawn(&all, &full, Ready::Tcp(port))
}

/// `keyhole token ...` with only `env` (and PATH, HOME) set.
fn token_command(args: &[&str], home: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyhole"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .arg("token")
        .args(args);
    support::process::output_with_timeout(&mut cmd, Duration::from_secs(60))
}

/// Panics if any of `secrets` (or any signature) appears in `log`; the
/// message never repeats the secret.
fn assert_no_secret(log: &str, secrets: &[&str]) {
    for (i, secret) in secrets.iter().enumerate() {
        assert!(!secret.is_empty());
        assert!(!log.contains(secret), "secret #{i} reached keyhole's log");
    }
    assert!(
        !log.contains("X-Amz-Signature"),
        "a token reached keyhole's log"
    );
}

/// The value of the one sample of `/metrics` on `port` whose line starts
/// with `name{` and carries `label` (e.g. `result="ok"`).
fn metric(port: u16, name: &str, label: &str) -> f64 {
    let (status, body) = support::http::get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    let line = body
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .unwrap_or_else(|| panic!("no {name} with {label} in:\n{body}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable sample {line}"))
}

fn psql_ok(port: u16, user: &str, sql: &str) -> String {
    let out = clients::psql(port, user, None, sql);
    clients::expect_success(&out, "psql with no password through keyhole")
}

fn psql_err(port: u16, user: &str) -> String {
    let out = clients::psql(port, user, None, "select 1");
    assert!(
        !out.status.success(),
        "psql should fail: {}",
        clients::stdout(&out)
    );
    clients::stderr(&out)
}

#[test]
fn psql_logs_in_with_an_rds_token_signed_with_ecs_task_credentials() {
    let home = support::scratch_dir("keyhole-iam-home");
    // Fargate's full-URI form, with the authorization token in a file that
    // is read on every fetch.
    let auth = "Bearer task-auth-7f3a";
    let ecs = FakeEcs::start("/v2/credentials/task", Some(auth));
    let auth_file = home.path().join("ecs-auth-token");
    std::fs::write(&auth_file, auth).expect("write auth token file");
    let creds = ecs.credentials();
    let pg = PgCluster::shared();
    let rds = FakeRds::postgres(
        pg,
        TokenCheck::aws_for(&creds, fake_rds::DEFAULT_ENDPOINT, 0, REGION),
        PgAsk::Cleartext,
    );
    let target = format!("{}&iam=aws", rds.keyhole_target());
    let http_port = support::free_port().to_string();
    let kh = keyhole(
        &["--prometheus", "--http-port", &http_port, &target],
        home.path(),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &ecs.full_uri()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                auth_file.to_str().expect("UTF-8"),
            ),
        ],
    );
    for _ in 0..3 {
        assert_eq!(
            psql_ok(kh.port(), TRUST_USER, "select current_user"),
            TRUST_USER
        );
    }
    let outcomes = rds.wait_for_outcomes(3, Duration::from_secs(10));
    assert!(
        outcomes.iter().all(|o| o.is_ok() && o.user == TRUST_USER),
        "{outcomes:?}"
    );
    // One token for the three sessions, so one credential fetch.
    assert_eq!(ecs.requests().len(), 1, "{:?}", ecs.requests());
    // The metrics say the same, and how long the token has left (RDS
    // tokens live 15 minutes).
    let http_port: u16 = http_port.parse().expect("port");
    let all = "target=";
    assert_eq!(
        metric(http_port, "keyhole_token_injections_total", all),
        3.0
    );
    assert_eq!(metric(http_port, "keyhole_token_failures_total", all), 0.0);
    assert_eq!(
        metric(http_port, "keyhole_token_refreshes_total", "result=\"ok\""),
        1.0
    );
    let left = metric(http_port, "keyhole_token_expiry_seconds", all);
    assert!(left > 600.0 && left <= 900.0, "{left}");
    let (_, scrape) = support::http::get(http_port, "/metrics").expect("GET /metrics");
    assert_no_secret(
        &scrape,
        &[&creds.secret_access_key, &creds.session_token, auth],
    );
    // The region came from the endpoint name; the host signed is the RDS name,
    // not the 127.0.0.1 keyhole dialled (the fake checks both).
    let log = kh.logs();
    assert!(
        log.contains("token login: keyhole answers the server's password request"),
        "{log}"
    );
    assert_no_secret(
        &log,
        &[&creds.secret_access_key, &creds.session_token, auth],
    );
}

/// The `keyhole_pool_*` lines of a scrape, shown when a pool count is off.
fn pool_lines(port: u16) -> Vec<String> {
    let (_, scrape) = support::http::get(port, "/metrics").expect("GET /metrics");
    scrape
        .lines()
        .filter(|l| l.starts_with("keyhole_pool_") && !l.contains("_bucket"))
        .map(str::to_owned)
        .collect()
}

/// Waits (up to 20 s) until the pool holds `idle` idle connections and none
/// in use (a client's Terminate is answered before keyhole's reset ends).
fn wait_pool_settled(port: u16, idle: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(port, "keyhole_pool_connections", "state=\"idle\"") != idle
        || metric(port, "keyhole_pool_connections", "state=\"in_use\"") != 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool did not settle at {idle} idle: {:#?}",
            pool_lines(port)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The point of `pool=session` on a token target: RDS limits IAM logins
/// per second, and a burst of new connections (psql runs one after
/// another, then `pgbench -C`, a new connection per transaction) must not
/// mint and present one token each. The fake RDS counts the logins it
/// checked; keyhole's metrics must say the same.
#[test]
fn a_pooled_token_target_logs_in_once_per_server_connection_not_once_per_client() {
    let home = support::scratch_dir("keyhole-iam-home");
    let auth = "Bearer task-auth-pool-51c2";
    let ecs = FakeEcs::start("/v2/credentials/task", Some(auth));
    let auth_file = home.path().join("ecs-auth-token");
    std::fs::write(&auth_file, auth).expect("write auth token file");
    let creds = ecs.credentials();
    let pg = PgCluster::shared();
    let rds = FakeRds::postgres(
        pg,
        TokenCheck::aws_for(&creds, fake_rds::DEFAULT_ENDPOINT, 0, REGION),
        PgAsk::Cleartext,
    );
    let pool_size = 2;
    let target = format!(
        "{}&iam=aws&pool=session&pool-size={pool_size}",
        rds.keyhole_target()
    );
    let http_port = support::free_port();
    let http = http_port.to_string();
    let kh = keyhole(
        &["--prometheus", "--http-port", &http, &target],
        home.path(),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &ecs.full_uri()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                auth_file.to_str().expect("UTF-8"),
            ),
        ],
    );
    // psql runs one after another: each finds the connection the last one
    // left (once keyhole has reset and parked it).
    let mut psql_pids = Vec::new();
    for _ in 0..3 {
        let text = psql_ok(
            kh.port(),
            TRUST_USER,
            "select current_user, pg_backend_pid()",
        );
        let (user, pid) = text.split_once('|').unwrap_or((&text, ""));
        assert_eq!(user, TRUST_USER, "{text}");
        psql_pids.push(pid.to_owned());
        wait_pool_settled(http_port, 1.0);
    }
    assert!(
        psql_pids.iter().all(|p| *p == psql_pids[0]),
        "three psql runs, three server connections: {psql_pids:?}"
    );
    assert_eq!(rds.outcomes().len(), 1, "{:?}", rds.outcomes());

    // Then a burst: two clients, a new connection for each of their 20
    // transactions.
    let dir = support::scratch_dir("keyhole-iam-pool-bench-");
    let script = dir.path().join("select.sql");
    std::fs::write(&script, "select current_user;\n").expect("write the pgbench script");
    let port = kh.port().to_string();
    let out = clients::pgbench(
        &[
            "-n",
            "-C",
            "-c",
            "2",
            "-t",
            "20",
            "-f",
            script.to_str().expect("UTF-8"),
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            TRUST_USER,
            "postgres",
        ],
        None,
    );
    let text = clients::expect_success(&out, "pgbench -C through a pooled token target");
    assert!(
        text.contains("number of transactions actually processed: 40/40"),
        "{text}"
    );
    let all = "target=";
    let pool = || pool_lines(http_port);
    // Every session has checked out its connection by now; the last
    // ones may still be in their reset.
    let sessions = metric(http_port, "keyhole_connections_total", all);
    let outcomes = rds.outcomes();
    assert!(
        outcomes.iter().all(|o| o.is_ok() && o.user == TRUST_USER),
        "{outcomes:?}"
    );
    let logins = outcomes.len() as f64;
    // psql's key (application_name=psql) and pgbench's differ: psql's one
    // connection, then at most pool-size for pgbench's (psql's is closed
    // to make room).
    assert!(
        logins <= 1.0 + f64::from(pool_size),
        "{logins} IAM logins for {sessions} connections: {:#?}",
        pool()
    );
    assert_eq!(
        metric(http_port, "keyhole_pool_opened_total", all),
        logins,
        "{:#?}",
        pool()
    );
    assert_eq!(
        metric(http_port, "keyhole_token_injections_total", all),
        logins
    );
    assert_eq!(
        metric(http_port, "keyhole_pool_reused_total", all),
        sessions - logins,
        "every other connection reused one: {:#?}",
        pool()
    );
    assert!(
        sessions >= 43.0,
        "3 psql runs, 40 pgbench connections: {sessions}"
    );
    assert_eq!(metric(http_port, "keyhole_token_failures_total", all), 0.0);
    // One token (15 minutes) for every login, so one credential fetch.
    assert_eq!(ecs.requests().len(), 1, "{:?}", ecs.requests());
    wait_pool_settled(http_port, f64::from(pool_size));

    let (_, scrape) = support::http::get(http_port, "/metrics").expect("GET /metrics");
    assert_no_secret(
        &scrape,
        &[&creds.secret_access_key, &creds.session_token, auth],
    );
    assert_no_secret(
        &kh.logs(),
        &[&creds.secret_access_key, &creds.session_token, auth],
    );
}

#[test]
fn user_fixes_the_database_user_whatever_the_client_sends() {
    let home = support::scratch_dir("keyhole-iam-home");
    let ecs = FakeEcs::start("/creds", None);
    let pg = PgCluster::shared();
    let rds = FakeRds::postgres(
        pg,
        TokenCheck::aws_for(&ecs.credentials(), fake_rds::DEFAULT_ENDPOINT, 0, REGION),
        PgAsk::Cleartext,
    );
    let target = format!("{}&iam=aws&user={TRUST_USER}", rds.keyhole_target());
    let kh = keyhole(
        &[&target],
        home.path(),
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &ecs.full_uri())],
    );
    assert_eq!(
        psql_ok(kh.port(), "whoever", "select current_user"),
        TRUST_USER
    );
    let outcomes = rds.wait_for_outcomes(1, Duration::from_secs(10));
    assert_eq!(
        outcomes[0].user, TRUST_USER,
        "the token was signed for the fixed user"
    );
}

#[test]
fn mariadb_logs_in_with_an_rds_token_from_imdsv2_credentials_rds_and_aurora_style() {
    let home = support::scratch_dir("keyhole-iam-home");
    let my = MariaDb::shared();
    fake_rds::ensure_mysql_iam_user(my);
    let imds = FakeImds::start();
    let creds = imds.credentials();
    for switch in [SwitchData::WithScramble, SwitchData::None] {
        let rds = FakeRds::mysql(
            my,
            TokenCheck::aws_for(&creds, fake_rds::DEFAULT_ENDPOINT, 0, REGION),
            switch,
        );
        let target = format!("{}&iam=aws", rds.keyhole_target());
        let kh = keyhole(
            &[&target],
            home.path(),
            &[
                ("AWS_EC2_METADATA_DISABLED", "false"),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url()),
            ],
        );
        let out = mariadb::mariadb(kh.port(), IAM_USER, None, "select current_user()");
        assert_eq!(
            clients::expect_success(&out, &format!("mariadb, {switch:?}")),
            "iam_user@%"
        );
        let outcomes = rds.wait_for_outcomes(1, Duration::from_secs(10));
        assert!(outcomes[0].is_ok(), "{outcomes:?}");
        assert_no_secret(
            &kh.logs(),
            &[&creds.secret_access_key, &creds.session_token],
        );
    }
    // IMDSv2: a session token first, then the role, then its credentials.
    let requests = imds.requests();
    assert_eq!(
        requests.first().map(|r| r.method.as_str()),
        Some("PUT"),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.header("x-aws-ec2-metadata-token").is_some()),
        "{requests:?}"
    );
}

#[test]
fn a_pooled_mariadb_target_logs_in_with_one_token_for_several_clients() {
    let home = support::scratch_dir("keyhole-iam-home");
    let my = MariaDb::shared();
    fake_rds::ensure_mysql_iam_user(my);
    let imds = FakeImds::start();
    let creds = imds.credentials();
    let rds = FakeRds::mysql(
        my,
        TokenCheck::aws_for(&creds, fake_rds::DEFAULT_ENDPOINT, 0, REGION),
        SwitchData::WithScramble,
    );
    let target = format!("{}&iam=aws&pool=session", rds.keyhole_target());
    let kh = keyhole(
        &[&target],
        home.path(),
        &[
            ("AWS_EC2_METADATA_DISABLED", "false"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url()),
        ],
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        let out = mariadb::mariadb(
            kh.port(),
            IAM_USER,
            None,
            "select connection_id(), current_user()",
        );
        seen.push(clients::expect_success(
            &out,
            "mariadb through a pooled iam target",
        ));
        // The reset and the return to the pool follow the client's COM_QUIT.
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(seen[0].ends_with("iam_user@%"), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    let outcomes = rds.wait_for_outcomes(1, Duration::from_secs(10));
    assert_eq!(outcomes.len(), 1, "one token login: {outcomes:?}");
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    assert_no_secret(
        &kh.logs(),
        &[&creds.secret_access_key, &creds.session_token],
    );
}

#[test]
fn the_aws_chain_finds_environment_profile_assume_role_and_web_identity_credentials() {
    let home = support::scratch_dir("keyhole-iam-home");
    let endpoint = "orders.abc123.eu-west-1.rds.amazonaws.com";
    let args = ["aws", &format!("{endpoint}:5432") as &str, "--user", "app"];
    let verify = |out: &Output, key: &str, secret: &str, session: Option<&str>, what: &str| {
        let token = clients::expect_success(out, what);
        let expectation = RdsExpectation {
            access_key_id: key,
            secret,
            host: endpoint,
            port: 5432,
            region: "eu-west-1",
            session_token: session,
            user: "app",
        };
        verify_rds_token(&token, &expectation, SystemTime::now())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    };

    // Environment.
    let out = token_command(
        &args,
        home.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", "env/secret+1"),
        ],
    );
    verify(&out, "AKIDENV", "env/secret+1", None, "environment");

    // A named profile in the shared credentials file.
    let creds_file = home.path().join("credentials");
    std::fs::write(
        &creds_file,
        "[dev]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = profile-secret\n",
    )
    .expect("write");
    let config_file = home.path().join("config");
    let sts = FakeSts::start();
    std::fs::write(
        &config_file,
        format!(
            "[profile deploy]\nrole_arn = {}\nsource_profile = dev\nrole_session_name = keyhole\n",
            sts.role_arn()
        ),
    )
    .expect("write");
    let files = [
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            creds_file.to_str().expect("UTF-8"),
        ),
        ("AWS_CONFIG_FILE", config_file.to_str().expect("UTF-8")),
    ];
    let mut env = files.to_vec();
    env.push(("AWS_PROFILE", "dev"));
    let out = token_command(&args, home.path(), &env);
    verify(&out, "AKIDPROFILE", "profile-secret", None, "profile");

    // Assume-role through STS, from that profile.
    let sts_url = sts.url();
    let mut env = files.to_vec();
    env.extend([
        ("AWS_PROFILE", "deploy"),
        ("AWS_ENDPOINT_URL_STS", sts_url.as_str()),
        ("AWS_REGION", "eu-west-1"),
    ]);
    let out = token_command(&args, home.path(), &env);
    let assumed = sts.credentials();
    verify(
        &out,
        &assumed.access_key_id,
        &assumed.secret_access_key,
        Some(&assumed.session_token),
        "assume-role",
    );
    assert!(
        sts.requests()
            .iter()
            .any(|r| r.form_param("Action").as_deref() == Some("AssumeRole")),
        "{:?}",
        sts.requests()
    );

    // EKS web identity.
    let token_file = sts.write_web_identity_token_file(home.path());
    let role = sts.role_arn();
    let out = token_command(
        &args,
        home.path(),
        &[
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                token_file.to_str().expect("UTF-8"),
            ),
            ("AWS_ROLE_ARN", &role),
            ("AWS_ROLE_SESSION_NAME", "keyhole-test"),
            ("AWS_ENDPOINT_URL_STS", &sts_url),
            ("AWS_REGION", "eu-west-1"),
        ],
    );
    let web = sts.credentials();
    verify(
        &out,
        &web.access_key_id,
        &web.secret_access_key,
        Some(&web.session_token),
        "web identity",
    );
    assert!(
        sts.requests()
            .iter()
            .any(|r| r.form_param("Action").as_deref() == Some("AssumeRoleWithWebIdentity")),
        "{:?}",
        sts.requests()
    );
}

#[test]
fn keyhole_token_aws_is_reproducible_with_a_fixed_time() {
    let home = support::scratch_dir("keyhole-iam-home");
    let out = token_command(
        &[
            "aws",
            "prod-instance.us-east-1.rds.amazonaws.com:3306",
            "--user",
            "peccy",
            "--at",
            "2024-08-26T22:00:00Z",
        ],
        home.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "akid"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ],
    );
    // REFERENCE.md vector A, through the binary.
    assert_eq!(
        clients::expect_success(&out, "keyhole token aws"),
        "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy&X-Amz-Algorithm=AWS4-HMAC-SHA256\
         &X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240826T220000Z\
         &X-Amz-Expires=900&X-Amz-SignedHeaders=host\
         &X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89"
    );
    let out = token_command(
        &["aws", "db.internal:5432", "--user", "app"],
        home.path(),
        &[("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "s")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        clients::stderr(&out).contains("iam=aws needs a region"),
        "{}",
        clients::stderr(&out)
    );
}

#[test]
fn a_credentials_endpoint_that_is_down_slow_or_garbage_fails_the_connection_clearly_and_keyhole_stays_up(
) {
    let home = support::scratch_dir("keyhole-iam-home");
    let ecs = FakeEcs::start("/creds", None);
    let pg = PgCluster::shared();
    let rds = FakeRds::postgres(
        pg,
        TokenCheck::aws_for(&ecs.credentials(), fake_rds::DEFAULT_ENDPOINT, 0, REGION),
        PgAsk::Cleartext,
    );
    let target = format!("{}&iam=aws", rds.keyhole_target());
    let http_port = support::free_port();
    let http_port_text = http_port.to_string();
    let kh = keyhole(
        &[
            "--connect-timeout",
            "5s",
            "--prometheus",
            "--http-port",
            &http_port_text,
            &target,
        ],
        home.path(),
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &ecs.full_uri())],
    );
    let prefix = format!("keyhole could not get an IAM token for user \"{TRUST_USER}\"");

    // The chain retries a refused endpoint with backoff (about 1.6 s in
    // all): the timeout leaves room for that, so "down" is told apart from
    // "slow" even on a loaded machine.
    ecs.set_mode(Mode::Down);
    let err = psql_err(kh.port(), TRUST_USER);
    assert!(err.contains(&prefix), "{err}");
    assert!(
        err.contains("aws credentials from the AWS credential chain"),
        "{err}"
    );

    ecs.set_mode(Mode::Garbage);
    let err = psql_err(kh.port(), TRUST_USER);
    assert!(err.contains(&prefix), "{err}");

    ecs.set_mode(Mode::Slow(Duration::from_secs(20)));
    let err = psql_err(kh.port(), TRUST_USER);
    assert!(err.contains(&prefix), "{err}");
    assert!(
        err.contains("aws credentials: no answer within 5s"),
        "{err}"
    );

    // Nothing reached the database without a token.
    assert!(rds.outcomes().is_empty(), "{:?}", rds.outcomes());
    // The closed line follows the client's error; wait for all three, then
    // check there were no more.
    let log = kh.wait_for_log("outcome=\"credentials\"", 3);
    assert_eq!(log.matches("outcome=\"credentials\"").count(), 3, "{log}");
    assert_eq!(
        metric(http_port, "keyhole_token_failures_total", "target="),
        3.0
    );
    assert_eq!(
        metric(
            http_port,
            "keyhole_token_refreshes_total",
            "result=\"error\""
        ),
        3.0
    );
    assert_eq!(
        metric(
            http_port,
            "keyhole_connections_closed_total",
            "outcome=\"credentials\""
        ),
        3.0
    );

    // The same process serves as soon as the endpoint recovers.
    ecs.set_mode(Mode::Normal);
    assert_eq!(
        psql_ok(kh.port(), TRUST_USER, "select 'recovered'"),
        "recovered"
    );
}

#[test]
fn a_server_that_asks_for_something_else_gets_a_message_that_says_what_to_check() {
    let home = support::scratch_dir("keyhole-iam-home");
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
        ("AWS_SECRET_ACCESS_KEY", "test-secret"),
    ];

    // The real PostgreSQL asks scram_user for SCRAM, as RDS asks a user without rds_iam.
    let pg = PgCluster::shared();
    let target = format!(
        "{}&ca-file={}&iam=aws&region={REGION}",
        pg.keyhole_target(),
        pg.pki.ca.display()
    );
    let kh = keyhole(&[&target], home.path(), &env);
    let err = psql_err(kh.port(), SCRAM_USER);
    assert!(
        err.contains("the server asked for SASL (SCRAM) authentication for user \"scram_user\", not for the password an IAM token answers: on RDS, the user needs GRANT rds_iam"),
        "{err}"
    );
    kh.wait_for_log("outcome=\"token_not_asked\"", 1);

    // A token the server rejects: its own words reach the client.
    let rds = FakeRds::postgres(
        pg,
        TokenCheck::aws_for(
            &support::cloud::AwsCredentials::generate(),
            fake_rds::DEFAULT_ENDPOINT,
            0,
            REGION,
        ),
        PgAsk::Cleartext,
    );
    let kh = keyhole(
        &[&format!("{}&iam=aws", rds.keyhole_target())],
        home.path(),
        &env,
    );
    let err = psql_err(kh.port(), TRUST_USER);
    assert!(
        err.contains("PAM authentication failed for user \"trust_user\""),
        "{err}"
    );

    // The real MariaDB switches ed25519_user to its own plugin.
    let my = MariaDb::shared();
    let target = format!(
        "{}&ca-file={}&iam=aws&region={REGION}",
        my.keyhole_target(),
        my.pki().ca.display()
    );
    let kh = keyhole(&[&target], home.path(), &env);
    let out = mariadb::mariadb(kh.port(), ED25519_USER, None, "select 1");
    let err = clients::stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("1045"), "{err}");
    assert!(err.contains("the server asked for the client_ed25519 authentication method for user \"ed25519_user\""), "{err}");
    assert!(
        err.contains("IDENTIFIED WITH AWSAuthenticationPlugin"),
        "{err}"
    );
}

#[test]
fn psql_logs_in_with_a_cloud_sql_token_from_the_metadata_server() {
    let home = support::scratch_dir("keyhole-iam-home");
    let metadata = FakeGcpMetadata::start();
    let token = metadata.access_token();
    let pg = PgCluster::shared();
    let rds = FakeRds::postgres_at(
        "inst-abc.us-central1.sql.goog",
        pg,
        TokenCheck::Gcp {
            accepted: vec![token.clone()],
        },
        PgAsk::Cleartext,
    );
    let target = format!("{}&iam=gcp", rds.keyhole_target());
    let kh = keyhole(
        &[&target],
        home.path(),
        &[("GCE_METADATA_HOST", &metadata.host())],
    );
    assert_eq!(
        psql_ok(kh.port(), TRUST_USER, "select current_user"),
        TRUST_USER
    );
    assert!(rds.wait_for_outcomes(1, Duration::from_secs(10))[0].is_ok());
    let scopes = metadata.scopes_requested();
    assert!(
        scopes
            .iter()
            .flatten()
            .any(|s| s.contains("https://www.googleapis.com/auth/sqlservice.login")),
        "{scopes:?}"
    );
    assert!(metadata
        .requests()
        .iter()
        .all(|r| r.header("metadata-flavor") == Some("Google")));
    assert_no_secret(&kh.logs(), &[&token]);
}

/// `iam=gcp` with `pool=session`: psql runs one after another share one
/// server connection, so one token login reaches the Cloud SQL front end.
#[test]
fn a_pooled_cloud_sql_token_target_logs_in_once_for_psql_runs_one_after_another() {
    let home = support::scratch_dir("keyhole-iam-home");
    let metadata = FakeGcpMetadata::start();
    let token = metadata.access_token();
    let pg = PgCluster::shared();
    let rds = FakeRds::postgres_at(
        "inst-abc.us-central1.sql.goog",
        pg,
        TokenCheck::Gcp {
            accepted: vec![token.clone()],
        },
        PgAsk::Cleartext,
    );
    let target = format!("{}&iam=gcp&pool=session&pool-size=2", rds.keyhole_target());
    let http_port = support::free_port();
    let http = http_port.to_string();
    let kh = keyhole(
        &["--prometheus", "--http-port", &http, &target],
        home.path(),
        &[("GCE_METADATA_HOST", &metadata.host())],
    );
    let mut pids = Vec::new();
    for _ in 0..3 {
        let text = psql_ok(
            kh.port(),
            TRUST_USER,
            "select current_user, pg_backend_pid()",
        );
        let (user, pid) = text.split_once('|').unwrap_or((&text, ""));
        assert_eq!(user, TRUST_USER, "{text}");
        pids.push(pid.to_owned());
        wait_pool_settled(http_port, 1.0);
    }
    assert!(pids.iter().all(|p| *p == pids[0]), "{pids:?}");
    let outcomes = rds.outcomes();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    let all = "target=";
    assert_eq!(
        metric(http_port, "keyhole_token_injections_total", all),
        1.0
    );
    assert_eq!(metric(http_port, "keyhole_pool_reused_total", all), 2.0);
    let (_, scrape) = support::http::get(http_port, "/metrics").expect("GET /metrics");
    assert_no_secret(&scrape, &[&token]);
    assert_no_secret(&kh.logs(), &[&token]);
}

#[test]
fn mariadb_logs_in_with_a_service_account_key_and_the_email_mapped_as_cloud_sql_expects() {
    let home = support::scratch_dir("keyhole-iam-home");
    let oauth = FakeOAuth::start();
    let key_file = oauth.write_service_account_json(home.path());
    let my = MariaDb::shared();
    fake_rds::ensure_mysql_iam_user(my);
    let rds = FakeRds::mysql(
        my,
        TokenCheck::Gcp {
            accepted: vec![oauth.access_token()],
        },
        SwitchData::None,
    );
    let target = format!("{}&iam=gcp", rds.keyhole_target());
    let kh = keyhole(
        &[&target],
        home.path(),
        &[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            key_file.to_str().expect("UTF-8"),
        )],
    );
    // Cloud SQL for MySQL names a service account by the part before '@'.
    let out = mariadb::mariadb(
        kh.port(),
        "iam_user@proj.iam.gserviceaccount.com",
        None,
        "select current_user()",
    );
    assert_eq!(
        clients::expect_success(&out, "mariadb as a service account"),
        "iam_user@%"
    );
    let outcomes = rds.wait_for_outcomes(1, Duration::from_secs(10));
    assert_eq!(
        (outcomes[0].user.as_str(), outcomes[0].is_ok()),
        (IAM_USER, true),
        "{outcomes:?}"
    );
    assert_no_secret(
        &kh.logs(),
        &[&oauth.access_token(), &oauth.key().private_key_pem],
    );
}

#[test]
fn keyhole_token_gcp_prints_the_token_of_gcloud_application_default_credentials() {
    let home = support::scratch_dir("keyhole-iam-home");
    let oauth = FakeOAuth::start();
    let gcloud = home.path().join(".config/gcloud");
    std::fs::create_dir_all(&gcloud).expect("mkdir");
    let adc = oauth.write_authorized_user_json(&gcloud);
    std::fs::rename(&adc, gcloud.join("application_default_credentials.json")).expect("rename");
    let out = token_command(
        &["gcp", "--user", "sa@proj.iam.gserviceaccount.com"],
        home.path(),
        &[],
    );
    assert_eq!(
        clients::expect_success(&out, "keyhole token gcp"),
        oauth.access_token()
    );
    assert!(
        clients::stderr(&out).contains("database user: sa@proj.iam (Postgres), sa (MySQL)"),
        "{}",
        clients::stderr(&out)
    );
    let grants: Vec<_> = oauth
        .requests()
        .iter()
        .filter_map(|r| r.form_param("grant_type"))
        .collect();
    assert_eq!(grants, ["refresh_token"]);

    // The metadata server answering garbage: a clear error, exit 1.
    let metadata = FakeGcpMetadata::start();
    metadata.set_mode(Mode::Garbage);
    let empty_home = support::scratch_dir("keyhole-iam-home");
    let out = token_command(
        &["gcp"],
        empty_home.path(),
        &[("GCE_METADATA_HOST", &metadata.host())],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        clients::stderr(&out).contains("gcp credentials from"),
        "{}",
        clients::stderr(&out)
    );
}

/// A token login whose client vanishes while a CPU-bound statement runs
/// (BENCHMARK looks at nothing but its kill flag, so no server notices the
/// closed connection): keyhole logs in beside the session with a token and
/// stops the statement with KILL QUERY.
#[test]
fn a_vanished_token_clients_statement_is_killed_on_a_side_connection() {
    let home = support::scratch_dir("keyhole-iam-home");
    let my = MariaDb::shared();
    fake_rds::ensure_mysql_iam_user(my);
    let imds = FakeImds::start();
    let creds = imds.credentials();
    let rds = FakeRds::mysql(
        my,
        TokenCheck::aws_for(&creds, fake_rds::DEFAULT_ENDPOINT, 0, REGION),
        SwitchData::WithScramble,
    );
    let target = format!("{}&iam=aws", rds.keyhole_target());
    let kh = keyhole(
        &[&target],
        home.path(),
        &[
            ("AWS_EC2_METADATA_DISABLED", "false"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url()),
        ],
    );
    let sql = "select benchmark(100000000000, md5('keyhole-vanishing-iam-client'))";
    let port = kh.port().to_string();
    let mut cli = mariadb::mariadb_command(None)
        .args([
            "--batch",
            "-h",
            "127.0.0.1",
            "-P",
            &port,
            "-u",
            IAM_USER,
            "-e",
            sql,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the mariadb CLI");
    let find = format!(
        "select id from information_schema.processlist where info = '{}'",
        sql.replace('\'', "''")
    );
    let mut id = String::new();
    support::session::wait_until(
        "the statement runs on the server",
        Duration::from_secs(30),
        || {
            id = my.admin_sql(&find);
            !id.is_empty()
        },
        || kh.logs(),
    );
    // The client dies: its socket closes with no COM_QUIT.
    cli.kill().expect("kill the CLI");
    let _ = cli.wait();
    support::session::wait_until(
        "the statement is no longer running",
        Duration::from_secs(20),
        || my.admin_sql(&find).is_empty(),
        || format!("keyhole log:\n{}", kh.logs()),
    );
    let log = kh.wait_for_log("outcome=\"client_gone_cancelled\"", 1);
    assert!(log.contains("keyhole cancelled its statement"), "{log}");
    assert!(
        !log.contains(&creds.secret_access_key),
        "the secret key reached the log"
    );
}
