//! The running proxy: targets prepared from the configuration, listeners
//! bound, one task per connection, and the shutdown sequence.
//!
//! Start: the HTTP endpoints bind first (so `/startup` can say "starting"),
//! then the optional connection test runs, then every listener binds, and
//! only then is keyhole started and ready.
//!
//! Shutdown: the first stop request (SIGTERM, SIGINT, `/quitquitquit`)
//! makes `/readiness` fail; new connections are still accepted for
//! `--min-sigterm-delay`; then the listeners close and open connections may
//! go on for `--max-sigterm-delay`; whatever is still open then is cut. A
//! second request ends any wait. The exit code: 0 when every connection
//! ended by itself, after `/quitquitquit`, or with `--exit-zero-on-sigterm`;
//! 128 + the signal otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::collections::HashMap;

use crate::backend;
use crate::cancel::CancelRegistry;
use crate::cidr;
use crate::cloudsql::name::Named;
use crate::cloudsql::{self as connector, Instance, InstanceName, Slot};
use crate::config::{self, Config, Protocol, TargetConfig};
use crate::credentials::{self, SourceContext, TokenCache, TokenLogin};
use crate::endpoints::{self, Health};
use crate::frontend::mysql::MysqlFrontend;
use crate::frontend::postgres::PostgresFrontend;
use crate::frontend::{Admission, LoginPolicy, SessionError, SessionReport};
use crate::lifecycle::{Lifecycle, Phase};
use crate::listener::{self, Listener, Peer};
use crate::metrics::{self, RefusedReason, TargetMetrics};
use crate::net;
use crate::protocol::postgres as pg;
use crate::tls::{self, TlsSetupError};
use crate::transport::{Hop, Transports};
use crate::upstream::Upstream;

/// A target ready to serve: its settings and its session driver.
pub struct Target {
    pub config: TargetConfig,
    pub frontend: Frontend,
    /// Its counters in the process's metrics registry.
    pub metrics: Arc<TargetMetrics>,
}

/// The session driver of a target's protocol.
pub enum Frontend {
    Postgres(PostgresFrontend),
    Mysql(MysqlFrontend),
    /// A Cloud SQL instance whose engine is learned when a client connects
    /// (`--lazy-refresh` with a port given).
    Deferred(Box<Deferred>),
}

/// A frontend that waits for its instance's engine.
pub struct Deferred {
    slot: Arc<Slot>,
    parts: FrontendParts,
    postgres: tokio::sync::OnceCell<Frontend>,
    mysql: tokio::sync::OnceCell<Frontend>,
}

/// What a frontend is built from, whatever its protocol.
struct FrontendParts {
    upstream: Arc<Upstream>,
    listen_tls: Option<config::CertKey>,
    startup_timeout: Duration,
    cancels: Arc<CancelRegistry>,
    max_connections: Option<usize>,
    fixed_user: Option<String>,
    tokens: Option<Arc<TokenLogin>>,
    metrics: Arc<TargetMetrics>,
    pipe: crate::splice::pipe::PipeConfig,
}

impl FrontendParts {
    fn build(&self, protocol: Protocol) -> Result<Frontend, TlsSetupError> {
        let local_tls = self
            .listen_tls
            .as_ref()
            .map(|ck| tls::server_config(ck, alpn(protocol)).map(TlsAcceptor::from))
            .transpose()?;
        let login = Arc::new(LoginPolicy {
            fixed_user: self.fixed_user.clone(),
            tokens: self.tokens.clone(),
            protocol,
            metrics: self.metrics.clone(),
        });
        Ok(match protocol {
            Protocol::Postgres => Frontend::Postgres(PostgresFrontend {
                upstream: self.upstream.clone(),
                local_tls,
                startup_timeout: self.startup_timeout,
                cancels: self.cancels.clone(),
                max_connections: self.max_connections,
                login,
                pipe: self.pipe,
            }),
            Protocol::Mysql => Frontend::Mysql(MysqlFrontend {
                upstream: self.upstream.clone(),
                local_tls,
                startup_timeout: self.startup_timeout,
                max_connections: self.max_connections,
                login,
            }),
        })
    }
}

impl Frontend {
    async fn serve(
        &self,
        socket: net::Socket,
        admission: Admission,
        cut: &CancellationToken,
        report: &mut SessionReport,
    ) -> Result<(), SessionError> {
        let known = match self {
            Frontend::Deferred(deferred) => deferred.resolve(&socket).await?,
            known => known,
        };
        match known {
            Frontend::Postgres(f) => f.serve(socket, admission, cut, report).await,
            Frontend::Mysql(f) => f.serve(socket, admission, cut, report).await,
            Frontend::Deferred(_) => Err(SessionError::Upstream(
                crate::upstream::UpstreamError::Tls {
                    message: "internal: a deferred frontend resolved to another".into(),
                },
            )),
        }
    }
}

impl Deferred {
    /// The frontend for the instance's engine, learned now (before keyhole
    /// reads the client's first byte). If the engine cannot be learned, the
    /// client's own behaviour says which protocol to refuse it in: a
    /// Postgres client speaks first, a MySQL client waits for the server's
    /// greeting. That frontend then meets the same connector error when it
    /// dials, and renders it as its protocol's error message.
    async fn resolve(&self, socket: &net::Socket) -> Result<&Frontend, SessionError> {
        let instance = self.slot.instance();
        let protocol = match instance.protocol().await {
            Ok(protocol) => protocol,
            Err(e) => {
                tracing::warn!(instance = %instance.name, error = %e, "the instance's engine is not known; answering in the protocol the client speaks");
                if socket.spoke_within(Duration::from_millis(500)).await {
                    Protocol::Postgres
                } else {
                    Protocol::Mysql
                }
            }
        };
        let cell = match protocol {
            Protocol::Postgres => &self.postgres,
            Protocol::Mysql => &self.mysql,
        };
        cell.get_or_try_init(|| async { self.parts.build(protocol) })
            .await
            .map_err(|e| {
                SessionError::Upstream(crate::upstream::UpstreamError::Tls {
                    message: e.to_string(),
                })
            })
    }
}

/// Everything built from the configuration before any socket is bound.
pub struct Proxy {
    targets: Vec<Arc<Target>>,
    limit: Option<Arc<Semaphore>>,
    config: Config,
    /// The hops (`via=`) the targets go through; SSH masters end with it.
    transports: Arc<Transports>,
    /// Ends the Cloud SQL instances' refresh tasks when the proxy goes.
    _refreshers: tokio_util::sync::DropGuard,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("target {target}: {reason}")]
    Target { target: String, reason: String },
    /// `--skip-failed-targets` skipped every target.
    #[error("no target left to serve: {0}")]
    NothingLeft(String),
}

/// Why the proxy could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    #[error("connection test failed for {failed} of {total} target(s): {first}")]
    ConnectionTest {
        failed: usize,
        total: usize,
        first: String,
    },
    #[error("no target left to serve: every listener failed to bind")]
    NothingBound,
}

impl RunError {
    /// The process exit code: 2 when nothing is left to serve (as for any
    /// configuration that cannot work), 1 for a failure at start.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::NothingBound => 2,
            RunError::Bind(_) | RunError::ConnectionTest { .. } => 1,
        }
    }
}

impl Target {
    fn upstream(&self) -> &Arc<Upstream> {
        match &self.frontend {
            Frontend::Postgres(f) => &f.upstream,
            Frontend::Mysql(f) => &f.upstream,
            Frontend::Deferred(d) => &d.parts.upstream,
        }
    }
}

impl Proxy {
    /// Loads every certificate and key the configuration names, builds each
    /// target's backend and, for `iam=` targets, finds its credential
    /// source; any problem is a configuration error, unless
    /// `--skip-failed-targets` says to log the target and go on without it.
    /// `env` is the process environment, where credential sources are found.
    pub async fn prepare(
        config: &Config,
        env: HashMap<String, String>,
    ) -> Result<Proxy, PrepareError> {
        for skipped in &config.skipped {
            tracing::error!(target = %skipped.target, error = %skipped.reason, "target skipped: its configuration failed");
        }
        if config.kernel_tls == crate::tls::KernelTls::Auto {
            // Probed once, here, rather than on the first session.
            match crate::tls::ktls::availability() {
                crate::tls::ktls::Availability::Available { suites } => {
                    tracing::info!(suites = suites.len(), "kernel TLS: the kernel carries upstream TLS records where the negotiated suite allows")
                }
                crate::tls::ktls::Availability::Unavailable { reason } => {
                    tracing::warn!(reason = %reason, "kernel TLS unavailable: keyhole's own record layer carries upstream TLS")
                }
            }
        }
        if config
            .targets
            .iter()
            .any(|t| t.tls.mode == crate::config::TlsMode::Disable)
        {
            // The splice(2) probe is a few blocking system calls: here, not in
            // the first relay session.
            crate::splice::pipe::supported();
        }
        let cancels = Arc::new(CancelRegistry::default());
        let mut sources = SourceContext::new(env, config.connect_timeout);
        let refreshers = CancellationToken::new();
        let mut config = config.clone();
        let mut failures = Vec::new();
        let instances =
            start_instances(&mut config, &mut sources, &refreshers, &mut failures).await?;
        let transports = Arc::new(Transports::new(config.ssh_config.clone()));
        let mut targets = Vec::with_capacity(config.targets.len());
        for (target, slot) in config.targets.iter().zip(instances) {
            match prepare_target(&config, target, slot, &cancels, &mut sources, &transports).await {
                Ok(ready) => targets.push(Arc::new(ready)),
                Err(e) if config.skip_failed_targets => {
                    tracing::error!(error = %e, "target skipped: its configuration failed");
                    failures.push(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        if targets.is_empty() {
            return Err(PrepareError::NothingLeft(failures.join("; ")));
        }
        if let Some(why) = &config.all_proxy_ignored {
            tracing::warn!("{why}");
        }
        for hop in transports.hops() {
            tracing::info!(hop = %hop.name(), transport = hop.kind(), "targets go through a hop: TLS and token login still start here");
            // An SSH bastion logs in now, so the first client waits for no
            // login (not with --lazy-refresh: nothing runs before a client).
            if !config.cloudsql.lazy_refresh {
                hop.warm_up();
            }
        }
        Ok(Proxy {
            transports,
            targets,
            limit: config
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n.get()))),
            config,
            _refreshers: refreshers.drop_guard(),
        })
    }

    /// Starts the endpoints, runs the connection test if asked, binds every
    /// listener, serves until a stop request, drains, and returns the
    /// process exit code.
    pub async fn run(self, lifecycle: Arc<Lifecycle>) -> Result<u8, RunError> {
        let config = &self.config;
        lifecycle
            .forward_signals()
            .map_err(listener::BindError::signals)?;
        let endpoints_stop = CancellationToken::new();
        let _stop_endpoints = endpoints_stop.clone().drop_guard();
        let mut health = Health::new(
            lifecycle.clone(),
            self.limit
                .as_ref()
                .zip(config.max_connections)
                .map(|(s, n)| (s.clone(), n.get())),
        );
        if config.http.readiness_checks_upstream {
            health = health.check_upstreams(self.probe_list());
        }
        let instances: Vec<Arc<Slot>> = self
            .targets
            .iter()
            .filter_map(|t| t.upstream().slot().cloned())
            .collect();
        health = health
            .watch_instances(instances)
            .watch_hops(self.transports.hops());
        endpoints::start(config, health, &lifecycle, &endpoints_stop).await?;

        if config.run_connection_test {
            tokio::select! {
                tested = self.connection_test() => tested?,
                request = lifecycle.next_stop() => {
                    tracing::info!(signal = request.name(), "stopped during the connection test");
                    return Ok(request.exit_code_when_cut());
                }
            }
        }

        let mut bound = Vec::new();
        for target in &self.targets {
            let mut bind = |result: Result<Listener, listener::BindError>| match result {
                Ok(l) => {
                    bound.push((target.clone(), l));
                    Ok(())
                }
                Err(e) if config.skip_failed_targets => {
                    tracing::error!(target = %target.config.name, error = %e, "target skipped: its listener failed to bind");
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if let Some(addr) = target.config.listen {
                bind(Listener::bind_tcp(addr))?;
            }
            if let Some(path) = &target.config.unix_socket {
                bind(Listener::bind_unix(path))?;
            }
        }
        if bound.is_empty() {
            return Err(RunError::NothingBound);
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
        lifecycle.advance(Phase::Serving);
        tracing::info!(targets = self.targets.len(), "keyhole is ready");

        let received = lifecycle.next_stop().await;
        lifecycle.advance(Phase::Draining);
        let mut cut_short = false;
        if !config.min_sigterm_delay.is_zero() {
            tracing::info!(
                signal = received.name(),
                accept_for_secs = config.min_sigterm_delay.as_secs_f64(),
                "stop requested: not ready any more, still accepting new connections for a while"
            );
            tokio::select! {
                _ = tokio::time::sleep(config.min_sigterm_delay) => {}
                again = lifecycle.next_stop() => {
                    tracing::info!(signal = again.name(), "second stop request: not waiting any longer");
                    cut_short = true;
                }
            }
        }

        stop_accepting.cancel();
        accept_loops.wait().await;
        connections.close();
        let open = connections.len();
        let drained = if open == 0 {
            true
        } else if cut_short {
            false
        } else {
            tracing::info!(
                signal = received.name(),
                open_connections = open,
                max_wait_secs = config.max_sigterm_delay.as_secs_f64(),
                "stopped accepting; waiting for open connections to finish"
            );
            tokio::select! {
                _ = connections.wait() => true,
                _ = tokio::time::sleep(config.max_sigterm_delay) => false,
                again = lifecycle.next_stop() => {
                    tracing::info!(signal = again.name(), "second stop request: not waiting any longer");
                    false
                }
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
        Ok(if config.exit_zero_on_sigterm {
            0
        } else {
            received.exit_code_when_cut()
        })
    }

    /// What the connection test and `/readiness` dial.
    fn probe_list(&self) -> Vec<(String, Option<Protocol>, Arc<Upstream>)> {
        self.targets
            .iter()
            .map(|t| {
                (
                    t.config.name.clone(),
                    t.config.protocol,
                    t.upstream().clone(),
                )
            })
            .collect()
    }

    /// `--run-connection-test`: every target once, all at once.
    async fn connection_test(&self) -> Result<(), RunError> {
        let mut probes = tokio::task::JoinSet::new();
        for (name, protocol, upstream) in self.probe_list() {
            probes.spawn(async move {
                let started = Instant::now();
                let result = upstream.probe(protocol).await;
                (name, result, started.elapsed())
            });
        }
        let total = probes.len();
        let mut failed = Vec::new();
        while let Some(done) = probes.join_next().await {
            match done {
                Ok((name, Ok(()), took)) => {
                    tracing::info!(target = %name, took_ms = took.as_millis() as u64, "connection test passed")
                }
                Ok((name, Err(e), _)) => {
                    tracing::error!(target = %name, error = %e, "connection test failed");
                    failed.push(format!("target {name}: {e}"));
                }
                Err(e) => failed.push(format!("a connection test did not finish: {e}")),
            }
        }
        failed.sort();
        match failed.first() {
            None => Ok(()),
            Some(first) => Err(RunError::ConnectionTest {
                failed: failed.len(),
                total,
                first: first.clone(),
            }),
        }
    }
}

/// A target's upstream connector (its backend, CA, client certificate) and
/// the client-leg TLS acceptor: everything that needs files but no network.
/// `keyhole check-config` runs this too.
pub fn connectors(
    config: &Config,
    target: &TargetConfig,
    metrics: Arc<TargetMetrics>,
    hop: Option<Arc<Hop>>,
) -> Result<(Arc<Upstream>, Option<TlsAcceptor>), PrepareError> {
    let fail = |reason: String| PrepareError::Target {
        target: target.name.clone(),
        reason,
    };
    let tls_fail = |e: TlsSetupError| fail(e.to_string());
    // An instance whose engine is not known yet offers Postgres's ALPN on a
    // local TLS leg until it is; its frontend builds its own acceptor then.
    let alpn = alpn(target.protocol.unwrap_or(Protocol::Postgres));
    let local_tls = config
        .listen_tls
        .as_ref()
        .map(|ck| tls::server_config(ck, alpn).map(TlsAcceptor::from))
        .transpose()
        .map_err(tls_fail)?;
    if target.cloudsql.is_some() {
        // Its upstream comes from the connector (see `start_instances`).
        return Err(fail(
            "internal: a Cloud SQL instance has no fixed connector".into(),
        ));
    }
    let backend = backend::build(target).map_err(fail)?;
    let upstream = Arc::new(
        Upstream::new(
            target,
            config.kernel_tls,
            config.connect_timeout,
            alpn,
            backend,
            metrics,
        )
        .map_err(tls_fail)?
        .through(hop),
    );
    Ok((upstream, local_tls))
}

/// The ALPN protocol a local TLS leg offers.
fn alpn(protocol: Protocol) -> Option<&'static [u8]> {
    match protocol {
        Protocol::Postgres => Some(pg::ALPN),
        Protocol::Mysql => None,
    }
}

/// Builds the Cloud SQL connector if any target names an instance, starts
/// each instance (refresh ahead, unless lazy), and learns the engine of
/// those whose listener waits for it; a DNS-named instance is looked up
/// first and then followed. Returns, per target, its slot.
/// A target that fails is removed from `config` (and named in `failures`)
/// with `--skip-failed-targets`; otherwise its failure is returned.
async fn start_instances(
    config: &mut Config,
    sources: &mut SourceContext,
    stop: &CancellationToken,
    failures: &mut Vec<String>,
) -> Result<Vec<Option<Arc<Slot>>>, PrepareError> {
    if config.targets.iter().all(|t| t.cloudsql.is_none()) {
        return Ok(vec![None; config.targets.len()]);
    }
    let auto_iam = config
        .targets
        .iter()
        .any(|t| t.cloudsql.as_ref().is_some_and(|c| c.auto_iam_authn));
    let shared = connector::build(&config.cloudsql, sources, auto_iam)
        .await
        .map_err(|reason| PrepareError::Target {
            target: "Cloud SQL connector".into(),
            reason,
        })?;
    tracing::info!(credentials = %shared.api.principal(), lazy_refresh = config.cloudsql.lazy_refresh, "Cloud SQL connector: keyhole fetches instances' certificates from the SQL Admin API");
    let mut slots = Vec::with_capacity(config.targets.len());
    let mut index = 0;
    while index < config.targets.len() {
        let target = &config.targets[index];
        let Some(cloudsql) = target.cloudsql.clone() else {
            slots.push(None);
            index += 1;
            continue;
        };
        let metrics = metrics::global().target(&target.name);
        let lazy = config.cloudsql.lazy_refresh;
        let make = {
            let shared = shared.clone();
            move |name: InstanceName, stop: CancellationToken| {
                let instance = Instance::new(
                    name,
                    cloudsql.ip,
                    cloudsql.auto_iam_authn,
                    lazy,
                    shared.clone(),
                    metrics.clone(),
                );
                instance.start(stop);
                instance
            }
        };
        let started = async {
            let (name, dns) = match &cloudsql.instance {
                Named::Instance(name) => (name.clone(), None),
                Named::Dns(dns_name) => {
                    let server = connector::dns::server(&sources.env).map_err(|e| e.to_string())?;
                    let name = connector::dns::resolve(server, dns_name, config.connect_timeout)
                        .await
                        .map_err(|e| e.to_string())?;
                    tracing::info!(dns_name = %dns_name, instance = %name, "DNS-named Cloud SQL instance: looked up now and every 30 s");
                    (name, Some((dns_name.clone(), server)))
                }
            };
            let own_stop = stop.child_token();
            let instance = make(name, own_stop.clone());
            let slot = Slot::new(instance.clone(), dns.as_ref().map(|(n, _)| n.clone()));
            if let Some((_, server)) = dns {
                slot.watch(
                    server,
                    config.connect_timeout,
                    config.max_sigterm_delay,
                    make,
                    own_stop,
                    stop.clone(),
                );
            }
            if config.targets[index].pending.is_some() {
                // Where it listens depends on its engine: learn it now.
                let protocol = instance.protocol().await.map_err(|e| format!(
                    "{e} (its engine decides where it listens: give it a port, with --port or ?port=, to start without the API)"
                ))?;
                crate::config::cloudsql::settle(&mut config.targets, index, protocol)
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(slot)
        };
        match started.await {
            Ok(slot) => {
                slots.push(Some(slot));
                index += 1;
            }
            Err(reason) => {
                let e = PrepareError::Target {
                    target: config.targets[index].name.clone(),
                    reason,
                };
                if !config.skip_failed_targets {
                    return Err(e);
                }
                tracing::error!(error = %e, "target skipped: its configuration failed");
                failures.push(e.to_string());
                config.targets.remove(index);
            }
        }
    }
    Ok(slots)
}

/// One target, ready to serve; see [`Proxy::prepare`].
async fn prepare_target(
    config: &Config,
    target: &TargetConfig,
    slot: Option<Arc<Slot>>,
    cancels: &Arc<CancelRegistry>,
    sources: &mut SourceContext,
    transports: &Transports,
) -> Result<Target, PrepareError> {
    let fail = |reason: String| PrepareError::Target {
        target: target.name.clone(),
        reason,
    };
    let metrics = metrics::global().target(&target.name);
    let hop = transports.hop(&target.via).map_err(fail)?;
    let upstream = match &slot {
        Some(slot) => Arc::new(
            Upstream::cloudsql(
                slot.clone(),
                config.kernel_tls,
                config.connect_timeout,
                metrics.clone(),
            )
            .through(hop),
        ),
        None => connectors(config, target, metrics.clone(), hop)?.0,
    };
    let tokens = match &target.iam {
        None => None,
        Some(iam) => {
            let source = credentials::build(iam, sources).await.map_err(fail)?;
            tracing::info!(target = %target.name, iam = iam.provider.name(), endpoint = %config::host_port(&iam.endpoint_host, iam.endpoint_port), credentials = %source.describe(), "token login: keyhole answers the server's password request");
            let cache = TokenCache::counted(source, config.connect_timeout, metrics.clone());
            Some(Arc::new(TokenLogin::new(
                iam.provider,
                cache,
                iam.endpoint_host.clone(),
                iam.endpoint_port,
            )))
        }
    };
    let parts = FrontendParts {
        upstream,
        listen_tls: config.listen_tls.clone(),
        startup_timeout: config.startup_timeout,
        cancels: cancels.clone(),
        max_connections: config.max_connections.map(|n| n.get()),
        fixed_user: target.user.clone(),
        tokens,
        metrics: metrics.clone(),
        pipe: crate::splice::pipe::PipeConfig {
            size: config.pipe_size,
        },
    };
    let frontend = match (target.protocol, slot) {
        (Some(protocol), _) => parts.build(protocol).map_err(|e| fail(e.to_string()))?,
        (None, Some(slot)) => Frontend::Deferred(Box::new(Deferred {
            slot,
            parts,
            postgres: tokio::sync::OnceCell::new(),
            mysql: tokio::sync::OnceCell::new(),
        })),
        (None, None) => return Err(fail("internal: a target without a protocol".into())),
    };
    Ok(Target {
        config: target.clone(),
        frontend,
        metrics,
    })
}

impl listener::BindError {
    fn signals(source: std::io::Error) -> Self {
        listener::BindError::new("signal handlers".into(), source)
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
            target.metrics.refused(RefusedReason::Allowlist);
            Admission::NotAllowed
        } else if limit.is_some() && permit.is_none() {
            target.metrics.refused(RefusedReason::Limit);
            Admission::OverLimit
        } else {
            Admission::Admitted
        };
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let target = target.clone();
        let cut = cut.clone();
        let open = target.metrics.opened();
        connections.spawn(async move {
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
    generation: Option<&CancellationToken>,
) {
    let started = Instant::now();
    let name = target.config.name.as_str();
    tracing::info!(conn = id, client = %peer, target = name, "connection opened");
    let mut report = SessionReport::default();
    let result = target
        .frontend
        .serve(socket, admission, cut, &mut report)
        .await;
    let moved = generation.is_some_and(CancellationToken::is_cancelled);
    let (outcome, error) = match &result {
        Ok(()) if report.cancel_forwarded => ("cancel_forwarded", None),
        Ok(()) => ("ok", None),
        Err(SessionError::Cut) if moved => (
            "instance_moved",
            Some("the DNS name now points to another Cloud SQL instance; connections to the old one are closed after --max-sigterm-delay".to_owned()),
        ),
        Err(e) => (e.label(), Some(e.to_string())),
    };
    let unmetered = report.transferred - report.metered;
    target
        .metrics
        .add_transferred(unmetered.client_to_server, unmetered.server_to_client);
    target.metrics.closed(outcome);
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
