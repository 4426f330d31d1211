//! The MySQL side of the pool: a server connection keyhole logged in to
//! ([`MyConn`]), the key a client's HandshakeResponse selects one with, the
//! reset (`COM_RESET_CONNECTION`, then the key's default database put back),
//! and the relay for pooled sessions, which frames the packets of both
//! directions just enough to know when the session may go back: the
//! client's `COM_QUIT` with every command answered, no `LOCAL INFILE` under
//! way and no transaction open.
//!
//! What `COM_RESET_CONNECTION` does (MariaDB 10.2.4+, MySQL 5.7.3+): rolls
//! back an open transaction, drops temporary tables, releases table locks
//! and `GET_LOCK()` locks, frees prepared statements, forgets user variables
//! and returns every session variable to its global value; MariaDB also puts
//! back the character set of the login packet. It keeps the current
//! database, which a client may have changed with `USE`: keyhole puts the
//! key's back with `COM_INIT_DB`, or, for a key without one, checks that
//! none is selected (a connection that cannot be put back is closed).
//!
//! The relay follows what it can follow: text and binary result sets with
//! and without `CLIENT_DEPRECATE_EOF`, multiple result sets, prepared
//! statement replies, `LOCAL INFILE` requests, packets of 16 MiB and more
//! (continuation packets). Anything else (a command it does not know,
//! `COM_CHANGE_USER`, a packet nobody asked for) makes the session not
//! reusable, and it is relayed all the same.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub use super::postgres::RelayEnd;
use super::{poll_write_out, Key, ServerConnection};
use crate::protocol::mysql::{self, caps, reply, status, Greeting};
use crate::upstream::UpstreamStream;

/// MariaDB's extended capabilities keyhole lets a pooled session use:
/// `MARIADB_CLIENT_STMT_BULK_OPERATIONS` and
/// `MARIADB_CLIENT_EXTENDED_TYPE_INFO`. Progress reports (`0xFF` packets in
/// the middle of a command) and metadata caching change the framing the
/// relay follows, and are not offered.
pub const MARIADB_ALLOWED: u32 = (1 << 2) | (1 << 3);

/// Capability bits keyhole's greeting never offers on a pooled target:
/// compression (zlib and zstd; the relay must see the packets) and MySQL 8's
/// optional result set metadata.
pub const NEVER_OFFERED: u32 = caps::COMPRESS | caps::ZSTD_COMPRESSION | (1 << 25);

/// Capability bits keyhole sets itself on its own login (or drops), and
/// which are therefore not part of the key: TLS, compression, connection
/// attributes (not passed on), the database flag (the database is in the
/// key), the authentication bits, and the bits of MySQL's high end that
/// only a client library reads.
const NOT_KEYED: u32 = caps::LONG_PASSWORD
    | caps::CONNECT_WITH_DB
    | caps::SSL
    | caps::SECURE_CONNECTION
    | caps::PLUGIN_AUTH
    | caps::CONNECT_ATTRS
    | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA
    | (1 << 22)
    | (1 << 29)
    | (1 << 30)
    | (1 << 31)
    | NEVER_OFFERED;

/// The session a pooled connection was opened for: what keyhole asked the
/// server for in its own login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub user: String,
    pub database: Option<String>,
    pub charset: u8,
    /// The protocol-shaping capability bits (client's, as the server has them).
    pub capabilities: u32,
    /// MariaDB's extended capabilities (0 on MySQL).
    pub mariadb_capabilities: u32,
}

impl Shape {
    /// The shape of a session for a client whose HandshakeResponse41 said
    /// `capabilities`, `charset` and (bytes 28..32) `mariadb_capabilities`,
    /// on the server that sent `greeting`.
    pub fn new(
        user: &str,
        database: Option<&str>,
        charset: u8,
        client_capabilities: u32,
        client_mariadb: u32,
        greeting: &Greeting,
    ) -> Shape {
        let capabilities = client_capabilities & greeting.capabilities & !NOT_KEYED;
        // A MariaDB client says it sends extended capabilities by clearing
        // CLIENT_MYSQL (LONG_PASSWORD), as the server does.
        let mariadb_capabilities = match greeting.mariadb_capabilities {
            Some(server) if client_capabilities & caps::LONG_PASSWORD == 0 => {
                client_mariadb & server & MARIADB_ALLOWED
            }
            _ => 0,
        };
        Shape {
            user: user.to_owned(),
            database: database.filter(|d| !d.is_empty()).map(str::to_owned),
            charset,
            capabilities,
            mariadb_capabilities,
        }
    }

    /// The pool key: every field, unambiguously.
    pub fn key(&self) -> Key {
        let mut key = Vec::with_capacity(self.user.len() + 32);
        key.extend_from_slice(self.user.as_bytes());
        key.push(0);
        match &self.database {
            Some(db) => {
                key.push(1);
                key.extend_from_slice(db.as_bytes());
                key.push(0);
            }
            None => key.push(0),
        }
        key.push(self.charset);
        key.extend_from_slice(&self.capabilities.to_le_bytes());
        key.extend_from_slice(&self.mariadb_capabilities.to_le_bytes());
        key.into_boxed_slice()
    }

    /// keyhole's HandshakeResponse41 payload for this session (before the
    /// SSLRequest's TLS bit): `auth` answers `plugin`.
    pub fn login_payload(&self, greeting: &Greeting, auth: &[u8], plugin: &[u8]) -> BytesMut {
        let mut capabilities = self.capabilities
            | caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::PLUGIN_AUTH
            | (greeting.capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA);
        if greeting.mariadb_capabilities.is_none() {
            capabilities |= greeting.capabilities & caps::LONG_PASSWORD;
        }
        if self.database.is_some() {
            capabilities |= caps::CONNECT_WITH_DB;
        }
        let mut out = BytesMut::with_capacity(64 + self.user.len() + auth.len());
        out.extend_from_slice(&capabilities.to_le_bytes());
        out.extend_from_slice(&(16u32 << 20).to_le_bytes());
        out.extend_from_slice(&[self.charset]);
        out.extend_from_slice(&[0; 19]);
        out.extend_from_slice(&self.mariadb_capabilities.to_le_bytes());
        out.extend_from_slice(self.user.as_bytes());
        out.extend_from_slice(&[0]);
        // Both forms carry an answer of up to 250 bytes the same way.
        out.extend_from_slice(&[auth.len() as u8]);
        out.extend_from_slice(auth);
        if let Some(db) = &self.database {
            out.extend_from_slice(db.as_bytes());
            out.extend_from_slice(&[0]);
        }
        out.extend_from_slice(plugin);
        out.extend_from_slice(&[0]);
        out
    }
}

/// A server connection keyhole logged in to, idle between clients.
pub struct MyConn {
    pub stream: UpstreamStream,
    /// The server's greeting at this connection's login (its version,
    /// capabilities and connection id are what clients are told).
    pub greeting: Greeting,
    pub shape: Shape,
    /// Close without `COM_QUIT` (a statement may still run: the server
    /// must see the socket close, not a command queued behind it).
    pub abrupt: bool,
}

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_RESET_CONNECTION: u8 = 0x1f;

impl MyConn {
    async fn command(&mut self, payload: &[u8]) -> Result<(), String> {
        let mut out = BytesMut::with_capacity(4 + payload.len());
        mysql::encode_packet(&mut out, 0, payload);
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        self.stream.flush().await.map_err(|e| e.to_string())
    }

    async fn read(&mut self, buf: &mut BytesMut) -> Result<mysql::Packet, String> {
        loop {
            if let Some(packet) = mysql::decode_packet(buf, mysql::MAX_HANDSHAKE_PAYLOAD)
                .map_err(|e| e.to_string())?
            {
                return Ok(packet);
            }
            if self.stream.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("the server closed the connection".to_owned());
            }
        }
    }

    /// Reads an OK; an ERR names its code.
    async fn expect_ok(&mut self, buf: &mut BytesMut, what: &str) -> Result<(), String> {
        let packet = self.read(buf).await?;
        match packet.payload.first() {
            Some(&reply::OK) => Ok(()),
            Some(&reply::ERR) => {
                let code = mysql::parse_err(&packet.payload).map_or(0, |(code, _, _)| code);
                Err(format!("{what} failed with MySQL error {code}"))
            }
            _ => Err(format!("{what}: the server answered neither OK nor ERR")),
        }
    }

    /// For a key without a database: is none selected?
    async fn no_database(&mut self, buf: &mut BytesMut) -> Result<(), String> {
        self.command(b"\x03SELECT DATABASE()").await?;
        let deprecate_eof = self.shape.capabilities & caps::DEPRECATE_EOF != 0;
        let count = self.read(buf).await?;
        if count.payload.first() != Some(&1) {
            return Err("SELECT DATABASE() did not return one column".to_owned());
        }
        let _column = self.read(buf).await?;
        if !deprecate_eof {
            let _eof = self.read(buf).await?;
        }
        let row = self.read(buf).await?;
        let end = self.read(buf).await?;
        if end.payload.first() != Some(&0xfe) {
            return Err("SELECT DATABASE() returned more than one row".to_owned());
        }
        if row.payload.first() != Some(&0xfb) {
            return Err("the client selected a database (USE), which a reset keeps".to_owned());
        }
        Ok(())
    }
}

impl ServerConnection for MyConn {
    fn is_alive(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut scratch = [0u8; 64];
        let mut buf = ReadBuf::new(&mut scratch);
        // An idle server sends nothing; EOF, an error or a packet (the ERR
        // of a server shutting down or a connection killed) ends it.
        Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    async fn reset(&mut self, limit: Duration) -> Result<(), String> {
        let work = async {
            let mut buf = BytesMut::with_capacity(512);
            self.command(&[COM_RESET_CONNECTION]).await?;
            self.expect_ok(&mut buf, "COM_RESET_CONNECTION").await?;
            match self.shape.database.clone() {
                Some(db) => {
                    let mut payload = Vec::with_capacity(1 + db.len());
                    payload.push(COM_INIT_DB);
                    payload.extend_from_slice(db.as_bytes());
                    self.command(&payload).await?;
                    self.expect_ok(&mut buf, "COM_INIT_DB").await?;
                }
                None => self.no_database(&mut buf).await?,
            }
            if !buf.is_empty() {
                return Err("the server sent more than the reset's answers".to_owned());
            }
            Ok(())
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| "COM_RESET_CONNECTION did not finish in time".to_owned())?
    }

    async fn close(mut self) {
        if self.abrupt {
            self.stream.without_close_notify();
        } else {
            let _ = self.command(&[COM_QUIT]).await;
        }
        let _ = self.stream.shutdown().await;
    }
}

/// How many bytes of a packet's payload the walk looks at (an OK packet's
/// status flags sit within the first 21).
const HEAD: usize = 24;

/// What the walk reports at each packet's start.
#[derive(Debug, Clone, Copy)]
struct Start<'a> {
    len: usize,
    seq: u8,
    /// The payload's first bytes (up to [`HEAD`]).
    head: &'a [u8],
    /// The packet continues the previous one (which was 16 MiB - 1 long).
    continuation: bool,
}

/// A command sent and not fully answered, by the shape of its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// OK, ERR, EOF, result sets (several), or a LOCAL INFILE request.
    Generic,
    /// COM_STMT_PREPARE: OK with counts, then definitions.
    Prepare,
    /// Rows (or definitions) up to an EOF: COM_STMT_FETCH, COM_FIELD_LIST.
    Rows,
    /// One packet of text: COM_STATISTICS.
    One,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resp {
    Start,
    Columns(u64),
    ColumnsEof,
    Rows,
    Skip(u64),
}

/// Session state read off the packets.
struct Frames {
    deprecate_eof: bool,
    expect: VecDeque<Cmd>,
    resp: Resp,
    in_trans: bool,
    /// The client is sending a LOCAL INFILE's content.
    infile: bool,
    /// Something the walk could not follow: never reused.
    lost: bool,
}

fn initial(cmd: Cmd) -> Resp {
    match cmd {
        Cmd::Rows => Resp::Rows,
        _ => Resp::Start,
    }
}

impl Frames {
    fn new(capabilities: u32) -> Frames {
        Frames {
            deprecate_eof: capabilities & caps::DEPRECATE_EOF != 0,
            expect: VecDeque::new(),
            resp: Resp::Start,
            in_trans: false,
            infile: false,
            lost: false,
        }
    }

    fn idle(&self) -> bool {
        !self.lost && self.expect.is_empty() && !self.infile && !self.in_trans
    }

    fn busy(&self) -> bool {
        !self.expect.is_empty() || self.infile
    }

    fn push(&mut self, cmd: Cmd) {
        if self.expect.is_empty() {
            self.resp = initial(cmd);
        }
        self.expect.push_back(cmd);
    }

    fn pop(&mut self) {
        self.expect.pop_front();
        self.resp = self.expect.front().map_or(Resp::Start, |&c| initial(c));
    }

    fn status(&mut self, flags: Option<u16>) {
        match flags {
            Some(flags) => {
                self.in_trans = flags & status::IN_TRANS != 0;
                if flags & status::MORE_RESULTS_EXISTS != 0 {
                    self.resp = Resp::Start;
                } else {
                    self.pop();
                }
            }
            None => {
                self.lost = true;
                self.pop();
            }
        }
    }

    /// A client packet starts; false at `COM_QUIT` (kept from the server).
    fn see_client(&mut self, start: Start<'_>, goodbye: &mut bool) -> bool {
        if start.continuation {
            return true;
        }
        if self.infile {
            // The file's content, up to an empty packet.
            if start.len == 0 {
                self.infile = false;
            }
            return true;
        }
        if start.seq != 0 {
            self.lost = true;
            return true;
        }
        match start.head.first() {
            Some(&COM_QUIT) if start.len == 1 => {
                *goodbye = true;
                return false;
            }
            // COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE: no answer.
            Some(0x18 | 0x19) => {}
            Some(0x16) => self.push(Cmd::Prepare),
            Some(0x1c | 0x04) => self.push(Cmd::Rows),
            Some(0x09) => self.push(Cmd::One),
            Some(
                0x02 | 0x03 | 0x07 | 0x08 | 0x0a | 0x0c | 0x0d | 0x0e | 0x17 | 0x1a | 0x1b | 0x1f
                | 0xfa,
            ) => self.push(Cmd::Generic),
            // COM_CHANGE_USER, replication, anything unknown.
            _ => self.lost = true,
        }
        true
    }

    /// A server packet starts.
    fn see_server(&mut self, start: Start<'_>) {
        if start.continuation || self.lost {
            return;
        }
        let Some(&cmd) = self.expect.front() else {
            // Nobody asked.
            self.lost = true;
            return;
        };
        let Some(&first) = start.head.first() else {
            self.lost = true;
            return;
        };
        match self.resp {
            Resp::Start => match cmd {
                Cmd::One => self.pop(),
                Cmd::Prepare => {
                    if first == reply::OK {
                        let h = start.head;
                        let (Some(c), Some(p)) = (h.get(5..7), h.get(7..9)) else {
                            self.lost = true;
                            return;
                        };
                        let columns = u64::from(u16::from_le_bytes([c[0], c[1]]));
                        let params = u64::from(u16::from_le_bytes([p[0], p[1]]));
                        let eofs = if self.deprecate_eof {
                            0
                        } else {
                            u64::from(columns > 0) + u64::from(params > 0)
                        };
                        let n = columns + params + eofs;
                        if n == 0 {
                            self.pop();
                        } else {
                            self.resp = Resp::Skip(n);
                        }
                    } else {
                        self.pop();
                    }
                }
                Cmd::Generic | Cmd::Rows => match first {
                    reply::OK => self.status(mysql::ok_status(start.head)),
                    reply::ERR => self.pop(),
                    0xfe if start.len < 9 => self.status(mysql::eof_status(start.head)),
                    0xfb => self.infile = true,
                    _ => {
                        let mut rest = start.head;
                        match mysql::take_lenenc_u64(&mut rest) {
                            Some(n) if n > 0 => self.resp = Resp::Columns(n),
                            _ => self.lost = true,
                        }
                    }
                },
            },
            Resp::Columns(n) => {
                self.resp = match (n > 1, self.deprecate_eof) {
                    (true, _) => Resp::Columns(n - 1),
                    (false, true) => Resp::Rows,
                    (false, false) => Resp::ColumnsEof,
                };
            }
            Resp::ColumnsEof => {
                if first != 0xfe {
                    self.lost = true;
                    return;
                }
                // A cursor opened by COM_STMT_EXECUTE: no rows follow.
                match mysql::eof_status(start.head) {
                    Some(flags) if flags & 0x0040 != 0 => self.status(Some(flags)),
                    Some(_) => self.resp = Resp::Rows,
                    None => self.lost = true,
                }
            }
            Resp::Rows => {
                let end = first == 0xfe
                    && if self.deprecate_eof {
                        start.len < mysql::MAX_PAYLOAD
                    } else {
                        start.len < 9
                    };
                if first == reply::ERR {
                    self.pop();
                } else if end {
                    let flags = if self.deprecate_eof {
                        mysql::ok_status(start.head)
                    } else {
                        mysql::eof_status(start.head)
                    };
                    self.status(flags);
                }
            }
            Resp::Skip(n) => {
                if n > 1 {
                    self.resp = Resp::Skip(n - 1);
                } else {
                    self.pop();
                }
            }
        }
    }
}

/// Size of each direction's buffer.
const RELAY_BUFFER: usize = 16 * 1024;

/// One direction: bytes read, walked, not yet written.
struct Half {
    buf: Box<[u8]>,
    /// Next byte to write.
    start: usize,
    /// Walked up to here (what may be written).
    scanned: usize,
    /// Bytes read.
    end: usize,
    /// Bytes of the current packet's payload not walked yet.
    body_left: usize,
    /// The previous packet was 16 MiB - 1 long: the next continues it.
    prev_full: bool,
    unflushed: bool,
    moved: u64,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0u8; RELAY_BUFFER].into_boxed_slice(),
            start: 0,
            scanned: 0,
            end: 0,
            body_left: 0,
            prev_full: false,
            unflushed: false,
            moved: 0,
        }
    }

    /// Walks what was read; `on` returning false stops before that
    /// packet (true is returned then). A packet's header and first
    /// [`HEAD`] bytes are walked together: split over reads, they wait
    /// for the next.
    fn walk(&mut self, mut on: impl FnMut(Start<'_>) -> bool) -> bool {
        while self.scanned < self.end {
            if self.body_left > 0 {
                let take = self.body_left.min(self.end - self.scanned);
                self.scanned += take;
                self.body_left -= take;
                continue;
            }
            let avail = &self.buf[self.scanned..self.end];
            if avail.len() < 4 {
                return false;
            }
            let len =
                usize::from(avail[0]) | usize::from(avail[1]) << 8 | usize::from(avail[2]) << 16;
            let need = len.min(HEAD);
            if avail.len() < 4 + need {
                return false;
            }
            let start = Start {
                len,
                seq: avail[3],
                head: &avail[4..4 + need],
                continuation: self.prev_full,
            };
            if !on(start) {
                return true;
            }
            self.prev_full = len == mysql::MAX_PAYLOAD;
            self.scanned += 4 + need;
            self.body_left = len - need;
        }
        false
    }

    /// Makes room for a read: what is written goes, a partial header
    /// moves to the front.
    fn compact(&mut self) {
        if self.start == self.scanned && self.scanned > 0 {
            self.buf.copy_within(self.scanned..self.end, 0);
            self.end -= self.scanned;
            self.start = 0;
            self.scanned = 0;
        }
    }

    fn at_boundary(&self) -> bool {
        self.body_left == 0 && self.scanned == self.end
    }
}

/// The relay of a pooled MySQL session: bytes pass through in bulk, each
/// direction's packet headers are walked in place, and the client's
/// `COM_QUIT` is kept from the server, so that the connection can be reset
/// and reused.
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
    /// A relay for a session whose protocol-shaping capabilities are
    /// `capabilities` (the [`Shape`]'s).
    pub fn new(client: &'a mut C, server: &'a mut S, capabilities: u32) -> Self {
        PooledRelay {
            client,
            server,
            up: Half::new(),
            down: Half::new(),
            frames: Frames::new(capabilities),
            said_goodbye: false,
        }
    }

    /// Bytes the client sent behind its HandshakeResponse: walked and sent
    /// first, as if read now.
    pub fn preload(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        if bytes.is_empty() {
            return Ok(());
        }
        let up = &mut self.up;
        let room = up
            .buf
            .get_mut(..bytes.len())
            .ok_or("too much pipelined behind the handshake response")?;
        room.copy_from_slice(bytes);
        up.end = bytes.len();
        let (frames, goodbye) = (&mut self.frames, &mut self.said_goodbye);
        up.walk(|start| frames.see_client(start, goodbye));
        Ok(())
    }

    /// Bytes delivered so far: (client to server, server to client).
    pub fn moved(&self) -> (u64, u64) {
        (self.up.moved, self.down.moved)
    }

    /// Whether the server still owes an answer (a statement runs).
    pub fn busy(&self) -> bool {
        self.frames.busy()
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

    fn client_gone(&self, error: Option<io::Error>) -> RelayEnd {
        RelayEnd::ClientGone {
            busy: self.frames.busy(),
            error,
        }
    }

    /// Client to server, up to the COM_QUIT.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let up = &mut self.up;
            let span = (&mut up.start, up.scanned);
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
                // Everything before the COM_QUIT has gone out; what the
                // server still owes is judged now (and the relay ends, so
                // an answer in flight means not reusable).
                let clean = self.frames.idle() && self.down.at_boundary();
                return Poll::Ready(if clean {
                    RelayEnd::Clean
                } else {
                    RelayEnd::Dirty
                });
            }
            up.compact();
            if up.end == up.buf.len() {
                // Cannot happen (a partial header is under 30 bytes).
                return Poll::Ready(RelayEnd::Protocol("a packet header does not fit"));
            }
            let mut read = ReadBuf::new(&mut up.buf[up.end..]);
            match Pin::new(&mut *self.client).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(self.client_gone(None));
                    }
                    let up = &mut self.up;
                    up.end += n;
                    let (frames, goodbye) = (&mut self.frames, &mut self.said_goodbye);
                    up.walk(|start| frames.see_client(start, goodbye));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(self.client_gone(Some(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Server to client, reading the answers on the way.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let down = &mut self.down;
            let span = (&mut down.start, down.scanned);
            let (moved, unflushed) = (&mut down.moved, &mut down.unflushed);
            match poll_write_out(&mut *self.client, cx, &down.buf, span, moved, unflushed) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(self.client_gone(Some(e))),
                Poll::Pending => return Poll::Pending,
            }
            down.compact();
            if down.end == down.buf.len() {
                return Poll::Ready(RelayEnd::Protocol("a packet header does not fit"));
            }
            let mut read = ReadBuf::new(&mut down.buf[down.end..]);
            match Pin::new(&mut *self.server).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(RelayEnd::ServerGone(None));
                    }
                    let down = &mut self.down;
                    down.end += n;
                    let frames = &mut self.frames;
                    down.walk(|start| {
                        frames.see_server(start);
                        true
                    });
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

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        mysql::encode_packet(&mut out, seq, payload);
        out.to_vec()
    }

    /// Feeds `client` then `server` through the walk in chunks of `cut`.
    fn run(deprecate_eof: bool, client: &[u8], server: &[u8], cut: usize) -> (Frames, bool) {
        let caps = if deprecate_eof {
            caps::DEPRECATE_EOF
        } else {
            0
        };
        let mut frames = Frames::new(caps);
        let mut goodbye = false;
        for (bytes, from_client) in [(client, true), (server, false)] {
            let mut half = Half::new();
            for chunk in bytes.chunks(cut.max(1)) {
                half.compact();
                // Mark all as written, as the relay would.
                half.buf[half.end..half.end + chunk.len()].copy_from_slice(chunk);
                half.end += chunk.len();
                let stopped = half.walk(|s| {
                    if from_client {
                        frames.see_client(s, &mut goodbye)
                    } else {
                        frames.see_server(s);
                        true
                    }
                });
                half.start = half.scanned;
                if stopped {
                    break;
                }
            }
        }
        (frames, goodbye)
    }

    fn ok(status: u16) -> Vec<u8> {
        mysql::ok_packet(status).to_vec()
    }

    fn eof(status: u16) -> Vec<u8> {
        let s = status.to_le_bytes();
        vec![0xfe, 0, 0, s[0], s[1]]
    }

    fn ok_eof(status: u16) -> Vec<u8> {
        let mut p = ok(status);
        p[0] = 0xfe;
        p
    }

    #[test]
    fn a_result_set_then_quit_is_clean_in_both_eof_styles_and_any_split() {
        for deprecate in [false, true] {
            let mut client = packet(0, b"\x03select 1, 2");
            client.extend(packet(0, &[COM_QUIT]));
            let mut server = packet(1, &[2]);
            server.extend(packet(2, b"\x03def column one"));
            server.extend(packet(3, b"\x03def column two"));
            let mut seq = 4;
            if !deprecate {
                server.extend(packet(seq, &eof(2)));
                seq += 1;
            }
            server.extend(packet(seq, b"\x011\x012"));
            seq += 1;
            let end = if deprecate { ok_eof(2) } else { eof(2) };
            server.extend(packet(seq, &end));
            for cut in 1..=server.len() {
                let (f, goodbye) = run(deprecate, &client, &server, cut);
                assert!(goodbye);
                assert!(f.idle(), "deprecate {deprecate}, cut {cut}");
            }
            // Unanswered: not idle.
            let (f, _) = run(deprecate, &client, &server[..server.len() - 3], 7);
            assert!(!f.idle());
        }
    }

    #[test]
    fn multiple_results_prepare_and_infile_are_followed() {
        // Two results, the first flagged MORE_RESULTS_EXISTS.
        let client = packet(0, b"\x03call p()");
        let mut server = packet(1, &ok(status::AUTOCOMMIT | status::MORE_RESULTS_EXISTS));
        server.extend(packet(2, &ok(status::AUTOCOMMIT)));
        let (f, _) = run(true, &client, &server, 5);
        assert!(f.idle());
        let (f, _) = run(true, &client, &server[..11], 5);
        assert!(!f.idle());

        // COM_STMT_PREPARE with 1 param and 1 column, without DEPRECATE_EOF.
        let client = packet(0, b"\x16select ?");
        let mut server = packet(1, &[0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0]);
        for (i, p) in [&b"\x03def param"[..], &eof(2), b"\x03def column", &eof(2)]
            .iter()
            .enumerate()
        {
            server.extend(packet(i as u8 + 2, p));
        }
        let (f, _) = run(false, &client, &server, 3);
        assert!(f.idle());

        // LOCAL INFILE: request, the client's content and empty packet, OK.
        let mut client = packet(0, b"\x03load data local infile 'x' into table t");
        let server = packet(1, b"\xfbx");
        let mut f = Frames::new(0);
        let mut goodbye = false;
        let mut half = Half::new();
        let mut walk_server = |f: &mut Frames, bytes: &[u8]| {
            half.compact();
            half.buf[half.end..half.end + bytes.len()].copy_from_slice(bytes);
            half.end += bytes.len();
            half.walk(|s| {
                f.see_server(s);
                true
            });
            half.start = half.scanned;
        };
        let mut up = Half::new();
        up.buf[..client.len()].copy_from_slice(&client);
        up.end = client.len();
        up.walk(|s| f.see_client(s, &mut goodbye));
        walk_server(&mut f, &server);
        assert!(f.infile && f.busy());
        client = packet(2, b"1,2\n");
        client.extend(packet(3, b""));
        let mut up = Half::new();
        up.buf[..client.len()].copy_from_slice(&client);
        up.end = client.len();
        up.walk(|s| f.see_client(s, &mut goodbye));
        assert!(!f.infile && f.busy());
        walk_server(&mut f, &packet(4, &ok(status::AUTOCOMMIT)));
        assert!(f.idle());
    }

    #[test]
    fn a_transaction_an_unknown_command_or_an_unasked_packet_is_not_clean() {
        let client = packet(0, b"\x03begin");
        let server = packet(1, &ok(status::IN_TRANS));
        let (f, _) = run(true, &client, &server, 64);
        assert!(!f.idle());
        // COM_CHANGE_USER.
        let client = packet(0, b"\x11someone\0");
        let (f, _) = run(true, &client, &[], 64);
        assert!(!f.idle());
        // A packet nobody asked for.
        let (f, _) = run(true, &[], &packet(0, &ok(2)), 64);
        assert!(!f.idle());
    }

    #[test]
    fn large_packets_continue_across_the_16_mib_boundary() {
        // A row of 16 MiB - 1 bytes and its continuation, starting with 0xfe
        // (a length-encoded string of 8-byte length): not the end.
        let mut client = packet(0, b"\x03select big");
        client.extend(packet(0, &[COM_QUIT]));
        let mut server = packet(1, &[1]);
        server.extend(packet(2, b"\x03def"));
        let mut row = vec![0u8; mysql::MAX_PAYLOAD];
        row[0] = 0xfe;
        server.extend(packet(3, &row));
        server.extend(packet(4, &[0xfe, 0, 0]));
        let (f, _) = run(true, &client, &server, 8 * 1024);
        assert!(!f.idle(), "the continuation is not the end");
        server.extend(packet(5, &ok_eof(2)));
        let (f, goodbye) = run(true, &client, &server, 8 * 1024);
        assert!(goodbye && f.idle());
    }

    #[test]
    fn the_key_holds_user_database_charset_and_capabilities() {
        let payload = {
            let mut p = vec![10u8];
            p.extend_from_slice(b"11.4.2-MariaDB\0");
            p.extend_from_slice(&7u32.to_le_bytes());
            p.extend_from_slice(b"abcdefgh\0");
            let c = caps::PROTOCOL_41
                | caps::SECURE_CONNECTION
                | caps::PLUGIN_AUTH
                | caps::DEPRECATE_EOF
                | caps::MULTI_STATEMENTS
                | caps::COMPRESS;
            p.extend_from_slice(&(c as u16).to_le_bytes());
            p.push(45);
            p.extend_from_slice(&2u16.to_le_bytes());
            p.extend_from_slice(&((c >> 16) as u16).to_le_bytes());
            p.push(21);
            p.extend_from_slice(&[0; 6]);
            p.extend_from_slice(&0x1fu32.to_le_bytes());
            p.extend_from_slice(b"ijklmnopqrst\0");
            p.extend_from_slice(b"mysql_native_password\0");
            bytes::Bytes::from(p)
        };
        let g = mysql::parse_greeting(&payload).expect("a greeting");
        assert_eq!(
            g.scramble().as_ref().map(|s| &s[..]),
            Some(&b"abcdefghijklmnopqrst"[..])
        );
        assert_eq!(g.auth_plugin(), Some(&b"mysql_native_password"[..]));
        let base = Shape::new(
            "app",
            Some("shop"),
            45,
            caps::PROTOCOL_41 | caps::DEPRECATE_EOF,
            0,
            &g,
        );
        let same = Shape::new(
            "app",
            Some("shop"),
            45,
            caps::PROTOCOL_41
                | caps::DEPRECATE_EOF
                | caps::SSL
                | caps::CONNECT_ATTRS
                | caps::COMPRESS,
            0,
            &g,
        );
        assert_eq!(base.key(), same.key());
        for other in [
            Shape::new(
                "bob",
                Some("shop"),
                45,
                caps::PROTOCOL_41 | caps::DEPRECATE_EOF,
                0,
                &g,
            ),
            Shape::new(
                "app",
                None,
                45,
                caps::PROTOCOL_41 | caps::DEPRECATE_EOF,
                0,
                &g,
            ),
            Shape::new(
                "app",
                Some("shop"),
                33,
                caps::PROTOCOL_41 | caps::DEPRECATE_EOF,
                0,
                &g,
            ),
            Shape::new("app", Some("shop"), 45, caps::PROTOCOL_41, 0, &g),
            Shape::new(
                "app",
                Some("shop"),
                45,
                caps::PROTOCOL_41 | caps::DEPRECATE_EOF | caps::MULTI_STATEMENTS,
                0,
                &g,
            ),
            Shape::new(
                "app",
                Some("shop"),
                45,
                caps::PROTOCOL_41 | caps::DEPRECATE_EOF,
                4,
                &g,
            ),
        ] {
            assert_ne!(base.key(), other.key(), "{other:?}");
        }
        let mine = g
            .for_client(
                99,
                b"ZYXWVUTSRQPONMLKJIHG",
                g.capabilities & !NEVER_OFFERED,
                Some(4),
            )
            .expect("rewritten");
        let again = mysql::parse_greeting(&mine).expect("still a greeting");
        assert_eq!(again.connection_id, 99);
        assert_eq!(again.capabilities & caps::COMPRESS, 0);
        assert_eq!(again.mariadb_capabilities, Some(4));
        assert_eq!(
            again.scramble().as_ref().map(|s| &s[..]),
            Some(&b"ZYXWVUTSRQPONMLKJIHG"[..])
        );
    }

    #[test]
    fn native_password_matches_the_known_answer() {
        // SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))), checked
        // by its defining property: the server's check recovers SHA1(pw).
        use ring::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY as SHA1};
        let scramble = b"01234567890123456789";
        let answer = mysql::native_password(b"secret", scramble);
        let stage1 = digest(&SHA1, b"secret");
        let stage2 = digest(&SHA1, stage1.as_ref());
        let mut joined = scramble.to_vec();
        joined.extend_from_slice(stage2.as_ref());
        let mix = digest(&SHA1, &joined);
        let recovered: Vec<u8> = answer
            .iter()
            .zip(mix.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(recovered, stage1.as_ref());
        assert!(mysql::native_password(b"", scramble).is_empty());
    }
}
