//! The running proxy: targets prepared from the configuration, listeners
//! bound, one task per connection, and the shutdown sequence.
//!
//! Shutdown: the first SIGTERM/SIGINT stops every accept loop; open
//! connections may go on for `--max-sigterm-delay` (a second signal ends
//! the wait); whatever is still open then is cut. The exit code says which:
//! 0 when every connection ended by itself, 128 + the signal otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::collections::HashMap;

use crate::backend;
use crate::cancel::CancelRegistry;
use crate::cidr;
use crate::config::{self, Config, Protocol, TargetConfig};
use crate::credentials::{self, SourceContext, TokenCache, TokenLogin};
use crate::frontend::mysql::MysqlFrontend;
use crate::frontend::postgres::PostgresFrontend;
use crate::frontend::{Admission, LoginPolicy, SessionError, SessionReport};
use crate::listener::{self, Listener, Peer};
use crate::metrics::{self, RefusedReason};
use crate::net;
use crate::protocol::postgres as pg;
use crate::tls::{self, TlsSetupError};
use crate::upstream::Upstream;

/// A target ready to serve: its settings and its session driver.
pub struct Target {
    pub config: TargetConfig,
    pub frontend: Frontend,
}

/// The session driver of a target's protocol.
pub enum Frontend {
    Postgres(PostgresFrontend),
    Mysql(MysqlFrontend),
}

impl Frontend {
    async fn serve(
        &self,
        socket: net::Socket,
        admission: Admission,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        match self {
            Frontend::Postgres(f) => f.serve(socket, admission, cut, report).await,
            Frontend::Mysql(f) => f.serve(socket, admission, cut, report).await,
        }
    }
}

/// Everything built from the configuration before any socket is bound.
pub struct Proxy {
    targets: Vec<Arc<Target>>,
    limit: Option<Arc<Semaphore>>,
    max_sigterm_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("target {target}: {reason}")]
pub struct PrepareError {
    target: String,
    reason: String,
}

/// Why the process is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Terminate,
    Interrupt,
}

impl StopSignal {
    fn exit_code(self) -> u8 {
        match self {
            StopSignal::Terminate => 128 + libc::SIGTERM as u8,
            StopSignal::Interrupt => 128 + libc::SIGINT as u8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Interrupt => "SIGINT",
        }
    }
}

impl Proxy {
    /// Loads every certificate and key the configuration names, builds each
    /// target's backend and, for `iam=` targets, finds its credential
    /// source; any problem is a configuration error. `env` is the process
    /// environment, where credential sources are found.
    pub async fn prepare(
        config: &Config,
        env: HashMap<String, String>,
    ) -> Result<Proxy, PrepareError> {
        let cancels = Arc::new(CancelRegistry::default());
        let mut sources = SourceContext::new(env, config.connect_timeout);
        let mut targets = Vec::with_capacity(config.targets.len());
        for target in &config.targets {
            let fail = |reason: String| PrepareError {
                target: target.name.clone(),
                reason,
            };
            let tls_fail = |e: TlsSetupError| fail(e.to_string());
            let alpn = match target.protocol {
                Protocol::Postgres => Some(pg::ALPN),
                Protocol::Mysql => None,
            };
            let backend = backend::build(target).map_err(fail)?;
            let upstream = Arc::new(
                Upstream::new(target, config.connect_timeout, alpn, backend).map_err(tls_fail)?,
            );
            let local_tls = config
                .listen_tls
                .as_ref()
                .map(|ck| tls::server_config(ck, alpn).map(TlsAcceptor::from))
                .transpose()
                .map_err(tls_fail)?;
            let tokens = match &target.iam {
                None => None,
                Some(iam) => {
                    let source = credentials::build(iam, &mut sources).await.map_err(fail)?;
                    tracing::info!(target = %target.name, iam = iam.provider.name(), endpoint = %config::host_port(&iam.endpoint_host, iam.endpoint_port), credentials = %source.describe(), "token login: keyhole answers the server's password request");
                    let cache = TokenCache::new(source, config.connect_timeout);
                    Some(Arc::new(TokenLogin::new(
                        iam.provider,
                        cache,
                        iam.endpoint_host.clone(),
                        iam.endpoint_port,
                    )))
                }
            };
            let login = Arc::new(LoginPolicy {
                fixed_user: target.user.clone(),
                tokens,
                protocol: target.protocol,
            });
            let startup_timeout = config.startup_timeout;
            let max_connections = config.max_connections.map(|n| n.get());
            let frontend = match target.protocol {
                Protocol::Postgres => Frontend::Postgres(PostgresFrontend {
                    upstream,
                    local_tls,
                    startup_timeout,
                    cancels: cancels.clone(),
                    max_connections,
                    login,
                }),
                Protocol::Mysql => Frontend::Mysql(MysqlFrontend {
                    upstream,
                    local_tls,
                    startup_timeout,
                    max_connections,
                    login,
                }),
            };
            targets.push(Arc::new(Target {
                config: target.clone(),
                frontend,
            }));
        }
        Ok(Proxy {
            targets,
            limit: config
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n.get()))),
            max_sigterm_delay: config.max_sigterm_delay,
        })
    }

    /// Binds every listener, serves until a stop signal, drains, and returns
    /// the process exit code.
    pub async fn run(self) -> Result<u8, listener::BindError> {
        // Handlers first: a supervisor may signal as soon as a port opens.
        let stop_signal = StopSignals::install().map_err(listener::BindError::signals)?;
        let mut bound = Vec::new();
        for target in &self.targets {
            if let Some(addr) = target.config.listen {
                bound.push((target.clone(), Listener::bind_tcp(addr)?));
            }
            if let Some(path) = &target.config.unix_socket {
                bound.push((target.clone(), Listener::bind_unix(path)?));
            }
        }

        let stop_accepting = CancellationToken::new();
        let cut = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept_loops = TaskTracker::new();
        let ids = Arc::new(AtomicU64::new(0));
        for (target, listener) in bound {
            tracing::info!(target = %target.config.name, listen = %listener.describe(), "listening");
            accept_loops.spawn(accept_loop(
                listener,
                target,
                self.limit.clone(),
                stop_accepting.clone(),
                cut.clone(),
                connections.clone(),
                ids.clone(),
            ));
        }
        accept_loops.close();
        let mut stop_signal = stop_signal;
        let received = stop_signal.recv().await;

        stop_accepting.cancel();
        accept_loops.wait().await;
        connections.close();
        let open = connections.len();
        if open > 0 {
            tracing::info!(
                signal = received.name(),
                open_connections = open,
                max_wait_secs = self.max_sigterm_delay.as_secs_f64(),
                "stopped accepting; waiting for open connections to finish"
            );
        }
        let drained = tokio::select! {
            _ = connections.wait() => true,
            _ = tokio::time::sleep(self.max_sigterm_delay) => false,
            again = stop_signal.recv() => {
                tracing::info!(signal = again.name(), "second signal: not waiting any longer");
                false
            }
        };
        if drained {
            tracing::info!(signal = received.name(), "all connections ended; exiting");
            return Ok(0);
        }
        tracing::warn!(
            open_connections = connections.len(),
            "cutting the connections still open"
        );
        cut.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        Ok(received.exit_code())
    }
}

impl listener::BindError {
    fn signals(source: std::io::Error) -> Self {
        listener::BindError::new("signal handlers".into(), source)
    }
}

struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
    async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.term.recv() => StopSignal::Terminate,
            _ = self.int.recv() => StopSignal::Interrupt,
        }
    }
}

async fn accept_loop(
    listener: Listener,
    target: Arc<Target>,
    limit: Option<Arc<Semaphore>>,
    stop: CancellationToken,
    cut: CancellationToken,
    connections: TaskTracker,
    ids: Arc<AtomicU64>,
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
        net::tune_client(&socket);
        let allowed = match peer {
            Peer::Tcp(addr) => {
                target.config.allow.is_empty()
                    || cidr::any_contains(&target.config.allow, addr.ip())
            }
            // File permissions guard a Unix socket; it has no address to check.
            Peer::Unix => true,
        };
        let permit = match &limit {
            None => None,
            Some(sem) => sem.clone().try_acquire_owned().ok(),
        };
        let admission = if !allowed {
            tracing::warn!(client = %peer, target = %target.config.name, allow = %cidr::join(&target.config.allow), "client refused: its address is not in the target's allow list");
            metrics::global().refused(RefusedReason::Allowlist);
            Admission::NotAllowed
        } else if limit.is_some() && permit.is_none() {
            metrics::global().refused(RefusedReason::Limit);
            Admission::OverLimit
        } else {
            Admission::Admitted
        };
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let target = target.clone();
        let cut = cut.clone();
        connections.spawn(async move {
            let _permit = permit;
            serve_connection(id, peer, socket, admission, &target, &cut).await;
        });
    }
}

async fn serve_connection(
    id: u64,
    peer: Peer,
    socket: net::Socket,
    admission: Admission,
    target: &Target,
    cut: &CancellationToken,
) {
    let started = Instant::now();
    let name = target.config.name.as_str();
    tracing::info!(conn = id, client = %peer, target = name, "connection opened");
    let mut report = SessionReport::default();
    let result = target
        .frontend
        .serve(socket, admission, cut, &mut report)
        .await;
    let (outcome, error) = match &result {
        Ok(()) if report.cancel_forwarded => ("cancel_forwarded", None),
        Ok(()) => ("ok", None),
        Err(e) => (e.label(), Some(e.to_string())),
    };
    let fields = (
        report.user.as_deref().unwrap_or("-"),
        report.database.as_deref().unwrap_or("-"),
        report.transferred.client_to_server,
        report.transferred.server_to_client,
        started.elapsed().as_millis() as u64,
    );
    match error {
        None => tracing::info!(
            conn = id, client = %peer, target = name, user = fields.0, database = fields.1,
            bytes_from_client = fields.2, bytes_to_client = fields.3, duration_ms = fields.4,
            outcome, "connection closed"
        ),
        Some(error) => tracing::warn!(
            conn = id, client = %peer, target = name, user = fields.0, database = fields.1,
            bytes_from_client = fields.2, bytes_to_client = fields.3, duration_ms = fields.4,
            outcome, error, "connection closed"
        ),
    }
}
