//! Reliable, ordered delivery over the Session Manager data channel, with no I/O.
//!
//! The data channel is a WebSocket, but the service in the middle may drop, repeat or reorder
//! messages (and a reconnect loses whatever was in flight), so the client and the agent run
//! their own small transport on top of it:
//!
//! - every `input_stream_data` (client → agent) and `output_stream_data` (agent → client)
//!   message carries a sequence number, 0, 1, 2, … per direction; stream bytes, the handshake
//!   response and flags all take numbers from the same counter;
//! - the receiver acknowledges each message it accepts with an `acknowledge` message naming its
//!   sequence number; acknowledgements are not themselves numbered or acknowledged;
//! - the sender keeps every unacknowledged message and resends it when its retransmission
//!   timeout passes: the timeout follows the round trip time as TCP's does
//!   (RTT + max(10 ms, 4 × RTT variation), 200 ms before the first sample, at most 1 s);
//!   after 3000 resends of one message the sender gives up;
//! - the receiver hands payloads on strictly in sequence order: a duplicate is acknowledged
//!   again but not delivered twice; a message from the future is buffered and acknowledged,
//!   and delivered once the gap before it fills.
//!
//! [`Channel`] is that machine for the client side, in the style of quinn-proto: the caller
//! owns the WebSocket and the clock, feeds in decoded messages and the current time, and sends
//! the frames the channel returns. Everything it does is a function of its inputs (message ids
//! come from a source the caller may replace), so tests replay it byte for byte.
//!
//! Confirmed against aws/session-manager-plugin `src/datachannel/streaming.go` and
//! `src/config/config.go`, and aws/amazon-ssm-agent `agent/session/datachannel/datachannel.go`.

// wired into the hop by ssm/mod.rs

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::message::{
    new_message_id, AcknowledgeContent, AgentMessage, ChannelClosed, Flag,
    HandshakeResponsePayload, MessageError, MessageType, PayloadType, STREAM_DATA_PAYLOAD_SIZE,
};

/// Retransmission timeout before the first round trip sample (plugin
/// `DefaultTransmissionTimeout`).
pub const INITIAL_RETRANSMISSION_TIMEOUT: Duration = Duration::from_millis(200);
/// The round trip estimate before the first sample (plugin `DefaultRoundTripTime`).
pub const INITIAL_ROUND_TRIP_TIME: Duration = Duration::from_millis(100);
/// The timeout never exceeds this (plugin `MaxTransmissionTimeout`).
pub const MAX_RETRANSMISSION_TIMEOUT: Duration = Duration::from_secs(1);
/// The variation term of the timeout is at least this (plugin `ClockGranularity`).
pub const CLOCK_GRANULARITY: Duration = Duration::from_millis(10);
/// How often the plugin and the agent look for a message to resend (`ResendSleepInterval`).
/// [`Channel::next_timeout`] makes a fixed tick unnecessary, but a caller may still use one.
pub const RESEND_INTERVAL: Duration = Duration::from_millis(100);
/// Resends of one message before giving up (plugin `ResendMaxAttempt`: 5 minutes of 100 ms).
pub const MAX_RESEND_ATTEMPTS: u32 = 3000;
/// Default bound on sent-but-unacknowledged stream messages (1 MiB of stream data).
pub const MAX_IN_FLIGHT: usize = 1024;
/// Default bound on out-of-order messages held for reordering.
pub const MAX_OUT_OF_ORDER: usize = 1024;

/// Limits of one [`Channel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Stream messages sent and not yet acknowledged before [`Channel::can_send`] turns false.
    pub max_in_flight: usize,
    /// Out-of-order incoming messages held; more are dropped unacknowledged (resent later).
    pub max_out_of_order: usize,
    /// Resends of one message before [`ChannelError::Unacknowledged`].
    pub max_resend_attempts: u32,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_in_flight: MAX_IN_FLIGHT,
            max_out_of_order: MAX_OUT_OF_ORDER,
            max_resend_attempts: MAX_RESEND_ATTEMPTS,
        }
    }
}

/// What ends a channel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error(
        "the Session Manager session stopped acknowledging: message {sequence_number} was resent \
         {attempts} times without an acknowledgement"
    )]
    Unacknowledged { sequence_number: i64, attempts: u32 },
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// A payload handed on in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub sequence_number: i64,
    /// `Output` for stream bytes; handshake request/complete, flags and others as sent.
    pub payload_type: PayloadType,
    pub payload: Bytes,
}

/// Something the caller must act on besides payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The service ended the session (`channel_closed`); its payload, when it parsed.
    ChannelClosed(Option<ChannelClosed>),
    /// `pause_publication`: [`Channel::can_send`] is false until publication starts again.
    PausePublication,
    /// `start_publication`.
    StartPublication,
    /// An acknowledgement freed room in the window.
    Acknowledged { sequence_number: i64 },
    /// A message type a client does not expect (e.g. `input_stream_data` or an unknown one);
    /// it was ignored.
    Ignored(MessageType),
}

/// The result of one incoming message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Payloads now in order, oldest first.
    pub deliver: Vec<Delivery>,
    /// Frames to send (acknowledgements), in order.
    pub transmit: Vec<Bytes>,
    pub events: Vec<Event>,
}

struct Unacked {
    sequence_number: i64,
    frame: Bytes,
    first_sent: Instant,
    last_sent: Instant,
    /// Resends so far (0 after the first transmission).
    attempts: u32,
}

struct Buffered {
    message: AgentMessage,
}

type IdSource = Box<dyn FnMut() -> Result<[u8; 16], MessageError> + Send>;

/// The client's half of the data channel's transport. See the module docs.
pub struct Channel {
    config: ChannelConfig,
    start: Instant,
    start_unix_ms: u64,
    ids: IdSource,

    next_sequence: i64,
    unacked: VecDeque<Unacked>,
    paused: bool,

    round_trip_time: Duration,
    round_trip_time_variation: Duration,
    retransmission_timeout: Duration,

    expected_sequence: i64,
    out_of_order: BTreeMap<i64, Buffered>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("next_sequence", &self.next_sequence)
            .field("in_flight", &self.unacked.len())
            .field("paused", &self.paused)
            .field("retransmission_timeout", &self.retransmission_timeout)
            .field("expected_sequence", &self.expected_sequence)
            .field("out_of_order", &self.out_of_order.len())
            .finish()
    }
}

impl Channel {
    /// A channel whose clock reads `start_unix_ms` (milliseconds since the Unix epoch, for the
    /// messages' `CreatedDate`) at `start`. Message ids are random version 4 UUIDs.
    pub fn new(config: ChannelConfig, start: Instant, start_unix_ms: u64) -> Self {
        Channel {
            config,
            start,
            start_unix_ms,
            ids: Box::new(new_message_id),
            next_sequence: 0,
            unacked: VecDeque::new(),
            paused: false,
            round_trip_time: INITIAL_ROUND_TRIP_TIME,
            round_trip_time_variation: Duration::ZERO,
            retransmission_timeout: INITIAL_RETRANSMISSION_TIMEOUT,
            expected_sequence: 0,
            out_of_order: BTreeMap::new(),
        }
    }

    /// Replaces the source of message ids (tests use a counter to compare bytes).
    pub fn with_message_ids(
        mut self,
        ids: impl FnMut() -> Result<[u8; 16], MessageError> + Send + 'static,
    ) -> Self {
        self.ids = Box::new(ids);
        self
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_millis();
        self.start_unix_ms
            .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }

    // ---- outgoing ----

    /// Whether [`Channel::send_stream`] would accept bytes now: the window has room and the
    /// service has not paused publication. When false, stop reading the local socket.
    pub fn can_send(&self) -> bool {
        !self.paused && self.unacked.len() < self.config.max_in_flight
    }

    /// Stream messages sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// The sequence number the next outgoing message will carry.
    pub fn next_sequence_number(&self) -> i64 {
        self.next_sequence
    }

    /// Whether the service has paused publication.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn push(
        &mut self,
        payload_type: PayloadType,
        payload: Bytes,
        now: Instant,
    ) -> Result<Bytes, ChannelError> {
        let id = (self.ids)()?;
        let seq = self.next_sequence;
        let m = AgentMessage::input_stream_data(seq, payload_type, payload, self.unix_ms(now), id);
        let frame = m.encode_bytes();
        self.next_sequence += 1;
        self.unacked.push_back(Unacked {
            sequence_number: seq,
            frame: frame.clone(),
            first_sent: now,
            last_sent: now,
            attempts: 0,
        });
        Ok(frame)
    }

    /// Cuts `data` into `output` messages of at most 1024 bytes while the window has room.
    /// Returns how many bytes were taken (from the front of `data`; the caller keeps the rest)
    /// and the frames to send now.
    pub fn send_stream(
        &mut self,
        data: &[u8],
        now: Instant,
    ) -> Result<(usize, Vec<Bytes>), ChannelError> {
        let mut taken = 0;
        let mut frames = Vec::new();
        while taken < data.len() && self.can_send() {
            let end = (taken + STREAM_DATA_PAYLOAD_SIZE).min(data.len());
            let chunk = Bytes::copy_from_slice(&data[taken..end]);
            frames.push(self.push(PayloadType::Output, chunk, now)?);
            taken = end;
        }
        Ok((taken, frames))
    }

    /// A flag message. Flags bypass the window and a pause (they are rare and small) but are
    /// numbered, kept and resent like stream data.
    pub fn send_flag(&mut self, flag: Flag, now: Instant) -> Result<Bytes, ChannelError> {
        let payload = Bytes::copy_from_slice(&flag.to_u32().to_be_bytes());
        self.push(PayloadType::Flag, payload, now)
    }

    /// The handshake response; bypasses the window like [`Channel::send_flag`].
    pub fn send_handshake_response(
        &mut self,
        response: &HandshakeResponsePayload,
        now: Instant,
    ) -> Result<Bytes, ChannelError> {
        self.push(
            PayloadType::HandshakeResponse,
            Bytes::from(response.to_json()),
            now,
        )
    }

    /// Handles the peer's acknowledgement: the message with that sequence number leaves the
    /// window and its round trip updates the timeout. Returns whether it was outstanding
    /// (an acknowledgement of something already acknowledged changes nothing).
    pub fn on_acknowledge(&mut self, ack: &AcknowledgeContent, now: Instant) -> bool {
        let Some(pos) = self
            .unacked
            .iter()
            .position(|u| u.sequence_number == ack.sequence_number)
        else {
            return false;
        };
        if let Some(u) = self.unacked.remove(pos) {
            // Measured from the first transmission: the plugin's effective behaviour (its resend
            // loop never updates the stored send time). Resent messages thus give long samples,
            // which lengthens the timeout rather than letting it collapse.
            self.update_round_trip(now.saturating_duration_since(u.first_sent));
        }
        true
    }

    fn update_round_trip(&mut self, sample: Duration) {
        let rtt = self.round_trip_time;
        let diff = rtt.abs_diff(sample);
        // variation = 3/4 variation + 1/4 |rtt - sample|; rtt = 7/8 rtt + 1/8 sample.
        self.round_trip_time_variation = (self.round_trip_time_variation * 3 + diff) / 4;
        self.round_trip_time = (rtt * 7 + sample) / 8;
        let spread = (self.round_trip_time_variation * 4).max(CLOCK_GRANULARITY);
        self.retransmission_timeout =
            (self.round_trip_time + spread).min(MAX_RETRANSMISSION_TIMEOUT);
    }

    /// The current retransmission timeout.
    pub fn retransmission_timeout(&self) -> Duration {
        self.retransmission_timeout
    }

    /// The smoothed round trip time.
    pub fn round_trip_time(&self) -> Duration {
        self.round_trip_time
    }

    /// The oldest unacknowledged message whose timeout has passed, if any: its frame to send
    /// again (its send time and resend count are updated). Call it when
    /// [`Channel::next_timeout`] passes; calling it again until `None` resends every expired
    /// message, calling it once per wake resends only the oldest, as the plugin and the agent
    /// do. Nothing is resent while publication is paused.
    pub fn poll_resend(&mut self, now: Instant) -> Result<Option<Bytes>, ChannelError> {
        if self.paused {
            return Ok(None);
        }
        let rto = self.retransmission_timeout;
        let max = self.config.max_resend_attempts;
        for u in self.unacked.iter_mut() {
            if now.saturating_duration_since(u.last_sent) >= rto {
                if u.attempts >= max {
                    return Err(ChannelError::Unacknowledged {
                        sequence_number: u.sequence_number,
                        attempts: u.attempts,
                    });
                }
                u.attempts += 1;
                u.last_sent = now;
                return Ok(Some(u.frame.clone()));
            }
        }
        Ok(None)
    }

    /// When [`Channel::poll_resend`] will next have something to do (`None`: nothing is
    /// outstanding, or publication is paused).
    pub fn next_timeout(&self) -> Option<Instant> {
        if self.paused {
            return None;
        }
        self.unacked
            .iter()
            .map(|u| u.last_sent + self.retransmission_timeout)
            .min()
    }

    /// Every unacknowledged frame, oldest first, marked as sent at `now` (for a fresh
    /// WebSocket after a reconnect: what was in flight on the old one is lost).
    pub fn resend_all(&mut self, now: Instant) -> Vec<Bytes> {
        self.unacked
            .iter_mut()
            .map(|u| {
                u.last_sent = now;
                u.frame.clone()
            })
            .collect()
    }

    // ---- incoming ----

    /// Decodes one binary WebSocket frame and handles it (see [`Channel::on_message`]).
    pub fn on_frame(
        &mut self,
        frame: &[u8],
        now: Instant,
        ready: bool,
    ) -> Result<Incoming, ChannelError> {
        let m = AgentMessage::decode(frame)?;
        self.on_message(m, now, ready)
    }

    fn ack_frame(&mut self, of: &AgentMessage, now: Instant) -> Result<Bytes, ChannelError> {
        let id = (self.ids)()?;
        Ok(AgentMessage::acknowledge(of, self.unix_ms(now), id).encode_bytes())
    }

    /// Handles one decoded message from the agent or the service.
    ///
    /// `ready` is whether the consumer can take more stream bytes now. When it is false, an
    /// `output_stream_data` message carrying stream bytes (`PayloadType::Output`) is neither
    /// delivered, buffered nor acknowledged: the agent resends it later (the plugin and the
    /// agent both leave a message their handler is not ready for unacknowledged). Other
    /// payload types (handshake, flags) are small and always taken.
    ///
    /// An acknowledgement that does not parse is an error; the caller decides whether that
    /// ends the session.
    pub fn on_message(
        &mut self,
        m: AgentMessage,
        now: Instant,
        ready: bool,
    ) -> Result<Incoming, ChannelError> {
        let mut out = Incoming::default();
        match &m.message_type {
            MessageType::OutputStreamData => {
                // The agent clears its own pause on any stream data or acknowledgement.
                self.paused = false;
                self.on_stream_data(m, now, ready, &mut out)?;
            }
            MessageType::Acknowledge => {
                self.paused = false;
                let ack = AcknowledgeContent::from_json(&m.payload)?;
                if self.on_acknowledge(&ack, now) {
                    out.events.push(Event::Acknowledged {
                        sequence_number: ack.sequence_number,
                    });
                }
            }
            MessageType::ChannelClosed => {
                out.events.push(Event::ChannelClosed(
                    ChannelClosed::from_json(&m.payload).ok(),
                ));
            }
            MessageType::PausePublication => {
                self.paused = true;
                out.events.push(Event::PausePublication);
            }
            MessageType::StartPublication => {
                self.paused = false;
                out.events.push(Event::StartPublication);
            }
            other => out.events.push(Event::Ignored(other.clone())),
        }
        Ok(out)
    }

    fn on_stream_data(
        &mut self,
        m: AgentMessage,
        now: Instant,
        ready: bool,
        out: &mut Incoming,
    ) -> Result<(), ChannelError> {
        let seq = m.sequence_number;
        if seq < self.expected_sequence {
            // Already delivered: our acknowledgement was lost. Acknowledge again so the agent
            // stops resending (the agent does this; the plugin stays silent).
            out.transmit.push(self.ack_frame(&m, now)?);
            return Ok(());
        }
        if !ready && m.payload_type == PayloadType::Output {
            return Ok(());
        }
        if seq > self.expected_sequence {
            if self.out_of_order.contains_key(&seq) {
                out.transmit.push(self.ack_frame(&m, now)?);
            } else if self.out_of_order.len() < self.config.max_out_of_order {
                out.transmit.push(self.ack_frame(&m, now)?);
                self.out_of_order.insert(seq, Buffered { message: m });
            }
            // Else: no room; dropped unacknowledged, so it comes again.
            return Ok(());
        }
        out.transmit.push(self.ack_frame(&m, now)?);
        self.expected_sequence += 1;
        out.deliver.push(Delivery {
            sequence_number: seq,
            payload_type: m.payload_type,
            payload: m.payload,
        });
        while let Some(b) = self.out_of_order.remove(&self.expected_sequence) {
            self.expected_sequence += 1;
            out.deliver.push(Delivery {
                sequence_number: b.message.sequence_number,
                payload_type: b.message.payload_type,
                payload: b.message.payload,
            });
        }
        Ok(())
    }

    /// The sequence number of the next incoming message to deliver.
    pub fn expected_sequence_number(&self) -> i64 {
        self.expected_sequence
    }

    /// Out-of-order incoming messages held.
    pub fn buffered(&self) -> usize {
        self.out_of_order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::transport::ssm::test_rng::XorShift;

    fn counter_ids(base: u8) -> impl FnMut() -> Result<[u8; 16], MessageError> + Send {
        let mut n: u64 = 0;
        move || {
            n += 1;
            let mut id = [base; 16];
            id[8..].copy_from_slice(&n.to_be_bytes());
            Ok(id)
        }
    }

    fn channel(config: ChannelConfig, t0: Instant) -> Channel {
        Channel::new(config, t0, 1_700_000_000_000).with_message_ids(counter_ids(0xaa))
    }

    fn out(seq: i64, payload: &[u8]) -> AgentMessage {
        let mut id = [0x55; 16];
        id[8..].copy_from_slice(&(seq as u64).to_be_bytes());
        AgentMessage {
            message_type: MessageType::OutputStreamData,
            schema_version: 1,
            created_date: 1,
            sequence_number: seq,
            flags: 0,
            message_id: id,
            payload_type: PayloadType::Output,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn acked_seq(frame: &Bytes) -> i64 {
        let m = AgentMessage::decode(frame).expect("ack decodes");
        assert_eq!(m.message_type, MessageType::Acknowledge);
        AcknowledgeContent::from_json(&m.payload)
            .expect("ack json")
            .sequence_number
    }

    fn payloads(i: &Incoming) -> Vec<u8> {
        i.deliver.iter().flat_map(|d| d.payload.to_vec()).collect()
    }

    #[test]
    fn in_order_delivery_and_exact_ack_bytes() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        let m = out(0, b"hello");
        let r = c
            .on_message(m.clone(), t0 + Duration::from_millis(5), true)
            .expect("ok");
        assert_eq!(payloads(&r), b"hello");
        assert_eq!(r.deliver[0].payload_type, PayloadType::Output);
        let mut id = [0xaa; 16];
        id[8..].copy_from_slice(&1u64.to_be_bytes());
        let want = AgentMessage::acknowledge(&m, 1_700_000_000_005, id).encode();
        assert_eq!(r.transmit, vec![Bytes::from(want)]);
        assert_eq!(c.expected_sequence_number(), 1);
    }

    #[test]
    fn duplicate_is_reacked_not_redelivered() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        let r = c.on_message(out(0, b"a"), t0, true).expect("ok");
        assert_eq!(payloads(&r), b"a");
        let r = c.on_message(out(0, b"a"), t0, true).expect("ok");
        assert!(r.deliver.is_empty());
        assert_eq!(r.transmit.len(), 1);
        assert_eq!(acked_seq(&r.transmit[0]), 0);
    }

    #[test]
    fn out_of_order_buffered_then_delivered_in_order() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        let r = c.on_message(out(2, b"c"), t0, true).expect("ok");
        assert!(r.deliver.is_empty());
        assert_eq!(acked_seq(&r.transmit[0]), 2);
        let r = c.on_message(out(1, b"b"), t0, true).expect("ok");
        assert!(r.deliver.is_empty());
        // The same future message again: acknowledged again, held once.
        let r = c.on_message(out(2, b"c"), t0, true).expect("ok");
        assert_eq!(r.transmit.len(), 1);
        assert_eq!(c.buffered(), 2);
        let r = c.on_message(out(0, b"a"), t0, true).expect("ok");
        assert_eq!(payloads(&r), b"abc");
        let seqs: Vec<i64> = r.deliver.iter().map(|d| d.sequence_number).collect();
        assert_eq!(seqs, vec![0, 1, 2]);
        assert_eq!(r.transmit.len(), 1); // only the new one; 1 and 2 were acked when held
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn out_of_order_bound_drops_without_ack() {
        let t0 = Instant::now();
        let cfg = ChannelConfig {
            max_out_of_order: 2,
            ..ChannelConfig::default()
        };
        let mut c = channel(cfg, t0);
        assert_eq!(
            c.on_message(out(1, b"b"), t0, true)
                .expect("ok")
                .transmit
                .len(),
            1
        );
        assert_eq!(
            c.on_message(out(2, b"c"), t0, true)
                .expect("ok")
                .transmit
                .len(),
            1
        );
        let r = c.on_message(out(3, b"d"), t0, true).expect("ok");
        assert!(r.transmit.is_empty() && r.deliver.is_empty());
        assert_eq!(c.buffered(), 2);
    }

    #[test]
    fn not_ready_drops_without_ack() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        let r = c.on_message(out(0, b"a"), t0, false).expect("ok");
        assert_eq!(r, Incoming::default());
        let r = c.on_message(out(1, b"b"), t0, false).expect("ok");
        assert_eq!(r, Incoming::default());
        assert_eq!(c.buffered(), 0);
        // Control payloads are taken even when not ready.
        let mut hs = out(
            0,
            br#"{"AgentVersion":"3.3.0.0","RequestedClientActions":[]}"#,
        );
        hs.payload_type = PayloadType::HandshakeRequest;
        let r = c.on_message(hs, t0, false).expect("ok");
        assert_eq!(r.deliver.len(), 1);
        assert_eq!(r.deliver[0].payload_type, PayloadType::HandshakeRequest);
        // Once ready, the resend is delivered.
        let r = c.on_message(out(1, b"b"), t0, true).expect("ok");
        assert_eq!(payloads(&r), b"b");
    }

    #[test]
    fn control_messages_become_events() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        let mut m = out(0, b"");
        m.message_type = MessageType::PausePublication;
        let r = c.on_message(m.clone(), t0, true).expect("ok");
        assert_eq!(r.events, vec![Event::PausePublication]);
        assert!(!c.can_send());
        assert_eq!(c.send_stream(b"x", t0).expect("ok").0, 0);
        m.message_type = MessageType::StartPublication;
        let r = c.on_message(m.clone(), t0, true).expect("ok");
        assert_eq!(r.events, vec![Event::StartPublication]);
        assert!(c.can_send());

        m.message_type = MessageType::ChannelClosed;
        m.payload = Bytes::from_static(br#"{"SessionId":"s-1","Output":"ended"}"#);
        let r = c.on_message(m.clone(), t0, true).expect("ok");
        match &r.events[..] {
            [Event::ChannelClosed(Some(cc))] => assert_eq!(cc.output, "ended"),
            other => panic!("{other:?}"),
        }
        m.message_type = MessageType::InputStreamData;
        let r = c.on_message(m.clone(), t0, true).expect("ok");
        assert_eq!(r.events, vec![Event::Ignored(MessageType::InputStreamData)]);

        m.message_type = MessageType::Acknowledge;
        m.payload = Bytes::from_static(b"not json");
        assert!(matches!(
            c.on_message(m, t0, true),
            Err(ChannelError::Message(MessageError::Json { .. }))
        ));
    }

    #[test]
    fn send_stream_cuts_at_1024_and_numbers_from_zero() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let (n, frames) = c
            .send_stream(&data, t0 + Duration::from_millis(7))
            .expect("ok");
        assert_eq!(n, 2500);
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let m = AgentMessage::decode(f).expect("decodes");
            assert_eq!(m.sequence_number, i as i64);
            assert_eq!(m.message_type, MessageType::InputStreamData);
            assert_eq!(m.payload_type, PayloadType::Output);
            assert_eq!(m.created_date, 1_700_000_000_007);
            assert_eq!(m.flags, 0);
            joined.extend_from_slice(&m.payload);
        }
        assert_eq!(
            AgentMessage::decode(&frames[0]).expect("ok").payload.len(),
            1024
        );
        assert_eq!(joined, data);
        // Flags and the handshake response continue the same sequence.
        let f = c.send_flag(Flag::TerminateSession, t0).expect("ok");
        let m = AgentMessage::decode(&f).expect("ok");
        assert_eq!((m.sequence_number, m.payload_type), (3, PayloadType::Flag));
        assert_eq!(&m.payload[..], &[0, 0, 0, 2]);
        let resp = HandshakeResponsePayload {
            client_version: "1.2.677.0".into(),
            processed_client_actions: vec![],
            errors: vec![],
        };
        let f = c.send_handshake_response(&resp, t0).expect("ok");
        let m = AgentMessage::decode(&f).expect("ok");
        assert_eq!(
            (m.sequence_number, m.payload_type),
            (4, PayloadType::HandshakeResponse)
        );
        assert_eq!(c.in_flight(), 5);
    }

    #[test]
    fn window_backpressure() {
        let t0 = Instant::now();
        let cfg = ChannelConfig {
            max_in_flight: 3,
            ..ChannelConfig::default()
        };
        let mut c = channel(cfg, t0);
        let data = vec![7u8; 5000];
        let (n, frames) = c.send_stream(&data, t0).expect("ok");
        assert_eq!((n, frames.len()), (3072, 3));
        assert!(!c.can_send());
        assert_eq!(c.send_stream(&data, t0).expect("ok"), (0, vec![]));
        let ack = AcknowledgeContent {
            message_type: "input_stream_data".into(),
            message_id: String::new(),
            sequence_number: 1,
            is_sequential_message: true,
        };
        assert!(c.on_acknowledge(&ack, t0));
        assert!(!c.on_acknowledge(&ack, t0));
        assert!(c.can_send());
        let (n, frames) = c.send_stream(&data[3072..], t0).expect("ok");
        assert_eq!((n, frames.len()), (1024, 1));
        assert_eq!(
            AgentMessage::decode(&frames[0])
                .expect("ok")
                .sequence_number,
            3
        );
    }

    fn ack_of(seq: i64) -> AcknowledgeContent {
        AcknowledgeContent {
            message_type: "input_stream_data".into(),
            message_id: String::new(),
            sequence_number: seq,
            is_sequential_message: true,
        }
    }

    #[test]
    fn round_trip_arithmetic() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        assert_eq!(c.retransmission_timeout(), Duration::from_millis(200));
        assert_eq!(c.round_trip_time(), Duration::from_millis(100));

        // Sample 100 ms = the initial estimate: variation 0, so the 10 ms floor applies.
        c.send_stream(b"a", t0).expect("ok");
        c.on_acknowledge(&ack_of(0), t0 + Duration::from_millis(100));
        assert_eq!(c.round_trip_time(), Duration::from_millis(100));
        assert_eq!(c.retransmission_timeout(), Duration::from_millis(110));

        // Sample 180 ms: variation = 0·3/4 + 80/4 = 20 ms; rtt = (700 + 180)/8 = 110 ms;
        // timeout = 110 + 4·20 = 190 ms.
        c.send_stream(b"b", t0).expect("ok");
        c.on_acknowledge(&ack_of(1), t0 + Duration::from_millis(180));
        assert_eq!(c.round_trip_time(), Duration::from_millis(110));
        assert_eq!(c.retransmission_timeout(), Duration::from_millis(190));

        // A huge sample: capped at 1 s.
        c.send_stream(b"c", t0).expect("ok");
        c.on_acknowledge(&ack_of(2), t0 + Duration::from_secs(20));
        assert_eq!(c.retransmission_timeout(), Duration::from_secs(1));
    }

    #[test]
    fn resend_after_timeout_and_next_timeout() {
        let t0 = Instant::now();
        let mut c = channel(ChannelConfig::default(), t0);
        assert_eq!(c.next_timeout(), None);
        let (_, frames) = c.send_stream(b"abc", t0).expect("ok");
        assert_eq!(c.next_timeout(), Some(t0 + Duration::from_millis(200)));
        assert_eq!(
            c.poll_resend(t0 + Duration::from_millis(199)).expect("ok"),
            None
        );
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(c.poll_resend(t1).expect("ok"), Some(frames[0].clone()));
        assert_eq!(c.poll_resend(t1).expect("ok"), None);
        assert_eq!(c.next_timeout(), Some(t1 + Duration::from_millis(200)));
        // After a reconnect everything outstanding goes again.
        assert_eq!(c.resend_all(t1), frames);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let t0 = Instant::now();
        let cfg = ChannelConfig {
            max_resend_attempts: 3,
            ..ChannelConfig::default()
        };
        let mut c = channel(cfg, t0);
        c.send_stream(b"abc", t0).expect("ok");
        let mut t = t0;
        for _ in 0..3 {
            t += Duration::from_millis(200);
            assert!(c.poll_resend(t).expect("ok").is_some());
        }
        t += Duration::from_millis(200);
        let e = c.poll_resend(t).unwrap_err();
        assert_eq!(
            e,
            ChannelError::Unacknowledged {
                sequence_number: 0,
                attempts: 3
            }
        );
        assert!(e.to_string().contains("stopped acknowledging"), "{e}");
        assert_eq!(MAX_RESEND_ATTEMPTS, 3000);
    }

    /// A sender channel's frames cross a lossy, duplicating, reordering link to a receiver
    /// channel (acting as the agent would: `output_stream_data` in, acks back); the sender
    /// resends on its timer. The receiver must deliver exactly the original bytes.
    #[test]
    fn randomized_lossy_link_delivers_exactly() {
        for seed in 1..=20u64 {
            let mut r = XorShift::new(0x9e37_79b9_7f4a_7c15 ^ seed);
            let t0 = Instant::now();
            let cfg = ChannelConfig {
                max_in_flight: 16,
                max_out_of_order: 8,
                ..ChannelConfig::default()
            };
            let mut sender = channel(cfg, t0);
            let mut receiver = Channel::new(cfg, t0, 0).with_message_ids(counter_ids(0xbb));
            let data: Vec<u8> = (0..40_000).map(|_| r.next() as u8).collect();
            let mut offset = 0;
            let mut now = t0;
            let mut first_sent = std::collections::HashSet::new();
            // (deliver_at, frame)
            let mut link: Vec<(Instant, Bytes)> = Vec::new();
            let mut acks: Vec<(Instant, Bytes)> = Vec::new();
            let mut got = Vec::new();
            let mut steps = 0;
            let (mut resends, mut max_buffered, mut duplicates) = (0u32, 0usize, 0u32);
            while got.len() < data.len() {
                steps += 1;
                assert!(steps < 200_000, "seed {seed}: no progress");
                // Sender: new data, in random-sized reads.
                if offset < data.len() && sender.can_send() {
                    let want = 1 + r.below(3000) as usize;
                    let end = (offset + want).min(data.len());
                    let (n, frames) = sender.send_stream(&data[offset..end], now).expect("ok");
                    offset += n;
                    for f in frames {
                        let seq = AgentMessage::decode(&f).expect("ok").sequence_number;
                        // First transmissions are dropped at random; resends are not.
                        if first_sent.insert(seq) && r.below(5) == 0 {
                            continue;
                        }
                        let delay = Duration::from_millis(5 + r.below(60));
                        link.push((now + delay, f.clone()));
                        if r.below(8) == 0 {
                            duplicates += 1;
                            link.push((now + delay + Duration::from_millis(r.below(90)), f));
                        }
                    }
                }
                while let Some(f) = sender.poll_resend(now).expect("sender alive") {
                    resends += 1;
                    link.push((now + Duration::from_millis(5 + r.below(60)), f));
                }
                // Link → receiver, in delivery-time order (random delays reorder).
                link.sort_by_key(|(t, _)| *t);
                while link.first().is_some_and(|(t, _)| *t <= now) {
                    let (_, f) = link.remove(0);
                    // Rewrite as agent output (the receiver is a client channel).
                    let mut m = AgentMessage::decode(&f).expect("ok");
                    m.message_type = MessageType::OutputStreamData;
                    let ready = r.below(10) != 0;
                    let inc = receiver.on_message(m, now, ready).expect("ok");
                    max_buffered = max_buffered.max(receiver.buffered());
                    for d in inc.deliver {
                        got.extend_from_slice(&d.payload);
                    }
                    for a in inc.transmit {
                        acks.push((now + Duration::from_millis(5 + r.below(60)), a));
                    }
                }
                acks.sort_by_key(|(t, _)| *t);
                while acks.first().is_some_and(|(t, _)| *t <= now) {
                    let (_, a) = acks.remove(0);
                    // Acks may be lost too; the duplicate re-ack covers it.
                    if r.below(10) == 0 {
                        continue;
                    }
                    sender.on_frame(&a, now, true).expect("ok");
                }
                now += Duration::from_millis(1 + r.below(20));
            }
            assert_eq!(got, data, "seed {seed}");
            assert!(
                resends > 0 && duplicates > 0 && max_buffered > 0,
                "seed {seed}: resends {resends}, duplicates {duplicates}, buffered {max_buffered}"
            );
        }
    }
}
