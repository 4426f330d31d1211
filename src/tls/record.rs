//! The TLS record layer after the handshake, sans I/O: seal and open
//! records in place in the caller's buffer.
//!
//! rustls does the handshake (and with it every check that makes the
//! connection trustworthy); then, through its kernel-connection API (the
//! interface it offers for kernel TLS and other external record layers), it
//! hands over the negotiated traffic keys. From there a record costs one
//! AEAD pass over bytes that stay where the socket read put them: no copy
//! into a library buffer, no allocation per record. (rustls 0.23's own
//! unbuffered reader still copies each record into a fresh `Vec`.)
//!
//! Formats (RFC 8446 §5.2, RFC 5246 §6.2.3.3, RFC 5288, RFC 7905):
//! - TLS 1.3: `17 03 03 len | AEAD(plaintext ‖ content type ‖ zero padding)`,
//!   nonce = IV ⊕ sequence number, additional data = the 5-byte header.
//! - TLS 1.2 AES-GCM: `type 03 03 len | explicit nonce (8) ‖ AEAD(plaintext)`,
//!   nonce = salt (IV[0..4]) ‖ explicit nonce; additional data = sequence
//!   number ‖ type ‖ version ‖ plaintext length. keyhole sends IV[4..12] ⊕
//!   sequence number as its explicit nonce, as rustls does.
//! - TLS 1.2 ChaCha20-Poly1305: `type 03 03 len | AEAD(plaintext)`, nonce =
//!   IV ⊕ sequence number, additional data as for AES-GCM.

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

use crate::splice::buffer::Room;

pub const HEADER_LEN: usize = 5;
/// The largest plaintext one record carries (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// The largest record body a peer may send: TLS 1.3 allows 256 bytes of
/// expansion, TLS 1.2 2048.
pub const MAX_BODY: usize = MAX_PLAINTEXT + 2048;
const TAG_LEN: usize = 16;
const EXPLICIT_NONCE_LEN: usize = 8;

/// Content types (RFC 8446 §5.1).
pub mod content {
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the server sent a record of {0} bytes, more than TLS allows")]
    Oversized(usize),
    #[error("the server sent a record with {0} bytes of plaintext, more than the 16384 TLS allows (record_overflow)")]
    Overflow(usize),
    #[error("the server sent a record that does not decrypt (bad_record_mac): corrupted or tampered with in transit")]
    BadMac,
    #[error("the server sent an unprotected record of type {0} after the handshake")]
    Unprotected(u8),
    #[error("the server sent a record with no content type")]
    NoContentType,
    #[error("keyhole does not support the negotiated cipher suite for its record layer")]
    UnsupportedSuite,
    #[error("the connection has sent as many records as its keys may protect")]
    KeysExhausted,
}

/// One direction's key, IV and sequence number.
pub struct DirectionKeys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl DirectionKeys {
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<DirectionKeys, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(DirectionKeys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn is_gcm(&self) -> bool {
        self.key.algorithm() != &aead::CHACHA20_POLY1305
    }
}

/// What a record held, once opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub content_type: u8,
    /// Where the plaintext now is, within the record's bytes.
    pub payload: Range<usize>,
}

/// The record layer of one connection: how it frames, and its keys.
pub struct RecordLayer {
    tls13: bool,
    pub rx: DirectionKeys,
    pub tx: DirectionKeys,
}

impl RecordLayer {
    pub fn new(
        version: ProtocolVersion,
        rx: DirectionKeys,
        tx: DirectionKeys,
    ) -> Result<RecordLayer, RecordError> {
        let tls13 = match version {
            ProtocolVersion::TLSv1_3 => true,
            ProtocolVersion::TLSv1_2 => false,
            _ => return Err(RecordError::UnsupportedSuite),
        };
        Ok(RecordLayer { tls13, rx, tx })
    }

    pub fn is_tls13(&self) -> bool {
        self.tls13
    }

    /// Room a plaintext segment needs to be sealed in place.
    pub fn room(&self) -> Room {
        let (head, tail) = if self.tls13 {
            (HEADER_LEN, 1 + TAG_LEN)
        } else if self.tx.is_gcm() {
            (HEADER_LEN + EXPLICIT_NONCE_LEN, TAG_LEN)
        } else {
            (HEADER_LEN, TAG_LEN)
        };
        Room {
            head,
            tail,
            max: MAX_PLAINTEXT,
        }
    }

    /// The length of the record starting at `bytes[0]`, once its header has
    /// arrived. Errors on a record longer than TLS permits.
    pub fn record_len(bytes: &[u8]) -> Result<Option<usize>, RecordError> {
        if bytes.len() < HEADER_LEN {
            return Ok(None);
        }
        let body = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        if body > MAX_BODY {
            return Err(RecordError::Oversized(body));
        }
        Ok(Some(HEADER_LEN + body))
    }

    /// Opens the one whole record in `record` in place.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let outer = record[0];
        let body_len = record.len() - HEADER_LEN;
        let keys = &mut self.rx;
        let opened = if self.tls13 {
            if outer != content::APPLICATION_DATA {
                return Err(RecordError::Unprotected(outer));
            }
            if body_len > MAX_PLAINTEXT + 256 {
                return Err(RecordError::Oversized(body_len));
            }
            if body_len <= TAG_LEN {
                return Err(RecordError::BadMac);
            }
            let nonce = Nonce::assume_unique_for_key(keys.nonce());
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&record[..HEADER_LEN]);
            let inner = keys
                .key
                .open_in_place(nonce, Aad::from(header), &mut record[HEADER_LEN..])
                .map_err(|_| RecordError::BadMac)?;
            // RFC 8446 section 5.4: with its padding, at most 2^14 + 1 bytes.
            // (Reported without the content type byte, as the plaintext the
            // check below would have found in a record without padding.)
            if inner.len() > MAX_PLAINTEXT + 1 {
                return Err(RecordError::Overflow(inner.len() - 1));
            }
            // The content type is the last non-zero byte; zeros after it are padding.
            let end = inner
                .iter()
                .rposition(|&b| b != 0)
                .ok_or(RecordError::NoContentType)?;
            Opened {
                content_type: inner[end],
                payload: HEADER_LEN..HEADER_LEN + end,
            }
        } else if keys.is_gcm() {
            if body_len < EXPLICIT_NONCE_LEN + TAG_LEN {
                return Err(RecordError::BadMac);
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..4].copy_from_slice(&keys.iv[..4]);
            nonce[4..].copy_from_slice(&record[HEADER_LEN..HEADER_LEN + EXPLICIT_NONCE_LEN]);
            let plain_len = body_len - EXPLICIT_NONCE_LEN - TAG_LEN;
            let aad = tls12_aad(keys.seq, [outer, record[1], record[2]], plain_len);
            let start = HEADER_LEN + EXPLICIT_NONCE_LEN;
            keys.key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut record[start..],
                )
                .map_err(|_| RecordError::BadMac)?;
            Opened {
                content_type: outer,
                payload: start..start + plain_len,
            }
        } else {
            if body_len < TAG_LEN {
                return Err(RecordError::BadMac);
            }
            let plain_len = body_len - TAG_LEN;
            let aad = tls12_aad(keys.seq, [outer, record[1], record[2]], plain_len);
            let nonce = Nonce::assume_unique_for_key(keys.nonce());
            keys.key
                .open_in_place(nonce, Aad::from(aad), &mut record[HEADER_LEN..])
                .map_err(|_| RecordError::BadMac)?;
            Opened {
                content_type: outer,
                payload: HEADER_LEN..HEADER_LEN + plain_len,
            }
        };
        keys.seq += 1;
        // RFC 8446 section 5.4, RFC 5246 section 6.2.1: at most 2^14 bytes
        // of content in a record, whatever the ciphertext's length allowed.
        if opened.payload.len() > MAX_PLAINTEXT {
            return Err(RecordError::Overflow(opened.payload.len()));
        }
        Ok(opened)
    }

    /// Seals `buf[plain]` in place as one record of `content_type`; the
    /// room [`RecordLayer::room`] names must be free around it. Returns
    /// where the record now is.
    pub fn seal(
        &mut self,
        content_type: u8,
        buf: &mut [u8],
        plain: Range<usize>,
    ) -> Result<Range<usize>, RecordError> {
        let room = self.room();
        let n = plain.len();
        debug_assert!(n <= MAX_PLAINTEXT && plain.start >= room.head);
        debug_assert!(plain.end + room.tail <= buf.len());
        let keys = &mut self.tx;
        if keys.seq == u64::MAX {
            return Err(RecordError::KeysExhausted);
        }
        let nonce = keys.nonce();
        let start = plain.start - room.head;
        let end = if self.tls13 {
            buf[plain.end] = content_type;
            let body = n + 1 + TAG_LEN;
            let header = header(content::APPLICATION_DATA, body);
            buf[start..start + HEADER_LEN].copy_from_slice(&header);
            let tag = keys
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut buf[plain.start..plain.end + 1],
                )
                .map_err(|_| RecordError::KeysExhausted)?;
            buf[plain.end + 1..plain.end + 1 + TAG_LEN].copy_from_slice(tag.as_ref());
            plain.end + 1 + TAG_LEN
        } else {
            let aad = tls12_aad(keys.seq, [content_type, 3, 3], n);
            let body = if keys.is_gcm() {
                buf[start + HEADER_LEN..plain.start].copy_from_slice(&nonce[4..]);
                EXPLICIT_NONCE_LEN + n + TAG_LEN
            } else {
                n + TAG_LEN
            };
            buf[start..start + HEADER_LEN].copy_from_slice(&header(content_type, body));
            let tag = keys
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut buf[plain.clone()],
                )
                .map_err(|_| RecordError::KeysExhausted)?;
            buf[plain.end..plain.end + TAG_LEN].copy_from_slice(tag.as_ref());
            plain.end + TAG_LEN
        };
        keys.seq += 1;
        Ok(start..end)
    }
}

fn header(content_type: u8, body: usize) -> [u8; HEADER_LEN] {
    let len = (body as u16).to_be_bytes();
    [content_type, 3, 3, len[0], len[1]]
}

/// `type_and_version`: as in the record's header (the version a peer sent
/// is authenticated, not assumed).
fn tls12_aad(seq: u64, type_and_version: [u8; 3], len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8..11].copy_from_slice(&type_and_version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(kind: u8, key_byte: u8) -> ConnectionTrafficSecrets {
        let iv = Iv::from([key_byte ^ 0x5a; NONCE_LEN]);
        // (AeadKey has no public constructor for 16 bytes; AES-128-GCM is
        // covered end to end in tests/tls_record_layer.rs.)
        match kind {
            1 => ConnectionTrafficSecrets::Aes256Gcm {
                key: AeadKey::from([key_byte; 32]),
                iv,
            },
            _ => ConnectionTrafficSecrets::Chacha20Poly1305 {
                key: AeadKey::from([key_byte; 32]),
                iv,
            },
        }
    }

    /// Two ends of one direction: what one seals the other opens.
    fn pair(version: ProtocolVersion, kind: u8, seq: u64) -> (RecordLayer, RecordLayer) {
        let keys = |b| DirectionKeys::new(seq, &secrets(kind, b)).expect("keys");
        let sender = RecordLayer::new(version, keys(2), keys(1)).expect("layer");
        let receiver = RecordLayer::new(version, keys(1), keys(2)).expect("layer");
        (sender, receiver)
    }

    #[test]
    fn every_suite_and_version_round_trips_in_place() {
        for version in [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2] {
            for kind in 1..3 {
                let (mut tx, mut rx) = pair(version, kind, 7);
                let room = tx.room();
                let mut buf = vec![0u8; 20_000];
                let text = b"SELECT 1; -- a query";
                let area = room.head..room.head + text.len();
                buf[area.clone()].copy_from_slice(text);
                let record = tx
                    .seal(content::APPLICATION_DATA, &mut buf, area)
                    .expect("seal");
                assert_eq!(record.start, 0);
                let wire = buf[record.clone()].to_vec();
                assert_eq!(
                    RecordLayer::record_len(&wire).expect("len"),
                    Some(wire.len())
                );
                assert_ne!(&wire[room.head..room.head + text.len()], text, "encrypted");
                let mut got = wire.clone();
                let opened = rx.open(&mut got).expect("open");
                assert_eq!(opened.content_type, content::APPLICATION_DATA);
                assert_eq!(&got[opened.payload], text);
                assert_eq!((tx.tx.seq(), rx.rx.seq()), (8, 8));
                // The same bytes again are a replay: the sequence number moved on.
                let mut replay = wire.clone();
                assert_eq!(rx.open(&mut replay), Err(RecordError::BadMac));
            }
        }
    }

    #[test]
    fn tls13_records_hide_their_type_and_strip_padding() {
        let (mut tx, mut rx) = pair(ProtocolVersion::TLSv1_3, 1, 0);
        let mut buf = vec![0u8; 64];
        buf[5..7].copy_from_slice(&[1, 0]);
        let record = tx.seal(content::ALERT, &mut buf, 5..7).expect("seal");
        assert_eq!(buf[0], content::APPLICATION_DATA, "outer type is always 23");
        let mut wire = buf[record].to_vec();
        let opened = rx.open(&mut wire).expect("open");
        assert_eq!(opened.content_type, content::ALERT);
        assert_eq!(&wire[opened.payload], &[1, 0]);
    }

    /// A TLS 1.3 record sealed by hand (`seal` will not make one this big):
    /// `content` bytes of data under the keys `pair` gives the receiver.
    fn oversized_tls13_record(content: usize) -> Vec<u8> {
        use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1u8; 32]).expect("key"));
        let mut inner = vec![0x41u8; content];
        inner.push(content::APPLICATION_DATA);
        let body = inner.len() + TAG_LEN;
        let header = [23, 3, 3, (body >> 8) as u8, body as u8];
        let nonce = Nonce::assume_unique_for_key([1 ^ 0x5a; NONCE_LEN]);
        key.seal_in_place_append_tag(nonce, Aad::from(header), &mut inner)
            .expect("seal");
        [&header[..], &inner].concat()
    }

    #[test]
    fn plaintext_over_two_to_the_fourteen_is_a_record_overflow() {
        let (_, mut at_limit) = pair(ProtocolVersion::TLSv1_3, 1, 0);
        let mut ok = oversized_tls13_record(MAX_PLAINTEXT);
        let opened = at_limit.open(&mut ok).expect("2^14 is allowed");
        assert_eq!(opened.payload.len(), MAX_PLAINTEXT);
        let (_, mut rx) = pair(ProtocolVersion::TLSv1_3, 1, 0);
        let mut over = oversized_tls13_record(MAX_PLAINTEXT + 1);
        let e = rx.open(&mut over).expect_err("one byte over");
        assert_eq!(e, RecordError::Overflow(MAX_PLAINTEXT + 1));
        assert!(e.to_string().contains("record_overflow"), "{e}");
    }

    #[test]
    fn a_flipped_bit_is_refused() {
        for version in [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2] {
            let (mut tx, mut rx) = pair(version, 1, 0);
            let room = tx.room();
            let mut buf = vec![0u8; 128];
            let record = tx
                .seal(
                    content::APPLICATION_DATA,
                    &mut buf,
                    room.head..room.head + 10,
                )
                .expect("seal");
            let mut wire = buf[record].to_vec();
            let last = wire.len() - 1;
            wire[last] ^= 1;
            assert_eq!(rx.open(&mut wire), Err(RecordError::BadMac));
        }
    }

    #[test]
    fn record_lengths_are_bounded() {
        assert_eq!(RecordLayer::record_len(&[23, 3, 3]), Ok(None));
        assert_eq!(RecordLayer::record_len(&[23, 3, 3, 0, 20]), Ok(Some(25)));
        assert_eq!(
            RecordLayer::record_len(&[23, 3, 3, 0xff, 0xff]),
            Err(RecordError::Oversized(0xffff))
        );
    }

    #[test]
    fn tls13_refuses_plaintext_records_after_the_handshake() {
        let (_, mut rx) = pair(ProtocolVersion::TLSv1_3, 1, 0);
        let mut alert = [21, 3, 3, 0, 2, 2, 40];
        assert_eq!(rx.open(&mut alert), Err(RecordError::Unprotected(21)));
    }
}
