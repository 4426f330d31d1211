//! The running proxy: targets prepared from the configuration, listeners
//! bound, one task per connection, live reloads, and the shutdown sequence.
//!
//! - `target`: a target built from its configuration (upstream, hop,
//!   token login, frontend), at start and at each reload.
//! - `serve`: the listeners, their accept loops and connection tasks.
//! - `reload`: SIGHUP and `--watch` read the configuration again and
//!   move the running proxy to it, or refuse it as a whole; `diff` says
//!   what happens to each listener, `watch` polls the files.
//!
//! Start: the HTTP endpoints bind first (so `/startup` can say "starting"),
//! then the optional connection test runs, then every listener binds, and
//! only then is keyhole started and ready.
//!
//! Shutdown: the first stop request (SIGTERM, SIGINT, `/quitquitquit`)
//! makes `/readiness` fail; new connections are still accepted for
//! `--min-sigterm-delay`; then the listeners close (and pooled server
//! connections no client holds are closed) and open connections may
//! go on for `--max-sigterm-delay`; whatever is still open then is cut. A
//! second request ends any wait. The exit code: 0 when every connection
//! ended by itself, after `/quitquitquit`, or with `--exit-zero-on-sigterm`;
//! 128 + the signal otherwise. A stop request during a reload abandons the
//! reload (nothing of it has been applied yet) and shuts down.

mod announce;
mod diff;
mod reload;
mod serve;
mod target;
mod watch;
mod workers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use target::{connectors, Deferred, Frontend, Target};
pub use workers::default_threads as default_data_threads;

use crate::config::{Config, ConfigError, Protocol};
use crate::endpoints::health::Watched;
use crate::endpoints::{self, Health};
use crate::lifecycle::{Lifecycle, Phase, StopRequest};
use crate::listener::{self, Endpoint, Listener};
use crate::metrics;
use crate::upstream::Upstream;
use reload::Reloader;
use serve::{Listening, Serving};
use target::{Context, Shared};
use watch::{Baseline, FileState};

/// Everything built from the configuration before any socket is bound.
pub struct Proxy {
    targets: Vec<Arc<Target>>,
    limit: Option<Arc<Semaphore>>,
    config: Config,
    /// What outlives a reload: the environment, the cancel registry, hops.
    shared: Shared,
    /// The files the configuration names, as they were at start.
    observed: Vec<(PathBuf, FileState)>,
    /// Where a reload reads the configuration.
    source: reload::Source,
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

/// What is served now: the configuration, and each listener with the
/// target it serves.
struct Running {
    config: Config,
    listeners: Vec<Listening>,
}

impl Running {
    /// The targets served now, each once, in listener order.
    fn targets(&self) -> Vec<Arc<Target>> {
        let mut targets: Vec<Arc<Target>> = Vec::new();
        for listening in &self.listeners {
            let target = listening.target();
            if !targets.iter().any(|t| Arc::ptr_eq(t, &target)) {
                targets.push(target);
            }
        }
        targets
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
        probe_platform(config, None);
        let shared = Shared::new(env);
        // Read before the targets are: a file that changes meanwhile is
        // then a change `--watch` sees.
        let observed = watch::observe_all(&config.files());
        let cx = Context {
            shared: &shared,
            running: &[],
            strict: false,
        };
        let built = target::build(config, cx).await?;
        if built.targets.is_empty() {
            return Err(PrepareError::NothingLeft(built.failures.join("; ")));
        }
        if let Some(why) = &config.all_proxy_ignored {
            tracing::warn!("{why}");
        }
        target::start_hops(&built.targets, &[], config.cloudsql.lazy_refresh);
        Ok(Proxy {
            limit: built
                .config
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n.get()))),
            targets: built.targets,
            config: built.config,
            _refreshers: shared.refreshers.clone().drop_guard(),
            shared,
            observed,
            source: Box::new(Config::from_process),
        })
    }

    /// Where a reload (SIGHUP, `--watch`) reads the configuration: the
    /// process's own arguments, environment and `--config` file unless set
    /// here.
    pub fn reload_from(
        mut self,
        source: impl Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
    ) -> Proxy {
        self.source = Box::new(source);
        self
    }

    /// Starts the endpoints, runs the connection test if asked, binds every
    /// listener, serves (and reloads) until a stop request, drains, and
    /// returns the process exit code.
    pub async fn run(self, lifecycle: Arc<Lifecycle>) -> Result<u8, RunError> {
        let Proxy {
            targets,
            limit,
            config,
            shared,
            observed,
            source,
            _refreshers,
        } = self;
        lifecycle
            .forward_signals()
            .map_err(listener::BindError::signals)?;
        lifecycle
            .forward_reload_signal()
            .map_err(listener::BindError::signals)?;
        metrics::global().reloads().loaded(SystemTime::now());
        let endpoints_stop = CancellationToken::new();
        let _stop_endpoints = endpoints_stop.clone().drop_guard();
        let (watched, watched_now) = tokio::sync::watch::channel(Arc::new(readiness(&targets)));
        let mut health = Health::new(
            lifecycle.clone(),
            limit
                .as_ref()
                .zip(config.max_connections)
                .map(|(s, n)| (s.clone(), n.get())),
        )
        .follow(watched_now);
        if config.http.readiness_checks_upstream {
            health = health.check_upstreams();
        }
        endpoints::start(&config, health, &lifecycle, &endpoints_stop).await?;

        if config.run_connection_test {
            tokio::select! {
                tested = connection_test(&targets) => tested?,
                request = lifecycle.next_stop() => {
                    tracing::info!(signal = request.name(), "stopped during the connection test");
                    return Ok(request.exit_code_when_cut());
                }
            }
        }

        let mut bound = Vec::new();
        for target in &targets {
            for endpoint in Endpoint::of(&target.config) {
                match endpoint.bind() {
                    Ok(l) => bound.push((endpoint, l, target.clone())),
                    Err(e) if config.skip_failed_targets => {
                        tracing::error!(target = %target.config.name, error = %e, "target skipped: its listener failed to bind");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if bound.is_empty() {
            return Err(RunError::NothingBound);
        }
        drop(targets);

        let serving = Serving::new(limit, config.data_threads);
        let listeners = bound
            .into_iter()
            .map(
                |(endpoint, listener, target): (Endpoint, Listener, Arc<Target>)| {
                    Listening::start(&serving, endpoint, listener, target)
                },
            )
            .collect();
        let mut running = Running { config, listeners };
        let served = running.targets();
        watched.send_replace(Arc::new(readiness(&served)));
        let (baseline, baseline_now) = tokio::sync::watch::channel(Baseline {
            enabled: running.config.watch,
            files: observed,
        });
        watch::spawn(lifecycle.clone(), baseline_now, endpoints_stop.clone());
        if running.config.watch {
            let files = list_files(&running.config);
            if files.is_empty() {
                tracing::info!("--watch: no file to watch (no --config file, CA, certificate or key file); SIGHUP reloads");
            } else {
                tracing::info!(%files, every_secs = watch::INTERVAL.as_secs(), "--watch: keyhole reloads when one of these files changes");
            }
        }
        lifecycle.advance(Phase::Serving);
        // The data path (splice+ktls or portable), said once, here.
        tracing::info!(
            targets = served.len(),
            data_threads = serving.data_threads(),
            data_path = %crate::platform::DataPath::of_this_build(),
            "keyhole is ready"
        );
        crate::systemd::ready(&format!("serving {} target(s)", served.len()));
        drop(served);

        let reloader = Reloader {
            source,
            shared: &shared,
            serving: &serving,
            watched,
            baseline,
        };
        let received = loop {
            let causes = tokio::select! {
                received = lifecycle.next_stop() => break received,
                causes = lifecycle.next_reload() => causes,
            };
            tokio::select! {
                () = reloader.reload(&mut running, &causes) => {}
                received = lifecycle.next_stop() => {
                    tracing::info!(signal = received.name(), "stop requested during a reload: the reload is abandoned, nothing of it applied");
                    break received;
                }
            }
        };
        let hops: Vec<Arc<crate::transport::Hop>> = running
            .targets()
            .iter()
            .filter_map(|t| t.hop().map(|h| h.hop.clone()))
            .collect();
        let code = shutdown(
            &lifecycle,
            &serving,
            &running.config,
            &shared.pools_drain,
            received,
        )
        .await;
        // Cloud sessions are ended at the service, not left to time out:
        // every hop is told at once, then given a moment.
        let closing: Vec<_> = hops.iter().map(|h| h.close()).collect();
        let _ = tokio::time::timeout(HOPS_CLOSE, async {
            for closed in closing {
                closed.await;
            }
        })
        .await;
        Ok(code)
    }
}

/// How long the hops get to end their cloud sessions at exit.
const HOPS_CLOSE: Duration = Duration::from_secs(3);

/// The shutdown sequence (see the module docs); returns the exit code.
async fn shutdown(
    lifecycle: &Lifecycle,
    serving: &Serving,
    config: &Config,
    pools_drain: &CancellationToken,
    received: StopRequest,
) -> u8 {
    lifecycle.advance(Phase::Draining);
    crate::systemd::stopping(&format!(
        "draining ({}): finishing open connections",
        received.name()
    ));
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

    serving.stop_accepting.cancel();
    serving.accept_loops.close();
    serving.accept_loops.wait().await;
    // No new client from here: pooled connections nobody holds are closed
    // now (Terminate to the server), the others as their clients leave.
    pools_drain.cancel();
    let connections = &serving.connections;
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
        return 0;
    }
    tracing::warn!(
        open_connections = connections.len(),
        "cutting the connections still open"
    );
    serving.cut.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
    if config.exit_zero_on_sigterm {
        0
    } else {
        received.exit_code_when_cut()
    }
}

/// Probes, once, what the configuration needs of the platform (and that
/// `before`, the running configuration, did not need yet).
fn probe_platform(config: &Config, before: Option<&Config>) {
    let auto = crate::tls::KernelTls::Auto;
    if config.kernel_tls == auto && before.is_none_or(|b| b.kernel_tls != auto) {
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
        // the first relay session (it runs once per process).
        crate::splice::zero_copy_supported();
    }
}

/// The files `--watch` polls, for the log.
fn list_files(config: &Config) -> String {
    config
        .files()
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `/readiness` looks at for these targets.
fn readiness(targets: &[Arc<Target>]) -> Watched {
    let mut watched = Watched {
        probes: probe_list(targets),
        ..Watched::default()
    };
    for target in targets {
        if let Some(slot) = target.upstream().slot() {
            if !watched.instances.iter().any(|s| Arc::ptr_eq(s, slot)) {
                watched.instances.push(slot.clone());
            }
        }
        if let Some(hop) = target.hop() {
            if !watched.hops.iter().any(|h| Arc::ptr_eq(h, &hop.hop)) {
                watched.hops.push(hop.hop.clone());
            }
        }
    }
    watched
}

/// What the connection test and `/readiness` dial.
fn probe_list(targets: &[Arc<Target>]) -> Vec<(String, Option<Protocol>, Arc<Upstream>)> {
    targets
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
async fn connection_test(targets: &[Arc<Target>]) -> Result<(), RunError> {
    let mut probes = tokio::task::JoinSet::new();
    for (name, protocol, upstream) in probe_list(targets) {
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

impl listener::BindError {
    fn signals(source: std::io::Error) -> Self {
        listener::BindError::new("signal handlers".into(), source)
    }
}
