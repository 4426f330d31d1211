//! `via=ssm://INSTANCE-ID`: AWS Systems Manager Session Manager port
//! forwarding, spoken by keyhole itself (no session-manager-plugin, no
//! second terminal, no local port to trust).
//!
//! - [`api`]: `StartSession` / `TerminateSession` (JSON 1.1, SigV4).
//! - [`message`]: the data channel's binary message and its payloads.
//! - [`channel`]: sequence numbers, acknowledgements, resend and reordering,
//!   with no I/O.
//! - [`smux`]: the multiplexing the agent speaks over one session.
//!
//! Here they meet. A session is `StartSession` for the document
//! `AWS-StartPortForwardingSessionToRemoteHost` (or `document=`) with the
//! database's host and port, then the WebSocket at its `StreamUrl`:
//! `OpenDataChannel` with the session's token, the agent's handshake
//! (keyhole answers as a port-session client of version
//! [`message::CLIENT_VERSION`]), then stream data. When the agent
//! multiplexes (every agent since 3.0.196.0), one session carries every
//! connection to the same host and port, each a smux stream; it stays
//! [`LINGER`] after its last stream and is then terminated. With an older
//! agent each connection has a session of its own. A session that breaks
//! takes only its own connections; the next connection starts a new one.
//!
//! Bytes the agent sends are acknowledged only while every connection's
//! queue has room ([`QUEUE`] chunks); otherwise the agent resends later, so
//! a slow client never makes keyhole buffer a large result. Bytes to the
//! agent wait in the channel's window (at most
//! [`channel::MAX_IN_FLIGHT`] unacknowledged messages).

pub mod api;
pub mod channel;
pub mod message;
pub mod smux;

/// xorshift64 for the protocol's property tests.
#[cfg(test)]
mod test_rng;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::api::{SsmApi, SsmApiError};
use self::channel::{Channel, ChannelConfig, Event, Incoming};
use self::message::{
    Flag, HandshakeCompletePayload, HandshakeRequestPayload, HandshakeResponsePayload,
    OpenDataChannelInput, PayloadType,
};
use self::smux::{Mux, MuxEvent};
use super::websocket::Message;
use super::wss::{self, DialError, WsReader, WsWriter};
use super::HopError;
use crate::config::via::{SsmHop, SSM_DEFAULT_DOCUMENT};
use crate::net::{Socket, TunnelEnd};

/// How long the agent may take to send its handshake, and to finish it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A multiplexed session is kept this long after its last connection.
pub const LINGER: Duration = Duration::from_secs(120);
/// Chunks queued for one connection's socket before keyhole stops
/// acknowledging the agent's data.
pub const QUEUE: usize = 64;
/// Outgoing stream bytes held while the channel's window is full.
const PENDING_MAX: usize = 64 * 1024;
/// An idle multiplexed session sends a smux NOP this often, so that the
/// service's idle timeout does not end a session a psql prompt still
/// holds (and older agents, whose smux keepalive is on, hear from us).
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// Read size from a connection's socket.
const READ_CHUNK: usize = 16 * 1024;

/// One `ssm://` hop.
pub struct Ssm {
    hop: SsmHop,
    name: Arc<str>,
    env: HashMap<String, String>,
    /// The AWS configuration, loaded at the first connection.
    sdk: tokio::sync::OnceCell<aws_config::SdkConfig>,
    /// One API client per region.
    apis: tokio::sync::Mutex<HashMap<String, Arc<SsmApi>>>,
    tls: tokio::sync::OnceCell<Arc<ClientConfig>>,
    /// Live multiplexed sessions.
    sessions: Mutex<Vec<Arc<SessionHandle>>>,
    /// One session start at a time while the agent may multiplex, so that a
    /// burst of first connections shares one session.
    starting: tokio::sync::Mutex<()>,
    /// What the last handshake said: does the agent multiplex?
    multiplexes: Mutex<Option<bool>>,
    /// Every session's task (and its TerminateSession), and their stop.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// A running session's task, as connections see it.
struct SessionHandle {
    host: String,
    port: u16,
    attach: mpsc::Sender<Attach>,
    multiplexed: bool,
}

struct Attach {
    end: TunnelEnd,
    done: oneshot::Sender<()>,
}

impl Ssm {
    pub fn new(hop: SsmHop, name: Arc<str>, env: HashMap<String, String>) -> Ssm {
        Ssm {
            hop,
            name,
            env,
            sdk: tokio::sync::OnceCell::new(),
            apis: tokio::sync::Mutex::new(HashMap::new()),
            tls: tokio::sync::OnceCell::new(),
            sessions: Mutex::new(Vec::new()),
            starting: tokio::sync::Mutex::new(()),
            multiplexes: Mutex::new(None),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Ends every session (keyhole is exiting); see [`Ssm::ended`].
    pub fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
    }

    /// Done when every session has ended and been terminated.
    pub async fn ended(&self) {
        self.tasks.wait().await;
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// A stream to `host:port` as the instance dials it.
    pub async fn open(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Socket, HopError> {
        let (socket, end) = crate::net::pair()
            .map_err(|e| self.tunnel(format!("cannot make a socket pair: {e}")))?;
        self.open_into(host, port, end, timeout).await?;
        Ok(socket)
    }

    /// Connects `host:port` (as the instance dials it) to `end`, within
    /// `timeout` (a new session's start, data channel and handshake).
    pub async fn open_into(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        end: TunnelEnd,
        timeout: Duration,
    ) -> Result<(), HopError> {
        let deadline = Instant::now() + timeout;
        let end = match self.join_live(host, port, end).await? {
            None => return Ok(()),
            Some(end) => end,
        };
        let multiplexes = *self
            .multiplexes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let _one = match multiplexes {
            Some(false) => None,
            _ => Some(
                tokio::time::timeout_at(deadline, self.starting.lock())
                    .await
                    .map_err(|_| HopError::Timeout {
                        hop: self.name.clone(),
                        after: timeout,
                    })?,
            ),
        };
        // The session another connection started meanwhile.
        let end = match self.join_live(host, port, end).await? {
            None => return Ok(()),
            Some(end) => end,
        };
        let session = self.start(host, port, deadline).await?;
        *self
            .multiplexes
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(session.multiplexed);
        if session.multiplexed {
            self.sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(session.clone());
        }
        attach(&session, end).await.map_err(|_| self.lost())
    }

    /// Joins a live session to `host:port`, if there is one; else hands
    /// `end` back.
    async fn join_live(
        &self,
        host: &str,
        port: u16,
        mut end: TunnelEnd,
    ) -> Result<Option<TunnelEnd>, HopError> {
        while let Some(session) = self.live_session(host, port) {
            match attach(&session, end).await {
                Ok(()) => return Ok(None),
                // That session ended meanwhile: forget it, try the next.
                Err(NotJoined::Back(back)) => {
                    end = back;
                    self.forget(&session);
                }
                Err(NotJoined::Lost) => return Err(self.lost()),
            }
        }
        Ok(Some(end))
    }

    fn lost(&self) -> HopError {
        self.tunnel("the session ended as the connection joined it".into())
    }

    fn live_session(&self, host: &str, port: u16) -> Option<Arc<SessionHandle>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|s| !s.attach.is_closed());
        sessions
            .iter()
            .find(|s| s.host == host && s.port == port)
            .cloned()
    }

    fn forget(&self, session: &Arc<SessionHandle>) {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|s| !Arc::ptr_eq(s, session));
    }

    fn tunnel(&self, reason: String) -> HopError {
        HopError::Tunnel {
            hop: self.name.clone(),
            reason,
        }
    }

    async fn api(&self, host: &str) -> Result<Arc<SsmApi>, HopError> {
        let sdk = self
            .sdk
            .get_or_init(crate::credentials::aws::load_config)
            .await;
        let region = self
            .hop
            .region
            .clone()
            .or_else(|| sdk.region().map(|r| r.to_string()))
            .or_else(|| crate::credentials::aws::region_from_host(host).map(str::to_owned))
            .ok_or_else(|| HopError::Credentials {
                hop: self.name.clone(),
                reason: "no AWS region: give ssm://INSTANCE?region=R, or set AWS_REGION".into(),
            })?;
        let mut apis = self.apis.lock().await;
        if let Some(api) = apis.get(&region) {
            return Ok(api.clone());
        }
        let credentials = sdk
            .credentials_provider()
            .ok_or_else(|| HopError::Credentials {
                hop: self.name.clone(),
                reason: "the AWS configuration has no credential chain".into(),
            })?;
        let tls = self.tls().await?;
        let api = SsmApi::with_tls(&self.name, &self.env, &region, credentials, tls)
            .map_err(|reason| self.tunnel(reason))?;
        let api = Arc::new(api);
        apis.insert(region, api.clone());
        Ok(api)
    }

    async fn tls(&self) -> Result<Arc<ClientConfig>, HopError> {
        self.tls
            .get_or_try_init(|| async { api::tls_config(&self.env) })
            .await
            .cloned()
            .map_err(|reason| self.tunnel(reason))
    }

    /// `StartSession`, the data channel, the handshake; then the session's
    /// task runs on its own.
    async fn start(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<Arc<SessionHandle>, HopError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let timed_out = || HopError::Timeout {
            hop: self.name.clone(),
            after: timeout,
        };
        let api = tokio::time::timeout_at(deadline, self.api(host))
            .await
            .map_err(|_| timed_out())??;
        let document = self.hop.document.as_deref().unwrap_or(SSM_DEFAULT_DOCUMENT);
        let session = tokio::time::timeout_at(
            deadline,
            api.start_session(&self.hop.target, document, host, port),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| api_error(&self.name, e))?;
        let id = session.session_id.clone();
        match self.connect(&api, &session, host, port, deadline).await {
            Ok(handle) => Ok(handle),
            Err(e) => {
                self.tasks.spawn(terminate(api, id));
                Err(e)
            }
        }
    }

    async fn connect(
        self: &Arc<Self>,
        api: &Arc<SsmApi>,
        session: &api::Session,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<Arc<SessionHandle>, HopError> {
        let url = wss::parse_url(&session.stream_url).map_err(|e| self.protocol(e))?;
        let tls = self.tls().await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let (mut rx, mut tx) =
            wss::dial(&url, &tls, &[], None, left)
                .await
                .map_err(|e| match e {
                    DialError::Connect(reason) => HopError::Unreachable {
                        hop: self.name.clone(),
                        reason: format!("the session's data channel: {reason}"),
                    },
                    DialError::Handshake(e) => self.tunnel(format!(
                        "the session's data channel refused the WebSocket: {e}"
                    )),
                })?;
        let random_id = || message::new_message_id().map(message::uuid_string);
        let open = OpenDataChannelInput::new(
            random_id().map_err(|e| self.tunnel(e.to_string()))?,
            session.token_value().to_owned(),
            random_id().map_err(|e| self.tunnel(e.to_string()))?,
        );
        tx.send_text(&open.to_json())
            .await
            .map_err(|e| self.tunnel(format!("the data channel: {e}")))?;
        let start = Instant::now();
        let unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut channel = Channel::new(ChannelConfig::default(), start.into_std(), unix_ms);
        let waited = Instant::now();
        let agent_version = tokio::time::timeout_at(
            deadline.min(waited + HANDSHAKE_TIMEOUT),
            handshake(&mut rx, &mut tx, &mut channel),
        )
        .await
        .map_err(|_| {
            self.tunnel(format!(
                "the SSM agent on {} did not complete the session handshake within {}: the agent is offline or too old (--connect-timeout bounds the wait)",
                self.hop.target,
                crate::upstream::humanize(waited.elapsed())
            ))
        })?
        .map_err(|reason| self.tunnel(format!("the session handshake failed: {reason}")))?;
        let multiplexed = message::agent_supports_smux(&agent_version);
        tracing::info!(
            hop = %self.name,
            session = %session.session_id,
            agent = %agent_version,
            multiplexed,
            target = %crate::config::host_port(host, port),
            "Session Manager session open"
        );
        let (attach_tx, attach_rx) = mpsc::channel(16);
        let handle = Arc::new(SessionHandle {
            host: host.to_owned(),
            port,
            attach: attach_tx,
            multiplexed,
        });
        let task = SessionTask {
            name: self.name.clone(),
            session_id: session.session_id.clone(),
            target: crate::config::host_port(host, port),
            rx,
            tx,
            channel,
            mux: multiplexed.then(Mux::new),
            streams: HashMap::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
        };
        let (api, stop) = (api.clone(), self.stop.clone());
        self.tasks.spawn(async move {
            let id = task.session_id.clone();
            task.run(attach_rx, stop).await;
            terminate(api, id).await;
        });
        Ok(handle)
    }

    fn protocol(&self, reason: String) -> HopError {
        HopError::Protocol {
            hop: self.name.clone(),
            expected: "Session Manager",
            reason,
        }
    }
}

/// Why a connection did not join a session.
enum NotJoined {
    /// The session's task is gone; the socket is handed back.
    Back(TunnelEnd),
    /// The task took the socket and ended before it opened the stream.
    Lost,
}

async fn attach(session: &SessionHandle, end: TunnelEnd) -> Result<(), NotJoined> {
    let (done, joined) = oneshot::channel();
    if let Err(mpsc::error::SendError(back)) = session.attach.send(Attach { end, done }).await {
        return Err(NotJoined::Back(back.end));
    }
    joined.await.map_err(|_| NotJoined::Lost)
}

async fn terminate(api: Arc<SsmApi>, session_id: String) {
    match api.terminate_session(&session_id).await {
        Ok(()) => {
            tracing::debug!(hop = api.hop(), session = %session_id, "Session Manager session terminated")
        }
        Err(e) => {
            tracing::info!(hop = api.hop(), session = %session_id, error = %e, "TerminateSession failed; the service ends the session after its idle timeout")
        }
    }
}

fn api_error(name: &Arc<str>, e: SsmApiError) -> HopError {
    let hop = name.clone();
    let reason = e.to_string();
    // The API's messages already start with the hop.
    let reason = reason
        .strip_prefix(&format!("{hop}: "))
        .map(str::to_owned)
        .unwrap_or(reason);
    match e {
        SsmApiError::AccessDenied { .. } => HopError::Denied { hop, reason },
        SsmApiError::CredentialsRejected { .. } | SsmApiError::CredentialsUnavailable { .. } => {
            HopError::Credentials { hop, reason }
        }
        SsmApiError::Unreachable { .. } => HopError::Unreachable { hop, reason },
        _ => HopError::Tunnel { hop, reason },
    }
}

/// The agent's handshake: its request, keyhole's answer, its completion.
/// Returns the agent's version.
async fn handshake(
    rx: &mut WsReader,
    tx: &mut WsWriter,
    channel: &mut Channel,
) -> Result<String, String> {
    let mut agent_version = None;
    loop {
        let bytes = match rx.recv().await.map_err(|e| e.to_string())? {
            Message::Binary(bytes) => bytes,
            Message::Ping(data) => {
                tx.pong(&data).await.map_err(|e| e.to_string())?;
                continue;
            }
            Message::Close(close) => {
                return Err(match close {
                    Some(c) => format!(
                        "the service closed the data channel ({} {})",
                        c.code, c.reason
                    ),
                    None => "the service closed the data channel".into(),
                })
            }
            Message::Text(_) | Message::Pong(_) => continue,
        };
        let now = std::time::Instant::now();
        let incoming = channel
            .on_frame(&bytes, now, true)
            .map_err(|e| e.to_string())?;
        for frame in &incoming.transmit {
            tx.send_binary(frame).await.map_err(|e| e.to_string())?;
        }
        for event in &incoming.events {
            if let Event::ChannelClosed(closed) = event {
                let said = closed
                    .as_ref()
                    .map(|c| c.output.clone())
                    .unwrap_or_default();
                return Err(format!("the service closed the session: {said}"));
            }
        }
        for delivery in incoming.deliver {
            match delivery.payload_type {
                PayloadType::HandshakeRequest => {
                    let request = HandshakeRequestPayload::from_json(&delivery.payload)
                        .map_err(|e| e.to_string())?;
                    if let Some(kind) = request.session_type() {
                        if kind != "Port" {
                            return Err(format!(
                                "the document starts a {kind} session, not port forwarding"
                            ));
                        }
                    }
                    let answer =
                        HandshakeResponsePayload::answer(&request, message::CLIENT_VERSION);
                    let frame = channel
                        .send_handshake_response(&answer, std::time::Instant::now())
                        .map_err(|e| e.to_string())?;
                    tx.send_binary(&frame).await.map_err(|e| e.to_string())?;
                    agent_version = Some(request.agent_version);
                }
                PayloadType::HandshakeComplete => {
                    let complete = HandshakeCompletePayload::from_json(&delivery.payload)
                        .map_err(|e| e.to_string())?;
                    if !complete.customer_message.is_empty() {
                        tracing::info!(message = %complete.customer_message, "the Session Manager agent says");
                    }
                    return agent_version
                        .ok_or_else(|| "handshake complete before the handshake request".into());
                }
                _ => {}
            }
        }
    }
}

/// One connection on a session, as the session's task holds it.
struct Stream {
    /// Chunks for the connection's socket (its writer task).
    to_local: mpsc::Sender<Bytes>,
}

/// What a connection's reader task sends: bytes, or `None` at its EOF.
type FromLocal = (u32, Option<Bytes>);

/// One session's task: the data channel on one side, its connections'
/// sockets on the other.
struct SessionTask {
    name: Arc<str>,
    session_id: String,
    target: String,
    rx: WsReader,
    tx: WsWriter,
    channel: Channel,
    /// `None`: one connection, no multiplexing (stream id 0).
    mux: Option<Mux>,
    streams: HashMap<u32, Stream>,
    /// Stream bytes (smux frames, or raw) waiting for the channel's window.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
}

/// Why a session ended.
enum End {
    Idle,
    /// The one connection of a session without multiplexing ended.
    ConnectionDone,
    Closed(String),
    Broken(String),
}

impl SessionTask {
    async fn run(mut self, mut attach: mpsc::Receiver<Attach>, stop: CancellationToken) {
        let (local_tx, mut local_rx) = mpsc::channel::<FromLocal>(QUEUE);
        let mut idle_since = Some(Instant::now());
        let mut last_sent = Instant::now();
        let mut attached_once = false;
        let end = loop {
            let room = self.pending_bytes < PENDING_MAX;
            let resend_at = self.channel.next_timeout().map(Instant::from_std);
            let linger_until = idle_since.map(|at| {
                at + if self.mux.is_some() {
                    LINGER
                } else {
                    HANDSHAKE_TIMEOUT
                }
            });
            tokio::select! {
                joined = attach.recv(), if self.mux.is_some() || !attached_once => {
                    let Some(Attach { end, done }) = joined else { break End::Idle };
                    attached_once = true;
                    idle_since = None;
                    let id = match self.mux.as_mut() {
                        Some(mux) => match mux.open() {
                            Ok((id, syn)) => {
                                self.queue(syn);
                                id
                            }
                            Err(e) => break End::Broken(e.to_string()),
                        },
                        None => 0,
                    };
                    let (to_local, from_session) = mpsc::channel(QUEUE);
                    self.streams.insert(id, Stream { to_local });
                    spawn_connection(id, end, local_tx.clone(), from_session);
                    let _ = done.send(());
                }
                read = local_rx.recv(), if room => {
                    let Some((id, data)) = read else { break End::Broken("the connections' queue closed".into()) };
                    if let Err(end) = self.take_local(id, data, &mut idle_since) {
                        break end;
                    }
                }
                message = self.rx.recv() => match message {
                    Ok(Message::Binary(bytes)) => {
                        if let Err(end) = self.take_agent(&bytes).await {
                            break end;
                        }
                    }
                    Ok(Message::Ping(data)) => {
                        let _ = self.tx.pong(&data).await;
                    }
                    Ok(Message::Close(close)) => {
                        break End::Closed(close.map_or_else(String::new, |c| format!("{} {}", c.code, c.reason)));
                    }
                    Ok(_) => {}
                    Err(e) => break End::Broken(e.to_string()),
                },
                () = sleep_until_opt(resend_at) => {
                    match self.channel.poll_resend(std::time::Instant::now()) {
                        Ok(Some(frame)) => {
                            if let Err(e) = self.tx.send_binary(&frame).await {
                                break End::Broken(e.to_string());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => break End::Broken(e.to_string()),
                    }
                }
                () = tokio::time::sleep_until(last_sent + KEEPALIVE), if self.mux.is_some() => {
                    if let Some(mux) = &self.mux {
                        let nop = mux.nop();
                        self.queue(nop);
                    }
                }
                () = stop.cancelled() => break End::Idle,
                () = sleep_until_opt(linger_until) => {
                    break if attached_once && self.mux.is_none() { End::ConnectionDone } else { End::Idle };
                }
            }
            match self.flush().await {
                Ok(true) => last_sent = Instant::now(),
                Ok(false) => {}
                Err(e) => break End::Broken(e),
            }
        };
        match &end {
            End::Idle | End::ConnectionDone => {
                tracing::debug!(hop = %self.name, session = %self.session_id, "Session Manager session no longer needed");
            }
            End::Closed(why) => {
                tracing::warn!(hop = %self.name, session = %self.session_id, connections = self.streams.len(), %why, "the Session Manager service closed the session; its connections end, the next one starts a new session");
            }
            End::Broken(why) => {
                tracing::warn!(hop = %self.name, session = %self.session_id, connections = self.streams.len(), %why, "the Session Manager session broke; its connections end, the next one starts a new session");
            }
        }
        if let End::ConnectionDone = end {
            if let Ok(frame) = self
                .channel
                .send_flag(Flag::TerminateSession, std::time::Instant::now())
            {
                let _ = self.tx.send_binary(&frame).await;
            }
        }
        let _ = self.tx.close(1000, "").await;
    }

    fn queue(&mut self, bytes: Bytes) {
        self.pending_bytes += bytes.len();
        self.pending.push_back(bytes);
    }

    /// A connection's bytes (or its EOF) into the stream.
    fn take_local(
        &mut self,
        id: u32,
        data: Option<Bytes>,
        idle_since: &mut Option<Instant>,
    ) -> Result<(), End> {
        match (&mut self.mux, data) {
            (Some(mux), Some(data)) => {
                if mux.is_writable(id) {
                    for frame in mux
                        .write(id, &data)
                        .map_err(|e| End::Broken(e.to_string()))?
                    {
                        self.queue(frame);
                    }
                }
            }
            (Some(mux), None) => {
                if mux.is_writable(id) {
                    if let Ok(fin) = mux.finish(id) {
                        self.queue(fin);
                    }
                }
                self.streams.remove(&id);
                if self.streams.is_empty() {
                    *idle_since = Some(Instant::now());
                }
            }
            (None, Some(data)) => self.queue(data),
            (None, None) => {
                self.streams.remove(&id);
                return Err(End::ConnectionDone);
            }
        }
        Ok(())
    }

    /// Sends what the window takes. Whether anything went out.
    async fn flush(&mut self) -> Result<bool, String> {
        let mut sent = false;
        while let Some(front) = self.pending.front_mut() {
            let (taken, frames) = self
                .channel
                .send_stream(front, std::time::Instant::now())
                .map_err(|e| e.to_string())?;
            for frame in frames {
                self.tx
                    .send_binary(&frame)
                    .await
                    .map_err(|e| e.to_string())?;
                sent = true;
            }
            self.pending_bytes -= taken;
            if taken == front.len() {
                self.pending.pop_front();
            } else {
                let _ = front.split_to(taken);
                break;
            }
        }
        Ok(sent)
    }

    /// One message from the agent or the service.
    async fn take_agent(&mut self, bytes: &[u8]) -> Result<(), End> {
        let ready = self
            .streams
            .values()
            .all(|s| s.to_local.capacity() >= QUEUE / 2);
        let Incoming {
            deliver,
            transmit,
            events,
        } = self
            .channel
            .on_frame(bytes, std::time::Instant::now(), ready)
            .map_err(|e| End::Broken(e.to_string()))?;
        for frame in transmit {
            self.tx
                .send_binary(&frame)
                .await
                .map_err(|e| End::Broken(e.to_string()))?;
        }
        for event in events {
            if let Event::ChannelClosed(closed) = event {
                let said = closed.map(|c| c.output).unwrap_or_default();
                return Err(End::Closed(format!("channel_closed: {said}")));
            }
        }
        for delivery in deliver {
            match delivery.payload_type {
                PayloadType::Output => self.deliver(delivery.payload).await?,
                PayloadType::Flag => {
                    if let Ok(Flag::ConnectToPortError) = Flag::from_payload(&delivery.payload) {
                        tracing::warn!(hop = %self.name, target = %self.target, "the SSM agent could not connect to the database from the instance");
                        if self.mux.is_none() {
                            return Err(End::Closed(format!(
                                "the agent could not connect to {}",
                                self.target
                            )));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Stream bytes from the agent to their connection. A message is taken
    /// only while every queue has room (`ready` above); the messages a gap
    /// held back can come at once, and then wait here for their queue.
    async fn deliver(&mut self, payload: Bytes) -> Result<(), End> {
        let Some(mux) = self.mux.as_mut() else {
            if let Some(stream) = self.streams.get(&0) {
                let _ = stream.to_local.send(payload).await;
            }
            return Ok(());
        };
        let events = mux
            .on_bytes(&payload)
            .map_err(|e| End::Broken(e.to_string()))?;
        for event in events {
            match event {
                MuxEvent::Data(id, data) => {
                    if let Some(stream) = self.streams.get(&id) {
                        // An error: the connection is gone (its FIN follows).
                        let _ = stream.to_local.send(data).await;
                    }
                }
                MuxEvent::Fin(id) => {
                    // Dropping the sender ends the writer task, which closes
                    // the connection's socket for writing.
                    self.streams.remove(&id);
                }
                MuxEvent::Syn(id) => {
                    if let Some(mux) = &self.mux {
                        let refuse = mux.refuse(id);
                        self.queue(refuse);
                    }
                }
                MuxEvent::Nop => {}
            }
        }
        Ok(())
    }
}

/// A connection's two tasks: its socket's bytes to the session, and the
/// session's chunks to its socket.
fn spawn_connection(
    id: u32,
    end: TunnelEnd,
    to_session: mpsc::Sender<FromLocal>,
    mut from_session: mpsc::Receiver<Bytes>,
) {
    let (mut reader, mut writer) = crate::net::split_end(end);
    tokio::spawn(async move {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let read = tokio::select! {
                read = reader.read(&mut buf) => read,
                () = to_session.closed() => return,
            };
            match read {
                Ok(0) | Err(_) => {
                    let _ = to_session.send((id, None)).await;
                    return;
                }
                Ok(n) => {
                    if to_session
                        .send((id, Some(Bytes::copy_from_slice(&buf[..n]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(chunk) = from_session.recv().await {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
