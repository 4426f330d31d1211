//! A fake Google IAP TCP forwarding relay, written from the protocol as
//! gcloud and IAP Desktop speak it (../shared/REFERENCE.md, "IAP TCP
//! forwarding"): a `wss://` endpoint (TLS with a [`TestPki`] certificate for
//! 127.0.0.1; trust it with `SSL_CERT_FILE`) that takes
//! `/v4/connect?project=&zone=&instance=&interface=&port=&newWebsocket=True`
//! with `Authorization: Bearer TOKEN`, `Origin: bot:iap-tunneler` and the
//! subprotocol `relay.tunnel.cloudproxy.app`, connects to the VM's port
//! (a local TCP address the test gives) and relays: connect-success with a
//! session id, data frames of at most 16 KiB, byte-count acks both ways,
//! `/v4/reconnect?sid=&ack=` after close code 4004. Its own frame code: the
//! fake shares nothing with keyhole's.
//!
//! # API
//! - `FakeIap::start(token) -> FakeIap`: accepts only `Bearer {token}`;
//!   `endpoint()` (`wss://127.0.0.1:PORT`), `ca()` (the CA file to trust).
//! - `add_vm(project, zone, instance, port, addr)`: the VM's `port` is
//!   `addr` (a local TCP address).
//! - Knobs: `set_close_before_connect(Some(code))` (close with that code
//!   instead of connecting), `set_http_refusal(Some((status, body)))` (refuse
//!   the upgrade), `set_reauth_after(Some(bytes))` (close the next stream
//!   with 4004 after relaying that many bytes to the client, once),
//!   `set_idle_close(Some(d))` (close 4000 after `d` without a client
//!   message; `idle_closes()` counts them).
//! - Records: `connects()` (each `/v4/connect` query, as pairs), `reconnects()`,
//!   `acks_received()` (the highest ack each stream got), `headers_seen()`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::certs::TestPki;

const SUBPROTOCOL: &str = "relay.tunnel.cloudproxy.app";
const MAX_DATA: usize = 16 * 1024;

#[derive(Default)]
struct State {
    vms: HashMap<(String, String, String, u16), SocketAddr>,
    close_before_connect: Option<u16>,
    http_refusal: Option<(u16, String)>,
    reauth_after: Option<u64>,
    idle_close: Option<std::time::Duration>,
    idle_closes: u64,
    connects: Vec<Vec<(String, String)>>,
    reconnects: Vec<Vec<(String, String)>>,
    headers: Vec<Vec<(String, String)>>,
    acks: Vec<u64>,
    /// Streams that may be resumed: sid → what the relay holds of it.
    parked: HashMap<String, Parked>,
    next_sid: u64,
}

/// A stream closed with 4004, waiting for its reconnect.
struct Parked {
    vm: TcpStream,
    /// Bytes received from the client, in all.
    received: u64,
    /// Bytes sent to the client that it has not acknowledged, from `from`.
    unacked: Vec<u8>,
    from: u64,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct FakeIap {
    port: u16,
    pki: TestPki,
    token: String,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeIap {
    pub fn start(token: &str) -> FakeIap {
        let pki = TestPki::generate(&["localhost"]);
        let acceptor = pki.tls_acceptor();
        let runtime = super::runtime();
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fake IAP relay");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(Mutex::new(State::default()));
        let (st, tok) = (state.clone(), token.to_owned());
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, st, tok) = (acceptor.clone(), st.clone(), tok.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    serve(tls, st, tok).await;
                });
            }
        });
        FakeIap {
            port,
            pki,
            token: token.to_owned(),
            state,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("wss://127.0.0.1:{}", self.port)
    }

    pub fn ca(&self) -> &std::path::Path {
        &self.pki.ca
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn add_vm(&self, project: &str, zone: &str, instance: &str, port: u16, addr: SocketAddr) {
        lock(&self.state)
            .vms
            .insert((project.into(), zone.into(), instance.into(), port), addr);
    }

    pub fn set_close_before_connect(&self, code: Option<u16>) {
        lock(&self.state).close_before_connect = code;
    }

    pub fn set_http_refusal(&self, refusal: Option<(u16, &str)>) {
        lock(&self.state).http_refusal = refusal.map(|(s, b)| (s, b.to_owned()));
    }

    pub fn set_reauth_after(&self, bytes: Option<u64>) {
        lock(&self.state).reauth_after = bytes;
    }

    /// Close a stream (4000) after this long without a message from the
    /// client: an idle timeout, as front ends have.
    pub fn set_idle_close(&self, after: Option<std::time::Duration>) {
        lock(&self.state).idle_close = after;
    }

    /// Streams closed for idleness.
    pub fn idle_closes(&self) -> u64 {
        lock(&self.state).idle_closes
    }

    pub fn connects(&self) -> Vec<Vec<(String, String)>> {
        lock(&self.state).connects.clone()
    }

    pub fn reconnects(&self) -> Vec<Vec<(String, String)>> {
        lock(&self.state).reconnects.clone()
    }

    pub fn headers_seen(&self) -> Vec<Vec<(String, String)>> {
        lock(&self.state).headers.clone()
    }

    pub fn acks_received(&self) -> Vec<u64> {
        lock(&self.state).acks.clone()
    }
}

fn query_of(uri: &str) -> Vec<(String, String)> {
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.to_owned(),
                super::sigv4::percent_decode(v).unwrap_or_else(|_| v.to_owned()),
            )
        })
        .collect()
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>;

async fn serve(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    state: Arc<Mutex<State>>,
    token: String,
) {
    let mut uri = String::new();
    // tungstenite's callback type: its error is an HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        uri = req.uri().to_string();
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let mut st = lock(&state);
        st.headers.push(headers);
        let refuse = |status: u16, body: &str| {
            let mut r = ErrorResponse::new(Some(body.to_owned()));
            *r.status_mut() = http_status(status);
            r
        };
        if let Some((status, body)) = &st.http_refusal {
            return Err(refuse(*status, body));
        }
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some(format!("Bearer {token}").as_str()) {
            return Err(refuse(
                401,
                r#"{"error":{"code":401,"message":"Request is missing required authentication credential."}}"#,
            ));
        }
        let origin = req.headers().get("origin").and_then(|v| v.to_str().ok());
        let protocols = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if origin != Some("bot:iap-tunneler")
            || !protocols.split(',').any(|p| p.trim() == SUBPROTOCOL)
        {
            return Err(refuse(400, "bad origin or subprotocol"));
        }
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            SUBPROTOCOL.parse().expect("header value"),
        );
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
        return;
    };
    let query = query_of(&uri);
    if uri.starts_with("/v4/connect") {
        lock(&state).connects.push(query.clone());
        connect(ws, state, &query).await;
    } else if uri.starts_with("/v4/reconnect") {
        lock(&state).reconnects.push(query.clone());
        reconnect(ws, state, &query).await;
    } else {
        let _ = ws.close(Some(close(4000, "unknown path"))).await;
    }
}

fn http_status(code: u16) -> http::StatusCode {
    http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_REQUEST)
}

fn close(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }
}

async fn connect(mut ws: Ws, state: Arc<Mutex<State>>, query: &[(String, String)]) {
    let early = lock(&state).close_before_connect;
    if let Some(code) = early {
        let _ = ws.close(Some(close(code, "refused by the fake"))).await;
        return;
    }
    let key = (
        param(query, "project").unwrap_or("").to_owned(),
        param(query, "zone").unwrap_or("").to_owned(),
        param(query, "instance").unwrap_or("").to_owned(),
        param(query, "port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
    );
    if param(query, "newWebsocket") != Some("True") || param(query, "interface").is_none() {
        let _ = ws.close(Some(close(4002, "missing parameters"))).await;
        return;
    }
    let addr = lock(&state).vms.get(&key).copied();
    let Some(addr) = addr else {
        let _ = ws.close(Some(close(4047, "instance not found"))).await;
        return;
    };
    let Ok(vm) = TcpStream::connect(addr).await else {
        let _ = ws
            .close(Some(close(4003, "failed to connect to backend")))
            .await;
        return;
    };
    let sid = {
        let mut st = lock(&state);
        st.next_sid += 1;
        format!("fake-sid-{}", st.next_sid)
    };
    let mut hello = vec![0x00, 0x01];
    hello.extend((sid.len() as u32).to_be_bytes());
    hello.extend(sid.as_bytes());
    if ws.send(Message::Binary(hello.into())).await.is_err() {
        return;
    }
    let reauth = lock(&state).reauth_after.take();
    let parked = Parked {
        vm,
        received: 0,
        unacked: Vec::new(),
        from: 0,
    };
    pump(ws, state, sid, parked, reauth).await;
}

async fn reconnect(mut ws: Ws, state: Arc<Mutex<State>>, query: &[(String, String)]) {
    let sid = param(query, "sid").unwrap_or("").to_owned();
    let ack: u64 = param(query, "ack")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let parked = lock(&state).parked.remove(&sid);
    let Some(mut parked) = parked else {
        let _ = ws.close(Some(close(4001, "invalid sid"))).await;
        return;
    };
    // The client had `ack` of our bytes: resend the rest.
    if ack < parked.from || ack > parked.from + parked.unacked.len() as u64 {
        let _ = ws.close(Some(close(4006, "bad ack"))).await;
        return;
    }
    parked.unacked.drain(..(ack - parked.from) as usize);
    parked.from = ack;
    let mut hello = vec![0x00, 0x02];
    hello.extend(parked.received.to_be_bytes());
    if ws.send(Message::Binary(hello.into())).await.is_err() {
        return;
    }
    for chunk in parked.unacked.chunks(MAX_DATA) {
        if ws
            .send(Message::Binary(data_frame(chunk).into()))
            .await
            .is_err()
        {
            return;
        }
    }
    pump(ws, state, sid, parked, None).await;
}

fn data_frame(data: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x00, 0x04];
    frame.extend((data.len() as u32).to_be_bytes());
    frame.extend(data);
    frame
}

/// Relays between the WebSocket and the VM's port until either ends, or,
/// with `reauth`, until that many bytes went to the client (then parks the
/// stream and closes with 4004).
async fn pump(
    mut ws: Ws,
    state: Arc<Mutex<State>>,
    sid: String,
    mut s: Parked,
    reauth: Option<u64>,
) {
    let mut buf = vec![0u8; MAX_DATA];
    let mut sent_to_client: u64 = 0;
    let idle = lock(&state).idle_close;
    let mut heard = tokio::time::Instant::now();
    loop {
        let idle_at = idle.map(|d| heard + d);
        tokio::select! {
            () = async {
                match idle_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                lock(&state).idle_closes += 1;
                let _ = ws.close(Some(close(4000, "idle"))).await;
                return;
            }
            read = s.vm.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = ws.close(Some(close(4010, "destination closed"))).await;
                    return;
                }
                Ok(n) => {
                    s.unacked.extend_from_slice(&buf[..n]);
                    sent_to_client += n as u64;
                    if ws.send(Message::Binary(data_frame(&buf[..n]).into())).await.is_err() {
                        return;
                    }
                    if reauth.is_some_and(|limit| sent_to_client >= limit) {
                        lock(&state).parked.insert(sid, s);
                        let _ = ws.close(Some(close(4004, "reauthentication required"))).await;
                        // As a server does: read on until the client's close.
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        return;
                    }
                }
            },
            message = ws.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    heard = tokio::time::Instant::now();
                    let mut rest: &[u8] = &bytes;
                    while rest.len() >= 2 {
                        let tag = u16::from_be_bytes([rest[0], rest[1]]);
                        rest = &rest[2..];
                        match tag {
                            0x0004 if rest.len() >= 4 => {
                                let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                                if len > MAX_DATA || rest.len() < 4 + len {
                                    let _ = ws.close(Some(close(4007, "bad length"))).await;
                                    return;
                                }
                                if s.vm.write_all(&rest[4..4 + len]).await.is_err() {
                                    return;
                                }
                                s.received += len as u64;
                                rest = &rest[4 + len..];
                            }
                            0x0007 if rest.len() >= 8 => {
                                let mut n = [0u8; 8];
                                n.copy_from_slice(&rest[..8]);
                                let ack = u64::from_be_bytes(n);
                                rest = &rest[8..];
                                if ack < s.from || ack > s.from + s.unacked.len() as u64 {
                                    let _ = ws.close(Some(close(4006, "bad ack"))).await;
                                    return;
                                }
                                s.unacked.drain(..(ack - s.from) as usize);
                                s.from = ack;
                                lock(&state).acks.push(ack);
                            }
                            _ => {
                                let _ = ws.close(Some(close(4008, "invalid tag"))).await;
                                return;
                            }
                        }
                    }
                    // The relay acknowledges what it took.
                    let mut ack = vec![0x00, 0x07];
                    ack.extend(s.received.to_be_bytes());
                    if ws.send(Message::Binary(ack.into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
