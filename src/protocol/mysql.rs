//! The MySQL/MariaDB connection phase, as far as a proxy must understand it:
//! packet framing, the server's HandshakeV10, the client's SSLRequest and
//! HandshakeResponse41, OK/ERR, and the ERR packet keyhole answers with.
//!
//! Source: the MySQL client/server protocol documentation
//! (page_protocol_connection_phase*); see `REFERENCE.md` in the design notes.

use bytes::{BufMut, Bytes, BytesMut};

/// Largest payload of one packet (16 MiB - 1).
pub const MAX_PAYLOAD: usize = 0xff_ffff;
/// Largest packet keyhole reads itself during the connection phase. Real
/// handshakes are a few hundred bytes; connection attributes are capped by
/// servers at 64 KiB.
pub const MAX_HANDSHAKE_PAYLOAD: usize = 256 * 1024;
/// The SSLRequest packet's payload: the first 32 bytes of a HandshakeResponse41.
pub const SSL_REQUEST_LEN: usize = 32;

/// Capability flags (`CLIENT_*`).
pub mod caps {
    pub const LONG_PASSWORD: u32 = 1;
    pub const FOUND_ROWS: u32 = 1 << 1;
    pub const LONG_FLAG: u32 = 1 << 2;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const COMPRESS: u32 = 1 << 5;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const INTERACTIVE: u32 = 1 << 10;
    pub const SSL: u32 = 1 << 11;
    pub const TRANSACTIONS: u32 = 1 << 13;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const MULTI_RESULTS: u32 = 1 << 17;
    pub const PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const SESSION_TRACK: u32 = 1 << 23;
    pub const DEPRECATE_EOF: u32 = 1 << 24;
    pub const ZSTD_COMPRESSION: u32 = 1 << 26;
}

/// The first byte of a server packet during authentication.
pub mod reply {
    pub const OK: u8 = 0x00;
    pub const AUTH_MORE_DATA: u8 = 0x01;
    pub const AUTH_SWITCH: u8 = 0xfe;
    pub const ERR: u8 = 0xff;
}

/// Error codes keyhole answers with: server codes only. MariaDB Connector/C
/// (the `mariadb` CLI's library) refuses an ERR that carries one of its own
/// client codes (2001-2061, 5001-5026) as a malformed packet, and its user
/// would never learn why the connection failed.
pub mod code {
    /// ER_CON_COUNT_ERROR, "Too many connections".
    pub const TOO_MANY_CONNECTIONS: u16 = 1040;
    /// ER_HANDSHAKE_ERROR, "Bad handshake".
    pub const BAD_HANDSHAKE: u16 = 1043;
    /// ER_CONNECT_TO_FOREIGN_DATA_SOURCE: a server could not reach another.
    pub const CANNOT_CONNECT: u16 = 1429;
    /// ER_NET_READ_ERROR, "Got an error reading communication packets".
    pub const SERVER_LOST: u16 = 1158;
    /// ER_NET_PACKET_TOO_LARGE: a packet over the reader's limit (the
    /// server's `max_allowed_packet`, keyhole's handshake cap).
    pub const PACKET_TOO_LARGE: u16 = 1153;
    /// ER_NET_PACKETS_OUT_OF_ORDER: a packet with the wrong sequence id.
    pub const PACKETS_OUT_OF_ORDER: u16 = 1156;
    /// ER_SECURE_TRANSPORT_REQUIRED: no going on without verified TLS.
    pub const TLS_ERROR: u16 = 3159;
    /// ER_ACCESS_DENIED_ERROR: the login cannot succeed as configured.
    pub const ACCESS_DENIED: u16 = 1045;
    /// ER_HOST_NOT_PRIVILEGED: this client address may not connect.
    pub const HOST_NOT_ALLOWED: u16 = 1130;

    /// Codes client libraries keep for themselves.
    pub const CLIENT_RANGES: [std::ops::RangeInclusive<u16>; 2] = [2000..=2999, 5000..=5999];
}

/// A packet: sequence id and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub seq: u8,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet of {len} bytes is larger than the {max} allowed during the handshake")]
    TooLarge { len: usize, max: usize },
    #[error("packet out of order: sequence id {seq}, expected {expected}")]
    OutOfOrder { seq: u8, expected: u8 },
}

/// Decodes one packet, refusing payloads over `max`.
pub fn decode_packet(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, PacketError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16;
    if len > max {
        return Err(PacketError::TooLarge { len, max });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let seq = buf[3];
    let mut frame = buf.split_to(4 + len);
    let payload = frame.split_off(4).freeze();
    Ok(Some(Packet { seq, payload }))
}

/// [`decode_packet`] for a reader that knows which sequence id comes next
/// (the client's packets before the login): like a MySQL server, it refuses
/// a packet out of order from its header, before it looks at its length.
pub fn decode_packet_in_sequence(
    buf: &mut BytesMut,
    max: usize,
    expected: u8,
) -> Result<Option<Packet>, PacketError> {
    match buf.get(3) {
        Some(&seq) if seq != expected => Err(PacketError::OutOfOrder { seq, expected }),
        _ => decode_packet(buf, max),
    }
}

/// Appends a packet with `payload` (at most [`MAX_PAYLOAD`] bytes).
pub fn encode_packet(out: &mut BytesMut, seq: u8, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let len = payload.len() as u32;
    out.reserve(4 + payload.len());
    out.put_slice(&len.to_le_bytes()[..3]);
    out.put_u8(seq);
    out.put_slice(payload);
}

/// Appends an ERR packet (protocol 4.1 form, with SQLSTATE). Messages are
/// keyhole's own, a line long.
pub fn encode_err(out: &mut BytesMut, seq: u8, code: u16, sqlstate: &str, message: &str) {
    encode_err_as(out, seq, code, Some(sqlstate), message);
}

/// Appends an ERR packet; `sqlstate` `None` is the protocol 4.0 form (no
/// `#` and SQLSTATE), which servers send to a client that does not speak
/// 4.1 (see [`client_speaks_41`]).
pub fn encode_err_as(
    out: &mut BytesMut,
    seq: u8,
    code: u16,
    sqlstate: Option<&str>,
    message: &str,
) {
    let mut payload = BytesMut::with_capacity(9 + message.len());
    payload.put_u8(reply::ERR);
    payload.put_u16_le(code);
    if let Some(sqlstate) = sqlstate {
        payload.put_u8(b'#');
        let mut state = [b'H', b'Y', b'0', b'0', b'0'];
        for (dst, src) in state.iter_mut().zip(sqlstate.bytes()) {
            *dst = src;
        }
        payload.put_slice(&state);
    }
    payload.put_slice(message.as_bytes());
    encode_packet(out, seq, &payload);
}

/// Whether a client whose first packet after the greeting is `payload`
/// reads ERR packets with a SQLSTATE: MariaDB and MySQL take the client's
/// capabilities from the packet's first two bytes and leave the SQLSTATE
/// out for a client without `CLIENT_PROTOCOL_41`; with fewer than two bytes
/// nothing is known and the 4.1 form is used.
pub fn client_speaks_41(payload: &[u8]) -> bool {
    match payload {
        [low, high, ..] => u32::from(u16::from_le_bytes([*low, *high])) & caps::PROTOCOL_41 != 0,
        _ => true,
    }
}

/// The code, SQLSTATE and message of an ERR payload.
pub fn parse_err(payload: &[u8]) -> Option<(u16, String, String)> {
    if payload.first() != Some(&reply::ERR) || payload.len() < 3 {
        return None;
    }
    let code = u16::from_le_bytes([payload[1], payload[2]]);
    let rest = &payload[3..];
    let (state, message) = match rest.split_first() {
        Some((b'#', tail)) if tail.len() >= 5 => {
            (String::from_utf8_lossy(&tail[..5]).into_owned(), &tail[5..])
        }
        _ => (String::new(), rest),
    };
    Some((code, state, String::from_utf8_lossy(message).into_owned()))
}

/// The server's HandshakeV10, with where its capability bytes sit so that a
/// copy can be rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub server_version: String,
    /// The server's id for this session (what `KILL QUERY` names).
    pub connection_id: u32,
    pub capabilities: u32,
    pub charset: u8,
    /// MariaDB's extended capabilities (reserved bytes 6..10), when the
    /// server is MariaDB (it clears `LONG_PASSWORD` to say so).
    pub mariadb_capabilities: Option<u32>,
    /// Offset of the low capability bytes; the high ones sit 5 bytes later.
    caps_low_at: usize,
    pub raw: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GreetingError {
    #[error("the server's greeting is protocol version {0}, not 10")]
    Version(u8),
    #[error("the server's greeting is truncated")]
    Truncated,
    #[error("the server version in its greeting is not a version number (not shown: the greeting comes before TLS)")]
    ServerVersion,
}

/// The longest server version keyhole passes on (real ones are under 64
/// bytes: `5.5.5-10.11.6-MariaDB-0+deb12u1`, `8.0.31-google`).
const MAX_SERVER_VERSION: usize = 255;

/// Whether `version` looks like a server version: a digit first, then
/// printable ASCII only. The greeting comes before TLS, so anything on the
/// path can write it: keyhole passes on no control character, no escape
/// sequence and no non-ASCII text for a client to print.
fn plausible_version(version: &[u8]) -> bool {
    version.first().is_some_and(u8::is_ascii_digit)
        && version.len() <= MAX_SERVER_VERSION
        && version.iter().all(|b| (0x20..0x7f).contains(b))
}

/// Parses HandshakeV10.
pub fn parse_greeting(payload: &Bytes) -> Result<Greeting, GreetingError> {
    let p = &payload[..];
    match p.first() {
        Some(10) => {}
        Some(&v) => return Err(GreetingError::Version(v)),
        None => return Err(GreetingError::Truncated),
    }
    let nul = p[1..]
        .iter()
        .position(|&b| b == 0)
        .ok_or(GreetingError::Truncated)?;
    let version = &p[1..1 + nul];
    if !plausible_version(version) {
        return Err(GreetingError::ServerVersion);
    }
    let server_version = String::from_utf8_lossy(version).into_owned();
    // version NUL, thread id (4), auth data part 1 (8), filler (1)
    let caps_low_at = 1 + nul + 1 + 4 + 8 + 1;
    // caps low (2), charset (1), status (2), caps high (2), auth data len (1), reserved (10)
    if p.len() < caps_low_at + 2 + 1 + 2 + 2 + 1 + 10 {
        return Err(GreetingError::Truncated);
    }
    let id_at = 1 + nul + 1;
    let connection_id = u32::from_le_bytes([p[id_at], p[id_at + 1], p[id_at + 2], p[id_at + 3]]);
    let low = u16::from_le_bytes([p[caps_low_at], p[caps_low_at + 1]]);
    let charset = p[caps_low_at + 2];
    let high = u16::from_le_bytes([p[caps_low_at + 5], p[caps_low_at + 6]]);
    let capabilities = u32::from(low) | u32::from(high) << 16;
    let reserved = caps_low_at + 8;
    let mariadb_capabilities = (capabilities & caps::LONG_PASSWORD == 0).then(|| {
        u32::from_le_bytes([
            p[reserved + 6],
            p[reserved + 7],
            p[reserved + 8],
            p[reserved + 9],
        ])
    });
    Ok(Greeting {
        server_version,
        connection_id,
        capabilities,
        charset,
        mariadb_capabilities,
        caps_low_at,
        raw: payload.clone(),
    })
}

impl Greeting {
    /// A copy of the greeting that advertises `capabilities` instead.
    pub fn with_capabilities(&self, capabilities: u32) -> Bytes {
        let mut out = BytesMut::from(&self.raw[..]);
        let at = self.caps_low_at;
        out[at..at + 2].copy_from_slice(&(capabilities as u16).to_le_bytes());
        out[at + 5..at + 7].copy_from_slice(&((capabilities >> 16) as u16).to_le_bytes());
        out.freeze()
    }
}

impl Greeting {
    /// Where the connection id sits in `raw`.
    fn id_at(&self) -> usize {
        self.caps_low_at - 13
    }

    /// Where the second part of the scramble sits in `raw` (after the
    /// reserved bytes).
    fn scramble2_at(&self) -> usize {
        self.caps_low_at + 2 + 1 + 2 + 2 + 1 + 10
    }

    /// The server's 20-byte scramble (both parts), what
    /// `mysql_native_password` hashes with. `None` for a greeting too
    /// short to carry it.
    pub fn scramble(&self) -> Option<[u8; 20]> {
        let mut out = [0u8; 20];
        let one = self.raw.get(self.id_at() + 4..self.id_at() + 12)?;
        let at = self.scramble2_at();
        let two = self.raw.get(at..at + 12)?;
        out[..8].copy_from_slice(one);
        out[8..].copy_from_slice(two);
        Some(out)
    }

    /// The authentication plugin the greeting names, if any.
    pub fn auth_plugin(&self) -> Option<&[u8]> {
        if self.capabilities & caps::PLUGIN_AUTH == 0 {
            return None;
        }
        let len = usize::from(*self.raw.get(self.caps_low_at + 7)?);
        let at = self.scramble2_at() + 13usize.max(len.saturating_sub(8));
        let rest = self.raw.get(at..)?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Some(&rest[..end])
    }

    /// keyhole's own greeting to a client of a server connection it logged
    /// in to itself: the server's greeting with `connection_id`, a fresh
    /// `scramble`, `capabilities` and (MariaDB) `mariadb_capabilities`.
    /// `None` if the greeting is too short to rewrite.
    pub fn for_client(
        &self,
        connection_id: u32,
        scramble: &[u8; 20],
        capabilities: u32,
        mariadb_capabilities: Option<u32>,
    ) -> Option<Bytes> {
        let mut out = BytesMut::from(&self.with_capabilities(capabilities)[..]);
        let id_at = self.id_at();
        out.get_mut(id_at..id_at + 4)?
            .copy_from_slice(&connection_id.to_le_bytes());
        out.get_mut(id_at + 4..id_at + 12)?
            .copy_from_slice(&scramble[..8]);
        let at = self.scramble2_at();
        out.get_mut(at..at + 12)?.copy_from_slice(&scramble[8..]);
        if let (Some(ext), true) = (mariadb_capabilities, self.mariadb_capabilities.is_some()) {
            let reserved = self.caps_low_at + 8;
            out.get_mut(reserved + 6..reserved + 10)?
                .copy_from_slice(&ext.to_le_bytes());
        }
        Some(out.freeze())
    }
}

/// The `mysql_native_password` answer to `scramble`:
/// SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))); empty for an
/// empty password.
pub fn native_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    use ring::digest::{digest, Context, SHA1_FOR_LEGACY_USE_ONLY as SHA1};
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = digest(&SHA1, password);
    let stage2 = digest(&SHA1, stage1.as_ref());
    let mut ctx = Context::new(&SHA1);
    ctx.update(scramble);
    ctx.update(stage2.as_ref());
    let mix = ctx.finish();
    stage1
        .as_ref()
        .iter()
        .zip(mix.as_ref())
        .map(|(a, b)| a ^ b)
        .collect()
}

/// The plugin data of an AuthSwitchRequest (after the plugin name's NUL),
/// without the NUL some servers end it with.
pub fn auth_switch_data(payload: &[u8]) -> &[u8] {
    let rest = payload.get(1..).unwrap_or_default();
    let data = match rest.iter().position(|&b| b == 0) {
        Some(end) => &rest[end + 1..],
        None => &[],
    };
    data.strip_suffix(&[0]).unwrap_or(data)
}

/// The plugin the server names first for `mysql_native_password`.
pub const NATIVE_PASSWORD_PLUGIN: &[u8] = b"mysql_native_password";

/// Server status flags (`SERVER_*`) of OK and EOF packets.
pub mod status {
    pub const IN_TRANS: u16 = 0x0001;
    pub const AUTOCOMMIT: u16 = 0x0002;
    pub const MORE_RESULTS_EXISTS: u16 = 0x0008;
}

/// The status flags of an OK packet payload (`0x00` or, as a result set's
/// end with `CLIENT_DEPRECATE_EOF`, `0xFE`): after the header, two
/// length-encoded integers.
pub fn ok_status(payload: &[u8]) -> Option<u16> {
    let mut rest = payload.get(1..)?;
    take_lenenc_u64(&mut rest)?;
    take_lenenc_u64(&mut rest)?;
    let b = rest.get(..2)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// The status flags of a (pre-`DEPRECATE_EOF`) EOF packet payload.
pub fn eof_status(payload: &[u8]) -> Option<u16> {
    let b = payload.get(3..5)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// A length-encoded integer (`0xFB`, NULL, is refused).
pub fn take_lenenc_u64(rest: &mut &[u8]) -> Option<u64> {
    let (&first, tail) = rest.split_first()?;
    let width = match first {
        0..=0xfa => {
            *rest = tail;
            return Some(u64::from(first));
        }
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let b = tail.get(..width)?;
    let mut bytes = [0u8; 8];
    bytes[..width].copy_from_slice(b);
    *rest = &tail[width..];
    Some(u64::from_le_bytes(bytes))
}

/// An OK packet payload with `status` (no affected rows, no insert id, no
/// warnings).
pub fn ok_packet(status: u16) -> [u8; 7] {
    let s = status.to_le_bytes();
    [reply::OK, 0, 0, s[0], s[1], 0, 0]
}

/// The SSLRequest payload keyhole sends for a client whose
/// HandshakeResponse41 payload is `response`: the client's own first 32
/// bytes (capabilities, max packet size, charset, and the filler where
/// MariaDB clients put extended capabilities), with `SSL` set.
pub fn ssl_request(response: &[u8]) -> [u8; SSL_REQUEST_LEN] {
    let mut out = [0u8; SSL_REQUEST_LEN];
    let n = response.len().min(SSL_REQUEST_LEN);
    out[..n].copy_from_slice(&response[..n]);
    let capabilities = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) | caps::SSL;
    out[..4].copy_from_slice(&capabilities.to_le_bytes());
    out
}

/// The first 32 bytes of a HandshakeResponse41 for keyhole's own
/// connection test, which upgrades to TLS and logs in as nobody: protocol
/// 4.1 capabilities the server offers, a 16 MiB packet limit and the
/// server's own character set.
pub fn probe_response(greeting: &Greeting) -> [u8; SSL_REQUEST_LEN] {
    let wanted = caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::TRANSACTIONS;
    let mut out = [0u8; SSL_REQUEST_LEN];
    out[..4].copy_from_slice(&(greeting.capabilities & wanted).to_le_bytes());
    out[4..8].copy_from_slice(&(16u32 << 20).to_le_bytes());
    out[8] = greeting.charset;
    out
}

/// What keyhole reads out of the client's HandshakeResponse41 (or SSLRequest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub capabilities: u32,
    pub user: String,
    pub database: Option<String>,
    pub plugin: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("the client does not speak protocol 4.1 (too old)")]
    Protocol40,
    #[error("the handshake response is truncated or malformed ({0})")]
    Malformed(&'static str),
    #[error("the client asked for {0}, which keyhole did not offer")]
    NotOffered(&'static str),
}

/// The client's first packet: an SSLRequest, or a whole HandshakeResponse41.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    SslRequest { capabilities: u32 },
    Response(HandshakeResponse),
}

/// The client's packet after the greeting, or after TLS: an SSLRequest is
/// a packet of exactly 32 bytes with `CLIENT_SSL`. (Before TLS, a server
/// takes more than that for one: see [`parse_first_hello`].)
pub fn parse_client_hello(payload: &[u8]) -> Result<ClientHello, ResponseError> {
    let capabilities = hello_capabilities(payload)?;
    if payload.len() == SSL_REQUEST_LEN && capabilities & caps::SSL != 0 {
        return Ok(ClientHello::SslRequest { capabilities });
    }
    parse_response(payload, capabilities)
}

/// The client's first packet after the greeting, read as MariaDB and MySQL
/// read it: any packet of at least 32 bytes with `CLIENT_SSL` asks for TLS,
/// whatever follows the 32 bytes (it is dropped, and TLS starts).
pub fn parse_first_hello(payload: &[u8]) -> Result<ClientHello, ResponseError> {
    let capabilities = hello_capabilities(payload)?;
    if capabilities & caps::SSL != 0 {
        return Ok(ClientHello::SslRequest { capabilities });
    }
    parse_response(payload, capabilities)
}

/// The capability flags of a client's SSLRequest or HandshakeResponse41,
/// which must speak 4.1 and carry the 32-byte fixed part.
fn hello_capabilities(payload: &[u8]) -> Result<u32, ResponseError> {
    if !client_speaks_41(payload) {
        return Err(ResponseError::Protocol40);
    }
    let Some(&[c0, c1, c2, c3]) = payload.get(..4) else {
        return Err(ResponseError::Malformed("no capability flags"));
    };
    let capabilities = u32::from_le_bytes([c0, c1, c2, c3]);
    if payload.len() < SSL_REQUEST_LEN {
        return Err(ResponseError::Malformed("shorter than 32 bytes"));
    }
    Ok(capabilities)
}

/// A HandshakeResponse41 whose capability flags are `capabilities`.
fn parse_response(payload: &[u8], capabilities: u32) -> Result<ClientHello, ResponseError> {
    let mut rest = &payload[SSL_REQUEST_LEN..];
    let user = take_cstr(&mut rest).ok_or(ResponseError::Malformed("user name"))?;
    // The auth response: length-encoded, one-byte length, or NUL-terminated.
    if capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        let len = take_lenenc(&mut rest).ok_or(ResponseError::Malformed("auth response length"))?;
        skip(&mut rest, len).ok_or(ResponseError::Malformed("auth response"))?;
    } else if capabilities & caps::SECURE_CONNECTION != 0 {
        let (&len, tail) = rest
            .split_first()
            .ok_or(ResponseError::Malformed("auth response length"))?;
        rest = tail;
        skip(&mut rest, usize::from(len)).ok_or(ResponseError::Malformed("auth response"))?;
    } else {
        take_cstr(&mut rest).ok_or(ResponseError::Malformed("auth response"))?;
    }
    let database = if capabilities & caps::CONNECT_WITH_DB != 0 && !rest.is_empty() {
        Some(take_cstr(&mut rest).ok_or(ResponseError::Malformed("database name"))?)
    } else {
        None
    };
    let plugin = if capabilities & caps::PLUGIN_AUTH != 0 && !rest.is_empty() {
        Some(take_cstr(&mut rest).ok_or(ResponseError::Malformed("plugin name"))?)
    } else {
        None
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(ClientHello::Response(HandshakeResponse {
        capabilities,
        user: text(user),
        database: database.map(text),
        plugin: plugin.map(text),
    }))
}

/// A copy of a HandshakeResponse41 payload for another user: the 32-byte
/// header (capabilities, charset, MariaDB's extended capabilities) and
/// everything after the user name unchanged.
pub fn with_user(payload: &[u8], user: &str) -> Result<Bytes, ResponseError> {
    let header = payload
        .get(..SSL_REQUEST_LEN)
        .ok_or(ResponseError::Malformed("shorter than 32 bytes"))?;
    let mut rest = &payload[SSL_REQUEST_LEN..];
    take_cstr(&mut rest).ok_or(ResponseError::Malformed("user name"))?;
    let mut out = BytesMut::with_capacity(payload.len() + user.len());
    out.put_slice(header);
    out.put_slice(user.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
    Ok(out.freeze())
}

/// The authentication method a server switches to, from an
/// AuthSwitchRequest payload (`0xFE plugin-name NUL plugin-data`). Aurora
/// sends `mysql_clear_password` with no plugin data, and the terminating NUL
/// may then be missing too. `None`: not a switch, or the pre-4.1 form (a
/// bare `0xFE`) that names no method.
pub fn auth_switch_plugin(payload: &[u8]) -> Option<&[u8]> {
    let rest = payload.strip_prefix(&[reply::AUTH_SWITCH])?;
    let name = match rest.iter().position(|&b| b == 0) {
        Some(end) => &rest[..end],
        None => rest,
    };
    (!name.is_empty()).then_some(name)
}

/// The HandshakeResponse41 payload of keyhole's own login as `user` (for a
/// side connection): protocol 4.1 with the capabilities it needs, the
/// server's character set, an empty answer to `mysql_native_password` (a
/// token user's server then switches to `mysql_clear_password`).
pub fn own_login(greeting: &Greeting, user: &str) -> Bytes {
    let wanted = caps::LONG_PASSWORD
        | caps::PROTOCOL_41
        | caps::SECURE_CONNECTION
        | caps::TRANSACTIONS
        | caps::PLUGIN_AUTH;
    let mut out = BytesMut::with_capacity(SSL_REQUEST_LEN + user.len() + 32);
    out.put_u32_le(greeting.capabilities & wanted | caps::PROTOCOL_41);
    out.put_u32_le(16 << 20);
    out.put_u8(greeting.charset);
    out.put_slice(&[0; 23]);
    out.put_slice(user.as_bytes());
    out.put_u8(0);
    out.put_u8(0); // an empty auth response
    out.put_slice(b"mysql_native_password\0");
    out.freeze()
}

/// The plugin whose answer is the password in clear (over TLS): how RDS
/// and Cloud SQL take IAM tokens.
pub const CLEAR_PASSWORD_PLUGIN: &[u8] = b"mysql_clear_password";

/// The reply to a switch to `mysql_clear_password`: the password, NUL-terminated.
pub fn clear_password_reply(password: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(password.len() + 1);
    out.extend_from_slice(password.as_bytes());
    out.push(0);
    out
}

/// A copy of a client packet payload with `extra` capability bits set.
pub fn with_client_capabilities(payload: &[u8], extra: u32) -> Bytes {
    let mut out = BytesMut::from(payload);
    if out.len() >= 4 {
        let caps = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) | extra;
        out[..4].copy_from_slice(&caps.to_le_bytes());
    }
    out.freeze()
}

/// `payload` (a HandshakeResponse41) with the capability flags `bits` cleared.
pub fn without_client_capabilities(payload: &[u8], bits: u32) -> Bytes {
    let mut out = BytesMut::from(payload);
    if out.len() >= 4 {
        let caps = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) & !bits;
        out[..4].copy_from_slice(&caps.to_le_bytes());
    }
    out.freeze()
}

fn take_cstr<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = rest.iter().position(|&b| b == 0)?;
    let s = &rest[..end];
    *rest = &rest[end + 1..];
    Some(s)
}

fn skip(rest: &mut &[u8], n: usize) -> Option<()> {
    if rest.len() < n {
        return None;
    }
    *rest = &rest[n..];
    Some(())
}

fn take_lenenc(rest: &mut &[u8]) -> Option<usize> {
    let (&first, tail) = rest.split_first()?;
    let (len, width) = match first {
        0..=0xfa => (usize::from(first), 0),
        0xfc => (0, 2),
        0xfd => (0, 3),
        0xfe => (0, 8),
        _ => return None,
    };
    if width == 0 {
        *rest = tail;
        return Some(len);
    }
    if tail.len() < width {
        return None;
    }
    let mut bytes = [0u8; 8];
    bytes[..width].copy_from_slice(&tail[..width]);
    *rest = &tail[width..];
    usize::try_from(u64::from_le_bytes(bytes)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_rewritten_for_another_user_keeps_every_other_byte() {
        let mut p = BytesMut::new();
        let capabilities =
            caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH | caps::CONNECT_WITH_DB;
        p.put_u32_le(capabilities);
        p.put_u32_le(1 << 24);
        p.put_u8(45);
        p.put_slice(&[0; 19]);
        p.put_u32_le(0x0000_000d); // MariaDB extended capabilities
        p.put_slice(b"app\0");
        p.put_u8(3);
        p.put_slice(b"\x01\x02\x03");
        p.put_slice(b"shop\0mysql_native_password\0");
        let rewritten = with_user(&p, "iam_reader").expect("rewrites");
        let mut expected = BytesMut::from(&p[..32]);
        expected.put_slice(b"iam_reader\0");
        expected.put_slice(&p[36..]);
        assert_eq!(&rewritten[..], &expected[..]);
        match parse_client_hello(&rewritten).expect("still parses") {
            ClientHello::Response(r) => {
                assert_eq!(
                    (r.user.as_str(), r.database.as_deref()),
                    ("iam_reader", Some("shop"))
                );
                assert_eq!(r.plugin.as_deref(), Some("mysql_native_password"));
            }
            other => panic!("not a response: {other:?}"),
        }
        assert_eq!(
            with_user(&p[..20], "x"),
            Err(ResponseError::Malformed("shorter than 32 bytes"))
        );
        assert_eq!(
            with_user(&p[..34], "x"),
            Err(ResponseError::Malformed("user name"))
        );
    }

    #[test]
    fn auth_switch_requests_name_their_plugin_with_or_without_data() {
        assert_eq!(
            auth_switch_plugin(b"\xfemysql_clear_password\0abcdefghij\0"),
            Some(CLEAR_PASSWORD_PLUGIN)
        );
        assert_eq!(
            auth_switch_plugin(b"\xfemysql_clear_password\0"),
            Some(CLEAR_PASSWORD_PLUGIN)
        );
        assert_eq!(
            auth_switch_plugin(b"\xfemysql_clear_password"),
            Some(CLEAR_PASSWORD_PLUGIN)
        );
        assert_eq!(
            auth_switch_plugin(b"\xfeclient_ed25519\0xyz"),
            Some(&b"client_ed25519"[..])
        );
        assert_eq!(
            auth_switch_plugin(b"\xfe"),
            None,
            "pre-4.1 switch names no method"
        );
        assert_eq!(
            auth_switch_plugin(b"\x00\x00\x00"),
            None,
            "OK is not a switch"
        );
        assert_eq!(clear_password_reply("tok"), b"tok\0");
    }

    /// A MariaDB-style greeting: LONG_PASSWORD cleared, extended caps in the
    /// last reserved bytes.
    fn greeting(capabilities: u32, ext: u32) -> Bytes {
        let mut p = BytesMut::new();
        p.put_u8(10);
        p.put_slice(b"5.5.5-10.11.19-MariaDB\0");
        p.put_u32_le(42); // thread id
        p.put_slice(b"12345678"); // auth data 1
        p.put_u8(0);
        p.put_u16_le(capabilities as u16);
        p.put_u8(45); // utf8mb4_general_ci
        p.put_u16_le(2); // status
        p.put_u16_le((capabilities >> 16) as u16);
        p.put_u8(21);
        p.put_slice(&[0; 6]);
        p.put_u32_le(ext);
        p.put_slice(b"abcdefghijkl\0");
        p.put_slice(b"mysql_native_password\0");
        p.freeze()
    }

    #[test]
    fn keyhole_answers_only_with_server_error_codes() {
        let ours = [
            code::TOO_MANY_CONNECTIONS,
            code::BAD_HANDSHAKE,
            code::PACKET_TOO_LARGE,
            code::PACKETS_OUT_OF_ORDER,
            code::CANNOT_CONNECT,
            code::SERVER_LOST,
            code::TLS_ERROR,
        ];
        for c in ours {
            assert!(
                code::CLIENT_RANGES.iter().all(|r| !r.contains(&c)),
                "{c} is a client-library code"
            );
        }
    }

    #[test]
    fn packets_frame_and_bound() {
        let mut buf = BytesMut::from(&[3, 0, 0, 7, b'a', b'b', b'c', 9][..]);
        let p = decode_packet(&mut buf, 16).expect("valid").expect("whole");
        assert_eq!((p.seq, &p.payload[..]), (7, &b"abc"[..]));
        assert_eq!(&buf[..], &[9]);
        let mut partial = BytesMut::from(&[3, 0, 0, 7, b'a'][..]);
        assert_eq!(decode_packet(&mut partial, 16), Ok(None));
        let mut big = BytesMut::from(&[0xff, 0xff, 0xff, 0][..]);
        assert_eq!(
            decode_packet(&mut big, MAX_HANDSHAKE_PAYLOAD),
            Err(PacketError::TooLarge {
                len: MAX_PAYLOAD,
                max: MAX_HANDSHAKE_PAYLOAD
            })
        );
        let mut out = BytesMut::new();
        encode_packet(&mut out, 2, b"xyz");
        assert_eq!(&out[..], &[3, 0, 0, 2, b'x', b'y', b'z']);
    }

    #[test]
    fn err_packet_byte_for_byte() {
        let mut out = BytesMut::new();
        encode_err(&mut out, 0, code::TOO_MANY_CONNECTIONS, "08004", "Too many");
        assert_eq!(&out[..], b"\x11\x00\x00\x00\xff\x10\x04#08004Too many");
        let mut buf = out.clone();
        let p = decode_packet(&mut buf, 64).expect("valid").expect("whole");
        assert_eq!(
            parse_err(&p.payload),
            Some((1040, "08004".into(), "Too many".into()))
        );
    }

    #[test]
    fn greeting_parses_and_rewrites_capabilities() {
        let caps = caps::PROTOCOL_41
            | caps::SSL
            | caps::SECURE_CONNECTION
            | caps::PLUGIN_AUTH
            | caps::DEPRECATE_EOF;
        let raw = greeting(caps, 0x1d);
        let g = parse_greeting(&raw).expect("valid");
        assert_eq!(g.server_version, "5.5.5-10.11.19-MariaDB");
        assert_eq!(g.connection_id, 42);
        assert_eq!(g.capabilities, caps);
        assert_eq!(g.charset, 45);
        assert_eq!(g.mariadb_capabilities, Some(0x1d));
        let plain = g.with_capabilities(caps & !caps::SSL);
        let again = parse_greeting(&plain).expect("valid");
        assert_eq!(again.capabilities, caps & !caps::SSL);
        assert_eq!(
            again.mariadb_capabilities,
            Some(0x1d),
            "the rest is untouched"
        );
        assert_eq!(plain.len(), raw.len());
        let diff = raw.iter().zip(plain.iter()).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 1, "only the SSL bit's byte changes");
    }

    #[test]
    fn bad_greetings_are_refused() {
        assert_eq!(
            parse_greeting(&Bytes::from_static(&[9, 0])),
            Err(GreetingError::Version(9))
        );
        assert_eq!(
            parse_greeting(&Bytes::from_static(&[10, b'8', 0, 1])),
            Err(GreetingError::Truncated)
        );
        assert_eq!(parse_greeting(&Bytes::new()), Err(GreetingError::Truncated));
    }

    #[test]
    fn keyhole_s_own_login_parses_as_a_client_s() {
        let offered = caps::PROTOCOL_41 | caps::SSL | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH;
        let g = parse_greeting(&greeting(offered, 0)).expect("valid");
        let login = own_login(&g, "iam_user");
        let ClientHello::Response(hello) = parse_client_hello(&login).expect("parses") else {
            panic!("a whole response, not an SSLRequest");
        };
        assert_eq!(hello.user, "iam_user");
        assert_eq!(hello.plugin.as_deref(), Some("mysql_native_password"));
        assert_eq!(hello.database, None);
        assert_eq!(
            hello.capabilities,
            caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH
        );
        assert_eq!(login[8], 45, "the server's character set");
    }

    /// The version a client prints comes before TLS: escape sequences,
    /// newlines, non-ASCII text and non-versions are refused.
    #[test]
    fn forged_server_versions_are_refused() {
        let good = greeting(caps::PROTOCOL_41 | caps::SSL, 0);
        let with_version = |v: &[u8]| {
            let old = b"5.5.5-10.11.19-MariaDB";
            let mut p = good[..1].to_vec();
            p.extend_from_slice(v);
            p.extend_from_slice(&good[1 + old.len()..]);
            Bytes::from(p)
        };
        for ok in [
            &b"8.0.31-google"[..],
            b"5.5.5-10.11.6-MariaDB-0+deb12u1",
            b"8.0.36",
        ] {
            let g = parse_greeting(&with_version(ok)).expect("a real version");
            assert_eq!(g.server_version.as_bytes(), ok);
        }
        for forged in [
            &b"8.0.36\x1b]8;;https://evil.example\x07click\x1b]8;;\x07"[..],
            b"8.0.36\nWarning: reset your password at evil.example",
            b"8.0.36-\xc3\xa9",
            b"MySQL",
            b"",
            &[b'8'; 256],
        ] {
            assert_eq!(
                parse_greeting(&with_version(forged)),
                Err(GreetingError::ServerVersion),
                "{:?}",
                String::from_utf8_lossy(forged)
            );
        }
    }

    #[test]
    fn ssl_request_is_the_clients_own_header_with_ssl() {
        let c = caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::COMPRESS | caps::PLUGIN_AUTH;
        let mut r = response(c, &[7; 20], None, None);
        r[28..32].copy_from_slice(&0x1du32.to_le_bytes()); // MariaDB extended caps
        let req = ssl_request(&r);
        assert_eq!(
            u32::from_le_bytes([req[0], req[1], req[2], req[3]]),
            c | caps::SSL
        );
        assert_eq!(
            &req[4..],
            &r[4..32],
            "max packet, charset and filler are the client's"
        );
        assert_eq!(
            parse_client_hello(&req),
            Ok(ClientHello::SslRequest {
                capabilities: c | caps::SSL
            })
        );
    }

    fn response(capabilities: u32, auth: &[u8], db: Option<&str>, plugin: Option<&str>) -> Vec<u8> {
        let mut p = BytesMut::new();
        p.put_u32_le(capabilities);
        p.put_u32_le(1 << 24);
        p.put_u8(45);
        p.put_slice(&[0; 23]);
        p.put_slice(b"alice\0");
        // Short enough that the length-encoded and one-byte forms agree.
        assert!(auth.len() < 0xfb);
        p.put_u8(auth.len() as u8);
        p.put_slice(auth);
        if let Some(db) = db {
            p.put_slice(db.as_bytes());
            p.put_u8(0);
        }
        if let Some(plugin) = plugin {
            p.put_slice(plugin.as_bytes());
            p.put_u8(0);
        }
        p.to_vec()
    }

    #[test]
    fn handshake_response_yields_user_database_plugin() {
        let c =
            caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH | caps::CONNECT_WITH_DB;
        let r = response(c, &[7; 20], Some("shop"), Some("mysql_native_password"));
        let ClientHello::Response(h) = parse_client_hello(&r).expect("valid") else {
            panic!("not a response");
        };
        assert_eq!(h.user, "alice");
        assert_eq!(h.database.as_deref(), Some("shop"));
        assert_eq!(h.plugin.as_deref(), Some("mysql_native_password"));
        let lenenc = response(
            c | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA,
            &[7; 32],
            None,
            None,
        );
        assert!(
            matches!(parse_client_hello(&lenenc), Ok(ClientHello::Response(h)) if h.database.is_none())
        );
    }

    #[test]
    fn malformed_responses_are_refused() {
        assert_eq!(
            parse_client_hello(&[0, 2]),
            Err(ResponseError::Malformed("no capability flags"))
        );
        assert_eq!(
            parse_client_hello(&[0, 0]),
            Err(ResponseError::Protocol40),
            "two bytes already say 4.0"
        );
        assert_eq!(
            parse_client_hello(&[0, 0, 0, 0, 0]),
            Err(ResponseError::Protocol40)
        );
        let c = caps::PROTOCOL_41 | caps::SECURE_CONNECTION;
        let mut r = response(c, &[1; 20], None, None);
        r.truncate(45);
        assert!(matches!(
            parse_client_hello(&r),
            Err(ResponseError::Malformed(_))
        ));
        let garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(parse_client_hello(garbage).is_err());
    }

    #[test]
    fn out_of_order_packets_are_refused_from_their_header() {
        // Wrong sequence id: refused before the (huge) length is looked at.
        let mut http = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(
            decode_packet_in_sequence(&mut http, MAX_HANDSHAKE_PAYLOAD, 1),
            Err(PacketError::OutOfOrder {
                seq: b' ',
                expected: 1
            })
        );
        assert_eq!(
            PacketError::OutOfOrder {
                seq: 0,
                expected: 1
            }
            .to_string(),
            "packet out of order: sequence id 0, expected 1"
        );
        let mut header_only = BytesMut::from(&[5, 0, 0, 0][..]);
        assert!(decode_packet_in_sequence(&mut header_only, 16, 2).is_err());
        // The right one: decoded, or bounded, as by `decode_packet`.
        let mut short = BytesMut::from(&[5, 0, 0][..]);
        assert_eq!(decode_packet_in_sequence(&mut short, 16, 2), Ok(None));
        let mut good = BytesMut::from(&[1, 0, 0, 2, 9][..]);
        let p = decode_packet_in_sequence(&mut good, 16, 2)
            .expect("in order")
            .expect("whole");
        assert_eq!((p.seq, &p.payload[..]), (2, &[9][..]));
        let mut big = BytesMut::from(&[0xff, 0xff, 0xff, 1][..]);
        assert_eq!(
            decode_packet_in_sequence(&mut big, MAX_HANDSHAKE_PAYLOAD, 1),
            Err(PacketError::TooLarge {
                len: MAX_PAYLOAD,
                max: MAX_HANDSHAKE_PAYLOAD
            })
        );
    }

    #[test]
    fn a_4_0_client_gets_its_err_without_sqlstate() {
        let mut out = BytesMut::new();
        encode_err_as(&mut out, 2, code::BAD_HANDSHAKE, None, "Bad");
        assert_eq!(&out[..], b"\x06\x00\x00\x02\xff\x13\x04Bad");
        let mut with_state = BytesMut::new();
        encode_err_as(
            &mut with_state,
            2,
            code::BAD_HANDSHAKE,
            Some("08S01"),
            "Bad",
        );
        let mut same = BytesMut::new();
        encode_err(&mut same, 2, code::BAD_HANDSHAKE, "08S01", "Bad");
        assert_eq!(&with_state[..], b"\x0c\x00\x00\x02\xff\x13\x04#08S01Bad");
        assert_eq!(with_state, same);

        assert!(client_speaks_41(&[]), "nothing known: 4.1");
        assert!(client_speaks_41(&[0x00]), "nothing known: 4.1");
        assert!(!client_speaks_41(&[0x05, 0x80]));
        assert!(!client_speaks_41(b"GET / HTTP/1.1"));
        assert!(client_speaks_41(&[0x00, 0x02]));
        let c = caps::PROTOCOL_41 | caps::SECURE_CONNECTION;
        assert!(client_speaks_41(&response(c, &[1; 20], None, None)));
    }

    #[test]
    fn before_tls_any_response_with_the_ssl_flag_asks_for_tls() {
        let c = caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH | caps::SSL;
        let full = response(c, &[1; 20], None, Some("mysql_native_password"));
        assert_eq!(
            parse_first_hello(&full),
            Ok(ClientHello::SslRequest { capabilities: c })
        );
        assert_eq!(
            parse_first_hello(&full[..SSL_REQUEST_LEN]),
            Ok(ClientHello::SslRequest { capabilities: c })
        );
        assert_eq!(
            parse_first_hello(&full[..31]),
            Err(ResponseError::Malformed("shorter than 32 bytes"))
        );
        // After TLS the same bytes are the response they look like.
        assert!(matches!(
            parse_client_hello(&full),
            Ok(ClientHello::Response(h)) if h.user == "alice"
        ));
        let plain = response(c & !caps::SSL, &[1; 20], None, None);
        assert!(matches!(
            parse_first_hello(&plain),
            Ok(ClientHello::Response(h)) if h.capabilities == c & !caps::SSL
        ));
        assert_eq!(
            parse_first_hello(&[0x05, 0x88, 0, 0]),
            Err(ResponseError::Protocol40),
            "no 4.1, TLS or not"
        );
    }

    #[test]
    fn client_capabilities_can_be_raised() {
        let c = caps::PROTOCOL_41;
        let r = response(c, &[], None, None);
        let raised = with_client_capabilities(&r, caps::SSL);
        assert_eq!(
            u32::from_le_bytes([raised[0], raised[1], raised[2], raised[3]]),
            c | caps::SSL
        );
        assert_eq!(&raised[4..], &r[4..]);
    }
}
