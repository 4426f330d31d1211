//! `pool=session` through the real `keyhole` binary and a real PostgreSQL:
//! keyhole logs in itself (`user=` with `password-file=`, SCRAM-SHA-256 or
//! md5), keeps the server connection when the client leaves cleanly,
//! resets it with `DISCARD ALL`, and hands it to the next client of the
//! same key. Every test checks the server's own view (`pg_backend_pid()`,
//! `pg_stat_activity`, catalog views) rather than keyhole's word for it.

mod support;

use std::time::{Duration, Instant};

use support::clients;
use support::keyhole::Keyhole;
use support::postgres::{PgCluster, MD5_PASS, MD5_USER, SCRAM_PASS, SCRAM_USER};

/// A keyhole in front of the shared cluster whose target logs in as `user`
/// with `password` from a file, with `params` added, and `/metrics`.
struct Pooled {
    keyhole: Keyhole,
    http_port: u16,
    _dir: tempfile::TempDir,
}

impl Pooled {
    fn start(user: &str, password: &str, params: &str) -> Pooled {
        Pooled::start_with(user, password, params, &[])
    }

    /// With `extra` options before the usual ones.
    fn start_with(user: &str, password: &str, params: &str, extra: &[&str]) -> Pooled {
        let pg = PgCluster::shared();
        let dir = support::scratch_dir("keyhole-pool-");
        let file = dir.path().join("password");
        std::fs::write(&file, format!("{password}\n")).expect("write the password file");
        let target = format!(
            "{}&user={user}&password-file={}{params}",
            pg.keyhole_target(),
            file.display()
        );
        let http_port = support::free_port();
        let http = http_port.to_string();
        let ca = pg.pki.ca.to_str().expect("UTF-8").to_owned();
        let mut args = extra.to_vec();
        args.extend([
            "--prometheus",
            "--http-port",
            &http,
            "--ca-file",
            &ca,
            &target,
        ]);
        let keyhole = Keyhole::start(&args);
        Pooled {
            keyhole,
            http_port,
            _dir: dir,
        }
    }

    fn port(&self) -> u16 {
        self.keyhole.port()
    }

    /// The sample of `name` whose labels contain `label` (0 when absent).
    fn metric(&self, name: &str, label: &str) -> f64 {
        support::http::metric(self.http_port, name, label)
    }

    /// Waits (up to 20 s) until `name{label}` reaches `value`.
    fn wait_metric(&self, name: &str, label: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.metric(name, label);
            if now == value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{{{label}}} is {now}, not {value}; keyhole's log:\n{}",
                self.keyhole.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_idle(&self, n: f64) {
        self.wait_metric("keyhole_pool_connections", "state=\"idle\"", n);
    }
}

struct Client {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl Client {
    async fn connect(port: u16, db: &str, app: &str) -> Client {
        let conninfo =
            format!("host=127.0.0.1 port={port} user=whoever dbname={db} application_name={app}");
        let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect through the pool: {e}"));
        Client {
            client,
            connection: tokio::spawn(connection),
        }
    }

    async fn pid(&self) -> i32 {
        self.one("select pg_backend_pid()").await
    }

    async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Says goodbye (Terminate) and waits until the connection has closed.
    async fn close(self) {
        drop(self.client);
        let _ = self.connection.await;
    }
}

/// Whether the server still has a backend with `pid`, asked directly.
fn backend_alive(pid: i32) -> bool {
    PgCluster::shared().admin_sql(&format!(
        "select count(*) from pg_stat_activity where pid = {pid}"
    )) == "1"
}

fn wait_backend_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while backend_alive(pid) {
        assert!(Instant::now() < deadline, "backend {pid} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_second_client_reuses_the_server_connection_and_sees_nothing_of_the_first() {
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session");
    let first = Client::connect(kh.port(), "postgres", "app").await;
    let pid = first.pid().await;
    assert_eq!(
        first.one::<String>("select current_user::text").await,
        SCRAM_USER
    );
    let c = &first.client;
    c.batch_execute(
        "create temp table scratch (x int); insert into scratch values (1);
         set work_mem = '7MB'; set search_path = nowhere;
         prepare sql_level as select 1;
         select pg_advisory_lock(4242);
         listen pool_channel;",
    )
    .await
    .expect("session state");
    // A named statement prepared over the extended protocol.
    let stmt = c.prepare("select $1::int + 1").await.expect("prepare");
    let n: i32 = c.query_one(&stmt, &[&1i32]).await.expect("execute").get(0);
    assert_eq!(n, 2);
    assert_eq!(
        first
            .one::<i64>(
                "select count(*) from pg_prepared_statements where name = 'sql_level' or statement = 'select $1::int + 1'"
            )
            .await,
        2
    );
    first.close().await;
    kh.wait_idle(1.0);

    let second = Client::connect(kh.port(), "postgres", "app").await;
    assert_eq!(second.pid().await, pid, "the same server connection");
    let c = &second.client;
    let err = c
        .simple_query("select * from scratch")
        .await
        .expect_err("the temp table is gone");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE),
        "{err:?}"
    );
    assert_eq!(second.one::<String>("show work_mem").await, "4MB");
    assert_eq!(
        second.one::<String>("show search_path").await,
        "\"$user\", public"
    );
    // Neither the SQL-level nor the protocol-level statement of the first
    // client (the driver prepares one for each of its own queries too).
    assert_eq!(
        second
            .one::<i64>(
                "select count(*) from pg_prepared_statements where name = 'sql_level' or statement = 'select $1::int + 1'"
            )
            .await,
        0
    );
    assert_eq!(
        second
            .one::<i64>(
                "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"
            )
            .await,
        0
    );
    assert_eq!(
        second
            .one::<i64>("select count(*) from pg_listening_channels()")
            .await,
        0
    );
    assert_eq!(second.one::<String>("show application_name").await, "app");
    second.close().await;
    kh.wait_idle(1.0);
    assert_eq!(kh.metric("keyhole_pool_opened_total", "target="), 1.0);
    assert_eq!(kh.metric("keyhole_pool_reused_total", "target="), 1.0);
    assert_eq!(
        kh.metric("keyhole_pool_connections", "state=\"in_use\""),
        0.0
    );
    // Labels are the target's only: no user name reaches /metrics.
    let (_, scrape) = support::http::get(kh.http_port, "/metrics").expect("scrape");
    assert!(!scrape.contains(SCRAM_USER), "a user name in the metrics");
    assert!(!scrape.contains(SCRAM_PASS) && !kh.keyhole.logs().contains(SCRAM_PASS));
}

#[tokio::test]
async fn a_client_that_leaves_inside_a_transaction_does_not_give_its_connection_back() {
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session");
    let first = Client::connect(kh.port(), "postgres", "app").await;
    let pid = first.pid().await;
    first
        .client
        .batch_execute("begin; create temp table t (x int)")
        .await
        .expect("begin");
    first.close().await;
    kh.wait_metric("keyhole_pool_closed_total", "reason=\"not_reusable\"", 1.0);
    wait_backend_gone(pid);

    let second = Client::connect(kh.port(), "postgres", "app").await;
    assert_ne!(second.pid().await, pid);
    // No transaction is open on the new one.
    assert_eq!(
        second
            .one::<String>("select state from pg_stat_activity where pid = pg_backend_pid()")
            .await,
        "active"
    );
    assert_eq!(
        second
            .one::<i64>(
                "select count(*) from pg_class where relname = 't' and relpersistence = 't'"
            )
            .await,
        0
    );
    second.close().await;
}

#[tokio::test]
async fn another_database_or_application_name_gets_another_connection() {
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session");
    let a = Client::connect(kh.port(), "postgres", "app").await;
    let pid = a.pid().await;
    a.close().await;
    kh.wait_idle(1.0);

    let other_db = Client::connect(kh.port(), "template1", "app").await;
    assert_ne!(other_db.pid().await, pid);
    assert_eq!(
        other_db
            .one::<String>("select current_database()::text")
            .await,
        "template1"
    );
    other_db.close().await;
    let other_app = Client::connect(kh.port(), "postgres", "reporting").await;
    assert_ne!(other_app.pid().await, pid);
    assert_eq!(
        other_app.one::<String>("show application_name").await,
        "reporting"
    );
    other_app.close().await;
    kh.wait_idle(3.0);
    let same = Client::connect(kh.port(), "postgres", "app").await;
    assert_eq!(same.pid().await, pid);
    same.close().await;
}

// Two workers: the test thread blocks in its metric polls while the
// waiting client runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_the_next_client_wait_until_a_connection_comes_back() {
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session&pool-size=1");
    let first = Client::connect(kh.port(), "postgres", "app").await;
    let pid = first.pid().await;
    let port = kh.port();
    let waiting = tokio::spawn(async move {
        let second = Client::connect(port, "postgres", "app").await;
        let pid = second.pid().await;
        second.close().await;
        pid
    });
    kh.wait_metric("keyhole_pool_waits_total", "target=", 1.0);
    assert!(
        !waiting.is_finished(),
        "the second client got in past pool-size=1"
    );
    first.close().await;
    let second_pid = waiting.await.expect("the waiting client");
    assert_eq!(second_pid, pid, "it got the released connection");
    assert_eq!(kh.metric("keyhole_pool_wait_seconds_count", "target="), 1.0);
    assert!(kh.metric("keyhole_pool_wait_seconds_sum", "target=") > 0.0);
}

#[tokio::test]
async fn a_pool_that_stays_full_tells_the_waiting_client_why() {
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session&pool-size=1");
    let first = Client::connect(kh.port(), "postgres", "app").await;
    // libpq's own error rendering, as a user would see it (the wait is
    // bounded by --startup-timeout, 10 s by default).
    let out = clients::psql(kh.port(), "whoever", None, "select 1");
    assert!(!out.status.success());
    let err = clients::stderr(&out);
    assert!(
        err.contains("all 1 server connections of the pool are in use (pool-size=1)"),
        "{err}"
    );
    first.close().await;
}

#[tokio::test]
async fn idle_timeout_and_max_lifetime_close_pooled_connections() {
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session&pool-idle-timeout=1s");
    let c = Client::connect(kh.port(), "postgres", "app").await;
    let pid = c.pid().await;
    c.close().await;
    kh.wait_metric("keyhole_pool_closed_total", "reason=\"idle_timeout\"", 1.0);
    kh.wait_idle(0.0);
    wait_backend_gone(pid);

    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session&pool-max-lifetime=1s");
    let c = Client::connect(kh.port(), "postgres", "app").await;
    let pid = c.pid().await;
    // Held past its lifetime: closed when it comes back, never reused.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.close().await;
    kh.wait_metric("keyhole_pool_closed_total", "reason=\"max_lifetime\"", 1.0);
    wait_backend_gone(pid);
    let c = Client::connect(kh.port(), "postgres", "app").await;
    assert_ne!(c.pid().await, pid);
    c.close().await;
}

#[tokio::test]
async fn a_cancel_reaches_the_pooled_clients_statement_and_an_old_key_reaches_nothing() {
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session");
    let first = Client::connect(kh.port(), "postgres", "app").await;
    let pid = first.pid().await;
    let old_token = first.client.cancel_token();
    first.close().await;
    kh.wait_idle(1.0);

    let second = Client::connect(kh.port(), "postgres", "app").await;
    assert_eq!(second.pid().await, pid);
    // The first client's key is not the second's: it cancels nothing.
    let sleeper = second.client.query_one("select pg_sleep(1)::text", &[]);
    let stale = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = old_token.cancel_query(tokio_postgres::NoTls).await;
    };
    let (slept, ()) = tokio::join!(sleeper, stale);
    slept.expect("an old client's key must not cancel the new client's statement");

    let token = second.client.cancel_token();
    let long = second.client.query_one("select pg_sleep(30)", &[]);
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("send the cancel");
    };
    let started = Instant::now();
    let (result, ()) = tokio::join!(long, cancel);
    let err = result.expect_err("the statement was cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    second.close().await;
}

#[test]
fn pool_session_without_keyhole_logging_in_is_refused_at_start() {
    let port = support::free_port().to_string();
    for target in [
        "postgres://127.0.0.1:5432?pool=session",
        "postgres://127.0.0.1:5432?pool=session&user=app",
    ] {
        let (status, log) =
            Keyhole::start_expect_exit(&["--port", &port, target], Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{log}");
        assert!(
            log.contains("pool=session needs keyhole to log in itself"),
            "{log}"
        );
    }
    let (status, log) = Keyhole::start_expect_exit(
        &["--port", &port, "mysql://127.0.0.1?pool=session&user=app"],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("pool=session needs keyhole to log in itself"),
        "{log}"
    );
    let (status, log) = Keyhole::start_expect_exit(
        &[
            "--port",
            &port,
            "postgres://127.0.0.1?password-file=/nonexistent",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("password-file= needs user="), "{log}");
}

#[test]
fn psql_and_pgbench_connect_through_a_pooled_target() {
    let size = 4.0;
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "&pool=session&pool-size=4");
    // Each psql run may find the last one's connection parked, or open one
    // of its own: psql exits on its Terminate, and the next run can arrive
    // while keyhole is still resetting (DISCARD ALL) the connection.
    let mut psql_pids = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let out = clients::psql(
            kh.port(),
            "whoever",
            None,
            "select current_user, pg_backend_pid()",
        );
        let text = clients::expect_success(&out, "psql through the pool");
        let (user, pid) = text.split_once('|').unwrap_or((&text, ""));
        assert_eq!(user, SCRAM_USER, "{text}");
        psql_pids.insert(pid.to_owned());
    }
    let dir = support::scratch_dir("keyhole-pool-bench-");
    let script = dir.path().join("select.sql");
    std::fs::write(&script, "select 1;\n").expect("write the pgbench script");
    let port = kh.port().to_string();
    let out = clients::pgbench(
        &[
            "-n",
            "-C",
            "-c",
            "4",
            "-t",
            "25",
            "-f",
            script.to_str().expect("UTF-8"),
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "whoever",
            "postgres",
        ],
        None,
    );
    let text = clients::expect_success(&out, "pgbench -C through the pool");
    assert!(
        text.contains("number of transactions actually processed: 100/100"),
        "{text}"
    );
    // The last sessions may still be in their reset.
    kh.wait_metric("keyhole_pool_connections", "state=\"in_use\"", 0.0);
    let scrape = || {
        let (_, scrape) = support::http::get(kh.http_port, "/metrics").expect("scrape");
        scrape
            .lines()
            .filter(|l| l.starts_with("keyhole_pool_") && !l.contains("_bucket"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let opened = kh.metric("keyhole_pool_opened_total", "target=");
    let reused = kh.metric("keyhole_pool_reused_total", "target=");
    let sessions = kh.metric("keyhole_connections_total", "target=");
    let closed = scrape()
        .iter()
        .filter(|l| l.starts_with("keyhole_pool_closed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    let evicted = kh.metric("keyhole_pool_closed_total", "reason=\"evicted\"");
    let idle = kh.metric("keyhole_pool_connections", "state=\"idle\"");
    let psql_connections = psql_pids.len() as f64;
    // Every connection a client left cleanly goes back to the pool. The
    // only one closed are psql's, to make room for pgbench's key (one
    // pool-size over all keys); pgbench's key never waits for another.
    assert_eq!(
        closed,
        evicted,
        "connections closed for another reason than making room: {:#?}",
        scrape()
    );
    assert!(
        evicted <= psql_connections,
        "{evicted} evicted, psql had {psql_connections}: {:#?}",
        scrape()
    );
    // So: psql's logins, and at most pool-size for pgbench's key.
    assert!(
        opened <= psql_connections + size,
        "{opened} logins for {sessions} connections (psql opened {psql_connections}): {:#?}",
        scrape()
    );
    assert_eq!(
        opened + reused,
        sessions,
        "one checkout per session: {:#?}",
        scrape()
    );
    assert_eq!(
        opened - closed,
        idle,
        "every connection open is parked: {:#?}",
        scrape()
    );
}

#[tokio::test]
async fn an_md5_user_logs_in_with_the_password_file_and_a_wrong_password_gets_the_servers_error() {
    let kh = Pooled::start(MD5_USER, MD5_PASS, "&pool=session");
    let c = Client::connect(kh.port(), "postgres", "app").await;
    assert_eq!(c.one::<String>("select current_user::text").await, MD5_USER);
    c.close().await;

    // No pool: the password file alone logs in.
    let kh = Pooled::start(SCRAM_USER, SCRAM_PASS, "");
    let out = clients::psql(kh.port(), "whoever", None, "select current_user");
    assert_eq!(clients::expect_success(&out, "psql"), SCRAM_USER);

    let kh = Pooled::start(SCRAM_USER, "not-the-password", "&pool=session");
    let out = clients::psql(kh.port(), "whoever", None, "select 1");
    assert!(!out.status.success());
    let err = clients::stderr(&out);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!kh.keyhole.logs().contains("not-the-password"));
}

#[tokio::test]
async fn sigterm_closes_idle_pooled_connections_at_once_while_a_session_drains() {
    let mut kh = Pooled::start_with(
        SCRAM_USER,
        SCRAM_PASS,
        "&pool=session",
        &["--max-sigterm-delay", "60s"],
    );
    let parked = Client::connect(kh.port(), "postgres", "parked").await;
    let parked_pid = parked.pid().await;
    parked.close().await;
    kh.wait_idle(1.0);
    // Another key: a server connection of its own, held through the drain.
    let held = Client::connect(kh.port(), "postgres", "held").await;
    let held_pid = held.pid().await;
    assert_ne!(held_pid, parked_pid);

    kh.keyhole.signal(libc::SIGTERM);
    // Without a drain of the pool, the parked backend would stay until
    // keyhole exits, which the held session keeps it from doing.
    let deadline = Instant::now() + Duration::from_secs(20);
    while backend_alive(parked_pid) {
        assert!(
            Instant::now() < deadline,
            "the parked server connection outlived SIGTERM; keyhole's log:\n{}",
            kh.keyhole.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kh.keyhole.wait_exit(Duration::ZERO).is_none(),
        "keyhole exited with a session open:\n{}",
        kh.keyhole.logs()
    );
    assert_eq!(
        kh.metric("keyhole_pool_closed_total", "reason=\"shutdown\""),
        1.0
    );
    // The session in use goes on, on its own server connection...
    assert_eq!(held.one::<String>("select 'draining'").await, "draining");
    assert_eq!(held.pid().await, held_pid);
    assert!(backend_alive(held_pid));
    // ...whose backend goes when its client leaves, and keyhole exits 0.
    held.close().await;
    wait_backend_gone(held_pid);
    let status = kh
        .keyhole
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("keyhole still runs:\n{}", kh.keyhole.logs()));
    assert!(status.success(), "{status:?}:\n{}", kh.keyhole.logs());
}
