//! Before the server's session exists, keyhole stands in for PostgreSQL: a
//! client must not be able to tell the two apart, except where keyhole adds a
//! check of its own (and its message then names it).
//!
//! A differential table: each row's byte sequence goes (a) straight to the
//! lab's PostgreSQL (TLS only, `hostssl` rules) and (b) to keyhole in front of
//! it, with a certificate of its own so that it too answers 'S' to an
//! SSLRequest. What comes back is compared: every byte, or "closed without a
//! byte", or (where the text is keyhole's own) ErrorResponses by severity and
//! SQLSTATE and other messages by tag. Each row says which server behaviour
//! keyhole mirrors, or which deliberate difference it keeps and why; a row
//! with a difference asserts both sides' answers.
//!
//! Rows that go past the startup packet do SSLRequest and a TLS handshake
//! first on both legs (the server rejects plain connections in pg_hba).

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use support::certs::TestPki;
use support::keyhole::Keyhole;
use support::postgres::{PgCluster, TRUST_USER};
use support::wire::{cancel_request, startup_packet, GSSENC_REQUEST, SSL_REQUEST};

/// The longest a side may keep a connection open after the client's FIN:
/// a safety net, never an expectation (every row ends with the client done).
const READ_LIMIT: Duration = Duration::from_secs(20);

/// One thing the client does, in order.
enum Step {
    /// Writes these bytes (through TLS once it is up). A failed write is not
    /// a verdict: the other side may already have closed, and the reads say so.
    Send(Vec<u8>),
    /// Reads the one-byte answer to an SSLRequest or GSSENCRequest: on 'S'
    /// does the TLS handshake, on 'N' goes on, on 'G' (GSSAPI encryption,
    /// which this client cannot do) hangs up. Any other first byte is the
    /// start of the last answer (an error).
    Answer,
    /// A TLS ClientHello (ALPN "postgresql") as the very first bytes:
    /// PostgreSQL 17's direct TLS.
    DirectTls,
}

/// How the two sides' answers are compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// Byte for byte.
    Exact,
    /// ErrorResponses by severity and SQLSTATE (the text may be keyhole's
    /// own), protocol-2 errors up to the version range's last number (keyhole
    /// does not know its server's), other messages by tag (a login's
    /// parameter values and cancel key differ per connection).
    Codes,
}

enum Verdict {
    /// keyhole answers as the server does; which behaviour that is.
    Mirrors(&'static str),
    /// A deliberate difference, why, and each side's answer as rendered
    /// (runs of a repeated message shown once, with `*`).
    Differs {
        why: &'static str,
        direct: &'static str,
        keyhole: &'static str,
    },
}

struct Row {
    name: &'static str,
    steps: Vec<Step>,
    compare: Compare,
    verdict: Verdict,
}

fn row(name: &'static str, compare: Compare, steps: Vec<Step>, verdict: Verdict) -> Row {
    Row {
        name,
        steps,
        compare,
        verdict,
    }
}

/// What a client saw, in order.
#[derive(Debug)]
enum Seen {
    /// The one-byte answer to an encryption request.
    Answer(u8),
    Tls,
    /// The TLS handshake did not complete (the other side closed).
    NoTls,
    /// Everything until the close, and whether it was a close (not the
    /// safety net's timeout).
    Rest {
        bytes: Vec<u8>,
        closed: bool,
    },
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        let _ = match self {
            Conn::Plain(s) => s.write_all(bytes),
            Conn::Tls(t) => t.write_all(bytes).and_then(|()| t.flush()),
        };
    }
    /// No more bytes from the client: close_notify on TLS, then FIN.
    fn finish(&mut self) {
        if let Conn::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        let _ = self.socket().shutdown(Shutdown::Write);
    }
}

/// One side of the comparison: where it listens, and a TLS client that
/// trusts its certificate and offers ALPN "postgresql" (which PostgreSQL 15
/// ignores and direct TLS requires).
struct Side {
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl Side {
    fn handshake(&self, socket: TcpStream) -> Option<Conn> {
        let name = ServerName::try_from("localhost").expect("a server name");
        let mut conn = ClientConnection::new(self.tls.clone(), name).expect("a TLS client");
        let mut socket = socket;
        while conn.is_handshaking() {
            if conn.complete_io(&mut socket).is_err() {
                return None;
            }
        }
        Some(Conn::Tls(Box::new(StreamOwned::new(conn, socket))))
    }

    /// Plays `steps`, then says goodbye and reads until the side closes.
    fn play(&self, steps: &[Step]) -> Vec<Seen> {
        let socket = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        socket.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
        let mut conn = Conn::Plain(socket);
        let mut seen = Vec::new();
        for step in steps {
            let tls_now = match step {
                Step::Send(bytes) => {
                    conn.send(bytes);
                    false
                }
                Step::DirectTls => true,
                Step::Answer => {
                    let mut byte = [0u8; 1];
                    let answer = match conn.read(&mut byte) {
                        Ok(1) => Some(byte[0]),
                        _ => None,
                    };
                    match answer {
                        Some(b'S') => {
                            seen.push(Seen::Answer(b'S'));
                            true
                        }
                        Some(b'N') => {
                            seen.push(Seen::Answer(b'N'));
                            false
                        }
                        Some(b'G') => {
                            // GSSAPI encryption from here on, which this client
                            // cannot do (no Kerberos credentials): it hangs up,
                            // as libpq without them would.
                            seen.push(Seen::Answer(b'G'));
                            break;
                        }
                        // Not a one-byte answer: the first byte of the last
                        // answer (an error), or the close.
                        first => {
                            let mut rest = read_to_close(&mut conn);
                            if let (Some(first), Seen::Rest { bytes, .. }) = (first, &mut rest) {
                                bytes.insert(0, first);
                            }
                            seen.push(rest);
                            return seen;
                        }
                    }
                }
            };
            if tls_now {
                let Conn::Plain(socket) = conn else {
                    panic!("TLS requested inside TLS")
                };
                let Some(tls) = self.handshake(socket) else {
                    seen.push(Seen::NoTls);
                    return seen;
                };
                conn = tls;
                seen.push(Seen::Tls);
            }
        }
        conn.finish();
        seen.push(read_to_close(&mut conn));
        seen
    }
}

/// Everything until the other side closes (an error on a closed connection,
/// a reset or a TLS close without close_notify, counts as its close).
fn read_to_close(conn: &mut Conn) -> Seen {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => {
                return Seen::Rest {
                    bytes,
                    closed: true,
                }
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) => {
                let timed_out = matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                return Seen::Rest {
                    bytes,
                    closed: !timed_out,
                };
            }
        }
    }
}

/// What the client saw, as one line of text under `compare`.
fn render(seen: &[Seen], compare: Compare) -> String {
    let mut out: Vec<String> = Vec::new();
    for s in seen {
        match s {
            Seen::Answer(b) => out.push(format!("'{}'", char::from(*b))),
            Seen::Tls => out.push("TLS".into()),
            Seen::NoTls => out.push("no-TLS".into()),
            Seen::Rest { bytes, closed } => {
                if compare == Compare::Exact && !bytes.is_empty() {
                    out.push(format!("{:?}", bytes.escape_ascii().to_string()));
                } else {
                    out.extend(messages(bytes));
                }
                out.push(if *closed { "closed" } else { "still-open" }.into());
            }
        }
    }
    out.join(" ")
}

/// The messages in `bytes`: ErrorResponses as `E[severity SQLSTATE]`, a
/// protocol-2 error as its text without the range's last number, anything
/// else by tag (what cannot be framed, byte for byte).
fn messages(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(&tag) = rest.first() {
        // A protocol-2 error: 'E' and a C string, no length word. Shown
        // with its newline, without the range's last number.
        if tag == b'E' && rest.get(1).is_some_and(|&b| b != 0) {
            let Some(end) = rest.iter().position(|&b| b == 0) else {
                out.push(format!(
                    "unterminated:{:?}",
                    rest.escape_ascii().to_string()
                ));
                break;
            };
            let text = String::from_utf8_lossy(&rest[1..end]);
            let (text, newline) = match text.strip_suffix('\n') {
                Some(line) => (line, "\n"),
                None => (&*text, ""),
            };
            let text = text.trim_end_matches(|c: char| c.is_ascii_digit());
            out.push(format!("E2{:?}", format!("{text}…{newline}")));
            rest = &rest[end + 1..];
            continue;
        }
        let Some(len) = rest
            .get(1..5)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .filter(|&l| l >= 4 && rest.len() > l)
        else {
            out.push(format!("{:?}", rest.escape_ascii().to_string()));
            break;
        };
        let body = &rest[5..1 + len];
        if tag == b'E' {
            let field = |code: char| support::wire::error_field(body, code);
            out.push(format!("E[{} {}]", field('S'), field('C')));
        } else {
            out.push(char::from(tag).to_string());
        }
        rest = &rest[1 + len..];
    }
    out
}

/// Runs of one repeated token shown once, with `*` (the number of
/// ParameterStatus messages is the server's business).
fn collapsed(line: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for token in line.split(' ') {
        match out.last_mut() {
            Some(last) if last == token || *last == format!("{token}*") => {
                *last = format!("{token}*")
            }
            _ => out.push(token.to_owned()),
        }
    }
    out.join(" ")
}

// --- the rows' bytes ---------------------------------------------------------

const V3_0: u32 = 3 << 16;
const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;

fn send(bytes: impl Into<Vec<u8>>) -> Step {
    Step::Send(bytes.into())
}

/// A StartupMessage as the trust user, to the `postgres` database.
fn trust_startup(version: u32) -> Vec<u8> {
    startup_packet(version, &[("user", TRUST_USER), ("database", "postgres")])
}

/// The trust user's StartupMessage padded (in application_name) to exactly
/// `total` bytes, length word included.
fn trust_startup_of_length(total: usize) -> Vec<u8> {
    let bare = startup_packet(
        V3_0,
        &[
            ("user", TRUST_USER),
            ("database", "postgres"),
            ("application_name", ""),
        ],
    );
    let padding = "a".repeat(total - bare.len());
    let packet = startup_packet(
        V3_0,
        &[
            ("user", TRUST_USER),
            ("database", "postgres"),
            ("application_name", &padding),
        ],
    );
    assert_eq!(packet.len(), total);
    packet
}

/// A length word and a code, then `body` as it is (no terminator added).
fn raw_startup(len: u32, code: u32, body: &[u8]) -> Vec<u8> {
    let mut packet = len.to_be_bytes().to_vec();
    packet.extend_from_slice(&code.to_be_bytes());
    packet.extend_from_slice(body);
    packet
}

/// A length word that counts exactly what follows, a code, then `body`.
fn packet(code: u32, body: &[u8]) -> Vec<u8> {
    raw_startup(8 + body.len() as u32, code, body)
}

/// Terminate: what a client that says goodbye at once sends last.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// SSLRequest, 'S', TLS: where every row that goes past the startup packet
/// begins (the server refuses plain connections).
fn over_tls(mut then: Vec<Step>) -> Vec<Step> {
    let mut steps = vec![send(SSL_REQUEST), Step::Answer];
    steps.append(&mut then);
    steps
}

fn table() -> Vec<Row> {
    use Compare::{Codes, Exact};
    use Verdict::{Differs, Mirrors};
    let silent = "closes without a byte";
    let mut oversized = 10_005u32.to_be_bytes().to_vec();
    oversized.resize(10_005, 0);
    vec![
        row(
            "Terminate before the startup packet",
            Exact,
            vec![send(TERMINATE)],
            Mirrors("'X' 00 00 00 reads as a length far over the cap: closes without a byte (node-postgres' connect() then end() sends this)"),
        ),
        row(
            "Query before the startup packet",
            Exact,
            vec![send(support::wire::simple_query("select 1"))],
            Mirrors("a typed message reads as a length over the cap: closes without a byte"),
        ),
        row(
            "HTTP GET",
            Exact,
            vec![send(&b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..])],
            Mirrors("\"GET \" reads as a length over the cap: closes without a byte"),
        ),
        row(
            "length 0",
            Exact,
            vec![send([0, 0, 0, 0])],
            Mirrors(silent),
        ),
        row(
            "length 7",
            Exact,
            vec![send([0, 0, 0, 7, 0, 3, 0])],
            Mirrors("shorter than a length and a code: closes without a byte"),
        ),
        row(
            "length 8: a bare version 3.0, no terminator",
            Codes,
            vec![send(packet(V3_0, b""))],
            Mirrors("FATAL 08P01: the parameters do not end in a terminator"),
        ),
        row(
            "length 10001 (a 10,001-byte startup over TLS)",
            Codes,
            over_tls(vec![send(trust_startup_of_length(10_001)), send(TERMINATE)]),
            Mirrors("within the cap (10,000 bytes after the length word): the login goes on to ReadyForQuery"),
        ),
        row(
            "length 10004, the longest there is",
            Codes,
            over_tls(vec![send(trust_startup_of_length(10_004)), send(TERMINATE)]),
            Mirrors("exactly the cap after the length word: the login goes on to ReadyForQuery"),
        ),
        row(
            "length 10005",
            Exact,
            vec![send(oversized)],
            Mirrors("one byte over the cap: closes without a byte"),
        ),
        row(
            "length 2^31",
            Exact,
            vec![send(raw_startup(1 << 31, V3_0, b"user\0u\0\0"))],
            Mirrors("negative as the server's int32: closes without a byte"),
        ),
        row(
            "1 byte of a length, then FIN",
            Exact,
            vec![send([0])],
            Mirrors(silent),
        ),
        row(
            "2 bytes of a length, then FIN",
            Exact,
            vec![send([0, 0])],
            Mirrors(silent),
        ),
        row(
            "3 bytes of a length, then FIN",
            Exact,
            vec![send([0, 0, 0])],
            Mirrors(silent),
        ),
        row(
            "a length promising more than arrives before FIN",
            Exact,
            vec![send(raw_startup(64, V3_0, b"user\0"))],
            Mirrors("the packet never completes: closes without a byte"),
        ),
        row(
            "protocol 2.0",
            Codes,
            vec![send(startup_packet(2 << 16, &[("user", TRUST_USER)]))],
            Mirrors("FATAL in the protocol-2 format a 2.x client reads ('E', text, NUL; no length, no SQLSTATE); the version range's last number is keyhole's (3.2, the newest it reads; it cannot know its server's)"),
        ),
        row(
            "protocol 3.9 (over TLS)",
            Codes,
            over_tls(vec![send(trust_startup((3 << 16) | 9)), send(TERMINATE)]),
            Mirrors("a newer 3.x minor goes on: NegotiateProtocolVersion ('v'), then the login to ReadyForQuery (keyhole passes the packet on; the server answers)"),
        ),
        row(
            "protocol 4.0",
            Codes,
            vec![send(startup_packet(4 << 16, &[("user", TRUST_USER)]))],
            Mirrors("FATAL 0A000: unsupported frontend protocol"),
        ),
        row(
            "unknown special code 1234.5681",
            Codes,
            vec![send(packet((1234 << 16) | 5681, b""))],
            Mirrors("FATAL 0A000: major version 1234 is unsupported like any other above 3"),
        ),
        row(
            "startup without user",
            Codes,
            vec![send(startup_packet(V3_0, &[("database", "postgres")]))],
            Mirrors("FATAL 28000: no user name"),
        ),
        row(
            "startup with an empty user",
            Codes,
            vec![send(startup_packet(V3_0, &[("user", "")]))],
            Mirrors("FATAL 28000: no user name"),
        ),
        row(
            "an unterminated parameter list",
            Codes,
            vec![send(packet(V3_0, b"user\0trust_user\0"))],
            Mirrors("FATAL 08P01: the packet does not end in a terminator"),
        ),
        row(
            "a parameter without a value",
            Codes,
            vec![send(packet(V3_0, b"user\0"))],
            Mirrors("FATAL 08P01: the packet does not end in a terminator"),
        ),
        row(
            "SSLRequest twice (the second inside TLS)",
            Codes,
            over_tls(vec![send(SSL_REQUEST)]),
            Mirrors("once answered, an SSLRequest's code reads as protocol 1234.5679: FATAL 0A000"),
        ),
        row(
            "GSSENCRequest inside TLS",
            Codes,
            over_tls(vec![send(GSSENC_REQUEST)]),
            Mirrors("after TLS, a GSSENCRequest's code reads as protocol 1234.5680: FATAL 0A000"),
        ),
        row(
            "GSSENCRequest twice",
            Codes,
            vec![send(GSSENC_REQUEST), Step::Answer, send(GSSENC_REQUEST)],
            Differs {
                why: "keyhole cannot encrypt with GSSAPI (it is not the server's Kerberos principal) and declines like a server built without it: 'N', after which a second request reads as protocol 1234.5680, FATAL 0A000. This server is built with GSSAPI: it says 'G', and a client without Kerberos credentials can only hang up (the table does; a second request would be read as a GSSAPI token)",
                direct: "'G' closed",
                keyhole: "'N' E[FATAL 0A000] closed",
            },
        ),
        row(
            "GSSENCRequest, then SSLRequest and a login over TLS",
            Codes,
            vec![
                send(GSSENC_REQUEST),
                Step::Answer,
                send(SSL_REQUEST),
                Step::Answer,
                send(trust_startup(V3_0)),
                send(TERMINATE),
            ],
            Differs {
                why: "keyhole declines GSSAPI encryption ('N', as a server without it); TLS may follow, and the login goes on. This server says 'G', and a client without Kerberos credentials can only hang up (an SSLRequest now would be read as a GSSAPI token)",
                direct: "'G' closed",
                keyhole: "'N' 'S' TLS R S* K Z closed",
            },
        ),
        row(
            "SSLRequest with a 4-byte body, then a login",
            Codes,
            vec![
                send(packet(SSL_REQUEST_CODE, &[0, 0, 0, 0])),
                Step::Answer,
                send(trust_startup(V3_0)),
                send(TERMINATE),
            ],
            Mirrors("the code alone makes the request (the body is ignored): 'S', TLS, the login"),
        ),
        row(
            "CancelRequest of 12 bytes",
            Exact,
            vec![send(cancel_request(&[0, 0, 0, 1]))],
            Mirrors("too short for a key: closes without a byte"),
        ),
        row(
            "CancelRequest of 20 bytes",
            Exact,
            vec![send(cancel_request(&[0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]))],
            Mirrors("closes without a byte. (PostgreSQL 15 takes only 16 bytes; keyhole also reads protocol 3.2's longer keys, up to 256 bytes, since it fronts PostgreSQL 18 too, and closes silently on this unknown one)"),
        ),
        row(
            "CancelRequest with an unknown key",
            Exact,
            vec![send(cancel_request(&[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]))],
            Mirrors("a cancel is never answered: closes without a byte"),
        ),
        row(
            "CancelRequest with an unknown key, inside TLS",
            Exact,
            over_tls(vec![send(cancel_request(&[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]))]),
            Mirrors("a cancel may come over TLS too, and is never answered: 'S', TLS, closed without a byte"),
        ),
        row(
            "the trust user's login over TLS",
            Codes,
            over_tls(vec![send(trust_startup(V3_0)), send(TERMINATE)]),
            Mirrors("the same messages up to ReadyForQuery (keyhole relays the server's)"),
        ),
        row(
            "StartupMessage pipelined behind the SSLRequest",
            Codes,
            vec![
                send([&SSL_REQUEST[..], &trust_startup(V3_0)].concat()),
                Step::Answer,
            ],
            Differs {
                why: "bytes sent before the TLS handshake must not be read as if they came through it: keyhole refuses them at once, in plain text, without 'S' (its message says so). PostgreSQL 15 says 'S', and after the handshake finds the bytes and refuses inside TLS, with the same SQLSTATE",
                direct: "'S' TLS E[FATAL 08P01] closed",
                keyhole: "E[FATAL 08P01] closed",
            },
        ),
        row(
            "direct TLS (a ClientHello first)",
            Codes,
            vec![Step::DirectTls, send(trust_startup(V3_0)), send(TERMINATE)],
            Differs {
                why: "keyhole supports PostgreSQL 17's direct TLS (ALPN \"postgresql\"); PostgreSQL 15 reads the ClientHello as a length over the cap and closes",
                direct: "no-TLS",
                keyhole: "TLS R S* K Z closed",
            },
        ),
        row(
            "a user name that is not UTF-8 (over TLS)",
            Codes,
            over_tls(vec![send(packet(
                V3_0,
                b"user\0\xff\0database\0postgres\0\0",
            ))]),
            Differs {
                why: "keyhole reads the user and database names (to log them, map them, choose a login): it refuses names that are not UTF-8 with 08P01 and says so. The server takes the bytes and goes on to authentication (here a SCRAM request) before it closes on the client's goodbye",
                direct: "'S' TLS R closed",
                keyhole: "'S' TLS E[FATAL 08P01] closed",
            },
        ),
    ]
}

#[test]
fn before_the_session_keyhole_answers_like_the_server() {
    let cluster = PgCluster::shared();
    let local = TestPki::generate(&["localhost"]);
    let cert = local.server_cert.to_str().expect("utf-8").to_owned();
    let key = local.server_key.to_str().expect("utf-8").to_owned();
    let keyhole = Keyhole::for_cluster(cluster, &["--listen-cert", &cert, "--listen-key", &key]);
    let direct = Side {
        port: cluster.port,
        tls: cluster.pki.tls_client_config(Some(b"postgresql")),
    };
    let through = Side {
        port: keyhole.port(),
        tls: local.tls_client_config(Some(b"postgresql")),
    };

    let mut report = String::new();
    let mut failures = Vec::new();
    for row in table() {
        let seen_direct = render(&direct.play(&row.steps), row.compare);
        let seen_keyhole = render(&through.play(&row.steps), row.compare);
        let (ok, note) = match &row.verdict {
            Verdict::Mirrors(what) => (seen_direct == seen_keyhole, format!("mirrors: {what}")),
            Verdict::Differs {
                why,
                direct,
                keyhole,
            } => (
                collapsed(&seen_direct) == *direct && collapsed(&seen_keyhole) == *keyhole,
                format!("differs: {why}\n    expected direct:  {direct}\n    expected keyhole: {keyhole}"),
            ),
        };
        let line = format!(
            "{} {}\n    direct:  {seen_direct}\n    keyhole: {seen_keyhole}\n    {note}\n",
            if ok { "ok  " } else { "FAIL" },
            row.name
        );
        if !ok {
            failures.push(row.name);
        }
        report.push_str(&line);
    }
    println!("{report}");
    assert!(
        failures.is_empty(),
        "rows where keyhole does not answer as stated: {failures:?}\n\n{report}\n--- keyhole's log ---\n{}",
        keyhole.logs()
    );
}
