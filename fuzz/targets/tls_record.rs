//! keyhole's TLS record layer (`keyhole::tls::record`) on streams of
//! records built from fuzz input: records sealed by keyhole itself, records
//! sealed by the reference sealer in `tls.rs` (any content type, padding,
//! explicit nonce, legacy version, lengths past the limits), raw bytes, and
//! bit flips anywhere in the stream. Suites: TLS 1.3 AES-128-GCM,
//! ChaCha20-Poly1305 and AES-256-GCM; TLS 1.2 AES-128-GCM, ChaCha20-Poly1305
//! and AES-256-GCM.
//!
//! Invariants: keyhole frames the stream as the header says and refuses an
//! oversized header before reading the body; every whole record opens in
//! keyhole exactly when it opens in the reference opener (written from the
//! RFCs, independently of keyhole's code), to the same content type and
//! plaintext; whatever keyhole seals, the reference opener opens to what was
//! sealed, the record is as long as `room()` promised, and the sequence
//! number moves by one; a layer whose sequence numbers are spent refuses
//! to seal.

use keyhole::tls::record::{RecordError, RecordLayer, HEADER_LEN, MAX_BODY, MAX_PLAINTEXT};

use super::input::{hex, Input};
use super::tls::{keys, reference_length, reference_open, seal, Keys, Spec, Suite};

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let suite = Suite::pick(input.u8());
    let keys = keys(suite);
    let seq0 = u64::from(input.u16());
    let mut wire = Vec::new();
    let mut next_seq = seq0;
    let mut big = 0;
    for _ in 0..16 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            0 | 1 => {
                let spec = Spec::read(&mut input, &mut big);
                wire.extend(seal(&keys, next_seq, &spec));
                next_seq += 1;
            }
            2 | 3 => {
                let content_type = input.u8();
                let len = usize::from(input.u16());
                let len = if len & 0x8000 != 0 && big < 2 {
                    big += 1;
                    MAX_PLAINTEXT - len % 64
                } else {
                    len % 600
                };
                let seed = input.u8();
                let plaintext: Vec<u8> = (0..len)
                    .map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)))
                    .collect();
                wire.extend(keyhole_seal(&keys, next_seq, content_type, &plaintext));
                next_seq += 1;
            }
            4 => {
                if !wire.is_empty() {
                    let at = usize::from(input.u16()) % wire.len();
                    wire[at] ^= input.u8().max(1);
                }
            }
            _ => wire.extend_from_slice(input.short_bytes()),
        }
    }
    receive(&keys, seq0, &wire);
    exhausted(&keys);
}

/// Seals with keyhole and checks the record with the reference opener.
fn keyhole_seal(keys: &Keys, seq: u64, content_type: u8, plaintext: &[u8]) -> Vec<u8> {
    let mut layer = keys.layer(seq);
    let room = layer.room();
    assert_eq!(room.max, MAX_PLAINTEXT);
    let mut buf = vec![0u8; room.head + plaintext.len() + room.tail];
    let area = room.head..room.head + plaintext.len();
    buf[area.clone()].copy_from_slice(plaintext);
    let record = layer
        .seal(content_type, &mut buf, area)
        .expect("keyhole seals");
    assert_eq!(
        record,
        0..buf.len(),
        "the record fills exactly the room asked for"
    );
    assert_eq!(layer.tx.seq(), seq + 1);
    let record = buf[record].to_vec();
    assert_eq!(RecordLayer::record_len(&record), Ok(Some(record.len())));
    let expected = if keys.suite.tls13() {
        assert_eq!(record[0], 23, "TLS 1.3 hides the type");
        // The content type keyhole put is the last byte before the tag; a 0
        // there makes the last non-zero plaintext byte the type instead.
        let inner: Vec<u8> = [plaintext, &[content_type]].concat();
        inner
            .iter()
            .rposition(|&b| b != 0)
            .map(|end| (inner[end], inner[..end].to_vec()))
            .ok_or("unexpected_message (no content type)")
    } else {
        assert_eq!(record[0], content_type);
        Ok((content_type, plaintext.to_vec()))
    };
    assert_eq!(
        reference_open(keys, seq, &record),
        expected,
        "keyhole's record does not open as sealed ({:?}, seq {seq})",
        keys.suite
    );
    record
}

/// keyhole and the reference opener on the same stream, record by record,
/// until one of them refuses (a refusal ends the connection).
fn receive(keys: &Keys, seq0: u64, wire: &[u8]) {
    let mut layer = keys.layer(seq0);
    let mut rest = wire;
    let mut seq = seq0;
    loop {
        let len = match RecordLayer::record_len(rest) {
            Ok(None) => {
                assert!(rest.len() < HEADER_LEN);
                return;
            }
            Err(RecordError::Oversized(n)) => {
                let (declared, over) = reference_length(keys.suite, rest);
                assert_eq!(n, declared);
                assert!(n > MAX_BODY && over);
                return;
            }
            Err(e) => panic!("record_len: {e:?}"),
            Ok(Some(len)) => len,
        };
        assert_eq!(len, HEADER_LEN + reference_length(keys.suite, rest).0);
        if rest.len() < len {
            return;
        }
        let mut record = rest[..len].to_vec();
        let theirs = reference_open(keys, seq, &rest[..len]);
        match (layer.open(&mut record), theirs) {
            (Ok(opened), Ok((content_type, plaintext))) => {
                assert_eq!(opened.content_type, content_type);
                assert_eq!(&record[opened.payload.clone()], &plaintext[..]);
                assert!(opened.payload.start >= HEADER_LEN && opened.payload.end <= len);
                assert_eq!(layer.rx.seq(), seq + 1);
            }
            (Err(_), Err(_)) => return,
            (ours, theirs) => panic!(
                "{:?} record {seq}: keyhole {ours:?}, reference {theirs:?}; record {}",
                keys.suite,
                hex(&rest[..len.min(64)])
            ),
        }
        rest = &rest[len..];
        seq += 1;
    }
}

/// At the last sequence number, sealing is refused, not wrapped around.
fn exhausted(keys: &Keys) {
    let mut layer = keys.layer(u64::MAX);
    let room = layer.room();
    let mut buf = vec![0u8; room.head + 1 + room.tail];
    assert_eq!(
        layer.seal(23, &mut buf, room.head..room.head + 1),
        Err(RecordError::KeysExhausted)
    );
}
