//! The upstream TLS handshake: rustls's unbuffered client driven over a
//! socket (TCP, or the local end of an SSH channel), then handed over to
//! keyhole's record layer.
//!
//! rustls verifies the server and negotiates the keys; once it reaches
//! `WriteTraffic` with nothing left to send, its kernel-connection API gives
//! up the traffic secrets (and keeps what it needs for TLS 1.3 key updates
//! and session tickets). Bytes the server sent after its last handshake
//! record (TLS 1.3 session tickets, a key update, data) are already in our
//! buffer and go to the record layer first.
//!
//! # An exact switch-over
//!
//! The handover must leave nothing behind in rustls, and rustls's
//! unbuffered API holds more than its secrets once it has read past the
//! handshake:
//!
//! - a handshake message split across records: rustls decrypts each record
//!   in place in our buffer and keeps it there (not counted in `discard`)
//!   until the message is whole. Handed over, those bytes are plaintext
//!   where the record layer expects a record (a false bad_record_mac), and
//!   rustls's receive sequence number has already counted them;
//! - a KeyUpdate asking for ours: rustls seals its answer, keeps it aside to
//!   go out before its next record, and rekeys; the secrets it gives up are
//!   the new ones, and the answer is lost with the connection object;
//! - application data: rustls copies it out of our buffer (`ReadTraffic`).
//!
//! So rustls is given the server's bytes one whole record at a time, and
//! only while it asks for more to finish the handshake (`BlockedHandshake`):
//! the record that completes the handshake (the server's Finished, which
//! rustls requires to end its record) is the last it sees, and every byte
//! after it reaches keyhole's record layer as the server sent it. There,
//! post-handshake messages are handled whatever records they arrive in
//! (see `stream`), and a KeyUpdate is answered by keyhole itself. The
//! alternative, letting rustls read on until it is "clean", could not be
//! checked from outside (its queued KeyUpdate answer is not visible), and
//! would make keyhole take data out of rustls too. Should rustls still hold
//! part of a message at the switch-over, keyhole refuses the connection
//! rather than guess (`switch_over_refused`).

use std::io;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::Socket;

use super::record::HEADER_LEN;
use super::stream::{Handshake, TlsStream};
use super::KernelTls;

/// The largest handshake flight keyhole buffers (certificate chains are the
/// big part; 64 KiB is rustls's own limit for one handshake message).
const MAX_FLIGHT: usize = 256 * 1024;

/// Errors carry a `rustls::Error` inside when TLS itself failed, so that
/// [`super::describe_handshake_error`] can put it in words.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

enum Next {
    Read,
    Write,
    Done,
}

/// Performs the client handshake on `socket` (already upgraded for TLS by the
/// protocol's own request) and returns the stream with keyhole's record
/// layer in charge, or the kernel's where `kernel_tls` allows and the
/// kernel carries the negotiated suite.
pub async fn connect(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    socket: impl Into<Socket>,
    kernel_tls: KernelTls,
) -> io::Result<TlsStream> {
    let mut socket: Socket = socket.into();
    let mut conn = UnbufferedClientConnection::new(config, server_name).map_err(tls_error)?;
    let mut incoming = vec![0u8; 16 * 1024];
    let mut received = 0;
    // rustls sees `incoming[..visible]`. Records are given to it whole, one
    // at a time, when it asks for more (see the module docs): when it does,
    // it has processed everything up to `fed`, and what follows is as the
    // server sent it. Past `fed` it sees at most the first bytes of one
    // record, which it cannot process but checks the header of (so that a
    // reply that is not TLS at all is refused in rustls's words).
    let mut fed: usize = 0;
    let mut visible: usize = 0;
    let mut outgoing = vec![0u8; 4 * 1024];
    let mut encoded = 0;
    loop {
        let UnbufferedStatus { discard, state } =
            conn.process_tls_records(&mut incoming[..visible]);
        let next = match state {
            Err(e) => {
                // rustls reads the rest of this buffer (after `discard`) to
                // queue its alert: an empty one would break its bookkeeping
                // when the failure came mid-flight (more records behind the
                // refused certificate).
                incoming.copy_within(discard..received, 0);
                received -= discard;
                send_alert(&mut conn, &mut socket, &mut incoming[..received]).await;
                return Err(tls_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => loop {
                match data.encode(&mut outgoing[encoded..]) {
                    Ok(n) => {
                        encoded += n;
                        break Next::Write;
                    }
                    Err(EncodeError::InsufficientSize(need)) => {
                        outgoing.resize(encoded + need.required_size, 0);
                    }
                    Err(e) => return Err(io::Error::other(e.to_string())),
                }
            },
            Ok(ConnectionState::TransmitTlsData(data)) => {
                socket.write_all(&outgoing[..encoded]).await?;
                encoded = 0;
                data.done();
                Next::Write
            }
            Ok(ConnectionState::BlockedHandshake) => Next::Read,
            Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
            Ok(ConnectionState::ReadTraffic(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server sent application data before the handshake finished",
                ))
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(other) => {
                return Err(io::Error::other(format!(
                    "unexpected TLS handshake state {other:?}"
                )))
            }
        };
        incoming.copy_within(discard..received, 0);
        received -= discard;
        // rustls discards only what it has processed, all of it before `fed`
        // (saturating all the same: bytes from the network never panic us).
        fed = fed.saturating_sub(discard);
        visible = visible.saturating_sub(discard);
        match next {
            Next::Write => {}
            Next::Done => break,
            Next::Read => {
                if let Some(end) = next_record_end(&incoming[..received], fed) {
                    fed = end;
                    visible = end;
                    continue;
                }
                if visible < received {
                    visible = received;
                    continue;
                }
                if received == incoming.len() {
                    if incoming.len() >= MAX_FLIGHT {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the server's handshake flight is larger than 256 KiB",
                        ));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = socket.read(&mut incoming[received..]).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                received += n;
            }
        }
    }
    if fed > 0 {
        // rustls finished the handshake still holding bytes of ours: part of
        // a message (it checks that the Finished ends its record, so this
        // should not happen). What it holds cannot be handed over.
        return Err(switch_over_refused(fed));
    }
    let handshake = Handshake::of(conn.handshake_kind());
    let (secrets, session) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    TlsStream::new(
        socket,
        secrets,
        session,
        &incoming[..received],
        kernel_tls,
        handshake,
    )
}

/// The end of the record that starts at `start` in `buffered`, once all of
/// it has arrived (None: it has not).
fn next_record_end(buffered: &[u8], start: usize) -> Option<usize> {
    let header = buffered.get(start..start + HEADER_LEN)?;
    let end = start + HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (end <= buffered.len()).then_some(end)
}

/// The switch-over to keyhole's record layer, refused: rustls finished the
/// handshake with `held` bytes of a message it had not finished reading.
fn switch_over_refused(held: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "TLS handshake with the server finished with {held} bytes of an unfinished handshake \
             message left in rustls; keyhole cannot hand them to its record layer, so it \
             refuses the connection"
        ),
    )
}

/// After a failed handshake, sends the alert rustls queued (the server then
/// logs why, e.g. "unknown ca", rather than a bare disconnect). Best effort.
async fn send_alert(conn: &mut UnbufferedClientConnection, socket: &mut Socket, unread: &mut [u8]) {
    let mut out = [0u8; 64];
    let mut len = 0;
    let mut start = 0;
    for _ in 0..4 {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut unread[start..]);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                if let Ok(n) = data.encode(&mut out[len..]) {
                    len += n;
                }
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                let _ = socket.write_all(&out[..len]).await;
                data.done();
                return;
            }
            _ => break,
        }
        start = (start + discard).min(unread.len());
    }
    if len > 0 {
        let _ = socket.write_all(&out[..len]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_is_given_one_whole_record_at_a_time() {
        let two = [22, 3, 3, 0, 2, 0xaa, 0xbb, 23, 3, 3, 0, 1, 0xcc];
        assert_eq!(next_record_end(&two, 0), Some(7));
        assert_eq!(next_record_end(&two, 7), Some(13));
        // Not all of it yet: the header, part of the body, or nothing.
        assert_eq!(next_record_end(&two[..12], 7), None);
        assert_eq!(next_record_end(&two[..9], 7), None);
        assert_eq!(next_record_end(&two, 13), None);
        // Any length the header says; rustls judges the header itself.
        assert_eq!(next_record_end(&[22, 3, 3, 0xff, 0xff], 0), None);
        assert_eq!(next_record_end(&[22, 3, 3, 0, 0], 0), Some(5));
    }
}
