//! One target's metrics: connections, refusals, bytes, upstream latency and
//! tokens. Every event is one relaxed atomic add, except a connection's
//! close (once per connection), which files its outcome under a short lock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::histogram::Histogram;
use super::pool::PoolMetrics;
use super::RefusedReason;
use crate::tls::Handshake;

/// Answers "when does the soonest cached token expire?" at scrape time.
/// It runs on the scraping thread, so it must not block.
pub type ExpiryProbe = Arc<dyn Fn() -> Option<SystemTime> + Send + Sync>;

/// The counters of one target, shared by its connections.
#[derive(Default)]
pub struct TargetMetrics {
    name: String,
    open: AtomicU64,
    total: AtomicU64,
    /// Outcome label and count, in first-seen order.
    closed: Mutex<Vec<(&'static str, u64)>>,
    refused: [AtomicU64; 3],
    client_to_server: AtomicU64,
    server_to_client: AtomicU64,
    pub(super) connect: Histogram,
    pub(super) tls_handshake: Histogram,
    /// Handshakes by kind (full, full after a retry, resumed).
    handshakes: [AtomicU64; 3],
    token_injections: AtomicU64,
    token_failures: AtomicU64,
    refreshes_ok: AtomicU64,
    refreshes_error: AtomicU64,
    expiry: Mutex<Option<ExpiryProbe>>,
    /// Cloud SQL instances: certificate refreshes by result.
    cloudsql_refreshes: Mutex<Vec<(&'static str, u64)>>,
    /// Cloud SQL instances: Admin API calls by (method, HTTP status or `error`).
    cloudsql_api_calls: Mutex<Vec<((&'static str, String), u64)>>,
    /// Cloud SQL instances: when the current client certificate expires.
    cloudsql_cert_expiry: Mutex<Option<SystemTime>>,
    /// `pool=session`: the target's connection pool.
    pool: Arc<PoolMetrics>,
}

impl TargetMetrics {
    pub(super) fn new(name: &str) -> TargetMetrics {
        TargetMetrics {
            name: name.to_owned(),
            ..TargetMetrics::default()
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The labels every sample of this target carries.
    pub(super) fn labels(&self) -> Vec<(&'static str, &str)> {
        vec![("target", self.name.as_str())]
    }

    /// A client connection was accepted. It counts as open until the
    /// returned guard drops, however its task ends.
    #[must_use = "the connection counts as open only while the guard lives"]
    pub fn opened(self: &Arc<Self>) -> OpenConnection {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            metrics: Arc::clone(self),
        }
    }

    /// The counters of the target's connection pool (shown once enabled).
    pub fn pool(&self) -> &Arc<PoolMetrics> {
        &self.pool
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// A connection ended with `outcome`, the label its log line carries.
    pub fn closed(&self, outcome: &'static str) {
        let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        match closed.iter_mut().find(|(label, _)| *label == outcome) {
            Some((_, count)) => *count += 1,
            None => closed.push((outcome, 1)),
        }
    }

    /// Closed connections per outcome, in first-seen order.
    pub fn closed_counts(&self) -> Vec<(&'static str, u64)> {
        self.closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn refused(&self, reason: RefusedReason) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_total(&self, reason: RefusedReason) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    /// Bytes a connection carried (added once, when it ends, or in steps).
    pub fn add_transferred(&self, client_to_server: u64, server_to_client: u64) {
        self.client_to_server
            .fetch_add(client_to_server, Ordering::Relaxed);
        self.server_to_client
            .fetch_add(server_to_client, Ordering::Relaxed);
    }

    /// Bytes carried so far: (client to server, server to client).
    pub fn transferred(&self) -> (u64, u64) {
        (
            self.client_to_server.load(Ordering::Relaxed),
            self.server_to_client.load(Ordering::Relaxed),
        )
    }

    /// The TCP connection to the database took `took`.
    pub fn upstream_connected(&self, took: Duration) {
        self.connect.observe(took);
        // Every dial of a session passes here, in the session's task: the
        // connection's trace takes its dial phase from it.
        #[cfg(feature = "otel")]
        crate::telemetry::otel::mark(crate::telemetry::otel::Phase::Dial, took, None);
    }

    /// The TLS handshake with the database took `took` and went as `kind`.
    pub fn tls_handshake(&self, took: Duration, kind: Handshake) {
        self.tls_handshake.observe(took);
        self.handshakes[kind as usize].fetch_add(1, Ordering::Relaxed);
        // As for the dial: the trace's TLS phase.
        #[cfg(feature = "otel")]
        crate::telemetry::otel::mark(crate::telemetry::otel::Phase::Tls, took, Some(kind.label()));
    }

    /// Handshakes with the database that went as `kind`.
    pub fn handshakes(&self, kind: Handshake) -> u64 {
        self.handshakes[kind as usize].load(Ordering::Relaxed)
    }

    /// A token answered a server's password request.
    pub fn token_injected(&self) {
        self.token_injections.fetch_add(1, Ordering::Relaxed);
    }

    /// A session needed a token and could not have one, or the server
    /// asked for something a token cannot answer.
    pub fn token_failed(&self) {
        self.token_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_injections(&self) -> u64 {
        self.token_injections.load(Ordering::Relaxed)
    }

    pub fn token_failures(&self) -> u64 {
        self.token_failures.load(Ordering::Relaxed)
    }

    /// The token cache fetched a new token (`ok`) or failed to.
    pub fn token_refreshed(&self, ok: bool) {
        let counter = if ok {
            &self.refreshes_ok
        } else {
            &self.refreshes_error
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Token refreshes so far: (ok, error).
    pub fn token_refreshes(&self) -> (u64, u64) {
        (
            self.refreshes_ok.load(Ordering::Relaxed),
            self.refreshes_error.load(Ordering::Relaxed),
        )
    }

    /// From now on, a scrape asks `probe` when the soonest cached token
    /// expires. Replaces an earlier probe.
    pub fn watch_token_expiry(&self, probe: ExpiryProbe) {
        *self.expiry.lock().unwrap_or_else(PoisonError::into_inner) = Some(probe);
    }

    /// Seconds until the soonest cached token expires (0 once it has):
    /// `None` without a probe or when the probe knows no token.
    pub fn token_expiry_seconds(&self) -> Option<f64> {
        // Clone the probe out so it runs without the lock held.
        let probe = self
            .expiry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let expires = probe()?;
        Some(
            expires
                .duration_since(SystemTime::now())
                .map_or(0.0, |left| left.as_secs_f64()),
        )
    }
}

/// Cloud SQL connector figures (the target is an instance).
impl TargetMetrics {
    /// A certificate refresh ended: `ok`, or the error's label.
    pub fn cloudsql_refreshed(&self, result: &'static str) {
        bump(&self.cloudsql_refreshes, result);
    }

    /// Refreshes so far by result, in first-seen order.
    pub fn cloudsql_refreshes(&self) -> Vec<(&'static str, u64)> {
        self.cloudsql_refreshes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An Admin API call of `method` ended with `status` (`200`, `429`, or
    /// `error` when no answer came).
    pub fn admin_api_call(&self, method: &'static str, status: &str) {
        let mut calls = self
            .cloudsql_api_calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match calls
            .iter_mut()
            .find(|((m, s), _)| *m == method && s == status)
        {
            Some((_, count)) => *count += 1,
            None => calls.push(((method, status.to_owned()), 1)),
        }
    }

    /// Admin API calls so far by (method, status), in first-seen order.
    pub fn admin_api_calls(&self) -> Vec<((&'static str, String), u64)> {
        self.cloudsql_api_calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The instance's current client certificate expires at `at`.
    pub fn cloudsql_cert_expires(&self, at: SystemTime) {
        *self
            .cloudsql_cert_expiry
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    /// Seconds until the current client certificate expires (0 once it has);
    /// `None` before the first one.
    pub fn cloudsql_cert_expiry_seconds(&self) -> Option<f64> {
        let at = (*self
            .cloudsql_cert_expiry
            .lock()
            .unwrap_or_else(PoisonError::into_inner))?;
        Some(
            at.duration_since(SystemTime::now())
                .map_or(0.0, |left| left.as_secs_f64()),
        )
    }
}

fn bump(counts: &Mutex<Vec<(&'static str, u64)>>, label: &'static str) {
    let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
    match counts.iter_mut().find(|(l, _)| *l == label) {
        Some((_, count)) => *count += 1,
        None => counts.push((label, 1)),
    }
}

impl fmt::Debug for TargetMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetMetrics")
            .field("name", &self.name)
            .field("open", &self.open())
            .field("total", &self.total())
            .finish_non_exhaustive()
    }
}

/// A connection counted as open; dropping it (normally, by a panic or by a
/// cancelled task) takes it off the open gauge.
#[derive(Debug)]
pub struct OpenConnection {
    metrics: Arc<TargetMetrics>,
}

impl OpenConnection {
    /// The target's metrics, for the rest of the connection's events.
    pub fn metrics(&self) -> &Arc<TargetMetrics> {
        &self.metrics
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl crate::splice::Meter for TargetMetrics {
    fn add(&self, delta: crate::splice::Transferred) {
        self.add_transferred(delta.client_to_server, delta.server_to_client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_guard_balances_on_drop() {
        let m = Arc::new(TargetMetrics::new("t"));
        let first = m.opened();
        let second = m.opened();
        assert_eq!((m.open(), m.total()), (2, 2));
        drop(first);
        assert_eq!((m.open(), m.total()), (1, 2));
        drop(second);
        assert_eq!((m.open(), m.total()), (0, 2));
    }

    #[test]
    fn a_panicking_connection_still_closes_its_gauge() {
        let m = Arc::new(TargetMetrics::new("t"));
        let inner = Arc::clone(&m);
        let result = std::thread::spawn(move || {
            let _open = inner.opened();
            panic!("connection task panics");
        })
        .join();
        assert!(result.is_err());
        assert_eq!((m.open(), m.total()), (0, 1));
    }

    #[test]
    fn each_reason_counts_on_its_own() {
        let m = TargetMetrics::new("t");
        m.refused(RefusedReason::Allowlist);
        m.refused(RefusedReason::Allowlist);
        m.refused(RefusedReason::Policy);
        let counts: Vec<(&str, u64)> = RefusedReason::ALL
            .iter()
            .map(|r| (r.label(), m.refused_total(*r)))
            .collect();
        assert_eq!(counts, [("limit", 0), ("allowlist", 2), ("policy", 1)]);
    }

    #[test]
    fn outcomes_keep_first_seen_order() {
        let m = TargetMetrics::new("t");
        m.closed("upstream_connect");
        m.closed("ok");
        m.closed("upstream_connect");
        assert_eq!(m.closed_counts(), [("upstream_connect", 2), ("ok", 1)]);
    }

    #[test]
    fn token_expiry_comes_from_the_probe_and_stops_at_zero() {
        let m = TargetMetrics::new("t");
        assert_eq!(m.token_expiry_seconds(), None);
        m.watch_token_expiry(Arc::new(|| None));
        assert_eq!(m.token_expiry_seconds(), None);
        m.watch_token_expiry(Arc::new(|| {
            SystemTime::now().checked_sub(Duration::from_secs(5))
        }));
        assert_eq!(m.token_expiry_seconds(), Some(0.0));
        m.watch_token_expiry(Arc::new(|| {
            SystemTime::now().checked_add(Duration::from_secs(600))
        }));
        let left = m.token_expiry_seconds().unwrap_or(-1.0);
        assert!(left > 590.0 && left <= 600.0, "{left}");
    }
}
