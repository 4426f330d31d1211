//! The Postgres startup-phase codecs on arbitrary bytes: `decode_startup`
//! (the untyped packets a client opens with), `decode_message` (typed
//! messages) and what keyhole reads out of, or writes into, those messages.
//!
//! Invariants checked, beyond "no panic":
//! - a decoded packet consumed exactly its declared length, and every packet
//!   that has an encoder re-encodes to the very bytes it came from
//!   (`CancelKey::cancel_request`, `Message::encode`, `StartupMessage::raw`;
//!   an encryption request is its code, whatever body follows);
//! - any shorter prefix of a decodable packet is `Ok(None)` with nothing
//!   consumed (the decoder waits; it never half-eats a packet);
//! - a refused length is really out of range;
//! - the parameters keyhole reads agree with an independent parse, and
//!   `with_user` changes the user (every occurrence) and nothing else: the
//!   rewrite re-decodes to itself with the same other parameters in order;
//! - `strip_channel_binding` keeps exactly the non-`-PLUS` mechanisms in
//!   order, refuses exactly what an independent parse refuses, and is
//!   idempotent;
//! - `auth_code`, `backend_key` and `error_fields` agree with the bytes, and
//!   `encode_error_response` / `encode_password_message` decode back.

use bytes::{BufMut, BytesMut};
use keyhole::protocol::postgres::{
    self as pg, auth, decode_message, decode_startup, Message, SaslError, StartupError,
    StartupPacket, STARTUP_PACKET_LENGTHS,
};

use super::input::Input;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let selector = input.u8();
    let new_user = input.name();
    let rest = input.rest();
    // The same bytes as both kinds of stream: the choice byte only varies
    // the bound a typed message is held to and the user of the rewrite.
    startup_stream(rest, &new_user);
    let max = match selector % 3 {
        0 => pg::MAX_STARTUP_PHASE_MESSAGE_LEN,
        1 => 64,
        _ => usize::from(selector),
    };
    message_stream(rest, max);
    encoders(&new_user, rest);
}

/// Decodes startup packets one after another, as `negotiate` does.
fn startup_stream(data: &[u8], new_user: &str) {
    let mut buf = BytesMut::from(data);
    let mut offset = 0;
    while let Some(packet) = check_startup(&data[offset..], &mut buf, new_user) {
        offset += packet;
    }
}

fn declared(bytes: &[u8]) -> Option<usize> {
    bytes
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// One `decode_startup` on `buf` (whose bytes are `stream`): checks the
/// result, and returns the length consumed when a packet decoded.
pub fn check_startup(stream: &[u8], buf: &mut BytesMut, new_user: &str) -> Option<usize> {
    let before = buf.len();
    debug_assert_eq!(before, stream.len());
    let len = declared(stream);
    match decode_startup(buf) {
        Ok(None) => {
            assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
            if let Some(len) = len {
                assert!(
                    STARTUP_PACKET_LENGTHS.contains(&len) && before < len,
                    "waits for more although {before} bytes hold a {len}-byte packet"
                );
            }
            None
        }
        Err(StartupError::BadLength(n)) => {
            assert_eq!(Some(n), len);
            assert!(!STARTUP_PACKET_LENGTHS.contains(&n));
            None
        }
        Err(_) => {
            let len = len.expect("a refusal with a length");
            assert!(STARTUP_PACKET_LENGTHS.contains(&len) && len <= before);
            None
        }
        Ok(Some(packet)) => {
            let len = len.expect("a packet has a length");
            assert_eq!(
                before - buf.len(),
                len,
                "consumed other than the declared length"
            );
            assert_eq!(&buf[..], &stream[len..], "the rest of the stream changed");
            let bytes = &stream[..len];
            check_prefixes_wait(bytes);
            let code = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            match packet {
                // The code alone makes the request (a body is ignored, as
                // the server ignores it).
                StartupPacket::SslRequest => assert_eq!(code, pg::SSL_REQUEST_CODE),
                StartupPacket::GssEncRequest => assert_eq!(code, pg::GSSENC_REQUEST_CODE),
                StartupPacket::Cancel(key) => {
                    assert_eq!(code, pg::CANCEL_REQUEST_CODE);
                    assert_eq!(&key.cancel_request()[..], bytes, "cancel key re-encodes");
                    let pid = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
                    assert_eq!(key.pid(), pid);
                    // The secret never reaches a log line.
                    assert_eq!(
                        format!("{key:?}"),
                        format!("CancelKey(pid {pid}, secret redacted)")
                    );
                }
                StartupPacket::Startup(msg) => {
                    assert_eq!(&msg.raw[..], bytes, "raw is the packet as received");
                    assert_eq!(msg.version.major(), 3);
                    assert_eq!(msg.version.0, code);
                    check_startup_message(&msg, new_user);
                }
            }
            Some(len)
        }
    }
}

/// Prefixes of a whole packet (at least 8 bytes) wait for more, consuming
/// nothing: cuts inside the header, inside the body, one byte short.
fn check_prefixes_wait(packet: &[u8]) {
    let len = packet.len();
    for cut in [0, 1, 3, 4, 5, 7, len / 2, len - 1] {
        let mut partial = BytesMut::from(&packet[..cut]);
        assert_eq!(
            decode_startup(&mut partial),
            Ok(None),
            "prefix of {cut} bytes"
        );
        assert_eq!(partial.len(), cut);
    }
}

/// The parameters, read independently: pairs of C strings up to an empty name.
fn parameters(body: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut fields = body.split(|&b| b == 0);
    while let Some(name) = fields.next() {
        if name.is_empty() {
            break;
        }
        out.push((name, fields.next().expect("validated on decode")));
    }
    out
}

fn last<'a>(params: &[(&[u8], &'a [u8])], name: &[u8]) -> Option<&'a [u8]> {
    params
        .iter()
        .rev()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
}

fn check_startup_message(msg: &pg::StartupMessage, new_user: &str) {
    let params = parameters(&msg.raw[8..]);
    assert_eq!(last(&params, b"user"), Some(msg.user.as_bytes()));
    assert!(!msg.user.is_empty());
    assert_eq!(
        last(&params, b"database"),
        msg.database.as_deref().map(str::as_bytes)
    );
    assert_eq!(
        last(&params, b"application_name"),
        msg.application_name.as_deref().map(str::as_bytes)
    );
    // The rewrite for another user (no NUL: configuration refuses one).
    let user = if new_user.is_empty() {
        "iam_user"
    } else {
        new_user
    };
    let rewritten = msg.with_user(user);
    assert_eq!(rewritten.user, user);
    assert_eq!(rewritten.version, msg.version);
    assert_eq!(rewritten.database, msg.database);
    assert_eq!(rewritten.application_name, msg.application_name);
    let expected: Vec<(&[u8], &[u8])> = params
        .iter()
        .map(|&(n, v)| (n, if n == b"user" { user.as_bytes() } else { v }))
        .collect();
    assert_eq!(
        parameters(&rewritten.raw[8..]),
        expected,
        "only the user changed"
    );
    assert_eq!(
        declared(&rewritten.raw),
        Some(rewritten.raw.len()),
        "length prefix"
    );
    let mut again = BytesMut::from(&rewritten.raw[..]);
    match decode_startup(&mut again) {
        Ok(Some(StartupPacket::Startup(m))) => assert_eq!(m, rewritten),
        Err(StartupError::BadLength(n)) => assert!(n > *STARTUP_PACKET_LENGTHS.end()),
        other => panic!("the rewrite for {user:?} does not decode: {other:?}"),
    }
    // With one user parameter, rewriting to the same user is the identity.
    if params.iter().filter(|(n, _)| *n == b"user").count() == 1 {
        assert_eq!(msg.with_user(&msg.user).raw, msg.raw);
    }
}

/// Decodes typed messages one after another, as the authentication relay does.
fn message_stream(data: &[u8], max: usize) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        let stream = &data[data.len() - before..];
        match decode_message(&mut buf, max) {
            Ok(None) => {
                assert_eq!(buf.len(), before);
                if before >= 5 {
                    let len = declared(&stream[1..]).unwrap_or(0);
                    assert!((4..=max).contains(&len) && before < 1 + len);
                }
                return;
            }
            Err(pg::MessageError::BadLength { tag, len }) => {
                assert_eq!(tag, stream[0]);
                assert_eq!(Some(len), declared(&stream[1..]));
                assert!(len < 4 || len > max);
                return;
            }
            Ok(Some(msg)) => {
                let used = before - buf.len();
                let mut out = BytesMut::new();
                msg.encode(&mut out);
                assert_eq!(&out[..], &stream[..used], "message re-encodes");
                check_message(&msg);
            }
        }
    }
}

/// What the authentication relay reads out of a server message.
pub fn check_message(msg: &Message) {
    let body = &msg.body[..];
    let code = pg::auth_code(msg);
    if msg.tag == pg::tag::AUTHENTICATION && body.len() >= 4 {
        assert_eq!(
            code,
            Some(u32::from_be_bytes([body[0], body[1], body[2], body[3]]))
        );
    } else {
        assert_eq!(code, None);
    }
    if let Some(code) = code {
        assert!(!pg::auth_name(code).is_empty());
        if code == auth::SASL {
            check_strip(msg);
        }
    }
    match pg::backend_key(msg) {
        Some(key) => {
            assert_eq!(msg.tag, pg::tag::BACKEND_KEY_DATA);
            assert!((8..=4 + pg::MAX_CANCEL_SECRET_LEN).contains(&body.len()));
            let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            assert_eq!(key.pid(), pid);
            let request = key.cancel_request();
            assert_eq!(&request[8..], body, "the key is the message body");
        }
        None => assert!(
            msg.tag != pg::tag::BACKEND_KEY_DATA
                || !(8..=4 + pg::MAX_CANCEL_SECRET_LEN).contains(&body.len())
        ),
    }
    // error_fields reads `code value NUL` pairs up to a zero code (or an
    // unterminated value); read independently, the same pairs.
    let mut expected = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        let Some(end) = tail.iter().position(|&b| b == 0) else {
            break;
        };
        if code == 0 {
            break;
        }
        expected.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = &tail[end + 1..];
    }
    assert_eq!(pg::error_fields(msg), expected);
}

/// The mechanism list, read independently: `Int32 code, names..., NUL`.
fn mechanisms(body: &[u8]) -> Option<Vec<&[u8]>> {
    let list = body.get(4..)?;
    let list = list.strip_suffix(&[0])?;
    // Names are NUL-terminated; the list's own NUL was stripped above.
    let names = list.strip_suffix(&[0])?;
    let names: Vec<&[u8]> = names.split(|&b| b == 0).collect();
    if names.iter().any(|n| n.is_empty()) {
        return None;
    }
    Some(names)
}

fn check_strip(msg: &Message) {
    let names = mechanisms(&msg.body);
    match pg::strip_channel_binding(msg) {
        Err(SaslError::Malformed) => assert_eq!(names, None, "a valid list refused"),
        Err(SaslError::OnlyChannelBinding(offered)) => {
            let names = names.expect("refused as -PLUS only, yet malformed");
            assert!(names.iter().all(|n| n.ends_with(b"-PLUS")));
            assert!(!offered.is_empty());
        }
        Ok(None) => {
            let names = names.expect("accepted a malformed list");
            assert!(names.iter().all(|n| !n.ends_with(b"-PLUS")));
        }
        Ok(Some(stripped)) => {
            let names = names.expect("rewrote a malformed list");
            let kept: Vec<&[u8]> = names
                .iter()
                .copied()
                .filter(|n| !n.ends_with(b"-PLUS"))
                .collect();
            assert!(!kept.is_empty() && kept.len() < names.len());
            assert_eq!(stripped.tag, pg::tag::AUTHENTICATION);
            assert_eq!(pg::auth_code(&stripped), Some(auth::SASL));
            assert_eq!(mechanisms(&stripped.body), Some(kept), "kept in order");
            assert_eq!(pg::strip_channel_binding(&stripped), Ok(None), "idempotent");
        }
    }
}

/// keyhole's own messages decode back to what was put in.
fn encoders(text: &str, extra: &[u8]) {
    let message = format!("{text}{}", String::from_utf8_lossy(extra));
    let sqlstate = text.get(..5).unwrap_or(pg::sqlstate::PROTOCOL_VIOLATION);
    let mut out = BytesMut::new();
    pg::encode_error_response(&mut out, sqlstate, &message);
    let msg = decode_message(&mut out, usize::MAX)
        .expect("valid")
        .expect("whole");
    assert!(out.is_empty());
    assert_eq!(msg.tag, pg::tag::ERROR_RESPONSE);
    let fields = pg::error_fields(&msg);
    let get = |c: u8| fields.iter().find(|(f, _)| *f == c).map(|(_, v)| v.clone());
    assert_eq!(get(b'S').as_deref(), Some("FATAL"));
    assert_eq!(get(b'C'), Some(sqlstate.replace('\0', "")));
    assert_eq!(get(b'M'), Some(message.replace('\0', "")));
    assert_eq!(fields.len(), 4);

    let password = text.replace('\0', "");
    let mut out = BytesMut::new();
    pg::encode_password_message(&mut out, &password);
    let msg = decode_message(&mut out, usize::MAX)
        .expect("valid")
        .expect("whole");
    assert_eq!(msg.tag, pg::tag::PASSWORD_MESSAGE);
    let mut expected = BytesMut::from(password.as_bytes());
    expected.put_u8(0);
    assert_eq!(&msg.body[..], &expected[..]);
}
