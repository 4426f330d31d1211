//! The IAP relay's subprotocol (`relay.tunnel.cloudproxy.app`), with no I/O.
//!
//! Every WebSocket binary message carries frames that start with a
//! big-endian u16 tag:
//!
//! | tag | frame | body |
//! |---|---|---|
//! | `0x0001` | connect success | u32 length, the session id |
//! | `0x0002` | reconnect success | u64: bytes the relay had received |
//! | `0x0004` | data | u32 length, at most 16 KiB of stream bytes |
//! | `0x0007` | ack | u64: stream bytes received in all |
//!
//! Acks count bytes, not frames: each side acknowledges the total it has
//! received, so after a reconnect the sender resends what the other side
//! never acknowledged.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const TAG_CONNECT_SUCCESS: u16 = 0x0001;
pub const TAG_RECONNECT_SUCCESS: u16 = 0x0002;
pub const TAG_DATA: u16 = 0x0004;
pub const TAG_ACK: u16 = 0x0007;
/// The most stream bytes one data frame carries.
pub const MAX_DATA: usize = 16 * 1024;
/// The longest session id keyhole accepts.
const MAX_SID: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The relay reached the VM's port; the id lets a broken stream resume.
    ConnectSuccess {
        sid: Bytes,
    },
    /// A resumed stream: how many bytes the relay had received from us.
    ReconnectSuccess {
        received: u64,
    },
    Data(Bytes),
    /// The relay has received this many bytes from us, in all.
    Ack(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame ends inside its {0}")]
    Truncated(&'static str),
    #[error("unknown frame tag {0:#06x}")]
    UnknownTag(u16),
    #[error("a data frame of {0} bytes (the most is 16384)")]
    DataTooLarge(usize),
    #[error("a session id of {0} bytes")]
    SidTooLong(usize),
}

/// Every frame in one message, in order.
pub fn decode(message: Bytes) -> Result<Vec<Frame>, FrameError> {
    let mut rest = message;
    let mut frames = Vec::with_capacity(1);
    while rest.has_remaining() {
        if rest.len() < 2 {
            return Err(FrameError::Truncated("tag"));
        }
        let tag = rest.get_u16();
        let frame = match tag {
            TAG_CONNECT_SUCCESS => {
                let sid =
                    length_prefixed(&mut rest, "session id", MAX_SID).map_err(|e| match e {
                        FrameError::DataTooLarge(n) => FrameError::SidTooLong(n),
                        other => other,
                    })?;
                Frame::ConnectSuccess { sid }
            }
            TAG_RECONNECT_SUCCESS => Frame::ReconnectSuccess {
                received: u64_of(&mut rest, "reconnect acknowledgement")?,
            },
            TAG_DATA => Frame::Data(length_prefixed(&mut rest, "data", MAX_DATA)?),
            TAG_ACK => Frame::Ack(u64_of(&mut rest, "acknowledgement")?),
            other => return Err(FrameError::UnknownTag(other)),
        };
        frames.push(frame);
    }
    Ok(frames)
}

fn u64_of(rest: &mut Bytes, what: &'static str) -> Result<u64, FrameError> {
    if rest.len() < 8 {
        return Err(FrameError::Truncated(what));
    }
    Ok(rest.get_u64())
}

fn length_prefixed(rest: &mut Bytes, what: &'static str, max: usize) -> Result<Bytes, FrameError> {
    if rest.len() < 4 {
        return Err(FrameError::Truncated(what));
    }
    let len = rest.get_u32() as usize;
    if len > max {
        return Err(FrameError::DataTooLarge(len));
    }
    if rest.len() < len {
        return Err(FrameError::Truncated(what));
    }
    Ok(rest.split_to(len))
}

/// A data frame for at most [`MAX_DATA`] bytes, written into `out`.
pub fn encode_data(data: &[u8], out: &mut BytesMut) {
    debug_assert!(data.len() <= MAX_DATA);
    out.reserve(6 + data.len());
    out.put_u16(TAG_DATA);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

pub fn encode_ack(received: u64) -> [u8; 10] {
    let mut frame = [0u8; 10];
    frame[..2].copy_from_slice(&TAG_ACK.to_be_bytes());
    frame[2..].copy_from_slice(&received.to_be_bytes());
    frame
}

/// What an IAP close code means, for the error a user sees (IAP Desktop's
/// and gcloud's tables).
pub fn close_meaning(code: u16) -> &'static str {
    match code {
        1000 => "normal closure",
        1006 => "the connection dropped",
        1011 => "the relay hit an internal error",
        4000 => "internal error in the relay",
        4001 => "invalid or expired session id",
        4002 => "the relay saw an invalid message",
        4003 => "IAP could not connect to the VM's port (is the port open, and does the firewall allow 35.235.240.0/20?)",
        4004 => "reauthentication required",
        4005 => "the VM is unavailable",
        4006 => "bad acknowledgement",
        4007 => "invalid message length",
        4008 => "invalid frame tag",
        4009 => "the session expired",
        4010 => "the VM's port closed the connection",
        4013 => "a frame was too large",
        4033 => "not authorized: the credentials need roles/iap.tunnelResourceAccessor on the VM (iap.tunnelInstances.accessViaIAP)",
        4047 => "instance not found (check the project, zone and name)",
        4051 => "the instance has no interface of that name",
        4074 => "the IAP tunnel is not enabled for this target",
        _ => "unexpected close",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_byte_for_byte() {
        let mut message = vec![0x00, 0x01, 0, 0, 0, 3, b's', b'i', b'd'];
        message.extend([0x00, 0x04, 0, 0, 0, 2, 0xAB, 0xCD]);
        message.extend([0x00, 0x07, 0, 0, 0, 0, 0, 0, 0x01, 0x00]);
        message.extend([0x00, 0x02, 0, 0, 0, 0, 0, 0, 0, 9]);
        let frames = decode(Bytes::from(message)).expect("valid");
        assert_eq!(
            frames,
            vec![
                Frame::ConnectSuccess {
                    sid: Bytes::from_static(b"sid")
                },
                Frame::Data(Bytes::from_static(&[0xAB, 0xCD])),
                Frame::Ack(256),
                Frame::ReconnectSuccess { received: 9 },
            ]
        );
    }

    #[test]
    fn frames_are_written_byte_for_byte() {
        let mut out = BytesMut::new();
        encode_data(b"hi", &mut out);
        assert_eq!(&out[..], &[0x00, 0x04, 0, 0, 0, 2, b'h', b'i']);
        assert_eq!(
            encode_ack(0x0102_0304_0506_0708),
            [0x00, 0x07, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn malformed_frames_are_refused_with_what_is_wrong() {
        let err = |bytes: &[u8]| decode(Bytes::copy_from_slice(bytes)).expect_err("malformed");
        assert_eq!(err(&[0x00]), FrameError::Truncated("tag"));
        assert_eq!(err(&[0x00, 0x09]), FrameError::UnknownTag(9));
        assert_eq!(
            err(&[0x00, 0x04, 0, 0, 0, 5, 1]),
            FrameError::Truncated("data")
        );
        assert_eq!(
            err(&[0x00, 0x07, 0, 0]),
            FrameError::Truncated("acknowledgement")
        );
        assert_eq!(
            err(&[0x00, 0x04, 0, 0, 0x40, 0x01]),
            FrameError::DataTooLarge(16385)
        );
        assert_eq!(
            err(&[0x00, 0x01, 0, 1, 0, 0]),
            FrameError::SidTooLong(65536)
        );
    }

    #[test]
    fn every_data_size_round_trips() {
        for len in [0, 1, 1024, MAX_DATA] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = BytesMut::new();
            encode_data(&data, &mut out);
            assert_eq!(
                decode(out.freeze()).expect("valid"),
                vec![Frame::Data(Bytes::from(data))]
            );
        }
    }
}
