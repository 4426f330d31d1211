//! Live reload: SIGHUP, or `--watch` seeing a file change, reads the
//! configuration again (flags, `KEYHOLE_*` variables and the `--config`
//! file, as at start) and moves the running proxy to it without a restart.
//!
//! A reload is all or nothing. It first builds the whole new target set:
//! the configuration parsed and validated, every CA bundle, certificate and
//! key read, every backend and credential source set up, every new listener
//! bound. Only if all of that worked is it applied, in one step that does
//! not wait on anything: kept listeners stay as they are, changed ones
//! serve new connections with the new target, removed ones stop accepting
//! and drain (see [`super::serve`]), added ones start. Otherwise one error
//! line says which target or file failed and why, the refusal is counted,
//! and the running configuration stays entirely. `--skip-failed-targets`
//! applies at start only.
//!
//! A connection keeps the target it was accepted with to its end: no
//! reload cuts a connection to a target that stays. A removed target's
//! connections get `--max-sigterm-delay` to finish, as at shutdown.
//!
//! Some options shape the process rather than the targets and take a
//! restart ([`restart_only`]): a reload that changes one says so and keeps
//! the running value.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::diff::{self, Plan};
use super::serve::{Listening, Serving};
use super::target::{self, Context, Fingerprint, Shared, Target};
use super::watch::{observe, observe_all, Baseline, FileState};
use super::{probe_platform, readiness, PrepareError, Running};
use crate::config::{Config, ConfigError};
use crate::endpoints::health::Watched;
use crate::lifecycle::ReloadCause;
use crate::listener::{BindError, Endpoint, Listener};
use crate::metrics;

/// Where a reload reads the configuration.
pub(super) type Source = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadError {
    /// The configuration does not parse or validate.
    #[error("{0}")]
    Config(String),
    /// A target's files, backend or credentials failed.
    #[error(transparent)]
    Target(#[from] PrepareError),
    /// A new listener could not bind.
    #[error("{0}")]
    Bind(String),
}

/// What a reload did, by endpoint.
struct Summary {
    /// Nothing to do: every endpoint kept.
    noop: bool,
    kept: usize,
    changed: usize,
    added: usize,
    removed: usize,
}

/// Runs reloads against the running proxy.
pub(super) struct Reloader<'a> {
    pub(super) source: Source,
    pub(super) shared: &'a Shared,
    pub(super) serving: &'a Serving,
    /// What `/readiness` looks at.
    pub(super) watched: watch::Sender<Arc<Watched>>,
    /// What `--watch` compares with.
    pub(super) baseline: watch::Sender<Baseline>,
}

impl Reloader<'_> {
    /// One reload: tried, applied or refused, logged, counted. Dropping it
    /// before it returns leaves the running proxy as it was (everything it
    /// built or bound is let go).
    pub(super) async fn reload(&self, running: &mut Running, causes: &[ReloadCause]) {
        let cause = causes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        tracing::info!(cause = %cause, "reloading the configuration");
        crate::systemd::reloading();
        let (result, observed) = self.attempt(running).await;
        let refused = result.is_err();
        let reloads = metrics::global().reloads();
        match result {
            Ok(summary) => {
                reloads.reloaded(SystemTime::now());
                let message = if summary.noop {
                    "configuration reloaded: no listener changed"
                } else {
                    "configuration reloaded"
                };
                tracing::info!(
                    cause = %cause,
                    unchanged = summary.kept,
                    changed = summary.changed,
                    added = summary.added,
                    removed = summary.removed,
                    "{message}"
                );
                self.watched
                    .send_replace(Arc::new(readiness(&running.targets())));
            }
            Err(e) => {
                reloads.refused();
                tracing::error!(cause = %cause, error = %e, "configuration reload refused: keeping the running configuration");
            }
        }
        let serving = running.targets().len();
        crate::systemd::ready(&if refused {
            format!("serving {serving} target(s); the last reload was refused (see the log)")
        } else {
            format!("serving {serving} target(s)")
        });
        self.baseline.send_replace(Baseline {
            enabled: running.config.watch,
            files: observed,
        });
    }

    /// Reads, builds, binds, applies. Returns the outcome and the files
    /// the attempt read (the new baseline for `--watch`).
    async fn attempt(
        &self,
        running: &mut Running,
    ) -> (Result<Summary, ReloadError>, Vec<(PathBuf, FileState)>) {
        // The config file as it is before it is read; every other file as
        // it is before the targets are built from it. A later change then
        // differs from what `--watch` is given, and reloads again.
        let config_file = running
            .config
            .config_file
            .as_ref()
            .map(|path| (path.clone(), observe(path)));
        let fresh = (self.source)();
        let mut files = match &fresh {
            Ok(fresh) => fresh.files(),
            Err(_) => Vec::new(),
        };
        let running_files = running.config.files();
        let mut observed: Vec<(PathBuf, FileState)> = config_file.into_iter().collect();
        // The running configuration's files stay watched until a reload
        // without them is applied.
        for path in &running_files {
            if !files.contains(path) {
                files.push(path.clone());
            }
        }
        files.retain(|path| !observed.iter().any(|(p, _)| p == path));
        observed.extend(observe_all(&files));
        let result = match fresh {
            Ok(fresh) => self.apply_new(running, fresh).await,
            Err(e) => Err(ReloadError::Config(e.one_line())),
        };
        if result.is_ok() {
            let now = running.config.files();
            observed.retain(|(path, _)| now.contains(path));
        }
        (result, observed)
    }

    async fn apply_new(
        &self,
        running: &mut Running,
        fresh: Config,
    ) -> Result<Summary, ReloadError> {
        if !fresh.skipped.is_empty() {
            let why: Vec<String> = fresh
                .skipped
                .iter()
                .map(|s| format!("target {}: {}", s.target, s.reason))
                .collect();
            return Err(ReloadError::Config(why.join("; ")));
        }
        let (effective, kept) = restart_only(&running.config, fresh);
        for option in kept {
            tracing::warn!(
                option,
                "changed in the configuration, but it takes a restart: keeping the running value"
            );
        }
        probe_platform(&effective, Some(&running.config));
        let current = running.targets();
        let cx = Context {
            shared: self.shared,
            running: &current,
            strict: true,
        };
        let built = target::build(&effective, cx).await?;

        let old: Vec<(Endpoint, Arc<Target>)> = running
            .listeners
            .iter()
            .map(|l| (l.endpoint.clone(), l.target()))
            .collect();
        let old: Vec<(Endpoint, &Fingerprint)> = old
            .iter()
            .map(|(e, t)| (e.clone(), &t.fingerprint))
            .collect();
        let new: Vec<(Endpoint, &Fingerprint)> = built
            .targets
            .iter()
            .flat_map(|t| {
                Endpoint::of(&t.config)
                    .into_iter()
                    .map(|e| (e, &t.fingerprint))
            })
            .collect();
        let plan = diff::plan(&old, &new);

        let mut bound = Vec::with_capacity(plan.add.len());
        for endpoint in &plan.add {
            match endpoint.bind() {
                Ok(listener) => bound.push((endpoint.clone(), listener)),
                Err(e) => return Err(bind_refused(e, endpoint, &plan.remove)),
            }
        }
        if let Some(why) = &effective.all_proxy_ignored {
            if running.config.all_proxy_ignored.as_ref() != Some(why) {
                tracing::warn!("{why}");
            }
        }

        // Nothing from here to the apply waits: the reload is applied whole
        // or not at all.
        let summary = Summary {
            noop: plan.is_noop(),
            kept: plan.keep.len(),
            changed: plan.change.len(),
            added: plan.add.len(),
            removed: plan.remove.len(),
        };
        // Removed targets drain as the new configuration says.
        let drain = built.config.max_sigterm_delay;
        let closing = apply(running, &built.targets, &plan, bound, self.serving, drain);
        running.config = built.config;
        target::start_hops(
            &running.targets(),
            &current,
            running.config.cloudsql.lazy_refresh,
        );
        // Applied. The removed listeners close at once; wait for that, so
        // that the next reload may bind their addresses again.
        for closed in closing {
            let _ = closed.await;
        }
        Ok(summary)
    }
}

/// Moves the listeners to the new targets as `plan` says. A target that
/// keeps one of its endpoints keeps its running instance on all of them.
/// Removed listeners stop accepting and drain for `drain`; the receivers
/// complete as each is closed.
fn apply(
    running: &mut Running,
    targets: &[Arc<Target>],
    plan: &Plan<Endpoint>,
    mut bound: Vec<(Endpoint, Listener)>,
    serving: &Serving,
    drain: Duration,
) -> Vec<tokio::sync::oneshot::Receiver<()>> {
    let mut old = std::mem::take(&mut running.listeners);
    let mut listeners = Vec::with_capacity(old.len() + bound.len());
    for target in targets {
        let endpoints = Endpoint::of(&target.config);
        let kept = endpoints
            .iter()
            .filter(|e| plan.keep.contains(e))
            .find_map(|e| old.iter().find(|l| l.endpoint == *e))
            .map(Listening::target);
        let serve = kept.unwrap_or_else(|| target.clone());
        for endpoint in endpoints {
            if let Some(at) = old.iter().position(|l| l.endpoint == endpoint) {
                let listening = old.remove(at);
                if plan.change.contains(&endpoint) {
                    let before = listening.target();
                    let changed = serve.fingerprint.changes_since(&before.fingerprint);
                    let (target, changed) = (&serve.config.name, changed.join(", "));
                    let message =
                        "target changed: new connections get the new settings, open ones keep theirs";
                    if before.config.name == *target {
                        tracing::info!(%target, listen = %endpoint, %changed, "{message}");
                    } else {
                        let was = &before.config.name;
                        tracing::info!(%target, listen = %endpoint, %was, %changed, "{message}");
                    }
                    listening.set_target(serve.clone());
                }
                listeners.push(listening);
            } else if let Some(at) = bound.iter().position(|(e, _)| *e == endpoint) {
                let (endpoint, listener) = bound.remove(at);
                listeners.push(Listening::start(serving, endpoint, listener, serve.clone()));
            }
        }
    }
    running.listeners = listeners;
    // What is left was removed.
    old.into_iter()
        .map(|listening| listening.retire(drain))
        .collect()
}

/// A bind error, with what to do when a listener this reload removes holds
/// the port (Linux refuses 0.0.0.0:P while 127.0.0.1:P listens).
fn bind_refused(e: BindError, endpoint: &Endpoint, removed: &[Endpoint]) -> ReloadError {
    let holder = match endpoint {
        Endpoint::Tcp(addr) => removed
            .iter()
            .find(|r| matches!(r, Endpoint::Tcp(old) if old.port() == addr.port())),
        Endpoint::Unix(_) => None,
    };
    match holder {
        Some(old) if e.is_address_in_use() => ReloadError::Bind(format!(
            "{e}: the listener on {old}, which this reload removes, still holds the port; remove it in one reload and add {endpoint} in the next, or restart"
        )),
        _ => ReloadError::Bind(e.to_string()),
    }
}

/// `fresh` with the options a reload cannot change set back to their
/// running values, and the names of those that differed. They shape the
/// process itself: the connection limit's semaphore, the log subscriber,
/// the health, metrics and admin servers. `--run-connection-test` and
/// `--skip-failed-targets` act at start only and are not reported.
fn restart_only(running: &Config, mut fresh: Config) -> (Config, Vec<&'static str>) {
    let mut kept = Vec::new();
    let mut differs = |option: &'static str, yes: bool| {
        if yes {
            kept.push(option);
        }
    };
    differs(
        "max-connections",
        fresh.max_connections != running.max_connections,
    );
    differs("data-threads", fresh.data_threads != running.data_threads);
    differs("log-format", fresh.log_format != running.log_format);
    differs("debug-logs", fresh.debug_logs != running.debug_logs);
    differs("http-address", fresh.http.address != running.http.address);
    differs("http-port", fresh.http.port != running.http.port);
    differs(
        "health-check",
        fresh.http.health_check != running.http.health_check,
    );
    differs(
        "prometheus",
        fresh.http.prometheus != running.http.prometheus,
    );
    differs(
        "readiness-checks-upstream",
        fresh.http.readiness_checks_upstream != running.http.readiness_checks_upstream,
    );
    differs(
        "quitquitquit",
        fresh.admin_port.is_some() != running.admin_port.is_some(),
    );
    differs(
        "admin-port",
        fresh.admin_port.is_some()
            && running.admin_port.is_some()
            && fresh.admin_port != running.admin_port,
    );
    fresh.max_connections = running.max_connections;
    fresh.data_threads = running.data_threads;
    fresh.log_format = running.log_format;
    fresh.debug_logs = running.debug_logs;
    fresh.http = running.http.clone();
    fresh.admin_port = running.admin_port;
    fresh.run_connection_test = running.run_connection_test;
    fresh.skip_failed_targets = running.skip_failed_targets;
    (fresh, kept)
}

#[cfg(test)]
mod tests {

    use super::*;

    fn load(args: &[&str]) -> Config {
        Config::from_test_args(args)
    }

    #[test]
    fn process_options_keep_their_running_value_and_are_named() {
        let running = load(&["--max-connections", "10", "--prometheus", "postgres://db"]);
        let fresh = load(&[
            "--max-connections",
            "20",
            "--prometheus",
            "--http-port",
            "9999",
            "--log-format",
            "json",
            "--quitquitquit",
            "--max-sigterm-delay",
            "30s",
            "--run-connection-test",
            "postgres://db",
            "postgres://db2",
        ]);
        let (effective, kept) = restart_only(&running, fresh);
        assert_eq!(
            kept,
            ["max-connections", "log-format", "http-port", "quitquitquit"]
        );
        assert_eq!(effective.max_connections, running.max_connections);
        assert_eq!(effective.http, running.http);
        assert_eq!(effective.admin_port, None);
        assert_eq!(effective.log_format, running.log_format);
        assert!(!effective.run_connection_test);
        // What the targets and the shutdown use does change.
        assert_eq!(effective.targets.len(), 2);
        assert_eq!(effective.max_sigterm_delay.as_secs(), 30);
    }

    #[test]
    fn the_same_configuration_needs_no_restart() {
        let running = load(&["--max-connections", "10", "postgres://db"]);
        let (effective, kept) = restart_only(&running, running.clone());
        assert!(kept.is_empty());
        assert_eq!(effective, running);
    }

    #[test]
    fn a_port_held_by_a_removed_listener_is_explained() {
        let removed = [Endpoint::Tcp(([127, 0, 0, 1], 5432).into())];
        let wanted = Endpoint::Tcp(([0, 0, 0, 0], 5432).into());
        let in_use = BindError::new(
            wanted.to_string(),
            std::io::Error::from(std::io::ErrorKind::AddrInUse),
        );
        let message = bind_refused(in_use, &wanted, &removed).to_string();
        assert!(
            message.starts_with("cannot listen on 0.0.0.0:5432: ")
                && message.contains("the listener on 127.0.0.1:5432, which this reload removes, still holds the port"),
            "{message}"
        );
        let other = BindError::new(
            wanted.to_string(),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(!bind_refused(other, &wanted, &removed)
            .to_string()
            .contains("removes"));
    }
}
