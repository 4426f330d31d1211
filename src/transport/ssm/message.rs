//! The Session Manager data channel's binary message, and the JSON payloads it carries.
//!
//! After the WebSocket to `StreamUrl` opens, the client sends one *text* frame, the JSON
//! [`OpenDataChannelInput`] (it carries the session's token). Every frame after that, in both
//! directions, is a *binary* frame holding exactly one [`AgentMessage`]:
//!
//! ```text
//! offset  size  field            notes (all integers big-endian)
//!      0     4  HeaderLength     116: the offset of PayloadLength; the payload starts at HeaderLength + 4
//!      4    32  MessageType      ASCII, padded with spaces ("output_stream_data      ...")
//!     36     4  SchemaVersion    1
//!     40     8  CreatedDate      milliseconds since the Unix epoch
//!     48     8  SequenceNumber   signed; 0, 1, 2, ... per direction for stream data
//!     56     8  Flags            0 for stream data, 3 for acknowledgements
//!     64    16  MessageId        a UUID with its two 8-byte halves swapped: bytes 8..16 first
//!     80    32  PayloadDigest    SHA-256 of the payload
//!    112     4  PayloadType      see [`PayloadType`]
//!    116     4  PayloadLength    number of payload bytes
//!    120     …  Payload
//! ```
//!
//! A peer may announce a larger `HeaderLength` (fields added by a later schema): the payload
//! then starts later and the bytes in between are skipped, as the plugin does.
//!
//! The payloads: stream bytes (`PayloadType::Output`, at most [`STREAM_DATA_PAYLOAD_SIZE`] per
//! message), [`AcknowledgeContent`] in `acknowledge` messages, the handshake
//! ([`HandshakeRequestPayload`] from the agent, [`HandshakeResponsePayload`] from the client,
//! [`HandshakeCompletePayload`] from the agent), [`ChannelClosed`] from the service and the
//! 4-byte [`Flag`].
//!
//! Confirmed against aws/session-manager-plugin (`src/message/clientmessage.go`,
//! `messageparser.go`, `handshakemessage.go`, `src/config/config.go`,
//! `src/version/versionvalidator.go`) and aws/amazon-ssm-agent
//! (`agent/session/plugins/port/port.go`, `port_mux.go`).

// wired into the hop by ssm/mod.rs

use std::cmp::Ordering;
use std::fmt;

use bytes::Bytes;
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// The `HeaderLength` keyhole writes: the offset of the `PayloadLength` field.
pub const HEADER_LENGTH: u32 = 116;
/// Where the payload starts in a message keyhole writes (`HEADER_LENGTH` + 4).
pub const PAYLOAD_OFFSET: usize = HEADER_LENGTH as usize + 4;
/// Width of the space-padded `MessageType` field.
pub const MESSAGE_TYPE_LENGTH: usize = 32;
/// The `SchemaVersion` of every message keyhole sends.
pub const SCHEMA_VERSION: u32 = 1;
/// Stream payloads are cut at this many bytes (plugin and agent `StreamDataPayloadSize`).
pub const STREAM_DATA_PAYLOAD_SIZE: usize = 1024;
/// `Flags` of an acknowledge message (the plugin and the agent both send 3).
pub const ACKNOWLEDGE_FLAGS: u64 = 3;
/// `MessageSchemaVersion` of the `OpenDataChannel` request.
pub const MESSAGE_SCHEMA_VERSION: &str = "1.0";

/// The `ClientVersion` keyhole reports, both in `OpenDataChannel` and in the handshake
/// response.
///
/// The agent decides from this string how to run a port forwarding session
/// (`agent/session/plugins/port/port.go`, `port_mux.go`):
/// - smux multiplexing only when it is ≥ `1.1.70` (otherwise one connection per session, with
///   racy `DisconnectToPort` flags between connections);
/// - smux keepalive off only when it is > `1.2.331.0` (with keepalive on, an idle session is
///   dropped after 30 s unless the client answers NOPs, and the keepalive traffic defeats
///   Session Manager's idle timeout).
///
/// `1.2.677.0` satisfies both, and it is the plugin release (October 2024) that matches the
/// plugin source this module was checked against (the commit adding `ClientVersion` to
/// `OpenDataChannel`), so keyhole claims to be exactly the client whose protocol it speaks and
/// no newer client a future agent might expect more from.
pub const CLIENT_VERSION: &str = "1.2.677.0";

/// The agent multiplexes with smux when the client version is at least this (agent
/// `muxSupportedClientVersion`).
pub const MUX_SUPPORTED_CLIENT_VERSION: &str = "1.1.70";
/// The agent turns smux keepalive off when the client version is greater than this (agent
/// `muxKeepAliveDisabledAfterThisClientVersion`).
pub const MUX_KEEPALIVE_DISABLED_AFTER_CLIENT_VERSION: &str = "1.2.331.0";
/// The plugin multiplexes when the agent version is greater than this (plugin
/// `TCPMultiplexingSupportedAfterThisAgentVersion`).
pub const MUX_SUPPORTED_AFTER_AGENT_VERSION: &str = "3.0.196.0";
/// The plugin turns its own smux keepalive off when the agent version is greater than this
/// (plugin `TCPMultiplexingWithSmuxKeepAliveDisabledAfterThisAgentVersion`).
pub const MUX_KEEPALIVE_DISABLED_AFTER_AGENT_VERSION: &str = "3.1.1511.0";
/// The plugin sends the `TerminateSession` flag only to agents newer than this.
pub const TERMINATE_SESSION_FLAG_AFTER_AGENT_VERSION: &str = "2.3.722.0";

/// Why a message or a payload could not be read. Each names the check that failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("SSM message too short: {len} bytes, the header alone is {PAYLOAD_OFFSET}")]
    TooShort { len: usize },
    #[error("SSM message header length {header_length} is smaller than {HEADER_LENGTH}")]
    HeaderLengthTooSmall { header_length: u32 },
    #[error(
        "SSM message header length {header_length} points past the end of the {len}-byte message"
    )]
    HeaderLengthPastEnd { header_length: u32, len: usize },
    #[error("SSM message payload length field says {declared} bytes but {actual} bytes follow the header")]
    PayloadLength { declared: u32, actual: usize },
    #[error("SSM message payload digest does not match the SHA-256 of its payload")]
    Digest,
    #[error("SSM message type is not printable ASCII")]
    MessageType,
    #[error("SSM {what} payload is not valid JSON: {reason}")]
    Json { what: &'static str, reason: String },
    #[error("SSM flag payload must be 4 bytes, got {len}")]
    FlagLength { len: usize },
    #[error("the system random number generator failed")]
    Random,
}

/// The `MessageType` field.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Client → agent stream data (and handshake response, flags).
    InputStreamData,
    /// Agent → client stream data (and handshake request/complete, flags).
    OutputStreamData,
    /// Either way: "I have your message N".
    Acknowledge,
    /// Service → client: the session has ended.
    ChannelClosed,
    /// Service: resume sending.
    StartPublication,
    /// Service: stop sending until `start_publication`.
    PausePublication,
    /// Any other type, as read (spaces and NULs trimmed).
    Unknown(String),
}

impl MessageType {
    /// The wire name, unpadded.
    pub fn as_str(&self) -> &str {
        match self {
            MessageType::InputStreamData => "input_stream_data",
            MessageType::OutputStreamData => "output_stream_data",
            MessageType::Acknowledge => "acknowledge",
            MessageType::ChannelClosed => "channel_closed",
            MessageType::StartPublication => "start_publication",
            MessageType::PausePublication => "pause_publication",
            MessageType::Unknown(s) => s,
        }
    }

    /// Reads a wire name (already trimmed).
    pub fn from_name(name: &str) -> MessageType {
        match name {
            "input_stream_data" => MessageType::InputStreamData,
            "output_stream_data" => MessageType::OutputStreamData,
            "acknowledge" => MessageType::Acknowledge,
            "channel_closed" => MessageType::ChannelClosed,
            "start_publication" => MessageType::StartPublication,
            "pause_publication" => MessageType::PausePublication,
            other => MessageType::Unknown(other.to_string()),
        }
    }

    /// The 32-byte field: the name, then spaces. A longer name (only possible for `Unknown`)
    /// is cut at 32 bytes.
    pub fn to_field(&self) -> [u8; MESSAGE_TYPE_LENGTH] {
        let mut field = [b' '; MESSAGE_TYPE_LENGTH];
        let name = self.as_str().as_bytes();
        let n = name.len().min(MESSAGE_TYPE_LENGTH);
        field[..n].copy_from_slice(&name[..n]);
        field
    }

    /// Reads the 32-byte field: leading/trailing spaces and NULs are trimmed (the plugin trims
    /// both); anything but printable ASCII is an error.
    pub fn from_field(field: &[u8]) -> Result<MessageType, MessageError> {
        let trimmed = trim_bytes(field);
        if !trimmed.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(MessageError::MessageType);
        }
        let name = std::str::from_utf8(trimmed).map_err(|_| MessageError::MessageType)?;
        Ok(MessageType::from_name(name))
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn trim_bytes(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if *first == b' ' || *first == 0 {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if *last == b' ' || *last == 0 {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// The `PayloadType` field (plugin `clientmessage.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadType {
    /// 0: not set. Acknowledge messages carry it (the plugin never names it).
    Unset,
    /// 1: stream bytes.
    Output,
    /// 2
    Error,
    /// 3: terminal size (shell sessions).
    Size,
    /// 4
    Parameter,
    /// 5: agent → client.
    HandshakeRequest,
    /// 6: client → agent.
    HandshakeResponse,
    /// 7: agent → client.
    HandshakeComplete,
    /// 8: KMS encryption challenge (never asked for port sessions).
    EncChallengeRequest,
    /// 9
    EncChallengeResponse,
    /// 10: a 4-byte [`Flag`].
    Flag,
    /// 11
    StdErr,
    /// 12
    ExitCode,
    /// Anything else.
    Unknown(u32),
}

impl PayloadType {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            PayloadType::Unset => 0,
            PayloadType::Output => 1,
            PayloadType::Error => 2,
            PayloadType::Size => 3,
            PayloadType::Parameter => 4,
            PayloadType::HandshakeRequest => 5,
            PayloadType::HandshakeResponse => 6,
            PayloadType::HandshakeComplete => 7,
            PayloadType::EncChallengeRequest => 8,
            PayloadType::EncChallengeResponse => 9,
            PayloadType::Flag => 10,
            PayloadType::StdErr => 11,
            PayloadType::ExitCode => 12,
            PayloadType::Unknown(v) => v,
        }
    }

    /// Reads a wire value; values 0..=12 always map to the named variants, so
    /// `from_u32(x).to_u32() == x` for every `x`.
    pub fn from_u32(v: u32) -> PayloadType {
        match v {
            0 => PayloadType::Unset,
            1 => PayloadType::Output,
            2 => PayloadType::Error,
            3 => PayloadType::Size,
            4 => PayloadType::Parameter,
            5 => PayloadType::HandshakeRequest,
            6 => PayloadType::HandshakeResponse,
            7 => PayloadType::HandshakeComplete,
            8 => PayloadType::EncChallengeRequest,
            9 => PayloadType::EncChallengeResponse,
            10 => PayloadType::Flag,
            11 => PayloadType::StdErr,
            12 => PayloadType::ExitCode,
            other => PayloadType::Unknown(other),
        }
    }
}

/// One data channel message. `message_id` holds the UUID in its normal byte order (as its
/// string form reads); [`AgentMessage::encode`] swaps the halves for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentMessage {
    pub message_type: MessageType,
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch.
    pub created_date: u64,
    pub sequence_number: i64,
    pub flags: u64,
    pub message_id: [u8; 16],
    pub payload_type: PayloadType,
    pub payload: Bytes,
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The wire form of a message id: bytes 8..16 of the UUID, then bytes 0..8 (the plugin writes
/// the least significant 64 bits first).
pub fn message_id_to_wire(id: [u8; 16]) -> [u8; 16] {
    let mut w = [0u8; 16];
    w[..8].copy_from_slice(&id[8..]);
    w[8..].copy_from_slice(&id[..8]);
    w
}

/// The inverse of [`message_id_to_wire`] (the swap is its own inverse).
pub fn message_id_from_wire(wire: [u8; 16]) -> [u8; 16] {
    message_id_to_wire(wire)
}

impl AgentMessage {
    /// The complete binary frame (header, digest and payload).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PAYLOAD_OFFSET + self.payload.len());
        out.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
        out.extend_from_slice(&self.message_type.to_field());
        out.extend_from_slice(&self.schema_version.to_be_bytes());
        out.extend_from_slice(&self.created_date.to_be_bytes());
        out.extend_from_slice(&self.sequence_number.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&message_id_to_wire(self.message_id));
        out.extend_from_slice(digest(&SHA256, &self.payload).as_ref());
        out.extend_from_slice(&self.payload_type.to_u32().to_be_bytes());
        // A payload over 4 GiB cannot be expressed; keyhole's payloads are ≤ 1 KiB or small JSON.
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// [`AgentMessage::encode`] as `Bytes`.
    pub fn encode_bytes(&self) -> Bytes {
        Bytes::from(self.encode())
    }

    /// Reads one binary frame. Checks, in order: the fixed header fits; `HeaderLength` is at
    /// least 116 and the payload offset it gives lies inside the frame; `PayloadLength` equals
    /// the bytes that follow; the message type is printable ASCII; the digest matches the
    /// payload. As in the plugin, the digest of an empty payload and of `start_publication` /
    /// `pause_publication` messages is not checked.
    pub fn decode(b: &[u8]) -> Result<AgentMessage, MessageError> {
        if b.len() < PAYLOAD_OFFSET {
            return Err(MessageError::TooShort { len: b.len() });
        }
        let header_length = be_u32(b, 0);
        if header_length < HEADER_LENGTH {
            return Err(MessageError::HeaderLengthTooSmall { header_length });
        }
        let payload_start = header_length as usize + 4;
        if payload_start > b.len() {
            return Err(MessageError::HeaderLengthPastEnd {
                header_length,
                len: b.len(),
            });
        }
        let declared = be_u32(b, 116);
        let actual = b.len() - payload_start;
        if declared as usize != actual {
            return Err(MessageError::PayloadLength { declared, actual });
        }
        let message_type = MessageType::from_field(&b[4..36])?;
        let payload = &b[payload_start..];
        let skip_digest = payload.is_empty()
            || matches!(
                message_type,
                MessageType::StartPublication | MessageType::PausePublication
            );
        if !skip_digest && digest(&SHA256, payload).as_ref() != &b[80..112] {
            return Err(MessageError::Digest);
        }
        let mut wire_id = [0u8; 16];
        wire_id.copy_from_slice(&b[64..80]);
        Ok(AgentMessage {
            message_type,
            schema_version: be_u32(b, 36),
            created_date: be_u64(b, 40),
            sequence_number: be_u64(b, 48) as i64,
            flags: be_u64(b, 56),
            message_id: message_id_from_wire(wire_id),
            payload_type: PayloadType::from_u32(be_u32(b, 112)),
            payload: Bytes::copy_from_slice(payload),
        })
    }

    /// An `input_stream_data` message: what the client sends for stream bytes, the handshake
    /// response and flags (all numbered from the same sequence).
    pub fn input_stream_data(
        sequence_number: i64,
        payload_type: PayloadType,
        payload: Bytes,
        now_ms: u64,
        message_id: [u8; 16],
    ) -> AgentMessage {
        AgentMessage {
            message_type: MessageType::InputStreamData,
            schema_version: SCHEMA_VERSION,
            created_date: now_ms,
            sequence_number,
            flags: 0,
            message_id,
            payload_type,
            payload,
        }
    }

    /// The acknowledgement of `of`: sequence 0, flags 3, payload type 0, JSON
    /// [`AcknowledgeContent`] naming `of`'s type, id and sequence number.
    pub fn acknowledge(of: &AgentMessage, now_ms: u64, message_id: [u8; 16]) -> AgentMessage {
        let content = AcknowledgeContent::for_message(of);
        AgentMessage {
            message_type: MessageType::Acknowledge,
            schema_version: SCHEMA_VERSION,
            created_date: now_ms,
            sequence_number: 0,
            flags: ACKNOWLEDGE_FLAGS,
            message_id,
            payload_type: PayloadType::Unset,
            payload: Bytes::from(content.to_json()),
        }
    }

    /// The handshake response as an `input_stream_data` message (payload type 6).
    pub fn handshake_response(
        sequence_number: i64,
        response: &HandshakeResponsePayload,
        now_ms: u64,
        message_id: [u8; 16],
    ) -> AgentMessage {
        AgentMessage::input_stream_data(
            sequence_number,
            PayloadType::HandshakeResponse,
            Bytes::from(response.to_json()),
            now_ms,
            message_id,
        )
    }

    /// A flag as an `input_stream_data` message (payload type 10, 4 bytes big-endian).
    pub fn flag(
        sequence_number: i64,
        flag: Flag,
        now_ms: u64,
        message_id: [u8; 16],
    ) -> AgentMessage {
        AgentMessage::input_stream_data(
            sequence_number,
            PayloadType::Flag,
            Bytes::copy_from_slice(&flag.to_u32().to_be_bytes()),
            now_ms,
            message_id,
        )
    }
}

/// Lower-case 8-4-4-4-12 hex form of a UUID (how the plugin and agent write ids in JSON).
pub fn uuid_string(id: [u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, b) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// Parses the 8-4-4-4-12 hex form (either case). `None` for anything else.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibbles = 0usize;
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        out[nibbles / 2] |= if nibbles.is_multiple_of(2) { v << 4 } else { v };
        nibbles += 1;
    }
    Some(out)
}

/// A fresh random (version 4) message id from ring's `SystemRandom`.
pub fn new_message_id() -> Result<[u8; 16], MessageError> {
    message_id_from(&SystemRandom::new())
}

/// A version 4 UUID from the given random source.
pub fn message_id_from(rng: &dyn SecureRandom) -> Result<[u8; 16], MessageError> {
    let mut id = [0u8; 16];
    rng.fill(&mut id).map_err(|_| MessageError::Random)?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

fn json_err(what: &'static str) -> impl FnOnce(serde_json::Error) -> MessageError {
    move |e| MessageError::Json {
        what,
        reason: e.to_string(),
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, integers, JSON values) cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The payload of an `acknowledge` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcknowledgeContent {
    /// The acknowledged message's type, e.g. `output_stream_data`.
    #[serde(rename = "AcknowledgedMessageType", default)]
    pub message_type: String,
    /// The acknowledged message's id, 8-4-4-4-12 lower-case hex.
    #[serde(rename = "AcknowledgedMessageId", default)]
    pub message_id: String,
    #[serde(rename = "AcknowledgedMessageSequenceNumber")]
    pub sequence_number: i64,
    /// Always `true` from the plugin and the agent.
    #[serde(rename = "IsSequentialMessage", default)]
    pub is_sequential_message: bool,
}

impl AcknowledgeContent {
    /// The acknowledgement of `m`.
    pub fn for_message(m: &AgentMessage) -> AcknowledgeContent {
        AcknowledgeContent {
            message_type: m.message_type.as_str().to_string(),
            message_id: uuid_string(m.message_id),
            sequence_number: m.sequence_number,
            is_sequential_message: true,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }

    pub fn from_json(b: &[u8]) -> Result<AcknowledgeContent, MessageError> {
        serde_json::from_slice(b).map_err(json_err("acknowledge"))
    }
}

/// The first frame on the data channel, sent as a WebSocket *text* frame. Its `Debug` does
/// not show the token.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct OpenDataChannelInput {
    /// "1.0".
    #[serde(rename = "MessageSchemaVersion")]
    pub message_schema_version: String,
    /// A fresh UUID string.
    #[serde(rename = "RequestId")]
    pub request_id: String,
    /// `TokenValue` from `StartSession` / `ResumeSession`: a secret.
    #[serde(rename = "TokenValue")]
    pub token_value: String,
    /// The client's own id (the plugin uses a UUID per run).
    #[serde(rename = "ClientId")]
    pub client_id: String,
    /// [`CLIENT_VERSION`].
    #[serde(rename = "ClientVersion")]
    pub client_version: String,
}

impl OpenDataChannelInput {
    /// The request keyhole sends, with [`MESSAGE_SCHEMA_VERSION`] and [`CLIENT_VERSION`].
    pub fn new(request_id: String, token_value: String, client_id: String) -> Self {
        OpenDataChannelInput {
            message_schema_version: MESSAGE_SCHEMA_VERSION.to_string(),
            request_id,
            token_value,
            client_id,
            client_version: CLIENT_VERSION.to_string(),
        }
    }

    /// The JSON text for the text frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl fmt::Debug for OpenDataChannelInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenDataChannelInput")
            .field("message_schema_version", &self.message_schema_version)
            .field("request_id", &self.request_id)
            .field("token_value", &"<redacted>")
            .field("client_id", &self.client_id)
            .field("client_version", &self.client_version)
            .finish()
    }
}

/// Handshake action type asking for KMS encryption (never asked for port sessions).
pub const ACTION_KMS_ENCRYPTION: &str = "KMSEncryption";
/// Handshake action type announcing the session type (`Port` for port forwarding).
pub const ACTION_SESSION_TYPE: &str = "SessionType";
/// The `SessionType` of port forwarding sessions.
pub const SESSION_TYPE_PORT: &str = "Port";

/// `ActionStatus` values of a processed action.
pub const ACTION_STATUS_SUCCESS: i32 = 1;
pub const ACTION_STATUS_FAILED: i32 = 2;
pub const ACTION_STATUS_UNSUPPORTED: i32 = 3;

/// The agent's handshake request (payload type 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandshakeRequestPayload {
    #[serde(rename = "AgentVersion", default)]
    pub agent_version: String,
    #[serde(rename = "RequestedClientActions", default)]
    pub requested_client_actions: Vec<RequestedClientAction>,
}

impl HandshakeRequestPayload {
    pub fn from_json(b: &[u8]) -> Result<Self, MessageError> {
        serde_json::from_slice(b).map_err(json_err("handshake request"))
    }

    /// The `SessionType` the agent announced, if it did.
    pub fn session_type(&self) -> Option<String> {
        self.requested_client_actions
            .iter()
            .filter(|a| a.action_type == ACTION_SESSION_TYPE)
            .find_map(|a| {
                serde_json::from_value::<SessionTypeRequest>(a.action_parameters.clone())
                    .ok()
                    .map(|r| r.session_type)
            })
    }
}

/// One action the agent asks the client to perform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestedClientAction {
    #[serde(rename = "ActionType", default)]
    pub action_type: String,
    #[serde(rename = "ActionParameters", default)]
    pub action_parameters: serde_json::Value,
}

/// The parameters of a `SessionType` action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionTypeRequest {
    #[serde(rename = "SessionType", default)]
    pub session_type: String,
    #[serde(rename = "Properties", default)]
    pub properties: serde_json::Value,
}

/// One action the client reports back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessedClientAction {
    #[serde(rename = "ActionType")]
    pub action_type: String,
    /// [`ACTION_STATUS_SUCCESS`], [`ACTION_STATUS_FAILED`] or [`ACTION_STATUS_UNSUPPORTED`].
    #[serde(rename = "ActionStatus")]
    pub action_status: i32,
    #[serde(rename = "ActionResult", default)]
    pub action_result: serde_json::Value,
    #[serde(rename = "Error", default)]
    pub error: String,
}

/// The client's handshake response (payload type 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandshakeResponsePayload {
    #[serde(rename = "ClientVersion")]
    pub client_version: String,
    #[serde(rename = "ProcessedClientActions")]
    pub processed_client_actions: Vec<ProcessedClientAction>,
    #[serde(rename = "Errors", default)]
    pub errors: Vec<String>,
}

impl HandshakeResponsePayload {
    /// keyhole's answer to `request`: `SessionType` `Port` succeeds, any other session type
    /// fails, `KMSEncryption` fails (keyhole does not encrypt sessions with KMS), anything else
    /// is unsupported. Failures are also listed in `Errors`, as the plugin does.
    pub fn answer(request: &HandshakeRequestPayload, client_version: &str) -> Self {
        let mut actions = Vec::new();
        let mut errors = Vec::new();
        for a in &request.requested_client_actions {
            let (status, error) = match a.action_type.as_str() {
                ACTION_SESSION_TYPE => {
                    let st = serde_json::from_value::<SessionTypeRequest>(a.action_parameters.clone())
                        .map(|r| r.session_type)
                        .unwrap_or_default();
                    if st == SESSION_TYPE_PORT {
                        (ACTION_STATUS_SUCCESS, String::new())
                    } else {
                        (
                            ACTION_STATUS_FAILED,
                            format!("Failed to process action SessionType: unsupported session type {st:?}"),
                        )
                    }
                }
                ACTION_KMS_ENCRYPTION => (
                    ACTION_STATUS_FAILED,
                    "Failed to process action KMSEncryption: keyhole does not support KMS encryption".to_string(),
                ),
                other => (ACTION_STATUS_UNSUPPORTED, format!("Unsupported action {other}")),
            };
            if !error.is_empty() {
                errors.push(error.clone());
            }
            actions.push(ProcessedClientAction {
                action_type: a.action_type.clone(),
                action_status: status,
                action_result: serde_json::Value::Null,
                error,
            });
        }
        HandshakeResponsePayload {
            client_version: client_version.to_string(),
            processed_client_actions: actions,
            errors,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }
}

/// The agent's handshake complete (payload type 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeCompletePayload {
    /// A Go `time.Duration`: integer nanoseconds.
    #[serde(rename = "HandshakeTimeToComplete", default)]
    pub handshake_time_to_complete_ns: i64,
    /// Shown to the user by the plugin when not empty.
    #[serde(rename = "CustomerMessage", default)]
    pub customer_message: String,
}

impl HandshakeCompletePayload {
    pub fn from_json(b: &[u8]) -> Result<Self, MessageError> {
        serde_json::from_slice(b).map_err(json_err("handshake complete"))
    }
}

/// The payload of a `channel_closed` message from the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChannelClosed {
    #[serde(rename = "MessageId", default)]
    pub message_id: String,
    #[serde(rename = "CreatedDate", default)]
    pub created_date: String,
    #[serde(rename = "DestinationId", default)]
    pub destination_id: String,
    #[serde(rename = "SessionId", default)]
    pub session_id: String,
    #[serde(rename = "MessageType", default)]
    pub message_type: String,
    #[serde(rename = "SchemaVersion", default)]
    pub schema_version: i64,
    /// Why the session ended, when the service says.
    #[serde(rename = "Output", default)]
    pub output: String,
}

impl ChannelClosed {
    pub fn from_json(b: &[u8]) -> Result<Self, MessageError> {
        serde_json::from_slice(b).map_err(json_err("channel_closed"))
    }
}

/// The 4-byte big-endian payload of payload type 10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// 1: client → agent, the local connection ended (non-multiplexed sessions).
    DisconnectToPort,
    /// 2: client → agent, end the session.
    TerminateSession,
    /// 3: agent → client, a stream could not reach the target.
    ConnectToPortError,
    Unknown(u32),
}

impl Flag {
    pub fn to_u32(self) -> u32 {
        match self {
            Flag::DisconnectToPort => 1,
            Flag::TerminateSession => 2,
            Flag::ConnectToPortError => 3,
            Flag::Unknown(v) => v,
        }
    }

    pub fn from_u32(v: u32) -> Flag {
        match v {
            1 => Flag::DisconnectToPort,
            2 => Flag::TerminateSession,
            3 => Flag::ConnectToPortError,
            other => Flag::Unknown(other),
        }
    }

    /// Reads a flag payload (exactly 4 bytes).
    pub fn from_payload(b: &[u8]) -> Result<Flag, MessageError> {
        let a: [u8; 4] = b
            .try_into()
            .map_err(|_| MessageError::FlagLength { len: b.len() })?;
        Ok(Flag::from_u32(u32::from_be_bytes(a)))
    }
}

/// Compares dotted decimal versions ("3.1.1511.0") component by component; a missing
/// component counts as 0. `None` when a component is not a decimal number.
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    fn parts(s: &str) -> Option<Vec<u64>> {
        s.trim().split('.').map(|p| p.parse::<u64>().ok()).collect()
    }
    let (pa, pb) = (parts(a)?, parts(b)?);
    let n = pa.len().max(pb.len());
    for i in 0..n {
        let x = pa.get(i).copied().unwrap_or(0);
        let y = pb.get(i).copied().unwrap_or(0);
        match x.cmp(&y) {
            Ordering::Equal => continue,
            other => return Some(other),
        }
    }
    Some(Ordering::Equal)
}

fn newer_than(version: &str, threshold: &str) -> bool {
    compare_versions(version, threshold) == Some(Ordering::Greater)
}

/// Whether the agent multiplexes port forwarding with smux (plugin: agent version >
/// 3.0.196.0; unparsable versions are treated as not supporting it, as the plugin does).
pub fn agent_supports_smux(agent_version: &str) -> bool {
    newer_than(agent_version, MUX_SUPPORTED_AFTER_AGENT_VERSION)
}

/// Whether the client should run its smux with keepalive off (plugin: agent version >
/// 3.1.1511.0). Older agents keep their smux keepalive on and expect the client's NOPs.
pub fn agent_wants_smux_keepalive_off(agent_version: &str) -> bool {
    newer_than(agent_version, MUX_KEEPALIVE_DISABLED_AFTER_AGENT_VERSION)
}

/// Whether the agent understands the `TerminateSession` flag (agent version > 2.3.722.0).
pub fn agent_supports_terminate_flag(agent_version: &str) -> bool {
    newer_than(agent_version, TERMINATE_SESSION_FLAG_AFTER_AGENT_VERSION)
}

/// Whether the agent will multiplex for a client reporting `client_version` (agent: ≥ 1.1.70).
pub fn client_version_enables_smux(client_version: &str) -> bool {
    matches!(
        compare_versions(client_version, MUX_SUPPORTED_CLIENT_VERSION),
        Some(Ordering::Greater | Ordering::Equal)
    )
}

/// Whether the agent turns its smux keepalive off for `client_version` (agent: > 1.2.331.0).
pub fn client_version_disables_agent_keepalive(client_version: &str) -> bool {
    newer_than(client_version, MUX_KEEPALIVE_DISABLED_AFTER_CLIENT_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::transport::ssm::test_rng::XorShift;

    const ID: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ];

    #[test]
    fn encodes_byte_for_byte() {
        let m = AgentMessage {
            message_type: MessageType::InputStreamData,
            schema_version: 1,
            created_date: 0x0000_0190_0000_0001,
            sequence_number: 7,
            flags: 0,
            message_id: ID,
            payload_type: PayloadType::Output,
            payload: Bytes::from_static(b"abc"),
        };
        let mut want = Vec::new();
        want.extend_from_slice(&[0, 0, 0, 116]); // HeaderLength
        let mut ty = b"input_stream_data".to_vec();
        ty.resize(32, b' ');
        want.extend_from_slice(&ty); // MessageType
        want.extend_from_slice(&[0, 0, 0, 1]); // SchemaVersion
        want.extend_from_slice(&[0, 0, 0x01, 0x90, 0, 0, 0, 1]); // CreatedDate
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7]); // SequenceNumber
        want.extend_from_slice(&[0; 8]); // Flags
                                         // MessageId: the UUID's second half first.
        want.extend_from_slice(&[0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10]);
        want.extend_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        // SHA-256("abc"), the FIPS 180-2 test vector.
        want.extend_from_slice(&[
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
            0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
            0xf2, 0x00, 0x15, 0xad,
        ]);
        want.extend_from_slice(&[0, 0, 0, 1]); // PayloadType
        want.extend_from_slice(&[0, 0, 0, 3]); // PayloadLength
        want.extend_from_slice(b"abc");
        assert_eq!(want.len(), 123);
        assert_eq!(m.encode(), want);
        assert_eq!(AgentMessage::decode(&want).expect("decodes"), m);
    }

    #[test]
    fn uuid_halves_are_swapped_on_the_wire() {
        let wire = message_id_to_wire(ID);
        assert_eq!(&wire[..8], &ID[8..]);
        assert_eq!(&wire[8..], &ID[..8]);
        assert_eq!(message_id_from_wire(wire), ID);
        let m = AgentMessage::input_stream_data(0, PayloadType::Output, Bytes::new(), 1, ID);
        assert_eq!(&m.encode()[64..80], &wire);
    }

    #[test]
    fn uuid_strings() {
        assert_eq!(uuid_string(ID), "01234567-89ab-cdef-fedc-ba9876543210");
        assert_eq!(parse_uuid("01234567-89AB-cdef-fedc-ba9876543210"), Some(ID));
        assert_eq!(parse_uuid("01234567-89ab-cdef-fedc-ba987654321"), None);
        assert_eq!(parse_uuid("01234567-89ab-cdef-fedc+ba9876543210"), None);
        assert_eq!(parse_uuid("0123456g-89ab-cdef-fedc-ba9876543210"), None);
        let id = new_message_id().expect("random");
        assert_eq!(id[6] >> 4, 4);
        assert_eq!(id[8] >> 6, 0b10);
        assert_eq!(parse_uuid(&uuid_string(id)), Some(id));
    }

    fn sample() -> Vec<u8> {
        AgentMessage::input_stream_data(
            3,
            PayloadType::Output,
            Bytes::from_static(b"hello"),
            42,
            ID,
        )
        .encode()
    }

    #[test]
    fn rejects_bad_messages_naming_the_check() {
        let good = sample();
        let e = AgentMessage::decode(&good[..100]).unwrap_err();
        assert_eq!(e, MessageError::TooShort { len: 100 });
        assert!(e.to_string().contains("too short"), "{e}");

        let mut bad = good.clone();
        bad[3] = 100;
        let e = AgentMessage::decode(&bad).unwrap_err();
        assert!(
            e.to_string().contains("header length 100 is smaller"),
            "{e}"
        );

        let mut bad = good.clone();
        bad[3] = 200;
        let e = AgentMessage::decode(&bad).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");

        let mut bad = good.clone();
        bad[119] = 4;
        let e = AgentMessage::decode(&bad).unwrap_err();
        assert_eq!(
            e,
            MessageError::PayloadLength {
                declared: 4,
                actual: 5
            }
        );
        assert!(
            e.to_string()
                .contains("payload length field says 4 bytes but 5"),
            "{e}"
        );

        let mut bad = good.clone();
        bad[121] ^= 1;
        let e = AgentMessage::decode(&bad).unwrap_err();
        assert_eq!(e, MessageError::Digest);
        assert!(e.to_string().contains("digest"), "{e}");

        let mut bad = good.clone();
        bad[10] = 0xff;
        assert_eq!(
            AgentMessage::decode(&bad).unwrap_err(),
            MessageError::MessageType
        );
    }

    #[test]
    fn honours_a_larger_header_length() {
        let good = sample();
        let mut longer = good[..120].to_vec();
        // HeaderLength 124: PayloadLength stays at offset 116 (where the plugin reads it) and
        // the payload starts at 128, after eight bytes keyhole does not know.
        longer[3] = 124;
        longer.extend_from_slice(&[9; 8]);
        longer.extend_from_slice(b"hello");
        let m = AgentMessage::decode(&longer).expect("decodes");
        assert_eq!(&m.payload[..], b"hello");
        assert_eq!(m, AgentMessage::decode(&good).expect("decodes"));
    }

    #[test]
    fn message_type_field_trims_nuls_and_spaces() {
        let mut f = [0u8; 32];
        f[..11].copy_from_slice(b"acknowledge");
        assert_eq!(MessageType::from_field(&f), Ok(MessageType::Acknowledge));
        let mut f = [b' '; 32];
        f[..7].copy_from_slice(b"weird_1");
        assert_eq!(
            MessageType::from_field(&f),
            Ok(MessageType::Unknown("weird_1".into()))
        );
        assert_eq!(
            &MessageType::ChannelClosed.to_field()[..15],
            b"channel_closed "
        );
    }

    #[test]
    fn acknowledge_message_layout_and_json() {
        let of = AgentMessage {
            message_type: MessageType::OutputStreamData,
            schema_version: 1,
            created_date: 5,
            sequence_number: 12,
            flags: 0,
            message_id: ID,
            payload_type: PayloadType::Output,
            payload: Bytes::from_static(b"x"),
        };
        let ack = AgentMessage::acknowledge(&of, 99, [7; 16]);
        assert_eq!(ack.sequence_number, 0);
        assert_eq!(ack.flags, 3);
        assert_eq!(ack.payload_type, PayloadType::Unset);
        let text = std::str::from_utf8(&ack.payload).expect("utf-8");
        assert_eq!(
            text,
            "{\"AcknowledgedMessageType\":\"output_stream_data\",\
             \"AcknowledgedMessageId\":\"01234567-89ab-cdef-fedc-ba9876543210\",\
             \"AcknowledgedMessageSequenceNumber\":12,\"IsSequentialMessage\":true}"
        );
        let back = AcknowledgeContent::from_json(&ack.payload).expect("json");
        assert_eq!(back, AcknowledgeContent::for_message(&of));
        assert!(AcknowledgeContent::from_json(b"{").is_err());
    }

    #[test]
    fn open_data_channel_json_and_debug_hides_token() {
        let o =
            OpenDataChannelInput::new("req-id".into(), "SECRET-TOKEN-123".into(), "client".into());
        let json = o.to_json();
        assert_eq!(
            json,
            "{\"MessageSchemaVersion\":\"1.0\",\"RequestId\":\"req-id\",\"TokenValue\":\"SECRET-TOKEN-123\",\
             \"ClientId\":\"client\",\"ClientVersion\":\"1.2.677.0\"}"
        );
        let dbg = format!("{o:?}");
        assert!(!dbg.contains("SECRET-TOKEN-123"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn handshake_round_trip() {
        let req = br#"{"AgentVersion":"3.3.987.0","RequestedClientActions":[
            {"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"portNumber":"5432"}}},
            {"ActionType":"KMSEncryption","ActionParameters":{"KMSKeyId":"k"}},
            {"ActionType":"Teleport","ActionParameters":null}]}"#;
        let req = HandshakeRequestPayload::from_json(req).expect("json");
        assert_eq!(req.agent_version, "3.3.987.0");
        assert_eq!(req.session_type().as_deref(), Some("Port"));
        let resp = HandshakeResponsePayload::answer(&req, CLIENT_VERSION);
        let statuses: Vec<i32> = resp
            .processed_client_actions
            .iter()
            .map(|a| a.action_status)
            .collect();
        assert_eq!(statuses, vec![1, 2, 3]);
        assert_eq!(resp.errors.len(), 2);
        let json = String::from_utf8(resp.to_json()).expect("utf-8");
        for name in [
            "\"ClientVersion\":\"1.2.677.0\"",
            "\"ProcessedClientActions\"",
            "\"ActionType\":\"SessionType\"",
            "\"ActionStatus\":1",
            "\"ActionResult\":null",
            "\"Error\":\"\"",
            "\"Errors\"",
        ] {
            assert!(json.contains(name), "{name} in {json}");
        }
        let m = AgentMessage::handshake_response(4, &resp, 10, ID);
        assert_eq!(m.payload_type, PayloadType::HandshakeResponse);
        assert_eq!(m.message_type, MessageType::InputStreamData);
        assert_eq!(m.sequence_number, 4);

        let done = HandshakeCompletePayload::from_json(
            br#"{"HandshakeTimeToComplete":1500000000,"CustomerMessage":"hi"}"#,
        )
        .expect("json");
        assert_eq!(done.handshake_time_to_complete_ns, 1_500_000_000);
        assert_eq!(done.customer_message, "hi");
    }

    #[test]
    fn channel_closed_json() {
        let c = ChannelClosed::from_json(
            br#"{"MessageId":"m","CreatedDate":"2024-01-01T00:00:00Z","DestinationId":"d",
                 "SessionId":"s","MessageType":"channel_closed","SchemaVersion":1,"Output":"bye"}"#,
        )
        .expect("json");
        assert_eq!(c.output, "bye");
        assert_eq!(c.session_id, "s");
        assert_eq!(c.schema_version, 1);
        let json = serde_json::to_string(&c).expect("json");
        for name in [
            "MessageId",
            "CreatedDate",
            "DestinationId",
            "SessionId",
            "MessageType",
            "SchemaVersion",
            "Output",
        ] {
            assert!(json.contains(&format!("\"{name}\"")), "{name}");
        }
    }

    #[test]
    fn flags() {
        let m = AgentMessage::flag(9, Flag::TerminateSession, 1, ID);
        assert_eq!(&m.payload[..], &[0, 0, 0, 2]);
        assert_eq!(m.payload_type, PayloadType::Flag);
        assert_eq!(
            Flag::from_payload(&[0, 0, 0, 3]),
            Ok(Flag::ConnectToPortError)
        );
        assert_eq!(
            Flag::from_payload(&[0, 0, 0, 1]),
            Ok(Flag::DisconnectToPort)
        );
        assert_eq!(Flag::from_payload(&[0, 0, 1, 0]), Ok(Flag::Unknown(256)));
        assert_eq!(
            Flag::from_payload(&[0, 0, 3]),
            Err(MessageError::FlagLength { len: 3 })
        );
    }

    #[test]
    fn versions() {
        assert_eq!(
            compare_versions("1.2.677.0", "1.2.331.0"),
            Some(Ordering::Greater)
        );
        assert_eq!(
            compare_versions("1.1.70", "1.1.70.0"),
            Some(Ordering::Equal)
        );
        assert_eq!(compare_versions("1.10", "1.9"), Some(Ordering::Greater));
        assert_eq!(compare_versions("1.x", "1.9"), None);
        assert!(client_version_enables_smux(CLIENT_VERSION));
        assert!(client_version_disables_agent_keepalive(CLIENT_VERSION));
        assert!(client_version_enables_smux("1.1.70"));
        assert!(!client_version_enables_smux("1.1.69.9"));
        assert!(!client_version_disables_agent_keepalive("1.2.331.0"));
        assert!(agent_supports_smux("3.0.196.1"));
        assert!(!agent_supports_smux("3.0.196.0"));
        assert!(!agent_supports_smux(""));
        assert!(agent_wants_smux_keepalive_off("3.1.1512.0"));
        assert!(!agent_wants_smux_keepalive_off("3.1.1511.0"));
        assert!(agent_supports_terminate_flag("3.0.0.0"));
    }

    #[test]
    fn payload_type_round_trips() {
        for v in 0..40u32 {
            assert_eq!(PayloadType::from_u32(v).to_u32(), v);
        }
        assert_eq!(PayloadType::from_u32(7), PayloadType::HandshakeComplete);
        assert_eq!(PayloadType::from_u32(99), PayloadType::Unknown(99));
    }

    fn random_message(r: &mut XorShift) -> AgentMessage {
        let types = [
            MessageType::InputStreamData,
            MessageType::OutputStreamData,
            MessageType::Acknowledge,
            MessageType::ChannelClosed,
            MessageType::Unknown("some_future_type".into()),
        ];
        let len = r.below(3000) as usize;
        let mut id = [0u8; 16];
        id.copy_from_slice(&r.bytes(16));
        AgentMessage {
            message_type: types[r.below(types.len() as u64) as usize].clone(),
            schema_version: r.next() as u32,
            created_date: r.next(),
            sequence_number: r.next() as i64,
            flags: r.next(),
            message_id: id,
            payload_type: PayloadType::from_u32(r.below(16) as u32),
            payload: Bytes::from(r.bytes(len)),
        }
    }

    #[test]
    fn property_round_trip() {
        let mut r = XorShift::new(0x5eed_1234);
        for _ in 0..2000 {
            let m = random_message(&mut r);
            let enc = m.encode();
            assert_eq!(enc.len(), PAYLOAD_OFFSET + m.payload.len());
            assert_eq!(AgentMessage::decode(&enc).expect("round trip"), m);
        }
    }

    #[test]
    fn property_corruption_and_truncation_rejected() {
        let mut r = XorShift::new(0xc0ff_ee00_1234);
        for _ in 0..2000 {
            let mut m = random_message(&mut r);
            if m.payload.is_empty() {
                let n = 1 + r.below(50) as usize;
                m.payload = Bytes::from(r.bytes(n));
            }
            let enc = m.encode();

            // One byte of the header length, payload length, digest or payload changed.
            let region = r.below(4);
            let at = match region {
                0 => r.below(4) as usize,
                1 => 116 + r.below(4) as usize,
                2 => 80 + r.below(32) as usize,
                _ => PAYLOAD_OFFSET + r.below(m.payload.len() as u64) as usize,
            };
            let mut bad = enc.clone();
            bad[at] ^= 1 + r.below(255) as u8;
            match AgentMessage::decode(&bad) {
                Err(_) => {}
                Ok(other) => panic!("corruption at {at} accepted as {other:?}"),
            }

            // Truncated anywhere.
            let cut = r.below(enc.len() as u64) as usize;
            assert!(
                AgentMessage::decode(&enc[..cut]).is_err(),
                "truncated at {cut}"
            );

            // Arbitrary garbage never panics.
            let n = r.below(300) as usize;
            let _ = AgentMessage::decode(&r.bytes(n));
        }
    }
}
