//! `via=iap://PROJECT/ZONE/INSTANCE`: Google IAP TCP forwarding, spoken by
//! keyhole itself (what `gcloud compute start-iap-tunnel` does).
//!
//! Each client connection is one WebSocket to the IAP relay
//! (`wss://tunnel.cloudproxy.app/v4/connect?project=..&zone=..&instance=..
//! &interface=nic0&port=N`, an OAuth2 bearer token of the Google
//! credentials keyhole already uses, subprotocol
//! `relay.tunnel.cloudproxy.app`). The relay answers with a session id once
//! it reached the VM's port; from then on stream bytes travel in data
//! frames ([`frame`]) and each side acknowledges the bytes it received.
//!
//! - The VM's port is `port=`, or 22 under an SSH hop
//!   (`iap://p/z/vm,ssh://user@vm`), or else the database's own port (a
//!   relay on the VM listening where the database does).
//! - Sent bytes are kept until the relay acknowledges them (at most
//!   [`MAX_UNACKED`]; past that keyhole stops reading the client), so that
//!   after close code 4004 (reauthentication required) the stream resumes
//!   on a new WebSocket with a fresh token and nothing lost, as gcloud does.
//!   Any other close ends the connection, with the code's meaning in the log.
//! - An idle stream repeats its last acknowledgement every
//!   [`KEEPALIVE`], so a psql prompt left alone keeps its tunnel.

pub mod frame;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use self::frame::Frame;
use super::websocket::{HandshakeError, Message};
use super::wss::{self, DialError, WsReader, WsWriter};
use super::HopError;
use crate::config::via::IapHop;
use crate::credentials::gcp::GcpTokenSource;
use crate::credentials::impersonate::CLOUD_PLATFORM_SCOPE;
use crate::credentials::{TokenCache, TokenRequest};
use crate::http::client::{percent_encode, Url};
use crate::net::{Socket, TunnelEnd};

/// `--iap-endpoint`'s default.
pub const DEFAULT_ENDPOINT: &str = "wss://tunnel.cloudproxy.app";
const SUBPROTOCOL: &str = "relay.tunnel.cloudproxy.app";
/// The Origin gcloud sends; the relay checks it.
const ORIGIN: &str = "bot:iap-tunneler";
/// Sent bytes kept for a resume; past this, keyhole stops reading.
pub const MAX_UNACKED: u64 = 1024 * 1024;
/// Acknowledge at once past this many received bytes, else within
/// [`ACK_DELAY`].
const ACK_EVERY: u64 = 2 * frame::MAX_DATA as u64;
const ACK_DELAY: Duration = Duration::from_secs(2);
/// An idle stream sends its acknowledgement again this often (10 bytes).
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Resumes tried after close code 4004, in a row.
const MAX_RESUMES: u32 = 3;

/// One `iap://` hop: the VM, and the credentials and endpoint to reach it.
pub struct Iap {
    hop: IapHop,
    name: Arc<str>,
    endpoint: Url,
    env: HashMap<String, String>,
    tokens: tokio::sync::Mutex<Option<Arc<TokenCache>>>,
    tls: OnceLock<Arc<ClientConfig>>,
}

impl Iap {
    /// `endpoint`: `--iap-endpoint` (`wss://HOST[:PORT][/PATH]`).
    pub fn new(
        hop: IapHop,
        name: Arc<str>,
        endpoint: &str,
        env: HashMap<String, String>,
    ) -> Result<Iap, String> {
        let endpoint = wss::parse_url(endpoint).map_err(|e| format!("--iap-endpoint: {e}"))?;
        Ok(Iap {
            hop,
            name,
            endpoint,
            env,
            tokens: tokio::sync::Mutex::new(None),
            tls: OnceLock::new(),
        })
    }

    /// The port on the VM a connection goes to.
    pub fn vm_port(&self, database_port: u16, under_ssh: bool) -> u16 {
        self.hop
            .port
            .unwrap_or(if under_ssh { 22 } else { database_port })
    }

    /// A stream to the VM's `port`, once the relay has connected to it.
    pub async fn open(self: &Arc<Self>, port: u16, timeout: Duration) -> Result<Socket, HopError> {
        let (socket, end) = crate::net::pair().map_err(|e| HopError::Tunnel {
            hop: self.name.clone(),
            reason: format!("cannot make a socket pair: {e}"),
        })?;
        self.open_into(port, timeout, end).await?;
        Ok(socket)
    }

    /// Connects the VM's `port` to `end` (one end of a socket pair, or a
    /// connection an `ssh` over this tunnel made), once the relay has
    /// connected to it.
    pub async fn open_into(
        self: &Arc<Self>,
        port: u16,
        timeout: Duration,
        end: TunnelEnd,
    ) -> Result<(), HopError> {
        let started = Instant::now();
        let path = format!(
            "{}/v4/connect?project={}&zone={}&instance={}&interface={}&port={port}&newWebsocket=True",
            self.base_path(),
            percent_encode(&self.hop.project),
            percent_encode(&self.hop.zone),
            percent_encode(&self.hop.instance),
            percent_encode(&self.hop.interface),
        );
        let (mut rx, tx) = self.dial(&path, timeout).await?;
        let left = timeout.saturating_sub(started.elapsed());
        let sid = match tokio::time::timeout(left, first_frame(&mut rx)).await {
            Err(_) => {
                return Err(HopError::Timeout {
                    hop: self.name.clone(),
                    after: timeout,
                })
            }
            Ok(Ok(Frame::ConnectSuccess { sid })) => sid,
            Ok(Ok(other)) => {
                return Err(self.protocol(format!(
                    "the first frame was {other:?}, not connect-success"
                )))
            }
            Ok(Err(Ended::Closed(code))) => return Err(self.refused(code, port)),
            Ok(Err(Ended::Broken(reason))) => return Err(self.protocol(reason)),
        };
        tracing::debug!(hop = %self.name, port, "IAP tunnel open");
        let relay = Relay {
            iap: self.clone(),
            sid,
            rx,
            tx,
            received: 0,
            acked: 0,
            sent: 0,
            unacked: VecDeque::new(),
            unacked_from: 0,
        };
        tokio::spawn(relay.run(end));
        Ok(())
    }

    /// The hop as a URL.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn base_path(&self) -> &str {
        let path = self.endpoint.path_and_query();
        path.strip_suffix('/').unwrap_or(path)
    }

    /// A WebSocket to the relay at `path`, with a token.
    async fn dial(&self, path: &str, timeout: Duration) -> Result<(WsReader, WsWriter), HopError> {
        let token = self.token(timeout).await?;
        let authorization = format!("Bearer {}", token.expose());
        let url = Url::parse(&format!(
            "{}://{}{path}",
            if self.endpoint.is_https() {
                "https"
            } else {
                "http"
            },
            self.endpoint.authority()
        ))
        .map_err(|e| self.protocol(e.to_string()))?;
        let tls = self.tls()?;
        let headers = [
            ("Authorization", authorization.as_str()),
            ("Origin", ORIGIN),
            ("User-Agent", concat!("keyhole/", env!("CARGO_PKG_VERSION"))),
        ];
        wss::dial(&url, &tls, &headers, Some(SUBPROTOCOL), timeout)
            .await
            .map_err(|e| match e {
                DialError::Connect(reason) => HopError::Unreachable {
                    hop: self.name.clone(),
                    reason: format!("IAP endpoint {}: {reason}", self.endpoint.authority()),
                },
                DialError::Handshake(e) => self.handshake_failed(e),
            })
    }

    fn tls(&self) -> Result<Arc<ClientConfig>, HopError> {
        if let Some(tls) = self.tls.get() {
            return Ok(tls.clone());
        }
        let tls = wss::tls_config(None).map_err(|reason| HopError::Tunnel {
            hop: self.name.clone(),
            reason,
        })?;
        Ok(self.tls.get_or_init(|| tls).clone())
    }

    async fn token(&self, timeout: Duration) -> Result<crate::credentials::Token, HopError> {
        let cache = {
            let mut tokens = self.tokens.lock().await;
            match tokens.as_ref() {
                Some(cache) => cache.clone(),
                None => {
                    let source =
                        GcpTokenSource::discover_for(&self.env, CLOUD_PLATFORM_SCOPE, timeout)
                            .map_err(|e| HopError::Credentials {
                                hop: self.name.clone(),
                                reason: e.to_string(),
                            })?;
                    tracing::info!(hop = %self.name, credentials = %source.describe(), "IAP tunnels use these Google credentials");
                    let cache = TokenCache::new(Arc::new(source), timeout);
                    *tokens = Some(cache.clone());
                    cache
                }
            }
        };
        let request = TokenRequest {
            host: "iap".into(),
            port: 0,
            user: String::new(),
        };
        cache
            .get(&request)
            .await
            .map_err(|e| HopError::Credentials {
                hop: self.name.clone(),
                reason: e.to_string(),
            })
    }

    fn protocol(&self, reason: String) -> HopError {
        HopError::Protocol {
            hop: self.name.clone(),
            expected: "IAP TCP forwarding",
            reason,
        }
    }

    /// The relay closed before it connected.
    fn refused(&self, close: Option<(u16, String)>, port: u16) -> HopError {
        let Some((code, reason)) = close else {
            return self.protocol("the relay closed the connection without a word".into());
        };
        let said = if reason.is_empty() {
            String::new()
        } else {
            format!(" ({reason})")
        };
        let meaning = frame::close_meaning(code);
        let hop = self.name.clone();
        match code {
            4033 => HopError::Denied {
                hop,
                reason: format!("IAP close code 4033: {meaning}{said}"),
            },
            4003 | 4010 => HopError::TargetUnreachable {
                hop,
                target: format!("{}:{port}", self.hop.instance),
                reason: format!("IAP close code {code}: {meaning}{said}"),
            },
            _ => HopError::Tunnel {
                hop,
                reason: format!("IAP close code {code}: {meaning}{said}"),
            },
        }
    }

    fn handshake_failed(&self, e: HandshakeError) -> HopError {
        let hop = self.name.clone();
        match e {
            HandshakeError::Status { status, body, .. } => {
                let detail = error_detail(&body);
                match status {
                    401 | 403 => HopError::Denied {
                        hop,
                        reason: format!(
                            "IAP answered HTTP {status}{detail}: the credentials need roles/iap.tunnelResourceAccessor on the VM"
                        ),
                    },
                    404 => HopError::Tunnel {
                        hop,
                        reason: format!("IAP answered HTTP 404{detail}: check the project, zone and instance"),
                    },
                    _ => HopError::Tunnel {
                        hop,
                        reason: format!("IAP answered HTTP {status}{detail}"),
                    },
                }
            }
            HandshakeError::Protocol(reason) => self.protocol(reason),
            HandshakeError::Io(e) => HopError::Unreachable {
                hop,
                reason: format!("IAP endpoint {}: {e}", self.endpoint.authority()),
            },
        }
    }
}

/// Google's error codes in a refusal's body (`PERMISSION_DENIED`, a
/// reason), as the other Google endpoints show them: never the prose, which
/// the service writes and keyhole cannot vouch for in a log line.
fn error_detail(body: &str) -> String {
    let codes = crate::credentials::gcp::google_error_codes(body.as_bytes());
    if codes.is_empty() {
        String::new()
    } else {
        format!(" ({})", codes.join(", "))
    }
}

/// How a relay stream ended before its first frame.
enum Ended {
    Closed(Option<(u16, String)>),
    Broken(String),
}

/// The relay's first frame (connect or reconnect success), answering pings.
async fn first_frame(rx: &mut WsReader) -> Result<Frame, Ended> {
    loop {
        match rx.recv().await {
            Ok(Message::Binary(bytes)) => {
                let mut frames = frame::decode(bytes).map_err(|e| Ended::Broken(e.to_string()))?;
                if frames.is_empty() {
                    continue;
                }
                if frames.len() > 1 {
                    return Err(Ended::Broken(
                        "frames after the connect frame in one message".into(),
                    ));
                }
                return Ok(frames.remove(0));
            }
            Ok(Message::Close(close)) => {
                return Err(Ended::Closed(close.map(|c| (c.code, c.reason))))
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Text(_)) => return Err(Ended::Broken("a text message".into())),
            Err(e) => return Err(Ended::Broken(e.to_string())),
        }
    }
}

/// One connection's tunnel: the socket pair's end on one side, the relay's
/// WebSocket on the other.
struct Relay {
    iap: Arc<Iap>,
    sid: Bytes,
    rx: WsReader,
    tx: WsWriter,
    /// Stream bytes received from the relay, in all.
    received: u64,
    /// The last count acknowledged to the relay.
    acked: u64,
    /// Stream bytes sent, in all.
    sent: u64,
    /// Sent bytes the relay has not acknowledged, from `unacked_from` on.
    unacked: VecDeque<Bytes>,
    unacked_from: u64,
}

/// Why a tunnel ended.
enum Stop {
    /// keyhole's side closed: the session is over.
    Local,
    /// The relay closed, with its code.
    Closed(Option<(u16, String)>),
    Broken(String),
}

impl Relay {
    async fn run(mut self, end: TunnelEnd) {
        let (mut local_rx, mut local_tx) = crate::net::split_end(end);
        let mut buf = vec![0u8; frame::MAX_DATA];
        let mut out = BytesMut::with_capacity(frame::MAX_DATA + 6);
        let mut ack_at: Option<Instant> = None;
        let mut idle_until = Instant::now() + KEEPALIVE;
        let mut resumes = 0;
        let stop = loop {
            let can_read = self.sent - self.unacked_from < MAX_UNACKED;
            tokio::select! {
                read = local_rx.read(&mut buf), if can_read => match read {
                    Ok(0) | Err(_) => break Stop::Local,
                    Ok(n) => {
                        out.clear();
                        frame::encode_data(&buf[..n], &mut out);
                        self.unacked.push_back(Bytes::copy_from_slice(&buf[..n]));
                        self.sent += n as u64;
                        idle_until = Instant::now() + KEEPALIVE;
                        if let Err(e) = self.tx.send_binary(&out).await {
                            break Stop::Broken(e.to_string());
                        }
                    }
                },
                message = self.rx.recv() => match message {
                    Ok(Message::Binary(bytes)) => {
                        let frames = match frame::decode(bytes) {
                            Ok(frames) => frames,
                            Err(e) => break Stop::Broken(e.to_string()),
                        };
                        if let Err(stop) = self.take(frames, &mut local_tx, &mut ack_at).await {
                            break stop;
                        }
                        idle_until = Instant::now() + KEEPALIVE;
                    }
                    Ok(Message::Ping(data)) => {
                        let _ = self.tx.pong(&data).await;
                    }
                    Ok(Message::Pong(_)) => {}
                    Ok(Message::Text(_)) => break Stop::Broken("the relay sent a text message".into()),
                    Ok(Message::Close(close)) => {
                        let close = close.map(|c| (c.code, c.reason));
                        if matches!(close, Some((4004, _))) && resumes < MAX_RESUMES {
                            resumes += 1;
                            // The closing handshake's answer, then a new socket.
                            let _ = self.tx.close(4004, "").await;
                            match self.resume().await {
                                Ok(()) => continue,
                                Err(reason) => break Stop::Broken(format!("resuming after 4004 failed: {reason}")),
                            }
                        }
                        break Stop::Closed(close);
                    }
                    Err(e) => break Stop::Broken(e.to_string()),
                },
                () = sleep_until_opt(ack_at) => {
                    ack_at = None;
                    if let Err(e) = self.ack().await {
                        break Stop::Broken(e);
                    }
                }
                () = tokio::time::sleep_until(idle_until) => {
                    idle_until = Instant::now() + KEEPALIVE;
                    if let Err(e) = self.ack().await {
                        break Stop::Broken(e);
                    }
                }
            }
        };
        let name = self.iap.name.clone();
        // Each end answers the other's close frame (RFC 6455 §5.5.1).
        let answer = match &stop {
            Stop::Local => 1000,
            Stop::Closed(Some((code, _))) => *code,
            Stop::Closed(None) => 1000,
            Stop::Broken(_) => 1002,
        };
        let _ = self.tx.close(answer, "").await;
        match stop {
            Stop::Local => {
                tracing::debug!(hop = %name, sent = self.sent, received = self.received, "IAP tunnel closed by keyhole");
            }
            Stop::Closed(Some((code, reason))) if code == 1000 || code == 4010 => {
                tracing::debug!(hop = %name, code, %reason, "the IAP relay closed the tunnel: {}", frame::close_meaning(code));
            }
            Stop::Closed(Some((code, reason))) => {
                tracing::warn!(hop = %name, code, %reason, "the IAP relay ended the tunnel: {}", frame::close_meaning(code));
            }
            Stop::Closed(None) => {
                tracing::warn!(hop = %name, "the IAP relay ended the tunnel without a close code");
            }
            Stop::Broken(reason) => {
                tracing::warn!(hop = %name, %reason, "the IAP tunnel broke");
            }
        }
        // Dropping the socket's end shows keyhole's side an EOF.
        let _ = local_tx.shutdown().await;
    }

    /// Frames from the relay: data to the socket, acknowledgements.
    async fn take(
        &mut self,
        frames: Vec<Frame>,
        local: &mut crate::net::TunnelWrite,
        ack_at: &mut Option<Instant>,
    ) -> Result<(), Stop> {
        for frame in frames {
            match frame {
                Frame::Data(data) => {
                    if local.write_all(&data).await.is_err() {
                        return Err(Stop::Local);
                    }
                    self.received += data.len() as u64;
                    if self.received - self.acked > ACK_EVERY {
                        self.ack().await.map_err(Stop::Broken)?;
                        *ack_at = None;
                    } else if ack_at.is_none() {
                        *ack_at = Some(Instant::now() + ACK_DELAY);
                    }
                }
                Frame::Ack(count) => self.acknowledged(count).map_err(Stop::Broken)?,
                other => return Err(Stop::Broken(format!("unexpected {other:?} mid-stream"))),
            }
        }
        Ok(())
    }

    async fn ack(&mut self) -> Result<(), String> {
        self.acked = self.received;
        self.tx
            .send_binary(&frame::encode_ack(self.received))
            .await
            .map_err(|e| e.to_string())
    }

    /// The relay has `count` of our bytes: forget them.
    fn acknowledged(&mut self, count: u64) -> Result<(), String> {
        if count > self.sent {
            return Err(format!(
                "the relay acknowledged {count} bytes, more than the {} sent",
                self.sent
            ));
        }
        while let Some(front) = self.unacked.front_mut() {
            let end = self.unacked_from + front.len() as u64;
            if end <= count {
                self.unacked_from = end;
                self.unacked.pop_front();
            } else {
                if count > self.unacked_from {
                    front.advance((count - self.unacked_from) as usize);
                    self.unacked_from = count;
                }
                break;
            }
        }
        Ok(())
    }

    /// After 4004: a new WebSocket for the same session, with a fresh token;
    /// what the relay did not get is sent again.
    async fn resume(&mut self) -> Result<(), String> {
        let iap = self.iap.clone();
        let sid: String = String::from_utf8_lossy(&self.sid).into_owned();
        let path = format!(
            "{}/v4/reconnect?sid={}&ack={}&newWebsocket=True&zone={}",
            iap.base_path(),
            percent_encode(&sid),
            self.received,
            percent_encode(&iap.hop.zone),
        );
        tracing::info!(hop = %iap.name, "IAP asked for reauthentication: resuming the tunnel");
        let (mut rx, tx) = iap
            .dial(&path, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
        let received = match first_frame(&mut rx).await {
            Ok(Frame::ReconnectSuccess { received }) => received,
            Ok(other) => {
                return Err(format!(
                    "the first frame was {other:?}, not reconnect-success"
                ))
            }
            Err(Ended::Closed(Some((code, _)))) => {
                return Err(format!("close code {code}: {}", frame::close_meaning(code)))
            }
            Err(Ended::Closed(None)) => return Err("the relay closed the connection".into()),
            Err(Ended::Broken(reason)) => return Err(reason),
        };
        self.rx = rx;
        self.tx = tx;
        self.acknowledged(received)?;
        self.acked = self.received;
        let mut out = BytesMut::new();
        for chunk in &self.unacked {
            out.clear();
            frame::encode_data(chunk, &mut out);
            self.tx.send_binary(&out).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_show_googles_codes_and_never_its_prose() {
        let body = r#"{"error":{"code":403,"status":"PERMISSION_DENIED","message":"secret-ish prose","details":[{"reason":"IAP_DENIED"}]}}"#;
        assert_eq!(error_detail(body), " (PERMISSION_DENIED, IAP_DENIED)");
        assert_eq!(error_detail("plain text with prose"), "");
        assert_eq!(error_detail("  \n"), "");
    }
}
