//! Until the server has a client's HandshakeResponse, keyhole stands in for
//! the MySQL/MariaDB server: it forwards the server's greeting and reads the
//! client's response itself. A client must not be able to tell the two apart
//! there, except where keyhole deliberately checks more (and then its
//! message says which check). This is a differential test: every row of
//! [`rows`] sends the same bytes (a) straight to the lab's MariaDB
//! ([`MariaDb::shared`], `require_secure_transport=ON`) and (b) to keyhole in
//! front of it, and compares what comes back:
//!
//! - "closed without a byte", or an ERR packet's sequence id, error code and
//!   SQLSTATE (or its absence: the protocol 4.0 form); the text is the
//!   server's or keyhole's own and may differ;
//! - every other packet byte for byte, except an AuthSwitchRequest's
//!   scramble, which is each server connection's own.
//!
//! Each row says which server behaviour keyhole mirrors, or which deliberate
//! difference it keeps and why; a "differs" row asserts both answers.
//!
//! The greetings differ by nature (keyhole forwards its own server
//! connection's: another connection id and scramble) and are compared
//! without those two fields, byte for byte otherwise: keyhole with
//! `--listen-cert` offers `CLIENT_SSL` as the server does; without one it
//! offers the same capabilities minus `CLIENT_SSL`.
//!
//! A plain TCP login to this server is refused only after the response (on
//! 10.11: 1045 access denied, see `support/mariadb.rs`), so rows that log in
//! do TLS on both legs, but for the one row that shows that difference; the
//! other rows are refused before that check and say so.
//!
//! After a failed TLS handshake MariaDB sends a TLS alert and then its
//! ERR in plain text; keyhole (rustls) sends an alert only where TLS defines
//! one (none for a client that closes), so leading TLS alert records are
//! skipped before the packets are compared.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use support::certs::TestPki;
use support::keyhole::Keyhole;
use support::mariadb::{packet, response_header, MariaDb, CLIENT_SSL, NATIVE_PASS, NATIVE_USER};

const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_PROTOCOL_41: u32 = 1 << 9;
const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
/// Not in MariaDB 10.11's greeting.
const CLIENT_ZSTD_COMPRESSION: u32 = 1 << 26;
/// What the hand-made 4.1 responses announce.
const CLIENT_41: u32 =
    CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH;

/// ER_HANDSHAKE_ERROR, "Bad handshake".
const BAD_HANDSHAKE: u16 = 1043;
/// ER_NET_PACKET_TOO_LARGE.
const PACKET_TOO_LARGE: u16 = 1153;
/// ER_NET_PACKETS_OUT_OF_ORDER.
const OUT_OF_ORDER: u16 = 1156;
const COMMUNICATION_ERROR: Option<&str> = Some("08S01");
/// COM_QUIT as the first packet of a command (sequence id 0).
const COM_QUIT: [u8; 5] = [1, 0, 0, 0, 1];
/// ER_ACCESS_DENIED_ERROR, what MariaDB 10.11 answers a plain login under
/// require_secure_transport.
const ACCESS_DENIED: u16 = 1045;

/// A HandshakeResponse41 for native_user with `auth` as the answer and
/// `plugin` named.
fn response(capabilities: u32, auth: &[u8], plugin: &str) -> Vec<u8> {
    let mut p = response_header(capabilities);
    p.extend_from_slice(NATIVE_USER.as_bytes());
    p.push(0);
    p.push(u8::try_from(auth.len()).expect("a short answer"));
    p.extend_from_slice(auth);
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    p
}

/// The SSLRequest of a 4.1 client.
fn ssl_request(seq: u8) -> Vec<u8> {
    packet(seq, &response_header(CLIENT_41 | CLIENT_SSL))
}

/// What a client does, step by step, after reading the greeting.
#[derive(Debug, Clone)]
enum Step {
    /// Sends bytes (inside TLS once it is up).
    Send(Vec<u8>),
    /// The client's TLS handshake.
    Tls,
    /// Shuts down its sending side, and reads on.
    HalfClose,
    /// Logs in as native_user with the right mysql_native_password answer
    /// to the greeting's scramble: a response with sequence id `seq`,
    /// `capabilities` and `plugin` named.
    Login {
        seq: u8,
        capabilities: u32,
        plugin: &'static str,
    },
    /// Reads the server's AuthSwitchRequest to mysql_native_password and
    /// answers it with the password (sequence id `seq`).
    AnswerSwitch { seq: u8 },
    /// Reads the login's outcome; after an OK, quits (COM_QUIT).
    QuitIfLoggedIn,
}

/// What comes back, in a row's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The connection is closed without a byte.
    Closed,
    /// One ERR packet (after any TLS alert), then the end. `sqlstate` `None`:
    /// the protocol 4.0 form, without one.
    Err {
        seq: u8,
        code: u16,
        sqlstate: Option<&'static str>,
    },
    /// The login succeeded: an OK packet with sequence id `seq`, after an
    /// AuthSwitchRequest to mysql_native_password if `switched`; the client
    /// then quits and the connection ends.
    LoggedIn { seq: u8, switched: bool },
}

/// Why the two sides answer alike, or deliberately not.
#[derive(Debug, Clone, Copy)]
enum Why {
    Mirrors(&'static str),
    Differs(&'static str),
}

struct Row {
    name: &'static str,
    steps: Vec<Step>,
    direct: Answer,
    keyhole: Answer,
    why: Why,
}

fn mirrors(name: &'static str, steps: Vec<Step>, answer: Answer, why: &'static str) -> Row {
    Row {
        name,
        steps,
        direct: answer,
        keyhole: answer,
        why: Why::Mirrors(why),
    }
}

fn differs(
    name: &'static str,
    steps: Vec<Step>,
    direct: Answer,
    keyhole: Answer,
    why: &'static str,
) -> Row {
    Row {
        name,
        steps,
        direct,
        keyhole,
        why: Why::Differs(why),
    }
}

fn bad_handshake(seq: u8) -> Answer {
    Answer::Err {
        seq,
        code: BAD_HANDSHAKE,
        sqlstate: COMMUNICATION_ERROR,
    }
}

fn rows() -> Vec<Row> {
    use Step::{AnswerSwitch, HalfClose, Login, QuitIfLoggedIn, Send, Tls};
    let tls_login = |capabilities: u32, plugin: &'static str| {
        vec![
            Send(packet(1, &response_header(capabilities | CLIENT_SSL))),
            Tls,
            Login {
                seq: 2,
                capabilities: capabilities | CLIENT_SSL,
                plugin,
            },
        ]
    };
    let mut unknown_plugin = tls_login(CLIENT_41, "no_such_plugin");
    unknown_plugin.extend([AnswerSwitch { seq: 4 }, QuitIfLoggedIn]);
    let mut not_offered = tls_login(CLIENT_41 | CLIENT_ZSTD_COMPRESSION, "mysql_native_password");
    not_offered.push(QuitIfLoggedIn);
    // A protocol 4.0 response: two bytes of capabilities (no
    // CLIENT_PROTOCOL_41), three of max packet size, user, scramble.
    let mut old = (CLIENT_LONG_PASSWORD | CLIENT_SECURE_CONNECTION).to_le_bytes()[..2].to_vec();
    old.extend_from_slice(&[0, 0, 0]);
    old.extend_from_slice(NATIVE_USER.as_bytes());
    old.extend_from_slice(b"\0abcdefgh\0");
    let full = response(CLIENT_41, &[0x5a; 20], "mysql_native_password");

    vec![
        mirrors(
            "a response of 4 bytes",
            vec![Send(packet(1, &CLIENT_41.to_le_bytes()))],
            bad_handshake(2),
            "shorter than the 32-byte fixed part: 1043 in sequence, before the \
             transport check (plain TCP on both legs)",
        ),
        mirrors(
            "a response of 31 bytes",
            vec![Send(packet(1, &response_header(CLIENT_41)[..31]))],
            bad_handshake(2),
            "shorter than the 32-byte fixed part: 1043 in sequence (plain TCP)",
        ),
        mirrors(
            "a 4.0-style response (no CLIENT_PROTOCOL_41)",
            vec![Send(packet(1, &old))],
            Answer::Err {
                seq: 2,
                code: BAD_HANDSHAKE,
                sqlstate: None,
            },
            "a client without CLIENT_PROTOCOL_41 is refused with 1043 in the 4.0 \
             ERR form, without SQLSTATE, which is what such a client reads (plain TCP)",
        ),
        mirrors(
            "CLIENT_SSL in a full response, then no TLS (client closes)",
            vec![
                Send(packet(
                    1,
                    &response(CLIENT_41 | CLIENT_SSL, &[0x5a; 20], "mysql_native_password"),
                )),
                HalfClose,
            ],
            bad_handshake(2),
            "any first packet with CLIENT_SSL is an SSLRequest, whatever follows \
             its 32 bytes: TLS starts, fails at the client's close, and 1043 \
             follows in plain text",
        ),
        mirrors(
            "a capability the greeting did not offer (ZSTD)",
            not_offered,
            Answer::LoggedIn {
                seq: 3,
                switched: false,
            },
            "the server ignores a capability it did not offer and logs the client \
             in; keyhole passes the response on (TLS on both legs)",
        ),
        mirrors(
            "an unknown auth plugin (no_such_plugin)",
            unknown_plugin,
            Answer::LoggedIn {
                seq: 5,
                switched: true,
            },
            "the server switches the client to the user's plugin \
             (mysql_native_password) and the login goes on; keyhole relays the \
             switch in sequence (TLS on both legs)",
        ),
        differs(
            "a plain-TCP login with the right password",
            vec![
                Login {
                    seq: 1,
                    capabilities: CLIENT_41,
                    plugin: "mysql_native_password",
                },
                QuitIfLoggedIn,
            ],
            Answer::Err {
                seq: 2,
                code: ACCESS_DENIED,
                sqlstate: Some("28000"),
            },
            Answer::LoggedIn {
                seq: 2,
                switched: false,
            },
            "keyhole's purpose: the local leg may be plain, the server leg is TLS \
             that keyhole verified, which is what require_secure_transport asks \
             for; the server refuses a plain login only after its password check \
             (10.11: 1045)",
        ),
        mirrors(
            "closes right after the greeting",
            vec![HalfClose],
            Answer::Closed,
            "a client that leaves before a byte is let go without one",
        ),
        differs(
            "sends nothing, and waits",
            vec![],
            Answer::Closed,
            bad_handshake(1),
            "both give up after 10 s by default (the server's connect_timeout, \
             keyhole's --startup-timeout); the server closes without a byte, \
             keyhole says which of its limits ran out (\"client sent no handshake \
             response within 10s (--startup-timeout)\"), with the code it gives every client that \
             breaks off the handshake",
        ),
        mirrors(
            "closes after its SSLRequest",
            vec![Send(ssl_request(1)), HalfClose],
            bad_handshake(2),
            "TLS fails at the client's close; 1043 follows in plain text",
        ),
        mirrors(
            "an SSLRequest twice",
            vec![Send([ssl_request(1), ssl_request(2)].concat())],
            bad_handshake(2),
            "the second SSLRequest is not a TLS ClientHello: the TLS handshake \
             fails and 1043 follows in plain text",
        ),
        mirrors(
            "an SSLRequest again inside TLS",
            vec![Send(ssl_request(1)), Tls, Send(ssl_request(2))],
            bad_handshake(3),
            "a second SSLRequest inside TLS is a bad handshake, answered inside TLS",
        ),
        mirrors(
            "a response with sequence id 0",
            vec![Send(packet(0, &full))],
            Answer::Err {
                seq: 1,
                code: OUT_OF_ORDER,
                sqlstate: COMMUNICATION_ERROR,
            },
            "a packet out of sequence gets 1156 carrying the id the client should \
             have sent (plain TCP: refused before the transport check)",
        ),
        mirrors(
            "a response with sequence id 7 inside TLS",
            vec![
                Send(ssl_request(1)),
                Tls,
                Send(packet(
                    7,
                    &response(CLIENT_41 | CLIENT_SSL, &[0x5a; 20], "mysql_native_password"),
                )),
            ],
            Answer::Err {
                seq: 2,
                code: OUT_OF_ORDER,
                sqlstate: COMMUNICATION_ERROR,
            },
            "out of sequence after TLS: 1156 with the id expected, inside TLS",
        ),
        differs(
            "a header announcing 16 MiB - 1 bytes, then the client closes",
            vec![Send(vec![0xff, 0xff, 0xff, 1]), HalfClose],
            Answer::Closed,
            Answer::Err {
                seq: 2,
                code: PACKET_TOO_LARGE,
                sqlstate: COMMUNICATION_ERROR,
            },
            "the server waits for a packet up to its max_allowed_packet (16 MiB \
             here) and leaves silently when the client closes first; keyhole reads \
             at most 256 KiB in one handshake packet (a bound on what an \
             unauthenticated client makes it hold) and refuses the header at once \
             with 1153, what the server answers a packet over its own limit; its \
             message names keyhole's limit",
        ),
        mirrors(
            "HTTP GET instead of the response",
            vec![Send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())],
            Answer::Err {
                seq: 1,
                code: OUT_OF_ORDER,
                sqlstate: COMMUNICATION_ERROR,
            },
            "read as a packet header, \"GET \" has sequence id 0x20: out of \
             order, which the server checks before the length",
        ),
    ]
}

/// A client connection, plain or inside TLS.
enum Wire {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    /// Between the two.
    Gone,
}

impl Wire {
    fn write_all(&mut self, bytes: &[u8]) {
        let sent = match self {
            Wire::Plain(s) => s.write_all(bytes),
            Wire::Tls(s) => s.write_all(bytes),
            Wire::Gone => unreachable!("a wire is never left gone"),
        };
        // The peer may have refused and closed already; what it answered is
        // read afterwards.
        if let Err(e) = sent {
            eprintln!("send failed: {e}");
        }
    }

    /// Everything up to the end of the connection (a reset, or a TLS
    /// connection cut without close_notify, is an end too).
    fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("the connection stayed open after {out:02x?}")
                }
                Err(_) => return out,
            }
        }
    }

    /// One whole packet: sequence id and payload.
    fn read_packet(&mut self) -> (u8, Vec<u8>) {
        let mut header = [0u8; 4];
        self.read_exact(&mut header).expect("a packet header");
        let len =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload).expect("a whole packet");
        (header[3], payload)
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(buf),
            Wire::Tls(s) => s.read(buf),
            Wire::Gone => unreachable!("a wire is never left gone"),
        }
    }
}

/// The 20-byte scramble of a greeting payload (both parts).
fn scramble(greeting: &[u8]) -> Vec<u8> {
    let at = greeting_fields(greeting);
    let mut out = greeting[at.id + 4..at.id + 12].to_vec();
    out.extend_from_slice(&greeting[at.scramble2..at.scramble2 + 12]);
    out
}

/// Where a greeting's connection id and second scramble part sit.
struct GreetingFields {
    id: usize,
    scramble2: usize,
    /// Where the second part ends (its NUL included).
    scramble2_end: usize,
}

fn greeting_fields(greeting: &[u8]) -> GreetingFields {
    let nul = greeting
        .iter()
        .position(|&b| b == 0)
        .expect("a server version");
    let id = nul + 1;
    // id (4), part 1 (8), filler (1), caps (2), charset (1), status (2),
    // caps (2), auth data length (1), reserved (10), then part 2.
    let len_at = id + 4 + 8 + 1 + 2 + 1 + 2 + 2;
    let scramble2 = len_at + 1 + 10;
    let part2 = usize::from(greeting[len_at]).saturating_sub(8).max(13);
    GreetingFields {
        id,
        scramble2,
        scramble2_end: scramble2 + part2,
    }
}

/// A greeting without what is each server connection's own: the connection
/// id and the scramble are zeroed (the scramble's closing NUL is kept).
fn greeting_shape(greeting: &[u8]) -> Vec<u8> {
    let at = greeting_fields(greeting);
    let mut out = greeting.to_vec();
    out[at.id..at.id + 12].fill(0);
    out[at.scramble2..at.scramble2_end - 1].fill(0);
    out
}

/// Runs `steps` against `port` (the server or keyhole) and returns the
/// greeting and the packets that came back after it, TLS alerts left out.
fn run(port: u16, steps: &[Step], tls: &Arc<rustls::ClientConfig>) -> (Vec<u8>, Vec<Packet>) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // A guard against a hang, not a timing assertion.
    tcp.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set a read timeout");
    let mut wire = Wire::Plain(tcp);
    let (seq, greeting) = wire.read_packet();
    assert_eq!(seq, 0, "the greeting's sequence id");
    let mut seen = Vec::new();
    for step in steps {
        match step {
            Step::Send(bytes) => wire.write_all(bytes),
            Step::Tls => {
                let Wire::Plain(tcp) = std::mem::replace(&mut wire, Wire::Gone) else {
                    panic!("TLS twice")
                };
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                let conn = rustls::ClientConnection::new(tls.clone(), name).expect("a TLS client");
                let mut stream = rustls::StreamOwned::new(conn, tcp);
                while stream.conn.is_handshaking() {
                    stream
                        .conn
                        .complete_io(&mut stream.sock)
                        .expect("the TLS handshake");
                }
                wire = Wire::Tls(Box::new(stream));
            }
            Step::HalfClose => match &wire {
                Wire::Plain(tcp) => tcp.shutdown(Shutdown::Write).expect("shut down writing"),
                _ => panic!("half-close is for plain connections"),
            },
            Step::Login {
                seq,
                capabilities,
                plugin,
            } => {
                let auth = keyhole::protocol::mysql::native_password(
                    NATIVE_PASS.as_bytes(),
                    &scramble(&greeting),
                );
                wire.write_all(&packet(*seq, &response(*capabilities, &auth, plugin)));
            }
            Step::AnswerSwitch { seq } => {
                let (switch_seq, switch) = wire.read_packet();
                let data = switch_data(&switch);
                let auth = keyhole::protocol::mysql::native_password(NATIVE_PASS.as_bytes(), data);
                seen.push(Packet {
                    seq: switch_seq,
                    payload: switch,
                });
                wire.write_all(&packet(*seq, &auth));
            }
            Step::QuitIfLoggedIn => {
                let (seq, outcome) = wire.read_packet();
                let ok = outcome.first() == Some(&0);
                seen.push(Packet {
                    seq,
                    payload: outcome,
                });
                if ok {
                    wire.write_all(&COM_QUIT);
                }
            }
        }
    }
    let rest = wire.read_to_end();
    seen.extend(packets(without_tls_alerts(&rest)));
    (greeting, seen)
}

/// The scramble of an AuthSwitchRequest to mysql_native_password.
fn switch_data(switch: &[u8]) -> &[u8] {
    let name = b"\xfemysql_native_password\0";
    assert!(
        switch.starts_with(name),
        "expected a switch to mysql_native_password, got {:?}",
        String::from_utf8_lossy(switch)
    );
    let data = &switch[name.len()..];
    data.strip_suffix(&[0]).unwrap_or(data)
}

/// `bytes` without the TLS alert records in front (a failed TLS handshake's
/// last word, before the plain ERR).
fn without_tls_alerts(mut bytes: &[u8]) -> &[u8] {
    while let [21, 3, _, hi, lo, rest @ ..] = bytes {
        let len = usize::from(*hi) << 8 | usize::from(*lo);
        bytes = rest.get(len..).unwrap_or_default();
    }
    bytes
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Packet {
    seq: u8,
    payload: Vec<u8>,
}

fn packets(mut bytes: &[u8]) -> Vec<Packet> {
    let mut out = Vec::new();
    while let [a, b, c, seq, rest @ ..] = bytes {
        let len = usize::from(*a) | usize::from(*b) << 8 | usize::from(*c) << 16;
        let payload = rest
            .get(..len)
            .unwrap_or_else(|| panic!("a partial packet: {bytes:02x?}"));
        out.push(Packet {
            seq: *seq,
            payload: payload.to_vec(),
        });
        bytes = &rest[len..];
    }
    assert!(
        bytes.is_empty(),
        "bytes that are not a packet: {bytes:02x?}"
    );
    out
}

/// The packets with what is each server connection's own left out (an
/// AuthSwitchRequest's scramble), for comparing byte for byte.
fn comparable(seen: &[Packet]) -> Vec<Packet> {
    seen.iter()
        .map(|p| {
            let mut p = p.clone();
            if p.payload.first() == Some(&0xfe) {
                if let Some(nul) = p.payload.iter().position(|&b| b == 0) {
                    let end = p.payload.len().saturating_sub(1);
                    p.payload[nul + 1..end].fill(b'*');
                }
            }
            p
        })
        .collect()
}

/// Describes what came back, for the failure messages and the table.
fn describe(seen: &[Packet]) -> String {
    if seen.is_empty() {
        return "closed without a byte".into();
    }
    let parts: Vec<String> = seen
        .iter()
        .map(|p| match p.payload.split_first() {
            Some((0xff, rest)) if rest.len() >= 2 => {
                let code = u16::from_le_bytes([rest[0], rest[1]]);
                match rest[2..].split_first() {
                    Some((b'#', tail)) if tail.len() >= 5 => format!(
                        "seq {} ERR {code} ({}) {:?}",
                        p.seq,
                        String::from_utf8_lossy(&tail[..5]),
                        String::from_utf8_lossy(&tail[5..])
                    ),
                    _ => format!(
                        "seq {} ERR {code} (no SQLSTATE) {:?}",
                        p.seq,
                        String::from_utf8_lossy(&rest[2..])
                    ),
                }
            }
            Some((0x00, _)) => format!("seq {} OK {:02x?}", p.seq, p.payload),
            Some((0xfe, rest)) => {
                let name = rest.split(|&b| b == 0).next().unwrap_or_default();
                format!("seq {} switch to {}", p.seq, String::from_utf8_lossy(name))
            }
            _ => format!("seq {} {:02x?}", p.seq, p.payload),
        })
        .collect();
    format!("{}, then closed", parts.join(", "))
}

/// Whether `seen` is `answer`; the reason if not.
fn check(answer: Answer, seen: &[Packet]) -> Result<(), String> {
    let got = describe(seen);
    let fail = || Err(format!("expected {answer:?}, got {got}"));
    match answer {
        Answer::Closed if seen.is_empty() => Ok(()),
        Answer::Err {
            seq,
            code,
            sqlstate,
        } => {
            let [p] = seen else { return fail() };
            let payload = &p.payload;
            let state = match payload.get(3) {
                Some(b'#') => payload
                    .get(4..9)
                    .map(|s| String::from_utf8_lossy(s).into_owned()),
                _ => None,
            };
            let ok = p.seq == seq
                && payload.first() == Some(&0xff)
                && payload.get(1..3) == Some(&code.to_le_bytes()[..])
                && state.as_deref() == sqlstate;
            if ok {
                Ok(())
            } else {
                fail()
            }
        }
        Answer::LoggedIn { seq, switched } => {
            let (switch, ok) = match seen {
                [s, ok] if switched => (Some(s), ok),
                [ok] if !switched => (None, ok),
                _ => return fail(),
            };
            let switch_ok = switch.is_none_or(|s| {
                s.seq == seq - 2 && s.payload.starts_with(b"\xfemysql_native_password\0")
            });
            if switch_ok && ok.seq == seq && ok.payload.first() == Some(&0) {
                Ok(())
            } else {
                fail()
            }
        }
        Answer::Closed => fail(),
    }
}

#[test]
fn before_the_login_keyhole_answers_like_the_server() {
    keyhole::tls::install_crypto_provider();
    let db = MariaDb::shared();
    let local = TestPki::generate(&["localhost"]);
    let path = |p: &std::path::Path| p.to_str().expect("UTF-8 paths").to_owned();
    let (ca, cert, key) = (
        path(&db.pki().ca),
        path(&local.server_cert),
        path(&local.server_key),
    );
    let target = db.keyhole_target();
    let keyhole = Keyhole::start(&[
        "--ca-file",
        &ca,
        "--listen-cert",
        &cert,
        "--listen-key",
        &key,
        &target,
    ]);
    let plain_keyhole = Keyhole::start(&["--ca-file", &ca, &target]);
    // Both certificates name localhost.
    let tls = support::certs::tls_client_config_trusting(&[&db.pki().ca, &local.ca], None);

    let mut table = Vec::new();
    let mut failures = Vec::new();
    for row in rows() {
        let (server_greeting, direct) = run(db.port(), &row.steps, &tls);
        let (greeting, through) = run(keyhole.port(), &row.steps, &tls);
        assert_eq!(
            greeting_shape(&greeting),
            greeting_shape(&server_greeting),
            "{}: keyhole with --listen-cert greets as the server does, \
             but for the connection id and scramble",
            row.name
        );
        let mut problems = Vec::new();
        if let Err(e) = check(row.direct, &direct) {
            problems.push(format!("the server: {e}"));
        }
        if let Err(e) = check(row.keyhole, &through) {
            problems.push(format!("keyhole: {e}"));
        }
        let is_err = |a: Answer| matches!(a, Answer::Err { .. });
        if matches!(row.why, Why::Mirrors(_))
            && !is_err(row.direct)
            && comparable(&direct) != comparable(&through)
        {
            problems.push(format!(
                "not the same bytes: the server sent {direct:02x?}, keyhole {through:02x?}"
            ));
        }
        let why = match row.why {
            Why::Mirrors(text) => format!("mirrors: {text}"),
            Why::Differs(text) => format!("differs: {text}"),
        };
        table.push(format!(
            "{}\n  server:  {}\n  keyhole: {}\n  {why}",
            row.name,
            describe(&direct),
            describe(&through)
        ));
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", row.name, problems.join("\n  ")));
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Without a local certificate keyhole offers no TLS, and nothing else
    // changes in the greeting.
    let (server_greeting, _) = run(db.port(), &[Step::HalfClose], &tls);
    let (greeting, _) = run(plain_keyhole.port(), &[Step::HalfClose], &tls);
    let mut expected = greeting_shape(&server_greeting);
    let caps_at = greeting_fields(&server_greeting).id + 4 + 8 + 1;
    expected[caps_at + 1] &= !((CLIENT_SSL >> 8) as u8);
    assert_eq!(
        greeting_shape(&greeting),
        expected,
        "keyhole without --listen-cert: the server's greeting without CLIENT_SSL"
    );
}
