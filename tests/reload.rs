//! Live reload, as users see it: SIGHUP (and, with --watch, a change to the
//! config file or a CA file it names) moves a running keyhole to the new
//! configuration. Targets added listen, targets removed stop accepting and
//! let their sessions finish, a re-issued CA is used by new connections, an
//! invalid configuration is refused whole (logged, counted, the old one
//! kept), and no reload cuts a session to a target that stays.

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::certs::TestPki;
use support::clients;
#[cfg(feature = "gcp")]
use support::cloudsql::{self as fake, ApiMethod, FakeSqlAdmin, InstanceSpec};
use support::keyhole::{listens_tcp, listens_unix, Keyhole, Ready};
use support::logs::{closed_lines, field};
use support::postgres::{PgCluster, PgOptions, SCRAM_PASS, SCRAM_USER, SERVER_NAMES};
use support::session::{connect, simple_query, wait_until};

/// Generous limit for anything the tests wait for (a reload, a listener, a
/// log line): long enough for a loaded CI machine and --watch's 2 s polls.
const PATIENCE: Duration = Duration::from_secs(30);

/// A keyhole whose configuration is a file the test rewrites.
struct Reloadable {
    keyhole: Keyhole,
    config: PathBuf,
    /// The port of its HTTP endpoints (/metrics, /readiness).
    http_port: u16,
    /// Reloads finished so far, applied or refused.
    reloads: usize,
    _dir: tempfile::TempDir,
}

impl Reloadable {
    /// keyhole --config FILE (holding `text`) --prometheus --health-check
    /// ARGS..., ready once it listens on `port`.
    fn start(text: &str, port: u16, args: &[&str]) -> Reloadable {
        let dir = support::scratch_dir("keyhole-reload-");
        let config = dir.path().join("keyhole.toml");
        write_atomically(&config, text);
        let http_port = support::free_port();
        let http = http_port.to_string();
        let config_arg = config.to_str().expect("the config path is UTF-8");
        let mut all = vec![
            "--config",
            config_arg,
            "--prometheus",
            "--health-check",
            "--http-port",
            &http,
        ];
        all.extend_from_slice(args);
        let keyhole = Keyhole::spawn(&all, &[], Ready::Tcp(port));
        Reloadable {
            keyhole,
            config,
            http_port,
            reloads: 0,
            _dir: dir,
        }
    }

    /// Replaces the config file as editors and config management do: a new
    /// file renamed over the old one.
    fn rewrite(&self, text: &str) {
        write_atomically(&self.config, text);
    }

    /// Sends SIGHUP and waits until the reload it asked for has finished;
    /// returns the log.
    fn sighup(&mut self) -> String {
        self.keyhole.signal(libc::SIGHUP);
        self.wait_reload()
    }

    /// Waits for the next reload to finish (applied or refused).
    fn wait_reload(&mut self) -> String {
        self.reloads += 1;
        let logs = wait_for_log(&self.keyhole, "configuration reload", self.reloads);
        assert!(
            self.keyhole.wait_exit(Duration::ZERO).is_none(),
            "keyhole exited:\n{logs}"
        );
        logs
    }

    /// The last line of the log that contains `needle`.
    fn last_line(&self, needle: &str) -> String {
        let logs = self.keyhole.logs();
        logs.lines()
            .rev()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle:?}; the log:\n{logs}"))
            .to_owned()
    }

    /// The value of one sample on /metrics (`name{labels}` as written).
    fn metric(&self, sample: &str) -> String {
        let (status, body) =
            support::http::get(self.http_port, "/metrics").expect("/metrics answers");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {sample} in /metrics:\n{body}"))
            .to_owned()
    }

    fn readiness(&self) -> u16 {
        support::http::get(self.http_port, "/readiness")
            .expect("/readiness answers")
            .0
    }
}

/// Like `Keyhole::wait_for_log`, with this file's patience (a --watch
/// reload waits for a poll).
fn wait_for_log(keyhole: &Keyhole, needle: &str, count: usize) -> String {
    let mut logs = String::new();
    wait_until(
        &format!("{count} log line(s) with {needle:?}"),
        PATIENCE,
        || {
            logs = keyhole.logs();
            logs.matches(needle).count() >= count
        },
        || format!("keyhole log:\n{}", keyhole.logs()),
    );
    logs
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// A target for `pg`, listening on 127.0.0.1:`port`, with `extra` parameters.
fn target(pg: &PgCluster, port: u16, extra: &str) -> String {
    format!(
        "postgres://127.0.0.1:{}?server-name=localhost&listen=127.0.0.1:{port}{extra}",
        pg.port
    )
}

/// A config file: the CA, a long drain for removed targets (unless `extra`
/// sets one), `extra` lines, the targets.
fn config_text(ca: &Path, targets: &[String], extra: &str) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("  {t:?},")).collect();
    let drain = if extra.contains("max-sigterm-delay") {
        ""
    } else {
        "max-sigterm-delay = \"10m\"\n"
    };
    format!(
        "ca-file = {:?}\n{drain}{extra}targets = [\n{}\n]\n",
        ca.to_str().expect("the CA path is UTF-8"),
        list.join("\n")
    )
}

/// `select 1` through keyhole on `port` with psql: Ok(output) or Err(what
/// psql printed).
fn query(port: u16) -> Result<String, String> {
    let out = clients::psql(port, SCRAM_USER, Some(SCRAM_PASS), "select 1");
    if out.status.success() {
        Ok(clients::stdout(&out))
    } else {
        Err(clients::stderr(&out))
    }
}

fn assert_query_works(port: u16, keyhole: &Keyhole) {
    match query(port) {
        Ok(out) => assert_eq!(out, "1"),
        Err(e) => panic!(
            "a new session on port {port} failed: {e}\nkeyhole log:\n{}",
            keyhole.logs()
        ),
    }
}

fn refuses_tcp(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[test]
fn sighup_adds_a_target_that_serves_at_once() {
    let pg = PgCluster::shared();
    let (a, b) = (support::free_port(), support::free_port());
    let ca = &pg.pki.ca;
    let mut k = Reloadable::start(&config_text(ca, &[target(pg, a, "")], ""), a, &[]);
    assert!(!listens_tcp(k.keyhole.pid(), b));

    k.rewrite(&config_text(
        ca,
        &[target(pg, a, ""), target(pg, b, "")],
        "",
    ));
    let logs = k.sighup();
    assert!(
        logs.contains("configuration reloaded") && logs.contains("cause=SIGHUP"),
        "{logs}"
    );
    assert!(listens_tcp(k.keyhole.pid(), b), "{logs}");
    assert_query_works(b, &k.keyhole);
    assert_query_works(a, &k.keyhole);

    // tokio-postgres too, and the process stayed ready throughout.
    let rt = support::runtime();
    let (client, _task) = connect(&rt, b, "reload_added");
    let rows =
        simple_query(&rt, &client, "select current_user").expect("a query on the new target");
    assert_eq!(rows, [SCRAM_USER]);
    assert_eq!(k.readiness(), 200);
    assert_eq!(k.metric("keyhole_config_reloads_total{result=\"ok\"}"), "1");
    assert_eq!(k.metric("keyhole_config_last_reload_successful"), "1");
    assert_eq!(k.keyhole.logs().matches("keyhole is ready").count(), 1);
}

#[test]
fn sighup_removes_a_target_whose_open_session_goes_on_until_it_ends() {
    let pg = PgCluster::shared();
    let (a, b) = (support::free_port(), support::free_port());
    let sockets = support::scratch_dir("keyhole-reload-sock-");
    let socket_dir = sockets.path().to_str().expect("UTF-8").to_owned();
    let b_target = target(pg, b, &format!("&unix-socket={socket_dir}"));
    let socket_file = sockets.path().join(format!(".s.PGSQL.{b}"));
    let ca = &pg.pki.ca;
    let mut k = Reloadable::start(
        &config_text(ca, &[target(pg, a, ""), b_target.clone()], ""),
        a,
        &[],
    );
    wait_until(
        "keyhole listens on the Unix socket too",
        PATIENCE,
        || listens_unix(k.keyhole.pid(), &socket_file),
        || k.keyhole.logs(),
    );

    let rt = support::runtime();
    let (client, task) = connect(&rt, b, "reload_removed");
    let pid_before = simple_query(&rt, &client, "select pg_backend_pid()").expect("a query");

    k.rewrite(&config_text(ca, &[target(pg, a, "")], ""));
    let logs = k.sighup();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    wait_until(
        "the removed target's port and socket file are gone",
        PATIENCE,
        || !listens_tcp(k.keyhole.pid(), b) && !socket_file.exists(),
        || k.keyhole.logs(),
    );
    assert!(
        refuses_tcp(b),
        "a new connection to the removed port was accepted"
    );
    let err = query(b).expect_err("psql through a removed target");
    assert!(
        err.contains("refused") || err.contains("could not connect"),
        "{err}"
    );
    assert_query_works(a, &k.keyhole);

    // The open session goes on, on the same server backend.
    for _ in 0..3 {
        let pid = simple_query(&rt, &client, "select pg_backend_pid()").expect("the open session");
        assert_eq!(pid, pid_before);
    }
    let logs = wait_for_log(&k.keyhole, "its open connections may finish", 1);
    let removed = logs
        .lines()
        .find(|l| l.contains("its open connections may finish"))
        .unwrap_or_default();
    assert!(
        removed.contains("open_connections=1")
            && removed.contains(&format!("listen=127.0.0.1:{b}")),
        "{removed}"
    );

    // ... until it ends by itself.
    drop(client);
    rt.block_on(task).expect("the connection task ends");
    wait_for_log(
        &k.keyhole,
        "the removed listener's last connection ended",
        1,
    );
    let logs = k.keyhole.logs();
    let closed = closed_lines(&logs);
    let session = closed
        .iter()
        .find(|f| field(f, "conn") == "1")
        .unwrap_or_else(|| panic!("no closed line for the session:\n{logs}"));
    assert_eq!(field(session, "outcome"), "client_closed", "{logs}");
}

#[test]
fn a_removed_targets_sessions_are_cut_after_max_sigterm_delay() {
    let pg = PgCluster::shared();
    let (a, b) = (support::free_port(), support::free_port());
    let ca = &pg.pki.ca;
    let drain = "max-sigterm-delay = \"1s\"\n";
    let mut k = Reloadable::start(
        &config_text(ca, &[target(pg, a, ""), target(pg, b, "")], drain),
        a,
        &[],
    );
    let rt = support::runtime();
    let (kept, _kept_task) = connect(&rt, a, "reload_drain_kept");
    let (removed, removed_task) = connect(&rt, b, "reload_drain_removed");
    simple_query(&rt, &removed, "select 1").expect("a query");

    k.rewrite(&config_text(ca, &[target(pg, a, "")], drain));
    k.sighup();
    wait_for_log(
        &k.keyhole,
        "cutting the removed listener's connections still open after --max-sigterm-delay",
        1,
    );
    rt.block_on(removed_task)
        .expect("the cut session's task ends");
    assert!(
        simple_query(&rt, &removed, "select 1").is_err(),
        "the removed target's session outlived its drain"
    );
    // The other target's session is not the removed one's: it goes on.
    simple_query(&rt, &kept, "select 1").expect("the kept target's session");
    assert_eq!(k.keyhole.wait_exit(Duration::ZERO), None);
}

#[test]
fn an_invalid_configuration_is_refused_whole_logged_and_counted() {
    let pg = PgCluster::shared();
    let (a, b) = (support::free_port(), support::free_port());
    let ca = &pg.pki.ca;
    let mut k = Reloadable::start(&config_text(ca, &[target(pg, a, "")], ""), a, &[]);
    assert_eq!(
        k.metric("keyhole_config_reloads_total{result=\"refused\"}"),
        "0"
    );

    // A bad target parameter: nothing of the new configuration applies.
    k.rewrite(&config_text(
        ca,
        &[
            target(pg, a, "&allow=10.0.0.0/8"),
            target(pg, b, "&tls-mode=bogus"),
        ],
        "",
    ));
    k.sighup();
    let refused = k.last_line("configuration reload refused");
    assert!(
        refused.contains("tls-mode") && refused.contains("'bogus' is not a TLS mode"),
        "{refused}"
    );
    assert!(!listens_tcp(k.keyhole.pid(), b));
    // allow= would have refused 127.0.0.1: the old settings still serve.
    assert_query_works(a, &k.keyhole);

    // A CA file that cannot be read.
    let missing = "/nonexistent/keyhole-reload-test/ca.pem";
    let text = config_text(ca, &[target(pg, a, ""), target(pg, b, "")], "").replacen(
        &format!("{:?}", ca.to_str().expect("UTF-8")),
        &format!("{missing:?}"),
        1,
    );
    k.rewrite(&text);
    k.sighup();
    let refused = k.last_line("configuration reload refused");
    assert!(
        refused.contains(&format!("cannot read CA file {missing}"))
            && refused.contains("target postgres://127.0.0.1:"),
        "{refused}"
    );
    assert!(!listens_tcp(k.keyhole.pid(), b));
    assert_query_works(a, &k.keyhole);

    // A file that is not TOML at all.
    k.rewrite("targets = [\"postgres://db\"\n");
    k.sighup();
    let refused = k.last_line("configuration reload refused");
    assert!(refused.contains("keyhole.toml"), "{refused}");

    assert_eq!(
        k.metric("keyhole_config_reloads_total{result=\"refused\"}"),
        "3"
    );
    assert_eq!(k.metric("keyhole_config_reloads_total{result=\"ok\"}"), "0");
    assert_eq!(k.metric("keyhole_config_last_reload_successful"), "0");
    assert_eq!(
        k.readiness(),
        200,
        "a refused reload does not make keyhole unready"
    );

    // Fixed: applied.
    k.rewrite(&config_text(
        ca,
        &[target(pg, a, ""), target(pg, b, "")],
        "",
    ));
    let logs = k.sighup();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert_query_works(b, &k.keyhole);
    assert_eq!(k.metric("keyhole_config_reloads_total{result=\"ok\"}"), "1");
    assert_eq!(k.metric("keyhole_config_last_reload_successful"), "1");
}

#[test]
fn options_that_need_a_restart_keep_their_value_and_say_so() {
    let pg = PgCluster::shared();
    let a = support::free_port();
    let ca = &pg.pki.ca;
    let mut k = Reloadable::start(
        &config_text(ca, &[target(pg, a, "")], "max-connections = 5\n"),
        a,
        &[],
    );
    k.rewrite(&config_text(
        ca,
        &[target(pg, a, "")],
        "max-connections = 50\nlog-format = \"json\"\n",
    ));
    let logs = k.sighup();
    assert!(
        logs.contains("configuration reloaded: no listener changed"),
        "{logs}"
    );
    for option in ["max-connections", "log-format"] {
        let line = logs
            .lines()
            .find(|l| l.contains("takes a restart") && l.contains(&format!("option=\"{option}\"")))
            .unwrap_or_else(|| panic!("no restart warning for {option}:\n{logs}"));
        assert!(line.contains("keeping the running value"), "{line}");
    }
    // Still text logs, and still serving.
    assert!(!k.keyhole.logs().contains("{\""));
    assert_query_works(a, &k.keyhole);
}

#[test]
fn watch_picks_up_a_reissued_ca_for_new_connections_without_sighup() {
    let pg = PgCluster::start(PgOptions::default());
    let a = support::free_port();
    let dir = support::scratch_dir("keyhole-reload-ca-");
    // keyhole's own copy of the CA, which the test rewrites in place.
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&pg.pki.ca, &ca).expect("copy the CA");
    let mut k = Reloadable::start(
        &config_text(&ca, &[target(&pg, a, "")], ""),
        a,
        &["--watch"],
    );
    assert!(k
        .keyhole
        .logs()
        .contains("--watch: keyhole reloads when one of these files changes"));

    let rt = support::runtime();
    let (client, _task) = connect(&rt, a, "reload_ca");
    let pid_before = simple_query(&rt, &client, "select pg_backend_pid()").expect("a query");

    // The server gets a certificate from a new CA: new connections through
    // keyhole fail until keyhole trusts that CA.
    let reissued = TestPki::generate(&SERVER_NAMES);
    for (from, to) in [
        (&reissued.server_cert, &pg.pki.server_cert),
        (&reissued.server_key, &pg.pki.server_key),
    ] {
        let bytes = std::fs::read(from).expect("read the new certificate");
        std::fs::write(to, bytes).expect("install it in place (owner and mode stay)");
    }
    pg.admin_sql("select pg_reload_conf()");
    wait_until(
        "a new session fails against the re-issued certificate",
        PATIENCE,
        || query(a).is_err(),
        || k.keyhole.logs(),
    );
    assert_eq!(k.reloads, 0);

    // The new CA, written over the old file in place: no SIGHUP.
    std::fs::write(&ca, std::fs::read(&reissued.ca).expect("read the new CA")).expect("write");
    let logs = k.wait_reload();
    let reloaded = k.last_line("configuration reloaded");
    assert!(
        reloaded.contains("cause=--watch: changed ") && reloaded.contains("ca.pem"),
        "{reloaded}\n{logs}"
    );
    let changed = k.last_line("target changed");
    assert!(
        changed.contains("content of") && changed.contains("ca.pem"),
        "{changed}"
    );
    wait_until(
        "a new session works with the new CA",
        PATIENCE,
        || query(a).is_ok(),
        || k.keyhole.logs(),
    );

    // The session opened before any of this is still up, on its backend.
    let pid = simple_query(&rt, &client, "select pg_backend_pid()").expect("the old session");
    assert_eq!(pid, pid_before);
    assert_not_closed(&k.keyhole, "1");
}

#[test]
fn watch_picks_up_a_config_file_replaced_by_a_rename() {
    let pg = PgCluster::shared();
    let (a, b) = (support::free_port(), support::free_port());
    let ca = &pg.pki.ca;
    let mut k = Reloadable::start(&config_text(ca, &[target(pg, a, "")], ""), a, &["--watch"]);
    k.rewrite(&config_text(
        ca,
        &[target(pg, a, ""), target(pg, b, "")],
        "",
    ));
    let logs = k.wait_reload();
    assert!(
        logs.contains("--watch: changed ") && logs.contains("keyhole.toml"),
        "{logs}"
    );
    wait_until(
        "the added target listens",
        PATIENCE,
        || listens_tcp(k.keyhole.pid(), b),
        || k.keyhole.logs(),
    );
    assert_query_works(b, &k.keyhole);

    // A refused change is not retried until the file changes again.
    k.rewrite(&config_text(ca, &[target(pg, a, "&tls-mode=bogus")], ""));
    k.wait_reload();
    k.last_line("configuration reload refused");
    // (Waiting for something not to happen: two polls and a settle.)
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        k.keyhole.logs().matches("configuration reload").count(),
        k.reloads
    );
    assert_query_works(b, &k.keyhole);
}

#[test]
fn no_reload_cuts_an_open_session() {
    let pg = PgCluster::shared();
    let (a, b) = (support::free_port(), support::free_port());
    let dir = support::scratch_dir("keyhole-reload-keep-");
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&pg.pki.ca, &ca).expect("copy the CA");
    let mut k = Reloadable::start(&config_text(&ca, &[target(pg, a, "")], ""), a, &[]);
    let rt = support::runtime();
    let (client, _task) = connect(&rt, a, "reload_keep");
    let pid_before = simple_query(&rt, &client, "select pg_backend_pid()").expect("a query");
    let still_up = |k: &Reloadable, what: &str| {
        let pid = simple_query(&rt, &client, "select pg_backend_pid()").unwrap_or_else(|e| {
            panic!(
                "after {what}, the session failed: {e}\n{}",
                k.keyhole.logs()
            )
        });
        assert_eq!(pid, pid_before, "after {what}");
    };

    k.sighup();
    still_up(&k, "a reload that changes nothing");

    k.rewrite(&config_text(
        &ca,
        &[target(pg, a, "&allow=127.0.0.0/8")],
        "",
    ));
    k.sighup();
    k.last_line("target changed");
    still_up(&k, "a change of the target's settings");

    let mut ca_text = std::fs::read_to_string(&ca).expect("read the CA");
    ca_text.push_str("\n# re-written\n");
    std::fs::write(&ca, ca_text).expect("write the CA");
    k.sighup();
    let changed = k.last_line("target changed");
    assert!(changed.contains("content of"), "{changed}");
    still_up(&k, "a re-read CA file");

    k.rewrite(&config_text(
        &ca,
        &[target(pg, a, "&allow=127.0.0.0/8"), target(pg, b, "")],
        "",
    ));
    k.sighup();
    still_up(&k, "adding a target");

    k.rewrite(&config_text(
        &ca,
        &[target(pg, a, "&allow=127.0.0.0/8")],
        "",
    ));
    k.sighup();
    still_up(&k, "removing another target");

    k.rewrite("not toml");
    k.sighup();
    k.last_line("configuration reload refused");
    still_up(&k, "a refused reload");

    assert_query_works(a, &k.keyhole);
    assert_not_closed(&k.keyhole, "1");
}

/// No "connection closed" line for connection `conn`.
fn assert_not_closed(keyhole: &Keyhole, conn: &str) {
    let logs = keyhole.logs();
    assert!(
        !closed_lines(&logs).iter().any(|f| field(f, "conn") == conn),
        "connection {conn} was closed:\n{logs}"
    );
}

// Cloud SQL instance targets need the "gcp" feature.
#[cfg(feature = "gcp")]
#[test]
fn a_cloud_sql_instance_kept_by_a_reload_keeps_its_certificate_and_a_removed_one_closes() {
    let pg = PgCluster::start(fake::pg_options(&[]));
    let api = FakeSqlAdmin::start();
    let first = api.add_instance(InstanceSpec::postgres("pg-reload-a", &pg));
    let second = api.add_instance(InstanceSpec::postgres("pg-reload-b", &pg));
    let (a, b) = (support::free_port(), support::free_port());
    let head = format!(
        "token = {:?}\nsqladmin-api-endpoint = {:?}\nmax-sigterm-delay = \"10m\"\n",
        api.admin_token(),
        api.url()
    );
    let text = |targets: &[String]| {
        let list: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
        format!("{head}targets = [{}]\n", list.join(", "))
    };
    let on = |instance: &str, port: u16, extra: &str| format!("{instance}?port={port}{extra}");
    let (first_name, second_name) = (first.connection_name(), second.connection_name());
    let mut k = Reloadable::start(&text(&[on(&first_name, a, "")]), a, &[]);
    assert_query_works(a, &k.keyhole);
    let calls = |name: &str| {
        (
            api.calls_for(name, ApiMethod::ConnectSettings),
            api.calls_for(name, ApiMethod::GenerateEphemeralCert),
        )
    };
    let before = calls(first.name());
    assert_eq!(before.1, 1, "one certificate at start");

    // The instance's own settings change: it keeps its certificate (no
    // new API call), a second instance starts.
    k.rewrite(&text(&[
        on(&first_name, a, "&allow=127.0.0.0/8"),
        on(&second_name, b, ""),
    ]));
    let logs = k.sighup();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    k.last_line("target changed");
    assert_query_works(a, &k.keyhole);
    assert_query_works(b, &k.keyhole);
    assert_eq!(
        calls(first.name()),
        before,
        "the kept instance asked the API again"
    );
    assert_eq!(calls(second.name()).1, 1);

    // The first one removed: its port closes, the second serves on.
    k.rewrite(&text(&[on(&second_name, b, "")]));
    k.sighup();
    wait_until(
        "the removed instance's port closes",
        PATIENCE,
        || !listens_tcp(k.keyhole.pid(), a),
        || k.keyhole.logs(),
    );
    assert!(refuses_tcp(a));
    assert_query_works(b, &k.keyhole);
    assert_eq!(
        calls(second.name()).1,
        1,
        "the kept instance asked the API again"
    );
    assert!(!k.keyhole.logs().contains(&api.admin_token()));
}

/// ssh processes whose command line names keyhole's control directory.
fn ssh_masters(keyhole: &Keyhole) -> usize {
    let control = format!("keyhole-ssh-{}-", keyhole.pid());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| {
            let text = String::from_utf8_lossy(cmdline);
            text.starts_with("ssh\0") && text.contains(&control)
        })
        .count()
}

#[test]
fn an_ssh_bastion_lives_as_long_as_a_target_or_a_session_needs_it() {
    let Some(ns) = support::netns::Namespace::create() else {
        return;
    };
    ns.set_hosts(&[("db.internal", "127.0.0.1")]);
    let pg = PgCluster::shared();
    let relay = ns.relay_to(format!("127.0.0.1:{}", pg.port).parse().expect("address"));
    let bastion = support::bastion::SshBastion::start(&ns);
    let ssh_config = bastion.ssh_config("bastion");
    let (a, b) = (support::free_port(), support::free_port());
    let through = format!(
        "postgres://db.internal:{}?via=ssh://bastion&listen=127.0.0.1:{b}",
        relay.port()
    );
    let extra = format!("ssh-config = {:?}\n", ssh_config.to_str().expect("UTF-8"));
    let ca = &pg.pki.ca;
    let both = config_text(ca, &[target(pg, a, ""), through.clone()], &extra);
    let mut k = Reloadable::start(&both, a, &[]);
    let rt = support::runtime();
    let (client, task) = connect(&rt, b, "reload_bastion");
    simple_query(&rt, &client, "select 1").expect("a query through the bastion");
    assert_eq!(ssh_masters(&k.keyhole), 1);

    // A reload that keeps the target keeps its SSH connection: no new login.
    k.sighup();
    assert_query_works(b, &k.keyhole);
    assert_eq!(bastion.logins(), 1, "sshd log:\n{}", bastion.log());

    // Removed: the open session still needs the bastion, so it stays...
    k.rewrite(&config_text(ca, &[target(pg, a, "")], &extra));
    k.sighup();
    wait_until(
        "the removed target's port closes",
        PATIENCE,
        || !listens_tcp(k.keyhole.pid(), b),
        || k.keyhole.logs(),
    );
    simple_query(&rt, &client, "select 1").expect("the open session through the bastion");
    assert_eq!(ssh_masters(&k.keyhole), 1);

    // ... until that session ends: then the SSH master ends too.
    drop(client);
    rt.block_on(task).expect("the connection task ends");
    wait_until(
        "the SSH master to end with the last session that needed it",
        PATIENCE,
        || ssh_masters(&k.keyhole) == 0,
        || k.keyhole.logs(),
    );
    assert_query_works(a, &k.keyhole);
}
