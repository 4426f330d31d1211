//! The Postgres session: negotiate with the client (SSLRequest, GSSENCRequest,
//! direct TLS, CancelRequest, StartupMessage), open the verified upstream,
//! relay authentication, then hand both legs to the splice loop.
//!
//! Every failure before the splice loop that the client can still read
//! reaches it as an ErrorResponse with a SQLSTATE; nothing closes silently
//! except where the protocol leaves no room for a message.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::legs::{ClientLeg, ServerLeg};
use super::{
    left_busy, relay_until_cut, Abandoned, Admission, ClientStream, LoginPolicy, SessionError,
    SessionReport,
};
use crate::cancel::CancelRegistry;
use crate::credentials::Token;
use crate::net::{Rewind, Socket};
use crate::protocol::farewell::Terminate;
use crate::protocol::postgres::{
    self as pg, auth, tag, CancelKey, Message, StartupMessage, StartupPacket,
};
use crate::splice::pipe::{self, PipeConfig, PipeSplice};
use crate::splice::Splice;
use crate::upstream::{SharedUpstream, UpstreamError, UpstreamStream};

/// How much of the server's login messages keyhole holds before passing
/// them on (it sends them in one write where it can).
const LOGIN_FLUSH_AT: usize = 8 * 1024;

/// What one Postgres target needs to serve a client.
pub struct PostgresFrontend {
    pub upstream: SharedUpstream,
    /// TLS for the client leg, when `--listen-cert` is set.
    pub local_tls: Option<TlsAcceptor>,
    pub startup_timeout: Duration,
    pub cancels: Arc<CancelRegistry>,
    /// The configured connection limit, for the 53300 message.
    pub max_connections: Option<usize>,
    /// Which user logs in, and with what.
    pub login: Arc<LoginPolicy>,
    /// splice(2) pipes, for plain legs both ways (a relay on this host).
    pub pipe: PipeConfig,
}

/// What the client asked for once negotiation is over.
enum Opening {
    Session(StartupMessage),
    Cancel(CancelKey),
}

impl PostgresFrontend {
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
        };
        let result = session.run(admission, cut, report).await;
        let answer = result.as_ref().err().and_then(|err| {
            let code = err.postgres_answer()?;
            let mut out = BytesMut::new();
            pg::encode_error_response(&mut out, code, &err.to_string());
            Some(out)
        });
        session.client.close(answer, report).await;
        result
    }
}

/// One client connection while keyhole itself reads it (until the splice).
struct Session<'a> {
    frontend: &'a PostgresFrontend,
    client: ClientLeg,
}

impl Session<'_> {
    async fn run(
        &mut self,
        admission: Admission,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        let frontend = self.frontend;
        let timeout = frontend.startup_timeout;
        // The session future is allocated once, at the size of its largest
        // state, and lives as long as the session. The login's deep futures
        // (TLS to the client, the dial and handshake to the server, a
        // cancel's own connection) are boxed, so what an idle session holds
        // is the splice's state, not the handshake's (5.6 KiB per session
        // before, in release builds).
        let opening = tokio::time::timeout(timeout, Box::pin(self.negotiate()))
            .await
            .map_err(|_| SessionError::StartupTimeout {
                what: "startup packet",
                waited: timeout,
            })??;
        let startup = match opening {
            Opening::Cancel(key) => {
                let upstream = frontend
                    .cancels
                    .route(&key)
                    .ok_or(SessionError::UnknownCancelKey)?;
                Box::pin(upstream.send_cancel(&key)).await?;
                report.cancel_forwarded = true;
                return Ok(());
            }
            Opening::Session(startup) => startup,
        };
        report.user = Some(startup.user.clone());
        report.database = startup.database.clone();
        admission.check(frontend.max_connections)?;
        let user = frontend.login.database_user(&startup.user);
        let startup = if user == startup.user {
            startup
        } else {
            report.user = Some(user.clone());
            startup.with_user(&user)
        };
        // Before dialling: without a token there is no point in a connection.
        let token = frontend.login.token(&user).await?;

        let mut server = ServerLeg::new(Box::pin(frontend.upstream.connect_postgres()).await?);
        let key = async {
            server.send(&startup.raw).await?;
            self.relay_auth(&mut server, token.as_ref(), &user).await
        }
        .await
        .map_err(|e| late_tls_failure(e, &frontend.upstream.server_name()))?;
        let _registration = key
            .clone()
            .map(|k| frontend.cancels.register(k, frontend.upstream.clone()));
        // What the login needed is let go before the session, which may
        // idle for hours: the startup packet's bytes share the client's read
        // buffer, and a token is a kilobyte or two.
        drop((startup, token));

        server.exchange_leftovers(&mut self.client).await?;
        let result = self.relay(&mut server, cut, report).await;
        if !left_busy(&result, report, &mut server.stream).await {
            return result;
        }
        // The client has gone and the server is still at its statement:
        // cancel it as the client would have, with the session's key.
        let abandoned = match &key {
            None => Abandoned::Left,
            Some(key) => match Box::pin(frontend.upstream.send_cancel(key)).await {
                Ok(()) => Abandoned::Cancelled,
                Err(e) => Abandoned::CancelFailed(e.to_string()),
            },
        };
        Err(SessionError::ClientGone(abandoned))
    }

    /// The session proper: bytes both ways until either side ends it.
    async fn relay(
        &mut self,
        server: &mut ServerLeg,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        let metrics = &*self.frontend.login.metrics;
        // Plain on both sides (a relay on this host): the kernel moves the
        // bytes, socket to pipe to socket, and they never enter keyhole.
        if let (ClientStream::Plain(client), UpstreamStream::Plain(relay)) =
            (&mut self.client.stream, &mut server.stream)
        {
            if pipe::supported() {
                tracing::debug!(data_path = "splice(2)", "both legs plain");
                let splice = PipeSplice::new(client, relay, &self.frontend.pipe).metered(metrics);
                return relay_until_cut(splice, cut, report).await;
            }
        }
        tracing::debug!(data_path = server.stream.data_path(), "relaying");
        let mut farewell = Terminate::default();
        let splice = Splice::new(&mut self.client.stream, &mut server.stream)
            .metered(metrics)
            .watching(&mut farewell);
        relay_until_cut(splice, cut, report).await
    }

    /// Reads startup packets until the client asks for a session or a cancel,
    /// answering encryption requests along the way.
    async fn negotiate(&mut self) -> Result<Opening, SessionError> {
        let mut ssl_requested = false;
        let mut gss_requested = false;
        let mut tls_active = false;
        let mut first_read = true;
        loop {
            let packet = loop {
                if let Some(packet) = pg::decode_startup(&mut self.client.buf)? {
                    break packet;
                }
                self.client.read_more().await?;
                if first_read && self.client.buf.first() == Some(&pg::TLS_HANDSHAKE_RECORD) {
                    // PG17 direct TLS: a ClientHello where a length belongs.
                    let prefix = self.client.buf.split().freeze();
                    self.accept_tls(prefix, true).await?;
                    tls_active = true;
                }
                first_read = false;
            };
            first_read = false;
            match packet {
                StartupPacket::SslRequest => {
                    if ssl_requested || tls_active {
                        return Err(SessionError::RepeatedUpgrade("SSLRequest"));
                    }
                    ssl_requested = true;
                    if self.frontend.local_tls.is_some() {
                        // Anything buffered now was sent before the handshake
                        // and must not be read as if it came through TLS.
                        if !self.client.buf.is_empty() {
                            return Err(SessionError::DataAfterUpgrade);
                        }
                        self.client.send(b"S").await?;
                        self.accept_tls(Bytes::new(), false).await?;
                        tls_active = true;
                    } else {
                        self.client.send(b"N").await?;
                    }
                }
                StartupPacket::GssEncRequest => {
                    if gss_requested || tls_active {
                        return Err(SessionError::RepeatedUpgrade("GSSENCRequest"));
                    }
                    gss_requested = true;
                    self.client.send(b"N").await?;
                }
                StartupPacket::Cancel(key) => return Ok(Opening::Cancel(key)),
                StartupPacket::Startup(startup) => return Ok(Opening::Session(startup)),
            }
        }
    }

    async fn accept_tls(&mut self, prefix: Bytes, direct: bool) -> Result<(), SessionError> {
        let acceptor = self
            .frontend
            .local_tls
            .as_ref()
            .ok_or(SessionError::LocalTlsNotConfigured)?;
        let ClientStream::Plain(socket) =
            std::mem::replace(&mut self.client.stream, ClientStream::Gone)
        else {
            return Err(SessionError::RepeatedUpgrade("TLS"));
        };
        let tls = acceptor
            .accept(Rewind::new(prefix, socket))
            .await
            .map_err(SessionError::ClientTls)?;
        let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(pg::ALPN);
        self.client.stream = ClientStream::Tls(Box::new(tls));
        if direct && !alpn_ok {
            return Err(SessionError::MissingAlpn);
        }
        Ok(())
    }

    /// Relays the authentication exchange until ReadyForQuery. With a
    /// token, keyhole answers the server's cleartext password request itself
    /// (the client never sees it) and refuses any other request. Returns the
    /// session's cancel key.
    async fn relay_auth(
        &mut self,
        server: &mut ServerLeg,
        token: Option<&Token>,
        user: &str,
    ) -> Result<Option<CancelKey>, SessionError> {
        // One deadline for the whole exchange, not one per message: a server
        // (or anything on its path) that trickles messages forever is cut.
        let timeout = self.frontend.startup_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut to_client = BytesMut::with_capacity(1024);
        let mut key = None;
        loop {
            // What keyhole holds for the client is bounded: past a few KiB of
            // ParameterStatus and NoticeResponse, it goes out before the next
            // message is read (the client reads them at any time).
            if to_client.len() >= LOGIN_FLUSH_AT {
                self.client.send(&to_client).await?;
                to_client.clear();
            }
            let msg = tokio::time::timeout_at(deadline, read_server_message(server))
                .await
                .map_err(|_| SessionError::UpstreamStalled(timeout))??;
            match msg.tag {
                tag::AUTHENTICATION => {
                    let code = pg::auth_code(&msg).ok_or_else(|| {
                        SessionError::UpstreamProtocol(
                            "authentication request without a code".into(),
                        )
                    })?;
                    if let Some(token) = token {
                        if code == auth::CLEARTEXT_PASSWORD {
                            let mut out = BytesMut::with_capacity(6 + token.expose().len());
                            pg::encode_password_message(&mut out, token.expose());
                            server.send(&out).await?;
                            self.frontend.login.token_injected();
                            continue;
                        }
                        if pg::auth_expects_reply(code) {
                            let asked = pg::auth_name(code).to_owned();
                            return Err(self.frontend.login.token_not_asked(asked, user));
                        }
                    }
                    let msg = if code == auth::SASL {
                        pg::strip_channel_binding(&msg)
                            .map_err(SessionError::ChannelBinding)?
                            .unwrap_or(msg)
                    } else {
                        msg
                    };
                    msg.encode(&mut to_client);
                    if pg::auth_expects_reply(code) {
                        self.client.send(&to_client).await?;
                        to_client.clear();
                        let reply = tokio::time::timeout_at(deadline, self.read_message())
                            .await
                            .map_err(|_| SessionError::StartupTimeout {
                                what: "reply to the authentication request",
                                waited: timeout,
                            })??;
                        if reply.tag != tag::PASSWORD_MESSAGE {
                            return Err(SessionError::UnexpectedClientMessage(reply.tag));
                        }
                        let mut out = BytesMut::with_capacity(5 + reply.body.len());
                        reply.encode(&mut out);
                        server.send(&out).await?;
                    }
                }
                tag::BACKEND_KEY_DATA => {
                    key = pg::backend_key(&msg);
                    msg.encode(&mut to_client);
                }
                tag::READY_FOR_QUERY => {
                    msg.encode(&mut to_client);
                    self.client.send(&to_client).await?;
                    return Ok(key);
                }
                tag::ERROR_RESPONSE => {
                    // The server's own words reach the client unchanged.
                    msg.encode(&mut to_client);
                    self.client.send(&to_client).await?;
                    let code = pg::error_fields(&msg)
                        .into_iter()
                        .find(|(f, _)| *f == b'C')
                        .map(|(_, v)| v)
                        .unwrap_or_default();
                    return Err(SessionError::ServerRefused(format!("SQLSTATE {code}")));
                }
                // ParameterStatus, NoticeResponse, NegotiateProtocolVersion, ...
                _ => msg.encode(&mut to_client),
            }
        }
    }

    async fn read_message(&mut self) -> Result<Message, SessionError> {
        loop {
            if let Some(msg) =
                pg::decode_message(&mut self.client.buf, pg::MAX_STARTUP_PHASE_MESSAGE_LEN)
                    .map_err(SessionError::ClientMessage)?
            {
                return Ok(msg);
            }
            self.client.read_more().await?;
        }
    }
}

/// Reads one typed message from the server.
async fn read_server_message(server: &mut ServerLeg) -> Result<Message, SessionError> {
    loop {
        if let Some(msg) = pg::decode_message(&mut server.buf, pg::MAX_STARTUP_PHASE_MESSAGE_LEN)
            .map_err(|e| SessionError::UpstreamProtocol(e.to_string()))?
        {
            return Ok(msg);
        }
        server.read_more().await?;
    }
}

/// A TLS 1.3 server checks keyhole's client certificate after keyhole's side
/// of the handshake is done, so its refusal arrives as an alert on the first
/// exchange: report it as the TLS failure it is.
fn late_tls_failure(err: SessionError, server_name: &str) -> SessionError {
    match err {
        SessionError::UpstreamIo(io) if crate::tls::is_alert(&io) => {
            SessionError::Upstream(UpstreamError::Tls {
                message: crate::tls::describe_handshake_error(&io, server_name),
            })
        }
        other => other,
    }
}
