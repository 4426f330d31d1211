//! The data path: once both legs are authenticated, bytes go both ways
//! untouched until either side ends.
//!
//! [`Splice`] is a small hand-written future with one half-state per
//! direction. A half borrows a buffer from the pool ([`buffer`]) only when
//! its source has bytes, and gives it back once they are written: an idle
//! connection holds none. Each half counts what it delivered; the counts
//! stay readable after an error or after the future is abandoned (for
//! example on a forced shutdown), so the connection's log line is always
//! complete.
//!
//! The legs are [`Leg`]s: a plain socket reads into the pooled buffer and
//! writes with one vectored write; keyhole's upstream TLS stream
//! (`crate::tls::TlsStream`) opens records in the buffer they were read
//! into and seals the client's bytes where they lie, so a byte is copied
//! only by the kernel on its way in and out.
//!
//! Half-close: when one side ends its stream (EOF), the other side's write
//! half is flushed and shut down (for TLS: close_notify, then FIN) and the
//! opposite direction keeps flowing until it ends too. Postgres clients end
//! with Terminate and close; the server then closes its side, so both halves
//! finish on their own. An I/O error on either side ends both.
//!
//! Truncation: a TLS server that closes without close_notify is passed on
//! as an end like any other, but when the session driver lets the splice
//! watch the client's messages ([`Farewell`]) and the client had not said
//! goodbye, the splice ends with an error that says so
//! ([`SpliceError::is_truncation`]): a bare FIN is all it takes for anything
//! on the path to end a session early.

pub mod buffer;
// splice(2) needs file descriptors: every Unix builds it, and it says at run
// time whether it works (Linux only: src/platform/).
#[cfg(keyhole_unix)]
pub mod pipe;

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use buffer::{Chunk, Room, MAX_SEGMENTS};

/// One side of a splice, as the copy loop sees it.
pub trait Leg {
    /// Room to leave around bytes that will be written to this leg (a TLS
    /// leg frames them in place).
    fn room(&self) -> Room {
        Room::NONE
    }

    /// Makes bytes ready to pass on, in `slot` (a buffer taken from the
    /// pool, read into at `room`) or in a buffer the leg keeps itself.
    /// Ok(false) at the end of the stream. When Pending, no buffer is held
    /// that holds no bytes.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        slot: &mut Option<Chunk>,
        room: Room,
    ) -> Poll<io::Result<bool>>;

    /// The chunk the last `poll_fill` made ready.
    fn filled<'s>(&'s mut self, slot: &'s mut Option<Chunk>) -> Option<&'s mut Chunk> {
        slot.as_mut()
    }

    /// Gives buffers that hold nothing more back to the pool.
    fn release(&mut self, slot: &mut Option<Chunk>) {
        if slot.as_ref().is_some_and(Chunk::is_empty) {
            *slot = None;
        }
    }

    /// Writes all of `chunk`, framing it first if the leg needs to.
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Chunk) -> Poll<io::Result<()>>;

    fn poll_flush_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    fn poll_shutdown_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// [`Leg::poll_fill`] for a plain stream: one read into a pooled buffer.
pub fn poll_fill_plain<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    cx: &mut Context<'_>,
    slot: &mut Option<Chunk>,
    room: Room,
) -> Poll<io::Result<bool>> {
    let chunk = slot.get_or_insert_with(Chunk::take);
    chunk.clear();
    let area = room.read_area();
    let mut read_buf = ReadBuf::new(&mut chunk.bytes_mut()[area.clone()]);
    let polled = Pin::new(io).poll_read(cx, &mut read_buf);
    let n = read_buf.filled().len();
    match polled {
        Poll::Ready(Ok(())) if n > 0 => {
            chunk.push(area.start..area.start + n);
            Poll::Ready(Ok(true))
        }
        other => {
            *slot = None;
            other.map_ok(|()| false)
        }
    }
}

/// [`Leg::poll_send`] for a plain stream: one vectored write per attempt.
pub fn poll_send_plain<W: AsyncWrite + Unpin + ?Sized>(
    io: &mut W,
    cx: &mut Context<'_>,
    chunk: &mut Chunk,
) -> Poll<io::Result<()>> {
    while !chunk.is_empty() {
        let n = if chunk.single().is_some() {
            ready!(Pin::new(&mut *io).poll_write(cx, chunk.front()))?
        } else {
            let mut slices = [IoSlice::new(&[]); MAX_SEGMENTS];
            let k = chunk.io_slices(&mut slices);
            ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?
        };
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
    }
    Poll::Ready(Ok(()))
}

/// Implements [`Leg`] for plain `AsyncRead + AsyncWrite` types.
#[macro_export]
macro_rules! plain_leg {
    ($($t:ty),* $(,)?) => {$(
        impl $crate::splice::Leg for $t {
            fn poll_fill(
                &mut self,
                cx: &mut ::std::task::Context<'_>,
                slot: &mut Option<$crate::splice::buffer::Chunk>,
                room: $crate::splice::buffer::Room,
            ) -> ::std::task::Poll<::std::io::Result<bool>> {
                $crate::splice::poll_fill_plain(self, cx, slot, room)
            }
            fn poll_send(
                &mut self,
                cx: &mut ::std::task::Context<'_>,
                chunk: &mut $crate::splice::buffer::Chunk,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                $crate::splice::poll_send_plain(self, cx, chunk)
            }
            fn poll_flush_leg(
                &mut self,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::tokio::io::AsyncWrite::poll_flush(::std::pin::Pin::new(self), cx)
            }
            fn poll_shutdown_leg(
                &mut self,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::tokio::io::AsyncWrite::poll_shutdown(::std::pin::Pin::new(self), cx)
            }
        }
    )*};
}

plain_leg!(
    tokio::net::TcpStream,
    tokio::io::DuplexStream,
    crate::net::Socket
);
#[cfg(keyhole_unix)]
plain_leg!(tokio::net::UnixStream);

/// Pipe settings for `pipe::PipeSplice` (`--pipe-size`), kept on every
/// system so a configuration reads the same everywhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeConfig {
    /// Bytes of pipe buffer to ask the kernel for (F_SETPIPE_SZ; it rounds
    /// up to a power-of-two number of pages). None keeps the kernel's
    /// default, 64 KiB on Linux.
    pub size: Option<usize>,
}

/// Whether two plain legs can take splice(2) here: probed once on Linux,
/// false elsewhere ([`crate::platform`]).
pub fn zero_copy_supported() -> bool {
    #[cfg(keyhole_unix)]
    {
        pipe::supported()
    }
    #[cfg(not(keyhole_unix))]
    {
        false
    }
}

/// Bytes delivered so far, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the client, written to the server.
    pub client_to_server: u64,
    /// From the server, written to the client.
    pub server_to_client: u64,
}

impl std::ops::Sub for Transferred {
    type Output = Transferred;
    fn sub(self, other: Transferred) -> Transferred {
        Transferred {
            client_to_server: self.client_to_server.saturating_sub(other.client_to_server),
            server_to_client: self.server_to_client.saturating_sub(other.server_to_client),
        }
    }
}

/// Where a splice reports its bytes while it runs (a per-target counter),
/// so a session that lasts hours shows up in the metrics before it ends.
/// The splice reports once each time it has nothing more to do for now,
/// not once per read: a burst of records costs one report.
pub trait Meter: Send + Sync {
    fn add(&self, delta: Transferred);
}

/// Which side's failure ended the splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{} connection failed: {source}", side.as_str())]
pub struct SpliceError {
    pub side: Side,
    #[source]
    pub source: io::Error,
}

impl SpliceError {
    /// The server closed without close_notify while the client was still
    /// in session.
    pub fn is_truncation(&self) -> bool {
        self.side == Side::Server && self.source.kind() == io::ErrorKind::UnexpectedEof
    }
}

pub(crate) fn truncation() -> SpliceError {
    SpliceError {
        side: Side::Server,
        source: io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection without TLS close_notify while the client was \
             still in session (a truncation: it cannot be told from a cut by anything on the path)",
        ),
    }
}

/// Watches the client's bytes on their way to the server for the one thing
/// the end of a session needs to know: whether the client's last message
/// was its goodbye (implemented per protocol in
/// [`crate::protocol::farewell`]).
pub trait Farewell: Send {
    fn observe(&mut self, bytes: &[u8]);
    fn said_goodbye(&self) -> bool;
}

/// Copies in both directions between `client` and `server`.
pub struct Splice<'a, C: ?Sized, S: ?Sized> {
    client: &'a mut C,
    server: &'a mut S,
    upstream: Half,
    downstream: Half,
    metering: Metering<'a>,
    farewell: Option<&'a mut dyn Farewell>,
    /// The server closed without close_notify before the client said goodbye.
    truncated: bool,
    /// The side whose direction ended first.
    first_to_end: Option<Side>,
}

impl<'a, C, S> Splice<'a, C, S>
where
    C: Leg + ?Sized,
    S: Leg + ?Sized,
{
    pub fn new(client: &'a mut C, server: &'a mut S) -> Self {
        Splice {
            client,
            server,
            upstream: Half::new(),
            downstream: Half::new(),
            metering: Metering::default(),
            farewell: None,
            truncated: false,
            first_to_end: None,
        }
    }

    /// Watches the client's messages, so that a server closing without
    /// close_notify before the client's goodbye ends the splice with a
    /// truncation error. Without a watcher such a close is not judged.
    pub fn watching(mut self, farewell: &'a mut dyn Farewell) -> Self {
        self.farewell = Some(farewell);
        self
    }

    /// Reports bytes to `meter` as they go.
    pub fn metered(mut self, meter: &'a dyn Meter) -> Self {
        self.metering.meter = Some(meter);
        self
    }

    /// What has been reported to the meter (the rest of
    /// [`Splice::transferred`] is still to be counted).
    pub fn metered_so_far(&self) -> Transferred {
        self.metering.reported
    }

    fn report(&mut self) {
        let now = self.transferred();
        self.metering.report(now);
    }

    /// Pooled buffers the two halves hold right now: none while the
    /// connection is idle. (A TLS leg reports its own.)
    pub fn buffers_held(&self) -> usize {
        usize::from(self.upstream.slot.is_some()) + usize::from(self.downstream.slot.is_some())
    }

    /// What has been delivered so far; valid at any time.
    pub fn transferred(&self) -> Transferred {
        Transferred {
            client_to_server: self.upstream.delivered,
            server_to_client: self.downstream.delivered,
        }
    }
}

impl<C, S> Future for Splice<'_, C, S>
where
    C: Leg + ?Sized,
    S: Leg + ?Sized,
{
    type Output = Result<(), SpliceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let polled = this.poll_both(cx);
        this.report();
        polled
    }
}

impl<C, S> Splice<'_, C, S>
where
    C: Leg + ?Sized,
    S: Leg + ?Sized,
{
    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SpliceError>> {
        let this = self;
        // A goodbye counts only before the server's end: one sent after it
        // (the client had not noticed) did not end the session.
        let farewell = match this.downstream.state {
            HalfState::Done => None,
            _ => this.farewell.as_deref_mut(),
        };
        let up = this
            .upstream
            .poll_copy(cx, &mut *this.client, &mut *this.server, farewell);
        let up = settle(
            up,
            this.downstream.state == HalfState::Done,
            Side::Client,
            Side::Server,
        )?;
        note_end(&mut this.first_to_end, up, Side::Client);
        let down = this
            .downstream
            .poll_copy(cx, &mut *this.server, &mut *this.client, None);
        if std::mem::take(&mut this.downstream.closed_without_notify) {
            // Judged when it happens: a client that had gone already, or
            // that said goodbye, explains a bare close.
            this.truncated = this.upstream.state == HalfState::Copying
                && this.farewell.as_ref().is_some_and(|w| !w.said_goodbye());
        }
        let down = settle(
            down,
            this.upstream.state == HalfState::Done,
            Side::Server,
            Side::Client,
        )?;
        note_end(&mut this.first_to_end, down, Side::Server);
        if up && down {
            Poll::Ready(if this.truncated {
                Err(truncation())
            } else {
                Ok(())
            })
        } else {
            Poll::Pending
        }
    }
}

/// One direction's poll, as the splice sees it: Ok(true) once it has ended
/// cleanly, Ok(false) while it runs, or the error that ends the splice,
/// attributed to the side that failed. Once the other direction has ended,
/// the session is ending, and a failure of this one is the peer's answer to
/// that: a reset is how many peers close (the server after a client's quit,
/// say), and MariaDB's TLS library answers the bare FIN of a client that
/// left without COM_QUIT with an alert. Either is a clean end, and the side
/// that ended first ([`Relay::first_to_end`]) tells who ended the session.
/// Both copy futures ([`Splice`], [`pipe::PipeSplice`]) join their
/// directions with this rule.
fn settle(
    poll: Poll<Result<(), HalfError>>,
    other_done: bool,
    reader: Side,
    writer: Side,
) -> Result<bool, SpliceError> {
    match poll {
        Poll::Ready(Ok(())) => Ok(true),
        Poll::Ready(Err(_)) if other_done => Ok(true),
        Poll::Ready(Err(e)) => Err(e.attribute(reader, writer)),
        Poll::Pending => Ok(false),
    }
}

/// Notes `side` as the first to end if its direction has just ended and
/// the other's had not; what both copy futures share.
fn note_end(first: &mut Option<Side>, ended: bool, side: Side) {
    if ended && first.is_none() {
        *first = Some(side);
    }
}

/// Telling a [`Meter`] about bytes as they go; what both copy futures share.
#[derive(Default)]
struct Metering<'a> {
    meter: Option<&'a dyn Meter>,
    /// What the meter has been told so far.
    reported: Transferred,
}

impl Metering<'_> {
    /// Tells the meter what `now` adds to what it heard before.
    fn report(&mut self, now: Transferred) {
        if let Some(meter) = self.meter {
            let delta = now - self.reported;
            if delta != Transferred::default() {
                meter.add(delta);
                self.reported = now;
            }
        }
    }
}

/// A running copy of both directions ([`Splice`] or [`pipe::PipeSplice`]):
/// what a session driver awaits, and its counts at any time.
pub trait Relay: Future<Output = Result<(), SpliceError>> + Unpin {
    /// What has been delivered so far.
    fn delivered(&self) -> Transferred;
    /// What has been reported to the meter so far.
    fn reported(&self) -> Transferred;
    /// The client's direction has ended (its EOF passed on) while the
    /// server's goes on: the client has gone, and the server has not
    /// followed yet.
    fn client_gone(&self) -> bool;
    /// The side whose direction ended first (its EOF passed on), if one
    /// has: who ended the session, as far as the bytes tell.
    fn first_to_end(&self) -> Option<Side>;
    /// Whether a [`Farewell`] watches the client's messages: without
    /// one, [`Relay::client_said_goodbye`] cannot know.
    fn watches_goodbye(&self) -> bool {
        false
    }
    /// The client's last message was its goodbye (as far as a
    /// [`Farewell`] watches; false without one).
    fn client_said_goodbye(&self) -> bool {
        false
    }
}

impl<C: Leg + ?Sized, S: Leg + ?Sized> Relay for Splice<'_, C, S> {
    fn delivered(&self) -> Transferred {
        self.transferred()
    }
    fn reported(&self) -> Transferred {
        self.metered_so_far()
    }
    fn client_gone(&self) -> bool {
        self.upstream.state == HalfState::Done && self.downstream.state != HalfState::Done
    }
    fn first_to_end(&self) -> Option<Side> {
        self.first_to_end
    }
    fn watches_goodbye(&self) -> bool {
        self.farewell.is_some()
    }
    fn client_said_goodbye(&self) -> bool {
        self.farewell.as_ref().is_some_and(|w| w.said_goodbye())
    }
}

/// Which end of a half failed: the one it reads or the one it writes.
enum HalfError {
    Read(io::Error),
    Write(io::Error),
}

/// Errors that only say the peer has gone.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

impl HalfError {
    fn attribute(self, reader: Side, writer: Side) -> SpliceError {
        match self {
            HalfError::Read(source) => SpliceError {
                side: reader,
                source,
            },
            HalfError::Write(source) => SpliceError {
                side: writer,
                source,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HalfState {
    /// Reading and writing.
    Copying,
    /// The reader ended; flushing and shutting the writer down.
    ShuttingDown,
    Done,
}

/// One direction: wait for bytes, borrow a buffer, write them all out,
/// give the buffer back, repeat.
struct Half {
    /// The pooled buffer, while this half holds bytes (some legs keep
    /// their own instead).
    slot: Option<Chunk>,
    /// Bytes of the chunk being written (delivered once it is all out).
    in_flight: usize,
    sending: bool,
    /// Written since the last flush.
    needs_flush: bool,
    state: HalfState,
    delivered: u64,
    /// The reader ended with a TLS close without close_notify (cleared when
    /// the splice has judged it).
    closed_without_notify: bool,
}

impl Half {
    fn new() -> Half {
        Half {
            slot: None,
            in_flight: 0,
            sending: false,
            needs_flush: false,
            state: HalfState::Copying,
            delivered: 0,
            closed_without_notify: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        mut watch: Option<&mut (dyn Farewell + '_)>,
    ) -> Poll<Result<(), HalfError>>
    where
        R: Leg + ?Sized,
        W: Leg + ?Sized,
    {
        loop {
            match self.state {
                HalfState::Done => return Poll::Ready(Ok(())),
                HalfState::ShuttingDown => {
                    match ready!(writer.poll_shutdown_leg(cx)) {
                        // The other side closed first; nothing is lost.
                        Err(e) if !is_closed(&e) => return Poll::Ready(Err(HalfError::Write(e))),
                        _ => self.state = HalfState::Done,
                    }
                }
                HalfState::Copying => {
                    if self.sending {
                        if let Some(chunk) = reader.filled(&mut self.slot) {
                            ready!(writer.poll_send(cx, chunk)).map_err(HalfError::Write)?;
                        }
                        self.sending = false;
                        self.delivered += self.in_flight as u64;
                        self.needs_flush = true;
                        reader.release(&mut self.slot);
                    }
                    match reader.poll_fill(cx, &mut self.slot, writer.room()) {
                        Poll::Ready(Ok(true)) => {
                            let chunk = reader.filled(&mut self.slot);
                            if let (Some(watch), Some(chunk)) = (watch.as_deref_mut(), &chunk) {
                                chunk.segments().for_each(|s| watch.observe(s));
                            }
                            self.in_flight = chunk.map_or(0, |c| c.len());
                            self.sending = true;
                        }
                        // EOF: flush what we wrote, then half-close.
                        Poll::Ready(Ok(false)) => self.state = HalfState::ShuttingDown,
                        // A TLS peer that closes without close_notify has
                        // still closed (MySQL servers do after COM_QUIT): the
                        // end is passed on, and the splice judges whether it
                        // was a truncation.
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            self.closed_without_notify = true;
                            self.state = HalfState::ShuttingDown
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(HalfError::Read(e))),
                        Poll::Pending => {
                            reader.release(&mut self.slot);
                            // Nothing more to read for now: push out what we wrote.
                            if self.needs_flush {
                                ready!(writer.poll_flush_leg(cx)).map_err(HalfError::Write)?;
                                self.needs_flush = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// Sums what a splice reports, and counts the reports.
    #[derive(Default)]
    struct Tally(std::sync::Mutex<(Transferred, usize)>);

    impl Meter for Tally {
        fn add(&self, delta: Transferred) {
            let mut t = self.0.lock().unwrap();
            t.0.client_to_server += delta.client_to_server;
            t.0.server_to_client += delta.server_to_client;
            t.1 += 1;
        }
    }

    #[tokio::test]
    async fn a_metered_splice_reports_bytes_while_it_runs_and_all_of_them_by_the_end() {
        let (mut client_app, mut client_leg) = duplex(64 * 1024);
        let (mut server_leg, mut server_app) = duplex(64 * 1024);
        let tally = std::sync::Arc::new(Tally::default());
        let meter = tally.clone();
        let task = tokio::spawn(async move {
            let mut s = Splice::new(&mut client_leg, &mut server_leg).metered(&*meter);
            let r = (&mut s).await;
            (r.is_ok(), s.transferred(), s.metered_so_far())
        });
        client_app.write_all(&[7u8; 5000]).await.unwrap();
        let mut got = vec![0u8; 5000];
        server_app.read_exact(&mut got).await.unwrap();
        // The splice has gone idle after delivering: the bytes are counted
        // although the session goes on.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tally.0.lock().unwrap().0.client_to_server < 5000 {
            assert!(tokio::time::Instant::now() < deadline, "never reported");
            tokio::task::yield_now().await;
        }
        server_app.write_all(b"pong").await.unwrap();
        client_app.shutdown().await.unwrap();
        server_app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client_app.read_to_end(&mut rest).await.unwrap();
        let (ok, transferred, metered) = task.await.unwrap();
        assert!(ok);
        let (total, reports) = *tally.0.lock().unwrap();
        assert_eq!(total, transferred);
        assert_eq!(metered, transferred);
        assert_eq!(
            transferred,
            Transferred {
                client_to_server: 5000,
                server_to_client: 4
            }
        );
        assert!(reports >= 2, "{reports} report(s)");
    }

    #[tokio::test]
    async fn an_idle_splice_holds_no_buffer() {
        let (mut client_app, mut client_leg) = duplex(64 * 1024);
        let (mut server_leg, mut server_app) = duplex(64 * 1024);
        let mut s = Splice::new(&mut client_leg, &mut server_leg);
        for round in 0..3u8 {
            let query = vec![round; 3000];
            client_app.write_all(&query).await.expect("write");
            let mut got = vec![0u8; 3000];
            tokio::select! {
                _ = &mut s => panic!("splice ended early"),
                r = server_app.read_exact(&mut got) => { r.expect("read"); }
            }
            assert_eq!(got, query);
            server_app.write_all(b"answer").await.expect("write");
            let mut answer = [0u8; 6];
            tokio::select! {
                _ = &mut s => panic!("splice ended early"),
                r = client_app.read_exact(&mut answer) => { r.expect("read"); }
            }
            // Both directions have delivered everything and are waiting.
            assert_eq!(s.buffers_held(), 0, "round {round}");
        }
        assert_eq!(s.transferred().client_to_server, 9000);
    }

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (mut client_app, mut client_leg) = duplex(1024);
        let (mut server_leg, mut server_app) = duplex(1024);
        let task = tokio::spawn(async move {
            let mut s = Splice::new(&mut client_leg, &mut server_leg);
            let r = (&mut s).await;
            (r.is_ok(), s.transferred())
        });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&sent).await.expect("write");
            client_app.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client_app.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server_app
            .read_to_end(&mut got)
            .await
            .expect("server reads until half-close");
        assert_eq!(got, payload);
        server_app
            .write_all(b"bye")
            .await
            .expect("reply after half-close");
        server_app.shutdown().await.expect("shutdown");
        drop(server_app);
        assert_eq!(writer.await.expect("join"), b"bye");
        let (ok, t) = task.await.expect("join");
        assert!(ok);
        assert_eq!(
            t,
            Transferred {
                client_to_server: 100_000,
                server_to_client: 3
            }
        );
    }

    #[tokio::test]
    async fn the_side_that_ends_first_is_named() {
        for first in [Side::Client, Side::Server] {
            let (mut client_app, mut client_leg) = duplex(64);
            let (mut server_leg, mut server_app) = duplex(64);
            let task = tokio::spawn(async move {
                let mut s = Splice::new(&mut client_leg, &mut server_leg);
                let r = (&mut s).await;
                (r.is_ok(), s.first_to_end())
            });
            let (ender, other) = match first {
                Side::Client => (&mut client_app, &mut server_app),
                Side::Server => (&mut server_app, &mut client_app),
            };
            ender.shutdown().await.expect("the first shutdown");
            let mut rest = Vec::new();
            other
                .read_to_end(&mut rest)
                .await
                .expect("the EOF passed on");
            other.shutdown().await.expect("the answer to it");
            ender.read_to_end(&mut rest).await.expect("the other EOF");
            assert_eq!(task.await.expect("join"), (true, Some(first)));
        }
    }

    #[tokio::test]
    async fn a_servers_failure_after_the_client_left_ends_the_splice_cleanly() {
        let (client_app, mut client_leg) = duplex(64);
        let mut server = AbruptPeer::alerting();
        drop(client_app);
        let mut s = Splice::new(&mut client_leg, &mut server);
        (&mut s).await.expect("the alert answers the client's FIN");
        assert_eq!(s.first_to_end(), Some(Side::Client));
    }

    #[tokio::test]
    async fn error_keeps_counts_and_names_the_side() {
        let (mut client_app, mut client_leg) = duplex(64);
        let (mut server_leg, server_app) = duplex(64);
        client_app.write_all(b"hello").await.expect("write");
        let mut s = Splice::new(&mut client_leg, &mut server_leg);
        // Let the first bytes through, then make the server side vanish.
        let mut server_app = server_app;
        let mut buf = [0u8; 5];
        tokio::select! {
            _ = &mut s => panic!("splice ended early"),
            r = server_app.read_exact(&mut buf) => { r.expect("read"); }
        }
        drop(server_app);
        client_app.write_all(b"more").await.expect("write");
        let err = (&mut s).await.expect_err("server is gone");
        assert_eq!(err.side, Side::Server);
        assert_eq!(s.transferred().client_to_server, 5);
    }

    /// A TLS server that ends badly; writes go nowhere.
    struct AbruptPeer {
        data: &'static [u8],
        /// What its reads fail with once `data` is read.
        fails_with: io::ErrorKind,
        /// Whether it fails only once the splice has shut down its write
        /// side (the client's FIN passed on), and lets that shutdown succeed.
        answers_shutdown: bool,
        shut_down: bool,
    }

    impl AbruptPeer {
        /// Sends `data`, then closes without close_notify.
        fn closing(data: &'static [u8]) -> AbruptPeer {
            AbruptPeer {
                data,
                fails_with: io::ErrorKind::UnexpectedEof,
                answers_shutdown: false,
                shut_down: false,
            }
        }

        /// Answers the client's bare FIN with a fatal alert, as MariaDB's
        /// TLS library may.
        fn alerting() -> AbruptPeer {
            AbruptPeer {
                data: b"",
                fails_with: io::ErrorKind::InvalidData,
                answers_shutdown: true,
                shut_down: false,
            }
        }
    }

    impl AsyncRead for AbruptPeer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.data.is_empty() {
                if self.answers_shutdown && !self.shut_down {
                    return Poll::Pending;
                }
                return Poll::Ready(Err(self.fails_with.into()));
            }
            let n = self.data.len().min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Poll::Ready(Ok(()))
        }
    }

    crate::plain_leg!(AbruptPeer);

    impl AsyncWrite for AbruptPeer {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.answers_shutdown {
                self.shut_down = true;
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
    }

    #[tokio::test]
    async fn a_server_closing_without_close_notify_ends_cleanly() {
        let (mut client_app, mut client_leg) = duplex(64);
        let mut server = AbruptPeer::closing(b"last words");
        client_app.shutdown().await.expect("client quits");
        let mut s = Splice::new(&mut client_leg, &mut server);
        (&mut s).await.expect("a clean end, not an error");
        assert_eq!(s.transferred().server_to_client, 10);
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"last words");
    }

    /// Counts the client's bytes; says goodbye when told to.
    #[derive(Default)]
    struct Watch {
        seen: usize,
        goodbye: bool,
    }

    impl Farewell for Watch {
        fn observe(&mut self, bytes: &[u8]) {
            self.seen += bytes.len();
            self.goodbye = bytes.ends_with(b"bye");
        }
        fn said_goodbye(&self) -> bool {
            self.goodbye
        }
    }

    /// The client sends `said`, the server then closes without
    /// close_notify; the client hangs up once it has read the server's
    /// last words.
    async fn server_closes_bare_after(
        said: &[u8],
        watch: Option<&mut Watch>,
    ) -> Result<(), SpliceError> {
        let (mut client_app, mut client_leg) = duplex(64);
        let mut server = AbruptPeer::closing(b"last words");
        client_app.write_all(said).await.expect("client writes");
        let hang_up = async move {
            let mut got = Vec::new();
            client_app.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"last words");
            drop(client_app);
        };
        let mut s = Splice::new(&mut client_leg, &mut server);
        if let Some(watch) = watch {
            s = s.watching(watch);
        }
        let (result, ()) = tokio::join!(&mut s, hang_up);
        result
    }

    #[tokio::test]
    async fn a_goodbye_after_the_servers_end_is_not_one() {
        let (mut client_app, mut client_leg) = duplex(64);
        let (mut server_leg, mut server_app) = duplex(64);
        let mut watch = Watch::default();
        let client = async move {
            client_app.write_all(b"SELECT").await.expect("a statement");
            let mut rest = Vec::new();
            // The server's end reaches the client, which then says goodbye.
            client_app.read_to_end(&mut rest).await.expect("the EOF");
            client_app.write_all(b"bye").await.expect("a late goodbye");
            client_app.shutdown().await.expect("shutdown");
        };
        let server = async move {
            let mut got = [0u8; 6];
            server_app
                .read_exact(&mut got)
                .await
                .expect("the statement");
            server_app.shutdown().await.expect("the server ends");
            let mut rest = Vec::new();
            server_app.read_to_end(&mut rest).await.expect("the rest");
            rest
        };
        let mut s = Splice::new(&mut client_leg, &mut server_leg).watching(&mut watch);
        let (result, (), late) = tokio::join!(&mut s, client, server);
        result.expect("a clean end");
        assert_eq!(late, b"bye", "the late goodbye is still passed on");
        assert_eq!(s.first_to_end(), Some(Side::Server));
        assert!(!s.client_said_goodbye());
    }

    #[tokio::test]
    async fn a_bare_close_before_the_clients_goodbye_is_a_truncation() {
        let mut watch = Watch::default();
        let err = server_closes_bare_after(b"SELECT", Some(&mut watch))
            .await
            .expect_err("a truncation");
        assert!(err.is_truncation(), "{err}");
        assert_eq!(err.side, Side::Server);
        assert!(
            err.to_string().contains("without TLS close_notify"),
            "{err}"
        );
        assert_eq!(watch.seen, 6);
    }

    #[tokio::test]
    async fn a_bare_close_after_the_clients_goodbye_is_an_end() {
        let mut watch = Watch::default();
        server_closes_bare_after(b"bye", Some(&mut watch))
            .await
            .expect("a clean end after goodbye");
    }

    #[tokio::test]
    async fn without_a_watcher_a_bare_close_is_not_judged() {
        server_closes_bare_after(b"SELECT", None)
            .await
            .expect("not judged");
    }
}
