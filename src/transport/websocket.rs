//! A small RFC 6455 WebSocket *client*, for the two cloud tunnels that speak
//! WebSocket: the AWS SSM Session Manager data channel and Google IAP TCP
//! forwarding.
//!
//! Why our own: keyhole needs only a client, over a stream it already owns
//! (the caller dials TCP and puts tokio-rustls on it), and only a handful of
//! frame kinds. The pieces it needs (SHA-1 for the handshake, base64, a
//! random source for the masks) are already in the build through `ring` and
//! `base64`, so this file is the whole WebSocket stack.
//!
//! What it speaks:
//!
//! - The opening handshake (RFC 6455 section 4.1): one hand-written HTTP/1.1
//!   `GET` with `Upgrade: websocket`, a random `Sec-WebSocket-Key`, version 13,
//!   an optional subprotocol and the caller's extra headers. The answer must
//!   be `101` with `Upgrade`, `Connection` and the matching
//!   `Sec-WebSocket-Accept`, and must echo the subprotocol if one was asked
//!   for. Any other status comes back as [`HandshakeError::Status`] with the
//!   start of the body, since cloud endpoints explain refusals there. Bytes
//!   the server sends right after its `101` head are kept for the [`Reader`].
//! - Frames (section 5): binary, text, ping, pong and close, both ways.
//!   Every frame keyhole sends is a single unfragmented frame, masked with a
//!   fresh random key (section 5.3). Incoming frames must be unmasked, have no
//!   reserved bits set and a known opcode; fragmented data messages are
//!   reassembled, with control frames allowed between the fragments.
//!
//! What it does not speak: extensions (no `permessage-deflate`: the server
//! must not pick one, as none is offered), the server side, HTTP redirects or
//! proxies (the caller's concern), and any automatic replies: a ping is
//! handed to the caller, who answers it with [`Writer::pong`], and a received
//! close is answered (or not) with [`Writer::close`]. That keeps the reading
//! and the writing halves independent, so each can live in its own task or
//! `select!` arm.
//!
//! In use (`tls` is the caller's tokio-rustls stream):
//!
//! ```ignore
//! let request = Request {
//!     host: "tunnel.example.com",
//!     path: "/v4/connect?project=p&zone=z",
//!     headers: &[("Authorization", bearer.as_str())],
//!     subprotocol: Some("relay.tunnel.cloudproxy.app"),
//! };
//! let (mut reader, mut writer) = connect(tls, &request, Limits::default()).await?;
//! writer.send_binary(b"...").await?;
//! loop {
//!     match reader.recv().await? {
//!         Message::Binary(data) => { /* ... */ }
//!         Message::Ping(data) => writer.pong(&data).await?,
//!         Message::Close(_) => break,
//!         _ => {}
//!     }
//! }
//! ```

use std::fmt;
use std::io;

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use ring::rand::SecureRandom as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// The GUID RFC 6455 section 1.3 appends to the key for `Sec-WebSocket-Accept`.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The longest response head (status line and headers) read in the handshake.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// How much of a refusal's body is kept for the error.
const MAX_ERROR_BODY: usize = 4 * 1024;

/// The longest payload of a control frame (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// The most bytes [`Writer`] hands to one write call: a larger frame goes out
/// in pieces of this size, so its buffer stays small.
const WRITE_CHUNK: usize = 64 * 1024;

/// How much the [`Reader`] asks the stream for at least, per read.
const READ_CHUNK: usize = 8 * 1024;

// Opcodes (RFC 6455 section 5.2).
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The opening request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The `Host` header's value (`host` or `host:port`, as the caller wants it).
    pub host: &'a str,
    /// Path and query, e.g. `/v4/connect?project=p&zone=z`.
    pub path: &'a str,
    /// Extra headers (`Authorization`, `Origin`, ...), sent as given.
    pub headers: &'a [(&'a str, &'a str)],
    /// The `Sec-WebSocket-Protocol` to ask for; if `Some`, the server must
    /// echo exactly this one.
    pub subprotocol: Option<&'a str>,
}

/// Bounds on what the server may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest data message (after reassembly of its fragments); a larger
    /// one is a [`WsError::Protocol`].
    pub max_message: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message: 1024 * 1024,
        }
    }
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Binary(Bytes),
    Text(String),
    /// Answer it with [`Writer::pong`] and the same data.
    Ping(Bytes),
    Pong(Bytes),
    /// The server closes; `None` when its close frame had no body.
    /// [`Reader::recv`] returns [`WsError::Closed`] from now on.
    Close(Option<CloseFrame>),
}

/// The body of a close frame (RFC 6455 section 5.5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code (1000 normal, 1001 going away, ...), as sent.
    pub code: u16,
    /// The reason, for humans (invalid UTF-8 is replaced, not an error).
    pub reason: String,
}

/// Why the opening handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("WebSocket handshake: {0}")]
    Io(#[from] io::Error),
    /// The server answered with a status other than 101. `body` is at most
    /// the first 4 KiB of the body (as text, lossy), for error messages;
    /// `headers` the response's headers (lower-cased names).
    #[error(
        "the server answered {status} {reason} instead of switching to WebSocket{}",
        body_suffix(body)
    )]
    Status {
        status: u16,
        reason: String,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// 101 but not a valid WebSocket upgrade (missing or wrong `Upgrade`,
    /// `Connection`, `Sec-WebSocket-Accept`, or not the subprotocol asked
    /// for), or a response that is not HTTP at all.
    #[error("the server's WebSocket handshake is invalid: {0}")]
    Protocol(String),
}

/// The first line of a refusal's body, short, for [`HandshakeError`]'s message.
fn body_suffix(body: &str) -> String {
    let line = body.trim().lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return String::new();
    }
    let mut end = line.len().min(200);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!(": {}", &line[..end])
}

/// Why a WebSocket connection failed after the handshake.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket: {0}")]
    Io(#[from] io::Error),
    /// The server broke RFC 6455: a masked frame, reserved bits, an unknown
    /// opcode, a control frame too long or fragmented, a message over
    /// [`Limits::max_message`], invalid UTF-8 in a text message, a
    /// continuation without a start. The connection is unusable after it.
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    /// [`Reader::recv`] after the server's close frame was returned, or a
    /// [`Writer`] method after [`Writer::close`].
    #[error("the WebSocket connection is closed")]
    Closed,
    /// The stream ended without a close frame (possibly in the middle of one).
    #[error("the WebSocket connection ended without a close frame")]
    EndOfStream,
}

/// Opens a WebSocket over `stream` (already connected, and already TLS if it
/// should be): sends the opening request, checks the answer, and splits the
/// stream into its reading and writing halves.
///
/// No timeout of its own: the caller bounds the whole call.
pub async fn connect<S>(
    mut stream: S,
    request: &Request<'_>,
    limits: Limits,
) -> Result<(Reader<ReadHalf<S>>, Writer<WriteHalf<S>>), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let rng = ring::rand::SystemRandom::new();
    let leftover = handshake(&mut stream, request, &rng).await?;
    let (read, write) = tokio::io::split(stream);
    Ok((
        Reader::new(read, leftover, limits),
        Writer::with_rng(write, rng),
    ))
}

/// The opening handshake on `stream`; returns the bytes that came after the
/// `101` response's head (the first frames, perhaps).
async fn handshake<S>(
    stream: &mut S,
    request: &Request<'_>,
    rng: &ring::rand::SystemRandom,
) -> Result<BytesMut, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut nonce = [0u8; 16];
    rng.fill(&mut nonce).map_err(|_| no_randomness())?;
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);

    let head = request_head(request, &key)?;
    stream.write_all(head.as_bytes()).await?;
    stream.flush().await?;

    let mut buf = BytesMut::with_capacity(4096);
    let head_len = read_head(stream, &mut buf).await?;
    let head = buf.split_to(head_len);
    let response = parse_response(&head)?;

    if response.status != 101 {
        let body = read_error_body(stream, &mut buf, &response).await;
        return Err(HandshakeError::Status {
            status: response.status,
            reason: response.reason,
            headers: response.headers,
            body,
        });
    }
    check_upgrade(&response, &key, request.subprotocol)?;
    Ok(buf)
}

/// The `GET` request, refusing CR or LF anywhere the caller's text goes (they
/// would let one header smuggle in others).
fn request_head(request: &Request<'_>, key: &str) -> Result<String, HandshakeError> {
    let invalid = |what: &str| {
        HandshakeError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the WebSocket request's {what} is empty or has a character HTTP does not allow there"),
        ))
    };
    let bad = |s: &str| s.is_empty() || s.bytes().any(|b| b == b'\r' || b == b'\n');
    if bad(request.host) {
        return Err(invalid("host"));
    }
    if bad(request.path) || request.path.contains(' ') {
        return Err(invalid("path"));
    }
    let mut head = format!(
        "GET {path} HTTP/1.1\r\n\
         Host: {host}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n",
        path = request.path,
        host = request.host,
    );
    if let Some(protocol) = request.subprotocol {
        if bad(protocol) {
            return Err(invalid("subprotocol"));
        }
        head.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    for (name, value) in request.headers {
        if bad(name) || name.contains(':') || value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(invalid(&format!("header {name:?}")));
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    Ok(head)
}

/// Reads into `buf` until it holds a whole response head; returns the head's
/// length including its blank line.
async fn read_head<S>(stream: &mut S, buf: &mut BytesMut) -> Result<usize, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let mut searched = 0;
    loop {
        let end = find(&buf[searched..], b"\r\n\r\n").map(|at| searched + at + 4);
        if end.unwrap_or(buf.len()) > MAX_RESPONSE_HEAD {
            return Err(HandshakeError::Protocol(format!(
                "the response head is longer than {} KiB",
                MAX_RESPONSE_HEAD / 1024
            )));
        }
        if let Some(end) = end {
            return Ok(end);
        }
        // The terminator may straddle two reads.
        searched = buf.len().saturating_sub(3);
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if buf.is_empty() {
                    "the server closed the connection without answering"
                } else {
                    "the server closed the connection in the middle of its response head"
                },
            )));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A parsed response head.
#[derive(Debug)]
struct Response {
    status: u16,
    reason: String,
    /// Lower-cased names, trimmed values, in order.
    headers: Vec<(String, String)>,
}

impl Response {
    /// Every value of header `name` (lower case).
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether any value of header `name` lists `token` (comma-separated,
    /// case-insensitive).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// The status line and headers; `head` ends with its blank line.
fn parse_response(head: &[u8]) -> Result<Response, HandshakeError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let not_http = || {
        HandshakeError::Protocol(format!(
            "the server did not answer with HTTP/1.1 (its first line: {:?})",
            truncated(status_line, 100)
        ))
    };
    // `HTTP/1.1 101 Switching Protocols`; the reason may be empty or absent.
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(not_http());
    }
    let status = parts
        .next()
        .filter(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(not_http)?;
    let reason = parts.next().unwrap_or("").trim().to_string();

    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue; // the blank line at the end
        }
        let (name, value) = line.split_once(':').ok_or_else(|| {
            HandshakeError::Protocol(format!(
                "a response header line has no colon: {:?}",
                truncated(line, 100)
            ))
        })?;
        if name.is_empty() || name.starts_with([' ', '\t']) || name.ends_with([' ', '\t']) {
            return Err(HandshakeError::Protocol(format!(
                "a response header name is malformed: {:?}",
                truncated(name, 100)
            )));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Response {
        status,
        reason,
        headers,
    })
}

fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The `101` answer is a WebSocket upgrade for our key (RFC 6455 section 4.1,
/// the client's checks 1 to 6).
fn check_upgrade(
    response: &Response,
    key: &str,
    subprotocol: Option<&str>,
) -> Result<(), HandshakeError> {
    if !response.has_token("upgrade", "websocket") {
        return Err(HandshakeError::Protocol(
            "the 101 response has no \"Upgrade: websocket\" header".into(),
        ));
    }
    if !response.has_token("connection", "upgrade") {
        return Err(HandshakeError::Protocol(
            "the 101 response has no \"Connection: Upgrade\" header".into(),
        ));
    }
    let expected = accept_for(key);
    let accepts: Vec<&str> = response.values("sec-websocket-accept").collect();
    match accepts.as_slice() {
        [] => {
            return Err(HandshakeError::Protocol(
                "the 101 response has no Sec-WebSocket-Accept header".into(),
            ))
        }
        [accept] if *accept == expected => {}
        _ => {
            return Err(HandshakeError::Protocol(format!(
                "Sec-WebSocket-Accept is {:?}, expected {expected:?} for the key sent",
                accepts.join(", ")
            )))
        }
    }
    let protocols: Vec<&str> = response.values("sec-websocket-protocol").collect();
    match (subprotocol, protocols.as_slice()) {
        (None, []) => {}
        (Some(asked), [answer]) if answer == &asked => {}
        (Some(asked), []) => {
            return Err(HandshakeError::Protocol(format!(
                "the server did not accept the subprotocol {asked:?}"
            )))
        }
        (asked, answers) => {
            return Err(HandshakeError::Protocol(format!(
                "the server chose the subprotocol {:?}, but keyhole asked for {}",
                answers.join(", "),
                match asked {
                    Some(asked) => format!("{asked:?}"),
                    None => "none".into(),
                }
            )))
        }
    }
    if let Some(extensions) = response.values("sec-websocket-extensions").next() {
        return Err(HandshakeError::Protocol(format!(
            "the server chose the extensions {extensions:?}, but keyhole offered none"
        )));
    }
    Ok(())
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
fn accept_for(key: &str) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key.as_bytes());
    context.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(context.finish())
}

/// The start of a refusal's body: by `Content-Length`, de-chunked for
/// `Transfer-Encoding: chunked`, else up to the end of the stream; at most
/// [`MAX_ERROR_BODY`] bytes, and an error while reading only cuts it short
/// (the status is the news, the body a detail).
async fn read_error_body<S>(stream: &mut S, buf: &mut BytesMut, response: &Response) -> String
where
    S: AsyncRead + Unpin,
{
    // No body: 1xx, 204 and 304 (RFC 9112 section 6.3).
    if response.status < 200 || response.status == 204 || response.status == 304 {
        return String::new();
    }
    let chunked = response.has_token("transfer-encoding", "chunked");
    let content_length = if chunked {
        None
    } else {
        response
            .values("content-length")
            .next()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let wanted = content_length.unwrap_or(usize::MAX).min(MAX_ERROR_BODY);
    loop {
        if buf.len() >= wanted || (chunked && chunked_body_complete(buf)) {
            break;
        }
        buf.reserve(MAX_ERROR_BODY);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let raw: &[u8] = &buf[..buf.len().min(wanted)];
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    let body = &body[..body.len().min(MAX_ERROR_BODY)];
    String::from_utf8_lossy(body).into_owned()
}

/// Whether a chunked body's last chunk (`0`, no trailers) is in `buf`.
fn chunked_body_complete(buf: &[u8]) -> bool {
    buf.starts_with(b"0\r\n\r\n") || find(buf, b"\r\n0\r\n\r\n").is_some()
}

/// The data of a chunked body, as much of it as `raw` holds (it may be cut
/// short by the size bound).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(raw, b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        // Chunk extensions (`;name=value`) follow the size.
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        if size == 0 {
            break;
        }
        raw = &raw[line_end + 2..];
        let take = size.min(raw.len());
        out.extend_from_slice(&raw[..take]);
        if take < size || raw.len() < size + 2 {
            break;
        }
        raw = &raw[size + 2..];
    }
    out
}

fn no_randomness() -> io::Error {
    io::Error::other("the system's random number generator failed")
}

/// Where the [`Reader`] stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The server's close frame was returned.
    CloseReceived,
    /// The stream ended.
    Ended,
    /// The server broke the protocol; this is why.
    Failed(String),
}

/// A data message in pieces: its opcode and its payload so far.
struct Partial {
    opcode: u8,
    payload: BytesMut,
}

/// One frame, cut out of the read buffer.
struct Frame {
    fin: bool,
    opcode: u8,
    payload: BytesMut,
}

/// The reading half: frames in, messages out.
pub struct Reader<R> {
    inner: R,
    /// Bytes read and not yet made into frames. Everything `recv` has learnt
    /// lives here or in `partial`, never in a local across an await, which is
    /// what makes `recv` cancel-safe.
    buf: BytesMut,
    /// A fragmented data message being reassembled.
    partial: Option<Partial>,
    limits: Limits,
    state: ReadState,
}

impl<R> fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("buffered", &self.buf.len())
            .field("partial", &self.partial.as_ref().map(|p| p.payload.len()))
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader over `inner`, which has already yielded `buffered` (bytes that
    /// came with the handshake's response).
    fn new(inner: R, buffered: BytesMut, limits: Limits) -> Reader<R> {
        Reader {
            inner,
            buf: buffered,
            partial: None,
            limits,
            state: ReadState::Open,
        }
    }

    /// The next message. Fragmented data messages come back whole; pings,
    /// pongs and closes as they arrive (also between the fragments of a data
    /// message). A ping is not answered here: answer it with
    /// [`Writer::pong`].
    ///
    /// Cancel-safe: dropping the future (a `tokio::select!` arm that lost)
    /// loses nothing; the next call carries on where this one stopped.
    pub async fn recv(&mut self) -> Result<Message, WsError> {
        loop {
            match &self.state {
                ReadState::Open => {}
                ReadState::CloseReceived => return Err(WsError::Closed),
                ReadState::Ended => return Err(WsError::EndOfStream),
                ReadState::Failed(why) => return Err(WsError::Protocol(why.clone())),
            }
            match self.next_frame() {
                Ok(Some(frame)) => match self.on_frame(frame) {
                    Ok(Some(message)) => return Ok(message),
                    Ok(None) => continue,
                    Err(why) => return Err(self.fail(why)),
                },
                Ok(None) => {}
                Err(why) => return Err(self.fail(why)),
            }
            // Not a whole frame yet: read more. `read_buf` is cancel-safe, and
            // is the only await in here.
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                self.state = ReadState::Ended;
            }
        }
    }

    fn fail(&mut self, why: String) -> WsError {
        self.state = ReadState::Failed(why.clone());
        self.partial = None;
        WsError::Protocol(why)
    }

    /// The next whole frame in the buffer, if there is one. Its header is
    /// checked as soon as it is in, before the payload arrives.
    fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        let buf = &self.buf[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(format!(
                "a frame has reserved bits set ({:#04x}) and no extension was agreed",
                b0 & 0x70
            ));
        }
        let opcode = b0 & 0x0F;
        if b1 & 0x80 != 0 {
            return Err("the server sent a masked frame (RFC 6455 section 5.1)".into());
        }
        let (header_len, len) = match b1 & 0x7F {
            126 => {
                let Some(bytes) = buf.get(2..4) else {
                    return Ok(None);
                };
                (4, u64::from(u16::from_be_bytes([bytes[0], bytes[1]])))
            }
            127 => {
                let Some(bytes) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err("a frame's 64-bit length has its top bit set".into());
                }
                (10, len)
            }
            short => (2, u64::from(short)),
        };

        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(format!("a fragmented control frame (opcode {opcode:#x})"));
                }
                if len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(format!(
                        "a control frame (opcode {opcode:#x}) of {len} bytes, over {MAX_CONTROL_PAYLOAD}"
                    ));
                }
            }
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                let so_far = match (&self.partial, opcode) {
                    (None, OP_CONTINUATION) => {
                        return Err("a continuation frame without a message to continue".into())
                    }
                    (Some(_), OP_TEXT | OP_BINARY) => {
                        return Err(
                            "a new data message began before the fragmented one ended".into()
                        )
                    }
                    (Some(partial), _) => partial.payload.len() as u64,
                    (None, _) => 0,
                };
                if so_far.saturating_add(len) > self.limits.max_message as u64 {
                    return Err(format!(
                        "a message of {} bytes or more exceeds the limit of {} bytes",
                        so_far.saturating_add(len),
                        self.limits.max_message
                    ));
                }
            }
            other => return Err(format!("a frame with the unknown opcode {other:#x}")),
        }

        // Within max_message or 125 bytes, so it fits a usize.
        let len = usize::try_from(len).map_err(|_| "a frame too long for memory".to_string())?;
        let total = header_len + len;
        if self.buf.len() < total {
            // Room for the rest of this frame, so it arrives in few reads.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(header_len);
        let payload = self.buf.split_to(len);
        Ok(Some(Frame {
            fin,
            opcode,
            payload,
        }))
    }

    /// A frame's effect: a message to return, or `None` for a fragment kept.
    fn on_frame(&mut self, frame: Frame) -> Result<Option<Message>, String> {
        let Frame {
            fin,
            opcode,
            payload,
        } = frame;
        match opcode {
            OP_PING => Ok(Some(Message::Ping(payload.freeze()))),
            OP_PONG => Ok(Some(Message::Pong(payload.freeze()))),
            OP_CLOSE => {
                self.state = ReadState::CloseReceived;
                self.partial = None;
                Ok(Some(Message::Close(close_frame(&payload)?)))
            }
            OP_TEXT | OP_BINARY if fin => data_message(opcode, payload).map(Some),
            OP_TEXT | OP_BINARY => {
                self.partial = Some(Partial { opcode, payload });
                Ok(None)
            }
            // OP_CONTINUATION: next_frame checked there is a partial message.
            _ => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err("a continuation frame without a message to continue".into());
                };
                partial.payload.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                match self.partial.take() {
                    Some(Partial { opcode, payload }) => data_message(opcode, payload).map(Some),
                    None => Err("a continuation frame without a message to continue".into()),
                }
            }
        }
    }
}

fn data_message(opcode: u8, payload: BytesMut) -> Result<Message, String> {
    if opcode == OP_TEXT {
        match std::str::from_utf8(&payload) {
            Ok(text) => Ok(Message::Text(text.to_owned())),
            Err(e) => Err(format!("a text message is not valid UTF-8 ({e})")),
        }
    } else {
        Ok(Message::Binary(payload.freeze()))
    }
}

fn close_frame(payload: &[u8]) -> Result<Option<CloseFrame>, String> {
    match payload {
        [] => Ok(None),
        [_] => Err("a close frame with a 1-byte body".into()),
        [hi, lo, reason @ ..] => Ok(Some(CloseFrame {
            code: u16::from_be_bytes([*hi, *lo]),
            reason: String::from_utf8_lossy(reason).into_owned(),
        })),
    }
}

/// The writing half: each call sends one whole, masked, flushed frame.
///
/// Not cancel-safe: a call dropped halfway may have sent part of a frame,
/// after which the connection is garbage; the writer notices and refuses
/// further frames with an error rather than sending more garbage.
pub struct Writer<W> {
    inner: W,
    /// The frame being written (header and masked payload), kept between
    /// frames so a frame costs no allocation.
    buf: Vec<u8>,
    rng: ring::rand::SystemRandom,
    /// Random bytes for mask keys, used 4 at a time from `mask_used` on.
    mask_pool: [u8; 256],
    mask_used: usize,
    /// A write was cut short (cancelled or failed) halfway through a frame.
    broken: bool,
    /// A close frame was sent.
    closed: bool,
}

impl<W> fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("broken", &self.broken)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    fn with_rng(inner: W, rng: ring::rand::SystemRandom) -> Writer<W> {
        Writer {
            inner,
            buf: Vec::with_capacity(1024),
            rng,
            mask_pool: [0; 256],
            // Empty: filled on the first frame.
            mask_used: 256,
            broken: false,
            closed: false,
        }
    }

    /// One binary message.
    pub async fn send_binary(&mut self, data: &[u8]) -> Result<(), WsError> {
        self.send_frame(OP_BINARY, data).await
    }

    /// One text message.
    pub async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        self.send_frame(OP_TEXT, text.as_bytes()).await
    }

    /// A ping; `data` at most 125 bytes. The server's pong comes back from
    /// [`Reader::recv`].
    pub async fn ping(&mut self, data: &[u8]) -> Result<(), WsError> {
        check_control(data)?;
        self.send_frame(OP_PING, data).await
    }

    /// A pong: the answer to a [`Message::Ping`], with its data.
    pub async fn pong(&mut self, data: &[u8]) -> Result<(), WsError> {
        check_control(data)?;
        self.send_frame(OP_PONG, data).await
    }

    /// A close frame with `code` (1000 for a normal close) and `reason`
    /// (cut to the 123 bytes a close frame holds), flushed. No frame may
    /// follow it; the caller reads until the server's close (or the end of
    /// the stream) and then drops or shuts down the stream.
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        let reason = truncated(reason, MAX_CONTROL_PAYLOAD - 2);
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        payload[..2].copy_from_slice(&code.to_be_bytes());
        payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
        self.send_frame(OP_CLOSE, &payload[..2 + reason.len()])
            .await?;
        self.closed = true;
        Ok(())
    }

    /// Shuts the stream down for writing (for TLS, a close_notify).
    pub async fn shutdown(&mut self) -> Result<(), WsError> {
        self.inner.shutdown().await?;
        Ok(())
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), WsError> {
        if self.closed {
            return Err(WsError::Closed);
        }
        if self.broken {
            return Err(WsError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier WebSocket frame was cut short; the connection is unusable",
            )));
        }
        let key = self.mask_key()?;

        self.buf.clear();
        self.buf.push(0x80 | opcode); // FIN, no reserved bits
        match payload.len() {
            len @ 0..=125 => self.buf.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                self.buf.push(0x80 | 126);
                self.buf.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                self.buf.push(0x80 | 127);
                self.buf.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        self.buf.extend_from_slice(&key);

        // Header and payload in one write when the frame is small; a large
        // frame in WRITE_CHUNK pieces through the same buffer.
        self.broken = true;
        let mut offset = 0;
        loop {
            let room = WRITE_CHUNK.saturating_sub(self.buf.len()).max(1);
            let end = payload.len().min(offset + room);
            let start = self.buf.len();
            self.buf.extend_from_slice(&payload[offset..end]);
            apply_mask(&mut self.buf[start..], key, offset);
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
            offset = end;
            if offset >= payload.len() {
                break;
            }
        }
        self.inner.flush().await?;
        self.broken = false;
        Ok(())
    }

    /// Four fresh random bytes.
    fn mask_key(&mut self) -> Result<[u8; 4], WsError> {
        if self.mask_used + 4 > self.mask_pool.len() {
            self.rng
                .fill(&mut self.mask_pool)
                .map_err(|_| WsError::Io(no_randomness()))?;
            self.mask_used = 0;
        }
        let mut key = [0u8; 4];
        key.copy_from_slice(&self.mask_pool[self.mask_used..self.mask_used + 4]);
        self.mask_used += 4;
        Ok(key)
    }
}

fn check_control(data: &[u8]) -> Result<(), WsError> {
    if data.len() > MAX_CONTROL_PAYLOAD {
        return Err(WsError::Protocol(format!(
            "a ping or pong holds at most {MAX_CONTROL_PAYLOAD} bytes, not {}",
            data.len()
        )));
    }
    Ok(())
}

/// XORs `data`, which starts `offset` bytes into a payload, with the mask.
fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let key = [
        key[offset % 4],
        key[(offset + 1) % 4],
        key[(offset + 2) % 4],
        key[(offset + 3) % 4],
    ];
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        for (b, k) in chunk.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio_tungstenite::tungstenite::handshake::server::{
        Request as ServerRequest, Response as ServerResponse,
    };
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame as TCloseFrame, Frame};
    use tokio_tungstenite::tungstenite::Message as TMessage;
    use tokio_tungstenite::WebSocketStream;

    use super::*;

    type Client = (Reader<ReadHalf<TcpStream>>, Writer<WriteHalf<TcpStream>>);

    const PLAIN: Request<'static> = Request {
        host: "example.test",
        path: "/",
        headers: &[],
        subprotocol: None,
    };

    async fn listen() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    async fn dial(
        addr: SocketAddr,
        request: &Request<'_>,
        limits: Limits,
    ) -> Result<Client, HandshakeError> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connect(tcp, request, limits).await
    }

    async fn recv(reader: &mut Reader<ReadHalf<TcpStream>>) -> Result<Message, WsError> {
        tokio::time::timeout(Duration::from_secs(10), reader.recv())
            .await
            .expect("no message within 10 s")
    }

    /// A tungstenite server for one connection, running `serve` on it.
    async fn tungstenite_server<F, Fut>(serve: F) -> SocketAddr
    where
        F: FnOnce(WebSocketStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (listener, addr) = listen().await;
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            serve(ws).await;
        });
        addr
    }

    /// A tungstenite server that sends back every data message.
    async fn echo_server() -> SocketAddr {
        tungstenite_server(|mut ws| async move {
            while let Some(Ok(message)) = ws.next().await {
                if message.is_binary() || message.is_text() {
                    ws.send(message).await.unwrap();
                }
            }
        })
        .await
    }

    /// A hand-written server: reads the request head and hands the stream,
    /// the head and the accept for its key to `serve`.
    async fn raw_server<F, Fut>(serve: F) -> SocketAddr
    where
        F: FnOnce(TcpStream, String, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (listener, addr) = listen().await;
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if tcp.read_exact(&mut byte).await.is_err() {
                    return;
                }
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim()
                .to_string();
            serve(tcp, head, accept_for(&key)).await;
        });
        addr
    }

    fn switching(accept: &str) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
    }

    #[test]
    fn accept_matches_the_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn handshake_sends_subprotocol_and_extra_headers() {
        let (listener, addr) = listen().await;
        let (seen_tx, seen_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // The callback's error type is tungstenite's, not ours to shrink.
            #[allow(clippy::result_large_err)]
            let callback = move |req: &ServerRequest, mut resp: ServerResponse| {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_string())
                };
                let _ = seen_tx.send((
                    req.uri().to_string(),
                    header("host"),
                    header("authorization"),
                    header("origin"),
                    header("sec-websocket-protocol"),
                ));
                resp.headers_mut()
                    .insert("Sec-WebSocket-Protocol", "data-channel".parse().unwrap());
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
                .await
                .unwrap();
            ws.send(TMessage::text("welcome")).await.unwrap();
            while ws.next().await.is_some() {}
        });
        let request = Request {
            host: "tunnel.example.test:443",
            path: "/v4/connect?project=p&zone=z",
            headers: &[
                ("Authorization", "Bearer t0ken"),
                ("Origin", "bot:iap-tunneler"),
            ],
            subprotocol: Some("data-channel"),
        };
        let (mut reader, _writer) = dial(addr, &request, Limits::default()).await.unwrap();
        let (uri, host, authorization, origin, protocol) = seen_rx.await.unwrap();
        assert_eq!(uri, "/v4/connect?project=p&zone=z");
        assert_eq!(host.as_deref(), Some("tunnel.example.test:443"));
        assert_eq!(authorization.as_deref(), Some("Bearer t0ken"));
        assert_eq!(origin.as_deref(), Some("bot:iap-tunneler"));
        assert_eq!(protocol.as_deref(), Some("data-channel"));
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Text("welcome".into())
        );
    }

    #[tokio::test]
    async fn binary_messages_of_every_length_encoding_echo() {
        let addr = echo_server().await;
        let (mut reader, mut writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        for len in [0, 1, 125, 126, 65535, 65536, 300 * 1024] {
            let data = pattern(len);
            writer.send_binary(&data).await.unwrap();
            match recv(&mut reader).await.unwrap() {
                Message::Binary(got) => {
                    assert_eq!(got.len(), len, "length {len}");
                    assert!(got[..] == data[..], "content of the {len}-byte message");
                }
                other => panic!("{len} bytes: expected binary, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn text_messages_echo() {
        let addr = echo_server().await;
        let (mut reader, mut writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        for text in ["", "hello", "héllo wörld ✓ 🦀", &"x".repeat(70_000)] {
            writer.send_text(text).await.unwrap();
            assert_eq!(recv(&mut reader).await.unwrap(), Message::Text(text.into()));
        }
    }

    #[tokio::test]
    async fn pings_both_ways() {
        let (done_tx, done_rx) = oneshot::channel();
        let addr = tungstenite_server(|mut ws| async move {
            ws.send(TMessage::Ping(Bytes::from_static(b"are you there")))
                .await
                .unwrap();
            // The first message from the client is its pong; tungstenite
            // answers the client's ping by itself.
            let mut pong = None;
            while let Some(Ok(message)) = ws.next().await {
                if let TMessage::Pong(data) = message {
                    pong = Some(data);
                    break;
                }
            }
            let _ = done_tx.send(pong);
            while ws.next().await.is_some() {}
        })
        .await;
        let (mut reader, mut writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        let ping = recv(&mut reader).await.unwrap();
        assert_eq!(ping, Message::Ping(Bytes::from_static(b"are you there")));
        writer.pong(b"are you there").await.unwrap();
        assert_eq!(
            done_rx.await.unwrap(),
            Some(Bytes::from_static(b"are you there"))
        );

        writer.ping(b"and you?").await.unwrap();
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Pong(Bytes::from_static(b"and you?"))
        );
        assert!(matches!(
            writer.ping(&[0; 126]).await,
            Err(WsError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn fragmented_messages_are_reassembled_around_control_frames() {
        let addr = tungstenite_server(|mut ws| async move {
            let frames = [
                Frame::message(&b"hel"[..], OpCode::Data(Data::Text), false),
                Frame::ping(&b"between"[..]),
                Frame::message(&b"lo w"[..], OpCode::Data(Data::Continue), false),
                Frame::message("örld".as_bytes(), OpCode::Data(Data::Continue), true),
                Frame::message(pattern(100_000), OpCode::Data(Data::Binary), false),
                Frame::message(pattern(0), OpCode::Data(Data::Continue), false),
                Frame::message(pattern(50_000), OpCode::Data(Data::Continue), true),
            ];
            for frame in frames {
                ws.send(TMessage::Frame(frame)).await.unwrap();
            }
            while ws.next().await.is_some() {}
        })
        .await;
        let (mut reader, _writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Ping(Bytes::from_static(b"between"))
        );
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Text("hello wörld".into())
        );
        let mut expected = pattern(100_000);
        expected.extend_from_slice(&pattern(50_000));
        match recv(&mut reader).await.unwrap() {
            Message::Binary(got) => assert!(got[..] == expected[..], "reassembled binary"),
            other => panic!("expected binary, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn client_close_with_code_and_reason() {
        let (seen_tx, seen_rx) = oneshot::channel();
        let addr = tungstenite_server(|mut ws| async move {
            let mut close = None;
            while let Some(Ok(message)) = ws.next().await {
                if let TMessage::Close(frame) = message {
                    close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    break;
                }
            }
            let _ = seen_tx.send(close);
            // tungstenite answers the close by itself when it is flushed.
            let _ = ws.flush().await;
        })
        .await;
        let (mut reader, mut writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        writer.close(4001, "done here").await.unwrap();
        assert_eq!(
            seen_rx.await.unwrap(),
            Some((4001, "done here".to_string()))
        );
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Close(Some(CloseFrame {
                code: 4001,
                reason: "done here".into()
            }))
        );
        assert!(matches!(recv(&mut reader).await, Err(WsError::Closed)));
        assert!(matches!(
            writer.send_binary(b"late").await,
            Err(WsError::Closed)
        ));
    }

    #[tokio::test]
    async fn server_close_with_code_and_reason() {
        let addr = tungstenite_server(|mut ws| async move {
            ws.close(Some(TCloseFrame {
                code: CloseCode::Away,
                reason: "going away".into(),
            }))
            .await
            .unwrap();
            while ws.next().await.is_some() {}
        })
        .await;
        let (mut reader, mut writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Close(Some(CloseFrame {
                code: 1001,
                reason: "going away".into()
            }))
        );
        assert!(matches!(recv(&mut reader).await, Err(WsError::Closed)));
        // Answering the close is the caller's choice, and still allowed.
        writer.close(1000, "").await.unwrap();
    }

    #[tokio::test]
    async fn oversize_messages_are_errors() {
        let addr = tungstenite_server(|mut ws| async move {
            ws.send(TMessage::binary(pattern(1000))).await.unwrap();
            ws.send(TMessage::binary(pattern(1001))).await.unwrap();
            while ws.next().await.is_some() {}
        })
        .await;
        let limits = Limits { max_message: 1000 };
        let (mut reader, _writer) = dial(addr, &PLAIN, limits).await.unwrap();
        match recv(&mut reader).await.unwrap() {
            Message::Binary(got) => assert_eq!(got.len(), 1000),
            other => panic!("expected binary, got {other:?}"),
        }
        match recv(&mut reader).await {
            Err(WsError::Protocol(why)) => assert!(why.contains("1001"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        // And it stays failed.
        assert!(matches!(recv(&mut reader).await, Err(WsError::Protocol(_))));
    }

    #[tokio::test]
    async fn oversize_fragmented_message_is_an_error() {
        let addr = tungstenite_server(|mut ws| async move {
            for (data, fin, op) in [(600, false, Data::Binary), (600, true, Data::Continue)] {
                let frame = Frame::message(pattern(data), OpCode::Data(op), fin);
                ws.send(TMessage::Frame(frame)).await.unwrap();
            }
            while ws.next().await.is_some() {}
        })
        .await;
        let limits = Limits { max_message: 1000 };
        let (mut reader, _writer) = dial(addr, &PLAIN, limits).await.unwrap();
        match recv(&mut reader).await {
            Err(WsError::Protocol(why)) => assert!(why.contains("limit of 1000"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn wrong_accept_is_a_protocol_error() {
        let addr = raw_server(|mut tcp, _head, _accept| async move {
            let wrong = accept_for("AAAAAAAAAAAAAAAAAAAAAA==");
            tcp.write_all(switching(&wrong).as_bytes()).await.unwrap();
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        match dial(addr, &PLAIN, Limits::default()).await {
            Err(HandshakeError::Protocol(why)) => {
                assert!(why.contains("Sec-WebSocket-Accept"), "{why}")
            }
            other => panic!("expected a protocol error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn missing_upgrade_header_is_a_protocol_error() {
        let addr = raw_server(|mut tcp, _head, accept| async move {
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            tcp.write_all(head.as_bytes()).await.unwrap();
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        match dial(addr, &PLAIN, Limits::default()).await {
            Err(HandshakeError::Protocol(why)) => assert!(why.contains("Upgrade"), "{why}"),
            other => panic!("expected a protocol error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn subprotocol_not_echoed_is_a_protocol_error() {
        let addr = raw_server(|mut tcp, head, accept| async move {
            assert!(head.contains("Sec-WebSocket-Protocol: data-channel\r\n"));
            tcp.write_all(switching(&accept).as_bytes()).await.unwrap();
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        let request = Request {
            subprotocol: Some("data-channel"),
            ..PLAIN
        };
        match dial(addr, &request, Limits::default()).await {
            Err(HandshakeError::Protocol(why)) => assert!(why.contains("data-channel"), "{why}"),
            other => panic!("expected a protocol error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn refusal_comes_back_with_status_headers_and_body() {
        let body = r#"{"error":"permission denied","code":403}"#;
        let addr = raw_server(move |mut tcp, _head, _accept| async move {
            let response = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nX-Request-Id: abc\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(response.as_bytes()).await.unwrap();
            // Keep-alive: the connection stays open; Content-Length ends the body.
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        match dial(addr, &PLAIN, Limits::default()).await {
            Err(HandshakeError::Status {
                status,
                reason,
                headers,
                body: got,
            }) => {
                assert_eq!(status, 403);
                assert_eq!(reason, "Forbidden");
                assert_eq!(got, body);
                assert!(headers.contains(&("content-type".into(), "application/json".into())));
                assert!(headers.contains(&("x-request-id".into(), "abc".into())));
            }
            other => panic!("expected a status error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn chunked_refusal_body_is_decoded() {
        let addr = raw_server(|mut tcp, _head, _accept| async move {
            let response = "HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n\
                            5\r\nhello\r\n7\r\n, token\r\n0\r\n\r\n";
            tcp.write_all(response.as_bytes()).await.unwrap();
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        match dial(addr, &PLAIN, Limits::default()).await {
            Err(HandshakeError::Status { status, body, .. }) => {
                assert_eq!(status, 401);
                assert_eq!(body, "hello, token");
            }
            other => panic!("expected a status error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn long_refusal_body_is_cut_at_4_kib() {
        let addr = raw_server(|mut tcp, _head, _accept| async move {
            // No Content-Length: the body ends with the connection.
            let response = format!("HTTP/1.1 502 Bad Gateway\r\n\r\n{}", "e".repeat(10_000));
            tcp.write_all(response.as_bytes()).await.unwrap();
        })
        .await;
        match dial(addr, &PLAIN, Limits::default()).await {
            Err(HandshakeError::Status { status, body, .. }) => {
                assert_eq!(status, 502);
                assert_eq!(body, "e".repeat(4096));
            }
            other => panic!("expected a status error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn first_frames_in_the_101_segment_are_kept() {
        let addr = raw_server(|mut tcp, _head, accept| async move {
            let mut all = switching(&accept).into_bytes();
            all.extend_from_slice(&[0x82, 0x03, 1, 2, 3]);
            all.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
            // The start of a third frame, the rest later.
            all.extend_from_slice(&[0x82, 0x04, 9]);
            tcp.write_all(&all).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tcp.write_all(&[8, 7, 6]).await.unwrap();
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        let (mut reader, _writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Binary(Bytes::from_static(&[1, 2, 3]))
        );
        assert_eq!(recv(&mut reader).await.unwrap(), Message::Text("hi".into()));
        assert_eq!(
            recv(&mut reader).await.unwrap(),
            Message::Binary(Bytes::from_static(&[9, 8, 7, 6]))
        );
    }

    #[tokio::test]
    async fn masked_server_frame_is_a_protocol_error() {
        let addr = raw_server(|mut tcp, _head, accept| async move {
            tcp.write_all(switching(&accept).as_bytes()).await.unwrap();
            // "hi", masked with 1 2 3 4.
            tcp.write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
                .await
                .unwrap();
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        let (mut reader, _writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        match recv(&mut reader).await {
            Err(WsError::Protocol(why)) => assert!(why.contains("masked"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn end_of_stream_without_close() {
        let addr = raw_server(|mut tcp, _head, accept| async move {
            tcp.write_all(switching(&accept).as_bytes()).await.unwrap();
            // Half a frame, then the end.
            tcp.write_all(&[0x82, 0x05, 1, 2]).await.unwrap();
        })
        .await;
        let (mut reader, _writer) = dial(addr, &PLAIN, Limits::default()).await.unwrap();
        assert!(matches!(recv(&mut reader).await, Err(WsError::EndOfStream)));
        assert!(matches!(recv(&mut reader).await, Err(WsError::EndOfStream)));
    }

    /// What a reader makes of `bytes` from the server.
    async fn read_all(bytes: &[u8], limits: Limits) -> Vec<Result<Message, String>> {
        let mut reader = Reader::new(bytes, BytesMut::new(), limits);
        let mut out = Vec::new();
        loop {
            match reader.recv().await {
                Ok(message) => out.push(Ok(message)),
                Err(WsError::Protocol(why)) => {
                    out.push(Err(why));
                    return out;
                }
                Err(_) => return out,
            }
        }
    }

    async fn first_error(bytes: &[u8]) -> String {
        match read_all(bytes, Limits::default()).await.pop() {
            Some(Err(why)) => why,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_frames_are_protocol_errors() {
        assert!(first_error(&[0xC2, 0x00]).await.contains("reserved bits"));
        assert!(first_error(&[0x83, 0x00])
            .await
            .contains("unknown opcode 0x3"));
        assert!(first_error(&[0x8B, 0x00])
            .await
            .contains("unknown opcode 0xb"));
        assert!(first_error(&[0x09, 0x00])
            .await
            .contains("fragmented control"));
        let mut long_ping = vec![0x89, 126, 0, 126];
        long_ping.extend_from_slice(&[0; 126]);
        assert!(first_error(&long_ping).await.contains("126 bytes"));
        assert!(first_error(&[0x80, 0x01, 0])
            .await
            .contains("continuation frame without"));
        assert!(first_error(&[0x01, 0x01, b'a', 0x81, 0x01, b'b'])
            .await
            .contains("new data message"));
        assert!(first_error(&[0x81, 0x02, 0xC3, 0x28])
            .await
            .contains("not valid UTF-8"));
        let huge = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(first_error(&huge).await.contains("top bit"));
        assert!(first_error(&[0x88, 0x01, 3]).await.contains("1-byte"));
    }

    #[tokio::test]
    async fn close_frames_and_what_follows_them() {
        // A close with no body, then nothing more is read.
        let messages = read_all(&[0x88, 0x00, 0x82, 0x01, 7], Limits::default()).await;
        assert_eq!(messages, vec![Ok(Message::Close(None))]);
        let mut reader = Reader::new(&[0x88, 0x00][..], BytesMut::new(), Limits::default());
        assert_eq!(reader.recv().await.unwrap(), Message::Close(None));
        assert!(matches!(reader.recv().await, Err(WsError::Closed)));
        // A close that interrupts a fragmented message.
        let messages = read_all(
            &[0x02, 0x01, 1, 0x88, 0x04, 0x03, 0xE8, b'o', b'k'],
            Limits::default(),
        )
        .await;
        assert_eq!(
            messages,
            vec![Ok(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "ok".into()
            })))]
        );
    }

    #[tokio::test]
    async fn length_encodings_are_read() {
        let mut bytes = vec![0x82, 126, 0x01, 0x00];
        bytes.extend_from_slice(&pattern(256));
        bytes.extend_from_slice(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        bytes.extend_from_slice(&pattern(65536));
        let messages = read_all(&bytes, Limits::default()).await;
        assert_eq!(
            messages,
            vec![
                Ok(Message::Binary(pattern(256).into())),
                Ok(Message::Binary(pattern(65536).into()))
            ]
        );
    }

    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let (mut server, client) = tokio::io::duplex(64);
        let mut frames = Vec::new();
        for i in 0..5u8 {
            frames.extend_from_slice(&[0x02, 0x02, i, i]); // binary, not final
            frames.extend_from_slice(&[0x89, 0x01, i]); // a ping between
            frames.extend_from_slice(&[0x80, 126, 0x01, 0x00]);
            frames.extend_from_slice(&vec![i; 256]);
        }
        tokio::spawn(async move {
            for byte in frames {
                server.write_all(&[byte]).await.unwrap();
                if byte % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            server.shutdown().await.unwrap();
        });
        let mut reader = Reader::new(client, BytesMut::new(), Limits::default());
        let mut got = Vec::new();
        let mut cancelled = 0;
        loop {
            tokio::select! {
                message = reader.recv() => match message {
                    Ok(message) => got.push(message),
                    Err(WsError::EndOfStream) => break,
                    Err(e) => panic!("{e}"),
                },
                _ = tokio::task::yield_now() => cancelled += 1,
            }
        }
        assert!(cancelled > 10, "recv was cancelled {cancelled} times only");
        let mut expected = Vec::new();
        for i in 0..5u8 {
            expected.push(Message::Ping(Bytes::from(vec![i])));
            let mut data = vec![i, i];
            data.extend_from_slice(&[i; 256]);
            expected.push(Message::Binary(data.into()));
        }
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn client_frames_are_masked_with_fresh_keys() {
        let mut writer = Writer::with_rng(Vec::new(), ring::rand::SystemRandom::new());
        let payload = pattern(70_000);
        writer.send_binary(&payload).await.unwrap();
        writer.send_binary(&payload).await.unwrap();
        writer.close(1000, &"é".repeat(100)).await.unwrap();
        assert!(matches!(writer.pong(b"").await, Err(WsError::Closed)));

        // Unmask what was written with an independent decoder.
        let mut out = &writer.inner[..];
        let mut keys = Vec::new();
        for expected in [&payload[..], &payload[..]] {
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1], 0x80 | 127);
            assert_eq!(
                u64::from_be_bytes(out[2..10].try_into().unwrap()),
                payload.len() as u64
            );
            let key = &out[10..14];
            keys.push(key.to_vec());
            let unmasked: Vec<u8> = out[14..14 + expected.len()]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert!(unmasked == expected, "unmasked payload");
            out = &out[14 + expected.len()..];
        }
        assert_ne!(keys[0], keys[1], "each frame has its own mask key");
        // The close: 2 bytes of code, the reason cut to 123 bytes on a
        // character boundary (61 two-byte characters).
        assert_eq!(out[0], 0x88);
        assert_eq!(out[1], 0x80 | 124);
        let key = &out[2..6];
        let body: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(body.len(), 124);
        assert_eq!(&body[..2], &1000u16.to_be_bytes());
        assert_eq!(std::str::from_utf8(&body[2..]).unwrap(), "é".repeat(61));
    }

    #[test]
    fn response_heads_are_parsed_case_insensitively() {
        let response = parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nUPGRADE: WebSocket\r\n\
              connection: keep-alive, Upgrade\r\nSec-Websocket-Accept:  abc= \r\n\r\n",
        )
        .unwrap();
        assert_eq!(response.status, 101);
        assert_eq!(response.reason, "Switching Protocols");
        assert!(response.has_token("upgrade", "websocket"));
        assert!(response.has_token("connection", "upgrade"));
        assert_eq!(
            response.values("sec-websocket-accept").collect::<Vec<_>>(),
            ["abc="]
        );
        // No reason phrase at all.
        let response = parse_response(b"HTTP/1.1 503\r\n\r\n").unwrap();
        assert_eq!((response.status, response.reason.as_str()), (503, ""));
        for bad in [
            &b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..],
            b"HTTP/1.1 1O1 x\r\n\r\n",
        ] {
            assert!(matches!(
                parse_response(bad),
                Err(HandshakeError::Protocol(why)) if why.contains("did not answer with HTTP")
            ));
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 101 x\r\nno colon here\r\n\r\n"),
            Err(HandshakeError::Protocol(why)) if why.contains("no colon")
        ));
    }

    #[tokio::test]
    async fn endless_response_head_is_refused() {
        let addr = raw_server(|mut tcp, _head, _accept| async move {
            let mut response = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
            for i in 0..1000 {
                response.extend_from_slice(format!("X-Filler-{i}: 0123456789\r\n").as_bytes());
            }
            let _ = tcp.write_all(&response).await;
            let _ = tcp.read(&mut [0; 16]).await;
        })
        .await;
        match dial(addr, &PLAIN, Limits::default()).await {
            Err(HandshakeError::Protocol(why)) => assert!(why.contains("16 KiB"), "{why}"),
            other => panic!("expected a protocol error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn request_head_refuses_line_breaks() {
        let request = Request {
            headers: &[("X-Evil", "a\r\nInjected: yes")],
            ..PLAIN
        };
        assert!(matches!(
            request_head(&request, "k"),
            Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::InvalidInput
        ));
        let head = request_head(
            &Request {
                headers: &[("Authorization", "Bearer x")],
                subprotocol: Some("p"),
                ..PLAIN
            },
            "k",
        )
        .unwrap();
        assert_eq!(
            head,
            "GET / HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: p\r\n\
             Authorization: Bearer x\r\n\r\n"
        );
    }
}
