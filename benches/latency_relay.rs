//! A TCP relay that delays every byte by a fixed one-way delay, each way: a slow link on
//! loopback for scripts/bench.sh's latency group (this kernel has no netem, so `tc qdisc
//! ... netem delay` is not an option).
//!
//! Built with `cargo build --release --example latency_relay` (an example, like
//! benches/synthetic.rs).
//!
//! ```text
//! latency_relay --listen ADDR --upstream ADDR --delay-ms MS [--max-queue-kib KIB]
//! ```
//!
//! It prints `listening ADDR` once it listens, then for each accepted connection opens
//! one to the upstream address and forwards bytes both ways. Each chunk read from one
//! side is delivered to the other MS milliseconds (a fraction, e.g. 0.5) after it was
//! read, in order: chunks wait in a queue per direction with the time they were read,
//! and the writer sleeps until each one's time has come. The delay is not a rate: a
//! chunk whose time has passed is written at once, however many came before it, so
//! the bandwidth is the sockets'. `--delay-ms 0.5` makes a round trip about 1 ms
//! longer. Memory is bounded: a direction stops reading while its queue holds more
//! than --max-queue-kib (default 4096) KiB, which TCP then pushes back to the sender.
//! An end of stream is delivered as one too (a FIN, after the same delay); an error on
//! either side closes the connection both ways.
//!
//! On Linux the writer sleeps on a timerfd (CLOCK_MONOTONIC, absolute deadlines), whose
//! precision is microseconds; tokio's own timer rounds up to whole milliseconds, which
//! would turn 0.5 ms into anything from 0.5 to 1.5. Elsewhere tokio's timer is used.
//! TCP_NODELAY is set on both sockets, so the relay adds no delay of Nagle's.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// The most one read takes from a socket.
const CHUNK: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "A TCP relay with a fixed one-way delay each way, for scripts/bench.sh")]
struct Cli {
    /// Where to listen, e.g. 127.0.0.1:7000.
    #[arg(long)]
    listen: SocketAddr,
    /// Where each accepted connection is relayed to.
    #[arg(long)]
    upstream: SocketAddr,
    /// The one-way delay in milliseconds, each way (0.5: a round trip 1 ms longer).
    #[arg(long, value_parser = parse_delay)]
    delay_ms: Duration,
    /// A direction stops reading while its queue holds more than this many KiB.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    max_queue_kib: u32,
}

fn parse_delay(text: &str) -> Result<Duration, String> {
    let ms: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if !ms.is_finite() || !(0.0..=10_000.0).contains(&ms) {
        return Err("the delay must be between 0 and 10000 ms".into());
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

/// What waits in a direction's queue: bytes, or the end of the stream, with the time
/// they are due (on the clock of `timer::now`) and the queue space they take.
enum Item {
    Data(Vec<u8>, Duration, OwnedSemaphorePermit),
    End(Duration),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> io::Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind(cli.listen).await?;
    println!("listening {}", listener.local_addr()?);
    let limit = cli.max_queue_kib as usize * 1024;
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // (out of descriptors, say: wait a little rather than spin)
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (upstream, delay) = (cli.upstream, cli.delay_ms);
        tokio::spawn(async move {
            if let Err(e) = relay(client, upstream, delay, limit).await {
                // (a peer that resets is the usual end of a benchmark's connection)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) {
                    eprintln!("connection: {e}");
                }
            }
        });
    }
}

/// One accepted connection: its upstream connection, and both directions until both
/// streams have ended (or either side fails, which drops both sockets).
async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    delay: Duration,
    limit: usize,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("connect to upstream {upstream}: {e}")))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let up_room = Arc::new(Semaphore::new(limit));
    let down_room = Arc::new(Semaphore::new(limit));
    tokio::try_join!(
        read_side(client_read, up_tx, up_room, delay),
        write_side(up_rx, server_write),
        read_side(server_read, down_tx, down_room, delay),
        write_side(down_rx, client_write),
    )?;
    Ok(())
}

/// Reads chunks into the queue, each stamped with the time it is due: now plus the
/// delay. Waits for room in the queue before each read.
async fn read_side(
    mut from: OwnedReadHalf,
    queue: mpsc::UnboundedSender<Item>,
    room: Arc<Semaphore>,
    delay: Duration,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut permit = room
            .clone()
            .acquire_many_owned(CHUNK as u32)
            .await
            .map_err(io::Error::other)?;
        let n = from.read(&mut buf).await?;
        let due = timer::now() + delay;
        let item = if n == 0 {
            Item::End(due)
        } else {
            // (the queue holds what was read, not a whole chunk's room)
            let held = permit.split(n).expect("n <= CHUNK permits");
            Item::Data(buf[..n].to_vec(), due, held)
        };
        drop(permit);
        let end = matches!(item, Item::End(_));
        if queue.send(item).is_err() {
            // (the writer failed: the connection is going away)
            return Ok(());
        }
        if end {
            return Ok(());
        }
    }
}

/// Writes each queued chunk once it is due, in order; the end of the stream shuts the
/// socket's sending side down when it is due.
async fn write_side(
    mut queue: mpsc::UnboundedReceiver<Item>,
    mut to: OwnedWriteHalf,
) -> io::Result<()> {
    let mut timer = timer::Timer::new()?;
    while let Some(item) = queue.recv().await {
        match item {
            Item::Data(bytes, due, permit) => {
                timer.sleep_until(due).await?;
                to.write_all(&bytes).await?;
                drop(permit);
            }
            Item::End(due) => {
                timer.sleep_until(due).await?;
                // (the other side may be gone already: nothing left to tell it)
                let _ = to.shutdown().await;
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod timer {
    //! Deadlines on CLOCK_MONOTONIC, slept on with a timerfd (microsecond precision).

    use std::fs::File;
    use std::io::{self, Read};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Duration;

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    /// CLOCK_MONOTONIC, as a duration since its (arbitrary) origin.
    pub fn now() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec to write into; CLOCK_MONOTONIC always exists.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    pub struct Timer {
        fd: AsyncFd<File>,
    }

    impl Timer {
        pub fn new() -> io::Result<Self> {
            // SAFETY: plain system call; the result is checked before use.
            let fd = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a new descriptor that nothing else owns.
            let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            // SAFETY: the File owns the descriptor and lives in the AsyncFd until it is
            // dropped, so the descriptor stays open and the same for its whole lifetime.
            let fd = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }?;
            Ok(Self { fd })
        }

        /// Returns once CLOCK_MONOTONIC has reached `due` (at once if it has already).
        pub async fn sleep_until(&mut self, due: Duration) -> io::Result<()> {
            if due <= now() {
                return Ok(());
            }
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: due.as_secs() as libc::time_t,
                    tv_nsec: due.subsec_nanos() as libc::c_long,
                },
            };
            // SAFETY: the descriptor is a timerfd of ours; spec is valid, the old
            // value is not asked for.
            let rc = unsafe {
                libc::timerfd_settime(
                    std::os::fd::AsRawFd::as_raw_fd(self.fd.get_ref()),
                    libc::TFD_TIMER_ABSTIME,
                    &spec,
                    std::ptr::null_mut(),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            loop {
                let mut ready = self.fd.readable().await?;
                let mut expirations = [0u8; 8];
                match ready.try_io(|file| {
                    let mut file: &File = file.get_ref();
                    file.read(&mut expirations)
                }) {
                    Ok(result) => return result.map(|_| ()),
                    // (not expired yet: readiness is cleared, wait again)
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod timer {
    //! tokio's timer (whole milliseconds) where there is no timerfd.

    use std::io;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    static ORIGIN: OnceLock<Instant> = OnceLock::new();

    pub fn now() -> Duration {
        ORIGIN.get_or_init(Instant::now).elapsed()
    }

    pub struct Timer;

    impl Timer {
        pub fn new() -> io::Result<Self> {
            Ok(Self)
        }

        pub async fn sleep_until(&mut self, due: Duration) -> io::Result<()> {
            let origin = *ORIGIN.get_or_init(Instant::now);
            tokio::time::sleep_until((origin + due).into()).await;
            Ok(())
        }
    }
}
