//! Sockets: the stream types a connection can arrive on, and the socket
//! options keyhole sets (tuning that warns instead of failing).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(keyhole_unix)]
use tokio::net::UnixStream;

/// Idle time before the first TCP keepalive probe on upstream connections;
/// well under the 350 s after which AWS NAT gateways drop idle flows.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// A stream socket: an accepted client connection, or the way to a
/// database (TCP, or the local end of a hop's channel).
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    #[cfg(keyhole_unix)]
    Unix(UnixStream),
    /// Without Unix sockets (Windows): a tunnel's end in memory ([`pair`]).
    #[cfg(not(keyhole_unix))]
    Memory(tokio::io::DuplexStream),
}

/// The end of a [`pair`] that a hop's task relays.
#[cfg(keyhole_unix)]
pub type TunnelEnd = UnixStream;
/// The end of a [`pair`] that a hop's task relays.
#[cfg(not(keyhole_unix))]
pub type TunnelEnd = tokio::io::DuplexStream;

/// The halves of a [`TunnelEnd`], for a task that reads and writes it at once.
#[cfg(keyhole_unix)]
pub type TunnelRead = tokio::net::unix::OwnedReadHalf;
#[cfg(keyhole_unix)]
pub type TunnelWrite = tokio::net::unix::OwnedWriteHalf;
#[cfg(not(keyhole_unix))]
pub type TunnelRead = tokio::io::ReadHalf<TunnelEnd>;
#[cfg(not(keyhole_unix))]
pub type TunnelWrite = tokio::io::WriteHalf<TunnelEnd>;

/// Splits a tunnel's end into its halves.
pub fn split_end(end: TunnelEnd) -> (TunnelRead, TunnelWrite) {
    #[cfg(keyhole_unix)]
    {
        end.into_split()
    }
    #[cfg(not(keyhole_unix))]
    {
        tokio::io::split(end)
    }
}

/// Room in each direction of an in-memory [`pair`].
#[cfg(not(keyhole_unix))]
const MEMORY_PAIR_BUFFER: usize = 256 * 1024;

/// A connected pair: the [`Socket`] keyhole's upstream uses, and the end a
/// tunnel's task relays (a Unix socket pair, which the splice can take;
/// without Unix sockets, a pipe in memory).
pub fn pair() -> io::Result<(Socket, TunnelEnd)> {
    #[cfg(keyhole_unix)]
    {
        let (ours, tunnel) = UnixStream::pair()?;
        Ok((Socket::Unix(ours), tunnel))
    }
    #[cfg(not(keyhole_unix))]
    {
        let (ours, tunnel) = tokio::io::duplex(MEMORY_PAIR_BUFFER);
        Ok((Socket::Memory(ours), tunnel))
    }
}

impl Socket {
    /// Whether the peer sent something (or closed) within `limit`, without
    /// reading it.
    pub async fn spoke_within(&self, limit: std::time::Duration) -> bool {
        // Readiness alone can be a false positive: peek for a byte (or EOF).
        let peeked = async {
            loop {
                let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                let result = match self {
                    Socket::Tcp(s) => {
                        if s.readable().await.is_err() {
                            return true;
                        }
                        s.try_io(tokio::io::Interest::READABLE, || {
                            socket2::SockRef::from(s).peek(&mut byte)
                        })
                    }
                    #[cfg(keyhole_unix)]
                    Socket::Unix(s) => {
                        if s.readable().await.is_err() {
                            return true;
                        }
                        s.try_io(tokio::io::Interest::READABLE, || {
                            socket2::SockRef::from(s).peek(&mut byte)
                        })
                    }
                    // A tunnel's end, never an accepted client: nothing to
                    // peek at without taking it.
                    #[cfg(not(keyhole_unix))]
                    Socket::Memory(_) => return false,
                };
                match result {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    // A byte, the peer's EOF, or an error: it did not wait.
                    _ => return true,
                }
            }
        };
        tokio::time::timeout(limit, peeked).await.unwrap_or(false)
    }
}

impl Socket {
    /// Reads what is already there without waiting: `WouldBlock` when
    /// nothing is.
    pub fn try_read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_read(buf),
            #[cfg(keyhole_unix)]
            Socket::Unix(s) => s.try_read(buf),
            #[cfg(not(keyhole_unix))]
            Socket::Memory(s) => {
                let mut read = ReadBuf::new(buf);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(s).poll_read(&mut cx, &mut read) {
                    Poll::Ready(Ok(())) => Ok(read.filled().len()),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

/// Disables Nagle: the protocols keyhole carries are request/response, and
/// a delayed small write is a delayed query. Warns instead of failing.
pub fn tune_client(socket: &Socket) {
    if let Socket::Tcp(tcp) = socket {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY on a client socket");
        }
    }
}

/// Nodelay plus keepalive for an upstream connection, which may cross NATs
/// and load balancers that drop idle flows. Warns instead of failing.
pub fn tune_upstream(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(error = %e, "could not set TCP_NODELAY on an upstream socket");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "could not enable TCP keepalive on an upstream socket");
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Socket::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            #[cfg(keyhole_unix)]
            Socket::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            #[cfg(not(keyhole_unix))]
            Socket::Memory($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl From<TcpStream> for Socket {
    fn from(tcp: TcpStream) -> Socket {
        Socket::Tcp(tcp)
    }
}

#[cfg(keyhole_unix)]
impl From<UnixStream> for Socket {
    fn from(unix: UnixStream) -> Socket {
        Socket::Unix(unix)
    }
}

#[cfg(keyhole_unix)]
impl std::os::fd::AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// A stream with bytes already read off it put back in front: lets the TLS
/// acceptor see a ClientHello whose first bytes keyhole read while deciding
/// what kind of connection this is.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }

    /// The stream itself, without whatever of the prefix was not read.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn rewind_serves_the_prefix_first() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .expect("write");
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
