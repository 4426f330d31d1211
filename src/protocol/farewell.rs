//! Whether the client's last message to the server was its goodbye
//! (Postgres Terminate, MySQL COM_QUIT), told from the bytes on their way
//! through the splice without copying or buffering them.
//!
//! The splice needs the one fact at the end of a session: a TLS server that
//! closes without close_notify after the client said goodbye has simply
//! closed (MySQL and MariaDB do after COM_QUIT), but one that does so while
//! the client is still talking has been cut off, by itself or by anything on
//! the path that can forge a TCP FIN. That is a truncation (RFC 8446 6.1),
//! logged and counted as one.
//!
//! Each watcher follows the message framing only: headers are read, bodies
//! are skipped by their length. Sans-IO, tested byte for byte.

use crate::splice::Farewell;

/// Postgres: typed messages (tag, 4-byte length counting itself), after the
/// startup. Terminate is `'X'` with no body.
#[derive(Debug, Default)]
pub struct Terminate {
    header: [u8; 5],
    /// Header bytes seen of the message that is starting.
    have: usize,
    /// Body bytes still to skip.
    remaining: u64,
    /// The last message that started was a Terminate.
    last: bool,
    /// The stream stopped making sense (a length under 4): no more claims.
    lost: bool,
}

impl Farewell for Terminate {
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.remaining > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = bytes.len().min(self.header.len() - self.have);
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.header.len() {
                self.have = 0;
                let [tag, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]);
                if len < 4 {
                    self.lost = true;
                    self.last = false;
                    return;
                }
                self.remaining = u64::from(len - 4);
                self.last = tag == b'X' && len == 4;
            }
        }
    }

    fn said_goodbye(&self) -> bool {
        self.last && self.have == 0 && self.remaining == 0 && !self.lost
    }
}

/// MySQL: packets (3-byte length, sequence id, payload). COM_QUIT is the
/// one-byte payload 0x01 that starts a command (sequence id 0). Not for the
/// compressed protocol, whose frames hide the packets (the session driver
/// then watches nothing, and a bare close is not judged).
#[derive(Debug, Default)]
pub struct ComQuit {
    header: [u8; 4],
    have: usize,
    remaining: usize,
    /// The packet that is starting may be COM_QUIT: its first payload byte decides.
    candidate: bool,
    last: bool,
}

const COM_QUIT: u8 = 0x01;

impl Farewell for ComQuit {
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                if self.candidate {
                    self.last = bytes[0] == COM_QUIT;
                    self.candidate = false;
                }
                let n = bytes.len().min(self.remaining);
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = bytes.len().min(self.header.len() - self.have);
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.header.len() {
                self.have = 0;
                let [a, b, c, seq] = self.header;
                self.remaining = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
                self.candidate = self.remaining == 1 && seq == 0;
                self.last = false;
            }
        }
    }

    fn said_goodbye(&self) -> bool {
        self.last && self.have == 0 && self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in every split into two pieces and in single bytes:
    /// the answer must not depend on how the reads fell.
    fn goodbye<W: Farewell + Default>(bytes: &[u8]) -> bool {
        let mut whole = W::default();
        whole.observe(bytes);
        let answer = whole.said_goodbye();
        for cut in 0..=bytes.len() {
            let mut w = W::default();
            w.observe(&bytes[..cut]);
            w.observe(&bytes[cut..]);
            assert_eq!(w.said_goodbye(), answer, "split at {cut}");
        }
        let mut w = W::default();
        for b in bytes {
            w.observe(std::slice::from_ref(b));
        }
        assert_eq!(w.said_goodbye(), answer, "byte by byte");
        answer
    }

    const QUERY: &[u8] = b"Q\0\0\0\x0eSELECT 1;\0";
    const PG_TERMINATE: &[u8] = b"X\0\0\0\x04";

    #[test]
    fn postgres_terminate_is_seen_only_as_the_last_whole_message() {
        assert!(!goodbye::<Terminate>(b""));
        assert!(!goodbye::<Terminate>(QUERY));
        assert!(goodbye::<Terminate>(PG_TERMINATE));
        assert!(goodbye::<Terminate>(&[QUERY, PG_TERMINATE].concat()));
        assert!(!goodbye::<Terminate>(&[PG_TERMINATE, QUERY].concat()));
        // An 'X' inside a query's text is not a message.
        assert!(!goodbye::<Terminate>(b"Q\0\0\0\x0aX\0\0\0\x04\0"));
        // Half a Terminate is not one.
        assert!(!goodbye::<Terminate>(&PG_TERMINATE[..4]));
        // 'X' with a body is not Terminate.
        assert!(!goodbye::<Terminate>(b"X\0\0\0\x05!"));
    }

    #[test]
    fn postgres_nonsense_lengths_end_the_watch() {
        assert!(!goodbye::<Terminate>(
            &[b"X\0\0\0\x02", PG_TERMINATE].concat()
        ));
    }

    #[test]
    fn postgres_long_messages_are_skipped_by_their_length() {
        let mut copy = b"d".to_vec();
        copy.extend_from_slice(&(4u32 + 100_000).to_be_bytes());
        copy.extend(std::iter::repeat_n(b'X', 100_000));
        let mut w = Terminate::default();
        w.observe(&copy);
        assert!(!w.said_goodbye());
        w.observe(PG_TERMINATE);
        assert!(w.said_goodbye());
    }

    const MY_QUERY: &[u8] = b"\x09\0\0\0\x03SELECT 1";
    const MY_QUIT: &[u8] = b"\x01\0\0\0\x01";

    #[test]
    fn mysql_com_quit_is_seen_only_as_the_last_whole_packet() {
        assert!(!goodbye::<ComQuit>(b""));
        assert!(!goodbye::<ComQuit>(MY_QUERY));
        assert!(goodbye::<ComQuit>(MY_QUIT));
        assert!(goodbye::<ComQuit>(&[MY_QUERY, MY_QUIT].concat()));
        assert!(!goodbye::<ComQuit>(&[MY_QUIT, MY_QUERY].concat()));
        // COM_PING (0x0e) is not a goodbye, nor is a 0x01 byte that goes on.
        assert!(!goodbye::<ComQuit>(b"\x01\0\0\0\x0e"));
        assert!(!goodbye::<ComQuit>(b"\x02\0\0\0\x01\x01"));
        // A one-byte 0x01 in the middle of a command (a later sequence id,
        // e.g. a LOAD DATA LOCAL chunk) is data.
        assert!(!goodbye::<ComQuit>(b"\x01\0\0\x02\x01"));
        assert!(!goodbye::<ComQuit>(&MY_QUIT[..4]));
    }
}
