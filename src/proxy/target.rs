//! A target ready to serve, built from its configuration: its upstream (a
//! backend, CA bundle and client certificate, or a Cloud SQL instance), the
//! hop it goes through, its token login, and the frontend that drives its
//! protocol.
//!
//! The same code builds the targets at start and at every reload. A reload
//! hands in the targets served now, so that what keeps state in the
//! background carries over when its own settings did not change: a Cloud
//! SQL instance (its refresh task, its certificate), a token cache (its
//! tokens and their refresh), a hop (an SSH master). Each of those is held
//! by the targets that use it ([`Held`]) and ends when the last of them
//! goes, which is after their last connection ended.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::watch::{observe, FileState};
use super::PrepareError;
use crate::backend;
use crate::cancel::CancelRegistry;
use crate::cloudsql::name::Named;
use crate::cloudsql::{self as connector, Connector, Instance, InstanceName, Slot};
use crate::config::cloudsql::CloudSqlSettings;
use crate::config::via::Via;
use crate::config::{self, CertKey, Config, Protocol, TargetConfig};
use crate::credentials::{self, SourceContext, TokenCache, TokenLogin};
use crate::frontend::mysql::MysqlFrontend;
use crate::frontend::postgres::PostgresFrontend;
use crate::frontend::{Admission, LoginPolicy, SessionError, SessionReport};
use crate::metrics::{self, TargetMetrics};
use crate::net;
use crate::protocol::postgres as pg;
use crate::tls::{self, KernelTls, TlsSetupError};
use crate::transport::{CloudSettings, Hop, Transports};
use crate::upstream::Upstream;

/// A target ready to serve: its settings and its session driver.
pub struct Target {
    pub config: TargetConfig,
    pub frontend: Frontend,
    /// Its counters in the process's metrics registry.
    pub metrics: Arc<TargetMetrics>,
    /// What a reload compares to decide whether the target changed.
    pub(super) fingerprint: Fingerprint,
    /// Its long-lived parts.
    pub(super) held: Held,
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
    pipe: crate::splice::PipeConfig,
    /// `password-file=`, as read when the target was built.
    password: Option<config::cloudsql::Secret>,
    /// `pool=session`, what drains its pools when keyhole starts draining,
    /// and what ends them when keyhole exits.
    pool: Option<config::PoolSettings>,
    pool_drain: CancellationToken,
    pool_stop: CancellationToken,
    /// For log lines.
    name: String,
}

impl FrontendParts {
    /// `pool=session`: the target's pool (its metrics switched on).
    fn pool<C: crate::pool::ServerConnection>(&self) -> Option<crate::pool::Pool<C>> {
        self.pool.map(|settings| {
            self.metrics.pool().enable();
            tracing::info!(target = %self.name, pool_size = settings.size, idle_timeout_secs = settings.idle_timeout.as_secs_f64(), max_lifetime_secs = settings.max_lifetime.as_secs_f64(), "pool=session: keyhole keeps the server connections it logs in to and reuses them");
            crate::pool::Pool::new(
                settings,
                self.metrics.pool().clone(),
                self.pool_drain.clone(),
                self.pool_stop.clone(),
            )
        })
    }

    fn build(&self, protocol: Protocol) -> Result<Frontend, TlsSetupError> {
        let local_tls = self
            .listen_tls
            .as_ref()
            .map(|ck| tls::server_config(ck, alpn(protocol)).map(TlsAcceptor::from))
            .transpose()?;
        let login = Arc::new(LoginPolicy {
            fixed_user: self.fixed_user.clone(),
            tokens: self.tokens.clone(),
            password: self.password.clone(),
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
                pool: self.pool(),
            }),
            Protocol::Mysql => Frontend::Mysql(MysqlFrontend {
                upstream: self.upstream.clone(),
                local_tls,
                startup_timeout: self.startup_timeout,
                max_connections: self.max_connections,
                login,
                pool: self.pool(),
                last_key: Default::default(),
            }),
        })
    }
}

impl Frontend {
    pub(super) async fn serve(
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

impl Target {
    pub fn upstream(&self) -> &Arc<Upstream> {
        match &self.frontend {
            Frontend::Postgres(f) => &f.upstream,
            Frontend::Mysql(f) => &f.upstream,
            Frontend::Deferred(d) => &d.parts.upstream,
        }
    }

    /// The hop its connections go through, if any.
    pub(super) fn hop(&self) -> Option<&Arc<HopHandle>> {
        self.held.hop.as_ref()
    }
}

/// Everything a target's behaviour depends on, apart from where it listens:
/// its settings, the global options its frontend and upstream are built
/// with, and the content of every file it reads. Two targets with equal
/// fingerprints serve alike, so a reload keeps the running one.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Fingerprint {
    /// The target's settings, without its listen address and socket.
    target: TargetConfig,
    listen_tls: Option<CertKey>,
    startup_timeout: Duration,
    connect_timeout: Duration,
    pipe_size: Option<usize>,
    kernel_tls: KernelTls,
    max_connections: Option<NonZeroUsize>,
    ssh_config: Option<PathBuf>,
    iap_endpoint: String,
    /// The connector's settings, for a Cloud SQL instance.
    cloudsql: Option<CloudSqlSettings>,
    /// Each file read for it (CA bundle, client and listen certificates
    /// and keys), as it was when the target was built.
    files: Vec<(PathBuf, FileState)>,
}

impl Fingerprint {
    /// Reads `target`'s files now: call it before building the target, so
    /// that a file that changes meanwhile shows as a change at the next reload.
    pub(super) fn of(config: &Config, target: &TargetConfig) -> Fingerprint {
        let mut files: Vec<PathBuf> = target.tls_files().into_iter().map(Into::into).collect();
        files.extend(target.password_file.iter().cloned());
        if let Some(ck) = &config.listen_tls {
            files.extend([ck.cert.clone(), ck.key.clone()]);
        }
        Fingerprint {
            target: TargetConfig {
                listen: None,
                unix_socket: None,
                ..target.clone()
            },
            listen_tls: config.listen_tls.clone(),
            startup_timeout: config.startup_timeout,
            connect_timeout: config.connect_timeout,
            pipe_size: config.pipe_size,
            kernel_tls: config.kernel_tls,
            max_connections: config.max_connections,
            ssh_config: config.ssh_config.clone(),
            iap_endpoint: config.iap_endpoint.clone(),
            cloudsql: target.cloudsql.is_some().then(|| config.cloudsql.clone()),
            files: files
                .into_iter()
                .map(|path| {
                    let state = observe(&path);
                    (path, state)
                })
                .collect(),
        }
    }

    /// What differs from `before`, in words for the log: option and
    /// parameter names, "database", or "content of FILE".
    pub(super) fn changes_since(&self, before: &Fingerprint) -> Vec<String> {
        let mut changed = Vec::new();
        let mut differs = |what: &str, yes: bool| {
            if yes {
                changed.push(what.to_owned());
            }
        };
        let (now, was) = (&self.target, &before.target);
        let database = (&now.name, now.protocol, &now.host, now.port, &now.cloudsql);
        differs(
            "database",
            database != (&was.name, was.protocol, &was.host, was.port, &was.cloudsql),
        );
        differs("ca-file", now.tls.ca_file != was.tls.ca_file);
        differs("server-name", now.tls.server_name != was.tls.server_name);
        differs("tls-mode", now.tls.mode != was.tls.mode);
        differs("client-cert", now.tls.client_cert != was.tls.client_cert);
        differs("backend", now.backend != was.backend);
        differs("destinations", now.destinations != was.destinations);
        differs("allow", now.allow != was.allow);
        differs("iam", now.iam != was.iam);
        differs("user", now.user != was.user);
        differs("via", now.via != was.via);
        differs("pool", now.pool != was.pool);
        differs("password-file", now.password_file != was.password_file);
        differs(
            "listen-cert/listen-key",
            self.listen_tls != before.listen_tls,
        );
        differs(
            "startup-timeout",
            self.startup_timeout != before.startup_timeout,
        );
        differs(
            "connect-timeout",
            self.connect_timeout != before.connect_timeout,
        );
        differs("pipe-size", self.pipe_size != before.pipe_size);
        differs("kernel-tls", self.kernel_tls != before.kernel_tls);
        differs(
            "max-connections",
            self.max_connections != before.max_connections,
        );
        differs("ssh-config", self.ssh_config != before.ssh_config);
        differs("iap-endpoint", self.iap_endpoint != before.iap_endpoint);
        differs("Cloud SQL options", self.cloudsql != before.cloudsql);
        for (path, state) in &self.files {
            let old = before.files.iter().find(|(p, _)| p == path);
            if old.is_some_and(|(_, s)| s != state) {
                changed.push(format!("content of {}", path.display()));
            }
        }
        if changed.is_empty() && self != before {
            changed.push("files read".into());
        }
        changed
    }
}

/// A target's parts that live on in the background, shared with any later
/// target that reuses them.
#[derive(Default)]
pub(super) struct Held {
    tokens: Option<Arc<TokenLogin>>,
    instance: Option<Arc<InstanceHandle>>,
    hop: Option<Arc<HopHandle>>,
}

/// A Cloud SQL instance in use. Its refresh task (and, for a DNS name, the
/// watcher that follows it) ends when the last target holding it goes.
pub(super) struct InstanceHandle {
    pub(super) slot: Arc<Slot>,
    /// The connector it was started with, and that connector's settings.
    connector: Arc<Connector>,
    settings: CloudSqlSettings,
    auto_iam: bool,
    _stop: DropGuard,
}

/// One hop (`via=`) in a [`Transports`] of its own, so that its SSH master
/// ends when the last target going through it goes.
pub(super) struct HopHandle {
    via: Via,
    ssh_config: Option<PathBuf>,
    cloud: CloudSettings,
    pub(super) hop: Arc<Hop>,
    _transports: Transports,
}

/// The hops in use, found again by their URL and `--ssh-config`: targets
/// that name the same hop share it, across reloads too.
#[derive(Default)]
pub(super) struct HopPool {
    live: Mutex<Vec<Weak<HopHandle>>>,
}

impl HopPool {
    /// The hop for `via`, `None` for direct. Errors are configuration errors.
    fn get(
        &self,
        via: &Via,
        ssh_config: &Option<PathBuf>,
        cloud: &CloudSettings,
    ) -> Result<Option<Arc<HopHandle>>, String> {
        if via.is_direct() {
            return Ok(None);
        }
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|h| h.strong_count() > 0);
        let found = live
            .iter()
            .filter_map(Weak::upgrade)
            .find(|h| h.via == *via && h.ssh_config == *ssh_config && h.cloud == *cloud);
        if let Some(found) = found {
            return Ok(Some(found));
        }
        let transports = Transports::new(ssh_config.clone(), cloud.clone());
        let Some(hop) = transports.hop(via)? else {
            return Ok(None);
        };
        let handle = Arc::new(HopHandle {
            via: via.clone(),
            ssh_config: ssh_config.clone(),
            cloud: cloud.clone(),
            hop,
            _transports: transports,
        });
        live.push(Arc::downgrade(&handle));
        Ok(Some(handle))
    }
}

/// What outlives every configuration: the process environment (where
/// credential sources are found), the cancel registry every Postgres
/// target shares, and the hops in use.
pub(super) struct Shared {
    pub(super) env: HashMap<String, String>,
    pub(super) cancels: Arc<CancelRegistry>,
    pub(super) hops: HopPool,
    /// The parent of every instance's refresh token: ends them all when the
    /// proxy goes.
    pub(super) refreshers: CancellationToken,
    /// Cancelled when the shutdown starts draining: every pool closes its
    /// idle connections then, and parks none from then on.
    pub(super) pools_drain: CancellationToken,
}

impl Shared {
    pub(super) fn new(env: HashMap<String, String>) -> Shared {
        Shared {
            env,
            cancels: Arc::new(CancelRegistry::default()),
            hops: HopPool::default(),
            refreshers: CancellationToken::new(),
            pools_drain: CancellationToken::new(),
        }
    }
}

/// How [`build`] runs.
pub(super) struct Context<'a> {
    pub(super) shared: &'a Shared,
    /// The targets served now (none at start), whose long-lived parts a
    /// target may take over.
    pub(super) running: &'a [Arc<Target>],
    /// A reload is all or nothing; at start, `--skip-failed-targets` may
    /// leave a failing target out.
    pub(super) strict: bool,
}

/// The targets built from a configuration.
pub(super) struct Built {
    /// The configuration as served: Cloud SQL instances settled on their
    /// engine and place, skipped targets left out.
    pub(super) config: Config,
    pub(super) targets: Vec<Arc<Target>>,
    /// Why targets were left out (`--skip-failed-targets`, at start).
    pub(super) failures: Vec<String>,
}

/// Loads every certificate and key the configuration names, builds each
/// target's backend and, for `iam=` targets, finds its credential source.
/// Any problem is a configuration error, unless the context allows
/// `--skip-failed-targets` to log the target and go on without it.
pub(super) async fn build(config: &Config, cx: Context<'_>) -> Result<Built, PrepareError> {
    let skip = config.skip_failed_targets && !cx.strict;
    let mut sources = SourceContext::new(cx.shared.env.clone(), config.connect_timeout);
    let mut config = config.clone();
    let mut failures = Vec::new();
    let instances = start_instances(&mut config, &mut sources, &cx, skip, &mut failures).await?;
    let mut targets = Vec::with_capacity(config.targets.len());
    let mut served = Vec::with_capacity(config.targets.len());
    for (target, instance) in config.targets.iter().zip(instances) {
        match prepare_target(&config, target, instance, &mut sources, &cx).await {
            Ok(ready) => {
                targets.push(Arc::new(ready));
                served.push(target.clone());
            }
            Err(e) if skip => {
                tracing::error!(error = %e, "target skipped: its configuration failed");
                failures.push(e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    config.targets = served;
    Ok(Built {
        config,
        targets,
        failures,
    })
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

/// The Cloud SQL connector for `config`: the one running instances use if
/// its settings are the same, else a new one.
async fn connector_for(
    config: &Config,
    sources: &mut SourceContext,
    cx: &Context<'_>,
    auto_iam: bool,
) -> Result<Arc<Connector>, PrepareError> {
    let running = cx
        .running
        .iter()
        .filter_map(|t| t.held.instance.as_ref())
        .find(|h| h.settings == config.cloudsql && (h.auto_iam || !auto_iam));
    if let Some(running) = running {
        return Ok(running.connector.clone());
    }
    let shared = connector::build(&config.cloudsql, sources, auto_iam)
        .await
        .map_err(|reason| PrepareError::Target {
            target: "Cloud SQL connector".into(),
            reason,
        })?;
    tracing::info!(credentials = %shared.api.principal(), lazy_refresh = config.cloudsql.lazy_refresh, "Cloud SQL connector: keyhole fetches instances' certificates from the SQL Admin API");
    Ok(shared)
}

/// Builds the Cloud SQL connector if any target names an instance, starts
/// each instance (refresh ahead, unless lazy) or takes over a running one
/// with the same settings, and learns the engine of those whose listener
/// waits for it; a DNS-named instance is looked up first and then followed.
/// Returns, per target, its instance.
/// A target that fails is removed from `config` (and named in `failures`)
/// when `skip`; otherwise its failure is returned.
async fn start_instances(
    config: &mut Config,
    sources: &mut SourceContext,
    cx: &Context<'_>,
    skip: bool,
    failures: &mut Vec<String>,
) -> Result<Vec<Option<Arc<InstanceHandle>>>, PrepareError> {
    if config.targets.iter().all(|t| t.cloudsql.is_none()) {
        return Ok(vec![None; config.targets.len()]);
    }
    let auto_iam = config
        .targets
        .iter()
        .any(|t| t.cloudsql.as_ref().is_some_and(|c| c.auto_iam_authn));
    // A running instance with the same settings carries over (its
    // certificate, its refresh); only the others need the connector.
    let needs_connector = config.targets.iter().any(|t| {
        t.cloudsql.is_some() && running_instance(cx, &config.cloudsql, auto_iam, t).is_none()
    });
    let shared = if needs_connector {
        Some(connector_for(config, sources, cx, auto_iam).await?)
    } else {
        None
    };
    let mut handles = Vec::with_capacity(config.targets.len());
    let mut index = 0;
    while index < config.targets.len() {
        let target = &config.targets[index];
        let Some(cloudsql) = target.cloudsql.clone() else {
            handles.push(None);
            index += 1;
            continue;
        };
        let reused = running_instance(cx, &config.cloudsql, auto_iam, target);
        let started = async {
            let handle = match (reused, &shared) {
                (Some(handle), _) => handle,
                (None, Some(connector)) => {
                    let connector = connector.clone();
                    start_instance(config, index, cloudsql, connector, sources, cx, auto_iam)
                        .await?
                }
                (None, None) => return Err("internal: no Cloud SQL connector".to_owned()),
            };
            if config.targets[index].pending.is_some() {
                // Where it listens depends on its engine: learn it now.
                let protocol = handle.slot.instance().protocol().await.map_err(|e| format!(
                    "{e} (its engine decides where it listens: give it a port, with --port or ?port=, to start without the API)"
                ))?;
                crate::config::cloudsql::settle(&mut config.targets, index, protocol)
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(handle)
        };
        match started.await {
            Ok(handle) => {
                handles.push(Some(handle));
                index += 1;
            }
            Err(reason) => {
                let e = PrepareError::Target {
                    target: config.targets[index].name.clone(),
                    reason,
                };
                if !skip {
                    return Err(e);
                }
                tracing::error!(error = %e, "target skipped: its configuration failed");
                failures.push(e.to_string());
                config.targets.remove(index);
            }
        }
    }
    Ok(handles)
}

/// The instance a running target with the same name and instance settings
/// uses, if it was started with these connector settings.
fn running_instance(
    cx: &Context<'_>,
    settings: &CloudSqlSettings,
    auto_iam: bool,
    target: &TargetConfig,
) -> Option<Arc<InstanceHandle>> {
    cx.running
        .iter()
        .filter(|t| t.config.name == target.name && t.config.cloudsql == target.cloudsql)
        .filter_map(|t| t.held.instance.clone())
        .find(|h| h.settings == *settings && (h.auto_iam || !auto_iam))
}

/// Starts instance target `index` with `connector`.
async fn start_instance(
    config: &Config,
    index: usize,
    cloudsql: config::cloudsql::CloudSqlTarget,
    connector: Arc<Connector>,
    sources: &SourceContext,
    cx: &Context<'_>,
    auto_iam: bool,
) -> Result<Arc<InstanceHandle>, String> {
    let target = &config.targets[index];
    let metrics = metrics::global().target(&target.name);
    let lazy = config.cloudsql.lazy_refresh;
    let named = cloudsql.instance.clone();
    let make = {
        let connector = connector.clone();
        move |name: InstanceName, stop: CancellationToken| {
            let instance = Instance::new(
                name,
                cloudsql.ip,
                cloudsql.auto_iam_authn,
                lazy,
                connector.clone(),
                metrics.clone(),
            );
            instance.start(stop);
            instance
        }
    };
    let (name, dns) = match &named {
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
    // This target's own token: its refresh (and DNS watch) end with it.
    let stop = cx.shared.refreshers.child_token();
    let own_stop = stop.child_token();
    let instance = make(name, own_stop.clone());
    let slot = Slot::new(instance, dns.as_ref().map(|(n, _)| n.clone()));
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
    Ok(Arc::new(InstanceHandle {
        slot,
        connector,
        settings: config.cloudsql.clone(),
        auto_iam,
        _stop: stop.drop_guard(),
    }))
}

/// One target, ready to serve; see [`build`].
async fn prepare_target(
    config: &Config,
    target: &TargetConfig,
    instance: Option<Arc<InstanceHandle>>,
    sources: &mut SourceContext,
    cx: &Context<'_>,
) -> Result<Target, PrepareError> {
    let fail = |reason: String| PrepareError::Target {
        target: target.name.clone(),
        reason,
    };
    // Read before the target is built from the same files.
    let fingerprint = Fingerprint::of(config, target);
    let metrics = metrics::global().target(&target.name);
    let hop = cx
        .shared
        .hops
        .get(
            &target.via,
            &config.ssh_config,
            &CloudSettings {
                env: cx.shared.env.clone(),
                iap_endpoint: config.iap_endpoint.clone(),
            },
        )
        .map_err(fail)?;
    let through = hop.as_ref().map(|h| h.hop.clone());
    let upstream = match &instance {
        Some(instance) => Arc::new(
            Upstream::cloudsql(
                instance.slot.clone(),
                config.kernel_tls,
                config.connect_timeout,
                metrics.clone(),
            )
            .through(through),
        ),
        None => connectors(config, target, metrics.clone(), through)?.0,
    };
    let tokens = match &target.iam {
        None => None,
        Some(iam) => {
            // A running target with the same name and token settings keeps
            // its cache: its tokens, and their refresh, carry over.
            let running = cx.running.iter().find(|t| {
                t.config.name == target.name
                    && t.config.iam.as_ref() == Some(iam)
                    && t.fingerprint.connect_timeout == config.connect_timeout
            });
            match running.and_then(|t| t.held.tokens.clone()) {
                Some(tokens) => Some(tokens),
                None => {
                    let source = credentials::build(iam, sources).await.map_err(fail)?;
                    tracing::info!(target = %target.name, iam = iam.provider.name(), endpoint = %config::host_port(&iam.endpoint_host, iam.endpoint_port), credentials = %source.describe(), "token login: keyhole answers the server's password request");
                    let cache =
                        TokenCache::counted(source, config.connect_timeout, metrics.clone());
                    Some(Arc::new(TokenLogin::new(
                        iam.provider,
                        cache,
                        iam.endpoint_host.clone(),
                        iam.endpoint_port,
                    )))
                }
            }
        }
    };
    let password = target
        .password_file
        .as_deref()
        .map(read_password_file)
        .transpose()
        .map_err(fail)?;
    let parts = FrontendParts {
        password,
        pool: target.pool,
        pool_drain: cx.shared.pools_drain.child_token(),
        pool_stop: cx.shared.refreshers.child_token(),
        name: target.name.clone(),
        upstream,
        listen_tls: config.listen_tls.clone(),
        startup_timeout: config.startup_timeout,
        cancels: cx.shared.cancels.clone(),
        max_connections: config.max_connections.map(|n| n.get()),
        fixed_user: target.user.clone(),
        tokens: tokens.clone(),
        metrics: metrics.clone(),
        pipe: crate::splice::PipeConfig {
            size: config.pipe_size,
        },
    };
    let frontend = match (target.protocol, &instance) {
        (Some(protocol), _) => parts.build(protocol).map_err(|e| fail(e.to_string()))?,
        (None, Some(instance)) => Frontend::Deferred(Box::new(Deferred {
            slot: instance.slot.clone(),
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
        fingerprint,
        held: Held {
            tokens,
            instance,
            hop,
        },
    })
}

/// The password in `path` (`password-file=`): the file's text without its
/// final line break. Read at start and at each reload that rebuilds the
/// target. A file others may read is used, with a warning (Kubernetes
/// mounts secrets 0644 unless told otherwise); on Windows, which has no
/// modes, that check is skipped. No error shows the content.
fn read_password_file(path: &std::path::Path) -> Result<config::cloudsql::Secret, String> {
    let shown = path.display();
    let text = std::fs::read(path).map_err(|e| format!("password-file {shown}: {e}"))?;
    // Unix only: Windows has no modes to check (platform::files).
    let open = std::fs::metadata(path)
        .ok()
        .and_then(|meta| crate::platform::files::open_to_others(&meta));
    if let Some(mode) = open {
        tracing::warn!(file = %shown, mode = format!("{mode:o}"), "password-file can be read by other users than its owner: chmod 600 it");
    }
    let mut text = String::from_utf8(text)
        .map_err(|_| format!("password-file {shown}: the password is not UTF-8 text"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(format!("password-file {shown} is empty"));
    }
    if text.contains(['\0', '\n']) {
        return Err(format!(
            "password-file {shown}: the password must be one line without NUL bytes"
        ));
    }
    Ok(config::cloudsql::Secret::new(text))
}

/// Logs each hop `targets` go through that `before` did not, and (unless
/// lazy) logs in to SSH bastions now, so the first client waits for no login.
pub(super) fn start_hops(targets: &[Arc<Target>], before: &[Arc<Target>], lazy: bool) {
    let mut seen: Vec<&Arc<HopHandle>> = Vec::new();
    for hop in targets.iter().filter_map(|t| t.hop()) {
        let known = seen.iter().any(|h| Arc::ptr_eq(h, hop))
            || before
                .iter()
                .filter_map(|t| t.hop())
                .any(|h| Arc::ptr_eq(h, hop));
        if known {
            continue;
        }
        seen.push(hop);
        tracing::info!(hop = %hop.hop.name(), transport = hop.hop.kind(), "targets go through a hop: TLS and token login still start here");
        if !lazy {
            hop.hop.warm_up();
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn load(args: &[&str]) -> Config {
        Config::from_test_args(args)
    }

    #[test]
    fn a_fingerprint_follows_settings_and_file_content_not_the_listen_address() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "first").expect("write");
        let ca_arg = ca.to_str().expect("UTF-8");
        let at = |port: &str, extra: &str| {
            let config = load(&[
                "--ca-file",
                ca_arg,
                "--port",
                port,
                &format!("postgres://db{extra}"),
            ]);
            Fingerprint::of(&config, &config.targets[0])
        };
        let first = at("5432", "");
        assert_eq!(at("6432", ""), first, "the listen address is not a setting");

        let other_params = at("5432", "?allow=10.0.0.0/8");
        assert_eq!(other_params.changes_since(&first), ["allow"]);

        std::fs::write(&ca, "second").expect("write");
        let rewritten = at("5432", "");
        assert_ne!(rewritten, first);
        assert_eq!(
            rewritten.changes_since(&first),
            [format!("content of {}", ca.display())]
        );

        let config = load(&[
            "--ca-file",
            ca_arg,
            "--connect-timeout",
            "3s",
            "postgres://db",
        ]);
        let slower = Fingerprint::of(&config, &config.targets[0]);
        assert_eq!(slower.changes_since(&rewritten), ["connect-timeout"]);
    }

    #[test]
    fn targets_naming_one_hop_share_it_until_the_last_one_goes() {
        let pool = HopPool::default();
        let via = |url: &str| Via::parse(url).expect("a hop URL");
        assert!(pool
            .get(&Via::Direct, &None, &CloudSettings::default())
            .expect("direct")
            .is_none());
        let proxy = via("socks5://me:first@10.0.0.9:1080");
        let a = pool
            .get(&proxy, &None, &CloudSettings::default())
            .expect("a hop")
            .expect("not direct");
        let b = pool
            .get(&proxy, &None, &CloudSettings::default())
            .expect("a hop")
            .expect("not direct");
        assert!(Arc::ptr_eq(&a, &b), "one hop for both targets");
        let other_login = via("socks5://me:second@10.0.0.9:1080");
        let c = pool
            .get(&other_login, &None, &CloudSettings::default())
            .expect("a hop")
            .expect("not direct");
        assert!(!Arc::ptr_eq(&a, &c), "another login is another hop");
        let ssh_config = Some(PathBuf::from("/etc/keyhole/ssh_config"));
        let d = pool
            .get(&proxy, &ssh_config, &CloudSettings::default())
            .expect("a hop")
            .expect("not direct");
        assert!(!Arc::ptr_eq(&a, &d), "another --ssh-config is another hop");

        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(
            weak.upgrade().is_none(),
            "the pool does not keep a hop alive"
        );
        let again = pool
            .get(&proxy, &None, &CloudSettings::default())
            .expect("a hop")
            .expect("not direct");
        assert!(!Arc::ptr_eq(&again, &c));
    }
}
