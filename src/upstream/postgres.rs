//! Postgres STARTTLS: SSLRequest, exactly one byte of answer, then TLS.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Peer, Upstream, UpstreamError, UpstreamStream};
use crate::net::Socket;
use crate::protocol::postgres::{CancelKey, SSL_REQUEST};

impl Upstream {
    /// Connects and upgrades to verified TLS, or fails closed.
    pub async fn connect_postgres(&self) -> Result<UpstreamStream, UpstreamError> {
        if self.is_tunnel() {
            // TLS from the first byte; Postgres starts plain inside it.
            return self.connect_tunnel().await;
        }
        let (tcp, addr) = self.dial().await?;
        if self.is_plain() {
            return Ok(UpstreamStream::Plain(tcp));
        }
        let after = self.connect_timeout();
        match tokio::time::timeout(after, self.start_tls(tcp, addr.clone())).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::TlsTimeout { addr, after }),
        }
    }

    async fn start_tls(
        &self,
        mut tcp: Socket,
        addr: Peer,
    ) -> Result<UpstreamStream, UpstreamError> {
        let io_err = |source: io::Error| match source.kind() {
            io::ErrorKind::UnexpectedEof => UpstreamError::ClosedDuringSetup { addr: addr.clone() },
            _ => UpstreamError::Io {
                addr: addr.clone(),
                source,
            },
        };
        tcp.write_all(&SSL_REQUEST).await.map_err(io_err)?;
        // Exactly one byte: whatever follows belongs to the TLS handshake.
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io_err)?;
        match answer[0] {
            b'S' => {}
            b'N' => return Err(UpstreamError::TlsRefused { addr }),
            // Anything else (an 'E' error text included) is not shown: a
            // server that is not yet authenticated gets no say in what the
            // user reads (CVE-2024-10977).
            byte => return Err(UpstreamError::NotTls { addr, byte }),
        }
        // CVE-2021-23222: nothing may arrive between 'S' and our ClientHello.
        super::ensure_nothing_buffered(&mut tcp, &addr)?;
        self.handshake(tcp).await
    }

    /// Delivers a CancelRequest over TLS. The server answers nothing and
    /// closes; we wait for that so the cancel has been read before we go.
    pub async fn send_cancel(&self, key: &CancelKey) -> Result<(), UpstreamError> {
        let mut tls = self.connect_postgres().await?;
        let io_err = |source: io::Error| UpstreamError::Tls {
            message: format!("sending the cancel request failed: {source}"),
        };
        tls.write_all(&key.cancel_request()).await.map_err(io_err)?;
        tls.flush().await.map_err(io_err)?;
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(self.connect_timeout(), tls.read(&mut sink)).await;
        Ok(())
    }
}
