//! The zero-copy data path for legs that are plain sockets on both ends:
//! bytes go socket → pipe → socket with splice(2) and never enter keyhole's
//! memory.
//!
//! [`PipeSplice`] keeps the contract of [`super::Splice`]: one half-state
//! per direction, copying both ways until both directions end; an EOF from
//! one side shuts down the other side's write half while the opposite
//! direction keeps flowing; an I/O error ends both and names the side it came
//! from; a reset or broken pipe after the other direction has ended is a
//! clean end; the counts stay readable at any time, and a meter hears of the
//! bytes once each time the future has nothing more to do for now.
//!
//! Pipes are lent, not owned. A direction takes a pipe from a small
//! process-wide pool only when its source is readable, fills it from the
//! source, empties it into the destination, and gives it back as soon as it
//! is empty; a pipe that still holds bytes (the destination is slow) stays
//! with its direction until drained. An idle connection therefore holds no
//! pipe, and ten thousand idle sessions cost no pipe memory at all. The pool
//! keeps at most [`POOL_CAPACITY`] idle pipes and closes the rest.
//!
//! When the fast path cannot be used for a direction, that direction copies
//! through userspace instead (a 16 KiB buffer on the stack; heap memory only
//! for what a slow destination has not taken yet), and says why in one debug
//! line per connection: pipe creation failed (out of descriptors or memory),
//! or the first splice(2) of the direction reported EINVAL, ENOSYS or
//! EOPNOTSUPP (a socket type the kernel cannot splice). Bytes already in a
//! pipe when that happens are read back out of it and delivered by the copy;
//! no byte is dropped without an error saying so.
//!
//! splice(2) into a socket whose peer is gone raises SIGPIPE like write(2)
//! does; Rust programs ignore SIGPIPE, so keyhole sees EPIPE instead, and the
//! userspace copy sends with MSG_NOSIGNAL.
//!
//! # Pipe memory and its limits
//!
//! A pipe's buffer is kernel memory charged to the user that owns the
//! process. Linux bounds it with three sysctls:
//!
//! * `fs.pipe-max-size` (`/proc/sys/fs/pipe-max-size`, default 1 MiB): the
//!   largest size an unprivileged process may ask for with F_SETPIPE_SZ.
//!   Processes with CAP_SYS_RESOURCE (root, usually) are not bound by it.
//!   When [`PipeConfig::size`] asks for more, the kernel answers EPERM;
//!   keyhole keeps the pipe at the size the kernel gave (the default,
//!   64 KiB), logs one warning per process naming the sysctl, and carries on.
//! * `fs.pipe-user-pages-soft` (default 16384 pages, 64 MiB per user): once
//!   a user's pipes hold more than this, new pipes get only two pages
//!   (8 KiB) and growing one answers EPERM. keyhole reads every pipe's real
//!   size back with F_GETPIPE_SZ and splices at most that much per call, so
//!   small pipes cost more system calls but nothing else; a refused resize is
//!   warned about once, as above.
//! * `fs.pipe-user-pages-hard` (default 0, no limit): once a user is over it,
//!   creating a pipe fails. The direction that wanted the pipe falls back to
//!   the userspace copy for the rest of its connection.
//!
//! Root with CAP_SYS_RESOURCE or CAP_SYS_ADMIN is bound by none of the three.
//! The pool bounds what keyhole keeps idle to [`POOL_CAPACITY`] pipes of the
//! configured size (4 MiB at the default size, 64 MiB at 1 MiB pipes, which
//! by itself reaches the default soft limit of an unprivileged user: keep
//! large pipe sizes for processes that run as root or raise the sysctl). In
//! flight, a connection holds at most one pipe per direction, and only while
//! a destination is slower than its source.

use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

use super::{
    is_closed, note_end, settle, HalfError, Meter, Metering, Relay, Side, SpliceError, Transferred,
};
use crate::net::Socket;

/// Idle pipes the process-wide pool keeps; pipes given back beyond this are
/// closed.
pub const POOL_CAPACITY: usize = 64;

/// The userspace copy's buffer, on the stack of each poll.
const FALLBACK_BUFFER: usize = 16 * 1024;

/// What Linux gives a new pipe, for the rare case F_GETPIPE_SZ cannot say.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// A plain stream socket whose file descriptor keyhole may splice: no TLS,
/// no userspace buffering in front of it, registered with tokio.
pub trait SpliceSocket {
    /// The socket's descriptor.
    fn fd(&self) -> BorrowedFd<'_>;

    /// Ready when tokio has seen the socket readable (or closed, or failed).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Ready when tokio has seen the socket writable (or closed, or failed).
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Runs `f` if tokio thinks the socket ready for `interest`; when `f`
    /// reports WouldBlock, clears that readiness so the next poll waits.
    fn try_io(
        &self,
        interest: Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> io::Result<usize>;

    /// Half-close: no more bytes will be written (FIN for TCP).
    fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(&self.fd()).shutdown(std::net::Shutdown::Write)
    }
}

impl SpliceSocket for TcpStream {
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
    fn try_io(
        &self,
        interest: Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        TcpStream::try_io(self, interest, f)
    }
}

impl SpliceSocket for UnixStream {
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_write_ready(self, cx)
    }
    fn try_io(
        &self,
        interest: Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        UnixStream::try_io(self, interest, f)
    }
}

impl SpliceSocket for Socket {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Socket::Tcp(s) => s.poll_read_ready(cx),
            Socket::Unix(s) => s.poll_read_ready(cx),
        }
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Socket::Tcp(s) => s.poll_write_ready(cx),
            Socket::Unix(s) => s.poll_write_ready(cx),
        }
    }
    fn try_io(
        &self,
        interest: Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_io(interest, f),
            Socket::Unix(s) => s.try_io(interest, f),
        }
    }
}

/// Whether splice(2) works here: probed once per process on a loopback
/// pair (true on Linux; false, without a probe, in a build without the
/// Linux-only calls: see [`crate::platform`]). When false, use the buffered
/// [`super::Splice`].
pub fn supported() -> bool {
    if !cfg!(linux_native) {
        return false;
    }
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| match probe() {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "splice(2) is not available; plain legs use the buffered copy");
            false
        }
    })
}

/// Moves one byte socket → pipe → socket and checks it arrives.
fn probe() -> io::Result<()> {
    let pipe = Pipe::new(&PipeConfig::default())?;
    match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) {
        Ok(listener) => {
            let near = std::net::TcpStream::connect(listener.local_addr()?)?;
            let (far, _) = listener.accept()?;
            probe_pair(&pipe, near, far)
        }
        // No loopback network (a bare network namespace): a Unix pair says
        // as much about splice(2) itself.
        Err(_) => {
            let (near, far) = std::os::unix::net::UnixStream::pair()?;
            probe_pair(&pipe, near, far)
        }
    }
}

fn probe_pair<T>(pipe: &Pipe, mut near: T, far: T) -> io::Result<()>
where
    T: io::Read + io::Write + AsFd,
{
    // Blocking sockets with a timeout: the byte is on its way, and nothing
    // here can wait for long if it is not.
    let timeout = Some(Duration::from_secs(5));
    let set_timeout = |s: &T| socket2::SockRef::from(s).set_read_timeout(timeout);
    set_timeout(&near)?;
    set_timeout(&far)?;
    near.write_all(b"k")?;
    let far_fd = far.as_fd().as_raw_fd();
    if sys::splice(far_fd, pipe.write.as_raw_fd(), 1)? != 1
        || sys::splice(pipe.read.as_raw_fd(), far_fd, 1)? != 1
    {
        return Err(io::Error::other("splice(2) moved nothing"));
    }
    let mut back = [0u8; 1];
    near.read_exact(&mut back)?;
    if &back != b"k" {
        return Err(io::Error::other("splice(2) garbled a byte"));
    }
    Ok(())
}

pub use super::PipeConfig;

/// A pipe: both ends non-blocking and close-on-exec, closed on drop.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity as the kernel reports it.
    size: usize,
    /// What it was made for, so the pool lends it only to the same setting.
    requested: Option<usize>,
}

impl Pipe {
    /// A new pipe of the configured size. A size the kernel refuses is
    /// warned about once per process and the pipe keeps the size it got.
    pub fn new(config: &PipeConfig) -> io::Result<Pipe> {
        let (read, write) = sys::pipe()?;
        let size = match config.size {
            Some(requested) => {
                let (size, refusal) = settle_size(write.as_fd(), requested);
                if let Some(refusal) = refusal {
                    warn_once(&SIZE_WARNED, &refusal);
                }
                size
            }
            None => sys::pipe_size(write.as_fd()).unwrap_or(DEFAULT_PIPE_SIZE),
        };
        Ok(Pipe {
            read,
            write,
            size,
            requested: config.size,
        })
    }

    /// The pipe's capacity in bytes, as F_GETPIPE_SZ reported it.
    pub fn size(&self) -> usize {
        self.size
    }
}

/// Why a pipe kept a size other than the one asked for.
#[derive(Debug)]
struct SizeRefusal {
    requested: usize,
    kept: usize,
    error: io::Error,
    reason: &'static str,
}

/// Set once the process has warned about a refused pipe size.
static SIZE_WARNED: AtomicBool = AtomicBool::new(false);

/// Asks for `requested` bytes of buffer and returns the size the pipe has
/// afterwards, with the kernel's refusal if it refused.
fn settle_size(fd: BorrowedFd<'_>, requested: usize) -> (usize, Option<SizeRefusal>) {
    let set = sys::set_pipe_size(fd, requested);
    let size = sys::pipe_size(fd).unwrap_or(DEFAULT_PIPE_SIZE);
    let refusal = set.err().map(|error| SizeRefusal {
        requested,
        kept: size,
        reason: refusal_reason(&error, requested, read_pipe_max_size()),
        error,
    });
    (size, refusal)
}

/// `fs.pipe-max-size`, if it can be read.
fn read_pipe_max_size() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The size the kernel would make of `requested`: a power-of-two number of
/// pages, at least one.
fn kernel_rounded(requested: usize) -> usize {
    requested.max(sys::page_size()).next_power_of_two()
}

/// What an F_SETPIPE_SZ failure means, naming the sysctl that governs it.
fn refusal_reason(error: &io::Error, requested: usize, max_size: Option<usize>) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EPERM) => match max_size {
            Some(max) if kernel_rounded(requested) > max => {
                "the size is above fs.pipe-max-size (/proc/sys/fs/pipe-max-size), the limit for \
                 processes without CAP_SYS_RESOURCE"
            }
            Some(_) => {
                "the user's pipes already hold more than fs.pipe-user-pages-soft or \
                 fs.pipe-user-pages-hard pages (/proc/sys/fs/pipe-user-pages-*), the limits for \
                 processes without CAP_SYS_RESOURCE"
            }
            None => {
                "the size is above fs.pipe-max-size, or the user's pipes are over \
                 fs.pipe-user-pages-soft/hard; both bind processes without CAP_SYS_RESOURCE"
            }
        },
        Some(libc::EBUSY) => {
            "the pipe holds more bytes than the smaller size could (not a sysctl: resize \
             pipes while they are empty)"
        }
        Some(libc::EINVAL) => "the kernel cannot make a pipe of that size (over 2 GiB?)",
        Some(libc::ENOMEM) => "the kernel is out of memory for pipe buffers",
        _ => "the kernel refused the size",
    }
}

/// Logs `refusal` unless `flag` says it has been done; true if it logged.
fn warn_once(flag: &AtomicBool, refusal: &SizeRefusal) -> bool {
    if flag.swap(true, Ordering::Relaxed) {
        return false;
    }
    tracing::warn!(
        requested = refusal.requested,
        kept = refusal.kept,
        error = %refusal.error,
        reason = refusal.reason,
        "the kernel refused the configured pipe size; pipes keep the size it gave \
         (said once per process)"
    );
    true
}

/// Idle pipes, lent to a direction while it has bytes to move.
struct Pool {
    idle: Mutex<Vec<Pipe>>,
    capacity: usize,
    /// Pipes lent out and not yet given back or closed.
    in_use: AtomicUsize,
}

static POOL: Pool = Pool::new(POOL_CAPACITY);

/// Pipes of the process-wide pool that are lent out right now (each holds
/// bytes on their way, or is being filled). Zero when every connection idles.
pub fn pipes_in_use() -> usize {
    POOL.in_use()
}

impl Pool {
    const fn new(capacity: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            capacity,
            in_use: AtomicUsize::new(0),
        }
    }

    fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// An idle pipe made for `config`, or a new one.
    fn take(&self, config: &PipeConfig) -> io::Result<Pipe> {
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let pipe = match reused {
            Some(pipe) if pipe.requested == config.size => pipe,
            // One made for another size (closed here), or none.
            _ => Pipe::new(config)?,
        };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(pipe)
    }

    /// Takes back an empty pipe; closes it if the pool is full.
    fn give_back(&self, pipe: Pipe) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.capacity {
            idle.push(pipe);
        }
    }

    /// Closes a lent pipe that cannot be reused (it still holds bytes).
    fn discard(&self, pipe: Pipe) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        drop(pipe);
    }
}

/// Failures a test can make happen once, where the kernel would report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Inject {
    Nothing,
    /// The first socket → pipe splice reports EINVAL.
    SpliceInUnsupported,
    /// The first pipe → socket splice reports EINVAL (bytes in the pipe).
    SpliceOutUnsupported,
    /// Taking a pipe fails with EMFILE.
    NoPipes,
}

/// Copies in both directions between two plain sockets through pipes.
pub struct PipeSplice<'a, C: ?Sized, S: ?Sized> {
    client: &'a mut C,
    server: &'a mut S,
    upstream: Flow,
    downstream: Flow,
    metering: Metering<'a>,
    /// A fallback has been logged for this connection.
    announced: bool,
    /// The side whose direction ended first.
    first_to_end: Option<Side>,
}

impl<'a, C, S> PipeSplice<'a, C, S>
where
    C: SpliceSocket + ?Sized,
    S: SpliceSocket + ?Sized,
{
    pub fn new(client: &'a mut C, server: &'a mut S, config: &PipeConfig) -> Self {
        PipeSplice {
            client,
            server,
            upstream: Flow::new(*config, &POOL),
            downstream: Flow::new(*config, &POOL),
            metering: Metering::default(),
            announced: false,
            first_to_end: None,
        }
    }

    /// Reports bytes to `meter` as they go.
    pub fn metered(mut self, meter: &'a dyn Meter) -> Self {
        self.metering.meter = Some(meter);
        self
    }

    /// What has been reported to the meter (the rest of
    /// [`PipeSplice::transferred`] is still to be counted).
    pub fn metered_so_far(&self) -> Transferred {
        self.metering.reported
    }

    /// What has been delivered so far; valid at any time.
    pub fn transferred(&self) -> Transferred {
        Transferred {
            client_to_server: self.upstream.delivered,
            server_to_client: self.downstream.delivered,
        }
    }

    /// Pipes this connection holds now (0 to 2); 0 while both directions
    /// idle.
    pub fn pipes_held(&self) -> usize {
        usize::from(self.upstream.pipe.is_some()) + usize::from(self.downstream.pipe.is_some())
    }

    #[cfg(test)]
    fn inject(mut self, upstream: Inject, downstream: Inject) -> Self {
        self.upstream.inject = upstream;
        self.downstream.inject = downstream;
        self
    }

    #[cfg(test)]
    fn with_pool(mut self, pool: &'static Pool) -> Self {
        self.upstream.pool = pool;
        self.downstream.pool = pool;
        self
    }

    fn report(&mut self) {
        let now = self.transferred();
        self.metering.report(now);
    }

    /// Logs the first fallback of the connection, with its reason.
    fn announce(&mut self) {
        for (flow, direction) in [
            (&mut self.upstream, "client to server"),
            (&mut self.downstream, "server to client"),
        ] {
            if let Some(reason) = flow.fell_back.take() {
                if !self.announced {
                    self.announced = true;
                    tracing::debug!(
                        direction,
                        reason = %reason,
                        "splice(2) not used; copying this direction through userspace"
                    );
                }
            }
        }
    }

    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SpliceError>> {
        let up = self.upstream.poll_copy(cx, &*self.client, &*self.server);
        let up = settle(
            up,
            self.downstream.state == FlowState::Done,
            Side::Client,
            Side::Server,
        )?;
        note_end(&mut self.first_to_end, up, Side::Client);
        let down = self.downstream.poll_copy(cx, &*self.server, &*self.client);
        let down = settle(
            down,
            self.upstream.state == FlowState::Done,
            Side::Server,
            Side::Client,
        )?;
        note_end(&mut self.first_to_end, down, Side::Server);
        if up && down {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl<C, S> Relay for PipeSplice<'_, C, S>
where
    C: SpliceSocket + ?Sized,
    S: SpliceSocket + ?Sized,
{
    fn delivered(&self) -> Transferred {
        self.transferred()
    }
    fn reported(&self) -> Transferred {
        self.metered_so_far()
    }
    fn client_gone(&self) -> bool {
        self.upstream.state == FlowState::Done && self.downstream.state != FlowState::Done
    }
    fn first_to_end(&self) -> Option<Side> {
        self.first_to_end
    }
}

impl<C, S> Future for PipeSplice<'_, C, S>
where
    C: SpliceSocket + ?Sized,
    S: SpliceSocket + ?Sized,
{
    type Output = Result<(), SpliceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let polled = this.poll_both(cx);
        this.announce();
        this.report();
        polled
    }
}

/// What splice(2) answers for descriptors it cannot move bytes between.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    /// Moving bytes.
    Copying,
    /// The source ended; the destination's write half is to be shut down.
    ShuttingDown,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Splice,
    /// Through a buffer in userspace, after the fast path failed.
    Userspace,
}

/// One direction.
struct Flow {
    state: FlowState,
    mode: Mode,
    config: PipeConfig,
    pool: &'static Pool,
    /// The pipe lent to this direction; `in_pipe` bytes are in it.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// A splice of each kind has worked: from then on, EINVAL is an error.
    spliced_in: bool,
    spliced_out: bool,
    /// Userspace mode: bytes read but not yet written, from `pos`.
    pending: Vec<u8>,
    pos: usize,
    delivered: u64,
    /// Why this direction left the fast path, until the connection logs it.
    fell_back: Option<String>,
    inject: Inject,
}

impl Flow {
    fn new(config: PipeConfig, pool: &'static Pool) -> Flow {
        Flow {
            state: FlowState::Copying,
            mode: Mode::Splice,
            config,
            pool,
            pipe: None,
            in_pipe: 0,
            spliced_in: false,
            spliced_out: false,
            pending: Vec::new(),
            pos: 0,
            delivered: 0,
            fell_back: None,
            inject: Inject::Nothing,
        }
    }

    /// The failure a test asked for at `point`, once.
    fn injected(&mut self, point: Inject) -> Option<io::Error> {
        if point == Inject::Nothing || self.inject != point {
            return None;
        }
        self.inject = Inject::Nothing;
        Some(io::Error::from_raw_os_error(match point {
            Inject::NoPipes => libc::EMFILE,
            _ => libc::EINVAL,
        }))
    }

    /// Hands the pipe back: to the pool if empty, closed if not.
    fn release(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            if self.in_pipe == 0 {
                self.pool.give_back(pipe);
            } else {
                self.pool.discard(pipe);
                self.in_pipe = 0;
            }
        }
    }

    fn fall_back(&mut self, reason: String) {
        self.mode = Mode::Userspace;
        self.fell_back = Some(reason);
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &R,
        writer: &W,
    ) -> Poll<Result<(), HalfError>>
    where
        R: SpliceSocket + ?Sized,
        W: SpliceSocket + ?Sized,
    {
        loop {
            match self.state {
                FlowState::Done => return Poll::Ready(Ok(())),
                FlowState::ShuttingDown => {
                    self.release();
                    match writer.shutdown_write() {
                        // The other side closed first; nothing is lost.
                        Err(e) if !is_closed(&e) => return Poll::Ready(Err(HalfError::Write(e))),
                        _ => self.state = FlowState::Done,
                    }
                }
                // Ready(Ok) from either: the state or the mode changed.
                FlowState::Copying => match self.mode {
                    Mode::Splice => ready!(self.poll_splice(cx, reader, writer))?,
                    Mode::Userspace => ready!(self.poll_userspace(cx, reader, writer))?,
                },
            }
        }
    }

    /// source → pipe → destination until the source has nothing for now.
    fn poll_splice<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &R,
        writer: &W,
    ) -> Poll<Result<(), HalfError>>
    where
        R: SpliceSocket + ?Sized,
        W: SpliceSocket + ?Sized,
    {
        loop {
            // Empty the pipe into the destination.
            while self.in_pipe > 0 {
                let Some(pipe) = &self.pipe else {
                    // Cannot happen: bytes in a pipe imply the pipe.
                    self.in_pipe = 0;
                    break;
                };
                let from = pipe.read.as_raw_fd();
                ready!(writer.poll_write_ready(cx)).map_err(HalfError::Write)?;
                let to = writer.fd().as_raw_fd();
                let len = self.in_pipe;
                let moved = match self.injected(Inject::SpliceOutUnsupported) {
                    Some(e) => Err(e),
                    None => writer.try_io(Interest::WRITABLE, &mut || sys::splice(from, to, len)),
                };
                match moved {
                    Ok(0) => {
                        return Poll::Ready(Err(HalfError::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => {
                        self.in_pipe -= n.min(self.in_pipe);
                        self.delivered += n as u64;
                        self.spliced_out = true;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) if !self.spliced_out && is_unsupported(&e) => {
                        return Poll::Ready(self.rescue(e));
                    }
                    Err(e) => return Poll::Ready(Err(HalfError::Write(e))),
                }
            }
            // The pipe is empty: while the source has nothing, hold none.
            match reader.poll_read_ready(cx) {
                Poll::Pending => {
                    self.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    self.release();
                    return Poll::Ready(Err(HalfError::Read(e)));
                }
                Poll::Ready(Ok(())) => {}
            }
            let pipe = match self.pipe.take() {
                Some(pipe) => pipe,
                None => {
                    let taken = match self.injected(Inject::NoPipes) {
                        Some(e) => Err(e),
                        None => self.pool.take(&self.config),
                    };
                    match taken {
                        Ok(pipe) => pipe,
                        Err(e) => {
                            self.fall_back(format!("no pipe: {e}"));
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            };
            let (from, to, len) = (reader.fd().as_raw_fd(), pipe.write.as_raw_fd(), pipe.size);
            let moved = match self.injected(Inject::SpliceInUnsupported) {
                Some(e) => Err(e),
                None => reader.try_io(Interest::READABLE, &mut || sys::splice(from, to, len)),
            };
            match moved {
                Ok(0) => {
                    self.pool.give_back(pipe);
                    self.state = FlowState::ShuttingDown;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    self.spliced_in = true;
                    self.pipe = Some(pipe);
                    self.in_pipe = n;
                }
                // Stale readiness, now cleared: the next poll_read_ready
                // waits, and the pipe goes back.
                Err(e) if would_block(&e) => self.pipe = Some(pipe),
                Err(e) if !self.spliced_in && is_unsupported(&e) => {
                    self.pool.give_back(pipe);
                    self.fall_back(format!("splice(2) from the socket: {e}"));
                    return Poll::Ready(Ok(()));
                }
                Err(e) => {
                    self.pool.give_back(pipe);
                    return Poll::Ready(Err(HalfError::Read(e)));
                }
            }
        }
    }

    /// The destination cannot take a splice: read the pipe's bytes back
    /// into userspace, where the copy delivers them. If that fails, the
    /// bytes are lost and the splice's error says so.
    fn rescue(&mut self, cause: io::Error) -> Result<(), HalfError> {
        let Some(pipe) = self.pipe.take() else {
            self.fall_back(format!("splice(2) into the socket: {cause}"));
            return Ok(());
        };
        let mut bytes = vec![0u8; self.in_pipe];
        let mut got = 0;
        while got < bytes.len() {
            match sys::read(pipe.read.as_raw_fd(), &mut bytes[got..]) {
                Ok(n) if n > 0 => got += n,
                _ => break,
            }
        }
        if got < bytes.len() {
            self.pool.discard(pipe);
            self.in_pipe = 0;
            return Err(HalfError::Write(cause));
        }
        self.in_pipe = 0;
        self.pool.give_back(pipe);
        self.pending = bytes;
        self.pos = 0;
        self.fall_back(format!("splice(2) into the socket: {cause}"));
        Ok(())
    }

    /// source → stack buffer → destination; what the destination does not
    /// take at once waits in `pending`.
    fn poll_userspace<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &R,
        writer: &W,
    ) -> Poll<Result<(), HalfError>>
    where
        R: SpliceSocket + ?Sized,
        W: SpliceSocket + ?Sized,
    {
        let to = writer.fd().as_raw_fd();
        let from = reader.fd().as_raw_fd();
        loop {
            while self.pos < self.pending.len() {
                ready!(writer.poll_write_ready(cx)).map_err(HalfError::Write)?;
                let chunk = &self.pending[self.pos..];
                match writer.try_io(Interest::WRITABLE, &mut || sys::send(to, chunk)) {
                    Ok(0) => {
                        return Poll::Ready(Err(HalfError::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => {
                        self.pos += n;
                        self.delivered += n as u64;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Poll::Ready(Err(HalfError::Write(e))),
                }
            }
            if self.pending.capacity() > 0 {
                self.pending = Vec::new();
                self.pos = 0;
            }
            ready!(reader.poll_read_ready(cx)).map_err(HalfError::Read)?;
            let mut buf = [0u8; FALLBACK_BUFFER];
            let n = match reader.try_io(Interest::READABLE, &mut || sys::recv(from, &mut buf)) {
                Ok(0) => {
                    self.state = FlowState::ShuttingDown;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => n,
                Err(e) if would_block(&e) => continue,
                Err(e) => return Poll::Ready(Err(HalfError::Read(e))),
            };
            let mut sent = 0;
            while sent < n {
                let chunk = &buf[sent..n];
                match writer.try_io(Interest::WRITABLE, &mut || sys::send(to, chunk)) {
                    Ok(0) => {
                        return Poll::Ready(Err(HalfError::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(k) => {
                        sent += k;
                        self.delivered += k as u64;
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) => return Poll::Ready(Err(HalfError::Write(e))),
                }
            }
            if sent < n {
                self.pending = buf[sent..n].to_vec();
                self.pos = 0;
            }
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.release();
    }
}

/// The system calls, with EINTR retried.
#[cfg(linux_native)]
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

    fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
        loop {
            let r = call();
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors owned by
        // nothing else.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    /// Moves up to `len` bytes; one end must be a pipe.
    pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        retry(|| {
            // SAFETY: plain descriptors, no offsets.
            unsafe {
                libc::splice(
                    from,
                    std::ptr::null_mut(),
                    to,
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            }
        })
    }

    pub(super) fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<()> {
        let size =
            libc::c_int::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: fcntl on a descriptor we borrow.
        retry(|| unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) } as isize)
            .map(drop)
    }

    pub(super) fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
        // SAFETY: fcntl on a descriptor we borrow.
        retry(|| unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) } as isize)
    }

    pub(super) fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writing.
        retry(|| unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
    }

    pub(super) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writing.
        retry(|| unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })
    }

    pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of reading.
        retry(|| unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) })
    }

    pub(super) fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(r).unwrap_or(4096)
    }
}

// Without the Linux-only calls (src/platform/) the stand-ins answer for
// `sys`, under their own name, so a symbol table tells which a build has.
#[cfg(not(linux_native))]
use unsupported as sys;

/// No splice(2) here: pipes cannot be made, so every direction takes the
/// userspace copy (and [`supported`] says false).
#[cfg(not(linux_native))]
mod unsupported {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

    fn unsupported<T>() -> io::Result<T> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        unsupported()
    }

    pub(super) fn splice(_: RawFd, _: RawFd, _: usize) -> io::Result<usize> {
        unsupported()
    }

    pub(super) fn set_pipe_size(_: BorrowedFd<'_>, _: usize) -> io::Result<()> {
        unsupported()
    }

    pub(super) fn pipe_size(_: BorrowedFd<'_>) -> io::Result<usize> {
        unsupported()
    }

    pub(super) fn read(_: RawFd, _: &mut [u8]) -> io::Result<usize> {
        unsupported()
    }

    fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
        loop {
            let r = call();
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub(super) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writing.
        retry(|| unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })
    }

    pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of reading.
        retry(|| unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), 0) })
    }

    pub(super) fn page_size() -> usize {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, watch};
    use tokio::task::JoinHandle;

    const MIB: u64 = 1024 * 1024;

    /// What a direction that may splice does: splice(2) in the Linux build;
    /// in the portable one every pipe is refused (ENOSYS) and the direction
    /// copies through userspace, the fallback these tests then exercise.
    const SPLICED: Mode = if cfg!(linux_native) {
        Mode::Splice
    } else {
        Mode::Userspace
    };

    /// A connected loopback TCP pair: (the end an application holds, the
    /// end keyhole splices).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (near.expect("connect"), far.expect("accept").0)
    }

    /// Closes with a reset instead of a FIN.
    fn reset(stream: TcpStream) {
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER");
        drop(stream);
    }

    /// A position-dependent byte pattern (period 251, so no chunk boundary
    /// lines up with it), one per direction.
    struct Pattern(Vec<u8>);

    const PERIOD: usize = 251;
    const CHUNK: usize = 64 * 1024;

    impl Pattern {
        fn new(seed: u8) -> Pattern {
            Pattern(
                (0..CHUNK + PERIOD)
                    .map(|i| ((i % PERIOD) as u8).wrapping_mul(7).wrapping_add(seed))
                    .collect(),
            )
        }

        /// The `len` bytes (at most CHUNK) that belong at `offset`.
        fn at(&self, offset: u64, len: usize) -> &[u8] {
            let start = (offset % PERIOD as u64) as usize;
            &self.0[start..start + len]
        }
    }

    async fn send_pattern(mut w: impl AsyncWrite + Unpin, pattern: &Pattern, total: u64) {
        let mut offset = 0;
        while offset < total {
            let len = (total - offset).min(CHUNK as u64) as usize;
            w.write_all(pattern.at(offset, len)).await.expect("send");
            offset += len as u64;
        }
        w.shutdown().await.expect("half-close");
    }

    /// Reads to EOF, checking every byte; returns how many came.
    async fn check_pattern(mut r: impl AsyncRead + Unpin, pattern: &Pattern) -> u64 {
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        loop {
            let n = r.read(&mut buf).await.expect("receive");
            if n == 0 {
                return offset;
            }
            assert!(
                buf[..n] == *pattern.at(offset, n),
                "wrong bytes within {n} from offset {offset}"
            );
            offset += n as u64;
        }
    }

    type Outcome = (Result<(), SpliceError>, Transferred, usize, [Mode; 2]);

    fn spawn_splice<C, S>(
        mut client_leg: C,
        mut server_leg: S,
        pool: Option<&'static Pool>,
        inject: [Inject; 2],
    ) -> JoinHandle<Outcome>
    where
        C: SpliceSocket + Send + 'static,
        S: SpliceSocket + Send + 'static,
    {
        tokio::spawn(async move {
            let mut splice =
                PipeSplice::new(&mut client_leg, &mut server_leg, &PipeConfig::default())
                    .inject(inject[0], inject[1]);
            if let Some(pool) = pool {
                splice = splice.with_pool(pool);
            }
            let result = (&mut splice).await;
            let modes = [splice.upstream.mode, splice.downstream.mode];
            (result, splice.transferred(), splice.pipes_held(), modes)
        })
    }

    /// `total` bytes each way at once, both checked, then half-closes.
    async fn carry<A, C, S, B>(
        client_app: A,
        client_leg: C,
        server_leg: S,
        server_app: B,
        total: u64,
        inject: [Inject; 2],
    ) -> [Mode; 2]
    where
        A: AsyncRead + AsyncWrite,
        B: AsyncRead + AsyncWrite,
        C: SpliceSocket + Send + 'static,
        S: SpliceSocket + Send + 'static,
    {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(4)));
        let task = spawn_splice(client_leg, server_leg, Some(pool), inject);
        let (up, down) = (Pattern::new(1), Pattern::new(100));
        let (client_read, client_write) = tokio::io::split(client_app);
        let (server_read, server_write) = tokio::io::split(server_app);
        let ((), got_up, (), got_down) = tokio::join!(
            send_pattern(client_write, &up, total),
            check_pattern(server_read, &up),
            send_pattern(server_write, &down, total),
            check_pattern(client_read, &down),
        );
        assert_eq!((got_up, got_down), (total, total));
        let (result, transferred, held, modes) = task.await.expect("join");
        result.expect("a clean end");
        assert_eq!(
            transferred,
            Transferred {
                client_to_server: total,
                server_to_client: total
            }
        );
        assert_eq!(held, 0);
        assert_eq!(pool.in_use(), 0);
        modes
    }

    const NO_FAULTS: [Inject; 2] = [Inject::Nothing, Inject::Nothing];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_to_tcp_carries_64_mib_each_way_through_pipes() {
        let (client_app, client_leg) = tcp_pair().await;
        let (server_leg, server_app) = tcp_pair().await;
        let modes = carry(
            client_app,
            client_leg,
            server_leg,
            server_app,
            64 * MIB,
            NO_FAULTS,
        )
        .await;
        assert_eq!(modes, [SPLICED, SPLICED]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unix_to_tcp_carries_64_mib_each_way_through_pipes() {
        let (client_app, client_leg) = UnixStream::pair().expect("socketpair");
        let (server_leg, server_app) = tcp_pair().await;
        let client_leg = Socket::Unix(client_leg);
        let modes = carry(
            client_app,
            client_leg,
            server_leg,
            server_app,
            64 * MIB,
            NO_FAULTS,
        )
        .await;
        assert_eq!(modes, [SPLICED, SPLICED]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_splice_from_a_socket_that_reports_einval_falls_back_to_copying() {
        let (client_app, client_leg) = tcp_pair().await;
        let (server_leg, server_app) = tcp_pair().await;
        let inject = [Inject::SpliceInUnsupported, Inject::SpliceInUnsupported];
        let modes = carry(
            client_app,
            client_leg,
            server_leg,
            server_app,
            8 * MIB,
            inject,
        )
        .await;
        assert_eq!(modes, [Mode::Userspace, Mode::Userspace]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_already_in_a_pipe_when_splicing_out_fails_are_still_delivered() {
        let (client_app, client_leg) = UnixStream::pair().expect("socketpair");
        let (server_leg, server_app) = tcp_pair().await;
        let inject = [Inject::SpliceOutUnsupported, Inject::SpliceOutUnsupported];
        let modes = carry(
            client_app,
            client_leg,
            server_leg,
            server_app,
            8 * MIB,
            inject,
        )
        .await;
        assert_eq!(modes, [Mode::Userspace, Mode::Userspace]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_pipes_a_direction_copies_through_userspace() {
        let (client_app, client_leg) = tcp_pair().await;
        let (server_leg, server_app) = tcp_pair().await;
        // Only one direction is denied a pipe; the other keeps splicing.
        let inject = [Inject::NoPipes, Inject::Nothing];
        let modes = carry(
            client_app,
            client_leg,
            server_leg,
            server_app,
            8 * MIB,
            inject,
        )
        .await;
        assert_eq!(modes, [Mode::Userspace, SPLICED]);
    }

    #[tokio::test]
    async fn the_client_ends_first_and_the_server_still_replies() {
        let (mut client_app, client_leg) = tcp_pair().await;
        let (server_leg, mut server_app) = tcp_pair().await;
        let task = spawn_splice(client_leg, server_leg, None, NO_FAULTS);
        client_app.write_all(b"query").await.expect("write");
        client_app.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server_app.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"query");
        server_app
            .write_all(b"answer")
            .await
            .expect("reply after EOF");
        server_app.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        client_app.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"answer");
        let (result, transferred, held, _) = task.await.expect("join");
        result.expect("a clean end");
        assert_eq!(
            transferred,
            Transferred {
                client_to_server: 5,
                server_to_client: 6
            }
        );
        assert_eq!(held, 0);
    }

    #[tokio::test]
    async fn the_server_ends_first_and_the_client_still_sends() {
        let (mut client_app, client_leg) = UnixStream::pair().expect("socketpair");
        let (server_leg, mut server_app) = tcp_pair().await;
        let task = spawn_splice(Socket::Unix(client_leg), server_leg, None, NO_FAULTS);
        server_app.write_all(b"banner").await.expect("write");
        server_app.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"banner");
        client_app.write_all(b"late").await.expect("send after EOF");
        client_app.shutdown().await.expect("half-close");
        let mut late = Vec::new();
        server_app.read_to_end(&mut late).await.expect("read");
        assert_eq!(late, b"late");
        let (result, transferred, _, _) = task.await.expect("join");
        result.expect("a clean end");
        assert_eq!(
            transferred,
            Transferred {
                client_to_server: 4,
                server_to_client: 6
            }
        );
    }

    #[tokio::test]
    async fn a_server_reset_names_the_server_and_keeps_the_counts() {
        let (mut client_app, client_leg) = tcp_pair().await;
        let (server_leg, mut server_app) = tcp_pair().await;
        let task = spawn_splice(client_leg, server_leg, None, NO_FAULTS);
        client_app.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        server_app.read_exact(&mut got).await.expect("read");
        reset(server_app);
        let (result, transferred, _, _) = task.await.expect("join");
        let err = result.expect_err("the server is gone");
        assert_eq!(err.side, Side::Server);
        assert_eq!(transferred.client_to_server, 5);
    }

    #[tokio::test]
    async fn a_client_reset_names_the_client_and_keeps_the_counts() {
        let (mut client_app, client_leg) = tcp_pair().await;
        let (server_leg, mut server_app) = tcp_pair().await;
        let task = spawn_splice(client_leg, server_leg, None, NO_FAULTS);
        server_app.write_all(b"greeting").await.expect("write");
        let mut got = [0u8; 8];
        client_app.read_exact(&mut got).await.expect("read");
        reset(client_app);
        let (result, transferred, _, _) = task.await.expect("join");
        let err = result.expect_err("the client is gone");
        assert_eq!(err.side, Side::Client);
        assert_eq!(transferred.server_to_client, 8);
    }

    #[tokio::test]
    async fn a_reset_after_the_other_direction_ended_is_a_clean_end() {
        let (mut client_app, client_leg) = tcp_pair().await;
        let (server_leg, mut server_app) = tcp_pair().await;
        let task = spawn_splice(client_leg, server_leg, None, NO_FAULTS);
        client_app.shutdown().await.expect("the client quits");
        let mut got = Vec::new();
        server_app.read_to_end(&mut got).await.expect("EOF");
        reset(server_app);
        let (result, _, held, _) = task.await.expect("join");
        result.expect("a clean end, not an error");
        assert_eq!(held, 0);
    }

    /// Sums what a splice reports, and counts the reports.
    struct Tally(watch::Sender<(Transferred, usize)>);

    impl Meter for Tally {
        fn add(&self, delta: Transferred) {
            self.0.send_modify(|(total, reports)| {
                total.client_to_server += delta.client_to_server;
                total.server_to_client += delta.server_to_client;
                *reports += 1;
            });
        }
    }

    #[tokio::test]
    async fn a_metered_splice_reports_while_it_runs_and_everything_by_the_end() {
        let (mut client_app, mut client_leg) = tcp_pair().await;
        let (mut server_leg, mut server_app) = tcp_pair().await;
        let tally = Arc::new(Tally(watch::Sender::new(Default::default())));
        let mut seen = tally.0.subscribe();
        let meter = tally.clone();
        let task = tokio::spawn(async move {
            let mut splice =
                PipeSplice::new(&mut client_leg, &mut server_leg, &PipeConfig::default())
                    .metered(&*meter);
            let result = (&mut splice).await;
            (
                result.is_ok(),
                splice.transferred(),
                splice.metered_so_far(),
            )
        });
        client_app.write_all(&[7u8; 5000]).await.expect("write");
        let mut got = vec![0u8; 5000];
        server_app.read_exact(&mut got).await.expect("read");
        // Idle after delivering: the bytes are reported while the session
        // goes on.
        seen.wait_for(|(total, _)| total.client_to_server == 5000)
            .await
            .expect("reported");
        server_app.write_all(b"pong").await.expect("write");
        client_app.shutdown().await.expect("half-close");
        server_app.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        client_app.read_to_end(&mut rest).await.expect("read");
        let (ok, transferred, metered) = task.await.expect("join");
        assert!(ok);
        let (total, reports) = *tally.0.borrow();
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
    async fn an_idle_connection_holds_no_pipe_between_exchanges() {
        const ROUNDS: u32 = 100;
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(4)));
        let (mut client_app, mut client_leg) = tcp_pair().await;
        let (mut server_leg, mut server_app) = tcp_pair().await;
        let (idle_tx, mut idle_rx) = mpsc::channel(1);
        let (go_tx, mut go_rx) = mpsc::channel(1);
        let apps = tokio::spawn(async move {
            for round in 0..ROUNDS {
                let request = format!("request {round}");
                client_app
                    .write_all(request.as_bytes())
                    .await
                    .expect("write");
                let mut got = vec![0u8; request.len()];
                server_app.read_exact(&mut got).await.expect("read");
                assert_eq!(got, request.as_bytes());
                let response = vec![round as u8; 300];
                server_app.write_all(&response).await.expect("write");
                let mut back = vec![0u8; 300];
                client_app.read_exact(&mut back).await.expect("read");
                assert_eq!(back, response);
                // Both directions have delivered everything: idle.
                idle_tx.send(round).await.expect("the test listens");
                go_rx.recv().await.expect("the test answers");
            }
            client_app.shutdown().await.expect("half-close");
            server_app.shutdown().await.expect("half-close");
        });
        let mut splice = PipeSplice::new(&mut client_leg, &mut server_leg, &PipeConfig::default())
            .with_pool(pool);
        let mut idle_checks = 0;
        loop {
            tokio::select! {
                result = &mut splice => {
                    result.expect("a clean end");
                    break;
                }
                Some(round) = idle_rx.recv() => {
                    assert_eq!(splice.pipes_held(), 0, "round {round}");
                    assert_eq!(pool.in_use(), 0, "round {round}");
                    idle_checks += 1;
                    go_tx.send(()).await.expect("the apps wait");
                }
            }
        }
        apps.await.expect("join");
        assert_eq!(idle_checks, ROUNDS);
        assert_eq!(
            splice.transferred().server_to_client,
            300 * u64::from(ROUNDS)
        );
        assert_eq!(splice.pipes_held(), 0);
        assert_eq!(pool.in_use(), 0);
        // The exchanges reused pipes instead of making one each.
        assert!(pool.idle() <= 2, "{} idle pipes", pool.idle());
    }

    // Real pipes: the Linux build only.
    #[cfg(linux_native)]
    #[test]
    fn the_pool_counts_lent_pipes_and_keeps_at_most_its_capacity() {
        let pool = Pool::new(2);
        let config = PipeConfig::default();
        let pipes: Vec<Pipe> = (0..3).map(|_| pool.take(&config).expect("pipe")).collect();
        assert_eq!(pool.in_use(), 3);
        for pipe in pipes {
            pool.give_back(pipe);
        }
        assert_eq!((pool.in_use(), pool.idle()), (0, 2), "the third was closed");
        let reused = pool.take(&config).expect("pipe");
        assert_eq!((pool.in_use(), pool.idle()), (1, 1));
        pool.discard(reused);
        assert_eq!((pool.in_use(), pool.idle()), (0, 1));
        // A pipe made for another size is not lent for this one.
        let other = pool
            .take(&PipeConfig {
                size: Some(128 * 1024),
            })
            .expect("pipe");
        assert_eq!(other.requested, Some(128 * 1024));
        assert_eq!(pool.idle(), 0);
        pool.give_back(other);
    }

    // Real pipes: the Linux build only.
    #[cfg(linux_native)]
    #[test]
    fn a_one_mebibyte_pipe_is_granted_and_read_back() {
        let pipe = Pipe::new(&PipeConfig {
            size: Some(1 << 20),
        })
        .expect("pipe");
        assert_eq!(pipe.size(), 1 << 20);
        assert_eq!(
            sys::pipe_size(pipe.write.as_fd()).expect("F_GETPIPE_SZ"),
            1 << 20
        );
    }

    // Real pipes: the Linux build only.
    #[cfg(linux_native)]
    #[test]
    fn above_pipe_max_size_only_a_privileged_process_is_granted() {
        let Some(max) = read_pipe_max_size() else {
            return;
        };
        let (_read, write) = sys::pipe().expect("pipe");
        let requested = max * 2;
        match settle_size(write.as_fd(), requested) {
            // CAP_SYS_RESOURCE (root) is not bound by fs.pipe-max-size.
            (size, None) => assert!(size >= requested, "{size}"),
            (size, Some(refusal)) => {
                assert_eq!(refusal.error.raw_os_error(), Some(libc::EPERM));
                assert!(
                    refusal.reason.contains("fs.pipe-max-size"),
                    "{}",
                    refusal.reason
                );
                assert_eq!(refusal.kept, size);
            }
        }
    }

    // Real pipes: the Linux build only.
    #[cfg(linux_native)]
    #[test]
    fn a_refused_resize_keeps_the_size_the_pipe_has() {
        use std::io::Write;
        let pipe = Pipe::new(&PipeConfig::default()).expect("pipe");
        let before = pipe.size();
        // The kernel will not shrink a pipe below what it holds (EBUSY): a
        // real refusal, with no sysctl touched.
        let mut writer = std::fs::File::from(pipe.write.try_clone().expect("dup"));
        writer
            .write_all(&vec![9u8; 3 * sys::page_size()])
            .expect("fill");
        let (size, refusal) = settle_size(pipe.write.as_fd(), sys::page_size());
        let refusal = refusal.expect("refused");
        assert_eq!(refusal.error.raw_os_error(), Some(libc::EBUSY));
        assert_eq!((size, refusal.kept), (before, before));
        assert!(refusal.reason.contains("empty"), "{}", refusal.reason);
    }

    #[test]
    fn each_refusal_names_what_governs_it() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let max = Some(1 << 20);
        let over_max = refusal_reason(&eperm, 2 << 20, max);
        assert!(over_max.contains("fs.pipe-max-size"), "{over_max}");
        assert!(!over_max.contains("pipe-user-pages"), "{over_max}");
        // The kernel rounds 1,000,000 up to 1 MiB, which the limit allows:
        // the refusal was the per-user page limits.
        let user_pages = refusal_reason(&eperm, 1_000_000, max);
        assert!(
            user_pages.contains("fs.pipe-user-pages-soft"),
            "{user_pages}"
        );
        assert!(
            user_pages.contains("fs.pipe-user-pages-hard"),
            "{user_pages}"
        );
        let unknown_max = refusal_reason(&eperm, 2 << 20, None);
        assert!(unknown_max.contains("fs.pipe-max-size"), "{unknown_max}");
        assert!(unknown_max.contains("pipe-user-pages"), "{unknown_max}");
        let busy = refusal_reason(&io::Error::from_raw_os_error(libc::EBUSY), 4096, max);
        assert!(busy.contains("empty"), "{busy}");
        let nomem = refusal_reason(&io::Error::from_raw_os_error(libc::ENOMEM), 4096, max);
        assert!(nomem.contains("memory"), "{nomem}");
    }

    #[test]
    fn a_refused_size_is_warned_about_once() {
        let flag = AtomicBool::new(false);
        let refusal = SizeRefusal {
            requested: 2 << 20,
            kept: 64 * 1024,
            error: io::Error::from_raw_os_error(libc::EPERM),
            reason: refusal_reason(
                &io::Error::from_raw_os_error(libc::EPERM),
                2 << 20,
                Some(1 << 20),
            ),
        };
        assert!(warn_once(&flag, &refusal));
        assert!(!warn_once(&flag, &refusal));
        assert!(!warn_once(&flag, &refusal));
    }

    #[test]
    fn unsupported_means_einval_enosys_or_eopnotsupp() {
        for errno in [libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP] {
            assert!(is_unsupported(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::EAGAIN, libc::ECONNRESET, libc::EPIPE, libc::ENOMEM] {
            assert!(!is_unsupported(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[cfg(linux_native)]
    #[test]
    fn splice_is_supported_on_linux() {
        assert!(supported());
        assert!(supported(), "the probe's answer is kept");
    }

    #[cfg(not(linux_native))]
    #[test]
    fn the_portable_build_never_splices() {
        assert!(!supported());
        assert!(
            matches!(Pipe::new(&PipeConfig::default()), Err(e) if e.raw_os_error() == Some(libc::ENOSYS))
        );
    }
}
