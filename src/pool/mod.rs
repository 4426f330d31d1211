//! Server-connection pooling (`pool=session`) for targets where keyhole
//! itself logs in: a connection authenticated with keyhole's token or
//! password is handed, after a reset, to the next client with the same key
//! (database user, database, startup parameters).
//!
//! This module is the protocol-independent part: idle connections by key,
//! one size limit per target (idle, in use and being opened together), a
//! FIFO queue of clients waiting for a connection, the idle timeout and the
//! maximum lifetime, and the counters behind `/metrics`. What depends on
//! the protocol (is an idle connection still alive and clean, reset it,
//! close it politely) is behind [`ServerConnection`]; `postgres` holds the
//! Postgres side (the login replay to the client, `DISCARD ALL`, the relay
//! that frames messages just enough to know when a connection may go
//! back). MySQL (`COM_RESET_CONNECTION`) is another implementation of the
//! same trait.
//!
//! Every connection the pool counts is held by exactly one owner at a time:
//! an [`Idle`] entry, a [`Lease`] (a client uses it), or a [`Slot`] (a
//! client is opening it). Leases and slots give their share of the limit
//! back when dropped, whatever path drops them (a client that vanished, a
//! waiter that timed out with a grant in flight), so the count cannot leak.

pub mod auth;
pub mod mysql;
pub mod postgres;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::PoolSettings;
use crate::metrics::PoolMetrics;

/// The protocol-specific operations on a pooled server connection.
pub trait ServerConnection: Send + 'static {
    /// Without blocking: has the server closed the connection or sent
    /// something nobody asked for (an idle server sends nothing)? Either
    /// makes the connection unusable.
    fn is_alive(&mut self) -> bool;
    /// Puts the session back to the state of a fresh login with the same
    /// startup parameters (Postgres `DISCARD ALL`, MySQL
    /// `COM_RESET_CONNECTION`); an error means the connection is closed.
    fn reset(&mut self, limit: Duration) -> impl Future<Output = Result<(), String>> + Send;
    /// Says goodbye to the server (best effort) and closes.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// What selects a pooled connection: the protocol's encoding of the
/// database user, the database and every startup parameter that shapes the
/// session. Opaque bytes here; never shown (it holds a user name).
pub type Key = Box<[u8]>;

/// Why a connection left the pool, for `keyhole_pool_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    IdleTimeout,
    MaxLifetime,
    /// The server closed it or sent something while idle.
    ServerClosed,
    /// The client left mid-transaction, mid-statement or mid-COPY, or the
    /// connection failed while in use.
    NotReusable,
    /// The reset failed.
    ResetFailed,
    /// Closed to make room for a client of another key.
    Evicted,
    /// The target went away or keyhole stops.
    Shutdown,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::ServerClosed => "server_closed",
            CloseReason::NotReusable => "not_reusable",
            CloseReason::ResetFailed => "reset_failed",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("all {size} server connections of the pool are in use (pool-size={size}); none came free within {}", crate::upstream::humanize(*.waited))]
    Exhausted { size: usize, waited: Duration },
    #[error("the target's connection pool is closed (keyhole is stopping or reloading)")]
    Closed,
}

/// One target's pool. Dropping it (the target goes away) closes the idle
/// connections; connections in use are closed when their clients leave.
pub struct Pool<C: ServerConnection> {
    inner: Arc<Inner<C>>,
    _reaper: DropGuard,
}

struct Inner<C: ServerConnection> {
    settings: PoolSettings,
    metrics: Arc<PoolMetrics>,
    state: Mutex<State<C>>,
}

struct State<C: ServerConnection> {
    idle: Vec<Idle<C>>,
    /// Connections counted against the size: idle, leased, being opened.
    open: usize,
    waiters: VecDeque<Waiter<C>>,
    /// keyhole is draining: nothing is parked any more (a connection given
    /// back goes to a waiter of its key or is closed), new clients may
    /// still open connections within the size.
    draining: bool,
    closed: bool,
}

/// A parked connection.
struct Idle<C> {
    key: Key,
    conn: C,
    born: Instant,
    since: Instant,
}

struct Waiter<C: ServerConnection> {
    key: Key,
    tx: oneshot::Sender<Grant<C>>,
}

/// What a client gets from [`Pool::checkout`].
pub enum Grant<C: ServerConnection> {
    /// An idle connection of its key, alive when handed out.
    Reuse(Lease<C>),
    /// Room to open a new connection: log in, then [`Slot::fill`].
    Open(Slot<C>),
}

/// Room for one connection under the pool's size. Dropped unfilled (the
/// login failed), the room goes to the next waiter.
pub struct Slot<C: ServerConnection> {
    inner: Option<Arc<Inner<C>>>,
}

/// A connection a client uses. [`Lease::release`] puts it back after a
/// successful reset; dropping it closes the connection.
pub struct Lease<C: ServerConnection> {
    conn: Option<C>,
    key: Key,
    born: Instant,
    slot: Slot<C>,
    reused: bool,
}

impl<C: ServerConnection> Pool<C> {
    /// A pool with `settings`, counting into `metrics`. Its reaper (idle
    /// timeout, maximum lifetime, dead connections) runs until the pool is
    /// dropped or `stop` is cancelled (keyhole exits); at `drain` (keyhole
    /// stops accepting and waits for its sessions), the idle connections
    /// are closed at once and the others as their clients leave.
    pub fn new(
        settings: PoolSettings,
        metrics: Arc<PoolMetrics>,
        drain: CancellationToken,
        stop: CancellationToken,
    ) -> Pool<C> {
        let inner = Arc::new(Inner {
            settings,
            metrics,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                waiters: VecDeque::new(),
                draining: false,
                closed: false,
            }),
        });
        let own = stop.child_token();
        let reaper = own.clone();
        let weak = Arc::downgrade(&inner);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(weak, settings, drain, reaper));
        }
        Pool {
            inner,
            _reaper: own.drop_guard(),
        }
    }

    pub fn settings(&self) -> PoolSettings {
        self.inner.settings
    }

    /// A connection for `key`: an idle one (checked alive), room to open
    /// one, or, with the pool full, the first of either that comes free
    /// within `wait` (clients are served in arrival order).
    pub async fn checkout(&self, key: &[u8], wait: Duration) -> Result<Grant<C>, PoolError> {
        let started = Instant::now();
        let mut waited = false;
        loop {
            let rx = {
                let mut to_close = Vec::new();
                let outcome = self.inner.try_take(key, &mut to_close);
                close_all(to_close, &self.inner.metrics);
                match outcome? {
                    Taken::Grant(grant) => Some(grant),
                    Taken::Wait(rx) => {
                        if !waited {
                            self.inner.metrics.waited();
                            waited = true;
                        }
                        let left = wait.saturating_sub(started.elapsed());
                        match tokio::time::timeout(left, rx).await {
                            Ok(Ok(grant)) => Some(grant),
                            Ok(Err(_)) => return Err(PoolError::Closed),
                            Err(_) => {
                                self.inner.metrics.wait_ended(started.elapsed());
                                return Err(PoolError::Exhausted {
                                    size: self.inner.settings.size,
                                    waited: wait,
                                });
                            }
                        }
                    }
                }
            };
            let Some(grant) = rx else { continue };
            match grant {
                Grant::Reuse(mut lease) => {
                    let alive = lease.conn.as_mut().is_some_and(ServerConnection::is_alive);
                    if alive {
                        if waited {
                            self.inner.metrics.wait_ended(started.elapsed());
                        }
                        return Ok(Grant::Reuse(lease));
                    }
                    lease.discard(CloseReason::ServerClosed);
                }
                open @ Grant::Open(_) => {
                    if waited {
                        self.inner.metrics.wait_ended(started.elapsed());
                    }
                    return Ok(open);
                }
            }
        }
    }

    /// Connections parked now (for tests and logs).
    pub fn idle(&self) -> usize {
        self.inner.lock().idle.len()
    }
}

impl<C: ServerConnection> Drop for Pool<C> {
    fn drop(&mut self) {
        self.inner.shut_down();
    }
}

enum Taken<C: ServerConnection> {
    Grant(Grant<C>),
    Wait(oneshot::Receiver<Grant<C>>),
}

impl<C: ServerConnection> Inner<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<C>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One attempt under the lock; connections to close are put in
    /// `to_close` (closed after the lock is let go).
    fn try_take(
        self: &Arc<Self>,
        key: &[u8],
        to_close: &mut Vec<(C, CloseReason)>,
    ) -> Result<Taken<C>, PoolError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PoolError::Closed);
        }
        // The most recently parked connection of the key: the others then
        // age out, and fewer stay open.
        while let Some(at) = state.idle.iter().rposition(|i| *i.key == *key) {
            let idle = state.idle.remove(at);
            self.metrics.idle_changed(-1);
            if let Some(reason) = self.expired(&idle) {
                state.open -= 1;
                to_close.push((idle.conn, reason));
                continue;
            }
            return Ok(Taken::Grant(Grant::Reuse(
                self.lease(idle.conn, idle.key, idle.born, true),
            )));
        }
        if state.open < self.settings.size {
            state.open += 1;
            return Ok(Taken::Grant(Grant::Open(Slot {
                inner: Some(self.clone()),
            })));
        }
        // Full: the longest idle connection of another key makes room.
        if !state.idle.is_empty() {
            let oldest = (0..state.idle.len())
                .min_by_key(|&i| state.idle[i].since)
                .unwrap_or(0);
            let idle = state.idle.remove(oldest);
            self.metrics.idle_changed(-1);
            to_close.push((idle.conn, CloseReason::Evicted));
            return Ok(Taken::Grant(Grant::Open(Slot {
                inner: Some(self.clone()),
            })));
        }
        let (tx, rx) = oneshot::channel();
        state.waiters.retain(|w| !w.tx.is_closed());
        state.waiters.push_back(Waiter {
            key: key.into(),
            tx,
        });
        Ok(Taken::Wait(rx))
    }

    fn lease(self: &Arc<Self>, conn: C, key: Key, born: Instant, reused: bool) -> Lease<C> {
        self.metrics.in_use_changed(1);
        if reused {
            self.metrics.reused();
        }
        Lease {
            conn: Some(conn),
            key,
            born,
            slot: Slot {
                inner: Some(self.clone()),
            },
            reused,
        }
    }

    fn expired(&self, idle: &Idle<C>) -> Option<CloseReason> {
        if idle.born.elapsed() >= self.settings.max_lifetime {
            Some(CloseReason::MaxLifetime)
        } else if idle.since.elapsed() >= self.settings.idle_timeout {
            Some(CloseReason::IdleTimeout)
        } else {
            None
        }
    }

    /// A unit of room came free: the first waiter still waiting gets it,
    /// else the count goes down.
    fn room_freed(self: &Arc<Self>) {
        let mut state = self.lock();
        while let Some(waiter) = state.waiters.pop_front() {
            let grant = Grant::Open(Slot {
                inner: Some(self.clone()),
            });
            match waiter.tx.send(grant) {
                Ok(()) => return,
                // It gave up: the slot comes back here, disarmed (its drop
                // would take this lock), and the next waiter is tried.
                Err(Grant::Open(mut slot)) => slot.inner = None,
                Err(Grant::Reuse(mut lease)) => lease.slot.inner = None,
            }
        }
        state.open = state.open.saturating_sub(1);
    }

    /// A clean connection comes back: to a waiter of its key, or closed to
    /// make room for a waiter of another key, or parked.
    fn put_back(self: &Arc<Self>, conn: C, key: Key, born: Instant) -> Option<(C, CloseReason)> {
        if born.elapsed() >= self.settings.max_lifetime {
            // Its room goes to a waiter or is given back by the caller.
            return Some((conn, CloseReason::MaxLifetime));
        }
        let mut state = self.lock();
        if state.closed {
            return Some((conn, CloseReason::Shutdown));
        }
        state.waiters.retain(|w| !w.tx.is_closed());
        if let Some(at) = state.waiters.iter().position(|w| w.key == key) {
            if let Some(waiter) = state.waiters.remove(at) {
                let lease = self.lease(conn, key, born, true);
                match waiter.tx.send(Grant::Reuse(lease)) {
                    Ok(()) => return None,
                    Err(Grant::Reuse(mut lease)) => {
                        // Gave up between the check and now: park it.
                        lease.slot.inner = None;
                        self.metrics.in_use_changed(-1);
                        let conn = lease.conn.take()?;
                        let (key, born) = (std::mem::take(&mut lease.key), lease.born);
                        drop(lease);
                        self.park(&mut state, conn, key, born);
                        return None;
                    }
                    Err(Grant::Open(mut slot)) => {
                        slot.inner = None;
                        return None;
                    }
                }
            }
        }
        if state.draining {
            return Some((conn, CloseReason::Shutdown));
        }
        if !state.waiters.is_empty() {
            return Some((conn, CloseReason::Evicted));
        }
        self.park(&mut state, conn, key, born);
        None
    }

    fn park(&self, state: &mut State<C>, conn: C, key: Key, born: Instant) {
        self.metrics.idle_changed(1);
        state.idle.push(Idle {
            key,
            conn,
            born,
            since: Instant::now(),
        });
    }

    /// keyhole drains: idle connections are closed now (their room goes
    /// to waiters, if any), and none is parked from now on.
    fn drain(self: &Arc<Self>) {
        let idle = {
            let mut state = self.lock();
            if state.closed || state.draining {
                return;
            }
            state.draining = true;
            std::mem::take(&mut state.idle)
        };
        let rooms = idle.len();
        self.metrics.idle_changed(-(rooms as i64));
        close_all(
            idle.into_iter()
                .map(|i| (i.conn, CloseReason::Shutdown))
                .collect(),
            &self.metrics,
        );
        for _ in 0..rooms {
            self.room_freed();
        }
    }

    /// The target went away or keyhole stops: idle connections are closed
    /// now, waiters are told, and leased ones close when given back.
    fn shut_down(&self) {
        let idle = {
            let mut state = self.lock();
            state.closed = true;
            state.waiters.clear();
            let idle = std::mem::take(&mut state.idle);
            state.open = state.open.saturating_sub(idle.len());
            idle
        };
        self.metrics.idle_changed(-(idle.len() as i64));
        close_all(
            idle.into_iter()
                .map(|i| (i.conn, CloseReason::Shutdown))
                .collect(),
            &self.metrics,
        );
    }
}

impl<C: ServerConnection> Slot<C> {
    /// The connection opened in this room, now leased to its client.
    pub fn fill(mut self, conn: C, key: Key) -> Lease<C> {
        let Some(inner) = self.inner.take() else {
            // Unreachable: a slot is armed until filled or dropped.
            return Lease {
                conn: Some(conn),
                key,
                born: Instant::now(),
                slot: Slot { inner: None },
                reused: false,
            };
        };
        inner.metrics.opened();
        inner.lease(conn, key, Instant::now(), false)
    }
}

impl<C: ServerConnection> Drop for Slot<C> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.room_freed();
        }
    }
}

impl<C: ServerConnection> Lease<C> {
    pub fn conn(&mut self) -> Option<&mut C> {
        self.conn.as_mut()
    }

    pub fn conn_ref(&self) -> Option<&C> {
        self.conn.as_ref()
    }

    /// The key the connection serves.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Whether the connection came from the pool (not opened for this client).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// How long ago the connection logged in.
    pub fn age(&self) -> Duration {
        self.born.elapsed()
    }

    /// The client has left cleanly: reset the connection within `limit`
    /// and give it back, or close it if the reset fails, it is too old or
    /// the pool is closing. Returns why it was closed, if it was.
    pub async fn release(mut self, limit: Duration) -> Option<CloseReason> {
        let mut conn = self.conn.take()?;
        let inner = self.slot.inner.clone()?;
        if self.born.elapsed() >= inner.settings.max_lifetime {
            self.conn = Some(conn);
            self.discard(CloseReason::MaxLifetime);
            return Some(CloseReason::MaxLifetime);
        }
        if let Err(e) = conn.reset(limit).await {
            tracing::debug!(error = %e, "pooled connection: the reset failed; closing it");
            self.conn = Some(conn);
            self.discard(CloseReason::ResetFailed);
            return Some(CloseReason::ResetFailed);
        }
        inner.metrics.in_use_changed(-1);
        // The room travels with the connection from here.
        self.slot.inner = None;
        let key = std::mem::take(&mut self.key);
        match inner.put_back(conn, key, self.born) {
            None => None,
            Some((conn, reason)) => {
                close_all(vec![(conn, reason)], &inner.metrics);
                inner.room_freed();
                Some(reason)
            }
        }
    }

    /// Closes the connection (it is not fit for another client).
    pub fn discard(mut self, reason: CloseReason) {
        self.close_now(reason);
    }

    fn close_now(&mut self, reason: CloseReason) {
        if let Some(conn) = self.conn.take() {
            if let Some(inner) = &self.slot.inner {
                inner.metrics.in_use_changed(-1);
                close_all(vec![(conn, reason)], &inner.metrics);
            }
        }
    }
}

impl<C: ServerConnection> Drop for Lease<C> {
    fn drop(&mut self) {
        // Dropped without release or discard: nobody vouched for its state.
        self.close_now(CloseReason::NotReusable);
        // The slot's own drop gives the room back.
    }
}

/// Closes connections in the background (each gets a second to say
/// goodbye), counting why.
fn close_all<C: ServerConnection>(conns: Vec<(C, CloseReason)>, metrics: &PoolMetrics) {
    if conns.is_empty() {
        return;
    }
    for (_, reason) in &conns {
        metrics.closed(reason.label());
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                for (conn, _) in conns {
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
                }
            });
        }
        Err(_) => drop(conns),
    }
}

/// Closes idle connections past their idle timeout or lifetime, and dead
/// ones, until the pool goes; at `stop`, closes the pool.
async fn reap<C: ServerConnection>(
    pool: Weak<Inner<C>>,
    settings: PoolSettings,
    drain: CancellationToken,
    stop: CancellationToken,
) {
    let every = (settings.idle_timeout.min(settings.max_lifetime) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drained = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                if let Some(inner) = pool.upgrade() {
                    inner.shut_down();
                }
                return;
            }
            _ = drain.cancelled(), if !drained => {
                drained = true;
                match pool.upgrade() {
                    Some(inner) => inner.drain(),
                    None => return,
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let Some(inner) = pool.upgrade() else { return };
        let mut gone = Vec::new();
        {
            let mut state = inner.lock();
            let mut at = 0;
            while at < state.idle.len() {
                let reason = match inner.expired(&state.idle[at]) {
                    Some(reason) => Some(reason),
                    None if !state.idle[at].conn.is_alive() => Some(CloseReason::ServerClosed),
                    None => None,
                };
                match reason {
                    Some(reason) => {
                        let idle = state.idle.swap_remove(at);
                        state.open = state.open.saturating_sub(1);
                        gone.push((idle.conn, reason));
                    }
                    None => at += 1,
                }
            }
        }
        inner.metrics.idle_changed(-(gone.len() as i64));
        close_all(gone, &inner.metrics);
    }
}

/// A pooled relay's write step, the same for both protocols and both
/// directions: writes `buf[*start..end]` to `to` (counting into `moved`),
/// then flushes. Ready(Ok) once everything is out; a write of zero bytes is
/// an error ([`io::ErrorKind::WriteZero`]).
pub(crate) fn poll_write_out<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
    to: &mut W,
    cx: &mut std::task::Context<'_>,
    buf: &[u8],
    (start, end): (&mut usize, usize),
    moved: &mut u64,
    unflushed: &mut bool,
) -> std::task::Poll<std::io::Result<()>> {
    use std::task::{ready, Poll};
    while *start < end {
        let n = ready!(std::pin::Pin::new(&mut *to).poll_write(cx, &buf[*start..end]))?;
        if n == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        *start += n;
        *moved += n as u64;
        *unflushed = true;
    }
    if *unflushed {
        ready!(std::pin::Pin::new(&mut *to).poll_flush(cx))?;
        *unflushed = false;
    }
    Poll::Ready(Ok(()))
}

#[cfg(test)]
mod tests;
