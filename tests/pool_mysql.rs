//! `pool=session` for MySQL through the real `keyhole` binary and a real
//! MariaDB: keyhole logs in itself (`user=` with `password-file=`,
//! `mysql_native_password`), greets the client itself, keeps the server
//! connection when the client sends COM_QUIT with nothing in flight, resets
//! it with COM_RESET_CONNECTION and hands it to the next client of the same
//! key. Every test checks the server's own view (`CONNECTION_ID()`,
//! session state) rather than keyhole's word for it.

mod support;

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use support::keyhole::Keyhole;
use support::mariadb::{
    self, MariaDb, DATABASE, ED25519_PASS, ED25519_USER, NATIVE_PASS, NATIVE_USER,
};

/// A keyhole in front of the shared MariaDB whose target logs in as `user`
/// with `password` from a file, with `params` added, and `/metrics`.
struct Pooled {
    keyhole: Keyhole,
    http_port: u16,
    _dir: tempfile::TempDir,
}

impl Pooled {
    fn start(user: &str, password: &str, params: &str, extra: &[&str]) -> Pooled {
        let my = MariaDb::shared();
        let dir = support::scratch_dir("keyhole-pool-mysql-");
        let file = dir.path().join("password");
        std::fs::write(&file, format!("{password}\n")).expect("write the password file");
        let target = format!(
            "{}&user={user}&password-file={}{params}",
            my.keyhole_target(),
            file.display()
        );
        let http_port = support::free_port();
        let http = http_port.to_string();
        let ca = my.pki().ca.to_str().expect("UTF-8").to_owned();
        let mut args = vec!["--prometheus", "--http-port", &http, "--ca-file", &ca];
        args.extend_from_slice(extra);
        args.push(&target);
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

/// mysql_async options through keyhole: any user name and password (the
/// listener is the credential), database `db`.
fn opts(port: u16, db: Option<&str>) -> mysql_async::OptsBuilder {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some("whoever"))
        .pass(Some("not checked"))
        .db_name(db)
        .prefer_socket(false)
}

async fn connect(port: u16, db: Option<&str>) -> mysql_async::Conn {
    mysql_async::Conn::new(opts(port, db))
        .await
        .unwrap_or_else(|e| panic!("connect through the pool: {e}"))
}

async fn one<T: mysql_async::prelude::FromRow + Send + 'static>(
    conn: &mut mysql_async::Conn,
    sql: &str,
) -> T {
    conn.query_first::<T, _>(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

#[test]
fn the_next_client_gets_the_same_server_connection_reset() {
    let kh = Pooled::start(NATIVE_USER, NATIVE_PASS, "&pool=session&pool-size=2", &[]);
    let rt = support::runtime();
    rt.block_on(async {
        let mut first = connect(kh.port(), Some(DATABASE)).await;
        let id: u32 = one(&mut first, "select connection_id()").await;
        assert_eq!(
            first.id(),
            id,
            "the greeting carries the server's connection id"
        );
        let user: String = one(&mut first, "select current_user()").await;
        assert!(user.starts_with(NATIVE_USER), "{user}");
        for sql in [
            "set @x = 42",
            "create temporary table pool_tmp (a int)",
            "set session sql_mode = 'ANSI_QUOTES'",
            "prepare pool_stmt from 'select 1'",
            "do get_lock('keyhole_pool_lock', 0)",
            "use information_schema",
        ] {
            first
                .query_drop(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        first.disconnect().await.expect("COM_QUIT");
        kh.wait_idle(1.0);

        let mut second = connect(kh.port(), Some(DATABASE)).await;
        let again: u32 = one(&mut second, "select connection_id()").await;
        assert_eq!(again, id, "the same server connection");
        assert_eq!(second.id(), id);
        let x: Option<i64> = one(&mut second, "select @x").await;
        assert_eq!(x, None, "user variables are gone");
        let err = second
            .query_drop("select * from pool_tmp")
            .await
            .expect_err("the temporary table is gone");
        assert_eq!(server_code(&err), Some(1146), "{err}");
        let same: i64 = one(&mut second, "select @@session.sql_mode = @@global.sql_mode").await;
        assert_eq!(same, 1, "session variables are back to the global values");
        let err = second
            .query_drop("execute pool_stmt")
            .await
            .expect_err("the prepared statement is gone");
        assert_eq!(server_code(&err), Some(1243), "{err}");
        let free: i64 = one(&mut second, "select is_free_lock('keyhole_pool_lock')").await;
        assert_eq!(free, 1, "GET_LOCK locks are released");
        let db: String = one(&mut second, "select database()").await;
        assert_eq!(db, DATABASE, "the key's database is put back");
        // A 17 MB statement: more than one packet from the client.
        let big = format!("select length('{}')", "a".repeat(17_000_000));
        let n: i64 = one(&mut second, &big).await;
        assert_eq!(n, 17_000_000);
        second.disconnect().await.expect("COM_QUIT");
        kh.wait_idle(1.0);
        assert_eq!(kh.metric("keyhole_pool_opened_total", ""), 1.0);
        assert_eq!(kh.metric("keyhole_pool_reused_total", ""), 1.0);
    });
}

#[test]
fn a_client_leaving_inside_a_transaction_or_without_quit_is_not_reused() {
    let kh = Pooled::start(NATIVE_USER, NATIVE_PASS, "&pool=session", &[]);
    let rt = support::runtime();
    rt.block_on(async {
        let mut first = connect(kh.port(), Some(DATABASE)).await;
        let id: u32 = one(&mut first, "select connection_id()").await;
        first.query_drop("begin").await.expect("begin");
        first.disconnect().await.expect("COM_QUIT");
        kh.wait_metric("keyhole_pool_closed_total", "not_reusable", 1.0);
        let mut second = connect(kh.port(), Some(DATABASE)).await;
        let other: u32 = one(&mut second, "select connection_id()").await;
        assert_ne!(other, id, "a connection left in a transaction is closed");
        // A different key (no database) gets a connection of its own.
        let mut third = connect(kh.port(), None).await;
        let third_id: u32 = one(&mut third, "select connection_id()").await;
        assert_ne!(third_id, other);
        third.disconnect().await.expect("COM_QUIT");
        second.disconnect().await.expect("COM_QUIT");
        kh.wait_idle(2.0);
        // Each key finds its own idle connection, whatever the last client's was.
        let mut fourth = connect(kh.port(), Some(DATABASE)).await;
        let fourth_id: u32 = one(&mut fourth, "select connection_id()").await;
        assert_eq!(fourth_id, other, "the idle connection of its key");
        fourth.disconnect().await.expect("COM_QUIT");
        kh.wait_idle(2.0);
    });
    // A client killed in the middle of a statement (no COM_QUIT): the
    // server connection is closed, and the server stops the statement.
    let mut cli = mariadb::mariadb_command(None)
        .args(mariadb::MARIADB_FLAGS)
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &kh.port().to_string(),
            "-u",
            "anyone",
            "-D",
            DATABASE,
            "-e",
            "select sleep(41)",
        ])
        .spawn()
        .expect("start the mariadb CLI");
    let my = MariaDb::shared();
    let running = || {
        my.admin_sql(
            "select count(*) from information_schema.processlist where info = 'select sleep(41)'",
        )
        .trim()
        .to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while running() != "1" {
        assert!(Instant::now() < deadline, "the statement never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    cli.kill().expect("kill the CLI");
    let _ = cli.wait();
    kh.wait_metric("keyhole_pool_closed_total", "not_reusable", 2.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while running() != "0" {
        assert!(
            Instant::now() < deadline,
            "the abandoned statement still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_mariadb_cli_reuses_one_connection() {
    let kh = Pooled::start(NATIVE_USER, NATIVE_PASS, "&pool=session", &[]);
    let port = kh.port();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let out = mariadb::mariadb(
            port,
            "anyone",
            Some("anything"),
            "select connection_id(); select 'two'; select count(*) from information_schema.schemata where schema_name = database()",
        );
        let text = support::clients::expect_success(&out, "mariadb through the pool");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.get(1..), Some(&["two", "1"][..]), "{text}");
        ids.push(lines[0].to_owned());
        kh.wait_idle(1.0);
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    // A multi-statement batch and a large result set through the relay.
    let out = mariadb::mariadb_tcp(
        &port.to_string(),
        "anyone",
        None,
        &[
            "-D",
            DATABASE,
            "--max-allowed-packet=64M",
            "-e",
            "select repeat('x', 20000000) into @big; select length(@big); select md5(repeat('y', 17000000)) = md5(x) from (select repeat('y', 17000000) as x) t; select repeat('z', 17000000)",
        ],
    );
    let text = support::clients::expect_success(&out, "17 MB rows");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"20000000"), "{:?}", lines.first());
    assert_eq!(lines.get(1), Some(&"1"));
    assert_eq!(lines.get(2).map(|l| l.len()), Some(17_000_000));
    kh.wait_idle(1.0);
    assert_eq!(kh.metric("keyhole_pool_opened_total", ""), 1.0);
    // LOAD DATA LOCAL INFILE: the server asks for the file, the client
    // sends it, and the session still ends clean: the same connection
    // serves every run.
    let dir = support::scratch_dir("keyhole-pool-infile-");
    let file = dir.path().join("rows.csv");
    std::fs::write(&file, "1\n2\n3\n").expect("write the rows");
    let load = format!(
        "create temporary table infile_rows (a int); load data local infile '{}' into table infile_rows; select count(*) from infile_rows",
        file.display()
    );
    for _ in 0..2 {
        let out = mariadb::mariadb_tcp(
            &port.to_string(),
            "anyone",
            None,
            &["-D", DATABASE, "--local-infile=1", "-e", &load],
        );
        let text = support::clients::expect_success(&out, "LOAD DATA LOCAL INFILE");
        assert_eq!(text.trim(), "3");
        kh.wait_idle(1.0);
    }
    assert_eq!(kh.metric("keyhole_pool_opened_total", ""), 1.0);
    assert_eq!(kh.metric("keyhole_pool_closed_total", ""), 0.0);
}

#[test]
fn a_full_pool_makes_the_next_client_wait_then_says_why() {
    let kh = Pooled::start(
        NATIVE_USER,
        NATIVE_PASS,
        "&pool=session&pool-size=1",
        &["--startup-timeout", "3s"],
    );
    let rt = support::runtime();
    rt.block_on(async {
        let port = kh.port();
        let mut first = connect(port, Some(DATABASE)).await;
        let id: u32 = one(&mut first, "select connection_id()").await;
        let waiting = tokio::spawn(async move {
            let mut conn = connect(port, Some(DATABASE)).await;
            let got: u32 = one(&mut conn, "select connection_id()").await;
            conn.disconnect().await.expect("COM_QUIT");
            got
        });
        kh.wait_metric("keyhole_pool_waits_total", "", 1.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.disconnect().await.expect("COM_QUIT");
        let got = waiting.await.expect("the waiter");
        assert_eq!(got, id, "the waiter gets the connection given back");

        let mut holder = connect(port, Some(DATABASE)).await;
        let _: u32 = one(&mut holder, "select connection_id()").await;
        let started = Instant::now();
        let err = mysql_async::Conn::new(opts(port, Some(DATABASE)))
            .await
            .expect_err("the pool is full");
        assert!(started.elapsed() >= Duration::from_secs(2));
        let text = err.to_string();
        assert_eq!(server_code(&err), Some(1040), "{text}");
        assert!(
            text.contains("all 1 server connections of the pool are in use (pool-size=1)"),
            "{text}"
        );
        holder.disconnect().await.expect("COM_QUIT");
    });
}

#[test]
fn kill_query_from_another_session_reaches_a_pooled_clients_statement() {
    let kh = Pooled::start(NATIVE_USER, NATIVE_PASS, "&pool=session&pool-size=3", &[]);
    let rt = support::runtime();
    rt.block_on(async {
        let port = kh.port();
        // A connection goes into the pool first, so the sleeper's is reused.
        let warm = connect(port, Some(DATABASE)).await;
        warm.disconnect().await.expect("COM_QUIT");
        kh.wait_idle(1.0);
        let mut sleeper = connect(port, Some(DATABASE)).await;
        let id = sleeper.id();
        let started = Instant::now();
        let sleeping = tokio::spawn(async move {
            let r: Result<Option<i64>, _> = sleeper.query_first("select sleep(60)").await;
            (r.map_err(|e| e.to_string()), sleeper)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The id the client was greeted with names its server thread.
        let mut killer = connect(port, Some(DATABASE)).await;
        killer
            .query_drop(format!("kill query {id}"))
            .await
            .expect("KILL QUERY");
        let (result, sleeper) = sleeping.await.expect("the sleeper");
        assert!(started.elapsed() < Duration::from_secs(30));
        // MariaDB ends an interrupted SLEEP() with 1, or error 1317.
        match result {
            Ok(Some(1)) => {}
            Err(e) => assert!(e.contains("1317") || e.contains("interrupted"), "{e}"),
            other => panic!("SLEEP was not interrupted: {other:?}"),
        }
        sleeper.disconnect().await.expect("COM_QUIT");
        killer.disconnect().await.expect("COM_QUIT");
    });
}

#[test]
fn refused_logins_say_why() {
    // A user whose server asks for ed25519: keyhole's login names the method.
    let kh = Pooled::start(ED25519_USER, ED25519_PASS, "&pool=session", &[]);
    let out = mariadb::mariadb(kh.port(), "anyone", None, "select 1");
    assert!(!out.status.success());
    let err = support::clients::stderr(&out);
    assert!(err.contains("ERROR 1045"), "{err}");
    assert!(err.contains("client_ed25519"), "{err}");
    assert!(err.contains("mysql_native_password"), "{err}");
    drop(kh);
    // A wrong password: the server's own refusal reaches the client.
    let kh = Pooled::start(NATIVE_USER, "Wr0ngPassw0rdX", "&pool=session", &[]);
    let out = mariadb::mariadb(kh.port(), "anyone", None, "select 1");
    let err = support::clients::stderr(&out);
    assert!(
        err.contains("ERROR 1045") && err.contains("Access denied"),
        "{err}"
    );
    assert!(
        !kh.keyhole.logs().contains("Wr0ngPassw0rdX"),
        "{}",
        kh.keyhole.logs()
    );
    // Compression: keyhole's greeting does not offer it, so the driver
    // carries on uncompressed.
    let kh = Pooled::start(NATIVE_USER, NATIVE_PASS, "&pool=session", &[]);
    let rt = support::runtime();
    rt.block_on(async {
        let builder = opts(kh.port(), Some(DATABASE))
            .compression(Some(mysql_async::Compression::default()));
        let mut conn = mysql_async::Conn::new(builder).await.expect("connect");
        let c: String = one(&mut conn, "select variable_value from information_schema.session_status where variable_name = 'COMPRESSION'").await;
        assert_eq!(c, "OFF");
        conn.disconnect().await.expect("COM_QUIT");
    });
}

#[test]
fn password_file_without_pool_logs_in_for_each_client() {
    let kh = Pooled::start(NATIVE_USER, NATIVE_PASS, "", &[]);
    let first = mariadb::mariadb(
        kh.port(),
        "anyone",
        None,
        "select connection_id(), current_user()",
    );
    let second = mariadb::mariadb(
        kh.port(),
        "anyone",
        None,
        "select connection_id(), current_user()",
    );
    let a = support::clients::expect_success(&first, "mariadb, own login");
    let b = support::clients::expect_success(&second, "mariadb, own login");
    assert!(a.contains(NATIVE_USER), "{a}");
    assert_ne!(a, b, "each client its own connection");
}
