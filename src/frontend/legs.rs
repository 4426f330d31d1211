//! The two legs of a session while keyhole itself reads them (until the
//! splice): each a stream plus the bytes read from it but not yet consumed.
//! The protocol drivers decode from `buf` and call `read_more` when a message
//! is incomplete; both reads are cancel-safe (partial bytes stay buffered).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ClientStream, SessionError, SessionReport};
use crate::net::Socket;
use crate::splice::Transferred;
use crate::upstream::UpstreamStream;

/// The client's leg, counting what keyhole exchanges with it before the
/// splice (the splice counts the rest).
pub(crate) struct ClientLeg {
    pub(crate) stream: ClientStream,
    pub(crate) buf: BytesMut,
    exchanged: Transferred,
}

impl ClientLeg {
    pub(crate) fn new(socket: Socket) -> ClientLeg {
        ClientLeg {
            stream: ClientStream::Plain(socket),
            buf: BytesMut::with_capacity(1024),
            exchanged: Transferred::default(),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(SessionError::ClientIo)?;
        self.stream.flush().await.map_err(SessionError::ClientIo)?;
        self.exchanged.server_to_client += bytes.len() as u64;
        Ok(())
    }

    /// Reads whatever the client sends next into `buf`.
    pub(crate) async fn read_more(&mut self) -> Result<(), SessionError> {
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(SessionError::ClientClosed),
            Ok(n) => {
                self.exchanged.client_to_server += n as u64;
                Ok(())
            }
            Err(e) => Err(SessionError::ClientIo(e)),
        }
    }

    /// Ends the connection: the protocol's error message first (best effort:
    /// the client may be gone), then the shutdown; what keyhole exchanged
    /// with the client goes into the report.
    pub(crate) async fn close(&mut self, answer: Option<BytesMut>, report: &mut SessionReport) {
        let limit = Duration::from_secs(1);
        if let Some(answer) = answer {
            let _ = tokio::time::timeout(limit, self.send(&answer)).await;
        }
        let _ = tokio::time::timeout(limit, self.stream.shutdown()).await;
        report.transferred.client_to_server += self.exchanged.client_to_server;
        report.transferred.server_to_client += self.exchanged.server_to_client;
    }
}

/// The server's leg.
pub(crate) struct ServerLeg {
    pub(crate) stream: UpstreamStream,
    pub(crate) buf: BytesMut,
}

impl ServerLeg {
    pub(crate) fn new(stream: UpstreamStream) -> ServerLeg {
        ServerLeg {
            stream,
            buf: BytesMut::with_capacity(1024),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(SessionError::UpstreamIo)?;
        self.stream.flush().await.map_err(SessionError::UpstreamIo)
    }

    /// Reads whatever the server sends next into `buf`.
    pub(crate) async fn read_more(&mut self) -> Result<(), SessionError> {
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(SessionError::UpstreamClosed),
            Ok(_) => Ok(()),
            Err(e) => Err(SessionError::UpstreamIo(e)),
        }
    }

    /// Hands bytes either side sent past the last message keyhole read to
    /// the other side: they belong to the session and go before the splice.
    /// Both read buffers are given back: the splice has its own, and an idle
    /// session should hold no more than its sockets and its TLS state.
    pub(crate) async fn exchange_leftovers(
        &mut self,
        client: &mut ClientLeg,
    ) -> Result<(), SessionError> {
        let from_client = std::mem::take(&mut client.buf);
        if !from_client.is_empty() {
            self.send(&from_client).await?;
        }
        let from_server = std::mem::take(&mut self.buf);
        if !from_server.is_empty() {
            client.send(&from_server).await?;
        }
        Ok(())
    }
}
