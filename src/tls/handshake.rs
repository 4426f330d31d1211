//! The upstream TLS handshake: rustls's unbuffered client driven over a
//! socket (TCP, or the local end of an SSH channel), then handed over to
//! keyhole's record layer.
//!
//! rustls verifies the server and negotiates the keys; once it reaches
//! `WriteTraffic` with nothing left to send, its kernel-connection API gives
//! up the traffic secrets (and keeps what it needs for TLS 1.3 key updates
//! and session tickets). Bytes the server sent after its last handshake
//! record (TLS 1.3 session tickets, usually) are already in our buffer and
//! go to the record layer first.

use std::io;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::Socket;

use super::stream::TlsStream;
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
    let mut outgoing = vec![0u8; 4 * 1024];
    let mut encoded = 0;
    loop {
        let UnbufferedStatus { discard, state } =
            conn.process_tls_records(&mut incoming[..received]);
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
        match next {
            Next::Write => {}
            Next::Done => break,
            Next::Read => {
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
    let (secrets, session) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    TlsStream::new(socket, secrets, session, &incoming[..received], kernel_tls)
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
