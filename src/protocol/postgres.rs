//! The Postgres protocol, as far as a proxy must understand it: the untyped
//! startup packets a client opens with, the typed messages of the
//! authentication phase, and the `ErrorResponse` keyhole answers with.
//!
//! Sources: PostgreSQL's protocol documentation ("Message Formats" and
//! "Message Flow"); see `REFERENCE.md` in the design notes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The server's cap on a startup packet's body, after its length word
/// (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// The lengths a server reads a startup packet of (the length word counts
/// itself): at least the word and a code, at most the cap after the word.
/// Any other length the server closes on without a word, and so does keyhole.
pub const STARTUP_PACKET_LENGTHS: std::ops::RangeInclusive<usize> = 8..=4 + MAX_STARTUP_PACKET_LEN;
/// Largest typed message accepted while keyhole itself reads the stream
/// (authentication and session start). After that the splice loop reads no
/// message boundaries at all.
pub const MAX_STARTUP_PHASE_MESSAGE_LEN: usize = 1 << 20;

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// The SSLRequest packet, as sent upstream.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// The first byte of a TLS handshake record: a client doing PG17 direct TLS.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The ALPN protocol a direct-TLS client must offer.
pub const ALPN: &[u8] = b"postgresql";
/// Longest secret a 3.2 CancelRequest may carry.
pub const MAX_CANCEL_SECRET_LEN: usize = 256;

/// A protocol version from a StartupMessage: major in the high 16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion(pub u32);

impl ProtocolVersion {
    pub const V3_0: ProtocolVersion = ProtocolVersion(3 << 16);
    pub const V3_2: ProtocolVersion = ProtocolVersion((3 << 16) | 2);
    pub fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub fn minor(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// The key a server hands out in BackendKeyData and a client presents in a
/// CancelRequest: the process id and the secret (4 bytes before protocol 3.2,
/// up to 256 after), kept together as the bytes on the wire.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CancelKey(Bytes);

impl CancelKey {
    pub fn from_wire(pid_and_secret: Bytes) -> CancelKey {
        CancelKey(pid_and_secret)
    }
    /// The process id (0 for a key too short to carry one).
    pub fn pid(&self) -> u32 {
        match self.0.get(..4) {
            Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
            _ => 0,
        }
    }
    /// The CancelRequest packet that presents this key.
    pub fn cancel_request(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(8 + self.0.len());
        out.put_u32(8 + self.0.len() as u32);
        out.put_u32(CANCEL_REQUEST_CODE);
        out.put_slice(&self.0);
        out
    }
}

/// Never print the secret: only the process id it belongs to.
impl std::fmt::Debug for CancelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancelKey(pid {}, secret redacted)", self.pid())
    }
}

/// What a client may open a connection (or a TLS session) with.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// A StartupMessage: kept whole for forwarding, with the parameters keyhole
/// reads out of it.
#[derive(Debug, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: ProtocolVersion,
    pub user: String,
    pub database: Option<String>,
    pub application_name: Option<String>,
    /// The packet as received, length prefix included.
    pub raw: Bytes,
}

/// Why a startup-phase packet is refused. Each kind is answered as
/// PostgreSQL answers it (`SessionError::answer` maps them): some with no
/// answer at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    /// A length word outside [`STARTUP_PACKET_LENGTHS`] (a typed message or
    /// text where a startup packet belongs reads as one): the server closes
    /// without a word.
    #[error("startup packet length {0} is out of range (8 to {max} bytes)", max = STARTUP_PACKET_LENGTHS.end())]
    BadLength(usize),
    /// A CancelRequest too short for a key or longer than a 3.2 key: the
    /// server closes without a word (it expects no answer either way).
    #[error("cancel request of invalid length {0} (16 to {max} bytes)", max = 8 + 4 + MAX_CANCEL_SECRET_LEN)]
    BadCancelLength(usize),
    /// Major version below 3: refused in the protocol-2 error format, which
    /// is what such a client reads. The text is the whole message.
    ///
    /// keyhole passes every 3.x on and the server behind it negotiates the
    /// minor; 3.2 (PostgreSQL 18) is the newest one keyhole reads messages of,
    /// so that is the range the message names.
    #[error("unsupported frontend protocol {0}: server supports {min} to {max}", min = ProtocolVersion::V3_0, max = ProtocolVersion::V3_2)]
    OldVersion(ProtocolVersion),
    /// Major version above 3, or a special code that is not one of the three
    /// requests (1234.5678-5680): refused as unsupported (0A000), with the
    /// same range as [`StartupError::OldVersion`].
    #[error("unsupported frontend protocol {0}: server supports {min} to {max}", min = ProtocolVersion::V3_0, max = ProtocolVersion::V3_2)]
    UnsupportedVersion(ProtocolVersion),
    /// No `user` parameter, or an empty one (28000).
    #[error("no user name in startup packet")]
    NoUser,
    /// The parameters are not pairs of C strings ending in one NUL exactly at
    /// the packet's end (08P01), or (keyhole's own check) a user, database or
    /// application name is not UTF-8.
    #[error("{0}")]
    Malformed(&'static str),
}

/// Decodes one startup-phase packet (no type byte: `Int32 len, Int32 code, body`).
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !STARTUP_PACKET_LENGTHS.contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let raw = buf.split_to(len).freeze();
    let code = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let body = raw.slice(8..);
    match code {
        // The server goes by the code alone: a body after it is ignored.
        SSL_REQUEST_CODE => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST_CODE => Ok(Some(StartupPacket::GssEncRequest)),
        CANCEL_REQUEST_CODE => {
            // Int32 pid, then a secret of 4 (3.0) to 256 (3.2) bytes. (A 3.0
            // server takes exactly 4; keyhole also fronts 3.2 servers.)
            if body.len() < 8 || body.len() > 4 + MAX_CANCEL_SECRET_LEN {
                return Err(StartupError::BadCancelLength(len));
            }
            Ok(Some(StartupPacket::Cancel(CancelKey(body))))
        }
        version if version >> 16 == 3 => decode_startup_message(ProtocolVersion(version), raw),
        version if version >> 16 < 3 => Err(StartupError::OldVersion(ProtocolVersion(version))),
        // 4.0 and up, and unknown special codes (major 1234) alike.
        version => Err(StartupError::UnsupportedVersion(ProtocolVersion(version))),
    }
}

fn decode_startup_message(
    version: ProtocolVersion,
    raw: Bytes,
) -> Result<Option<StartupPacket>, StartupError> {
    let mut user = None;
    let mut database = None;
    let mut application_name = None;
    let mut rest = &raw[8..];
    loop {
        let name = take_cstr(&mut rest).ok_or(StartupError::Malformed(
            "startup parameters are not NUL-terminated",
        ))?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut rest)
            .ok_or(StartupError::Malformed("startup parameter without a value"))?;
        let text = || {
            std::str::from_utf8(value)
                .map(str::to_owned)
                .map_err(|_| StartupError::Malformed("startup parameter is not UTF-8"))
        };
        match name {
            b"user" => user = Some(text()?),
            b"database" => database = Some(text()?),
            b"application_name" => application_name = Some(text()?),
            _ => {}
        }
    }
    if !rest.is_empty() {
        return Err(StartupError::Malformed(
            "bytes after the startup parameters",
        ));
    }
    let user = user.filter(|u| !u.is_empty()).ok_or(StartupError::NoUser)?;
    Ok(Some(StartupPacket::Startup(StartupMessage {
        version,
        user,
        database,
        application_name,
        raw,
    })))
}

impl StartupMessage {
    /// The same StartupMessage for another database user: every other
    /// parameter, and their order, unchanged.
    pub fn with_user(&self, user: &str) -> StartupMessage {
        let mut body = BytesMut::with_capacity(self.raw.len() + user.len());
        body.put_u32(0); // length, patched below
        body.put_u32(self.version.0);
        let mut rest = &self.raw[8..];
        // The packet was validated on decode: pairs of C strings, then NUL.
        while let Some(name) = take_cstr(&mut rest).filter(|n| !n.is_empty()) {
            let value = take_cstr(&mut rest).unwrap_or_default();
            body.put_slice(name);
            body.put_u8(0);
            body.put_slice(if name == b"user" {
                user.as_bytes()
            } else {
                value
            });
            body.put_u8(0);
        }
        body.put_u8(0);
        let len = body.len() as u32;
        body[..4].copy_from_slice(&len.to_be_bytes());
        StartupMessage {
            version: self.version,
            user: user.to_owned(),
            database: self.database.clone(),
            application_name: self.application_name.clone(),
            raw: body.freeze(),
        }
    }
}

/// A PasswordMessage carrying `password` (the answer to
/// AuthenticationCleartextPassword).
pub fn encode_password_message(out: &mut BytesMut, password: &str) {
    out.reserve(6 + password.len());
    out.put_u8(tag::PASSWORD_MESSAGE);
    out.put_u32(4 + password.len() as u32 + 1);
    out.put_slice(password.as_bytes());
    out.put_u8(0);
}

/// A name for an authentication request, for messages.
pub fn auth_name(code: u32) -> &'static str {
    match code {
        auth::OK => "no authentication",
        auth::KERBEROS_V5 => "Kerberos V5",
        auth::CLEARTEXT_PASSWORD => "a cleartext password",
        auth::MD5_PASSWORD => "MD5 password authentication",
        auth::GSS | auth::GSS_CONTINUE => "GSSAPI",
        auth::SSPI => "SSPI",
        auth::SASL | auth::SASL_CONTINUE | auth::SASL_FINAL => "SASL (SCRAM) authentication",
        _ => "an unknown authentication method",
    }
}

fn take_cstr<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = rest.iter().position(|&b| b == 0)?;
    let s = &rest[..end];
    *rest = &rest[end + 1..];
    Some(s)
}

/// A typed message (`Byte1 tag, Int32 len, body`), body without the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

impl Message {
    /// The message as it goes on the wire.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.put_u8(self.tag);
        out.put_u32(4 + self.body.len() as u32);
        out.put_slice(&self.body);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message '{}' has invalid length {len}", char::from(*.tag))]
    BadLength { tag: u8, len: usize },
}

/// Decodes one typed message, refusing lengths over `max`.
pub fn decode_message(buf: &mut BytesMut, max: usize) -> Result<Option<Message>, MessageError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 || len > max {
        return Err(MessageError::BadLength { tag, len });
    }
    if buf.len() < 1 + len {
        return Ok(None);
    }
    let mut frame = buf.split_to(1 + len);
    frame.advance(5);
    Ok(Some(Message {
        tag,
        body: frame.freeze(),
    }))
}

/// Backend message tags keyhole acts on during session start.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const PASSWORD_MESSAGE: u8 = b'p';
}

/// Authentication request codes (the Int32 after an `R` tag).
pub mod auth {
    pub const OK: u32 = 0;
    pub const KERBEROS_V5: u32 = 2;
    pub const CLEARTEXT_PASSWORD: u32 = 3;
    pub const MD5_PASSWORD: u32 = 5;
    pub const GSS: u32 = 7;
    pub const GSS_CONTINUE: u32 = 8;
    pub const SSPI: u32 = 9;
    pub const SASL: u32 = 10;
    pub const SASL_CONTINUE: u32 = 11;
    pub const SASL_FINAL: u32 = 12;
}

/// The request code of an `R` message.
pub fn auth_code(msg: &Message) -> Option<u32> {
    (msg.tag == tag::AUTHENTICATION && msg.body.len() >= 4)
        .then(|| u32::from_be_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]))
}

/// Does the server wait for a client message after this `R` message?
pub fn auth_expects_reply(code: u32) -> bool {
    matches!(
        code,
        auth::CLEARTEXT_PASSWORD
            | auth::MD5_PASSWORD
            | auth::GSS
            | auth::GSS_CONTINUE
            | auth::SSPI
            | auth::SASL
            | auth::SASL_CONTINUE
    )
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    #[error("malformed AuthenticationSASL mechanism list")]
    Malformed,
    #[error("the server offers only channel-bound SASL mechanisms ({0}), which cannot work through a proxy")]
    OnlyChannelBinding(String),
}

/// Rewrites an AuthenticationSASL message without the `-PLUS` (channel
/// binding) mechanisms.
///
/// Channel binding ties SCRAM to the TLS session the *server* sees: keyhole's
/// upstream session. The client's leg is a different session (or plain
/// text), so a `-PLUS` exchange can never succeed, and libpq refuses a
/// `-PLUS` offer outright on a connection it did not encrypt itself.
/// Returns `None` when nothing needed removing.
pub fn strip_channel_binding(msg: &Message) -> Result<Option<Message>, SaslError> {
    let body = &msg.body[..];
    if body.len() < 5 || body[body.len() - 1] != 0 {
        return Err(SaslError::Malformed);
    }
    let mut names: Vec<&[u8]> = Vec::new();
    let mut rest = &body[4..];
    loop {
        let name = take_cstr(&mut rest).ok_or(SaslError::Malformed)?;
        if name.is_empty() {
            break;
        }
        names.push(name);
    }
    if !rest.is_empty() || names.is_empty() {
        return Err(SaslError::Malformed);
    }
    let kept: Vec<&[u8]> = names
        .iter()
        .copied()
        .filter(|n| !n.ends_with(b"-PLUS"))
        .collect();
    if kept.len() == names.len() {
        return Ok(None);
    }
    if kept.is_empty() {
        let offered = names
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(SaslError::OnlyChannelBinding(offered));
    }
    let mut out = BytesMut::with_capacity(body.len());
    out.put_u32(auth::SASL);
    for name in kept {
        out.put_slice(name);
        out.put_u8(0);
    }
    out.put_u8(0);
    Ok(Some(Message {
        tag: tag::AUTHENTICATION,
        body: out.freeze(),
    }))
}

/// The key carried by a BackendKeyData message.
pub fn backend_key(msg: &Message) -> Option<CancelKey> {
    let ok = msg.tag == tag::BACKEND_KEY_DATA
        && (8..=4 + MAX_CANCEL_SECRET_LEN).contains(&msg.body.len());
    ok.then(|| CancelKey(msg.body.clone()))
}

/// SQLSTATE codes keyhole reports (PostgreSQL's errcodes.txt).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const UNABLE_TO_CONNECT: &str = "08001";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
}

/// Appends a FATAL ErrorResponse. The message is what the user reads, so it
/// names what failed and, where it can, what to check.
pub fn encode_error_response(out: &mut BytesMut, sqlstate: &str, message: &str) {
    let fields: [(u8, &str); 4] = [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ];
    let body_len: usize = fields
        .iter()
        .map(|(_, v)| 2 + v.bytes().filter(|&b| b != 0).count())
        .sum::<usize>()
        + 1;
    out.reserve(5 + body_len);
    out.put_u8(tag::ERROR_RESPONSE);
    out.put_u32(4 + body_len as u32);
    for (code, value) in fields {
        out.put_u8(code);
        // A NUL inside a field would end it early; messages never carry one.
        out.extend(value.bytes().filter(|&b| b != 0));
        out.put_u8(0);
    }
    out.put_u8(0);
}

/// Appends a FATAL error in the protocol-2 format, for a client that opened
/// with a 2.x startup packet: `E`, then the text (severity first, a newline
/// last) as one C string, with no length word and no fields.
pub fn encode_v2_fatal(out: &mut BytesMut, message: &str) {
    out.reserve(11 + message.len());
    out.put_u8(tag::ERROR_RESPONSE);
    out.put_slice(b"FATAL:  ");
    out.extend(message.bytes().filter(|&b| b != 0));
    out.put_slice(b"\n\0");
}

/// The fields of an ErrorResponse, for logs and tests.
pub fn error_fields(msg: &Message) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = &msg.body[..];
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        rest = tail;
        match take_cstr(&mut rest) {
            Some(v) => out.push((code, String::from_utf8_lossy(v).into_owned())),
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(version: u32, params: &[(&str, &str)]) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u32(version);
        for (k, v) in params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut out = BytesMut::new();
        out.put_u32(4 + body.len() as u32);
        out.put_slice(&body);
        out
    }

    #[test]
    fn a_startup_rewritten_for_another_user_keeps_every_other_parameter_in_order() {
        let original = startup(
            3 << 16,
            &[
                ("database", "shop"),
                ("user", "app"),
                ("application_name", "psql"),
            ],
        );
        let Ok(Some(StartupPacket::Startup(msg))) = decode_startup(&mut original.clone()) else {
            panic!("decodes")
        };
        let rewritten = msg.with_user("iam_reader");
        let expected = startup(
            3 << 16,
            &[
                ("database", "shop"),
                ("user", "iam_reader"),
                ("application_name", "psql"),
            ],
        );
        assert_eq!(&rewritten.raw[..], &expected[..]);
        assert_eq!(rewritten.user, "iam_reader");
        assert_eq!(rewritten.database.as_deref(), Some("shop"));
        let Ok(Some(StartupPacket::Startup(again))) =
            decode_startup(&mut BytesMut::from(&rewritten.raw[..]))
        else {
            panic!("the rewrite decodes")
        };
        assert_eq!(again, rewritten);
    }

    #[test]
    fn a_password_message_is_nul_terminated_and_counted() {
        let mut out = BytesMut::new();
        encode_password_message(&mut out, "tok");
        assert_eq!(&out[..], b"p\0\0\0\x08tok\0");
    }

    #[test]
    fn ssl_request_is_the_documented_code() {
        let mut buf = BytesMut::from(&SSL_REQUEST[..]);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::SslRequest))
        );
        assert!(buf.is_empty());
        assert_eq!(SSL_REQUEST_CODE, (1234 << 16) | 5679);
    }

    #[test]
    fn an_encryption_request_with_a_body_is_still_one() {
        for (code, expected) in [
            (SSL_REQUEST_CODE, StartupPacket::SslRequest),
            (GSSENC_REQUEST_CODE, StartupPacket::GssEncRequest),
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(12);
            buf.put_u32(code);
            buf.put_u32(0);
            buf.put_slice(b"next");
            assert_eq!(decode_startup(&mut buf), Ok(Some(expected)));
            assert_eq!(&buf[..], b"next", "the body is consumed with the request");
        }
    }

    #[test]
    fn gssenc_request_decodes() {
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30][..]);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::GssEncRequest))
        );
    }

    #[test]
    fn partial_packets_wait_for_more() {
        let full = startup(ProtocolVersion::V3_0.0, &[("user", "alice")]);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decode_startup(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
        }
    }

    #[test]
    fn startup_3_0_and_3_2_keep_raw_bytes_and_read_params() {
        for version in [ProtocolVersion::V3_0, ProtocolVersion::V3_2] {
            let bytes = startup(
                version.0,
                &[
                    ("user", "alice"),
                    ("database", "db1"),
                    ("application_name", "psql"),
                    ("options", "-c x=1"),
                ],
            );
            let mut buf = bytes.clone();
            buf.put_slice(b"next");
            let Ok(Some(StartupPacket::Startup(m))) = decode_startup(&mut buf) else {
                panic!("not a startup message");
            };
            assert_eq!(m.version, version);
            assert_eq!(m.user, "alice");
            assert_eq!(m.database.as_deref(), Some("db1"));
            assert_eq!(m.application_name.as_deref(), Some("psql"));
            assert_eq!(&m.raw[..], &bytes[..]);
            assert_eq!(&buf[..], b"next");
        }
    }

    #[test]
    fn startup_without_user_or_with_an_empty_one_is_refused() {
        for params in [&[("database", "db")][..], &[("user", "")]] {
            let mut buf = startup(ProtocolVersion::V3_0.0, params);
            assert_eq!(decode_startup(&mut buf), Err(StartupError::NoUser));
        }
    }

    #[test]
    fn every_parameter_layout_error_is_malformed() {
        let packet = |body: &[u8]| {
            let mut buf = BytesMut::new();
            buf.put_u32(8 + body.len() as u32);
            buf.put_u32(ProtocolVersion::V3_0.0);
            buf.put_slice(body);
            buf
        };
        for body in [
            &b""[..],             // a bare version, no terminator
            b"user\0",            // a name, then the packet ends
            b"user\0\0",          // a name and an empty value, no terminator
            b"user\0u\0\0junk\0", // bytes after the terminator
        ] {
            let mut buf = packet(body);
            assert!(
                matches!(decode_startup(&mut buf), Err(StartupError::Malformed(_))),
                "{body:?}"
            );
            assert!(buf.is_empty(), "the packet is consumed: {body:?}");
        }
    }

    #[test]
    fn startup_with_unterminated_params_is_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32(4 + 4 + 4);
        buf.put_u32(ProtocolVersion::V3_0.0);
        buf.put_slice(b"user");
        assert!(matches!(
            decode_startup(&mut buf),
            Err(StartupError::Malformed(_))
        ));
    }

    #[test]
    fn lengths_out_of_the_servers_range_are_refused_from_the_length_word_alone() {
        for (bytes, len) in [
            (&[0, 0, 0, 0][..], 0),
            (&[0, 0, 0, 4], 4),
            (&[0, 0, 0, 7], 7),
            (&[0, 0, 0x27, 0x15], 10_005),
            (&[0x80, 0, 0, 0], 1 << 31),
            // Terminate and Query, typed messages sent before any startup.
            (b"X\0\0\0\x04", 0x5800_0000),
            (b"Q\0\0\0\x0dselect 1\0", 0x5100_0000),
            // Text where a length belongs ("GET ").
            (b"GET / HTTP/1.1\r\n", 0x4745_5420),
        ] {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(
                decode_startup(&mut buf),
                Err(StartupError::BadLength(len)),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn the_longest_startup_packet_the_server_reads_is_10004_bytes() {
        let short = startup(ProtocolVersion::V3_0.0, &[("user", "u"), ("x", "")]);
        let padding = "a".repeat(10_004 - short.len());
        let longest = startup(ProtocolVersion::V3_0.0, &[("user", "u"), ("x", &padding)]);
        assert_eq!(longest.len(), 10_004);
        assert_eq!(&longest[..4], &[0, 0, 0x27, 0x14]);
        let Ok(Some(StartupPacket::Startup(m))) = decode_startup(&mut longest.clone()) else {
            panic!("decodes")
        };
        assert_eq!(&m.raw[..], &longest[..]);
    }

    #[test]
    fn old_new_and_unknown_versions_are_refused_as_the_server_refuses_them() {
        let refusal = |version: u32| decode_startup(&mut startup(version, &[("user", "u")]));
        assert_eq!(
            refusal(2 << 16),
            Err(StartupError::OldVersion(ProtocolVersion(2 << 16)))
        );
        for version in [4 << 16, (1234 << 16) | 5681] {
            assert_eq!(
                refusal(version),
                Err(StartupError::UnsupportedVersion(ProtocolVersion(version)))
            );
        }
        // A newer 3.x minor goes on: the server negotiates it down.
        assert!(matches!(
            refusal((3 << 16) | 9),
            Ok(Some(StartupPacket::Startup(_)))
        ));
        assert_eq!(
            StartupError::UnsupportedVersion(ProtocolVersion((1234 << 16) | 5681)).to_string(),
            "unsupported frontend protocol 1234.5681: server supports 3.0 to 3.2"
        );
    }

    #[test]
    fn a_protocol_2_refusal_is_in_the_protocol_2_format() {
        let mut out = BytesMut::new();
        let text = StartupError::OldVersion(ProtocolVersion(2 << 16)).to_string();
        encode_v2_fatal(&mut out, &text);
        assert_eq!(
            &out[..],
            &b"EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.2\n\0"[..]
        );
    }

    #[test]
    fn cancel_requests_of_other_lengths_are_refused_by_length() {
        for total in [12usize, 15, 8 + 4 + 257] {
            let mut buf = BytesMut::new();
            buf.put_u32(total as u32);
            buf.put_u32(CANCEL_REQUEST_CODE);
            buf.put_bytes(7, total - 8);
            assert_eq!(
                decode_startup(&mut buf),
                Err(StartupError::BadCancelLength(total))
            );
        }
        // 20 bytes: a 3.2 key with an 8-byte secret (a 3.0 server refuses it).
        let mut buf = BytesMut::new();
        buf.put_u32(20);
        buf.put_u32(CANCEL_REQUEST_CODE);
        buf.put_bytes(7, 12);
        assert!(matches!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::Cancel(_)))
        ));
    }

    #[test]
    fn cancel_request_keys_of_3_0_and_3_2_sizes() {
        let key = CancelKey::from_wire(Bytes::from_static(&[0, 0, 0x30, 0x39, 1, 2, 3, 4]));
        assert_eq!(key.pid(), 12345);
        let wire = key.cancel_request();
        assert_eq!(&wire[..8], &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]);
        let mut buf = wire.clone();
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::Cancel(key)))
        );

        let long = CancelKey::from_wire(Bytes::from(vec![7u8; 4 + 256]));
        let mut buf = long.cancel_request();
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::Cancel(long)))
        );

        let mut too_long = CancelKey::from_wire(Bytes::from(vec![7u8; 4 + 257])).cancel_request();
        assert!(decode_startup(&mut too_long).is_err());
    }

    #[test]
    fn cancel_key_debug_hides_the_secret() {
        let key = CancelKey::from_wire(Bytes::from_static(&[0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef]));
        let shown = format!("{key:?}");
        assert!(shown.contains("pid 9"));
        // The secret 0xdeadbeef in any form a formatter would print it.
        for form in ["deadbeef", "3735928559", "222, 173, 190, 239", "de, ad"] {
            assert!(!shown.to_lowercase().contains(form), "{shown}");
        }
    }

    fn sasl(mechs: &[&str]) -> Message {
        let mut body = BytesMut::new();
        body.put_u32(auth::SASL);
        for m in mechs {
            body.put_slice(m.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        Message {
            tag: b'R',
            body: body.freeze(),
        }
    }

    #[test]
    fn channel_binding_is_stripped_from_sasl_offers() {
        let rewritten = strip_channel_binding(&sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
            .expect("valid")
            .expect("changed");
        assert_eq!(rewritten, sasl(&["SCRAM-SHA-256"]));
        assert_eq!(strip_channel_binding(&sasl(&["SCRAM-SHA-256"])), Ok(None));
        assert!(matches!(
            strip_channel_binding(&sasl(&["SCRAM-SHA-256-PLUS"])),
            Err(SaslError::OnlyChannelBinding(_))
        ));
        let broken = Message {
            tag: b'R',
            body: Bytes::from_static(&[0, 0, 0, 10, b'X']),
        };
        assert_eq!(strip_channel_binding(&broken), Err(SaslError::Malformed));
    }

    #[test]
    fn typed_messages_are_bounded_and_framed() {
        let mut buf = BytesMut::from(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z'][..]);
        let msg = decode_message(&mut buf, 1024)
            .expect("valid")
            .expect("whole");
        assert_eq!(auth_code(&msg), Some(auth::OK));
        assert_eq!(&buf[..], b"Z");
        let mut huge = BytesMut::from(&[b'D', 0x7f, 0, 0, 0][..]);
        assert!(decode_message(&mut huge, 1024).is_err());
        let mut short = BytesMut::from(&[b'D', 0, 0, 0, 3][..]);
        assert!(decode_message(&mut short, 1024).is_err());
    }

    #[test]
    fn backend_key_data_yields_a_cancel_key() {
        let msg = Message {
            tag: b'K',
            body: Bytes::from_static(&[0, 0, 1, 0, 9, 9, 9, 9]),
        };
        assert_eq!(backend_key(&msg).map(|k| k.pid()), Some(256));
        let short = Message {
            tag: b'K',
            body: Bytes::from_static(&[0, 0, 1]),
        };
        assert_eq!(backend_key(&short), None);
    }

    #[test]
    fn error_response_round_trips_byte_for_byte() {
        let mut out = BytesMut::new();
        encode_error_response(&mut out, "08001", "upstream refused TLS");
        let expected: &[u8] = b"E\0\0\0\x30SFATAL\0VFATAL\0C08001\0Mupstream refused TLS\0\0";
        assert_eq!(&out[..], expected);
        let msg = decode_message(&mut out, 1024)
            .expect("valid")
            .expect("whole");
        let fields = error_fields(&msg);
        assert!(fields.contains(&(b'C', "08001".into())));
        assert!(fields.contains(&(b'M', "upstream refused TLS".into())));
    }
}
