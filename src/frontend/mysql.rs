//! The MySQL session: read the server's greeting (refusing a server without
//! TLS), pass it to the client (TLS bit cleared on a plain local leg), take
//! the client's response (after its own SSLRequest when the local leg does
//! TLS), upgrade the server leg to verified TLS with an SSLRequest carrying
//! the client's capabilities, forward the response, relay the
//! authentication exchange with sequence ids renumbered between the two
//! legs, then hand both legs to the splice loop. Nothing the client sends
//! leaves keyhole before the server's certificate has been verified.
//!
//! The server leg spends one sequence id more than the client leg (keyhole's
//! SSLRequest), unless the client did an SSLRequest of its own. A Cloud SQL
//! instance is TLS from the first byte: keyhole sends no SSLRequest there,
//! and the server sees a plain client inside the tunnel. After OK the
//! ids restart at every command, so the splice needs no renumbering.
//!
//! Every failure before the splice that the client can still read reaches it
//! as an ERR packet with the sequence id it expects next.
//!
//! Until the server has the client's response, keyhole stands in for the
//! server, and answers a client that breaks the protocol as MariaDB does
//! (`tests/mysql_like_the_server.rs` compares the two): a packet out of
//! sequence gets 1156 with the id the client should have sent, checked
//! before its length; a client without `CLIENT_PROTOCOL_41` gets its ERR in
//! the 4.0 form, without SQLSTATE; any first packet with `CLIENT_SSL` starts
//! TLS; a failed TLS handshake is answered with 1043 in plain text. Where
//! keyhole checks more than the server, its message names the check: it
//! reads at most 256 KiB in one handshake packet (1153, where the server
//! waits for up to its `max_allowed_packet`).
//!
//! Where keyhole logs in itself (`pool=session`, `password-file=`), the
//! session takes another path ([`Session::run_own_login`]): keyhole greets
//! the client with a greeting of its own (the server's version and
//! capabilities, the server connection's id, a fresh scramble), reads the
//! client's HandshakeResponse without checking its password, logs in to the
//! server with its own credentials (or takes a pooled connection), answers
//! the client OK, and relays through the packet-framing relay of
//! `pool::mysql`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::legs::{ClientLeg, ServerLeg};
use super::{
    left_busy, relay_until_cut, Abandoned, Admission, ClientStream, LoginPolicy, SessionError,
    SessionReport,
};
use crate::credentials::Token;
use crate::net::{Rewind, Socket};
use crate::pool::mysql::{self as pooled, MyConn, PooledRelay, RelayEnd, Shape};
use crate::pool::{CloseReason, Grant, Key, Lease, Pool, Slot};
use crate::protocol::farewell::ComQuit;
use crate::protocol::mysql::{self, caps, reply, ClientHello, Packet, PacketError};
use crate::splice::Splice;
use crate::upstream::mysql::Greeted;
use crate::upstream::SharedUpstream;

/// What one MySQL target needs to serve a client.
pub struct MysqlFrontend {
    pub upstream: SharedUpstream,
    /// TLS for the client leg, when `--listen-cert` is set.
    pub local_tls: Option<TlsAcceptor>,
    pub startup_timeout: Duration,
    /// The configured connection limit, for the 1040 message.
    pub max_connections: Option<usize>,
    /// Which user logs in, and with what.
    pub login: Arc<LoginPolicy>,
    /// `pool=session`: server connections keyhole logged in to, reused.
    pub pool: Option<Pool<MyConn>>,
    /// The key of the last pooled client: the next client is greeted as
    /// a connection of that key (see [`Session::run_own_login`]).
    pub last_key: Mutex<Option<Key>>,
}

/// How long a pooled connection's reset (`COM_RESET_CONNECTION`, and the
/// database put back) may take before the connection is closed instead.
const RESET_LIMIT: Duration = Duration::from_secs(5);

impl MysqlFrontend {
    /// Serves one client connection to its end.
    pub async fn serve(
        &self,
        socket: Socket,
        admission: Admission,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        let mut session = Session {
            frontend: self,
            client: ClientLeg::new(socket),
            next_seq: 0,
            speaks_41: true,
        };
        let result = session.run(admission, cut, report).await;
        let answer = result.as_ref().err().and_then(|err| {
            let (code, state) = err.mysql_answer()?;
            let mut out = BytesMut::new();
            let state = session.speaks_41.then_some(state);
            mysql::encode_err_as(&mut out, session.next_seq, code, state, &err.to_string());
            Some(out)
        });
        session.client.close(answer, report).await;
        result
    }
}

/// One client connection while keyhole itself reads it (until the splice).
struct Session<'a> {
    frontend: &'a MysqlFrontend,
    client: ClientLeg,
    /// The sequence id the client expects on keyhole's next packet.
    next_seq: u8,
    /// Whether the client's ERR packets carry a SQLSTATE (see
    /// [`mysql::client_speaks_41`]).
    speaks_41: bool,
}

impl Session<'_> {
    async fn run(
        &mut self,
        admission: Admission,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        let frontend = self.frontend;
        // A server over its limit, or refusing a host, says so instead of
        // greeting; so do we.
        admission.check(frontend.max_connections)?;
        if frontend.pool.is_some() || frontend.login.has_password() {
            // Boxed: its states (the own login, the pooled relay) stay out of
            // the session future every other session is allocated at.
            return Box::pin(self.run_own_login(cut, report)).await;
        }
        // The session future is allocated once, at the size of its largest
        // state, and lives as long as the session. The login's deep futures
        // (the dial and handshake to the server, TLS to the client, a KILL's
        // own connection) are boxed, so what an idle session holds is the
        // splice's state, not the handshake's.
        let greeted = Box::pin(frontend.upstream.greet_mysql()).await?;
        let greeting = greeted.greeting.clone();

        // TLS on the local leg is keyhole's to offer; a Cloud SQL server's
        // greeting inside its tunnel may not offer it.
        let advertised = match frontend.local_tls {
            Some(_) => greeting.capabilities | caps::SSL,
            None => greeting.capabilities & !caps::SSL,
        };
        self.send_packet(0, &greeting.with_capabilities(advertised))
            .await?;

        let (response, hello, delta) = self.handshake_response().await?;
        let user = frontend.login.database_user(&hello.user);
        let response_payload = if user == hello.user {
            response.payload.clone()
        } else {
            mysql::with_user(&response.payload, &user).map_err(SessionError::Handshake)?
        };
        report.user = Some(user.clone());
        report.database = hello.database;
        let token = frontend.login.token(&user).await?;

        // Only now can keyhole ask the server for TLS: the SSLRequest must
        // carry the client's capabilities. The response goes out over the
        // verified session, flagged the way a TLS client flags it.
        let stream = Box::pin(frontend.upstream.upgrade_mysql(greeted, &response.payload)).await?;
        let mut server = ServerLeg::new(stream);
        let (payload, delta) = if frontend.upstream.is_tunnel() {
            // A Cloud SQL tunnel is the TLS: inside it the server sees a
            // plain client, and no SSLRequest of keyhole's took a sequence id.
            (
                mysql::without_client_capabilities(&response_payload, caps::SSL),
                delta.wrapping_sub(1),
            )
        } else {
            (
                mysql::with_client_capabilities(&response_payload, caps::SSL),
                delta,
            )
        };
        send_server_packet(&mut server, response.seq.wrapping_add(delta), &payload).await?;
        self.relay_auth(&mut server, delta, token.as_ref(), &user)
            .await?;
        // What the login needed is let go before the session, which may
        // idle for hours: the response's bytes share the client's read
        // buffer, and a token is a kilobyte or two.
        drop((response, response_payload, payload, token));

        server.exchange_leftovers(&mut self.client).await?;
        // A MySQL client has no half-close: its EOF means it is gone. Passed
        // on as a TLS close_notify, that EOF would sit unread in the server's
        // socket, and MariaDB's check for a vanished client (every few
        // seconds in SLEEP(), GET_LOCK() and the like) counts unread bytes as
        // a live client, so an abandoned statement would run to its end. A
        // bare FIN is what the server would have seen from the client itself.
        server.stream.without_close_notify();
        tracing::debug!(data_path = server.stream.data_path(), "relaying");
        let splice = Splice::new(&mut self.client.stream, &mut server.stream)
            .metered(&*frontend.login.metrics);
        // The compressed protocol hides the packets in its frames: there,
        // a bare close from the server is not judged. A client's bit counts
        // only where the greeting offered it: the server ignores the rest.
        let compressed =
            hello.capabilities & advertised & (caps::COMPRESS | caps::ZSTD_COMPRESSION) != 0;
        let mut farewell = ComQuit::default();
        let splice = if compressed {
            splice
        } else {
            splice.watching(&mut farewell)
        };
        let result = relay_until_cut(splice, cut, report).await;
        if !left_busy(&result, report, &mut server.stream).await {
            return result;
        }
        // The client has gone and the server is still at its statement.
        // With a token login keyhole can log in beside the session and stop
        // the statement as the user would. Without one it cannot (it never
        // holds a password): the server has had the client's bare close,
        // which MariaDB notices in SLEEP, GET_LOCK and other waits.
        //
        // The session's id comes from the greeting, which came before TLS
        // (unless a Cloud SQL tunnel): forged, it could name another of the
        // same user's sessions, which is no more than anyone on the path can
        // do to that user's connections with a reset.
        let abandoned = match frontend.login.token(&user).await {
            Ok(Some(token)) => match Box::pin(frontend.upstream.kill_query(
                greeting.connection_id,
                &user,
                &token,
            ))
            .await
            {
                Ok(()) => Abandoned::Cancelled,
                Err(e) => Abandoned::CancelFailed(e.to_string()),
            },
            Ok(None) => Abandoned::Left,
            Err(e) => Abandoned::CancelFailed(e.to_string()),
        };
        Err(SessionError::ClientGone(abandoned))
    }

    /// Relays packets both ways, renumbered, until the server's OK or ERR.
    /// Either side may speak next (AuthSwitchRequest, AuthMoreData, public
    /// key requests), so both are read at once; the whole exchange has the
    /// startup timeout, and whoever keyhole was waiting on when it ran out
    /// is named in the error. Packets are passed on one at a time, so what
    /// keyhole holds is one packet of at most 256 KiB.
    ///
    /// With a token, keyhole answers the server's switch to
    /// `mysql_clear_password` itself (the client never sees it; the two
    /// packets widen the sequence gap by two) and refuses any other
    /// method the server asks for.
    async fn relay_auth(
        &mut self,
        server: &mut ServerLeg,
        mut delta: u8,
        token: Option<&Token>,
        user: &str,
    ) -> Result<(), SessionError> {
        // One deadline for the whole exchange, as for Postgres.
        let timeout = self.frontend.startup_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut client_to_answer = false;
        loop {
            let step = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    packet = read_server_packet(server) => Ok::<_, SessionError>((true, packet?)),
                    packet = self.read_packet(false) => Ok((false, packet?)),
                }
            })
            .await;
            let (from_server, packet) = match step {
                Ok(result) => result?,
                Err(_) if client_to_answer => {
                    return Err(SessionError::StartupTimeout {
                        what: "reply to the authentication request",
                        waited: timeout,
                    })
                }
                Err(_) => return Err(SessionError::UpstreamStalled(timeout)),
            };
            if from_server {
                if let Some(token) = token {
                    match self.token_answer(server, &packet, token).await? {
                        TokenStep::Answered => {
                            // The switch and keyhole's answer never reach the client.
                            delta = delta.wrapping_add(2);
                            continue;
                        }
                        TokenStep::NotAsked(asked) => {
                            return Err(self.frontend.login.token_not_asked(asked, user))
                        }
                        TokenStep::PassOn => {}
                    }
                }
                self.send_packet(packet.seq.wrapping_sub(delta), &packet.payload)
                    .await?;
                match packet.payload.first() {
                    Some(&reply::OK) => return Ok(()),
                    Some(&reply::ERR) => {
                        let code = mysql::parse_err(&packet.payload).map_or(0, |(code, _, _)| code);
                        return Err(SessionError::ServerRefused(format!("MySQL error {code}")));
                    }
                    _ => client_to_answer = true,
                }
            } else {
                send_server_packet(server, packet.seq.wrapping_add(delta), &packet.payload).await?;
                client_to_answer = false;
            }
        }
    }

    /// With a token: answers a switch to `mysql_clear_password` on the
    /// server leg, and says what else the server asked for if it asked for
    /// anything a token cannot answer.
    async fn token_answer(
        &self,
        server: &mut ServerLeg,
        packet: &Packet,
        token: &Token,
    ) -> Result<TokenStep, SessionError> {
        match packet.payload.first() {
            Some(&reply::AUTH_SWITCH) => match mysql::auth_switch_plugin(&packet.payload) {
                Some(mysql::CLEAR_PASSWORD_PLUGIN) => {
                    let answer = mysql::clear_password_reply(token.expose());
                    send_server_packet(server, packet.seq.wrapping_add(1), &answer).await?;
                    self.frontend.login.token_injected();
                    Ok(TokenStep::Answered)
                }
                Some(plugin) => Ok(TokenStep::NotAsked(format!(
                    "the {} authentication method",
                    String::from_utf8_lossy(plugin)
                ))),
                None => Ok(TokenStep::NotAsked(
                    "the pre-4.1 authentication method".into(),
                )),
            },
            Some(&reply::AUTH_MORE_DATA) => Ok(TokenStep::NotAsked(
                "more data for its own authentication method".into(),
            )),
            // OK and ERR: the outcome, for the client.
            _ => Ok(TokenStep::PassOn),
        }
    }

    /// The client's HandshakeResponse41, after its SSLRequest and TLS if it
    /// asks for them; `delta` is how many sequence ids the server leg is
    /// ahead (1 when keyhole will send an SSLRequest the client did not).
    async fn handshake_response(
        &mut self,
    ) -> Result<(Packet, mysql::HandshakeResponse, u8), SessionError> {
        let timeout = self.frontend.startup_timeout;
        let waited = |what| {
            move |_| SessionError::StartupTimeout {
                what,
                waited: timeout,
            }
        };
        let first = tokio::time::timeout(timeout, self.read_packet(true))
            .await
            .map_err(waited("handshake response"))??;
        self.speaks_41 = mysql::client_speaks_41(&first.payload);
        Ok(
            match mysql::parse_first_hello(&first.payload).map_err(SessionError::Handshake)? {
                ClientHello::SslRequest { .. } => {
                    Box::pin(self.accept_tls()).await?;
                    let full = tokio::time::timeout(timeout, self.read_packet(true))
                        .await
                        .map_err(waited("handshake response"))??;
                    match mysql::parse_client_hello(&full.payload)
                        .map_err(SessionError::Handshake)?
                    {
                        ClientHello::SslRequest { .. } => {
                            return Err(SessionError::RepeatedUpgrade("SSLRequest"))
                        }
                        ClientHello::Response(hello) => (full, hello, 0u8),
                    }
                }
                ClientHello::Response(hello) => (first, hello, 1u8),
            },
        )
    }

    async fn accept_tls(&mut self) -> Result<(), SessionError> {
        let acceptor = self
            .frontend
            .local_tls
            .as_ref()
            .ok_or(SessionError::LocalTlsNotConfigured)?;
        let ClientStream::Plain(socket) =
            std::mem::replace(&mut self.client.stream, ClientStream::Gone)
        else {
            return Err(SessionError::RepeatedUpgrade("SSLRequest"));
        };
        // Unlike Postgres, MySQL answers an SSLRequest with nothing, so a
        // client may send its ClientHello right behind it: whatever is
        // buffered belongs to the TLS handshake.
        let hello = self.client.buf.split().freeze();
        match acceptor
            .accept(Rewind::new(hello, socket))
            .into_fallible()
            .await
        {
            Ok(tls) => {
                self.client.stream = ClientStream::Tls(Box::new(tls));
                Ok(())
            }
            Err((e, socket)) => {
                // The server answers a failed handshake in plain text, after
                // its TLS alert if it had one: the socket is kept for that.
                self.client.stream = ClientStream::Plain(socket.into_inner());
                Err(SessionError::ClientTls(e))
            }
        }
    }

    async fn send_packet(&mut self, seq: u8, payload: &[u8]) -> Result<(), SessionError> {
        let mut out = BytesMut::with_capacity(4 + payload.len());
        mysql::encode_packet(&mut out, seq, payload);
        self.client.send(&out).await?;
        self.next_seq = seq.wrapping_add(1);
        Ok(())
    }

    /// Reads one packet from the client (cancel-safe: partial bytes stay
    /// buffered). `in_sequence`: it must carry the id that comes next, as a
    /// server checks the client's packets before the login.
    async fn read_packet(&mut self, in_sequence: bool) -> Result<Packet, SessionError> {
        loop {
            let (buf, max) = (&mut self.client.buf, mysql::MAX_HANDSHAKE_PAYLOAD);
            let decoded = if in_sequence {
                mysql::decode_packet_in_sequence(buf, max, self.next_seq)
            } else {
                mysql::decode_packet(buf, max)
            };
            let decoded = decoded.map_err(|e| {
                // Refused from its header alone: still answer in the
                // client's sequence. Out of order, the answer carries the id
                // the client should have sent, as the server's does.
                if let (PacketError::TooLarge { .. }, Some(&seq)) = (&e, self.client.buf.get(3)) {
                    self.next_seq = seq.wrapping_add(1);
                }
                SessionError::ClientPacket(e)
            })?;
            if let Some(packet) = decoded {
                self.next_seq = packet.seq.wrapping_add(1);
                return Ok(packet);
            }
            self.client.read_more().await?;
        }
    }
}

/// What keyhole did with a server packet on a token login.
enum TokenStep {
    /// It answered a switch to `mysql_clear_password` with the token.
    Answered,
    /// The server asked for something else (named here).
    NotAsked(String),
    /// Not an authentication request: the client gets it.
    PassOn,
}

async fn send_server_packet(
    server: &mut ServerLeg,
    seq: u8,
    payload: &[u8],
) -> Result<(), SessionError> {
    let mut out = BytesMut::with_capacity(4 + payload.len());
    mysql::encode_packet(&mut out, seq, payload);
    server.send(&out).await
}

/// Reads one packet from the server (cancel-safe).
async fn read_server_packet(server: &mut ServerLeg) -> Result<Packet, SessionError> {
    loop {
        if let Some(packet) = mysql::decode_packet(&mut server.buf, mysql::MAX_HANDSHAKE_PAYLOAD)
            .map_err(|e| SessionError::UpstreamProtocol(e.to_string()))?
        {
            return Ok(packet);
        }
        server.read_more().await?;
    }
}

/// What a client on an own-login target is greeted from: a pooled
/// connection, or a fresh server connection not logged in yet (with room in
/// the pool for it, if pooled).
enum Held {
    Lease(Box<Lease<MyConn>>),
    Open(Option<Slot<MyConn>>, Box<Greeted>),
}

/// The server connection a client on an own-login target gets.
enum Ready {
    Pooled(Lease<MyConn>),
    Own(MyConn),
}

impl Ready {
    fn conn(&mut self) -> Option<&mut MyConn> {
        match self {
            Ready::Pooled(lease) => lease.conn(),
            Ready::Own(conn) => Some(conn),
        }
    }
}

impl Session<'_> {
    /// A session on a target where keyhole logs in itself (`pool=session`,
    /// `password-file=`). keyhole greets the client itself, before it knows
    /// the client's key: with the greeting of a pooled connection of the
    /// last client's key (most clients of a target are alike), or of a new
    /// server connection. The client's password is not checked (the
    /// listener is the credential). If the client's key is another, the
    /// guessed connection goes back and the client gets one of its key,
    /// whose connection id then differs from the greeting's.
    async fn run_own_login(
        &mut self,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        let frontend = self.frontend;
        let timeout = frontend.startup_timeout;
        let held = match &frontend.pool {
            Some(pool) => {
                let guess = frontend
                    .last_key
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                match pool
                    .checkout(guess.as_deref().unwrap_or(&[]), timeout)
                    .await?
                {
                    Grant::Reuse(lease) => Held::Lease(Box::new(lease)),
                    Grant::Open(slot) => Held::Open(
                        Some(slot),
                        Box::new(Box::pin(frontend.upstream.greet_mysql()).await?),
                    ),
                }
            }
            None => Held::Open(
                None,
                Box::new(Box::pin(frontend.upstream.greet_mysql()).await?),
            ),
        };
        let (greeting, connection_id) = match &held {
            Held::Lease(lease) => {
                let conn = lease_conn(lease)?;
                (conn.greeting.clone(), conn.greeting.connection_id)
            }
            Held::Open(_, greeted) => (greeted.greeting.clone(), greeted.greeting.connection_id),
        };
        let mut scramble = [0u8; 20];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scramble)
            .map_err(|_| SessionError::UpstreamProtocol("no random numbers".into()))?;
        // Printable, never NUL (clients read the scramble's end at a NUL).
        for b in &mut scramble {
            *b = b'!' + *b % 90;
        }
        let offered = greeting.capabilities & !pooled::NEVER_OFFERED;
        let offered = match frontend.local_tls {
            Some(_) => offered | caps::SSL,
            None => offered & !caps::SSL,
        };
        let hello_packet = greeting
            .for_client(
                connection_id,
                &scramble,
                offered,
                greeting
                    .mariadb_capabilities
                    .map(|m| m & pooled::MARIADB_ALLOWED),
            )
            .ok_or_else(|| SessionError::UpstreamProtocol("the greeting is truncated".into()))?;
        let answered = async {
            self.send_packet(0, &hello_packet).await?;
            let (response, hello, _) = self.handshake_response().await?;
            if hello.capabilities & (caps::COMPRESS | caps::ZSTD_COMPRESSION) != 0 {
                return Err(SessionError::Handshake(mysql::ResponseError::NotOffered(
                    "compression",
                )));
            }
            Ok::<_, SessionError>((response, hello))
        }
        .await;
        let (response, hello) = match answered {
            Ok(answered) => answered,
            Err(e) => {
                // Nothing was sent on a pooled connection: it goes back (a
                // health check that connects and hangs up costs no login).
                if let Held::Lease(lease) = held {
                    let _ = lease.release(RESET_LIMIT).await;
                }
                return Err(e);
            }
        };
        let user = frontend.login.database_user(&hello.user);
        report.user = Some(user.clone());
        report.database = hello.database.clone();
        let p = &response.payload;
        let charset = p.get(8).copied().unwrap_or(greeting.charset);
        let client_mariadb = p
            .get(28..32)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let shape = Shape::new(
            &user,
            hello.database.as_deref(),
            charset,
            hello.capabilities,
            client_mariadb,
            &greeting,
        );
        drop((response, hello));
        let key = shape.key();
        if frontend.pool.is_some() {
            *frontend
                .last_key
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(key.clone());
        }
        let mut ready = match held {
            Held::Lease(lease) if *lease.key() == *key => Ready::Pooled(*lease),
            Held::Lease(lease) => {
                // Guessed wrong: that connection goes back, and this
                // client's key is looked up.
                let _ = lease.release(RESET_LIMIT).await;
                let Some(pool) = &frontend.pool else {
                    return Err(SessionError::UpstreamProtocol(
                        "internal: a lease without a pool".into(),
                    ));
                };
                match pool.checkout(&key, timeout).await? {
                    Grant::Reuse(lease) => Ready::Pooled(lease),
                    Grant::Open(slot) => {
                        let greeted = Box::pin(frontend.upstream.greet_mysql()).await?;
                        let conn = self.own_login(greeted, shape, &user).await?;
                        Ready::Pooled(slot.fill(conn, key))
                    }
                }
            }
            Held::Open(slot, greeted) => {
                let conn = self.own_login(*greeted, shape, &user).await?;
                match slot {
                    Some(slot) => Ready::Pooled(slot.fill(conn, key)),
                    None => Ready::Own(conn),
                }
            }
        };
        if let Ready::Pooled(lease) = &ready {
            tracing::debug!(
                reused = lease.reused(),
                age_secs = lease.age().as_secs(),
                "pooled server connection"
            );
        }
        let mut ok = mysql::ok_packet(mysql::status::AUTOCOMMIT).to_vec();
        let tracked = ready
            .conn()
            .is_some_and(|c| c.shape.capabilities & caps::SESSION_TRACK != 0);
        if tracked {
            // With CLIENT_SESSION_TRACK the info string is length-encoded.
            ok.push(0);
        }
        if let Err(e) = self.send_packet(self.next_seq, &ok).await {
            if let Ready::Pooled(lease) = ready {
                let _ = lease.release(RESET_LIMIT).await;
            }
            return Err(e);
        }
        let Some(conn) = ready.conn() else {
            return Err(SessionError::UpstreamProtocol(
                "internal: a lease without its connection".into(),
            ));
        };
        let server_id = conn.greeting.connection_id;
        let leftover = std::mem::take(&mut self.client.buf);
        // A pooled session's relay is its own: the trace's splice starts here.
        #[cfg(feature = "otel")]
        crate::telemetry::otel::mark(crate::telemetry::otel::Phase::Splice, Duration::ZERO, None);
        let (end, moved) = {
            let mut relay = PooledRelay::new(
                &mut self.client.stream,
                &mut conn.stream,
                conn.shape.capabilities,
            );
            if let Err(what) = relay.preload(&leftover) {
                tracing::debug!(what, "pooled session");
                return Err(SessionError::Handshake(mysql::ResponseError::Malformed(
                    "too much sent behind the handshake response",
                )));
            }
            drop(leftover);
            let end = tokio::select! {
                end = relay.run() => Some(end),
                _ = cut.cancelled() => None,
            };
            (end, relay.moved())
        };
        report.transferred.client_to_server += moved.0;
        report.transferred.server_to_client += moved.1;
        // The pooled relay frames every message: it sees a goodbye.
        report.goodbye_watched = true;
        report.first_to_end = end.as_ref().and_then(RelayEnd::first_to_end);
        let splice_error =
            |side, source| SessionError::Splice(crate::splice::SpliceError { side, source });
        let discard = |ready: Ready, reason: CloseReason, abrupt: bool| async move {
            match ready {
                Ready::Pooled(mut lease) => {
                    if let Some(conn) = lease.conn() {
                        conn.abrupt = abrupt;
                    }
                    lease.discard(reason);
                }
                Ready::Own(mut conn) => {
                    conn.abrupt = abrupt;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        crate::pool::ServerConnection::close(conn),
                    )
                    .await;
                }
            }
        };
        match end {
            Some(RelayEnd::Clean) => {
                report.client_said_goodbye = true;
                match ready {
                    Ready::Pooled(lease) => {
                        if let Some(reason) = lease.release(RESET_LIMIT).await {
                            tracing::debug!(
                                reason = reason.label(),
                                "pooled server connection closed"
                            );
                        }
                    }
                    own => discard(own, CloseReason::NotReusable, false).await,
                }
                Ok(())
            }
            Some(RelayEnd::Dirty) => {
                // Its last commands run to their end, as without keyhole:
                // the server gets the COM_QUIT after them.
                report.client_said_goodbye = true;
                discard(ready, CloseReason::NotReusable, false).await;
                Ok(())
            }
            Some(RelayEnd::ClientGone { busy, error }) => {
                // A statement still running: the server must see the
                // socket close, not a COM_QUIT queued behind it.
                discard(ready, CloseReason::NotReusable, busy).await;
                if busy {
                    let abandoned = match frontend.login.token(&user).await {
                        Ok(Some(token)) => {
                            match Box::pin(frontend.upstream.kill_query(server_id, &user, &token))
                                .await
                            {
                                Ok(()) => Abandoned::Cancelled,
                                Err(e) => Abandoned::CancelFailed(e.to_string()),
                            }
                        }
                        Ok(None) => Abandoned::Left,
                        Err(e) => Abandoned::CancelFailed(e.to_string()),
                    };
                    return Err(SessionError::ClientGone(abandoned));
                }
                match error {
                    None => Ok(()),
                    Some(e) => Err(splice_error(crate::splice::Side::Client, e)),
                }
            }
            Some(RelayEnd::ServerGone(error)) => {
                discard(ready, CloseReason::ServerClosed, false).await;
                match error {
                    None => Ok(()),
                    Some(e) => Err(splice_error(crate::splice::Side::Server, e)),
                }
            }
            Some(RelayEnd::Protocol(what)) => {
                discard(ready, CloseReason::NotReusable, false).await;
                Err(SessionError::UpstreamProtocol(format!(
                    "the session's packets cannot be framed: {what}"
                )))
            }
            None => {
                discard(ready, CloseReason::Shutdown, true).await;
                Err(SessionError::Cut)
            }
        }
    }

    /// Logs in to a greeted server connection as keyhole, for `shape`: a
    /// token answers `mysql_clear_password`, the password file's password
    /// `mysql_native_password` and `mysql_clear_password`. The client sees
    /// nothing of the exchange but the server's own refusal.
    async fn own_login(
        &mut self,
        greeted: Greeted,
        shape: Shape,
        user: &str,
    ) -> Result<MyConn, SessionError> {
        let frontend = self.frontend;
        let login = &*frontend.login;
        let token = login.token(user).await?;
        let password = login.password.as_ref().map(|p| p.expose());
        let refused = |reason: String| SessionError::OwnLogin {
            user: user.to_owned(),
            reason,
        };
        let greeting = greeted.greeting.clone();
        let scramble = greeting.scramble().ok_or_else(|| {
            SessionError::UpstreamProtocol("a greeting without a scramble".into())
        })?;
        let auth = match (&token, password) {
            // An empty answer: a token user's server switches to
            // mysql_clear_password.
            (Some(_), _) => Vec::new(),
            (None, Some(password)) => mysql::native_password(password.as_bytes(), &scramble),
            (None, None) => {
                return Err(refused(
                    "pooled connections log in with keyhole's own credentials only: give the target iam=, or user= with password-file=".into(),
                ))
            }
        };
        let payload = shape.login_payload(&greeting, &auth, mysql::NATIVE_PASSWORD_PLUGIN);
        let tunnel = frontend.upstream.is_tunnel();
        // Sequence ids: greeting, keyhole's SSLRequest, the login; inside
        // a Cloud SQL tunnel there is no SSLRequest.
        let (seq, payload) = if tunnel {
            (greeted.seq().wrapping_add(1), payload.freeze())
        } else {
            (
                greeted.seq().wrapping_add(2),
                mysql::with_client_capabilities(&payload, caps::SSL),
            )
        };
        let stream = Box::pin(frontend.upstream.upgrade_mysql(greeted, &payload)).await?;
        let mut server = ServerLeg::new(stream);
        send_server_packet(&mut server, seq, &payload).await?;
        drop(payload);
        let timeout = frontend.startup_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let packet = tokio::time::timeout_at(deadline, read_server_packet(&mut server))
                .await
                .map_err(|_| SessionError::UpstreamStalled(timeout))??;
            match packet.payload.first() {
                Some(&reply::OK) => break,
                Some(&reply::ERR) => {
                    // The server's own words reach the client unchanged.
                    self.send_packet(self.next_seq, &packet.payload).await?;
                    let code = mysql::parse_err(&packet.payload).map_or(0, |(code, _, _)| code);
                    return Err(SessionError::ServerRefused(format!("MySQL error {code}")));
                }
                Some(&reply::AUTH_SWITCH) => {
                    let plugin = mysql::auth_switch_plugin(&packet.payload).unwrap_or_default();
                    let answer = match (plugin, &token, password) {
                        (mysql::CLEAR_PASSWORD_PLUGIN, Some(token), _) => {
                            login.token_injected();
                            mysql::clear_password_reply(token.expose())
                        }
                        // Over verified TLS, as the server asks.
                        (mysql::CLEAR_PASSWORD_PLUGIN, None, Some(password)) => {
                            mysql::clear_password_reply(password)
                        }
                        (mysql::NATIVE_PASSWORD_PLUGIN, None, Some(password)) => {
                            let data = mysql::auth_switch_data(&packet.payload);
                            mysql::native_password(password.as_bytes(), data)
                        }
                        (plugin, Some(_), _) => {
                            return Err(login.token_not_asked(
                                format!(
                                    "the {} authentication method",
                                    String::from_utf8_lossy(plugin)
                                ),
                                user,
                            ))
                        }
                        (plugin, None, _) => {
                            return Err(refused(format!(
                                "the server asked for the {} authentication method, which keyhole's password login does not answer (it answers mysql_native_password and mysql_clear_password): give the user mysql_native_password",
                                String::from_utf8_lossy(plugin)
                            )))
                        }
                    };
                    send_server_packet(&mut server, packet.seq.wrapping_add(1), &answer).await?;
                }
                _ => {
                    let what = "more data for its own authentication method".to_owned();
                    return Err(match token {
                        Some(_) => login.token_not_asked(what, user),
                        None => refused(format!(
                            "the server asked for {what}, which keyhole's password login does not answer (it answers mysql_native_password and mysql_clear_password)"
                        )),
                    });
                }
            }
        }
        if !server.buf.is_empty() {
            return Err(SessionError::UpstreamProtocol(
                "the server sent more after its OK".into(),
            ));
        }
        Ok(MyConn {
            stream: server.stream,
            greeting,
            shape,
            abrupt: false,
        })
    }
}

fn lease_conn(lease: &Lease<MyConn>) -> Result<&MyConn, SessionError> {
    lease.conn_ref().ok_or_else(|| {
        SessionError::UpstreamProtocol("internal: a lease without its connection".into())
    })
}
