//! Per-protocol session drivers: the client side of the startup, then the
//! hand-off to the upstream and the splice loop.

mod error;
pub mod mysql;
pub mod postgres;

pub use error::{Admission, SessionError, SessionReport};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use crate::net::{Rewind, Socket};

/// The client's leg: plain, or TLS when keyhole has a local certificate.
pub enum ClientStream {
    Plain(Socket),
    Tls(Box<TlsStream<Rewind<Socket>>>),
    /// Handed to the TLS acceptor, which failed: nothing left to talk to.
    Gone,
}

/// Ends a connection that keyhole still holds: the protocol's error message
/// first (best effort: the client may be gone), then the shutdown, and the
/// bytes keyhole itself exchanged with the client go into the report.
pub(crate) async fn close_session(
    client: &mut ClientStream,
    answer: Option<bytes::BytesMut>,
    startup_bytes: crate::splice::Transferred,
    report: &mut SessionReport,
) {
    use tokio::io::AsyncWriteExt;
    let limit = std::time::Duration::from_secs(1);
    if let Some(answer) = answer {
        let sent = tokio::time::timeout(limit, async {
            client.write_all(&answer).await?;
            client.flush().await
        })
        .await;
        if matches!(sent, Ok(Ok(()))) {
            report.transferred.server_to_client += answer.len() as u64;
        }
    }
    let _ = tokio::time::timeout(limit, client.shutdown()).await;
    report.transferred.client_to_server += startup_bytes.client_to_server;
    report.transferred.server_to_client += startup_bytes.server_to_client;
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "client stream was consumed by a failed TLS handshake",
    )
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}
