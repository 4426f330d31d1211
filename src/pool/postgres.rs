//! The Postgres side of the pool: a logged-in server connection
//! ([`PgConn`]), the key a client's startup packet selects one with, the
//! login replayed to a client that gets a pooled connection, the reset
//! (`DISCARD ALL`), and the relay for pooled sessions, which frames the
//! messages of both directions just enough to know when the session may go
//! back: the client's Terminate, and the server's ReadyForQuery status.
//!
//! Why `DISCARD ALL` is enough: it drops temporary tables, prepared
//! statements (SQL and protocol level), portals, `LISTEN`s, session
//! advisory locks, cached plans and sequence state, and runs `RESET ALL`
//! and `SET SESSION AUTHORIZATION DEFAULT`. `RESET ALL` returns every
//! setting to its session default, which is the value the startup packet
//! gave, so a connection comes back as a fresh login with the same startup
//! parameters would be. That is why those parameters, `application_name`
//! and `options` included, are part of the key.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{poll_write_out, Key, ServerConnection};
use crate::protocol::postgres::{self as pg, tag, CancelKey, StartupMessage};
use crate::upstream::UpstreamStream;

/// What the server said at a login keyhole made, as it stands after the
/// last reset: what a client is told in place of the login.
#[derive(Debug, Default)]
pub struct LoginRecord {
    /// ParameterStatus bodies (`name\0value\0`), in the server's order.
    params: Vec<Bytes>,
    /// NegotiateProtocolVersion, if the server sent one.
    negotiate: Option<Bytes>,
    /// The key the server issued (BackendKeyData).
    pub server_key: Option<CancelKey>,
}

impl LoginRecord {
    /// Records a message the server sent during the login or a reset
    /// (ParameterStatus, NegotiateProtocolVersion, BackendKeyData; others
    /// are not replayed).
    pub fn learn(&mut self, msg: &pg::Message) {
        match msg.tag {
            b'S' => {
                let name_end = msg
                    .body
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(msg.body.len());
                let name = &msg.body[..name_end];
                match self
                    .params
                    .iter_mut()
                    .find(|p| p.get(..name_end) == Some(name) && p.get(name_end) == Some(&0))
                {
                    Some(known) => *known = msg.body.clone(),
                    None => self.params.push(msg.body.clone()),
                }
            }
            b'v' => self.negotiate = Some(msg.body.clone()),
            tag::BACKEND_KEY_DATA => self.server_key = pg::backend_key(msg),
            _ => {}
        }
    }

    /// What the client gets in place of the login: AuthenticationOk, the
    /// session's parameters as they stand, `client_key` as BackendKeyData,
    /// ReadyForQuery (idle).
    pub fn replay(&self, client_key: Option<&CancelKey>) -> BytesMut {
        let size = 256 + self.params.iter().map(Bytes::len).sum::<usize>();
        let mut out = BytesMut::with_capacity(size);
        out.put_u8(tag::AUTHENTICATION);
        out.put_u32(8);
        out.put_u32(pg::auth::OK);
        if let Some(body) = &self.negotiate {
            message(&mut out, b'v', body);
        }
        for body in &self.params {
            message(&mut out, b'S', body);
        }
        if let Some(key) = client_key {
            let request = key.cancel_request();
            message(&mut out, tag::BACKEND_KEY_DATA, &request[8..]);
        }
        message(&mut out, tag::READY_FOR_QUERY, b"I");
        out
    }
}

/// A server connection keyhole logged in to, idle between clients.
pub struct PgConn {
    pub stream: UpstreamStream,
    pub login: LoginRecord,
}

fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(body);
}

/// The key a pooled client is given for `server_key`: the server's process
/// id (drivers compare it with notifications' senders), a secret of the
/// same length drawn fresh, so a key never outlives its client's hold on
/// the connection.
pub fn client_key(
    server_key: &CancelKey,
    random: &dyn ring::rand::SecureRandom,
) -> Option<CancelKey> {
    let wire = server_key.cancel_request();
    let mut key = wire[8..].to_vec();
    random.fill(key.get_mut(4..)?).ok()?;
    Some(CancelKey::from_wire(Bytes::from(key)))
}

/// Why a client's session cannot be pooled.
#[derive(Debug, PartialEq, Eq)]
pub enum Unpooled {
    /// A replication connection (physical or logical walsender): its
    /// protocol has no reset.
    Replication,
}

impl Unpooled {
    pub fn why(&self) -> &'static str {
        match self {
            Unpooled::Replication => "replication connection",
        }
    }
}

/// The pool key of a startup packet (already carrying the database user):
/// the protocol version and every parameter, sorted by name. `Err` for a
/// session the pool cannot give back to anyone.
pub fn session_key(startup: &StartupMessage) -> Result<Key, Unpooled> {
    let mut pairs: Vec<(&[u8], &[u8])> = Vec::new();
    let mut rest = startup.raw.get(8..).unwrap_or_default();
    while let Some(name) = take_cstr(&mut rest).filter(|n| !n.is_empty()) {
        let value = take_cstr(&mut rest).unwrap_or_default();
        if name == b"replication" && !is_false(value) {
            return Err(Unpooled::Replication);
        }
        pairs.push((name, value));
    }
    pairs.sort_unstable();
    let mut key = Vec::with_capacity(startup.raw.len());
    key.extend_from_slice(&startup.version.0.to_be_bytes());
    for (name, value) in pairs {
        key.extend_from_slice(name);
        key.push(0);
        key.extend_from_slice(value);
        key.push(0);
    }
    Ok(key.into_boxed_slice())
}

fn is_false(value: &[u8]) -> bool {
    let v = value.to_ascii_lowercase();
    matches!(&v[..], b"false" | b"off" | b"no" | b"0" | b"f" | b"n")
}

fn take_cstr<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = rest.iter().position(|&b| b == 0)?;
    let s = &rest[..end];
    *rest = &rest[end + 1..];
    Some(s)
}

/// `DISCARD ALL` as a simple Query.
const DISCARD_ALL: &[u8] = b"Q\0\0\0\x10DISCARD ALL\0";
/// Terminate.
const TERMINATE: &[u8] = b"X\0\0\0\x04";

impl ServerConnection for PgConn {
    fn is_alive(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut scratch = [0u8; 64];
        let mut buf = ReadBuf::new(&mut scratch);
        // Anything but "nothing to read" (EOF, an error, a message nobody
        // asked for, such as the FATAL of a server shutting down) ends it.
        Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    async fn reset(&mut self, limit: Duration) -> Result<(), String> {
        let work = async {
            self.stream
                .write_all(DISCARD_ALL)
                .await
                .map_err(|e| e.to_string())?;
            self.stream.flush().await.map_err(|e| e.to_string())?;
            let mut buf = BytesMut::with_capacity(512);
            loop {
                let msg = loop {
                    match pg::decode_message(&mut buf, pg::MAX_STARTUP_PHASE_MESSAGE_LEN)
                        .map_err(|e| e.to_string())?
                    {
                        Some(msg) => break msg,
                        None => {
                            if self
                                .stream
                                .read_buf(&mut buf)
                                .await
                                .map_err(|e| e.to_string())?
                                == 0
                            {
                                return Err("the server closed the connection".to_owned());
                            }
                        }
                    }
                };
                match msg.tag {
                    tag::ERROR_RESPONSE => {
                        let code = pg::error_fields(&msg)
                            .into_iter()
                            .find(|(f, _)| *f == b'C')
                            .map(|(_, v)| v)
                            .unwrap_or_default();
                        return Err(format!("DISCARD ALL failed with SQLSTATE {code}"));
                    }
                    tag::READY_FOR_QUERY => {
                        if msg.body.first() != Some(&b'I') || !buf.is_empty() {
                            return Err("the session is not idle after DISCARD ALL".to_owned());
                        }
                        return Ok(());
                    }
                    // CommandComplete, ParameterStatus (settings going back
                    // to their defaults), notices, late notifications.
                    _ => self.login.learn(&msg),
                }
            }
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| "DISCARD ALL did not finish in time".to_owned())?
    }

    async fn close(mut self) {
        let _ = self.stream.write_all(TERMINATE).await;
        let _ = self.stream.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// How a pooled session's relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate with the session idle and nothing in
    /// flight: the connection may be reset and reused.
    Clean,
    /// Terminate while a statement, a COPY, a pipeline or a transaction
    /// was still open.
    Dirty,
    /// The client's leg ended without a Terminate; `busy` when the server
    /// still had a statement to answer.
    ClientGone {
        busy: bool,
        error: Option<io::Error>,
    },
    /// The server's leg ended.
    ServerGone(Option<io::Error>),
    /// A message length that cannot be (a broken client or server).
    Protocol(&'static str),
}

impl RelayEnd {
    /// The side that ended the session.
    pub fn first_to_end(&self) -> Option<crate::splice::Side> {
        use crate::splice::Side;
        match self {
            RelayEnd::Clean | RelayEnd::Dirty | RelayEnd::ClientGone { .. } => Some(Side::Client),
            RelayEnd::ServerGone(_) => Some(Side::Server),
            RelayEnd::Protocol(_) => None,
        }
    }
}

/// Session state read off the messages.
struct Frames {
    /// ReadyForQuery messages the server still owes (one per Query,
    /// FunctionCall and Sync).
    owed: u64,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The status of the last ReadyForQuery.
    status: u8,
}

impl Frames {
    fn idle(&self) -> bool {
        self.owed == 0 && !self.unsynced && self.status == b'I'
    }

    /// A client message event; false at the Terminate (which is kept from
    /// the server, and after which nothing more is read).
    fn see_client(&mut self, event: Event, goodbye: &mut bool) -> bool {
        match event {
            Event::Start(b'X') => {
                *goodbye = true;
                false
            }
            // Each of these is answered by one ReadyForQuery.
            Event::Start(b'Q' | b'F' | b'S') => {
                self.owed += 1;
                true
            }
            // Extended protocol: open until a Sync is answered.
            Event::Start(b'P' | b'B' | b'E' | b'D' | b'C') => {
                self.unsynced = true;
                true
            }
            _ => true,
        }
    }

    /// A server message event: ReadyForQuery's status.
    fn see_server(&mut self, event: Event) {
        if let Event::First(tag::READY_FOR_QUERY, status) = event {
            self.status = status;
            self.owed = self.owed.saturating_sub(1);
            if self.owed == 0 {
                // Every Sync answered: no pipeline open.
                self.unsynced = false;
            }
        }
    }
}

/// Where a direction's scanner stands in the message stream.
#[derive(Clone, Copy)]
enum Scan {
    Tag,
    Len { tag: u8, got: u8, len: [u8; 4] },
    Body { tag: u8, left: usize, first: bool },
}

enum Event {
    /// A message starts with this tag.
    Start(u8),
    /// The first byte of a message's body.
    First(u8, u8),
}

/// Walks `bytes` from `scan`, reporting message starts and first body
/// bytes; `on` returning false stops the walk at that message's start,
/// which is returned.
fn walk(
    scan: &mut Scan,
    bytes: &[u8],
    mut on: impl FnMut(Event) -> bool,
) -> Result<Option<usize>, &'static str> {
    let mut i = 0;
    while i < bytes.len() {
        match *scan {
            Scan::Tag => {
                if !on(Event::Start(bytes[i])) {
                    return Ok(Some(i));
                }
                *scan = Scan::Len {
                    tag: bytes[i],
                    got: 0,
                    len: [0; 4],
                };
                i += 1;
            }
            Scan::Len { tag, got, mut len } => {
                len[usize::from(got)] = bytes[i];
                i += 1;
                *scan = if got == 3 {
                    let total = u32::from_be_bytes(len) as usize;
                    if total < 4 {
                        return Err("a message length under 4");
                    }
                    if total == 4 {
                        Scan::Tag
                    } else {
                        Scan::Body {
                            tag,
                            left: total - 4,
                            first: true,
                        }
                    }
                } else {
                    Scan::Len {
                        tag,
                        got: got + 1,
                        len,
                    }
                };
            }
            Scan::Body { tag, left, first } => {
                if first {
                    on(Event::First(tag, bytes[i]));
                }
                let take = left.min(bytes.len() - i);
                i += take;
                *scan = if take == left {
                    Scan::Tag
                } else {
                    Scan::Body {
                        tag,
                        left: left - take,
                        first: false,
                    }
                };
            }
        }
    }
    Ok(None)
}

/// Size of each direction's buffer.
const RELAY_BUFFER: usize = 16 * 1024;

/// One direction: bytes read, not yet written.
struct Half {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    scan: Scan,
    unflushed: bool,
    moved: u64,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0u8; RELAY_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            scan: Scan::Tag,
            unflushed: false,
            moved: 0,
        }
    }
}

/// The relay of a pooled session: bytes pass through in bulk, each
/// direction's message headers are walked in place (no copy, no
/// allocation per message), and the client's Terminate is kept from the
/// server, so that the connection can be reset and reused.
pub struct PooledRelay<'a, C: ?Sized, S: ?Sized> {
    client: &'a mut C,
    server: &'a mut S,
    up: Half,
    down: Half,
    frames: Frames,
    said_goodbye: bool,
}

impl<'a, C, S> PooledRelay<'a, C, S>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    pub fn new(client: &'a mut C, server: &'a mut S) -> Self {
        PooledRelay {
            client,
            server,
            up: Half::new(),
            down: Half::new(),
            frames: Frames {
                owed: 0,
                unsynced: false,
                status: b'I',
            },
            said_goodbye: false,
        }
    }

    /// Bytes the client sent before the relay started (pipelined behind
    /// its startup packet): walked and sent first, as if read now.
    pub fn preload(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        if bytes.is_empty() {
            return Ok(());
        }
        let up = &mut self.up;
        let room = up
            .buf
            .get_mut(..bytes.len())
            .ok_or("too much pipelined behind the startup packet")?;
        room.copy_from_slice(bytes);
        let stop = walk(&mut up.scan, &up.buf[..bytes.len()], |event| {
            self.frames.see_client(event, &mut self.said_goodbye)
        })?;
        up.start = 0;
        up.end = stop.unwrap_or(bytes.len());
        Ok(())
    }

    /// Bytes delivered so far: (client to server, server to client).
    pub fn moved(&self) -> (u64, u64) {
        (self.up.moved, self.down.moved)
    }

    /// Whether the server still owes an answer (a statement runs).
    pub fn busy(&self) -> bool {
        self.frames.owed > 0
    }

    /// Runs until the session ends one way or another.
    pub async fn run(&mut self) -> RelayEnd {
        std::future::poll_fn(|cx| self.poll_relay(cx)).await
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        if let Poll::Ready(end) = self.poll_up(cx) {
            return Poll::Ready(end);
        }
        self.poll_down(cx)
    }

    /// Client to server, up to the Terminate.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let up = &mut self.up;
            let span = (&mut up.start, up.end);
            match poll_write_out(
                &mut *self.server,
                cx,
                &up.buf,
                span,
                &mut up.moved,
                &mut up.unflushed,
            ) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerGone(Some(e))),
                Poll::Pending => return Poll::Pending,
            }
            if self.said_goodbye {
                return Poll::Ready(if self.frames.idle() {
                    RelayEnd::Clean
                } else {
                    RelayEnd::Dirty
                });
            }
            up.start = 0;
            up.end = 0;
            let mut read = ReadBuf::new(&mut up.buf);
            match Pin::new(&mut *self.client).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(RelayEnd::ClientGone {
                            busy: self.frames.owed > 0,
                            error: None,
                        });
                    }
                    let (frames, goodbye) = (&mut self.frames, &mut self.said_goodbye);
                    let stop = walk(&mut up.scan, &up.buf[..n], |event| {
                        frames.see_client(event, goodbye)
                    });
                    match stop {
                        Ok(Some(at)) => up.end = at,
                        Ok(None) => up.end = n,
                        Err(what) => return Poll::Ready(RelayEnd::Protocol(what)),
                    }
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(RelayEnd::ClientGone {
                        busy: self.frames.owed > 0,
                        error: Some(e),
                    })
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Server to client, reading ReadyForQuery statuses on the way.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let down = &mut self.down;
            let span = (&mut down.start, down.end);
            let (moved, unflushed) = (&mut down.moved, &mut down.unflushed);
            match poll_write_out(&mut *self.client, cx, &down.buf, span, moved, unflushed) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(RelayEnd::ClientGone {
                        busy: self.frames.owed > 0,
                        error: Some(e),
                    })
                }
                Poll::Pending => return Poll::Pending,
            }
            down.start = 0;
            down.end = 0;
            let mut read = ReadBuf::new(&mut down.buf);
            match Pin::new(&mut *self.server).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(RelayEnd::ServerGone(None));
                    }
                    let frames = &mut self.frames;
                    let walked = walk(&mut down.scan, &down.buf[..n], |event| {
                        frames.see_server(event);
                        true
                    });
                    if let Err(what) = walked {
                        return Poll::Ready(RelayEnd::Protocol(what));
                    }
                    down.end = n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerGone(Some(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        let mut body = BytesMut::new();
        body.put_u32(0);
        body.put_u32(pg::ProtocolVersion::V3_0.0);
        for (k, v) in params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let len = body.len() as u32;
        body[..4].copy_from_slice(&len.to_be_bytes());
        match pg::decode_startup(&mut body) {
            Ok(Some(pg::StartupPacket::Startup(s))) => s,
            other => panic!("not a startup packet: {other:?}"),
        }
    }

    #[test]
    fn the_key_is_every_parameter_in_any_order() {
        let a = startup(&[
            ("user", "app"),
            ("database", "shop"),
            ("application_name", "x"),
        ]);
        let b = startup(&[
            ("application_name", "x"),
            ("database", "shop"),
            ("user", "app"),
        ]);
        assert_eq!(session_key(&a), session_key(&b));
        for other in [
            startup(&[
                ("user", "app"),
                ("database", "other"),
                ("application_name", "x"),
            ]),
            startup(&[
                ("user", "bob"),
                ("database", "shop"),
                ("application_name", "x"),
            ]),
            startup(&[
                ("user", "app"),
                ("database", "shop"),
                ("application_name", "y"),
            ]),
            startup(&[
                ("user", "app"),
                ("database", "shop"),
                ("application_name", "x"),
                ("options", "-c search_path=s"),
            ]),
        ] {
            assert_ne!(session_key(&a), session_key(&other));
        }
    }

    #[test]
    fn replication_connections_are_not_pooled() {
        for value in ["true", "database", "on", "1"] {
            let s = startup(&[("user", "app"), ("replication", value)]);
            assert_eq!(session_key(&s), Err(Unpooled::Replication), "{value}");
        }
        let s = startup(&[("user", "app"), ("replication", "false")]);
        assert!(session_key(&s).is_ok());
    }

    #[test]
    fn the_replay_is_a_login_with_the_clients_own_key() {
        let mut conn_params = Vec::new();
        for (tag, body) in [
            (b'S', &b"TimeZone\0UTC\0"[..]),
            (b'S', b"application_name\0psql\0"),
            (b'K', b"\0\0\x01\0\x09\x09\x09\x09"),
            (b'S', b"TimeZone\0Europe/Paris\0"),
        ] {
            conn_params.push(pg::Message {
                tag,
                body: Bytes::copy_from_slice(body),
            });
        }
        // No stream is needed to learn and replay.
        let mut record = LoginRecord::default();
        for m in &conn_params {
            record.learn(m);
        }
        assert_eq!(record.params.len(), 2, "TimeZone updated in place");
        assert_eq!(record.server_key.as_ref().map(CancelKey::pid), Some(256));
        let server_key = record.server_key.clone().expect("a key");
        let random = ring::rand::SystemRandom::new();
        let mine = client_key(&server_key, &random).expect("random");
        assert_eq!(mine.pid(), 256);
        assert_ne!(mine, server_key);
        let mut out = record.replay(Some(&mine));
        let mut tags = Vec::new();
        while let Ok(Some(msg)) = pg::decode_message(&mut out, 1 << 20) {
            if msg.tag == b'K' {
                assert_eq!(pg::backend_key(&msg), Some(mine.clone()));
            }
            if msg.tag == b'S' && msg.body.starts_with(b"TimeZone") {
                assert_eq!(&msg.body[..], b"TimeZone\0Europe/Paris\0");
            }
            tags.push(msg.tag);
        }
        assert_eq!(tags, b"RSSKZ");
    }

    fn frames_after(client: &[u8], server: &[u8]) -> (Frames, Option<usize>) {
        let mut frames = Frames {
            owed: 0,
            unsynced: false,
            status: b'I',
        };
        let mut goodbye = false;
        let mut scan = Scan::Tag;
        let stop = walk(&mut scan, client, |e| frames.see_client(e, &mut goodbye)).expect("valid");
        let mut scan = Scan::Tag;
        walk(&mut scan, server, |e| {
            frames.see_server(e);
            true
        })
        .expect("valid");
        assert_eq!(goodbye, stop.is_some());
        (frames, stop)
    }

    #[test]
    fn the_walk_finds_terminate_and_ready_for_query_across_any_split() {
        let mut client = Vec::new();
        client.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
        client.extend_from_slice(b"X\0\0\0\x04");
        let terminate_at = client.len() - 5;
        // Split the client stream at every point: the walk keeps its place.
        for cut in 0..client.len() {
            let mut scan = Scan::Tag;
            let mut starts = Vec::new();
            let mut stopped = None;
            for (offset, part) in [(0, &client[..cut]), (cut, &client[cut..])] {
                if stopped.is_some() {
                    break;
                }
                let r = walk(&mut scan, part, |e| match e {
                    Event::Start(b'X') => false,
                    Event::Start(t) => {
                        starts.push(t);
                        true
                    }
                    _ => true,
                })
                .expect("valid");
                stopped = r.map(|at| at + offset);
            }
            assert_eq!(starts, b"Q", "cut at {cut}");
            assert_eq!(stopped, Some(terminate_at), "cut at {cut}");
        }
        let server = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I";
        let (frames, stop) = frames_after(&client, server);
        assert_eq!(stop, Some(terminate_at));
        assert!(frames.idle());
    }

    #[test]
    fn only_an_answered_idle_session_is_clean() {
        let z = |s: u8| vec![b'Z', 0, 0, 0, 5, s];
        // A transaction left open.
        let (f, _) = frames_after(b"Q\0\0\0\x0aBEGIN\0", &z(b'T'));
        assert!(!f.idle());
        // A query not answered yet.
        let (f, _) = frames_after(b"Q\0\0\0\x0dselect 1\0", b"");
        assert!(!f.idle());
        // An extended-protocol pipeline without its Sync.
        let (f, _) = frames_after(b"P\0\0\0\x08s\0q\0\0\0B\0\0\0\x04", b"");
        assert!(!f.idle());
        // Parse/Bind/Execute/Sync answered.
        let (f, _) = frames_after(
            b"P\0\0\0\x04B\0\0\0\x04E\0\0\0\x04S\0\0\0\x04",
            &[&b"1\0\0\0\x042\0\0\0\x04C\0\0\0\x04"[..], &z(b'I')].concat(),
        );
        assert!(f.idle());
        // Two queries, one answer.
        let (f, _) = frames_after(b"Q\0\0\0\x05\0Q\0\0\0\x05\0", &z(b'I'));
        assert!(!f.idle());
        // A failed transaction is not idle.
        let (f, _) = frames_after(b"Q\0\0\0\x05\0", &z(b'E'));
        assert!(!f.idle());
    }

    #[test]
    fn impossible_lengths_are_refused() {
        let mut scan = Scan::Tag;
        assert!(walk(&mut scan, b"Q\0\0\0\x03", |_| true).is_err());
    }
}
