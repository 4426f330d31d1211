//! The MySQL/MariaDB connection-phase codecs on arbitrary bytes: packet
//! framing, the server's greeting, the client's SSLRequest and
//! HandshakeResponse41, ERR packets and AuthSwitchRequest.
//!
//! Invariants checked, beyond "no panic":
//! - packets consume exactly their declared length and re-encode
//!   (`encode_packet`) to the same bytes; a refused packet is really over
//!   the bound; prefixes of a whole packet wait for more;
//! - `parse_greeting` agrees with an independent reading of HandshakeV10,
//!   and `with_capabilities` changes the four capability bytes and nothing
//!   else (the copy re-parses with the new capabilities);
//! - `parse_client_hello` reads the flags and user from where they are
//!   (two bytes without `CLIENT_PROTOCOL_41` are already a 4.0 client);
//!   `parse_first_hello` reads the same, except that `CLIENT_SSL` in 32
//!   bytes or more is an SSLRequest;
//!   `with_user` output re-parses with the new user and everything else
//!   equal, and keeps the 32-byte header and the bytes after the user;
//! - `ssl_request`, `with_client_capabilities` and
//!   `without_client_capabilities` change only capability bits;
//! - `encode_err` / `parse_err` and `auth_switch_plugin` agree with the bytes.

use bytes::{Bytes, BytesMut};
use keyhole::protocol::mysql::{
    self, caps, decode_packet, parse_client_hello, parse_first_hello, parse_greeting, ClientHello,
    GreetingError, PacketError, ResponseError, SSL_REQUEST_LEN,
};

use super::input::Input;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let selector = input.u8();
    let bits = input.u32();
    let user = input.name();
    let rest = input.rest();
    let max = match selector % 3 {
        0 => mysql::MAX_HANDSHAKE_PAYLOAD,
        1 => 64,
        _ => usize::from(selector),
    };
    // The stream as packets, and every packet's payload through every parser.
    for payload in packet_stream(rest, max) {
        payloads(&payload, bits, &user);
    }
    // The bytes as one payload too: parsers see inputs of any shape.
    payloads(&Bytes::copy_from_slice(rest), bits, &user);
    encoders(selector, bits, &user);
}

/// Decodes packets one after another; returns their payloads.
pub fn packet_stream(data: &[u8], max: usize) -> Vec<Bytes> {
    let mut buf = BytesMut::from(data);
    let mut payloads = Vec::new();
    loop {
        let stream = &data[data.len() - buf.len()..];
        let declared = (stream.len() >= 4).then(|| {
            usize::from(stream[0]) | usize::from(stream[1]) << 8 | usize::from(stream[2]) << 16
        });
        match decode_packet(&mut buf, max) {
            Ok(None) => {
                assert_eq!(buf.len(), stream.len(), "Ok(None) consumed bytes");
                if let Some(len) = declared {
                    assert!(len <= max && stream.len() < 4 + len);
                }
                return payloads;
            }
            Err(PacketError::TooLarge { len, max: m }) => {
                assert_eq!((Some(len), m), (declared, max));
                assert!(len > max);
                return payloads;
            }
            Err(e @ PacketError::OutOfOrder { .. }) => {
                panic!("decode_packet checks no sequence ids, yet: {e}")
            }
            Ok(Some(packet)) => {
                let len = declared.expect("a header");
                assert_eq!(stream.len() - buf.len(), 4 + len);
                assert_eq!(packet.seq, stream[3]);
                let mut out = BytesMut::new();
                mysql::encode_packet(&mut out, packet.seq, &packet.payload);
                assert_eq!(&out[..], &stream[..4 + len], "packet re-encodes");
                for cut in [0, 3, 4, 4 + len / 2, (4 + len).saturating_sub(1)] {
                    if cut < 4 + len {
                        let mut partial = BytesMut::from(&stream[..cut]);
                        assert_eq!(decode_packet(&mut partial, max), Ok(None), "cut {cut}");
                    }
                }
                payloads.push(packet.payload);
            }
        }
    }
}

fn payloads(payload: &Bytes, bits: u32, user: &str) {
    greeting(payload, bits);
    client_hello(payload, user);
    client_capabilities(payload, bits);
    server_replies(payload);
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Where a HandshakeV10's low capability bytes are, read independently.
fn caps_offset(p: &[u8]) -> Option<usize> {
    let nul = p.get(1..)?.iter().position(|&b| b == 0)?;
    // version NUL, thread id (4), auth-plugin-data part 1 (8), filler (1)
    let at = 1 + nul + 1 + 4 + 8 + 1;
    // caps (2), charset (1), status (2), caps (2), auth data length (1), reserved (10)
    (p.len() >= at + 18).then_some(at)
}

pub fn greeting(payload: &Bytes, bits: u32) {
    let p = &payload[..];
    let parsed = parse_greeting(payload);
    let at = match (p.first(), caps_offset(p)) {
        (None, _) => return assert_eq!(parsed, Err(GreetingError::Truncated)),
        (Some(&v), _) if v != 10 => return assert_eq!(parsed, Err(GreetingError::Version(v))),
        (_, None) if !p[1..].contains(&0) => {
            return assert_eq!(parsed, Err(GreetingError::Truncated))
        }
        // Too short after the version: refused (as truncated, or for what
        // the version says).
        (_, None) => return assert!(parsed.is_err()),
        (_, Some(at)) => at,
    };
    let g = match parsed {
        Ok(g) => g,
        // Refused for its content (the server version), not its shape.
        Err(e) if !matches!(e, GreetingError::Version(_) | GreetingError::Truncated) => return,
        Err(e) => panic!("a whole HandshakeV10 is refused: {e:?}"),
    };
    let nul = at - 14;
    assert_eq!(g.server_version, String::from_utf8_lossy(&p[1..nul]));
    let capabilities = u32::from(le16(&p[at..])) | u32::from(le16(&p[at + 5..])) << 16;
    assert_eq!(g.capabilities, capabilities);
    assert_eq!(g.charset, p[at + 2]);
    let mariadb = (capabilities & caps::LONG_PASSWORD == 0).then(|| le32(&p[at + 14..]));
    assert_eq!(g.mariadb_capabilities, mariadb);
    assert_eq!(&g.raw[..], p);

    assert_eq!(g.with_capabilities(g.capabilities), *payload, "identity");
    for wanted in [
        bits,
        g.capabilities | caps::SSL,
        g.capabilities & !caps::SSL,
        g.capabilities ^ bits,
    ] {
        let copy = g.with_capabilities(wanted);
        assert_eq!(copy.len(), p.len());
        for (i, (a, b)) in p.iter().zip(copy.iter()).enumerate() {
            if a != b {
                assert!(
                    (at..at + 2).contains(&i) || (at + 5..at + 7).contains(&i),
                    "byte {i} changed, outside the capability flags"
                );
            }
        }
        let again = parse_greeting(&copy).expect("the copy parses");
        assert_eq!(again.capabilities, wanted);
        assert_eq!(again.server_version, g.server_version);
        assert_eq!(again.charset, g.charset);
        let mariadb = (wanted & caps::LONG_PASSWORD == 0).then(|| le32(&p[at + 14..]));
        assert_eq!(again.mariadb_capabilities, mariadb);
    }

    let probe = mysql::probe_response(&g);
    let wanted = caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::TRANSACTIONS;
    assert_eq!(le32(&probe), g.capabilities & wanted);
    assert_eq!(le32(&probe[4..]), 16 << 20);
    assert_eq!(probe[8], g.charset);
    assert!(probe[9..].iter().all(|&b| b == 0));
}

fn cstr(bytes: &[u8]) -> Option<&[u8]> {
    bytes.iter().position(|&b| b == 0).map(|end| &bytes[..end])
}

pub fn client_hello(p: &[u8], user: &str) {
    let parsed = parse_client_hello(p);
    let flags = (p.len() >= 4).then(|| le32(p));
    let speaks_41 = match p {
        [low, high, ..] => u32::from(u16::from_le_bytes([*low, *high])) & caps::PROTOCOL_41 != 0,
        _ => true,
    };
    assert_eq!(mysql::client_speaks_41(p), speaks_41);
    let first = parse_first_hello(p);
    match (&parsed, flags) {
        (Ok(ClientHello::Response(h)), Some(f)) if f & caps::SSL != 0 => {
            assert_eq!(h.capabilities, f);
            assert_eq!(first, Ok(ClientHello::SslRequest { capabilities: f }));
        }
        (Err(ResponseError::Malformed(_)), Some(f))
            if f & caps::SSL != 0 && p.len() >= SSL_REQUEST_LEN =>
        {
            assert_eq!(first, Ok(ClientHello::SslRequest { capabilities: f }));
        }
        _ => assert_eq!(first, parsed, "before TLS as after, without CLIENT_SSL"),
    }
    match flags {
        _ if !speaks_41 => assert_eq!(parsed, Err(ResponseError::Protocol40)),
        None => assert_eq!(parsed, Err(ResponseError::Malformed("no capability flags"))),
        Some(_) if p.len() < SSL_REQUEST_LEN => {
            assert_eq!(
                parsed,
                Err(ResponseError::Malformed("shorter than 32 bytes"))
            )
        }
        Some(f) if p.len() == SSL_REQUEST_LEN && f & caps::SSL != 0 => {
            assert_eq!(parsed, Ok(ClientHello::SslRequest { capabilities: f }))
        }
        Some(f) => match &parsed {
            Ok(ClientHello::Response(h)) => {
                assert_eq!(h.capabilities, f);
                let name = cstr(&p[SSL_REQUEST_LEN..]).expect("a user name was read");
                assert_eq!(h.user, String::from_utf8_lossy(name));
                if h.database.is_some() {
                    assert!(f & caps::CONNECT_WITH_DB != 0);
                }
                if h.plugin.is_some() {
                    assert!(f & caps::PLUGIN_AUTH != 0);
                }
            }
            Ok(other) => panic!("a {}-byte payload read as {other:?}", p.len()),
            Err(ResponseError::Malformed(_)) => {}
            Err(e) => panic!("{e:?} for a 4.1 payload"),
        },
    }

    let rewritten = mysql::with_user(p, user);
    let has_user = p.len() >= SSL_REQUEST_LEN && cstr(&p[SSL_REQUEST_LEN..]).is_some();
    assert_eq!(
        rewritten.is_ok(),
        has_user,
        "with_user refuses only what has no user"
    );
    let Ok(rewritten) = rewritten else { return };
    assert_eq!(
        &rewritten[..SSL_REQUEST_LEN],
        &p[..SSL_REQUEST_LEN],
        "header kept"
    );
    let old = cstr(&p[SSL_REQUEST_LEN..]).expect("checked").len();
    assert_eq!(
        &rewritten[SSL_REQUEST_LEN..SSL_REQUEST_LEN + user.len() + 1],
        [user.as_bytes(), &[0]].concat()
    );
    assert_eq!(
        &rewritten[SSL_REQUEST_LEN + user.len() + 1..],
        &p[SSL_REQUEST_LEN + old + 1..],
        "everything after the user kept"
    );
    if let Ok(ClientHello::Response(h)) = parsed {
        let mut expected = h.clone();
        expected.user = user.to_owned();
        assert_eq!(
            parse_client_hello(&rewritten),
            Ok(ClientHello::Response(expected)),
            "the rewrite re-parses with the new user"
        );
    }
}

pub fn client_capabilities(p: &[u8], bits: u32) {
    let raised = mysql::with_client_capabilities(p, bits);
    let lowered = mysql::without_client_capabilities(p, bits);
    assert_eq!((raised.len(), lowered.len()), (p.len(), p.len()));
    if p.len() < 4 {
        assert_eq!((&raised[..], &lowered[..]), (p, p));
    } else {
        assert_eq!(le32(&raised), le32(p) | bits);
        assert_eq!(le32(&lowered), le32(p) & !bits);
        assert_eq!((&raised[4..], &lowered[4..]), (&p[4..], &p[4..]));
    }

    let request = mysql::ssl_request(p);
    let n = p.len().min(SSL_REQUEST_LEN);
    let mut header = [0u8; SSL_REQUEST_LEN];
    header[..n].copy_from_slice(&p[..n]);
    assert_eq!(le32(&request), le32(&header) | caps::SSL);
    assert_eq!(&request[4..], &header[4..]);
    if le32(&header) & caps::PROTOCOL_41 != 0 {
        assert_eq!(
            parse_client_hello(&request),
            Ok(ClientHello::SslRequest {
                capabilities: le32(&header) | caps::SSL
            })
        );
    }
}

pub fn server_replies(p: &[u8]) {
    match mysql::parse_err(p) {
        Some((code, state, message)) => {
            assert!(p.len() >= 3 && p[0] == mysql::reply::ERR);
            assert_eq!(code, le16(&p[1..]));
            let rest = &p[3..];
            if rest.first() == Some(&b'#') && rest.len() >= 6 {
                assert_eq!(state, String::from_utf8_lossy(&rest[1..6]));
                assert_eq!(message, String::from_utf8_lossy(&rest[6..]));
            } else {
                assert!(state.is_empty());
                assert_eq!(message, String::from_utf8_lossy(rest));
            }
        }
        None => assert!(p.len() < 3 || p[0] != mysql::reply::ERR),
    }
    match mysql::auth_switch_plugin(p) {
        Some(name) => {
            assert_eq!(p[0], mysql::reply::AUTH_SWITCH);
            assert!(!name.is_empty() && !name.contains(&0));
            assert!(p[1..].starts_with(name));
            assert!(p.len() == 1 + name.len() || p[1 + name.len()] == 0);
        }
        None => assert!(
            p.first() != Some(&mysql::reply::AUTH_SWITCH) || p.get(1).is_none_or(|&b| b == 0)
        ),
    }
}

/// keyhole's own packets parse back to what was put in.
fn encoders(seq: u8, bits: u32, text: &str) {
    let code = bits as u16;
    let state: String = text
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(5)
        .collect();
    let mut out = BytesMut::new();
    mysql::encode_err(&mut out, seq, code, &state, text);
    let packet = decode_packet(&mut out, mysql::MAX_PAYLOAD)
        .expect("valid")
        .expect("whole");
    assert!(out.is_empty());
    assert_eq!(packet.seq, seq);
    let mut expected_state = String::from("HY000");
    expected_state.replace_range(..state.len(), &state);
    assert_eq!(
        mysql::parse_err(&packet.payload),
        Some((code, expected_state, text.to_owned()))
    );
    let reply = mysql::clear_password_reply(text);
    assert_eq!(cstr(&reply), Some(text.as_bytes()));
    assert_eq!(reply.len(), text.len() + 1);
}
