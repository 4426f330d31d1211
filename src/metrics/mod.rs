//! keyhole's Prometheus registry: what operators read to see how each
//! target is doing (connections, refusals, bytes, upstream latency, tokens)
//! and how the process is doing. Counting is plain atomics, one relaxed add
//! per event; [`Registry::render`] writes the text exposition format for
//! `/metrics`. Labels carry target names and fixed words only: never user
//! names, secrets or client addresses.
//!
//! A family without any sample is left out of the scrape entirely (no
//! `# HELP`/`# TYPE` lines either): `keyhole_connections_closed_total`
//! before any connection has closed, `keyhole_token_expiry_seconds` when no
//! target knows a token, a process metric `/proc` did not give.

mod histogram;
mod hop;
mod pool;
mod process;
mod reload;
mod target;
mod text;

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

pub use histogram::Histogram;
pub use hop::HopMetrics;
pub use pool::PoolMetrics;
pub use process::Snapshot as ProcessSnapshot;
pub use reload::ReloadMetrics;
pub use target::{ExpiryProbe, OpenConnection, TargetMetrics};
pub use text::CONTENT_TYPE;

use text::{with, Exposition, Float, Kind};

/// Why a client connection was refused before reaching a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReason {
    /// Over `--max-connections`.
    Limit,
    /// The client's address is outside the target's `allow=` list.
    Allowlist,
    /// The database resolved only to addresses the backend may not dial.
    Policy,
}

impl RefusedReason {
    pub const ALL: [RefusedReason; 3] = [
        RefusedReason::Limit,
        RefusedReason::Allowlist,
        RefusedReason::Policy,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RefusedReason::Limit => "limit",
            RefusedReason::Allowlist => "allowlist",
            RefusedReason::Policy => "policy",
        }
    }
}

/// Every target's metrics, in registration order.
#[derive(Debug)]
pub struct Registry {
    targets: Mutex<Vec<Arc<TargetMetrics>>>,
    hops: Mutex<Vec<Arc<HopMetrics>>>,
    reloads: ReloadMetrics,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// An empty registry (the process uses [`global`]; tests make their own).
    pub fn new() -> Registry {
        Registry {
            targets: Mutex::new(Vec::new()),
            hops: Mutex::new(Vec::new()),
            reloads: ReloadMetrics::default(),
        }
    }

    /// The configuration reload counters.
    pub fn reloads(&self) -> &ReloadMetrics {
        &self.reloads
    }

    /// The metrics of hop `name` (`via=`, shown without credentials),
    /// created on first use.
    pub fn hop(&self, name: &str, kind: &'static str) -> Arc<HopMetrics> {
        let mut hops = self.hops.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = hops.iter().find(|h| h.name() == name) {
            return Arc::clone(existing);
        }
        let created = Arc::new(HopMetrics::new(name, kind));
        hops.push(Arc::clone(&created));
        created
    }

    /// The metrics of target `name`, created on first use. Look it up once
    /// per target and keep the handle: this takes a lock.
    pub fn target(&self, name: &str) -> Arc<TargetMetrics> {
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = targets.iter().find(|t| t.name() == name) {
            return Arc::clone(existing);
        }
        let created = Arc::new(TargetMetrics::new(name));
        targets.push(Arc::clone(&created));
        created
    }

    /// The whole scrape in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut exp = Exposition::default();
        self.render_keyhole(&mut exp);
        ProcessSnapshot::read().render(&mut exp);
        exp.finish()
    }

    /// The `keyhole_` families.
    fn render_keyhole(&self, exp: &mut Exposition) {
        // A snapshot of the list, so no lock is held while rendering (an
        // expiry probe runs foreign code).
        let targets: Vec<Arc<TargetMetrics>> = self
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let targets: Vec<&TargetMetrics> = targets.iter().map(Arc::as_ref).collect();

        exp.family(
            "keyhole_build_info",
            "keyhole's version; the value is always 1.",
            Kind::Gauge,
            |s| {
                s.push(
                    "keyhole_build_info",
                    &[("version", env!("CARGO_PKG_VERSION"))],
                    1,
                )
            },
        );
        exp.family(
            "keyhole_connections_open",
            "Client connections open now.",
            Kind::Gauge,
            |s| {
                for t in &targets {
                    s.push("keyhole_connections_open", &t.labels(), t.open());
                }
            },
        );
        exp.family(
            "keyhole_connections_total",
            "Client connections accepted.",
            Kind::Counter,
            |s| {
                for t in &targets {
                    s.push("keyhole_connections_total", &t.labels(), t.total());
                }
            },
        );
        exp.family(
            "keyhole_connections_closed_total",
            "Client connections closed, by the outcome their log line names.",
            Kind::Counter,
            |s| {
                for t in &targets {
                    for (outcome, count) in t.closed_counts() {
                        let labels = with(&t.labels(), "outcome", outcome);
                        s.push("keyhole_connections_closed_total", &labels, count);
                    }
                }
            },
        );
        exp.family(
            "keyhole_connections_refused_total",
            "Client connections refused before reaching a database, by reason.",
            Kind::Counter,
            |s| {
                for t in &targets {
                    for reason in RefusedReason::ALL {
                        let labels = with(&t.labels(), "reason", reason.label());
                        let count = t.refused_total(reason);
                        s.push("keyhole_connections_refused_total", &labels, count);
                    }
                }
            },
        );
        exp.family(
            "keyhole_bytes_total",
            "Bytes carried between clients and databases, by direction.",
            Kind::Counter,
            |s| {
                for t in &targets {
                    let (up, down) = t.transferred();
                    for (direction, bytes) in [("client_to_server", up), ("server_to_client", down)]
                    {
                        let labels = with(&t.labels(), "direction", direction);
                        s.push("keyhole_bytes_total", &labels, bytes);
                    }
                }
            },
        );
        exp.family(
            "keyhole_upstream_connect_seconds",
            "Time to open the TCP connection to the database.",
            Kind::Histogram,
            |s| {
                for t in &targets {
                    t.connect
                        .render(s, "keyhole_upstream_connect_seconds", &t.labels());
                }
            },
        );
        exp.family(
            "keyhole_upstream_tls_handshake_seconds",
            "Time of the TLS handshake with the database.",
            Kind::Histogram,
            |s| {
                for t in &targets {
                    t.tls_handshake.render(
                        s,
                        "keyhole_upstream_tls_handshake_seconds",
                        &t.labels(),
                    );
                }
            },
        );
        exp.family(
            "keyhole_upstream_tls_handshakes_total",
            "TLS handshakes with the database, by kind: full, full_after_retry (the server asked for another key-exchange group), resumed (a session ticket).",
            Kind::Counter,
            |s| {
                for t in &targets {
                    for kind in crate::tls::Handshake::ALL {
                        let labels = with(&t.labels(), "kind", kind.label());
                        s.push(
                            "keyhole_upstream_tls_handshakes_total",
                            &labels,
                            t.handshakes(kind),
                        );
                    }
                }
            },
        );
        exp.family(
            "keyhole_token_injections_total",
            "Tokens that answered a database's password request.",
            Kind::Counter,
            |s| {
                for t in &targets {
                    s.push(
                        "keyhole_token_injections_total",
                        &t.labels(),
                        t.token_injections(),
                    );
                }
            },
        );
        exp.family(
            "keyhole_token_failures_total",
            "Sessions that needed a token and could not use one.",
            Kind::Counter,
            |s| {
                for t in &targets {
                    s.push(
                        "keyhole_token_failures_total",
                        &t.labels(),
                        t.token_failures(),
                    );
                }
            },
        );
        exp.family(
            "keyhole_token_refreshes_total",
            "Token fetches from the cloud provider, by result.",
            Kind::Counter,
            |s| {
                for t in &targets {
                    let (ok, error) = t.token_refreshes();
                    for (result, count) in [("ok", ok), ("error", error)] {
                        let labels = with(&t.labels(), "result", result);
                        s.push("keyhole_token_refreshes_total", &labels, count);
                    }
                }
            },
        );
        exp.family(
            "keyhole_token_expiry_seconds",
            "Seconds until the soonest cached token expires (0 once it has).",
            Kind::Gauge,
            |s| {
                for t in &targets {
                    if let Some(left) = t.token_expiry_seconds() {
                        s.push("keyhole_token_expiry_seconds", &t.labels(), Float(left));
                    }
                }
            },
        );
        exp.family(
            "keyhole_cloudsql_refreshes_total",
            "Cloud SQL certificate and settings refreshes, by result (ok or the error's label).",
            Kind::Counter,
            |s| {
                for t in &targets {
                    for (result, count) in t.cloudsql_refreshes() {
                        let labels = with(&t.labels(), "result", result);
                        s.push("keyhole_cloudsql_refreshes_total", &labels, count);
                    }
                }
            },
        );
        exp.family(
            "keyhole_cloudsql_cert_expiry_seconds",
            "Seconds until the Cloud SQL instance's client certificate expires (0 once it has).",
            Kind::Gauge,
            |s| {
                for t in &targets {
                    if let Some(left) = t.cloudsql_cert_expiry_seconds() {
                        s.push(
                            "keyhole_cloudsql_cert_expiry_seconds",
                            &t.labels(),
                            Float(left),
                        );
                    }
                }
            },
        );
        let pooled: Vec<&TargetMetrics> = targets
            .iter()
            .copied()
            .filter(|t| t.pool().enabled())
            .collect();
        exp.family(
            "keyhole_pool_connections",
            "Server connections of a target's pool (pool=session), by state (idle or in_use).",
            Kind::Gauge,
            |s| {
                for t in &pooled {
                    let pool = t.pool();
                    for (state, count) in [("idle", pool.idle()), ("in_use", pool.in_use())] {
                        let labels = with(&t.labels(), "state", state);
                        s.push("keyhole_pool_connections", &labels, count);
                    }
                }
            },
        );
        exp.family(
            "keyhole_pool_waits_total",
            "Clients that found their target's pool full and waited for a connection.",
            Kind::Counter,
            |s| {
                for t in &pooled {
                    s.push("keyhole_pool_waits_total", &t.labels(), t.pool().waits());
                }
            },
        );
        exp.family(
            "keyhole_pool_wait_seconds",
            "How long clients waited for a pooled connection (those that waited).",
            Kind::Histogram,
            |s| {
                for t in &pooled {
                    t.pool()
                        .wait
                        .render(s, "keyhole_pool_wait_seconds", &t.labels());
                }
            },
        );
        exp.family(
            "keyhole_pool_opened_total",
            "Server connections the pool logged in to (each a login with keyhole's token or password).",
            Kind::Counter,
            |s| {
                for t in &pooled {
                    s.push("keyhole_pool_opened_total", &t.labels(), t.pool().opened_total());
                }
            },
        );
        exp.family(
            "keyhole_pool_reused_total",
            "Clients served with an idle pooled connection instead of a new login.",
            Kind::Counter,
            |s| {
                for t in &pooled {
                    s.push(
                        "keyhole_pool_reused_total",
                        &t.labels(),
                        t.pool().reused_total(),
                    );
                }
            },
        );
        exp.family(
            "keyhole_pool_closed_total",
            "Pooled server connections closed, by reason.",
            Kind::Counter,
            |s| {
                for t in &pooled {
                    for (reason, count) in t.pool().closed_counts() {
                        let labels = with(&t.labels(), "reason", reason);
                        s.push("keyhole_pool_closed_total", &labels, count);
                    }
                }
            },
        );
        let hops: Vec<Arc<HopMetrics>> = self
            .hops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        exp.family(
            "keyhole_hop_connections_total",
            "Connections to databases through a hop (via=), by transport and result (ok or the failure's label).",
            Kind::Counter,
            |s| {
                for h in &hops {
                    for (result, count) in h.connections() {
                        let labels = [("hop", h.name()), ("transport", h.kind()), ("result", result)];
                        s.push("keyhole_hop_connections_total", &labels, count);
                    }
                }
            },
        );
        exp.family(
            "keyhole_bastion_logins_total",
            "SSH logins to a bastion (the first and every reconnect), by result (ok or the failure's label).",
            Kind::Counter,
            |s| {
                for h in &hops {
                    for (result, count) in h.logins() {
                        let labels = [("hop", h.name()), ("result", result)];
                        s.push("keyhole_bastion_logins_total", &labels, count);
                    }
                }
            },
        );
        exp.family(
            "keyhole_bastion_up",
            "Whether the SSH connection to a bastion is open (1) or not (0).",
            Kind::Gauge,
            |s| {
                for h in &hops {
                    if let Some(up) = h.up() {
                        s.push("keyhole_bastion_up", &[("hop", h.name())], u64::from(up));
                    }
                }
            },
        );
        exp.family(
            "keyhole_cloudsql_api_calls_total",
            "SQL Admin API calls, by method and HTTP status (error: no answer).",
            Kind::Counter,
            |s| {
                for t in &targets {
                    for ((method, status), count) in t.admin_api_calls() {
                        let labels = with(&with(&t.labels(), "method", method), "status", &status);
                        s.push("keyhole_cloudsql_api_calls_total", &labels, count);
                    }
                }
            },
        );
        self.reloads.render(exp);
    }
}

/// The process's registry.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

#[cfg(test)]
mod tests;
