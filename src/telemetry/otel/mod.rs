//! OpenTelemetry export (cargo feature `otel`): a trace per client
//! connection and the `/metrics` families, sent over OTLP/HTTP to a
//! collector, configured by the standard `OTEL_*` variables.
//!
//! No OpenTelemetry SDK is linked: OTLP's protobuf (and JSON) encoding is
//! written here ([`proto`], [`json`]), the requests go through keyhole's
//! own HTTP client (proxies, rustls), and the metrics are the registry's.
//! The connection path calls [`connection`] and [`closed`] (src/proxy/serve.rs)
//! and marks its phases where keyhole already times them; without an
//! exporter each of those is one failed lookup.

mod config;
mod export;
mod json;
mod metrics;
mod proto;
mod trace;

use std::collections::HashMap;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

pub use config::{Config, ConfigError};
pub use export::Handle;
pub use trace::Phase;

use crate::config::{Protocol, TargetConfig};
use crate::listener::Peer;
use proto::KeyValue;

/// The process's tracer, once [`start`] has run with traces on.
static TRACER: OnceLock<export::Tracer> = OnceLock::new();

/// How long shutdown waits for the last export.
pub const FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// Starts exporting (on the current runtime) what `config` says. `env` is
/// the process environment, for the HTTP client's proxy variables.
pub fn start(config: Config, env: &HashMap<String, String>) -> Handle {
    let (tracer, handle) = export::start(config, env);
    if let Some(tracer) = tracer {
        let _ = TRACER.set(tracer);
    }
    handle
}

/// A connection's trace while it runs.
#[derive(Debug)]
pub struct ConnectionTrace(trace::Connection);

/// A newly accepted connection's trace, if traces are exported and the
/// sampler keeps it.
pub fn connection(
    id: u64,
    peer: &Peer,
    target: &TargetConfig,
    upstream: impl FnOnce() -> (Option<Protocol>, String),
) -> Option<ConnectionTrace> {
    let tracer = TRACER.get()?;
    // The attributes are gathered only for a trace the sampler keeps.
    trace::Connection::start(tracer.sampler, || attributes(id, peer, target, upstream))
        .map(ConnectionTrace)
}

/// The connection span's attributes known at accept.
fn attributes(
    id: u64,
    peer: &Peer,
    target: &TargetConfig,
    upstream: impl FnOnce() -> (Option<Protocol>, String),
) -> Vec<KeyValue> {
    let (protocol, server) = upstream();
    let mut attrs = Vec::with_capacity(10);
    attrs.push(KeyValue::str("keyhole.target", target.name.as_str()));
    attrs.push(KeyValue::int(
        "keyhole.connection.id",
        i64::try_from(id).unwrap_or(i64::MAX),
    ));
    if let Some(protocol) = protocol {
        let system = match protocol {
            Protocol::Postgres => "postgresql",
            Protocol::Mysql => "mysql",
        };
        attrs.push(KeyValue::str("db.system.name", system));
    }
    if target.cloudsql.is_some() {
        attrs.push(KeyValue::str("server.address", server));
    } else {
        attrs.push(KeyValue::str("server.address", target.host.as_str()));
        attrs.push(KeyValue::int("server.port", i64::from(target.port)));
    }
    match peer {
        Peer::Tcp(addr) => {
            attrs.push(KeyValue::str("network.transport", "tcp"));
            attrs.push(KeyValue::str("network.peer.address", addr.ip().to_string()));
            attrs.push(KeyValue::int("network.peer.port", i64::from(addr.port())));
        }
        Peer::Unix => attrs.push(KeyValue::str("network.transport", "unix")),
    }
    attrs
}

/// Runs `serve` (the session) with `trace` as its task's current trace, so
/// the phases it goes through are marked on it.
pub fn within<F: Future>(
    trace: Option<&ConnectionTrace>,
    serve: F,
) -> impl Future<Output = F::Output> {
    trace::Connection::scope(trace.map(|t| &t.0), serve)
}

/// The connection has closed with `outcome` (the label of its log line and
/// of `keyhole_connections_closed_total`); its spans go to the queue.
pub fn closed(
    trace: Option<ConnectionTrace>,
    outcome: &str,
    error: Option<&str>,
    bytes: (u64, u64),
    database: Option<&str>,
) {
    let (Some(trace), Some(tracer)) = (trace, TRACER.get()) else {
        return;
    };
    let extra = database
        .map(|d| vec![KeyValue::str("db.namespace", d)])
        .unwrap_or_default();
    tracer.submit(trace.0.finish(outcome, error, bytes, extra));
}

/// Marks a phase that ended now and took `took` on the current
/// connection's trace; nothing outside one.
#[inline]
pub fn mark(phase: Phase, took: Duration, detail: Option<&'static str>) {
    if TRACER.get().is_some() {
        trace::mark(phase, took, detail);
    }
}
