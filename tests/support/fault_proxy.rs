//! A TCP relay of the test suite's own, between keyhole and a real server,
//! that misbehaves on request: the upstream faults of issue 15 (a reset, a
//! stall, a half-close, a TLS record cut short, silence, a trickle, another
//! server behind the same address) made on demand, per connection, on
//! loopback only.
//!
//! keyhole's target points at the proxy (`postgres://127.0.0.1:PORT?server-name=localhost`:
//! the real servers' certificates carry `localhost`, `db.internal`,
//! `127.0.0.1` and `::1`, see [`super::certs`]); the proxy dials the real
//! server for every connection keyhole opens and relays the bytes both ways,
//! TLS included, without reading them, except to find TLS record boundaries
//! for [`Fault::TruncateRecordAfter`].
//!
//! # API
//!
//! - [`FaultProxy::start`]`(upstream, preamble)` listens on a free port of
//!   127.0.0.1; [`FaultProxy::start_on`]`(listen, upstream, preamble)` on a
//!   given loopback address (say 127.0.0.2:PORT, for a name that moves).
//!   `preamble` says what the server sends before its TLS records
//!   ([`Preamble::Postgres`]: the `S` answering the SSLRequest;
//!   [`Preamble::Mysql`]: the greeting packet).
//! - What new connections get: [`FaultProxy::set_default`]`(fault)` for
//!   every one, [`FaultProxy::plan_next`]`(fault)` for the next one only
//!   (queued, first in first out); [`FaultProxy::set_upstream`]`(addr)`:
//!   where new connections go (a server with another certificate, say).
//! - Connections, numbered from 0 in accept order:
//!   [`FaultProxy::connections`]`()` (how many so far),
//!   [`FaultProxy::connection`]`(index) -> Connection`. A [`Connection`]
//!   handle: `set(fault)` changes its fault now (byte counts start from
//!   here: arm a fault after the login, say), `phase()`,
//!   `wait_phase(phase, limit)`, `server_to_client()` (bytes written to
//!   keyhole), `client_to_server()` (bytes read from keyhole).
//!
//! Byte counts in a fault ("after N bytes") are bytes from the server to
//! keyhole, counted from the moment the fault took effect: the connection's
//! start for a planned fault, the call for [`Connection::set`].
//!
//! Every connection is one thread that polls both sockets (so a reset can
//! close the only descriptor of a socket). Dropping the proxy stops
//! accepting, closes every connection it still holds (a held server socket
//! with unread bytes is reset, which ends a server backend stuck writing to
//! it) and joins the threads.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay both ways, ends included (a FIN is passed on as a FIN).
    Pass,
    /// After this many bytes from the server, reset both sockets (RST:
    /// SO_LINGER 0 and close) without passing on anything more.
    ResetAfter(u64),
    /// Reset both sockets at the first byte keyhole sends (it is not passed
    /// on): armed after the login, the first query's bytes.
    ResetOnClientData,
    /// After this many bytes from the server, stop reading from it and stop
    /// writing to keyhole; both sockets stay open and keyhole's bytes still
    /// go to the server. The server's sends back up. [`Connection::set`]
    /// with another fault (say `Pass`) resumes.
    StallAfter(u64),
    /// After this many bytes from the server and the end of the TLS record
    /// under way, shut down the write half toward keyhole: a FIN where the
    /// TLS stream had no close_notify. The server is no longer read;
    /// keyhole's bytes still go to it.
    HalfCloseAfter(u64),
    /// After this many bytes from the server, finish the TLS record under
    /// way, pass on the next record's header and half of its body, then a
    /// FIN toward keyhole (as [`Fault::HalfCloseAfter`] from there).
    TruncateRecordAfter(u64),
    /// As a plan for a new connection: accept it and never dial the server,
    /// never answer; what keyhole sends is read and counted. (On a
    /// connection already relaying, the same as `StallAfter(0)`.)
    Silent,
    /// Pass the server's bytes on one at a time, this long apart.
    Trickle(Duration),
}

/// What the server sends before its TLS records, for
/// [`Fault::TruncateRecordAfter`] to find the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// One byte: `S`, the answer to keyhole's SSLRequest.
    Postgres,
    /// One packet: the server's greeting (keyhole's SSLRequest goes the
    /// other way).
    Mysql,
    /// TLS from the first byte.
    None,
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Bytes flow (at their fault's pace).
    Relaying,
    /// Accepted and left unanswered ([`Fault::Silent`]).
    Silent,
    /// Holding the server's bytes ([`Fault::StallAfter`]).
    Stalled,
    /// Both sockets were reset.
    Reset,
    /// FIN sent toward keyhole by [`Fault::HalfCloseAfter`].
    HalfClosed,
    /// A record cut short and a FIN sent by [`Fault::TruncateRecordAfter`].
    Truncated,
    /// The server could not be reached; keyhole's connection was closed.
    ConnectFailed,
    /// Over: both ends closed (or the proxy was dropped) while relaying. A
    /// connection that ended under a fault keeps that fault's phase.
    Closed,
}

/// How long the relay sleeps in poll(2) at most before it looks at its
/// fault again (a test may have changed it).
const TICK: Duration = Duration::from_millis(20);
/// Read size for each direction.
const BUF: usize = 64 * 1024;

struct Control {
    fault: Fault,
    /// Bytes read from the server when `fault` took effect.
    armed_at: u64,
    /// Counts [`Connection::set`] calls: a relay that finds it changed
    /// after waiting moves no byte under the old fault.
    generation: u64,
    phase: Phase,
}

struct ConnShared {
    control: Mutex<Control>,
    changed: Condvar,
    /// Bytes read from the server so far.
    from_server: AtomicU64,
    /// Bytes written to keyhole so far.
    to_client: AtomicU64,
    /// Bytes read from keyhole so far.
    from_client: AtomicU64,
}

impl ConnShared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        let mut control = self.lock();
        if control.phase != phase {
            control.phase = phase;
            self.changed.notify_all();
        }
    }
}

/// A handle on one relayed connection.
#[derive(Clone)]
pub struct Connection {
    index: usize,
    shared: Arc<ConnShared>,
}

impl Connection {
    /// Its number, in accept order from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Changes its fault now; byte counts in `fault` start from here.
    pub fn set(&self, fault: Fault) {
        let mut control = self.shared.lock();
        control.fault = fault;
        control.armed_at = self.shared.from_server.load(Ordering::SeqCst);
        control.generation += 1;
        self.shared.changed.notify_all();
    }

    pub fn phase(&self) -> Phase {
        self.shared.lock().phase
    }

    /// Waits until the connection is in `phase`; panics after `limit`.
    pub fn wait_phase(&self, phase: Phase, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut control = self.shared.lock();
        while control.phase != phase {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "fault proxy connection {} never reached {phase:?} within {limit:?} \
                     (it is {:?}, fault {:?}; {} bytes to keyhole, {} from it)",
                    self.index,
                    control.phase,
                    control.fault,
                    self.server_to_client(),
                    self.client_to_server()
                );
            }
            control = self
                .shared
                .changed
                .wait_timeout(control, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Bytes written to keyhole so far.
    pub fn server_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::SeqCst)
    }

    /// Bytes read from keyhole so far.
    pub fn client_to_server(&self) -> u64 {
        self.shared.from_client.load(Ordering::SeqCst)
    }
}

struct ProxyShared {
    stop: AtomicBool,
    upstream: Mutex<SocketAddr>,
    default: Mutex<Fault>,
    planned: Mutex<VecDeque<Fault>>,
    connections: Mutex<Vec<Connection>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    preamble: Preamble,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The relay; see the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 in front of `upstream`,
    /// relaying every connection ([`Fault::Pass`]) until told otherwise.
    pub fn start(upstream: SocketAddr, preamble: Preamble) -> FaultProxy {
        FaultProxy::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream, preamble)
            .expect("bind the fault proxy on 127.0.0.1")
    }

    /// As [`FaultProxy::start`], listening on `listen` (a loopback address;
    /// port 0 picks one). Err if it cannot be bound (a port taken).
    pub fn start_on(
        listen: SocketAddr,
        upstream: SocketAddr,
        preamble: Preamble,
    ) -> io::Result<FaultProxy> {
        assert!(
            listen.ip().is_loopback() && upstream.ip().is_loopback(),
            "the fault proxy relays between loopback addresses only ({listen} -> {upstream})"
        );
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ProxyShared {
            stop: AtomicBool::new(false),
            upstream: Mutex::new(upstream),
            default: Mutex::new(Fault::Pass),
            planned: Mutex::new(VecDeque::new()),
            connections: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            preamble,
        });
        let state = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, state));
        Ok(FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where new connections go from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        assert!(upstream.ip().is_loopback(), "{upstream} is not loopback");
        *locked(&self.shared.upstream) = upstream;
    }

    /// The fault of every new connection without a planned one.
    pub fn set_default(&self, fault: Fault) {
        *locked(&self.shared.default) = fault;
    }

    /// The fault of the next new connection only (plans queue up).
    pub fn plan_next(&self, fault: Fault) {
        locked(&self.shared.planned).push_back(fault);
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        locked(&self.shared.connections).len()
    }

    /// Connection number `index` (from 0, in accept order); panics if there
    /// is none (yet).
    pub fn connection(&self, index: usize) -> Connection {
        locked(&self.shared.connections)
            .get(index)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "the fault proxy on {} has accepted only {} connection(s), not #{index}",
                    self.addr,
                    self.connections()
                )
            })
    }

    /// Waits until `count` connections were accepted; panics after `limit`.
    pub fn wait_connections(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.connections() < count {
            assert!(
                Instant::now() < deadline,
                "the fault proxy on {} accepted {} connection(s), not {count}, within {limit:?}",
                self.addr,
                self.connections()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for connection in locked(&self.shared.connections).iter() {
            connection.shared.changed.notify_all();
        }
        let threads = std::mem::take(&mut *locked(&self.shared.threads));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        if !wait_readable(&listener, TICK) {
            continue;
        }
        let Ok((client, _)) = listener.accept() else {
            continue;
        };
        let fault = locked(&shared.planned)
            .pop_front()
            .unwrap_or(*locked(&shared.default));
        let conn = Arc::new(ConnShared {
            control: Mutex::new(Control {
                fault,
                armed_at: 0,
                generation: 0,
                phase: Phase::Relaying,
            }),
            changed: Condvar::new(),
            from_server: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            from_client: AtomicU64::new(0),
        });
        {
            let mut connections = locked(&shared.connections);
            let index = connections.len();
            connections.push(Connection {
                index,
                shared: conn.clone(),
            });
        }
        let upstream = *locked(&shared.upstream);
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            serve(client, upstream, &conn, &state);
            conn.set_phase_final();
        });
        locked(&shared.threads).push(thread);
    }
}

impl ConnShared {
    /// The end of a connection: `Closed`, unless it ended in a fault's
    /// own phase (`Stalled`, `Reset`, ...), which the test may want to read
    /// afterwards.
    fn set_phase_final(&self) {
        let mut control = self.lock();
        if matches!(control.phase, Phase::Relaying | Phase::Silent) {
            control.phase = Phase::Closed;
        }
        self.changed.notify_all();
    }
}

/// poll(2) for one socket: readable (or at its end) within `limit`?
fn wait_readable(socket: &impl AsRawFd, limit: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    poll(&mut fds, limit) > 0
}

fn poll(fds: &mut [libc::pollfd], limit: Duration) -> i32 {
    let millis = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    let count = libc::nfds_t::try_from(fds.len()).expect("a few descriptors");
    // SAFETY: `fds` is a valid, writable array of `count` pollfd structs for
    // the whole call.
    unsafe { libc::poll(fds.as_mut_ptr(), count, millis) }
}

fn reset(socket: TcpStream) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    drop(socket);
}

fn serve(client: TcpStream, upstream: SocketAddr, conn: &ConnShared, proxy: &ProxyShared) {
    let _ = client.set_nodelay(true);
    if conn.lock().fault == Fault::Silent {
        conn.set_phase(Phase::Silent);
        silent(client, conn, proxy);
        return;
    }
    let server = match TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) {
        Ok(server) => server,
        Err(_) => {
            conn.set_phase(Phase::ConnectFailed);
            return;
        }
    };
    let _ = server.set_nodelay(true);
    if client.set_nonblocking(true).is_err() || server.set_nonblocking(true).is_err() {
        return;
    }
    Relay {
        client: Some(client),
        server: Some(server),
        conn,
        proxy,
        records: Records::new(proxy.preamble),
        to_client: Pending::default(),
        to_server: Pending::default(),
        server_eof: false,
        client_eof: false,
        client_write_shut: false,
        server_write_shut: false,
        server_done: false,
        cut: None,
        next_trickle: Instant::now(),
    }
    .run();
}

/// [`Fault::Silent`]: read and count what keyhole sends, answer nothing.
fn silent(mut client: TcpStream, conn: &ConnShared, proxy: &ProxyShared) {
    let mut buf = [0u8; 4096];
    while !proxy.stop.load(Ordering::SeqCst) {
        if !wait_readable(&client, TICK) {
            continue;
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                conn.from_client.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
}

/// Bytes read from one side, not yet all written to the other.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    at: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.at >= self.buf.len()
    }
    fn rest(&self) -> &[u8] {
        &self.buf[self.at..]
    }
}

/// Where [`Fault::TruncateRecordAfter`] is in cutting a record.
struct Cut {
    /// The record's header, as read so far.
    header: Vec<u8>,
    /// Server byte count at which to stop (known once the header is read).
    end: Option<u64>,
}

struct Relay<'a> {
    client: Option<TcpStream>,
    server: Option<TcpStream>,
    conn: &'a ConnShared,
    proxy: &'a ProxyShared,
    records: Records,
    to_client: Pending,
    to_server: Pending,
    server_eof: bool,
    client_eof: bool,
    client_write_shut: bool,
    server_write_shut: bool,
    /// Nothing more goes from the server to keyhole (a fault ended it).
    server_done: bool,
    cut: Option<Cut>,
    next_trickle: Instant,
}

/// What the server→client direction may do in this round.
enum Downstream {
    /// Read at most this many bytes from the server (0: not now).
    Read(usize),
    /// Reset both sockets.
    Reset,
    /// Send a FIN toward keyhole and stop relaying this way.
    Finish(Phase),
}

impl Relay<'_> {
    fn run(mut self) {
        let mut buf = vec![0u8; BUF];
        loop {
            if self.proxy.stop.load(Ordering::SeqCst) {
                return;
            }
            let (fault, armed_at, generation) = {
                let control = self.conn.lock();
                (control.fault, control.armed_at, control.generation)
            };
            let from_server = self.conn.from_server.load(Ordering::SeqCst);
            let since = from_server.saturating_sub(armed_at);

            // Server → keyhole: what may be read now.
            let mut read_cap = 0;
            let mut wait = TICK;
            if self.to_client.is_empty() && !self.server_eof && !self.server_done {
                match self.downstream(fault, since, from_server) {
                    Downstream::Read(n) => read_cap = n,
                    Downstream::Reset => {
                        self.conn.set_phase(Phase::Reset);
                        self.reset_both();
                        return;
                    }
                    Downstream::Finish(phase) => {
                        // The phase first: a test that sees the effect
                        // finds the phase set.
                        self.conn.set_phase(phase);
                        if let Some(client) = &self.client {
                            let _ = client.shutdown(Shutdown::Write);
                        }
                        self.client_write_shut = true;
                        self.server_done = true;
                    }
                }
                if let Fault::Trickle(_) = fault {
                    let now = Instant::now();
                    if now < self.next_trickle {
                        read_cap = 0;
                        wait = wait.min(self.next_trickle - now);
                    }
                }
                let stalled = read_cap == 0
                    && !self.server_done
                    && matches!(fault, Fault::StallAfter(_) | Fault::Silent);
                if stalled {
                    self.conn.set_phase(Phase::Stalled);
                } else if self.conn.lock().phase == Phase::Stalled {
                    self.conn.set_phase(Phase::Relaying);
                }
            }
            // The server ended cleanly and all is passed on: pass the end on.
            if self.server_eof && self.to_client.is_empty() && !self.client_write_shut {
                if let Some(client) = &self.client {
                    let _ = client.shutdown(Shutdown::Write);
                }
                self.client_write_shut = true;
            }
            if self.client_eof && self.to_server.is_empty() && !self.server_write_shut {
                if let Some(server) = &self.server {
                    let _ = server.shutdown(Shutdown::Write);
                }
                self.server_write_shut = true;
            }
            let downstream_over = self.server_done || (self.server_eof && self.client_write_shut);
            if self.client_eof && self.server_write_shut && downstream_over {
                self.close_both();
                return;
            }

            let (Some(client), Some(server)) = (&self.client, &self.server) else {
                return;
            };
            let read_client = self.to_server.is_empty() && !self.client_eof;
            // A socket the relay wants nothing from now is left out (a
            // hang-up there is found when it is next read or written, not
            // while a fault holds it).
            let mut fds = [
                pollfd(client, read_client, !self.to_client.is_empty()),
                pollfd(server, read_cap > 0, !self.to_server.is_empty()),
            ];
            if poll(&mut fds, wait) <= 0 || self.conn.lock().generation != generation {
                continue;
            }
            let (client_ready, server_ready) = (fds[0].revents, fds[1].revents);
            let broken = libc::POLLERR | libc::POLLNVAL | libc::POLLHUP;
            let read_server = read_cap > 0;

            // keyhole → server.
            if read_client && client_ready & (libc::POLLIN | broken) != 0 {
                match read_some(self.client.as_mut(), &mut buf) {
                    Io::End => self.client_eof = true,
                    Io::Moved(n) => {
                        self.conn.from_client.fetch_add(n as u64, Ordering::SeqCst);
                        if fault == Fault::ResetOnClientData {
                            self.conn.set_phase(Phase::Reset);
                            self.reset_both();
                            return;
                        }
                        self.to_server = Pending {
                            buf: buf[..n].to_vec(),
                            at: 0,
                        };
                    }
                    Io::Again => {}
                    Io::Failed => return self.close_both(),
                }
            }
            if !self.to_server.is_empty() && server_ready & (libc::POLLOUT | broken) != 0 {
                match write_some(self.server.as_mut(), self.to_server.rest()) {
                    Io::Moved(n) => self.to_server.at += n,
                    Io::Again | Io::End => {}
                    Io::Failed => return self.close_both(),
                }
            }

            // server → keyhole.
            if read_server && server_ready & (libc::POLLIN | broken) != 0 {
                let cap = read_cap.min(BUF);
                match read_some(self.server.as_mut(), &mut buf[..cap]) {
                    Io::End => self.server_eof = true,
                    Io::Moved(n) => {
                        self.conn.from_server.fetch_add(n as u64, Ordering::SeqCst);
                        self.records.feed(&buf[..n]);
                        if let Some(cut) = &mut self.cut {
                            if cut.end.is_none() {
                                cut.header.extend_from_slice(&buf[..n]);
                            }
                        }
                        self.to_client = Pending {
                            buf: buf[..n].to_vec(),
                            at: 0,
                        };
                        if let Fault::Trickle(delay) = fault {
                            self.next_trickle = Instant::now() + delay;
                        }
                    }
                    Io::Again => {}
                    Io::Failed => return self.close_both(),
                }
            }
            if !self.to_client.is_empty() && client_ready & (libc::POLLOUT | broken) != 0 {
                match write_some(self.client.as_mut(), self.to_client.rest()) {
                    Io::Moved(n) => {
                        self.to_client.at += n;
                        self.conn.to_client.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Io::Again | Io::End => {}
                    Io::Failed => return self.close_both(),
                }
            }
        }
    }

    /// The server→keyhole direction's next step under `fault`, `since`
    /// bytes after it took effect (`from_server` in all).
    fn downstream(&mut self, fault: Fault, since: u64, from_server: u64) -> Downstream {
        let left = |limit: u64| usize::try_from(limit.saturating_sub(since)).unwrap_or(BUF);
        match fault {
            Fault::Pass | Fault::ResetOnClientData => Downstream::Read(BUF),
            Fault::Silent => Downstream::Read(0),
            Fault::Trickle(_) => Downstream::Read(1),
            Fault::ResetAfter(limit) => match left(limit) {
                0 => Downstream::Reset,
                n => Downstream::Read(n),
            },
            Fault::StallAfter(limit) => Downstream::Read(left(limit)),
            Fault::HalfCloseAfter(limit) => match left(limit) {
                // A server closes between records: finish the one under way.
                0 if self.records.at_boundary() => Downstream::Finish(Phase::HalfClosed),
                0 => Downstream::Read(self.records.to_boundary()),
                n => Downstream::Read(n),
            },
            Fault::TruncateRecordAfter(limit) => {
                let n = left(limit);
                if n > 0 {
                    return Downstream::Read(n);
                }
                match &mut self.cut {
                    None if self.records.at_boundary() => {
                        self.cut = Some(Cut {
                            header: Vec::new(),
                            end: None,
                        });
                        Downstream::Read(RECORD_HEADER)
                    }
                    // Finish the record (or preamble) under way first.
                    None => Downstream::Read(self.records.to_boundary()),
                    Some(cut) => {
                        if cut.end.is_none() && cut.header.len() >= RECORD_HEADER {
                            let length =
                                u64::from(u16::from_be_bytes([cut.header[3], cut.header[4]]));
                            // Half the body, at least one byte short of it.
                            cut.end =
                                Some(from_server + (length / 2).min(length.saturating_sub(1)));
                        }
                        match cut.end {
                            None => Downstream::Read(RECORD_HEADER - cut.header.len()),
                            Some(end) if from_server >= end => Downstream::Finish(Phase::Truncated),
                            Some(end) => {
                                Downstream::Read(usize::try_from(end - from_server).unwrap_or(BUF))
                            }
                        }
                    }
                }
            }
        }
    }

    fn reset_both(&mut self) {
        if let Some(client) = self.client.take() {
            reset(client);
        }
        if let Some(server) = self.server.take() {
            reset(server);
        }
    }

    /// The end: a socket holding unread bytes is reset by the kernel.
    fn close_both(&mut self) {
        self.client = None;
        self.server = None;
    }
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        // A server socket still open here is given up on (the proxy stops, or
        // keyhole's side failed): reset it, so a backend blocked writing to
        // it ends at once.
        if let Some(server) = self.server.take() {
            reset(server);
        }
    }
}

/// What to poll `socket` for; a negative descriptor (ignored by poll(2))
/// when nothing.
fn pollfd(socket: &TcpStream, read: bool, write: bool) -> libc::pollfd {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    libc::pollfd {
        fd: if events == 0 { -1 } else { socket.as_raw_fd() },
        events,
        revents: 0,
    }
}

/// What one nonblocking read or write did.
enum Io {
    /// Moved this many bytes (a read: at least one).
    Moved(usize),
    /// A read found the end of the stream.
    End,
    /// Nothing to do now.
    Again,
    /// The socket failed (reset, ...).
    Failed,
}

fn read_some(socket: Option<&mut TcpStream>, buf: &mut [u8]) -> Io {
    let Some(socket) = socket else {
        return Io::Failed;
    };
    match socket.read(buf) {
        Ok(0) => Io::End,
        Ok(n) => Io::Moved(n),
        Err(e) if is_again(&e) => Io::Again,
        Err(_) => Io::Failed,
    }
}

fn write_some(socket: Option<&mut TcpStream>, bytes: &[u8]) -> Io {
    let Some(socket) = socket else {
        return Io::Failed;
    };
    match socket.write(bytes) {
        Ok(n) => Io::Moved(n),
        Err(e) if is_again(&e) => Io::Again,
        Err(_) => Io::Failed,
    }
}

fn is_again(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// A TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;

/// Where the server's byte stream is, record by record.
struct Records {
    state: RecordState,
}

enum RecordState {
    /// The MySQL greeting's packet header, as read so far.
    MysqlHeader(Vec<u8>),
    /// Bytes before the records still to come (preamble).
    Skip(usize),
    /// A record header, as read so far.
    Header(Vec<u8>),
    /// Body bytes of the current record still to come.
    Body(usize),
}

impl Records {
    fn new(preamble: Preamble) -> Records {
        Records {
            state: match preamble {
                Preamble::Postgres => RecordState::Skip(1),
                Preamble::Mysql => RecordState::MysqlHeader(Vec::new()),
                Preamble::None => RecordState::Header(Vec::new()),
            },
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                RecordState::MysqlHeader(got) => {
                    let take = (4 - got.len()).min(bytes.len());
                    got.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if got.len() == 4 {
                        let length = usize::from(got[0])
                            | usize::from(got[1]) << 8
                            | usize::from(got[2]) << 16;
                        self.state = RecordState::Skip(length);
                    }
                }
                RecordState::Skip(left) => {
                    let take = (*left).min(bytes.len());
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.state = RecordState::Header(Vec::new());
                    }
                }
                RecordState::Header(got) => {
                    let take = (RECORD_HEADER - got.len()).min(bytes.len());
                    got.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if got.len() == RECORD_HEADER {
                        let length = usize::from(u16::from_be_bytes([got[3], got[4]]));
                        self.state = if length == 0 {
                            RecordState::Header(Vec::new())
                        } else {
                            RecordState::Body(length)
                        };
                    }
                }
                RecordState::Body(left) => {
                    let take = (*left).min(bytes.len());
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.state = RecordState::Header(Vec::new());
                    }
                }
            }
        }
    }

    /// Between two records (past the preamble)?
    fn at_boundary(&self) -> bool {
        matches!(&self.state, RecordState::Header(got) if got.is_empty())
    }

    /// How many bytes may be read without passing the next boundary (or
    /// the next point where the length of what follows becomes known).
    fn to_boundary(&self) -> usize {
        match &self.state {
            RecordState::MysqlHeader(got) => 4 - got.len(),
            RecordState::Skip(left) | RecordState::Body(left) => *left,
            RecordState::Header(got) => RECORD_HEADER - got.len(),
        }
    }
}
