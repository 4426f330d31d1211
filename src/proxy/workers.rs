//! The threads connections run on: one single-threaded runtime per core.
//!
//! A connection's two legs wake each other for every message; on a
//! work-stealing runtime the task that one socket's readiness wakes may be
//! taken by another thread, which then has to be woken too (a futex and an
//! eventfd write per hand-off), and the scheduler does its own bookkeeping
//! per batch. Here each accepted connection is handed, once, to the data
//! thread with the fewest live connections and stays there: its sockets
//! are registered with that thread's reactor, its task is polled only
//! there, and a burst of ready connections is served in one pass of that
//! thread's event loop. How many threads: `--data-threads`, by default
//! half the cores (see [`Workers::start`]).
//!
//! The accept loops, the HTTP endpoints, reloads, token and certificate
//! refreshes stay on the process's main runtime. A connection's own helper
//! tasks (`tokio::spawn` inside it) run on its data thread. The threads end
//! when [`Workers`] is dropped, after the shutdown sequence has drained or
//! cut every connection.

use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::net::Socket;

/// A connection's task, built on its data thread from its socket.
pub(super) type Job = Box<dyn FnOnce(Socket) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A socket in transit between threads: deregistered from the accepting
/// runtime's reactor, registered with the data thread's.
enum Detached {
    Tcp(std::net::TcpStream),
    #[cfg(keyhole_unix)]
    Unix(std::os::unix::net::UnixStream),
    /// In memory: no reactor to leave or join.
    #[cfg(not(keyhole_unix))]
    Memory(tokio::io::DuplexStream),
}

impl Detached {
    fn from_socket(socket: Socket) -> io::Result<Detached> {
        match socket {
            Socket::Tcp(s) => s.into_std().map(Detached::Tcp),
            #[cfg(keyhole_unix)]
            Socket::Unix(s) => s.into_std().map(Detached::Unix),
            #[cfg(not(keyhole_unix))]
            Socket::Memory(s) => Ok(Detached::Memory(s)),
        }
    }

    /// Must run inside the data thread's runtime.
    fn attach(self) -> io::Result<Socket> {
        match self {
            Detached::Tcp(s) => tokio::net::TcpStream::from_std(s).map(Socket::Tcp),
            #[cfg(keyhole_unix)]
            Detached::Unix(s) => tokio::net::UnixStream::from_std(s).map(Socket::Unix),
            #[cfg(not(keyhole_unix))]
            Detached::Memory(s) => Ok(Socket::Memory(s)),
        }
    }
}

struct Dispatched {
    socket: Detached,
    job: Job,
    load: Load,
}

/// One data thread: its queue of new connections and how many it serves.
struct Worker {
    queue: mpsc::UnboundedSender<Dispatched>,
    live: Arc<AtomicUsize>,
}

/// Counts a connection against its thread while it lives.
struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The data threads. Without any (none could be started), connections run
/// on the runtime that accepted them, as they would with one thread.
pub(super) struct Workers {
    threads: Vec<Worker>,
}

impl Workers {
    /// `threads` data threads, or by default half the cores this process
    /// may use, rounded up: keyhole shares its cores with what it serves (a
    /// sidecar's application, a laptop's client), and one thread that
    /// finds several connections ready per wake-up spends less per message
    /// than two that each find one. (pgbench -S -c 8 on two cores shared
    /// with the client and the server: about 20 µs of proxy CPU per
    /// transaction on one thread, 25 on two, the same TPS; the same TPS at
    /// -c 64 too.) A host that runs keyhole alone may give it every core.
    pub(super) fn start(threads: Option<NonZeroUsize>) -> Workers {
        let count = threads.map_or_else(default_threads, NonZeroUsize::get);
        Workers::with_threads(count)
    }

    pub(super) fn with_threads(count: usize) -> Workers {
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            match spawn_thread(i) {
                Ok(worker) => threads.push(worker),
                Err(e) => {
                    tracing::warn!(error = %e, started = threads.len(), wanted = count, "cannot start a data thread: connections run on the threads there are");
                    break;
                }
            }
        }
        Workers { threads }
    }

    pub(super) fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Runs `job` with `socket` on the data thread with the fewest live
    /// connections (or here, if there is none).
    pub(super) fn dispatch(&self, socket: Socket, job: Job) {
        let Some(worker) = self
            .threads
            .iter()
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
        else {
            tokio::spawn(job(socket));
            return;
        };
        let socket = match Detached::from_socket(socket) {
            Ok(socket) => socket,
            Err(e) => {
                // Deregistering failed: the socket is gone with the error.
                tracing::warn!(error = %e, "cannot hand a connection to a data thread: closed");
                return;
            }
        };
        worker.live.fetch_add(1, Ordering::Relaxed);
        let load = Load(worker.live.clone());
        if let Err(mpsc::error::SendError(lost)) =
            worker.queue.send(Dispatched { socket, job, load })
        {
            // The thread has ended (it panicked): serve it here.
            drop(lost.load);
            match lost.socket.attach() {
                Ok(socket) => {
                    tokio::spawn((lost.job)(socket));
                }
                Err(e) => tracing::warn!(error = %e, "cannot take back a connection: closed"),
            }
        }
    }
}

/// Half the cores this process may use (its CPU affinity and cgroup quota),
/// rounded up.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .div_ceil(2)
}

fn spawn_thread(index: usize) -> io::Result<Worker> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (queue, mut incoming) = mpsc::unbounded_channel::<Dispatched>();
    let live = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name(format!("keyhole-data-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                while let Some(Dispatched { socket, job, load }) = incoming.recv().await {
                    match socket.attach() {
                        Ok(socket) => {
                            let task = job(socket);
                            tokio::spawn(async move {
                                let _load = load;
                                task.await;
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot register a connection with its data thread: closed");
                        }
                    }
                }
            });
            // Dropping the runtime here drops whatever is still running on
            // it: only after the shutdown sequence has cut every connection.
        })?;
    Ok(Worker { queue, live })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_connection_runs_on_a_data_thread_and_its_socket_works_there() {
        let workers = Workers::with_threads(2);
        assert_eq!(workers.threads(), 2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut client = client.expect("connect");
        let (socket, _) = accepted.expect("accept");
        let (ran_on, where_) = tokio::sync::oneshot::channel();
        workers.dispatch(
            Socket::Tcp(socket),
            Box::new(move |mut socket: Socket| {
                Box::pin(async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    let mut buf = [0u8; 4];
                    socket.read_exact(&mut buf).await.expect("read");
                    socket.write_all(&buf).await.expect("echo");
                    let _ = ran_on.send(name);
                })
            }),
        );
        client.write_all(b"ping").await.expect("write");
        let mut echoed = [0u8; 4];
        client.read_exact(&mut echoed).await.expect("read the echo");
        assert_eq!(&echoed, b"ping");
        let name = where_.await.expect("the job ran").unwrap_or_default();
        assert!(name.starts_with("keyhole-data-"), "ran on {name:?}");
    }

    #[tokio::test]
    async fn new_connections_go_to_the_least_loaded_thread() {
        let workers = Workers::with_threads(2);
        workers.threads[0].live.store(5, Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (_client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (socket, _) = accepted.expect("accept");
        let (done, finished) = tokio::sync::oneshot::channel();
        let (hold, held) = tokio::sync::oneshot::channel::<()>();
        workers.dispatch(
            Socket::Tcp(socket),
            Box::new(move |_socket: Socket| {
                Box::pin(async move {
                    let _ = done.send(std::thread::current().name().map(str::to_owned));
                    let _ = held.await;
                })
            }),
        );
        let name = finished.await.expect("ran").unwrap_or_default();
        assert_eq!(name, "keyhole-data-1");
        assert_eq!(workers.threads[1].live.load(Ordering::Relaxed), 1);
        drop(hold);
        // The count goes down when the connection's task ends.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while workers.threads[1].live.load(Ordering::Relaxed) != 0 {
            assert!(tokio::time::Instant::now() < deadline, "never released");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
