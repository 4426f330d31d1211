//! The Postgres session: negotiate with the client (SSLRequest, GSSENCRequest,
//! direct TLS, CancelRequest, StartupMessage), open the verified upstream,
//! relay authentication, then hand both legs to the splice loop.
//!
//! Until the server's session exists, keyhole stands in for the server and
//! answers as PostgreSQL does (tests/pg_like_the_server.rs compares the
//! two): an ErrorResponse with the server's severity and SQLSTATE (its own
//! clearer text), a protocol-2 client's refusal in the protocol-2 format, and
//! a close without a word where the server closes without one (a length out
//! of range, which is what a typed message sent before the startup packet
//! looks like; a CancelRequest). Its own checks (the startup timeout, data
//! pipelined behind an SSLRequest, non-UTF-8 names, the connection limit)
//! answer with a message that names them.

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
use crate::pool::auth::{md5_password, Scram, SCRAM_SHA_256};
use crate::pool::postgres::{self as pooled, LoginRecord, PgConn, PooledRelay, RelayEnd};
use crate::pool::{CloseReason, Grant, Pool};
use crate::protocol::farewell::Terminate;
use crate::protocol::postgres::{
    self as pg, auth, tag, CancelKey, Message, StartupMessage, StartupPacket,
};
use crate::splice::PipeConfig;
use crate::splice::Splice;
use crate::upstream::{SharedUpstream, UpstreamError};

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
    /// `pool=session`: server connections keyhole logged in to, reused.
    pub pool: Option<Pool<PgConn>>,
}

/// How long a pooled connection's reset (`DISCARD ALL`) may take before the
/// connection is closed instead.
const RESET_LIMIT: Duration = Duration::from_secs(5);

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
            match err {
                // A 2.x client reads the protocol-2 format only, as the
                // server answers it: the refusal's own text, no SQLSTATE.
                SessionError::Startup(refusal @ pg::StartupError::OldVersion(_)) => {
                    pg::encode_v2_fatal(&mut out, &refusal.to_string())
                }
                _ => pg::encode_error_response(&mut out, code, &err.to_string()),
            }
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
                let (upstream, key) = frontend
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
        if frontend.pool.is_some() || frontend.login.has_password() {
            // Boxed: its states (the own login, the pooled relay) stay out of
            // the session future every other session is allocated at.
            return Box::pin(self.run_own_login(startup, &user, cut, report)).await;
        }
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

    /// A session on a target where keyhole logs in itself (`pool=session`,
    /// `password-file=`): a pooled connection for the client's key, or a
    /// new login; the client is told the login as it stands after the
    /// connection's last reset.
    async fn run_own_login(
        &mut self,
        startup: StartupMessage,
        user: &str,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        let frontend = self.frontend;
        let pooled = match &frontend.pool {
            None => None,
            Some(pool) => match pooled::session_key(&startup) {
                Ok(key) => Some((pool, key)),
                Err(why) => {
                    tracing::info!(
                        reason = why.why(),
                        "not pooled: this session gets a connection of its own"
                    );
                    None
                }
            },
        };
        let Some((pool, key)) = pooled else {
            // A connection of its own, logged in by keyhole, then spliced.
            let (mut server, record) = self.open_logged_in(&startup, user).await?;
            drop(startup);
            let _registration = record
                .server_key
                .clone()
                .map(|k| frontend.cancels.register(k, frontend.upstream.clone()));
            self.client
                .send(&record.replay(record.server_key.as_ref()))
                .await?;
            server.exchange_leftovers(&mut self.client).await?;
            return self.relay(&mut server, cut, report).await;
        };
        let grant = pool.checkout(&key, frontend.startup_timeout).await?;
        let mut lease = match grant {
            Grant::Reuse(lease) => lease,
            Grant::Open(slot) => {
                let (server, record) = self.open_logged_in(&startup, user).await?;
                if !server.buf.is_empty() {
                    return Err(SessionError::UpstreamProtocol(
                        "the server sent more after ReadyForQuery".into(),
                    ));
                }
                slot.fill(
                    PgConn {
                        stream: server.stream,
                        login: record,
                    },
                    key,
                )
            }
        };
        drop(startup);
        tracing::debug!(
            reused = lease.reused(),
            age_secs = lease.age().as_secs(),
            "pooled server connection"
        );
        let Some(conn) = lease.conn() else {
            return Err(SessionError::UpstreamProtocol(
                "internal: a lease without its connection".into(),
            ));
        };
        let server_key = conn.login.server_key.clone();
        let client_key = server_key
            .as_ref()
            .and_then(|k| pooled::client_key(k, &ring::rand::SystemRandom::new()));
        let registration = match (&client_key, server_key.clone()) {
            (Some(mine), Some(theirs)) => Some(frontend.cancels.register_as(
                mine.clone(),
                theirs,
                frontend.upstream.clone(),
            )),
            _ => None,
        };
        if let Err(e) = self
            .client
            .send(&conn.login.replay(client_key.as_ref()))
            .await
        {
            drop(registration);
            let _ = lease.release(RESET_LIMIT).await;
            return Err(e);
        }
        let leftover = std::mem::take(&mut self.client.buf);
        let (end, moved) = {
            let mut relay = PooledRelay::new(&mut self.client.stream, &mut conn.stream);
            // A pooled session's relay is its own: the trace's splice starts here.
            #[cfg(feature = "otel")]
            crate::telemetry::otel::mark(
                crate::telemetry::otel::Phase::Splice,
                Duration::ZERO,
                None,
            );
            if let Err(what) = relay.preload(&leftover) {
                return Err(SessionError::ClientMessage(pg::MessageError::BadLength {
                    tag: 0,
                    len: leftover.len(),
                }))
                .inspect_err(|_| tracing::debug!(what, "pooled session"));
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
        // The key routes to this client's statements only while it holds
        // the connection.
        drop(registration);
        let splice_error =
            |side, source| SessionError::Splice(crate::splice::SpliceError { side, source });
        match end {
            Some(RelayEnd::Clean) => {
                report.client_said_goodbye = true;
                if let Some(reason) = lease.release(RESET_LIMIT).await {
                    tracing::debug!(reason = reason.label(), "pooled server connection closed");
                }
                Ok(())
            }
            Some(RelayEnd::Dirty) => {
                // Its last statements run to their end, as without keyhole:
                // the server gets the Terminate after them.
                report.client_said_goodbye = true;
                lease.discard(CloseReason::NotReusable);
                Ok(())
            }
            Some(RelayEnd::ClientGone { busy, error }) => {
                lease.discard(CloseReason::NotReusable);
                if busy {
                    let abandoned = match &server_key {
                        None => Abandoned::Left,
                        Some(key) => match Box::pin(frontend.upstream.send_cancel(key)).await {
                            Ok(()) => Abandoned::Cancelled,
                            Err(e) => Abandoned::CancelFailed(e.to_string()),
                        },
                    };
                    return Err(SessionError::ClientGone(abandoned));
                }
                match error {
                    None => Ok(()),
                    Some(e) => Err(splice_error(crate::splice::Side::Client, e)),
                }
            }
            Some(RelayEnd::ServerGone(error)) => {
                lease.discard(CloseReason::ServerClosed);
                match error {
                    None => Ok(()),
                    Some(e) => Err(splice_error(crate::splice::Side::Server, e)),
                }
            }
            Some(RelayEnd::Protocol(what)) => {
                lease.discard(CloseReason::NotReusable);
                Err(SessionError::UpstreamProtocol(format!(
                    "the session's messages cannot be framed: {what}"
                )))
            }
            None => {
                lease.discard(CloseReason::Shutdown);
                Err(SessionError::Cut)
            }
        }
    }

    /// Dials the server and logs in as keyhole (token or password), the
    /// client seeing nothing of the exchange but the server's own error.
    async fn open_logged_in(
        &mut self,
        startup: &StartupMessage,
        user: &str,
    ) -> Result<(ServerLeg, LoginRecord), SessionError> {
        let frontend = self.frontend;
        // Before dialling: without a token there is no point in a connection.
        let token = frontend.login.token(user).await?;
        let mut server = ServerLeg::new(Box::pin(frontend.upstream.connect_postgres()).await?);
        let record = async {
            server.send(&startup.raw).await?;
            self.own_login(&mut server, token.as_ref(), user).await
        }
        .await
        .map_err(|e| late_tls_failure(e, &frontend.upstream.server_name()))?;
        Ok((server, record))
    }

    /// keyhole's own side of the authentication exchange, until
    /// ReadyForQuery: a token or the password file's password answers a
    /// cleartext request; the password also answers md5 and SCRAM-SHA-256.
    async fn own_login(
        &mut self,
        server: &mut ServerLeg,
        token: Option<&Token>,
        user: &str,
    ) -> Result<LoginRecord, SessionError> {
        let timeout = self.frontend.startup_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let login = &*self.frontend.login;
        let password = login.password.as_ref().map(|p| p.expose());
        let refused = |reason: String| SessionError::OwnLogin {
            user: user.to_owned(),
            reason,
        };
        let mut record = LoginRecord::default();
        let mut scram: Option<Scram> = None;
        let mut out = BytesMut::with_capacity(256);
        loop {
            let msg = read_server_message_by(server, deadline, timeout).await?;
            match msg.tag {
                tag::AUTHENTICATION => {
                    let code = auth_code(&msg)?;
                    out.clear();
                    match (code, token, password) {
                        (auth::OK, _, _) => continue,
                        (auth::CLEARTEXT_PASSWORD, Some(token), _) => {
                            pg::encode_password_message(&mut out, token.expose());
                            login.token_injected();
                        }
                        (auth::CLEARTEXT_PASSWORD, None, Some(password)) => {
                            pg::encode_password_message(&mut out, password);
                        }
                        (auth::MD5_PASSWORD, None, Some(password)) => {
                            let salt = msg.body.get(4..8).ok_or_else(|| {
                                SessionError::UpstreamProtocol("MD5 request without a salt".into())
                            })?;
                            let answer = md5_password(user, password.as_bytes(), salt);
                            pg::encode_password_message(&mut out, &answer);
                        }
                        (auth::SASL, None, Some(_)) => {
                            let offered = msg.body.get(4..).unwrap_or_default();
                            let scram_offered = offered
                                .split(|&b| b == 0)
                                .any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !scram_offered {
                                return Err(refused(
                                    "the server offers no SASL mechanism keyhole speaks (SCRAM-SHA-256)".into(),
                                ));
                            }
                            let random = ring::rand::SystemRandom::new();
                            let (exchange, first) =
                                Scram::start(&random).map_err(|e| refused(e.to_string()))?;
                            scram = Some(exchange);
                            sasl_message(&mut out, Some(SCRAM_SHA_256), first.as_bytes());
                        }
                        (auth::SASL_CONTINUE, None, Some(password)) => {
                            let exchange = scram.as_mut().ok_or_else(|| {
                                SessionError::UpstreamProtocol("SASL continue before SASL".into())
                            })?;
                            let last = exchange
                                .client_final(msg.body.get(4..).unwrap_or_default(), password.as_bytes())
                                .map_err(|e| refused(e.to_string()))?;
                            sasl_message(&mut out, None, last.as_bytes());
                        }
                        (auth::SASL_FINAL, None, Some(_)) => {
                            let exchange = scram.as_ref().ok_or_else(|| {
                                SessionError::UpstreamProtocol("SASL final before SASL".into())
                            })?;
                            exchange
                                .verify_server_final(msg.body.get(4..).unwrap_or_default())
                                .map_err(|e| refused(e.to_string()))?;
                            continue;
                        }
                        (code, Some(_), _) => {
                            return Err(login.token_not_asked(pg::auth_name(code).to_owned(), user))
                        }
                        (code, None, Some(_)) => {
                            return Err(refused(format!(
                                "the server asked for {}, which keyhole's password login does not answer (it answers cleartext, md5 and SCRAM-SHA-256)",
                                pg::auth_name(code)
                            )))
                        }
                        (code, None, None) => {
                            return Err(refused(format!(
                                "the server asked for {}, and pooled connections log in with keyhole's own credentials only: give the target iam=, auto-iam-authn, or user= with password-file=",
                                pg::auth_name(code)
                            )))
                        }
                    }
                    server.send(&out).await?;
                }
                tag::ERROR_RESPONSE => {
                    // The server's own words reach the client unchanged.
                    out.clear();
                    msg.encode(&mut out);
                    self.client.send(&out).await?;
                    let code = pg::error_fields(&msg)
                        .into_iter()
                        .find(|(f, _)| *f == b'C')
                        .map(|(_, v)| v)
                        .unwrap_or_default();
                    return Err(SessionError::ServerRefused(format!("SQLSTATE {code}")));
                }
                tag::READY_FOR_QUERY => return Ok(record),
                // ParameterStatus, BackendKeyData, NegotiateProtocolVersion;
                // notices are not replayed.
                _ => record.learn(&msg),
            }
        }
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
        // (splice(2) needs file descriptors: Unix only, and it works on Linux.)
        #[cfg(keyhole_unix)]
        if let (ClientStream::Plain(client), crate::upstream::UpstreamStream::Plain(relay)) =
            (&mut self.client.stream, &mut server.stream)
        {
            if crate::splice::zero_copy_supported() {
                tracing::debug!(data_path = "splice(2)", "both legs plain");
                let splice =
                    crate::splice::pipe::PipeSplice::new(client, relay, &self.frontend.pipe)
                        .metered(metrics);
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
            let msg = read_server_message_by(server, deadline, timeout).await?;
            match msg.tag {
                tag::AUTHENTICATION => {
                    let code = auth_code(&msg)?;
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

/// SASLInitialResponse (with `mechanism`) or SASLResponse.
fn sasl_message(out: &mut BytesMut, mechanism: Option<&str>, data: &[u8]) {
    use bytes::BufMut;
    let mut len = 4 + data.len();
    if let Some(m) = mechanism {
        len += m.len() + 1 + 4;
    }
    out.put_u8(tag::PASSWORD_MESSAGE);
    out.put_u32(len as u32);
    if let Some(m) = mechanism {
        out.put_slice(m.as_bytes());
        out.put_u8(0);
        out.put_u32(data.len() as u32);
    }
    out.put_slice(data);
}

/// Reads one typed message from the server.
/// The server's next login message, by the login's one deadline.
async fn read_server_message_by(
    server: &mut ServerLeg,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<Message, SessionError> {
    tokio::time::timeout_at(deadline, read_server_message(server))
        .await
        .map_err(|_| SessionError::UpstreamStalled(timeout))?
}

/// An Authentication message's request code.
fn auth_code(msg: &Message) -> Result<u32, SessionError> {
    pg::auth_code(msg).ok_or_else(|| {
        SessionError::UpstreamProtocol("authentication request without a code".into())
    })
}

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
