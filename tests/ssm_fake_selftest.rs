//! Checks the fake SSM service (tests/support/fake_ssm.rs) from the outside:
//! a minimal hand-written client (raw HTTP over tokio-rustls, signed with the
//! harness's SigV4; tungstenite's WebSocket client) starts sessions, runs the
//! data channel handshake and forwards bytes to a local echo server, with and
//! without the fault knobs. The last tests drive keyhole's own
//! `transport::ssm::api` against the fake.

// Tests the AWS SDK's credentials against the fake: only in builds with the "aws" feature.
#![cfg(feature = "aws")]

mod support;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use support::cloud::AwsCredentials;
use support::fake_ssm::{wire, ApiFailure, CloseKind, FakeSsm, Faults};
use support::sigv4;

const WAIT: Duration = Duration::from_secs(10);
const NEW_CLIENT: &str = "1.2.677.0";

fn tls_config(fake: &FakeSsm) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fake.ca_file()).expect("read the fake's CA") {
        roots
            .add(cert.expect("a CA certificate"))
            .expect("add the CA");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(keyhole::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn tls_connect(fake: &FakeSsm, port: u16) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the fake");
    TlsConnector::from(tls_config(fake))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("TLS with the fake, verified by its CA")
}

/// One signed JSON 1.1 call; `(status, body)`.
async fn call(
    fake: &FakeSsm,
    creds: &AwsCredentials,
    operation: &str,
    body: &Value,
) -> (u16, Value) {
    let body = body.to_string().into_bytes();
    let now = SystemTime::now();
    let mut headers = vec![
        (
            "content-type".to_owned(),
            "application/x-amz-json-1.1".to_owned(),
        ),
        ("host".to_owned(), format!("127.0.0.1:{}", fake.api_port())),
        ("x-amz-date".to_owned(), sigv4::amz_date(now)),
        ("x-amz-target".to_owned(), format!("AmazonSSM.{operation}")),
    ];
    let mut signed = vec!["content-type", "host", "x-amz-date", "x-amz-target"];
    if !creds.session_token.is_empty() {
        headers.push((
            "x-amz-security-token".to_owned(),
            creds.session_token.clone(),
        ));
        signed.insert(3, "x-amz-security-token");
    }
    let auth = sigv4::authorization_header(
        &sigv4::SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body: &body,
        },
        &signed,
        &creds.access_key_id,
        &creds.secret_access_key,
        (fake.region(), "ssm"),
        now,
    )
    .expect("sign");
    let mut request = String::from("POST / HTTP/1.1\r\n");
    for (n, v) in &headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str(&format!(
        "authorization: {auth}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut tls = tls_connect(fake, fake.api_port()).await;
    tls.write_all(request.as_bytes()).await.expect("send");
    tls.write_all(&body).await.expect("send the body");
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply).await;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let (_, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    (status, serde_json::from_str(body).expect("a JSON body"))
}

async fn start_session(fake: &FakeSsm, creds: &AwsCredentials, port: u16) -> Value {
    let (status, body) = call(
        fake,
        creds,
        "StartSession",
        &json!({
            "Target": "i-0123456789abcdef0",
            "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
            "Parameters": {"host": ["127.0.0.1"], "portNumber": [port.to_string()]},
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The client end of a data channel: acknowledges and orders what comes.
struct Channel {
    ws: WebSocketStream<TlsStream<TcpStream>>,
    out_seq: i64,
    expected: i64,
    ahead: BTreeMap<i64, wire::Frame>,
    ready: VecDeque<wire::Frame>,
    duplicates: u64,
}

impl Channel {
    async fn open(fake: &FakeSsm, session: &Value, token: &str) -> Channel {
        let url = session["StreamUrl"].as_str().expect("StreamUrl");
        let tls = tls_connect(fake, fake.ws_port()).await;
        let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("WebSocket handshake");
        let open = json!({
            "MessageSchemaVersion": "1.0",
            "RequestId": "7f3e1f0e-9a5e-4c1e-8f4e-2a6b8f1d0c11",
            "TokenValue": token,
            "ClientId": "0b6c1f5e-3d2a-4e8f-9c7b-5a4d3e2f1a0b",
            "ClientVersion": NEW_CLIENT,
        });
        ws.send(Message::text(open.to_string()))
            .await
            .expect("OpenDataChannel");
        Channel {
            ws,
            out_seq: 0,
            expected: 0,
            ahead: BTreeMap::new(),
            ready: VecDeque::new(),
            duplicates: 0,
        }
    }

    async fn send(&mut self, payload_type: u32, payload: &[u8]) {
        let (bytes, _) = wire::encode(wire::INPUT, self.out_seq, 0, payload_type, payload, 1);
        self.out_seq += 1;
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send");
    }

    async fn ack(&mut self, frame: &wire::Frame) {
        self.ws
            .send(Message::Binary(wire::ack(frame, 1).into()))
            .await
            .expect("ack");
    }

    /// The next in-order stream message or control message; None when the
    /// channel closes or nothing comes within `limit`.
    async fn recv(&mut self, limit: Duration) -> Option<wire::Frame> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Some(f);
            }
            let m = tokio::time::timeout(limit, self.ws.next()).await.ok()??;
            let bytes = match m {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            };
            let frame = wire::decode(&bytes).expect("a valid agent message");
            match frame.message_type.as_str() {
                wire::OUTPUT => {
                    if frame.sequence < self.expected || self.ahead.contains_key(&frame.sequence) {
                        self.duplicates += 1;
                        continue;
                    }
                    self.ack(&frame).await;
                    if frame.sequence > self.expected {
                        self.ahead.insert(frame.sequence, frame);
                        continue;
                    }
                    self.expected += 1;
                    self.ready.push_back(frame);
                    while let Some(next) = self.ahead.remove(&self.expected) {
                        self.expected += 1;
                        self.ready.push_back(next);
                    }
                }
                wire::ACK => continue,
                _ => return Some(frame),
            }
        }
    }

    async fn handshake(&mut self, version: &str) -> Value {
        let request = self.recv(WAIT).await.expect("a handshake request");
        assert_eq!(request.payload_type, wire::PAYLOAD_HANDSHAKE_REQUEST);
        assert_eq!(request.sequence, 0);
        assert_eq!(request.flags, 1, "the first stream message has SYN set");
        let request: Value = serde_json::from_slice(&request.payload).expect("JSON");
        let response = json!({
            "ClientVersion": version,
            "ProcessedClientActions": [{"ActionType": "SessionType", "ActionStatus": 1, "ActionResult": null, "Error": ""}],
            "Errors": [],
        });
        self.send(
            wire::PAYLOAD_HANDSHAKE_RESPONSE,
            response.to_string().as_bytes(),
        )
        .await;
        let complete = self.recv(WAIT).await.expect("handshake complete");
        assert_eq!(complete.payload_type, wire::PAYLOAD_HANDSHAKE_COMPLETE);
        let complete: Value = serde_json::from_slice(&complete.payload).expect("JSON");
        assert!(complete["HandshakeTimeToComplete"].is_u64(), "{complete}");
        request
    }

    /// Reads smux frames until `want` bytes arrived on `sid` (or FIN).
    async fn smux_read(
        &mut self,
        parser: &mut wire::SmuxParser,
        sid: u32,
        want: usize,
    ) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        loop {
            while let Some((ver, cmd, id, data)) = parser.next_frame() {
                assert_eq!(ver, 1);
                if id != sid {
                    continue;
                }
                match cmd {
                    wire::SMUX_PSH => got.extend(data),
                    wire::SMUX_FIN => return (got, true),
                    _ => {}
                }
            }
            if got.len() >= want {
                return (got, false);
            }
            let f = self.recv(WAIT).await.expect("more stream data");
            assert_eq!(f.message_type, wire::OUTPUT, "{f:?}");
            assert!(f.payload.len() <= 1024, "payloads are cut at 1024 bytes");
            if f.payload_type == wire::PAYLOAD_FLAG {
                return (f.payload, true);
            }
            assert_eq!(f.payload_type, wire::PAYLOAD_OUTPUT);
            parser.push(&f.payload);
        }
    }
}

fn echo_server(rt: &tokio::runtime::Runtime) -> u16 {
    support::serve_each(rt, |mut s| async move {
        let mut buf = vec![0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

async fn mux_echo(ch: &mut Channel, sid: u32, data: &[u8]) {
    ch.send(
        wire::PAYLOAD_OUTPUT,
        &wire::smux_frame(wire::SMUX_SYN, sid, &[]),
    )
    .await;
    // Frames cut across message boundaries, as the plugin's 1024-byte reads do.
    let mut bytes = Vec::new();
    for piece in data.chunks(3000) {
        bytes.extend(wire::smux_frame(wire::SMUX_PSH, sid, piece));
    }
    for chunk in bytes.chunks(1000) {
        ch.send(wire::PAYLOAD_OUTPUT, chunk).await;
    }
    let mut parser = wire::SmuxParser::default();
    let (got, fin) = ch.smux_read(&mut parser, sid, data.len()).await;
    assert!(!fin, "the stream ended early");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the echo differs");
    ch.send(
        wire::PAYLOAD_OUTPUT,
        &wire::smux_frame(wire::SMUX_FIN, sid, &[]),
    )
    .await;
    let (rest, fin) = ch.smux_read(&mut parser, sid, usize::MAX).await;
    assert!(fin && rest.is_empty(), "FIN comes back");
}

/// What most tests start from: a runtime, an echo server on it, credentials
/// and a fake SSM accepting them. Fields drop in declaration order, so the
/// fake goes first and the runtime last.
struct Lab {
    fake: FakeSsm,
    creds: AwsCredentials,
    echo: u16,
    rt: tokio::runtime::Runtime,
}

impl Lab {
    fn start() -> Lab {
        let rt = support::runtime();
        let echo = echo_server(&rt);
        let creds = AwsCredentials::generate();
        let fake = FakeSsm::start(creds.clone());
        Lab {
            fake,
            creds,
            echo,
            rt,
        }
    }

    /// One signed call with the lab's credentials.
    async fn call(&self, operation: &str, body: &Value) -> (u16, Value) {
        call(&self.fake, &self.creds, operation, body).await
    }

    /// A session to the echo server.
    async fn session(&self) -> Value {
        start_session(&self.fake, &self.creds, self.echo).await
    }

    /// Opens `session`'s data channel with its token.
    async fn open(&self, session: &Value) -> Channel {
        let token = session["TokenValue"].as_str().expect("TokenValue");
        Channel::open(&self.fake, session, token).await
    }

    /// A session to `port` and its open data channel.
    async fn channel_to(&self, port: u16) -> (Value, Channel) {
        let session = start_session(&self.fake, &self.creds, port).await;
        let ch = self.open(&session).await;
        (session, ch)
    }

    /// A session to the echo server and its open data channel.
    async fn channel(&self) -> (Value, Channel) {
        self.channel_to(self.echo).await
    }
}

#[test]
fn smux_session_round_trip_and_terminate() {
    let lab = Lab::start();
    lab.rt.block_on(async {
        let session = lab.session().await;
        let id = session["SessionId"].as_str().expect("SessionId").to_owned();
        assert!(id.starts_with("keyhole-test-"), "{id}");
        let url = session["StreamUrl"].as_str().expect("StreamUrl");
        assert!(
            url.starts_with(&format!(
                "wss://127.0.0.1:{}/v1/data-channel/{id}?role=publish_subscribe&cell-number=",
                lab.fake.ws_port()
            )),
            "{url}"
        );
        let mut ch = lab.open(&session).await;
        let request = ch.handshake(NEW_CLIENT).await;
        assert_eq!(
            request["AgentVersion"],
            support::fake_ssm::DEFAULT_AGENT_VERSION
        );
        let action = &request["RequestedClientActions"][0];
        assert_eq!(action["ActionType"], "SessionType");
        assert_eq!(action["ActionParameters"]["SessionType"], "Port");
        assert_eq!(
            action["ActionParameters"]["Properties"]["type"],
            "LocalPortForwarding"
        );
        mux_echo(&mut ch, 1, b"hello").await;
        mux_echo(&mut ch, 3, &pattern(20_000)).await;
        let (status, body) = lab
            .call("TerminateSession", &json!({"SessionId": id}))
            .await;
        assert_eq!(
            (status, body["SessionId"].as_str()),
            (200, Some(id.as_str()))
        );
        let closed = ch.recv(WAIT).await.expect("channel_closed");
        assert_eq!(closed.message_type, wire::CHANNEL_CLOSED);
        let closed: Value = serde_json::from_slice(&closed.payload).expect("JSON");
        assert_eq!(closed["SessionId"], id.as_str());
    });
    let c = lab.fake.counters();
    assert_eq!((c.sessions_started, c.sessions_terminated), (1, 1));
    assert_eq!((c.channels_opened, c.handshakes_completed), (1, 1));
    assert_eq!((c.streams_opened, c.target_connections), (2, 2));
    assert_eq!(lab.fake.last_client_version().as_deref(), Some(NEW_CLIENT));
    let opens = lab.fake.open_data_channels();
    assert!(opens.len() == 1 && opens[0].token_ok && opens[0].message_schema_version == "1.0");
    let starts = lab.fake.start_requests();
    assert_eq!(starts[0].target, "i-0123456789abcdef0");
    assert_eq!(starts[0].parameters["portNumber"][0], lab.echo.to_string());
    assert!(lab.fake.errors().is_empty(), "{:?}", lab.fake.errors());
}

#[test]
fn faults_are_covered_by_resend_and_ordering() {
    let lab = Lab::start();
    lab.fake.set_faults(Faults {
        seed: 7,
        drop: 0.3,
        duplicate: 0.2,
        reorder: 0.2,
        resend_after: Duration::from_millis(60),
        ..Faults::default()
    });
    let duplicates = lab.rt.block_on(async {
        let (_, mut ch) = lab.channel().await;
        ch.handshake(NEW_CLIENT).await;
        mux_echo(&mut ch, 1, &pattern(60_000)).await;
        ch.duplicates
    });
    let c = lab.fake.counters();
    assert!(c.messages_dropped > 0 && c.messages_resent > 0, "{c:?}");
    assert!(
        c.messages_duplicated > 0 && c.messages_reordered > 0,
        "{c:?}"
    );
    assert!(duplicates > 0, "the client saw duplicates");
    assert!(lab.fake.errors().is_empty(), "{:?}", lab.fake.errors());
}

#[test]
fn old_clients_get_one_plain_connection() {
    let lab = Lab::start();
    lab.rt.block_on(async {
        let (_, mut ch) = lab.channel().await;
        ch.handshake("1.0.37.0").await;
        let data = pattern(5000);
        for chunk in data.chunks(1024) {
            ch.send(wire::PAYLOAD_OUTPUT, chunk).await;
        }
        let mut got = Vec::new();
        while got.len() < data.len() {
            let f = ch.recv(WAIT).await.expect("echoed bytes");
            assert_eq!(f.payload_type, wire::PAYLOAD_OUTPUT);
            got.extend(f.payload);
        }
        assert!(got == data);
        // The TerminateSession flag ends the session.
        ch.send(
            wire::PAYLOAD_FLAG,
            &wire::FLAG_TERMINATE_SESSION.to_be_bytes(),
        )
        .await;
        let f = ch.recv(WAIT).await.expect("channel_closed");
        assert_eq!(f.message_type, wire::CHANNEL_CLOSED);
    });
    let c = lab.fake.counters();
    assert_eq!(
        (c.streams_opened, c.target_connections, c.terminate_flags),
        (0, 1, 1)
    );
    assert!(lab.fake.errors().is_empty(), "{:?}", lab.fake.errors());
}

#[test]
fn an_old_agent_does_not_multiplex() {
    let lab = Lab::start();
    lab.fake.set_faults(Faults {
        agent_version: support::fake_ssm::OLD_AGENT_VERSION.into(),
        ..Faults::default()
    });
    lab.rt.block_on(async {
        let (_, mut ch) = lab.channel().await;
        ch.handshake(NEW_CLIENT).await;
        ch.send(wire::PAYLOAD_OUTPUT, b"plain").await;
        let f = ch.recv(WAIT).await.expect("echo");
        assert_eq!(f.payload, b"plain");
    });
}

#[test]
fn unreachable_target_gets_connect_to_port_error() {
    let lab = Lab::start();
    let closed = support::free_port();
    lab.rt.block_on(async {
        let (_, mut ch) = lab.channel_to(closed).await;
        ch.handshake(NEW_CLIENT).await;
        ch.send(
            wire::PAYLOAD_OUTPUT,
            &wire::smux_frame(wire::SMUX_SYN, 1, &[]),
        )
        .await;
        let f = ch.recv(WAIT).await.expect("a flag");
        assert_eq!(f.payload_type, wire::PAYLOAD_FLAG);
        assert_eq!(f.payload, wire::FLAG_CONNECT_TO_PORT_ERROR.to_be_bytes());
        let f = ch.recv(WAIT).await.expect("FIN");
        assert_eq!(f.payload, wire::smux_frame(wire::SMUX_FIN, 1, &[]));
    });
    assert_eq!(lab.fake.counters().connect_failures, 1);
}

#[test]
fn offline_agent_pause_and_closing() {
    let lab = Lab::start();
    lab.fake.set_faults(Faults {
        no_handshake: true,
        ..Faults::default()
    });
    lab.rt.block_on(async {
        let (session, mut ch) = lab.channel_to(1).await;
        assert!(
            ch.recv(Duration::from_millis(500)).await.is_none(),
            "an offline agent says nothing"
        );
        lab.fake.pause_publication();
        let f = ch.recv(WAIT).await.expect("pause_publication");
        assert_eq!(f.message_type, wire::PAUSE_PUBLICATION);
        lab.fake.start_publication();
        let f = ch.recv(WAIT).await.expect("start_publication");
        assert_eq!(f.message_type, wire::START_PUBLICATION);
        lab.fake
            .close_channels(CloseKind::ChannelClosed("bye".into()));
        let f = ch.recv(WAIT).await.expect("channel_closed");
        let closed: Value = serde_json::from_slice(&f.payload).expect("JSON");
        assert_eq!(closed["Output"], "bye");
        assert!(ch.recv(WAIT).await.is_none(), "then the channel closes");
        // The token was used once.
        let mut again = lab.open(&session).await;
        assert!(again.recv(WAIT).await.is_none(), "a used token is refused");
    });
    assert_eq!(lab.fake.counters().channels_refused, 1);
}

#[test]
fn idle_sessions_are_closed() {
    let lab = Lab::start();
    lab.fake.set_faults(Faults {
        idle_close: Some(Duration::from_secs(1)),
        ..Faults::default()
    });
    lab.rt.block_on(async {
        let (_, mut ch) = lab.channel().await;
        ch.handshake(NEW_CLIENT).await;
        let f = ch.recv(WAIT).await.expect("channel_closed");
        assert_eq!(f.message_type, wire::CHANNEL_CLOSED);
    });
    assert_eq!(lab.fake.counters().idle_closes, 1);
}

#[test]
fn api_errors_and_checks() {
    let lab = Lab::start();
    lab.rt.block_on(async {
        let mut wrong = lab.creds.clone();
        wrong.secret_access_key = "x".repeat(40);
        let (status, body) =
            call(&lab.fake, &wrong, "StartSession", &json!({"Target": "i-1"})).await;
        assert_eq!(status, 400);
        assert!(
            body["__type"]
                .as_str()
                .unwrap_or("")
                .ends_with("#InvalidSignatureException"),
            "{body}"
        );
        let mut other = lab.creds.clone();
        other.access_key_id = "ASIAOTHEROTHEROTHER".into();
        let (_, body) = call(&lab.fake, &other, "StartSession", &json!({"Target": "i-1"})).await;
        assert!(
            body["__type"]
                .as_str()
                .unwrap_or("")
                .ends_with("#UnrecognizedClientException"),
            "{body}"
        );

        let start = json!({
            "Target": "i-1",
            "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
            "Parameters": {"host": ["db"], "portNumber": ["5432"]},
        });
        lab.fake.set_api_failure(Some(ApiFailure::AccessDenied));
        let (status, body) = lab.call("StartSession", &start).await;
        assert_eq!(status, 400);
        assert!(
            body["__type"]
                .as_str()
                .unwrap_or("")
                .ends_with("AccessDeniedException"),
            "{body}"
        );
        assert!(
            body["Message"]
                .as_str()
                .unwrap_or("")
                .contains("ssm:StartSession"),
            "{body}"
        );
        lab.fake
            .set_api_failure(Some(ApiFailure::TargetNotConnected));
        let (_, body) = lab.call("StartSession", &start).await;
        assert_eq!(body["__type"], "TargetNotConnected");
        assert_eq!(body["Message"], "i-1 is not connected.");
        lab.fake.set_api_failure(None);
        lab.fake.set_known_targets(Some(vec!["i-2".into()]));
        let (_, body) = lab.call("StartSession", &start).await;
        assert_eq!(body["__type"], "TargetNotConnected");
        lab.fake.set_known_targets(None);
        let mut bad = start.clone();
        bad["DocumentName"] = json!("No-Such-Document");
        let (_, body) = lab.call("StartSession", &bad).await;
        assert_eq!(body["__type"], "InvalidDocument");
        let mut bad = start.clone();
        bad["Parameters"]["portNumber"] = json!([5432]);
        let (_, body) = lab.call("StartSession", &bad).await;
        assert_eq!(body["__type"], "InvalidParameters");
        let (status, _) = lab.call("StartSession", &start).await;
        assert_eq!(status, 200);
        // Static keys (no session token) work too.
        let static_keys = AwsCredentials {
            session_token: String::new(),
            ..AwsCredentials::generate()
        };
        lab.fake.set_credentials(static_keys.clone());
        let (status, body) = call(&lab.fake, &static_keys, "StartSession", &start).await;
        assert_eq!(status, 200, "{body}");
    });
    let starts = lab.fake.start_requests();
    assert_eq!(starts.len(), 7);
    assert_eq!(
        starts[0].outcome,
        Err("com.amazon.coral.service#AccessDeniedException".into())
    );
}

// --- keyhole's own API client against the fake ------------------------------------------

fn provider(creds: &AwsCredentials) -> aws_credential_types::provider::SharedCredentialsProvider {
    let token = (!creds.session_token.is_empty()).then(|| creds.session_token.clone());
    aws_credential_types::provider::SharedCredentialsProvider::new(
        aws_credential_types::Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            token,
            None,
            "test",
        ),
    )
}

#[test]
fn keyhole_api_client_against_the_fake() {
    use keyhole::transport::ssm::api::{SsmApi, DEFAULT_DOCUMENT};
    keyhole::tls::install_crypto_provider();
    let lab = Lab::start();
    let env: HashMap<String, String> = lab.fake.env().into_iter().collect();
    let api = SsmApi::new(
        "ssm://i-0abc",
        &env,
        lab.fake.region(),
        provider(&lab.creds),
    )
    .expect("an API client trusting AWS_CA_BUNDLE");
    lab.rt.block_on(async {
        let session = api
            .start_session("i-0abc", DEFAULT_DOCUMENT, "db.internal", 5432)
            .await
            .expect("StartSession");
        assert!(session.session_id.starts_with("keyhole-test-"));
        assert!(session.stream_url.starts_with("wss://127.0.0.1:"));
        assert!(!format!("{session:?}").contains(session.token_value()));
        api.terminate_session(&session.session_id)
            .await
            .expect("TerminateSession");
        lab.fake.set_api_failure(Some(ApiFailure::AccessDenied));
        let e = api
            .start_session("i-0abc", DEFAULT_DOCUMENT, "db.internal", 5432)
            .await
            .expect_err("denied");
        assert_eq!(e.label(), "ssm_access_denied", "{e}");
        assert!(e.to_string().contains("ssm://i-0abc"), "{e}");
        lab.fake
            .set_api_failure(Some(ApiFailure::TargetNotConnected));
        let e = api
            .start_session("i-0abc", DEFAULT_DOCUMENT, "db.internal", 5432)
            .await
            .expect_err("not connected");
        assert_eq!(e.label(), "ssm_target_not_connected", "{e}");
        lab.fake.set_api_failure(None);
        lab.fake.set_credentials(AwsCredentials::generate());
        let e = api
            .start_session("i-0abc", DEFAULT_DOCUMENT, "db.internal", 5432)
            .await
            .expect_err("rejected");
        assert_eq!(e.label(), "ssm_credentials_rejected", "{e}");
    });
    let starts = lab.fake.start_requests();
    assert_eq!(starts[0].document, DEFAULT_DOCUMENT);
    assert_eq!(
        starts[0].parameters,
        json!({"host": ["db.internal"], "portNumber": ["5432"]})
    );
    assert_eq!(lab.fake.terminated().len(), 1);
}

#[test]
fn keyhole_api_client_without_the_bundle_refuses_the_fake() {
    use keyhole::transport::ssm::api::{SsmApi, DEFAULT_DOCUMENT};
    keyhole::tls::install_crypto_provider();
    let lab = Lab::start();
    let mut env: HashMap<String, String> = lab.fake.env().into_iter().collect();
    env.remove("AWS_CA_BUNDLE");
    // An empty system store stands in for one without the fake's CA.
    let Ok(api) = SsmApi::new(
        "ssm://i-0abc",
        &env,
        lab.fake.region(),
        provider(&lab.creds),
    ) else {
        return;
    };
    lab.rt.block_on(async {
        let e = api
            .start_session("i-0abc", DEFAULT_DOCUMENT, "db", 5432)
            .await
            .expect_err("an untrusted certificate");
        assert_eq!(e.label(), "ssm_unreachable", "{e}");
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
    });
}

#[test]
fn the_fakes_message_layout() {
    let (bytes, id) = wire::encode(
        wire::OUTPUT,
        5,
        1,
        wire::PAYLOAD_OUTPUT,
        b"abc",
        1_700_000_000_000,
    );
    assert_eq!(&bytes[0..4], &116u32.to_be_bytes());
    assert_eq!(&bytes[4..36], format!("{:<32}", wire::OUTPUT).as_bytes());
    assert_eq!(&bytes[36..40], &1u32.to_be_bytes());
    assert_eq!(&bytes[40..48], &1_700_000_000_000u64.to_be_bytes());
    assert_eq!(&bytes[48..56], &5i64.to_be_bytes());
    assert_eq!(&bytes[56..64], &1u64.to_be_bytes());
    // The UUID's halves are swapped: its first half comes second.
    let hex: String = bytes[72..80].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(id.replace('-', "")[..16], hex);
    assert_eq!(&bytes[80..112], sigv4_sha256(b"abc").as_slice());
    assert_eq!(&bytes[112..116], &1u32.to_be_bytes());
    assert_eq!(&bytes[116..120], &3u32.to_be_bytes());
    assert_eq!(&bytes[120..], b"abc");
    let frame = wire::decode(&bytes).expect("decodes");
    assert_eq!(
        (frame.message_id, frame.sequence, frame.payload),
        (id, 5, b"abc".to_vec())
    );
    assert_eq!(
        wire::smux_frame(wire::SMUX_PSH, 3, b"xy"),
        [1, 2, 2, 0, 3, 0, 0, 0, b'x', b'y']
    );
}

fn sigv4_sha256(data: &[u8]) -> Vec<u8> {
    let hex = sigv4::sha256_hex(data);
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn close_kinds_and_client_side_counters() {
    let lab = Lab::start();
    lab.rt.block_on(async {
        for how in [CloseKind::WebSocketClose, CloseKind::TcpDrop] {
            let (session, mut ch) = lab.channel().await;
            let id = session["SessionId"].as_str().expect("SessionId").to_owned();
            ch.handshake(NEW_CLIENT).await;
            lab.fake.close_channel_for(&id, how.clone());
            assert!(ch.recv(WAIT).await.is_none(), "{how:?} ends the channel");
        }
        let (_, mut ch) = lab.channel().await;
        // Before the handshake completes, stream data is acknowledged and dropped.
        let request = ch.recv(WAIT).await.expect("a handshake request");
        assert_eq!(request.payload_type, wire::PAYLOAD_HANDSHAKE_REQUEST);
        ch.send(wire::PAYLOAD_OUTPUT, b"too early").await;
        // The same message twice: the agent acknowledges it again.
        let (bytes, _) = wire::encode(wire::INPUT, 1, 0, wire::PAYLOAD_OUTPUT, b"x", 1);
        ch.out_seq = 2;
        for _ in 0..2 {
            ch.ws
                .send(Message::Binary(bytes.clone().into()))
                .await
                .expect("send");
        }
        // (The channel stays open until the fake has read everything.)
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let c = lab.fake.counters();
            if c.data_before_handshake == 2 && c.duplicates_from_client == 1 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{c:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Two handshake responses, then two messages, the second one twice.
    assert_eq!(lab.fake.counters().acks_sent, 2 + 3);
}
