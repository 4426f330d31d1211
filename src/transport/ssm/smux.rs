//! smux v1 (github.com/xtaci/smux), the multiplexing the agent runs over one port forwarding
//! session, with no I/O.
//!
//! When the handshake response's `ClientVersion` is at least 1.1.70, the agent treats the
//! session's stream bytes (the payloads of `output_stream_data` / `input_stream_data` messages
//! with payload type `Output`) as one byte stream carrying smux frames, and it acts as the smux
//! *server*: every client stream it accepts becomes one TCP connection to the target. Frames
//! ride in the stream regardless of message boundaries: one message may hold several frames or
//! a piece of one, so the decoder takes arbitrary chunks.
//!
//! A frame is an 8-byte header, then `length` bytes of data:
//!
//! ```text
//! offset  size  field
//!      0     1  version    1
//!      1     1  cmd        SYN 0 (open), FIN 1 (close), PSH 2 (data), NOP 3 (keepalive)
//!      2     2  length     LITTLE-endian, bytes of data after the header
//!      4     4  stream id  LITTLE-endian
//!      8     …  data       PSH only; SYN, FIN and NOP carry none
//! ```
//!
//! The client opens streams with odd ids 3, 5, 7, … (xtaci/smux starts a client's counter at
//! 1 and adds 2 before each open; a server's would be even). The agent uses smux's default
//! configuration: version 1, frames of at most 32 KiB, keepalive off for clients newer than
//! 1.2.331.0 (see `message::CLIENT_VERSION`). In v1 a FIN ends a stream: the agent sends one
//! when the target connection closes (and after a `ConnectToPortError` flag), and closes the
//! target connection when it receives one.
//!
//! Confirmed against xtaci/smux `frame.go`, `session.go`, `mux.go`, aws/amazon-ssm-agent
//! `agent/session/plugins/port/port_mux.go` (smux v1.5.15) and aws/session-manager-plugin
//! `src/sessionmanagerplugin/session/portsession/muxportforwarding.go`.

// wired into the hop by ssm/mod.rs

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version the agent speaks.
pub const VERSION: u8 = 1;
/// Bytes of a frame header.
pub const HEADER_SIZE: usize = 8;
/// Largest data per frame keyhole sends (smux `DefaultConfig().MaxFrameSize`).
pub const MAX_FRAME_SIZE: usize = 32768;

/// A frame command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmd {
    Syn,
    Fin,
    Psh,
    Nop,
}

impl Cmd {
    pub fn to_u8(self) -> u8 {
        match self {
            Cmd::Syn => 0,
            Cmd::Fin => 1,
            Cmd::Psh => 2,
            Cmd::Nop => 3,
        }
    }

    /// `None` for anything else, including v2's UPD (4), which v1 rejects.
    pub fn from_u8(v: u8) -> Option<Cmd> {
        match v {
            0 => Some(Cmd::Syn),
            1 => Some(Cmd::Fin),
            2 => Some(Cmd::Psh),
            3 => Some(Cmd::Nop),
            _ => None,
        }
    }
}

/// Protocol errors. Any of them ends the session, as in smux.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmuxError {
    #[error("smux frame has version {0}, expected 1")]
    BadVersion(u8),
    #[error("smux frame has unknown command {0}")]
    UnknownCmd(u8),
    #[error("smux {cmd:?} frame carries {length} bytes of data, expected none")]
    ControlWithData { cmd: Cmd, length: u16 },
    #[error("smux frame data of {0} bytes exceeds the 65535-byte limit")]
    FrameTooLarge(usize),
    #[error("smux stream ids exhausted")]
    StreamIdsExhausted,
    #[error("smux stream {0} is not open")]
    NotOpen(u32),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub cmd: Cmd,
    pub stream_id: u32,
    pub data: Bytes,
}

/// Encodes one frame. `data` must fit in the u16 length field.
pub fn encode_frame(cmd: Cmd, stream_id: u32, data: &[u8]) -> Result<Bytes, SmuxError> {
    let length = u16::try_from(data.len()).map_err(|_| SmuxError::FrameTooLarge(data.len()))?;
    let mut b = BytesMut::with_capacity(HEADER_SIZE + data.len());
    b.put_u8(VERSION);
    b.put_u8(cmd.to_u8());
    b.put_u16_le(length);
    b.put_u32_le(stream_id);
    b.put_slice(data);
    Ok(b.freeze())
}

fn control_frame(cmd: Cmd, stream_id: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_SIZE);
    b.put_u8(VERSION);
    b.put_u8(cmd.to_u8());
    b.put_u16_le(0);
    b.put_u32_le(stream_id);
    b.freeze()
}

/// Reassembles frames from chunks of the byte stream, split anywhere.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Appends a chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed. The header is checked as
    /// soon as it is complete, before its data arrives.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SmuxError> {
        if self.buf.len() < HEADER_SIZE {
            return Ok(None);
        }
        let version = self.buf[0];
        if version != VERSION {
            return Err(SmuxError::BadVersion(version));
        }
        let cmd = Cmd::from_u8(self.buf[1]).ok_or(SmuxError::UnknownCmd(self.buf[1]))?;
        let length = u16::from_le_bytes([self.buf[2], self.buf[3]]);
        if cmd != Cmd::Psh && length != 0 {
            return Err(SmuxError::ControlWithData { cmd, length });
        }
        let stream_id = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
        let total = HEADER_SIZE + length as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        self.buf.advance(HEADER_SIZE);
        let data = self.buf.split_to(length as usize).freeze();
        Ok(Some(Frame {
            cmd,
            stream_id,
            data,
        }))
    }
}

/// What the peer said, per frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MuxEvent {
    /// Data for an open stream.
    Data(u32, Bytes),
    /// The peer closed the stream (the target connection ended or could not be made).
    Fin(u32),
    /// The peer tried to open a stream. The agent never does; a client ignores it (answer with
    /// [`Mux::refuse`] if you want the peer to know).
    Syn(u32),
    /// A keepalive.
    Nop,
}

#[derive(Debug, Default, Clone, Copy)]
struct StreamState {
    local_fin: bool,
    remote_fin: bool,
}

/// The client side of smux v1, with no I/O: it numbers streams, frames outgoing data and
/// turns incoming bytes into [`MuxEvent`]s. Frames it returns go into the channel's stream
/// data in order.
#[derive(Debug)]
pub struct Mux {
    /// The last id handed out (smux starts a client at 1 and adds 2 before each open).
    last_id: u32,
    max_frame_size: usize,
    streams: HashMap<u32, StreamState>,
    decoder: FrameDecoder,
}

impl Default for Mux {
    fn default() -> Self {
        Mux::new()
    }
}

impl Mux {
    pub fn new() -> Self {
        Mux::with_max_frame_size(MAX_FRAME_SIZE)
    }

    /// A mux cutting data into frames of at most `max_frame_size` bytes (1..=65535).
    pub fn with_max_frame_size(max_frame_size: usize) -> Self {
        Mux {
            last_id: 1,
            max_frame_size: max_frame_size.clamp(1, u16::MAX as usize),
            streams: HashMap::new(),
            decoder: FrameDecoder::new(),
        }
    }

    /// Opens a stream: its id and the SYN frame to send.
    pub fn open(&mut self) -> Result<(u32, Bytes), SmuxError> {
        let id = self
            .last_id
            .checked_add(2)
            .ok_or(SmuxError::StreamIdsExhausted)?;
        self.last_id = id;
        self.streams.insert(id, StreamState::default());
        Ok((id, control_frame(Cmd::Syn, id)))
    }

    /// PSH frames carrying `data` on `stream_id`, each at most the max frame size.
    pub fn write(&mut self, stream_id: u32, data: &[u8]) -> Result<Vec<Bytes>, SmuxError> {
        match self.streams.get(&stream_id) {
            Some(s) if !s.local_fin => {}
            _ => return Err(SmuxError::NotOpen(stream_id)),
        }
        data.chunks(self.max_frame_size)
            .map(|c| encode_frame(Cmd::Psh, stream_id, c))
            .collect()
    }

    /// The FIN frame closing `stream_id` from our side. The stream is forgotten once both
    /// sides have sent FIN.
    pub fn finish(&mut self, stream_id: u32) -> Result<Bytes, SmuxError> {
        let s = match self.streams.get_mut(&stream_id) {
            Some(s) if !s.local_fin => s,
            _ => return Err(SmuxError::NotOpen(stream_id)),
        };
        s.local_fin = true;
        if s.remote_fin {
            self.streams.remove(&stream_id);
        }
        Ok(control_frame(Cmd::Fin, stream_id))
    }

    /// A FIN for a stream the peer opened (or any id), without tracking it.
    pub fn refuse(&self, stream_id: u32) -> Bytes {
        control_frame(Cmd::Fin, stream_id)
    }

    /// A NOP frame (keepalive; only needed when the agent runs smux keepalive, i.e. for
    /// clients reporting a version ≤ 1.2.331.0).
    pub fn nop(&self) -> Bytes {
        control_frame(Cmd::Nop, 0)
    }

    /// Whether `stream_id` is open for writing.
    pub fn is_writable(&self, stream_id: u32) -> bool {
        self.streams.get(&stream_id).is_some_and(|s| !s.local_fin)
    }

    /// Streams not yet closed by both sides.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Feeds stream bytes from the channel; returns what the whole frames in them said.
    /// Data for a stream that is not open (never opened, or already closed by the peer) is
    /// dropped, as smux does. A protocol error ends the session.
    pub fn on_bytes(&mut self, bytes: &[u8]) -> Result<Vec<MuxEvent>, SmuxError> {
        self.decoder.push(bytes);
        let mut events = Vec::new();
        while let Some(f) = self.decoder.next_frame()? {
            match f.cmd {
                Cmd::Nop => events.push(MuxEvent::Nop),
                Cmd::Syn => events.push(MuxEvent::Syn(f.stream_id)),
                Cmd::Psh => {
                    let open = self
                        .streams
                        .get(&f.stream_id)
                        .is_some_and(|s| !s.remote_fin);
                    if open && !f.data.is_empty() {
                        events.push(MuxEvent::Data(f.stream_id, f.data));
                    }
                }
                Cmd::Fin => {
                    if let Some(s) = self.streams.get_mut(&f.stream_id) {
                        if !s.remote_fin {
                            s.remote_fin = true;
                            events.push(MuxEvent::Fin(f.stream_id));
                        }
                        if s.local_fin {
                            self.streams.remove(&f.stream_id);
                        }
                    }
                }
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::transport::ssm::test_rng::XorShift;

    #[test]
    fn frame_bytes_are_little_endian() {
        let f = encode_frame(Cmd::Psh, 0x0102_0304, b"hi").expect("fits");
        assert_eq!(&f[..], &[1, 2, 2, 0, 0x04, 0x03, 0x02, 0x01, b'h', b'i']);
        let big = vec![0u8; 0x1234];
        let f = encode_frame(Cmd::Psh, 3, &big).expect("fits");
        assert_eq!(&f[..8], &[1, 2, 0x34, 0x12, 3, 0, 0, 0]);
        assert_eq!(
            encode_frame(Cmd::Psh, 3, &vec![0u8; 65536]),
            Err(SmuxError::FrameTooLarge(65536))
        );
        assert_eq!(&Mux::new().nop()[..], &[1, 3, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn open_write_finish() {
        let mut m = Mux::new();
        let (a, syn) = m.open().expect("open");
        assert_eq!(a, 3);
        assert_eq!(&syn[..], &[1, 0, 0, 0, 3, 0, 0, 0]);
        let (b, _) = m.open().expect("open");
        assert_eq!(b, 5);

        let data: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let frames = m.write(a, &data).expect("write");
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].len(), HEADER_SIZE + 32768);
        assert_eq!(&frames[0][..8], &[1, 2, 0x00, 0x80, 3, 0, 0, 0]);
        assert_eq!(frames[2].len(), HEADER_SIZE + 70_000 - 65536);
        let mut dec = FrameDecoder::new();
        let mut joined = Vec::new();
        for f in &frames {
            dec.push(f);
        }
        while let Some(f) = dec.next_frame().expect("valid") {
            assert_eq!((f.cmd, f.stream_id), (Cmd::Psh, 3));
            joined.extend_from_slice(&f.data);
        }
        assert_eq!(joined, data);

        let fin = m.finish(a).expect("fin");
        assert_eq!(&fin[..], &[1, 1, 0, 0, 3, 0, 0, 0]);
        assert_eq!(m.write(a, b"x"), Err(SmuxError::NotOpen(3)));
        assert_eq!(m.finish(a), Err(SmuxError::NotOpen(3)));
        assert_eq!(m.write(7, b"x"), Err(SmuxError::NotOpen(7)));
        assert_eq!(m.stream_count(), 2);
        // The peer's FIN completes the close.
        let ev = m.on_bytes(&[1, 1, 0, 0, 3, 0, 0, 0]).expect("ok");
        assert_eq!(ev, vec![MuxEvent::Fin(3)]);
        assert_eq!(m.stream_count(), 1);
    }

    #[test]
    fn incoming_events() {
        let mut m = Mux::new();
        let (a, _) = m.open().expect("open");
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&encode_frame(Cmd::Psh, a, b"pong").expect("fits"));
        bytes.extend_from_slice(&encode_frame(Cmd::Psh, 99, b"stray").expect("fits"));
        bytes.extend_from_slice(&encode_frame(Cmd::Psh, a, b"").expect("fits"));
        bytes.extend_from_slice(&encode_frame(Cmd::Nop, 0, b"").expect("fits"));
        bytes.extend_from_slice(&encode_frame(Cmd::Syn, 2, b"").expect("fits"));
        bytes.extend_from_slice(&encode_frame(Cmd::Fin, a, b"").expect("fits"));
        bytes.extend_from_slice(&encode_frame(Cmd::Psh, a, b"late").expect("fits"));
        let ev = m.on_bytes(&bytes).expect("ok");
        assert_eq!(
            ev,
            vec![
                MuxEvent::Data(a, Bytes::from_static(b"pong")),
                MuxEvent::Nop,
                MuxEvent::Syn(2),
                MuxEvent::Fin(a),
            ]
        );
        // Remote closed, local still open: writes are still allowed until finish.
        assert!(m.is_writable(a));
        m.finish(a).expect("fin");
        assert_eq!(m.stream_count(), 0);
        assert_eq!(&m.refuse(2)[..], &[1, 1, 0, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn protocol_errors() {
        let mut d = FrameDecoder::new();
        d.push(&[1, 4, 0, 0, 1, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(SmuxError::UnknownCmd(4)));
        let mut d = FrameDecoder::new();
        d.push(&[2, 2, 0, 0, 1, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(SmuxError::BadVersion(2)));
        let mut d = FrameDecoder::new();
        d.push(&[1, 1, 5, 0, 1, 0, 0, 0]);
        let e = d.next_frame().unwrap_err();
        assert_eq!(
            e,
            SmuxError::ControlWithData {
                cmd: Cmd::Fin,
                length: 5
            }
        );
        assert!(e.to_string().contains("expected none"), "{e}");
        let mut m = Mux::new();
        assert_eq!(
            m.on_bytes(&[1, 9, 0, 0, 0, 0, 0, 0]),
            Err(SmuxError::UnknownCmd(9))
        );
        assert!(SmuxError::UnknownCmd(9)
            .to_string()
            .contains("unknown command 9"));
    }

    #[test]
    fn stream_ids_exhaust() {
        let mut m = Mux::new();
        m.last_id = u32::MAX - 2;
        assert_eq!(m.open().expect("last").0, u32::MAX);
        assert_eq!(m.open(), Err(SmuxError::StreamIdsExhausted));
    }

    #[test]
    fn decoder_across_random_chunk_boundaries() {
        let mut r = XorShift::new(0xfeed_beef);
        for _ in 0..200 {
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for _ in 0..(1 + r.below(20)) {
                let cmd = [Cmd::Syn, Cmd::Fin, Cmd::Psh, Cmd::Nop][r.below(4) as usize];
                let sid = r.next() as u32;
                let data: Vec<u8> = if cmd == Cmd::Psh {
                    (0..r.below(5000)).map(|_| r.next() as u8).collect()
                } else {
                    Vec::new()
                };
                wire.extend_from_slice(&encode_frame(cmd, sid, &data).expect("fits"));
                want.push(Frame {
                    cmd,
                    stream_id: sid,
                    data: Bytes::from(data),
                });
            }
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                // Chunks of 0..=1100 bytes, like 1024-byte stream messages and smaller.
                let n = (r.below(1101) as usize).min(wire.len() - at);
                dec.push(&wire[at..at + n]);
                at += n;
                while let Some(f) = dec.next_frame().expect("valid") {
                    got.push(f);
                }
            }
            assert_eq!(got, want);
            assert_eq!(dec.pending(), 0);
        }
    }
}
