//! keyhole's record layer against rustls's: the same keys, the same
//! records, the same verdict.
//!
//! A rustls client and server finish a real handshake in memory (one suite
//! at a time, TLS 1.3 and 1.2; see `tls::handshake`). The server's sending
//! keys, which rustls hands out for kernel TLS, build a keyhole
//! `RecordLayer` the way `TlsStream::new` does (`DirectionKeys::new` on the
//! extracted secrets and sequence number). The fuzz input describes records
//! (content type, plaintext, padding, legacy version, explicit nonce, in and
//! out of bounds) and corruptions (bit flips anywhere, truncation); the
//! reference sealer seals them as the server would, and the same bytes go
//! to keyhole's layer and to the rustls client (`read_tls`,
//! `process_new_packets`, `reader`).
//!
//! The verdicts must agree record by record:
//! - keyhole opens application data: rustls delivers exactly that plaintext;
//! - keyhole refuses (including an opened record of a type its stream
//!   refuses: anything but application data, alert and handshake): rustls
//!   refuses too;
//!   (The exception: headers the two read differently. TLS 1.3 with other
//!   than `17 03 03`: keyhole authenticates the header it received, as RFC
//!   8446 section 5.2 defines the additional data, and refuses an outer
//!   type other than 23; rustls authenticates a constant `17 03 03`
//!   instead. TLS 1.2 with a version outside 3.x: rustls refuses the header
//!   unread; keyhole authenticates the version like any other. Either may
//!   then refuse what the other opens; where both open, the plaintext must
//!   agree.)
//! - keyhole opens an alert or a handshake message: what it says is for
//!   the layer above, so rustls may act on it or refuse it, but not with a
//!   record-layer error (a bad MAC, an oversized record, a bad header).
//!
//! A record after a refusal or a control message is not compared (the
//! connection's state is no longer the record layer's). A rustls client
//! that only saw application data and ended on a non-empty record is kept
//! for the next input of its suite (the verdicts do not depend on the
//! sequence number: keyhole's layer starts at the client's), otherwise the
//! next input gets a fresh handshake.

use std::cell::RefCell;

use keyhole::tls::record::{RecordLayer, HEADER_LEN};
use rustls::{Error, InvalidMessage, PeerMisbehaved};

use super::input::{hex, Input};
use super::tls::{handshake, seal, Session, Spec, Suite, SUITES};

thread_local! {
    static SESSIONS: RefCell<Vec<Option<Session>>> =
        RefCell::new(SUITES.iter().map(|_| None).collect());
}

#[derive(Debug)]
enum Verdict {
    Data(Vec<u8>),
    Control(u8, Vec<u8>),
    Refused(String),
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let suite = Suite::pick(input.u8());
    let slot = SUITES.iter().position(|&s| s == suite).expect("listed");
    let session = SESSIONS.with(|s| s.borrow_mut()[slot].take());
    let mut session = session.unwrap_or_else(|| handshake(suite));
    let seq0 = session.seq;

    // The records, sealed as the server would, then corrupted as the input says.
    let mut wire = Vec::new();
    let mut big = 0;
    for i in 0..12 {
        if input.is_empty() {
            break;
        }
        let spec = Spec::read(&mut input, &mut big);
        let mut record = seal(&session.keys, seq0 + i, &spec);
        // Corruption ends the rustls session (a fresh handshake for the
        // next input), so it takes two bits set, not one: most inputs keep
        // the session, and the fuzzer runs faster.
        let corruptions = input.u8();
        let flips = if corruptions & 0x30 == 0x30 {
            1 + corruptions % 4
        } else {
            0
        };
        for _ in 0..flips {
            let at = usize::from(input.u16()) % record.len();
            record[at] ^= input.u8().max(1);
        }
        if corruptions & 0xc0 == 0xc0 {
            let cut = usize::from(input.u16()) % record.len();
            record.truncate(cut.max(1));
        }
        wire.extend(record);
    }

    let keep = compare(&mut session, &wire);
    if keep {
        session.seq += count_records(&wire);
        SESSIONS.with(|s| s.borrow_mut()[slot] = Some(session));
    }
}

fn count_records(wire: &[u8]) -> u64 {
    let mut rest = wire;
    let mut n = 0;
    while let Ok(Some(len)) = RecordLayer::record_len(rest) {
        if rest.len() < len {
            break;
        }
        rest = &rest[len..];
        n += 1;
    }
    n
}

/// Feeds `wire` to both; true if the rustls client is still usable for the
/// next input (only application data seen, the last record not empty).
fn compare(session: &mut Session, wire: &[u8]) -> bool {
    let suite = session.keys.suite;
    let mut layer = session.keys.layer(session.seq);
    let mut rest = wire;
    let mut seq = session.seq;
    let mut last_empty = false;
    loop {
        // keyhole frames the stream; rustls gets the same record's bytes.
        let len = match RecordLayer::record_len(rest) {
            Ok(Some(len)) if rest.len() >= len => len,
            // A partial record: keyhole waits for more, nothing to compare.
            Ok(_) => return !last_empty && rest.is_empty(),
            Err(e) => {
                let theirs = super::tls::rustls_receive(&mut session.client, rest);
                assert!(
                    theirs.is_err(),
                    "{suite:?}: keyhole refuses the header ({e}), rustls takes {theirs:?}"
                );
                return false;
            }
        };
        let record = &rest[..len];
        let mut opened_bytes = record.to_vec();
        let ours = match layer.open(&mut opened_bytes) {
            Ok(o) => match o.content_type {
                23 => Verdict::Data(opened_bytes[o.payload].to_vec()),
                21 | 22 => Verdict::Control(o.content_type, opened_bytes[o.payload].to_vec()),
                other => Verdict::Refused(format!("record of type {other}")),
            },
            Err(e) => Verdict::Refused(e.to_string()),
        };
        let theirs = super::tls::rustls_receive(&mut session.client, record);
        let context = || {
            format!(
                "{suite:?} record {} (seq {seq}): {}",
                seq - session.seq,
                hex(&record[..record.len().min(48)])
            )
        };
        // Headers the two read differently (see the module comment): TLS
        // 1.3 with other than `17 03 03`, where keyhole refuses an outer
        // type other than 23 and authenticates the header as received (RFC
        // 8446 section 5.2's additional data) while rustls authenticates
        // `17 03 03 len` whatever came; TLS 1.2 with a version outside
        // 3.x, which rustls refuses unread while keyhole authenticates it
        // (RFC 5246 section 6.2.3.3's additional data). The verdicts may
        // differ; only authenticated bytes are ever delivered either way,
        // and where both deliver, they agree.
        let odd_header = if suite.tls13() {
            record[..3] != [23, 3, 3]
        } else {
            record[1] != 3
        };
        if odd_header {
            if let (Verdict::Data(plain), Ok(delivered)) = (&ours, &theirs) {
                assert_eq!(plain, delivered, "{}: different plaintext", context());
            }
            return false;
        }
        match (&ours, &theirs) {
            (Verdict::Data(plain), Ok(delivered)) => {
                assert_eq!(
                    plain,
                    delivered,
                    "{}: keyhole and rustls read different plaintext",
                    context()
                );
                last_empty = plain.is_empty();
            }
            (Verdict::Data(plain), Err(e)) => panic!(
                "{}: keyhole opens {} bytes of data, rustls refuses: {e:?}",
                context(),
                plain.len()
            ),
            (Verdict::Refused(_), Err(_)) => return false,
            (Verdict::Refused(why), Ok(delivered)) => panic!(
                "{}: keyhole refuses ({why}), rustls accepts and delivers {} bytes",
                context(),
                delivered.len()
            ),
            (Verdict::Control(..), Ok(_)) => return false,
            (Verdict::Control(content_type, payload), Err(e)) => {
                assert!(
                    !record_layer_error(e),
                    "{}: keyhole opens a record of type {content_type} ({} bytes), \
                     rustls refuses it at the record layer: {e:?}",
                    context(),
                    payload.len()
                );
                return false;
            }
        }
        assert!(len > HEADER_LEN);
        rest = &rest[len..];
        seq += 1;
    }
}

/// rustls errors that refuse a record as a record: its protection, its
/// size or its header, rather than what the message inside says.
fn record_layer_error(e: &Error) -> bool {
    matches!(
        e,
        Error::DecryptError
            | Error::PeerSentOversizedRecord
            | Error::InvalidMessage(
                InvalidMessage::InvalidContentType
                    | InvalidMessage::UnknownProtocolVersion
                    | InvalidMessage::MessageTooLarge
            )
            | Error::PeerMisbehaved(PeerMisbehaved::IllegalTlsInnerPlaintext)
    )
}
