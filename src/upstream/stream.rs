//! The stream to a database: verified TLS (keyhole's record layer), or,
//! only for `tls-mode=disable` to a relay on this host, plain TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::Socket;

use crate::splice::buffer::{Chunk, Room};
use crate::splice::{self, Leg};
use crate::tls::TlsStream;

#[derive(Debug)]
pub enum UpstreamStream {
    Tls(Box<TlsStream>),
    /// A relay on this host (`tls-mode=disable`).
    Plain(Socket),
}

impl UpstreamStream {
    /// Who carries the bytes, for the session's debug log.
    pub fn data_path(&self) -> &'static str {
        match self {
            UpstreamStream::Tls(tls) if tls.is_kernel() => "kernel TLS",
            UpstreamStream::Tls(_) => "TLS in place",
            UpstreamStream::Plain(_) => "plain",
        }
    }
}

impl UpstreamStream {
    /// Shut down with a bare FIN instead of TLS close_notify (see the MySQL
    /// session driver).
    pub fn without_close_notify(&mut self) {
        if let UpstreamStream::Tls(tls) = self {
            tls.without_close_notify();
        }
    }
}

macro_rules! delegate {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            UpstreamStream::Tls($s) => $e,
            UpstreamStream::Plain($s) => $e,
        }
    };
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        delegate!(self, s => s.is_write_vectored())
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl Leg for UpstreamStream {
    fn room(&self) -> Room {
        match self {
            UpstreamStream::Tls(s) => s.room(),
            UpstreamStream::Plain(_) => Room::NONE,
        }
    }
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        slot: &mut Option<Chunk>,
        room: Room,
    ) -> Poll<io::Result<bool>> {
        match self {
            UpstreamStream::Tls(s) => s.poll_fill(cx, slot, room),
            UpstreamStream::Plain(s) => splice::poll_fill_plain(s, cx, slot, room),
        }
    }
    fn filled<'s>(&'s mut self, slot: &'s mut Option<Chunk>) -> Option<&'s mut Chunk> {
        match self {
            UpstreamStream::Tls(s) => s.filled(slot),
            UpstreamStream::Plain(_) => slot.as_mut(),
        }
    }
    fn release(&mut self, slot: &mut Option<Chunk>) {
        match self {
            UpstreamStream::Tls(s) => s.release(slot),
            UpstreamStream::Plain(s) => s.release(slot),
        }
    }
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Chunk) -> Poll<io::Result<()>> {
        match self {
            UpstreamStream::Tls(s) => s.poll_send(cx, chunk),
            UpstreamStream::Plain(s) => splice::poll_send_plain(s, cx, chunk),
        }
    }
    fn poll_flush_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush_leg(cx))
    }
    fn poll_shutdown_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown_leg(cx))
    }
}
