//! `keyhole connect TARGET [-- CLIENT-ARGS]`: keyhole and the right client
//! in one command, against real PostgreSQL and MariaDB, with the real
//! `psql` and `mariadb` clients; the exit code is the client's.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use std::time::Duration;
#[cfg(feature = "gcp")]
use support::cloudsql::{FakeSqlAdmin, InstanceSpec};
use support::keyhole::{Keyhole, Ready};
use support::mariadb::{MariaDb, NATIVE_PASS, NATIVE_USER};
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER, TRUST_USER};
use support::process::{clean_env, output_with_timeout};
use support::session::wait_until;

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// `keyhole connect ARGS` with a clean environment plus `env`.
fn connect(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyhole"));
    clean_env(&mut cmd);
    cmd.arg("connect").args(args).envs(env.iter().copied());
    output_with_timeout(&mut cmd, std::time::Duration::from_secs(60))
}

/// `keyhole connect ARGS -- -N -B -e "select 6*7"` as native_user: the
/// client must be mariadb (or mysql), answering 42.
fn assert_mysql_client_answers(args: &[&str]) {
    let mut all = args.to_vec();
    all.extend(["--", "-N", "-B", "-e", "select 6*7"]);
    let out = connect(&all, &[("MYSQL_PWD", NATIVE_PASS)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "42");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn pg_target(pg: &PgCluster) -> String {
    format!(
        "postgres://localhost:{}?ca-file={}",
        pg.port,
        utf8(&pg.pki.ca)
    )
}

#[test]
fn psql_runs_against_keyhole_and_its_exit_code_is_connects() {
    let pg = PgCluster::shared();
    let target = pg_target(pg);
    let out = connect(
        &[
            "--db-user",
            TRUST_USER,
            "--database",
            "postgres",
            &target,
            "--",
            "-X",
            "-A",
            "-t",
            "-c",
            "select current_user || ' ' || ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // keyhole's leg to the server is TLS; the client talked to keyhole.
    assert_eq!(text(&out.stdout).trim(), format!("{TRUST_USER} true"));

    // psql's own failure, and its exit code, are the command's.
    let out = connect(
        &[
            "--db-user",
            SCRAM_USER,
            "--database",
            "postgres",
            &target,
            "--",
            "-X",
            "-c",
            "select 1/0",
        ],
        &[("PGPASSWORD", SCRAM_PASS)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("division by zero"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn mariadb_is_the_client_for_a_mysql_target() {
    let db = MariaDb::shared();
    let target = format!(
        "mysql://localhost:{}?ca-file={}",
        db.port(),
        utf8(&db.pki().ca)
    );
    assert_mysql_client_answers(&["--db-user", NATIVE_USER, &target]);
}

/// `KEYHOLE_CLIENT` replaces the client: a script shows exactly what the
/// client is given, and what it finds at the address it is given. By
/// default that is a Unix socket in a directory only the user can open
/// (with a token login, whoever reaches keyhole is logged in as the user),
/// gone when `connect` ends.
#[test]
fn the_client_is_given_a_private_socket_then_the_users_arguments() {
    let pg = PgCluster::shared();
    let scratch = support::scratch_dir("connect-client");
    let client = scratch.path().join("client.sh");
    std::fs::write(
        &client,
        "#!/bin/sh\nstat -c '%a' \"$2\"\nls -A \"$2\"\necho \"$@\"\n",
    )
    .expect("write the client");
    std::fs::set_permissions(&client, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let out = connect(
        &["--db-user", "alice", &pg_target(pg), "--", "--flag", "x y"],
        &[("KEYHOLE_CLIENT", utf8(&client))],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 3, "{said}");
    assert_eq!(lines[0], "700", "the socket's directory is private: {said}");
    assert_eq!(lines[1], ".s.PGSQL.5432", "{said}");
    let words: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(words[0], "-h", "{said}");
    assert_eq!(
        words[2..],
        ["-p", "5432", "-U", "alice", "--flag", "x", "y"],
        "{said}"
    );
    assert!(
        !Path::new(words[1]).exists(),
        "{} is left behind after connect",
        words[1]
    );
}

/// `--tcp`: a free port of 127.0.0.1 instead, for clients that cannot use
/// a socket.
#[test]
fn with_tcp_the_client_is_given_a_loopback_port() {
    let pg = PgCluster::shared();
    let out = connect(
        &[
            "--tcp",
            "--db-user",
            "alice",
            &pg_target(pg),
            "--",
            "--flag",
            "x y",
        ],
        &[("KEYHOLE_CLIENT", "echo")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    let words: Vec<&str> = said.split_whitespace().collect();
    assert_eq!(words[..3], ["-h", "127.0.0.1", "-p"], "{said}");
    let port: u16 = words[3].parse().expect("a port");
    assert_ne!(port, pg.port, "keyhole's port, not the server's");
    assert_eq!(words[4..], ["-U", "alice", "--flag", "x", "y"], "{said}");
    // The same for a MySQL client, which then really runs over TCP.
    let db = MariaDb::shared();
    let target = format!(
        "mysql://localhost:{}?ca-file={}",
        db.port(),
        utf8(&db.pki().ca)
    );
    assert_mysql_client_answers(&["--tcp", "--db-user", NATIVE_USER, &target]);
}

/// keyhole's ready line gives a command a person can paste: run exactly
/// that command (with a query added) and it reaches the database through
/// keyhole, for a TCP listener and for a Unix socket.
#[test]
fn the_ready_line_gives_a_command_that_works() {
    let pg = PgCluster::shared();
    let target = format!("{}&user={TRUST_USER}", pg_target(pg));
    let scratch = support::scratch_dir("ready-line");
    let socket_dir = scratch.path().join("sockets");
    for listen in [
        vec!["--port", "0"],
        vec!["--unix-socket", utf8(&socket_dir)],
    ] {
        let mut args = listen.clone();
        args.push(&target);
        let keyhole = Keyhole::spawn(&args, &[], Ready::Nothing);
        let logs = keyhole.wait_for_log(" ready on ", 1);
        let line = logs
            .lines()
            .find(|l| l.contains(" ready on "))
            .unwrap_or_else(|| panic!("no ready line:\n{logs}"));
        assert!(
            line.contains(&format!("INFO postgres://localhost:{} ready on ", pg.port)),
            "the target first: {line}"
        );
        let command = line
            .split_once(" (")
            .and_then(|(_, rest)| rest.split_once(") "))
            .map(|(command, _)| command)
            .unwrap_or_else(|| panic!("no command in the ready line: {line}"));
        assert!(command.starts_with("psql \"host="), "{line}");
        assert!(command.contains(&format!("user={TRUST_USER}")), "{line}");
        let mut sh = Command::new("sh");
        clean_env(&mut sh);
        sh.args(["-c", &format!("{command} -X -A -t -c 'select 6*7'")])
            // The line names no database: the lab has none named as the user.
            .env("PGDATABASE", "postgres");
        let out = output_with_timeout(&mut sh, Duration::from_secs(30));
        assert!(out.status.success(), "{command}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "42", "{command}");
    }
}

#[test]
fn a_target_keyhole_refuses_ends_connect_with_keyholes_words() {
    let out = connect(&["postgres://db.internal?tls-mode=nonsense"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let said = text(&out.stderr);
    assert!(
        said.contains("keyhole stopped before it listened") && said.contains("nonsense"),
        "{said}"
    );
    let out = connect(&["--port", "5432", "postgres://db"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("chooses its own address"));
}

/// A Cloud SQL instance by its connection name: its engine is known only
/// once keyhole asked the SQL Admin API, and `connect` picks the client
/// from what keyhole says it listens for.
#[cfg(feature = "gcp")]
#[test]
fn a_cloud_sql_instance_gets_the_client_for_its_engine() {
    let api = FakeSqlAdmin::start();
    let instance = api.add_instance(InstanceSpec::mysql("my-main", MariaDb::shared()));
    let token = api.admin_token();
    let url = api.url();
    let name = instance.connection_name();
    assert_mysql_client_answers(&[
        "--token",
        &token,
        "--sqladmin-api-endpoint",
        &url,
        "--db-user",
        NATIVE_USER,
        &name,
    ]);
}

/// The terminal's Ctrl-C goes to the whole foreground group: psql cancels
/// its query (the cancel request goes through keyhole), `connect` lives on
/// and exits with psql's code, and keyhole, in a group of its own, is not
/// interrupted by it.
#[test]
fn ctrl_c_cancels_the_clients_query_and_connect_lives_on() {
    use std::os::unix::process::CommandExt;
    let pg = PgCluster::shared();
    let target = pg_target(pg);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyhole"));
    clean_env(&mut cmd);
    cmd.arg("connect")
        .args(["--db-user", TRUST_USER, "--database", "postgres", &target])
        .args([
            "--",
            "-X",
            "-c",
            "select pg_sleep(60) /* keyhole-connect-ctrl-c */",
        ])
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("run keyhole connect");
    let running = || {
        pg.admin_sql(
            "select count(*) from pg_stat_activity \
             where query like '%keyhole-connect-ctrl-c%' and pid <> pg_backend_pid()",
        )
        .trim()
            == "1"
    };
    wait_until("the query runs", Duration::from_secs(30), running, || {
        String::new()
    });
    let group = libc::pid_t::try_from(child.id()).expect("a pid");
    // SAFETY: kill(2) on the process group of our own child.
    unsafe {
        libc::kill(-group, libc::SIGINT);
    }
    let out = child.wait_with_output().expect("connect ends");
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("canceling statement due to user request"),
        "{said}"
    );
}
