//! A fake AWS Systems Manager for `via=ssm://INSTANCE-ID`: the JSON 1.1 API
//! (`StartSession`, `TerminateSession`) and the Session Manager data channel
//! with a fake SSM agent behind it that forwards to real TCP ports on this
//! machine. Written from the contract (REFERENCE.md, "AWS Systems Manager
//! Session Manager"; aws/session-manager-plugin and aws/amazon-ssm-agent),
//! with its own encoding of the agent message and of smux: nothing here is
//! shared with keyhole's `src/transport/ssm`, so each checks the other.
//!
//! Both servers are TLS on 127.0.0.1 with a certificate from the fake's own
//! [`TestPki`] (names `localhost`, `127.0.0.1`), on the fake's own runtime;
//! dropping the fake stops everything. Give keyhole `AWS_ENDPOINT_URL_SSM=
//! api_url()`, `AWS_CA_BUNDLE=ca_file()` and credentials that match (see
//! [`FakeSsm::env`]).
//!
//! # API
//!
//! - [`FakeSsm::start`]`(credentials: AwsCredentials)` (region `us-east-1`)
//!   / [`FakeSsm::start_in`]`(region, credentials)`. `api_url()`
//!   (`https://127.0.0.1:PORT/`), `api_port()`, `ws_port()`, `region()`,
//!   `pki()`, `ca_file()` (for `AWS_CA_BUNDLE`), `env() -> Vec<(String,
//!   String)>` (`AWS_ENDPOINT_URL_SSM`, `AWS_CA_BUNDLE`, `AWS_REGION`, the
//!   three `AWS_*` key variables), `set_credentials(AwsCredentials)`.
//! - The API: `POST /` with `Content-Type: application/x-amz-json-1.1` and
//!   `X-Amz-Target: AmazonSSM.StartSession|TerminateSession`, SigV4 by the
//!   credentials (checked with the harness's own [`sigv4`]: key, signature,
//!   date, service `ssm`, the fake's region, `x-amz-security-token` equal to
//!   the session token when the credentials have one). Failures are AWS JSON
//!   errors, with the casing AWS uses: `UnrecognizedClientException`,
//!   `InvalidSignatureException`, `MissingAuthenticationTokenException`,
//!   `UnknownOperationException`, `SerializationException` (lower-case
//!   `message`, `com.amazon.coral.service#` prefix), `InvalidDocument`,
//!   `InvalidParameters` (`Message`). `StartSession` needs `Target`,
//!   `DocumentName` one of [`PORT_DOCUMENTS`] (or added by `allow_document`),
//!   `Parameters` with `host` (for the remote-host documents) and
//!   `portNumber`, each a one-string array (`localPortNumber` optional), and
//!   answers `SessionId` (`keyhole-test-` + 17 hex digits), `TokenValue`
//!   (random) and `StreamUrl` (`wss://127.0.0.1:WS_PORT/v1/data-channel/
//!   {SessionId}?role=publish_subscribe&cell-number=...`). `TerminateSession`
//!   answers `{"SessionId"}` and ends that session's data channel with
//!   `channel_closed`.
//! - [`ApiFailure`] via `set_api_failure(Option<ApiFailure>)`: what every
//!   `StartSession` answers instead, until cleared (`AccessDenied` 400
//!   `com.amazon.coral.service#AccessDeniedException`/`Message`,
//!   `TargetNotConnected` 400 `"<id> is not connected."`, `Throttling`,
//!   `ExpiredToken`, `InternalError` 500, `Custom { status, kind, message }`).
//!   `set_known_targets(Some(ids))`: other targets get `TargetNotConnected`
//!   (what AWS answers for an unknown instance too). `route(host_port, addr)`:
//!   what a `host:port` reaches from the instance (its own `localhost:22`).
//! - The data channel (WebSocket over TLS): the first frame must be text
//!   `OpenDataChannel` (`MessageSchemaVersion`, `RequestId`, `TokenValue`,
//!   `ClientId`, `ClientVersion`) with the session's token, used once (else
//!   a close frame 1008). The agent then sends the handshake request
//!   (payload type 5: `AgentVersion`, `RequestedClientActions` with one
//!   `SessionType` action: `SessionType: "Port"`, `Properties: {host,
//!   portNumber, type: "LocalPortForwarding"[, localPortNumber]}`), waits for
//!   the response (6; its `ClientVersion` is recorded; none within
//!   `handshake_timeout`, or an action reported failed → `channel_closed`)
//!   and sends handshake complete (7, `HandshakeTimeToComplete` in
//!   nanoseconds). With `ClientVersion` ≥ 1.1.70 and `agent_version` >
//!   3.0.196.0 it speaks smux v1 (little-endian frames): each client
//!   stream (SYN) gets its own TCP connection to `host:portNumber`; FIN from
//!   the client closes it, EOF from the target sends FIN; a failed connect
//!   sends the flag `ConnectToPortError` (payload type 10, u32 BE 3) and FIN;
//!   late PSH or FIN for a stream the fake closed are dropped, as smux does.
//!   Without smux it relays one connection (opened after the handshake;
//!   refused → `channel_closed`), closed by the `DisconnectToPort` flag and
//!   opened again by the next data. Its stream payloads are at most 1024
//!   bytes, sequence numbers from 0 (flag 1 on the first); it acknowledges
//!   every client message in order or ahead of it (buffering the latter),
//!   re-acknowledges duplicates, ignores stream data before the handshake
//!   completes (acknowledged), and resends its own unacknowledged messages
//!   after `resend_after`. The `TerminateSession` flag (2) ends the session.
//!   smux keepalive NOPs go out every `nop_interval` when the client's
//!   version is ≤ 1.2.331.0 (as the agent keeps keepalive on for those).
//! - [`Faults`] via `set_faults(Faults)` / `faults()` (read live by every
//!   channel; random choices from `seed` and the channel's number): `drop`
//!   (fraction of its stream messages whose first transmission is skipped),
//!   `duplicate`, `reorder` (hold one back, send it after the next),
//!   `no_handshake` (the agent is offline: nothing after OpenDataChannel),
//!   `agent_version` (`"3.0.100.0"` has no smux), `idle_close:
//!   Option<Duration>` (end a session, with `channel_closed`, after that long
//!   without client `input_stream_data`), `resend_after`,
//!   `handshake_timeout`, `nop_interval`.
//! - Run-time actions on every live channel (or one session's: the `_for`
//!   forms take a session id): `pause_publication()`, `start_publication()`,
//!   `close_channels(CloseKind::{WebSocketClose, TcpDrop,
//!   ChannelClosed(output)})`.
//! - Assertions: `counters() -> Counters` (sessions started/terminated,
//!   channels opened/refused, handshakes, streams opened/closed, target
//!   connections and connect failures, messages sent/resent/dropped/
//!   duplicated/reordered, acks sent/received, duplicates and out-of-order
//!   from the client, data before the handshake, messages while paused, idle
//!   closes, NOPs received), `start_requests() -> Vec<StartRequest>`,
//!   `terminated() -> Vec<String>`, `open_data_channels() ->
//!   Vec<OpenDataChannel>` (without the token; `token_ok`),
//!   `last_client_version()`, `client_versions()`, `errors()` (protocol
//!   violations by the client: bad digest or header, an acknowledgement
//!   naming the wrong message id, unknown smux command...), `wait_for(what,
//!   timeout, cond)`.
//! - [`wire`]: the fake's encoding of the agent message (`Frame`,
//!   `encode`, `decode`, `ack_payload`, payload and flag constants) and of
//!   smux frames (`smux_frame`, `SmuxParser`), for hand-written clients.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::certs::TestPki;
use super::cloud::{try_random_string, AwsCredentials};
use super::sigv4;

/// The documents the fake knows (both port-forwarding ones AWS publishes).
pub const PORT_DOCUMENTS: &[&str] = &[
    "AWS-StartPortForwardingSessionToRemoteHost",
    "AWS-StartPortForwardingSession",
];
/// The agent version the fake's agent reports by default (smux, no keepalive
/// for new clients).
pub const DEFAULT_AGENT_VERSION: &str = "3.3.1611.0";
/// An agent version from before smux (the plugin needs > 3.0.196.0).
pub const OLD_AGENT_VERSION: &str = "3.0.100.0";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Compares dotted versions numerically (`1.2.10` > `1.2.9`); missing parts
/// are 0, non-numbers 0.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<u64> {
        s.split('.')
            .map(|p| p.trim().parse().unwrap_or(0))
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x.cmp(&y);
        }
    }
    std::cmp::Ordering::Equal
}

// --- the wire ------------------------------------------------------------------------

/// The agent message and smux, as the fake encodes them.
pub mod wire {
    use ring::digest;

    /// Bytes before the payload length: the value of the HeaderLength field.
    pub const HEADER_LENGTH: u32 = 116;
    pub const INPUT: &str = "input_stream_data";
    pub const OUTPUT: &str = "output_stream_data";
    pub const ACK: &str = "acknowledge";
    pub const CHANNEL_CLOSED: &str = "channel_closed";
    pub const START_PUBLICATION: &str = "start_publication";
    pub const PAUSE_PUBLICATION: &str = "pause_publication";

    pub const PAYLOAD_OUTPUT: u32 = 1;
    pub const PAYLOAD_HANDSHAKE_REQUEST: u32 = 5;
    pub const PAYLOAD_HANDSHAKE_RESPONSE: u32 = 6;
    pub const PAYLOAD_HANDSHAKE_COMPLETE: u32 = 7;
    pub const PAYLOAD_FLAG: u32 = 10;

    pub const FLAG_DISCONNECT_TO_PORT: u32 = 1;
    pub const FLAG_TERMINATE_SESSION: u32 = 2;
    pub const FLAG_CONNECT_TO_PORT_ERROR: u32 = 3;

    pub const SMUX_SYN: u8 = 0;
    pub const SMUX_FIN: u8 = 1;
    pub const SMUX_PSH: u8 = 2;
    pub const SMUX_NOP: u8 = 3;

    /// One decoded message.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Frame {
        pub message_type: String,
        pub schema_version: u32,
        pub created_ms: u64,
        pub sequence: i64,
        pub flags: u64,
        /// The UUID as text (lower-case, hyphenated), halves back in order.
        pub message_id: String,
        pub payload_type: u32,
        pub payload: Vec<u8>,
    }

    fn uuid_text(b: &[u8; 16]) -> String {
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// A random version-4 UUID.
    pub fn new_uuid() -> [u8; 16] {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        b
    }

    /// Encodes a message with a fresh message id; returns the bytes and the
    /// id's text.
    pub fn encode(
        message_type: &str,
        sequence: i64,
        flags: u64,
        payload_type: u32,
        payload: &[u8],
        created_ms: u64,
    ) -> (Vec<u8>, String) {
        let id = new_uuid();
        let mut out = Vec::with_capacity(120 + payload.len());
        out.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
        let mut kind = [b' '; 32];
        let n = message_type.len().min(32);
        kind[..n].copy_from_slice(&message_type.as_bytes()[..n]);
        out.extend_from_slice(&kind);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&created_ms.to_be_bytes());
        out.extend_from_slice(&sequence.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        // The UUID travels with its two 8-byte halves swapped.
        out.extend_from_slice(&id[8..16]);
        out.extend_from_slice(&id[0..8]);
        out.extend_from_slice(digest::digest(&digest::SHA256, payload).as_ref());
        out.extend_from_slice(&payload_type.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        (out, uuid_text(&id))
    }

    fn be<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], String> {
        b.get(at..at + N)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| format!("message cut short at byte {at}"))
    }

    /// Decodes and checks a message: header length, payload length, digest.
    pub fn decode(b: &[u8]) -> Result<Frame, String> {
        let hl = u32::from_be_bytes(be(b, 0)?);
        if hl != HEADER_LENGTH {
            return Err(format!("HeaderLength is {hl}, not {HEADER_LENGTH}"));
        }
        let kind = b.get(4..36).ok_or("message cut short in MessageType")?;
        let message_type = String::from_utf8_lossy(kind)
            .trim_matches(|c: char| c == ' ' || c == '\0')
            .to_owned();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&be::<8>(b, 72)?);
        id[8..].copy_from_slice(&be::<8>(b, 64)?);
        let digest_field: [u8; 32] = be(b, 80)?;
        let payload_type = u32::from_be_bytes(be(b, 112)?);
        let len = u32::from_be_bytes(be(b, 116)?) as usize;
        let payload = &b[120.min(b.len())..];
        if payload.len() != len {
            return Err(format!(
                "PayloadLength is {len} but {} bytes follow the header",
                payload.len()
            ));
        }
        let want = digest::digest(&digest::SHA256, payload);
        if want.as_ref() != digest_field && !(payload.is_empty() && digest_field == [0; 32]) {
            return Err("PayloadDigest is not the SHA-256 of the payload".to_owned());
        }
        Ok(Frame {
            message_type,
            schema_version: u32::from_be_bytes(be(b, 36)?),
            created_ms: u64::from_be_bytes(be(b, 40)?),
            sequence: i64::from_be_bytes(be(b, 48)?),
            flags: u64::from_be_bytes(be(b, 56)?),
            message_id: uuid_text(&id),
            payload_type,
            payload: payload.to_vec(),
        })
    }

    /// The JSON an acknowledgement of `frame` carries.
    pub fn ack_payload(frame: &Frame) -> Vec<u8> {
        serde_json::json!({
            "AcknowledgedMessageType": frame.message_type,
            "AcknowledgedMessageId": frame.message_id,
            "AcknowledgedMessageSequenceNumber": frame.sequence,
            "IsSequentialMessage": true,
        })
        .to_string()
        .into_bytes()
    }

    /// An acknowledgement of `frame`, ready to send.
    pub fn ack(frame: &Frame, created_ms: u64) -> Vec<u8> {
        encode(ACK, 0, 3, 0, &ack_payload(frame), created_ms).0
    }

    /// One smux v1 frame (little-endian length and stream id).
    pub fn smux_frame(cmd: u8, sid: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + data.len());
        out.push(1);
        out.push(cmd);
        out.extend_from_slice(&(data.len() as u16).to_le_bytes());
        out.extend_from_slice(&sid.to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    /// Splits a byte stream into smux frames, whatever the message boundaries.
    #[derive(Debug, Default)]
    pub struct SmuxParser {
        buf: Vec<u8>,
    }

    impl SmuxParser {
        pub fn push(&mut self, bytes: &[u8]) {
            self.buf.extend_from_slice(bytes);
        }

        /// The next whole frame `(version, cmd, sid, data)`, if one is in.
        pub fn next_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
            if self.buf.len() < 8 {
                return None;
            }
            let len = usize::from(u16::from_le_bytes([self.buf[2], self.buf[3]]));
            if self.buf.len() < 8 + len {
                return None;
            }
            let sid = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
            let (ver, cmd) = (self.buf[0], self.buf[1]);
            let data = self.buf[8..8 + len].to_vec();
            self.buf.drain(..8 + len);
            Some((ver, cmd, sid, data))
        }
    }
}

// --- settings, records, counters ----------------------------------------------------

/// What `StartSession` answers instead of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiFailure {
    AccessDenied,
    TargetNotConnected,
    Throttling,
    ExpiredToken,
    InternalError,
    Custom {
        status: u16,
        kind: String,
        message: String,
    },
}

/// The data channel's fault knobs (see the module docs).
#[derive(Debug, Clone)]
pub struct Faults {
    pub seed: u64,
    pub drop: f64,
    pub duplicate: f64,
    pub reorder: f64,
    pub no_handshake: bool,
    pub agent_version: String,
    pub idle_close: Option<Duration>,
    pub resend_after: Duration,
    pub handshake_timeout: Duration,
    pub nop_interval: Duration,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            seed: 1,
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            no_handshake: false,
            agent_version: DEFAULT_AGENT_VERSION.to_owned(),
            idle_close: None,
            resend_after: Duration::from_millis(150),
            handshake_timeout: Duration::from_secs(15),
            nop_interval: Duration::from_secs(10),
        }
    }
}

/// How [`FakeSsm::close_channels`] ends a data channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseKind {
    /// A WebSocket close frame (1000).
    WebSocketClose,
    /// The TCP connection drops: no close frame, no TLS close_notify.
    TcpDrop,
    /// A `channel_closed` message with this `Output`, then a close frame.
    ChannelClosed(String),
}

/// One `StartSession` call, whatever its outcome.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub target: String,
    pub document: String,
    pub parameters: Value,
    pub reason: Option<String>,
    /// The session id, or the error type answered.
    pub outcome: Result<String, String>,
}

/// An `OpenDataChannel` frame, without its token.
#[derive(Debug, Clone)]
pub struct OpenDataChannel {
    pub session_id: String,
    pub message_schema_version: String,
    pub request_id: String,
    pub client_id: String,
    pub client_version: String,
    pub token_ok: bool,
}

/// A snapshot of the fake's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub sessions_started: u64,
    pub sessions_terminated: u64,
    pub terminate_flags: u64,
    pub channels_opened: u64,
    pub channels_refused: u64,
    pub handshakes_completed: u64,
    pub streams_opened: u64,
    pub streams_closed: u64,
    pub target_connections: u64,
    pub connect_failures: u64,
    pub messages_sent: u64,
    pub messages_resent: u64,
    pub messages_dropped: u64,
    pub messages_duplicated: u64,
    pub messages_reordered: u64,
    pub acks_sent: u64,
    pub acks_received: u64,
    pub duplicates_from_client: u64,
    pub out_of_order_from_client: u64,
    pub data_before_handshake: u64,
    pub messages_while_paused: u64,
    pub idle_closes: u64,
    pub nops_received: u64,
}

#[derive(Default)]
struct Atomics {
    sessions_started: AtomicU64,
    sessions_terminated: AtomicU64,
    terminate_flags: AtomicU64,
    channels_opened: AtomicU64,
    channels_refused: AtomicU64,
    handshakes_completed: AtomicU64,
    streams_opened: AtomicU64,
    streams_closed: AtomicU64,
    target_connections: AtomicU64,
    connect_failures: AtomicU64,
    messages_sent: AtomicU64,
    messages_resent: AtomicU64,
    messages_dropped: AtomicU64,
    messages_duplicated: AtomicU64,
    messages_reordered: AtomicU64,
    acks_sent: AtomicU64,
    acks_received: AtomicU64,
    duplicates_from_client: AtomicU64,
    out_of_order_from_client: AtomicU64,
    data_before_handshake: AtomicU64,
    messages_while_paused: AtomicU64,
    idle_closes: AtomicU64,
    nops_received: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::SeqCst);
}

struct SessionInfo {
    token: String,
    target: String,
    host: String,
    port: String,
    local_port: Option<String>,
    opened: bool,
    terminated: bool,
}

#[derive(Debug, Clone)]
enum Command {
    Pause,
    Start,
    Close(CloseKind),
}

struct State {
    region: String,
    api_port: u16,
    ws_port: u16,
    credentials: Mutex<AwsCredentials>,
    failure: Mutex<Option<ApiFailure>>,
    known_targets: Mutex<Option<Vec<String>>>,
    /// `host:port` as the instance sees it → the local address it reaches.
    routes: Mutex<HashMap<String, String>>,
    documents: Mutex<Vec<String>>,
    faults: Mutex<Faults>,
    sessions: Mutex<HashMap<String, SessionInfo>>,
    starts: Mutex<Vec<StartRequest>>,
    terminated: Mutex<Vec<String>>,
    opens: Mutex<Vec<OpenDataChannel>>,
    client_versions: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
    counters: Atomics,
    commands: broadcast::Sender<(Option<String>, Command)>,
}

impl State {
    fn error(&self, what: String) {
        lock(&self.errors).push(what);
    }
}

/// The fake service (see the module docs).
pub struct FakeSsm {
    state: Arc<State>,
    pki: TestPki,
    runtime: Option<Runtime>,
}

impl Drop for FakeSsm {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl FakeSsm {
    /// A fake in `us-east-1` accepting requests signed by `credentials`.
    pub fn start(credentials: AwsCredentials) -> FakeSsm {
        FakeSsm::start_in("us-east-1", credentials)
    }

    /// A fake in `region` (the region requests must be signed for).
    pub fn start_in(region: &str, credentials: AwsCredentials) -> FakeSsm {
        let pki = TestPki::generate(&["localhost", "127.0.0.1"]);
        let runtime = super::runtime();
        let api = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("fake SSM: bind the API port");
        let ws = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("fake SSM: bind the data channel port");
        let api_port = api.local_addr().expect("API address").port();
        let ws_port = ws.local_addr().expect("data channel address").port();
        let (commands, _) = broadcast::channel(64);
        let state = Arc::new(State {
            region: region.to_owned(),
            api_port,
            ws_port,
            credentials: Mutex::new(credentials),
            failure: Mutex::new(None),
            known_targets: Mutex::new(None),
            routes: Mutex::new(HashMap::new()),
            documents: Mutex::new(PORT_DOCUMENTS.iter().map(|d| (*d).to_owned()).collect()),
            faults: Mutex::new(Faults::default()),
            sessions: Mutex::new(HashMap::new()),
            starts: Mutex::new(Vec::new()),
            terminated: Mutex::new(Vec::new()),
            opens: Mutex::new(Vec::new()),
            client_versions: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            counters: Atomics::default(),
            commands,
        });
        let acceptor = pki.tls_acceptor();
        {
            let (state, acceptor) = (state.clone(), acceptor.clone());
            runtime.spawn(async move {
                while let Ok((tcp, _)) = api.accept().await {
                    let (state, acceptor) = (state.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        match acceptor.accept(tcp).await {
                            Ok(tls) => serve_api(tls, &state).await,
                            Err(e) => state.error(format!("API: TLS handshake failed: {e}")),
                        }
                    });
                }
            });
        }
        {
            let state = state.clone();
            runtime.spawn(async move {
                while let Ok((tcp, _)) = ws.accept().await {
                    let (state, acceptor) = (state.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        match acceptor.accept(tcp).await {
                            Ok(tls) => serve_channel(tls, state).await,
                            Err(e) => {
                                state.error(format!("data channel: TLS handshake failed: {e}"))
                            }
                        }
                    });
                }
            });
        }
        FakeSsm {
            state,
            pki,
            runtime: Some(runtime),
        }
    }

    /// `https://127.0.0.1:PORT/`, for `AWS_ENDPOINT_URL_SSM`.
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.state.api_port)
    }

    pub fn api_port(&self) -> u16 {
        self.state.api_port
    }

    pub fn ws_port(&self) -> u16 {
        self.state.ws_port
    }

    pub fn region(&self) -> &str {
        &self.state.region
    }

    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The CA both servers' certificate chains to: `AWS_CA_BUNDLE`.
    pub fn ca_file(&self) -> &Path {
        &self.pki.ca
    }

    /// The variables that point an AWS client at this fake with its
    /// credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        let c = lock(&self.state.credentials).clone();
        let mut vars = vec![
            ("AWS_ENDPOINT_URL_SSM".to_owned(), self.api_url()),
            (
                "AWS_CA_BUNDLE".to_owned(),
                self.pki.ca.display().to_string(),
            ),
            ("AWS_REGION".to_owned(), self.state.region.clone()),
            ("AWS_ACCESS_KEY_ID".to_owned(), c.access_key_id),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), c.secret_access_key),
        ];
        if !c.session_token.is_empty() {
            vars.push(("AWS_SESSION_TOKEN".to_owned(), c.session_token));
        }
        vars
    }

    pub fn set_credentials(&self, credentials: AwsCredentials) {
        *lock(&self.state.credentials) = credentials;
    }

    pub fn set_api_failure(&self, failure: Option<ApiFailure>) {
        *lock(&self.state.failure) = failure;
    }

    /// Only these targets are connected (None: every target is).
    pub fn set_known_targets(&self, targets: Option<Vec<String>>) {
        *lock(&self.state.known_targets) = targets;
    }

    /// What `host:port` reaches from the instance (its own `localhost:22`,
    /// a name of the VPC): `addr` on this machine. Unmapped names are dialled
    /// as given.
    pub fn route(&self, host_port: &str, addr: std::net::SocketAddr) {
        lock(&self.state.routes).insert(host_port.to_owned(), addr.to_string());
    }

    pub fn allow_document(&self, name: &str) {
        lock(&self.state.documents).push(name.to_owned());
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.state.faults) = faults;
    }

    pub fn faults(&self) -> Faults {
        lock(&self.state.faults).clone()
    }

    fn command(&self, session: Option<&str>, command: Command) {
        let _ = self
            .state
            .commands
            .send((session.map(str::to_owned), command));
    }

    pub fn pause_publication(&self) {
        self.command(None, Command::Pause);
    }

    pub fn start_publication(&self) {
        self.command(None, Command::Start);
    }

    pub fn close_channels(&self, how: CloseKind) {
        self.command(None, Command::Close(how));
    }

    pub fn pause_publication_for(&self, session_id: &str) {
        self.command(Some(session_id), Command::Pause);
    }

    pub fn start_publication_for(&self, session_id: &str) {
        self.command(Some(session_id), Command::Start);
    }

    pub fn close_channel_for(&self, session_id: &str, how: CloseKind) {
        self.command(Some(session_id), Command::Close(how));
    }

    pub fn counters(&self) -> Counters {
        let a = &self.state.counters;
        let g = |c: &AtomicU64| c.load(Ordering::SeqCst);
        Counters {
            sessions_started: g(&a.sessions_started),
            sessions_terminated: g(&a.sessions_terminated),
            terminate_flags: g(&a.terminate_flags),
            channels_opened: g(&a.channels_opened),
            channels_refused: g(&a.channels_refused),
            handshakes_completed: g(&a.handshakes_completed),
            streams_opened: g(&a.streams_opened),
            streams_closed: g(&a.streams_closed),
            target_connections: g(&a.target_connections),
            connect_failures: g(&a.connect_failures),
            messages_sent: g(&a.messages_sent),
            messages_resent: g(&a.messages_resent),
            messages_dropped: g(&a.messages_dropped),
            messages_duplicated: g(&a.messages_duplicated),
            messages_reordered: g(&a.messages_reordered),
            acks_sent: g(&a.acks_sent),
            acks_received: g(&a.acks_received),
            duplicates_from_client: g(&a.duplicates_from_client),
            out_of_order_from_client: g(&a.out_of_order_from_client),
            data_before_handshake: g(&a.data_before_handshake),
            messages_while_paused: g(&a.messages_while_paused),
            idle_closes: g(&a.idle_closes),
            nops_received: g(&a.nops_received),
        }
    }

    pub fn start_requests(&self) -> Vec<StartRequest> {
        lock(&self.state.starts).clone()
    }

    /// Session ids `TerminateSession` was called for, in order.
    pub fn terminated(&self) -> Vec<String> {
        lock(&self.state.terminated).clone()
    }

    pub fn open_data_channels(&self) -> Vec<OpenDataChannel> {
        lock(&self.state.opens).clone()
    }

    /// The `ClientVersion` of every handshake response, in order.
    pub fn client_versions(&self) -> Vec<String> {
        lock(&self.state.client_versions).clone()
    }

    pub fn last_client_version(&self) -> Option<String> {
        lock(&self.state.client_versions).last().cloned()
    }

    pub fn errors(&self) -> Vec<String> {
        lock(&self.state.errors).clone()
    }

    /// Polls `cond` until it holds; panics after `timeout` naming `what`.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&FakeSsm) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "fake SSM: timed out waiting for {what}; counters {:?}; errors {:?}",
                self.counters(),
                self.errors()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// --- the API --------------------------------------------------------------------------

struct HttpRequest {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<HttpRequest, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Err("request head over 64 KiB".into());
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a whole request head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let (path, query) = target
        .split_once('?')
        .map_or((target.clone(), String::new()), |(p, q)| {
            (p.to_owned(), q.to_owned())
        });
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > 1024 * 1024 {
        return Err("request body over 1 MiB".into());
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed inside the body".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(HttpRequest {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// An AWS JSON error: `(status, body)`. `lower` picks `message` over
/// `Message`.
fn aws_error(status: u16, kind: &str, message: &str, lower: bool) -> (u16, Value) {
    let key = if lower { "message" } else { "Message" };
    (status, json!({ "__type": kind, key: message }))
}

async fn serve_api<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, state: &State) {
    let (status, body) =
        match tokio::time::timeout(Duration::from_secs(10), read_request(&mut s)).await {
            Ok(Ok(req)) => answer(&req, state),
            Ok(Err(e)) => {
                state.error(format!("API: {e}"));
                return;
            }
            Err(_) => {
                state.error("API: no request within 10 s".into());
                return;
            }
        };
    let body = body.to_string();
    let request_id = try_random_string(32, b"0123456789abcdef").unwrap_or_default();
    let reply = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nx-amzn-RequestId: {request_id}\r\nConnection: close\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Error" },
        body.len()
    );
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

const CORAL: &str = "com.amazon.coral.service#";

fn answer(req: &HttpRequest, state: &State) -> (u16, Value) {
    if req.method != "POST" || req.path != "/" {
        return aws_error(
            404,
            &format!("{CORAL}UnknownOperationException"),
            "only POST / is served",
            true,
        );
    }
    // The signature first, as AWS checks it before anything else.
    let creds = lock(&state.credentials).clone();
    if req.header("authorization").is_none() {
        return aws_error(
            400,
            &format!("{CORAL}MissingAuthenticationTokenException"),
            "Missing Authentication Token",
            true,
        );
    }
    let signed = sigv4::SignedRequest {
        method: &req.method,
        path: &req.path,
        query: &req.query,
        headers: &req.headers,
        body: &req.body,
    };
    match sigv4::verify_header_signature(
        &signed,
        &creds.access_key_id,
        &creds.secret_access_key,
        SystemTime::now(),
    ) {
        Err(why) if why.starts_with("signed with access key") => {
            state.error(format!("API: {why}"));
            return aws_error(
                400,
                &format!("{CORAL}UnrecognizedClientException"),
                "The security token included in the request is invalid.",
                true,
            );
        }
        Err(why) => {
            state.error(format!("API: signature: {why}"));
            return aws_error(
                400,
                &format!("{CORAL}InvalidSignatureException"),
                &format!("The request signature we calculated does not match the signature you provided ({why})"),
                true,
            );
        }
        Ok(cred) => {
            if cred.service != "ssm" || cred.region != state.region {
                state.error(format!(
                    "API: signed for {}/{}, not ssm/{}",
                    cred.service, cred.region, state.region
                ));
                return aws_error(
                    400,
                    &format!("{CORAL}InvalidSignatureException"),
                    &format!(
                        "Credential should be scoped to a valid region and service ssm/{}",
                        state.region
                    ),
                    true,
                );
            }
        }
    }
    let token = req.header("x-amz-security-token");
    let token_ok = if creds.session_token.is_empty() {
        token.is_none()
    } else {
        token == Some(creds.session_token.as_str())
    };
    if !token_ok {
        state.error("API: x-amz-security-token is missing or not the session token".into());
        return aws_error(
            400,
            &format!("{CORAL}UnrecognizedClientException"),
            "The security token included in the request is invalid.",
            true,
        );
    }
    let json_type = req
        .header("content-type")
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/x-amz-json-1.1"));
    if !json_type {
        state.error(format!(
            "API: Content-Type is {:?}, not application/x-amz-json-1.1",
            req.header("content-type")
        ));
        return aws_error(
            400,
            &format!("{CORAL}SerializationException"),
            "Content-Type must be application/x-amz-json-1.1",
            true,
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return aws_error(
            400,
            &format!("{CORAL}SerializationException"),
            "the body is not JSON",
            true,
        );
    };
    match req.header("x-amz-target") {
        Some("AmazonSSM.StartSession") => start_session(&body, state),
        Some("AmazonSSM.TerminateSession") => terminate_session(&body, state),
        other => {
            state.error(format!("API: X-Amz-Target {other:?}"));
            aws_error(
                400,
                &format!("{CORAL}UnknownOperationException"),
                "unknown operation",
                true,
            )
        }
    }
}

/// `[ "value" ]` → `value`.
fn one_string(params: &Value, name: &str) -> Result<Option<String>, String> {
    match params.get(name) {
        None => Ok(None),
        Some(Value::Array(a)) if a.len() == 1 => a[0]
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| format!("{name} must hold one string")),
        Some(_) => Err(format!("{name} must be a list of one string")),
    }
}

fn start_session(body: &Value, state: &State) -> (u16, Value) {
    let target = body
        .get("Target")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let document = body
        .get("DocumentName")
        .and_then(Value::as_str)
        .unwrap_or("SSM-SessionManagerRunShell")
        .to_owned();
    let parameters = body.get("Parameters").cloned().unwrap_or(Value::Null);
    let reason = body
        .get("Reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let result = check_start(&target, &document, &parameters, state);
    let outcome = match &result {
        Ok((_, v)) => Ok(v["SessionId"].as_str().unwrap_or("").to_owned()),
        Err((_, v)) => Err(v["__type"].as_str().unwrap_or("").to_owned()),
    };
    lock(&state.starts).push(StartRequest {
        target,
        document,
        parameters,
        reason,
        outcome,
    });
    match result {
        Ok(ok) | Err(ok) => ok,
    }
}

type Answer = (u16, Value);

fn check_start(
    target: &str,
    document: &str,
    parameters: &Value,
    state: &State,
) -> Result<Answer, Answer> {
    if target.is_empty() {
        return Err(aws_error(
            400,
            "ValidationException",
            "1 validation error detected: Value null at 'target' failed to satisfy constraint: Member must not be null",
            false,
        ));
    }
    if let Some(failure) = lock(&state.failure).clone() {
        return Err(match failure {
            ApiFailure::AccessDenied => aws_error(
                400,
                &format!("{CORAL}AccessDeniedException"),
                &format!(
                    "User: arn:aws:sts::123456789012:assumed-role/keyhole-test/session is not authorized to perform: ssm:StartSession on resource: arn:aws:ec2:{}:123456789012:instance/{target} because no identity-based policy allows the ssm:StartSession action",
                    state.region
                ),
                false,
            ),
            ApiFailure::TargetNotConnected => aws_error(
                400,
                "TargetNotConnected",
                &format!("{target} is not connected."),
                false,
            ),
            ApiFailure::Throttling => aws_error(
                400,
                "com.amazon.coral.availability#ThrottlingException",
                "Rate exceeded",
                true,
            ),
            ApiFailure::ExpiredToken => aws_error(
                400,
                &format!("{CORAL}ExpiredTokenException"),
                "The security token included in the request is expired",
                true,
            ),
            ApiFailure::InternalError => {
                aws_error(500, "InternalServerError", "Internal server error", false)
            }
            ApiFailure::Custom {
                status,
                kind,
                message,
            } => aws_error(status, &kind, &message, false),
        });
    }
    if let Some(known) = lock(&state.known_targets).as_ref() {
        if !known.iter().any(|k| k == target) {
            return Err(aws_error(
                400,
                "TargetNotConnected",
                &format!("{target} is not connected."),
                false,
            ));
        }
    }
    if !lock(&state.documents).iter().any(|d| d == document) {
        return Err(aws_error(
            400,
            "InvalidDocument",
            &format!("Document with name {document} does not exist."),
            false,
        ));
    }
    let invalid = |why: String| aws_error(400, "InvalidParameters", &why, false);
    let Some(map) = parameters.as_object() else {
        return Err(invalid("Parameters are required".into()));
    };
    let remote = document.ends_with("ToRemoteHost");
    for name in map.keys() {
        let known =
            matches!(name.as_str(), "portNumber" | "localPortNumber") || (remote && name == "host");
        if !known {
            return Err(invalid(format!(
                "Parameter {name} is not defined in document {document}"
            )));
        }
    }
    let host = one_string(parameters, "host").map_err(invalid)?;
    let port = one_string(parameters, "portNumber").map_err(invalid)?;
    let local_port = one_string(parameters, "localPortNumber").map_err(invalid)?;
    let host = match (remote, host) {
        (true, Some(h)) if !h.is_empty() => h,
        (true, _) => return Err(invalid("host is required".into())),
        (false, _) => "localhost".to_owned(),
    };
    let numeric = |p: &str| p.parse::<u16>().is_ok();
    let Some(port) = port.filter(|p| numeric(p)) else {
        return Err(invalid("portNumber must be a port number".into()));
    };
    if local_port.as_deref().is_some_and(|p| !numeric(p)) {
        return Err(invalid("localPortNumber must be a port number".into()));
    }
    let session_id = format!(
        "keyhole-test-{}",
        try_random_string(17, b"0123456789abcdef").unwrap_or_default()
    );
    let token = try_random_string(
        200,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    )
    .unwrap_or_default();
    let cell = try_random_string(
        40,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    )
    .unwrap_or_default();
    lock(&state.sessions).insert(
        session_id.clone(),
        SessionInfo {
            token: token.clone(),
            target: target.to_owned(),
            host,
            port,
            local_port,
            opened: false,
            terminated: false,
        },
    );
    bump(&state.counters.sessions_started);
    Ok((
        200,
        json!({
            "SessionId": session_id,
            "TokenValue": token,
            "StreamUrl": format!(
                "wss://127.0.0.1:{}/v1/data-channel/{session_id}?role=publish_subscribe&cell-number={cell}",
                state.ws_port
            ),
        }),
    ))
}

fn terminate_session(body: &Value, state: &State) -> (u16, Value) {
    let Some(id) = body.get("SessionId").and_then(Value::as_str) else {
        return aws_error(
            400,
            "ValidationException",
            "1 validation error detected: Value null at 'sessionId' failed to satisfy constraint: Member must not be null",
            false,
        );
    };
    lock(&state.terminated).push(id.to_owned());
    bump(&state.counters.sessions_terminated);
    if let Some(s) = lock(&state.sessions).get_mut(id) {
        s.terminated = true;
    }
    let _ = state.commands.send((
        Some(id.to_owned()),
        Command::Close(CloseKind::ChannelClosed(String::new())),
    ));
    (200, json!({ "SessionId": id }))
}

// --- the data channel -------------------------------------------------------------------

/// splitmix64: small, seedable, good enough for fault choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

enum ConnEvent {
    Connected(u32),
    Failed(u32, String),
    Data(u32, Vec<u8>),
    Eof(u32),
}

type Ws<S> = WebSocketStream<S>;

async fn serve_channel<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    s: S,
    state: Arc<State>,
) {
    let path = Arc::new(Mutex::new(String::new()));
    let seen = path.clone();
    // tungstenite's callback type fixes the error type.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        *lock(&seen) = req.uri().path().to_owned();
        Ok(resp)
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async(s, callback).await {
        Ok(ws) => ws,
        Err(e) => {
            state.error(format!("data channel: WebSocket handshake failed: {e}"));
            return;
        }
    };
    let path = lock(&path).clone();
    let session_id = path
        .strip_prefix("/v1/data-channel/")
        .unwrap_or("")
        .to_owned();
    // The first frame: OpenDataChannel, as text.
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t.as_str().to_owned(),
        other => {
            state.error(format!(
                "data channel {session_id}: the first frame is not a text OpenDataChannel ({})",
                match other {
                    Err(_) => "none within 10 s".to_owned(),
                    Ok(m) => format!("{m:?}").chars().take(80).collect(),
                }
            ));
            bump(&state.counters.channels_refused);
            refuse(&mut ws, "expected OpenDataChannel").await;
            return;
        }
    };
    let open: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |n: &str| open.get(n).and_then(Value::as_str).unwrap_or("").to_owned();
    let token = field("TokenValue");
    let (session, token_ok) = {
        let mut sessions = lock(&state.sessions);
        match sessions.get_mut(&session_id) {
            Some(s) if s.token == token && !s.opened && !s.terminated => {
                s.opened = true;
                (
                    Some((
                        s.target.clone(),
                        s.host.clone(),
                        s.port.clone(),
                        s.local_port.clone(),
                    )),
                    true,
                )
            }
            _ => (None, false),
        }
    };
    lock(&state.opens).push(OpenDataChannel {
        session_id: session_id.clone(),
        message_schema_version: field("MessageSchemaVersion"),
        request_id: field("RequestId"),
        client_id: field("ClientId"),
        client_version: field("ClientVersion"),
        token_ok,
    });
    let Some((target, host, port, local_port)) = session else {
        bump(&state.counters.channels_refused);
        refuse(&mut ws, "invalid or used token, or unknown session").await;
        return;
    };
    for name in [
        "MessageSchemaVersion",
        "RequestId",
        "ClientId",
        "ClientVersion",
    ] {
        if field(name).is_empty() {
            state.error(format!(
                "data channel {session_id}: OpenDataChannel has no {name}"
            ));
        }
    }
    let number = state
        .counters
        .channels_opened
        .fetch_add(1, Ordering::SeqCst);
    let seed = lock(&state.faults).seed;
    let mut agent = Agent {
        state: state.clone(),
        session_id,
        target,
        host,
        port,
        local_port,
        rng: Rng(seed ^ number.wrapping_mul(0x1000_0000_01b3)),
        out_seq: 0,
        unacked: BTreeMap::new(),
        held: None,
        expected: 0,
        ahead: BTreeMap::new(),
        handshake_sent: None,
        handshake_done: false,
        mux: false,
        keepalive: false,
        last_nop: Instant::now(),
        smux: wire::SmuxParser::default(),
        streams: HashMap::new(),
        closed: HashSet::new(),
        basic: None,
        pending: Vec::new(),
        paused: false,
        last_traffic: Instant::now(),
    };
    agent.run(ws).await;
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>, why: &str) {
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: why.to_owned().into(),
        })))
        .await;
}

struct Agent {
    state: Arc<State>,
    session_id: String,
    target: String,
    host: String,
    port: String,
    local_port: Option<String>,
    rng: Rng,
    out_seq: i64,
    /// Sent (or due) stream messages: sequence → (bytes, message id, last sent).
    unacked: BTreeMap<i64, (Vec<u8>, String, Option<Instant>)>,
    /// A message held back to be sent after the next one.
    held: Option<Vec<u8>>,
    expected: i64,
    ahead: BTreeMap<i64, wire::Frame>,
    handshake_sent: Option<Instant>,
    handshake_done: bool,
    mux: bool,
    keepalive: bool,
    last_nop: Instant,
    smux: wire::SmuxParser,
    /// smux stream id → the writer of its target connection (None once the
    /// fake has sent FIN but the client has not).
    streams: HashMap<u32, mpsc::UnboundedSender<Vec<u8>>>,
    /// Streams the fake has closed: late data and FIN for them are dropped,
    /// as smux drops frames for a stream it has closed.
    closed: HashSet<u32>,
    basic: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Bytes for the client not yet cut into messages.
    pending: Vec<u8>,
    paused: bool,
    last_traffic: Instant,
}

/// Why the agent loop ends.
enum End {
    Close(CloseKind),
    Gone,
}

impl Agent {
    /// Where the instance's `host:port` leads (see [`FakeSsm::route`]).
    fn route(&self) -> String {
        let wanted = format!("{}:{}", self.host, self.port);
        lock(&self.state.routes)
            .get(&wanted)
            .cloned()
            .unwrap_or(wanted)
    }

    fn faults(&self) -> Faults {
        lock(&self.state.faults).clone()
    }

    fn counters(&self) -> &Atomics {
        &self.state.counters
    }

    fn error(&self, what: String) {
        self.state
            .error(format!("data channel {}: {what}", self.session_id));
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, mut ws: Ws<S>) {
        let (events_tx, mut events) = mpsc::unbounded_channel::<ConnEvent>();
        let mut commands = self.state.commands.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        if !self.faults().no_handshake {
            let request = json!({
                "AgentVersion": self.faults().agent_version,
                "RequestedClientActions": [{
                    "ActionType": "SessionType",
                    "ActionParameters": {
                        "SessionType": "Port",
                        "Properties": self.properties(),
                    },
                }],
            });
            self.handshake_sent = Some(Instant::now());
            if self
                .send_stream(
                    &mut ws,
                    wire::PAYLOAD_HANDSHAKE_REQUEST,
                    request.to_string().as_bytes(),
                )
                .await
                .is_err()
            {
                return;
            }
        }
        let end = loop {
            let step = tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Binary(b))) => self.incoming(&mut ws, &b, &events_tx).await,
                    Some(Ok(Message::Text(t))) => {
                        self.error(format!("a text frame after OpenDataChannel: {:.80}", t.as_str()));
                        Ok(None)
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Ok(Some(End::Gone)),
                    Some(Ok(_)) => Ok(None),
                },
                e = events.recv() => match e {
                    Some(e) => self.conn_event(&mut ws, e).await,
                    None => Ok(None),
                },
                c = commands.recv() => match c {
                    Ok((who, c)) if who.as_deref().is_none_or(|w| w == self.session_id) => {
                        self.command(&mut ws, c).await
                    }
                    _ => Ok(None),
                },
                _ = tick.tick() => self.on_tick(&mut ws).await,
            };
            match step {
                Ok(None) => {}
                Ok(Some(end)) => break end,
                Err(()) => break End::Gone,
            }
        };
        match end {
            End::Gone | End::Close(CloseKind::TcpDrop) => {}
            End::Close(CloseKind::WebSocketClose) => {
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    })))
                    .await;
            }
            End::Close(CloseKind::ChannelClosed(output)) => {
                let _ = self.channel_closed(&mut ws, &output).await;
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    })))
                    .await;
            }
        }
        // Dropping the streams' writers closes their target connections.
        self.streams.clear();
        self.basic = None;
    }

    async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        command: Command,
    ) -> Result<Option<End>, ()> {
        match command {
            Command::Pause => {
                self.paused = true;
                self.control(ws, wire::PAUSE_PUBLICATION)
                    .await
                    .map(|_| None)
            }
            Command::Start => {
                self.paused = false;
                self.control(ws, wire::START_PUBLICATION)
                    .await
                    .map(|_| None)
            }
            Command::Close(how) => Ok(Some(End::Close(how))),
        }
    }

    /// The session's properties, as the document renders them.
    fn properties(&self) -> Value {
        let mut p = json!({
            "portNumber": self.port,
            "type": "LocalPortForwarding",
            "host": self.host,
        });
        if let Some(l) = &self.local_port {
            p["localPortNumber"] = json!(l);
        }
        p
    }

    async fn raw<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        bytes: Vec<u8>,
    ) -> Result<(), ()> {
        ws.send(Message::Binary(bytes.into())).await.map_err(|_| ())
    }

    /// A message outside the stream (sequence 0, flags 3).
    async fn control<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        kind: &str,
    ) -> Result<(), ()> {
        let (bytes, _) = wire::encode(kind, 0, 3, 0, &[], now_ms());
        self.raw(ws, bytes).await
    }

    async fn channel_closed<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        output: &str,
    ) -> Result<(), ()> {
        let payload = json!({
            "MessageId": wire::encode("x", 0, 0, 0, &[], 0).1,
            "CreatedDate": now_ms().to_string(),
            "DestinationId": self.target,
            "SessionId": self.session_id,
            "MessageType": wire::CHANNEL_CLOSED,
            "SchemaVersion": 1,
            "Output": output,
        });
        let (bytes, _) = wire::encode(
            wire::CHANNEL_CLOSED,
            0,
            3,
            0,
            payload.to_string().as_bytes(),
            now_ms(),
        );
        self.raw(ws, bytes).await
    }

    /// Sends one stream message (with the fault knobs applied) and keeps it
    /// for resending until acknowledged.
    async fn send_stream<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        payload_type: u32,
        payload: &[u8],
    ) -> Result<(), ()> {
        let seq = self.out_seq;
        self.out_seq += 1;
        let flags = u64::from(seq == 0);
        let (bytes, id) = wire::encode(wire::OUTPUT, seq, flags, payload_type, payload, now_ms());
        bump(&self.counters().messages_sent);
        let faults = self.faults();
        if self.rng.chance(faults.drop) {
            bump(&self.counters().messages_dropped);
            self.unacked.insert(seq, (bytes, id, Some(Instant::now())));
            return Ok(());
        }
        self.unacked
            .insert(seq, (bytes.clone(), id, Some(Instant::now())));
        if self.held.is_none() && self.rng.chance(faults.reorder) {
            bump(&self.counters().messages_reordered);
            self.held = Some(bytes);
            return Ok(());
        }
        self.raw(ws, bytes.clone()).await?;
        if let Some(held) = self.held.take() {
            self.raw(ws, held).await?;
        }
        if self.rng.chance(faults.duplicate) {
            bump(&self.counters().messages_duplicated);
            self.raw(ws, bytes).await?;
        }
        Ok(())
    }

    /// Cuts `pending` into messages of at most 1024 bytes.
    async fn flush<S: AsyncRead + AsyncWrite + Unpin>(&mut self, ws: &mut Ws<S>) -> Result<(), ()> {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(1024);
            let chunk: Vec<u8> = self.pending.drain(..n).collect();
            self.send_stream(ws, wire::PAYLOAD_OUTPUT, &chunk).await?;
        }
        Ok(())
    }

    async fn on_tick<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
    ) -> Result<Option<End>, ()> {
        let faults = self.faults();
        let now = Instant::now();
        let due: Vec<i64> = self
            .unacked
            .iter()
            .filter(|(_, (_, _, last))| {
                last.is_none_or(|t| now.duration_since(t) >= faults.resend_after)
            })
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            if let Some((bytes, _, last)) = self.unacked.get_mut(&seq) {
                *last = Some(now);
                let bytes = bytes.clone();
                bump(&self.counters().messages_resent);
                self.raw(ws, bytes).await?;
            }
        }
        if let Some(sent) = self.handshake_sent {
            if !self.handshake_done && now.duration_since(sent) > faults.handshake_timeout {
                self.error("no handshake response in time".into());
                return Ok(Some(End::Close(CloseKind::ChannelClosed(
                    "Handshake timed out. Please ensure that you have the latest version of the session manager plugin.".into(),
                ))));
            }
        }
        if let Some(idle) = faults.idle_close {
            if now.duration_since(self.last_traffic) > idle {
                bump(&self.counters().idle_closes);
                return Ok(Some(End::Close(CloseKind::ChannelClosed(
                    "Session closed: no traffic (idle timeout).".into(),
                ))));
            }
        }
        if self.mux && self.keepalive && now.duration_since(self.last_nop) >= faults.nop_interval {
            self.last_nop = now;
            self.pending
                .extend(wire::smux_frame(wire::SMUX_NOP, 0, &[]));
            self.flush(ws).await?;
        }
        Ok(None)
    }

    async fn incoming<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        bytes: &[u8],
        events: &mpsc::UnboundedSender<ConnEvent>,
    ) -> Result<Option<End>, ()> {
        let frame = match wire::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.error(format!("a bad message: {e}"));
                return Ok(None);
            }
        };
        match frame.message_type.as_str() {
            wire::ACK => {
                self.on_ack(&frame);
                Ok(None)
            }
            wire::INPUT => {
                self.last_traffic = Instant::now();
                if self.paused {
                    bump(&self.counters().messages_while_paused);
                }
                if frame.schema_version != 1 || frame.created_ms == 0 {
                    self.error(format!(
                        "input message {} has SchemaVersion {} and CreatedDate {}",
                        frame.sequence, frame.schema_version, frame.created_ms
                    ));
                }
                if frame.sequence < self.expected {
                    bump(&self.counters().duplicates_from_client);
                    self.send_ack(ws, &frame).await?;
                    return Ok(None);
                }
                if frame.sequence > self.expected {
                    bump(&self.counters().out_of_order_from_client);
                    self.send_ack(ws, &frame).await?;
                    self.ahead.insert(frame.sequence, frame);
                    return Ok(None);
                }
                self.send_ack(ws, &frame).await?;
                self.expected += 1;
                if let Some(end) = self.process(ws, frame, events).await? {
                    return Ok(Some(end));
                }
                while let Some(next) = self.ahead.remove(&self.expected) {
                    self.expected += 1;
                    if let Some(end) = self.process(ws, next, events).await? {
                        return Ok(Some(end));
                    }
                }
                self.flush(ws).await?;
                Ok(None)
            }
            other => {
                self.error(format!("unexpected message type {other:?} from the client"));
                Ok(None)
            }
        }
    }

    async fn send_ack<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        frame: &wire::Frame,
    ) -> Result<(), ()> {
        bump(&self.counters().acks_sent);
        self.raw(ws, wire::ack(frame, now_ms())).await
    }

    fn on_ack(&mut self, frame: &wire::Frame) {
        bump(&self.counters().acks_received);
        let ack: Value = serde_json::from_slice(&frame.payload).unwrap_or(Value::Null);
        let seq = ack
            .get("AcknowledgedMessageSequenceNumber")
            .and_then(Value::as_i64);
        let id = ack
            .get("AcknowledgedMessageId")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = ack
            .get("AcknowledgedMessageType")
            .and_then(Value::as_str)
            .unwrap_or("");
        if frame.sequence != 0 || frame.flags != 3 {
            self.error(format!(
                "an acknowledgement with sequence {} and flags {} (want 0 and 3)",
                frame.sequence, frame.flags
            ));
        }
        if kind != wire::OUTPUT || ack.get("IsSequentialMessage") != Some(&Value::Bool(true)) {
            self.error(format!(
                "an acknowledgement that is not of a sequential {}: {ack}",
                wire::OUTPUT
            ));
        }
        let Some(seq) = seq else {
            self.error(format!(
                "an acknowledgement without a sequence number: {ack}"
            ));
            return;
        };
        if let Some((_, sent_id, _)) = self.unacked.get(&seq) {
            if sent_id != id {
                self.error(format!(
                    "acknowledgement of {seq} names message {id}, not {sent_id}"
                ));
                return;
            }
            self.unacked.remove(&seq);
        } else if seq >= self.out_seq {
            self.error(format!("acknowledgement of {seq}, never sent"));
        }
    }

    /// One in-order client message.
    async fn process<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        frame: wire::Frame,
        events: &mpsc::UnboundedSender<ConnEvent>,
    ) -> Result<Option<End>, ()> {
        match frame.payload_type {
            wire::PAYLOAD_HANDSHAKE_RESPONSE => {
                let response: Value = serde_json::from_slice(&frame.payload).unwrap_or(Value::Null);
                let version = response
                    .get("ClientVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                lock(&self.state.client_versions).push(version.clone());
                if self.handshake_done || self.handshake_sent.is_none() {
                    self.error("a handshake response nobody asked for".into());
                    return Ok(None);
                }
                let actions = response
                    .get("ProcessedClientActions")
                    .and_then(Value::as_array);
                let session_type_ok = actions.is_some_and(|a| {
                    a.iter().any(|x| {
                        x.get("ActionType").and_then(Value::as_str) == Some("SessionType")
                            && x.get("ActionStatus").and_then(Value::as_i64) == Some(1)
                    })
                });
                if !session_type_ok {
                    self.error(format!(
                        "the handshake response does not report SessionType done (status 1): \
                         {response}"
                    ));
                }
                // The agent fails the session when the client reports a failed action.
                let failed = actions
                    .into_iter()
                    .flatten()
                    .find(|x| x.get("ActionStatus").and_then(Value::as_i64) != Some(1));
                if let Some(failed) = failed {
                    return Ok(Some(End::Close(CloseKind::ChannelClosed(format!(
                        "Encountered error while initiating handshake. {} failed on client: {}",
                        failed["ActionType"], failed["Error"]
                    )))));
                }
                let agent = self.faults().agent_version;
                self.mux = version_cmp(&version, "1.1.70").is_ge()
                    && version_cmp(&agent, "3.0.196.0").is_gt();
                self.keepalive = version_cmp(&version, "1.2.331.0").is_le();
                self.last_nop = Instant::now();
                let took = self
                    .handshake_sent
                    .map_or(0, |t| t.elapsed().as_nanos() as u64);
                let complete = json!({ "HandshakeTimeToComplete": took, "CustomerMessage": "" });
                self.send_stream(
                    ws,
                    wire::PAYLOAD_HANDSHAKE_COMPLETE,
                    complete.to_string().as_bytes(),
                )
                .await?;
                self.handshake_done = true;
                bump(&self.counters().handshakes_completed);
                if !self.mux {
                    // The basic session dials the target when the plugin starts.
                    match self.dial_basic(Vec::new(), events).await {
                        Ok(()) => {}
                        Err(why) => {
                            return Ok(Some(End::Close(CloseKind::ChannelClosed(format!(
                                "Unable to connect to specified port: {why}"
                            )))))
                        }
                    }
                }
                Ok(None)
            }
            wire::PAYLOAD_OUTPUT => {
                if !self.handshake_done {
                    bump(&self.counters().data_before_handshake);
                    return Ok(None);
                }
                if self.mux {
                    self.smux.push(&frame.payload);
                    while let Some((ver, cmd, sid, data)) = self.smux.next_frame() {
                        self.smux_in(ver, cmd, sid, data, events);
                    }
                } else {
                    match &self.basic {
                        Some(w) if !w.is_closed() => {
                            let _ = w.send(frame.payload);
                        }
                        _ => {
                            if let Err(why) = self.dial_basic(frame.payload, events).await {
                                self.error(format!("cannot reconnect to the target: {why}"));
                            }
                        }
                    }
                }
                Ok(None)
            }
            wire::PAYLOAD_FLAG => {
                let flag = frame
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                match flag {
                    Some(wire::FLAG_DISCONNECT_TO_PORT) => {
                        self.basic = None;
                        Ok(None)
                    }
                    Some(wire::FLAG_TERMINATE_SESSION) => {
                        bump(&self.counters().terminate_flags);
                        if let Some(s) = lock(&self.state.sessions).get_mut(&self.session_id) {
                            s.terminated = true;
                        }
                        Ok(Some(End::Close(CloseKind::ChannelClosed(String::new()))))
                    }
                    other => {
                        self.error(format!("an unknown flag {other:?}"));
                        Ok(None)
                    }
                }
            }
            other => {
                self.error(format!("input with payload type {other}"));
                Ok(None)
            }
        }
    }

    /// Opens the basic session's one connection (`first` written first).
    async fn dial_basic(
        &mut self,
        first: Vec<u8>,
        events: &mpsc::UnboundedSender<ConnEvent>,
    ) -> Result<(), String> {
        let addr = self.route();
        let tcp =
            match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    bump(&self.counters().connect_failures);
                    return Err(format!("dial tcp {addr}: {e}"));
                }
                Err(_) => {
                    bump(&self.counters().connect_failures);
                    return Err(format!("dial tcp {addr}: timed out"));
                }
            };
        bump(&self.counters().target_connections);
        let (tx, rx) = mpsc::unbounded_channel();
        if !first.is_empty() {
            let _ = tx.send(first);
        }
        self.basic = Some(tx);
        tokio::spawn(relay(0, Ok(tcp), rx, events.clone()));
        Ok(())
    }

    fn smux_in(
        &mut self,
        ver: u8,
        cmd: u8,
        sid: u32,
        data: Vec<u8>,
        events: &mpsc::UnboundedSender<ConnEvent>,
    ) {
        if ver != 1 {
            self.error(format!("smux version {ver} (want 1)"));
        }
        match cmd {
            wire::SMUX_SYN => {
                if self.streams.contains_key(&sid) {
                    self.error(format!("SYN for open stream {sid}"));
                    return;
                }
                bump(&self.counters().streams_opened);
                let (tx, rx) = mpsc::unbounded_channel();
                self.streams.insert(sid, tx);
                let addr = self.route();
                let events = events.clone();
                tokio::spawn(async move {
                    let tcp = match tokio::time::timeout(
                        Duration::from_secs(5),
                        TcpStream::connect(&addr),
                    )
                    .await
                    {
                        Ok(Ok(t)) => Ok(t),
                        Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
                        Err(_) => Err(format!("dial tcp {addr}: timed out")),
                    };
                    relay(sid, tcp, rx, events).await;
                });
            }
            wire::SMUX_PSH => match self.streams.get(&sid) {
                Some(w) => {
                    let _ = w.send(data);
                }
                None if self.closed.contains(&sid) => {}
                None => self.error(format!("PSH for stream {sid}, which was never opened")),
            },
            wire::SMUX_FIN => {
                if self.streams.remove(&sid).is_some() {
                    bump(&self.counters().streams_closed);
                    // The agent closes the connection and its stream, which sends FIN back.
                    self.pending
                        .extend(wire::smux_frame(wire::SMUX_FIN, sid, &[]));
                } else if !self.closed.remove(&sid) {
                    self.error(format!("FIN for stream {sid}, which was never opened"));
                }
            }
            wire::SMUX_NOP => bump(&self.counters().nops_received),
            other => self.error(format!("smux command {other} on stream {sid}")),
        }
    }

    async fn conn_event<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut Ws<S>,
        event: ConnEvent,
    ) -> Result<Option<End>, ()> {
        match event {
            ConnEvent::Connected(_) => bump(&self.counters().target_connections),
            ConnEvent::Failed(sid, why) => {
                bump(&self.counters().connect_failures);
                self.error(format!("stream {sid}: {why}"));
                if self.streams.remove(&sid).is_some() {
                    self.closed.insert(sid);
                    self.flush(ws).await?;
                    self.send_stream(
                        ws,
                        wire::PAYLOAD_FLAG,
                        &wire::FLAG_CONNECT_TO_PORT_ERROR.to_be_bytes(),
                    )
                    .await?;
                    self.pending
                        .extend(wire::smux_frame(wire::SMUX_FIN, sid, &[]));
                }
            }
            ConnEvent::Data(sid, data) => {
                if !self.mux {
                    self.pending.extend(data);
                } else if self.streams.contains_key(&sid) {
                    for piece in data.chunks(32 * 1024) {
                        self.pending
                            .extend(wire::smux_frame(wire::SMUX_PSH, sid, piece));
                    }
                }
            }
            ConnEvent::Eof(_) if !self.mux => {
                // The agent drops the connection and dials again on the next data.
                self.basic = None;
            }
            ConnEvent::Eof(sid) => {
                if self.streams.remove(&sid).is_some() {
                    self.closed.insert(sid);
                    bump(&self.counters().streams_closed);
                    self.pending
                        .extend(wire::smux_frame(wire::SMUX_FIN, sid, &[]));
                }
            }
        }
        self.flush(ws).await?;
        Ok(None)
    }
}

/// One target connection: writes what arrives on `rx` (closing when it
/// closes), reports what the target sends.
async fn relay(
    id: u32,
    tcp: Result<TcpStream, String>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    events: mpsc::UnboundedSender<ConnEvent>,
) {
    let tcp = match tcp {
        Ok(t) => t,
        Err(why) => {
            let _ = events.send(ConnEvent::Failed(id, why));
            return;
        }
    };
    if id != 0 {
        let _ = events.send(ConnEvent::Connected(id));
    }
    let _ = tcp.set_nodelay(true);
    let (mut r, mut w) = tcp.into_split();
    let mut buf = vec![0u8; 4096];
    let mut reading = true;
    loop {
        tokio::select! {
            n = r.read(&mut buf), if reading => match n {
                Ok(0) | Err(_) => {
                    reading = false;
                    let _ = events.send(ConnEvent::Eof(id));
                }
                Ok(n) => {
                    let _ = events.send(ConnEvent::Data(id, buf[..n].to_vec()));
                }
            },
            d = rx.recv() => match d {
                Some(d) => {
                    if w.write_all(&d).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
}
