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

use std::sync::Arc;
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
use crate::protocol::farewell::ComQuit;
use crate::protocol::mysql::{self, caps, reply, ClientHello, Packet};
use crate::splice::Splice;
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
}

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
        };
        let result = session.run(admission, cut, report).await;
        let answer = result.as_ref().err().and_then(|err| {
            let (code, state) = err.mysql_answer()?;
            let mut out = BytesMut::new();
            mysql::encode_err(&mut out, session.next_seq, code, state, &err.to_string());
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

        let timeout = frontend.startup_timeout;
        let waited = |what| {
            move |_| SessionError::StartupTimeout {
                what,
                waited: timeout,
            }
        };
        let first = tokio::time::timeout(timeout, self.read_packet())
            .await
            .map_err(waited("handshake response"))??;
        let (response, hello, delta) = match mysql::parse_client_hello(&first.payload)
            .map_err(SessionError::Handshake)?
        {
            ClientHello::SslRequest { .. } => {
                Box::pin(self.accept_tls()).await?;
                let full = tokio::time::timeout(timeout, self.read_packet())
                    .await
                    .map_err(waited("handshake response"))??;
                match mysql::parse_client_hello(&full.payload).map_err(SessionError::Handshake)? {
                    ClientHello::SslRequest { .. } => {
                        return Err(SessionError::RepeatedUpgrade("SSLRequest"))
                    }
                    ClientHello::Response(hello) => (full, hello, 0u8),
                }
            }
            ClientHello::Response(hello) => (first, hello, 1u8),
        };
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
        // a bare close from the server is not judged.
        // (The client's bits alone decide: it asks only for what the
        // greeting offered, and the greeting came before TLS.)
        let compressed = hello.capabilities & (caps::COMPRESS | caps::ZSTD_COMPRESSION) != 0;
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
                    packet = self.read_packet() => Ok((false, packet?)),
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
        let tls = acceptor
            .accept(Rewind::new(hello, socket))
            .await
            .map_err(SessionError::ClientTls)?;
        self.client.stream = ClientStream::Tls(Box::new(tls));
        Ok(())
    }

    async fn send_packet(&mut self, seq: u8, payload: &[u8]) -> Result<(), SessionError> {
        let mut out = BytesMut::with_capacity(4 + payload.len());
        mysql::encode_packet(&mut out, seq, payload);
        self.client.send(&out).await?;
        self.next_seq = seq.wrapping_add(1);
        Ok(())
    }

    /// Reads one packet from the client (cancel-safe: partial bytes stay buffered).
    async fn read_packet(&mut self) -> Result<Packet, SessionError> {
        loop {
            let decoded = mysql::decode_packet(&mut self.client.buf, mysql::MAX_HANDSHAKE_PAYLOAD)
                .map_err(|e| {
                    // Refused from its header alone: still answer in the
                    // client's sequence.
                    if let Some(&seq) = self.client.buf.get(3) {
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
