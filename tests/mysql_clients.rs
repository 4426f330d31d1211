//! Real MySQL clients through the real keyhole binary to a real MariaDB that
//! requires TLS: the `mariadb` command-line client with its default settings
//! and the `mysql_async` driver (which has no TLS of its own here), for the
//! `mysql_native_password` and `ed25519` users. Covered: logins and refusals,
//! what keyhole advertises with and without a local certificate, features the
//! client negotiates (compression, database on connect, connection
//! attributes, multi statements), 200 MB each way, 200 clients at once,
//! KILL QUERY and Ctrl-C, a client that vanishes mid-query, and the Unix
//! socket listener.

mod support;

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};
use sha2::{Digest, Sha256};

use support::certs::TestPki;
use support::clients::{self, expect_success};
use support::keyhole::{Keyhole, Ready};
use support::logs::{closed_lines, field};
use support::mariadb::{
    self, MariaDb, MariaDbOptions, CLIENT_SSL, DATABASE, ED25519_PASS, ED25519_USER, MARIADB_FLAGS,
    MARIADB_TIMEOUT, NATIVE_PASS, NATIVE_USER,
};
use support::process::{describe_output, signal_pid, KillAfter};

/// Both test users: one per authentication plugin.
const USERS: [(&str, &str); 2] = [(NATIVE_USER, NATIVE_PASS), (ED25519_USER, ED25519_PASS)];

/// `current_user()` and whether the server's side of the session is TLS:
/// `user@%\t1` from the CLI.
const WHO_AND_TLS: &str = "select current_user(), variable_value <> '' \
     from information_schema.session_status where variable_name = 'Ssl_cipher'";

/// How long the `mysql_async` parts of a test may take before it fails.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(180);

/// keyhole in front of `db` (its CA, its target), `extra` options first.
fn keyhole_for(db: &MariaDb, extra: &[&str]) -> Keyhole {
    let ca = db
        .pki()
        .ca
        .to_str()
        .expect("the CA path is UTF-8")
        .to_owned();
    let target = db.keyhole_target();
    let mut args = extra.to_vec();
    args.extend(["--ca-file", ca.as_str(), target.as_str()]);
    Keyhole::start(&args)
}

/// The `mariadb` client over TCP to 127.0.0.1:`port` as `user`, with `extra`
/// options (no database unless they name one), running `sql`.
fn cli(port: u16, user: &str, password: &str, extra: &[&str], sql: &str) -> Output {
    let port = port.to_string();
    let mut args = vec!["-h", "127.0.0.1", "-P", port.as_str(), "-u", user];
    args.extend_from_slice(extra);
    args.extend(["-e", sql]);
    mariadb::mariadb_with_args(&args, Some(password))
}

/// `mysql_async` options for `user` at 127.0.0.1:`port`, database
/// [`DATABASE`], from a URL as an application would write it.
/// `prefer_socket=false`: by default the driver asks a server it reached at
/// 127.0.0.1 for `@@socket` and reconnects to that Unix socket, which here
/// (the test server runs on this machine) would go around keyhole.
fn driver_opts(port: u16, user: &str, password: &str, params: &str) -> Opts {
    let url = format!(
        "mysql://{user}:{password}@127.0.0.1:{port}/{DATABASE}?prefer_socket=false{params}"
    );
    Opts::from_url(&url).expect("a valid mysql_async URL")
}

/// Connects with `opts`, panicking with the driver's error.
///
/// mysql_common 0.37 drops the last byte of MariaDB's 32-byte ed25519 nonce
/// when that byte is 0 (`AuthSwitchRequest::plugin_data` trims a trailing
/// NUL), so 1 in 256 of its ed25519 logins fail with 1045, straight to a
/// server as well as through keyhole. Such a refusal is tried again, twice
/// at most.
async fn connect(opts: impl Into<Opts>, what: &str) -> Conn {
    let opts = opts.into();
    let mut attempt = 1;
    loop {
        match Conn::new(opts.clone()).await {
            Ok(conn) => return conn,
            Err(mysql_async::Error::Server(err))
                if err.code == 1045 && opts.user() == Some(ED25519_USER) && attempt < 3 =>
            {
                attempt += 1;
            }
            Err(e) => panic!("{what}: mysql_async could not connect through keyhole: {e}"),
        }
    }
}

/// Runs `future` on `rt`, failing the test if it takes longer than
/// [`DRIVER_TIMEOUT`].
fn block_on<F: std::future::Future>(rt: &tokio::runtime::Runtime, future: F) -> F::Output {
    rt.block_on(async { tokio::time::timeout(DRIVER_TIMEOUT, future).await })
        .unwrap_or_else(|_| panic!("the mysql_async part did not finish within {DRIVER_TIMEOUT:?}"))
}

/// Lower-case hex SHA-256 of `text`, as MariaDB's `sha2(text, 256)` gives it.
fn sha256_hex(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// `select seq, sha2(seq, 256)` output for 1..=`rows`, as the CLI prints it.
fn numbered_hashes(rows: u32) -> String {
    (1..=rows)
        .map(|i| format!("{i}\t{}\n", sha256_hex(&i.to_string())))
        .collect()
}

/// Waits (up to 60 s) until the server lists a running statement whose text
/// is exactly `sql`, and returns its connection id.
fn wait_for_statement(db: &MariaDb, sql: &str) -> u32 {
    let find = format!(
        "select id from information_schema.processlist where info = '{}'",
        sql.replace('\'', "''")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let id = db.admin_sql(&find);
        if !id.is_empty() {
            return id.parse().expect("a connection id");
        }
        assert!(
            Instant::now() < deadline,
            "the server never showed {sql:?} running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Does the server still have connection `id`?
fn server_has_connection(db: &MariaDb, id: u32) -> bool {
    db.admin_sql(&format!(
        "select count(*) from information_schema.processlist where id = {id}"
    )) != "0"
}

#[test]
fn mariadb_cli_with_default_settings_logs_in_over_verified_tls() {
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    for (user, password) in USERS {
        let out = mariadb::mariadb(keyhole.port(), user, Some(password), WHO_AND_TLS);
        assert_eq!(
            expect_success(&out, user),
            format!("{user}@%\t1"),
            "{user} logs in, and the server's session is TLS"
        );
    }
    // A wrong password gets the server's own refusal, unchanged.
    for (user, _) in USERS {
        let out = mariadb::mariadb(keyhole.port(), user, Some("not-the-password"), "select 1");
        assert!(!out.status.success(), "{}", describe_output(&out));
        assert_eq!(
            clients::stderr(&out).trim_end(),
            format!(
                "ERROR 1045 (28000): Access denied for user '{user}'@'127.0.0.1' (using password: YES)"
            ),
            "{user} with a wrong password"
        );
    }
    keyhole.wait_for_log("outcome=\"client_closed\"", 2);
    let logs = keyhole.wait_for_log("outcome=\"server_refused\"", 2);
    for user in [NATIVE_USER, ED25519_USER] {
        assert!(
            logs.contains(&format!("user=\"{user}\" database=\"{DATABASE}\"")),
            "the closed lines name {user} and the database:\n{logs}"
        );
    }
    for secret in [NATIVE_PASS, ED25519_PASS, "not-the-password"] {
        assert!(
            !logs.contains(secret),
            "a password reached the log:\n{logs}"
        );
    }
}

#[test]
fn mysql_async_runs_parameterized_and_prepared_statements() {
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    let rt = support::runtime();
    block_on(&rt, async {
        for (user, password) in USERS {
            let mut conn = connect(driver_opts(keyhole.port(), user, password, ""), user).await;
            let who: Option<(String, i64)> =
                conn.query_first(WHO_AND_TLS).await.expect("who and TLS");
            assert_eq!(
                who,
                Some((format!("{user}@%"), 1)),
                "{user}: the server's session is TLS"
            );

            // Parameters, text and binary, in both directions. The blob spans
            // many TLS records and several reads on each leg.
            let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
            let row: Option<(String, i64, Option<String>, Vec<u8>)> = conn
                .exec_first(
                    "select concat(?, '|', ?), ? + 1, ?, ?",
                    ("grüße", "✓", 41, None::<String>, blob.clone()),
                )
                .await
                .expect("a query with parameters");
            let (text, number, null, echoed) = row.expect("one row");
            assert_eq!(
                (text.as_str(), number, null),
                ("grüße|✓", 42, None),
                "{user}"
            );
            assert!(
                echoed == blob,
                "{user}: the 300 kB parameter came back changed"
            );

            // Prepared statements, executed many times, then closed.
            conn.query_drop("create temporary table prepared (id int primary key, name text)")
                .await
                .expect("create a temporary table");
            let insert = conn
                .prep("insert into prepared (id, name) values (?, ?)")
                .await
                .expect("prepare the insert");
            conn.exec_batch(
                &insert,
                (1..=200).map(|i| (i, format!("row {i} of {user}"))),
            )
            .await
            .expect("execute the insert 200 times");
            let select = conn
                .prep("select name from prepared where id = ?")
                .await
                .expect("prepare the select");
            for id in [1, 77, 200] {
                let name: Option<String> = conn.exec_first(&select, (id,)).await.expect("select");
                assert_eq!(name, Some(format!("row {id} of {user}")));
            }
            let missing: Option<String> = conn.exec_first(&select, (201,)).await.expect("select");
            assert_eq!(missing, None);
            let count: Option<(i64, i64)> = conn
                .query_first("select count(*), sum(id) from prepared")
                .await
                .expect("count");
            assert_eq!(count, Some((200, 20_100)), "{user}");
            conn.close(insert).await.expect("close the insert");
            conn.close(select).await.expect("close the select");
            conn.disconnect().await.expect("disconnect");
        }
    });
    keyhole.wait_for_log("outcome=\"client_closed\"", 2);
}

#[test]
fn keyhole_advertises_tls_only_with_a_local_certificate() {
    let db = MariaDb::shared();
    let server = mariadb::read_greeting(db.port()).expect("the server's greeting");
    assert_ne!(
        server.capabilities & CLIENT_SSL,
        0,
        "the server offers TLS: {server:?}"
    );

    // Plain local leg: the same greeting, without CLIENT_SSL.
    let plain = keyhole_for(db, &[]);
    let greeting = mariadb::read_greeting(plain.port()).expect("keyhole's greeting");
    assert_eq!(
        greeting.capabilities,
        server.capabilities & !CLIENT_SSL,
        "only CLIENT_SSL is cleared: keyhole {greeting:?}, server {server:?}"
    );
    assert_eq!(greeting.server_version, server.server_version);
    assert_eq!(greeting.auth_plugin, server.auth_plugin);
    // So a client that insists on TLS is told there is none.
    let port = plain.port().to_string();
    let out = mariadb::mariadb_tcp(
        &port,
        NATIVE_USER,
        Some(NATIVE_PASS),
        &["--ssl-verify-server-cert", "-e", "select 1"],
    );
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        clients::stderr(&out).trim_end(),
        "ERROR 2026 (HY000): TLS/SSL error: SSL is required, but the server does not support it"
    );

    // TLS local leg: CLIENT_SSL stays, and a verifying client gets keyhole's
    // own certificate (the local PKI, not the server's).
    let local = TestPki::generate(&["localhost"]);
    let cert = local.server_cert.to_str().expect("UTF-8 path");
    let key = local.server_key.to_str().expect("UTF-8 path");
    let tls = keyhole_for(db, &["--listen-cert", cert, "--listen-key", key]);
    let greeting = mariadb::read_greeting(tls.port()).expect("keyhole's greeting");
    assert_eq!(
        greeting.capabilities, server.capabilities,
        "the server's capabilities, CLIENT_SSL included"
    );
    let port = tls.port().to_string();
    let verifying = |ca: &Path, user: &str, password: &str, sql: &str| {
        let ca = format!("--ssl-ca={}", ca.display());
        mariadb::mariadb_with_args(
            &[
                // `-h localhost` alone would mean the Unix socket.
                "--protocol=TCP",
                "-h",
                "localhost",
                "-P",
                &port,
                "-u",
                user,
                "-D",
                DATABASE,
                "--ssl-verify-server-cert",
                &ca,
                "-e",
                sql,
            ],
            Some(password),
        )
    };
    for (user, password) in USERS {
        let out = verifying(&local.ca, user, password, "status");
        let status = expect_success(&out, "status over a verified local TLS leg");
        assert!(
            status
                .lines()
                .any(|line| line.starts_with("SSL:") && line.contains("Cipher in use is")),
            "the client's own session is TLS:\n{status}"
        );
        let out = verifying(&local.ca, user, password, WHO_AND_TLS);
        assert_eq!(
            expect_success(&out, "who over a verified local TLS leg"),
            format!("{user}@%\t1"),
            "and so is the server's"
        );
    }
    let out = verifying(&db.pki().ca, NATIVE_USER, NATIVE_PASS, "select 1");
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert!(
        clients::stderr(&out).starts_with("ERROR 2026 (HY000): TLS/SSL error:"),
        "the server's CA does not vouch for keyhole's local certificate:\n{}",
        describe_output(&out)
    );
}

#[test]
fn client_negotiated_features_pass_through() {
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    let port = keyhole.port();

    // Compression (CLIENT_COMPRESS): on, and a 1 MB result arrives intact.
    let rows = 15_000;
    let out = cli(
        port,
        ED25519_USER,
        ED25519_PASS,
        &["-C", "-D", DATABASE],
        &format!(
            "show session status like 'Compression'; \
             select seq, sha2(seq, 256) from seq_1_to_{rows}"
        ),
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    let (first, rest) = text.split_once('\n').expect("more than one line");
    assert_eq!(first, "Compression\tON");
    let expected = numbered_hashes(rows);
    assert!(rest.len() > 1_000_000, "{} bytes", rest.len());
    assert!(
        rest == expected,
        "the compressed result differs from the expected one ({} vs {} bytes; first differing line {:?})",
        rest.len(),
        expected.len(),
        rest.lines().zip(expected.lines()).find(|(a, b)| a != b)
    );

    // The database given on connect (CLIENT_CONNECT_WITH_DB), or none.
    let out = cli(
        port,
        NATIVE_USER,
        NATIVE_PASS,
        &["-D", DATABASE],
        "select database()",
    );
    assert_eq!(expect_success(&out, "with -D"), DATABASE);
    let out = cli(port, NATIVE_USER, NATIVE_PASS, &[], "select database()");
    assert_eq!(expect_success(&out, "without -D"), "NULL");

    let rt = support::runtime();
    block_on(&rt, async {
        // Compression from the driver too, with a 1 MB parameter both ways.
        let opts = driver_opts(port, NATIVE_USER, NATIVE_PASS, "&compression=fast");
        let mut conn = connect(opts, "compressed driver").await;
        let compression: Option<(String, String)> = conn
            .query_first("show session status like 'Compression'")
            .await
            .expect("compression status");
        assert_eq!(compression, Some(("Compression".into(), "ON".into())));
        let big: String = (0..1_000_000u32)
            .map(|i| char::from(b'a' + (i * 31 % 26) as u8))
            .collect();
        let echoed: Option<(String, String)> = conn
            .exec_first("select ?, database()", (big.clone(),))
            .await
            .expect("echo 1 MB compressed");
        let (echoed, database) = echoed.expect("one row");
        assert!(echoed == big, "the 1 MB value came back changed");
        assert_eq!(database, DATABASE, "the driver's database on connect");
        conn.disconnect().await.expect("disconnect");

        // Multi statements (CLIENT_MULTI_STATEMENTS): one COM_QUERY, three
        // results.
        let opts = driver_opts(port, ED25519_USER, ED25519_PASS, "");
        let mut conn = connect(opts, "multi statements").await;
        let mut result = conn
            .query_iter("select 1; select 2, 'two'; select seq from seq_1_to_3")
            .await
            .expect("a multi-statement query");
        let one: Vec<i64> = result.collect().await.expect("first result");
        let two: Vec<(i64, String)> = result.collect().await.expect("second result");
        let three: Vec<i64> = result.collect().await.expect("third result");
        assert_eq!(
            (one, two, three),
            (vec![1], vec![(2, "two".to_string())], vec![1, 2, 3])
        );
        drop(result);
        conn.disconnect().await.expect("disconnect");
    });
    let logs = keyhole.wait_for_log("outcome=\"client_closed\"", 5);
    let closed = closed_lines(&logs);
    assert!(
        closed
            .iter()
            .all(|f| field(f, "outcome") == "client_closed"),
        "{logs}"
    );
}

/// Connection attributes (CLIENT_CONNECT_ATTRS) reach the server as the
/// clients sent them: the CLI's own (`_client_name` and friends) and ~30 kB
/// from the driver, which make the handshake response span several TLS
/// records. Only a server with the performance schema shows them.
#[test]
fn connection_attributes_reach_the_server() {
    let db = MariaDb::start(MariaDbOptions {
        tls: true,
        extra_conf: vec![
            "performance-schema=ON".to_string(),
            "performance-schema-session-connect-attrs-size=65536".to_string(),
        ],
    });
    db.admin_sql(&format!(
        "grant select on performance_schema.* to {NATIVE_USER}@'%', {ED25519_USER}@'%'"
    ));
    let keyhole = keyhole_for(&db, &[]);
    let attributes = |what: &str| {
        format!(
            "select {what} from performance_schema.session_connect_attrs \
             where processlist_id = connection_id() order by attr_name"
        )
    };
    let out = mariadb::mariadb(
        keyhole.port(),
        NATIVE_USER,
        Some(NATIVE_PASS),
        &attributes("concat(attr_name, '=', attr_value)"),
    );
    let cli_attributes = expect_success(&out, "the CLI's connection attributes");
    assert!(
        cli_attributes
            .lines()
            .any(|line| line == "_client_name=libmariadb")
            && cli_attributes
                .lines()
                .any(|line| line == "program_name=mysql"),
        "{cli_attributes}"
    );

    let rt = support::runtime();
    block_on(&rt, async {
        let mut opts =
            OptsBuilder::from_opts(driver_opts(keyhole.port(), ED25519_USER, ED25519_PASS, ""))
                .connect_attribute("program_name", "keyhole-mysql-clients-test");
        let mut sent = vec![(
            "program_name".to_string(),
            "keyhole-mysql-clients-test".to_string(),
        )];
        for i in 0..30 {
            let (name, value) = (format!("attribute_{i:02}"), format!("{i:02}").repeat(500));
            opts = opts.connect_attribute(name.clone(), value.clone());
            sent.push((name, value));
        }
        sent.sort();
        let mut conn = connect(opts, "many connection attributes").await;
        let seen: Vec<(String, String)> = conn
            .query(attributes("attr_name, attr_value"))
            .await
            .expect("the driver's connection attributes");
        assert!(seen == sent, "the server saw {seen:?}");
        let who: Option<(String, i64)> = conn.query_first(WHO_AND_TLS).await.expect("who");
        assert_eq!(who, Some((format!("{ED25519_USER}@%"), 1)));
        conn.disconnect().await.expect("disconnect");
    });
}

/// Runs the `mariadb` client with [`MARIADB_FLAGS`] and `args`, feeding its
/// stdout to a SHA-256 as it arrives (nothing is buffered). Returns the byte
/// count and the hex digest; panics if the client fails or says anything on
/// stderr.
fn cli_streamed(args: &[&str], password: &str) -> (u64, String) {
    let mut cmd = mariadb::mariadb_command(Some(password));
    cmd.args(MARIADB_FLAGS)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    let timer = KillAfter::arm(child.id(), MARIADB_TIMEOUT);
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stdout.read(&mut buf).expect("read the client's output");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read the client's stderr");
    let status = child.wait().expect("wait for the client");
    assert!(
        !timer.disarm(),
        "the client did not finish within {MARIADB_TIMEOUT:?}"
    );
    assert!(
        status.success() && stderr.is_empty(),
        "the client failed ({status}):\n{stderr}"
    );
    (bytes, format!("{:x}", hasher.finalize()))
}

#[test]
fn two_hundred_megabytes_each_way_arrive_intact() {
    const ROWS: u32 = 1_400_000;
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    let port = keyhole.port().to_string();
    let base = [
        "-h",
        "127.0.0.1",
        "-P",
        port.as_str(),
        "-u",
        NATIVE_USER,
        "-D",
        DATABASE,
    ];

    // Row i is `i <tab> sha256(i) twice`: ~137 bytes, ~192 MB in all.
    let line = |i: u32| {
        let hash = sha256_hex(&i.to_string());
        format!("{i}\t{hash}{hash}\n")
    };

    // Out: a large result, streamed by the CLI (--quick: row by row).
    let mut args = base.to_vec();
    let select = format!("select seq, repeat(sha2(seq, 256), 2) from seq_1_to_{ROWS}");
    args.extend(["--quick", "-e", select.as_str()]);
    let (bytes, digest) = cli_streamed(&args, NATIVE_PASS);
    let mut expected = Sha256::new();
    let mut expected_bytes = 0u64;
    for i in 1..=ROWS {
        let line = line(i);
        expected_bytes += line.len() as u64;
        expected.update(line.as_bytes());
    }
    assert!(expected_bytes > 190_000_000, "{expected_bytes} bytes");
    assert_eq!(
        (bytes, digest),
        (expected_bytes, format!("{:x}", expected.finalize())),
        "the streamed result differs from the rows the query makes"
    );

    // In: LOAD DATA LOCAL INFILE of the same lines from a file.
    let scratch = support::scratch_dir("keyhole-mysql-infile-");
    let path = scratch.path().join("rows.tsv");
    let mut file = BufWriter::new(std::fs::File::create(&path).expect("create the data file"));
    for i in 1..=ROWS {
        file.write_all(line(i).as_bytes())
            .expect("write the data file");
    }
    file.into_inner()
        .expect("flush the data file")
        .sync_all()
        .expect("sync the data file");
    let table = format!("{DATABASE}.loaded_through_keyhole");
    db.admin_sql(&format!(
        "drop table if exists {table}; \
         create table {table} (id bigint unsigned not null, body char(128) character set ascii not null) \
             engine = MyISAM"
    ));
    let load = format!(
        "load data local infile '{}' into table loaded_through_keyhole \
         fields terminated by '\\t' (id, body)",
        path.display()
    );
    let mut args = base.to_vec();
    args.extend(["--local-infile=1", "-e", load.as_str()]);
    let out = mariadb::mariadb_with_args(&args, Some(NATIVE_PASS));
    expect_success(&out, "LOAD DATA LOCAL INFILE through keyhole");
    drop(scratch);
    // The server checks every row against the line it should be.
    let sum = u64::from(ROWS) * (u64::from(ROWS) + 1) / 2;
    assert_eq!(
        db.admin_sql(&format!(
            "select count(*), sum(id), sum(body = convert(repeat(sha2(id, 256), 2) using ascii)) from {table}"
        )),
        format!("{ROWS}\t{sum}\t{ROWS}"),
        "rows, their ids, and rows whose body is right"
    );
    db.admin_sql(&format!("drop table {table}"));
    // Both went through keyhole: its closed lines count them.
    let logs = keyhole.wait_for_log("outcome=\"client_closed\"", 2);
    let most = |field: &str| {
        logs.lines()
            .filter(|line| line.contains("connection closed"))
            .filter_map(|line| {
                let (_, rest) = line.split_once(&format!(" {field}="))?;
                rest.split(' ').next()?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0)
    };
    assert!(
        most("bytes_to_client") > expected_bytes && most("bytes_from_client") > expected_bytes,
        "keyhole's byte counts:\n{logs}"
    );
}

#[test]
fn two_hundred_mysql_async_clients_at_once() {
    const CLIENTS: usize = 200;
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    let port = keyhole.port();
    let rt = support::runtime();
    let answered = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let (release, released) = tokio::sync::watch::channel(false);
    let (all_answered, wait_all_answered) = mpsc::channel();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (user, password) = USERS[i % 2];
            let answered = Arc::clone(&answered);
            let mut released = released.clone();
            let all_answered = all_answered.clone();
            rt.spawn(async move {
                let opts = driver_opts(port, user, password, "");
                let mut conn = connect(opts, &format!("client {i}")).await;
                let row: Option<(u32, String, i64, u64)> = conn
                    .exec_first(
                        "select connection_id(), current_user(), \
                         (select variable_value <> '' from information_schema.session_status \
                          where variable_name = 'Ssl_cipher'), ?",
                        (i as u64,),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("client {i}: {e}"));
                let (id, who, tls, echoed) = row.expect("one row");
                assert_eq!((who, tls, echoed), (format!("{user}@%"), 1, i as u64));
                if answered.wait().await.is_leader() {
                    let _ = all_answered.send(());
                }
                // Held open until the test has looked at the server.
                released
                    .wait_for(|go| *go)
                    .await
                    .expect("the test releases the clients");
                conn.disconnect().await.expect("disconnect");
                id
            })
        })
        .collect();
    drop(all_answered);
    wait_all_answered
        .recv_timeout(DRIVER_TIMEOUT)
        .unwrap_or_else(|e| {
            panic!("not all {CLIENTS} clients connected and answered ({e}); see their panics above")
        });
    // Every client's session is open on the server at this moment (other
    // tests may add their own).
    let open: usize = db
        .admin_sql(&format!(
            "select count(*) from information_schema.processlist \
             where user in ('{NATIVE_USER}', '{ED25519_USER}')"
        ))
        .parse()
        .expect("a count");
    assert!(open >= CLIENTS, "{open} sessions open on the server");
    release.send(true).expect("release the clients");
    let mut ids = block_on(&rt, futures_util::future::join_all(tasks))
        .into_iter()
        .map(|joined| joined.expect("a client task"))
        .collect::<Vec<u32>>();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), CLIENTS, "200 distinct server sessions");
    let logs = keyhole.wait_for_log("outcome=\"client_closed\"", CLIENTS);
    // Besides the 200 sessions, only ed25519 logins the driver got wrong
    // (see `connect`) and tried again.
    let others: Vec<&str> = logs
        .lines()
        .filter(|line| {
            line.contains("connection closed") && !line.contains("outcome=\"client_closed\"")
        })
        .collect();
    assert!(
        others
            .iter()
            .all(|line| line.contains(&format!("user=\"{ED25519_USER}\""))
                && line.contains("outcome=\"server_refused\"")),
        "every connection ended cleanly:\n{logs}"
    );
}

#[test]
fn kill_query_and_ctrl_c_through_keyhole_interrupt_only_the_statement() {
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    let port = keyhole.port();
    let rt = support::runtime();

    // Session A (the driver) sleeps; session B (the CLI, also through
    // keyhole) finds it on the server and kills its query.
    let sleeper = "select sleep(60), 'kill-query-through-keyhole'";
    let (id, sleeping) = block_on(&rt, async {
        let mut conn = connect(driver_opts(port, NATIVE_USER, NATIVE_PASS, ""), "A").await;
        let id = conn.id();
        let sleeping = tokio::spawn(async move {
            let result = conn.query_drop(sleeper).await;
            (conn, result)
        });
        (id, sleeping)
    });
    let listed = wait_for_statement(db, sleeper);
    assert_eq!(
        listed, id,
        "the connection id in keyhole's greeting is the server's"
    );
    let out = mariadb::mariadb(
        port,
        ED25519_USER,
        Some(ED25519_PASS),
        &format!("KILL QUERY {id}"),
    );
    expect_success(&out, "KILL QUERY through keyhole");
    block_on(&rt, async {
        let (mut conn, result) = sleeping.await.expect("session A's task");
        match result {
            Err(mysql_async::Error::Server(err)) => assert_eq!(
                (err.code, err.state.as_str(), err.message.as_str()),
                (1317, "70100", "Query execution was interrupted")
            ),
            other => panic!("the killed query ended with {other:?}"),
        }
        // Only the statement died: the session goes on.
        let still: Option<(u32, String)> = conn
            .query_first("select connection_id(), 'still here'")
            .await
            .expect("session A after KILL QUERY");
        assert_eq!(still, Some((id, "still here".to_string())));
        conn.disconnect().await.expect("disconnect");
    });

    // Ctrl-C in the CLI: it opens a second connection to where it connected
    // (keyhole) and sends KILL QUERY with the id from the greeting.
    let sleeper = "select sleep(60), 'ctrl-c-through-keyhole'";
    let port_text = port.to_string();
    let mut cmd = mariadb::mariadb_command(Some(ED25519_PASS));
    cmd.args(MARIADB_FLAGS)
        .args(["-h", "127.0.0.1", "-P", &port_text, "-u", ED25519_USER])
        .args(["-e", sleeper])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    let timer = KillAfter::arm(child.id(), MARIADB_TIMEOUT);
    wait_for_statement(db, sleeper);
    signal_pid(child.id(), libc::SIGINT);
    let out = child.wait_with_output().expect("wait for the CLI");
    assert!(!timer.disarm(), "the CLI did not end after Ctrl-C");
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert!(
        clients::stdout(&out).contains("Ctrl-C -- query killed.")
            && clients::stderr(&out)
                .contains("ERROR 1317 (70100) at line 1: Query execution was interrupted"),
        "{}",
        describe_output(&out)
    );

    // keyhole serves on; every connection so far ended cleanly (A, B, the CLI
    // and its KILL connection).
    let out = mariadb::mariadb(port, NATIVE_USER, Some(NATIVE_PASS), "select 'after'");
    assert_eq!(expect_success(&out, "after the kills"), "after");
    let logs = keyhole.wait_for_log("outcome=\"client_closed\"", 5);
    assert_eq!(logs.matches("connection closed").count(), 5, "{logs}");
}

/// A client that vanishes mid-query (its connection task dropped with its
/// runtime, so its socket closes without COM_QUIT): keyhole serves on, and
/// the server's session ends by the time the statement would have.
#[test]
fn a_client_vanishing_mid_query_does_not_disturb_keyhole() {
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    let port = keyhole.port();
    let sleeper = "select sleep(10), 'vanishing-client'";
    let id = vanish_mid_query(db, port, sleeper);
    let gone = Instant::now();

    let out = mariadb::mariadb(port, NATIVE_USER, Some(NATIVE_PASS), "select 'others'");
    assert_eq!(expect_success(&out, "another client"), "others");

    // keyhole closes the vanished client's connection once the server is
    // done with it, and the server drops the session.
    keyhole.wait_for_log("connection closed", 2);
    let deadline = gone + Duration::from_secs(40);
    while server_has_connection(db, id) {
        assert!(
            Instant::now() < deadline,
            "the server still has the vanished client's session {id}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = mariadb::mariadb(port, NATIVE_USER, Some(NATIVE_PASS), "select 'still'");
    assert_eq!(expect_success(&out, "after the session ended"), "still");
}

/// What a direct connection gets (MariaDB checks every 5 s whether the client
/// of a sleeping statement is still there, and ends the session when it is
/// gone): the server session of a client that vanished through keyhole
/// should end long before its statement would.
#[test]
fn a_client_vanishing_mid_query_ends_its_server_session_early() {
    let db = MariaDb::shared();
    let keyhole = keyhole_for(db, &[]);
    let sleeper = "select sleep(120), 'vanishing-client-early'";
    let id = vanish_mid_query(db, keyhole.port(), sleeper);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server_has_connection(db, id) {
        assert!(
            Instant::now() < deadline,
            "20 s after its client vanished, the server still runs session {id}:\n{}",
            db.admin_sql(&format!(
                "select command, time, state, info from information_schema.processlist where id = {id}"
            ))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    keyhole.wait_for_log("connection closed", 1);
}

/// Starts `sql` from `mysql_async` through keyhole at `port`, waits until the
/// server runs it, then drops the driver's runtime with the connection task
/// in it: the socket closes, with no COM_QUIT. Returns the server's id of
/// that session.
fn vanish_mid_query(db: &MariaDb, port: u16, sql: &'static str) -> u32 {
    let rt = support::runtime();
    let id = block_on(&rt, async {
        let mut conn = connect(driver_opts(port, NATIVE_USER, NATIVE_PASS, ""), "vanishing").await;
        let id = conn.id();
        tokio::spawn(async move {
            let _ = conn.query_drop(sql).await;
            // Never reached before the runtime goes.
            drop(conn);
        });
        id
    });
    assert_eq!(wait_for_statement(db, sql), id);
    rt.shutdown_background();
    id
}

#[test]
fn unix_socket_listener_serves_the_cli_and_the_driver() {
    let db = MariaDb::shared();
    let dir = support::scratch_dir("keyhole-mysql-sock-");
    let port = support::free_port();
    let path = dir.path().join(format!("mysql-{port}.sock"));
    let ca = db.pki().ca.to_str().expect("UTF-8 path");
    let target = db.keyhole_target();
    let port_text = port.to_string();
    let _keyhole = Keyhole::spawn(
        &[
            "--port",
            &port_text,
            "--unix-socket",
            dir.path().to_str().expect("UTF-8 path"),
            "--ca-file",
            ca,
            &target,
        ],
        &[],
        Ready::Unix(path.clone()),
    );
    let socket = path.to_str().expect("UTF-8 path");
    for (user, password) in USERS {
        let out = mariadb::mariadb_with_args(
            &[
                "--socket",
                socket,
                "-u",
                user,
                "-D",
                DATABASE,
                "-e",
                WHO_AND_TLS,
            ],
            Some(password),
        );
        assert_eq!(
            expect_success(&out, "the CLI over keyhole's Unix socket"),
            format!("{user}@%\t1")
        );
    }
    let rt = support::runtime();
    block_on(&rt, async {
        let opts = OptsBuilder::default()
            .socket(Some(socket))
            .user(Some(ED25519_USER))
            .pass(Some(ED25519_PASS))
            .db_name(Some(DATABASE));
        let mut conn = connect(opts, "over the Unix socket").await;
        let who: Option<(String, i64)> = conn.query_first(WHO_AND_TLS).await.expect("who");
        assert_eq!(who, Some((format!("{ED25519_USER}@%"), 1)));
        let doubled: Option<i64> = conn.exec_first("select ? * 2", (21,)).await.expect("exec");
        assert_eq!(doubled, Some(42));
        conn.disconnect().await.expect("disconnect");
    });
}

/// A MySQL client may send its TLS ClientHello right behind the SSLRequest,
/// since the server answers an SSLRequest with nothing. Both arrive here in
/// one write; keyhole must take them as one TLS handshake, then speak MySQL
/// inside it (an ERR for a response that is not one).
#[test]
fn a_client_hello_pipelined_behind_the_ssl_request_starts_tls() {
    keyhole::tls::install_crypto_provider();
    let db = MariaDb::shared();
    let local = TestPki::generate(&["localhost"]);
    let cert = local.server_cert.to_str().expect("utf-8 path");
    let key = local.server_key.to_str().expect("utf-8 path");
    let keyhole = keyhole_for(db, &["--listen-cert", cert, "--listen-key", key]);

    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", keyhole.port())).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut header = [0u8; 4];
    tcp.read_exact(&mut header).expect("greeting header");
    let mut greeting = vec![0u8; usize::from(header[0]) | usize::from(header[1]) << 8];
    tcp.read_exact(&mut greeting).expect("greeting");

    let config = local.tls_client_config(None);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(config, name).expect("client");

    // SSLRequest (seq 1): PROTOCOL_41 | SSL | SECURE_CONNECTION | PLUGIN_AUTH, then the ClientHello.
    let caps: u32 = 0x200 | 0x800 | 0x8000 | (1 << 19);
    let mut bytes = vec![32, 0, 0, 1];
    bytes.extend_from_slice(&caps.to_le_bytes());
    bytes.extend_from_slice(&(16u32 << 20).to_le_bytes());
    bytes.push(45);
    bytes.extend_from_slice(&[0; 23]);
    conn.write_tls(&mut bytes).expect("client hello");
    tcp.write_all(&bytes).expect("one write");

    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Not a HandshakeResponse41: keyhole's ERR comes back inside TLS, in sequence.
    tls.write_all(&[3, 0, 0, 2, b'x', b'y', b'z'])
        .expect("write over TLS");
    let mut reply = [0u8; 4];
    tls.read_exact(&mut reply).expect("ERR header over TLS");
    assert_eq!(reply[3], 3, "the ERR follows the client's packet 2");
    let mut payload = vec![0u8; usize::from(reply[0]) | usize::from(reply[1]) << 8];
    tls.read_exact(&mut payload).expect("ERR payload over TLS");
    assert_eq!(payload[0], 0xff, "an ERR packet");
    assert_eq!(u16::from_le_bytes([payload[1], payload[2]]), 1043);
    let text = String::from_utf8_lossy(&payload[9..]);
    assert!(text.starts_with("invalid handshake response"), "{text}");
}

/// A `keyhole_upstream_tls_handshakes_total` sample for `kind`.
fn handshakes(http_port: u16, kind: &str) -> f64 {
    let (_, scrape) = support::http::get(http_port, "/metrics").expect("GET /metrics");
    let prefix = "keyhole_upstream_tls_handshakes_total{";
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(&format!("kind=\"{kind}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_next_connection_resumes_the_servers_tls_session() {
    // MariaDB (OpenSSL) sends TLS 1.3 session tickets; keyhole keeps them
    // per target, so only the first connection pays for a full handshake.
    // (PostgreSQL turns tickets off: every handshake to it is full.)
    let db = MariaDb::shared();
    let http_port = support::free_port();
    let http = http_port.to_string();
    let keyhole = keyhole_for(db, &["--prometheus", "--http-port", &http]);
    for _ in 0..3 {
        let out = cli(keyhole.port(), NATIVE_USER, NATIVE_PASS, &[], "select 1");
        expect_success(&out, "mariadb through keyhole");
    }
    let (full, resumed) = (
        handshakes(http_port, "full"),
        handshakes(http_port, "resumed"),
    );
    assert_eq!(
        (full, resumed),
        (1.0, 2.0),
        "one full handshake, then resumed ones; keyhole log:\n{}",
        keyhole.logs()
    );
    assert_eq!(handshakes(http_port, "full_after_retry"), 0.0);
}
