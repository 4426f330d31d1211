//! Serving: one accept loop per listener, one task per connection.
//!
//! A listener serves whichever target it holds now ([`Listening`]): a
//! reload that changes the target puts the new one in place, and each
//! connection keeps the target it was accepted with until it ends. A
//! listener a reload removes stops accepting at once (its socket closes, a
//! Unix socket file goes) and its open connections may go on for
//! `--max-sigterm-delay`, as at shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::announce::{self, Bound};
use super::target::Target;
use super::workers::Workers;
use crate::cidr;
use crate::frontend::{Admission, Outcome, SessionReport};
use crate::listener::{self, Endpoint, Listener, Peer};
use crate::metrics::RefusedReason;
use crate::net;

/// What every listener shares: the connection limit, connection ids, and
/// the process-wide tokens and trackers the shutdown sequence drives.
pub(super) struct Serving {
    pub(super) limit: Option<Arc<Semaphore>>,
    ids: Arc<AtomicU64>,
    /// Every connection, of every listener.
    pub(super) connections: TaskTracker,
    /// Every accept loop.
    pub(super) accept_loops: TaskTracker,
    /// Stops every accept loop (shutdown).
    pub(super) stop_accepting: CancellationToken,
    /// Cuts every connection (shutdown, after the drain).
    pub(super) cut: CancellationToken,
    /// The threads connections run on.
    workers: Arc<Workers>,
}

impl Serving {
    pub(super) fn new(
        limit: Option<Arc<Semaphore>>,
        data_threads: Option<std::num::NonZeroUsize>,
    ) -> Serving {
        Serving {
            limit,
            ids: Arc::new(AtomicU64::new(0)),
            connections: TaskTracker::new(),
            accept_loops: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            cut: CancellationToken::new(),
            workers: Arc::new(Workers::start(data_threads)),
        }
    }

    /// How many data threads connections are spread over.
    pub(super) fn data_threads(&self) -> usize {
        self.workers.threads()
    }
}

/// One bound listener and the target it serves now.
pub(super) struct Listening {
    pub(super) endpoint: Endpoint,
    target: watch::Sender<Arc<Target>>,
    /// Stops this accept loop (its listener is removed).
    stop: CancellationToken,
    /// The connections it accepted.
    connections: TaskTracker,
    /// Cuts them (a removed listener's drain is over).
    cut: CancellationToken,
    accepting: JoinHandle<()>,
}

impl Listening {
    /// Starts accepting on `listener` for `target`.
    pub(super) fn start(
        serving: &Serving,
        endpoint: Endpoint,
        listener: Listener,
        target: Arc<Target>,
    ) -> Listening {
        // A Cloud SQL instance's engine, if its first refresh has told it.
        let protocol = target.config.protocol.or_else(|| {
            target
                .upstream()
                .slot()
                .and_then(|s| s.instance().known_protocol())
        });
        let bound = match (&listener, &endpoint) {
            (Listener::Tcp(l), _) => l.local_addr().ok().map(Bound::Tcp),
            #[cfg(keyhole_unix)]
            (Listener::Unix(..), Endpoint::Unix(path)) => Some(Bound::Unix(path)),
            #[cfg(keyhole_unix)]
            (Listener::Unix(..), Endpoint::Tcp(_)) => None,
        };
        let line = bound.map(|at| {
            announce::ready_line(
                protocol,
                &target.config.name,
                at,
                target.config.user.as_deref(),
            )
        });
        tracing::info!(
            target = %target.config.name,
            listen = %listener.describe(),
            protocol = protocol.map_or("unknown", |p| p.scheme()),
            "{}",
            line.as_deref().unwrap_or("ready")
        );
        let (sender, current) = watch::channel(target);
        let stop = serving.stop_accepting.child_token();
        let cut = serving.cut.child_token();
        let connections = TaskTracker::new();
        let accepting = serving.accept_loops.spawn(accept_loop(
            listener,
            current,
            Admit {
                limit: serving.limit.clone(),
                ids: serving.ids.clone(),
                all: serving.connections.clone(),
                own: connections.clone(),
                cut: cut.clone(),
                workers: serving.workers.clone(),
            },
            stop.clone(),
        ));
        Listening {
            endpoint,
            target: sender,
            stop,
            connections,
            cut,
            accepting,
        }
    }

    /// The target new connections get.
    pub(super) fn target(&self) -> Arc<Target> {
        self.target.borrow().clone()
    }

    /// New connections get `target` from now on; open ones keep theirs.
    pub(super) fn set_target(&self, target: Arc<Target>) {
        self.target.send_replace(target);
    }

    /// Stops accepting now; open connections may go on for `drain`, then
    /// they are cut. Runs in the background; the process's own shutdown
    /// (its cut) ends it sooner. The returned receiver completes once the
    /// listener is closed (its socket file removed).
    pub(super) fn retire(self, drain: Duration) -> oneshot::Receiver<()> {
        let Listening {
            endpoint: listen,
            target,
            stop,
            connections,
            cut,
            accepting,
        } = self;
        stop.cancel();
        let (closed, is_closed) = oneshot::channel();
        tokio::spawn(async move {
            // The listener is closed (its socket file removed) once its
            // accept loop has returned.
            let _ = accepting.await;
            let _ = closed.send(());
            connections.close();
            let target = target.borrow().clone();
            let name = target.config.name.as_str();
            let open = connections.len();
            if open == 0 {
                tracing::info!(target = name, %listen, "listener removed by the reload: closed, no connection was open");
                return;
            }
            tracing::info!(
                target = name,
                %listen,
                open_connections = open,
                max_wait_secs = drain.as_secs_f64(),
                "listener removed by the reload: closed; its open connections may finish (--max-sigterm-delay)"
            );
            let drained = tokio::select! {
                _ = connections.wait() => true,
                _ = tokio::time::sleep(drain) => false,
                // The process is shutting down: its own sequence decides.
                _ = cut.cancelled() => return,
            };
            if drained {
                tracing::info!(target = name, %listen, "the removed listener's last connection ended");
                return;
            }
            tracing::warn!(
                target = name,
                %listen,
                open_connections = connections.len(),
                "cutting the removed listener's connections still open after --max-sigterm-delay"
            );
            cut.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        });
        is_closed
    }
}

/// What the accept loop admits connections with.
struct Admit {
    limit: Option<Arc<Semaphore>>,
    ids: Arc<AtomicU64>,
    /// Every connection of the process, and this listener's.
    all: TaskTracker,
    own: TaskTracker,
    cut: CancellationToken,
    workers: Arc<Workers>,
}

async fn accept_loop(
    listener: Listener,
    current: watch::Receiver<Arc<Target>>,
    admit: Admit,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) if listener::is_resource_exhaustion(&e) => {
                tracing::error!(error = %e, listen = %listener.describe(), "accept failed: out of file descriptors or memory; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, listen = %listener.describe(), "accept failed");
                continue;
            }
        };
        // The target as it is now: the connection keeps it to its end.
        let target = current.borrow().clone();
        net::tune_client(&socket);
        let allowed = match peer {
            Peer::Tcp(addr) => {
                target.config.allow.is_empty()
                    || cidr::any_contains(&target.config.allow, addr.ip())
            }
            // File permissions guard a Unix socket; it has no address to check.
            Peer::Unix => true,
        };
        let permit = match &admit.limit {
            None => None,
            Some(sem) => sem.clone().try_acquire_owned().ok(),
        };
        let admission = if !allowed {
            tracing::warn!(client = %peer, target = %target.config.name, allow = %cidr::join(&target.config.allow), "client refused: its address is not in the target's allow list");
            target.metrics.refused(RefusedReason::Allowlist);
            Admission::NotAllowed
        } else if admit.limit.is_some() && permit.is_none() {
            target.metrics.refused(RefusedReason::Limit);
            Admission::OverLimit
        } else {
            Admission::Admitted
        };
        let id = admit.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let cut = admit.cut.clone();
        let open = target.metrics.opened();
        // Counted by both trackers from now, not from when its data thread
        // picks it up: a drain never misses a connection in transit.
        let tracked = (admit.all.token(), admit.own.token());
        let session = move |socket: net::Socket| async move {
            let _tracked = tracked;
            let _permit = permit;
            let _open = open;
            // A DNS-named instance that moves closes the connections made
            // to the old one after the drain: the session's cut is then
            // also that instance's.
            let generation = target
                .upstream()
                .slot()
                .filter(|slot| slot.follows_dns())
                .map(|slot| slot.current().generation);
            let Some(generation) = generation else {
                serve_connection(id, peer, socket, admission, &target, &cut, None).await;
                return;
            };
            let session_cut = cut.child_token();
            let _end = session_cut.clone().drop_guard();
            let relay = session_cut.clone();
            let moved = generation.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = moved.cancelled() => relay.cancel(),
                    _ = relay.cancelled() => {}
                }
            });
            serve_connection(
                id,
                peer,
                socket,
                admission,
                &target,
                &session_cut,
                Some(&generation),
            )
            .await;
        };
        admit
            .workers
            .dispatch(socket, Box::new(move |socket| Box::pin(session(socket))));
    }
}

async fn serve_connection(
    id: u64,
    peer: Peer,
    socket: net::Socket,
    admission: Admission,
    target: &Target,
    cut: &CancellationToken,
    generation: Option<&CancellationToken>,
) {
    let started = Instant::now();
    let name = target.config.name.as_str();
    tracing::info!(conn = id, client = %peer, target = name, "connection opened");
    let mut report = SessionReport::default();
    let serving = target.frontend.serve(socket, admission, cut, &mut report);
    #[cfg(feature = "otel")]
    let trace = otel_connection(id, &peer, target);
    #[cfg(feature = "otel")]
    let serving = crate::telemetry::otel::within(trace.as_ref(), serving);
    let result = serving.await;
    let moved = generation.is_some_and(CancellationToken::is_cancelled);
    let Outcome {
        ending,
        label: outcome,
        error,
    } = Outcome::of(&result, &report, moved);
    let unmetered = report.transferred - report.metered;
    target
        .metrics
        .add_transferred(unmetered.client_to_server, unmetered.server_to_client);
    target.metrics.closed(outcome);
    #[cfg(feature = "otel")]
    crate::telemetry::otel::closed(
        trace,
        outcome,
        error.as_deref(),
        (
            report.transferred.client_to_server,
            report.transferred.server_to_client,
        ),
        report.database.as_deref(),
    );
    let fields = (
        report.user.as_deref().unwrap_or("-"),
        report.database.as_deref().unwrap_or("-"),
        report.transferred.client_to_server,
        report.transferred.server_to_client,
        started.elapsed().as_millis() as u64,
    );
    // What the client did to its own connection is INFO; what the server,
    // a limit, a drain or keyhole's setup did is WARN (see `Ending`).
    match (ending.is_warning(), error) {
        (false, None) => tracing::info!(
            conn = id, client = %peer, target = name, user = fields.0, database = fields.1,
            bytes_from_client = fields.2, bytes_to_client = fields.3, duration_ms = fields.4,
            outcome, "connection closed"
        ),
        (false, Some(error)) => tracing::info!(
            conn = id, client = %peer, target = name, user = fields.0, database = fields.1,
            bytes_from_client = fields.2, bytes_to_client = fields.3, duration_ms = fields.4,
            outcome, error, "connection closed"
        ),
        (true, error) => tracing::warn!(
            conn = id, client = %peer, target = name, user = fields.0, database = fields.1,
            bytes_from_client = fields.2, bytes_to_client = fields.3, duration_ms = fields.4,
            outcome, error = error.as_deref().unwrap_or("-"), "connection closed"
        ),
    }
}

/// A connection's OpenTelemetry trace, if one is being exported and the
/// sampler keeps it.
#[cfg(feature = "otel")]
fn otel_connection(
    id: u64,
    peer: &Peer,
    target: &Target,
) -> Option<crate::telemetry::otel::ConnectionTrace> {
    let upstream = target.upstream();
    crate::telemetry::otel::connection(id, peer, &target.config, || {
        let protocol = target
            .config
            .protocol
            .or_else(|| upstream.slot().and_then(|s| s.instance().known_protocol()));
        (protocol, upstream.address())
    })
}
