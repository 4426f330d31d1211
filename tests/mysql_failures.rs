//! MySQL failures through the real `keyhole` binary: a server that cannot be
//! trusted (another CA, another name), one without TLS, byte-level peers that
//! are not honest MySQL servers, malformed and silent clients, the connection
//! limit, and a server restart under an open session.
//!
//! A refusal is checked as a person and as a program meet it: the ERR packet
//! a raw socket reads (with its sequence id), `mysql_async::Error::Server`,
//! and the line the `mariadb` CLI prints, which is not always the ERR as
//! sent: its library vouches only for errors it can trust (see [`cli_line`]).
//!
//! keyhole reads the server's greeting before it greets the client, so
//! whatever goes wrong up to and including the greeting reaches the client
//! as its first packet (sequence id 0); TLS to the server comes after the
//! client's response (sequence id 1), so a TLS failure arrives as an ERR
//! with sequence id 2.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use support::certs::TestPki;
use support::clients;
use support::keyhole::Keyhole;
use support::mariadb::{
    self, packet, read_packet, response_header, MariaDb, MariaDbOptions, CLIENT_SSL, DATABASE,
    NATIVE_PASS, NATIVE_USER,
};
use support::process::{describe_output, KillAfter};

/// ER_CON_COUNT_ERROR.
const TOO_MANY_CONNECTIONS: u16 = 1040;
/// ER_HANDSHAKE_ERROR: what keyhole answers a client that breaks the protocol.
const BAD_HANDSHAKE: u16 = 1043;
/// ER_NET_PACKET_TOO_LARGE: a handshake packet over keyhole's cap.
const PACKET_TOO_LARGE: u16 = 1153;
/// ER_NET_PACKETS_OUT_OF_ORDER: a client packet with the wrong sequence id.
const OUT_OF_ORDER: u16 = 1156;
/// CR_CONN_HOST_ERROR: the server could not be reached.
const CANNOT_CONNECT: u16 = 1429;
/// CR_SSL_CONNECTION_ERROR: TLS to the server failed or was refused.
const TLS_ERROR: u16 = 3159;
/// ER_NET_READ_ERROR: the server went away or stalled during the login.
const SERVER_LOST: u16 = 1158;
/// The SQLSTATE of keyhole's connection-level errors.
const COMMUNICATION_ERROR: &str = "08S01";

/// Capability flags for hand-made packets.
const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_PROTOCOL_41: u32 = 1 << 9;
const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
/// What a 4.1 client without TLS announces in the hand-made responses.
const CLIENT_41: u32 =
    CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH;
/// keyhole's cap on one packet during the handshake.
const HANDSHAKE_CAP: usize = 256 * 1024;

/// The user, whether the session uses TLS at the server (`1`) and the
/// server's port: `native_user@%\t1\t<port>`.
const WHO_TLS_PORT: &str = "select current_user(), variable_value <> '', @@port \
     from information_schema.session_status where variable_name = 'Ssl_cipher'";

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `sql` as native_user with the `mariadb` CLI's defaults through keyhole's
/// `port`; its trimmed output.
fn query(port: u16, sql: &str) -> String {
    let out = mariadb::mariadb(port, NATIVE_USER, Some(NATIVE_PASS), sql);
    clients::expect_success(&out, &format!("mariadb through keyhole port {port}"))
}

/// What `server` answers to [`WHO_TLS_PORT`] for native_user over TLS.
fn who_tls_port(server: &MariaDb) -> String {
    format!("{NATIVE_USER}@%\t1\t{}", server.port())
}

/// The line the `mariadb` CLI (default settings) prints when a login through
/// keyhole's `port` is refused; it must fail and print nothing else.
fn cli_refusal(port: u16) -> String {
    cli_refusal_with(port, &[])
}

/// [`cli_refusal`] with `extra` client options.
fn cli_refusal_with(port: u16, extra: &[&str]) -> String {
    let port_arg = port.to_string();
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-P",
        &port_arg,
        "-u",
        NATIVE_USER,
        "-D",
        DATABASE,
    ];
    args.extend_from_slice(extra);
    args.extend(["-e", "select 1"]);
    let out = mariadb::mariadb_with_args(&args, Some(NATIVE_PASS));
    assert!(
        !out.status.success(),
        "mariadb {extra:?} through keyhole port {port} was expected to fail:\n{}",
        describe_output(&out)
    );
    assert_eq!(clients::stdout(&out), "", "no result before the refusal");
    clients::stderr(&out).trim_end().to_owned()
}

/// Whether MariaDB Connector/C (the `mariadb` CLI's library) refuses `code`
/// from a server: codes of its own client-side errors (CR_*, CER_*) can only
/// be forged, so an ERR packet carrying one is treated as malformed. The
/// ranges were found by feeding the 10.11 client ERR packets with each code.
fn cli_rejects_code(code: u16) -> bool {
    (2001..=2061).contains(&code) || (5001..=5026).contains(&code)
}

/// What the `mariadb` CLI, with its default settings, prints for `err`:
/// - a code [`cli_rejects_code`] refuses: `ERROR 2027 (HY000): Received
///   malformed packet`, and keyhole's message is lost;
/// - an ERR instead of the greeting (sequence id 0) comes before the TLS
///   the client asks for by default, so the client does not vouch for it:
///   it shows the code and message inside its own error 2002;
/// - otherwise the ERR as it is.
fn cli_line(err: &ErrPacket) -> String {
    if cli_rejects_code(err.code) {
        "ERROR 2027 (HY000): Received malformed packet".to_owned()
    } else if err.seq == 0 {
        format!(
            "ERROR 2002 (HY000): Received error packet before completion of TLS handshake. \
             The authenticity of the following error cannot be verified: {} - {}",
            err.code, err.message
        )
    } else {
        format!("ERROR {} ({}): {}", err.code, err.state, err.message)
    }
}

/// A mysql_async session through keyhole's `port`.
fn driver_connect(rt: &Runtime, port: u16) -> Result<mysql_async::Conn, mysql_async::Error> {
    // A guard against a hang, not a timing assertion.
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(120),
            mysql_async::Conn::new(mariadb::native_driver_opts(port)),
        )
        .await
    })
    .unwrap_or_else(|_| panic!("mysql_async through keyhole port {port} hung"))
}

/// The ERR packet mysql_async reports when keyhole's `port` turns it away.
fn driver_refusal(rt: &Runtime, port: u16) -> mysql_async::ServerError {
    match driver_connect(rt, port) {
        Ok(conn) => {
            let _ = rt.block_on(conn.disconnect());
            panic!("mysql_async through keyhole port {port} connected")
        }
        Err(mysql_async::Error::Server(err)) => err,
        Err(other) => panic!("expected an ERR packet through keyhole port {port}, got {other:?}"),
    }
}

/// Asserts that mysql_async saw exactly `code`, `state` and `message`.
fn assert_server_error(err: &mysql_async::ServerError, code: u16, state: &str, message: &str) {
    assert_eq!(
        (err.code, err.state.as_str(), err.message.as_str()),
        (code, state, message),
        "the ERR packet as mysql_async reports it"
    );
}

/// One ERR packet as a raw socket reads it; `state` is empty in the
/// protocol 4.0 form (no SQLSTATE), which a client without
/// CLIENT_PROTOCOL_41 gets.
#[derive(Debug, PartialEq, Eq)]
struct ErrPacket {
    seq: u8,
    code: u16,
    state: String,
    message: String,
}

impl ErrPacket {
    fn new(seq: u8, code: u16, state: &str, message: &str) -> ErrPacket {
        ErrPacket {
            seq,
            code,
            state: state.to_owned(),
            message: message.to_owned(),
        }
    }
}

fn connect_raw(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to keyhole");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    stream
}

/// Reads one packet, which must be an ERR, and then the end of the
/// connection: nothing may follow the ERR.
fn read_err(stream: &mut TcpStream) -> ErrPacket {
    let (seq, payload) = read_packet(stream);
    assert!(
        payload.len() >= 3 && payload[0] == 0xff,
        "expected an ERR packet, got {:?}",
        String::from_utf8_lossy(&payload)
    );
    let with_state = payload.len() >= 9 && payload[3] == b'#';
    let mut rest = Vec::new();
    // A reset instead of a FIN is fine; more bytes are not.
    let _ = stream.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "keyhole sent more after its ERR packet: {rest:02x?}"
    );
    let (state, message) = if with_state {
        (&payload[4..9], &payload[9..])
    } else {
        (&[][..], &payload[3..])
    };
    ErrPacket {
        seq,
        code: u16::from_le_bytes([payload[1], payload[2]]),
        state: String::from_utf8_lossy(state).into_owned(),
        message: String::from_utf8_lossy(message).into_owned(),
    }
}

/// Connects to keyhole's `port` and reads its greeting (sequence id 0),
/// which must not offer TLS: keyhole has no local certificate here.
fn greeted(port: u16) -> TcpStream {
    let mut stream = connect_raw(port);
    let (seq, payload) = read_packet(&mut stream);
    assert_eq!(seq, 0, "the greeting's sequence id");
    let greeting = mariadb::parse_greeting(&payload).expect("keyhole relays a greeting");
    assert_eq!(
        greeting.capabilities & CLIENT_SSL,
        0,
        "keyhole without --listen-cert offers no TLS: {greeting:?}"
    );
    stream
}

/// A complete HandshakeResponse41 for `user` with a made-up 20-byte
/// mysql_native_password answer (no test here gets as far as checking it).
fn handshake_response(capabilities: u32, user: &str) -> Vec<u8> {
    let mut p = response_header(capabilities);
    p.extend_from_slice(user.as_bytes());
    p.push(0);
    p.push(20);
    p.extend_from_slice(&[0x5a; 20]);
    p.extend_from_slice(b"mysql_native_password\0");
    p
}

/// A HandshakeV10 payload as a MySQL 5.7 server sends it, with `protocol` as
/// the version byte and `capabilities`.
fn greeting_payload(protocol: u8, capabilities: u32) -> Vec<u8> {
    let [c0, c1, c2, c3] = capabilities.to_le_bytes();
    let mut p = vec![protocol];
    p.extend_from_slice(b"5.7.44-peer\0");
    p.extend_from_slice(&7u32.to_le_bytes()); // connection id
    p.extend_from_slice(b"abcdefgh"); // auth data, part 1
    p.push(0);
    p.extend_from_slice(&[c0, c1]);
    p.push(45); // character set
    p.extend_from_slice(&2u16.to_le_bytes()); // status: autocommit
    p.extend_from_slice(&[c2, c3]);
    p.push(21); // auth data length
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(b"ijklmnopqrst\0"); // auth data, part 2
    p.extend_from_slice(b"mysql_native_password\0");
    p
}

/// The ERR packet (protocol 4.0 form: no client capabilities are known yet)
/// a server sends instead of its greeting, with its own text.
fn err_greeting(code: u16, text: &str) -> Vec<u8> {
    let mut p = vec![0xff];
    p.extend_from_slice(&code.to_le_bytes());
    p.extend_from_slice(text.as_bytes());
    p
}

/// Text the ERR-greeting peer sends; keyhole must never show it.
const PEER_TEXT: &str = "Host '127.0.0.1' is blocked; visit evil.example to unblock it";

/// What the upstream peers say when keyhole connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// An ERR packet (1129, host blocked) instead of a greeting.
    ErrGreeting,
    /// A greeting with protocol version 9.
    OldProtocol,
    /// An HTTP server's answer: not MySQL framing at all.
    Http,
    /// A valid greeting offering TLS, and more bytes in the same write.
    DataAfterGreeting,
    /// A greeting whose server version carries a terminal escape sequence
    /// (a hyperlink to the attacker's page), as anything on the path before
    /// TLS could write it.
    ForgedVersion,
    /// Nothing; the connection stays open.
    Silent,
}

impl Peer {
    fn bytes(self) -> Vec<u8> {
        let tls_caps = CLIENT_41 | CLIENT_SSL;
        match self {
            Peer::ErrGreeting => packet(0, &err_greeting(1129, PEER_TEXT)),
            Peer::OldProtocol => packet(0, &greeting_payload(9, tls_caps)),
            Peer::Http => b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Peer::DataAfterGreeting => {
                let mut bytes = packet(0, &greeting_payload(10, tls_caps));
                // What a man in the middle would put there: a packet the
                // client would read as the server's OK.
                bytes.extend(packet(2, &[0, 0, 0, 2, 0, 0, 0]));
                bytes
            }
            Peer::ForgedVersion => {
                let real = greeting_payload(10, tls_caps);
                let at = 1 + b"5.7.44-peer".len();
                let mut forged = vec![10];
                forged.extend_from_slice(
                    b"5.7.44\x1b]8;;https://evil.example\x07upgrade\x1b]8;;\x07",
                );
                forged.extend_from_slice(&real[at..]);
                packet(0, &forged)
            }
            Peer::Silent => Vec::new(),
        }
    }
}

/// Listens on a fresh port on `rt`. Every connection gets `kind`'s bytes,
/// is read until keyhole hangs up, and is reported with every byte received.
fn spawn_peer(rt: &Runtime, kind: Peer, report: mpsc::UnboundedSender<(Peer, Vec<u8>)>) -> u16 {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind a peer on 127.0.0.1");
    let port = listener.local_addr().expect("the peer's address").port();
    rt.spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let bytes = kind.bytes();
                if !bytes.is_empty() {
                    let _ = socket.write_all(&bytes).await;
                }
                let mut received = Vec::new();
                // Until keyhole closes (a reset is fine).
                let _ = socket.read_to_end(&mut received).await;
                let _ = report.send((kind, received));
            });
        }
    });
    port
}

/// Waits until the peers have reported `count` connections of `kind`, each of
/// which must have received nothing at all (no SSLRequest, no response, no
/// user name); reports of other kinds must be empty too.
fn expect_peer_saw_nothing(
    rt: &Runtime,
    reports: &mut mpsc::UnboundedReceiver<(Peer, Vec<u8>)>,
    kind: Peer,
    count: usize,
) {
    let mut seen = 0;
    while seen < count {
        let next = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), reports.recv()).await
        });
        let (from, received) = next
            .expect("a peer reports each connection once keyhole hangs up")
            .expect("the peers are still running");
        assert!(
            received.is_empty(),
            "the {from:?} peer received {:?}",
            String::from_utf8_lossy(&received)
        );
        if from == kind {
            seen += 1;
        }
    }
}

#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let db = MariaDb::shared();
    let stranger = TestPki::generate(&["localhost"]);
    let target = db.keyhole_target();
    let keyhole = Keyhole::start(&["--ca-file", path_arg(&stranger.ca), &target]);
    let port = keyhole.port();
    let rt = support::runtime();
    let message = "upstream certificate for localhost is not signed by a trusted CA \
                   (check --ca-file / ca-file=)";
    // TLS to the server starts only once the client has answered the
    // greeting, so the refusal answers the response (sequence id 1).
    let expected = ErrPacket::new(2, TLS_ERROR, COMMUNICATION_ERROR, message);

    let mut raw = greeted(port);
    raw.write_all(&packet(1, &handshake_response(CLIENT_41, NATIVE_USER)))
        .expect("send a handshake response");
    assert_eq!(read_err(&mut raw), expected);
    let err = driver_refusal(&rt, port);
    assert_server_error(&err, TLS_ERROR, COMMUNICATION_ERROR, message);
    assert_eq!(cli_refusal(port), cli_line(&expected));

    let log = keyhole.wait_for_log("outcome=\"upstream_tls\"", 3);
    assert!(
        log.contains(&format!("user=\"{NATIVE_USER}\"")),
        "the log names the user who was turned away:\n{log}"
    );
}

#[test]
fn the_server_name_is_verified_unless_tls_mode_is_verify_ca() {
    let db = MariaDb::shared();
    let target = format!("mysql://127.0.0.1:{}", db.port());
    let wrong = format!("{target}?server-name=wrong.example");
    let wrong_chain_only = format!("{target}?server-name=wrong.example&tls-mode=verify-ca");
    // The tunnel case: dial one address, verify another name the certificate carries.
    let tunnel = format!("{target}?server-name=db.internal");
    let keyhole = Keyhole::start(&[
        "--ca-file",
        path_arg(&db.pki().ca),
        &wrong,
        &wrong_chain_only,
        &tunnel,
    ]);
    let base = keyhole.port();
    let rt = support::runtime();
    let message = "upstream certificate not valid for wrong.example \
                   (set server-name= to the name the certificate carries)";
    let expected = ErrPacket::new(2, TLS_ERROR, COMMUNICATION_ERROR, message);

    let mut raw = greeted(base);
    raw.write_all(&packet(1, &handshake_response(CLIENT_41, NATIVE_USER)))
        .expect("send a handshake response");
    assert_eq!(read_err(&mut raw), expected);
    let err = driver_refusal(&rt, base);
    assert_server_error(&err, TLS_ERROR, COMMUNICATION_ERROR, message);
    assert_eq!(cli_refusal(base), cli_line(&expected));

    assert_eq!(
        query(base + 1, WHO_TLS_PORT),
        who_tls_port(db),
        "verify-ca with a wrong name"
    );
    assert_eq!(
        query(base + 2, WHO_TLS_PORT),
        who_tls_port(db),
        "server-name=db.internal"
    );
}

/// A global status counter of `server`.
fn status(server: &MariaDb, name: &str) -> u64 {
    let row = server.admin_sql(&format!("show global status like '{name}'"));
    let (_, value) = row
        .split_once('\t')
        .unwrap_or_else(|| panic!("status {name}: {row:?}"));
    value
        .parse()
        .unwrap_or_else(|e| panic!("status {name} = {value:?}: {e}"))
}

/// Logins of native_user in the server's general log (failed ones included:
/// MariaDB logs a `Connect` line for every handshake response it reads).
fn logins(server: &MariaDb) -> u64 {
    server
        .admin_sql(&format!(
            "select count(*) from mysql.general_log \
             where command_type = 'Connect' and argument like '{NATIVE_USER}@%'"
        ))
        .parse()
        .expect("a count")
}

#[test]
fn a_server_without_tls_is_refused_before_it_sees_a_response() {
    let db = MariaDb::start(MariaDbOptions {
        tls: false,
        extra_conf: vec!["general_log=1".into(), "log_output=TABLE".into()],
    });
    let keyhole = Keyhole::start(&[
        "--ca-file",
        path_arg(&db.pki().ca),
        &format!("mysql://127.0.0.1:{}", db.port()),
    ]);
    let port = keyhole.port();
    let rt = support::runtime();
    let message = format!(
        "upstream refused TLS: 127.0.0.1:{} does not accept encrypted connections, \
         and keyhole never falls back to plaintext",
        db.port()
    );
    // Instead of the greeting: the first packet the client reads.
    let expected = ErrPacket::new(0, TLS_ERROR, COMMUNICATION_ERROR, &message);
    let preauth_before = status(&db, "Aborted_connects_preauth");

    let mut raw = connect_raw(port);
    assert_eq!(read_err(&mut raw), expected);
    // mysql_async reads an ERR that comes before any greeting in the
    // protocol 4.0 form (no capabilities are agreed yet): the SQLSTATE
    // marker stays in the message and the state is its default, HY000.
    let err = driver_refusal(&rt, port);
    assert_server_error(
        &err,
        TLS_ERROR,
        "HY000",
        &format!("#{COMMUNICATION_ERROR}{message}"),
    );
    assert_eq!(cli_refusal(port), cli_line(&expected));

    // Each of the three clients cost the server one connection that keyhole
    // closed after the greeting, before any handshake response: MariaDB
    // counts those as aborted before authentication, once it has read the
    // close, which may come a little after the client's ERR.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&db, "Aborted_connects_preauth") < preauth_before + 3 {
        assert!(
            Instant::now() < deadline,
            "the server never counted keyhole's three pre-authentication aborts"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        status(&db, "Aborted_connects_preauth"),
        preauth_before + 3,
        "exactly keyhole's three connections"
    );
    assert_eq!(logins(&db), 0, "a handshake response reached the server");

    // The control: this server lets native_user in over plaintext and logs
    // the login, so the zero above means something.
    let direct = mariadb::mariadb_with_args(
        &[
            "-h",
            "127.0.0.1",
            "-P",
            &db.port().to_string(),
            "-u",
            NATIVE_USER,
            "--skip-ssl",
            "-e",
            "select current_user()",
        ],
        Some(NATIVE_PASS),
    );
    assert_eq!(
        clients::expect_success(&direct, "a plaintext login straight to the server"),
        format!("{NATIVE_USER}@%")
    );
    assert_eq!(logins(&db), 1, "the general log records a plaintext login");
    assert_eq!(
        status(&db, "Aborted_connects_preauth"),
        preauth_before + 3,
        "a completed login is no abort"
    );
    keyhole.wait_for_log("outcome=\"upstream_tls_refused\"", 3);
}

#[test]
fn misbehaving_peers_are_refused_and_keyhole_keeps_serving() {
    let db = MariaDb::shared();
    let rt = support::runtime();
    let (report, mut reports) = mpsc::unbounded_channel();
    let kinds = [
        Peer::ErrGreeting,
        Peer::OldProtocol,
        Peer::Http,
        Peer::DataAfterGreeting,
        Peer::ForgedVersion,
        Peer::Silent,
    ];
    let peer_ports: Vec<u16> = kinds
        .iter()
        .map(|&kind| spawn_peer(&rt, kind, report.clone()))
        .collect();
    // Free a moment ago and never handed out again in this process: nothing listens.
    let closed_port = support::free_port();

    let mut args: Vec<String> = vec![
        "--connect-timeout".into(),
        "1s".into(),
        "--ca-file".into(),
        path_arg(&db.pki().ca).into(),
    ];
    for port in peer_ports.iter().chain([&closed_port]) {
        args.push(format!("mysql://127.0.0.1:{port}"));
    }
    args.push(db.keyhole_target());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let keyhole = Keyhole::start(&args);
    let base = keyhole.port();
    let good = base + 7;
    assert_eq!(
        query(good, WHO_TLS_PORT),
        who_tls_port(db),
        "the real server, before any peer"
    );

    let http_len = usize::from(b'H') | usize::from(b'T') << 8 | usize::from(b'T') << 16;
    assert!(http_len > HANDSHAKE_CAP);
    let refused =
        |seq, code, message: String| ErrPacket::new(seq, code, COMMUNICATION_ERROR, &message);
    // Sequence id 0: instead of the greeting. Sequence id 2: the answer to
    // the client's handshake response (sequence id 1).
    let expected = [
        refused(
            0,
            CANNOT_CONNECT,
            format!(
                "127.0.0.1:{} refused the connection before TLS with MySQL error 1129 \
                 (text sent before TLS is not shown)",
                peer_ports[0]
            ),
        ),
        refused(
            0,
            CANNOT_CONNECT,
            format!(
                "127.0.0.1:{} did not greet like a MySQL server: \
                 the server's greeting is protocol version 9, not 10",
                peer_ports[1]
            ),
        ),
        refused(
            0,
            CANNOT_CONNECT,
            format!(
                "127.0.0.1:{} did not greet like a MySQL server: \
                 a first packet of {http_len} bytes",
                peer_ports[2]
            ),
        ),
        refused(
            2,
            TLS_ERROR,
            format!(
                "127.0.0.1:{} sent data before the TLS handshake (possible man-in-the-middle); \
                 connection refused",
                peer_ports[3]
            ),
        ),
        refused(
            0,
            CANNOT_CONNECT,
            format!(
                "127.0.0.1:{} did not greet like a MySQL server: the server version in its \
                 greeting is not a version number (not shown: the greeting comes before TLS)",
                peer_ports[4]
            ),
        ),
        refused(
            0,
            CANNOT_CONNECT,
            format!("127.0.0.1:{} sent no greeting within 1s", peer_ports[5]),
        ),
        refused(
            0,
            CANNOT_CONNECT,
            format!(
                "connection to 127.0.0.1:{closed_port} refused \
                 (is the database running and reachable?)"
            ),
        ),
    ];
    for (index, expected) in expected.iter().enumerate() {
        let port = base + u16::try_from(index).expect("a small index");
        let mut raw = if expected.seq == 2 {
            let mut raw = greeted(port);
            raw.write_all(&packet(1, &handshake_response(CLIENT_41, NATIVE_USER)))
                .expect("send a handshake response");
            raw
        } else {
            connect_raw(port)
        };
        assert_eq!(read_err(&mut raw), *expected, "keyhole port {port}");

        let printed = cli_refusal(port);
        assert_eq!(printed, cli_line(expected), "keyhole port {port}");
        assert!(
            !printed.contains("evil.example"),
            "the peer's own text reached the client: {printed}"
        );

        // The raw client and the CLI each cost the peer one connection, on
        // which it must have received nothing: keyhole sends its SSLRequest
        // only to a server that greeted properly and said nothing more.
        if let Some(&kind) = kinds.get(index) {
            expect_peer_saw_nothing(&rt, &mut reports, kind, 2);
        }

        assert_eq!(
            query(good, WHO_TLS_PORT),
            who_tls_port(db),
            "the real server, after {}",
            expected.message
        );
    }

    while let Ok((from, received)) = reports.try_recv() {
        assert!(
            received.is_empty(),
            "the {from:?} peer received {received:02x?}"
        );
    }
    for (label, count) in [
        ("upstream_refused", 2),
        ("upstream_protocol", 8),
        ("upstream_timeout", 2),
        ("upstream_connect", 2),
    ] {
        keyhole.wait_for_log(&format!("outcome=\"{label}\""), count);
    }
    let log = keyhole.logs();
    assert!(
        !log.contains("evil.example"),
        "the peer's text was logged:\n{log}"
    );
}

/// The MySQL client error codes keyhole uses for upstream failures are ones
/// MariaDB Connector/C refuses to take from a server (see [`cli_line`]): the
/// `mariadb` CLI then says only "Received malformed packet" and the user
/// never learns why. This asserts what the CLI should show: keyhole's text.
#[test]
fn the_mariadb_cli_shows_why_the_upstream_was_refused() {
    let db = MariaDb::shared();
    let stranger = TestPki::generate(&["localhost"]);
    let closed_port = support::free_port();
    let keyhole = Keyhole::start(&[
        "--ca-file",
        path_arg(&stranger.ca),
        &db.keyhole_target(),
        &format!("mysql://127.0.0.1:{closed_port}"),
    ]);
    let base = keyhole.port();
    for (port, message) in [
        (
            base,
            "upstream certificate for localhost is not signed by a trusted CA \
             (check --ca-file / ca-file=)"
                .to_owned(),
        ),
        (
            base + 1,
            format!(
                "connection to 127.0.0.1:{closed_port} refused \
                 (is the database running and reachable?)"
            ),
        ),
    ] {
        let printed = cli_refusal(port);
        assert!(
            printed.contains(&message),
            "the mariadb CLI should show {message:?}, but printed: {printed}"
        );
    }
}

#[test]
fn malformed_clients_get_an_err_packet_and_keyhole_keeps_serving() {
    let db = MariaDb::shared();
    let keyhole = Keyhole::start(&["--ca-file", path_arg(&db.pki().ca), &db.keyhole_target()]);
    let port = keyhole.port();
    let bad = |seq, message: &str| ErrPacket::new(seq, BAD_HANDSHAKE, COMMUNICATION_ERROR, message);
    // To a client without CLIENT_PROTOCOL_41, as the server answers it:
    // the 4.0 form, without SQLSTATE.
    let bad_40 = |seq, message: &str| ErrPacket::new(seq, BAD_HANDSHAKE, "", message);
    let refused = |bytes: &[u8]| {
        let mut raw = greeted(port);
        raw.write_all(bytes).expect("send to keyhole");
        read_err(&mut raw)
    };

    // HTTP where the handshake response should be: its fourth byte, read
    // as a sequence id, is a space. As the server does, keyhole refuses it
    // as out of order (before it looks at the length, far over the cap),
    // with the id the client should have sent.
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(
        refused(http),
        ErrPacket::new(
            1,
            OUT_OF_ORDER,
            COMMUNICATION_ERROR,
            "invalid packet from client: packet out of order: sequence id 32, expected 1"
        )
    );

    // The same text framed as a packet: "GET " as capability flags lacks
    // CLIENT_PROTOCOL_41.
    let caps = u32::from_le_bytes([b'G', b'E', b'T', b' ']);
    assert_eq!(caps & CLIENT_PROTOCOL_41, 0);
    let too_old = "invalid handshake response: the client does not speak protocol 4.1 (too old)";
    assert_eq!(refused(&packet(1, http)), bad_40(2, too_old));

    // A protocol 4.0 response: two bytes of capabilities (no
    // CLIENT_PROTOCOL_41), three of max packet size, user, scramble.
    let mut old = (CLIENT_LONG_PASSWORD | CLIENT_SECURE_CONNECTION).to_le_bytes()[..2].to_vec();
    old.extend_from_slice(&[0, 0, 0]);
    old.extend_from_slice(NATIVE_USER.as_bytes());
    old.extend_from_slice(b"\0abcdefgh\0");
    assert_eq!(refused(&packet(1, &old)), bad_40(2, too_old));

    // Truncated responses.
    let whole = handshake_response(CLIENT_41, NATIVE_USER);
    for (cut, part) in [
        (2, "no capability flags"),
        (20, "shorter than 32 bytes"),
        (32 + 3, "user name"),
        (32 + NATIVE_USER.len() + 1 + 10, "auth response"),
    ] {
        assert_eq!(
            refused(&packet(1, &whole[..cut])),
            bad(
                2,
                &format!(
                    "invalid handshake response: the handshake response is truncated \
                     or malformed ({part})"
                )
            ),
            "a response cut after {cut} bytes"
        );
    }

    // A header announcing the largest packet there is (16 MiB - 1): over
    // keyhole's cap, refused with what a server answers a packet over its
    // max_allowed_packet (the sequence id is checked in
    // `an_oversized_packet_is_answered_in_sequence`).
    let err = refused(&[0xff, 0xff, 0xff, 1]);
    assert_eq!(
        (err.code, err.state.as_str(), err.message.as_str()),
        (
            PACKET_TOO_LARGE,
            COMMUNICATION_ERROR,
            oversized_message().as_str()
        )
    );

    // An SSLRequest although the greeting offered no TLS.
    assert_eq!(
        refused(&packet(1, &response_header(CLIENT_41 | CLIENT_SSL))),
        bad(
            2,
            "client asked for TLS, but keyhole has no --listen-cert: \
             connect without TLS to keyhole"
        )
    );

    keyhole.wait_for_log("outcome=\"client_protocol\"", 8);
    keyhole.wait_for_log("outcome=\"client_tls\"", 1);
    assert_eq!(
        query(port, WHO_TLS_PORT),
        who_tls_port(db),
        "a valid login after the garbage"
    );
}

/// What keyhole answers a packet header announcing 16 MiB - 1 bytes.
fn oversized_message() -> String {
    format!(
        "invalid packet from client: packet of {} bytes is larger than \
         the {HANDSHAKE_CAP} allowed during the handshake",
        0xff_ffff
    )
}

#[test]
fn an_oversized_packet_is_answered_in_sequence() {
    let db = MariaDb::shared();
    let keyhole = Keyhole::start(&["--ca-file", path_arg(&db.pki().ca), &db.keyhole_target()]);
    let mut raw = greeted(keyhole.port());
    raw.write_all(&[0xff, 0xff, 0xff, 1])
        .expect("send a packet header");
    assert_eq!(
        read_err(&mut raw),
        ErrPacket::new(
            2,
            PACKET_TOO_LARGE,
            COMMUNICATION_ERROR,
            &oversized_message()
        )
    );
}

#[test]
fn a_silent_client_is_timed_out_with_an_err_packet() {
    let db = MariaDb::shared();
    let keyhole = Keyhole::start(&[
        "--startup-timeout",
        "1s",
        "--ca-file",
        path_arg(&db.pki().ca),
        &db.keyhole_target(),
    ]);
    let port = keyhole.port();
    // Right after the greeting (sequence id 0).
    let timed_out = ErrPacket::new(
        1,
        BAD_HANDSHAKE,
        COMMUNICATION_ERROR,
        "client sent no handshake response within 1s (--startup-timeout)",
    );

    let mut silent = greeted(port);
    assert_eq!(read_err(&mut silent), timed_out);

    // Part of a response, then nothing: the same.
    let mut slow = greeted(port);
    slow.write_all(&packet(1, &handshake_response(CLIENT_41, NATIVE_USER))[..10])
        .expect("send part of a response");
    assert_eq!(read_err(&mut slow), timed_out);

    keyhole.wait_for_log("outcome=\"startup_timeout\"", 2);
    assert_eq!(
        query(port, WHO_TLS_PORT),
        who_tls_port(db),
        "a prompt client still gets in"
    );
}

/// A MySQL server for `localhost` under `pki` that greets offering TLS,
/// reads keyhole's SSLRequest, completes TLS, reads the HandshakeResponse
/// and then does what `after_response` does with the session. Returns its
/// port.
fn fake_tls_mysql<F, Fut>(rt: &Runtime, pki: &TestPki, after_response: F) -> u16
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    async fn read_packet<S: AsyncReadExt + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await.ok()?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.ok()?;
        Some(payload)
    }
    let acceptor = pki.tls_acceptor();
    let after_response = std::sync::Arc::new(after_response);
    support::serve_each(rt, move |mut socket| {
        let acceptor = acceptor.clone();
        let after_response = after_response.clone();
        async move {
            let greeting = packet(0, &greeting_payload(10, CLIENT_41 | CLIENT_SSL));
            if socket.write_all(&greeting).await.is_err()
                || read_packet(&mut socket).await.is_none()
            {
                return;
            }
            let Ok(mut tls) = acceptor.accept(socket).await else {
                return;
            };
            if read_packet(&mut tls).await.is_some() {
                after_response(tls).await;
            }
        }
    })
}

/// keyhole with `--startup-timeout TIMEOUT` in front of a fake server that
/// does `after_response`: a raw client sends its response, answers every
/// packet keyhole passes on (any bytes will do for the fake), and must get
/// keyhole's ERR saying the login did not finish in time.
fn refused_at_the_login_deadline<F, Fut>(timeout: &str, after_response: F)
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = support::runtime();
    let pki = TestPki::generate(&["localhost"]);
    let port = fake_tls_mysql(&rt, &pki, after_response);
    let target = format!("mysql://127.0.0.1:{port}?server-name=localhost");
    let keyhole = Keyhole::start(&[
        "--ca-file",
        path_arg(&pki.ca),
        "--startup-timeout",
        timeout,
        &target,
    ]);
    let mut client = greeted(keyhole.port());
    client
        .write_all(&packet(1, &handshake_response(CLIENT_41, NATIVE_USER)))
        .expect("send the handshake response");
    let mut passed_on = 0;
    let (seq, payload) = loop {
        let (seq, payload) = read_packet(&mut client);
        if payload.first() == Some(&0xff) {
            break (seq, payload);
        }
        // An AuthMoreData from the fake: answer it as a client would.
        passed_on += 1;
        // At one packet in 100 ms: a minute, far past any deadline here.
        assert!(passed_on < 600, "keyhole never cut the login");
        client
            .write_all(&packet(seq.wrapping_add(1), b"more"))
            .expect("answer the server's packet");
    };
    assert!(
        payload.len() >= 9 && payload[3] == b'#',
        "expected an ERR packet with a SQLSTATE, got {:?}",
        String::from_utf8_lossy(&payload)
    );
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "keyhole sent more after its ERR: {rest:02x?}"
    );
    let err = ErrPacket {
        seq,
        code: u16::from_le_bytes([payload[1], payload[2]]),
        state: String::from_utf8_lossy(&payload[4..9]).into_owned(),
        message: String::from_utf8_lossy(&payload[9..]).into_owned(),
    };
    assert_eq!(
        err,
        ErrPacket::new(
            seq,
            SERVER_LOST,
            COMMUNICATION_ERROR,
            &format!(
                "the server did not finish authentication within {timeout} (--startup-timeout)"
            )
        ),
        "after {passed_on} packets passed on"
    );
    keyhole.wait_for_log("outcome=\"upstream_timeout\"", 1);
}

/// A server that completes TLS, reads the client's response and says
/// nothing: the client is told so at `--startup-timeout`.
#[test]
fn a_server_that_goes_quiet_after_tls_is_reported() {
    refused_at_the_login_deadline("1s", |mut tls| async move {
        let mut sink = Vec::new();
        let _ = tls.read_to_end(&mut sink).await;
    });
}

/// A server (or anything before TLS is verified end to end) that keeps the
/// authentication going with an AuthMoreData every 100 ms, each well within
/// the step timeout, answered by the client each time: the login as a
/// whole still ends at `--startup-timeout`.
#[test]
fn a_login_that_never_ends_is_cut_at_the_deadline() {
    refused_at_the_login_deadline("2s", |mut tls| async move {
        // The client's answers are read on the side; the next packet does
        // not wait for them.
        let (mut reader, mut writer) = tokio::io::split(&mut tls);
        let drain = async {
            let mut sink = [0u8; 256];
            while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let trickle = async {
            for seq in (3u8..=255).cycle().step_by(2) {
                let more = packet(seq, &[0x01, 0x04]);
                if writer.write_all(&more).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::join!(drain, trickle);
    });
}

#[test]
fn clients_over_the_limit_get_1040_and_the_next_one_fits_again() {
    let db = MariaDb::shared();
    let keyhole = Keyhole::start(&[
        "--max-connections",
        "1",
        "--ca-file",
        path_arg(&db.pki().ca),
        &db.keyhole_target(),
    ]);
    let port = keyhole.port();
    let rt = support::runtime();
    let message = "too many connections: keyhole allows 1 at once (--max-connections)";
    // Instead of the greeting, as a server over its own limit does.
    let expected = ErrPacket::new(0, TOO_MANY_CONNECTIONS, "08004", message);

    let mut held = driver_connect(&rt, port).expect("the first session fits");
    let row: Option<(String, u16)> = rt
        .block_on(held.query_first("select current_user(), @@port"))
        .expect("a query on the first session");
    assert_eq!(row, Some((format!("{NATIVE_USER}@%"), db.port())));

    let mut raw = connect_raw(port);
    assert_eq!(read_err(&mut raw), expected);
    assert_eq!(cli_refusal(port), cli_line(&expected));
    // A client that does not ask for TLS takes the ERR as it is.
    assert_eq!(
        cli_refusal_with(port, &["--skip-ssl"]),
        format!("ERROR {TOO_MANY_CONNECTIONS} (08004): {message}")
    );
    keyhole.wait_for_log("outcome=\"too_many_connections\"", 3);

    // The held session is untouched by the refusals.
    let one: Option<u8> = rt
        .block_on(held.query_first("select 1"))
        .expect("the first session still works");
    assert_eq!(one, Some(1));
    rt.block_on(held.disconnect())
        .expect("close the first session");

    // The slot is free once keyhole has seen the first session end.
    keyhole.wait_for_log("outcome=\"client_closed\"", 1);
    assert_eq!(
        query(port, WHO_TLS_PORT),
        who_tls_port(db),
        "the next client fits again"
    );
}

/// A `mariadb` CLI that reads statements from a pipe; killed on drop.
struct CliSession {
    child: Child,
}

impl CliSession {
    /// The CLI (default settings) as native_user through keyhole's `port`.
    fn start(port: u16) -> CliSession {
        let mut cmd = mariadb::mariadb_command(Some(NATIVE_PASS));
        cmd.args(mariadb::MARIADB_FLAGS)
            .args(["-h", "127.0.0.1", "-P", &port.to_string()])
            .args(["-u", NATIVE_USER, "-D", DATABASE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        CliSession {
            child: cmd.spawn().expect("start the mariadb CLI"),
        }
    }

    /// Sends `sql`, closes its input and returns its exit status, stdout
    /// and stderr.
    fn finish(mut self, sql: &str) -> (bool, String, String) {
        let mut stdin = self.child.stdin.take().expect("the CLI's stdin");
        stdin
            .write_all(sql.as_bytes())
            .expect("send SQL to the CLI");
        drop(stdin);
        let pid = self.child.id();
        let timer = KillAfter::arm(pid, Duration::from_secs(120));
        let mut out = String::new();
        let mut err = String::new();
        self.child
            .stdout
            .take()
            .expect("the CLI's stdout")
            .read_to_string(&mut out)
            .expect("read the CLI's stdout");
        self.child
            .stderr
            .take()
            .expect("the CLI's stderr")
            .read_to_string(&mut err)
            .expect("read the CLI's stderr");
        let status = self.child.wait().expect("wait for the CLI");
        assert!(!timer.disarm(), "the CLI hung and was killed");
        (status.success(), out, err)
    }
}

impl Drop for CliSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_server_restart_ends_the_session_and_keyhole_serves_the_next() {
    let db = MariaDb::start(MariaDbOptions::default());
    let keyhole = Keyhole::start(&["--ca-file", path_arg(&db.pki().ca), &db.keyhole_target()]);
    let port = keyhole.port();
    let rt = support::runtime();

    let mut old = driver_connect(&rt, port).expect("a session through keyhole");
    let id: Option<u64> = rt
        .block_on(old.query_first("select connection_id()"))
        .expect("a query before the restart");
    let id = id.expect("a connection id");
    let cli = CliSession::start(port);
    // Both sessions are the server's: the driver's, and the CLI's once it
    // has logged in.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let users = db.admin_sql(&format!(
            "select group_concat(id order by id) from information_schema.processlist \
             where user = '{NATIVE_USER}'"
        ));
        let ids: Vec<&str> = users.split(',').collect();
        if ids.len() == 2 {
            assert!(ids.contains(&id.to_string().as_str()), "{users}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI never logged in: {users}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    db.restart();

    let after: Result<Option<u64>, _> = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), old.query_first("select 1"))
            .await
            .expect("the old session's query hangs")
    });
    // The server closed the connection; keyhole passed that on, and the
    // driver's next read found the end of the stream.
    match after.expect_err("the old session cannot survive the server's restart") {
        mysql_async::Error::Io(mysql_async::IoError::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}")
        }
        other => panic!("expected a lost connection, got {other:?}"),
    }
    let (ok, out, err) = cli.finish("select 'after the restart';\n");
    assert!(
        !ok && out.is_empty(),
        "the CLI's old session went on: {out}"
    );
    assert!(
        err.trim_end()
            .ends_with("ERROR 2013 (HY000) at line 1: Lost connection to server during query"),
        "the CLI's old session after the restart:\n{err}"
    );

    // The server ended both sessions without TLS close_notify while their
    // clients were still in session: a truncation, as keyhole counts it.
    keyhole.wait_for_log("outcome=\"upstream_truncated\"", 2);
    assert_eq!(
        query(port, WHO_TLS_PORT),
        who_tls_port(&db),
        "a new session after the restart"
    );
}
